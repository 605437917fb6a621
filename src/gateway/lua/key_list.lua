-- key_list: an account's API keys. KEYS[1] the account's index of live keys, KEYS[2] its
-- shard's epoch marker, KEYS[3] its index of revoked keys (a sorted set by revocation ms);
-- ARGV[1] its shard's hash tag (every record read carries it: same slot), ARGV[2] the
-- keys-per-account cap. Lists every key of the live index (held to the cap; keys revoked
-- before the revoked index existed are still there, and listed as revoked) and the most
-- recently revoked keys, at most the cap of them: bounded by twice the cap, however many
-- keys the account ever revoked. A shard without its epoch marker (Redis lost its data) is
-- refused (TG_NOT_INITIALIZED) rather than listed empty.
-- Answers rows "key_id|created_ms|revoked_ms (0 = active)|member|maker|name" (the name
-- last: it may hold '|'; maker "" for a personal key or one made before keys named theirs).
if redis.call('EXISTS', KEYS[2]) == 0 then
  return redis.error_reply('TG_NOT_INITIALIZED ledger not initialized')
end
local ids = redis.call('HKEYS', KEYS[1])
local revoked = redis.call('ZREVRANGE', KEYS[3], 0, tonumber(ARGV[2]) - 1)
for i = 1, #revoked do
  ids[#ids + 1] = revoked[i]
end
local rows = {}
local seen = {}
for i = 1, #ids do
  local v = redis.call('HMGET', ARGV[1] .. ':k:' .. ids[i], 'c', 'r', 'n', 'mb', 'by')
  if v[1] and not seen[ids[i]] then
    seen[ids[i]] = true
    rows[#rows + 1] = ids[i] .. '|' .. v[1] .. '|' .. (v[2] or '0') .. '|' .. (v[4] or '') .. '|'
      .. (v[5] or '') .. '|' .. (v[3] or '')
  end
end
return rows
