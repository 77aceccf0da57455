#!/bin/bash
# What an idle wss:// connection holds in the server's heap: 1,000 of them under massif, the peak
# read with ../backpressure/massif-tree.py (its depth 6, then the whole tree by hand).
set -eu
cd "$(dirname "$0")/../../.."
rm -rf /tmp/massif && mkdir -p /tmp/massif
build/bench/bench/wsbroadcast-loadgen --server bench/results/tls-stream/massif-wrap.sh --scenario idle --tls \
  --subscribers 1000 --batch 10 --sample 10 --server-threads 1 2>/dev/null
python3 bench/results/backpressure/massif-tree.py /tmp/massif/massif.out.* 6
