#!/usr/bin/env bash
# `cmake --install` of the build tree: a plain install is the library alone; the "server" component
# is the server, its manual page (when help2man made one) and its systemd units, the service naming
# the binary where the configured prefix puts it.
# Usage: check-install.sh BUILD_DIR CONFIGURED_PREFIX
set -euo pipefail
build=$1 configured_prefix=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
list() { (cd "$1" && find . -type f | sed 's|^\./||' | LC_ALL=C sort); }

cmake --install "$build" --prefix "$work/plain" >/dev/null
if list "$work/plain" | grep -q 'wsbroadcast-server'; then
  list "$work/plain"; echo "a plain install installed the server"; exit 1
fi

cmake --install "$build" --prefix "$work/server" --component server >/dev/null
expected="bin/wsbroadcast-server
lib/systemd/system/wsbroadcast-server.service
lib/systemd/system/wsbroadcast-server.socket"
if [ -f "$build/wsbroadcast-server.1" ]; then
  expected=$(printf '%s\n%s\n' "$expected" share/man/man1/wsbroadcast-server.1 | LC_ALL=C sort)
  grep -q 'redis\\-ping\\-timeout' "$work/server/share/man/man1/wsbroadcast-server.1"
fi
actual=$(list "$work/server")
if [ "$actual" != "$expected" ]; then
  printf 'the server component installed:\n%s\nexpected:\n%s\n' "$actual" "$expected"; exit 1
fi
"$work/server/bin/wsbroadcast-server" --version
grep -qx "ExecStart=$configured_prefix/bin/wsbroadcast-server" "$work/server/lib/systemd/system/wsbroadcast-server.service"
echo "the server component: $(echo "$actual" | tr '\n' ' ')"
