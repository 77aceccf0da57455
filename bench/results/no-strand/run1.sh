#!/bin/bash
# With --threads 1, connections without a strand (the commit after bcb4214, /tmp/bin-new) against
# with one (bcb4214's server, built as a7b347a's, /tmp/bin-nostrand), 5 rounds: targeted with 8
# publishers and with 1, fanout.
exec "$(dirname "$0")/../ab.sh" 5 "new nostrand" targeted8 targeted fanout
