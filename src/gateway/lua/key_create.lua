-- key_create: store a new API key's record. KEYS[1] the key record "{tg:S}:k:<key_id>",
-- KEYS[2] the account's key index "{tg:S}:ks:<account>" (same hash tag).
-- ARGV 1 account, 2 SHA-256 of the whole key (hex), 3 name, 4 most keys per account,
-- 5 key id. Answers "OK|created_ms", "KEY_LIMIT|max" or "EXISTS".
-- The record holds: a account, s digest, n name, c created ms, r revoked ms (once).
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 'EXISTS'
end
if redis.call('HLEN', KEYS[2]) >= tonumber(ARGV[4]) then
  return 'KEY_LIMIT|' .. ARGV[4]
end
local t = redis.call('TIME')
local now = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
redis.call('HSET', KEYS[1], 'a', ARGV[1], 's', ARGV[2], 'n', ARGV[3], 'c', now)
redis.call('HSET', KEYS[2], ARGV[5], now)
return 'OK|' .. now
