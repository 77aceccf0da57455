#!/usr/bin/env bash
# Installs what the reference server needs, builds it and runs it on http://127.0.0.1:8080.
# Extra arguments go to the server (try --help).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh server
cmake -S . -B build/server -G Ninja -DCMAKE_BUILD_TYPE=Release -DWSBROADCAST_BUILD_TESTS=OFF >/dev/null
cmake --build build/server --target wsbroadcast-server
exec build/server/wsbroadcast-server "$@"
