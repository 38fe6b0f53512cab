#!/usr/bin/env bash
# Runtime benchmark: start -> ready and self-healing under each runtime
# (a bare process, bubblewrap, kiln's embedded OCI runtime), each against
# the runtime by itself (its launcher replayed by hand), in one run. Run as
# root (the oci runtime needs it). Not a test.
#
#   bench/runtime.sh          # KILLS=30 kills per runtime, each way; RUNTIMES="oci" for one
set -euo pipefail
cd "$(dirname "$0")/.."
echo "building kiln and hello (release)..." >&2
cargo build --release -q -p kiln -p hello
exec python3 bench/runtime.py "$PWD/target/release/kiln" "$PWD/target/release/hello"
