#!/bin/bash
# The commit that starts writes in the send, beside the naive peer, targeted with 1 publisher
# (compare.sh runs it with 8 now), 5 interleaved rounds; one event loop each, server on CPU 0,
# loadgen on CPU 1.
cd /work/main
L=build/bench/bench/wsbroadcast-loadgen
date -u +%FT%TZ
for r in 1 2 3 4 5; do
  order="new naive"; [ $((r % 2)) = 0 ] && order="naive new"
  for v in $order; do
    if [ $v = naive ]; then k=(--server-kind naive --server build/bench/beast_naive); else k=(--server /tmp/bin-new/wsbroadcast-server); fi
    taskset -c 1 $L "${k[@]}" --scenario targeted --server-threads 1 --server-cpus 0 2>/dev/null | sed "s/^/$v targeted /"
  done
done
date -u +%FT%TZ
