//! The contract every durable sink implements: write one epoch's [`OutputBatch`] durably, then
//! acknowledge it. The pipeline commits an epoch's source positions only once every sink has
//! acknowledged it, and retries a failed write until it succeeds (a batch is never dropped).

use std::sync::Arc;

use futures_util::future::BoxFuture;
use schemas::{Alert, DeadLetter};

use crate::OutputBatch;

/// Why a sink could not write a batch (a connection, a file, a server answer); the pipeline
/// logs it, marks the sink failing in `/healthz` and retries the batch with backoff.
pub type SinkError = Box<dyn std::error::Error + Send + Sync>;

/// What a sink did with one batch, once it is durable.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Written {
    /// Alerts the sink gave up on for good (SQS, webhooks), each with the reason of its last
    /// failure: the pipeline dead-letters them before the epoch counts as written.
    pub rejected: Vec<(Alert, String)>,
}

impl Written {
    /// The rejected alerts as dead letters whose source names the sink (`sink:sqs`).
    pub fn dead_letters(self, sink: &str) -> Vec<DeadLetter> {
        self.rejected
            .into_iter()
            .map(|(a, reason)| {
                let raw = serde_json::to_string(&a).unwrap_or_default();
                DeadLetter::new(format!("sink:{sink}"), reason, &raw)
            })
            .collect()
    }
}

/// A durable sink: Redis, Postgres, Kafka, SQS, webhooks, Parquet, JSONL files, dead letters.
pub trait Sink: Send + 'static {
    /// Its name in logs, metrics and `/healthz` (`redis`, `postgres`, …).
    fn name(&self) -> &'static str;

    /// Writes `batch` and resolves once it is durable. Idempotent: the same batch written
    /// twice (after a failure, or a restart that re-delivers input) leaves the same state.
    /// Blocking work (files, fsync) runs off the async runtime's threads.
    fn write(&mut self, batch: Arc<OutputBatch>) -> BoxFuture<'_, Result<Written, SinkError>>;

    /// Whether consecutive epochs waiting for the sink may be written as one
    /// ([`OutputBatch::merge`]): true for sinks whose writes do not depend on epoch boundaries
    /// and reject nothing, so that a sink that fell behind catches up in one round trip per
    /// group of epochs instead of one per epoch. Default false.
    fn merges(&self) -> bool {
        false
    }
}

/// A sink whose writes are blocking file I/O (JSONL, dead letters, Parquet spools): the same
/// code serves batch commands without a runtime and, wrapped in [`OffRuntime`], the job.
pub trait BlockingSink: Send + 'static {
    /// As [`Sink::name`].
    fn name(&self) -> &'static str;

    /// Writes `batch` and returns once it is durable (fsynced).
    fn write_blocking(&mut self, batch: &OutputBatch) -> Result<Written, SinkError>;

    /// Whether `batch` holds nothing for this sink: then it is acknowledged at once, without
    /// a trip to the blocking pool (most epochs of a busy job carry no dead letters).
    fn skips(&self, _batch: &OutputBatch) -> bool {
        false
    }
}

/// A [`BlockingSink`] as a [`Sink`]: each write runs on tokio's blocking pool, never on the
/// threads that serve sockets.
pub struct OffRuntime<S> {
    name: &'static str,
    /// Taken while a write runs; `None` after a write panicked.
    inner: Option<S>,
}

impl<S: BlockingSink> OffRuntime<S> {
    /// Wraps `sink`.
    pub fn new(sink: S) -> Self {
        OffRuntime {
            name: sink.name(),
            inner: Some(sink),
        }
    }
}

impl<S: BlockingSink> Sink for OffRuntime<S> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn write(&mut self, batch: Arc<OutputBatch>) -> BoxFuture<'_, Result<Written, SinkError>> {
        Box::pin(async move {
            if self.inner.as_ref().is_some_and(|s| s.skips(&batch)) {
                return Ok(Written::default());
            }
            let mut sink = self
                .inner
                .take()
                .ok_or_else(|| format!("the {} sink was lost when a write panicked; restart the job", self.name))?;
            let (sink, written) = tokio::task::spawn_blocking(move || {
                let written = sink.write_blocking(&batch);
                (sink, written)
            })
            .await?;
            self.inner = Some(sink);
            written
        })
    }
}

/// A write that rejects nothing.
impl From<()> for Written {
    fn from((): ()) -> Self {
        Written::default()
    }
}

/// Implements [`Sink`] for a sink whose inherent `async fn write(&mut self, &OutputBatch)`
/// returns `Result<T, E>` with `T: Into<Written>`.
/// With `merges`, the sink also takes merged epochs ([`Sink::merges`]).
macro_rules! plain_sink {
    ($ty:ty, $name:literal) => {
        $crate::sink::plain_sink!($ty, $name, false);
    };
    ($ty:ty, $name:literal, merges) => {
        $crate::sink::plain_sink!($ty, $name, true);
    };
    ($ty:ty, $name:literal, $merges:literal) => {
        impl $crate::Sink for $ty {
            fn name(&self) -> &'static str {
                $name
            }

            fn merges(&self) -> bool {
                $merges
            }

            fn write(
                &mut self,
                batch: std::sync::Arc<$crate::OutputBatch>,
            ) -> futures_util::future::BoxFuture<'_, Result<$crate::Written, $crate::SinkError>> {
                Box::pin(async move { Ok(<$ty>::write(self, &batch).await?.into()) })
            }
        }
    };
}
pub(crate) use plain_sink;

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    /// Blocks its write until released through a channel.
    struct Waits(mpsc::Receiver<()>);

    impl BlockingSink for Waits {
        fn name(&self) -> &'static str {
            "waits"
        }

        fn write_blocking(&mut self, batch: &OutputBatch) -> Result<Written, SinkError> {
            if batch.epoch == 99 {
                panic!("a bug in the sink");
            }
            self.0.recv_timeout(Duration::from_secs(5))?;
            Ok(Written::default())
        }

        fn skips(&self, batch: &OutputBatch) -> bool {
            batch.epoch == 7
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn blocking_writes_leave_the_runtime_thread_free_and_a_panic_is_an_error() {
        let (tx, rx) = mpsc::channel();
        let mut sink = OffRuntime::new(Waits(rx));
        assert_eq!(sink.name(), "waits");
        // On a single-threaded runtime the release task runs only if the write is elsewhere.
        let release = tokio::spawn(async move { tx.send(()).is_ok() });
        let written = sink.write(Arc::new(OutputBatch::default())).await;
        assert_eq!(written.unwrap(), Written::default());
        assert!(release.await.unwrap());
        // The release channel is closed now: only a skipped batch can succeed.
        let skipped = sink
            .write(Arc::new(OutputBatch {
                epoch: 7,
                ..Default::default()
            }))
            .await;
        assert_eq!(skipped.unwrap(), Written::default());
        assert!(sink.write(Arc::new(OutputBatch::default())).await.is_err());
        let panicked = sink
            .write(Arc::new(OutputBatch {
                epoch: 99,
                ..Default::default()
            }))
            .await;
        assert!(panicked.is_err());
        let lost = sink.write(Arc::new(OutputBatch::default())).await.unwrap_err();
        assert!(lost.to_string().contains("waits sink was lost"), "{lost}");
    }

    #[test]
    fn rejected_alerts_become_dead_letters_naming_the_sink() {
        let alert = crate::test_support::eth_alert("a1", &["webhook"]);
        let written = Written {
            rejected: vec![(alert.clone(), "HTTP 500 after 5 attempts".into())],
        };
        let dead = written.dead_letters("webhook");
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].source, "sink:webhook");
        assert_eq!(dead[0].reason, "HTTP 500 after 5 attempts");
        let raw: schemas::Alert = serde_json::from_str(&dead[0].raw).unwrap();
        assert_eq!(raw, alert);
    }
}
