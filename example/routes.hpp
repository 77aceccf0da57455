// The reference server's routing rules: pure functions of the request line, no I/O, no Beast.
// Kept apart so that tests (and fuzzers) can drive them directly.
#pragma once

#include <algorithm>
#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace wsbroadcast_server {

/// LNbits' rule for an id: 1 to 128 bytes of [A-Za-z0-9:_-].
constexpr std::size_t max_id_length = 128;

inline bool valid_id(std::string_view id) {
    if (id.empty() || id.size() > max_id_length) return false;
    for (unsigned char c : id) {
        const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == ':' ||
                        c == '_' || c == '-';
        if (!ok) return false;
    }
    return true;
}

/// Whether `text` is well-formed UTF-8 (RFC 3629): no stray continuation byte, no truncated
/// sequence, no overlong form, no surrogate (U+D800 to U+DFFF), nothing past U+10FFFF. A WebSocket
/// text message must be (RFC 6455 section 8.1): clients fail the connection on anything else.
inline bool valid_utf8(std::string_view text) {
    struct sequence {
        std::size_t length;       // 0: this byte cannot start one
        unsigned char low, high;  // the range of the second byte, which rules out the invalid values
    };
    auto starting_with = [](unsigned char lead) -> sequence {
        if (lead >= 0xC2 && lead <= 0xDF) return {2, 0x80, 0xBF};
        if (lead == 0xE0) return {3, 0xA0, 0xBF};  // below: overlong
        if (lead == 0xED) return {3, 0x80, 0x9F};  // above: surrogates
        if (lead >= 0xE1 && lead <= 0xEF) return {3, 0x80, 0xBF};
        if (lead == 0xF0) return {4, 0x90, 0xBF};  // below: overlong
        if (lead == 0xF4) return {4, 0x80, 0x8F};  // above: past U+10FFFF
        if (lead >= 0xF1 && lead <= 0xF3) return {4, 0x80, 0xBF};
        return {0, 0, 0};  // 0x80 to 0xC1: a continuation or an overlong lead; 0xF5 and up: past U+10FFFF
    };
    auto byte = [text](std::size_t i) { return static_cast<unsigned char>(text[i]); };
    for (std::size_t i = 0; i < text.size();) {
        if (byte(i) < 0x80) {
            ++i;
            continue;
        }
        const auto s = starting_with(byte(i));
        if (s.length == 0 || text.size() - i < s.length) return false;
        if (byte(i + 1) < s.low || byte(i + 1) > s.high) return false;
        for (std::size_t k = 2; k < s.length; ++k)
            if ((byte(i + k) & 0xC0) != 0x80) return false;
        i += s.length;
    }
    return true;
}

/// Percent-decoding, as Python's urllib.parse.unquote (what LNbits runs on) does it: a '%' not
/// followed by two hex digits is kept as it is, so "50%%20off" is "50% off" and "%zz" stays "%zz".
/// In a query string '+' also means a space.
inline std::string url_decode(std::string_view in, bool plus_is_space = false) {
    auto hex = [](char c) -> int {
        if (c >= '0' && c <= '9') return c - '0';
        if (c >= 'a' && c <= 'f') return c - 'a' + 10;
        if (c >= 'A' && c <= 'F') return c - 'A' + 10;
        return -1;
    };
    std::string out;
    out.reserve(in.size());
    for (std::size_t i = 0; i < in.size(); ++i) {
        const int hi = in[i] == '%' && i + 2 < in.size() ? hex(in[i + 1]) : -1;
        const int lo = hi < 0 ? -1 : hex(in[i + 2]);
        if (lo >= 0) {
            out.push_back(static_cast<char>(hi * 16 + lo));
            i += 2;
        } else if (in[i] == '+' && plus_is_space) {
            out.push_back(' ');
        } else {
            out.push_back(in[i]);
        }
    }
    return out;
}

/// The raw (still encoded) value of `name` in a query string ("a=1&data=x"); nullopt if absent.
inline std::optional<std::string_view> query_param(std::string_view query, std::string_view name) {
    while (!query.empty()) {
        const auto amp = query.find('&');
        const auto pair = query.substr(0, amp);
        const auto eq = pair.find('=');
        if (pair.substr(0, eq) == name) return eq == pair.npos ? std::string_view{} : pair.substr(eq + 1);
        if (amp == query.npos) break;
        query.remove_prefix(amp + 1);
    }
    return std::nullopt;
}

/// JSON string escaping (RFC 8259): quotes, backslash and control characters. What needs none is
/// copied a run at a time (a push's answer echoes its data through here).
inline std::string json_string(std::string_view s) {
    std::string out;
    out.reserve(s.size() + 2);
    out += '"';
    std::size_t copied = 0;  // s before this is in out
    for (std::size_t i = 0; i < s.size(); ++i) {
        const auto c = static_cast<unsigned char>(s[i]);
        if (c >= 0x20 && c != '"' && c != '\\') continue;
        out.append(s, copied, i - copied);
        copied = i + 1;
        switch (c) {
        case '"': out += "\\\""; break;
        case '\\': out += "\\\\"; break;
        case '\n': out += "\\n"; break;
        case '\r': out += "\\r"; break;
        case '\t': out += "\\t"; break;
        default: {
            static constexpr char digits[] = "0123456789abcdef";
            out += "\\u00";
            out += digits[c >> 4];
            out += digits[c & 15];
        }
        }
    }
    out.append(s, copied);
    out += '"';
    return out;
}

/// Compares a presented secret with the expected one in time that depends only on their lengths,
/// so response timing does not reveal how much of a guess was right.
inline bool secret_matches(std::string_view given, std::string_view expected) {
    if (given.size() != expected.size()) return false;
    unsigned char diff = 0;
    for (std::size_t i = 0; i < given.size(); ++i) diff |= static_cast<unsigned char>(given[i] ^ expected[i]);
    return diff == 0;
}

/// The token of an "Authorization: Bearer TOKEN" header; empty if the header has another form.
inline std::string_view bearer_token(std::string_view authorization) {
    constexpr std::string_view scheme = "Bearer ";
    if (authorization.size() <= scheme.size()) return {};
    for (std::size_t i = 0; i < scheme.size(); ++i)  // the scheme is case-insensitive (RFC 7235)
        if ((authorization[i] | 0x20) != (scheme[i] | 0x20)) return {};
    return authorization.substr(scheme.size());
}

/// Where --redis points: redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]. The database number is accepted
/// for compatibility and otherwise unused: Redis pub/sub channels belong to the whole server.
struct redis_address {
    std::string host;
    unsigned short port = 6379;
    std::string user, password;  // AUTH [user] password, when a password is given
    unsigned db = 0;
};

/// `url` with its password replaced by "***", for messages: a bad --redis value is echoed without it.
inline std::string redacted_redis_url(std::string_view url) {
    const auto start = url.find("://");
    const auto at = url.rfind('@');
    if (start == url.npos || at == url.npos || at < start) return std::string(url);
    const auto colon = url.find(':', start + 3);
    if (colon == url.npos || colon > at) return std::string(url);
    return std::string(url.substr(0, colon + 1)) + "***" + std::string(url.substr(at));
}

inline std::optional<redis_address> parse_redis_url(std::string_view url) {
    constexpr std::string_view scheme = "redis://";
    if (!url.starts_with(scheme)) return std::nullopt;
    url.remove_prefix(scheme.size());
    redis_address a;
    auto digits = [](std::string_view text, auto& out, unsigned long max) {
        if (text.empty() || text.size() > 5) return false;
        unsigned long n = 0;
        for (char c : text) {
            if (c < '0' || c > '9') return false;
            n = n * 10 + static_cast<unsigned long>(c - '0');
        }
        if (n > max) return false;
        out = static_cast<std::remove_reference_t<decltype(out)>>(n);
        return true;
    };
    // The user and password first: a password may hold '/' (base64) and, percent-encoded, anything.
    if (const auto at = url.rfind('@'); at != url.npos) {
        const auto userinfo = url.substr(0, at);
        const auto colon = userinfo.find(':');
        if (colon == userinfo.npos) return std::nullopt;  // a user with no password says nothing
        a.user = url_decode(userinfo.substr(0, colon));
        a.password = url_decode(userinfo.substr(colon + 1));
        if (a.password.empty()) return std::nullopt;
        url = url.substr(at + 1);
    }
    if (const auto slash = url.find('/'); slash != url.npos) {
        if (!digits(url.substr(slash + 1), a.db, 65535)) return std::nullopt;
        url = url.substr(0, slash);
    }
    if (url.starts_with('[')) {  // [::1]:6379
        const auto close = url.find(']');
        if (close == url.npos) return std::nullopt;
        a.host = url.substr(1, close - 1);
        url.remove_prefix(close + 1);
    } else {
        const auto colon = url.find(':');
        a.host = url.substr(0, colon);
        url.remove_prefix(colon == url.npos ? url.size() : colon);
    }
    if (a.host.empty()) return std::nullopt;
    if (!url.empty()) {
        if (url[0] != ':' || !digits(url.substr(1), a.port, 65535) || a.port == 0) return std::nullopt;
    }
    return a;
}

/// Whether a Sec-WebSocket-Protocol value offers `protocol`. The value is a comma-separated list
/// of tokens (RFC 6455 section 11.3.4, RFC 9110 lists: spaces and tabs around an element, empty
/// elements allowed); tokens compare exactly. A request may carry the header more than once: ask
/// about each value.
inline bool offers_subprotocol(std::string_view header, std::string_view protocol) {
    auto is_space = [](char c) { return c == ' ' || c == '\t'; };
    while (!header.empty()) {
        const auto comma = header.find(',');
        auto token = header.substr(0, comma);
        while (!token.empty() && is_space(token.front())) token.remove_prefix(1);
        while (!token.empty() && is_space(token.back())) token.remove_suffix(1);
        if (token == protocol) return true;
        if (comma == header.npos) break;
        header.remove_prefix(comma + 1);
    }
    return false;
}

/// What Beast's accept would refuse in an upgrade request that websocket::is_upgrade() let through
/// (HTTP/1.1, GET, Connection: upgrade, Upgrade: websocket), answered the same way, but before the
/// manager registers the connection: a handshake that fails there has already told the relay about
/// its id (a SUBSCRIBE and an UNSUBSCRIBE in Redis for nothing). Each header is its first value,
/// as Beast reads it; nullopt when absent.
struct upgrade_problem {
    int status = 0;  // 0: Beast accepts it; 400, or 426 (answered with Sec-WebSocket-Version: 13)
    std::string_view reason;
};

inline upgrade_problem check_upgrade(bool has_host, std::optional<std::string_view> key,
                                     std::optional<std::string_view> version) {
    constexpr std::size_t max_key_length = 24;  // base64 of 16 bytes: Beast's buffer for the key
    if (!has_host) return {400, "a WebSocket upgrade needs a Host header"};
    if (!key) return {400, "a WebSocket upgrade needs Sec-WebSocket-Key"};
    if (key->size() > max_key_length) return {400, "Sec-WebSocket-Key is longer than 24 characters"};
    if (!version) return {400, "a WebSocket upgrade needs Sec-WebSocket-Version"};
    if (*version != "13") return {426, "unsupported Sec-WebSocket-Version: this server speaks 13"};
    return {};
}

/// A push may name several ids, "a,b,c" (',' is not an id character); at most this many, as written.
constexpr std::size_t max_ids_per_push = 64;

inline constexpr std::string_view invalid_id_problem = "invalid id: expected 1 to 128 characters of [A-Za-z0-9:_-]";

/// The ids of a push, from its decoded path segment: each valid, repeats dropped (the first
/// occurrence keeps its place), 1 to max_ids_per_push of them as written. `problem` says why not.
struct id_list {
    std::vector<std::string> ids;
    std::string_view problem;  // empty: ids holds the list
};

inline id_list parse_id_list(std::string_view text) {
    id_list out;
    auto fail = [&out](std::string_view why) {
        out.ids.clear();
        out.problem = why;
        return out;
    };
    const bool is_list = text.find(',') != text.npos;
    std::size_t written = 0;
    for (;;) {
        const auto comma = text.find(',');
        const auto id = text.substr(0, comma);
        if (++written > max_ids_per_push) return fail("too many ids: a push names at most 64");
        if (id.empty() && is_list) return fail("empty id in the list: two commas in a row, or one at an end");
        if (!valid_id(id)) return fail(invalid_id_problem);
        if (std::find(out.ids.begin(), out.ids.end(), id) == out.ids.end()) out.ids.emplace_back(id);
        if (comma == text.npos) return out;
        text.remove_prefix(comma + 1);
    }
}

enum class route_kind {
    page,           // GET /
    client_module,  // GET /wsbroadcast.js: the browser client for wsbroadcast.v1
    metrics,        // GET /metrics: Prometheus text format
    health,         // GET /healthz: the process is alive
    ready,          // GET /readyz: it should be sent clients (not draining, Redis there)
    subscribe,      // GET /api/v1/ws/{id} or the bare /api/v1/ws, must be a WebSocket upgrade
    push_body,      // POST /api/v1/ws/{ids}: ?data= or the body
    push_path,      // GET /api/v1/ws/{ids}/{data}
    preflight,      // OPTIONS /api/v1/ws/...: a browser's CORS check before a push
    bad_request,    // 400: bad id or list
    not_found,      // 404
    wrong_method,   // 405
};

struct route {
    route_kind kind = route_kind::not_found;
    // subscribe: the one id, or none for the bare /api/v1/ws (which only a client offering the
    // wsbroadcast.v1 subprotocol may open); pushes: the ids, as parse_id_list gives them.
    std::vector<std::string> ids;
    std::optional<std::string> data;  // push_path: the decoded data; push_body: ?data= if present
    std::string_view allow;           // wrong_method: the Allow header
    std::string_view problem;         // bad_request: why
};

inline constexpr std::string_view ws_prefix = "/api/v1/ws";

/// Routes a request by method ("GET", "POST", ...) and target ("/path?query"). Query parameters
/// other than ?data= are ignored (TPoS appends its own).
inline route route_request(std::string_view method, std::string_view target) {
    const auto question = target.find('?');
    const auto path = target.substr(0, question);
    const auto query = question == target.npos ? std::string_view{} : target.substr(question + 1);

    route r;
    for (auto [fixed, kind] :
         {std::pair{"/", route_kind::page}, std::pair{"/wsbroadcast.js", route_kind::client_module},
          std::pair{"/metrics", route_kind::metrics}, std::pair{"/healthz", route_kind::health},
          std::pair{"/readyz", route_kind::ready}}) {
        if (path != fixed) continue;
        if (method == "GET" || method == "HEAD")  // HEAD: what probes and monitors often send
            r.kind = kind;
        else
            r.kind = route_kind::wrong_method, r.allow = "GET, HEAD";
        return r;
    }
    auto bad = [&r](std::string_view why) {
        r.kind = route_kind::bad_request;
        r.problem = why;
        return r;
    };
    if (path == ws_prefix) {  // no id: only a multiplexed WebSocket, which subscribes later
        if (method != "GET") return bad(invalid_id_problem);
        r.kind = route_kind::subscribe;
        return r;
    }
    if (!(path.starts_with(ws_prefix) && path[ws_prefix.size()] == '/')) return r;
    if (method == "OPTIONS") {  // answered whatever the ids: the push itself says what is wrong with them
        r.kind = route_kind::preflight;
        return r;
    }

    auto rest = path.substr(ws_prefix.size() + 1);
    const auto slash = rest.find('/');
    const bool has_data = slash != rest.npos;

    // Decoded before splitting: a client that encodes the whole list ("a%2Cb") means the same list.
    const auto decoded = url_decode(rest.substr(0, slash));
    const bool subscribing = method == "GET" && !has_data;
    if (subscribing && decoded.find(',') != decoded.npos)
        return bad("one id per WebSocket URL; use the wsbroadcast.v1 subprotocol to subscribe to several");
    auto list = parse_id_list(decoded);
    if (!list.problem.empty()) return bad(list.problem);
    r.ids = std::move(list.ids);

    if (has_data) {
        if (method != "GET") {
            r.kind = route_kind::wrong_method;
            r.allow = "GET";
            return r;
        }
        r.data = url_decode(rest.substr(slash + 1));
        r.kind = route_kind::push_path;
        return r;
    }
    if (subscribing) {
        r.kind = route_kind::subscribe;
    } else if (method == "POST") {
        r.kind = route_kind::push_body;
        if (const auto raw = query_param(query, "data")) r.data = url_decode(*raw, true);
    } else {
        r.kind = route_kind::wrong_method;
        r.allow = "GET, POST";
    }
    return r;
}

}  // namespace wsbroadcast_server
