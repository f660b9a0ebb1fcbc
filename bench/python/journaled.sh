#!/usr/bin/env bash
# task_path.py against a cluster that journals with `--fsync always` (a
# `picloud up` in a fresh directory), for the checkout ROOT and its release
# build in TARGET (default ROOT/target/release):
#
#     bench/python/journaled.sh ROOT [TARGET] [PYTHON]
#
# Run it for two checkouts in turn to compare them side by side.
set -euo pipefail
root=$(cd "$1" && pwd)
target=${2:-$root/target/release}
python=${3:-python3}
dir=$(mktemp -d /tmp/picloud-journaled-XXXX)
"$target/picloud" up --dir "$dir" --kill-grace 1 >"$dir/up.out" 2>&1 &
up=$!
trap 'kill -TERM $up 2>/dev/null; wait $up 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do
    [ -S "$dir/agent.sock" ] && break
    sleep 0.1
done
PICLOUD_DIR=$dir PICLOUD_LIB=$target/libpicloud.so PICLOUD_BIN=$target/picloud \
    "$python" "$root/bench/python/task_path.py" --calls 2000 --map 2000
