//! llamaflow sources: where input records come from.
//!
//! - [`files`]: JSONL (or `.jsonl.gz`) files of one record kind (SPEC §1).
//! - [`dynamodb_export`]: DynamoDB export-to-S3 trees of DeFiLlama's `prod-table` /
//!   `prod-coins-table`, taken as history in timestamp order.
//! - [`demo`]: the bundled, deterministic DeFiLlama-shaped sample feed of `llamaflow run`.
//! - [`postgres_cdc`]: `alert_rules`, `protocols` and `api_keys` changes from a logical
//!   replication slot (wal2json), as [`live::LiveItem`]s acknowledged by LSN.
//!
//! Every source yields [`Input`]: a validated record with its position, or a dead letter.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use schemas::{DeadLetter, Record, SourcePos};

pub mod demo;
pub mod dynamodb_export;
pub mod files;
pub mod kafka;
pub mod live;
pub mod postgres_cdc;

/// One item of any source: a validated record, or an input that goes to the dead-letter output.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// A validated record and where it came from.
    Record(SourcePos, Record),
    /// A rejected input.
    Dead(DeadLetter),
}

/// Why a source could not be opened: names the file and what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A file or directory could not be opened or read.
    #[error("cannot {action} {}: {}", path.display(), io_reason(source))]
    Io {
        /// What was being done (`open`, `read`, `list`).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The content or layout is not what the source expects.
    #[error("{}: {reason}", path.display())]
    Invalid {
        /// The offending file or directory.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
}

impl SourceError {
    pub(crate) fn io(action: &'static str, path: &Path, source: io::Error) -> Self {
        SourceError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn invalid(path: &Path, reason: impl Into<String>) -> Self {
        SourceError::Invalid {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// An I/O error's message without the `(os error N)` suffix.
pub(crate) fn io_reason(e: &io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) if s.ends_with(')') => s[..i].to_string(),
        _ => s,
    }
}

/// Opens a file for line reading, gunzipping it when its name ends in `.gz`.
pub(crate) fn open_lines(path: &Path) -> Result<Box<dyn BufRead + Send>, SourceError> {
    let file = File::open(path).map_err(|e| SourceError::io("open", path, e))?;
    if file.metadata().is_ok_and(|m| m.is_dir()) {
        return Err(SourceError::invalid(path, "is a directory, not a JSONL file"));
    }
    let gz = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gz"));
    Ok(if gz {
        Box::new(BufReader::with_capacity(
            64 * 1024,
            MultiGzDecoder::new(BufReader::new(file)),
        ))
    } else {
        Box::new(BufReader::with_capacity(64 * 1024, file))
    })
}

/// One line read from a [`BufRead`] into a reused buffer.
pub(crate) enum Line<'a> {
    /// A line (without its `\n` / `\r\n`), or the bytes that are not UTF-8.
    Text(Result<&'a str, std::str::Utf8Error>),
    /// End of input.
    Eof,
    /// An I/O error (e.g. a corrupt gzip stream); the partial line is in the buffer.
    Err(io::Error),
    /// A line longer than the limit (its length in bytes): skipped, its first bytes up to
    /// the limit are in the buffer.
    TooLong(u64),
}

/// Default longest input line, in bytes (`[sources] max_line_bytes`, `--max-line-bytes`): a
/// longer one (say, a 1 GiB line in a 1 MB gzip file) is skipped as a dead letter instead of
/// being held in memory.
pub const DEFAULT_MAX_LINE_BYTES: usize = 1 << 20;

/// The dead-letter reason of a line of `bytes` bytes over the limit of `max` bytes.
pub(crate) fn too_long_reason(bytes: u64, max: usize) -> String {
    format!("line of {bytes} bytes is longer than the limit of {max} bytes (max_line_bytes): skipped")
}

/// Reads the next line into `buf` (cleared first), holding at most `max` bytes of it.
pub(crate) fn read_line<'a>(reader: &mut dyn BufRead, buf: &'a mut Vec<u8>, max: usize) -> Line<'a> {
    buf.clear();
    // Bytes of the line (without its line end), whether it ended with `\n`, and whether a `\r`
    // stood before that `\n`.
    let (mut content, mut ended, mut cr) = (0u64, false, false);
    let mut last: Option<u8> = None;
    let mut any = false;
    while !ended {
        let chunk = match reader.fill_buf() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Line::Err(e),
        };
        if chunk.is_empty() {
            break;
        }
        any = true;
        let (body, consumed) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => {
                ended = true;
                cr = if i > 0 {
                    chunk[i - 1] == b'\r'
                } else {
                    last == Some(b'\r')
                };
                (i, i + 1)
            }
            None => (chunk.len(), chunk.len()),
        };
        if body > 0 {
            last = Some(chunk[body - 1]);
        }
        let room = max.saturating_add(1).saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..body.min(room)]);
        content += body as u64;
        reader.consume(consumed);
    }
    if !any {
        return Line::Eof;
    }
    if cr {
        content -= 1;
    }
    if content > max as u64 {
        buf.truncate(max);
        metrics::counter!("llamaflow_lines_too_long_total").increment(1);
        return Line::TooLong(content);
    }
    buf.truncate(content as usize);
    Line::Text(std::str::from_utf8(&buf[..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lines_are_skipped_with_bounded_memory() {
        let input = format!("{}\r\n{{\"ok\":1}}\n{}\nlast", "x".repeat(100), "y".repeat(40));
        let mut reader = io::BufReader::with_capacity(7, input.as_bytes());
        let mut buf = Vec::new();
        let max = 50;
        assert!(matches!(read_line(&mut reader, &mut buf, max), Line::TooLong(100)));
        assert_eq!(buf.len(), max, "only the limit is held");
        assert!(matches!(
            read_line(&mut reader, &mut buf, max),
            Line::Text(Ok("{\"ok\":1}"))
        ));
        let forty = "y".repeat(40);
        assert!(matches!(read_line(&mut reader, &mut buf, max), Line::Text(Ok(t)) if t == forty));
        assert!(matches!(read_line(&mut reader, &mut buf, max), Line::Text(Ok("last"))));
        assert!(matches!(read_line(&mut reader, &mut buf, max), Line::Eof));
        // Exactly the limit (with \r\n) is a line.
        let at = format!("{}\r\n", "z".repeat(max));
        let mut reader = io::BufReader::with_capacity(3, at.as_bytes());
        assert!(matches!(read_line(&mut reader, &mut buf, max), Line::Text(Ok(t)) if t.len() == max));
    }

    #[test]
    fn error_messages_name_the_file() {
        let e = open_lines(Path::new("no-such-dir/prices.jsonl"))
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("cannot open no-such-dir/prices.jsonl: No such file or directory")
        );
        let e = SourceError::invalid(Path::new("x/manifest-files.json"), "line 3: bad JSON");
        assert_eq!(e.to_string(), "x/manifest-files.json: line 3: bad JSON");
    }
}
