//! Checkpoints of the continuous job: the operator state at an epoch boundary together with
//! the source positions of every epoch up to it, written once every sink has durably written
//! the results of those epochs. See docs/ARCHITECTURE.md ("Checkpoints") for the protocol.
//!
//! Files: `<dir>/checkpoint-<n>.bin` (a magic header, then bincode), written to a temporary
//! name, synced, renamed, and the directory synced; the two newest are kept.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow};
use operators::{Sequencer, Snapshots, WorkerState};
use serde::{Deserialize, Serialize};

/// First bytes of a checkpoint file (format version 6: with protocol metadata, the live
/// aggregates' state, the open TVL updates, the JSONL files' lengths, the epoch log's mark
/// and the deleted rules' throttle deadlines).
const MAGIC: &[u8; 8] = b"LLFCKPT6";
/// Checkpoint files kept in the directory.
const KEEP: usize = 2;
/// The JSONL files' lengths when a job started without a checkpoint: a restart before the
/// first checkpoint goes back to them (removed once a checkpoint exists).
const START_FILES: &str = "jsonl-lengths-at-start.json";

pub use sources::live::Positions;

use crate::live::reclock::{self, LogMark};

/// A consistent cut of the job.
#[derive(Debug, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Number of this checkpoint (increasing over restarts).
    pub id: u64,
    /// When it was taken (unix ms).
    pub created_ms: i64,
    /// The ingest front's sequencer after the cut.
    pub sequencer: Sequencer,
    /// Operator state, one per worker.
    pub state: Vec<WorkerState>,
    /// Source positions of everything before the cut.
    pub positions: Positions,
    /// The read view's history series and recent alerts at the cut (`view::HistoryImage`,
    /// encoded); `None` for a job without a read view.
    #[serde(with = "serde_bytes_opt")]
    pub view: Option<Vec<u8>>,
    /// Each appended JSONL file's length at the cut (`sinks::jsonl::FileMarks::through`): a
    /// restore truncates the file back to it.
    pub files: BTreeMap<PathBuf, u64>,
    /// Where the epochs after the cut are logged (reclocking); `None` without an epoch log.
    pub epoch_log: Option<LogMark>,
}

/// `Option<Vec<u8>>` as one byte slice (not byte by byte).
mod serde_bytes_opt {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        v.as_deref().map(serde_bytes::Bytes::new).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Ok(Option::<serde_bytes::ByteBuf>::deserialize(d)?.map(serde_bytes::ByteBuf::into_vec))
    }
}

impl Checkpoint {
    /// Writes the checkpoint atomically into `dir` and prunes old ones; returns its size.
    pub fn write(&self, dir: &Path) -> Result<u64> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create checkpoint directory {}", dir.display()))?;
        let path = dir.join(format!("checkpoint-{:012}.bin", self.id));
        let tmp = dir.join(format!(".checkpoint-{:012}.tmp", self.id));
        let file = File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        // Streamed to the file: a large state is not first copied into one buffer.
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(MAGIC)
            .map_err(bincode::Error::from)
            .and_then(|()| bincode::serialize_into(&mut out, self))
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        let file = out
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all().map(|()| f))
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        let bytes = file.metadata().map(|m| m.len()).unwrap_or_default();
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot rename {} into place", tmp.display()))?;
        sync_dir(dir)?;
        match std::fs::remove_file(dir.join(START_FILES)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!("cannot remove {}: {e}", dir.join(START_FILES).display());
            }
            _ => {}
        }
        let mut all = list(dir)?;
        while all.len() > KEEP {
            let (_, old) = all.remove(0);
            if let Err(e) = std::fs::remove_file(&old) {
                tracing::warn!("cannot remove old checkpoint {}: {e}", old.display());
            }
        }
        Ok(bytes)
    }

    /// The newest checkpoint in `dir`, if any.
    pub fn load_latest(dir: &Path) -> Result<Option<Checkpoint>> {
        if !dir.exists() {
            return Ok(None);
        }
        let Some((_, path)) = list(dir)?.pop() else {
            return Ok(None);
        };
        let bytes = std::fs::read(&path).with_context(|| format!("cannot read checkpoint {}", path.display()))?;
        let body = bytes.strip_prefix(MAGIC.as_slice()).with_context(|| {
            format!(
                "{} is not a llamaflow checkpoint of this version (6); move it away to start over",
                path.display()
            )
        })?;
        let ckpt = bincode::deserialize(body).with_context(|| {
            format!(
                "checkpoint {} is corrupt; move it away to start from the previous one",
                path.display()
            )
        })?;
        Ok(Some(ckpt))
    }
}

/// Records the JSONL files' lengths at the start of a job without a checkpoint in `dir`
/// (atomically), for [`start_files`].
pub fn save_start_files(dir: &Path, lengths: &BTreeMap<PathBuf, u64>) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create checkpoint directory {}", dir.display()))?;
    let (path, tmp) = (dir.join(START_FILES), dir.join(format!(".{START_FILES}.tmp")));
    let text = serde_json::to_vec(lengths)?;
    std::fs::write(&tmp, text)
        .and_then(|()| File::open(&tmp)?.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot rename {} into place", tmp.display()))?;
    sync_dir(dir)
}

/// The JSONL files' lengths saved by [`save_start_files`] (none once a checkpoint was written).
pub fn start_files(dir: &Path) -> Result<BTreeMap<PathBuf, u64>> {
    let path = dir.join(START_FILES);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{} is corrupt; move it away to keep the JSONL files as they are",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync directory {}", dir.display()))
}

/// Checkpoint files in `dir`, oldest first.
fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        let id = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("checkpoint-"))
            .and_then(|n| n.strip_suffix(".bin"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(id) = id {
            out.push((id, path));
        }
    }
    out.sort();
    Ok(out)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// A requested checkpoint waiting for its snapshot and for the sinks.
struct Prepared {
    requested: Instant,
    sequencer: Sequencer,
    positions: Positions,
    log: Option<LogMark>,
}

/// Drives checkpoints: the ingest front [prepares](Checkpointer::prepare) one at an epoch; it
/// [completes](Checkpointer::complete) once the operators' snapshot is in and every sink has
/// written every epoch up to it.
pub struct Checkpointer {
    /// Where state is saved, with the snapshots to save; `None`: positions only.
    store: Option<(PathBuf, Snapshots)>,
    /// Whether a read view's history goes into each checkpoint (deposited by the output stage
    /// once it has applied the checkpoint's epoch).
    with_view: bool,
    views: Mutex<BTreeMap<u64, Arc<view::State>>>,
    pending: Mutex<BTreeMap<u64, Prepared>>,
    next_id: Mutex<u64>,
    last_done: Mutex<Instant>,
    /// The JSONL files' lengths per epoch.
    files: sinks::jsonl::FileMarks,
    /// The epoch-log marks of the checkpoints kept (oldest first): older segments go.
    log_marks: Mutex<std::collections::VecDeque<LogMark>>,
}

impl Checkpointer {
    /// Checkpoints into `store`'s directory with its snapshots (`None`: positions are still
    /// committed at each cut, but no state is saved), numbered after `last_id`.
    pub fn new(store: Option<(PathBuf, Snapshots)>, last_id: u64) -> Self {
        Checkpointer {
            store,
            with_view: false,
            views: Mutex::new(BTreeMap::new()),
            pending: Mutex::new(BTreeMap::new()),
            next_id: Mutex::new(last_id + 1),
            last_done: Mutex::new(Instant::now()),
            files: Default::default(),
            log_marks: Default::default(),
        }
    }

    /// The restored checkpoint's epoch-log mark, kept until newer checkpoints replace it.
    pub fn with_log_mark(self, mark: Option<LogMark>) -> Self {
        if let Some(m) = mark {
            self.log_marks
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push_back(m);
        }
        self
    }

    /// Checkpoints also hold the lengths of the JSONL files that report to `marks`.
    pub fn with_files(mut self, marks: sinks::jsonl::FileMarks) -> Self {
        self.files = marks;
        self
    }

    /// Checkpoints also hold the read view's history (see [`Checkpointer::deposit_view`]).
    pub fn with_view(mut self) -> Self {
        self.with_view = self.store.is_some();
        self
    }

    /// Whether a checkpoint waits for the view as of `epoch` (after applying it).
    pub fn wants_view(&self, epoch: u64) -> bool {
        self.with_view
            && self
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains_key(&epoch)
    }

    /// The output stage hands over the view version that includes `epoch` (O(1): it is shared).
    pub fn deposit_view(&self, epoch: u64, state: Arc<view::State>) {
        self.views
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(epoch, state);
    }

    /// Requests a checkpoint after `epoch` (call before sending it) with the front's state
    /// and where the epochs after it are logged.
    pub fn prepare(&self, epoch: u64, sequencer: Sequencer, positions: Positions, log: Option<LogMark>) {
        if let Some((_, snapshots)) = &self.store {
            snapshots.request(epoch);
        }
        self.pending.lock().unwrap_or_else(PoisonError::into_inner).insert(
            epoch,
            Prepared {
                requested: Instant::now(),
                sequencer,
                positions,
                log,
            },
        );
    }

    /// Whether a prepared checkpoint has not completed yet.
    pub fn has_pending(&self) -> bool {
        !self.pending.lock().unwrap_or_else(PoisonError::into_inner).is_empty()
    }

    /// Seconds since the last completed checkpoint (or the start).
    pub fn age_secs(&self) -> f64 {
        self.last_done
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .elapsed()
            .as_secs_f64()
    }

    /// Completes, in order, the prepared checkpoints before `durable_upto` (every epoch below
    /// it is written by every sink) whose snapshots are in; returns the positions of the
    /// newest one completed, which the sources may now commit.
    pub fn complete(&self, durable_upto: u64) -> Result<Option<Positions>> {
        let mut done = None;
        loop {
            let epoch = {
                let pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
                match pending.keys().next() {
                    Some(&e) if e < durable_upto => e,
                    _ => break,
                }
            };
            if self.with_view
                && !self
                    .views
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .contains_key(&epoch)
            {
                // The output stage has not applied the epoch yet.
                break;
            }
            let state = match &self.store {
                Some((_, snapshots)) => match snapshots.take(epoch) {
                    Some(state) => Some(state.with_context(|| format!("cannot encode the state at epoch {epoch}"))?),
                    None => break,
                },
                None => None,
            };
            let view = match self.with_view {
                true => self
                    .views
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&epoch)
                    .map(|v| bincode::serialize(&v.history_image()))
                    .transpose()
                    .with_context(|| format!("cannot encode the read view at epoch {epoch}"))?,
                false => None,
            };
            let Some(prepared) = self
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&epoch)
            else {
                break;
            };
            let files = self.files.through(epoch);
            if let (Some((dir, _)), Some(state)) = (&self.store, state) {
                let id = {
                    let mut next = self.next_id.lock().unwrap_or_else(PoisonError::into_inner);
                    *next += 1;
                    *next - 1
                };
                let ckpt = Checkpoint {
                    id,
                    created_ms: now_ms(),
                    sequencer: prepared.sequencer,
                    state,
                    positions: prepared.positions.clone(),
                    view,
                    files,
                    epoch_log: prepared.log.clone(),
                };
                let bytes = ckpt.write(dir)?;
                if let Some(mark) = prepared.log {
                    let mut marks = self.log_marks.lock().unwrap_or_else(PoisonError::into_inner);
                    marks.push_back(mark);
                    while marks.len() > KEEP {
                        marks.pop_front();
                    }
                    if let Some(oldest) = marks.front() {
                        reclock::prune(dir, oldest);
                    }
                }
                metrics::gauge!("llamaflow_checkpoint_bytes").set(bytes as f64);
                metrics::gauge!("llamaflow_checkpoint_id").set(id as f64);
            }
            metrics::counter!("llamaflow_checkpoints_total").increment(1);
            metrics::histogram!("llamaflow_checkpoint_duration_seconds")
                .record(prepared.requested.elapsed().as_secs_f64());
            *self.last_done.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
            done = Some(prepared.positions);
        }
        Ok(done)
    }
}

/// Completes checkpoints on a thread of its own at a lower CPU priority (nice +10): encoding
/// and writing a large state (1M rules: ≈160 MB) then takes the CPU the dataflow leaves idle
/// instead of competing with it.
pub struct Completer {
    tx: std::sync::mpsc::Sender<(u64, Reply)>,
}

/// Where the checkpoint thread sends one [`Checkpointer::complete`] result.
type Reply = tokio::sync::oneshot::Sender<Result<Option<Positions>>>;

impl Completer {
    /// Starts the checkpoint thread for `checkpointer`; it ends with the last `Completer`.
    pub fn start(checkpointer: Arc<Checkpointer>) -> Result<Completer> {
        let (tx, rx) = std::sync::mpsc::channel::<(u64, Reply)>();
        std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || {
                lower_priority();
                for (durable_upto, reply) in rx {
                    let _ = reply.send(checkpointer.complete(durable_upto));
                }
            })
            .context("cannot start the checkpoint thread")?;
        Ok(Completer { tx })
    }

    /// [`Checkpointer::complete`], run on the checkpoint thread.
    pub async fn complete(&self, durable_upto: u64) -> Result<Option<Positions>> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send((durable_upto, reply))
            .map_err(|_| anyhow!("the checkpoint thread has stopped"))?;
        rx.await.map_err(|_| anyhow!("the checkpoint thread has stopped"))?
    }
}

/// Lowers the calling thread's CPU priority by 10 (Linux sets it per thread).
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: only sets the scheduling priority of the calling thread.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_atomic_numbered_and_pruned() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Checkpoint::load_latest(dir.path()).unwrap().is_none());
        for id in 1..=4 {
            let positions = Positions {
                lsn: Some(id * 10),
                ..Default::default()
            };
            Checkpoint {
                id,
                created_ms: 0,
                sequencer: Sequencer::new(2, id),
                state: vec![WorkerState::default(); 2],
                positions,
                view: (id == 4).then(|| vec![1, 2, 3]),
                files: BTreeMap::from([(PathBuf::from("alerts.jsonl"), id * 100)]),
                epoch_log: None,
            }
            .write(dir.path())
            .unwrap();
        }
        let latest = Checkpoint::load_latest(dir.path()).unwrap().unwrap();
        assert_eq!(
            (latest.id, latest.positions.lsn, latest.sequencer.next_seq()),
            (4, Some(40), 4)
        );
        assert_eq!(latest.view, Some(vec![1, 2, 3]));
        assert_eq!(latest.files[Path::new("alerts.jsonl")], 400);
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), KEEP, "only the newest are kept: {names:?}");
        std::fs::write(dir.path().join("checkpoint-000000000009.bin"), b"garbage").unwrap();
        let err = Checkpoint::load_latest(dir.path()).unwrap_err();
        assert!(format!("{err:#}").contains("not a llamaflow checkpoint"), "{err:#}");
    }
}
