#!/bin/bash
# usage: bench/results/ab.sh ROUNDS "FIRST SECOND" CASE...
#
# Two server builds, interleaved: each round runs every CASE against both, FIRST first in odd
# rounds and SECOND first in even ones; one event loop each, the server on CPU 0, the loadgen on
# CPU 1. A build named V is /tmp/bin-V/wsbroadcast-server (a Release build, bench/run.sh's flags);
# the name naive is the naive Beast peer, build/bench/beast_naive (bench/compare.sh builds it).
# Each JSON line is printed after "V CASE ", with the UTC time at the start and at the end.
# CASE: targeted8 (targeted, 8 publishers), rate (1,000 subscribers on one id, 20 pushes/s, 200
# pushes), rateN (the same with N subscribers), or any loadgen scenario with its defaults
# (targeted, fanout, ...); a CASE ending in -tls runs over wss:// and https:// (idle-tls, ...).
set -u
cd "$(dirname "$0")/../.." || exit 2
loadgen=${LOADGEN:-build/bench/bench/wsbroadcast-loadgen}
rounds=$1
read -r first second <<<"$2"
shift 2
date -u +%FT%TZ
for ((r = 1; r <= rounds; r++)); do
  order="$first $second"
  ((r % 2)) || order="$second $first"
  for case in "$@"; do
    name=${case%-tls} tls=()
    [ "$name" != "$case" ] && tls=(--tls)
    case $name in
      targeted8) args=(--scenario targeted --publishers 8) ;;
      rate*) n=${name#rate} args=(--scenario rate --subscribers "${n:-1000}" --rate 20 --messages 200) ;;
      *) args=(--scenario "$name") ;;
    esac
    for v in $order; do
      server=(--server "/tmp/bin-$v/wsbroadcast-server")
      [ "$v" = naive ] && server=(--server-kind naive --server build/bench/beast_naive)
      taskset -c 1 "$loadgen" "${server[@]}" "${args[@]}" "${tls[@]}" --server-threads 1 --server-cpus 0 2>/dev/null |
        sed "s/^/$v $case /"
    done
  done
done
date -u +%FT%TZ
