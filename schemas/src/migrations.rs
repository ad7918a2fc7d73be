//! SQL migrations for the Postgres tables of SPEC §6, in order. Applied by `llamaflow migrate`
//! (and by tests) inside one transaction each, recorded in `llamaflow_migrations`.

/// `(name, sql)` of every migration, oldest first.
pub const ALL: &[(&str, &str)] = &[
    ("0001_init", include_str!("../migrations/0001_init.sql")),
    (
        "0002_protocol_symbol",
        include_str!("../migrations/0002_protocol_symbol.sql"),
    ),
    (
        "0003_alert_channels",
        include_str!("../migrations/0003_alert_channels.sql"),
    ),
    ("0004_cdc_notify", include_str!("../migrations/0004_cdc_notify.sql")),
];

/// The bookkeeping table, created before any migration runs.
pub const BOOKKEEPING: &str = "CREATE TABLE IF NOT EXISTS llamaflow_migrations (
    name TEXT PRIMARY KEY,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)";
