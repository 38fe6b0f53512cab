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
command -v etcd >/dev/null || apt-get install -y -qq etcd-server >/dev/null
echo "building the benchmark (release)..." >&2
cargo bench -q -p kiln-agent --features bench --bench state --no-run 2>/dev/null
dir=$(mktemp -d)
ports=$(python3 -c 'import socket
s=[socket.socket() for _ in range(2)]
[x.bind(("127.0.0.1",0)) for x in s]
print(*[x.getsockname()[1] for x in s])')
read -r client peer <<<"$ports"
etcd --data-dir "$dir/data" \
    --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client" \
    --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
    --initial-cluster "default=http://127.0.0.1:$peer" --log-level error >/dev/null 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do
    ETCDCTL_API=3 etcdctl --endpoints "127.0.0.1:$client" endpoint health >/dev/null 2>&1 && break
    sleep 0.1
done
ETCD="http://127.0.0.1:$client" cargo bench -q -p kiln-agent --features bench --bench state 2>/dev/null |
    python3 -c '
import json, sys
r = json.load(sys.stdin)
print("state store operations per second (%s each):" % next(iter(r["sqlite"].values()))["ops"])
print("  %-10s %12s %12s %10s" % ("operation", "SQLite", "etcd", "etcd/SQLite"))
for op in r["sqlite"]:
    s, e = r["sqlite"][op]["ops_per_second"], r["etcd"][op]["ops_per_second"]
    print("  %-10s %12.0f %12.0f %9.2fx" % (op, s, e, e / s))
'
