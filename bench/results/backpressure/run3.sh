#!/bin/bash
cd /work/main
L=/tmp/bin-new/loadgen S=/tmp/bin-exp-server
date -u +%FT%TZ
for rb in 16384 0; do
for env in "WSB_EXP_LOWAT=16384" "WSB_EXP_SNDBUF=16384" "WSB_EXP_LOWAT=16384 WSB_EXP_SNDBUF=16384"; do
  for b in 0 16777216; do
    env $env taskset -c 1 $L --server $S --scenario fanout --server-threads 1 --server-cpus 0 --receive-buffer $rb --server-arg --max-total-queued-bytes --server-arg $b | sed "s/^/ours-rb$rb-${env// /+}-$b /"
  done
done
done
date -u +%FT%TZ
