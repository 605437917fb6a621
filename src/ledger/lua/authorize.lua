-- authorize: place a hold. ARGV 8 account, 9 wallet, 10 idempotency key, 11 digest (lib.lua recall),
-- 12 amount, 13 ttl_ms, 14 on_expiry ("c" capture | "r" release), 15 operation,
-- 16 metadata, 17 most open holds per wallet, 18 org member ("" = none; see debit.lua).
-- Answers "OK|event_id|hold_id|amount|expires_at_ms|available|held[|spendable]" (spendable
-- as in debit.lua), "INSUFFICIENT_CREDITS|required|available", "HOLD_LIMIT|max", or as
-- debit.lua for allocations, budgets, members and EXPIRY_BACKLOG. A hold counts in the allocation and the
-- budgets at once; what it does not charge goes back when it ends.
-- By API key as debit.lua: ARGV 8 and 18 are "", ARGV 19 the key id, 20 the key's SHA-256.
-- A priced hold (a gateway check) keeps its idempotency record's field as 'ik': when the
-- hold ends having charged nothing the record is forgotten (lib.lua end_hold), and a
-- retry (same request id) places a new hold instead of replaying the ended one.
if not initialized() then
  return { 0, 'LEDGER_NOT_INITIALIZED' }
end
local acct, keyed, refused = resolve_key(19)
if refused then
  return refused
end
local ikey = idem_key(acct, ARGV[10])
-- A priced hold (a gateway check's; its digest has both forms, lib.lua recall) is
-- charged afresh when retried after its hold ended without charging anything.
local priced = #ARGV[11] > 16
local prior = recall_charge(acct, ARGV[10], ikey, ARGV[11])
if prior and priced and prior[1] == 1 then
  local hold_id = string.match(prior[2], '^OK|[^|]+|([^|]+)|')
  local hkey = hold_id and TAG .. ':h:' .. hold_id
  local h = hkey and redis.call('HMGET', hkey, 'a', 'w', 's', 'd', 'q') or {}
  if h[1] == acct then
    if h[3] == 'a' and tonumber(h[4]) and tonumber(h[4]) <= NOW then
      -- Past its deadline, not ended yet: it ends by its own policy first (as in
      -- end_hold.lua), so a retry is not handed a hold that settles nothing.
      local HW = open_wallet(h[1], h[2])
      settle_due(HW)
      if redis.call('HGET', hkey, 's') == 'a' then
        expire_hold(HW, hold_id)
        reschedule(HW)
      end
      h[3], h[5] = unpack(redis.call('HMGET', hkey, 's', 'q'))
    end
    if h[3] ~= 'a' and tonumber(h[5]) == 0 then
      -- Ended without a charge (lib.lua end_hold forgot the record already unless the
      -- hold predates its 'ik': placed by an older tollgate, or restored).
      forget_hold_record(ikey, hold_id)
      prior = recall_charge(acct, ARGV[10], ikey, ARGV[11])
    end
  end
end
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
local member = ARGV[18]
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
  if not answer and redis.call('ZCARD', W.hw) >= tonumber(ARGV[17]) then
    answer = 'HOLD_LIMIT|' .. ARGV[17]
  end
  -- A refusal with overdue holds left past settle_due's batch (lib.lua settle_more):
  -- end more of them and decide again.
until not answer or not settle_more(W)
if answer and holds_overdue(W) then
  return { 0, EXPIRY_BACKLOG, keyed and acct or nil }
end
if not answer then
  local lots = draw(W, amount, true)
  if not lots then
    return redis.error_reply('TG_INVARIANT lots do not cover the available balance')
  end
  W.r = redis.call('HINCRBY', W.w, 'r', -amount)
  W.h = redis.call('HINCRBY', W.w, 'h', amount)
  local hold_id = 'h' .. SHARD .. '-' .. itos(next_seq())
  local deadline = NOW + tonumber(ARGV[13])
  redis.call('HSET', TAG .. ':h:' .. hold_id, 'a', acct, 'w', ARGV[9], 'n', amount, 'l', lots,
    'd', deadline, 'e', ARGV[14], 's', 'a', 'o', ARGV[15])
  if priced then
    -- Its check's idempotency record (lib.lua end_hold forgets it if it ends uncharged).
    redis.call('HSET', TAG .. ':h:' .. hold_id, 'ik', ikey)
  end
  local refs = budgets and budgets_spend(budgets, amount) or ''
  if member ~= '' or refs ~= '' then
    redis.call('HSET', TAG .. ':h:' .. hold_id, 'mb', member, 'bg', refs)
  end
  MEMBER = member
  alloc_use(acct, ARGV[9], member, amount)
  redis.call('ZADD', W.hw, deadline, hold_id)
  schedule(W, deadline)
  local eid = emit(W, 'hold', amount, lots, ARGV[14] .. itos(deadline), hold_id, '', ARGV[10], ARGV[15], ARGV[16])
  answer = 'OK|' .. eid .. '|' .. hold_id .. '|' .. itos(amount) .. '|' .. itos(deadline) .. '|'
    .. itos(W.r) .. '|' .. itos(W.h)
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
