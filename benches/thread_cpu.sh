#!/usr/bin/env bash
# CPU time per thread role of `llamaflow replay`, for several builds side by side, interleaved
# (BENCHMARKS.md "Replay: the main thread and the workers' input, session 14"). Wall time on a
# shared 2-core machine varies ±30 % within minutes; CPU per thread shows where a change went.
#
# Usage: benches/thread_cpu.sh ROUNDS prices|mixed BIN...
#   Runs each BIN with 1 and 2 workers ROUNDS times under `perf record -e cpu-clock -F 4000`
#   and prints, per workers × role × build, the median CPU-s: main (merge, sequencer),
#   parse (the parse threads together), read (the files' line splitters), output (the thread
#   writing the files), workers (the timely workers together) and total. Inputs:
#   benches/replay.sh's data dir.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 3 ] || { sed -n 2,10p "$0" >&2; exit 2; }
rounds="$1" workload="$2"
shift 2
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/llamaflow-target}"
data="$CARGO_TARGET_DIR/bench-data/$workload"
[ -f "$data/rules.jsonl" ] || { echo "no inputs in $data: run benches/replay.sh first" >&2; exit 1; }
command -v perf >/dev/null || { echo "perf is needed (apt-get install linux-perf)" >&2; exit 1; }
args=()
for f in prices tvl transfers gas liquidations; do
  [ -f "$data/$f.jsonl" ] && args+=("--$f" "$data/$f.jsonl")
done
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for ((r = 1; r <= rounds; r++)); do
  for w in 1 2; do
    for bin in "$@"; do
      perf record -q -F 4000 -e cpu-clock -o "$out/perf.data" -- "$bin" replay "${args[@]}" --rules "$data/rules.jsonl" \
        --alerts-out "$out/alerts.jsonl" --dead-letter-out "$out/dead.jsonl" --workers "$w" --quiet >/dev/null 2>&1
      # The main thread is named after the binary; timely's workers `timely:work-N`.
      perf script -i "$out/perf.data" -F comm 2>/dev/null | awk -v b="$(basename "$bin")" -v w="$w" '
        { n = $1; if (n == "parse" || n == "read" || n == "output") {} else if (n ~ /^timely/) n = "workers"; else n = "main"; c[n]++; t++ }
        END { for (k in c) printf "%s %s %s %.3f\n", w, k, b, c[k] / 4000; printf "%s total %s %.3f\n", w, b, t / 4000 }' >>"$out/results"
    done
  done
  echo "round $r of $rounds done" >&2
done
python3 - "$out/results" <<'PY'
import collections, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    w, role, build, cpu = line.split()
    runs[(w, role, build)].append(float(cpu))
print(f"{'workers':>7} {'role':8} {'build':24} {'CPU s median':>12} {'min':>6} {'max':>6}")
for (w, role, build), v in sorted(runs.items()):
    print(f"{w:>7} {role:8} {build:24} {statistics.median(v):12.3f} {min(v):6.3f} {max(v):6.3f}")
PY
