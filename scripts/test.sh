#!/usr/bin/env bash
# Installs what the tests need and runs the whole suite. Each leg says why it exists; any failure
# stops the run. The last leg ends with ctest's summary line.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh test

export CCACHE_DIR="${CCACHE_DIR:-$HOME/.cache/wsbroadcast-ccache}"
jobs=$(nproc)
start=$SECONDS
leg() { printf '\n==== [%4ds] %s\n' "$((SECONDS - start))" "$*"; }
cmake_leg() {  # cmake_leg DIR [cmake args...]: configure, build, run every test
  local dir=$1; shift
  cmake -S . -B "$dir" -G Ninja -DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DWSBROADCAST_WERROR=ON "$@" >/dev/null
  cmake --build "$dir" -j "$jobs"
  ctest --test-dir "$dir" --output-on-failure -j "$jobs"
}

leg "formatting: clang-format 19, as pinned in .clang-format"
scripts/check-format.sh

# Sanitizer legs compile at -O0 with line tables only: Beast translation units build several times
# faster that way, and reports still name file and line. The quick start is compiled by the g++ leg.
sanitized=(-DCMAKE_CXX_COMPILER=clang++-19 -DCMAKE_BUILD_TYPE=None -DWSBROADCAST_QUICKSTART=OFF)

leg "clang-19, ASan+UBSan (halt on error): memory errors and undefined behaviour; fuzzers, 60 s each"
ASAN_OPTIONS=halt_on_error=1:detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  cmake_leg build/asan "${sanitized[@]}" -DWSBROADCAST_BUILD_FUZZERS=ON \
    -DCMAKE_CXX_FLAGS="-O0 -gline-tables-only -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"

leg "clang-19, TSan: the manager is called from many threads; the server built without libsystemd"
TSAN_OPTIONS=halt_on_error=1 \
  cmake_leg build/tsan "${sanitized[@]}" -DWSBROADCAST_SYSTEMD=OFF -DCMAKE_CXX_FLAGS="-O0 -gline-tables-only -fsanitize=thread"

leg "meson + g++ 12: the second build system, both Asio flavours, -Werror"
if [ ! -d build/meson ]; then CXX="ccache g++" meson setup build/meson --buildtype=debug -Dwerror=true >/dev/null; fi
meson configure build/meson -Dwerror=true  # an older build/meson too: warnings are errors here
meson test -C build/meson --print-errorlogs

leg "packaging: copy the header, add_subdirectory, FetchContent, find_package, pkg-config, meson, .deb"
scripts/packaging-tests.sh

leg "g++ 12 with CMake: -Wall -Wextra -Wpedantic -Werror, both Asio flavours, the README quick start, the page in chromium (this node and Debian's 18)"
npm ci --prefix tests/browser --no-audit --no-fund --silent
# The page also runs on Debian 12's own Node.js 18, whatever node this machine has.
debian_node=$(tests/browser/debian-node.sh build/debian-node)
cmake_leg build/gcc -DCMAKE_CXX_COMPILER=g++ -DCMAKE_BUILD_TYPE=Debug -DWSBROADCAST_BROWSER_TEST=ON \
  -DWSBROADCAST_DEBIAN_NODE="$debian_node"
