//! The sink: builds one pipeline per batch and sends it, retrying on connection errors.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

use std::time::Instant;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ErrorKind, Pipeline, RedisError, ServerErrorKind};
use serde::Serialize;

use schemas::time::ser_seconds;
use schemas::{Event, EventData, Millis};

use super::{RedisSinkConfig, RedisSinkError};
use crate::OutputBatch;
use crate::retry::{jittered, timeout};

const SINK: &str = "redis";

/// Writes [`OutputBatch`]es to Redis (see the [module docs](super)).
///
/// Holds one multiplexed connection, opened by [`connect`](Self::connect) and reopened by the
/// next attempt after any error.
pub struct RedisSink {
    cfg: RedisSinkConfig,
    client: redis::Client,
    conn_cfg: AsyncConnectionConfig,
    conn: Option<MultiplexedConnection>,
    /// `host:port`, for errors and logs.
    addr: String,
}

impl std::fmt::Debug for RedisSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSink")
            .field("cfg", &self.cfg)
            .field("connected", &self.conn.is_some())
            .finish()
    }
}

/// A `price:<coin>` value: a DeFiLlama `/prices/current` entry.
#[derive(Serialize)]
struct PriceValue<'a> {
    price: f64,
    symbol: Option<&'a str>,
    #[serde(serialize_with = "ser_seconds")]
    timestamp: Millis,
    confidence: Option<f64>,
    decimals: Option<u32>,
}

/// A `tvl:<protocol_id>` value.
#[derive(Serialize)]
struct TvlValue<'a> {
    tvl: f64,
    #[serde(rename = "chainTvls")]
    chain_tvls: &'a BTreeMap<String, f64>,
    change_1h: Option<f64>,
    change_1d: Option<f64>,
    change_7d: Option<f64>,
    #[serde(serialize_with = "ser_seconds")]
    timestamp: Millis,
}

/// A `gas:<chain>` value.
#[derive(Serialize)]
struct GasValue {
    gwei: f64,
    #[serde(serialize_with = "ser_seconds")]
    timestamp: Millis,
}

/// The latest-value key of an event and its event time; `None` for events without one.
/// Aggregates (SPEC §8) are kept under `chain_tvl:<chain>` and `category_tvl:<category>`
/// (`category_tvl:null` for protocols without a category), stamped with the event's time.
fn latest_key(event: &Event) -> Option<(String, Millis)> {
    match &event.data {
        EventData::PriceUpdate { coin, timestamp, .. } => Some((format!("price:{coin}"), *timestamp)),
        EventData::TvlUpdate {
            protocol_id, timestamp, ..
        } => Some((format!("tvl:{protocol_id}"), *timestamp)),
        EventData::GasUpdate { chain, timestamp, .. } => Some((format!("gas:{chain}"), *timestamp)),
        EventData::ChainTvlUpdate { chain, .. } => Some((format!("chain_tvl:{chain}"), event.timestamp)),
        EventData::CategoryTvlUpdate { category, .. } => Some((
            format!("category_tvl:{}", category.as_deref().unwrap_or("null")),
            event.timestamp,
        )),
        EventData::Depeg { .. } | EventData::WhaleTransfer { .. } | EventData::Liquidation { .. } => None,
    }
}

/// The JSON stored under an event's latest-value key (`None` for events without one).
fn latest_value(data: &EventData) -> Result<Option<String>, serde_json::Error> {
    match data {
        EventData::PriceUpdate {
            price,
            symbol,
            confidence,
            decimals,
            timestamp,
            ..
        } => serde_json::to_string(&PriceValue {
            price: *price,
            symbol: symbol.as_deref(),
            timestamp: *timestamp,
            confidence: *confidence,
            decimals: *decimals,
        })
        .map(Some),
        EventData::TvlUpdate {
            tvl,
            chain_tvls,
            change_1h,
            change_1d,
            change_7d,
            timestamp,
            ..
        } => serde_json::to_string(&TvlValue {
            tvl: *tvl,
            chain_tvls,
            change_1h: *change_1h,
            change_1d: *change_1d,
            change_7d: *change_7d,
            timestamp: *timestamp,
        })
        .map(Some),
        EventData::GasUpdate { gwei, timestamp, .. } => serde_json::to_string(&GasValue {
            gwei: *gwei,
            timestamp: *timestamp,
        })
        .map(Some),
        EventData::ChainTvlUpdate { .. } | EventData::CategoryTvlUpdate { .. } => serde_json::to_string(data).map(Some),
        EventData::Depeg { .. } | EventData::WhaleTransfer { .. } | EventData::Liquidation { .. } => Ok(None),
    }
}

/// The newest event per latest-value key: largest event time, the later one on a tie.
pub(crate) fn newest_per_key(events: &[Event]) -> BTreeMap<String, &Event> {
    let mut newest: BTreeMap<String, (Millis, &Event)> = BTreeMap::new();
    for e in events {
        let Some((key, ts)) = latest_key(e) else {
            continue;
        };
        match newest.entry(key) {
            Entry::Vacant(v) => {
                v.insert((ts, e));
            }
            Entry::Occupied(mut o) => {
                if ts >= o.get().0 {
                    o.insert((ts, e));
                }
            }
        }
    }
    newest.into_iter().map(|(k, (_, e))| (k, e)).collect()
}

/// The commands of one batch, as a pipeline, and how many there are.
pub(crate) fn build_pipeline(cfg: &RedisSinkConfig, batch: &OutputBatch) -> Result<(Pipeline, u64), RedisSinkError> {
    let ser = |what| move |source| RedisSinkError::Serialize { what, source };
    let mut pipe = redis::pipe();
    let mut commands = 0u64;
    for (key, event) in newest_per_key(&batch.events) {
        if let Some(value) = latest_value(&event.data).map_err(ser("a latest value"))? {
            pipe.cmd("SET").arg(key).arg(value).arg("EX").arg(cfg.ttl_secs).ignore();
            commands += 1;
        }
    }
    if cfg.publish {
        for event in &batch.events {
            // Serialized once, published on each of its channels.
            let data = serde_json::to_string(&event.data).map_err(ser("event data"))?;
            for channel in event.channels() {
                pipe.cmd("PUBLISH")
                    .arg(format!("events:{channel}"))
                    .arg(data.as_str())
                    .ignore();
                commands += 1;
            }
        }
        for alert in &batch.alerts {
            let json = serde_json::to_string(alert).map_err(ser("an alert"))?;
            pipe.cmd("PUBLISH")
                .arg(format!("events:alerts:{}", alert.user_id))
                .arg(json)
                .ignore();
            commands += 1;
        }
    }
    Ok((pipe, commands))
}

/// Errors after which the same commands may succeed on a new connection a little later.
fn is_transient(e: &RedisError) -> bool {
    matches!(
        e.kind(),
        ErrorKind::Io
            | ErrorKind::Parse
            | ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::ReadOnly
            )
    )
}

impl RedisSink {
    /// Connects (with `AUTH` and `SELECT db`), retrying connection errors like
    /// [`write`](Self::write) does. Authentication failures and a bad DB index are returned at
    /// once.
    pub async fn connect(cfg: RedisSinkConfig) -> Result<Self, RedisSinkError> {
        let info = cfg.connection_info()?;
        let addr = info.addr().to_string();
        let client = redis::Client::open(info).map_err(|e| RedisSinkError::Config(e.to_string()))?;
        let conn_cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(timeout(cfg.connect_timeout_ms))
            .set_response_timeout(timeout(cfg.response_timeout_ms));
        let mut sink = RedisSink {
            cfg,
            client,
            conn_cfg,
            conn: None,
            addr,
        };
        match sink.run(None).await {
            Ok(()) => Ok(sink),
            Err((attempts, source)) => Err(RedisSinkError::Connect {
                addr: sink.addr,
                attempts,
                source,
            }),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &RedisSinkConfig {
        &self.cfg
    }

    /// Writes a batch as one pipeline and returns once Redis replied to all of it; retries the
    /// whole batch on connection errors (see the [module docs](super)). An empty batch (no
    /// command to send) returns at once.
    pub async fn write(&mut self, batch: &OutputBatch) -> Result<(), RedisSinkError> {
        let (pipe, commands) = build_pipeline(&self.cfg, batch)?;
        if commands == 0 {
            return Ok(());
        }
        let started = Instant::now();
        let result = self.run(Some(&pipe)).await;
        metrics::histogram!("llamaflow_sink_latency_seconds", "sink" => SINK).record(started.elapsed().as_secs_f64());
        match result {
            Ok(()) => {
                metrics::counter!("llamaflow_sink_written_total", "sink" => SINK).increment(commands);
                Ok(())
            }
            Err((attempts, source)) => {
                metrics::counter!("llamaflow_sink_failures_total", "sink" => SINK).increment(1);
                tracing::error!(
                    epoch = batch.epoch,
                    attempts,
                    addr = %self.addr,
                    error = %source,
                    "redis sink: batch not written"
                );
                Err(RedisSinkError::Write {
                    epoch: batch.epoch,
                    attempts,
                    source,
                })
            }
        }
    }

    /// One attempt: (re)connects when needed, then sends `pipe` (if any) and awaits the replies.
    async fn attempt(&mut self, pipe: Option<&Pipeline>) -> Result<(), RedisError> {
        let mut conn = match &self.conn {
            Some(c) => c.clone(),
            None => {
                let c = self
                    .client
                    .get_multiplexed_async_connection_with_config(&self.conn_cfg)
                    .await?;
                self.conn = Some(c.clone());
                c
            }
        };
        match pipe {
            Some(p) => p.query_async::<()>(&mut conn).await,
            None => Ok(()),
        }
    }

    /// Attempts until success, a permanent error or `max_attempts`; the error comes with the
    /// number of attempts made.
    async fn run(&mut self, pipe: Option<&Pipeline>) -> Result<(), (u32, RedisError)> {
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let Err(e) = self.attempt(pipe).await else {
                return Ok(());
            };
            // The next attempt starts from a fresh connection whatever went wrong.
            self.conn = None;
            if !is_transient(&e) || attempts >= self.cfg.max_attempts {
                return Err((attempts, e));
            }
            let wait = jittered(self.cfg.backoff(attempts));
            metrics::counter!("llamaflow_sink_retries_total", "sink" => SINK).increment(1);
            tracing::warn!(
                attempt = attempts,
                max_attempts = self.cfg.max_attempts,
                addr = %self.addr,
                error = %e,
                "redis sink: retrying in {wait:?}"
            );
            tokio::time::sleep(wait).await;
        }
    }
}

crate::sink::plain_sink!(RedisSink, "redis", merges);
