#!/bin/bash
# The same server (/tmp/bin-post) beside the naive peer, 5 rounds: targeted with 8 publishers and
# with 1, and fanout.
exec "$(dirname "$0")/../ab.sh" 5 "post naive" targeted8 targeted fanout
