#!/bin/bash
# run3's targeted case again, the peer first in odd rounds.
exec "$(dirname "$0")/../ab.sh" 5 "naive early" targeted8
