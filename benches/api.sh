#!/usr/bin/env bash
# Read API bench (SPEC §8): latency p50/p99 at 1,000 and 20,000 requests/s while the job ingests
# 50,000 ticks/s through Kafka (librdkafka's mock cluster), freshness (a TVL record → visible in
# the API), memory of 10,000 protocols × 100 chains, and the same /v2/chains answered by
# PostgreSQL from protocol_tvl. Extra arguments go to the bench; see pipeline/examples/api_bench.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/llamaflow-target}"
cargo build --release -q -p pipeline --bin llamaflow --example api_bench
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
"$CARGO_TARGET_DIR/release/examples/api_bench" "$@"
