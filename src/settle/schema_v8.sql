-- tollgate durable ledger, schema version 8 (same text for PostgreSQL and SQLite): the
-- epoch marker of the Redis a settler read each event from (0: not known: settled before
-- this version, or written without a marker, such as a dead-letter replay). A restore
-- raises a shard's fence above the highest of them (store.rs raise_fence), so a late
-- batch of an incarnation some of whose events were settled is refused whatever the
-- clocks of the hosts that marked that incarnation and that restore it.
ALTER TABLE tollgate_events ADD COLUMN redis_epoch BIGINT NOT NULL DEFAULT 0;
