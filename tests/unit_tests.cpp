// Unit tests of wsbroadcast.hpp against the in-memory fake socket. Built once per Asio flavour.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include "fake_socket.hpp"

#include <algorithm>
#include <array>
#include <atomic>
#include <future>
#include <map>
#include <functional>
#include <optional>
#include <random>
#include <string>
#include <thread>

using namespace std::chrono_literals;
using test::fake_peer;
using test::fake_socket;
namespace net = wsbroadcast::net;
using wsbroadcast::error_code;

using manager_type = wsbroadcast::ConnectionManager<fake_socket>;

namespace {

struct fixture {
    net::io_context ioc;

    std::shared_ptr<fake_peer> peer() { return std::make_shared<fake_peer>(ioc.get_executor()); }

    // Runs until nothing is left to do right now: the writers have drained and parked. Nothing in
    // these tests waits on the clock, so "no handler ran" means quiescent, however slow the build.
    void settle() {
        ioc.restart();
        for (int idle_rounds = 0; idle_rounds < 3;) idle_rounds = ioc.poll() == 0 ? idle_rounds + 1 : 0;
    }
};

// Messages "T:I" from `senders` threads: each thread's I must arrive as 0, 1, 2, ...
bool in_sender_order(const std::vector<std::string>& received, int senders) {
    std::vector<int> next(static_cast<std::size_t>(senders), 0);
    for (auto& m : received) {
        const auto colon = m.find(':');
        const auto t = static_cast<std::size_t>(std::stoi(m.substr(0, colon)));
        if (std::stoi(m.substr(colon + 1)) != next[t]++) return false;
    }
    return true;
}

// Once the sends are done, the writers, on `ioc`'s thread, need only a moment: wait (bounded, 5 s)
// until every peer has `n` messages, reading their records on that thread.
void wait_until_received(net::io_context& ioc, const std::vector<std::shared_ptr<fake_peer>>& peers, std::size_t n) {
    for (int spin = 0; spin < 500; ++spin) {
        std::promise<bool> done;
        net::post(ioc, [&] {
            done.set_value(std::all_of(peers.begin(), peers.end(), [&](auto& p) { return p->received.size() == n; }));
        });
        if (done.get_future().get()) return;
        std::this_thread::sleep_for(10ms);
    }
}

std::vector<std::string> numbered(int n, const std::string& prefix = "m") {
    std::vector<std::string> out;
    for (int i = 0; i < n; ++i) out.push_back(prefix + std::to_string(i));
    return out;
}

}  // namespace

// ---- concepts -------------------------------------------------------------------------------

struct not_a_socket {};
struct socket_without_write {
    using executor_type = net::any_io_executor;
    executor_type get_executor() const;
};

static_assert(wsbroadcast::message_socket<fake_socket>);
static_assert(wsbroadcast::readable_message_socket<fake_socket>);
static_assert(!wsbroadcast::message_socket<int>);
static_assert(!wsbroadcast::message_socket<not_a_socket>);
static_assert(!wsbroadcast::message_socket<socket_without_write>);
static_assert(wsbroadcast::has_executor<socket_without_write>);

struct no_hash_key {
    int v;
    bool operator==(const no_hash_key&) const = default;
};
static_assert(!wsbroadcast::hashable_key<no_hash_key, std::hash<no_hash_key>, std::equal_to<>>);
static_assert(wsbroadcast::hashable_key<int, std::hash<int>, std::equal_to<>>);

// ---- registration ---------------------------------------------------------------------------

TEST_CASE_FIXTURE(fixture, "subscribe registers, unsubscribe and destruction unregister") {
    manager_type manager;
    CHECK(manager.size() == 0);
    CHECK_FALSE(manager.has("a"));

    auto a1 = manager.subscribe(fake_socket(peer()), "a");
    auto a2 = manager.subscribe(fake_socket(peer()), "a");
    {
        auto b = manager.subscribe(fake_socket(peer()), "b");
        CHECK(manager.size() == 3);
        CHECK(manager.key_count() == 2);
        CHECK(manager.count("a") == 2);
        CHECK(manager.count(std::string_view("b")) == 1);
        CHECK(manager.has(std::string("b")));
    }
    CHECK(manager.size() == 2);
    CHECK_FALSE(manager.has("b"));

    auto moved_from = manager.subscribe(fake_socket(peer()), "c");
    auto moved_to = std::move(moved_from);
    CHECK_FALSE(moved_from);
    CHECK(moved_to);
    CHECK(manager.count("c") == 1);
    moved_to.unsubscribe();
    CHECK_FALSE(manager.has("c"));

    a1.unsubscribe();
    a1.unsubscribe();  // idempotent
    CHECK_FALSE(a1);
    CHECK(manager.count("a") == 1);
    a2 = manager_type::subscription();  // move-assigning over a live subscription releases it
    CHECK(manager.size() == 0);
    CHECK(manager.key_count() == 0);
    settle();
}

// ---- send and broadcast ---------------------------------------------------------------------

TEST_CASE_FIXTURE(fixture, "send reaches exactly the connections under the key") {
    manager_type manager;
    auto pa1 = peer(), pa2 = peer(), pb = peer();
    auto a1 = manager.subscribe(fake_socket(pa1), "a");
    auto a2 = manager.subscribe(fake_socket(pa2), "a");
    auto b = manager.subscribe(fake_socket(pb), "b");

    auto r = manager.send("a", R"({"paid": true})");
    CHECK(r.queued == 2);
    CHECK(r.dropped == 0);
    CHECK(r.closed == 0);
    settle();

    CHECK(pa1->received == std::vector<std::string>{R"({"paid": true})"});
    CHECK(pa2->received == std::vector<std::string>{R"({"paid": true})"});
    CHECK(pb->received.empty());
    CHECK(manager.stats().deliveries == 2);
    CHECK(manager.stats().messages == 1);
}

TEST_CASE_FIXTURE(fixture, "sending to a key nobody listens on is a no-op") {
    manager_type manager;
    auto p = peer();
    auto s = manager.subscribe(fake_socket(p), "a");
    auto r = manager.send("nobody", "hello");
    CHECK(r.queued == 0);
    CHECK(manager.stats().messages == 0);
    settle();
    CHECK(p->received.empty());
}

TEST_CASE_FIXTURE(fixture, "one message is stored once and shared by every recipient") {
    manager_type manager;
    std::vector<std::shared_ptr<fake_peer>> peers;
    std::vector<manager_type::subscription> subs;
    for (int i = 0; i < 5; ++i) {
        peers.push_back(peer());
        subs.push_back(manager.subscribe(fake_socket(peers.back()), "k"));
    }
    CHECK(manager.send("k", std::string(1000, 'x')).queued == 5);
    settle();
    for (auto& p : peers) {
        REQUIRE(p->write_addresses.size() == 1);
        CHECK(p->write_addresses[0] == peers[0]->write_addresses[0]);  // the same bytes, not a copy
        CHECK(p->received[0] == std::string(1000, 'x'));
    }
}

TEST_CASE("a message's frame is built once, as RFC 6455 lays a server's frame out") {
    auto header = [](const wsbroadcast::message& m) {
        const auto frame = m.frame();
        const auto* bytes = static_cast<const unsigned char*>(frame.data());
        const std::size_t header_size = frame.size() - m.size();
        // The payload follows the header in the same bytes that data() shows.
        CHECK(static_cast<const void*>(bytes + header_size) == static_cast<const void*>(m.data().data()));
        return std::vector<int>(bytes, bytes + header_size);
    };
    CHECK(header(wsbroadcast::message::text("hi")) == std::vector<int>{0x81, 2});
    CHECK(header(wsbroadcast::message::binary("hi")) == std::vector<int>{0x82, 2});
    CHECK(header(wsbroadcast::message::text("")) == std::vector<int>{0x81, 0});
    CHECK(header(wsbroadcast::message::text(std::string(125, 'x'))) == std::vector<int>{0x81, 125});
    CHECK(header(wsbroadcast::message::text(std::string(126, 'x'))) == std::vector<int>{0x81, 126, 0, 126});
    CHECK(header(wsbroadcast::message::text(std::string(65535, 'x'))) == std::vector<int>{0x81, 126, 0xFF, 0xFF});
    CHECK(header(wsbroadcast::message::text(std::string(65536, 'x'))) ==
          std::vector<int>{0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0});
    const wsbroadcast::message none;
    CHECK(none.frame().size() == 2);  // an empty text frame
}

namespace {
// A next layer that takes at most 3 bytes per write, completing each later, and never has
// anything to read: it shows whether writes through a batching_stream stay whole and in order.
struct trickle_stream {
    using executor_type = net::any_io_executor;
    explicit trickle_stream(executor_type ex) : executor(std::move(ex)) {}

    executor_type executor;
    std::string written;
    int write_calls = 0;

    executor_type get_executor() const { return executor; }

    template <class Buffers, class Token>
    auto async_write_some(const Buffers& buffers, Token&& token) {
        ++write_calls;
        char chunk[3];
        const auto n = net::buffer_copy(net::buffer(chunk), buffers);
        written.append(chunk, n);
        return net::async_compose<Token, void(error_code, std::size_t)>(
            [n, started = false](auto& self) mutable {
                if (!std::exchange(started, true)) return net::post(std::move(self));
                self.complete({}, n);
            },
            token, executor);
    }

    template <class Buffers, class Token>
    auto async_read_some(const Buffers&, Token&& token) {
        return net::async_compose<Token, void(error_code, std::size_t)>(
            [started = false](auto& self) mutable {
                if (!std::exchange(started, true)) return net::post(std::move(self));
                self.complete(net::error::eof, 0);
            },
            token, executor);
    }
};
}  // namespace

TEST_CASE_FIXTURE(fixture, "a batching_stream writes each write whole, one after another, in the order started") {
    wsbroadcast::batching_stream<trickle_stream> stream(ioc.get_executor());
    const std::string first(10, 'a'), second(7, 'b'), third = "c";
    std::vector<std::pair<std::string, std::size_t>> completions;
    auto record = [&](std::string name) {
        return [&completions, name](const error_code& ec, std::size_t n) {
            CHECK_FALSE(ec);
            completions.emplace_back(name, n);
        };
    };
    // Started together, as a batch of frames and a pong would be: the second and third wait.
    stream.async_write_some(net::buffer(first), record("first"));
    std::vector<net::const_buffer> gathered{net::buffer(second), net::buffer(third)};
    stream.async_write_some(gathered, record("second and third"));
    CHECK(stream.next_layer().written == "aaa");  // only the first write has begun
    settle();
    CHECK(stream.next_layer().written == first + second + third);
    CHECK(stream.next_layer().write_calls == 4 + 3);  // 10 bytes, then 8, 3 at a time
    using done = std::vector<std::pair<std::string, std::size_t>>;
    CHECK(completions == done{{"first", 10}, {"second and third", 8}});
}

TEST_CASE_FIXTURE(fixture, "broadcast reaches every connection under every key") {
    manager_type manager;
    auto pa = peer(), pb = peer(), pc = peer();
    auto a = manager.subscribe(fake_socket(pa), "a");
    auto b = manager.subscribe(fake_socket(pb), "b");
    auto c = manager.subscribe(fake_socket(pc), "c");
    CHECK(manager.broadcast("to all").queued == 3);
    CHECK(manager.broadcast(wsbroadcast::message::binary(std::string("\x00\x01", 2))).queued == 3);
    settle();
    for (auto& p : {pa, pb, pc}) {
        CHECK(p->received == std::vector<std::string>{"to all", std::string("\x00\x01", 2)});
        CHECK(p->received_binary == std::vector<bool>{false, true});
    }
}

TEST_CASE_FIXTURE(fixture, "messages to one connection arrive in the order they were sent") {
    manager_type manager;
    auto p = peer();
    auto s = manager.subscribe(fake_socket(p), "k");
    const auto expected = numbered(500);
    for (int i = 0; i < 500; ++i) {
        manager.send("k", expected[static_cast<std::size_t>(i)]);
        if (i % 50 == 0) ioc.poll();  // let the writer run between some of the sends
    }
    settle();
    CHECK(p->received == expected);
}

TEST_CASE_FIXTURE(fixture, "a connection failing in the middle of a fan-out does not stop the others") {
    std::vector<std::string> errors;
    wsbroadcast::options opts;
    opts.on_error = [&](const wsbroadcast::error_event& e) { errors.push_back(std::string(e.operation)); };
    manager_type manager(opts);

    auto good1 = peer(), bad = peer(), good2 = peer();
    bad->writes_before_failure = 2;
    bad->failure = net::error::timed_out;  // not a normal ending: it must be reported
    auto s1 = manager.subscribe(fake_socket(good1), "k");
    auto s2 = manager.subscribe(fake_socket(bad), "k");
    auto s3 = manager.subscribe(fake_socket(good2), "k");

    const auto expected = numbered(10);
    for (auto& m : expected) manager.send("k", m);
    settle();

    CHECK(good1->received == expected);
    CHECK(good2->received == expected);
    CHECK(bad->received == std::vector<std::string>{"m0", "m1"});
    CHECK(manager.count("k") == 2);  // the failed connection unregistered itself
    CHECK(errors == std::vector<std::string>{"write"});
    CHECK(manager.stats().errors == 1);

    // Later sends go to the survivors only.
    CHECK(manager.send("k", "after").queued == 2);
}

TEST_CASE_FIXTURE(fixture, "a peer that resets its connection is removed quietly") {
    std::size_t errors = 0;
    wsbroadcast::options opts;
    opts.on_error = [&](const wsbroadcast::error_event&) { ++errors; };
    manager_type manager(opts);
    auto p = peer();
    p->writes_before_failure = 0;  // connection_reset: an expected ending
    auto s = manager.subscribe(fake_socket(p), "k");
    manager.send("k", "x");
    settle();
    CHECK(manager.size() == 0);
    CHECK(errors == 0);
}

// ---- threads --------------------------------------------------------------------------------

TEST_CASE("sends from several threads at once keep each sender's order and lose nothing") {
    net::io_context ioc;
    wsbroadcast::options opts;
    opts.outbox.max_messages = 1'000'000;  // this test is about races, not limits
    opts.outbox.max_bytes = 1'000'000'000;
    manager_type manager(opts);

    constexpr int senders = 4, per_sender = 2000, receivers = 3;
    std::vector<std::shared_ptr<fake_peer>> peers;
    std::vector<manager_type::subscription> subs;
    for (int i = 0; i < receivers; ++i) {
        peers.push_back(std::make_shared<fake_peer>(ioc.get_executor()));
        subs.push_back(manager.subscribe(fake_socket(peers.back()), "shared"));
    }

    auto guard = net::make_work_guard(ioc);
    std::thread io([&] { ioc.run(); });
    std::vector<std::thread> threads;
    for (int t = 0; t < senders; ++t)
        threads.emplace_back([&, t] {
            for (int i = 0; i < per_sender; ++i) manager.send("shared", std::to_string(t) + ":" + std::to_string(i));
        });
    for (auto& t : threads) t.join();
    wait_until_received(ioc, peers, senders * per_sender);
    guard.reset();
    subs.clear();
    ioc.stop();
    io.join();

    for (auto& p : peers) {
        REQUIRE(p->received.size() == senders * per_sender);
        CHECK(in_sender_order(p->received, senders));
    }
    CHECK(manager.stats().deliveries == std::uint64_t{senders} * per_sender * receivers);
}

TEST_CASE("subscribe and unsubscribe race with sends from other threads") {
    net::io_context ioc;
    manager_type manager;
    auto guard = net::make_work_guard(ioc);
    std::thread io([&] { ioc.run(); });

    std::atomic<bool> stop{false};
    std::thread sender([&] {
        for (int i = 0; i < 20000 && !stop; ++i) manager.send("k" + std::to_string(i % 4), "x");
    });
    for (int round = 0; round < 200; ++round) {
        auto s = manager.subscribe(fake_socket(std::make_shared<fake_peer>(ioc.get_executor())),
                                   "k" + std::to_string(round % 4));
        if (round % 3 == 0) s.unsubscribe();
    }
    stop = true;
    sender.join();
    CHECK(manager.size() == 0);
    guard.reset();
    ioc.stop();
    io.join();
}

// ---- key types ------------------------------------------------------------------------------

struct wallet_key {
    std::string wallet;
    int channel;
    bool operator==(const wallet_key&) const = default;
};
template <>
struct std::hash<wallet_key> {
    std::size_t operator()(const wallet_key& k) const noexcept {
        return std::hash<std::string>{}(k.wallet) ^ (static_cast<std::size_t>(k.channel) << 1);
    }
};

TEST_CASE_FIXTURE(fixture, "integer and user-defined keys") {
    wsbroadcast::ConnectionManager<fake_socket, int> by_int;
    auto p1 = peer();
    auto s1 = by_int.subscribe(fake_socket(p1), 42);
    CHECK(by_int.send(42, "int").queued == 1);
    CHECK(by_int.send(7, "int").queued == 0);

    wsbroadcast::ConnectionManager<fake_socket, wallet_key> by_struct;
    auto p2 = peer();
    auto s2 = by_struct.subscribe(fake_socket(p2), wallet_key{"w1", 2});
    CHECK(by_struct.has(wallet_key{"w1", 2}));
    CHECK_FALSE(by_struct.has(wallet_key{"w1", 3}));
    CHECK(by_struct.send(wallet_key{"w1", 2}, "struct").queued == 1);
    settle();
    CHECK(p1->received == std::vector<std::string>{"int"});
    CHECK(p2->received == std::vector<std::string>{"struct"});
}

// ---- the endpoint helper --------------------------------------------------------------------

TEST_CASE_FIXTURE(fixture, "serve registers, hands client messages over, and unregisters on close") {
    manager_type manager;
    auto p = peer();
    std::vector<std::string> from_client;
    std::optional<error_code> ended;
    net::co_spawn(ioc, manager.serve(fake_socket(p), "inv-1", [&](std::string_view m) { from_client.emplace_back(m); }),
                  [&](std::exception_ptr e, error_code ec) {
                      CHECK_FALSE(e);
                      ended = ec;
                  });
    settle();
    CHECK(manager.count("inv-1") == 1);

    p->client_send("hello");
    p->client_send("again");
    manager.send("inv-1", "pushed");
    settle();
    CHECK(from_client == std::vector<std::string>{"hello", "again"});
    CHECK(p->received == std::vector<std::string>{"pushed"});  // client text is not echoed

    p->client_close();
    settle();
    REQUIRE(ended.has_value());
    CHECK(*ended == net::error::eof);
    CHECK(manager.size() == 0);
}

TEST_CASE_FIXTURE(fixture, "serve and accept_and_serve take a completion token instead of being awaited") {
    manager_type manager;
    auto p1 = peer(), p2 = peer();
    std::optional<error_code> ended1, ended2;
    manager.serve(
        fake_socket(p1), "k", [](std::string_view) {},
        [&](std::exception_ptr e, error_code ec) {
            CHECK_FALSE(e);
            ended1 = ec;
        });
    manager.accept_and_serve(
        fake_socket(p2), std::string("GET /k"), "k", [](std::string_view) {},
        [&](std::exception_ptr e, error_code ec) {
            CHECK_FALSE(e);
            ended2 = ec;
        });
    settle();
    CHECK(p2->accepted_request == "GET /k");
    CHECK(manager.send("k", "both").queued == 2);
    settle();
    CHECK(p1->received == std::vector<std::string>{"both"});
    CHECK(p2->received == std::vector<std::string>{"both"});
    p1->client_close();
    p2->client_close();
    settle();
    CHECK(ended1 == error_code(net::error::eof));
    CHECK(ended2 == error_code(net::error::eof));
    CHECK(manager.size() == 0);
}

TEST_CASE_FIXTURE(fixture, "serve unregisters when the message handler throws, and rethrows") {
    manager_type manager;
    auto p = peer();
    std::exception_ptr thrown;
    net::co_spawn(
        ioc,
        manager.serve(fake_socket(p), "k", [](std::string_view) { throw std::runtime_error("bad client message"); }),
        [&](std::exception_ptr e, error_code) { thrown = e; });
    settle();
    CHECK(manager.size() == 1);
    p->client_send("boom");
    settle();
    CHECK(thrown);
    CHECK(manager.size() == 0);
}

TEST_CASE("serve unregisters when its io_context is destroyed mid-flight (cancellation)") {
    manager_type manager;  // declared first: it outlives the io_context
    {
        net::io_context ioc;
        auto p = std::make_shared<fake_peer>(ioc.get_executor());
        net::co_spawn(ioc, manager.serve(fake_socket(p), "k"), [](std::exception_ptr, error_code) {});
        ioc.run_for(20ms);
        CHECK(manager.size() == 1);
        manager.send("k", "queued but never written");
    }
    CHECK(manager.size() == 0);
}

// ---- bounded outboxes -----------------------------------------------------------------------

TEST_CASE_FIXTURE(fixture, "a full outbox closes the connection by default; the others get everything") {
    wsbroadcast::options opts;
    opts.outbox.max_messages = 8;
    manager_type manager(opts);
    auto slow = peer(), fast = peer();
    slow->stalled = true;
    auto s1 = manager.subscribe(fake_socket(slow), "k");
    auto s2 = manager.subscribe(fake_socket(fast), "k");

    const auto expected = numbered(20);
    std::size_t closed = 0;
    for (auto& m : expected) {
        auto r = manager.send("k", m);
        closed += r.closed;
        ioc.poll();
    }
    settle();
    CHECK(closed == 1);
    CHECK(fast->received == expected);
    CHECK(slow->aborted);  // its write never completed: torn down, not waited on
    CHECK(manager.count("k") == 1);
    CHECK(manager.stats().overflow_closes == 1);
}

TEST_CASE_FIXTURE(fixture, "queued_bytes counts what every outbox holds, and nothing once they are gone") {
    manager_type manager;
    auto slow = peer(), fast = peer();
    slow->stalled = true;
    auto s1 = manager.subscribe(fake_socket(slow), "k");
    auto s2 = manager.subscribe(fake_socket(fast), "k");
    manager.send("k", "12345");
    CHECK(manager.queued_bytes() == 10);  // one message, queued to two connections
    settle();
    CHECK(fast->received == std::vector<std::string>{"12345"});
    CHECK(manager.queued_bytes() == 5);  // the slow one's write is still stuck
    s1 = {};                             // unsubscribed: its socket is torn down,
    slow->unstall();                     // which ends the stuck write
    settle();
    CHECK(manager.queued_bytes() == 0);
}

TEST_CASE_FIXTURE(fixture, "async_wait_for_room completes under the bound, at once or when a stuck write ends") {
    manager_type manager;
    auto slow = peer();
    slow->stalled = true;
    auto s = manager.subscribe(fake_socket(slow), "k");
    manager.send("k", "12345");
    settle();
    REQUIRE(manager.queued_bytes() == 5);  // its write is stuck

    // The waits' own io_context: whether their timers are left running shows in it.
    net::io_context waits;
    std::optional<error_code> roomy, tight;
    manager.async_wait_for_room(5, 10s, net::bind_executor(waits, [&](error_code ec) { roomy = ec; }));
    CHECK_FALSE(roomy);  // posted, not run inside the call
    manager.async_wait_for_room(4, 10s, net::bind_executor(waits, [&](error_code ec) { tight = ec; }));
    settle();
    waits.poll();
    REQUIRE(roomy);
    CHECK_FALSE(*roomy);
    CHECK_FALSE(tight);  // 5 bytes held, at most 4 wanted: it waits

    slow->unstall();
    settle();
    const auto start = std::chrono::steady_clock::now();
    waits.run_for(5s);
    CHECK(waits.stopped());  // the 10 s timer was cancelled when the wait completed
    CHECK(std::chrono::steady_clock::now() - start < 5s);
    REQUIRE(tight);
    CHECK_FALSE(*tight);
    CHECK(manager.queued_bytes() == 0);
    CHECK(slow->received == std::vector<std::string>{"12345"});
}

TEST_CASE_FIXTURE(fixture, "async_wait_for_room times out while the outboxes hold more, and drops nothing") {
    manager_type manager;
    auto slow = peer();
    slow->stalled = true;
    auto s = manager.subscribe(fake_socket(slow), "k");
    manager.send("k", "12345");
    manager.send("k", "678");

    std::optional<error_code> result;
    const auto start = std::chrono::steady_clock::now();
    manager.async_wait_for_room(0, 50ms, net::bind_executor(ioc, [&](error_code ec) { result = ec; }));
    ioc.restart();
    while (!result && ioc.run_one_for(5s)) {
    }
    REQUIRE(result);
    CHECK(*result == net::error::timed_out);
    CHECK(std::chrono::steady_clock::now() - start >= 50ms);
    CHECK(manager.queued_bytes() == 8);

    slow->unstall();
    settle();
    CHECK(slow->received == std::vector<std::string>{"12345", "678"});
}

TEST_CASE("publishers that wait for room keep the outboxes near the bound, in order, losing nothing") {
    net::io_context ioc, publishers;
    manager_type manager;
    constexpr int senders = 2, per_sender = 500, receivers = 3;
    constexpr std::size_t bound = 64;  // a few messages: most sends wait
    std::vector<std::shared_ptr<fake_peer>> peers;
    std::vector<manager_type::subscription> subs;
    for (int i = 0; i < receivers; ++i) {
        peers.push_back(std::make_shared<fake_peer>(ioc.get_executor()));
        subs.push_back(manager.subscribe(fake_socket(peers.back()), "shared"));
    }
    std::atomic<std::size_t> most_seen{0};
    std::atomic<int> timeouts{0}, held_back{0};
    auto publisher = [&](int t) -> net::awaitable<void> {
        for (int i = 0; i < per_sender; ++i) {
            if (manager.queued_bytes() > bound) ++held_back;
            error_code ec;
            co_await manager.async_wait_for_room(bound, 10s, net::redirect_error(net::use_awaitable, ec));
            if (ec) ++timeouts;
            const auto m = std::to_string(t) + ":" + std::to_string(i);  // at most 5 bytes
            manager.send("shared", m);
            auto held = manager.queued_bytes(), seen = most_seen.load();
            while (held > seen && !most_seen.compare_exchange_weak(seen, held)) {
            }
        }
    };
    auto guard = net::make_work_guard(ioc);
    std::thread io([&] { ioc.run(); });
    for (int t = 0; t < senders; ++t) net::co_spawn(publishers, publisher(t), net::detached);
    std::thread p1([&] { publishers.run(); }), p2([&] { publishers.run(); });
    p1.join();
    p2.join();
    wait_until_received(ioc, peers, senders * per_sender);
    guard.reset();
    subs.clear();
    ioc.stop();
    io.join();

    CHECK(timeouts == 0);
    CHECK(held_back > 0);  // the writers fell behind, so the bound had work to do
    // Each sender adds at most one message to every outbox after its wait saw the bound kept.
    CHECK(most_seen.load() <= bound + senders * receivers * 5);
    for (auto& p : peers) {
        REQUIRE(p->received.size() == senders * per_sender);
        CHECK(in_sender_order(p->received, senders));
    }
}

TEST_CASE_FIXTURE(fixture, "an idle connection over its byte limit is closed with the overflow code") {
    wsbroadcast::options opts;
    opts.outbox.max_bytes = 10;
    manager_type manager(opts);
    auto p = peer();
    auto s = manager.subscribe(fake_socket(p), "k");
    settle();
    // Two sends before the writer runs: the second one does not fit.
    CHECK(manager.send("k", "123456").queued == 1);
    CHECK(manager.send("k", "7890ab").closed == 1);
    settle();
    CHECK(p->received.empty());  // nothing queued is written once the policy closed it
    CHECK(p->server_closed);
    CHECK(p->close_code == 1008);
    CHECK(manager.size() == 0);
}

TEST_CASE_FIXTURE(fixture, "drop_newest keeps the queue and drops what does not fit") {
    wsbroadcast::options opts;
    opts.outbox.max_messages = 4;
    opts.outbox.on_overflow = wsbroadcast::overflow_policy::drop_newest;
    manager_type manager(opts);
    auto p = peer();
    p->stalled = true;
    auto s = manager.subscribe(fake_socket(p), "k");
    settle();
    std::size_t dropped = 0;
    for (auto& m : numbered(10)) dropped += manager.send("k", m).dropped;
    CHECK(dropped == 6);
    p->unstall();
    settle();
    CHECK(p->received == numbered(4));
    CHECK(manager.size() == 1);
    CHECK(manager.stats().dropped == 6);
}

// The limits bound what waits to be written; the message being written comes on top of them.
TEST_CASE_FIXTURE(fixture, "drop_oldest keeps the newest messages and the one being written") {
    wsbroadcast::options opts;
    opts.outbox.max_messages = 4;
    opts.outbox.on_overflow = wsbroadcast::overflow_policy::drop_oldest;
    manager_type manager(opts);
    auto p = peer();
    p->stalled = true;
    auto s = manager.subscribe(fake_socket(p), "k");
    settle();
    manager.send("k", "m0");
    settle();  // m0 is now in flight
    std::size_t dropped = 0;
    for (int i = 1; i < 10; ++i) dropped += manager.send("k", "m" + std::to_string(i)).dropped;
    CHECK(dropped == 5);
    p->unstall();
    settle();
    CHECK(p->received == std::vector<std::string>{"m0", "m6", "m7", "m8", "m9"});
    CHECK(manager.stats().dropped == 5);  // m1 .. m5, each once
}

// An empty outbox takes one message of any size: under drop_oldest, what waits makes room for it.
TEST_CASE_FIXTURE(fixture, "drop_oldest: a message over the byte limit evicts what waits and goes out alone") {
    wsbroadcast::options opts;
    opts.outbox.max_bytes = 8;
    opts.outbox.on_overflow = wsbroadcast::overflow_policy::drop_oldest;
    manager_type manager(opts);
    auto p = peer();
    auto s = manager.subscribe(fake_socket(p), "k");
    manager.send("k", "1234");
    const auto r = manager.send("k", "far too long for 8 bytes");
    CHECK(r.queued == 1);
    CHECK(r.dropped == 1);
    settle();
    CHECK(p->received == std::vector<std::string>{"far too long for 8 bytes"});
    CHECK(manager.stats().dropped == 1);
}

// ---- closing --------------------------------------------------------------------------------

TEST_CASE_FIXTURE(fixture, "close_all writes what is queued, then closes with 1001") {
    manager_type manager;
    auto p1 = peer(), p2 = peer();
    net::co_spawn(ioc, manager.serve(fake_socket(p1), "a"), [](std::exception_ptr, error_code) {});
    net::co_spawn(ioc, manager.serve(fake_socket(p2), "b"), [](std::exception_ptr, error_code) {});
    settle();
    manager.send("a", "last words");
    manager.close_all();
    CHECK(manager.send("a", "too late").queued == 0);
    settle();
    CHECK(p1->received == std::vector<std::string>{"last words"});
    CHECK(p1->close_code == 1001);
    CHECK(p2->close_code == 1001);
    CHECK(manager.size() == 0);
}

TEST_CASE_FIXTURE(fixture, "a connection can override the manager's overflow policy") {
    wsbroadcast::options opts;
    opts.outbox.max_messages = 4;  // and the default policy: close
    manager_type manager(opts);
    auto closer = peer(), dropper = peer();
    closer->stalled = dropper->stalled = true;
    auto s1 = manager.subscribe(fake_socket(closer), "k");
    auto s2 = manager.subscribe(fake_socket(dropper), "k",
                                {.max_bytes = 1 << 20,
                                 .max_messages = 4,
                                 .on_overflow = wsbroadcast::overflow_policy::drop_newest,
                                 .close_code = 1008});
    settle();
    wsbroadcast::send_result total;
    for (auto& m : numbered(10)) {
        auto r = manager.send("k", m);
        total.queued += r.queued, total.dropped += r.dropped, total.closed += r.closed;
    }
    CHECK(total.closed == 1);   // the default policy, on the first overflow of `closer`
    CHECK(total.dropped == 6);  // `dropper` kept its first 4 and dropped the rest
    dropper->unstall();
    settle();
    CHECK(dropper->received == numbered(4));
    CHECK(manager.count("k") == 1);
}

// ---- stress ---------------------------------------------------------------------------------

TEST_CASE("stress: churn of subscribers while several threads send to overlapping keys") {
    // Stable subscribers stay for the whole test and must receive every message sent to their key,
    // in each sender's order. Around them, connections come and go at random: subscribe, unsubscribe,
    // client close, failing writes. Two threads run the io_context, so every socket has a strand.
    net::io_context ioc;
    wsbroadcast::options opts;
    opts.outbox.max_messages = 1'000'000;  // stable subscribers must not overflow
    opts.outbox.max_bytes = 1'000'000'000;
    opts.on_error = [](const wsbroadcast::error_event&) {};  // the churn makes failures on purpose
    manager_type manager(opts);

    constexpr int keys = 4, senders = 3, per_sender = 3000, churn_rounds = 400;
    auto key = [](int k) { return "key" + std::to_string(k); };
    auto new_peer = [&] { return std::make_shared<fake_peer>(net::make_strand(ioc)); };

    std::vector<std::pair<int, std::shared_ptr<fake_peer>>> stable;
    std::vector<manager_type::subscription> stable_subs;
    for (int k = 0; k < keys; ++k)
        for (int j = 0; j < 2; ++j) {
            stable.emplace_back(k, new_peer());
            stable_subs.push_back(manager.subscribe(fake_socket(stable.back().second), key(k)));
        }

    auto guard = net::make_work_guard(ioc);
    std::thread io1([&] { ioc.run(); }), io2([&] { ioc.run(); });

    // sent[t][k]: the sequence numbers sender t sent to key k, in order.
    std::vector<std::vector<std::vector<int>>> sent(senders, std::vector<std::vector<int>>(keys));
    std::vector<std::thread> threads;
    for (int t = 0; t < senders; ++t)
        threads.emplace_back([&, t] {
            std::mt19937 rng(static_cast<unsigned>(t));
            for (int i = 0; i < per_sender; ++i) {
                const int k = static_cast<int>(rng() % keys);
                sent[static_cast<std::size_t>(t)][static_cast<std::size_t>(k)].push_back(i);
                manager.send(key(k), std::to_string(t) + ":" + std::to_string(i));
            }
        });
    threads.emplace_back([&] {
        std::mt19937 rng(99);
        std::vector<std::pair<std::shared_ptr<fake_peer>, manager_type::subscription>> live;
        for (int round = 0; round < churn_rounds; ++round) {
            auto p = new_peer();
            if (rng() % 4 == 0) p->writes_before_failure = static_cast<int>(rng() % 5);
            live.emplace_back(p, manager.subscribe(fake_socket(p), key(static_cast<int>(rng() % keys))));
            if (live.size() > 8) {
                auto victim = live.begin() + static_cast<std::ptrdiff_t>(rng() % live.size());
                switch (rng() % 3) {
                case 0: victim->second.unsubscribe(); break;
                case 1: net::post(victim->first->executor, [p = victim->first] { p->client_close(); }); break;
                default: break;  // just drop the handle
                }
                live.erase(victim);
            }
        }
    });
    for (auto& t : threads) t.join();

    // Bounded wait for the stable subscribers to drain; read each peer on its own strand.
    auto received_on_strand = [](const std::shared_ptr<fake_peer>& p) {
        std::promise<std::vector<std::string>> got;
        net::post(p->executor, [&] { got.set_value(p->received); });
        return got.get_future().get();
    };
    auto expected_count = [&](int k) {
        std::size_t n = 0;
        for (auto& per_key : sent) n += per_key[static_cast<std::size_t>(k)].size();
        return n;
    };
    for (int spin = 0; spin < 1000; ++spin) {
        bool all = true;
        for (auto& [k, p] : stable) all = all && received_on_strand(p).size() >= expected_count(k);
        if (all) break;
        std::this_thread::sleep_for(10ms);
    }

    CHECK(manager.size() == stable.size());  // every churned connection has left
    for (auto& [k, p] : stable) {
        CAPTURE(k);
        const auto got = received_on_strand(p);
        std::vector<std::vector<int>> by_sender(senders);
        for (auto& m : got) {
            const auto colon = m.find(':');
            by_sender[static_cast<std::size_t>(std::stoi(m.substr(0, colon)))].push_back(
                std::stoi(m.substr(colon + 1)));
        }
        for (int t = 0; t < senders; ++t)
            CHECK(by_sender[static_cast<std::size_t>(t)] ==
                  sent[static_cast<std::size_t>(t)][static_cast<std::size_t>(k)]);
    }
    stable_subs.clear();
    guard.reset();
    io1.join();
    io2.join();
    CHECK(manager.size() == 0);
}

// ---- accept_and_serve -----------------------------------------------------------------------

TEST_CASE_FIXTURE(fixture, "accept_and_serve registers before the handshake; what is sent meanwhile follows it") {
    manager_type manager;
    auto p = peer();
    std::optional<error_code> ended;
    std::size_t registered_during_handshake = 0;
    p->on_accept = [&] {
        registered_during_handshake = manager.count("k");
        manager.send("k", "during the handshake");  // must not be lost, nor written before the 101
    };
    net::co_spawn(ioc, manager.accept_and_serve(fake_socket(p), std::string("GET /ws/k"), "k"),
                  [&](std::exception_ptr, error_code ec) { ended = ec; });
    settle();
    CHECK(registered_during_handshake == 1);
    CHECK(p->accepted_request == "GET /ws/k");
    CHECK(p->received == std::vector<std::string>{"during the handshake"});
    p->client_close();
    settle();
    CHECK(ended == net::error::eof);
    CHECK(manager.size() == 0);
}

TEST_CASE_FIXTURE(fixture, "a failed handshake unregisters and reports its error") {
    manager_type manager;
    auto p = peer();
    p->refuse_handshake = true;
    std::optional<error_code> ended;
    net::co_spawn(ioc, manager.accept_and_serve(fake_socket(p), std::string("GET /ws/k"), "k"),
                  [&](std::exception_ptr, error_code ec) { ended = ec; });
    manager.send("k", "never written");
    settle();
    CHECK(ended == net::error::connection_refused);
    CHECK(p->received.empty());
    CHECK(manager.size() == 0);
}

// ---- refusals and limits --------------------------------------------------------------------

namespace {
struct endpoint_result {
    std::optional<error_code> ended;
};
// Starts serve() for a new fake client and returns its peer; `out` receives the ending.
std::shared_ptr<fake_peer> start_serve(fixture& f, manager_type& m, std::string key, endpoint_result& out) {
    auto p = f.peer();
    net::co_spawn(f.ioc, m.serve(fake_socket(p), std::move(key)),
                  [&out](std::exception_ptr, error_code ec) { out.ended = ec; });
    return p;
}
}  // namespace

TEST_CASE_FIXTURE(fixture, "connection limits refuse with 1013 and leave the others alone") {
    wsbroadcast::options opts;
    opts.max_connections = 3;
    opts.max_connections_per_key = 2;
    manager_type manager(opts);
    endpoint_result r1, r2, r3, r4, r5;
    auto a1 = start_serve(*this, manager, "a", r1);
    auto a2 = start_serve(*this, manager, "a", r2);
    auto a3 = start_serve(*this, manager, "a", r3);  // third on "a": over the per-key limit
    settle();
    CHECK(r3.ended == wsbroadcast::error::key_connection_limit);
    CHECK(a3->close_code == 1013);
    CHECK(a3->close_reason == "too many connections for this key");
    auto b1 = start_serve(*this, manager, "b", r4);
    auto b2 = start_serve(*this, manager, "b", r5);  // fourth in all: over the total limit
    settle();
    CHECK_FALSE(r4.ended.has_value());
    CHECK(r5.ended == wsbroadcast::error::connection_limit);
    CHECK(b2->close_code == 1013);
    CHECK(manager.size() == 3);
    CHECK(manager.stats().refused == 2);
    CHECK(manager.send("a", "still here").queued == 2);
    settle();
    CHECK(a1->received == std::vector<std::string>{"still here"});

    // subscribe() applies the same limits, and says so with an exception.
    CHECK_THROWS_AS((void)manager.subscribe(fake_socket(peer()), "c"), std::system_error);
    a1->client_close();
    settle();
    CHECK_NOTHROW((void)manager.subscribe(fake_socket(peer()), "c"));
    manager.close_all();  // the manager must outlive its connections: end them before it goes
    settle();
}

TEST_CASE_FIXTURE(fixture, "the admission hook can refuse a key with a reason, closed with 1008") {
    wsbroadcast::options opts;
    opts.admit = [](const std::string& key,
                    const wsbroadcast::upgrade_request& request) -> net::awaitable<wsbroadcast::admission> {
        CHECK_FALSE(request.present());  // serve() has no upgrade request to show
        if (key.starts_with("secret")) co_return wsbroadcast::admission::reject("unknown wallet");
        co_return wsbroadcast::admission::accept();
    };
    manager_type manager(opts);
    endpoint_result ok, no;
    auto good = start_serve(*this, manager, "public", ok);
    auto bad = start_serve(*this, manager, "secret-1", no);
    settle();
    CHECK(no.ended == wsbroadcast::error::not_admitted);
    CHECK(bad->close_code == 1008);
    CHECK(bad->close_reason == "unknown wallet");
    CHECK_FALSE(manager.has("secret-1"));
    CHECK(manager.count("public") == 1);
    CHECK_FALSE(ok.ended.has_value());
    CHECK(manager.stats().refused == 1);
    manager.close_all();
    settle();
}

TEST_CASE_FIXTURE(fixture, "a client message over max_message_bytes ends the connection") {
    wsbroadcast::options opts;
    opts.max_message_bytes = 16;
    opts.on_error = [](const wsbroadcast::error_event&) {};
    manager_type manager(opts);
    endpoint_result r;
    std::vector<std::string> got;
    auto p = peer();
    net::co_spawn(ioc, manager.serve(fake_socket(p), "k", [&](std::string_view m) { got.emplace_back(m); }),
                  [&](std::exception_ptr, error_code ec) { r.ended = ec; });
    p->client_send(std::string(16, 'a'));
    p->client_send(std::string(17, 'b'));
    settle();
    CHECK(got == std::vector<std::string>{std::string(16, 'a')});
    CHECK(r.ended == net::error::message_size);
    CHECK(p->close_code == 1009);
    CHECK(manager.size() == 0);
}

TEST_CASE_FIXTURE(fixture, "shutdown refuses newcomers, closes everyone with 1001, and tears down the stuck") {
    manager_type manager;
    endpoint_result r1, r2, late;
    auto polite = start_serve(*this, manager, "a", r1);
    auto stuck = start_serve(*this, manager, "b", r2);
    settle();
    stuck->stalled = true;
    manager.send("b", "never finishes");
    manager.send("a", "last words");
    settle();

    bool done = false;
    net::co_spawn(ioc, manager.shutdown(std::chrono::milliseconds(200)), [&](std::exception_ptr) { done = true; });
    auto newcomer = start_serve(*this, manager, "c", late);
    // The polite client answers the close frame at once; the stuck one never does.
    ioc.restart();
    ioc.run_for(1s);
    CHECK(done);
    CHECK(manager.size() == 0);
    CHECK(polite->received == std::vector<std::string>{"last words"});
    CHECK(polite->close_code == 1001);
    CHECK(stuck->aborted);
    CHECK(late.ended == wsbroadcast::error::shutting_down);
    CHECK(newcomer->close_code == 1001);
}

TEST_CASE_FIXTURE(fixture, "liveness: a peer not heard from within idle_timeout is torn down and unregistered") {
    wsbroadcast::options opts;
    opts.idle_timeout = 200ms;  // the fake cannot ping: silence alone decides
    manager_type manager(opts);
    endpoint_result talk_result, silent_result;
    auto talker = start_serve(*this, manager, "k", talk_result);
    auto silent = start_serve(*this, manager, "k", silent_result);
    ioc.restart();
    for (int i = 0; i < 12; ++i) {  // about 600 ms, the talker says something every 50 ms
        talker->client_send("still here");
        ioc.run_for(50ms);
    }
    CHECK(silent->aborted);
    CHECK(silent_result.ended.has_value());
    CHECK_FALSE(talker->aborted);
    CHECK_FALSE(talk_result.ended.has_value());
    CHECK(manager.count("k") == 1);
    manager.close_all();
    settle();
}

namespace {
// Just enough of an HTTP request for the admission hook: a target and headers.
struct test_request {
    std::string target_;
    std::map<std::string, std::string, std::less<>> headers;
    std::string_view target() const { return target_; }
    std::string_view operator[](std::string_view name) const {
        auto it = headers.find(name);
        return it == headers.end() ? std::string_view{} : std::string_view(it->second);
    }
    explicit operator std::string() const { return target_; }  // what the fake's handshake records
};
}  // namespace

TEST_CASE_FIXTURE(fixture, "the admission hook sees the upgrade request given to accept_and_serve") {
    wsbroadcast::options opts;
    std::string seen_target, seen_token;
    opts.admit = [&](const std::string&,
                     const wsbroadcast::upgrade_request& request) -> net::awaitable<wsbroadcast::admission> {
        seen_target = request.target();
        seen_token = request.header("X-Token");
        if (request.header("X-Token") != "letmein") co_return wsbroadcast::admission::reject("bad token");
        co_return wsbroadcast::admission::accept();
    };
    manager_type manager(opts);
    endpoint_result good_result, bad_result;
    auto good = peer(), bad = peer();
    net::co_spawn(ioc,
                  manager.accept_and_serve(fake_socket(good), test_request{"/ws/a", {{"X-Token", "letmein"}}}, "a"),
                  [&](std::exception_ptr, error_code ec) { good_result.ended = ec; });
    settle();
    CHECK(seen_target == "/ws/a");
    CHECK(seen_token == "letmein");
    net::co_spawn(ioc, manager.accept_and_serve(fake_socket(bad), test_request{"/ws/a", {{"X-Token", "guess"}}}, "a"),
                  [&](std::exception_ptr, error_code ec) { bad_result.ended = ec; });
    settle();
    CHECK(bad_result.ended == wsbroadcast::error::not_admitted);
    CHECK(bad->close_code == 1008);
    CHECK(bad->close_reason == "bad token");
    CHECK(manager.count("a") == 1);
    CHECK_FALSE(good_result.ended.has_value());
    manager.close_all();
    settle();
}

// ---- relay: the seam for scale-out ------------------------------------------------------------

namespace {

struct memory_relay;

// Stands in for Redis: the relays of several managers ("instances") share it.
struct memory_broker {
    std::map<std::string, std::vector<memory_relay*>> listeners;
};

struct memory_relay : wsbroadcast::relay<std::string> {
    memory_broker& broker;
    manager_type* manager = nullptr;  // where messages from the broker are delivered
    std::vector<std::pair<std::string, bool>> interest_log;
    bool available = true;

    explicit memory_relay(memory_broker& b) : broker(b) {}

    void interest(const std::string& key, bool needed) override {
        interest_log.emplace_back(key, needed);
        auto& l = broker.listeners[key];
        if (needed)
            l.push_back(this);
        else
            l.erase(std::find(l.begin(), l.end(), this));
    }
    // Like a broker with one channel per key: each instance that listens on any of the keys
    // hears the message once, and delivers it to all of them (its manager de-duplicates).
    error_code publish(std::span<const std::string> keys, const wsbroadcast::message& m) override {
        if (!available) return wsbroadcast::error::relay_unavailable;
        std::vector<memory_relay*> heard;
        for (auto& key : keys)
            for (auto* r : broker.listeners[key])
                if (std::find(heard.begin(), heard.end(), r) == heard.end()) heard.push_back(r);
        for (auto* r : heard) r->manager->send(keys, m);
        return {};
    }
};

wsbroadcast::options<std::string> with_relay(std::shared_ptr<memory_relay> r) {
    wsbroadcast::options<std::string> o;
    o.relay = std::move(r);
    return o;
}

}  // namespace

TEST_CASE_FIXTURE(fixture, "a relay hears of a key's first connection and of its last, in order") {
    memory_broker broker;
    auto relay = std::make_shared<memory_relay>(broker);
    manager_type manager(with_relay(relay));
    using log = std::vector<std::pair<std::string, bool>>;

    auto a1 = manager.subscribe(fake_socket(peer()), "a");
    auto a2 = manager.subscribe(fake_socket(peer()), "a");
    auto b = manager.subscribe(fake_socket(peer()), "b");
    CHECK(relay->interest_log == log{{"a", true}, {"b", true}});
    a1.unsubscribe();
    CHECK(relay->interest_log.size() == 2);  // "a" still has a connection
    a2.unsubscribe();
    auto a3 = manager.subscribe(fake_socket(peer()), "a");
    CHECK(relay->interest_log == log{{"a", true}, {"b", true}, {"a", false}, {"a", true}});

    bool done = false;
    net::co_spawn(ioc, manager.shutdown(std::chrono::milliseconds(100)), [&](std::exception_ptr) { done = true; });
    ioc.restart();
    ioc.run_for(1s);
    CHECK(done);
    REQUIRE(relay->interest_log.size() == 6);  // shutdown lets go of both keys
    CHECK(std::count(relay->interest_log.begin() + 4, relay->interest_log.end(),
                     std::pair<std::string, bool>{"a", false}) == 1);
    CHECK(std::count(relay->interest_log.begin() + 4, relay->interest_log.end(),
                     std::pair<std::string, bool>{"b", false}) == 1);
    CHECK(broker.listeners["a"].empty());
    CHECK(broker.listeners["b"].empty());
}

TEST_CASE_FIXTURE(fixture, "publish goes through the relay; each instance that needs the key delivers it once") {
    memory_broker broker;
    auto relay1 = std::make_shared<memory_relay>(broker), relay2 = std::make_shared<memory_relay>(broker);
    manager_type instance1(with_relay(relay1)), instance2(with_relay(relay2));
    relay1->manager = &instance1;
    relay2->manager = &instance2;
    auto p1 = peer(), p2 = peer(), other = peer();
    auto s1 = instance1.subscribe(fake_socket(p1), "k");
    auto s2 = instance2.subscribe(fake_socket(p2), "k");
    auto s3 = instance2.subscribe(fake_socket(other), "other");

    const auto r = instance1.publish("k", "paid");
    CHECK_FALSE(r.error);
    CHECK(r.relayed);
    CHECK(r.local.queued == 0);  // nothing is sent here directly: it comes back through the relay
    settle();
    CHECK(p1->received == std::vector<std::string>{"paid"});
    CHECK(p2->received == std::vector<std::string>{"paid"});
    CHECK(other->received.empty());
    CHECK(instance1.stats().deliveries == 1);
    CHECK(instance2.stats().deliveries == 1);
}

TEST_CASE_FIXTURE(fixture, "a relay that cannot take a message makes publish fail; nothing is sent") {
    memory_broker broker;
    auto relay = std::make_shared<memory_relay>(broker);
    manager_type manager(with_relay(relay));
    relay->manager = &manager;
    auto p = peer();
    auto s = manager.subscribe(fake_socket(p), "k");
    relay->available = false;
    const auto r = manager.publish("k", "lost?");
    CHECK(r.error == wsbroadcast::error::relay_unavailable);
    CHECK(r.error.message() == "the message broker is unavailable");
    settle();
    CHECK(p->received.empty());
    CHECK(manager.stats().deliveries == 0);
}

TEST_CASE_FIXTURE(fixture, "without a relay, publish is send") {
    manager_type manager;
    auto p = peer();
    auto s = manager.subscribe(fake_socket(p), "k");
    const auto r = manager.publish("k", "here");
    CHECK_FALSE(r.error);
    CHECK_FALSE(r.relayed);
    CHECK(r.local.queued == 1);
    settle();
    CHECK(p->received == std::vector<std::string>{"here"});
}

// ---- reading parts of messages ------------------------------------------------------------------

TEST_CASE_FIXTURE(fixture, "where a socket reads parts, an idle read asks for a few bytes; messages arrive whole") {
    wsbroadcast::ConnectionManager<test::fake_socket_parts> manager;
    auto p = peer();
    std::vector<std::string> got;
    error_code ended;
    net::co_spawn(ioc, manager.serve(test::fake_socket_parts(p), "k", [&](std::string_view m) { got.emplace_back(m); }),
                  [&](std::exception_ptr, error_code ec) { ended = ec; });
    settle();
    const std::string big(20000, 'b'), medium(1000, 'm');
    p->client_send(medium);
    p->client_send("short");
    p->client_send(big);
    p->client_send("after the big one");
    settle();
    CHECK(got == std::vector<std::string>{medium, "short", big, "after the big one"});
    REQUIRE(p->read_limits.size() >= 4);
    CHECK(p->read_limits[0] == 15);   // the first read of a message is small...
    CHECK(p->read_limits[1] > 1000);  // ...the rest of it is read at full size
    CHECK(manager.send("k", "still writing").queued == 1);
    settle();
    CHECK(p->received == std::vector<std::string>{"still writing"});
    p->client_close();
    settle();
    CHECK(ended == net::error::eof);
    CHECK(manager.size() == 0);
}

// ---- the outbox alone -----------------------------------------------------------------------

namespace {
wsbroadcast::message text(std::string_view s) { return wsbroadcast::message::text(s); }
}  // namespace

TEST_CASE("outbox: limits bound what waits; the batch being written comes on top") {
    using wsbroadcast::detail::outbox;
    outbox box({.max_bytes = 10, .max_messages = 2, .on_overflow = wsbroadcast::overflow_policy::drop_newest});
    CHECK(box.offer(text("aaaa")).queued);
    CHECK(box.offer(text("bbbb")).queued);
    CHECK_FALSE(box.offer(text("c")).queued);  // 2 messages: full
    CHECK(box.bytes() == 8);
    CHECK(box.start_writing(64) == 2);
    CHECK(box.being_written(1).data() == "bbbb");
    CHECK(box.offer(text("cccc")).queued);  // room again: the batch is not waiting any more
    CHECK(box.offer(text("dddd")).queued);
    CHECK(box.bytes() == 16);
    box.done_writing();
    CHECK(box.size() == 2);
    CHECK(box.bytes() == 8);
    box.discard_waiting();
    CHECK(box.size() == 0);
    CHECK_FALSE(box.has_waiting());
}

TEST_CASE("outbox: an empty outbox takes one message of any size; a busy one applies its policy") {
    using wsbroadcast::detail::outbox;
    const std::string big(100, 'x');
    outbox closer({.max_bytes = 10});
    CHECK(closer.offer(text(big)).queued);  // alone: accepted
    const auto r = closer.offer(text("y"));
    CHECK_FALSE(r.queued);
    CHECK(r.overflowed);  // behind it, the limit holds

    outbox evicter({.max_bytes = 10, .on_overflow = wsbroadcast::overflow_policy::drop_oldest});
    evicter.offer(text("12345"));
    evicter.offer(text("678"));
    const auto e = evicter.offer(text("abcdef"));
    CHECK(e.queued);
    CHECK(e.evicted == 1);  // "12345" went, "678" stays
    CHECK(evicter.bytes() == 9);
}

TEST_CASE("outbox: drop_oldest never evicts the batch being written") {
    using wsbroadcast::detail::outbox;
    outbox box({.max_messages = 2, .on_overflow = wsbroadcast::overflow_policy::drop_oldest});
    box.offer(text("w1"));
    box.offer(text("w2"));
    box.start_writing(64);
    for (auto m : {"a", "b", "c", "d"}) CHECK(box.offer(text(m)).queued);
    box.done_writing();
    CHECK(box.start_writing(64) == 2);
    CHECK(box.being_written(0).data() == "c");
    CHECK(box.being_written(1).data() == "d");
}

TEST_CASE("outbox: the shared total follows every outbox, through writes, drops, discards and destruction") {
    using wsbroadcast::detail::outbox;
    auto total = std::make_shared<wsbroadcast::detail::queued_total>();
    {
        outbox a({.max_messages = 1, .on_overflow = wsbroadcast::overflow_policy::drop_oldest}, total);
        outbox b({.max_bytes = 100}, total);
        a.offer(text("aaaa"));
        b.offer(text("123456"));
        a.start_writing(1);  // "aaaa" is being written: still held
        a.offer(text("bb"));
        CHECK(total->bytes() == 12);
        a.offer(text("c"));  // evicts "bb"
        CHECK(total->bytes() == 11);
        a.done_writing();
        CHECK(total->bytes() == 7);
        b.discard_waiting();
        CHECK(total->bytes() == 1);
        CHECK(total->bytes() == a.bytes() + b.bytes());
    }
    CHECK(total->bytes() == 0);  // an outbox that goes takes what it held with it
}

// ---- the registry alone ---------------------------------------------------------------------

namespace {
struct registry_connection {
    wsbroadcast::detail::registry_node<std::string, registry_connection> node;
    int id = 0;
};
using test_registry = wsbroadcast::detail::registry<std::string, wsbroadcast::default_hash<std::string>,
                                                    std::equal_to<>, registry_connection>;

std::vector<std::pair<int, std::size_t>> reached_once(const test_registry& r, std::vector<std::string> keys) {
    std::vector<std::pair<int, std::size_t>> out;
    r.for_each_once(keys,
                    [&](registry_connection& c, std::size_t i, const std::string&) { out.emplace_back(c.id, i); });
    std::sort(out.begin(), out.end());
    return out;
}
}  // namespace

TEST_CASE("registry: keys to connections and back stay consistent through adds and removes") {
    test_registry r;
    std::vector<std::shared_ptr<registry_connection>> cs;
    for (int i = 0; i < 4; ++i) {
        cs.push_back(std::make_shared<registry_connection>());
        cs.back()->id = i;
        r.insert(cs.back());
    }
    using add = test_registry::add_result;
    const test_registry::limits none{};
    CHECK(r.add(*cs[0], "a", none) == add::added_first);
    CHECK(r.add(*cs[0], "b", none) == add::added_first);
    CHECK(r.add(*cs[0], "a", none) == add::already);
    CHECK(r.add(*cs[1], "a", none) == add::added);
    CHECK(r.add(*cs[2], "b", none) == add::added);
    CHECK(r.add(*cs[2], "c", none) == add::added_first);
    CHECK(r.count("a") == 2);
    CHECK(r.key_count() == 3);

    // each connection once, with the first of the keys (in the order asked) it holds
    using reach = std::vector<std::pair<int, std::size_t>>;
    CHECK(reached_once(r, {"b", "a"}) == reach{{0, 0}, {1, 1}, {2, 0}});
    CHECK(reached_once(r, {"a", "a"}) == reach{{0, 0}, {1, 0}});
    CHECK(reached_once(r, {"nobody", "c"}) == reach{{2, 1}});

    // removing from the middle of both lists fixes the back-references of what moved
    std::vector<std::string> emptied;
    auto note = [&](const std::string& k) { emptied.push_back(k); };
    CHECK(r.remove(*cs[0], "a", note) == test_registry::remove_result::removed);
    CHECK(r.remove(*cs[0], "a", note) == test_registry::remove_result::not_subscribed);
    CHECK(r.keys_of(*cs[0]) == std::vector<std::string>{"b"});
    CHECK(r.subscribed(*cs[1], "a"));
    r.erase(*cs[2], note);  // "c" loses its last subscriber
    CHECK(emptied == std::vector<std::string>{"c"});
    CHECK(r.count("b") == 1);
    CHECK(r.size() == 3);
    CHECK(reached_once(r, {"a", "b"}) == reach{{0, 1}, {1, 0}});
    r.erase(*cs[0], note);
    r.erase(*cs[1], note);
    CHECK(emptied == std::vector<std::string>{"c", "b", "a"});
    CHECK(r.key_count() == 0);
    CHECK(r.size() == 1);
}

TEST_CASE("registry: limits on keys per connection and connections per key") {
    test_registry r;
    auto c1 = std::make_shared<registry_connection>(), c2 = std::make_shared<registry_connection>();
    r.insert(c1);
    r.insert(c2);
    const test_registry::limits l{.max_keys_per_connection = 2, .max_connections_per_key = 1};
    using add = test_registry::add_result;
    CHECK(r.add(*c1, "a", l) == add::added_first);
    CHECK(r.add(*c1, "b", l) == add::added_first);
    CHECK(r.add(*c1, "c", l) == add::key_limit);
    CHECK(r.add(*c2, "a", l) == add::key_connection_limit);
    auto outsider = std::make_shared<registry_connection>();
    CHECK(r.add(*outsider, "z", l) == add::not_registered);
}

// ---- many keys per connection ---------------------------------------------------------------

TEST_CASE_FIXTURE(fixture, "a connection on several keys gets a multi-key send once, and a broadcast once") {
    manager_type manager;
    auto both = peer(), only_a = peer(), only_b = peer(), other = peer();
    auto s1 = manager.subscribe(fake_socket(both), std::vector<std::string>{"a", "b"});
    auto s2 = manager.subscribe(fake_socket(only_a), "a");
    auto s3 = manager.subscribe(fake_socket(only_b), "b");
    auto s4 = manager.subscribe(fake_socket(other), "c");
    CHECK(manager.size() == 4);
    CHECK(manager.count("a") == 2);

    const std::array<std::string_view, 3> keys{"a", "b", "a"};
    const auto r = manager.send(keys, "to a and b");
    CHECK(r.queued == 3);
    CHECK(manager.broadcast("everyone").queued == 4);
    settle();
    CHECK(both->received == std::vector<std::string>{"to a and b", "everyone"});
    CHECK(only_a->received == std::vector<std::string>{"to a and b", "everyone"});
    CHECK(only_b->received == std::vector<std::string>{"to a and b", "everyone"});
    CHECK(other->received == std::vector<std::string>{"everyone"});
    // one allocation, whoever got it
    CHECK(both->write_addresses[0] == only_a->write_addresses[0]);
    CHECK(both->write_addresses[0] == only_b->write_addresses[0]);
}

TEST_CASE_FIXTURE(fixture, "a connection's keys change at run time through its handle") {
    wsbroadcast::options opts;
    opts.max_keys_per_connection = 2;
    opts.max_connections_per_key = 1;
    manager_type manager(opts);
    auto p = peer(), q = peer();
    auto s = manager.subscribe(fake_socket(p), {});
    auto t = manager.subscribe(fake_socket(q), "taken");
    auto h = s.handle();
    CHECK(h.keys().empty());
    CHECK(manager.size() == 2);
    CHECK_FALSE(h.subscribe("x"));
    CHECK_FALSE(h.subscribe("x"));  // already: fine, once
    CHECK(h.subscribe("taken") == wsbroadcast::error::key_connection_limit);
    CHECK_FALSE(h.subscribe("y"));
    CHECK(h.subscribe("z") == wsbroadcast::error::key_limit);
    auto keys = h.keys();
    std::sort(keys.begin(), keys.end());
    CHECK(keys == std::vector<std::string>{"x", "y"});
    CHECK(h.subscribed_to("x"));

    manager.send("x", "1");
    CHECK(h.unsubscribe("x"));
    CHECK_FALSE(h.unsubscribe("x"));
    manager.send("x", "2");  // no longer
    manager.send("y", "3");
    h.send("just you");
    settle();
    CHECK(p->received == std::vector<std::string>{"1", "3", "just you"});
    CHECK_FALSE(manager.has("x"));

    s.unsubscribe();
    CHECK_FALSE(h.connected());
    CHECK(h.subscribe("x") == wsbroadcast::error::not_registered);
    CHECK(h.keys().empty());
}

TEST_CASE_FIXTURE(fixture, "initial keys over a limit refuse the connection, all or nothing") {
    wsbroadcast::options opts;
    opts.max_keys_per_connection = 2;
    manager_type manager(opts);
    CHECK_THROWS_AS((void)manager.subscribe(fake_socket(peer()), std::vector<std::string>{"a", "b", "c"}),
                    std::system_error);
    CHECK(manager.size() == 0);
    CHECK(manager.key_count() == 0);
    auto ok = manager.subscribe(fake_socket(peer()), std::vector<std::string>{"a", "b", "a"});  // 2 distinct
    CHECK(manager.key_count() == 2);
}

TEST_CASE_FIXTURE(fixture, "per key: close every connection of a key, and visit them") {
    manager_type manager;
    auto p1 = peer(), p2 = peer(), p3 = peer();
    net::co_spawn(ioc, manager.serve(fake_socket(p1), std::vector<std::string>{"room", "own-1"}),
                  [](std::exception_ptr, error_code) {});
    net::co_spawn(ioc, manager.serve(fake_socket(p2), "room"), [](std::exception_ptr, error_code) {});
    net::co_spawn(ioc, manager.serve(fake_socket(p3), "elsewhere"), [](std::exception_ptr, error_code) {});
    settle();
    std::size_t visited = 0;
    CHECK(manager.for_each("room", [&](manager_type::connection_handle h) { visited += h.subscribed_to("room"); }) ==
          2);
    CHECK(visited == 2);
    CHECK(manager.close("room", 4000, "room closed") == 2);
    settle();
    CHECK(p1->close_code == 4000);
    CHECK(p2->close_reason == "room closed");
    CHECK_FALSE(p3->server_closed);
    CHECK(manager.size() == 1);
    CHECK_FALSE(manager.has("own-1"));  // p1 left with all its keys
    p3->client_close();                 // the manager must outlive its connections
    settle();
}

TEST_CASE_FIXTURE(fixture,
                  "envelopes: wrapped once per message and key, subscribed frame first, plain peers unchanged") {
    int wraps = 0;
    wsbroadcast::options opts;
    opts.envelope.wrap = [&](const std::string& key, const wsbroadcast::message& m,
                             const std::optional<wsbroadcast::position>& at) {
        ++wraps;
        CHECK_FALSE(at);  // no history: no positions
        return wsbroadcast::message::text(key + ":" + std::string(m.data()));
    };
    opts.envelope.subscribed = [](const std::string& key, const wsbroadcast::subscribed_info& info) {
        CHECK(info.outcome == wsbroadcast::recovery::live);
        return wsbroadcast::message::text("subscribed " + key);
    };
    manager_type manager(opts);
    const wsbroadcast::connection_options enveloped{.envelopes = true};
    auto e1 = peer(), e2 = peer(), plain = peer();
    // A message sent during the handshake waits behind the subscribed frame.
    e1->on_accept = [&] { manager.send("a", "during"); };
    net::co_spawn(ioc,
                  manager.accept_and_serve(fake_socket(e1), std::string("GET /ws"), std::vector<std::string>{"a", "b"},
                                           enveloped),
                  [](std::exception_ptr, error_code) {});
    settle();
    auto s2 = manager.subscribe(fake_socket(e2), "b", enveloped);
    auto s3 = manager.subscribe(fake_socket(plain), std::vector<std::string>{"a", "b"});
    wraps = 0;
    manager.send(std::vector<std::string>{"b", "a"}, "both");
    CHECK(wraps == 1);  // "b" for both envelope peers; nobody needed "a:both"
    manager.send("a", "one");
    CHECK(wraps == 2);
    CHECK(s2.handle().subscribe("c") == error_code{});
    settle();
    CHECK(e1->received == std::vector<std::string>{"subscribed a", "subscribed b", "a:during", "b:both", "a:one"});
    CHECK(e2->received == std::vector<std::string>{"subscribed b", "b:both", "subscribed c"});
    CHECK(plain->received == std::vector<std::string>{"both", "one"});
    e1->client_close();
    settle();
}

TEST_CASE_FIXTURE(fixture, "serve hands a handler the connection, the data and its type; it can answer and subscribe") {
    manager_type manager;
    auto p = peer();
    std::vector<std::pair<std::string, bool>> got;
    net::co_spawn(ioc,
                  manager.serve(fake_socket(p), {},
                                [&](manager_type::connection_handle& h, std::string_view data, bool binary) {
                                    got.emplace_back(data, binary);
                                    if (!binary) CHECK_FALSE(h.subscribe(std::string(data)));
                                    h.send("ok " + std::string(data));
                                }),
                  [](std::exception_ptr, error_code) {});
    settle();
    CHECK(manager.size() == 1);
    p->client_send("news");
    p->client_send("\x01\x02", true);
    settle();
    manager.send("news", "headline");
    settle();
    using seen = std::vector<std::pair<std::string, bool>>;
    CHECK(got == seen{{"news", false}, {"\x01\x02", true}});
    CHECK(p->received == std::vector<std::string>{"ok news", "ok \x01\x02", "headline"});
    p->client_close();
    settle();
    CHECK(manager.size() == 0);
}

TEST_CASE_FIXTURE(fixture, "a relay hears of each key of a multi-key connection, and runtime changes") {
    memory_broker broker;
    auto relay = std::make_shared<memory_relay>(broker);
    manager_type manager(with_relay(relay));
    relay->manager = &manager;
    auto s = manager.subscribe(fake_socket(peer()), std::vector<std::string>{"a", "b"});
    auto h = s.handle();
    CHECK_FALSE(h.subscribe("c"));
    CHECK(h.unsubscribe("a"));
    s.unsubscribe();
    using log = std::vector<std::pair<std::string, bool>>;
    auto events = relay->interest_log;
    // b and c go when the connection leaves, in whatever order its keys were kept
    REQUIRE(events.size() == 6);
    CHECK(log(events.begin(), events.begin() + 4) == log{{"a", true}, {"b", true}, {"c", true}, {"a", false}});
    std::sort(events.begin() + 4, events.end());
    CHECK(log(events.begin() + 4, events.end()) == log{{"b", false}, {"c", false}});
}

TEST_CASE_FIXTURE(fixture, "a multi-key publish through a relay reaches each connection of every instance once") {
    memory_broker broker;
    auto r1 = std::make_shared<memory_relay>(broker), r2 = std::make_shared<memory_relay>(broker);
    manager_type one(with_relay(r1)), two(with_relay(r2));
    r1->manager = &one;
    r2->manager = &two;
    auto p1 = peer(), p2 = peer(), p3 = peer();
    auto s1 = one.subscribe(fake_socket(p1), std::vector<std::string>{"x", "y"});
    auto s2 = two.subscribe(fake_socket(p2), std::vector<std::string>{"y", "x"});
    auto s3 = two.subscribe(fake_socket(p3), "y");
    const auto r = one.publish(std::vector<std::string>{"x", "y"}, "paid");
    CHECK_FALSE(r.error);
    CHECK(r.relayed);
    settle();
    CHECK(p1->received == std::vector<std::string>{"paid"});
    CHECK(p2->received == std::vector<std::string>{"paid"});
    CHECK(p3->received == std::vector<std::string>{"paid"});
}

TEST_CASE("runtime subscribe and unsubscribe race with multi-key sends from other threads") {
    // Stable connections hold "s0".."s3" for the whole test; churners subscribe and unsubscribe the
    // same keys from other threads. Every multi-key send reaches each stable connection exactly once.
    net::io_context ioc;
    wsbroadcast::options opts;
    opts.outbox.max_messages = 1'000'000;
    opts.outbox.max_bytes = 1'000'000'000;
    manager_type manager(opts);
    const std::vector<std::string> all_keys{"s0", "s1", "s2", "s3"};
    constexpr int stable = 3, churners = 4, sends_per_thread = 1500, senders = 2;
    std::vector<std::shared_ptr<fake_peer>> peers;
    std::vector<manager_type::subscription> subs;
    for (int i = 0; i < stable + churners; ++i) {
        peers.push_back(std::make_shared<fake_peer>(net::make_strand(ioc)));
        subs.push_back(
            manager.subscribe(fake_socket(peers.back()), i < stable ? wsbroadcast::initial_keys<std::string>(all_keys)
                                                                    : wsbroadcast::initial_keys<std::string>()));
    }
    auto guard = net::make_work_guard(ioc);
    std::thread io1([&] { ioc.run(); }), io2([&] { ioc.run(); });
    std::atomic<bool> stop{false};
    std::vector<std::thread> threads;
    for (int c = 0; c < churners; ++c)
        threads.emplace_back([&, c] {
            auto h = subs[static_cast<std::size_t>(stable + c)].handle();
            std::mt19937 rng(static_cast<unsigned>(c));
            while (!stop) {
                const auto& key = all_keys[rng() % all_keys.size()];
                if (rng() % 2)
                    (void)h.subscribe(key);
                else
                    h.unsubscribe(key);
            }
        });
    std::vector<std::thread> sending;
    for (int t = 0; t < senders; ++t)
        sending.emplace_back([&, t] {
            std::mt19937 rng(static_cast<unsigned>(100 + t));
            for (int i = 0; i < sends_per_thread; ++i) {
                std::vector<std::string> keys{all_keys[rng() % 4], all_keys[rng() % 4], all_keys[rng() % 4]};
                manager.send(keys, std::to_string(t) + ":" + std::to_string(i));
            }
        });
    for (auto& t : sending) t.join();
    stop = true;
    for (auto& t : threads) t.join();
    const std::size_t expected = std::size_t{senders} * sends_per_thread;
    for (int i = 0; i < stable; ++i) {  // each peer's record is read on its own strand
        auto& peer = peers[static_cast<std::size_t>(i)];
        for (int spin = 0; spin < 500; ++spin) {
            std::promise<bool> done;
            net::post(peer->executor, [&] { done.set_value(peer->received.size() >= expected); });
            if (done.get_future().get()) break;
            std::this_thread::sleep_for(10ms);
        }
    }
    guard.reset();
    subs.clear();
    ioc.stop();
    io1.join();
    io2.join();
    for (int i = 0; i < stable; ++i) {
        const auto& got = peers[static_cast<std::size_t>(i)]->received;
        REQUIRE(got.size() == expected);
        CHECK(in_sender_order(got, senders));
    }
}

// ---- defects found by review (each failed before its fix) ------------------------------------

TEST_CASE_FIXTURE(fixture, "one message larger than max_bytes reaches every connection with an empty outbox") {
    wsbroadcast::options opts;
    opts.outbox.max_bytes = 1000;  // the close policy
    manager_type manager(opts);
    auto p1 = peer(), p2 = peer();
    auto s1 = manager.subscribe(fake_socket(p1), "k");
    auto s2 = manager.subscribe(fake_socket(p2), "k");
    settle();
    const std::string big(2000, 'x');
    const auto r = manager.send("k", big);
    CHECK(r.queued == 2);
    CHECK(r.closed == 0);
    settle();
    CHECK(p1->received == std::vector<std::string>{big});
    CHECK(p2->received == std::vector<std::string>{big});
    CHECK(manager.size() == 2);
}

namespace {
// The next layer of framed_socket: writes wait at a gate, and what is written is recorded whole.
struct gated_stream {
    using executor_type = net::any_io_executor;
    explicit gated_stream(executor_type ex) : executor(ex), gate(std::make_shared<net::steady_timer>(ex)) {}
    executor_type executor;
    std::shared_ptr<net::steady_timer> gate;
    std::shared_ptr<bool> closed = std::make_shared<bool>(true);  // the gate: writes wait while true
    std::shared_ptr<std::string> written = std::make_shared<std::string>();
    executor_type get_executor() const { return executor; }

    template <class Buffers, class Token>
    auto async_write_some(const Buffers& buffers, Token&& token) {
        std::string bytes(net::buffer_size(buffers), '\0');
        net::buffer_copy(net::buffer(bytes), buffers);
        return net::async_compose<Token, void(error_code, std::size_t)>(
            // Its state is shared, not `this`: like a real socket's, it outlives a destroyed layer.
            [closed = closed, gate = gate, written = written, bytes = std::move(bytes)](auto& self,
                                                                                        error_code = {}) mutable {
                if (*closed) {
                    gate->expires_at(net::steady_timer::time_point::max());
                    return gate->async_wait(std::move(self));
                }
                *written += bytes;
                self.complete({}, bytes.size());
            },
            token, executor);
    }
    void open() {
        *closed = false;
        gate->cancel();
    }
};

// A WebSocket-like socket over a batching_stream: the manager writes whole frames in batches.
struct framed_socket {
    using executor_type = net::any_io_executor;
    explicit framed_socket(executor_type ex) : next(ex) {}
    wsbroadcast::batching_stream<gated_stream> next;
    executor_type get_executor() { return next.get_executor(); }
    wsbroadcast::batching_stream<gated_stream>& next_layer() { return next; }
    template <class Token>
    auto async_write(net::const_buffer, Token&& token) {  // the concept's; the manager writes frames itself
        return next.async_write_some(net::const_buffer(), std::forward<Token>(token));
    }
};
}  // namespace

TEST_CASE_FIXTURE(fixture, "drop_oldest over a batching stream drops the oldest waiting message, not the newest") {
    wsbroadcast::options<std::string> opts;
    opts.outbox.max_messages = 2;
    opts.outbox.on_overflow = wsbroadcast::overflow_policy::drop_oldest;
    wsbroadcast::ConnectionManager<framed_socket> manager(opts);
    framed_socket socket(ioc.get_executor());
    auto gate = socket.next.next_layer();  // shares the gate and the record
    auto s = manager.subscribe(std::move(socket), "k");
    manager.send("k", "a");
    manager.send("k", "b");
    settle();  // "a" and "b" are in flight, as one batch
    for (auto m : {"c", "d", "e"}) CHECK(manager.send("k", m).queued == 1);
    gate.open();
    settle();
    const auto& out = *gate.written;
    // the payloads in order: a, b (the batch), then the newest two
    std::string payloads;
    for (std::size_t i = 0; i + 1 < out.size();) {
        const auto len = static_cast<unsigned char>(out[i + 1]);
        payloads += out.substr(i + 2, len);
        i += 2 + len;
    }
    CHECK(payloads == "abde");
}

TEST_CASE("the endpoint completes once even when its completion handler throws") {
    net::io_context ioc;
    manager_type manager;
    auto p = std::make_shared<fake_peer>(net::make_strand(ioc));
    int completions = 0;
    manager.serve(
        fake_socket(p), "k", [](std::string_view) {},
        [&](std::exception_ptr, error_code) {
            ++completions;
            throw std::runtime_error("from the handler");
        });
    ioc.poll();
    p->client_close();
    int thrown = 0;
    for (int i = 0; i < 100 && !ioc.stopped(); ++i) {
        try {
            ioc.poll();
        } catch (const std::runtime_error&) {
            ++thrown;
        }
    }
    CHECK(completions == 1);
    CHECK(thrown == 1);
    CHECK(manager.size() == 0);
}

TEST_CASE("the endpoint completes on the awaiting coroutine's executor, not the socket's") {
    net::io_context caller_context, socket_context;
    manager_type manager;
    auto p = std::make_shared<fake_peer>(socket_context.get_executor());
    std::promise<std::thread::id> resumed;
    net::co_spawn(
        caller_context,
        [&]() -> net::awaitable<void> {
            co_await manager.serve(fake_socket(p), "k");
            resumed.set_value(std::this_thread::get_id());
        },
        [](std::exception_ptr) {});
    auto caller_work = net::make_work_guard(caller_context);
    std::thread caller([&] { caller_context.run(); });
    auto socket_work = net::make_work_guard(socket_context);
    std::thread sockets([&] { socket_context.run(); });
    for (int i = 0; i < 200 && manager.size() == 0; ++i) std::this_thread::sleep_for(5ms);
    net::post(socket_context, [&] { p->client_close(); });
    auto done = resumed.get_future();
    const bool completed = done.wait_for(2s) == std::future_status::ready;
    const auto caller_id = caller.get_id();
    caller_work.reset();
    socket_work.reset();
    caller.join();
    sockets.join();
    REQUIRE(completed);
    CHECK(done.get() == caller_id);
}

TEST_CASE_FIXTURE(fixture, "a batching_stream destroyed while a write is in flight is not touched by its completion") {
    auto stream = std::make_unique<wsbroadcast::batching_stream<gated_stream>>(ioc.get_executor());
    auto next = stream->next_layer();  // shares the gate and the record
    int completed = 0, second_completed = 0;
    stream->async_write_some(net::buffer("one", 3), [&](const error_code&, std::size_t) { ++completed; });
    stream->async_write_some(net::buffer("two", 3), [&](const error_code&, std::size_t) { ++second_completed; });
    settle();
    stream.reset();  // as Beast's stream goes while its keep-alive ping is being written
    next.open();
    settle();  // ASan: the write's completion must not reach the destroyed stream
    CHECK(completed == 1);
    CHECK(second_completed == 0);  // its stream is gone: never started
    CHECK(*next.written == "one");
}

TEST_CASE_FIXTURE(fixture, "a connection closed by the overflow policy leaves at once; a silent close is torn down") {
    wsbroadcast::options opts;
    opts.outbox.max_messages = 1;
    opts.close_timeout = 50ms;
    manager_type manager(opts);
    auto deaf = peer(), fine = peer();
    deaf->close_hangs = true;
    net::co_spawn(ioc, manager.serve(fake_socket(deaf), "k"), [](std::exception_ptr, error_code) {});
    net::co_spawn(ioc, manager.serve(fake_socket(fine), "k", wsbroadcast::outbox_options{.max_messages = 10}),
                  [](std::exception_ptr, error_code) {});
    settle();
    manager.send("k", "1");
    CHECK(manager.send("k", "2").closed == 1);  // "1" still waits for deaf's writer
    settle();
    CHECK(manager.count("k") == 1);  // gone from the registry though its close is unanswered
    CHECK(deaf->server_closed);
    CHECK_FALSE(deaf->aborted);
    ioc.restart();
    ioc.run_for(300ms);
    CHECK(deaf->aborted);  // the close deadline tore it down
    fine->client_close();
    settle();
}

namespace {
// Records each write as it starts; completes it later, posted.
struct recording_socket {
    using executor_type = net::any_io_executor;
    executor_type executor;
    std::shared_ptr<std::vector<std::string>> started = std::make_shared<std::vector<std::string>>();
    std::function<void()> on_start = nullptr;  // runs as each write starts
    executor_type get_executor() const { return executor; }
    template <class Token>
    auto async_write(net::const_buffer buffer, Token&& token) {
        started->emplace_back(static_cast<const char*>(buffer.data()), buffer.size());
        if (on_start) on_start();
        return net::async_compose<Token, void(error_code, std::size_t)>(
            [n = buffer.size(), posted = false, ex = executor](auto& self) mutable {
                if (!std::exchange(posted, true)) return net::post(ex, std::move(self));
                self.complete({}, n);
            },
            token, executor);
    }
};
}  // namespace

TEST_CASE_FIXTURE(fixture, "a send on the connections' thread starts its first writes before it returns") {
    wsbroadcast::ConnectionManager<recording_socket> manager;
    std::vector<recording_socket> sockets;  // each with its own record
    for (int i = 0; i < 40; ++i) sockets.push_back(recording_socket{ioc.get_executor()});
    std::vector<wsbroadcast::ConnectionManager<recording_socket>::subscription> subs;
    subs.push_back(manager.subscribe(sockets[0], "one"));
    for (std::size_t i = 1; i < sockets.size(); ++i) subs.push_back(manager.subscribe(sockets[i], "many"));
    settle();
    auto many_started = [&] {  // writes started to the connections on "many"
        std::size_t n = 0;
        for (std::size_t i = 1; i < sockets.size(); ++i) n += sockets[i].started->size();
        return n;
    };

    // A targeted send: its one write has started by the time send() returns, with no handler run
    // in between (before, a hand-out and then the flush were posted: two wake-ups of the loop).
    std::size_t started_at_return = 99;
    net::post(ioc, [&] {
        CHECK(manager.send("one", "hello").queued == 1);
        started_at_return = sockets[0].started->size();
    });
    settle();
    CHECK(started_at_return == 1);
    CHECK(*sockets[0].started == std::vector<std::string>{"hello"});

    // A send to many starts a first chunk of writes itself; the rest are handed out behind
    // whatever else waits, and every connection gets the message once.
    net::post(ioc, [&] {
        manager.send("many", "all");
        started_at_return = many_started();
    });
    settle();
    CHECK(started_at_return > 0);
    CHECK(started_at_return < 39);
    CHECK(many_started() == 39);

    // From a thread that does not run the connections' io_context, nothing is written inline:
    // the writes are queued to their executor.
    manager.send("one", "later");
    CHECK(sockets[0].started->size() == 1);
    settle();
    CHECK(*sockets[0].started == std::vector<std::string>{"hello", "later"});
}

TEST_CASE_FIXTURE(fixture, "a send to many writes to its first connection before it fills the other outboxes") {
    wsbroadcast::ConnectionManager<recording_socket> manager;
    std::vector<recording_socket> sockets(40, recording_socket{ioc.get_executor()});
    for (auto& s : sockets) s.started = std::make_shared<std::vector<std::string>>();
    std::optional<std::size_t> queued_at_first_write;
    bool changed = false;
    std::vector<wsbroadcast::ConnectionManager<recording_socket>::subscription> subs;
    sockets[0].on_start = [&] {
        if (!queued_at_first_write) queued_at_first_write = manager.queued_bytes();
        if (std::exchange(changed, true)) return;
        // The subscribers change while that first write starts: one leaves (whose slot the last
        // one takes), one joins. The first gets the message once, the one that left not at all.
        subs[5].unsubscribe();
        subs.push_back(manager.subscribe(sockets[39], "many"));
    };
    for (std::size_t i = 0; i < 39; ++i) subs.push_back(manager.subscribe(sockets[i], "many"));
    settle();

    // As the first write starts, only its own message is queued (before, all 39 outboxes were
    // filled first: 39 x 6 bytes).
    std::size_t queued = 0;
    net::post(ioc, [&] { queued = manager.send("many", "hello!").queued; });
    settle();
    REQUIRE(queued_at_first_write);
    CHECK(*queued_at_first_write == 6);
    CHECK(queued == 39);  // 38 of the first 39, and the one that joined
    for (std::size_t i = 0; i < sockets.size(); ++i) {
        CAPTURE(i);
        CHECK(*sockets[i].started == std::vector<std::string>(i == 5 ? 0 : 1, "hello!"));
    }

    // The same through send(keys) with one key, as the reference server's pushes go.
    queued_at_first_write.reset();
    net::post(ioc, [&] { queued = manager.send(std::vector<std::string>{"many"}, "twice!").queued; });
    settle();
    REQUIRE(queued_at_first_write);
    CHECK(*queued_at_first_write == 6);
    CHECK(queued == 39);

    // From a thread that does not run the connections' io_context the first write is queued
    // like the others, and each connection still gets the message once.
    manager.send("many", "again");
    settle();
    CHECK(sockets[0].started->size() == 3);
    CHECK(sockets[39].started->back() == "again");
    CHECK(sockets[5].started->empty());
}

/// An executor of an io_context whose execute() throws std::bad_alloc while *failing is set: the
/// allocation of a queued handler failing.
template <class Inner>
struct failing_executor {
    Inner inner;
    std::shared_ptr<bool> failing;

    template <class F>
    void execute(F&& f) const {
        if (*failing) throw std::bad_alloc();
        net::execution::execute(inner, std::forward<F>(f));  // Asio 1.22 keeps the member private
    }
    template <class P>
    auto query(const P& p) const noexcept -> decltype(net::query(inner, p)) {
        return net::query(inner, p);
    }
    template <class P>
    auto require(const P& p) const -> failing_executor<std::decay_t<decltype(net::require(inner, p))>> {
        return {net::require(inner, p), failing};
    }
    template <class P>
    auto prefer(const P& p) const -> failing_executor<std::decay_t<decltype(net::prefer(inner, p))>> {
        return {net::prefer(inner, p), failing};
    }
    friend bool operator==(const failing_executor& a, const failing_executor& b) noexcept {
        return a.inner == b.inner && a.failing == b.failing;
    }
    friend bool operator!=(const failing_executor& a, const failing_executor& b) noexcept { return !(a == b); }
};

TEST_CASE("a flush that cannot be handed out stops neither the others nor later flushes") {
    net::io_context ioc;
    manager_type manager;
    auto failing = std::make_shared<bool>(false);
    // 20 connections on "many", more than one chunk of the hand-out; the second one's executor
    // fails to queue anything while `failing` is set. One more connection on "other".
    std::vector<std::shared_ptr<fake_peer>> many;
    std::vector<manager_type::subscription> subs;
    for (int i = 0; i < 20; ++i) {
        net::any_io_executor ex = ioc.get_executor();
        if (i == 1) ex = failing_executor<net::io_context::executor_type>{ioc.get_executor(), failing};
        many.push_back(std::make_shared<fake_peer>(ex));
        subs.push_back(manager.subscribe(fake_socket(many.back()), "many"));
    }
    auto other = std::make_shared<fake_peer>(ioc.get_executor());
    subs.push_back(manager.subscribe(fake_socket(other), "other"));
    auto settle = [&] {
        for (int idle = 0; idle < 3;) idle = ioc.poll() == 0 ? idle + 1 : 0;
    };
    settle();

    // The second flush cannot be queued: the send says so, after handing out all the others.
    *failing = true;
    CHECK_THROWS_AS(manager.send("many", "first"), std::bad_alloc);
    *failing = false;
    settle();
    for (std::size_t i = 0; i < many.size(); ++i)
        CHECK(many[i]->received == (i == 1 ? std::vector<std::string>{} : std::vector<std::string>{"first"}));

    // Nothing is left waiting: later sends are written, the failed connection's with what it missed.
    CHECK(manager.send("other", "elsewhere").queued == 1);
    CHECK(manager.send("many", "second").queued == 20);
    settle();
    CHECK(other->received == std::vector<std::string>{"elsewhere"});
    for (std::size_t i = 0; i < many.size(); ++i)
        CHECK(many[i]->received == std::vector<std::string>{"first", "second"});
}

TEST_CASE("a flush lost with its io_context does not stop flushes for good") {
    manager_type manager;
    {
        net::io_context doomed;
        auto p = std::make_shared<fake_peer>(doomed.get_executor());
        auto s = manager.subscribe(fake_socket(p), "k");
        manager.send("k", "never written");  // posts its flush to `doomed`, which never runs it
    }
    net::io_context ioc;
    auto p = std::make_shared<fake_peer>(ioc.get_executor());
    auto s = manager.subscribe(fake_socket(p), "k");
    manager.send("k", "written");
    ioc.restart();
    for (int idle = 0; idle < 3;) idle = ioc.poll() == 0 ? idle + 1 : 0;
    CHECK(p->received == std::vector<std::string>{"written"});
}

TEST_CASE_FIXTURE(fixture, "a write error tears the socket down") {
    wsbroadcast::options opts;
    opts.on_error = [](const wsbroadcast::error_event&) {};
    manager_type manager(opts);
    auto p = peer();
    p->writes_before_failure = 0;
    p->failure = net::error::timed_out;
    net::co_spawn(ioc, manager.serve(fake_socket(p), "k"), [](std::exception_ptr, error_code) {});
    settle();
    manager.send("k", "x");
    settle();
    CHECK(p->aborted);
    CHECK(manager.size() == 0);
}

TEST_CASE("a close reason is cut to 123 bytes at a UTF-8 boundary") {
    using wsbroadcast::detail::truncate_utf8;
    const std::string euro = "\xE2\x82\xAC";  // three bytes
    std::string reason;
    for (int i = 0; i < 41; ++i) reason += euro;  // 123 bytes: fits
    CHECK(truncate_utf8(reason, 123) == reason);
    reason = "a" + reason;  // 124 bytes: the last euro would be cut in half
    CHECK(truncate_utf8(reason, 123).size() == 121);
    CHECK(truncate_utf8("plain", 3) == "pla");
}

TEST_CASE_FIXTURE(fixture, "liveness without ping waits the whole idle period before tearing down") {
    wsbroadcast::options opts;
    opts.idle_timeout = 400ms;  // the fake socket cannot ping
    manager_type manager(opts);
    auto p = peer();
    net::co_spawn(ioc, manager.serve(fake_socket(p), "k"), [](std::exception_ptr, error_code) {});
    const auto start = std::chrono::steady_clock::now();
    ioc.run_for(300ms);
    CHECK_FALSE(p->aborted);  // torn down at half the period before the fix
    ioc.restart();
    ioc.run_for(700ms);
    CHECK(p->aborted);
    CHECK(std::chrono::steady_clock::now() - start >= 400ms);
    settle();
    CHECK(manager.size() == 0);
}

TEST_CASE_FIXTURE(fixture, "liveness: a peer that talks but never reads is torn down once a write makes no progress") {
    wsbroadcast::options opts;
    opts.idle_timeout = 200ms;  // the fake cannot ping: checks a whole period apart
    opts.outbox.on_overflow = wsbroadcast::overflow_policy::drop_newest;  // the outbox alone never closes it
    manager_type manager(opts);
    endpoint_result talk_result, reader_result;
    auto talker = start_serve(*this, manager, "k", talk_result);
    auto reader = start_serve(*this, manager, "k", reader_result);
    ioc.restart();
    talker->stalled = true;         // takes no byte from now on, but keeps sending
    for (int i = 0; i < 20; ++i) {  // about 1 s: five idle periods
        talker->client_send("still here");
        reader->client_send("still here");
        manager.send("k", "tick " + std::to_string(i));
        ioc.run_for(50ms);
    }
    CHECK(talker->aborted);  // heard from all along: only its stuck write gives it away
    CHECK(talk_result.ended.has_value());
    CHECK_FALSE(reader->aborted);
    REQUIRE_FALSE(reader->received.empty());
    CHECK(reader->received.back() == "tick 19");  // the reader missed nothing at the end
    CHECK(manager.count("k") == 1);
    manager.close_all();
    settle();
}

// ---- history and resume -------------------------------------------------------------------

namespace {

using wsbroadcast::position;
using wsbroadcast::recovery;
using wsbroadcast::since;

// Envelopes a test can read: "key@offset:data" for messages, "sub key @offset outcome n" for the
// start of a subscription (its position, how it started, how many messages are replayed).
wsbroadcast::options<> with_history(std::size_t max_messages) {
    wsbroadcast::options opts;
    opts.history.max_messages = max_messages;
    opts.envelope.wrap = [](const std::string& key, const wsbroadcast::message& m, const std::optional<position>& at) {
        return wsbroadcast::message::text(key + "@" + (at ? std::to_string(at->offset) : "-") + ":" +
                                          std::string(m.data()));
    };
    opts.envelope.subscribed = [](const std::string& key, const wsbroadcast::subscribed_info& info) {
        return wsbroadcast::message::text(
            "sub " + key + " @" + (info.position ? std::to_string(info.position->offset) : "-") + " " +
            std::string(wsbroadcast::describe(info.outcome)) + " " + std::to_string(info.replayed));
    };
    return opts;
}

const wsbroadcast::connection_options enveloped{.envelopes = true};

// Sends "m1".."mN" to `key` and returns the position of each.
std::vector<position> send_numbered(manager_type& manager, const std::string& key, int from, int to) {
    std::vector<position> out;
    for (int i = from; i <= to; ++i) {
        auto r = manager.send(key, "m" + std::to_string(i));
        REQUIRE(r.positions.size() == 1);
        out.push_back(r.positions[0]);
    }
    return out;
}

}  // namespace

TEST_CASE("positions print as opaque text and parse back; anything else is refused") {
    const position p{0xfedcba9876543210u, 42};
    CHECK(p.to_string() == "fedcba9876543210.42");
    CHECK(position::parse(p.to_string()) == p);
    CHECK(position::parse("1.0") == position{1, 0});
    for (const char* bad : {"", ".", "1.", ".1", "1", "x.1", "1.x", "1.1.1", "1.-1", "-1.1", "1.+1", "+1.1", " 1.1",
                            "1.1 ", "10000000000000000.1", "1.18446744073709551616"})
        CHECK_MESSAGE(!position::parse(bad), bad);
}

TEST_CASE_FIXTURE(fixture, "with history, each key's messages get consecutive offsets in one epoch per key") {
    manager_type manager(with_history(8));
    const auto a = send_numbered(manager, "a", 1, 3);
    const auto b = send_numbered(manager, "b", 1, 1);
    CHECK(a[0].offset == 1);
    CHECK(a[1] == position{a[0].epoch, 2});
    CHECK(a[2] == position{a[0].epoch, 3});
    CHECK(b[0].offset == 1);  // a stream of its own
    CHECK(b[0].epoch != a[0].epoch);
    CHECK(manager.history_keys() == 2);

    // A multi-key send gets a position in each key, in the order named; a key named twice, one.
    const auto r = manager.send(std::vector<std::string>{"b", "a", "b"}, "both");
    CHECK(r.positions == std::vector<position>{{b[0].epoch, 2}, {a[0].epoch, 4}, {b[0].epoch, 2}});

    // publish() without a relay answers them in one place: publish_result::positions.
    const auto p = manager.publish(std::string("a"), "published");
    CHECK(p.positions == std::vector<position>{{a[0].epoch, 5}});
    CHECK(p.local.positions.empty());
    CHECK(p.local.queued == 0);  // nobody is subscribed: it is kept all the same

    // Without history nothing has a position.
    manager_type plain;
    auto s = plain.subscribe(fake_socket(peer()), "a");
    CHECK(plain.send("a", "x").positions.empty());
    CHECK(plain.history_keys() == 0);
    settle();
}

TEST_CASE_FIXTURE(fixture, "a client that resumes after a position gets exactly what came after it, then live ones") {
    manager_type manager(with_history(16));
    auto first = peer();
    auto s1 = manager.subscribe(fake_socket(first), "k", enveloped);
    const auto given = send_numbered(manager, "k", 1, 2);
    settle();
    CHECK(first->received == std::vector<std::string>{"sub k @0 live 0", "k@1:m1", "k@2:m2"});

    s1.unsubscribe();  // the client's Wi-Fi drops: it was the key's only subscriber
    CHECK_FALSE(manager.has("k"));
    send_numbered(manager, "k", 3, 5);  // kept while nobody listens

    auto back = peer();
    auto s2 = manager.subscribe(fake_socket(back), wsbroadcast::initial_keys<std::string>("k", since::after(given[1])),
                                enveloped);
    send_numbered(manager, "k", 6, 6);
    settle();
    CHECK(back->received == std::vector<std::string>{"sub k @5 recovered 3", "k@3:m3", "k@4:m4", "k@5:m5", "k@6:m6"});
    CHECK(manager.stats().recovered == 1);
    CHECK(manager.stats().replayed == 3);

    // Resuming from the newest position replays nothing and is recovered; so is a runtime subscribe.
    auto third = peer();
    auto s3 = manager.subscribe(fake_socket(third), std::vector<std::string>{}, enveloped);
    CHECK_FALSE(s3.handle().subscribe("k", since::after({given[0].epoch, 6})));
    CHECK_FALSE(s3.handle().subscribe("k", since::after(given[0])));  // already subscribed: changes nothing
    settle();
    CHECK(third->received == std::vector<std::string>{"sub k @6 recovered 0"});
    CHECK(manager.stats().recovered == 2);
}

TEST_CASE_FIXTURE(fixture, "a resume that cannot be served is told why, and gets no replay, on every cause") {
    auto opts = with_history(3);
    opts.outbox.max_messages = 5;
    manager_type manager(opts);
    const auto kept = send_numbered(manager, "k", 1, 6);  // keeps 4, 5, 6
    const auto epoch = kept[0].epoch;
    send_numbered(manager, "big", 1, 3);

    auto p = peer();
    auto s = manager.subscribe(fake_socket(p), std::vector<std::string>{}, enveloped);
    auto h = s.handle();
    auto start = [&](const std::string& key, since from) {
        h.unsubscribe(key);
        CHECK_FALSE(h.subscribe(key, from));
        settle();  // written before the next: its outbox holds 5
    };
    start("k", since::after({epoch, 3}));      // 4, 5, 6 are kept: recovered
    start("k", since::after({epoch, 2}));      // 3 is gone
    start("k", since::after({epoch ^ 2, 5}));  // another epoch
    start("k", since::after({epoch, 7}));      // never given
    start("nothing-yet", since::latest());     // no message kept
    start("k", since::latest());               // the latest: 6
    settle();
    CHECK(p->received == std::vector<std::string>{"sub k @6 recovered 3", "k@4:m4", "k@5:m5", "k@6:m6",
                                                  "sub k @6 messages after this position are no longer kept 0",
                                                  "sub k @6 the history of this key restarted 0",
                                                  "sub k @6 unknown position 0", "sub nothing-yet @0 no message kept 0",
                                                  "sub k @6 recovered 1", "k@6:m6"});

    // What it missed does not fit its outbox (5 messages; the client is not reading yet).
    auto slow = peer();
    slow->stalled = true;
    auto busy = manager.subscribe(fake_socket(slow), std::vector<std::string>{"k", "k2", "k3"}, enveloped);
    settle();  // the first subscribed frame is being written, two wait: three more messages fit, not four
    const auto big = manager.send("big", "m4").positions[0];  // "big" keeps 2, 3, 4
    CHECK_FALSE(busy.handle().subscribe("big", since::after({big.epoch, 1})));
    slow->unstall();
    settle();
    CHECK(slow->received.back() == "sub big @4 too many messages missed to replay 0");

    // History off: a resume is told so.
    auto plain_opts = with_history(0);
    manager_type plain(plain_opts);
    auto q = peer();
    auto t = plain.subscribe(fake_socket(q), wsbroadcast::initial_keys<std::string>("k", since::after({epoch, 1})),
                             enveloped);
    settle();
    CHECK(q->received == std::vector<std::string>{"sub k @- history is off 0"});
    CHECK(plain.stats().not_recovered == 1);
    CHECK(manager.stats().not_recovered == 5);
    CHECK(manager.stats().recovered == 2);
}

TEST_CASE_FIXTURE(fixture, "history is bounded per key by count and bytes, in all by bytes and keys, and by age") {
    SUBCASE("count and bytes per key; a key keeps its newest message") {
        auto opts = with_history(4);
        opts.history.max_bytes = 3 * (100 + 100);  // about three 100-byte messages with their bookkeeping
        manager_type manager(opts);
        const auto epoch = manager.send("k", std::string(100, 'a')).positions[0].epoch;
        for (int i = 0; i < 5; ++i) manager.send("k", std::string(100, 'a'));
        const auto one = manager.history_bytes();
        manager.send("k", std::string(5000, 'b'));  // larger than the key's bound: kept alone
        CHECK(manager.history_bytes() > 5000);
        CHECK(one < 5000);
        auto p = peer();
        auto s = manager.subscribe(fake_socket(p),
                                   wsbroadcast::initial_keys<std::string>("k", since::after({epoch, 6})), enveloped);
        settle();
        REQUIRE(p->received.size() == 2);
        CHECK(p->received[0] == "sub k @7 recovered 1");
        auto t = manager.subscribe(fake_socket(peer()),
                                   wsbroadcast::initial_keys<std::string>("k", since::after({epoch, 5})), enveloped);
        CHECK(manager.stats().not_recovered == 1);
        settle();
    }
    SUBCASE("total bytes: the keys sent to least recently lose their messages, not their position") {
        auto opts = with_history(100);
        opts.history.max_total_bytes = 4000;
        manager_type manager(opts);
        const auto old = manager.send("old", std::string(1000, 'o')).positions[0];
        for (int i = 0; i < 3; ++i) manager.send("new", std::string(1000, 'n'));
        CHECK(manager.history_bytes() <= 4000);
        CHECK(manager.history_keys() == 2);
        auto p = peer();
        auto s = manager.subscribe(fake_socket(p), wsbroadcast::initial_keys<std::string>("old", since::latest()),
                                   enveloped);
        auto q = peer();
        auto t = manager.subscribe(fake_socket(q), wsbroadcast::initial_keys<std::string>("old", since::after(old)),
                                   enveloped);
        settle();
        CHECK(p->received.front() == "sub old @1 no message kept 0");
        CHECK(q->received == std::vector<std::string>{"sub old @1 recovered 0"});  // it had everything
    }
    SUBCASE("keys beyond max_keys and keys unused past position_ttl are forgotten: a new epoch") {
        auto opts = with_history(10);
        opts.history.max_keys = 2;
        manager_type manager(opts);
        const auto a = manager.send("a", "1").positions[0];
        manager.send("b", "1");
        manager.send("c", "1");  // "a" is the least recently used
        CHECK(manager.history_keys() == 2);
        const auto a2 = manager.send("a", "2").positions[0];
        CHECK(a2.epoch != a.epoch);
        CHECK(a2.offset == 1);
        auto p = peer();
        auto s =
            manager.subscribe(fake_socket(p), wsbroadcast::initial_keys<std::string>("a", since::after(a)), enveloped);
        settle();
        CHECK(p->received == std::vector<std::string>{"sub a @1 the history of this key restarted 0"});
        // Subscribing gives a key a position too, within the same bound.
        auto q = manager.subscribe(fake_socket(peer()), std::vector<std::string>{"x", "y", "z"});
        CHECK(manager.history_keys() == 2);
        settle();
    }
    SUBCASE("age") {
        auto opts = with_history(10);
        opts.history.ttl = 1ms;
        opts.history.position_ttl = 1h;
        manager_type manager(opts);
        const auto at = manager.send("k", "old").positions[0];
        std::this_thread::sleep_for(20ms);  // well past the ttl: a lower bound, never a race
        auto p = peer();
        auto s = manager.subscribe(fake_socket(p),
                                   wsbroadcast::initial_keys<std::string>("k", since::after({at.epoch, 0})), enveloped);
        settle();
        CHECK(p->received == std::vector<std::string>{"sub k @1 messages after this position are no longer kept 0"});
        CHECK(manager.history_bytes() == 0);
        manager.send("other", "x");
        const auto one = manager.history_bytes();
        std::this_thread::sleep_for(20ms);
        manager.send("third", "x");  // a send trims every key's expired messages, not only its own
        CHECK(manager.history_bytes() == one);
        CHECK(manager.history_keys() == 3);  // positions stay: position_ttl is an hour
        opts.history.position_ttl = 1ms;
        manager_type forgetful(opts);
        forgetful.send("k", "x");
        std::this_thread::sleep_for(20ms);
        forgetful.send("j", "x");
        CHECK(forgetful.history_keys() == 1);
    }
}

TEST_CASE("read_history reads what a resume would get, without subscribing") {
    manager_type manager(with_history(3));
    const auto at = send_numbered(manager, "k", 1, 4);  // keeps 2, 3, 4
    std::vector<std::string> got;
    auto read = [&](since from) {
        got.clear();
        return manager.read_history("k", from, [&](const wsbroadcast::message& m, const position& p) {
            got.push_back(std::string(m.data()) + "@" + std::to_string(p.offset));
        });
    };
    auto info = read(since::after(at[1]));
    CHECK(info.outcome == recovery::recovered);
    CHECK(info.position == at[3]);
    CHECK(info.replayed == 2);
    CHECK(got == std::vector<std::string>{"m3@3", "m4@4"});
    CHECK(read(since::after(at[0])).replayed == 3);                            // after 1: all three kept
    CHECK(read(since::after({at[0].epoch, 0})).outcome == recovery::trimmed);  // 1 is gone
    CHECK(got.empty());
    CHECK(read(since::latest()).replayed == 1);
    CHECK(got == std::vector<std::string>{"m4@4"});
    CHECK(read(since::now()).position == at[3]);
    CHECK(manager.size() == 0);
    manager_type off;
    CHECK(off.read_history("k", since::latest(), [](auto&&...) {}).outcome == recovery::no_history);
}

TEST_CASE_FIXTURE(fixture, "since::latest gives a new subscriber the key's latest message; plain peers get it bare") {
    manager_type manager(with_history(4));
    send_numbered(manager, "invoice", 1, 2);
    auto plain = peer(), v1 = peer();
    auto s1 = manager.subscribe(fake_socket(plain), wsbroadcast::initial_keys<std::string>("invoice", since::latest()));
    auto s2 = manager.subscribe(fake_socket(v1), wsbroadcast::initial_keys<std::string>("invoice", since::latest()),
                                enveloped);
    settle();
    CHECK(plain->received == std::vector<std::string>{"m2"});
    CHECK(v1->received == std::vector<std::string>{"sub invoice @2 recovered 1", "invoice@2:m2"});
}

TEST_CASE_FIXTURE(fixture,
                  "with history, an envelope connection that overflows is closed to resume, whatever its policy") {
    auto opts = with_history(64);
    opts.outbox = {.max_bytes = 1 << 20, .max_messages = 4, .on_overflow = wsbroadcast::overflow_policy::drop_newest};
    manager_type manager(opts);
    auto v1 = peer(), plain = peer();
    v1->stalled = plain->stalled = true;
    auto s1 = manager.subscribe(fake_socket(v1), "k", enveloped);
    auto s2 = manager.subscribe(fake_socket(plain), "k");
    // Nothing is written before the sends: a write in flight would be torn down instead of closed.
    for (int i = 0; i < 8; ++i) manager.send("k", "m" + std::to_string(i));
    v1->unstall();
    plain->unstall();
    settle();
    CHECK(v1->close_code == 1008);
    CHECK(v1->close_reason == "outbox full: resume from the last position");
    CHECK(plain->received == numbered(4));  // plain peers keep their policy
    CHECK_FALSE(plain->server_closed);
}

TEST_CASE_FIXTURE(fixture, "accept_and_serve resumes too: the replay comes before what is sent during the handshake") {
    manager_type manager(with_history(8));
    const auto given = send_numbered(manager, "k", 1, 3);
    auto p = peer();
    p->on_accept = [&] { manager.send("k", "during"); };
    net::co_spawn(
        ioc,
        manager.accept_and_serve(fake_socket(p), std::string("GET /ws"),
                                 wsbroadcast::initial_keys<std::string>("k", since::after(given[0])), enveloped),
        [](std::exception_ptr, error_code) {});
    settle();
    CHECK(p->received == std::vector<std::string>{"sub k @3 recovered 2", "k@2:m2", "k@3:m3", "k@4:during"});
    p->client_close();
    settle();
}

TEST_CASE("resumes race with sends from several threads: every client sees one contiguous run, no gap, no repeat") {
    net::io_context ioc;
    auto opts = with_history(100'000);
    opts.outbox.max_messages = 1 << 20;
    opts.outbox.max_bytes = 1 << 26;
    opts.history.max_total_bytes = 0;
    manager_type manager(opts);
    constexpr int senders = 4, per_sender = 400;
    const auto epoch = manager.send("k", "first").positions[0].epoch;

    std::vector<std::shared_ptr<fake_peer>> peers;
    std::vector<manager_type::subscription> subs;
    std::vector<std::uint64_t> resumed_after;
    std::atomic<bool> go{false};
    std::vector<std::thread> threads;
    for (int t = 0; t < senders; ++t)
        threads.emplace_back([&, t] {
            while (!go) std::this_thread::yield();
            for (int i = 0; i < per_sender; ++i) manager.send("k", std::to_string(t) + ":" + std::to_string(i));
        });
    go = true;
    std::mt19937 random(7);
    for (int i = 0; i < 40; ++i) {  // resume from positions that are being given out right now
        const auto top = manager.send("k", "probe").positions[0].offset;
        const auto from = top - random() % std::min<std::uint64_t>(top, 50);
        peers.push_back(std::make_shared<fake_peer>(ioc.get_executor()));
        subs.push_back(manager.subscribe(fake_socket(peers.back()),
                                         wsbroadcast::initial_keys<std::string>("k", since::after({epoch, from})),
                                         enveloped));
        resumed_after.push_back(from);
    }
    for (auto& t : threads) t.join();
    ioc.restart();
    for (int idle = 0; idle < 3;) idle = ioc.poll() == 0 ? idle + 1 : 0;

    const auto top = manager.send("k", "last").positions[0].offset - 1;
    for (std::size_t i = 0; i < peers.size(); ++i) {
        const auto& got = peers[i]->received;
        REQUIRE(got.size() >= 1);
        CHECK(got[0].rfind("sub k @", 0) == 0);
        CHECK(got[0].find(" recovered ") != std::string::npos);
        std::uint64_t expect = resumed_after[i] + 1;
        bool contiguous = true;
        std::vector<std::string> from_senders;
        for (std::size_t j = 1; j < got.size(); ++j) {
            const auto at = got[j].find('@'), colon = got[j].find(':');
            contiguous = contiguous && std::stoull(got[j].substr(at + 1, colon - at - 1)) == expect++;
            if (got[j].find("probe") == std::string::npos && got[j].find("first") == std::string::npos)
                from_senders.push_back(got[j].substr(colon + 1));
        }
        CHECK(contiguous);
        CHECK(expect == top + 1);         // up to the last message sent while it was subscribed
        std::map<std::string, int> last;  // each sender's numbers only go up
        bool ordered = true;
        for (auto& m : from_senders) {
            const auto colon = m.find(':');
            auto [it, fresh] = last.try_emplace(m.substr(0, colon), -1);
            ordered = ordered && std::stoi(m.substr(colon + 1)) > it->second;
            it->second = std::stoi(m.substr(colon + 1));
        }
        CHECK(ordered);
    }
    subs.clear();
    ioc.restart();
    for (int idle = 0; idle < 3;) idle = ioc.poll() == 0 ? idle + 1 : 0;
}

// ---- history kept by the broker: positions from the relay -------------------------------------

namespace {

struct stream_relay;

// Stands in for Redis with history: one stream per key (its epoch, its messages), positions
// assigned here, and the relays of several managers listening.
struct stream_broker {
    struct stream {
        std::uint64_t epoch = 0;
        std::vector<wsbroadcast::message> kept;  // offsets 1..size
    };
    std::map<std::string, stream> streams;
    std::map<std::string, std::vector<stream_relay*>> listeners;
    std::uint64_t next_epoch = 0x100;

    stream& of(const std::string& key) {
        auto& s = streams[key];
        if (!s.epoch) s.epoch = next_epoch++;
        return s;
    }
    position top(const std::string& key) {
        auto& s = of(key);
        return {s.epoch, s.kept.size()};
    }
};

struct stream_relay : wsbroadcast::relay<std::string> {
    stream_broker& broker;
    manager_type* manager = nullptr;
    bool available = true;
    std::vector<std::string> prepared, released;

    explicit stream_relay(stream_broker& b) : broker(b) {}

    bool positions() const override { return true; }
    void interest(const std::string& key, bool needed) override {
        auto& l = broker.listeners[key];
        if (needed)
            l.push_back(this);
        else
            l.erase(std::find(l.begin(), l.end(), this));
    }
    error_code publish(std::span<const std::string>, const wsbroadcast::message&) override {
        FAIL("with positions, publish_positioned is used");
        return {};
    }
    // The broker's side of a prepare: this instance's history of the key becomes the broker's.
    void prepare(std::span<const std::string> keys, std::function<void(error_code)> done) override {
        if (!available) return done(wsbroadcast::error::relay_unavailable);
        for (const auto& key : keys) {
            prepared.push_back(key);
            auto& s = broker.of(key);
            manager->adopt_position(key, position{s.epoch, 0});
            for (std::size_t i = 0; i < s.kept.size(); ++i) manager->deliver(key, s.kept[i], {s.epoch, i + 1});
        }
        done({});
    }
    void release(std::span<const std::string> keys) override {
        for (const auto& key : keys) released.push_back(key);
    }
    void publish_positioned(std::span<const std::string> keys, const wsbroadcast::message& m,
                            std::function<void(error_code, std::vector<position>)> done) override {
        if (!available) return done(wsbroadcast::error::relay_unavailable, {});
        std::vector<position> at;
        for (const auto& key : keys) {
            auto& s = broker.of(key);
            s.kept.push_back(m);
            at.push_back({s.epoch, s.kept.size()});
            for (auto* r : broker.listeners[key]) r->manager->deliver(key, m, at.back());
        }
        done({}, at);
    }
};

struct instance {
    std::shared_ptr<stream_relay> relay;
    manager_type manager;
    instance(stream_broker& b, std::size_t history)
        : relay(std::make_shared<stream_relay>(b)), manager([&] {
              auto o = with_history(history);
              o.relay = relay;
              return o;
          }()) {
        relay->manager = &manager;
    }
};

}  // namespace

TEST_CASE_FIXTURE(fixture,
                  "with a relay that positions messages, the broker's positions are the history's, on every instance") {
    stream_broker broker;
    instance one(broker, 8), two(broker, 8);
    auto first = peer();
    net::co_spawn(ioc, one.manager.serve(fake_socket(first), "k", enveloped), [](std::exception_ptr, error_code) {});
    settle();
    CHECK(one.relay->prepared == std::vector<std::string>{"k"});
    CHECK(one.relay->released == std::vector<std::string>{"k"});  // registered by then: its interest holds the key
    CHECK(first->received == std::vector<std::string>{"sub k @0 live 0"});

    std::optional<wsbroadcast::publish_result> answer;
    two.manager.async_publish(std::string("k"), wsbroadcast::message::text("m1"),
                              net::bind_executor(ioc, [&](wsbroadcast::publish_result r) { answer = std::move(r); }));
    CHECK_FALSE(answer);  // completed on the executor, never inside the call
    settle();
    REQUIRE(answer);
    CHECK_FALSE(answer->error);
    CHECK(answer->positions == std::vector<position>{broker.top("k")});
    CHECK(first->received.back() == "k@1:m1");
    CHECK(one.manager.send("k", "here only").positions.empty());  // send() positions nothing of its own

    first->client_close();  // gone: two more come while nobody listens anywhere
    settle();
    for (const char* data : {"m2", "m3"})
        two.manager.async_publish(std::string("k"), wsbroadcast::message::text(data),
                                  [](wsbroadcast::publish_result) {});
    settle();

    // It comes back on the other instance, which never had a subscriber of "k": it resumes there.
    auto back = peer();
    net::co_spawn(
        ioc,
        two.manager.serve(fake_socket(back),
                          wsbroadcast::initial_keys<std::string>("k", since::after(answer->positions[0])), enveloped),
        [](std::exception_ptr, error_code) {});
    settle();
    CHECK(back->received == std::vector<std::string>{"sub k @3 recovered 2", "k@2:m2", "k@3:m3"});
    back->client_close();
    settle();
}

TEST_CASE_FIXTURE(
    fixture, "a break in the broker's stream closes the envelope connections so they resume; plain ones carry on") {
    stream_broker broker;
    instance one(broker, 8);
    auto plain = peer(), resumable = peer();
    auto s1 = one.manager.subscribe(fake_socket(plain), "k");
    auto s2 = one.manager.subscribe(fake_socket(resumable), "k", enveloped);
    const auto m = [](const char* t) { return wsbroadcast::message::text(t); };
    CHECK(one.manager.deliver("k", m("1"), {7, 1}).queued == 2);
    CHECK(one.manager.deliver("k", m("1"), {7, 1}).queued == 0);  // a copy: dropped
    CHECK(one.manager.deliver("k", m("3"), {7, 3}).queued == 1);  // 2 never came
    settle();
    CHECK(plain->received == std::vector<std::string>{"1", "3"});
    // It had no position before the broker's first message; it got 1, then its close instead of 3.
    CHECK(resumable->received == std::vector<std::string>{"sub k @- live 0", "k@1:1"});
    CHECK(resumable->close_code == 1013);
    CHECK(resumable->close_reason == "missed messages: resume from the last position");

    // What the instance keeps restarted at 3: a resume from 1 is told so; from 3 it is recovered.
    std::size_t read = 0;
    CHECK(one.manager.read_history("k", since::after({7, 1}), [&](auto&&...) { ++read; }).outcome == recovery::trimmed);
    CHECK(one.manager.read_history("k", since::after({7, 3}), [&](auto&&...) { ++read; }).outcome ==
          recovery::recovered);
    CHECK(read == 0);

    // The broker's epoch changed (Redis restarted): the same, through adopt_position.
    auto again = peer();
    auto s3 = one.manager.subscribe(fake_socket(again), "k", enveloped);
    CHECK_FALSE(one.manager.adopt_position("k", {7, 3}));  // nothing new
    CHECK(one.manager.adopt_position("k", {9, 0}));
    settle();
    CHECK(again->close_code == 1013);
    CHECK(one.manager.read_history("k", since::after({7, 3}), [](auto&&...) {}).outcome == recovery::epoch_changed);
    CHECK(one.manager.deliver("k", m("new"), {9, 1}).queued == 1);  // the plain one
    settle();
    CHECK(plain->received.back() == "new");
}

TEST_CASE_FIXTURE(
    fixture,
    "a relay that cannot prepare the keys gets the connection refused with 1013; async_subscribe waits for it") {
    stream_broker broker;
    instance one(broker, 8);
    one.relay->available = false;
    auto p = peer();
    std::optional<error_code> ended;
    net::co_spawn(ioc, one.manager.serve(fake_socket(p), "k", enveloped),
                  [&](std::exception_ptr, error_code ec) { ended = ec; });
    settle();
    REQUIRE(ended);
    CHECK(*ended == wsbroadcast::error::relay_unavailable);
    CHECK(p->close_code == 1013);
    CHECK(one.manager.size() == 0);
    CHECK(one.manager.stats().refused == 1);

    auto q = peer();
    auto s = one.manager.subscribe(fake_socket(q), std::vector<std::string>{}, enveloped);
    std::optional<error_code> subscribed;
    s.handle().async_subscribe("k", since::latest(), net::bind_executor(ioc, [&](error_code ec) { subscribed = ec; }));
    CHECK_FALSE(subscribed);
    settle();
    CHECK(subscribed == error_code(wsbroadcast::error::relay_unavailable));
    CHECK(s.keys().empty());

    one.relay->available = true;
    one.relay->publish_positioned(std::vector<std::string>{"k"}, wsbroadcast::message::text("kept"),
                                  [](error_code, std::vector<position>) {});
    subscribed.reset();
    s.handle().async_subscribe("k", since::latest(), [&](error_code ec) { subscribed = ec; });
    settle();
    CHECK(subscribed == error_code());
    CHECK(q->received == std::vector<std::string>{"sub k @1 recovered 1", "k@1:kept"});
    // Let go of after every prepare, refused or not: the connection, the two subscribes.
    CHECK(one.relay->released == std::vector<std::string>{"k", "k", "k"});
}
