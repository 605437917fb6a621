-- key_revoke: mark an API key revoked, for good. KEYS[1] the key record, KEYS[2] its
-- shard's epoch marker (same hash tag): a shard Redis lost has no key records, so a key
-- is refused (TG_NOT_INITIALIZED) rather than answered NOT_FOUND.
-- Answers "NOT_FOUND" or "OK|account|revoked_ms|already(0/1)|digest" (the digest lets
-- the revoking process drop the key from its identity cache at once).
if redis.call('EXISTS', KEYS[2]) == 0 then
  return redis.error_reply('TG_NOT_INITIALIZED ledger not initialized')
end
local v = redis.call('HMGET', KEYS[1], 'a', 's', 'r')
if not v[1] then
  return 'NOT_FOUND'
end
if v[3] then
  return 'OK|' .. v[1] .. '|' .. v[3] .. '|1|' .. v[2]
end
local t = redis.call('TIME')
local now = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
redis.call('HSET', KEYS[1], 'r', now)
return 'OK|' .. v[1] .. '|' .. now .. '|0|' .. v[2]
