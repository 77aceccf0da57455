#!/bin/sh
# usage: check-plot.sh SOURCE_DIR
#
# The plot in bench/README.md is what bench/plot.sh draws from the runs recorded beside it: drawn
# again here from bench/results/compare.jsonl, it must be bench/plot.svg byte for byte. And a
# recorded run that lost a message is refused rather than drawn. Needs gnuplot (Debian's
# gnuplot-nox); skipped without it (exit 77), except in CI (CI=true), where it must run.
set -eu
src=$1
if ! command -v gnuplot >/dev/null 2>&1; then
    case "${CI:-}" in
        "" | false | 0) echo "gnuplot not found (Debian: apt-get install gnuplot-nox): skipping" >&2; exit 77 ;;
        *) echo "gnuplot not found, and CI=$CI: the plot must be checked in CI" >&2; exit 1 ;;
    esac
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$src/bench/plot.sh" "$src/bench/results/compare.jsonl" "$tmp/plot.svg"
# gnuplot writes the path it was given nowhere in the SVG, so the two compare as they are. Its
# version does show (the committed one is Debian 12's 5.4.4): another gnuplot draws other bytes.
cmp "$tmp/plot.svg" "$src/bench/plot.svg" || {
    echo "bench/plot.svg is not what bench/plot.sh draws from bench/results/compare.jsonl with $(gnuplot --version);" \
         "after a new run, redraw it: bench/plot.sh bench/results/compare.jsonl bench/plot.svg" >&2; exit 1; }

# A run with a missing message, appended to the recorded ones: no plot, and the line is named.
cp "$src/bench/results/compare.jsonl" "$tmp/bad.jsonl"
head -n 1 "$src/bench/results/compare.jsonl" | sed 's/"missing": *0/"missing":3/' >>"$tmp/bad.jsonl"
if "$src/bench/plot.sh" "$tmp/bad.jsonl" "$tmp/bad.svg" 2>"$tmp/err"; then
    echo "plot.sh drew a run that missed messages" >&2; exit 1
fi
grep -q "bad.jsonl:$(wc -l <"$tmp/bad.jsonl" | tr -d ' '): a failed run (missing)" "$tmp/err" || {
    echo "plot.sh did not name the failed run:" >&2; cat "$tmp/err" >&2; exit 1; }
[ ! -e "$tmp/bad.svg" ] || { echo "plot.sh left a plot of a failed run" >&2; exit 1; }
echo "bench/plot.svg is what bench/plot.sh draws; a failed run is refused"
