#!/usr/bin/env bash
# usage: bench/callgrind.sh [SERVER]    (default build/bench/wsbroadcast-server)
#
# User-space instructions per targeted push, and where they go: the server runs under callgrind
# (apt-get install --no-install-recommends valgrind) in two `targeted` runs of the loadgen, 1,000
# ids with one subscriber each, one server thread, 2,000 and 6,000 pushes. The difference between
# the two runs, divided by 4,000, leaves out the connects and the shutdown. Prints the total per
# push, the groups below, then the 25 functions that grew most (their own instructions).
# Environment: LOADGEN (default build/bench/bench/wsbroadcast-loadgen), OUT (a directory for the
# two callgrind files, default a new one under /tmp; kept), KIND (the loadgen's --server-kind:
# naive counts the naive Beast peer, e.g. `KIND=naive bench/callgrind.sh build/bench/beast_naive`).
set -euo pipefail
cd "$(dirname "$0")/.."
server=$(realpath "${1:-build/bench/wsbroadcast-server}")
loadgen=${LOADGEN:-build/bench/bench/wsbroadcast-loadgen}
out=${OUT:-$(mktemp -d /tmp/wsbroadcast-callgrind.XXXXXX)}
kind=${KIND:-wsbroadcast}
command -v valgrind >/dev/null || { echo "callgrind.sh: valgrind is not installed" >&2; exit 2; }

# The loadgen starts "the server" with its own flags; this one runs the real server under callgrind.
# valgrind passes the loadgen's SIGTERM to the server, which exits cleanly and so writes its counts.
wrapper=$out/server.sh
# shellcheck disable=SC2016  # $CALLGRIND_OUT and $@ are the wrapper's to expand
printf '#!/bin/bash\nexec valgrind --tool=callgrind --log-file="$CALLGRIND_OUT.log" --callgrind-out-file="$CALLGRIND_OUT" %q "$@"\n' "$server" >"$wrapper"
chmod +x "$wrapper"
for messages in 2000 6000; do
  CALLGRIND_OUT=$out/pushes-$messages "$loadgen" --server "$wrapper" --server-kind "$kind" --scenario targeted --subscribers 1000 \
    --messages $messages --server-threads 1 --batch 50 --max-seconds 250 2>"$out/valgrind-$messages.log" >&2
done

python3 - "$out/pushes-2000" "$out/pushes-6000" 4000 <<'EOF'
import re, subprocess, sys

def per_function(path):
    text = subprocess.run(["callgrind_annotate", "--threshold=100", "--inclusive=no", path],
                          capture_output=True, text=True, check=True).stdout
    counts = {}
    for line in text.splitlines():
        m = re.match(r"\s*([\d,]+) \([^)]*\)\s+(.*)", line)
        if m and "PROGRAM TOTALS" not in m.group(2):
            name = re.sub(r"\s*\[/[^\]]*\]$", "", m.group(2))
            counts[name] = counts.get(name, 0) + int(m.group(1).replace(",", ""))
    return counts

def short(name):
    return (name.replace("boost::asio::", "a::").replace("boost::beast::", "b::")
            .replace("wsbroadcast::boost_asio::", "w::"))

# First match wins: the order puts the specific patterns before the catch-alls.
groups = [
    ("Beast's HTTP serializer (buffer sequences)", r"field_range|writer::field_iterator|chunk_crlf|buffers_cat|buffers_prefix|buffers_suffix"),
    ("Beast websocket", r"websocket::"),
    ("HTTP parser", r"basic_parser|http::parser|parse_fields"),
    ("basic_fields (headers)", r"basic_fields"),
    ("json_string, string appends", r"json_string|push_back\(char\)|_M_append|_M_replace"),
    ("wsbroadcast.hpp", r"\bw::|wsbroadcast::"),
    ("server (example/)", r"anonymous namespace|wsbroadcast_server"),
    ("malloc, free, new, delete", r"malloc|_int_free|\bfree\b|operator new|operator delete|cfree|tcache"),
    ("mutexes", r"pthread_mutex|mutex"),
    ("memcpy, memmove, memset", r"mem(cpy|move|set|cmp)|strlen"),
    ("any_io_executor", r"any_io_executor|any_executor"),
    ("Asio reactor, scheduler, socket calls", r"a::detail::(epoll|scheduler|reactive|reactor)|socket_ops"),
    ("Asio, Beast: the rest", r"\ba::|\bb::"),
    ("libc: the rest", r"libc|\.S:|\.c:"),
]
before, after, pushes = per_function(sys.argv[1]), per_function(sys.argv[2]), float(sys.argv[3])
growth = {k: (after.get(k, 0) - before.get(k, 0)) / pushes for k in set(before) | set(after)}
totals = {g: 0.0 for g, _ in groups}
totals["other"] = 0.0
for name, n in growth.items():
    s = short(name)
    totals[next((g for g, p in groups if re.search(p, s)), "other")] += n
print(f"{sum(growth.values()):9.0f}  instructions per push, in all")
for g, n in sorted(totals.items(), key=lambda x: -x[1]):
    print(f"{n:9.0f}  {g}")
print()
for name, n in sorted(growth.items(), key=lambda x: -x[1])[:25]:
    print(f"{n:9.0f}  {short(name)[:200]}")
EOF
