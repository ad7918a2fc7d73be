//! [`PgSink`]: batch upserts of one [`OutputBatch`] in one transaction, with retries.

use std::collections::BTreeMap;
use std::time::Instant;

use schemas::{Alert, EventData, Millis};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use super::{PgError, PgSinkConfig};
use crate::OutputBatch;

const SINK: &str = "postgres";

const ALERTS_SQL: &str = "INSERT INTO alert_history
    (alert_id, rule_id, user_id, alert_type, subject, triggered_at, value, threshold, message, channels, webhook_url)
SELECT alert_id, rule_id, user_id, alert_type, subject, to_timestamp(triggered_at), value, threshold, message,
    channels::jsonb, webhook_url
FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::float8[], $7::float8[], $8::float8[],
    $9::text[], $10::text[], $11::text[])
    AS u(alert_id, rule_id, user_id, alert_type, subject, triggered_at, value, threshold, message, channels, webhook_url)
ON CONFLICT (alert_id) DO NOTHING";

const PRICES_SQL: &str = "INSERT INTO token_prices (coin, timestamp, price, symbol, confidence, decimals)
SELECT coin, to_timestamp(ts), price, symbol, confidence, decimals
FROM UNNEST($1::text[], $2::float8[], $3::float8[], $4::text[], $5::float8[], $6::int4[])
    AS u(coin, ts, price, symbol, confidence, decimals)
ON CONFLICT (coin, timestamp) DO UPDATE SET
    price = EXCLUDED.price, symbol = EXCLUDED.symbol, confidence = EXCLUDED.confidence, decimals = EXCLUDED.decimals
WHERE (token_prices.price, token_prices.symbol, token_prices.confidence, token_prices.decimals)
    IS DISTINCT FROM (EXCLUDED.price, EXCLUDED.symbol, EXCLUDED.confidence, EXCLUDED.decimals)";

const TVL_SQL: &str = "INSERT INTO protocol_tvl (protocol_id, chain, timestamp, tvl)
SELECT protocol_id, chain, to_timestamp(ts), tvl
FROM UNNEST($1::text[], $2::text[], $3::float8[], $4::float8[]) AS u(protocol_id, chain, ts, tvl)
ON CONFLICT (protocol_id, chain, timestamp) DO UPDATE SET tvl = EXCLUDED.tvl
WHERE protocol_tvl.tvl IS DISTINCT FROM EXCLUDED.tvl";

/// Writes [`OutputBatch`]es to Postgres (see the [module docs](super)).
pub struct PgSink {
    pool: PgPool,
    cfg: PgSinkConfig,
}

impl std::fmt::Debug for PgSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSink").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

impl PgSink {
    /// Builds the pool and checks that the database answers, retrying transient failures like
    /// [`write`](Self::write) does.
    pub async fn connect(cfg: PgSinkConfig) -> Result<PgSink, PgError> {
        let url = cfg.effective_url().ok_or_else(|| {
            PgError::Config("no database URL: set `url` or PREMIUM_DB / ALERTS_DB / DATABASE_URL".to_string())
        })?;
        if cfg.max_connections == 0 {
            return Err(PgError::Config("`max_connections` must be at least 1".to_string()));
        }
        if cfg.retry.max_attempts == 0 {
            return Err(PgError::Config("`retry.max_attempts` must be at least 1".to_string()));
        }
        let pool = PgPoolOptions::new()
            .max_connections(cfg.max_connections)
            .acquire_timeout(cfg.acquire_timeout())
            .connect_lazy(&url)
            .map_err(|e| PgError::Config(format!("`url`: {e}")))?;
        let sink = PgSink { pool, cfg };
        let mut failed = 0;
        loop {
            match sqlx::query("SELECT 1").execute(&sink.pool).await {
                Ok(_) => return Ok(sink),
                Err(e) => {
                    failed += 1;
                    if !is_transient(&e) || failed >= sink.cfg.retry.max_attempts {
                        return Err(PgError::Connect {
                            attempts: failed,
                            source: e,
                        });
                    }
                    tracing::warn!(error = %e, attempt = failed, "postgres sink: cannot connect yet, retrying");
                    tokio::time::sleep(sink.cfg.retry.backoff_with_jitter(failed)).await;
                }
            }
        }
    }

    /// The connection pool (e.g. for [`migrate`](super::migrate)).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The configuration in use.
    pub fn config(&self) -> &PgSinkConfig {
        &self.cfg
    }

    /// Upserts the batch's alerts, prices and TVL in one transaction; returns once it is
    /// committed. Transient failures are retried; after the last attempt the error is returned
    /// and nothing of the batch is committed.
    pub async fn write(&mut self, batch: &OutputBatch) -> Result<(), PgError> {
        let started = Instant::now();
        let rows = Rows::from_batch(batch, self.cfg.write_prices, self.cfg.write_tvl);
        let result = if rows.is_empty() {
            Ok(())
        } else {
            self.write_with_retries(&rows).await
        };
        metrics::histogram!("llamaflow_sink_latency_seconds", "sink" => SINK).record(started.elapsed().as_secs_f64());
        match &result {
            Ok(()) => metrics::counter!("llamaflow_sink_written_total", "sink" => SINK).increment(rows.len() as u64),
            Err(e) => {
                metrics::counter!("llamaflow_sink_failures_total", "sink" => SINK).increment(1);
                tracing::error!(error = %e, epoch = batch.epoch, "postgres sink: batch not written");
            }
        }
        result
    }

    async fn write_with_retries(&self, rows: &Rows<'_>) -> Result<(), PgError> {
        let mut failed = 0;
        loop {
            match write_once(&self.pool, rows).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    failed += 1;
                    if !is_transient(&e) || failed >= self.cfg.retry.max_attempts {
                        return Err(PgError::Write {
                            attempts: failed,
                            source: e,
                        });
                    }
                    metrics::counter!("llamaflow_sink_retries_total", "sink" => SINK).increment(1);
                    let wait = self.cfg.retry.backoff_with_jitter(failed);
                    tracing::warn!(error = %e, attempt = failed, wait_ms = wait.as_millis() as u64,
                        "postgres sink: transient failure, retrying");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

async fn write_once(pool: &PgPool, rows: &Rows<'_>) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    let a = &rows.alerts;
    if !a.alert_id.is_empty() {
        sqlx::query(ALERTS_SQL)
            .bind(&a.alert_id)
            .bind(&a.rule_id)
            .bind(&a.user_id)
            .bind(&a.alert_type)
            .bind(&a.subject)
            .bind(&a.triggered_at)
            .bind(&a.value)
            .bind(&a.threshold)
            .bind(&a.message)
            .bind(&a.channels)
            .bind(&a.webhook_url)
            .execute(&mut *tx)
            .await?;
    }
    let p = &rows.prices;
    if !p.coin.is_empty() {
        sqlx::query(PRICES_SQL)
            .bind(&p.coin)
            .bind(&p.ts)
            .bind(&p.price)
            .bind(&p.symbol)
            .bind(&p.confidence)
            .bind(&p.decimals)
            .execute(&mut *tx)
            .await?;
    }
    let t = &rows.tvl;
    if !t.protocol_id.is_empty() {
        sqlx::query(TVL_SQL)
            .bind(&t.protocol_id)
            .bind(&t.chain)
            .bind(&t.ts)
            .bind(&t.tvl)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await
}

/// Whether retrying may succeed: the connection or the server was (temporarily) unavailable,
/// or the transaction lost a serialization or deadlock conflict.
pub(crate) fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            // 08: connection exception; 40001 serialization failure; 40P01 deadlock; 53300 too
            // many connections; 57P01-03 admin/crash shutdown, cannot connect now.
            c.starts_with("08") || matches!(&*c, "40001" | "40P01" | "53300" | "57P01" | "57P02" | "57P03")
        }),
        _ => false,
    }
}

/// Unix seconds for `to_timestamp()`.
fn seconds(ms: Millis) -> f64 {
    ms as f64 / 1000.0
}

/// The rows of one batch as columns, merged by key and sorted by key.
#[derive(Default)]
struct Rows<'a> {
    alerts: AlertCols<'a>,
    prices: PriceCols<'a>,
    tvl: TvlCols<'a>,
}

#[derive(Default)]
struct AlertCols<'a> {
    alert_id: Vec<&'a str>,
    rule_id: Vec<&'a str>,
    user_id: Vec<&'a str>,
    alert_type: Vec<&'a str>,
    subject: Vec<&'a str>,
    triggered_at: Vec<f64>,
    value: Vec<f64>,
    threshold: Vec<f64>,
    message: Vec<&'a str>,
    channels: Vec<String>,
    webhook_url: Vec<Option<&'a str>>,
}

#[derive(Default)]
struct PriceCols<'a> {
    coin: Vec<&'a str>,
    ts: Vec<f64>,
    price: Vec<f64>,
    symbol: Vec<Option<&'a str>>,
    confidence: Vec<Option<f64>>,
    decimals: Vec<Option<i32>>,
}

#[derive(Default)]
struct TvlCols<'a> {
    protocol_id: Vec<&'a str>,
    chain: Vec<&'a str>,
    ts: Vec<f64>,
    tvl: Vec<f64>,
}

type PriceRow<'a> = (f64, Option<&'a str>, Option<f64>, Option<u32>);

impl<'a> Rows<'a> {
    fn from_batch(batch: &'a OutputBatch, prices: bool, tvl: bool) -> Rows<'a> {
        // An alert is immutable: the first copy of an id wins (they are identical anyway).
        let mut alerts: BTreeMap<&str, &Alert> = BTreeMap::new();
        for a in &batch.alerts {
            alerts.entry(a.alert_id.as_str()).or_insert(a);
        }
        // Market values: the last one of a key in the batch wins, as it would row by row.
        let mut price_rows: BTreeMap<(&str, Millis), PriceRow> = BTreeMap::new();
        let mut tvl_rows: BTreeMap<(&str, &str, Millis), f64> = BTreeMap::new();
        for e in &batch.events {
            match &e.data {
                EventData::PriceUpdate {
                    coin,
                    price,
                    symbol,
                    confidence,
                    decimals,
                    timestamp,
                    ..
                } if prices => {
                    price_rows.insert(
                        (coin.as_str(), *timestamp),
                        (*price, symbol.as_deref(), *confidence, *decimals),
                    );
                }
                EventData::TvlUpdate {
                    protocol_id,
                    tvl: total,
                    chain_tvls,
                    timestamp,
                    ..
                } if tvl => {
                    for (chain, v) in chain_tvls {
                        tvl_rows.insert((protocol_id.as_str(), chain.as_str(), *timestamp), *v);
                    }
                    tvl_rows.insert((protocol_id.as_str(), "total", *timestamp), *total);
                }
                _ => {}
            }
        }
        let mut rows = Rows::default();
        for a in alerts.into_values() {
            let c = &mut rows.alerts;
            c.alert_id.push(&a.alert_id);
            c.rule_id.push(&a.rule_id);
            c.user_id.push(&a.user_id);
            c.alert_type.push(&a.alert_type);
            c.subject.push(&a.subject);
            c.triggered_at.push(seconds(a.triggered_at));
            c.value.push(a.value);
            c.threshold.push(a.threshold);
            c.message.push(&a.message);
            c.channels.push(serde_json::Value::from(a.channels.clone()).to_string());
            c.webhook_url.push(a.webhook_url.as_deref());
        }
        for ((coin, ts), (price, symbol, confidence, decimals)) in price_rows {
            let c = &mut rows.prices;
            c.coin.push(coin);
            c.ts.push(seconds(ts));
            c.price.push(price);
            c.symbol.push(symbol);
            c.confidence.push(confidence);
            c.decimals.push(decimals.and_then(|d| i32::try_from(d).ok()));
        }
        for ((protocol_id, chain, ts), v) in tvl_rows {
            let c = &mut rows.tvl;
            c.protocol_id.push(protocol_id);
            c.chain.push(chain);
            c.ts.push(seconds(ts));
            c.tvl.push(v);
        }
        rows
    }

    fn len(&self) -> usize {
        self.alerts.alert_id.len() + self.prices.coin.len() + self.tvl.protocol_id.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

crate::sink::plain_sink!(PgSink, "postgres", merges);
