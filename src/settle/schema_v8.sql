-- tollgate durable ledger, schema version 8 (same text for PostgreSQL and SQLite): the
-- epoch marker of the Redis a settler read each event from (0: not known: settled before
-- this version, or written without a marker, such as a dead-letter replay). A restore
-- raises a shard's fence above the highest of them (store.rs raise_fence), so a late
-- batch of an incarnation some of whose events were settled is refused whatever the
-- clocks of the hosts that marked that incarnation and that restore it.
ALTER TABLE tollgate_events ADD COLUMN redis_epoch BIGINT NOT NULL DEFAULT 0;
-- The markers (above 0) batches of each shard were settled under, one row per shard and
-- marker (a handful: a new one per Redis incarnation), written by the batch itself in
-- its transaction. raise_fence reads the highest of a shard's in a primary-key range
-- read while it holds the shard's fence row, which every settler batch of the shard
-- waits for: a MAX(redis_epoch) over the shard's events would be a scan of an
-- ever-growing table (no index on it), stalling settlement for its length. Nothing to
-- backfill: events settled before this version have marker 0 (unknown).
CREATE TABLE IF NOT EXISTS tollgate_shard_epochs (
    shard BIGINT NOT NULL,
    epoch BIGINT NOT NULL,
    PRIMARY KEY (shard, epoch)
);
