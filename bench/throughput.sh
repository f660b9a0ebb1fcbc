#!/usr/bin/env bash
# End-to-end job throughput of picloud on this machine, against the fork+exec
# floor measured in the same run.
#
#   bench/throughput.sh [ARRAY_TASKS] [QSUB_CALLS]     (defaults 10000 and 1000)
#
# 1. floor:  `seq N | xargs -P <cores> -n1 true`: the machine's own rate of
#            starting and reaping `true`, <cores> at a time;
# 2. array:  one `qsub -J 1-N -- true` and `picloud wait` on it: every task is
#            placed by the server, pinned and started by the agent, with its
#            stdout/stderr files, and reported back;
# 3. qsub:   M separate `qsub -- true` processes, then `picloud wait` on all.
# Rates are jobs per second from submission until the last job has ended.
#
# Jobs write their stdout/stderr files (20 000 for the array) into the work
# directory, $BENCH_WORKDIR, by default a fresh directory on /dev/shm (tmpfs):
# on this machine's ext4 the cost of creating files right after a previous
# run deleted as many varies from run to run by a factor of two (ext4's inode
# allocator, `recently_deleted` in a profile), which would measure the file
# system rather than picloud.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10000}
M=${2:-1000}
cores=$(nproc)
cargo build --release --bins --quiet
bin="$PWD/target/release/picloud"

export PICLOUD_DIR=$(mktemp -d /tmp/picloud-bench.XXXXXX)
work="${BENCH_WORKDIR:-$(mktemp -d -p "$( [ -d /dev/shm ] && echo /dev/shm || echo /tmp )" picloud-bench-work.XXXXXX)}"
mkdir -p "$work" "$PICLOUD_DIR/bin"
"$bin" install-pbs-commands "$PICLOUD_DIR/bin" >/dev/null
export PATH="$PICLOUD_DIR/bin:$PATH"
PICLOUD_LOG=warn "$bin" up --keep-finished 1h 2>"$PICLOUD_DIR/up.log" &
up=$!
trap 'kill -TERM $up 2>/dev/null; wait $up 2>/dev/null; rm -rf "$PICLOUD_DIR" "$work"' EXIT
until "$bin" nodes 2>/dev/null | grep -q " up "; do sleep 0.05; done
cd "$work"

now() { date +%s.%N; }
rate() { awk -v n="$1" -v a="$2" -v b="$3" 'BEGIN { printf "%.0f", n / (b - a) }'; }

t0=$(now); seq "$N" | xargs -P "$cores" -n1 true; t1=$(now)
floor=$(rate "$N" "$t0" "$t1")

t0=$(now)
id=$(qsub -J "1-$N" -- true)
"$bin" wait "$id" >/dev/null
t1=$(now)
array=$(rate "$N" "$t0" "$t1")

t0=$(now)
for _ in $(seq "$M"); do qsub -- true; done >ids
"$bin" wait $(cat ids) >/dev/null
t1=$(now)
separate=$(rate "$M" "$t0" "$t1")

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.0f%%", 100 * a / b }'; }
echo "work directory: $work ($(df -T "$work" | awk 'NR==2 { print $2 }'))"
printf '%-42s %10s %8s\n' "measure ($cores cores)" "jobs/s" "of floor"
printf '%-42s %10s %8s\n' "fork+exec floor (xargs -P$cores, $N x true)" "$floor" "100%"
printf '%-42s %10s %8s\n' "picloud array of $N true (qsub -J)" "$array" "$(ratio "$array" "$floor")"
printf '%-42s %10s %8s\n' "picloud $M separate qsub calls" "$separate" "$(ratio "$separate" "$floor")"
