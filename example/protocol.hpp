// The wsbroadcast.v1 subprotocol (docs/protocol.md): the frames the server sends a multiplexed
// connection and the commands it reads from one. Pure functions, no I/O. Commands are parsed with
// Boost.JSON: a program using parse_command compiles <boost/json/src.hpp> in exactly one of its
// translation units (main.cpp does).
#pragma once

#include "routes.hpp"

#include "wsbroadcast.hpp"

#include <boost/json/parse.hpp>
#include <boost/json/value.hpp>

#include <optional>
#include <string>
#include <string_view>

namespace wsbroadcast_server::v1 {

/// What a client offers in Sec-WebSocket-Protocol to be served this protocol.
inline constexpr std::string_view subprotocol = "wsbroadcast.v1";

// ---- server -> client --------------------------------------------------------------------------

/// Every message pushed to a key the connection is subscribed to; `data` is the payload as pushed.
/// With history on, `position` is the message's own: resuming from it gets what came after it.
inline std::string message_frame(std::string_view key, std::string_view data,
                                 const std::optional<wsbroadcast::position>& position = std::nullopt) {
    return R"({"type":"message","key":)" + json_string(key) + R"(,"data":)" + json_string(data) +
           (position ? R"(,"position":")" + position->to_string() + '"' : std::string()) + "}";
}

/// The answer to a subscribe (and to the URL's id): sent before any message of that key, replayed
/// or live. With history on it carries the key's position; when the client asked to resume, also
/// whether everything it missed follows ("recovered") or why not ("reason").
inline std::string subscribed_frame(std::string_view key, const wsbroadcast::subscribed_info& info = {}) {
    std::string frame = R"({"type":"subscribed","key":)" + json_string(key);
    if (info.position) frame += R"(,"position":")" + info.position->to_string() + '"';
    if (info.outcome != wsbroadcast::recovery::live) {
        const bool recovered = info.outcome == wsbroadcast::recovery::recovered;
        frame += R"(,"recovered":)" + std::string(recovered ? "true" : "false");
        if (!recovered) frame += R"(,"reason":)" + json_string(wsbroadcast::describe(info.outcome));
    }
    return frame + "}";
}

/// The answer to an unsubscribe: no message of that key follows it.
inline std::string unsubscribed_frame(std::string_view key) {
    return R"({"type":"unsubscribed","key":)" + json_string(key) + "}";
}

/// A command refused; `key` is null when the command named none (or not as a string).
inline std::string error_frame(const std::optional<std::string>& key, std::string_view reason) {
    return R"({"type":"error","key":)" + (key ? json_string(*key) : std::string("null")) + R"(,"reason":)" +
           json_string(reason) + "}";
}

// ---- client -> server --------------------------------------------------------------------------

/// Where a client asks to start: "last" (the key's latest message) or a position it was given.
inline constexpr std::string_view since_problem = R"("since" must be "last" or a position the server gave)";
inline std::optional<wsbroadcast::since> parse_since(std::string_view text) {
    if (text == "last") return wsbroadcast::since::latest();
    if (const auto p = wsbroadcast::position::parse(text)) return wsbroadcast::since::after(*p);
    return std::nullopt;
}

struct command {
    enum kind_type { subscribe, unsubscribe, invalid } kind = invalid;
    std::optional<std::string> key;  // as the client sent it, when it sent a string
    wsbroadcast::since since;        // subscribe: where to start
    std::string_view problem;        // invalid: the reason its error frame gives
};

/// Reads one client frame: {"type":"subscribe"|"unsubscribe","key":"<id>"}, and for subscribe an
/// optional "since" (see parse_since). Fields it does not know are ignored, so later versions may
/// add some. Never throws but for lack of memory.
inline command parse_command(std::string_view frame, bool binary) {
    command c;
    auto invalid = [&c](std::string_view why) {
        c.kind = command::invalid;
        c.problem = why;
        return c;
    };
    if (binary) return invalid("commands are JSON text frames, not binary");
    boost::json::error_code ec;
    const auto value = boost::json::parse(frame, ec);
    if (ec) return invalid("not valid JSON");
    const auto* object = value.if_object();
    if (!object) return invalid("a command is a JSON object");
    if (const auto* key = object->if_contains("key"); key && key->is_string()) c.key = std::string(key->get_string());
    const auto* type = object->if_contains("type");
    const auto* type_text = type ? type->if_string() : nullptr;
    if (type_text && *type_text == "subscribe")
        c.kind = command::subscribe;
    else if (type_text && *type_text == "unsubscribe")
        c.kind = command::unsubscribe;
    else
        return invalid(R"("type" must be "subscribe" or "unsubscribe")");
    if (!c.key) return invalid(R"("key" must be a string)");
    if (!valid_id(*c.key)) return invalid("invalid key: expected 1 to 128 characters of [A-Za-z0-9:_-]");
    if (const auto* since = object->if_contains("since"); since && c.kind == command::subscribe) {
        const auto* text = since->if_string();
        const auto from = text ? parse_since(*text) : std::nullopt;
        if (!from) return invalid(since_problem);
        c.since = *from;
    }
    return c;
}

}  // namespace wsbroadcast_server::v1
