#!/bin/bash
# The unsaturated rate scenario of issue 15 (1,000 subscribers, 20 pushes/s), ours beside the
# naive peer, with the first delivery of each message.
cd /work/main
L=/tmp/bin-new/loadgen N=build/bench/beast_naive
date -u +%FT%TZ
for r in 1 2 3; do
  order="new naive"; [ $((r % 2)) = 0 ] && order="naive new"
  for v in $order; do
    if [ $v = naive ]; then k=(--server-kind naive --server $N); else k=(--server /tmp/bin-new/wsbroadcast-server); fi
    taskset -c 1 $L "${k[@]}" --scenario rate --subscribers 1000 --rate 20 --messages 200 --server-threads 1 --server-cpus 0 | sed "s/^/$v /"
  done
done
date -u +%FT%TZ
