// What a push looks like on the wire between instances: the payload of each PUBLISH the Redis
// relay makes, on channel PREFIX + key. Pure functions, no I/O, so tests and the fuzzer drive them.
//
// Every payload starts with a one-byte tag, so the two forms can never be mistaken for each other:
//
//   S<data>                                 a push to this channel's key alone: one PUBLISH
//   M<id> <n> <len>:<key>...<len>:<key><data>
//                                           a push to n keys, PUBLISHed once on each key's channel
//   P<position> <data>                      with history (--history-size): a push to this channel's
//                                           key, at <position> in its stream (redis_history.hpp's
//                                           script publishes it; a push to n keys is n of these)
//
//   <id>   32 lowercase hex digits: the publishing instance's random 64-bit id, then its 64-bit
//          counter. An instance subscribed to several of the keys receives one copy per channel:
//          it delivers the first (to every key, each local connection once) and drops the others.
//   <n>    how many keys follow, in decimal; each key is its length in decimal, ':', its bytes.
//   <data> the rest of the payload, as pushed.
//   <position> as wsbroadcast::position prints it: <epoch in hex>.<offset>.
//
// Example: a push of "paid" to alpha and beta is, on both wsbroadcast:alpha and wsbroadcast:beta,
//   M9f86d081884c7d65000000000000002a 2 5:alpha4:betapaid
// Instances sharing a prefix must all speak this format (older versions published bare data).
#pragma once

#include "wsbroadcast.hpp"

#include <algorithm>
#include <charconv>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_set>
#include <vector>

namespace wsbroadcast_server {

/// Names one multi-key push across every instance, so that its copies can be recognised.
struct relay_message_id {
    std::uint64_t instance = 0;
    std::uint64_t counter = 0;
    bool operator==(const relay_message_id&) const = default;
};

/// A payload read back: `keys` and `data` point into it.
struct relayed_push {
    std::optional<wsbroadcast::position> at;  // set for a push with its position in the key's stream
    std::optional<relay_message_id> id;       // set for a multi-key push
    std::vector<std::string_view> keys;       // empty for a single-key push: the channel says which
    std::string_view data;
};

namespace relay_wire_detail {
constexpr char single_tag = 'S', multi_tag = 'M', positioned_tag = 'P';
constexpr std::size_t hex_digits = 16;

inline void append_hex(std::string& out, std::uint64_t n) {
    static constexpr char digits[] = "0123456789abcdef";
    for (int shift = 60; shift >= 0; shift -= 4) out += digits[(n >> shift) & 15];
}

inline std::optional<std::uint64_t> read_hex(std::string_view& in) {
    if (in.size() < hex_digits) return std::nullopt;
    std::uint64_t n = 0;
    for (char c : in.substr(0, hex_digits)) {
        const int digit = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
        if (digit < 0) return std::nullopt;
        n = n << 4 | static_cast<std::uint64_t>(digit);
    }
    in.remove_prefix(hex_digits);
    return n;
}

// A decimal followed by `end`, no larger than `max`.
inline std::optional<std::size_t> read_count(std::string_view& in, char end, std::size_t max) {
    std::size_t n = 0;
    const auto [stop, err] = std::from_chars(in.data(), in.data() + in.size(), n);
    if (err != std::errc{} || stop == in.data() || stop == in.data() + in.size() || *stop != end || n > max)
        return std::nullopt;
    in.remove_prefix(static_cast<std::size_t>(stop - in.data()) + 1);
    return n;
}
}  // namespace relay_wire_detail

inline std::string single_key_payload(std::string_view data) {
    std::string out;
    out.reserve(1 + data.size());
    out += relay_wire_detail::single_tag;
    out += data;
    return out;
}

inline std::string multi_key_payload(relay_message_id id, std::span<const std::string> keys, std::string_view data) {
    using namespace relay_wire_detail;
    std::string out(1, multi_tag);
    append_hex(out, id.instance);
    append_hex(out, id.counter);
    out += ' ' + std::to_string(keys.size()) + ' ';
    for (const auto& key : keys) out += std::to_string(key.size()) + ':' + key;
    out += data;
    return out;
}

/// nullopt for a payload in neither form (another version of the server on this prefix).
inline std::optional<relayed_push> parse_relay_payload(std::string_view payload) {
    using namespace relay_wire_detail;
    if (payload.empty()) return std::nullopt;
    const char tag = payload.front();
    payload.remove_prefix(1);
    relayed_push push;
    if (tag == single_tag) {
        push.data = payload;
        return push;
    }
    if (tag == positioned_tag) {
        const auto space = payload.find(' ');
        push.at =
            space == std::string_view::npos ? std::nullopt : wsbroadcast::position::parse(payload.substr(0, space));
        if (!push.at || push.at->epoch == 0 || push.at->offset == 0) return std::nullopt;
        push.data = payload.substr(space + 1);
        return push;
    }
    if (tag != multi_tag) return std::nullopt;
    const auto instance = read_hex(payload);
    const auto counter = instance ? read_hex(payload) : std::nullopt;
    if (!counter || !payload.starts_with(' ')) return std::nullopt;
    payload.remove_prefix(1);
    push.id = relay_message_id{*instance, *counter};
    const auto n = read_count(payload, ' ', payload.size() / 2);  // each key takes at least 2 bytes
    if (!n || *n == 0) return std::nullopt;
    push.keys.reserve(*n);
    for (std::size_t i = 0; i < *n; ++i) {
        const auto length = read_count(payload, ':', payload.size());
        if (!length || *length > payload.size()) return std::nullopt;  // the key must be all there
        push.keys.push_back(payload.substr(0, *length));
        payload.remove_prefix(*length);
    }
    push.data = payload;
    return push;
}

/// The ids of the last `capacity` multi-key pushes delivered: enough to recognise the other copies
/// of one push, which Redis sends right after each other, in little memory. Not thread-safe.
class recent_relay_ids {
public:
    explicit recent_relay_ids(std::size_t capacity) : ring_(std::max<std::size_t>(capacity, 1)) {
        seen_.reserve(ring_.size());
    }

    /// False if `id` is already there; otherwise remembers it, forgetting the oldest when full.
    bool insert(relay_message_id id) {
        if (!seen_.insert(id).second) return false;
        if (size_ == ring_.size())
            seen_.erase(ring_[next_]);
        else
            ++size_;
        ring_[next_] = id;
        next_ = (next_ + 1) % ring_.size();
        return true;
    }

private:
    struct hash {
        std::size_t operator()(const relay_message_id& id) const noexcept {
            return std::hash<std::uint64_t>{}(id.instance * 0x9e3779b97f4a7c15ULL ^ id.counter);
        }
    };
    std::vector<relay_message_id> ring_;
    std::unordered_set<relay_message_id, hash> seen_;
    std::size_t next_ = 0, size_ = 0;
};

}  // namespace wsbroadcast_server
