//! The gateway front door: one check per API request, answered from memory plus ONE
//! Redis script: identity (cached) → price (in memory) → debit or hold.
//!
//! - `pricing`: the price book: routes → operations → price; hold settlement (pure)
//! - `identity`: API keys (hashed in Redis) and the bounded identity cache
//! - `ext_authz`: Envoy's `envoy.service.auth.v3.Authorization/Check`
//! - `forward_auth`: HTTP forward-auth (nginx auth_request, Traefik, Kong) and the HTTP
//!   hold settlement endpoints
//! - `access_log`: Envoy's gRPC access-log service, which settles holds by the response
//!   (`access_log::retry`: settlements that met a transient ledger error, retried off
//!   the stream)
//! - `spool`: fail_open charges kept on disk while Redis is unavailable, applied when it
//!   returns
//! - `void`: undoing a fail_closed check's charge that Redis ran after the check's
//!   deadline
//! - `aliases`: the index of guarded header names a request header may alias (the Check
//!   answer removes them)
//!
//! This module holds the decision flow shared by every front door ([`Gateway::check`]);
//! how a [`Denial`] looks on the wire is decided in `api::status` only.

pub mod access_log;
pub mod aliases;
pub mod ext_authz;
pub mod forward_auth;
pub mod identity;
pub mod pricing;
pub mod spool;
pub mod void;

use crate::telemetry::metrics as m;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::api::auth::{bearer, secret_digest, Secret};
use crate::api::status;
use crate::config::Config;
use crate::ledger::command::IDEMPOTENCY_KEY_LEN_MAX;
use crate::ledger::{
    Authorize, Debit, DebitOutcome, EndHold, EndHoldOutcome, HoldOutcome, KeyRef, Keyed, Ledger,
    LedgerError, Metadata,
};
use identity::{Identity, IdentityError, KeyMiss, KeyStore, Known, Presented};
use pricing::{FailPolicy, HoldPolicy, Mode, Operation, PriceBook, Routed, Settlement};
use spool::{Payer, Spool, SpooledCharge};
use void::{OwnedKey, VoidCharge, VoidTarget, Voids};

/// Whole-check deadline unless configured: under Envoy's default 200 ms ext_authz timeout,
/// so tollgate answers (with the fail policy) before Envoy gives up on it.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_millis(150);
pub const DEFAULT_SHARED_SECRET_HEADER: &str = "x-tollgate-gateway-secret";

/// Headers tollgate sets on the upstream request.
pub const HEADER_ACCOUNT: &str = "x-tollgate-account";
/// The org member an org workspace key is bound to (absent for a personal key).
pub const HEADER_MEMBER: &str = "x-tollgate-member";
pub const HEADER_OPERATION: &str = "x-tollgate-operation";
pub const HEADER_CHARGED: &str = "x-tollgate-charged";
pub const HEADER_HOLD_ID: &str = "x-tollgate-hold-id";
/// A debit's charge id (its event id): what `Metering/Refund` takes, so an upstream whose
/// work failed can give the credits back.
pub const HEADER_CHARGE_ID: &str = "x-tollgate-charge-id";
pub const HEADER_DEGRADED: &str = "x-tollgate-degraded";
/// Set on the response to the client.
pub const HEADER_REMAINING: &str = "x-credits-remaining";
/// Upstream headers tollgate owns: a client's own values are always removed, so a client
/// can never name a hold (the access log settles by `x-tollgate-hold-id`).
pub const UPSTREAM_HEADERS: [&str; 7] = [
    HEADER_ACCOUNT,
    HEADER_MEMBER,
    HEADER_OPERATION,
    HEADER_CHARGED,
    HEADER_HOLD_ID,
    HEADER_CHARGE_ID,
    HEADER_DEGRADED,
];
pub const HEADER_REQUEST_ID: &str = "x-request-id";

/// Headers by which frameworks (Rails, Laravel, Symfony, Express's method-override,
/// ASP.NET, Spring's filter) let a request run as another method than its own. tollgate
/// prices the request's own method, so a `GET` (free) naming `POST` (paid) would run the
/// paid work for free: [`MethodOverride::Refuse`] refuses it.
pub const METHOD_OVERRIDE_HEADERS: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// The query parameter by which Symfony and Laravel (by default, for a POST) and Express's
/// method-override (`methodOverride('_method')`) run a request as another method. Read
/// as PHP reads a name: percent-decoded, `+` a space, leading spaces dropped, and `.`,
/// a space or `[` taken for `_` (so `?.method=` and `?%5Fmethod=` are `_method` too);
/// ignoring ASCII case. A `_method` in a form body is not seen: tollgate gets no body.
pub const METHOD_OVERRIDE_QUERY: &str = "_method";

/// `gateway.method_override`: what a request gets whose [`METHOD_OVERRIDE_HEADERS`] or
/// [`METHOD_OVERRIDE_QUERY`] name another method than its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MethodOverride {
    /// Refused with 400 `bad_header` naming the header, or `_method` (one naming the
    /// request's own method is fine).
    #[default]
    Refuse,
    /// Not looked at: for an API that honours none of these headers nor `_method`.
    Ignore,
}

/// The denial of a request whose method-override header ([`METHOD_OVERRIDE_HEADERS`]) or
/// `_method` query parameter ([`METHOD_OVERRIDE_QUERY`], in `path`'s query string) names
/// another method than its own, if any. Three header look-ups and a scan of the query's
/// names; nothing is allocated unless a name is `_method`.
pub fn overridden_method<'a>(
    method: &str,
    path: &str,
    headers: &(dyn Fn(&str) -> Option<&'a str> + Sync),
) -> Option<Denial> {
    let denial = |name: &str, what: &str| Denial::BadHeader {
        header: name.to_owned(),
        message: format!(
            "{what} another method than the request's: tollgate priced the request's own \
             method (gateway.method_override)"
        ),
    };
    METHOD_OVERRIDE_HEADERS
        .iter()
        .find_map(|&name| {
            let value = headers(name)?;
            (!value.trim().eq_ignore_ascii_case(method)).then(|| denial(name, "names"))
        })
        .or_else(|| {
            query_overrides_method(method, path).then(|| {
                denial(
                    METHOD_OVERRIDE_QUERY,
                    "the query parameter (in any spelling of its name) names",
                )
            })
        })
}

/// Whether `path`'s query string holds a [`METHOD_OVERRIDE_QUERY`] (any occurrence: PHP
/// takes the last, Express the first) whose value is not `method`. A value is compared
/// decoded and trimmed, ignoring ASCII case; one without `=` is empty, so refused too.
fn query_overrides_method(method: &str, path: &str) -> bool {
    let Some((_, query)) = path.split_once('?') else {
        return false;
    };
    query.split('&').any(|pair| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let php_name = query_decoded(name)
            .skip_while(|b| *b == b' ')
            .map(|b| match b {
                b'.' | b' ' | b'[' => b'_',
                b => b.to_ascii_lowercase(),
            });
        if !php_name.eq(METHOD_OVERRIDE_QUERY.bytes()) {
            return false;
        }
        let value: Vec<u8> = query_decoded(value).collect();
        !value.trim_ascii().eq_ignore_ascii_case(method.as_bytes())
    })
}

/// The bytes of a query string's name or value as PHP and Node's `querystring` read them:
/// `+` is a space, `%XX` the byte; a malformed escape is kept as written.
fn query_decoded(text: &str) -> impl Iterator<Item = u8> + '_ {
    let bytes = text.as_bytes();
    let hex = |at: usize| {
        bytes
            .get(at)
            .and_then(|b| char::from(*b).to_digit(16))
            .and_then(|d| u8::try_from(d).ok())
    };
    let mut at = 0;
    std::iter::from_fn(move || {
        let byte = *bytes.get(at)?;
        at += 1;
        Some(match byte {
            b'+' => b' ',
            b'%' => match (hex(at), hex(at + 1)) {
                (Some(high), Some(low)) => {
                    at += 2;
                    high * 16 + low
                }
                _ => b'%',
            },
            other => other,
        })
    })
}

/// The request a gateway asks about.
pub struct Call<'a> {
    pub method: &'a str,
    pub host: &'a str,
    /// May carry a query string.
    pub path: &'a str,
    /// `x-request-id`: the idempotency key of the check, so a retried check is not
    /// charged twice.
    pub request_id: Option<&'a str>,
    /// Looks a lowercase header name up.
    pub headers: &'a (dyn Fn(&str) -> Option<&'a str> + Sync),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow(Allowed),
    Deny(Denial),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowed {
    pub account_id: Option<String>,
    /// The org member the key is bound to, when it is an org workspace key.
    pub member_id: Option<String>,
    pub operation: Option<String>,
    /// Debited, or held (hold mode).
    pub charged: i64,
    pub hold_id: Option<String>,
    /// A hold's settlement terms from the price book that placed it
    /// ([`pricing::HoldPolicy::capture_terms`]): the access log settles the hold by them,
    /// whatever book is in force by then.
    pub capture_terms: Option<String>,
    /// A debit's charge id (its event id; a replayed check's is the first one's).
    pub charge_id: Option<String>,
    /// What the caller may still spend after the charge (`x-credits-remaining`): the
    /// wallet's available credits, within the org member's allocation left and every
    /// applicable budget's headroom ([`DebitOutcome::remaining`]).
    pub remaining: Option<i64>,
    /// Allowed without a charge because Redis was unavailable (fail_open); a debit
    /// operation's charge is spooled and applied when Redis returns.
    pub degraded: bool,
}

impl Allowed {
    /// The upstream headers to set, in [`UPSTREAM_HEADERS`] terms.
    pub fn upstream_headers(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::with_capacity(UPSTREAM_HEADERS.len());
        if let Some(a) = &self.account_id {
            out.push((HEADER_ACCOUNT, a.clone()));
        }
        if let Some(m) = &self.member_id {
            out.push((HEADER_MEMBER, m.clone()));
        }
        if let Some(op) = &self.operation {
            out.push((HEADER_OPERATION, op.clone()));
            out.push((HEADER_CHARGED, self.charged.to_string()));
        }
        if let Some(h) = &self.hold_id {
            out.push((HEADER_HOLD_ID, h.clone()));
        }
        if let Some(c) = &self.charge_id {
            out.push((HEADER_CHARGE_ID, c.clone()));
        }
        if self.degraded {
            out.push((HEADER_DEGRADED, "1".into()));
        }
        out
    }

    /// The headers to add to the client's response.
    pub fn client_headers(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Some(r) = self.remaining {
            out.push((HEADER_REMAINING, r.to_string()));
        }
        if self.degraded {
            out.push((HEADER_DEGRADED, "1".into()));
        }
        out
    }
}

/// Why a request is refused. `api::status::denial_response` says how each looks on the
/// wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    MissingKey,
    UnknownKey,
    RevokedKey,
    /// The configured gateway shared secret is missing or wrong.
    UntrustedGateway,
    BadHeader {
        header: String,
        message: String,
    },
    /// The request path has no one normal form the route and the upstream agree on
    /// (`pricing::normal_path`): a dot segment, `//`, an encoded slash… (400).
    BadPath {
        message: &'static str,
    },
    /// No route matched and the default is deny, or the route denies.
    NoRoute,
    /// The wallet cannot pay (402). `wallet` names it: an API with a wallet per service
    /// tells its client which one to top up.
    InsufficientCredits {
        required: i64,
        available: i64,
        operation: String,
        wallet: String,
    },
    /// The org member's allocation does not cover the charge (402).
    AllocationExceeded {
        required: i64,
        remaining: i64,
        operation: String,
        wallet: String,
    },
    /// A budget would be crossed (429 until it resets).
    BudgetExceeded {
        budget: &'static str,
        limit: i64,
        spent: i64,
        resets_at_ms: i64,
        operation: String,
        wallet: String,
    },
    /// The org key's member is no longer a member of the org (403).
    NotAMember,
    /// Redis unavailable and the operation is fail_closed.
    Unavailable,
    /// Redis lost its data and awaits `tollgate restore`: refused whatever the fail policy
    /// (a fail_open operation would otherwise run free until the restore).
    NotInitialized,
    /// The request id was used before for a request priced differently.
    RequestIdReused,
    /// A bound was reached (open holds per wallet, outbox, overdue holds one call ends):
    /// retry later.
    Busy,
    Internal,
}

/// The gateway's shared state: one per process.
pub struct Gateway {
    ledger: Arc<Ledger>,
    keys: Arc<KeyStore>,
    pricebook: ArcSwap<PriceBook>,
    api_key_headers: Vec<String>,
    /// `gateway.shared_secret`; `None` when empty (every gateway is trusted).
    shared_secret: Option<Secret>,
    /// Accepted too while a rotation rolls out.
    shared_secret_previous: Option<Secret>,
    shared_secret_header: String,
    check_timeout: Duration,
    /// Where fail_open charges wait for Redis; `None` when `gateway.spool_path` is empty.
    spool: Option<Arc<Spool>>,
    /// `gateway.request_id_replay`: the request id is the check's idempotency key.
    request_id_replay: bool,
    /// `gateway.allow_encoded_slashes`: `%2F` and `%5C` in a path are kept, not refused.
    encoded_slashes: bool,
    /// `gateway.method_override`.
    method_override: MethodOverride,
    metrics: CheckMetrics,
    /// Voids of fail_closed charges answered `unavailable` that may still run (`void`).
    voids: Voids,
}

/// The handles a check counts itself with, resolved once (the recorder is installed before
/// the gateway is built): a check then adds to an atomic instead of building a labelled
/// key and looking it up in the recorder's registry.
struct CheckMetrics {
    seconds: metrics::Histogram,
    /// `tollgate_checks_total` of [allow, deny] by operation name (bounded by the price
    /// books loaded so far), each resolved when first counted.
    checks: std::sync::RwLock<[std::collections::HashMap<String, metrics::Counter>; 2]>,
}

impl CheckMetrics {
    fn new() -> Self {
        Self {
            seconds: metrics::histogram!(m::CHECK_SECONDS),
            checks: Default::default(),
        }
    }

    fn count(&self, allowed: bool, operation: &str) {
        let at = usize::from(!allowed);
        // A poisoned lock only means a panic elsewhere mid-insert: the maps are still whole.
        if let Some(counter) =
            self.checks.read().unwrap_or_else(|e| e.into_inner())[at].get(operation)
        {
            counter.increment(1);
            return;
        }
        let decision = if allowed { "allow" } else { "deny" };
        let mut checks = self.checks.write().unwrap_or_else(|e| e.into_inner());
        checks[at]
            .entry(operation.to_owned())
            .or_insert_with(|| {
                metrics::counter!(m::CHECKS_TOTAL, "decision" => decision, "operation" => operation.to_owned())
            })
            .increment(1);
    }
}

/// What became of a spooled charge sent to the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replayed {
    Charged,
    /// Its idempotency key had already charged it (it reached Redis before the outage
    /// was noticed, or an earlier round applied it).
    Duplicate,
    /// The ledger said no (insufficient credits, a key revoked meanwhile, …): dropped.
    Refused,
    /// Redis is still unavailable, or answered with an error of its own (LOADING after a
    /// restart, READONLY during a failover, …): the round stops, the rest waits.
    Retry,
    /// This charge cannot be applied yet: its shard awaits `tollgate restore` or its
    /// outbox is full, or the ledger answered with an error that is not Redis being
    /// unavailable (a script error, a reply it could not read). Kept for the next round,
    /// behind the others; the round goes on with them. An error that stopped the round
    /// would stop it at the same charge every round, and every charge behind it would wait
    /// for ever (and outlive its idempotency window).
    Later,
}

impl Replayed {
    fn label(self) -> &'static str {
        match self {
            Self::Charged => "charged",
            Self::Duplicate => "duplicate",
            Self::Refused => "refused",
            Self::Retry => "retry",
            Self::Later => "later",
        }
    }

    /// What a replayed debit's answer means for the spooled charge.
    pub fn of(result: &Result<DebitOutcome, LedgerError>) -> Self {
        match result {
            Ok(out) if out.replayed => Self::Duplicate,
            Ok(_) => Self::Charged,
            Err(LedgerError::Unavailable(_)) => Self::Retry,
            Err(
                LedgerError::NotInitialized
                | LedgerError::OutboxFull
                | LedgerError::ExpiryBacklog
                | LedgerError::Internal(_),
            ) => Self::Later,
            Err(
                LedgerError::Refused(_)
                | LedgerError::InvalidArgument(_)
                | LedgerError::NotFound(_),
            ) => Self::Refused,
        }
    }
}

/// Spooled charges per replay round (the memory a replay takes, however long the outage).
pub const REPLAY_CHUNK: usize = 4096;

impl Gateway {
    pub fn new(config: &Config, ledger: Arc<Ledger>) -> Self {
        let g = &config.gateway;
        let keys = Arc::new(
            KeyStore::new(
                ledger.redis().clone(),
                ledger.shards().clone(),
                Duration::from_millis(g.identity_cache_ttl_ms),
                g.identity_cache_entries_max,
                g.keys_per_account_max,
            )
            .with_idempotency_window(ledger.settings().idempotency_window)
            .with_revoked_key_retention(ledger.settings().revoked_key_retention)
            .with_clock(ledger.clock().clone()),
        );
        register_operation_series(&config.pricebook);
        let spool = if g.spool_path.is_empty() {
            None
        } else {
            match Spool::open(&g.spool_path) {
                Ok(spool) => {
                    // At 0 from the start, so alerts on their increase see the first one.
                    metrics::counter!(crate::telemetry::metrics::SPOOL_WRITTEN_TOTAL).increment(0);
                    metrics::counter!(crate::telemetry::metrics::SPOOL_DROPPED_TOTAL).increment(0);
                    metrics::counter!(crate::telemetry::metrics::SPOOL_POSITION_UNSAVED_TOTAL)
                        .increment(0);
                    Some(Arc::new(spool))
                }
                Err(err) => {
                    tracing::error!(error = %err, "cannot start the fail_open spool: fail_open charges are not recorded");
                    None
                }
            }
        };
        Self {
            ledger,
            keys,
            pricebook: ArcSwap::from_pointee(config.pricebook.clone()),
            api_key_headers: g.api_key_headers.clone(),
            shared_secret: (!g.shared_secret.is_empty()).then(|| Secret::new(&g.shared_secret)),
            shared_secret_previous: (!g.shared_secret_previous.is_empty())
                .then(|| Secret::new(&g.shared_secret_previous)),
            shared_secret_header: g.shared_secret_header.clone(),
            check_timeout: Duration::from_millis(g.check_timeout_ms),
            spool,
            request_id_replay: g.request_id_replay,
            encoded_slashes: g.allow_encoded_slashes,
            method_override: g.method_override,
            metrics: CheckMetrics::new(),
            voids: Voids::new(),
        }
    }

    pub fn method_override(&self) -> MethodOverride {
        self.method_override
    }

    pub fn keys(&self) -> &Arc<KeyStore> {
        &self.keys
    }

    pub fn pricebook(&self) -> Arc<PriceBook> {
        self.pricebook.load_full()
    }

    /// The current price book without taking a reference count (`ArcSwap::load`): for
    /// the hot path, held only briefly and never across an `.await`.
    pub fn pricebook_now(&self) -> arc_swap::Guard<Arc<PriceBook>> {
        self.pricebook.load()
    }

    /// Swaps in a new price book; checks in flight finish with the one they started with.
    pub fn set_pricebook(&self, book: PriceBook) {
        register_operation_series(&book);
        self.pricebook.store(Arc::new(book));
    }

    pub fn shared_secret_header(&self) -> &str {
        &self.shared_secret_header
    }

    /// Whether `gateway.shared_secret` is set.
    pub fn has_shared_secret(&self) -> bool {
        self.shared_secret.is_some()
    }

    /// Whether the gateway presented the configured shared secret, or the previous one
    /// during a rotation (always, when none is configured).
    pub fn trusts(&self, presented: Option<&str>) -> bool {
        let Some(current) = &self.shared_secret else {
            return true;
        };
        presented.is_some_and(|p| {
            let p = secret_digest(p.trim().as_bytes());
            // Both compared, whichever matches: no timing tells which one is in use.
            current.matches(&p)
                | self
                    .shared_secret_previous
                    .as_ref()
                    .is_some_and(|previous| previous.matches(&p))
        })
    }

    /// The API key of a request: the first configured header that carries one.
    fn api_key<'a>(&self, headers: &(dyn Fn(&str) -> Option<&'a str> + Sync)) -> Option<&'a str> {
        self.api_key_headers.iter().find_map(|name| {
            let value = headers(name)?;
            let key = if name == "authorization" {
                bearer(value)?
            } else {
                value.trim()
            };
            (!key.is_empty()).then_some(key)
        })
    }

    /// Decides one request and counts it: `tollgate_checks_total{decision, operation}` and
    /// `tollgate_check_duration_seconds`. The operation label is the price-book target the
    /// request was routed to, whatever the decision (a 401 or 400 on a priced route
    /// included): an operation's name, or `free` / `deny` (reserved, so no operation has
    /// them). It comes from the price book (bounded by the config), never from the request.
    pub async fn check(&self, call: &Call<'_>) -> Decision {
        let started = std::time::Instant::now();
        let book = self.pricebook.load_full();
        let (operation, decision) = match pricing::normal_path(call.path, self.encoded_slashes) {
            Ok(path) => {
                let routed = book.route(call.host, call.method, &path);
                let overridden = match self.method_override {
                    MethodOverride::Refuse => {
                        overridden_method(call.method, call.path, call.headers)
                    }
                    MethodOverride::Ignore => None,
                };
                let decision = match overridden {
                    Some(denial) => Decision::Deny(denial),
                    None => self.decide(call, routed).await,
                };
                (routed.name(), decision)
            }
            // Refused before routing: no route priced it.
            Err(pricing::BadPath(message)) => ("deny", Decision::Deny(Denial::BadPath { message })),
        };
        self.metrics
            .count(matches!(decision, Decision::Allow(_)), operation);
        self.metrics.seconds.record(started.elapsed().as_secs_f64());
        decision
    }

    /// Route (done by [`Gateway::check`]) → key → price → identity → one ledger script.
    async fn decide(&self, call: &Call<'_>, routed: Routed<'_>) -> Decision {
        let op = match routed {
            Routed::Deny => return Decision::Deny(Denial::NoRoute),
            Routed::Free => return Decision::Allow(Allowed::default()),
            Routed::Operation(op) => op,
        };
        let Some(key) = self.api_key(call.headers) else {
            return Decision::Deny(Denial::MissingKey);
        };
        let quote = match op.quote(call.headers) {
            Ok(quote) => quote,
            Err(bad) => {
                return Decision::Deny(Denial::BadHeader {
                    header: bad.header,
                    message: bad.message,
                })
            }
        };
        let amount = quote.amount;
        // Made once: a charge allowed degraded is spooled under the key it was tried with,
        // so one that reached Redis before its answer was lost is not taken twice.
        let idempotency_key = if amount > 0 {
            // Without request_id_replay every check is a charge of its own: a repeated id
            // may come from a client, not from a retry of the gateway.
            let request_id = call.request_id.filter(|_| self.request_id_replay);
            check_idempotency_key(&op.name, request_id)
        } else {
            String::new()
        };
        // As check_idempotency_key: a present, non-empty request id keys the charge.
        let keyed_by_request_id =
            self.request_id_replay && call.request_id.is_some_and(|id| !id.is_empty());
        // Only a charge that could be spooled keeps a copy of its key.
        let spooled_key = (self.spool.is_some()
            && amount > 0
            && op.fail_policy == FailPolicy::FailOpen
            && matches!(op.mode, Mode::Debit))
        .then(|| idempotency_key.clone());
        // Identified by what the request asked for, not by the price the book in force
        // gives it: a retry after a reload that changed the price replays the first answer.
        let price_inputs = quote.inputs;
        let spooled_inputs = spooled_key.as_ref().map(|_| price_inputs.clone());
        // A charge keyed by the client's request id may be replayed by a later attempt of
        // the request: this attempt's mark tells a void which attempt made it (ledger
        // `Debit::attempt_mark`). A check without one has a key of its own.
        let attempt_mark =
            (amount > 0 && keyed_by_request_id).then(crate::ledger::AttemptMark::random);
        let mut pending = PendingCharge {
            gateway: self,
            key,
            cmd: ChargeCmd::new(op, amount, idempotency_key, price_inputs, attempt_mark),
            sent: Sent::default(),
            decided: false,
        };
        let charge = self.charge(op, amount, key, &mut pending.cmd, &pending.sent);
        let decision = match tokio::time::timeout(self.check_timeout, charge).await {
            Ok(decision) => decision,
            // The charge is dropped where it was: `sent` says whether a call was on its way.
            // A key the cache last knew as revoked or unknown stays refused (KeyMiss::refused).
            Err(_) => match self.keys.refused(key) {
                Some(IdentityError::Revoked) => Decision::Deny(Denial::RevokedKey),
                Some(_) => Decision::Deny(Denial::UnknownKey),
                None => unavailable(op, None, None),
            },
        };
        pending.decided = true;
        // Any denial (unavailable, or a key the cache last knew as refused) with a call
        // past its deadline: that call may still run. So may a hold allowed by fail_open:
        // the request went on without a hold id, so nothing would ever settle the hold a
        // late call places (at its deadline `on_expiry = "capture"` would charge its whole
        // ceiling for a request fail_open let through free).
        let degraded_hold = matches!(op.mode, Mode::Hold(_))
            && matches!(&decision, Decision::Allow(a) if a.degraded);
        if matches!(decision, Decision::Deny(_)) || degraded_hold {
            self.void_late_charge(key, &pending.cmd, &pending.sent);
        }
        if let (Decision::Allow(a), Some(idempotency_key), Some(price_inputs)) =
            (&decision, spooled_key, spooled_inputs)
        {
            if a.degraded {
                self.spool_charge(op, amount, key, idempotency_key, price_inputs);
            }
        }
        decision
    }

    /// A check denied (a fail_closed `unavailable`, or a key the cache last knew as
    /// refused), or a hold allowed by fail_open, whose charge passed its deadline after it
    /// may have been sent, or lost its connection before the answer: that charge may
    /// still run, or may have run, so a void undoes it if it does (`void`). Started before the answer goes out. fail_open debits are never voided
    /// (they were allowed; the spool replays them under the same key).
    fn void_late_charge(&self, key: &str, cmd: &ChargeCmd, sent: &Sent) {
        let key = match sent.take() {
            Sent::NOTHING => return,
            Sent::BY_KEY => match self.keys.key_parts(key) {
                Some((key_id, shard, digest_hex)) => Some(OwnedKey {
                    key_id,
                    shard,
                    digest_hex,
                }),
                None => return,
            },
            _ => None,
        };
        let charge = match cmd {
            ChargeCmd::Debit(c) => VoidCharge::Debit(c.clone()),
            ChargeCmd::Hold(c) => VoidCharge::Hold(c.clone()),
        };
        self.voids
            .spawn(self.ledger.clone(), VoidTarget { charge, key });
    }

    /// Records a charge allowed without Redis (fail_open), to be applied when Redis
    /// returns. Hold operations are not recorded: what their upstream finally costs is
    /// only known from a capture, and no hold exists to capture (docs/ARCHITECTURE.md).
    fn spool_charge(
        &self,
        op: &Operation,
        amount: i64,
        key: &str,
        idempotency_key: String,
        price_inputs: String,
    ) {
        let Some(spool) = &self.spool else { return };
        let Some(payer) = self.keys.payer(key) else {
            return;
        };
        let _recorded = spool.record(SpooledCharge {
            payer,
            wallet: op.wallet.clone(),
            amount,
            operation: op.name.clone(),
            idempotency_key,
            price_inputs: Some(price_inputs),
            at_ms: crate::ledger::wall_clock_ms(),
        });
    }

    /// Waits (up to `timeout`) until every spooled charge is on disk: at shutdown.
    pub async fn flush_spool(&self, timeout: Duration) -> bool {
        let Some(spool) = self.spool.clone() else {
            return true;
        };
        tokio::task::spawn_blocking(move || spool.flush(timeout))
            .await
            .unwrap_or(false)
    }

    /// One replay round of the fail-open spool: sends up to [`REPLAY_CHUNK`] spooled
    /// charges to the ledger in the order they were allowed, until Redis fails again (the
    /// rest waits for the next round). A charge whose shard cannot take it yet is spooled
    /// again, behind the others. Returns how many were applied, found already applied or
    /// refused, and whether more are waiting.
    pub async fn replay_spool(&self) -> std::io::Result<(usize, bool)> {
        let Some(spool) = self.spool.clone() else {
            return Ok((0, false));
        };
        let taken = {
            let spool = spool.clone();
            tokio::task::spawn_blocking(move || spool.take(REPLAY_CHUNK))
                .await
                .map_err(std::io::Error::other)??
        };
        let Some(chunk) = taken else {
            return Ok((0, false));
        };
        let mut done = 0;
        let mut applied = 0;
        // The first charge spooled again, and the writer's failures before it was.
        let mut requeued = None;
        let failures = spool.requeue_failures();
        for charge in &chunk.charges {
            let replayed = self.replay_charge(charge).await;
            match replayed {
                Replayed::Retry => break,
                // Spooled again behind the others; a full queue ends the round instead
                // (its line is then still ahead of the saved position).
                Replayed::Later if !spool.requeue(charge.clone()) => break,
                Replayed::Later => {
                    requeued.get_or_insert(applied);
                }
                _ => done += 1,
            }
            metrics::counter!(m::SPOOL_REPLAYED_TOTAL, "result" => replayed.label()).increment(1);
            applied += 1;
        }
        let more = applied == chunk.charges.len() && !chunk.charges.is_empty();
        tokio::task::spawn_blocking(move || {
            // A charge spooled again is on disk before its old line is passed over. Its
            // flush's answer is not enough: a failed write is told to the first flush
            // after it, which may be another's (shutdown's).
            if let Some(first) = requeued {
                if !spool.flush(Duration::from_secs(10)) || spool.requeue_failures() != failures {
                    // What came before it is done; it and what follows are sent again.
                    spool.commit(&chunk, first)?;
                    return Err(std::io::Error::other(
                        "a charge spooled again was not written: its line is kept",
                    ));
                }
            }
            spool.commit(&chunk, applied)
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok((done, more && done > 0))
    }

    /// Sends one spooled charge: the same debit, under the same idempotency key and with
    /// the same request digest, as the check that allowed it (a line spooled before price
    /// inputs were carried has none: the check that spooled it digested the amount).
    pub async fn replay_charge(&self, charge: &SpooledCharge) -> Replayed {
        let mut debit = Debit {
            account_id: String::new(),
            wallet: charge.wallet.clone(),
            amount: charge.amount,
            idempotency_key: charge.idempotency_key.clone(),
            operation: charge.operation.clone(),
            metadata: Metadata::new(),
            member_id: String::new(),
            price_inputs: charge.price_inputs.clone(),
            // A spooled charge is never voided (fail_open).
            attempt_mark: None,
        };
        let result = match &charge.payer {
            Payer::Account {
                account_id,
                member_id,
            } => {
                debit.account_id = account_id.clone();
                debit.member_id = member_id.clone();
                self.ledger.debit(&debit).await
            }
            Payer::Key {
                key_id,
                shard,
                digest,
            } => {
                let key = KeyRef {
                    key_id,
                    shard: *shard,
                    digest_hex: digest,
                };
                match self.ledger.debit_by_key(&debit, &key).await {
                    Ok(Keyed::UnknownKey) => {
                        tracing::warn!(operation = %charge.operation, "spooled charge dropped: its key is unknown");
                        return Replayed::Refused;
                    }
                    // Revoked before the call was allowed (a sidecar whose cache had not
                    // heard of it yet): not the owner's charge.
                    Ok(Keyed::RevokedKey { revoked_at_ms, .. })
                        if revoked_at_ms <= charge.at_ms =>
                    {
                        tracing::warn!(operation = %charge.operation, "spooled charge dropped: its key was revoked before the call");
                        return Replayed::Refused;
                    }
                    // Revoked since: the call was made while the key was good.
                    Ok(
                        Keyed::RevokedKey {
                            account_id,
                            member_id,
                            ..
                        }
                        | Keyed::MemberKey {
                            account_id,
                            member_id,
                        },
                    ) => {
                        debit.account_id = account_id;
                        debit.member_id = member_id;
                        self.ledger.debit(&debit).await
                    }
                    Ok(Keyed::Charged { result, .. }) => result,
                    Err(err) => Err(err),
                }
            }
        };
        let replayed = Replayed::of(&result);
        match (&result, replayed) {
            (Err(err), Replayed::Refused) => {
                tracing::warn!(operation = %charge.operation, error = %err, "spooled charge refused by the ledger; dropped")
            }
            (Err(err @ LedgerError::Internal(_)), Replayed::Later) => {
                tracing::warn!(operation = %charge.operation, error = %err, "spooled charge failed with an internal error; kept for the next round, behind the others")
            }
            (Err(err), Replayed::Retry | Replayed::Later) => {
                tracing::debug!(operation = %charge.operation, error = %err, "spooled charge kept for the next round")
            }
            _ => {}
        }
        replayed
    }

    /// `cmd`: the charge, without its account (set here when it is sent by account);
    /// `sent`: what it sent, for a void ([`Gateway::void_late_charge`]).
    async fn charge(
        &self,
        op: &Operation,
        amount: i64,
        key: &str,
        cmd: &mut ChargeCmd,
        sent: &Sent,
    ) -> Decision {
        let identity = match self.keys.presented(key) {
            Presented::Known(known) => known,
            // A cache miss on a charge: its script resolves the key in the same call.
            Presented::Miss(miss) if amount > 0 => {
                return self.charge_by_key(op, &miss, cmd, sent).await;
            }
            Presented::Miss(miss) => self.keys.identify_miss(&miss).await,
        };
        let identity = match identity {
            Ok(identity) => identity,
            Err(IdentityError::Unknown) => return Decision::Deny(Denial::UnknownKey),
            Err(IdentityError::Revoked) => return Decision::Deny(Denial::RevokedKey),
            Err(IdentityError::NotInitialized) => return Decision::Deny(Denial::NotInitialized),
            Err(IdentityError::Unavailable(why)) => {
                crate::log_throttled!(WARN, error = %why, "identity lookup: redis unavailable");
                return unavailable(op, None, None);
            }
            Err(IdentityError::Internal(why)) => {
                crate::log_throttled!(ERROR, error = %why, "identity lookup failed");
                return Decision::Deny(Denial::Internal);
            }
        };
        if amount == 0 {
            return Decision::Allow(Allowed {
                account_id: Some(identity.account_id.clone()),
                member_id: member(&identity.member_id),
                operation: Some(op.name.clone()),
                ..Allowed::default()
            });
        }
        self.charge_identity(op, &identity, cmd, sent).await
    }

    /// A charge whose key the cache did not know: one script call resolves the key and
    /// charges its account (an org member's key is charged in a second call, with the
    /// member's digest).
    async fn charge_by_key(
        &self,
        op: &Operation,
        miss: &KeyMiss<'_>,
        cmd: &mut ChargeCmd,
        sent: &Sent,
    ) -> Decision {
        let digest_hex = miss.digest_hex();
        let key = KeyRef {
            key_id: miss.key_id,
            shard: miss.shard,
            digest_hex: &digest_hex,
        };
        sent.sending(Sent::BY_KEY);
        let keyed = match &*cmd {
            ChargeCmd::Debit(c) => self
                .ledger
                .debit_by_key(c, &key)
                .await
                .map(|keyed| keyed.map(debited)),
            ChargeCmd::Hold(c) => self
                .ledger
                .authorize_by_key(c, &key)
                .await
                .map(|keyed| keyed.map(held)),
        };
        sent.answered(&keyed);
        let (account_id, member_id, result) = match keyed {
            Ok(Keyed::UnknownKey) => {
                self.keys.learn(miss, || Known::Unknown);
                return Decision::Deny(Denial::UnknownKey);
            }
            Ok(Keyed::RevokedKey { .. }) => {
                self.keys.learn(miss, || Known::Revoked);
                return Decision::Deny(Denial::RevokedKey);
            }
            Ok(Keyed::MemberKey {
                account_id,
                member_id,
            }) => {
                self.keys
                    .learn(miss, || miss.active(account_id.clone(), member_id.clone()));
                cmd.set_identity(account_id.clone(), member_id.clone());
                (Some(account_id), member_id, self.send(cmd, sent).await)
            }
            Ok(Keyed::Charged { account_id, result }) => {
                self.keys
                    .learn(miss, || miss.active(account_id.clone(), String::new()));
                (Some(account_id), String::new(), result)
            }
            // Redis unavailable: a key the cache last knew as revoked or unknown stays
            // refused, whatever the fail policy (KeyMiss::refused).
            Err(LedgerError::Unavailable(why)) => match miss.refused() {
                Some(IdentityError::Revoked) => return Decision::Deny(Denial::RevokedKey),
                Some(_) => return Decision::Deny(Denial::UnknownKey),
                None => (None, String::new(), Err(LedgerError::Unavailable(why))),
            },
            Err(err) => (None, String::new(), Err(err)),
        };
        charged(op, account_id, &member_id, result)
    }

    /// Charges a known identity by the operation's mode.
    async fn charge_identity(
        &self,
        op: &Operation,
        identity: &Identity,
        cmd: &mut ChargeCmd,
        sent: &Sent,
    ) -> Decision {
        cmd.set_identity(identity.account_id.clone(), identity.member_id.clone());
        charged(
            op,
            Some(identity.account_id.clone()),
            &identity.member_id,
            self.send(cmd, sent).await,
        )
    }

    /// Sends a charge by account.
    async fn send(&self, cmd: &ChargeCmd, sent: &Sent) -> Result<Took, LedgerError> {
        sent.sending(Sent::BY_ACCOUNT);
        let result = match cmd {
            ChargeCmd::Debit(c) => self.ledger.debit(c).await.map(debited),
            ChargeCmd::Hold(c) => self.ledger.authorize(c).await.map(held),
        };
        sent.answered(&result);
        result
    }

    /// What the upstream's answer (Envoy's access log) makes of a hold: capture on a
    /// configured status with the units the upstream reported, release otherwise, by the
    /// `capture_terms` of the book that placed the hold (the Check's dynamic metadata).
    /// Without them (a hold placed by an older tollgate) `operation` picks the policy from
    /// the current price book (an operation removed since falls back to capture-all on
    /// 2xx); `held` caps the capture. Whether the logged
    /// status is the API's answer at all is the access log's to judge first
    /// (`access_log::Delivery`).
    pub fn settlement(
        &self,
        operation: Option<&str>,
        capture_terms: Option<&str>,
        held: Option<i64>,
        status: u32,
        units: &dyn Fn(&str) -> Option<String>,
    ) -> Settlement {
        // The terms the hold was placed under, when its Check gave them: a reload since
        // must not settle it by a rate that was not in force then.
        if let Some(terms) = capture_terms {
            match HoldPolicy::from_capture_terms(terms) {
                Some(policy) => {
                    return policy.settle(
                        status,
                        units(&policy.capture_units_header).as_deref(),
                        held,
                    )
                }
                // Not what a Check of ours writes: settled by the current book instead.
                None => crate::log_throttled!(
                    WARN,
                    "access log: a hold's capture terms unreadable; settled by the current price book"
                ),
            }
        }
        // A hold placed by a tollgate from before the terms were carried: the current book.
        let book = self.pricebook.load_full();
        match operation.and_then(|name| book.operation(name)?.hold()) {
            Some(policy) => {
                policy.settle(status, units(&policy.capture_units_header).as_deref(), held)
            }
            // The operation's units header and rate are gone with it: the units the
            // upstream reported cannot be priced, so 2xx captures everything held.
            None => HoldPolicy::fallback().settle(status, None, held),
        }
    }

    /// Ends a hold as `settlement` says, under the hold's own idempotency key
    /// (`gw:settle:<hold_id>`): a duplicate log entry is a replay.
    pub async fn end_hold(
        &self,
        hold_id: &str,
        settlement: Settlement,
    ) -> Result<EndHoldOutcome, LedgerError> {
        let key = format!("gw:settle:{hold_id}");
        let cmd = match settlement {
            Settlement::Capture(amount) => EndHold::capture(hold_id.to_owned(), amount, key),
            Settlement::Release => EndHold::release(hold_id.to_owned(), key),
        };
        self.ledger.end_hold(&cmd).await
    }

    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }
}

/// Registers the per-operation fail-open series at 0, so dashboards and alerts see every
/// operation before its first degraded check.
fn register_operation_series(book: &PriceBook) {
    for name in book.operation_names() {
        metrics::counter!(m::FAIL_OPEN_TOTAL, "operation" => name.to_owned()).increment(0);
    }
}

/// What a check's charge sent and has no answer for (a call in flight, or one that passed
/// its deadline): a void's cue ([`Gateway::void_late_charge`]). Atomic only so that the
/// check's future stays `Send`; one check uses it.
#[derive(Default)]
struct Sent(AtomicU8);

impl Sent {
    const NOTHING: u8 = 0;
    /// By API key (the cache missed): the command has no account.
    const BY_KEY: u8 = 1;
    /// By account: the command names the account (and member).
    const BY_ACCOUNT: u8 = 2;

    fn sending(&self, how: u8) {
        self.0.store(how, Ordering::Relaxed);
    }

    /// The call answered, or failed without running (a refused connection, an error
    /// answer): nothing of it is left to run. A call that passed its deadline may still,
    /// and one whose connection broke may have run ([`LedgerError::may_have_run`]).
    fn answered<T>(&self, result: &Result<T, LedgerError>) {
        if !matches!(result, Err(err) if err.may_have_run()) {
            self.0.store(Self::NOTHING, Ordering::Relaxed);
        }
    }

    fn take(&self) -> u8 {
        self.0.swap(Self::NOTHING, Ordering::Relaxed)
    }
}

/// A check's charge while the check decides. The check's future may be dropped before
/// it decides: Envoy cancels a Check whose client went away, tonic drops a handler past
/// the caller's `grpc-timeout`, hyper one whose connection closed. Dropped with a call in
/// flight ([`Sent`]), the charge is voided as a check that timed out voids it: Redis may
/// still run the call, and no answer allowed the request.
struct PendingCharge<'a> {
    gateway: &'a Gateway,
    key: &'a str,
    cmd: ChargeCmd,
    sent: Sent,
    /// The check decided: from here on it voids what it must itself.
    decided: bool,
}

impl Drop for PendingCharge<'_> {
    fn drop(&mut self) {
        if !self.decided {
            self.gateway
                .void_late_charge(self.key, &self.cmd, &self.sent);
        }
    }
}

/// The ledger command of a check, by the operation's mode.
enum ChargeCmd {
    Debit(Debit),
    Hold(Authorize),
}

impl ChargeCmd {
    /// Without an account or member: the API key decides them (a call by key, or
    /// [`ChargeCmd::set_identity`]). `price_inputs`: [`pricing::Quote::inputs`];
    /// `attempt_mark`: this attempt's, when the key is the client's request id.
    fn new(
        op: &Operation,
        amount: i64,
        idempotency_key: String,
        price_inputs: String,
        attempt_mark: Option<crate::ledger::AttemptMark>,
    ) -> Self {
        match &op.mode {
            Mode::Debit => ChargeCmd::Debit(Debit {
                account_id: String::new(),
                wallet: op.wallet.clone(),
                amount,
                idempotency_key,
                operation: op.name.clone(),
                metadata: Metadata::new(),
                member_id: String::new(),
                price_inputs: Some(price_inputs),
                attempt_mark,
            }),
            Mode::Hold(hold) => ChargeCmd::Hold(Authorize {
                account_id: String::new(),
                wallet: op.wallet.clone(),
                amount,
                ttl_ms: hold.ttl_ms,
                on_expiry: hold.on_expiry,
                idempotency_key,
                operation: op.name.clone(),
                metadata: Metadata::new(),
                member_id: String::new(),
                price_inputs: Some(price_inputs),
                attempt_mark,
            }),
        }
    }

    fn set_identity(&mut self, account: String, member: String) {
        let (account_id, member_id) = match self {
            ChargeCmd::Debit(c) => (&mut c.account_id, &mut c.member_id),
            ChargeCmd::Hold(c) => (&mut c.account_id, &mut c.member_id),
        };
        *account_id = account;
        *member_id = member;
    }
}

/// An org member's id as a header value: none for a personal key.
fn member(member_id: &str) -> Option<String> {
    (!member_id.is_empty()).then(|| member_id.to_owned())
}

/// What a debit answers a check: (charged, hold id, what the caller may still spend).
fn debited(out: DebitOutcome) -> Took {
    Took {
        amount: out.amount,
        hold_id: None,
        remaining: out.remaining(),
        charge_id: Some(out.event_id),
    }
}

/// What a hold answers a check, as [`debited`].
fn held(out: HoldOutcome) -> Took {
    Took {
        amount: out.amount,
        remaining: out.remaining(),
        hold_id: Some(out.hold_id),
        charge_id: None,
    }
}

/// What a charge took: the amount, the hold or the charge it made, and what is left.
struct Took {
    amount: i64,
    hold_id: Option<String>,
    charge_id: Option<String>,
    remaining: i64,
}

/// The decision on a charge's result: what it took, or why not.
fn charged(
    op: &Operation,
    account_id: Option<String>,
    member_id: &str,
    result: Result<Took, LedgerError>,
) -> Decision {
    match result {
        Ok(took) => Decision::Allow(Allowed {
            account_id,
            member_id: member(member_id),
            operation: Some(op.name.clone()),
            charged: took.amount,
            capture_terms: took
                .hold_id
                .as_ref()
                .and(op.hold())
                .map(HoldPolicy::capture_terms),
            hold_id: took.hold_id,
            charge_id: took.charge_id,
            remaining: Some(took.remaining),
            degraded: false,
        }),
        Err(LedgerError::Unavailable(why)) => {
            crate::log_throttled!(WARN, error = %why, operation = %op.name, "charge: redis unavailable");
            unavailable(op, account_id, member(member_id))
        }
        // Redis lost its data and awaits a restore: a Redis that answers, with balances
        // that are not real. Refused whatever the fail policy (docs/DESIGN.md, failure policy).
        Err(LedgerError::NotInitialized) => {
            crate::log_throttled!(WARN, operation = %op.name, "charge: ledger not initialized (run tollgate restore)");
            Decision::Deny(Denial::NotInitialized)
        }
        Err(err) => Decision::Deny(status::gateway_denial(err, &op.name, &op.wallet)),
    }
}

/// Redis is unavailable: the operation's fail policy decides. `account_id` is known when
/// the identity came from the cache.
fn unavailable(op: &Operation, account_id: Option<String>, member_id: Option<String>) -> Decision {
    match op.fail_policy {
        FailPolicy::FailClosed => Decision::Deny(Denial::Unavailable),
        FailPolicy::FailOpen => {
            // Operation names come from the price book: a bounded label set.
            metrics::counter!(m::FAIL_OPEN_TOTAL, "operation" => op.name.clone()).increment(1);
            Decision::Allow(Allowed {
                account_id,
                member_id,
                operation: Some(op.name.clone()),
                degraded: true,
                ..Allowed::default()
            })
        }
    }
}

/// The idempotency key of a check: the request id (with `gateway.request_id_replay`),
/// scoped by operation so two operations of one request never collide. Request ids that
/// are too long or not printable ASCII are replaced by their SHA-256; otherwise a key of
/// its own (charged once per check, and a retried check is charged again).
pub fn check_idempotency_key(operation: &str, request_id: Option<&str>) -> String {
    let prefix_len = "gw::".len() + operation.len();
    match request_id {
        Some(id)
            if !id.is_empty()
                && prefix_len + id.len() <= IDEMPOTENCY_KEY_LEN_MAX
                && id.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            format!("gw:{operation}:{id}")
        }
        Some(id) if !id.is_empty() => {
            let digest = identity::key_digest(id);
            let mut hex = String::with_capacity(40);
            for b in &digest[..20] {
                hex.push_str(&format!("{b:02x}"));
            }
            format!("gw:{operation}:#{hex}")
        }
        _ => {
            // Unique without a syscall per check (every check without request_id_replay
            // takes this path).
            let (process, n) = unique_in_process();
            format!("gw:{operation}:~{process:016x}{n:x}")
        }
    }
}

/// A pair no other call of this process (nor, but by a 2^-64 chance, of another) gets:
/// 64 random bits drawn once per process, and a counter.
fn unique_in_process() -> (u64, u64) {
    static PROCESS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let process = *PROCESS.get_or_init(|| {
        let mut random = [0u8; 8];
        match getrandom::fill(&mut random) {
            Ok(()) => u64::from_le_bytes(random),
            Err(_) => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or_default(),
        }
    });
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    (process, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_method_override_naming_another_method_is_refused() {
        let denied = |method: &str, pairs: &[(&'static str, &'static str)]| {
            let pairs = pairs.to_vec();
            let lookup = move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
            overridden_method(method, "/v1/items/7?x=1", &lookup)
        };
        for header in METHOD_OVERRIDE_HEADERS {
            let Some(Denial::BadHeader { header: named, .. }) = denied("GET", &[(header, "POST")])
            else {
                panic!("{header}: not refused")
            };
            assert_eq!(named, header);
            // The request's own method, in any case: nothing is overridden.
            assert_eq!(denied("POST", &[(header, " post ")]), None, "{header}");
        }
        // Repeated headers come joined by commas: not one method.
        assert!(denied("GET", &[("x-http-method", "GET,POST")]).is_some());
        assert_eq!(denied("GET", &[("x-forwarded-method", "POST")]), None);
        assert_eq!(denied("DELETE", &[]), None);
    }

    /// Symfony and Laravel run a POST carrying `?_method=DELETE` as a DELETE (Express's
    /// method-override too, so configured): refused like the headers, naming `_method`,
    /// whatever spelling of the name PHP reads as `_method`.
    #[test]
    fn a_method_override_in_the_query_string_is_refused() {
        let none = |_: &str| None;
        let denied = |method: &str, path: &str| overridden_method(method, path, &none);
        for path in [
            "/v1/items/7?_method=DELETE",
            "/v1/items/7?a=1&_method=delete&b=2",
            "/v1/items/7?_METHOD=PUT",
            "/v1/items/7?%5Fmethod=DELETE",
            "/v1/items/7?%5fMethod=DELETE",
            "/v1/items/7?.method=DELETE",
            "/v1/items/7?+_method=DELETE",
            "/v1/items/7?[method=DELETE",
            "/v1/items/7?_method=DEL%45TE",
            "/v1/items/7?_method=DELETE+",
            "/v1/items/7?_method=POST&_method=DELETE",
            "/v1/items/7?_method",
            "/v1/items/7?_method=",
        ] {
            let Some(Denial::BadHeader { header, message }) = denied("POST", path) else {
                panic!("{path}: not refused")
            };
            assert_eq!(header, METHOD_OVERRIDE_QUERY, "{path}");
            assert!(message.contains("gateway.method_override"), "{message}");
        }
        for path in [
            "/v1/items/7",
            "/v1/items/7?",
            "/v1/items/7?_method=post",
            "/v1/items/7?_method=%20POST",
            "/v1/items/7?method=DELETE&x_method=DELETE&_methods=DELETE",
            "/v1/items/7?_method[]=DELETE",
            // PHP drops a name's leading spaces: this is `method`.
            "/v1/items/7?%20method=DELETE",
            "/v1/items/7?q=_method=DELETE",
            "/v1/_method=DELETE",
        ] {
            assert_eq!(denied("POST", path), None, "{path}");
        }
        // A header is named first when both are sent.
        let header = |name: &str| (name == "x-http-method").then_some("PUT");
        assert!(matches!(
            overridden_method("POST", "/x?_method=DELETE", &header),
            Some(Denial::BadHeader { header, .. }) if header == "x-http-method"
        ));
    }

    #[test]
    fn a_replayed_charge_is_dropped_only_when_the_ledger_refuses_it() {
        let outcome = |replayed| DebitOutcome {
            event_id: "0-1-0".into(),
            amount: 1,
            available: 0,
            held: 0,
            spendable: None,
            replayed,
        };
        let cases = [
            (Ok(outcome(false)), Replayed::Charged),
            (Ok(outcome(true)), Replayed::Duplicate),
            (
                Err(LedgerError::Refused(
                    crate::ledger::Refusal::InsufficientCredits {
                        required: 2,
                        available: 1,
                    },
                )),
                Replayed::Refused,
            ),
            (Err(LedgerError::NotFound("key")), Replayed::Refused),
            (
                Err(LedgerError::InvalidArgument(Vec::new())),
                Replayed::Refused,
            ),
            // An error of the ledger's own (a script error, an unreadable reply): never a
            // reason to drop a charge, nor to hold up the ones behind it every round.
            (
                Err(LedgerError::Internal("TG_INVARIANT".into())),
                Replayed::Later,
            ),
            (
                Err(LedgerError::Unavailable("timeout".into())),
                Replayed::Retry,
            ),
            (Err(LedgerError::NotInitialized), Replayed::Later),
            (Err(LedgerError::OutboxFull), Replayed::Later),
            (Err(LedgerError::ExpiryBacklog), Replayed::Later),
        ];
        for (result, want) in cases {
            assert_eq!(Replayed::of(&result), want, "{result:?}");
        }
    }

    #[test]
    fn idempotency_keys_are_scoped_and_bounded() {
        assert_eq!(
            check_idempotency_key("envelope.send", Some("req-1")),
            "gw:envelope.send:req-1"
        );
        assert_ne!(
            check_idempotency_key("a", Some("req-1")),
            check_idempotency_key("b", Some("req-1"))
        );
        let long = "x".repeat(500);
        let k = check_idempotency_key("op", Some(&long));
        assert!(k.len() <= IDEMPOTENCY_KEY_LEN_MAX, "{k}");
        assert_eq!(k, check_idempotency_key("op", Some(&long)));
        let spaced = check_idempotency_key("op", Some("has space"));
        assert!(spaced.starts_with("gw:op:#"), "{spaced}");
        assert_ne!(
            check_idempotency_key("op", None),
            check_idempotency_key("op", None)
        );
    }

    #[test]
    fn a_ledger_that_lost_its_data_refuses_whatever_the_fail_policy() {
        for fail_policy in [FailPolicy::FailOpen, FailPolicy::FailClosed] {
            let op = Operation {
                name: "op".into(),
                wallet: "default".into(),
                mode: Mode::Debit,
                base: 1,
                units: None,
                variants: None,
                fail_policy,
            };
            let lost = charged(
                &op,
                Some("acme".into()),
                "",
                Err(LedgerError::NotInitialized),
            );
            assert!(
                matches!(lost, Decision::Deny(Denial::NotInitialized)),
                "{fail_policy:?}: {lost:?}"
            );
            let down = charged(
                &op,
                Some("acme".into()),
                "alice",
                Err(LedgerError::Unavailable("x".into())),
            );
            match fail_policy {
                FailPolicy::FailOpen => {
                    assert!(
                        matches!(
                            &down,
                            Decision::Allow(Allowed { degraded: true, member_id: Some(m), .. }) if m == "alice"
                        ),
                        "{down:?}"
                    )
                }
                FailPolicy::FailClosed => {
                    assert!(matches!(down, Decision::Deny(Denial::Unavailable)))
                }
            }
        }
        let denial = status::denial_response(&Denial::NotInitialized);
        assert_eq!(
            (denial.status, denial.reason),
            (503, "ledger_not_initialized")
        );
    }

    #[test]
    fn allowed_headers() {
        let a = Allowed {
            account_id: Some("acme".into()),
            member_id: None,
            operation: Some("ocr.pages".into()),
            charged: 50,
            hold_id: Some("h3-9".into()),
            capture_terms: Some("2;200-299;x-tollgate-units".into()),
            charge_id: None,
            remaining: Some(40),
            degraded: false,
        };
        assert_eq!(
            a.upstream_headers(),
            vec![
                (HEADER_ACCOUNT, "acme".to_owned()),
                (HEADER_OPERATION, "ocr.pages".to_owned()),
                (HEADER_CHARGED, "50".to_owned()),
                (HEADER_HOLD_ID, "h3-9".to_owned()),
            ]
        );
        let debit = Allowed {
            hold_id: None,
            charge_id: Some("1796506072169-0".into()),
            ..a.clone()
        };
        assert!(debit
            .upstream_headers()
            .contains(&(HEADER_CHARGE_ID, "1796506072169-0".to_owned())));
        let member = Allowed {
            member_id: Some("alice".into()),
            ..a.clone()
        };
        assert_eq!(
            member.upstream_headers()[..2],
            [
                (HEADER_ACCOUNT, "acme".to_owned()),
                (HEADER_MEMBER, "alice".to_owned())
            ]
        );
        assert_eq!(
            a.client_headers(),
            vec![(HEADER_REMAINING, "40".to_owned())]
        );
    }
}
