#!/bin/bash
# Before/after the backpressure commit (206f0ed vs 903901d), interleaved; plus the unsaturated
# rate scenario of issue 15 (1,000 subscribers, 20 pushes/s) beside the naive peer.
cd /work/main
L=/tmp/bin-new/loadgen N=build/bench/beast_naive
date -u +%FT%TZ
for r in 1 2 3; do
  order="old new"; [ $((r % 2)) = 0 ] && order="new old"
  for s in fanout targeted; do
    for v in $order; do
      taskset -c 1 $L --server /tmp/bin-$v/wsbroadcast-server --scenario $s --server-threads 1 --server-cpus 0 | sed "s/^/$v /"
    done
  done
done
for r in 1 2; do
  for v in new naive; do
    if [ $v = naive ]; then k=(--server-kind naive --server $N); else k=(--server /tmp/bin-new/wsbroadcast-server); fi
    taskset -c 1 $L "${k[@]}" --scenario rate --subscribers 1000 --rate 20 --messages 200 --server-threads 1 --server-cpus 0 | sed "s/^/$v /"
  done
done
date -u +%FT%TZ
