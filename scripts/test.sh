#!/usr/bin/env bash
# Runs every picloud test: unit tests of each crate, the cross-process
# integration tests, which start real `picloud up` servers and agents, and the
# Python tests (the worker on its own, then Python tasks through a real cluster).
# Ends with one line totalling every test binary's results.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
# What setup.sh installed must be used, not skipped: a stale C header, a
# memory error under valgrind or a missing Python fails the run.
export PICLOUD_REQUIRE_CBINDGEN=1 PICLOUD_REQUIRE_VALGRIND=1 PICLOUD_REQUIRE_PYTHON=1
# The integration tests drive the real binary and the Python tests the real
# library, so build both first, and point the Python client at them.
cargo build --workspace --quiet
target="${CARGO_TARGET_DIR:-$PWD/target}/debug"
export PICLOUD_LIB="$target/libpicloud.so" PICLOUD_BIN="$target/picloud"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --no-fail-fast 2>&1 | tee "$log" || status=$?
python3 -m pytest -q -p no:cacheprovider python/tests tests/python 2>&1 | tee -a "$log" || status=$?
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     /^[0-9]+ (passed|failed)|^=+ .*(passed|failed)/ { for (i = 1; i <= NF; i++) {
         if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1); if ($i ~ /^errors?/) f += $(i-1) } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
