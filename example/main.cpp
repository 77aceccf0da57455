// wsbroadcast-server: the reference server. Boost.Beast for HTTP and WebSocket, wsbroadcast.hpp
// for the fan-out. It speaks the LNbits WebSocket API:
//
//   GET  /api/v1/ws/{id}          WebSocket upgrade: subscribe to {id}
//   POST /api/v1/ws/{id}          push the body (or ?data=) to every subscriber of {id}
//   GET  /api/v1/ws/{id}/{data}   push the URL-decoded {data}
//   GET  /                        a page to try it in a browser
//
// Read it top to bottom: register on accept (subscribe), push on publish (push), unregister on
// close (inside manager.serve).

#include "wsbroadcast.hpp"

#include "page.hpp"
#include "routes.hpp"

#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/websocket.hpp>

#include <charconv>
#include <cstdlib>
#include <iostream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <sys/resource.h>

namespace beast = boost::beast;
namespace http = beast::http;
namespace websocket = beast::websocket;
namespace net = boost::asio;
using tcp = net::ip::tcp;
using namespace std::chrono_literals;
using namespace wsbroadcast_server;

using ws_stream = websocket::stream<beast::tcp_stream>;
using manager_type = wsbroadcast::ConnectionManager<ws_stream>;

namespace {

constexpr std::size_t max_push_bytes = 1024 * 1024;        // a larger push body gets 413
constexpr std::size_t max_client_message_bytes = 64 * 1024;  // a larger client message gets close 1009
constexpr auto http_timeout = 30s;
constexpr auto shutdown_deadline = 3s;

void log(std::string_view what) {
    static std::mutex mutex;
    std::lock_guard lock(mutex);
    std::cerr << "wsbroadcast-server: " << what << std::endl;
}

// A co_spawn completion handler that says what went wrong instead of dropping it.
auto log_exception(std::string_view where) {
    return [where](std::exception_ptr e) {
        if (!e) return;
        try {
            std::rethrow_exception(e);
        } catch (const std::exception& ex) {
            log(std::string(where) + ": " + ex.what());
        }
    };
}

// ---- HTTP answers ----------------------------------------------------------------------------

using request = http::request<http::string_body>;
using response = http::response<http::string_body>;

response make_response(const request& req, http::status status, std::string body,
                       std::string_view content_type = "application/json") {
    response res{status, req.version()};
    res.set(http::field::server, "wsbroadcast");
    res.set(http::field::content_type, content_type);
    res.keep_alive(req.keep_alive());
    res.body() = std::move(body);
    res.prepare_payload();
    return res;
}

// FastAPI's error shape, which LNbits clients already parse.
response make_error(const request& req, http::status status, std::string_view detail) {
    return make_response(req, status, R"({"detail":)" + json_string(detail) + "}");
}

// LNbits answers {"sent": true, "data": ...}; we add how many connections the message reached.
response push(manager_type& manager, const request& req, const std::string& id, std::string_view data) {
    const auto result = manager.send(id, data);
    return make_response(req, http::status::ok,
                         R"({"sent":true,"data":)" + json_string(data) +
                             R"(,"connections":)" + std::to_string(result.queued) + "}");
}

response handle(manager_type& manager, const request& req, const route& r) {
    switch (r.kind) {
    case route_kind::page:
        return make_response(req, http::status::ok, std::string(index_html), "text/html; charset=utf-8");
    case route_kind::push_body:
        return push(manager, req, r.id, r.data ? std::string_view(*r.data) : std::string_view(req.body()));
    case route_kind::push_path:
        return push(manager, req, r.id, *r.data);
    case route_kind::subscribe: {
        auto res = make_error(req, http::status::upgrade_required, "this route is a WebSocket: send an upgrade");
        res.set(http::field::upgrade, "websocket");
        res.set(http::field::connection, "Upgrade");
        return res;
    }
    case route_kind::bad_request:
        return make_error(req, http::status::bad_request, r.problem);
    case route_kind::wrong_method: {
        auto res = make_error(req, http::status::method_not_allowed, "method not allowed");
        res.set(http::field::allow, r.allow);
        return res;
    }
    case route_kind::not_found:
        break;
    }
    return make_error(req, http::status::not_found, "not found");
}

// ---- sessions --------------------------------------------------------------------------------

net::awaitable<void> subscribe(beast::tcp_stream stream, request req, std::string id, manager_type& manager) {
    ws_stream ws(std::move(stream));
    beast::get_lowest_layer(ws).expires_never();  // the websocket's own timeouts take over
    ws.set_option(websocket::stream_base::timeout::suggested(beast::role_type::server));
    ws.set_option(websocket::stream_base::decorator(
        [](websocket::response_type& res) { res.set(http::field::server, "wsbroadcast"); }));
    ws.read_message_max(max_client_message_bytes);
    // Registered before the 101 goes out: a client that sees its handshake complete misses nothing.
    co_await manager.accept_and_serve(std::move(ws), std::move(req), std::move(id));
}

// One HTTP connection: requests until the peer leaves, or until one of them upgrades.
net::awaitable<void> http_session(beast::tcp_stream stream, manager_type& manager) {
    beast::flat_buffer buffer;
    for (;;) {
        http::request_parser<http::string_body> parser;
        parser.header_limit(8 * 1024);
        parser.body_limit(max_push_bytes);
        stream.expires_after(http_timeout);
        beast::error_code ec;
        co_await http::async_read(stream, buffer, parser, net::redirect_error(net::use_awaitable, ec));
        if (ec == http::error::end_of_stream || ec == beast::error::timeout || ec == net::error::eof) break;
        if (ec) {
            // Malformed input: say so once, then hang up. The parser's state is not reusable.
            const request bad_req{http::verb::get, "/", 11};
            auto res = ec == http::error::body_limit
                           ? make_error(bad_req, http::status::payload_too_large, "body larger than 1 MiB")
                           : make_error(bad_req, http::status::bad_request, "malformed request: " + ec.message());
            res.keep_alive(false);
            co_await http::async_write(stream, res, net::redirect_error(net::use_awaitable, ec));
            break;
        }

        request req = parser.release();
        const auto r = route_request(req.method_string(), req.target());
        if (r.kind == route_kind::subscribe && websocket::is_upgrade(req)) {
            co_await subscribe(std::move(stream), std::move(req), r.id, manager);
            co_return;
        }
        auto res = handle(manager, req, r);
        const bool keep_alive = res.keep_alive();
        co_await http::async_write(stream, res, net::redirect_error(net::use_awaitable, ec));
        if (ec || !keep_alive) break;
    }
    beast::error_code ignored;
    stream.socket().shutdown(tcp::socket::shutdown_send, ignored);
}

net::awaitable<void> accept_loop(net::io_context& ioc, tcp::acceptor& acceptor, manager_type& manager) {
    for (;;) {
        beast::error_code ec;
        // Each connection gets its own strand: its reader and writer never run at the same time.
        auto socket = co_await acceptor.async_accept(net::make_strand(ioc),
                                                     net::redirect_error(net::use_awaitable, ec));
        if (ec == net::error::operation_aborted || !acceptor.is_open()) co_return;
        if (ec) {
            log("accept: " + ec.message());  // e.g. out of file descriptors: keep serving the others
            continue;
        }
        auto executor = socket.get_executor();
        net::co_spawn(executor, http_session(beast::tcp_stream(std::move(socket)), manager),
                      log_exception("session"));
    }
}

// ---- options ---------------------------------------------------------------------------------

struct server_options {
    std::string address = "127.0.0.1";
    unsigned short port = 8080;
    unsigned threads = std::max(1u, std::thread::hardware_concurrency());
    wsbroadcast::outbox_options outbox;
};

constexpr std::string_view usage = R"(usage: wsbroadcast-server [--address ADDR] [--port PORT] [--threads N] [outbox options]

Serves the LNbits WebSocket API with wsbroadcast.hpp.

  --address ADDR             address to listen on (default 127.0.0.1)
  --port PORT                port to listen on, 0 for any free port (default 8080)
  --threads N                threads running the event loop (default: number of cores)
  --max-queued-bytes N       per-connection outbox limit in bytes (default 1048576)
  --max-queued-messages N    per-connection outbox limit in messages (default 1024)
  --overflow POLICY          when a client's outbox is full: close (with 1008, the default),
                             drop-newest or drop-oldest
  --help                     this text

Routes:
  GET  /api/v1/ws/{id}          WebSocket: receive every message pushed to {id}
  POST /api/v1/ws/{id}          push the request body (or ?data=...) to {id}
  GET  /api/v1/ws/{id}/{data}   push the URL-decoded {data} to {id}
  GET  /                        a page to try it in a browser

An id is 1 to 128 characters of [A-Za-z0-9:_-].

Example:
  wsbroadcast-server --port 8080 &
  curl -X POST http://127.0.0.1:8080/api/v1/ws/demo -d 'hello'
)";

template <class T>
bool parse_number(std::string_view text, T& out) {
    const auto [end, err] = std::from_chars(text.data(), text.data() + text.size(), out);
    return err == std::errc{} && end == text.data() + text.size();
}

bool parse_policy(std::string_view text, wsbroadcast::overflow_policy& out) {
    using enum wsbroadcast::overflow_policy;
    if (text == "close") out = close;
    else if (text == "drop-newest") out = drop_newest;
    else if (text == "drop-oldest") out = drop_oldest;
    else return false;
    return true;
}

// Returns nullopt after printing why (or the help) when the server should not start.
std::optional<server_options> parse_options(int argc, char** argv, int& exit_code) {
    server_options o;
    auto fail = [&](std::string_view why) {
        std::cerr << "wsbroadcast-server: " << why << "\n\n" << usage;
        exit_code = 2;
        return std::nullopt;
    };
    for (int i = 1; i < argc; i += 2) {  // every option but --help takes one value
        const std::string_view arg = argv[i];
        if (arg == "--help" || arg == "-h") {
            std::cout << usage;
            exit_code = 0;
            return std::nullopt;
        }
        if (i + 1 >= argc) return fail(std::string(arg) + " needs a value");
        const std::string_view value = argv[i + 1];
        bool ok = true;
        if (arg == "--address") o.address = value;
        else if (arg == "--port") ok = parse_number(value, o.port);
        else if (arg == "--threads") ok = parse_number(value, o.threads) && o.threads > 0;
        else if (arg == "--max-queued-bytes") ok = parse_number(value, o.outbox.max_bytes) && o.outbox.max_bytes > 0;
        else if (arg == "--max-queued-messages")
            ok = parse_number(value, o.outbox.max_messages) && o.outbox.max_messages > 0;
        else if (arg == "--overflow") ok = parse_policy(value, o.outbox.on_overflow);
        else return fail("unknown option " + std::string(arg));
        if (!ok) return fail("invalid value for " + std::string(arg) + ": " + std::string(value));
    }
    return o;
}

// Each connection is a file descriptor; the usual soft limit of 1024 would cap the server there.
void raise_open_file_limit() {
    rlimit limit{};
    if (getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur < limit.rlim_max) {
        limit.rlim_cur = limit.rlim_max;
        setrlimit(RLIMIT_NOFILE, &limit);
    }
}

// Stops the loop once every WebSocket has answered its close frame, or at the deadline.
net::awaitable<void> wait_for_connections_to_close(manager_type& manager, net::io_context& ioc) {
    net::steady_timer timer(co_await net::this_coro::executor);
    const auto deadline = std::chrono::steady_clock::now() + shutdown_deadline;
    while (manager.size() > 0 && std::chrono::steady_clock::now() < deadline) {
        timer.expires_after(20ms);
        co_await timer.async_wait(net::use_awaitable);
    }
    if (manager.size() > 0) log("shutdown deadline reached with " + std::to_string(manager.size()) + " connection(s) open");
    ioc.stop();  // ends idle keep-alive HTTP sessions too
}

}  // namespace

int main(int argc, char** argv) {
    int exit_code = 0;
    const auto options = parse_options(argc, argv, exit_code);
    if (!options) return exit_code;

    raise_open_file_limit();
    manager_type manager(wsbroadcast::options{options->outbox, {}});  // before the io_context: it outlives every connection
    net::io_context ioc(static_cast<int>(options->threads));

    tcp::acceptor acceptor(net::make_strand(ioc));  // a strand: the signal handler closes it
    try {
        const tcp::endpoint endpoint(net::ip::make_address(options->address), options->port);
        acceptor.open(endpoint.protocol());
        acceptor.set_option(net::socket_base::reuse_address(true));
        acceptor.bind(endpoint);
        acceptor.listen(net::socket_base::max_listen_connections);
    } catch (const std::exception& e) {
        std::cerr << "wsbroadcast-server: cannot listen on " << options->address << ":" << options->port << ": "
                  << e.what() << '\n';
        return 1;
    }
    net::signal_set signals(ioc, SIGINT, SIGTERM);
    signals.async_wait([&](const beast::error_code& ec, int signal) {
        if (ec) return;
        log(std::string("received ") + (signal == SIGINT ? "SIGINT" : "SIGTERM") + ", closing " +
            std::to_string(manager.size()) + " connection(s) with 1001");
        net::post(acceptor.get_executor(), [&] {
            beast::error_code ignored;
            acceptor.close(ignored);
        });
        manager.close_all(1001, "server shutting down");
        net::co_spawn(ioc, wait_for_connections_to_close(manager, ioc), log_exception("shutdown"));
    });

    const auto bound = acceptor.local_endpoint();
    const auto host = bound.address().is_v6() ? "[" + bound.address().to_string() + "]" : bound.address().to_string();
    // Signals are handled from here on; tests read the port from this line (with --port 0).
    std::cout << "wsbroadcast-server listening on http://" << host << ":" << bound.port() << " with "
              << options->threads << " thread(s)" << std::endl;

    net::co_spawn(acceptor.get_executor(), accept_loop(ioc, acceptor, manager), log_exception("accept loop"));

    std::vector<std::thread> threads;
    for (unsigned i = 1; i < options->threads; ++i) threads.emplace_back([&] { ioc.run(); });
    ioc.run();
    for (auto& t : threads) t.join();
    log("stopped");
    return 0;
}
