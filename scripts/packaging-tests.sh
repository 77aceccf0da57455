#!/usr/bin/env bash
# Packaging tests: the consumer in tests/packaging/ is built through every way of getting
# wsbroadcast (a copied header, add_subdirectory, FetchContent, find_package from the build tree
# and from a relocated install tree, pkg-config, meson as a subproject and from a wrap, the Debian
# package) and run. All offline, in a temporary directory that is removed at the end.
#
# Prints "PASS name", "FAIL name" (followed by the end of its log, indented) or "SKIP name (why)"
# per consumer, and ends with the line "N passed, M failed". Exits 1 if any failed.
#
# deb-install needs root: it installs the package it built with dpkg -i, builds consumers against
# /usr, and removes the package again with dpkg -r (deb-server-install: the same for the server). It is skipped when not root, or when
# libwsbroadcast-dev was already installed (it would not leave the machine as it found it).
#
# Environment: CXX (default g++), JOBS (parallel compile jobs, default 1), KEEP=1 keeps the
# temporary directory. Packages it needs: scripts/deps.sh test.
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
here=$repo/tests/packaging
work=$(mktemp -d "${TMPDIR:-/tmp}/wsbroadcast-packaging.XXXXXX")
cleanup() { if [ "${KEEP:-0}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi; }
trap cleanup EXIT
trap 'exit 130' INT TERM

version=$(sed -n 's/^#define WSBROADCAST_VERSION_\(MAJOR\|MINOR\|PATCH\) \([0-9][0-9]*\).*/\2/p' \
          "$repo/wsbroadcast.hpp" | paste -sd.)
major=${version%%.*}
minor=${version#*.}
minor=${minor%%.*}
archive=$work/wsbroadcast-$version.tar.gz  # the source archive (FetchContent, meson wrap, deb)
prefix=$work/relocated                       # cmake --install goes elsewhere, then moves here

cxx=${CXX:-g++}
jobs=${JOBS:-1}
launcher=()  # ccache (same cache as scripts/test.sh), if there is one and its directory is writable
export CCACHE_DIR="${CCACHE_DIR:-${HOME:-/nonexistent}/.cache/wsbroadcast-ccache}" CCACHE_BASEDIR=$work CCACHE_NOHASHDIR=1
if command -v ccache >/dev/null && mkdir -p "$CCACHE_DIR" 2>/dev/null && [ -w "$CCACHE_DIR" ]; then
  launcher=(ccache)
fi
clang_args=()  # standalone Asio 1.22 on clang needs these (the .pc files cannot say "on clang")
case $("$cxx" --version 2>/dev/null) in *clang*) clang_args=(-DASIO_HAS_CO_AWAIT=1 -DASIO_HAS_STD_COROUTINE=1) ;; esac
cmake_args=(-DCMAKE_CXX_COMPILER="$cxx")
if command -v ninja >/dev/null; then cmake_args+=(-G Ninja); fi
if [ ${#launcher[@]} -gt 0 ]; then cmake_args+=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache); fi

# ---- helpers (they run inside a test's subshell, under set -e) ------------------------------

compile() { "${launcher[@]}" "$cxx" "$@"; }

stage() {  # stage NAME [PROJECT]: a fresh consumer directory: the shared sources + PROJECT's files
  local dir=$work/$1
  mkdir -p "$dir"
  cp "$here/main.cpp" "$here/second.cpp" "$here/null_socket.hpp" "$dir/"
  if [ -n "${2:-}" ]; then cp -R "$here/$2/." "$dir/"; fi
  echo "$dir"
}

check_run() {  # check_run BINARY FLAVOUR: it must print "wsbroadcast VERSION FLAVOUR" and exit 0
  local out
  out=$("$1") || { echo "$1 failed with status $?"; return 1; }
  if [ "$out" != "wsbroadcast $version $2" ]; then
    echo "$1 printed '$out', expected 'wsbroadcast $version $2'"
    return 1
  fi
  echo "ran $1: $out"
}

check_header() {  # check_header DEPFILE EXPECTED: the compile (-MD) used EXPECTED as wsbroadcast.hpp
  local used
  used=$(sed 's/[[:space:]\\]\+/\n/g' "$1" | grep '/wsbroadcast\.hpp$\|^wsbroadcast\.hpp$' | head -n1)
  used=$(realpath "$used")
  if [ "$used" != "$(realpath "$2")" ]; then
    echo "compiled against $used, expected $2"
    return 1
  fi
  echo "compiled against $used"
}

cmake_consumer() {  # cmake_consumer DIR [cmake args]: configure, build, run both flavours
  local dir=$1
  shift
  cmake -S "$dir" -B "$dir/build" "${cmake_args[@]}" "$@"
  cmake --build "$dir/build" -j "$jobs"
  check_run "$dir/build/consumer-boost" boost
  check_run "$dir/build/consumer-standalone" standalone
}

meson_consumer() {  # meson_consumer DIR: tests/packaging/meson with subprojects/ already set up
  CXX="${launcher[*]} $cxx" meson setup "$1/build" "$1" --wrap-mode=nodownload \
    --force-fallback-for=wsbroadcast,wsbroadcast-standalone
  meson compile -C "$1/build" -j "$jobs"
  check_run "$1/build/consumer-boost" boost
  check_run "$1/build/consumer-standalone" standalone
}

ensure_archive() {  # the source tree as a release archive: tracked and new files, not ignored ones
  [ -f "$archive" ] && return 0
  local dest=$work/src/wsbroadcast-$version
  mkdir -p "$dest"
  if git -C "$repo" rev-parse --git-dir >/dev/null 2>&1; then
    (cd "$repo" && git ls-files -z --cached --others --exclude-standard |
       while IFS= read -r -d '' f; do if [ -e "$f" ]; then printf '%s\0' "$f"; fi; done |
       tar --null -T - -cf -) | tar -C "$dest" -xf -
  else
    tar -C "$repo" --exclude=./.git --exclude=./build -cf - . | tar -C "$dest" -xf -
  fi
  tar -C "$work/src" -czf "$archive" "wsbroadcast-$version"
}

ensure_build_tree() {  # wsbroadcast configured as the top-level project (install rules on by default)
  [ -f "$work/wsbroadcast-build/wsbroadcastConfig.cmake" ] && return 0
  cmake -S "$repo" -B "$work/wsbroadcast-build" "${cmake_args[@]}" \
    -DWSBROADCAST_BUILD_TESTS=OFF -DWSBROADCAST_BUILD_EXAMPLE=OFF
}

ensure_install() {  # cmake --install into one prefix, then moved: the install must be relocatable
  [ -d "$prefix" ] && return 0
  ensure_build_tree
  cmake --install "$work/wsbroadcast-build" --prefix "$work/installed"
  mv "$work/installed" "$prefix"
}

# ---- the consumers ---------------------------------------------------------------------------

t_copy_header() {  # the header copied into a project, two translation units, -Werror
  local flavour=$1 dir unit defines=()
  dir=$(stage "copy-header-$flavour")
  mkdir "$dir/third_party"
  cp "$repo/wsbroadcast.hpp" "$dir/third_party/"
  if [ "$flavour" = standalone ]; then defines=(-DWSBROADCAST_STANDALONE_ASIO "${clang_args[@]}"); fi
  cd "$dir"
  for unit in main second; do
    compile -std=c++20 -Wall -Wextra -Wpedantic -Werror "${defines[@]}" -DWSBROADCAST_CONSUMER_TWO_UNITS \
      -Ithird_party -MD -c "$unit.cpp" -o "$unit.o"
  done
  "$cxx" main.o second.o -o consumer -pthread
  check_header main.d third_party/wsbroadcast.hpp
  check_run ./consumer "$flavour"
}

t_add_subdirectory() {
  local dir
  dir=$(stage cmake-add-subdirectory cmake-subdirectory)
  cmake_consumer "$dir" -DWSBROADCAST_SOURCE_DIR="$repo"
}

t_fetchcontent() {  # FetchContent of a release-style archive (file:// URL + SHA-256)
  local dir
  ensure_archive
  dir=$(stage cmake-fetchcontent cmake-fetchcontent)
  cmake_consumer "$dir" -DWSBROADCAST_URL="file://$archive" \
    -DWSBROADCAST_SHA256="$(sha256sum "$archive" | cut -d' ' -f1)"
}

t_find_package_build_tree() {  # export(): the build directory is a package too
  local dir
  ensure_build_tree
  dir=$(stage cmake-find-package-build-tree cmake-find-package)
  cmake_consumer "$dir" -Dwsbroadcast_DIR="$work/wsbroadcast-build" \
    -DWSBROADCAST_EXPECT_DIR="$work/wsbroadcast-build" -DWSBROADCAST_REQUEST="$version;COMPONENTS;boost;standalone"
}

t_find_package_install_tree() {  # an install tree, moved after installing, found by CMAKE_PREFIX_PATH
  local dir expected actual
  ensure_install
  expected=$(printf '%s\n' include/wsbroadcast.hpp share/cmake/wsbroadcast/wsbroadcastConfig.cmake \
             share/cmake/wsbroadcast/wsbroadcastConfigVersion.cmake share/cmake/wsbroadcast/wsbroadcastTargets.cmake \
             share/pkgconfig/wsbroadcast-standalone.pc share/pkgconfig/wsbroadcast.pc)
  actual=$(cd "$prefix" && find . -type f | sed 's|^\./||' | LC_ALL=C sort)
  if [ "$actual" != "$expected" ]; then printf 'installed:\n%s\nexpected:\n%s\n' "$actual" "$expected"; return 1; fi
  cmp "$repo/wsbroadcast.hpp" "$prefix/include/wsbroadcast.hpp"
  dir=$(stage cmake-find-package-install-tree cmake-find-package)
  cmake_consumer "$dir" -DCMAKE_PREFIX_PATH="$prefix" -DWSBROADCAST_EXPECT_DIR="$prefix/share/cmake/wsbroadcast" \
    -DWSBROADCAST_REQUEST="$major.$minor;COMPONENTS;boost;standalone"
}

t_find_package_rejects() {  # versions it is not compatible with, and unknown components, fail to configure
  local dir n=0 request pattern
  ensure_install
  dir=$(stage cmake-find-package-rejects cmake-find-package)
  while IFS='|' read -r request pattern; do
    [ -n "$request" ] || continue  # a case that does not apply to this version
    n=$((n + 1))
    if cmake -S "$dir" -B "$dir/build-$n" "${cmake_args[@]}" -DCMAKE_PREFIX_PATH="$prefix" \
         -DWSBROADCAST_REQUEST="$request" >"$dir/build-$n.log" 2>&1; then
      echo "find_package(wsbroadcast ${request//;/ } CONFIG REQUIRED) configured; it must fail"
      return 1
    fi
    if ! grep -q "$pattern" "$dir/build-$n.log"; then
      cat "$dir/build-$n.log"
      echo "find_package(wsbroadcast ${request//;/ }) failed, but the log does not say '$pattern'"
      return 1
    fi
    echo "find_package(wsbroadcast ${request//;/ } CONFIG REQUIRED) fails to configure, as it must"
  done <<EOF
99.0|compatible with requested version
$((major + 1)).0|compatible with requested version
$major.$((minor + 1))|compatible with requested version
$( [ "$major" = 0 ] && [ "$minor" -gt 0 ] && echo "0.$((minor - 1))|compatible with requested version" )
$version;COMPONENTS;no_such_component|considered to be NOT FOUND
EOF
}

pc_consumer() {  # pc_consumer FLAVOUR HEADER: compile with pkg-config's flags; HEADER must be used
  local flavour=$1 pc=wsbroadcast extra=()
  if [ "$flavour" = standalone ]; then
    pc=wsbroadcast-standalone
    extra=("${clang_args[@]}")
  fi
  [ "$(pkg-config --modversion "$pc")" = "$version" ] || { echo "$pc: version $(pkg-config --modversion "$pc")"; return 1; }
  # shellcheck disable=SC2046  # the flags are words
  compile -std=c++20 "${extra[@]}" $(pkg-config --cflags "$pc") -MD -MF "$flavour.d" main.cpp \
    -o "consumer-$flavour" $(pkg-config --libs "$pc")
  check_header "$flavour.d" "$2"
  check_run "./consumer-$flavour" "$flavour"
}

t_pkg_config() {  # both .pc files of the relocated install tree, with a plain compiler command line
  local dir
  ensure_install
  dir=$(stage pkg-config)
  cd "$dir"
  export PKG_CONFIG_PATH=$prefix/share/pkgconfig
  pc_consumer boost "$prefix/include/wsbroadcast.hpp"
  pc_consumer standalone "$prefix/include/wsbroadcast.hpp"
}

t_meson_install() {  # meson install (top level): the same header and .pc files as CMake's
  local pc field a b
  ensure_install
  CXX="$cxx" meson setup "$work/meson-top" "$repo" --prefix "$work/meson-installed"
  meson install -C "$work/meson-top" --no-rebuild
  cmp "$repo/wsbroadcast.hpp" "$work/meson-installed/include/wsbroadcast.hpp"
  for pc in wsbroadcast wsbroadcast-standalone; do
    for field in --modversion --cflags --libs; do
      a=$(PKG_CONFIG_PATH=$prefix/share/pkgconfig pkg-config "$field" "$pc")
      b=$(PKG_CONFIG_PATH=$work/meson-installed/share/pkgconfig pkg-config "$field" "$pc")
      a=${a//$prefix/PREFIX} b=${b//$work\/meson-installed/PREFIX}
      if [ "$a" != "$b" ]; then echo "$pc $field: CMake's says '$a', meson's says '$b'"; return 1; fi
      echo "$pc $field: $a"
    done
  done
}

t_meson_subproject() {  # subprojects/wsbroadcast is the source tree (a symlink)
  local dir
  dir=$(stage meson-subproject meson)
  rm "$dir/wsbroadcast.wrap.in"
  mkdir "$dir/subprojects"
  ln -s "$repo" "$dir/subprojects/wsbroadcast"
  meson_consumer "$dir"
}

t_meson_wrap() {  # subprojects/wsbroadcast.wrap, its archive already in subprojects/packagecache/
  local dir sha
  ensure_archive
  dir=$(stage meson-wrap meson)
  mkdir -p "$dir/subprojects/packagecache"
  cp "$archive" "$dir/subprojects/packagecache/"
  sha=$(sha256sum "$archive" | cut -d' ' -f1)
  sed -e "s/@VERSION@/$version/g" -e "s/@SHA256@/$sha/g" "$dir/wsbroadcast.wrap.in" >"$dir/subprojects/wsbroadcast.wrap"
  rm "$dir/wsbroadcast.wrap.in"
  meson_consumer "$dir"
  [ -f "$dir/subprojects/wsbroadcast-$version/wsbroadcast.hpp" ] || { echo "the wrap was not unpacked"; return 1; }
}

deb_version() { dpkg-parsechangelog -l "$repo/debian/changelog" -S Version; }
deb_file() { echo "$work/deb/libwsbroadcast-dev_$(deb_version)_all.deb"; }
server_deb_file() { echo "$work/deb/wsbroadcast-server_$(deb_version)_$(dpkg --print-architecture).deb"; }
deb_files() {  # deb_files DEB: what it installs, directories and /usr/share/doc/ left out
  dpkg-deb --fsys-tarfile "$1" | tar -t | sed 's|^\./|/|' | grep -v '/$' | grep -v '^/usr/share/doc/' | LC_ALL=C sort
}

t_deb_build() {  # dpkg-buildpackage -b from the source archive's tree; check what the .deb holds
  local deb_upstream expected actual
  for tool in dpkg-buildpackage dh dpkg-parsechangelog; do
    command -v "$tool" >/dev/null || { echo "$tool is missing: run scripts/deps.sh test"; return 1; }
  done
  deb_upstream=$(deb_version)
  deb_upstream=${deb_upstream%-*}
  if [ "$deb_upstream" != "$version" ]; then
    echo "debian/changelog is at $deb_upstream, the header at $version: add a changelog entry"
    return 1
  fi
  ensure_archive
  mkdir -p "$work/deb"
  tar -C "$work/deb" -xzf "$archive"
  (cd "$work/deb/wsbroadcast-$version" &&
     WSBROADCAST_CCACHE=${launcher[*]} DEB_BUILD_OPTIONS="nocheck parallel=$jobs" dpkg-buildpackage -us -uc -b)
  expected=$(printf '%s\n' /usr/include/wsbroadcast.hpp /usr/share/cmake/wsbroadcast/wsbroadcastConfig.cmake \
             /usr/share/cmake/wsbroadcast/wsbroadcastConfigVersion.cmake /usr/share/cmake/wsbroadcast/wsbroadcastTargets.cmake \
             /usr/share/pkgconfig/wsbroadcast-standalone.pc /usr/share/pkgconfig/wsbroadcast.pc)
  actual=$(deb_files "$(deb_file)")
  if [ "$actual" != "$expected" ]; then printf 'the .deb holds:\n%s\nexpected:\n%s\n' "$actual" "$expected"; return 1; fi
  [ "$(dpkg-deb -f "$(deb_file)" Architecture)" = all ]
  dpkg-deb -I "$(deb_file)"
  expected=$(printf '%s\n' /lib/systemd/system/wsbroadcast-server.service /lib/systemd/system/wsbroadcast-server.socket \
             /usr/bin/wsbroadcast-server /usr/share/man/man1/wsbroadcast-server.1.gz)
  actual=$(deb_files "$(server_deb_file)")
  if [ "$actual" != "$expected" ]; then printf 'the server .deb holds:\n%s\nexpected:\n%s\n' "$actual" "$expected"; return 1; fi
  dpkg-deb -I "$(server_deb_file)"
}

t_deb_lintian() {  # lintian on both packages: no error, no warning
  local said
  command -v lintian >/dev/null || { echo "lintian is missing: run scripts/deps.sh test"; return 1; }
  [ -f "$(server_deb_file)" ] || { echo "no .debs: deb-build failed"; return 1; }
  said=$(lintian --fail-on error,warning "$(deb_file)" "$(server_deb_file)" 2>&1) || { echo "$said"; return 1; }
  echo "${said:-lintian: nothing to say}"
}

t_deb_server_install() {  # dpkg -i the server: it runs, its units verify where installed; dpkg -r
  if [ "$(id -u)" != 0 ]; then echo "needs root for dpkg -i"; return 77; fi
  if dpkg-query -W -f='${Status}' wsbroadcast-server 2>/dev/null | grep -q 'ok installed' ||
     [ -e /usr/bin/wsbroadcast-server ]; then
    echo "wsbroadcast-server is already installed; not touching it"
    return 77
  fi
  [ -f "$(server_deb_file)" ] || { echo "no .deb: deb-build failed"; return 1; }
  trap 'dpkg -r wsbroadcast-server >/dev/null || true' EXIT
  dpkg -i "$(server_deb_file)"
  /usr/bin/wsbroadcast-server --version | grep -q "^wsbroadcast-server $version "
  man -w wsbroadcast-server
  if command -v systemd-analyze >/dev/null; then
    local said
    said=$(systemd-analyze verify /lib/systemd/system/wsbroadcast-server.service /lib/systemd/system/wsbroadcast-server.socket 2>&1)
    if [ -n "$said" ]; then echo "$said"; echo "systemd-analyze verify complained about the installed units"; return 1; fi
    echo "the installed units verify"
  fi
  dpkg -r wsbroadcast-server
  trap - EXIT
  if [ -e /usr/bin/wsbroadcast-server ] || [ -e /lib/systemd/system/wsbroadcast-server.service ]; then
    echo "dpkg -r left files behind"
    return 1
  fi
  echo "removed again"
}

t_deb_install() {  # dpkg -i, consumers against /usr (pkg-config and find_package), dpkg -r
  local dir
  if [ "$(id -u)" != 0 ]; then echo "needs root for dpkg -i"; return 77; fi
  if dpkg-query -W -f='${Status}' libwsbroadcast-dev 2>/dev/null | grep -q 'ok installed'; then
    echo "libwsbroadcast-dev is already installed; not touching it"
    return 77
  fi
  if [ -e /usr/include/wsbroadcast.hpp ]; then echo "/usr/include/wsbroadcast.hpp exists already"; return 77; fi
  [ -f "$(deb_file)" ] || { echo "no .deb: deb-build failed"; return 1; }
  trap 'dpkg -r libwsbroadcast-dev >/dev/null || true' EXIT
  dpkg -i "$(deb_file)"
  dir=$(stage deb-install cmake-find-package)
  (cd "$dir" && pc_consumer boost /usr/include/wsbroadcast.hpp)
  cmake_consumer "$dir" -DWSBROADCAST_EXPECT_DIR=/usr/share/cmake/wsbroadcast \
    -DWSBROADCAST_REQUEST="$version;COMPONENTS;boost;standalone"
  dpkg -r libwsbroadcast-dev
  trap - EXIT
  if [ -e /usr/include/wsbroadcast.hpp ] || [ -e /usr/share/cmake/wsbroadcast ] ||
     dpkg-query -W -f='${Status}' libwsbroadcast-dev 2>/dev/null | grep -q 'ok installed'; then
    echo "dpkg -r left files behind"
    return 1
  fi
  echo "removed again"
}

t_user_build_warns() {  # a user's build of the project: warnings on, never -Werror (CI turns it on)
  local dir=$work/user-build
  cmake -S "$repo" -B "$dir" "${cmake_args[@]}" -DWSBROADCAST_BUILD_TESTS=OFF >/dev/null
  if ! grep -q -- '-Wextra' "$dir"/build.ninja "$dir"/CMakeFiles/*/flags.make 2>/dev/null; then
    echo "the user's build has no -Wextra"
    return 1
  fi
  if grep -q -- '-Werror' "$dir"/build.ninja "$dir"/CMakeFiles/*/flags.make 2>/dev/null; then
    echo "the user's build compiles with -Werror"
    return 1
  fi
  echo "warnings on, -Werror off"
}

# ---- driver ----------------------------------------------------------------------------------

passed=0 failed=0
run() {  # run NAME FUNCTION [ARGS]: in a subshell under set -e, log kept; one line of verdict
  local name=$1 log=$work/logs/$1.log rc
  shift
  mkdir -p "$work/logs"
  (set -e; "$@") >"$log" 2>&1
  rc=$?
  case $rc in
    0) echo "PASS $name"; passed=$((passed + 1)) ;;
    77) echo "SKIP $name ($(tail -n1 "$log"))" ;;
    *) echo "FAIL $name"; tail -n 40 "$log" | sed 's/^/    /'; failed=$((failed + 1)) ;;
  esac
}

echo "wsbroadcast $version: packaging tests in $work (${launcher[*]:+ccache }$cxx, $jobs job(s))"
run copy-header-boost t_copy_header boost
run copy-header-standalone t_copy_header standalone
run cmake-add-subdirectory t_add_subdirectory
run cmake-fetchcontent t_fetchcontent
run cmake-find-package-build-tree t_find_package_build_tree
run cmake-find-package-install-tree t_find_package_install_tree
run cmake-find-package-rejects t_find_package_rejects
run user-build-warns t_user_build_warns
run pkg-config t_pkg_config
run meson-install-pkg-config t_meson_install
run meson-subproject t_meson_subproject
run meson-wrap t_meson_wrap
run deb-build t_deb_build
run deb-install t_deb_install
run deb-lintian t_deb_lintian
run deb-server-install t_deb_server_install
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
