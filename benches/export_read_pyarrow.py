#!/usr/bin/env python3
"""Reads a DynamoDB export's data files with Python, for comparison with llamaflow's
export reader (sources/examples/export_rss.rs).

    ~/.cache/llamaflow-venv/bin/python benches/export_read_pyarrow.py DIR [--engine pyarrow|json]

DIR is the export's prefix directory (holding AWSDynamoDB/). Every
AWSDynamoDB/*/data/*.json.gz file is read:

* pyarrow (default): pyarrow.json.read_json over a gzip input stream, one table per file
  (multi-threaded parsing into Arrow columns; no item decoding, no sorting);
* json: gzip + json.loads per line (single-threaded; no item decoding, no sorting).

Prints lines, MB/s (uncompressed and compressed), lines/s, CPU seconds and peak RSS. Uncompressed sizes
come from the gzip trailers (ISIZE; every file is < 4 GiB).
"""

import argparse
import glob
import gzip
import json
import os
import resource
import struct
import sys
import time


def isize(path):
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        return struct.unpack("<I", f.read(4))[0]


def read_pyarrow(files):
    import pyarrow as pa
    import pyarrow.json as pj

    rows = 0
    for path in files:
        with pa.input_stream(path, compression="gzip") as stream:
            table = pj.read_json(stream, read_options=pj.ReadOptions(block_size=16 << 20))
        rows += table.num_rows
        del table
    return rows


def read_json(files):
    rows = 0
    loads = json.loads
    for path in files:
        with gzip.open(path, "rb") as f:
            for line in f:
                if line.strip():
                    loads(line)
                    rows += 1
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--engine", choices=["pyarrow", "json"], default="pyarrow")
    args = ap.parse_args()
    files = sorted(glob.glob(os.path.join(args.dir, "AWSDynamoDB", "*", "data", "*.json.gz")))
    if not files:
        sys.exit(f"{args.dir}: no AWSDynamoDB/*/data/*.json.gz files")
    gz = sum(os.path.getsize(p) for p in files)
    raw = sum(isize(p) for p in files)
    cpu = lambda: sum(getattr(resource.getrusage(resource.RUSAGE_SELF), f) for f in ("ru_utime", "ru_stime"))
    t0, cpu0 = time.perf_counter(), cpu()
    rows = read_pyarrow(files) if args.engine == "pyarrow" else read_json(files)
    secs = time.perf_counter() - t0
    cpu_secs = cpu() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"export: {args.dir} ({len(files)} data files, {raw / 1e6:.1f} MB uncompressed JSON, {gz / 1e6:.1f} MB gzip)")
    print(f"engine: {args.engine}; read {rows} lines in {secs:.2f} s")
    print(f"throughput: {raw / 1e6 / secs:.1f} MB/s uncompressed, {gz / 1e6 / secs:.1f} MB/s compressed, {rows / secs:.0f} lines/s")
    print(f"cpu: {cpu_secs:.2f} s ({raw / 1e6 / max(cpu_secs, 0.01):.1f} MB uncompressed per CPU second)")
    print(f"peak RSS: {peak:.1f} MiB")


if __name__ == "__main__":
    main()
