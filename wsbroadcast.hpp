// wsbroadcast.hpp - WebSocket fan-out for C++20 and Asio, in one header.
//
// A ConnectionManager keeps WebSocket connections subscribed to keys (an invoice id, a wallet, a
// room) and delivers a message to every connection subscribed to a key, to several keys, or to
// all of them, without ever waiting on a peer. It is the "connection manager" pattern of the
// LNbits docs, done properly: a message is stored once and shared by all its recipients, each
// connection has its own bounded, ordered outbox and its own writer, and a slow or failing peer
// costs only itself.
//
// THE MODEL
//
//   - A connection is subscribed to a set of keys, possibly empty, given when it connects and
//     changed at any time through its connection_handle (subscribe, unsubscribe, keys), up to
//     options::max_keys_per_connection.
//   - send(key, m) reaches every connection subscribed to `key`; send(keys, m) reaches each
//     connection subscribed to any of `keys` exactly once; broadcast(m) reaches every connection
//     once. However many recipients, `m` is one allocation.
//   - A connection that asked for envelopes (connection_options::envelopes) gets, instead of `m`,
//     options::envelope.wrap(key, m), built once per message and key; a multi-key send wraps it
//     with the first of its keys that the connection is subscribed to.
//   - With history on (options::history), each key is a stream: every message sent to it gets a
//     position (an epoch and an offset), the last ones are kept within bounds, and a connection
//     that subscribes with since::after(p) gets every message after p first, in order, or is told
//     it cannot be (recovery). Positions and fan-out are one critical section, so every
//     connection sees a key's messages in offset order.
//
// QUICK START (with Boost.Beast; any type that models wsbroadcast::message_socket works)
//
//   #include "wsbroadcast.hpp"
//   namespace websocket = boost::beast::websocket;
//   // batching_stream: every message queued for a client leaves in one system call. (A plain
//   // websocket::stream<tcp_stream> works too, one write per message.)
//   using socket_type = websocket::stream<wsbroadcast::batching_stream<boost::asio::ip::tcp::socket>>;
//   wsbroadcast::ConnectionManager<socket_type> manager;   // keys are std::string
//
//   // in your HTTP session, once you have read an upgrade request for /ws/{id}:
//   net::awaitable<void> subscribe(socket_type ws, http::request<http::string_body> req,
//                                  std::string id) {
//       // registers, answers the upgrade, reads until the peer leaves, unregisters
//       co_await manager.accept_and_serve(std::move(ws), std::move(req), std::move(id));
//   }
//
//   // anywhere, from any thread:
//   manager.send("invoice-42", R"({"paid": true})");
//
// COMPILE-TIME OPTIONS (define before including)
//
//   WSBROADCAST_STANDALONE_ASIO            use standalone Asio (<asio.hpp>) instead of Boost.Asio.
//                                          Standalone Asio 1.22 on clang also needs
//                                          -DASIO_HAS_CO_AWAIT=1 -DASIO_HAS_STD_COROUTINE=1.
//   WSBROADCAST_DEFAULT_MAX_QUEUED_BYTES    default outbox limit per connection in bytes (1 MiB).
//   WSBROADCAST_DEFAULT_MAX_QUEUED_MESSAGES default outbox limit per connection in messages (1024).
//   WSBROADCAST_DEFAULT_MAX_MESSAGE_BYTES   default limit on a message read from a client (1 MiB).
//
// NOTES: the threading contract
//
//   - Every member of ConnectionManager, connection_handle and subscription may be called from any
//     thread and any coroutine, concurrently, except where its comment says otherwise. None blocks
//     on I/O or awaits a peer: it takes a short lock, pushes a shared pointer into each
//     recipient's outbox and wakes its writer. On a thread of the sockets' io_context a send
//     starts the first writes itself (non-blocking, up to 16 connections), once it holds no lock;
//     to a key with many connections (and no history positioned here) it writes to the first one
//     before it fills the other outboxes.
//   - Every operation on a socket (reads, writes, closes) runs on the socket's executor. Give each
//     socket a strand (Beast: make_strand(ioc)) when the io_context runs on more than one thread.
//   - Order: if one send happens before another (the same thread made both, or the two threads
//     synchronised in between), every connection that both reach gets the first one first. Two
//     sends that overlap in time, from two threads, may reach two connections that both reach in
//     different orders; with history on, sends to one key are serialised, so every connection
//     sees that key's messages in offset order. A subscribe or unsubscribe is atomic with respect
//     to sends: each send sees a connection's keys entirely before or entirely after the change,
//     and a resumed subscription gets its replay before any message sent after it.
//   - The hooks in options (admit, envelope, relay, on_error) are called by the manager; they must
//     not block. envelope and relay->interest run under the manager's registry lock: they must not
//     call back into the manager.
//   - The manager must outlive every connection it manages: declare it before the io_context, so
//     the io_context (and the operations it owns) are destroyed first.
//
// LICENCE: MIT (see LICENSE).

#ifndef WSBROADCAST_HPP
#define WSBROADCAST_HPP

#define WSBROADCAST_VERSION_MAJOR 0
#define WSBROADCAST_VERSION_MINOR 1
#define WSBROADCAST_VERSION_PATCH 0

// ==== CONFIGURATION ==========================================================================

#if defined(WSBROADCAST_STANDALONE_ASIO) && defined(WSBROADCAST_BOOST_ASIO)
#error "wsbroadcast: define WSBROADCAST_STANDALONE_ASIO or WSBROADCAST_BOOST_ASIO, not both."
#endif

#ifndef WSBROADCAST_DEFAULT_MAX_QUEUED_BYTES
#define WSBROADCAST_DEFAULT_MAX_QUEUED_BYTES (1024u * 1024u)
#endif

#ifndef WSBROADCAST_DEFAULT_MAX_QUEUED_MESSAGES
#define WSBROADCAST_DEFAULT_MAX_QUEUED_MESSAGES 1024u
#endif

#ifndef WSBROADCAST_DEFAULT_MAX_MESSAGE_BYTES
#define WSBROADCAST_DEFAULT_MAX_MESSAGE_BYTES (1024u * 1024u)
#endif

// ==== NETWORK SHIM ===========================================================================
// Boost.Asio by default, standalone Asio on request. The aliases live inside our namespace only,
// and each flavour gets its own inline namespace so a program linking both cannot mix them up.

// clang-format off
#if defined(WSBROADCAST_STANDALONE_ASIO)
#include <asio.hpp>
#if !defined(ASIO_HAS_CO_AWAIT)
#error "wsbroadcast: standalone Asio did not enable C++20 coroutines. Compile with -std=c++20; \
with Asio 1.22 on clang also add -DASIO_HAS_CO_AWAIT=1 -DASIO_HAS_STD_COROUTINE=1."
#endif
#define WSBROADCAST_ABI_NAMESPACE standalone_asio
#else
#include <boost/asio.hpp>
#if __has_include(<boost/beast/core/role.hpp>)
#include <boost/beast/core/role.hpp>  // an enum, for batching_stream's teardown; not the rest of Beast
#endif
#if !defined(BOOST_ASIO_HAS_CO_AWAIT)
#error "wsbroadcast: Boost.Asio did not enable C++20 coroutines. Compile with -std=c++20 \
(Boost 1.81 or later; with clang also try -DBOOST_ASIO_HAS_CO_AWAIT=1 -DBOOST_ASIO_HAS_STD_COROUTINE=1)."
#endif
#define WSBROADCAST_ABI_NAMESPACE boost_asio
#endif
// clang-format on

#include <algorithm>
#include <array>
#include <atomic>
#include <charconv>
#include <chrono>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <iostream>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <ranges>
#include <shared_mutex>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace wsbroadcast {
inline namespace WSBROADCAST_ABI_NAMESPACE {

#if defined(WSBROADCAST_STANDALONE_ASIO)
namespace net = ::asio;
using error_code = std::error_code;
#else
namespace net = ::boost::asio;
using error_code = ::boost::system::error_code;
#endif

// ==== ERRORS =================================================================================

/// Why a connection was refused. serve() and accept_and_serve() complete with these; the client
/// gets the close code named here, with the message as the reason.
enum class error {
    shutting_down = 1,     ///< close 1001: shutdown() has begun
    connection_limit,      ///< close 1013: options::max_connections reached
    key_connection_limit,  ///< close 1013: options::max_connections_per_key reached
    not_admitted,          ///< close 1008: options::admit said no
    relay_unavailable,     ///< publish(): the relay cannot take messages now (its broker is away)
    key_limit,             ///< close 1008: options::max_keys_per_connection reached
    not_registered,        ///< the connection has left the manager
};

namespace detail {
#if defined(WSBROADCAST_STANDALONE_ASIO)
using error_category_base = std::error_category;
#else
using error_category_base = ::boost::system::error_category;
#endif

class error_category_impl final : public error_category_base {
public:
    const char* name() const noexcept override { return "wsbroadcast"; }
    std::string message(int value) const override {
        switch (static_cast<error>(value)) {
        case error::shutting_down: return "the server is shutting down";
        case error::connection_limit: return "too many connections";
        case error::key_connection_limit: return "too many connections for this key";
        case error::not_admitted: return "not admitted";
        case error::relay_unavailable: return "the message broker is unavailable";
        case error::key_limit: return "too many keys for this connection";
        case error::not_registered: return "the connection is no longer registered";
        }
        return "unknown wsbroadcast error";
    }
};
}  // namespace detail

inline const detail::error_category_base& category() noexcept {
    static const detail::error_category_impl instance;
    return instance;
}

inline error_code make_error_code(error e) noexcept { return {static_cast<int>(e), category()}; }

/// The close code a refusal is sent with.
inline std::uint16_t close_code_for(error e) noexcept {
    switch (e) {
    case error::shutting_down: return 1001;  // going away
    case error::connection_limit:
    case error::key_connection_limit:
    case error::relay_unavailable: return 1013;  // try again later
    case error::not_admitted:
    case error::key_limit: return 1008;  // policy violation
    case error::not_registered: break;
    }
    return 1011;
}

}  // namespace WSBROADCAST_ABI_NAMESPACE
}  // namespace wsbroadcast

#if defined(WSBROADCAST_STANDALONE_ASIO)
template <>
struct std::is_error_code_enum<wsbroadcast::WSBROADCAST_ABI_NAMESPACE::error> : std::true_type {};
#else
template <>
struct boost::system::is_error_code_enum<wsbroadcast::WSBROADCAST_ABI_NAMESPACE::error> : std::true_type {};
#endif

namespace wsbroadcast {
inline namespace WSBROADCAST_ABI_NAMESPACE {

// ==== CONCEPTS ===============================================================================
// Small named pieces, so a compiler error names the expression a type is missing.

/// Something that owns asynchronous work and says on which executor it runs.
template <class T>
concept has_executor = requires(T& t) {
    typename T::executor_type;
    { t.get_executor() } -> std::convertible_to<typename T::executor_type>;
};

/// Writes one whole message per call (Beast's websocket::stream::async_write is the model).
template <class T>
concept writes_messages =
    requires(T& t, net::const_buffer buffer) { t.async_write(buffer, [](const error_code&, std::size_t) {}); };

namespace detail {
/// What serve() reads a client's messages into.
using read_buffer = net::dynamic_string_buffer<char, std::char_traits<char>, std::allocator<char>>;
}  // namespace detail

/// Reads one whole message per call into a dynamic buffer.
template <class T>
concept reads_messages =
    requires(T& t, detail::read_buffer& buffer) { t.async_read(buffer, [](const error_code&, std::size_t) {}); };

/// What ConnectionManager needs of a socket: an executor and a message write.
template <class T>
concept message_socket = std::move_constructible<T> && has_executor<T> && writes_messages<T>;

/// What ConnectionManager::serve() needs on top: a message read.
template <class T>
concept readable_message_socket = message_socket<T> && reads_messages<T>;

/// Completes a server handshake from an upgrade request it was given (Beast's
/// websocket::stream::async_accept(request, token) is the model).
template <class T, class Request>
concept accepts_upgrade = requires(T& t, const Request& request) { t.async_accept(request, [](const error_code&) {}); };

/// A key type and the hash and equality that index it.
template <class Key, class Hash, class KeyEqual>
concept hashable_key = std::copy_constructible<Key> && requires(const Key& k, const Hash& h, const KeyEqual& eq) {
    { h(k) } -> std::convertible_to<std::size_t>;
    { eq(k, k) } -> std::convertible_to<bool>;
};

/// The default hash: std::hash, made transparent for std::string so that lookups by
/// std::string_view or a string literal do not build a std::string.
template <class Key>
struct default_hash : std::hash<Key> {};

template <>
struct default_hash<std::string> {
    using is_transparent = void;
    std::size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
};

// ==== MESSAGES, OPTIONS, RESULTS =============================================================

/// An immutable message, allocated once and shared by every outbox it is queued in. The
/// allocation also holds the message's WebSocket frame header, built once: a server's frames are
/// not masked, so every recipient is sent the same bytes (see batching_stream).
class message {
public:
    message() = default;

    static message text(std::string_view payload) { return message(payload, false); }
    static message binary(std::string_view payload) { return message(payload, true); }

    std::string_view data() const noexcept { return {bytes_ ? bytes_.get() + max_header : nullptr, size_}; }
    std::size_t size() const noexcept { return size_; }
    bool is_binary() const noexcept { return binary_; }
    bool empty() const noexcept { return size_ == 0; }

    /// The whole frame, header and payload, as a server sends it (RFC 6455 section 5.2).
    net::const_buffer frame() const noexcept {
        if (!bytes_) return net::buffer(empty_text_frame, sizeof empty_text_frame);
        return net::buffer(bytes_.get() + max_header - header_size_, header_size_ + size_);
    }

private:
    static constexpr std::size_t max_header = 10;  // FIN/opcode, length 127, 64-bit length
    static constexpr unsigned char empty_text_frame[2] = {0x81, 0x00};

    message(std::string_view payload, bool binary)
        // One allocation holds the control block, the frame header and the bytes.
        : bytes_(std::make_shared_for_overwrite<char[]>(max_header + payload.size())),
          size_(payload.size()),
          binary_(binary) {
        if (!payload.empty()) std::memcpy(bytes_.get() + max_header, payload.data(), payload.size());
        // The header is written right before the payload, so frame() is one contiguous buffer.
        unsigned char header[max_header];
        header[0] = static_cast<unsigned char>(0x80 | (binary ? 0x2 : 0x1));  // FIN, text or binary
        std::size_t n = 2;
        const auto length = static_cast<std::uint64_t>(payload.size());
        if (length < 126) {
            header[1] = static_cast<unsigned char>(length);
        } else if (length <= 0xFFFF) {
            header[1] = 126;
            n = 4;
        } else {
            header[1] = 127;
            n = 10;
        }
        for (std::size_t i = 2; i < n; ++i)  // the extended length, big-endian
            header[i] = static_cast<unsigned char>(length >> (8 * (n - 1 - i)));
        header_size_ = static_cast<std::uint8_t>(n);
        std::memcpy(bytes_.get() + max_header - n, header, n);
    }

    std::shared_ptr<char[]> bytes_;
    std::size_t size_ = 0;
    bool binary_ = false;
    std::uint8_t header_size_ = 0;
};

/// What a send does when a recipient's outbox is full.
enum class overflow_policy {
    close,        ///< close the connection with outbox_options::close_code (1008): the default
    drop_newest,  ///< keep the queue, drop the new message for this recipient
    drop_oldest,  ///< drop the oldest queued messages that are not being written until the new one fits
};

/// An unexpected failure: a write or read error other than a normal close, or an exception.
struct error_event {
    std::string_view operation;    ///< "write", "read", "close", "writer", "relay"
    error_code code;               ///< set for I/O errors
    std::exception_ptr exception;  ///< set when a coroutine threw

    std::string message() const {
        if (exception) {
            try {
                std::rethrow_exception(exception);
            } catch (const std::exception& e) {
                return e.what();
            } catch (...) {
                return "unknown exception";
            }
        }
        return code.message();
    }
};

/// Where a message stands in its key's stream (options::history): the epoch names one
/// incarnation of the key's history (a restart or an eviction starts another), the offset counts
/// the messages sent to the key in that epoch, from 1. {epoch, 0} is the position before any.
struct position {
    std::uint64_t epoch = 0;
    std::uint64_t offset = 0;

    friend bool operator==(const position&, const position&) = default;

    /// "<epoch in hex>.<offset>": what a client is given and hands back, opaque to it.
    std::string to_string() const {
        char text[40];
        auto end = std::to_chars(text, text + 16, epoch, 16).ptr;
        *end++ = '.';
        end = std::to_chars(end, text + sizeof text, offset).ptr;
        return std::string(text, end);
    }

    /// The position to_string() printed, or nothing for any other text.
    static std::optional<position> parse(std::string_view text) noexcept {
        const auto dot = text.find('.');
        if (dot == 0 || dot == std::string_view::npos || dot > 16 || dot + 1 == text.size()) return std::nullopt;
        position p;
        const auto* end = text.data() + text.size();
        auto e = std::from_chars(text.data(), text.data() + dot, p.epoch, 16);
        auto o = std::from_chars(text.data() + dot + 1, end, p.offset);
        if (e.ec != std::errc() || e.ptr != text.data() + dot || o.ec != std::errc() || o.ptr != end)
            return std::nullopt;
        return p;
    }
};

/// Where a subscription to a key starts: with the live messages only (now, the default), with
/// every message after a position the client was given (after), or with the key's latest message
/// (latest: the retained value, for a client that has no position yet).
class since {
public:
    enum class kind { now, after, latest };

    since() = default;
    static since now() noexcept { return {}; }
    static since after(position p) noexcept { return since(kind::after, p); }
    static since latest() noexcept { return since(kind::latest, {}); }

    kind what() const noexcept { return kind_; }
    const position& from() const noexcept { return from_; }  ///< for after()
    bool asks_history() const noexcept { return kind_ != kind::now; }

private:
    since(kind k, position p) : kind_(k), from_(p) {}
    kind kind_ = kind::now;
    position from_{};
};

/// How a subscription that asked for history (since::after or since::latest) started.
enum class recovery {
    live,              ///< it asked for none: live messages only
    recovered,         ///< every message after its position follows (since::latest: the latest one)
    no_history,        ///< history is off (options::history.max_messages is 0)
    epoch_changed,     ///< the position is of another epoch: the history restarted or was evicted
    trimmed,           ///< some of the messages after the position are no longer kept (count, bytes, age)
    unknown_position,  ///< the position is ahead of the key's stream: it was not given by this history
    too_many,          ///< what it missed does not fit its outbox
    nothing_kept,      ///< since::latest, and the key keeps no message
};

/// Why a subscription was not recovered, in words a client can be shown.
constexpr std::string_view describe(recovery r) noexcept {
    switch (r) {
    case recovery::live: return "live";
    case recovery::recovered: return "recovered";
    case recovery::no_history: return "history is off";
    case recovery::epoch_changed: return "the history of this key restarted";
    case recovery::trimmed: return "messages after this position are no longer kept";
    case recovery::unknown_position: return "unknown position";
    case recovery::too_many: return "too many messages missed to replay";
    case recovery::nothing_kept: return "no message kept";
    }
    return "unknown";
}

/// How a connection's subscription to a key started: what options::envelope.subscribed is told.
struct subscribed_info {
    std::optional<wsbroadcast::position> position;  ///< with history: the key's position before what follows
    recovery outcome = recovery::live;
    std::size_t replayed = 0;  ///< messages kept in history that follow, before the live ones
};

/// Bounds of the per-key history (0: no bound, except max_messages). With history on, every
/// message sent to a key is kept, whether anyone listens or not, until one of the bounds drops
/// it; a key's position (epoch and offset) is kept longer, so a client that missed nothing can be
/// told so. A key always keeps its newest message, within max_total_bytes.
struct history_options {
    std::size_t max_messages = 0;        ///< per key; 0: history off (no positions, no resume, no cost)
    std::size_t max_bytes = 256 * 1024;  ///< per key
    std::chrono::steady_clock::duration ttl = std::chrono::minutes(2);  ///< a message's age
    std::size_t max_total_bytes = 64 * 1024 * 1024;                     ///< all keys together
    std::size_t max_keys = 100'000;  ///< keys with a position, least recently used dropped
    std::chrono::steady_clock::duration position_ttl = std::chrono::hours(1);  ///< a key unused this long is forgotten
};

/// A broker between server instances (Redis pub/sub, NATS, ...), for running several instances
/// over one keyspace. The manager tells it which keys this instance needs; publish() hands it a
/// message for one or more keys; it brings back every message published on a needed key, by any
/// instance including this one, and delivers it here with ConnectionManager::send(keys, m), once
/// per instance: a connection subscribed to several of the keys gets it once. This header has no
/// broker in it: implementations live with the application (example/redis_relay.hpp).
template <class Key>
class relay {
public:
    virtual ~relay() = default;
    /// `key` got its first local subscriber (`needed`) or lost its last. Called in order, under
    /// the manager's registry lock, on whichever thread subscribed or unsubscribed: queue the work
    /// and return; never block, never call back into the manager.
    virtual void interest(const Key& key, bool needed) = 0;
    /// Takes `m` for every instance that needs any of `keys`, or fails at once
    /// (error::relay_unavailable) when the broker cannot take it now. Called from any thread.
    virtual error_code publish(std::span<const Key> keys, const message& m) = 0;

    // The rest is optional: a broker that keeps history and gets subscriptions confirmed.

    /// Called before a connection is registered with `keys` (serve(), accept_and_serve(),
    /// connection_handle::async_subscribe()): done({}) once this instance gets every message
    /// published on them from then on and, with positions(), once the manager's history of each
    /// is the broker's (ConnectionManager::adopt_position() and deliver()); done(error) when it
    /// cannot (error::relay_unavailable: the connection is refused with close 1013). The keys stay
    /// needed until release(keys), which the manager calls once it has registered the connection
    /// (its own interest() calls are made by then) or refused it. done may run on any thread, once.
    virtual void prepare(std::span<const Key> keys, std::function<void(error_code)> done) {
        (void)keys;
        done({});
    }
    virtual void release(std::span<const Key> keys) { (void)keys; }

    /// True when the broker gives messages their positions and keeps each key's history
    /// (options::history then mirrors it: the manager assigns no position of its own).
    virtual bool positions() const { return false; }

    /// publish() that says where `m` landed: done(error, its position in each of `keys`, in
    /// order) once the broker has it, on any thread. Without positions(): done(publish(), {}).
    virtual void publish_positioned(std::span<const Key> keys, const message& m,
                                    std::function<void(error_code, std::vector<position>)> done) {
        done(publish(keys, m), {});
    }
};

/// Limits of one connection's outbox and what happens when a send finds it full. The limits bound
/// the messages waiting to be written; the batch being written was taken from within them, so a
/// connection holds at most twice the limits. A message counts its full size in every outbox that
/// holds it, because each outbox keeps it alive. One message larger than max_bytes is taken by an
/// empty outbox (the limit then bounds what queues behind it): a large message costs a healthy
/// connection nothing, and a connection that is not keeping up overflows as usual.
struct outbox_options {
    std::size_t max_bytes = WSBROADCAST_DEFAULT_MAX_QUEUED_BYTES;
    std::size_t max_messages = WSBROADCAST_DEFAULT_MAX_QUEUED_MESSAGES;
    overflow_policy on_overflow = overflow_policy::close;
    /// 1008 (policy violation): the peer did not read fast enough. RFC 6455 section 7.4.1.
    std::uint16_t close_code = 1008;
};

/// How one connection is served: its outbox (the manager's options::outbox unless set), and
/// whether it gets envelopes (options::envelope) instead of bare messages. Where a
/// connection_options is taken, an outbox_options is too.
struct connection_options {
    std::optional<outbox_options> outbox{};  // an initializer, so {.envelopes = true} draws no warning
    bool envelopes = false;
};

/// What a connection that asked for envelopes gets instead of the bare message. The application
/// decides the format (the reference server's is JSON, docs/protocol.md).
template <class Key>
struct envelope_format {
    /// Wraps `m` for a connection subscribed to `key`; `at` is its position with history on.
    /// Called at most once per message and key, the first time an envelope connection of that
    /// key needs it (and once per replayed message), under the registry lock.
    std::function<message(const Key& key, const message& m, const std::optional<position>& at)> wrap;
    /// Optional: queued first whenever an envelope connection gets a key (its initial keys, and
    /// connection_handle::subscribe), in the same critical section as the subscription, so it
    /// comes before every message of that key, replayed or live.
    std::function<message(const Key& key, const subscribed_info& info)> subscribed;
};

/// The keys a connection starts with: one key (or anything a key is made from, like a string
/// literal), a range of keys, or none ({}); each starts now, unless add() or the two-argument
/// constructor says since when.
template <class Key>
class initial_keys {
public:
    initial_keys() = default;

    template <class K>
        requires std::constructible_from<Key, K&&>
    initial_keys(K&& key) {  // NOLINT: implicit on purpose
        keys_.emplace_back(std::forward<K>(key));
    }

    template <class K>
        requires std::constructible_from<Key, K&&>
    initial_keys(K&& key, since from) {
        add(std::forward<K>(key), from);
    }

    template <std::ranges::input_range Range>
        requires(!std::constructible_from<Key, const Range&>) &&
                std::constructible_from<Key, std::ranges::range_reference_t<const Range&>>
    initial_keys(const Range& keys) {  // NOLINT: implicit on purpose
        for (auto&& k : keys) keys_.emplace_back(k);
    }

    template <class K>
        requires std::constructible_from<Key, K&&>
    initial_keys& add(K&& key, since from = {}) {
        keys_.emplace_back(std::forward<K>(key));
        if (from.asks_history() || !since_.empty()) {
            since_.resize(keys_.size());
            since_.back() = from;
        }
        return *this;
    }

    std::span<const Key> keys() const noexcept { return keys_; }
    since since_of(std::size_t i) const noexcept { return i < since_.size() ? since_[i] : since(); }

private:
    std::vector<Key> keys_;
    std::vector<since> since_;  // empty while every key starts now
};

/// What an admission hook decides about a connection, before it is registered.
struct admission {
    bool admitted = true;
    std::string reason;  ///< sent in the close frame (1008) of a refusal; cut to 123 bytes, at a UTF-8 boundary

    static admission accept() { return {}; }
    static admission reject(std::string reason) { return {false, std::move(reason)}; }
};

/// What an admission hook sees of the HTTP upgrade request, when there is one (accept_and_serve
/// with a request that has target() and operator[](name), as Beast's http::request does). Valid
/// only during the hook's first step: copy what you need before your first co_await.
class upgrade_request {
public:
    upgrade_request() = default;

    template <class Request>
        requires requires(const Request& r, std::string_view name) {
            { r.target() } -> std::convertible_to<std::string_view>;
            { r[name] } -> std::convertible_to<std::string_view>;
        }
    explicit upgrade_request(const Request& r)
        : request_(&r), target_(r.target()), header_([](const void* p, std::string_view name) -> std::string_view {
              return (*static_cast<const Request*>(p))[name];
          }) {}

    bool present() const noexcept { return request_ != nullptr; }
    std::string_view target() const noexcept { return target_; }
    /// The value of header `name` (case-insensitive, as the request type defines), or empty.
    std::string_view header(std::string_view name) const {
        return request_ ? header_(request_, name) : std::string_view{};
    }

private:
    const void* request_ = nullptr;
    std::string_view target_;
    std::string_view (*header_)(const void*, std::string_view) = nullptr;
};

template <class Key = std::string>
struct options {
    /// The default for every connection; subscribe() and serve() can override it per connection.
    outbox_options outbox;
    /// Limits (0: no limit). A connection over max_connections is refused with close 1013 and
    /// error::connection_limit. max_connections_per_key counts a key's subscribers: over it a
    /// subscription is refused with error::key_connection_limit (at connect: close 1013).
    /// max_keys_per_connection bounds one connection's keys: error::key_limit (at connect: 1008).
    std::size_t max_connections = 0;
    std::size_t max_connections_per_key = 0;
    std::size_t max_keys_per_connection = 64;
    /// The largest message a client may send; a larger one closes the connection with 1009.
    std::size_t max_message_bytes = WSBROADCAST_DEFAULT_MAX_MESSAGE_BYTES;
    /// Liveness (0: off): a peer heard nothing from for this long is torn down and unregistered.
    /// Where the socket has async_ping (as Beast's does), a peer silent for half of it is pinged,
    /// and its pong counts as hearing from it (seen through the socket's control_callback).
    /// A peer that talks but does not read is no more alive: a write that makes no progress for
    /// this long (no byte taken, over a batching_stream; else not completed) tears it down too,
    /// whatever the overflow policy. Both are checked every half period (whole, without ping), so
    /// a dead peer goes after between one and one and a half periods.
    std::chrono::steady_clock::duration idle_timeout{};
    /// A connection closed by the overflow policy leaves the manager at once; its close handshake
    /// gets this long before its socket is torn down.
    std::chrono::steady_clock::duration close_timeout = std::chrono::seconds(5);
    /// Decides, before registration, whether a connection may join under each of its initial keys
    /// (called once per key, in order; a connection with no initial key is not asked); it also
    /// sees the upgrade request when accept_and_serve() has one. serve() and accept_and_serve()
    /// call it on the socket's executor; a rejection closes with 1008 and the admission's reason.
    std::function<net::awaitable<admission>(const Key&, const upgrade_request&)> admit;
    /// What connections that asked for envelopes get (connection_options::envelopes).
    envelope_format<Key> envelope;
    /// Per-key history, for positions and resumable subscriptions: off by default. With history
    /// on, an envelope connection whose outbox overflows is always closed (whatever its policy),
    /// so that it resumes from its last position instead of missing messages silently.
    history_options history;
    /// Set for scale-out: publish() goes through it and interest in keys is reported to it.
    /// Null (the default): publish() is send(), and the registry pays nothing.
    std::shared_ptr<wsbroadcast::relay<Key>> relay;
    /// Unexpected errors. Normal endings (peer closed, eof, cancelled) are never reported.
    /// The default writes one line to std::cerr. Called on the socket's executor.
    std::function<void(const error_event&)> on_error;
};

/// What one send() or broadcast() did, counted in connections (each connection once).
struct send_result {
    std::size_t queued = 0;   ///< the message is in this many outboxes
    std::size_t dropped = 0;  ///< outbox full: the new message (drop_newest) or older ones (drop_oldest) dropped
    std::size_t closed = 0;   ///< outbox full and policy close closed the connection
    /// With history on, the message's position in each key it was sent to, in the order of the
    /// keys (a key named twice has one position). Empty without history.
    std::vector<wsbroadcast::position> positions;
};

/// What one publish() did.
struct publish_result {
    error_code error;      ///< the relay refused the message: nothing was sent anywhere
    bool relayed = false;  ///< the relay took it; this instance delivers it when it comes back
    send_result local;     ///< with no relay: what send() did here, its positions moved to `positions`
    /// With history on: the message's position in each key, in order (given here, or by the broker
    /// of a relay that positions messages, for async_publish()).
    std::vector<wsbroadcast::position> positions;
};

/// Counters since the manager was made. Read with relaxed loads: each value is exact, the set is
/// not a single snapshot.
struct statistics {
    std::uint64_t connections = 0;      ///< connections ever registered
    std::uint64_t refused = 0;          ///< connections refused: limits, admission, shutdown
    std::uint64_t messages = 0;         ///< send() / broadcast() calls that reached at least one outbox
    std::uint64_t deliveries = 0;       ///< messages queued to outboxes
    std::uint64_t dropped = 0;          ///< messages dropped by drop_newest / drop_oldest, each counted once
    std::uint64_t overflow_closes = 0;  ///< connections closed by the close policy
    std::uint64_t errors = 0;           ///< unexpected errors reported to on_error
    std::uint64_t recovered = 0;        ///< subscriptions that asked for history and got all of it
    std::uint64_t not_recovered = 0;    ///< subscriptions that asked for history and were told they cannot
    std::uint64_t replayed = 0;         ///< messages queued from history
};

// ==== BATCHING STREAM ========================================================================

/// A stream layer for under a WebSocket stream (Beast: websocket::stream<batching_stream<tcp_stream>>)
/// that lets the manager write every message queued for a connection in one system call. Each
/// message's frame is built once (message::frame()), and the manager hands the layer a batch of
/// them at a time; the WebSocket stream's own writes (pongs, pings, the close frame) go through
/// the same layer. Writes are done whole and one at a time, in the order they were started, so
/// frames never interleave.
///
/// Only for a server's stream without permessage-deflate: the frames are written as they were
/// built, unmasked and uncompressed. Use it on one executor (a strand), like the stream above it.
template <class NextLayer>
class batching_stream {
public:
    using next_layer_type = NextLayer;
    using executor_type = typename NextLayer::executor_type;

    template <class... Args>
        requires std::constructible_from<NextLayer, Args...>
    explicit batching_stream(Args&&... args) : next_(std::forward<Args>(args)...) {}

    batching_stream(batching_stream&& other) noexcept
        : next_(std::move(other.next_)), writes_(std::move(other.writes_)) {
        if (writes_) writes_->owner = this;
    }
    batching_stream& operator=(batching_stream&& other) noexcept {
        if (this != &other) {
            orphan();
            next_ = std::move(other.next_);
            writes_ = std::move(other.writes_);
            if (writes_) writes_->owner = this;
        }
        return *this;
    }
    ~batching_stream() { orphan(); }

    NextLayer& next_layer() noexcept { return next_; }
    const NextLayer& next_layer() const noexcept { return next_; }
    executor_type get_executor() noexcept { return next_.get_executor(); }

    /// Changes whenever a write hands bytes to the next layer: how the manager tells a peer that
    /// reads slowly from one that does not read at all.
    std::uint64_t write_progress() const noexcept { return progress_; }

    template <class MutableBuffers, class Token>
    auto async_read_some(const MutableBuffers& buffers, Token&& token) {
        return next_.async_read_some(buffers, std::forward<Token>(token));
    }

    /// Writes all of `buffers` (not "some": a partial write would let another frame in between),
    /// after every write started before it.
    template <class ConstBuffers, class Token>
    auto async_write_some(const ConstBuffers& buffers, Token&& token) {
        return net::async_initiate<Token, void(error_code, std::size_t)>(
            [this](auto handler, const ConstBuffers& b) {
                using handler_type = decltype(handler);
                if (!writes_) {
                    writes_ = std::make_shared<write_queue>();
                    writes_->owner = this;
                }
                if (!writes_->busy) {
                    writes_->busy = true;
                    write(b, std::move(handler));
                    return;
                }
                // Rare: the WebSocket stream writes a control frame while a batch is on its way.
                auto w = std::make_unique<queued<handler_type>>(std::move(handler));
                for (auto it = net::buffer_sequence_begin(b); it != net::buffer_sequence_end(b); ++it)
                    w->buffers.emplace_back(*it);
                writes_->waiting.push_back(std::move(w));
            },
            token, buffers);
    }

private:
    struct queued_write {
        virtual ~queued_write() = default;
        virtual void start(batching_stream& s) = 0;
        std::vector<net::const_buffer> buffers;
    };

    template <class Handler>
    struct queued final : queued_write {
        explicit queued(Handler&& h) : handler(std::move(h)) {}
        // async_write copies the buffer sequence: the vector may go once it has started.
        void start(batching_stream& s) override { s.write(this->buffers, std::move(handler)); }
        Handler handler;
    };

    // The writes in flight and waiting. Shared with the pending write's handler, because the
    // stream may be destroyed before that write completes: Beast's own operations (a keep-alive
    // ping, a pong) hold only a weak reference to the stream, so the last owner can let go while
    // one of them is being written. The handler then finds `owner` null and starts nothing.
    // Allocated by the first write after an idle spell, released when idle again: an idle
    // connection keeps none.
    struct write_queue {
        batching_stream* owner = nullptr;
        bool busy = false;
        std::vector<std::unique_ptr<queued_write>> waiting;  // a vector: empty, it allocates nothing
    };

    template <class ConstBuffers, class Handler>
    void write(const ConstBuffers& buffers, Handler&& handler) {
        // The completion condition runs after each partial write: it notes the progress (through
        // the shared queue, as the stream may be gone) and asks for the rest.
        auto note_progress = [writes = writes_](const error_code& ec, std::size_t) -> std::size_t {
            if (writes->owner) ++writes->owner->progress_;
            return ec ? 0 : std::size_t{65536};
        };
        net::async_write(next_, buffers, std::move(note_progress),
                         [writes = writes_, fallback = next_.get_executor(), handler = std::move(handler)](
                             const error_code& ec, std::size_t n) mutable {
                             if (writes->owner) writes->owner->start_next();
                             // On the handler's own executor (normally this strand: then at once).
                             auto ex = net::get_associated_executor(handler, fallback);
                             net::dispatch(
                                 ex, [handler = std::move(handler), ec, n]() mutable { std::move(handler)(ec, n); });
                         });
    }

    void start_next() {
        if (writes_->waiting.empty()) {
            writes_.reset();  // idle: the pending handler's copy is the last
            return;
        }
        auto next = std::move(writes_->waiting.front());
        writes_->waiting.erase(writes_->waiting.begin());
        next->start(*this);
    }

    // Stops a pending write's handler from reaching this stream once it is gone. Writes still
    // waiting are dropped with it: their stream no longer exists.
    void orphan() noexcept {
        if (!writes_) return;
        writes_->owner = nullptr;
        writes_->waiting.clear();
        writes_.reset();
    }

    NextLayer next_;
    std::shared_ptr<write_queue> writes_;
    std::uint64_t progress_ = 0;
};

#if !defined(WSBROADCAST_STANDALONE_ASIO) && __has_include(<boost/beast/core/role.hpp>)
/// Beast's WebSocket close ends with a teardown of the layer below it, found by ADL: ours is the
/// next layer's. Only Beast's role_type enum is included for it, not Beast.
template <class NextLayer>
void teardown(::boost::beast::role_type role, batching_stream<NextLayer>& s, error_code& ec) {
    teardown(role, s.next_layer(), ec);
}

template <class NextLayer, class Handler>
void async_teardown(::boost::beast::role_type role, batching_stream<NextLayer>& s, Handler&& handler) {
    async_teardown(role, s.next_layer(), std::forward<Handler>(handler));
}
#endif

// ==== DETAIL: HELPERS ========================================================================

namespace detail {

/// Normal ways for a connection to end, which are not worth a log line.
inline bool is_expected_ending(const error_code& ec) {
    if (!ec) return true;
    if (ec == net::error::eof || ec == net::error::operation_aborted || ec == net::error::connection_reset ||
        ec == net::error::connection_aborted || ec == net::error::broken_pipe || ec == net::error::not_connected ||
        ec == net::error::bad_descriptor)
        return true;
    // Beast's websocket::error::closed (a clean close handshake). Matched by category name because
    // the header never includes Beast.
    return ec.value() == 1 && std::string_view(ec.category().name()) == "boost.beast.websocket";
}

inline void log_to_stderr(const error_event& e) {
    std::cerr << "wsbroadcast: " << e.operation << ": " << e.message() << '\n';
}

/// At most `limit` bytes of `text`, never ending inside a UTF-8 sequence: a close reason must be
/// valid UTF-8 (RFC 6455 section 5.5.1), or the peer fails the connection instead of reading it.
inline std::string_view truncate_utf8(std::string_view text, std::size_t limit) noexcept {
    if (text.size() <= limit) return text;
    std::size_t end = limit;
    while (end > 0 && (static_cast<unsigned char>(text[end]) & 0xC0) == 0x80) --end;  // a continuation byte
    return text.substr(0, end);
}

/// The most reason text a close frame carries (RFC 6455 section 5.5: 125 bytes less the code).
inline constexpr std::size_t max_close_reason = 123;

/// Fills a close frame: with a reason text where the socket's close type has one (Beast's
/// close_reason), else the bare code.
template <class Socket>
auto make_close_reason(std::uint16_t code, std::string_view text) {
    if constexpr (requires(Socket& s) { s.reason(); }) {
        std::remove_cvref_t<decltype(std::declval<Socket&>().reason())> reason{code};
        if constexpr (requires { reason.reason = text; }) reason.reason = truncate_utf8(text, max_close_reason);
        return reason;
    } else {
        return code;
    }
}

template <class Socket>
concept closes_with_reason =
    requires(Socket& s) { s.async_close(make_close_reason<Socket>(0, {}), [](const error_code&) {}); };

/// Tears a socket down without a close handshake: for a peer that stopped reading, whose pending
/// write would otherwise never complete. Closes the lowest layer, found as Beast's get_lowest_layer
/// finds it (next_layer() down to a layer without one), but without relying on ADL to find Beast.
template <class Layer>
void abort_socket(Layer& s) {
    if constexpr (requires { s.next_layer(); }) {
        abort_socket(s.next_layer());
    } else if constexpr (requires { s.close(); }) {
        try {
            s.close();
        } catch (...) {  // closing a socket that is already gone is not an error worth raising
        }
    }
}

/// A function object for net::post that runs `run` once, or `dropped` if it is destroyed without
/// having run (its io_context went away first): whatever waited for it must not wait forever.
template <class Run, class Dropped>
class run_or_drop {
public:
    run_or_drop(Run r, Dropped d) : run_(std::move(r)), dropped_(std::move(d)) {}
    run_or_drop(run_or_drop&& other) noexcept
        : run_(std::move(other.run_)), dropped_(std::move(other.dropped_)), done_(std::exchange(other.done_, true)) {}
    run_or_drop& operator=(run_or_drop&&) = delete;
    ~run_or_drop() {
        if (!done_) dropped_();
    }
    void operator()() {
        done_ = true;
        run_();
    }

private:
    Run run_;
    Dropped dropped_;
    bool done_ = false;
};

/// serve() has no upgrade request to answer.
struct no_request {};

/// A completion handler kept for a callback that a relay runs later, on any thread: copyable (a
/// relay's callback is a std::function), it invokes the handler once, posted to the handler's
/// own executor, whose work it keeps counted meanwhile. A handler with no executor of its own
/// (a plain callback) runs where the relay completes.
template <class Handler, class... Args>
class completion {
public:
    explicit completion(Handler h) : state_(std::make_shared<state>(std::move(h))) {}

    void operator()(Args... args) {
        auto s = std::move(state_);
        if (!s) return;  // once
        if constexpr (std::is_same_v<net::associated_executor_t<Handler>, net::system_executor>) {
            std::move(s->handler)(std::move(args)...);
        } else {
            auto executor = s->work.get_executor();
            net::post(executor,
                      [s, ... args = std::move(args)]() mutable { std::move(s->handler)(std::move(args)...); });
        }
    }

private:
    struct state {
        explicit state(Handler h) : handler(std::move(h)), work(net::get_associated_executor(handler)) {}
        Handler handler;
        net::executor_work_guard<net::associated_executor_t<Handler>> work;
    };
    std::shared_ptr<state> state_;
};

/// Completes `handler` with `args`: posted to its executor, never inside the initiating function,
/// when it has one.
template <class Handler, class... Args>
void complete_later(Handler handler, Args... args) {
    completion<Handler, Args...>(std::move(handler))(std::move(args)...);
}

// ==== DETAIL: THE OUTBOX =====================================================================

/// A ring of messages (or of history entries). It allocates nothing until the first one and gives
/// its storage back once drained (std::deque allocates 576 bytes up front, and an idle connection
/// has nothing queued most of its life).
template <class T>
class ring {
public:
    bool empty() const noexcept { return count_ == 0; }
    std::size_t size() const noexcept { return count_; }
    T& operator[](std::size_t i) noexcept { return slots_[(head_ + i) & (capacity_ - 1)]; }
    const T& operator[](std::size_t i) const noexcept { return slots_[(head_ + i) & (capacity_ - 1)]; }
    T& back() noexcept { return (*this)[count_ - 1]; }

    void push_back(T t) {
        if (count_ == capacity_) grow();
        ++count_;
        back() = std::move(t);
    }
    void pop_front() noexcept {
        (*this)[0] = T();
        head_ = (head_ + 1) & (capacity_ - 1);
        if (--count_ == 0) release();
    }
    void pop_back() noexcept {
        back() = T();
        if (--count_ == 0) release();
    }
    /// Removes the i-th message, keeping the order of the others.
    void erase(std::size_t i) noexcept {
        for (; i + 1 < count_; ++i) (*this)[i] = std::move((*this)[i + 1]);
        pop_back();
    }

private:
    void grow() {
        const std::size_t capacity = capacity_ ? 2 * capacity_ : 4;  // a power of two, for the mask
        auto slots = std::make_unique<T[]>(capacity);
        for (std::size_t i = 0; i < count_; ++i) slots[i] = std::move((*this)[i]);
        slots_ = std::move(slots);
        capacity_ = capacity;
        head_ = 0;
    }
    void release() noexcept {
        slots_.reset();
        capacity_ = head_ = 0;
    }

    std::unique_ptr<T[]> slots_;
    std::size_t capacity_ = 0, head_ = 0, count_ = 0;
};

/// What all of a manager's outboxes hold, in bytes (a metrics scrape reads it in O(1)), and the
/// publishers waiting for it to fall (ConnectionManager::async_wait_for_room). Writers take bytes
/// on any thread; while nobody waits, a take costs one more atomic load.
class queued_total : public std::enable_shared_from_this<queued_total> {
public:
    std::size_t bytes() const noexcept { return bytes_.load(std::memory_order_relaxed); }
    void add(std::size_t n) noexcept { bytes_.fetch_add(n, std::memory_order_relaxed); }
    void take(std::size_t n) noexcept {
        // Sequentially consistent, as wait()'s store of wake_below_ and its second look at bytes_
        // are: either this take sees the new waiter, or the waiter sees what this took.
        const auto now = bytes_.fetch_sub(n) - n;
        if (now < wake_below_.load()) wake();
    }

    /// Calls handler(error_code) once bytes() <= `most`: no error, posted at once if it is so
    /// now or as soon as writers have taken enough; net::error::timed_out after `timeout`. The
    /// timer runs on a strand of the handler's executor.
    template <class Handler>
    void wait(std::size_t most, std::chrono::steady_clock::duration timeout, Handler handler) {
        if (bytes() <= most) return complete_later(std::move(handler), error_code{});
        auto strand = net::make_strand(net::get_associated_executor(handler));
        auto w = std::make_shared<waiter>(most, completion<Handler, error_code>(std::move(handler)), strand);
        // On the timer's strand, where a wake() on another thread cancels it too.
        net::dispatch(strand, [self = shared_from_this(), w, timeout] {
            {
                std::lock_guard lock(self->mutex_);
                self->waiters_.push_back(w);
                self->update_wake_below();
            }
            w->timer.expires_after(timeout);
            w->timer.async_wait([self, w](error_code) {
                if (self->remove(*w)) w->done(net::error::timed_out);
            });
            if (self->bytes_.load() <= w->most) self->wake();  // writers took it meanwhile
        });
    }

private:
    struct waiter {
        template <class Executor>
        waiter(std::size_t m, std::function<void(error_code)> d, const Executor& ex)
            : most(m), done(std::move(d)), timer(ex) {}
        std::size_t most;
        std::function<void(error_code)> done;  // a completion: posted to the handler's executor
        net::steady_timer timer;
    };

    // Whoever takes a waiter out of the list, under the lock, completes it: once.
    void wake() noexcept {
        std::vector<std::shared_ptr<waiter>> ready;
        {
            std::lock_guard lock(mutex_);
            const auto now = bytes_.load();
            std::erase_if(waiters_, [&](const std::shared_ptr<waiter>& w) {
                if (w->most < now) return false;
                ready.push_back(w);
                return true;
            });
            update_wake_below();
        }
        for (auto& w : ready) {
            net::post(w->timer.get_executor(), [w] { w->timer.cancel(); });  // let go of the io_context now
            w->done(error_code{});
        }
    }
    bool remove(const waiter& w) {
        std::lock_guard lock(mutex_);
        const auto n = std::erase_if(waiters_, [&](const std::shared_ptr<waiter>& p) { return p.get() == &w; });
        update_wake_below();
        return n > 0;
    }
    // take() wakes when the total falls below the largest bound waited for; 0: nobody waits.
    void update_wake_below() noexcept {
        std::size_t below = 0;
        for (auto& w : waiters_) below = std::max(below, w->most + 1);
        wake_below_.store(below);
    }

    std::mutex mutex_;
    std::vector<std::shared_ptr<waiter>> waiters_;  // mutex_
    std::atomic<std::size_t> bytes_{0}, wake_below_{0};
};

/// One connection's outbox: the messages waiting to be written, in order, and the batch being
/// written. It applies the limits and the overflow policy (see outbox_options) and knows nothing
/// of sockets, locks or keys: the connection owns one and guards it. What it holds is also kept
/// in the queued_total shared by all of a manager's outboxes.
class outbox {
public:
    using shared_total = std::shared_ptr<queued_total>;

    explicit outbox(const outbox_options& limits, shared_total total = {})
        : limits_(limits), total_(std::move(total)) {}
    ~outbox() { less(bytes()); }
    outbox(const outbox&) = delete;
    outbox& operator=(const outbox&) = delete;

    struct offer_result {
        bool queued = false;      ///< the message is in the outbox
        std::size_t evicted = 0;  ///< drop_oldest: waiting messages dropped to make room for it
        bool overflowed = false;  ///< the close policy: the connection must close
    };

    /// Queues `m` if it fits, else does what the overflow policy says.
    offer_result offer(const message& m) {
        if (fits(m)) {
            push(m);
            return {true};
        }
        switch (limits_.on_overflow) {
        case overflow_policy::drop_newest: return {};
        case overflow_policy::drop_oldest: {
            std::size_t evicted = 0;
            for (; !fits(m); ++evicted) drop_oldest_waiting();  // ends: an empty outbox takes anything
            push(m);
            return {true, evicted};
        }
        case overflow_policy::close: return {false, 0, true};
        }
        return {};
    }

    bool has_waiting() const noexcept { return waiting() > 0; }
    bool has_room(std::size_t messages, std::size_t bytes) const noexcept {
        return waiting() + messages <= limits_.max_messages && waiting_bytes_ + bytes <= limits_.max_bytes;
    }
    /// Every message held: waiting and being written.
    std::size_t size() const noexcept { return ring_.size(); }
    std::size_t bytes() const noexcept { return waiting_bytes_ + writing_bytes_; }
    const outbox_options& limits() const noexcept { return limits_; }

    /// Hands up to `max` waiting messages, the oldest, to the writer; they stay held (and their
    /// buffers valid) until done_writing().
    std::size_t start_writing(std::size_t max) noexcept {
        writing_ = std::min(waiting(), max);
        for (std::size_t i = 0; i < writing_; ++i) writing_bytes_ += ring_[i].size();
        waiting_bytes_ -= writing_bytes_;
        return writing_;
    }
    std::size_t writing() const noexcept { return writing_; }
    const message& being_written(std::size_t i) const noexcept { return ring_[i]; }

    void done_writing() noexcept {
        for (; writing_ > 0; --writing_) ring_.pop_front();
        less(std::exchange(writing_bytes_, 0));
    }

    /// Drops every message not being written: the connection is closing without them.
    void discard_waiting() noexcept {
        while (ring_.size() > writing_) ring_.pop_back();
        less(std::exchange(waiting_bytes_, 0));
    }

private:
    std::size_t waiting() const noexcept { return ring_.size() - writing_; }

    bool fits(const message& m) const noexcept {
        const std::size_t n = waiting();
        return n == 0 || (n < limits_.max_messages && waiting_bytes_ + m.size() <= limits_.max_bytes);
    }

    void push(const message& m) {
        ring_.push_back(m);
        waiting_bytes_ += m.size();
        if (total_) total_->add(m.size());
    }

    void drop_oldest_waiting() noexcept {
        const auto n = ring_[writing_].size();
        waiting_bytes_ -= n;
        less(n);
        ring_.erase(writing_);
    }

    void less(std::size_t n) noexcept {
        if (total_ && n) total_->take(n);
    }

    outbox_options limits_;
    shared_total total_;
    ring<message> ring_;  // the batch being written first, then the waiting messages
    std::size_t writing_ = 0, waiting_bytes_ = 0, writing_bytes_ = 0;
};

// ==== DETAIL: THE REGISTRY ===================================================================

template <class Key, class Connection>
struct key_entry;

/// One of a connection's keys: where the connection stands in that key's list of subscribers.
template <class Key, class Connection>
struct membership {
    key_entry<Key, Connection>* entry = nullptr;
    std::uint32_t slot = 0;  // index in entry->peers
};

/// One of a key's subscribers: the connection, and which of its memberships points back here.
template <class Connection>
struct peer {
    Connection* connection;
    std::uint32_t member;  // index in the connection's memberships
};

template <class Key, class Connection>
struct key_entry {
    const Key* key = nullptr;  // the registry's own copy (a map node's key does not move)
    std::vector<peer<Connection>> peers;
};

/// What the registry keeps inside each connection: its place in the list of all connections and
/// its keys (the reverse index: keys to connections, and connections to keys, both O(1) to change).
/// The first membership is stored inline: most connections have one key.
template <class Key, class Connection>
class registry_node {
public:
    static constexpr std::size_t npos = static_cast<std::size_t>(-1);

    bool registered() const noexcept { return index != npos; }
    std::size_t key_count() const noexcept { return count_; }
    membership<Key, Connection>& operator[](std::size_t i) noexcept { return i == 0 ? first_ : more_[i - 1]; }
    const membership<Key, Connection>& operator[](std::size_t i) const noexcept {
        return i == 0 ? first_ : more_[i - 1];
    }
    void push_back(membership<Key, Connection> m) {
        if (count_++ == 0)
            first_ = m;
        else
            more_.push_back(m);
    }
    void pop_back() noexcept {
        if (--count_ > 0) more_.pop_back();
        if (more_.empty()) std::vector<membership<Key, Connection>>().swap(more_);
    }

    std::size_t index = npos;  // in the registry's list of all connections

private:
    membership<Key, Connection> first_{};
    std::vector<membership<Key, Connection>> more_;
    std::uint32_t count_ = 0;
};

/// Keys to connections and connections to keys, and the list of all connections (so that
/// broadcast and shutdown visit each connection once, however many keys it has). Not
/// thread-safe: the manager's registry lock guards it. Connections are held by shared_ptr in the
/// list of all, by plain pointer under their keys; a Connection has a public `node` member of type
/// registry_node<Key, Connection>.
template <class Key, class Hash, class KeyEqual, class Connection>
class registry {
public:
    using connection_ptr = std::shared_ptr<Connection>;

    enum class add_result { added, added_first, already, not_registered, key_limit, key_connection_limit };
    enum class remove_result { not_subscribed, removed, removed_last };

    struct limits {
        std::size_t max_keys_per_connection = 0;  // 0: none
        std::size_t max_connections_per_key = 0;
    };

    std::size_t size() const noexcept { return all_.size(); }
    std::size_t key_count() const noexcept { return keys_.size(); }

    void insert(connection_ptr c) {
        c->node.index = all_.size();
        all_.push_back(std::move(c));
    }

    /// Whether `c` (registered) may take `key`, and whether it has it already.
    add_result check(const Connection& c, const Key& key, const limits& l) const {
        if (!c.node.registered()) return add_result::not_registered;
        auto it = keys_.find(key);
        if (it != keys_.end()) {
            if (find_member(c, &it->second) != npos) return add_result::already;
            if (l.max_connections_per_key && it->second.peers.size() >= l.max_connections_per_key)
                return add_result::key_connection_limit;
        }
        if (l.max_keys_per_connection && c.node.key_count() >= l.max_keys_per_connection) return add_result::key_limit;
        return it == keys_.end() ? add_result::added_first : add_result::added;
    }

    add_result add(Connection& c, const Key& key, const limits& l) {
        const auto verdict = check(c, key, l);
        if (verdict != add_result::added && verdict != add_result::added_first) return verdict;
        auto [it, inserted] = keys_.try_emplace(key);
        auto& entry = it->second;
        if (inserted) entry.key = &it->first;
        c.node.push_back({&entry, static_cast<std::uint32_t>(entry.peers.size())});
        entry.peers.push_back({&c, static_cast<std::uint32_t>(c.node.key_count() - 1)});
        return verdict;
    }

    /// Takes `key` from `c`. `last(key)` runs before a key that lost its last subscriber goes.
    template <class K, class Last>
    remove_result remove(Connection& c, const K& key, Last&& last) {
        auto it = find(key);
        if (it == keys_.end()) return remove_result::not_subscribed;
        const auto member = find_member(c, &it->second);
        if (member == npos) return remove_result::not_subscribed;
        return drop_membership(c, member, last);
    }

    /// Takes `c` out entirely: every key, then the list of all. Returns the registry's reference.
    template <class Last>
    connection_ptr erase(Connection& c, Last&& last) {
        if (!c.node.registered()) return nullptr;
        while (c.node.key_count() > 0) drop_membership(c, c.node.key_count() - 1, last);
        const auto index = c.node.index;
        connection_ptr mine = std::move(all_[index]);
        if (index + 1 < all_.size()) {  // swap-and-pop: order does not matter
            all_[index] = std::move(all_.back());
            all_[index]->node.index = index;
        }
        all_.pop_back();
        c.node.index = registry_node<Key, Connection>::npos;
        return mine;
    }

    /// Every connection and key goes; `last(key)` for each key. Returns the connections.
    template <class Last>
    std::vector<connection_ptr> clear(Last&& last) {
        for (auto& [key, entry] : keys_) last(key);
        keys_.clear();
        for (auto& c : all_) {
            while (c->node.key_count() > 0) c->node.pop_back();
            c->node.index = registry_node<Key, Connection>::npos;
        }
        return std::exchange(all_, {});
    }

    template <class K>
    bool has(const K& key) const {
        return find(key) != keys_.end();
    }

    template <class K>
    std::size_t count(const K& key) const {
        auto it = find(key);
        return it == keys_.end() ? 0 : it->second.peers.size();
    }

    template <class K>
    bool subscribed(const Connection& c, const K& key) const {
        auto it = find(key);
        return it != keys_.end() && find_member(c, &it->second) != npos;
    }

    std::vector<Key> keys_of(const Connection& c) const {
        std::vector<Key> out;
        out.reserve(c.node.key_count());
        for (std::size_t i = 0; i < c.node.key_count(); ++i) out.push_back(*c.node[i].entry->key);
        return out;
    }

    /// f(connection, stored key) for each subscriber of `key`.
    template <class K, class F>
    void for_each(const K& key, F&& f) const {
        auto it = find(key);
        if (it == keys_.end()) return;
        for (const auto& p : it->second.peers) f(*p.connection, it->first);
    }

    /// f(connection, stored key) for the first subscriber of `key`, if it has one.
    template <class K, class F>
    void for_first(const K& key, F&& f) const {
        auto it = find(key);
        if (it != keys_.end() && !it->second.peers.empty()) f(*it->second.peers.front().connection, it->first);
    }

    /// f(connection, i, stored key) once for each connection subscribed to any of `keys`, with i
    /// the index in `keys` of the first of them it is subscribed to.
    template <class Keys, class F>
    void for_each_once(const Keys& keys, F&& f) const {
        const key_entry<Key, Connection>* only = nullptr;
        std::size_t only_index = 0, found = 0, i = 0;
        for (const auto& k : keys) {
            if (auto it = find(k); it != keys_.end() && found++ == 0) only = &it->second, only_index = i;
            ++i;
        }
        if (found == 0) return;
        if (found == 1) {  // the common case needs no de-duplication
            for (const auto& p : only->peers) f(*p.connection, only_index, *only->key);
            return;
        }
        // Several keys: every (connection, key index) in key order, sorted by connection with the
        // first key first, then one call per connection. O(R log R), no state in the connections,
        // so concurrent multi-key sends need nothing of their own.
        struct reach {
            Connection* connection;
            std::size_t index;
            const Key* key;
        };
        std::vector<reach> reached;
        i = 0;
        for (const auto& k : keys) {
            if (auto it = find(k); it != keys_.end())
                for (const auto& p : it->second.peers) reached.push_back({p.connection, i, &it->first});
            ++i;
        }
        std::sort(reached.begin(), reached.end(), [](const reach& a, const reach& b) {
            return std::less<>{}(a.connection, b.connection) || (a.connection == b.connection && a.index < b.index);
        });
        for (std::size_t j = 0; j < reached.size(); ++j)
            if (j == 0 || reached[j].connection != reached[j - 1].connection)
                f(*reached[j].connection, reached[j].index, *reached[j].key);
    }

    /// f(connection) for every connection, each once.
    template <class F>
    void for_each_connection(F&& f) const {
        for (const auto& c : all_) f(*c);
    }

private:
    static constexpr std::size_t npos = static_cast<std::size_t>(-1);

    template <class K>
    auto find(const K& key) const {
        if constexpr (requires { keys_.find(key); })
            return keys_.find(key);  // heterogeneous lookup: no key object is built
        else
            return keys_.find(Key(key));
    }

    static std::size_t find_member(const Connection& c, const key_entry<Key, Connection>* entry) noexcept {
        for (std::size_t i = 0; i < c.node.key_count(); ++i)
            if (c.node[i].entry == entry) return i;
        return npos;
    }

    /// Swap-and-pop on both sides, fixing the back-references of whatever moved.
    template <class Last>
    remove_result drop_membership(Connection& c, std::size_t member, Last& last) {
        auto* entry = c.node[member].entry;
        const auto slot = c.node[member].slot;
        auto& peers = entry->peers;
        peers[slot] = peers.back();
        peers[slot].connection->node[peers[slot].member].slot = slot;
        peers.pop_back();

        const auto last_member = c.node.key_count() - 1;
        if (member != last_member) {
            c.node[member] = c.node[last_member];
            c.node[member].entry->peers[c.node[member].slot].member = static_cast<std::uint32_t>(member);
        }
        c.node.pop_back();

        if (!peers.empty()) return remove_result::removed;
        last(*entry->key);
        keys_.erase(keys_.find(*entry->key));
        return remove_result::removed_last;
    }

    std::unordered_map<Key, key_entry<Key, Connection>, Hash, KeyEqual> keys_;
    std::vector<connection_ptr> all_;
};

// ==== DETAIL: THE HISTORY ====================================================================

/// Each key's stream: its position, and its last messages for subscribers that resume. Kept apart
/// from the registry because a key's history outlives its last subscriber (the client that will
/// resume is often the one that just left). Bounded per key (messages, bytes, age) and in all
/// (bytes, keys); what it no longer keeps, it says so (recovery), never silently. It stores the
/// messages the outboxes share: no copy. Not thread-safe: the manager guards it.
template <class Key, class Hash, class KeyEqual>
class history {
public:
    using clock = std::chrono::steady_clock;

    /// `mirrors`: positions come from a broker (accept(), move_to()); a key this history has no
    /// stream of has no position (epoch 0) until the broker says which.
    history(const history_options& o, bool mirrors) : options_(o), mirrors_(mirrors), random_(std::random_device{}()) {}

    bool enabled() const noexcept { return options_.max_messages > 0; }
    bool mirrors() const noexcept { return mirrors_; }
    /// Keys with a position.
    std::size_t keys() const noexcept { return streams_.size(); }
    /// What the kept messages cost, counted as trimming counts them (payload and bookkeeping).
    std::size_t bytes() const noexcept { return bytes_; }

    /// Keeps `m` as the next message of `key` and returns its position.
    template <class K>
    position append(const K& key, const message& m, clock::time_point now) {
        stream& s = stream_of(key);
        keep(s, m, now);
        return {s.epoch, s.top};
    }

    /// How a message the broker positioned fits the key's stream (accept()).
    enum class fit {
        next,          ///< the one after the last kept: kept
        duplicate,     ///< already had: ignored
        discontinuous  ///< a new epoch, or messages in between never came: the stream restarts at it
    };

    /// Keeps `m` at `at`, the position a broker gave it (relay::positions()), instead of one of
    /// this history's own. A key without a stream starts one at `at`.
    template <class K>
    fit accept(const K& key, const message& m, position at, clock::time_point now) {
        stream& s = stream_of(key);
        const bool known = s.epoch != 0;
        if (known && s.epoch == at.epoch && at.offset <= s.top) {
            touch(s, now);
            return fit::duplicate;
        }
        const bool follows = known && s.epoch == at.epoch && at.offset == s.top + 1;
        if (!follows) restart(s, {at.epoch, at.offset - 1});
        keep(s, m, now);
        return follows || !known ? fit::next : fit::discontinuous;
    }

    /// The broker says `key`'s stream stands at `top` (the newest message it kept, or {epoch, 0}).
    /// Returns true if that breaks this history's stream (another epoch, or messages it never
    /// got): it restarts there, with nothing kept.
    template <class K>
    bool move_to(const K& key, position top, clock::time_point now) {
        stream& s = stream_of(key);
        const bool known = s.epoch != 0;
        touch(s, now);
        if (known && s.epoch == top.epoch && s.top >= top.offset) return false;
        restart(s, top);
        return known;
    }

    struct start {
        recovery outcome = recovery::live;
        position at;  // the key's position now
    };

    /// Where a subscription to `key` starting `from` begins, and what it missed: f(message,
    /// position) for each, oldest first, when the outcome is recovered. A key without a position
    /// gets one (a new epoch at offset 0), so that every subscriber has a position to resume from.
    template <class K, class F>
    start begin(const K& key, const since& from, clock::time_point now, F&& f) {
        const auto result = begin_at(stream_of(key), from, now, f);
        trim(now);  // a new key may have gone over max_keys; `key`, just used, is not the one forgotten
        return result;
    }

    /// Applies the bounds that time and the other keys impose: messages past their age, keys
    /// unused past position_ttl or beyond max_keys, the least recently sent-to keys' messages
    /// beyond max_total_bytes. Amortised O(1) per message.
    void trim(clock::time_point now) {
        while (!data_lru_.empty() && (expired(*data_lru_.back(), now) || over_total())) {
            stream& s = *data_lru_.back();
            if (over_total() || s.last_message + options_.ttl <= now)
                while (!s.entries.empty()) drop_oldest(s);  // its newest is too old, so are the others
            else
                while (expired(s, now)) drop_oldest(s);
            if (!s.entries.empty()) break;  // the others' old messages go when they are next used
        }
        while (!use_lru_.empty() &&
               ((options_.max_keys && streams_.size() > options_.max_keys) ||
                (options_.position_ttl.count() && use_lru_.back()->last_used + options_.position_ttl <= now)))
            forget(*use_lru_.back());
    }

private:
    struct entry {
        message m;
        clock::time_point at;
    };
    struct stream {
        const Key* key = nullptr;  // the map's own copy
        std::uint64_t epoch = 0;
        std::uint64_t top = 0;  // the offset of the newest message, kept or not
        ring<entry> entries;    // offsets top - size + 1 .. top
        std::size_t bytes = 0;
        clock::time_point last_message{}, last_used{};
        typename std::list<stream*>::iterator in_use, in_data;  // in_data: while it keeps messages
    };

    /// A kept message's share of the bounds: its payload, its entry and its allocation's header.
    static std::size_t cost(const message& m) noexcept { return m.size() + sizeof(entry) + 32; }

    bool expired(const stream& s, clock::time_point now) const noexcept {
        return options_.ttl.count() && !s.entries.empty() && s.entries[0].at + options_.ttl <= now;
    }
    bool over_total() const noexcept { return options_.max_total_bytes && bytes_ > options_.max_total_bytes; }

    template <class K>
    stream& stream_of(const K& key) {
        auto it = find(key);
        if (it == streams_.end()) {
            it = streams_.try_emplace(Key(key)).first;
            stream& s = it->second;
            s.key = &it->first;
            s.epoch = mirrors_ ? 0 : random_() | 1;  // 0 only while a broker has not said: {0, 0} is no position
            use_lru_.push_front(&s);
            s.in_use = use_lru_.begin();
        }
        return it->second;
    }

    template <class F>
    start begin_at(stream& s, const since& from, clock::time_point now, F& f) {
        touch(s, now);
        while (expired(s, now)) drop_oldest(s);
        const position top{s.epoch, s.top};
        const std::uint64_t first = s.top - s.entries.size() + 1;  // the oldest kept offset
        switch (from.what()) {
        case since::kind::now: return {recovery::live, top};
        case since::kind::latest:
            if (s.entries.empty()) return {recovery::nothing_kept, top};
            f(s.entries.back().m, top);
            return {recovery::recovered, top};
        case since::kind::after: break;
        }
        const auto& p = from.from();
        if (p.epoch != s.epoch) return {recovery::epoch_changed, top};
        if (p.offset > s.top) return {recovery::unknown_position, top};
        if (p.offset + 1 < first) return {recovery::trimmed, top};
        for (auto offset = p.offset + 1; offset <= s.top; ++offset)
            f(s.entries[static_cast<std::size_t>(offset - first)].m, position{s.epoch, offset});
        return {recovery::recovered, top};
    }

    void keep(stream& s, const message& m, clock::time_point now) {
        if (s.entries.empty())
            data_lru_.push_front(&s);
        else
            data_lru_.splice(data_lru_.begin(), data_lru_, s.in_data);
        s.in_data = data_lru_.begin();
        s.entries.push_back({m, now});
        s.bytes += cost(m);
        bytes_ += cost(m);
        s.last_message = now;
        ++s.top;
        touch(s, now);
        while (s.entries.size() > options_.max_messages ||
               (options_.max_bytes && s.bytes > options_.max_bytes && s.entries.size() > 1) || expired(s, now))
            drop_oldest(s);
        trim(now);
    }

    /// Empties the stream and sets its position: what it kept belongs to another history.
    void restart(stream& s, position top) noexcept {
        while (!s.entries.empty()) drop_oldest(s);
        s.epoch = top.epoch;
        s.top = top.offset;
    }

    void touch(stream& s, clock::time_point now) {
        s.last_used = now;
        use_lru_.splice(use_lru_.begin(), use_lru_, s.in_use);
    }

    void drop_oldest(stream& s) noexcept {
        const auto c = cost(s.entries[0].m);
        s.bytes -= c;
        bytes_ -= c;
        s.entries.pop_front();
        if (s.entries.empty()) data_lru_.erase(s.in_data);
    }

    /// Drops the key's position and messages: its next message starts a new epoch.
    void forget(stream& s) {
        while (!s.entries.empty()) drop_oldest(s);
        use_lru_.erase(s.in_use);
        streams_.erase(find(*s.key));
    }

    template <class K>
    auto find(const K& key) {
        if constexpr (requires { streams_.find(key); })
            return streams_.find(key);
        else
            return streams_.find(Key(key));
    }

    history_options options_;
    bool mirrors_;
    std::unordered_map<Key, stream, Hash, KeyEqual> streams_;
    std::list<stream*> use_lru_;   // every stream, most recently used first
    std::list<stream*> data_lru_;  // streams keeping messages, most recently sent to first
    std::size_t bytes_ = 0;
    std::mt19937_64 random_;  // epochs
};

// ==== DETAIL: THE CONNECTION =================================================================

template <class T>
inline constexpr bool is_batching_stream = false;
template <class NextLayer>
inline constexpr bool is_batching_stream<batching_stream<NextLayer>> = true;

/// A WebSocket stream over a batching_stream: the manager writes its frames in batches, itself.
template <class Socket>
concept writes_frame_batches =
    requires(Socket& s) { requires is_batching_stream<std::remove_cvref_t<decltype(s.next_layer())>>; };

enum class connection_state {
    open,      // accepting messages
    closing,   // write what is queued, then send a close frame
    aborting,  // outbox overflowed or torn down: drop what is queued, close now
    detached,  // unsubscribed: the writer stops, the socket is left to its owner
};

enum class writer_state {
    unstarted,  // registered, handshake not done yet: pushes only queue (see start_writer)
    idle,       // nothing to write; the next push schedules a flush
    scheduled,  // a flush is on its way to the socket's executor
    writing,    // a write (or the close frame) is in flight
};

/// One registered socket, its outbox and the state its writer needs. Shared by the registry, the
/// writer's pending handler and the endpoint or subscription; it dies with the last of them.
template <class Socket, class Key>
class connection : public std::enable_shared_from_this<connection<Socket, Key>> {
public:
    /// `resumable`: its client can resume from positions, so an overflow closes it, whatever the
    /// policy (a drop would be a silent gap), and its close says to resume.
    connection(Socket&& s, const outbox_options& o, outbox::shared_total queued, bool envelopes,
               std::size_t max_message_bytes, bool resumable)
        : socket(std::move(s)),
          envelopes(envelopes),
          resumable(resumable),
          read_buffer(read_storage, max_message_bytes),
          outbox_(resumable ? with_close_policy(o) : o, std::move(queued)) {}

    Socket socket;
    const bool envelopes;
    const bool resumable;
    registry_node<Key, connection> node;  // guarded by the manager's registry lock

    // Touched only on the socket's executor.
    net::steady_timer watchdog{socket.get_executor()};  // liveness, then the close deadline
    bool heard_from_peer = false;                       // a message or a control frame arrived since the last check
    bool ping_in_flight = false;                        // the watchdog's ping has not completed yet
    bool close_deadline = false;                        // the watchdog now guards a close handshake
    std::uint8_t stuck_checks = 0;                      // checks in a row that found a write and no progress
    std::uint32_t writes_completed = 0;                 // with the socket's own write_progress(), if any:
    std::uint64_t progress_seen = 0;                    //   what the watchdog saw at its last check
    std::vector<net::const_buffer> batch;               // the frames being written; empty when idle
    std::string read_storage;                           // serve(): the message being read, here
    detail::read_buffer read_buffer;                    // because the pending read refers to them

    struct push_result {
        bool open = false;  // it took messages: the outbox was offered this one
        outbox::offer_result offer;
        bool wake = false;  // the writer was idle: schedule a flush
    };

    /// Offers `m` to the outbox while the connection is open; an overflow under the close policy
    /// starts the close.
    push_result push(const message& m) {
        std::lock_guard lock(mutex_);
        if (state_ != connection_state::open) return {};
        const auto offer = outbox_.offer(m);
        if (offer.overflowed)
            begin_close(
                connection_state::aborting, outbox_.limits().close_code,
                resumable ? "outbox full: resume from the last position" : "outbox full: the client is not reading");
        return {true, offer, schedule_flush()};
    }

    /// Asks for a close with `code` after what is queued (closing) or now (aborting), or leaves
    /// the socket to its owner (detached). Returns true when the writer must be woken. An open
    /// connection takes any request; a closing one may still be aborted; detaching always wins.
    bool request_close(connection_state how, std::uint16_t code, std::string_view text) {
        std::lock_guard lock(mutex_);
        const bool takes = state_ == connection_state::open || how == connection_state::detached ||
                           (how == connection_state::aborting && state_ == connection_state::closing);
        if (!takes) return false;
        begin_close(how, code, text);
        return schedule_flush();
    }

    /// The handshake is done: the writer may write what was queued meanwhile (if anything).
    bool start_writer() {
        std::lock_guard lock(mutex_);
        writer_ = writer_state::idle;
        return (outbox_.has_waiting() || state_ != connection_state::open) && schedule_flush();
    }

    /// A scheduled flush was lost with its io_context: let the next push schedule one again.
    void flush_dropped() {
        std::lock_guard lock(mutex_);
        if (writer_ == writer_state::scheduled) writer_ = writer_state::idle;
    }

    /// The connection left the manager: it no longer keeps its io_context running.
    void release_work() {
        std::lock_guard lock(mutex_);
        keep_running_.reset();
    }

    connection_state state() const {
        std::lock_guard lock(mutex_);
        return state_;
    }

    bool writing() const {
        std::lock_guard lock(mutex_);
        return outbox_.writing() > 0;
    }

    /// Whether `messages` more, of `bytes` in all, would fit the outbox's limits now.
    bool has_room(std::size_t messages, std::size_t bytes) const {
        std::lock_guard lock(mutex_);
        return outbox_.has_room(messages, bytes);
    }

    /// What the writer does next, decided under the lock.
    struct next_write {
        enum { nothing, frames, close } what = nothing;
        bool binary = false;  // frames, one message at a time: its type
        std::uint16_t code = 0;
        std::string reason;
        bool overflowed = false;
    };

    /// The writer's next step: fills `batch` with up to `max` frames (whole frames when the socket
    /// batches, else the payload of one message), or says to send the close frame, or to stop.
    next_write take_next_write(std::size_t max, bool frames) {
        std::lock_guard lock(mutex_);
        next_write next;
        if (state_ == connection_state::detached) {  // the socket is its owner's again
            writer_ = writer_state::idle;
            return next;
        }
        if (state_ != connection_state::aborting && outbox_.has_waiting()) {
            // Messages stay held until written; the buffers point into their shared allocations.
            writer_ = writer_state::writing;
            batch.clear();
            const auto n = outbox_.start_writing(frames ? max : 1);
            for (std::size_t i = 0; i < n; ++i)
                batch.push_back(frames ? outbox_.being_written(i).frame()
                                       : net::buffer(outbox_.being_written(i).data()));
            next.what = next_write::frames;
            next.binary = outbox_.being_written(0).is_binary();
            return next;
        }
        if (state_ == connection_state::open) {
            writer_ = writer_state::idle;
            std::vector<net::const_buffer>().swap(batch);  // an idle connection holds no batch
            return next;
        }
        writer_ = writer_state::writing;  // for good: nothing is written after the close
        next.what = next_write::close;
        next.code = close_code_;
        next.reason = close_text_;
        next.overflowed = state_ == connection_state::aborting;
        return next;
    }

    /// A write completed: its messages go. After an error the writer stops for good.
    void written(bool failed) {
        std::lock_guard lock(mutex_);
        outbox_.done_writing();
        if (failed) writer_ = writer_state::writing;
    }

private:
    static outbox_options with_close_policy(outbox_options o) noexcept {
        o.on_overflow = overflow_policy::close;
        return o;
    }

    /// An idle writer gets a flush scheduled; any other is either writing (it looks at the outbox
    /// again when its write completes) or not started. `mutex_` must be held.
    bool schedule_flush() noexcept {
        if (writer_ != writer_state::idle) return false;
        writer_ = writer_state::scheduled;
        return true;
    }

    /// `mutex_` must be held.
    void begin_close(connection_state how, std::uint16_t code, std::string_view text) {
        state_ = how;
        close_code_ = code;
        close_text_ = truncate_utf8(text, max_close_reason);
        if (how != connection_state::closing) outbox_.discard_waiting();  // nothing queued will be written
    }

    mutable std::mutex mutex_;  // guards everything below
    // A registered connection keeps its io_context running, even with nothing in flight: sends
    // may come at any time. Released when it leaves the manager.
    net::executor_work_guard<typename Socket::executor_type> keep_running_{socket.get_executor()};
    detail::outbox outbox_;
    writer_state writer_ = writer_state::unstarted;
    connection_state state_ = connection_state::open;
    std::uint16_t close_code_ = 0;
    std::string close_text_;  // an owned copy: the caller's reason may not outlive the close
};

}  // namespace detail

// ==== CONNECTION MANAGER =====================================================================

template <message_socket Socket, class Key = std::string, class Hash = default_hash<Key>,
          class KeyEqual = std::equal_to<>>
    requires hashable_key<Key, Hash, KeyEqual>
class ConnectionManager {
    using connection = detail::connection<Socket, Key>;
    using connection_ptr = std::shared_ptr<connection>;
    using registry_type = detail::registry<Key, Hash, KeyEqual, connection>;
    using history_type = detail::history<Key, Hash, KeyEqual>;
    using clock = std::chrono::steady_clock;

    /// Something a key can be made from or looked up by (a std::string_view for std::string keys).
    template <class K>
    static constexpr bool key_like = std::constructible_from<Key, const K&>;
    /// A range of keys, as send(keys, m) and publish(keys, m) take.
    template <class Keys>
    static constexpr bool key_range = [] {
        if constexpr (std::ranges::input_range<Keys>)
            return !key_like<Keys> && key_like<std::ranges::range_value_t<Keys>>;
        else
            return false;
    }();

public:
    using socket_type = Socket;
    using key_type = Key;
    using options_type = wsbroadcast::options<Key>;

    /// A reference to one connection, for changing its keys, writing to it alone or closing it.
    /// Cheap to copy; it does not keep the connection alive. Every member may be called from any
    /// thread; on a connection that has gone they do nothing (subscribe says error::not_registered).
    class connection_handle {
    public:
        connection_handle() = default;

        /// Subscribes the connection to `key` as well: it receives every message sent to `key`
        /// from the moment this returns, and first, with history on, what `from` asks for (see
        /// since). The limits apply; options::admit does not (it is asynchronous, and a runtime
        /// subscription is the application's own decision: ask it first if it should). Succeeds
        /// ({}) also when it is subscribed already, and then changes nothing. With envelopes,
        /// options::envelope.subscribed(key, info) is queued first, saying how it started.
        /// Refusals: error::key_limit, error::key_connection_limit, error::shutting_down,
        /// error::not_registered.
        error_code subscribe(const Key& key, since from = {}) const {
            auto c = lock();
            return c ? manager_->add_key(*c, key, from) : error_code(error::not_registered);
        }

        /// subscribe(), after the relay (if any) has prepared `key` (relay::prepare()): through a
        /// broker that confirms subscriptions or keeps history, the subscription then misses
        /// nothing and resumes from the broker's history. Completes with void(error_code):
        /// subscribe()'s refusals, or error::relay_unavailable.
        template <class CompletionToken = net::use_awaitable_t<>>
        auto async_subscribe(Key key, since from = {}, CompletionToken&& token = {}) const {
            return net::async_initiate<CompletionToken, void(error_code)>(
                [h = *this](auto handler, Key key, since from) {
                    using done_type = detail::completion<decltype(handler), error_code>;
                    const auto& relay = h.manager_ ? h.manager_->options_.relay : nullptr;
                    if (!relay) return detail::complete_later(std::move(handler), h.subscribe(key, from));
                    auto one = std::make_shared<std::array<Key, 1>>(std::array<Key, 1>{std::move(key)});
                    relay->prepare(*one, [h, one, from, done = done_type(std::move(handler))](error_code ec) mutable {
                        ec = ec ? error_code(error::relay_unavailable) : h.subscribe(one->front(), from);
                        h.manager_->options_.relay->release(*one);
                        done(ec);
                    });
                },
                token, std::move(key), from);
        }

        /// Stops delivery of `key` to this connection; messages already queued are still written.
        /// Returns whether it was subscribed.
        template <class K>
        bool unsubscribe(const K& key) const {
            auto c = lock();
            return c && manager_->remove_key(*c, key);
        }

        template <class K>
        bool subscribed_to(const K& key) const {
            auto c = lock();
            if (!c) return false;
            std::shared_lock registry_lock(manager_->registry_mutex_);
            return manager_->registry_.subscribed(*c, key);
        }

        /// Its keys, in no particular order; empty once it has gone.
        std::vector<Key> keys() const {
            auto c = lock();
            if (!c) return {};
            std::shared_lock registry_lock(manager_->registry_mutex_);
            return manager_->registry_.keys_of(*c);
        }

        /// Queues `m` for this connection alone, as it is (no envelope), in order with what the
        /// manager sends it.
        send_result send(const message& m) const {
            sending s;
            if (auto c = lock()) manager_->push(*c, m, s);
            return manager_->finish(s);
        }
        send_result send(std::string_view text) const { return send(message::text(text)); }

        /// Writes what is queued, then closes with `code` and `reason`.
        void close(std::uint16_t code = 1000, std::string_view reason = {}) const {
            if (auto c = lock()) manager_->request_close(*c, detail::connection_state::closing, code, reason);
        }

        /// Still registered with the manager.
        bool connected() const {
            auto c = lock();
            if (!c) return false;
            std::shared_lock registry_lock(manager_->registry_mutex_);
            return c->node.registered();
        }

        bool envelopes() const {
            auto c = lock();
            return c && c->envelopes;
        }

        explicit operator bool() const noexcept { return manager_ != nullptr; }

    private:
        friend class ConnectionManager;
        connection_handle(ConnectionManager* m, const connection_ptr& c) : manager_(m), connection_(c) {}
        connection_ptr lock() const { return manager_ ? connection_.lock() : nullptr; }

        ConnectionManager* manager_ = nullptr;
        std::weak_ptr<connection> connection_;
    };

    /// RAII registration of one socket. Destroying it, or calling unsubscribe(), removes the
    /// connection from the manager (from all its keys); its socket stays open for its owner.
    class subscription {
    public:
        subscription() = default;
        subscription(subscription&& other) noexcept
            : manager_(std::exchange(other.manager_, nullptr)), connection_(std::move(other.connection_)) {}
        subscription& operator=(subscription&& other) noexcept {
            if (this != &other) {
                unsubscribe();
                manager_ = std::exchange(other.manager_, nullptr);
                connection_ = std::move(other.connection_);
            }
            return *this;
        }
        ~subscription() { unsubscribe(); }

        /// Leaves the manager. Safe to call from any thread, more than once.
        void unsubscribe() noexcept {
            if (manager_ && connection_) manager_->remove(connection_, detail::connection_state::detached);
            manager_ = nullptr;
        }

        /// For changing its keys, writing to it alone, closing it.
        connection_handle handle() const {
            return manager_ ? connection_handle(manager_, connection_) : connection_handle();
        }
        std::vector<Key> keys() const { return handle().keys(); }

        /// The registered socket. Use it only on its own executor.
        Socket& socket() const noexcept { return connection_->socket; }
        explicit operator bool() const noexcept { return manager_ != nullptr; }

    private:
        friend class ConnectionManager;
        subscription(ConnectionManager* m, connection_ptr c) : manager_(m), connection_(std::move(c)) {}

        ConnectionManager* manager_ = nullptr;
        connection_ptr connection_;
    };

    explicit ConnectionManager(options_type opts = {}) : options_(std::move(opts)) {
        if (!options_.on_error) options_.on_error = detail::log_to_stderr;
    }
    ConnectionManager(const ConnectionManager&) = delete;
    ConnectionManager& operator=(const ConnectionManager&) = delete;

    // ---- registration ------------------------------------------------------------------------

    /// Registers `ws` with its initial `keys` (a key, a range of keys, or {}) and starts its
    /// writer on the socket's executor. The connection receives every message sent to its keys
    /// until the subscription is dropped, the writer fails, or the outbox overflows under the
    /// close policy. Reading from the socket stays the caller's job (serve() does it for you). The
    /// limits apply, the admission hook does not (it is asynchronous): a refusal throws
    /// system_error with a wsbroadcast::error and drops `ws`.
    [[nodiscard]] subscription subscribe(Socket ws, initial_keys<Key> keys) {
        return subscribe(std::move(ws), std::move(keys), connection_options{});
    }

    /// The same, with this connection's own outbox limits and overflow policy.
    [[nodiscard]] subscription subscribe(Socket ws, initial_keys<Key> keys, const outbox_options& outbox) {
        return subscribe(std::move(ws), std::move(keys), connection_options{outbox});
    }

    /// The same, with this connection's own options (outbox, envelopes).
    [[nodiscard]] subscription subscribe(Socket ws, initial_keys<Key> keys, const connection_options& o) {
        auto c = make_connection(std::move(ws), o);
        if (const auto refusal = try_register(c, keys)) throw std::system_error(std::error_code(refusal), "subscribe");
        start_writer(c);
        return subscription(this, std::move(c));
    }

    // ---- sending -----------------------------------------------------------------------------

    /// Queues `m` to every connection subscribed to `key`. Never blocks, never waits on a peer.
    /// Sending to a key nobody listens on does nothing and returns {}. If a connection's write
    /// cannot be scheduled for want of memory, every other one still is and then std::bad_alloc
    /// is thrown: `m` is queued all the same, and that connection gets it with its next message.
    template <class K>
        requires key_like<K>
    send_result send(const K& key, const message& m) {
        return send_to_key(key, [&m]() -> const message& { return m; });
    }

    /// Sends a text message. The payload is copied once, and only if somebody listens on `key`.
    template <class K>
        requires key_like<K>
    send_result send(const K& key, std::string_view text) {
        return send_to_key(key, [text] { return message::text(text); });
    }

    /// Queues `m` once to every connection subscribed to any of `keys` (a range), however many of
    /// them it is subscribed to, in one allocation whatever the overlap.
    template <class Keys>
        requires key_range<Keys>
    send_result send(const Keys& keys, const message& m) {
        if (std::ranges::distance(keys) == 1)  // the common case, and its first write goes early
            return send_to_key(*std::ranges::begin(keys), [&m]() -> const message& { return m; });
        sending s;
        {
            std::shared_lock lock(registry_mutex_);
            std::unique_lock<std::mutex> in_order;
            if (positions_here_) {
                in_order = std::unique_lock(history_mutex_);
                append_to_history(keys, m, s.result.positions);
            }
            std::vector<std::optional<message>> wrapped;  // envelopes, per key, built on first need
            registry_.for_each_once(keys, [&](connection& c, std::size_t i, const Key& key) {
                if (wrapped.empty() && c.envelopes) wrapped.resize(std::ranges::distance(keys));
                push(c, framed(c, m, key, position_at(s.result, i), c.envelopes ? &wrapped[i] : nullptr), s);
            });
        }
        return finish(s);
    }

    template <class Keys>
        requires key_range<Keys>
    send_result send(const Keys& keys, std::string_view text) {
        return send(keys, message::text(text));
    }

    /// Sends `m` to `key` on every instance: through options::relay when one is set (this instance
    /// delivers it when the relay brings it back), else here, as send() does.
    template <class K>
        requires key_like<K>
    publish_result publish(const K& key, const message& m) {
        if (!options_.relay) return sent_here(send(key, m));
        if constexpr (std::is_convertible_v<const K&, const Key&>) {
            return relayed(std::span<const Key>(&static_cast<const Key&>(key), 1), m);
        } else {
            const Key k(key);
            return relayed(std::span<const Key>(&k, 1), m);
        }
    }

    template <class K>
        requires key_like<K>
    publish_result publish(const K& key, std::string_view text) {
        return publish(key, message::text(text));
    }

    /// Sends `m` to `keys` on every instance, each connection once (see send(keys, m)).
    template <class Keys>
        requires key_range<Keys>
    publish_result publish(const Keys& keys, const message& m) {
        if (!options_.relay) return sent_here(send(keys, m));
        std::vector<Key> owned;
        for (auto&& k : keys) owned.emplace_back(k);
        return relayed(owned, m);
    }

    template <class Keys>
        requires key_range<Keys>
    publish_result publish(const Keys& keys, std::string_view text) {
        return publish(keys, message::text(text));
    }

    /// publish() that completes once the message has its positions, in publish_result::positions:
    /// with a relay that positions messages (relay::positions()), when the broker has answered;
    /// otherwise at once, as publish() does. The completion signature is void(publish_result); it
    /// runs on the handler's executor (an awaiting coroutine's), or for a plain callback, on the
    /// thread that completes it.
    template <class Keys, class CompletionToken = net::use_awaitable_t<>>
        requires key_range<Keys>
    auto async_publish(const Keys& keys, message m, CompletionToken&& token = {}) {
        std::vector<Key> owned;
        for (auto&& k : keys) owned.emplace_back(k);
        return net::async_initiate<CompletionToken, void(publish_result)>(
            [this](auto handler, std::vector<Key> keys, message m) {
                if (!options_.relay || !options_.relay->positions()) {
                    return detail::complete_later(std::move(handler), publish(keys, m));
                }
                options_.relay->publish_positioned(
                    keys, m,
                    [done = detail::completion<decltype(handler), publish_result>(std::move(handler))](
                        error_code ec, std::vector<position> at) mutable {
                        done(publish_result{ec, !ec, {}, std::move(at)});
                    });
            },
            token, std::move(owned), std::move(m));
    }

    template <class K, class CompletionToken = net::use_awaitable_t<>>
        requires key_like<K>
    auto async_publish(const K& key, message m, CompletionToken&& token = {}) {
        return async_publish(std::array<Key, 1>{Key(key)}, std::move(m), std::forward<CompletionToken>(token));
    }

    // ---- for relays: what the broker brings back -------------------------------------------------

    /// With a relay that positions messages (relay::positions()): delivers `m`, which the broker
    /// put at `at` in `key`'s stream, here, and keeps it in this instance's history at that
    /// position. A message already had (a copy, or one a repair fetched) is dropped. A break in
    /// the stream (another epoch, or messages in between that never came) restarts the key's
    /// history at `at` and closes its envelope connections with 1013 so that they resume and are
    /// told what they cannot get back; the others get `m` and carry on. Without history, send().
    template <class K>
        requires key_like<K>
    send_result deliver(const K& key, const message& m, position at) {
        if (!history_.enabled()) return send(key, m);
        sending s;
        {
            std::shared_lock lock(registry_mutex_);
            std::lock_guard in_order(history_mutex_);
            const auto fit = history_.accept(key, m, at, clock::now());
            if (fit == history_type::fit::duplicate) return {};
            if (fit == history_type::fit::discontinuous) close_resumable(key);
            s.result.positions.push_back(at);
            std::optional<message> wrapped;
            const std::optional<position> where = at;
            registry_.for_each(key, [&](connection& c, const Key& k) { push(c, framed(c, m, k, where, &wrapped), s); });
        }
        return finish(s);
    }

    /// With a relay that positions messages: the broker says `key`'s stream stands at `top` (its
    /// newest message, or {epoch, 0}), before this instance delivers anything more of it. A break
    /// is handled as deliver() does. Returns whether there was one.
    template <class K>
        requires key_like<K>
    bool adopt_position(const K& key, position top) {
        if (!history_.enabled()) return false;
        std::shared_lock lock(registry_mutex_);
        std::lock_guard in_order(history_mutex_);
        if (!history_.move_to(key, top, clock::now())) return false;
        close_resumable(key);
        return true;
    }

    /// Queues `m` to every connection once, as it is: a broadcast is no key's message, so
    /// envelope connections get no envelope.
    send_result broadcast(const message& m) {
        sending s;
        {
            std::shared_lock lock(registry_mutex_);
            registry_.for_each_connection([&](connection& c) { push(c, m, s); });
        }
        return finish(s);
    }

    send_result broadcast(std::string_view text) { return broadcast(message::text(text)); }

    /// Asks every connection to finish writing what is queued and then close with `code`
    /// (1001 "going away" by default). Connections leave the manager as their peers answer the
    /// close; a server shutting down waits for size() to reach 0, with a deadline of its own.
    void close_all(std::uint16_t code = 1001, std::string_view reason = "server shutting down") {
        std::shared_lock lock(registry_mutex_);
        registry_.for_each_connection(
            [&](connection& c) { request_close(c, detail::connection_state::closing, code, reason); });
    }

    /// Closes every connection subscribed to `key`, as close_all() does, and returns how many.
    template <class K>
        requires key_like<K>
    std::size_t close(const K& key, std::uint16_t code = 1000, std::string_view reason = {}) {
        std::shared_lock lock(registry_mutex_);
        std::size_t n = 0;
        registry_.for_each(key, [&](connection& c, const Key&) {
            request_close(c, detail::connection_state::closing, code, reason);
            ++n;
        });
        return n;
    }

    // ---- queries -----------------------------------------------------------------------------

    template <class K>
        requires key_like<K>
    bool has(const K& key) const {
        std::shared_lock lock(registry_mutex_);
        return registry_.has(key);
    }

    /// Connections subscribed to `key`.
    template <class K>
        requires key_like<K>
    std::size_t count(const K& key) const {
        std::shared_lock lock(registry_mutex_);
        return registry_.count(key);
    }

    /// Calls f(connection_handle) for each connection subscribed to `key` (who is there, for
    /// presence), outside the registry lock: f may call the manager. Returns how many.
    template <class K, class F>
        requires key_like<K> && std::invocable<F&, connection_handle>
    std::size_t for_each(const K& key, F f) {
        std::vector<connection_handle> handles;
        {
            std::shared_lock lock(registry_mutex_);
            registry_.for_each(key, [&](connection& c, const Key&) { handles.push_back(handle_of(c)); });
        }
        for (auto& h : handles) f(h);
        return handles.size();
    }

    /// Connections registered, each once whatever its keys.
    std::size_t size() const {
        std::shared_lock lock(registry_mutex_);
        return registry_.size();
    }

    /// Keys with at least one connection.
    std::size_t key_count() const {
        std::shared_lock lock(registry_mutex_);
        return registry_.key_count();
    }

    /// Bytes held by all outboxes right now (a message queued to N connections counts N times,
    /// as the limits do), those of connections that have left but not finished writing included.
    /// O(1), without a lock.
    std::size_t queued_bytes() const noexcept { return queued_->bytes(); }

    /// Backpressure for a publisher faster than the writers: completes once the outboxes hold at
    /// most `max_bytes` in all (queued_bytes()), so that it waits for them rather than queueing
    /// without bound. No error: they do (at once if they already did: posted, not inline);
    /// net::error::timed_out: they still held more after `timeout`. Nothing is sent or dropped.
    /// The completion signature is void(error_code); it runs on the handler's executor (an
    /// awaiting coroutine's), a strand of which runs the timer. A plain callback's executor is
    /// the system executor, whose own threads would run it: bind one (net::bind_executor).
    template <class CompletionToken = net::use_awaitable_t<>>
    auto async_wait_for_room(std::size_t max_bytes, std::chrono::steady_clock::duration timeout,
                             CompletionToken&& token = {}) {
        return net::async_initiate<CompletionToken, void(error_code)>(
            [total = queued_](auto handler, std::size_t most, std::chrono::steady_clock::duration t) {
                total->wait(most, t, std::move(handler));
            },
            token, max_bytes, timeout);
    }

    statistics stats() const noexcept {
        auto get = [](const std::atomic<std::uint64_t>& n) { return n.load(std::memory_order_relaxed); };
        return {get(connections_),     get(refused_), get(messages_),  get(deliveries_),    get(dropped_),
                get(overflow_closes_), get(errors_),  get(recovered_), get(not_recovered_), get(replayed_)};
    }

    /// Reads `key`'s history without subscribing: f(message, position) for each kept message
    /// after `from` (since::after), or for the latest (since::latest), oldest first, and what a
    /// subscription starting there would be told (its position now; recovered, or why not).
    /// since::now reads nothing and gives the key's position. f runs under the history lock: it
    /// must not call the manager. A key without a position gets one, as on subscribe.
    template <class K, class F>
        requires key_like<K> && std::invocable<F&, const message&, const position&>
    subscribed_info read_history(const K& key, since from, F f) {
        if (!history_.enabled()) return {std::nullopt, from.asks_history() ? recovery::no_history : recovery::live, 0};
        std::lock_guard lock(history_mutex_);
        std::size_t n = 0;
        const auto start = history_.begin(key, from, clock::now(), [&](const message& m, const position& at) {
            ++n;
            f(m, at);
        });
        if (start.at.epoch == 0) return {std::nullopt, start.outcome, n};  // the broker has not said yet
        return {start.at, start.outcome, n};
    }

    /// Keys with a position in the history (options::history), and what the messages it keeps
    /// cost, as its bounds count them. O(1).
    std::size_t history_keys() const {
        std::lock_guard lock(history_mutex_);
        return history_.keys();
    }
    std::size_t history_bytes() const {
        std::lock_guard lock(history_mutex_);
        return history_.bytes();
    }

    const options_type& config() const noexcept { return options_; }

    // ---- shutdown ----------------------------------------------------------------------------

    /// Graceful shutdown: refuses new connections and subscriptions (close 1001,
    /// error::shutting_down), asks every connection to write what is queued and close with
    /// `code`, waits up to `drain` for peers to answer, then tears down whatever is left.
    /// Completes, on the awaiting coroutine's executor, once no connection is registered. Call it
    /// once; the manager stays closed afterwards.
    net::awaitable<void> shutdown(std::chrono::steady_clock::duration drain = std::chrono::seconds(5),
                                  std::uint16_t code = 1001, std::string_view reason = "server shutting down") {
        {
            std::unique_lock lock(registry_mutex_);
            closing_ = true;
        }
        close_all(code, reason);
        net::steady_timer timer(co_await net::this_coro::executor);
        const auto deadline = std::chrono::steady_clock::now() + drain;
        while (size() > 0 && std::chrono::steady_clock::now() < deadline) {
            timer.expires_after(std::chrono::milliseconds(10));
            co_await timer.async_wait(net::use_awaitable);
        }
        abort_all();
    }

    // ---- endpoint helpers --------------------------------------------------------------------

    /// What serve() and accept_and_serve() hand each message a client sends: either
    /// void(std::string_view data), or void(connection_handle&, std::string_view data, bool binary)
    /// for a handler that answers, changes the connection's keys or closes it.
    template <class F>
    static constexpr bool handles_messages =
        std::invocable<F&, std::string_view> || std::invocable<F&, connection_handle&, std::string_view, bool>;

    /// Registers `ws` with its initial `keys`, reads messages until the peer closes or the
    /// connection fails, and unregisters on every way out (close, error, exception, cancellation).
    ///
    /// Before registering it asks options::admit (if set) about each initial key and checks the
    /// limits; a refusal closes the socket with the code of its wsbroadcast::error and completes
    /// with it.
    ///
    /// `on_message` is called with each message the client sends (see handles_messages); by
    /// default they are read and discarded. It runs on the socket's executor; the data is valid
    /// only during the call. An exception it throws ends the connection and is the completion's.
    ///
    /// Completes with the error that ended the connection (Beast's websocket::error::closed for a
    /// clean close). Unexpected errors are also reported to options::on_error. Everything touching
    /// the socket runs on the socket's executor; the completion runs on the completion handler's
    /// associated executor (for the default awaitable, the awaiting coroutine's), or, for a
    /// handler with none, on the socket's. By default the result is an awaitable; any Asio
    /// completion token for void(std::exception_ptr, error_code) works instead (a callback,
    /// net::detached), and then no frame of the caller's waits while the connection lives.
    template <class OnMessage = void (*)(std::string_view), class CompletionToken = net::use_awaitable_t<>>
        requires readable_message_socket<Socket> && handles_messages<OnMessage>
    auto serve(
        Socket ws, initial_keys<Key> keys, OnMessage on_message = [](std::string_view) {},
        CompletionToken&& token = {}) {
        return serve(std::move(ws), std::move(keys), connection_options{}, std::move(on_message),
                     std::forward<CompletionToken>(token));
    }

    /// The same, with this connection's own outbox limits and overflow policy.
    template <class OnMessage = void (*)(std::string_view), class CompletionToken = net::use_awaitable_t<>>
        requires readable_message_socket<Socket> && handles_messages<OnMessage>
    auto serve(
        Socket ws, initial_keys<Key> keys, const outbox_options& outbox, OnMessage on_message = [](std::string_view) {},
        CompletionToken&& token = {}) {
        return serve(std::move(ws), std::move(keys), connection_options{outbox}, std::move(on_message),
                     std::forward<CompletionToken>(token));
    }

    /// The same, with this connection's own options (outbox, envelopes).
    template <class OnMessage = void (*)(std::string_view), class CompletionToken = net::use_awaitable_t<>>
        requires readable_message_socket<Socket> && handles_messages<OnMessage>
    auto serve(
        Socket ws, initial_keys<Key> keys, const connection_options& o, OnMessage on_message = [](std::string_view) {},
        CompletionToken&& token = {}) {
        return start_endpoint(make_connection(std::move(ws), o), detail::no_request{}, std::move(keys),
                              std::move(on_message), std::forward<CompletionToken>(token));
    }

    /// Like serve(), for a socket whose handshake is still to be done: admits and registers `ws`
    /// with its `keys` first, then answers the upgrade `request` (ws.async_accept(request)), then
    /// starts writing. A client that sees its handshake complete therefore gets every message sent
    /// from then on; messages sent during the handshake wait in its outbox. (Through a relay, what
    /// it gets is what the relay brings back once the broker knows this instance needs the key.)
    /// A failed handshake unregisters and completes with its error. A refused client gets the
    /// handshake and then the close frame, so a browser sees the close code and reason.
    template <class Request, class OnMessage = void (*)(std::string_view),
              class CompletionToken = net::use_awaitable_t<>>
        requires readable_message_socket<Socket> && accepts_upgrade<Socket, Request> && handles_messages<OnMessage>
    auto accept_and_serve(
        Socket ws, Request request, initial_keys<Key> keys, OnMessage on_message = [](std::string_view) {},
        CompletionToken&& token = {}) {
        return accept_and_serve(std::move(ws), std::move(request), std::move(keys), connection_options{},
                                std::move(on_message), std::forward<CompletionToken>(token));
    }

    /// The same, with this connection's own outbox limits and overflow policy.
    template <class Request, class OnMessage = void (*)(std::string_view),
              class CompletionToken = net::use_awaitable_t<>>
        requires readable_message_socket<Socket> && accepts_upgrade<Socket, Request> && handles_messages<OnMessage>
    auto accept_and_serve(
        Socket ws, Request request, initial_keys<Key> keys, const outbox_options& outbox,
        OnMessage on_message = [](std::string_view) {}, CompletionToken&& token = {}) {
        return accept_and_serve(std::move(ws), std::move(request), std::move(keys), connection_options{outbox},
                                std::move(on_message), std::forward<CompletionToken>(token));
    }

    /// The same, with this connection's own options (outbox, envelopes).
    template <class Request, class OnMessage = void (*)(std::string_view),
              class CompletionToken = net::use_awaitable_t<>>
        requires readable_message_socket<Socket> && accepts_upgrade<Socket, Request> && handles_messages<OnMessage>
    auto accept_and_serve(
        Socket ws, Request request, initial_keys<Key> keys, const connection_options& o,
        OnMessage on_message = [](std::string_view) {}, CompletionToken&& token = {}) {
        return start_endpoint(make_connection(std::move(ws), o), std::move(request), std::move(keys),
                              std::move(on_message), std::forward<CompletionToken>(token));
    }

private:
    // ---- connections in and out ----------------------------------------------------------------

    /// A socket with its own limit on what it reads (Beast's read_message_max) enforces it, with
    /// close 1009; for any other, the read buffer's limit does, and the endpoint closes.
    static constexpr bool socket_limits_size = requires(Socket& s) { s.read_message_max(std::size_t{}); };

    /// Builds a connection and applies the manager's socket-level limits where the socket has them.
    connection_ptr make_connection(Socket ws, const connection_options& o) {
        auto c =
            std::make_shared<connection>(std::move(ws), o.outbox.value_or(options_.outbox), queued_, o.envelopes,
                                         socket_limits_size ? std::string().max_size() : options_.max_message_bytes,
                                         o.envelopes && history_.enabled());
        auto& socket = c->socket;
        if constexpr (socket_limits_size) socket.read_message_max(options_.max_message_bytes);
        if constexpr (requires { socket.control_callback([](auto, auto) {}); }) {
            if (options_.idle_timeout > std::chrono::steady_clock::duration::zero())
                // A raw pointer: the socket lives inside the connection, so a shared one would be a cycle.
                socket.control_callback([raw = c.get()](auto, auto) { raw->heard_from_peer = true; });
        }
        return c;
    }

    connection_handle handle_of(connection& c) { return connection_handle(this, c.shared_from_this()); }

    typename registry_type::limits key_limits() const noexcept {
        return {options_.max_keys_per_connection, options_.max_connections_per_key};
    }

    /// Registers `c` with its initial keys, all or none, unless a limit or the shutdown forbids it.
    error_code try_register(const connection_ptr& c, const initial_keys<Key>& initial) {
        const auto keys = initial.keys();
        error_code refusal;
        std::exception_ptr relay_failure;
        {
            std::unique_lock lock(registry_mutex_);
            if (closing_)
                refusal = error::shutting_down;
            else if (options_.max_connections && registry_.size() >= options_.max_connections)
                refusal = error::connection_limit;
            else {
                registry_.insert(c);
                refusal = check_initial_keys(*c, keys);
                if (refusal)
                    registry_.erase(*c, [](const Key&) {});  // it has no key yet: nobody hears of it
                else
                    for (std::size_t i = 0; i < keys.size(); ++i)
                        add_key_locked(*c, keys[i], initial.since_of(i), relay_failure);
            }
        }
        if (relay_failure) report({"relay", {}, relay_failure});
        (refusal ? refused_ : connections_).fetch_add(1, std::memory_order_relaxed);
        return refusal;
    }

    /// Whether `c`, registered with no key yet, may take all of `keys`. The registry lock is held.
    error_code check_initial_keys(const connection& c, std::span<const Key> keys) const {
        std::size_t distinct = 0;
        for (std::size_t i = 0; i < keys.size(); ++i) {
            if (registry_.check(c, keys[i], key_limits()) == registry_type::add_result::key_connection_limit)
                return error::key_connection_limit;
            const KeyEqual equal;
            if (std::none_of(keys.begin(), keys.begin() + i, [&](const Key& k) { return equal(k, keys[i]); }))
                ++distinct;
        }
        if (options_.max_keys_per_connection && distinct > options_.max_keys_per_connection) return error::key_limit;
        return {};
    }

    /// Adds `key` to `c`; tells the relay of a key's first subscriber; queues the envelope's
    /// subscribed frame and the replay. The registry's unique lock is held, so no send sees half
    /// of it.
    error_code add_key_locked(connection& c, const Key& key, const since& from, std::exception_ptr& relay_failure) {
        using result = typename registry_type::add_result;
        switch (registry_.add(c, key, key_limits())) {
        case result::already: return {};
        case result::not_registered: return error::not_registered;
        case result::key_limit: return error::key_limit;
        case result::key_connection_limit: return error::key_connection_limit;
        case result::added_first: report_interest(key, true, relay_failure); break;
        case result::added: break;
        }
        start_key(c, key, from);
        return {};
    }

    /// The start of `c`'s subscription to `key`: the envelope's subscribed frame, then what the
    /// history replays. Under the registry's unique lock, so no send to `key` comes in between:
    /// the replay ends where the live messages begin.
    void start_key(connection& c, const Key& key, const since& from) {
        std::vector<message> replay;
        std::size_t bytes = 0;
        auto info = read_history(key, from, [&](const message& m, const position& at) {
            replay.push_back(c.envelopes && options_.envelope.wrap ? options_.envelope.wrap(key, m, at) : m);
            bytes += replay.back().size();
        });
        if (!replay.empty() && !c.has_room(replay.size() + 1, bytes)) {  // + 1: the subscribed frame
            replay.clear();
            info.outcome = recovery::too_many;
        }
        info.replayed = replay.size();
        if (from.asks_history())
            (info.outcome == recovery::recovered ? recovered_ : not_recovered_).fetch_add(1, std::memory_order_relaxed);
        sending s;
        if (c.envelopes && options_.envelope.subscribed) push(c, options_.envelope.subscribed(key, info), s);
        for (const auto& m : replay) push(c, m, s);
        if (s.hand_out) post_flusher(*s.hand_out);  // the registry's lock is held: no writes from here
        replayed_.fetch_add(replay.size(), std::memory_order_relaxed);
    }

    error_code add_key(connection& c, const Key& key, const since& from) {
        error_code refusal;
        std::exception_ptr relay_failure;
        {
            std::unique_lock lock(registry_mutex_);
            refusal = closing_ ? error_code(error::shutting_down) : add_key_locked(c, key, from, relay_failure);
        }
        if (relay_failure) report({"relay", {}, relay_failure});
        return refusal;
    }

    template <class K>
    bool remove_key(connection& c, const K& key) {
        std::exception_ptr relay_failure;
        bool removed = false;
        {
            std::unique_lock lock(registry_mutex_);
            removed = registry_.remove(c, key, [&](const Key& k) { report_interest(k, false, relay_failure); }) !=
                      registry_type::remove_result::not_subscribed;
        }
        if (relay_failure) report({"relay", {}, relay_failure});
        return removed;
    }

    /// Takes `c` out of the registry (idempotent) and stops its writer: `detached` leaves the
    /// socket to its owner, `aborting` drops what is queued.
    void remove(const connection_ptr& c, detail::connection_state why) noexcept {
        std::exception_ptr relay_failure;
        connection_ptr registered;  // released after the lock: it may be the last reference
        {
            std::unique_lock lock(registry_mutex_);
            registered = registry_.erase(*c, [&](const Key& k) { report_interest(k, false, relay_failure); });
        }
        if (relay_failure) report({"relay", {}, relay_failure});
        c->request_close(why, 0, {});
        c->release_work();
        try {
            post_stop(*c, teardown::none);
        } catch (...) {  // the executor is shutting down: the operations die with it
        }
    }

    /// The end of a shutdown: whatever did not leave in time is torn down and unregistered.
    void abort_all() {
        std::vector<connection_ptr> left;
        std::exception_ptr relay_failure;
        {
            std::unique_lock lock(registry_mutex_);
            left = registry_.clear([&](const Key& k) { report_interest(k, false, relay_failure); });
        }
        if (relay_failure) report({"relay", {}, relay_failure});
        for (auto& c : left) {
            c->request_close(detail::connection_state::aborting, 1001, "shutdown deadline");
            c->release_work();
            post_stop(*c, teardown::always);
        }
    }

    // ---- the send path: registry, outbox, writer ------------------------------------------------

    /// A send to one key. To many connections, the first is written to before the message goes
    /// into the other outboxes: filling a thousand outboxes takes longer than the first write
    /// (issue 15's first delivery). The lock is let go for that write, and the walk then skips
    /// the connection it has served, so that a key whose subscribers changed meanwhile still gets
    /// the message once in each connection subscribed by then. Not when send() gives positions:
    /// the history lock keeps their order, and it is held over the whole walk.
    template <class K, class MakeMessage>
    send_result send_to_key(const K& key, MakeMessage make_message) {
        sending s;
        std::shared_lock lock(registry_mutex_);
        const auto listeners = registry_.count(key);
        if (!positions_here_ && listeners == 0) return {};
        const message& m = make_message();  // built only when somebody listens or history keeps it
        std::optional<position> at;
        std::unique_lock<std::mutex> in_order;
        if (positions_here_) {  // kept whether anybody listens or not
            in_order = std::unique_lock(history_mutex_);
            at = history_.append(key, m, clock::now());
            s.result.positions.push_back(*at);
        }
        std::optional<message> wrapped;
        auto deliver = [&](connection& c, const Key& k) { push(c, framed(c, m, k, at, &wrapped), s); };
        if (positions_here_ || listeners < 2) {
            registry_.for_each(key, deliver);
            if (in_order) in_order.unlock();
            lock.unlock();
            return finish(s);
        }
        connection_ptr first;
        registry_.for_first(key, [&](connection& c, const Key& k) {
            first = c.shared_from_this();
            deliver(c, k);
        });
        lock.unlock();
        std::exception_ptr failed;
        if (auto executor = std::exchange(s.hand_out, std::nullopt)) {
            try {
                hand_out_flushes(*executor);
            } catch (...) {
                failed = std::current_exception();  // the message still goes to the others
            }
        }
        lock.lock();
        registry_.for_each(key, [&](connection& c, const Key& k) {
            if (&c != first.get()) deliver(c, k);
        });
        lock.unlock();
        if (s.hand_out) s.hand_out.emplace(first->socket.get_executor());  // where it went before
        auto result = finish(s);
        if (failed) std::rethrow_exception(failed);
        return result;
    }

    /// Gives `m` its position in each of `keys` (a key named twice gets one). The history lock is
    /// held. O(keys²) to find repeats: the lists of keys a send names are short.
    template <class Keys>
    void append_to_history(const Keys& keys, const message& m, std::vector<position>& positions) {
        const auto now = clock::now();
        std::size_t i = 0;
        for (const auto& key : keys) {
            std::size_t j = 0;
            for (const auto& earlier : keys) {
                if (j == i || same_key(earlier, key)) break;
                ++j;
            }
            positions.push_back(j < i ? positions[j] : history_.append(key, m, now));
            ++i;
        }
    }

    template <class A, class B>
    static bool same_key(const A& a, const B& b) {
        if constexpr (std::is_invocable_r_v<bool, const KeyEqual&, const A&, const B&>)
            return KeyEqual{}(a, b);
        else
            return KeyEqual{}(Key(a), Key(b));
    }

    static std::optional<position> position_at(const send_result& r, std::size_t i) {
        if (i < r.positions.size()) return r.positions[i];
        return std::nullopt;
    }

    /// Closes `key`'s connections that resume from positions, for a break in its stream: each is
    /// told so, resumes from the last position it got, and learns what can no longer be had.
    template <class K>
    void close_resumable(const K& key) {
        registry_.for_each(key, [&](connection& c, const Key&) {
            if (c.resumable)
                request_close(c, detail::connection_state::closing, 1013,
                              "missed messages: resume from the last position");
        });
    }

    /// What connection `c` gets of `m`, sent under `key` at position `at`: `m`, or its envelope,
    /// built once per send and key into `*wrapped`.
    const message& framed(const connection& c, const message& m, const Key& key, const std::optional<position>& at,
                          std::optional<message>* wrapped) {
        if (!c.envelopes || !options_.envelope.wrap) return m;
        if (!*wrapped) *wrapped = options_.envelope.wrap(key, m, at);
        return **wrapped;
    }

    static publish_result sent_here(send_result r) {
        auto at = std::move(r.positions);
        r.positions.clear();  // one place for them: a moved-from vector is only valid, not empty
        return {{}, false, std::move(r), std::move(at)};
    }

    publish_result relayed(std::span<const Key> keys, const message& m) {
        const auto refused = options_.relay->publish(keys, m);
        return {refused, !refused, {}, {}};
    }

    void record(const send_result& r) noexcept {
        if (r.queued) {
            messages_.fetch_add(1, std::memory_order_relaxed);
            deliveries_.fetch_add(r.queued, std::memory_order_relaxed);
        }
        if (r.closed) overflow_closes_.fetch_add(r.closed, std::memory_order_relaxed);
    }

    /// A send under way: what it did, and the executor of the connection whose wake-up started the
    /// flush hand-out, if one did.
    struct sending {
        send_result result;
        std::optional<typename Socket::executor_type> hand_out;
    };

    /// The end of a send, with no lock held: the send hands out the flushes it started itself
    /// rather than posting the hand-out, so that its first writes leave before it returns, with
    /// no wake-up in between (the first delivery and a targeted push's latency, issue 15).
    send_result finish(sending& s) {
        record(s.result);
        if (s.hand_out) hand_out_flushes(*s.hand_out);
        return std::move(s.result);
    }

    /// Puts `m` in one outbox and counts what happened.
    void push(connection& c, const message& m, sending& s) {
        auto& result = s.result;
        const auto r = c.push(m);
        if (!r.open) return;
        if (r.offer.overflowed) {
            ++result.closed;
        } else if (!r.offer.queued || r.offer.evicted) {
            ++result.dropped;
            dropped_.fetch_add(r.offer.queued ? r.offer.evicted : 1, std::memory_order_relaxed);
        }
        if (r.offer.queued) ++result.queued;
        if (r.wake && queue_flush(c)) s.hand_out.emplace(c.socket.get_executor());
        if (r.offer.overflowed) post_overflow_close(c);
    }

    void request_close(connection& c, detail::connection_state how, std::uint16_t code, std::string_view text) {
        if (c.request_close(how, code, text)) post_flush(c);
    }

    /// Starts the connection's writer (it writes whatever was queued meanwhile) and, with an idle
    /// timeout, its watchdog.
    void start_writer(const connection_ptr& c) {
        if (c->start_writer()) post_flush(*c);
        if (options_.idle_timeout > std::chrono::steady_clock::duration::zero())
            net::dispatch(c->socket.get_executor(), [this, c] { watch(c, false); });  // the timer lives on it
    }

    /// Queues a flush of `c`. Flushes are handed out in small chunks: the first by the send that
    /// queued them (finish()) or here, posted; each further chunk posted behind whatever else is
    /// waiting (reads, new pushes): a send to many connections then does not hold everything else
    /// back for a whole round of writes, and what is sent during the round leaves in one write per
    /// connection. Each flush is dispatched to its connection's executor: run at once where that
    /// may be (its strand idle, on a thread of its io_context), else queued there.
    void post_flush(connection& c) {
        if (queue_flush(c)) post_flusher(c.socket.get_executor());
    }

    /// Puts `c` in line for a flush; true if no hand-out was under way, so the caller must start one.
    bool queue_flush(connection& c) {
        std::lock_guard lock(flushes_->mutex);
        flushes_->due.push_back(c.weak_from_this());  // weak: a connection that dies meanwhile is skipped
        return !std::exchange(flushes_->running, true);
    }

    static constexpr std::size_t flush_chunk = 16;

    /// The hand-out goes on the executor of the connection that started it. If that executor's
    /// io_context goes away with the hand-out still queued, the connections it would have flushed
    /// are told, so their next push schedules a flush again. (Only the queue is touched then: the
    /// io_context may be going away after the manager.)
    void post_flusher(const typename Socket::executor_type& executor) {
        net::post(executor, detail::run_or_drop([this, executor] { hand_out_flushes(executor); },
                                                [queue = flushes_] { queue->dropped(); }));
    }

    void hand_out_flushes(const typename Socket::executor_type& executor) {
        std::weak_ptr<connection> chunk[flush_chunk];
        std::size_t n = 0;
        bool more = false;
        {
            std::lock_guard lock(flushes_->mutex);
            auto& due = flushes_->due;
            for (; n < flush_chunk && !due.empty(); ++n) {
                chunk[n] = std::move(due.front());
                due.pop_front();
            }
            more = flushes_->running = !due.empty();
        }
        // A flush that cannot be queued (its allocation fails) is told, by run_or_drop, so that
        // its connection's next push schedules it again; the rest of the chunk and the next one
        // must still go out, or they would wait for good. Then the caller learns of it.
        std::exception_ptr failed;
        for (std::size_t i = 0; i < n; ++i) {
            auto c = chunk[i].lock();
            if (!c) continue;
            try {
                net::dispatch(c->socket.get_executor(),
                              detail::run_or_drop([this, c] { flush(c); }, [c] { c->flush_dropped(); }));
            } catch (...) {
                if (!failed) failed = std::current_exception();
            }
        }
        if (more) post_flusher(executor);  // if it throws, the queue was dropped: everyone in it told
        if (failed) std::rethrow_exception(failed);
    }

    /// The most frames one write takes: what Asio hands the kernel in one writev.
    static constexpr std::size_t max_batch = 64;

    /// The connection's only writer, run on its executor: one write in flight at a time, in outbox
    /// order. It writes every queued message (up to max_batch) in one write when the socket is
    /// over a batching_stream, else the oldest one; then, once the outbox is empty and a close was
    /// asked for, the close frame.
    void flush(const connection_ptr& c) noexcept {
        constexpr bool frames = detail::writes_frame_batches<Socket>;
        try {
            auto next = c->take_next_write(max_batch, frames);
            if (next.what == next.nothing) return;
            if (next.what == next.close) return send_close(c, next.code, next.reason, next.overflowed);
            auto done = [this, c](const error_code& ec, std::size_t) { written(c, ec); };
            if constexpr (frames) {
                c->socket.next_layer().async_write_some(c->batch, std::move(done));
            } else {
                if constexpr (requires { c->socket.binary(true); }) c->socket.binary(next.binary);
                c->socket.async_write(c->batch.front(), std::move(done));
            }
        } catch (...) {
            report({"writer", {}, std::current_exception()});
            detail::abort_socket(c->socket);
            remove(c, detail::connection_state::aborting);
        }
    }

    /// A write completed. After an error the socket is torn down: a connection whose write failed
    /// cannot be closed politely, and its read loop must end too.
    void written(const connection_ptr& c, const error_code& ec) noexcept {
        c->written(static_cast<bool>(ec));
        ++c->writes_completed;
        if (!ec) return flush(c);
        if (!detail::is_expected_ending(ec)) report({"write", ec, {}});
        detail::abort_socket(c->socket);
        remove(c, detail::connection_state::aborting);
    }

    /// The close frame, once everything queued is written (closing) or dropped (aborting).
    void send_close(const connection_ptr& c, std::uint16_t code, std::string_view text, bool overflowed) {
        if constexpr (detail::closes_with_reason<Socket>) {
            c->socket.async_close(detail::make_close_reason<Socket>(code, text),
                                  [this, c, overflowed](const error_code& ec) {
                                      if (!detail::is_expected_ending(ec)) report({"close", ec, {}});
                                      // A connection closed by close_all() stays registered until its
                                      // peer's answer ends the read loop; one closed on overflow has
                                      // left already, and its close deadline is over.
                                      if (overflowed) end_close_deadline(*c);
                                  });
        } else if (overflowed) {
            remove(c, detail::connection_state::aborting);
        }
    }

    enum class teardown {
        none,        // the writer sees the new state and ends (unsubscribe, write error)
        if_writing,  // a write still in flight belongs to a peer that is not reading
        always,      // end of a shutdown: no more waiting
    };

    /// The one way to stop a connection from outside: on its executor (its timer and socket may be
    /// touched only there), tear the socket down as asked and stop the watchdog, unless the
    /// watchdog now guards a close handshake. Idempotent.
    void post_stop(connection& c, teardown how) {
        net::post(c.socket.get_executor(), [c = c.shared_from_this(), how] {
            if (how == teardown::always || (how == teardown::if_writing && c->writing()))
                detail::abort_socket(c->socket);
            if (!c->close_deadline) c->watchdog.cancel();
        });
    }

    /// The close policy closed `c`: on its executor, it leaves the manager at once (nothing more
    /// is sent to it, and it no longer counts against any limit); a write stuck on the peer is
    /// torn down, else the close handshake gets options::close_timeout.
    void post_overflow_close(connection& c) {
        net::post(c.socket.get_executor(), [this, c = c.shared_from_this()] {
            remove(c, detail::connection_state::aborting);
            if (c->writing() || options_.close_timeout <= std::chrono::steady_clock::duration::zero())
                return detail::abort_socket(c->socket);
            c->close_deadline = true;
            c->watchdog.expires_after(options_.close_timeout);
            c->watchdog.async_wait([c](const error_code& ec) {
                if (!ec && c->close_deadline) detail::abort_socket(c->socket);
            });
        });
    }

    /// On the socket's executor: the connection is over, nothing waits for its close any more.
    static void end_close_deadline(connection& c) {
        c.close_deadline = false;
        c.watchdog.cancel();
    }

    /// Liveness: a peer not heard from for the idle period is torn down (its read loop then ends
    /// and unregisters it). Where the socket can ping, a peer silent for half the period is
    /// pinged first, and its pong counts. A chain of timer callbacks rather than a coroutine: it
    /// holds no frame while it waits, which matters with many idle connections.
    void watch(connection_ptr c, bool pinged) {
        constexpr bool can_ping = requires { c->socket.async_ping({}, [](const error_code&) {}); };
        auto& timer = c->watchdog;
        timer.expires_after(can_ping ? options_.idle_timeout / 2 : options_.idle_timeout);
        timer.async_wait([this, c = std::move(c), pinged](const error_code&) mutable {
            const auto state = c->state();
            if (state == detail::connection_state::detached || state == detail::connection_state::aborting ||
                c->close_deadline)
                return;
            // n checks in a row that find the same write stuck span n - 1 periods: a whole idle
            // timeout is 3 checks half a period apart, or 2 a whole period apart.
            if (write_stuck(*c) >= (can_ping ? 3 : 2)) {
                detail::abort_socket(c->socket);
                return remove(c, detail::connection_state::aborting);
            }
            if (std::exchange(c->heard_from_peer, false)) return watch(std::move(c), false);
            if constexpr (can_ping) {
                if (!pinged) {
                    // Not awaited: a ping waits behind a write stuck on a peer that stopped reading,
                    // and the clock must keep running for that peer too.
                    if (!std::exchange(c->ping_in_flight, true))
                        c->socket.async_ping({}, [c](const error_code&) { c->ping_in_flight = false; });
                    return watch(std::move(c), true);
                }
            } else {
                (void)pinged;
            }
            detail::abort_socket(c->socket);
            remove(c, detail::connection_state::aborting);
        });
    }

    /// For the watchdog: how many of its checks in a row found a write in flight that made no
    /// progress since the check before. A peer that sends now and then (a pong) but never reads
    /// would otherwise look alive for ever under the drop policies.
    static unsigned write_stuck(connection& c) {
        std::uint64_t progress = c.writes_completed;
        if constexpr (requires { c.socket.next_layer().write_progress(); })
            progress += c.socket.next_layer().write_progress();
        const bool stuck = c.writing() && progress == c.progress_seen;
        c.progress_seen = progress;
        c.stuck_checks = stuck ? static_cast<std::uint8_t>(c.stuck_checks + 1) : 0;
        return c.stuck_checks;
    }

    /// Tells the relay, if any, that `key` got its first connection or lost its last. Called under
    /// the registry's unique lock, so the relay sees a key's changes in the order they happened.
    /// A failure is handed back, to be reported once the lock is released (on_error may query us).
    void report_interest(const Key& key, bool needed, std::exception_ptr& failure) noexcept {
        if (!options_.relay) return;
        try {
            options_.relay->interest(key, needed);
        } catch (...) {
            failure = std::current_exception();
        }
    }

    void report(const error_event& e) noexcept {
        errors_.fetch_add(1, std::memory_order_relaxed);
        try {
            options_.on_error(e);
        } catch (...) {  // a throwing error hook must not take the writer down with it
        }
    }

    // ---- the endpoint --------------------------------------------------------------------------

    /// The endpoint, as an Asio composed operation: admission, registration, the handshake (when
    /// there is a request), then the writer and the read loop. A state machine rather than a
    /// coroutine: while it waits for a peer (most peers of a fan-out server never speak) it is just
    /// this state, held by the pending read, with no coroutine frames. Every step runs on the
    /// socket's executor; the completion on the handler's.
    template <class Request, class OnMessage>
    struct endpoint_op {
        enum class step { begin, start, admitted, prepared, handshaken, refusal_closed, reading, too_big_closed, done };

        endpoint_op(ConnectionManager* m, connection_ptr conn, Request r, initial_keys<Key> k, OnMessage f)
            : manager(m),
              c(std::move(conn)),
              setup(new upgrade{std::move(r), {}, std::move(k)}),
              on_message(std::move(f)) {}

        ConnectionManager* manager;
        connection_ptr c;
        // On the heap: the admission hook and the handshake see them at an address that stays put
        // while this state moves from one pending operation to the next. Freed after the handshake.
        struct upgrade {
            Request request;
            upgrade_request seen;  // what the admission hook is shown of `request`
            initial_keys<Key> keys;
            std::size_t admitted = 0;  // keys the admission hook has said yes to
        };
        std::unique_ptr<upgrade> setup;
        OnMessage on_message;
        step at = step::begin;
        bool preparing = false;  // the relay was asked to prepare the keys: it is told when to let go
        error_code refusal;
        std::string reason;          // a refusal's, for its close frame
        subscription sub;            // unregisters on every way out
        std::size_t limit = 0;       // of the read in flight
        std::exception_ptr failure;  // the completion's, once at step::done
        error_code ended;

        // Most peers of a fan-out server never speak, and a whole-message read reserves a full
        // frame's worth (1.5 KiB with Beast) before a byte arrives. Where the socket can read part
        // of a message (Beast's read_some with a limit), the first read of each message asks for a
        // few bytes only, as many as the read string holds without allocating (15 in libstdc++'s
        // short-string storage: 64 made every idle connection allocate 65 bytes); the rest of the
        // message is read at full size.
        static constexpr bool reads_parts = requires(Socket& s, detail::read_buffer& b) {
            s.async_read_some(b, std::size_t{}, [](const error_code&, std::size_t) {});
            { s.is_message_done() } -> std::convertible_to<bool>;
        };
        static constexpr std::size_t first_read = 15, large_buffer = 16 * 1024;

        /// The admission hook's verdict on one initial key.
        template <class Self>
        void operator()(Self& self, std::exception_ptr e, admission verdict) {
            if (e) {
                finish(self, e, {});
                return complete_on_handler_executor(self);
            }
            if (!verdict.admitted) {
                refusal = error::not_admitted;
                reason = std::move(verdict.reason);
                manager->refused_.fetch_add(1, std::memory_order_relaxed);
            } else {
                ++setup->admitted;
            }
            at = step::start;
            (*this)(self);
        }

        template <class Self>
        void operator()(Self& self, error_code ec = {}, std::size_t = 0) {
            if (at == step::done) return self.complete(failure, ended);
            try {
                step_on(self, ec);
            } catch (...) {  // from on_message or an initiating function: ends the connection
                finish(self, std::current_exception(), {});
            }
            // Outside the try, so that a completion handler that throws is not completed again.
            complete_on_handler_executor(self);
        }

    private:
        // The next step, on the socket's executor. It moves this state, so every other argument of
        // the call it is passed to must be read into a local first.
        template <class Self>
        auto on_socket(Self& self) {
            return net::bind_executor(c->socket.get_executor(), std::move(self));
        }

        /// Unregisters now (rather than whenever the caller's handler is done) and keeps the
        /// result for the completion.
        template <class Self>
        void finish(Self&, std::exception_ptr e, error_code ec) {
            setup.reset();
            sub = subscription();
            if (c->close_deadline) detail::abort_socket(c->socket);  // its reads are over: so is its close
            end_close_deadline(*c);
            failure = e;
            ended = ec;
            at = step::done;
        }

        /// Once finished (and `self` not handed to another operation), completes on the completion
        /// handler's executor: dispatched there, since the steps run on the socket's.
        template <class Self>
        void complete_on_handler_executor(Self& self) {
            if (at != step::done) return;
            auto executor = self.get_executor();
            net::dispatch(executor, std::move(self));
        }

        template <class Self>
        void step_on(Self& self, error_code ec) {
            auto& socket = c->socket;
            switch (at) {
            case step::begin:  // never run inline in the initiating function: posted to the socket's executor
                at = step::start;
                return net::post(on_socket(self));
            case step::start: {
                const auto keys = setup->keys.keys();
                if (manager->options_.admit && !refusal && setup->admitted < keys.size()) {
                    if constexpr (std::is_constructible_v<upgrade_request, const Request&>)
                        setup->seen = upgrade_request(setup->request);
                    auto executor = socket.get_executor();
                    auto verdict = manager->options_.admit(keys[setup->admitted], setup->seen);
                    return net::co_spawn(executor, std::move(verdict), on_socket(self));
                }
                at = step::admitted;
                [[fallthrough]];
            }
            case step::admitted:
                at = step::prepared;
                if (!refusal && manager->options_.relay && !setup->keys.keys().empty()) {
                    preparing = true;
                    const auto keys = setup->keys.keys();  // on the heap: stays put
                    auto* m = manager;
                    return m->prepare_keys(keys, on_socket(self));
                }
                [[fallthrough]];
            case step::prepared:
                if (ec && !refusal) {  // the broker cannot confirm the keys: try again later
                    refusal = error::relay_unavailable;
                    manager->refused_.fetch_add(1, std::memory_order_relaxed);
                }
                ec = {};
                if (!refusal) refusal = manager->try_register(c, setup->keys);
                if (preparing) manager->options_.relay->release(setup->keys.keys());
                if (!refusal) sub = subscription(manager, c);
                at = step::handshaken;
                if constexpr (!std::is_same_v<Request, detail::no_request>) {
                    const Request& upgrade = setup->request;  // on the heap: stays put
                    return socket.async_accept(upgrade, on_socket(self));
                }
                [[fallthrough]];
            case step::handshaken:
                setup.reset();
                if (ec) return finish(self, {}, ec);  // a failed handshake is the client's problem: no log line
                if (refusal) {
                    if (reason.empty()) reason = refusal.message();
                    at = step::refusal_closed;
                    if constexpr (detail::closes_with_reason<Socket>) {
                        const auto close_reason = detail::make_close_reason<Socket>(
                            close_code_for(static_cast<error>(refusal.value())), reason);
                        return socket.async_close(close_reason, on_socket(self));
                    }
                    return finish(self, {}, refusal);
                }
                manager->start_writer(c);
                at = step::reading;
                return read(self, first_read);
            case step::refusal_closed: return finish(self, {}, refusal);
            case step::reading: return on_read(self, ec);
            case step::too_big_closed: return finish(self, {}, net::error::message_size);
            case step::done: return;  // handled by operator()
            }
        }

        template <class Self>
        void read(Self& self, std::size_t next_limit) {
            limit = next_limit;
            auto& socket = c->socket;
            auto& buffer = c->read_buffer;
            if constexpr (reads_parts)
                socket.async_read_some(buffer, next_limit, on_socket(self));
            else
                socket.async_read(buffer, on_socket(self));
        }

        template <class Self>
        void on_read(Self& self, error_code ec) {
            auto& buffer = c->read_buffer;
            if (!ec) {
                if constexpr (reads_parts) {
                    if (!c->socket.is_message_done())
                        return read(self, buffer.max_size() - buffer.size());  // the rest, at full size
                }
                c->heard_from_peer = true;
                deliver(std::string_view(c->read_storage.data(), buffer.size()));
                buffer.consume(buffer.size());
                if (c->read_storage.capacity() > large_buffer)
                    std::string().swap(c->read_storage);  // one big message is no reason to keep its buffer
                return read(self, first_read);
            }
            if (!detail::is_expected_ending(ec)) manager->report({"read", ec, {}});
            if constexpr (!socket_limits_size && detail::closes_with_reason<Socket>) {
                if (ec == net::error::message_size) {
                    at = step::too_big_closed;
                    auto& socket = c->socket;
                    return socket.async_close(detail::make_close_reason<Socket>(1009, "message too big"),
                                              on_socket(self));
                }
            }
            finish(self, {}, ec);
        }

        void deliver(std::string_view data) {
            if constexpr (std::invocable<OnMessage&, connection_handle&, std::string_view, bool>) {
                bool binary = false;
                if constexpr (requires { c->socket.got_binary(); }) binary = c->socket.got_binary();
                auto handle = manager->handle_of(*c);
                on_message(handle, data, binary);
            } else {
                on_message(data);
            }
        }
    };

    /// Asks the relay to prepare `keys` (relay::prepare()); `handler(error_code)` runs on its own
    /// executor once it has.
    template <class Handler>
    void prepare_keys(std::span<const Key> keys, Handler handler) {
        options_.relay->prepare(keys, detail::completion<Handler, error_code>(std::move(handler)));
    }

    template <class Request, class OnMessage, class CompletionToken>
    auto start_endpoint(connection_ptr c, Request request, initial_keys<Key> keys, OnMessage on_message,
                        CompletionToken&& token) {
        auto executor = c->socket.get_executor();
        return net::async_compose<CompletionToken, void(std::exception_ptr, error_code)>(
            endpoint_op<Request, OnMessage>{this, std::move(c), std::move(request), std::move(keys),
                                            std::move(on_message)},
            token, executor);
    }

    options_type options_;
    mutable std::shared_mutex registry_mutex_;
    registry_type registry_;  // guarded by registry_mutex_
    bool closing_ = false;    // shutdown() has begun; guarded by registry_mutex_

    /// Connections waiting for a flush, oldest first, and whether hand_out_flushes() is posted or
    /// running. Shared with the posted hand-out, which may be destroyed after the manager.
    struct flush_queue {
        std::mutex mutex;  // guards the two below
        std::deque<std::weak_ptr<connection>> due;
        bool running = false;

        void dropped() noexcept {
            std::deque<std::weak_ptr<connection>> lost;
            {
                std::lock_guard lock(mutex);
                lost.swap(due);
                running = false;
            }
            for (auto& w : lost)
                if (auto c = w.lock()) c->flush_dropped();
        }
    };
    std::shared_ptr<flush_queue> flushes_ = std::make_shared<flush_queue>();
    // What every outbox holds; shared with them, since a connection may outlive the manager.
    detail::outbox::shared_total queued_ = std::make_shared<detail::queued_total>();

    mutable std::mutex history_mutex_;  // taken after registry_mutex_, never before
    history_type history_{options_.history, options_.relay&& options_.relay->positions()};  // history_mutex_
    // send() gives positions: history on, and no relay that positions messages itself.
    const bool positions_here_ = history_.enabled() && !history_.mirrors();

    std::atomic<std::uint64_t> connections_{0}, refused_{0}, messages_{0}, deliveries_{0}, dropped_{0},
        overflow_closes_{0}, errors_{0}, recovered_{0}, not_recovered_{0}, replayed_{0};
};

}  // namespace WSBROADCAST_ABI_NAMESPACE
}  // namespace wsbroadcast

#endif  // WSBROADCAST_HPP
