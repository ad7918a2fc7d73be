-- llamaflow tables (SPEC §6). Applied in order by `llamaflow migrate`; recorded in llamaflow_migrations.
CREATE TABLE IF NOT EXISTS users (
    id          TEXT PRIMARY KEY,
    email       TEXT,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS api_keys (
    key         TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL,
    revoked     BOOLEAN NOT NULL DEFAULT false,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS api_keys_user ON api_keys (user_id);

CREATE TABLE IF NOT EXISTS protocols (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    slug        TEXT,
    category    TEXT,
    chains      JSONB NOT NULL DEFAULT '[]',
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS alert_rules (
    id                TEXT PRIMARY KEY,
    user_id           TEXT NOT NULL,
    name              TEXT,
    alert_type        TEXT NOT NULL,
    conditions        JSONB NOT NULL,
    channels          JSONB NOT NULL DEFAULT '["websocket"]',
    webhook_url       TEXT,
    enabled           BOOLEAN NOT NULL DEFAULT true,
    throttle_minutes  DOUBLE PRECISION NOT NULL DEFAULT 5,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS alert_rules_user ON alert_rules (user_id);

CREATE TABLE IF NOT EXISTS alert_history (
    alert_id      TEXT PRIMARY KEY,
    rule_id       TEXT NOT NULL,
    user_id       TEXT NOT NULL,
    alert_type    TEXT NOT NULL,
    subject       TEXT NOT NULL,
    triggered_at  TIMESTAMPTZ NOT NULL,
    value         DOUBLE PRECISION NOT NULL,
    threshold     DOUBLE PRECISION NOT NULL,
    message       TEXT NOT NULL,
    channels      JSONB NOT NULL,
    webhook_url   TEXT,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS alert_history_user_time ON alert_history (user_id, triggered_at DESC);

CREATE TABLE IF NOT EXISTS token_prices (
    coin        TEXT NOT NULL,
    timestamp   TIMESTAMPTZ NOT NULL,
    price       DOUBLE PRECISION NOT NULL,
    symbol      TEXT,
    confidence  DOUBLE PRECISION,
    decimals    INTEGER,
    PRIMARY KEY (coin, timestamp)
);

-- One row per chain, plus chain = 'total' for the protocol total.
CREATE TABLE IF NOT EXISTS protocol_tvl (
    protocol_id  TEXT NOT NULL,
    chain        TEXT NOT NULL,
    timestamp    TIMESTAMPTZ NOT NULL,
    tvl          DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (protocol_id, chain, timestamp)
);
