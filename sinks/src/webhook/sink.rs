//! The sink: signed POSTs, bounded concurrency, per-delivery retries.

use std::time::Instant;

use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use reqwest::header::{CONTENT_TYPE, HeaderValue, USER_AGENT};
use reqwest::{StatusCode, Url};
use sha2::Sha256;

use schemas::Alert;

use super::{WebhookConfig, WebhookError};
use crate::OutputBatch;
use crate::retry::jittered;

const SINK: &str = "webhook";

/// The channel name that asks for webhook delivery.
pub const WEBHOOK_CHANNEL: &str = "webhook";

/// What the sink did with the webhook alerts of one batch.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WebhookOutcome {
    /// Alerts delivered (answered with a 2xx).
    pub delivered: usize,
    /// Alerts given up on, each with the reason of its last failure, in batch order: the
    /// pipeline dead-letters them.
    pub failed: Vec<(Alert, String)>,
}

/// Delivers alerts to their webhooks (see the [module docs](super)).
pub struct WebhookSink {
    cfg: WebhookConfig,
    client: reqwest::Client,
}

impl std::fmt::Debug for WebhookSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSink").field("cfg", &self.cfg).finish()
    }
}

/// The URL an alert is to be POSTed to: its `webhook_url` when its `channels` contain
/// `"webhook"` and the URL is not empty; `None` otherwise.
pub fn webhook_target(alert: &Alert) -> Option<&str> {
    let url = alert.webhook_url.as_deref()?.trim();
    (!url.is_empty() && alert.channels.iter().any(|c| c == WEBHOOK_CHANNEL)).then_some(url)
}

/// The `x-llamaflow-signature` value of `body`: `sha256=` and the lowercase hex HMAC-SHA256 of
/// the body keyed with `secret`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes keys of any length: `new_from_slice` cannot fail for it.
    let mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).map(|mut m| {
        m.update(body);
        hex::encode(m.finalize().into_bytes())
    });
    match mac {
        Ok(hex) => format!("sha256={hex}"),
        Err(_) => String::from("sha256="),
    }
}

/// A failed attempt: retried or not.
enum AttemptError {
    /// Connection error, timeout, 5xx or 429.
    Transient(String),
    /// Anything else: sending again cannot help.
    Permanent(String),
}

/// One delivery: the target, the body and its signature.
struct Delivery {
    /// Index of the alert in the batch.
    index: usize,
    url: String,
    body: String,
    signature: String,
    alert_id: String,
}

impl WebhookSink {
    /// Checks the config and builds the HTTP client (rustls with the system's root
    /// certificates; redirects not followed). Does not contact any webhook.
    pub fn new(cfg: WebhookConfig) -> Result<Self, WebhookError> {
        cfg.validate()?;
        let client = reqwest::Client::builder()
            .timeout(cfg.timeout())
            .connect_timeout(cfg.timeout())
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(WebhookError::Client)?;
        Ok(WebhookSink { cfg, client })
    }

    /// The configuration in use.
    pub fn config(&self) -> &WebhookConfig {
        &self.cfg
    }

    /// Delivers every alert of the batch that asks for a webhook (see [`webhook_target`]),
    /// concurrently, and returns once each delivery succeeded or was given up on; given-up
    /// alerts are in [`WebhookOutcome::failed`]. A batch without such alerts returns at once.
    pub async fn write(&mut self, batch: &OutputBatch) -> Result<WebhookOutcome, WebhookError> {
        let mut deliveries = Vec::new();
        for (index, alert) in batch.alerts.iter().enumerate() {
            let Some(url) = webhook_target(alert) else {
                continue;
            };
            let body = serde_json::to_string(alert).map_err(WebhookError::Serialize)?;
            deliveries.push(Delivery {
                index,
                url: url.to_string(),
                signature: sign(self.cfg.secret.as_bytes(), body.as_bytes()),
                body,
                alert_id: alert.alert_id.clone(),
            });
        }
        if deliveries.is_empty() {
            return Ok(WebhookOutcome::default());
        }
        let started = Instant::now();
        let this = &*self;
        let results: Vec<(usize, Result<(), String>)> = futures_util::stream::iter(deliveries)
            .map(|d| async move { (d.index, this.deliver(&d).await) })
            .buffer_unordered(self.cfg.concurrency)
            .collect()
            .await;
        metrics::histogram!("llamaflow_sink_latency_seconds", "sink" => SINK).record(started.elapsed().as_secs_f64());

        let mut outcome = WebhookOutcome::default();
        let mut failed: Vec<(usize, String)> = Vec::new();
        for (index, result) in results {
            match result {
                Ok(()) => outcome.delivered += 1,
                Err(reason) => failed.push((index, reason)),
            }
        }
        failed.sort_by_key(|(i, _)| *i);
        outcome.failed = failed
            .into_iter()
            .filter_map(|(i, reason)| batch.alerts.get(i).map(|a| (a.clone(), reason)))
            .collect();
        metrics::counter!("llamaflow_sink_written_total", "sink" => SINK).increment(outcome.delivered as u64);
        if !outcome.failed.is_empty() {
            metrics::counter!("llamaflow_sink_failures_total", "sink" => SINK).increment(outcome.failed.len() as u64);
            tracing::error!(
                epoch = batch.epoch,
                failed = outcome.failed.len(),
                first_reason = %outcome.failed[0].1,
                "webhook sink: alerts not delivered, to be dead-lettered"
            );
        }
        Ok(outcome)
    }

    /// Tries one delivery until it succeeds, fails for good or runs out of attempts; the error
    /// is the reason to dead-letter with.
    async fn deliver(&self, d: &Delivery) -> Result<(), String> {
        let url = match Url::parse(&d.url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => u,
            Ok(u) => return Err(format!("unsupported webhook_url scheme {:?}", u.scheme())),
            Err(e) => return Err(format!("invalid webhook_url: {e}")),
        };
        let alert_id = match HeaderValue::from_str(&d.alert_id) {
            Ok(v) => v,
            Err(_) => return Err("alert_id is not a valid header value".to_string()),
        };
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let reason = match self.attempt(&url, d, &alert_id).await {
                Ok(()) => return Ok(()),
                Err(AttemptError::Permanent(reason)) => return Err(reason),
                Err(AttemptError::Transient(reason)) => reason,
            };
            if attempts >= self.cfg.max_attempts {
                return Err(format!("{reason} (gave up after {attempts} attempt(s))"));
            }
            let wait = jittered(self.cfg.backoff(attempts));
            metrics::counter!("llamaflow_sink_retries_total", "sink" => SINK).increment(1);
            tracing::warn!(
                attempt = attempts,
                max_attempts = self.cfg.max_attempts,
                alert_id = %d.alert_id,
                host = url.host_str().unwrap_or(""),
                %reason,
                "webhook sink: retrying in {wait:?}"
            );
            tokio::time::sleep(wait).await;
        }
    }

    /// One POST.
    async fn attempt(&self, url: &Url, d: &Delivery, alert_id: &HeaderValue) -> Result<(), AttemptError> {
        let response = self
            .client
            .post(url.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(USER_AGENT, HeaderValue::from_static("llamaflow-webhook"))
            .header("x-llamaflow-signature", d.signature.as_str())
            .header("x-llamaflow-alert-id", alert_id.clone())
            .body(d.body.clone())
            .send()
            .await;
        let response = match response {
            Ok(r) => r,
            Err(e) if e.is_builder() => {
                return Err(AttemptError::Permanent(format!(
                    "invalid webhook request: {}",
                    crate::error_chain(&e)
                )));
            }
            Err(e) if e.is_timeout() => {
                return Err(AttemptError::Transient(format!(
                    "webhook timed out after {} ms",
                    self.cfg.timeout_ms
                )));
            }
            Err(e) => {
                return Err(AttemptError::Transient(format!(
                    "webhook request failed: {}",
                    crate::error_chain(&e)
                )));
            }
        };
        let status = response.status();
        // The body is not needed; dropping the response closes or reuses the connection.
        drop(response);
        if status.is_success() {
            Ok(())
        } else if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            Err(AttemptError::Transient(format!("webhook answered HTTP {status}")))
        } else if status.is_redirection() {
            Err(AttemptError::Permanent(format!(
                "webhook answered HTTP {status} (redirects are not followed)"
            )))
        } else {
            Err(AttemptError::Permanent(format!("webhook answered HTTP {status}")))
        }
    }
}

impl From<WebhookOutcome> for crate::Written {
    fn from(o: WebhookOutcome) -> Self {
        crate::Written { rejected: o.failed }
    }
}

crate::sink::plain_sink!(WebhookSink, "webhook");
