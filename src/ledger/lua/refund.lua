-- refund: return credits a charge (debit or capture) took. ARGV 8 charge id (its event id),
-- 9 idempotency key, 10 digest, 11 amount, 12 metadata, 13 most lots per wallet.
-- Credits go back to new lots of kind "refund" that keep the priority and expiry of the
-- lots the charge drew from; credits whose lot has expired since expire at once, as they
-- would have had the charge never happened (lib.lua refund_charge).
-- Answers "OK|event_id|refunded|refunded_total|available|expired",
-- "REFUND_EXCEEDS_CHARGE|refundable", "LOT_LIMIT|max" (the new lots would pass the
-- wallet's lot cap), "NOT_FOUND|charge" or "EXPIRY_BACKLOG" (debit.lua; nothing recorded).
if not initialized() then
  return { 0, 'LEDGER_NOT_INITIALIZED' }
end
local charge_id = ARGV[8]
-- c: account, wallet, amount, refunded, lots, member (lib.lua "Charge records").
local C = find_charge(charge_id)
local c = C.c
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
local answer, record = refund_charge(C, amount, ARGV[13], ARGV[9], '', ARGV[12])
if not record then
  return { 0, answer }
end
remember(ikey, ARGV[10], answer)
redis.call('SET', rkey, c[1], 'PX', itos(idem_life_ms()))
return { 0, answer }
