//! The producer and the batch write.

use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use serde::Serialize;

use super::{KafkaSinkConfig, KafkaSinkError};
use crate::OutputBatch;

const SINK: &str = "kafka";
/// Longest wait for a broker's answer in [`KafkaSink::connect`].
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause before enqueueing again when librdkafka's queue is full.
const QUEUE_FULL_BACKOFF: Duration = Duration::from_millis(10);

/// librdkafka callbacks of the sink's producer: logs to `tracing`.
pub(crate) struct SinkContext;

impl ClientContext for SinkContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, msg: &str) {
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                tracing::error!("kafka sink: librdkafka {fac}: {msg}")
            }
            RDKafkaLogLevel::Warning => tracing::warn!("kafka sink: librdkafka {fac}: {msg}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => tracing::info!("kafka sink: librdkafka {fac}: {msg}"),
            RDKafkaLogLevel::Debug => tracing::debug!("kafka sink: librdkafka {fac}: {msg}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!("kafka sink: {error}: {reason}");
    }
}

type Prod = FutureProducer<SinkContext>;

/// Writes [`OutputBatch`]es to Kafka (see the [module docs](super)).
pub struct KafkaSink {
    cfg: KafkaSinkConfig,
    producer: Prod,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

fn create(cfg: &KafkaSinkConfig) -> Result<Prod, KafkaSinkError> {
    cfg.client_config()
        .create_with_context(SinkContext)
        .map_err(|source| KafkaSinkError::Connect {
            brokers: cfg.brokers.clone(),
            source,
        })
}

/// One enqueued message awaiting its delivery report.
struct InFlight<'a> {
    topic: &'a str,
    key: &'a str,
    delivery: DeliveryFuture,
}

impl KafkaSink {
    /// Creates the idempotent producer and checks that a broker answers (within
    /// `message_timeout_ms`, at most 10 s).
    pub async fn connect(cfg: KafkaSinkConfig) -> Result<Self, KafkaSinkError> {
        cfg.validate()?;
        let producer = create(&cfg)?;
        let probe = producer.clone();
        let wait = Duration::from_millis(u64::from(cfg.message_timeout_ms)).min(CONNECT_TIMEOUT);
        let answer = tokio::task::spawn_blocking(move || probe.client().fetch_metadata(None, wait).map(|_| ()))
            .await
            .unwrap_or(Err(KafkaError::Canceled));
        if let Err(source) = answer {
            return Err(KafkaSinkError::Connect {
                brokers: cfg.brokers.clone(),
                source,
            });
        }
        tracing::info!(
            "kafka sink: producing to {} (events: {}) and {} on {}",
            cfg.events_topic,
            if cfg.publish_events { "on" } else { "off" },
            cfg.alerts_topic,
            cfg.brokers
        );
        Ok(KafkaSink { cfg, producer })
    }

    /// The configuration in use.
    pub fn config(&self) -> &KafkaSinkConfig {
        &self.cfg
    }

    /// Enqueues every message of the batch, then waits for all delivery reports; `Ok` only if
    /// every message was acknowledged (see the [module docs](super)). An empty batch returns at
    /// once.
    pub async fn write(&mut self, batch: &OutputBatch) -> Result<(), KafkaSinkError> {
        let events = if self.cfg.publish_events { batch.events.len() } else { 0 };
        let total = events + batch.alerts.len();
        if total == 0 {
            return Ok(());
        }
        if let Some((code, reason)) = self.producer.client().fatal_error() {
            tracing::warn!("kafka sink: producer failed fatally ({code:?}: {reason}); creating a new one");
            self.producer = create(&self.cfg)?;
        }
        let started = Instant::now();
        let result = self.send_all(batch, total).await;
        metrics::histogram!("llamaflow_sink_latency_seconds", "sink" => SINK).record(started.elapsed().as_secs_f64());
        match &result {
            Ok(()) => metrics::counter!("llamaflow_sink_written_total", "sink" => SINK).increment(total as u64),
            Err(e) => {
                metrics::counter!("llamaflow_sink_failures_total", "sink" => SINK).increment(1);
                tracing::error!(epoch = batch.epoch, error = %e, "kafka sink: batch not written");
            }
        }
        result
    }

    async fn send_all(&self, batch: &OutputBatch, total: usize) -> Result<(), KafkaSinkError> {
        let mut in_flight: Vec<InFlight<'_>> = Vec::with_capacity(total);
        let mut payload = Vec::new();
        if self.cfg.publish_events {
            for e in &batch.events {
                let delivery = self
                    .enqueue(&self.cfg.events_topic, &e.subject, e, &mut payload, total)
                    .await?;
                in_flight.push(InFlight {
                    topic: &self.cfg.events_topic,
                    key: &e.subject,
                    delivery,
                });
            }
        }
        for a in &batch.alerts {
            let delivery = self
                .enqueue(&self.cfg.alerts_topic, &a.user_id, a, &mut payload, total)
                .await?;
            in_flight.push(InFlight {
                topic: &self.cfg.alerts_topic,
                key: &a.user_id,
                delivery,
            });
        }
        let mut failed = 0;
        let mut first: Option<(&str, &str, KafkaError)> = None;
        for m in in_flight {
            let error = match m.delivery.await {
                Ok(Ok(_)) => continue,
                Ok(Err((e, _))) => e,
                Err(_) => KafkaError::Canceled,
            };
            failed += 1;
            if first.is_none() {
                first = Some((m.topic, m.key, error));
            }
        }
        match first {
            None => Ok(()),
            Some((topic, key, source)) => Err(KafkaSinkError::Delivery {
                topic: topic.to_string(),
                key: key.to_string(),
                failed,
                total,
                source: Box::new(source),
            }),
        }
    }

    /// Serializes `value` and enqueues it, waiting while librdkafka's queue is full (messages
    /// leave it within `message_timeout_ms`, delivered or failed). An enqueue error fails the
    /// batch at once (messages already enqueued may still be delivered: at-least-once).
    async fn enqueue<T: Serialize>(
        &self,
        topic: &str,
        key: &str,
        value: &T,
        buf: &mut Vec<u8>,
        total: usize,
    ) -> Result<DeliveryFuture, KafkaSinkError> {
        buf.clear();
        serde_json::to_writer(&mut *buf, value).map_err(|source| KafkaSinkError::Encode {
            topic: topic.to_string(),
            key: key.to_string(),
            source,
        })?;
        let give_up = Instant::now() + Duration::from_millis(u64::from(self.cfg.message_timeout_ms)) + CONNECT_TIMEOUT;
        let mut record = FutureRecord::to(topic).key(key).payload(buf.as_slice());
        loop {
            match self.producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) if Instant::now() < give_up => {
                    record = back;
                    tokio::time::sleep(QUEUE_FULL_BACKOFF).await;
                }
                Err((source, _)) => {
                    return Err(KafkaSinkError::Delivery {
                        topic: topic.to_string(),
                        key: key.to_string(),
                        failed: 1,
                        total,
                        source: Box::new(source),
                    });
                }
            }
        }
    }
}

crate::sink::plain_sink!(KafkaSink, "kafka", merges);
