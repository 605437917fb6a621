-- tollgate durable ledger, schema version 9 (same text for PostgreSQL and SQLite): the owner
-- or admin who made an org API key. A member-less (org-wide) key is revoked when its maker
-- leaves the org or becomes a plain member (lua/org.lua); `tollgate restore` rebuilds the
-- key record's maker from here, and revokes a live org-wide key whose maker is no owner or
-- admin of the restored org. Keys saved before this version have none ('': never revoked
-- that way; an owner lists and revokes them).
ALTER TABLE tollgate_api_keys ADD COLUMN created_by TEXT NOT NULL DEFAULT '';
