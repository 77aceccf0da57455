#!/bin/sh
# The server under massif, keeping its PID (the loadgen's --server): what an idle wss:// connection holds.
exec valgrind -q --tool=massif --depth=30 --threshold=0.2 --massif-out-file=/tmp/massif/massif.out.%p /tmp/bin-new/wsbroadcast-server "$@"
