#!/bin/bash
# How long each server takes from reading a push to its first write, in the rate case with 1,000
# subscribers (20 pushes/s): perf records the server's recvmsg, sendmsg and epoll_wait tracepoints
# for 2 s of the run, b93f56f (/tmp/bin-new) and the naive peer (build/bench/beast_naive), 3 rounds.
# The first recvmsg after 10 ms without a system call is the push (the server idles between
# pushes); the first sendmsg after it, the first delivery leaving. Needs perf (linux-perf) and root.
cd "$(dirname "$0")/../../.." || exit 2
out=$(mktemp -d /tmp/wsbroadcast-first-write.XXXXXX)
date -u +%FT%TZ
for v in new naive new naive new naive; do
  server=(--server /tmp/bin-new/wsbroadcast-server) pattern=bin-new/wsbroadcast-server
  [ $v = naive ] && server=(--server-kind naive --server build/bench/beast_naive) pattern=beast_naive
  taskset -c 1 build/bench/bench/wsbroadcast-loadgen "${server[@]}" --scenario rate --subscribers 1000 --rate 20 \
    --messages 200 --server-threads 1 --server-cpus 0 >"$out/$v.json" 2>/dev/null &
  loadgen=$!
  pid=
  for _ in $(seq 100); do
    sleep 0.1
    pid=$(pgrep -P $loadgen -f $pattern | head -1) && break
  done
  sleep 5 # connected and pushing
  perf record -q -o "$out/$v.data" -p "$pid" \
    -e 'syscalls:sys_enter_recvmsg,syscalls:sys_enter_sendmsg,syscalls:sys_enter_epoll_wait' -- sleep 2 2>/dev/null
  wait $loadgen
  perf script -i "$out/$v.data" -F time,event 2>/dev/null >"$out/$v.txt"
  python3 - "$out/$v.txt" $v <<'PY'
import statistics, sys
events = [(float(p[0].rstrip(":")), p[1]) for p in (l.split() for l in open(sys.argv[1])) if len(p) >= 2]
gaps, previous = [], None
for i, (t, name) in enumerate(events):
    if "recvmsg" in name and previous is not None and t - previous > 0.01:
        gaps += [(t2 - t) * 1e6 for t2, name2 in events[i + 1:] if "sendmsg" in name2][:1]
    previous = t
q = statistics.quantiles(gaps, n=10)
print(f"{sys.argv[2]}: {len(gaps)} pushes, push read to first write: p10 {q[0]:.0f}, p50 {statistics.median(gaps):.0f}, p90 {q[-1]:.0f} us")
PY
done
date -u +%FT%TZ
