-- lots: one page of a wallet's live lots in burn order, after ending whatever is due.
-- ARGV 8 account, 9 wallet, 10 offset, 11 page size.
-- Returns { total, then per lot: id, remaining, held, meta, updated_at_ms }.
if not initialized() then
  return redis.error_reply('TG_NOT_INITIALIZED ledger not initialized')
end
local W = open_wallet(ARGV[8], ARGV[9])
settle_due(W)
-- As balance.lua: the credits of overdue holds past settle_due's batch shown given back.
while settle_more(W) do
end
local offset = tonumber(ARGV[10])
local ids = redis.call('ZRANGE', W.b, offset, offset + tonumber(ARGV[11]) - 1)
local out = { redis.call('ZCARD', W.b) }
for j = 1, #ids do
  local id = ids[j]
  local v = redis.call('HMGET', W.w, id, id .. ':h', id .. ':m', id .. ':u')
  out[#out + 1] = id
  out[#out + 1] = v[1] or '0'
  out[#out + 1] = v[2] or '0'
  out[#out + 1] = v[3] or ''
  out[#out + 1] = v[4] or '0'
end
return out
