#!/bin/bash
# Run 2: the same run as run1, made again.
exec "$(dirname "$0")/run1.sh"
