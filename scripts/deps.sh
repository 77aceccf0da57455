#!/usr/bin/env bash
# Installs what wsbroadcast needs on Debian 12, as root. Usage: scripts/deps.sh server|test
set -euo pipefail
# --no-install-recommends: libasio-dev recommends Boost 1.74, which conflicts with 1.81.
server_packages=(g++ cmake ninja-build libboost1.81-dev libssl-dev libhiredis-dev pkg-config libcli11-dev
                 libsystemd-dev help2man)  # help2man: the manual page, from --help
test_packages=("${server_packages[@]}" ccache libasio-dev doctest-dev openssl meson
               clang-19 libclang-rt-19-dev llvm-19 clang-format-19
               build-essential debhelper dpkg-dev fakeroot  # packaging tests: the .deb
               chromium                                     # the browser test
               redis-server                                 # scale-out tests: instances share a real Redis
               prometheus                                   # its promtool checks /metrics
               systemd lintian                              # systemd-analyze verifies the units; the .debs
               gnuplot-nox)                                 # bench/plot.sh, checked against bench/plot.svg
case "${1:-}" in
  server) packages=("${server_packages[@]}") ;;
  test) packages=("${test_packages[@]}") ;;
  *) echo "usage: $0 server|test" >&2; exit 2 ;;
esac
missing=()
# The browser test runs on Node.js 18 or later with npm; a machine that already has both (from
# Debian or elsewhere) keeps them, so Debian's npm never fights another nodejs package.
if [ "$1" = test ] && ! { command -v node && command -v npm; } >/dev/null; then
  packages+=(nodejs npm)
fi
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
