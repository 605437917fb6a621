-- key_revoke: mark an API key revoked, for good. KEYS[1] the key record, KEYS[2] its
-- shard's epoch marker (same hash tag): a shard Redis lost has no key records, so a key
-- is refused (TG_NOT_INITIALIZED) rather than answered NOT_FOUND.
-- The key's id moves from its account's live index "{tg:S}:ks:<account>" to the revoked
-- one "{tg:S}:kr:<account>" (a sorted set by revocation ms; same hash tag, named from the
-- record's account): the keys-per-account cap counts live keys only (key_create.lua). A
-- repeat moves a key revoked before that index existed too.
-- ARGV 1 the time override in ms (0 = Redis TIME; key_prune.lua key_script_now), 2 how
-- long revoked keys are kept (ms): the account's keys revoked longer ago than that are
-- dropped in this call (key_prune.lua), a repeat's included.
-- Answers "NOT_FOUND" or "OK|account|revoked_ms|already(0/1)|digest" (the digest lets
-- the revoking process drop the key from its identity cache at once).
if redis.call('EXISTS', KEYS[2]) == 0 then
  return redis.error_reply('TG_NOT_INITIALIZED ledger not initialized')
end
local v = redis.call('HMGET', KEYS[1], 'a', 's', 'r')
if not v[1] then
  return 'NOT_FOUND'
end
local tag, key_id = string.match(KEYS[1], '^({[^}]*}):k:(.*)$')
local function move(revoked, always)
  if redis.call('HDEL', tag .. ':ks:' .. v[1], key_id) == 1 or always then
    redis.call('ZADD', tag .. ':kr:' .. v[1], revoked, key_id)
  end
end
local now_ms = key_script_now(ARGV[1])
if v[3] then
  move(v[3], false)
  prune_revoked_keys(tag, v[1], now_ms, ARGV[2])
  return 'OK|' .. v[1] .. '|' .. v[3] .. '|1|' .. v[2]
end
-- The revocation time is the record's `r` and the key's score in the revoked index.
local now = string.format('%d', now_ms)
redis.call('HSET', KEYS[1], 'r', now)
move(now, true)
prune_revoked_keys(tag, v[1], now_ms, ARGV[2])
return 'OK|' .. v[1] .. '|' .. now .. '|0|' .. v[2]
