#!/bin/bash
# The answer's head written as one string (b93f56f, /tmp/bin-new) against Beast's serializer
# (6a43de4, /tmp/bin-old), 5 rounds: targeted with 8 publishers and with 1.
exec "$(dirname "$0")/../ab.sh" 5 "new old" targeted8 targeted
