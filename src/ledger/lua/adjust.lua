-- adjust: signed admin correction. ARGV 8 account, 9 wallet, 10 idempotency key,
-- 11 digest, 12 amount (non-zero, signed), 13 description, 14 metadata, 15 most lots per
-- wallet, 16 most wallets per account, 17 priority, 18 expires_at_ms (0 = never).
-- A positive adjustment adds a lot of kind "adjustment"; a negative one draws from the
-- lots in burn order and never drives the available balance below zero.
-- Answers "OK|event_id|lot_id|available", "INSUFFICIENT_CREDITS|required|available",
-- "EXPIRES_IN_PAST|now_ms", "LOT_LIMIT|max", "WALLET_LIMIT|max" or "EXPIRY_BACKLOG"
-- (debit.lua; nothing recorded).
if not initialized() then
  return { 0, 'LEDGER_NOT_INITIALIZED' }
end
local ikey = idem_key(ARGV[8], ARGV[10])
local prior = recall(ikey, ARGV[11])
if prior then
  return prior
end
local amount = tonumber(ARGV[12])
local bad = check_credits(amount < 0 and -amount or amount, false)
if bad then
  return bad
end
local exp = tonumber(ARGV[18])
if amount > 0 and exp ~= 0 and exp <= NOW then
  return { 0, 'EXPIRES_IN_PAST|' .. itos(NOW) }
end
local W = open_wallet(ARGV[8], ARGV[9])
settle_due(W)
if amount > 0 and not fits(W, amount, 'j') then
  return { 0, 'BALANCE_LIMIT' }
end
-- The lot cap counts lots that overdue holds hold whole, the balance leaves out what
-- they hold (lib.lua decide).
local answer = decide(W, function()
  if amount > 0 then
    if redis.call('ZCARD', W.b) >= tonumber(ARGV[15]) then
      return 'LOT_LIMIT|' .. ARGV[15], true
    elseif wallet_set_refuses(ARGV[8], ARGV[9], ARGV[16]) then
      return 'WALLET_LIMIT|' .. ARGV[16], false
    end
  elseif W.r < -amount then
    return 'INSUFFICIENT_CREDITS|' .. itos(-amount) .. '|' .. itos(W.r), true
  end
  return nil, false
end)
if answer == EXPIRY_BACKLOG then
  return { 0, answer }
end
if answer then
  -- A refusal: recorded below.
elseif amount > 0 then
  join_wallet_set(ARGV[8], ARGV[9])
  local id, piece = add_lot(W, amount, 'adjustment', tonumber(ARGV[17]), exp, ARGV[13])
  redis.call('HINCRBY', W.w, 'j', amount)
  local eid = emit(W, 'adjust', amount, piece, 'adjustment|' .. ARGV[13], '', '', ARGV[10], '', ARGV[14])
  answer = 'OK|' .. eid .. '|' .. id .. '|' .. itos(W.r)
else
  local lots = draw(W, -amount, false)
  if not lots then
    return redis.error_reply('TG_INVARIANT lots do not cover the available balance')
  end
  W.r = redis.call('HINCRBY', W.w, 'r', amount)
  redis.call('HINCRBY', W.w, 'j', amount)
  local eid = emit(W, 'adjust', amount, lots, '|' .. ARGV[13], '', '', ARGV[10], '', ARGV[14])
  answer = 'OK|' .. eid .. '||' .. itos(W.r)
end
remember(ikey, ARGV[11], answer)
return { 0, answer }
