// What Prometheus' client libraries call the process collector: CPU time, memory, descriptors and
// start time of this process, read from Linux's /proc, with the standard names.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>

#include <sys/resource.h>
#include <unistd.h>

namespace wsbroadcast_server {

struct process_figures {
    double cpu_seconds = 0;  // user + system
    std::uint64_t resident_bytes = 0, virtual_bytes = 0;
    std::uint64_t open_fds = 0, max_fds = 0;
    double start_time_seconds = 0;  // since the Unix epoch
};

/// Reads the figures now. Counting the open descriptors lists /proc/self/fd: O(descriptors),
/// but without any lock the server's I/O threads need.
inline process_figures read_process_figures() {
    process_figures f;
    const double ticks = static_cast<double>(sysconf(_SC_CLK_TCK));
    std::ifstream stat_file("/proc/self/stat");
    const std::string stat(std::istreambuf_iterator<char>(stat_file), {});
    // The command name, in parentheses, may hold spaces: the fields are counted after it.
    if (const auto close = stat.rfind(')'); close != std::string::npos) {
        std::istringstream fields(stat.substr(close + 2));
        std::string field;
        unsigned long long utime = 0, stime = 0, start_ticks = 0, vsize = 0, rss_pages = 0;
        for (int i = 3; fields >> field; ++i) {  // field 3 is the state, after "pid (comm)"
            if (i == 14) utime = std::stoull(field);
            if (i == 15) stime = std::stoull(field);
            if (i == 22) start_ticks = std::stoull(field);
            if (i == 23) vsize = std::stoull(field);
            if (i == 24) {
                rss_pages = std::stoull(field);
                break;
            }
        }
        f.cpu_seconds = static_cast<double>(utime + stime) / ticks;
        f.virtual_bytes = vsize;
        f.resident_bytes = rss_pages * static_cast<std::uint64_t>(sysconf(_SC_PAGESIZE));
        // The start is in ticks since boot; boot time is btime in /proc/stat.
        std::ifstream boot("/proc/stat");
        for (std::string word; boot >> word;)
            if (word == "btime") {
                double btime = 0;
                boot >> btime;
                f.start_time_seconds = btime + static_cast<double>(start_ticks) / ticks;
                break;
            }
    }
    std::error_code ec;
    for (auto it = std::filesystem::directory_iterator("/proc/self/fd", ec);
         !ec && it != std::filesystem::directory_iterator(); it.increment(ec))
        ++f.open_fds;
    if (f.open_fds) --f.open_fds;  // the listing's own descriptor
    rlimit limit{};
    if (getrlimit(RLIMIT_NOFILE, &limit) == 0) f.max_fds = limit.rlim_cur;
    return f;
}

}  // namespace wsbroadcast_server
