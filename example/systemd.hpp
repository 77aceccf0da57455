// How the reference server talks to systemd: readiness and stopping notifications (Type=notify)
// and the listening sockets of socket activation. Through libsystemd when the build found it
// (WSBROADCAST_HAVE_SYSTEMD); without it the server still builds and runs, and says so when systemd
// expects something of it that it cannot do.
#pragma once

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <unistd.h>

#if WSBROADCAST_HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#include <sys/socket.h>
#endif

namespace wsbroadcast_server::systemd {

inline constexpr bool available = WSBROADCAST_HAVE_SYSTEMD;

/// Tells the service manager about a state change ("READY=1", "STOPPING=1", "STATUS=..."). Nothing
/// happens outside systemd ($NOTIFY_SOCKET unset), or in a build without libsystemd.
inline void notify([[maybe_unused]] const std::string& state) {
#if WSBROADCAST_HAVE_SYSTEMD
    sd_notify(0, state.c_str());
#endif
}

/// Whether systemd waits for notify() (Type=notify): a build without libsystemd should say it cannot.
inline bool expects_notifications() { return std::getenv("NOTIFY_SOCKET") != nullptr; }

/// The sockets systemd passed this process (LISTEN_FDS, LISTEN_PID), from SD_LISTEN_FDS_START on.
/// `problem` is set, and nothing returned, when one is not a listening TCP socket, or when
/// sockets were passed to a build that cannot take them.
inline std::vector<int> listening_sockets(std::string& problem) {
    std::vector<int> fds;
#if WSBROADCAST_HAVE_SYSTEMD
    const int n = sd_listen_fds(1);  // 1: the variables are unset, so no child inherits them
    if (n < 0) {
        problem = std::string("cannot take the sockets systemd passed (LISTEN_FDS): ") + std::strerror(-n);
        return {};
    }
    for (int fd = SD_LISTEN_FDS_START; fd < SD_LISTEN_FDS_START + n; ++fd) {
        if (sd_is_socket(fd, AF_UNSPEC, SOCK_STREAM, 1) <= 0 ||
            (sd_is_socket(fd, AF_INET, SOCK_STREAM, 1) <= 0 && sd_is_socket(fd, AF_INET6, SOCK_STREAM, 1) <= 0)) {
            problem = "socket " + std::to_string(fd) +
                      " from systemd is not a listening TCP socket (ListenStream= takes an address and port)";
            return {};
        }
        fds.push_back(fd);
    }
#else
    const char* for_pid = std::getenv("LISTEN_PID");
    if (std::getenv("LISTEN_FDS") && for_pid && std::to_string(getpid()) == for_pid)
        problem = "systemd passed sockets (LISTEN_FDS), but this server was built without libsystemd";
#endif
    return fds;
}

}  // namespace wsbroadcast_server::systemd
