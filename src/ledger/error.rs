//! What a ledger operation can answer besides success.

use super::command::FieldViolation;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The request itself is wrong; nothing was changed.
    #[error("invalid argument: {}", describe(.0))]
    InvalidArgument(Vec<FieldViolation>),
    /// A business rule refused the request (a mutation's refusal is recorded under its
    /// idempotency key).
    #[error("refused: {0}")]
    Refused(Refusal),
    /// The hold or charge does not exist (or is older than its retention).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The outbox holds as many unsettled events as configured: new charges wait for the
    /// settler instead of growing Redis without bound.
    #[error("outbox full: the settler is behind")]
    OutboxFull,
    /// The wallet has more holds past their deadline than one call ends, and they decide
    /// the request (it would be refused while they still count as held): nothing was
    /// decided or recorded. A retry goes on ending them (so does the sweeper).
    #[error("too many holds past their deadline to end in one call: retry")]
    ExpiryBacklog,
    /// Redis answers but holds no ledger (its data was lost): nothing is served from it
    /// until `tollgate restore` has rebuilt it from the durable ledger.
    #[error("ledger not initialized: Redis lost its data; run tollgate restore")]
    NotInitialized,
    /// Redis did not answer within the deadline, or could not be reached.
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    /// A reply tollgate does not understand: a bug, or scripts of another version.
    #[error("internal ledger error: {0}")]
    Internal(String),
}

fn describe(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Business refusals, each with what the caller needs to act on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("insufficient credits: {required} required, {available} available")]
    InsufficientCredits { required: i64, available: i64 },
    #[error("hold already ended ({how})")]
    HoldEnded { how: HoldEnd, captured: i64 },
    #[error("demo credits were already granted to this account and wallet")]
    DemoAlreadyGranted,
    #[error("idempotency key reused with different parameters")]
    IdempotencyKeyReused,
    #[error("refund exceeds what is left of the charge ({refundable} refundable)")]
    RefundExceedsCharge { refundable: i64 },
    #[error("wallet holds the most lots allowed ({max})")]
    LotLimit { max: i64 },
    #[error("account holds the most wallets allowed ({max})")]
    WalletLimit { max: i64 },
    #[error("wallet holds the most open holds allowed ({max})")]
    HoldLimit { max: i64 },
    #[error("account holds the most live API keys allowed ({max}): revoke one to make another")]
    KeyLimit { max: i64 },
    #[error("organization has the most members allowed ({max}): remove one to add another")]
    MemberLimit { max: i64 },
    #[error(
        "the member's allocation does not cover it: {required} required, {remaining} remaining"
    )]
    AllocationExceeded { required: i64, remaining: i64 },
    #[error("the {budget} budget ({limit} per period) would be exceeded: {spent} spent; resets at {resets_at_ms} ms")]
    BudgetExceeded {
        budget: BudgetScope,
        limit: i64,
        spent: i64,
        resets_at_ms: i64,
    },
    #[error("the organization exists already")]
    OrgExists,
    /// An API key revoked at `revoked_at_ms` (GetBalance by key id: a revoked key answers
    /// for no one, as the gateway refuses it).
    #[error("the api key was revoked at {revoked_at_ms} ms")]
    KeyRevoked { revoked_at_ms: i64 },
}

/// Which budget refused a charge: the account's (on the whole wallet) or the org member's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetScope {
    Account,
    Member,
}

impl BudgetScope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Account => "account",
            Self::Member => "member",
        }
    }
}

impl std::fmt::Display for BudgetScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Refusal {
    /// The google.rpc.ErrorInfo reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InsufficientCredits { .. } => "INSUFFICIENT_CREDITS",
            Self::HoldEnded { .. } => "HOLD_ENDED",
            Self::DemoAlreadyGranted => "DEMO_ALREADY_GRANTED",
            Self::IdempotencyKeyReused => "IDEMPOTENCY_KEY_REUSED",
            Self::RefundExceedsCharge { .. } => "REFUND_EXCEEDS_CHARGE",
            Self::LotLimit { .. } => "LOT_LIMIT",
            Self::WalletLimit { .. } => "WALLET_LIMIT",
            Self::HoldLimit { .. } => "HOLD_LIMIT",
            Self::KeyLimit { .. } => "KEY_LIMIT",
            Self::MemberLimit { .. } => "MEMBER_LIMIT",
            Self::AllocationExceeded { .. } => "ALLOCATION_EXCEEDED",
            Self::BudgetExceeded { .. } => "BUDGET_EXCEEDED",
            Self::OrgExists => "ORG_EXISTS",
            Self::KeyRevoked { .. } => "KEY_REVOKED",
        }
    }

    /// ErrorInfo metadata: the numbers behind the refusal.
    pub fn metadata(&self) -> Vec<(&'static str, String)> {
        match self {
            Self::InsufficientCredits {
                required,
                available,
            } => vec![
                ("required", required.to_string()),
                ("available", available.to_string()),
            ],
            Self::HoldEnded { how, captured } => vec![
                ("ended", how.as_str().to_owned()),
                ("captured", captured.to_string()),
            ],
            Self::RefundExceedsCharge { refundable } => {
                vec![("refundable", refundable.to_string())]
            }
            Self::LotLimit { max }
            | Self::WalletLimit { max }
            | Self::HoldLimit { max }
            | Self::KeyLimit { max }
            | Self::MemberLimit { max } => {
                vec![("max", max.to_string())]
            }
            Self::AllocationExceeded {
                required,
                remaining,
            } => vec![
                ("required", required.to_string()),
                ("remaining", remaining.to_string()),
            ],
            Self::BudgetExceeded {
                budget,
                limit,
                spent,
                resets_at_ms,
            } => vec![
                ("budget", budget.as_str().to_owned()),
                ("limit", limit.to_string()),
                ("spent", spent.to_string()),
                ("resets_at_ms", resets_at_ms.to_string()),
            ],
            Self::KeyRevoked { revoked_at_ms } => {
                vec![("revoked_at_ms", revoked_at_ms.to_string())]
            }
            Self::DemoAlreadyGranted | Self::IdempotencyKeyReused | Self::OrgExists => Vec::new(),
        }
    }
}

/// How a hold ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldEnd {
    Captured,
    Released,
    Expired,
}

impl HoldEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Captured => "captured",
            Self::Released => "released",
            Self::Expired => "expired",
        }
    }
}

impl std::fmt::Display for HoldEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Server errors of a Redis that cannot take the call now (loading its data, a replica
/// after a failover, a script stuck busy, out of memory, writes stopped): the failure
/// policy applies, as when Redis is down. None of them ran the call.
const UNAVAILABLE_CODES: [&str; 9] = [
    "LOADING",
    "READONLY",
    "MASTERDOWN",
    "CLUSTERDOWN",
    "TRYAGAIN",
    "BUSY",
    "OOM",
    "MISCONF",
    "NOREPLICAS",
];

/// How an [`LedgerError::Unavailable`] from a broken connection begins (reset, aborted, or
/// closed under a call): a call may have been sent on it and run, and only its answer was
/// lost.
pub const CONNECTION_LOST: &str = "connection lost before an answer";

impl LedgerError {
    /// A script call that passed its deadline (`redis.call_timeout_ms`): it may have been
    /// sent, and Redis may still run it. Not a refused connection, where nothing was sent.
    pub fn is_deadline(&self) -> bool {
        matches!(self, Self::Unavailable(why) if why.starts_with(super::redis_pool::DEADLINE_PASSED))
    }

    /// A call that may have run without its answer reaching us: one past its deadline
    /// ([`LedgerError::is_deadline`]), or one whose connection broke ([`CONNECTION_LOST`]:
    /// Redis may have run it before the reset, the killed connection or the failover).
    /// Not a refused connection or an error answer: those ran nothing.
    pub fn may_have_run(&self) -> bool {
        self.is_deadline()
            || matches!(self, Self::Unavailable(why) if why.starts_with(CONNECTION_LOST))
    }
}

/// A connection that broke with a call on it (reset, aborted, closed: redis-rs fails the
/// calls in flight with a broken pipe or an early EOF), not an error answer or a
/// connection that could not be made (refused, timed out, no route, no name).
pub(crate) fn broke_under_a_call(err: &redis::RedisError) -> bool {
    err.code().is_none() && err.is_connection_dropped() && !err.is_connection_refusal()
}

impl From<redis::RedisError> for LedgerError {
    fn from(err: redis::RedisError) -> Self {
        if err.code() == Some("TG_NOT_INITIALIZED") {
            return Self::NotInitialized;
        }
        // A connection that broke under a call (reset, aborted, closed: redis-rs fails
        // the calls in flight with a broken pipe). Not one that could not be made
        // (refused, timed out, no route, no name): calls on it were never sent, and a
        // void for each would only fill the void queue during an outage.
        if broke_under_a_call(&err) {
            Self::Unavailable(format!("{CONNECTION_LOST}: {err}"))
        } else if err
            .code()
            .is_some_and(|code| UNAVAILABLE_CODES.contains(&code))
            || err.is_io_error()
            || err.is_timeout()
            || err.is_connection_dropped()
            || err.is_connection_refusal()
            || err.is_unrecoverable_error()
        {
            Self::Unavailable(err.to_string())
        } else {
            Self::Internal(err.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a connection that broke under a call leaves it in doubt: not one that could
    /// not be made, and not an error answer. Every one of them is Unavailable.
    #[test]
    fn a_call_may_have_run_only_when_its_connection_broke_under_it() {
        use std::io::{Error, ErrorKind};
        for (kind, in_doubt) in [
            (ErrorKind::BrokenPipe, true),
            (ErrorKind::ConnectionReset, true),
            (ErrorKind::ConnectionAborted, true),
            (ErrorKind::UnexpectedEof, true),
            (ErrorKind::ConnectionRefused, false),
            (ErrorKind::TimedOut, false),
            (ErrorKind::HostUnreachable, false),
            (ErrorKind::Other, false),
        ] {
            let err = LedgerError::from(redis::RedisError::from(Error::from(kind)));
            assert!(
                matches!(err, LedgerError::Unavailable(_)),
                "{kind:?}: {err:?}"
            );
            assert_eq!(err.may_have_run(), in_doubt, "{kind:?}: {err:?}");
        }
        let readonly = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
            "READONLY",
        ));
        let err = LedgerError::from(readonly);
        assert!(!err.may_have_run(), "{err:?}");
    }
}
