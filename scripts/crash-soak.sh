#!/usr/bin/env bash
# Long crash soak: the crash harness (tests/crash.rs) with many more seeded SIGKILLs than CI
# runs. Usage: scripts/crash-soak.sh [SEEDS] [FIRST_SEED]  (default 500 from seed 1; about
# 1.5 s per seed on an idle machine). The first failing seed stops the run and prints how
# to replay it.
set -euo pipefail
cd "$(dirname "$0")/.."
seeds="${1:-500}"
first="${2:-1}"
BUCKETGATE_CRASH_SEEDS="$seeds" BUCKETGATE_CRASH_FIRST_SEED="$first" cargo test --release \
    --test crash acknowledged_data_survives_sigkill_on_the_directory_bucket -- --nocapture
