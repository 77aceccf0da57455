#!/usr/bin/env bash
# The systemd units, checked as systemd reads them: `systemd-analyze verify` (every key known, every
# value parsed, ExecStart= executable; any complaint fails) and `systemd-analyze security` (the
# sandboxing directives in effect: exposure at most 2.0 of 10, "OK").
# Usage: check-units.sh SERVER_BINARY UNIT_TEMPLATE SOCKET_UNIT [MANUAL_PAGE]
# With the manual page, Documentation=man:wsbroadcast-server(1) must find it; without, it is not looked up.
# The service names the binary just built, in a copy: the installed unit names the install path.
set -euo pipefail
server=$1 template=$2 socket=$3 manual=${4:-}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sed -e "s|@WSBROADCAST_BINDIR@|$(dirname "$(realpath "$server")")|" \
  "$template" >"$work/wsbroadcast-server.service"
cp "$socket" "$work/wsbroadcast-server.socket"
cd "$work"
man_check=(--man=no)
if [ -n "$manual" ] && [ -f "$manual" ]; then
  mkdir -p man/man1 && cp "$manual" man/man1/
  export MANPATH=$work/man
  man_check=()
fi
said=$(systemd-analyze verify "${man_check[@]}" ./wsbroadcast-server.service ./wsbroadcast-server.socket 2>&1) || {
  echo "$said"; echo "systemd-analyze verify failed"; exit 1; }
if [ -n "$said" ]; then echo "$said"; echo "systemd-analyze verify complained"; exit 1; fi
echo "systemd-analyze verify: no complaint"
if ! systemd-analyze security --offline=yes --threshold=20 --no-pager ./wsbroadcast-server.service >security.txt 2>&1; then
  cat security.txt; echo "exposure above 2.0"; exit 1
fi
grep 'Overall exposure level' security.txt
