-- key_revoke: mark an API key revoked, for good. KEYS[1] the key record.
-- Answers "NOT_FOUND" or "OK|account|revoked_ms|already(0/1)|digest" (the digest lets
-- the revoking process drop the key from its identity cache at once).
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
