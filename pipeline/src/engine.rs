//! Runs the timely dataflow on its own threads and feeds it from the ingest side.
//!
//! The ingest side (a replay reader or live sources) stamps records with a [`Sequencer`] and
//! hands the engine one batch per epoch; the engine spreads each batch over the workers'
//! bounded channels. Workers drain their channel, advance their input to the next epoch and
//! step the dataflow, keeping at most [`MAX_EPOCHS_IN_FLIGHT`] epochs unfinished, so a slow
//! dataflow slows the ingest side instead of growing memory.

use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use operators::checkpoint::Restored;
use operators::{Checkpointing, Envelope, OpConfig, Sequencer, Snapshots, WorkerState};
use schemas::{Alert, DeadLetter, Event};
use timely::dataflow::operators::{Input, Inspect, Probe};
use timely::dataflow::{InputHandle, ProbeHandle};

/// Epochs a worker may have sent but not yet completed.
pub const MAX_EPOCHS_IN_FLIGHT: u64 = 8;

/// Where the dataflow's results go. Called from worker threads.
pub trait Output: Send + Sync + 'static {
    /// Alerts of an epoch, in order (worker 0 only; an epoch may come in several calls).
    fn alerts(&self, epoch: u64, alerts: &[Alert]);
    /// Market events of an epoch from one worker.
    fn events(&self, epoch: u64, events: &[Event]);
    /// Dead letters from inside the dataflow.
    fn dead(&self, epoch: u64, dead: &[DeadLetter]);
    /// Every output of all epochs `< upto` has been delivered (called by worker 0, in
    /// increasing order).
    fn epochs_done(&self, _upto: u64) {}
}

/// How an engine takes part in checkpoints.
#[derive(Default)]
pub struct EngineCheckpoint {
    /// Where snapshots are requested and collected.
    pub snapshots: Option<Snapshots>,
    /// Operator state to start from, one per worker.
    pub restore: Option<Vec<WorkerState>>,
    /// The ingest front's sequencer to continue with.
    pub sequencer: Option<Sequencer>,
}

/// A running dataflow.
pub struct Engine {
    inputs: Vec<SyncSender<Vec<Envelope>>>,
    guards: timely::communication::WorkerGuards<()>,
    sequencer: Sequencer,
    epochs: u64,
}

impl Engine {
    /// Starts `workers` timely worker threads running the operators with `cfg`, from empty
    /// state or from `ckpt.restore`, taking the snapshots `ckpt.snapshots` is asked for.
    pub fn start(workers: usize, cfg: OpConfig, output: Arc<dyn Output>, ckpt: EngineCheckpoint) -> Result<Engine> {
        let workers = workers.max(1);
        let restored: Vec<Mutex<Option<Restored>>> = match &ckpt.restore {
            None => Vec::new(),
            Some(states) if states.len() != workers => anyhow::bail!(
                "the checkpoint holds the state of {} workers but {workers} are configured: run with \
                 `--workers {}` (or delete the checkpoint directory to start over)",
                states.len(),
                states.len()
            ),
            Some(states) => states
                .iter()
                .map(|s| s.decode(cfg.clone()).map(|r| Mutex::new(Some(r))))
                .collect::<Result<_, _>>()
                .context("cannot decode the checkpoint's operator state")?,
        };
        let restored = Arc::new(restored);
        let snapshots = ckpt.snapshots;
        let mut inputs = Vec::with_capacity(workers);
        let mut receivers = Vec::with_capacity(workers);
        for _ in 0..workers {
            let (tx, rx) = sync_channel::<Vec<Envelope>>(MAX_EPOCHS_IN_FLIGHT as usize);
            inputs.push(tx);
            receivers.push(Mutex::new(Some(rx)));
        }
        let receivers = Arc::new(receivers);
        let guards = timely::execute(timely::Config::process(workers), move |worker| {
            let rx = receivers[worker.index()].lock().ok().and_then(|mut r| r.take());
            let Some(rx) = rx else { return };
            let restore = restored
                .get(worker.index())
                .and_then(|r| r.lock().ok().and_then(|mut r| r.take()));
            let ckpt = Checkpointing {
                snapshots: snapshots.clone(),
                restore,
            };
            run_worker(worker, rx, cfg.clone(), output.clone(), ckpt);
        })
        .map_err(|e| anyhow::anyhow!("cannot start timely workers: {e}"))?;
        Ok(Engine {
            inputs,
            guards,
            sequencer: ckpt.sequencer.unwrap_or_else(|| Sequencer::new(workers, 0)),
            epochs: 0,
        })
    }

    /// The stamping front: push records and rule deletions here, then [`Engine::send`].
    pub fn sequencer(&mut self) -> &mut Sequencer {
        &mut self.sequencer
    }

    /// Epochs sent so far.
    pub fn epochs(&self) -> u64 {
        self.epochs
    }

    /// Sends one epoch: the envelopes are split evenly over the workers (the dataflow's
    /// exchange routes each to the worker owning its key). Blocks while the dataflow is
    /// [`MAX_EPOCHS_IN_FLIGHT`] epochs behind.
    pub fn send(&mut self, mut envelopes: Vec<Envelope>) -> Result<()> {
        let n = self.inputs.len();
        let chunk = envelopes.len().div_ceil(n).max(1);
        let mut parts: Vec<Vec<Envelope>> = Vec::with_capacity(n);
        for _ in 1..n {
            let rest = envelopes.split_off(chunk.min(envelopes.len()));
            parts.push(std::mem::replace(&mut envelopes, rest));
        }
        parts.push(envelopes);
        for (tx, part) in self.inputs.iter().zip(parts) {
            tx.send(part).context("a dataflow worker stopped unexpectedly")?;
        }
        self.epochs += 1;
        Ok(())
    }

    /// Closes the inputs and waits until every epoch is processed and output.
    pub fn finish(self) -> Result<()> {
        drop(self.inputs);
        for r in self.guards.join() {
            r.map_err(|e| anyhow::anyhow!("dataflow worker failed: {e}"))?;
        }
        Ok(())
    }
}

fn run_worker(
    worker: &mut timely::worker::Worker,
    rx: Receiver<Vec<Envelope>>,
    cfg: OpConfig,
    output: Arc<dyn Output>,
    ckpt: Checkpointing,
) {
    let worker_index = worker.index();
    let mut input = InputHandle::<u64, timely::container::CapacityContainerBuilder<Vec<Envelope>>>::new();
    let (o1, o2, o3) = (output.clone(), output.clone(), output.clone());
    let probe = ProbeHandle::new();
    worker.dataflow::<u64, _, _>(|scope| {
        let outs = operators::build(scope.input_from(&mut input), cfg, ckpt);
        outs.events
            .inspect_core(move |e| {
                if let Ok((stamp, batch)) = e {
                    o2.events(stamp.least().copied().unwrap_or_default(), batch);
                }
            })
            .probe_with(&probe);
        outs.dead
            .inspect_core(move |e| {
                if let Ok((stamp, batch)) = e {
                    o3.dead(stamp.least().copied().unwrap_or_default(), batch);
                }
            })
            .probe_with(&probe);
        outs.alerts
            .inspect_core(move |e| {
                if let Ok((stamp, batch)) = e {
                    o1.alerts(stamp.least().copied().unwrap_or_default(), batch);
                }
            })
            .probe_with(&probe);
    });
    // Worker 0 reports completed epochs: the probe covers every output stream of every worker.
    let mut done = 0u64;
    let mut report = |probe: &ProbeHandle<u64>, sent: u64| {
        if worker_index != 0 {
            return;
        }
        // An empty frontier (input closed, all done) means every epoch sent is complete.
        let upto = probe.with_frontier(|f| f.first().copied().unwrap_or(sent)).min(sent);
        if upto > done {
            done = upto;
            output.epochs_done(upto);
        }
    };
    loop {
        match rx.try_recv() {
            Ok(mut batch) => {
                input.send_batch(&mut batch);
                let next = *input.time() + 1;
                input.advance_to(next);
                while probe.less_than(&input.time().saturating_sub(MAX_EPOCHS_IN_FLIGHT)) {
                    worker.step();
                    report(&probe, *input.time());
                }
                worker.step();
            }
            Err(TryRecvError::Empty) => {
                worker.step_or_park(Some(Duration::from_millis(1)));
            }
            Err(TryRecvError::Disconnected) => break,
        }
        report(&probe, *input.time());
    }
    let sent = *input.time();
    drop(input);
    while worker.step() {
        report(&probe, sent);
    }
    report(&probe, sent);
}
