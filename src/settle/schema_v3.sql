-- tollgate durable ledger, schema version 3: API keys (hashes only) so `tollgate restore`
-- can rebuild them, and the ledger event format version.
CREATE TABLE IF NOT EXISTS tollgate_api_keys (
    key_id        TEXT PRIMARY KEY,
    account_id    TEXT NOT NULL,
    digest        TEXT NOT NULL,
    name          TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    revoked_at_ms BIGINT NOT NULL
);
ALTER TABLE tollgate_events ADD COLUMN version BIGINT NOT NULL DEFAULT 1;
