//! The contract between live sources (Kafka, Postgres CDC, tailed files, the demo feed) and the
//! pipeline: the changes they hand over, each with the position ([`Ack`]) that may be
//! committed once every sink has durably written its results; the [`Positions`] a checkpoint
//! stores; and [`LiveSource`], through which a running source takes its commits.

use std::collections::BTreeMap;

use futures_util::future::BoxFuture;
use schemas::{DeadLetter, Record, SourcePos};
use serde::{Deserialize, Serialize};

/// A position a live source can commit (acknowledge) once downstream is durable.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Ack {
    /// Kafka: the message at `offset` is done; the group commit is `offset + 1`.
    Kafka {
        /// Topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// Offset of this message.
        offset: i64,
    },
    /// Postgres CDC: the change at this LSN is done (the slot may advance to it).
    Lsn(u64),
    /// A tailed file: bytes up to `offset` are done.
    File {
        /// Path as configured.
        path: String,
        /// Byte offset just past this record's line.
        offset: u64,
    },
    /// Nothing to acknowledge.
    None,
}

impl Ack {
    /// The replayable stream the position is in (`topic/partition`, or a tailed file's path),
    /// where records may also be in the job's history; `None` for CDC and unacknowledged items.
    pub fn stream(&self) -> Option<String> {
        match self {
            Ack::Kafka { topic, partition, .. } => Some(format!("{topic}/{partition}")),
            Ack::File { path, .. } => Some(path.clone()),
            Ack::Lsn(_) | Ack::None => None,
        }
    }
}

/// One change from a live source.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// A record (rules and protocols are upserts).
    Record(Record),
    /// A rule was deleted.
    DeleteRule(String),
    /// A protocol row was deleted.
    DeleteProtocol(String),
    /// An API key was created or changed (`user_id`), or deleted/revoked (`None`).
    ApiKey {
        /// The key.
        key: String,
        /// Its user, or `None` when the key no longer grants access.
        user_id: Option<String>,
    },
    /// A user was added or changed their alert channel addresses.
    User(schemas::Contact),
    /// A user was deleted.
    DeleteUser(String),
    /// A push device was added or changed.
    Device(schemas::Device),
    /// A push device was deleted (by its `user_devices.id`).
    DeleteDevice(String),
    /// Input that failed validation.
    Dead(DeadLetter),
}

/// A change with its source position (for dead letters) and its commit position.
#[derive(Clone, Debug, PartialEq)]
pub struct LiveItem {
    /// `topic/partition@offset`, `table@lsn` or `file:line`.
    pub pos: SourcePos,
    /// What to commit once this item's results are durable.
    pub ack: Ack,
    /// The change.
    pub change: Change,
}

/// Source positions: what has been read and processed, per source.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Positions {
    /// Kafka: the last processed offset per (topic, partition); reading resumes after it.
    pub kafka: BTreeMap<(String, i32), i64>,
    /// Postgres CDC: the commit LSN of the last applied transaction.
    pub lsn: Option<u64>,
    /// Tailed files: bytes processed per path.
    pub files: BTreeMap<String, u64>,
}

impl Positions {
    /// Where a tailed file resumes: the bytes of `path` already processed.
    pub fn file_offset(&self, path: &std::path::Path) -> Option<u64> {
        self.files.get(&path.display().to_string()).copied()
    }

    /// Advances the positions past an item's acknowledgement.
    pub fn add(&mut self, ack: &Ack) {
        match ack {
            Ack::Kafka {
                topic,
                partition,
                offset,
            } => {
                let e = self.kafka.entry((topic.clone(), *partition)).or_insert(*offset);
                *e = (*e).max(*offset);
            }
            Ack::Lsn(l) => self.lsn = Some(self.lsn.map_or(*l, |x| x.max(*l))),
            Ack::File { path, offset } => {
                let e = self.files.entry(path.clone()).or_insert(*offset);
                *e = (*e).max(*offset);
            }
            Ack::None => {}
        }
    }
}

/// Why a source could not commit a position; a failed commit only means re-delivery after a
/// restart (sinks are idempotent).
pub type CommitError = Box<dyn std::error::Error + Send + Sync>;

/// A running live source that takes commits: it knows its own part of [`Positions`].
pub trait LiveSource: Send + Sync {
    /// Its name in logs and metrics (`kafka`, `postgres_cdc`).
    fn name(&self) -> &'static str;

    /// Commits this source's part of `positions`: everything up to them is durably processed.
    fn commit<'a>(&'a self, positions: &'a Positions) -> BoxFuture<'a, Result<(), CommitError>>;

    /// Stops the source and waits for its tasks.
    fn stop(self: Box<Self>) -> BoxFuture<'static, ()>;

    /// Whether it reaches its broker or database (for `/healthz` and `/readyz`).
    fn reach(&self) -> Option<std::sync::Arc<Reach>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_only_move_forward() {
        let mut p = Positions::default();
        for ack in [
            Ack::Kafka {
                topic: "prices".into(),
                partition: 1,
                offset: 7,
            },
            Ack::Kafka {
                topic: "prices".into(),
                partition: 1,
                offset: 3,
            },
            Ack::Lsn(90),
            Ack::Lsn(40),
            Ack::File {
                path: "f".into(),
                offset: 100,
            },
            Ack::None,
        ] {
            p.add(&ack);
        }
        assert_eq!(p.kafka[&("prices".to_string(), 1)], 7);
        assert_eq!(p.lsn, Some(90));
        assert_eq!(p.files["f"], 100);
        assert_eq!(p.file_offset(std::path::Path::new("f")), Some(100));
        assert_eq!(p.file_offset(std::path::Path::new("g")), None);
    }

    #[test]
    fn reach_fails_until_a_success_and_only_while_recent() {
        let r = Reach::default();
        let recent = std::time::Duration::from_secs(60);
        assert_eq!(r.failing(recent), None);
        r.error("all brokers down".into());
        assert_eq!(r.failing(recent).as_deref(), Some("all brokers down"));
        std::thread::sleep(std::time::Duration::from_millis(3));
        assert_eq!(
            r.failing(std::time::Duration::from_millis(1)),
            None,
            "an old error is not failing"
        );
        r.ok();
        assert_eq!(r.failing(recent), None, "succeeded since");
    }

    #[test]
    fn a_rate_limited_warning_repeats_once_per_interval() {
        let w = RateLimitedWarning::new(std::time::Duration::from_secs(60));
        assert!(w.warn("broker down"));
        assert!(!w.warn("broker down"));
        assert!(!w.warn("broker down"));
        assert_eq!(w.held.load(std::sync::atomic::Ordering::Relaxed), 2);
        let w = RateLimitedWarning::new(std::time::Duration::ZERO);
        assert!(w.warn("a") && w.warn("b"));
    }

    #[test]
    fn streams_are_kafka_partitions_and_tailed_files() {
        let kafka = Ack::Kafka {
            topic: "prices".into(),
            partition: 2,
            offset: 9,
        };
        assert_eq!(kafka.stream().as_deref(), Some("prices/2"));
        let file = Ack::File {
            path: "/feeds/tvl.jsonl".into(),
            offset: 1,
        };
        assert_eq!(file.stream().as_deref(), Some("/feeds/tvl.jsonl"));
        assert_eq!(Ack::Lsn(5).stream(), None);
        assert_eq!(Ack::None.stream(), None);
    }
}

/// Whether a live source reaches its broker or database, shared between the source (which
/// reports) and the pipeline's `/healthz` and `/readyz`: failing while it has failed within
/// the last seconds and not succeeded since.
#[derive(Debug)]
pub struct Reach {
    origin: std::time::Instant,
    /// When it last succeeded (ms since `origin`, 0: never).
    last_ok_ms: std::sync::atomic::AtomicU64,
    /// When it last failed, and why.
    last_error: std::sync::Mutex<Option<(u64, String)>>,
}

impl Default for Reach {
    fn default() -> Self {
        Reach {
            origin: std::time::Instant::now(),
            last_ok_ms: std::sync::atomic::AtomicU64::new(0),
            last_error: std::sync::Mutex::new(None),
        }
    }
}

impl Reach {
    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64 + 1
    }

    /// The source succeeded (a message, an assignment): cheap enough for every message.
    pub fn ok(&self) {
        self.last_ok_ms
            .store(self.now_ms(), std::sync::atomic::Ordering::Relaxed);
    }

    /// The source failed with `error`.
    pub fn error(&self, error: String) {
        let now = self.now_ms();
        *self
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((now, error));
    }

    /// The last error, while it is newer than the last success and at most `recent` old.
    pub fn failing(&self, recent: std::time::Duration) -> Option<String> {
        let now = self.now_ms();
        let ok = self.last_ok_ms.load(std::sync::atomic::Ordering::Relaxed);
        let last = self
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        last.as_ref()
            .filter(|(at, _)| *at > ok && now.saturating_sub(*at) <= recent.as_millis() as u64)
            .map(|(_, e)| e.clone())
    }
}

/// A warning that repeats at most once per interval, with how many were held back meanwhile.
#[derive(Debug)]
pub struct RateLimitedWarning {
    every: std::time::Duration,
    last: std::sync::Mutex<Option<std::time::Instant>>,
    held: std::sync::atomic::AtomicU64,
}

impl RateLimitedWarning {
    /// At most one warning per `every`.
    pub fn new(every: std::time::Duration) -> Self {
        RateLimitedWarning {
            every,
            last: std::sync::Mutex::new(None),
            held: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Logs `message` (at warn level) unless one was logged within the interval; returns
    /// whether it was.
    pub fn warn(&self, message: impl std::fmt::Display) -> bool {
        let mut last = self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_some_and(|t| t.elapsed() < self.every) {
            self.held.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return false;
        }
        *last = Some(std::time::Instant::now());
        match self.held.swap(0, std::sync::atomic::Ordering::Relaxed) {
            0 => tracing::warn!("{message}"),
            n => tracing::warn!("{message} ({n} more like it in the last {:?})", self.every),
        }
        true
    }
}
