-- tollgate durable ledger, schema version 10 (same text for PostgreSQL and SQLite): the
-- deployment's shard count (ledger.shards). An account's shard is a hash of its id modulo
-- the count, so the count is fixed for the life of a deployment: the first process that
-- starts writes it here (and into every Redis shard), and a later one configured with
-- another count refuses to start (settle/shard_count.rs). One row, id 1.
CREATE TABLE IF NOT EXISTS tollgate_shard_count (
    id            BIGINT PRIMARY KEY CHECK (id = 1),
    shards        BIGINT NOT NULL,
    written_at_ms BIGINT NOT NULL
);
