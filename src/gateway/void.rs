//! Voids: undoing a `fail_closed` charge whose check was answered `unavailable` while the
//! charge may still run.
//!
//! A check whose charge passes its deadline (`redis.call_timeout_ms`, or the whole
//! check's `gateway.check_timeout_ms`) is denied (503 `unavailable`), but its FCALL may
//! already be on the wire: when Redis runs it late, the caller would be charged for a
//! request that was denied (or hold credits nobody captures). So may one whose connection
//! broke before the answer came (`LedgerError::may_have_run`: a reset, a killed client
//! connection, a failover after Redis ran the call). So the check hands the
//! charge, exactly as it was sent, to [`Voids::spawn`], which runs the ledger's void
//! (lua/void.lua, [`Ledger::void`]) in a task of its own: it refunds the debit in full
//! (a refund event of operation `void`) or releases the hold, and forgets the charge's
//! idempotency record, so a retry of the request (`gateway.request_id_replay`) is charged
//! again; when the charge never ran (or was refused) it changes nothing, nor when the
//! record it finds holds another attempt's mark (`ledger::AttemptMark`: a check keyed by
//! the client's request id whose charge only replayed an earlier attempt's, which stands).
//!
//! Ordering: the void may run before the late charge (another connection of the pool, or
//! one the watchdog replaced). A void that finds no charge leaves a fence under the
//! charge's key (lib.lua `VOID_FENCE`), so the charge, when it comes, charges nothing
//! (`LedgerError::Unavailable`); another attempt of the request is charged. Each void has its own idempotency key: a retried
//! attempt replays the first attempt's answer and never touches a later charge of the same
//! request. A failed attempt is retried with backoff ([`VOID_BACKOFF_MIN`] doubling to
//! [`VOID_BACKOFF_MAX`]) for at most [`VOID_RETRY_WINDOW`]; at most [`VOIDS_IN_FLIGHT_MAX`]
//! run at once (beyond it a void is dropped and counted). Every void is counted once, by
//! how it ended, in `tollgate_gateway_voids_total{outcome}` ([`VoidEnd`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::ledger::{
    Authorize, ChargeRef, Debit, KeyRef, Ledger, LedgerError, Metadata, VoidOutcome, Voided,
};
use crate::telemetry::metrics as m;

/// How long a void is retried: a Redis restart or a reconnect takes seconds. A charge that
/// reaches Redis later than this after its check is not voided (docs/ARCHITECTURE.md).
pub const VOID_RETRY_WINDOW: Duration = Duration::from_secs(60);
/// The wait before a void's first retry.
pub const VOID_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest wait between two attempts of one void.
pub const VOID_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Voids running at once, at most; beyond it a void is dropped (`dropped`). A few hundred
/// bytes each.
pub const VOIDS_IN_FLIGHT_MAX: usize = 10_000;

/// How a void ended: the `outcome` label of `tollgate_gateway_voids_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VoidEnd {
    /// The late debit was refunded in full.
    Refunded,
    /// The late hold was released.
    Released,
    /// Nothing to undo: the charge never ran, was refused, or ended otherwise.
    Nothing,
    /// The ledger refused the void for good (a refund past the wallet's lot cap, an
    /// internal error): logged.
    Failed,
    /// Redis did not take the void within [`VOID_RETRY_WINDOW`].
    GaveUp,
    /// Not started: [`VOIDS_IN_FLIGHT_MAX`] were running, or the runtime was gone.
    Dropped,
}

impl VoidEnd {
    pub const ALL: [VoidEnd; 6] = [
        VoidEnd::Refunded,
        VoidEnd::Released,
        VoidEnd::Nothing,
        VoidEnd::Failed,
        VoidEnd::GaveUp,
        VoidEnd::Dropped,
    ];

    pub fn label(self) -> &'static str {
        match self {
            VoidEnd::Refunded => "refunded",
            VoidEnd::Released => "released",
            VoidEnd::Nothing => "nothing",
            VoidEnd::Failed => "failed",
            VoidEnd::GaveUp => "gave_up",
            VoidEnd::Dropped => "dropped",
        }
    }
}

/// What one attempt's answer means. Pure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    Done(VoidEnd),
    /// Redis could not take it now (or the wallet has an expiry backlog): retry.
    Retry,
}

pub fn judge(result: &Result<VoidOutcome, LedgerError>) -> Attempt {
    match result {
        Ok(out) => Attempt::Done(match out.voided {
            Voided::Debit { .. } => VoidEnd::Refunded,
            Voided::Hold { .. } => VoidEnd::Released,
            Voided::Nothing(_) => VoidEnd::Nothing,
        }),
        Err(
            LedgerError::Unavailable(_)
            | LedgerError::ExpiryBacklog
            | LedgerError::OutboxFull
            | LedgerError::NotInitialized,
        ) => Attempt::Retry,
        Err(
            LedgerError::Refused(_)
            | LedgerError::InvalidArgument(_)
            | LedgerError::NotFound(_)
            | LedgerError::Internal(_),
        ) => Attempt::Done(VoidEnd::Failed),
    }
}

/// The charge a check sent, as a void needs it: the debit or hold command (its account
/// and member set when it was sent by account), and the API key when it was sent by key.
#[derive(Debug, Clone)]
pub struct VoidTarget {
    pub charge: VoidCharge,
    pub key: Option<OwnedKey>,
}

#[derive(Debug, Clone)]
pub enum VoidCharge {
    Debit(Debit),
    Hold(Authorize),
}

/// An API key as a charge by key names it ([`KeyRef`], owned).
#[derive(Debug, Clone)]
pub struct OwnedKey {
    pub key_id: String,
    pub shard: u16,
    pub digest_hex: String,
}

/// The gateway's voids: one per process.
pub struct Voids {
    in_flight: Arc<Semaphore>,
    /// By [`VoidEnd::ALL`]'s order; resolved once.
    counters: Arc<[metrics::Counter; 6]>,
}

impl Default for Voids {
    fn default() -> Self {
        Self::new()
    }
}

impl Voids {
    pub fn new() -> Self {
        let counters = VoidEnd::ALL.map(|end| {
            let counter = metrics::counter!(m::GATEWAY_VOIDS_TOTAL, "outcome" => end.label());
            // At 0 from the start, so alerts on their increase see the first one.
            counter.increment(0);
            counter
        });
        Self {
            in_flight: Arc::new(Semaphore::new(VOIDS_IN_FLIGHT_MAX)),
            counters: Arc::new(counters),
        }
    }

    /// Starts the void of `target` in a task of its own (never waits). Must be called
    /// before the check's answer is sent, so that on one connection the void is queued
    /// ahead of any retry the client makes after the 503.
    pub fn spawn(&self, ledger: Arc<Ledger>, target: VoidTarget) {
        let counters = self.counters.clone();
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            count(&counters, VoidEnd::Dropped);
            tracing::warn!(
                operation = %target.operation(),
                "too many voids in flight: a charge that may run late is not voided"
            );
            return;
        };
        // A check's future dropped outside the runtime (it is shutting down) has no
        // runtime to void on.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            count(&counters, VoidEnd::Dropped);
            tracing::warn!(
                operation = %target.operation(),
                "the runtime is gone: a charge that may run late is not voided"
            );
            return;
        };
        let void_key = void_key();
        runtime.spawn(async move {
            let _permit = permit;
            let end = run(&ledger, &target, &void_key).await;
            count(&counters, end);
        });
    }
}

fn count(counters: &[metrics::Counter; 6], end: VoidEnd) {
    if let Some(at) = VoidEnd::ALL.iter().position(|e| *e == end) {
        counters[at].increment(1);
    }
}

impl VoidTarget {
    fn operation(&self) -> &str {
        match &self.charge {
            VoidCharge::Debit(c) => &c.operation,
            VoidCharge::Hold(c) => &c.operation,
        }
    }
}

/// The metadata of a void's refund or release event.
fn void_metadata() -> Metadata {
    [("tollgate".to_owned(), "void".to_owned())].into()
}

/// Tries the void until it is done, or [`VOID_RETRY_WINDOW`] has passed.
async fn run(ledger: &Ledger, target: &VoidTarget, void_key: &str) -> VoidEnd {
    let started = Instant::now();
    let metadata = void_metadata();
    let key = target.key.as_ref().map(|k| KeyRef {
        key_id: &k.key_id,
        shard: k.shard,
        digest_hex: &k.digest_hex,
    });
    let charge = match &target.charge {
        VoidCharge::Debit(c) => ChargeRef::Debit(c),
        VoidCharge::Hold(c) => ChargeRef::Hold(c),
    };
    let mut backoff = VOID_BACKOFF_MIN;
    loop {
        let result = ledger.void(charge, key.as_ref(), void_key, &metadata).await;
        match judge(&result) {
            Attempt::Done(end) => {
                log(target, end, &result);
                return end;
            }
            Attempt::Retry if started.elapsed() + backoff > VOID_RETRY_WINDOW => {
                if let Err(err) = &result {
                    tracing::warn!(
                        operation = %target.operation(),
                        error = %err,
                        "gave up voiding a charge that may have run after its check was denied"
                    );
                }
                return VoidEnd::GaveUp;
            }
            Attempt::Retry => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(VOID_BACKOFF_MAX);
            }
        }
    }
}

/// One WARN line per void that undid something (never an account id or a key).
fn log(target: &VoidTarget, end: VoidEnd, result: &Result<VoidOutcome, LedgerError>) {
    match result {
        Ok(VoidOutcome {
            voided:
                Voided::Debit {
                    refund_event_id,
                    charge_id,
                    refunded,
                    ..
                },
            ..
        }) => tracing::warn!(
            operation = %target.operation(),
            charge_id = %charge_id,
            refund_event_id = %refund_event_id,
            refunded,
            "voided a debit that ran after its check was denied (unavailable): refunded"
        ),
        Ok(VoidOutcome {
            voided: Voided::Hold {
                hold_id, released, ..
            },
            ..
        }) => tracing::warn!(
            operation = %target.operation(),
            hold_id = %hold_id,
            released,
            "voided a hold placed after its check was denied (unavailable): released"
        ),
        Ok(VoidOutcome {
            voided: Voided::Nothing(why),
            ..
        }) => tracing::debug!(operation = %target.operation(), why = %why, "void: nothing to undo"),
        Err(err) => tracing::warn!(
            operation = %target.operation(),
            error = %err,
            outcome = end.label(),
            "could not void a charge that may have run after its check was denied"
        ),
    }
}

/// A void's own idempotency key: new for every void (its retries share it).
fn void_key() -> String {
    let (process, n) = super::unique_in_process();
    format!("gw:void:{process:016x}{n:x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transient_errors_are_retried() {
        let ok = |voided| {
            Ok(VoidOutcome {
                voided,
                replayed: false,
            })
        };
        let cases = [
            (
                ok(Voided::Nothing("no_charge".into())),
                Attempt::Done(VoidEnd::Nothing),
            ),
            (
                ok(Voided::Hold {
                    hold_id: "h1-1".into(),
                    release_event_id: "1-1-0".into(),
                    released: 3,
                }),
                Attempt::Done(VoidEnd::Released),
            ),
            (
                Err(LedgerError::Unavailable("no answer within 100 ms".into())),
                Attempt::Retry,
            ),
            (Err(LedgerError::ExpiryBacklog), Attempt::Retry),
            (
                Err(LedgerError::Internal("x".into())),
                Attempt::Done(VoidEnd::Failed),
            ),
        ];
        for (result, want) in cases {
            assert_eq!(judge(&result), want, "{result:?}");
        }
        assert_ne!(void_key(), void_key());
        assert!(void_key().len() <= crate::ledger::command::IDEMPOTENCY_KEY_LEN_MAX);
    }
}
