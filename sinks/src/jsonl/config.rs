//! `[sinks.jsonl]`.

use std::path::PathBuf;

use serde::Deserialize;

/// `[sinks.jsonl]`: append results to files.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonlConfig {
    /// Alerts file.
    pub alerts: Option<PathBuf>,
    /// Market events file.
    pub events: Option<PathBuf>,
}
