//! JSONL files (optionally `.gz`) holding records of one kind (SPEC §1).
//!
//! Each non-blank line is parsed and validated with [`schemas::parse_record`]; a line that
//! fails goes to the dead-letter output as `<path>:<line>` and reading continues. An I/O
//! error mid-file (e.g. a corrupt gzip stream) yields one dead letter and ends the file.

use std::io::{BufRead, Read};
use std::path::Path;

use schemas::{DeadLetter, Kind, SourceName, SourcePos, parse_record};

use crate::{Input, SourceError, io_reason, open_lines, too_long_reason};

pub mod follow;

#[cfg(test)]
mod tests;

/// Opens a JSONL file (gunzipped when the name ends in `.gz`) of records of `kind`; a line
/// longer than `max_line_bytes` is a dead letter (see [`crate::DEFAULT_MAX_LINE_BYTES`]).
pub fn open(path: &Path, kind: Kind, max_line_bytes: usize) -> Result<FileSource, SourceError> {
    let reader = open_lines(path)?;
    Ok(FileSource {
        reader,
        kind,
        max_line: max_line_bytes,
        source: SourceName::from(format!("{}:", path.display())),
        line: 0,
        carry: Vec::new(),
        block_bytes: BLOCK_BYTES,
        done: false,
        parsed: Vec::new().into_iter(),
    })
}

/// The text a block of [`FileSource::read_lines`] is read in: the complete lines of about
/// this many bytes (more only to finish a line of at most `max_line_bytes`).
pub const BLOCK_BYTES: usize = 128 << 10;

/// The records of one JSONL file, in file order; see [`open`].
pub struct FileSource {
    reader: Box<dyn BufRead + Send>,
    kind: Kind,
    max_line: usize,
    source: SourceName,
    /// Lines split off so far.
    line: u64,
    /// The start of a line read with the last block, whose end was not read yet.
    carry: Vec<u8>,
    /// [`BLOCK_BYTES`], smaller in tests.
    block_bytes: usize,
    /// The reader is at its end (or failed).
    done: bool,
    /// The rest of the block being handed out by [`Iterator::next`].
    parsed: std::vec::IntoIter<Input>,
}

/// Lines of a file read but not yet parsed, in file order: what [`FileSource::read_lines`]
/// splits off, for [`Lines::parse`] on any thread (so one file's parsing can be spread over
/// cores). The text is held as read: lines that are not UTF-8, blank lines and the file's
/// byte order mark are told apart when parsed; lines that fail before (read errors,
/// over-long lines) are already dead letters here, in their place.
pub struct Lines {
    kind: Kind,
    source: SourceName,
    /// The number of the first line.
    first: u64,
    text: Vec<u8>,
    /// One item per line, numbered from `first`.
    items: Vec<Unparsed>,
}

/// One line of [`Lines`].
enum Unparsed {
    /// At `text[start..end]`, without its line end.
    Text(usize, usize),
    Dead(Box<DeadLetter>),
}

impl Lines {
    /// Parses every line: records, or dead letters saying why, with their positions. Blank
    /// lines are skipped.
    pub fn parse(self) -> Vec<Input> {
        let Lines {
            kind,
            source,
            first,
            text,
            items,
        } = self;
        // Nearly always the whole block is UTF-8: checked at once, then each line is a slice.
        let whole = std::str::from_utf8(&text).ok();
        let mut out = Vec::with_capacity(items.len());
        for (no, item) in (first..).zip(items) {
            let (start, end) = match item {
                Unparsed::Dead(d) => {
                    out.push(Input::Dead(*d));
                    continue;
                }
                Unparsed::Text(start, end) => (start, end),
            };
            let pos = SourcePos::new(source, no);
            // Line ends are ASCII, so a line of a UTF-8 block starts and ends on char boundaries.
            let line = match whole.and_then(|w| w.get(start..end)) {
                Some(line) => line,
                None => match std::str::from_utf8(&text[start..end]) {
                    Ok(line) => line,
                    Err(e) => {
                        let raw = String::from_utf8_lossy(&text[start..end]);
                        out.push(Input::Dead(DeadLetter::new(pos, format!("invalid UTF-8: {e}"), &raw)));
                        continue;
                    }
                },
            };
            let line = if no == 1 {
                line.strip_prefix('\u{feff}').unwrap_or(line)
            } else {
                line
            };
            if line.trim().is_empty() {
                continue;
            }
            out.push(match parse_record(kind, line) {
                Ok(record) => Input::Record(pos, record),
                Err(e) => Input::Dead(DeadLetter::new(pos, e.0, line)),
            });
        }
        out
    }

    /// Lines held (blank ones too).
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether no line is held.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Bytes of text held.
    pub fn text_len(&self) -> usize {
        self.text.len()
    }
}

/// Bytes asked of the reader at least, per read.
const READ_MIN: usize = 64 << 10;

impl FileSource {
    /// The position of the next line.
    fn here(&self) -> SourcePos {
        SourcePos::new(self.source, self.line + 1)
    }

    /// The record kind this file holds.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// A block size other than [`BLOCK_BYTES`] (tests).
    #[cfg(test)]
    pub(crate) fn with_block_bytes(mut self, bytes: usize) -> Self {
        self.block_bytes = bytes;
        self
    }

    /// Reads the next block of lines (the complete lines of about [`BLOCK_BYTES`] of text)
    /// without parsing them; `None` at the end of the file. The text is read into the
    /// block's own buffer and split there (no copy per line). An I/O error ends the file
    /// with one dead letter, for the line it cut.
    pub fn read_lines(&mut self) -> Option<Lines> {
        // The block that ends the file takes its last line along: nothing is carried then.
        if self.done {
            return None;
        }
        let mut text = Vec::with_capacity(self.block_bytes.max(self.carry.len() + READ_MIN));
        text.append(&mut self.carry);
        let mut items = Vec::new();
        let first = self.line + 1;
        // The start of the line being split, and how much of it is known to hold no `\n`.
        let (mut start, mut scanned) = (0usize, 0usize);
        let mut failed = None;
        loop {
            while let Some(i) = memchr::memchr(b'\n', &text[start + scanned..]) {
                let end = start + scanned + i;
                let cr = end > start && text[end - 1] == b'\r';
                items.push(self.line_item(&text, start, end - usize::from(cr)));
                (start, scanned) = (end + 1, 0);
            }
            scanned = text.len() - start;
            if failed.is_none() && scanned > self.max_line.saturating_add(1) {
                // Past the limit even without a `\r\n`: skipped up to its line end, never held.
                let rest = self.skip_line(&text[start..], &mut items);
                text.truncate(start);
                text.extend_from_slice(&rest);
                scanned = 0;
                continue;
            }
            if self.done || (text.len() >= self.block_bytes && !items.is_empty()) {
                break;
            }
            let want = (self.block_bytes.saturating_sub(text.len())).max(self.block_bytes.min(READ_MIN));
            text.reserve(want);
            match (&mut *self.reader).take(want as u64).read_to_end(&mut text) {
                Ok(n) if n < want => self.done = true,
                Ok(_) => {}
                // What was read before the error is in `text`: its complete lines are split
                // on the next round, then the line it cut is the dead letter.
                Err(e) => (self.done, failed) = (true, Some(e)),
            }
        }
        if let Some(e) = failed {
            let raw = String::from_utf8_lossy(
                &text[start..text.len().min(start.saturating_add(self.max_line).saturating_add(1))],
            );
            let reason = format!("read error: {}", io_reason(&e));
            items.push(Unparsed::Dead(Box::new(DeadLetter::new(self.here(), reason, &raw))));
            self.line += 1;
            start = text.len();
        } else if self.done && start < text.len() {
            // The last line, without a line end.
            items.push(self.line_item(&text, start, text.len()));
            start = text.len();
        }
        self.carry.extend_from_slice(&text[start..]);
        text.truncate(start);
        (!items.is_empty()).then_some(Lines {
            kind: self.kind,
            source: self.source,
            first,
            text,
            items,
        })
    }

    /// The item of the next line, at `text[start..end]` (without its line end).
    fn line_item(&mut self, text: &[u8], start: usize, end: usize) -> Unparsed {
        self.line += 1;
        if end - start > self.max_line {
            return self.too_long(&text[start..start + self.max_line], (end - start) as u64);
        }
        Unparsed::Text(start, end)
    }

    /// The dead letter of the line just counted, `bytes` long, which begins with `head`.
    fn too_long(&self, head: &[u8], bytes: u64) -> Unparsed {
        metrics::counter!("llamaflow_lines_too_long_total").increment(1);
        let reason = too_long_reason(bytes, self.max_line);
        let raw = String::from_utf8_lossy(head);
        Unparsed::Dead(Box::new(DeadLetter::new(
            SourcePos::new(self.source, self.line),
            reason,
            &raw,
        )))
    }

    /// Skips a line longer than the limit, which begins with `head` (more than the limit
    /// and a `\r`, no `\n`): reads on to its line end, holding none of it, and pushes its dead
    /// letter. Returns what was read after its line end.
    fn skip_line(&mut self, head: &[u8], items: &mut Vec<Unparsed>) -> Vec<u8> {
        let mut bytes = head.len() as u64;
        let mut last = head.last().copied();
        let mut buf = vec![0u8; READ_MIN];
        loop {
            let n = match self.reader.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.done = true;
                    let raw = String::from_utf8_lossy(&head[..self.max_line]);
                    let reason = format!("read error: {}", io_reason(&e));
                    items.push(Unparsed::Dead(Box::new(DeadLetter::new(self.here(), reason, &raw))));
                    self.line += 1;
                    return Vec::new();
                }
            };
            if n == 0 {
                // The file's last line, without a line end.
                self.done = true;
                self.line += 1;
                items.push(self.too_long(&head[..self.max_line], bytes));
                return Vec::new();
            }
            if let Some(i) = memchr::memchr(b'\n', &buf[..n]) {
                let cr = if i > 0 {
                    buf[i - 1] == b'\r'
                } else {
                    last == Some(b'\r')
                };
                self.line += 1;
                items.push(self.too_long(&head[..self.max_line], bytes + i as u64 - u64::from(cr)));
                return buf[i + 1..n].to_vec();
            }
            bytes += n as u64;
            last = Some(buf[n - 1]);
        }
    }
}

impl Iterator for FileSource {
    type Item = Input;

    fn next(&mut self) -> Option<Input> {
        loop {
            if let Some(item) = self.parsed.next() {
                return Some(item);
            }
            self.parsed = self.read_lines()?.parse().into_iter();
        }
    }
}
