//! Writes values as JSON lines: one document per line, flushed on [`JsonlWriter::finish`].

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

/// Why a JSONL file could not be written; names the file.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {path}: {source}")]
pub struct JsonlError {
    /// The file.
    pub path: PathBuf,
    /// The I/O error.
    #[source]
    pub source: io::Error,
}

/// Writes serializable values as JSON lines to a file (or to stderr).
pub struct JsonlWriter {
    path: PathBuf,
    out: BufWriter<Box<dyn Write + Send>>,
    written: u64,
    /// The file again, for fsync (files opened with [`JsonlWriter::append`]).
    file: Option<File>,
}

impl JsonlWriter {
    /// Creates (truncates) `path`.
    pub fn create(path: &Path) -> Result<Self, JsonlError> {
        let file = File::create(path).map_err(|source| JsonlError {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self::from_writer(path.to_path_buf(), Box::new(file)))
    }

    /// Opens `path` for appending (created when missing): the continuous job's files.
    pub fn append(path: &Path) -> Result<Self, JsonlError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| JsonlError {
                path: path.to_path_buf(),
                source,
            })?;
        let sync = file.try_clone().map_err(|source| JsonlError {
            path: path.to_path_buf(),
            source,
        })?;
        let mut w = Self::from_writer(path.to_path_buf(), Box::new(file));
        w.file = Some(sync);
        Ok(w)
    }

    /// Writes to standard error (used for dead letters when no file is given).
    pub fn stderr() -> Self {
        Self::from_writer(PathBuf::from("<stderr>"), Box::new(io::stderr()))
    }

    fn from_writer(path: PathBuf, w: Box<dyn Write + Send>) -> Self {
        JsonlWriter {
            path,
            out: BufWriter::with_capacity(1 << 16, w),
            written: 0,
            file: None,
        }
    }

    fn err(&self, source: io::Error) -> JsonlError {
        JsonlError {
            path: self.path.clone(),
            source,
        }
    }

    /// Appends one value as a line.
    pub fn write<T: Serialize>(&mut self, value: &T) -> Result<(), JsonlError> {
        serde_json::to_writer(&mut self.out, value).map_err(|e| self.err(io::Error::other(e)))?;
        self.out.write_all(b"\n").map_err(|e| self.err(e))?;
        self.written += 1;
        Ok(())
    }

    /// Lines written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Flushes buffered lines to the OS.
    pub fn flush(&mut self) -> Result<(), JsonlError> {
        self.out.flush().map_err(|e| self.err(e))
    }

    /// Flushes and, for appended files, fsyncs: what was written survives a crash.
    pub fn sync(&mut self) -> Result<(), JsonlError> {
        self.flush()?;
        if let Some(f) = &self.file {
            f.sync_data().map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Flushes everything to the OS.
    pub fn finish(mut self) -> Result<u64, JsonlError> {
        self.out.flush().map_err(|e| self.err(e))?;
        Ok(self.written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_lines_and_names_the_file_on_error() {
        let dir = std::env::temp_dir().join(format!("llamaflow-jsonl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("out.jsonl");
        let mut w = JsonlWriter::create(&p).unwrap();
        w.write(&serde_json::json!({"a": 1})).unwrap();
        w.write(&serde_json::json!({"b": "x"})).unwrap();
        assert_eq!(w.finish().unwrap(), 2);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "{\"a\":1}\n{\"b\":\"x\"}\n");
        let e = JsonlWriter::create(&dir.join("missing/dir/x.jsonl")).err().unwrap();
        assert!(e.to_string().starts_with("cannot write "), "{e}");
        assert!(e.to_string().contains("missing/dir/x.jsonl"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
