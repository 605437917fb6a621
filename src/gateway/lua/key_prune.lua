-- key_prune: shared by key_create.lua and key_revoke.lua (prepended to each: src/gateway/
-- identity.rs) and by the ledger library (appended to lua/lib.lua: lua/org.lua's
-- revocations). Revoked keys are kept `gateway.revoked_key_retention_secs` after their
-- revocation, then dropped: a call that creates or revokes a key of an account first
-- deletes the records "{tg:S}:k:<id>" of that account's keys revoked longer ago than the
-- retention, with their entries of the revoked index "{tg:S}:kr:<account>" (scored by
-- revocation ms, so the oldest come first and no scan is needed). At most
-- REVOKED_KEYS_PRUNED_MAX per call, so a call's work stays bounded however many keys the
-- account revoked; the rest go with its next calls. A pruned key answers as unknown (401)
-- instead of revoked (403): docs/ARCHITECTURE.md, "Revoked keys".
local REVOKED_KEYS_PRUNED_MAX = 32

-- The time a key script runs at, in ms: the caller's forced time (tests drive the ledger's
-- manual clock, as lua/lib.lua's NOW) when positive, else Redis's TIME.
local function key_script_now(forced)
  local n = tonumber(forced)
  if n and n > 0 then
    return n
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Drops the account's keys revoked at or before now - retention (ms); answers how many.
-- `tag` is the shard's hash tag "{tg:S}": every key touched carries it (same slot). A
-- retention that is not positive prunes nothing. Only a record that says it is revoked
-- (`r`) is deleted: the index never holds a live key (key_revoke.lua, lua/org.lua,
-- key_create.lua and `tollgate restore` add an id only with `r` set), but should it, the
-- key stays and only its stray entry goes.
local function prune_revoked_keys(tag, account, now, retention_ms)
  local retention = tonumber(retention_ms)
  if not retention or retention <= 0 then
    return 0
  end
  local index = tag .. ':kr:' .. account
  local cutoff = string.format('%d', now - retention)
  local ids = redis.call('ZRANGEBYSCORE', index, '-inf', cutoff, 'LIMIT', 0, REVOKED_KEYS_PRUNED_MAX)
  for i = 1, #ids do
    local key = tag .. ':k:' .. ids[i]
    if redis.call('HEXISTS', key, 'r') == 1 then
      redis.call('DEL', key)
    end
  end
  if #ids > 0 then
    redis.call('ZREM', index, unpack(ids))
  end
  return #ids
end
