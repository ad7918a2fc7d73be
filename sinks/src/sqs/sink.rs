//! The sink: sends alerts in `SendMessageBatch` calls of up to 10, in retry rounds.

use std::time::Instant;

use aws_config::{BehaviorVersion, Region};
use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::Credentials;
use aws_sdk_sqs::config::retry::RetryConfig;
use aws_sdk_sqs::config::timeout::TimeoutConfig;
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::operation::send_message_batch::SendMessageBatchError;
use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};

use schemas::Alert;

use super::{SqsSinkConfig, SqsSinkError};
use crate::OutputBatch;
use crate::retry::{jittered, timeout};

const SINK: &str = "sqs";

/// Most entries SQS accepts in one `SendMessageBatch` call.
pub(crate) const MAX_BATCH_ENTRIES: usize = 10;

/// Service error codes after which no call to this queue can succeed: the write fails as a
/// whole instead of dead-lettering alerts that are fine.
const FATAL_CODES: &[&str] = &[
    "AWS.SimpleQueueService.NonExistentQueue",
    "QueueDoesNotExist",
    "AccessDenied",
    "AccessDeniedException",
    "InvalidClientTokenId",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "UnrecognizedClientException",
    "MissingAuthenticationToken",
    "ExpiredToken",
    "InvalidSecurity",
    "InvalidAddress",
    "RequestExpired",
];

/// Service error codes of throttling and server-side trouble: retried.
const TRANSIENT_CODES: &[&str] = &[
    "ThrottlingException",
    "Throttling",
    "RequestThrottled",
    "TooManyRequestsException",
    "KmsThrottled",
    "ServiceUnavailable",
    "InternalError",
    "InternalFailure",
    "RequestTimeout",
];

/// What the sink did with the alerts of one batch.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SqsOutcome {
    /// Alerts SQS acknowledged.
    pub sent: usize,
    /// Alerts given up on, each with the reason of its last failure, in batch order: the
    /// pipeline dead-letters them.
    pub failed: Vec<(Alert, String)>,
}

/// Writes the alerts of [`OutputBatch`]es to an SQS queue (see the [module docs](super)).
pub struct SqsSink {
    cfg: SqsSinkConfig,
    client: Client,
    fifo: bool,
}

impl std::fmt::Debug for SqsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqsSink")
            .field("cfg", &self.cfg)
            .field("fifo", &self.fifo)
            .finish()
    }
}

/// How a failed call is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CallFailure {
    /// Worth sending again after a backoff.
    Transient,
    /// The call's content was rejected: its alerts fail now.
    Permanent,
    /// The sink cannot work (queue, access, credentials): the write fails.
    Fatal,
}

/// Classifies a failed `SendMessageBatch` call.
fn classify(e: &SdkError<SendMessageBatchError>) -> CallFailure {
    match e {
        SdkError::TimeoutError(_) | SdkError::ResponseError(_) => CallFailure::Transient,
        SdkError::DispatchFailure(d) => {
            // `as_other` is set for errors the HTTP client classified as retryable (e.g. an
            // incomplete response).
            if d.is_io() || d.is_timeout() || d.as_other().is_some() {
                CallFailure::Transient
            } else {
                // Credentials that cannot be resolved, a request the client cannot send.
                CallFailure::Fatal
            }
        }
        SdkError::ConstructionFailure(_) => CallFailure::Fatal,
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            let code = e.code().unwrap_or_default();
            if FATAL_CODES.contains(&code) || status == 401 || status == 403 {
                CallFailure::Fatal
            } else if TRANSIENT_CODES.contains(&code) || status == 429 || status >= 500 {
                CallFailure::Transient
            } else {
                CallFailure::Permanent
            }
        }
        // Future variants: sending again is the safe side (bounded by max_attempts).
        _ => CallFailure::Transient,
    }
}

/// The result of one `SendMessageBatch` call; alerts are named by their index in the batch.
#[derive(Debug, Default)]
struct ChunkResult {
    /// Alerts SQS acknowledged.
    sent: usize,
    /// Alerts to send again, with the reason they were not sent.
    retry: Vec<(usize, String)>,
    /// Alerts given up on, with the reason.
    failed: Vec<(usize, String)>,
    /// The whole call failed transiently (endpoint unreachable, timeout, 5xx): why.
    unavailable: Option<String>,
}

/// The request entry of `alert` with body `body`; `id` must be unique within its call.
pub(crate) fn entry(alert: &Alert, body: &str, id: usize, fifo: bool) -> Result<SendMessageBatchRequestEntry, String> {
    let mut b = SendMessageBatchRequestEntry::builder()
        .id(id.to_string())
        .message_body(body);
    if fifo {
        b = b
            .message_group_id(alert.user_id.as_str())
            .message_deduplication_id(alert.alert_id.as_str());
    }
    b.build().map_err(|e| format!("cannot build SQS entry: {e}"))
}

impl SqsSink {
    /// Builds the SDK client: static credentials from the config or the standard provider
    /// chain, the configured region and endpoint, the SDK's own retries off. Does not contact
    /// SQS (the first [`write`](Self::write) does); a bad config is an error.
    pub async fn connect(cfg: SqsSinkConfig) -> Result<Self, SqsSinkError> {
        cfg.validate()?;
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let mut timeouts = TimeoutConfig::builder();
        if let Some(t) = timeout(cfg.connect_timeout_ms) {
            timeouts = timeouts.connect_timeout(t);
        }
        if let Some(t) = timeout(cfg.attempt_timeout_ms) {
            timeouts = timeouts.operation_attempt_timeout(t);
        }
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(cfg.region.clone()))
            .http_client(http)
            .retry_config(RetryConfig::disabled())
            .timeout_config(timeouts.build());
        if let (Some(key), Some(secret)) = (&cfg.access_key_id, &cfg.secret_access_key) {
            loader = loader.credentials_provider(Credentials::new(
                key.clone(),
                secret.clone(),
                cfg.session_token.clone(),
                None,
                "llamaflow-config",
            ));
        }
        if let Some(endpoint) = &cfg.endpoint_url {
            loader = loader.endpoint_url(endpoint.clone());
        }
        let client = Client::new(&loader.load().await);
        let fifo = cfg.is_fifo();
        Ok(SqsSink { cfg, client, fifo })
    }

    /// The configuration in use.
    pub fn config(&self) -> &SqsSinkConfig {
        &self.cfg
    }

    /// Sends every alert of the batch (events are ignored) and returns once each one was
    /// acknowledged by SQS or given up on; given-up alerts are in [`SqsOutcome::failed`]. An
    /// error means the batch as a whole could not be sent (see the [module docs](super)). A
    /// batch without alerts returns at once.
    pub async fn write(&mut self, batch: &OutputBatch) -> Result<SqsOutcome, SqsSinkError> {
        if batch.alerts.is_empty() {
            return Ok(SqsOutcome::default());
        }
        let started = Instant::now();
        let result = self.send_all(batch).await;
        metrics::histogram!("llamaflow_sink_latency_seconds", "sink" => SINK).record(started.elapsed().as_secs_f64());
        match &result {
            Ok(outcome) => {
                metrics::counter!("llamaflow_sink_written_total", "sink" => SINK).increment(outcome.sent as u64);
                if !outcome.failed.is_empty() {
                    metrics::counter!("llamaflow_sink_failures_total", "sink" => SINK)
                        .increment(outcome.failed.len() as u64);
                    tracing::error!(
                        epoch = batch.epoch,
                        failed = outcome.failed.len(),
                        first_reason = %outcome.failed[0].1,
                        queue_url = %self.cfg.queue_url,
                        "sqs sink: alerts not sent, to be dead-lettered"
                    );
                }
            }
            Err(e) => tracing::error!(epoch = batch.epoch, error = %e, "sqs sink: batch not sent"),
        }
        result
    }

    /// The send rounds of one batch.
    async fn send_all(&self, batch: &OutputBatch) -> Result<SqsOutcome, SqsSinkError> {
        let bodies = batch
            .alerts
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<Vec<String>, _>>()
            .map_err(SqsSinkError::Serialize)?;
        let mut pending: Vec<usize> = (0..batch.alerts.len()).collect();
        let mut sent = 0usize;
        let mut failed: Vec<(usize, String)> = Vec::new();
        let mut round = 0u32;
        loop {
            round += 1;
            let mut retry = Vec::new();
            let mut unavailable = None;
            // Lanes send concurrently; a lane's calls go one after the other.
            let lanes = self.lanes(batch, &pending);
            let sent_lanes = futures_util::future::join_all(lanes.iter().map(|lane| async {
                let mut results = Vec::new();
                for chunk in lane.chunks(MAX_BATCH_ENTRIES) {
                    let r = self.send_chunk(batch, &bodies, chunk).await;
                    let stop = r.is_err();
                    results.push(r);
                    if stop {
                        break;
                    }
                }
                results
            }))
            .await;
            for r in sent_lanes.into_iter().flatten() {
                let r = r?;
                unavailable = unavailable.or(r.unavailable);
                sent += r.sent;
                failed.extend(r.failed);
                if !r.retry.is_empty() && round < self.cfg.max_attempts {
                    metrics::counter!("llamaflow_sink_retries_total", "sink" => SINK).increment(1);
                }
                retry.extend(r.retry);
            }
            if retry.is_empty() {
                break;
            }
            if round >= self.cfg.max_attempts {
                // SQS itself is out of reach: no alert is at fault, so none is dead-lettered;
                // the write fails and the pipeline retries the batch until SQS is back.
                if let Some(reason) = unavailable {
                    return Err(SqsSinkError::Unavailable {
                        epoch: batch.epoch,
                        queue_url: self.cfg.queue_url.clone(),
                        reason: format!("{reason} (after {round} attempt(s))"),
                    });
                }
                failed.extend(
                    retry
                        .into_iter()
                        .map(|(i, reason)| (i, format!("{reason} (gave up after {round} attempt(s))"))),
                );
                break;
            }
            let wait = jittered(self.cfg.backoff(round));
            tracing::warn!(
                round,
                max_attempts = self.cfg.max_attempts,
                pending = retry.len(),
                reason = %retry[0].1,
                "sqs sink: retrying in {wait:?}"
            );
            tokio::time::sleep(wait).await;
            pending = retry.into_iter().map(|(i, _)| i).collect();
        }
        failed.sort_by_key(|(i, _)| *i);
        let failed = failed
            .into_iter()
            .filter_map(|(i, reason)| batch.alerts.get(i).map(|a| (a.clone(), reason)))
            .collect();
        Ok(SqsOutcome { sent, failed })
    }

    /// `pending` (batch indexes, in batch order) split into at most `max_concurrent_calls`
    /// lanes, each in batch order: on a FIFO queue by message group (a user's alerts share a
    /// lane, so they are sent in order), otherwise call by call.
    fn lanes(&self, batch: &OutputBatch, pending: &[usize]) -> Vec<Vec<usize>> {
        let n = self.cfg.max_concurrent_calls.max(1);
        let mut lanes = vec![Vec::new(); n];
        for (pos, &i) in pending.iter().enumerate() {
            let lane = match (self.fifo, batch.alerts.get(i)) {
                (true, Some(a)) => {
                    use std::hash::{Hash, Hasher};
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    a.user_id.hash(&mut h);
                    (h.finish() % n as u64) as usize
                }
                _ => (pos / MAX_BATCH_ENTRIES) % n,
            };
            lanes[lane].push(i);
        }
        lanes.retain(|l| !l.is_empty());
        lanes
    }

    /// One `SendMessageBatch` call for the alerts at batch indexes `chunk` (at most 10). Entry
    /// ids are positions in `chunk`.
    async fn send_chunk(
        &self,
        batch: &OutputBatch,
        bodies: &[String],
        chunk: &[usize],
    ) -> Result<ChunkResult, SqsSinkError> {
        let mut result = ChunkResult::default();
        let mut entries = Vec::with_capacity(chunk.len());
        let mut in_call = Vec::with_capacity(chunk.len());
        for (pos, &index) in chunk.iter().enumerate() {
            let (Some(alert), Some(body)) = (batch.alerts.get(index), bodies.get(index)) else {
                continue;
            };
            match entry(alert, body, pos, self.fifo) {
                Ok(e) => {
                    entries.push(e);
                    in_call.push(pos);
                }
                Err(reason) => result.failed.push((index, reason)),
            }
        }
        if entries.is_empty() {
            return Ok(result);
        }
        let response = self
            .client
            .send_message_batch()
            .queue_url(&self.cfg.queue_url)
            .set_entries(Some(entries))
            .send()
            .await;
        let out = match response {
            Ok(out) => out,
            Err(e) => {
                let reason = format!("SendMessageBatch failed: {}", DisplayErrorContext(&e));
                let all = in_call.iter().map(|&pos| (chunk[pos], reason.clone()));
                match classify(&e) {
                    CallFailure::Fatal => {
                        return Err(SqsSinkError::Send {
                            epoch: batch.epoch,
                            queue_url: self.cfg.queue_url.clone(),
                            reason,
                        });
                    }
                    CallFailure::Permanent => result.failed.extend(all),
                    CallFailure::Transient => {
                        result.retry.extend(all);
                        result.unavailable = Some(reason);
                    }
                }
                return Ok(result);
            }
        };
        let mut answered = vec![false; chunk.len()];
        for ok in out.successful() {
            // Ids are positions in this chunk; anything else is not ours.
            if let Some(pos) = ok.id().parse::<usize>().ok().filter(|p| in_call.contains(p))
                && !std::mem::replace(&mut answered[pos], true)
            {
                result.sent += 1;
            }
        }
        for f in out.failed() {
            let Some(pos) = f.id().parse::<usize>().ok().filter(|p| in_call.contains(p)) else {
                continue;
            };
            if std::mem::replace(&mut answered[pos], true) {
                continue;
            }
            let reason = format!(
                "SQS rejected the message: {} {}",
                f.code(),
                f.message().unwrap_or_default()
            );
            let reason = reason.trim_end().to_string();
            if f.sender_fault() {
                result.failed.push((chunk[pos], reason));
            } else {
                result.retry.push((chunk[pos], reason));
            }
        }
        // An entry neither acknowledged nor rejected would break the protocol: it is sent again
        // (never lost) rather than counted as sent.
        for &pos in &in_call {
            if !answered[pos] {
                let reason = "SQS neither acknowledged nor rejected the message".to_string();
                result.retry.push((chunk[pos], reason));
            }
        }
        Ok(result)
    }
}

impl From<SqsOutcome> for crate::Written {
    fn from(o: SqsOutcome) -> Self {
        crate::Written { rejected: o.failed }
    }
}

crate::sink::plain_sink!(SqsSink, "sqs");
