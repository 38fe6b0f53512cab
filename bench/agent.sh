#!/usr/bin/env bash
# Agent benchmark: kiln's overhead starting instances, and self-healing time,
# against the example app started bare in the same run. Not a test.
#
#   bench/agent.sh          # RUNS=5 applies, KILLS=50 kills by default
set -euo pipefail
cd "$(dirname "$0")/.."
echo "building kiln and hello (release)..." >&2
cargo build --release -q -p kiln -p hello
exec python3 bench/agent.py "$PWD/target/release/kiln" "$PWD/target/release/hello"
