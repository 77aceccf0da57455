#!/bin/bash
# targeted with 8 publishers alone, 7 rounds each: the posted answer (/tmp/bin-post) against
# 3f82cd2 (/tmp/bin-base), then beside the naive peer.
"$(dirname "$0")/../ab.sh" 7 "post base" targeted8
exec "$(dirname "$0")/../ab.sh" 7 "post naive" targeted8
