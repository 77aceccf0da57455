// libFuzzer target: the reference server's request routing, id validation, lenient URL decoding and the
// small parsers around them (UTF-8, id lists, Sec-WebSocket-Protocol, wsbroadcast.v1 commands, relay
// payloads, --redis URLs). Byte 0 picks the method; the rest is the request target, and the input of the others.
// Every invariant below is something the server relies on; a violation traps.
#include "cors.hpp"
#include "protocol.hpp"
#include "relay_wire.hpp"
#include "routes.hpp"

#include <boost/json/src.hpp>

#include <algorithm>
#include <cctype>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

using namespace wsbroadcast_server;

namespace {
void require(bool ok) {
    if (!ok) __builtin_trap();
}

// UTF-8's rules stated another way, to check valid_utf8 against: each sequence decodes, by its
// bits, to a code point that is no surrogate, at most U+10FFFF, and encoded in its shortest form.
bool utf8_by_reencoding(std::string_view s) {
    for (std::size_t i = 0; i < s.size();) {
        const auto lead = static_cast<unsigned char>(s[i]);
        const std::size_t n = lead < 0x80           ? 1
                              : (lead >> 5) == 0x6  ? 2
                              : (lead >> 4) == 0xE  ? 3
                              : (lead >> 3) == 0x1E ? 4
                                                    : 0;
        if (n == 0 || s.size() - i < n) return false;
        std::uint32_t code_point = n == 1 ? lead : lead & (0x7Fu >> n);
        for (std::size_t k = 1; k < n; ++k) {
            const auto next = static_cast<unsigned char>(s[i + k]);
            if ((next & 0xC0) != 0x80) return false;
            code_point = code_point << 6 | (next & 0x3Fu);
        }
        if (code_point > 0x10FFFF || (code_point >= 0xD800 && code_point <= 0xDFFF)) return false;
        const std::size_t shortest = code_point < 0x80 ? 1 : code_point < 0x800 ? 2 : code_point < 0x10000 ? 3 : 4;
        if (shortest != n) return false;
        i += n;
    }
    return true;
}
// Every byte but letters and digits as %XX: what url_decode reads back exactly.
std::string percent_encoded(std::string_view s) {
    static constexpr char digits[] = "0123456789ABCDEF";
    std::string out;
    for (unsigned char c : s) {
        if (std::isalnum(c)) {
            out += static_cast<char>(c);
        } else {
            out += '%';
            out += digits[c >> 4];
            out += digits[c & 15];
        }
    }
    return out;
}

// A --redis value: what parses is usable, is echoed without its password, and reads back the
// same when written out again.
void check_redis_url(std::string_view url) {
    const auto a = parse_redis_url(url);
    const auto redacted = redacted_redis_url(url);
    if (!a) return;
    require(!a->host.empty() && a->port != 0 && a->db <= 65535);
    require(a->host.find('/') == a->host.npos && a->host.find('@') == a->host.npos);
    if (a->password.empty()) {
        require(a->user.empty() && url.find('@') == url.npos && redacted == url);
    } else {
        // The password's text is gone: the echo is the scheme, the raw user, "***", and all from '@'.
        const auto at = url.rfind('@');
        const auto colon = url.find(':', 8);
        require(colon < at);
        require(redacted == std::string(url.substr(0, colon)) + ":***" + std::string(url.substr(at)));
    }
    std::string again = "redis://";
    if (!a->password.empty()) again += percent_encoded(a->user) + ":" + percent_encoded(a->password) + "@";
    // In brackets when it must be: a ':' in it (IPv6), or a '[' first ("redis://[[x]" names "[x").
    const bool bracketed = a->host.find(':') != a->host.npos || a->host.starts_with('[');
    again += (bracketed ? "[" : "") + a->host + (bracketed ? "]" : "") + ":" + std::to_string(a->port) + "/" +
             std::to_string(a->db);
    const auto b = parse_redis_url(again);
    require(b && b->host == a->host && b->port == a->port && b->user == a->user && b->password == a->password &&
            b->db == a->db);
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size == 0) return 0;
    static constexpr std::string_view methods[] = {"GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS"};
    const auto method = methods[data[0] % std::size(methods)];
    const std::string_view target(reinterpret_cast<const char*>(data + 1), size - 1);

    const auto r = route_request(method, target);
    switch (r.kind) {
    case route_kind::subscribe: require(r.ids.size() <= 1); [[fallthrough]];
    case route_kind::push_body:
    case route_kind::push_path:
        // Nothing reaches the manager with an id LNbits would refuse, nor the same id twice.
        require(r.ids.size() <= max_ids_per_push);
        require(r.kind == route_kind::subscribe || !r.ids.empty());
        for (std::size_t i = 0; i < r.ids.size(); ++i) {
            require(valid_id(r.ids[i]));
            require(std::count(r.ids.begin(), r.ids.end(), r.ids[i]) == 1);
        }
        break;
    case route_kind::page:
    case route_kind::client_module:
    case route_kind::metrics:
    case route_kind::health:
    case route_kind::ready: require(method == "GET" || method == "HEAD"); break;
    case route_kind::preflight: require(method == "OPTIONS" && r.ids.empty()); break;
    case route_kind::wrong_method: require(!r.allow.empty()); break;
    case route_kind::bad_request: require(!r.problem.empty()); break;
    case route_kind::not_found: break;
    }
    if (r.kind == route_kind::push_path) require(r.data.has_value());

    // Decoding never grows the input, and leaves it as it is when it has no well-formed escape (and,
    // for a query, no '+'); a decoded string re-escaped as JSON has no raw control bytes.
    const bool plus_is_space = data[0] & 1;
    const auto decoded = url_decode(target, plus_is_space);
    require(decoded.size() <= target.size());
    bool escapes = plus_is_space && target.find('+') != target.npos;
    for (std::size_t i = 0; i + 2 < target.size(); ++i)
        escapes = escapes || (target[i] == '%' && std::isxdigit(static_cast<unsigned char>(target[i + 1])) &&
                              std::isxdigit(static_cast<unsigned char>(target[i + 2])));
    require(escapes || decoded == target);
    const auto json = json_string(decoded);
    require(json.size() >= 2 && json.front() == '"' && json.back() == '"');
    for (unsigned char c : json) require(c >= 0x20);
    if (const auto value = query_param(target, "data")) require(value->size() <= target.size());
    // What the server refuses as not UTF-8 is exactly what UTF-8 rules out.
    require(valid_utf8(target) == utf8_by_reencoding(target));
    const auto token = bearer_token(target);
    require(token.size() < target.size() || token.empty());
    require(secret_matches(target, target));

    // An id list is all valid or refused with a reason.
    const auto list = parse_id_list(target);
    require(list.problem.empty() != list.ids.empty());
    // Any origin is allowed by "*"; a named one by itself only; no Origin is no browser.
    const std::vector<std::string> any{"*"}, named{std::string(target)};
    require(cors_allow_origin(any, target) == "*" && origin_may_push(any, target));
    require(target.empty() || cors_allow_origin(named, target) == target);
    const auto other = std::string(target) + "x";
    if (target != "*") require(cors_allow_origin(named, other).empty() && !origin_may_push(named, other));
    // The subprotocol is offered only if the header holds its exact token.
    if (offers_subprotocol(target, v1::subprotocol)) require(target.find(v1::subprotocol) != target.npos);
    // A command carried out has a valid key; a refused one says why.
    const auto command = v1::parse_command(target, data[0] & 2);
    if (command.kind == v1::command::invalid)
        require(!command.problem.empty());
    else
        require(command.key && valid_id(*command.key));
    // A position reads back as the text it prints; since is "last" or a position, nothing else.
    if (const auto p = wsbroadcast::position::parse(target)) require(wsbroadcast::position::parse(p->to_string()) == p);
    if (const auto since = v1::parse_since(target))
        require(target == "last" ? since->what() == wsbroadcast::since::kind::latest
                                 : since->what() == wsbroadcast::since::kind::after);
    // An upgrade is refused exactly when Beast's accept would refuse it, with Beast's status.
    const auto third = target.size() / 3;
    const auto key = target.substr(0, third), version = target.substr(third);
    const bool has_host = data[0] & 4, has_key = data[0] & 8, has_version = data[0] & 16;
    const auto upgrade = check_upgrade(has_host, has_key ? std::optional(key) : std::nullopt,
                                       has_version ? std::optional(version) : std::nullopt);
    const int beast = !has_host || !has_key || key.size() > 24 || !has_version ? 400 : version != "13" ? 426 : 0;
    require(upgrade.status == beast && (upgrade.status == 0) == upgrade.reason.empty());
    check_redis_url(target);
    check_redis_url("redis://" + std::string(target));  // past the scheme, where the parsing is
    // A relay payload's keys and data lie inside it; one made from them reads back the same.
    if (const auto push = parse_relay_payload(target)) {
        require(push->data.size() < target.size());
        if (push->id) {
            const std::vector<std::string> keys(push->keys.begin(), push->keys.end());
            const auto remade = multi_key_payload(*push->id, keys, push->data);  // what `again` points into
            const auto again = parse_relay_payload(remade);
            require(again && again->id == push->id && again->keys == push->keys && again->data == push->data);
        }
    }
    return 0;
}
