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
// Delivery across instances is at most once: a message published while an instance's subscriber
// is down never reaches that instance.
#pragma once

#include "wsbroadcast.hpp"

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
#include <chrono>
#include <functional>
#include <iterator>
#include <cstring>
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
        std::atomic<std::size_t> unacknowledged_bytes{0};  // pushes handed to Redis, not answered yet
    };

    /// `log(warning, text)`: warning for trouble, otherwise information.
    /// `max_message_bytes`: what this instance takes in a push; a larger message from another
    /// instance (with a larger limit) is dropped rather than sent to subscribers whose outboxes
    /// are sized for this one's.
    redis_relay(redis_address address, std::string prefix, std::function<void(bool, const std::string&)> log,
                redis_liveness timing = {}, std::size_t max_message_bytes = std::size_t(-1))
        : address_(std::move(address)),
          prefix_(std::move(prefix)),
          log_(std::move(log)),
          timing_(timing),
          max_message_bytes_(max_message_bytes),
          instance_id_(random_id()) {}

    void attach(boost::asio::any_io_executor executor, Manager& manager) {
        manager_ = &manager;
        strand_.emplace(boost::asio::make_strand(executor));
        retry_timer_.emplace(*strand_);
        ping_timer_.emplace(*strand_);
        resolver_.emplace(*strand_);
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
        boost::asio::post(*strand_, [self = this->shared_from_this(), key, needed] { self->change(key, needed); });
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
        if (ac == publisher_) return ping();
        subscriber_up_ = true;
        awaiting_ = wanted_;
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
        if (awaiting_.empty()) ready();
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

    static void on_pong(redisAsyncContext* ac, void* reply, void*) {
        auto* self = of(ac);
        auto* r = static_cast<redisReply*>(reply);
        if (!r || ac != self->publisher_) return;  // going away
        if (r->type == REDIS_REPLY_ERROR) return self->refused("PING", r->str);
        self->ping_timer_->expires_after(self->timing_.ping_interval);  // the deadline is met: cancelled
        self->ping_timer_->async_wait([self = self->shared_from_this(), attempt = self->attempt_](auto ec) {
            if (!ec && attempt == self->attempt_) self->ping();
        });
        if (!std::exchange(self->publisher_up_, true)) self->ready_if_synced();
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
        log_(false, "redis: connected to " + where() + ", " + std::to_string(wanted_.size()) + " key(s) to subscribe" +
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
        // A new connection subscribes to everything wanted; while there is none, change() keeps it so.
        subscribed_.clear();
        to_unsubscribe_.clear();
        to_subscribe_ = wanted_;
        awaiting_.clear();
        counters_.channels.store(0, std::memory_order_relaxed);
        in_flight_ = 0;
        // Cleared first: the disconnect callbacks these frees run must not take them for new failures.
        if (auto* ac = std::exchange(subscriber_, nullptr)) redisAsyncFree(ac);
        if (auto* ac = std::exchange(publisher_, nullptr)) redisAsyncFree(ac);
    }

    // ---- subscriptions -------------------------------------------------------------------------

    // Each change of interest costs O(log n), whatever the number of keys: what is still to be sent
    // is kept as its own sets (subscribed_ holds what the commands sent so far ask of Redis).
    void change(const std::string& key, bool needed) {
        if (needed ? !wanted_.insert(key).second : wanted_.erase(key) == 0) return;
        const bool asked = subscribed_.count(key) > 0;
        if (needed) {
            asked ? (void)to_unsubscribe_.erase(key) : (void)to_subscribe_.insert(key);
        } else {
            asked ? (void)to_unsubscribe_.insert(key) : (void)to_subscribe_.erase(key);
            awaiting_.erase(key);  // no longer needed: readiness does not wait for it
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
            if (kind == "subscribe") self->awaiting_.erase(std::string(channel));  // confirmed, channel by channel
            if (self->in_flight_ > 0 && --self->in_flight_ == 0) self->sync_subscriptions();
            self->ready_if_synced();
        }
    }

    // A multi-key push goes to every one of its keys at the first copy: each local connection gets
    // it once, wherever its keys' SUBSCRIBEs stand. The later copies are dropped.
    void deliver(std::string_view key, std::string_view payload) {
        const auto push = parse_relay_payload(payload);
        // Text frames must be UTF-8: a foreign publisher on the prefix must not fail every subscriber.
        if (!push || !valid_utf8(push->data)) {
            if (counters_.malformed.fetch_add(1, std::memory_order_relaxed) == 0)
                log_(true, "redis: dropping a message in an unknown format on channel " + prefix_ + std::string(key) +
                               " (an instance of another version on this prefix?)");
            return;
        }
        if (push->data.size() > max_message_bytes_) {
            if (counters_.too_large.fetch_add(1, std::memory_order_relaxed) == 0)
                log_(true, "redis: dropping a message of " + std::to_string(push->data.size()) + " bytes on channel " +
                               prefix_ + std::string(key) + ": over this instance's --max-message-bytes (" +
                               std::to_string(max_message_bytes_) + "); give every instance the same limits");
            return;
        }
        if (!push->id) {
            manager_->send(key, push->data);
        } else if (recent_.insert(*push->id)) {
            manager_->send(push->keys, push->data);
        } else {
            counters_.duplicates.fetch_add(1, std::memory_order_relaxed);
        }
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
    std::set<std::string> wanted_;                // keys with local connections, as the manager reported them
    std::set<std::string> subscribed_;            // keys Redis has (or is about to have) a SUBSCRIBE for
    std::set<std::string> to_subscribe_;          // wanted, not in subscribed_: to be sent
    std::set<std::string> to_unsubscribe_;        // in subscribed_, no longer wanted: to be sent
    std::set<std::string> awaiting_;              // wanted when the subscriber came up, not confirmed yet
    std::size_t in_flight_ = 0;                   // replies still due for the one (UN)SUBSCRIBE in flight
    bool in_flight_subscribe_ = false;            // which of the two it is
    std::string last_failure_;                    // the reason last logged, while the relay is down
    std::uint64_t repeated_failures_ = 0;         // failures for that same reason since, not logged
    recent_relay_ids recent_{remembered_pushes};  // multi-key pushes delivered lately
};

}  // namespace wsbroadcast_server
