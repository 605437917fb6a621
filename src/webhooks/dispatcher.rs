//! The dispatcher: POSTs recorded deliveries, at least once and in order per account.
//!
//! It keeps up to `concurrency` attempts in flight, one account each: whenever a slot
//! frees it reads the due heads of the accounts' queues (the oldest pending delivery;
//! later ones wait behind it, so one account's webhooks never overtake each other), leases
//! each with a compare-and-set in the store (several dispatchers can run at once; a lease
//! that outlives a crashed dispatcher simply expires), POSTs it, and records the attempt.
//! A receiver slow on one account holds one slot, not the others.
//! Failures are retried with capped exponential backoff and jitter until
//! `attempts_max`, then the delivery is marked "failed" and the account's queue moves on
//! (Admin RetryWebhookDelivery puts it back for a new round: up to `attempts_max` more
//! attempts, the backoff starting over; `attempts` keeps the total). It also announces
//! expiring lots (`lot.expiring`).

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, Histogram};
use tokio::task::{JoinError, JoinSet};

use super::client::{AttemptError, WebhookClient};
use super::rules::{expiring_delivery, Rules, WebhookType};
use super::DispatchSettings;
use crate::settle::webhook_store::{AttemptOutcome, Delivery};
use crate::settle::{Store, StoreError};
use crate::telemetry::metrics as m;

/// A lease outlives an attempt's deadline by this much.
pub const LEASE_MARGIN: Duration = Duration::from_secs(10);
/// Expiring lots announced per pass (a full pass is followed by another at once).
pub const EXPIRING_LOTS_PER_ROUND_MAX: u32 = 500;
/// How often the backlog gauge is measured and old tracked lots are pruned.
pub const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(5);
/// Tracked lots are forgotten this long after they expired.
pub const LOT_RETENTION_AFTER_EXPIRY: Duration = Duration::from_secs(24 * 3600);
/// How often queues a build before schema v13 left without a head mark are looked for
/// (and at start): a read of every pending delivery (`Store::repair_heads`).
pub const HEAD_REPAIR_INTERVAL: Duration = Duration::from_secs(60);
/// Ended deliveries deleted per housekeeping round (every few seconds): bounded work.
pub const DELIVERIES_PRUNED_PER_ROUND_MAX: i64 = 1000;

const RESULTS: [&str; 3] = ["delivered", "retry", "gave_up"];

/// Metric handles, resolved once.
struct DispatchMetrics {
    /// Per type, per result.
    attempts: Vec<[Counter; 3]>,
    created: Vec<Counter>,
    duration: Histogram,
    pending: Gauge,
}

impl DispatchMetrics {
    fn new() -> Self {
        Self {
            attempts: WebhookType::ALL
                .iter()
                .map(|t| {
                    RESULTS.map(|result| {
                        metrics::counter!(
                            m::WEBHOOK_ATTEMPTS_TOTAL,
                            "type" => t.as_str(),
                            "result" => result
                        )
                    })
                })
                .collect(),
            created: WebhookType::ALL
                .iter()
                .map(|t| metrics::counter!(m::WEBHOOK_EVENTS_TOTAL, "type" => t.as_str()))
                .collect(),
            duration: metrics::histogram!(m::WEBHOOK_ATTEMPT_SECONDS),
            pending: metrics::gauge!(m::WEBHOOK_PENDING),
        }
    }
}

/// Counts deliveries created (by the settler), per type.
pub fn count_created(created: &[u64; 5]) {
    for (t, n) in WebhookType::ALL.iter().zip(created) {
        if *n > 0 {
            metrics::counter!(m::WEBHOOK_EVENTS_TOTAL, "type" => t.as_str()).increment(*n);
        }
    }
}

pub struct Dispatcher {
    store: Arc<Store>,
    client: Arc<WebhookClient>,
    settings: DispatchSettings,
    rules: Arc<Rules>,
    metrics: Arc<DispatchMetrics>,
    last_announce: Option<Instant>,
    /// The last announcement found a full batch: announce again at once.
    announce_more: bool,
    last_housekeeping: Option<Instant>,
    last_head_repair: Option<Instant>,
}

/// How long a dispatcher waits at shutdown for its attempts in flight: within the
/// process's shutdown grace for its background tasks (`server::SHUTDOWN_GRACE`, 10 s).
pub const ATTEMPTS_SHUTDOWN_WAIT: Duration = Duration::from_secs(8);

impl Dispatcher {
    pub fn new(
        store: Arc<Store>,
        settings: DispatchSettings,
        rules: Arc<Rules>,
    ) -> Result<Self, AttemptError> {
        let client = WebhookClient::new(
            &settings.url,
            &settings.secret,
            &settings.secret_previous,
            settings.timeout,
        )?;
        Ok(Self {
            store,
            client: Arc::new(client),
            settings,
            rules,
            metrics: Arc::new(DispatchMetrics::new()),
            last_announce: None,
            announce_more: false,
            last_housekeeping: None,
            last_head_repair: None,
        })
    }

    /// Runs until `shutdown` resolves; then starts no attempt and waits for those in
    /// flight, at most [`ATTEMPTS_SHUTDOWN_WAIT`]: a POST whose receiver answered is
    /// recorded as delivered. They were abandoned at once, so every rolling deploy sent
    /// the deliveries in flight again once their leases expired (their accounts' queues
    /// waiting meanwhile). One still running after the wait is abandoned (its lease
    /// expires and it is sent again: at least once).
    ///
    /// A steady pool of up to `concurrency` attempts, one account each: whenever one ends
    /// (its slot frees, and its account's next delivery may be due), the due heads are read
    /// again and the free slots filled, skipping accounts already in flight. A receiver
    /// hanging on one account's delivery holds one slot until the attempt's deadline, not
    /// every other account.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut pool = Pool::default();
        let mut backoff = self.settings.poll_interval;
        loop {
            let (wait, failed) = tokio::select! {
                _ = &mut shutdown => return pool.wind_down().await,
                result = self.fill(&mut pool) => match result {
                    Ok(more) => {
                        backoff = self.settings.poll_interval;
                        (if more { Duration::ZERO } else { self.settings.poll_interval }, false)
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, retry_in_ms = backoff.as_millis() as u64, "webhook dispatch failed");
                        let wait = backoff;
                        backoff = next_round_backoff(backoff, self.settings.poll_interval);
                        (wait, true)
                    }
                }
            };
            // Wait for a slot to free (not while the store is failing: its backoff stands),
            // for `wait` to pass (not while every slot is taken), or for shutdown.
            let full = pool.len() >= self.settings.concurrency;
            if full || !wait.is_zero() {
                tokio::select! {
                    _ = &mut shutdown => return pool.wind_down().await,
                    Some(joined) = pool.tasks.join_next_with_id(), if !failed && !pool.is_empty() => {
                        pool.finished(joined);
                    }
                    _ = tokio::time::sleep(wait), if failed || !full => {}
                }
            }
            pool.reap();
        }
    }

    /// Announces expiring lots and does the housekeeping when they are due (failures
    /// logged: they do not stop deliveries), then starts attempts of due heads in the free
    /// slots of `pool`. True when more heads may be due right now (as many were read as
    /// asked for, and some started). A store error leasing a head stops the leasing; the
    /// attempts already started stay in the pool.
    async fn fill(&mut self, pool: &mut Pool) -> Result<bool, StoreError> {
        let now = crate::ledger::wall_clock_ms();
        self.housekeeping(now).await;
        let free = self.settings.concurrency.saturating_sub(pool.len());
        if free == 0 {
            return Ok(false);
        }
        // Read as many as the pool holds: a head of an account in flight (a lease that
        // expired while its attempt still runs, a stalled process) is skipped.
        let limit = self.settings.concurrency;
        let heads = self
            .store
            .due_deliveries(now, u32::try_from(limit).unwrap_or(u32::MAX))
            .await?;
        let read = heads.len();
        let mut started = 0;
        for delivery in heads {
            if started == free {
                break;
            }
            if pool.holds(&delivery.account_id) {
                continue;
            }
            // The lease runs from now, just before the POST: the earlier store work
            // (announcements, housekeeping, other leases) must not eat its margin, or a
            // second dispatcher could send the delivery while this one still is.
            let now = crate::ledger::wall_clock_ms();
            let lease_until = now + (self.settings.timeout + LEASE_MARGIN).as_millis() as i64;
            if !self
                .store
                .lease_delivery(&delivery.delivery_id, delivery.attempts, now, lease_until)
                .await?
            {
                // Another dispatcher took it, or attempted it since `heads` was read (then
                // its backoff decides the next attempt).
                continue;
            }
            let account_id = delivery.account_id.clone();
            let task = pool.tasks.spawn(attempt(
                self.store.clone(),
                self.client.clone(),
                self.settings.clone(),
                self.metrics.clone(),
                delivery,
                lease_until,
            ));
            pool.accounts.insert(task.id(), account_id);
            started += 1;
        }
        Ok((started > 0 && read == limit) || self.announce_more)
    }

    /// Expiring lots (every poll interval, or at once while a full batch was found) and
    /// the housekeeping (every `HOUSEKEEPING_INTERVAL`, the head repair every
    /// `HEAD_REPAIR_INTERVAL`). A failure is logged (throttled) and retried at the next
    /// interval: it must not stop the deliveries.
    async fn housekeeping(&mut self, now: i64) {
        if self.rules.tracks_lots()
            && (self.announce_more
                || self
                    .last_announce
                    .is_none_or(|t| t.elapsed() >= self.settings.poll_interval))
        {
            self.last_announce = Some(Instant::now());
            match self.announce_expiring(now).await {
                Ok(more) => self.announce_more = more,
                Err(e) => {
                    self.announce_more = false;
                    crate::log_throttled!(WARN, error = %e, "expiring lots not announced; retried next poll");
                }
            }
        }
        if self
            .last_housekeeping
            .is_none_or(|t| t.elapsed() >= HOUSEKEEPING_INTERVAL)
        {
            self.last_housekeeping = Some(Instant::now());
            match self.store.pending_deliveries().await {
                Ok(pending) => self.metrics.pending.set(pending as f64),
                Err(e) => crate::log_throttled!(WARN, error = %e, "webhook backlog not measured"),
            }
            if self.rules.tracks_lots() {
                let before = now - LOT_RETENTION_AFTER_EXPIRY.as_millis() as i64;
                if let Err(e) = self.store.prune_lots(before).await {
                    crate::log_throttled!(WARN, error = %e, "expired lots not pruned");
                }
            }
            if let Some(retention) = self.settings.delivery_retention {
                let before = now - retention.as_millis() as i64;
                if let Err(e) = self
                    .store
                    .prune_deliveries(before, DELIVERIES_PRUNED_PER_ROUND_MAX)
                    .await
                {
                    crate::log_throttled!(WARN, error = %e, "ended webhook deliveries not pruned");
                }
            }
        }
        if self
            .last_head_repair
            .is_none_or(|t| t.elapsed() >= HEAD_REPAIR_INTERVAL)
        {
            // A failed repair (a statement timeout over a big backlog) must not stop the
            // deliveries: the queues it would mark wait for the next one.
            match self.store.repair_heads().await {
                Ok(0) => {}
                Ok(repaired) => tracing::warn!(
                    queues = repaired,
                    "webhook queues without their head marked, marked (an older build, before schema v13, changed them)"
                ),
                Err(e) => tracing::warn!(
                    error = %e,
                    "webhook queue head repair failed; retried in a minute"
                ),
            }
            self.last_head_repair = Some(Instant::now());
        }
    }

    /// Announces up to `EXPIRING_LOTS_PER_ROUND_MAX` expiring lots; true when that many
    /// were found (more may wait).
    async fn announce_expiring(&self, now: i64) -> Result<bool, StoreError> {
        let until = now + self.rules.lot_expiring_lead.as_millis() as i64;
        let lots = self
            .store
            .expiring_lots(now, until, EXPIRING_LOTS_PER_ROUND_MAX)
            .await?;
        let full = lots.len() >= EXPIRING_LOTS_PER_ROUND_MAX as usize;
        let mut announced = 0u64;
        for lot in lots {
            let delivery = expiring_delivery(
                &lot.account_id,
                &lot.wallet,
                &lot.lot_id,
                lot.expires_at_ms,
                lot.remaining,
                now,
            );
            if self.store.announce_expiring(&lot, &delivery).await? {
                announced += 1;
            }
        }
        if announced > 0 {
            self.metrics.created[WebhookType::LotExpiring as usize].increment(announced);
        }
        Ok(full)
    }
}

/// The attempts in flight, and the account of each (one attempt per account at a time).
#[derive(Default)]
struct Pool {
    tasks: JoinSet<Result<(), StoreError>>,
    accounts: HashMap<tokio::task::Id, String>,
}

impl Pool {
    fn len(&self) -> usize {
        self.tasks.len()
    }

    fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    fn holds(&self, account_id: &str) -> bool {
        self.accounts.values().any(|a| a == account_id)
    }

    /// At shutdown: waits for the attempts in flight, at most [`ATTEMPTS_SHUTDOWN_WAIT`];
    /// those still running are abandoned (aborted with the pool).
    async fn wind_down(mut self) {
        let all = async {
            while let Some(joined) = self.tasks.join_next_with_id().await {
                self.finished(joined);
            }
        };
        if tokio::time::timeout(ATTEMPTS_SHUTDOWN_WAIT, all)
            .await
            .is_err()
        {
            tracing::warn!(
                in_flight = self.len(),
                "webhook attempts still in flight at shutdown: abandoned (sent again once \
                 their leases expire)"
            );
        }
    }

    /// Collects the attempts that have ended, without waiting.
    fn reap(&mut self) {
        while let Some(joined) = self.tasks.try_join_next_with_id() {
            self.finished(joined);
        }
    }

    /// An attempt ended: its slot and its account are free.
    fn finished(&mut self, joined: Result<(tokio::task::Id, Result<(), StoreError>), JoinError>) {
        let id = match &joined {
            Ok((id, _)) => *id,
            Err(err) => err.id(),
        };
        self.accounts.remove(&id);
        match joined {
            Ok((_, Ok(()))) => {}
            // Not recorded: the lease expires and the delivery is sent again.
            Ok((_, Err(err))) => crate::log_throttled!(
                WARN,
                error = %err,
                "webhook attempt not recorded (store failed); sent again once its lease expires"
            ),
            Err(err) => tracing::error!(error = %err, "webhook attempt task failed"),
        }
    }
}

/// One attempt of one delivery leased until `lease_until`, recorded in the store unless
/// the lease has passed to another dispatcher in the meantime.
async fn attempt(
    store: Arc<Store>,
    client: Arc<WebhookClient>,
    settings: DispatchSettings,
    metrics: Arc<DispatchMetrics>,
    delivery: Delivery,
    lease_until: i64,
) -> Result<(), StoreError> {
    let started = Instant::now();
    let result = client
        .post(
            &delivery.delivery_id,
            &delivery.event_type,
            &delivery.payload,
        )
        .await;
    metrics.duration.record(started.elapsed().as_secs_f64());
    // Attempts count across manual retries; `attempts_max` and the backoff apply to the
    // round (Admin RetryWebhookDelivery starts a new one).
    let attempt_number = delivery.attempts + 1;
    let round_attempt = delivery.round_attempts() + 1;
    let type_index = WebhookType::parse(&delivery.event_type).map(|t| t as usize);
    let count = |result: usize| {
        if let Some(i) = type_index {
            metrics.attempts[i][result].increment(1);
        }
    };
    let now = crate::ledger::wall_clock_ms();
    let outcome = match result {
        Ok(status) => {
            count(0);
            AttemptOutcome::Delivered {
                status_code: i64::from(status),
            }
        }
        Err(err) => {
            let give_up = round_attempt >= i64::from(settings.attempts_max);
            count(if give_up { 2 } else { 1 });
            let wait = backoff(
                settings.backoff_min,
                settings.backoff_max,
                u32::try_from(round_attempt).unwrap_or(u32::MAX),
            );
            // No account id, URL or payload in logs: the delivery id finds the row.
            if give_up {
                tracing::warn!(delivery_id = %delivery.delivery_id, event = %delivery.event_type, attempts = attempt_number, round_attempt, error = %err, "webhook delivery given up");
            } else {
                tracing::info!(delivery_id = %delivery.delivery_id, event = %delivery.event_type, attempts = attempt_number, round_attempt, retry_in_ms = wait.as_millis() as u64, error = %err, "webhook delivery failed; retrying");
            }
            AttemptOutcome::Failed {
                status_code: i64::from(err.status_code()),
                error: err.to_string(),
                next_attempt_at_ms: now + wait.as_millis() as i64,
                give_up,
            }
        }
    };
    let recorded = store
        .finish_attempt(&delivery.delivery_id, lease_until, now, &outcome)
        .await?;
    if !recorded {
        // The attempt outlived its lease (a stalled process): another dispatcher has taken
        // the delivery, and its record stands. The receiver may see it twice (webhooks
        // are at least once; the delivery id lets it tell).
        tracing::warn!(delivery_id = %delivery.delivery_id, event = %delivery.event_type, "webhook attempt finished after its lease passed to another dispatcher; its result is not recorded");
    }
    Ok(())
}

/// Wait before attempt `failed + 1`: `min * 2^(failed-1)`, capped, with jitter between half
/// and all of it, so receivers coming back are not hit in lockstep.
pub fn backoff(min: Duration, max: Duration, failed: u32) -> Duration {
    let exponent = failed.saturating_sub(1).min(30);
    let base = min.saturating_mul(1u32 << exponent).min(max);
    let random = RandomState::new().build_hasher().finish();
    base.mul_f64(0.5 + (random % 1000) as f64 / 2000.0)
}

/// The longest the dispatcher waits after a pass its store failed: store outages are
/// retried like the settler's (`settler::DEFAULT_BACKOFF_MAX`), not on the deliveries' own
/// retry schedule (`webhooks.backoff_max_ms`, an hour by default), which would leave
/// webhooks silent that long after the store is back.
pub const STORE_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// The wait after the next failed pass, from this one's.
fn next_round_backoff(backoff: Duration, poll_interval: Duration) -> Duration {
    (backoff * 2).min(STORE_BACKOFF_MAX.max(poll_interval))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_store_is_retried_within_seconds() {
        let poll = Duration::from_millis(500);
        let mut wait = poll;
        for _ in 0..40 {
            wait = next_round_backoff(wait, poll);
        }
        assert_eq!(wait, STORE_BACKOFF_MAX);
        // A poll interval above the cap is the cap.
        let slow = Duration::from_secs(30);
        assert_eq!(next_round_backoff(slow, slow), slow);
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        for failed in 1..40 {
            let b = backoff(min, max, failed);
            let base = (min * 2u32.pow(failed.saturating_sub(1).min(30))).min(max);
            assert!(b >= base / 2 && b <= base, "{failed}: {b:?} vs {base:?}");
        }
    }
}
