// libFuzzer target: the library's public operations in random order against the fake socket:
// subscribe, unsubscribe, send, broadcast, close_all, client messages and closes, stalled and
// failing writes, serve() endpoints, runtime key changes through handles, multi-key sends,
// envelopes, closing a key, and running the event loop in between. Built with ASan and
// UBSan, it looks for crashes, leaks and undefined behaviour; it also checks the bookkeeping.
#include "fake_socket.hpp"

#include <cstddef>
#include <cstdint>
#include <chrono>
#include <memory>
#include <optional>
#include <vector>

namespace net = wsbroadcast::net;
using test::fake_peer;
using test::fake_socket;
using manager_type = wsbroadcast::ConnectionManager<fake_socket>;

namespace {
void require(bool ok) {
    if (!ok) __builtin_trap();
}

struct input {
    const std::uint8_t* data;
    std::size_t size;
    std::uint8_t next() {
        if (size == 0) return 0;
        --size;
        return *data++;
    }
};
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    input in{data, size};
    wsbroadcast::options opts;
    opts.outbox.max_messages = 1 + in.next() % 8;  // small limits, so overflows happen
    opts.outbox.max_bytes = 16 + in.next() * 4u;
    opts.outbox.on_overflow = static_cast<wsbroadcast::overflow_policy>(in.next() % 3);
    opts.max_connections = in.next() % 12;
    opts.max_connections_per_key = in.next() % 5;
    opts.max_message_bytes = 1 + in.next() % 32;
    opts.max_keys_per_connection = in.next() % 4;
    opts.envelope.wrap = [](const std::string& k, const wsbroadcast::message& m,
                            const std::optional<wsbroadcast::position>& at) {
        return wsbroadcast::message::text(k + (at ? at->to_string() : "") + std::string(m.data()));
    };
    opts.envelope.subscribed = [](const std::string& k, const wsbroadcast::subscribed_info& info) {
        return wsbroadcast::message::text("+" + k + std::string(wsbroadcast::describe(info.outcome)));
    };
    // Small history bounds, often off, so that trimming by count, bytes, keys and age all happen.
    opts.history.max_messages = in.next() % 5;
    opts.history.max_bytes = in.next() * 2u;
    opts.history.max_total_bytes = in.next() * 8u;
    opts.history.max_keys = in.next() % 4;
    opts.history.ttl = std::chrono::microseconds(in.next() % 2 ? 0 : 200);
    opts.on_error = [](const wsbroadcast::error_event&) {};
    manager_type manager(opts);  // before the io_context: it outlives the connections
    {
        net::io_context ioc;
        std::vector<std::shared_ptr<fake_peer>> peers;
        std::vector<manager_type::subscription> subs;
        std::vector<wsbroadcast::position> positions;  // given by sends
        auto key = [&] { return std::string("k") + static_cast<char>('0' + in.next() % 4); };
        auto some_peer = [&]() -> fake_peer* {
            return peers.empty() ? nullptr : peers[in.next() % peers.size()].get();
        };

        for (int step = 0; step < 200 && in.size > 0; ++step) {
            switch (in.next() % 16) {
            case 0: {
                peers.push_back(std::make_shared<fake_peer>(ioc.get_executor()));
                wsbroadcast::connection_options o{opts.outbox};
                o.envelopes = in.next() % 2;
                try {
                    subs.push_back(manager.subscribe(fake_socket(peers.back()), std::vector{key(), key()}, o));
                } catch (const std::system_error&) {  // over a limit: refused, as documented
                }
                break;
            }
            case 1:
                peers.push_back(std::make_shared<fake_peer>(ioc.get_executor()));
                net::co_spawn(ioc, manager.serve(fake_socket(peers.back()), key()),
                              [](std::exception_ptr, wsbroadcast::error_code) {});
                break;
            case 2:
                if (!subs.empty()) subs[in.next() % subs.size()].unsubscribe();
                break;
            case 3: {
                const auto r = manager.send(key(), std::string(in.next() % 40, 'x'));
                require(r.positions.size() == (opts.history.max_messages ? 1u : 0u));
                positions.insert(positions.end(), r.positions.begin(), r.positions.end());
                // Counted in connections: each registered one is queued to or closed, at most once;
                // under drop_oldest one may be both queued to and have dropped older messages.
                require(r.queued + r.closed <= manager.size() && r.dropped <= manager.size());
                break;
            }
            case 4:
                manager.broadcast(in.next() % 2 ? wsbroadcast::message::binary("b") : wsbroadcast::message::text("t"));
                break;
            case 5:
                if (auto* p = some_peer()) p->client_send(std::string(in.next() % 40, 'c'));
                break;
            case 6:
                if (auto* p = some_peer()) p->client_close();
                break;
            case 7:
                if (auto* p = some_peer()) p->stalled = true;
                break;
            case 8:
                if (auto* p = some_peer()) p->unstall();
                break;
            case 9:
                if (auto* p = some_peer()) p->writes_before_failure = in.next() % 3;
                break;
            case 10:
                if (in.next() % 8 == 0) manager.close_all();
                break;
            case 11: {
                // Resume from a position it may or may not have been given, or from the latest.
                const auto how = in.next() % 3;
                const wsbroadcast::position p{positions.empty() ? 1 : positions[in.next() % positions.size()].epoch,
                                              in.next() % 8u};
                const auto from = how == 0   ? wsbroadcast::since::now()
                                  : how == 1 ? wsbroadcast::since::after(p)
                                             : wsbroadcast::since::latest();
                if (!subs.empty()) (void)subs[in.next() % subs.size()].handle().subscribe(key(), from);
                break;
            }
            case 12:
                if (!subs.empty()) subs[in.next() % subs.size()].handle().unsubscribe(key());
                break;
            case 13: {
                const auto r = manager.send(std::vector{key(), key(), key()}, std::string(in.next() % 40, 'y'));
                require(r.queued + r.closed <= manager.size() && r.dropped <= manager.size());  // once each
                break;
            }
            case 14: require(manager.close(key(), 4000) <= manager.size()); break;
            default:
                ioc.restart();
                ioc.poll();
                break;
            }
            require(manager.size() <= (opts.max_connections ? opts.max_connections : manager.size()));
            if (opts.history.max_keys) require(manager.history_keys() <= opts.history.max_keys);
            // The total bound holds after every send, even against a key's newest message.
            if (opts.history.max_total_bytes) require(manager.history_bytes() <= opts.history.max_total_bytes);
        }
        subs.clear();
        for (auto& p : peers) p->client_close();
        ioc.restart();
        for (int idle = 0; idle < 3;) idle = ioc.poll() == 0 ? idle + 1 : 0;
        // Stalled writers may still hold registrations; destroying the io_context ends them.
    }
    require(manager.size() == 0);  // every way out unregistered
    return 0;
}
