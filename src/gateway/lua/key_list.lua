-- key_list: an account's API keys. KEYS[1] the account's key index, KEYS[2] its shard's
-- epoch marker; ARGV[1] its shard's hash tag (every record read carries it: same slot).
-- Bounded by the keys-per-account cap. A shard without its epoch marker (Redis lost its
-- data) is refused (TG_NOT_INITIALIZED) rather than listed empty.
-- Answers rows "key_id|created_ms|revoked_ms (0 = active)|member|maker|name" (the name
-- last: it may hold '|'; maker "" for a personal key or one made before keys named theirs).
if redis.call('EXISTS', KEYS[2]) == 0 then
  return redis.error_reply('TG_NOT_INITIALIZED ledger not initialized')
end
local ids = redis.call('HKEYS', KEYS[1])
local rows = {}
for i = 1, #ids do
  local v = redis.call('HMGET', ARGV[1] .. ':k:' .. ids[i], 'c', 'r', 'n', 'mb', 'by')
  if v[1] then
    rows[#rows + 1] = ids[i] .. '|' .. v[1] .. '|' .. (v[2] or '0') .. '|' .. (v[4] or '') .. '|'
      .. (v[5] or '') .. '|' .. (v[3] or '')
  end
end
return rows
