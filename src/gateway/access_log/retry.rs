//! Settlements from Envoy's access log that met a transient ledger error, retried off the
//! stream's read loop.
//!
//! A settlement that Redis could not take (`Unavailable`: a call timeout, a reconnect,
//! LOADING, READONLY during a failover; `NotInitialized`: a shard awaiting restore, which
//! rebuilds the holds the store had) used to be dropped with a warning, and the hold then
//! ended at its deadline by `on_expiry`: with `release` a call the API answered 2xx was
//! free, with `capture` a failed call was charged in full. Retrying is safe: the
//! settlement's idempotency key (`gw:settle:<hold_id>`) makes a repeat of one that did run
//! (its answer lost to the timeout) a replay, and a hold that ended meanwhile answers
//! `HOLD_ENDED`.
//!
//! One task ([`Retrier::run`]) retries them, one call at a time, each with its own
//! backoff ([`RETRY_BACKOFF_MIN`] doubling to [`RETRY_BACKOFF_MAX`]) for at most
//! [`RETRY_WINDOW`] after it was queued; at most [`RETRIES_PENDING_MAX`] wait at once. The
//! streams hand settlements over ([`Retries::push`]) and read on: while the ledger is
//! failing ([`Retries::failing`]) they hand over every settlement without trying it
//! first, so a Redis that stopped answering (each call waits for its deadline) does not
//! slow their reading to one entry per call deadline. On shutdown the task goes on for
//! at most [`RETRY_SHUTDOWN_GRACE`] while settlements are pending, then drops the rest.
//! Every settlement handed over is counted once, by how it ended, in
//! `tollgate_access_log_retries_total{result}` ([`Ended`]).

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::gateway::pricing::Settlement;
use crate::gateway::Gateway;
use crate::ledger::{EndHoldOutcome, LedgerError, Refusal};
use crate::telemetry::metrics as m;

/// How long a settlement is retried after it was handed over: a Redis restart, a
/// reconnect or a replica's promotion takes seconds, and a hold's ttl is typically a
/// minute (the examples' 60 s) of which the call itself took part. Not configurable, like
/// the shutdown grace: an attempt past the hold's deadline would only hear `HOLD_ENDED`
/// (the hold ended by `on_expiry`), so a longer window buys nothing for holds of a usual
/// ttl, and the bound on pending settlements limits the memory either way.
pub const RETRY_WINDOW: Duration = Duration::from_secs(30);
/// The wait before a settlement's first retry; also how late past its window a retry
/// may still be attempted (the task was busy with others).
pub const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(250);
/// The longest wait between two attempts of one settlement: it doubles from
/// [`RETRY_BACKOFF_MIN`] up to this, about ten attempts in the window.
pub const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(4);
/// Settlements waiting for a retry, at most; past it one is not queued (counted as
/// `queue_full`) and its hold follows `on_expiry`. About 100 bytes each: ~1 MB. Ten
/// seconds of a gateway logging 1,000 holds a second: a longer outage loses entries
/// to this bound or to the window anyway.
pub const RETRIES_PENDING_MAX: usize = 10_000;
/// After the stop signal, retries go on at most this long while some are pending (Redis
/// may be answering again), then the rest are dropped (`shutdown`): well inside
/// `server::SHUTDOWN_GRACE`, which bounds the join of this task.
pub const RETRY_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How a settlement handed over for retries ended: the `result` label of
/// `tollgate_access_log_retries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The hold was captured or released as the entry said (or the settlement had run
    /// and this was its replay).
    Settled,
    /// The hold had ended otherwise (the API settled it, or it expired).
    HoldEnded,
    /// The ledger refused it for good (an unknown hold, an internal error): logged.
    Failed,
    /// Still failing at the end of [`RETRY_WINDOW`]: the hold follows `on_expiry`.
    GaveUp,
    /// Not queued: [`RETRIES_PENDING_MAX`] were pending.
    QueueFull,
    /// Pending when the process stopped.
    Shutdown,
}

impl Ended {
    pub const ALL: [Ended; 6] = [
        Ended::Settled,
        Ended::HoldEnded,
        Ended::Failed,
        Ended::GaveUp,
        Ended::QueueFull,
        Ended::Shutdown,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Ended::Settled => "settled",
            Ended::HoldEnded => "hold_ended",
            Ended::Failed => "failed",
            Ended::GaveUp => "gave_up",
            Ended::QueueFull => "queue_full",
            Ended::Shutdown => "shutdown",
        }
    }
}

/// What a settlement's answer means for its log entry. Pure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Settled,
    /// Ended already (by the upstream, by its deadline, or by an earlier copy of this
    /// entry under another settlement).
    HoldEnded,
    /// Redis could not take the call now; nothing ran, or what ran replays: retry.
    Transient,
    /// Retrying cannot help.
    Failed,
}

pub fn judge(result: &Result<EndHoldOutcome, LedgerError>) -> Answer {
    match result {
        Ok(_) => Answer::Settled,
        Err(LedgerError::Refused(Refusal::HoldEnded { .. } | Refusal::IdempotencyKeyReused)) => {
            Answer::HoldEnded
        }
        Err(LedgerError::Unavailable(_) | LedgerError::NotInitialized) => Answer::Transient,
        Err(_) => Answer::Failed,
    }
}

/// The wait after the one that just ran out: double, up to [`RETRY_BACKOFF_MAX`].
pub fn next_backoff(backoff: Duration) -> Duration {
    (backoff * 2).min(RETRY_BACKOFF_MAX)
}

/// When to try a settlement again after it failed `now` with this backoff, or `None`
/// to give up: never past `give_up_at`.
pub fn retry_at(now: Instant, backoff: Duration, give_up_at: Instant) -> Option<Instant> {
    (now < give_up_at).then(|| (now + backoff).min(give_up_at))
}

/// Whether a retry due long ago is still worth its call: not once it is later than
/// [`RETRY_BACKOFF_MIN`] past its window (the task was behind, on calls that each waited
/// for their deadline), so a settlement never outlives its window by more than that and
/// one call.
pub fn worth_trying(now: Instant, give_up_at: Instant) -> bool {
    now <= give_up_at + RETRY_BACKOFF_MIN
}

/// One settlement waiting for its next attempt.
struct Retry {
    hold_id: String,
    settlement: Settlement,
    due: Instant,
    give_up_at: Instant,
    /// The wait after its next failure.
    backoff: Duration,
    /// Order of arrival, among retries due at the same instant.
    seq: u64,
    /// Its place among [`RETRIES_PENDING_MAX`]; given back when it ends.
    _pending: OwnedSemaphorePermit,
}

// Ordered for a max-heap so that the earliest due (then the first queued) comes first.
impl Ord for Retry {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}
impl PartialOrd for Retry {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Retry {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == CmpOrdering::Equal
    }
}
impl Eq for Retry {}

/// What the streams and the task share.
struct Shared {
    /// The last settlement (tried on a stream or by the task) met a transient error, and
    /// no answer came since.
    failing: AtomicBool,
    pending: Arc<Semaphore>,
    /// By [`Ended::ALL`]'s order; resolved once.
    counters: [metrics::Counter; 6],
}

impl Shared {
    fn count(&self, ended: Ended) {
        let index = Ended::ALL
            .iter()
            .position(|e| *e == ended)
            .expect("every Ended is in ALL");
        self.counters[index].increment(1);
    }

    /// Counts how a settlement ended, and logs a lost one (a WARN per hold, as each
    /// failed settlement was before retries: the id lets an operator settle it by hand).
    fn ended(&self, ended: Ended, hold_id: &str, error: Option<&LedgerError>) {
        self.count(ended);
        let error = error.map(ToString::to_string);
        match ended {
            Ended::Settled | Ended::HoldEnded => tracing::debug!(
                hold_id,
                result = ended.label(),
                "hold settled from the access log after a retry"
            ),
            Ended::Failed => tracing::warn!(
                hold_id,
                error,
                "could not settle a hold from the access log; it follows its on_expiry policy"
            ),
            Ended::GaveUp | Ended::QueueFull | Ended::Shutdown => tracing::warn!(
                hold_id,
                error,
                result = ended.label(),
                "could not settle a hold from the access log (the ledger was unavailable); \
                 it follows its on_expiry policy"
            ),
        }
    }
}

/// The streams' side: hands settlements over to the [`Retrier`]. Cheap to clone.
#[derive(Clone)]
pub struct Retries {
    tx: mpsc::UnboundedSender<Retry>,
    shared: Arc<Shared>,
}

/// The task's side: see [`Retrier::run`].
pub struct Retrier {
    gateway: Arc<Gateway>,
    rx: mpsc::UnboundedReceiver<Retry>,
    shared: Arc<Shared>,
    due: BinaryHeap<Retry>,
    seq: u64,
}

/// A retry queue over `gateway`'s ledger; run the [`Retrier`] as a task.
pub fn queue(gateway: Arc<Gateway>) -> (Retries, Retrier) {
    let counters = Ended::ALL.map(|ended| {
        let counter = metrics::counter!(m::ACCESS_LOG_RETRIES_TOTAL, "result" => ended.label());
        // At 0 from the start, so alerts on their increase see the first one.
        counter.increment(0);
        counter
    });
    let shared = Arc::new(Shared {
        failing: AtomicBool::new(false),
        pending: Arc::new(Semaphore::new(RETRIES_PENDING_MAX)),
        counters,
    });
    // Unbounded as a channel, bounded by the permits every Retry holds.
    let (tx, rx) = mpsc::unbounded_channel();
    (
        Retries {
            tx,
            shared: shared.clone(),
        },
        Retrier {
            gateway,
            rx,
            shared,
            due: BinaryHeap::new(),
            seq: 0,
        },
    )
}

impl Retries {
    /// Whether the ledger is failing (the last settlement met a transient error, and no
    /// answer came since): settlements are then handed over without a try on the stream.
    pub fn failing(&self) -> bool {
        self.shared.failing.load(Ordering::Relaxed)
    }

    /// Notes what a settlement tried on a stream answered.
    pub fn answered(&self, answer: Answer) {
        self.shared
            .failing
            .store(answer == Answer::Transient, Ordering::Relaxed);
    }

    /// Hands a settlement over for retries: the first at once when `tried` is false
    /// (the stream skipped it, the ledger failing), else after [`RETRY_BACKOFF_MIN`].
    /// Counted and logged when it cannot be queued (the bound, or the task stopped).
    pub fn push(&self, hold_id: &str, settlement: Settlement, tried: bool) {
        let Ok(pending) = self.shared.pending.clone().try_acquire_owned() else {
            self.shared.ended(Ended::QueueFull, hold_id, None);
            return;
        };
        let now = Instant::now();
        let retry = Retry {
            hold_id: hold_id.to_owned(),
            settlement,
            due: if tried { now + RETRY_BACKOFF_MIN } else { now },
            give_up_at: now + RETRY_WINDOW,
            backoff: if tried {
                next_backoff(RETRY_BACKOFF_MIN)
            } else {
                RETRY_BACKOFF_MIN
            },
            seq: 0,
            _pending: pending,
        };
        if let Err(mpsc::error::SendError(retry)) = self.tx.send(retry) {
            self.shared.ended(Ended::Shutdown, &retry.hold_id, None);
        }
    }
}

impl Retrier {
    /// Retries what is handed over until `stopped`, then while some are pending for at
    /// most [`RETRY_SHUTDOWN_GRACE`]; what is left then (and what is handed over later) is
    /// dropped, counted as `shutdown`.
    pub async fn run(mut self, stopped: impl Future<Output = ()>) {
        tokio::pin!(stopped);
        let mut stop_by: Option<Instant> = None;
        let mut open = true;
        loop {
            if stop_by.is_some() && self.due.is_empty() && self.rx.is_empty() {
                break;
            }
            if !open && self.due.is_empty() {
                // Every stream's sender is gone (the server was dropped): nothing more.
                break;
            }
            let next_due = self.due.peek().map(|r| r.due);
            tokio::select! {
                biased;
                () = &mut stopped, if stop_by.is_none() => {
                    stop_by = Some(Instant::now() + RETRY_SHUTDOWN_GRACE);
                }
                () = sleep_until(stop_by) => break,
                received = self.rx.recv(), if open => match received {
                    Some(retry) => self.schedule(retry),
                    None => open = false,
                },
                () = sleep_until(next_due) => {
                    if let Some(retry) = self.due.pop() {
                        self.attempt(retry).await;
                    }
                }
            }
        }
        self.rx.close();
        let mut dropped = 0;
        while let Ok(retry) = self.rx.try_recv() {
            self.due.push(retry);
        }
        for retry in self.due.drain() {
            self.shared.ended(Ended::Shutdown, &retry.hold_id, None);
            dropped += 1;
        }
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "shutting down: access-log settlements still waiting for the ledger were \
                 dropped; their holds follow their on_expiry policy"
            );
        }
    }

    fn schedule(&mut self, mut retry: Retry) {
        self.seq += 1;
        retry.seq = self.seq;
        self.due.push(retry);
    }

    async fn attempt(&mut self, mut retry: Retry) {
        if !worth_trying(Instant::now(), retry.give_up_at) {
            self.shared.ended(Ended::GaveUp, &retry.hold_id, None);
            return;
        }
        let result = self
            .gateway
            .end_hold(&retry.hold_id, retry.settlement)
            .await;
        let answer = judge(&result);
        self.shared
            .failing
            .store(answer == Answer::Transient, Ordering::Relaxed);
        let error = result.as_ref().err();
        match answer {
            Answer::Settled => self.shared.ended(Ended::Settled, &retry.hold_id, None),
            Answer::HoldEnded => self.shared.ended(Ended::HoldEnded, &retry.hold_id, None),
            Answer::Failed => self.shared.ended(Ended::Failed, &retry.hold_id, error),
            Answer::Transient => match retry_at(Instant::now(), retry.backoff, retry.give_up_at) {
                Some(due) => {
                    tracing::debug!(
                        hold_id = retry.hold_id,
                        error = error.map(ToString::to_string),
                        "an access-log settlement failed again; retrying"
                    );
                    retry.due = due;
                    retry.backoff = next_backoff(retry.backoff);
                    self.schedule(retry);
                }
                None => self.shared.ended(Ended::GaveUp, &retry.hold_id, error),
            },
        }
    }
}

/// Completes at `at`; never without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::HoldEnd;

    #[test]
    fn only_an_unavailable_or_uninitialized_ledger_is_retried() {
        let outcome = EndHoldOutcome {
            event_id: "0-1-0".into(),
            captured: 8,
            released: 42,
            available: 150,
            held: 0,
            expired: 0,
            replayed: false,
        };
        assert_eq!(judge(&Ok(outcome)), Answer::Settled);
        let err = |e: LedgerError| judge(&Err(e));
        assert_eq!(
            err(LedgerError::Unavailable("timed out".into())),
            Answer::Transient
        );
        assert_eq!(err(LedgerError::NotInitialized), Answer::Transient);
        assert_eq!(
            err(LedgerError::Refused(Refusal::HoldEnded {
                how: HoldEnd::Expired,
                captured: 0
            })),
            Answer::HoldEnded
        );
        assert_eq!(
            err(LedgerError::Refused(Refusal::IdempotencyKeyReused)),
            Answer::HoldEnded
        );
        assert_eq!(err(LedgerError::NotFound("hold")), Answer::Failed);
        assert_eq!(err(LedgerError::Internal("bad".into())), Answer::Failed);
        assert_eq!(err(LedgerError::OutboxFull), Answer::Failed);
    }

    #[test]
    fn retries_back_off_and_end_with_their_window() {
        let start = Instant::now();
        let give_up_at = start + RETRY_WINDOW;
        // Doubling from the minimum, capped.
        let mut backoff = RETRY_BACKOFF_MIN;
        let mut now = start + RETRY_BACKOFF_MIN;
        let mut attempts = 1;
        while let Some(due) = retry_at(now, backoff, give_up_at) {
            assert!(due > now && due <= give_up_at);
            assert!(due - now <= RETRY_BACKOFF_MAX);
            backoff = next_backoff(backoff);
            now = due;
            attempts += 1;
            assert!(attempts < 100, "no end");
        }
        assert_eq!(now, give_up_at, "the last attempt is at the window's end");
        assert!((5..=20).contains(&attempts), "{attempts} attempts");
        assert_eq!(next_backoff(RETRY_BACKOFF_MAX), RETRY_BACKOFF_MAX);
        // A retry the task reaches late is still tried a little past its window, not
        // later.
        assert!(worth_trying(give_up_at, give_up_at));
        assert!(worth_trying(give_up_at + RETRY_BACKOFF_MIN, give_up_at));
        assert!(!worth_trying(
            give_up_at + RETRY_BACKOFF_MIN + Duration::from_millis(1),
            give_up_at
        ));
        // The window is far inside the examples' hold ttl, and the shutdown grace inside
        // the server's.
        assert!(RETRY_WINDOW <= Duration::from_secs(30));
        assert!(RETRY_SHUTDOWN_GRACE < crate::server::SHUTDOWN_GRACE);
    }

    #[test]
    fn the_earliest_due_retry_comes_first() {
        let pending = Arc::new(Semaphore::new(3));
        let now = Instant::now();
        let retry = |hold_id: &str, due: Instant, seq: u64| Retry {
            hold_id: hold_id.into(),
            settlement: Settlement::Release,
            due,
            give_up_at: now + RETRY_WINDOW,
            backoff: RETRY_BACKOFF_MIN,
            seq,
            _pending: pending.clone().try_acquire_owned().expect("permit"),
        };
        let mut heap = BinaryHeap::new();
        heap.push(retry("late", now + Duration::from_secs(2), 1));
        heap.push(retry("second", now, 3));
        heap.push(retry("first", now, 2));
        assert_eq!(pending.available_permits(), 0);
        let order: Vec<String> = std::iter::from_fn(|| heap.pop().map(|r| r.hold_id)).collect();
        assert_eq!(order, ["first", "second", "late"]);
        // Each ended retry gives its place back.
        assert_eq!(pending.available_permits(), 3);
    }
}
