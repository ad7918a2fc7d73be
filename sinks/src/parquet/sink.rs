//! The Parquet sink of the continuous job: one part file per kind and rollover period,
//! spooled per batch so that an acknowledged batch survives a crash.

use schemas::EventData;

use super::writer::{PartitionedWriter, WriteStats, WriterOptions, recover};
use super::{ParquetError, ParquetSinkConfig, Table};
use crate::OutputBatch;

/// Writes each [`OutputBatch`] into the dataset under [`ParquetSinkConfig::dir`] (see the
/// module docs for the layout and the durability protocol). Open parts are closed when event
/// time passes their period and when the sink is closed or dropped.
#[derive(Debug)]
pub struct ParquetSink {
    cfg: ParquetSinkConfig,
    enabled: [bool; 4],
    writer: PartitionedWriter,
    /// A write failed: open parts were abandoned and their spools must be recovered first.
    broken: bool,
    written: metrics::Counter,
    failures: metrics::Counter,
}

impl ParquetSink {
    /// Validates the config, creates the directory and recovers the spools a crash left
    /// (they become part files), then opens the writer.
    pub fn open(cfg: ParquetSinkConfig) -> Result<Self, ParquetError> {
        cfg.validate()?;
        let writer = PartitionedWriter::new(WriterOptions {
            root: cfg.dir.clone(),
            bucket_ms: cfg.rollover.as_millis(),
            row_group_rows: cfg.row_group_rows,
            spool: true,
        })?;
        let recovered = recover(&cfg.dir, cfg.row_group_rows)?;
        if recovered.files > 0 {
            tracing::warn!(
                "parquet sink: recovered {} rows into {} part files under {} (left by an unclean stop)",
                recovered.total_rows(),
                recovered.files,
                cfg.dir.display()
            );
        }
        let mut enabled = [false; 4];
        for t in &cfg.kinds {
            enabled[t.index()] = true;
        }
        Ok(ParquetSink {
            cfg,
            enabled,
            writer,
            broken: false,
            written: metrics::counter!("llamaflow_sink_written_total", "sink" => "parquet"),
            failures: metrics::counter!("llamaflow_sink_failures_total", "sink" => "parquet"),
        })
    }

    /// Rows written so far (and files / bytes of the parts closed so far).
    pub fn stats(&self) -> &WriteStats {
        self.writer.stats()
    }

    /// Writes a batch; returns once its rows are fsynced (see the module docs). The job runs
    /// it off the async runtime through [`crate::OffRuntime`].
    pub fn write_blocking(&mut self, batch: &OutputBatch) -> Result<(), ParquetError> {
        let before = self.writer.stats().total_rows();
        let result = self.try_write(batch);
        match &result {
            Ok(()) => self.written.increment(self.writer.stats().total_rows() - before),
            Err(_) => {
                self.failures.increment(1);
                // Spools hold every acknowledged row; unfinished parts are rebuilt from them.
                self.writer.abandon();
                self.broken = true;
            }
        }
        result
    }

    fn try_write(&mut self, batch: &OutputBatch) -> Result<(), ParquetError> {
        if self.broken {
            recover(&self.cfg.dir, self.cfg.row_group_rows)?;
            self.broken = false;
        }
        let on = |t: Table| self.enabled[t.index()];
        let (prices, tvl, events, alerts) = (on(Table::Prices), on(Table::Tvl), on(Table::Events), on(Table::Alerts));
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
                    self.writer
                        .price_row(coin, *price, *timestamp, symbol.as_deref(), *confidence, *decimals)?;
                }
                EventData::TvlUpdate {
                    protocol_id,
                    chain_tvls,
                    extra,
                    timestamp,
                    ..
                } if tvl => {
                    for (chain, v) in chain_tvls {
                        self.writer.tvl_row(protocol_id, chain, *v, *timestamp, false)?;
                    }
                    for (chain, v) in extra {
                        self.writer.tvl_row(protocol_id, chain, *v, *timestamp, true)?;
                    }
                }
                _ => {}
            }
            if events {
                self.writer.event(e)?;
            }
        }
        if alerts {
            for a in &batch.alerts {
                self.writer.alert(a)?;
            }
        }
        self.writer.sync()
    }

    /// Closes every open part (footer, fsync, rename) and returns what the sink wrote.
    pub fn close(mut self) -> Result<WriteStats, ParquetError> {
        self.writer.close_all()?;
        Ok(self.writer.stats().clone())
    }
}

impl Drop for ParquetSink {
    /// The pipeline drops its sinks at shutdown: open parts are closed here. Parts that fail
    /// to close keep their spools and are recovered on the next start.
    fn drop(&mut self) {
        if self.writer.open_parts() > 0
            && let Err(e) = self.writer.close_all()
        {
            tracing::error!("parquet sink: closing open parts: {e}; their spools are recovered on the next start");
        }
    }
}

impl crate::BlockingSink for ParquetSink {
    fn name(&self) -> &'static str {
        "parquet"
    }

    fn write_blocking(&mut self, batch: &OutputBatch) -> Result<crate::Written, crate::SinkError> {
        Ok(ParquetSink::write_blocking(self, batch).map(crate::Written::from)?)
    }
}
