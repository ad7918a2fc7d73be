//! llamaflow sinks: where the pipeline's outputs go.
//!
//! - [`websocket`]: the live WebSocket fanout (SPEC §5) — a [`websocket::Hub`] that the
//!   dataflow workers publish market events and alerts into, and an axum router serving
//!   `GET /ws` to subscribers.
//!
//! Every sink consumes the shapes defined in the `schemas` crate (`schemas::Event`,
//! `schemas::Alert`); none of them defines a wire format of its own.

pub mod jsonl;
pub mod websocket;

// TEMP-VERIFY (to be removed)
#[cfg(test)]
extern crate self as sinks;
#[cfg(test)]
#[path = "../../pipeline/src/http.rs"]
mod pipeline_http;
#[cfg(test)]
#[path = "websocket/demo_tmp.rs"]
mod demo_tmp;
