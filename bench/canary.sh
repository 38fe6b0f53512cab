#!/usr/bin/env bash
# Canary abort benchmark (not a test): a canary answering 5xx at 30% is
# aborted by the analysis, ABORTS times in a row, under steady keep-alive
# load from CLIENTS threads. Reports, per abort:
#  - swap: from the analysis deciding to the routing table holding stable
#    only (measured inside the agent, logged with the abort)
#  - requests sent after the swap that a canary instance answered (must be 0)
#  - the last canary answer after the decision (requests already in flight
#    finish: the instance drains them before it stops)
#  - detection: from the canary's first answer to the decision
#
#   bench/canary.sh         # ABORTS=10 CLIENTS=4
set -euo pipefail
cd "$(dirname "$0")/.."
echo "building kiln and hello (release)..." >&2
cargo build --release -q -p kiln -p hello
exec python3 bench/canary.py "$PWD/target/release/kiln" "$PWD/target/release/hello"
