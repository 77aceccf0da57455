#!/bin/bash
# The same server as run1's "early" (/tmp/bin-early) beside the naive peer, 5 rounds: the
# unsaturated rate case (1,000 subscribers, 20 pushes/s) and with one subscriber.
exec "$(dirname "$0")/../ab.sh" 5 "early naive" rate rate1
