-- lots: one page of a wallet's lots, after ending whatever is due: the live lots in burn
-- order, then the expired ones open holds still hold credits of (lib.lua expire_lot), by
-- expiry. ARGV 8 account, 9 wallet, 10 offset, 11 page size, 12 where the page starts
-- instead of the offset: "" (the offset), or "l" / "x" for just after the lot ARGV 14,
-- whose score is ARGV 13, in the burn index / the expired-held index (a keyset cursor:
-- lots added or dropped before it since do not move the page, as they moved an offset).
-- Returns { total, start, then per lot: id, remaining, held, meta, updated_at_ms, expired,
-- index ("l" or "x"), score }, where start is the position of the page's first lot among
-- the total and expired is "" for a live lot and, for an expired one, how many of its
-- credits expired.
if not initialized() then
  return redis.error_reply('TG_NOT_INITIALIZED ledger not initialized')
end
local W = open_wallet(ARGV[8], ARGV[9])
settle_due(W)
-- As balance.lua: the credits of overdue holds past settle_due's batch shown given back.
while settle_more(W) do
end
local size = tonumber(ARGV[11])
local live = redis.call('ZCARD', W.b)
local xh = expired_held_key(W)
local expired_count = redis.call('ZCARD', xh)
-- How many members of index z come before or are (score, id): ties in score are in
-- member order (Redis's), lot ids being fixed-width digits. The lot itself may be gone
-- (used up, expired): its place is still where it was.
local function after(z, score, id)
  local found = redis.call('ZSCORE', z, id)
  if found and tonumber(found) == score then
    return redis.call('ZRANK', z, id) + 1
  end
  local n = redis.call('ZCOUNT', z, '-inf', '(' .. itos(score))
  local ties = redis.call('ZRANGE', z, itos(score), itos(score), 'BYSCORE')
  for j = 1, #ties do
    if ties[j] > id then
      break
    end
    n = n + 1
  end
  return n
end
local offset = tonumber(ARGV[10])
if ARGV[12] == 'l' then
  offset = after(W.b, tonumber(ARGV[13]), ARGV[14])
elseif ARGV[12] == 'x' then
  offset = live + after(xh, tonumber(ARGV[13]), ARGV[14])
end
local out = { live + expired_count, offset }
local function list(page, index)
  local expired = index == 'x'
  for j = 1, #page, 2 do
    local id = page[j]
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
      out[#out + 1] = index
      out[#out + 1] = itos(tonumber(page[j + 1]))
    end
  end
end
local listed = 0
if offset < live then
  local page = redis.call('ZRANGE', W.b, offset, offset + size - 1, 'WITHSCORES')
  list(page, 'l')
  listed = #page / 2
end
if listed < size and expired_count > 0 then
  local from = math.max(0, offset - live)
  list(redis.call('ZRANGE', xh, from, from + size - listed - 1, 'WITHSCORES'), 'x')
end
return out
