//! The four tables of a dataset, their Arrow schemas and column builders.

use std::sync::{Arc, OnceLock};

use arrow_array::builder::{
    BooleanBuilder, Float64Builder, Int32Builder, ListBuilder, MapBuilder, MapFieldNames, StringBuilder,
    TimestampMillisecondBuilder,
};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{ArrowError, Field, Schema, SchemaRef};
use schemas::{Alert, Event, EventData, Millis, PriceTick, TvlUpdate};
use serde::Deserialize;

/// A table (dataset kind) of an export: the `<kind>` directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub enum Table {
    /// Price ticks.
    Prices,
    /// TVL per protocol and chain.
    Tvl,
    /// Market events (SPEC §3).
    Events,
    /// Alerts (SPEC §2).
    Alerts,
}

impl TryFrom<String> for Table {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Table::parse(&s).ok_or_else(|| format!("unknown kind `{s}` (expected prices, tvl, events or alerts)"))
    }
}

impl Table {
    /// Every table, in directory order.
    pub const ALL: [Table; 4] = [Table::Prices, Table::Tvl, Table::Events, Table::Alerts];

    /// The directory name.
    pub fn name(self) -> &'static str {
        match self {
            Table::Prices => "prices",
            Table::Tvl => "tvl",
            Table::Events => "events",
            Table::Alerts => "alerts",
        }
    }

    /// Parses a directory name (`price` and `event`/`alert` singulars accepted).
    pub fn parse(s: &str) -> Option<Table> {
        Some(match s.trim() {
            "prices" | "price" => Table::Prices,
            "tvl" => Table::Tvl,
            "events" | "event" => Table::Events,
            "alerts" | "alert" => Table::Alerts,
            _ => return None,
        })
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// The table's Arrow schema (timestamps are `Timestamp(ms, "UTC")`).
    pub fn schema(self) -> SchemaRef {
        static SCHEMAS: OnceLock<Vec<SchemaRef>> = OnceLock::new();
        SCHEMAS
            .get_or_init(|| {
                Table::ALL
                    .iter()
                    .map(|t| {
                        let mut c = Columns::new(*t);
                        let arrays = c.arrays();
                        let fields: Vec<Field> = t
                            .fields()
                            .iter()
                            .zip(&arrays)
                            .map(|((name, nullable), a)| Field::new(*name, a.data_type().clone(), *nullable))
                            .collect();
                        Arc::new(Schema::new(fields))
                    })
                    .collect()
            })
            .get(self.index())
            .cloned()
            .unwrap_or_else(|| Arc::new(Schema::empty()))
    }

    /// Column names and nullability, in column order.
    fn fields(self) -> &'static [(&'static str, bool)] {
        match self {
            Table::Prices => &[
                ("coin", false),
                ("price", false),
                ("timestamp", false),
                ("symbol", true),
                ("confidence", true),
                ("decimals", true),
            ],
            Table::Tvl => &[
                ("protocol_id", false),
                ("chain", false),
                ("tvl", false),
                ("timestamp", false),
                ("extra", false),
            ],
            Table::Events => &[
                ("type", false),
                ("subject", false),
                ("timestamp", false),
                ("value", true),
                ("chain_tvls", true),
                ("data", false),
            ],
            Table::Alerts => &[
                ("alert_id", false),
                ("rule_id", false),
                ("user_id", false),
                ("alert_type", false),
                ("subject", false),
                ("triggered_at", false),
                ("value", false),
                ("threshold", false),
                ("message", false),
                ("channels", false),
                ("webhook_url", true),
            ],
        }
    }
}

fn ts_builder() -> TimestampMillisecondBuilder {
    TimestampMillisecondBuilder::new().with_timezone("UTC")
}

fn map_builder() -> MapBuilder<StringBuilder, Float64Builder> {
    let names = MapFieldNames {
        entry: "key_value".into(),
        key: "key".into(),
        value: "value".into(),
    };
    MapBuilder::new(Some(names), StringBuilder::new(), Float64Builder::new())
}

/// Builders of one table's columns; rows are appended, then taken as a [`RecordBatch`].
#[allow(clippy::large_enum_variant, reason = "one per open part file")]
pub(crate) enum Columns {
    Prices {
        coin: StringBuilder,
        price: Float64Builder,
        ts: TimestampMillisecondBuilder,
        symbol: StringBuilder,
        confidence: Float64Builder,
        decimals: Int32Builder,
    },
    Tvl {
        protocol: StringBuilder,
        chain: StringBuilder,
        tvl: Float64Builder,
        ts: TimestampMillisecondBuilder,
        extra: BooleanBuilder,
    },
    Events {
        kind: StringBuilder,
        subject: StringBuilder,
        ts: TimestampMillisecondBuilder,
        value: Float64Builder,
        chain_tvls: MapBuilder<StringBuilder, Float64Builder>,
        data: StringBuilder,
    },
    Alerts {
        alert_id: StringBuilder,
        rule_id: StringBuilder,
        user_id: StringBuilder,
        alert_type: StringBuilder,
        subject: StringBuilder,
        ts: TimestampMillisecondBuilder,
        value: Float64Builder,
        threshold: Float64Builder,
        message: StringBuilder,
        channels: ListBuilder<StringBuilder>,
        webhook_url: StringBuilder,
    },
}

impl Columns {
    pub(crate) fn new(table: Table) -> Columns {
        match table {
            Table::Prices => Columns::Prices {
                coin: StringBuilder::new(),
                price: Float64Builder::new(),
                ts: ts_builder(),
                symbol: StringBuilder::new(),
                confidence: Float64Builder::new(),
                decimals: Int32Builder::new(),
            },
            Table::Tvl => Columns::Tvl {
                protocol: StringBuilder::new(),
                chain: StringBuilder::new(),
                tvl: Float64Builder::new(),
                ts: ts_builder(),
                extra: BooleanBuilder::new(),
            },
            Table::Events => Columns::Events {
                kind: StringBuilder::new(),
                subject: StringBuilder::new(),
                ts: ts_builder(),
                value: Float64Builder::new(),
                chain_tvls: map_builder(),
                data: StringBuilder::new(),
            },
            Table::Alerts => Columns::Alerts {
                alert_id: StringBuilder::new(),
                rule_id: StringBuilder::new(),
                user_id: StringBuilder::new(),
                alert_type: StringBuilder::new(),
                subject: StringBuilder::new(),
                ts: ts_builder(),
                value: Float64Builder::new(),
                threshold: Float64Builder::new(),
                message: StringBuilder::new(),
                channels: ListBuilder::new(StringBuilder::new()),
                webhook_url: StringBuilder::new(),
            },
        }
    }

    /// Rows appended since the last [`Columns::take`].
    pub(crate) fn len(&self) -> usize {
        use arrow_array::builder::ArrayBuilder;
        match self {
            Columns::Prices { coin, .. } => coin.len(),
            Columns::Tvl { protocol, .. } => protocol.len(),
            Columns::Events { kind, .. } => kind.len(),
            Columns::Alerts { alert_id, .. } => alert_id.len(),
        }
    }

    /// Finishes every builder (they start over empty).
    fn arrays(&mut self) -> Vec<ArrayRef> {
        fn a(b: &mut impl arrow_array::builder::ArrayBuilder) -> ArrayRef {
            b.finish()
        }
        match self {
            Columns::Prices {
                coin,
                price,
                ts,
                symbol,
                confidence,
                decimals,
            } => vec![a(coin), a(price), a(ts), a(symbol), a(confidence), a(decimals)],
            Columns::Tvl {
                protocol,
                chain,
                tvl,
                ts,
                extra,
            } => vec![a(protocol), a(chain), a(tvl), a(ts), a(extra)],
            Columns::Events {
                kind,
                subject,
                ts,
                value,
                chain_tvls,
                data,
            } => vec![a(kind), a(subject), a(ts), a(value), a(chain_tvls), a(data)],
            Columns::Alerts {
                alert_id,
                rule_id,
                user_id,
                alert_type,
                subject,
                ts,
                value,
                threshold,
                message,
                channels,
                webhook_url,
            } => vec![
                a(alert_id),
                a(rule_id),
                a(user_id),
                a(alert_type),
                a(subject),
                a(ts),
                a(value),
                a(threshold),
                a(message),
                a(channels),
                a(webhook_url),
            ],
        }
    }

    /// The rows appended so far as a batch of `table`'s schema; the builders start over.
    pub(crate) fn take(&mut self, table: Table) -> Result<RecordBatch, ArrowError> {
        let arrays = self.arrays();
        RecordBatch::try_new(table.schema(), arrays)
    }

    /// Appends a price row (a tick, or a `price_update` event's fields).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn push_price(
        &mut self,
        c: &str,
        p: f64,
        t: Millis,
        sym: Option<&str>,
        conf: Option<f64>,
        dec: Option<u32>,
    ) {
        if let Columns::Prices {
            coin,
            price,
            ts,
            symbol,
            confidence,
            decimals,
        } = self
        {
            coin.append_value(c);
            price.append_value(p);
            ts.append_value(t);
            symbol.append_option(sym);
            confidence.append_option(conf);
            decimals.append_option(dec.and_then(|d| i32::try_from(d).ok()));
        }
    }

    /// Appends a price tick.
    pub(crate) fn push_tick(&mut self, p: &PriceTick) {
        self.push_price(
            &p.coin,
            p.price,
            p.timestamp,
            p.symbol.as_deref(),
            p.confidence,
            p.decimals,
        );
    }

    /// Appends one TVL row.
    pub(crate) fn push_tvl(&mut self, protocol_id: &str, chain_name: &str, value: f64, t: Millis, is_extra: bool) {
        if let Columns::Tvl {
            protocol,
            chain,
            tvl,
            ts,
            extra,
        } = self
        {
            protocol.append_value(protocol_id);
            chain.append_value(chain_name);
            tvl.append_value(value);
            ts.append_value(t);
            extra.append_value(is_extra);
        }
    }

    /// Appends an event.
    pub(crate) fn push_event(&mut self, e: &Event) -> Result<(), ArrowError> {
        let Columns::Events {
            kind,
            subject,
            ts,
            value,
            chain_tvls,
            data,
        } = self
        else {
            return Ok(());
        };
        let json = serde_json::to_string(&e.data).map_err(|err| ArrowError::ExternalError(Box::new(err)))?;
        kind.append_value(e.data.type_name());
        subject.append_value(&e.subject);
        ts.append_value(e.timestamp);
        value.append_option(headline(&e.data));
        match &e.data {
            EventData::TvlUpdate { chain_tvls: m, .. } => {
                for (k, v) in m {
                    chain_tvls.keys().append_value(k);
                    chain_tvls.values().append_value(*v);
                }
                chain_tvls.append(true)?;
            }
            _ => chain_tvls.append(false)?,
        }
        data.append_value(json);
        Ok(())
    }

    /// Appends an alert.
    pub(crate) fn push_alert(&mut self, al: &Alert) {
        if let Columns::Alerts {
            alert_id,
            rule_id,
            user_id,
            alert_type,
            subject,
            ts,
            value,
            threshold,
            message,
            channels,
            webhook_url,
        } = self
        {
            alert_id.append_value(&al.alert_id);
            rule_id.append_value(&al.rule_id);
            user_id.append_value(&al.user_id);
            alert_type.append_value(&al.alert_type);
            subject.append_value(&al.subject);
            ts.append_value(al.triggered_at);
            value.append_value(al.value);
            threshold.append_value(al.threshold);
            message.append_value(&al.message);
            for c in &al.channels {
                channels.values().append_value(c);
            }
            channels.append(true);
            webhook_url.append_option(al.webhook_url.as_deref());
        }
    }
}

/// An event's headline number (the `value` column).
fn headline(d: &EventData) -> Option<f64> {
    Some(match d {
        EventData::PriceUpdate { price, .. } | EventData::Depeg { price, .. } => *price,
        EventData::TvlUpdate { tvl, .. }
        | EventData::ChainTvlUpdate { tvl, .. }
        | EventData::CategoryTvlUpdate { tvl, .. } => *tvl,
        EventData::WhaleTransfer { value_usd, .. } => *value_usd,
        EventData::Liquidation { amount_usd, .. } => *amount_usd,
        EventData::GasUpdate { gwei, .. } => *gwei,
    })
}

/// The TVL rows of an update: its chains, then its sub-buckets (`extra = true`).
pub(crate) fn tvl_rows(t: &TvlUpdate) -> impl Iterator<Item = (&str, f64, bool)> {
    t.chains
        .iter()
        .map(|(c, v)| (c.as_str(), *v, false))
        .chain(t.extra.iter().map(|(c, v)| (c.as_str(), *v, true)))
}
