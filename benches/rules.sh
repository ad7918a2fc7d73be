#!/usr/bin/env bash
# Rules at scale: 1,000,000 alert rules in Postgres read through CDC; time from a rule change's
# COMMIT to its effect at a WebSocket client (p50/p99/max), snapshot load time and peak RSS,
# for CDC poll intervals 100 and 10 ms. Extra arguments go to the bench (e.g. --changes 50
# --poll-ms 100,10,1 --checkpoint-ms 0); see pipeline/examples/rules_bench.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/llamaflow-target}"
cargo build --release -q -p pipeline --bin llamaflow --example rules_bench
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
"$CARGO_TARGET_DIR/release/examples/rules_bench" "$@"
