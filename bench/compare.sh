#!/usr/bin/env bash
# usage: bench/compare.sh [ROUNDS]    (default 5)
#
# The reference server beside the naive Beast peer (../shared/bench/beast_naive.cpp), measured in
# one run: for each round, each scenario runs once against each server, the order of the two
# alternating from round to round, so a machine that slows down mid-run hurts both alike. Both get
# one event loop (--server-threads 1; the peer has only one) on CPU 0, the loadgen runs on CPU 1.
# Prints one JSON line per run on stdout (progress on stderr); bench/plot.sh draws them.
# Exits 1 if any run failed (the others still run).
#
# `rate` is issue 15's unsaturated case: 1,000 subscribers on one id, 20 pushes a second for 10 s;
# its figure is the latency of each message's first delivery (first_delivery_us). `targeted` runs
# with 8 keep-alive publishers, as issue 15 measured it: both servers then have a core's worth of
# pushes to answer, and CPU per push sets the latency.
#
# Environment:
#   SCENARIOS     default "fanout targeted rate idle" (relay and slow do not apply to the peer)
#   NAIVE_SOURCE  the peer's source (default ../shared/bench/beast_naive.cpp)
#   BUILD_DIR     build directory (default build/bench); the peer is built there as beast_naive
#   SERVER, LOADGEN, NAIVE  use these binaries and skip the builds (all three must be set)
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=${1:-5}
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [ROUNDS]" >&2; exit 2; }
read -r -a scenarios <<<"${SCENARIOS:-fanout targeted rate idle}"

if [ -n "${SERVER:-}" ] && [ -n "${LOADGEN:-}" ] && [ -n "${NAIVE:-}" ]; then
  server=$SERVER loadgen=$LOADGEN naive=$NAIVE
else
  build=${BUILD_DIR:-build/bench}
  source=${NAIVE_SOURCE:-../shared/bench/beast_naive.cpp}
  [ -f "$source" ] || { echo "compare.sh: no naive peer at $source (set NAIVE_SOURCE)" >&2; exit 2; }
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DWSBROADCAST_BUILD_TESTS=OFF -DWSBROADCAST_BUILD_EXAMPLE=ON -DWSBROADCAST_BUILD_BENCH=ON >&2
  cmake --build "$build" --target wsbroadcast-server wsbroadcast-loadgen >&2
  # As Release builds ours: -O3 -DNDEBUG.
  g++ -O3 -DNDEBUG -std=c++20 -pthread "$source" -o "$build/beast_naive"
  server=$build/wsbroadcast-server loadgen=$build/bench/wsbroadcast-loadgen naive=$build/beast_naive
fi

# 10,000 connections need a bit over 10,000 descriptors in each process.
if [ "$(ulimit -Hn)" != unlimited ] && [ "$(ulimit -Hn)" -lt 10100 ]; then
  ulimit -n 65536 2>/dev/null || echo "compare.sh: hard RLIMIT_NOFILE is $(ulimit -Hn); idle and targeted may fail" >&2
fi

pin=(--server-cpus 0) loadgen_cpu=(taskset -c 1)
if [ "$(nproc)" -lt 2 ]; then
  echo "compare.sh: fewer than 2 CPUs, so server and loadgen are not pinned apart" >&2
  pin=() loadgen_cpu=()
fi

echo "compare.sh: $(date -u +%Y-%m-%dT%H:%MZ), $rounds round(s) of ${scenarios[*]}, nproc $(nproc)" >&2
status=0
for ((round = 1; round <= rounds; round++)); do
  kinds=(wsbroadcast naive)
  ((round % 2)) || kinds=(naive wsbroadcast)
  for s in "${scenarios[@]}"; do
    extra=()
    [ "$s" != rate ] || extra=(--subscribers 1000 --rate 20 --messages 200)
    [ "$s" != targeted ] || extra=(--publishers 8)
    for kind in "${kinds[@]}"; do
      path=$server
      [ "$kind" = wsbroadcast ] || path=$naive
      echo "compare.sh: round $round, $s, $kind" >&2
      "${loadgen_cpu[@]}" "$loadgen" --server-kind "$kind" --server "$path" --scenario "$s" \
        "${extra[@]}" --server-threads 1 "${pin[@]}" || { echo "compare.sh: $s against $kind failed (exit $?)" >&2; status=1; }
    done
  done
done
exit $status
