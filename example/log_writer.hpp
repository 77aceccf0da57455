// The server's log: lines are queued, and a thread of their own writes them to a descriptor
// (stderr), so a thread serving connections never waits on it. A reader that does not keep up (a
// pipe nobody reads) costs log lines, not service: past a bound they are dropped, and the next
// write says how many.
#pragma once

#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <utility>

#include <unistd.h>

namespace wsbroadcast_server {

class log_writer {
public:
    explicit log_writer(int fd, std::size_t max_queued_bytes = 1024 * 1024)
        : fd_(fd), max_queued_bytes_(max_queued_bytes) {
        // Detached: it may be blocked in write(2) when the process exits, and must not hold it.
        std::thread([this] { run(); }).detach();
    }
    log_writer(const log_writer&) = delete;

    /// Queues one line (with its '\n'); the lock is held only for that.
    void write(std::string_view line) {
        {
            std::lock_guard lock(mutex_);
            if (queued_.size() + line.size() > max_queued_bytes_) {
                ++dropped_;
                return;
            }
            queued_ += line;
        }
        wake_.notify_one();
    }

    /// Waits until everything queued is written, or `limit` has passed: at exit, a reader that is
    /// stuck must not keep the process from ending. Whether it all went out.
    bool flush(std::chrono::milliseconds limit) {
        std::unique_lock lock(mutex_);
        return idle_.wait_for(lock, limit, [this] { return queued_.empty() && !writing_; });
    }

private:
    void run() {
        std::unique_lock lock(mutex_);
        for (;;) {
            wake_.wait(lock, [this] { return !queued_.empty(); });
            std::string text = std::exchange(queued_, {});
            if (const auto dropped = std::exchange(dropped_, 0))
                text += "wsbroadcast-server: warn: " + std::to_string(dropped) +
                        " log line(s) dropped before this one: the log is not read fast enough\n";
            writing_ = true;
            lock.unlock();
            write_all(text);  // the only blocking call, and no lock held across it
            lock.lock();
            writing_ = false;
            if (queued_.empty()) idle_.notify_all();
        }
    }

    void write_all(std::string_view text) const {
        while (!text.empty()) {
            const auto n = ::write(fd_, text.data(), text.size());
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) return;  // EPIPE, a full disk: there is nowhere left to say so
            text.remove_prefix(static_cast<std::size_t>(n));
        }
    }

    const int fd_;
    const std::size_t max_queued_bytes_;
    std::mutex mutex_;
    std::condition_variable wake_, idle_;
    std::string queued_;
    std::size_t dropped_ = 0;
    bool writing_ = false;
};

}  // namespace wsbroadcast_server
