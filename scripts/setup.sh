#!/usr/bin/env bash
# Installs what picloud needs to build and test on a Debian machine:
# hwloc's development files (the node agent discovers topology with hwloc)
# and the tools the tests use. Safe to run again: it installs only what is missing.
set -euo pipefail

need=()
for pkg in libhwloc-dev libudev-dev pkg-config; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing ${need[*]}" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "setup: cargo is missing; install Rust from rustup" >&2; exit 1; }

# Python: the worker needs cloudpickle; the tests need pytest, and numpy for
# the shared-memory array tests.
missing_py=()
for mod in cloudpickle numpy pytest; do
    python3 -c "import $mod" 2>/dev/null || missing_py+=("$mod")
done
if [ ${#missing_py[@]} -gt 0 ]; then
    echo "setup: installing Python packages ${missing_py[*]}" >&2
    python3 -m pip install --quiet "${missing_py[@]}" 2>/dev/null ||
        python3 -m pip install --quiet --break-system-packages "${missing_py[@]}"
fi
