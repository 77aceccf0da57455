#!/bin/bash
# The answer posted only for pushes sent in the handler's own turn (the commit after c3bfbfc,
# /tmp/bin-final), 5 rounds of targeted with 8 publishers and with 1, and fanout: against
# 3f82cd2 (/tmp/bin-base), then beside the naive peer.
"$(dirname "$0")/../ab.sh" 5 "final base" targeted8 targeted fanout
exec "$(dirname "$0")/../ab.sh" 5 "final naive" targeted8 targeted fanout
