#!/usr/bin/env bash
# Remote-use benchmark, side by side in one run. Not a test: it prints
# medians and ratios. Run from the repository root:
#
#   bench/remote.sh           # RUNS=5 by default; BENCH_DIR to choose where
#
# (a) API calls per second: GET /v1/status and GET /v1/services/web/history
#     over TLS with a token (kiln serve --api) against the Unix socket, by
#     the same client (bench/apiload.py: keep-alive connections, 4 threads)
# (b) the dashboard's first load: time (TLS handshake included) and weight
#     in bytes of the page, its stylesheet and its script
# (c) an upload of the ~1 GiB bench image to the agent through its API
#     (`kiln --agent URL push`) against `kiln push` to a local
#     docker-registry, each into an empty store / repository
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
CALLS=${CALLS:-4000}
WORK=${BENCH_DIR:-/tmp/kiln-bench}
TREE=$WORK/tree
mkdir -p "$WORK"
for tool in docker-registry curl python3; do
    command -v "$tool" >/dev/null || { echo "$tool is needed" >&2; exit 1; }
done

echo "building kiln (release)..." >&2
cargo build --release -q -p kiln -p hello
KILN=$PWD/target/release/kiln
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# An agent with one service, serving its API over TLS.
AG=$(mktemp -d "$WORK/remote.XXXX")
# Searchable by everyone: an agent running as root runs instances as nobody.
chmod 711 "$WORK" "$AG"
API=$(free_port)
WEB=$(free_port)
REG_DIR=$AG/registry
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$AG"
}
trap cleanup EXIT
export KILN_HOME=$AG/home
"$KILN" serve --api "127.0.0.1:$API" >"$AG/agent.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do [ -S "$KILN_HOME/kiln.sock" ] && break; sleep 0.1; done
mkdir -p "$AG/app/bin"
cp target/release/hello "$AG/app/bin/hello"
cat > "$AG/kiln.toml" <<TOML
[images.app]
context = "app"
entrypoint = ["/bin/hello"]
[services.web]
image = "app"
replicas = 1
listen = "127.0.0.1:$WEB"
TOML
"$KILN" apply -f "$AG/kiln.toml" >/dev/null 2>&1
TOKEN=$("$KILN" token create bench --role admin 2>/dev/null)

echo "(a) API calls..." >&2
declare -A R
for path in /v1/status /v1/services/web/history; do
    for via in tls unix; do
        rs=()
        for _ in $(seq "$RUNS"); do
            rs+=("$(python3 bench/apiload.py "$via" "$([ "$via" = tls ] && echo "127.0.0.1:$API" || echo "$KILN_HOME/kiln.sock")" "$path" "$TOKEN" "$CALLS")")
        done
        R[$via$path]=$(printf '%s\n' "${rs[@]}" | median)
    done
done

echo "(b) the dashboard..." >&2
# A first load is the page and what it loads (stylesheet, script), over one
# connection as a browser keeps it; every answer must be 200.
ts=()
for _ in $(seq "$RUNS"); do
    out=$(curl -sk -o /dev/null -o /dev/null -o /dev/null -w '%{http_code} %{time_total}\n' \
        -H "cookie: kiln_token=$TOKEN" \
        "https://127.0.0.1:$API/" "https://127.0.0.1:$API/ui/style.css" "https://127.0.0.1:$API/ui/app.js")
    if echo "$out" | awk '$1 != 200 {bad=1} END {exit !bad}'; then
        echo "the dashboard did not answer 200: $out" >&2; exit 1
    fi
    # Each transfer's time, the first with the handshake: their sum.
    ts+=("$(echo "$out" | awk '{s += $2} END {print s}')")
done
PAGE_T=$(printf '%s\n' "${ts[@]}" | median)
bytes() { curl -sk -o /dev/null -w '%{size_download}' -H "cookie: kiln_token=$TOKEN" "https://127.0.0.1:$API$1"; }
PAGE_B=$(bytes /)
CSS_B=$(bytes /ui/style.css)
JS_B=$(bytes /ui/app.js)

echo "(c) uploads of the bench image..." >&2
if [ ! -f "$TREE/.complete" ]; then
    echo "generating the tree in $TREE ..." >&2
    rm -rf "$TREE"
    python3 bench/gentree.py "$TREE"
    touch "$TREE/.complete"
fi
cat > "$WORK/one.toml" <<TOML
[images.one]
context = "tree"
exclude = [".complete"]
TOML
SRC=$WORK/registry-src
if [ ! -f "$SRC/.baked" ]; then
    rm -rf "$SRC"
    "$KILN" --home "$SRC" bake -f "$WORK/one.toml" --tag v1 >/dev/null 2>&1
    touch "$SRC/.baked"
fi
SIZE=$(du -sb "$SRC/blobs" | cut -f1)
REG=$(free_port)
mkdir -p "$REG_DIR"
cat > "$REG_DIR/config.yml" <<YML
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $REG_DIR/data
http:
  addr: 127.0.0.1:$REG
YML
docker-registry serve "$REG_DIR/config.yml" >/dev/null 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$REG/v2/" >/dev/null && break; sleep 0.1; done
# The agent each upload goes to: a fresh home (an empty store) every run.
UP_API=$(free_port)
ua=() ur=()
for i in $(seq "$RUNS"); do
    home=$AG/up$i
    KILN_HOME=$home "$KILN" serve --api "127.0.0.1:$UP_API" >"$AG/up$i.log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do [ -S "$home/kiln.sock" ] && break; sleep 0.1; done
    tok=$(KILN_HOME=$home "$KILN" token create up --role deployer 2>/dev/null)
    fp=$(grep -o 'certificate sha256:[0-9a-f]*' "$AG/up$i.log" | head -1 | cut -d' ' -f2)
    s=$(date +%s.%N)
    KILN_TOKEN=$tok KILN_AGENT_FINGERPRINT=$fp "$KILN" --home "$SRC" --agent "https://127.0.0.1:$UP_API" push one:v1 >/dev/null 2>&1
    ua+=("$(echo "$(date +%s.%N) - $s" | bc -l)")
    kill "$pid"; wait "$pid" 2>/dev/null || true
    rm -rf "$home"
    rm -f "$SRC/cache/registry-blobs.json"
    s=$(date +%s.%N)
    "$KILN" --home "$SRC" push one:v1 "127.0.0.1:$REG/up$i:v1" --insecure >/dev/null 2>&1
    ur+=("$(echo "$(date +%s.%N) - $s" | bc -l)")
done
UA=$(printf '%s\n' "${ua[@]}" | median)
UR=$(printf '%s\n' "${ur[@]}" | median)

printf '\n%s runs each, medians; %s cores\n\n' "$RUNS" "$(nproc)"
printf '%-44s %12s %12s %8s\n' "(a) calls/s ($CALLS per run, 4 threads)" "TLS+token" "Unix socket" "ratio"
for path in /v1/status /v1/services/web/history; do
    printf '%-44s %12.0f %12.0f %8.2f\n' "GET $path" "${R[tls$path]}" "${R[unix$path]}" \
        "$(echo "${R[tls$path]} / ${R[unix$path]}" | bc -l)"
done
printf '\n(b) dashboard first load (page, stylesheet, script): %.1f ms (TLS handshake included); %d bytes (page %d, css %d, js %d)\n' \
    "$(echo "$PAGE_T * 1000" | bc -l)" "$((PAGE_B + CSS_B + JS_B))" "$PAGE_B" "$CSS_B" "$JS_B"
printf '\n(c) upload of %d MiB of blobs: through the API %.2f s, kiln push to a registry %.2f s (ratio %.2f)\n' \
    "$((SIZE / 1048576))" "$UA" "$UR" "$(echo "$UA / $UR" | bc -l)"
