#!/bin/bash
# With --threads 1, connections without a strand (the commit after bcb4214) against with one
# (bcb4214's server, built as a7b347a's), interleaved, 5 rounds: targeted with 8 publishers and with 1,
# fanout; one event loop each, server on CPU 0, loadgen on CPU 1.
# /tmp/bin-{new,nostrand}/wsbroadcast-server: Release builds (bench/run.sh's flags).
cd /work/main
L=build/bench/bench/wsbroadcast-loadgen
date -u +%FT%TZ
for r in 1 2 3 4 5; do
  order="new nostrand"; [ $((r % 2)) = 0 ] && order="nostrand new"
  for s in targeted8 targeted fanout; do
    case $s in
      targeted8) a=(--scenario targeted --publishers 8) ;;
      *) a=(--scenario $s) ;;
    esac
    for v in $order; do
      taskset -c 1 $L --server /tmp/bin-$v/wsbroadcast-server "${a[@]}" --server-threads 1 --server-cpus 0 2>/dev/null |
        sed "s/^/$v $s /"
    done
  done
done
date -u +%FT%TZ
