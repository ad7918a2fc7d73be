//! Output stages: the dataflow's results are gathered per epoch on the worker threads and
//! handed, one completed epoch at a time and in order, to one thread that writes or
//! publishes them. Workers only hand data over: no file, socket or blocking channel I/O
//! happens on them. The continuous job's stage publishes and feeds the sinks
//! ([`crate::live`]); `replay` and `export` write files ([`Stage`]).

use std::collections::BTreeMap;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};

use schemas::{Alert, DeadLetter, Event};

use crate::engine::Output;

/// Epochs the output stage of a batch run may fall behind before its feed waits for it
/// ([`EpochGather::wait_for_stage`]).
pub const STAGE_LAG: u64 = 16;

/// One completed epoch: what the live view and subscribers see, and the dead letters.
#[derive(Default)]
pub struct EpochOut {
    /// Alerts, market events and live-state changes.
    pub view: view::Epoch,
    /// Dead letters: bad input of the epoch, and records the dataflow refused.
    pub dead: Vec<DeadLetter>,
}

impl EpochOut {
    /// Puts the epoch's market events in event-time order (stable). Timely delivers the
    /// batches of one epoch in any order (an operator's input sorts the batches it holds by
    /// epoch, with an unstable sort), while subscribers, sinks and the view need each key's
    /// events in order: a coin's price after the one before it. A key's events have strictly
    /// increasing event times (older and equal ones are rejected as late or duplicate), so
    /// event-time order is their order; across keys it is a deterministic one.
    pub fn order(&mut self) {
        self.view.events.sort_by_key(|e| e.timestamp);
    }
}

/// Receives dataflow results on the worker threads (an engine's [`Output`]) and gathers them
/// per epoch; completed epochs go, in order, to the output stage's thread.
pub struct EpochGather {
    epochs: Mutex<BTreeMap<u64, EpochOut>>,
    /// Epochs `< done` have been handed over.
    done: Mutex<u64>,
    to_stage: Sender<(u64, EpochOut)>,
    progress: Arc<StageProgress>,
}

/// How far an output stage has got: epochs handed to it and epochs it has finished.
#[derive(Default)]
struct StageProgress {
    /// (handed, finished, the error it stopped on).
    state: Mutex<(u64, u64, Option<String>)>,
    changed: Condvar,
}

impl StageProgress {
    fn update(&self, f: impl FnOnce(&mut (u64, u64, Option<String>))) {
        if let Ok(mut s) = self.state.lock() {
            f(&mut s);
            self.changed.notify_all();
        }
    }
}

impl EpochGather {
    /// Gathers for the output stage thread of `to_stage`.
    pub fn new(to_stage: Sender<(u64, EpochOut)>) -> Self {
        EpochGather {
            epochs: Mutex::new(BTreeMap::new()),
            done: Mutex::new(0),
            to_stage,
            progress: Arc::default(),
        }
    }

    fn with_epoch(&self, epoch: u64, f: impl FnOnce(&mut EpochOut)) {
        if let Ok(mut e) = self.epochs.lock() {
            f(e.entry(epoch).or_default());
        }
    }

    /// Whether anything waits for `epoch` (before it is sent: the ingest front's dead letters,
    /// which make the front send the epoch even without records).
    pub fn holds(&self, epoch: u64) -> bool {
        self.epochs.lock().is_ok_and(|e| e.contains_key(&epoch))
    }

    /// Hands over every epoch still gathered, complete or not: at the end of a batch run
    /// (the input's last dead letters may belong to an epoch that was never sent), or in a
    /// run without a dataflow, whose epochs never complete.
    pub fn flush(&self) {
        let Ok(mut done) = self.done.lock() else { return };
        let rest = match self.epochs.lock() {
            Ok(mut e) => std::mem::take(&mut *e),
            Err(_) => return,
        };
        for (epoch, out) in rest {
            *done = (*done).max(epoch + 1);
            self.hand_over(epoch, out);
        }
    }

    fn hand_over(&self, epoch: u64, out: EpochOut) {
        if self.to_stage.send((epoch, out)).is_ok() {
            self.progress.update(|s| s.0 += 1);
        }
    }

    /// Blocks while the stage is more than `max` epochs behind what was handed to it: a
    /// batch run's backpressure (call it on the thread that feeds the dataflow, never on a
    /// worker). `Err` with the stage's error once it has stopped on one.
    pub fn wait_for_stage(&self, max: u64) -> Result<(), String> {
        let p = &self.progress;
        let Ok(mut s) = p.state.lock() else { return Ok(()) };
        loop {
            if let Some(e) = &s.2 {
                return Err(e.clone());
            }
            if s.0.saturating_sub(s.1) <= max {
                return Ok(());
            }
            s = match p.changed.wait(s) {
                Ok(s) => s,
                Err(_) => return Ok(()),
            };
        }
    }

    /// The progress a [`Stage`] reports to.
    fn progress(&self) -> Arc<StageProgress> {
        self.progress.clone()
    }
}

/// Adds `more` to `to`; the first batch of an epoch is kept as it is (no copy).
fn append<T>(to: &mut Vec<T>, mut more: Vec<T>) {
    if to.is_empty() {
        *to = more;
    } else {
        to.append(&mut more);
    }
}

impl Output for EpochGather {
    fn alerts(&self, epoch: u64, alerts: Vec<Alert>) {
        self.with_epoch(epoch, |e| append(&mut e.view.alerts, alerts));
    }

    fn events(&self, epoch: u64, events: Vec<Event>) {
        self.with_epoch(epoch, |e| append(&mut e.view.events, events));
    }

    fn state(&self, epoch: u64, state: Vec<operators::StateOut>) {
        self.with_epoch(epoch, |e| append(&mut e.view.state, state));
    }

    /// Dead letters travel with their epoch: on disk before its positions are committed.
    fn dead(&self, epoch: u64, dead: Vec<DeadLetter>) {
        self.with_epoch(epoch, |e| append(&mut e.dead, dead));
    }

    fn epochs_done(&self, upto: u64) {
        let Ok(mut done) = self.done.lock() else { return };
        let mut ready = match self.epochs.lock() {
            Ok(mut b) => {
                let rest = b.split_off(&upto);
                std::mem::replace(&mut *b, rest)
            }
            Err(_) => return,
        };
        // Epochs without output still have to be acknowledged: send an empty batch for them.
        for epoch in *done..upto {
            let out = ready.remove(&epoch).unwrap_or_default();
            self.hand_over(epoch, out);
        }
        *done = (*done).max(upto);
    }
}

/// A batch run's output stage: a thread that takes the completed epochs of an
/// [`EpochGather`] in order and writes them.
pub struct Stage<T> {
    thread: std::thread::JoinHandle<Result<T, String>>,
}

/// What a [`Stage`] does with each epoch, on its own thread.
pub trait EpochWriter: Send + 'static {
    /// What the writer gives back when the stage ends.
    type Done: Send + 'static;
    /// Writes one completed epoch (epochs come in order). An error stops the stage.
    fn epoch(&mut self, epoch: u64, out: EpochOut) -> Result<(), String>;
    /// After the last epoch: flush, close, hand back.
    fn finish(self) -> Result<Self::Done, String>;
}

impl<T: Send + 'static> Stage<T> {
    /// Starts `writer` on a thread named `output`, and the gather the engine outputs to.
    pub fn start<W: EpochWriter<Done = T>>(mut writer: W) -> std::io::Result<(Arc<EpochGather>, Stage<T>)> {
        let (tx, rx) = std::sync::mpsc::channel::<(u64, EpochOut)>();
        let gather = Arc::new(EpochGather::new(tx));
        let progress = gather.progress();
        let thread = std::thread::Builder::new().name("output".into()).spawn(move || {
            for (epoch, mut out) in rx {
                out.order();
                if let Err(e) = writer.epoch(epoch, out) {
                    progress.update(|s| s.2 = Some(e.clone()));
                    return Err(e);
                }
                progress.update(|s| s.1 += 1);
            }
            writer.finish()
        })?;
        Ok((gather, Stage { thread }))
    }

    /// Waits for the stage to write everything handed to it (every sender of its gather
    /// must be gone: drop the engine and the gather first).
    pub fn join(self) -> anyhow::Result<T> {
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the output thread panicked"))?
            .map_err(anyhow::Error::msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::SourcePos;

    /// Records what it is handed; fails on the epoch it is told to.
    struct Log {
        seen: Vec<(u64, usize)>,
        fail_at: Option<u64>,
    }

    impl EpochWriter for Log {
        type Done = Vec<(u64, usize)>;
        fn epoch(&mut self, epoch: u64, out: EpochOut) -> Result<(), String> {
            if self.fail_at == Some(epoch) {
                return Err(format!("cannot write epoch {epoch}"));
            }
            self.seen.push((epoch, out.dead.len()));
            Ok(())
        }
        fn finish(self) -> Result<Self::Done, String> {
            Ok(self.seen)
        }
    }

    fn dead(n: usize) -> Vec<DeadLetter> {
        (0..n)
            .map(|i| DeadLetter::new(SourcePos::new("test".into(), i as u64), "bad", "x"))
            .collect()
    }

    #[test]
    fn epochs_reach_the_stage_in_order_once_complete_and_the_rest_at_the_flush() {
        let (gather, stage) = Stage::start(Log {
            seen: Vec::new(),
            fail_at: None,
        })
        .unwrap();
        gather.dead(2, dead(2));
        gather.dead(0, dead(1));
        gather.dead(5, dead(3));
        // Epochs 0..3 complete: 1 had no output and is handed over empty; 5 waits.
        gather.epochs_done(3);
        assert!(gather.holds(5));
        assert!(!gather.holds(2));
        gather.wait_for_stage(0).unwrap();
        gather.dead(5, dead(1));
        gather.flush();
        assert!(!gather.holds(5));
        drop(gather);
        assert_eq!(stage.join().unwrap(), vec![(0, 1), (1, 0), (2, 2), (5, 4)]);
    }

    #[test]
    fn a_stage_that_fails_stops_the_feed_that_waits_for_it() {
        let (gather, stage) = Stage::start(Log {
            seen: Vec::new(),
            fail_at: Some(1),
        })
        .unwrap();
        gather.epochs_done(4);
        assert_eq!(gather.wait_for_stage(0).unwrap_err(), "cannot write epoch 1");
        drop(gather);
        assert_eq!(stage.join().unwrap_err().to_string(), "cannot write epoch 1");
    }
}
