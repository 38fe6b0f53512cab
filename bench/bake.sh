#!/usr/bin/env bash
# Bake benchmark: kiln bake against `tar | gzip -6 | sha256sum` on the same
# ~1 GiB, ~20,000-file tree, side by side in one run. Not a test: it prints
# a table of medians and ratios. Run from the repository root:
#
#   bench/bake.sh            # RUNS=3 by default; BENCH_DIR to choose where
#
# (a) baseline  tar --sort=name | gzip -6 | sha256sum   (also pigz -6 if installed)
# (b) kiln bake, one declared layer (stored as parts, `part_size`) and four
#     declared layers, into an empty store
# (c) re-bake with nothing changed
# (d) re-bake after changing one 1 KiB file
# (e) store growth after (d)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
WORK=${BENCH_DIR:-/tmp/kiln-bench}
TREE=$WORK/tree
mkdir -p "$WORK"

echo "building kiln (release)..." >&2
cargo build --release -q -p kiln
KILN=$PWD/target/release/kiln

if [ ! -f "$TREE/.complete" ]; then
    echo "generating the tree in $TREE ..." >&2
    rm -rf "$TREE"
    python3 bench/gentree.py "$TREE"
    touch "$TREE/.complete"
fi
FILES=$(find "$TREE" -type f ! -name .complete | wc -l)
BYTES=$(du -sb --exclude=.complete "$TREE" | cut -f1)

# The generated tree is shared with the other benches: this one bakes a
# copy made of hard links, and changes files by replacing them (a new
# inode), so the shared tree is never written.
SHARED=$TREE
TREE=$WORK/bake-tree
rm -rf "$TREE"
cp -al "$SHARED" "$TREE"
trap 'rm -rf "$TREE"' EXIT
change() { # FILE: new content, in a new inode
    python3 -c "import sys,os; p=sys.argv[1]; open(p+'.new','wb').write(os.urandom(512).hex().encode()); os.replace(p+'.new', p)" "$1"
}

cat > "$WORK/one.toml" <<TOML
[images.one]
context = "bake-tree"
exclude = [".complete"]
TOML
cat > "$WORK/multi.toml" <<TOML
[images.multi]
context = "bake-tree"
exclude = [".complete"]
[[images.multi.layers]]
name = "deps-py"
paths = ["deps/pkg*"]
[[images.multi.layers]]
name = "deps-lib"
paths = ["deps"]
[[images.multi.layers]]
name = "assets"
paths = ["assets"]
TOML

now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
time_cmd() { local t0; t0=$(now); "$@" >/dev/null 2>&1; echo "$(now) - $t0" | bc -l; }
blob_bytes() { du -sb "$1/blobs" | cut -f1; }

# Warm the page cache so every contender reads from memory.
tar -C "$TREE" -cf - . >/dev/null

declare -A R
run() { # name, command...
    local name=$1; shift
    local xs=()
    for _ in $(seq "$RUNS"); do xs+=("$("$@")"); done
    R[$name]=$(printf '%s\n' "${xs[@]}" | median)
}

baseline() { time_cmd bash -c "tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C '$TREE' --exclude=.complete -cf - . | gzip -6 | sha256sum"; }
pigz_base() { time_cmd bash -c "tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C '$TREE' --exclude=.complete -cf - . | pigz -6 | sha256sum"; }
fresh_bake() { # spec
    rm -rf "$WORK/home"
    time_cmd "$KILN" --home "$WORK/home" bake -f "$1"
}

echo "measuring ($RUNS runs each, medians)..." >&2
run a baseline
HAVE_PIGZ=0
if command -v pigz >/dev/null; then HAVE_PIGZ=1; run a2 pigz_base; fi
run b1 fresh_bake "$WORK/one.toml"
run b4 fresh_bake "$WORK/multi.toml"
# Let the tree's timestamps age past the stat cache's racy-file margin.
sleep 1
rebake_none() { time_cmd "$KILN" --home "$WORK/home" bake -f "$WORK/multi.toml"; }
run c rebake_none

# (d): change one 1 KiB file of the app layer, then re-bake; repeat with new content each run.
dvals=(); evals=()
for i in $(seq "$RUNS"); do
    before=$(blob_bytes "$WORK/home")
    change "$TREE/src/main.rs"
    sleep 0.2
    dvals+=("$(time_cmd "$KILN" --home "$WORK/home" bake -f "$WORK/multi.toml")")
    after=$(blob_bytes "$WORK/home")
    evals+=("$((after - before))")
done
R[d]=$(printf '%s\n' "${dvals[@]}" | median)

# (f): the same one-file change in the one-layer image (~1 GiB in a single
# declared layer, stored as parts of >= 64 MiB): the other parts are
# reused as they are; in the part it falls in, the members of unchanged
# runs of files are copied, not compressed.
"$KILN" --home "$WORK/home" bake -f "$WORK/one.toml" >/dev/null 2>&1
fvals=()
for i in $(seq "$RUNS"); do
    change "$TREE/src/main.rs"
    sleep 0.2
    fvals+=("$(time_cmd "$KILN" --home "$WORK/home" bake -f "$WORK/one.toml")")
done
R[f]=$(printf '%s\n' "${fvals[@]}" | median)
# (g): the worst place for the one-layer image: a file at the start of its
# part (nothing before it to resume; the members after it are copied).
FIRST=$(cd "$TREE" && find . -type f ! -name .complete | LC_ALL=C sort | awk 'NR == 1')
gvals=()
for i in $(seq "$RUNS"); do
    change "$TREE/$FIRST"
    sleep 0.2
    gvals+=("$(time_cmd "$KILN" --home "$WORK/home" bake -f "$WORK/one.toml")")
done
R[g]=$(printf '%s\n' "${gvals[@]}" | median)
R[e]=$(printf '%s\n' "${evals[@]}" | median)
APP_LAYER=$("$KILN" --home "$WORK/home" inspect multi --json | python3 -c 'import json,sys; l=json.load(sys.stdin)["layers"]; print(l[-1]["size"])')
TOTAL=$("$KILN" --home "$WORK/home" inspect multi --json | python3 -c 'import json,sys; l=json.load(sys.stdin)["layers"]; print(sum(x["size"] for x in l))')

PARTS=$("$KILN" --home "$WORK/home" inspect one --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["layers"]))')
ratio() { echo "scale=3; $1 / ${R[a]}" | bc -l; }
printf '\ntree: %s files, %.2f GiB; %s runs each, median seconds; machine: %s cores\n\n' "$FILES" "$(echo "$BYTES/1073741824" | bc -l)" "$RUNS" "$(nproc)"
printf '%-58s %10s %12s\n' "case" "seconds" "vs baseline"
printf '%-58s %10.3f %12s\n' "(a) tar --sort=name | gzip -6 | sha256sum" "${R[a]}" "1.000"
[ "$HAVE_PIGZ" = 1 ] && printf '%-58s %10.3f %12.3f\n' "(a') tar --sort=name | pigz -6 | sha256sum (both cores)" "${R[a2]}" "$(ratio "${R[a2]}")"
printf '%-58s %10.3f %12.3f\n' "(b) kiln bake, one layer, empty store" "${R[b1]}" "$(ratio "${R[b1]}")"
printf '%-58s %10.3f %12.3f\n' "(b) kiln bake, four layers, empty store" "${R[b4]}" "$(ratio "${R[b4]}")"
printf '%-58s %10.3f %12.3f\n' "(c) re-bake, nothing changed" "${R[c]}" "$(ratio "${R[c]}")"
printf '%-58s %10.3f %12.3f\n' "(d) re-bake after changing one 1 KiB file" "${R[d]}" "$(ratio "${R[d]}")"
printf '%-58s %10.3f %12.3f\n' "(f) re-bake of the one-layer image after that change" "${R[f]}" "$(ratio "${R[f]}")"
printf '%-58s %10.3f %12.3f\n' "(g) the same, the layer's first file changed" "${R[g]}" "$(ratio "${R[g]}")"
printf '\n(c)/(b four layers) = %.2f%%   (target < 2%%)\n' "$(echo "100 * ${R[c]} / ${R[b4]}" | bc -l)"
printf '(f)/(b one layer) = %.2f%%   (target < 10%%); (g)/(b one layer) = %.2f%%\n' "$(echo "100 * ${R[f]} / ${R[b1]}" | bc -l)" "$(echo "100 * ${R[g]} / ${R[b1]}" | bc -l)"
printf '(the one declared layer is stored as %s parts)\n' "$PARTS"
printf '(e) store growth after (d): %s bytes; the changed layer is %s bytes of an image of %s bytes\n' "${R[e]}" "$APP_LAYER" "$TOTAL"
