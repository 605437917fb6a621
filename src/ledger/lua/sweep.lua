-- sweep: end what is due (lot expiry, hold deadlines) in up to ARGV[8] wallets of this
-- shard, found through the shard's due index, so idle accounts' balances are right too;
-- at most ARGV[9] lots expired and holds ended in all: Redis runs nothing else while a
-- call runs, so its length is bounded by its work, not by how much came due (the
-- sweeper calls again while the shard says more is due, see ledger/sweeper.rs).
-- Also unlinks the shard's idempotency bucket that just went out of the window (not
-- while the buckets of a previous numbering may exist: lib.lua idem_dead_bucket), and its
-- charge-record bucket that just passed the retention (UNLINK frees a large hash off
-- Redis's main thread; its own expiry would free it inline).
-- Returns { wallets visited, lots expired and holds ended, 1 when the shard still has
-- due wallets (else 0) }.
if not initialized() then
  return { 0, 0, 0 }
end
local idem_dead = idem_dead_bucket()
if idem_dead then
  redis.call('UNLINK', idem_dead, charge_dead_bucket())
else
  redis.call('UNLINK', charge_dead_bucket())
end
local due = TAG .. ':due'
local work_left = tonumber(ARGV[9])
local members = redis.call('ZRANGEBYSCORE', due, '-inf', NOW, 'LIMIT', 0, tonumber(ARGV[8]))
local visited, done = 0, 0
for j = 1, #members do
  if work_left <= 0 then
    break
  end
  visited = visited + 1
  local acct, wallet = string.match(members[j], '^([^:]+):(.+)$')
  local W = open_wallet(acct, wallet)
  if W.d and W.d <= NOW then
    local n = settle_due(W, work_left)
    done = done + n
    work_left = work_left - n
  else
    reschedule(W)
  end
end
-- A wallet left due (the work bound was reached in it or before it) or one that came
-- due past this call's page: the sweeper calls again.
local more = 0
if #redis.call('ZRANGEBYSCORE', due, '-inf', NOW, 'LIMIT', 0, 1) > 0 then
  more = 1
end
return { visited, done, more }
