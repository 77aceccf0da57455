#!/bin/bash
# Where the first delivery's time goes: b93f56f (/tmp/bin-new) beside the naive peer, 5 rounds,
# 20 pushes/s to 1, 100 and 1,000 subscribers on one id.
exec "$(dirname "$0")/../ab.sh" 5 "new naive" rate1 rate100 rate
