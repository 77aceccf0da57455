#!/bin/bash
# Before/after the send starting its first writes itself (d52f2d0, /tmp/bin-old, against the commit
# that does it, /tmp/bin-new), 5 rounds: targeted with 8 publishers (issue 15's case) and with 1,
# the unsaturated rate case (1,000 subscribers, 20 pushes/s) and fanout.
exec "$(dirname "$0")/../ab.sh" 5 "old new" targeted8 targeted rate fanout
