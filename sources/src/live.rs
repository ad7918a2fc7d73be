//! What live sources (Kafka, Postgres CDC, tailed files) hand to the pipeline: changes with
//! the position that may be committed once every sink has durably written their results.

use schemas::{DeadLetter, Record, SourcePos};

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
