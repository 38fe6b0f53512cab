#!/usr/bin/env bash
# Registry benchmark: kiln push / pull against `skopeo copy` the same way,
# side by side in one run, on the ~1 GiB, ~20,000-file bench tree baked
# into one image (the same tree as bench/bake.sh), with a local
# docker-registry on a free loopback port. Not a test: it prints medians,
# ratios and peak memory. Run from the repository root:
#
#   bench/registry.sh          # RUNS=3 by default; BENCH_DIR to choose where;
#                              # PART_SIZE=0: the layer as one blob, not parts
#
# (a) push to an empty repository: kiln push vs skopeo copy oci:STORE → docker://
# (b) push again, every blob present (a no-op push)
# (c) pull into an empty store: kiln pull vs skopeo copy docker:// → oci:DIR
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
WORK=${BENCH_DIR:-/tmp/kiln-bench}
TREE=$WORK/tree
mkdir -p "$WORK"
for tool in docker-registry skopeo; do
    command -v "$tool" >/dev/null || { echo "$tool is needed (apt-get install $tool)" >&2; exit 1; }
done

echo "building kiln (release)..." >&2
cargo build --release -q -p kiln
KILN=$PWD/target/release/kiln

if [ ! -f "$TREE/.complete" ]; then
    echo "generating the tree in $TREE ..." >&2
    rm -rf "$TREE"
    python3 bench/gentree.py "$TREE"
    touch "$TREE/.complete"
fi
# PART_SIZE=0 stores the image's one layer whole (one 745 MiB blob).
PART_SIZE=${PART_SIZE:-64M}
cat > "$WORK/registry-$PART_SIZE.toml" <<TOML
[images.one]
context = "tree"
exclude = [".complete"]
part_size = "$PART_SIZE"
TOML
HOME_SRC=$WORK/registry-src-$PART_SIZE
if [ ! -f "$HOME_SRC/.baked" ]; then
    echo "baking the image..." >&2
    rm -rf "$HOME_SRC"
    "$KILN" --home "$HOME_SRC" bake -f "$WORK/registry-$PART_SIZE.toml" --tag v1 >/dev/null 2>&1
    touch "$HOME_SRC/.baked"
fi
SIZE=$(du -sb "$HOME_SRC/blobs" | cut -f1)

# The registry: its own config and storage, on a free port; stopped at exit.
REG_DIR=$(mktemp -d "$WORK/registry.XXXX")
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$REG_DIR/config.yml" <<YML
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $REG_DIR/data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$PORT
YML
docker-registry serve "$REG_DIR/config.yml" >/dev/null 2>&1 &
REG_PID=$!
trap 'kill $REG_PID 2>/dev/null; wait $REG_PID 2>/dev/null || true; rm -rf "$REG_DIR"' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/v2/" >/dev/null && break; sleep 0.1; done
HOST=127.0.0.1:$PORT

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
declare -A T M
n=0
# run NAME COMMAND: RUNS times; each run's `@N@` becomes a fresh number (a
# new repository per push: the registry's storage is shared). Keeps the
# median wall seconds and the largest peak RSS (KiB), from GNU time.
run() {
    local name=$1 cmd=$2 ts=() ms=() t m
    for _ in $(seq "$RUNS"); do
        n=$((n + 1))
        /usr/bin/time -f '%e %M' -o "$WORK/time.out" bash -c "${cmd//@N@/$n}" >/dev/null 2>&1
        read -r t m < "$WORK/time.out"
        ts+=("$t"); ms+=("$m")
    done
    T[$name]=$(printf '%s\n' "${ts[@]}" | median)
    M[$name]=$(printf '%s\n' "${ms[@]}" | sort -n | tail -1)
}
# Both tools remember where blobs are and would mount them from the last
# run's repository instead of uploading: their caches are cleared first.
KP="rm -f '$HOME_SRC/cache/registry-blobs.json' && '$KILN' --home '$HOME_SRC' push one:v1 '$HOST/kiln@N@:v1' --insecure"
SP="rm -f /var/lib/containers/cache/blob-info-cache-v1.boltdb ~/.local/share/containers/cache/blob-info-cache-v1.boltdb && skopeo copy -q --dest-tls-verify=false 'oci:$HOME_SRC:one:v1' 'docker://$HOST/skopeo@N@:v1'"
# The no-op pushes go to repositories each tool filled first, untimed
# (kiln-full, skopeo-full), whatever RUNS is.
KN="'$KILN' --home '$HOME_SRC' push one:v1 '$HOST/kiln-full:v1' --insecure"
SN="skopeo copy -q --dest-tls-verify=false 'oci:$HOME_SRC:one:v1' 'docker://$HOST/skopeo-full:v1'"
KL="rm -rf '$WORK/pull-kiln' && '$KILN' --home '$WORK/pull-kiln' pull '$HOST/kiln-full:v1' --insecure"
SL="rm -rf '$WORK/pull-skopeo' && skopeo copy -q --src-tls-verify=false 'docker://$HOST/kiln-full:v1' 'oci:$WORK/pull-skopeo:v1'"

echo "measuring ($RUNS runs each, medians; image: $((SIZE / 1048576)) MiB of blobs)..." >&2
run kp "$KP"
run sp "$SP"
bash -c "$KN" >/dev/null 2>&1
bash -c "$SN" >/dev/null 2>&1
run kn "$KN"
run sn "$SN"
run kl "$KL"
run sl "$SL"
rm -rf "$WORK/pull-kiln" "$WORK/pull-skopeo"

row() { # label, kiln key, skopeo key
    printf '%-40s %9.2f %9.2f %8.2f %10s %10s\n' "$1" "${T[$2]}" "${T[$3]}" \
        "$(echo "${T[$2]} / ${T[$3]}" | bc -l)" "$((M[$2] / 1024)) MiB" "$((M[$3] / 1024)) MiB"
}
printf '\nimage: %d MiB of blobs; %s runs each, median seconds; peak RSS is the largest of the runs; %s cores\n\n' \
    "$((SIZE / 1048576))" "$RUNS" "$(nproc)"
printf '%-40s %9s %9s %8s %10s %10s\n' "case" "kiln" "skopeo" "ratio" "kiln RSS" "skopeo RSS"
row "(a) push to an empty repository" kp sp
row "(b) push again (every blob present)" kn sn
row "(c) pull into an empty store" kl sl
