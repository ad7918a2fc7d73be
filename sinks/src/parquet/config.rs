//! Configuration of the Parquet sink (`[sinks.parquet]` in `llamaflow.toml`).

use std::path::PathBuf;

use serde::Deserialize;

use super::Table;
use super::writer::DAY_MS;

/// How much event time one part file covers: `"1h"` (default), `"15m"`, `"1d"`, … or a
/// number of seconds. Must divide a day, so a part never spans two `date=` directories.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "toml_value::Value")]
pub struct Rollover {
    ms: i64,
}

mod toml_value {
    use serde::Deserialize;

    /// A rollover as written: a string (`"1h"`) or a number of seconds.
    #[derive(Deserialize)]
    #[serde(untagged)]
    pub enum Value {
        /// `"1h"`, `"30m"`, `"3600"`.
        Text(String),
        /// Seconds.
        Secs(i64),
    }
}

impl TryFrom<toml_value::Value> for Rollover {
    type Error = String;
    fn try_from(v: toml_value::Value) -> Result<Self, String> {
        match v {
            toml_value::Value::Text(s) => Rollover::parse(&s),
            toml_value::Value::Secs(n) => Rollover::from_secs(n),
        }
    }
}

impl Default for Rollover {
    fn default() -> Self {
        Rollover { ms: 3_600_000 }
    }
}

impl Rollover {
    /// Parses `"<n>m"`, `"<n>h"`, `"<n>d"`, `"<n>s"` or a plain number of seconds.
    pub fn parse(s: &str) -> Result<Rollover, String> {
        let s = s.trim();
        let (digits, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
            Some((i, _)) => s.split_at(i),
            None => (s, "s"),
        };
        let n: i64 = digits
            .parse()
            .map_err(|_| format!("rollover `{s}`: expected e.g. \"1h\", \"15m\", \"1d\" or seconds"))?;
        let secs = match unit {
            "s" => Some(n),
            "m" => n.checked_mul(60),
            "h" => n.checked_mul(3600),
            "d" => n.checked_mul(86_400),
            _ => None,
        }
        .ok_or_else(|| format!("rollover `{s}`: expected e.g. \"1h\", \"15m\", \"1d\" or seconds"))?;
        Rollover::from_secs(secs)
    }

    /// A rollover of `secs` seconds; it must divide a day.
    pub fn from_secs(secs: i64) -> Result<Rollover, String> {
        let ms = secs.checked_mul(1000).unwrap_or(0);
        if ms <= 0 || DAY_MS % ms != 0 {
            return Err(format!(
                "rollover of {secs} s: must be positive and divide a day (e.g. 15m, 1h, 6h, 1d)"
            ));
        }
        Ok(Rollover { ms })
    }

    /// The period in milliseconds.
    pub fn as_millis(self) -> i64 {
        self.ms
    }
}

/// Settings of the Parquet sink.
///
/// ```toml
/// [sinks.parquet]
/// dir = "/var/lib/llamaflow/parquet"
/// rollover = "1h"                            # one part file per kind and hour (event time)
/// kinds = ["prices", "tvl", "events", "alerts"]
/// row_group_rows = 1048576
/// ```
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParquetSinkConfig {
    /// Dataset root: `<dir>/<kind>/date=YYYY-MM-DD/part-*.parquet`.
    pub dir: PathBuf,
    /// Event time covered by one part file (default `"1h"`).
    #[serde(default)]
    pub rollover: Rollover,
    /// Which kinds to write (default all four): prices and tvl are derived from the
    /// `price_update` / `tvl_update` events (accepted ticks, per-chain TVL at each update).
    #[serde(default = "all_tables")]
    pub kinds: Vec<Table>,
    /// Most rows per row group (default 1,048,576; a row group is also cut at 128 MiB).
    #[serde(default = "default_row_group_rows")]
    pub row_group_rows: usize,
}

fn all_tables() -> Vec<Table> {
    Table::ALL.to_vec()
}

fn default_row_group_rows() -> usize {
    super::writer::DEFAULT_ROW_GROUP_ROWS
}

impl ParquetSinkConfig {
    /// A config writing every kind under `dir` with the defaults.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ParquetSinkConfig {
            dir: dir.into(),
            rollover: Rollover::default(),
            kinds: all_tables(),
            row_group_rows: default_row_group_rows(),
        }
    }

    /// Checks the settings (names the field).
    pub(crate) fn validate(&self) -> Result<(), super::ParquetError> {
        let bad = |m: &str| Err(super::ParquetError::Config(m.to_string()));
        if self.dir.as_os_str().is_empty() {
            return bad("`dir` is empty");
        }
        if self.kinds.is_empty() {
            return bad("`kinds` is empty");
        }
        if self.row_group_rows == 0 {
            return bad("`row_group_rows` must be > 0");
        }
        Ok(())
    }
}
