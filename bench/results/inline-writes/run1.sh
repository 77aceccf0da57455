#!/bin/bash
# Before/after the send starting its first writes itself (d52f2d0 vs the commit that does it),
# interleaved, 5 rounds: targeted with 8 publishers (issue 15's case) and with 1, the unsaturated
# rate case (1,000 subscribers, 20 pushes/s) and fanout; one event loop each, server on CPU 0,
# loadgen on CPU 1. /tmp/bin-{old,new}/wsbroadcast-server: Release builds (bench/run.sh's flags).
cd /work/main
L=build/bench/bench/wsbroadcast-loadgen
date -u +%FT%TZ
for r in 1 2 3 4 5; do
  order="old new"; [ $((r % 2)) = 0 ] && order="new old"
  for s in targeted8 targeted rate fanout; do
    case $s in
      targeted8) a=(--scenario targeted --publishers 8) ;;
      rate) a=(--scenario rate --subscribers 1000 --rate 20 --messages 200) ;;
      *) a=(--scenario $s) ;;
    esac
    for v in $order; do
      taskset -c 1 $L --server /tmp/bin-$v/wsbroadcast-server "${a[@]}" --server-threads 1 --server-cpus 0 2>/dev/null |
        sed "s/^/$v $s /"
    done
  done
done
date -u +%FT%TZ
