// A wsbroadcast::relay over Redis pub/sub, for running several server instances over one keyspace.
// hiredis (Debian's libhiredis-dev) speaks the protocol; the server's own io_context drives it
// through the small adapter below, so the relay needs no thread of its own.
//
// Two Redis connections: a subscriber (a connection in subscribe mode may not PUBLISH) and a
// publisher. The subscriber follows the manager's interest: SUBSCRIBE on a key's first local
// connection, UNSUBSCRIBE on its last, so Redis sends a key's traffic only to the instances that
// need it. A connection lost is retried with backoff; on success every key still needed is
// subscribed again. While Redis is away publish() fails at once, and the server answers 503.
// A Redis that keeps its connections but stops answering (stopped, swapped out, a dead peer behind
// a NAT that still says yes) is noticed by a PING on the publisher with a deadline; a command Redis
// refuses (an ACL without SUBSCRIBE, or without the channel) fails the relay the same way, by name.
// A push is one PUBLISH on each of its keys' channels; relay_wire.hpp has the payload's format, and
// how an instance subscribed to several of those channels delivers such a push only once.
// Without history, delivery across instances is at most once: a message published while an
// instance's subscriber is down never reaches that instance.
//
// With history (--history-size), Redis keeps each id's stream and gives every push its position
// (redis_history.hpp has the scripts), and the manager's history mirrors it: an instance that
// starts following an id reads what Redis keeps of it first, so a client can resume on any
// instance; and an instance that sees a position skip (its subscriber connection was lost, or
// Redis dropped pub/sub messages) reads what it missed from the stream before going on, so even
// plain clients lose nothing a short blip took, as long as the stream still has it.
#pragma once

#include "wsbroadcast.hpp"

#include "redis_history.hpp"
#include "relay_wire.hpp"
#include "routes.hpp"

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>

#include <hiredis/async.h>
#include <hiredis/hiredis.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <chrono>
#include <cstring>
#include <functional>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <span>
#include <string>
#include <vector>

namespace wsbroadcast_server {

namespace redis_detail {

namespace net = boost::asio;
using strand = net::strand<net::any_io_executor>;

/// Drives one hiredis context from Asio: hiredis says which readiness it wants (its ev hooks),
/// this waits for it on the descriptor and hands it back. Everything runs on the relay's strand.
class watcher : public std::enable_shared_from_this<watcher> {
public:
    watcher(const strand& s, redisAsyncContext* ac) : descriptor_(s, ac->c.fd), strand_(s), ac_(ac) {}

    /// Installs the hooks. The watcher lives until hiredis frees the context (whoever asked) and
    /// calls cleanup, and until its last wait has completed.
    static void attach(const strand& s, redisAsyncContext* ac) {
        auto w = std::make_shared<watcher>(s, ac);
        w->self_ = w;
        ac->ev.data = w.get();
        ac->ev.addRead = [](void* p) { static_cast<watcher*>(p)->want(read_, true); };
        ac->ev.delRead = [](void* p) { static_cast<watcher*>(p)->want(read_, false); };
        ac->ev.addWrite = [](void* p) { static_cast<watcher*>(p)->want(write_, true); };
        ac->ev.delWrite = [](void* p) { static_cast<watcher*>(p)->want(write_, false); };
        ac->ev.cleanup = [](void* p) { static_cast<watcher*>(p)->detach(); };
    }

private:
    struct direction {
        bool wanted = false;
        bool waiting = false;
    };
    static constexpr int read_ = 0, write_ = 1;

    void want(int which, bool on) {
        dir_[which].wanted = on;
        if (on) wait(which);
    }

    void wait(int which) {
        auto& d = dir_[which];
        if (!ac_ || !d.wanted || d.waiting) return;
        d.waiting = true;
        const auto type =
            which == read_ ? net::posix::descriptor_base::wait_read : net::posix::descriptor_base::wait_write;
        descriptor_.async_wait(type, net::bind_executor(strand_, [self = shared_from_this(), which](auto ec) {
                                   auto& d = self->dir_[which];
                                   d.waiting = false;
                                   if (ec || !self->ac_ || !d.wanted) return;
                                   if (which == read_)
                                       redisAsyncHandleRead(self->ac_);
                                   else
                                       redisAsyncHandleWrite(self->ac_);
                                   self->wait(which);  // hiredis may have freed the context: wait() checks
                               }));
    }

    // The context is going away and hiredis closes the descriptor itself: stop waiting, let go.
    void detach() {
        ac_ = nullptr;
        boost::system::error_code ignored;
        descriptor_.cancel(ignored);
        descriptor_.release();
        self_.reset();  // may be the last owner: nothing may follow
    }

    net::posix::stream_descriptor descriptor_;
    strand strand_;
    redisAsyncContext* ac_;
    direction dir_[2];
    std::shared_ptr<watcher> self_;
};

}  // namespace redis_detail

/// How often the relay PINGs Redis on its publisher connection, and how long an answer may take
/// before Redis is taken as gone (pushes 503, reconnect).
struct redis_liveness {
    std::chrono::milliseconds ping_interval{std::chrono::seconds(5)};
    std::chrono::milliseconds ping_timeout{std::chrono::seconds(5)};
};

/// The relay. Call attach() once the io_context exists and detach() after it stopped running, before
/// it is destroyed; in between it connects, and reconnects, by itself.
template <class Manager>
class redis_relay final : public wsbroadcast::relay<std::string>,
                          public std::enable_shared_from_this<redis_relay<Manager>> {
    using strand = redis_detail::strand;
    using clock = std::chrono::steady_clock;

public:
    struct counters {
        std::atomic<bool> connected{false};
        std::atomic<std::uint64_t> connects{0};            // successful connections, the first one included
        std::atomic<std::uint64_t> failures{0};            // connections lost or attempts failed
        std::atomic<std::uint64_t> messages_in{0};         // messages Redis brought for local delivery
        std::atomic<std::uint64_t> duplicates{0};          // of those, copies of a multi-key push already delivered
        std::atomic<std::uint64_t> malformed{0};           // of those, payloads in no known format (dropped)
        std::atomic<std::uint64_t> too_large{0};           // of those, larger than this instance takes (dropped)
        std::atomic<std::uint64_t> messages_out{0};        // PUBLISH commands Redis acknowledged
        std::atomic<std::uint64_t> channels{0};            // keys subscribed now
        std::atomic<std::uint64_t> refusals{0};            // commands Redis refused (ACL, password): each a failure
        std::atomic<std::uint64_t> ping_timeouts{0};       // PINGs unanswered by their deadline: each a failure
        std::atomic<std::uint64_t> repairs{0};             // history reads after a position skipped or a reconnect
        std::atomic<std::uint64_t> repaired{0};            // messages those reads delivered
        std::atomic<std::uint64_t> prepare_timeouts{0};    // connections refused: their ids not ready in time
        std::atomic<std::size_t> unacknowledged_bytes{0};  // pushes handed to Redis, not answered yet
    };

    /// `log(warning, text)`: warning for trouble, otherwise information.
    /// `max_message_bytes`: what this instance takes in a push; a larger message from another
    /// instance (with a larger limit) is dropped rather than sent to subscribers whose outboxes
    /// are sized for this one's.
    /// `history`: with max_messages > 0, Redis keeps each id's history and positions its pushes.
    redis_relay(redis_address address, std::string prefix, std::function<void(bool, const std::string&)> log,
                redis_liveness timing = {}, std::size_t max_message_bytes = std::size_t(-1),
                wsbroadcast::history_options history = {})
        : address_(std::move(address)),
          prefix_(std::move(prefix)),
          log_(std::move(log)),
          timing_(timing),
          max_message_bytes_(max_message_bytes),
          history_(history),
          instance_id_(random_id()) {}

    void attach(boost::asio::any_io_executor executor, Manager& manager) {
        manager_ = &manager;
        strand_.emplace(boost::asio::make_strand(executor));
        retry_timer_.emplace(*strand_);
        ping_timer_.emplace(*strand_);
        resolver_.emplace(*strand_);
        epochs_.seed(random_id());
        boost::asio::post(*strand_, [self = this->shared_from_this()] { self->connect(); });
    }

    /// Frees the Redis connections. Only once the io_context no longer runs (its threads joined).
    void detach() {
        stopping_ = true;
        counters_.connected.store(false);
        free_contexts();
        resolver_.reset();
        ping_timer_.reset();
        retry_timer_.reset();
        strand_.reset();
    }

    /// `f` runs on the relay's strand each time it becomes ready: connected, and subscribed to every
    /// key wanted. Set before attach().
    void when_ready(std::function<void()> f) { when_ready_ = std::move(f); }

    const counters& stats() const noexcept { return counters_; }
    std::string where() const { return address_.host + ":" + std::to_string(address_.port); }

    /// While pushes are refused: why the relay is down, as logged (no secret in it); else empty.
    std::string problem() const {
        std::lock_guard lock(problem_mutex_);
        return problem_;
    }

    // ---- wsbroadcast::relay ------------------------------------------------------------------

    void interest(const std::string& key, bool needed) override {
        if (stopping_) return;  // detached: connections torn down with the io_context end here
        boost::asio::post(*strand_, [self = this->shared_from_this(), key, needed] { self->hold(key, needed); });
    }

    bool positions() const override { return history_.max_messages > 0; }

    /// With history: ready once Redis has confirmed the SUBSCRIBE of every key and this
    /// instance's history of each is Redis' (read once, when the instance starts following it).
    /// Refused (relay_unavailable) when that takes longer than prepare_timeout: Redis is away.
    /// Without history, at once: delivery is at most once anyway, and a client connecting while
    /// Redis is away is accepted and served once it is back.
    void prepare(std::span<const std::string> keys, std::function<void(wsbroadcast::error_code)> done) override {
        if (!positions()) return done({});
        if (stopping_) return done(wsbroadcast::error::relay_unavailable);
        boost::asio::post(*strand_, [self = this->shared_from_this(), keys = std::vector(keys.begin(), keys.end()),
                                     done = std::move(done)]() mutable { self->wait_ready(keys, std::move(done)); });
    }

    void release(std::span<const std::string> keys) override {
        if (!positions() || stopping_) return;
        boost::asio::post(*strand_, [self = this->shared_from_this(), keys = std::vector(keys.begin(), keys.end())] {
            for (const auto& key : keys) self->hold(key, false);
        });
    }

    /// One script per push (redis_history.hpp): Redis positions it in each key's stream, keeps it
    /// and PUBLISHes it with its position; done gets the positions once Redis has answered.
    void publish_positioned(
        std::span<const std::string> keys, const wsbroadcast::message& m,
        std::function<void(wsbroadcast::error_code, std::vector<wsbroadcast::position>)> done) override {
        if (!positions()) return wsbroadcast::relay<std::string>::publish_positioned(keys, m, std::move(done));
        if (!counters_.connected.load(std::memory_order_acquire))
            return done(wsbroadcast::error::relay_unavailable, {});
        if (keys.empty()) return done({}, {});
        std::size_t cost = m.size() + 64;  // the script's arguments and reply, until Redis answers
        for (const auto& key : keys) cost += 3 * (prefix_.size() + key.size() + 4);  // a channel and two keys each
        if (counters_.unacknowledged_bytes.fetch_add(cost) + cost > max_unacknowledged_bytes) {
            counters_.unacknowledged_bytes.fetch_sub(cost);
            return done(wsbroadcast::error::relay_unavailable, {});
        }
        auto push = std::make_unique<positioned_push>(
            positioned_push{std::vector(keys.begin(), keys.end()), std::string(m.data()), cost, std::move(done)});
        boost::asio::post(*strand_, [self = this->shared_from_this(), push = std::move(push)]() mutable {
            self->send_positioned(std::move(push));
        });
    }

    /// One PUBLISH per key's channel. Refused while Redis is away, and while more than
    /// max_unacknowledged_bytes of PUBLISHes wait for its answer (a Redis that stalls must not make
    /// this process grow without bound): then no key gets it.
    wsbroadcast::error_code publish(std::span<const std::string> keys, const wsbroadcast::message& m) override {
        if (!counters_.connected.load(std::memory_order_acquire)) return wsbroadcast::error::relay_unavailable;
        if (keys.empty()) return {};
        // Several keys: a payload naming them all, so that whoever receives it on several channels
        // can tell the copies apart from new pushes.
        std::string payload =
            keys.size() == 1 ? single_key_payload(m.data())
                             : multi_key_payload({instance_id_, next_counter_.fetch_add(1, std::memory_order_relaxed)},
                                                 keys, m.data());
        std::vector<std::string> channels;
        channels.reserve(keys.size());
        std::size_t cost = 0;
        for (const auto& key : keys) {
            channels.push_back(prefix_ + key);
            cost += publish_cost(channels.back(), payload);
        }
        if (counters_.unacknowledged_bytes.fetch_add(cost) + cost > max_unacknowledged_bytes) {
            counters_.unacknowledged_bytes.fetch_sub(cost);
            return wsbroadcast::error::relay_unavailable;
        }
        boost::asio::post(
            *strand_, [self = this->shared_from_this(), channels = std::move(channels), payload = std::move(payload)] {
                for (const auto& channel : channels) {
                    // Lost if the connection went meanwhile: at most once. The reply (or its absence,
                    // when the connection goes) comes back to on_published with the cost in privdata.
                    const auto cost = publish_cost(channel, payload);
                    if (!self->publisher_ ||
                        redisAsyncCommand(self->publisher_, &redis_relay::on_published, reinterpret_cast<void*>(cost),
                                          "PUBLISH %b %b", channel.data(), channel.size(), payload.data(),
                                          payload.size()) != REDIS_OK)
                        self->counters_.unacknowledged_bytes.fetch_sub(cost);
                }
            });
        return {};
    }

private:
    static constexpr auto connect_timeout = std::chrono::seconds(3);
    static constexpr auto first_retry = std::chrono::milliseconds(100);
    static constexpr auto last_retry = std::chrono::seconds(5);
    static constexpr std::size_t channels_per_command = 1000;
    static constexpr std::size_t max_unacknowledged_bytes = 8 * 1024 * 1024;
    // The copies of one multi-key push reach an instance right after each other: 4096 pushes of
    // other publishers in between is far more than Redis interleaves, in 128 KiB or so of ids.
    static constexpr std::size_t remembered_pushes = 4096;

    // What one PUBLISH costs until Redis answers it: its bytes, plus what a queued command costs besides.
    static std::size_t publish_cost(const std::string& channel, const std::string& payload) {
        return channel.size() + payload.size() + 64;
    }

    // Tells this instance's multi-key pushes from every other instance's (for as long as it runs).
    static std::uint64_t random_id() {
        std::random_device device;
        return (std::uint64_t{device()} << 32) ^ device();
    }

    static redis_relay* of(const redisAsyncContext* ac) { return static_cast<redis_relay*>(ac->data); }

    // ---- following ids: readiness, history, repair -------------------------------------------

    // How long a connection waits for its ids to be ready (SUBSCRIBE confirmed, history read)
    // before it is refused with 1013: long enough for a reconnect, short of a client's patience.
    static constexpr auto prepare_timeout = std::chrono::seconds(5);
    // Live messages of an id kept while its history is read; beyond it they are dropped, and the
    // skip they leave is read back from the stream afterwards.
    static constexpr std::size_t max_held = 10'000;

    // One prepare() waiting for its ids.
    struct waiter {
        std::function<void(wsbroadcast::error_code)> done;
        std::size_t remaining = 0;
        std::optional<boost::asio::steady_timer> deadline;
        void finish(wsbroadcast::error_code ec) {
            if (!done) return;
            if (deadline) deadline->cancel();
            std::exchange(done, nullptr)(ec);
        }
    };

    // An id this instance follows (someone holds it: a connection, or a prepare()).
    struct followed {
        unsigned holds = 0;
        bool ready = false;    // subscribed on this connection and, with history, in step with Redis
        bool reading = false;  // a history read is in flight
        bool awaited = false;  // followed when the subscriber came up, SUBSCRIBE not confirmed yet
        std::optional<wsbroadcast::position> last;                        // the newest position delivered here
        std::vector<std::pair<wsbroadcast::position, std::string>> held;  // live messages during a read
        std::vector<std::shared_ptr<waiter>> waiting;
    };

    void hold(const std::string& key, bool take) {
        auto it = followed_.find(key);
        if (take) {
            if (it == followed_.end()) {
                it = followed_.emplace(key, followed{}).first;
                change(key, true);
                if (confirmed_.count(key)) key_confirmed(key);  // still subscribed: an UNSUBSCRIBE never went
            }
            ++it->second.holds;
            return;
        }
        if (it == followed_.end() || --it->second.holds > 0) return;
        if (it->second.awaited) --awaited_;  // no longer needed: readiness does not wait for it
        followed_.erase(it);                 // nobody waits: a waiter holds the key
        change(key, false);
    }

    void wait_ready(const std::vector<std::string>& keys, std::function<void(wsbroadcast::error_code)> done) {
        auto w = std::make_shared<waiter>();
        w->done = std::move(done);
        for (const auto& key : keys) {
            hold(key, true);
            auto& f = followed_.at(key);
            if (!f.ready) {
                ++w->remaining;
                f.waiting.push_back(w);
            }
        }
        if (w->remaining == 0) return w->finish({});
        w->deadline.emplace(*strand_, prepare_timeout);
        w->deadline->async_wait([self = this->shared_from_this(), w](auto ec) {
            if (ec || !w->done) return;
            self->counters_.prepare_timeouts.fetch_add(1, std::memory_order_relaxed);
            w->finish(wsbroadcast::error::relay_unavailable);
        });
    }

    void became_ready(followed& f) {
        f.ready = true;
        for (auto& w : std::exchange(f.waiting, {}))
            if (--w->remaining == 0) w->finish({});
    }

    // Redis confirmed the SUBSCRIBE of a followed id on this connection.
    void key_confirmed(const std::string& key) {
        auto it = followed_.find(key);
        if (it == followed_.end() || it->second.ready || it->second.reading) return;
        if (positions()) return read_history(key);
        became_ready(it->second);
    }

    // Reads what Redis keeps of `key` after what this instance has, on the publisher connection
    // (a subscribed connection takes no other command). Live messages wait meanwhile.
    void read_history(const std::string& key) {
        auto& f = followed_.at(key);
        if (!publisher_ || !publisher_up_) return;  // the next connection reads it again
        const auto meta = redis_history::meta_key(prefix_, key), stream = redis_history::stream_key(prefix_, key);
        const auto fresh = redis_history::epoch_text(epochs_() | 1);
        const auto position_ttl = std::to_string(seconds(history_.position_ttl));
        const auto after_epoch = f.last ? redis_history::epoch_text(f.last->epoch) : std::string();
        const auto after_offset = std::to_string(f.last ? f.last->offset : 0);
        const char* argv[] = {"EVALSHA",           read_sha_.c_str(),   "2",           meta.c_str(),
                              stream.c_str(),      run_id_.c_str(),     fresh.c_str(), position_ttl.c_str(),
                              after_epoch.c_str(), after_offset.c_str()};
        std::size_t lengths[std::size(argv)];
        for (std::size_t i = 0; i < std::size(argv); ++i) lengths[i] = std::strlen(argv[i]);
        lengths[3] = meta.size();
        lengths[4] = stream.size();
        auto* request = new read_request{key, attempt_};
        if (redisAsyncCommandArgv(publisher_, &redis_relay::on_history, request, static_cast<int>(std::size(argv)),
                                  argv, lengths) != REDIS_OK) {
            delete request;
            return;
        }
        f.reading = true;
        if (f.last) counters_.repairs.fetch_add(1, std::memory_order_relaxed);
    }

    struct read_request {
        std::string key;
        unsigned attempt;
    };

    static void on_history(redisAsyncContext* ac, void* reply, void* privdata) {
        std::unique_ptr<read_request> request(static_cast<read_request*>(privdata));
        auto* self = of(ac);
        auto* r = static_cast<redisReply*>(reply);
        if (!r || ac != self->publisher_ || request->attempt != self->attempt_) return;  // going away
        if (r->type == REDIS_REPLY_ERROR) return self->refused("EVALSHA (history read)", r->str);
        auto it = self->followed_.find(request->key);
        if (it == self->followed_.end()) return;  // nobody follows it any more
        auto& f = it->second;
        f.reading = false;
        const auto text = [](const redisReply* e) {
            return e->type == REDIS_REPLY_STRING ? std::string_view(e->str, e->len) : std::string_view();
        };
        const bool shaped = r->type == REDIS_REPLY_ARRAY && r->elements == 4 &&
                            r->element[2]->type == REDIS_REPLY_INTEGER && r->element[3]->type == REDIS_REPLY_ARRAY;
        const auto epoch = shaped ? redis_history::parse_epoch(text(r->element[0])) : std::nullopt;
        const auto top = shaped ? redis_history::parse_offset(text(r->element[1])) : std::nullopt;
        if (!epoch || !top) return self->fail("a history read answered in an unknown format");
        const std::int64_t now_ms = r->element[2]->integer;
        const auto* entries = r->element[3];
        const auto oldest_ms = now_ms - static_cast<std::int64_t>(seconds(self->history_.ttl)) * 1000;
        std::vector<redis_history::entry> kept;
        for (std::size_t i = 0; i < entries->elements; ++i) {
            // [id, [name, value, ...]]: the publish script writes d (the data) and t (its time in ms).
            const auto* e = entries->element[i];
            if (e->type != REDIS_REPLY_ARRAY || e->elements != 2 || e->element[1]->type != REDIS_REPLY_ARRAY) continue;
            redis_history::entry entry{redis_history::entry_offset(text(e->element[0])), {}, 0};
            std::optional<std::string_view> data;
            const auto* fields = e->element[1];
            for (std::size_t j = 0; j + 1 < fields->elements; j += 2) {
                const auto name = text(fields->element[j]), value = text(fields->element[j + 1]);
                if (name == "d") data = value;
                if (name == "t") std::from_chars(value.data(), value.data() + value.size(), entry.at_ms);
            }
            if (!data || !entry.offset) continue;
            entry.data = *data;
            if (self->history_.ttl.count() == 0 || entry.at_ms > oldest_ms) kept.push_back(entry);
        }
        self->apply_history(request->key, f, {*epoch, *top}, kept);
    }

    // What a read brought: the first time, this instance's history of the key becomes Redis';
    // later, what it missed is delivered (a break, where Redis no longer has it, as the manager
    // handles one). Then the live messages held meanwhile.
    void apply_history(const std::string& key, followed& f, wsbroadcast::position top,
                       const std::vector<redis_history::entry>& entries) {
        const bool same_epoch = f.last && f.last->epoch == top.epoch;
        const std::uint64_t first = entries.empty() ? top.offset + 1 : entries.front().offset;
        if (!same_epoch || first > f.last->offset + 1) manager_->adopt_position(key, {top.epoch, first - 1});
        std::size_t delivered = 0;
        for (const auto& e : entries) {
            if (same_epoch && e.offset <= f.last->offset) continue;
            if (deliverable(key, e.data))
                delivered += !manager_->deliver(key, wsbroadcast::message::text(e.data), {top.epoch, e.offset})
                                  .positions.empty();
        }
        if (f.last) counters_.repaired.fetch_add(delivered, std::memory_order_relaxed);
        f.last = top;
        for (auto& [at, data] : std::exchange(f.held, {})) on_live(key, f, at, data, false);
        became_ready(f);
    }

    // A live message with its position: in order, it is delivered; a copy is dropped; after a
    // skip (or another epoch), what was missed is read from the stream first (once: a skip the
    // read could not fill is delivered as the break it is).
    void on_live(const std::string& key, followed& f, wsbroadcast::position at, std::string_view data, bool may_read) {
        if (f.reading || (!f.ready && may_read)) {
            if (f.held.size() < max_held) f.held.emplace_back(at, std::string(data));
            return;
        }
        if (f.last && f.last->epoch == at.epoch && at.offset <= f.last->offset) {
            counters_.duplicates.fetch_add(1, std::memory_order_relaxed);
            return;
        }
        if (may_read && f.last && (f.last->epoch != at.epoch || at.offset != f.last->offset + 1)) {
            f.held.emplace_back(at, std::string(data));
            f.ready = false;
            return read_history(key);
        }
        f.last = at;
        if (deliverable(key, data)) manager_->deliver(key, wsbroadcast::message::text(data), at);
    }

    // ---- pushes with positions -----------------------------------------------------------------

    struct positioned_push {
        std::vector<std::string> keys;
        std::string data;
        std::size_t cost;
        std::function<void(wsbroadcast::error_code, std::vector<wsbroadcast::position>)> done;
    };

    void send_positioned(std::unique_ptr<positioned_push> push) {
        const auto fresh = redis_history::epoch_text(epochs_() | 1);
        const auto max_messages = std::to_string(history_.max_messages);
        const auto ttl_ms = std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(history_.ttl).count());
        const auto position_ttl = std::to_string(seconds(history_.position_ttl));
        std::vector<std::string> args{"EVALSHA", publish_sha_, std::to_string(push->keys.size() * 2)};
        for (const auto& key : push->keys) {
            args.push_back(redis_history::meta_key(prefix_, key));
            args.push_back(redis_history::stream_key(prefix_, key));
        }
        args.insert(args.end(), {run_id_, max_messages, ttl_ms, position_ttl, fresh, push->data});
        for (const auto& key : push->keys) args.push_back(prefix_ + key);
        std::vector<const char*> argv;
        std::vector<std::size_t> lengths;
        for (const auto& a : args) {
            argv.push_back(a.data());
            lengths.push_back(a.size());
        }
        auto* raw = push.release();
        if (!publisher_ ||
            redisAsyncCommandArgv(publisher_, &redis_relay::on_positioned, raw, static_cast<int>(argv.size()),
                                  argv.data(), lengths.data()) != REDIS_OK) {
            std::unique_ptr<positioned_push> lost(raw);
            counters_.unacknowledged_bytes.fetch_sub(lost->cost);
            lost->done(wsbroadcast::error::relay_unavailable, {});
        }
    }

    static void on_positioned(redisAsyncContext* ac, void* reply, void* privdata) {
        std::unique_ptr<positioned_push> push(static_cast<positioned_push*>(privdata));
        auto* self = of(ac);
        self->counters_.unacknowledged_bytes.fetch_sub(push->cost);
        auto* r = static_cast<redisReply*>(reply);
        std::vector<wsbroadcast::position> at;
        if (r && r->type == REDIS_REPLY_ARRAY && r->elements == push->keys.size()) {
            for (std::size_t i = 0; i < r->elements; ++i)
                if (auto p = wsbroadcast::position::parse({r->element[i]->str, r->element[i]->len})) at.push_back(*p);
        }
        if (at.size() != push->keys.size()) {
            push->done(wsbroadcast::error::relay_unavailable, {});
            // Refused (an ACL without EVALSHA, Redis out of memory): pretending would lose every push.
            if (r && r->type == REDIS_REPLY_ERROR && ac == self->publisher_) self->refused("EVALSHA (push)", r->str);
            return;
        }
        self->counters_.messages_out.fetch_add(1, std::memory_order_relaxed);
        push->done({}, std::move(at));
    }

    static long long seconds(std::chrono::steady_clock::duration d) {
        return std::chrono::duration_cast<std::chrono::seconds>(d).count();
    }

    // ---- connecting ----------------------------------------------------------------------------

    void connect() {
        if (stopping_) return;
        ++attempt_;
        retry_timer_->expires_after(connect_timeout);
        retry_timer_->async_wait([self = this->shared_from_this(), attempt = attempt_](auto ec) {
            if (!ec && attempt == self->attempt_ && !self->counters_.connected) self->fail("connecting timed out");
        });
        // Resolved here, asynchronously: hiredis would resolve a host name on the event loop's thread.
        resolver_->async_resolve(
            address_.host, std::to_string(address_.port),
            [self = this->shared_from_this(), attempt = attempt_](const boost::system::error_code& ec, auto results) {
                if (self->stopping_ || attempt != self->attempt_ || attempt == self->failed_attempt_) return;
                if (ec || results.empty())
                    return self->fail("cannot resolve " + self->address_.host + ": " + ec.message());
                // A name with several addresses ("localhost": ::1 and 127.0.0.1): each attempt takes the next.
                auto it = results.begin();
                std::advance(it, attempt % results.size());
                const auto ip = it->endpoint().address().to_string();
                self->subscriber_ = self->open(ip);
                self->publisher_ = self->subscriber_ ? self->open(ip) : nullptr;
                if (!self->subscriber_ || !self->publisher_) self->fail(self->last_error_);
            });
    }

    redisAsyncContext* open(const std::string& ip) {
        redisAsyncContext* ac = redisAsyncConnect(ip.c_str(), address_.port);
        if (!ac || ac->err) {
            last_error_ = ac ? ac->errstr : "out of memory";
            if (ac) redisAsyncFree(ac);
            return nullptr;
        }
        ac->data = this;
        redis_detail::watcher::attach(*strand_, ac);
        redisAsyncSetDisconnectCallback(ac, &redis_relay::on_disconnected);
        redisAsyncSetConnectCallback(ac, &redis_relay::on_connected);  // last: it starts waiting to write
        return ac;
    }

    static void on_connected(const redisAsyncContext* ac, int status) {
        auto* self = of(ac);
        const bool subscriber = ac == self->subscriber_;
        if (!subscriber && ac != self->publisher_) return;  // an attempt given up already
        if (status != REDIS_OK) {
            // hiredis frees this context when we return.
            (subscriber ? self->subscriber_ : self->publisher_) = nullptr;
            return self->fail(ac->errstr);
        }
        auto* mutable_ac = subscriber ? self->subscriber_ : self->publisher_;
        const auto& a = self->address_;
        if (a.password.empty())
            self->up(mutable_ac);
        else if (a.user.empty())
            redisAsyncCommand(mutable_ac, &redis_relay::on_authenticated, nullptr, "AUTH %s", a.password.c_str());
        else
            redisAsyncCommand(mutable_ac, &redis_relay::on_authenticated, nullptr, "AUTH %s %s", a.user.c_str(),
                              a.password.c_str());
    }

    // Nothing else is sent before AUTH succeeds: a SUBSCRIBE refused with NOAUTH would confuse hiredis.
    static void on_authenticated(redisAsyncContext* ac, void* reply, void*) {
        auto* self = of(ac);
        auto* r = static_cast<redisReply*>(reply);
        if (!r || (ac != self->subscriber_ && ac != self->publisher_)) return;  // going away
        if (r->type == REDIS_REPLY_ERROR) return self->refused("AUTH", r->str);
        self->up(ac);
    }

    // One connection is ready for commands; with both, the relay is. The publisher is up once
    // Redis has answered a PING on it: one that accepts connections but answers nothing is not.
    void up(redisAsyncContext* ac) {
        redisEnableKeepAlive(&ac->c);  // a peer gone without a word is noticed by TCP, eventually
        if (ac == publisher_) {
            // Answered before the PING is: the publisher is up with the scripts loaded and the run_id known.
            if (positions()) {
                redisAsyncCommand(ac, &redis_relay::on_run_id, nullptr, "INFO server");
                redisAsyncCommand(ac, &redis_relay::on_script, &publish_sha_, "SCRIPT LOAD %b",
                                  redis_history::publish_script.data(), redis_history::publish_script.size());
                redisAsyncCommand(ac, &redis_relay::on_script, &read_sha_, "SCRIPT LOAD %b",
                                  redis_history::read_script.data(), redis_history::read_script.size());
            }
            return ping();
        }
        subscriber_up_ = true;
        for (auto& [key, f] : followed_) f.awaited = true;
        awaited_ = followed_.size();
        sync_subscriptions();
        ready_if_synced();
    }

    // Pushes are taken only once Redis has confirmed a subscription for every key needed when the
    // connection came up (and needed still): otherwise this instance's own subscribers would miss
    // the first ones. Keys that come and go meanwhile are not waited for, so churn cannot hold it back.
    void ready_if_synced() {
        if (counters_.connected.load(std::memory_order_relaxed) || !subscriber_up_ || !publisher_up_) return;
        // Connected: however long subscribing to every key takes now, the PING deadline watches
        // Redis meanwhile. (A connect timeout over it would never let a large keyspace come up.)
        retry_timer_->cancel();
        if (awaited_ == 0) ready();
    }

    // ---- liveness ------------------------------------------------------------------------------

    // hiredis 0.14 gives no callback for a PING on a subscribed connection: the publisher is asked.
    // Its answer comes after every PUBLISH sent before it, so the deadline bounds those too.
    void ping() {
        if (!publisher_ || failed_attempt_ == attempt_ ||
            redisAsyncCommand(publisher_, &redis_relay::on_pong, nullptr, "PING") != REDIS_OK)
            return;
        ping_timer_->expires_after(timing_.ping_timeout);
        ping_timer_->async_wait([self = this->shared_from_this(), attempt = attempt_](auto ec) {
            if (ec || attempt != self->attempt_) return;
            self->counters_.ping_timeouts.fetch_add(1, std::memory_order_relaxed);
            self->fail("no answer to PING within " + std::to_string(self->timing_.ping_timeout.count()) + " ms");
        });
    }

    static void on_run_id(redisAsyncContext* ac, void* reply, void*) {
        auto* self = of(ac);
        auto* r = static_cast<redisReply*>(reply);
        if (!r || ac != self->publisher_) return;
        if (r->type == REDIS_REPLY_ERROR) return self->refused("INFO", r->str);
        const std::string_view info(r->str, r->type == REDIS_REPLY_STRING ? r->len : 0);
        const auto at = info.find("run_id:");
        if (at == std::string_view::npos) return self->fail("INFO server gave no run_id");
        const auto value = info.substr(at + 7, info.find_first_of("\r\n", at) - at - 7);
        self->run_id_ = std::string(value);
    }

    static void on_script(redisAsyncContext* ac, void* reply, void* sha) {
        auto* self = of(ac);
        auto* r = static_cast<redisReply*>(reply);
        if (!r || ac != self->publisher_) return;
        if (r->type != REDIS_REPLY_STRING)
            return self->refused("SCRIPT LOAD", r->type == REDIS_REPLY_ERROR ? r->str : "?");
        static_cast<std::string*>(sha)->assign(r->str, r->len);
    }

    // The publisher is up: ids whose SUBSCRIBE was confirmed before it was get their history read.
    void catch_up() {
        for (auto& [key, f] : followed_)
            if (!f.ready && !f.reading && confirmed_.count(key)) key_confirmed(key);
    }

    static void on_pong(redisAsyncContext* ac, void* reply, void*) {
        auto* self = of(ac);
        auto* r = static_cast<redisReply*>(reply);
        if (!r || ac != self->publisher_) return;  // going away
        if (r->type == REDIS_REPLY_ERROR) return self->refused("PING", r->str);
        self->ping_timer_->expires_after(self->timing_.ping_interval);  // the deadline is met: cancelled
        self->ping_timer_->async_wait([self = self->shared_from_this(), attempt = self->attempt_](auto ec) {
            if (!ec && attempt == self->attempt_) self->ping();
        });
        if (!std::exchange(self->publisher_up_, true)) {
            self->catch_up();
            self->ready_if_synced();
        }
    }

    static void on_disconnected(const redisAsyncContext* ac, int status) {
        auto* self = of(ac);
        const bool subscriber = ac == self->subscriber_;
        if (!subscriber && ac != self->publisher_) return;              // one we let go of on purpose
        (subscriber ? self->subscriber_ : self->publisher_) = nullptr;  // hiredis frees it when we return
        if (self->stopping_) return;
        // An error reply with no callback waiting for it (a refused SUBSCRIBE or UNSUBSCRIBE: hiredis
        // keeps none for those) makes hiredis 0.14 drop the connection, the error as its reason.
        if (subscriber && ac->err == REDIS_ERR_OTHER && self->in_flight_ > 0)
            return self->refused(self->in_flight_subscribe_ ? "SUBSCRIBE" : "UNSUBSCRIBE", ac->errstr);
        self->fail(status == REDIS_OK ? std::string("connection closed") : std::string(ac->errstr));
    }

    void ready() {
        retry_delay_ = first_retry;
        counters_.connects.fetch_add(1, std::memory_order_relaxed);
        counters_.connected.store(true, std::memory_order_release);
        set_problem({});
        const auto quiet = std::exchange(repeated_failures_, 0);
        last_failure_.clear();
        log_(false, "redis: connected to " + where() + ", " + std::to_string(followed_.size()) +
                        " key(s) to subscribe" +
                        (quiet ? ", after " + std::to_string(quiet) + " more failed attempt(s) like the last logged"
                               : std::string()));
        if (when_ready_) when_ready_();
    }

    // A command Redis answered with an error (NOPERM, NOAUTH, WRONGPASS): nothing this relay sends
    // can work around it, so it fails and retries with backoff, and the operator is told which.
    void refused(std::string_view command, std::string_view error) {
        counters_.refusals.fetch_add(1, std::memory_order_relaxed);
        fail(std::string(command) + " refused: " + std::string(error));
    }

    void set_problem(std::string why) {
        std::lock_guard lock(problem_mutex_);
        problem_ = std::move(why);
    }

    // Once per attempt: mark the relay down, let go of both connections, retry after a backoff.
    // May run inside a hiredis callback, so the connections are freed later, from the strand.
    void fail(const std::string& why) {
        if (failed_attempt_ == attempt_ || stopping_) return;
        failed_attempt_ = attempt_;
        resolver_->cancel();
        ping_timer_->cancel();
        const bool was_connected = counters_.connected.exchange(false, std::memory_order_acq_rel);
        // A warning when the relay goes down (or first fails to come up); the retries after it are information.
        const bool warning = was_connected || counters_.failures.fetch_add(1, std::memory_order_relaxed) == 0;
        if (was_connected) counters_.failures.fetch_add(1, std::memory_order_relaxed);
        subscriber_up_ = publisher_up_ = false;
        set_problem(why);
        boost::asio::post(*strand_, [self = this->shared_from_this(), attempt = attempt_] {
            if (attempt == self->attempt_) self->free_contexts();
        });
        const auto delay = retry_delay_;
        retry_delay_ = std::min<clock::duration>(retry_delay_ * 2, last_retry);
        // The same reason again (an ACL refusing every attempt) is counted, not logged: one line per
        // retry would be a line every 5 s for as long as nobody fixes it.
        if (!was_connected && why == last_failure_) {
            ++repeated_failures_;
        } else {
            last_failure_ = why;
            log_(warning, std::string(was_connected ? "redis: connection to " : "redis: cannot connect to ") + where() +
                              ": " + why + "; pushes are refused (503) until it is back; retrying in " +
                              std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(delay).count()) +
                              " ms, with backoff up to " + std::to_string(last_retry.count()) + " s");
        }
        retry_timer_->expires_after(delay);
        retry_timer_->async_wait([self = this->shared_from_this()](auto ec) {
            if (!ec) self->connect();
        });
    }

    void free_contexts() {
        subscriber_up_ = publisher_up_ = false;
        // A new connection subscribes to everything followed; while there is none, change() keeps it so.
        subscribed_.clear();
        to_unsubscribe_.clear();
        to_subscribe_.clear();
        confirmed_.clear();
        awaited_ = 0;
        for (auto& [key, f] : followed_) {
            to_subscribe_.insert(to_subscribe_.end(), key);
            f.ready = f.reading = f.awaited = false;  // subscribed again, then read again
        }
        counters_.channels.store(0, std::memory_order_relaxed);
        in_flight_ = 0;
        // Cleared first: the disconnect callbacks these frees run must not take them for new failures.
        if (auto* ac = std::exchange(subscriber_, nullptr)) redisAsyncFree(ac);
        if (auto* ac = std::exchange(publisher_, nullptr)) redisAsyncFree(ac);
    }

    // ---- subscriptions -------------------------------------------------------------------------

    // A key followed (needed) or no longer followed. Each change costs O(log n), whatever the number
    // of keys: what is still to be sent is kept as its own sets (subscribed_ holds what the commands
    // sent so far ask of Redis).
    void change(const std::string& key, bool needed) {
        const bool asked = subscribed_.count(key) > 0;
        if (needed) {
            asked ? (void)to_unsubscribe_.erase(key) : (void)to_subscribe_.insert(key);
        } else {
            asked ? (void)to_unsubscribe_.insert(key) : (void)to_subscribe_.erase(key);
        }
        sync_subscriptions();
        if (!needed) ready_if_synced();
    }

    // Sends what is still to be sent, SUBSCRIBEs first, one command at a time. hiredis keeps one
    // callback per channel and can lose it when a SUBSCRIBE and an UNSUBSCRIBE of one channel
    // cross; with a single command in flight they never do.
    void sync_subscriptions() {
        if (!subscriber_up_ || in_flight_ > 0) return;
        const bool subscribing = !to_subscribe_.empty();
        auto& pending = subscribing ? to_subscribe_ : to_unsubscribe_;
        if (pending.empty()) return;
        std::vector<std::string> channels;
        auto last = pending.begin();
        for (; last != pending.end() && channels.size() < channels_per_command; ++last)
            channels.push_back(prefix_ + *last);
        std::vector<const char*> argv{subscribing ? "SUBSCRIBE" : "UNSUBSCRIBE"};
        std::vector<std::size_t> lengths{std::strlen(argv[0])};
        for (auto& c : channels) {
            argv.push_back(c.data());
            lengths.push_back(c.size());
        }
        // Every channel's replies (subscribe, message, unsubscribe) come to on_channel.
        if (redisAsyncCommandArgv(subscriber_, &redis_relay::on_channel, this, static_cast<int>(argv.size()),
                                  argv.data(), lengths.data()) != REDIS_OK)
            return;
        in_flight_ = channels.size();
        in_flight_subscribe_ = subscribing;
        while (pending.begin() != last) {
            auto node = pending.extract(pending.begin());
            if (!subscribing) confirmed_.erase(node.value());
            subscribing ? (void)subscribed_.insert(std::move(node)) : (void)subscribed_.erase(node.value());
        }
        counters_.channels.store(subscribed_.size(), std::memory_order_relaxed);
    }

    static void on_channel(redisAsyncContext* ac, void* reply, void*) {
        auto* self = of(ac);
        auto* r = static_cast<redisReply*>(reply);
        if (!r || ac != self->subscriber_ || r->type != REDIS_REPLY_ARRAY || r->elements < 3) return;
        const std::string_view kind(r->element[0]->str, r->element[0]->len);
        std::string_view channel(r->element[1]->str, r->element[1]->len);
        if (!channel.starts_with(self->prefix_)) return;
        channel.remove_prefix(self->prefix_.size());
        if (kind == "message") {
            self->counters_.messages_in.fetch_add(1, std::memory_order_relaxed);
            self->deliver(channel, std::string_view(r->element[2]->str, r->element[2]->len));
        } else if (kind == "subscribe" || kind == "unsubscribe") {
            if (kind == "subscribe") {  // confirmed, channel by channel
                const std::string key(channel);
                self->confirmed_.insert(key);
                const auto it = self->followed_.find(key);
                if (it != self->followed_.end() && std::exchange(it->second.awaited, false)) --self->awaited_;
                self->key_confirmed(key);
            }
            if (self->in_flight_ > 0 && --self->in_flight_ == 0) self->sync_subscriptions();
            self->ready_if_synced();
        }
    }

    // A multi-key push goes to every one of its keys at the first copy: each local connection gets
    // it once, wherever its keys' SUBSCRIBEs stand. The later copies are dropped.
    void deliver(std::string_view key, std::string_view payload) {
        const auto push = parse_relay_payload(payload);
        if (!push) return (void)deliverable(key, std::nullopt);
        if (push->at) {
            // Positioned (history on): followed ids only, in order. (One nobody follows any more
            // is still subscribed for a moment: what it brings, nobody here needs.)
            const auto it = followed_.find(std::string(key));
            if (it != followed_.end()) on_live(it->first, it->second, *push->at, push->data, true);
            return;
        }
        if (!deliverable(key, push->data)) return;
        if (!push->id) {
            manager_->send(key, push->data);
        } else if (recent_.insert(*push->id)) {
            manager_->send(push->keys, push->data);
        } else {
            counters_.duplicates.fetch_add(1, std::memory_order_relaxed);
        }
    }

    // Text frames must be UTF-8: a foreign publisher on the prefix must not fail every subscriber.
    // nullopt: a payload in no known format.
    bool deliverable(std::string_view key, std::optional<std::string_view> data) {
        if (!data || !valid_utf8(*data)) {
            if (counters_.malformed.fetch_add(1, std::memory_order_relaxed) == 0)
                log_(true, "redis: dropping a message in an unknown format on channel " + prefix_ + std::string(key) +
                               " (an instance of another version on this prefix?)");
            return false;
        }
        if (data->size() > max_message_bytes_) {
            if (counters_.too_large.fetch_add(1, std::memory_order_relaxed) == 0)
                log_(true, "redis: dropping a message of " + std::to_string(data->size()) + " bytes on channel " +
                               prefix_ + std::string(key) + ": over this instance's --max-message-bytes (" +
                               std::to_string(max_message_bytes_) + "); give every instance the same limits");
            return false;
        }
        return true;
    }

    static void on_published(redisAsyncContext* ac, void* reply, void* cost) {
        auto* self = of(ac);
        self->counters_.unacknowledged_bytes.fetch_sub(reinterpret_cast<std::size_t>(cost));
        auto* r = static_cast<redisReply*>(reply);
        if (r && r->type == REDIS_REPLY_INTEGER) self->counters_.messages_out.fetch_add(1, std::memory_order_relaxed);
        // Refused (NOAUTH, an ACL without PUBLISH): pretending to relay would lose every push.
        if (r && r->type == REDIS_REPLY_ERROR && ac == self->publisher_) self->refused("PUBLISH", r->str);
    }

    const redis_address address_;
    std::function<void()> when_ready_;
    const std::string prefix_;
    const std::function<void(bool, const std::string&)> log_;
    const redis_liveness timing_;
    const std::size_t max_message_bytes_;
    const wsbroadcast::history_options history_;
    Manager* manager_ = nullptr;
    mutable std::mutex problem_mutex_;
    std::string problem_;  // guarded by problem_mutex_: publish() runs on any thread
    counters counters_;
    const std::uint64_t instance_id_;
    std::atomic<std::uint64_t> next_counter_{0};

    // Everything below is touched only on the strand (or by detach(), once nothing runs).
    std::optional<strand> strand_;
    std::optional<boost::asio::steady_timer> retry_timer_;
    std::optional<boost::asio::steady_timer> ping_timer_;  // the next PING, or the deadline of the one sent
    std::optional<boost::asio::ip::tcp::resolver> resolver_;
    redisAsyncContext* subscriber_ = nullptr;
    redisAsyncContext* publisher_ = nullptr;
    bool subscriber_up_ = false, publisher_up_ = false, stopping_ = false;
    unsigned attempt_ = 0, failed_attempt_ = 0;
    clock::duration retry_delay_ = first_retry;
    std::string last_error_;
    std::set<std::string> subscribed_;             // keys Redis has (or is about to have) a SUBSCRIBE for
    std::set<std::string> to_subscribe_;           // followed, not in subscribed_: to be sent
    std::set<std::string> to_unsubscribe_;         // in subscribed_, no longer followed: to be sent
    std::size_t awaited_ = 0;                      // followed ids whose `awaited` is set
    std::size_t in_flight_ = 0;                    // replies still due for the one (UN)SUBSCRIBE in flight
    bool in_flight_subscribe_ = false;             // which of the two it is
    std::string last_failure_;                     // the reason last logged, while the relay is down
    std::uint64_t repeated_failures_ = 0;          // failures for that same reason since, not logged
    recent_relay_ids recent_{remembered_pushes};   // multi-key pushes delivered lately
    std::map<std::string, followed> followed_;     // ids someone here holds: connections, prepare()s
    std::set<std::string> confirmed_;              // SUBSCRIBEs Redis confirmed on this connection
    std::string run_id_, publish_sha_, read_sha_;  // with history: this Redis process, the scripts' SHA1s
    std::mt19937_64 epochs_;                       // fresh epochs, for ids Redis has none of
};

}  // namespace wsbroadcast_server
