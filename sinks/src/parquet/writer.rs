//! Partitioned, atomic Parquet writing: rows are routed by table and event-time bucket to an
//! open part file; closed parts are renamed into place.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};

use arrow_ipc::reader::StreamReader;
use arrow_ipc::writer::StreamWriter;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use schemas::{Alert, Event, Millis, PriceTick, TvlUpdate, utc_date};

use super::table::{Columns, tvl_rows};
use super::{ParquetError, Table};

/// One day in milliseconds: the bucket of `export` (one part per kind and date).
pub const DAY_MS: i64 = 86_400_000;
/// Default most rows per row group.
pub const DEFAULT_ROW_GROUP_ROWS: usize = 1 << 20;
/// A row group is also cut at this many (estimated) bytes.
const MAX_ROW_GROUP_BYTES: usize = 128 << 20;
/// Rows gathered in column builders before they are handed to the Parquet encoder.
const BATCH_ROWS: usize = 8192;
/// A part is closed once its table's newest event time is this far past the part's bucket,
/// so records that arrive slightly out of order still land in the same file.
const CLOSE_GRACE_MS: i64 = 5 * 60_000;
/// Most parts open per table (out-of-order input); beyond it the oldest bucket is closed.
const MAX_OPEN_PER_TABLE: usize = 16;

/// How a [`PartitionedWriter`] lays out and protects its files.
#[derive(Clone, Debug)]
pub struct WriterOptions {
    /// Dataset root (`<root>/<kind>/date=…/`).
    pub root: PathBuf,
    /// Event time covered by one part, in ms; divides [`DAY_MS`].
    pub bucket_ms: i64,
    /// Most rows per row group.
    pub row_group_rows: usize,
    /// Keep an fsynced spool of every row beside each open part (the sink's durability log).
    pub spool: bool,
}

impl WriterOptions {
    /// One part per kind and date, no spool: what `export` uses.
    pub fn export(root: impl Into<PathBuf>) -> Self {
        WriterOptions {
            root: root.into(),
            bucket_ms: DAY_MS,
            row_group_rows: DEFAULT_ROW_GROUP_ROWS,
            spool: false,
        }
    }
}

/// What a writer (or a recovery) wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Rows per table, indexed like [`Table::ALL`].
    pub rows: [u64; 4],
    /// Part files completed (renamed into place).
    pub files: u64,
    /// Bytes of the completed part files.
    pub bytes: u64,
}

impl WriteStats {
    /// Rows written to `table`.
    pub fn rows_of(&self, table: Table) -> u64 {
        self.rows[table.index()]
    }

    /// Rows of every table.
    pub fn total_rows(&self) -> u64 {
        self.rows.iter().sum()
    }

    /// Adds another writer's figures.
    pub fn add(&mut self, other: &WriteStats) {
        for (a, b) in self.rows.iter_mut().zip(other.rows) {
            *a += b;
        }
        self.files += other.files;
        self.bytes += other.bytes;
    }
}

/// The spool of an open part: every row batch as an Arrow IPC stream, fsynced by
/// [`PartitionedWriter::sync`].
struct Spool {
    path: PathBuf,
    w: StreamWriter<BufWriter<File>>,
}

/// One open part file.
struct Part {
    cols: Columns,
    writer: ArrowWriter<File>,
    dir: PathBuf,
    tmp: PathBuf,
    path: PathBuf,
    spool: Option<Spool>,
    /// Rows appended since the last sync.
    dirty: bool,
    /// The spool's directory entry has been fsynced.
    spool_durable: bool,
}

/// Writes rows of the four tables into `<root>/<kind>/date=YYYY-MM-DD/part-*.parquet`, one open
/// part per (table, event-time bucket).
///
/// Parts are closed — footer written, fsynced, renamed from their hidden `.tmp` name — when
/// their table's newest event time passes the bucket's end (plus 5 minutes' grace), when more
/// than 16 buckets of a table are open (the oldest goes), and by [`PartitionedWriter::close_all`].
/// A late row for a bucket already closed opens another part for it.
pub struct PartitionedWriter {
    opts: WriterOptions,
    props: WriterProperties,
    run: i64,
    seq: u64,
    open: BTreeMap<(Table, Millis), Part>,
    newest: [Millis; 4],
    stats: WriteStats,
}

impl std::fmt::Debug for PartitionedWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionedWriter")
            .field("opts", &self.opts)
            .field("open", &self.open.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// The writer properties of every part: zstd, row groups of `rows` rows / 128 MiB.
fn properties(rows: usize) -> Result<WriterProperties, ParquetError> {
    let level = ZstdLevel::try_new(1).map_err(|e| ParquetError::Config(e.to_string()))?;
    Ok(WriterProperties::builder()
        .set_compression(Compression::ZSTD(level))
        .set_max_row_group_row_count(Some(rows.max(1)))
        .set_max_row_group_bytes(Some(MAX_ROW_GROUP_BYTES))
        .set_created_by(format!("llamaflow {}", env!("CARGO_PKG_VERSION")))
        .build())
}

/// fsyncs a directory, so entries created or renamed in it survive a crash.
fn sync_dir(dir: &Path) -> Result<(), ParquetError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| ParquetError::io("sync directory", dir, e))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// `date=YYYY-MM-DD` of a time.
pub(crate) fn date_dir(ms: Millis) -> String {
    let (y, m, d) = utc_date(ms);
    format!("date={y:04}-{m:02}-{d:02}")
}

impl PartitionedWriter {
    /// A writer under `opts.root` (created when missing).
    pub fn new(opts: WriterOptions) -> Result<Self, ParquetError> {
        if opts.bucket_ms <= 0 || DAY_MS % opts.bucket_ms != 0 {
            return Err(ParquetError::Config(format!(
                "a part must cover a divisor of a day, not {} ms",
                opts.bucket_ms
            )));
        }
        fs::create_dir_all(&opts.root).map_err(|e| ParquetError::io("create directory", &opts.root, e))?;
        Ok(PartitionedWriter {
            props: properties(opts.row_group_rows)?,
            opts,
            run: now_ms(),
            seq: 0,
            open: BTreeMap::new(),
            newest: [Millis::MIN; 4],
            stats: WriteStats::default(),
        })
    }

    /// Rows, files and bytes so far (files and bytes count closed parts only).
    pub fn stats(&self) -> &WriteStats {
        &self.stats
    }

    /// Parts currently open.
    pub fn open_parts(&self) -> usize {
        self.open.len()
    }

    /// Appends a price tick to `prices`.
    pub fn price(&mut self, p: &PriceTick) -> Result<(), ParquetError> {
        self.with_part(Table::Prices, p.timestamp, |c| {
            c.push_tick(p);
            Ok(1)
        })
    }

    /// Appends a price row given by its fields (e.g. from a `price_update` event).
    pub fn price_row(
        &mut self,
        coin: &str,
        price: f64,
        ts: Millis,
        symbol: Option<&str>,
        confidence: Option<f64>,
        decimals: Option<u32>,
    ) -> Result<(), ParquetError> {
        self.with_part(Table::Prices, ts, |c| {
            c.push_price(coin, price, ts, symbol, confidence, decimals);
            Ok(1)
        })
    }

    /// Appends a TVL update to `tvl`: one row per chain, then one per sub-bucket (`extra`).
    pub fn tvl(&mut self, t: &TvlUpdate) -> Result<(), ParquetError> {
        self.with_part(Table::Tvl, t.timestamp, |c| {
            let mut n = 0;
            for (chain, v, extra) in tvl_rows(t) {
                c.push_tvl(&t.protocol_id, chain, v, t.timestamp, extra);
                n += 1;
            }
            Ok(n)
        })
    }

    /// Appends one TVL row.
    pub fn tvl_row(
        &mut self,
        protocol_id: &str,
        chain: &str,
        tvl: f64,
        ts: Millis,
        extra: bool,
    ) -> Result<(), ParquetError> {
        self.with_part(Table::Tvl, ts, |c| {
            c.push_tvl(protocol_id, chain, tvl, ts, extra);
            Ok(1)
        })
    }

    /// Appends a market event to `events`.
    pub fn event(&mut self, e: &Event) -> Result<(), ParquetError> {
        self.with_part(Table::Events, e.timestamp, |c| c.push_event(e).map(|()| 1))
    }

    /// Appends an alert to `alerts` (partitioned by `triggered_at`).
    pub fn alert(&mut self, a: &Alert) -> Result<(), ParquetError> {
        self.with_part(Table::Alerts, a.triggered_at, |c| {
            c.push_alert(a);
            Ok(1)
        })
    }

    fn with_part(
        &mut self,
        table: Table,
        ts: Millis,
        push: impl FnOnce(&mut Columns) -> Result<u64, arrow_schema::ArrowError>,
    ) -> Result<(), ParquetError> {
        let bucket = ts.div_euclid(self.opts.bucket_ms) * self.opts.bucket_ms;
        if ts > self.newest[table.index()] {
            self.newest[table.index()] = ts;
            self.roll(table)?;
        }
        let key = (table, bucket);
        if !self.open.contains_key(&key) {
            let open_here = self.open.keys().filter(|(t, _)| *t == table).count();
            if open_here >= MAX_OPEN_PER_TABLE
                && let Some(oldest) = self.open.keys().find(|(t, _)| *t == table).copied()
            {
                self.close(oldest)?;
            }
            let part = self.open_part(table, bucket)?;
            self.open.insert(key, part);
        }
        let Some(part) = self.open.get_mut(&key) else {
            return Err(ParquetError::Config("part vanished".into()));
        };
        let n = push(&mut part.cols).map_err(|e| ParquetError::encode(&part.tmp, e))?;
        part.dirty = true;
        self.stats.rows[table.index()] += n;
        if part.cols.len() >= BATCH_ROWS {
            flush_cols(part, table)?;
        }
        Ok(())
    }

    /// Closes the parts of `table` whose bucket the table's event time has moved past.
    fn roll(&mut self, table: Table) -> Result<(), ParquetError> {
        let newest = self.newest[table.index()];
        let done: Vec<(Table, Millis)> = self
            .open
            .keys()
            .filter(|(t, b)| *t == table && b.saturating_add(self.opts.bucket_ms + CLOSE_GRACE_MS) <= newest)
            .copied()
            .collect();
        for key in done {
            self.close(key)?;
        }
        Ok(())
    }

    fn open_part(&mut self, table: Table, bucket: Millis) -> Result<Part, ParquetError> {
        let table_dir = self.opts.root.join(table.name());
        let dir = table_dir.join(date_dir(bucket));
        if !dir.is_dir() {
            fs::create_dir_all(&dir).map_err(|e| ParquetError::io("create directory", &dir, e))?;
            if self.opts.spool {
                sync_dir(&table_dir)?;
                sync_dir(&self.opts.root)?;
            }
        }
        let label = if self.opts.bucket_ms < DAY_MS {
            let minute = bucket.rem_euclid(DAY_MS) / 60_000;
            format!("{:02}{:02}-", minute / 60, minute % 60)
        } else {
            String::new()
        };
        let name = format!("part-{label}{}-{:05}", self.run, self.seq);
        self.seq += 1;
        let path = dir.join(format!("{name}.parquet"));
        let tmp = dir.join(format!(".{name}.parquet.tmp"));
        let file = File::create(&tmp).map_err(|e| ParquetError::io("create", &tmp, e))?;
        let writer = ArrowWriter::try_new(file, table.schema(), Some(self.props.clone()))
            .map_err(|e| ParquetError::encode(&tmp, e))?;
        let spool = if self.opts.spool {
            let sp = dir.join(format!(".{name}.spool.arrows"));
            let f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&sp)
                .map_err(|e| ParquetError::io("create", &sp, e))?;
            let w = StreamWriter::try_new(BufWriter::with_capacity(1 << 16, f), &table.schema())
                .map_err(|e| ParquetError::encode(&sp, e))?;
            Some(Spool { path: sp, w })
        } else {
            None
        };
        Ok(Part {
            cols: Columns::new(table),
            writer,
            dir,
            tmp,
            path,
            spool,
            dirty: false,
            spool_durable: false,
        })
    }

    /// Makes every row appended so far durable: with a spool, the spools of the parts written
    /// since the last call are flushed and fsynced (the acknowledgement point of the sink);
    /// without one this only hands buffered rows to the encoder.
    pub fn sync(&mut self) -> Result<(), ParquetError> {
        for ((table, _), part) in self.open.iter_mut() {
            if !part.dirty {
                continue;
            }
            flush_cols(part, *table)?;
            if let Some(s) = &mut part.spool {
                s.w.flush().map_err(|e| ParquetError::encode(&s.path, e))?;
                s.w.get_ref()
                    .get_ref()
                    .sync_data()
                    .map_err(|e| ParquetError::io("sync", &s.path, e))?;
                if !part.spool_durable {
                    sync_dir(&part.dir)?;
                    part.spool_durable = true;
                }
            }
            part.dirty = false;
        }
        Ok(())
    }

    fn close(&mut self, key: (Table, Millis)) -> Result<(), ParquetError> {
        let Some(part) = self.open.remove(&key) else {
            return Ok(());
        };
        let bytes = finish_part(part, key.0)?;
        self.stats.files += 1;
        self.stats.bytes += bytes;
        Ok(())
    }

    /// Closes every open part (at shutdown, or at the end of an export). Every part is
    /// attempted; the first error is returned.
    pub fn close_all(&mut self) -> Result<(), ParquetError> {
        let keys: Vec<(Table, Millis)> = self.open.keys().copied().collect();
        let mut first = None;
        for key in keys {
            if let Err(e) = self.close(key) {
                tracing::error!("parquet: {e}");
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Drops every open part without closing it: its `.tmp` file is removed, its spool kept
    /// for [`recover`]. Used after a failed write, so that the next attempt starts clean.
    pub fn abandon(&mut self) {
        for (_, part) in std::mem::take(&mut self.open) {
            drop(part.writer);
            let _ = fs::remove_file(&part.tmp);
        }
    }
}

/// Hands the buffered rows of a part to its spool and encoder.
fn flush_cols(part: &mut Part, table: Table) -> Result<(), ParquetError> {
    if part.cols.len() == 0 {
        return Ok(());
    }
    let batch = part.cols.take(table).map_err(|e| ParquetError::encode(&part.tmp, e))?;
    if let Some(s) = &mut part.spool {
        s.w.write(&batch).map_err(|e| ParquetError::encode(&s.path, e))?;
    }
    part.writer
        .write(&batch)
        .map_err(|e| ParquetError::encode(&part.tmp, e))
}

/// Writes the footer, fsyncs, renames into place, fsyncs the directory, then removes the
/// spool. Returns the file's size.
fn finish_part(mut part: Part, table: Table) -> Result<u64, ParquetError> {
    flush_cols(&mut part, table)?;
    part.writer.finish().map_err(|e| ParquetError::encode(&part.tmp, e))?;
    let bytes = part.writer.bytes_written() as u64;
    publish(part.writer.inner(), &part.tmp, &part.path, &part.dir)?;
    if let Some(s) = part.spool {
        drop(s.w);
        fs::remove_file(&s.path).map_err(|e| ParquetError::io("remove", &s.path, e))?;
    }
    Ok(bytes)
}

/// fsync `file` (at `tmp`), rename it to `path`, fsync `dir`.
fn publish(file: &File, tmp: &Path, path: &Path, dir: &Path) -> Result<(), ParquetError> {
    file.sync_all().map_err(|e| ParquetError::io("sync", tmp, e))?;
    fs::rename(tmp, path).map_err(|e| ParquetError::io("rename", tmp, e))?;
    sync_dir(dir)
}

/// Finishes what a crashed sink left under `root`: every spool (`.part-*.spool.arrows`) whose
/// part file does not exist yet is written as that part file (its complete batches; a torn
/// last batch was never acknowledged); spools whose part exists and stale `.tmp` files are
/// removed. Returns what was written.
pub fn recover(root: &Path, row_group_rows: usize) -> Result<WriteStats, ParquetError> {
    let mut stats = WriteStats::default();
    let props = properties(row_group_rows)?;
    for table in Table::ALL {
        let table_dir = root.join(table.name());
        let Ok(dates) = fs::read_dir(&table_dir) else { continue };
        for date in dates.flatten() {
            let dir = date.path();
            if !dir.is_dir() {
                continue;
            }
            let entries = fs::read_dir(&dir).map_err(|e| ParquetError::io("list", &dir, e))?;
            let names: Vec<String> = entries
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect();
            for name in &names {
                let Some(base) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".spool.arrows")) else {
                    continue;
                };
                let spool = dir.join(name);
                let path = dir.join(format!("{base}.parquet"));
                let tmp = dir.join(format!(".{base}.parquet.tmp"));
                if !path.exists() {
                    let rows = rewrite(&spool, &tmp, &path, &dir, table, &props)?;
                    if let Some((rows, bytes)) = rows {
                        stats.rows[table.index()] += rows;
                        stats.files += 1;
                        stats.bytes += bytes;
                        tracing::info!("parquet: recovered {rows} rows into {}", path.display());
                    }
                }
                let _ = fs::remove_file(&tmp);
                fs::remove_file(&spool).map_err(|e| ParquetError::io("remove", &spool, e))?;
            }
            for name in &names {
                if let Some(base) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".parquet.tmp"))
                    && !names.iter().any(|n| n == &format!(".{base}.spool.arrows"))
                {
                    let _ = fs::remove_file(dir.join(name));
                }
            }
        }
    }
    Ok(stats)
}

/// Writes the complete batches of a spool as a part file; `None` when it holds no rows.
fn rewrite(
    spool: &Path,
    tmp: &Path,
    path: &Path,
    dir: &Path,
    table: Table,
    props: &WriterProperties,
) -> Result<Option<(u64, u64)>, ParquetError> {
    let f = File::open(spool).map_err(|e| ParquetError::io("open", spool, e))?;
    let mut batches = Vec::new();
    // A spool torn inside its header or last batch: keep what is complete.
    if let Ok(reader) = StreamReader::try_new(BufReader::new(f), None) {
        for b in reader {
            match b {
                Ok(b) if b.num_rows() > 0 => batches.push(b),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!("parquet: {}: torn tail ignored ({e})", spool.display());
                    break;
                }
            }
        }
    }
    if batches.is_empty() {
        return Ok(None);
    }
    let file = File::create(tmp).map_err(|e| ParquetError::io("create", tmp, e))?;
    let mut w =
        ArrowWriter::try_new(file, table.schema(), Some(props.clone())).map_err(|e| ParquetError::encode(tmp, e))?;
    let mut rows = 0u64;
    for b in &batches {
        w.write(b).map_err(|e| ParquetError::encode(tmp, e))?;
        rows += b.num_rows() as u64;
    }
    w.finish().map_err(|e| ParquetError::encode(tmp, e))?;
    let bytes = w.bytes_written() as u64;
    publish(w.inner(), tmp, path, dir)?;
    Ok(Some((rows, bytes)))
}
