-- balance: per-wallet totals after ending whatever is due. ARGV 8 account, 9 wallet
-- ("" = every wallet of the account). Returns a flat array, per wallet:
-- wallet, available, held, granted, used, expired, refunded, adjusted.
if not initialized() then
  return redis.error_reply('TG_NOT_INITIALIZED ledger not initialized')
end
local wallets
if ARGV[9] ~= '' then
  wallets = { ARGV[9] }
else
  wallets = redis.call('HKEYS', TAG .. ':ws:' .. ARGV[8])
  table.sort(wallets)
end
local out = {}
for j = 1, #wallets do
  local W = open_wallet(ARGV[8], wallets[j])
  settle_due(W)
  -- A backlog of overdue holds past settle_due's batch: shown ended, up to the call's
  -- bound (lib.lua settle_more); past it they still count as held until ended.
  while settle_more(W) do
  end
  local v = redis.call('HMGET', W.w, 'r', 'h', 'g', 'u', 'xp', 'f', 'j')
  out[#out + 1] = wallets[j]
  for k = 1, 7 do
    out[#out + 1] = v[k] or '0'
  end
end
return out
