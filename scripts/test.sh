#!/usr/bin/env bash
# Installs what the tests need and runs the whole suite. Each leg says why it exists; any failure
# stops the run. The last leg ends with ctest's summary line.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh test

export CCACHE_DIR="${CCACHE_DIR:-$HOME/.cache/wsbroadcast-ccache}"
jobs=$(nproc)
leg() { printf '\n==== %s\n' "$*"; }
cmake_leg() {  # cmake_leg DIR [cmake args...]: configure, build, run every test
  local dir=$1; shift
  cmake -S . -B "$dir" -G Ninja -DCMAKE_CXX_COMPILER_LAUNCHER=ccache "$@" >/dev/null
  cmake --build "$dir" -j "$jobs"
  ctest --test-dir "$dir" --output-on-failure -j "$jobs"
}

leg "clang-19, ASan+UBSan (-O1, halt on error): memory errors and undefined behaviour; fuzzers, 60 s each"
ASAN_OPTIONS=halt_on_error=1:detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  cmake_leg build/asan -DCMAKE_CXX_COMPILER=clang++-19 -DCMAKE_BUILD_TYPE=Debug -DWSBROADCAST_BUILD_FUZZERS=ON \
    -DCMAKE_CXX_FLAGS="-O1 -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"

leg "clang-19, TSan: the manager is called from many threads"
TSAN_OPTIONS=halt_on_error=1 \
  cmake_leg build/tsan -DCMAKE_CXX_COMPILER=clang++-19 -DCMAKE_BUILD_TYPE=Debug \
    -DCMAKE_CXX_FLAGS="-O1 -fsanitize=thread"

leg "meson + g++ 12: the second build system, both Asio flavours, -Werror"
if [ ! -d build/meson ]; then CXX="ccache g++" meson setup build/meson --buildtype=debug >/dev/null; fi
meson test -C build/meson --print-errorlogs

leg "g++ 12 with CMake: -Wall -Wextra -Wpedantic -Werror, both Asio flavours"
cmake_leg build/gcc -DCMAKE_CXX_COMPILER=g++ -DCMAKE_BUILD_TYPE=Debug

leg "clang-19 with CMake, release: -Werror, both Asio flavours, optimised code"
cmake_leg build/clang -DCMAKE_CXX_COMPILER=clang++-19 -DCMAKE_BUILD_TYPE=Release
