// How the reference server reads settings from the environment: pure functions, tested directly.
#pragma once

#include <cstddef>
#include <optional>
#include <string_view>

namespace wsbroadcast_server {

/// A flag's value from the environment: 1/true/yes/on or 0/false/no/off, in any case. Anything else,
/// the empty string included, is nullopt: a typo must not silently mean "on" (or "off").
inline std::optional<bool> parse_boolean(std::string_view text) {
    auto is = [text](std::string_view word) {
        if (text.size() != word.size()) return false;
        for (std::size_t i = 0; i < word.size(); ++i) {
            const char c = text[i] >= 'A' && text[i] <= 'Z' ? static_cast<char>(text[i] - 'A' + 'a') : text[i];
            if (c != word[i]) return false;
        }
        return true;
    };
    for (std::string_view yes : {"1", "true", "yes", "on"})
        if (is(yes)) return true;
    for (std::string_view no : {"0", "false", "no", "off"})
        if (is(no)) return false;
    return std::nullopt;
}

}  // namespace wsbroadcast_server
