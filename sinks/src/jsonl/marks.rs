//! Where each appended JSONL file stood after each epoch, so that a checkpoint records every
//! file's length at its cut and a restore truncates the file back to it: what a killed job
//! wrote after its last checkpoint is produced again by the restored job, so the file holds
//! each record once and never a fragment.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use super::JsonlError;

/// The byte lengths of the continuous job's appended JSONL files per epoch; cloned handles
/// share one record. Writers report each durable write ([`super::JsonlWriter::sync_epoch`]);
/// the checkpointer asks for the lengths at its cut ([`FileMarks::through`]).
#[derive(Clone, Default)]
pub struct FileMarks(Arc<Mutex<BTreeMap<PathBuf, FileLog>>>);

/// One file's durable writes since the last cut.
#[derive(Debug, Default)]
struct FileLog {
    /// The file's length after its last durable write.
    len: u64,
    /// Where the writes of epochs up to the last cut end (the largest end of those dropped).
    floor: u64,
    /// Durable writes since, in file order: (epoch, start, end).
    writes: VecDeque<(u64, u64, u64)>,
}

impl FileMarks {
    /// Registers `path`, opened with `len` whole-line bytes.
    pub(crate) fn opened(&self, path: &Path, len: u64) {
        self.lock().insert(
            path.to_path_buf(),
            FileLog {
                len,
                floor: len,
                writes: VecDeque::new(),
            },
        );
    }

    /// Records that bytes `start..end` of `path`, results of `epoch`, are durable.
    pub(crate) fn wrote(&self, path: &Path, epoch: u64, start: u64, end: u64) {
        let mut files = self.lock();
        let log = files.entry(path.to_path_buf()).or_default();
        log.len = end;
        log.writes.push_back((epoch, start, end));
    }

    /// Each file's length holding the results of every epoch up to `epoch` and none after:
    /// the start of the first write of a later epoch (the current length without one). A
    /// file can hold an earlier epoch's lines after a later one's (alerts a sink gave up on
    /// are dead-lettered as their epoch completes): then the length also covers those, so
    /// nothing of a checkpointed epoch is ever cut (a later line may then be written again
    /// after a restore). Call with increasing `epoch` (checkpoints complete in order): the
    /// writes up to it are forgotten.
    pub fn through(&self, epoch: u64) -> BTreeMap<PathBuf, u64> {
        let mut files = self.lock();
        files
            .iter_mut()
            .map(|(path, log)| {
                let later = log.writes.iter().find(|w| w.0 > epoch).map_or(log.len, |w| w.1);
                let earlier = log
                    .writes
                    .iter()
                    .filter(|w| w.0 <= epoch)
                    .map(|w| w.2)
                    .fold(log.floor, u64::max);
                log.floor = earlier;
                log.writes.retain(|w| w.0 > epoch);
                (path.clone(), later.max(earlier))
            })
            .collect()
    }

    /// Each file's current length (after its last durable write).
    pub fn lengths(&self) -> BTreeMap<PathBuf, u64> {
        self.lock().iter().map(|(p, log)| (p.clone(), log.len)).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<PathBuf, FileLog>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Truncates each file of `lengths` (a restored checkpoint's [`FileMarks::through`]) to its
/// length there; returns the bytes dropped per file. A file shorter than its mark (replaced
/// or rotated since) is left as it is, with a warning.
pub fn restore(lengths: &BTreeMap<PathBuf, u64>) -> Result<BTreeMap<PathBuf, u64>, JsonlError> {
    let mut dropped = BTreeMap::new();
    for (path, &mark) in lengths {
        let err = |source| JsonlError {
            path: path.clone(),
            source,
        };
        let file = match OpenOptions::new().write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::warn!(path = %path.display(), "not there to restore to its checkpointed length; a new file is started");
                continue;
            }
            Err(e) => return Err(err(e)),
        };
        let len = file.metadata().map_err(err)?.len();
        if len < mark {
            tracing::warn!(
                path = %path.display(),
                "{len} bytes, shorter than the {mark} at the checkpoint (replaced or rotated?): left as it is"
            );
            continue;
        }
        if len > mark {
            file.set_len(mark).map_err(err)?;
            file.sync_all().map_err(err)?;
            tracing::info!(
                path = %path.display(),
                "dropped {} bytes written after the checkpoint: the restored job writes them again",
                len - mark
            );
            dropped.insert(path.clone(), len - mark);
        }
    }
    Ok(dropped)
}

/// The length of `file`'s whole lines: its length up to and including the last `\n` (0
/// without one), found by reading backwards from the end.
pub(crate) fn whole_lines_len(file: &mut File) -> io::Result<u64> {
    const CHUNK: u64 = 64 * 1024;
    let mut end = file.metadata()?.len();
    let mut buf = vec![0u8; CHUNK as usize];
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        let chunk = &mut buf[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_length_at_a_cut_excludes_later_epochs_and_keeps_every_earlier_line() {
        let marks = FileMarks::default();
        let (a, b) = (Path::new("a.jsonl"), Path::new("b.jsonl"));
        marks.opened(a, 100);
        marks.opened(b, 0);
        marks.wrote(a, 1, 100, 150);
        marks.wrote(a, 2, 150, 170);
        marks.wrote(a, 4, 170, 200);
        // Through epoch 2: a ends at 170; b has no writes, its length stands.
        let at2 = marks.through(2);
        assert_eq!(at2[a], 170);
        assert_eq!(at2[b], 0);
        // An epoch-3 line after epoch 4's (a sink gave up on an alert of epoch 3): the cut
        // through 3 keeps it, and epoch 4's line before it.
        marks.wrote(a, 3, 200, 230);
        marks.wrote(b, 5, 0, 40);
        let at3 = marks.through(3);
        assert_eq!(at3[a], 230);
        assert_eq!(at3[b], 0);
        marks.wrote(a, 6, 230, 260);
        // Later cuts never go below what an earlier cut kept.
        let at5 = marks.through(5);
        assert_eq!(at5[a], 230);
        assert_eq!(at5[b], 40);
        assert_eq!(marks.through(9)[a], 260);
    }

    #[test]
    fn restore_truncates_longer_files_and_leaves_shorter_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (long, short) = (dir.path().join("long.jsonl"), dir.path().join("short.jsonl"));
        std::fs::write(&long, "{\"a\":1}\n{\"a\":2}\n{\"a\":3").unwrap();
        std::fs::write(&short, "{\"b\":1}\n").unwrap();
        let lengths = BTreeMap::from([(long.clone(), 8), (short.clone(), 100), (dir.path().join("gone"), 5)]);
        let dropped = restore(&lengths).unwrap();
        assert_eq!(dropped, BTreeMap::from([(long.clone(), 14)]));
        assert_eq!(std::fs::read_to_string(&long).unwrap(), "{\"a\":1}\n");
        assert_eq!(std::fs::read_to_string(&short).unwrap(), "{\"b\":1}\n");
    }

    #[test]
    fn whole_lines_end_at_the_last_newline() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let long_line = "x".repeat(200_000);
        for (text, want) in [
            (String::new(), 0),
            ("abc".to_string(), 0),
            ("a\nb".to_string(), 2),
            ("a\nb\n".to_string(), 4),
            (format!("a\n{long_line}"), 2),
            (format!("{long_line}\n{long_line}"), 200_001),
        ] {
            std::fs::write(&p, &text).unwrap();
            let mut f = File::open(&p).unwrap();
            assert_eq!(whole_lines_len(&mut f).unwrap(), want, "{}", text.len());
        }
    }
}
