#!/usr/bin/env bash
# kiln restarting, upgrading and crashing under load (not a test), side by
# side with nginx's reload (`nginx -s reload`, its graceful restart) in front
# of the same backend, same wrk:
#  (1) for each of: a graceful restart (SIGHUP to kiln serve, same binary),
#      an upgrade (the binary replaced by another build, then SIGHUP), and
#      `kill -9` of the agent process: requests failed (non-2xx and socket
#      errors) and the longest gap a client saw (wrk's max latency), over
#      REPS repetitions, each during one DURATION-second wrk run
#  (2) the same runs with nothing happening, for each proxy: the machine's own
#      latency tail, which every "gap" includes
#  (3) after kill -9: the time from the agent's death to its successor
#      serving the API again (p50/p99 over the REPS kills)
#
#   bench/restart.sh        # REPS=20 DURATION=2 CONNS=50
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for t in wrk nginx; do command -v "$t" >/dev/null || missing+=("$t"); done
if ((${#missing[@]})); then
    echo "installing ${missing[*]}" >&2
    apt-get install -y -qq wrk nginx-light >/dev/null
fi
echo "building kiln and hello (release)..." >&2
cargo build --release -q -p kiln -p hello
exec python3 bench/restart.py "$PWD/target/release/kiln" "$PWD/target/release/hello" "$PWD/bench"
