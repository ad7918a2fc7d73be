//! `alert_deliveries`: the outbox the dispatcher sends from and the log of what was sent.
//!
//! A row per (alert, channel, recipient). The sink inserts `pending` rows (a row already there,
//! in any state, is left alone: a replayed epoch cannot send twice); the dispatcher claims due
//! rows (`sending` until `claimed_until`, `FOR UPDATE SKIP LOCKED`, so processes of a cluster
//! share the work), sends, and records `delivered`, `failed`, or `pending` again with the next
//! attempt's time.

use std::time::Duration;

use schemas::Alert;
use sqlx::PgPool;

use super::Channel;

/// A delivery to make.
#[derive(Clone, Debug, PartialEq)]
pub struct Delivery {
    /// The alert (SPEC §2 record).
    pub alert: Alert,
    /// The channel.
    pub channel: Channel,
    /// E-mail address, chat id, webhook URL or device token.
    pub recipient: String,
    /// The rule's name when `alert_rules` has it.
    pub rule_name: Option<String>,
    /// Attempts made before this one.
    pub attempts: u32,
    /// Seconds since the row was inserted (for the delivery latency).
    pub age_secs: f64,
}

/// The delivery log (see the [module docs](self)).
#[derive(Clone, Debug)]
pub struct Outbox {
    pool: PgPool,
}

const ENQUEUE_SQL: &str = "INSERT INTO alert_deliveries (alert_id, channel, recipient, user_id, rule_name, alert)
SELECT u.alert_id, u.channel, u.recipient, u.user_id, r.name, u.alert::jsonb
FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
    AS u(alert_id, channel, recipient, user_id, rule_id, alert)
LEFT JOIN alert_rules r ON r.id = u.rule_id
ON CONFLICT (alert_id, channel, recipient) DO NOTHING";

const CLAIM_SQL: &str = "UPDATE alert_deliveries d
SET status = 'sending', claimed_until = now() + make_interval(secs => $2)
FROM (
    SELECT alert_id, channel, recipient FROM alert_deliveries
    WHERE (status = 'pending' AND next_attempt_at <= now())
       OR (status = 'sending' AND claimed_until < now())
    ORDER BY next_attempt_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
) due
WHERE d.alert_id = due.alert_id AND d.channel = due.channel AND d.recipient = due.recipient
RETURNING d.alert_id, d.alert::text, d.channel, d.recipient, d.rule_name, d.attempts,
    extract(epoch FROM now() - d.created_at)::float8";

/// A claimed row: alert_id, alert (JSON text), channel, recipient, rule_name, attempts, age in
/// seconds.
type ClaimedRow = (String, String, String, String, Option<String>, i32, f64);

impl Outbox {
    /// The log in `pool`'s database (the migrations create the table).
    pub fn new(pool: PgPool) -> Self {
        Outbox { pool }
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Inserts `pending` rows for `(alert, channel, recipient)`, with the rule's name from
    /// `alert_rules`; rows already logged (in any state) are left as they are. Returns how
    /// many were new.
    pub async fn enqueue(&self, rows: &[(&Alert, Channel, String)]) -> Result<u64, sqlx::Error> {
        if rows.is_empty() {
            return Ok(0);
        }
        let mut cols: [Vec<String>; 6] = Default::default();
        for (alert, channel, recipient) in rows {
            let json = serde_json::to_string(alert).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
            for (col, v) in cols.iter_mut().zip([
                alert.alert_id.clone(),
                channel.name().to_string(),
                recipient.clone(),
                alert.user_id.clone(),
                alert.rule_id.clone(),
                json,
            ]) {
                col.push(v);
            }
        }
        let [a, b, c, d, e, f] = cols;
        let done = sqlx::query(ENQUEUE_SQL)
            .bind(a)
            .bind(b)
            .bind(c)
            .bind(d)
            .bind(e)
            .bind(f)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// Claims up to `limit` due deliveries for `lease`. A row whose stored alert no longer
    /// parses is marked failed and left out (with a warning).
    pub async fn claim(&self, limit: usize, lease: Duration) -> Result<Vec<Delivery>, sqlx::Error> {
        let rows: Vec<ClaimedRow> = sqlx::query_as(CLAIM_SQL)
            .bind(limit as i64)
            .bind(lease.as_secs_f64())
            .fetch_all(&self.pool)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (alert_id, alert, channel, recipient, rule_name, attempts, age_secs) in rows {
            let parsed = serde_json::from_str::<Alert>(&alert)
                .map_err(|e| e.to_string())
                .and_then(|a| {
                    Channel::parse(&channel)
                        .map(|c| (a, c))
                        .ok_or_else(|| format!("unknown channel {channel:?}"))
                });
            match parsed {
                Ok((alert, channel)) => out.push(Delivery {
                    alert,
                    channel,
                    recipient,
                    rule_name,
                    attempts: attempts.max(0) as u32,
                    age_secs,
                }),
                Err(why) => {
                    tracing::warn!(%channel, "alert_deliveries: unusable row ({why}); marked failed");
                    sqlx::query(
                        "UPDATE alert_deliveries SET status = 'failed', last_error = $4, claimed_until = NULL
                         WHERE alert_id = $1 AND channel = $2 AND recipient = $3",
                    )
                    .bind(&alert_id)
                    .bind(&channel)
                    .bind(&recipient)
                    .bind(format!("unusable row: {why}"))
                    .execute(&self.pool)
                    .await?;
                }
            }
        }
        Ok(out)
    }

    /// Records the end of an attempt of `d`.
    pub async fn record(&self, d: &Delivery, result: &Recorded) -> Result<(), sqlx::Error> {
        let sql = match result {
            Recorded::Delivered => {
                "UPDATE alert_deliveries SET status = 'delivered', attempts = attempts + 1, last_error = NULL,
                    delivered_at = now(), claimed_until = NULL
                 WHERE alert_id = $1 AND channel = $2 AND recipient = $3"
            }
            Recorded::Retry { .. } => {
                "UPDATE alert_deliveries SET status = 'pending', attempts = attempts + 1, last_error = $5,
                    next_attempt_at = now() + make_interval(secs => $4), claimed_until = NULL
                 WHERE alert_id = $1 AND channel = $2 AND recipient = $3"
            }
            Recorded::Deferred { .. } => {
                "UPDATE alert_deliveries SET status = 'pending', next_attempt_at = now() + make_interval(secs => $4),
                    claimed_until = NULL
                 WHERE alert_id = $1 AND channel = $2 AND recipient = $3"
            }
            Recorded::Failed { .. } => {
                "UPDATE alert_deliveries SET status = 'failed', attempts = attempts + 1, last_error = $4,
                    claimed_until = NULL
                 WHERE alert_id = $1 AND channel = $2 AND recipient = $3"
            }
        };
        let q = sqlx::query(sql)
            .bind(&d.alert.alert_id)
            .bind(d.channel.name())
            .bind(&d.recipient);
        let q = match result {
            Recorded::Delivered => q,
            Recorded::Retry { after, error } => q.bind(after.as_secs_f64()).bind(error),
            Recorded::Deferred { after } => q.bind(after.as_secs_f64()),
            Recorded::Failed { error } => q.bind(error),
        };
        q.execute(&self.pool).await.map(|_| ())
    }

    /// Deletes every `user_devices` row with `token` (the push service reported it
    /// unregistered); returns how many.
    pub async fn remove_token(&self, token: &str) -> Result<u64, sqlx::Error> {
        let done = sqlx::query("DELETE FROM user_devices WHERE device_token = $1")
            .bind(token)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}

/// The outcome of an attempt, as logged.
#[derive(Clone, Debug, PartialEq)]
pub enum Recorded {
    /// Sent.
    Delivered,
    /// Failed; try again after `after`.
    Retry {
        /// The wait.
        after: Duration,
        /// Why it failed.
        error: String,
    },
    /// Not attempted (a rate limit): try after `after`, not counted as an attempt.
    Deferred {
        /// The wait.
        after: Duration,
    },
    /// Given up on.
    Failed {
        /// Why.
        error: String,
    },
}
