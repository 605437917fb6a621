-- refund: return credits a charge (debit or capture) took. ARGV 8 charge id (its event id),
-- 9 idempotency key, 10 digest, 11 amount, 12 metadata, 13 most lots per wallet.
-- Credits go back to new lots of kind "refund" that keep the priority and expiry of the
-- lots the charge drew from; credits whose lot has expired since expire at once, as they
-- would have had the charge never happened.
-- Answers "OK|event_id|refunded|refunded_total|available|expired",
-- "REFUND_EXCEEDS_CHARGE|refundable", "LOT_LIMIT|max" (the new lots would pass the
-- wallet's lot cap), "NOT_FOUND|charge" or "EXPIRY_BACKLOG" (debit.lua; nothing recorded).
if not initialized() then
  return { 0, 'LEDGER_NOT_INITIALIZED' }
end
local charge_id = ARGV[8]
-- c: account, wallet, amount, refunded, lots, member (lib.lua "Charge records").
local bucket = charge_bucket(charge_id)
local packed = bucket and redis.call('HGET', bucket, charge_id)
local legacy = TAG .. ':c:' .. charge_id
local c
if packed then
  local a, w, n, f, mb, l = string.match(packed, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$')
  c = { a, w, n, f, l, mb }
else
  c = redis.call('HMGET', legacy, 'a', 'w', 'n', 'f', 'l', 'mb')
end
-- "{tg:S}:rf:<charge id>" = the charge's account, for as long as a refund's answer lives:
-- a retry finds its answer even when the charge record expired after the refund.
local rkey = TAG .. ':rf:' .. charge_id
if not c[1] then
  local acct = redis.call('GET', rkey)
  local prior = acct and recall(idem_key(acct, ARGV[9]), ARGV[10])
  if prior then
    return prior
  end
  return { 0, 'NOT_FOUND|charge' }
end
local ikey = idem_key(c[1], ARGV[9])
local prior = recall(ikey, ARGV[10])
if prior then
  return prior
end
local amount = tonumber(ARGV[11])
local bad = check_credits(amount, false)
if bad then
  return bad
end
local W = open_wallet(c[1], c[2])
settle_due(W)
local charged = tonumber(c[3])
local done = tonumber(c[4])
local answer
if amount > charged - done then
  answer = 'REFUND_EXCEEDS_CHARGE|' .. itos(charged - done)
else
  -- Walk the charge's lots from the last drawn, past what earlier refunds returned.
  local pieces = {}
  for piece in string.gmatch(c[5], '[^,]+') do
    pieces[#pieces + 1] = piece
  end
  local skip, need, expired = done, amount, 0
  local scores, amounts = {}, {}
  for k = #pieces, 1, -1 do
    local _, a, score = string.match(pieces[k], '^([^:]+):(%d+):(%d+)$')
    a = tonumber(a)
    local s = skip < a and skip or a
    skip = skip - s
    a = a - s
    local take = need < a and need or a
    if take > 0 then
      need = need - take
      local exp = lot_expiry(tonumber(score))
      if exp ~= 0 and exp <= NOW then
        expired = expired + take
      else
        local found = false
        for g = 1, #scores do
          if scores[g] == score then
            amounts[g] = amounts[g] + take
            found = true
          end
        end
        if not found then
          scores[#scores + 1] = score
          amounts[#amounts + 1] = take
        end
      end
    end
  end
  -- Credits whose lot has expired go straight to expired, not back into the balance.
  if W.r + W.h + amount - expired > MAX_CREDITS
    or (tonumber(redis.call('HGET', W.w, 'f')) or 0) + amount > MAX_CREDITS then
    return { 0, 'BALANCE_LIMIT' }
  end
  -- The lot cap counts lots that overdue holds hold whole (lib.lua decide).
  answer = decide(W, function()
    if #scores > 0 and redis.call('ZCARD', W.b) + #scores > tonumber(ARGV[13]) then
      return 'LOT_LIMIT|' .. ARGV[13], true
    end
    return nil, false
  end)
  if answer == EXPIRY_BACKLOG then
    return { 0, answer }
  end
  if not answer then
    local created = {}
    for g = 1, #scores do
      local score = tonumber(scores[g])
      local _, piece = add_lot(W, amounts[g], 'refund', math.floor(score / PRIO_UNIT), lot_expiry(score), 'refund of ' .. charge_id)
      created[#created + 1] = piece
    end
    if expired > 0 then
      redis.call('HINCRBY', W.w, 'xp', expired)
    end
    redis.call('HINCRBY', W.w, 'f', amount)
    local total
    if packed then
      total = tonumber(c[4]) + amount
      redis.call('HSET', bucket, charge_id, charge_value(c[1], c[2], tonumber(c[3]), total, c[6], c[5]))
    else
      total = redis.call('HINCRBY', legacy, 'f', amount)
    end
    -- A refund of a member's charge gives the member's allocation back.
    MEMBER = c[6] or ''
    alloc_use(c[1], c[2], MEMBER, -amount)
    local eid = emit(W, 'refund', amount, table.concat(created, ','), itos(expired), '', charge_id, ARGV[9], '', ARGV[12])
    answer = 'OK|' .. eid .. '|' .. itos(amount) .. '|' .. itos(total) .. '|' .. itos(W.r) .. '|' .. itos(expired)
  end
end
remember(ikey, ARGV[10], answer)
redis.call('SET', rkey, c[1], 'PX', itos(idem_life_ms()))
return { 0, answer }
