//! The continuous job (`llamaflow run`): sources → ingest front → dataflow → sinks, with
//! source positions committed only after every durable sink has written the results.
//!
//! ```text
//! live sources ──► channel ──► front (batches of ≤ batch_ms) ──► Engine ──► EpochGather
//!  (demo, …)                   records positions per epoch                   ├─ hub, stdout (at once)
//!                                                                            └─ per-epoch batches ──► sink tasks
//!                                       commit positions of epoch e  ◄── all sinks acked e ◄──┘
//! ```

mod commit;
mod front;
mod output;
pub mod reclock;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use metrics_exporter_prometheus::PrometheusBuilder;
use schemas::Kind;
use sinks::jsonl::DeadLetters;
use sinks::websocket::{Hub, WsConfig};
use sources::live::LiveItem;
use tokio::sync::mpsc;

use crate::checkpoint::{Checkpointer, Locations, Shared};
use crate::config::Config;
use crate::engine::{ClusterBus, Engine, EngineCheckpoint};
use crate::stage::EpochGather;
use commit::{Coordinator, SourceHandles};
use operators::Snapshots;
use output::{OutputStage, SinkTasks, ViewSnapshots};

/// Runs the continuous job until SIGTERM / Ctrl-C (or `stop_after`), then drains: stops the
/// sources, finishes the dataflow, waits for every sink, commits, and returns.
pub fn run(cfg: Config, stop_after: Option<Duration>) -> Result<()> {
    let cluster = cfg.cluster();
    cluster
        .validate()
        .map_err(|e| crate::UsageError(format!("pipeline.processes: {e}")))?;
    let mut cfg = cfg;
    if cluster.is_multi() {
        scale_out(&mut cfg)?;
    }
    let cfg = cfg;
    let bus = ClusterBus::new(&cluster);
    // Connections and files share the open-file limit: use what the system allows.
    let open_files = raise_open_file_limit();
    let recorder = PrometheusBuilder::new()
        .install_recorder()
        .context("cannot install the Prometheus metrics recorder")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    // SIGTERM / Ctrl-C and `--duration-secs` count from here: a stop while the sinks or
    // sources are still connecting ends the job cleanly (exit 0), and in time.
    let stop_when = StopWhen::start(&rt, stop_after);

    let ws_cfg = cfg.sinks.websocket.as_ref().map(|w| w.ws_config());
    let hub = match (&cfg.pipeline.listen, ws_cfg) {
        (Some(_), Some(w)) => Some(Hub::new(w)),
        (Some(_), None) => Some(Hub::new(WsConfig {
            allow_anonymous: true,
            ..WsConfig::default()
        })),
        (None, _) => None,
    };
    // Checkpoints: resume from the newest one, if any. The JSONL files go back to their
    // length at it before they are opened: what was written after it is written again.
    // Without a checkpoint yet, a restart goes back to the lengths at the first start.
    // The newest checkpoint: a single process's, or a cluster's with a manifest (each process
    // its own part).
    let part = cluster.is_multi().then_some(cluster.process);
    let workers = cfg.pipeline.workers.max(1) as usize;
    let locations = match &cfg.pipeline.checkpoint_dir {
        Some(dir) => {
            let shared = cfg
                .pipeline
                .checkpoint_shared
                .as_deref()
                .map(|s| Shared::open(s, &cfg.pipeline.checkpoint_s3, rt.handle()))
                .transpose()?;
            Some(Arc::new(Locations::new(dir.clone(), shared)))
        }
        None => None,
    };
    let offer = locations.as_ref().map(|l| l.newest()).transpose()?.flatten();
    if cluster.is_multi() {
        eprintln!(
            "llamaflow: process {} of {}: connecting to {}",
            cluster.process,
            cluster.processes,
            cluster.hosts.join(", ")
        );
    }
    // The processes of a cluster connect first and agree on the checkpoint: the newest any
    // of them can see (each process's own directory may hold another).
    let (dataflow, newest) = Engine::connect(workers, &cluster, bus.clone(), offer)?;
    // Taken with another shape (processes × workers), it is re-split for this one.
    let restored = match (&locations, newest) {
        (Some(l), Some(n)) => Some(l.load(n, cluster.process, cluster.processes.max(1), workers)?),
        _ => None,
    };
    let lengths = match (&restored, &cfg.pipeline.checkpoint_dir) {
        (Some(ck), _) => ck.files.clone(),
        (None, Some(dir)) => crate::checkpoint::start_files(dir, part)?,
        (None, None) => Default::default(),
    };
    sinks::jsonl::restore(&lengths).context("cannot restore the JSONL files to the checkpoint")?;
    let marks = sinks::jsonl::FileMarks::default();
    let dead = DeadLetters::open(cfg.pipeline.dead_letter_out.as_deref(), &marks)
        .map_err(|e| crate::UsageError(format!("pipeline.dead_letter_out: {e}")))?;

    // Durable sinks run as tasks; each acknowledges epochs to the coordinator.
    let health = Arc::new(crate::health::Health::default());
    let (ack_tx, ack_rx) = mpsc::unbounded_channel::<u64>();
    // The alert channels' recipients: loaded by the notify sink, kept current by the front.
    let recipients = cfg.sinks.notify.as_ref().map(|_| sinks::notify::Directory::default());
    let Some(connected) =
        rt.block_on(stop_when.unless_stopped(output::connect_sinks(&cfg, dead.clone(), &marks, recipients.as_ref())))
    else {
        eprintln!("llamaflow: stopped while connecting the sinks; nothing was read");
        return Ok(());
    };
    let connected = connected?;
    if let (None, Some(dir)) = (&restored, &cfg.pipeline.checkpoint_dir)
        && lengths.is_empty()
    {
        crate::checkpoint::save_start_files(dir, part, &marks.lengths())?;
    }
    let (sinks, sink_tasks) = SinkTasks::start(&rt, connected, dead, health.clone(), ack_tx);
    let coordinator = Arc::new(Mutex::new(Coordinator::new(sinks.len())));

    let first_worker = cluster.process * workers;
    let mut cfg = cfg;
    let mut engine_ckpt = EngineCheckpoint {
        snapshots: cfg
            .pipeline
            .checkpoint_dir
            .as_ref()
            .map(|_| Snapshots::for_process(workers, first_worker)),
        ..Default::default()
    };
    // Reclocking: the epochs logged after the checkpoint (or, before the first one, since the
    // first run's start) are formed again first; this run logs them again, then its own.
    let reclocking = cfg
        .pipeline
        .checkpoint_dir
        .as_ref()
        .filter(|_| !cluster.is_multi() && cfg.sources.demo.is_none());
    let reclock = match reclocking {
        Some(dir) => {
            let replay = match &restored {
                Some(ck) => match &ck.epoch_log {
                    Some(mark) => reclock::to_form_again(dir, Some(mark))?,
                    None => Vec::new(),
                },
                None => reclock::to_form_again(dir, None)?,
            };
            let run = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or_default();
            Some((reclock::EpochLog::create(dir, run)?, replay))
        }
        None => None,
    };
    let restored_mark = restored.as_ref().and_then(|ck| ck.epoch_log.clone());
    let (resume_positions, last_id, restored_view) = match restored {
        Some(ck) => {
            eprintln!(
                "llamaflow: resuming from checkpoint {} ({} workers, Kafka {} partition(s), CDC LSN {:?}, {} file(s))",
                ck.id,
                ck.state.len(),
                ck.positions.kafka.len(),
                ck.positions.lsn,
                ck.positions.files.len()
            );
            if let Some(c) = cfg.sources.postgres_cdc.as_mut() {
                c.resume_from(&ck.positions);
            }
            if let Some(k) = cfg.sources.kafka.as_mut() {
                k.resume_from(&ck.positions);
            }
            engine_ckpt.restore = Some(ck.state);
            engine_ckpt.sequencer = Some(ck.sequencer.whole().map_err(|e| anyhow::anyhow!(e))?.clone());
            (Some(ck.positions), ck.id, ck.view)
        }
        None => (None, 0, None),
    };
    let checkpointer = Checkpointer::new(locations.clone().zip(engine_ckpt.snapshots.clone()), last_id)
        .with_files(marks)
        .with_log_mark(restored_mark);
    let checkpointer = match part {
        Some(p) => {
            bus.announce_restored(last_id);
            checkpointer.with_part(p)
        }
        None => checkpointer,
    };
    // A cluster checkpoints at the same epochs in every process: every K-th epoch after the
    // history, numbered on from the restored checkpoint.
    let cluster_checkpoints = (part.is_some() && cfg.pipeline.checkpoint_dir.is_some()).then(|| {
        let every = (cfg.pipeline.checkpoint_interval_ms / cfg.pipeline.batch_ms.max(1)).max(1);
        front::ClusterCheckpoints { every, base: last_id }
    });
    // The read view (SPEC §8) is served where the WebSocket is; its history is checkpointed.
    let live_view = hub
        .as_ref()
        .map(|_| Arc::new(view::LiveView::new(cfg.operators.view_config())));
    let checkpointer = Arc::new(match live_view {
        Some(_) => checkpointer.with_view(),
        None => checkpointer,
    });
    if let (Some(v), Some(bytes)) = (&live_view, &restored_view) {
        let image: view::HistoryImage =
            bincode::deserialize(bytes).context("cannot decode the checkpoint's read view")?;
        v.restore_history(image);
    }
    let cfg = cfg;

    // Live sources feed one bounded channel. Order: the CDC snapshot (rules, protocols, keys)
    // first, then the history inputs, then the live streams (Kafka, demo) are started.
    let stop = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (live_tx, live_rx) = mpsc::channel::<LiveItem>(65_536);
    let handles = Arc::new(tokio::sync::Mutex::new(SourceHandles::default()));
    let mut snapshot_len = 0;
    if let Some(c) = &cfg.sources.postgres_cdc {
        let Some(h) = rt.block_on(stop_when.unless_stopped(sources::postgres_cdc::start(c.clone(), live_tx.clone())))
        else {
            eprintln!("llamaflow: stopped while connecting to the CDC source; nothing was read");
            return Ok(());
        };
        let h = h.context("sources.postgres_cdc")?;
        snapshot_len = h.snapshot_len();
        rt.block_on(handles.lock()).add(Box::new(h));
    }
    let (history_done, history_done_rx) = tokio::sync::oneshot::channel::<()>();
    // A live source that cannot start stops the job (exit 1) with its error.
    let fatal = Arc::new(Fatal::default());
    {
        let (demo, kafka) = (cfg.sources.demo.clone(), cfg.sources.kafka.clone());
        let max_line = cfg.sources.max_line_bytes;
        let follows: Vec<(PathBuf, Kind, u64)> = cfg
            .sources
            .files
            .iter()
            .filter(|f| f.follow)
            .map(|f| {
                (
                    f.path.clone(),
                    Kind::parse(&f.kind).unwrap_or(Kind::Price),
                    resume_positions
                        .as_ref()
                        .and_then(|p| p.file_offset(&f.path))
                        .unwrap_or(f.start_offset),
                )
            })
            .collect();
        let (handles, stop, fatal) = (handles.clone(), stop.clone(), fatal.clone());
        let health_sources = health.clone();
        let stop_rx = stop_rx.clone();
        rt.spawn(async move {
            if history_done_rx.await.is_err() {
                return;
            }
            for (path, kind, offset) in follows {
                let (tx, stop_rx, fatal) = (live_tx.clone(), stop_rx.clone(), fatal.clone());
                tokio::spawn(async move {
                    let name = path.display().to_string();
                    if let Err(e) = sources::files::follow::follow(
                        path,
                        kind,
                        offset,
                        Duration::from_millis(50),
                        max_line,
                        tx,
                        stop_rx,
                    )
                    .await
                    {
                        fatal.fail(format!("sources.files ({name}, follow): {e}"));
                    }
                });
            }
            if let Some(d) = demo {
                tokio::spawn(front::demo_source(d, live_tx.clone(), stop));
            }
            if let Some(c) = kafka {
                match sources::kafka::start(&c, live_tx.clone()).await {
                    Ok(k) => {
                        if let Some(reach) = sources::live::LiveSource::reach(&k) {
                            health_sources.register_source("kafka", reach);
                        }
                        handles.lock().await.add(Box::new(k))
                    }
                    Err(e) => fatal.fail(format!("sources.kafka: {e}")),
                }
            }
        });
    }

    // Commits: once every sink has written the epochs up to a prepared checkpoint and its
    // snapshot is in, the checkpoint is written and its positions committed to the sources.
    let committer = commit::start(
        &rt,
        commit::Committer {
            checkpointer: checkpointer.clone(),
            coordinator: coordinator.clone(),
            handles: handles.clone(),
            fatal: fatal.clone(),
            bus: bus.clone(),
            cluster: locations.clone().filter(|_| part.is_some()),
        },
        ack_rx,
    )?;

    if let (Some(h), Some(v)) = (&hub, &live_view) {
        h.set_snapshots(Arc::new(ViewSnapshots(v.clone())));
    }
    let arrivals = Arc::new(Mutex::new(BTreeMap::new()));
    let (stage_tx, stage_rx) = std::sync::mpsc::channel();
    let stage = OutputStage {
        hub: hub.clone(),
        view: live_view.clone(),
        checkpointer: checkpointer.clone(),
        stdout: cfg.sinks.stdout,
        sinks,
        arrivals: arrivals.clone(),
    }
    .start(stage_rx)?;
    let output = Arc::new(EpochGather::new(stage_tx));
    let engine = dataflow.start(cfg.operators.op_config(), output.clone(), engine_ckpt)?;

    let listener = match cfg.pipeline.listen {
        Some(addr) => Some(
            rt.block_on(async { sinks::websocket::bind(addr) })
                .with_context(|| format!("cannot listen on {addr} (set pipeline.listen or --listen)"))?,
        ),
        None => None,
    };
    if let Some(addr) = cfg.pipeline.listen {
        eprintln!(
            "llamaflow: {}; dashboard http://{addr}/ · WebSocket ws://{addr}/ws · metrics http://{addr}/metrics",
            cfg.summary()
        );
    }

    // The ingest front: history first, then live items in batches of ≤ batch_ms.
    let front = front::Ingest {
        // A restored job does not re-read history: its effects are in the checkpoint.
        history: match resume_positions {
            Some(_) => Vec::new(),
            None => rt.block_on(front::history(&cfg))?,
        },
        resumed: resume_positions.is_some(),
        positions: resume_positions.clone().unwrap_or_default(),
        checkpointer: checkpointer.clone(),
        interval: Duration::from_millis(cfg.pipeline.checkpoint_interval_ms.max(1)),
        batch_ms: cfg.pipeline.batch_ms,
        batch_max: cfg.pipeline.batch_max,
        tvl_settle: Duration::from_millis(cfg.pipeline.tvl_settle_ms),
        multi: cluster.is_multi(),
        process: cluster.process,
        hub: hub.clone(),
        recipients,
        cluster_checkpoints,
        output: output.clone(),
        stop: stop.clone(),
        rt: rt.handle().clone(),
        coordinator: coordinator.clone(),
        arrivals,
        health: health.clone(),
        live_rx,
        snapshot_len,
        history_done,
        engine,
        reclock,
    }
    .start(fatal.clone())?;

    if let (Some(listener), Some(hub)) = (listener, hub.clone()) {
        let render = Arc::new(move || recorder.render());
        let h = health.clone();
        let app = crate::http::app(hub.clone(), render, Arc::new(move || h.report()));
        let app = match &live_view {
            Some(v) => {
                let keys = hub.clone();
                app.merge(view::api::router(
                    v.clone(),
                    Arc::new(move |k: &str| keys.user_for_key(k)),
                ))
            }
            None => app,
        };
        let limits = cfg.pipeline.http_limits(open_files);
        let stop2 = stop.clone();
        let fatal2 = fatal.clone();
        let stop_when2 = stop_when.clone();
        let served = rt.block_on(async move {
            let shutdown = async move {
                stop_when2.wait_or(&fatal2).await;
                stop2.store(true, Ordering::Relaxed);
            };
            sinks::websocket::serve(listener, app, hub, limits, shutdown).await
        });
        served.context("HTTP server failed")?;
    } else {
        rt.block_on(stop_when.wait_or(&fatal));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    front
        .join()
        .map_err(|_| anyhow::anyhow!("the ingest thread panicked"))??;
    // The dataflow has finished: every epoch is with the output stage, which queues it to
    // the sinks; wait until written.
    drop(output);
    stage
        .join()
        .map_err(|_| anyhow::anyhow!("the output thread panicked"))?;
    rt.block_on(async {
        for t in sink_tasks {
            let _ = t.await;
        }
        let _ = committer.await;
    });
    match fatal.take() {
        Some(e) => Err(anyhow::anyhow!(e)),
        None => Ok(()),
    }
}

/// Prepares the config of one process of a cluster: process 0 alone reads history, the CDC
/// source, tailed files and the demo feed; every process reads its share of the Kafka
/// partitions (`assignment = [process_id, processes]` unless configured).
fn scale_out(cfg: &mut Config) -> Result<()> {
    let (process, processes) = (cfg.pipeline.process_id, cfg.pipeline.processes);
    if let Some(k) = cfg.sources.kafka.as_mut()
        && k.assignment.is_none()
    {
        k.assignment = Some((process, processes));
    }
    if process != 0 {
        let s = &mut cfg.sources;
        let skipped =
            !s.files.is_empty() || !s.dynamodb_export.is_empty() || s.demo.is_some() || s.postgres_cdc.is_some();
        s.files.clear();
        s.dynamodb_export.clear();
        s.demo = None;
        s.postgres_cdc = None;
        if skipped {
            eprintln!(
                "llamaflow: process {process}: files, DynamoDB exports, the demo feed and CDC are read by process 0"
            );
        }
    }
    Ok(())
}

/// Raises the soft open-file limit to the hard one; returns the limit in force.
fn raise_open_file_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

/// Raises a fatal error when the thread holding it panics.
struct PanicIsFatal(Arc<Fatal>);

impl Drop for PanicIsFatal {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.fail(format!(
                "the {} thread panicked (see above)",
                std::thread::current().name().unwrap_or("unnamed")
            ));
        }
    }
}

/// A fatal error raised by a background task.
#[derive(Default)]
struct Fatal {
    error: Mutex<Option<String>>,
    notify: tokio::sync::Notify,
}

impl Fatal {
    fn fail(&self, e: String) {
        tracing::error!("{e}");
        if let Ok(mut slot) = self.error.lock() {
            slot.get_or_insert(e);
        }
        self.notify.notify_one();
    }

    fn take(&self) -> Option<String> {
        self.error.lock().ok().and_then(|mut e| e.take())
    }
}

/// When the job stops: SIGTERM / Ctrl-C (listened for from the job's start) or the
/// `--duration-secs` deadline.
#[derive(Clone)]
struct StopWhen {
    signal: tokio::sync::watch::Receiver<bool>,
    deadline: Option<tokio::time::Instant>,
}

impl StopWhen {
    fn start(rt: &tokio::runtime::Runtime, limit: Option<Duration>) -> Self {
        let (tx, signal) = tokio::sync::watch::channel(false);
        let signalled = {
            let _rt = rt.enter();
            crate::shutdown_signal()
        };
        rt.spawn(async move {
            signalled.await;
            eprintln!("llamaflow: stopping");
            let _ = tx.send(true);
        });
        StopWhen {
            signal,
            deadline: limit.map(|d| tokio::time::Instant::now() + d),
        }
    }

    /// Resolves at a signal or the deadline.
    async fn wait(&self) {
        let mut signal = self.signal.clone();
        let signalled = async move {
            let _ = signal.wait_for(|s| *s).await.map(|_| ());
        };
        match self.deadline {
            Some(d) => tokio::select! {
                () = signalled => {}
                () = tokio::time::sleep_until(d) => {}
            },
            None => signalled.await,
        }
    }

    /// Resolves at a stop, or when a background task fails.
    async fn wait_or(&self, fatal: &Fatal) {
        tokio::select! {
            () = self.wait() => {}
            () = fatal.notify.notified() => {}
        }
    }

    /// Runs `f` unless a stop comes first (`None`).
    async fn unless_stopped<T>(&self, f: impl std::future::Future<Output = T>) -> Option<T> {
        tokio::select! {
            biased;
            t = f => Some(t),
            () = self.wait() => None,
        }
    }
}
