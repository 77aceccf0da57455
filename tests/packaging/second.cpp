// A second translation unit using the header. Linked with main.cpp (built with
// -DWSBROADCAST_CONSUMER_TWO_UNITS), it shows that everything the header defines outside a
// template is inline: otherwise the link fails with "multiple definition".
#include "null_socket.hpp"

std::size_t second_unit() {
    wsbroadcast::ConnectionManager<null_socket> manager;
    const auto refused = wsbroadcast::make_error_code(wsbroadcast::error::not_admitted);
    if (refused.message().empty() || wsbroadcast::close_code_for(wsbroadcast::error::not_admitted) != 1008) return 1;
    return manager.broadcast("x").queued + manager.key_count();
}
