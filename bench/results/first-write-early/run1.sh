#!/bin/bash
# The first connection written before the other outboxes are filled (2141c00,
# /tmp/bin-early) against a87e553's server (b93f56f's send path, /tmp/bin-new), 5 rounds: the
# unsaturated rate case (1,000 subscribers, 20 pushes/s), fanout and targeted with 8 publishers.
exec "$(dirname "$0")/../ab.sh" 5 "early new" rate fanout targeted8
