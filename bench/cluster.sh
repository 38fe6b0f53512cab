#!/usr/bin/env bash
# Node loss on a three-node cluster (not a test): a real etcd and three
# agents on this machine (three homes), three replicas of examples/hello
# spread one per node; KILLS times, a node that does not lead is killed
# with its instances (kill -9 of its kiln serve, its agent and its
# instances) and the time until the other two run all three replicas ready
# is measured, then the node is started again. Prints p50/p99 and the
# budget the issue sets (2x the lease's TTL plus the app's start).
#
#   bench/cluster.sh        # KILLS=10
set -euo pipefail
cd "$(dirname "$0")/.."
command -v etcd >/dev/null || apt-get install -y -qq etcd-server >/dev/null
echo "building kiln and hello (release)..." >&2
cargo build --release -q -p kiln -p hello
exec python3 bench/cluster.py "$PWD/target/release/kiln" "$PWD/target/release/hello" "$PWD/bench"
