//! `tollgate reconcile`: proves the durable ledger and Redis agree.
//!
//! After draining the outboxes:
//! 0. Per shard, the store's newest settled event (of the shard's wallets, from their
//!    running summaries) is compared with the shard outbox's last entry id, read after it:
//!    an outbox behind it lost settled events (Redis came back from an older RDB or AOF,
//!    or a lagging replica took over). That is a drift of its own, and the shard's wallets
//!    and allocations are then compared with every settled event (below), so the events
//!    Redis lost show wallet by wallet.
//!
//! Then for every wallet (in Redis or in the store):
//! 1. Redis's totals and open holds are read atomically with the shard outbox's last entry
//!    id; the store's are re-derived from the wallet's events up to that entry (so a live
//!    system can be reconciled: later events are not counted on either side), or in a
//!    shard whose outbox is behind, up to the store's newest settled event.
//! 2. The store's running summary is compared with the totals re-derived from all its
//!    events (the summary is updated incrementally, so this checks the store itself).
//! 3. Conservation, on Redis's totals and on the store's re-derived ones (one comparison
//!    each): granted + adjusted + refunded − used − expired = available + held. The store's
//!    available and held are the last event's figures, which Redis wrote: a Redis figure
//!    changed behind tollgate's back agrees with the store once any event follows, and
//!    only this shows it.
//!
//! 4. Org members' allocations (allocated, and used net of returned holds and refunds):
//!    each org wallet's allocation record is read atomically with the shard outbox's last
//!    entry id (the same snapshot script), and compared with the allocations re-derived
//!    from the wallet's events up to that entry, as for totals.
//!
//! Any difference is a drift; the command prints them and exits non-zero.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use super::settler::{settled_through, SettleError, Settler, SettlerSettings};
use super::store::{Store, StoreError, Totals, WalletPosition};
use crate::ledger::error::{HoldEnd, Refusal};
use crate::ledger::event::{parse_stream_id, EventKind, LedgerEvent};
use crate::ledger::{EndHold, Ledger, LedgerError};

/// How long reconcile waits for the outbox to drain (and for a wallet's events to settle).
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

/// A hold the ledger has open that Redis no longer has (its record was deleted: the
/// credits stay held, lib.lua `expire_hold`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostHold {
    pub account_id: String,
    pub wallet: String,
    pub hold_id: String,
}

/// One disagreement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    pub account_id: String,
    pub wallet: String,
    /// "redis" (Redis vs ledger events), "summary" (running summary vs events),
    /// "conservation" (field "redis" or "store": whose totals; expected is granted +
    /// adjusted + refunded − used − expired, found available + held) or "allocation" (an
    /// org member's allocation; account_id is "<org>:<member>"). A shard whose outbox is
    /// behind the store is check "redis", field [`OUTBOX_BEHIND`], account_id the shard's
    /// hash tag, wallet "-", and expected and found the ms of the store's newest settled
    /// position and of the outbox's last entry id (0: none); both in full in
    /// [`Report::outboxes_behind`].
    pub check: &'static str,
    pub field: &'static str,
    pub expected: i64,
    pub found: i64,
}

/// The field of a shard's drift whose outbox is behind the store.
pub const OUTBOX_BEHIND: &str = "outbox_last_id";

/// A shard whose outbox's last entry id is before the newest event the store settled of
/// its wallets: Redis lost settled events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxBehind {
    pub shard: u16,
    /// The stream position of the newest settled event of the shard's wallets.
    pub settled: (i64, i64),
    /// The outbox's last entry id (None: the outbox has none).
    pub redis: Option<(i64, i64)>,
}

#[derive(Debug, Default)]
pub struct Report {
    pub wallets: usize,
    pub events: i64,
    pub drifts: Vec<Drift>,
    /// The holds behind an `open_holds` drift.
    pub lost_holds: Vec<LostHold>,
    /// The positions behind an [`OUTBOX_BEHIND`] drift.
    pub outboxes_behind: Vec<OutboxBehind>,
}

fn stream_id((ms, seq): (i64, i64)) -> String {
    format!("{ms}-{seq}")
}

impl Report {
    pub fn render(&self) -> String {
        let mut out = format!(
            "reconciled {} wallets, {} ledger events: {} drift(s)\n",
            self.wallets,
            self.events,
            self.drifts.len()
        );
        if !self.drifts.is_empty() {
            out.push_str(&format!(
                "{:<24} {:<12} {:<12} {:<14} {:>16} {:>16}\n",
                "account", "wallet", "check", "field", "expected", "found"
            ));
            for d in &self.drifts {
                out.push_str(&format!(
                    "{:<24} {:<12} {:<12} {:<14} {:>16} {:>16}\n",
                    d.account_id, d.wallet, d.check, d.field, d.expected, d.found
                ));
            }
        }
        if !self.lost_holds.is_empty() {
            out.push_str(
                "holds open in the ledger that Redis no longer has (their credits stay held):\n",
            );
            for h in &self.lost_holds {
                out.push_str(&format!(
                    "{:<24} {:<12} {}\n",
                    h.account_id, h.wallet, h.hold_id
                ));
            }
        }
        if !self.outboxes_behind.is_empty() {
            out.push_str(
                "outboxes behind the store (Redis lost settled events; the shard's wallets are \
                 compared with every settled event):\n",
            );
            for b in &self.outboxes_behind {
                out.push_str(&format!(
                    "shard {:<5} store settled through {}, outbox last entry {}\n",
                    b.shard,
                    stream_id(b.settled),
                    b.redis.map_or_else(|| "none".to_owned(), stream_id)
                ));
            }
        }
        out
    }
}

fn fields(t: &Totals) -> [(&'static str, i64); 7] {
    [
        ("available", t.available),
        ("held", t.held),
        ("granted", t.granted),
        ("used", t.used),
        ("expired", t.expired),
        ("refunded", t.refunded),
        ("adjusted", t.adjusted),
    ]
}

fn compare(
    drifts: &mut Vec<Drift>,
    account_id: &str,
    wallet: &str,
    check: &'static str,
    expected: &Totals,
    found: &Totals,
) {
    for ((field, e), (_, f)) in fields(expected).into_iter().zip(fields(found)) {
        if e != f {
            drifts.push(Drift {
                account_id: account_id.to_owned(),
                wallet: wallet.to_owned(),
                check,
                field,
                expected: e,
                found: f,
            });
        }
    }
}

/// A conservation drift unless what came in less what went out is what is left:
/// granted + adjusted + refunded − used − expired = available + held (`side`: whose
/// totals, "redis" or "store").
fn conservation(
    drifts: &mut Vec<Drift>,
    account_id: &str,
    wallet: &str,
    side: &'static str,
    t: &Totals,
) {
    let net = t.granted + t.adjusted + t.refunded - t.used - t.expired;
    let left = t.available + t.held;
    if net != left {
        drifts.push(Drift {
            account_id: account_id.to_owned(),
            wallet: wallet.to_owned(),
            check: "conservation",
            field: side,
            expected: net,
            found: left,
        });
    }
}

/// A shard outbox's last entry id (`XINFO STREAM`'s `last-generated-id`, as snapshot.lua
/// reads it: an outbox trimmed empty still has one); "" when there is no outbox.
const OUTBOX_LAST_ID_LUA: &str = "if redis.call('EXISTS', KEYS[1]) == 0 then return '' end \
    local info = redis.call('XINFO', 'STREAM', KEYS[1]) \
    for j = 1, #info, 2 do \
      if info[j] == 'last-generated-id' then return info[j + 1] end \
    end return ''";

async fn outbox_last_id(ledger: &Ledger, shard: u16) -> Result<Option<(i64, i64)>, LedgerError> {
    let id: String = ledger
        .redis()
        .query(
            redis::cmd("EVAL")
                .arg(OUTBOX_LAST_ID_LUA)
                .arg(1)
                .arg(ledger.shards().outbox(shard)),
        )
        .await?;
    Ok(parse_stream_id(&id).filter(|&p| p > (0, 0)))
}

/// Per shard: the newest settled position of its wallets' events (`settled`, read from the
/// store first) against its outbox's last entry id (read after: it is at or past every
/// event the store settled from this Redis). An outbox behind it is a drift, and its
/// shard's comparisons reach that position: the returned floors, by shard.
async fn outboxes_behind(
    ledger: &Ledger,
    settled: &BTreeMap<u16, (i64, i64)>,
    report: &mut Report,
) -> Result<BTreeMap<u16, (i64, i64)>, SettleError> {
    let mut floors = BTreeMap::new();
    for (&shard, &newest) in settled {
        let redis = outbox_last_id(ledger, shard).await?;
        if redis.is_some_and(|r| r >= newest) {
            continue;
        }
        report.drifts.push(Drift {
            account_id: ledger.shards().tag(shard).to_owned(),
            wallet: "-".to_owned(),
            check: "redis",
            field: OUTBOX_BEHIND,
            expected: newest.0,
            found: redis.map_or(0, |r| r.0),
        });
        report.outboxes_behind.push(OutboxBehind {
            shard,
            settled: newest,
            redis,
        });
        floors.insert(shard, newest);
    }
    Ok(floors)
}

/// Where the store's side of a comparison stops: at the snapshot's outbox entry (None:
/// the outbox never had one, every settled event counts), or, in a shard whose outbox is
/// behind the store (`floors`), not before the store's newest settled event, so the
/// events Redis lost count.
fn cut_off(
    floors: &BTreeMap<u16, (i64, i64)>,
    shard: u16,
    last_entry_id: Option<&str>,
) -> Option<(i64, i64)> {
    let upto = last_entry_id.and_then(parse_stream_id);
    match floors.get(&shard) {
        Some(&floor) => Some(upto.map_or(floor, |upto| upto.max(floor))),
        None => upto,
    }
}

/// Drains the outbox, then compares every wallet.
/// `settings` are the deployment's settler settings (group, claim idle time); reconcile
/// drains under its own consumer name.
pub async fn reconcile(
    ledger: Arc<Ledger>,
    store: Arc<Store>,
    settings: SettlerSettings,
    drain_timeout: Duration,
) -> Result<Report, SettleError> {
    let settings = SettlerSettings {
        consumer: format!("reconcile-{}", std::process::id()),
        ..settings
    };
    let group = settings.group.clone();
    let mut settler = Settler::new(ledger.clone(), store.clone(), settings);
    tokio::time::timeout(drain_timeout, settler.drain(drain_timeout))
        .await
        .map_err(|_| SettleError::DrainTimeout(drain_timeout))??;

    let summaries = store.wallets().await?;
    // Read before the outboxes' positions (`outboxes_behind`).
    let mut settled: BTreeMap<u16, (i64, i64)> = BTreeMap::new();
    for s in &summaries {
        let newest = settled
            .entry(ledger.shards().of_account(&s.account_id))
            .or_default();
        *newest = (*newest).max(s.last_position);
    }
    settled.retain(|_, newest| *newest > (0, 0));
    let mut wallets: BTreeSet<(String, String)> = summaries
        .into_iter()
        .map(|s| (s.account_id, s.wallet))
        .collect();
    wallets.extend(ledger.wallet_keys().await?);

    let mut report = Report {
        wallets: wallets.len(),
        ..Default::default()
    };
    let floors = outboxes_behind(&ledger, &settled, &mut report).await?;
    for (account_id, wallet) in &wallets {
        let shard = ledger.shards().of_account(account_id);
        let stream = ledger.shards().outbox(shard);
        // Catch the wallet at a point the store has settled through: the snapshot's last
        // outbox entry. A drain started after the snapshot settles that entry too.
        let snapshot = ledger.snapshot(account_id, wallet).await?;
        let (balance, last_id) = (snapshot.balance, snapshot.last_entry_id);
        if let Some(id) = &last_id {
            if !settled_through(&ledger, stream, &group, id).await? {
                tokio::time::timeout(drain_timeout, settler.drain(drain_timeout))
                    .await
                    .map_err(|_| SettleError::DrainTimeout(drain_timeout))??;
            }
        }
        let redis_totals = Totals {
            granted: balance.granted,
            used: balance.used,
            expired: balance.expired,
            refunded: balance.refunded,
            adjusted: balance.adjusted,
            available: balance.available,
            held: balance.held,
        };
        let upto = cut_off(&floors, shard, last_id.as_deref());
        let upto_snapshot = store.derive(account_id, wallet, upto).await?;
        compare(
            &mut report.drifts,
            account_id,
            wallet,
            "redis",
            &upto_snapshot.totals,
            &redis_totals,
        );
        // The store's side up to a position every event before which is settled: all of
        // them counted (a batch that commits ahead of an earlier one would not break it).
        for (side, totals) in [("redis", &redis_totals), ("store", &upto_snapshot.totals)] {
            conservation(&mut report.drifts, account_id, wallet, side, totals);
        }
        // Held credits agree even when a hold's record is gone from Redis (its credits
        // stay held there, lib.lua `expire_hold`): the count of open holds does not.
        if upto_snapshot.open_holds != snapshot.open_holds {
            report.drifts.push(Drift {
                account_id: account_id.clone(),
                wallet: wallet.clone(),
                check: "redis",
                field: "open_holds",
                expected: upto_snapshot.open_holds,
                found: snapshot.open_holds,
            });
            // Name them: open in the ledger, gone from Redis's deadline index.
            let in_redis: Vec<String> = ledger
                .redis()
                .query(
                    redis::cmd("ZRANGE")
                        .arg(format!(
                            "{}:hw:{account_id}:{wallet}",
                            ledger.shards().tag(shard)
                        ))
                        .arg(0)
                        .arg(-1),
                )
                .await?;
            for hold_id in store.open_hold_ids(account_id, wallet, upto).await? {
                // One that ended since the snapshot has its record still (ended state).
                let record: i64 = ledger
                    .redis()
                    .query(
                        redis::cmd("EXISTS")
                            .arg(format!("{}:h:{hold_id}", ledger.shards().tag(shard))),
                    )
                    .await?;
                if record == 0 && !in_redis.contains(&hold_id) {
                    report.lost_holds.push(LostHold {
                        account_id: account_id.clone(),
                        wallet: wallet.clone(),
                        hold_id,
                    });
                }
            }
        }
        // Summary and events read in one snapshot: settlement may go on meanwhile.
        let all = store.derive(account_id, wallet, None).await?;
        report.events += all.events;
        compare(
            &mut report.drifts,
            account_id,
            wallet,
            "summary",
            &all.totals,
            &all.summary.unwrap_or_default(),
        );
    }
    compare_allocations(
        &ledger,
        &store,
        &mut settler,
        &group,
        drain_timeout,
        &floors,
        &mut report,
    )
    .await?;
    // Its drains left nothing pending: its consumer goes (a new name every run).
    settler.leave(false).await;
    Ok(report)
}

/// member → (allocated: None without an `allocate` event, used).
type Members = BTreeMap<String, (Option<i64>, i64)>;
/// (org, wallet) → its members' allocations.
type Allocations = BTreeMap<(String, String), Members>;

/// The operation of the `allocate` event lua/org.lua writes for each allocation of a
/// member who leaves: the allocation is gone (None again, as before any), `used` stays.
pub(crate) const ALLOCATION_REMOVED: &str = "remove";

/// The allocation an `allocate` event leaves (None: the member's removal took it).
pub(crate) fn allocated_after(e: &LedgerEvent) -> Option<i64> {
    (e.operation != ALLOCATION_REMOVED).then_some(e.amount)
}

/// Counts one settled event in its member's allocation.
fn count_allocation(members: &mut Members, e: &LedgerEvent) {
    if e.member.is_empty() {
        return;
    }
    if e.kind == EventKind::Allocate {
        members.entry(e.member.clone()).or_default().0 = allocated_after(e);
    } else if let Some(used) = e.allocation_delta() {
        members.entry(e.member.clone()).or_default().1 += used;
    }
}

/// Whether an event is at or before a snapshot's position (None: the outbox never had an
/// entry, so every settled event counts, as for wallets).
fn within(e: &LedgerEvent, upto: Option<(i64, i64)>) -> bool {
    upto.is_none_or(|upto| e.stream_position() <= upto)
}

const EVENTS_PAGE: u32 = 5000;

/// Allocations re-derived from every settled event; the events of an org wallet in
/// `upto` only up to its snapshot's position.
async fn store_allocations(
    ledger: &Ledger,
    store: &Store,
    upto: &BTreeMap<(String, String), Option<(i64, i64)>>,
) -> Result<Allocations, SettleError> {
    let mut out = Allocations::new();
    for shard in 0..ledger.shards().count() {
        let mut after: Option<WalletPosition> = None;
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
            for e in page.iter().filter(|e| !e.member.is_empty()) {
                let key = (e.account_id.clone(), e.wallet.clone());
                if upto.get(&key).is_some_and(|&upto| !within(e, upto)) {
                    continue;
                }
                count_allocation(out.entry(key).or_default(), e);
            }
            if page.len() < EVENTS_PAGE as usize {
                break;
            }
        }
    }
    // Org wallets whose events move no allocation (budgets only) have none.
    out.retain(|_, members| !members.is_empty());
    Ok(out)
}

/// One org wallet's allocations re-derived from its settled events up to `upto`.
async fn store_wallet_allocations(
    ledger: &Ledger,
    store: &Store,
    org: &str,
    wallet: &str,
    upto: Option<(i64, i64)>,
) -> Result<Members, SettleError> {
    let shard = ledger.shards().of_account(org);
    let mut members = Members::new();
    // Events are in (account, wallet, stream position) order: start before the wallet's
    // first one, stop at the first of another wallet or past `upto`.
    let mut after = WalletPosition {
        account_id: org.to_owned(),
        wallet: wallet.to_owned(),
        stream_ms: i64::MIN,
        stream_seq: i64::MIN,
    };
    loop {
        let page = store.shard_events(shard, Some(&after), EVENTS_PAGE).await?;
        let full = page.len() == EVENTS_PAGE as usize;
        for e in &page {
            if e.account_id != org || e.wallet != wallet || !within(e, upto) {
                return Ok(members);
            }
            count_allocation(&mut members, e);
        }
        let Some(last) = page.last() else { break };
        let (ms, seq) = last.stream_position();
        after.stream_ms = ms;
        after.stream_seq = seq;
        if !full {
            break;
        }
    }
    Ok(members)
}

/// Redis's allocation record of one org wallet, read atomically with its shard outbox's
/// last entry id.
struct RedisAllocation {
    members: Members,
    last_entry_id: Option<String>,
}

impl RedisAllocation {
    /// Where the store's side stops (`cut_off`).
    fn upto(
        &self,
        ledger: &Ledger,
        floors: &BTreeMap<u16, (i64, i64)>,
        org: &str,
    ) -> Option<(i64, i64)> {
        cut_off(
            floors,
            ledger.shards().of_account(org),
            self.last_entry_id.as_deref(),
        )
    }
}

async fn redis_allocation(
    ledger: &Ledger,
    org: &str,
    wallet: &str,
) -> Result<RedisAllocation, LedgerError> {
    let (fields, last_entry_id) = ledger.allocation_snapshot(org, wallet).await?;
    let mut members = Members::new();
    for (field, value) in fields {
        let n: i64 = value.parse().unwrap_or(i64::MIN);
        match field.strip_suffix(":u") {
            Some(member) => members.entry(member.to_owned()).or_default().1 = n,
            None => members.entry(field).or_default().0 = Some(n),
        }
    }
    Ok(RedisAllocation {
        members,
        last_entry_id,
    })
}

/// The org wallets with an allocation record in Redis, found by SCAN.
async fn redis_allocation_keys(ledger: &Ledger) -> Result<BTreeSet<(String, String)>, LedgerError> {
    let mut out = BTreeSet::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = ledger
            .redis()
            .query(
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg("{tg:*}:al:*")
                    .arg("COUNT")
                    .arg(1000),
            )
            .await?;
        for key in keys {
            // {tg:S}:al:<org>:<wallet>; account ids hold no ':'.
            if let Some((org, wallet)) =
                key.split_once("}:al:").and_then(|(_, r)| r.split_once(':'))
            {
                out.insert((org.to_owned(), wallet.to_owned()));
            }
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    Ok(out)
}

/// The differences between an org wallet's allocations re-derived from the store and
/// Redis's record.
fn allocation_drifts(org: &str, wallet: &str, expected: &Members, found: &Members) -> Vec<Drift> {
    let mut drifts = Vec::new();
    let members: BTreeSet<&String> = expected.keys().chain(found.keys()).collect();
    for member in members {
        let e = expected.get(member).copied().unwrap_or_default();
        let f = found.get(member).copied().unwrap_or_default();
        for (field, e, f) in [
            ("allocated", e.0.unwrap_or(0), f.0.unwrap_or(0)),
            ("used", e.1, f.1),
        ] {
            if e != f {
                drifts.push(Drift {
                    account_id: format!("{org}:{member}"),
                    wallet: wallet.to_owned(),
                    check: "allocation",
                    field,
                    expected: e,
                    found: f,
                });
            }
        }
    }
    drifts
}

/// Drains the outbox unless the group has settled through `last_entry_id` (a drain
/// started after the snapshot settles its entry too).
async fn settle_through(
    ledger: &Ledger,
    settler: &mut Settler,
    group: &str,
    drain_timeout: Duration,
    snapshots: &[(&str, Option<&str>)],
) -> Result<(), SettleError> {
    for (org, last_entry_id) in snapshots {
        let Some(id) = last_entry_id else { continue };
        let stream = ledger.shards().outbox(ledger.shards().of_account(org));
        if !settled_through(ledger, stream, group, id).await? {
            return tokio::time::timeout(drain_timeout, settler.drain(drain_timeout))
                .await
                .map_err(|_| SettleError::DrainTimeout(drain_timeout))?;
        }
    }
    Ok(())
}

/// Compares allocations as wallets are: each org wallet's allocation record is read with
/// its shard outbox's last entry id (one script), the settler is made to settle through
/// it, and the store side counts the wallet's events up to it only, so member charges
/// that keep flowing are on neither side. An org wallet that differs (or that the store
/// has and the SCAN did not find: made meanwhile) is looked at once more on its own. In a
/// shard whose outbox is behind the store (`floors`), the store's side reaches its newest
/// settled event.
async fn compare_allocations(
    ledger: &Ledger,
    store: &Store,
    settler: &mut Settler,
    group: &str,
    drain_timeout: Duration,
    floors: &BTreeMap<u16, (i64, i64)>,
    report: &mut Report,
) -> Result<(), SettleError> {
    let mut found = BTreeMap::new();
    for (org, wallet) in redis_allocation_keys(ledger).await? {
        let snapshot = redis_allocation(ledger, &org, &wallet).await?;
        found.insert((org, wallet), snapshot);
    }
    let positions: Vec<(&str, Option<&str>)> = found
        .iter()
        .map(|((org, _), s)| (org.as_str(), s.last_entry_id.as_deref()))
        .collect();
    settle_through(ledger, settler, group, drain_timeout, &positions).await?;
    let upto = found
        .iter()
        .map(|(k, s)| (k.clone(), s.upto(ledger, floors, &k.0)))
        .collect();
    let expected = store_allocations(ledger, store, &upto).await?;

    let none = Members::new();
    let wallets: BTreeSet<&(String, String)> = found.keys().chain(expected.keys()).collect();
    for key @ (org, wallet) in wallets {
        let redis_members = found.get(key).map_or(&none, |s| &s.members);
        let store_members = expected.get(key).unwrap_or(&none);
        if allocation_drifts(org, wallet, store_members, redis_members).is_empty() {
            continue;
        }
        let again = redis_allocation(ledger, org, wallet).await?;
        settle_through(
            ledger,
            settler,
            group,
            drain_timeout,
            &[(org.as_str(), again.last_entry_id.as_deref())],
        )
        .await?;
        let upto = again.upto(ledger, floors, org);
        let store_members = store_wallet_allocations(ledger, store, org, wallet, upto).await?;
        report.drifts.extend(allocation_drifts(
            org,
            wallet,
            &store_members,
            &again.members,
        ));
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum LostHoldError {
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Settle(#[from] SettleError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// How `end_lost_hold` ended the hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LostHoldEnd {
    /// Released now: its credits are available again.
    Released { amount: i64 },
    /// Past its deadline: ended by its `on_expiry` policy, as it would have been.
    ByPolicy { how: HoldEnd, captured: i64 },
}

/// Writes a lost hold's record again (KEYS[1]) only if there is none, as an open hold
/// (ARGV: account, wallet, amount, lots held, deadline, on_expiry, operation, hold id,
/// the wallet's due-index member), and puts it back in the wallet's deadline index
/// (KEYS[2]) and due time (KEYS[3] the wallet, KEYS[4] the shard's due index, as lib.lua
/// `schedule`): should ending it fail, lazy expiry ends it by its policy.
const REWRITE_HOLD_LUA: &str = "if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end \
    redis.call('HSET', KEYS[1], 'a', ARGV[1], 'w', ARGV[2], 'n', ARGV[3], 'l', ARGV[4], \
    'd', ARGV[5], 'e', ARGV[6], 's', 'a', 'o', ARGV[7]) \
    redis.call('ZADD', KEYS[2], ARGV[5], ARGV[8]) \
    local d = tonumber(redis.call('HGET', KEYS[3], 'd')) \
    if not d or tonumber(ARGV[5]) < d then \
      redis.call('HSET', KEYS[3], 'd', ARGV[5]) redis.call('ZADD', KEYS[4], ARGV[5], ARGV[9]) \
    end return 1";

/// How many times `end_lost_hold` drains before it gives up on a shard that keeps moving.
const END_LOST_HOLD_DRAINS_MAX: usize = 5;

/// `tollgate end-lost-hold`: ends a hold the durable ledger has open and Redis lost the
/// record of (reconcile names them). Its credits are still held in Redis (lib.lua
/// `expire_hold`), and nothing could end it: this writes its record again from its hold
/// event, then ends it through the ledger as a caller would, so the end is an ordinary
/// event (release, or by its `on_expiry` policy once past its deadline) and the ledger
/// and Redis agree again. Refused unless, with everything settled, the ledger has it open,
/// Redis has neither its record nor its deadline entry, and both hold the same credits for
/// the wallet; and for a member's hold or a wallet with budgets (their refs are not
/// rebuilt here).
pub async fn end_lost_hold(
    ledger: Arc<Ledger>,
    store: Arc<Store>,
    settings: SettlerSettings,
    drain_timeout: Duration,
    account_id: &str,
    wallet: &str,
    hold_id: &str,
) -> Result<LostHoldEnd, LostHoldError> {
    let refused = |why: String| Err(LostHoldError::Refused(why));
    let Some(shard) = ledger.shards().of_hold_id(hold_id) else {
        return refused(format!("{hold_id:?} is not a hold id of this deployment"));
    };
    if shard != ledger.shards().of_account(account_id) {
        return refused(format!(
            "hold {hold_id} is not in account {account_id}'s shard"
        ));
    }
    let settings = SettlerSettings {
        consumer: format!("end-lost-hold-{}", std::process::id()),
        ..settings
    };
    let group = settings.group.clone();
    let mut settler = Settler::new(ledger.clone(), store.clone(), settings);
    // The outbox is settled through the snapshot's last entry: the store then knows all
    // Redis knew at the snapshot.
    let mut snapshot = None;
    for _ in 0..END_LOST_HOLD_DRAINS_MAX {
        let taken = ledger.snapshot(account_id, wallet).await?;
        tokio::time::timeout(drain_timeout, settler.drain(drain_timeout))
            .await
            .map_err(|_| SettleError::DrainTimeout(drain_timeout))??;
        let stream = ledger.shards().outbox(shard);
        let settled = match &taken.last_entry_id {
            Some(id) => settled_through(&ledger, stream, &group, id).await?,
            None => true,
        };
        if settled {
            snapshot = Some(taken);
            break;
        }
    }
    // Its drains left nothing pending: its consumer goes (a new name every run).
    settler.leave(false).await;
    let Some(snapshot) = snapshot else {
        return refused(format!(
            "the outbox of shard {shard} did not settle through a snapshot after \
             {END_LOST_HOLD_DRAINS_MAX} drains: is a settler running? try again"
        ));
    };
    // An event set aside is in Redis but not in the store: it may be this hold's end.
    if let Err(err) = super::restore::no_dead_letters(&ledger, &[shard]).await {
        return refused(err.to_string());
    }
    let upto = snapshot.last_entry_id.as_deref().and_then(parse_stream_id);
    let open = store.open_hold_ids(account_id, wallet, upto).await?;
    if !open.iter().any(|h| h == hold_id) {
        return refused(format!(
            "the ledger has no open hold {hold_id} in {account_id}/{wallet}"
        ));
    }
    // The credits the ledger's open holds hold, from their own hold events (not from the
    // balance the last event reported, which is Redis's figure), must be what Redis
    // holds: else a hold that did end in Redis (its end event lost) would end twice.
    let mut open_amount = 0;
    for id in &open {
        if let Some(e) = store.hold_event(account_id, wallet, id).await? {
            open_amount += e.amount;
        }
    }
    if open_amount != snapshot.balance.held {
        return refused(format!(
            "the ledger's open holds in {account_id}/{wallet} hold {open_amount} credits, \
             Redis {}: an end Redis made is missing from the ledger",
            snapshot.balance.held
        ));
    }
    let tag = ledger.shards().tag(shard);
    let record = format!("{tag}:h:{hold_id}");
    let (deadlines, wallet_key) = (
        format!("{tag}:hw:{account_id}:{wallet}"),
        format!("{tag}:w:{account_id}:{wallet}"),
    );
    let (exists, due, budgets): (i64, Option<String>, Option<String>) = ledger
        .redis()
        .pipeline(
            redis::pipe()
                .cmd("EXISTS")
                .arg(&record)
                .cmd("ZSCORE")
                .arg(&deadlines)
                .arg(hold_id)
                .cmd("HGET")
                .arg(&wallet_key)
                .arg("bg"),
        )
        .await?;
    if exists == 1 {
        return refused(format!(
            "Redis still has hold {hold_id}'s record: end it as any hold"
        ));
    }
    if due.is_some() {
        return refused(format!(
            "hold {hold_id} is still in Redis's deadline index, which drops it at its deadline: \
             run this once reconcile names it"
        ));
    }
    let Some(event) = store.hold_event(account_id, wallet, hold_id).await? else {
        return refused(format!("the ledger has no hold event for {hold_id}"));
    };
    if !event.member.is_empty() || budgets.is_some_and(|b| !b.is_empty()) {
        return refused(format!(
            "hold {hold_id} counts against a member's allocation or a budget, which this does not rebuild"
        ));
    }
    let Some((policy, deadline)) = super::restore::hold_terms(&event) else {
        return refused(format!("the hold event of {hold_id} has no deadline"));
    };
    let written: i64 = ledger
        .redis()
        .query(
            redis::cmd("EVAL")
                .arg(REWRITE_HOLD_LUA)
                .arg(4)
                .arg(&record)
                .arg(&deadlines)
                .arg(&wallet_key)
                .arg(format!("{tag}:due"))
                .arg(account_id)
                .arg(wallet)
                .arg(event.amount)
                .arg(super::restore::pieces_text(&event.lots))
                .arg(deadline)
                .arg(&policy)
                .arg(&event.operation)
                .arg(hold_id)
                .arg(format!("{account_id}:{wallet}")),
        )
        .await?;
    if written != 1 {
        return refused(format!(
            "hold {hold_id}'s record appeared meanwhile: end it as any hold"
        ));
    }
    let end = EndHold::release(hold_id.to_owned(), format!("end-lost-hold-{hold_id}"));
    match ledger.end_hold(&end).await {
        Ok(outcome) => Ok(LostHoldEnd::Released {
            amount: outcome.released,
        }),
        Err(LedgerError::Refused(Refusal::HoldEnded { how, captured })) => {
            Ok(LostHoldEnd::ByPolicy { how, captured })
        }
        Err(err) => Err(err.into()),
    }
}
