-- view: what an account (or an org member) sees besides balances. ARGV 8 account (or
-- org), 9 member ("" = the account itself), 10 wallet ("" = every wallet of the account).
-- Returns rows: first the member's role ("" outside an org or for a non-member), then "O"
-- when the account is an organization, "A|wallet|allocated|used|bounded(0/1)" per wallet
-- (members only) and
-- "B|which|wallet|limit|period|window_ms|spent|resets_at_ms" per budget that applies.
if not initialized() then
  return redis.error_reply('TG_NOT_INITIALIZED ledger not initialized')
end
local acct, member = ARGV[8], ARGV[9]
local wallets
if ARGV[10] ~= '' then
  wallets = { ARGV[10] }
else
  wallets = redis.call('HKEYS', TAG .. ':ws:' .. acct)
  table.sort(wallets)
end
local role = ''
if member ~= '' then
  role = member_role(acct, member) or ''
end
local out = { role }
if redis.call('EXISTS', org_key(acct)) == 1 then
  out[#out + 1] = 'O'
end
for j = 1, #wallets do
  local wallet = wallets[j]
  if role ~= '' then
    local v = redis.call('HMGET', alloc_key(acct, wallet), member, member .. ':u')
    local bounded = (v[1] or role == 'member') and '1' or '0'
    out[#out + 1] = 'A|' .. wallet .. '|' .. (v[1] or '0') .. '|' .. (v[2] or '0') .. '|' .. bounded
  end
  local W = { acct = acct, wallet = wallet, bg = redis.call('HGET', TAG .. ':w:' .. acct .. ':' .. wallet, 'bg') }
  local budgets = budgets_for(W, role ~= '' and member or '')
  for k = 1, #budgets do
    local B = budgets[k]
    local v = redis.call('HMGET', B.key, 'ws')
    out[#out + 1] = 'B|' .. B.name .. '|' .. wallet .. '|' .. itos(B.limit) .. '|' .. B.p .. '|'
      .. (v[1] or '0') .. '|' .. itos(B.spent) .. '|' .. itos(B.resets)
  end
end
return out
