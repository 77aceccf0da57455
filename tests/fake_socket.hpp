// An in-memory WebSocket-like stream for unit tests: no network, fully observable.
//
// The server side is fake_socket, handed to the manager. The test keeps a shared_ptr to the
// fake_peer, which records what was written and lets the test play the client: send a message,
// close, make writes fail, or stop reading (stall). Every operation completes asynchronously
// through the executor, like a real socket, and all of it runs on the io_context's thread.
#pragma once

#include "wsbroadcast.hpp"

#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace test {

namespace net = wsbroadcast::net;
using wsbroadcast::error_code;

struct fake_peer {
    explicit fake_peer(net::any_io_executor ex) : executor(ex), read_signal(ex), write_gate(ex) {}

    net::any_io_executor executor;

    // What the server wrote, in order; and where each write's bytes lived (to prove sharing).
    std::vector<std::string> received;
    std::vector<bool> received_binary;
    std::vector<const void*> write_addresses;

    std::deque<std::string> inbox;  // what the "client" sent, waiting to be read by the server
    std::deque<bool> inbox_binary;  // whether each of them is a binary message
    bool last_read_binary = false;  // the type of the message the server read last
    // fake_socket_parts: how far into inbox.front() reads have got, and the limit of each read.
    std::size_t read_offset = 0;
    bool message_done = true;
    std::vector<std::size_t> read_limits;
    bool client_closed = false;
    bool server_closed = false;  // async_close was called
    std::uint16_t close_code = 0;
    bool aborted = false;             // the lowest layer was closed without a handshake
    bool stalled = false;             // writes do not complete until unstall()
    bool refuse_handshake = false;    // async_accept fails
    bool close_hangs = false;         // async_close never completes (a peer that never answers)
    std::string accepted_request;     // what async_accept was given
    std::function<void()> on_accept;  // runs inside the handshake, before it completes
    std::string close_reason;         // the reason text of the server's close frame
    int writes_before_failure = -1;   // >= 0: that many writes succeed, then each fails
    error_code failure = net::error::connection_reset;

    net::steady_timer read_signal;  // a pending read waits here
    net::steady_timer write_gate;   // a stalled write waits here

    // Client-side actions. Call them on the io_context's thread (or post them there).
    void client_send(std::string text, bool binary = false) {
        inbox.push_back(std::move(text));
        inbox_binary.push_back(binary);
        read_signal.cancel();
    }
    void client_close() {
        client_closed = true;
        read_signal.cancel();
    }
    void unstall() {
        stalled = false;
        write_gate.cancel();
    }
};

class fake_socket {
public:
    using executor_type = net::any_io_executor;

    explicit fake_socket(std::shared_ptr<fake_peer> peer) : peer_(std::move(peer)) {}

    executor_type get_executor() const { return peer_->executor; }

    void binary(bool b) { binary_ = b; }
    // Like Beast's: the type of the message read last.
    bool got_binary() const { return peer_->last_read_binary; }

    template <class Token>
    auto async_write(net::const_buffer buffer, Token&& token) {
        return net::async_compose<Token, void(error_code, std::size_t)>(
            [p = peer_, buffer, binary = binary_, started = false](auto& self, error_code = {}) mutable {
                if (!std::exchange(started, true)) return net::post(p->executor, std::move(self));
                if (p->aborted || p->server_closed) return self.complete(net::error::operation_aborted, 0);
                if (p->stalled) {
                    p->write_gate.expires_at(net::steady_timer::time_point::max());
                    return p->write_gate.async_wait(std::move(self));
                }
                if (p->writes_before_failure == 0) return self.complete(p->failure, 0);
                if (p->writes_before_failure > 0) --p->writes_before_failure;
                p->received.emplace_back(static_cast<const char*>(buffer.data()), buffer.size());
                p->received_binary.push_back(binary);
                p->write_addresses.push_back(buffer.data());
                self.complete({}, buffer.size());
            },
            token, peer_->executor);
    }

    template <class DynamicBuffer, class Token>
    auto async_read(DynamicBuffer& buffer, Token&& token) {
        return net::async_compose<Token, void(error_code, std::size_t)>(
            [p = peer_, &buffer, started = false](auto& self, error_code = {}) mutable {
                if (!std::exchange(started, true)) return net::post(p->executor, std::move(self));
                if (p->aborted) return self.complete(net::error::operation_aborted, 0);
                if (!p->inbox.empty()) {
                    auto text = std::move(p->inbox.front());
                    p->inbox.pop_front();
                    p->last_read_binary = p->inbox_binary.front();
                    p->inbox_binary.pop_front();
                    if (text.size() > buffer.max_size() - buffer.size())  // as Beast: too big, 1009
                        return self.complete(net::error::message_size, 0);
                    buffer.commit(net::buffer_copy(buffer.prepare(text.size()), net::buffer(text)));
                    return self.complete({}, text.size());
                }
                if (p->client_closed || (p->server_closed && !p->close_hangs)) return self.complete(net::error::eof, 0);
                p->read_signal.expires_at(net::steady_timer::time_point::max());
                p->read_signal.async_wait(std::move(self));
            },
            token, peer_->executor);
    }

    // Like Beast's server handshake. The "request" is whatever the test passes; it is recorded.
    template <class Request, class Token>
    auto async_accept(const Request& request, Token&& token) {
        return net::async_compose<Token, void(error_code)>(
            [p = peer_, request, started = false](auto& self, error_code = {}) mutable {
                if (!std::exchange(started, true)) return net::post(p->executor, std::move(self));
                if (p->aborted || p->refuse_handshake) return self.complete(net::error::connection_refused);
                p->accepted_request = std::string(request);
                if (p->on_accept) p->on_accept();
                self.complete({});
            },
            token, peer_->executor);
    }

    // Like Beast's close_reason: a code and a text.
    struct close_reason_type {
        std::uint16_t code = 0;
        std::string reason;
        close_reason_type(std::uint16_t c = 0) : code(c) {}
    };
    const close_reason_type& reason() const { return last_reason_; }

    // Like Beast's: sends a close frame; a pending read then ends.
    template <class Token>
    auto async_close(const close_reason_type& cr, Token&& token) {
        return net::async_compose<Token, void(error_code)>(
            [p = peer_, cr, started = false](auto& self, error_code = {}) mutable {
                if (!std::exchange(started, true)) return net::post(p->executor, std::move(self));
                if (p->aborted) return self.complete(net::error::operation_aborted);
                p->server_closed = true;
                p->close_code = cr.code;
                p->close_reason = cr.reason;
                p->read_signal.cancel();
                if (p->close_hangs) {  // until the socket is torn down
                    p->write_gate.expires_at(net::steady_timer::time_point::max());
                    return p->write_gate.async_wait(std::move(self));  // then: aborted, or wait again
                }
                self.complete({});
            },
            token, peer_->executor);
    }

    // The manager tears a socket down by closing its lowest layer: this one has no next_layer().
    void close() {
        peer_->aborted = true;
        peer_->read_signal.cancel();
        peer_->write_gate.cancel();
    }

protected:
    const std::shared_ptr<fake_peer>& peer() const { return peer_; }

private:
    std::shared_ptr<fake_peer> peer_;
    close_reason_type last_reason_;
    bool binary_ = false;
};

/// A socket that can also read part of a message, as Beast's read_some(buffer, limit) does.
class fake_socket_parts : public fake_socket {
public:
    using fake_socket::fake_socket;

    template <class DynamicBuffer, class Token>
    auto async_read_some(DynamicBuffer& buffer, std::size_t limit, Token&& token) {
        return net::async_compose<Token, void(error_code, std::size_t)>(
            [p = peer(), &buffer, limit, started = false](auto& self, error_code = {}) mutable {
                if (!std::exchange(started, true)) return net::post(p->executor, std::move(self));
                if (p->aborted) return self.complete(net::error::operation_aborted, 0);
                if (!p->inbox.empty()) {
                    const auto& text = p->inbox.front();
                    p->read_limits.push_back(limit);
                    const auto n = std::min(limit, text.size() - p->read_offset);
                    if (n > buffer.max_size() - buffer.size()) return self.complete(net::error::message_size, 0);
                    buffer.commit(net::buffer_copy(buffer.prepare(n), net::buffer(text.data() + p->read_offset, n)));
                    p->read_offset += n;
                    p->message_done = p->read_offset == text.size();
                    if (p->message_done) {
                        p->inbox.pop_front();
                        p->last_read_binary = p->inbox_binary.front();
                        p->inbox_binary.pop_front();
                        p->read_offset = 0;
                    }
                    return self.complete({}, n);
                }
                if (p->client_closed || (p->server_closed && !p->close_hangs)) return self.complete(net::error::eof, 0);
                p->read_signal.expires_at(net::steady_timer::time_point::max());
                p->read_signal.async_wait(std::move(self));
            },
            token, peer()->executor);
    }

    bool is_message_done() const { return peer()->message_done; }
};

}  // namespace test
