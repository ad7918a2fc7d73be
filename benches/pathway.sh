#!/usr/bin/env bash
# Replay throughput and peak memory, llamaflow vs Pathway, on the same fixed-seed workloads
# (BENCHMARKS.md "Replay vs Pathway").
#
# Usage: benches/pathway.sh [prices|mixed|all] [DATA_DIR]
#   env RUNS=N             runs of each configuration, best (fastest) kept (default 2)
#   env PATHWAY_VARIANT    fused (default), udf or asof (benches/pathway/alerts.py --variant)
#   env PATHWAY_VENV       Pathway's venv (default ~/.cache/llamaflow-pathway-venv; made on first use)
#
# Builds the binaries and generates the inputs like benches/replay.sh (same data dir), then per
# workload runs `llamaflow replay` with 1 and 2 workers and benches/pathway/alerts.py with
# PATHWAY_THREADS=1 and 2, each under /usr/bin/time -v (wall clock of the whole process, peak
# RSS), checks that Pathway's alerts equal llamaflow's (benches/pathway/compare.py) and prints
# records/s, wall, peak RSS and the llamaflow/Pathway ratios. Records = lines of every input file
# read (rules included), the same count for both.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/llamaflow-target}"
which="${1:-all}"
data="${2:-$CARGO_TARGET_DIR/bench-data}"
runs="${RUNS:-2}"
variant="${PATHWAY_VARIANT:-fused}"
venv="${PATHWAY_VENV:-$HOME/.cache/llamaflow-pathway-venv}"
pathway_version="0.33.0"
case "$which" in
  prices | mixed) workloads=("$which") ;;
  all) workloads=(prices mixed) ;;
  *) echo "usage: benches/pathway.sh [prices|mixed|all] [DATA_DIR]" >&2; exit 2 ;;
esac

[ -x /usr/bin/time ] || { apt-get update -qq && apt-get install -y -qq time >/dev/null; }
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import pathway' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "pathway==$pathway_version"
fi
py="$venv/bin/python"

cargo build --release -q -p pipeline --bins
out="$data/pathway-bench"
mkdir -p "$out/bin"
# A private copy: the shared target dir's binaries may be rebuilt from another tree meanwhile.
cp "$CARGO_TARGET_DIR/release/llamaflow" "$CARGO_TARGET_DIR/release/llamaflow-bench" "$out/bin/"
bin="$out/bin"
for w in "${workloads[@]}"; do
  [ -f "$data/$w/rules.jsonl" ] || "$bin/llamaflow-bench" --workload "$w" --out "$data/$w"
done

results="$out/results.tsv"
: >"$results"

# measure NAME CMD... → appends "NAME wall_s rss_kib" of the fastest of $runs runs.
measure() {
  local name="$1" best_wall="" best_rss="" i wall rss
  shift
  for ((i = 1; i <= runs; i++)); do
    /usr/bin/time -v -o "$out/$name.time" "$@" >"$out/$name.log" 2>&1 || {
      echo "$name failed:" >&2; tail -20 "$out/$name.log" >&2; exit 1
    }
    wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {n = split($2, p, ":"); s = 0; for (j = 1; j <= n; j++) s = s * 60 + p[j]; print s}' "$out/$name.time")
    rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$out/$name.time")
    echo "  $name run $i: ${wall} s, $((rss / 1024)) MiB" >&2
    if [ -z "$best_wall" ] || awk -v a="$wall" -v b="$best_wall" 'BEGIN {exit !(a < b)}'; then
      best_wall="$wall"
      best_rss="$rss"
    fi
  done
  echo "$name $best_wall $best_rss" >>"$results"
}

status=0
for w in "${workloads[@]}"; do
  dir="$data/$w"
  args=()
  files=(rules)
  for f in prices tvl transfers gas liquidations; do
    [ -f "$dir/$f.jsonl" ] && { args+=("--$f" "$dir/$f.jsonl"); files+=("$f"); }
  done
  records=0
  for f in "${files[@]}"; do records=$((records + $(wc -l <"$dir/$f.jsonl"))); done
  echo "$w: $records records" >&2
  for n in 1 2; do
    measure "$w-llamaflow-w$n" "$bin/llamaflow" replay "${args[@]}" --rules "$dir/rules.jsonl" \
      --alerts-out "$out/$w-llamaflow-w$n.jsonl" --dead-letter-out "$out/$w-llamaflow-w$n.dead.jsonl" \
      --workers "$n" --quiet
  done
  for n in 1 2; do
    measure "$w-pathway-t$n" env PATHWAY_THREADS="$n" "$py" benches/pathway/alerts.py --data "$dir" \
      --out "$out/$w-pathway-t$n.jsonl" --variant "$variant"
  done
  echo "$w records $records" >>"$results"
  dead=$(cat "$out/$w-llamaflow-w1.dead.jsonl" | wc -l)
  [ "$dead" = 0 ] || echo "$w: llamaflow dead-lettered $dead records (the Pathway script does not model lateness)" >&2
  cmp -s <(sort "$out/$w-llamaflow-w1.jsonl") <(sort "$out/$w-llamaflow-w2.jsonl") ||
    { echo "$w: llamaflow alerts DIFFER between 1 and 2 workers"; status=1; }
  for n in 1 2; do
    echo -n "$w, PATHWAY_THREADS=$n: "
    "$py" benches/pathway/compare.py "$out/$w-llamaflow-w1.jsonl" "$out/$w-pathway-t$n.jsonl" || status=1
  done
done

"$py" - "$results" "$runs" "$variant" <<'EOF'
import sys
import pathway
rows, recs = {}, {}
for line in open(sys.argv[1]):
    a = line.split()
    if a[1] == "records":
        recs[a[0]] = int(a[2])
    else:
        rows[a[0]] = (float(a[1]), int(a[2]))
print(f"\nReplay vs Pathway {pathway.__version__} (variant {sys.argv[3]}), best of {sys.argv[2]} runs; "
      "records/s = input lines / process wall time")
print("| workload | threads | llamaflow records/s | Pathway records/s | throughput × | "
      "llamaflow peak RSS | Pathway peak RSS | memory ÷ |")
print("|---|---|---|---|---|---|---|---|")
for w, n in recs.items():
    for t in (1, 2):
        lw, lr = rows[f"{w}-llamaflow-w{t}"]
        pw_, pr = rows[f"{w}-pathway-t{t}"]
        print(f"| {w} | {t} | {n / lw:,.0f} ({lw:.2f} s) | {n / pw_:,.0f} ({pw_:.2f} s) | {pw_ / lw:.1f}× | "
              f"{lr / 1024:.0f} MiB | {pr / 1024:.0f} MiB | {pr / lr:.1f}× |")
print("Target: throughput × ≥ 20 and memory ÷ ≥ 10.")
EOF
exit $status
