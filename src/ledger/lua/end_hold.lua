-- capture / release: end an open hold. ARGV 8 hold id, 9 idempotency key, 10 digest,
-- 11 "capture" | "release", 12 amount to capture (-1 = all that is held), 13 metadata.
-- Answers "OK|event_id|captured|returned|available|held",
-- "HOLD_ENDED|captured|released|expired|captured_amount", "NOT_FOUND|hold" or
-- "AMOUNT_EXCEEDS_HOLD|held".
if not initialized() then
  return { 0, 'LEDGER_NOT_INITIALIZED' }
end
local hold_id = ARGV[8]
local hkey = TAG .. ':h:' .. hold_id
local hd = redis.call('HMGET', hkey, 'a', 'w')
if not hd[1] then
  return { 0, 'NOT_FOUND|hold' }
end
local ikey = idem_key(hd[1], ARGV[9])
local prior = recall(ikey, ARGV[10])
if prior then
  return prior
end
local W = open_wallet(hd[1], hd[2])
-- An overdue hold ends by its on_expiry policy here, before this request sees it.
settle_due(W)
-- settle_due ends at most DUE_HOLDS_MAX overdue holds a call: this one may be past its
-- deadline still. End it by its policy too, so no hold is captured or released late.
local due = redis.call('HMGET', hkey, 's', 'd')
if due[1] == 'a' and tonumber(due[2]) and tonumber(due[2]) <= NOW then
  expire_hold(W, hold_id)
  reschedule(W)
end
local h = redis.call('HMGET', hkey, 'n', 'l', 's', 'q', 'o')
local amount = tonumber(h[1])
local answer
if h[3] ~= 'a' then
  local how = 'expired'
  if h[3] == 'c' then
    how = 'captured'
  elseif h[3] == 'r' then
    how = 'released'
  end
  answer = 'HOLD_ENDED|' .. how .. '|' .. (h[4] or '0')
  -- The record must outlive this answer, or a retry of it would find no hold at all.
  redis.call('PEXPIRE', hkey, itos(idem_life_ms()), 'GT')
else
  local capture = 0
  if ARGV[11] == 'capture' then
    capture = tonumber(ARGV[12])
    if capture == -1 then
      capture = amount
    end
    local bad = check_credits(capture, true)
    if bad then
      return bad
    end
    if capture > amount then
      return { 0, 'AMOUNT_EXCEEDS_HOLD|' .. itos(amount) }
    end
  end
  local state = ARGV[11] == 'capture' and 'c' or 'r'
  local eid, lapsed = end_hold(W, hold_id, hkey, amount, h[2], capture, ARGV[11], state, ARGV[9], h[5] or '', ARGV[13])
  answer = 'OK|' .. eid .. '|' .. itos(capture) .. '|' .. itos(amount - capture) .. '|' .. itos(W.r) .. '|' .. itos(W.h) .. '|' .. itos(lapsed)
end
remember(ikey, ARGV[10], answer)
return { 0, answer }
