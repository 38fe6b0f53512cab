#!/usr/bin/env bash
# Router and rollout benchmark, side by side in one run (not a test):
#  (1) rollback time: `kiln rollback` from the command to every instance on
#      the old release (median of ROLLBACKS)
#  (2) wrk through the router during a rolling update and during a rollback:
#      requests, non-2xx, socket errors (target: zero)
#  (3) the router's requests/s and p50/p99 against direct to one instance
#
#   bench/router.sh        # DURATION=10 (seconds per wrk run), CONNS=50
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
CONNS=${CONNS:-50}
ROLLBACKS=${ROLLBACKS:-5}
command -v wrk >/dev/null || { echo "installing wrk" >&2; apt-get install -y -qq wrk >/dev/null; }
echo "building kiln and hello (release)..." >&2
cargo build --release -q -p kiln -p hello
KILN=$PWD/target/release/kiln
WORK=$(mktemp -d /tmp/kiln-bench-router-XXXX)
# Searchable by everyone: an agent running as root runs instances as nobody.
chmod 711 "$WORK"
HOME_DIR=$WORK/home
AGENT_PID=
cleanup() { [ -n "$AGENT_PID" ] && kill -TERM "$AGENT_PID" 2>/dev/null && wait "$AGENT_PID" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$WORK/app/bin"
cp target/release/hello "$WORK/app/bin/hello"
spec() { # version
cat > "$WORK/app/kiln.toml" <<TOML
[images.hello]
include = ["bin"]
entrypoint = ["/bin/hello"]
[services.web]
image = "hello"
replicas = 3
listen = "127.0.0.1:$PORT"
env = { HELLO_VERSION = "$1" }
[services.web.health.readiness]
http = "/healthz"
interval = "250ms"
[services.web.stop]
drain_timeout = "2s"
TOML
}
spec v1
"$KILN" --home "$HOME_DIR" serve 2>"$WORK/agent.log" &
AGENT_PID=$!
while [ ! -S "$HOME_DIR/kiln.sock" ]; do sleep 0.05; done
(cd "$WORK/app" && "$KILN" --home "$HOME_DIR" apply >/dev/null 2>&1)

now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
wrk_run() { wrk -t2 -c"$CONNS" -d"$1"s --latency "$2" 2>&1; }
field() { # wrk output, what
    case $2 in
        rps) awk '/Requests\/sec/ {print $2}' <<<"$1" ;;
        total) awk '/requests in/ {print $1}' <<<"$1" ;;
        non2xx) awk '/Non-2xx/ {print $5}' <<<"$1" | grep . || echo 0 ;;
        sockerr) awk '/Socket errors/ {gsub(",",""); print $4+$6+$8+$10}' <<<"$1" | grep . || echo 0 ;;
        p50) awk '$1=="50%" {print $2}' <<<"$1" ;;
        p99) awk '$1=="99%" {print $2}' <<<"$1" ;;
    esac
}

echo "(3) router vs direct..." >&2
INSTANCE_PORT=$("$KILN" --home "$HOME_DIR" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["services"][0]["instances"][0]["port"])')
DIRECT=$(wrk_run "$DURATION" "http://127.0.0.1:$INSTANCE_PORT/")
ROUTER=$(wrk_run "$DURATION" "http://127.0.0.1:$PORT/")

echo "(2) load during a rolling update and a rollback..." >&2
wrk_run $((DURATION + 5)) "http://127.0.0.1:$PORT/" > "$WORK/rolling.out" &
WRK=$!
sleep 2
spec v2
t0=$(now); (cd "$WORK/app" && "$KILN" --home "$HOME_DIR" apply >/dev/null 2>&1); ROLLING_MS=$(echo "($(now) - $t0) * 1000" | bc -l)
wait $WRK
ROLLING=$(cat "$WORK/rolling.out")
wrk_run $((DURATION + 5)) "http://127.0.0.1:$PORT/" > "$WORK/rollback.out" &
WRK=$!
sleep 2
t0=$(now); "$KILN" --home "$HOME_DIR" rollback web >/dev/null 2>&1; FIRST_RB_MS=$(echo "($(now) - $t0) * 1000" | bc -l)
wait $WRK
ROLLBACK=$(cat "$WORK/rollback.out")

echo "(1) rollback time x $ROLLBACKS..." >&2
rbs=()
for _ in $(seq "$ROLLBACKS"); do
    t0=$(now); "$KILN" --home "$HOME_DIR" rollback web >/dev/null 2>&1; rbs+=("$(echo "($(now) - $t0) * 1000" | bc -l)")
done
RB_MED=$(printf '%s\n' "${rbs[@]}" | median)

printf '\nmachine: %s cores; wrk -t2 -c%s -d%ss (router, wrk and instances share the cores); 3 replicas of examples/hello (sandbox)\n\n' "$(nproc)" "$CONNS" "$DURATION"
printf '%-44s %12s %10s %10s\n' "(3) target" "requests/s" "p50" "p99"
printf '%-44s %12s %10s %10s\n' "direct to one instance" "$(field "$DIRECT" rps)" "$(field "$DIRECT" p50)" "$(field "$DIRECT" p99)"
printf '%-44s %12s %10s %10s\n' "through kiln's router (3 instances)" "$(field "$ROUTER" rps)" "$(field "$ROUTER" p50)" "$(field "$ROUTER" p99)"
printf '\n%-44s %10s %8s %14s %12s\n' "(2) under load during" "requests" "non-2xx" "socket errors" "command ms"
printf '%-44s %10s %8s %14s %12.0f\n' "a rolling update (3 replicas, surge 1)" "$(field "$ROLLING" total)" "$(field "$ROLLING" non2xx)" "$(field "$ROLLING" sockerr)" "$ROLLING_MS"
printf '%-44s %10s %8s %14s %12.0f\n' "a rollback" "$(field "$ROLLBACK" total)" "$(field "$ROLLBACK" non2xx)" "$(field "$ROLLBACK" sockerr)" "$FIRST_RB_MS"
printf '\n(1) rollback, command to every instance on the old release: median %.0f ms over %s (each a full rolling rollout of 3 instances)\n' "$RB_MED" "$ROLLBACKS"
