#!/usr/bin/env bash
# usage: bench/plot.sh RESULTS.jsonl OUT.svg
#
# Draws what bench/compare.sh recorded: server CPU per delivery in fanout and in targeted (where a
# delivery is one push, answered and delivered), the first delivery's latency at 20 pushes a
# second (rate), and memory per idle connection, the reference server beside the naive Beast peer. Each bar is the median of that pair's runs; the whisker spans
# the lowest and the highest run, so the spread between rounds shows. A run that lost, repeated or
# reordered a message, or whose server failed, is refused: a plot is never drawn from it.
# Needs python3 (reads the JSON) and gnuplot (Debian's gnuplot-nox).
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 RESULTS.jsonl OUT.svg" >&2; exit 2; }
results=$1 out=$2

# Python reads the runs and prints the gnuplot script, data included; gnuplot draws it.
python3 - "$results" "$out" <<'PY' | gnuplot
import json, statistics, sys

results, out = sys.argv[1], sys.argv[2]
panels = [  # scenario, JSON field (a.b: field b of object a), scale, title, number format
    ("fanout", "server_cpu_us_per_delivery", 1, "fan-out to 1,000: server CPU per delivery (µs)", "%.2f"),
    ("targeted", "server_cpu_us_per_delivery", 1, "targeted, 10,000 ids: server CPU per push (µs)", "%.1f"),
    ("targeted", "latency_us.p50", 1, "targeted, 8 publishers: latency p50 (µs)", "%.0f"),
    ("rate", "first_delivery_us.p50", 1, "20/s to 1,000: first delivery p50 (µs)", "%.0f"),
    ("idle", "rss_kib_per_connection", 1024, "10,000 idle: memory per connection (bytes)", "%.0f"),
]
kinds = [("wsbroadcast", "wsbroadcast", "#1f77b4"), ("naive", "naive Beast", "#bbbbbb")]

def field_of(run, path):
    for part in path.split("."):
        run = run[part]
    return run

runs = {}
with open(results) as f:
    for number, line in enumerate(f, 1):
        if not line.strip():
            continue
        r = json.loads(line)
        bad = [k for k in ("missing", "duplicates", "out_of_order", "connect_failures", "closed_early",
                           "unexpected", "publish_errors") if r.get(k)]
        if bad or r.get("server_exit") not in (0, 143):  # 143: the naive peer ends on SIGTERM
            sys.exit(f"plot.sh: {results}:{number}: a failed run ({', '.join(bad) or 'server_exit'}); not plotted")
        runs.setdefault((r["scenario"], r.get("server_kind", "wsbroadcast")), []).append(r)

print('set terminal svg size 1750,380 font "sans,12" background rgb "white"')
print(f'set output "{out}"')
print('set multiplot layout 1,%d title "wsbroadcast beside the naive Beast peer: one event loop each, '
      'same run, same loadgen (bar: median; whisker: lowest to highest run)"' % len(panels))
print("set style fill solid 0.85 border -1\nset boxwidth 0.6\nset xrange [-0.6:1.6]\nset yrange [0:*]")
print("set grid ytics\nunset key\nset offsets 0, 0, graph 0.12, 0")
for scenario, field, scale, title, fmt in panels:
    print(f'set title "{title}"')
    print("$data << EOD")
    for x, (kind, label, colour) in enumerate(kinds):
        values = [field_of(r, field) * scale for r in runs.get((scenario, kind), [])]
        if not values:
            sys.exit(f"plot.sh: {results}: no {scenario} run against {kind}")
        colour = int(colour[1:], 16)
        print(f'{x} "{label} ({len(values)})" {statistics.median(values)} {min(values)} {max(values)} {colour}')
    print("EOD")
    print(f'plot $data using 1:3:4:5:(0.6):6:xtic(2) with boxerrorbars lc rgb variable, '
          f"'' using 1:5:(sprintf(\"{fmt}\", $3)) with labels offset 0,0.8")
print("unset multiplot")
PY
echo "plot.sh: wrote $out" >&2
