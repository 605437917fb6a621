-- grant: add a lot. ARGV 8 account, 9 wallet, 10 idempotency key, 11 digest, 12 amount,
-- 13 kind, 14 priority, 15 expires_at_ms (0 = never), 16 description, 17 metadata,
-- 18 most lots per wallet, 19 most wallets per account.
-- Answers "OK|event_id|lot_id|available", "EXPIRES_IN_PAST|now_ms",
-- "DEMO_ALREADY_GRANTED", "LOT_LIMIT|max", "WALLET_LIMIT|max", "BALANCE_LIMIT" or
-- "EXPIRY_BACKLOG" (debit.lua; nothing recorded).
if not initialized() then
  return { 0, 'LEDGER_NOT_INITIALIZED' }
end
local ikey = idem_key(ARGV[8], ARGV[10])
local prior = recall(ikey, ARGV[11])
if prior then
  return prior
end
local amount = tonumber(ARGV[12])
local bad = check_credits(amount, false)
if bad then
  return bad
end
local kind = ARGV[13]
local exp = tonumber(ARGV[15])
if exp ~= 0 and exp <= NOW then
  return { 0, 'EXPIRES_IN_PAST|' .. itos(NOW) }
end
local W = open_wallet(ARGV[8], ARGV[9])
settle_due(W)
if not fits(W, amount, 'g') then
  return { 0, 'BALANCE_LIMIT' }
end
-- The lot cap counts lots that overdue holds hold whole (lib.lua decide).
local answer = decide(W, function()
  if kind == 'demo' and redis.call('HEXISTS', W.w, 'demo') == 1 then
    return 'DEMO_ALREADY_GRANTED', false
  elseif redis.call('ZCARD', W.b) >= tonumber(ARGV[18]) then
    return 'LOT_LIMIT|' .. ARGV[18], true
  elseif wallet_set_refuses(ARGV[8], ARGV[9], ARGV[19]) then
    return 'WALLET_LIMIT|' .. ARGV[19], false
  end
  return nil, false
end)
if answer == EXPIRY_BACKLOG then
  return { 0, answer }
end
if not answer then
  join_wallet_set(ARGV[8], ARGV[9])
  if kind == 'demo' then
    redis.call('HSET', W.w, 'demo', 1)
  end
  local id, piece = add_lot(W, amount, kind, tonumber(ARGV[14]), exp, ARGV[16])
  redis.call('HINCRBY', W.w, 'g', amount)
  local eid = emit(W, 'grant', amount, piece, kind .. '|' .. ARGV[16], '', '', ARGV[10], '', ARGV[17])
  answer = 'OK|' .. eid .. '|' .. id .. '|' .. itos(W.r)
end
remember(ikey, ARGV[11], answer)
return { 0, answer }
