-- tollgate ledger library: loaded once as a Redis function library (FUNCTION LOAD), with
-- each script of this directory registered as one function after it (src/ledger/library.rs).
--
-- Shared ARGV layout of every script (the rest is per script, from ARGV[8]):
--   1 now_ms override (0 = read Redis TIME)   2 shard hash tag, e.g. "{tg:3}"
--   3 shard number                            4 idempotency window (ms)
--   5 retention of ended holds (ms)           6 retention of charge records (ms)
--   7 outbox bound in entries (0 = unbounded)
-- KEYS[1] is always the shard's outbox stream, so every key the script touches shares
-- its hash tag (cluster-safe: all other key names are built from ARGV[2], the same tag).
--
-- Numbers: Lua numbers are doubles. Every amount is an integer <= 2^53-1, exact in a
-- double; numbers are turned into strings only with itos() ("%d"), never with "..",
-- which would print 14 significant digits.

local NEVER = 4398046511103     -- 2^42 - 1: expiry part of the burn score of a lot that never expires
local PRIO_UNIT = 4398046511104 -- 2^42: burn score = priority * 2^42 + (expires_at_ms or NEVER)
local MAX_CREDITS = 9007199254740991
-- Format version of the ledger events this code writes (src/ledger/event.rs reads every
-- version it knows; an entry without the field is version 1).
local EVENT_VERSION = 1
local DRAW_PAGE = 8             -- lots read per ZRANGE while drawing
-- Overdue holds settle_due ends per wallet in one call: each costs ~15 Redis commands and
-- an event, ~20 us (one sweep call ending 32,768 took 662 ms), so ~5 ms for a batch. A
-- wallet with more keeps the rest overdue (a backlog) until its next touch or the
-- sweeper, unless a decision depends on them (settle_more).
local DUE_HOLDS_MAX = 256
-- Overdue holds one call ends in all when a refusal or a balance depends on the backlog
-- (settle_more): two batches, ~10 ms at the worst, paid only by such a call. Past it the
-- call answers EXPIRY_BACKLOG rather than record a refusal the backlog may have caused.
local DUE_HOLDS_CALL_MAX = 512

local function itos(n)
  return string.format('%d', n)
end

-- Per-call state: this library is loaded once (FUNCTION LOAD) and every ledger function
-- starts with begin(keys, args), which sets all of it from the call's KEYS and ARGV.
-- Nothing else at this level changes during a call, so nothing carries over to the next.
local KEYS, ARGV
local NOW, TAG, SHARD, WINDOW_MS, HOLD_RETENTION_MS, CHARGE_RETENTION_MS, OUTBOX_MAX, OUTBOX
local IDEM_SPAN_MS
-- Overdue holds this call has ended through end_overdue_holds (bounded by DUE_HOLDS_CALL_MAX).
local DUE_HOLDS_ENDED
-- The shard's stored idempotency numbering ("{tg:S}:i:span", see "Idempotency records"
-- below): its raw value as initialized() read it (false: no such key; nil: not read in
-- this call), and whether this call has parsed it yet.
local IDEM_SPAN_RAW, IDEM_NUMBERING_READ
-- The organization member an event is attributed to ("" outside an org workspace): set by
-- the scripts that act for a member, written as the event's `mb` field when not empty.
local MEMBER
-- The owner or admin acting in an org operation ("" elsewhere): set by org.lua, written as
-- the event's `ac` field when not empty. It is part of the operation's request digest, so
-- `tollgate restore` needs it to re-derive the operation's idempotency record.
local ACTOR

local function begin(keys, args)
  KEYS, ARGV = keys, args
  local forced = tonumber(ARGV[1])
  if forced and forced > 0 then
    NOW = forced
  else
    local t = redis.call('TIME')
    NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  TAG = ARGV[2]
  SHARD = ARGV[3]
  WINDOW_MS = ARGV[4]
  HOLD_RETENTION_MS = ARGV[5]
  CHARGE_RETENTION_MS = ARGV[6]
  OUTBOX_MAX = tonumber(ARGV[7])
  OUTBOX = KEYS[1]
  -- Idempotency buckets span half the window (see "Idempotency records" below).
  IDEM_SPAN_MS = math.max(1, math.floor(tonumber(WINDOW_MS) / 2))
  IDEM_SPAN_RAW = nil
  IDEM_NUMBERING_READ = false
  MEMBER = ''
  ACTOR = ''
  DUE_HOLDS_ENDED = 0
end

-- The shard's epoch marker is written when the shard is initialized (a fresh deployment or
-- `tollgate restore`). A Redis that lost its data has none: refuse rather than serve empty
-- balances as if they were real. The same MGET reads the shard's idempotency numbering
-- (same hash tag), so finding a record costs no extra call for it.
local function initialized()
  local v = redis.call('MGET', TAG .. ':epoch', TAG .. ':i:span')
  IDEM_SPAN_RAW = v[2]
  return v[1] ~= false
end

-- A debit or hold by API key (the gateway, when its identity cache misses; see debit.lua):
-- the key record "{tg:S}:k:<key id>" is in its account's shard, so the script resolves
-- the key itself. ARGV[at] is the key id (absent: a call by account, ARGV 8), ARGV[at + 1]
-- the key's SHA-256. Answers the account, whether it came from a key, and nil; or nil,
-- true and the reply that ends the script:
-- {0, "KEY_UNKNOWN"} (no such key, or another secret), {0, "KEY_REVOKED", account,
-- member or "", revoked_ms} (when it was revoked: the fail-open spool's replay charges a
-- call the key made before), or
-- {0, "KEY_MEMBER", account, member} (an org key bound to a member: the member is part of
-- the request digest, so the caller charges again with it).
local function resolve_key(at)
  local key_id = ARGV[at]
  if key_id == nil then
    return ARGV[8], false, nil
  end
  local k = redis.call('HMGET', TAG .. ':k:' .. key_id, 'a', 's', 'r', 'mb')
  if not k[1] or k[2] ~= ARGV[at + 1] then
    return nil, true, { 0, 'KEY_UNKNOWN' }
  end
  if k[3] then
    return nil, true, { 0, 'KEY_REVOKED', k[1], k[4] or '', k[3] }
  end
  if k[4] then
    return nil, true, { 0, 'KEY_MEMBER', k[1], k[4] }
  end
  return k[1], true, nil
end

local function check_credits(n, allow_zero)
  if not n or n ~= math.floor(n) or n > MAX_CREDITS or n < 0 or (n == 0 and not allow_zero) then
    return redis.error_reply('TG_BAD_AMOUNT amount out of range')
  end
  return nil
end

-- Whether adding credits keeps the wallet's balance and the given running total within
-- 2^53-1, where Lua's doubles stay exact.
local function fits(W, amount, total_field)
  local total = tonumber(redis.call('HGET', W.w, total_field)) or 0
  return W.r + W.h + amount <= MAX_CREDITS and total + amount <= MAX_CREDITS
end

local function outbox_full()
  return OUTBOX_MAX > 0 and redis.call('XLEN', OUTBOX) >= OUTBOX_MAX
end

-- Idempotency records (docs/ARCHITECTURE.md, "Idempotency records"): fields of one hash
-- per shard and time bucket, "{tg:S}:i:<bucket>", a bucket spanning half the window.
-- Field: 30 hex digits (120 bits) of SHA-1("<account>:<key>") (account ids hold no ':');
-- value: 16 hex digits of the request digest, then the answer. A gateway charge keyed by
-- a client's request id also records its attempt's mark (8 letters a-z, after the digest,
-- which it then holds in upper case; an answer starts with an upper-case code): see
-- recall and remember. A record is looked for in
-- the current bucket and the two before it, so it lives at least the window and less than
-- 1.5 windows. A hash field costs far less than a key with its own expiry (~130 B instead
-- of ~210 B per record); the sweeper unlinks dead buckets, and each bucket carries an
-- expiry a span later as a safety net.
local IDEM_BUCKETS_LOOKED_AT = 3

-- Redis's own clock, even when NOW is forced (tests): record buckets age in real time,
-- as a key's expiry would.
local function real_now()
  if tonumber(ARGV[1]) > 0 then
    local rt = redis.call('TIME')
    return tonumber(rt[1]) * 1000 + math.floor(tonumber(rt[2]) / 1000)
  end
  return NOW
end

-- The next number of the shard's sequence "{tg:S}:seq" (hold ids "h<shard>-<n>", budget
-- stamps), never below Redis's real time in ms x 1000. A hold is found by its id alone
-- (Capture, Release, HTTP settlement, the access log), so an id must never be handed out
-- twice. A Redis that rolls back with its epoch marker (a replica promoted before it got
-- the last writes, a restart from an everysec AOF or an RDB snapshot) would otherwise count
-- again from its older value and give a new hold the id of a lost one, whose late capture
-- would then end the new hold. It comes back later in time, so the floor puts its new ids
-- above all the lost ones, as long as a shard opens fewer than 1000 holds a ms and its
-- clock is not behind the lost one's by more than the failover took. Ids stay below 2^53
-- (exact in Lua's doubles) until the year 2255.
local function next_seq()
  local key = TAG .. ':seq'
  local n = redis.call('INCR', key)
  local floor = real_now() * 1000
  if n < floor then
    redis.call('SET', key, itos(floor))
    return floor
  end
  return n
end

-- The numbering of the buckets: bucket = floor(real time / span). The span follows the
-- caller's window, which an operator may change (a restart, or a rolling change with old
-- and new windows side by side), and a record must stay findable across the change. So
-- the shard stores the span in use, "{tg:S}:i:span" = "<span>" or "<span> <previous span>
-- <until>": the records of the previous numbering are still looked for until real time
-- <until> (ms). A caller whose span differs switches the numbering to its own and keeps
-- the one it replaces as the previous one, until every record made under it has died.
-- Two numberings are covered at once; a third (a window changed twice within one record
-- life) loses the oldest one's records.
-- IDEM_PREV_SPAN: the previous span while its buckets may still exist (nil otherwise);
-- IDEM_PREV_UNTIL: until when its records are looked for.
local IDEM_PREV_SPAN, IDEM_PREV_UNTIL

-- Reads (once per call) and, when needed, writes the shard's numbering. Only scripts that
-- write call it (through recall, remember, idem_dead_bucket).
local function idem_numbering()
  if IDEM_NUMBERING_READ then
    return
  end
  IDEM_NUMBERING_READ = true
  IDEM_PREV_SPAN, IDEM_PREV_UNTIL = nil, nil
  local key = TAG .. ':i:span'
  local raw = IDEM_SPAN_RAW
  if raw == nil then
    -- initialized() was not called first (every script calls it; kept safe anyway).
    raw = redis.call('GET', key)
  end
  local span, prev, untl
  if raw then
    span, prev, untl = string.match(raw, '^(%d+) (%d+) (%d+)$')
    if not span then
      span = string.match(raw, '^(%d+)$')
    end
    span, prev, untl = tonumber(span), tonumber(prev), tonumber(untl)
    if span and span < 1 then
      span = nil
    end
    if not span then
      redis.log(redis.LOG_WARNING, 'tollgate: ' .. key .. ' holds no span; set to this window\'s')
    end
  end
  if not span then
    -- A shard that never stored it: a new one, or one written by a tollgate that did not
    -- store it, and so used the numbering of its window (this one's, unless the window
    -- changed in the same upgrade).
    redis.call('SET', key, itos(IDEM_SPAN_MS))
    return
  end
  local now = real_now()
  if span ~= IDEM_SPAN_MS then
    -- The window changed: this caller's numbering becomes the current one; the one in use
    -- until now is looked for as long as a record made under it can live.
    IDEM_PREV_SPAN = span
    IDEM_PREV_UNTIL = now + IDEM_BUCKETS_LOOKED_AT * span
    redis.call('SET', key, itos(IDEM_SPAN_MS) .. ' ' .. itos(span) .. ' ' .. itos(IDEM_PREV_UNTIL))
    return
  end
  -- The previous numbering's buckets exist up to one of its spans after its records die
  -- (their expiry): until then remember() and the sweeper mind them (see there).
  if prev and prev >= 1 and untl and now < untl + prev then
    IDEM_PREV_SPAN, IDEM_PREV_UNTIL = prev, untl
  end
end

-- The bucket of this moment.
local function idem_bucket()
  return math.floor(real_now() / IDEM_SPAN_MS)
end

local function idem_key(acct, key)
  return string.sub(redis.sha1hex(acct .. ':' .. key), 1, 30)
end

-- Where a record's answer starts, and its attempt mark (nil: none). A marked record
-- (lib.lua remember) has a letter a-z after its digest; an answer starts with an
-- upper-case code ("OK|...", "INSUFFICIENT_CREDITS|..."), so an unmarked one never does.
local function record_answer_at(v)
  local c = string.byte(v, 17)
  if c and c >= 97 and c <= 122 then
    return 25, string.sub(v, 17, 24)
  end
  return 17, nil
end

-- recall's answer from bucket b and the IDEM_BUCKETS_LOOKED_AT - 1 before it (of one
-- numbering), or nil; then the record's attempt mark, if any. `also`: a second digest a
-- record of the same request may hold, or ''.
local function recall_in(field, digest, also, b)
  for age = 0, IDEM_BUCKETS_LOOKED_AT - 1 do
    local bucket = TAG .. ':i:' .. itos(b - age)
    local v = redis.call('HGET', bucket, field)
    if v then
      local at, mark = record_answer_at(v)
      local held = string.sub(v, 1, 16)
      if mark then
        -- A marked record holds its digest in upper case (see remember).
        held = string.lower(held)
      end
      if held ~= digest and held ~= also then
        return { 0, 'IDEMPOTENCY_KEY_REUSED' }
      end
      return { 1, string.sub(v, at) }, mark, bucket
    end
  end
  return nil
end

-- The record of `field`: { 1, answer } when it holds this request's digest, { 0,
-- 'IDEMPOTENCY_KEY_REUSED' } when another's, nil when there is none; then, for a record
-- of this request, the attempt mark it holds (nil: none). `digest` is 16 hex digits, or
-- 32: the request's digest, then another form of it a record may hold (a gateway
-- charge's record written before it was digested by its price inputs; Rust
-- `priced_digest`), and then, for a gateway charge keyed by a client's request id, its
-- attempt's mark (8 letters a-z). remember() records the first 16 and the mark.
local function recall(field, digest)
  local also = string.sub(digest, 17, 32)
  digest = string.sub(digest, 1, 16)
  idem_numbering()
  local now = real_now()
  local found, mark, bucket = recall_in(field, digest, also, math.floor(now / IDEM_SPAN_MS))
  if not found and IDEM_PREV_SPAN and now < IDEM_PREV_UNTIL then
    found, mark, bucket = recall_in(field, digest, also, math.floor(now / IDEM_PREV_SPAN))
  end
  if found and found[1] == 0 then
    mark = nil
  end
  return found, mark, bucket
end

-- Records `answer` under `field` with the request's digest (the first 16 hex digits of
-- `digest`: see recall) and its attempt mark when `digest` carries one (digits 33 to 40):
-- "<DIGEST><mark><answer>", the digest in upper case. A replay never writes the record
-- again, so the mark stays the attempt's that made the charge (lua/void.lua compares it),
-- but for recall_charge's flag (another attempt replayed it). The upper case makes an older tollgate, whose recall compares the digest
-- as it is, see another request's record (IDEMPOTENCY_KEY_REUSED) rather than hand the
-- mark out as part of the answer (docs/ARCHITECTURE.md "Voids").
local function remember(field, digest, answer)
  idem_numbering()
  local b = idem_bucket()
  local bucket = TAG .. ':i:' .. itos(b)
  local expires = itos((b + IDEM_BUCKETS_LOOKED_AT + 1) * IDEM_SPAN_MS)
  local mark = string.sub(digest, 33, 40)
  local value
  if string.match(mark, '^%l%l%l%l%l%l%l%l$') then
    value = string.upper(string.sub(digest, 1, 16)) .. mark .. answer
  else
    value = string.sub(digest, 1, 16) .. answer
  end
  redis.call('HSET', bucket, field, value)
  redis.call('PEXPIREAT', bucket, expires, 'NX')
  if IDEM_PREV_SPAN then
    -- Bucket numbers of the two numberings can meet (spans close to each other): a
    -- bucket the other numbering made first must not keep its shorter expiry.
    redis.call('PEXPIREAT', bucket, expires, 'GT')
  end
end

-- What a void records under the key of a charge it found no record of (lua/void.lua):
-- the charge may still be on its way (sent on another connection, or on one that was
-- replaced), and must charge nothing when it comes.
local VOID_FENCE = 'VOIDED'

-- Where a void fences off one attempt of a charge (lua/void.lua): a field of its own
-- per marked attempt ("\n" never is in a key: printable ASCII without spaces), so that
-- neither another attempt's record nor its void's forget() removes it; an unmarked
-- charge's key is its own already (a check without a client request id).
local function fence_field(acct, key, mark)
  if mark == '' then
    return idem_key(acct, key)
  end
  return idem_key(acct, key .. '\n' .. mark)
end

-- recall for a charge (debit.lua, authorize.lua; `field` is idem_key(acct, key)): an
-- attempt a void fenced off (fence_field) charges and records nothing ({ 0, 'VOIDED' });
-- any other attempt (a retry of the request, with its own mark) is not concerned by it.
-- A marked record that another attempt replays gets its mark's last letter upper-cased,
-- once: that attempt may be served by the charge, so the void of the attempt that made
-- it must leave it (lua/void.lua sees another attempt's mark).
local function recall_charge(acct, key, field, digest)
  local own = string.sub(digest, 33, 40)
  if own ~= '' then
    local fenced = recall(fence_field(acct, key, own), digest)
    if fenced and fenced[2] == VOID_FENCE then
      return { 0, VOID_FENCE }
    end
  end
  local found, mark, bucket = recall(field, digest)
  if not found then
    return nil
  end
  if found[2] == VOID_FENCE then
    -- An unmarked attempt's fence is under its key.
    if own == '' and not mark then
      return { 0, VOID_FENCE }
    end
    return nil
  end
  if mark and mark ~= own and string.byte(mark, 8) >= 97 then
    local v = redis.call('HGET', bucket, field)
    redis.call('HSET', bucket, field, string.sub(v, 1, 23) .. string.upper(string.sub(v, 24, 24)) .. string.sub(v, 25))
  end
  return found
end

-- The longest a record made now can still be found (in real time, as its bucket ages).
-- Records are always made in the numbering of the caller's own window.
local function idem_life_ms()
  return IDEM_BUCKETS_LOOKED_AT * IDEM_SPAN_MS
end

-- The first bucket no lookup reads any more (the sweeper unlinks it), or nil while a
-- previous numbering's buckets may exist: a number of one numbering can name a live
-- bucket of the other, so then buckets go by their own expiry only.
local function idem_dead_bucket()
  idem_numbering()
  if IDEM_PREV_SPAN then
    return nil
  end
  return TAG .. ':i:' .. itos(idem_bucket() - IDEM_BUCKETS_LOOKED_AT)
end

-- The buckets recall reads, in its order: the current numbering's bucket and the
-- IDEM_BUCKETS_LOOKED_AT - 1 before it, then, after a window change and while it lasts,
-- the previous numbering's. Not for the hot path (it builds a table): recall reads them
-- itself.
local function idem_buckets()
  idem_numbering()
  local now = real_now()
  local spans = { IDEM_SPAN_MS }
  if IDEM_PREV_SPAN and now < IDEM_PREV_UNTIL then
    spans[2] = IDEM_PREV_SPAN
  end
  local buckets = {}
  for _, span in ipairs(spans) do
    local b = math.floor(now / span)
    for age = 0, IDEM_BUCKETS_LOOKED_AT - 1 do
      buckets[#buckets + 1] = TAG .. ':i:' .. itos(b - age)
    end
  end
  return buckets
end

-- Deletes the idempotency record of `field` that recall would find, only when it is the
-- placing answer of hold `hold_id` ("OK|event_id|hold_id|..."): a gateway check's hold
-- (its 'ik') that ended without charging anything, so a retry of the request with the same
-- request id is charged afresh rather than handed the ended hold (docs/ARCHITECTURE.md
-- "charged afresh"). A record of anything else (a later charge of the key) is left.
local function forget_hold_record(field, hold_id)
  for _, bucket in ipairs(idem_buckets()) do
    local v = redis.call('HGET', bucket, field)
    if v then
      -- The record recall finds (the newest): the only one that can answer a retry.
      if string.match(string.sub(v, (record_answer_at(v))), '^OK|[^|]+|([^|]+)|') == hold_id then
        redis.call('HDEL', bucket, field)
      end
      return
    end
  end
end

local function lot_expiry(score)
  local e = score % PRIO_UNIT
  if e == NEVER then
    return 0
  end
  return e
end

local function open_wallet(acct, wallet)
  local base = acct .. ':' .. wallet
  local W = {
    acct = acct,
    wallet = wallet,
    member = base,
    w = TAG .. ':w:' .. base,
    b = TAG .. ':b:' .. base,
    x = TAG .. ':x:' .. base,
    hw = TAG .. ':hw:' .. base,
  }
  local v = redis.call('HMGET', W.w, 'r', 'h', 'd', 'bg', 's', 'hd')
  W.r = tonumber(v[1]) or 0
  W.h = tonumber(v[2]) or 0
  W.d = tonumber(v[3])
  W.bg = v[4]
  W.seq = v[5]
  W.hd = v[6]
  return W
end

-- Appends one ledger event to the shard's outbox; its id is "<shard>-<stream id>".
-- l: lots debited or credited "id:amount[:score],..."; x: per-kind extra (see ledger/event.rs).

local function emit(W, kind, amount, l, x, hold, charge, idem, op, meta)
  local sid
  if MEMBER == '' and ACTOR == '' then
    sid = redis.call('XADD', OUTBOX, '*',
      'k', kind, 'a', W.acct, 'w', W.wallet, 'n', amount, 'v', W.r, 'h', W.h,
      'l', l, 'x', x, 'hd', hold, 'c', charge, 'i', idem, 'o', op, 'm', meta, 't', NOW,
      'ver', EVENT_VERSION)
  elseif ACTOR == '' then
    sid = redis.call('XADD', OUTBOX, '*',
      'k', kind, 'a', W.acct, 'w', W.wallet, 'n', amount, 'v', W.r, 'h', W.h,
      'l', l, 'x', x, 'hd', hold, 'c', charge, 'i', idem, 'o', op, 'm', meta, 't', NOW,
      'ver', EVENT_VERSION, 'mb', MEMBER)
  else
    -- An org operation by an owner or admin (every one names its member too; an empty
    -- `mb` reads as none).
    sid = redis.call('XADD', OUTBOX, '*',
      'k', kind, 'a', W.acct, 'w', W.wallet, 'n', amount, 'v', W.r, 'h', W.h,
      'l', l, 'x', x, 'hd', hold, 'c', charge, 'i', idem, 'o', op, 'm', meta, 't', NOW,
      'ver', EVENT_VERSION, 'mb', MEMBER, 'ac', ACTOR)
  end
  return SHARD .. '-' .. sid
end

-- Charge records (what a debit or capture took, for refunds; docs/ARCHITECTURE.md "Charge
-- records"): fields of per-shard hashes of one-hour buckets "{tg:S}:cb:<hour>" by the
-- charge's event time; field = event id, value "account|wallet|amount|refunded|member|
-- lots" ('|' is in no id, lots are last). A bucket expires charge_retention after its hour
-- ends (the sweeper unlinks it then, off Redis's main thread; its own expiry, an hour
-- later, is the safety net): one field per charge instead of a key with its own expiry.
-- Records written before this layout are hashes "{tg:S}:c:<event id>" (refund.lua reads
-- both).
local CHARGE_BUCKET_MS = 3600000

-- The bucket of a charge id (its event id "<shard>-<ms>-<seq>") and its hour; nil when the
-- id has no time.
local function charge_bucket(id)
  local ms = tonumber(string.match(id, '^%d+%-(%d+)%-%d+$') or '')
  if not ms then
    return nil, nil
  end
  local hour = math.floor(ms / CHARGE_BUCKET_MS)
  return TAG .. ':cb:' .. itos(hour), hour
end

local function charge_value(acct, wallet, amount, refunded, member, lots)
  return acct .. '|' .. wallet .. '|' .. itos(amount) .. '|' .. itos(refunded) .. '|' .. member .. '|' .. lots
end

local function record_charge(W, eid, amount, lots)
  local bucket, hour = charge_bucket(eid)
  redis.call('HSET', bucket, eid, charge_value(W.acct, W.wallet, amount, 0, MEMBER, lots))
  redis.call('PEXPIREAT', bucket, itos((hour + 2) * CHARGE_BUCKET_MS + tonumber(CHARGE_RETENTION_MS)), 'NX')
end

-- The newest bucket whose hour ended a retention ago (the sweeper unlinks it).
local function charge_dead_bucket()
  local hour = math.floor((real_now() - tonumber(CHARGE_RETENTION_MS)) / CHARGE_BUCKET_MS) - 1
  return TAG .. ':cb:' .. itos(hour)
end

-- Organizations (docs/ARCHITECTURE.md, "Organizations"). Every key of an org carries the
-- org's hash tag: "{tg:S}:org:<org>" (field "m:<member>" = role, "c" = created ms),
-- "{tg:S}:al:<org>:<wallet>" (field <member> = allocated, "<member>:u" = used net of
-- refunds and returned holds).
local function org_key(org)
  return TAG .. ':org:' .. org
end

local function alloc_key(org, wallet)
  return TAG .. ':al:' .. org .. ':' .. wallet
end

local function member_role(org, member)
  return redis.call('HGET', org_key(org), 'm:' .. member)
end

-- Why a charge naming a member has no role: the account is no organization at all, or the
-- member is not in it (looked up only on this refusal).
local function not_a_member_reply(org)
  if redis.call('EXISTS', org_key(org)) == 0 then
    return { 0, 'BAD_FIELD|account_id|is not an organization (member_id names an org member)' }
  end
  return { 0, 'BAD_FIELD|member_id|is not a member of the organization' }
end

-- What a member may still spend from the org wallet: nil when unbounded (an owner or admin
-- without an allocation), else allocated - used, never below 0 (an allocation lowered
-- under what the member already used leaves nothing, not a debt); 0 for a plain member
-- without one.
local function alloc_remaining(org, wallet, member, role)
  local v = redis.call('HMGET', alloc_key(org, wallet), member, member .. ':u')
  local allocated = tonumber(v[1])
  if allocated then
    return math.max(0, allocated - (tonumber(v[2]) or 0))
  end
  if role == 'member' then
    return 0
  end
  return nil
end

local function alloc_use(org, wallet, member, delta)
  if member ~= '' and delta ~= 0 then
    redis.call('HINCRBY', alloc_key(org, wallet), member .. ':u', delta)
  end
end

-- Budgets: a spending cap per period on an account's wallet ("{tg:S}:bg:<acct>:<wallet>",
-- flagged by the wallet's "bg" field) or on an org member's spend from an org wallet
-- ("{tg:S}:bg:<org>:<wallet>:<member>"). Hash: l limit, p period (d day, m month,
-- w rolling window), ws window ms, z UTC offset ms of the calendar; calendar periods keep
-- s spent and ps the period's start; a rolling window keeps "b<index>" buckets of
-- window/16 and counts the last 17 (a superset of the window: never lets more through);
-- c a stamp set when the budget is created (or its period changed).
local BUDGET_BUCKETS = 16
local DAY_MS = 86400000

local function days_from_civil(y, m, d)
  if m <= 2 then
    y = y - 1
  end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then
    y = y + 1
  end
  return y, m
end

-- Start and end (ms) of the calendar period holding time t (ms).
local function period_bounds(p, z, t)
  local days = math.floor((t + z) / DAY_MS)
  if p == 'd' then
    return days * DAY_MS - z, (days + 1) * DAY_MS - z
  end
  local y, m = civil_from_days(days)
  local ny, nm = y, m + 1
  if nm == 13 then
    ny, nm = y + 1, 1
  end
  return days_from_civil(y, m, 1) * DAY_MS - z, days_from_civil(ny, nm, 1) * DAY_MS - z
end

-- The budget's state now, or nil when there is none.
local function budget_state(key, name)
  local v = redis.call('HMGET', key, 'l', 'p', 'ws', 'z', 's', 'ps', 'c', 'cm')
  if not v[1] then
    return nil
  end
  -- c: the budget's creation stamp (lua/org.lua), so a hold gives back only to the budget
  -- it was counted in, not to one removed and set again since.
  -- cm: the ms it was made, kept only when its stamp ran ahead of the clock (org.lua).
  local B = {
    key = key, name = name, limit = tonumber(v[1]), p = v[2], c = v[7] or '',
    cm = tonumber(v[8]), z = tonumber(v[4]) or 0,
  }
  if B.p == 'w' then
    local g = math.max(1, math.ceil((tonumber(v[3]) or 1) / BUDGET_BUCKETS))
    B.g = g
    local cur = math.floor(NOW / g)
    B.pid = cur
    B.spent = 0
    local oldest
    local all = redis.call('HGETALL', key)
    for j = 1, #all, 2 do
      local f = all[j]
      if string.sub(f, 1, 1) == 'b' then
        local idx = tonumber(string.sub(f, 2))
        local n = tonumber(all[j + 1])
        if idx < cur - BUDGET_BUCKETS or n <= 0 then
          redis.call('HDEL', key, f)
        else
          B.spent = B.spent + n
          if not oldest or idx < oldest then
            oldest = idx
          end
        end
      end
    end
    B.resets = oldest and (oldest + BUDGET_BUCKETS + 1) * g or NOW
  else
    local s, e = period_bounds(B.p, B.z, NOW)
    B.pid = s
    B.spent = tonumber(v[6]) == s and (tonumber(v[5]) or 0) or 0
    B.resets = e
  end
  return B
end

-- The budgets a charge of acct's wallet (by member, "" = none) is bound by.
local function budgets_for(W, member)
  local out = {}
  if W.bg then
    local B = budget_state(TAG .. ':bg:' .. W.acct .. ':' .. W.wallet, 'account')
    if B then
      out[#out + 1] = B
    end
  end
  if member ~= '' then
    local B = budget_state(TAG .. ':bg:' .. W.acct .. ':' .. W.wallet .. ':' .. member, 'member')
    if B then
      out[#out + 1] = B
    end
  end
  return out
end

-- The refusal of the first budget the amount would cross, or nil.
local function budgets_refuse(budgets, amount)
  for j = 1, #budgets do
    local B = budgets[j]
    if B.spent + amount > B.limit then
      return 'BUDGET_EXCEEDED|' .. B.name .. '|' .. itos(B.limit) .. '|' .. itos(B.spent) .. '|' .. itos(B.resets)
    end
  end
  return nil
end

-- Counts a charge in every budget; returns "key|period|stamp,..." so a hold can give back
-- what it did not charge (to the same budget and period only).
local function budgets_spend(budgets, amount)
  local refs = {}
  for j = 1, #budgets do
    local B = budgets[j]
    if B.p == 'w' then
      redis.call('HINCRBY', B.key, 'b' .. itos(B.pid), amount)
    else
      redis.call('HSET', B.key, 's', B.spent + amount, 'ps', B.pid)
    end
    refs[#refs + 1] = B.key .. '|' .. itos(B.pid) .. '|' .. B.c
  end
  return table.concat(refs, ',')
end

-- What the caller may still spend after a charge of `amount`: the tightest of `bound` (the
-- member's allocation left after it, nil = none) and every budget's headroom after it
-- (limit - spent - amount; the charge is counted in each, see budgets_spend). nil when
-- neither bounds it: only the balance does. Reads nothing (budget_state read the budgets).
local function spendable_after(budgets, amount, bound)
  if budgets then
    for j = 1, #budgets do
      local B = budgets[j]
      local left = B.limit - B.spent - amount
      if not bound or left < bound then
        bound = left
      end
    end
  end
  return bound
end

local function budgets_give_back(refs, amount)
  if not refs or refs == '' or amount <= 0 then
    return
  end
  for ref in string.gmatch(refs, '[^,]+') do
    local key, pid, stamp = string.match(ref, '^(.*)|(%-?%d+)|([^|]*)$')
    if not key then
      -- Written before budgets had stamps: "key|period".
      key, pid = string.match(ref, '^(.*)|(%-?%d+)$')
    end
    local v = redis.call('HMGET', key, 'p', 'ps', 's', 'b' .. pid, 'c')
    if (stamp or '') ~= (v[5] or '') then
      -- The budget the hold was counted in is gone (removed, or set again with another
      -- period): nothing to give back to the one there now. A ref without a stamp was
      -- counted in a budget made before stamps: it gives back only to such a budget,
      -- never to one made since (every new budget has a stamp).
      v[1] = nil
    end
    if v[1] == 'w' then
      local n = tonumber(v[4]) or 0
      if n > 0 then
        redis.call('HINCRBY', key, 'b' .. pid, -math.min(n, amount))
      end
    elseif v[1] and v[2] == pid then
      redis.call('HSET', key, 's', math.max(0, (tonumber(v[3]) or 0) - amount))
    end
  end
end

-- Gives `amount` of a debit (event id `eid`, of W's wallet, by `member`) back to the
-- budgets it was counted in: a void undoes the charge (a refund does not; ARCHITECTURE
-- "Organizations"). A debit keeps no budget references (a hold does: `bg`), so they are
-- found again: each budget of W and the member now, in the period (or rolling-window
-- bucket) that held the debit's time, if the budget existed then — its creation stamp
-- (next_seq, never below the real time in ms × 1000 when it was set) before that
-- millisecond; a budget set again since has a later stamp and gets nothing (budgets_give_back
-- gives only to a period still current). A restored budget's stamp is "r<ms it began
-- counting>" (settle/restore.rs `BudgetDef::stamp`); one made while the sequence ran
-- ahead of the clock (after a restore) is dated by its `cm`.
local function budgets_undo_debit(W, member, eid, amount)
  local ms = tonumber(string.match(eid, '^%d+%-(%d+)%-%d+$') or '')
  if not ms then
    return
  end
  local refs = {}
  for _, B in ipairs(budgets_for(W, member)) do
    local made = B.cm and B.cm * 1000 or tonumber(B.c)
    if not made then
      made = tonumber(string.match(B.c, '^r(%d+)$') or '')
      made = made and made * 1000
    end
    -- Made before the debit's millisecond: a stamp is at least its own millisecond
    -- times 1000, so one made in the debit's millisecond (before or after it: the stamp
    -- cannot tell) gets nothing back. Under-giving (the void's credits stay counted until
    -- the period ends) rather than giving back to a budget that never counted the debit.
    if B.c == '' or (made and made < ms * 1000) then
      local pid
      if B.p == 'w' then
        pid = math.floor(ms / B.g)
      else
        pid = period_bounds(B.p, B.z, ms)
      end
      refs[#refs + 1] = B.key .. '|' .. itos(pid) .. '|' .. B.c
    end
  end
  budgets_give_back(table.concat(refs, ','), amount)
end

-- Lower the wallet's next due time (lot expiry or hold deadline) to t if t is sooner.
local function schedule(W, t)
  if not W.d or t < W.d then
    W.d = t
    redis.call('HSET', W.w, 'd', t)
    redis.call('ZADD', TAG .. ':due', t, W.member)
  end
end

-- Recompute the next due time from the two indexes.
local function reschedule(W)
  local nxt
  local a = redis.call('ZRANGE', W.x, 0, 0, 'WITHSCORES')
  if a[2] then
    nxt = tonumber(a[2])
  end
  local b = redis.call('ZRANGE', W.hw, 0, 0, 'WITHSCORES')
  if b[2] and (not nxt or tonumber(b[2]) < nxt) then
    nxt = tonumber(b[2])
  end
  W.d = nxt
  if nxt then
    redis.call('HSET', W.w, 'd', nxt)
    redis.call('ZADD', TAG .. ':due', nxt, W.member)
  else
    redis.call('HDEL', W.w, 'd')
    redis.call('ZREM', TAG .. ':due', W.member)
  end
end

-- The wallet's expired-held index "{tg:S}:xh:<acct>:<wallet>": lots that expired while
-- open holds held credits of them, by expiry (ListLots lists them after the live lots).
-- Named only where needed, not in open_wallet: the hot path never touches it.
local function expired_held_key(W)
  return TAG .. ':xh:' .. W.member
end

-- A lot record lives while it has remaining credits or credits held by an open hold.
local function maybe_drop(W, id)
  local v = redis.call('HMGET', W.w, id, id .. ':h')
  if (tonumber(v[1]) or 0) <= 0 and (tonumber(v[2]) or 0) <= 0 then
    redis.call('HDEL', W.w, id, id .. ':m', id .. ':u', id .. ':h', id .. ':x')
    if redis.call('ZREM', W.b, id) == 1 then
      redis.call('ZREM', W.x, id)
    else
      -- Not in the burn index: it expired while held (expire_lot).
      redis.call('ZREM', expired_held_key(W), id)
    end
    return true
  end
  return false
end

-- Creates a lot; returns its id and its "id:amount:score" piece.
local function add_lot(W, amount, kind, prio, exp, desc)
  local seq = redis.call('HINCRBY', W.w, 's', 1)
  W.seq = itos(seq)
  local id = string.format('%08d', seq)
  local score = prio * PRIO_UNIT + (exp == 0 and NEVER or exp)
  redis.call('ZADD', W.b, score, id)
  -- The head of the burn index, cached for draw with the new sequence: a new wallet's
  -- first charge then reads one key.
  local head = redis.call('ZRANGE', W.b, 0, 0, 'WITHSCORES')
  W.hd = W.seq .. ':' .. head[1] .. ':' .. head[2]
  redis.call('HSET', W.w, id, amount, id .. ':u', NOW,
    id .. ':m', itos(amount) .. '|' .. itos(prio) .. '|' .. itos(exp) .. '|' .. itos(NOW) .. '|' .. kind .. '|' .. desc,
    'hd', W.hd)
  if exp ~= 0 then
    redis.call('ZADD', W.x, exp, id)
    schedule(W, exp)
  end
  W.r = redis.call('HINCRBY', W.w, 'r', amount)
  return id, id .. ':' .. itos(amount) .. ':' .. itos(score)
end

-- Takes `take` credits from lot `id` (draw); a lot left with nothing is dropped.
local function take_from(W, id, take, for_hold)
  local left = redis.call('HINCRBY', W.w, id, -take)
  redis.call('HSET', W.w, id .. ':u', NOW)
  if for_hold then
    redis.call('HINCRBY', W.w, id .. ':h', take)
  elseif left == 0 then
    maybe_drop(W, id)
  end
end

-- Takes amount credits from the lots in burn order. The caller checked W.r >= amount.
-- for_hold: the credits move into a hold, so the lot records stay while the hold is open.
-- Updates the lots only; the caller updates the wallet totals.
local function draw(W, amount, for_hold)
  -- The wallet hash caches the head of the burn index, the lot drawn first: field 'hd'
  -- = "<lot sequence>:<id>:<score>", so that a draw this lot covers alone reads one key,
  -- not two. The index gains a lot only by add_lot, which moves the sequence on (a
  -- cached head from before no longer matches), and loses one only when it has nothing
  -- left (maybe_drop, expire_lot). So a head that matches the sequence and covers the
  -- amount is the first lot with credits left: the loop below would take exactly it.
  -- No other writer has to know of the cache (an older tollgate in a rolling upgrade).
  if amount > 0 and W.hd then
    local seq, id, score = string.match(W.hd, '^(%d+):([^:]+):(%d+)$')
    if seq == W.seq and (tonumber(redis.call('HGET', W.w, id)) or 0) >= amount then
      take_from(W, id, amount, for_hold)
      return id .. ':' .. itos(amount) .. ':' .. score
    end
  end
  -- What to take from which lot is worked out first and written only once it covers the
  -- amount: lots that fall short (a wallet whose total says more than its lots hold,
  -- which the caller reports as TG_INVARIANT) leave every lot as it was — Redis does not
  -- undo a function's writes when it ends in an error.
  local need = amount
  local plan = {}
  local start = 0
  while need > 0 do
    local page = redis.call('ZRANGE', W.b, start, start + DRAW_PAGE - 1, 'WITHSCORES')
    if #page == 0 then
      return nil
    end
    if start == 0 and W.seq then
      local head = W.seq .. ':' .. page[1] .. ':' .. page[2]
      if head ~= W.hd then
        W.hd = head
        redis.call('HSET', W.w, 'hd', head)
      end
    end
    local ids = {}
    for j = 1, #page, 2 do
      ids[#ids + 1] = page[j]
    end
    local rems = redis.call('HMGET', W.w, unpack(ids))
    for j = 1, #ids do
      local rem = tonumber(rems[j]) or 0
      if need > 0 and rem > 0 then
        local take = rem < need and rem or need
        need = need - take
        plan[#plan + 1] = { ids[j], take, page[2 * j] }
      end
    end
    start = start + DRAW_PAGE
  end
  local pieces = {}
  for i, p in ipairs(plan) do
    take_from(W, p[1], p[2], for_hold)
    pieces[i] = p[1] .. ':' .. itos(p[2]) .. ':' .. p[3]
  end
  return table.concat(pieces, ',')
end

-- Expires lot `id` (its expiry `exp`, ms): what is left of it expires now. A lot whose
-- credits open holds still hold keeps its record, moved from the burn index to the
-- expired-held index with its expired credits ("<id>:x"), until the last of those holds
-- ends (maybe_drop); credits they give back to it expire at once (end_hold).
local function expire_lot(W, id, exp)
  local v = redis.call('HMGET', W.w, id, id .. ':h')
  local rem = tonumber(v[1]) or 0
  local held = (tonumber(v[2]) or 0) > 0
  redis.call('ZREM', W.x, id)
  redis.call('ZREM', W.b, id)
  if rem > 0 then
    if held then
      redis.call('HSET', W.w, id, 0, id .. ':u', NOW, id .. ':x', rem)
    else
      redis.call('HSET', W.w, id, 0, id .. ':u', NOW)
    end
    W.r = redis.call('HINCRBY', W.w, 'r', -rem)
    redis.call('HINCRBY', W.w, 'xp', rem)
    emit(W, 'expire_lot', rem, id .. ':' .. itos(rem), '', '', '', '', '', '')
  end
  if held then
    redis.call('ZADD', expired_held_key(W), exp, id)
  else
    redis.call('HDEL', W.w, id, id .. ':m', id .. ':u', id .. ':h', id .. ':x')
  end
end

-- Ends an open hold: charges `capture` credits from its lots in the order they were drawn
-- and returns the rest to their lots. Credits returned to a lot that has expired in the
-- meantime expire at once (an expire_lot event follows the hold's event).
-- Lots with credits held stay in the burn index (with remaining 0) until they expire,
-- then in the expired-held index (expire_lot) until their last hold ends.
local function end_hold(W, hold_id, hkey, amount, pieces, capture, kind, state, idem, op, meta)
  local charged, returned, lapsed = {}, {}, {}
  local left = capture
  local back_live = 0
  for piece in string.gmatch(pieces, '[^,]+') do
    local id, a, score = string.match(piece, '^([^:]+):(%d+):(%d+)$')
    a = tonumber(a)
    local c = left < a and left or a
    left = left - c
    local back = a - c
    if c > 0 then
      charged[#charged + 1] = id .. ':' .. itos(c) .. ':' .. score
    end
    local held_left = redis.call('HINCRBY', W.w, id .. ':h', -a)
    if held_left <= 0 then
      redis.call('HDEL', W.w, id .. ':h')
    end
    redis.call('HSET', W.w, id .. ':u', NOW)
    if back > 0 then
      returned[#returned + 1] = id .. ':' .. itos(back) .. ':' .. score
      -- A lot that left the burn index has expired (settle_due ran first). Asking the
      -- index rather than comparing expiry with NOW stays right if the clock steps back.
      if not redis.call('ZSCORE', W.b, id) then
        lapsed[#lapsed + 1] = id
        lapsed[#lapsed + 1] = back
        if held_left > 0 then
          -- Still listed as expired (other holds hold it): its expired credits grow.
          redis.call('HINCRBY', W.w, id .. ':x', back)
        end
      else
        redis.call('HINCRBY', W.w, id, back)
        back_live = back_live + back
      end
    end
    if held_left <= 0 then
      maybe_drop(W, id)
    end
  end
  local lapsed_total = amount - capture - back_live
  -- What the hold did not charge goes back to the member's allocation and the budgets.
  local org = redis.call('HMGET', hkey, 'mb', 'bg', 'ik')
  MEMBER = org[1] or ''
  alloc_use(W.acct, W.wallet, MEMBER, capture - amount)
  budgets_give_back(org[2], amount - capture)
  W.h = redis.call('HINCRBY', W.w, 'h', -amount)
  if capture > 0 then
    redis.call('HINCRBY', W.w, 'u', capture)
  end
  if back_live > 0 then
    redis.call('HINCRBY', W.w, 'r', back_live)
  end
  if lapsed_total > 0 then
    redis.call('HINCRBY', W.w, 'xp', lapsed_total)
  end
  -- The hold's event shows every returned credit back in its lot; the expire_lot events
  -- that follow take the lapsed ones out again, so replaying events in order is exact.
  W.r = W.r + amount - capture
  redis.call('HSET', hkey, 's', state, 'q', capture)
  if capture == 0 and org[3] then
    -- A gateway check's hold that charged nothing (released, expired by `release`, or
    -- captured at 0): a retry of its request is charged afresh, not handed this hold.
    forget_hold_record(org[3], hold_id)
  end
  -- A capture's or release's own answer is found through this record (its idempotency
  -- record is keyed by the hold's account): it lives as long as that answer can be
  -- replayed (1.5 windows), even with a shorter retention.
  local keep_ms = tonumber(HOLD_RETENTION_MS)
  if idem ~= '' then
    keep_ms = math.max(keep_ms, idem_life_ms())
  end
  redis.call('PEXPIRE', hkey, itos(keep_ms))
  redis.call('ZREM', W.hw, hold_id)
  local n = amount
  if kind == 'capture' then
    n = capture
  end
  local charged_lots = table.concat(charged, ',')
  local eid = emit(W, kind, n, charged_lots, table.concat(returned, ','), hold_id, '', idem, op, meta)
  if capture > 0 then
    record_charge(W, eid, capture, charged_lots)
  end
  MEMBER = ''
  for j = 1, #lapsed, 2 do
    W.r = W.r - lapsed[j + 1]
    emit(W, 'expire_lot', lapsed[j + 1], lapsed[j] .. ':' .. itos(lapsed[j + 1]), '', '', '', '', '', '')
  end
  -- And how many of the credits given back expired at once (their lot had expired).
  return eid, lapsed_total
end

-- Lazy expiry: ends what is due in this wallet before anything reads its balance.
-- Ends an overdue hold by its on_expiry policy: capture all of it ("c") or release it.
local function expire_hold(W, hold_id)
  local hkey = TAG .. ':h:' .. hold_id
  local hd = redis.call('HMGET', hkey, 'n', 'l', 'e', 'o', 's')
  local amount = tonumber(hd[1])
  if amount and hd[5] and hd[5] ~= 'a' then
    -- Already ended (a record written by hand, say, whose id was left in the index):
    -- ending it again would give its credits back twice.
    redis.call('ZREM', W.hw, hold_id)
    return
  end
  if not amount then
    -- The record is gone (deleted by hand, say) while its id waits in the deadline index:
    -- what the hold took is not known here, so its credits stay held rather than every
    -- later call on the wallet failing. Redis's log names the hold (never the account).
    redis.log(redis.LOG_WARNING, 'tollgate: overdue hold ' .. hold_id .. ' has no record; left out of the deadline index')
    redis.call('ZREM', W.hw, hold_id)
    return
  end
  local capture = 0
  if hd[3] == 'c' then
    capture = amount
  end
  end_hold(W, hold_id, hkey, amount, hd[2], capture, 'expire_hold', 'x', '', hd[4] or '', '')
end

-- Ends up to `max` of the wallet's overdue holds, soonest deadline first; answers how many.
local function end_overdue_holds(W, max)
  local holds = redis.call('ZRANGEBYSCORE', W.hw, '-inf', NOW, 'LIMIT', 0, max)
  for j = 1, #holds do
    expire_hold(W, holds[j])
  end
  DUE_HOLDS_ENDED = DUE_HOLDS_ENDED + #holds
  return #holds
end

-- Ends what is due in the wallet. On a request (work_max nil): every lot past its expiry
-- (bounded by the wallet's lot cap: the balance must not count a single expired credit),
-- then up to DUE_HOLDS_MAX overdue holds. The sweeper (sweep.lua), which decides nothing
-- from the balance, passes work_max: at most that many lots expired and holds ended in
-- all, the rest left due. Answers how many it expired and ended.
local function settle_due(W, work_max)
  if not W.d or W.d > NOW then
    return 0
  end
  local lots
  if work_max then
    lots = redis.call('ZRANGEBYSCORE', W.x, '-inf', NOW, 'WITHSCORES', 'LIMIT', 0, work_max)
  else
    lots = redis.call('ZRANGEBYSCORE', W.x, '-inf', NOW, 'WITHSCORES')
  end
  for j = 1, #lots, 2 do
    expire_lot(W, lots[j], lots[j + 1])
  end
  local expired = #lots / 2
  local holds_max = DUE_HOLDS_MAX
  if work_max then
    holds_max = math.min(holds_max, work_max - expired)
  end
  local ended = 0
  if holds_max > 0 then
    ended = end_overdue_holds(W, holds_max)
  end
  reschedule(W)
  return expired + ended
end

-- Whether overdue holds are left after settle_due (a backlog: it stopped at
-- DUE_HOLDS_MAX). Reads nothing: reschedule set W.d to the soonest deadline or expiry
-- left, and settle_due expired every due lot.
local function holds_overdue(W)
  return W.d ~= nil and W.d <= NOW
end

-- A decision that the backlog can change (a refusal for want of credits, allocation,
-- budget or room, or a balance shown): a hold past its deadline is not active, and ending
-- it gives back credits, allocation and budget, and drops the lots it held whole. Ends
-- DUE_HOLDS_MAX more of them, within DUE_HOLDS_CALL_MAX in the call; answers whether it
-- ended any (decide again), false when none are overdue or the call's bound is reached.
-- No Redis call for a wallet without a backlog.
local function settle_more(W)
  if not holds_overdue(W) or DUE_HOLDS_ENDED >= DUE_HOLDS_CALL_MAX then
    return false
  end
  end_overdue_holds(W, math.min(DUE_HOLDS_MAX, DUE_HOLDS_CALL_MAX - DUE_HOLDS_ENDED))
  reschedule(W)
  return true
end

-- The refusal of a charge of `amount` from W, or nil: the member's allocation left
-- (`remaining`, nil = unbounded), then the budgets, then the balance.
local function charge_refusal(W, amount, remaining, budgets)
  if remaining and remaining < amount then
    return 'ALLOCATION_EXCEEDED|' .. itos(amount) .. '|' .. itos(remaining)
  end
  local over_budget = budgets and budgets_refuse(budgets, amount)
  if over_budget then
    return over_budget
  end
  if W.r < amount then
    return 'INSUFFICIENT_CREDITS|' .. itos(amount) .. '|' .. itos(W.r)
  end
  return nil
end

-- The answer of a script whose refusal the backlog may have caused, and which ended
-- DUE_HOLDS_CALL_MAX overdue holds without reaching its end: nothing decided, nothing
-- recorded; a retry goes on where this call stopped (and the sweeper works on it too).
local EXPIRY_BACKLOG = 'EXPIRY_BACKLOG'

-- For the scripts off the hot path: `refusal()` answers the script's refusal (nil: go
-- ahead) and whether overdue holds can change it; while such a refusal stands and
-- overdue holds are left, ends more of them and asks again. Answers the refusal (nil: go
-- ahead), or EXPIRY_BACKLOG when such a refusal stands with overdue holds still left.
local function decide(W, refusal)
  local answer, by_holds = refusal()
  while answer and by_holds and settle_more(W) do
    answer, by_holds = refusal()
  end
  if answer and by_holds and holds_overdue(W) then
    return EXPIRY_BACKLOG
  end
  return answer
end

-- The account's wallet set "{tg:S}:ws:<acct>": its wallet names, a small hash
-- (listpack-encoded; a Redis 7.0 set of strings would be a hashtable, twice the memory).
-- GetBalance and the view list its wallets, an org member's removal walks it, and the
-- per-account cap (ledger.wallets_per_account_max) counts it. A wallet joins it when a
-- grant, a positive adjustment, an allocation or a budget uses it, or a refund gives
-- credits back to it as lots; it leaves it only when it is dead and room is needed
-- (wallet_set_refuses): the cap counts live wallets (docs/ARCHITECTURE.md, "Wallet cap").
local function join_wallet_set(acct, wallet)
  redis.call('HSET', TAG .. ':ws:' .. acct, wallet, 1)
end

-- Whether the allocation record "{tg:S}:al:<org>:<wallet>" holds an allocation of any
-- member (a field "<member>"; member ids hold no ':'), not only what members used
-- ("<member>:u", kept after a removal, see org.lua). Bounded by the org's members.
local function has_allocation(akey)
  local fields = redis.call('HKEYS', akey)
  for j = 1, #fields do
    if string.sub(fields[j], -2) ~= ':u' then
      return true
    end
  end
  return false
end

-- Member budget keys EXISTS checks at once.
local EXISTS_BATCH = 128

-- Whether wallet `wallet` of `acct` is dead, once what is due in it has ended (settle_due,
-- as a balance read does): no credits available or held, no lot record (live, or expired
-- and still held: ":b:", ":xh:"), no open hold (":hw:"), so nothing due, no budget of
-- the account on it ("bg", ":bg:<acct>:<wallet>"); and for an org (`members`: its member
-- ids, nil outside an org) no allocation of any member (has_allocation) and no member
-- budget (":bg:<org>:<wallet>:<member>"). A dead wallet has nothing the ledger must find
-- through the wallet set: a refund of one of its charges brings it back (refund_charge),
-- an org member's removal has no allocation or budget of theirs to take from it, and a
-- charge of it is refused for want of credits whether it is listed or not. Its hash and
-- totals stay: a balance read by name shows them, and the wallet rejoins when used again.
local function wallet_dead(acct, wallet, members)
  local W = open_wallet(acct, wallet)
  settle_due(W)
  -- Not W.d: an ended hold leaves its deadline there until it passes (end_hold does not
  -- reschedule); the indexes say what is due.
  if W.r ~= 0 or W.h ~= 0 or W.bg then
    return false
  end
  if redis.call('ZCARD', W.b) > 0 or redis.call('ZCARD', W.hw) > 0
    or redis.call('ZCARD', expired_held_key(W)) > 0 then
    return false
  end
  local bkey = TAG .. ':bg:' .. W.member
  if redis.call('EXISTS', bkey) == 1 then
    return false
  end
  if members then
    if has_allocation(alloc_key(acct, wallet)) then
      return false
    end
    for j = 1, #members, EXISTS_BATCH do
      local keys = {}
      for k = j, math.min(#members, j + EXISTS_BATCH - 1) do
        keys[#keys + 1] = bkey .. ':' .. members[k]
      end
      if redis.call('EXISTS', unpack(keys)) > 0 then
        return false
      end
    end
  end
  return true
end

-- Whether a wallet that is not in acct's wallet set is refused for the cap `max`. At the
-- cap, the dead wallets of the set (wallet_dead) leave it first, so names once used
-- (per-period wallets, say) do not count for good. Only when the set is full: each of
-- its wallets is settled and looked at, O(set) and the set holds at most the cap (more
-- only after a refund brought a wallet back past it, a lowered cap, or a restore, which
-- rebuilds every wallet the account used). The ending of what is due in those wallets
-- emits its events under no member or actor.
local function wallet_set_refuses(acct, wallet, max)
  local key = TAG .. ':ws:' .. acct
  if redis.call('HEXISTS', key, wallet) == 1 then
    return false
  end
  max = tonumber(max)
  local n = redis.call('HLEN', key)
  if n < max then
    return false
  end
  local members
  local org = redis.call('HKEYS', org_key(acct))
  if #org > 0 then
    members = {}
    for j = 1, #org do
      local m = string.match(org[j], '^m:(.+)$')
      if m then
        members[#members + 1] = m
      end
    end
  end
  local member, actor = MEMBER, ACTOR
  MEMBER, ACTOR = '', ''
  local names = redis.call('HKEYS', key)
  table.sort(names)
  for j = 1, #names do
    if wallet_dead(acct, names[j], members) then
      redis.call('HDEL', key, names[j])
      n = n - 1
    end
  end
  MEMBER, ACTOR = member, actor
  return n >= max
end

-- The charge record of a charge id (its event id; "Charge records" above), as refund.lua
-- and void.lua read it: C.c = { account, wallet, amount, refunded, lots, member } (C.c[1]
-- nil: no such record), and where it lives: the packed field of its bucket, or a hash
-- "{tg:S}:c:<event id>" written before that layout.
local function find_charge(charge_id)
  local bucket = charge_bucket(charge_id)
  local packed = bucket and redis.call('HGET', bucket, charge_id)
  local C = { id = charge_id, bucket = bucket, packed = packed, legacy = TAG .. ':c:' .. charge_id }
  if packed then
    local a, w, n, f, mb, l = string.match(packed, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$')
    C.c = { a, w, n, f, l, mb }
  else
    C.c = redis.call('HMGET', C.legacy, 'a', 'w', 'n', 'f', 'l', 'mb')
  end
  return C
end

-- Gives back `amount` credits of charge C (find_charge, which found it): to new lots of
-- kind "refund" that keep the priority and expiry of the lots the charge drew from,
-- walking them from the last drawn, past what earlier refunds returned; credits whose lot
-- has expired since expire at once, as they would have had the charge never happened.
-- The refund event carries `idem`, `op` and `meta`. Answers the answer and whether it
-- is to be recorded: "OK|event_id|refunded|refunded_total|available|expired",
-- "REFUND_EXCEEDS_CHARGE|refundable" or "LOT_LIMIT|max" (recorded); "BALANCE_LIMIT" or
-- EXPIRY_BACKLOG (nothing done, nothing recorded).
local function refund_charge(C, amount, lots_max, idem, op, meta)
  local c = C.c
  local W = open_wallet(c[1], c[2])
  settle_due(W)
  local charged = tonumber(c[3])
  local done = tonumber(c[4])
  if amount > charged - done then
    return 'REFUND_EXCEEDS_CHARGE|' .. itos(charged - done), true
  end
  local pieces = {}
  for piece in string.gmatch(c[5], '[^,]+') do
    pieces[#pieces + 1] = piece
  end
  local skip, need, expired = done, amount, 0
  local scores, amounts = {}, {}
  for k = #pieces, 1, -1 do
    local _, a, score = string.match(pieces[k], '^([^:]+):(%d+):(%d+)$')
    a = tonumber(a)
    local s = skip < a and skip or a
    skip = skip - s
    a = a - s
    local take = need < a and need or a
    if take > 0 then
      need = need - take
      local exp = lot_expiry(tonumber(score))
      if exp ~= 0 and exp <= NOW then
        expired = expired + take
      else
        local found = false
        for g = 1, #scores do
          if scores[g] == score then
            amounts[g] = amounts[g] + take
            found = true
          end
        end
        if not found then
          scores[#scores + 1] = score
          amounts[#amounts + 1] = take
        end
      end
    end
  end
  -- Credits whose lot has expired go straight to expired, not back into the balance.
  if W.r + W.h + amount - expired > MAX_CREDITS
    or (tonumber(redis.call('HGET', W.w, 'f')) or 0) + amount > MAX_CREDITS then
    return 'BALANCE_LIMIT', false
  end
  -- The lot cap counts lots that overdue holds hold whole (decide).
  local answer = decide(W, function()
    if #scores > 0 and redis.call('ZCARD', W.b) + #scores > tonumber(lots_max) then
      return 'LOT_LIMIT|' .. lots_max, true
    end
    return nil, false
  end)
  if answer == EXPIRY_BACKLOG then
    return answer, false
  end
  if answer then
    return answer, true
  end
  local created = {}
  if #scores > 0 then
    -- Credits back in lots make the wallet live: back in the set (past the cap, which
    -- never refuses a refund), should it have left it dead (wallet_set_refuses).
    join_wallet_set(c[1], c[2])
  end
  for g = 1, #scores do
    local score = tonumber(scores[g])
    local _, piece = add_lot(W, amounts[g], 'refund', math.floor(score / PRIO_UNIT), lot_expiry(score), 'refund of ' .. C.id)
    created[#created + 1] = piece
  end
  if expired > 0 then
    redis.call('HINCRBY', W.w, 'xp', expired)
  end
  redis.call('HINCRBY', W.w, 'f', amount)
  local total
  if C.packed then
    total = done + amount
    redis.call('HSET', C.bucket, C.id, charge_value(c[1], c[2], charged, total, c[6], c[5]))
  else
    total = redis.call('HINCRBY', C.legacy, 'f', amount)
  end
  -- A refund of a member's charge gives the member's allocation back.
  MEMBER = c[6] or ''
  alloc_use(c[1], c[2], MEMBER, -amount)
  local eid = emit(W, 'refund', amount, table.concat(created, ','), itos(expired), '', C.id, idem, op, meta)
  return 'OK|' .. eid .. '|' .. itos(amount) .. '|' .. itos(total) .. '|' .. itos(W.r) .. '|' .. itos(expired), true
end

-- Deletes the idempotency record of `field` wherever recall would find it (the buckets it
-- reads, of both numberings): a later request with the key runs afresh (void.lua).
local function forget(field)
  for _, bucket in ipairs(idem_buckets()) do
    redis.call('HDEL', bucket, field)
  end
end

-- Per-script body follows.
