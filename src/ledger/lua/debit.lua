-- debit: charge now. ARGV 8 account, 9 wallet, 10 idempotency key, 11 digest,
-- 12 amount, 13 operation, 14 metadata.
-- Answers "OK|event_id|amount|available|held" or "INSUFFICIENT_CREDITS|required|available".
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
if outbox_full() then
  return { 0, 'OUTBOX_FULL' }
end
local W = open_wallet(ARGV[8], ARGV[9])
settle_due(W)
local answer
if W.r < amount then
  answer = 'INSUFFICIENT_CREDITS|' .. itos(amount) .. '|' .. itos(W.r)
else
  local lots = draw(W, amount, false)
  if not lots then
    return redis.error_reply('TG_INVARIANT lots do not cover the available balance')
  end
  W.r = redis.call('HINCRBY', W.w, 'r', -amount)
  redis.call('HINCRBY', W.w, 'u', amount)
  local eid = emit(W, 'debit', amount, lots, '', '', '', ARGV[10], ARGV[13], ARGV[14])
  record_charge(W, eid, amount, lots)
  answer = 'OK|' .. eid .. '|' .. itos(amount) .. '|' .. itos(W.r) .. '|' .. itos(W.h)
end
remember(ikey, ARGV[11], answer)
return { 0, answer }
