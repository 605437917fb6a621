-- lots: one page of a wallet's lots, after ending whatever is due: the live lots in burn
-- order, then the expired ones open holds still hold credits of (lib.lua expire_lot), by
-- expiry. ARGV 8 account, 9 wallet, 10 offset, 11 page size.
-- Returns { total, then per lot: id, remaining, held, meta, updated_at_ms, expired }, where
-- expired is "" for a live lot and, for an expired one, how many of its credits expired.
if not initialized() then
  return redis.error_reply('TG_NOT_INITIALIZED ledger not initialized')
end
local W = open_wallet(ARGV[8], ARGV[9])
settle_due(W)
-- As balance.lua: the credits of overdue holds past settle_due's batch shown given back.
while settle_more(W) do
end
local offset = tonumber(ARGV[10])
local size = tonumber(ARGV[11])
local live = redis.call('ZCARD', W.b)
local xh = expired_held_key(W)
local expired_count = redis.call('ZCARD', xh)
local out = { live + expired_count }
local function list(ids, expired)
  for j = 1, #ids do
    local id = ids[j]
    local v = redis.call('HMGET', W.w, id, id .. ':h', id .. ':m', id .. ':u', id .. ':x')
    if expired and not v[3] then
      -- Its record is gone: dropped by a tollgate from before this index (a rolling
      -- upgrade), which did not know to take it out. Out now, and not listed.
      redis.call('ZREM', xh, id)
      out[1] = out[1] - 1
    else
      out[#out + 1] = id
      out[#out + 1] = v[1] or '0'
      out[#out + 1] = v[2] or '0'
      out[#out + 1] = v[3] or ''
      out[#out + 1] = v[4] or '0'
      out[#out + 1] = expired and (v[5] or '0') or ''
    end
  end
end
local listed = 0
if offset < live then
  local ids = redis.call('ZRANGE', W.b, offset, offset + size - 1)
  list(ids, false)
  listed = #ids
end
if listed < size and expired_count > 0 then
  local from = math.max(0, offset - live)
  list(redis.call('ZRANGE', xh, from, from + size - listed - 1), true)
end
return out
