#!/bin/bash
# Fan-out to subscribers with a fixed 16 KiB receive buffer: ours without the bound (0), with the
# default (16 MiB), and the naive peer.
cd /work/main
L=/tmp/bin-new/loadgen S=/tmp/bin-new/wsbroadcast-server N=build/bench/beast_naive
date -u +%FT%TZ
for r in 1; do
  taskset -c 1 $L --server-kind naive --server $N --scenario fanout --server-threads 1 --server-cpus 0 --receive-buffer 16384 | sed 's/^/naive /'
  for b in 0 16777216; do
    taskset -c 1 $L --server $S --scenario fanout --server-threads 1 --server-cpus 0 --receive-buffer 16384 --server-arg --max-total-queued-bytes --server-arg $b | sed "s/^/ours-$b /"
  done
done
date -u +%FT%TZ
