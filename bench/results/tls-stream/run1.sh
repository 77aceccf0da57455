#!/bin/bash
# TLS through example/tls_stream.hpp (/tmp/bin-new, the commit that adds it) against b205207's
# server with beast::ssl_stream (/tmp/bin-old), 3 rounds: 10,000 idle connections over wss:// and
# over ws://, fan-out over wss://, targeted pushes over https:// to wss:// subscribers.
exec "$(dirname "$0")/../ab.sh" 3 "new old" idle-tls idle fanout-tls targeted-tls
