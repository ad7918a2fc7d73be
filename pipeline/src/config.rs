//! `llamaflow.toml`: every source, sink, limit and secret reference of the continuous job.
//!
//! `${VAR}` is replaced by the environment variable `VAR` (secret references:
//! `password = "${REDIS_PASSWORD}"`) so that the value is exactly the variable's and can
//! never change the file's structure: inside `"…"` it is escaped (quotes, backslashes, newlines
//! stay literal), inside `'…'` a value that cannot be written there is refused, and outside
//! strings only plain numbers and words are allowed. An unset variable is an error naming the
//! line; no error message shows a substituted value. Parse errors name the file, line, column
//! and field. See `llamaflow.example.toml` for a commented example.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use operators::OpConfig;
use schemas::Kind;
use serde::Deserialize;
use sinks::websocket::WsConfig;

use crate::UsageError;

/// The whole configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Engine settings.
    #[serde(default)]
    pub pipeline: PipelineSection,
    /// Operator settings.
    #[serde(default)]
    pub operators: OperatorsSection,
    /// Inputs.
    #[serde(default)]
    pub sources: SourcesSection,
    /// Outputs.
    #[serde(default)]
    pub sinks: SinksSection,
}

/// `[pipeline]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineSection {
    /// Dataflow worker threads.
    pub workers: u32,
    /// Longest time records wait to form an ingest batch (epoch), in ms.
    pub batch_ms: u64,
    /// Most records in one ingest batch.
    pub batch_max: usize,
    /// How long after its last record a live protocol's TVL update (its records at one
    /// timestamp) is closed and its total evaluated, in ms; a record of it arriving later is
    /// late. History and replay close updates at a newer record or the end of input.
    pub tvl_settle_ms: u64,
    /// Address of the dashboard, `/ws`, `/metrics`, `/healthz`; omit to serve nothing.
    pub listen: Option<SocketAddr>,
    /// Most HTTP connections (WebSockets included) open at once; 0 (default): the process's
    /// open-file limit less 256 kept for files, Kafka and databases.
    pub max_connections: usize,
    /// Time a client has to send a request's headers (and an idle keep-alive connection is
    /// kept), in ms.
    pub http_header_timeout_ms: u64,
    /// Dead letters as JSONL; default standard error.
    pub dead_letter_out: Option<PathBuf>,
    /// Where checkpoints (operator state + source positions) are kept; a relative path is
    /// relative to the config file (the working directory without one). Default
    /// `llamaflow-checkpoints`; `""` saves no state
    /// (positions are still committed at each checkpoint, a restart then starts empty). In a
    /// cluster, each process's own directory (a local disk) or one directory for all.
    pub checkpoint_dir: Option<PathBuf>,
    /// A location every process and host sees, where each process copies its checkpoint
    /// files after writing them to `checkpoint_dir`: `s3://bucket/prefix` (see
    /// `checkpoint_s3`) or a directory (relative to the config file). A process restarted on
    /// another host, and a cluster restored at another shape, read from here what its own
    /// directory lacks. Default: none (each process keeps only its own directory).
    pub checkpoint_shared: Option<String>,
    /// S3 access for an `s3://` `checkpoint_shared` (endpoint override, region); credentials
    /// from the AWS provider chain.
    pub checkpoint_s3: sources::dynamodb_export::s3::S3Config,
    /// How often a checkpoint is taken while records flow, in ms (and once on shutdown).
    pub checkpoint_interval_ms: u64,
    /// Scale-out: the number of `llamaflow` processes forming one timely cluster (default 1).
    /// Every process runs `workers` worker threads and reads its share of the Kafka
    /// partitions; see docs/ARCHITECTURE.md, "Scale-out".
    pub processes: u32,
    /// Scale-out: this process's index, `0..processes` (process 0 also reads history, the CDC
    /// source and tailed files, and writes the alerts).
    pub process_id: u32,
    /// Scale-out: `host:port` of every process in process order, where the processes connect
    /// to each other (each process listens on its own entry).
    pub hosts: Vec<String>,
    /// Scale-out: how long the cluster may go without completing an epoch that this process
    /// has sent before the process gives up (a peer frozen or cut off by the network), in ms;
    /// 0: never. A peer that dies is noticed at once, without this.
    pub peer_timeout_ms: u64,
}

impl Default for PipelineSection {
    fn default() -> Self {
        PipelineSection {
            workers: 2,
            batch_ms: 10,
            batch_max: 8192,
            tvl_settle_ms: 1000,
            max_connections: 0,
            http_header_timeout_ms: 10_000,
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 8080))),
            dead_letter_out: None,
            checkpoint_dir: Some(PathBuf::from("llamaflow-checkpoints")),
            checkpoint_shared: None,
            checkpoint_s3: Default::default(),
            checkpoint_interval_ms: 5_000,
            processes: 1,
            process_id: 0,
            hosts: Vec::new(),
            peer_timeout_ms: 60_000,
        }
    }
}

impl PipelineSection {
    /// The HTTP server's bounds: `max_connections` (0: `open_files` less 256 for files, Kafka
    /// and databases, at least 64) and the header timeout.
    pub fn http_limits(&self, open_files: u64) -> sinks::websocket::HttpLimits {
        let auto = usize::try_from(open_files.saturating_sub(256))
            .unwrap_or(usize::MAX)
            .max(64);
        sinks::websocket::HttpLimits {
            max_connections: if self.max_connections == 0 {
                auto
            } else {
                self.max_connections
            },
            header_timeout: Duration::from_millis(self.http_header_timeout_ms.max(1)),
            ..Default::default()
        }
    }
}

/// `[operators]`: market-event settings (rules come from sources).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OperatorsSection {
    /// Band of `depeg` market events, percent from 1.0.
    pub depeg_band_pct: f64,
    /// Minimum USD value of `whale_transfer` events.
    pub whale_event_usd: f64,
    /// Stablecoin ids watched for `depeg` events (default: the major USD stablecoins).
    pub stablecoins: Option<Vec<String>>,
    /// Stablecoin symbols watched for `depeg` events.
    pub stable_symbols: Option<Vec<String>>,
    /// Days of hourly protocol points and daily chain points the read API keeps (SPEC §8).
    pub history_days: u32,
    /// Longest `price_change` / `tvl_change` window accepted, in days; a rule with a longer
    /// one is dead-lettered.
    pub max_rule_window_days: u32,
}

impl Default for OperatorsSection {
    fn default() -> Self {
        let d = OpConfig::default();
        OperatorsSection {
            depeg_band_pct: d.depeg_band_pct,
            whale_event_usd: d.whale_event_usd,
            stablecoins: None,
            stable_symbols: None,
            history_days: view::ViewConfig::default().history_days,
            max_rule_window_days: (d.max_rule_window / 86_400_000) as u32,
        }
    }
}

impl OperatorsSection {
    /// The operator configuration these settings give.
    pub fn op_config(&self) -> OpConfig {
        let mut c = OpConfig {
            depeg_band_pct: self.depeg_band_pct,
            whale_event_usd: self.whale_event_usd,
            max_rule_window: i64::from(self.max_rule_window_days.clamp(1, 3650)) * 86_400_000,
            ..OpConfig::default()
        };
        if let Some(s) = &self.stablecoins {
            c.stablecoins = s.iter().cloned().collect();
        }
        if let Some(s) = &self.stable_symbols {
            c.stable_symbols = s.iter().cloned().collect();
        }
        c
    }

    /// The read view's settings.
    pub fn view_config(&self) -> view::ViewConfig {
        view::ViewConfig {
            history_days: self.history_days.clamp(1, 3650),
        }
    }
}

/// One `[[sources.files]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Record kind: prices, tvl, transfers, gas, liquidations, protocols or rules.
    pub kind: String,
    /// JSONL or JSONL.gz file.
    pub path: PathBuf,
    /// Tail the file as a live feed (like `tail -F`) instead of reading it once as history.
    #[serde(default)]
    pub follow: bool,
    /// With `follow`: byte offset to start from (default 0).
    #[serde(default)]
    pub start_offset: u64,
}

/// `[sources.demo]`: the bundled feed, live-paced.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DemoSection {
    /// Feed seconds per wall-clock second.
    pub speed: f64,
    /// Feed minutes replayed at once on start.
    pub warmup_minutes: u32,
    /// Feed seed.
    pub seed: u64,
    /// Load the demo rules and protocols (user `demo`).
    pub rules: bool,
}

impl Default for DemoSection {
    fn default() -> Self {
        DemoSection {
            speed: 1.0,
            warmup_minutes: 75,
            seed: 42,
            rules: true,
        }
    }
}

/// `[sources]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourcesSection {
    /// Longest input line of a JSONL/.gz file (read or tailed) or a DynamoDB export's data
    /// file, in bytes: a longer line is a dead letter (counted in
    /// `llamaflow_lines_too_long_total`) and is never held in memory. Default 1 MiB.
    #[serde(default = "default_max_line_bytes")]
    pub max_line_bytes: usize,
    /// History read first, in timestamp order, before live sources start.
    #[serde(default)]
    pub files: Vec<FileEntry>,
    /// DynamoDB exports read first, like `files`: a local prefix dir or one export's dir, or
    /// `s3://bucket/prefix` (see `[sources.s3]`).
    #[serde(default)]
    pub dynamodb_export: Vec<PathBuf>,
    /// S3 access for `s3://` exports (endpoint override, region); credentials from the AWS
    /// provider chain.
    #[serde(default)]
    pub s3: sources::dynamodb_export::s3::S3Config,
    /// The bundled demo feed.
    pub demo: Option<DemoSection>,
    /// Kafka topics per record kind.
    pub kafka: Option<sources::kafka::KafkaSourceConfig>,
    /// Postgres CDC of alert_rules, protocols and api_keys.
    pub postgres_cdc: Option<sources::postgres_cdc::CdcConfig>,
}

fn default_max_line_bytes() -> usize {
    sources::DEFAULT_MAX_LINE_BYTES
}

/// The largest `max_line_bytes` accepted (1 GiB).
pub const MAX_LINE_BYTES_LIMIT: usize = 1 << 30;

impl Default for SourcesSection {
    fn default() -> Self {
        SourcesSection {
            max_line_bytes: default_max_line_bytes(),
            files: Vec::new(),
            dynamodb_export: Vec::new(),
            s3: Default::default(),
            demo: None,
            kafka: None,
            postgres_cdc: None,
        }
    }
}

/// `[sinks.websocket]` (served on `pipeline.listen`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WsSection {
    /// API key → user id.
    pub api_keys: HashMap<String, String>,
    /// Anonymous connections may subscribe to market channels.
    pub allow_anonymous: bool,
    /// Most subscriptions per connection.
    pub max_subscriptions: usize,
    /// Largest client frame in bytes.
    pub max_frame_bytes: usize,
    /// Client messages per second per key.
    pub max_msgs_per_sec: u32,
    /// Frames a subscriber may fall behind its channel before it is closed with 1013.
    pub send_queue: usize,
    /// Server ping interval in seconds.
    pub ping_interval_secs: u64,
    /// Most anonymous connections from one IP address (0: no limit).
    pub max_anonymous_per_ip: usize,
}

impl Default for WsSection {
    fn default() -> Self {
        let d = WsConfig::default();
        WsSection {
            api_keys: d.api_keys,
            allow_anonymous: d.allow_anonymous,
            max_subscriptions: d.max_subscriptions,
            max_frame_bytes: d.max_frame_bytes,
            max_msgs_per_sec: d.max_msgs_per_sec,
            send_queue: d.send_queue,
            ping_interval_secs: d.ping_interval.as_secs(),
            max_anonymous_per_ip: d.max_anonymous_per_ip,
        }
    }
}

impl WsSection {
    /// The fanout configuration.
    pub fn ws_config(&self) -> WsConfig {
        WsConfig {
            api_keys: self.api_keys.clone(),
            allow_anonymous: self.allow_anonymous,
            max_subscriptions: self.max_subscriptions,
            max_frame_bytes: self.max_frame_bytes,
            max_msgs_per_sec: self.max_msgs_per_sec,
            send_queue: self.send_queue,
            ping_interval: Duration::from_secs(self.ping_interval_secs.max(1)),
            max_anonymous_per_ip: self.max_anonymous_per_ip,
        }
    }
}

/// `[sinks]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SinksSection {
    /// Alerts as JSONL on standard output.
    pub stdout: bool,
    /// JSONL files.
    pub jsonl: Option<sinks::jsonl::JsonlConfig>,
    /// WebSocket fanout.
    pub websocket: Option<WsSection>,
    /// Redis latest values and pub/sub; fields left out come from `REDIS_*`.
    pub redis: Option<sinks::redis::RedisSinkConfig>,
    /// Postgres upserts; `url` left out comes from `PREMIUM_DB` / `ALERTS_DB` / `DATABASE_URL`.
    pub postgres: Option<sinks::postgres::PgSinkConfig>,
    /// Kafka topics `defi-events` and `defi-alerts`.
    pub kafka: Option<sinks::kafka::KafkaSinkConfig>,
    /// SQS queue of alerts (FIFO queues: group = user, dedup id = alert_id).
    pub sqs: Option<sinks::sqs::SqsSinkConfig>,
    /// Webhook delivery for rules with the `webhook` channel.
    pub webhook: Option<sinks::webhook::WebhookConfig>,
    /// Parquet dataset (`dir`, `rollover`), one part file per kind and period.
    pub parquet: Option<sinks::parquet::ParquetSinkConfig>,
    /// Alert channels for people: e-mail, Telegram, Discord, mobile push.
    pub notify: Option<sinks::notify::NotifyConfig>,
}

impl Default for SinksSection {
    fn default() -> Self {
        SinksSection {
            stdout: true,
            jsonl: None,
            websocket: None,
            redis: None,
            postgres: None,
            kafka: None,
            sqs: None,
            webhook: None,
            parquet: None,
            notify: None,
        }
    }
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(before.len(), |i| before.len() - i - 1) + 1;
    (line, col)
}

/// Where a `${VAR}` reference stands in a line of TOML.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Context {
    /// Inside a `"…"` string: the value is escaped, so it is always exactly that string.
    Basic,
    /// Inside a `'…'` string (no escapes in TOML): values with `'` or control characters are
    /// refused.
    Literal,
    /// Outside strings (`workers = ${WORKERS}`): only plain words and numbers are allowed.
    Bare,
}

/// The quote (`"` or `'`) open at each character of `line`, as TOML reads it on one line:
/// calls `f(byte index, char, open quote before it)` until `f` returns `false`.
fn scan_quotes(line: &str, mut f: impl FnMut(usize, char, Option<char>) -> bool) {
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        if !f(i, c, quote) {
            return;
        }
        match quote {
            Some(q) => {
                if q == '"' && c == '\\' && !escaped {
                    escaped = true;
                    continue;
                }
                if c == q && !escaped {
                    quote = None;
                }
                escaped = false;
            }
            None if c == '"' || c == '\'' => quote = Some(c),
            None => {}
        }
    }
}

/// The quoting context at byte `at` of `line`.
fn context_at(line: &str, at: usize) -> Context {
    let mut open = None;
    scan_quotes(line, |i, _, quote| {
        open = quote;
        i < at
    });
    match open {
        Some('"') => Context::Basic,
        Some(_) => Context::Literal,
        None => Context::Bare,
    }
}

/// `value` written inside a TOML basic string: `\`, `"` and control characters escaped.
fn escape_basic(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// Replaces `${VAR}` with the environment's value (not inside `#` comments), so that the value
/// is exactly what the file means there and can never change the file's structure: escaped in
/// `"…"` strings, refused in `'…'` strings when it cannot be written there, and only plain
/// words or numbers outside strings. Errors name the line and the variable, never its value.
/// Returns the text and the substitutions made (to keep values out of later messages).
fn expand_env(text: &str, file: &Path) -> Result<(String, Vec<(String, String)>), UsageError> {
    let mut out = String::with_capacity(text.len());
    let mut used = Vec::new();
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let code_end = comment_start(line).unwrap_or(line.len());
        let (code, comment) = line.split_at(code_end);
        let mut rest = code;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let at = code.len() - rest.len() + start;
            let col = at + 1;
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                return Err(UsageError(format!(
                    "{}:{}:{col}: unterminated `${{`",
                    file.display(),
                    n + 1
                )));
            };
            let name = &after[..end];
            let here = |what: String| UsageError(format!("{}:{}:{col}: {what}", file.display(), n + 1));
            let value = std::env::var(name).map_err(|_| {
                here(format!(
                    "environment variable `{name}` is not set (referenced as ${{{name}}})"
                ))
            })?;
            match context_at(code, at) {
                Context::Basic => out.push_str(&escape_basic(&value)),
                Context::Literal if value.contains('\'') || value.chars().any(char::is_control) => {
                    return Err(here(format!(
                        "environment variable `{name}` holds a quote or a control character, which a '…' string \
                         cannot hold: write \"${{{name}}}\" instead"
                    )));
                }
                Context::Literal => out.push_str(&value),
                Context::Bare
                    if !value.is_empty() && value.chars().all(|c| c.is_ascii_alphanumeric() || "_.+-".contains(c)) =>
                {
                    out.push_str(&value)
                }
                Context::Bare => {
                    return Err(here(format!(
                        "environment variable `{name}` is used outside a quoted string but is not a plain number \
                         or word: write \"${{{name}}}\""
                    )));
                }
            }
            used.push((name.to_string(), value));
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        out.push_str(comment);
    }
    Ok((out, used))
}

/// `msg` with every substituted value replaced by its `${VAR}` reference: secrets never end
/// up in error messages.
fn redact(msg: &str, used: &[(String, String)]) -> String {
    let mut msg = msg.to_string();
    for (name, value) in used {
        if value.len() >= 3 {
            msg = msg.replace(value.as_str(), &format!("${{{name}}}"));
            msg = msg.replace(&escape_basic(value), &format!("${{{name}}}"));
        }
    }
    msg
}

/// Byte index of a `#` comment outside quoted strings, if any.
fn comment_start(line: &str) -> Option<usize> {
    let mut found = None;
    scan_quotes(line, |i, c, quote| {
        if quote.is_none() && c == '#' {
            found = Some(i);
            return false;
        }
        true
    });
    found
}

impl Config {
    /// Reads, expands and parses a config file; errors name the file, line and field.
    pub fn load(path: &Path) -> Result<Config, UsageError> {
        let raw = std::fs::read_to_string(path)
            .map_err(|e| UsageError(format!("cannot read config {}: {e}", path.display())))?;
        Self::parse(&raw, path)
    }

    /// Parses config text (`path` is used in messages).
    pub fn parse(raw: &str, path: &Path) -> Result<Config, UsageError> {
        let (text, used) = expand_env(raw, path)?;
        let cfg: Config = toml::from_str(&text)
            .map_err(|e| {
                let msg = redact(e.message().trim(), &used);
                match e.span() {
                    Some(span) => {
                        // Substituted values never add lines: the file's own line is quoted.
                        let (l, c) = line_col(&text, span.start);
                        let line = raw.lines().nth(l - 1).unwrap_or("").trim();
                        format!("{}:{l}:{c}: {msg} (in `{line}`)", path.display())
                    }
                    None => format!("{}: {msg}", path.display()),
                }
            })
            .map_err(UsageError)?;
        let mut cfg = cfg;
        cfg.pipeline.checkpoint_dir = match cfg.pipeline.checkpoint_dir.take() {
            Some(d) if d.as_os_str().is_empty() => None,
            Some(d) if d.is_relative() => Some(path.parent().unwrap_or(Path::new(".")).join(d)),
            other => other,
        };
        cfg.pipeline.checkpoint_shared = match cfg.pipeline.checkpoint_shared.take() {
            Some(s) if s.is_empty() => None,
            Some(s) if s.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("s3://")) => Some(s),
            Some(s) if Path::new(&s).is_relative() => Some(
                path.parent()
                    .unwrap_or(Path::new("."))
                    .join(s)
                    .to_string_lossy()
                    .into_owned(),
            ),
            other => other,
        };
        cfg.overlay_redis_env(&text, path)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// SPEC §6: `REDIS_HOST`/`PORT`/`PASSWORD`/`DB` fill what `[sinks.redis]` leaves out.
    fn overlay_redis_env(&mut self, text: &str, path: &Path) -> Result<(), UsageError> {
        let Some(redis) = self.sinks.redis.as_mut() else {
            return Ok(());
        };
        let table: toml::Table =
            toml::from_str(text).map_err(|_| UsageError(format!("{}: cannot read [sinks.redis]", path.display())))?;
        let given = |k: &str| {
            table
                .get("sinks")
                .and_then(|s| s.get("redis"))
                .and_then(|r| r.get(k))
                .is_some()
        };
        let env = sinks::redis::RedisSinkConfig::from_env()
            .map_err(|e| UsageError(format!("{}: sinks.redis: {e}", path.display())))?;
        if !given("host") {
            redis.host = env.host;
        }
        if !given("port") {
            redis.port = env.port;
        }
        if !given("password") {
            redis.password = env.password;
        }
        if !given("db") {
            redis.db = env.db;
        }
        Ok(())
    }

    fn validate(&self, path: &Path) -> Result<(), UsageError> {
        let err = |field: &str, what: String| UsageError(format!("{}: {field}: {what}", path.display()));
        let urls = [
            (
                "sinks.postgres.url",
                self.sinks.postgres.as_ref().and_then(|p| p.url.as_deref()),
            ),
            (
                "sources.postgres_cdc.url",
                self.sources.postgres_cdc.as_ref().and_then(|p| p.url.as_deref()),
            ),
            (
                "sinks.notify.url",
                self.sinks.notify.as_ref().and_then(|p| p.url.as_deref()),
            ),
        ];
        for (field, url) in urls {
            if let Some(url) = url {
                crate::check_postgres_url(url).map_err(|e| err(field, e))?;
            }
        }
        if let Some(n) = &self.sinks.notify {
            n.validate()
                .map_err(|e| UsageError(format!("{}: {e}", path.display())))?;
        }
        if self.pipeline.workers == 0 || self.pipeline.workers > 64 {
            return Err(err(
                "pipeline.workers",
                format!("must be 1..=64, got {}", self.pipeline.workers),
            ));
        }
        // The hosts may still come from `--hosts`: only a list given here is counted.
        let cluster = self.cluster();
        if let Err(e) = cluster.validate()
            && (!cluster.hosts.is_empty() || !e.contains("host:port"))
        {
            return Err(err("pipeline.processes", e));
        }
        if let Some(shared) = &self.pipeline.checkpoint_shared {
            if self.pipeline.checkpoint_dir.is_none() {
                return Err(err(
                    "pipeline.checkpoint_shared",
                    "needs a checkpoint_dir (files are written there first, then shared)".into(),
                ));
            }
            if shared.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("s3://")) {
                sources::dynamodb_export::s3::S3Location::parse(shared)
                    .map_err(|e| err("pipeline.checkpoint_shared", e.to_string()))?;
            }
        }
        if self.pipeline.batch_max == 0 {
            return Err(err("pipeline.batch_max", "must be at least 1".into()));
        }
        let line = self.sources.max_line_bytes;
        if line == 0 || line > MAX_LINE_BYTES_LIMIT {
            return Err(err(
                "sources.max_line_bytes",
                format!("must be 1..={MAX_LINE_BYTES_LIMIT}, got {line}"),
            ));
        }
        for (i, f) in self.sources.files.iter().enumerate() {
            if Kind::parse(&f.kind).is_none() {
                return Err(err(
                    &format!("sources.files[{i}].kind"),
                    format!(
                        "unknown kind `{}` (prices, tvl, transfers, gas, liquidations, protocols, rules)",
                        f.kind
                    ),
                ));
            }
            if !f.follow && !f.path.exists() {
                return Err(err(
                    &format!("sources.files[{i}].path"),
                    format!("{} does not exist", f.path.display()),
                ));
            }
        }
        for (i, d) in self.sources.dynamodb_export.iter().enumerate() {
            if let Some(s3) = d.to_str().filter(|d| d.starts_with("s3://")) {
                sources::dynamodb_export::s3::S3Location::parse(s3)
                    .map_err(|e| err(&format!("sources.dynamodb_export[{i}]"), e.to_string()))?;
                continue;
            }
            if !sources::dynamodb_export::is_export_dir(d) {
                return Err(err(
                    &format!("sources.dynamodb_export[{i}]"),
                    format!(
                        "{} is not a DynamoDB export (no AWSDynamoDB/ or manifest-summary.json)",
                        d.display()
                    ),
                ));
            }
        }
        if let Some(d) = &self.sources.demo
            && !(d.speed.is_finite() && d.speed > 0.0)
        {
            return Err(err("sources.demo.speed", format!("must be > 0, got {}", d.speed)));
        }
        if !self.has_source() {
            return Err(UsageError(format!(
                "{}: no sources: configure at least one of [sources.demo], [[sources.files]], sources.dynamodb_export, [sources.kafka], [sources.postgres_cdc]",
                path.display()
            )));
        }
        Ok(())
    }

    /// The timely cluster this process is part of (`[pipeline] processes/process_id/hosts`).
    pub fn cluster(&self) -> crate::engine::Cluster {
        crate::engine::Cluster {
            processes: self.pipeline.processes as usize,
            process: self.pipeline.process_id as usize,
            hosts: self.pipeline.hosts.clone(),
            peer_timeout: (self.pipeline.peer_timeout_ms > 0)
                .then(|| std::time::Duration::from_millis(self.pipeline.peer_timeout_ms)),
        }
    }

    /// Whether any input is configured.
    pub fn has_source(&self) -> bool {
        self.sources.demo.is_some()
            || !self.sources.files.is_empty()
            || !self.sources.dynamodb_export.is_empty()
            || self.sources.kafka.is_some()
            || self.sources.postgres_cdc.is_some()
    }

    /// A one-line description of what this config runs (printed by `check-config`).
    pub fn summary(&self) -> String {
        let mut src = Vec::new();
        if self.sources.demo.is_some() {
            src.push("demo".to_string());
        }
        if !self.sources.files.is_empty() {
            src.push(format!("{} files", self.sources.files.len()));
        }
        if !self.sources.dynamodb_export.is_empty() {
            src.push(format!("{} dynamodb exports", self.sources.dynamodb_export.len()));
        }
        if self.sources.kafka.is_some() {
            src.push("kafka".into());
        }
        if self.sources.postgres_cdc.is_some() {
            src.push("postgres_cdc".into());
        }
        let mut snk = Vec::new();
        if self.sinks.stdout {
            snk.push("stdout");
        }
        if self.sinks.jsonl.is_some() {
            snk.push("jsonl");
        }
        if self.sinks.websocket.is_some() {
            snk.push("websocket");
        }
        for (on, name) in [
            (self.sinks.redis.is_some(), "redis"),
            (self.sinks.postgres.is_some(), "postgres"),
            (self.sinks.kafka.is_some(), "kafka"),
            (self.sinks.sqs.is_some(), "sqs"),
            (self.sinks.webhook.is_some(), "webhook"),
            (self.sinks.parquet.is_some(), "parquet"),
            (self.sinks.notify.is_some(), "notify"),
        ] {
            if on {
                snk.push(name);
            }
        }
        let processes = if self.pipeline.processes > 1 {
            format!("; process {} of {}", self.pipeline.process_id, self.pipeline.processes)
        } else {
            String::new()
        };
        format!(
            "sources: {}; sinks: {}; workers: {}{processes}; listen: {}",
            src.join(", "),
            if snk.is_empty() {
                "none".to_string()
            } else {
                snk.join(", ")
            },
            self.pipeline.workers,
            self.pipeline.listen.map_or("off".to_string(), |a| a.to_string())
        )
    }
}

/// Fuzzing config text (`${VAR}` expansion and TOML): no panic; a rejection names the file;
/// an accepted config yields its derived settings. Cases: `LLAMAFLOW_FUZZ_CASES` (see
/// testkit::fuzz).
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;
    use testkit::fuzz::{Count, config, text};

    use super::*;

    const CONFIGS: &[&str] = &[
        "[pipeline]\nworkers = 2\nbatch_ms = 10\nlisten = \"127.0.0.1:8080\"\ncheckpoint_dir = \"\"\n\n[sources.demo]\nspeed = 60.0\n",
        "[sources.kafka]\nbrokers = \"${LLAMAFLOW_FUZZ_BROKERS}\"\ngroup_id = \"g\"\n\n[sinks.postgres]\nurl = \"postgres://u@h/db\"\n",
        "[[sources.files]]\nkind = \"prices\"\npath = \"p.jsonl\"\nfollow = true\n\n[sinks.websocket]\nallow_anonymous = true\n[sinks.websocket.api_keys]\ndemo = \"demo\"\n",
        "[operators]\nhistory_days = 30\n\n[sinks.jsonl]\nalerts = \"a.jsonl\"\n\n[sinks.parquet]\ndir = \"out\"\nrollover = \"hourly\"\n",
    ];

    static CASES: Count = Count::new("config files");

    proptest! {
        #![proptest_config(config(3_000))]

        #[test]
        fn fuzz_config_text(raw in text(CONFIGS)) {
            CASES.add();
            // SAFETY: only this test reads this variable.
            unsafe { std::env::set_var("LLAMAFLOW_FUZZ_BROKERS", "b:9092\"\n[x]") };
            match Config::parse(&raw, Path::new("fuzz.toml")) {
                Ok(c) => {
                    let _ = (c.operators.op_config(), c.operators.view_config(), c.cluster(), c.summary(), c.pipeline.http_limits(1024));
                }
                Err(e) => prop_assert!(e.0.starts_with("fuzz.toml"), "{}", e.0),
            }
        }
    }

    /// Prints the count (after the fuzz test with `--test-threads 1`).
    #[test]
    fn zz_report_fuzz_count() {
        CASES.report();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("llamaflow.toml")).map_err(|e| e.0)
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let e = parse("[pipeline]\nworkers = 2\nwokers = 3\n[sources.demo]\n").unwrap_err();
        assert!(e.starts_with("llamaflow.toml:3:1: unknown field `wokers`"), "{e}");
        let e = parse("[pipeline]\nworkers = \"two\"\n").unwrap_err();
        assert!(e.starts_with("llamaflow.toml:2:"), "{e}");
        let e = parse("[pipeline]\nworkers = 0\n[sources.demo]\n").unwrap_err();
        assert!(e.contains("pipeline.workers"), "{e}");
        let e = parse("[[sources.files]]\nkind = \"candles\"\npath = \"/etc/hostname\"\n").unwrap_err();
        assert!(e.contains("sources.files[0].kind") && e.contains("candles"), "{e}");
        let e = parse("[pipeline]\n").unwrap_err();
        assert!(e.contains("no sources"), "{e}");
    }

    #[test]
    fn env_values_cannot_inject_config_or_leak() {
        // SAFETY: tests in this module do not read these variables concurrently.
        unsafe {
            // A quote and a newline: before, this added an API key of the attacker's choice.
            std::env::set_var(
                "LLAMAFLOW_T_INJECT",
                "pw\"\n[sinks.websocket.api_keys]\nattacker-key = \"demo",
            );
            std::env::set_var("LLAMAFLOW_T_BACKSLASH", "a\\tb\\q");
            std::env::set_var("LLAMAFLOW_T_SECRET", "s3cr3t-value");
            std::env::set_var("LLAMAFLOW_T_WORKERS", "2");
            std::env::set_var("LLAMAFLOW_T_BAD_NUMBER", "2\n[sources.demo]");
        }
        let c = parse(
            "[sources.demo]\n[sinks.websocket]\n[sinks.redis]\nurl = \"redis://127.0.0.1\"\npassword = \"${LLAMAFLOW_T_INJECT}\"\n",
        )
        .unwrap();
        assert_eq!(
            c.sinks.redis.unwrap().password.as_deref(),
            Some("pw\"\n[sinks.websocket.api_keys]\nattacker-key = \"demo"),
            "the value is exactly the variable's"
        );
        assert!(c.sinks.websocket.unwrap().api_keys.is_empty(), "no key was injected");
        let c = parse(
            "[sources.demo]\n[sinks.redis]\nurl = \"redis://127.0.0.1\"\npassword = \"${LLAMAFLOW_T_BACKSLASH}\"\n",
        )
        .unwrap();
        assert_eq!(
            c.sinks.redis.unwrap().password.as_deref(),
            Some("a\\tb\\q"),
            "backslashes stay"
        );
        let c = parse("[pipeline]\nworkers = ${LLAMAFLOW_T_WORKERS}\n[sources.demo]\n").unwrap();
        assert_eq!(c.pipeline.workers, 2);
        let e = parse("[pipeline]\nworkers = ${LLAMAFLOW_T_BAD_NUMBER}\n[sources.demo]\n").unwrap_err();
        assert!(
            e.contains("LLAMAFLOW_T_BAD_NUMBER") && e.contains("outside a quoted string"),
            "{e}"
        );
        let e = parse("[sources.demo]\n[sinks.redis]\npassword = '${LLAMAFLOW_T_INJECT}'\n").unwrap_err();
        assert!(e.contains("'…' string"), "{e}");
        // A parse error on a line with a secret names the variable, not the value.
        let e = parse("[pipeline]\nworkers = \"${LLAMAFLOW_T_SECRET}\"\n[sources.demo]\n").unwrap_err();
        assert!(!e.contains("s3cr3t"), "the secret leaked: {e}");
        assert!(e.contains("llamaflow.toml:2:"), "{e}");
    }

    #[test]
    fn env_references_expand_and_unset_ones_are_named() {
        // SAFETY: tests in this module do not read this variable concurrently.
        unsafe { std::env::set_var("LLAMAFLOW_TEST_KEY", "k-123") };
        let c = parse("[sources.demo]\n[sinks.websocket.api_keys]\n\"${LLAMAFLOW_TEST_KEY}\" = \"u1\"\n").unwrap();
        assert_eq!(
            c.sinks.websocket.unwrap().api_keys.get("k-123").map(String::as_str),
            Some("u1")
        );
        let c = parse("# a comment with ${NOT_A_VAR}\n[sources.demo] # ${ALSO_NOT}\n").unwrap();
        assert!(c.sources.demo.is_some());
        let e = parse("[sources.demo]\n\n[sinks.redis]\npassword = \"${LLAMAFLOW_TEST_UNSET_VAR}\"\n").unwrap_err();
        assert!(
            e.starts_with("llamaflow.toml:4:13: environment variable `LLAMAFLOW_TEST_UNSET_VAR`"),
            "{e}"
        );
    }

    #[test]
    fn the_example_config_is_valid() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../llamaflow.example.toml"));
        let c = Config::load(path).unwrap();
        assert!(c.sources.demo.is_some() && c.sinks.websocket.is_some());
    }

    #[test]
    fn the_compose_stack_config_is_valid() {
        // SAFETY: only this test reads these variables.
        unsafe {
            for (k, v) in [
                ("PREMIUM_DB", "postgres://llamaflow@postgres/llamaflow"),
                ("LLAMAFLOW_WS_API_KEY", "k"),
                ("AWS_ACCESS_KEY_ID", "testing"),
                ("AWS_SECRET_ACCESS_KEY", "testing"),
            ] {
                if std::env::var(k).is_err() {
                    std::env::set_var(k, v);
                }
            }
        }
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/llamaflow.compose.toml"));
        let c = Config::load(path).unwrap();
        assert!(c.sources.kafka.is_some() && c.sources.postgres_cdc.is_some());
        assert!(
            c.sinks.redis.is_some() && c.sinks.postgres.is_some() && c.sinks.kafka.is_some() && c.sinks.sqs.is_some()
        );
    }

    #[test]
    fn cluster_settings_are_checked() {
        let c = parse("[pipeline]\nprocesses = 2\nprocess_id = 1\nhosts = [\"a:2101\", \"b:2101\"]\n[sources.demo]\n")
            .unwrap();
        assert_eq!(c.cluster().processes, 2);
        assert!(c.summary().contains("process 1 of 2"), "{}", c.summary());
        let e = parse("[pipeline]\nprocesses = 2\nprocess_id = 2\nhosts = [\"a:1\", \"b:1\"]\n[sources.demo]\n")
            .unwrap_err();
        assert!(e.contains("pipeline.processes") && e.contains("out of range"), "{e}");
        let e = parse("[pipeline]\nprocesses = 3\nhosts = [\"a:1\"]\n[sources.demo]\n").unwrap_err();
        assert!(e.contains("3 host:port"), "{e}");
    }

    #[test]
    fn the_shared_checkpoint_location_is_checked() {
        let c = parse("[pipeline]\ncheckpoint_shared = \"s3://b/ck\"\n[pipeline.checkpoint_s3]\nregion = \"eu-west-1\"\n[sources.demo]\n")
            .unwrap();
        assert_eq!(c.pipeline.checkpoint_shared.as_deref(), Some("s3://b/ck"));
        assert_eq!(c.pipeline.checkpoint_s3.region, "eu-west-1");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("job.toml");
        std::fs::write(&file, "[pipeline]\ncheckpoint_shared = \"shared\"\n[sources.demo]\n").unwrap();
        let c = Config::load(&file).unwrap();
        assert_eq!(
            c.pipeline.checkpoint_shared.map(PathBuf::from),
            Some(dir.path().join("shared")),
            "a relative directory is relative to the config file"
        );
        let e = parse("[pipeline]\ncheckpoint_shared = \"s3://\"\n[sources.demo]\n").unwrap_err();
        assert!(
            e.contains("pipeline.checkpoint_shared") && e.contains("missing bucket"),
            "{e}"
        );
        let e =
            parse("[pipeline]\ncheckpoint_dir = \"\"\ncheckpoint_shared = \"s3://b\"\n[sources.demo]\n").unwrap_err();
        assert!(e.contains("needs a checkpoint_dir"), "{e}");
    }

    #[test]
    fn defaults() {
        let c = parse("[sources.demo]\n").unwrap();
        assert_eq!(c.pipeline.workers, 2);
        assert!(c.sinks.stdout);
        assert_eq!(c.sources.demo.as_ref().map(|d| d.speed), Some(1.0));
        assert!(c.summary().contains("sources: demo"));
    }
}
