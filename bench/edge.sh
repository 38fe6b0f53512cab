#!/usr/bin/env bash
# Edge benchmark (issue 26), side by side in one run (not a test):
#  (1) plain HTTP/1.1 through a listener of one service (`listen` alone)
#      against the same through a listener shared by four services, routed
#      by host and path prefix (stripped), and, with BASELINE=/path/to/kiln,
#      against another build of kiln (an A/B: did routing make the plain
#      path slower?). Runs interleaved; medians and run-by-run ratios.
#  (2) HTTPS with one ECDSA P-256 certificate, kiln vs nginx vs HAProxy in
#      front of the same backend: keep-alive requests/s and p99, and new
#      connections/s (a full handshake each).
#  (3) HTTP/2 over TLS with h2load (Debian's nghttp2-client), the same
#      three in front of the same HTTP/1.1 backend.
#
#   bench/edge.sh                       # RUNS=5 DURATION=10 CONNS=50 STREAMS=10
#   BASELINE=/tmp/kiln-old bench/edge.sh
#   ONLY=plain BASELINE=/tmp/kiln-old bench/edge.sh   # section (1) alone
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for t in wrk nginx haproxy openssl h2load; do command -v "$t" >/dev/null || missing+=("$t"); done
if ((${#missing[@]})); then
    echo "installing ${missing[*]}" >&2
    apt-get install -y -qq wrk nginx-light haproxy openssl nghttp2-client >/dev/null
fi
echo "building kiln and hello (release)..." >&2
cargo build --release -q -p kiln -p hello
exec python3 bench/edge.py "$PWD/target/release/kiln" "$PWD/target/release/hello" "$PWD/bench"
