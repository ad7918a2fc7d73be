//! Tailing a growing JSONL file as a live source, like `tail -F`.
//!
//! [`follow`] emits each complete line of the file as a [`LiveItem`] at `<path>:<line>`,
//! acknowledged by [`Ack::File`] with the byte offset just past the line, so a restart can
//! resume at a committed offset. A last line without its newline waits until the newline
//! arrives; blank lines are skipped (their bytes are covered by the next line's offset);
//! lines that fail validation (and invalid UTF-8) become [`Change::Dead`], as does a line
//! longer than `max_line_bytes` (at once, with [`Ack::None`]; its bytes are skipped).
//!
//! The file is polled: at its end, [`follow`] sleeps for the poll interval and reads again.
//! - **Truncation** (the file is shorter than what was read): reading restarts at offset 0
//!   (logged).
//! - **Rotation** (the path names another file, e.g. after `mv file file.1` and a new
//!   `file`): the old file is read to its end, then the new one from offset 0 (logged). An
//!   unterminated last line of the old file is taken as complete then, with [`Ack::None`]
//!   (its offset would mean nothing in the new file). While the path names no file, the old
//!   one is still read.
//! - A path that does not exist (yet) is waited for.
//!
//! Rotation is recognised by device and inode number, so only on Unix; elsewhere only
//! truncation is.

use std::io::{self, SeekFrom};
use std::path::PathBuf;
use std::time::Duration;

use schemas::{DeadLetter, Kind, SourceName, SourcePos, parse_record};
use tokio::fs::File;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::{mpsc, watch};

use crate::SourceError;
use crate::live::{Ack, Change, LiveItem};

#[cfg(test)]
mod tests;

/// Read size.
const CHUNK: usize = 64 * 1024;

/// Shortest poll interval (a zero interval would spin).
const MIN_POLL: Duration = Duration::from_millis(1);

/// Tails the JSONL file at `path` (records of `kind`), starting at byte `start_offset` (a
/// committed [`Ack::File`] offset, or 0), and sends every line to `tx` until `stop` turns
/// `true` (or its sender is dropped) or the receiver of `tx` is dropped; see the
/// [module docs](self).
///
/// A `start_offset` beyond the end of the file, or not just past a newline, means the file
/// was replaced: reading starts at 0 (logged). Line numbers count from the start of the
/// file, also when resuming. A line longer than `max_line_bytes` is one dead letter. Errors: the file cannot be opened (other than not existing) or
/// read.
pub async fn follow(
    path: impl Into<PathBuf>,
    kind: Kind,
    start_offset: u64,
    poll: Duration,
    max_line_bytes: usize,
    tx: mpsc::Sender<LiveItem>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), SourceError> {
    let path = path.into();
    let poll = poll.max(MIN_POLL);
    let mut tail = Tail {
        source: SourceName::from(format!("{}:", path.display())),
        ack_path: path.display().to_string(),
        path,
        kind,
        max_line: max_line_bytes,
        file: None,
        id: None,
        offset: 0,
        line: 0,
        pending: Vec::new(),
        skipping: None,
        buf: vec![0; CHUNK],
        tx,
    };
    let mut resume = start_offset;
    let mut waiting_logged = false;
    loop {
        if *stop.borrow() || tail.tx.is_closed() {
            return Ok(());
        }
        if tail.file.is_none() {
            if tail.open(resume).await? {
                resume = 0;
            } else {
                if !waiting_logged {
                    tracing::info!(path = %tail.path.display(), "waiting for the file to appear");
                    waiting_logged = true;
                }
                if wait(poll, &mut stop).await == Flow::Stop {
                    return Ok(());
                }
                continue;
            }
        }
        if tail.read_available(&mut stop).await? == Flow::Stop {
            return Ok(());
        }
        match tail.check().await? {
            State::Same => {
                if wait(poll, &mut stop).await == Flow::Stop {
                    return Ok(());
                }
            }
            State::Truncated(len) => {
                tracing::warn!(path = %tail.path.display(), size = len, read = tail.read_pos(),
                    "file truncated; reading it again from the start");
                tail.rewind().await?;
            }
            State::Rotated => {
                // Lines written to the old file before the switch are still read.
                if tail.read_available(&mut stop).await? == Flow::Stop || tail.finish_old(&mut stop).await == Flow::Stop
                {
                    return Ok(());
                }
                tracing::info!(path = %tail.path.display(), "file rotated; following the new file from the start");
                tail.file = None;
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Go,
    Stop,
}

/// What the path is, compared with the open file.
enum State {
    /// Still the same file, not shorter than what was read.
    Same,
    /// The same file, now this many bytes long: shorter than what was read.
    Truncated(u64),
    /// The path names another file.
    Rotated,
}

/// Resolves when `stop` turns `true` or its sender is dropped.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Sleeps for `poll`, unless stopped first.
async fn wait(poll: Duration, stop: &mut watch::Receiver<bool>) -> Flow {
    tokio::select! {
        _ = tokio::time::sleep(poll) => Flow::Go,
        _ = stopped(stop) => Flow::Stop,
    }
}

/// Device and inode number: what identifies a file across renames.
#[cfg(unix)]
fn file_id(meta: &std::fs::Metadata) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    Some((meta.dev(), meta.ino()))
}

/// Not available here: rotation is not recognised.
#[cfg(not(unix))]
fn file_id(_meta: &std::fs::Metadata) -> Option<(u64, u64)> {
    None
}

struct Tail {
    path: PathBuf,
    kind: Kind,
    /// Longest line kept: a longer one is one dead letter (with its first 4 KiB) and is
    /// skipped up to its newline, so a file without newlines cannot exhaust memory.
    max_line: usize,
    /// `"<path>:"`.
    source: SourceName,
    /// The path as configured, for acks.
    ack_path: String,
    file: Option<File>,
    id: Option<(u64, u64)>,
    /// Byte offset just past the last complete line.
    offset: u64,
    /// Lines (complete, including blank ones) before `offset`.
    line: u64,
    /// Bytes read after `offset`: the start of a line whose newline has not arrived.
    pending: Vec<u8>,
    /// Bytes after `offset` of an over-long line being skipped (`pending` is then empty).
    skipping: Option<u64>,
    buf: Vec<u8>,
    tx: mpsc::Sender<LiveItem>,
}

impl Tail {
    fn io(&self, action: &'static str, e: io::Error) -> SourceError {
        SourceError::io(action, &self.path, e)
    }

    /// Bytes of the file consumed so far.
    fn read_pos(&self) -> u64 {
        self.offset + self.skipping.unwrap_or(0) + self.pending.len() as u64
    }

    /// Opens the file at `resume` (see [`follow`]); `false` when it does not exist.
    async fn open(&mut self, resume: u64) -> Result<bool, SourceError> {
        let mut file = match File::open(&self.path).await {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(self.io("open", e)),
        };
        let meta = file.metadata().await.map_err(|e| self.io("open", e))?;
        self.id = file_id(&meta);
        self.offset = 0;
        self.line = 0;
        self.pending.clear();
        self.skipping = None;
        if resume > 0 {
            if resume > meta.len() {
                tracing::warn!(path = %self.path.display(), offset = resume, size = meta.len(),
                    "file is shorter than the start offset (replaced?); reading it from the start");
            } else {
                let (lines, ends_line) = self.count_lines(&mut file, resume).await?;
                if ends_line {
                    self.offset = resume;
                    self.line = lines;
                } else {
                    tracing::warn!(path = %self.path.display(), offset = resume,
                        "start offset is not just past a newline (replaced file?); reading it from the start");
                }
            }
        }
        file.seek(SeekFrom::Start(self.offset))
            .await
            .map_err(|e| self.io("seek in", e))?;
        self.file = Some(file);
        Ok(true)
    }

    /// Newlines among the first `len` bytes, and whether byte `len - 1` is one (`false` when
    /// fewer bytes could be read).
    async fn count_lines(&mut self, file: &mut File, len: u64) -> Result<(u64, bool), SourceError> {
        let (mut left, mut lines, mut last) = (len, 0u64, 0u8);
        while left > 0 {
            let want = usize::try_from(left).unwrap_or(usize::MAX).min(self.buf.len());
            let n = match file.read(&mut self.buf[..want]).await {
                Ok(0) => return Ok((lines, false)),
                Ok(n) => n,
                Err(e) => return Err(self.io("read", e)),
            };
            let chunk = &self.buf[..n];
            lines += chunk.iter().filter(|&&b| b == b'\n').count() as u64;
            last = chunk[n - 1];
            left -= n as u64;
        }
        Ok((lines, last == b'\n'))
    }

    /// Reads to the current end of the file, sending every complete line.
    async fn read_available(&mut self, stop: &mut watch::Receiver<bool>) -> Result<Flow, SourceError> {
        let Some(mut file) = self.file.take() else {
            return Ok(Flow::Go);
        };
        let result = self.read_file(&mut file, stop).await;
        self.file = Some(file);
        result
    }

    async fn read_file(&mut self, file: &mut File, stop: &mut watch::Receiver<bool>) -> Result<Flow, SourceError> {
        loop {
            let n = file.read(&mut self.buf).await.map_err(|e| self.io("read", e))?;
            if n == 0 {
                return Ok(Flow::Go);
            }
            let mut pending = std::mem::take(&mut self.pending);
            let scan_from = pending.len();
            pending.extend_from_slice(&self.buf[..n]);
            let mut start = 0;
            let mut from = scan_from;
            let mut flow = Flow::Go;
            while let Some(i) = pending[from..].iter().position(|&b| b == b'\n') {
                let end = from + i + 1;
                if let Some(skipped) = self.skipping.take() {
                    // The end of an over-long line, already dead-lettered.
                    self.offset += skipped + (end - start) as u64;
                    self.line += 1;
                    start = end;
                    from = end;
                    continue;
                }
                let line = &pending[start..end];
                self.offset += line.len() as u64;
                let ack = Ack::File {
                    path: self.ack_path.clone(),
                    offset: self.offset,
                };
                flow = self.emit(line, ack, stop).await;
                start = end;
                from = end;
                if flow == Flow::Stop {
                    break;
                }
            }
            pending.drain(..start);
            if flow == Flow::Go && (self.skipping.is_some() || pending.len() > self.max_line) {
                flow = self.skip_long_line(&pending, stop).await;
                pending.clear();
            }
            self.pending = pending;
            if flow == Flow::Stop {
                return Ok(Flow::Stop);
            }
        }
    }

    /// Skips `part` (no newline in it) of an over-long line, dead-lettering the line first.
    async fn skip_long_line(&mut self, part: &[u8], stop: &mut watch::Receiver<bool>) -> Flow {
        if let Some(skipped) = &mut self.skipping {
            *skipped += part.len() as u64;
            return Flow::Go;
        }
        self.skipping = Some(part.len() as u64);
        let pos = SourcePos::new(self.source, self.line + 1);
        let max = self.max_line;
        tracing::warn!(path = %self.path.display(), line = self.line + 1, "line longer than {max} bytes (max_line_bytes); skipping it");
        let head = String::from_utf8_lossy(&part[..part.len().min(4096)]);
        let reason = format!("line longer than the limit of {max} bytes (max_line_bytes): skipped");
        let change = Change::Dead(DeadLetter::new(&pos, reason, &head));
        self.send(
            LiveItem {
                pos,
                ack: Ack::None,
                change,
            },
            stop,
        )
        .await
    }

    /// Sends one line (with or without its newline); blank lines send nothing.
    async fn emit(&mut self, raw: &[u8], ack: Ack, stop: &mut watch::Receiver<bool>) -> Flow {
        self.line += 1;
        let pos = SourcePos::new(self.source, self.line);
        let mut text = raw.strip_suffix(b"\n").unwrap_or(raw);
        text = text.strip_suffix(b"\r").unwrap_or(text);
        let change = match std::str::from_utf8(text) {
            Err(e) => Change::Dead(DeadLetter::new(
                &pos,
                format!("invalid UTF-8: {e}"),
                &String::from_utf8_lossy(text),
            )),
            Ok(line) => {
                let line = if self.line == 1 {
                    line.strip_prefix('\u{feff}').unwrap_or(line)
                } else {
                    line
                };
                if line.trim().is_empty() {
                    return Flow::Go;
                }
                match parse_record(self.kind, line) {
                    Ok(record) => Change::Record(record),
                    Err(e) => Change::Dead(DeadLetter::new(&pos, e.0, line)),
                }
            }
        };
        self.send(LiveItem { pos, ack, change }, stop).await
    }

    /// Sends an item, unless stopped first or the receiver is gone.
    async fn send(&self, item: LiveItem, stop: &mut watch::Receiver<bool>) -> Flow {
        tokio::select! {
            sent = self.tx.send(item) => if sent.is_ok() { Flow::Go } else { Flow::Stop },
            _ = stopped(stop) => Flow::Stop,
        }
    }

    /// Compares the open file with what the path names now.
    async fn check(&mut self) -> Result<State, SourceError> {
        let Some(file) = &self.file else {
            return Ok(State::Same);
        };
        let len = file.metadata().await.map_err(|e| self.io("read", e))?.len();
        if len < self.read_pos() {
            return Ok(State::Truncated(len));
        }
        let Some(id) = self.id else {
            return Ok(State::Same);
        };
        Ok(match tokio::fs::metadata(&self.path).await {
            Ok(meta) if file_id(&meta) != Some(id) => State::Rotated,
            Ok(_) => State::Same,
            // Renamed away, no new file yet: keep reading the old one.
            Err(e) if e.kind() == io::ErrorKind::NotFound => State::Same,
            Err(e) => {
                tracing::debug!(path = %self.path.display(), error = %e, "cannot stat the followed path");
                State::Same
            }
        })
    }

    /// Restarts the open file at offset 0.
    async fn rewind(&mut self) -> Result<(), SourceError> {
        self.offset = 0;
        self.line = 0;
        self.pending.clear();
        self.skipping = None;
        if let Some(file) = &mut self.file {
            file.seek(SeekFrom::Start(0))
                .await
                .map_err(|e| SourceError::io("seek in", &self.path, e))?;
        }
        Ok(())
    }

    /// Takes an unterminated last line of a rotated-away file as complete (see the module docs).
    async fn finish_old(&mut self, stop: &mut watch::Receiver<bool>) -> Flow {
        if self.pending.is_empty() {
            return Flow::Go;
        }
        let pending = std::mem::take(&mut self.pending);
        tracing::warn!(path = %self.path.display(), line = self.line + 1,
            "rotated file ends without a newline; taking its last line as complete");
        self.emit(&pending, Ack::None, stop).await
    }
}
