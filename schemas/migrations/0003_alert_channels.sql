-- Alert channels (email, Telegram, Discord, mobile push): recipients and the delivery log.
ALTER TABLE users ADD COLUMN IF NOT EXISTS telegram_chat_id TEXT;
ALTER TABLE users ADD COLUMN IF NOT EXISTS discord_webhook_url TEXT;

-- Mobile devices for push (FCM). A token the service reports unregistered is deleted.
CREATE TABLE IF NOT EXISTS user_devices (
    id            TEXT PRIMARY KEY,
    user_id       TEXT NOT NULL,
    device_token  TEXT NOT NULL,
    platform      TEXT NOT NULL DEFAULT 'android',
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS user_devices_user ON user_devices (user_id);

-- One row per (alert, channel, recipient): the outbox the channel dispatcher delivers from and
-- the log of what was delivered. `pending` rows are due at `next_attempt_at`; `sending` rows
-- are claimed by a dispatcher until `claimed_until`; `delivered` and `failed` are final.
CREATE TABLE IF NOT EXISTS alert_deliveries (
    alert_id         TEXT NOT NULL,
    channel          TEXT NOT NULL,
    recipient        TEXT NOT NULL,
    user_id          TEXT NOT NULL,
    rule_name        TEXT,
    alert            JSONB NOT NULL,
    status           TEXT NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'sending', 'delivered', 'failed')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    last_error       TEXT,
    next_attempt_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    claimed_until    TIMESTAMPTZ,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    delivered_at     TIMESTAMPTZ,
    PRIMARY KEY (alert_id, channel, recipient)
);
CREATE INDEX IF NOT EXISTS alert_deliveries_due ON alert_deliveries (next_attempt_at)
    WHERE status IN ('pending', 'sending');
