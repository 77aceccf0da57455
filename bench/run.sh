#!/usr/bin/env bash
# usage: bench/run.sh [SCENARIO...]    (default: fanout targeted rate idle slow relay)
#
# Builds wsbroadcast-server and wsbroadcast-loadgen in Release, then runs each scenario once and
# prints its JSON line on stdout (progress goes to stderr). Exits 1 if any scenario failed.
#
# Scenarios: fanout, targeted, rate, idle, slow (one server), and relay: the loadgen starts a
# redis-server of its own and two server instances with --redis, spreads the subscribers over both
# and pushes to one. relay needs redis-server (REDIS_SERVER, or in PATH); without it the default list
# skips relay with a note on stderr, and asking for relay by name fails.
#
# Environment:
#   BUILD_DIR     build directory (default build/bench)
#   JOBS          parallel build jobs (default: nproc)
#   SERVER, LOADGEN  use these binaries and skip the build (both must be set)
#   LOADGEN_ARGS  extra options for every loadgen run, e.g. "--server-threads 1"
#   REDIS_SERVER  the redis-server binary for relay (default: redis-server from PATH)
set -euo pipefail
cd "$(dirname "$0")/.."

redis_server=${REDIS_SERVER:-redis-server}
have_redis=false
command -v "$redis_server" >/dev/null 2>&1 && have_redis=true

scenarios=("$@")
if [ ${#scenarios[@]} -eq 0 ]; then
    scenarios=(fanout targeted rate idle slow)
    if $have_redis; then
        scenarios+=(relay)
    else
        echo "run.sh: $redis_server not found, skipping the relay scenario" >&2
    fi
fi

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
    extra=()
    [ "$s" != relay ] || extra=(--redis-server "$redis_server")
    # shellcheck disable=SC2086  # LOADGEN_ARGS is a list of options
    "$loadgen" --server "$server" --scenario "$s" "${extra[@]}" ${LOADGEN_ARGS:-} || { echo "run.sh: scenario $s failed (exit $?)" >&2; status=1; }
done
exit $status
