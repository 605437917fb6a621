-- key_create: store a new API key's record. KEYS[1] the key record "{tg:S}:k:<key_id>",
-- KEYS[2] the account's key index "{tg:S}:ks:<account>" (same hash tag), and for an org
-- workspace key KEYS[3] the org record "{tg:S}:org:<org>".
-- ARGV 1 account, 2 SHA-256 of the whole key (hex), 3 name, 4 most keys per account,
-- 5 key id, 6 member the key acts for ("" = none), 7 actor (org keys: owner or admin).
-- Answers "OK|created_ms", "KEY_LIMIT|max", "EXISTS" or "BAD_FIELD|field|why".
-- The record holds: a account, s digest, n name, c created ms, r revoked ms (once),
-- mb member (org keys bound to a member).
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 'EXISTS'
end
if KEYS[3] then
  if redis.call('EXISTS', KEYS[3]) == 0 then
    return 'BAD_FIELD|org_id|is not an organization'
  end
  local role = redis.call('HGET', KEYS[3], 'm:' .. ARGV[7])
  if role ~= 'owner' and role ~= 'admin' then
    return 'BAD_FIELD|actor_id|must be an owner or admin of the organization'
  end
  if ARGV[6] ~= '' and not redis.call('HGET', KEYS[3], 'm:' .. ARGV[6]) then
    return 'BAD_FIELD|member_id|is not a member of the organization'
  end
end
if redis.call('HLEN', KEYS[2]) >= tonumber(ARGV[4]) then
  return 'KEY_LIMIT|' .. ARGV[4]
end
local t = redis.call('TIME')
local now = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
redis.call('HSET', KEYS[1], 'a', ARGV[1], 's', ARGV[2], 'n', ARGV[3], 'c', now)
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[1], 'mb', ARGV[6])
end
redis.call('HSET', KEYS[2], ARGV[5], now)
return 'OK|' .. now
