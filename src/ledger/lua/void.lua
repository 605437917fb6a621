-- void: undo a gateway charge whose answer was lost (a check answered `unavailable` after
-- its deadline while the charge may still run late; docs/ARCHITECTURE.md "Voids").
-- ARGV 8 account ("" = by API key), 9 the charge's idempotency key, 10 the charge's
-- request digest (the debit's or the hold's, exactly as it was sent; either form of a
-- priced one and its attempt mark, as lib.lua recall reads them), 11 the void's own idempotency key, 12 its
-- digest, 13 metadata of the void's event, 14 most lots per wallet; by API key 15 the
-- key id, 16 the presented key's SHA-256 (the key's account, whether the key was revoked
-- or bound to a member since: the charge was its account's).
-- Finds the charge's idempotency record (lib.lua recall) and:
--   a debit ("OK|event_id|...") -> refunds what is left of it (lib.lua refund_charge; a
--     refund event of operation "void"), gives it back to the budgets it was counted in
--     (lib.lua budgets_undo_debit) and forgets the record, so a retry of the request
--     is charged afresh: "OK|VOIDED_DEBIT|refund_event_id|charge_id|refunded|available";
--   a hold ("OK|event_id|hold_id|...") still open -> releases it and forgets the record:
--     "OK|RELEASED_HOLD|hold_id|release_event_id|released";
--   a record another attempt of the request made (it holds an attempt mark, and not this
--     charge's: the charge this void undoes only replayed it) -> "OK|NONE|other_attempt";
--     a record without a mark (made by an older tollgate) is taken for this attempt's;
--   no record (or a fence) -> records a fence for this attempt (lib.lua fence_field,
--     VOID_FENCE): its charge, should it still come, charges nothing: "OK|NONE|no_charge"
--     (a marked attempt is fenced off for other_request and other_attempt too);
--   anything else changes nothing: "OK|NONE|why" (why: other_request, refused,
--     hold_ended, charge_gone, refunded, unknown_key).
-- Recorded under the void's own key, so a retried void replays its answer and never
-- touches a later charge of the same request. "LOT_LIMIT|max", "BALANCE_LIMIT" and
-- "EXPIRY_BACKLOG" change and record nothing (the refund could not be made).
if not initialized() then
  return { 0, 'LEDGER_NOT_INITIALIZED' }
end
local acct = ARGV[8]
if ARGV[15] then
  local k = redis.call('HMGET', TAG .. ':k:' .. ARGV[15], 'a', 's')
  if not k[1] or k[2] ~= ARGV[16] then
    -- No such key (or another secret): no charge of it to find.
    return { 0, 'OK|NONE|unknown_key' }
  end
  acct = k[1]
end
local vkey = idem_key(acct, ARGV[11])
local prior = recall(vkey, ARGV[12])
if prior then
  return prior
end
local ckey = idem_key(acct, ARGV[9])
local charge, held_mark = recall(ckey, ARGV[10])
local own_mark = string.sub(ARGV[10], 33, 40)
local answer
-- This attempt's charge, should it still come (it may run after the void: another
-- connection), charges nothing (lib.lua fence_field, recall_charge); another attempt of
-- the request, with a mark of its own, is charged.
local function fence()
  remember(fence_field(acct, ARGV[9], own_mark), ARGV[10], VOID_FENCE)
end
if not charge or charge[2] == VOID_FENCE then
  fence()
  answer = 'OK|NONE|no_charge'
elseif charge[1] == 0 then
  -- The key's record is another request's (IDEMPOTENCY_KEY_REUSED): not this charge.
  if own_mark ~= '' then
    fence()
  end
  answer = 'OK|NONE|other_request'
elseif held_mark and held_mark ~= own_mark then
  -- Made (or replayed) by another attempt of the request, one that may have been
  -- answered: it stays. This attempt's charge has not run, or only replayed it.
  if own_mark ~= '' then
    fence()
  end
  answer = 'OK|NONE|other_attempt'
else
  local eid, third = string.match(charge[2], '^OK|([^|]+)|([^|]+)|')
  if not eid then
    answer = 'OK|NONE|refused'
  elseif string.sub(third, 1, 1) == 'h' then
    local hold_id = third
    local hkey = TAG .. ':h:' .. hold_id
    local hd = redis.call('HMGET', hkey, 'a', 'w')
    if hd[1] ~= acct then
      answer = 'OK|NONE|hold_ended'
    else
      local W = open_wallet(hd[1], hd[2])
      settle_due(W)
      -- As end_hold.lua: a hold past its deadline ends by its own policy, not by the void.
      local due = redis.call('HMGET', hkey, 's', 'd')
      if due[1] == 'a' and tonumber(due[2]) and tonumber(due[2]) <= NOW then
        expire_hold(W, hold_id)
        reschedule(W)
      end
      local h = redis.call('HMGET', hkey, 'n', 'l', 's', 'o')
      if h[3] ~= 'a' then
        answer = 'OK|NONE|hold_ended'
      else
        local rid = end_hold(W, hold_id, hkey, tonumber(h[1]), h[2], 0, 'release', 'r', '', h[4] or '', ARGV[13])
        forget(ckey)
        answer = 'OK|RELEASED_HOLD|' .. hold_id .. '|' .. rid .. '|' .. h[1]
      end
    end
  else
    local C = find_charge(eid)
    if not C.c[1] then
      answer = 'OK|NONE|charge_gone'
    else
      local left = tonumber(C.c[3]) - tonumber(C.c[4])
      if left <= 0 then
        answer = 'OK|NONE|refunded'
      else
        local refunded, record = refund_charge(C, left, ARGV[14], '', 'void', ARGV[13])
        local rid, rest = string.match(refunded, '^OK|([^|]+)|[^|]+|[^|]+|(.*)$')
        if not record or not rid then
          return { 0, refunded }
        end
        -- Undone, not corrected: the budgets it was counted in get it back too (a retry
        -- is charged afresh and counted again), all the debit counted, a part refunded
        -- before included (a refund gives no budget back: the charge stood then).
        budgets_undo_debit(open_wallet(C.c[1], C.c[2]), C.c[6] or '', eid, tonumber(C.c[3]))
        forget(ckey)
        local available = string.match(rest, '^([^|]+)')
        answer = 'OK|VOIDED_DEBIT|' .. rid .. '|' .. eid .. '|' .. itos(left) .. '|' .. available
      end
    end
  end
end
remember(vkey, ARGV[12], answer)
return { 0, answer }
