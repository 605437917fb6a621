-- tollgate durable ledger, schema version 14 (same text for PostgreSQL and SQLite): the
-- leased pending deliveries of an account, found without reading its backlog.
--
-- A dispatcher leases an account's head only while no other pending delivery of that
-- account holds a live lease (webhook_store.rs `lease_delivery`: one in flight per account,
-- across dispatchers, when an older event settled late moves the head off a delivery being
-- sent). Without an index that check read every pending delivery of the account: a lease
-- cost as much as the account's backlog. Few rows: a lease is set to 0 when its attempt is
-- recorded, so only deliveries in flight (or left by a dispatcher that died mid-attempt,
-- until their next attempt) are in it.
CREATE INDEX IF NOT EXISTS tollgate_webhook_deliveries_leased
    ON tollgate_webhook_deliveries (account_id) WHERE status = 'pending' AND lease_until_ms > 0;
