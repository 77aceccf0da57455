// Each id's history in Redis, for --history-size with --redis: what the relay asks Redis to run,
// and how it reads the answers. Pure text and parsing, no I/O, so tests drive them.
//
// Per id, beside its pub/sub channel PREFIX + id:
//   PREFIX{h}id   a stream: one entry per push, its id <offset>-0, fields d (the data) and t (when,
//                 in ms by Redis' clock); at most --history-size entries, expiring --history-ttl
//                 after the last push;
//   PREFIX{m}id   a hash: e (the epoch, 16 hex digits), s (the newest offset), r (the run_id of the
//                 Redis that created e); it expires after an hour unused.
// ("{h}" and "{m}" start where an id does, so no id's keys are another id's.)
//
// A push runs publish_script: offsets are assigned, the entry appended and the message PUBLISHed
// with its position in one atomic step, so every instance sees an id's messages in offset order and
// Redis' history and its live stream never disagree. The epoch changes whenever Redis may have lost
// history: the hash is gone (expired, evicted, a Redis restarted without persistence), or it was
// made by another Redis process (r is not the run_id now: a restart from an older snapshot, or a
// failover, could otherwise hand out the same offsets twice).
#pragma once

#include "wsbroadcast.hpp"

#include <charconv>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace wsbroadcast_server::redis_history {

/// KEYS: the hash and the stream of each id, in pairs. ARGV: the run_id, --history-size, the
/// stream's expiry in ms (0: none), the hash's in s, a fresh epoch, the data, then each id's
/// channel. Returns each id's position, as text.
inline constexpr std::string_view publish_script = R"lua(
local now = redis.call('TIME')
local ms = now[1] * 1000 + math.floor(now[2] / 1000)
local out = {}
for i = 1, #KEYS / 2 do
  local meta, stream = KEYS[2 * i - 1], KEYS[2 * i]
  local had = redis.call('HMGET', meta, 'e', 'r')
  local epoch = had[1]
  if not epoch or had[2] ~= ARGV[1] then
    epoch = ARGV[5]
    redis.call('DEL', stream)
    redis.call('HSET', meta, 'e', epoch, 'r', ARGV[1], 's', 0)
  end
  local offset = redis.call('HINCRBY', meta, 's', 1)
  redis.call('XADD', stream, 'MAXLEN', ARGV[2], offset .. '-0', 'd', ARGV[6], 't', ms)
  if ARGV[3] ~= '0' then redis.call('PEXPIRE', stream, ARGV[3]) end
  redis.call('EXPIRE', meta, ARGV[4])
  local at = epoch .. '.' .. offset
  redis.call('PUBLISH', ARGV[6 + i], 'P' .. at .. ' ' .. ARGV[6])
  out[i] = at
end
return out
)lua";

/// KEYS: an id's hash and stream. ARGV: the run_id, a fresh epoch, the hash's expiry in s, then
/// the epoch and offset to read after (another epoch: from the start). Returns {epoch, newest
/// offset, Redis' time in ms, the entries after}. An id Redis knows nothing of gets its epoch now,
/// so that a first subscriber has a position to resume from on any instance.
inline constexpr std::string_view read_script = R"lua(
local had = redis.call('HMGET', KEYS[1], 'e', 'r', 's')
local epoch, top = had[1], had[3]
if not epoch or had[2] ~= ARGV[1] then
  epoch, top = ARGV[2], '0'
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 'r', ARGV[1], 's', 0)
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
local from = '-'
if epoch == ARGV[4] then from = '(' .. ARGV[5] .. '-0' end
local now = redis.call('TIME')
return {epoch, top, now[1] * 1000 + math.floor(now[2] / 1000), redis.call('XRANGE', KEYS[2], from, '+')}
)lua";

inline std::string meta_key(std::string_view prefix, std::string_view id) {
    return std::string(prefix) + "{m}" + std::string(id);
}
inline std::string stream_key(std::string_view prefix, std::string_view id) {
    return std::string(prefix) + "{h}" + std::string(id);
}

/// An epoch as the scripts keep it: 16 hex digits, never all zero.
inline std::string epoch_text(std::uint64_t epoch) {
    char text[17];
    auto end = std::to_chars(text, text + 16, epoch, 16).ptr;
    std::string out(text, end);
    return std::string(16 - out.size(), '0') + out;
}

/// An epoch read back; nullopt for anything the scripts would not have written.
inline std::optional<std::uint64_t> parse_epoch(std::string_view text) {
    std::uint64_t epoch = 0;
    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), epoch, 16);
    if (ec != std::errc() || end != text.data() + text.size() || text.size() != 16 || epoch == 0) return std::nullopt;
    return epoch;
}

/// One stream entry: its offset (the entry id's first part), data and time.
struct entry {
    std::uint64_t offset = 0;
    std::string_view data;
    std::int64_t at_ms = 0;
};

/// An offset as the scripts keep it, in decimal; nullopt for anything else.
inline std::optional<std::uint64_t> parse_offset(std::string_view text) {
    std::uint64_t offset = 0;
    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), offset);
    if (ec != std::errc() || end != text.data() + text.size()) return std::nullopt;
    return offset;
}

/// "<offset>-0" to the offset; 0 for anything else.
inline std::uint64_t entry_offset(std::string_view id) {
    if (!id.ends_with("-0")) return 0;
    return parse_offset(id.substr(0, id.size() - 2)).value_or(0);
}

}  // namespace wsbroadcast_server::redis_history
