#!/bin/sh
# The long form of the fault-injection suite (tests/tests/faults.rs): a
# 20 000-task array per scenario, the server killed with SIGKILL 10 times at
# pseudo-random moments while its agent keeps running and reconnects, then
# the agent killed and replaced; 5 scenarios. Every task must run exactly
# once unless it ran again after its node was lost (its run_count says so),
# and no job or result may be lost.
#
#   tests/fault_injection.sh            # defaults below
#   PICLOUD_FAULT_SCENARIOS=20 tests/fault_injection.sh
set -eu
cd "$(dirname "$0")/.."
cargo build --bins
export PICLOUD_FAULT_TASKS="${PICLOUD_FAULT_TASKS:-20000}"
export PICLOUD_FAULT_KILLS="${PICLOUD_FAULT_KILLS:-10}"
export PICLOUD_FAULT_SCENARIOS="${PICLOUD_FAULT_SCENARIOS:-5}"
export PICLOUD_FAULT_SEED="${PICLOUD_FAULT_SEED:-$(date +%s)}"
echo "fault injection: $PICLOUD_FAULT_SCENARIOS scenario(s) of $PICLOUD_FAULT_TASKS tasks," \
    "$PICLOUD_FAULT_KILLS server kills each, first seed $PICLOUD_FAULT_SEED"
exec cargo test -p picloud-tests --test faults -- --nocapture
