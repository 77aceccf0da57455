// How the reference server puts an HTTP answer on the wire. Beast builds the message; its
// serializer would then walk a buffer sequence of one buffer per field, wrapped in prefix and
// suffix views, at every step of the write: a third of the server's instructions per push
// (bench/README.md, "The answer in one piece"), for about 150 bytes. The same bytes, flattened
// into a string the session keeps, cost a few hundred.
#pragma once

#include <boost/beast/http/message.hpp>

#include <string>
#include <string_view>

namespace wsbroadcast_server {

/// Replaces `out` with the bytes Beast's serializer writes before the body of `res`: the status
/// line ("HTTP/1.1 200 OK"), each field as "Name: value" in the order it was set, the blank line.
template <class Fields>
void write_head(const boost::beast::http::header<false, Fields>& res, std::string& out) {
    const auto digit = [](unsigned n) { return static_cast<char>('0' + n % 10); };
    const unsigned version = res.version(), code = res.result_int();
    out.assign("HTTP/");
    out += digit(version / 10);
    out += '.';
    out += digit(version);
    out += ' ';
    out += digit(code / 100);
    out += digit(code / 10);
    out += digit(code);
    out += ' ';
    out += std::string_view(res.reason());
    out += "\r\n";
    for (const auto& field : res) {
        out += std::string_view(field.name_string());
        out += ": ";
        out += std::string_view(field.value());
        out += "\r\n";
    }
    out += "\r\n";
}

}  // namespace wsbroadcast_server
