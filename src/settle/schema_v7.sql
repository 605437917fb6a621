-- tollgate durable ledger, schema version 7 (same text for PostgreSQL and SQLite): the
-- owner or admin who made an org operation (an event's `ac` field: AddMember,
-- RemoveMember, SetAllocation, AddAllocation). It is part of the operation's request
-- digest, so `tollgate restore` needs it to re-derive the operation's idempotency record.
-- Events settled before it have none ('') and get no record back.
ALTER TABLE tollgate_events ADD COLUMN actor TEXT NOT NULL DEFAULT '';
