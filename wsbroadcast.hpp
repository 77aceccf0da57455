// wsbroadcast.hpp - WebSocket fan-out for C++20 and Asio, in one header.
//
// A ConnectionManager keeps WebSocket connections registered under keys (an invoice id, a user, a
// room) and delivers a message to every connection under a key, or to all of them, without ever
// waiting on a peer. It is the "connection manager" pattern of the LNbits docs, done properly:
// a message is stored once and shared by all its recipients, each connection has its own bounded,
// ordered outbox and its own writer, and a slow or failing peer costs only itself.
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
//   - send(), broadcast(), close_all(), the queries and subscription::unsubscribe() may be called from
//     any thread and any coroutine, concurrently. They never block on I/O and never await a peer:
//     they take a short lock, push a shared pointer into each recipient's outbox and wake its writer.
//   - Every operation on a socket (reads, writes, closes) runs on the socket's executor. Give each
//     socket a strand (Beast: make_strand(ioc)) when the io_context runs on more than one thread.
//   - Messages to one connection are written in the order send() was called for it. Messages sent
//     concurrently from two threads are ordered by whichever call takes the registry lock first.
//   - The manager must outlive every connection it manages: declare it before the io_context, so
//     the io_context (and the coroutines it owns) are destroyed first.
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

#include <atomic>
#include <chrono>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <iostream>
#include <memory>
#include <mutex>
#include <shared_mutex>
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
    case error::not_admitted: return 1008;       // policy violation
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

/// Reads one whole message per call into a dynamic buffer.
template <class T>
concept reads_messages =
    requires(T& t, net::dynamic_string_buffer<char, std::char_traits<char>, std::allocator<char>>& buffer,
             error_code& ec) { t.async_read(buffer, net::redirect_error(net::use_awaitable, ec)); };

/// What ConnectionManager needs of a socket: an executor and a message write.
template <class T>
concept message_socket = std::move_constructible<T> && has_executor<T> && writes_messages<T>;

/// What ConnectionManager::serve() needs on top: a message read.
template <class T>
concept readable_message_socket = message_socket<T> && reads_messages<T>;

/// Completes a server handshake from an upgrade request it was given (Beast's
/// websocket::stream::async_accept(request, token) is the model).
template <class T, class Request>
concept accepts_upgrade = requires(T& t, const Request& request, error_code& ec) {
    t.async_accept(request, net::redirect_error(net::use_awaitable, ec));
};

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

/// A broker between server instances (Redis pub/sub, NATS, ...), for running several instances
/// over one keyspace. The manager tells it which keys this instance needs; publish() hands it a
/// message; it brings back every message published on a needed key, by any instance including
/// this one, and delivers it here with ConnectionManager::send(), once per instance. This header
/// has no broker in it: implementations live with the application (example/redis_relay.hpp).
template <class Key>
class relay {
public:
    virtual ~relay() = default;
    /// `key` got its first local connection (`needed`) or lost its last. Called in order, under
    /// the manager's registry lock, on whichever thread registered or removed: queue the work and
    /// return; never block, never call back into the manager.
    virtual void interest(const Key& key, bool needed) = 0;
    /// Takes `m` for every instance that needs `key`, or fails at once (error::relay_unavailable)
    /// when the broker cannot take it now. Called from any thread.
    virtual error_code publish(const Key& key, const message& m) = 0;
};

/// Limits of one connection's outbox and what happens when a send finds it full. A message counts
/// its full size in every outbox that holds it, because each outbox keeps it alive.
struct outbox_options {
    std::size_t max_bytes = WSBROADCAST_DEFAULT_MAX_QUEUED_BYTES;
    std::size_t max_messages = WSBROADCAST_DEFAULT_MAX_QUEUED_MESSAGES;
    overflow_policy on_overflow = overflow_policy::close;
    /// 1008 (policy violation): the peer did not read fast enough. RFC 6455 section 7.4.1.
    std::uint16_t close_code = 1008;
};

/// What an admission hook decides about a connection, before it is registered.
struct admission {
    bool admitted = true;
    std::string reason;  ///< sent in the close frame (1008) of a refusal; at most 123 bytes are sent

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
    /// Limits on registered connections (0: no limit). A connection over a limit is refused with
    /// close 1013 and error::connection_limit / error::key_connection_limit.
    std::size_t max_connections = 0;
    std::size_t max_connections_per_key = 0;
    /// The largest message a client may send; a larger one closes the connection with 1009.
    std::size_t max_message_bytes = WSBROADCAST_DEFAULT_MAX_MESSAGE_BYTES;
    /// Liveness (0: off): a peer heard nothing from for this long is torn down and unregistered.
    /// After half of it in silence the peer is pinged (when the socket has async_ping, as Beast's
    /// does); its pong counts as hearing from it (seen through the socket's control_callback).
    std::chrono::steady_clock::duration idle_timeout{};
    /// Decides, before registration, whether a connection under this key may join; it also sees
    /// the upgrade request when accept_and_serve() has one. serve() and accept_and_serve() call it
    /// on the socket's executor; a rejection closes with 1008 and the admission's reason.
    std::function<net::awaitable<admission>(const Key&, const upgrade_request&)> admit;
    /// Set for scale-out: publish() goes through it and interest in keys is reported to it.
    /// Null (the default): publish() is send(), and the registry pays nothing.
    std::shared_ptr<wsbroadcast::relay<Key>> relay;
    /// Unexpected errors. Normal endings (peer closed, eof, cancelled) are never reported.
    /// The default writes one line to std::cerr. Called on the socket's executor.
    std::function<void(const error_event&)> on_error;
};

/// What one send() or broadcast() did, counted in connections.
struct send_result {
    std::size_t queued = 0;   ///< the message is in this many outboxes
    std::size_t dropped = 0;  ///< outbox full: the new message (drop_newest) or older ones (drop_oldest) dropped
    std::size_t closed = 0;   ///< outbox full and policy close closed the connection
};

/// What one publish() did.
struct publish_result {
    error_code error;      ///< the relay refused the message: nothing was sent anywhere
    bool relayed = false;  ///< the relay took it; this instance delivers it when it comes back
    send_result local;     ///< with no relay: what send() did here
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

    batching_stream(batching_stream&&) = default;
    batching_stream& operator=(batching_stream&&) = default;

    NextLayer& next_layer() noexcept { return next_; }
    const NextLayer& next_layer() const noexcept { return next_; }
    executor_type get_executor() noexcept { return next_.get_executor(); }

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
                if (!busy_) {
                    busy_ = true;
                    write(b, std::move(handler));
                    return;
                }
                // Rare: the WebSocket stream writes a control frame while a batch is on its way.
                auto w = std::make_unique<queued<handler_type>>(std::move(handler));
                for (auto it = net::buffer_sequence_begin(b); it != net::buffer_sequence_end(b); ++it)
                    w->buffers.emplace_back(*it);
                waiting_.push_back(std::move(w));
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

    template <class ConstBuffers, class Handler>
    void write(const ConstBuffers& buffers, Handler&& handler) {
        net::async_write(
            next_, buffers, [this, handler = std::move(handler)](const error_code& ec, std::size_t n) mutable {
                start_next();
                // On the handler's own executor (normally this strand: then at once).
                auto ex = net::get_associated_executor(handler, next_.get_executor());
                net::dispatch(ex, [handler = std::move(handler), ec, n]() mutable { std::move(handler)(ec, n); });
            });
    }

    void start_next() {
        if (waiting_.empty()) {
            busy_ = false;
            return;
        }
        auto next = std::move(waiting_.front());
        waiting_.erase(waiting_.begin());
        next->start(*this);
    }

    NextLayer next_;
    bool busy_ = false;
    std::vector<std::unique_ptr<queued_write>> waiting_;  // a vector: empty, it allocates nothing
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

// ==== DETAIL =================================================================================

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

/// Fills a close frame: with a reason text where the socket's close type has one (Beast's
/// close_reason), else the bare code.
template <class Socket>
auto make_close_reason(std::uint16_t code, std::string_view text) {
    if constexpr (requires(Socket& s) { s.reason(); }) {
        std::remove_cvref_t<decltype(std::declval<Socket&>().reason())> reason{code};
        if constexpr (requires { reason.reason = text; }) reason.reason = text;
        return reason;
    } else {
        return code;
    }
}

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

/// What serve() reads a client's messages into.
using read_buffer = net::dynamic_string_buffer<char, std::char_traits<char>, std::allocator<char>>;

/// serve() has no upgrade request to answer.
struct no_request {};

enum class connection_state {
    open,      // accepting messages
    closing,   // write what is queued, then send a close frame
    aborting,  // outbox overflowed: drop what is queued, close now
    detached,  // unsubscribed: the writer stops, the socket is left to its owner
};

/// A connection's outbox: a ring of messages. It allocates nothing until the first message and
/// gives its storage back once drained (std::deque allocates 576 bytes up front, and an idle
/// connection has nothing queued most of its life).
class message_ring {
public:
    bool empty() const noexcept { return count_ == 0; }
    std::size_t size() const noexcept { return count_; }
    message& operator[](std::size_t i) noexcept { return slots_[(head_ + i) & (capacity_ - 1)]; }
    message& front() noexcept { return (*this)[0]; }
    message& back() noexcept { return (*this)[count_ - 1]; }

    void push_back(const message& m) {
        if (count_ == capacity_) grow();
        ++count_;
        back() = m;
    }
    void pop_front() noexcept {
        front() = message();
        head_ = (head_ + 1) & (capacity_ - 1);
        if (--count_ == 0) release();
    }
    void pop_back() noexcept {
        back() = message();
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
        auto slots = std::make_unique<message[]>(capacity);
        for (std::size_t i = 0; i < count_; ++i) slots[i] = std::move((*this)[i]);
        slots_ = std::move(slots);
        capacity_ = capacity;
        head_ = 0;
    }
    void release() noexcept {
        slots_.reset();
        capacity_ = head_ = 0;
    }

    std::unique_ptr<message[]> slots_;
    std::size_t capacity_ = 0, head_ = 0, count_ = 0;
};

template <class T>
inline constexpr bool is_batching_stream = false;
template <class NextLayer>
inline constexpr bool is_batching_stream<batching_stream<NextLayer>> = true;

/// A WebSocket stream over a batching_stream: the manager writes its frames in batches, itself.
template <class Socket>
concept writes_frame_batches =
    requires(Socket& s) { requires is_batching_stream<std::remove_cvref_t<decltype(s.next_layer())>>; };

enum class writer_state {
    unstarted,  // registered, handshake not done yet: pushes only queue (see start_writer)
    idle,       // nothing to write; the next push schedules a flush
    scheduled,  // a flush is on its way to the socket's executor
    writing,    // a write (or the close frame) is in flight
};

/// One registered socket: its outbox and the state its writer needs. Shared by the registry,
/// the writer's pending handler and the subscription handle; it dies with the last of them.
template <class Socket, class Key>
struct connection : std::enable_shared_from_this<connection<Socket, Key>> {
    connection(Socket&& s, Key k, const outbox_options& o, std::size_t max_message_bytes)
        : socket(std::move(s)), key(std::move(k)), limits(o), read_buffer(read_storage, max_message_bytes) {}

    Socket socket;
    const Key key;
    const outbox_options limits;
    std::size_t slot = npos;  // index in the registry's vector for `key`; guarded by the registry lock
    static constexpr std::size_t npos = static_cast<std::size_t>(-1);

    // Touched only on the socket's executor.
    net::steady_timer watchdog{socket.get_executor()};  // liveness: see ConnectionManager::watch
    bool heard_from_peer = false;                       // a message or a control frame arrived since the last check
    bool ping_in_flight = false;                        // the watchdog's ping has not completed yet
    std::vector<net::const_buffer> batch;               // the frames being written; empty when idle
    std::string read_storage;                           // serve(): the message being read, here
    detail::read_buffer read_buffer;                    // because the pending read refers to them

    std::mutex mutex;  // guards everything below
    // A registered connection keeps its io_context running, even with nothing in flight: sends
    // may come at any time. Released when it leaves the manager.
    net::executor_work_guard<typename Socket::executor_type> keep_running{socket.get_executor()};
    message_ring outbox;
    std::size_t queued_bytes = 0;
    std::size_t in_flight = 0;  // the first in_flight messages are being written and must not be dropped
    writer_state writer = writer_state::unstarted;
    connection_state state = connection_state::open;
    std::uint16_t close_code = 0;
    std::string close_text;  // an owned copy: the caller's reason may not outlive the close
};

}  // namespace detail

// ==== CONNECTION MANAGER =====================================================================

template <message_socket Socket, class Key = std::string, class Hash = default_hash<Key>,
          class KeyEqual = std::equal_to<>>
    requires hashable_key<Key, Hash, KeyEqual>
class ConnectionManager {
    using connection = detail::connection<Socket, Key>;
    using connection_ptr = std::shared_ptr<connection>;

public:
    using socket_type = Socket;
    using key_type = Key;

    /// RAII registration of one socket under one key. Destroying it, or calling unsubscribe(),
    /// removes the connection from the manager; its socket stays open for its owner.
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

        /// Safe to call from any thread, more than once.
        void unsubscribe() noexcept {
            if (manager_ && connection_) manager_->remove(connection_, detail::connection_state::detached);
            manager_ = nullptr;
        }

        /// The registered socket. Use it only on its own executor.
        Socket& socket() const noexcept { return connection_->socket; }
        const Key& key() const noexcept { return connection_->key; }
        explicit operator bool() const noexcept { return manager_ != nullptr; }

    private:
        friend class ConnectionManager;
        subscription(ConnectionManager* m, connection_ptr c) : manager_(m), connection_(std::move(c)) {}

        ConnectionManager* manager_ = nullptr;
        connection_ptr connection_;
    };

    using options_type = wsbroadcast::options<Key>;

    explicit ConnectionManager(options_type opts = {}) : options_(std::move(opts)) {
        if (!options_.on_error) options_.on_error = detail::log_to_stderr;
    }
    ConnectionManager(const ConnectionManager&) = delete;
    ConnectionManager& operator=(const ConnectionManager&) = delete;

    // ---- registration ------------------------------------------------------------------------

    /// Registers `ws` under `key` and starts its writer on the socket's executor. The connection
    /// receives every message sent to `key` until the subscription is dropped, the writer fails,
    /// or the outbox overflows under the close policy. Reading from the socket stays the caller's
    /// job (serve() does it for you). The connection limits apply, the admission hook does not
    /// (it is asynchronous): a refusal throws system_error with a wsbroadcast::error and drops `ws`.
    [[nodiscard]] subscription subscribe(Socket ws, Key key) {
        return subscribe(std::move(ws), std::move(key), options_.outbox);
    }

    /// The same, with this connection's own outbox limits and overflow policy.
    [[nodiscard]] subscription subscribe(Socket ws, Key key, const outbox_options& outbox) {
        auto c = make_connection(std::move(ws), std::move(key), outbox);
        if (const auto refusal = try_register(c)) throw std::system_error(std::error_code(refusal), "subscribe");
        start_writer(c);
        return subscription(this, std::move(c));
    }

    // ---- sending -----------------------------------------------------------------------------

    /// Queues `m` to every connection under `key`. Never blocks, never waits on a peer.
    /// Sending to a key nobody listens on does nothing and returns {}.
    template <class K>
    send_result send(const K& key, const message& m) {
        return send_to(key, [&m]() -> const message& { return m; });
    }

    /// Sends a text message. The payload is copied once, and only if somebody listens on `key`.
    template <class K>
    send_result send(const K& key, std::string_view text) {
        return send_to(key, [text] { return message::text(text); });
    }

    /// Sends `m` to `key` on every instance: through options::relay when one is set (this instance
    /// delivers it when the relay brings it back), else here, as send() does.
    template <class K>
    publish_result publish(const K& key, const message& m) {
        auto& relay = options_.relay;
        if (!relay) return {{}, false, send(key, m)};
        error_code refused;
        if constexpr (std::is_convertible_v<const K&, const Key&>) {
            const Key& k = key;
            refused = relay->publish(k, m);
        } else {
            refused = relay->publish(Key(key), m);
        }
        return {refused, !refused, {}};
    }

    template <class K>
    publish_result publish(const K& key, std::string_view text) {
        return publish(key, message::text(text));
    }

    /// Queues `m` to every connection under every key.
    send_result broadcast(const message& m) {
        std::shared_lock lock(registry_mutex_);
        send_result result;
        for (auto& [key, peers] : registry_)
            for (auto& c : peers) push(*c, m, result);
        record(result);
        return result;
    }

    send_result broadcast(std::string_view text) { return broadcast(message::text(text)); }

    /// Asks every connection to finish writing what is queued and then close with `code`
    /// (1001 "going away" by default). Connections leave the manager as their peers answer the
    /// close; a server shutting down waits for size() to reach 0, with a deadline of its own.
    void close_all(std::uint16_t code = 1001, std::string_view reason = "server shutting down") {
        std::shared_lock lock(registry_mutex_);
        for (auto& [key, peers] : registry_)
            for (auto& c : peers) request_close(*c, code, reason);
    }

    // ---- queries -----------------------------------------------------------------------------

    template <class K>
    bool has(const K& key) const {
        std::shared_lock lock(registry_mutex_);
        return find(key) != registry_.end();
    }

    template <class K>
    std::size_t count(const K& key) const {
        std::shared_lock lock(registry_mutex_);
        auto it = find(key);
        return it == registry_.end() ? 0 : it->second.size();
    }

    /// Connections registered under any key.
    std::size_t size() const {
        std::shared_lock lock(registry_mutex_);
        return total_;
    }

    /// Keys with at least one connection.
    std::size_t key_count() const {
        std::shared_lock lock(registry_mutex_);
        return registry_.size();
    }

    /// Bytes held by all outboxes right now (a message queued to N connections counts N times,
    /// as the limits do). Walks every connection: meant for a metrics scrape, not a hot path.
    std::size_t queued_bytes() const {
        std::shared_lock lock(registry_mutex_);
        std::size_t total = 0;
        for (auto& [key, peers] : registry_)
            for (auto& c : peers) {
                std::lock_guard outbox_lock(c->mutex);
                total += c->queued_bytes;
            }
        return total;
    }

    statistics stats() const noexcept {
        auto get = [](const std::atomic<std::uint64_t>& n) { return n.load(std::memory_order_relaxed); };
        return {get(connections_), get(refused_),         get(messages_), get(deliveries_),
                get(dropped_),     get(overflow_closes_), get(errors_)};
    }

    const options_type& config() const noexcept { return options_; }

    // ---- shutdown ----------------------------------------------------------------------------

    /// Graceful shutdown: refuses new connections (close 1001, error::shutting_down), asks every
    /// connection to write what is queued and close with `code`, waits up to `drain` for peers to
    /// answer, then tears down whatever is left. Completes, on the awaiting coroutine's executor,
    /// once no connection is registered. Call it once; the manager stays closed afterwards.
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

    /// Registers `ws` under `key`, reads messages until the peer closes or the connection fails,
    /// and unregisters on every way out (close, error, exception, cancellation).
    ///
    /// Before registering it asks options::admit (if set) and checks the connection limits; a
    /// refusal closes the socket with the code of its wsbroadcast::error and completes with it.
    ///
    /// `on_message(std::string_view)` is called with each message the client sends; by default
    /// they are read and discarded. It runs on the socket's executor; the view is valid only
    /// during the call. An exception it throws ends the connection and propagates to the caller.
    ///
    /// Completes with the error that ended the connection (Beast's websocket::error::closed for a
    /// clean close). Unexpected errors are also reported to options::on_error. Everything touching
    /// the socket runs on the socket's executor. By default the result is an awaitable; any Asio
    /// completion token for void(std::exception_ptr, error_code) works instead (a callback,
    /// net::detached), and then no frame of the caller's waits while the connection lives.
    template <class OnMessage = void (*)(std::string_view), class CompletionToken = net::use_awaitable_t<>>
        requires readable_message_socket<Socket> && std::invocable<OnMessage&, std::string_view>
    auto serve(Socket ws, Key key, OnMessage on_message = [](std::string_view) {}, CompletionToken&& token = {}) {
        return serve(std::move(ws), std::move(key), options_.outbox, std::move(on_message),
                     std::forward<CompletionToken>(token));
    }

    /// The same, with this connection's own outbox limits and overflow policy.
    template <class OnMessage = void (*)(std::string_view), class CompletionToken = net::use_awaitable_t<>>
        requires readable_message_socket<Socket> && std::invocable<OnMessage&, std::string_view>
    auto serve(
        Socket ws, Key key, const outbox_options& outbox, OnMessage on_message = [](std::string_view) {},
        CompletionToken&& token = {}) {
        auto c = make_connection(std::move(ws), std::move(key), outbox);
        auto executor = c->socket.get_executor();
        return start_endpoint(std::move(c), detail::no_request{}, std::move(on_message),
                              std::forward<CompletionToken>(token));
    }

    /// Like serve(), for a socket whose handshake is still to be done: admits and registers `ws`
    /// under `key` first, then answers the upgrade `request` (ws.async_accept(request)), then
    /// starts writing. A client that sees its handshake complete therefore gets every message sent
    /// from then on; messages sent during the handshake wait in its outbox. (Through a relay, what
    /// it gets is what the relay brings back once the broker knows this instance needs the key.)
    /// A failed handshake unregisters and completes with its error. A refused client gets the
    /// handshake and then the close frame, so a browser sees the close code and reason.
    template <class Request, class OnMessage = void (*)(std::string_view),
              class CompletionToken = net::use_awaitable_t<>>
        requires readable_message_socket<Socket> && accepts_upgrade<Socket, Request> &&
                 std::invocable<OnMessage&, std::string_view>
    auto accept_and_serve(
        Socket ws, Request request, Key key, OnMessage on_message = [](std::string_view) {},
        CompletionToken&& token = {}) {
        return accept_and_serve(std::move(ws), std::move(request), std::move(key), options_.outbox,
                                std::move(on_message), std::forward<CompletionToken>(token));
    }

    /// The same, with this connection's own outbox limits and overflow policy.
    template <class Request, class OnMessage = void (*)(std::string_view),
              class CompletionToken = net::use_awaitable_t<>>
        requires readable_message_socket<Socket> && accepts_upgrade<Socket, Request> &&
                 std::invocable<OnMessage&, std::string_view>
    auto accept_and_serve(
        Socket ws, Request request, Key key, const outbox_options& outbox,
        OnMessage on_message = [](std::string_view) {}, CompletionToken&& token = {}) {
        auto c = make_connection(std::move(ws), std::move(key), outbox);
        auto executor = c->socket.get_executor();
        return start_endpoint(std::move(c), std::move(request), std::move(on_message),
                              std::forward<CompletionToken>(token));
    }

private:
    /// Builds a connection and applies the manager's socket-level limits where the socket has them.
    connection_ptr make_connection(Socket ws, Key key, const outbox_options& outbox) {
        // A socket with its own limit on what it reads (Beast's read_message_max) enforces it, with
        // close 1009; for any other the read buffer's limit does, and serve() closes.
        constexpr bool socket_limits_size = requires(Socket& s) { s.read_message_max(std::size_t{}); };
        auto c =
            std::make_shared<connection>(std::move(ws), std::move(key), outbox,
                                         socket_limits_size ? std::string().max_size() : options_.max_message_bytes);
        auto& socket = c->socket;
        if constexpr (requires { socket.read_message_max(std::size_t{}); })
            socket.read_message_max(options_.max_message_bytes);
        if constexpr (requires { socket.control_callback([](auto, auto) {}); }) {
            if (options_.idle_timeout > std::chrono::steady_clock::duration::zero())
                // A raw pointer: the socket lives inside the connection, so a shared one would be a cycle.
                socket.control_callback([raw = c.get()](auto, auto) { raw->heard_from_peer = true; });
        }
        return c;
    }

    /// Registers `c` unless a limit or the shutdown forbids it. Never blocks on I/O.
    error_code try_register(const connection_ptr& c) {
        error_code refusal;
        std::exception_ptr relay_failure;
        {
            std::unique_lock lock(registry_mutex_);
            if (closing_)
                refusal = error::shutting_down;
            else if (options_.max_connections && total_ >= options_.max_connections)
                refusal = error::connection_limit;
            else if (auto it = find(c->key); options_.max_connections_per_key && it != registry_.end() &&
                                             it->second.size() >= options_.max_connections_per_key)
                refusal = error::key_connection_limit;
            else {
                auto& peers = registry_[c->key];
                c->slot = peers.size();
                peers.push_back(c);
                ++total_;
                if (peers.size() == 1) report_interest(c->key, true, relay_failure);
            }
        }
        if (relay_failure) report({"relay", {}, relay_failure});
        (refusal ? refused_ : connections_).fetch_add(1, std::memory_order_relaxed);
        return refusal;
    }

    /// Starts the connection's writer (it writes whatever was queued meanwhile) and, with an idle
    /// timeout, its watchdog.
    void start_writer(const connection_ptr& c) {
        bool flush_now = false;
        {
            std::lock_guard lock(c->mutex);
            c->writer = detail::writer_state::idle;
            flush_now = schedule_flush(*c);
        }
        if (flush_now) post_flush(*c);
        if (options_.idle_timeout > std::chrono::steady_clock::duration::zero())
            net::dispatch(c->socket.get_executor(), [this, c] { watch(c, false); });  // the timer lives on it
    }

    /// Liveness: every half idle period, a peer not heard from is pinged, and one still silent a
    /// half period later is torn down (its read loop then ends and unregisters it). A chain of
    /// timer callbacks rather than a coroutine: it holds no frame while it waits, which matters
    /// with many idle connections.
    void watch(connection_ptr c, bool pinged) {
        auto& timer = c->watchdog;
        timer.expires_after(options_.idle_timeout / 2);
        timer.async_wait([this, c = std::move(c), pinged](const error_code&) mutable {
            {
                std::lock_guard lock(c->mutex);
                if (c->state == detail::connection_state::detached || c->state == detail::connection_state::aborting)
                    return;
            }
            if (std::exchange(c->heard_from_peer, false)) return watch(std::move(c), false);
            (void)pinged;  // read only for sockets that can ping
            if constexpr (requires { c->socket.async_ping({}, [](const error_code&) {}); }) {
                if (!pinged) {
                    // Not awaited: a ping waits behind a write stuck on a peer that stopped reading,
                    // and the clock must keep running for that peer too.
                    if (!std::exchange(c->ping_in_flight, true))
                        c->socket.async_ping({}, [c](const error_code&) { c->ping_in_flight = false; });
                    return watch(std::move(c), true);
                }
            }
            detail::abort_socket(c->socket);
            remove(c, detail::connection_state::aborting);
        });
    }

    /// The endpoint, as an Asio composed operation: admission, registration, the handshake (when
    /// there is a request), then the writer and the read loop. A state machine rather than a
    /// coroutine: while it waits for a peer (most peers of a fan-out server never speak) it is just
    /// this state, held by the pending read, with no coroutine frames. Every step runs on the
    /// socket's executor; the completion goes to the caller's.
    template <class Request, class OnMessage>
    struct endpoint_op {
        enum class step { begin, start, admitted, handshaken, refusal_closed, reading, too_big_closed };

        endpoint_op(ConnectionManager* m, connection_ptr conn, Request r, OnMessage f)
            : manager(m), c(std::move(conn)), request(new upgrade{std::move(r), {}}), on_message(std::move(f)) {}

        ConnectionManager* manager;
        connection_ptr c;
        // On the heap: the admission hook and the handshake see them at an address that stays put
        // while this state moves from one pending operation to the next. Freed after the handshake.
        struct upgrade {
            Request request;
            upgrade_request seen;  // what the admission hook is shown of `request`
        };
        std::unique_ptr<upgrade> request;
        OnMessage on_message;
        step at = step::begin;
        error_code refusal;
        std::string reason;     // a refusal's, for its close frame
        subscription sub;       // unregisters on every way out
        std::size_t limit = 0;  // of the read in flight

        static constexpr bool socket_limits_size = requires(Socket& s) { s.read_message_max(std::size_t{}); };
        // Most peers of a fan-out server never speak, and a whole-message read reserves a full
        // frame's worth (1.5 KiB with Beast) before a byte arrives. Where the socket can read part
        // of a message (Beast's read_some with a limit), the first read of each message asks for a
        // few bytes only; the rest of the message is read at full size.
        static constexpr bool reads_parts = requires(Socket& s, detail::read_buffer& b) {
            s.async_read_some(b, std::size_t{}, [](const error_code&, std::size_t) {});
            { s.is_message_done() } -> std::convertible_to<bool>;
        };
        static constexpr std::size_t first_read = 64, large_buffer = 16 * 1024;

        template <class Self>
        void operator()(Self& self, std::exception_ptr failure, admission verdict) {
            if (failure) return finish(self, failure, {});
            if (!verdict.admitted) {
                refusal = error::not_admitted;
                reason = std::move(verdict.reason);
                manager->refused_.fetch_add(1, std::memory_order_relaxed);
            }
            at = step::admitted;
            (*this)(self);
        }

        template <class Self>
        void operator()(Self& self, error_code ec = {}, std::size_t = 0) {
            try {
                step_on(self, ec);
            } catch (...) {  // from on_message or an initiating function: ends the connection
                finish(self, std::current_exception(), {});
            }
        }

    private:
        // The next step, on the socket's executor. It moves this state, so every other argument of
        // the call it is passed to must be read into a local first.
        template <class Self>
        auto on_socket(Self& self) {
            return net::bind_executor(c->socket.get_executor(), std::move(self));
        }

        template <class Self>
        void finish(Self& self, std::exception_ptr failure, error_code ec) {
            request.reset();
            sub = subscription();  // unregisters now rather than whenever the caller's handler is done
            self.complete(failure, ec);
        }

        template <class Self>
        void step_on(Self& self, error_code ec) {
            auto& socket = c->socket;
            switch (at) {
            case step::begin:  // never run inline in the initiating function: posted to the socket's executor
                at = step::start;
                return net::post(on_socket(self));
            case step::start:
                if (manager->options_.admit) {
                    if constexpr (std::is_constructible_v<upgrade_request, const Request&>)
                        request->seen = upgrade_request(request->request);
                    auto executor = socket.get_executor();
                    auto verdict = manager->options_.admit(c->key, request->seen);
                    return net::co_spawn(executor, std::move(verdict), on_socket(self));
                }
                at = step::admitted;
                [[fallthrough]];
            case step::admitted:
                if (!refusal) refusal = manager->try_register(c);
                if (!refusal) sub = subscription(manager, c);
                at = step::handshaken;
                if constexpr (!std::is_same_v<Request, detail::no_request>) {
                    const Request& upgrade = request->request;  // on the heap: stays put
                    return socket.async_accept(upgrade, on_socket(self));
                }
                [[fallthrough]];
            case step::handshaken:
                request.reset();
                if (ec) return finish(self, {}, ec);  // a failed handshake is the client's problem: no log line
                if (refusal) {
                    if (reason.empty()) reason = refusal.message();
                    at = step::refusal_closed;
                    if constexpr (requires {
                                      socket.async_close(detail::make_close_reason<Socket>(0, reason),
                                                         [](const error_code&) {});
                                  }) {
                        const auto code = close_code_for(static_cast<error>(refusal.value()));
                        auto close_reason =
                            detail::make_close_reason<Socket>(code, std::string_view(reason).substr(0, 123));
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
                on_message(std::string_view(c->read_storage.data(), buffer.size()));
                buffer.consume(buffer.size());
                if (c->read_storage.capacity() > large_buffer)
                    std::string().swap(c->read_storage);  // one big message is no reason to keep its buffer
                return read(self, first_read);
            }
            if (!detail::is_expected_ending(ec)) manager->report({"read", ec, {}});
            if constexpr (!socket_limits_size && requires {
                              c->socket.async_close(detail::make_close_reason<Socket>(0, {}), [](const error_code&) {});
                          }) {
                if (ec == net::error::message_size) {
                    at = step::too_big_closed;
                    auto& socket = c->socket;
                    return socket.async_close(detail::make_close_reason<Socket>(1009, "message too big"),
                                              on_socket(self));
                }
            }
            finish(self, {}, ec);
        }
    };

    template <class Request, class OnMessage, class CompletionToken>
    auto start_endpoint(connection_ptr c, Request request, OnMessage on_message, CompletionToken&& token) {
        auto executor = c->socket.get_executor();
        return net::async_compose<CompletionToken, void(std::exception_ptr, error_code)>(
            endpoint_op<Request, OnMessage>{this, std::move(c), std::move(request), std::move(on_message)}, token,
            executor);
    }

    /// The end of a shutdown: whatever did not leave in time is torn down and unregistered.
    void abort_all() {
        std::vector<connection_ptr> left;
        std::exception_ptr relay_failure;
        {
            std::unique_lock lock(registry_mutex_);
            for (auto& [key, peers] : registry_) {
                report_interest(key, false, relay_failure);
                for (auto& c : peers) {
                    c->slot = connection::npos;
                    left.push_back(std::move(c));
                }
            }
            registry_.clear();
            total_ = 0;
        }
        if (relay_failure) report({"relay", {}, relay_failure});
        for (auto& c : left) {
            {
                std::lock_guard lock(c->mutex);
                begin_close(*c, detail::connection_state::aborting, 1001, "shutdown deadline");
                c->keep_running.reset();
            }
            post_stop(*c, teardown::always);
        }
    }

    template <class K, class MakeMessage>
    send_result send_to(const K& key, MakeMessage make_message) {
        std::shared_lock lock(registry_mutex_);
        auto it = find(key);
        if (it == registry_.end()) return {};
        const message& m = make_message();  // built only when somebody listens
        send_result result;
        for (auto& c : it->second) push(*c, m, result);
        record(result);
        return result;
    }

    template <class K>
    auto find(const K& key) const {
        if constexpr (requires { registry_.find(key); })
            return registry_.find(key);  // heterogeneous lookup: no key object is built
        else
            return registry_.find(Key(key));
    }

    void record(const send_result& r) noexcept {
        if (r.queued) {
            messages_.fetch_add(1, std::memory_order_relaxed);
            deliveries_.fetch_add(r.queued, std::memory_order_relaxed);
        }
        if (r.closed) overflow_closes_.fetch_add(r.closed, std::memory_order_relaxed);
    }

    /// Puts `m` in one outbox, applying the overflow policy. Called under the registry's shared lock.
    void push(connection& c, const message& m, send_result& result) {
        bool wake = false;
        bool abort = false;
        {
            std::lock_guard lock(c.mutex);
            if (c.state != detail::connection_state::open) return;
            if (!fits(c, m)) {
                switch (c.limits.on_overflow) {
                case overflow_policy::drop_newest:
                    ++result.dropped;
                    dropped_.fetch_add(1, std::memory_order_relaxed);
                    return;
                case overflow_policy::drop_oldest: {
                    ++result.dropped;
                    const auto evicted = make_room(c, m);
                    dropped_.fetch_add(evicted ? evicted : 1, std::memory_order_relaxed);
                    if (!evicted) return;  // m could never fit beside the message being written
                    break;
                }
                case overflow_policy::close:
                    ++result.closed;
                    abort = true;
                    begin_close(c, detail::connection_state::aborting, c.limits.close_code,
                                "outbox full: the client is not reading");
                    wake = schedule_flush(c);
                    break;
                }
            }
            if (!abort) {
                c.outbox.push_back(m);
                c.queued_bytes += m.size();
                ++result.queued;
                wake = schedule_flush(c);
            }
        }
        if (wake) post_flush(c);
        if (abort) post_stop(c, teardown::if_writing);
    }

    static bool fits(const connection& c, const message& m) noexcept {
        return c.outbox.size() < c.limits.max_messages && c.queued_bytes + m.size() <= c.limits.max_bytes;
    }

    /// drop_oldest: discards the oldest queued messages (never those being written) until `m`
    /// fits, and returns how many. Returns 0, discarding nothing, if `m` could never fit.
    static std::size_t make_room(connection& c, const message& m) {
        const std::size_t keep = c.in_flight;
        std::size_t bytes_kept = 0;
        for (std::size_t i = 0; i < keep; ++i) bytes_kept += c.outbox[i].size();
        if (keep + 1 > c.limits.max_messages || bytes_kept + m.size() > c.limits.max_bytes) return 0;
        std::size_t evicted = 0;
        while (!fits(c, m)) {
            c.queued_bytes -= c.outbox[keep].size();
            c.outbox.erase(keep);
            ++evicted;
        }
        return evicted;
    }

    /// Moves a connection towards closing. `c.mutex` must be held.
    void begin_close(connection& c, detail::connection_state state, std::uint16_t code, std::string_view text) {
        c.state = state;
        c.close_code = code;
        c.close_text = text.substr(0, 123);  // the most a close frame carries (RFC 6455 section 5.5)
        if (state != detail::connection_state::closing) {
            // Nothing queued will be written: free it now, except the messages being written.
            const std::size_t keep = c.in_flight;
            while (c.outbox.size() > keep) {
                c.queued_bytes -= c.outbox.back().size();
                c.outbox.pop_back();
            }
        }
    }

    void request_close(connection& c, std::uint16_t code, std::string_view text) {
        bool wake = false;
        {
            std::lock_guard lock(c.mutex);
            if (c.state != detail::connection_state::open) return;
            begin_close(c, detail::connection_state::closing, code, text);
            wake = schedule_flush(c);
        }
        if (wake) post_flush(c);
    }

    /// An idle writer gets a flush scheduled; any other is either writing (it looks at the outbox
    /// again when its write completes) or not started. `c.mutex` must be held.
    static bool schedule_flush(connection& c) noexcept {
        if (c.writer != detail::writer_state::idle) return false;
        c.writer = detail::writer_state::scheduled;
        return true;
    }

    /// Queues a flush of `c`. Flushes are handed out in small chunks, each chunk posted behind
    /// whatever else is waiting (reads, new pushes): a send to many connections then does not hold
    /// everything else back for a whole round of writes, and what is sent during the round leaves
    /// in one write per connection.
    void post_flush(connection& c) {
        bool start = false;
        {
            std::lock_guard lock(due_mutex_);
            due_.push_back(c.weak_from_this());  // weak: a connection that dies meanwhile is skipped
            start = !std::exchange(flusher_running_, true);
        }
        if (start) {
            auto executor = c.socket.get_executor();
            net::post(executor, [this, executor] { hand_out_flushes(executor); });
        }
    }

    static constexpr std::size_t flush_chunk = 16;

    void hand_out_flushes(const typename Socket::executor_type& executor) {
        std::weak_ptr<connection> chunk[flush_chunk];
        std::size_t n = 0;
        bool more = false;
        {
            std::lock_guard lock(due_mutex_);
            for (; n < flush_chunk && !due_.empty(); ++n) {
                chunk[n] = std::move(due_.front());
                due_.pop_front();
            }
            more = flusher_running_ = !due_.empty();
        }
        for (std::size_t i = 0; i < n; ++i)
            if (auto c = chunk[i].lock()) net::post(c->socket.get_executor(), [this, c] { flush(c); });
        if (more) net::post(executor, [this, executor] { hand_out_flushes(executor); });
    }

    enum class teardown {
        none,        // the writer sees the new state and ends (unsubscribe, write error)
        if_writing,  // close policy: a write still in flight belongs to a peer that is not reading
        always,      // end of a shutdown: no more waiting
    };

    /// The one way to stop a connection from outside: on its executor (its timer and socket may be
    /// touched only there), tear the socket down as asked and stop the watchdog. Idempotent.
    void post_stop(connection& c, teardown how) {
        net::post(c.socket.get_executor(), [c = c.shared_from_this(), how] {
            bool tear_down = how == teardown::always;
            if (how == teardown::if_writing) {
                std::lock_guard lock(c->mutex);
                tear_down = c->in_flight > 0;
            }
            if (tear_down) detail::abort_socket(c->socket);
            c->watchdog.cancel();
        });
    }

    /// Takes `c` out of the registry (idempotent) and stops its writer.
    void remove(const connection_ptr& c, detail::connection_state why) noexcept {
        std::exception_ptr relay_failure;
        {
            std::unique_lock lock(registry_mutex_);
            if (c->slot != connection::npos) {
                auto it = registry_.find(c->key);
                auto& peers = it->second;
                // Swap-and-pop keeps removal O(1); order among a key's connections does not matter.
                peers[c->slot] = std::move(peers.back());
                peers[c->slot]->slot = c->slot;
                peers.pop_back();
                c->slot = connection::npos;
                --total_;
                if (peers.empty()) {
                    report_interest(c->key, false, relay_failure);
                    registry_.erase(it);
                }
            }
        }
        if (relay_failure) report({"relay", {}, relay_failure});
        {
            std::lock_guard lock(c->mutex);
            if (why == detail::connection_state::detached || c->state == detail::connection_state::open)
                begin_close(*c, why, 0, {});
            c->keep_running.reset();
        }
        try {
            post_stop(*c, teardown::none);
        } catch (...) {  // the executor is shutting down: the coroutines die with it
        }
    }

    /// The most frames one write takes: what Asio hands the kernel in one writev.
    static constexpr std::size_t max_batch = 64;

    /// The connection's only writer, run on its executor: one write in flight at a time, in outbox
    /// order. It writes every queued message (up to max_batch) in one write when the socket is
    /// over a batching_stream, else the oldest one; then, once the outbox is empty and a close was
    /// asked for, the close frame.
    void flush(const connection_ptr& c) noexcept {
        using detail::connection_state;
        try {
            bool close_now = false;
            std::uint16_t code = 0;
            std::string text;
            bool overflowed = false;
            bool binary = false;
            {
                std::lock_guard lock(c->mutex);
                const auto state = c->state;
                if (state == connection_state::detached) {  // the socket is its owner's again
                    c->writer = detail::writer_state::idle;
                    return;
                }
                if (state != connection_state::aborting && !c->outbox.empty()) {
                    // Messages stay queued (and counted) until written; the buffers point into
                    // their shared allocations, which drop_oldest never frees while in flight.
                    c->writer = detail::writer_state::writing;
                    c->batch.clear();
                    if constexpr (detail::writes_frame_batches<Socket>) {
                        c->in_flight = std::min(c->outbox.size(), max_batch);
                        for (std::size_t i = 0; i < c->in_flight; ++i) c->batch.push_back(c->outbox[i].frame());
                    } else {
                        c->in_flight = 1;
                        c->batch.push_back(net::buffer(c->outbox.front().data()));
                        binary = c->outbox.front().is_binary();
                    }
                } else if (state == connection_state::open) {
                    c->writer = detail::writer_state::idle;
                    std::vector<net::const_buffer>().swap(c->batch);  // an idle connection holds no batch
                    return;
                } else {                                        // closing with nothing left to write, or aborting
                    c->writer = detail::writer_state::writing;  // for good: nothing is written after the close
                    close_now = true;
                    code = c->close_code;
                    text = c->close_text;
                    overflowed = state == connection_state::aborting;
                }
            }
            if (close_now) return send_close(c, code, text, overflowed);
            auto done = [this, c](const error_code& ec, std::size_t) { written(c, ec); };
            if constexpr (detail::writes_frame_batches<Socket>) {
                c->socket.next_layer().async_write_some(c->batch, std::move(done));
            } else {
                if constexpr (requires { c->socket.binary(true); }) c->socket.binary(binary);
                c->socket.async_write(c->batch.front(), std::move(done));
            }
        } catch (...) {
            report({"writer", {}, std::current_exception()});
            detail::abort_socket(c->socket);
            remove(c, connection_state::aborting);
        }
    }

    void written(const connection_ptr& c, const error_code& ec) noexcept {
        {
            std::lock_guard lock(c->mutex);
            for (; c->in_flight > 0; --c->in_flight) {  // every path keeps the in-flight messages
                c->queued_bytes -= c->outbox.front().size();
                c->outbox.pop_front();
            }
            if (ec) c->writer = detail::writer_state::writing;  // for good
        }
        if (!ec) return flush(c);
        if (!detail::is_expected_ending(ec)) report({"write", ec, {}});
        remove(c, detail::connection_state::aborting);
    }

    /// The close frame, once everything queued is written (closing) or dropped (aborting).
    void send_close(const connection_ptr& c, std::uint16_t code, std::string_view text, bool overflowed) {
        if constexpr (requires {
                          c->socket.async_close(detail::make_close_reason<Socket>(code, text),
                                                [](const error_code&) {});
                      }) {
            c->socket.async_close(detail::make_close_reason<Socket>(code, text),
                                  [this, c, overflowed](const error_code& ec) {
                                      if (!detail::is_expected_ending(ec)) report({"close", ec, {}});
                                      // A connection closed by close_all() stays registered until its
                                      // peer's answer ends the read loop; one closed on overflow
                                      // leaves at once, whether or not anybody reads it.
                                      if (overflowed) remove(c, detail::connection_state::aborting);
                                  });
        } else if (overflowed) {
            remove(c, detail::connection_state::aborting);
        }
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

    options_type options_;
    mutable std::shared_mutex registry_mutex_;
    std::unordered_map<Key, std::vector<connection_ptr>, Hash, KeyEqual> registry_;
    std::size_t total_ = 0;

    bool closing_ = false;  // shutdown() has begun; guarded by registry_mutex_

    std::mutex due_mutex_;                       // guards the two below
    std::deque<std::weak_ptr<connection>> due_;  // connections waiting for a flush, oldest first
    bool flusher_running_ = false;               // hand_out_flushes() is posted or running

    std::atomic<std::uint64_t> connections_{0}, refused_{0}, messages_{0}, deliveries_{0}, dropped_{0},
        overflow_closes_{0}, errors_{0};
};

}  // namespace WSBROADCAST_ABI_NAMESPACE
}  // namespace wsbroadcast

#endif  // WSBROADCAST_HPP
