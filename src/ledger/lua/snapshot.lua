-- snapshot: a wallet's totals exactly as stored, with the id of the shard outbox's last
-- entry, read atomically (reconcile compares the durable ledger up to that entry).
-- No lazy expiry here: the snapshot must not write. ARGV 8 account, 9 wallet.
-- Returns { available, held, granted, used, expired, refunded, adjusted, last_entry_id }.
local v = redis.call('HMGET', TAG .. ':w:' .. ARGV[8] .. ':' .. ARGV[9], 'r', 'h', 'g', 'u', 'xp', 'f', 'j')
local out = {}
for k = 1, 7 do
  out[k] = v[k] or '0'
end
local last = redis.call('XREVRANGE', OUTBOX, '+', '-', 'COUNT', 1)
out[8] = last[1] and last[1][1] or ''
return out
