#!/bin/bash
# 2141c00 (/tmp/bin-early) beside the naive peer, 5 rounds: fanout and targeted with 8 publishers.
exec "$(dirname "$0")/../ab.sh" 5 "early naive" fanout targeted8
