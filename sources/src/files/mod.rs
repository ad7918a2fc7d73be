//! JSONL files (optionally `.gz`) holding records of one kind (SPEC §1).
//!
//! Each non-blank line is parsed and validated with [`schemas::parse_record`]; a line that
//! fails goes to the dead-letter output as `<path>:<line>` and reading continues. An I/O
//! error mid-file (e.g. a corrupt gzip stream) yields one dead letter and ends the file.

use std::io::BufRead;
use std::path::Path;
use std::sync::Arc;

use schemas::{DeadLetter, Kind, SourcePos, parse_record};

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
        source: Arc::from(format!("{}:", path.display())),
        line: 0,
        buf: Vec::new(),
        done: false,
    })
}

/// The records of one JSONL file, in file order; see [`open`].
pub struct FileSource {
    reader: Box<dyn BufRead + Send>,
    kind: Kind,
    max_line: usize,
    source: Arc<str>,
    line: u64,
    buf: Vec<u8>,
    done: bool,
}

impl FileSource {
    /// The record kind this file holds.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Lines read so far (including blank and invalid ones).
    pub fn lines_read(&self) -> u64 {
        self.line
    }
}

impl Iterator for FileSource {
    type Item = Input;

    fn next(&mut self) -> Option<Input> {
        while !self.done {
            let pos = SourcePos::new(self.source.clone(), self.line + 1);
            let text = match read_line(&mut *self.reader, &mut self.buf, self.max_line) {
                Line::Eof => break,
                Line::Err(e) => {
                    self.done = true;
                    let raw = String::from_utf8_lossy(&self.buf);
                    return Some(Input::Dead(DeadLetter::new(
                        pos,
                        format!("read error: {}", io_reason(&e)),
                        &raw,
                    )));
                }
                Line::TooLong(bytes) => {
                    self.line += 1;
                    let raw = String::from_utf8_lossy(&self.buf);
                    return Some(Input::Dead(DeadLetter::new(
                        pos,
                        too_long_reason(bytes, self.max_line),
                        &raw,
                    )));
                }
                Line::Text(text) => text,
            };
            self.line += 1;
            let line = match text {
                Ok(line) if self.line == 1 => line.strip_prefix('\u{feff}').unwrap_or(line),
                Ok(line) => line,
                Err(e) => {
                    let raw = String::from_utf8_lossy(&self.buf);
                    return Some(Input::Dead(DeadLetter::new(pos, format!("invalid UTF-8: {e}"), &raw)));
                }
            };
            if line.trim().is_empty() {
                continue;
            }
            return Some(match parse_record(self.kind, line) {
                Ok(record) => Input::Record(pos, record),
                Err(e) => Input::Dead(DeadLetter::new(pos, e.0, line)),
            });
        }
        self.done = true;
        None
    }
}
