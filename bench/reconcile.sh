#!/usr/bin/env bash
# The controller's decisions and bookkeeping at scale (not a test): 100
# services x 100 replicas on the fake runtime and the in-memory state store
# (crates/kiln-agent/benches/reconcile.rs says exactly what a pass does).
#  (1) one reconcile pass over 100, 1,000 and 10,000 instances (median of
#      21): its time, and per instance (linear growth keeps it flat)
#  (2) a rolling update of all 10,000 to a new release: replacements/s,
#      with max_surge = 1 (the default) and 25
#
#   bench/reconcile.sh
set -euo pipefail
cd "$(dirname "$0")/.."
echo "building the benchmark (release)..." >&2
cargo bench -q -p kiln-agent --features bench --bench reconcile --no-run 2>/dev/null
for surge in 1 25; do
    SURGE=$surge cargo bench -q -p kiln-agent --features bench --bench reconcile 2>/dev/null
done | python3 bench/reconcile.py
