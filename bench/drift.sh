#!/usr/bin/env bash
# Drift detection (not a test), with the real agent, store and sandbox:
#  (1) latency: EDITS times, a file of a running service's image tree is
#      edited; from the write to the detector's finding (its log line), to
#      the ledger's tree-drift entry (the fresh tree made), and to the
#      replacement instance starting (its instance-started entry):
#      p50 / p99 (anchors: Argo CD compares every 3 minutes by default;
#      `ostree fsck` and `nix store --verify` only when run by hand)
#  (2) the full verification of a tree, unpaced (--verify-rate 0), against
#      `sha256sum` over the same files (one process, then two), on the
#      ~1 GiB / 20,000-file bench tree (bench/gentree.py), warm caches
#  (3) the agent's CPU while watching FILES files (default 100,000) with
#      nothing changing and no instance, over IDLE seconds, against the
#      same agent with no tree to watch
#
#   bench/drift.sh            # EDITS=20 FILES=100000 IDLE=30
set -euo pipefail
cd "$(dirname "$0")/.."
echo "building kiln and hello (release)..." >&2
cargo build --release -q -p kiln -p hello
exec python3 bench/drift.py "$PWD/target/release/kiln" "$PWD/target/release/hello" "$PWD/bench"
