#!/usr/bin/env bash
# Runs every picloud test: unit tests of each crate and the cross-process
# integration tests, which start real `picloud up` servers and agents.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The integration tests drive the real binary, so build it first.
cargo build --workspace --bins --quiet
cargo test --workspace --no-fail-fast
