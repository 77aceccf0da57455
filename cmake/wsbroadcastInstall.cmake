# Install rules and packages for wsbroadcast, included by the root CMakeLists.txt when
# WSBROADCAST_INSTALL is ON (the default when wsbroadcast is the top-level project).
#
#   include/wsbroadcast.hpp
#   share/cmake/wsbroadcast/   wsbroadcastConfig.cmake, ...ConfigVersion.cmake, ...Targets.cmake
#   share/pkgconfig/           wsbroadcast.pc, wsbroadcast-standalone.pc
#
# The header is architecture-independent, so everything lives under share/ (pkg-config and CMake
# both search there). The build tree is a package too: find_package(wsbroadcast) with
# wsbroadcast_DIR set to the build directory uses the header in the source tree.

include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(WSBROADCAST_INSTALL_CMAKEDIR "${CMAKE_INSTALL_DATADIR}/cmake/wsbroadcast"
    CACHE STRING "Where to install the CMake package files, relative to the prefix")
set(WSBROADCAST_INSTALL_PKGCONFIGDIR "${CMAKE_INSTALL_DATADIR}/pkgconfig"
    CACHE STRING "Where to install the pkg-config files, relative to the prefix")

# ---- header and targets ----------------------------------------------------------------------

install(FILES "${PROJECT_SOURCE_DIR}/wsbroadcast.hpp" DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}")
target_include_directories(wsbroadcast INTERFACE $<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>)
target_include_directories(wsbroadcast_standalone INTERFACE $<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>)

install(TARGETS wsbroadcast wsbroadcast_standalone EXPORT wsbroadcastTargets)
install(EXPORT wsbroadcastTargets NAMESPACE wsbroadcast::
        DESTINATION "${WSBROADCAST_INSTALL_CMAKEDIR}")
export(EXPORT wsbroadcastTargets NAMESPACE wsbroadcast::
       FILE "${PROJECT_BINARY_DIR}/wsbroadcastTargets.cmake")

# ---- CMake package: one config file serves the build tree and the install tree ---------------

set(WSBROADCAST_BOOST_MIN_VERSION 1.81)
configure_package_config_file(
  "${CMAKE_CURRENT_LIST_DIR}/wsbroadcastConfig.cmake.in"
  "${PROJECT_BINARY_DIR}/wsbroadcastConfig.cmake"
  INSTALL_DESTINATION "${WSBROADCAST_INSTALL_CMAKEDIR}")
if(PROJECT_VERSION_MAJOR EQUAL 0)
  set(WSBROADCAST_COMPATIBILITY SameMinorVersion)
else()
  set(WSBROADCAST_COMPATIBILITY SameMajorVersion)
endif()
write_basic_package_version_file(
  "${PROJECT_BINARY_DIR}/wsbroadcastConfigVersion.cmake"
  VERSION "${PROJECT_VERSION}"
  # While the version is 0.x a minor release may break the API: only the same 0.y is compatible.
  COMPATIBILITY ${WSBROADCAST_COMPATIBILITY}
  ARCH_INDEPENDENT)
install(FILES "${PROJECT_BINARY_DIR}/wsbroadcastConfig.cmake"
              "${PROJECT_BINARY_DIR}/wsbroadcastConfigVersion.cmake"
        DESTINATION "${WSBROADCAST_INSTALL_CMAKEDIR}")

# ---- pkg-config: relocatable (prefix found from the .pc file's own location) ----------------

if(IS_ABSOLUTE "${WSBROADCAST_INSTALL_PKGCONFIGDIR}")
  set(WSBROADCAST_PC_PREFIX "${CMAKE_INSTALL_PREFIX}")
else()
  file(RELATIVE_PATH _wsb_up "/${WSBROADCAST_INSTALL_PKGCONFIGDIR}" "/")
  string(REGEX REPLACE "/$" "" _wsb_up "${_wsb_up}")
  set(WSBROADCAST_PC_PREFIX "\${pcfiledir}/${_wsb_up}")
endif()
if(IS_ABSOLUTE "${CMAKE_INSTALL_INCLUDEDIR}")
  set(WSBROADCAST_PC_INCLUDEDIR "${CMAKE_INSTALL_INCLUDEDIR}")
else()
  set(WSBROADCAST_PC_INCLUDEDIR "\${prefix}/${CMAKE_INSTALL_INCLUDEDIR}")
endif()

set(WSBROADCAST_PC_NAME wsbroadcast)
set(WSBROADCAST_PC_DESCRIPTION "WebSocket fan-out for C++20, header-only (Boost.Asio)")
set(WSBROADCAST_PC_CFLAGS "")
configure_file("${CMAKE_CURRENT_LIST_DIR}/wsbroadcast.pc.in" "${PROJECT_BINARY_DIR}/wsbroadcast.pc" @ONLY)

set(WSBROADCAST_PC_NAME wsbroadcast-standalone)
set(WSBROADCAST_PC_DESCRIPTION "WebSocket fan-out for C++20, header-only (standalone Asio)")
set(WSBROADCAST_PC_CFLAGS " -DWSBROADCAST_STANDALONE_ASIO")
configure_file("${CMAKE_CURRENT_LIST_DIR}/wsbroadcast.pc.in" "${PROJECT_BINARY_DIR}/wsbroadcast-standalone.pc" @ONLY)

install(FILES "${PROJECT_BINARY_DIR}/wsbroadcast.pc" "${PROJECT_BINARY_DIR}/wsbroadcast-standalone.pc"
        DESTINATION "${WSBROADCAST_INSTALL_PKGCONFIGDIR}")
