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
# PATHWAY_THREADS=1 and 2 in interleaved rounds, each under /usr/bin/time -v (wall clock of the
# whole process, peak RSS, CPU time), checks that Pathway's alerts equal llamaflow's
# (benches/pathway/compare.py) and prints records/s, wall, peak RSS and the llamaflow : Pathway
# ratios. Records = lines of every input file read (rules included), the same count for both.
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

# once NAME CMD... → one run under /usr/bin/time -v; appends "NAME wall_s rss_kib cpu_s" to $results.
once() {
  local name="$1" wall rss cpu
  shift
  /usr/bin/time -v -o "$out/$name.time" "$@" >"$out/$name.log" 2>&1 || {
    echo "$name failed:" >&2; tail -20 "$out/$name.log" >&2; exit 1
  }
  wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {n = split($2, p, ":"); s = 0; for (j = 1; j <= n; j++) s = s * 60 + p[j]; print s}' "$out/$name.time")
  rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$out/$name.time")
  cpu=$(awk -F': ' '/User time|System time/ {s += $2} END {print s}' "$out/$name.time")
  echo "  $name: ${wall} s wall, ${cpu} s CPU, $((rss / 1024)) MiB" >&2
  echo "$name $wall $rss $cpu" >>"$results"
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
  echo "$w records $records" >>"$results"
  # Rounds interleave the two systems, so load from elsewhere on the machine hits both alike.
  for ((i = 1; i <= runs; i++)); do
    for n in 1 2; do
      once "$w-llamaflow-w$n" "$bin/llamaflow" replay "${args[@]}" --rules "$dir/rules.jsonl" \
        --alerts-out "$out/$w-llamaflow-w$n.jsonl" --dead-letter-out "$out/$w-llamaflow-w$n.dead.jsonl" \
        --workers "$n" --quiet
      once "$w-pathway-t$n" env PATHWAY_THREADS="$n" "$py" benches/pathway/alerts.py --data "$dir" \
        --out "$out/$w-pathway-t$n.jsonl" --variant "$variant"
    done
  done
  dead=$(wc -l <"$out/$w-llamaflow-w1.dead.jsonl")
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
runs, recs = {}, {}
for line in open(sys.argv[1]):
    a = line.split()
    if a[1] == "records":
        recs[a[0]] = int(a[2])
    else:
        runs.setdefault(a[0], []).append((float(a[1]), int(a[2]), float(a[3])))
best = {k: min(v) for k, v in runs.items()}  # the fastest run: (wall, its peak RSS, its CPU)
print(f"\nReplay vs Pathway {pathway.__version__} (variant {sys.argv[3]}), best of {sys.argv[2]} runs; "
      "records/s = input lines / process wall time; ratios llamaflow : Pathway")
print("| workload | threads | llamaflow records/s | Pathway records/s | throughput | "
      "llamaflow peak RSS | Pathway peak RSS | memory | CPU s llamaflow / Pathway |")
print("|---|---|---|---|---|---|---|---|---|")
for w, n in recs.items():
    for t in (1, 2):
        lw, lr, lc = best[f"{w}-llamaflow-w{t}"]
        pw_, pr, pc = best[f"{w}-pathway-t{t}"]
        print(f"| {w} | {t} | {n / lw:,.0f} ({lw:.2f} s) | {n / pw_:,.0f} ({pw_:.2f} s) | {pw_ / lw:.1f}× | "
              f"{lr / 1024:.0f} MiB | {pr / 1024:.0f} MiB | 1/{pr / lr:.1f} | {lc:.2f} / {pc:.2f} |")
print("Target: throughput ≥ 20× Pathway's and peak memory ≤ 1/10 of Pathway's.")
print("All runs (wall s):")
for k, v in runs.items():
    print(f"  {k}: " + ", ".join(f"{x[0]:.2f}" for x in v))
EOF
exit $status
