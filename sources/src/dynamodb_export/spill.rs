//! The external sort behind [`ExportSource`](super::ExportSource): decoded items are encoded
//! into a compact binary frame, collected into runs of at most
//! [`ExportOptions::run_records`](super::ExportOptions::run_records) items, each run sorted by
//! `(timestamp, sequence number)` and, when more items follow, spilled to a file in a
//! temporary directory. Reading merges the runs lazily with a heap (first merging consecutive
//! groups of runs into bigger runs while there are more than
//! [`ExportOptions::merge_fan_in`](super::ExportOptions::merge_fan_in)); the last run stays
//! in memory. Memory is therefore bounded by one run, plus a read buffer per merged run.
//!
//! The sequence number (the item's place in export, manifest and line order) is implicit:
//! within a run the frames are laid out in that order and sorted by `(timestamp, offset)`, and
//! runs are consecutive ranges of it, so merging by `(timestamp, run index)` — with groups of
//! consecutive runs merged into one — gives the order of a stable sort by timestamp.
//!
//! Frame: `varint len | i64 LE timestamp | varint file | varint line | tag | body`, where a
//! TVL body is `str protocol | varint n | n × (str chain, f64) | varint m | m × (str, f64)` and
//! a price body is `varint coin | flags | [f64 price] [varint symbol] [f64 confidence]
//! [varint decimals] [varint redirect]` (strings: `varint len | UTF-8`; coins and symbols are
//! interned ids).
//!
//! Dead letters found while reading are buffered the same way: beyond a few thousand they go
//! to a JSON-lines file in the same directory, and are read back from there first.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use schemas::{DeadLetter, Millis, TvlUpdate};

use crate::{SourceError, io_reason};

/// Read and write buffer of one run file.
const RUN_BUFFER: usize = 64 * 1024;

/// One decoded item.
#[derive(Debug, PartialEq)]
pub(super) struct Entry {
    /// Event time.
    pub ts: Millis,
    /// Index of the data file (into the source's file names).
    pub file: u32,
    /// 1-based line number in the data file.
    pub line: u64,
    /// What the item holds.
    pub body: Body,
}

/// What a decoded item holds.
#[derive(Debug, PartialEq)]
pub(super) enum Body {
    /// A TVL update (its timestamp is the entry's).
    Tvl(TvlUpdate),
    /// A price item.
    Price(Price),
}

/// A price item with interned strings.
#[derive(Debug, PartialEq)]
pub(super) struct Price {
    pub coin: u32,
    pub price: Option<f64>,
    pub symbol: Option<u32>,
    pub confidence: Option<f64>,
    pub decimals: Option<u32>,
    pub redirect: Option<u32>,
}

const TAG_TVL: u8 = 0;
const TAG_PRICE: u8 = 1;
const HAS_PRICE: u8 = 1;
const HAS_SYMBOL: u8 = 2;
const HAS_CONFIDENCE: u8 = 4;
const HAS_DECIMALS: u8 = 8;
const HAS_REDIRECT: u8 = 16;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn put_pairs(out: &mut Vec<u8>, pairs: &[(String, f64)]) {
    put_varint(out, pairs.len() as u64);
    for (name, x) in pairs {
        put_str(out, name);
        out.extend_from_slice(&x.to_le_bytes());
    }
}

impl Entry {
    /// Appends this entry's frame to `out`, using `body` as scratch space.
    pub fn encode(&self, body: &mut Vec<u8>, out: &mut Vec<u8>) {
        body.clear();
        body.extend_from_slice(&self.ts.to_le_bytes());
        put_varint(body, u64::from(self.file));
        put_varint(body, self.line);
        match &self.body {
            Body::Tvl(t) => {
                body.push(TAG_TVL);
                put_str(body, &t.protocol_id);
                put_pairs(body, &t.chains);
                put_pairs(body, &t.extra);
            }
            Body::Price(p) => {
                body.push(TAG_PRICE);
                put_varint(body, u64::from(p.coin));
                let flags = [
                    (p.price.is_some(), HAS_PRICE),
                    (p.symbol.is_some(), HAS_SYMBOL),
                    (p.confidence.is_some(), HAS_CONFIDENCE),
                    (p.decimals.is_some(), HAS_DECIMALS),
                    (p.redirect.is_some(), HAS_REDIRECT),
                ]
                .iter()
                .filter(|(set, _)| *set)
                .fold(0, |acc, (_, bit)| acc | bit);
                body.push(flags);
                if let Some(x) = p.price {
                    body.extend_from_slice(&x.to_le_bytes());
                }
                if let Some(s) = p.symbol {
                    put_varint(body, u64::from(s));
                }
                if let Some(x) = p.confidence {
                    body.extend_from_slice(&x.to_le_bytes());
                }
                if let Some(d) = p.decimals {
                    put_varint(body, u64::from(d));
                }
                if let Some(r) = p.redirect {
                    put_varint(body, u64::from(r));
                }
            }
        }
        put_varint(out, body.len() as u64);
        out.extend_from_slice(body);
    }

    /// Decodes a frame's content (timestamp and payload, without the length).
    pub fn decode(frame: &[u8]) -> Option<Entry> {
        let mut c = Cursor(frame);
        let ts = i64::from_le_bytes(c.array()?);
        let file = u32::try_from(c.varint()?).ok()?;
        let line = c.varint()?;
        let body = match c.byte()? {
            TAG_TVL => Body::Tvl(TvlUpdate {
                protocol_id: c.string()?,
                timestamp: ts,
                chains: c.pairs()?,
                extra: c.pairs()?,
            }),
            TAG_PRICE => {
                let coin = c.u32()?;
                let flags = c.byte()?;
                let has = |bit| flags & bit != 0;
                Body::Price(Price {
                    coin,
                    price: if has(HAS_PRICE) { Some(c.f64()?) } else { None },
                    symbol: if has(HAS_SYMBOL) { Some(c.u32()?) } else { None },
                    confidence: if has(HAS_CONFIDENCE) { Some(c.f64()?) } else { None },
                    decimals: if has(HAS_DECIMALS) { Some(c.u32()?) } else { None },
                    redirect: if has(HAS_REDIRECT) { Some(c.u32()?) } else { None },
                })
            }
            _ => return None,
        };
        c.0.is_empty().then_some(Entry { ts, file, line, body })
    }
}

/// Reads a frame's fields; `None` when it is truncated or malformed.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn byte(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }

    fn varint(&mut self) -> Option<u64> {
        let (v, n) = read_varint(self.0)?;
        self.0 = &self.0[n..];
        Some(v)
    }

    fn u32(&mut self) -> Option<u32> {
        u32::try_from(self.varint()?).ok()
    }

    fn f64(&mut self) -> Option<f64> {
        Some(f64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Option<String> {
        let n = usize::try_from(self.varint()?).ok()?;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }

    fn pairs(&mut self) -> Option<Vec<(String, f64)>> {
        let n = usize::try_from(self.varint()?).ok()?;
        let mut v = Vec::with_capacity(n.min(self.0.len()));
        for _ in 0..n {
            v.push((self.string()?, self.f64()?));
        }
        Some(v)
    }
}

/// A varint at the start of `b`: its value and length.
fn read_varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// The temporary directory for spilled runs and dead letters, created on first use and
/// removed when dropped.
pub(super) struct SpillDir {
    parent: Option<PathBuf>,
    dir: Option<tempfile::TempDir>,
    files: u64,
}

impl SpillDir {
    /// A spill directory to be created under `parent` (default: the system temporary directory).
    pub fn new(parent: Option<PathBuf>) -> Self {
        SpillDir {
            parent,
            dir: None,
            files: 0,
        }
    }

    /// Creates a new file named `<n>.<kind>` in the directory.
    fn create(&mut self, kind: &str) -> Result<(PathBuf, BufWriter<File>), SourceError> {
        if self.dir.is_none() {
            let parent = self.parent.clone().unwrap_or_else(std::env::temp_dir);
            let dir = tempfile::Builder::new()
                .prefix("llamaflow-export-sort")
                .tempdir_in(&parent)
                .map_err(|e| SourceError::io("create a spill directory in", &parent, e))?;
            self.dir = Some(dir);
        }
        let dir = self.dir.as_ref().map_or(Path::new(""), |d| d.path());
        self.files += 1;
        let path = dir.join(format!("{}.{kind}", self.files));
        let file = File::create(&path).map_err(|e| SourceError::io("create", &path, e))?;
        Ok((path, BufWriter::with_capacity(RUN_BUFFER, file)))
    }

    /// Files created so far.
    pub fn files(&self) -> u64 {
        self.files
    }
}

/// Collects encoded entries into sorted runs, spilling every full run but the last.
pub(super) struct Sorter {
    run_records: usize,
    fan_in: usize,
    /// The current run: frames in sequence order, and `(timestamp, frame offset)`.
    bytes: Vec<u8>,
    order: Vec<(Millis, usize)>,
    /// Spilled runs, in sequence order.
    spilled: Vec<PathBuf>,
    /// Entries pushed.
    count: u64,
    scratch: Vec<u8>,
}

impl Sorter {
    /// A sorter keeping at most `run_records` entries in memory and merging at most `fan_in`
    /// runs at once.
    pub fn new(run_records: usize, fan_in: usize) -> Self {
        Sorter {
            run_records: run_records.max(1),
            fan_in: fan_in.max(2),
            bytes: Vec::new(),
            order: Vec::new(),
            spilled: Vec::new(),
            count: 0,
            scratch: Vec::new(),
        }
    }

    /// Adds the next entry in sequence order, spilling the current run first when it is full.
    pub fn push(&mut self, spill: &mut SpillDir, e: &Entry) -> Result<(), SourceError> {
        if self.order.len() >= self.run_records {
            self.spill(spill)?;
        }
        self.order.push((e.ts, self.bytes.len()));
        e.encode(&mut self.scratch, &mut self.bytes);
        self.count += 1;
        Ok(())
    }

    fn sort(&mut self) {
        // Offsets grow with the sequence number, so this is the (timestamp, seq) order.
        self.order.sort_unstable();
    }

    fn spill(&mut self, spill: &mut SpillDir) -> Result<(), SourceError> {
        self.sort();
        let (path, mut out) = spill.create("run")?;
        let write = |out: &mut BufWriter<File>| -> io::Result<()> {
            for &(_, at) in &self.order {
                let frame = frame_at(&self.bytes, at).unwrap_or_default();
                write_frame(out, frame)?;
            }
            out.flush()
        };
        write(&mut out).map_err(|e| SourceError::io("write", &path, e))?;
        self.spilled.push(path);
        self.bytes.clear();
        self.order.clear();
        Ok(())
    }

    /// Entries pushed so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Sorts the last run and merges spilled runs in passes until at most `fan_in` runs (the
    /// in-memory one included) are left; returns the lazy merge of them.
    pub fn finish(mut self, spill: &mut SpillDir) -> Result<Merge, SourceError> {
        self.sort();
        let mut files = std::mem::take(&mut self.spilled);
        let limit = if self.order.is_empty() {
            self.fan_in
        } else {
            self.fan_in - 1
        };
        while files.len() > limit {
            let mut merged = Vec::with_capacity(files.len().div_ceil(self.fan_in));
            for group in files.chunks(self.fan_in) {
                match group {
                    [one] => merged.push(one.clone()),
                    _ => merged.push(merge_files(spill, group)?),
                }
            }
            files = merged;
        }
        let mut runs = Vec::with_capacity(files.len() + 1);
        for path in files {
            runs.push(Run::open(path)?);
        }
        if !self.order.is_empty() {
            runs.push(Run::Mem {
                bytes: self.bytes,
                order: self.order,
                next: 0,
            });
        }
        Merge::new(runs)
    }
}

/// The frame content (timestamp and payload) starting at `at` in `bytes`.
fn frame_at(bytes: &[u8], at: usize) -> Option<&[u8]> {
    let rest = bytes.get(at..)?;
    let (len, n) = read_varint(rest)?;
    rest.get(n..n.checked_add(usize::try_from(len).ok()?)?)
}

fn write_frame(out: &mut impl Write, frame: &[u8]) -> io::Result<()> {
    let mut len = Vec::with_capacity(10);
    put_varint(&mut len, frame.len() as u64);
    out.write_all(&len)?;
    out.write_all(frame)
}

/// Merges consecutive runs into one new run file, removing them.
fn merge_files(spill: &mut SpillDir, group: &[PathBuf]) -> Result<PathBuf, SourceError> {
    let runs = group.iter().cloned().map(Run::open).collect::<Result<Vec<_>, _>>()?;
    let mut merge = Merge::new(runs)?;
    let (path, mut out) = spill.create("run")?;
    while let Some(at) = merge.pop() {
        let run = &mut merge.runs[at];
        write_frame(&mut out, run.frame()).map_err(|e| SourceError::io("write", &path, e))?;
        merge.advance(at).map_err(|(p, e)| SourceError::io("read", &p, e))?;
    }
    out.flush().map_err(|e| SourceError::io("write", &path, e))?;
    for p in group {
        // Best effort: the directory goes when the source is dropped anyway.
        let _ = std::fs::remove_file(p);
    }
    Ok(path)
}

/// One sorted run being read.
enum Run {
    /// A spilled run and its current frame.
    File {
        path: PathBuf,
        reader: BufReader<File>,
        frame: Vec<u8>,
    },
    /// The in-memory run; `next` is the index after the current frame.
    Mem {
        bytes: Vec<u8>,
        order: Vec<(Millis, usize)>,
        next: usize,
    },
}

impl Run {
    fn open(path: PathBuf) -> Result<Run, SourceError> {
        let file = File::open(&path).map_err(|e| SourceError::io("open", &path, e))?;
        Ok(Run::File {
            path,
            reader: BufReader::with_capacity(RUN_BUFFER, file),
            frame: Vec::new(),
        })
    }

    /// Moves to the next frame: its timestamp, or `None` at the end of the run.
    fn advance(&mut self) -> io::Result<Option<Millis>> {
        match self {
            Run::Mem { order, next, .. } => {
                let ts = order.get(*next).map(|&(ts, _)| ts);
                *next += 1;
                Ok(ts)
            }
            Run::File { reader, frame, .. } => {
                if !read_frame(reader, frame)? {
                    return Ok(None);
                }
                let ts = frame
                    .first_chunk::<8>()
                    .map(|b| i64::from_le_bytes(*b))
                    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "run frame too short"))?;
                Ok(Some(ts))
            }
        }
    }

    /// The current frame's content (timestamp and payload).
    fn frame(&self) -> &[u8] {
        match self {
            Run::Mem { bytes, order, next } => next
                .checked_sub(1)
                .and_then(|i| order.get(i))
                .and_then(|&(_, at)| frame_at(bytes, at))
                .unwrap_or_default(),
            Run::File { frame, .. } => frame,
        }
    }

    fn path(&self) -> PathBuf {
        match self {
            Run::File { path, .. } => path.clone(),
            Run::Mem { .. } => PathBuf::from("<memory>"),
        }
    }
}

/// Reads one frame into `frame`; `false` at a clean end of the run.
fn read_frame(reader: &mut BufReader<File>, frame: &mut Vec<u8>) -> io::Result<bool> {
    let mut len = 0u64;
    for i in 0..10 {
        let mut byte = [0u8];
        if reader.read(&mut byte)? == 0 {
            if i == 0 {
                return Ok(false);
            }
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "run ends inside a frame"));
        }
        len |= u64::from(byte[0] & 0x7f) << (7 * i);
        if byte[0] & 0x80 == 0 {
            let len = usize::try_from(len).map_err(io::Error::other)?;
            frame.resize(len, 0);
            reader.read_exact(frame)?;
            return Ok(true);
        }
    }
    Err(io::Error::new(io::ErrorKind::InvalidData, "bad frame length"))
}

/// The lazy k-way merge of sorted runs by `(timestamp, run index)`.
pub(super) struct Merge {
    runs: Vec<Run>,
    heap: BinaryHeap<Reverse<(Millis, usize)>>,
    /// A read error met after the current entry, reported next.
    failed: Option<DeadLetter>,
}

impl Merge {
    fn new(mut runs: Vec<Run>) -> Result<Merge, SourceError> {
        let mut heap = BinaryHeap::with_capacity(runs.len());
        for (i, run) in runs.iter_mut().enumerate() {
            let head = run.advance().map_err(|e| SourceError::io("read", &run.path(), e))?;
            if let Some(ts) = head {
                heap.push(Reverse((ts, i)));
            }
        }
        Ok(Merge {
            runs,
            heap,
            failed: None,
        })
    }

    /// The run holding the smallest current frame.
    fn pop(&mut self) -> Option<usize> {
        self.heap.pop().map(|Reverse((_, i))| i)
    }

    /// Moves run `i` past its current frame.
    fn advance(&mut self, i: usize) -> Result<(), (PathBuf, io::Error)> {
        let Some(run) = self.runs.get_mut(i) else {
            return Ok(());
        };
        match run.advance() {
            Ok(Some(ts)) => {
                self.heap.push(Reverse((ts, i)));
                Ok(())
            }
            Ok(None) => {
                // Free the run's memory as soon as it is done.
                *run = Run::Mem {
                    bytes: Vec::new(),
                    order: Vec::new(),
                    next: 0,
                };
                Ok(())
            }
            Err(e) => Err((run.path(), e)),
        }
    }

    /// The next entry in `(timestamp, sequence)` order, or a dead letter for a spill file that
    /// could not be read back (the rest of that run is lost).
    pub fn next_entry(&mut self) -> Option<Result<Entry, DeadLetter>> {
        if let Some(d) = self.failed.take() {
            return Some(Err(d));
        }
        let i = self.pop()?;
        let run = self.runs.get(i)?;
        let decoded = Entry::decode(run.frame()).ok_or_else(|| {
            DeadLetter::new(
                run.path().display(),
                "spill read error: corrupt frame (the rest of this run is lost)",
                "",
            )
        });
        if decoded.is_err() {
            return Some(decoded);
        }
        if let Err((path, e)) = self.advance(i) {
            let reason = format!("spill read error: {} (the rest of this run is lost)", io_reason(&e));
            self.failed = Some(DeadLetter::new(path.display(), reason, ""));
        }
        Some(decoded)
    }

    /// Runs being merged (spilled ones and the in-memory one).
    pub fn runs(&self) -> usize {
        self.runs.len()
    }
}

/// Dead letters in the order found: at most a given number in memory, older ones in a
/// JSON-lines spill file.
#[derive(Default)]
pub(super) struct DeadSink {
    mem: Vec<DeadLetter>,
    file: Option<(PathBuf, BufWriter<File>)>,
    count: u64,
    cap: usize,
}

impl DeadSink {
    /// Keeps at most `cap` dead letters in memory.
    pub fn new(cap: usize) -> Self {
        DeadSink {
            cap: cap.max(1),
            ..DeadSink::default()
        }
    }

    /// Adds a dead letter, moving the buffered ones to the spill file when the buffer is full.
    pub fn push(&mut self, spill: &mut SpillDir, d: DeadLetter) -> Result<(), SourceError> {
        if self.mem.len() >= self.cap {
            if self.file.is_none() {
                self.file = Some(spill.create("dead")?);
            }
            if let Some((path, out)) = &mut self.file {
                let mut write = || -> io::Result<()> {
                    for d in self.mem.drain(..) {
                        serde_json::to_writer(&mut *out, &d)?;
                        out.write_all(b"\n")?;
                    }
                    Ok(())
                };
                write().map_err(|e| SourceError::io("write", path, e))?;
            }
        }
        self.mem.push(d);
        self.count += 1;
        Ok(())
    }

    /// Dead letters pushed so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The reader of everything pushed, in order.
    pub fn finish(self) -> Result<DeadLetters, SourceError> {
        let file = match self.file {
            Some((path, out)) => {
                let file = out
                    .into_inner()
                    .map_err(|e| SourceError::io("write", &path, e.into_error()))?;
                drop(file);
                let file = File::open(&path).map_err(|e| SourceError::io("open", &path, e))?;
                Some((path, BufReader::with_capacity(RUN_BUFFER, file)))
            }
            None => None,
        };
        Ok(DeadLetters {
            file,
            mem: self.mem.into_iter(),
            line: String::new(),
        })
    }
}

/// Reads back the dead letters of a [`DeadSink`].
pub(super) struct DeadLetters {
    file: Option<(PathBuf, BufReader<File>)>,
    mem: std::vec::IntoIter<DeadLetter>,
    line: String,
}

impl Iterator for DeadLetters {
    type Item = DeadLetter;

    fn next(&mut self) -> Option<DeadLetter> {
        if let Some((path, reader)) = &mut self.file {
            self.line.clear();
            let read = reader.read_line(&mut self.line).map_err(|e| io_reason(&e));
            let parsed = match read {
                Ok(0) => None,
                Ok(_) => Some(serde_json::from_str::<DeadLetter>(&self.line).map_err(|e| e.to_string())),
                Err(e) => Some(Err(e)),
            };
            match parsed {
                Some(Ok(d)) => return Some(d),
                Some(Err(e)) => {
                    let d = DeadLetter::new(path.display(), format!("spill read error: {e}"), "");
                    self.file = None;
                    return Some(d);
                }
                None => self.file = None,
            }
        }
        self.mem.next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tvl(ts: Millis, line: u64) -> Entry {
        Entry {
            ts,
            file: 7,
            line,
            body: Body::Tvl(TvlUpdate {
                protocol_id: "2269".into(),
                timestamp: ts,
                chains: vec![("ethereum".into(), 1.5), ("é".into(), 0.0)],
                extra: vec![("staking".into(), f64::MAX)],
            }),
        }
    }

    #[test]
    fn frames_round_trip() {
        let entries = [
            tvl(-5, 1 << 40),
            Entry {
                ts: 1_717_430_400_123,
                file: 0,
                line: 3,
                body: Body::Price(Price {
                    coin: 300,
                    price: Some(3791.12),
                    symbol: Some(u32::MAX),
                    confidence: Some(0.99),
                    decimals: Some(18),
                    redirect: None,
                }),
            },
            Entry {
                ts: 0,
                file: u32::MAX,
                line: 0,
                body: Body::Price(Price {
                    coin: 0,
                    price: None,
                    symbol: None,
                    confidence: None,
                    decimals: None,
                    redirect: Some(1),
                }),
            },
        ];
        let (mut scratch, mut bytes) = (Vec::new(), Vec::new());
        for e in &entries {
            bytes.clear();
            e.encode(&mut scratch, &mut bytes);
            let frame = frame_at(&bytes, 0).unwrap();
            assert_eq!(frame.len() + 1, bytes.len());
            assert_eq!(Entry::decode(frame).as_ref(), Some(e));
            // Truncated or padded frames are rejected.
            assert_eq!(Entry::decode(&frame[..frame.len() - 1]), None);
            let mut long = frame.to_vec();
            long.push(0);
            assert_eq!(Entry::decode(&long), None);
        }
        let mut v = Vec::new();
        put_varint(&mut v, u64::MAX);
        assert_eq!(read_varint(&v), Some((u64::MAX, 10)));
        assert_eq!(read_varint(&[0x80, 0x80]), None);
    }

    /// Writes `entries` as one run file.
    fn run_file(dir: &Path, name: &str, entries: &[Entry]) -> PathBuf {
        let (mut scratch, mut bytes) = (Vec::new(), Vec::new());
        for e in entries {
            e.encode(&mut scratch, &mut bytes);
        }
        let path = dir.join(name);
        std::fs::write(&path, &bytes).unwrap();
        path
    }

    #[test]
    fn merge_orders_by_timestamp_then_run() {
        let tmp = tempfile::tempdir().unwrap();
        let a = run_file(tmp.path(), "a", &[tvl(1, 1), tvl(3, 2), tvl(3, 3)]);
        let b = run_file(tmp.path(), "b", &[tvl(0, 4), tvl(3, 5)]);
        let (mut scratch, mut bytes) = (Vec::new(), Vec::new());
        tvl(3, 6).encode(&mut scratch, &mut bytes);
        let mem = Run::Mem {
            bytes,
            order: vec![(3, 0)],
            next: 0,
        };
        let mut merge = Merge::new(vec![Run::open(a).unwrap(), Run::open(b).unwrap(), mem]).unwrap();
        let lines: Vec<u64> = std::iter::from_fn(|| merge.next_entry())
            .map(|e| e.unwrap().line)
            .collect();
        assert_eq!(lines, [4, 1, 2, 3, 5, 6]);
    }

    #[test]
    fn damaged_run_files_are_dead_letters() {
        let tmp = tempfile::tempdir().unwrap();
        // Cut inside the second frame.
        let cut = run_file(tmp.path(), "cut", &[tvl(1, 1), tvl(2, 2)]);
        let bytes = std::fs::read(&cut).unwrap();
        std::fs::write(&cut, &bytes[..bytes.len() - 3]).unwrap();
        // A frame that does not decode.
        let bad = tmp.path().join("bad");
        std::fs::write(&bad, [9, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        let good = run_file(tmp.path(), "good", &[tvl(0, 10), tvl(5, 11)]);
        let runs = vec![
            Run::open(cut).unwrap(),
            Run::open(bad).unwrap(),
            Run::open(good).unwrap(),
        ];
        let mut merge = Merge::new(runs).unwrap();
        let got: Vec<String> = std::iter::from_fn(|| merge.next_entry())
            .map(|r| match r {
                Ok(e) => format!("line {}", e.line),
                Err(d) => format!(
                    "{} {}",
                    Path::new(&d.source).file_name().unwrap().to_string_lossy(),
                    d.reason
                ),
            })
            .collect();
        assert_eq!(
            got,
            [
                "line 10",
                "line 1",
                "cut spill read error: failed to fill whole buffer (the rest of this run is lost)",
                "bad spill read error: corrupt frame (the rest of this run is lost)",
                "line 11",
            ]
        );
    }

    #[test]
    fn dead_letters_spill_in_order() {
        let mut spill = SpillDir::new(None);
        let mut sink = DeadSink::new(2);
        for i in 0..7 {
            sink.push(&mut spill, DeadLetter::new(format!("f:{i}"), "bad", "{\"x\":\n1}"))
                .unwrap();
        }
        assert_eq!((sink.count(), spill.files()), (7, 1));
        let got: Vec<String> = sink.finish().unwrap().map(|d| d.source).collect();
        assert_eq!(got, ["f:0", "f:1", "f:2", "f:3", "f:4", "f:5", "f:6"]);
    }
}
