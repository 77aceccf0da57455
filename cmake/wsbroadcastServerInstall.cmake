# The reference server, its manual page and its systemd units, installed only when asked for by
# component (a plain `cmake --install` installs the library alone: the header is what most want):
#
#   cmake --install build --component server
#
#   bin/wsbroadcast-server
#   share/man/man1/wsbroadcast-server.1   made from --help by help2man, when it is installed
#   lib/systemd/system/                   wsbroadcast-server.service, wsbroadcast-server.socket
#
# The service names the binary at the prefix given when configuring (CMAKE_INSTALL_PREFIX).

include(GNUInstallDirs)

set(WSBROADCAST_SYSTEMD_UNIT_DIR "lib/systemd/system"
    CACHE STRING "Where to install the systemd units, relative to the prefix or absolute (Debian 12: /lib/systemd/system)")

set(WSBROADCAST_BINDIR "${CMAKE_INSTALL_FULL_BINDIR}")
configure_file("${PROJECT_SOURCE_DIR}/example/systemd/wsbroadcast-server.service.in"
               "${PROJECT_BINARY_DIR}/systemd/wsbroadcast-server.service" @ONLY)

install(TARGETS wsbroadcast-server RUNTIME DESTINATION "${CMAKE_INSTALL_BINDIR}" COMPONENT server EXCLUDE_FROM_ALL)
install(FILES "${PROJECT_BINARY_DIR}/systemd/wsbroadcast-server.service"
              "${PROJECT_SOURCE_DIR}/example/systemd/wsbroadcast-server.socket"
        DESTINATION "${WSBROADCAST_SYSTEMD_UNIT_DIR}" COMPONENT server EXCLUDE_FROM_ALL)

find_program(WSBROADCAST_HELP2MAN help2man)
if(WSBROADCAST_HELP2MAN)
  set(_wsb_man "${PROJECT_BINARY_DIR}/wsbroadcast-server.1")
  add_custom_command(OUTPUT "${_wsb_man}"
    COMMAND "${WSBROADCAST_HELP2MAN}" --no-info --no-discard-stderr --section 1
            --name "WebSocket fan-out server speaking the LNbits WebSocket API"
            --output "${_wsb_man}" "$<TARGET_FILE:wsbroadcast-server>"
    DEPENDS wsbroadcast-server
    COMMENT "Writing the manual page from wsbroadcast-server --help")
  add_custom_target(wsbroadcast-server-manpage ALL DEPENDS "${_wsb_man}")
  install(FILES "${_wsb_man}" DESTINATION "${CMAKE_INSTALL_MANDIR}/man1" COMPONENT server EXCLUDE_FROM_ALL)
endif()
