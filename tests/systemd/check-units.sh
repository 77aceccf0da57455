#!/usr/bin/env bash
# The systemd units, checked as systemd reads them: `systemd-analyze verify` (every key known, every
# value parsed, ExecStart= executable; any complaint fails) and `systemd-analyze security` (the
# sandboxing directives in effect: exposure at most 2.0 of 10, "OK").
# Usage: check-units.sh SERVER_BINARY UNIT_TEMPLATE SOCKET_UNIT
# The service names the binary just built, in a copy: the installed unit names the install path.
set -euo pipefail
server=$1 template=$2 socket=$3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sed -e "s|@WSBROADCAST_BINDIR@|$(dirname "$(realpath "$server")")|" -e "s|@WSBROADCAST_DOCDIR@|$work|" \
  "$template" >"$work/wsbroadcast-server.service"
cp "$socket" "$work/wsbroadcast-server.socket"
cd "$work"
said=$(systemd-analyze verify ./wsbroadcast-server.service ./wsbroadcast-server.socket 2>&1) || {
  echo "$said"; echo "systemd-analyze verify failed"; exit 1; }
if [ -n "$said" ]; then echo "$said"; echo "systemd-analyze verify complained"; exit 1; fi
echo "systemd-analyze verify: no complaint"
if ! systemd-analyze security --offline=yes --threshold=20 --no-pager ./wsbroadcast-server.service >security.txt 2>&1; then
  cat security.txt; echo "exposure above 2.0"; exit 1
fi
grep 'Overall exposure level' security.txt
