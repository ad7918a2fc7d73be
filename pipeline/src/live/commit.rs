//! The commit protocol: epochs acknowledged by every sink (and, in a cluster, by every
//! process) make prepared checkpoints complete; a completed checkpoint's source positions are
//! committed to the sources (Kafka group offsets, the CDC slot's confirmed LSN).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::sync::mpsc;

use sources::live::LiveSource;

use super::Fatal;
use crate::checkpoint::{Checkpointer, Completer, Locations, Positions};
use crate::engine::ClusterBus;

/// Tracks which epochs every sink has written.
pub(super) struct Coordinator {
    sinks: usize,
    acked: BTreeMap<u64, usize>,
    /// When the first live item of each epoch in flight reached the ingest front.
    pub(super) ingested: BTreeMap<u64, Instant>,
    /// Every epoch below this is written by every sink.
    durable_upto: u64,
}

impl Coordinator {
    pub(super) fn new(sinks: usize) -> Self {
        Coordinator {
            sinks: sinks.max(1),
            acked: BTreeMap::new(),
            ingested: BTreeMap::new(),
            durable_upto: 0,
        }
    }

    /// Records that one sink wrote `epoch`; returns how many epochs are now durable.
    fn ack(&mut self, epoch: u64) -> u64 {
        *self.acked.entry(epoch).or_default() += 1;
        while self.acked.get(&self.durable_upto).is_some_and(|n| *n >= self.sinks) {
            self.acked.remove(&self.durable_upto);
            // End-to-end latency: ingest of the epoch's first live item → every sink wrote it.
            if let Some(t) = self.ingested.remove(&self.durable_upto) {
                metrics::histogram!("llamaflow_e2e_latency_seconds").record(t.elapsed().as_secs_f64());
            }
            self.durable_upto += 1;
        }
        self.durable_upto
    }
}

/// What the committer works with.
pub(super) struct Committer {
    pub checkpointer: Arc<Checkpointer>,
    pub coordinator: Arc<Mutex<Coordinator>>,
    pub handles: Arc<tokio::sync::Mutex<SourceHandles>>,
    pub fatal: Arc<Fatal>,
    pub bus: Arc<ClusterBus>,
    /// In a cluster with checkpoints: where process 0 writes each checkpoint's manifest
    /// once every process's part is in.
    pub cluster: Option<Arc<Locations>>,
}

/// Starts the committer: it counts sink acknowledgements from `ack_rx`, completes checkpoints
/// whose epochs are durable and commits their positions; once every sink is done (the
/// channel closes) it completes the final checkpoint and stops the sources.
pub(super) fn start(
    rt: &tokio::runtime::Runtime,
    c: Committer,
    mut ack_rx: mpsc::UnboundedReceiver<u64>,
) -> Result<tokio::task::JoinHandle<()>> {
    let completer = Completer::start(c.checkpointer.clone())?;
    let Committer {
        checkpointer,
        coordinator,
        handles,
        fatal,
        bus,
        cluster,
    } = c;
    Ok(rt.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let mut durable;
        // Cluster checkpoints whose part is written here, waiting for their manifest.
        let mut awaiting: BTreeMap<u64, Positions> = BTreeMap::new();
        loop {
            tokio::select! {
                epoch = ack_rx.recv() => match epoch {
                    Some(e) => {
                        if let Ok(mut c) = coordinator.lock() {
                            bus.set_durable(c.ack(e));
                        }
                    }
                    None => break,
                },
                _ = tick.tick() => {}
            }
            // In a cluster an epoch counts as durable once every process's sinks wrote it:
            // this process's records cause outputs in the others.
            durable = bus.durable();
            metrics::gauge!("llamaflow_checkpoint_age_seconds").set(checkpointer.age_secs());
            match completer.complete(durable).await {
                Ok(Some((id, positions))) => match &cluster {
                    None => handles.lock().await.commit(&positions).await,
                    Some(_) => {
                        bus.part_written(id);
                        awaiting.insert(id, positions);
                    }
                },
                Ok(None) => {}
                Err(e) => fatal.fail(format!("checkpoint failed: {e:#}")),
            }
            if let Some(locations) = &cluster {
                if let Some((peer, theirs, ours)) = bus.restored_mismatch() {
                    fatal.fail(format!(
                        "process {peer} started from checkpoint {theirs}, this one from {ours}: \
                         stop every process and start them all again (they then agree on the newest checkpoint)"
                    ));
                    break;
                }
                if let Err(e) = cluster_commit(locations, &checkpointer, &bus, &mut awaiting, &handles).await {
                    fatal.fail(format!("cluster checkpoint failed: {e:#}"));
                }
            }
        }
        // The final checkpoint (prepared at shutdown) completes once its snapshot is in
        // (and, in a cluster, once the other processes reported the epoch written). A
        // cluster takes no final checkpoint: the processes stop at different epochs.
        for _ in 0..100 {
            if cluster.is_some() {
                break;
            }
            let durable = bus.durable();
            match completer.complete(durable).await {
                Ok(Some((_, positions))) => {
                    handles.lock().await.commit(&positions).await;
                    break;
                }
                Ok(None) if checkpointer.has_pending() => tokio::time::sleep(Duration::from_millis(20)).await,
                Ok(None) => break,
                Err(e) => {
                    fatal.fail(format!("final checkpoint failed: {e:#}"));
                    break;
                }
            }
        }
        std::mem::take(&mut *handles.lock().await).stop().await;
    }))
}

/// The cluster's side of a checkpoint: process 0 writes the manifest of the newest checkpoint
/// whose parts are all in and announces it; every process then commits the positions of
/// the newest checkpoint with a manifest and removes older files.
async fn cluster_commit(
    locations: &Arc<Locations>,
    checkpointer: &Checkpointer,
    bus: &Arc<ClusterBus>,
    awaiting: &mut BTreeMap<u64, Positions>,
    handles: &tokio::sync::Mutex<SourceHandles>,
) -> Result<()> {
    if bus.process() == 0 {
        // The newest checkpoint with every part. A process can miss a checkpoint epoch (one
        // that it sent while it waited to learn where the history ends): that checkpoint
        // never completes, and a later one takes its place.
        let ready = awaiting
            .keys()
            .rev()
            .copied()
            .find(|id| *id > bus.manifest() && bus.parts_complete(*id));
        if let Some(id) = ready {
            let (l, n) = (locations.clone(), bus.processes());
            tokio::task::spawn_blocking(move || l.write_manifest(id, n)).await??;
            metrics::gauge!("llamaflow_checkpoint_manifest_id").set(id as f64);
            bus.announce_manifest(id);
        }
    }
    let counted = bus.manifest();
    let newest = awaiting.range(..=counted).next_back().map(|(id, p)| (*id, p.clone()));
    if let Some((id, positions)) = newest {
        *awaiting = awaiting.split_off(&(id + 1));
        handles.lock().await.commit(&positions).await;
        let (l, process, processes) = (locations.clone(), bus.process(), bus.processes());
        let keep = checkpointer.needed_from(id.saturating_sub(1));
        tokio::task::spawn_blocking(move || l.prune(id, process, processes, &keep)).await?;
    }
    Ok(())
}

/// The running live sources that take commits.
#[derive(Default)]
pub(super) struct SourceHandles(Vec<Box<dyn LiveSource>>);

impl SourceHandles {
    /// Adds a started source.
    pub fn add(&mut self, source: Box<dyn LiveSource>) {
        self.0.push(source);
    }

    /// Commits the positions of one fully written epoch to their sources. A failed commit
    /// only means re-delivery after a restart (sinks are idempotent); it is logged and counted.
    async fn commit(&self, positions: &Positions) {
        metrics::counter!("llamaflow_epochs_committed_total").increment(1);
        for s in &self.0 {
            if let Err(e) = s.commit(positions).await {
                metrics::counter!("llamaflow_commit_errors_total", "source" => s.name()).increment(1);
                tracing::warn!("{} commit failed: {e}", s.name());
            }
        }
    }

    async fn stop(self) {
        for s in self.0 {
            s.stop().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinator_counts_epochs_every_sink_wrote() {
        let mut c = Coordinator::new(2);
        assert_eq!(c.ack(1), 0);
        assert_eq!(c.ack(1), 0, "epoch 0 not written yet");
        assert_eq!(c.ack(0), 0, "one sink of two");
        assert_eq!(c.ack(0), 2, "epochs 0 and 1 written by both");
        assert_eq!(c.ack(2), 2);
        assert_eq!(c.ack(2), 3);
    }
}
