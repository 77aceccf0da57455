#!/bin/bash
# The profile and system-call counts of bench/README.md's "Writes start in the send": the server
# (ours, or the naive peer with KIND=naive) runs under this wrapper, which samples it (or counts
# its system calls, with COUNT=1) for 1 s once its 10,000 subscribers are connected, and forwards
# the loadgen's SIGTERM. Run as:
#   taskset -c 1 build/bench/bench/wsbroadcast-loadgen --server-kind wsbroadcast|naive \
#     --server bench/results/inline-writes/profile.sh --scenario targeted --publishers 8 \
#     --messages 100000 --server-threads 1 --server-cpus 0
#   perf report -i /tmp/profile-KIND.data --no-children -g none --sort dso,symbol
kind=${KIND:-wsbroadcast}
bin=${SERVER:-/tmp/bin-new/wsbroadcast-server}
[ "$kind" = naive ] && bin=${NAIVE:-/work/main/build/bench/beast_naive}
"$bin" "$@" & p=$!
if [ -n "${COUNT:-}" ]; then
  (sleep 1.0; perf stat -e 'syscalls:sys_enter_*' -o /tmp/profile-$kind.txt -p $p -- sleep 1 >/dev/null 2>&1) & s=$!
else
  (sleep 1.0; perf record -F 4999 -g -o /tmp/profile-$kind.data -p $p -- sleep 1 >/dev/null 2>&1) & s=$!
fi
trap 'kill -TERM $p' TERM
wait $p; wait $p; wait $s
