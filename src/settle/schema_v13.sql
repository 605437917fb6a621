-- tollgate durable ledger, schema version 13 (same text for PostgreSQL and SQLite): each
-- account's webhook queue head, kept on the delivery itself.
--
-- The dispatcher attempts only the head of an account's queue: its oldest pending
-- delivery, by (position_ms, position_seq, ordinal), then delivery_id between equal
-- positions. It used to find the heads with an anti-join of every pending delivery
-- against the pending index, so a round cost as much as the backlog (0.7-0.9 s at 200,000
-- pending on PostgreSQL) whatever was due. `is_head` marks the head (1) and is kept
-- where the queue changes (webhook_store.rs `mark_heads`, under a per-account lock on
-- PostgreSQL): deliveries inserted, a delivery ended (delivered or given up) and a failed
-- one put back by RetryWebhookDelivery. A round reads the due heads off a small index of
-- heads only (one row per account with something pending).
ALTER TABLE tollgate_webhook_deliveries ADD COLUMN is_head BIGINT NOT NULL DEFAULT 0;
-- Due heads in the order a round takes them.
CREATE INDEX IF NOT EXISTS tollgate_webhook_deliveries_due_heads
    ON tollgate_webhook_deliveries (next_attempt_at_ms, position_ms, position_seq, ordinal)
    WHERE is_head = 1;
-- An account's head, to move the mark when its queue changes.
CREATE INDEX IF NOT EXISTS tollgate_webhook_deliveries_heads
    ON tollgate_webhook_deliveries (account_id) WHERE is_head = 1;
-- The deliveries pending when the database is migrated: the oldest of each account heads
-- it. One pass over the pending rows, sorted (0.3 s at 200,000 pending on PostgreSQL;
-- 0.8 s on a loaded machine, where the old query's anti-join took 4.5 s).
UPDATE tollgate_webhook_deliveries SET is_head = 1
WHERE delivery_id IN (
    SELECT delivery_id FROM (
        SELECT delivery_id, ROW_NUMBER() OVER (PARTITION BY account_id
            ORDER BY position_ms, position_seq, ordinal, delivery_id) AS n
        FROM tollgate_webhook_deliveries WHERE status = 'pending') r
    WHERE n = 1);
