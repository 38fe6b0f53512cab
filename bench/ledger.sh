#!/usr/bin/env bash
# The ledger's cost (not a test): appending chained events to the real
# SQLite state store against plain inserts of the same rows, then reading
# and verifying the whole chain (crates/kiln-agent/benches/ledger.rs).
#
#   ENTRIES=1000000 bench/ledger.sh      # default 1,000,000
set -euo pipefail
cd "$(dirname "$0")/.."
export ENTRIES=${ENTRIES:-1000000}
echo "building the benchmark (release)..." >&2
cargo bench -q -p kiln-agent --features bench --bench ledger --no-run 2>/dev/null
cargo bench -q -p kiln-agent --features bench --bench ledger 2>/dev/null
