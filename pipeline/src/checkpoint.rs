//! Checkpoints of the continuous job: the operator state at an epoch boundary together with
//! the source positions of every epoch up to it, written once every sink has durably written
//! the results of those epochs. See docs/ARCHITECTURE.md ("Checkpoints") for the protocol.
//!
//! Files: `<dir>/checkpoint-<n>.bin` (a magic header, then bincode), written to a temporary
//! name, synced, renamed, and the directory synced; the two newest are kept. A cluster writes
//! one part per process, `checkpoint-<n>.part-<p>.bin`, and process 0 writes
//! `manifest-<n>.json` once every part of checkpoint n is durable: only checkpoints with a
//! manifest count.

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
        let bytes = self.write_as(dir, &format!("checkpoint-{:012}.bin", self.id))?;
        remove_start_files(dir, None);
        let mut all = list(dir)?;
        while all.len() > KEEP {
            let (_, old) = all.remove(0);
            if let Err(e) = std::fs::remove_file(&old) {
                tracing::warn!("cannot remove old checkpoint {}: {e}", old.display());
            }
        }
        Ok(bytes)
    }

    /// Writes process `process`'s part of a cluster checkpoint atomically into `dir`; returns
    /// its size. Old parts go once newer manifests exist ([`prune_cluster`]).
    pub fn write_part(&self, dir: &Path, process: usize) -> Result<u64> {
        let bytes = self.write_as(dir, &part_name(self.id, process))?;
        remove_start_files(dir, Some(process));
        Ok(bytes)
    }

    /// Writes the checkpoint to `dir/name` through a synced temporary file and a rename.
    fn write_as(&self, dir: &Path, name: &str) -> Result<u64> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create checkpoint directory {}", dir.display()))?;
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
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
        Checkpoint::read(&path).map(Some)
    }

    /// The checkpoint process `process` of `processes` (with `workers` workers each)
    /// restores: the newest in `dir` — a single-process checkpoint, or a cluster's with a
    /// manifest (every process needs the same directory). Taken with the same shape, it is
    /// this process's own; otherwise every part is read and the state re-split for this
    /// shape ([`rescale`]).
    pub fn load_for(dir: &Path, process: usize, processes: usize, workers: usize) -> Result<Option<Checkpoint>> {
        if !dir.exists() {
            return Ok(None);
        }
        let single = list(dir)?.pop();
        let manifest = newest_manifest(dir)?;
        // The newer of the single-process checkpoint and the cluster's (ids count on).
        let parts = match manifest.filter(|m| single.as_ref().is_none_or(|(id, _)| m.id >= *id)) {
            Some(m) => {
                if m.processes == processes {
                    let own = read_part(dir, m.id, process)?;
                    if own.state.len() == workers {
                        return Ok(Some(own));
                    }
                }
                (0..m.processes)
                    .map(|p| read_part(dir, m.id, p))
                    .collect::<Result<Vec<_>>>()?
            }
            None => {
                let Some((_, path)) = single else { return Ok(None) };
                let ck = Checkpoint::read(&path)?;
                if processes == 1 && ck.state.len() == workers {
                    return Ok(Some(ck));
                }
                vec![ck]
            }
        };
        rescale(parts, process, processes, workers).map(Some)
    }

    fn read(path: &Path) -> Result<Checkpoint> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read checkpoint {}", path.display()))?;
        let body = bytes.strip_prefix(MAGIC.as_slice()).with_context(|| {
            format!(
                "{} is not a llamaflow checkpoint of this version (6); move it away to start over",
                path.display()
            )
        })?;
        bincode::deserialize(body).with_context(|| {
            format!(
                "checkpoint {} is corrupt; move it away to start from the previous one",
                path.display()
            )
        })
    }
}

/// Process `process`'s part of cluster checkpoint `id` in `dir`.
fn read_part(dir: &Path, id: u64, process: usize) -> Result<Checkpoint> {
    let path = dir.join(part_name(id, process));
    Checkpoint::read(&path).with_context(|| {
        format!(
            "checkpoint {id} has a manifest but process {process}'s part is not readable; \
             every process needs the same checkpoint directory (a shared volume)"
        )
    })
}

/// A checkpoint's parts (a cluster's, in process order, or one single-process checkpoint)
/// re-split for process `process` of `processes` with `workers` workers each: the workers'
/// state by the dataflow's routing (`operators::rescale_states`), the sequencer for the new
/// shape (`Sequencer::rescale`), every Kafka partition's position (each process resumes those
/// it is assigned), the CDC position, tailed files and read view to process 0.
pub fn rescale(parts: Vec<Checkpoint>, process: usize, processes: usize, workers: usize) -> Result<Checkpoint> {
    let first = parts.first().context("a checkpoint without parts")?;
    let (from_processes, from_workers) = (parts.len(), first.state.len());
    let total = workers * processes;
    let all: Vec<WorkerState> = parts.iter().flat_map(|p| p.state.iter().cloned()).collect();
    let mut states = operators::rescale_states(&all, total)
        .with_context(|| format!("cannot re-split checkpoint {} for {total} workers", first.id))?;
    let state: Vec<WorkerState> = states.drain(process * workers..(process + 1) * workers).collect();
    let sequencers: Vec<Sequencer> = parts.iter().map(|p| p.sequencer.clone()).collect();
    let sequencer = Sequencer::rescale(&sequencers, total, processes)
        .map_err(|e| anyhow!("checkpoint {}: {e}", first.id))?
        .into_iter()
        .nth(process)
        .context("no sequencer for this process")?;
    let mut positions = Positions::default();
    for p in &parts {
        for (tp, offset) in &p.positions.kafka {
            let o = positions.kafka.entry(tp.clone()).or_insert(*offset);
            *o = (*o).max(*offset);
        }
    }
    if process == 0 {
        positions.lsn = first.positions.lsn;
        positions.files = first.positions.files.clone();
    }
    tracing::info!(
        "checkpoint {}: {from_processes} process(es) × {from_workers} worker(s) re-split for {processes} × {workers}",
        first.id
    );
    Ok(Checkpoint {
        id: first.id,
        created_ms: first.created_ms,
        sequencer,
        state,
        positions,
        view: if process == 0 { first.view.clone() } else { None },
        files: parts.get(process).map(|p| p.files.clone()).unwrap_or_default(),
        epoch_log: if processes == 1 && from_processes == 1 {
            first.epoch_log.clone()
        } else {
            None
        },
    })
}

/// The file of process `process`'s part of cluster checkpoint `id`.
fn part_name(id: u64, process: usize) -> String {
    format!("checkpoint-{id:012}.part-{process}.bin")
}

/// What a cluster checkpoint's manifest records.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The checkpoint.
    pub id: u64,
    /// How many processes took it (each wrote a part).
    pub processes: usize,
    /// When the manifest was written (unix ms).
    pub created_ms: i64,
}

/// Process 0: writes the manifest of cluster checkpoint `id` (atomically, synced), after
/// every process's part is durable.
pub fn write_manifest(dir: &Path, id: u64, processes: usize) -> Result<()> {
    let m = Manifest {
        id,
        processes,
        created_ms: now_ms(),
    };
    let name = format!("manifest-{id:012}.json");
    let (path, tmp) = (dir.join(&name), dir.join(format!(".{name}.tmp")));
    std::fs::write(&tmp, serde_json::to_vec(&m)?)
        .and_then(|()| File::open(&tmp)?.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot rename {} into place", tmp.display()))?;
    sync_dir(dir)
}

/// The newest manifest in `dir`, if any.
pub fn newest_manifest(dir: &Path) -> Result<Option<Manifest>> {
    if !dir.exists() {
        return Ok(None);
    }
    let Some((_, path)) = list_named(dir, "manifest-", ".json")?.pop() else {
        return Ok(None);
    };
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&bytes)
        .with_context(|| {
            format!(
                "{} is corrupt; move it away to start from the previous checkpoint",
                path.display()
            )
        })
        .map(Some)
}

/// Once cluster checkpoint `id` counts: removes process `process`'s parts older than the
/// checkpoint before it; process 0 also removes the older manifests, the older parts of
/// processes a rescaled cluster no longer has, and older single-process checkpoints (the
/// newest two manifests stay).
pub fn prune_cluster(dir: &Path, id: u64, process: usize) {
    let keep_from = id.saturating_sub(1);
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        // (checkpoint id, the process whose file it is: `None` for process 0's duties)
        let parsed = if let Some(rest) = name.strip_prefix("checkpoint-") {
            match rest.strip_suffix(".bin").and_then(|r| r.split_once(".part-")) {
                Some((n, p)) => n.parse::<u64>().ok().zip(p.parse::<usize>().ok().map(Some)),
                None => rest
                    .strip_suffix(".bin")
                    .and_then(|n| n.parse().ok())
                    .map(|n| (n, None)),
            }
        } else {
            name.strip_prefix("manifest-")
                .and_then(|r| r.strip_suffix(".json"))
                .and_then(|n| n.parse().ok())
                .map(|n| (n, None))
        };
        let Some((n, owner)) = parsed else { continue };
        let mine = owner == Some(process) || (process == 0 && owner.is_none_or(|p| p != 0));
        if n < keep_from && mine {
            let path = entry.path();
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    tracing::warn!("cannot remove old checkpoint file {}: {e}", path.display());
                }
                _ => {}
            }
        }
    }
}

/// The start-files record of one process (`part`, in a cluster) or of a single-process job.
fn start_files_name(part: Option<usize>) -> String {
    match part {
        Some(p) => format!("jsonl-lengths-at-start.part-{p}.json"),
        None => START_FILES.to_string(),
    }
}

fn remove_start_files(dir: &Path, part: Option<usize>) {
    let path = dir.join(start_files_name(part));
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            tracing::warn!("cannot remove {}: {e}", path.display());
        }
        _ => {}
    }
}

/// Records the JSONL files' lengths at the start of a job without a checkpoint in `dir`
/// (atomically), for [`start_files`]; `part` is the process of a cluster.
pub fn save_start_files(dir: &Path, part: Option<usize>, lengths: &BTreeMap<PathBuf, u64>) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create checkpoint directory {}", dir.display()))?;
    let name = start_files_name(part);
    let (path, tmp) = (dir.join(&name), dir.join(format!(".{name}.tmp")));
    let text = serde_json::to_vec(lengths)?;
    std::fs::write(&tmp, text)
        .and_then(|()| File::open(&tmp)?.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot rename {} into place", tmp.display()))?;
    sync_dir(dir)
}

/// The JSONL files' lengths saved by [`save_start_files`] (none once a checkpoint was written).
pub fn start_files(dir: &Path, part: Option<usize>) -> Result<BTreeMap<PathBuf, u64>> {
    let path = dir.join(start_files_name(part));
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
    list_named(dir, "checkpoint-", ".bin")
}

/// Files `<prefix><number><suffix>` in `dir` with their numbers, oldest first.
fn list_named(dir: &Path, prefix: &str, suffix: &str) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        let id = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|n| n.strip_suffix(suffix))
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
    /// The cluster checkpoint's id (all processes agree on it); `None`: the next number.
    id: Option<u64>,
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
    /// In a cluster: this process, which writes parts (`checkpoint-<n>.part-<p>.bin`).
    part: Option<usize>,
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
            part: None,
        }
    }

    /// In a cluster: this is process `process`; it writes its part of each checkpoint.
    pub fn with_part(mut self, process: usize) -> Self {
        self.part = Some(process);
        self
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
    /// and where the epochs after it are logged; a cluster gives the id all processes use.
    pub fn prepare(
        &self,
        epoch: u64,
        id: Option<u64>,
        sequencer: Sequencer,
        positions: Positions,
        log: Option<LogMark>,
    ) {
        if let Some((_, snapshots)) = &self.store {
            snapshots.request(epoch);
        }
        self.pending.lock().unwrap_or_else(PoisonError::into_inner).insert(
            epoch,
            Prepared {
                id,
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
    /// it is written by every sink) whose snapshots are in; returns the id and positions of
    /// the newest one completed, which the sources may now commit (in a cluster: once its
    /// manifest is written).
    pub fn complete(&self, durable_upto: u64) -> Result<Option<(u64, Positions)>> {
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
            let id = {
                let mut next = self.next_id.lock().unwrap_or_else(PoisonError::into_inner);
                let id = prepared.id.unwrap_or(*next);
                *next = id + 1;
                id
            };
            if let (Some((dir, _)), Some(state)) = (&self.store, state) {
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
                let bytes = match self.part {
                    Some(p) => ckpt.write_part(dir, p)?,
                    None => ckpt.write(dir)?,
                };
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
            done = Some((id, prepared.positions));
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
type Reply = tokio::sync::oneshot::Sender<Result<Option<(u64, Positions)>>>;

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
    pub async fn complete(&self, durable_upto: u64) -> Result<Option<(u64, Positions)>> {
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

    /// A part whose workers hold empty (but decodable) operator state.
    fn part(id: u64, process: usize) -> Checkpoint {
        // bincode: an empty map or vector is its length, 8 zero bytes; the keyed image has
        // five of them, a throttle one.
        let empty = WorkerState {
            keyed: vec![0; 40],
            throttle: vec![0; 8],
            aggregates: Vec::new(),
        };
        Checkpoint {
            id,
            created_ms: 0,
            sequencer: Sequencer::new(4, id),
            state: vec![empty; 2],
            positions: Positions {
                lsn: Some(id * 10 + process as u64),
                kafka: BTreeMap::from([(("prices".to_string(), process as i32), id as i64 * 100)]),
                ..Default::default()
            },
            view: None,
            files: BTreeMap::new(),
            epoch_log: None,
        }
    }

    #[test]
    fn a_cluster_checkpoint_is_restored_only_with_its_manifest_and_old_parts_go() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert!(Checkpoint::load_for(d, 1, 2, 2).unwrap().is_none());
        save_start_files(d, Some(1), &BTreeMap::from([(PathBuf::from("a.jsonl"), 7)])).unwrap();
        assert_eq!(start_files(d, Some(1)).unwrap().len(), 1);
        assert!(start_files(d, Some(0)).unwrap().is_empty(), "each process has its own");
        for id in 1..=4 {
            for p in 0..2 {
                part(id, p).write_part(d, p).unwrap();
            }
        }
        assert!(
            start_files(d, Some(1)).unwrap().is_empty(),
            "a written part replaces them"
        );
        // Parts without a manifest do not count; single-process checkpoints ignore them.
        assert!(Checkpoint::load_for(d, 1, 2, 2).unwrap().is_none());
        assert!(Checkpoint::load_latest(d).unwrap().is_none());
        write_manifest(d, 2, 2).unwrap();
        write_manifest(d, 3, 2).unwrap();
        let got = Checkpoint::load_for(d, 1, 2, 2).unwrap().unwrap();
        assert_eq!(
            (got.id, got.positions.lsn),
            (3, Some(31)),
            "the same shape: its own part"
        );
        // Another shape: every part, re-split; every partition's position; CDC to process 0.
        for (process, processes, workers) in [(0, 1, 1), (2, 3, 2), (0, 3, 1)] {
            let got = Checkpoint::load_for(d, process, processes, workers).unwrap().unwrap();
            assert_eq!(got.id, 3);
            assert_eq!(got.state.len(), workers);
            assert_eq!(got.sequencer.workers(), workers * processes);
            assert_eq!(got.positions.kafka.len(), 2, "both processes' partitions");
            assert_eq!(got.positions.lsn, (process == 0).then_some(30));
        }
        prune_cluster(d, 3, 0);
        prune_cluster(d, 3, 1);
        let mut names: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "checkpoint-000000000002.part-0.bin",
                "checkpoint-000000000002.part-1.bin",
                "checkpoint-000000000003.part-0.bin",
                "checkpoint-000000000003.part-1.bin",
                "checkpoint-000000000004.part-0.bin",
                "checkpoint-000000000004.part-1.bin",
                "manifest-000000000002.json",
                "manifest-000000000003.json",
            ]
        );
        std::fs::remove_file(d.join("checkpoint-000000000003.part-0.bin")).unwrap();
        let err = Checkpoint::load_for(d, 0, 2, 2).unwrap_err();
        assert!(
            format!("{err:#}").contains("process 0's part is not readable"),
            "{err:#}"
        );
    }
}
