#!/usr/bin/env bash
# Traffic benchmark, side by side in one run (not a test):
#  (1) kiln's router vs nginx vs HAProxy vs direct, all in front of the same
#      backend process (one examples/hello instance kiln runs), same wrk:
#      requests/s, p50, p99 (medians of RUNS)
#  (2) warm rollback (blue-green): from `kiln rollback` to the first response
#      served by the old release, p50/p99 over ROLLBACKS, and the same from a
#      rollback sent on the API socket (no process started: the agent's
#      share), alternated, on an idle machine and under load; failed
#      requests under load meanwhile
#
#   bench/traffic.sh        # RUNS=3 DURATION=10 CONNS=50 ROLLBACKS=20
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for t in wrk nginx haproxy; do command -v "$t" >/dev/null || missing+=("$t"); done
if ((${#missing[@]})); then
    echo "installing ${missing[*]}" >&2
    apt-get install -y -qq wrk nginx-light haproxy >/dev/null
fi
echo "building kiln and hello (release)..." >&2
cargo build --release -q -p kiln -p hello
exec python3 bench/traffic.py "$PWD/target/release/kiln" "$PWD/target/release/hello" "$PWD/bench"
