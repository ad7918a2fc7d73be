#!/usr/bin/env bash
# End-to-end latency, Kafka (librdkafka's mock cluster) → dataflow → WebSocket client:
# p50/p90/p99/p99.9/max at 10,000 and 50,000 ticks/s. Extra arguments go to the bench
# (e.g. --batch-ms 10 --workers 2 --secs 30); see pipeline/examples/latency_bench.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/llamaflow-target}"
cargo build --release -q -p pipeline --bin llamaflow --example latency_bench
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
"$CARGO_TARGET_DIR/release/examples/latency_bench" "$@"
