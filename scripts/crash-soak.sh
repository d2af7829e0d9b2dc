#!/usr/bin/env bash
# Long crash soak: the crash harness (tests/crash.rs) with many more seeded SIGKILLs than CI
# runs. Usage: scripts/crash-soak.sh [SEEDS]  (default 500; about 1.5 s per seed).
set -euo pipefail
cd "$(dirname "$0")/.."
seeds="${1:-500}"
BUCKETGATE_CRASH_SEEDS="$seeds" cargo test --release --test crash \
    acknowledged_data_survives_sigkill_on_the_directory_bucket -- --nocapture
