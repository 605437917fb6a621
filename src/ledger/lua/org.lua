-- org: organizations, members, allocations and budgets. ARGV 8 operation (create | add |
-- remove | allocate_set | allocate_add | budget), 9 account (the org; for budget any
-- account), 10 idempotency key, 11 digest, 12 actor (owner or admin acting; "" for create
-- and budget), 13 member, 14 role, 15 wallet, 16 amount (allocation, delta or budget
-- limit; 0 removes a budget), 17 budget period (d | m | w), 18 window ms, 19 UTC offset
-- ms, 20 most wallets per account, 21 how long revoked API keys are kept (ms; see
-- revoke_keys_of), 22 most members per organization (add; see below).
-- Answers "OK|event_id|a|b" (create: created_ms; add: role; allocate: allocated|used;
-- budget: limit; add and remove: the role, then "|revoked_ms|key_id:digest|..." when the
-- change revoked keys the member made or, on a removal, keys bound to them, see below),
-- "ORG_EXISTS" or "BAD_FIELD|field|why" (nothing changed or recorded),
-- "NOT_FOUND|budget" (budget with limit 0 and no budget to remove: recorded under the
-- key, nothing changed),
-- "WALLET_LIMIT|max" (allocate, budget: a new wallet past the per-account cap;
-- recorded, nothing changed), or "MEMBER_LIMIT|max" (add: a new member when the org
-- already has the most members allowed; recorded, nothing changed).
if not initialized() then
  return { 0, 'LEDGER_NOT_INITIALIZED' }
end
local op, org, idem, digest = ARGV[8], ARGV[9], ARGV[10], ARGV[11]
local actor, member, role, wallet = ARGV[12], ARGV[13], ARGV[14], ARGV[15]
local amount = tonumber(ARGV[16])
local ikey = idem_key(org, idem)
local prior = recall(ikey, digest)
if prior then
  return prior
end
-- The actor is in the request digest: every event of the operation carries it (`ac`), so
-- that `tollgate restore` can re-derive the operation's idempotency record.
ACTOR = actor
local okey = org_key(org)
local function bad(field, why)
  return { 0, 'BAD_FIELD|' .. field .. '|' .. why }
end
-- Membership events have no wallet: the store keeps no wallet summary for them.
local NO_WALLET = { acct = org, wallet = '', r = 0, h = 0 }

local function require_admin()
  if redis.call('EXISTS', okey) == 0 then
    return bad('org_id', 'is not an organization')
  end
  local r = member_role(org, actor)
  if r ~= 'owner' and r ~= 'admin' then
    return bad('actor_id', 'must be an owner or admin of the organization')
  end
  return nil, r
end

-- A member who leaves, or loses the right to make org keys (an owner or admin made a plain
-- member), takes the keys they made with them, whatever member a key is bound to: a key
-- without a member (`mb`) charges the org balance with no allocation or member budget, and
-- a key bound to another member spends that member's allocation, so a removed admin's key
-- would go on spending either way. A member who leaves takes the keys bound to them too
-- (`left`): refused on every charge, they would still authenticate on a zero-priced route
-- as a member who is no longer one, and would come back to life with a re-add. Each live
-- one (`by` = the member, or on a removal `mb` = the member; no `r`) is revoked as
-- key_revoke.lua does, in this same call: `r` set, its id moved from the live index
-- "{tg:S}:ks:<org>" to the revoked one "{tg:S}:kr:<org>" (a sorted set by revocation
-- ms). The answer's suffix names them ("|revoked_ms|key_id:digest|..."; '' when none) so
-- the Admin API saves each revocation in the durable ledger and drops it from its
-- identity cache, as RevokeApiKey does. Keys made before keys named their maker have no
-- `by`: a demotion leaves them, a removal takes those bound to the member
-- (docs/ARCHITECTURE.md, "Organizations"). Bounded by the account's live key index
-- (gateway.keys_per_account_max). As a revocation by RevokeApiKey does, the call then
-- drops the org's keys revoked longer ago than the retention (ARGV 21;
-- gateway/lua/key_prune.lua, appended to the library), at most a few of them.
local function revoke_keys_of(maker, left)
  local index = TAG .. ':ks:' .. org
  local ids = redis.call('HKEYS', index)
  table.sort(ids)
  local revoked = ''
  for i = 1, #ids do
    local key = TAG .. ':k:' .. ids[i]
    local k = redis.call('HMGET', key, 'by', 'mb', 'r', 's')
    if not k[3] and (k[1] == maker or (left and k[2] == maker)) then
      redis.call('HSET', key, 'r', itos(NOW))
      redis.call('HDEL', index, ids[i])
      redis.call('ZADD', TAG .. ':kr:' .. org, NOW, ids[i])
      revoked = revoked .. '|' .. ids[i] .. ':' .. (k[4] or '')
    end
  end
  prune_revoked_keys(TAG, org, NOW, ARGV[21])
  if revoked == '' then
    return ''
  end
  return '|' .. itos(NOW) .. revoked
end

local answer
if op == 'create' then
  if redis.call('EXISTS', okey) == 1 then
    answer = 'ORG_EXISTS'
  else
    -- A live personal key would charge the org wallet with no member checks (a check
    -- resolves a member-less key to its account): refused until they are revoked. Before
    -- the account is an org, every key in its live index "{tg:S}:ks:<org>"
    -- (gateway/lua/key_create.lua) is personal (revoked ones are in ":kr:", but keys
    -- revoked before that index existed are still here: `r` is checked). Bounded by the
    -- keys-per-account cap (gateway.keys_per_account_max), stopping at the first live
    -- key. Not recorded, so a retry with the same idempotency key after the revocation
    -- makes the org.
    local ids = redis.call('HKEYS', TAG .. ':ks:' .. org)
    for i = 1, #ids do
      local k = redis.call('HMGET', TAG .. ':k:' .. ids[i], 'a', 'r')
      if k[1] and not k[2] then
        return bad('org_id', 'has live personal API keys: revoke them (ListApiKeys, '
          .. 'RevokeApiKey) before making the account an organization')
      end
    end
    redis.call('HSET', okey, 'c', NOW, 'm:' .. member, 'owner')
    MEMBER = member
    local eid = emit(NO_WALLET, 'member', 0, '', 'owner', '', '', idem, 'create', '')
    answer = 'OK|' .. eid .. '|' .. itos(NOW)
  end
elseif op == 'add' or op == 'remove' then
  local refused, actor_role = require_admin()
  if refused then
    return refused
  end
  local current = member_role(org, member)
  -- An org always keeps an owner: only an owner can make one.
  local function last_owner()
    local owners = 0
    local all = redis.call('HGETALL', okey)
    for j = 2, #all, 2 do
      if all[j] == 'owner' then
        owners = owners + 1
      end
    end
    return owners <= 1
  end
  if op == 'add' then
    if (role == 'owner' or current == 'owner') and actor_role ~= 'owner' then
      return bad('actor_id', 'only an owner may add or change an owner')
    end
    if current == 'owner' and role ~= 'owner' and last_owner() then
      return bad('role', 'the last owner of the organization cannot be demoted')
    end
    -- The member cap (ledger.members_per_org_max) bounds what reads the whole org record:
    -- ListMembers' pages, last_owner, wallet_set_refuses. Only a new member counts: a
    -- role change never grows the record. The record holds `c` and one `m:` field per
    -- member, so HLEN - 1 members (O(1)). An org above the cap (a lowered cap, a restore
    -- of a longer history) keeps its members: it only takes no new one until removals
    -- bring it below. Recorded like WALLET_LIMIT: a retry with the same key gets the same
    -- answer.
    if not current and redis.call('HLEN', okey) - 1 >= tonumber(ARGV[22]) then
      answer = 'MEMBER_LIMIT|' .. ARGV[22]
      remember(ikey, digest, answer)
      return { 0, answer }
    end
    redis.call('HSET', okey, 'm:' .. member, role)
  else
    if not current then
      return bad('member_id', 'is not a member of the organization')
    end
    if current == 'owner' then
      if actor_role ~= 'owner' then
        return bad('actor_id', 'only an owner may remove an owner')
      end
      if last_owner() then
        return bad('member_id', 'is the last owner of the organization')
      end
    end
    redis.call('HDEL', okey, 'm:' .. member)
    role = 'removed'
  end
  MEMBER = member
  local eid = emit(NO_WALLET, 'member', 0, '', role, '', '', idem, op, '')
  local revoked = ''
  if op == 'remove' or (role == 'member' and (current == 'owner' or current == 'admin')) then
    revoked = revoke_keys_of(member, op == 'remove')
  end
  if op == 'remove' then
    -- A member who leaves leaves no allocation or budget behind: in each org wallet (the
    -- wallet set, bounded by the per-account wallet cap; allocations and budgets join
    -- it) their allocation and their budget go, each with its event (operation
    -- "remove"), so the settler, reconcile and restore drop them too. Re-added, the
    -- member has neither until an owner or admin sets them again. What they used
    -- (`<member>:u`) stays: their open holds and refundable charges still give back to
    -- it, and resetting it would let those give-backs lift a later allocation
    -- (docs/ARCHITECTURE.md, "Organizations").
    local wallets = redis.call('HKEYS', TAG .. ':ws:' .. org)
    table.sort(wallets)
    for j = 1, #wallets do
      local wallet = wallets[j]
      local akey = alloc_key(org, wallet)
      local allocated = redis.call('HGET', akey, member)
      local bkey = TAG .. ':bg:' .. org .. ':' .. wallet .. ':' .. member
      local b = redis.call('HMGET', bkey, 'l', 'p', 'ws', 'z')
      if allocated or b[1] then
        local W = open_wallet(org, wallet)
        if allocated then
          redis.call('HDEL', akey, member)
          emit(W, 'allocate', 0, '', itos(-tonumber(allocated)), '', '', idem, 'remove', '')
        end
        if b[1] then
          redis.call('DEL', bkey)
          emit(W, 'budget', 0, '', (b[2] or '') .. '|' .. (b[3] or '0') .. '|' .. (b[4] or '0'),
            '', '', idem, 'remove', '')
        end
      end
    end
  end
  answer = 'OK|' .. eid .. '|' .. role .. revoked
elseif op == 'allocate_set' or op == 'allocate_add' then
  local refused, actor_role = require_admin()
  if refused then
    return refused
  end
  local target = member_role(org, member)
  if not target then
    return bad('member_id', 'is not a member of the organization')
  end
  -- An admin setting an owner's allocation (to 0, say) would freeze the owner: only an
  -- owner acts on an owner, as in add.
  if target == 'owner' and actor_role ~= 'owner' then
    return bad('actor_id', "only an owner may change an owner's allocation")
  end
  local akey = alloc_key(org, wallet)
  local v = redis.call('HMGET', akey, member, member .. ':u')
  local before = tonumber(v[1]) or 0
  local allocated = amount
  if op == 'allocate_add' then
    allocated = before + amount
    if allocated < 0 then
      return bad('delta', 'would make the allocation negative (allocated ' .. itos(before) .. ')')
    end
  end
  if allocated > MAX_CREDITS then
    return bad(op == 'allocate_add' and 'delta' or 'amount', 'allocation out of range')
  end
  -- An allocated wallet is one of the org's wallets, as a budgeted one is: within the
  -- per-account cap, and in the wallet set that GetBalance (view.lua, balance.lua) walks.
  -- A wallet allocated before allocations joined the set is let in past the cap, so that
  -- its allocations can still be changed and cleared. Only a wallet with an allocation:
  -- one whose record keeps only what members used (a removal takes their allocations) may
  -- have left the set dead (lib.lua wallet_set_refuses), and comes back within the cap.
  if redis.call('HEXISTS', TAG .. ':ws:' .. org, wallet) == 0 and not has_allocation(akey)
    and wallet_set_refuses(org, wallet, ARGV[20]) then
    answer = 'WALLET_LIMIT|' .. ARGV[20]
    remember(ikey, digest, answer)
    return { 0, answer }
  end
  join_wallet_set(org, wallet)
  redis.call('HSET', akey, member, allocated)
  local W = open_wallet(org, wallet)
  MEMBER = member
  local eid = emit(W, 'allocate', allocated, '', itos(allocated - before), '', '', idem, op, '')
  answer = 'OK|' .. eid .. '|' .. itos(allocated) .. '|' .. itos(tonumber(v[2]) or 0)
elseif op == 'budget' then
  local bkey = TAG .. ':bg:' .. org .. ':' .. wallet
  if member ~= '' then
    if redis.call('EXISTS', okey) == 0 then
      return bad('account_id', 'is not an organization (member_id names an org member)')
    end
    if not member_role(org, member) then
      return bad('member_id', 'is not a member of the organization')
    end
    bkey = bkey .. ':' .. member
  end
  if amount == 0 and redis.call('EXISTS', bkey) == 0 then
    -- No budget to remove: nothing changes (no event, no wallet). The answer is kept
    -- under the key, so that a retry (its first answer lost) cannot remove a budget set
    -- since by someone else.
    answer = 'NOT_FOUND|budget'
    remember(ikey, digest, answer)
    return { 0, answer }
  end
  local W = open_wallet(org, wallet)
  if wallet_set_refuses(org, wallet, ARGV[20]) then
    answer = 'WALLET_LIMIT|' .. ARGV[20]
    remember(ikey, digest, answer)
    return { 0, answer }
  end
  join_wallet_set(org, wallet)
  local spec = ARGV[17] .. '|' .. ARGV[18] .. '|' .. ARGV[19]
  if amount == 0 then
    redis.call('DEL', bkey)
    if member == '' then
      redis.call('HDEL', W.w, 'bg')
    end
  else
    local old = redis.call('HMGET', bkey, 'p', 'ws', 'z')
    local fresh = not old[1]
    -- A rolling window has no calendar: its offset (non-zero only in budgets set before it
    -- was refused) is no part of its definition.
    local offset_changed = ARGV[17] ~= 'w' and old[3] ~= ARGV[19]
    if old[1] and (old[1] ~= ARGV[17] or old[2] ~= ARGV[18] or offset_changed) then
      redis.call('DEL', bkey)
      fresh = true
    end
    redis.call('HSET', bkey, 'l', amount, 'p', ARGV[17], 'ws', ARGV[18], 'z', ARGV[19])
    if fresh then
      -- A new budget: holds counted in an earlier one give nothing back to it.
      local stamp = next_seq()
      redis.call('HSET', bkey, 'c', itos(stamp))
      -- After a restore the sequence runs up to ~16 minutes ahead of the clock (past the
      -- lost Redis's hold ids): such a stamp says nothing of when the budget was made,
      -- and a void would take every debit for older than the budget. Its ms is kept.
      local made_ms = real_now()
      if stamp >= (made_ms + 1) * 1000 then
        redis.call('HSET', bkey, 'cm', itos(made_ms))
      end
    end
    if member == '' then
      redis.call('HSET', W.w, 'bg', 1)
    end
  end
  MEMBER = member
  local eid = emit(W, 'budget', amount, '', spec, '', '', idem, 'budget', '')
  answer = 'OK|' .. eid .. '|' .. itos(amount)
else
  return redis.error_reply('TG_BAD_OPERATION unknown org operation')
end
remember(ikey, digest, answer)
return { 0, answer }
