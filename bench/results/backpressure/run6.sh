#!/bin/bash
# Idle memory: the endpoint's first read of 64 bytes (903901d) against 15 (the string's own storage),
# 3 interleaved rounds, one event loop each, pinned as compare.sh pins them.
cd /work/main
L=/tmp/bin-new/loadgen
date -u +%FT%TZ
for r in 1 2 3; do
  order="new read15"; [ $((r % 2)) = 0 ] && order="read15 new"
  for v in $order; do
    taskset -c 1 $L --server /tmp/bin-$v/wsbroadcast-server --scenario idle --server-threads 1 --server-cpus 0 | sed "s/^/$v /"
  done
done
date -u +%FT%TZ
