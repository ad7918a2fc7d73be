"""pyarrow baseline for BENCHMARKS.md "Parquet writing": the rows `llamaflow export --kinds prices`
writes, from the same JSONL, with the same layout and codec (hive `date=` partitions, zstd level 1,
row groups of up to 1Mi rows, timestamp[ms, UTC]).

    python benches/parquet_write_pyarrow.py PRICES_JSONL OUT_DIR

Prints one line: rows, input MB, output MB, seconds, MB/s (input JSONL bytes per second) and
rows/s. The time covers reading and parsing the JSONL, conversion and writing, like llamaflow's.
"""

import os
import shutil
import sys
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.json as pj


def main():
    src, out = sys.argv[1], sys.argv[2]
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    schema = pa.schema(
        [
            ("coin", pa.string()),
            ("price", pa.float64()),
            ("timestamp", pa.float64()),
            ("symbol", pa.string()),
            ("confidence", pa.float64()),
            ("decimals", pa.int32()),
        ]
    )
    table = pj.read_json(
        src,
        parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"),
    )
    ms = pc.round(pc.multiply(table["timestamp"], 1000.0)).cast(pa.int64()).cast(pa.timestamp("ms", tz="UTC"))
    table = table.set_column(2, pa.field("timestamp", pa.timestamp("ms", tz="UTC"), nullable=False), ms)
    table = table.append_column("date", pc.strftime(ms, format="%Y-%m-%d"))
    ds.write_dataset(
        table,
        out,
        format="parquet",
        partitioning=["date"],
        partitioning_flavor="hive",
        file_options=ds.ParquetFileFormat().make_write_options(compression="zstd", compression_level=1),
        max_rows_per_group=1 << 20,
        max_rows_per_file=0,
        existing_data_behavior="overwrite_or_ignore",
    )
    secs = time.perf_counter() - started
    size_in = os.path.getsize(src) / 1e6
    size_out = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs) / 1e6
    print(
        f"pyarrow {pa.__version__}: {table.num_rows} rows, {size_in:.1f} MB JSONL in, {size_out:.2f} MB Parquet out, "
        f"{secs:.2f} s, {size_in / secs:.1f} MB/s, {table.num_rows / secs:.0f} rows/s"
    )


if __name__ == "__main__":
    main()
