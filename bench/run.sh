#!/usr/bin/env bash
# usage: bench/run.sh [SCENARIO...]    (default: fanout targeted rate idle slow)
#
# Builds wsbroadcast-server and wsbroadcast-loadgen in Release, then runs each scenario once and
# prints its JSON line on stdout (progress goes to stderr). Exits 1 if any scenario failed.
#
# Environment:
#   BUILD_DIR     build directory (default build/bench)
#   JOBS          parallel build jobs (default: nproc)
#   SERVER, LOADGEN  use these binaries and skip the build (both must be set)
#   LOADGEN_ARGS  extra options for every loadgen run, e.g. "--server-threads 1"
set -euo pipefail
cd "$(dirname "$0")/.."

scenarios=("$@")
[ ${#scenarios[@]} -gt 0 ] || scenarios=(fanout targeted rate idle slow)

if [ -n "${SERVER:-}" ] && [ -n "${LOADGEN:-}" ]; then
    server=$SERVER
    loadgen=$LOADGEN
else
    build=${BUILD_DIR:-build/bench}
    cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DWSBROADCAST_BUILD_TESTS=OFF -DWSBROADCAST_BUILD_EXAMPLE=ON -DWSBROADCAST_BUILD_BENCH=ON >&2
    cmake --build "$build" -j "${JOBS:-$(nproc)}" --target wsbroadcast-server wsbroadcast-loadgen >&2
    server=$build/wsbroadcast-server
    loadgen=$build/bench/wsbroadcast-loadgen
fi

# The loadgen raises its soft RLIMIT_NOFILE to the hard limit, and the server it starts inherits
# that. 10,000 connections need a bit over 10,000 descriptors in each process.
if [ "$(ulimit -Hn)" != unlimited ] && [ "$(ulimit -Hn)" -lt 10100 ]; then
    ulimit -n 65536 2>/dev/null || echo "run.sh: hard RLIMIT_NOFILE is $(ulimit -Hn); the 10,000-connection scenarios may fail" >&2
fi

echo "run.sh: $(date -u +%Y-%m-%dT%H:%MZ), nproc $(nproc), loadgen and server share these cores" >&2
status=0
for s in "${scenarios[@]}"; do
    # shellcheck disable=SC2086  # LOADGEN_ARGS is a list of options
    "$loadgen" --server "$server" --scenario "$s" ${LOADGEN_ARGS:-} || { echo "run.sh: scenario $s failed (exit $?)" >&2; status=1; }
done
exit $status
