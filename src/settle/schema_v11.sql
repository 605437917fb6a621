-- tollgate durable ledger, schema version 11 (same text for PostgreSQL and SQLite): the
-- events' indexes for a store a year in (tens of millions of events).
--
-- ListTransactions orders an account's events by (created_at_ms, stream_ms, stream_seq,
-- shard), newest first (store.rs history). The history index of version 1 ordered
-- (created_at_ms, event_id), which is not that order past the time, so no plan could
-- read a page straight off it: PostgreSQL sorted each millisecond's events
-- (incremental sort), and SQLite preferred the wallet index and sorted all of the
-- account's events for every page (a second for the first page of an account of 200,000
-- events). This index is the order itself, newest first: a page reads its own rows.
CREATE INDEX IF NOT EXISTS tollgate_events_newest
    ON tollgate_events (account_id, created_at_ms DESC, stream_ms DESC, stream_seq DESC,
        shard DESC);
-- `tollgate reconcile` (and end-lost-hold) reads the event that opened each open hold of
-- a wallet (store.rs hold_event: account, wallet, hold id): the only index it could use
-- was the wallet's (account_id, wallet, …), so each lookup read every event of the
-- wallet, and PostgreSQL took a scan of the whole table instead for a busy account (600
-- ms a lookup at 2M events, once per open hold). Hold events are a small part of the
-- table: a partial index of them is small.
CREATE INDEX IF NOT EXISTS tollgate_events_holds
    ON tollgate_events (account_id, wallet, hold_id) WHERE kind = 'hold';
-- The old history index, now unused, is dropped on SQLite only (store.rs
-- MIGRATION_EXTRAS). On PostgreSQL a DROP INDEX in this transaction would wait for an
-- ACCESS EXCLUSIVE lock behind any long reader of the table (a pg_dump), while the
-- builds' SHARE lock above went on holding every settler write, and every new reader
-- queued behind it: settlement stopped for the length of the dump. The operator drops it
-- there with DROP INDEX CONCURRENTLY, which blocks neither (docs/OPERATIONS.md).
