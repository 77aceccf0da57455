// How a log line looks: plain text with a UTC timestamp for a terminal or a file, the priority
// prefixes journald reads when systemd runs the server, or one JSON object per line for log
// shippers (--log-format).
#pragma once

#include "routes.hpp"  // json_string, valid_utf8

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <optional>
#include <string>
#include <string_view>

#include <sys/stat.h>

namespace wsbroadcast_server {

// error: failures; warn: start-up and shutdown; info: + every refusal; debug: + every connection.
enum class log_level { error, warn, info, debug };

enum class log_format {
    text,     // 2026-12-02T05:50:01.123Z wsbroadcast-server: info: ...
    journal,  // <6>wsbroadcast-server: info: ... (journald adds the time itself)
    json,     // {"time":"...","level":"info","message":"..."}
};

inline std::optional<log_format> parse_log_format(std::string_view text) {
    if (text == "text") return log_format::text;
    if (text == "journal") return log_format::journal;
    if (text == "json") return log_format::json;
    return std::nullopt;
}

/// journald sets JOURNAL_STREAM to "device:inode" of the stream it gave us as stderr; a stderr
/// redirected elsewhere since (a shell in between) is not the journal any more.
inline bool stderr_is_journal(const char* journal_stream, int stderr_fd = 2) {
    if (!journal_stream) return false;
    unsigned long long device = 0, inode = 0;
    if (std::sscanf(journal_stream, "%llu:%llu", &device, &inode) != 2) return false;
    struct stat st{};
    return fstat(stderr_fd, &st) == 0 && st.st_dev == device && st.st_ino == inode;
}

/// RFC 3339, UTC, milliseconds.
inline std::string utc_timestamp(std::chrono::system_clock::time_point at) {
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(at.time_since_epoch()).count();
    const std::time_t seconds = static_cast<std::time_t>(ms / 1000);
    std::tm utc{};
    gmtime_r(&seconds, &utc);
    char out[64];  // room for any int the compiler cannot rule out
    std::snprintf(out, sizeof out, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", utc.tm_year + 1900, utc.tm_mon + 1,
                  utc.tm_mday, utc.tm_hour, utc.tm_min, utc.tm_sec, static_cast<int>(ms % 1000));
    return out;
}

/// One line, '\n' included.
inline std::string format_log_line(log_format format, log_level level, std::string_view what,
                                   std::chrono::system_clock::time_point at) {
    static constexpr std::string_view names[] = {"error", "warn", "info", "debug"};
    static constexpr std::string_view priorities[] = {"<3>", "<4>", "<6>", "<7>"};  // sd-daemon.h's
    const auto i = static_cast<int>(level);
    switch (format) {
    case log_format::text:
        return utc_timestamp(at) + " wsbroadcast-server: " + std::string(names[i]) + ": " + std::string(what) + "\n";
    case log_format::journal:
        return std::string(priorities[i]) + "wsbroadcast-server: " + std::string(names[i]) + ": " + std::string(what) +
               "\n";
    case log_format::json: {
        // A line a shipper can always parse: bytes that are not UTF-8 are escaped one by one.
        std::string message = json_string(what);
        if (!valid_utf8(what)) {
            std::string escaped;
            for (unsigned char c : message) {
                if (c < 0x80) {
                    escaped += static_cast<char>(c);
                    continue;
                }
                static constexpr char digits[] = "0123456789abcdef";
                escaped += "\\u00";
                escaped += digits[c >> 4];
                escaped += digits[c & 15];
            }
            message = std::move(escaped);
        }
        return R"({"time":")" + utc_timestamp(at) + R"(","level":")" + std::string(names[i]) + R"(","message":)" +
               message + "}\n";
    }
    }
    return {};
}

}  // namespace wsbroadcast_server
