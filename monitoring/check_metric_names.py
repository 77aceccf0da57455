#!/usr/bin/env python3
"""Every metric the alert rules and the Grafana dashboard use is one the real server exposes.

usage: check_metric_names.py SERVER RULES DASHBOARD

Starts SERVER (wsbroadcast-server) on 127.0.0.1 with --port 0 and --redis pointed at a port where
nothing listens (so the relay's metrics are exposed too: they exist only with --redis), reads
/metrics, stops the server by its PID, and compares. Also checks that the dashboard is JSON with
panels whose queries are not empty, and that both files cover the metrics that matter. Standard
library only (no PyYAML: the rules' `expr:` values are read with a small line parser, which is
enough for the file this project ships and fails loudly on anything it does not understand).
"""

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request

# Made by Prometheus itself, not by the server.
PROMETHEUS_SERIES = {"up"}
# The metrics an operator needs (issue 14): each must appear in the rules and in the dashboard.
MUST_COVER = [
    "wsbroadcast_connections",
    "wsbroadcast_deliveries_total",
    "wsbroadcast_dropped_messages_total",
    "wsbroadcast_policy_closes_total",
    "wsbroadcast_queued_bytes",
    "wsbroadcast_relay_connected",
]

PROMQL_WORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "offset", "inf", "nan", "atan2",
}


def fail(why):
    print("check_metric_names: " + why, file=sys.stderr)
    sys.exit(1)


def scrape(server):
    proc = subprocess.Popen(
        [server, "--address", "127.0.0.1", "--port", "0", "--threads", "1",
         "--redis", "redis://127.0.0.1:1", "--log-level", "error"],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()  # "wsbroadcast-server listening on http://127.0.0.1:PORT with ..."
        match = re.search(r"listening on http://127\.0\.0\.1:(\d+) ", line)
        if not match:
            fail("the server did not say where it listens; it said: " + repr(line))
        url = "http://127.0.0.1:%s/metrics" % match.group(1)
        with urllib.request.urlopen(url, timeout=10) as answer:
            text = answer.read().decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    names = set()
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        names.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
    if "wsbroadcast_relay_connected" not in names:
        fail("the server exposed no relay metrics with --redis; exposition was:\n" + text)
    return names


def rule_exprs(path):
    """The `expr:` of each rule: inline, or a block scalar (| or >, with - or +) indented below it."""
    exprs = []
    lines = open(path).read().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(?:- )?expr:\s*(.*)$", lines[i])
        i += 1
        if not m:
            continue
        indent, value = len(m.group(1)), m.group(2).strip()
        if value and value[0] in "|>":
            body = []
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                body.append(lines[i].strip())
                i += 1
            value = " ".join(body)
        elif value[:1] in "'\"":
            fail("%s: quoted expr not understood: %s" % (path, value))
        if not value:
            fail("%s: empty expr" % path)
        exprs.append(value)
    if not exprs:
        fail(path + ": no expr found")
    return exprs


def dashboard_exprs(path):
    try:
        dash = json.load(open(path))
    except ValueError as e:
        fail("%s is not JSON: %s" % (path, e))
    panels = dash.get("panels") or fail(path + ": no panels")
    exprs, ids = [], set()
    for p in panels:
        pid = p.get("id")
        if pid in ids:
            fail("%s: two panels with id %s" % (path, pid))
        ids.add(pid)
        if p.get("type") == "row":
            continue
        targets = p.get("targets") or fail("%s: panel %r has no query" % (path, p.get("title")))
        for t in targets:
            expr = (t.get("expr") or "").strip()
            if not expr:
                fail("%s: panel %r has an empty query" % (path, p.get("title")))
            exprs.append(expr)
    return exprs


def metric_names(expr):
    """The metric names in a PromQL expression: identifiers that are not functions, keywords,
    label names, label values, durations or Grafana variables."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)            # label values, strings
    e = re.sub(r"\$\{[^}]*\}|\$\w+", "", e)               # Grafana variables
    e = re.sub(r"\{[^}]*\}", "", e)                       # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                      # ranges, subqueries
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    e = re.sub(r"\b\d+(?:\.\d+)?(?:e[+-]?\d+)?\b", "", e)  # numbers
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        word = m.group(0)
        if word.lower() in PROMQL_WORDS or re.match(r"\s*\(", e[m.end():]):
            continue  # a keyword, or a function / aggregation called here
        names.add(word)
    return names


def main():
    if len(sys.argv) != 4:
        fail("usage: check_metric_names.py SERVER RULES DASHBOARD")
    server, rules, dashboard = sys.argv[1:]
    exposed = scrape(server) | PROMETHEUS_SERIES
    ok = True
    for path, exprs in ((rules, rule_exprs(rules)), (dashboard, dashboard_exprs(dashboard))):
        used, file_ok = set(), True
        for expr in exprs:
            names = metric_names(expr)
            if not names:
                print("%s: no metric in %r" % (path, expr), file=sys.stderr)
                file_ok = False
            for name in sorted(names - exposed):
                print("%s: %s is not exposed by the server (in %r)" % (path, name, expr), file=sys.stderr)
                file_ok = False
            used |= names
        for name in MUST_COVER:
            if name not in used:
                print("%s: does not use %s" % (path, name), file=sys.stderr)
                file_ok = False
        print("%s: %d expressions, %d metrics: %s" % (path, len(exprs), len(used), "ok" if file_ok else "FAILED"))
        ok = ok and file_ok
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
