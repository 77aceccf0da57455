#!/bin/sh
# usage: check_rules.sh MONITORING_DIR
#
# promtool check rules on the alert rules, then promtool test rules on their unit tests. promtool
# comes with Debian's prometheus package (scripts/deps.sh installs it for the tests). Without it
# the check is skipped (exit 77, which ctest reports as skipped, not passed), except in CI
# (CI=true), where it must run.
set -eu
dir=$1
if ! command -v promtool >/dev/null 2>&1; then
    case "${CI:-}" in
        "" | false | 0)
            echo "promtool not found (Debian: apt-get install prometheus): skipping" >&2
            exit 77 ;;
        *)
            echo "promtool not found, and CI=$CI: the rules must be checked in CI" >&2
            exit 1 ;;
    esac
fi
promtool check rules "$dir/wsbroadcast.rules.yml"
promtool test rules "$dir/wsbroadcast.rules.test.yml"
