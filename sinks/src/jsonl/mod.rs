//! JSON-lines files: the alert and event files of `[sinks.jsonl]`, and the dead-letter output
//! (SPEC §1) of every command.
//!
//! - [`JsonlWriter`]: one value per line, to a file (created or appended) or standard error.
//! - [`JsonlSink`]: the continuous job's alert/event files, fsynced per batch.
//! - [`DeadLetters`]: the dead-letter output, shared by the dataflow's epochs and the sinks
//!   that give up on alerts; each write is fsynced before the epoch is acknowledged.
//! - [`FileMarks`] / [`restore`]: each appended file's length per epoch, recorded in
//!   checkpoints and truncated back to on restore (each record once, never a fragment).

mod config;
mod marks;
mod sink;
mod writer;

pub use config::JsonlConfig;
pub use marks::{FileMarks, restore};
pub use sink::{DeadLetters, JsonlSink};
pub use writer::{JsonlError, JsonlWriter};
