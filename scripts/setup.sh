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
