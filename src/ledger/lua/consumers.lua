-- consumers: removes settler consumers of a consumer group on this shard's outbox that
-- have nothing pending, checked and removed in one call. XGROUP DELCONSUMER throws away
-- a consumer's pending entries, and an entry no group has pending is trimmed as settled:
-- removing a consumer that still holds one would lose its event, so the check and the
-- removal must not be split (a read landing between them would be lost).
-- ARGV 8 group, 9 consumer, 10 idle bound (ms) or '':
--   '' (a settler leaving): removes consumer ARGV 9 when it has nothing pending;
--   a number (pruning): removes every consumer but ARGV 9 that has nothing pending and
--   has not read for at least that long (XINFO CONSUMERS `idle`).
-- Returns the number of consumers removed (0 without the outbox or the group).
local group, me = ARGV[8], ARGV[9]
local bound = tonumber(ARGV[10])
if redis.call('EXISTS', OUTBOX) == 0 then
  return 0
end
local consumers = redis.pcall('XINFO', 'CONSUMERS', OUTBOX, group)
if type(consumers) ~= 'table' or consumers.err then
  return 0
end
local removed = 0
for _, c in ipairs(consumers) do
  local name, pending, idle
  for j = 1, #c - 1, 2 do
    local field = c[j]
    if field == 'name' then
      name = c[j + 1]
    elseif field == 'pending' then
      pending = tonumber(c[j + 1])
    elseif field == 'idle' then
      idle = tonumber(c[j + 1])
    end
  end
  local wanted
  if bound then
    wanted = name ~= me and idle ~= nil and idle >= bound
  else
    wanted = name == me
  end
  if name and wanted and pending == 0 then
    -- Answers the pending entries it dropped: none here.
    redis.call('XGROUP', 'DELCONSUMER', OUTBOX, group, name)
    removed = removed + 1
  end
end
return removed
