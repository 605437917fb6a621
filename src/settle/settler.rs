//! The settler: a Redis Streams consumer group over every shard's outbox. It reads events
//! in batches, writes each batch to the store in one transaction, acknowledges (`XACK`)
//! only after the commit, and trims what every consumer group has acknowledged. Batches a
//! dead settler left pending are taken over with `XAUTOCLAIM` after an idle time. Store
//! errors are retried with capped exponential backoff and jitter; meanwhile the hot path
//! keeps working and the outbox grows. Any number of settlers may run at once: the store
//! deduplicates on the event id.

use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge};
use redis::Value;

use super::store::{ReusedId, Store, StoreError, STORE_ERROR_KINDS};
use crate::ledger::event::{parse_stream_id, EventKind, LedgerEvent};
use crate::ledger::{Ledger, LedgerError};
use crate::telemetry::metrics as m;
use crate::webhooks::{dispatcher, Rules};

pub const DEFAULT_GROUP: &str = "tollgate-settler";
/// Events read per shard per round.
pub const DEFAULT_BATCH_EVENTS_MAX: usize = 2000;
/// Sleep between rounds when the outboxes are empty.
pub const DEFAULT_IDLE_WAIT: Duration = Duration::from_millis(50);
/// See `SettlerSettings::linger`: on 2 cores, 100 ms took the full stack from 13,600 to
/// 16,200 checks/s with settlement (docs/BENCHMARKS.md), lag p99 266 ms.
pub const DEFAULT_LINGER: Duration = Duration::from_millis(100);
/// A batch pending this long in another consumer is taken over.
pub const DEFAULT_CLAIM_IDLE: Duration = Duration::from_secs(30);
pub const DEFAULT_BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How often acknowledged entries are trimmed and the lag is measured.
pub const DEFAULT_TRIM_INTERVAL: Duration = Duration::from_secs(1);
/// A consumer that has not read for this long and has nothing pending is removed from the
/// group by the other settlers' prune (see `SettlerSettings::consumer_idle_max`).
pub const DEFAULT_CONSUMER_IDLE_MAX: Duration = Duration::from_secs(24 * 3600);
/// The prune of idle consumers runs at most this often (and at least every half of
/// `consumer_idle_max`, and never more often than the trim).
const PRUNE_INTERVAL_MAX: Duration = Duration::from_secs(600);
/// On a clean stop, how long the settler goes on settling what is pending in its own
/// consumer (the batch in hand, the read-ahead batch) before it leaves it to be claimed.
/// Inside the shutdown grace of `serve` and `settle` (server.rs, `SHUTDOWN_GRACE`).
pub const LEAVE_SETTLE_GRACE: Duration = Duration::from_secs(4);
/// Then how long it tries to remove its consumer from every shard's group.
pub const LEAVE_REMOVE_GRACE: Duration = Duration::from_secs(2);
/// Rounds of XAUTOCLAIM paging per shard per claim pass.
const CLAIM_PAGES_MAX: usize = 16;
/// Events the store refused that are set aside one after another without any write the
/// store took in between; past it, a refused write is retried like an unreachable store.
/// A refusal of every row (a constraint added by hand, say) is then a stopped settler
/// and an alert, not the whole outbox moved to the dead letters.
pub const SET_ASIDE_WITHOUT_A_WRITE_MAX: usize = 10;

#[derive(Debug, Clone)]
pub struct SettlerSettings {
    pub group: String,
    pub consumer: String,
    pub batch_events_max: usize,
    pub idle_wait: Duration,
    pub claim_idle: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub trim_interval: Duration,
    /// After a batch smaller than `batch_events_max`, the next read waits this long from
    /// the start of the commit, so batches grow under moderate load (fewer, larger store
    /// transactions) at the cost of this much lag. Zero: read as soon as possible.
    pub linger: Duration,
    /// Usage-webhook rules: deliveries are derived from each batch's new events in the
    /// batch's transaction. None = webhooks off.
    pub webhooks: Option<Arc<Rules>>,
    /// Consumers of the group (other than this one) that have not read for this long and
    /// have nothing pending are removed from every shard's group: settlers that stopped
    /// without removing their own (a crash, a kill, a stop with entries pending that
    /// others claimed since). A consumer with pending entries is never removed.
    pub consumer_idle_max: Duration,
}

impl Default for SettlerSettings {
    fn default() -> Self {
        Self {
            group: DEFAULT_GROUP.into(),
            consumer: default_consumer(),
            batch_events_max: DEFAULT_BATCH_EVENTS_MAX,
            idle_wait: DEFAULT_IDLE_WAIT,
            claim_idle: DEFAULT_CLAIM_IDLE,
            backoff_min: DEFAULT_BACKOFF_MIN,
            backoff_max: DEFAULT_BACKOFF_MAX,
            trim_interval: DEFAULT_TRIM_INTERVAL,
            linger: DEFAULT_LINGER,
            webhooks: None,
            consumer_idle_max: DEFAULT_CONSUMER_IDLE_MAX,
        }
    }
}

/// Credit counters fed from newly settled events (each event counted once, by the
/// settler that wrote it first). Handles are resolved once.
struct CreditMetrics {
    /// debit, capture, expire_hold
    charged: [Counter; 3],
    /// purchase, demo, promo, adjustment, other
    granted: [Counter; 5],
    refunded: Counter,
    /// expire_lot, refund
    expired: [Counter; 2],
    /// up, down
    adjusted: [Counter; 2],
    holds_active: Gauge,
}

const GRANT_KINDS: [&str; 5] = ["purchase", "demo", "promo", "adjustment", "other"];

impl CreditMetrics {
    fn new() -> Self {
        Self {
            charged: ["debit", "capture", "expire_hold"]
                .map(|e| metrics::counter!(m::CREDITS_CHARGED_TOTAL, "event" => e)),
            granted: GRANT_KINDS.map(|k| metrics::counter!(m::CREDITS_GRANTED_TOTAL, "kind" => k)),
            refunded: metrics::counter!(m::CREDITS_REFUNDED_TOTAL),
            expired: ["expire_lot", "refund"]
                .map(|e| metrics::counter!(m::CREDITS_EXPIRED_TOTAL, "event" => e)),
            adjusted: ["up", "down"]
                .map(|d| metrics::counter!(m::CREDITS_ADJUSTED_TOTAL, "direction" => d)),
            holds_active: metrics::gauge!(m::HOLDS_ACTIVE),
        }
    }

    fn count(&self, e: &LedgerEvent) {
        let d = e.deltas();
        if d.used > 0 {
            let i = match e.kind {
                EventKind::Debit => 0,
                EventKind::Capture => 1,
                _ => 2,
            };
            self.charged[i].increment(d.used as u64);
        }
        if d.granted > 0 {
            let kind = e.extra.split('|').next().unwrap_or("");
            let i = GRANT_KINDS[..4]
                .iter()
                .position(|k| *k == kind)
                .unwrap_or(4);
            self.granted[i].increment(d.granted as u64);
        }
        if d.refunded > 0 {
            self.refunded.increment(d.refunded as u64);
        }
        if d.expired > 0 {
            let i = usize::from(e.kind == EventKind::Refund);
            self.expired[i].increment(d.expired as u64);
        }
        if d.adjusted > 0 {
            self.adjusted[0].increment(d.adjusted as u64);
        } else if d.adjusted < 0 {
            self.adjusted[1].increment(d.adjusted.unsigned_abs());
        }
    }
}

/// `<host>-<pid>`: unique per process, readable in XINFO CONSUMERS. A new name per process
/// (per pod in Kubernetes): the settler removes its consumer when it stops cleanly
/// ([`Settler::leave`]), and the others prune the ones left behind
/// ([`SettlerSettings::consumer_idle_max`]).
pub fn default_consumer() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "tollgate".into());
    format!("{host}-{}", std::process::id())
}

/// One shard's outbox as the settler last measured it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxMeasure {
    /// Entries in the stream.
    pub len: u64,
    /// When the oldest event not yet settled was written (ms, its stream id's time);
    /// `None` when every event was settled.
    pub oldest_unsettled_at_ms: Option<i64>,
}

/// What readiness and metrics need to know about settlement.
///
/// Times, not ages: an age measured in the past stays small for ever when the settler
/// stops measuring (its task died, a store query hangs), so readiness and the lag gauge
/// compute ages when they are read ([`SettlerStatus::lag_ms`]), and
/// [`SettlerStatus::measured_ago_ms`] tells how old the measurement itself is.
#[derive(Debug, Clone, Default)]
pub struct SettlerStatus {
    /// Per shard, at the last measurement.
    pub shards: Vec<OutboxMeasure>,
    /// When the outboxes were last measured (wall clock, ms); when the settler was made,
    /// before its first measurement. The settler measures every `trim_interval`, and
    /// while the store fails, every retry.
    pub measured_at_ms: i64,
    /// The last store write or migration failed with this error (cleared by the next
    /// success).
    pub store_error: Option<String>,
    pub settled_total: u64,
}

impl SettlerStatus {
    /// A shard's settlement lag at `now_ms`: the age of the oldest event that was
    /// unsettled at the last measurement (it may have settled since: an upper bound
    /// until the next measurement), 0 when none was.
    pub fn shard_lag_ms(&self, shard: usize, now_ms: i64) -> u64 {
        self.shards
            .get(shard)
            .and_then(|m| m.oldest_unsettled_at_ms)
            .map_or(0, |at| (now_ms - at).max(0) as u64)
    }

    /// The largest [`SettlerStatus::shard_lag_ms`].
    pub fn lag_ms(&self, now_ms: i64) -> u64 {
        (0..self.shards.len())
            .map(|shard| self.shard_lag_ms(shard, now_ms))
            .max()
            .unwrap_or(0)
    }

    /// How long ago the outboxes were last measured.
    pub fn measured_ago_ms(&self, now_ms: i64) -> u64 {
        (now_ms - self.measured_at_ms).max(0) as u64
    }

    pub fn outbox_len(&self) -> u64 {
        self.shards.iter().map(|m| m.len).sum()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    #[error(transparent)]
    Redis(#[from] LedgerError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("outbox not drained within {0:?}")]
    DrainTimeout(Duration),
}

pub struct Settler {
    ledger: Arc<Ledger>,
    store: Arc<Store>,
    settings: SettlerSettings,
    status: Arc<Mutex<SettlerStatus>>,
    /// Per shard: still reading this consumer's own pending entries (after a restart, or
    /// after a read or acknowledgement that failed).
    recovering: Vec<bool>,
    /// The next batch, read from Redis while the previous one was being written.
    ahead: Option<Batch>,
    /// Read ahead (off while draining).
    pipelined: bool,
    last_claim: Option<Instant>,
    last_trim: Option<Instant>,
    last_prune: Option<Instant>,
    credits: CreditMetrics,
    /// Refused events set aside since the store last took a write (see
    /// [`SET_ASIDE_WITHOUT_A_WRITE_MAX`]).
    set_aside_in_a_row: AtomicUsize,
}

/// What a commit did besides writing events.
#[derive(Debug, Default)]
struct Committed {
    /// Ids of the events the shards' fences refused (not written, not acknowledged).
    fenced: Vec<String>,
    /// Ids of the events the store refused, or whose id it holds for another event, moved
    /// to the dead letters (acknowledged).
    set_aside: Vec<String>,
}

impl Settler {
    pub fn new(ledger: Arc<Ledger>, store: Arc<Store>, settings: SettlerSettings) -> Self {
        let shards = usize::from(ledger.shards().count());
        // At 0 from the start, so an alert on its increase sees the first dead letter.
        for shard in 0..shards {
            metrics::counter!(m::SETTLE_DEAD_LETTERS_TOTAL, "shard" => shard.to_string())
                .increment(0);
        }
        metrics::counter!(m::SETTLE_FENCED_EVENTS_TOTAL).increment(0);
        metrics::counter!(m::SETTLE_REUSED_EVENT_IDS_TOTAL).increment(0);
        Self {
            ledger,
            store,
            settings,
            status: Arc::new(Mutex::new(SettlerStatus {
                shards: vec![OutboxMeasure::default(); shards],
                measured_at_ms: crate::ledger::wall_clock_ms(),
                ..Default::default()
            })),
            recovering: vec![true; shards],
            ahead: None,
            pipelined: true,
            last_claim: None,
            last_trim: None,
            last_prune: None,
            credits: CreditMetrics::new(),
            set_aside_in_a_row: AtomicUsize::new(0),
        }
        .with_error_series()
    }

    /// Registers the error counters at zero, so dashboards and alerts see the series (and
    /// `rate()` works) before the first error.
    fn with_error_series(self) -> Self {
        for kind in STORE_ERROR_KINDS {
            let _ = metrics::counter!(m::STORE_ERRORS_TOTAL, "kind" => kind);
        }
        for kind in ["redis", "store"] {
            let _ = metrics::counter!(m::SETTLER_ROUND_ERRORS_TOTAL, "kind" => kind);
        }
        self
    }

    pub fn status(&self) -> Arc<Mutex<SettlerStatus>> {
        self.status.clone()
    }

    fn set_status(&self, f: impl FnOnce(&mut SettlerStatus)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }

    /// Creates the consumer group on every shard outbox (from the first entry, so events
    /// written before any settler ran are settled too).
    pub async fn ensure_groups(&self) -> Result<(), SettleError> {
        for shard in 0..self.ledger.shards().count() {
            let result: Result<Value, LedgerError> = self
                .ledger
                .redis()
                .query(
                    redis::cmd("XGROUP")
                        .arg("CREATE")
                        .arg(self.ledger.shards().outbox(shard))
                        .arg(&self.settings.group)
                        .arg("0")
                        .arg("MKSTREAM"),
                )
                .await;
            match result {
                Ok(_) => {}
                Err(LedgerError::Internal(e)) if e.contains("BUSYGROUP") => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Runs until `shutdown` resolves, then leaves ([`Settler::leave`]). Redis errors are
    /// retried like store errors.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut backoff = self.settings.backoff_min;
        let mut ready = false;
        loop {
            let step = async {
                if !ready {
                    // Groups first: with them, the lag is measured even while the store
                    // cannot be migrated.
                    self.ensure_groups().await?;
                    self.migrate().await?;
                    self.set_status(|s| s.store_error = None);
                    ready = true;
                }
                self.round().await
            };
            let wait = tokio::select! {
                _ = &mut shutdown => break,
                result = step => match result {
                    Ok(0) => {
                        backoff = self.settings.backoff_min;
                        self.settings.idle_wait
                    }
                    Ok(_) => {
                        backoff = self.settings.backoff_min;
                        Duration::ZERO
                    }
                    Err(err) => {
                        let kind = match &err {
                            SettleError::Store(store) => {
                                // Readiness shows it (a failed migration, say), not only
                                // a failed batch write.
                                self.set_status(|s| s.store_error = Some(store.to_string()));
                                "store"
                            }
                            _ => "redis",
                        };
                        metrics::counter!(m::SETTLER_ROUND_ERRORS_TOTAL, "kind" => kind).increment(1);
                        if kind == "store" {
                            // Keep the lag gauges and readiness moving while the store is
                            // away (as a failing batch write does): the lag bound must hold
                            // when the store is down from the start, too.
                            if let Err(err) = self.trim_and_measure().await {
                                tracing::debug!(error = %err, "could not measure the outbox");
                            }
                        }
                        tracing::warn!(error = %err, retry_in_ms = backoff.as_millis() as u64, "settler round failed");
                        // Redis may have restarted empty (no consumer groups): set up again.
                        ready = false;
                        let wait = jitter(backoff);
                        backoff = (backoff * 2).min(self.settings.backoff_max);
                        wait
                    }
                }
            };
            if !wait.is_zero() {
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
        // A round cut short by the stop left its batch pending in this consumer (so did
        // the read-ahead): settled here, unless the store was failing (`ready` is then
        // false, and the batch is left to a claim).
        self.leave(ready).await;
    }

    /// A clean stop: settles what is pending in this consumer (when `settle`), for at most
    /// [`LEAVE_SETTLE_GRACE`], then removes the consumer from every shard's group where it
    /// has nothing pending, for at most [`LEAVE_REMOVE_GRACE`]. Without it every process
    /// (a new `<host>-<pid>` name each time) left a consumer in every shard's group for
    /// good. Where entries are still pending the consumer stays: removing it would throw
    /// them away (consumers.lua checks and removes in one call); other settlers claim them
    /// after `claim_idle`, and the prune removes the consumer once it is empty and idle.
    pub async fn leave(&mut self, settle: bool) {
        self.ahead = None;
        if settle {
            match tokio::time::timeout(LEAVE_SETTLE_GRACE, self.settle_own_pending()).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    tracing::warn!(error = %err, "could not settle this settler's pending entries on stop; other settlers claim them")
                }
                Err(_) => tracing::warn!(
                    grace_ms = LEAVE_SETTLE_GRACE.as_millis() as u64,
                    "this settler's pending entries were not settled within the stop grace; other settlers claim them"
                ),
            }
        }
        // Where it is kept (entries pending), nothing more to do here.
        let removing = async {
            for shard in 0..self.ledger.shards().count() {
                self.ledger
                    .remove_consumer(shard, &self.settings.group, &self.settings.consumer)
                    .await?;
            }
            Ok::<_, LedgerError>(())
        };
        match tokio::time::timeout(LEAVE_REMOVE_GRACE, removing).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "could not remove this settler's consumer from the group; the other settlers' prune will")
            }
            Err(_) => tracing::warn!(
                "removing this settler's consumer from the group timed out; the other settlers' prune will"
            ),
        }
    }

    /// Reads this consumer's own pending entries on every shard and settles them (no new
    /// entries, no claims), until none is left or only entries the shards' fences refused.
    async fn settle_own_pending(&mut self) -> Result<(), SettleError> {
        // Every shard, anew: a round the stop cut short during its read-ahead left
        // `recovering` taken (empty).
        self.recovering = vec![true; usize::from(self.ledger.shards().count())];
        while self.recovering.iter().any(|r| *r) {
            let mut batch =
                read_batch(&self.ledger, &self.settings, &mut self.recovering, false).await?;
            if batch.events.is_empty() {
                continue;
            }
            let Committed { fenced, set_aside } = self.commit(&batch).await?;
            if !fenced.is_empty() {
                // Left pending, as in `round`: the consumer stays with them.
                return Ok(());
            }
            let set_aside: HashSet<&str> = set_aside.iter().map(String::as_str).collect();
            batch
                .events
                .retain(|e| !set_aside.contains(e.event_id.as_str()));
            self.ack(&batch.events).await?;
        }
        Ok(())
    }

    /// Removes the group's consumers idle longer than `consumer_idle_max` with nothing
    /// pending, on every shard (see [`SettlerSettings::consumer_idle_max`]). Not fatal to
    /// the round: the next prune tries again.
    async fn prune_consumers(&mut self) {
        let interval = (self.settings.consumer_idle_max / 2)
            .min(PRUNE_INTERVAL_MAX)
            .max(self.settings.trim_interval);
        if self.last_prune.is_some_and(|t| t.elapsed() < interval) {
            return;
        }
        self.last_prune = Some(Instant::now());
        let mut removed = 0;
        for shard in 0..self.ledger.shards().count() {
            match self
                .ledger
                .prune_consumers(
                    shard,
                    &self.settings.group,
                    &self.settings.consumer,
                    self.settings.consumer_idle_max,
                )
                .await
            {
                Ok(n) => removed += n,
                Err(err) => {
                    tracing::debug!(error = %err, shard, "could not prune idle consumers");
                    return;
                }
            }
        }
        if removed > 0 {
            tracing::info!(
                removed,
                idle_max_ms = self.settings.consumer_idle_max.as_millis() as u64,
                "removed idle settler consumers with nothing pending from the group"
            );
        }
    }

    /// One round: claim stale batches if due, read, commit (retrying the same batch until
    /// the store takes it), acknowledge, trim if due. Returns events settled.
    ///
    /// While a batch is written to the store, the next one is read from Redis (the two
    /// use different processes, so they overlap); it is settled by the next round. Not
    /// while this consumer re-reads its own pending entries after a restart: those reads
    /// start from the beginning of the pending list, which still holds the batch in flight.
    pub async fn round(&mut self) -> Result<usize, SettleError> {
        let mut batch = match self.ahead.take() {
            Some(batch) => batch,
            None => self.read().await?,
        };
        if self
            .last_claim
            .is_none_or(|t| t.elapsed() >= self.settings.claim_idle / 2)
        {
            let claimed = match self.claim().await {
                Ok(claimed) => claimed,
                Err(err) => {
                    // The batch in hand (and what the claim took over before it failed)
                    // is pending in this consumer: read own pending entries first.
                    self.recovering.fill(true);
                    return Err(err);
                }
            };
            // A batch read ahead during a long store outage may be claimed back too.
            batch.merge(claimed);
            self.last_claim = Some(Instant::now());
        }
        let mut settled = batch.events.len();
        if !batch.events.is_empty() {
            let committed = if !self.pipelined || self.recovering.iter().any(|r| *r) {
                self.commit(&batch).await
            } else {
                let mut recovering = std::mem::take(&mut self.recovering);
                // Less than one shard's worth: no backlog, so let the next batch grow.
                let linger = if settled < self.settings.batch_events_max {
                    self.settings.linger
                } else {
                    Duration::ZERO
                };
                let (committed, next) = tokio::join!(self.commit(&batch), async {
                    tokio::time::sleep(linger).await;
                    read_batch(&self.ledger, &self.settings, &mut recovering, true).await
                });
                self.recovering = recovering;
                // A failed read-ahead is only retried: the batch in hand is written.
                self.ahead = next.ok();
                committed
            };
            let Committed { fenced, set_aside } = match committed {
                Ok(committed) => committed,
                Err(err) => {
                    // Part of the batch may be committed, none of it is acknowledged: it is
                    // pending in this consumer, as is the batch read ahead. Both are read
                    // again, in order, from own pending entries (not left to a claim, at
                    // least `claim_idle` later, behind newer batches).
                    self.ahead = None;
                    self.recovering.fill(true);
                    return Err(err);
                }
            };
            if !fenced.is_empty() {
                // Not acknowledged: if they are in this Redis after all (its epoch marker
                // was read before a restore finished), reading own pending entries again
                // gives them with the epoch they belong to.
                settled -= fenced.len();
                let fenced: HashSet<&str> = fenced.iter().map(String::as_str).collect();
                for e in &batch.events {
                    if fenced.contains(e.event_id.as_str()) {
                        self.recovering[usize::from(e.shard())] = true;
                    }
                }
                batch
                    .events
                    .retain(|e| !fenced.contains(e.event_id.as_str()));
            }
            if !set_aside.is_empty() {
                // Acknowledged already, by the set-aside.
                settled -= set_aside.len();
                let set_aside: HashSet<&str> = set_aside.iter().map(String::as_str).collect();
                batch
                    .events
                    .retain(|e| !set_aside.contains(e.event_id.as_str()));
            }
            if let Err(err) = self.ack(&batch.events).await {
                // Committed but maybe not acknowledged: still pending in this consumer.
                self.recovering.fill(true);
                return Err(err);
            }
        }
        if self
            .last_trim
            .is_none_or(|t| t.elapsed() >= self.settings.trim_interval)
        {
            self.trim_and_measure().await?;
            // The open-holds count lives in the store; several settlers all converge on it.
            match self.store.holds_open().await {
                Ok(n) => self.credits.holds_active.set(n as f64),
                Err(err) => tracing::debug!(error = %err, "could not read the open-holds count"),
            }
            self.last_trim = Some(Instant::now());
            self.prune_consumers().await;
        }
        Ok(settled)
    }

    /// Writes the batch. Returns the ids of the events the store's shard fences refused
    /// (read from a Redis that lost its data, whose shard a restore has rebuilt since
    /// without them) and of those the store refused, or whose id it already holds for a
    /// different event (`Appended::reused`), and that were set aside.
    ///
    /// The whole batch first. A part the store refuses for its data
    /// ([`StoreError::Refused`]: the same rows fail the same way every time) is split in
    /// halves, each written alone, down to the events it refuses alone: those go to the
    /// dead letters ([`set_aside`]), so one such event no longer stops every shard's
    /// settlement for good. Any other store error is retried with capped backoff until
    /// the store takes the part.
    async fn commit(&self, batch: &Batch) -> Result<Committed, SettleError> {
        let mut done = Committed::default();
        // Parts still to write, the next one last: in the batch's order.
        let mut parts: Vec<&[LedgerEvent]> = vec![&batch.events];
        while let Some(part) = parts.pop() {
            match self.write(part, &batch.epochs).await {
                Ok((fenced, reused)) => {
                    done.fenced.extend(fenced);
                    for r in reused {
                        let Some(e) = part.iter().find(|e| e.event_id == r.event_id) else {
                            continue;
                        };
                        let why = format!(
                            "event id reused by a different event: the store holds {} under it",
                            r.held
                        );
                        set_aside_event(&self.ledger, &self.settings.group, e, why, Cause::Reused)
                            .await?;
                        done.set_aside.push(r.event_id);
                    }
                }
                Err(_) if part.len() > 1 => {
                    let (first, second) = part.split_at(part.len() / 2);
                    parts.push(second);
                    parts.push(first);
                }
                Err(err) => {
                    for e in part {
                        let why = format!("refused by the store: {err}");
                        set_aside_event(&self.ledger, &self.settings.group, e, why, Cause::Refused)
                            .await?;
                        done.set_aside.push(e.event_id.clone());
                    }
                    self.set_aside_in_a_row
                        .fetch_add(part.len(), Ordering::Relaxed);
                }
            }
        }
        Ok(done)
    }

    /// Writes a part of a batch, retrying store errors with capped backoff until it
    /// succeeds; returns the fenced event ids, and the events whose id the store holds for
    /// a different event (not written). Only a refusal of the data
    /// ([`StoreError::Refused`]) is returned, and only while fewer than
    /// [`SET_ASIDE_WITHOUT_A_WRITE_MAX`] refused events were set aside in a row.
    async fn write(
        &self,
        events: &[LedgerEvent],
        epochs: &[Option<i64>],
    ) -> Result<(Vec<String>, Vec<ReusedId>), StoreError> {
        let mut backoff = self.settings.backoff_min;
        loop {
            let started = Instant::now();
            match self
                .store
                .append_batch(events, Some(epochs), self.settings.webhooks.as_deref())
                .await
            {
                Ok(appended) => {
                    self.set_aside_in_a_row.store(0, Ordering::Relaxed);
                    if !appended.fenced.is_empty() {
                        metrics::counter!(m::SETTLE_FENCED_EVENTS_TOTAL)
                            .increment(appended.fenced.len() as u64);
                        tracing::error!(
                            events = appended.fenced.len(),
                            "events read from a Redis that lost its data were not settled: \
                             a restore rebuilt their shard without them (the charges are lost \
                             with that Redis; docs/OPERATIONS.md, \"Restore\")"
                        );
                    }
                    let new = appended.new_events.len() as u64;
                    // Each new event once, even if the batch carried it twice.
                    let mut fresh = appended.new_events;
                    for e in events {
                        if fresh.remove(&e.event_id) {
                            self.credits.count(e);
                        }
                    }
                    if let Some(open) = appended.holds_open {
                        self.credits.holds_active.set(open as f64);
                    }
                    dispatcher::count_created(&appended.deliveries);
                    metrics::counter!(m::SETTLED_EVENTS_TOTAL).increment(new);
                    metrics::histogram!(m::SETTLE_BATCH_EVENTS).record(events.len() as f64);
                    metrics::histogram!(m::SETTLE_BATCH_SECONDS)
                        .record(started.elapsed().as_secs_f64());
                    self.set_status(|s| {
                        s.store_error = None;
                        s.settled_total += new;
                    });
                    if !appended.reused.is_empty() {
                        metrics::counter!(m::SETTLE_REUSED_EVENT_IDS_TOTAL)
                            .increment(appended.reused.len() as u64);
                    }
                    return Ok((appended.fenced, appended.reused));
                }
                Err(err) => {
                    metrics::counter!(m::STORE_ERRORS_TOTAL, "kind" => err.kind()).increment(1);
                    let isolate = matches!(err, StoreError::Refused(_))
                        && self.set_aside_in_a_row.load(Ordering::Relaxed)
                            < SET_ASIDE_WITHOUT_A_WRITE_MAX;
                    if isolate {
                        tracing::warn!(error = %err, events = events.len(), "the store refused a batch's data; writing it in halves to find the events it refuses");
                        return Err(err);
                    }
                    tracing::warn!(error = %err, events = events.len(), retry_in_ms = backoff.as_millis() as u64, "store write failed; retrying");
                    self.set_status(|s| s.store_error = Some(err.to_string()));
                    // Keep the lag gauges and readiness moving while the store is away.
                    if let Err(err) = self.trim_and_measure().await {
                        tracing::debug!(error = %err, "could not measure the outbox");
                    }
                    tokio::time::sleep(jitter(backoff)).await;
                    backoff = (backoff * 2).min(self.settings.backoff_max);
                }
            }
        }
    }

    /// Migrates the store; a failure is counted in `tollgate_store_errors_total` like a
    /// failed batch write, so `TollgateStoreErrors` fires for a store unreachable from
    /// start-up too (not only in the round errors).
    async fn migrate(&self) -> Result<(), SettleError> {
        self.store.migrate().await.map_err(|err| {
            metrics::counter!(m::STORE_ERRORS_TOTAL, "kind" => err.kind()).increment(1);
            SettleError::Store(err)
        })
    }

    async fn read(&mut self) -> Result<Batch, SettleError> {
        read_batch(&self.ledger, &self.settings, &mut self.recovering, true).await
    }

    /// Takes over entries other consumers left pending longer than the claim idle time.
    async fn claim(&self) -> Result<Batch, SettleError> {
        let shards = self.ledger.shards();
        // Read before the entries, so an entry is never taken for a newer Redis's.
        let epochs = epoch_markers(&self.ledger).await?;
        let mut batch = Vec::new();
        let mut unreadable = Vec::new();
        for shard in 0..shards.count() {
            let mut cursor = "0-0".to_owned();
            for _ in 0..CLAIM_PAGES_MAX {
                let reply: Value = self
                    .ledger
                    .redis()
                    .query(
                        redis::cmd("XAUTOCLAIM")
                            .arg(shards.outbox(shard))
                            .arg(&self.settings.group)
                            .arg(&self.settings.consumer)
                            .arg(self.settings.claim_idle.as_millis() as u64)
                            .arg(&cursor)
                            .arg("COUNT")
                            .arg(self.settings.batch_events_max),
                    )
                    .await?;
                let Value::Array(mut parts) = reply else {
                    break;
                };
                if parts.len() < 2 {
                    break;
                }
                let entries = parts.swap_remove(1);
                let next = text(&parts[0]).unwrap_or_else(|| "0-0".into());
                let (events, _) = parse_entries(shard, entries, &mut unreadable)?;
                if !events.is_empty() {
                    tracing::info!(shard, events = events.len(), "claimed a stale batch");
                }
                batch.extend(events);
                if next == "0-0" {
                    break;
                }
                cursor = next;
            }
        }
        set_aside(&self.ledger, &self.settings.group, &unreadable).await?;
        Ok(Batch {
            events: batch,
            epochs,
        })
    }

    async fn ack(&self, batch: &[LedgerEvent]) -> Result<(), SettleError> {
        if batch.is_empty() {
            return Ok(());
        }
        let shards = self.ledger.shards();
        let mut per_shard: Vec<Vec<&str>> = vec![Vec::new(); usize::from(shards.count())];
        for e in batch {
            per_shard[usize::from(e.shard())].push(&e.stream_id);
        }
        let mut pipe = redis::pipe();
        for (shard, ids) in per_shard.iter().enumerate() {
            if !ids.is_empty() {
                pipe.cmd("XACK")
                    .arg(shards.outbox(shard as u16))
                    .arg(&self.settings.group)
                    .arg(ids)
                    .ignore();
            }
        }
        let _: () = self.ledger.redis().pipeline(&pipe).await?;
        Ok(())
    }

    /// Trims each outbox up to what every consumer group has acknowledged, and measures
    /// its length and the age of its oldest unsettled event.
    pub async fn trim_and_measure(&self) -> Result<(), SettleError> {
        let shards = self.ledger.shards();
        let now_ms = crate::ledger::wall_clock_ms();
        let mut measured = Vec::with_capacity(usize::from(shards.count()));
        for shard in 0..shards.count() {
            let stream = shards.outbox(shard);
            let safe = settled_up_to(&self.ledger, stream).await?;
            if let Some(min_id) = &safe {
                let _: i64 = self
                    .ledger
                    .redis()
                    .query(redis::cmd("XTRIM").arg(stream).arg("MINID").arg(min_id))
                    .await?;
            }
            let len: u64 = self
                .ledger
                .redis()
                .query(redis::cmd("XLEN").arg(stream))
                .await?;
            let first: Value = self
                .ledger
                .redis()
                .query(
                    redis::cmd("XRANGE")
                        .arg(stream)
                        .arg(safe.as_deref().unwrap_or("-"))
                        .arg("+")
                        .arg("COUNT")
                        .arg(1),
                )
                .await?;
            let oldest_ms = first_entry_ms(&first);
            let age_ms = oldest_ms.map_or(0, |ms| (now_ms - ms).max(0) as u64);
            let label = shards.number(shard).to_owned();
            metrics::gauge!(m::OUTBOX_LENGTH, "shard" => label.clone()).set(len as f64);
            // Set again from the status on every scrape (server.rs), so it keeps growing
            // when measurements stop.
            metrics::gauge!(m::OUTBOX_OLDEST_AGE_SECONDS, "shard" => label)
                .set(age_ms as f64 / 1000.0);
            measured.push(OutboxMeasure {
                len,
                oldest_unsettled_at_ms: oldest_ms,
            });
        }
        self.set_status(|s| {
            s.shards = measured;
            s.measured_at_ms = now_ms;
        });
        Ok(())
    }

    /// Runs rounds until the group has settled (delivered and acknowledged) every entry
    /// the outboxes held when the drain started. Charges that keep flowing meanwhile do
    /// not keep it from ending, which is what `tollgate reconcile` on a live system needs.
    /// No linger and no read-ahead while draining: nothing is left pending in this
    /// consumer when it returns.
    pub async fn drain(&mut self, timeout: Duration) -> Result<(), SettleError> {
        let linger = std::mem::take(&mut self.settings.linger);
        self.pipelined = false;
        let drained = self.drain_now(timeout).await;
        self.settings.linger = linger;
        self.pipelined = true;
        drained
    }

    async fn drain_now(&mut self, timeout: Duration) -> Result<(), SettleError> {
        self.migrate().await?;
        self.ensure_groups().await?;
        let deadline = Instant::now() + timeout;
        let mut targets = Vec::new();
        for shard in 0..self.ledger.shards().count() {
            let stream = self.ledger.shards().outbox(shard);
            if let Some(last) = last_entry_id(&self.ledger, stream).await? {
                targets.push((stream.to_owned(), last));
            }
        }
        loop {
            let settled = self.round().await?;
            if self.settled_through_all(&targets).await? {
                self.trim_and_measure().await?;
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(SettleError::DrainTimeout(timeout));
            }
            if settled == 0 {
                // Someone else holds pending entries: wait for them or for the claim.
                tokio::time::sleep(self.settings.idle_wait).await;
                self.last_claim = None;
            }
        }
    }

    async fn settled_through_all(&self, targets: &[(String, String)]) -> Result<bool, SettleError> {
        for (stream, last) in targets {
            if !settled_through(&self.ledger, stream, &self.settings.group, last).await? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// Reads up to a batch per shard: new entries, or this consumer's own pending entries on
/// the shards still `recovering` (which stop recovering once those are all read). Without
/// `new_entries`, only the shards still `recovering` are read.
async fn read_batch(
    ledger: &Ledger,
    settings: &SettlerSettings,
    recovering: &mut [bool],
    new_entries: bool,
) -> Result<Batch, SettleError> {
    let shards = ledger.shards();
    let mut pipe = redis::pipe();
    // The shards' epoch markers first, on the same connection: the entries below come from
    // the Redis that answered these.
    epoch_markers_cmd(ledger, &mut pipe);
    let read: Vec<u16> = (0..shards.count())
        .filter(|shard| new_entries || recovering[usize::from(*shard)])
        .collect();
    for &shard in &read {
        let from = if recovering[usize::from(shard)] {
            "0"
        } else {
            ">"
        };
        pipe.cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&settings.group)
            .arg(&settings.consumer)
            .arg("COUNT")
            .arg(settings.batch_events_max)
            .arg("STREAMS")
            .arg(shards.outbox(shard))
            .arg(from);
    }
    let replies: Vec<Value> = match ledger.redis().pipeline(&pipe).await {
        Ok(replies) => replies,
        Err(err) => {
            // Redis may have run the reads without the reply reaching us (a call timeout, a
            // dropped connection): their entries are then pending in this consumer, and no
            // read of new entries returns them again. Read own pending entries first.
            recovering.fill(true);
            return Err(err.into());
        }
    };
    let mut replies = replies.into_iter();
    let epochs = replies.next().map(parse_epochs).unwrap_or_default();
    let mut batch = Vec::new();
    let mut unreadable = Vec::new();
    for (&shard, reply) in read.iter().zip(replies) {
        // One stream was read: RESP2 answers `[[name, entries]]`, RESP3 (a url with
        // `protocol=resp3`) a map `{name: entries}`; nil when there was nothing.
        let entries = match reply {
            Value::Array(mut streams) if !streams.is_empty() => match streams.swap_remove(0) {
                Value::Array(mut pair) if pair.len() == 2 => pair.swap_remove(1),
                _ => Value::Nil,
            },
            Value::Map(mut streams) if !streams.is_empty() => streams.swap_remove(0).1,
            _ => Value::Nil,
        };
        let (events, read) = match parse_entries(shard, entries, &mut unreadable) {
            Ok(parsed) => parsed,
            Err(err) => {
                // What this read delivered is pending in this consumer: read it again.
                recovering.fill(true);
                return Err(err);
            }
        };
        if read == 0 {
            // Own pending entries are all read: from now on, only new ones.
            recovering[usize::from(shard)] = false;
        }
        batch.extend(events);
    }
    if let Err(err) = set_aside(ledger, &settings.group, &unreadable).await {
        recovering.fill(true);
        return Err(err);
    }
    Ok(Batch {
        events: batch,
        epochs,
    })
}

/// Events read from the outboxes, with the shards' epoch markers read before them.
#[derive(Default)]
struct Batch {
    events: Vec<LedgerEvent>,
    /// Per shard: the epoch marker of the Redis the events were read from.
    epochs: Vec<Option<i64>>,
}

impl Batch {
    /// Adds another read's events (each event once). A shard read from two Redis
    /// incarnations (one lost in between) keeps the older epoch, so the store's fence
    /// refuses its events rather than take the older Redis's for the newer one's; the
    /// newer one's are then read again. (A shard without a marker in one read keeps the
    /// other's.)
    fn merge(&mut self, other: Batch) {
        if other.events.is_empty() {
            return;
        }
        let mut seen: HashSet<String> = self.events.iter().map(|e| e.event_id.clone()).collect();
        self.events.extend(
            other
                .events
                .into_iter()
                .filter(|e| seen.insert(e.event_id.clone())),
        );
        for (mine, theirs) in self.epochs.iter_mut().zip(other.epochs) {
            *mine = match (*mine, theirs) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
    }
}

/// `MGET` of every shard's epoch marker, added to a pipeline.
fn epoch_markers_cmd(ledger: &Ledger, pipe: &mut redis::Pipeline) {
    let shards = ledger.shards();
    pipe.cmd("MGET");
    for shard in 0..shards.count() {
        pipe.arg(shards.epoch_key(shard));
    }
}

/// Every shard's epoch marker, as the settler compares it with the store's fences.
async fn epoch_markers(ledger: &Ledger) -> Result<Vec<Option<i64>>, SettleError> {
    let mut pipe = redis::pipe();
    epoch_markers_cmd(ledger, &mut pipe);
    let replies: Vec<Value> = ledger.redis().pipeline(&pipe).await?;
    Ok(replies
        .into_iter()
        .next()
        .map(parse_epochs)
        .unwrap_or_default())
}

/// An `MGET` reply of epoch markers (ms; anything else counts as none).
fn parse_epochs(reply: Value) -> Vec<Option<i64>> {
    match reply {
        Value::Array(values) => values
            .iter()
            .map(|v| text(v).and_then(|t| t.parse().ok()))
            .collect(),
        _ => Vec::new(),
    }
}

/// An outbox entry the settler cannot read: a corrupt field, or the format of a newer
/// tollgate (a rollback after an upgrade); or one that read fine and the store did not take
/// ([`set_aside_event`]).
struct Unreadable {
    shard: u16,
    id: String,
    fields: Vec<Vec<u8>>,
    why: String,
    cause: Cause,
}

/// Why an entry is set aside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// It does not read.
    Unreadable,
    /// The store refused its data.
    Refused,
    /// The store holds a different event under its id (`Appended::reused`).
    Reused,
}

/// Sets aside an event that read fine but the store did not take (see `Settler::commit`):
/// refused for its data, or its id already held for a different event. Its outbox entry,
/// read again as Redis holds it (still there: it is pending, so not trimmed), goes to the
/// dead letters like an unreadable one, with `why` as its `error`.
async fn set_aside_event(
    ledger: &Ledger,
    group: &str,
    event: &LedgerEvent,
    why: String,
    cause: Cause,
) -> Result<(), SettleError> {
    let outbox = ledger.shards().outbox(event.shard());
    let reply: Value = ledger
        .redis()
        .query(
            redis::cmd("XRANGE")
                .arg(outbox)
                .arg(&event.stream_id)
                .arg(&event.stream_id),
        )
        .await?;
    let fields = match reply {
        Value::Array(entries) => entries.into_iter().find_map(|entry| match entry {
            Value::Array(mut parts) if parts.len() == 2 => match parts.swap_remove(1) {
                Value::Array(kv) => Some(kv.iter().map(raw_bytes).collect::<Vec<_>>()),
                _ => None,
            },
            _ => None,
        }),
        _ => None,
    };
    // Gone from the outbox (a Redis that lost its data since the read): nothing to copy,
    // so it is not acknowledged either; the round fails and re-reads its pending entries.
    let Some(fields) = fields else {
        return Err(SettleError::Redis(LedgerError::Internal(format!(
            "outbox entry {} of shard {} is gone; not set aside",
            event.stream_id,
            event.shard()
        ))));
    };
    let unreadable = Unreadable {
        shard: event.shard(),
        id: event.stream_id.clone(),
        fields,
        why,
        cause,
    };
    set_aside(ledger, group, std::slice::from_ref(&unreadable)).await
}

/// Sets one outbox entry aside: copies it to its shard's dead-letter stream, then
/// acknowledges it, in one script. KEYS outbox, dead-letter stream; ARGV group, entry id,
/// then the letter's fields and values. The copy is never trimmed: a dead letter is the
/// only copy of an event Redis applied and the store never took (`tollgate dead-letters
/// drop` removes one by hand). A refused copy (Redis out of memory, a key of another
/// type) raises before the acknowledgement: an acknowledged entry must be somewhere.
/// Both in one call: a copy whose acknowledgement never came (a crash, a connection lost
/// between two calls) was set aside again by the next round, two letters for one entry,
/// the second replayed without the first's corrections a conflict for good.
const SET_ASIDE_LUA: &str = "redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3)) \
    return redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])";

/// Moves unreadable entries out of the way: each is copied to its outbox's dead-letter
/// stream (`<outbox>:dead`, with its id and why) and acknowledged, so one bad entry
/// neither stops its batch, nor every later round, nor the trimming of its outbox
/// (which would end in OUTBOX_FULL). The event is then missing from the store, which
/// `tollgate reconcile` reports as a drift of its wallet; docs/OPERATIONS.md says how to
/// look at the dead letters.
async fn set_aside(
    ledger: &Ledger,
    group: &str,
    unreadable: &[Unreadable],
) -> Result<(), SettleError> {
    if unreadable.is_empty() {
        return Ok(());
    }
    let shards = ledger.shards();
    // Each entry copied and acknowledged in one script ([`SET_ASIDE_LUA`]).
    let mut pipe = redis::pipe();
    for u in unreadable {
        let outbox = shards.outbox(u.shard);
        let set_aside = pipe
            .cmd("EVAL")
            .arg(SET_ASIDE_LUA)
            .arg(2)
            .arg(outbox)
            .arg(super::restore::dead_letters_key(outbox))
            .arg(group)
            .arg(&u.id)
            .arg("id")
            .arg(&u.id)
            .arg("error")
            .arg(&u.why);
        for field in &u.fields {
            set_aside.arg(field.as_slice());
        }
        set_aside.ignore();
    }
    let _: () = ledger.redis().pipeline(&pipe).await?;
    for u in unreadable {
        metrics::counter!(m::SETTLE_DEAD_LETTERS_TOTAL, "shard" => u.shard.to_string())
            .increment(1);
        match u.cause {
            Cause::Refused => tracing::error!(
                shard = u.shard,
                entry = %u.id,
                error = %u.why,
                "an event the store refuses was moved to the dead-letter stream; the rest settles"
            ),
            Cause::Reused => tracing::error!(
                shard = u.shard,
                entry = %u.id,
                error = %u.why,
                "an event whose id the store holds for a different event was moved to the \
                 dead-letter stream (a Redis rolled back with its clock behind reused a \
                 settled id); the rest settles"
            ),
            Cause::Unreadable => tracing::error!(
                shard = u.shard,
                entry = %u.id,
                error = %u.why,
                "an outbox entry the settler cannot read was moved to the dead-letter stream"
            ),
        }
    }
    Ok(())
}

/// Entries `[[id, [k, v, ...]], ...]`: the events, and how many entries were read. Entries
/// whose content is gone (`[id, nil]`) are skipped (they cannot be settled; they were
/// trimmed, which only happens after an ack); entries that do not parse go to
/// `unreadable` (see [`set_aside`]).
///
/// An entry of a newer event format than this version knows fails the whole read
/// instead, unacknowledged: a newer settler can read it, so it must not be set aside
/// (docs/OPERATIONS.md, "Upgrades": settlers are upgraded first).
fn parse_entries(
    shard: u16,
    entries: Value,
    unreadable: &mut Vec<Unreadable>,
) -> Result<(Vec<LedgerEvent>, usize), SettleError> {
    let Value::Array(items) = entries else {
        return Ok((Vec::new(), 0));
    };
    // Entries whose content is gone do not count as read: a shard whose pending list
    // holds only those has nothing left to recover.
    let mut read = 0;
    let mut events = Vec::with_capacity(items.len());
    for entry in &items {
        let Value::Array(parts) = entry else {
            continue;
        };
        let [id, Value::Array(kv)] = parts.as_slice() else {
            continue;
        };
        read += 1;
        match LedgerEvent::from_stream_entry(shard, entry) {
            Ok(event) => events.push(event),
            Err(err) if LedgerEvent::written_by_newer_version(kv) => return Err(err.into()),
            Err(err) => match text(id) {
                Some(id) => unreadable.push(Unreadable {
                    shard,
                    id,
                    fields: kv.iter().map(raw_bytes).collect(),
                    why: err.to_string(),
                    cause: Cause::Unreadable,
                }),
                // Not an entry id: nothing to acknowledge it by (Redis never sends this).
                None => tracing::error!(shard, "an outbox entry without an id was skipped"),
            },
        }
    }
    Ok((events, read))
}

fn raw_bytes(v: &Value) -> Vec<u8> {
    match v {
        Value::BulkString(b) => b.clone(),
        Value::SimpleString(s) => s.as_bytes().to_vec(),
        other => format!("{other:?}").into_bytes(),
    }
}

fn first_entry_ms(reply: &Value) -> Option<i64> {
    let Value::Array(entries) = reply else {
        return None;
    };
    let Value::Array(entry) = entries.first()? else {
        return None;
    };
    parse_stream_id(&text(entry.first()?)?).map(|(ms, _)| ms)
}

/// Parses XINFO GROUPS into (pending, last-delivered-id) per group.
async fn groups(ledger: &Ledger, stream: &str) -> Result<Vec<(String, u64, String)>, SettleError> {
    let reply: Value = ledger
        .redis()
        .query(redis::cmd("XINFO").arg("GROUPS").arg(stream))
        .await?;
    let Value::Array(groups) = reply else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for g in groups {
        let fields: Vec<Value> = match g {
            Value::Array(f) => f,
            Value::Map(pairs) => pairs.into_iter().flat_map(|(k, v)| [k, v]).collect(),
            _ => continue,
        };
        let mut name = String::new();
        let mut pending = 0;
        let mut last = "0-0".to_owned();
        for pair in fields.chunks_exact(2) {
            match text(&pair[0]).as_deref() {
                Some("name") => name = text(&pair[1]).unwrap_or_default(),
                Some("pending") => {
                    if let Value::Int(n) = pair[1] {
                        pending = n.max(0) as u64;
                    }
                }
                Some("last-delivered-id") => last = text(&pair[1]).unwrap_or(last),
                _ => {}
            }
        }
        out.push((name, pending, last));
    }
    Ok(out)
}

/// The smallest pending id of a group, if any.
async fn pending_min(
    ledger: &Ledger,
    stream: &str,
    group: &str,
) -> Result<Option<String>, SettleError> {
    let reply: Value = ledger
        .redis()
        .query(redis::cmd("XPENDING").arg(stream).arg(group))
        .await?;
    Ok(match reply {
        Value::Array(parts) if parts.len() >= 2 => text(&parts[1]),
        _ => None,
    })
}

fn successor(id: &str) -> String {
    match parse_stream_id(id) {
        Some((ms, seq)) => format!("{ms}-{}", seq + 1),
        None => "0-1".into(),
    }
}

/// The id below which every consumer group has acknowledged everything: entries under
/// it are settled and may be trimmed. None when the stream has no group.
async fn settled_up_to(ledger: &Ledger, stream: &str) -> Result<Option<String>, SettleError> {
    let mut lowest: Option<(i64, i64, String)> = None;
    for (name, pending, last_delivered) in groups(ledger, stream).await? {
        let candidate = if pending > 0 {
            pending_min(ledger, stream, &name)
                .await?
                .unwrap_or_else(|| "0-1".into())
        } else {
            successor(&last_delivered)
        };
        let position = parse_stream_id(&candidate).unwrap_or((0, 1));
        if lowest
            .as_ref()
            .is_none_or(|(ms, seq, _)| position < (*ms, *seq))
        {
            lowest = Some((position.0, position.1, candidate));
        }
    }
    Ok(lowest.map(|(_, _, id)| id))
}

/// The id of a stream's newest entry (None: empty or missing).
pub(crate) async fn last_entry_id(
    ledger: &Ledger,
    stream: &str,
) -> Result<Option<String>, SettleError> {
    let reply: Value = ledger
        .redis()
        .query(
            redis::cmd("XREVRANGE")
                .arg(stream)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1),
        )
        .await?;
    let Value::Array(entries) = reply else {
        return Ok(None);
    };
    Ok(entries.first().and_then(|e| match e {
        Value::Array(p) => p.first().and_then(text),
        _ => None,
    }))
}

/// Whether the group has delivered and acknowledged every entry up to `id`.
pub async fn settled_through(
    ledger: &Ledger,
    stream: &str,
    group: &str,
    id: &str,
) -> Result<bool, SettleError> {
    let target = parse_stream_id(id).unwrap_or((0, 0));
    let Some((_, _, last_delivered)) = groups(ledger, stream)
        .await?
        .into_iter()
        .find(|(name, _, _)| name == group)
    else {
        return Ok(false);
    };
    if parse_stream_id(&last_delivered).unwrap_or((0, 0)) < target {
        // Not delivered that far; but there may be nothing to deliver in between (the
        // stream's id was moved past its entries: `tollgate restore`'s XSETID).
        let between: Vec<Value> = ledger
            .redis()
            .query(
                redis::cmd("XRANGE")
                    .arg(stream)
                    .arg(format!("({last_delivered}"))
                    .arg(id)
                    .arg("COUNT")
                    .arg(1),
            )
            .await?;
        if !between.is_empty() {
            return Ok(false);
        }
    }
    Ok(match pending_min(ledger, stream, group).await? {
        Some(min) => parse_stream_id(&min).unwrap_or((0, 0)) > target,
        None => true,
    })
}

/// Full jitter between half and all of `d`, so restarted settlers do not retry in step.
fn jitter(d: Duration) -> Duration {
    let random = RandomState::new().build_hasher().finish();
    let fraction = 0.5 + (random % 1000) as f64 / 2000.0;
    d.mul_f64(fraction)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_computed_when_read_from_the_measured_times() {
        let status = SettlerStatus {
            shards: vec![
                OutboxMeasure {
                    len: 3,
                    oldest_unsettled_at_ms: Some(10_000),
                },
                OutboxMeasure {
                    len: 0,
                    oldest_unsettled_at_ms: None,
                },
                OutboxMeasure {
                    len: 1,
                    oldest_unsettled_at_ms: Some(10_500),
                },
            ],
            measured_at_ms: 10_600,
            ..Default::default()
        };
        // At the measurement, and later without another one: the age keeps growing.
        assert_eq!(status.lag_ms(10_600), 600);
        assert_eq!(status.lag_ms(70_000), 60_000);
        assert_eq!(status.shard_lag_ms(1, 70_000), 0);
        assert_eq!(status.shard_lag_ms(2, 70_000), 59_500);
        assert_eq!(status.shard_lag_ms(9, 70_000), 0);
        assert_eq!(status.measured_ago_ms(70_000), 59_400);
        // A clock that went back reads as no age, not a huge one.
        assert_eq!(status.lag_ms(9_000), 0);
        assert_eq!(status.measured_ago_ms(9_000), 0);
        assert_eq!(status.outbox_len(), 4);
    }

    #[test]
    fn successor_and_jitter() {
        assert_eq!(successor("5-9"), "5-10");
        assert_eq!(successor("garbage"), "0-1");
        for _ in 0..100 {
            let j = jitter(Duration::from_millis(1000));
            assert!(j >= Duration::from_millis(500) && j <= Duration::from_millis(1000));
        }
    }
}
