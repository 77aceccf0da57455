#!/bin/bash
# Saturated fanout: ours at several --max-total-queued-bytes, beside the naive peer, interleaved.
cd /work/main
L=build/bench/bench/wsbroadcast-loadgen S=build/bench/wsbroadcast-server N=build/bench/beast_naive
date -u +%FT%TZ
for r in 1 2; do
  taskset -c 1 $L --server-kind naive --server $N --scenario fanout --server-threads 1 --server-cpus 0 | sed 's/^/naive /'
  for b in 0 67108864 4194304 1048576 262144; do
    taskset -c 1 $L --server $S --scenario fanout --server-threads 1 --server-cpus 0 --server-arg --max-total-queued-bytes=$b | sed "s/^/ours-$b /"
  done
done
date -u +%FT%TZ
