//! Writes values as JSON lines: one document per line, flushed on [`JsonlWriter::finish`].

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::FileMarks;
use super::marks::whole_lines_len;

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
    out: BufWriter<Counted>,
    written: u64,
    /// The file again, for fsync (files opened with [`JsonlWriter::append`]).
    file: Option<File>,
    /// The file's length at the last [`JsonlWriter::sync`] (appended files: from its whole
    /// lines at open).
    synced: u64,
    /// Where durable writes are reported, per epoch.
    marks: Option<FileMarks>,
}

/// A writer that counts the bytes it took.
struct Counted {
    inner: Box<dyn Write + Send>,
    bytes: u64,
}

impl Write for Counted {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
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

    /// Opens `path` for appending (created when missing): the continuous job's files. A
    /// partial last line (the job was killed while writing it) is cut off first, so every
    /// line stays whole; each [`JsonlWriter::sync_epoch`] is reported to `marks`.
    pub fn append(path: &Path, marks: &FileMarks) -> Result<Self, JsonlError> {
        let err = |source| JsonlError {
            path: path.to_path_buf(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(err)?;
        let len = file.metadata().map_err(err)?.len();
        let whole = whole_lines_len(&mut file).map_err(err)?;
        if whole < len {
            file.set_len(whole).and_then(|()| file.sync_all()).map_err(err)?;
            tracing::warn!(
                path = %path.display(),
                "cut off a partial last line of {} bytes (the job was stopped while writing it)",
                len - whole
            );
        }
        let sync = file.try_clone().map_err(err)?;
        let mut w = Self::from_writer(path.to_path_buf(), Box::new(file));
        w.file = Some(sync);
        w.synced = whole;
        w.out.get_mut().bytes = whole;
        marks.opened(path, whole);
        w.marks = Some(marks.clone());
        Ok(w)
    }

    /// Writes to standard error (used for dead letters when no file is given).
    pub fn stderr() -> Self {
        Self::from_writer(PathBuf::from("<stderr>"), Box::new(io::stderr()))
    }

    fn from_writer(path: PathBuf, w: Box<dyn Write + Send>) -> Self {
        JsonlWriter {
            path,
            out: BufWriter::with_capacity(1 << 16, Counted { inner: w, bytes: 0 }),
            written: 0,
            file: None,
            synced: 0,
            marks: None,
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
        self.synced = self.out.get_ref().bytes;
        Ok(())
    }

    /// [`JsonlWriter::sync`] for the results of `epoch`: what was written since the last
    /// sync is reported to the file's [`FileMarks`] as that epoch's.
    pub fn sync_epoch(&mut self, epoch: u64) -> Result<(), JsonlError> {
        let start = self.synced;
        self.sync()?;
        if let Some(m) = &self.marks
            && self.synced > start
        {
            m.wrote(&self.path, epoch, start, self.synced);
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
