-- tollgate durable ledger, schema version 2 (same text for PostgreSQL and SQLite):
-- usage webhooks (alert state, thresholds, expiring lots, deliveries) and the count of
-- open holds.

-- Alert state per wallet, next to its running summary. low_alerted / exhausted_alerted:
-- 1 = the alert fired and has not re-armed; 0 = armed; -1 = not tracked yet.
ALTER TABLE tollgate_wallets ADD COLUMN last_grant BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tollgate_wallets ADD COLUMN low_alerted BIGINT NOT NULL DEFAULT -1;
ALTER TABLE tollgate_wallets ADD COLUMN exhausted_alerted BIGINT NOT NULL DEFAULT -1;
UPDATE tollgate_wallets SET last_grant = COALESCE((
    SELECT e.amount FROM tollgate_events e
    WHERE e.account_id = tollgate_wallets.account_id AND e.wallet = tollgate_wallets.wallet
      AND e.kind = 'grant'
    ORDER BY e.stream_ms DESC, e.stream_seq DESC LIMIT 1), 0);

-- Running counters derived from settled events (updated in the batch's transaction).
CREATE TABLE IF NOT EXISTS tollgate_counters (
    name  TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO tollgate_counters (name, value)
SELECT 'holds_open',
    (SELECT COUNT(*) FROM tollgate_events WHERE kind = 'hold')
    - (SELECT COUNT(*) FROM tollgate_events WHERE kind IN ('capture', 'release', 'expire_hold'));

-- Low-balance thresholds of one account's wallet (Admin SetBalanceThreshold), overriding
-- the configured ones.
CREATE TABLE IF NOT EXISTS tollgate_balance_thresholds (
    account_id          TEXT NOT NULL,
    wallet              TEXT NOT NULL,
    low_balance         BIGINT NOT NULL,
    low_balance_percent BIGINT NOT NULL,
    updated_at_ms       BIGINT NOT NULL,
    PRIMARY KEY (account_id, wallet)
);

-- Credits left in lots that expire (tracked while lot.expiring is delivered).
CREATE TABLE IF NOT EXISTS tollgate_lots (
    account_id        TEXT NOT NULL,
    wallet            TEXT NOT NULL,
    lot_id            TEXT NOT NULL,
    expires_at_ms     BIGINT NOT NULL,
    remaining         BIGINT NOT NULL,
    expiring_notified BIGINT NOT NULL,
    PRIMARY KEY (account_id, wallet, lot_id)
);
CREATE INDEX IF NOT EXISTS tollgate_lots_expiring
    ON tollgate_lots (expires_at_ms) WHERE expiring_notified = 0;

-- Webhook deliveries: one row per delivery id; status pending | delivered | failed.
-- Deliveries of one account go out in (position_ms, position_seq, ordinal) order.
CREATE TABLE IF NOT EXISTS tollgate_webhook_deliveries (
    delivery_id        TEXT PRIMARY KEY,
    account_id         TEXT NOT NULL,
    wallet             TEXT NOT NULL,
    event_type         TEXT NOT NULL,
    position_ms        BIGINT NOT NULL,
    position_seq       BIGINT NOT NULL,
    ordinal            BIGINT NOT NULL,
    payload            TEXT NOT NULL,
    status             TEXT NOT NULL,
    attempts           BIGINT NOT NULL,
    next_attempt_at_ms BIGINT NOT NULL,
    lease_until_ms     BIGINT NOT NULL,
    last_error         TEXT NOT NULL,
    last_status_code   BIGINT NOT NULL,
    created_at_ms      BIGINT NOT NULL,
    delivered_at_ms    BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS tollgate_webhook_deliveries_pending
    ON tollgate_webhook_deliveries (account_id, position_ms, position_seq, ordinal)
    WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS tollgate_webhook_deliveries_recent
    ON tollgate_webhook_deliveries (position_ms, position_seq, ordinal, delivery_id);
CREATE INDEX IF NOT EXISTS tollgate_webhook_deliveries_account
    ON tollgate_webhook_deliveries (account_id, position_ms, position_seq, ordinal, delivery_id);
