-- key_create: store a new API key's record. KEYS[1] the key record "{tg:S}:k:<key_id>",
-- KEYS[2] the account's index of live keys "{tg:S}:ks:<account>", KEYS[3] the account's
-- org record "{tg:S}:org:<account>" (same hash tag; it exists iff the account is an
-- organization), KEYS[4] the shard's epoch marker "{tg:S}:epoch" (same hash tag).
-- ARGV 1 account, 2 SHA-256 of the whole key (hex), 3 name, 4 most keys per account,
-- 5 key id, 6 member the key acts for ("" = none), 7 actor (an org workspace key's owner or
-- admin; "" = a personal key), 8 idempotency record id ("" = none: 30 hex of
-- SHA-256("<account>:<idempotency key>")), 9 digest of the request's parameters,
-- 10 idempotency window (ms), 11 the time override in ms (0 = Redis TIME; key_prune.lua
-- key_script_now), 12 how long revoked keys are kept (ms): a creation drops the account's
-- keys revoked longer ago than that (key_prune.lua).
-- Answers "OK|created_ms", "REPLAY|key_id|created_ms|key digest" (the key an earlier call
-- with this idempotency key made), "IDEMPOTENCY_KEY_REUSED" (that key with other
-- parameters, as every ledger script answers it), "KEY_LIMIT|max", "EXISTS" or
-- "BAD_FIELD|field|why".
-- The record holds: a account, s digest, n name, c created ms, r revoked ms (once),
-- mb member (org keys bound to a member), by the owner or admin who made an org key (every
-- key they made is revoked when they leave the org or become a plain member, and a key
-- bound to a member when that member leaves: lua/org.lua). The idempotency record
-- "{tg:S}:ki:<id>" = "<request digest>|<key id>|<created ms>", for the window.
-- A shard without its epoch marker (Redis lost its data, until `tollgate restore`) is
-- refused first (TG_NOT_INITIALIZED, as the ledger scripts): its org records are gone too,
-- so the organization check below would pass for an org and make an org-wide key.
-- Who may make the key is checked first, a repeat included (as a revoked API key is
-- refused before a repeat's answer is looked up): an org key needs an owner or admin of
-- the org; a personal key needs an account that is not an organization (a member-less
-- key on an org account charges the org wallet with no member checks, so only the org
-- path, with its actor check, makes one). lua/org.lua's create refuses, in turn, an
-- account with live keys, so a live member-less key on an org was always made this way.
if redis.call('EXISTS', KEYS[4]) == 0 then
  return redis.error_reply('TG_NOT_INITIALIZED ledger not initialized')
end
if ARGV[7] ~= '' then
  if redis.call('EXISTS', KEYS[3]) == 0 then
    return 'BAD_FIELD|org_id|is not an organization'
  end
  local role = redis.call('HGET', KEYS[3], 'm:' .. ARGV[7])
  if role ~= 'owner' and role ~= 'admin' then
    return 'BAD_FIELD|actor_id|must be an owner or admin of the organization'
  end
  if ARGV[6] ~= '' then
    local bound = redis.call('HGET', KEYS[3], 'm:' .. ARGV[6])
    if not bound then
      return 'BAD_FIELD|member_id|is not a member of the organization'
    end
    -- Only an owner acts on an owner (as lua/org.lua's add and allocations).
    if bound == 'owner' and role ~= 'owner' then
      return 'BAD_FIELD|actor_id|only an owner may make a key bound to an owner'
    end
  end
elseif redis.call('EXISTS', KEYS[3]) == 1 then
  return 'BAD_FIELD|account_id|is an organization: make its keys with org_id and actor_id (an owner or admin of it)'
end
local ikey
if ARGV[8] ~= '' then
  local tag = string.match(KEYS[1], '^{[^}]*}')
  ikey = tag .. ':ki:' .. ARGV[8]
  local prior = redis.call('GET', ikey)
  if prior then
    local digest, key_id, created = string.match(prior, '^([^|]*)|([^|]*)|(.*)$')
    if digest ~= ARGV[9] then
      return 'IDEMPOTENCY_KEY_REUSED'
    end
    local key_digest = redis.call('HGET', tag .. ':k:' .. key_id, 's') or ''
    return 'REPLAY|' .. key_id .. '|' .. created .. '|' .. key_digest
  end
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 'EXISTS'
end
-- The cap counts live keys: the index holds them (key_revoke.lua and lua/org.lua move a
-- revoked key's id to "{tg:S}:kr:<account>"). Keys revoked before that index existed are
-- still in it: an index at the cap moves those it holds there first (bounded by the index,
-- itself held to the cap; only an account at the cap pays for it).
local max = tonumber(ARGV[4])
if redis.call('HLEN', KEYS[2]) >= max then
  local tag = string.match(KEYS[1], '^{[^}]*}')
  local ids = redis.call('HKEYS', KEYS[2])
  for i = 1, #ids do
    local revoked = redis.call('HGET', tag .. ':k:' .. ids[i], 'r')
    if revoked then
      redis.call('HDEL', KEYS[2], ids[i])
      redis.call('ZADD', tag .. ':kr:' .. ARGV[1], revoked, ids[i])
    end
  end
  if redis.call('HLEN', KEYS[2]) >= max then
    return 'KEY_LIMIT|' .. ARGV[4]
  end
end
local now_ms = key_script_now(ARGV[11])
local now = string.format('%d', now_ms)
redis.call('HSET', KEYS[1], 'a', ARGV[1], 's', ARGV[2], 'n', ARGV[3], 'c', now)
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[1], 'mb', ARGV[6])
end
if ARGV[7] ~= '' then
  redis.call('HSET', KEYS[1], 'by', ARGV[7])
end
redis.call('HSET', KEYS[2], ARGV[5], now)
if ikey then
  redis.call('SET', ikey, ARGV[9] .. '|' .. ARGV[5] .. '|' .. now, 'PX', ARGV[10])
end
prune_revoked_keys(string.match(KEYS[1], '^{[^}]*}'), ARGV[1], now_ms, ARGV[12])
return 'OK|' .. now
