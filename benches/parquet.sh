#!/usr/bin/env bash
# Parquet writing: `llamaflow export --kinds prices` vs pyarrow on the same 1M price ticks
# (fixed-seed `llamaflow-bench --workload prices`). Usage: benches/parquet.sh [DATA_DIR] [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/llamaflow-target}"
data="${1:-$CARGO_TARGET_DIR/bench-data}"
runs="${2:-3}"
venv="${LLAMAFLOW_VENV:-$HOME/.cache/llamaflow-venv}"
cargo build --release -q -p pipeline --bins
bin="$CARGO_TARGET_DIR/release"
[ -f "$data/prices/prices.jsonl" ] || "$bin/llamaflow-bench" --workload prices --out "$data/prices"
src="$data/prices/prices.jsonl"
mb_in=$(python3 -c "import os,sys; print(os.path.getsize(sys.argv[1]) / 1e6)" "$src")
for i in $(seq "$runs"); do
  rm -rf "$data/parquet-llamaflow"
  line=$("$bin/llamaflow" export --parquet "$data/parquet-llamaflow" --prices "$src" --kinds prices --quiet 2>&1 | grep '^export:')
  secs=$(sed -E 's/.* written in ([0-9.]+) s.*/\1/' <<<"$line")
  echo "llamaflow run $i: $line"
  python3 -c "import sys; s=float(sys.argv[2]); print(f'llamaflow run $i: {float(sys.argv[1]) / s:.1f} MB/s of JSONL in ({s:.2f} s)')" "$mb_in" "$secs"
  "$venv/bin/python" benches/parquet_write_pyarrow.py "$src" "$data/parquet-pyarrow" | sed "s/^/pyarrow   run $i: /"
done
"$venv/bin/python" - "$data/parquet-llamaflow/prices" "$data/parquet-pyarrow" <<'PY'
import sys, pyarrow.dataset as ds
a = ds.dataset(sys.argv[1], format="parquet", partitioning="hive").to_table()
b = ds.dataset(sys.argv[2], format="parquet", partitioning="hive").to_table()
assert a.num_rows == b.num_rows, (a.num_rows, b.num_rows)
key = [("coin", "ascending"), ("timestamp", "ascending")]
cols = ["coin", "price", "timestamp", "symbol", "confidence"]
a, b = a.select(cols).sort_by(key), b.select(cols).sort_by(key)
assert all(a[c].equals(b[c]) for c in cols), "the two datasets differ"
print(f"both datasets hold the same {a.num_rows} rows")
PY
