-- snapshot: a wallet's totals and, for an org wallet, its members' allocations exactly as
-- stored, with the id of the shard outbox's last entry (trimmed or not), read atomically
-- (reconcile compares the durable ledger up to that entry).
-- No lazy expiry here: the snapshot must not write. ARGV 8 account, 9 wallet.
-- Returns { available, held, granted, used, expired, refunded, adjusted, last_entry_id,
-- open holds (ids in the wallet's deadline index), then the allocation record's fields
-- and values in pairs ("{tg:S}:al:<account>:<wallet>"; none outside an org wallet) }.
local base = ARGV[8] .. ':' .. ARGV[9]
local v = redis.call('HMGET', TAG .. ':w:' .. base, 'r', 'h', 'g', 'u', 'xp', 'f', 'j')
local out = {}
for k = 1, 7 do
  out[k] = v[k] or '0'
end
-- The id of the last entry ever added, not of the last one still there: settled entries
-- are trimmed, and an empty outbox must not read as "no position" (reconcile would then
-- count events that were written after this snapshot). "" when nothing was ever added.
local last = ''
if redis.call('EXISTS', OUTBOX) == 1 then
  local info = redis.call('XINFO', 'STREAM', OUTBOX)
  for j = 1, #info, 2 do
    if info[j] == 'last-generated-id' then
      last = info[j + 1]
      break
    end
  end
end
if last == '0-0' then
  last = ''
end
out[8] = last
out[9] = tostring(redis.call('ZCARD', TAG .. ':hw:' .. base))
local al = redis.call('HGETALL', TAG .. ':al:' .. base)
for j = 1, #al do
  out[9 + j] = al[j]
end
return out
