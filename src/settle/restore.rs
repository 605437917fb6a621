//! `tollgate restore`: rebuilds Redis's live state from the durable ledger after Redis lost
//! its data. Shard by shard, every wallet's events are replayed in order (the store serves
//! them grouped by wallet) to rebuild its lots (amount, used, remaining, priority, expiry),
//! totals, demo marker, open holds (deadline, on_expiry, the lots they hold), recently
//! ended holds and refundable charges (within their retention), and the idempotency
//! records of recent debits, holds (with what was left to spend then when an allocation
//! or a budget bounded the charge, replayed in stream order), grants, positive
//! adjustments, refunds and org operations (CreateOrganization, AddMember, RemoveMember,
//! SetAllocation, AddAllocation, SetBudget: `Replay::record_org`) (as long as live Redis
//! would still find them, up to 1.5 idempotency windows; a refund's with its `:rf:`
//! pointer), each kept as long as lib.lua keeps it; not those of charges a void undid
//! (lua/void.lua forgot them, so a retry of the request is charged again). Then the shard's epoch marker is
//! written and it serves again. API keys (hashes) come from the store's key table, which
//! the Admin API writes; a live org key whose maker no longer manages the restored org, or
//! whose member left it, is revoked (`revoked_by_role_loss`), in the store too.
//!
//! Not restored (stated in the report): refusals (never in the ledger, so a replayed
//! refused request is evaluated again), idempotency records of captures and releases
//! (their request parameters are not all in the events) and of org
//! operations by an owner or admin whose events do not name that actor (settled before
//! events carried it: the actor is part of the request digest), and events that never
//! reached the store (the persistence level's loss window).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::Pipeline;

use super::settler::{last_entry_id, settled_through, SettleError};
use super::store::{ApiKeyRecord, Store, StoreError, WalletPosition};
use crate::gateway::identity::shard_of_key_id;
use crate::ledger::command::digest;
use crate::ledger::event::{EventKind, LedgerEvent, LotPiece};
use crate::ledger::{Ledger, LedgerError};

/// Events read per store query.
pub const EVENTS_PAGE: u32 = 5000;
/// Wallets written per Redis pipeline.
pub const WALLETS_PER_PIPELINE: usize = 200;
/// Hold, charge and idempotency records written per Redis pipeline.
pub const RECORDS_PER_PIPELINE: usize = 2000;

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("Redis already holds tollgate data ({0}); restore writes only into shards that do not serve and hold no wallets (--force deletes what those hold; --rebuild-serving rebuilds every shard)")]
    NotEmpty(String),
    #[error("{0}: settle it first (`tollgate reconcile` drains the outbox, then reports)")]
    Unsettled(String),
    #[error("{0}: replay or drop them first (`tollgate dead-letters`); Redis applied those events and the store lacks them, so a rebuild would not match either")]
    DeadLetters(String),
    #[error(transparent)]
    Redis(#[from] LedgerError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("ledger event {0} does not replay: {1}")]
    Replay(String, String),
    #[error("another restore is running (it holds {0} for {1} ms more); wait for it to finish")]
    Busy(String, i64),
    #[error(
        "this restore lost its lease ({0}) to another one; it stopped before writing shard {1}"
    )]
    LeaseLost(String, u16),
}

/// How long the restore lease lasts without renewal: a restore that dies frees it by then.
pub const LEASE_TTL: Duration = Duration::from_secs(30);
/// How often a running restore renews its lease.
const LEASE_RENEW_EVERY: Duration = Duration::from_secs(5);
/// Extends the lease if this restore still holds it: 1, else 0.
const LEASE_RENEW_LUA: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
    return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end";
/// Frees the lease if this restore still holds it.
const LEASE_RELEASE_LUA: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
    return redis.call('DEL', KEYS[1]) else return 0 end";

/// The one restore allowed at a time: two restores writing the same shard would let the
/// slower one overwrite a shard that already serves (charges made there since would be
/// undone). `SET NX` with a TTL, renewed in the background while the restore runs; the
/// restore checks it still holds it before each shard it writes.
struct Lease {
    key: String,
    token: String,
    lost: Arc<std::sync::atomic::AtomicBool>,
    /// When the lease was last known held (taken or renewed), in ms since `since`.
    held_at_ms: Arc<std::sync::atomic::AtomicU64>,
    since: Instant,
    renewer: tokio::task::JoinHandle<()>,
}

impl Lease {
    async fn acquire(ledger: &Ledger) -> Result<Self, RestoreError> {
        let key = lease_key(ledger);
        let token = crate::ledger::new_epoch();
        let ttl_ms = LEASE_TTL.as_millis() as i64;
        let taken: Option<String> = ledger
            .redis()
            .query(
                redis::cmd("SET")
                    .arg(&key)
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl_ms),
            )
            .await?;
        if taken.is_none() {
            let left: i64 = ledger.redis().query(redis::cmd("PTTL").arg(&key)).await?;
            return Err(RestoreError::Busy(key, left.max(0)));
        }
        let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let since = Instant::now();
        let held_at_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let renewer = {
            let (redis, key, token, lost, held_at_ms) = (
                ledger.redis().clone(),
                key.clone(),
                token.clone(),
                lost.clone(),
                held_at_ms.clone(),
            );
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(LEASE_RENEW_EVERY).await;
                    let asked = since.elapsed().as_millis() as u64;
                    let renewed: Result<i64, _> = redis
                        .query(
                            redis::cmd("EVAL")
                                .arg(LEASE_RENEW_LUA)
                                .arg(1)
                                .arg(&key)
                                .arg(&token)
                                .arg(ttl_ms),
                        )
                        .await;
                    match renewed {
                        Ok(1) => held_at_ms.store(asked, std::sync::atomic::Ordering::SeqCst),
                        Ok(_) => {
                            lost.store(true, std::sync::atomic::Ordering::SeqCst);
                            return;
                        }
                        // Redis unreachable: the restore's own writes fail too; keep trying.
                        Err(err) => tracing::warn!(error = %err, "cannot renew the restore lease"),
                    }
                }
            })
        };
        Ok(Self {
            key,
            token,
            lost,
            held_at_ms,
            since,
            renewer,
        })
    }

    /// Fails when the lease was taken over, or when it may have lapsed: no renewal got
    /// through for most of its TTL (Redis unreachable, or this process stalled).
    fn check(&self, shard: u16) -> Result<(), RestoreError> {
        let held_at = self.held_at_ms.load(std::sync::atomic::Ordering::SeqCst);
        let unsure = self.since.elapsed().as_millis() as u64
            > held_at + (LEASE_TTL - LEASE_RENEW_EVERY).as_millis() as u64;
        if self.lost.load(std::sync::atomic::Ordering::SeqCst) || unsure {
            return Err(RestoreError::LeaseLost(self.key.clone(), shard));
        }
        Ok(())
    }

    async fn release(self, ledger: &Ledger) -> Result<(), RestoreError> {
        self.renewer.abort();
        let _: i64 = ledger
            .redis()
            .query(
                redis::cmd("EVAL")
                    .arg(LEASE_RELEASE_LUA)
                    .arg(1)
                    .arg(&self.key)
                    .arg(&self.token),
            )
            .await?;
        Ok(())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // A restore that failed stops renewing; the lease lapses within LEASE_TTL.
        self.renewer.abort();
    }
}

/// Whether a shard serves by now (its epoch marker was written since the restore began),
/// after making sure the restore still holds its lease.
async fn serves_now(ledger: &Ledger, lease: &Lease, shard: u16) -> Result<bool, RestoreError> {
    lease.check(shard)?;
    Ok(ledger.shard_initialized(shard).await?)
}

/// A hold event's `on_expiry` policy and deadline (its `extra`: "<policy><deadline ms>").
pub(crate) fn hold_terms(e: &LedgerEvent) -> Option<(String, i64)> {
    let policy = e.extra.get(..1).unwrap_or("r").to_owned();
    let deadline = e.extra.get(1..)?.parse().ok()?;
    Some((policy, deadline))
}

/// How many replayed events a restore handles between two yields to the runtime.
const YIELD_EVERY_EVENTS: usize = 1024;

/// The last step of a shard's restore (KEYS[1] its "restoring" marker, KEYS[2] its epoch
/// marker; ARGV[1] the lease token, ARGV[2] the epoch value): the epoch marker is written
/// (`SET NX`) and the restoring marker deleted only while that marker is still this
/// restore's. A restore that lost its lease, and whose shard another restore has taken
/// over (deleted and marked as its own), cannot mark it serving half-written.
/// The shard count the shard belongs to (KEYS[3] = ARGV[3]) is written in the same step.
const FINISH_SHARD_LUA: &str = "if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end \
    redis.call('SET', KEYS[2], ARGV[2], 'NX') redis.call('SET', KEYS[3], ARGV[3]) \
    redis.call('DEL', KEYS[1]) return 1";

/// A shard's "a restore is writing it" marker: set (to the lease's token) before the
/// restore's first write into the shard, deleted once its epoch marker is written. Found
/// by a later restore in a shard that does not serve, it says the shard's contents were
/// left by a restore that died partway (nothing else writes a shard without an epoch
/// marker), so that restore deletes them and rebuilds the shard instead of refusing.
pub fn restoring_key(ledger: &Ledger, shard: u16) -> String {
    format!("{}:restoring", ledger.shards().tag(shard))
}

/// The restore lease's key: in shard 0's hash slot, outside every shard's data
/// (`wipe` leaves it alone).
pub fn lease_key(ledger: &Ledger) -> String {
    format!("{}:restore-lease", ledger.shards().tag(0))
}

/// How far past the highest settled hold sequence a restore moves a shard's hold id
/// sequence (`{tg:S}:seq`). The lost Redis handed out the ids of the holds of its loss
/// window (applied there, never settled) to their callers; issued again, a late Capture or
/// Release of one would end another caller's hold. The scripts also floor the sequence by
/// Redis's clock (ms x 1000, lib.lua `next_seq`), so a lost hold's number is about the time
/// it was opened in microseconds, and the new Redis's floor is above it unless that
/// Redis's clock is behind the lost one's by more than the outage took. The gap covers such
/// a clock too for the holds opened up to ~16 minutes (10^9 numbers) after the newest
/// settled one. A restore moves ids those ~16 minutes of the floor ahead, so they stay below
/// 2^53, where Lua's doubles stop being exact, until about the year 2255.
pub const HOLD_SEQ_GAP: i64 = 1_000_000_000;

/// lib.lua `CHARGE_BUCKET_MS`: charge records are kept in hourly buckets.
const CHARGE_BUCKET_MS: i64 = 3_600_000;

/// lib.lua `charge_bucket`: the bucket of a charge id (`<shard>-<ms>-<seq>`) and when it
/// expires (as `record_charge`: an hour after the sweeper unlinks it).
/// A consumer group that only exists during a restore, to create an empty outbox.
const RESTORE_GROUP: &str = "tollgate-restore";

fn charge_bucket(tag: &str, id: &str, retention_ms: i64) -> Option<(String, i64)> {
    let mut parts = id.split('-');
    let (_shard, ms, _seq) = (parts.next()?, parts.next()?, parts.next()?);
    let hour = ms.parse::<i64>().ok()?.div_euclid(CHARGE_BUCKET_MS);
    Some((
        format!("{tag}:cb:{hour}"),
        (hour + 2) * CHARGE_BUCKET_MS + retention_ms,
    ))
}

#[derive(Debug, Default, Clone)]
pub struct ShardReport {
    pub shard: u16,
    pub wallets: usize,
    pub events: usize,
    pub open_holds: usize,
    pub charges: usize,
    pub idempotency_records: usize,
    pub orgs: usize,
    /// Org keys revoked because their maker no longer manages the org or their member
    /// left it, whose revocation the store lacked (`revoked_by_role_loss`).
    pub api_keys_revoked: usize,
    /// The shard already served (its epoch marker was there): left as it is.
    pub skipped: bool,
}

impl ShardReport {
    fn left_alone(shard: u16) -> Self {
        Self {
            shard,
            skipped: true,
            ..Default::default()
        }
    }
}

#[derive(Debug, Default)]
pub struct RestoreReport {
    pub shards: Vec<ShardReport>,
    pub api_keys: usize,
    /// Keys the store has that were revoked longer ago than
    /// `gateway.revoked_key_retention_secs`: not written (live Redis drops them).
    pub api_keys_dropped: usize,
    /// Keys of shards left alone that their Redis no longer has although they were made
    /// after its epoch marker: that Redis dropped them (a revocation past the retention,
    /// which the store may lack); not written back.
    pub api_keys_gone_from_serving: usize,
    pub elapsed: Duration,
}

impl RestoreReport {
    pub fn render(&self) -> String {
        let wallets: usize = self.shards.iter().map(|s| s.wallets).sum();
        let events: usize = self.shards.iter().map(|s| s.events).sum();
        let holds: usize = self.shards.iter().map(|s| s.open_holds).sum();
        let records: usize = self.shards.iter().map(|s| s.idempotency_records).sum();
        let skipped = self.shards.iter().filter(|s| s.skipped).count();
        let keys_revoked: usize = self.shards.iter().map(|s| s.api_keys_revoked).sum();
        let keys_revoked = if keys_revoked > 0 {
            format!(
                " ({keys_revoked} of them revoked now: org-wide keys whose maker left the org \
                 or became a plain member, a revocation the store lacked)"
            )
        } else {
            String::new()
        };
        let keys_dropped = if self.api_keys_dropped > 0 {
            format!(
                " ({} revoked longer ago than gateway.revoked_key_retention_secs left out)",
                self.api_keys_dropped
            )
        } else {
            String::new()
        };
        let keys_dropped = if self.api_keys_gone_from_serving > 0 {
            format!(
                "{keys_dropped} ({} that shards left alone no longer had left out)",
                self.api_keys_gone_from_serving
            )
        } else {
            keys_dropped
        };
        let left_alone = if skipped > 0 {
            format!("left {skipped} shards alone (they already served)\n")
        } else {
            String::new()
        };
        format!(
            "{left_alone}restored {} shards: {wallets} wallets from {events} ledger events, {holds} open holds, \
             {records} idempotency records, {} API keys{keys_revoked}{keys_dropped} in {:.1} s\n\
             not restored: refusals (a replayed refused request is evaluated again); idempotency \
             records of captures, releases and of org operations whose \
             events do not name their actor (settled before events carried it) (retried, they \
             are evaluated again); events that never reached \
             the store (the persistence level's loss window, see docs/OPERATIONS.md)\n",
            self.shards.len() - skipped,
            self.api_keys,
            self.elapsed.as_secs_f64()
        )
    }
}

#[derive(Debug, Clone)]
struct Lot {
    amount: i64,
    remaining: i64,
    held: i64,
    /// Credits of it that expired (expire_lot events): listed by ListLots while open
    /// holds still hold credits of the expired lot (lib.lua `expire_lot`, "<id>:x").
    expired: i64,
    score: i64,
    kind: String,
    description: String,
    created_at_ms: i64,
    updated_at_ms: i64,
}

impl Lot {
    fn expires_at_ms(&self) -> i64 {
        match self.score % LotPiece::PRIORITY_UNIT {
            LotPiece::NEVER => 0,
            e => e,
        }
    }
}

#[derive(Debug, Clone)]
struct Hold {
    account_id: String,
    wallet: String,
    member: String,
    amount: i64,
    lots: String,
    deadline_ms: i64,
    policy: String,
    operation: String,
    /// 'a' active, 'c' captured, 'r' released, 'x' expired.
    state: char,
    captured: i64,
    at_ms: i64,
    ended_at_ms: i64,
    /// Ended by a capture or release with an idempotency key: lib.lua `end_hold` keeps
    /// the record as long as that answer can be replayed, past `hold_retention` if need be.
    ended_by_request: bool,
}

#[derive(Debug, Clone)]
struct Charge {
    account_id: String,
    wallet: String,
    member: String,
    amount: i64,
    refunded: i64,
    lots: String,
    at_ms: i64,
}

/// One wallet's state, rebuilt from its events.
#[derive(Debug, Default)]
struct Wallet {
    account_id: String,
    wallet: String,
    lots: BTreeMap<String, Lot>,
    seq: i64,
    available: i64,
    held: i64,
    granted: i64,
    used: i64,
    expired: i64,
    refunded: i64,
    adjusted: i64,
    demo: bool,
    joined: bool,
    /// The account has a budget on this wallet (the wallet's "bg" flag).
    budget: bool,
    events: usize,
    /// Its open holds (the wallet's `:hw:`).
    open_holds: usize,
    /// It has an allocation of a member (lib.lua `has_allocation`: a member's allocated
    /// field, not only what they used) after the events replayed so far.
    allocated: bool,
    /// It has an allocation or a budget (of the account or of a member) after the events
    /// replayed so far: not dead (lib.lua `wallet_dead`). Set and removed only by this
    /// wallet's own events (a member's removal emits one per allocation and budget).
    org_bound: bool,
    /// After its events, in stream order, those that join the set or change whether it
    /// is dead: what the wallet set made of it then.
    marks: Vec<SetMark>,
    /// Charges of this wallet older than the charge retention (not kept in the shard's
    /// charges, not written back) that a refund other than a void's refunded, and how much
    /// of each: a later refund's answer counts what the charge had refunded. A refund is
    /// made in its charge's wallet (lib.lua `refund_charge`), so this lives while the
    /// wallet replays; a void refunds all that is left (no refund can follow it).
    old_refunds: HashMap<String, i64>,
}

/// How an event left its wallet with respect to the account's wallet set (lib.lua
/// `join_wallet_set`, `wallet_set_refuses`, `wallet_dead`).
#[derive(Debug, Clone, Copy)]
struct SetMark {
    position: (i64, i64),
    join: Join,
    /// Dead once the event was written: nothing available or held, no lot, no open hold,
    /// no allocation or budget (lib.lua `wallet_dead`).
    dead: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Join {
    /// The event does not join the set.
    No,
    /// It joins it, and a wallet outside a full set first dropped the set's dead wallets
    /// (a grant, a positive adjustment, a budget, a first allocation).
    AtCap,
    /// It joins it past the cap (a refund's lots, an allocation of a wallet that had one).
    PastCap,
}

impl Wallet {
    /// The wallet once its last event is replayed: what only its replay needed goes.
    fn replayed(mut self) -> Self {
        self.old_refunds = HashMap::new();
        self
    }

    /// What [`SetMark`] event `e` (just replayed) leaves; `was_allocated`: whether the
    /// wallet had an allocation of a member before it (lua/org.lua lets such a wallet in
    /// past the cap).
    fn mark(&mut self, e: &LedgerEvent, was_allocated: bool) {
        let join = match e.kind {
            // A member's removal takes their allocations and budgets from the wallets of
            // the set (lua/org.lua): it joins nothing.
            EventKind::Allocate | EventKind::Budget
                if e.operation == super::reconcile::ALLOCATION_REMOVED =>
            {
                Join::No
            }
            EventKind::Grant | EventKind::Budget => Join::AtCap,
            EventKind::Adjust if e.amount > 0 => Join::AtCap,
            EventKind::Allocate if was_allocated => Join::PastCap,
            EventKind::Allocate => Join::AtCap,
            EventKind::Refund if !e.lots.is_empty() => Join::PastCap,
            _ => Join::No,
        };
        let dead = self.available == 0
            && self.held == 0
            && self.lots.is_empty()
            && self.open_holds == 0
            && !self.org_bound;
        // Kept only where something changes: a mark per event would cost a restore of
        // tens of millions of events memory for nothing.
        if join != Join::No || self.marks.last().is_none_or(|m| m.dead != dead) {
            self.marks.push(SetMark {
                position: e.stream_position(),
                join,
                dead,
            });
        }
    }
}

/// Which wallets of one account are in its wallet set once all their events are
/// replayed, as the live Redis left it: a wallet joins when an event of [`Join`] names
/// it, and when one names a wallet outside a set holding `cap` or more, the wallets of
/// the set that were dead then left it first (lib.lua `wallet_set_refuses`; the lot
/// expiries and hold ends it made on the way are events before it, so already replayed).
/// `wallets`: one account's, each with its marks; sets their `joined`.
fn wallet_sets(wallets: &mut [Wallet], cap: u32) {
    let mut marks: Vec<(SetMark, usize)> = wallets
        .iter()
        .enumerate()
        .flat_map(|(n, w)| w.marks.iter().map(move |m| (*m, n)))
        .collect();
    marks.sort_by_key(|(m, _)| m.position);
    let mut in_set = vec![false; wallets.len()];
    let mut dead = vec![false; wallets.len()];
    for (m, n) in marks {
        if m.join != Join::No && !in_set[n] {
            let size = in_set.iter().filter(|i| **i).count();
            if m.join == Join::AtCap && size >= cap as usize {
                for (i, d) in in_set.iter_mut().zip(&dead) {
                    *i &= !*d;
                }
            }
            in_set[n] = true;
        }
        dead[n] = m.dead;
    }
    for (w, i) in wallets.iter_mut().zip(in_set) {
        w.joined = i;
        w.marks = Vec::new();
    }
}

pub(crate) fn pieces_text(pieces: &[LotPiece]) -> String {
    pieces
        .iter()
        .map(|p| match p.score {
            Some(s) => format!("{}:{}:{s}", p.lot_id, p.amount),
            None => format!("{}:{}", p.lot_id, p.amount),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// An idempotency record: the key's name and value, as lua/lib.lua writes them.
struct Record {
    /// `<account>:<key>`: lib.lua names the record by the SHA-1 of it.
    name: String,
    value: String,
    at_ms: i64,
    /// A refund's (charge id, account): lib.lua's `:rf:` pointer lets a retry find the
    /// answer after the charge record expired.
    refund_of: Option<(String, String)>,
}

/// Writes one idempotency record as lib.lua `remember` does: a field named by the first 30
/// hex digits of SHA-1("<account>:<key>") in the shard's bucket hash of the record's time,
/// with the bucket's safety-net expiry.
const REMEMBER_LUA: &str = "local f = string.sub(redis.sha1hex(ARGV[1]), 1, 30) \
    redis.call('HSET', KEYS[1], f, ARGV[2]) \
    redis.call('PEXPIREAT', KEYS[1], ARGV[3], 'NX') return 1";
/// Buckets a lookup reads (lib.lua IDEM_BUCKETS_LOOKED_AT).
const IDEM_BUCKETS_LOOKED_AT: i64 = 3;

/// What a restore writes back, as of its start (`now`): the rules live Redis drops its
/// records by. The replay applies them as it goes, not only when it writes, so what it
/// holds in memory is what live Redis would hold (plus open holds and the shard's wallets),
/// not the shard's whole history.
#[derive(Debug, Clone, Copy)]
struct Keep {
    now: i64,
    /// Idempotency bucket span: half the window (lib.lua IDEM_SPAN_MS).
    span: i64,
    hold_retention_ms: i64,
    /// The longest a record can be found (lib.lua `idem_life_ms`).
    idem_life_ms: i64,
    charge_retention_ms: i64,
}

impl Keep {
    fn new(settings: &crate::ledger::LedgerSettings, now: i64) -> Self {
        let window_ms = settings.idempotency_window.as_millis() as i64;
        // Idempotency buckets span half the window (lib.lua IDEM_SPAN_MS); a record is
        // found for IDEM_BUCKETS_LOOKED_AT spans at most (lib.lua idem_life_ms).
        let span = (window_ms / 2).max(1);
        Self {
            now,
            span,
            hold_retention_ms: settings.hold_retention.as_millis() as i64,
            idem_life_ms: IDEM_BUCKETS_LOOKED_AT * span,
            charge_retention_ms: settings.charge_retention.as_millis() as i64,
        }
    }

    /// Whether a lookup in live Redis would still find a record made at `at_ms` (its
    /// bucket, the current one or the two before it: up to 1.5 windows old).
    fn record(&self, at_ms: i64) -> bool {
        at_ms / self.span > self.now / self.span - IDEM_BUCKETS_LOOKED_AT
    }

    /// How long an ended hold's record has left (<= 0: live Redis dropped it). As lib.lua
    /// `end_hold`: an answer a capture or release gave is found through its hold, so the
    /// record lives as long as that answer can be replayed.
    fn ended_hold_ttl(&self, h: &Hold) -> i64 {
        let keep_ms = if h.ended_by_request {
            self.hold_retention_ms.max(self.idem_life_ms)
        } else {
            self.hold_retention_ms
        };
        h.ended_at_ms + keep_ms - self.now
    }

    /// How long a charge made at `at_ms` has left (<= 0: not written back).
    fn charge_ttl(&self, at_ms: i64) -> i64 {
        at_ms + self.charge_retention_ms - self.now
    }
}

struct Replay<'a> {
    wallet: Wallet,
    /// Open holds, and ended ones within their retention ([`Keep::ended_hold_ttl`]).
    holds: &'a mut HashMap<String, Hold>,
    /// Charges within the charge retention ([`Keep::charge_ttl`]).
    charges: &'a mut HashMap<String, Charge>,
    /// The shard's records so far that live Redis still finds ([`Keep::record`]; a void's
    /// event drops its charge's: `forget_record_of`).
    records: &'a mut Vec<Record>,
    orgs: &'a mut OrgState,
    /// The highest hold sequence number of the shard's holds so far (ended ones dropped
    /// included): the restored `{tg:S}:seq` goes past it.
    hold_seq: &'a mut i64,
    keep: Keep,
}

/// A budget's definition, from its latest `budget` event.
#[derive(Debug, Clone)]
struct BudgetDef {
    limit: i64,
    period: String,
    window_ms: i64,
    offset_ms: i64,
    /// When the budget began counting: set anew, or with another period (a new limit
    /// alone keeps the spend, as lua/org.lua does).
    since_ms: i64,
}

/// lib.lua `BUDGET_BUCKETS`: a window budget counts in this many buckets.
const BUDGET_BUCKETS: i64 = 16;

impl BudgetDef {
    /// lib.lua's budget key: the account's own, or an org member's.
    fn key(tag: &str, account: &str, wallet: &str, member: &str) -> String {
        if member.is_empty() {
            format!("{tag}:bg:{account}:{wallet}")
        } else {
            format!("{tag}:bg:{account}:{wallet}:{member}")
        }
    }

    /// Creation stamp of a restored budget (lua/org.lua's are `INCR`s: never alike).
    fn stamp(&self) -> String {
        format!("r{}", self.since_ms)
    }

    /// A window budget's bucket length.
    fn bucket_ms(&self) -> i64 {
        ((self.window_ms + BUDGET_BUCKETS - 1) / BUDGET_BUCKETS).max(1)
    }

    /// The period (calendar start, or window bucket) a charge at `at_ms` counts in, as
    /// lib.lua `budget_state` names it.
    fn period_of(&self, at_ms: i64) -> i64 {
        if self.period == "w" {
            at_ms.div_euclid(self.bucket_ms())
        } else {
            period_start(&self.period, self.offset_ms, at_ms)
        }
    }
}

impl RunningSpend {
    /// Moves to the period holding `now` (lib.lua `budget_state`: a new calendar period
    /// starts from nothing, a window drops buckets it no longer counts; a budget set anew
    /// starts from nothing); answers that period (start, or window bucket).
    fn roll(&mut self, b: &BudgetDef, now: i64) -> i64 {
        if self.since_ms != b.since_ms {
            *self = RunningSpend {
                since_ms: b.since_ms,
                ..Default::default()
            };
        }
        let period = b.period_of(now);
        if b.period == "w" {
            self.buckets
                .retain(|idx, n| *idx >= period - BUDGET_BUCKETS && *n > 0);
        } else if self.period != period {
            self.period = period;
            self.spent = 0;
        }
        period
    }

    /// What is spent in the current period (after [`Self::roll`]).
    fn total(&self) -> i64 {
        self.spent + self.buckets.values().sum::<i64>()
    }
}

/// A charge counted in budgets: a debit, or a hold less what its end gave back.
#[derive(Debug, Clone)]
struct Spend {
    account_id: String,
    wallet: String,
    member: String,
    at_ms: i64,
    amount: i64,
    /// What the hold's capture, release or expiry gave back (lib.lua `budgets_give_back`).
    returned: i64,
}

/// Organizations of one shard, rebuilt from their events.
#[derive(Debug, Default)]
struct OrgState {
    /// org → (created ms, member → role).
    members: BTreeMap<String, (i64, BTreeMap<String, String>)>,
    /// (org, member) → when an owner or admin last left the org or became a plain member:
    /// when lua/org.lua revoked the keys they made (`revoked_by_role_loss`).
    lost_key_right_ms: BTreeMap<(String, String), i64>,
    /// (org, member) → when the member last left the org: when lua/org.lua revoked the
    /// keys bound to them (`revoked_by_role_loss`).
    left_ms: BTreeMap<(String, String), i64>,
    /// (org, wallet, member) → (allocated: None without an `allocate` event (an owner or
    /// admin spending unbounded), used).
    allocations: BTreeMap<(String, String, String), (Option<i64>, i64)>,
    /// (account, wallet, member: "" = the account's own) → budget.
    budgets: BTreeMap<(String, String, String), BudgetDef>,
    /// Charges (debits and holds), to rebuild the spend of the budgets' current periods.
    spends: Vec<Spend>,
    /// Hold id → its entry in `spends`.
    hold_spends: HashMap<String, usize>,
    /// Debit event id → its entry in `spends` (a void gives it back: [`Self::undo_debit`]).
    debit_spends: HashMap<String, usize>,
    /// Each budget's spend as lib.lua's `budget_state` reads it at this point of the replay
    /// (stream order), for the answers' spendable figure (lua/debit.lua).
    running: HashMap<BudgetKey, RunningSpend>,
    /// Hold id → the budgets (and their periods) it counted in, as lib.lua's refs.
    hold_budgets: HashMap<String, Vec<(BudgetKey, i64, i64)>>,
}

/// (account, wallet, member: "" = the account's own).
type BudgetKey = (String, String, String);

/// A budget's spend at one point of the replay: `since_ms` names the budget it belongs to
/// (a budget set anew starts from nothing); a calendar budget's period start and spend,
/// a window budget's buckets.
#[derive(Debug, Default)]
struct RunningSpend {
    since_ms: i64,
    period: i64,
    spent: i64,
    buckets: BTreeMap<i64, i64>,
}

impl OrgState {
    /// Whether wallet `wallet` of `account` has an allocation of a member now, and whether
    /// it has that or a budget of the account or a member (lib.lua `has_allocation`,
    /// `wallet_dead`). A removed member's allocations and budgets went with their events;
    /// an orphan budget of a member removed by an older tollgate counts whether or not the
    /// member is in the org, where lib.lua looks at members' only (docs/ARCHITECTURE.md,
    /// "Wallet cap").
    fn binds(&self, account: &str, wallet: &str) -> (bool, bool) {
        let from = (account.to_owned(), wallet.to_owned(), String::new());
        let of_wallet = |k: &&BudgetKey| k.0 == account && k.1 == wallet;
        let allocated = self
            .allocations
            .range(from.clone()..)
            .take_while(|(k, _)| of_wallet(k))
            .any(|(_, (allocated, _))| allocated.is_some());
        let budget = self
            .budgets
            .range(from..)
            .take_while(|(k, _)| of_wallet(k))
            .next()
            .is_some();
        (allocated, allocated || budget)
    }

    /// What is left of the allocation of the member charging in `e`, once `e` is counted
    /// (None: the member has no allocation, e.g. an owner spending unbounded).
    fn allocation_left(&self, e: &LedgerEvent) -> Option<i64> {
        let key = (e.account_id.clone(), e.wallet.clone(), e.member.clone());
        let (allocated, used) = self.allocations.get(&key)?;
        allocated.map(|a| a - used)
    }

    /// Counts a debit or a hold in the budgets' spend. Answers the tightest headroom it
    /// leaves in the budgets that bound it (limit - spent, this charge counted; lib.lua
    /// `spendable_after`), None when no budget does.
    fn spend(&mut self, e: &LedgerEvent) -> Option<i64> {
        let mut headroom: Option<i64> = None;
        let mut counted = Vec::new();
        // The account's own budget, then the member's (lib.lua `budgets_for`).
        let scopes: &[&str] = if e.member.is_empty() {
            &[""]
        } else {
            &["", &e.member]
        };
        for member in scopes {
            let key = (e.account_id.clone(), e.wallet.clone(), (*member).to_owned());
            let Some(b) = self.budgets.get(&key) else {
                continue;
            };
            let run = self.running.entry(key.clone()).or_default();
            let period = run.roll(b, e.created_at_ms);
            if b.period == "w" {
                *run.buckets.entry(period).or_default() += e.amount;
            } else {
                run.spent += e.amount;
            }
            let left = b.limit - run.total();
            headroom = Some(headroom.map_or(left, |h| h.min(left)));
            counted.push((key, b.since_ms, period));
        }
        if counted.is_empty() {
            // No budget counts it, and none set later will (lua/org.lua starts a new
            // budget from nothing): nothing to keep.
            return headroom;
        }
        if e.kind == EventKind::Hold {
            self.hold_spends
                .insert(e.hold_id.clone(), self.spends.len());
            self.hold_budgets.insert(e.hold_id.clone(), counted);
        } else {
            self.debit_spends
                .insert(e.event_id.clone(), self.spends.len());
        }
        self.spends.push(Spend {
            account_id: e.account_id.clone(),
            wallet: e.wallet.clone(),
            member: e.member.clone(),
            at_ms: e.created_at_ms,
            amount: e.amount,
            returned: 0,
        });
        headroom
    }

    /// An ended hold gives back what it did not charge, as it did to the budgets it was
    /// counted in: those that have counted since before it (the same budget, whose
    /// current period is the only one restored).
    fn give_back(&mut self, hold_id: &str, amount: i64) {
        // A hold ends once: its entries go (an ended hold gives back nothing more).
        if let Some(i) = self.hold_spends.remove(hold_id) {
            self.spends[i].returned += amount;
        }
        // And to the running spend, as lib.lua `budgets_give_back`: only to the same budget
        // (not one set anew since), in the period the hold counted in.
        for (key, since_ms, period) in self.hold_budgets.remove(hold_id).unwrap_or_default() {
            let (Some(b), Some(run)) = (self.budgets.get(&key), self.running.get_mut(&key)) else {
                continue;
            };
            if amount <= 0 || b.since_ms != since_ms || run.since_ms != since_ms {
                continue;
            }
            if b.period == "w" {
                if let Some(n) = run.buckets.get_mut(&period).filter(|n| **n > 0) {
                    *n -= amount.min(*n);
                }
            } else if run.period == period {
                run.spent = (run.spent - amount).max(0);
            }
        }
    }

    /// A void undid debit `event_id`: all it counted is given back as lib.lua
    /// `budgets_undo_debit` does (a part refunded before included), to each budget of the
    /// debit's wallet and member that was counting before the debit's millisecond, in the
    /// period (or window bucket) holding that time.
    fn undo_debit(&mut self, event_id: &str) {
        let Some(i) = self.debit_spends.remove(event_id) else {
            return;
        };
        let spend = &mut self.spends[i];
        let amount = spend.amount;
        spend.returned += amount;
        let (at_ms, account, wallet, member) = (
            spend.at_ms,
            spend.account_id.clone(),
            spend.wallet.clone(),
            spend.member.clone(),
        );
        let scopes: &[&str] = if member.is_empty() {
            &[""]
        } else {
            &["", &member]
        };
        for scope in scopes {
            let key = (account.clone(), wallet.clone(), (*scope).to_owned());
            let (Some(b), Some(run)) = (self.budgets.get(&key), self.running.get_mut(&key)) else {
                continue;
            };
            // Made in the debit's millisecond or later: nothing, as lib.lua gives (its
            // stamps cannot order a budget and a debit within one millisecond).
            if amount <= 0 || b.since_ms >= at_ms || run.since_ms != b.since_ms {
                continue;
            }
            let period = b.period_of(at_ms);
            if b.period == "w" {
                if let Some(n) = run.buckets.get_mut(&period).filter(|n| **n > 0) {
                    *n -= amount.min(*n);
                }
            } else if run.period == period {
                run.spent = (run.spent - amount).max(0);
            }
        }
    }

    /// lib.lua `budgets_spend`'s refs of an open hold: the budgets that counted it when it
    /// was placed ("key|period|stamp,..."), so its end gives back as it would have.
    fn hold_refs(&self, tag: &str, h: &Hold) -> String {
        // The account's own budget first, then the member's (lib.lua `budgets_for`).
        let scopes: &[&str] = if h.member.is_empty() {
            &[""]
        } else {
            &["", &h.member]
        };
        let refs: Vec<String> = scopes
            .iter()
            .filter_map(|member| {
                let key = (h.account_id.clone(), h.wallet.clone(), (*member).to_owned());
                let b = self.budgets.get(&key).filter(|b| b.since_ms <= h.at_ms)?;
                Some(format!(
                    "{}|{}|{}",
                    BudgetDef::key(tag, &h.account_id, &h.wallet, member),
                    b.period_of(h.at_ms),
                    b.stamp()
                ))
            })
            .collect();
        refs.join(",")
    }

    fn use_allocation(&mut self, e: &LedgerEvent) {
        if let Some(delta) = e.allocation_delta().filter(|d| *d != 0) {
            self.allocations
                .entry((e.account_id.clone(), e.wallet.clone(), e.member.clone()))
                .or_default()
                .1 += delta;
        }
    }
}

/// Start of the calendar period holding `now` (lua/lib.lua `period_bounds`).
fn period_start(period: &str, offset_ms: i64, now: i64) -> i64 {
    const DAY_MS: i64 = 86_400_000;
    let days = (now + offset_ms).div_euclid(DAY_MS);
    if period == "d" {
        return days * DAY_MS - offset_ms;
    }
    // civil_from_days / days_from_civil (Howard Hinnant's algorithms).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let (y, m) = (if m <= 2 { y - 1 } else { y }, m);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe - 719_468) * DAY_MS - offset_ms
}

impl Replay<'_> {
    fn fail(e: &LedgerEvent, why: &str) -> RestoreError {
        RestoreError::Replay(e.event_id.clone(), why.to_owned())
    }

    fn create_lots(
        &mut self,
        e: &LedgerEvent,
        kind: &str,
        description: &str,
    ) -> Result<(), RestoreError> {
        for p in &e.lots {
            let score = p
                .score
                .ok_or_else(|| Self::fail(e, "a new lot without its score"))?;
            if let Ok(n) = p.lot_id.parse::<i64>() {
                self.wallet.seq = self.wallet.seq.max(n);
            }
            self.wallet.lots.insert(
                p.lot_id.clone(),
                Lot {
                    amount: p.amount,
                    remaining: p.amount,
                    held: 0,
                    expired: 0,
                    score,
                    kind: kind.to_owned(),
                    description: description.to_owned(),
                    created_at_ms: e.created_at_ms,
                    updated_at_ms: e.created_at_ms,
                },
            );
        }
        Ok(())
    }

    fn lot(&mut self, e: &LedgerEvent, id: &str) -> Result<&mut Lot, RestoreError> {
        self.wallet
            .lots
            .get_mut(id)
            .ok_or_else(|| Self::fail(e, &format!("unknown lot {id}")))
    }

    fn take(&mut self, e: &LedgerEvent, into_hold: bool) -> Result<(), RestoreError> {
        for p in &e.lots {
            let lot = self.lot(e, &p.lot_id)?;
            lot.remaining -= p.amount;
            lot.updated_at_ms = e.created_at_ms;
            if into_hold {
                lot.held += p.amount;
            }
            if lot.remaining < 0 {
                return Err(Self::fail(e, "a lot went negative"));
            }
        }
        Ok(())
    }

    /// Records a charge (debit, hold) as its script remembered it. `parts` end with the
    /// member, which joins the digest only when there is one (`Ledger::debit_call`,
    /// `authorize_call`). When an allocation or a budget bounds the charge, the answer also
    /// carries what was left to spend then: the tightest of the member's allocation left
    /// and the budgets' headroom (`budget_left`, from [`OrgState::spend`]), within the
    /// balance, never below 0 (lua/debit.lua, lua/authorize.lua). The replay is in stream
    /// order, so the allocation and budgets are those of that moment, this charge counted.
    fn record_charge(
        &mut self,
        e: &LedgerEvent,
        parts: &[&str],
        answer: String,
        budget_left: Option<i64>,
    ) {
        let (parts, allocation_left) = if e.member.is_empty() {
            (&parts[..parts.len() - 1], None)
        } else {
            (parts, self.orgs.allocation_left(e))
        };
        let spendable = match (allocation_left, budget_left) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let answer = match spendable {
            Some(left) => format!("{answer}|{}", left.min(e.available_after).max(0)),
            None => answer,
        };
        self.record(e, parts, answer);
    }

    fn record(&mut self, e: &LedgerEvent, parts: &[&str], answer: String) {
        // A record live Redis no longer finds is not written back: not kept either (a void
        // that would forget it finds nothing, as the write would have left it out).
        if e.idempotency_key.is_empty() || !self.keep.record(e.created_at_ms) {
            return;
        }
        self.records.push(Record {
            name: format!("{}:{}", e.account_id, e.idempotency_key),
            value: format!("{}{answer}", digest(parts)),
            at_ms: e.created_at_ms,
            refund_of: (e.kind == EventKind::Refund)
                .then(|| (e.charge_id.clone(), e.account_id.clone())),
        });
    }

    /// Records an org operation as lua/org.lua remembered it: the request digest of
    /// `Ledger::org_call` ("org", operation, actor, member, role, wallet, amount, period,
    /// window ms, UTC offset ms; the parameters an operation does not take are "" or "0"),
    /// all in the event: the actor in its `ac` field. An operation by an owner or admin
    /// whose event does not name them (settled before events carried the actor) gets no
    /// record: its digest cannot be rebuilt, and a record with another digest would answer
    /// the very retry it is for IDEMPOTENCY_KEY_REUSED. Only the event that answered
    /// (a RemoveMember's `member` event, not the `allocate` and `budget` events of operation
    /// `remove` that follow it with the same key) is recorded.
    fn record_org(&mut self, e: &LedgerEvent, used_before: i64) {
        let op = e.operation.as_str();
        let by_actor = matches!(op, "add" | "remove" | "allocate_set" | "allocate_add");
        if by_actor && e.actor.is_empty() {
            return;
        }
        // Period, window ms and UTC offset ms of an operation that sets no budget.
        const NO_BUDGET: [&str; 3] = ["", "0", "0"];
        let (role, amount, spec, answer) = match (e.kind, op) {
            (EventKind::Member, "create") => (
                "",
                "0".to_owned(),
                NO_BUDGET,
                format!("OK|{}|{}", e.event_id, e.created_at_ms),
            ),
            (EventKind::Member, "add") => (
                e.extra.as_str(),
                "0".to_owned(),
                NO_BUDGET,
                format!("OK|{}|{}", e.event_id, e.extra),
            ),
            (EventKind::Member, "remove") => (
                "",
                "0".to_owned(),
                NO_BUDGET,
                format!("OK|{}|removed", e.event_id),
            ),
            (EventKind::Allocate, "allocate_set" | "allocate_add") => {
                // A set's amount is the new allocation; an add's, the change (`x`).
                let amount = if op == "allocate_set" {
                    e.amount
                } else {
                    match e.extra.parse::<i64>() {
                        Ok(delta) => delta,
                        Err(_) => return,
                    }
                };
                (
                    "",
                    amount.to_string(),
                    NO_BUDGET,
                    format!("OK|{}|{}|{used_before}", e.event_id, e.amount),
                )
            }
            (EventKind::Budget, "budget") => {
                let mut parts = e.extra.split('|');
                let (Some(period), Some(window), Some(offset), None) =
                    (parts.next(), parts.next(), parts.next(), parts.next())
                else {
                    return;
                };
                (
                    "",
                    e.amount.to_string(),
                    [period, window, offset],
                    format!("OK|{}|{}", e.event_id, e.amount),
                )
            }
            _ => return,
        };
        let [period, window, offset] = spec;
        let parts = [
            "org",
            op,
            e.actor.as_str(),
            e.member.as_str(),
            role,
            e.wallet.as_str(),
            amount.as_str(),
            period,
            window,
            offset,
        ];
        self.record(e, &parts, answer);
    }

    /// Organization events: membership, allocations, budgets. Nothing in the wallet moves.
    fn apply_org(&mut self, e: &LedgerEvent) -> Result<(), RestoreError> {
        match e.kind {
            EventKind::Member => {
                let org = self
                    .orgs
                    .members
                    .entry(e.account_id.clone())
                    .or_insert_with(|| (e.created_at_ms, BTreeMap::new()));
                let managed = org
                    .1
                    .get(&e.member)
                    .is_some_and(|role| role == "owner" || role == "admin");
                if e.extra == "removed" {
                    org.1.remove(&e.member);
                    self.orgs
                        .left_ms
                        .insert((e.account_id.clone(), e.member.clone()), e.created_at_ms);
                } else {
                    org.1.insert(e.member.clone(), e.extra.clone());
                }
                if managed && (e.extra == "removed" || e.extra == "member") {
                    self.orgs
                        .lost_key_right_ms
                        .insert((e.account_id.clone(), e.member.clone()), e.created_at_ms);
                }
                self.record_org(e, 0);
            }
            EventKind::Allocate => {
                // An allocated wallet is in the org's wallet set (lua/org.lua), as a
                // budgeted one is.
                self.wallet.joined = true;
                let allocation = self
                    .orgs
                    .allocations
                    .entry((e.account_id.clone(), e.wallet.clone(), e.member.clone()))
                    .or_default();
                allocation.0 = super::reconcile::allocated_after(e);
                // The answer says what the member had used when the allocation changed.
                let used_before = allocation.1;
                self.record_org(e, used_before);
            }
            EventKind::Budget => {
                self.wallet.joined = true;
                self.record_org(e, 0);
                let key = (e.account_id.clone(), e.wallet.clone(), e.member.clone());
                if e.amount == 0 {
                    self.orgs.budgets.remove(&key);
                } else {
                    let mut spec = e.extra.split('|');
                    let mut next = || spec.next().unwrap_or_default().to_owned();
                    let period = next();
                    let window_ms = next().parse().unwrap_or(0);
                    let offset_ms = next().parse().unwrap_or(0);
                    let since_ms = match self.orgs.budgets.get(&key) {
                        Some(old)
                            if old.period == period
                                && old.window_ms == window_ms
                                // A rolling window's offset is no part of it (org.lua).
                                && (period == "w" || old.offset_ms == offset_ms) =>
                        {
                            old.since_ms
                        }
                        _ => e.created_at_ms,
                    };
                    self.orgs.budgets.insert(
                        key,
                        BudgetDef {
                            limit: e.amount,
                            period,
                            window_ms,
                            offset_ms,
                            since_ms,
                        },
                    );
                }
            }
            _ => return Err(Self::fail(e, "not an organization event")),
        }
        Ok(())
    }

    fn apply(&mut self, e: &LedgerEvent) -> Result<(), RestoreError> {
        if matches!(
            e.kind,
            EventKind::Member | EventKind::Allocate | EventKind::Budget
        ) {
            self.wallet.events += 1;
            self.apply_org(e)?;
            if e.kind != EventKind::Member {
                (self.wallet.allocated, self.wallet.org_bound) =
                    self.orgs.binds(&e.account_id, &e.wallet);
            }
            return Ok(());
        }
        // A member's charges and what comes back of them move their allocation; charges
        // count in the budgets of their period.
        self.orgs.use_allocation(e);
        let budget_left = if matches!(e.kind, EventKind::Debit | EventKind::Hold) {
            self.orgs.spend(e)
        } else {
            None
        };
        let w = &mut self.wallet;
        w.events += 1;
        let (kind_text, description) = e.extra.split_once('|').unwrap_or(("", ""));
        match e.kind {
            EventKind::Grant => {
                self.create_lots(e, kind_text, description)?;
                let w = &mut self.wallet;
                w.granted += e.amount;
                w.joined = true;
                w.demo |= kind_text == "demo";
                let piece = e
                    .lots
                    .first()
                    .ok_or_else(|| Self::fail(e, "grant without lot"))?;
                let (priority, expires) = (
                    piece.priority().unwrap_or_default().to_string(),
                    piece.expires_at_ms().unwrap_or_default().to_string(),
                );
                let answer = format!("OK|{}|{}|{}", e.event_id, piece.lot_id, e.available_after);
                let amount = e.amount.to_string();
                self.record(
                    e,
                    &[
                        "grant",
                        &e.wallet,
                        &amount,
                        kind_text,
                        &priority,
                        &expires,
                        description,
                        &e.metadata,
                    ],
                    answer,
                );
            }
            EventKind::Adjust => {
                // A positive adjustment makes a lot (its priority and expiry are the
                // request's); a negative one takes credits and has neither (Admin refuses
                // them: the request's digest is the defaults', its answer has no lot, as
                // adjust.lua's). One an older build took with other ones is refused when
                // retried (IDEMPOTENCY_KEY_REUSED), never taken twice.
                let (lot_id, priority, expires) = if e.amount > 0 {
                    self.create_lots(e, "adjustment", description)?;
                    self.wallet.joined = true;
                    let piece = e
                        .lots
                        .first()
                        .ok_or_else(|| Self::fail(e, "adjust without lot"))?;
                    (
                        piece.lot_id.as_str(),
                        piece.priority().unwrap_or_default().to_string(),
                        piece.expires_at_ms().unwrap_or_default().to_string(),
                    )
                } else {
                    self.take(e, false)?;
                    (
                        "",
                        crate::ledger::command::PRIORITY_DEFAULT.to_string(),
                        "0".to_owned(),
                    )
                };
                self.wallet.adjusted += e.amount;
                let answer = format!("OK|{}|{lot_id}|{}", e.event_id, e.available_after);
                let amount = e.amount.to_string();
                self.record(
                    e,
                    &[
                        "adjust",
                        &e.wallet,
                        &amount,
                        &priority,
                        &expires,
                        description,
                        &e.metadata,
                    ],
                    answer,
                );
            }
            EventKind::Debit => {
                self.take(e, false)?;
                self.wallet.used += e.amount;
                self.keep_charge(e, e.amount);
                let answer = format!(
                    "OK|{}|{}|{}|{}",
                    e.event_id, e.amount, e.available_after, e.held_after
                );
                let amount = e.amount.to_string();
                self.record_charge(
                    e,
                    &[
                        "debit",
                        &e.wallet,
                        &amount,
                        &e.operation,
                        &e.metadata,
                        &e.member,
                    ],
                    answer,
                    budget_left,
                );
            }
            EventKind::Hold => {
                self.take(e, true)?;
                self.wallet.held += e.amount;
                self.wallet.open_holds += 1;
                let (policy, deadline) =
                    hold_terms(e).ok_or_else(|| Self::fail(e, "hold without deadline"))?;
                if let Some(seq) = e
                    .hold_id
                    .rsplit_once('-')
                    .and_then(|(_, s)| s.parse::<i64>().ok())
                {
                    *self.hold_seq = (*self.hold_seq).max(seq);
                }
                self.holds.insert(
                    e.hold_id.clone(),
                    Hold {
                        account_id: e.account_id.clone(),
                        wallet: e.wallet.clone(),
                        member: e.member.clone(),
                        amount: e.amount,
                        lots: pieces_text(&e.lots),
                        deadline_ms: deadline,
                        policy: policy.clone(),
                        operation: e.operation.clone(),
                        state: 'a',
                        captured: 0,
                        at_ms: e.created_at_ms,
                        ended_at_ms: 0,
                        ended_by_request: false,
                    },
                );
                let answer = format!(
                    "OK|{}|{}|{}|{deadline}|{}|{}",
                    e.event_id, e.hold_id, e.amount, e.available_after, e.held_after
                );
                let (amount, ttl) = (
                    e.amount.to_string(),
                    (deadline - e.created_at_ms).to_string(),
                );
                self.record_charge(
                    e,
                    &[
                        "authorize",
                        &e.wallet,
                        &amount,
                        &ttl,
                        &policy,
                        &e.operation,
                        &e.metadata,
                        &e.member,
                    ],
                    answer,
                    budget_left,
                );
            }
            EventKind::Capture | EventKind::Release | EventKind::ExpireHold => {
                let returned = e.returned_lots();
                let charged: i64 = e.lots.iter().map(|p| p.amount).sum();
                for p in e.lots.iter().chain(&returned) {
                    let lot = self.lot(e, &p.lot_id)?;
                    lot.held -= p.amount;
                    lot.updated_at_ms = e.created_at_ms;
                }
                for p in &returned {
                    self.lot(e, &p.lot_id)?.remaining += p.amount;
                }
                let hold = self
                    .holds
                    .get_mut(&e.hold_id)
                    .ok_or_else(|| Self::fail(e, "end of an unknown hold"))?;
                if hold.state != 'a' {
                    return Err(Self::fail(e, "a hold ended twice"));
                }
                hold.state = match e.kind {
                    EventKind::Capture => 'c',
                    EventKind::Release => 'r',
                    _ => 'x',
                };
                hold.captured = charged;
                hold.ended_at_ms = e.created_at_ms;
                hold.ended_by_request =
                    e.kind != EventKind::ExpireHold && !e.idempotency_key.is_empty();
                let amount = hold.amount;
                if self.keep.ended_hold_ttl(hold) <= 0 {
                    // Ended longer ago than live Redis keeps its record: not written back.
                    self.holds.remove(&e.hold_id);
                }
                if e.kind == EventKind::Release && e.idempotency_key.is_empty() {
                    // A void's release (lua/void.lua; every Release request has a key): it
                    // forgot the hold's idempotency record, so a retry holds again.
                    self.forget_record_of(&e.account_id, &e.hold_id);
                }
                self.orgs.give_back(&e.hold_id, amount - charged);
                self.wallet.held -= amount;
                self.wallet.open_holds = self.wallet.open_holds.saturating_sub(1);
                self.wallet.used += charged;
                if charged > 0 {
                    self.keep_charge(e, charged);
                }
            }
            EventKind::ExpireLot => {
                for p in &e.lots {
                    let lot = self.lot(e, &p.lot_id)?;
                    lot.remaining -= p.amount;
                    lot.expired += p.amount;
                    lot.updated_at_ms = e.created_at_ms;
                }
                self.wallet.expired += e.amount;
            }
            EventKind::Member | EventKind::Allocate | EventKind::Budget => {}
            EventKind::Refund => {
                self.create_lots(e, "refund", &format!("refund of {}", e.charge_id))?;
                let expired: i64 = e.extra.parse().unwrap_or(0);
                self.wallet.expired += expired;
                self.wallet.refunded += e.amount;
                let total = match self.charges.get_mut(&e.charge_id) {
                    Some(c) => {
                        c.refunded += e.amount;
                        c.refunded
                    }
                    // A charge older than the charge retention (`keep_charge` did not keep
                    // it): what its refunds so far came to, this one counted. (A refund
                    // names a charge live Redis had, refund.lua; one the store lacks the
                    // charge of is taken for such a charge too: the pair assertion still
                    // checks the balance.)
                    None if e.operation == "void" => {
                        // It refunds all that is left: nothing can follow (void.lua).
                        let before = self.wallet.old_refunds.remove(&e.charge_id);
                        before.unwrap_or(0) + e.amount
                    }
                    None => {
                        let done = self
                            .wallet
                            .old_refunds
                            .entry(e.charge_id.clone())
                            .or_default();
                        *done += e.amount;
                        *done
                    }
                };
                let answer = format!(
                    "OK|{}|{}|{total}|{}|{expired}",
                    e.event_id, e.amount, e.available_after
                );
                let amount = e.amount.to_string();
                self.record(e, &["refund", &e.charge_id, &amount, &e.metadata], answer);
                if e.operation == "void" {
                    // A void's refund (lua/void.lua; a Refund request has no operation): it
                    // forgot the debit's idempotency record, so a retry is charged again,
                    // and gave the debit back to its budgets.
                    self.forget_record_of(&e.account_id, &e.charge_id);
                    self.orgs.undo_debit(&e.charge_id);
                }
            }
        }
        self.check_pair(e)
    }

    /// Keeps charge `e` (a debit, or a capture or an expiry that charged `amount`) for the
    /// write and for its refunds, unless it is older than the charge retention: then it is
    /// not written back, and its refunds count on the wallet (`Wallet::old_refunds`).
    fn keep_charge(&mut self, e: &LedgerEvent, amount: i64) {
        if self.keep.charge_ttl(e.created_at_ms) <= 0 {
            return;
        }
        self.charges.insert(
            e.event_id.clone(),
            Charge {
                account_id: e.account_id.clone(),
                wallet: e.wallet.clone(),
                member: e.member.clone(),
                amount,
                refunded: 0,
                lots: pieces_text(&e.lots),
                at_ms: e.created_at_ms,
            },
        );
    }

    /// Drops the idempotency record of `account`'s charge whose answer names `charge`
    /// (a debit's event id, or a hold's id), as the void that undid it forgot it. Looked
    /// for from the newest record back: the charge is of the wallet being replayed, whose
    /// records are the last ones.
    fn forget_record_of(&mut self, account: &str, charge: &str) {
        let prefix = format!("{account}:");
        let of_debit = format!("OK|{charge}|");
        let of_hold = format!("{charge}|");
        let found = self.records.iter().rposition(|r| {
            // The value is the request digest (16 hex digits), then the answer.
            let answer = r.value.get(16..).unwrap_or_default();
            r.name.starts_with(&prefix)
                && (answer.starts_with(&of_debit)
                    || (answer.starts_with("OK|")
                        && answer
                            .splitn(3, '|')
                            .nth(2)
                            .is_some_and(|rest| rest.starts_with(&of_hold))))
        });
        if let Some(at) = found {
            self.records.remove(at);
        }
    }

    fn check_pair(&mut self, e: &LedgerEvent) -> Result<(), RestoreError> {
        let w = &mut self.wallet;
        w.lots.retain(|_, l| l.remaining > 0 || l.held > 0);
        w.available = w.lots.values().map(|l| l.remaining).sum();
        // Pair assertion: the rebuilt balance is the one the script reported.
        if w.available != e.available_after || w.held != e.held_after {
            return Err(Self::fail(
                e,
                &format!(
                    "rebuilt available/held {}/{} but the event says {}/{}",
                    w.available, w.held, e.available_after, e.held_after
                ),
            ));
        }
        Ok(())
    }
}

/// Whether Redis holds tollgate state: a wallet. (Epoch markers alone are shards that were
/// initialized empty; restoring them is harmless.)
/// A wallet key in a shard that does not serve yet (`serving[shard]` false): data of
/// unknown origin that a restore would write over.
async fn redis_holds_data(
    ledger: &Ledger,
    serving: &[bool],
) -> Result<Option<String>, LedgerError> {
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = ledger
            .redis()
            .query(
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg("{tg:*}:w:*")
                    .arg("COUNT")
                    .arg(10_000),
            )
            .await?;
        // Named by shard only: the key itself carries an account id, and this text is logged.
        let unserved = keys.into_iter().find_map(|k| match shard_of_key(&k) {
            None => Some("a wallet key outside every shard".to_owned()),
            Some(s) if !serving.get(usize::from(s)).copied().unwrap_or(false) => {
                Some(format!("a wallet in shard {s}, which does not serve"))
            }
            Some(_) => None,
        });
        if unserved.is_some() {
            return Ok(unserved);
        }
        if next == 0 {
            return Ok(None);
        }
        cursor = next;
    }
}

/// The shard of a key `{tg:<shard>}:...`.
fn shard_of_key(key: &str) -> Option<u16> {
    key.strip_prefix("{tg:")?.split_once('}')?.0.parse().ok()
}

/// What `wipe` deletes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Wipe {
    /// The keys of the shards marked here that have no epoch marker.
    Unserved(Vec<bool>),
    Everything,
}

/// Deletes a shard's keys (KEYS[2..]) only while it has no epoch marker (KEYS[1]), checked
/// in the same atomic step: a shard that starts serving meanwhile (a new shard marked by
/// `serve`, then charged) keeps what it was given from then on. (One call per shard per
/// `SCAN` page: a shard marked between two pages keeps the rest of its keys too.)
const WIPE_UNSERVED_LUA: &str = "if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end \
    for i = 2, #KEYS do redis.call('UNLINK', KEYS[i]) end return #KEYS - 1";

/// Deletes tollgate's keys (`--force`: those of the shards that do not serve;
/// `--rebuild-serving`: all), never the restore lease nor a dead-letter stream.
async fn wipe(ledger: &Ledger, scope: Wipe) -> Result<(), LedgerError> {
    let lease = lease_key(ledger);
    let shards = ledger.shards();
    // A snapshot to skip the shards that serve already; the script checks again.
    let serving = ledger.initialized_shards().await?;
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = ledger
            .redis()
            .query(
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg("{tg:*")
                    .arg("COUNT")
                    .arg(1000),
            )
            .await?;
        let keys: Vec<String> = keys
            .into_iter()
            .filter(|k| *k != lease && !is_dead_letters_key(k))
            .collect();
        if let Wipe::Unserved(chosen) = &scope {
            let mut by_shard: BTreeMap<u16, Vec<String>> = BTreeMap::new();
            for key in keys {
                if let Some(shard) = shard_of_key(&key).filter(|s| {
                    let s = usize::from(*s);
                    chosen.get(s).copied().unwrap_or(false) && !serving[s]
                }) {
                    by_shard.entry(shard).or_default().push(key);
                }
            }
            for (shard, keys) in by_shard {
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(WIPE_UNSERVED_LUA)
                    .arg(keys.len() + 1)
                    .arg(shards.epoch_key(shard))
                    .arg(&keys);
                let _: i64 = ledger.redis().query(&cmd).await?;
            }
        } else if !keys.is_empty() {
            let _: i64 = ledger
                .redis()
                .query(redis::cmd("UNLINK").arg(&keys))
                .await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// The stream the settler sets unreadable entries of `outbox` aside in.
pub fn dead_letters_key(outbox: &str) -> String {
    format!("{outbox}:dead")
}

/// Refuses while a shard about to be rebuilt has dead letters: their events changed its
/// balances in Redis but are not in the store, so the rebuilt wallets would disagree with
/// the events after them (the replay's pair assertion) or silently lose them.
pub(crate) async fn no_dead_letters(ledger: &Ledger, shards: &[u16]) -> Result<(), RestoreError> {
    if shards.is_empty() {
        return Ok(());
    }
    let mut pipe = redis::pipe();
    for shard in shards {
        pipe.cmd("XLEN")
            .arg(dead_letters_key(ledger.shards().outbox(*shard)));
    }
    let lens: Vec<i64> = ledger.redis().pipeline(&pipe).await?;
    let found: Vec<String> = shards
        .iter()
        .zip(lens)
        .filter(|(_, n)| *n > 0)
        .map(|(s, n)| format!("shard {s}: {n}"))
        .collect();
    if found.is_empty() {
        Ok(())
    } else {
        Err(RestoreError::DeadLetters(format!(
            "dead letters in shards to rebuild ({})",
            found.join(", ")
        )))
    }
}

/// Whether `key` is a dead-letter stream ("{tg:<n>}:o:dead", any shard number).
fn is_dead_letters_key(key: &str) -> bool {
    key.strip_suffix(":dead")
        .and_then(|outbox| outbox.strip_suffix(":o"))
        .and_then(|tag| tag.strip_prefix("{tg:"))
        .and_then(|n| n.strip_suffix('}'))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Refuses unless `group` has settled every entry of every shard's outbox.
async fn all_settled(ledger: &Ledger, group: &str) -> Result<(), RestoreError> {
    let shards = ledger.shards();
    for shard in 0..shards.count() {
        let stream = shards.outbox(shard);
        let cannot_tell = |e: SettleError| {
            RestoreError::Unsettled(format!("cannot tell what {stream} settled: {e}"))
        };
        let Some(last) = last_entry_id(ledger, stream).await.map_err(cannot_tell)? else {
            continue;
        };
        let settled = settled_through(ledger, stream, group, &last)
            .await
            .map_err(cannot_tell)?;
        if !settled {
            return Err(RestoreError::Unsettled(format!(
                "settler group {group:?} has not settled {stream} through its newest entry {last}"
            )));
        }
    }
    Ok(())
}

/// Adds one wallet's live state to a pipeline.
fn write_wallet(pipe: &mut Pipeline, tag: &str, w: &Wallet, open_holds: &[(&String, &Hold)]) {
    let base = format!("{}:{}", w.account_id, w.wallet);
    let wkey = format!("{tag}:w:{base}");
    let mut hset = redis::cmd("HSET");
    hset.arg(&wkey)
        .arg("r")
        .arg(w.available)
        .arg("h")
        .arg(w.held)
        .arg("g")
        .arg(w.granted)
        .arg("u")
        .arg(w.used)
        .arg("xp")
        .arg(w.expired)
        .arg("f")
        .arg(w.refunded)
        .arg("j")
        .arg(w.adjusted)
        .arg("s")
        .arg(w.seq);
    if w.demo {
        hset.arg("demo").arg(1);
    }
    if w.budget {
        hset.arg("bg").arg(1);
    }
    let mut due: Option<i64> = None;
    for (id, lot) in &w.lots {
        hset.arg(id).arg(lot.remaining);
        if lot.held > 0 {
            hset.arg(format!("{id}:h")).arg(lot.held);
            // An expired lot open holds still hold: written back into the burn and
            // expiry indexes like a live one, the next touch expires it again (nothing
            // left to expire) into the expired-held index, where ListLots shows these.
            if lot.expired > 0 {
                hset.arg(format!("{id}:x")).arg(lot.expired);
            }
        }
        hset.arg(format!("{id}:u"))
            .arg(lot.updated_at_ms)
            .arg(format!("{id}:m"))
            .arg(format!(
                "{}|{}|{}|{}|{}|{}",
                lot.amount,
                lot.score / LotPiece::PRIORITY_UNIT,
                lot.expires_at_ms(),
                lot.created_at_ms,
                lot.kind,
                lot.description
            ));
        pipe.cmd("ZADD")
            .arg(format!("{tag}:b:{base}"))
            .arg(lot.score)
            .arg(id)
            .ignore();
        let exp = lot.expires_at_ms();
        if exp != 0 {
            pipe.cmd("ZADD")
                .arg(format!("{tag}:x:{base}"))
                .arg(exp)
                .arg(id)
                .ignore();
            due = Some(due.map_or(exp, |d| d.min(exp)));
        }
    }
    for (hold_id, h) in open_holds {
        pipe.cmd("ZADD")
            .arg(format!("{tag}:hw:{base}"))
            .arg(h.deadline_ms)
            .arg(*hold_id)
            .ignore();
        due = Some(due.map_or(h.deadline_ms, |d| d.min(h.deadline_ms)));
    }
    if let Some(due) = due {
        hset.arg("d").arg(due);
        pipe.cmd("ZADD")
            .arg(format!("{tag}:due"))
            .arg(due)
            .arg(&base)
            .ignore();
    }
    pipe.add_command(hset).ignore();
    if w.joined {
        pipe.cmd("HSET")
            .arg(format!("{tag}:ws:{}", w.account_id))
            .arg(&w.wallet)
            .arg(1)
            .ignore();
    }
}

/// Writes organizations, allocations and budgets (with the spend of their current
/// period, rebuilt from the charges: a hold counts what it did not give back when it
/// ended, an open hold counts whole, as when it was placed). Returns the commands queued.
fn write_orgs(pipe: &mut Pipeline, tag: &str, orgs: &OrgState, now: i64) -> usize {
    let mut queued = 0;
    for (org, (created, members)) in &orgs.members {
        let mut cmd = redis::cmd("HSET");
        cmd.arg(format!("{tag}:org:{org}")).arg("c").arg(created);
        for (member, role) in members {
            cmd.arg(format!("m:{member}")).arg(role);
        }
        pipe.add_command(cmd).ignore();
        queued += 1;
    }
    for ((org, wallet, member), (allocated, used)) in &orgs.allocations {
        let key = format!("{tag}:al:{org}:{wallet}");
        let mut cmd = redis::cmd("HSET");
        cmd.arg(&key).arg(format!("{member}:u")).arg(used);
        if let Some(allocated) = allocated {
            cmd.arg(member).arg(allocated);
        }
        pipe.add_command(cmd).ignore();
        queued += 1;
    }
    for ((account, wallet, member), b) in &orgs.budgets {
        let mut cmd = redis::cmd("HSET");
        cmd.arg(BudgetDef::key(tag, account, wallet, member))
            .arg("l")
            .arg(b.limit)
            .arg("p")
            .arg(&b.period)
            .arg("ws")
            .arg(b.window_ms)
            .arg("z")
            .arg(b.offset_ms)
            // A creation stamp, apart from lua/org.lua's INCR ones; restored open holds
            // carry it in their refs.
            .arg("c")
            .arg(b.stamp());
        // Every charge since the budget began counting, less what ended holds gave back.
        let spends = orgs.spends.iter().filter(|c| {
            c.account_id == *account
                && c.wallet == *wallet
                && (member.is_empty() || c.member == *member)
                && c.at_ms >= b.since_ms
        });
        if b.period == "w" {
            let cur = b.period_of(now);
            let mut buckets: BTreeMap<i64, i64> = BTreeMap::new();
            for c in spends {
                let idx = b.period_of(c.at_ms);
                if idx >= cur - BUDGET_BUCKETS {
                    *buckets.entry(idx).or_default() += c.amount - c.returned;
                }
            }
            for (idx, amount) in buckets.into_iter().filter(|(_, n)| *n > 0) {
                cmd.arg(format!("b{idx}")).arg(amount);
            }
        } else {
            let start = b.period_of(now);
            let spent: i64 = spends
                .filter(|c| c.at_ms >= start)
                .map(|c| c.amount - c.returned)
                .sum();
            cmd.arg("s").arg(spent.max(0)).arg("ps").arg(start);
        }
        pipe.add_command(cmd).ignore();
        queued += 1;
    }
    queued
}

/// Which shards a restore may write over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreMode {
    /// Only shards that do not serve and hold no wallets (Redis lost them), or only what
    /// a restore that died left in them.
    Lost,
    /// `--force`: also shards that do not serve but hold data of unknown origin (a dead
    /// restore's half-written shards are redone in every mode: `restoring_key`). What they
    /// hold is deleted first, unsettled outbox entries with it. A shard that serves is
    /// never touched.
    Force,
    /// `--rebuild-serving`: every shard, serving ones too (Redis came back behind the
    /// store, e.g. from an AOF that missed its last second). Refused unless the settler
    /// `group` has settled every outbox entry of every shard; the sidecars must be
    /// stopped (a charge made during the rebuild is lost).
    RebuildServing { group: String },
}

/// Restores every shard that does not serve (has no epoch marker), under the restore
/// lease (one restore at a time). A shard that serves is left alone, even one that starts
/// serving while the restore runs (a new shard marked by `serve`), unless `mode` is
/// `RebuildServing`. Refuses when every shard serves, or when a shard that does not holds
/// wallet data (unless `Force`). Dead-letter streams (`<outbox>:dead`, the only copy of
/// the entries the settler set aside) are never deleted.
pub async fn restore(
    ledger: Arc<Ledger>,
    store: Arc<Store>,
    mode: RestoreMode,
    progress: impl FnMut(&ShardReport, u16),
) -> Result<RestoreReport, RestoreError> {
    let lease = Lease::acquire(&ledger).await?;
    let result = restore_under(&ledger, store, &mode, progress, &lease).await;
    if let Err(err) = lease.release(&ledger).await {
        // It lapses by itself within LEASE_TTL.
        tracing::warn!(error = %err, "cannot free the restore lease");
    }
    result
}

async fn restore_under(
    ledger: &Arc<Ledger>,
    store: Arc<Store>,
    mode: &RestoreMode,
    mut progress: impl FnMut(&ShardReport, u16),
    lease: &Lease,
) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    // The store first: nothing is deleted while it cannot be read.
    store.migrate().await?;
    let rebuilt: Vec<u16> = match mode {
        RestoreMode::RebuildServing { .. } => (0..ledger.shards().count()).collect(),
        _ => {
            let serving = ledger.initialized_shards().await?;
            (0..ledger.shards().count())
                .filter(|s| !serving[usize::from(*s)])
                .collect()
        }
    };
    no_dead_letters(ledger, &rebuilt).await?;
    let count = ledger.shards().count();
    match mode {
        RestoreMode::Lost if rebuilt.is_empty() => {}
        RestoreMode::Lost => {
            // Holding the lease, any marker is a dead restore's: its shards are redone.
            let mut pipe = redis::pipe();
            for shard in &rebuilt {
                pipe.cmd("EXISTS").arg(restoring_key(ledger, *shard));
            }
            let marked: Vec<i64> = ledger.redis().pipeline(&pipe).await?;
            let mut redo = vec![false; usize::from(count)];
            for (shard, _) in rebuilt.iter().zip(marked).filter(|(_, m)| *m == 1) {
                redo[usize::from(*shard)] = true;
            }
            if redo.iter().any(|r| *r) {
                let shards: Vec<usize> = (0..redo.len()).filter(|s| redo[*s]).collect();
                tracing::warn!(
                    ?shards,
                    "shards a restore that died left half-written: rebuilt from the start"
                );
                wipe(ledger, Wipe::Unserved(redo)).await?;
            }
        }
        RestoreMode::Force => wipe(ledger, Wipe::Unserved(vec![true; usize::from(count)])).await?,
        RestoreMode::RebuildServing { group } => {
            all_settled(ledger, group).await?;
            wipe(ledger, Wipe::Everything).await?;
        }
    }
    let serving = ledger.initialized_shards().await?;
    if serving.iter().all(|s| *s) {
        return Err(RestoreError::NotEmpty("every shard serves".into()));
    }
    if let Some(found) = redis_holds_data(ledger, &serving).await? {
        return Err(RestoreError::NotEmpty(found));
    }
    let settings = ledger.settings().clone();
    let now = crate::ledger::wall_clock_ms();
    let keep = Keep::new(&settings, now);
    // Each restored shard stores this span as its numbering (below), whatever the one it
    // had before the loss.
    let span = keep.span;
    let charge_retention_ms = keep.charge_retention_ms;
    let mut report = RestoreReport::default();
    let count = ledger.shards().count();
    // API keys by shard: each shard gets its own before it serves again.
    let mut api_keys: BTreeMap<u16, Vec<ApiKeyRecord>> = BTreeMap::new();
    for key in store.api_keys().await? {
        if let Some(shard) =
            shard_of_key_id(&key.key_id, ledger.shards()).filter(|_| !key.digest.is_empty())
        {
            api_keys.entry(shard).or_default().push(key);
        }
    }
    for shard in 0..count {
        let tag = ledger.shards().tag(shard).to_owned();
        let mut shard_report = ShardReport {
            shard,
            ..Default::default()
        };
        if serving[usize::from(shard)] || serves_now(ledger, lease, shard).await? {
            let left = ShardReport::left_alone(shard);
            progress(&left, count);
            report.shards.push(left);
            continue;
        }
        // The store's fence first: a settler that read events from the Redis that lost
        // this shard can no longer write them once the events below are read (they would
        // be charges the rebuilt shard never had). The store makes it strictly newer than
        // the previous fence and than every marker settled events were read under, and at
        // least this host's clock, so hosts whose clocks differ do not matter; the rebuilt
        // shard gets the fence as its epoch marker, the same value. Only a shard with
        // events: `serve` marks new shards (no events) itself, and a fence above its
        // marker would refuse all their events.
        let epoch = if store.shard_has_events(shard).await? {
            store
                .raise_fence(shard, crate::ledger::wall_clock_ms())
                .await?
                .to_string()
        } else {
            crate::ledger::new_epoch()
        };
        let mut holds: HashMap<String, Hold> = HashMap::new();
        let mut charges: HashMap<String, Charge> = HashMap::new();
        let mut records = Vec::new();
        let mut orgs = OrgState::default();
        let mut hold_seq = 0i64;
        let mut wallets: Vec<Wallet> = Vec::new();
        let mut after: Option<WalletPosition> = None;
        let mut current: Option<Wallet> = None;
        // The shard's newest event: new outbox ids must come after it.
        let mut newest = (0i64, 0i64);
        loop {
            let page = store
                .shard_events(shard, after.as_ref(), EVENTS_PAGE)
                .await?;
            let Some(last) = page.last() else { break };
            let (ms, seq) = last.stream_position();
            after = Some(WalletPosition {
                account_id: last.account_id.clone(),
                wallet: last.wallet.clone(),
                stream_ms: ms,
                stream_seq: seq,
            });
            for e in &page {
                newest = newest.max(e.stream_position());
                let same = current
                    .as_ref()
                    .is_some_and(|w| w.account_id == e.account_id && w.wallet == e.wallet);
                if !same {
                    if let Some(done) = current.take() {
                        wallets.push(done.replayed());
                    }
                    current = Some(Wallet {
                        account_id: e.account_id.clone(),
                        wallet: e.wallet.clone(),
                        ..Default::default()
                    });
                }
                let mut replay = Replay {
                    wallet: current.take().unwrap_or_default(),
                    holds: &mut holds,
                    charges: &mut charges,
                    records: &mut records,
                    orgs: &mut orgs,
                    hold_seq: &mut hold_seq,
                    keep,
                };
                let was_allocated = replay.wallet.allocated;
                replay.apply(e)?;
                replay.wallet.mark(e, was_allocated);
                current = Some(replay.wallet);
                shard_report.events += 1;
                // A restore in a serving process (`server.restore`) shares its runtime
                // with the checks: a long replay must not hold them up.
                if shard_report.events.is_multiple_of(YIELD_EVERY_EVENTS) {
                    tokio::task::yield_now().await;
                }
            }
            if page.len() < EVENTS_PAGE as usize {
                break;
            }
        }
        if let Some(done) = current.take() {
            wallets.push(done.replayed());
        }
        // Membership events have no wallet.
        wallets.retain(|w| !w.wallet.is_empty());
        // Each account's wallet set as the live Redis left it (the events come by
        // account, then wallet: an account's wallets are together).
        let cap = settings.wallets_per_account_max;
        for account in wallets.chunk_by_mut(|a, b| a.account_id == b.account_id) {
            wallet_sets(account, cap);
        }
        for w in &mut wallets {
            let own = (w.account_id.clone(), w.wallet.clone(), String::new());
            w.budget = orgs.budgets.contains_key(&own);
        }
        shard_report.wallets = wallets.len();

        // Open holds by wallet; ended holds and charges within their retention.
        let mut open: HashMap<(String, String), Vec<(&String, &Hold)>> = HashMap::new();
        for (id, h) in &holds {
            if h.state == 'a' {
                open.entry((h.account_id.clone(), h.wallet.clone()))
                    .or_default()
                    .push((id, h));
            }
        }
        shard_report.open_holds = open.values().map(Vec::len).sum();
        // Reading the shard took a while: look again before writing over it.
        if serves_now(ledger, lease, shard).await? {
            let left = ShardReport::left_alone(shard);
            progress(&left, count);
            report.shards.push(left);
            continue;
        }
        let _: () = ledger
            .redis()
            .query(
                redis::cmd("SET")
                    .arg(restoring_key(ledger, shard))
                    .arg(&lease.token),
            )
            .await?;
        for chunk in wallets.chunks(WALLETS_PER_PIPELINE) {
            lease.check(shard)?;
            let mut pipe = redis::pipe();
            for w in chunk {
                let key = (w.account_id.clone(), w.wallet.clone());
                let holds = open.get(&key).map(Vec::as_slice).unwrap_or(&[]);
                write_wallet(&mut pipe, &tag, w, holds);
            }
            let _: () = ledger.redis().pipeline(&pipe).await?;
        }
        let mut pipe = redis::pipe();
        let mut queued = 0usize;
        // Sends the pipeline every so often, so a big shard never builds one huge request.
        async fn flush(
            ledger: &Ledger,
            lease: &Lease,
            shard: u16,
            pipe: &mut Pipeline,
            queued: &mut usize,
        ) -> Result<(), RestoreError> {
            if *queued > 0 {
                lease.check(shard)?;
                let _: () = ledger.redis().pipeline(pipe).await?;
                *pipe = redis::pipe();
                *queued = 0;
            }
            Ok(())
        }
        // What the replay kept: open holds, ended ones and charges within their retention,
        // the records live Redis still finds (the checks below are the ones it applied).
        for (id, h) in &holds {
            let ttl = keep.ended_hold_ttl(h);
            if h.state != 'a' && ttl <= 0 {
                continue;
            }
            let hkey = format!("{tag}:h:{id}");
            let mut cmd = redis::cmd("HSET");
            cmd.arg(&hkey)
                .arg("a")
                .arg(&h.account_id)
                .arg("w")
                .arg(&h.wallet)
                .arg("n")
                .arg(h.amount)
                .arg("l")
                .arg(&h.lots)
                .arg("d")
                .arg(h.deadline_ms)
                .arg("e")
                .arg(&h.policy)
                .arg("s")
                .arg(h.state.to_string())
                .arg("o")
                .arg(&h.operation);
            // An open hold's budget refs, so its end gives back as it would have.
            let refs = if h.state == 'a' {
                orgs.hold_refs(&tag, h)
            } else {
                String::new()
            };
            if !h.member.is_empty() || !refs.is_empty() {
                cmd.arg("mb").arg(&h.member).arg("bg").arg(refs);
            }
            if h.state != 'a' {
                cmd.arg("q").arg(h.captured);
            }
            pipe.add_command(cmd).ignore();
            if h.state != 'a' {
                pipe.cmd("PEXPIRE").arg(&hkey).arg(ttl).ignore();
            }
            queued += 1;
            if queued >= RECORDS_PER_PIPELINE {
                flush(ledger, lease, shard, &mut pipe, &mut queued).await?;
            }
        }
        for (id, c) in &charges {
            if keep.charge_ttl(c.at_ms) <= 0 {
                continue;
            }
            let Some((bucket, expires_at_ms)) = charge_bucket(&tag, id, charge_retention_ms) else {
                return Err(RestoreError::Replay(
                    id.clone(),
                    "a charge id without an event time".into(),
                ));
            };
            pipe.cmd("HSET")
                .arg(&bucket)
                .arg(id)
                .arg(format!(
                    "{}|{}|{}|{}|{}|{}",
                    c.account_id, c.wallet, c.amount, c.refunded, c.member, c.lots
                ))
                .ignore();
            pipe.cmd("PEXPIREAT")
                .arg(&bucket)
                .arg(expires_at_ms)
                .arg("NX")
                .ignore();
            shard_report.charges += 1;
            queued += 1;
            if queued >= RECORDS_PER_PIPELINE {
                flush(ledger, lease, shard, &mut pipe, &mut queued).await?;
            }
        }
        for r in &records {
            // Every record a lookup in live Redis would still find (the current bucket
            // and the two before it: up to 1.5 windows old), not only those within the
            // guaranteed window.
            if !keep.record(r.at_ms) {
                continue;
            }
            let bucket = r.at_ms / span;
            pipe.cmd("EVAL")
                .arg(REMEMBER_LUA)
                .arg(1)
                .arg(format!("{tag}:i:{bucket}"))
                .arg(&r.name)
                .arg(&r.value)
                .arg((bucket + IDEM_BUCKETS_LOOKED_AT + 1) * span)
                .ignore();
            if let Some((charge_id, account)) = &r.refund_of {
                // As refund.lua: the pointer lives as long as the answer can be found.
                let ttl = r.at_ms + IDEM_BUCKETS_LOOKED_AT * span - now;
                if ttl > 0 {
                    pipe.cmd("SET")
                        .arg(format!("{tag}:rf:{charge_id}"))
                        .arg(account)
                        .arg("PX")
                        .arg(ttl)
                        .ignore();
                }
            }
            shard_report.idempotency_records += 1;
            queued += 1;
            if queued >= RECORDS_PER_PIPELINE {
                flush(ledger, lease, shard, &mut pipe, &mut queued).await?;
            }
        }
        queued += write_orgs(&mut pipe, &tag, &orgs, now);
        shard_report.orgs = orgs.members.len();
        // The numbering the records above were written in: the scripts look for them in
        // it, and a sidecar with another window switches from it keeping it findable
        // (lib.lua `idem_numbering`). Before the epoch marker, as everything else.
        pipe.cmd("SET")
            .arg(ledger.shards().idem_span_key(shard))
            .arg(span)
            .ignore();
        queued += 1;
        // Past every hold id the lost Redis may have handed out (see HOLD_SEQ_GAP).
        pipe.cmd("SET")
            .arg(format!("{tag}:seq"))
            .arg(hold_seq + HOLD_SEQ_GAP)
            .ignore();
        queued += 1;
        if newest > (0, 0) {
            // The outbox's ids are the events' ids: a Redis whose clock is behind the old
            // one's would otherwise give a new charge the id of a settled event, which the
            // store then skips as already written. An empty stream that remembers the
            // newest id (made by a throwaway group, then XSETID) keeps new ids above it.
            let outbox = ledger.shards().outbox(shard);
            pipe.cmd("XGROUP")
                .arg("CREATE")
                .arg(outbox)
                .arg(RESTORE_GROUP)
                .arg("$")
                .arg("MKSTREAM")
                .ignore();
            pipe.cmd("XGROUP")
                .arg("DESTROY")
                .arg(outbox)
                .arg(RESTORE_GROUP)
                .ignore();
            pipe.cmd("XSETID")
                .arg(outbox)
                .arg(format!("{}-{}", newest.0, newest.1))
                .ignore();
            queued += 3;
        }
        flush(ledger, lease, shard, &mut pipe, &mut queued).await?;
        let mut keys = api_keys.remove(&shard).unwrap_or_default();
        for key in revoked_by_role_loss(&mut keys, &orgs, now) {
            // The store did not have the revocation (the Admin API's save of it never
            // landed): it gets it now, so the next restore agrees.
            store.save_api_key(key).await?;
            shard_report.api_keys_revoked += 1;
        }
        let written = write_api_keys(ledger, keys, now, Lost).await?;
        report.api_keys += written.restored;
        report.api_keys_dropped += written.dropped;
        let finished: i64 = ledger
            .redis()
            .query(
                redis::cmd("EVAL")
                    .arg(FINISH_SHARD_LUA)
                    .arg(3)
                    .arg(restoring_key(ledger, shard))
                    .arg(ledger.shards().epoch_key(shard))
                    .arg(ledger.shards().count_key(shard))
                    .arg(&lease.token)
                    .arg(&epoch)
                    .arg(count),
            )
            .await?;
        if finished != 1 {
            return Err(RestoreError::LeaseLost(lease.key.clone(), shard));
        }
        progress(&shard_report, count);
        report.shards.push(shard_report);
    }
    // The shards left alone get the keys the store knows too (fields set again): a shard
    // marked new by a serving process after Redis lost its data (it had no events in the
    // store) lost its keys with it. But not a key its Redis dropped
    // ([`WRITE_KEY_ON_SERVING_SHARD_LUA`]).
    for (_, keys) in api_keys {
        let written = write_api_keys(ledger, keys, now, ServingShard).await?;
        report.api_keys += written.restored;
        report.api_keys_dropped += written.dropped;
        report.api_keys_gone_from_serving += written.gone;
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Revokes, among a shard's keys from the store, each live org key that lua/org.lua
/// revoked (or would have) and whose revocation the store lacks (the Admin API saves it
/// after the call; a save that never landed must not bring the key back to life with the
/// restore): a key whose maker (`created_by`, whatever member the key is bound to) is no
/// owner or admin of the restored org, or was made before its maker last left the org or
/// became a plain member (and was made an owner or admin again since); and a key bound to
/// a member (`member_id`) who is no member of the restored org, or was made before that
/// member last left it (and was added again since); and a personal key (no maker, no
/// member) made before the account became an org, which org.lua's create requires revoked
/// (revoked at the org's creation, at the latest). The revocation time is that of the
/// event that took the role or the membership (the earlier of the two when both apply;
/// the script's; key creation times and event times are both Redis server time), or now
/// when the events show none. Keys made before keys named their maker (`created_by` "")
/// are judged by their member alone, and orgs without events in the store are left as
/// they are. Answers the keys it revoked.
fn revoked_by_role_loss<'k>(
    keys: &'k mut [ApiKeyRecord],
    orgs: &OrgState,
    now: i64,
) -> Vec<&'k ApiKeyRecord> {
    let mut revoked = Vec::new();
    for key in keys.iter_mut() {
        if key.revoked_at_ms > 0 {
            continue;
        }
        let Some((org_created_ms, members)) = orgs.members.get(&key.account_id) else {
            continue;
        };
        // When the key lost its footing: Some(None) = by now, with no event to date it.
        let mut lost: Option<Option<i64>> = None;
        let mut take = |at: Option<i64>| {
            lost = Some(match (lost.flatten(), at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            });
        };
        // A personal key from before the account became an org: org.lua's create found it
        // revoked in Redis, but that revocation never reached the store (a save that failed
        // and was not retried). Live again, it would spend the org's wallets as no member.
        // An org made before the create required it (2026-12-05) may have kept such a key
        // live in Redis all along: the restore revokes that one too, on purpose (counted
        // among the revoked keys of the report).
        if key.created_by.is_empty()
            && key.member_id.is_empty()
            && key.created_at_ms < *org_created_ms
        {
            take(Some(*org_created_ms));
        }
        if !key.created_by.is_empty() {
            let manages = members
                .get(&key.created_by)
                .is_some_and(|role| role == "owner" || role == "admin");
            let lost_ms = orgs
                .lost_key_right_ms
                .get(&(key.account_id.clone(), key.created_by.clone()))
                .copied();
            if !manages || lost_ms.is_some_and(|lost| key.created_at_ms <= lost) {
                take(lost_ms);
            }
        }
        if !key.member_id.is_empty() {
            let left_ms = orgs
                .left_ms
                .get(&(key.account_id.clone(), key.member_id.clone()))
                .copied();
            if !members.contains_key(&key.member_id)
                || left_ms.is_some_and(|left| key.created_at_ms <= left)
            {
                take(left_ms);
            }
        }
        if let Some(at) = lost {
            key.revoked_at_ms = at.unwrap_or(now);
            revoked.push(&*key);
        }
    }
    revoked
}

/// Puts a key's id in its account's index as the gateway's scripts keep them: the live
/// index "{tg:S}:ks:<acct>" (id → created ms, what the keys-per-account cap counts) while
/// the record has no `r`, else the revoked one "{tg:S}:kr:<acct>" (scored by revocation
/// ms). By the record just written rather than the store's row alone: on a shard left
/// alone, a key revoked in Redis whose revocation the store lacks stays revoked (`r` is
/// never cleared). KEYS record, live index, revoked index; ARGV key id, created ms.
macro_rules! index_key_lua {
    () => {
        "local r = redis.call('HGET', KEYS[1], 'r') \
         if r then redis.call('HDEL', KEYS[2], ARGV[1]) redis.call('ZADD', KEYS[3], r, ARGV[1]) \
         else redis.call('HSET', KEYS[2], ARGV[1], ARGV[2]) end "
    };
}
const INDEX_KEY_LUA: &str = concat!(index_key_lua!(), "return 0");

/// On a shard left alone: writes a key's record (ARGV from the third on: field, value, …)
/// and indexes it ([`INDEX_KEY_LUA`]), unless the record is gone although the key was made
/// after the shard's epoch marker (KEYS[4]: the ms it was written). Such a key was made
/// in this Redis, which then dropped it (key_prune.lua drops a key revoked longer ago than
/// the retention, at the account's next key change); the store may lack the revocation (a
/// RevokeApiKey or an org role change whose save failed), and written back the key would
/// be live again. A key made before the marker was lost with an earlier Redis (a shard a
/// serving process marked new after Redis lost its data): written back. Answers 1 when
/// written.
const WRITE_KEY_ON_SERVING_SHARD_LUA: &str = concat!(
    "if redis.call('EXISTS', KEYS[1]) == 0 then \
       local epoch = tonumber(redis.call('GET', KEYS[4]) or '') \
       if epoch and tonumber(ARGV[2]) >= epoch then return 0 end \
     end \
     redis.call('HSET', KEYS[1], unpack(ARGV, 3)) ",
    index_key_lua!(),
    "return 1"
);

/// Where [`write_api_keys`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeysInto {
    /// A shard the restore rebuilt: every key.
    Lost,
    /// A shard left alone (it served): not the keys its Redis dropped.
    ServingShard,
}
use KeysInto::{Lost, ServingShard};

/// What [`write_api_keys`] did.
#[derive(Debug, Default)]
struct KeysWritten {
    restored: usize,
    /// Revoked longer ago than the retention.
    dropped: usize,
    /// Gone from a serving shard's Redis (see [`WRITE_KEY_ON_SERVING_SHARD_LUA`]).
    gone: usize,
}

/// API keys, from the durable ledger's key table (hashes only), as the gateway's
/// key_create / key_revoke scripts keep them, but for keys revoked at or before `now` −
/// `gateway.revoked_key_retention_secs`: live Redis drops those (gateway/lua/key_prune.lua,
/// same cut-off), so written back they would answer revoked (403) instead of unknown
/// (401), be listed again and take memory again. Answers (keys written, keys left out).
async fn write_api_keys(
    ledger: &Ledger,
    keys: Vec<ApiKeyRecord>,
    now: i64,
    into: KeysInto,
) -> Result<KeysWritten, RestoreError> {
    let retention_ms =
        i64::try_from(ledger.settings().revoked_key_retention.as_millis()).unwrap_or(i64::MAX);
    let mut written = KeysWritten::default();
    let mut pipe = redis::pipe();
    let mut queued = 0;
    for key in keys {
        // As key_prune.lua: a retention that is not positive drops nothing.
        if retention_ms > 0
            && key.revoked_at_ms > 0
            && key.revoked_at_ms <= now.saturating_sub(retention_ms)
        {
            written.dropped += 1;
            continue;
        }
        let Some(shard) = shard_of_key_id(&key.key_id, ledger.shards()) else {
            continue;
        };
        let tag = ledger.shards().tag(shard);
        let mut fields: Vec<(&str, String)> = vec![
            ("a", key.account_id.clone()),
            ("s", key.digest.clone()),
            ("n", key.name.clone()),
            ("c", key.created_at_ms.to_string()),
        ];
        if key.revoked_at_ms > 0 {
            fields.push(("r", key.revoked_at_ms.to_string()));
        }
        if !key.member_id.is_empty() {
            fields.push(("mb", key.member_id.clone()));
        }
        if !key.created_by.is_empty() {
            fields.push(("by", key.created_by.clone()));
        }
        let record = format!("{tag}:k:{}", key.key_id);
        let live = format!("{tag}:ks:{}", key.account_id);
        let revoked = format!("{tag}:kr:{}", key.account_id);
        match into {
            Lost => {
                let mut hset = redis::cmd("HSET");
                hset.arg(&record);
                for (field, value) in &fields {
                    hset.arg(*field).arg(value);
                }
                pipe.add_command(hset).ignore();
                pipe.cmd("EVAL")
                    .arg(INDEX_KEY_LUA)
                    .arg(3)
                    .arg(&record)
                    .arg(&live)
                    .arg(&revoked)
                    .arg(&key.key_id)
                    .arg(key.created_at_ms)
                    .ignore();
            }
            ServingShard => {
                let cmd = pipe
                    .cmd("EVAL")
                    .arg(WRITE_KEY_ON_SERVING_SHARD_LUA)
                    .arg(4)
                    .arg(&record)
                    .arg(&live)
                    .arg(&revoked)
                    .arg(ledger.shards().epoch_key(shard))
                    .arg(&key.key_id)
                    .arg(key.created_at_ms);
                for (field, value) in &fields {
                    cmd.arg(*field).arg(value);
                }
            }
        }
        queued += 1;
        if queued % RECORDS_PER_PIPELINE == 0 {
            flush_keys(ledger, &pipe, into, &mut written).await?;
            pipe = redis::pipe();
        }
    }
    if queued % RECORDS_PER_PIPELINE != 0 {
        flush_keys(ledger, &pipe, into, &mut written).await?;
    }
    Ok(written)
}

/// Runs a pipeline of [`write_api_keys`] and counts what it wrote.
async fn flush_keys(
    ledger: &Ledger,
    pipe: &redis::Pipeline,
    into: KeysInto,
    written: &mut KeysWritten,
) -> Result<(), RestoreError> {
    match into {
        Lost => {
            let () = ledger.redis().pipeline(pipe).await?;
            written.restored += pipe.len() / 2;
        }
        ServingShard => {
            let answers: Vec<i64> = ledger.redis().pipeline(pipe).await?;
            let restored = answers.iter().filter(|a| **a == 1).count();
            written.restored += restored;
            written.gone += answers.len() - restored;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wallet set a restore rebuilds: dead wallets leave it only when a wallet outside
    /// a full set joins, and a refund's lots bring a wallet back past the cap.
    #[test]
    fn dead_wallets_leave_the_set_only_for_room() {
        let wallet = |name: &str, marks: &[(i64, Join, bool)]| Wallet {
            account_id: "a".into(),
            wallet: name.into(),
            marks: marks
                .iter()
                .map(|&(ms, join, dead)| SetMark {
                    position: (ms, 0),
                    join,
                    dead,
                })
                .collect(),
            ..Default::default()
        };
        let listed = |cap: u32, mut wallets: Vec<Wallet>| {
            wallet_sets(&mut wallets, cap);
            wallets
                .iter()
                .filter(|w| w.joined)
                .map(|w| w.wallet.clone())
                .collect::<Vec<_>>()
        };
        // Cap 2: "a" dies at 2; "b" joins at 3 (set not full: "a" stays), "c" at 4 (full:
        // "a" leaves); a refund brings "a" back at 5 past the cap; "d" at 6 drops nothing
        // (none dead) and is in, as its grant was.
        let wallets = || {
            vec![
                wallet(
                    "a",
                    &[
                        (1, Join::AtCap, false),
                        (2, Join::No, true),
                        (5, Join::PastCap, false),
                    ],
                ),
                wallet("b", &[(3, Join::AtCap, false)]),
                wallet("c", &[(4, Join::AtCap, false)]),
                wallet("d", &[(6, Join::AtCap, false)]),
            ]
        };
        assert_eq!(listed(2, wallets()), ["a", "b", "c", "d"]);
        assert_eq!(listed(3, wallets()), ["a", "b", "c", "d"]);
        let mut no_refund = wallets();
        no_refund[0].marks.pop();
        assert_eq!(listed(2, no_refund), ["b", "c", "d"]);
        // The set fills up later with a cap of 3: "d" drops "a".
        let mut no_refund = wallets();
        no_refund[0].marks.pop();
        assert_eq!(listed(3, no_refund), ["b", "c", "d"]);
        // A dropped wallet granted again is back, and drops the one dead then.
        let wallets = vec![
            wallet(
                "a",
                &[
                    (1, Join::AtCap, false),
                    (2, Join::No, true),
                    (5, Join::AtCap, false),
                ],
            ),
            wallet("b", &[(3, Join::AtCap, false), (4, Join::No, true)]),
        ];
        assert_eq!(listed(1, wallets), ["a"]);
    }

    #[test]
    fn keys_of_makers_who_lost_the_role_or_members_who_left_are_revoked() {
        let key =
            |id: &str, account: &str, member: &str, by: &str, created, revoked| ApiKeyRecord {
                key_id: id.into(),
                account_id: account.into(),
                member_id: member.into(),
                digest: "d".into(),
                name: String::new(),
                created_at_ms: created,
                revoked_at_ms: revoked,
                created_by: by.into(),
            };
        let mut orgs = OrgState::default();
        let roles = [
            ("olivia", "owner"),
            ("bob", "member"),
            ("erin", "admin"),
            ("alice", "member"),
            ("gina", "member"),
        ];
        orgs.members.insert(
            "acme".into(),
            (
                1,
                roles
                    .iter()
                    .map(|(m, r)| (m.to_string(), r.to_string()))
                    .collect(),
            ),
        );
        // Bob was demoted at 50; erin removed at 40 and made an admin again since.
        for (member, at) in [("bob", 50), ("erin", 40), ("dave", 30)] {
            orgs.lost_key_right_ms
                .insert(("acme".into(), member.into()), at);
        }
        // Frank left at 45; gina left at 42 and was added again since; erin left at 40.
        for (member, at) in [("frank", 45), ("gina", 42), ("erin", 40)] {
            orgs.left_ms.insert(("acme".into(), member.into()), at);
        }
        let mut keys = vec![
            key("bob-wide", "acme", "", "bob", 10, 0),
            key("bob-for-alice", "acme", "alice", "bob", 10, 0),
            key("bob-for-frank", "acme", "frank", "bob", 10, 0),
            key("erin-before", "acme", "", "erin", 20, 0),
            key("erin-after", "acme", "", "erin", 60, 0),
            key("erin-for-alice-after", "acme", "alice", "erin", 60, 0),
            key("olivia-wide", "acme", "", "olivia", 10, 0),
            key("olivia-for-alice", "acme", "alice", "olivia", 10, 0),
            key("olivia-for-erin", "acme", "erin", "olivia", 10, 0),
            key("olivia-for-frank", "acme", "frank", "olivia", 10, 0),
            key("olivia-for-gina-before", "acme", "gina", "olivia", 20, 0),
            key("olivia-for-gina-after", "acme", "gina", "olivia", 60, 0),
            key("olivia-for-hank", "acme", "hank", "olivia", 10, 0),
            key("dave-revoked", "acme", "", "dave", 10, 35),
            key("mallory-never", "acme", "", "mallory", 10, 0),
            key("legacy", "acme", "", "", 10, 0),
            key("legacy-for-frank", "acme", "frank", "", 10, 0),
            key("legacy-for-alice", "acme", "alice", "", 10, 0),
            key("elsewhere", "globex", "", "bob", 10, 0),
            // Personal, from before acme became an org (at 1): its revocation was lost.
            key("personal-before-org", "acme", "", "", 0, 0),
        ];
        let revoked: Vec<(String, i64)> = revoked_by_role_loss(&mut keys, &orgs, 999)
            .into_iter()
            .map(|k| (k.key_id.clone(), k.revoked_at_ms))
            .collect();
        assert_eq!(
            revoked,
            [
                ("bob-wide", 50),
                ("bob-for-alice", 50),
                ("bob-for-frank", 45),
                ("erin-before", 40),
                ("olivia-for-erin", 40),
                ("olivia-for-frank", 45),
                ("olivia-for-gina-before", 42),
                ("olivia-for-hank", 999),
                ("mallory-never", 999),
                ("legacy-for-frank", 45),
                ("personal-before-org", 1),
            ]
            .map(|(id, at)| (id.to_owned(), at))
        );
        // The revoked ones changed in place (they are written to Redis so); the rest kept.
        let revoked_at = |id: &str| keys.iter().find(|k| k.key_id == id).unwrap().revoked_at_ms;
        assert_eq!(revoked_at("bob-wide"), 50);
        assert_eq!(revoked_at("dave-revoked"), 35);
        for kept in [
            "erin-after",
            "erin-for-alice-after",
            "olivia-wide",
            "olivia-for-alice",
            "olivia-for-gina-after",
            "legacy",
            "legacy-for-alice",
            "elsewhere",
        ] {
            assert_eq!(revoked_at(kept), 0, "{kept}");
        }
    }

    /// A long history replayed through the replay's state: what it keeps stays what live
    /// Redis would keep (open holds, and holds, charges and records within their retention),
    /// however many debits, holds, captures, expiries and voids came before.
    #[test]
    fn the_replay_keeps_what_live_redis_keeps_not_the_whole_history() {
        const DAY_MS: i64 = 86_400_000;
        let now = 100 * DAY_MS;
        let keep = Keep::new(&crate::ledger::LedgerSettings::default(), now);
        let score = LotPiece::NEVER;
        let piece = |lot: &str, amount| LotPiece {
            lot_id: lot.into(),
            amount,
            score: Some(score),
        };
        let mut seq = 0i64;
        let (mut available, mut held) = (0i64, 0i64);
        // An event of wallet "w" at `at_ms`, with the balance it leaves.
        let mut event =
            |kind, at_ms: i64, amount, moved: (i64, i64), fill: &dyn Fn(&mut LedgerEvent)| {
                seq += 1;
                available += moved.0;
                held += moved.1;
                let mut e = LedgerEvent {
                    event_id: format!("0-{at_ms}-{seq}"),
                    stream_id: format!("{at_ms}-{seq}"),
                    kind,
                    account_id: "acct".into(),
                    wallet: "w".into(),
                    amount,
                    available_after: available,
                    held_after: held,
                    lots: Vec::new(),
                    extra: String::new(),
                    hold_id: String::new(),
                    charge_id: String::new(),
                    idempotency_key: format!("k{seq}"),
                    operation: String::new(),
                    metadata: String::new(),
                    created_at_ms: at_ms,
                    version: 1,
                    member: String::new(),
                    actor: String::new(),
                };
                fill(&mut e);
                e
            };
        let mut history = vec![
            event(EventKind::Grant, DAY_MS, 1_000_000, (1_000_000, 0), &|e| {
                e.lots = vec![piece("1", 1_000_000)];
                e.extra = "purchase|".into();
            }),
            // A daily budget on the wallet: holds count in it.
            event(EventKind::Budget, DAY_MS, 1_000_000_000, (0, 0), &|e| {
                e.operation = "budget".into();
                e.extra = "d|0|0".into();
            }),
        ];
        // Days of charges, all older than every retention; then one of each now.
        let rounds = 2_000;
        for n in 0..=rounds {
            let at = if n == rounds {
                now - 1_000
            } else {
                2 * DAY_MS + n * 60_000
            };
            let debit = event(EventKind::Debit, at, 3, (-3, 0), &|e| {
                e.lots = vec![piece("1", 3)];
            });
            let debit_id = debit.event_id.clone();
            history.push(debit);
            let hold_id = format!("h0-{}", 1_000 + n);
            for (captured, kind) in [(1, EventKind::Capture), (0, EventKind::ExpireHold)] {
                let hold_id = format!("{hold_id}{captured}");
                history.push(event(EventKind::Hold, at, 2, (-2, 2), &|e| {
                    e.lots = vec![piece("1", 2)];
                    e.hold_id = hold_id.clone();
                    e.extra = format!("r{}", at + 30_000);
                }));
                if n < rounds {
                    history.push(event(
                        kind,
                        at + 30_000,
                        captured,
                        (2 - captured, -2),
                        &|e| {
                            e.lots = if captured > 0 {
                                vec![piece("1", captured)]
                            } else {
                                Vec::new()
                            };
                            e.extra = format!("1:{}:{score}", 2 - captured);
                            e.hold_id = hold_id.clone();
                            e.idempotency_key = String::new();
                        },
                    ));
                }
            }
            if n < rounds {
                // A void refunds the debit (into a lot of its own, spent again at once).
                let lot = (10_000 + n).to_string();
                history.push(event(EventKind::Refund, at + 40_000, 3, (3, 0), &|e| {
                    e.lots = vec![piece(&lot, 3)];
                    e.extra = "0".into();
                    e.charge_id = debit_id.clone();
                    e.operation = "void".into();
                    e.idempotency_key = String::new();
                }));
                history.push(event(EventKind::Adjust, at + 41_000, -3, (-3, 0), &|e| {
                    e.lots = vec![piece(&lot, 3)];
                    e.idempotency_key = String::new();
                }));
            }
        }
        let (mut holds, mut charges, mut records) = (HashMap::new(), HashMap::new(), Vec::new());
        let (mut orgs, mut hold_seq) = (OrgState::default(), 0);
        let mut wallet = Wallet {
            account_id: "acct".into(),
            wallet: "w".into(),
            ..Default::default()
        };
        let mut most = 0;
        for e in &history {
            let mut replay = Replay {
                wallet,
                holds: &mut holds,
                charges: &mut charges,
                records: &mut records,
                orgs: &mut orgs,
                hold_seq: &mut hold_seq,
                keep,
            };
            replay.apply(e).expect("replays");
            wallet = replay.wallet;
            let kept = holds.len()
                + charges.len()
                + records.len()
                + orgs.hold_spends.len()
                + orgs.hold_budgets.len()
                + wallet.old_refunds.len();
            most = most.max(kept);
        }
        // The last round's debit, and its two holds left open: what live Redis holds.
        assert_eq!(holds.len(), 2, "holds");
        assert_eq!(charges.len(), 1, "charges");
        assert_eq!(records.len(), 3, "idempotency records");
        assert_eq!(orgs.hold_spends.len(), 2, "holds' spends");
        assert_eq!(orgs.hold_budgets.len(), 2, "holds' budgets");
        assert!(most <= 12, "the replay kept {most} entries at one point");
        // The hold ids the shard handed out, dropped ones included.
        assert_eq!(hold_seq, (1_000 + rounds) * 10 + 1);
    }

    #[test]
    fn dead_letter_streams_are_told_by_name_in_any_shard() {
        assert!(is_dead_letters_key("{tg:0}:o:dead"));
        assert!(is_dead_letters_key("{tg:4095}:o:dead"));
        assert!(!is_dead_letters_key("{tg:3}:o"));
        assert!(!is_dead_letters_key("{tg:3}:w:acct:dead"));
        assert!(!is_dead_letters_key("{tg:}:o:dead"));
        assert!(!is_dead_letters_key("{tg:x}:o:dead"));
        assert!(!is_dead_letters_key("tg:3:o:dead"));
    }
}
