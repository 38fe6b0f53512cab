#!/usr/bin/env bash
# Placement throughput in a cluster (not a test): the leader places
# SERVICES x REPLICAS instances (default 10 x 1,000) over NODES simulated
# nodes (default 100) with its own decision, spread and fenced write, on
# etcd and on SQLite in one run; then every node reads its assignments
# back. Starts its own etcd (Debian's etcd-server) in a temporary
# directory on a free loopback port, and stops it.
#
#   bench/placement.sh
#   SERVICES=100 REPLICAS=100 NODES=100 bench/placement.sh
set -euo pipefail
cd "$(dirname "$0")/.."
command -v etcd >/dev/null || apt-get install -y -qq etcd-server >/dev/null
echo "building the benchmark (release)..." >&2
cargo bench -q -p kiln-agent --features bench --bench placement --no-run 2>/dev/null
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
ETCD="http://127.0.0.1:$client" cargo bench -q -p kiln-agent --features bench --bench placement 2>/dev/null |
    python3 -c '
import json, sys
r = json.load(sys.stdin)
for store in ("etcd", "sqlite"):
    x = r[store]
    print("%-6s %6d instances placed in %.3f s: %9.0f placements/s (decide+spread %.3f s, writes %.3f s); read back by every node in %.3f s: %9.0f placed-and-read/s; spread within one: %s" % (
        store, x["instances"], x["placed_seconds"], x["placements_per_second"],
        x["decide_and_spread_seconds"], x["write_seconds"],
        x["read_back_by_every_node_seconds"], x["placed_and_read_per_second"], x["spread_within_one"]))
print("etcd/SQLite placements: %.2fx" % (r["etcd"]["placements_per_second"] / r["sqlite"]["placements_per_second"]))
'
