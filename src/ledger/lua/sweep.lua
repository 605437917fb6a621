-- sweep: end what is due (lot expiry, hold deadlines) in up to ARGV[8] wallets of this
-- shard, found through the shard's due index, so idle accounts' balances are right too.
-- Also unlinks the shard's idempotency bucket that just went out of the window (not
-- while the buckets of a previous numbering may exist: lib.lua idem_dead_bucket), and its
-- charge-record bucket that just passed the retention (UNLINK frees a large hash off
-- Redis's main thread; its own expiry would free it inline).
-- Returns the number of wallets visited.
if not initialized() then
  return 0
end
local idem_dead = idem_dead_bucket()
if idem_dead then
  redis.call('UNLINK', idem_dead, charge_dead_bucket())
else
  redis.call('UNLINK', charge_dead_bucket())
end
local due = TAG .. ':due'
local members = redis.call('ZRANGEBYSCORE', due, '-inf', NOW, 'LIMIT', 0, tonumber(ARGV[8]))
for j = 1, #members do
  local acct, wallet = string.match(members[j], '^([^:]+):(.+)$')
  local W = open_wallet(acct, wallet)
  if W.d and W.d <= NOW then
    settle_due(W)
  else
    reschedule(W)
  end
end
return #members
