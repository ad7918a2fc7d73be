#!/usr/bin/env bash
# Fanout: WebSocket clients of real `llamaflow run` processes on loopback — delivered frames/s,
# delivery delay (produce → receive), 1013 drops, connect time, server RSS. Target: ≥ 500,000
# frames/s delivered to 50,000 clients. Design and the file-descriptor limit: the doc comment of
# pipeline/examples/fanout_bench.rs. Takes about 2 minutes.
# Usage: benches/fanout.sh [--configs 1x1000,1x19000,3x50000] [--rate 10] [--batch 1]
#                          [--window-secs 20] [--json FILE]   (fanout_bench --help for all)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/llamaflow-target}"
cargo build --release -q -p pipeline --bin llamaflow --example fanout_bench
exec "$CARGO_TARGET_DIR/release/examples/fanout_bench" "$@"
