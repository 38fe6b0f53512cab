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
echo "building the benchmark (release)..." >&2
cargo bench -q -p kiln-agent --features bench --bench placement --no-run 2>/dev/null
. bench/etcd.sh
ETCD="$ETCD_URL" cargo bench -q -p kiln-agent --features bench --bench placement 2>/dev/null |
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
