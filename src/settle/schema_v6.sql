-- tollgate durable ledger, schema version 6 (same text for PostgreSQL and SQLite).
--
-- `tollgate restore` reads a shard's events in (account, wallet, stream position) order,
-- a page at a time (store.rs shard_events), and asks whether a shard has any
-- (shard_has_events): no index started with the shard, so every page was a scan of the
-- whole table and a sort.
CREATE INDEX IF NOT EXISTS tollgate_events_shard
    ON tollgate_events (shard, account_id, wallet, stream_ms, stream_seq);
-- The webhook dispatcher forgets expired tracked lots every few seconds
-- (webhook_store.rs prune_lots, by expires_at_ms): the only index on it covered lots not
-- yet announced, so each round scanned the whole table.
CREATE INDEX IF NOT EXISTS tollgate_lots_expires
    ON tollgate_lots (expires_at_ms);
-- schema_v5.sql gained `round_start_attempts` after a build had shipped it without: a
-- database that build migrated is at version 5 without the column, which the migration
-- runner adds before this script where it is missing (store.rs MISSING_COLUMNS; SQLite
-- has no ADD COLUMN IF NOT EXISTS). That build kept a retried delivery's round start as a
-- negated delivered_at_ms (a time only once delivered, 0 before; delivering overwrote it):
-- move it into its column.
UPDATE tollgate_webhook_deliveries
    SET round_start_attempts = -delivered_at_ms, delivered_at_ms = 0
    WHERE delivered_at_ms < 0;
