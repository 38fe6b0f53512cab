#!/usr/bin/env bash
# The state store's operations per second, etcd against SQLite, in one run
# (not a test): appends to the ledger (one writer, and eight at once), a
# guarded apply, a leader's fenced write of 100 assignments, a read. Starts
# its own etcd (Debian's etcd-server) in a temporary directory on a free
# loopback port, and stops it.
#
#   bench/state.sh          # N=500 operations of each kind
set -euo pipefail
cd "$(dirname "$0")/.."
echo "building the benchmark (release)..." >&2
cargo bench -q -p kiln-agent --features bench --bench state --no-run 2>/dev/null
. bench/etcd.sh
ETCD="$ETCD_URL" cargo bench -q -p kiln-agent --features bench --bench state 2>/dev/null |
    python3 -c '
import json, sys
r = json.load(sys.stdin)
print("state store operations per second (%s each):" % next(iter(r["sqlite"].values()))["ops"])
print("  %-10s %12s %12s %10s" % ("operation", "SQLite", "etcd", "etcd/SQLite"))
for op in r["sqlite"]:
    s, e = r["sqlite"][op]["ops_per_second"], r["etcd"][op]["ops_per_second"]
    print("  %-10s %12.0f %12.0f %9.2fx" % (op, s, e, e / s))
'
