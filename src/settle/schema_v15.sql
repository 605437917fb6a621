-- tollgate durable ledger, schema version 15 (same text for PostgreSQL and SQLite): where in
-- its shard's outbox a wallet's last grant was (what `low_balance_percent` is a percent of).
--
-- A batch's newest grant replaces the stored one only when it is newer than the stored one
-- (store.rs, the wallet upsert). It was compared with the wallet's newest settled event
-- instead: a claimed batch of a dead settler mixes older events (a grant among them) with
-- newer ones, so the batch as a whole was newer and its older grant replaced a newer one.
-- A settler with webhooks on took the rules' answer, which pass over such events; one with
-- webhooks off had nothing to tell them apart.
--
-- Wallets settled before this version start at their newest settled event: a grant settled
-- late from before it does not replace the stored one; any newer one does.
ALTER TABLE tollgate_wallets ADD COLUMN last_grant_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tollgate_wallets ADD COLUMN last_grant_seq BIGINT NOT NULL DEFAULT 0;
UPDATE tollgate_wallets SET last_grant_ms = last_stream_ms, last_grant_seq = last_stream_seq
    WHERE last_grant > 0;
