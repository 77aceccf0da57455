// The smallest type that models wsbroadcast::message_socket: an executor and a message write.
// The packaging tests only check that a consumer compiles, links and runs; nothing is sent.
#pragma once

#include <wsbroadcast.hpp>

#include <cstddef>

struct null_socket {
    using executor_type = wsbroadcast::net::any_io_executor;

    executor_type executor;

    executor_type get_executor() const { return executor; }

    // Completes at once, as if the whole message had been written.
    template <class Token>
    auto async_write(wsbroadcast::net::const_buffer buffer, Token&& token) {
        return wsbroadcast::net::async_compose<Token, void(wsbroadcast::error_code, std::size_t)>(
            [size = buffer.size()](auto& self) { self.complete(wsbroadcast::error_code{}, size); }, token, executor);
    }
};

static_assert(wsbroadcast::message_socket<null_socket>);
