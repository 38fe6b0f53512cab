#!/usr/bin/env bash
# Two builds of kiln's router side by side (not a test): the same wrk,
# alternated, against one examples/hello instance each; medians and
# run-by-run ratios (B against A). For "did this change make the router
# slower?": build the old commit into another target directory first.
#
#   bench/ab.sh OLD/kiln NEW/kiln        # RUNS=11 DURATION=5 CONNS=50
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 2 ] || { echo "usage: bench/ab.sh KILN_A KILN_B" >&2; exit 2; }
command -v wrk >/dev/null || apt-get install -y -qq wrk >/dev/null
echo "building hello (release)..." >&2
cargo build --release -q -p hello
exec python3 bench/ab.py "$1" "$2" "$PWD/target/release/hello"
