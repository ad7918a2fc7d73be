//! JSONL files (optionally `.gz`) holding records of one kind (SPEC §1).
//!
//! Each non-blank line is parsed and validated with [`schemas::parse_record`]; a line that
//! fails goes to the dead-letter output as `<path>:<line>` and reading continues. An I/O
//! error mid-file (e.g. a corrupt gzip stream) yields one dead letter and ends the file.

use std::io::BufRead;
use std::path::Path;

use schemas::{DeadLetter, Kind, SourceName, SourcePos, parse_record};

use crate::{Input, Line, SourceError, io_reason, open_lines, read_line, too_long_reason};

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
        buf: Vec::new(),
        done: false,
        parsed: Vec::new().into_iter(),
    })
}

/// Most lines in one block of [`FileSource::read_lines`].
pub const BLOCK_LINES: usize = 1024;
/// A block of [`FileSource::read_lines`] ends after the line that brings its text to this
/// many bytes (a block holds at most this plus one line of at most `max_line_bytes`).
pub const BLOCK_BYTES: usize = 1 << 20;

/// The records of one JSONL file, in file order; see [`open`].
pub struct FileSource {
    reader: Box<dyn BufRead + Send>,
    kind: Kind,
    max_line: usize,
    source: SourceName,
    line: u64,
    buf: Vec<u8>,
    done: bool,
    /// The rest of the block being handed out by [`Iterator::next`].
    parsed: std::vec::IntoIter<Input>,
}

/// Lines of a file read but not yet parsed, in file order: what [`FileSource::read_lines`]
/// splits off, for [`Lines::parse`] on any thread (so one file's parsing can be spread over
/// cores). Lines that fail before parsing (read errors, over-long lines, invalid UTF-8) are
/// already dead letters here, in their place.
pub struct Lines {
    kind: Kind,
    source: SourceName,
    text: String,
    items: Vec<Unparsed>,
}

/// One item of [`Lines`].
enum Unparsed {
    /// Line number `no`, at `text[range]`.
    Text(u64, std::ops::Range<usize>),
    Dead(DeadLetter),
}

impl Lines {
    /// Parses every line: records, or dead letters saying why, with their positions.
    pub fn parse(self) -> Vec<Input> {
        let Lines {
            kind,
            source,
            text,
            items,
        } = self;
        items
            .into_iter()
            .map(|item| match item {
                Unparsed::Dead(d) => Input::Dead(d),
                Unparsed::Text(no, range) => {
                    let (pos, line) = (SourcePos::new(source, no), &text[range]);
                    match parse_record(kind, line) {
                        Ok(record) => Input::Record(pos, record),
                        Err(e) => Input::Dead(DeadLetter::new(pos, e.0, line)),
                    }
                }
            })
            .collect()
    }

    /// Lines (and dead letters) held.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

impl FileSource {
    /// The position of the next line.
    fn here(&self) -> SourcePos {
        SourcePos::new(self.source, self.line + 1)
    }

    /// The record kind this file holds.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Reads the next block of lines ([`BLOCK_LINES`], [`BLOCK_BYTES`]) without parsing
    /// them; `None` at the end of the file. Blank lines are skipped; an I/O error ends the
    /// file with one dead letter.
    pub fn read_lines(&mut self) -> Option<Lines> {
        let mut out = Lines {
            kind: self.kind,
            source: self.source,
            text: String::new(),
            items: Vec::new(),
        };
        while !self.done && out.items.len() < BLOCK_LINES && out.text.len() < BLOCK_BYTES {
            let text = match read_line(&mut *self.reader, &mut self.buf, self.max_line) {
                Line::Eof => {
                    self.done = true;
                    break;
                }
                Line::Err(e) => {
                    let raw = String::from_utf8_lossy(&self.buf);
                    let reason = format!("read error: {}", io_reason(&e));
                    out.items
                        .push(Unparsed::Dead(DeadLetter::new(self.here(), reason, &raw)));
                    self.done = true;
                    break;
                }
                Line::TooLong(bytes) => {
                    let raw = String::from_utf8_lossy(&self.buf);
                    let reason = too_long_reason(bytes, self.max_line);
                    out.items
                        .push(Unparsed::Dead(DeadLetter::new(self.here(), reason, &raw)));
                    self.line += 1;
                    continue;
                }
                Line::Text(text) => text,
            };
            let line = match text {
                Ok(line) if self.line == 0 => line.strip_prefix('\u{feff}').unwrap_or(line),
                Ok(line) => line,
                Err(e) => {
                    let raw = String::from_utf8_lossy(&self.buf);
                    let dead = DeadLetter::new(self.here(), format!("invalid UTF-8: {e}"), &raw);
                    out.items.push(Unparsed::Dead(dead));
                    self.line += 1;
                    continue;
                }
            };
            self.line += 1;
            if line.trim().is_empty() {
                continue;
            }
            let start = out.text.len();
            out.text.push_str(line);
            out.items.push(Unparsed::Text(self.line, start..out.text.len()));
        }
        (!out.items.is_empty()).then_some(out)
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
