-- tollgate durable ledger, schema version 1 (same text for PostgreSQL and SQLite).
CREATE TABLE IF NOT EXISTS tollgate_events (
    event_id        TEXT PRIMARY KEY,
    shard           BIGINT NOT NULL,
    stream_ms       BIGINT NOT NULL,
    stream_seq      BIGINT NOT NULL,
    kind            TEXT NOT NULL,
    account_id      TEXT NOT NULL,
    wallet          TEXT NOT NULL,
    amount          BIGINT NOT NULL,
    available_after BIGINT NOT NULL,
    held_after      BIGINT NOT NULL,
    lots            TEXT NOT NULL,
    extra           TEXT NOT NULL,
    hold_id         TEXT NOT NULL,
    charge_id       TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    operation       TEXT NOT NULL,
    metadata        TEXT NOT NULL,
    created_at_ms   BIGINT NOT NULL,
    -- What the event changed in the wallet's running totals.
    d_granted       BIGINT NOT NULL,
    d_used          BIGINT NOT NULL,
    d_expired       BIGINT NOT NULL,
    d_refunded      BIGINT NOT NULL,
    d_adjusted      BIGINT NOT NULL,
    settled_at_ms   BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS tollgate_events_history
    ON tollgate_events (account_id, created_at_ms DESC, event_id DESC);
CREATE INDEX IF NOT EXISTS tollgate_events_wallet
    ON tollgate_events (account_id, wallet, stream_ms, stream_seq);
CREATE TABLE IF NOT EXISTS tollgate_wallets (
    account_id      TEXT NOT NULL,
    wallet          TEXT NOT NULL,
    granted         BIGINT NOT NULL,
    used            BIGINT NOT NULL,
    expired         BIGINT NOT NULL,
    refunded        BIGINT NOT NULL,
    adjusted        BIGINT NOT NULL,
    available       BIGINT NOT NULL,
    held            BIGINT NOT NULL,
    last_stream_ms  BIGINT NOT NULL,
    last_stream_seq BIGINT NOT NULL,
    events          BIGINT NOT NULL,
    PRIMARY KEY (account_id, wallet)
);
