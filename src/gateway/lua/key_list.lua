-- key_list: an account's API keys. KEYS[1] the account's key index; ARGV[1] its shard's
-- hash tag (every record read carries it: same slot). Bounded by the keys-per-account cap.
-- Answers rows "key_id|created_ms|revoked_ms (0 = active)|member|name".
local ids = redis.call('HKEYS', KEYS[1])
local rows = {}
for i = 1, #ids do
  local v = redis.call('HMGET', ARGV[1] .. ':k:' .. ids[i], 'c', 'r', 'n', 'mb')
  if v[1] then
    rows[#rows + 1] = ids[i] .. '|' .. v[1] .. '|' .. (v[2] or '0') .. '|' .. (v[4] or '') .. '|' .. (v[3] or '')
  end
end
return rows
