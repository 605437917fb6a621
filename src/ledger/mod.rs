//! The ledger: balances, lots, holds, idempotency records and the outbox live in Redis and
//! change only through the Lua scripts under `lua/`, one atomic script per operation.
//! This module owns the typed API over those scripts.
//!
//! - `command`: requests and their validation (pure)
//! - `keys`: shard placement and key names
//! - `reply`: parsing of script answers
//! - `event`: the outbox event format
//! - `redis_pool`: connections, deadlines, script loading
//! - `sweeper`: periodic expiry of lots and holds for idle wallets

pub mod command;
pub mod error;
pub mod event;
pub mod keys;
pub mod library;
pub mod org;
pub mod redis_pool;
pub(crate) mod reply;
pub mod sweeper;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use command::{
    Adjust, AdjustInput, AttemptMark, Authorize, Debit, EndHold, FieldViolation, Grant, GrantInput,
    LotKind, Metadata, OnExpiry, Refund,
};
pub use error::{BudgetScope, HoldEnd, LedgerError, Refusal};
use library::{Library, ScriptSource};
use redis_pool::ScriptMetrics;
pub use redis_pool::{RedisPool, ScriptCall, WaitReplicas};

use command::{digest, encode_metadata};
use keys::ShardMap;

/// Idempotency records live this long unless configured otherwise.
pub const DEFAULT_IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// Ended holds are kept this long, so a late second Capture learns how the hold ended.
pub const DEFAULT_HOLD_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// Charge records (what a debit or capture took from which lot) are kept this long;
/// refunds of older charges answer NOT_FOUND.
pub const DEFAULT_CHARGE_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
pub const DEFAULT_LOTS_PER_WALLET_MAX: u32 = 1000;
pub const DEFAULT_WALLETS_PER_ACCOUNT_MAX: u32 = 64;
pub const DEFAULT_HOLDS_PER_WALLET_MAX: u32 = 10_000;
/// Members per organization: AddMember of a new member past it is MEMBER_LIMIT. It bounds
/// what reads the whole org record (ListMembers' pages, the last-owner check, a full
/// wallet set's member walk).
pub const DEFAULT_MEMBERS_PER_ORG_MAX: u32 = 1000;
/// Lots per ListLots page unless asked otherwise, and the most a page may hold.
pub const LOTS_PAGE_DEFAULT: u32 = 100;
pub const LOTS_PAGE_MAX: u32 = 1000;

/// Ledger limits and windows, from the `[ledger]` config section.
#[derive(Debug, Clone)]
pub struct LedgerSettings {
    pub shards: u16,
    pub idempotency_window: Duration,
    pub hold_retention: Duration,
    pub charge_retention: Duration,
    pub lots_per_wallet_max: u32,
    pub wallets_per_account_max: u32,
    pub holds_per_wallet_max: u32,
    pub members_per_org_max: u32,
    /// Unsettled events per shard outbox before Debit and Authorize answer OUTBOX_FULL;
    /// 0 = no bound.
    pub outbox_events_max: u64,
    /// How long a revoked API key's record is kept (`gateway.revoked_key_retention_secs`):
    /// a member's removal or demotion (lua/org.lua) drops the org's keys revoked longer
    /// ago, as the gateway's key scripts do (gateway/lua/key_prune.lua).
    pub revoked_key_retention: Duration,
}

impl Default for LedgerSettings {
    fn default() -> Self {
        Self {
            shards: keys::SHARDS_DEFAULT,
            idempotency_window: DEFAULT_IDEMPOTENCY_WINDOW,
            hold_retention: DEFAULT_HOLD_RETENTION,
            charge_retention: DEFAULT_CHARGE_RETENTION,
            lots_per_wallet_max: DEFAULT_LOTS_PER_WALLET_MAX,
            wallets_per_account_max: DEFAULT_WALLETS_PER_ACCOUNT_MAX,
            holds_per_wallet_max: DEFAULT_HOLDS_PER_WALLET_MAX,
            members_per_org_max: DEFAULT_MEMBERS_PER_ORG_MAX,
            outbox_events_max: 0,
            revoked_key_retention: crate::gateway::identity::DEFAULT_REVOKED_KEY_RETENTION,
        }
    }
}

/// Where scripts take the time from. Production reads Redis `TIME`, so every sidecar
/// agrees on expiry; tests drive a manual clock to make expiry deterministic.
#[derive(Debug, Clone, Default)]
pub enum Clock {
    #[default]
    Redis,
    Manual(Arc<AtomicI64>),
}

impl Clock {
    pub fn manual(start_ms: i64) -> (Self, Arc<AtomicI64>) {
        let now = Arc::new(AtomicI64::new(start_ms));
        (Self::Manual(now.clone()), now)
    }

    /// The time a script is told to take as now, in ms; 0 = Redis `TIME`.
    pub fn override_ms(&self) -> i64 {
        match self {
            Self::Redis => 0,
            Self::Manual(now) => now.load(Ordering::SeqCst),
        }
    }
}

/// A ledger script: the function it is registered as, its metric handles resolved once.
struct LedgerScript {
    function: String,
    metrics: ScriptMetrics,
    /// The script can change the ledger: followed by `WAIT` when `redis.wait_replicas` is set.
    writes: bool,
}

/// The scripts, as functions of one library (lua/lib.lua, then each script's body).
struct Scripts {
    library: Library,
    debit: LedgerScript,
    authorize: LedgerScript,
    end_hold: LedgerScript,
    refund: LedgerScript,
    void: LedgerScript,
    grant: LedgerScript,
    adjust: LedgerScript,
    balance: LedgerScript,
    lots: LedgerScript,
    sweep: LedgerScript,
    snapshot: LedgerScript,
    org: LedgerScript,
    view: LedgerScript,
    consumers: LedgerScript,
}

/// `ledger_scripts!(("debit", mutates, writes), ...)`: each lua/<name>.lua registered as a
/// function of the library, measured as "<name>". `mutates`: answers
/// `{replayed, "CODE|..."}`; `writes`: can change the ledger (the sweeper's script writes
/// without answering that way).
macro_rules! ledger_scripts {
    ($(($name:ident, $mutates:expr, $writes:expr)),* $(,)?) => {{
        // lib.lua, then what the gateway's key scripts share with it: the pruning of
        // revoked API keys (lua/org.lua revokes keys too).
        let library = Library::new(
            concat!(
                include_str!("lua/lib.lua"),
                "\n",
                include_str!("../gateway/lua/key_prune.lua")
            ),
            &[$(ScriptSource {
                name: stringify!($name),
                body: include_str!(concat!("lua/", stringify!($name), ".lua")),
            }),*],
        );
        Scripts {
            $($name: LedgerScript {
                function: library.function(stringify!($name)),
                metrics: ScriptMetrics::new(stringify!($name), $mutates),
                writes: $writes,
            },)*
            library,
        }
    }};
}

impl Scripts {
    fn new() -> Self {
        ledger_scripts!(
            (debit, true, true),
            (authorize, true, true),
            (end_hold, true, true),
            (refund, true, true),
            (void, true, true),
            (grant, true, true),
            (adjust, true, true),
            (balance, false, false),
            (lots, false, false),
            (sweep, false, true),
            (snapshot, false, false),
            (org, true, true),
            (view, false, false),
            (consumers, false, false),
        )
    }
}

/// The request digest of a debit (its idempotency record's): the member joins it only when
/// there is one, so records of personal charges written before organizations existed keep
/// matching. A debit a price book priced ([`Debit::price_inputs`]) is identified by what
/// it was priced from, not by the amount: see [`priced_digest`].
fn debit_digest(cmd: &Debit, metadata: &str) -> String {
    let amount = cmd.amount.to_string();
    let by_amount = if cmd.member_id.is_empty() {
        digest(&["debit", &cmd.wallet, &amount, &cmd.operation, metadata])
    } else {
        digest(&[
            "debit",
            &cmd.wallet,
            &amount,
            &cmd.operation,
            metadata,
            &cmd.member_id,
        ])
    };
    match &cmd.price_inputs {
        None => by_amount,
        Some(inputs) => priced_digest(
            "debit",
            [&cmd.wallet, &cmd.operation, metadata, &cmd.member_id],
            inputs,
            by_amount,
            cmd.attempt_mark.as_ref(),
        ),
    }
}

/// The request digest of a hold, as [`debit_digest`]: a priced hold's leaves out its TTL
/// and expiry policy as well, which the book decides.
fn authorize_digest(cmd: &Authorize, metadata: &str) -> String {
    let amount = cmd.amount.to_string();
    let ttl = cmd.ttl_ms.to_string();
    let parts = [
        "authorize",
        &cmd.wallet,
        &amount,
        &ttl,
        cmd.on_expiry.code(),
        &cmd.operation,
        metadata,
        &cmd.member_id,
    ];
    let by_amount = digest(if cmd.member_id.is_empty() {
        &parts[..7]
    } else {
        &parts
    });
    match &cmd.price_inputs {
        None => by_amount,
        Some(inputs) => priced_digest(
            "authorize",
            [&cmd.wallet, &cmd.operation, metadata, &cmd.member_id],
            inputs,
            by_amount,
            cmd.attempt_mark.as_ref(),
        ),
    }
}

/// The digest argument of a charge a price book priced (a gateway check): the digest of
/// what the caller asked for — `[wallet, operation, metadata, member]` and the price
/// inputs — then, 16 more hex digits, `by_amount`, the form tollgate wrote for such a
/// charge before it had price inputs, and then the attempt's mark when it has one
/// ([`Debit::attempt_mark`]: 8 letters). The scripts record the first (and the mark) and
/// find a record holding either (lib.lua `recall`), so a retry across an upgrade replays
/// the charge an older sidecar made rather than being refused (its price unchanged; a
/// reload that changed it as well makes it a 409, never a second charge). A new-form
/// record (or a marked one) is another request to an older sidecar: a 409 during a
/// rolling upgrade, never a second charge either.
fn priced_digest(
    kind: &str,
    request: [&str; 4],
    inputs: &str,
    by_amount: String,
    mark: Option<&AttemptMark>,
) -> String {
    let [wallet, operation, metadata, member] = request;
    let mut out = digest(&[kind, "priced", wallet, operation, metadata, member, inputs]);
    out.push_str(&by_amount);
    if let Some(mark) = mark {
        out.push_str(mark.as_str());
    }
    out
}

/// A charge a void undoes ([`Ledger::void`]): the debit or hold exactly as it was sent.
#[derive(Debug, Clone, Copy)]
pub enum ChargeRef<'a> {
    Debit(&'a Debit),
    Hold(&'a Authorize),
}

impl<'a> ChargeRef<'a> {
    /// Validated as it was sent: by key (no account, no member) or by account.
    fn validate(self, by_key: bool) -> Result<(), Vec<FieldViolation>> {
        match (self, by_key) {
            (Self::Debit(c), true) => c.validate_charge(),
            (Self::Debit(c), false) => c.validate(),
            (Self::Hold(c), true) => c.validate_charge(),
            (Self::Hold(c), false) => c.validate(),
        }
    }

    /// Account, member and idempotency key, as sent.
    fn identity(self) -> (&'a str, &'a str, &'a str) {
        let (account, member, key) = match self {
            Self::Debit(c) => (&c.account_id, &c.member_id, &c.idempotency_key),
            Self::Hold(c) => (&c.account_id, &c.member_id, &c.idempotency_key),
        };
        (account, member, key)
    }

    /// The digest its idempotency record holds.
    fn digest(self) -> String {
        match self {
            Self::Debit(c) => debit_digest(c, &encode_metadata(&c.metadata)),
            Self::Hold(c) => authorize_digest(c, &encode_metadata(&c.metadata)),
        }
    }
}

/// What a void did ([`Ledger::void`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Voided {
    /// The debit was refunded in full (what was left of it) by a refund event of
    /// operation "void"; its idempotency record is gone.
    Debit {
        refund_event_id: String,
        charge_id: String,
        refunded: i64,
        available: i64,
    },
    /// The hold was released; its idempotency record is gone.
    Hold {
        hold_id: String,
        release_event_id: String,
        released: i64,
    },
    /// Nothing to undo: no such charge ran (or it was refused), or it is no longer there
    /// to undo (a hold that ended, a charge refunded or past its retention). The reason,
    /// as lua/void.lua names it.
    Nothing(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoidOutcome {
    pub voided: Voided,
    /// The answer of an earlier call with the same void key.
    pub replayed: bool,
}

/// An API key as the debit script resolves it ([`Ledger::debit_by_key`]).
#[derive(Debug, Clone, Copy)]
pub struct KeyRef<'a> {
    pub key_id: &'a str,
    /// The shard the key id names: its account's.
    pub shard: u16,
    /// SHA-256 of the presented key, hex.
    pub digest_hex: &'a str,
}

/// What a debit or hold by API key found and did.
#[derive(Debug)]
pub enum Keyed<T> {
    /// No such key, or the secret does not match: nothing charged.
    UnknownKey,
    /// Nothing charged.
    RevokedKey {
        account_id: String,
        /// The member an org key was bound to; empty for a personal key.
        member_id: String,
        /// When the key was revoked (server time).
        revoked_at_ms: i64,
    },
    /// An org key bound to a member: nothing charged yet (the member's charge has its own
    /// request digest).
    MemberKey {
        account_id: String,
        member_id: String,
    },
    /// A personal key: the charge's answer (made, refused or replayed).
    Charged {
        account_id: String,
        result: Result<T, LedgerError>,
    },
}

impl<T> Keyed<T> {
    /// The same finding, with the charge's answer mapped.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Keyed<U> {
        match self {
            Keyed::UnknownKey => Keyed::UnknownKey,
            Keyed::RevokedKey {
                account_id,
                member_id,
                revoked_at_ms,
            } => Keyed::RevokedKey {
                account_id,
                member_id,
                revoked_at_ms,
            },
            Keyed::MemberKey {
                account_id,
                member_id,
            } => Keyed::MemberKey {
                account_id,
                member_id,
            },
            Keyed::Charged { account_id, result } => Keyed::Charged {
                account_id,
                result: result.map(f),
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebitOutcome {
    pub event_id: String,
    pub amount: i64,
    pub available: i64,
    pub held: i64,
    /// What the caller may still spend after this charge, when more than the wallet's
    /// balance bounds it: min(available, the org member's allocation left, every
    /// applicable budget's headroom — limit − spent in its current period), never below 0.
    /// None when only `available` bounds the caller (no allocation, no budget), and in an
    /// answer recorded, and now replayed, by a tollgate from before budgets were counted
    /// here (then it covers the allocation only, or is None). See [`Self::remaining`].
    pub spendable: Option<i64>,
    pub replayed: bool,
}

impl DebitOutcome {
    /// What the caller may still spend: [`Self::spendable`], else `available`. The
    /// gateway's `x-credits-remaining` and the API's `spendable`.
    pub fn remaining(&self) -> i64 {
        self.spendable.unwrap_or(self.available)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldOutcome {
    pub event_id: String,
    pub hold_id: String,
    pub amount: i64,
    pub expires_at_ms: i64,
    pub available: i64,
    pub held: i64,
    /// As [`DebitOutcome::spendable`]: the hold counts in the allocation and the budgets
    /// at once.
    pub spendable: Option<i64>,
    pub replayed: bool,
}

impl HoldOutcome {
    /// As [`DebitOutcome::remaining`].
    pub fn remaining(&self) -> i64 {
        self.spendable.unwrap_or(self.available)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndHoldOutcome {
    pub event_id: String,
    pub captured: i64,
    /// Given back by the hold, `expired` included.
    pub released: i64,
    pub available: i64,
    pub held: i64,
    /// Part of `released` that expired at once: its lot had expired while held.
    pub expired: i64,
    pub replayed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundOutcome {
    pub event_id: String,
    pub refunded: i64,
    pub refunded_total: i64,
    pub available: i64,
    pub expired: i64,
    pub replayed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantOutcome {
    pub event_id: String,
    /// Empty for a negative adjustment.
    pub lot_id: String,
    pub available: i64,
    pub replayed: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WalletBalance {
    pub wallet: String,
    pub available: i64,
    pub held: i64,
    pub granted: i64,
    pub used: i64,
    pub expired: i64,
    pub refunded: i64,
    pub adjusted: i64,
}

impl WalletBalance {
    /// Conservation: what came in equals what is left plus what went out.
    pub fn is_conserved(&self) -> bool {
        self.granted + self.adjusted
            == self.available + self.held + self.used + self.expired - self.refunded
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lot {
    pub lot_id: String,
    pub wallet: String,
    pub kind: String,
    pub priority: u8,
    pub amount: i64,
    pub used: i64,
    pub remaining: i64,
    pub held: i64,
    /// The lot has expired: it is listed while open holds still hold credits of it.
    pub expired: bool,
    /// Credits of the lot that expired unused (0 for a live lot). `amount` is `used +
    /// remaining + held + expired_credits`.
    pub expired_credits: i64,
    pub expires_at_ms: i64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub description: String,
}

/// What one sweep call did ([`Ledger::sweep_shard`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepOutcome {
    /// Wallets visited.
    pub wallets: u32,
    /// Lots expired plus holds ended.
    pub ended: u32,
    /// The shard still has due wallets: the call stopped at one of its bounds.
    pub more: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LotsPage {
    pub lots: Vec<Lot>,
    /// Offset of the next page, if there is one.
    pub next_offset: Option<u32>,
    /// Where the next page starts, if there is one: just after this page's last lot
    /// ([`Ledger::lots_after`]).
    pub next: Option<LotCursor>,
}

/// A place in a wallet's lot listing: just after one lot, by its index (the burn index,
/// or the expired-held one after it) and its score there (lots.lua). Unlike an offset it
/// does not move when lots before it are added or dropped (a grant of a higher priority,
/// a lot used up), so paging neither repeats nor skips a lot for that.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LotCursor {
    /// In the expired-held index (listed after every live lot).
    pub expired: bool,
    /// The lot's score in its index: the burn score, or the expiry for an expired lot.
    pub score: i64,
    pub lot_id: String,
}

/// A wallet as [`Ledger::snapshot`] reads it, in one atomic script.
#[derive(Debug, Clone)]
pub struct WalletSnapshot {
    pub balance: WalletBalance,
    /// Holds in the wallet's deadline index: the holds Redis has open.
    pub open_holds: i64,
    /// The id of the shard outbox's last entry ever added (None: nothing was added).
    pub last_entry_id: Option<String>,
}

/// A new epoch marker value: the time it was written, in ms.
/// How long a new shard's claim ([`Ledger::claim_new_shard`]) waits for its mark: far
/// longer than the store's answer takes; a mark later than that marks nothing, and the
/// next round tries again.
pub const NEW_SHARD_CLAIM_TTL_MS: u64 = 60_000;

pub fn new_epoch() -> String {
    wall_clock_ms().to_string()
}

/// This process's wall clock, in ms since the epoch (0 before 1970): for what the process
/// itself stamps (settled_at, webhook attempts, spool entries, outbox ages). Ledger times
/// come from Redis (`Clock`), so that every sidecar agrees on them.
pub fn wall_clock_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// The typed ledger API. Cheap to share behind an `Arc`.
pub struct Ledger {
    redis: RedisPool,
    scripts: Scripts,
    shards: ShardMap,
    settings: LedgerSettings,
    clock: Clock,
    // Pre-rendered script arguments shared by every call.
    window_ms: String,
    hold_retention_ms: String,
    charge_retention_ms: String,
    outbox_max: String,
    lots_max: String,
    wallets_max: String,
    holds_max: String,
    members_max: String,
    revoked_key_retention_ms: String,
}

impl Ledger {
    pub fn new(redis: RedisPool, settings: LedgerSettings, clock: Clock) -> Self {
        let ms = |d: Duration| d.as_millis().to_string();
        Self {
            scripts: Scripts::new(),
            shards: ShardMap::new(settings.shards),
            window_ms: ms(settings.idempotency_window),
            hold_retention_ms: ms(settings.hold_retention),
            charge_retention_ms: ms(settings.charge_retention),
            outbox_max: settings.outbox_events_max.to_string(),
            lots_max: settings.lots_per_wallet_max.to_string(),
            wallets_max: settings.wallets_per_account_max.to_string(),
            holds_max: settings.holds_per_wallet_max.to_string(),
            members_max: settings.members_per_org_max.to_string(),
            revoked_key_retention_ms: ms(settings.revoked_key_retention),
            settings,
            redis,
            clock,
        }
    }

    pub fn settings(&self) -> &LedgerSettings {
        &self.settings
    }

    /// Where the ledger's scripts take the time from (the gateway's key scripts take it
    /// from the same clock).
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    pub fn shards(&self) -> &ShardMap {
        &self.shards
    }

    pub fn redis(&self) -> &RedisPool {
        &self.redis
    }

    /// Loads the ledger's function library into Redis (FUNCTION LOAD REPLACE) so the
    /// first calls need no reload.
    pub async fn load_scripts(&self) -> Result<(), LedgerError> {
        self.redis.load_library(&self.scripts.library).await
    }

    /// Whether Redis holds the ledger's function library (FUNCTION LIST); loads it when
    /// missing and `load_missing` is set. Returns (scripts present, scripts in all).
    pub async fn check_scripts(&self, load_missing: bool) -> Result<(usize, usize), LedgerError> {
        let library = &self.scripts.library;
        let mut present = self.redis.library_exists(library).await?;
        if !present && load_missing {
            self.load_scripts().await?;
            present = self.redis.library_exists(library).await?;
        }
        let all = library.functions();
        Ok((if present { all } else { 0 }, all))
    }

    /// Deletes the function libraries earlier tollgate versions loaded into Redis (this
    /// version's stays); returns their names. With `dry_run`, only lists them. Run it once
    /// a rolling upgrade is over: a process of an older version still running reloads its
    /// library on its next call ("Function not found"), so an early run costs a reload,
    /// not an error.
    ///
    /// Refused (unless `force`) when this version's library is not in Redis: no process of
    /// this version runs against it, so the libraries it would delete are probably the
    /// ones in use (a `tollgate` binary of another version than the deployment's).
    pub async fn prune_libraries(
        &self,
        dry_run: bool,
        force: bool,
    ) -> Result<Vec<String>, LedgerError> {
        let current = self.scripts.library.name();
        let libraries = self.redis.tollgate_libraries().await?;
        if !force && !libraries.iter().any(|name| name == current) {
            return Err(LedgerError::InvalidArgument(vec![FieldViolation::new(
                "version",
                format!(
                    "this tollgate's library {current} is not in Redis: no process of this \
                     version runs there, so the others are probably in use (run the \
                     deployment's version, or --force)"
                ),
            )]));
        }
        let mut pruned = Vec::new();
        for name in libraries {
            if name == current {
                continue;
            }
            if dry_run || self.redis.delete_library(&name).await? {
                pruned.push(name);
            }
        }
        Ok(pruned)
    }

    /// The ledger's function library (the bench's baseline calls its functions).
    pub fn library(&self) -> &Library {
        &self.scripts.library
    }

    /// A script call with the shared ARGV prefix (see lua/lib.lua) for a shard.
    fn invocation<'a>(&'a self, script: &'a LedgerScript, shard: u16) -> ScriptCall<'a> {
        let mut inv = ScriptCall::new(
            &self.scripts.library,
            &script.function,
            &[self.shards.outbox(shard)],
        )
        .with_metrics(&script.metrics)
        .writes(script.writes);
        inv.arg(self.clock.override_ms())
            .arg(self.shards.tag(shard))
            .arg(self.shards.number(shard))
            .arg(&self.window_ms)
            .arg(&self.hold_retention_ms)
            .arg(&self.charge_retention_ms)
            .arg(&self.outbox_max);
        inv
    }

    pub async fn debit(&self, cmd: &Debit) -> Result<DebitOutcome, LedgerError> {
        cmd.validate().map_err(LedgerError::InvalidArgument)?;
        let inv = self.debit_invocation(cmd);
        let answer = self.redis.answer(&inv).await?;
        reply::debit(&answer)
    }

    /// The FCALL of the debit function with exactly the arguments [`Ledger::debit`] sends
    /// (the command is not validated here). `tollgate bench --baseline` runs it straight
    /// against Redis, so the baseline and tollgate run the same script.
    pub fn debit_invocation(&self, cmd: &Debit) -> ScriptCall<'_> {
        self.debit_call(cmd, self.shards.of_account(&cmd.account_id))
    }

    fn debit_call(&self, cmd: &Debit, shard: u16) -> ScriptCall<'_> {
        let metadata = encode_metadata(&cmd.metadata);
        let digest = debit_digest(cmd, &metadata);
        let mut inv = self.invocation(&self.scripts.debit, shard);
        inv.arg(&cmd.account_id)
            .arg(&cmd.wallet)
            .arg(&cmd.idempotency_key)
            .arg(&digest)
            .arg(cmd.amount)
            .arg(&cmd.operation)
            .arg(&metadata)
            .arg(&cmd.member_id);
        inv
    }

    /// A debit by API key, for a gateway whose identity cache missed: the debit script
    /// resolves the key in the same call (the key record lives in its account's shard).
    /// `cmd.account_id` and `cmd.member_id` must be empty: the key decides them. An org
    /// key bound to a member is resolved but not charged ([`Keyed::MemberKey`]): the
    /// caller charges it with [`Ledger::debit`].
    pub async fn debit_by_key(
        &self,
        cmd: &Debit,
        key: &KeyRef<'_>,
    ) -> Result<Keyed<DebitOutcome>, LedgerError> {
        cmd.validate_charge()
            .map_err(LedgerError::InvalidArgument)?;
        let by_account = [cmd.account_id.as_str(), cmd.member_id.as_str()];
        let inv = self.debit_call(cmd, key.shard);
        self.call_by_key(inv, by_account, key, reply::debit).await
    }

    /// Calls a charge script by API key (the key's arguments after the command's; the
    /// command's account and member, `by_account`, must be empty), and tells what it found
    /// (lib.lua `resolve_key`) with its answer.
    async fn call_by_key<T>(
        &self,
        mut inv: ScriptCall<'_>,
        by_account: [&str; 2],
        key: &KeyRef<'_>,
        parse: fn(&redis_pool::Answer) -> Result<T, LedgerError>,
    ) -> Result<Keyed<T>, LedgerError> {
        if by_account.iter().any(|id| !id.is_empty()) {
            return Err(LedgerError::Internal(
                "a charge by key with an account or member".into(),
            ));
        }
        inv.arg(key.key_id).arg(key.digest_hex);
        let mut answer = self.redis.answer(&inv).await?;
        let mut identity = std::mem::take(&mut answer.identity).into_iter();
        let (account, member, revoked) = (identity.next(), identity.next(), identity.next());
        let account_id = match (answer.text.as_str(), account) {
            ("KEY_UNKNOWN", _) => return Ok(Keyed::UnknownKey),
            (_, None) => {
                // Refused before the key was read (not initialized): the refusal stands.
                return Err(parse(&answer).err().unwrap_or_else(|| {
                    LedgerError::Internal("a call by key answered without the account".into())
                }));
            }
            (_, Some(account_id)) => account_id,
        };
        // Key ids name the shard of their account, and shards are fixed for a deployment's
        // life; a key record found elsewhere would be a corrupt ledger.
        if self.shards.of_account(&account_id) != key.shard {
            return Err(LedgerError::Internal(
                "an api key record is not in its account's shard".into(),
            ));
        }
        Ok(match (answer.text.as_str(), member) {
            ("KEY_REVOKED", member) => Keyed::RevokedKey {
                account_id,
                member_id: member.unwrap_or_default(),
                revoked_at_ms: revoked.and_then(|r| r.parse().ok()).ok_or_else(|| {
                    LedgerError::Internal("a revoked key answered without its time".into())
                })?,
            },
            ("KEY_MEMBER", Some(member_id)) => Keyed::MemberKey {
                account_id,
                member_id,
            },
            _ => Keyed::Charged {
                account_id,
                result: parse(&answer),
            },
        })
    }

    /// Parses a debit script answer (see [`Ledger::debit_invocation`]).
    pub fn debit_reply(value: redis::Value) -> Result<DebitOutcome, LedgerError> {
        reply::debit(&redis_pool::Answer::from_value(value)?)
    }

    pub async fn authorize(&self, cmd: &Authorize) -> Result<HoldOutcome, LedgerError> {
        cmd.validate().map_err(LedgerError::InvalidArgument)?;
        let inv = self.authorize_call(cmd, self.shards.of_account(&cmd.account_id));
        let answer = self.redis.answer(&inv).await?;
        reply::hold(&answer)
    }

    fn authorize_call(&self, cmd: &Authorize, shard: u16) -> ScriptCall<'_> {
        let metadata = encode_metadata(&cmd.metadata);
        let policy = cmd.on_expiry.code();
        let digest = authorize_digest(cmd, &metadata);
        let mut inv = self.invocation(&self.scripts.authorize, shard);
        inv.arg(&cmd.account_id)
            .arg(&cmd.wallet)
            .arg(&cmd.idempotency_key)
            .arg(&digest)
            .arg(cmd.amount)
            .arg(cmd.ttl_ms)
            .arg(policy)
            .arg(&cmd.operation)
            .arg(&metadata)
            .arg(&self.holds_max)
            .arg(&cmd.member_id);
        inv
    }

    /// A hold by API key: as [`Ledger::debit_by_key`], for Authorize.
    pub async fn authorize_by_key(
        &self,
        cmd: &Authorize,
        key: &KeyRef<'_>,
    ) -> Result<Keyed<HoldOutcome>, LedgerError> {
        cmd.validate_charge()
            .map_err(LedgerError::InvalidArgument)?;
        let by_account = [cmd.account_id.as_str(), cmd.member_id.as_str()];
        let inv = self.authorize_call(cmd, key.shard);
        self.call_by_key(inv, by_account, key, reply::hold).await
    }

    /// Capture or Release, by `cmd.capture`.
    pub async fn end_hold(&self, cmd: &EndHold) -> Result<EndHoldOutcome, LedgerError> {
        let shard = self.shards.of_hold_id(&cmd.hold_id);
        cmd.validate(shard.is_some())
            .map_err(LedgerError::InvalidArgument)?;
        let shard = shard.unwrap_or_default();
        let metadata = encode_metadata(&cmd.metadata);
        let (mode, amount) = match cmd.capture {
            Some(amount) => ("capture", amount.unwrap_or(-1)),
            None => ("release", 0),
        };
        let amount_text = amount.to_string();
        let digest = digest(&[mode, &cmd.hold_id, &amount_text, &metadata]);
        let mut inv = self.invocation(&self.scripts.end_hold, shard);
        inv.arg(&cmd.hold_id)
            .arg(&cmd.idempotency_key)
            .arg(&digest)
            .arg(mode)
            .arg(amount)
            .arg(&metadata);
        let answer = self.redis.answer(&inv).await?;
        reply::end_hold(&answer)
    }

    pub async fn refund(&self, cmd: &Refund) -> Result<RefundOutcome, LedgerError> {
        let shard = self.shards.of_event_id(&cmd.charge_id);
        cmd.validate(shard.is_some())
            .map_err(LedgerError::InvalidArgument)?;
        let shard = shard.unwrap_or_default();
        let metadata = encode_metadata(&cmd.metadata);
        let amount = cmd.amount.to_string();
        let digest = digest(&["refund", &cmd.charge_id, &amount, &metadata]);
        let mut inv = self.invocation(&self.scripts.refund, shard);
        inv.arg(&cmd.charge_id)
            .arg(&cmd.idempotency_key)
            .arg(&digest)
            .arg(cmd.amount)
            .arg(&metadata)
            .arg(&self.lots_max);
        let answer = self.redis.answer(&inv).await?;
        reply::refund(&answer)
    }

    /// Undoes a gateway charge whose answer was lost (lua/void.lua): `charge` is the debit
    /// or hold exactly as it was sent (by account, or by `key` with an empty account and
    /// member), `void_key` the void's own idempotency key (a retried void replays its
    /// answer; a new key for every charge voided). A debit it finds is refunded in full, an
    /// open hold released, and the charge's idempotency record forgotten, so a retry of
    /// the request is charged again; otherwise nothing changes.
    pub async fn void(
        &self,
        charge: ChargeRef<'_>,
        key: Option<&KeyRef<'_>>,
        void_key: &str,
        metadata: &Metadata,
    ) -> Result<VoidOutcome, LedgerError> {
        charge
            .validate(key.is_some())
            .map_err(LedgerError::InvalidArgument)?;
        let (account_id, member_id, idempotency_key) = charge.identity();
        let digest_hex = charge.digest();
        let mut v = command::Violations::default();
        v.idempotency_key("void_key", void_key);
        v.metadata("metadata", metadata);
        v.finish().map_err(LedgerError::InvalidArgument)?;
        let shard = match key {
            Some(key) => {
                if !account_id.is_empty() || !member_id.is_empty() {
                    return Err(LedgerError::Internal(
                        "a void by key with an account or member".into(),
                    ));
                }
                key.shard
            }
            None => self.shards.of_account(account_id),
        };
        let metadata = encode_metadata(metadata);
        let void_digest = digest(&["void", idempotency_key, &digest_hex, &metadata]);
        let mut inv = self.invocation(&self.scripts.void, shard);
        inv.arg(account_id)
            .arg(idempotency_key)
            .arg(&digest_hex)
            .arg(void_key)
            .arg(&void_digest)
            .arg(&metadata)
            .arg(&self.lots_max);
        if let Some(key) = key {
            inv.arg(key.key_id).arg(key.digest_hex);
        }
        let answer = self.redis.answer(&inv).await?;
        reply::void(&answer)
    }

    pub async fn grant(&self, cmd: &Grant) -> Result<GrantOutcome, LedgerError> {
        let inv = self.grant_invocation(cmd);
        let answer = self.redis.answer(&inv).await?;
        reply::grant(&answer)
    }

    /// Many grants in one pipeline (seeding: `tollgate bench`, tests). Scripts must be
    /// loaded first ([`Ledger::load_scripts`]): a pipelined FCALL is not retried.
    pub async fn grant_batch(
        &self,
        cmds: &[Grant],
    ) -> Result<Vec<Result<GrantOutcome, LedgerError>>, LedgerError> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let invocations: Vec<_> = cmds.iter().map(|cmd| self.grant_invocation(cmd)).collect();
        for inv in &invocations {
            pipe.add_command(inv.cmd().clone());
        }
        // One WAIT after the batch covers every write before it on the connection.
        if let Some(wait) = self.redis.wait_cmd() {
            pipe.add_command(wait.clone());
        }
        let mut values: Vec<redis::Value> = self.redis.pipeline(&pipe).await?;
        if self.redis.wait_cmd().is_some() {
            if let Some(acked) = values.pop() {
                self.redis.check_wait(&acked);
            }
        }
        Ok(values
            .into_iter()
            .map(|value| {
                if let redis::Value::ServerError(err) = value {
                    return Err(LedgerError::from(redis::RedisError::from(err)));
                }
                reply::grant(&redis_pool::Answer::from_value(value)?)
            })
            .collect())
    }

    fn grant_invocation(&self, cmd: &Grant) -> ScriptCall<'_> {
        let shard = self.shards.of_account(&cmd.account_id);
        let metadata = encode_metadata(&cmd.metadata);
        let amount = cmd.amount.to_string();
        let priority = cmd.priority.to_string();
        let expires = cmd.expires_at_ms.to_string();
        let digest = digest(&[
            "grant",
            &cmd.wallet,
            &amount,
            cmd.kind.as_str(),
            &priority,
            &expires,
            &cmd.description,
            &metadata,
        ]);
        let mut inv = self.invocation(&self.scripts.grant, shard);
        inv.arg(&cmd.account_id)
            .arg(&cmd.wallet)
            .arg(&cmd.idempotency_key)
            .arg(&digest)
            .arg(cmd.amount)
            .arg(cmd.kind.as_str())
            .arg(cmd.priority)
            .arg(cmd.expires_at_ms)
            .arg(&cmd.description)
            .arg(&metadata)
            .arg(&self.lots_max)
            .arg(&self.wallets_max);
        inv
    }

    pub async fn adjust(&self, cmd: &Adjust) -> Result<GrantOutcome, LedgerError> {
        let shard = self.shards.of_account(&cmd.account_id);
        let metadata = encode_metadata(&cmd.metadata);
        let amount = cmd.amount.to_string();
        let priority = cmd.priority.to_string();
        let expires = cmd.expires_at_ms.to_string();
        let digest = digest(&[
            "adjust",
            &cmd.wallet,
            &amount,
            &priority,
            &expires,
            &cmd.description,
            &metadata,
        ]);
        let mut inv = self.invocation(&self.scripts.adjust, shard);
        inv.arg(&cmd.account_id)
            .arg(&cmd.wallet)
            .arg(&cmd.idempotency_key)
            .arg(&digest)
            .arg(cmd.amount)
            .arg(&cmd.description)
            .arg(&metadata)
            .arg(&self.lots_max)
            .arg(&self.wallets_max)
            .arg(cmd.priority)
            .arg(cmd.expires_at_ms);
        let answer = self.redis.answer(&inv).await?;
        reply::grant(&answer)
    }

    /// Balances of one wallet, or of every wallet of the account when `wallet` is empty.
    pub async fn balance(
        &self,
        account_id: &str,
        wallet: &str,
    ) -> Result<Vec<WalletBalance>, LedgerError> {
        let mut v = command::Violations::default();
        v.account_id("account_id", account_id);
        v.wallet("wallet", wallet);
        v.finish().map_err(LedgerError::InvalidArgument)?;
        let shard = self.shards.of_account(account_id);
        let mut inv = self.invocation(&self.scripts.balance, shard);
        inv.arg(account_id).arg(wallet);
        let rows: Vec<String> = self.redis.call_script(&inv).await?;
        reply::balances(&rows)
    }

    /// One page of a wallet's lots from `offset` in listing order.
    pub async fn lots(
        &self,
        account_id: &str,
        wallet: &str,
        offset: u32,
        page_size: u32,
    ) -> Result<LotsPage, LedgerError> {
        self.lots_page(account_id, wallet, offset, None, page_size)
            .await
    }

    /// One page of a wallet's lots just after `cursor` (a page's `next`).
    pub async fn lots_after(
        &self,
        account_id: &str,
        wallet: &str,
        cursor: &LotCursor,
        page_size: u32,
    ) -> Result<LotsPage, LedgerError> {
        self.lots_page(account_id, wallet, 0, Some(cursor), page_size)
            .await
    }

    async fn lots_page(
        &self,
        account_id: &str,
        wallet: &str,
        offset: u32,
        cursor: Option<&LotCursor>,
        page_size: u32,
    ) -> Result<LotsPage, LedgerError> {
        let mut v = command::Violations::default();
        v.account_id("account_id", account_id);
        v.wallet("wallet", wallet);
        if !(1..=LOTS_PAGE_MAX).contains(&page_size) {
            v.add("page_size", format!("must be in 1..={LOTS_PAGE_MAX}"));
        }
        v.finish().map_err(LedgerError::InvalidArgument)?;
        let wallet = if wallet.is_empty() {
            command::DEFAULT_WALLET
        } else {
            wallet
        };
        let shard = self.shards.of_account(account_id);
        let mut inv = self.invocation(&self.scripts.lots, shard);
        inv.arg(account_id).arg(wallet).arg(offset).arg(page_size);
        match cursor {
            Some(c) => inv
                .arg(if c.expired { "x" } else { "l" })
                .arg(c.score)
                .arg(&c.lot_id),
            None => inv.arg("").arg(0).arg(""),
        };
        let rows: Vec<String> = self.redis.call_script(&inv).await?;
        reply::lots(wallet, &rows)
    }

    /// Per shard: whether its epoch marker exists (the ledger holds real state).
    pub async fn initialized_shards(&self) -> Result<Vec<bool>, LedgerError> {
        let mut pipe = redis::pipe();
        for shard in 0..self.shards.count() {
            pipe.cmd("EXISTS").arg(self.shards.epoch_key(shard));
        }
        let found: Vec<i64> = self.redis.pipeline(&pipe).await?;
        Ok(found.into_iter().map(|n| n == 1).collect())
    }

    /// Whether Redis takes a write: one `SET` of a short-lived key in the ledger's own
    /// namespace (`{tg:0}:health`, 10 s), for the health watcher. A Redis at `maxmemory`
    /// with `noeviction` (OOM), a primary demoted to a replica (READONLY), one that stopped
    /// writes after a failed save (MISCONF) or lacks its `min-replicas` (NOREPLICAS) still
    /// answers every read, while every charge fails: those refusals are
    /// `LedgerError::Unavailable`. One Redis holds every shard, so one key tells.
    pub async fn take_write(&self) -> Result<(), LedgerError> {
        let () = self
            .redis
            .query(
                redis::cmd("SET")
                    .arg(format!("{}:health", self.shards.tag(0)))
                    .arg(1)
                    .arg("PX")
                    .arg(10_000),
            )
            .await?;
        Ok(())
    }

    /// Whether this Redis hands the whole numbers of a script to the commands it calls
    /// intact. The ledger's scripts pass credits, balances and times to HINCRBY, HSET and
    /// XADD as Lua numbers; Redis 7.2.0 to 7.2.4 wrote those with 8 or more trailing zeros
    /// in exponent form (100000000 as `1e+08`; redis/redis#13113, fixed in 7.2.5): a
    /// grant of 10^9 left a lot HINCRBY could not touch, every later draw on the wallet
    /// failed, and an event whose balance landed on a multiple of 10^8 could not be
    /// settled. One ECHO from a script tells, whatever the version string says (a fork
    /// may report another one).
    pub async fn lua_numbers_intact(&self) -> Result<bool, LedgerError> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(LUA_NUMBERS_PROBE).arg(0);
        let echoed: String = self.redis.call_cmd(&cmd).await?;
        Ok(lua_numbers_intact(&echoed))
    }

    /// Whether one shard has its epoch marker.
    pub async fn shard_initialized(&self, shard: u16) -> Result<bool, LedgerError> {
        let found: i64 = self
            .redis
            .query(redis::cmd("EXISTS").arg(self.shards.epoch_key(shard)))
            .await?;
        Ok(found == 1)
    }

    /// Marks a shard initialized (SET NX of its epoch marker), with the shard count it
    /// belongs to in the same atomic step. Only for a shard whose state is known to be
    /// complete: a fresh deployment, or after a restore. Refused (nothing written) when
    /// the shard already belongs to another count.
    pub async fn initialize_shard(&self, shard: u16, epoch: &str) -> Result<(), LedgerError> {
        const INITIALIZE: &str = "local c = redis.call('GET', KEYS[2]) \
            if c and c ~= ARGV[2] then return c end \
            redis.call('SET', KEYS[1], ARGV[1], 'NX') redis.call('SET', KEYS[2], ARGV[2]) \
            return ''";
        let found: String = self
            .redis
            .query(
                redis::cmd("EVAL")
                    .arg(INITIALIZE)
                    .arg(2)
                    .arg(self.shards.epoch_key(shard))
                    .arg(self.shards.count_key(shard))
                    .arg(epoch)
                    .arg(self.shards.count()),
            )
            .await?;
        if !found.is_empty() {
            return Err(self.count_mismatch(shard, &found));
        }
        Ok(())
    }

    fn count_mismatch(&self, shard: u16, found: &str) -> LedgerError {
        LedgerError::Internal(format!(
            "ledger.shards is {}, but shard {shard} belongs to a deployment of {found} shards \
             (its {} key): not marked",
            self.shards.count(),
            self.shards.count_key(shard)
        ))
    }

    /// Whether the Redis at `redis.url` is a Redis Cluster node this process cannot run
    /// on: cluster mode (`INFO cluster` says `cluster_enabled:1`) unless this node is the
    /// one primary serving all 16384 slots (`CLUSTER INFO`, `CLUSTER NODES`), as a managed
    /// Redis in cluster mode with a single shard is. Tollgate speaks to one Redis over one
    /// multiplexed connection; its keys and scripts are slot-safe (every key of a call
    /// carries its shard's hash tag), but the client does not follow `MOVED`, so a cluster
    /// of several primaries would refuse most shards' calls. The shard count check
    /// refuses such a Redis at start.
    pub async fn redis_cluster_unsupported(&self) -> Result<bool, LedgerError> {
        let info: String = self.redis.query(redis::cmd("INFO").arg("cluster")).await?;
        if !info.lines().any(|line| line.trim() == "cluster_enabled:1") {
            return Ok(false);
        }
        let cluster: String = self.redis.query(redis::cmd("CLUSTER").arg("INFO")).await?;
        let field = |name: &str| {
            cluster
                .lines()
                .find_map(|line| line.trim().strip_prefix(name)?.strip_prefix(':'))
        };
        if field("cluster_size") != Some("1") || field("cluster_slots_assigned") != Some("16384") {
            return Ok(true);
        }
        // One primary serves every slot: is it this node?
        let nodes: String = self.redis.query(redis::cmd("CLUSTER").arg("NODES")).await?;
        let serves_slots = nodes.lines().any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(2).is_some_and(|flags| {
                let flags: Vec<&str> = flags.split(',').collect();
                flags.contains(&"myself") && flags.contains(&"master")
            }) && fields.len() > 8
        });
        Ok(!serves_slots)
    }

    /// Per shard number from 0 to [`keys::SHARDS_MAX`] - 1, in range of the configured
    /// count or not: whether it has an epoch marker, and the shard count persisted in it
    /// (`{tg:S}:shards`). What the shard count check reads.
    pub async fn shard_count_marks(&self) -> Result<Vec<(bool, Option<String>)>, LedgerError> {
        let mut markers = redis::pipe();
        let mut counts = redis::pipe();
        for shard in 0..keys::SHARDS_MAX {
            markers.cmd("EXISTS").arg(keys::epoch_key_of(shard));
            counts.cmd("GET").arg(keys::shard_count_key(shard));
        }
        let markers: Vec<i64> = self.redis.pipeline(&markers).await?;
        let counts: Vec<Option<String>> = self.redis.pipeline(&counts).await?;
        Ok(markers
            .into_iter()
            .zip(counts)
            .map(|(e, c)| (e == 1, c))
            .collect())
    }

    /// Writes the configured shard count into every shard that has none yet (SET NX), and
    /// answers what each shard of the configured count holds afterwards: a process
    /// configured with another count that wrote first shows up here.
    pub async fn persist_shard_count(&self) -> Result<Vec<Option<String>>, LedgerError> {
        let count = self.shards.count();
        let mut pipe = redis::pipe();
        for shard in 0..count {
            pipe.cmd("SET")
                .arg(self.shards.count_key(shard))
                .arg(count)
                .arg("NX")
                .ignore();
        }
        for shard in 0..count {
            pipe.cmd("GET").arg(self.shards.count_key(shard));
        }
        self.redis.pipeline(&pipe).await
    }

    /// The first step of marking a new shard ([`Ledger::mark_new_shard`]): leaves a
    /// random token in the shard (for a minute) and returns it. The caller then makes
    /// sure the store has no events of the shard, and marks it with the token.
    pub async fn claim_new_shard(&self, shard: u16) -> Result<String, LedgerError> {
        let mut random = [0u8; 16];
        getrandom::fill(&mut random)
            .map_err(|e| LedgerError::Internal(format!("no randomness for a shard claim: {e}")))?;
        let token = hex::encode(random);
        let _: () = self
            .redis
            .query(
                redis::cmd("SET")
                    .arg(self.new_shard_claim_key(shard))
                    .arg(&token)
                    .arg("PX")
                    .arg(NEW_SHARD_CLAIM_TTL_MS),
            )
            .await?;
        Ok(token)
    }

    /// Marks a new shard initialized (its epoch marker, SET NX) only if the token of
    /// [`Ledger::claim_new_shard`] is still there: the Redis that was looked at before the
    /// store was asked is the one marked. A mark that arrives late (a process paused
    /// between the store's answer and its write, a proxy holding the write) after Redis
    /// lost its data meanwhile finds no token and marks nothing, instead of declaring an
    /// emptied shard new and serving it from zero balances. Answers whether it marked.
    pub async fn mark_new_shard(
        &self,
        shard: u16,
        epoch: &str,
        token: &str,
    ) -> Result<bool, LedgerError> {
        // The shard count goes in with the marker: a shard that belongs to another
        // count (KEYS[3]) is never marked.
        const MARK: &str = "if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end \
            local c = redis.call('GET', KEYS[3]) \
            if c and c ~= ARGV[3] then return c end \
            redis.call('DEL', KEYS[1]) \
            if redis.call('SET', KEYS[2], ARGV[2], 'NX') then \
              redis.call('SET', KEYS[3], ARGV[3]) return 1 end \
            return 0";
        let marked: redis::Value = self
            .redis
            .query(
                redis::cmd("EVAL")
                    .arg(MARK)
                    .arg(3)
                    .arg(self.new_shard_claim_key(shard))
                    .arg(self.shards.epoch_key(shard))
                    .arg(self.shards.count_key(shard))
                    .arg(token)
                    .arg(epoch)
                    .arg(self.shards.count()),
            )
            .await?;
        match marked {
            redis::Value::Int(n) => Ok(n == 1),
            redis::Value::BulkString(found) => {
                Err(self.count_mismatch(shard, &String::from_utf8_lossy(&found)))
            }
            other => Err(LedgerError::Internal(format!(
                "unexpected answer marking shard {shard}: {other:?}"
            ))),
        }
    }

    fn new_shard_claim_key(&self, shard: u16) -> String {
        format!("{}:new-shard-claim", self.shards.tag(shard))
    }

    /// Marks every shard initialized (tests, benchmarks, fresh deployments).
    pub async fn initialize_all(&self) -> Result<(), LedgerError> {
        let epoch = new_epoch();
        for shard in 0..self.shards.count() {
            self.initialize_shard(shard, &epoch).await?;
        }
        Ok(())
    }

    /// Removes a settler's consumer from `group` on `shard`'s outbox when it has nothing
    /// pending (consumers.lua: the check and `XGROUP DELCONSUMER` in one call, so no entry
    /// pending in it is ever thrown away). Returns whether it was removed.
    pub async fn remove_consumer(
        &self,
        shard: u16,
        group: &str,
        consumer: &str,
    ) -> Result<bool, LedgerError> {
        let mut inv = self.invocation(&self.scripts.consumers, shard);
        inv.arg(group).arg(consumer).arg("");
        let removed: i64 = self.redis.call_script(&inv).await?;
        Ok(removed > 0)
    }

    /// Removes every consumer of `group` on `shard`'s outbox but `keep` that has nothing
    /// pending and has not read for at least `idle_min` (consumers.lua, as
    /// [`Ledger::remove_consumer`]). Returns how many were removed.
    pub async fn prune_consumers(
        &self,
        shard: u16,
        group: &str,
        keep: &str,
        idle_min: std::time::Duration,
    ) -> Result<u64, LedgerError> {
        let mut inv = self.invocation(&self.scripts.consumers, shard);
        inv.arg(group)
            .arg(keep)
            .arg(idle_min.as_millis().max(1) as u64);
        let removed: i64 = self.redis.call_script(&inv).await?;
        Ok(removed.max(0) as u64)
    }

    /// A wallet's stored totals and the shard outbox's last entry id, read atomically and
    /// without ending anything due (reconcile).
    pub async fn snapshot(
        &self,
        account_id: &str,
        wallet: &str,
    ) -> Result<WalletSnapshot, LedgerError> {
        let shard = self.shards.of_account(account_id);
        let mut inv = self.invocation(&self.scripts.snapshot, shard);
        inv.arg(account_id).arg(wallet);
        let rows: Vec<String> = self.redis.call_script(&inv).await?;
        let mut with_name = vec![wallet.to_owned()];
        with_name.extend(rows.iter().take(7).cloned());
        let balance = reply::balances(&with_name)?
            .pop()
            .ok_or_else(|| LedgerError::Internal("empty snapshot".into()))?;
        let last_entry_id = rows.get(7).filter(|id| !id.is_empty()).cloned();
        let open_holds = rows
            .get(8)
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| LedgerError::Internal("snapshot without open holds".into()))?;
        Ok(WalletSnapshot {
            balance,
            open_holds,
            last_entry_id,
        })
    }

    /// An org wallet's allocation record (field `<member>` = allocated, `<member>:u` =
    /// used; empty when there is none) and the shard outbox's last entry id (None: nothing
    /// was added), read atomically by the snapshot script (reconcile).
    pub async fn allocation_snapshot(
        &self,
        org_id: &str,
        wallet: &str,
    ) -> Result<(Vec<(String, String)>, Option<String>), LedgerError> {
        let shard = self.shards.of_account(org_id);
        let mut inv = self.invocation(&self.scripts.snapshot, shard);
        inv.arg(org_id).arg(wallet);
        let rows: Vec<String> = self.redis.call_script(&inv).await?;
        let Some(fields) = rows.get(9..).filter(|f| f.len().is_multiple_of(2)) else {
            return Err(LedgerError::Internal(
                "snapshot without its allocation record".into(),
            ));
        };
        let last_entry_id = rows.get(7).filter(|id| !id.is_empty()).cloned();
        let fields = fields
            .chunks_exact(2)
            .map(|p| (p[0].clone(), p[1].clone()))
            .collect();
        Ok((fields, last_entry_id))
    }

    /// Every (account, wallet) with a wallet record, found by SCAN (tooling, not the hot
    /// path).
    pub async fn wallet_keys(&self) -> Result<Vec<(String, String)>, LedgerError> {
        let mut out = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = self
                .redis
                .query(
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg("{tg:*}:w:*")
                        .arg("COUNT")
                        .arg(1000),
                )
                .await?;
            for key in keys {
                // {tg:S}:w:<account>:<wallet>; account ids hold no ':'.
                if let Some(rest) = key.split_once("}:w:").map(|(_, r)| r) {
                    if let Some((account, wallet)) = rest.split_once(':') {
                        out.push((account.to_owned(), wallet.to_owned()));
                    }
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// One sweep call: ends what is due in up to `wallets_max` wallets of one shard, at
    /// most `work_max` lots expired and holds ended in all (lua/sweep.lua). The sweeper
    /// ([`sweeper::sweep_round`]) calls again while the outcome says more is due.
    pub async fn sweep_shard(
        &self,
        shard: u16,
        wallets_max: u32,
        work_max: u32,
    ) -> Result<SweepOutcome, LedgerError> {
        let mut inv = self.invocation(&self.scripts.sweep, shard);
        inv.arg(wallets_max).arg(work_max);
        let (wallets, ended, more): (u32, u32, u8) = self.redis.call_script(&inv).await?;
        Ok(SweepOutcome {
            wallets,
            ended,
            more: more == 1,
        })
    }
}

/// A script that hands a whole number to a command and answers what the command got
/// ([`Ledger::lua_numbers_intact`]).
/// `no-writes`: it runs while Redis pauses writes (`CLIENT PAUSE WRITE`, a failover) and
/// on a replica; a script without flags waits out a pause like a write.
const LUA_NUMBERS_PROBE: &str = "#!lua flags=no-writes\nreturn redis.call('ECHO', 100000000)";

/// Whether [`LUA_NUMBERS_PROBE`]'s answer is the number as written.
fn lua_numbers_intact(echoed: &str) -> bool {
    echoed == "100000000"
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Redis 7.2.0–7.2.4's answer (redis/redis#13113) fails the probe.
    #[test]
    fn numbers_in_exponent_form_are_not_intact() {
        assert!(lua_numbers_intact("100000000"));
        assert!(!lua_numbers_intact("1e+08"));
        assert!(!lua_numbers_intact("1.0e8"));
    }

    fn debit(amount: i64, inputs: Option<&str>) -> Debit {
        Debit {
            account_id: "acme".into(),
            wallet: "default".into(),
            amount,
            idempotency_key: "gw:send:r1".into(),
            operation: "send".into(),
            metadata: Metadata::new(),
            member_id: String::new(),
            price_inputs: inputs.map(str::to_owned),
            attempt_mark: None,
        }
    }

    fn hold(amount: i64, ttl_ms: i64, inputs: Option<&str>) -> Authorize {
        Authorize {
            account_id: "acme".into(),
            wallet: "default".into(),
            amount,
            ttl_ms,
            on_expiry: OnExpiry::Capture,
            idempotency_key: "gw:ocr:r1".into(),
            operation: "ocr".into(),
            metadata: Metadata::new(),
            member_id: String::new(),
            price_inputs: inputs.map(str::to_owned),
            attempt_mark: None,
        }
    }

    /// A priced charge's digest is what the request asked for, then the amount form an
    /// older tollgate recorded for it; an unpriced one's is the amount form alone.
    #[test]
    fn a_priced_charge_is_digested_by_its_inputs_then_by_its_amount() {
        let d = |c: &Debit| debit_digest(c, "");
        let priced = d(&debit(3, Some("x-pages=1:3;")));
        assert_eq!(priced.len(), 32);
        assert_eq!(&priced[16..], d(&debit(3, None)), "then the amount form");
        // Another price, the same request: the same first digest.
        let repriced = d(&debit(5, Some("x-pages=1:3;")));
        assert_eq!(priced[..16], repriced[..16]);
        assert_ne!(priced[16..], repriced[16..]);
        // Other inputs, another member, another wallet: another request.
        assert_ne!(priced[..16], d(&debit(3, Some("x-pages=1:4;")))[..16]);
        let mut member = debit(3, Some("x-pages=1:3;"));
        member.member_id = "ann".into();
        assert_ne!(priced[..16], d(&member)[..16]);
        let mut wallet = debit(3, Some("x-pages=1:3;"));
        wallet.wallet = "other".into();
        assert_ne!(priced[..16], d(&wallet)[..16]);
        assert_eq!(d(&debit(3, None)).len(), 16);

        // A hold: the TTL and the expiry policy are the book's too.
        let a = |c: &Authorize| authorize_digest(c, "");
        let placed = a(&hold(50, 60_000, Some("")));
        let mut reloaded = hold(60, 30_000, Some(""));
        reloaded.on_expiry = OnExpiry::Release;
        assert_eq!(placed[..16], a(&reloaded)[..16]);
        assert_eq!(&placed[16..], a(&hold(50, 60_000, None)));
        // A debit and a hold of the same inputs are not the same request.
        assert_ne!(
            d(&debit(50, Some("")))[..16],
            a(&hold(50, 60_000, Some("")))[..16]
        );
    }

    /// An attempt's mark follows both digest forms; the digests themselves do not change.
    #[test]
    fn a_marked_charge_sends_its_mark_after_both_digests() {
        let mut marked = debit(3, Some("x-pages=1:3;"));
        marked.attempt_mark = AttemptMark::parse("abcdefgh");
        let digest = debit_digest(&marked, "");
        assert_eq!(digest.len(), 40);
        assert_eq!(
            digest[..32],
            debit_digest(&debit(3, Some("x-pages=1:3;")), "")
        );
        assert_eq!(&digest[32..], "abcdefgh");
        let mut hold = hold(50, 60_000, Some(""));
        hold.attempt_mark = AttemptMark::parse("zzzzzzzz");
        assert!(authorize_digest(&hold, "").ends_with("zzzzzzzz"));
        // Marks: 8 letters a-z, a new one each time (but by a 26^-8 chance).
        let (a, b) = (AttemptMark::random(), AttemptMark::random());
        assert_ne!(a, b);
        assert_eq!(AttemptMark::parse(a.as_str()), Some(a));
        for bad in ["abcdefg", "abcdefghi", "ABCDEFGH", "abcdefg1", "abcdefg|"] {
            assert_eq!(AttemptMark::parse(bad), None, "{bad}");
        }
    }
}
