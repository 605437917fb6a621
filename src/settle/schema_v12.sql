-- tollgate durable ledger, schema version 12 (same text for PostgreSQL and SQLite): the
-- history of one kind of an account's events, in ListTransactions' page order.
--
-- A `kinds` filter was only a filter on tollgate_events_newest (schema_v11.sql): a page
-- of a kind the account has few of (a `refund` among 200,000 debits) read every event of
-- the account to find them (640 ms on PostgreSQL, 360 ms on SQLite). With the kind after
-- the account, a page of one kind reads its own rows; a page of several kinds reads at
-- most a page of each, one branch per kind merged in page order (store.rs history_query).
CREATE INDEX IF NOT EXISTS tollgate_events_kind
    ON tollgate_events (account_id, kind, created_at_ms DESC, stream_ms DESC,
        stream_seq DESC, shard DESC);
