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
use operators::{Sequencer, SequencerImage, Snapshots, WorkerState};
use serde::{Deserialize, Serialize};

/// First bytes of a checkpoint file (format version 7: with protocol metadata, the live
/// aggregates' state, the open TVL updates, the JSONL files' lengths, the epoch log's mark,
/// the deleted rules' throttle deadlines and incremental rules).
const MAGIC: &[u8; 8] = b"LLFCKPT7";
/// Checkpoint files kept in the directory.
const KEEP: usize = 2;
/// The JSONL files' lengths when a job started without a checkpoint: a restart before the
/// first checkpoint goes back to them (removed once a checkpoint exists).
const START_FILES: &str = "jsonl-lengths-at-start.json";

pub use sources::live::Positions;

use crate::live::reclock::{self, LogMark};

pub mod shared;
pub use shared::Shared;

/// A consistent cut of the job.
#[derive(Debug, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Number of this checkpoint (increasing over restarts).
    pub id: u64,
    /// When it was taken (unix ms).
    pub created_ms: i64,
    /// The ingest front's sequencer after the cut (its rule routes incremental like the
    /// workers' rules: see `sequencer_base`).
    pub sequencer: SequencerImage,
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
    /// Per worker: the checkpoint (of this process) holding every rule that worker's state
    /// is relative to (an incremental snapshot holds only the rules changed since; see
    /// `operators::WorkerState::rebase`), or `None` when the state holds every rule.
    pub bases: Vec<Option<u64>>,
    /// The same for the sequencer's rule routes (`SequencerImage::rebase`).
    pub sequencer_base: Option<u64>,
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
    /// Writes the checkpoint atomically into `dir`; returns its file name and size. Old ones
    /// go with [`Locations::prune`].
    pub fn write(&self, dir: &Path) -> Result<(String, u64)> {
        let name = single_name(self.id);
        let bytes = self.write_as(dir, &name)?;
        remove_start_files(dir, None);
        Ok((name, bytes))
    }

    /// Writes process `process`'s part of a cluster checkpoint atomically into `dir`; returns
    /// its file name and size. Old parts go once newer manifests exist ([`Locations::prune`]).
    pub fn write_part(&self, dir: &Path, process: usize) -> Result<(String, u64)> {
        let name = part_name(self.id, process);
        let bytes = self.write_as(dir, &name)?;
        remove_start_files(dir, Some(process));
        Ok((name, bytes))
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

    /// Decodes a checkpoint file's contents; `what` names the file in errors.
    fn decode(bytes: &[u8], what: &str) -> Result<Checkpoint> {
        let body = bytes.strip_prefix(MAGIC.as_slice()).with_context(|| {
            format!("{what} is not a llamaflow checkpoint of this version (6); move it away to start over")
        })?;
        bincode::deserialize(body)
            .with_context(|| format!("checkpoint {what} is corrupt; move it away to start from the previous one"))
    }

    /// Makes every worker's state whole: an incremental worker state is rebased on its base
    /// checkpoint's state of that worker, read with `base` (by checkpoint id).
    fn resolve(mut self, mut base: impl FnMut(u64) -> Result<Checkpoint>) -> Result<Checkpoint> {
        let ids: std::collections::BTreeSet<u64> = self
            .bases
            .iter()
            .flatten()
            .chain(&self.sequencer_base)
            .copied()
            .collect();
        for id in ids {
            let whole = base(id)?;
            if self.sequencer_base == Some(id) {
                self.sequencer = self.sequencer.rebase(&whole.sequencer).map_err(|e| {
                    anyhow!(
                        "checkpoint {}: the sequencer's routes from checkpoint {id}: {e}",
                        self.id
                    )
                })?;
                self.sequencer_base = None;
            }
            if !self.bases.contains(&Some(id)) {
                continue;
            }
            if whole.state.len() != self.state.len() {
                anyhow::bail!(
                    "checkpoint {} refers to checkpoint {id} for its rules, which holds {} workers' state, not {}",
                    self.id,
                    whole.state.len(),
                    self.state.len()
                );
            }
            for (w, b) in self.bases.iter_mut().enumerate() {
                if *b == Some(id) {
                    self.state[w] = self.state[w]
                        .rebase(&whole.state[w])
                        .with_context(|| format!("checkpoint {}: worker {w}'s rules from checkpoint {id}", self.id))?;
                    *b = None;
                }
            }
        }
        Ok(self)
    }
}

/// A checkpoint that counts: a single process's file, or a cluster's parts with a manifest.
/// The processes of a cluster each offer the newest they can see and restore the newest
/// offered ([`crate::engine::Engine::connect`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Newest {
    /// The checkpoint.
    pub id: u64,
    /// How many processes took it (1: a single-process checkpoint file).
    pub processes: usize,
}

/// Where a job's checkpoints are: this process's own directory and, optionally, a location
/// shared by every process and host ([`Shared`]). Files are written to the directory first,
/// then copied to the shared location; reads take the directory's copy, else the shared one.
pub struct Locations {
    /// This process's checkpoint directory (local disk, or one volume for every process).
    pub dir: PathBuf,
    /// The shared location, if any.
    pub shared: Option<Shared>,
}

impl Locations {
    /// The locations `dir` and `shared`.
    pub fn new(dir: PathBuf, shared: Option<Shared>) -> Self {
        Locations { dir, shared }
    }

    /// The file names in the directory and, separately, in the shared location.
    fn names(&self) -> Result<(Vec<String>, Vec<String>)> {
        let local = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("cannot list {}", self.dir.display())),
        };
        let shared = match &self.shared {
            Some(s) => s.list()?,
            None => Vec::new(),
        };
        Ok((local, shared))
    }

    /// The newest checkpoint that counts here or in the shared location: a single-process
    /// checkpoint, or a cluster checkpoint with a manifest.
    pub fn newest(&self) -> Result<Option<Newest>> {
        let (local, shared) = self.names()?;
        let newest = local
            .iter()
            .chain(&shared)
            .filter_map(|n| parse_name(n))
            .filter(|(_, owner)| matches!(owner, FileOf::Single | FileOf::Manifest))
            .max_by_key(|(id, owner)| (*id, *owner == FileOf::Manifest));
        match newest {
            None => Ok(None),
            Some((id, FileOf::Manifest)) => {
                let name = manifest_name(id);
                let bytes = self.get(&name)?.with_context(|| format!("manifest {name} vanished"))?;
                let m: Manifest = serde_json::from_slice(&bytes).with_context(|| {
                    format!("{name} is corrupt; move it away to start from the previous checkpoint")
                })?;
                Ok(Some(Newest {
                    id,
                    processes: m.processes,
                }))
            }
            Some((id, _)) => Ok(Some(Newest { id, processes: 1 })),
        }
    }

    /// The contents of `name`: the directory's copy, else the shared one.
    fn get(&self, name: &str) -> Result<Option<Vec<u8>>> {
        match std::fs::read(self.dir.join(name)) {
            Ok(b) => return Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", self.dir.join(name).display())),
        }
        match &self.shared {
            Some(s) => {
                let got = s.get(name)?;
                if got.is_some() {
                    eprintln!(
                        "llamaflow: {name} is not in {}: reading it from {}",
                        self.dir.display(),
                        s.describe()
                    );
                }
                Ok(got)
            }
            None => Ok(None),
        }
    }

    /// Checkpoint file `file(id)` (of checkpoint `newest`), decoded and made whole with the
    /// files of its bases ([`Checkpoint::resolve`]).
    fn read(&self, file: impl Fn(u64) -> String, id: u64, newest: Newest) -> Result<Checkpoint> {
        self.read_file(&file(id), newest)?
            .resolve(|base| self.read_file(&file(base), newest))
    }

    /// Checkpoint file `name` (of checkpoint `newest`), decoded; the error says where it was
    /// looked for.
    fn read_file(&self, name: &str, newest: Newest) -> Result<Checkpoint> {
        let Some(bytes) = self.get(name)? else {
            let places = match &self.shared {
                Some(s) => format!("neither in {} nor in {}", self.dir.display(), s.describe()),
                None => format!(
                    "not in {} (and no pipeline.checkpoint_shared is set)",
                    self.dir.display()
                ),
            };
            anyhow::bail!(
                "checkpoint {} counts (taken by {} process(es)) but its file {name} is {places}: give every \
                 process the checkpoints of the cluster — one shared volume as checkpoint_dir, or \
                 pipeline.checkpoint_shared — or move the checkpoint directory away to start over",
                newest.id,
                newest.processes
            );
        };
        Checkpoint::decode(&bytes, name)
    }

    /// Checkpoint `newest` as process `process` of `processes` (with `workers` workers
    /// each) restores it: taken with the same shape, this process's own part; otherwise
    /// every part is read and the state re-split for this shape ([`rescale`]).
    pub fn load(&self, newest: Newest, process: usize, processes: usize, workers: usize) -> Result<Checkpoint> {
        if newest.processes == 1 {
            let ck = self.read(single_name, newest.id, newest)?;
            if processes == 1 && ck.state.len() == workers {
                return Ok(ck);
            }
            return rescale(vec![ck], process, processes, workers);
        }
        if newest.processes == processes {
            let own = self.read(|id| part_name(id, process), newest.id, newest)?;
            if own.state.len() == workers {
                return Ok(own);
            }
        }
        let parts = (0..newest.processes)
            .map(|p| self.read(|id| part_name(id, p), newest.id, newest))
            .collect::<Result<Vec<_>>>()?;
        rescale(parts, process, processes, workers)
    }

    /// Copies checkpoint file `name` from the directory to the shared location, if any.
    pub fn share(&self, name: &str) -> Result<()> {
        match &self.shared {
            Some(s) => s
                .put_file(name, &self.dir.join(name))
                .with_context(|| format!("cannot copy {name} to {}", s.describe())),
            None => Ok(()),
        }
    }

    /// Process 0: writes the manifest of cluster checkpoint `id` (atomically, synced) in the
    /// directory, then in the shared location, after every process's part is durable.
    pub fn write_manifest(&self, id: u64, processes: usize) -> Result<()> {
        let m = Manifest {
            id,
            processes,
            created_ms: now_ms(),
        };
        let name = manifest_name(id);
        let bytes = serde_json::to_vec(&m)?;
        write_atomic(&self.dir, &name, &bytes)?;
        match &self.shared {
            Some(s) => s
                .put_bytes(&name, &bytes)
                .with_context(|| format!("cannot write {name} to {}", s.describe())),
            None => Ok(()),
        }
    }

    /// Once checkpoint `id` counts: removes the files older than the checkpoint before it,
    /// here and in the shared location, except the checkpoints in `keep` (the bases of those
    /// kept). Process `process` of `processes` removes its own parts; process 0 (or a single
    /// process) also the manifests, single-process checkpoints and the parts of processes a
    /// rescaled cluster no longer has.
    pub fn prune(&self, id: u64, process: usize, processes: usize, keep: &std::collections::BTreeSet<u64>) {
        let keep_from = id.saturating_sub(1);
        let stale = |name: &str| {
            parse_name(name).is_some_and(|(n, owner)| {
                let mine = match owner {
                    FileOf::Part(p) => p == process || (process == 0 && p >= processes),
                    FileOf::Single | FileOf::Manifest => process == 0,
                };
                n < keep_from && mine && !(keep.contains(&n) && owner != FileOf::Manifest)
            })
        };
        let (local, shared) = match self.names() {
            Ok(names) => names,
            Err(e) => {
                tracing::warn!("cannot list old checkpoints: {e:#}");
                return;
            }
        };
        for name in local.iter().filter(|n| stale(n)) {
            let path = self.dir.join(name);
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    tracing::warn!("cannot remove old checkpoint file {}: {e}", path.display());
                }
                _ => {}
            }
        }
        if let Some(s) = &self.shared {
            for name in shared.iter().filter(|n| stale(n)) {
                if let Err(e) = s.delete(name) {
                    tracing::warn!("{e:#}");
                }
            }
        }
    }
}

/// What a checkpoint file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FileOf {
    /// A single-process checkpoint.
    Single,
    /// A cluster checkpoint's manifest.
    Manifest,
    /// Process `p`'s part of a cluster checkpoint.
    Part(usize),
}

/// The checkpoint id and kind of a checkpoint file's name.
fn parse_name(name: &str) -> Option<(u64, FileOf)> {
    if let Some(rest) = name.strip_prefix("manifest-") {
        return Some((rest.strip_suffix(".json")?.parse().ok()?, FileOf::Manifest));
    }
    let rest = name.strip_prefix("checkpoint-")?.strip_suffix(".bin")?;
    match rest.split_once(".part-") {
        Some((n, p)) => Some((n.parse().ok()?, FileOf::Part(p.parse().ok()?))),
        None => Some((rest.parse().ok()?, FileOf::Single)),
    }
}

/// The file of single-process checkpoint `id`.
fn single_name(id: u64) -> String {
    format!("checkpoint-{id:012}.bin")
}

/// The file of cluster checkpoint `id`'s manifest.
fn manifest_name(id: u64) -> String {
    format!("manifest-{id:012}.json")
}

/// A checkpoint's parts (a cluster's, in process order, or one single-process checkpoint)
/// re-split for process `process` of `processes` with `workers` workers each: the workers'
/// state by the dataflow's routing (`operators::rescale_states`), the sequencer for the new
/// shape (`Sequencer::rescale`), every Kafka partition's position (each process resumes those
/// it is assigned), the CDC position, tailed files and read view to process 0.
pub fn rescale(parts: Vec<Checkpoint>, process: usize, processes: usize, workers: usize) -> Result<Checkpoint> {
    let first = parts.first().context("a checkpoint without parts")?;
    anyhow::ensure!(
        parts
            .iter()
            .all(|p| p.bases.iter().all(Option::is_none) && p.sequencer_base.is_none()),
        "checkpoint {}: incremental parts must be made whole before they are re-split",
        first.id
    );
    let (from_processes, from_workers) = (parts.len(), first.state.len());
    let total = workers * processes;
    let all: Vec<WorkerState> = parts.iter().flat_map(|p| p.state.iter().cloned()).collect();
    let mut states = operators::rescale_states(&all, total)
        .with_context(|| format!("cannot re-split checkpoint {} for {total} workers", first.id))?;
    let state: Vec<WorkerState> = states.drain(process * workers..(process + 1) * workers).collect();
    let sequencers = parts
        .iter()
        .map(|p| p.sequencer.whole().cloned())
        .collect::<Result<Vec<Sequencer>, String>>()
        .map_err(|e| anyhow!("checkpoint {}: {e}", first.id))?;
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
        sequencer: sequencer.whole_image(),
        state,
        positions,
        view: if process == 0 { first.view.clone() } else { None },
        files: parts.get(process).map(|p| p.files.clone()).unwrap_or_default(),
        epoch_log: if processes == 1 && from_processes == 1 {
            first.epoch_log.clone()
        } else {
            None
        },
        bases: vec![None; workers],
        sequencer_base: None,
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
    write_atomic(dir, &start_files_name(part), &serde_json::to_vec(lengths)?)
}

/// Writes `bytes` to `dir/name` (creating `dir`) through a synced temporary file and a
/// rename, then syncs the directory: the file is there whole or not at all.
pub(crate) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create checkpoint directory {}", dir.display()))?;
    let (path, tmp) = (dir.join(name), dir.join(format!(".{name}.tmp")));
    std::fs::write(&tmp, bytes)
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
    sequencer: SequencerImage,
    positions: Positions,
    log: Option<LogMark>,
}

/// Drives checkpoints: the ingest front [prepares](Checkpointer::prepare) one at an epoch; it
/// [completes](Checkpointer::complete) once the operators' snapshot is in and every sink has
/// written every epoch up to it.
pub struct Checkpointer {
    /// Where state is saved, with the snapshots to save; `None`: positions only.
    store: Option<(Arc<Locations>, Snapshots)>,
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
    /// Incremental snapshots: the checkpoints written (or restored), by id, with their epoch
    /// and their bases; a worker's state refers to its base by epoch, a file by id.
    written: Mutex<BTreeMap<u64, Written>>,
}

/// A checkpoint this process wrote.
struct Written {
    epoch: u64,
    /// The checkpoints holding the rules it is relative to.
    bases: std::collections::BTreeSet<u64>,
}

impl Checkpointer {
    /// Checkpoints into `store`'s locations with its snapshots (`None`: positions are still
    /// committed at each cut, but no state is saved), numbered after `last_id`.
    pub fn new(store: Option<(Arc<Locations>, Snapshots)>, last_id: u64) -> Self {
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
            written: Default::default(),
        }
    }

    /// The checkpoints from `from` on and those they need for their rules: what pruning
    /// keeps.
    pub fn needed_from(&self, from: u64) -> std::collections::BTreeSet<u64> {
        let written = self.written.lock().unwrap_or_else(PoisonError::into_inner);
        written
            .range(from..)
            .flat_map(|(id, w)| w.bases.iter().copied().chain([*id]))
            .collect()
    }

    /// The bases of checkpoint `id` (at `epoch`): each incremental worker state's base
    /// epoch, and the sequencer's (`sequencer_base`), become the ids of the checkpoints
    /// written at them.
    fn bases_of(
        &self,
        id: u64,
        epoch: u64,
        state: &[WorkerState],
        sequencer_base: Option<u64>,
    ) -> Result<(Vec<Option<u64>>, Option<u64>)> {
        let mut written = self.written.lock().unwrap_or_else(PoisonError::into_inner);
        let id_at = |at: u64, what: &str| {
            written
                .iter()
                .find(|(_, c)| c.epoch == at)
                .map(|(id, _)| *id)
                .with_context(|| {
                    format!(
                        "{what}'s incremental snapshot at epoch {epoch} refers to the snapshot of epoch {at}, \
                         which no checkpoint written by this process holds"
                    )
                })
        };
        let bases = state
            .iter()
            .enumerate()
            .map(
                |(w, s)| match s.rule_base().context("cannot read a worker's snapshot")? {
                    Some(at) => id_at(at, &format!("worker {w}")).map(Some),
                    None => Ok(None),
                },
            )
            .collect::<Result<Vec<_>>>()?;
        let sequencer_base = sequencer_base.map(|at| id_at(at, "the sequencer")).transpose()?;
        // Later snapshots can only refer to this one or to the bases it refers to.
        let all: std::collections::BTreeSet<u64> = bases.iter().flatten().chain(&sequencer_base).copied().collect();
        let oldest = all.first().copied().unwrap_or(id).min(id);
        written.retain(|k, _| *k >= oldest);
        written.insert(id, Written { epoch, bases: all });
        Ok((bases, sequencer_base))
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
        sequencer: SequencerImage,
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
            if let (Some((loc, _)), Some(state)) = (&self.store, state) {
                let (bases, sequencer_base) = self.bases_of(id, epoch, &state, prepared.sequencer.base())?;
                let incremental = bases.iter().flatten().count();
                let ckpt = Checkpoint {
                    id,
                    created_ms: now_ms(),
                    sequencer: prepared.sequencer,
                    state,
                    positions: prepared.positions.clone(),
                    view,
                    files,
                    epoch_log: prepared.log.clone(),
                    bases,
                    sequencer_base,
                };
                let (name, bytes) = match self.part {
                    Some(p) => ckpt.write_part(&loc.dir, p)?,
                    None => ckpt.write(&loc.dir)?,
                };
                loc.share(&name)?;
                if self.part.is_none() {
                    loc.prune(id, 0, 1, &self.needed_from(id.saturating_sub(1)));
                }
                if let Some(mark) = prepared.log {
                    let mut marks = self.log_marks.lock().unwrap_or_else(PoisonError::into_inner);
                    marks.push_back(mark);
                    while marks.len() > KEEP {
                        marks.pop_front();
                    }
                    if let Some(oldest) = marks.front() {
                        reclock::prune(&loc.dir, oldest);
                    }
                }
                metrics::gauge!("llamaflow_checkpoint_bytes").set(bytes as f64);
                metrics::gauge!("llamaflow_checkpoint_incremental_workers").set(incremental as f64);
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
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn files_are_atomic_numbered_and_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let loc = Locations::new(dir.path().to_path_buf(), None);
        assert!(loc.newest().unwrap().is_none());
        for id in 1..=4 {
            let mut ck = part(id, 0);
            ck.positions.lsn = Some(id * 10);
            ck.view = (id == 4).then(|| vec![1, 2, 3]);
            ck.files = BTreeMap::from([(PathBuf::from("alerts.jsonl"), id * 100)]);
            ck.write(dir.path()).unwrap();
            loc.prune(id, 0, 1, &BTreeSet::new());
        }
        let newest = loc.newest().unwrap().unwrap();
        assert_eq!(newest, Newest { id: 4, processes: 1 });
        let latest = loc.load(newest, 0, 1, 2).unwrap();
        assert_eq!(
            (
                latest.id,
                latest.positions.lsn,
                latest.sequencer.whole().unwrap().next_seq()
            ),
            (4, Some(40), 4)
        );
        assert_eq!(latest.view, Some(vec![1, 2, 3]));
        assert_eq!(latest.files[Path::new("alerts.jsonl")], 400);
        let names = names_in(dir.path());
        assert_eq!(names.len(), KEEP, "only the newest are kept: {names:?}");
        std::fs::write(dir.path().join("checkpoint-000000000009.bin"), b"garbage").unwrap();
        let newest = loc.newest().unwrap().unwrap();
        let err = loc.load(newest, 0, 1, 2).unwrap_err();
        assert!(format!("{err:#}").contains("not a llamaflow checkpoint"), "{err:#}");
    }

    /// Incremental checkpoints: a checkpoint whose workers refer to an older one for their
    /// rules is restored with it, pruning keeps that base however old it is, and a missing
    /// base is an error naming it.
    #[test]
    fn an_incremental_checkpoint_is_restored_with_its_base_which_pruning_keeps() {
        let dir = tempfile::tempdir().unwrap();
        let loc = Locations::new(dir.path().to_path_buf(), None);
        // Real snapshots of two workers: after 100 rules (every rule: the base), then after
        // ten more and a deletion (incremental, relative to the first).
        let mut rules: Vec<Input> = (0..100).map(rule).collect();
        rules.extend(tick(0.5, 1_717_430_400));
        let mut changes: Vec<Input> = (100..110).map(rule).collect();
        changes.push(Input::Delete("r0".into()));
        let (snaps, _) = run_engine(None, vec![rules, changes], &[0, 1]);
        let ((whole, whole_seq), (delta, delta_seq)) = (&snaps[0], &snaps[1]);
        assert!(whole.iter().all(|s| s.rule_base().unwrap().is_none()));
        assert!(delta.iter().all(|s| s.rule_base().unwrap() == Some(0)), "incremental");
        assert_eq!(
            (whole_seq.base(), delta_seq.base()),
            (None, Some(0)),
            "the sequencer too"
        );
        assert!(
            bincode::serialized_size(delta_seq).unwrap() * 4 < bincode::serialized_size(whole_seq).unwrap(),
            "the sequencer's changed routes are smaller than all of them"
        );
        assert!(
            delta.iter().map(|s| s.keyed.len()).sum::<usize>() * 4 < whole.iter().map(|s| s.keyed.len()).sum::<usize>(),
            "the changes are smaller than every rule"
        );
        let mut base = part(1, 0);
        base.state = whole.clone();
        base.sequencer = whole_seq.clone();
        base.write(dir.path()).unwrap();
        // Checkpoints 2..=5 refer to checkpoint 1 for their rules.
        for id in 2..=5 {
            let mut ck = part(id, 0);
            ck.state = delta.clone();
            ck.bases = vec![Some(1), Some(1)];
            ck.sequencer = delta_seq.clone();
            ck.sequencer_base = Some(1);
            ck.write(dir.path()).unwrap();
            loc.prune(id, 0, 1, &BTreeSet::from([1, id - 1, id]));
        }
        assert_eq!(
            names_in(dir.path()),
            [
                "checkpoint-000000000001.bin",
                "checkpoint-000000000004.bin",
                "checkpoint-000000000005.bin"
            ],
            "the base stays"
        );
        let got = loc.load(Newest { id: 5, processes: 1 }, 0, 1, 2).unwrap();
        assert_eq!((got.bases, got.sequencer_base), (vec![None, None], None), "made whole");
        // Restored, the rules are those after the changes: r0 is gone, r100..r109 are there
        // (from 0.5 to 1000, every threshold is crossed). Deleting r5 (routed in the base)
        // and r105 (routed in the changes) needs the sequencer's routes of both.
        let sequencer = got.sequencer.whole().unwrap().clone();
        let mut last = vec![Input::Delete("r5".into()), Input::Delete("r105".into())];
        last.extend(tick(1000.0, 1_717_430_460));
        let (_, fired) = run_engine(Some((got.state, sequencer)), vec![last], &[]);
        let expected: Vec<String> = (1..110)
            .filter(|i| ![5, 105].contains(i))
            .map(|i| format!("r{i}"))
            .collect();
        assert_eq!(fired, expected);
        // Re-split for another shape: every worker whole first.
        let resplit = loc.load(Newest { id: 5, processes: 1 }, 0, 1, 3).unwrap();
        assert_eq!(resplit.state.len(), 3);
        std::fs::remove_file(dir.path().join("checkpoint-000000000001.bin")).unwrap();
        let err = format!("{:#}", loc.load(Newest { id: 5, processes: 1 }, 0, 1, 2).unwrap_err());
        assert!(err.contains("checkpoint-000000000001.bin is not in"), "{err}");
    }

    /// An input of [`run_engine`].
    enum Input {
        Record(schemas::Record),
        Delete(String),
    }

    /// Rule `r<i>`: alert when `coingecko:c<i % 10>` crosses above `i + 1`.
    fn rule(i: u32) -> Input {
        let line = serde_json::json!({"id": format!("r{i}"), "user_id": "u1", "alert_type": "price_threshold",
            "conditions": {"coin": format!("coingecko:c{}", i % 10), "operator": ">", "value": i + 1},
            "throttle_minutes": 0});
        Input::Record(schemas::parse_record(schemas::Kind::Rule, &line.to_string()).unwrap())
    }

    /// A price tick of `price` at `timestamp` (s) for each of the coins `coingecko:c0..c9`.
    fn tick(price: f64, timestamp: i64) -> Vec<Input> {
        (0..10)
            .map(|c| {
                let line = format!(r#"{{"coin": "coingecko:c{c}", "price": {price}, "timestamp": {timestamp}}}"#);
                Input::Record(schemas::parse_record(schemas::Kind::Price, &line).unwrap())
            })
            .collect()
    }

    /// Runs the operators on two workers from `restore` (or empty state) over `epochs`, with
    /// snapshots after the epochs in `snap`: the snapshots with the sequencer's image at each,
    /// and the rule ids of the alerts (sorted).
    fn run_engine(
        restore: Option<(Vec<WorkerState>, Sequencer)>,
        epochs: Vec<Vec<Input>>,
        snap: &[u64],
    ) -> (Vec<(Vec<WorkerState>, SequencerImage)>, Vec<String>) {
        use crate::engine::{Engine, EngineCheckpoint, Output};
        #[derive(Default)]
        struct Alerts(Mutex<Vec<String>>);
        impl Output for Alerts {
            fn alerts(&self, _: u64, alerts: Vec<schemas::Alert>) {
                self.0.lock().unwrap().extend(alerts.iter().map(|a| a.rule_id.clone()));
            }
            fn events(&self, _: u64, _: Vec<schemas::Event>) {}
            fn dead(&self, _: u64, _: Vec<schemas::DeadLetter>) {}
        }
        let snapshots = Snapshots::new(2);
        let alerts = Arc::new(Alerts::default());
        let (restore, sequencer) = restore.unzip();
        let ckpt = EngineCheckpoint {
            snapshots: Some(snapshots.clone()),
            restore,
            sequencer,
        };
        let mut engine = Engine::start(2, Default::default(), alerts.clone(), ckpt).unwrap();
        let src = schemas::SourceName::from("test");
        let mut images = Vec::new();
        for (epoch, inputs) in epochs.into_iter().enumerate() {
            let snapshot = snap.contains(&(epoch as u64));
            if snapshot {
                snapshots.request(epoch as u64);
            }
            let mut batch = Vec::new();
            for (i, input) in inputs.into_iter().enumerate() {
                let pos = schemas::SourcePos::new(src, (epoch * 1000 + i) as u64);
                match input {
                    Input::Record(r) => engine.sequencer().push(pos, r, &mut batch),
                    Input::Delete(id) => engine.sequencer().delete_rule(pos, &id, &mut batch),
                }
            }
            if snapshot {
                images.push(engine.sequencer().image(epoch as u64));
            }
            engine.send(batch).unwrap();
        }
        engine.finish().unwrap();
        let taken = snap
            .iter()
            .zip(images)
            .map(|(e, image)| (snapshots.take(*e).unwrap().unwrap(), image))
            .collect();
        let mut fired = alerts.0.lock().unwrap().clone();
        fired.sort_by_key(|id| id[1..].parse::<u32>().unwrap_or_default());
        (taken, fired)
    }

    /// A part whose workers hold empty (but decodable) operator state.
    fn part(id: u64, process: usize) -> Checkpoint {
        // bincode: an empty map or vector is its length, 8 zero bytes; the keyed image has
        // six of them after the base (`None`: one zero byte), a throttle one.
        let empty = WorkerState {
            keyed: vec![0; 49],
            throttle: vec![0; 8],
            aggregates: Vec::new(),
        };
        Checkpoint {
            id,
            created_ms: 0,
            sequencer: Sequencer::new(4, id).whole_image(),
            state: vec![empty; 2],
            positions: Positions {
                lsn: Some(id * 10 + process as u64),
                kafka: BTreeMap::from([(("prices".to_string(), process as i32), id as i64 * 100)]),
                ..Default::default()
            },
            view: None,
            files: BTreeMap::new(),
            epoch_log: None,
            bases: vec![None; 2],
            sequencer_base: None,
        }
    }

    /// The names of the files in `dir`, sorted.
    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_cluster_checkpoint_is_restored_only_with_its_manifest_and_old_parts_go() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let loc = Locations::new(d.to_path_buf(), None);
        assert!(loc.newest().unwrap().is_none());
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
        assert!(loc.newest().unwrap().is_none());
        loc.write_manifest(2, 2).unwrap();
        loc.write_manifest(3, 2).unwrap();
        let newest = loc.newest().unwrap().unwrap();
        assert_eq!(newest, Newest { id: 3, processes: 2 });
        let got = loc.load(newest, 1, 2, 2).unwrap();
        assert_eq!(
            (got.id, got.positions.lsn),
            (3, Some(31)),
            "the same shape: its own part"
        );
        // Another shape: every part, re-split; every partition's position; CDC to process 0.
        for (process, processes, workers) in [(0, 1, 1), (2, 3, 2), (0, 3, 1)] {
            let got = loc.load(newest, process, processes, workers).unwrap();
            assert_eq!(got.id, 3);
            assert_eq!(got.state.len(), workers);
            assert_eq!(got.sequencer.whole().unwrap().workers(), workers * processes);
            assert_eq!(got.positions.kafka.len(), 2, "both processes' partitions");
            assert_eq!(got.positions.lsn, (process == 0).then_some(30));
        }
        loc.prune(3, 0, 2, &BTreeSet::new());
        loc.prune(3, 1, 2, &BTreeSet::new());
        assert_eq!(
            names_in(d),
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
        let err = loc.load(newest, 0, 2, 2).unwrap_err();
        assert!(
            format!("{err:#}").contains("checkpoint-000000000003.part-0.bin is not in"),
            "{err:#}"
        );
    }

    /// Processes with directories of their own and a shared location: every file is
    /// written locally and copied to the shared location; a process whose directory is empty
    /// (moved to another host) restores from the shared copies; without a shared location the
    /// error says what is missing where.
    fn local_directories_with_a_shared_location(shared: impl Fn() -> Shared) {
        let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
        let procs: Vec<Locations> = dirs
            .iter()
            .map(|d| Locations::new(d.path().to_path_buf(), Some(shared())))
            .collect();
        for id in 1..=3 {
            for (p, loc) in procs.iter().enumerate() {
                let (name, _) = part(id, p).write_part(&loc.dir, p).unwrap();
                loc.share(&name).unwrap();
            }
            procs[0].write_manifest(id, 2).unwrap();
            procs[0].prune(id, 0, 2, &BTreeSet::new());
            procs[1].prune(id, 1, 2, &BTreeSet::new());
        }
        let newest = Newest { id: 3, processes: 2 };
        // Process 1's own directory holds no manifest: process 0's offer (or the shared
        // copy) tells which checkpoint counts.
        assert_eq!(procs[0].newest().unwrap(), Some(newest));
        assert_eq!(procs[1].newest().unwrap(), Some(newest), "the shared manifest");
        let own = Locations::new(procs[1].dir.clone(), None);
        assert_eq!(
            own.newest().unwrap(),
            None,
            "its own directory has parts, not manifests"
        );
        assert_eq!(own.load(newest, 1, 2, 2).unwrap().positions.lsn, Some(31));
        // Pruned in both places: checkpoints 2 and 3 remain.
        let mut in_shared = shared().list().unwrap();
        in_shared.sort();
        assert_eq!(
            in_shared,
            [
                "checkpoint-000000000002.part-0.bin",
                "checkpoint-000000000002.part-1.bin",
                "checkpoint-000000000003.part-0.bin",
                "checkpoint-000000000003.part-1.bin",
                "manifest-000000000002.json",
                "manifest-000000000003.json",
            ]
        );
        assert_eq!(names_in(&procs[1].dir).len(), 2, "process 1 keeps its own two parts");
        // Process 1 moves to an empty directory: its part comes from the shared location.
        let moved_dir = tempfile::tempdir().unwrap();
        let moved = Locations::new(moved_dir.path().to_path_buf(), Some(shared()));
        let got = moved.load(newest, 1, 2, 2).unwrap();
        assert_eq!((got.id, got.positions.lsn), (3, Some(31)));
        // Restored at another shape from one process's directory: every part is read, the
        // other's from the shared location.
        let one = procs[0].load(newest, 0, 1, 1).unwrap();
        assert_eq!(one.positions.kafka.len(), 2, "both processes' partitions");
        // Without the shared location, the other part cannot be found: the error says where
        // it was looked for and what to do.
        let alone = Locations::new(procs[0].dir.clone(), None);
        let err = format!("{:#}", alone.load(newest, 0, 1, 1).unwrap_err());
        assert!(
            err.contains("checkpoint-000000000003.part-1.bin is not in")
                && err.contains("no pipeline.checkpoint_shared is set"),
            "{err}"
        );
        // A corrupt shared copy is an error naming the file, not a silent fresh start.
        shared()
            .put_bytes("checkpoint-000000000003.part-1.bin", b"garbage")
            .unwrap();
        let err = format!("{:#}", moved.load(newest, 1, 2, 2).unwrap_err());
        assert!(err.contains("part-1.bin is not a llamaflow checkpoint"), "{err}");
    }

    #[test]
    fn processes_with_their_own_directories_share_through_a_directory() {
        let shared = tempfile::tempdir().unwrap();
        let path = shared.path().join("shared");
        local_directories_with_a_shared_location(|| Shared::Dir(path.clone()));
    }

    #[test]
    fn processes_with_their_own_directories_share_through_s3() {
        use aws_sdk_s3::config::Credentials;
        let moto = testkit::Moto::start();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let cfg = sources::dynamodb_export::s3::S3Config {
            endpoint_url: Some(moto.endpoint()),
            ..Default::default()
        };
        let sdk = rt.block_on(
            cfg.loader()
                .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
                .load(),
        );
        let client = cfg.client(&sdk);
        rt.block_on(client.create_bucket().bucket("ckpt").send()).unwrap();
        let loc = sources::dynamodb_export::s3::S3Location::parse("s3://ckpt/jobs/a").unwrap();
        let shared = || Shared::S3 {
            loc: loc.clone(),
            client: client.clone(),
            rt: rt.handle().clone(),
        };
        assert!(shared().list().unwrap().is_empty(), "an empty prefix lists nothing");
        assert_eq!(shared().get("manifest-000000000001.json").unwrap(), None);
        local_directories_with_a_shared_location(shared);
        // The objects are under the prefix.
        let keys = rt
            .block_on(client.list_objects_v2().bucket("ckpt").send())
            .unwrap()
            .contents()
            .iter()
            .filter_map(|o| o.key().map(str::to_string))
            .collect::<Vec<_>>();
        assert!(
            keys.iter().all(|k| k.starts_with("jobs/a/")) && keys.len() == 6,
            "{keys:?}"
        );
        // An unreachable bucket is an error naming it.
        let missing = Shared::S3 {
            loc: sources::dynamodb_export::s3::S3Location::parse("s3://nope/x").unwrap(),
            client: client.clone(),
            rt: rt.handle().clone(),
        };
        let err = format!("{:#}", missing.list().unwrap_err());
        assert!(err.contains("s3://nope/x"), "{err}");
    }
}
