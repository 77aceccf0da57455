#include "wsbroadcast.hpp"

#include <boost/beast.hpp>
#include <iostream>

namespace beast = boost::beast;
namespace net = boost::asio;
// batching_stream: every message queued for a client leaves in one system call.
using socket_type = beast::websocket::stream<wsbroadcast::batching_stream<net::ip::tcp::socket>>;

wsbroadcast::ConnectionManager<socket_type> manager;  // keys are std::string

// GET /ws/{id} with an upgrade: the client gets every message sent to {id} until it leaves.
net::awaitable<void> session(net::ip::tcp::socket tcp) {
    beast::flat_buffer buffer;
    beast::http::request<beast::http::string_body> request;
    co_await beast::http::async_read(tcp, buffer, request, net::use_awaitable);
    std::string id(request.target().substr(4));
    co_await manager.accept_and_serve(socket_type(std::move(tcp)), std::move(request), std::move(id));
}

// Anywhere, from any thread: every client subscribed to "invoice-42" gets this once.
void on_payment() { manager.send("invoice-42", R"({"paid": true})"); }

int main() {
    auto report = [](std::exception_ptr e) {
        try {
            if (e) std::rethrow_exception(e);
        } catch (std::exception& x) {
            std::cerr << x.what() << '\n';
        }
    };
    net::io_context ioc;
    net::ip::tcp::acceptor acceptor(ioc, {net::ip::make_address("127.0.0.1"), 8080});
    net::co_spawn(
        ioc,
        [&]() -> net::awaitable<void> {
            for (;;) net::co_spawn(ioc, session(co_await acceptor.async_accept(net::use_awaitable)), report);
        },
        report);
    ioc.run();
}
