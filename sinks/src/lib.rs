//! llamaflow sinks: where the pipeline's outputs go.
//!
//! - [`websocket`]: the live WebSocket fanout (SPEC §5) — a [`websocket::Hub`] that the
//!   dataflow workers publish market events and alerts into, and an axum router serving
//!   `GET /ws` to subscribers.
//! - [`jsonl`]: JSON-lines files (alerts, events and dead letters of `llamaflow replay`).
//!
//! Every sink consumes the shapes defined in the `schemas` crate (`schemas::Event`,
//! `schemas::Alert`); none of them defines a wire format of its own.

pub mod batch;
pub use batch::OutputBatch;
pub mod jsonl;
pub mod websocket;
