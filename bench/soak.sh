#!/usr/bin/env bash
# Soak benchmark: the agent's memory and its /metrics over many rollouts of
# one service (each a new release), under a light load. Not a test: it
# prints the agent's RSS and the size of /metrics every STEP rollouts.
#
#   ROLLOUTS=1000 STEP=100 PAUSE=0.2 bench/soak.sh   # defaults 500, 50, 0.2 s
set -euo pipefail
cd "$(dirname "$0")/.."
echo "building kiln and hello (release)..." >&2
cargo build --release -q -p kiln -p hello
exec python3 bench/soak.py "$PWD/target/release/kiln" "$PWD/target/release/hello"
