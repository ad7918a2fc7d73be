"""Compares two alert JSONL files (llamaflow replay vs benches/pathway/alerts.py).

    python3 benches/pathway/compare.py LLAMAFLOW.jsonl PATHWAY.jsonl

Alerts are matched by `alert_id` (SHA-256 of rule id, subject, trigger time in ms and the
triggering record's identity, schemas/src/output.rs) and then every SPEC §2 alert field is
compared: strings and lists exactly, `triggered_at` as milliseconds, `value` and `threshold` as
floats (exactly; values within 1e-12 relative are reported apart as float noise). Pathway's own
`time`/`diff` columns are ignored. Exit 0 when the alerts are the same, 1 otherwise.
"""

import json
import sys

FIELDS = (
    "rule_id",
    "user_id",
    "alert_type",
    "subject",
    "triggered_at",
    "value",
    "threshold",
    "message",
    "channels",
    "webhook_url",
)


def load(path):
    out = {}
    dup = 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            a = json.loads(line)
            if a.get("diff", 1) != 1:
                raise SystemExit(f"{path}: retraction in output: {line.strip()}")
            a["triggered_at"] = round(float(a["triggered_at"]) * 1000)
            if a["alert_id"] in out:
                dup += 1
            out[a["alert_id"]] = {k: a.get(k) for k in FIELDS}
    return out, dup


def main():
    left_path, right_path = sys.argv[1], sys.argv[2]
    left, ldup = load(left_path)
    right, rdup = load(right_path)
    only_l = sorted(set(left) - set(right), key=lambda k: (left[k]["rule_id"], left[k]["triggered_at"]))
    only_r = sorted(set(right) - set(left), key=lambda k: (right[k]["rule_id"], right[k]["triggered_at"]))
    diff = {}
    noise = 0
    for k in set(left) & set(right):
        a, b = left[k], right[k]
        for f in FIELDS:
            x, y = a[f], b[f]
            if f in ("value", "threshold"):
                x, y = float(x), float(y)
                if x == y:
                    continue
                if abs(x - y) <= 1e-12 * max(abs(x), abs(y)):
                    noise += 1
                    continue
            if x != y:
                diff.setdefault(f, []).append((k, x, y))
    same = not (only_l or only_r or diff or ldup or rdup or noise)
    print(
        f"compare: {len(left)} vs {len(right)} alerts; only in {left_path}: {len(only_l)}; "
        f"only in {right_path}: {len(only_r)}; field differences: "
        + (", ".join(f"{f} {len(v)}" for f, v in sorted(diff.items())) or "none")
        + f"; float-noise values: {noise}; duplicate ids: {ldup}/{rdup} → {'SAME' if same else 'DIFFERENT'}"
    )
    for name, ks, src in (("only left", only_l, left), ("only right", only_r, right)):
        for k in ks[:5]:
            print(f"  {name}: {k} {json.dumps(src[k])}")
    for f, v in sorted(diff.items()):
        for k, x, y in v[:5]:
            print(f"  {f} differs for {k}: {x!r} vs {y!r}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
