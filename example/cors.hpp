// Cross-origin pushes (CORS, the Fetch standard): which browser origins may push, and what to
// answer them. Pure functions, tested directly.
#pragma once

#include <algorithm>
#include <string>
#include <string_view>
#include <vector>

namespace wsbroadcast_server {

/// Whether a push from `origin` (its Origin header; empty when it has none, as from curl or another
/// server) is allowed by `allowed` (--cors-origin: origins, or "*" for any).
inline bool origin_may_push(const std::vector<std::string>& allowed, std::string_view origin) {
    return origin.empty() || std::find(allowed.begin(), allowed.end(), "*") != allowed.end() ||
           std::find(allowed.begin(), allowed.end(), origin) != allowed.end();
}

/// The Access-Control-Allow-Origin value for a request from `origin`: "*" when any origin may push,
/// the origin itself when it is one of those allowed, empty (no header) otherwise.
inline std::string_view cors_allow_origin(const std::vector<std::string>& allowed, std::string_view origin) {
    if (std::find(allowed.begin(), allowed.end(), "*") != allowed.end()) return "*";
    if (!origin.empty() && std::find(allowed.begin(), allowed.end(), origin) != allowed.end()) return origin;
    return {};
}

}  // namespace wsbroadcast_server
