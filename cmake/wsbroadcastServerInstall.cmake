# The reference server and its systemd units, installed only when asked for by component:
#
#   cmake --install build --component server
#
#   bin/wsbroadcast-server
#   lib/systemd/system/        wsbroadcast-server.service, wsbroadcast-server.socket
#   share/doc/wsbroadcast-server/README.md
#
# A plain `cmake --install` installs the library alone: the header is what most users want.

include(GNUInstallDirs)

set(WSBROADCAST_SYSTEMD_UNIT_DIR "lib/systemd/system"
    CACHE STRING "Where to install the systemd units, relative to the prefix or absolute (Debian 12: /lib/systemd/system)")
set(WSBROADCAST_SERVER_DOCDIR "${CMAKE_INSTALL_DATADIR}/doc/wsbroadcast-server")

# The unit names the installed binary; the tests verify a copy that names the built one.
set(WSBROADCAST_BINDIR "${CMAKE_INSTALL_FULL_BINDIR}")
if(IS_ABSOLUTE "${WSBROADCAST_SERVER_DOCDIR}")
  set(WSBROADCAST_DOCDIR "${WSBROADCAST_SERVER_DOCDIR}")
else()
  set(WSBROADCAST_DOCDIR "${CMAKE_INSTALL_PREFIX}/${WSBROADCAST_SERVER_DOCDIR}")
endif()
configure_file("${PROJECT_SOURCE_DIR}/example/systemd/wsbroadcast-server.service.in"
               "${PROJECT_BINARY_DIR}/systemd/wsbroadcast-server.service" @ONLY)

install(TARGETS wsbroadcast-server RUNTIME DESTINATION "${CMAKE_INSTALL_BINDIR}" COMPONENT server EXCLUDE_FROM_ALL)
install(FILES "${PROJECT_BINARY_DIR}/systemd/wsbroadcast-server.service"
              "${PROJECT_SOURCE_DIR}/example/systemd/wsbroadcast-server.socket"
        DESTINATION "${WSBROADCAST_SYSTEMD_UNIT_DIR}" COMPONENT server EXCLUDE_FROM_ALL)
install(FILES "${PROJECT_SOURCE_DIR}/README.md" DESTINATION "${WSBROADCAST_SERVER_DOCDIR}"
        COMPONENT server EXCLUDE_FROM_ALL)
