#!/usr/bin/env bash
# Replay throughput and peak memory on the fixed-seed workloads, 1 and 2 workers.
# Usage: benches/replay.sh [DATA_DIR]   (inputs are generated on first use)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/llamaflow-target}"
data="${1:-$CARGO_TARGET_DIR/bench-data}"
cargo build --release -q -p pipeline --bins
bin="$CARGO_TARGET_DIR/release"
for w in prices mixed; do
  [ -f "$data/$w/rules.jsonl" ] || "$bin/llamaflow-bench" --workload "$w" --out "$data/$w"
done
run() { # workload workers
  local dir="$data/$1" args=()
  for f in prices tvl transfers gas liquidations; do
    [ -f "$dir/$f.jsonl" ] && args+=("--$f" "$dir/$f.jsonl")
  done
  "$bin/llamaflow" replay "${args[@]}" --rules "$dir/rules.jsonl" --alerts-out "$dir/alerts-w$2.jsonl" \
    --dead-letter-out "$dir/dead-w$2.jsonl" --workers "$2" --quiet 2>&1 | grep '^replay:' | sed "s/^/$1 workers=$2 /"
}
for w in prices mixed; do
  for n in 1 2; do run "$w" "$n"; done
  cmp -s <(sort "$data/$w/alerts-w1.jsonl") <(sort "$data/$w/alerts-w2.jsonl") \
    && echo "$w: alerts identical for 1 and 2 workers ($(wc -l < "$data/$w/alerts-w1.jsonl") alerts)" \
    || { echo "$w: alerts DIFFER between 1 and 2 workers"; exit 1; }
done
