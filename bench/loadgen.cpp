// wsbroadcast-loadgen: starts the reference server (wsbroadcast-server), drives it with Beast
// WebSocket subscribers and keep-alive HTTP publishers over loopback, and prints one JSON line.
//
//   wsbroadcast-loadgen --server PATH --scenario fanout|targeted|rate|idle|slow|relay [options]
//
// The relay scenario also starts a redis-server of its own and two server instances relaying through
// it (--redis): subscribers alternate between the two, the pushes all go to the first.
//
// --server-kind naive drives a peer instead of the reference server: the naive Beast server of
// ../shared/bench (PORT=N in its environment, "listening on 127.0.0.1:N" on stderr, answers
// {"sent":true}), so the same scenarios measure both, in the same run, the same way.
//
// --tls makes a self-signed certificate for 127.0.0.1 in a fresh temporary directory (with the
// openssl command), starts the server with --tls-cert/--tls-key, and connects over wss:// and
// https://, verifying the server against that certificate.
//
// Every message is exactly --size bytes of ASCII:
//
//   pppp:ssssssss:tttttttttttttttt:xxxx...
//
// p = publisher index, s = sequence number per (id, publisher), t = send time in steady_clock
// nanoseconds (CLOCK_MONOTONIC), all lowercase hex. A subscriber keeps one bit per message it can
// receive from each publisher, so it tells missing, duplicate and out-of-order messages apart.
//
// Every phase has a deadline, and a watchdog ends the process (and the processes it started) if the
// whole run takes longer than --max-seconds, so the program always terminates.

#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/ssl.hpp>
#include <boost/beast/websocket.hpp>
#include <boost/beast/websocket/ssl.hpp>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <functional>
#include <iostream>
#include <iterator>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>
#include <vector>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

extern char** environ;

namespace beast = boost::beast;
namespace websocket = beast::websocket;
namespace net = boost::asio;
namespace ssl = net::ssl;
using tcp = net::ip::tcp;
using namespace std::chrono_literals;

namespace {

// ---- small helpers -----------------------------------------------------------------------------

using steady = std::chrono::steady_clock;

std::uint64_t now_ns() {
    return static_cast<std::uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(steady::now().time_since_epoch()).count());
}

double seconds_since(steady::time_point t) { return std::chrono::duration<double>(steady::now() - t).count(); }

void say(const std::string& what) { std::cerr << "loadgen: " << what << std::endl; }

template <class T>
bool parse_number(std::string_view text, T& out) {
    const auto [end, err] = std::from_chars(text.data(), text.data() + text.size(), out);
    return err == std::errc{} && end == text.data() + text.size();
}

constexpr char hex_digits[] = "0123456789abcdef";

void write_hex(char* out, std::uint64_t v, int digits) {
    for (int i = digits - 1; i >= 0; --i) {
        out[i] = hex_digits[v & 15];
        v >>= 4;
    }
}

bool read_hex(const char* in, int digits, std::uint64_t& v) {
    v = 0;
    for (int i = 0; i < digits; ++i) {
        const char c = in[i];
        unsigned d;
        if (c >= '0' && c <= '9')
            d = static_cast<unsigned>(c - '0');
        else if (c >= 'a' && c <= 'f')
            d = static_cast<unsigned>(c - 'a' + 10);
        else
            return false;
        v = (v << 4) | d;
    }
    return true;
}

// "pppp:ssssssss:tttttttttttttttt:" then padding.
constexpr std::size_t payload_header = 31;
constexpr std::size_t min_payload = payload_header + 1;

void stamp_payload(char* p, std::uint64_t publisher, std::uint64_t seq, std::uint64_t ts) {
    write_hex(p, publisher, 4);
    write_hex(p + 5, seq, 8);
    write_hex(p + 14, ts, 16);
}

// Latency histogram in microseconds: exact below 2048 us, then 1024 sub-buckets per power of two
// (under 0.1 % error), up to 2^41 us.
class histogram {
public:
    void add(std::uint64_t us) {
        ++counts_[index(us)];
        ++total_;
        max_ = std::max(max_, us);
    }
    void merge(const histogram& o) {
        for (std::size_t i = 0; i < counts_.size(); ++i) counts_[i] += o.counts_[i];
        total_ += o.total_;
        max_ = std::max(max_, o.max_);
    }
    std::uint64_t total() const { return total_; }
    std::uint64_t max() const { return max_; }
    // The smallest recorded value v such that at least q of the samples are <= v (bucket lower bound).
    std::uint64_t percentile(double q) const {
        if (total_ == 0) return 0;
        auto rank = static_cast<std::uint64_t>(q * static_cast<double>(total_));
        if (static_cast<double>(rank) < q * static_cast<double>(total_)) ++rank;
        rank = std::clamp<std::uint64_t>(rank, 1, total_);
        std::uint64_t seen = 0;
        for (std::size_t i = 0; i < counts_.size(); ++i) {
            seen += counts_[i];
            if (seen >= rank) return std::min(value(i), max_);
        }
        return max_;
    }

private:
    static constexpr std::size_t linear = 2048;
    static constexpr int top_bit = 40;
    static std::size_t index(std::uint64_t us) {
        if (us < linear) return static_cast<std::size_t>(us);
        int k = std::bit_width(us) - 1;  // 11 and up
        if (k > top_bit) {
            k = top_bit;
            us = (std::uint64_t{2} << top_bit) - 1;
        }
        const int shift = k - 10;
        return linear + static_cast<std::size_t>(k - 11) * 1024 + static_cast<std::size_t>((us >> shift) - 1024);
    }
    static std::uint64_t value(std::size_t i) {
        if (i < linear) return i;
        const std::size_t j = i - linear;
        const int k = static_cast<int>(j / 1024) + 11;
        return (static_cast<std::uint64_t>(j % 1024) + 1024) << (k - 10);
    }
    std::vector<std::uint64_t> counts_ = std::vector<std::uint64_t>(linear + (top_bit - 10) * 1024, 0);
    std::uint64_t total_ = 0;
    std::uint64_t max_ = 0;
};

// "0", "0,1", "0-1,3": CPU numbers for sched_setaffinity. False when empty or malformed.
bool parse_cpu_list(std::string_view text, cpu_set_t& set) {
    CPU_ZERO(&set);
    bool any = false;
    while (!text.empty()) {
        const auto comma = text.find(',');
        const std::string_view part = text.substr(0, comma);
        text = comma == std::string_view::npos ? std::string_view{} : text.substr(comma + 1);
        const auto dash = part.find('-');
        unsigned first = 0, last = 0;
        if (!parse_number(part.substr(0, dash), first)) return false;
        last = first;
        if (dash != std::string_view::npos && !parse_number(part.substr(dash + 1), last)) return false;
        if (last < first || last >= CPU_SETSIZE) return false;
        for (unsigned cpu = first; cpu <= last; ++cpu) CPU_SET(cpu, &set);
        any = true;
    }
    return any;
}

// The calling thread's CPUs as a list ("0,1"), for the JSON line.
std::string cpu_list(const cpu_set_t& set) {
    std::string out;
    for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu)
        if (CPU_ISSET(cpu, &set)) {
            if (!out.empty()) out += ',';
            out += std::to_string(cpu);
        }
    return out;
}

// ---- options -----------------------------------------------------------------------------------

constexpr std::string_view usage = R"(usage: wsbroadcast-loadgen --server PATH --scenario NAME [options]

Starts PATH --port 0 --threads N, drives it over 127.0.0.1 and prints one JSON line.
With --server-kind naive, starts PATH with PORT=N (a free port) in its environment instead.

Scenarios (defaults in brackets):
  fanout    S subscribers on one id; publish M messages as fast as the publishers allow [S=1000 M=2000]
  targeted  S subscribers on S ids; message k goes to id k mod S [S=10000 M=20000]
  rate      S subscribers on one id; publish at a fixed --rate, report latency [S=20 M=5000 rate=1000]
  idle      S subscribers on S ids stay idle; RSS per connection; then one push to each of
            --sample ids spread over all of them [S=10000 sample=100]
  slow      S fast subscribers plus one that never reads, on one id [S=100 M=20000 size=1024]
  relay     starts a redis-server and two server instances with --redis; S subscribers on one id,
            alternating between the instances (even index on A, odd on B); publish M messages to A
            only, as in fanout [S=1000 M=2000]. With an even --ids above 1 each id would live on
            one instance only

Options:
  --server PATH          the wsbroadcast-server binary (required)
  --server-threads N     the server's --threads [2; naive: 1, and only 1]
  --server-kind KIND     wsbroadcast: the reference server [default]; naive: the naive Beast peer
                         (../shared/bench/beast_naive.cpp: one thread, PORT from the environment,
                         answers {"sent":true}). Not with --tls, --server-arg, relay or slow
  --server-cpus LIST     run the server on these CPUs only (sched_setaffinity before it starts),
                         e.g. 0 or 0,1 or 0-1; pin the loadgen itself with taskset
  --scenario NAME        one of the above (required)
  --subscribers N        subscribers (the slow scenario adds its one slow client)
  --ids N                distinct ids the subscribers are spread over
  --messages N           messages to publish
  --size N               bytes per message, at least 32 [64; slow: 1024]
  --publishers N         keep-alive HTTP publishing connections [1]
  --rate N               messages per second in the rate scenario [1000]
  --sample N             ids pushed to in the idle check [100]
  --client-threads N     io_context threads for the subscribers [1]
  --batch N              concurrent WebSocket handshakes while connecting [200]
  --receive-buffer BYTES each subscriber's SO_RCVBUF, set before it connects: a fixed window, as
                         on a slow link, instead of loopback's autotuning (up to tcp_rmem's
                         maximum, 32 MiB here) [0: the kernel's]
  --deadline SECONDS     wait at most this long for deliveries once publishing is done [30]
  --publish-token TOKEN  send "Authorization: Bearer TOKEN" with every push
                         [$WSBROADCAST_PUBLISH_TOKEN, which the server also reads]
  --server-arg ARG       one more argument for the server (repeatable), e.g. --server-arg --overflow
                         --server-arg drop-oldest
  --tls                  (no value) wss:// and https://: makes a self-signed certificate for
                         127.0.0.1 in a temporary directory with the openssl command, passes it to
                         the server as --tls-cert/--tls-key, verifies the server against it. Every
                         scenario but relay
  --redis-server PATH    the redis-server binary for the relay scenario [redis-server, from PATH]
  --max-seconds SECONDS  watchdog for the whole run [600]
  --help                 this text

Exit status: 0 when every subscriber got every message once and in order, 1 otherwise,
2 for bad options, 3 if a server (or redis-server) did not start or the watchdog fired.
)";

struct config {
    std::string server_path;
    std::string redis_server_path = "redis-server";
    std::vector<std::string> server_args;
    std::string publish_token;
    unsigned server_threads = 2;
    std::string scenario;
    std::optional<unsigned> subscribers, ids, messages, size;
    unsigned publishers = 1;
    unsigned rate = 1000;
    unsigned sample = 100;
    unsigned client_threads = 1;
    unsigned batch = 200;
    unsigned receive_buffer = 0;  // subscribers' SO_RCVBUF; 0: the kernel's autotuning
    double deadline = 30;
    double max_seconds = 600;
    bool tls = false;
    std::string server_kind = "wsbroadcast";
    bool naive = false;  // server_kind == "naive"
    bool server_threads_given = false;
    std::string server_cpus;  // as given; empty: the loadgen's own affinity
    cpu_set_t server_cpu_set{};

    // Resolved from the scenario.
    unsigned n_subscribers = 0, n_ids = 0, n_messages = 0, n_size = 0;
    bool slow = false;
    bool paced = false;
    bool relay = false;  // two instances and a redis-server
};

std::optional<config> parse_options(int argc, char** argv, int& exit_code) {
    config c;
    if (const char* token = std::getenv("WSBROADCAST_PUBLISH_TOKEN")) c.publish_token = token;
    auto fail = [&](const std::string& why) {
        std::cerr << "wsbroadcast-loadgen: " << why << "\n\n" << usage;
        exit_code = 2;
        return std::optional<config>{};
    };
    for (int i = 1; i < argc; i += 2) {
        const std::string_view arg = argv[i];
        if (arg == "--help" || arg == "-h") {
            std::cout << usage;
            exit_code = 0;
            return std::nullopt;
        }
        if (arg == "--tls") {  // the one option without a value
            c.tls = true;
            --i;
            continue;
        }
        if (i + 1 >= argc) return fail(std::string(arg) + " needs a value");
        const std::string_view v = argv[i + 1];
        unsigned n = 0;
        double d = 0;
        auto number = [&](unsigned& out, unsigned min) {
            if (!parse_number(v, n) || n < min) return false;
            out = n;
            return true;
        };
        auto optional_number = [&](std::optional<unsigned>& out, unsigned min) {
            if (!parse_number(v, n) || n < min) return false;
            out = n;
            return true;
        };
        auto seconds = [&](double& out) {
            if (!parse_number(v, d) || !(d > 0)) return false;
            out = d;
            return true;
        };
        bool ok = true;
        if (arg == "--server")
            c.server_path = v;
        else if (arg == "--scenario")
            c.scenario = v;
        else if (arg == "--server-arg")
            c.server_args.emplace_back(v);
        else if (arg == "--publish-token")
            c.publish_token = v;
        else if (arg == "--redis-server")
            c.redis_server_path = v;
        else if (arg == "--server-threads") {
            ok = number(c.server_threads, 1);
            c.server_threads_given = true;
        } else if (arg == "--server-kind") {
            c.server_kind = v;
        } else if (arg == "--server-cpus") {
            ok = parse_cpu_list(v, c.server_cpu_set);
            c.server_cpus = v;
        } else if (arg == "--subscribers")
            ok = optional_number(c.subscribers, 1);
        else if (arg == "--ids")
            ok = optional_number(c.ids, 1);
        else if (arg == "--messages")
            ok = optional_number(c.messages, 1);
        else if (arg == "--size")
            ok = optional_number(c.size, static_cast<unsigned>(min_payload));
        else if (arg == "--publishers")
            ok = number(c.publishers, 1);
        else if (arg == "--rate")
            ok = number(c.rate, 1);
        else if (arg == "--sample")
            ok = number(c.sample, 1);
        else if (arg == "--client-threads")
            ok = number(c.client_threads, 1);
        else if (arg == "--batch")
            ok = number(c.batch, 1);
        else if (arg == "--receive-buffer")
            ok = number(c.receive_buffer, 0);
        else if (arg == "--deadline")
            ok = seconds(c.deadline);
        else if (arg == "--max-seconds")
            ok = seconds(c.max_seconds);
        else
            return fail("unknown option " + std::string(arg));
        if (!ok) return fail(std::string(arg) + " needs a valid value");
    }
    if (c.server_path.empty()) return fail("--server is required");
    if (c.publishers > 0xffff) return fail("--publishers must be at most 65535");
    if (c.server_kind == "naive") {
        c.naive = true;
        // It has one thread, no options, no TLS, no relay: refuse what it would silently ignore.
        if (c.server_threads_given && c.server_threads != 1) return fail("the naive server has one thread");
        c.server_threads = 1;
        if (c.tls) return fail("--tls does not apply to the naive server");
        if (!c.server_args.empty()) return fail("--server-arg does not apply to the naive server");
    } else if (c.server_kind != "wsbroadcast") {
        return fail("--server-kind must be wsbroadcast or naive");
    }

    unsigned subs = 0, ids = 0, messages = 0, size = 64;
    if (c.scenario == "fanout") {
        subs = c.subscribers.value_or(1000), ids = c.ids.value_or(1), messages = c.messages.value_or(2000);
    } else if (c.scenario == "targeted") {
        subs = c.subscribers.value_or(10000), ids = c.ids.value_or(subs), messages = c.messages.value_or(20000);
    } else if (c.scenario == "rate") {
        subs = c.subscribers.value_or(20), ids = c.ids.value_or(1), messages = c.messages.value_or(5000);
        c.paced = true;
    } else if (c.scenario == "idle") {
        subs = c.subscribers.value_or(10000), ids = c.ids.value_or(subs);
        messages = c.messages.value_or(std::min(c.sample, ids));
    } else if (c.scenario == "slow") {
        subs = c.subscribers.value_or(100), ids = 1, messages = c.messages.value_or(20000), size = 1024;
        if (c.ids && *c.ids != 1) return fail("the slow scenario uses one id");
        c.slow = true;
    } else if (c.scenario == "relay") {
        subs = c.subscribers.value_or(1000), ids = c.ids.value_or(1), messages = c.messages.value_or(2000);
        c.relay = true;
    } else {
        return fail("--scenario must be fanout, targeted, rate, idle, slow or relay");
    }
    // relay's readiness check speaks plain HTTP to /healthz; TLS there is not implemented.
    if (c.tls && c.relay) return fail("--tls does not apply to the relay scenario");
    if (c.naive && c.relay) return fail("the relay scenario needs the reference server");
    // The peer awaits each subscriber's write in turn: a client that never reads stops every push.
    if (c.naive && c.slow) return fail("the slow scenario would stall the naive server");
    c.n_subscribers = subs;
    c.n_ids = std::min(ids, subs);
    c.n_messages = messages;
    c.n_size = c.size.value_or(size);
    return c;
}

// ---- child processes -----------------------------------------------------------------------------

// The processes this run started (server instance A, instance B, redis-server, openssl for --tls),
// for the signal handler, the watchdog and std::terminate: the loadgen never leaves one behind. A
// slot is set right after the process is spawned and cleared once it has been reaped.
constexpr std::size_t child_slots = 4;
std::atomic<pid_t> g_child_pids[child_slots] = {-1, -1, -1, -1};
constexpr std::size_t redis_slot = 2;
constexpr std::size_t openssl_slot = 3;

// The servers' default --redis-prefix: the channel of id X is this + X.
constexpr std::string_view redis_prefix = "wsbroadcast:";

// SIGKILLs every process still in g_child_pids and waits for them.
void kill_children() {
    pid_t pids[child_slots];
    for (std::size_t i = 0; i < child_slots; ++i) {
        pids[i] = g_child_pids[i].exchange(-1);
        if (pids[i] > 0) kill(pids[i], SIGKILL);
    }
    for (const pid_t pid : pids)
        if (pid > 0) waitpid(pid, nullptr, 0);
}

// SIGTERM, then waits up to `limit`; SIGKILL after that. Returns the exit status, or -1 when it had
// to be killed (or was not running), or 128 + signal. Sets pid to -1.
int stop_child(pid_t& pid, std::chrono::milliseconds limit) {
    if (pid <= 0) return -1;
    kill(pid, SIGTERM);
    const auto deadline = steady::now() + limit;
    while (steady::now() < deadline) {
        int status = 0;
        if (waitpid(pid, &status, WNOHANG) == pid) {
            pid = -1;
            return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        }
        std::this_thread::sleep_for(10ms);
    }
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
    pid = -1;
    return -1;
}

void kill_child(pid_t& pid) {
    if (pid <= 0) return;
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
    pid = -1;
}

// Starts args[0] (found in PATH) with no input and its output and errors discarded: a helper
// process (redis-server, openssl) whose chatter would mix with the JSON line. Returns
// posix_spawnp's error, 0 when started.
int spawn_silent(std::vector<std::string> args, pid_t& pid) {
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
    const int rc = posix_spawnp(&pid, argv[0], &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    return rc;
}

unsigned short free_loopback_port();

class server_process {
public:
    explicit server_process(std::atomic<pid_t>* slot = nullptr) : slot_(slot) {}
    server_process(const server_process&) = delete;
    server_process& operator=(const server_process&) = delete;
    ~server_process() { kill_now(); }

    // Starts the server (with `extra` after the --server-arg arguments) and reads
    // "wsbroadcast-server listening on http://127.0.0.1:PORT with ..." from its stdout. The naive
    // peer takes its port from $PORT and says "beast_naive listening on 127.0.0.1:PORT" on stderr;
    // the port was free when we looked, and if it is taken before the peer binds it, the peer
    // exits and we try another.
    bool start(const config& c, const std::vector<std::string>& extra, std::string& error) {
        if (!c.naive) {
            std::vector<std::string> args = {
                c.server_path, "--address", "127.0.0.1", "--port", "0", "--threads", std::to_string(c.server_threads)};
            args.insert(args.end(), c.server_args.begin(), c.server_args.end());
            args.insert(args.end(), extra.begin(), extra.end());
            bool exited = false;
            return spawn_and_read_port(args, nullptr, STDOUT_FILENO, error, exited);
        }
        for (int attempt = 0; attempt < 5; ++attempt) {
            const unsigned short port = free_loopback_port();
            if (port == 0) {
                error = "no free port on 127.0.0.1 for the naive server";
                return false;
            }
            std::vector<std::string> env;
            for (char** e = environ; *e; ++e)
                if (!std::string_view(*e).starts_with("PORT=")) env.emplace_back(*e);
            env.push_back("PORT=" + std::to_string(port));
            bool exited = false;
            if (spawn_and_read_port({c.server_path}, &env, STDERR_FILENO, error, exited)) {
                if (port_ == port) return true;
                error =
                    "the naive server listens on " + std::to_string(port_) + ", not on PORT=" + std::to_string(port);
                return false;
            }
            if (!exited) return false;
        }
        error += " (5 attempts)";
        return false;
    }

    pid_t pid() const { return pid_; }
    unsigned short port() const { return port_; }

    // SIGTERM, then waits up to `limit`; SIGKILL after that. Returns the exit status, or -1 when it
    // had to be killed, or 128 + signal.
    int stop(std::chrono::milliseconds limit) {
        const int status = stop_child(pid_, limit);
        if (slot_) slot_->store(-1);
        close_pipe();
        return status;
    }

    void kill_now() {
        kill_child(pid_);
        if (slot_) slot_->store(-1);
        close_pipe();
    }

private:
    // Starts args with `env` (nullptr: ours), its `fd` (stdout or stderr) into a pipe, and reads the
    // port from the first line, "... listening on [http://]127.0.0.1:PORT[ with ...]". `exited`
    // tells a server that ended at once (a port taken) from one that did not answer.
    bool spawn_and_read_port(std::vector<std::string> args, std::vector<std::string>* env, int fd, std::string& error,
                             bool& exited) {
        int out[2];
        if (pipe(out) != 0) {
            error = "pipe failed";
            return false;
        }
        posix_spawn_file_actions_t actions;
        posix_spawn_file_actions_init(&actions);
        posix_spawn_file_actions_adddup2(&actions, out[1], fd);
        posix_spawn_file_actions_addclose(&actions, out[0]);
        // The JSON line is ours alone on stdout: a peer's stdout goes nowhere.
        if (fd != STDOUT_FILENO) posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
        std::vector<char*> argv, envp;
        for (auto& a : args) argv.push_back(a.data());
        argv.push_back(nullptr);
        if (env) {
            for (auto& e : *env) envp.push_back(e.data());
            envp.push_back(nullptr);
        }
        const int rc = posix_spawn(&pid_, argv[0], &actions, nullptr, argv.data(), env ? envp.data() : environ);
        posix_spawn_file_actions_destroy(&actions);
        close(out[1]);
        if (rc != 0) {
            close(out[0]);
            pid_ = -1;
            error = "cannot start " + args[0] + ": " + std::strerror(rc);
            return false;
        }
        if (slot_) slot_->store(pid_);
        out_fd_ = out[0];  // kept open until the end, so a late write cannot kill the server

        std::string line;
        const auto deadline = steady::now() + 10s;
        while (line.find('\n') == std::string::npos && line.size() < 1024) {
            const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - steady::now()).count();
            if (left <= 0) break;
            pollfd p{out_fd_, POLLIN, 0};
            if (poll(&p, 1, static_cast<int>(left)) <= 0) break;
            char buf[256];
            const auto n = read(out_fd_, buf, sizeof buf);
            if (n <= 0) {  // the server closed its end: it has exited (or is exiting)
                int status = 0;
                for (int i = 0; i < 200 && !exited; ++i) {  // at most 2 s
                    exited = waitpid(pid_, &status, WNOHANG) == pid_;
                    if (!exited) std::this_thread::sleep_for(10ms);
                }
                if (exited) {
                    pid_ = -1;
                    if (slot_) slot_->store(-1);
                    close_pipe();
                }
                break;
            }
            line.append(buf, static_cast<std::size_t>(n));
        }
        constexpr std::string_view listening = "listening on ";
        const auto from = line.find(listening);
        const auto end = from == std::string::npos ? from : line.find_first_of(" \n", from + listening.size());
        const auto colon = end == std::string::npos ? end : line.rfind(':', end);
        unsigned short port = 0;
        if (colon == std::string::npos || colon < from ||
            !parse_number(std::string_view(line).substr(colon + 1, end - colon - 1), port) || port == 0) {
            error = "the server did not print its port; it said: " + line;
            return false;
        }
        port_ = port;
        return true;
    }

    void close_pipe() {
        if (out_fd_ >= 0) close(out_fd_);
        out_fd_ = -1;
    }
    std::atomic<pid_t>* slot_ = nullptr;
    pid_t pid_ = -1;
    int out_fd_ = -1;
    unsigned short port_ = 0;
};

// ---- --tls: a self-signed certificate for 127.0.0.1 ---------------------------------------------

// Made at run time in a fresh directory with the openssl command, as tests/server_tests.cpp does;
// the files and the directory are removed when this object goes away (not when a signal ends the
// loadgen: then /tmp/wsbroadcast-loadgen-tls-* stays behind).
class tls_certificate {
public:
    tls_certificate() = default;
    tls_certificate(const tls_certificate&) = delete;
    tls_certificate& operator=(const tls_certificate&) = delete;
    ~tls_certificate() {
        if (dir_.empty()) return;
        unlink(cert_.c_str());
        unlink(key_.c_str());
        rmdir(dir_.c_str());
    }

    bool make(std::string& error) {
        std::string dir = "/tmp/wsbroadcast-loadgen-tls-XXXXXX";
        if (!mkdtemp(dir.data())) {
            error = std::string("mkdtemp failed: ") + std::strerror(errno);
            return false;
        }
        dir_ = dir;
        cert_ = dir_ + "/cert.pem";
        key_ = dir_ + "/key.pem";
        std::vector<std::string> args = {"openssl",  "req",
                                         "-x509",    "-newkey",
                                         "rsa:2048", "-nodes",
                                         "-days",    "2",
                                         "-subj",    "/CN=127.0.0.1",
                                         "-addext",  "subjectAltName=IP:127.0.0.1",
                                         "-keyout",  key_,
                                         "-out",     cert_};
        pid_t pid = -1;
        if (const int rc = spawn_silent(args, pid); rc != 0) {
            error = std::string("cannot start openssl: ") + std::strerror(rc);
            return false;
        }
        g_child_pids[openssl_slot].store(pid);
        // A 2048-bit RSA key takes well under a second; 60 s is a hang.
        const int status = stop_after(pid, 60s);
        g_child_pids[openssl_slot].store(-1);
        struct stat st{};
        if (status != 0 || stat(cert_.c_str(), &st) != 0 || stat(key_.c_str(), &st) != 0) {
            error = "openssl req could not make a certificate in " + dir_ + " (exit " + std::to_string(status) + ")";
            return false;
        }
        return true;
    }
    const std::string& cert() const { return cert_; }
    const std::string& key() const { return key_; }

private:
    // Waits up to `limit` for `pid` to exit; SIGKILL after that. The exit status, or -1.
    static int stop_after(pid_t pid, std::chrono::milliseconds limit) {
        const auto deadline = steady::now() + limit;
        while (steady::now() < deadline) {
            int status = 0;
            if (waitpid(pid, &status, WNOHANG) == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
            std::this_thread::sleep_for(10ms);
        }
        kill_child(pid);
        return -1;
    }
    std::string dir_, cert_, key_;
};

// ---- short loopback exchanges: Redis commands, /healthz ------------------------------------------

struct fd_guard {
    int fd;
    explicit fd_guard(int f) : fd(f) {}
    fd_guard(const fd_guard&) = delete;
    fd_guard& operator=(const fd_guard&) = delete;
    ~fd_guard() {
        if (fd >= 0) close(fd);
    }
};

// Connects to 127.0.0.1:port, sends `request`, then reads until `complete(answer)` holds, the peer
// closes, or `limit` has passed. Returns what was read; nullopt when connecting or sending failed.
std::optional<std::string> exchange(unsigned short port, std::string_view request,
                                    const std::function<bool(std::string_view)>& complete,
                                    std::chrono::milliseconds limit) {
    const auto deadline = steady::now() + limit;
    auto wait = [&](int fd, short events) {
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - steady::now()).count();
        if (left <= 0) return false;
        pollfd p{fd, events, 0};
        return poll(&p, 1, static_cast<int>(left)) > 0;
    };
    fd_guard s{socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)};
    if (s.fd < 0) return std::nullopt;
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(s.fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0) {
        if (errno != EINPROGRESS || !wait(s.fd, POLLOUT)) return std::nullopt;
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(s.fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err != 0) return std::nullopt;
    }
    std::size_t sent = 0;
    for (int i = 0; i < 10000 && sent < request.size(); ++i) {
        const auto n = send(s.fd, request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
        if (n > 0)
            sent += static_cast<std::size_t>(n);
        else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) && wait(s.fd, POLLOUT))
            continue;
        else
            return std::nullopt;
    }
    if (sent < request.size()) return std::nullopt;
    std::string answer;
    for (int i = 0; i < 10000 && !complete(answer) && answer.size() < (1u << 20); ++i) {
        char buf[4096];
        const auto n = recv(s.fd, buf, sizeof buf, 0);
        if (n > 0)
            answer.append(buf, static_cast<std::size_t>(n));
        else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) && wait(s.fd, POLLIN))
            continue;
        else
            break;  // closed, an error, or out of time
    }
    return answer;
}

// A port on 127.0.0.1 that nobody listens on right now (0 if none could be found).
unsigned short free_loopback_port() {
    fd_guard s{socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)};
    if (s.fd < 0) return 0;
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = 0;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    if (bind(s.fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0 ||
        getsockname(s.fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0)
        return 0;
    return ntohs(addr.sin_port);
}

// A Redis command in RESP: an array of bulk strings.
std::string resp_command(const std::vector<std::string>& args) {
    std::string out = "*" + std::to_string(args.size()) + "\r\n";
    for (const auto& a : args) out += "$" + std::to_string(a.size()) + "\r\n" + a + "\r\n";
    return out;
}

// The elements of a RESP array of bulk strings and integers (PUBSUB NUMSUB answers one), as text,
// once `in` holds all of it; nullopt while it is incomplete or when it is another kind of reply.
std::optional<std::vector<std::string>> resp_array(std::string_view in) {
    std::size_t pos = 0;
    auto line = [&](std::string_view& out) {
        const auto end = in.find("\r\n", pos);
        if (end == std::string_view::npos) return false;
        out = in.substr(pos, end - pos);
        pos = end + 2;
        return true;
    };
    std::string_view head;
    std::size_t count = 0;
    if (!line(head) || !head.starts_with('*') || !parse_number(head.substr(1), count) || count > 100000)
        return std::nullopt;
    std::vector<std::string> items;
    for (std::size_t i = 0; i < count; ++i) {
        std::string_view h;
        std::size_t n = 0;
        if (!line(h) || h.empty()) return std::nullopt;
        if (h.front() == ':') {
            items.emplace_back(h.substr(1));
        } else if (h.front() == '$' && parse_number(h.substr(1), n) && pos + n + 2 <= in.size()) {
            items.emplace_back(in.substr(pos, n));
            pos += n + 2;
        } else {
            return std::nullopt;
        }
    }
    return items;
}

bool has_line(std::string_view in) { return in.find("\r\n") != std::string_view::npos; }

// A redis-server of our own on a free loopback port, without persistence, its output to /dev/null.
class redis_process {
public:
    explicit redis_process(std::atomic<pid_t>* slot) : slot_(slot) {}
    redis_process(const redis_process&) = delete;
    redis_process& operator=(const redis_process&) = delete;
    ~redis_process() { kill_now(); }

    // Starts `path` (looked up in PATH when it has no '/') and waits until it answers PING. The port
    // was free when we looked; if another process takes it first, redis-server exits and we try
    // another one.
    bool start(const std::string& path, std::string& error) {
        for (int attempt = 0; attempt < 5; ++attempt) {
            port_ = free_loopback_port();
            if (port_ == 0) {
                error = "no free port on 127.0.0.1 for redis-server";
                return false;
            }
            std::vector<std::string> args = {path,     "--save",    "",       "--appendonly",       "no",
                                             "--bind", "127.0.0.1", "--port", std::to_string(port_)};
            if (const int rc = spawn_silent(args, pid_); rc != 0) {
                pid_ = -1;
                error = "cannot start " + path + ": " + std::strerror(rc);
                return false;
            }
            slot_->store(pid_);
            bool exited = false;
            const auto deadline = steady::now() + 10s;
            for (int i = 0; i < 1000 && steady::now() < deadline; ++i) {
                int status = 0;
                if (waitpid(pid_, &status, WNOHANG) == pid_) {
                    pid_ = -1;
                    slot_->store(-1);
                    exited = true;
                    break;
                }
                const auto reply = exchange(port_, resp_command({"PING"}), has_line, 1s);
                if (reply && reply->starts_with("+PONG")) return true;
                std::this_thread::sleep_for(20ms);
            }
            if (!exited) {
                kill_now();
                error = path + " did not answer PING on port " + std::to_string(port_) + " within 10 s";
                return false;
            }
        }
        error = path + " exited at start 5 times (port taken?)";
        return false;
    }

    int stop(std::chrono::milliseconds limit) {
        const int status = stop_child(pid_, limit);
        slot_->store(-1);
        return status;
    }
    void kill_now() {
        kill_child(pid_);
        slot_->store(-1);
    }
    pid_t pid() const { return pid_; }
    unsigned short port() const { return port_; }

private:
    std::atomic<pid_t>* slot_;
    pid_t pid_ = -1;
    unsigned short port_ = 0;
};

// utime + stime of the whole process, in clock ticks.
std::optional<std::uint64_t> cpu_ticks(pid_t pid) {
    std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
    std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    const auto paren = text.rfind(')');
    if (paren == std::string::npos) return std::nullopt;
    std::istringstream rest(text.substr(paren + 1));
    std::string field;
    std::uint64_t utime = 0, stime = 0;
    // After the ")" come fields 3 (state) ... ; utime is field 14, stime field 15.
    for (int i = 3; i <= 15 && rest >> field; ++i) {
        if (i == 14 && !parse_number(field, utime)) return std::nullopt;
        if (i == 15 && !parse_number(field, stime)) return std::nullopt;
    }
    return utime + stime;
}

std::optional<std::uint64_t> rss_kib(pid_t pid) {
    std::ifstream f("/proc/" + std::to_string(pid) + "/status");
    std::string line;
    for (int i = 0; i < 100 && std::getline(f, line); ++i) {
        if (!line.starts_with("VmRSS:")) continue;
        std::istringstream in(line.substr(6));
        std::uint64_t kib = 0;
        if (in >> kib) return kib;
    }
    return std::nullopt;
}

// Busy time of all CPUs (everything but idle and iowait), in clock ticks: with the server's and our
// own ticks it tells how much CPU other processes took during the measurement.
std::optional<std::uint64_t> machine_busy_ticks() {
    std::ifstream f("/proc/stat");
    std::string cpu;
    std::uint64_t v[8] = {};
    if (!(f >> cpu) || cpu != "cpu") return std::nullopt;
    for (auto& x : v)
        if (!(f >> x)) return std::nullopt;
    return v[0] + v[1] + v[2] + v[5] + v[6] + v[7];  // user nice system irq softirq steal
}

std::uint64_t own_cpu_us() {
    rusage u{};
    getrusage(RUSAGE_SELF, &u);
    auto us = [](const timeval& t) {
        return static_cast<std::uint64_t>(t.tv_sec) * 1000000 + static_cast<std::uint64_t>(t.tv_usec);
    };
    return us(u.ru_utime) + us(u.ru_stime);
}

// ---- the run's shared state ----------------------------------------------------------------------

// Which message goes where: message k goes to id target[k], from publisher k mod P; expected[id * P + p]
// is how many messages publisher p sends to id (the sequence numbers of that pair are 0 .. n-1).
struct plan {
    unsigned ids = 0, publishers = 0, messages = 0;
    std::vector<std::uint32_t> target;
    std::vector<std::uint32_t> expected;
};

plan make_plan(const config& c) {
    plan p;
    p.ids = c.n_ids;
    p.publishers = c.publishers;
    p.messages = c.n_messages;
    p.target.resize(p.messages);
    p.expected.assign(std::size_t{p.ids} * p.publishers, 0);
    // idle: spread the few sample messages over all ids; otherwise round robin.
    const std::uint64_t step = c.scenario == "idle" ? std::max<std::uint64_t>(1, p.ids / std::max(1u, p.messages)) : 1;
    for (std::uint64_t k = 0; k < p.messages; ++k) {
        const auto id = static_cast<std::uint32_t>((k * step) % p.ids);
        p.target[k] = id;
        ++p.expected[std::size_t{id} * p.publishers + k % p.publishers];
    }
    return p;
}

// One io_context and its thread. Counters are written by that thread only and read by main.
struct worker {
    net::io_context ioc{1};
    std::thread thread;
    histogram latency;  // read only after the thread has been joined
    std::atomic<std::uint64_t> distinct{0};
    std::atomic<std::uint64_t> last_delivery_ns{0};
    std::atomic<unsigned> connected{0}, failed{0}, ended{0};

    static void bump(std::atomic<unsigned>& a) {
        a.store(a.load(std::memory_order_relaxed) + 1, std::memory_order_release);
    }
};

struct subscriber {
    std::uint32_t index = 0;
    std::uint32_t id = 0;
    unsigned instance = 0;  // which server it connects to (relay: even index A, odd B)
    bool slow = false;
    worker* w = nullptr;
    // Per publisher: bits of the sequence numbers received, and 1 + the highest one seen.
    std::vector<std::uint64_t> bits;
    std::vector<std::uint32_t> word_offset;  // publishers + 1 entries
    std::vector<std::uint32_t> high;
    std::uint64_t received = 0, duplicates = 0, out_of_order = 0, unexpected = 0;
    // How it went; the flags are read by the main thread while the worker runs.
    std::atomic<bool> connected{false};
    std::atomic<bool> ended{false};
    bool ended_during_shutdown = false;
    std::optional<std::uint16_t> close_code;
    std::string end_reason;
};

struct publisher {
    unsigned index = 0;
    std::vector<std::uint32_t> sent;  // per id: messages sent (= next sequence number)
    std::uint64_t published = 0, answered = 0, connections = 0, relayed = 0, errors = 0, reconnects = 0;
    std::uint64_t max_late_ns = 0;  // rate: how far behind its schedule it fell
    std::string error;
    std::atomic<bool> connected{false}, done{false};
};

struct run_state {
    const config& cfg;
    const plan& pl;
    std::vector<tcp::endpoint> endpoints;  // per server instance; the publishers use the first
    std::vector<std::string> hosts;        // per server instance: 127.0.0.1:PORT
    std::vector<std::string> targets;      // per id: /api/v1/ws/{id}
    std::atomic<bool> go{false}, stop_publishing{false}, drain_slow{false}, shutting_down{false};
    std::uint64_t t0_ns = 0;      // rate: when message 0 is due; written before `go`
    ssl::context* tls = nullptr;  // --tls: the client context, which trusts the run's certificate
    // Per message, the latency of its first delivery (ns; max: none yet), at first[start[id *
    // publishers + publisher] + sequence]: what a reader of one connection sees, without the
    // loadgen's own time reading the others.
    std::vector<std::uint64_t> start;
    std::unique_ptr<std::atomic<std::uint64_t>[]> first;
};

// The client streams, plain or TLS (--tls), and how to make one.
template <bool Tls>
using http_stream = std::conditional_t<Tls, beast::ssl_stream<beast::tcp_stream>, beast::tcp_stream>;
template <bool Tls>
using ws_stream = websocket::stream<http_stream<Tls>>;

template <bool Tls, class Stream>
Stream make_stream(const net::any_io_executor& ex, run_state& rs) {
    if constexpr (Tls)
        return Stream(ex, *rs.tls);
    else
        return Stream(ex);
}

// The TLS handshake on a connected stream, verifying the certificate against 127.0.0.1; nothing
// without TLS.
template <bool Tls>
net::awaitable<void> client_handshake(http_stream<Tls>& stream, beast::error_code& ec) {
    if constexpr (Tls) {
        stream.set_verify_callback(ssl::host_name_verification("127.0.0.1"));
        co_await stream.async_handshake(ssl::stream_base::client, net::redirect_error(net::use_awaitable, ec));
    }
    co_return;
}

void report_exception(std::exception_ptr e) {
    if (!e) return;
    try {
        std::rethrow_exception(e);
    } catch (const std::exception& x) {
        say(std::string("coroutine failed: ") + x.what());
    }
}

// ---- subscribers ---------------------------------------------------------------------------------

void on_message(subscriber& s, run_state& rs, const char* p, std::size_t n) {
    const std::uint64_t now = now_ns();
    ++s.received;
    std::uint64_t pub = 0, seq = 0, ts = 0;
    if (n != rs.cfg.n_size || !read_hex(p, 4, pub) || !read_hex(p + 5, 8, seq) || !read_hex(p + 14, 16, ts) ||
        pub >= rs.pl.publishers || seq >= rs.pl.expected[std::size_t{s.id} * rs.pl.publishers + pub]) {
        ++s.unexpected;
        return;
    }
    std::uint64_t& word = s.bits[s.word_offset[pub] + seq / 64];
    const std::uint64_t mask = std::uint64_t{1} << (seq % 64);
    if (word & mask) {
        ++s.duplicates;
        return;
    }
    word |= mask;
    if (seq + 1 < s.high[pub])
        ++s.out_of_order;
    else
        s.high[pub] = static_cast<std::uint32_t>(seq + 1);
    if (s.slow) return;
    worker& w = *s.w;
    const std::uint64_t latency_ns = now > ts ? now - ts : 0;
    auto& first = rs.first[rs.start[std::size_t{s.id} * rs.pl.publishers + pub] + seq];
    for (auto seen = first.load(std::memory_order_relaxed);
         latency_ns < seen && !first.compare_exchange_weak(seen, latency_ns, std::memory_order_relaxed);) {
    }
    w.latency.add(latency_ns / 1000);
    w.distinct.store(w.distinct.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
    w.last_delivery_ns.store(now, std::memory_order_relaxed);
}

template <bool Tls>
net::awaitable<void> run_subscriber(subscriber& s, run_state& rs) {
    worker& w = *s.w;
    auto ws = make_stream<Tls, ws_stream<Tls>>(co_await net::this_coro::executor, rs);
    auto& stream = beast::get_lowest_layer(ws);
    beast::error_code ec;
    stream.expires_after(15s);    // connecting, the TLS handshake and the WebSocket handshake
    if (rs.cfg.receive_buffer) {  // before the connect: the window is agreed in the handshake
        stream.socket().open(rs.endpoints[s.instance].protocol(), ec);
        if (!ec) stream.socket().set_option(net::socket_base::receive_buffer_size(int(rs.cfg.receive_buffer)), ec);
    }
    if (!ec) co_await stream.async_connect(rs.endpoints[s.instance], net::redirect_error(net::use_awaitable, ec));
    if (!ec) co_await client_handshake<Tls>(ws.next_layer(), ec);
    if (!ec) {
        co_await ws.async_handshake(rs.hosts[s.instance], rs.targets[s.id],
                                    net::redirect_error(net::use_awaitable, ec));
    }
    if (ec) {
        s.end_reason = "connect: " + ec.message();
        s.ended = true;
        worker::bump(w.failed);
        co_return;
    }
    stream.expires_never();
    s.connected = true;
    worker::bump(w.connected);

    beast::flat_buffer buffer;
    if (s.slow) {
        // Never read until told to: the server's writes fill both TCP buffers, then its outbox.
        net::steady_timer timer(co_await net::this_coro::executor);
        for (int i = 0; i < 1000000 && !rs.drain_slow.load() && !rs.shutting_down.load(); ++i) {
            timer.expires_after(10ms);
            co_await timer.async_wait(net::redirect_error(net::use_awaitable, ec));
        }
        // Drain what the kernel holds, until the server's close, an error, or 3 s of silence.
        for (std::uint64_t i = 0; i < 100000000; ++i) {
            stream.expires_after(3s);
            co_await ws.async_read(buffer, net::redirect_error(net::use_awaitable, ec));
            if (ec) break;
            const auto data = buffer.cdata();
            on_message(s, rs, static_cast<const char*>(data.data()), data.size());
            buffer.consume(buffer.size());
        }
    } else {
        for (;;) {  // ends when the server closes the connection, at the latest at shutdown
            co_await ws.async_read(buffer, net::redirect_error(net::use_awaitable, ec));
            if (ec) break;
            const auto data = buffer.cdata();
            on_message(s, rs, static_cast<const char*>(data.data()), data.size());
            buffer.consume(buffer.size());
        }
    }
    if (ec == websocket::error::closed) {
        s.close_code = static_cast<std::uint16_t>(ws.reason().code);
        s.end_reason = "close frame " + std::to_string(*s.close_code);
    } else {
        s.end_reason = ec.message();
    }
    s.ended_during_shutdown = rs.shutting_down.load();
    s.ended = true;
    worker::bump(w.ended);
}

// ---- publishers ----------------------------------------------------------------------------------

// Finds `name` (case-insensitive) in an HTTP header block and returns its value.
std::optional<std::string_view> header_value(std::string_view head, std::string_view name) {
    for (std::size_t pos = head.find("\r\n"); pos != std::string_view::npos; pos = head.find("\r\n", pos + 2)) {
        const auto line = head.substr(pos + 2, head.find("\r\n", pos + 2) - pos - 2);
        if (line.size() <= name.size() || line[name.size()] != ':') continue;
        bool same = true;
        for (std::size_t i = 0; i < name.size() && same; ++i)
            same =
                std::tolower(static_cast<unsigned char>(line[i])) == std::tolower(static_cast<unsigned char>(name[i]));
        if (!same) continue;
        auto value = line.substr(name.size() + 1);
        while (!value.empty() && value.front() == ' ') value.remove_prefix(1);
        return value;
    }
    return std::nullopt;
}

std::optional<std::size_t> header_number(std::string_view head, std::string_view name) {
    const auto value = header_value(head, name);
    std::size_t n = 0;
    if (value && parse_number(*value, n)) return n;
    return std::nullopt;
}

// "Connection: close" (the server's answer after --max-requests-per-connection pushes).
bool says_close(std::string_view head) {
    const auto value = header_value(head, "connection");
    if (!value || value->size() != 5) return false;
    for (std::size_t i = 0; i < 5; ++i)
        if (std::tolower(static_cast<unsigned char>((*value)[i])) != "close"[i]) return false;
    return true;
}

// A publisher's connection to the first server: a new stream, connected and (with TLS) shaken hands.
template <bool Tls>
net::awaitable<void> connect_publisher(std::optional<http_stream<Tls>>& stream, run_state& rs, beast::error_code& ec) {
    if constexpr (Tls)
        stream.emplace(co_await net::this_coro::executor, *rs.tls);
    else
        stream.emplace(co_await net::this_coro::executor);
    auto& tcp_layer = beast::get_lowest_layer(*stream);
    tcp_layer.expires_after(10s);
    co_await tcp_layer.async_connect(rs.endpoints[0], net::redirect_error(net::use_awaitable, ec));
    if (!ec) co_await client_handshake<Tls>(*stream, ec);
    tcp_layer.expires_never();
}

// Ends a publisher's connection: with TLS a close_notify (without one the server reports a truncated
// request), then the TCP shutdown.
template <bool Tls>
net::awaitable<void> close_publisher(http_stream<Tls>& stream) {
    beast::error_code ec;
    auto& tcp_layer = beast::get_lowest_layer(stream);
    tcp_layer.expires_after(2s);
    if constexpr (Tls) co_await stream.async_shutdown(net::redirect_error(net::use_awaitable, ec));
    tcp_layer.socket().shutdown(tcp::socket::shutdown_send, ec);
}

template <bool Tls>
net::awaitable<void> run_publisher(publisher& ps, run_state& rs) {
    const auto& cfg = rs.cfg;
    const auto& pl = rs.pl;
    std::optional<http_stream<Tls>> stream;
    beast::error_code ec;
    co_await connect_publisher<Tls>(stream, rs, ec);
    if (ec) {
        ps.error = "connect: " + ec.message();
        ++ps.errors;
        ps.done.store(true);
        co_return;
    }
    ps.connected.store(true);

    net::steady_timer timer(co_await net::this_coro::executor);
    for (int i = 0; i < 6000 && !rs.go.load() && !rs.stop_publishing.load(); ++i) {  // at most 60 s
        timer.expires_after(10ms);
        co_await timer.async_wait(net::redirect_error(net::use_awaitable, ec));
    }

    const std::string length = std::to_string(cfg.n_size);
    std::string request;
    request.reserve(256 + cfg.n_size);
    std::vector<char> in(16384 + 8 * std::size_t{cfg.n_size});  // the answer echoes the message, JSON-escaped
    std::size_t used = 0;

    for (std::uint64_t k = ps.index; k < pl.messages && rs.go.load() && !rs.stop_publishing.load();
         k += pl.publishers) {
        const std::uint32_t id = pl.target[k];
        std::uint64_t stamp;
        if (cfg.paced) {
            // Stamped with the time it is due, not the time it is sent: a publisher that falls
            // behind shows up in the latency instead of hiding it (no coordinated omission).
            const std::uint64_t due = rs.t0_ns + k * 1000000000ull / cfg.rate;
            const std::uint64_t now = now_ns();
            if (now < due) {
                timer.expires_after(std::chrono::nanoseconds(static_cast<std::int64_t>(due - now)));
                co_await timer.async_wait(net::redirect_error(net::use_awaitable, ec));
            } else {
                ps.max_late_ns = std::max(ps.max_late_ns, now - due);
            }
            stamp = due;
        } else {
            stamp = now_ns();
        }
        const std::uint32_t seq = ps.sent[id]++;

        request.clear();
        request += "POST ";
        request += rs.targets[id];
        request += " HTTP/1.1\r\nHost: ";
        request += rs.hosts[0];
        if (!cfg.publish_token.empty()) {
            request += "\r\nAuthorization: Bearer ";
            request += cfg.publish_token;
        }
        request += "\r\nContent-Type: text/plain\r\nContent-Length: ";
        request += length;
        request += "\r\n\r\n";
        const std::size_t body = request.size();
        request.append(cfg.n_size, 'x');
        char* p = request.data() + body;
        p[4] = p[13] = p[30] = ':';
        stamp_payload(p, ps.index, seq, stamp);
        ++ps.published;

        beast::get_lowest_layer(*stream).expires_after(10s);
        co_await net::async_write(*stream, net::buffer(request), net::redirect_error(net::use_awaitable, ec));
        // The answer: read into `in` until the header and Content-Length bytes of body are there.
        std::size_t head = 0, total = 0;
        for (int reads = 0; !ec && reads < 1000; ++reads) {
            const std::string_view text(in.data(), used);
            if (head == 0) {
                if (const auto end = text.find("\r\n\r\n"); end != std::string_view::npos) {
                    head = end + 4;
                    if (!text.starts_with("HTTP/1.1 200 ")) {
                        ps.error = "answer: " + std::string(text.substr(0, text.find('\r')));
                        break;
                    }
                    const auto length = header_number(text.substr(0, head), "content-length");
                    if (!length || head + *length > in.size()) {
                        ps.error = "answer without a usable Content-Length";
                        break;
                    }
                    total = head + *length;
                }
            }
            if (total != 0 && used >= total) break;
            if (used == in.size()) {
                ps.error = "answer header too large";
                break;
            }
            used += co_await stream->async_read_some(net::buffer(in.data() + used, in.size() - used),
                                                     net::redirect_error(net::use_awaitable, ec));
        }
        if (ec || total == 0 || used < total) {
            if (ec) ps.error = "push: " + ec.message();
            ++ps.errors;
            break;  // the connection's state is unknown: this publisher stops
        }
        // {"sent":true,"data":"...","connections":N}, or through Redis {"sent":true,"data":"...","relayed":true},
        // either followed by ,"position":"..." with history on. The data is our payload (hex digits, ':'
        // and 'x'), so neither key can occur inside it.
        // The naive peer answers exactly {"sent":true}, with no count.
        const std::string_view answer(in.data() + head, total - head);
        constexpr std::string_view key = "\"connections\":";
        const auto at = answer.rfind(key);
        std::uint64_t n = 0;
        if (cfg.naive) {
            if (answer != R"({"sent":true})" || !std::string_view(in.data(), head).starts_with("HTTP/1.1 200 ")) {
                ps.error = "the naive server answered: " + std::string(in.data(), std::min<std::size_t>(total, 200));
                ++ps.errors;
                break;
            }
        } else if (answer.find(",\"relayed\":true") != std::string_view::npos) {
            ++ps.relayed;
        } else if (at != std::string_view::npos) {
            const char* first = answer.data() + at + key.size();
            std::from_chars(first, answer.data() + answer.size(), n);
        } else {
            ps.error = "answer with neither \"connections\" nor \"relayed\": " + std::string(answer.substr(0, 200));
            ++ps.errors;
            break;
        }
        // Keep whatever came after this answer (nothing, without pipelining).
        std::memmove(in.data(), in.data() + total, used - total);
        used -= total;
        ps.connections += n;
        ++ps.answered;
        // The server answers "Connection: close" after --max-requests-per-connection (default 1000)
        // pushes on one connection and then closes it: carry on over a new one, as a client would.
        if (says_close(std::string_view(in.data(), head))) {
            co_await close_publisher<Tls>(*stream);
            used = 0;
            co_await connect_publisher<Tls>(stream, rs, ec);
            ++ps.reconnects;
            if (ec) {
                ps.error = "reconnect: " + ec.message();
                ++ps.errors;
                break;
            }
        }
    }
    co_await close_publisher<Tls>(*stream);
    ps.done.store(true);
}

// ---- the orchestration (main thread) -------------------------------------------------------------

// Polls `done` every `every` until it holds or `seconds` have passed.
template <class Done>
bool wait_for(Done done, double seconds, std::chrono::microseconds every = 2ms) {
    const auto start = steady::now();
    while (!done()) {
        if (seconds_since(start) >= seconds) return false;
        std::this_thread::sleep_for(every);
    }
    return true;
}

std::string fixed(double v, int digits) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.*f", digits, v);
    return buf;
}

std::string json_escape(std::string_view s) {
    std::string out = "\"";
    for (char ch : s) {
        const auto c = static_cast<unsigned char>(ch);
        if (c == '"' || c == '\\') {
            out += '\\';
            out += ch;
        } else if (c < 0x20) {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\u%04x", c);
            out += buf;
        } else {
            out += ch;
        }
    }
    return out + "\"";
}

// Watchdog: if the run is not over by the deadline, kill the server(s) and redis-server and exit 3.
class watchdog {
public:
    explicit watchdog(double seconds) {
        thread_ = std::thread([this, seconds] {
            std::unique_lock lock(mutex_);
            if (cv_.wait_for(lock, std::chrono::duration<double>(seconds), [this] { return done_; })) return;
            say("watchdog: the run took longer than --max-seconds, giving up");
            kill_children();
            std::fflush(nullptr);
            _exit(3);
        });
    }
    ~watchdog() {
        {
            std::lock_guard lock(mutex_);
            done_ = true;
        }
        cv_.notify_all();
        thread_.join();
    }

private:
    std::mutex mutex_;
    std::condition_variable cv_;
    bool done_ = false;
    std::thread thread_;
};

// A loadgen stopped by SIGINT / SIGTERM takes its server(s) and redis-server along.
extern "C" void on_stop_signal(int sig) {
    kill_children();  // kill() and waitpid() are async-signal-safe
    _exit(128 + sig);
}

// Asks Redis (PUBSUB NUMSUB) how many instances subscribe to each id's channel, and each instance's
// /healthz whether its relay is connected. True when Redis reports want[id] subscribers for every id
// and every instance says "redis":"connected".
bool relay_ready(unsigned short redis_port, const std::vector<unsigned>& want,
                 const std::vector<unsigned short>& server_ports) {
    constexpr std::size_t chunk = 500;  // channels per PUBSUB NUMSUB
    for (std::size_t first = 0; first < want.size(); first += chunk) {
        const std::size_t end = std::min(want.size(), first + chunk);
        std::vector<std::string> args = {"PUBSUB", "NUMSUB"};
        for (std::size_t id = first; id < end; ++id)
            args.push_back(std::string(redis_prefix) + "bench-" + std::to_string(id));
        const auto reply = exchange(
            redis_port, resp_command(args),
            [](std::string_view a) { return resp_array(a).has_value() || (a.starts_with('-') && has_line(a)); }, 2s);
        const auto items = reply ? resp_array(*reply) : std::nullopt;
        if (!items || items->size() != 2 * (end - first)) return false;
        for (std::size_t id = first; id < end; ++id) {
            unsigned n = 0;
            if (!parse_number((*items)[2 * (id - first) + 1], n) || n != want[id]) return false;
        }
    }
    for (const auto port : server_ports) {
        const std::string request =
            "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:" + std::to_string(port) + "\r\nConnection: close\r\n\r\n";
        const auto reply = exchange(
            port, request,
            [](std::string_view a) {
                const auto head = a.find("\r\n\r\n");
                return head != std::string_view::npos && a.find('}', head) != std::string_view::npos;
            },
            2s);
        if (!reply || !reply->starts_with("HTTP/1.1 200 ") ||
            reply->find("\"redis\":\"connected\"") == std::string::npos)
            return false;
    }
    return true;
}

int run(const config& cfg) {
    // 10,000 connections need more than the usual 1024 descriptors; the server inherits this limit.
    rlimit lim{};
    if (getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur < lim.rlim_max) {
        lim.rlim_cur = lim.rlim_max;
        setrlimit(RLIMIT_NOFILE, &lim);
    }
    getrlimit(RLIMIT_NOFILE, &lim);
    const std::uint64_t need = cfg.n_subscribers + cfg.publishers + 64;
    if (lim.rlim_cur < need)
        say("warning: RLIMIT_NOFILE is " + std::to_string(lim.rlim_cur) + ", " + std::to_string(need) + " are needed");

    watchdog dog(cfg.max_seconds);

    // --tls: the certificate, the server's options for it, and a client context that trusts it.
    tls_certificate certificate;
    std::optional<ssl::context> client_tls;
    std::vector<std::string> server_extra;
    std::string error;
    if (cfg.tls) {
        if (!certificate.make(error)) {
            say(error);
            return 3;
        }
        server_extra = {"--tls-cert", certificate.cert(), "--tls-key", certificate.key()};
        client_tls.emplace(ssl::context::tls_client);
        client_tls->load_verify_file(certificate.cert());
        client_tls->set_verify_mode(ssl::verify_peer);
    }

    // relay: a redis-server of our own, then two instances relaying through it. Redis is declared
    // before the servers, so on every way out of this function the servers are stopped first.
    redis_process redis(&g_child_pids[redis_slot]);
    if (cfg.relay) {
        if (!redis.start(cfg.redis_server_path, error)) {
            say(error);
            return 3;
        }
        server_extra = {"--redis", "redis://127.0.0.1:" + std::to_string(redis.port())};
    }
    const unsigned instances = cfg.relay ? 2 : 1;
    // --server-cpus: a child inherits the affinity of the thread that starts it, so this thread
    // takes the server's CPUs while it starts the servers, and its own back after (the loadgen's
    // threads, made later, inherit that).
    cpu_set_t own_cpus{};
    if (sched_getaffinity(0, sizeof own_cpus, &own_cpus) != 0) {
        say(std::string("sched_getaffinity: ") + std::strerror(errno));
        return 3;
    }
    if (!cfg.server_cpus.empty() && sched_setaffinity(0, sizeof cfg.server_cpu_set, &cfg.server_cpu_set) != 0) {
        say("--server-cpus " + cfg.server_cpus + ": " + std::strerror(errno));
        return 2;
    }
    std::vector<std::unique_ptr<server_process>> servers;
    bool started = true;
    for (unsigned i = 0; i < instances && started; ++i) {
        servers.push_back(std::make_unique<server_process>(&g_child_pids[i]));
        started = servers.back()->start(cfg, server_extra, error);
    }
    if (!cfg.server_cpus.empty()) sched_setaffinity(0, sizeof own_cpus, &own_cpus);
    if (!started) {
        say(error);
        return 3;
    }
    server_process& server = *servers[0];
    if (cfg.relay)
        say("server pids " + std::to_string(server.pid()) + " (A, port " + std::to_string(server.port()) + ") and " +
            std::to_string(servers[1]->pid()) + " (B, port " + std::to_string(servers[1]->port()) +
            "), redis-server pid " + std::to_string(redis.pid()) + " on port " + std::to_string(redis.port()) +
            ", scenario " + cfg.scenario + ", RLIMIT_NOFILE " + std::to_string(lim.rlim_cur));
    else
        say(std::string(cfg.naive ? "naive server" : "server") + " pid " + std::to_string(server.pid()) + " on port " +
            std::to_string(server.port()) + (cfg.tls ? " (TLS)" : "") + ", scenario " + cfg.scenario +
            ", RLIMIT_NOFILE " + std::to_string(lim.rlim_cur));

    const plan pl = make_plan(cfg);
    run_state rs{cfg, pl, {}, {}, {}, {}, {}, {}, {}, 0, client_tls ? &*client_tls : nullptr, {}, {}};
    for (auto& sp : servers) {
        rs.endpoints.emplace_back(net::ip::make_address("127.0.0.1"), sp->port());
        rs.hosts.push_back("127.0.0.1:" + std::to_string(sp->port()));
    }
    for (unsigned i = 0; i < pl.ids; ++i) rs.targets.push_back("/api/v1/ws/bench-" + std::to_string(i));
    rs.start.push_back(0);
    for (auto n : pl.expected) rs.start.push_back(rs.start.back() + n);
    rs.first = std::make_unique<std::atomic<std::uint64_t>[]>(rs.start.back());
    for (std::uint64_t i = 0; i < rs.start.back(); ++i) rs.first[i].store(~std::uint64_t{0});

    // Workers.
    std::vector<std::unique_ptr<worker>> workers;
    for (unsigned i = 0; i < cfg.client_threads; ++i) workers.push_back(std::make_unique<worker>());
    std::vector<net::executor_work_guard<net::io_context::executor_type>> guards;
    for (auto& w : workers) guards.push_back(net::make_work_guard(w->ioc));
    for (auto& w : workers) w->thread = std::thread([&ioc = w->ioc] { ioc.run(); });
    // The publishers get a thread of their own, as an application pushing to the server is not
    // the browsers receiving from it: on a subscriber's thread, each push would wait behind a round
    // of subscriber reads, and the loadgen, not the server, would set the pace of publishing.
    worker publishing;
    auto publishing_guard = net::make_work_guard(publishing.ioc);
    publishing.thread = std::thread([&ioc = publishing.ioc] { ioc.run(); });

    // Subscribers: the fast ones, then the slow one (scenario slow) on id 0.
    const unsigned total_subs = cfg.n_subscribers + (cfg.slow ? 1 : 0);
    std::vector<subscriber> subs(total_subs);
    for (unsigned i = 0; i < total_subs; ++i) {
        auto& s = subs[i];
        s.index = i;
        s.slow = cfg.slow && i == cfg.n_subscribers;
        s.id = s.slow ? 0 : i % pl.ids;
        s.instance = i % instances;
        s.w = workers[i % workers.size()].get();
        s.word_offset.resize(pl.publishers + 1, 0);
        for (unsigned p = 0; p < pl.publishers; ++p)
            s.word_offset[p + 1] = s.word_offset[p] + (pl.expected[std::size_t{s.id} * pl.publishers + p] + 63) / 64;
        s.bits.assign(s.word_offset.back(), 0);
        s.high.assign(pl.publishers, 0);
    }
    auto sum = [&](auto member) {
        std::uint64_t n = 0;
        for (auto& w : workers) n += ((*w).*member).load(std::memory_order_acquire);
        return n;
    };

    // Summed over the server instances; nullopt if one could not be read.
    auto servers_sum = [&](auto read) -> std::optional<std::uint64_t> {
        std::uint64_t total = 0;
        for (auto& sp : servers) {
            const std::optional<std::uint64_t> v = read(sp->pid());
            if (!v) return std::nullopt;
            total += *v;
        }
        return total;
    };
    const auto rss_before = servers_sum(rss_kib);
    const auto connect_start = steady::now();
    // Batches of --batch handshakes. Stop early if a batch is stuck for 30 s, if a whole batch
    // failed (the server is not answering), or after 30 s + 10 ms per subscriber in all.
    const double connect_limit = 30 + total_subs / 100.0;
    for (unsigned start = 0; start < total_subs; start += cfg.batch) {
        const unsigned end = std::min(total_subs, start + cfg.batch);
        const auto connected_before = sum(&worker::connected);
        for (unsigned i = start; i < end; ++i)
            net::co_spawn(subs[i].w->ioc,
                          cfg.tls ? run_subscriber<true>(subs[i], rs) : run_subscriber<false>(subs[i], rs),
                          report_exception);
        const double left = connect_limit - seconds_since(connect_start);
        if (!wait_for([&] { return sum(&worker::connected) + sum(&worker::failed) >= end; }, std::min(30.0, left))) {
            say("connecting is stuck or took longer than " + fixed(connect_limit, 0) + " s; not connecting the rest");
            break;
        }
        if (sum(&worker::connected) == connected_before) {
            say("a whole batch of handshakes failed; not connecting the rest");
            break;
        }
    }
    const auto connected = sum(&worker::connected);
    const auto connect_failures = total_subs - connected;  // failed, or never tried after a stuck batch
    say("connected " + std::to_string(connected) + "/" + std::to_string(total_subs) + " subscribers in " +
        fixed(seconds_since(connect_start), 2) + " s" +
        (connect_failures ? ", " + std::to_string(connect_failures) + " failed" : std::string()));

    std::this_thread::sleep_for(cfg.scenario == "idle" ? 1000ms : 200ms);  // let the server settle
    const auto rss_after = servers_sum(rss_kib);
    const auto open_before_push = connected - sum(&worker::ended);

    // relay: publish only once Redis has every instance that has subscribers for an id subscribed to
    // its channel, and both instances' relays are connected (a push answers 503 until then).
    std::optional<double> relay_wait;
    std::vector<std::uint64_t> connected_on(instances, 0);
    for (auto& s : subs)
        if (s.connected) ++connected_on[s.instance];
    if (cfg.relay) {
        std::vector<unsigned> want(pl.ids, 0);
        std::vector<unsigned char> on(std::size_t{pl.ids} * instances, 0);
        for (auto& s : subs)
            if (s.connected) on[std::size_t{s.id} * instances + s.instance] = 1;
        for (unsigned id = 0; id < pl.ids; ++id)
            for (unsigned i = 0; i < instances; ++i) want[id] += on[std::size_t{id} * instances + i];
        std::vector<unsigned short> ports;
        for (auto& sp : servers) ports.push_back(sp->port());
        const auto start = steady::now();
        if (wait_for([&] { return relay_ready(redis.port(), want, ports); }, 15, 20ms))
            relay_wait = seconds_since(start);
        else
            say("Redis did not report the instances subscribed, or an instance's relay was not connected, within 15 "
                "s; publishing anyway");
        if (relay_wait)
            say("Redis has both instances subscribed and both relays are connected after " + fixed(*relay_wait, 3) +
                " s");
    }

    // Publishers, all on the publishing thread.
    std::vector<publisher> pubs(cfg.publishers);
    for (unsigned p = 0; p < cfg.publishers; ++p) {
        pubs[p].index = p;
        pubs[p].sent.assign(pl.ids, 0);
        net::co_spawn(publishing.ioc, cfg.tls ? run_publisher<true>(pubs[p], rs) : run_publisher<false>(pubs[p], rs),
                      report_exception);
    }
    wait_for(
        [&] {
            return std::all_of(pubs.begin(), pubs.end(), [](auto& p) { return p.connected.load() || p.done.load(); });
        },
        15);

    // The measured phase: from the first push until the last delivery.
    const long ticks_per_second = sysconf(_SC_CLK_TCK);
    std::vector<std::optional<std::uint64_t>> instance_cpu_before, instance_cpu_after;
    for (auto& sp : servers) instance_cpu_before.push_back(cpu_ticks(sp->pid()));
    const auto redis_cpu_before = cfg.relay ? cpu_ticks(redis.pid()) : std::nullopt;
    const auto cpu_before = servers_sum(cpu_ticks);
    const auto own_before = own_cpu_us();
    const auto own_ticks_before = cpu_ticks(getpid());
    const auto busy_before = machine_busy_ticks();
    const std::uint64_t publish_start_ns = now_ns();
    rs.t0_ns = publish_start_ns + 5000000;  // rate: message 0 is due 5 ms from now
    rs.go.store(true);

    // Publishing ends when every publisher is done: bounded by the expected time plus a margin.
    const double publish_limit =
        cfg.paced ? cfg.n_messages / static_cast<double>(cfg.rate) + cfg.deadline : 120 + cfg.n_messages / 1000.0;
    if (!wait_for([&] { return std::all_of(pubs.begin(), pubs.end(), [](auto& p) { return p.done.load(); }); },
                  publish_limit, 1ms)) {
        say("publishing did not finish in " + fixed(publish_limit, 0) + " s; stopping it");
        rs.stop_publishing.store(true);
        wait_for([&] { return std::all_of(pubs.begin(), pubs.end(), [](auto& p) { return p.done.load(); }); }, 15);
    }
    const double publish_seconds = static_cast<double>(now_ns() - publish_start_ns) / 1e9;

    // What the fast subscribers should have received, from what was actually sent.
    std::vector<std::uint64_t> fast_connected_on(pl.ids, 0);
    for (auto& s : subs)
        if (!s.slow && s.connected) ++fast_connected_on[s.id];
    std::uint64_t expected_total = 0, published = 0, publish_errors = 0, server_queued = 0, max_late_ns = 0;
    std::uint64_t relayed_answers = 0, publisher_reconnects = 0;
    for (auto& p : pubs) {
        publisher_reconnects += p.reconnects;
        published += p.published;
        publish_errors += p.errors;
        server_queued += p.connections;
        relayed_answers += p.relayed;
        max_late_ns = std::max(max_late_ns, p.max_late_ns);
        if (!p.error.empty()) say("publisher " + std::to_string(p.index) + ": " + p.error);
        for (unsigned id = 0; id < pl.ids; ++id) expected_total += std::uint64_t{p.sent[id]} * fast_connected_on[id];
    }
    say("published " + std::to_string(published) + " messages in " + fixed(publish_seconds, 2) + " s; waiting for " +
        std::to_string(expected_total) + " deliveries");

    // Wait for the deliveries: until all are in, the deadline passes, or nothing arrives for 5 s.
    {
        const auto start = steady::now();
        auto last_change = start;
        std::uint64_t last = sum(&worker::distinct);
        for (int i = 0; i < 10000000; ++i) {
            const auto d = sum(&worker::distinct);
            if (d >= expected_total) break;
            if (d != last) {
                last = d;
                last_change = steady::now();
            } else if (seconds_since(last_change) > 5) {
                say("no delivery for 5 s, giving up waiting");
                break;
            }
            if (seconds_since(start) > cfg.deadline) {
                say("deliveries still missing after --deadline " + fixed(cfg.deadline, 0) + " s");
                break;
            }
            std::this_thread::sleep_for(500us);
        }
    }
    const std::uint64_t phase_end_ns = now_ns();
    for (auto& sp : servers) instance_cpu_after.push_back(cpu_ticks(sp->pid()));
    const auto redis_cpu_after = cfg.relay ? cpu_ticks(redis.pid()) : std::nullopt;
    const auto redis_rss_end = cfg.relay ? rss_kib(redis.pid()) : std::nullopt;
    const auto cpu_after = servers_sum(cpu_ticks);
    const auto own_after = own_cpu_us();
    const auto own_ticks_after = cpu_ticks(getpid());
    const auto busy_after = machine_busy_ticks();
    const auto rss_end = servers_sum(rss_kib);

    // The slow client reads now; the drain ends with the server's close, an error or 3 s of silence.
    if (cfg.slow) {
        rs.drain_slow.store(true);
        wait_for([&] { return subs.back().ended.load(); }, 20, 5ms);
    }

    // Stop: the server closes every client with 1001 and waits up to 3 s for the answers. Then Redis.
    rs.shutting_down.store(true);
    rs.stop_publishing.store(true);
    std::vector<int> server_status;
    for (auto& sp : servers) server_status.push_back(sp->stop(15s));
    wait_for([&] { return sum(&worker::ended) >= connected; }, 5, 5ms);
    const int redis_status = cfg.relay ? redis.stop(10s) : -1;
    for (auto& g : guards) g.reset();
    publishing_guard.reset();
    for (auto& w : workers) w->ioc.stop();
    publishing.ioc.stop();
    for (auto& w : workers) w->thread.join();
    publishing.thread.join();

    // ---- results (all threads joined: plain reads are safe) ----
    histogram latency, first_latency;
    std::uint64_t last_delivery_ns = 0;
    for (auto& w : workers) {
        latency.merge(w->latency);
        last_delivery_ns = std::max(last_delivery_ns, w->last_delivery_ns.load());
    }
    for (std::uint64_t i = 0; i < rs.start.back(); ++i)
        if (const auto ns = rs.first[i].load(); ns != ~std::uint64_t{0}) first_latency.add(ns / 1000);
    std::uint64_t deliveries = 0, missing = 0, duplicates = 0, out_of_order = 0, unexpected = 0, closed_early = 0;
    for (auto& s : subs) {
        if (s.slow) continue;
        duplicates += s.duplicates;
        out_of_order += s.out_of_order;
        unexpected += s.unexpected;
        if (s.connected && s.ended && !s.ended_during_shutdown) {
            ++closed_early;
            if (closed_early <= 5) say("subscriber " + std::to_string(s.index) + " ended early: " + s.end_reason);
        }
        for (unsigned p = 0; p < pl.publishers; ++p) {
            std::uint64_t got = 0;
            for (auto i = s.word_offset[p]; i < s.word_offset[p + 1]; ++i)
                got += static_cast<unsigned>(std::popcount(s.bits[i]));
            deliveries += got;
            const std::uint64_t sent = pubs[p].sent[s.id];
            missing += sent > got ? sent - got : 0;
        }
    }
    const std::uint64_t end_ns = last_delivery_ns > publish_start_ns ? last_delivery_ns : phase_end_ns;
    const double seconds = static_cast<double>(end_ns - publish_start_ns) / 1e9;
    std::optional<double> per_delivery;  // null when /proc could not be read or nothing was delivered
    if (cpu_before && cpu_after && deliveries)
        per_delivery = static_cast<double>(*cpu_after - *cpu_before) * 1e6 / static_cast<double>(ticks_per_second) /
                       static_cast<double>(deliveries);
    const double own_per_delivery =
        deliveries ? static_cast<double>(own_after - own_before) / static_cast<double>(deliveries) : 0;
    // relay: each instance's and redis-server's own share.
    auto cpu_per_delivery = [&](const std::optional<std::uint64_t>& before, const std::optional<std::uint64_t>& after) {
        if (!before || !after || !deliveries) return std::string("null");
        return fixed(static_cast<double>(*after - *before) * 1e6 / static_cast<double>(ticks_per_second) /
                         static_cast<double>(deliveries),
                     3);
    };
    const std::uint64_t redis_ticks = redis_cpu_before && redis_cpu_after ? *redis_cpu_after - *redis_cpu_before : 0;

    // CPU that neither the server nor the loadgen used during the measured phase, in % of one core:
    // other processes (a build, say) competing for the same cores make the figures worse.
    std::optional<double> other_cpu_percent;
    if (busy_before && busy_after && cpu_before && cpu_after && own_ticks_before && own_ticks_after &&
        phase_end_ns > publish_start_ns) {
        const double other =
            static_cast<double>(*busy_after - *busy_before) - static_cast<double>(*cpu_after - *cpu_before) -
            static_cast<double>(*own_ticks_after - *own_ticks_before) - static_cast<double>(redis_ticks);
        const double phase = static_cast<double>(phase_end_ns - publish_start_ns) / 1e9;
        other_cpu_percent = std::max(0.0, other) / static_cast<double>(ticks_per_second) / phase * 100;
    }

    std::string json = "{";
    auto field = [&](std::string_view name, const std::string& value) {
        if (json.size() > 1) json += ",";
        json += json_escape(name);
        json += ":";
        json += value;
    };
    auto num = [](auto v) { return std::to_string(v); };
    auto maybe = [&](const auto& v) { return v ? num(*v) : std::string("null"); };
    field("scenario", json_escape(cfg.scenario));
    field("subscribers", num(cfg.n_subscribers));
    field("ids", num(pl.ids));
    field("messages", num(published));
    field("size", num(cfg.n_size));
    field("deliveries", num(deliveries));
    field("seconds", fixed(seconds, 3));
    field("deliveries_per_sec", fixed(seconds > 0 ? static_cast<double>(deliveries) / seconds : 0, 0));
    field("server_cpu_us_per_delivery", per_delivery ? fixed(*per_delivery, 3) : "null");
    field("latency_us", "{\"p50\":" + num(latency.percentile(0.50)) + ",\"p90\":" + num(latency.percentile(0.90)) +
                            ",\"p99\":" + num(latency.percentile(0.99)) + ",\"max\":" + num(latency.max()) + "}");
    field("first_delivery_us",
          "{\"p50\":" + num(first_latency.percentile(0.50)) + ",\"p90\":" + num(first_latency.percentile(0.90)) +
              ",\"p99\":" + num(first_latency.percentile(0.99)) + ",\"max\":" + num(first_latency.max()) + "}");
    field("missing", num(missing));
    field("duplicates", num(duplicates));
    field("out_of_order", num(out_of_order));
    field("rss_kib_before", maybe(rss_before));
    field("rss_kib_after", maybe(rss_after));
    field("rss_kib_per_connection", rss_before && rss_after && connected
                                        ? fixed((static_cast<double>(*rss_after) - static_cast<double>(*rss_before)) /
                                                    static_cast<double>(connected),
                                                2)
                                        : "null");
    if (cfg.relay) {
        // server_cpu_us_per_delivery and the rss_kib_* fields are summed over both instances.
        field("instances", num(instances));
        field("subscribers_per_instance", "[" + num(connected_on[0]) + "," + num(connected_on[1]) + "]");
        field("server_a_cpu_us_per_delivery", cpu_per_delivery(instance_cpu_before[0], instance_cpu_after[0]));
        field("server_b_cpu_us_per_delivery", cpu_per_delivery(instance_cpu_before[1], instance_cpu_after[1]));
        field("redis_cpu_us_per_delivery", cpu_per_delivery(redis_cpu_before, redis_cpu_after));
        field("relay_ready_seconds", relay_wait ? fixed(*relay_wait, 3) : "null");
    }
    if (cfg.slow) {
        const auto& s = subs.back();
        field("slow_client", "{\"received\":" + num(s.received) +
                                 ",\"closed_with\":" + (s.close_code ? num(*s.close_code) : std::string("null")) +
                                 ",\"ended\":" + json_escape(s.connected ? s.end_reason : "never connected") + "}");
    }
    // Beyond the requested fields: context and the other error counts.
    field("publishers", num(cfg.publishers));
    if (cfg.paced) {
        field("rate", num(cfg.rate));
        field("publisher_max_late_us", num(max_late_ns / 1000));
    }
    field("server_kind", json_escape(cfg.server_kind));
    field("server_threads", num(cfg.server_threads));
    field("server_cpus", json_escape(cfg.server_cpus.empty() ? cpu_list(own_cpus) : cpu_list(cfg.server_cpu_set)));
    field("client_cpus", json_escape(cpu_list(own_cpus)));
    field("client_threads", num(cfg.client_threads));
    field("receive_buffer", num(cfg.receive_buffer));
    field("tls", cfg.tls ? "true" : "false");
    field("server_queued", cfg.naive ? "null" : num(server_queued));  // the naive peer gives no count
    field("publisher_reconnects", num(publisher_reconnects));
    if (cfg.relay) field("relayed_answers", num(relayed_answers));
    field("client_cpu_us_per_delivery", fixed(own_per_delivery, 3));
    field("rss_kib_end", maybe(rss_end));
    if (cfg.relay) field("redis_rss_kib_end", maybe(redis_rss_end));
    field("other_cpu_percent", other_cpu_percent ? fixed(*other_cpu_percent, 1) : "null");
    if (cfg.scenario == "idle") field("open_after_settle", num(open_before_push));
    field("connect_failures", num(connect_failures));
    field("closed_early", num(closed_early));
    field("unexpected", num(unexpected));
    field("publish_errors", num(publish_errors));
    field("server_exit", num(server_status[0]));
    if (cfg.relay) {
        field("server_b_exit", num(server_status[1]));
        field("redis_exit", num(redis_status));
    }
    json += "}";
    std::cout << json << std::endl;

    const bool ok = missing == 0 && duplicates == 0 && out_of_order == 0 && unexpected == 0 && connect_failures == 0 &&
                    closed_early == 0 && publish_errors == 0 && published == cfg.n_messages &&
                    (!cfg.relay || relay_wait.has_value());
    return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
    std::set_terminate([] {
        kill_children();
        std::abort();
    });
    std::signal(SIGPIPE, SIG_IGN);
    std::signal(SIGINT, on_stop_signal);
    std::signal(SIGTERM, on_stop_signal);
    std::signal(SIGHUP, on_stop_signal);
    int exit_code = 0;
    const auto cfg = parse_options(argc, argv, exit_code);
    if (!cfg) return exit_code;
    try {
        return run(*cfg);
    } catch (const std::exception& e) {
        say(std::string("error: ") + e.what());
        return 3;
    }
}
