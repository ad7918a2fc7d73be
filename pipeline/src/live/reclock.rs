//! Reclocking: which input each live epoch holds, logged durably before the epoch goes into
//! the dataflow, so that after a restart the epochs after the checkpoint are formed again
//! exactly — the same items, in the same order, with the same TVL-update closes — before the
//! job goes on live. Results that join streams (a transfer valued at the newest price read)
//! are then computed again as they were, and every sink converges on one set of alerts.
//!
//! The log lives in the checkpoint directory as segments `epochs-<run>-<seq>.log` (run: the
//! job's start in unix ms; a new segment at every checkpoint), each a sequence of frames
//! `[length u32][crc32 u32][bincode EpochInput]`, fsynced per epoch (one write per epoch: the
//! group commit). A checkpoint names the segment that starts after it ([`LogMark`]); a restore
//! re-forms the epochs of that segment and the later ones of its run, or of a later run's log
//! where that run re-formed them and went on ([`to_form_again`]). A torn last frame (a kill
//! mid-write) ends a run's log: that epoch never reached the dataflow.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sources::live::{Ack, LiveItem};
use tokio::sync::mpsc::error::TryRecvError;

/// One step of an epoch's input, in the order the ingest front applied it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Step {
    /// `count` consecutive items of one stream; `first` is the first one's position (Kafka
    /// offset, file offset, LSN), checked when the epoch is formed again.
    Items {
        /// The stream ([`stream_of`]).
        stream: String,
        /// The first item's position, when it has one.
        first: Option<u64>,
        /// Items in the run.
        count: u32,
    },
    /// A live TVL update closed because it settled (wall-clock time: logged, not recomputed).
    Close(String),
}

/// The input of one live epoch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochInput {
    /// What the front applied, in order.
    pub steps: Vec<Step>,
}

impl EpochInput {
    /// Records that `item` was applied.
    pub fn item(&mut self, item: &LiveItem) {
        // Called for every live item: the stream is named (allocated) only when a run starts.
        if let Some(Step::Items { stream, count, .. }) = self.steps.last_mut()
            && in_stream(item, stream)
        {
            *count += 1;
            return;
        }
        let (stream, pos) = stream_of(item);
        self.steps.push(Step::Items {
            stream,
            first: pos,
            count: 1,
        });
    }

    /// Records that the update of `protocol` was closed by settling.
    pub fn close(&mut self, protocol: &str) {
        self.steps.push(Step::Close(protocol.to_string()));
    }
}

/// The stream an item comes from (each delivers its items in the same order after a
/// restart) and its position in it.
pub fn stream_of(item: &LiveItem) -> (String, Option<u64>) {
    match &item.ack {
        Ack::Kafka {
            topic,
            partition,
            offset,
        } => (format!("kafka:{topic}/{partition}"), u64::try_from(*offset).ok()),
        Ack::File { path, offset } => (format!("file:{path}"), Some(*offset)),
        Ack::Lsn(lsn) => ("cdc".to_string(), Some(*lsn)),
        // Unacknowledged items (a tailed file's over-long line): named by their source.
        Ack::None => {
            let pos = item.pos.to_string();
            let source = pos.rsplit_once(':').map_or(pos.as_str(), |(s, _)| s);
            (format!("pos:{source}"), None)
        }
    }
}

/// Whether `item` is of `stream` (as [`stream_of`] names it), without naming it.
fn in_stream(item: &LiveItem, stream: &str) -> bool {
    match &item.ack {
        Ack::Kafka { topic, partition, .. } => stream
            .strip_prefix("kafka:")
            .and_then(|s| s.rsplit_once('/'))
            .is_some_and(|(t, p)| t == topic && p.parse::<i32>().ok() == Some(*partition)),
        Ack::File { path, .. } => stream.strip_prefix("file:") == Some(path.as_str()),
        Ack::Lsn(_) => stream == "cdc",
        Ack::None => stream_of(item).0 == stream,
    }
}

/// Where the epochs after a checkpoint are logged: the segment that starts after it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogMark {
    /// The segment's file name (`epochs-<run>-<seq>.log`).
    pub segment: String,
}

/// The epoch log of this run (see the [module docs](self)).
pub struct EpochLog {
    dir: PathBuf,
    run: u64,
    seq: u64,
    file: File,
    frame: Vec<u8>,
}

fn segment_name(run: u64, seq: u64) -> String {
    format!("epochs-{run:013}-{seq:08}.log")
}

/// (run, seq) of a segment's file name.
fn parse_segment(name: &str) -> Option<(u64, u64)> {
    let rest = name.strip_prefix("epochs-")?.strip_suffix(".log")?;
    let (run, seq) = rest.split_once('-')?;
    Some((run.parse().ok()?, seq.parse().ok()?))
}

/// The log segments in `dir`, oldest first.
fn segments(dir: &Path) -> Result<Vec<(u64, u64, String)>> {
    let mut out = Vec::new();
    if !dir.exists() {
        return Ok(out);
    }
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some((run, seq)) = parse_segment(&name) {
            out.push((run, seq, name));
        }
    }
    out.sort();
    Ok(out)
}

impl EpochLog {
    /// Starts this run's log in `dir` (its first segment) for a run started at `run` (unix
    /// ms).
    pub fn create(dir: &Path, run: u64) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let file = Self::open_segment(dir, run, 0)?;
        Ok(EpochLog {
            dir: dir.to_path_buf(),
            run,
            seq: 0,
            file,
            frame: Vec::new(),
        })
    }

    fn open_segment(dir: &Path, run: u64, seq: u64) -> Result<File> {
        let path = dir.join(segment_name(run, seq));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot create the epoch log {}", path.display()))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("cannot sync directory {}", dir.display()))?;
        Ok(file)
    }

    /// Appends one epoch's input and returns once it is on disk.
    pub fn append(&mut self, input: &EpochInput) -> Result<()> {
        let body = bincode::serialize(input).context("cannot encode an epoch's input")?;
        self.frame.clear();
        self.frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
        self.frame.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        self.frame.extend_from_slice(&body);
        self.file
            .write_all(&self.frame)
            .and_then(|()| self.file.sync_data())
            .context("cannot write the epoch log")?;
        metrics::counter!("llamaflow_epoch_log_syncs_total").increment(1);
        metrics::counter!("llamaflow_epoch_log_bytes_total").increment(self.frame.len() as u64);
        Ok(())
    }

    /// Starts a new segment (at a checkpoint): the epochs after it are logged there.
    pub fn rotate(&mut self) -> Result<LogMark> {
        self.seq += 1;
        self.file = Self::open_segment(&self.dir, self.run, self.seq)?;
        Ok(LogMark {
            segment: segment_name(self.run, self.seq),
        })
    }
}

/// The epochs to form again at a restart: those logged after `mark` (the restored
/// checkpoint's; `None`: no checkpoint, every run's log from its start).
///
/// Every run restored from the same point logged the epochs it formed again before its own,
/// so a later run's log supersedes an earlier one — unless the later run was killed while
/// still forming them, which leaves a strict prefix of what was already known. Each run's
/// log ends at its first torn frame (a kill mid-write: that epoch never reached the
/// dataflow).
pub fn to_form_again(dir: &Path, mark: Option<&LogMark>) -> Result<Vec<EpochInput>> {
    let from = match mark {
        Some(mark) => match parse_segment(&mark.segment) {
            Some(at) => at,
            None => return Ok(Vec::new()),
        },
        None => (0, 0),
    };
    let mut known: Vec<EpochInput> = Vec::new();
    let all: Vec<_> = segments(dir)?
        .into_iter()
        .filter(|(run, seq, _)| (*run, *seq) >= from)
        .collect();
    for run in all.chunk_by(|a, b| a.0 == b.0) {
        let logged = read_run(dir, run.iter().map(|(_, _, name)| name.as_str()))?;
        if !(logged.len() < known.len() && known.starts_with(&logged)) {
            known = logged;
        }
    }
    Ok(known)
}

/// The epochs of one run's `segments` (in order), up to the first torn frame.
fn read_run<'a>(dir: &Path, segments: impl Iterator<Item = &'a str>) -> Result<Vec<EpochInput>> {
    let mut out = Vec::new();
    for name in segments {
        let path = dir.join(name);
        let bytes = std::fs::read(&path).with_context(|| format!("cannot read the epoch log {}", path.display()))?;
        let mut rest = &bytes[..];
        while rest.len() >= 8 {
            let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
            let Some(body) = rest.get(8..8 + len) else {
                return Ok(out);
            };
            if crc32fast::hash(body) != crc {
                return Ok(out);
            }
            match bincode::deserialize(body) {
                Ok(input) => out.push(input),
                Err(_) => return Ok(out),
            }
            rest = &rest[8 + len..];
        }
        if !rest.is_empty() {
            return Ok(out);
        }
    }
    Ok(out)
}

/// Removes the segments older than `oldest` (the mark of the oldest checkpoint kept): no
/// restore can need them.
pub fn prune(dir: &Path, oldest: &LogMark) {
    let Some(keep_from) = parse_segment(&oldest.segment) else {
        return;
    };
    let Ok(all) = segments(dir) else {
        return;
    };
    for (run, seq, name) in all {
        if (run, seq) < keep_from
            && let Err(e) = std::fs::remove_file(dir.join(&name))
        {
            tracing::warn!("cannot remove the old epoch log {name}: {e}");
        }
    }
}

/// Items received while an epoch is formed again, waiting for their turn (arrival order).
#[derive(Default)]
pub struct Pending(VecDeque<LiveItem>);

impl Pending {
    /// The first waiting item of `stream`, if any.
    pub fn take(&mut self, stream: &str) -> Option<LiveItem> {
        let i = self.0.iter().position(|item| in_stream(item, stream))?;
        self.0.remove(i)
    }

    /// Keeps `item` for later.
    pub fn push(&mut self, item: LiveItem) {
        self.0.push_back(item);
    }

    /// The next item to apply: a waiting one (arrival order), else the next on `rx`.
    pub fn next(&mut self, rx: &mut tokio::sync::mpsc::Receiver<LiveItem>) -> Result<LiveItem, TryRecvError> {
        self.0.pop_front().map_or_else(|| rx.try_recv(), Ok)
    }

    /// Forms `input` again: hands each of its items (in the logged order, whatever order
    /// they arrive in) and closes to `out`. Items come from those waiting here, then from
    /// `recv` (`Ok(None)`: nothing yet; `Err`: nothing more will come); items of other
    /// streams wait here. `Err` (why) when a stream no longer delivers what was logged —
    /// another first position, or nothing within `patience` — with what was handed out so
    /// far already handed out.
    pub fn form(
        &mut self,
        input: &EpochInput,
        patience: std::time::Duration,
        mut recv: impl FnMut() -> Result<Option<LiveItem>, String>,
        mut out: impl FnMut(Formed),
    ) -> Result<(), String> {
        for step in &input.steps {
            match step {
                Step::Close(protocol) => out(Formed::Close(protocol.clone())),
                Step::Items { stream, first, count } => {
                    for i in 0..*count {
                        let item = self.next_of(stream, patience, &mut recv)?;
                        if i == 0 && first.is_some() && stream_of(&item).1 != *first {
                            let found = stream_of(&item).1;
                            self.0.push_front(item);
                            return Err(format!("{stream} is at {found:?}, the log says {first:?}"));
                        }
                        out(Formed::Item(item));
                    }
                }
            }
        }
        Ok(())
    }

    /// The next item of `stream`, keeping the others for later.
    fn next_of(
        &mut self,
        stream: &str,
        patience: std::time::Duration,
        recv: &mut impl FnMut() -> Result<Option<LiveItem>, String>,
    ) -> Result<LiveItem, String> {
        if let Some(item) = self.take(stream) {
            return Ok(item);
        }
        let deadline = std::time::Instant::now() + patience;
        loop {
            match recv()? {
                Some(item) if in_stream(&item, stream) => return Ok(item),
                Some(item) => self.push(item),
                None if std::time::Instant::now() >= deadline => {
                    return Err(format!("no more items of {stream} within {patience:?}"));
                }
                None => {}
            }
        }
    }
}

/// One step of an epoch formed again ([`Pending::form`]).
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // handed out one at a time, never stored
pub enum Formed {
    /// An item, to apply.
    Item(LiveItem),
    /// A settled TVL update, to close.
    Close(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::SourcePos;
    use sources::live::Change;

    fn kafka(partition: i32, offset: i64) -> LiveItem {
        LiveItem {
            pos: SourcePos::new(format!("prices/{partition}@").into(), offset as u64),
            ack: Ack::Kafka {
                topic: "prices".into(),
                partition,
                offset,
            },
            change: Change::DeleteRule("r".into()),
        }
    }

    #[test]
    fn runs_of_one_stream_are_counted_and_closes_kept_in_order() {
        let mut e = EpochInput::default();
        for item in [kafka(0, 5), kafka(0, 6), kafka(1, 9), kafka(0, 7)] {
            e.item(&item);
        }
        e.close("aave");
        let run = |p: i32, first: u64, count: u32| Step::Items {
            stream: format!("kafka:prices/{p}"),
            first: Some(first),
            count,
        };
        assert_eq!(
            e.steps,
            vec![run(0, 5, 2), run(1, 9, 1), run(0, 7, 1), Step::Close("aave".into())]
        );
    }

    /// Items that arrive in another order (the streams interleave differently after a
    /// restart) are handed out in the logged order; a stream at another position ends it.
    #[test]
    fn an_epoch_is_formed_in_the_logged_order_whatever_the_arrival_order() {
        let mut logged = EpochInput::default();
        for item in [kafka(0, 5), kafka(1, 9), kafka(0, 6), kafka(1, 10)] {
            logged.item(&item);
        }
        logged.close("aave");
        // After the restart partition 1 comes first, and an item of the next epoch too.
        let mut arriving: VecDeque<LiveItem> =
            [kafka(1, 9), kafka(1, 10), kafka(1, 11), kafka(0, 5), kafka(0, 6)].into();
        let mut pending = Pending::default();
        let mut out = Vec::new();
        let patience = std::time::Duration::from_millis(50);
        pending
            .form(
                &logged,
                patience,
                || Ok(arriving.pop_front()),
                |f| {
                    out.push(match f {
                        Formed::Item(i) => format!("{}", stream_of(&i).1.unwrap()),
                        Formed::Close(p) => p,
                    })
                },
            )
            .unwrap();
        assert_eq!(out, ["5", "9", "6", "10", "aave"]);
        // The item of the next epoch waits.
        let (_tx, mut rx) = tokio::sync::mpsc::channel(1);
        assert_eq!(pending.next(&mut rx).ok().map(|i| stream_of(&i).1), Some(Some(11)));
        // A stream that restarts elsewhere, or runs dry, is an error.
        let mut at_7: VecDeque<LiveItem> = [kafka(0, 7)].into();
        let e = pending
            .form(&logged, patience, || Ok(at_7.pop_front()), |_| {})
            .unwrap_err();
        assert!(e.contains("the log says Some(5)"), "{e}");
        let mut pending = Pending::default();
        let e = pending.form(&logged, patience, || Ok(None), |_| {}).unwrap_err();
        assert!(e.contains("no more items of kafka:prices/0"), "{e}");
    }

    /// Cuts the last `bytes` off a log segment, as a kill in the middle of a write does.
    fn tear(segment: &Path, bytes: u64) {
        let len = std::fs::metadata(segment).unwrap().len();
        let file = OpenOptions::new().write(true).open(segment).unwrap();
        file.set_len(len - bytes).unwrap();
    }

    #[test]
    fn the_log_reads_back_after_a_mark_and_stops_at_a_torn_frame() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = EpochLog::create(dir.path(), 1000).unwrap();
        let epoch = |n: u32| EpochInput {
            steps: vec![Step::Items {
                stream: "cdc".into(),
                first: Some(n as u64),
                count: n,
            }],
        };
        log.append(&epoch(1)).unwrap();
        let mark = log.rotate().unwrap();
        log.append(&epoch(2)).unwrap();
        log.rotate().unwrap();
        log.append(&epoch(3)).unwrap();
        log.append(&epoch(4)).unwrap();
        assert_eq!(
            to_form_again(dir.path(), Some(&mark)).unwrap(),
            vec![epoch(2), epoch(3), epoch(4)]
        );
        let first = |run| LogMark {
            segment: segment_name(run, 0),
        };
        assert_eq!(to_form_again(dir.path(), Some(&first(1000))).unwrap().len(), 4);
        // A kill in the middle of the last frame: that epoch is not in the log.
        tear(&dir.path().join(segment_name(1000, 2)), 3);
        assert_eq!(
            to_form_again(dir.path(), Some(&mark)).unwrap(),
            vec![epoch(2), epoch(3)]
        );
        // Pruning.
        let _other = EpochLog::create(dir.path(), 2000).unwrap();
        prune(dir.path(), &mark);
        let names: Vec<String> = segments(dir.path()).unwrap().into_iter().map(|s| s.2).collect();
        assert_eq!(
            names,
            [segment_name(1000, 1), segment_name(1000, 2), segment_name(2000, 0)]
        );
    }

    /// Restarts that follow each other: each run logs the epochs it formed again, then its
    /// own; the epochs to form again are the newest run's, unless that run was killed while
    /// forming them (a strict prefix), and a run with another history supersedes.
    #[test]
    fn a_later_run_supersedes_unless_it_died_forming_the_epochs_again() {
        let epoch = |n: u64| EpochInput {
            steps: vec![Step::Items {
                stream: "kafka:prices/0".into(),
                first: Some(n),
                count: 1,
            }],
        };
        let log = |dir: &Path, run: u64, epochs: &[u64]| {
            let mut log = EpochLog::create(dir, run).unwrap();
            for &n in epochs {
                log.append(&epoch(n)).unwrap();
            }
            log
        };
        let all = |ns: &[u64]| ns.iter().map(|&n| epoch(n)).collect::<Vec<_>>();

        // A checkpoint in run 1000 after epoch 1; run 2000 restored from it, formed 2 and 3
        // again, went on with 4 and was killed before a checkpoint of its own.
        let dir = tempfile::tempdir().unwrap();
        let mut first = log(dir.path(), 1000, &[1]);
        let mark = first.rotate().unwrap();
        first.append(&epoch(2)).unwrap();
        first.append(&epoch(3)).unwrap();
        log(dir.path(), 2000, &[2, 3, 4]);
        assert_eq!(to_form_again(dir.path(), Some(&mark)).unwrap(), all(&[2, 3, 4]));
        // Run 3000 was killed while forming them again: it logged only 2.
        log(dir.path(), 3000, &[2]);
        assert_eq!(to_form_again(dir.path(), Some(&mark)).unwrap(), all(&[2, 3, 4]));
        // Run 4000 formed them all, rotated at a checkpoint that never completed, went on.
        let mut fourth = log(dir.path(), 4000, &[2, 3]);
        fourth.rotate().unwrap();
        fourth.append(&epoch(4)).unwrap();
        fourth.append(&epoch(5)).unwrap();
        assert_eq!(to_form_again(dir.path(), Some(&mark)).unwrap(), all(&[2, 3, 4, 5]));
        // Run 5000 could not follow the log after epoch 2 and went on live with other epochs:
        // what it did is what the sinks saw last.
        log(dir.path(), 5000, &[2, 9]);
        assert_eq!(to_form_again(dir.path(), Some(&mark)).unwrap(), all(&[2, 9]));
        // A mark in run 4000's second segment: what run 4000 logged after it, and later runs.
        let later = LogMark {
            segment: segment_name(4000, 1),
        };
        assert_eq!(to_form_again(dir.path(), Some(&later)).unwrap(), all(&[2, 9]));

        // No checkpoint yet: every run from its start; run 7000 died forming run 6000's again.
        let dir = tempfile::tempdir().unwrap();
        log(dir.path(), 6000, &[1, 2, 3]);
        log(dir.path(), 7000, &[1, 2]);
        assert_eq!(to_form_again(dir.path(), None).unwrap(), all(&[1, 2, 3]));
        log(dir.path(), 8000, &[1, 2, 3, 4]);
        assert_eq!(to_form_again(dir.path(), None).unwrap(), all(&[1, 2, 3, 4]));
        // A run killed mid-write of its first frame logged nothing whole.
        log(dir.path(), 9000, &[1]);
        tear(&dir.path().join(segment_name(9000, 0)), 1);
        assert_eq!(to_form_again(dir.path(), None).unwrap(), all(&[1, 2, 3, 4]));
    }
}
