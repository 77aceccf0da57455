#!/usr/bin/env bash
# Fails if any tracked C++ file differs from what clang-format 19 (pinned, .clang-format) makes of it.
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t files < <(git ls-files '*.cpp' '*.hpp')
bad=0
for f in "${files[@]}"; do
  if ! clang-format-19 --dry-run --Werror "$f" >/dev/null 2>&1; then
    echo "not formatted: $f (run: clang-format-19 -i $f)"
    bad=1
  fi
done
[ "$bad" = 0 ] && echo "format: ${#files[@]} files match clang-format 19"
exit "$bad"
