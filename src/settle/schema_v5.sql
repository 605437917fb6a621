-- tollgate durable ledger, schema version 5: shard fences, and webhook retry rounds. A restore rebuilds a shard
-- Redis lost from what this store holds when it reads it; an event a settler read from
-- the lost Redis must not land after that (the store would hold a charge the rebuilt
-- Redis never had, and the shard's ledger would no longer replay). A shard's fence is
-- the epoch marker (ms) of the oldest Redis incarnation of the shard whose events the
-- store still takes: a restore raises it before it reads the shard's events, and gives
-- the rebuilt shard that epoch.
CREATE TABLE IF NOT EXISTS tollgate_shard_fences (
    shard BIGINT PRIMARY KEY,
    epoch BIGINT NOT NULL
);
-- A delivery's attempts before its current round (Admin RetryWebhookDelivery starts a new
-- round of up to attempts_max attempts; `attempts` keeps the total).
ALTER TABLE tollgate_webhook_deliveries ADD COLUMN round_start_attempts BIGINT NOT NULL DEFAULT 0;
