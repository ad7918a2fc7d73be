#!/usr/bin/env bash
# Before/after of two llamaflow binaries on the replay workloads, interleaved so that load from
# elsewhere on the machine hits both alike (BENCHMARKS.md, "Interned keys").
#
# Usage: benches/compare_builds.sh OLD_BIN NEW_BIN [ROUNDS] [DATA_DIR]
#   OLD_BIN / NEW_BIN  llamaflow binaries (copy one aside before rebuilding, e.g.
#                      cp "$CARGO_TARGET_DIR/release/llamaflow" /tmp/llamaflow-old)
#   ROUNDS             rounds of prices/mixed × 1/2 workers × old/new (default 5)
#   DATA_DIR           the inputs of benches/replay.sh (generated there on first use)
#
# Each run is `llamaflow replay … --quiet` under /usr/bin/time. Checks that old and new write the
# same alerts, and 1 and 2 workers too, then prints per configuration the median and best wall
# time, the median CPU time (user + sys) and the peak RSS.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n 2,12p "$0" >&2; exit 2; }
old="$1" new="$2" rounds="${3:-5}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/llamaflow-target}"
data="${4:-$CARGO_TARGET_DIR/bench-data}"
[ -x /usr/bin/time ] || { apt-get update -qq && apt-get install -y -qq time >/dev/null; }
for w in prices mixed; do
  [ -f "$data/$w/rules.jsonl" ] || { echo "no inputs in $data/$w: run benches/replay.sh first" >&2; exit 1; }
done
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
for ((i = 1; i <= rounds; i++)); do
  for w in prices mixed; do
    args=()
    for f in prices tvl transfers gas liquidations; do
      [ -f "$data/$w/$f.jsonl" ] && args+=("--$f" "$data/$w/$f.jsonl")
    done
    for n in 1 2; do
      for b in old new; do
        bin="$old"
        [ "$b" = new ] && bin="$new"
        /usr/bin/time -f "%e %U %S %M" -o "$out/time" "$bin" replay "${args[@]}" --rules "$data/$w/rules.jsonl" \
          --alerts-out "$out/$w-$n-$b.jsonl" --dead-letter-out "$out/$w-$n-$b.dead.jsonl" --workers "$n" --quiet \
          >"$out/log" 2>&1 || { echo "$b $w $n workers failed:" >&2; tail "$out/log" >&2; exit 1; }
        read -r wall user sys rss <"$out/time"
        echo "$w $n $b $wall $user $sys $rss" >>"$out/results"
      done
    done
    cmp -s <(sort "$out/$w-1-old.jsonl") <(sort "$out/$w-1-new.jsonl") || { echo "$w: alerts DIFFER old/new"; status=1; }
    cmp -s <(sort "$out/$w-1-new.jsonl") <(sort "$out/$w-2-new.jsonl") || { echo "$w: alerts DIFFER 1/2 workers"; status=1; }
  done
  echo "round $i of $rounds done" >&2
done
python3 - "$out/results" <<'PY'
import collections, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    w, n, b, wall, user, sys_, rss = line.split()
    runs[(w, n, b)].append((float(wall), float(user) + float(sys_), int(rss)))
print(f"{'workload':8} {'workers':>7} {'build':5} {'wall med':>9} {'wall best':>9} {'CPU s med':>9} {'peak RSS':>9}")
for (w, n, b), v in sorted(runs.items()):
    print(f"{w:8} {n:>7} {b:5} {statistics.median(x[0] for x in v):9.3f} {min(x[0] for x in v):9.3f} "
          f"{statistics.median(x[1] for x in v):9.2f} {max(x[2] for x in v) // 1024:>5} MiB")
PY
exit $status
