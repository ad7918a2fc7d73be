"""Independent reader of a llamaflow Parquet dataset (SPEC §7): pyarrow and DuckDB.

    python parquet_check.py DATASET_DIR EXPECT_JSON

EXPECT_JSON (written by pipeline/tests/parquet.rs):
    {"tables": {"prices": {"rows": 53,
                           "types": {"timestamp": "timestamp[ms, tz=UTC]", ...},
                           "duckdb_types": {"timestamp": "TIMESTAMP WITH TIME ZONE", ...},
                           "values": [{"where": {"coin": "x", "timestamp": 1717426800000},
                                       "expect": {"price": 3791.12}}]}, ...},
     "alerts_jsonl": "alerts.jsonl",      # optional: every alert must match, field by field
     "events_jsonl": "events.jsonl"}      # optional: the same multiset of events

Timestamps in "where"/"expect" are unix milliseconds. Doubles are compared exactly.
Prints one line `parquet_check: ok ...` and exits 0, or names the first mismatch and exits 1.
"""

import datetime as dt
import json
import os
import sys

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

TIME_COLUMN = {"prices": "timestamp", "tvl": "timestamp", "events": "timestamp", "alerts": "triggered_at"}


def fail(msg):
    print(f"parquet_check: FAIL: {msg}")
    sys.exit(1)


def part_files(root, table):
    out = []
    for d, _, files in os.walk(os.path.join(root, table)):
        for f in files:
            if f.startswith("."):
                fail(f"hidden leftover {os.path.join(d, f)} (a temporary or spool file was not finished)")
            if not (f.startswith("part-") and f.endswith(".parquet")):
                fail(f"unexpected file {os.path.join(d, f)}")
            out.append(os.path.join(d, f))
    return sorted(out)


def ms(v):
    """A timestamp value (datetime or int) as unix ms."""
    if isinstance(v, dt.datetime):
        if v.tzinfo is None:
            v = v.replace(tzinfo=dt.timezone.utc)
        return round(v.timestamp() * 1000)
    return v


def norm(v):
    if isinstance(v, dt.datetime):
        return ms(v)
    if isinstance(v, list) and v and isinstance(v[0], tuple):  # a MAP read by pyarrow
        return {k: x for k, x in v}
    return v


def check_files(root, table, files):
    col = TIME_COLUMN[table]
    for f in files:
        pf = pq.ParquetFile(f)
        md = pf.metadata
        for g in range(md.num_row_groups):
            for c in range(md.num_columns):
                codec = md.row_group(g).column(c).compression
                if codec != "ZSTD":
                    fail(f"{f}: row group {g} column {c} is {codec}, not ZSTD")
        date = os.path.basename(os.path.dirname(f))
        if not date.startswith("date="):
            fail(f"{f}: not under a date=YYYY-MM-DD directory")
        days = set(pc.strftime(pf.read(columns=[col]).column(col), format="%Y-%m-%d").to_pylist())
        if days != {date[5:]}:
            fail(f"{f}: {col} dates {sorted(days)} do not match {date}")


def check_pyarrow(root, table, spec):
    files = part_files(root, table)
    check_files(root, table, files)
    t = ds.dataset(os.path.join(root, table), format="parquet", partitioning="hive").to_table()
    if t.num_rows != spec["rows"]:
        fail(f"pyarrow: {table}: {t.num_rows} rows, expected {spec['rows']}")
    for name, want in spec.get("types", {}).items():
        typ = t.schema.field(name).type
        # A map's entry field names are printed when not pyarrow's defaults; compare the types.
        got = f"map<{typ.key_type}, {typ.item_type}>" if pa.types.is_map(typ) else str(typ)
        if got != want:
            fail(f"pyarrow: {table}.{name} is {got}, expected {want}")
    rows = t.to_pylist()
    for v in spec.get("values", []):
        hits = [r for r in rows if all(norm(r[k]) == w for k, w in v["where"].items())]
        if len(hits) != v.get("count", 1):
            fail(f"pyarrow: {table}: {len(hits)} rows where {v['where']}, expected {v.get('count', 1)}")
        for k, w in v.get("expect", {}).items():
            got = norm(hits[0][k])
            if got != w:
                fail(f"pyarrow: {table}: where {v['where']}: {k} = {got!r}, expected {w!r}")
    return rows, len(files)


def check_duckdb(con, root, table, spec):
    src = f"read_parquet('{root}/{table}/*/*.parquet', hive_partitioning = true)"
    n = con.execute(f"SELECT count(*) FROM {src}").fetchone()[0]
    if n != spec["rows"]:
        fail(f"duckdb: {table}: {n} rows, expected {spec['rows']}")
    types = {r[0]: r[1] for r in con.execute(f"DESCRIBE SELECT * FROM {src}").fetchall()}
    for name, want in spec.get("duckdb_types", {}).items():
        if types.get(name) != want:
            fail(f"duckdb: {table}.{name} is {types.get(name)}, expected {want}")
    time_cols = {c for c, t in types.items() if t.startswith("TIMESTAMP")}
    for v in spec.get("values", []):
        conds, params = [], []
        for k, w in v["where"].items():
            conds.append(f"epoch_ms({k}) = ?" if k in time_cols else f"{k} = ?")
            params.append(w)
        cols = list(v.get("expect", {}))
        sel = ", ".join(f"epoch_ms({c})" if c in time_cols else c for c in cols) or "1"
        got = con.execute(f"SELECT {sel} FROM {src} WHERE {' AND '.join(conds)}", params).fetchall()
        if len(got) != v.get("count", 1):
            fail(f"duckdb: {table}: {len(got)} rows where {v['where']}, expected {v.get('count', 1)}")
        for c, g in zip(cols, got[0] if got else []):
            w = v["expect"][c]
            if isinstance(g, dict):
                g = dict(zip(g["key"], g["value"])) if set(g) == {"key", "value"} else g
            if g != w:
                fail(f"duckdb: {table}: where {v['where']}: {c} = {g!r}, expected {w!r}")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def check_alerts(rows, path):
    want = sorted(read_jsonl(path), key=lambda a: a["alert_id"])
    got = sorted(rows, key=lambda a: a["alert_id"])
    if len(got) != len(want):
        fail(f"alerts: {len(got)} rows, the JSONL has {len(want)}")
    for g, w in zip(got, want):
        for k, wv in w.items():
            gv = norm(g[k])
            if k == "triggered_at":
                wv = round(wv * 1000)
            if gv != wv:
                fail(f"alerts: {w['alert_id']}: {k} = {gv!r}, the JSONL has {wv!r}")


def check_events(rows, path):
    def key(e):
        return (e["type"], e["subject"], e["timestamp"], json.dumps(e["data"], sort_keys=True))

    want = sorted(key({**e, "timestamp": round(e["timestamp"] * 1000)}) for e in read_jsonl(path))
    got = sorted(key({**r, "timestamp": ms(r["timestamp"]), "data": json.loads(r["data"])}) for r in rows)
    if got != want:
        diff = [g for g in got if g not in want][:2] or [w for w in want if w not in got][:2]
        fail(f"events: {len(got)} rows vs {len(want)} in the JSONL; first differences: {diff}")
    for r in rows:
        data = json.loads(r["data"])
        if r["type"] == "tvl_update" and norm(r["chain_tvls"]) != data["chainTvls"]:
            fail(f"events: chain_tvls {r['chain_tvls']} != data.chainTvls {data['chainTvls']}")


def main():
    root, expect_path = sys.argv[1], sys.argv[2]
    with open(expect_path) as f:
        expect = json.load(f)
    con = duckdb.connect()
    seen, files = {}, 0
    for table, spec in expect["tables"].items():
        rows, n = check_pyarrow(root, table, spec)
        files += n
        if spec["rows"] > 0:
            check_duckdb(con, root, table, spec)
        seen[table] = rows
    if "alerts_jsonl" in expect:
        check_alerts(seen["alerts"], expect["alerts_jsonl"])
    if "events_jsonl" in expect:
        check_events(seen["events"], expect["events_jsonl"])
    counts = ", ".join(f"{t} {len(r)}" for t, r in seen.items())
    print(f"parquet_check: ok ({files} files; {counts})")


if __name__ == "__main__":
    main()
