#!/usr/bin/env bash
# The embedded default, end to end: sets up what is missing, builds picloud,
# starts `picloud up` (a server and an agent on this machine) and runs a small
# demo: a job array, a job that depends on it, and the queue as qstat shows it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --bins --quiet
bin="$PWD/target/release"
export PICLOUD_DIR="${PICLOUD_DIR:-$(mktemp -d /tmp/picloud-demo.XXXXXX)}"
work="$PICLOUD_DIR/work"
mkdir -p "$work" "$PICLOUD_DIR/bin"
"$bin/picloud" install-pbs-commands "$PICLOUD_DIR/bin" >/dev/null
export PATH="$PICLOUD_DIR/bin:$PATH"

"$bin/picloud" up &
up=$!
trap 'kill -TERM $up 2>/dev/null; wait $up 2>/dev/null || true' EXIT
until "$bin/picloud" nodes 2>/dev/null | grep -q " up "; do
    kill -0 $up 2>/dev/null || { echo "demo: picloud up failed" >&2; exit 1; }
    sleep 0.1
done

cd "$work"
cat > square.sh <<'SCRIPT'
#!/bin/sh
#PBS -N square
#PBS -l select=1:ncpus=1:mem=64mb,walltime=00:01:00
#PBS -J 1-8
echo "task $PBS_ARRAY_INDEX of $PBS_JOBID on $(hostname): $((PBS_ARRAY_INDEX * PBS_ARRAY_INDEX))"
SCRIPT
cat > total.sh <<'SCRIPT'
#!/bin/sh
#PBS -N total
#PBS -j oe
cat square.o*.* | awk '{ s += $NF } END { print "sum of squares 1..8 =", s }'
SCRIPT

array=$(qsub square.sh)
echo "submitted array $array"
total=$(qsub -W depend=afterok:"$array" total.sh)
echo "submitted $total (runs after $array succeeds)"
qstat -t
"$bin/picloud" wait "$total"
echo
echo "--- qstat -x (finished jobs) ---"
qstat -x
echo
echo "--- output of $total ---"
cat total.o*
echo
echo "demo done; stopping the cluster (state was in $PICLOUD_DIR)"
