#!/usr/bin/env bash
# Baking on a base: kiln bake of an app on a real Debian userland (made with
# mmdebstrap, minbase, in an OCI layout made with umoci) against doing the
# same by hand with umoci and tar, side by side in one run. Not a test: it
# prints medians and ratios. Run from the repository root:
#
#   bench/base.sh          # RUNS=5 by default; BENCH_DIR to choose where
#
# The app: ~400 files, ~8 MiB (bench/gentree.py's shape, smaller).
# (a) kiln bake on base = "oci:DIR:bookworm", into an empty store (the base's
#     blobs verified and taken in, the app's layer written)
# (b) kiln bake again after one app file changed (the base is the store's)
# (c) by hand, the light way: tar the app, gzip it, `umoci raw add-layer`
#     onto a copy of the layout (no unpack of the base)
# (d) by hand, the usual way: `umoci unpack` the base, copy the app in,
#     `umoci repack` (what a Dockerfile-less build of FROM + COPY does)
# Every contender ends with the image's layers in a store or layout.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
WORK=${BENCH_DIR:-/tmp/kiln-bench}/base
mkdir -p "$WORK"

need() { command -v "$1" >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null; }; }
need mmdebstrap mmdebstrap
need umoci umoci

echo "building kiln (release)..." >&2
cargo build --release -q -p kiln
KILN=$PWD/target/release/kiln

# The Debian userland, once: a minbase bookworm as an OCI layout.
LAYOUT=$WORK/debian-oci
if [ ! -f "$WORK/.debian-complete" ]; then
    echo "making a Debian minbase with mmdebstrap (needs the Debian mirror)..." >&2
    rm -rf "$LAYOUT" "$WORK/bundle" "$WORK/debian.tar"
    mmdebstrap --quiet --variant=minbase --mode=root bookworm "$WORK/debian.tar"
    umoci init --layout "$LAYOUT"
    umoci new --image "$LAYOUT:bookworm"
    umoci unpack --image "$LAYOUT:bookworm" "$WORK/bundle" >/dev/null
    tar -C "$WORK/bundle/rootfs" -xf "$WORK/debian.tar"
    umoci repack --image "$LAYOUT:bookworm" "$WORK/bundle" >/dev/null
    umoci config --image "$LAYOUT:bookworm" --config.env PATH=/usr/local/bin:/usr/bin:/bin >/dev/null
    rm -rf "$WORK/bundle" "$WORK/debian.tar"
    touch "$WORK/.debian-complete"
fi
BASE_BYTES=$(du -sb "$LAYOUT/blobs" | cut -f1)

# The app.
APP=$WORK/app
if [ ! -f "$WORK/.app-complete" ]; then
    rm -rf "$APP"
    python3 - "$APP" <<'PY'
import os, random, sys
root = sys.argv[1]
rnd = random.Random(7)
for i in range(400):
    d = os.path.join(root, "srv", "app", f"pkg{i % 20}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"mod{i}.py"), "wb") as f:
        f.write(bytes(rnd.getrandbits(8) for _ in range(rnd.randint(4_000, 36_000))))
PY
    touch "$WORK/.app-complete"
fi
APP_FILES=$(find "$APP" -type f | wc -l)
APP_BYTES=$(du -sb "$APP" | cut -f1)

cat > "$WORK/kiln.toml" <<TOML
[images.app]
base = "oci:debian-oci:bookworm"
context = "app"
workdir = "/srv/app"
cmd = ["python3", "-m", "app"]
TOML

now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
elapsed() { echo "$(now) - $1" | bc -l; }

cold_kiln() {
    rm -rf "$WORK/home"
    local t0; t0=$(now)
    KILN_HOME=$WORK/home "$KILN" bake -f "$WORK/kiln.toml" >/dev/null 2>&1
    elapsed "$t0"
}
warm_kiln() {
    python3 -c "import sys,os; p=sys.argv[1]; open(p+'.new','wb').write(os.urandom(2048)); os.replace(p+'.new', p)" "$APP/srv/app/pkg3/mod3.py"
    local t0; t0=$(now)
    KILN_HOME=$WORK/home "$KILN" bake -f "$WORK/kiln.toml" >/dev/null 2>&1
    elapsed "$t0"
}
by_hand_light() {
    rm -rf "$WORK/light"
    local t0; t0=$(now)
    cp -a "$LAYOUT" "$WORK/light"
    tar -C "$APP" --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -cf - . | gzip -6 > "$WORK/layer.tar.gz"
    umoci raw add-layer --image "$WORK/light:bookworm" --tag app "$WORK/layer.tar.gz"
    umoci config --image "$WORK/light:app" --config.workingdir /srv/app --config.cmd python3 >/dev/null
    elapsed "$t0"
}
by_hand_repack() {
    rm -rf "$WORK/repack" "$WORK/rbundle"
    local t0; t0=$(now)
    cp -a "$LAYOUT" "$WORK/repack"
    umoci unpack --image "$WORK/repack:bookworm" "$WORK/rbundle" >/dev/null
    cp -a "$APP/." "$WORK/rbundle/rootfs/"
    umoci repack --image "$WORK/repack:bookworm" "$WORK/rbundle" >/dev/null
    elapsed "$t0"
}

# Warm the page cache for everyone.
cat "$LAYOUT"/blobs/sha256/* > /dev/null
tar -C "$APP" -cf - . > /dev/null

declare -A R
run() {
    local name=$1; shift
    local xs=()
    for _ in $(seq "$RUNS"); do xs+=("$("$@")"); done
    R[$name]=$(printf '%s\n' "${xs[@]}" | median)
}
run kiln_cold cold_kiln
run kiln_warm warm_kiln
run light by_hand_light
run repack by_hand_repack
rm -rf "$WORK/light" "$WORK/repack" "$WORK/rbundle" "$WORK/layer.tar.gz"

ratio() { echo "scale=3; $1 / $2" | bc -l; }
printf 'base: Debian bookworm minbase, %s MiB of blobs; app: %s files, %s KiB; %s runs, medians\n' \
    "$((BASE_BYTES / 1048576))" "$APP_FILES" "$((APP_BYTES / 1024))" "$RUNS"
printf '%-58s %8.3f s\n' "(a) kiln bake on the base, empty store" "${R[kiln_cold]}"
printf '%-58s %8.3f s\n' "(b) kiln bake again, one app file changed" "${R[kiln_warm]}"
printf '%-58s %8.3f s\n' "(c) by hand: tar | gzip + umoci raw add-layer" "${R[light]}"
printf '%-58s %8.3f s\n' "(d) by hand: umoci unpack + cp + umoci repack" "${R[repack]}"
printf 'ratios: (a)/(c) %s  (b)/(c) %s  (a)/(d) %s  (b)/(d) %s\n' \
    "$(ratio "${R[kiln_cold]}" "${R[light]}")" "$(ratio "${R[kiln_warm]}" "${R[light]}")" \
    "$(ratio "${R[kiln_cold]}" "${R[repack]}")" "$(ratio "${R[kiln_warm]}" "${R[repack]}")"
