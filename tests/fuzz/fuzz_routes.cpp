// libFuzzer target: the reference server's request routing, id validation, URL decoding and the
// small parsers around them. Byte 0 picks the method; the rest is the request target.
// Every invariant below is something the server relies on; a violation traps.
#include "routes.hpp"

#include <cstddef>
#include <cstdint>
#include <string_view>

using namespace wsbroadcast_server;

namespace {
void require(bool ok) {
    if (!ok) __builtin_trap();
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size == 0) return 0;
    static constexpr std::string_view methods[] = {"GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS"};
    const auto method = methods[data[0] % std::size(methods)];
    const std::string_view target(reinterpret_cast<const char*>(data + 1), size - 1);

    const auto r = route_request(method, target);
    switch (r.kind) {
    case route_kind::subscribe:
    case route_kind::push_body:
    case route_kind::push_path:
        require(valid_id(r.id));  // nothing reaches the manager with an id LNbits would refuse
        break;
    case route_kind::page:
    case route_kind::metrics:
    case route_kind::health: require(method == "GET"); break;
    case route_kind::wrong_method: require(!r.allow.empty()); break;
    case route_kind::bad_request: require(!r.problem.empty()); break;
    case route_kind::not_found: break;
    }
    if (r.kind == route_kind::push_path) require(r.data.has_value());

    // Decoding never grows the input; a decoded string re-escaped as JSON has no raw control bytes.
    if (const auto decoded = url_decode(target, data[0] & 1)) {
        require(decoded->size() <= target.size());
        const auto json = json_string(*decoded);
        require(json.size() >= 2 && json.front() == '"' && json.back() == '"');
        for (unsigned char c : json) require(c >= 0x20);
    }
    if (const auto value = query_param(target, "data")) require(value->size() <= target.size());
    const auto token = bearer_token(target);
    require(token.size() < target.size() || token.empty());
    require(secret_matches(target, target));
    return 0;
}
