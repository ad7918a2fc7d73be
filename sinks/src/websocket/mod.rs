//! The WebSocket fanout (SPEC §5).
//!
//! The dataflow workers publish into a [`Hub`] — synchronously, from any thread, without ever
//! blocking — and [`router`] serves `GET /ws` to subscribers:
//!
//! ```no_run
//! use sinks::websocket::{HttpLimits, Hub, WsConfig, router, serve};
//!
//! # async fn run() -> std::io::Result<()> {
//! let hub = Hub::new(WsConfig { allow_anonymous: true, ..WsConfig::default() });
//! hub.set_api_key("demo", "u1");
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! // The dataflow keeps a clone and calls `hub.publish_event(&event)` / `hub.publish_alert(&a)`.
//! serve(listener, router(hub.clone()), hub, HttpLimits::default(), async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await
//! # }
//! ```
//!
//! # Protocol
//!
//! - Authentication: API key from `?api_key=` (preferred) or the `x-api-key` header. An unknown
//!   key gets HTTP 401; no key at all is an anonymous connection when
//!   [`WsConfig::allow_anonymous`] is set, otherwise 401. Anonymous connections may subscribe to
//!   market channels only.
//! - Client frames: `{"type":"subscribe","channels":[..]}`, `{"type":"unsubscribe","channels":[..]}`,
//!   `{"type":"ping"}`.
//! - Server frames: `{"type":"subscribed","channels":[..]}` (the channels of the request that are
//!   now subscribed, normalised), `{"type":"unsubscribed","channels":[..]}`,
//!   `{"type":"pong","timestamp":<ms>}`, market events
//!   `{"type":"price_update","channel":"prices:coingecko:ethereum","data":{..},"timestamp":<ms>}`
//!   (`type` is the event's type, `timestamp` its event time in ms), alerts
//!   `{"type":"alert","channel":"alerts","data":{alert}}` (only to connections whose key belongs
//!   to the alert's user and that subscribed to `alerts`), and errors
//!   `{"type":"error","code":"bad_request"|"unknown_channel"|"forbidden"|"rate_limited","message":".."}`.
//! - Channels: `prices`, `prices:<coin>` (coin ids are normalised as in the input, so
//!   `prices:ethereum:0xA0B8…` is `prices:ethereum:0xa0b8…`), `tvl`, `tvl:<protocol_id>`,
//!   `chain:<chain>`, `chains`, `categories`, `depeg`, `whales`, `liquidations`, `gas`,
//!   `gas:<chain>`, `alerts`.
//! - Snapshots (SPEC §8): with a [`SnapshotSource`] set on the hub, `subscribed` and then one
//!   `{"type":"snapshot","channel":C,"data":[..],"as_of":<ms>}` per newly subscribed channel are
//!   queued with the connection's events, while publishing is held back
//!   ([`Hub::publish_epoch`]): the snapshot and the events after it have no gap and no
//!   duplicate.
//!   An event is delivered once per subscribed channel it is published on: a connection on both
//!   `prices` and `prices:coingecko:ethereum` gets an ETH tick twice, with two `channel` values.
//! - A subscribe request is applied channel by channel: the valid ones are subscribed and
//!   acknowledged, each rejected one is reported in an error frame (`unknown_channel`,
//!   `forbidden` for `alerts` on an anonymous connection, `forbidden` past
//!   [`WsConfig::max_subscriptions`]).
//!
//! # Limits
//!
//! - A client message larger than [`WsConfig::max_frame_bytes`] closes the connection with 1009.
//! - Client messages (text or binary data frames; not WebSocket pings/pongs) are rate limited per
//!   API key — shared by all connections using it — by a token bucket of
//!   [`WsConfig::max_msgs_per_sec`] tokens refilled at that rate; anonymous connections each have
//!   their own bucket. A message over the limit is dropped and answered with `rate_limited`.
//! - Each channel keeps its last [`WsConfig::send_queue`] frames for subscribers that have not
//!   written them yet (a client's replies and snapshots are bounded by the same number).
//!   Publishing never waits: a subscriber that falls further behind — its socket full, because
//!   it does not read fast enough — is dropped from every channel at once and closed with 1013
//!   ("try again later"); a slow client never slows anyone else.
//! - The server sends a WebSocket ping every [`WsConfig::ping_interval`]; a connection from which
//!   nothing (not even a pong) arrives for three intervals is dropped.
//! - [`Hub::shutdown`] (called by [`serve`] when its shutdown future completes) closes every
//!   connection with 1001 ("going away") and refuses new ones with HTTP 503.
//!
//! # Metrics
//!
//! Gauge `llamaflow_ws_connections`; counters `llamaflow_ws_frames_sent_total` and
//! `llamaflow_ws_disconnects_total{reason}` with reason `client_closed`, `slow_consumer`,
//! `shutdown`, `frame_too_large`, `protocol_error` (bad framing, 1002, or text that is not
//! UTF-8, 1007), `ping_timeout` or `connection_lost`.
//!
//! # How frames reach clients
//!
//! Publishing encodes each channel's frame once (JSON and WebSocket header) and appends it to
//! that channel's broadcast ring; it never touches a connection. Writer threads (one per core,
//! at most four, connections split between them) then bring every subscriber of the channels
//! published since their last pass up to date with one non-blocking vectored write of all it
//! has pending — whatever was published meanwhile goes out in that same write. A socket that
//! cannot take everything keeps the rest, and its connection task flushes it when it becomes
//! writable. Each connection has one task, which reads and answers the client and pings.

mod channel;
mod connection;
mod fanout;
mod frame;
mod hub;
mod protocol;
mod server;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_python;

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

pub use hub::{Hub, SnapshotSource};
pub use server::{HttpLimits, LISTEN_BACKLOG, bind, router, serve};

/// Configuration of the WebSocket fanout.
///
/// Its `Debug` output shows how many API keys there are, never the keys.
#[derive(Clone)]
pub struct WsConfig {
    /// API key → user id. More keys can be added at run time with [`Hub::set_api_key`].
    pub api_keys: HashMap<String, String>,
    /// Accept connections without a key; they may subscribe to market channels only.
    pub allow_anonymous: bool,
    /// Most channels one connection may be subscribed to (default 100).
    pub max_subscriptions: usize,
    /// Largest client message accepted, in bytes (default 64 KiB); larger closes with 1009.
    pub max_frame_bytes: usize,
    /// Client messages per second per API key (default 50); 0 disables the limit.
    pub max_msgs_per_sec: u32,
    /// Frames a channel keeps for subscribers that have not written them yet, and replies a
    /// connection may have queued; a subscriber further behind counts as too slow and is
    /// closed with 1013 (default 1024, at least 1).
    pub send_queue: usize,
    /// Interval of server pings (default 20 s; used within 10 ms ..= 24 h).
    pub ping_interval: Duration,
    /// Most anonymous connections open from one IP address (default 100), which also share
    /// one rate bucket; 0: no per-address accounting (no cap, a bucket per connection).
    /// Behind a reverse proxy every client has the proxy's address: raise it, set 0, or use
    /// API keys.
    pub max_anonymous_per_ip: usize,
}

impl fmt::Debug for WsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsConfig")
            .field("api_keys", &format_args!("<{} keys>", self.api_keys.len()))
            .field("allow_anonymous", &self.allow_anonymous)
            .field("max_subscriptions", &self.max_subscriptions)
            .field("max_frame_bytes", &self.max_frame_bytes)
            .field("max_msgs_per_sec", &self.max_msgs_per_sec)
            .field("send_queue", &self.send_queue)
            .field("ping_interval", &self.ping_interval)
            .field("max_anonymous_per_ip", &self.max_anonymous_per_ip)
            .finish()
    }
}

impl Default for WsConfig {
    fn default() -> Self {
        WsConfig {
            api_keys: HashMap::new(),
            allow_anonymous: false,
            max_subscriptions: 100,
            max_frame_bytes: 64 * 1024,
            max_msgs_per_sec: 50,
            send_queue: 1024,
            ping_interval: Duration::from_secs(20),
            max_anonymous_per_ip: 100,
        }
    }
}
