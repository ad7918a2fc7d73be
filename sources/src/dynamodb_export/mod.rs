//! DynamoDB export-to-S3 trees on local disk (SPEC §1, "DynamoDB items").
//!
//! Layout: `<prefix>/AWSDynamoDB/<ExportId>/manifest-summary.json`, `manifest-files.json`
//! (JSON lines naming each data file by `dataFileS3Key`, with its `itemCount`) and
//! `data/*.json.gz` (JSON lines: `{"Item":…}` in full exports,
//! `{"Metadata":…,"Keys":…,"NewImage":…,"OldImage":…}` in incremental ones).
//!
//! An export is history, not a live stream: [`open`] reads every data file, then yields the
//! records in timestamp order (ties keep export, manifest and line order). Price items with a
//! `redirect` and no `price` take the redirect target's latest price at or before their own
//! time. Dead letters found while reading (invalid lines, `itemCount` mismatches, read errors)
//! come first; unresolvable redirects come at their place in time.
//!
//! Memory stays flat however large the export: the ordering is an external sort. Decoded items
//! are numbered in export, manifest and line order and collected in compact binary runs of at
//! most [`ExportOptions::run_records`] items; a full run is sorted by (timestamp, number) and
//! spilled to a file in a temporary directory, and iteration merges the runs lazily with a
//! heap (the last run stays in memory; an export that fits in one run is never spilled). Only
//! small per-coin state is kept besides: interned coin ids and symbols and each coin's latest
//! price, for redirects, which are resolved as the merged records are taken. Dead letters
//! found while reading are buffered the same way (at most [`DEAD_BUFFER`] in memory).

use std::collections::HashMap;
use std::fs;
use std::path::{Component, Path, PathBuf};

use schemas::dynamo::{DynamoRecord, ExportLine, PriceItem, decode_item, parse_export_line};
use schemas::{DeadLetter, Millis, PriceTick, Record, SourceName, SourcePos, format_seconds};
use serde_json::Value;

use crate::{Input, Line, SourceError, io_reason, open_lines, read_line, too_long_reason};
use spill::{Body, DeadLetters, DeadSink, Entry, Merge, Price, Sorter, SpillDir};

pub mod s3;
mod spill;

#[cfg(test)]
mod tests;

/// At most this many dead letters found while reading are held in memory (more are spilled).
pub const DEAD_BUFFER: usize = 4096;

const AWS_DIR: &str = "AWSDynamoDB";
const SUMMARY: &str = "manifest-summary.json";
const MANIFEST: &str = "manifest-files.json";

/// Default [`ExportOptions::run_records`].
pub const DEFAULT_RUN_RECORDS: usize = 200_000;

/// Default [`ExportOptions::merge_fan_in`].
pub const DEFAULT_MERGE_FAN_IN: usize = 64;

/// How an export is read: the external sort's run size and merge width, and where runs spill.
/// Every choice yields the same records in the same order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportOptions {
    /// Items held in memory at once: runs of this many decoded items are sorted and, when more
    /// follow, spilled to a temporary file. Also bounds the dead letters held in memory (at
    /// most [`DEAD_BUFFER`] either way). Default [`DEFAULT_RUN_RECORDS`].
    pub run_records: usize,
    /// Runs merged at once (at least 2); more runs are first merged in passes. Default
    /// [`DEFAULT_MERGE_FAN_IN`].
    pub merge_fan_in: usize,
    /// Directory in which the temporary spill directory is created (default: the system's
    /// temporary directory).
    pub spill_dir: Option<PathBuf>,
    /// Longest data-file line, in bytes: a longer one is a dead letter. Default
    /// [`crate::DEFAULT_MAX_LINE_BYTES`].
    pub max_line_bytes: usize,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            run_records: DEFAULT_RUN_RECORDS,
            merge_fan_in: DEFAULT_MERGE_FAN_IN,
            spill_dir: None,
            max_line_bytes: crate::DEFAULT_MAX_LINE_BYTES,
        }
    }
}

/// Counts of what an export source read and skipped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Exports read.
    pub exports: u64,
    /// Data files read.
    pub data_files: u64,
    /// Non-blank data-file lines read.
    pub lines: u64,
    /// TVL and price items decoded.
    pub items: u64,
    /// Items of other kinds (neither `hourlyTvl#`/`dailyTvl#` nor `coingecko#`/`asset#`).
    pub skipped_items: u64,
    /// Incremental-export deletions (not emitted).
    pub deletions: u64,
    /// Lines that failed to decode.
    pub invalid_lines: u64,
    /// Data files whose line count differs from the manifest's `itemCount`.
    pub item_count_mismatches: u64,
    /// Data files whose MD5 differs from the manifest's `md5Checksum`.
    pub md5_mismatches: u64,
    /// Redirect items given their target's price (so far).
    pub redirects_resolved: u64,
    /// Redirect items whose target had no earlier price (so far; dead-lettered).
    pub redirects_unresolved: u64,
}

/// Checks a data file against its manifest `md5Checksum` (AWS writes the base64 MD5 of the
/// object; hex is accepted too); returns the mismatch, if any.
fn md5_mismatch(path: &Path, want: &str) -> Result<Option<String>, SourceError> {
    use base64::Engine;
    use md5::{Digest, Md5};
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| SourceError::io("read", path, e))?;
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(|e| SourceError::io("read", path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let digest = hasher.finalize();
    let b64 = base64::engine::general_purpose::STANDARD.encode(digest.as_slice());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    Ok((want != b64 && !want.eq_ignore_ascii_case(&hex))
        .then(|| format!("md5Checksum mismatch: manifest says {want}, file has {b64}")))
}

/// `true` when `dir` is one export's directory (holding `manifest-summary.json`) or a prefix
/// directory with at least one export under `AWSDynamoDB/`.
pub fn is_export_dir(dir: &Path) -> bool {
    dir.join(SUMMARY).is_file() || list_exports(dir).is_ok_and(|v| !v.is_empty())
}

/// Opens a DynamoDB export with the default [`ExportOptions`]: `dir` is a prefix directory
/// holding `AWSDynamoDB/<ExportId>/…` (every export under it is read, ordered by
/// `exportTime`/`startTime`, then ExportId), or one export's own directory.
///
/// Every data file is read here (into sorted runs, spilled to disk beyond one run); missing
/// or malformed manifests, missing data files and spill I/O failures are errors, bad lines and
/// `itemCount` mismatches are dead letters. Export directories without a
/// `manifest-summary.json` (unfinished exports) are skipped.
pub fn open(dir: &Path) -> Result<ExportSource, SourceError> {
    open_with(dir, &ExportOptions::default())
}

/// [`open`] with explicit [`ExportOptions`].
pub fn open_with(dir: &Path, opts: &ExportOptions) -> Result<ExportSource, SourceError> {
    let exports = if dir.join(SUMMARY).is_file() {
        let parent = dir.parent();
        let prefix = parent
            .filter(|p| p.file_name().is_some_and(|n| n == AWS_DIR))
            .and_then(Path::parent);
        vec![read_summary(dir, prefix.map(Path::to_path_buf))?]
    } else {
        let mut exports = list_exports(dir)?;
        if exports.is_empty() {
            return Err(SourceError::invalid(
                dir,
                format!("no DynamoDB export found (expected {AWS_DIR}/<ExportId>/{SUMMARY} or {SUMMARY})"),
            ));
        }
        exports.sort_by(|a, b| (a.time, &a.id).cmp(&(b.time, &b.id)));
        exports
    };
    let mut loader = Loader::new(opts);
    for export in &exports {
        loader.load_export(export)?;
    }
    let Loader {
        stats,
        mut spill,
        dead,
        sorter,
        names,
        files,
        ..
    } = loader;
    let remaining = usize::try_from(dead.count() + sorter.count()).unwrap_or(usize::MAX);
    let dead = dead.finish()?;
    let merge = sorter.finish(&mut spill)?;
    tracing::debug!(
        items = stats.items,
        runs = merge.runs(),
        spill_files = spill.files(),
        "DynamoDB export read; merging its sorted runs"
    );
    Ok(ExportSource {
        last_price: vec![None; names.len()],
        stats,
        dead,
        merge,
        names,
        files,
        relabel: None,
        remaining,
        exact: true,
        _spill: spill,
    })
}

/// The records of one or more exports in timestamp order, merged lazily from sorted runs;
/// see [`open`].
pub struct ExportSource {
    stats: ExportStats,
    dead: DeadLetters,
    merge: Merge,
    /// Interned coin ids and symbols.
    names: Vec<String>,
    /// `"<data file>:"` per data file.
    files: Vec<SourceName>,
    /// Latest price per interned coin id, in timestamp order so far.
    last_price: Vec<Option<f64>>,
    /// `(local, remote)`: dead-letter sources starting with `local` are renamed (S3 exports).
    relabel: Option<(String, String)>,
    /// Items not yet taken.
    remaining: usize,
    /// `false` once a spill file could not be read back (the count is then unknown).
    exact: bool,
    /// The spill directory, removed when the source is dropped (after the readers above).
    _spill: SpillDir,
}

impl ExportSource {
    /// What was read and skipped (redirect counts grow as records are taken).
    pub fn stats(&self) -> &ExportStats {
        &self.stats
    }

    /// Temporary files the external sort wrote (0: the export fit in one run).
    pub fn spill_files(&self) -> u64 {
        self._spill.files()
    }

    fn name(&self, id: u32) -> &str {
        self.names.get(id as usize).map_or("", String::as_str)
    }

    fn price_record(&mut self, pos: SourcePos, ts: Millis, p: Price) -> Input {
        let price = match (p.price, p.redirect) {
            (Some(price), _) => price,
            (None, Some(target)) => match self.last_price.get(target as usize).copied().flatten() {
                Some(price) => {
                    self.stats.redirects_resolved += 1;
                    price
                }
                None => {
                    self.stats.redirects_unresolved += 1;
                    let raw = serde_json::json!({"coin": self.name(p.coin), "redirect": self.name(target),
                        "timestamp": format_seconds(ts)});
                    let reason = format!("redirect target {} has no earlier price", self.name(target));
                    return Input::Dead(DeadLetter::new(pos, reason, &raw.to_string()));
                }
            },
            (None, None) => {
                return Input::Dead(DeadLetter::new(pos, "price item without price or redirect", ""));
            }
        };
        if let Some(slot) = self.last_price.get_mut(p.coin as usize) {
            *slot = Some(price);
        }
        let tick = PriceTick {
            coin: self.name(p.coin).to_string(),
            price,
            timestamp: ts,
            symbol: p.symbol.map(|s| self.name(s).to_string()),
            confidence: p.confidence,
            decimals: p.decimals,
        };
        Input::Record(pos, Record::Price(tick))
    }
}

impl Iterator for ExportSource {
    type Item = Input;

    fn next(&mut self) -> Option<Input> {
        if let Some(mut d) = self.dead.next() {
            self.remaining = self.remaining.saturating_sub(1);
            if let Some((local, remote)) = &self.relabel
                && let Some(rest) = d.source.strip_prefix(local.as_str())
            {
                d.source = format!("{remote}{rest}");
            }
            return Some(Input::Dead(d));
        }
        let e = match self.merge.next_entry()? {
            Ok(e) => e,
            Err(d) => {
                self.exact = false;
                return Some(Input::Dead(d));
            }
        };
        self.remaining = self.remaining.saturating_sub(1);
        let source = self
            .files
            .get(e.file as usize)
            .copied()
            .unwrap_or_else(|| SourceName::from(""));
        let pos = SourcePos::new(source, e.line);
        Some(match e.body {
            Body::Tvl(t) => Input::Record(pos, Record::Tvl(t)),
            Body::Price(p) => self.price_record(pos, e.ts, p),
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        if self.exact {
            (self.remaining, Some(self.remaining))
        } else {
            (0, None)
        }
    }
}

/// One export's directory and summary.
struct Export {
    id: String,
    dir: PathBuf,
    /// The directory holding `AWSDynamoDB/`, when known.
    prefix: Option<PathBuf>,
    /// `exportTime` (or `exportToTime`, `startTime`) in ms; unknown sorts last.
    time: i64,
    manifest_key: Option<String>,
}

/// Lists the exports under a prefix directory (`dir/AWSDynamoDB/*/manifest-summary.json`),
/// or under `dir` itself when it is the `AWSDynamoDB` directory.
fn list_exports(dir: &Path) -> Result<Vec<Export>, SourceError> {
    let (root, prefix) = if dir.join(AWS_DIR).is_dir() {
        (dir.join(AWS_DIR), dir.to_path_buf())
    } else if dir.file_name().is_some_and(|n| n == AWS_DIR) && dir.is_dir() {
        (dir.to_path_buf(), dir.parent().unwrap_or(Path::new("")).to_path_buf())
    } else if dir.is_dir() {
        return Ok(Vec::new());
    } else {
        let e = fs::metadata(dir)
            .err()
            .unwrap_or_else(|| std::io::Error::other("not a directory"));
        return Err(SourceError::io("open", dir, e));
    };
    let listing = fs::read_dir(&root).map_err(|e| SourceError::io("list", &root, e))?;
    let mut exports = Vec::new();
    for entry in listing {
        let path = entry.map_err(|e| SourceError::io("list", &root, e))?.path();
        if path.join(SUMMARY).is_file() {
            exports.push(read_summary(&path, Some(prefix.clone()))?);
        }
    }
    Ok(exports)
}

fn read_summary(dir: &Path, prefix: Option<PathBuf>) -> Result<Export, SourceError> {
    let path = dir.join(SUMMARY);
    let text = fs::read_to_string(&path).map_err(|e| SourceError::io("read", &path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| SourceError::invalid(&path, format!("bad JSON: {e}")))?;
    if !v.is_object() {
        return Err(SourceError::invalid(&path, "not a JSON object"));
    }
    let time = ["exportTime", "exportToTime", "startTime"]
        .iter()
        .find_map(|k| v.get(k).and_then(parse_time))
        .unwrap_or(i64::MAX);
    Ok(Export {
        id: dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        dir: dir.to_path_buf(),
        prefix,
        time,
        manifest_key: v.get("manifestFilesS3Key").and_then(Value::as_str).map(str::to_string),
    })
}

/// A summary time: ISO 8601 (`2024-06-03T16:00:00.000Z`) or unix seconds, as ms.
fn parse_time(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_f64().filter(|s| s.is_finite()).map(|s| (s * 1000.0) as i64),
        Value::String(s) => parse_iso8601(s),
        _ => None,
    }
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fff…][Z|±HH:MM]` to unix ms.
fn parse_iso8601(s: &str) -> Option<i64> {
    let digits = |a: usize, b: usize| -> Option<i64> {
        let d = s.get(a..b)?;
        if d.bytes().all(|c| c.is_ascii_digit()) {
            d.parse().ok()
        } else {
            None
        }
    };
    let b = s.as_bytes();
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (y, mo, d) = (digits(0, 4)?, digits(5, 7)?, digits(8, 10)?);
    let (h, mi, sec) = (digits(11, 13)?, digits(14, 16)?, digits(17, 19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut rest = s.get(19..)?;
    let mut ms = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        let scaled: String = frac[..n].chars().chain("000".chars()).take(3).collect();
        ms = scaled.parse().ok()?;
        rest = &frac[n..];
    }
    let offset = match rest {
        "" | "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first() {
                Some(b'+') => 1,
                Some(b'-') => -1,
                _ => return None,
            };
            let hm = rest[1..].replace(':', "");
            if hm.len() != 4 || !hm.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            let (oh, om): (i64, i64) = (hm[..2].parse().ok()?, hm[2..].parse().ok()?);
            sign * (oh * 60 + om) * 60
        }
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + h * 3600 + mi * 60 + sec) - offset) * 1000 + ms)
}

/// Resolves an S3 key of an export to a local file: relative to the prefix directory, then
/// from its `AWSDynamoDB/` part on, then `<export dir>[/<sub>]/<file name>`.
fn resolve(key: &str, export: &Export, sub: Option<&str>) -> Result<PathBuf, Vec<PathBuf>> {
    let safe = |k: &str| Path::new(k).components().all(|c| matches!(c, Component::Normal(_)));
    let mut tried = Vec::new();
    if let Some(prefix) = &export.prefix {
        if safe(key) {
            tried.push(prefix.join(key));
        }
        if let Some(rest) = key.find(&format!("{AWS_DIR}/")).filter(|&i| i > 0).map(|i| &key[i..])
            && safe(rest)
        {
            tried.push(prefix.join(rest));
        }
    }
    if let Some(name) = Path::new(key).file_name() {
        let dir = sub.map_or_else(|| export.dir.clone(), |s| export.dir.join(s));
        tried.push(dir.join(name));
    }
    match tried.iter().find(|p| p.is_file()) {
        Some(p) => Ok(p.clone()),
        None => Err(tried),
    }
}

/// Reads exports into sorted runs, interning coin ids and symbols (few distinct strings, many
/// items).
struct Loader {
    stats: ExportStats,
    spill: SpillDir,
    dead: DeadSink,
    sorter: Sorter,
    names: Vec<String>,
    ids: HashMap<String, u32>,
    files: Vec<SourceName>,
    buf: Vec<u8>,
    max_line: usize,
}

impl Loader {
    fn new(opts: &ExportOptions) -> Self {
        Loader {
            stats: ExportStats::default(),
            spill: SpillDir::new(opts.spill_dir.clone()),
            dead: DeadSink::new(opts.run_records.min(DEAD_BUFFER)),
            sorter: Sorter::new(opts.run_records, opts.merge_fan_in),
            names: Vec::new(),
            ids: HashMap::new(),
            files: Vec::new(),
            buf: Vec::new(),
            max_line: opts.max_line_bytes,
        }
    }

    fn dead(&mut self, d: DeadLetter) -> Result<(), SourceError> {
        self.dead.push(&mut self.spill, d)
    }

    fn intern(&mut self, s: String) -> u32 {
        if let Some(&id) = self.ids.get(&s) {
            return id;
        }
        let id = self.names.len() as u32;
        self.names.push(s.clone());
        self.ids.insert(s, id);
        id
    }

    fn load_export(&mut self, export: &Export) -> Result<(), SourceError> {
        self.stats.exports += 1;
        let manifest = match &export.manifest_key {
            Some(key) => resolve(key, export, None).unwrap_or_else(|_| export.dir.join(MANIFEST)),
            None => export.dir.join(MANIFEST),
        };
        let text = fs::read_to_string(&manifest).map_err(|e| SourceError::io("read", &manifest, e))?;
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let bad = |reason: String| SourceError::invalid(&manifest, format!("line {}: {reason}", i + 1));
            let v: Value = serde_json::from_str(line).map_err(|e| bad(format!("bad JSON: {e}")))?;
            let key = v
                .get("dataFileS3Key")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("missing string field `dataFileS3Key`".into()))?;
            let data = resolve(key, export, Some("data")).map_err(|tried| {
                let tried: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
                bad(format!("data file {key} not found (looked for {})", tried.join(", ")))
            })?;
            if let Some(want) = v.get("md5Checksum").and_then(Value::as_str)
                && let Some(reason) = md5_mismatch(&data, want)?
            {
                self.stats.md5_mismatches += 1;
                self.dead(DeadLetter::new(data.display(), reason, line))?;
            }
            self.load_data_file(&data, v.get("itemCount").and_then(Value::as_u64), line)?;
        }
        Ok(())
    }

    fn load_data_file(&mut self, path: &Path, item_count: Option<u64>, manifest_line: &str) -> Result<(), SourceError> {
        let mut reader = open_lines(path)?;
        self.stats.data_files += 1;
        let file = self.files.len() as u32;
        let source = SourceName::from(format!("{}:", path.display()));
        self.files.push(source);
        let mut buf = std::mem::take(&mut self.buf);
        let (mut line_no, mut lines) = (0u64, 0u64);
        loop {
            let text = match read_line(&mut *reader, &mut buf, self.max_line) {
                Line::Eof => break,
                Line::Err(e) => {
                    // A read error makes the count meaningless: no itemCount check for this file.
                    let pos = SourcePos::new(source, line_no + 1);
                    let d = DeadLetter::new(
                        pos,
                        format!("read error: {}", io_reason(&e)),
                        &String::from_utf8_lossy(&buf),
                    );
                    self.buf = buf;
                    return self.dead(d);
                }
                Line::TooLong(bytes) => {
                    line_no += 1;
                    lines += 1;
                    self.stats.invalid_lines += 1;
                    let pos = SourcePos::new(source, line_no);
                    let reason = too_long_reason(bytes, self.max_line);
                    self.dead(DeadLetter::new(pos, reason, &String::from_utf8_lossy(&buf)))?;
                    continue;
                }
                Line::Text(text) => text,
            };
            line_no += 1;
            let line = match text {
                Ok(line) => line,
                Err(e) => {
                    lines += 1;
                    self.stats.invalid_lines += 1;
                    let pos = SourcePos::new(source, line_no);
                    let d = DeadLetter::new(pos, format!("invalid UTF-8: {e}"), &String::from_utf8_lossy(&buf));
                    self.dead(d)?;
                    continue;
                }
            };
            if line.trim().is_empty() {
                continue;
            }
            lines += 1;
            match self.load_line(line, file, line_no) {
                Ok(Some(entry)) => self.sorter.push(&mut self.spill, &entry)?,
                Ok(None) => {}
                Err(reason) => {
                    self.stats.invalid_lines += 1;
                    let d = DeadLetter::new(SourcePos::new(source, line_no), reason, line);
                    self.dead(d)?;
                }
            }
        }
        self.buf = buf;
        self.stats.lines += lines;
        if let Some(n) = item_count.filter(|&n| n != lines) {
            self.stats.item_count_mismatches += 1;
            let reason = format!("itemCount mismatch: manifest says {n}, file has {lines}");
            self.dead(DeadLetter::new(path.display(), reason, manifest_line))?;
        }
        Ok(())
    }

    /// Decodes one line: `Ok(None)` for deletions and items of other kinds.
    fn load_line(&mut self, line: &str, file: u32, line_no: u64) -> Result<Option<Entry>, String> {
        let item = match parse_export_line(line).map_err(|e| e.0)? {
            ExportLine::Upsert(item) => item,
            ExportLine::Delete(_) => {
                self.stats.deletions += 1;
                return Ok(None);
            }
        };
        let (ts, body) = match decode_item(&item).map_err(|e| e.0)? {
            None => {
                self.stats.skipped_items += 1;
                return Ok(None);
            }
            Some(DynamoRecord::Tvl(t)) => (t.timestamp, Body::Tvl(t)),
            Some(DynamoRecord::Price(p)) => {
                let PriceItem {
                    coin,
                    price,
                    timestamp,
                    symbol,
                    confidence,
                    decimals,
                    redirect,
                    ..
                } = p;
                let price = Price {
                    coin: self.intern(coin),
                    price,
                    symbol: symbol.map(|s| self.intern(s)),
                    confidence,
                    decimals,
                    redirect: redirect.map(|r| self.intern(r)),
                };
                (timestamp, Body::Price(price))
            }
        };
        self.stats.items += 1;
        Ok(Some(Entry {
            ts,
            file,
            line: line_no,
            body,
        }))
    }
}
