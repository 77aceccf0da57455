// The consumer every packaging test builds, whatever the integration path (copied header,
// add_subdirectory, FetchContent, find_package, pkg-config, meson, the Debian package).
// It prints "wsbroadcast MAJOR.MINOR.PATCH FLAVOUR"; the driver checks the version and that the
// flavour is the one the target or .pc file promised.
#include "null_socket.hpp"

#include <cstdio>

#if defined(WSBROADCAST_CONSUMER_TWO_UNITS)
std::size_t second_unit();  // second.cpp
#endif

int main() {
    wsbroadcast::ConnectionManager<null_socket> manager;
    const auto result = manager.send("nobody", "x");
    if (manager.size() != 0 || result.queued != 0) return 1;
#if defined(WSBROADCAST_CONSUMER_TWO_UNITS)
    if (second_unit() != 0) return 1;
#endif
#if defined(WSBROADCAST_STANDALONE_ASIO)
    const char* flavour = "standalone";
#else
    const char* flavour = "boost";
#endif
    std::printf("wsbroadcast %d.%d.%d %s\n", WSBROADCAST_VERSION_MAJOR, WSBROADCAST_VERSION_MINOR,
                WSBROADCAST_VERSION_PATCH, flavour);
    return 0;
}
