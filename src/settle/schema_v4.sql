-- tollgate durable ledger, schema version 4: organizations. The org member an event is
-- attributed to (charges in an org workspace, membership, allocations, member budgets),
-- and the member an org workspace API key acts for.
ALTER TABLE tollgate_events ADD COLUMN member TEXT NOT NULL DEFAULT '';
ALTER TABLE tollgate_api_keys ADD COLUMN member_id TEXT NOT NULL DEFAULT '';
