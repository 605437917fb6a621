-- debit: charge now. ARGV 8 account, 9 wallet, 10 idempotency key, 11 digest (lib.lua recall),
-- 12 amount, 13 operation, 14 metadata, 15 org member ("" = none; then ARGV 8 is the org).
-- Answers "OK|event_id|amount|available|held[|spendable]" (spendable: what the caller may
-- still spend, when an allocation or a budget bounds it more than the balance may),
-- "INSUFFICIENT_CREDITS|required|available",
-- "ALLOCATION_EXCEEDED|required|remaining", "BUDGET_EXCEEDED|which|limit|spent|resets_at_ms"
-- or "BAD_FIELD|field|why" (not a member: nothing recorded); "EXPIRY_BACKLOG" (nothing
-- recorded) for a refusal while more overdue holds are left than one call ends.
--
-- By API key (lib.lua `resolve_key`): ARGV 8 and 15 are "", ARGV 16 is the key id and 17
-- the SHA-256 of the presented key (hex). The KEY_* answers of `resolve_key`, or any
-- answer above with the key's account as a third element.
if not initialized() then
  return { 0, 'LEDGER_NOT_INITIALIZED' }
end
local acct, keyed, refused = resolve_key(16)
if refused then
  return refused
end
local ikey = idem_key(acct, ARGV[10])
local prior = recall_charge(acct, ARGV[10], ikey, ARGV[11])
if prior then
  if keyed then
    prior[3] = acct
  end
  return prior
end
local amount = tonumber(ARGV[12])
local bad = check_credits(amount, false)
if bad then
  return bad
end
if outbox_full() then
  return { 0, 'OUTBOX_FULL', keyed and acct or nil }
end
local member = ARGV[15]
local role
if member ~= '' then
  role = member_role(acct, member)
  if not role then
    return not_a_member_reply(acct)
  end
end
local W = open_wallet(acct, ARGV[9])
settle_due(W)
local remaining, budgets, answer
repeat
  -- After settle_due: an overdue hold it just ended gave the member's allocation back.
  remaining = role and alloc_remaining(acct, ARGV[9], member, role)
  budgets = (W.bg or member ~= '') and budgets_for(W, member) or nil
  answer = charge_refusal(W, amount, remaining, budgets)
  -- A refusal with overdue holds left past settle_due's batch (lib.lua settle_more):
  -- end more of them and decide again.
until not answer or not settle_more(W)
if answer and holds_overdue(W) then
  return { 0, EXPIRY_BACKLOG, keyed and acct or nil }
end
if not answer then
  local lots = draw(W, amount, false)
  if not lots then
    return redis.error_reply('TG_INVARIANT lots do not cover the available balance')
  end
  W.r = redis.call('HINCRBY', W.w, 'r', -amount)
  redis.call('HINCRBY', W.w, 'u', amount)
  if budgets then
    budgets_spend(budgets, amount)
  end
  MEMBER = member
  alloc_use(acct, ARGV[9], member, amount)
  local eid = emit(W, 'debit', amount, lots, '', '', '', ARGV[10], ARGV[13], ARGV[14])
  record_charge(W, eid, amount, lots)
  answer = 'OK|' .. eid .. '|' .. itos(amount) .. '|' .. itos(W.r) .. '|' .. itos(W.h)
  -- What the caller may still spend (lib.lua spendable_after): only when an allocation or
  -- a budget bounds it, so a plain wallet's answer (and idempotency record) stays as short.
  local spendable = spendable_after(budgets, amount, remaining and remaining - amount)
  if spendable then
    answer = answer .. '|' .. itos(math.max(0, math.min(spendable, W.r)))
  end
end
remember(ikey, ARGV[11], answer)
if keyed then
  return { 0, answer, acct }
end
return { 0, answer }
