// TLS for the reference server, holding no buffers while a connection is idle.
//
// asio::ssl::stream (under beast::ssl_stream) gives every connection two zero-filled 17 KiB
// buffers and an OpenSSL BIO pair between them and the socket for as long as it lives: 65 of the
// 70 KiB an idle wss:// connection cost (bench/README.md, "wss:// against ws://"). Here OpenSSL
// reads the socket itself (a socket BIO, with SSL_MODE_RELEASE_BUFFERS: its record buffer is freed
// whenever it is empty) and writes into a string that Asio sends and then frees. An idle
// connection keeps the SSL object, its keys and a pending one-byte peek.
//
// Waiting for input is a peek (recv with MSG_PEEK) rather than async_wait: Asio tries a peek at
// once when the socket became readable meanwhile, where a wait can miss that edge when another
// thread runs the reactor. Ciphertext goes out through Asio's own writes for the same reason.
#pragma once

#include <boost/asio/compose.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/ssl/error.hpp>
#include <boost/asio/ssl/stream_base.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/error.hpp>
#include <boost/beast/core/role.hpp>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <utility>

namespace wsbroadcast_server {

/// A server-side TLS stream over a TCP socket: Beast's AsyncStream (so HTTP and WebSocket run over
/// it), the handshake and shutdown of asio::ssl::stream, and the deadline of beast::tcp_stream
/// (expires_after: what is pending or started before it passes fails with beast::error::timeout).
/// Use it on one executor (a strand), at most one read and one write at a time.
class tls_stream {
public:
    using socket_type = boost::asio::ip::tcp::socket;
    using next_layer_type = socket_type;
    using executor_type = socket_type::executor_type;
    using error_code = boost::system::error_code;

    tls_stream(socket_type socket, boost::asio::ssl::context& context)
        : socket_(std::move(socket)), core_(std::make_shared<core>()) {
        core_->socket = &socket_;
        core_->ssl = SSL_new(context.native_handle());
        if (!core_->ssl) throw std::bad_alloc();
        BIO* in = BIO_new_socket(static_cast<int>(socket_.native_handle()), BIO_NOCLOSE);
        BIO* out = BIO_new(output_method());
        if (!in || !out) {
            BIO_free(in);
            BIO_free(out);
            throw std::bad_alloc();
        }
        BIO_set_data(out, core_.get());
        BIO_set_init(out, 1);
        SSL_set_bio(core_->ssl, in, out);
        SSL_set_mode(core_->ssl, SSL_MODE_RELEASE_BUFFERS);
        SSL_set_options(core_->ssl, SSL_OP_NO_RENEGOTIATION);  // so a write never waits for input
        SSL_set_read_ahead(core_->ssl, 1);                     // a record's header and body in one read
        SSL_set_accept_state(core_->ssl);
        socket_.non_blocking(true);
    }
    tls_stream(tls_stream&& other) noexcept : socket_(std::move(other.socket_)), core_(std::move(other.core_)) {
        if (core_) core_->socket = &socket_;
    }
    tls_stream& operator=(tls_stream&&) = delete;
    ~tls_stream() {
        if (!core_) return;
        core_->socket = nullptr;  // operations still pending complete without touching it
        core_->timer.reset();
    }

    executor_type get_executor() noexcept { return socket_.get_executor(); }
    socket_type& next_layer() noexcept { return socket_; }
    const socket_type& next_layer() const noexcept { return socket_; }

    /// Like beast::tcp_stream's: once `d` has passed, what is pending fails with
    /// beast::error::timeout (the socket's operations are cancelled), and so does what starts later.
    void expires_after(std::chrono::steady_clock::duration d) {
        auto& c = *core_;
        if (!c.timer) c.timer = std::make_unique<boost::asio::steady_timer>(socket_.get_executor());
        c.expired = false;
        c.timer->expires_after(d);
        c.timer->async_wait([weak = std::weak_ptr<core>(core_), generation = ++c.generation](const error_code& ec) {
            const auto c = weak.lock();
            if (ec || !c || c->generation != generation || !c->socket) return;
            c->expired = true;
            error_code ignored;
            c->socket->cancel(ignored);
        });
    }
    /// No deadline, and no timer kept for one.
    void expires_never() {
        ++core_->generation;
        core_->expired = false;
        core_->timer.reset();
    }

    template <class Token>
    auto async_handshake(boost::asio::ssl::stream_base::handshake_type, Token&& token) {
        return start(token, [](SSL* ssl, std::size_t&) { return SSL_do_handshake(ssl); }, mode::handshake);
    }

    template <class MutableBuffers, class Token>
    auto async_read_some(const MutableBuffers& buffers, Token&& token) {
        const auto first = first_buffer<boost::asio::mutable_buffer>(buffers);
        return start(
            token,
            [first](SSL* ssl, std::size_t& n) {
                if (first.size() == 0) return 1;
                return SSL_read_ex(ssl, first.data(), first.size(), &n);
            },
            mode::read);
    }

    /// Writes up to one TLS record's worth of `buffers` (16 KiB), gathered into one record.
    template <class ConstBuffers, class Token>
    auto async_write_some(const ConstBuffers& buffers, Token&& token) {
        return start(
            token,
            // Called once, in this call (mode::write): `buffers` may be a temporary.
            [&buffers](SSL* ssl, std::size_t& n) {
                char record[max_record];
                std::size_t size = 0;
                for (auto it = boost::asio::buffer_sequence_begin(buffers);
                     it != boost::asio::buffer_sequence_end(buffers) && size < max_record; ++it) {
                    const boost::asio::const_buffer b(*it);
                    const auto take = std::min(b.size(), max_record - size);
                    std::memcpy(record + size, b.data(), take);
                    size += take;
                }
                if (size == 0) return 1;
                return SSL_write_ex(ssl, record, size, &n);
            },
            mode::write);
    }

    /// Sends close_notify and waits for the peer's.
    template <class Token>
    auto async_shutdown(Token&& token) {
        return start(
            token,
            [](SSL* ssl, std::size_t&) {
                const int sent = SSL_shutdown(ssl);
                return sent != 0 ? sent : SSL_shutdown(ssl);  // 1 once the peer's close_notify is read
            },
            mode::shutdown);
    }

    /// How a server ends a connection it is done with, as Beast's plain teardown does over TCP:
    /// sends close_notify, discards what the peer still sends (a WebSocket close frame) until its
    /// close_notify or the end of the stream, and closes the socket. Closing at once would reset a
    /// client still writing its close frame, or its own close_notify.
    template <class Token>
    auto async_close(Token&& token) {
        return start(
            token,
            [](SSL* ssl, std::size_t&) {
                if (!(SSL_get_shutdown(ssl) & SSL_SENT_SHUTDOWN) && SSL_shutdown(ssl) < 0) return -1;
                char discarded[4096];
                std::size_t n = 0;
                int r;
                while ((r = SSL_read_ex(ssl, discarded, sizeof discarded, &n)) > 0) {
                }
                return r;
            },
            mode::close);
    }

private:
    static constexpr std::size_t max_record = 16 * 1024;  // TLS's largest plaintext record

    // What the stream's operations share, and outlives it while one of them is pending: Beast's
    // WebSocket operations may let go of the stream while a write of theirs is on its way (see
    // wsbroadcast::batching_stream).
    struct core {
        SSL* ssl = nullptr;
        socket_type* socket = nullptr;  // null once the stream is gone
        std::string output;             // ciphertext OpenSSL made and Asio has not taken yet
        std::string writing;            // the ciphertext Asio is writing
        unsigned char peeked = 0;
        std::unique_ptr<boost::asio::steady_timer> timer;
        std::uint64_t generation = 0;
        bool expired = false;
        ~core() {
            if (ssl) SSL_free(ssl);
        }
    };

    // A write-only BIO that appends to core::output: OpenSSL never blocks writing, and the stream
    // decides when the bytes go.
    static BIO_METHOD* output_method() {
        static BIO_METHOD* const method = [] {
            BIO_METHOD* m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "wsbroadcast output");
            BIO_meth_set_write_ex(m, [](BIO* bio, const char* data, std::size_t size, std::size_t* written) {
                static_cast<core*>(BIO_get_data(bio))->output.append(data, size);
                *written = size;
                return 1;
            });
            BIO_meth_set_ctrl(m, [](BIO*, int cmd, long, void*) -> long { return cmd == BIO_CTRL_FLUSH ? 1 : 0; });
            return m;
        }();
        return method;
    }

    template <class Buffer, class Buffers>
    static Buffer first_buffer(const Buffers& buffers) {
        for (auto it = boost::asio::buffer_sequence_begin(buffers); it != boost::asio::buffer_sequence_end(buffers);
             ++it)
            if (Buffer b(*it); b.size() != 0) return b;
        return Buffer();
    }

    // What an OpenSSL call's failure means for the caller.
    static error_code failure(SSL* ssl, int result) {
        switch (SSL_get_error(ssl, result)) {
        case SSL_ERROR_ZERO_RETURN: return boost::asio::error::eof;  // the peer's close_notify
        case SSL_ERROR_SYSCALL:
            if (errno != 0) return error_code(errno, boost::asio::error::get_system_category());
            return boost::asio::ssl::error::stream_truncated;
        case SSL_ERROR_SSL:
            if (ERR_GET_REASON(ERR_peek_error()) == SSL_R_UNEXPECTED_EOF_WHILE_READING)
                return boost::asio::ssl::error::stream_truncated;  // closed without close_notify
            return error_code(static_cast<int>(ERR_get_error()), boost::asio::error::get_ssl_category());
        default: return error_code(static_cast<int>(ERR_get_error()), boost::asio::error::get_ssl_category());
        }
    }

    // What an operation may do besides calling OpenSSL.
    struct mode {
        bool sends;           // sends what OpenSSL wrote before it completes (else: see send_now)
        bool retries;         // calls OpenSSL again once input came (a write may not: see above)
        bool closes = false;  // closes the socket when done
        static const mode handshake, read, write, shutdown, close;
    };

    // One operation: call OpenSSL; send what it wrote; peek while it wants input; call it again.
    template <class Action>
    class operation {
    public:
        operation(std::shared_ptr<core> c, Action action, mode m)
            : core_(std::move(c)), action_(std::move(action)), mode_(m) {}

        template <class Self>
        void operator()(Self& self, error_code ec = {}, std::size_t = 0) {
            switch (step_) {
            case step::completing: return self.complete(result_, bytes_);
            case step::sending:
                std::string().swap(core_->writing);  // an idle connection keeps no buffer (`= {}` would keep it)
                if (ec) return finish(self, ec);
                if (!core_->output.empty()) return send(self);  // a read's or a close's, meanwhile
                if (!wants_input_) return finish(self, result_);
                return peek(self);
            case step::peeking:
                // eof: OpenSSL reads it too, and says whether a close_notify came first.
                if (ec && ec != boost::asio::error::eof) return finish(self, ec);
                break;
            case step::starting: break;
            }
            if (!core_->socket) return finish(self, boost::asio::error::operation_aborted);
            if (core_->expired) return finish(self, boost::beast::error::timeout);

            ERR_clear_error();
            errno = 0;
            const int r = action_(core_->ssl, bytes_);
            wants_input_ = false;
            if (r <= 0) {
                if (SSL_get_error(core_->ssl, r) != SSL_ERROR_WANT_READ)
                    result_ = failure(core_->ssl, r);
                else if (mode_.retries)
                    wants_input_ = true;
                else
                    result_ = boost::asio::ssl::error::unexpected_result;
            }
            if (!core_->output.empty() && core_->writing.empty()) {
                if (mode_.sends) return send(self);
                send_now();
            }
            if (wants_input_) return peek(self);
            finish(self, result_);
        }

    private:
        enum class step { starting, sending, peeking, completing };

        template <class Self>
        void send(Self& self) {
            step_ = step::sending;
            core_->writing.swap(core_->output);
            boost::asio::async_write(*core_->socket, boost::asio::buffer(core_->writing), std::move(self));
        }

        template <class Self>
        void peek(Self& self) {
            step_ = step::peeking;
            core_->socket->async_receive(boost::asio::buffer(&core_->peeked, 1), socket_type::message_peek,
                                         std::move(self));
        }

        // A read's output (an alert, an answer to a key update) while no write is on its way: what
        // the socket takes now goes, the rest with the next write.
        void send_now() {
            error_code ignored;
            const auto sent = core_->socket->send(boost::asio::buffer(core_->output), 0, ignored);
            core_->output.erase(0, sent);
            if (core_->output.empty()) std::string().swap(core_->output);  // nor here
        }

        template <class Self>
        void finish(Self& self, error_code ec) {
            if (ec == boost::asio::error::operation_aborted && core_->expired) ec = boost::beast::error::timeout;
            if (mode_.closes && core_->socket) {
                error_code ignored;
                core_->socket->shutdown(socket_type::shutdown_both, ignored);
                core_->socket->close(ignored);
            }
            result_ = ec;
            if (step_ != step::starting) return self.complete(result_, ec ? 0 : bytes_);
            // Done in the initiating call: the handler runs later, never inside it.
            if (ec) bytes_ = 0;
            step_ = step::completing;
            boost::asio::post(std::move(self));
        }

        std::shared_ptr<core> core_;
        Action action_;
        mode mode_;
        bool wants_input_ = false;
        step step_ = step::starting;
        error_code result_;
        std::size_t bytes_ = 0;
    };

    template <class Token, class Action>
    auto start(Token& token, Action action, mode m) {
        return boost::asio::async_compose<Token, void(error_code, std::size_t)>(
            operation<Action>(core_, std::move(action), m), token, socket_);
    }

    socket_type socket_;
    std::shared_ptr<core> core_;
};

inline const tls_stream::mode tls_stream::mode::handshake{true, true};
inline const tls_stream::mode tls_stream::mode::read{false, true};
inline const tls_stream::mode tls_stream::mode::write{true, false};
inline const tls_stream::mode tls_stream::mode::shutdown{true, true};
inline const tls_stream::mode tls_stream::mode::close{true, true, true};

// Beast's WebSocket close ends with a teardown of the layer below, found by ADL.
template <class Handler>
void async_teardown(boost::beast::role_type, tls_stream& stream, Handler&& handler) {
    auto executor = boost::asio::get_associated_executor(handler, stream.get_executor());
    stream.async_close(boost::asio::bind_executor(
        executor, [handler = std::forward<Handler>(handler)](boost::system::error_code ec, std::size_t) mutable {
            // The peer's close_notify, or its end of the stream without one: either way it is gone.
            if (ec == boost::asio::error::eof || ec == boost::asio::ssl::error::stream_truncated) ec = {};
            std::move(handler)(ec);
        }));
}

}  // namespace wsbroadcast_server
