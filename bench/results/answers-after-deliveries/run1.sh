#!/bin/bash
# A push's answer posted behind the other ready work (/tmp/bin-post) against 3f82cd2's server
# (/tmp/bin-base), 5 rounds: targeted with 8 publishers and with 1, the unsaturated rate case
# (1,000 subscribers, 20 pushes/s) and fanout.
exec "$(dirname "$0")/../ab.sh" 5 "post base" targeted8 targeted rate fanout
