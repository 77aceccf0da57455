// wsbroadcast-server: the reference server. Boost.Beast for HTTP and WebSocket (plain or TLS),
// wsbroadcast.hpp for the fan-out. It speaks the LNbits WebSocket API:
//
//   GET  /api/v1/ws/{id}          WebSocket upgrade: subscribe to {id}
//   POST /api/v1/ws/{id}          push the body (or ?data=) to every subscriber of {id}
//   GET  /api/v1/ws/{id}/{data}   push the URL-decoded {data}
//   GET  /                        a page to try it in a browser
//
// Beyond LNbits, a push may name several ids ("a,b"), and a client offering the wsbroadcast.v1
// subprotocol gets one connection for many ids, subscribed and unsubscribed by commands
// (docs/protocol.md; the frames are in protocol.hpp).
//
// Read it top to bottom: register on accept (subscribe), push on publish (push), unregister on
// close (inside manager.accept_and_serve). The session code is written once for both transports:
// Stream is beast::tcp_stream or tls_stream (tls_stream.hpp).

#include "wsbroadcast.hpp"

#include "cors.hpp"
#include "environment.hpp"
#include "http_answer.hpp"
#include "log_format.hpp"
#include "log_writer.hpp"
#include "page.hpp"
#include "process_metrics.hpp"
#include "protocol.hpp"
#include "client_js.hpp"  // made by the build from example/wsbroadcast.js
#include "redis_relay.hpp"
#include "routes.hpp"
#include "systemd.hpp"
#include "tls_stream.hpp"

#include <boost/json/src.hpp>  // Boost.JSON, compiled here (header-only use): protocol.hpp reads commands

#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/websocket.hpp>
#include <boost/version.hpp>

#include <CLI/CLI.hpp>

#include <openssl/crypto.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
#include <charconv>
#include <csignal>
#include <cstdlib>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <iostream>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <sys/resource.h>

namespace beast = boost::beast;
namespace http = beast::http;
namespace websocket = beast::websocket;
namespace net = boost::asio;
namespace ssl = net::ssl;
using tcp = net::ip::tcp;
using namespace std::chrono_literals;
using namespace wsbroadcast_server;

namespace {

// ---- options ---------------------------------------------------------------------------------

struct server_options {
    std::string address = "127.0.0.1";
    unsigned short port = 8080;
    unsigned threads = std::max(1u, std::thread::hardware_concurrency());
    std::string publish_token;                            // empty: pushes are open (allowed on loopback only)
    std::string publish_token_file, redis_password_file;  // secrets kept off the command line
    bool allow_open_publish = false;
    bool trust_proxy = false;  // open pushing: a proxy in front restricts who may push
    // HTTP connections not (yet) upgraded to a WebSocket: each costs a coroutine and its buffers
    // (over TLS tens of KiB) before it has sent a byte, so their number is bounded by default.
    std::size_t max_pending_connections = 1024;
    unsigned handshake_timeout_seconds = 10;           // TLS handshake and first request
    std::size_t max_requests_per_connection = 100000;  // then "Connection: close" (nginx: 1000)
    std::vector<std::string> allowed_origins;          // empty: any origin may open a WebSocket
    std::vector<std::string> cors_origins;             // browser origins that may push; "*": any
    std::size_t max_message_bytes = 64 * 1024;
    std::size_t max_connections = 0;
    std::size_t max_connections_per_key = 0;
    std::size_t max_keys_per_connection = 64;  // wsbroadcast.v1 connections
    unsigned idle_timeout_seconds = 60;
    std::string tls_cert, tls_key;
    wsbroadcast::outbox_options outbox;
    // Backpressure: while the outboxes hold more than this in all, a push waits for the writers,
    // up to push_wait, then gets 503; 0: pushes never wait.
    std::size_t max_total_queued_bytes = 16 * 1024 * 1024;
    std::chrono::milliseconds push_wait = 5s;
    std::optional<redis_address> redis;  // set: pushes go through Redis to every instance
    std::string redis_prefix = "wsbroadcast:";
    redis_liveness redis_timing;
    wsbroadcast::history_options history{.max_messages = 0, .ttl = 120s};  // --history-size 0: off
};

log_level current_log_level = log_level::info;
std::optional<log_format> chosen_log_format;  // --log-format; else journal or text, by stderr
log_format current_log_format = log_format::text;

constexpr auto http_timeout = 30s;
constexpr auto shutdown_drain = 3s;

constexpr std::string_view usage = R"(usage: wsbroadcast-server [options]

Serves the LNbits WebSocket API with wsbroadcast.hpp.

  --address ADDR                 address to listen on (default 127.0.0.1)
  --port PORT                    port to listen on, 0 for any free port (default 8080)
  --threads N                    threads running the event loop (default: number of cores)
  --publish-token TOKEN          pushes must carry "Authorization: Bearer TOKEN" or "X-Api-Key: TOKEN"
                                 (also from WSBROADCAST_PUBLISH_TOKEN); without a token, pushing is
                                 open, which is allowed only on a loopback address
  --allow-open-publish           allow open pushing on a non-loopback address anyway
  --trust-proxy                  without a publish token, pushes that came through a reverse proxy
                                 (Forwarded, X-Forwarded-For, X-Real-IP) are refused with 403: the
                                 proxy makes the internet look like loopback; this says the proxy
                                 itself restricts who may push
  --allowed-origin ORIGIN        a browser origin allowed to open WebSockets, e.g. https://example.com
                                 (repeatable; default: any origin)
  --cors-origin ORIGIN           a browser origin allowed to push (fetch from its pages, read the
                                 answers), or * for any (repeatable; default: * without
                                 --publish-token, none with it); pushes from other origins get 403
  --max-message-bytes N          largest push body (413) and client message (close 1009) (default 65536)
  --max-connections N            WebSocket connections in all, 0 for no limit (default 0); over it: 503
  --max-connections-per-key N    WebSocket connections per id, 0 for no limit (default 0); over it: 503
                                 (for a wsbroadcast.v1 subscribe command: an error frame)
  --max-keys-per-connection N    ids one wsbroadcast.v1 connection may subscribe to, 0 for no limit
                                 (default 64); over it: an error frame
  --max-pending-connections N    HTTP connections not upgraded to a WebSocket (in their TLS
                                 handshake, sending a request, or kept alive between pushes) at
                                 once (default 1024); over it a new connection is closed at once
  --handshake-timeout SECONDS    time for the TLS handshake and the first request (default 10)
  --max-requests-per-connection N
                                 HTTP requests one keep-alive connection may make, pipelined or
                                 not; the last answer closes it (default 100000)
  --idle-timeout SECONDS         drop a client that answers no ping, or takes no byte written to it,
                                 for this long (default 60)
  --tls-cert FILE --tls-key FILE serve https:// and wss:// with this PEM certificate chain and key;
                                 SIGHUP reads them again for new connections (renewal)
  --max-queued-bytes N           per-connection outbox limit in bytes (default 1048576)
  --max-queued-messages N        per-connection outbox limit in messages (default 1024)
  --overflow POLICY              when a client's outbox is full: close (with 1008, the default),
                                 drop-newest or drop-oldest
  --max-total-queued-bytes N     backpressure: while all outboxes together hold more than N bytes (a
                                 message to 1,000 clients counts 1,000 times), a push waits for the
                                 writers to catch up, then 503 (default 16777216; 0: never wait)
  --push-wait SECONDS            how long such a push waits before its 503 (default 5)
  --redis URL                    share ids with other instances through Redis pub/sub:
                                 redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]. A push is published
                                 and every instance delivers it to its own subscribers; each
                                 instance subscribes only to ids it has subscribers for. While
                                 Redis is unreachable pushes answer 503 and the server reconnects.
                                 Without history, delivery across instances is at most once; with
                                 --history-size, Redis keeps the history, a client resumes on any
                                 instance, and an instance repairs what it missed. (Pub/sub
                                 ignores /DB.)
  --redis-prefix PREFIX          channel name prefix, to share one Redis between deployments
                                 (default "wsbroadcast:"; the channel for id X is PREFIX + X)
  --redis-ping-interval SECONDS  PING Redis this often (default 5)
  --redis-ping-timeout SECONDS   a Redis that answers no PING for this long is taken as gone, as
                                 if its connection had closed (default 5): a stopped Redis
                                 keeps its connections open
  --history-size N               messages kept per id for wsbroadcast.v1 clients that resume
                                 (?since=POSITION, docs/protocol.md); 0 turns history off (default 0)
  --history-ttl SECONDS          how long a kept message can be resumed (default 120)
  --history-max-bytes N          bytes kept in all ids together (default 67108864); the ids pushed to
                                 least recently lose their messages first
  --history-key-bytes N          bytes kept per id (default 262144)
  --publish-token-file FILE      read the publish token from FILE (its first line), out of sight of
                                 ps; under systemd the credential "publish-token"
                                 ($CREDENTIALS_DIRECTORY/publish-token) is read when neither is given
  --redis-password-file FILE     the Redis password, from FILE rather than the --redis URL; under
                                 systemd, the credential "redis-password" when the URL has none
  --log-format FORMAT            text (a UTC timestamp, the level, the line), journal (journald's
                                 <N> priority prefixes) or json (one object per line); default:
                                 journal when stderr is journald's ($JOURNAL_STREAM), else text
  --log-level LEVEL              error, warn, info (default: + every refusal) or debug (+ every
                                 connection opening and closing). Each kind of refusal logs at most
                                 10 lines a second, then one "suppressed N" line; lines are written
                                 by a thread of their own and dropped (and counted) past 1 MiB
  --version                      the version, and those of Boost, OpenSSL and hiredis
  --help                         this text

An option's value may follow it (--port 8080) or be joined to it (--port=8080); given twice, the
last one wins; -- ends the options. Every option can also come from the environment:
--max-connections 100 is WSBROADCAST_MAX_CONNECTIONS=100, --allow-open-publish is
WSBROADCAST_ALLOW_OPEN_PUBLISH=1, and WSBROADCAST_ALLOWED_ORIGIN and WSBROADCAST_CORS_ORIGIN take
comma-separated lists. The command line wins. A flag takes 1, true, yes or on, or 0, false, no or
off (any case), as --flag=VALUE or from its variable; any other value, or a variable set but empty,
is refused at start-up (exit 2), naming the variable it came from.

Routes:
  GET  /api/v1/ws/{id}          WebSocket: receive every message pushed to {id}
  POST /api/v1/ws/{ids}         push the request body (or ?data=...) to {ids}
  GET  /api/v1/ws/{ids}/{data}  push the URL-decoded {data} to {ids}
  OPTIONS /api/v1/ws/...        a browser's CORS preflight before a push (204)
  GET  /api/v1/ws               WebSocket with the wsbroadcast.v1 subprotocol only
  GET  /                        a page to try it in a browser
  GET  /metrics                 counters and gauges, Prometheus text format
  GET  /healthz                 {"status":"ok",...} while the process runs (also HEAD)
  GET  /readyz                  {"status":"ready"}, or 503 while draining or while Redis is away
                                (also HEAD)

An id is 1 to 128 characters of [A-Za-z0-9:_-]. {ids} is one id, or up to 64 separated by
commas: the push reaches each connection once, however many of them it is subscribed to.

A client offering the WebSocket subprotocol wsbroadcast.v1 (on /api/v1/ws/{id} or on /api/v1/ws)
gets every message as {"type":"message","key":...,"data":...} and may send
{"type":"subscribe","key":"..."} and {"type":"unsubscribe","key":"..."}; see docs/protocol.md.
Other clients see exactly the LNbits API.

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
    if (text == "close")
        out = close;
    else if (text == "drop-newest")
        out = drop_newest;
    else if (text == "drop-oldest")
        out = drop_oldest;
    else
        return false;
    return true;
}

bool parse_level(std::string_view text, log_level& out) {
    if (text == "error")
        out = log_level::error;
    else if (text == "warn")
        out = log_level::warn;
    else if (text == "info")
        out = log_level::info;
    else if (text == "debug")
        out = log_level::debug;
    else
        return false;
    return true;
}

// WSBROADCAST_MAX_CONNECTIONS for --max-connections: every option may come from the environment.
std::string environment_variable(std::string_view option) {
    std::string name = "WSBROADCAST_";
    for (char c : option) name += c == '-' ? '_' : static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    return name;
}

std::string own_version() {
    return std::to_string(WSBROADCAST_VERSION_MAJOR) + "." + std::to_string(WSBROADCAST_VERSION_MINOR) + "." +
           std::to_string(WSBROADCAST_VERSION_PATCH);
}
std::string boost_version() {
    return std::to_string(BOOST_VERSION / 100000) + "." + std::to_string(BOOST_VERSION / 100 % 1000) + "." +
           std::to_string(BOOST_VERSION % 100);
}
std::string hiredis_version() {
    return std::to_string(HIREDIS_MAJOR) + "." + std::to_string(HIREDIS_MINOR) + "." + std::to_string(HIREDIS_PATCH);
}

// A secret's file: its first line. `required`: a missing file is an error; otherwise (a systemd
// credential that may not be set) it reads as nothing. An empty secret is always an error.
std::optional<std::string> read_secret(const std::string& path, bool required, std::string& problem) {
    std::ifstream in(path);
    if (!in) {
        if (!required) return std::string();
        problem = "cannot read " + path + ": " + std::strerror(errno);
        return std::nullopt;
    }
    std::string line;
    std::getline(in, line);
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty()) {
        problem = path + " is empty: a secret must not be";
        return std::nullopt;
    }
    return line;
}

// The command line (and the environment) read by CLI11; what each value means is decided here.
// Returns nullopt after printing why (or the help) when the server should not start.
std::optional<server_options> parse_options(int argc, char** argv, int& exit_code) {
    server_options o;
    std::string problem;
    auto fail = [&](std::string_view why) {
        std::cerr << "wsbroadcast-server: " << why << "\nTry 'wsbroadcast-server --help' for the options.\n";
        exit_code = 2;
        return std::nullopt;
    };
    // The options the command line names. A bad value that came from the environment is reported
    // under its variable's name: that is where the operator has to fix it.
    std::set<std::string, std::less<>> on_command_line;
    for (int i = 1; i < argc; ++i) {
        const std::string_view arg = argv[i];
        if (arg == "--") break;
        if (arg.starts_with("--")) on_command_line.emplace(arg.substr(2, arg.find('=') - 2));
    }
    auto source = [&](const std::string& name) {
        const bool from_environment =
            !on_command_line.contains(name) && std::getenv(environment_variable(name).c_str()) != nullptr;
        return from_environment ? environment_variable(name) + " (--" + name + ")" : "--" + name;
    };
    auto invalid = [&](const std::string& name, const std::string& shown) {
        // Not a ValidationError: CLI11 would put the option's name in front of this message again.
        return CLI::ConversionError("invalid value for " + source(name) + ": " + shown);
    };

    CLI::App app{"", "wsbroadcast-server"};
    app.set_help_flag("-h,--help");  // prints `usage`, grouped the way an operator reads it
    app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);  // the last one wins
    bool version = false;
    app.add_flag("--version", version);
    // An option with a value: `apply` stores it and says whether it is valid.
    auto value = [&](const std::string& name, std::function<bool(const std::string&)> apply,
                     std::string (*shown)(std::string_view) = nullptr) {
        app.add_option_function<std::string>("--" + name,
                                             [&invalid, name, apply, shown](const std::string& v) {
                                                 if (!apply(v)) throw invalid(name, shown ? shown(v) : v);
                                             })
            ->envname(environment_variable(name))
            ->type_name("VALUE");
    };
    auto number = [&](const std::string& name, auto& out, bool positive = false) {
        value(name, [&out, positive](const std::string& v) { return parse_number(v, out) && (!positive || out > 0); });
    };
    auto seconds = [&](const std::string& name, auto& out) {
        value(name, [&out](const std::string& v) {
            unsigned n = 0;
            if (!parse_number(v, n) || n == 0) return false;
            out = std::chrono::seconds(n);
            return true;
        });
    };
    auto text = [&](const std::string& name, std::string& out, bool may_be_empty = true) {
        value(name, [&out, may_be_empty](const std::string& v) { return !(out = v).empty() || may_be_empty; });
    };
    // Origins never contain a comma: from the environment, a comma-separated list.
    auto list = [&](const std::string& name, std::vector<std::string>& out) {
        app.add_option("--" + name, out)
            ->envname(environment_variable(name))
            ->delimiter(',')
            ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
    };
    // A flag takes a strict boolean from the environment (or as --flag=VALUE): a typo must not
    // silently mean "on", or "off".
    auto flag = [&](const std::string& name, bool& out) {
        app.add_flag("--" + name, out)
            ->envname(environment_variable(name))
            ->check(CLI::Validator(
                [&invalid, name](std::string& v) {
                    if (!parse_boolean(v))
                        throw invalid(name, "\"" + v + "\" (1, true, yes or on, or 0, false, no or off, any case)");
                    return std::string();
                },
                "BOOLEAN"));
    };

    text("address", o.address);
    number("port", o.port);
    number("threads", o.threads, true);
    text("publish-token", o.publish_token, false);
    text("publish-token-file", o.publish_token_file, false);
    flag("allow-open-publish", o.allow_open_publish);
    flag("trust-proxy", o.trust_proxy);
    list("allowed-origin", o.allowed_origins);
    list("cors-origin", o.cors_origins);
    number("max-message-bytes", o.max_message_bytes, true);
    number("max-connections", o.max_connections);
    number("max-connections-per-key", o.max_connections_per_key);
    number("max-keys-per-connection", o.max_keys_per_connection);
    number("max-pending-connections", o.max_pending_connections, true);
    number("handshake-timeout", o.handshake_timeout_seconds, true);
    number("max-requests-per-connection", o.max_requests_per_connection, true);
    number("idle-timeout", o.idle_timeout_seconds, true);
    text("tls-cert", o.tls_cert);
    text("tls-key", o.tls_key);
    number("max-queued-bytes", o.outbox.max_bytes, true);
    number("max-queued-messages", o.outbox.max_messages, true);
    value("overflow", [&](const std::string& v) { return parse_policy(v, o.outbox.on_overflow); });
    number("max-total-queued-bytes", o.max_total_queued_bytes);
    seconds("push-wait", o.push_wait);
    value(
        "redis", [&](const std::string& v) { return (o.redis = parse_redis_url(v)).has_value(); },
        [](std::string_view v) { return redacted_redis_url(v); });  // a password in it stays out of the log
    text("redis-password-file", o.redis_password_file, false);
    text("redis-prefix", o.redis_prefix);
    seconds("redis-ping-interval", o.redis_timing.ping_interval);
    seconds("redis-ping-timeout", o.redis_timing.ping_timeout);
    number("history-size", o.history.max_messages);
    seconds("history-ttl", o.history.ttl);
    number("history-max-bytes", o.history.max_total_bytes, true);
    number("history-key-bytes", o.history.max_bytes, true);
    value("log-level", [](const std::string& v) { return parse_level(v, current_log_level); });
    value("log-format", [](const std::string& v) { return (chosen_log_format = parse_log_format(v)).has_value(); });

    // CLI11 passes over a variable that is set but empty; here it is refused, as a typo would be.
    for (const CLI::Option* option : app.get_options()) {
        const auto name = option->get_envname();
        const char* from_environment = name.empty() ? nullptr : std::getenv(name.c_str());
        if (from_environment && !*from_environment) return fail(name + " is set but empty");
    }
    try {
        app.parse(argc, argv);
    } catch (const CLI::CallForHelp&) {
        std::cout << usage;
        exit_code = 0;
        return std::nullopt;
    } catch (const CLI::ParseError& e) {
        return fail(e.what());
    }
    if (version) {
        std::cout << "wsbroadcast-server " << own_version() << " (Boost " << boost_version() << ", "
                  << OpenSSL_version(OPENSSL_VERSION) << ", hiredis " << hiredis_version() << ")\n";
        exit_code = 0;
        return std::nullopt;
    }
    if (o.tls_cert.empty() != o.tls_key.empty()) return fail("--tls-cert and --tls-key go together");
    // Secrets from files: those given, else systemd's credentials (LoadCredential=) when present.
    const char* credentials = std::getenv("CREDENTIALS_DIRECTORY");
    auto credential = [&](const char* name) { return credentials ? std::string(credentials) + "/" + name : ""; };
    if (!o.publish_token_file.empty() && !o.publish_token.empty())
        return fail("--publish-token and --publish-token-file: give one");
    if (o.publish_token.empty()) {
        const bool given = !o.publish_token_file.empty();
        const auto path = given ? o.publish_token_file : credential("publish-token");
        if (!path.empty()) {
            auto secret = read_secret(path, given, problem);
            if (!secret) return fail(problem);
            o.publish_token = std::move(*secret);
        }
    }
    if (!o.redis_password_file.empty() && !o.redis) return fail("--redis-password-file needs --redis");
    if (o.redis && (!o.redis_password_file.empty() || (o.redis->password.empty() && credentials))) {
        const bool given = !o.redis_password_file.empty();
        auto secret = read_secret(given ? o.redis_password_file : credential("redis-password"), given, problem);
        if (!secret) return fail(problem);
        if (!secret->empty()) o.redis->password = std::move(*secret);
    }
    // As LNbits: when anyone may push, any page may too. With a token, no other page may unless named.
    if (o.cors_origins.empty() && o.publish_token.empty()) o.cors_origins.emplace_back("*");
    // A push the outbox could never hold behind anything else would make every busy subscriber
    // overflow on it: say so at start rather than at the first large push.
    if (o.max_message_bytes > o.outbox.max_bytes)
        return fail("--max-message-bytes (" + std::to_string(o.max_message_bytes) +
                    ") is larger than --max-queued-bytes (" + std::to_string(o.outbox.max_bytes) +
                    "): a push that size could never queue");
    return o;
}

// ---- logging and counting --------------------------------------------------------------------

// Never destroyed: its thread may still be blocked writing to stderr when the process exits.
log_writer& log_output() {
    static auto* output = new log_writer(STDERR_FILENO);
    return *output;
}

// Queues the line: no thread serving connections ever waits on stderr.
void log(log_level level, std::string_view what) {
    if (level > current_log_level) return;
    log_output().write(format_log_line(current_log_format, level, what, std::chrono::system_clock::now()));
}

// A co_spawn completion handler that says what went wrong instead of dropping it.
auto log_exception(std::string_view where) {
    return [where](std::exception_ptr e) {
        if (!e) return;
        try {
            std::rethrow_exception(e);
        } catch (const std::exception& ex) {
            log(log_level::error, std::string(where) + ": " + ex.what());
        }
    };
}

// Every refusal is logged with its reason and counted by kind (the label in /metrics).
enum class refusal {
    unauthorized,
    forbidden_origin,
    too_large,
    connection_limit,
    bad_request,
    shutting_down,
    relay_unavailable,
    key_limit,    // a wsbroadcast.v1 subscribe over --max-keys-per-connection
    bad_command,  // a wsbroadcast.v1 command that cannot be carried out
    overloaded,   // a push that waited --push-wait for the writers to catch up
    count
};
constexpr std::string_view refusal_labels[] = {
    "unauthorized",  "forbidden_origin",  "too_large", "connection_limit", "bad_request",
    "shutting_down", "relay_unavailable", "key_limit", "bad_command",      "overloaded"};
static_assert(std::size(refusal_labels) == static_cast<std::size_t>(refusal::count));
std::atomic<std::uint64_t> refusals[static_cast<int>(refusal::count)];
std::atomic<std::uint64_t> pushes_accepted{0};
std::atomic<std::uint64_t> pushes_held{0};  // waited for the writers (--max-total-queued-bytes)

// A flood of one kind of refusal is counted in full (/metrics) but logged as at most this many
// lines a second, and then one line saying how many more there were.
constexpr std::uint64_t refusal_lines_per_second = 10;

struct refusal_log_window {
    std::chrono::steady_clock::time_point start;
    std::uint64_t logged = 0, suppressed = 0;
};
std::mutex refusal_log_mutex;
refusal_log_window refusal_log_windows[static_cast<int>(refusal::count)];

std::string suppressed_line(refusal kind, std::uint64_t n) {
    return "refused (" + std::string(refusal_labels[static_cast<int>(kind)]) + "): suppressed " + std::to_string(n) +
           " similar line(s)";
}

void refuse(refusal kind, std::string_view what) {
    refusals[static_cast<int>(kind)].fetch_add(1, std::memory_order_relaxed);
    if (log_level::info > current_log_level) return;
    const auto now = std::chrono::steady_clock::now();
    std::uint64_t suppressed_before = 0;
    bool logged = false;
    {
        std::lock_guard lock(refusal_log_mutex);
        auto& window = refusal_log_windows[static_cast<int>(kind)];
        if (now - window.start >= 1s) {
            suppressed_before = window.suppressed;
            window = {now, 0, 0};
        }
        logged = window.logged < refusal_lines_per_second;
        ++(logged ? window.logged : window.suppressed);
    }
    if (suppressed_before) log(log_level::info, suppressed_line(kind, suppressed_before));
    if (logged)
        log(log_level::info,
            "refused (" + std::string(refusal_labels[static_cast<int>(kind)]) + "): " + std::string(what));
}

// At exit: what the last window of each flood left unsaid.
void report_suppressed_refusals() {
    for (int i = 0; i < static_cast<int>(refusal::count); ++i) {
        std::uint64_t n = 0;
        {
            std::lock_guard lock(refusal_log_mutex);
            n = std::exchange(refusal_log_windows[i].suppressed, 0);
        }
        if (n) log(log_level::info, suppressed_line(static_cast<refusal>(i), n));
    }
}

// How a refusal of the manager's (at connect, or of a subscribe command) counts.
refusal refusal_of(wsbroadcast::error_code ec) {
    if (ec == wsbroadcast::error::shutting_down) return refusal::shutting_down;
    if (ec == wsbroadcast::error::key_limit) return refusal::key_limit;
    return refusal::connection_limit;
}

// "a,b" for the log.
std::string joined(const std::vector<std::string>& ids) {
    std::string out;
    for (const auto& id : ids) out += (out.empty() ? "" : ",") + id;
    return out;
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

// An answer goes out as its head, flattened into `head` (which the session keeps from one
// request to the next), and its body: two buffers, one write (see http_answer.hpp).
template <class Stream>
net::awaitable<void> write_answer(Stream& stream, const response& res, std::string& head, beast::error_code& ec) {
    write_head(res.base(), head);
    const std::array<net::const_buffer, 2> bytes{net::buffer(head), net::buffer(res.body())};
    co_await net::async_write(stream, bytes, net::redirect_error(net::use_awaitable, ec));
}

// What a WebSocket runs over once the HTTP session hands it off: the bare socket for plain TCP (the
// timers of a tcp_stream serve the HTTP timeouts and would cost memory on every idle connection;
// the manager's liveness rule takes over), the TLS stream as it is (without its timer).
template <class Stream>
struct websocket_transport {
    using type = Stream;
};
template <>
struct websocket_transport<beast::tcp_stream> {
    using type = beast::tcp_stream::socket_type;
};

// The TLS contexts handshakes use: new connections get the newest. reload() reads the certificate
// and key again into a new context (SIGHUP: how a renewed certificate is put in service); the older
// ones are kept, since connections made with them may still be open (a few KiB per reload).
class tls_contexts {
public:
    tls_contexts(std::string cert_file, std::string key_file)
        : cert_file_(std::move(cert_file)), key_file_(std::move(key_file)) {
        reload();
    }
    tls_contexts(const tls_contexts&) = delete;

    ssl::context& current() {
        std::lock_guard lock(mutex_);
        return *contexts_.back();
    }
    // Throws what OpenSSL says (a missing file, a key that is not the certificate's); the current
    // context stays as it was then.
    void reload() {
        auto next = std::make_unique<ssl::context>(ssl::context::tls_server);
        next->set_options(ssl::context::default_workarounds | ssl::context::no_sslv2 | ssl::context::no_sslv3 |
                          ssl::context::no_tlsv1 | ssl::context::no_tlsv1_1);
        next->use_certificate_chain_file(cert_file_);
        next->use_private_key_file(key_file_, ssl::context::pem);
        std::lock_guard lock(mutex_);
        contexts_.push_back(std::move(next));
    }
    const std::string& cert_file() const { return cert_file_; }

private:
    const std::string cert_file_, key_file_;
    std::mutex mutex_;
    std::vector<std::unique_ptr<ssl::context>> contexts_;
};

// The server's state shared by every session: the options and the manager for this transport.
template <class Stream>
struct server_state {
    using stream_type = Stream;
    // batching_stream: the manager writes every message queued for a client in one system call.
    using ws_stream = websocket::stream<wsbroadcast::batching_stream<typename websocket_transport<Stream>::type>>;
    using manager_type = wsbroadcast::ConnectionManager<ws_stream>;
    using relay_type = redis_relay<manager_type>;

    const server_options& options;
    std::shared_ptr<relay_type> relay;  // with --redis; the manager holds it too
    manager_type manager;
    tls_contexts* tls = nullptr;          // set when Stream is a tls_stream
    std::atomic<std::size_t> pending{0};  // HTTP sessions not handed to the manager (--max-pending-connections)
    std::atomic<bool> draining{false};    // SIGINT/SIGTERM: /readyz says 503 while connections close
};

// The accept loop counts a connection in State::pending as it accepts it (a burst of accepts must
// not outrun sessions that have not started yet); the session lets go of it when it ends.
template <class State>
struct pending_session {
    State& state;
    explicit pending_session(State& s) : state(s) {}
    ~pending_session() { state.pending.fetch_sub(1, std::memory_order_relaxed); }
    pending_session(const pending_session&) = delete;
    pending_session& operator=(const pending_session&) = delete;
};

bool authorized(const server_options& o, const request& req) {
    if (o.publish_token.empty()) return true;
    return secret_matches(bearer_token(req[http::field::authorization]), o.publish_token) ||
           secret_matches(req["X-Api-Key"], o.publish_token);
}

// The Prometheus text exposition format: HELP, TYPE, then the samples.
template <class State>
std::string metrics_text(const State& state) {
    const auto& manager = state.manager;
    const auto stats = manager.stats();
    std::string out;
    auto metric = [&out](std::string_view name, std::string_view type, std::string_view help,
                         std::initializer_list<std::pair<std::string, std::uint64_t>> samples) {
        out += "# HELP " + std::string(name) + " " + std::string(help) + "\n";
        out += "# TYPE " + std::string(name) + " " + std::string(type) + "\n";
        for (auto& [labels, value] : samples) out += std::string(name) + labels + " " + std::to_string(value) + "\n";
    };
    // A counter's name without _total must not be another metric's: hence "opened".
    metric("wsbroadcast_connections", "gauge", "WebSocket connections registered now.", {{"", manager.size()}});
    metric("wsbroadcast_connections_opened_total", "counter", "WebSocket connections registered since start.",
           {{"", stats.connections}});
    metric("wsbroadcast_keys", "gauge", "Ids with at least one connection.", {{"", manager.key_count()}});
    metric("wsbroadcast_pushes_total", "counter", "Push requests accepted.", {{"", pushes_accepted.load()}});
    metric("wsbroadcast_pushes_held_total", "counter",
           "Pushes that waited for the writers to catch up (--max-total-queued-bytes).", {{"", pushes_held.load()}});
    metric("wsbroadcast_messages_total", "counter", "Messages that reached at least one connection.",
           {{"", stats.messages}});
    metric("wsbroadcast_deliveries_total", "counter", "Messages queued to connections.", {{"", stats.deliveries}});
    metric("wsbroadcast_queued_bytes", "gauge", "Bytes held in outboxes now.", {{"", manager.queued_bytes()}});
    metric("wsbroadcast_dropped_messages_total", "counter", "Messages dropped from full outboxes.",
           {{"", stats.dropped}});
    metric("wsbroadcast_policy_closes_total", "counter", "Connections closed by the overflow policy.",
           {{R"({reason="outbox_full"})", stats.overflow_closes}});
    metric("wsbroadcast_errors_total", "counter", "Unexpected connection errors.", {{"", stats.errors}});
    metric("wsbroadcast_history_keys", "gauge", "Ids with a position in the history (--history-size).",
           {{"", manager.history_keys()}});
    metric("wsbroadcast_history_bytes", "gauge", "Bytes of messages the history keeps now.",
           {{"", manager.history_bytes()}});
    metric("wsbroadcast_resumes_total", "counter", "wsbroadcast.v1 subscriptions that asked to resume, by outcome.",
           {{R"({result="recovered"})", stats.recovered}, {R"({result="not_recovered"})", stats.not_recovered}});
    metric("wsbroadcast_replayed_messages_total", "counter", "Messages sent from the history to resuming clients.",
           {{"", stats.replayed}});
    out +=
        "# HELP wsbroadcast_refusals_total Requests and connections refused, by reason.\n"
        "# TYPE wsbroadcast_refusals_total counter\n";
    for (int i = 0; i < static_cast<int>(refusal::count); ++i)
        out += "wsbroadcast_refusals_total{reason=\"" + std::string(refusal_labels[i]) + "\"} " +
               std::to_string(refusals[i].load()) + "\n";
    if (const auto& relay = state.relay) {
        const auto& r = relay->stats();
        metric("wsbroadcast_relay_connected", "gauge", "1 while the Redis relay is connected.",
               {{"", r.connected.load() ? 1 : 0}});
        const auto connects = r.connects.load();
        metric("wsbroadcast_relay_reconnects_total", "counter", "Connections to Redis made again after the first.",
               {{"", connects ? connects - 1 : 0}});
        metric("wsbroadcast_relay_failures_total", "counter", "Connections to Redis lost or not made.",
               {{"", r.failures.load()}});
        metric("wsbroadcast_relay_channels", "gauge", "Redis channels subscribed now.", {{"", r.channels.load()}});
        metric("wsbroadcast_relay_refusals_total", "counter",
               "Commands Redis refused (SUBSCRIBE, PUBLISH, AUTH: an ACL, a password), each a failure.",
               {{"", r.refusals.load()}});
        metric("wsbroadcast_relay_ping_timeouts_total", "counter",
               "PINGs Redis did not answer within --redis-ping-timeout, each a failure.",
               {{"", r.ping_timeouts.load()}});
        metric("wsbroadcast_relay_messages_in_total", "counter", "Messages received from Redis for local delivery.",
               {{"", r.messages_in.load()}});
        metric("wsbroadcast_relay_duplicates_total", "counter",
               "Copies of a push to several ids received on another of its channels, and dropped.",
               {{"", r.duplicates.load()}});
        metric("wsbroadcast_relay_malformed_total", "counter",
               "Messages from Redis in no known format (another version on this prefix?), dropped.",
               {{"", r.malformed.load()}});
        metric("wsbroadcast_relay_too_large_total", "counter",
               "Messages from Redis over this instance's --max-message-bytes (another instance's limit is larger), "
               "dropped.",
               {{"", r.too_large.load()}});
        metric("wsbroadcast_relay_messages_out_total", "counter",
               "Pushes Redis acknowledged (one PUBLISH per id of a push; with history, one script per push).",
               {{"", r.messages_out.load()}});
        metric("wsbroadcast_relay_history_reads_total", "counter",
               "With history: reads of an id's stream after a position skipped or Redis came back.",
               {{"", r.repairs.load()}});
        metric("wsbroadcast_relay_repaired_messages_total", "counter",
               "With history: messages pub/sub did not bring, delivered from the stream by those reads.",
               {{"", r.repaired.load()}});
        metric("wsbroadcast_relay_not_ready_refusals_total", "counter",
               "WebSockets refused (1013) because Redis did not confirm their ids within 5 s.",
               {{"", r.prepare_timeouts.load()}});
        metric("wsbroadcast_relay_unacknowledged_bytes", "gauge",
               "Bytes of pushes Redis has not answered yet (over 8 MiB, pushes get 503).",
               {{"", r.unacknowledged_bytes.load()}});
    }
    out +=
        "# HELP wsbroadcast_build_info The server's version and the libraries it was built with.\n"
        "# TYPE wsbroadcast_build_info gauge\n"
        "wsbroadcast_build_info{version=\"" +
        own_version() + "\",boost=\"" + boost_version() + "\",openssl=\"" + OpenSSL_version(OPENSSL_VERSION_STRING) +
        "\",hiredis=\"" + hiredis_version() + "\"} 1\n";
    // The names every Prometheus client library's process collector uses.
    const auto p = read_process_figures();
    auto real = [&out](std::string_view name, std::string_view type, std::string_view help, double value) {
        out += "# HELP " + std::string(name) + " " + std::string(help) + "\n# TYPE " + std::string(name) + " " +
               std::string(type) + "\n" + std::string(name) + " " + std::to_string(value) + "\n";
    };
    real("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.", p.cpu_seconds);
    metric("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", {{"", p.resident_bytes}});
    metric("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", {{"", p.virtual_bytes}});
    metric("process_open_fds", "gauge", "Number of open file descriptors.", {{"", p.open_fds}});
    metric("process_max_fds", "gauge", "Maximum number of open file descriptors.", {{"", p.max_fds}});
    real("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.",
         p.start_time_seconds);
    return out;
}

// With history on, where the push landed: "position" for one id, "positions" by id for several.
std::string positions_field(const std::vector<std::string>& ids, const std::vector<wsbroadcast::position>& at) {
    if (at.empty()) return {};
    if (ids.size() == 1) return R"(,"position":")" + at.front().to_string() + '"';
    std::string out = R"(,"positions":{)";
    for (std::size_t i = 0; i < ids.size() && i < at.size(); ++i)
        out += (i ? "," : "") + json_string(ids[i]) + R"(:")" + at[i].to_string() + '"';
    return out + "}";
}

// A page on the server's own origin is no cross-origin pusher (browsers send Origin on a POST anyway).
template <class State>
bool same_origin(const request& req) {
    constexpr bool plain = std::is_same_v<typename State::stream_type, beast::tcp_stream>;
    return req[http::field::origin] == (plain ? "http://" : "https://") + std::string(req[http::field::host]);
}

// LNbits answers {"sent": true, "data": ...}; we add how many connections the message reached here
// (each once, however many of the ids it is on), or, through Redis, that it was relayed (every
// instance delivers it to its own subscribers).
// Why a push may not be sent, answered; nullopt when it may.
template <class State>
std::optional<response> refuse_push(State& state, const request& req, const std::vector<std::string>& ids,
                                    std::string_view data) {
    // CORS alone only hides the answer from a page: a simple POST still arrives. Refuse it here.
    if (!origin_may_push(state.options.cors_origins, req[http::field::origin]) && !same_origin<State>(req)) {
        refuse(refusal::forbidden_origin,
               "push to " + joined(ids) + " from origin " + std::string(req[http::field::origin]));
        return make_error(req, http::status::forbidden, "origin not allowed to push");
    }
    // Open pushing is safe on loopback only; a reverse proxy on loopback relays the whole internet.
    if (state.options.publish_token.empty() && !state.options.trust_proxy &&
        (req.count(http::field::forwarded) || req.count("X-Forwarded-For") || req.count("X-Real-IP"))) {
        refuse(refusal::unauthorized, "push to " + joined(ids) + " through a proxy, with open pushing");
        return make_error(req, http::status::forbidden,
                          "pushing is open (no publish token), so pushes through a proxy are refused: set "
                          "--publish-token, or --trust-proxy if the proxy restricts who may push");
    }
    if (!authorized(state.options, req)) {
        refuse(refusal::unauthorized, "push to " + joined(ids) + " without a valid token");
        auto res = make_error(req, http::status::unauthorized, "a valid publish token is required");
        res.set(http::field::www_authenticate, "Bearer");
        return res;
    }
    // Sent as a text frame, invalid UTF-8 would make every subscriber's client fail its connection.
    if (!valid_utf8(data)) {
        refuse(refusal::bad_request, "push to " + joined(ids) + ": the data is not valid UTF-8");
        return make_error(req, http::status::bad_request,
                          "the data is not valid UTF-8, as a WebSocket text message must be: nothing was sent");
    }
    return std::nullopt;
}

// What the pusher is told of a push that was made.
template <class State>
response push_answer(State& state, const request& req, const std::vector<std::string>& ids, std::string_view data,
                     const wsbroadcast::publish_result& result) {
    if (result.error) {
        // The relay's reason (Redis refusing a SUBSCRIBE, not answering) is what the pusher can act on.
        const auto why = state.relay ? state.relay->problem() : std::string();
        const auto reason = result.error.message() + (why.empty() ? std::string() : " (redis: " + why + ")");
        refuse(refusal::relay_unavailable, "push to " + joined(ids) + ": " + reason);
        auto res = make_error(req, http::status::service_unavailable, "not sent: " + reason + ", try again later");
        res.set(http::field::retry_after, "1");
        return res;
    }
    pushes_accepted.fetch_add(1, std::memory_order_relaxed);
    auto reach =
        result.relayed ? std::string(R"("relayed":true)") : R"("connections":)" + std::to_string(result.local.queued);
    reach += positions_field(ids, result.positions);
    return make_response(req, http::status::ok, R"({"sent":true,"data":)" + json_string(data) + "," + reach + "}");
}

std::string_view pushed_data(const request& req, const route& r) {
    return r.data ? std::string_view(*r.data) : std::string_view(req.body());
}

// With history through Redis, a push is answered once Redis has given it its position.
template <class State>
bool positioned(const State& state) {
    return state.relay && state.relay->positions();
}

// Pushes faster than the writers: queueing more would only make every delivery later.
template <class State>
bool writers_behind(const State& state) {
    const auto bound = state.options.max_total_queued_bytes;
    return bound && state.manager.queued_bytes() > bound;
}

// A push that waits: for the writers to catch up while they are behind, then, with history
// through Redis, for its position. Nothing is sent before the wait ends; one that waits too long
// gets 503 and can be sent again.
template <class State>
net::awaitable<response> awaited_push(State& state, const request& req, const route& r) {
    const auto data = pushed_data(req, r);
    if (auto refusal = refuse_push(state, req, r.ids, data)) co_return std::move(*refusal);
    if (writers_behind(state)) {
        pushes_held.fetch_add(1, std::memory_order_relaxed);
        const auto& o = state.options;
        wsbroadcast::error_code ec;
        co_await state.manager.async_wait_for_room(o.max_total_queued_bytes, o.push_wait,
                                                   net::redirect_error(net::use_awaitable, ec));
        if (ec) {
            const auto held = std::to_string(state.manager.queued_bytes());
            refuse(refusal::overloaded, "push to " + joined(r.ids) + ": outboxes still hold " + held + " bytes after " +
                                            std::to_string(o.push_wait.count() / 1000) +
                                            " s, over --max-total-queued-bytes " +
                                            std::to_string(o.max_total_queued_bytes));
            auto res = make_error(req, http::status::service_unavailable,
                                  "not sent: the server is behind delivering to its clients, try again later");
            res.set(http::field::retry_after, "1");
            co_return res;
        }
    }
    if (!positioned(state)) co_return push_answer(state, req, r.ids, data, state.manager.publish(r.ids, data));
    const auto result =
        co_await state.manager.async_publish(r.ids, wsbroadcast::message::text(data), net::use_awaitable);
    co_return push_answer(state, req, r.ids, data, result);
}

// A browser asks before a push it cannot send as a "simple" request (a token header, a JSON body).
response preflight(const server_options& o, const request& req) {
    const auto origin = req[http::field::origin];
    if (cors_allow_origin(o.cors_origins, origin).empty()) {
        refuse(refusal::forbidden_origin, "push preflight from origin " + std::string(origin));
        return make_error(req, http::status::forbidden, "origin not allowed to push");
    }
    response res{http::status::no_content, req.version()};
    res.set(http::field::server, "wsbroadcast");
    res.set(http::field::access_control_allow_methods, "GET, POST, OPTIONS");
    res.set(http::field::access_control_allow_headers, "Authorization, X-Api-Key, Content-Type");
    res.set(http::field::access_control_max_age, "86400");
    res.keep_alive(req.keep_alive());
    return res;
}

// Answers on the push routes, refusals included, say which page origins may read them.
void allow_cross_origin(const server_options& o, const request& req, response& res) {
    if (!req.target().starts_with(std::string(ws_prefix) + "/")) return;
    const auto allow = cors_allow_origin(o.cors_origins, req[http::field::origin]);
    if (allow.empty()) return;
    res.set(http::field::access_control_allow_origin, allow);
    if (allow != "*") res.set(http::field::vary, "Origin");  // the answer depends on who asks
}

template <class State>
response handle(State& state, const request& req, const route& r) {
    switch (r.kind) {
    case route_kind::page:
        return make_response(req, http::status::ok, std::string(index_html), "text/html; charset=utf-8");
    case route_kind::client_module:
        return make_response(req, http::status::ok, std::string(client_js), "text/javascript; charset=utf-8");
    case route_kind::metrics:
        return make_response(req, http::status::ok, metrics_text(state), "text/plain; version=0.0.4; charset=utf-8");
    case route_kind::ready: {
        // Whether a load balancer should send new clients here: not while the connections are
        // being closed, nor while Redis, which every push goes through, is away.
        if (state.draining.load())
            return make_response(req, http::status::service_unavailable, R"({"status":"draining"})");
        if (state.relay && !state.relay->stats().connected)
            return make_response(req, http::status::service_unavailable,
                                 R"({"status":"unavailable","redis":"reconnecting"})");
        return make_response(req, http::status::ok, R"({"status":"ready"})");
    }
    case route_kind::health: {
        std::string relay;
        if (state.relay)
            relay = state.relay->stats().connected ? R"(,"redis":"connected")" : R"(,"redis":"reconnecting")";
        return make_response(req, http::status::ok,
                             R"({"status":"ok","connections":)" + std::to_string(state.manager.size()) + relay + "}");
    }
    case route_kind::push_body:
    case route_kind::push_path: {
        const auto data = pushed_data(req, r);
        if (auto refusal = refuse_push(state, req, r.ids, data)) return std::move(*refusal);
        // One send for every id: once per connection.
        return push_answer(state, req, r.ids, data, state.manager.publish(r.ids, data));
    }
    case route_kind::preflight: return preflight(state.options, req);
    case route_kind::subscribe: {
        auto res = make_error(req, http::status::upgrade_required, "this route is a WebSocket: send an upgrade");
        res.set(http::field::upgrade, "websocket");
        res.set(http::field::connection, "Upgrade");
        return res;
    }
    case route_kind::bad_request:
        refuse(refusal::bad_request, std::string(r.problem));
        return make_error(req, http::status::bad_request, r.problem);
    case route_kind::wrong_method: {
        auto res = make_error(req, http::status::method_not_allowed, "method not allowed");
        res.set(http::field::allow, r.allow);
        return res;
    }
    case route_kind::not_found: break;
    }
    return make_error(req, http::status::not_found, "not found");
}

// Whether the client asked for wsbroadcast.v1; it may list protocols in several headers.
bool offers_v1(const request& req) {
    const auto [first, last] = req.equal_range(http::field::sec_websocket_protocol);
    return std::any_of(first, last, [](const auto& f) { return offers_subprotocol(f.value(), v1::subprotocol); });
}

// Where a wsbroadcast.v1 client on /api/v1/ws/{id}?since=... asks the id to start. Other clients'
// query strings are ignored, as LNbits ignores them (TPoS carries its page's query into the URL).
std::optional<std::string_view> since_in(const request& req) {
    const auto target = req.target();
    const auto question = target.find('?');
    if (question == target.npos) return std::nullopt;
    return query_param(target.substr(question + 1), "since");
}

// Checks an upgrade before it happens; a refusal is an HTTP answer, so browsers see the status.
template <class State>
std::optional<response> refuse_upgrade(State& state, const request& req, const route& r, bool multiplexed) {
    // What Beast's accept would refuse, refused here, before the manager (and Redis) hear of the id.
    const auto first = [&req](http::field name) -> std::optional<std::string_view> {
        const auto it = req.find(name);
        return it == req.end() ? std::nullopt : std::optional<std::string_view>(it->value());
    };
    if (const auto p = check_upgrade(req.count(http::field::host) > 0, first(http::field::sec_websocket_key),
                                     first(http::field::sec_websocket_version));
        p.status) {
        refuse(refusal::bad_request, "WebSocket upgrade: " + std::string(p.reason));
        auto res = make_error(req, static_cast<http::status>(p.status), p.reason);
        if (p.status == 426) res.set(http::field::sec_websocket_version, "13");
        return res;
    }
    if (const auto since = since_in(req); since && multiplexed) {
        if (r.ids.empty() || !v1::parse_since(*since)) {  // a position or "last": nothing to decode
            const std::string why = r.ids.empty() ? "since needs an id in the URL (/api/v1/ws/{id}?since=...)"
                                                  : std::string(v1::since_problem);
            refuse(refusal::bad_request, why);
            return make_error(req, http::status::bad_request, why);
        }
    }
    if (r.ids.empty() && !multiplexed) {
        constexpr std::string_view why =
            "a WebSocket on /api/v1/ws needs an id (/api/v1/ws/{id}) or the wsbroadcast.v1 subprotocol";
        refuse(refusal::bad_request, why);
        return make_error(req, http::status::bad_request, why);
    }
    const auto& allowed = state.options.allowed_origins;
    const auto origin = req[http::field::origin];
    if (!allowed.empty() && !origin.empty() && std::find(allowed.begin(), allowed.end(), origin) == allowed.end()) {
        refuse(refusal::forbidden_origin, "WebSocket from origin " + std::string(origin));
        return make_error(req, http::status::forbidden, "origin not allowed");
    }
    const auto& o = state.options;
    const bool key_full = std::any_of(r.ids.begin(), r.ids.end(), [&](const std::string& id) {
        return o.max_connections_per_key && state.manager.count(id) >= o.max_connections_per_key;
    });
    if ((o.max_connections && state.manager.size() >= o.max_connections) || key_full) {
        refuse(refusal::connection_limit, "WebSocket for " + joined(r.ids) + ": connection limit reached");
        auto res = make_error(req, http::status::service_unavailable, "too many connections, try again later");
        res.set(http::field::retry_after, "5");
        return res;
    }
    return std::nullopt;
}

// ---- wsbroadcast.v1 commands -----------------------------------------------------------------

// Why the manager refused a subscribe command, for the person reading the error frame.
std::string subscribe_problem(wsbroadcast::error_code ec, const server_options& o) {
    if (ec == wsbroadcast::error::key_limit)
        return "too many keys on this connection: at most " + std::to_string(o.max_keys_per_connection);
    if (ec == wsbroadcast::error::key_connection_limit) return "too many connections on this key, try again later";
    if (ec == wsbroadcast::error::shutting_down) return "the server is shutting down";
    return ec.message();
}

// One command of a wsbroadcast.v1 client, answered with one frame (docs/protocol.md). The origin
// was checked at the upgrade; the per-key and per-connection limits are the manager's. A subscribe
// that succeeds is answered by the manager itself: it queues the subscribed frame as it registers
// the key, so the frame comes before any message of that key.
// `through_redis`: a subscribe waits until Redis has confirmed the id (with history: and this
// instance has its history), as a connection's first ids do before the 101.
template <class Handle>
void answer_command(const server_options& o, Handle& h, std::string_view frame, bool binary, bool through_redis) {
    const auto c = v1::parse_command(frame, binary);
    auto refuse_with = [&](refusal kind, std::string_view reason) {
        // Only a valid key is logged: the others could hold anything, line breaks included.
        const bool loggable = c.key && valid_id(*c.key);
        refuse(kind,
               "wsbroadcast.v1 command" + (loggable ? " for " + *c.key : std::string()) + ": " + std::string(reason));
        h.send(v1::error_frame(c.key, reason));
    };
    switch (c.kind) {
    case v1::command::invalid: return refuse_with(refusal::bad_command, c.problem);
    case v1::command::subscribe:
        // Only this connection's reader changes its keys, so nothing comes between the check and
        // the subscribe. Subscribing again is answered again, and changes nothing.
        if (h.subscribed_to(*c.key)) {
            h.send(v1::subscribed_frame(*c.key));
        } else if (through_redis) {
            h.async_subscribe(*c.key, c.since, [h, key = *c.key, &o](wsbroadcast::error_code ec) {
                if (!ec || ec == wsbroadcast::error::not_registered) return;
                const auto why = subscribe_problem(ec, o);
                refuse(refusal_of(ec), "wsbroadcast.v1 command for " + key + ": " + why);
                h.send(v1::error_frame(key, why));
            });
        } else if (const auto ec = h.subscribe(*c.key, c.since);
                   ec && ec != wsbroadcast::error::not_registered) {  // gone: nobody to answer
            refuse_with(refusal_of(ec), subscribe_problem(ec, o));
        }
        return;
    case v1::command::unsubscribe:
        if (h.unsubscribe(*c.key))
            h.send(v1::unsubscribed_frame(*c.key));
        else
            refuse_with(refusal::bad_command, "not subscribed to this key");
        return;
    }
}

// ---- sessions --------------------------------------------------------------------------------

template <class Stream>
auto& lowest(Stream& s) {
    return beast::get_lowest_layer(s);
}

// Starts the WebSocket and returns: no frame of ours waits while it lives (memory per idle
// connection is what bench/run.sh idle measures). The completion handler logs how it ended.
// `ids`: the URL's id, or none on the bare route; `multiplexed`: the client offered wsbroadcast.v1.
template <class State, class Stream>
void subscribe(State& state, Stream stream, request req, std::vector<std::string> ids, bool multiplexed) {
    // From here on the WebSocket's handshake timeout and the manager's liveness rule apply.
    auto ws = [&] {
        if constexpr (std::is_same_v<Stream, beast::tcp_stream>) {
            return typename State::ws_stream(stream.release_socket());
        } else {
            stream.expires_never();
            return typename State::ws_stream(std::move(stream));
        }
    }();
    ws.set_option(websocket::stream_base::timeout{30s, websocket::stream_base::none(), false});
    ws.set_option(websocket::stream_base::decorator([multiplexed](websocket::response_type& res) {
        res.set(http::field::server, "wsbroadcast");
        if (multiplexed) res.set(http::field::sec_websocket_protocol, v1::subprotocol);  // selected in the 101
    }));
    const std::string what = ids.empty() ? std::string(ws_prefix) : ids.front();
    std::string who;  // built for the debug log only: it is kept as long as the connection
    if (current_log_level >= log_level::debug) {
        beast::error_code ignored;
        const auto peer = lowest(ws).remote_endpoint(ignored);
        who = "WebSocket " + what + (multiplexed ? " (wsbroadcast.v1)" : "") + " from " + peer.address().to_string() +
              ":" + std::to_string(peer.port());
        log(log_level::debug, who + " opening");
    }
    // wsbroadcast.v1 connections get envelopes (options.envelope, set in run()) and their commands
    // answered; the others get the bare messages, and what they send is read and ignored (the ESP32
    // sends "Connected", lnbits-rs "subscribe").
    wsbroadcast::connection_options connection{state.options.outbox};
    connection.envelopes = multiplexed;
    wsbroadcast::initial_keys<std::string> keys;
    const auto since = multiplexed ? since_in(req) : std::nullopt;  // checked by refuse_upgrade
    for (auto& id : ids) keys.add(std::move(id), since ? *v1::parse_since(*since) : wsbroadcast::since());
    auto on_message = [&options = state.options, multiplexed, redis = state.relay && state.relay->positions()](
                          typename State::manager_type::connection_handle& h, std::string_view frame, bool binary) {
        if (multiplexed) answer_command(options, h, frame, binary, redis);
    };
    // Registered before the 101 goes out: a client that sees its handshake complete misses nothing.
    state.manager.accept_and_serve(std::move(ws), std::move(req), std::move(keys), connection, on_message,
                                   [who = std::move(who), what](std::exception_ptr e, wsbroadcast::error_code ec) {
                                       if (e) return log_exception("websocket")(e);
                                       if (!who.empty()) log(log_level::debug, who + " closed: " + ec.message());
                                       if (ec.category() == wsbroadcast::category())
                                           refuse(refusal_of(ec), "WebSocket for " + what + ": " + ec.message());
                                   });
}

// One HTTP connection: requests until the peer leaves, or until one of them upgrades.
template <class State, class Stream>
net::awaitable<void> http_session(State& state, Stream stream) {
    const pending_session counted(state);  // until it returns: after an upgrade, the manager counts it
    const auto handshake_timeout = std::chrono::seconds(state.options.handshake_timeout_seconds);
    bool first = true;
    beast::error_code ec;
    if constexpr (!std::is_same_v<Stream, beast::tcp_stream>) {
        stream.expires_after(handshake_timeout);
        co_await stream.async_handshake(ssl::stream_base::server, net::redirect_error(net::use_awaitable, ec));
        if (ec) co_return;  // not TLS, or a client that gave up: nothing to answer
    }
    beast::flat_buffer buffer;
    std::string head;
    for (std::size_t served = 0;; ++served) {
        http::request_parser<http::string_body> parser;
        parser.header_limit(8 * 1024);
        parser.body_limit(state.options.max_message_bytes);
        // The first request must come soon (a silent connection is a probe or an attack); a
        // keep-alive connection between pushes may wait longer.
        stream.expires_after(std::exchange(first, false) ? handshake_timeout : http_timeout);
        co_await http::async_read(stream, buffer, parser, net::redirect_error(net::use_awaitable, ec));
        if (ec == http::error::end_of_stream || ec == beast::error::timeout || ec == net::error::eof) break;
        if (ec) {
            // Malformed input: say so once, then hang up. The parser's state is not reusable.
            const request bad_req{http::verb::get, "/", 11};
            const bool too_large = ec == http::error::body_limit;
            refuse(too_large ? refusal::too_large : refusal::bad_request, "request: " + ec.message());
            auto res =
                too_large ? make_error(bad_req, http::status::payload_too_large,
                                       "body larger than " + std::to_string(state.options.max_message_bytes) + " bytes")
                          : make_error(bad_req, http::status::bad_request, "malformed request: " + ec.message());
            // A body too large comes after whole headers: a page on another origin may read why.
            if (too_large) allow_cross_origin(state.options, parser.get(), res);
            res.keep_alive(false);
            co_await write_answer(stream, res, head, ec);
            break;
        }

        request req = parser.release();
        const auto r = route_request(req.method_string(), req.target());
        if (r.kind == route_kind::subscribe && websocket::is_upgrade(req)) {
            const bool multiplexed = offers_v1(req);
            if (auto res = refuse_upgrade(state, req, r, multiplexed)) {
                res->keep_alive(false);
                co_await write_answer(stream, *res, head, ec);
                break;
            }
            // Handed off rather than awaited: this frame (parser, buffers) would otherwise live as
            // long as the WebSocket does.
            subscribe(state, std::move(stream), std::move(req), r.ids, multiplexed);
            co_return;
        }
        const bool pushes = r.kind == route_kind::push_body || r.kind == route_kind::push_path;
        const bool awaited = pushes && (positioned(state) || writers_behind(state));
        response res;
        if (awaited)  // not a ?: g++ 12 miscompiles co_await in one
            res = co_await awaited_push(state, req, r);
        else
            res = handle(state, req, r);
        allow_cross_origin(state.options, req, res);
        if (req.method() == http::verb::head) {  // the GET's headers, its length included, without the body
            const auto length = res.body().size();
            res.body().clear();
            res.content_length(length);
        }
        // Bounded work per connection, pipelined or not: a client that keeps one open for ever
        // must come back through the accept (and its limits) now and then.
        if (served + 1 >= state.options.max_requests_per_connection) res.keep_alive(false);
        const bool keep_alive = res.keep_alive();
        // A push sent here in this turn has its answer wait behind whatever else is ready (the
        // other publishers' requests read in the same wake-up): their deliveries leave before this
        // answer, not after it. Deliveries are what the subscribers wait for; the answer only tells
        // a publisher that the message is queued (bench/README.md "Deliveries before answers"). An
        // awaited push has already let the others go first, and through Redis its deliveries come
        // later anyway.
        if (pushes && !awaited) co_await net::post(co_await net::this_coro::executor, net::use_awaitable);
        co_await write_answer(stream, res, head, ec);
        if (ec || !keep_alive) break;
    }
    if constexpr (std::is_same_v<Stream, beast::tcp_stream>) {
        stream.socket().shutdown(tcp::socket::shutdown_send, ec);
    } else {
        stream.expires_after(5s);
        co_await stream.async_shutdown(net::redirect_error(net::use_awaitable, ec));
    }
}

// Errors that accepting again at once would only repeat: the pending connection stays queued
// until a descriptor (or memory) is free.
bool out_of_resources(const beast::error_code& ec) {
    return ec == net::error::no_descriptors || ec == boost::system::errc::too_many_files_open_in_system ||
           ec == net::error::no_buffer_space || ec == net::error::no_memory;
}

constexpr auto first_accept_backoff = 10ms, last_accept_backoff = 1000ms;

template <class State>
net::awaitable<void> accept_loop(State& state, net::io_context& ioc, tcp::acceptor& acceptor) {
    // Out of descriptors, retrying at once spins a thread and floods the log (as nginx and Go's
    // net/http do, wait instead, longer each time); the connections already open are served meanwhile.
    net::steady_timer backoff_timer(acceptor.get_executor());
    auto backoff = first_accept_backoff;
    std::uint64_t failures = 0;  // in this burst
    for (;;) {
        beast::error_code ec;
        // With several threads, each connection gets its own strand: its reader and writer never
        // run at the same time. One thread runs them one at a time anyway, and a strand would only
        // add a lock and copies of itself to every handler of every connection.
        const auto own = state.options.threads > 1 ? net::any_io_executor(net::make_strand(ioc))
                                                   : net::any_io_executor(ioc.get_executor());
        auto socket = co_await acceptor.async_accept(own, net::redirect_error(net::use_awaitable, ec));
        if (ec == net::error::operation_aborted || !acceptor.is_open()) co_return;
        if (out_of_resources(ec)) {
            if (failures++ == 0)
                log(log_level::error,
                    "accept: " + ec.message() +
                        "; retrying after 10 ms, doubling up to 1 s, while serving the open connections");
            backoff_timer.expires_after(backoff);
            co_await backoff_timer.async_wait(net::redirect_error(net::use_awaitable, ec));
            backoff = std::min<std::chrono::milliseconds>(backoff * 2, last_accept_backoff);
            continue;
        }
        if (failures > 0) {
            log(log_level::warn, "accept: accepting again after " + std::to_string(failures) + " failed attempt(s)");
            failures = 0;
            backoff = first_accept_backoff;
        }
        if (ec) {
            log(log_level::error, "accept: " + ec.message());
            continue;
        }
        if (state.pending.load(std::memory_order_relaxed) >= state.options.max_pending_connections) {
            refuse(refusal::connection_limit, "connection: " + std::to_string(state.options.max_pending_connections) +
                                                  " HTTP connections not upgraded yet (--max-pending-connections)");
            socket.close(ec);
            continue;
        }
        state.pending.fetch_add(1, std::memory_order_relaxed);  // let go by the session's pending_session
        auto executor = socket.get_executor();
        if constexpr (std::is_same_v<typename State::stream_type, beast::tcp_stream>) {
            net::co_spawn(executor, http_session(state, beast::tcp_stream(std::move(socket))),
                          log_exception("session"));
        } else {
            net::co_spawn(executor, http_session(state, tls_stream(std::move(socket), state.tls->current())),
                          log_exception("session"));
        }
    }
}

void reload_certificate(tls_contexts* tls) {
    if (!tls) return log(log_level::warn, "received SIGHUP: no TLS certificate to reload (no --tls-cert); carrying on");
    try {
        tls->reload();
        log(log_level::warn, "received SIGHUP: reloaded the TLS certificate " + tls->cert_file() +
                                 " and its key for new connections; open connections are unchanged");
    } catch (const std::exception& e) {
        log(log_level::error, "received SIGHUP: cannot reload the TLS certificate " + tls->cert_file() + ": " +
                                  e.what() + "; new connections keep getting the previous one");
    }
}

// Each connection is a file descriptor; the usual soft limit of 1024 would cap the server there.
void raise_open_file_limit() {
    rlimit limit{};
    if (getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur < limit.rlim_max) {
        limit.rlim_cur = limit.rlim_max;
        setrlimit(RLIMIT_NOFILE, &limit);
    }
}

template <class Stream>
int run(const server_options& options, const std::vector<int>& inherited, tls_contexts* tls) {
    wsbroadcast::options manager_options;
    manager_options.outbox = options.outbox;
    manager_options.max_connections = options.max_connections;
    manager_options.max_connections_per_key = options.max_connections_per_key;
    manager_options.max_keys_per_connection = options.max_keys_per_connection;
    // What wsbroadcast.v1 connections get (docs/protocol.md); the others get the bare message.
    manager_options.envelope.wrap = [](const std::string& key, const wsbroadcast::message& m,
                                       const std::optional<wsbroadcast::position>& at) {
        return wsbroadcast::message::text(v1::message_frame(key, m.data(), at));
    };
    manager_options.envelope.subscribed = [](const std::string& key, const wsbroadcast::subscribed_info& info) {
        return wsbroadcast::message::text(v1::subscribed_frame(key, info));
    };
    manager_options.history = options.history;
    manager_options.max_message_bytes = options.max_message_bytes;
    manager_options.idle_timeout = std::chrono::seconds(options.idle_timeout_seconds);
    manager_options.on_error = [](const wsbroadcast::error_event& e) {
        log(log_level::warn, "connection " + std::string(e.operation) + ": " + e.message());
    };
    using state_type = server_state<Stream>;
    std::shared_ptr<typename state_type::relay_type> relay;
    if (options.redis) {
        relay = std::make_shared<typename state_type::relay_type>(
            *options.redis, options.redis_prefix,
            [](bool warning, const std::string& what) { log(warning ? log_level::warn : log_level::info, what); },
            options.redis_timing, options.max_message_bytes, options.history);
        manager_options.relay = relay;
    }
    // Before the io_context: the manager must outlive every connection.
    state_type state{options, relay, typename state_type::manager_type(std::move(manager_options)), tls};
    net::io_context ioc(static_cast<int>(options.threads));
    // Whatever way run() leaves, the relay lets go of its Redis connections while the io_context
    // they belong to still exists.
    struct detach_relay {
        typename state_type::relay_type* relay;
        ~detach_relay() {
            if (relay) relay->detach();
        }
    } relay_guard{relay.get()};

    // The sockets systemd passed (socket activation), or one bound to --address and --port. Each
    // acceptor has a strand: the signal handler closes it.
    std::vector<tcp::acceptor> acceptors;
    acceptors.reserve(std::max<std::size_t>(1, inherited.size()));  // accept loops hold references
    if (!inherited.empty()) {
        for (int fd : inherited) {
            sockaddr_storage bound{};
            socklen_t size = sizeof bound;
            getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &size);
            auto& acceptor = acceptors.emplace_back(net::make_strand(ioc));
            acceptor.assign(bound.ss_family == AF_INET6 ? tcp::v6() : tcp::v4(), fd);
            const auto address = acceptor.local_endpoint().address();
            if (!address.is_loopback() && options.publish_token.empty() && !options.allow_open_publish) {
                std::cerr << "wsbroadcast-server: refusing the socket systemd passed on " << address.to_string()
                          << " without --publish-token: anyone who reaches it could push to every client.\n";
                return 2;
            }
        }
    } else {
        try {
            const tcp::endpoint endpoint(net::ip::make_address(options.address), options.port);
            auto& acceptor = acceptors.emplace_back(net::make_strand(ioc));
            acceptor.open(endpoint.protocol());
            acceptor.set_option(net::socket_base::reuse_address(true));
            acceptor.bind(endpoint);
            acceptor.listen(net::socket_base::max_listen_connections);
        } catch (const std::exception& e) {
            std::cerr << "wsbroadcast-server: cannot listen on " << options.address << ":" << options.port << ": "
                      << e.what() << '\n';
            return 1;
        }
    }

    net::signal_set signals(ioc, SIGINT, SIGTERM);
    signals.async_wait([&](const beast::error_code& ec, int signal) {
        if (ec) return;
        state.draining = true;
        systemd::notify("STOPPING=1");
        log(log_level::warn, std::string("received ") + (signal == SIGINT ? "SIGINT" : "SIGTERM") + ", closing " +
                                 std::to_string(state.manager.size()) + " connection(s) with 1001");
        for (auto& acceptor : acceptors)
            net::post(acceptor.get_executor(), [&acceptor] {
                beast::error_code ignored;
                acceptor.close(ignored);
            });
        net::co_spawn(ioc, state.manager.shutdown(shutdown_drain), [&](std::exception_ptr e) {
            log_exception("shutdown")(e);
            ioc.stop();  // ends idle keep-alive HTTP sessions too
        });
    });

    // SIGHUP (whose default would end the process and every connection) puts a renewed certificate
    // in service for new handshakes; every connection stays as it is.
    net::signal_set hangups(ioc, SIGHUP);
    std::function<void()> wait_for_hangup = [&] {
        hangups.async_wait([&](const beast::error_code& ec, int) {
            if (ec) return;
            reload_certificate(tls);
            wait_for_hangup();
        });
    };
    wait_for_hangup();

    // Signals are handled from here on; tests read the port from the first line (with --port 0).
    std::string where;
    for (auto& acceptor : acceptors) {
        const auto bound = acceptor.local_endpoint();
        const auto host =
            bound.address().is_v6() ? "[" + bound.address().to_string() + "]" : bound.address().to_string();
        where = (tls ? "https://" : "http://") + host + ":" + std::to_string(bound.port());
        std::cout << "wsbroadcast-server listening on " << where << (inherited.empty() ? "" : " (from systemd)")
                  << " with " << options.threads << " thread(s)" << std::endl;
        net::co_spawn(acceptor.get_executor(), accept_loop(state, ioc, acceptor), log_exception("accept loop"));
    }
    // systemd (Type=notify) starts what depends on this service once it is ready: listening and,
    // with --redis, able to publish.
    if (relay) {
        systemd::notify("STATUS=listening on " + where + ", connecting to Redis at " + relay->where());
        relay->when_ready([where] { systemd::notify("READY=1\nSTATUS=listening on " + where + ", Redis connected"); });
        relay->attach(ioc.get_executor(), state.manager);
        log(log_level::warn,
            "relaying pushes through Redis at " + relay->where() + ", channel prefix \"" + options.redis_prefix + "\"");
    } else {
        systemd::notify("READY=1\nSTATUS=listening on " + where);
    }

    std::vector<std::thread> threads;
    for (unsigned i = 1; i < options.threads; ++i) threads.emplace_back([&] { ioc.run(); });
    ioc.run();
    for (auto& t : threads) t.join();
    report_suppressed_refusals();
    log(log_level::warn, "stopped");
    log_output().flush(1s);  // bounded: a log nobody reads must not keep the process from exiting
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    // hiredis writes to Redis with write(2), and the log goes to stderr the same way: a peer that
    // went away must be an EPIPE error there, not a signal that ends the process and every client.
    std::signal(SIGPIPE, SIG_IGN);
    int exit_code = 0;
    const auto options = parse_options(argc, argv, exit_code);
    if (!options) return exit_code;
    current_log_format = chosen_log_format.value_or(
        stderr_is_journal(std::getenv("JOURNAL_STREAM")) ? log_format::journal : log_format::text);
    // The log's thread starts now, while the process has resources to spare, not at the first log
    // line: that may be "accept: Too many open files".
    log_output();

    std::string problem;
    const auto inherited = systemd::listening_sockets(problem);  // then --address and --port are not used
    if (!problem.empty()) {
        std::cerr << "wsbroadcast-server: " << problem << '\n';
        return 2;
    }
    if (!systemd::available && systemd::expects_notifications())
        log(log_level::warn,
            "NOTIFY_SOCKET is set, but this server was built without libsystemd: it cannot "
            "tell systemd it is ready (use Type=exec or Type=simple)");

    beast::error_code ec;
    const auto address = net::ip::make_address(options->address, ec);
    if (ec) {
        std::cerr << "wsbroadcast-server: invalid --address " << options->address << '\n';
        return 2;
    }
    // LNbits' push endpoints are open to anyone who can reach them; ours are only where that is safe.
    // (Sockets from systemd are checked the same way once adopted.)
    if (inherited.empty() && !address.is_loopback() && options->publish_token.empty() && !options->allow_open_publish) {
        std::cerr << "wsbroadcast-server: refusing to listen on " << options->address
                  << " without --publish-token: anyone who reaches it could push to every client.\n"
                  << "Set --publish-token (or WSBROADCAST_PUBLISH_TOKEN), or pass --allow-open-publish.\n";
        return 2;
    }
    raise_open_file_limit();

    if (options->tls_cert.empty()) return run<beast::tcp_stream>(*options, inherited, nullptr);

    std::optional<tls_contexts> tls;
    try {
        tls.emplace(options->tls_cert, options->tls_key);
    } catch (const std::exception& e) {
        std::cerr << "wsbroadcast-server: cannot load the TLS certificate or key: " << e.what() << '\n';
        return 2;
    }
    return run<tls_stream>(*options, inherited, &*tls);
}
