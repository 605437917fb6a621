//! The durable ledger: PostgreSQL (production) or SQLite (embedded default), one
//! implementation written once (`store_impl!`) over both sqlx drivers, since the SQL is the
//! same text for both (`$n` placeholders, `ON CONFLICT`, `RETURNING`, row values).
//!
//! Events are keyed by event id, so a redelivered event is a no-op (a different event under
//! a settled id is reported, `Appended::reused`, not taken as written); a per-wallet running
//! summary is updated in the same transaction, from the newly inserted events only.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Row};

use crate::ledger::event::{Deltas, EventKind, LedgerEvent, LotPiece};
use crate::webhooks::rules::{self, Rules, WalletState};

/// Default store: a SQLite file in the working directory.
pub const DEFAULT_STORE_URL: &str = "sqlite://tollgate.db";
pub const DEFAULT_POOL_CONNECTIONS: u32 = 4;
/// How long a query waits for a pooled connection before failing (and being retried).
pub const POOL_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long [`Store::migrate`] tries again a SQLite migration that found the file locked.
pub const SQLITE_MIGRATION_BUSY_WAIT: Duration = Duration::from_secs(60);
/// Rows per SQLite INSERT statement: 28 parameters a row stays under its limit of 32,766
/// (PostgreSQL binds one array per column instead).
pub const INSERT_ROWS_MAX: usize = 1000;
/// Most transactions one ListTransactions page returns.
pub const HISTORY_PAGE_MAX: u32 = 1000;

/// Schema versions, applied in order at start-up, each in its own transaction.
/// Each version is applied once, whatever the order versions arrive in.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("schema_v1.sql")),
    (2, include_str!("schema_v2.sql")),
    (3, include_str!("schema_v3.sql")),
    (4, include_str!("schema_v4.sql")),
    (5, include_str!("schema_v5.sql")),
    (6, include_str!("schema_v6.sql")),
    (7, include_str!("schema_v7.sql")),
    (8, include_str!("schema_v8.sql")),
    (9, include_str!("schema_v9.sql")),
    (10, include_str!("schema_v10.sql")),
    (11, include_str!("schema_v11.sql")),
    (12, include_str!("schema_v12.sql")),
    (13, include_str!("schema_v13.sql")),
    (14, include_str!("schema_v14.sql")),
    (15, include_str!("schema_v15.sql")),
];

/// Statements of a migration for one kind of store only (version, `kind()`, SQL), run
/// after the version's shared SQL, in its transaction.
const MIGRATION_EXTRAS: &[(i64, &str, &str)] = &[
    // Version 11's old history index: a PostgreSQL drop would take an ACCESS EXCLUSIVE
    // lock behind long readers (schema_v11.sql); SQLite's planner would prefer it to the
    // new one, and its write lock is the migration's anyway.
    (11, "sqlite", "DROP INDEX IF EXISTS tollgate_events_history"),
];

/// Columns a migration adds where they are missing, before its SQL runs: (version,
/// table, column, definition). schema_v5.sql gained `round_start_attempts` after a build
/// had shipped it without, so a database that build migrated is at version 5 without the
/// column; version 6 adds it there. SQLite has no `ADD COLUMN IF NOT EXISTS`, so the
/// runner looks first.
const MISSING_COLUMNS: &[(i64, &str, &str, &str)] = &[(
    6,
    "tollgate_webhook_deliveries",
    "round_start_attempts",
    "BIGINT NOT NULL DEFAULT 0",
)];

/// What a store url that is neither kind is told (the url itself is never repeated: it
/// may carry a password).
const BAD_URL: &str = "use postgres://… or sqlite://PATH";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("bad store url: {0}")]
    BadUrl(String),
    #[error("store unreachable: {0}")]
    Unavailable(String),
    #[error("store query failed: {0}")]
    Query(String),
    /// The store refused the data itself (SQLSTATE classes 22 and 23 in PostgreSQL: a
    /// character the database encoding lacks, a NUL byte, a value out of range, a
    /// constraint): writing the same rows again fails the same way, so the settler sets
    /// the offending event aside instead of retrying it for ever.
    #[error("store refused the data: {0}")]
    Refused(String),
    /// The database cannot hold a tollgate ledger as it is (a PostgreSQL database whose
    /// encoding is not UTF8): migrating it is refused.
    #[error("unsupported store: {0}")]
    Unsupported(String),
    #[error("store data is malformed: {0}")]
    Corrupt(String),
    /// Only from `Store::open_existing`: what the operator tools are refused (they never
    /// create a store).
    #[error("no tollgate ledger there: {0}")]
    NotInitialized(&'static str),
}

impl StoreError {
    /// A bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::BadUrl(_) => "bad_url",
            Self::Unavailable(_) => "unavailable",
            Self::Query(_) => "query",
            Self::Refused(_) => "refused",
            Self::Unsupported(_) => "unsupported",
            Self::Corrupt(_) => "corrupt",
            Self::NotInitialized(_) => "not_initialized",
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        match err {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_) => Self::Unavailable(err.to_string()),
            sqlx::Error::Database(db) if refuses_data(db.as_ref()) => Self::Refused(db.to_string()),
            other => Self::Query(other.to_string()),
        }
    }
}

/// Every kind [`StoreError::kind`] gives, for metrics registered at 0.
pub const STORE_ERROR_KINDS: [&str; 7] = [
    "unavailable",
    "query",
    "refused",
    "corrupt",
    "unsupported",
    "bad_url",
    "not_initialized",
];

/// Whether a database error is about the rows written, not the connection or the moment:
/// the same write fails the same way every time. PostgreSQL: SQLSTATE class 22 (data
/// exception: untranslatable character, NUL byte, value out of range) and 23 (integrity
/// constraint). SQLite: a constraint (19), a value too big (18) or of the wrong type (20),
/// by the primary result code. A deadlock, a serialization failure, a lock timeout or a
/// busy database are not: retried as before.
fn refuses_data(db: &dyn sqlx::error::DatabaseError) -> bool {
    if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        let code = pg.code();
        return code.starts_with("22") || code.starts_with("23");
    }
    if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        return db
            .code()
            .and_then(|code| code.parse::<i32>().ok())
            .is_some_and(|code| matches!(code & 0xff, 18..=20));
    }
    false
}

/// A wallet's totals as the store knows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub granted: i64,
    pub used: i64,
    pub expired: i64,
    pub refunded: i64,
    pub adjusted: i64,
    pub available: i64,
    pub held: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalletSummary {
    pub account_id: String,
    pub wallet: String,
    pub totals: Totals,
    pub events: i64,
    /// The stream position (ms, seq) of the wallet's newest settled event.
    pub last_position: (i64, i64),
}

/// A wallet as re-derived from its events, with its running summary from the same snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Derived {
    pub totals: Totals,
    pub events: i64,
    /// Holds opened and not ended by these events.
    pub open_holds: i64,
    /// The running summary (None when the wallet has no row yet).
    pub summary: Option<Totals>,
}

/// An API key as the durable ledger keeps it: its SHA-256, never the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRecord {
    pub key_id: String,
    pub account_id: String,
    /// The org member an org workspace key acts for ("" = none).
    pub member_id: String,
    pub digest: String,
    pub name: String,
    pub created_at_ms: i64,
    /// 0 while active.
    pub revoked_at_ms: i64,
    /// The owner or admin who made an org key ("" for a personal key, or a key saved
    /// before schema v9).
    pub created_by: String,
}

/// A point in the (account, wallet, stream position) order of `shard_events`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalletPosition {
    pub account_id: String,
    pub wallet: String,
    pub stream_ms: i64,
    pub stream_seq: i64,
}

/// A history query: one account, newest first: by created_at_ms, then by stream position
/// (ms, seq, as numbers), then shard.
#[derive(Debug, Clone, Default)]
pub struct HistoryQuery {
    pub account_id: String,
    pub wallet: Option<String>,
    pub kinds: Vec<EventKind>,
    /// Inclusive lower bound on created_at_ms.
    pub from_ms: Option<i64>,
    /// Exclusive upper bound on created_at_ms.
    pub to_ms: Option<i64>,
    pub page_size: u32,
    /// Continue after this (created_at_ms, event_id): the event id gives the position.
    pub after: Option<(i64, String)>,
}

#[derive(Debug, Clone, Default)]
pub struct HistoryPage {
    pub events: Vec<LedgerEvent>,
    pub next: Option<(i64, String)>,
}

/// The history's page order. Ties on created_at_ms in stream order, numerically: the
/// event id is text, and `…-9` sorted above `…-11` (events one script wrote share a ms).
const HISTORY_ORDER: &str =
    "ORDER BY created_at_ms DESC, stream_ms DESC, stream_seq DESC, shard DESC";

const EVENT_COLUMNS: &str = "event_id, shard, stream_ms, stream_seq, kind, account_id, wallet, \
    amount, available_after, held_after, lots, extra, hold_id, charge_id, idempotency_key, \
    operation, metadata, created_at_ms, version, member, actor";

/// Where `hold_event` finds a hold's event ($1 account, $2 wallet, $3 hold id): the
/// partial index of hold events (schema_v11.sql) answers it.
const HOLD_EVENT_FROM: &str = "FROM tollgate_events WHERE account_id = $1 AND wallet = $2 \
    AND hold_id = $3 AND kind = 'hold' LIMIT 1";

const SUMMARY_UPSERT_TAIL: &str = " ON CONFLICT (account_id, wallet) DO UPDATE SET \
    granted = tollgate_wallets.granted + excluded.granted, \
    used = tollgate_wallets.used + excluded.used, \
    expired = tollgate_wallets.expired + excluded.expired, \
    refunded = tollgate_wallets.refunded + excluded.refunded, \
    adjusted = tollgate_wallets.adjusted + excluded.adjusted, \
    events = tollgate_wallets.events + excluded.events, \
    available = CASE WHEN (excluded.last_stream_ms, excluded.last_stream_seq) > \
        (tollgate_wallets.last_stream_ms, tollgate_wallets.last_stream_seq) \
        THEN excluded.available ELSE tollgate_wallets.available END, \
    held = CASE WHEN (excluded.last_stream_ms, excluded.last_stream_seq) > \
        (tollgate_wallets.last_stream_ms, tollgate_wallets.last_stream_seq) \
        THEN excluded.held ELSE tollgate_wallets.held END, \
    last_stream_ms = CASE WHEN (excluded.last_stream_ms, excluded.last_stream_seq) > \
        (tollgate_wallets.last_stream_ms, tollgate_wallets.last_stream_seq) \
        THEN excluded.last_stream_ms ELSE tollgate_wallets.last_stream_ms END, \
    last_stream_seq = CASE WHEN (excluded.last_stream_ms, excluded.last_stream_seq) > \
        (tollgate_wallets.last_stream_ms, tollgate_wallets.last_stream_seq) \
        THEN excluded.last_stream_seq ELSE tollgate_wallets.last_stream_seq END, \
    last_grant = CASE WHEN excluded.last_grant > 0 AND \
        (excluded.last_grant_ms, excluded.last_grant_seq) > \
        (tollgate_wallets.last_grant_ms, tollgate_wallets.last_grant_seq) \
        THEN excluded.last_grant ELSE tollgate_wallets.last_grant END, \
    last_grant_ms = CASE WHEN excluded.last_grant > 0 AND \
        (excluded.last_grant_ms, excluded.last_grant_seq) > \
        (tollgate_wallets.last_grant_ms, tollgate_wallets.last_grant_seq) \
        THEN excluded.last_grant_ms ELSE tollgate_wallets.last_grant_ms END, \
    last_grant_seq = CASE WHEN excluded.last_grant > 0 AND \
        (excluded.last_grant_ms, excluded.last_grant_seq) > \
        (tollgate_wallets.last_grant_ms, tollgate_wallets.last_grant_seq) \
        THEN excluded.last_grant_seq ELSE tollgate_wallets.last_grant_seq END, \
    low_alerted = CASE WHEN excluded.low_alerted >= 0 AND \
        (excluded.last_stream_ms, excluded.last_stream_seq) > \
        (tollgate_wallets.last_stream_ms, tollgate_wallets.last_stream_seq) \
        THEN excluded.low_alerted ELSE tollgate_wallets.low_alerted END, \
    exhausted_alerted = CASE WHEN excluded.exhausted_alerted >= 0 AND \
        (excluded.last_stream_ms, excluded.last_stream_seq) > \
        (tollgate_wallets.last_stream_ms, tollgate_wallets.last_stream_seq) \
        THEN excluded.exhausted_alerted ELSE tollgate_wallets.exhausted_alerted END";

/// Per-wallet aggregate of a batch's new events.
#[derive(Debug, Default)]
struct WalletBatch {
    deltas: Deltas,
    events: i64,
    last: (i64, i64),
    available: i64,
    held: i64,
    /// Amount of the batch's newest grant (0: none), and where it is in the outbox: the
    /// store keeps it only when newer than the grant it has (schema_v15.sql), not when
    /// the batch as a whole is newer (a claimed older batch mixed with newer events).
    last_grant: i64,
    last_grant_at: (i64, i64),
    /// Whether any of the batch's events added credits (what re-arms an alert).
    credits_added: bool,
    /// Alert state after the batch, when webhooks are on.
    alerts: Option<WalletState>,
}

impl WalletBatch {
    /// Alert flags as stored: -1 leaves the stored value alone. Not evaluated (webhooks
    /// off for this settler: no thresholds to judge by), a batch that added credits
    /// re-arms both alerts, as the rules would have if those credits brought the balance
    /// back; left alone, a wallet alerted before and topped up while webhooks were off
    /// stayed "alerted" and its next crossing was never told. Re-arming without knowing
    /// the threshold can tell a crossing twice (credits added that did not bring the
    /// balance back above it): a duplicate rather than a missed alert. A batch that only
    /// took credits keeps the flags, as the rules would.
    fn alert_flags(&self) -> (i64, i64) {
        match &self.alerts {
            Some(a) => (i64::from(a.low_alerted), i64::from(a.exhausted_alerted)),
            None if self.credits_added => (0, 0),
            None => (-1, -1),
        }
    }
}

/// What a batch write did.
#[derive(Debug, Clone, Default)]
pub struct Appended {
    /// Ids of the events this batch wrote for the first time.
    pub new_events: HashSet<String>,
    /// Open holds after the batch, when the batch opened or ended any.
    pub holds_open: Option<i64>,
    /// Webhook deliveries created, per `WebhookType` (by discriminant).
    pub deliveries: [u64; 5],
    /// Ids of the batch's events refused by their shard's fence: read from a Redis
    /// incarnation older than the one a restore rebuilt (schema_v5.sql). Not written.
    pub fenced: Vec<String>,
    /// The batch's events whose id the store already holds for a different event (not
    /// written; see `reused_ids`).
    pub reused: Vec<ReusedId>,
}

/// An event whose id the store already holds for another event: a Redis rolled back with
/// its clock behind the lost incarnation's handed a settled event's id to a new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReusedId {
    pub event_id: String,
    /// What the store holds under the id ("debit of 7").
    pub held: String,
}

/// Per shard (by index), the epoch marker of the Redis a batch's events of that shard were
/// read from, read before them (None: the shard had none).
pub type ShardEpochs = [Option<i64>];

/// Change in open holds made by events.
fn holds_delta<'a>(events: impl Iterator<Item = &'a LedgerEvent>) -> i64 {
    events
        .map(|e| match e.kind {
            EventKind::Hold => 1,
            EventKind::Capture | EventKind::Release | EventKind::ExpireHold => -1,
            _ => 0,
        })
        .sum()
}

fn aggregate<'a>(
    events: impl Iterator<Item = &'a LedgerEvent>,
) -> BTreeMap<(&'a str, &'a str), WalletBatch> {
    let mut wallets: BTreeMap<(&str, &str), WalletBatch> = BTreeMap::new();
    // Membership events belong to no wallet: no summary row.
    for e in events.filter(|e| !e.wallet.is_empty()) {
        let w = wallets
            .entry((e.account_id.as_str(), e.wallet.as_str()))
            .or_default();
        w.deltas += e.deltas();
        w.events += 1;
        let position = e.stream_position();
        if position >= w.last {
            w.last = position;
            w.available = e.available_after;
            w.held = e.held_after;
        }
        w.credits_added |= rules::adds_credits(e);
        if e.kind == EventKind::Grant && position >= w.last_grant_at {
            w.last_grant_at = position;
            w.last_grant = e.amount;
        }
    }
    wallets
}

fn event_from_row<R: Row>(row: &R) -> Result<LedgerEvent, StoreError>
where
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    let text = |name: &str| -> Result<String, StoreError> {
        row.try_get::<String, _>(name)
            .map_err(|e| StoreError::Corrupt(e.to_string()))
    };
    let int = |name: &str| -> Result<i64, StoreError> {
        row.try_get::<i64, _>(name)
            .map_err(|e| StoreError::Corrupt(e.to_string()))
    };
    let event_id = text("event_id")?;
    let kind_name = text("kind")?;
    Ok(LedgerEvent {
        stream_id: format!("{}-{}", int("stream_ms")?, int("stream_seq")?),
        kind: EventKind::parse(&kind_name)
            .ok_or_else(|| StoreError::Corrupt(format!("kind {kind_name:?} of {event_id}")))?,
        account_id: text("account_id")?,
        wallet: text("wallet")?,
        amount: int("amount")?,
        available_after: int("available_after")?,
        held_after: int("held_after")?,
        lots: LotPiece::parse_list(&text("lots")?)
            .ok_or_else(|| StoreError::Corrupt(format!("lots of {event_id}")))?,
        extra: text("extra")?,
        hold_id: text("hold_id")?,
        charge_id: text("charge_id")?,
        idempotency_key: text("idempotency_key")?,
        operation: text("operation")?,
        metadata: text("metadata")?,
        created_at_ms: int("created_at_ms")?,
        version: u32::try_from(int("version")?)
            .map_err(|_| StoreError::Corrupt(format!("version of {event_id}")))?,
        member: text("member")?,
        actor: text("actor")?,
        event_id,
    })
}

/// The epoch marker of the Redis an event was read from, as the store keeps it (0: none
/// given, or the shard had no marker there).
fn read_epoch(epochs: Option<&ShardEpochs>, e: &LedgerEvent) -> i64 {
    epochs
        .and_then(|epochs| epochs.get(usize::from(e.shard())).copied().flatten())
        .unwrap_or(0)
}

/// Where an event id `<shard>-<ms>-<seq>` sits in the history order after its
/// created_at_ms: (shard, stream ms, stream seq).
fn history_position(event_id: &str) -> Option<(i64, i64, i64)> {
    let mut parts = event_id.splitn(3, '-').map(|n| n.parse::<i64>().ok());
    Some((parts.next()??, parts.next()??, parts.next()??))
}

fn lots_text(lots: &[LotPiece]) -> String {
    lots.iter()
        .map(|p| match p.score {
            Some(score) => format!("{}:{}:{score}", p.lot_id, p.amount),
            None => format!("{}:{}", p.lot_id, p.amount),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// What a durable ledger store does. PostgreSQL and SQLite implement it with the same
/// code (`store_impl!` writes the methods once, `ledger_store_trait!` exposes them as
/// this trait); [`Store`] picks one from the URL.
#[allow(async_fn_in_trait)]
pub trait LedgerStore {
    /// "postgres" or "sqlite".
    fn kind(&self) -> &'static str;
    /// Applies the schema migrations that are missing, in order.
    async fn migrate(&self) -> Result<(), StoreError>;
    /// Writes a batch in one transaction; returns how many events were new.
    async fn append(&self, events: &[LedgerEvent]) -> Result<u64, StoreError>;
    /// One page of an account's events, newest first.
    async fn history(&self, q: &HistoryQuery) -> Result<HistoryPage, StoreError>;
    async fn event(&self, event_id: &str) -> Result<Option<LedgerEvent>, StoreError>;
    /// Every wallet's running summary.
    async fn wallets(&self) -> Result<Vec<WalletSummary>, StoreError>;
    /// A wallet's totals re-derived from its events, up to a stream position (inclusive)
    /// or all of them, and its running summary, read in one snapshot.
    async fn derive(
        &self,
        account_id: &str,
        wallet: &str,
        upto: Option<(i64, i64)>,
    ) -> Result<Derived, StoreError>;
    async fn ping(&self) -> Result<(), StoreError>;
    async fn count_events(&self) -> Result<i64, StoreError>;
    /// One page of a shard's events in (account, wallet, stream position) order, after the
    /// given (account, wallet, stream_ms, stream_seq): a wallet's events arrive together
    /// and in the order they happened (restore).
    async fn shard_events(
        &self,
        shard: u16,
        after: Option<&WalletPosition>,
        limit: u32,
    ) -> Result<Vec<LedgerEvent>, StoreError>;
    /// Records an API key (or its revocation): insert, or update the revocation time.
    async fn save_api_key(&self, key: &ApiKeyRecord) -> Result<(), StoreError>;
    /// Every API key (restore).
    async fn api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError>;
    /// Whether any event of this shard was ever settled (a Redis shard without its epoch
    /// marker then lost data; otherwise it is simply new).
    async fn shard_has_events(&self, shard: u16) -> Result<bool, StoreError>;
}

/// Writes the store's methods once for a sqlx driver.
macro_rules! store_impl {
    ($store:ident, $db:ty, $kind:literal, $migration_begin:expr, $migration_lock:expr, $snapshot:expr, $has_column:expr) => {
        impl $store {
            pub fn kind(&self) -> &'static str {
                $kind
            }

            /// A migration's transaction, begun with `$migration_begin` where it is not
            /// the driver's plain `BEGIN`.
            async fn begin_migration(
                &self,
            ) -> Result<sqlx::Transaction<'static, $db>, StoreError> {
                Ok(match $migration_begin {
                    Some(begin) => self.pool.begin_with(begin).await?,
                    None => self.pool.begin().await?,
                })
            }

            pub async fn migrate(&self) -> Result<(), StoreError> {
                self.check_database().await?;
                // One transaction under the migration lock, taken once: concurrent first
                // starts would otherwise race on creating the table (PostgreSQL's `IF NOT
                // EXISTS` is no lock: the loser fails on the catalog's unique index,
                // pg_type_typname_nsp_index); and on SQLite, a write lock taken once per
                // version by each of several processes starved some of them past the busy
                // timeout ("database is locked"). All versions commit together.
                let mut tx = self.begin_migration().await?;
                if let Some(lock) = $migration_lock {
                    sqlx::raw_sql(lock).execute(&mut *tx).await?;
                }
                sqlx::raw_sql(
                    "CREATE TABLE IF NOT EXISTS tollgate_schema_migrations \
                     (version BIGINT PRIMARY KEY, applied_at_ms BIGINT NOT NULL)",
                )
                .execute(&mut *tx)
                .await?;
                let mut applied_now = Vec::new();
                for (version, sql) in MIGRATIONS {
                    let applied: Option<i64> = sqlx::query_scalar(
                        "SELECT version FROM tollgate_schema_migrations WHERE version = $1",
                    )
                    .bind(*version)
                    .fetch_optional(&mut *tx)
                    .await?;
                    if applied.is_some() {
                        continue;
                    }
                    for (_, table, column, definition) in
                        MISSING_COLUMNS.iter().filter(|m| m.0 == *version)
                    {
                        let found: i64 = sqlx::query_scalar($has_column)
                            .bind(*table)
                            .bind(*column)
                            .fetch_one(&mut *tx)
                            .await?;
                        if found == 0 {
                            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                                "ALTER TABLE {table} ADD COLUMN {column} {definition}"
                            )))
                            .execute(&mut *tx)
                            .await?;
                        }
                    }
                    sqlx::raw_sql(*sql).execute(&mut *tx).await?;
                    for (_, _, extra) in MIGRATION_EXTRAS
                        .iter()
                        .filter(|m| m.0 == *version && m.1 == $kind)
                    {
                        sqlx::raw_sql(*extra).execute(&mut *tx).await?;
                    }
                    sqlx::query(
                        "INSERT INTO tollgate_schema_migrations (version, applied_at_ms) \
                         VALUES ($1, $2)",
                    )
                    .bind(*version)
                    .bind(crate::ledger::wall_clock_ms())
                    .execute(&mut *tx)
                    .await?;
                    applied_now.push(*version);
                }
                tx.commit().await?;
                for version in applied_now {
                    tracing::info!(store = self.kind(), version, "applied schema migration");
                }
                Ok(())
            }

            /// Writes a batch in one transaction: the events (each once), the wallets'
            /// running summaries and, with webhook `rules`, the deliveries the new events
            /// make. Only events written for the first time count for anything.
            ///
            /// With `epochs` (what a settler read), an event whose shard's fence is newer
            /// than the Redis it was read from is refused (`Appended::fenced`): the shard
            /// was restored since, without it.
            pub async fn append_batch(
                &self,
                events: &[LedgerEvent],
                epochs: Option<&ShardEpochs>,
                rules: Option<&Rules>,
            ) -> Result<Appended, StoreError> {
                if events.is_empty() {
                    return Ok(Appended::default());
                }
                // A fixed order (event id) keeps concurrent settlers' lock orders equal.
                let mut sorted: Vec<&LedgerEvent> = events.iter().collect();
                sorted.sort_by(|a, b| a.event_id.cmp(&b.event_id));
                sorted.dedup_by(|a, b| a.event_id == b.event_id);
                let settled_at = crate::ledger::wall_clock_ms();
                let mut tx = self.pool.begin().await?;
                let mut fenced = Vec::new();
                let mut recorded = std::collections::BTreeSet::new();
                if let Some(epochs) = epochs {
                    let shards: std::collections::BTreeSet<u16> =
                        sorted.iter().map(|e| e.shard()).collect();
                    let fences = self.fences(&mut tx, &shards).await?;
                    sorted.retain(|e| {
                        let shard = e.shard();
                        let read_from = epochs.get(usize::from(shard)).copied().flatten();
                        // No marker where the events were read (deleted by hand, or
                        // evicted): they are that Redis's own, since scripts write
                        // nothing to a shard without one.
                        let stale = fences
                            .get(&shard)
                            .is_some_and(|fence| read_from.is_some_and(|epoch| epoch < *fence));
                        if stale {
                            fenced.push(e.event_id.clone());
                        }
                        !stale
                    });
                    if sorted.is_empty() {
                        tx.commit().await?;
                        return Ok(Appended {
                            fenced,
                            ..Appended::default()
                        });
                    }
                    recorded = self.record_epochs(&mut tx, &sorted, epochs).await?;
                }
                let inserted =
                    $store::insert_events(&mut tx, &sorted, epochs, settled_at).await?;
                // Only when some id was already there (a redelivery, or an id reused): the
                // common batch makes no extra round trip.
                let reused = if inserted.len() < sorted.len() {
                    self.reused_ids(&mut tx, &sorted, &inserted).await?
                } else {
                    Vec::new()
                };
                let new_events: Vec<&LedgerEvent> = sorted
                    .iter()
                    .copied()
                    .filter(|e| inserted.contains(&e.event_id))
                    .collect();
                let mut wallets = aggregate(new_events.iter().copied());
                let mut deliveries = [0u64; 5];
                if let Some(rules) = rules.filter(|_| !wallets.is_empty()) {
                    let keys: Vec<(String, String)> = wallets
                        .keys()
                        .map(|(a, w)| ((*a).to_owned(), (*w).to_owned()))
                        .collect();
                    let priors = self.wallet_states(&mut tx, &keys).await?;
                    let overrides = self.threshold_overrides(&mut tx, &keys).await?;
                    let mut per_wallet: BTreeMap<(&str, &str), Vec<&LedgerEvent>> =
                        BTreeMap::new();
                    for e in new_events.iter().filter(|e| !e.wallet.is_empty()) {
                        per_wallet
                            .entry((e.account_id.as_str(), e.wallet.as_str()))
                            .or_default()
                            .push(e);
                    }
                    let mut made = Vec::new();
                    for ((account, wallet), mut list) in per_wallet {
                        list.sort_by_key(|e| e.stream_position());
                        let key = (account.to_owned(), wallet.to_owned());
                        let prior = priors.get(&key).copied().unwrap_or_default();
                        let threshold = rules.threshold(wallet, overrides.get(&key).copied());
                        let (out, state) = rules::derive(rules, threshold, &prior, &list);
                        made.extend(out);
                        if let Some(w) = wallets.get_mut(&(account, wallet)) {
                            w.alerts = Some(state);
                        }
                    }
                    deliveries = self.insert_deliveries(&mut tx, &made).await?;
                }
                // While lot.expiring is not delivered (or webhooks are off), the lots
                // tracked before are kept current, and no new one is tracked.
                let tracks_lots = rules.is_some_and(Rules::tracks_lots);
                self.track_lots(&mut tx, &new_events, !tracks_lots).await?;
                let rows: Vec<_> = wallets.into_iter().collect();
                $store::upsert_wallets(&mut tx, &rows).await?;
                let delta = holds_delta(new_events.iter().copied());
                let holds_open = if delta != 0 {
                    sqlx::query_scalar::<_, i64>(
                        "UPDATE tollgate_counters SET value = value + $1 \
                         WHERE name = 'holds_open' RETURNING value",
                    )
                    .bind(delta)
                    .fetch_optional(&mut *tx)
                    .await?
                } else {
                    None
                };
                tx.commit().await?;
                // Only once they are committed: a batch whose commit failed is retried
                // and must record its markers again.
                self.remember_epochs(recorded);
                Ok(Appended {
                    new_events: inserted,
                    holds_open,
                    deliveries,
                    fenced,
                    reused,
                })
            }

            /// Of `events`, those not `inserted` (their id was there) whose stored event is
            /// another one: a different kind, account, wallet, amount, time or lots. A
            /// redelivered event (a settler died before its `XACK`, a claimed batch) is the
            /// same, and counts as already written. A different one is an id reused by a
            /// Redis that came back from an older state with its clock behind the lost
            /// incarnation's (docs/ARCHITECTURE.md, "Redis loss decisions"): skipped
            /// as already written, its charge would be missing from the durable ledger
            /// without a trace.
            async fn reused_ids(
                &self,
                tx: &mut sqlx::Transaction<'_, $db>,
                events: &[&LedgerEvent],
                inserted: &HashSet<String>,
            ) -> Result<Vec<ReusedId>, StoreError> {
                let held: Vec<&LedgerEvent> = events
                    .iter()
                    .copied()
                    .filter(|e| !inserted.contains(&e.event_id))
                    .collect();
                let mut reused = Vec::new();
                for chunk in held.chunks(INSERT_ROWS_MAX) {
                    let mut select = QueryBuilder::<$db>::new(
                        "SELECT event_id, kind, account_id, wallet, amount, created_at_ms, lots \
                         FROM tollgate_events WHERE event_id IN (",
                    );
                    let mut list = select.separated(", ");
                    for e in chunk {
                        list.push_bind(e.event_id.clone());
                    }
                    select.push(")");
                    let rows: Vec<(String, String, String, String, i64, i64, String)> =
                        select.build_query_as().fetch_all(&mut **tx).await?;
                    let stored: HashMap<&str, _> = rows
                        .iter()
                        .map(|(id, kind, account, wallet, amount, at, lots)| {
                            (id.as_str(), (kind, account, wallet, *amount, *at, lots))
                        })
                        .collect();
                    for e in chunk {
                        let Some((kind, account, wallet, amount, at, lots)) =
                            stored.get(e.event_id.as_str())
                        else {
                            continue;
                        };
                        let same_lots = LotPiece::parse_list(lots)
                            .is_some_and(|stored| LotPiece::same_draws(&stored, &e.lots));
                        let same = kind.as_str() == e.kind.as_str()
                            && **account == e.account_id
                            && **wallet == e.wallet
                            && *amount == e.amount
                            && *at == e.created_at_ms
                            && same_lots;
                        if !same {
                            reused.push(ReusedId {
                                event_id: e.event_id.clone(),
                                held: format!("{kind} of {amount}"),
                            });
                        }
                    }
                }
                Ok(reused)
            }

            /// The fences (above 0) of `shards`, locked against a restore raising them
            /// until this transaction ends: each shard's row is made first if missing (in
            /// shard order, so concurrent settlers wait rather than deadlock), then read
            /// `FOR SHARE` in PostgreSQL (settlers do not block each other); SQLite has one
            /// writer at a time, and a transaction whose reads a restore's write has since
            /// made stale fails to write (and is retried). Every row is locked, a fence of
            /// 0 too (left out only here, in Rust): PostgreSQL locks only the rows a
            /// `FOR SHARE` returns, and a shard's first restore raises a row still at 0, so
            /// it would not wait for a batch in flight that read the old Redis.
            async fn fences(
                &self,
                tx: &mut sqlx::Transaction<'_, $db>,
                shards: &std::collections::BTreeSet<u16>,
            ) -> Result<BTreeMap<u16, i64>, StoreError> {
                if shards.is_empty() {
                    return Ok(BTreeMap::new());
                }
                let mut insert = QueryBuilder::<$db>::new(
                    "INSERT INTO tollgate_shard_fences (shard, epoch) ",
                );
                insert.push_values(shards, |mut row, shard| {
                    row.push_bind(i64::from(*shard)).push_bind(0i64);
                });
                insert.push(" ON CONFLICT (shard) DO NOTHING");
                insert.build().execute(&mut **tx).await?;
                let mut select = QueryBuilder::<$db>::new(
                    "SELECT shard, epoch FROM tollgate_shard_fences WHERE shard IN (",
                );
                let mut list = select.separated(", ");
                for shard in shards {
                    list.push_bind(i64::from(*shard));
                }
                select.push(")");
                if $kind == "postgres" {
                    select.push(" FOR SHARE");
                }
                let rows: Vec<(i64, i64)> = select.build_query_as().fetch_all(&mut **tx).await?;
                Ok(rows
                    .into_iter()
                    .filter(|(_, epoch)| *epoch > 0)
                    .filter_map(|(shard, epoch)| Some((u16::try_from(shard).ok()?, epoch)))
                    .collect())
            }

            /// Records in `tollgate_shard_epochs` the markers (above 0) the batch's
            /// `events` (those its fences let through, new or already settled) were read
            /// under, for `raise_fence`; returns the ones written, for `remember_epochs` once the
            /// transaction has committed. A marker this store object has already
            /// committed is not written again: a Redis incarnation's first batch of a
            /// shard writes one row, every later batch nothing.
            ///
            /// After `fences`, so a restore's `raise_fence` (which holds the fence row
            /// `FOR UPDATE` while it reads this table) waits for the batch and sees its
            /// rows. Two settlers writing the same new (shard, marker) at once: in
            /// PostgreSQL the second's `ON CONFLICT DO NOTHING` waits for the first's
            /// transaction to end (then does nothing, or writes the row if the first
            /// rolled back). No deadlock: for the first to wait in turn for the second,
            /// it would need a lock the second holds, and while the second waits here it
            /// holds only its fence rows (`FOR SHARE` does not conflict with `FOR SHARE`;
            /// a fence row the second made, the first would have waited for in `fences`,
            /// before writing any marker row, so it could not be holding the one the
            /// second waits for) and the marker rows it wrote before in this statement,
            /// which both write in (shard, marker) order, so they cannot each hold a
            /// marker row the other waits for. The first's later writes (events,
            /// summaries, counters) touch nothing the second has written yet. A restore's `FOR UPDATE` waits for both and holds nothing they need.
            /// SQLite has one writer at a time (taken by the insert in `fences`).
            async fn record_epochs(
                &self,
                tx: &mut sqlx::Transaction<'_, $db>,
                events: &[&LedgerEvent],
                epochs: &ShardEpochs,
            ) -> Result<std::collections::BTreeSet<(u16, i64)>, StoreError> {
                let new: std::collections::BTreeSet<(u16, i64)> = {
                    let seen = self
                        .seen_epochs
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    events
                        .iter()
                        .map(|e| (e.shard(), read_epoch(Some(epochs), e)))
                        .filter(|key| key.1 > 0 && !seen.contains(key))
                        .collect()
                };
                if new.is_empty() {
                    return Ok(new);
                }
                let mut insert = QueryBuilder::<$db>::new(
                    "INSERT INTO tollgate_shard_epochs (shard, epoch) ",
                );
                insert.push_values(&new, |mut row, (shard, epoch)| {
                    row.push_bind(i64::from(*shard)).push_bind(*epoch);
                });
                insert.push(" ON CONFLICT (shard, epoch) DO NOTHING");
                insert.build().execute(&mut **tx).await?;
                Ok(new)
            }

            /// Notes markers `record_epochs` wrote in a transaction that has committed.
            fn remember_epochs(&self, recorded: std::collections::BTreeSet<(u16, i64)>) {
                if recorded.is_empty() {
                    return;
                }
                self.seen_epochs
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .extend(recorded);
            }

            /// Raises a shard's fence for a restore and returns it: events read from a
            /// Redis whose epoch marker of the shard is older are refused from now on, and
            /// the restore gives the rebuilt shard that value as its marker. The new fence
            /// is strictly above the previous one and above the marker of every Redis an
            /// already settled event of the shard was read from, and at least `now` (the
            /// restoring host's clock, ms): with clocks that differ between hosts, `now`
            /// alone could leave the fence at (or below) a lost incarnation's marker, and
            /// a late batch of it would be taken. In one transaction, which waits for the
            /// batches being written that read the fence before (they hold its row
            /// `FOR SHARE` in PostgreSQL; SQLite has one writer, taken by the first
            /// statement), so their events count.
            pub async fn raise_fence(&self, shard: u16, now: i64) -> Result<i64, StoreError> {
                let shard = i64::from(shard);
                let mut tx = self.pool.begin().await?;
                sqlx::query(
                    "INSERT INTO tollgate_shard_fences (shard, epoch) VALUES ($1, 0) \
                     ON CONFLICT (shard) DO NOTHING",
                )
                .bind(shard)
                .execute(&mut *tx)
                .await?;
                let lock = if $kind == "postgres" {
                    "SELECT epoch FROM tollgate_shard_fences WHERE shard = $1 FOR UPDATE"
                } else {
                    "SELECT epoch FROM tollgate_shard_fences WHERE shard = $1"
                };
                let previous: i64 = sqlx::query_scalar(lock)
                    .bind(shard)
                    .fetch_one(&mut *tx)
                    .await?;
                // A statement of its own, after the lock: it sees the batches it waited for.
                // The markers batches recorded (record_epochs), a primary-key range read:
                // the same as MAX(redis_epoch) over the shard's events, which would scan
                // them (no index) while every settler batch of the shard waits.
                let settled: i64 = sqlx::query_scalar(
                    "SELECT COALESCE(MAX(epoch), 0) FROM tollgate_shard_epochs WHERE shard = $1",
                )
                .bind(shard)
                .fetch_one(&mut *tx)
                .await?;
                let fence = now
                    .max(previous.saturating_add(1))
                    .max(settled.saturating_add(1));
                sqlx::query("UPDATE tollgate_shard_fences SET epoch = $2 WHERE shard = $1")
                    .bind(shard)
                    .bind(fence)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(fence)
            }

            /// Writes a batch in one transaction; returns how many events were new.
            pub async fn append(&self, events: &[LedgerEvent]) -> Result<u64, StoreError> {
                Ok(self.append_batch(events, None, None).await?.new_events.len() as u64)
            }

            /// Open holds, as counted from settled events.
            pub async fn holds_open(&self) -> Result<i64, StoreError> {
                Ok(sqlx::query_scalar::<_, i64>(
                    "SELECT value FROM tollgate_counters WHERE name = 'holds_open'",
                )
                .fetch_optional(&self.pool)
                .await?
                .unwrap_or(0))
            }

            pub async fn history(&self, q: &HistoryQuery) -> Result<HistoryPage, StoreError> {
                let page_size = q.page_size.clamp(1, HISTORY_PAGE_MAX);
                let rows = Self::history_query("", q, page_size)?
                    .build()
                    .fetch_all(&self.pool)
                    .await?;
                let mut events = rows
                    .iter()
                    .map(event_from_row)
                    .collect::<Result<Vec<_>, _>>()?;
                let next = if events.len() > page_size as usize {
                    events.truncate(page_size as usize);
                    events.last().map(|e| (e.created_at_ms, e.event_id.clone()))
                } else {
                    None
                };
                Ok(HistoryPage { events, next })
            }

            /// The query of a history page (`page_size` + 1 rows), after `prefix` (the
            /// tests' EXPLAIN). A `kinds` filter of one kind reads the kind's index
            /// (schema_v12.sql) in page order; of several, one branch per kind, each at
            /// most a page off that index, merged in page order: `kind IN (…)` could not
            /// read any index in page order, and read every event of those kinds or of
            /// the account.
            fn history_query(
                prefix: &str,
                q: &HistoryQuery,
                page_size: u32,
            ) -> Result<QueryBuilder<$db>, StoreError> {
                let mut kinds: Vec<&'static str> = q.kinds.iter().map(|k| k.as_str()).collect();
                kinds.sort_unstable();
                kinds.dedup();
                // Every kind is no filter (and no branch per kind).
                if kinds.len() == EventKind::ALL.len() {
                    kinds.clear();
                }
                let limit = i64::from(page_size) + 1;
                let mut qb = QueryBuilder::<$db>::new(prefix);
                if kinds.len() < 2 {
                    Self::history_branch(&mut qb, q, kinds.first().copied(), limit)?;
                    return Ok(qb);
                }
                qb.push(format!("SELECT {EVENT_COLUMNS} FROM ("));
                for (n, kind) in kinds.iter().enumerate() {
                    if n > 0 {
                        qb.push(format!(" UNION ALL SELECT {EVENT_COLUMNS} FROM ("));
                    }
                    Self::history_branch(&mut qb, q, Some(kind), limit)?;
                    qb.push(format!(") AS k{n}"));
                }
                qb.push(format!(" {HISTORY_ORDER} LIMIT ")).push_bind(limit);
                Ok(qb)
            }

            /// One account's events of `q` (of one kind, if given) after its cursor, in
            /// page order, `limit` of them.
            fn history_branch(
                qb: &mut QueryBuilder<$db>,
                q: &HistoryQuery,
                kind: Option<&'static str>,
                limit: i64,
            ) -> Result<(), StoreError> {
                qb.push(format!(
                    "SELECT {EVENT_COLUMNS} FROM tollgate_events WHERE account_id = "
                ));
                qb.push_bind(q.account_id.clone());
                if let Some(kind) = kind {
                    qb.push(" AND kind = ").push_bind(kind);
                }
                if let Some(wallet) = &q.wallet {
                    qb.push(" AND wallet = ").push_bind(wallet.clone());
                }
                if let Some(from) = q.from_ms {
                    qb.push(" AND created_at_ms >= ").push_bind(from);
                }
                if let Some(to) = q.to_ms {
                    qb.push(" AND created_at_ms < ").push_bind(to);
                }
                if let Some((at, id)) = &q.after {
                    let (shard, ms, seq) = history_position(id).ok_or_else(|| {
                        StoreError::Query(format!("a history page starts after {id:?}, not an event id"))
                    })?;
                    // The `<=` bound is implied by what follows, but it is what the
                    // history index's range starts at: without it the OR was only a
                    // filter, and page k of an account read (and dropped) every event of
                    // the k-1 pages before it (456 ms, 100,000 rows read, half way through
                    // a 200,000-event account).
                    qb.push(" AND created_at_ms <= ")
                        .push_bind(*at)
                        .push(" AND (created_at_ms < ")
                        .push_bind(*at)
                        .push(" OR (created_at_ms = ")
                        .push_bind(*at)
                        .push(" AND (stream_ms, stream_seq, shard) < (")
                        .push_bind(ms)
                        .push(", ")
                        .push_bind(seq)
                        .push(", ")
                        .push_bind(shard)
                        .push(")))");
                }
                qb.push(format!(" {HISTORY_ORDER} LIMIT ")).push_bind(limit);
                Ok(())
            }

            pub async fn event(&self, event_id: &str) -> Result<Option<LedgerEvent>, StoreError> {
                let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {EVENT_COLUMNS} FROM tollgate_events WHERE event_id = $1"
                )))
                .bind(event_id.to_owned())
                .fetch_optional(&self.pool)
                .await?;
                row.as_ref().map(event_from_row).transpose()
            }

            /// The event that opened a hold of a wallet.
            pub async fn hold_event(
                &self,
                account_id: &str,
                wallet: &str,
                hold_id: &str,
            ) -> Result<Option<LedgerEvent>, StoreError> {
                let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {EVENT_COLUMNS} {HOLD_EVENT_FROM}"
                )))
                .bind(account_id.to_owned())
                .bind(wallet.to_owned())
                .bind(hold_id.to_owned())
                .fetch_optional(&self.pool)
                .await?;
                row.as_ref().map(event_from_row).transpose()
            }

            pub async fn wallets(&self) -> Result<Vec<WalletSummary>, StoreError> {
                let rows = sqlx::query(
                    "SELECT account_id, wallet, granted, used, expired, refunded, adjusted, \
                     available, held, events, last_stream_ms, last_stream_seq \
                     FROM tollgate_wallets ORDER BY account_id, wallet",
                )
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|r| {
                        Ok(WalletSummary {
                            account_id: r.try_get("account_id")?,
                            wallet: r.try_get("wallet")?,
                            totals: Totals {
                                granted: r.try_get("granted")?,
                                used: r.try_get("used")?,
                                expired: r.try_get("expired")?,
                                refunded: r.try_get("refunded")?,
                                adjusted: r.try_get("adjusted")?,
                                available: r.try_get("available")?,
                                held: r.try_get("held")?,
                            },
                            events: r.try_get("events")?,
                            last_position: (
                                r.try_get("last_stream_ms")?,
                                r.try_get("last_stream_seq")?,
                            ),
                        })
                    })
                    .collect::<Result<Vec<_>, sqlx::Error>>()
                    .map_err(StoreError::from)
            }

            pub async fn derive(
                &self,
                account_id: &str,
                wallet: &str,
                upto: Option<(i64, i64)>,
            ) -> Result<Derived, StoreError> {
                let (ms, seq) = upto.unwrap_or((i64::MAX, i64::MAX));
                let mut tx = self.pool.begin().await?;
                if let Some(snapshot) = $snapshot {
                    sqlx::raw_sql(snapshot).execute(&mut *tx).await?;
                }
                let sums = sqlx::query(
                    // SUM of BIGINT is NUMERIC in PostgreSQL: cast back.
                    "SELECT CAST(COALESCE(SUM(d_granted), 0) AS BIGINT) AS g, \
                     CAST(COALESCE(SUM(d_used), 0) AS BIGINT) AS u, \
                     CAST(COALESCE(SUM(d_expired), 0) AS BIGINT) AS x, \
                     CAST(COALESCE(SUM(d_refunded), 0) AS BIGINT) AS f, \
                     CAST(COALESCE(SUM(d_adjusted), 0) AS BIGINT) AS j, \
                     CAST(COALESCE(SUM(CASE WHEN kind = 'hold' THEN 1 \
                       WHEN kind IN ('capture', 'release', 'expire_hold') THEN -1 \
                       ELSE 0 END), 0) AS BIGINT) AS h, \
                     CAST(COUNT(*) AS BIGINT) AS n FROM tollgate_events \
                     WHERE account_id = $1 AND wallet = $2 AND (stream_ms, stream_seq) <= ($3, $4)",
                )
                .bind(account_id.to_owned())
                .bind(wallet.to_owned())
                .bind(ms)
                .bind(seq)
                .fetch_one(&mut *tx)
                .await?;
                let last = sqlx::query(
                    "SELECT available_after, held_after FROM tollgate_events \
                     WHERE account_id = $1 AND wallet = $2 AND (stream_ms, stream_seq) <= ($3, $4) \
                     ORDER BY stream_ms DESC, stream_seq DESC LIMIT 1",
                )
                .bind(account_id.to_owned())
                .bind(wallet.to_owned())
                .bind(ms)
                .bind(seq)
                .fetch_optional(&mut *tx)
                .await?;
                let summary = sqlx::query(
                    "SELECT granted, used, expired, refunded, adjusted, available, held \
                     FROM tollgate_wallets WHERE account_id = $1 AND wallet = $2",
                )
                .bind(account_id.to_owned())
                .bind(wallet.to_owned())
                .fetch_optional(&mut *tx)
                .await?;
                tx.commit().await?;
                let summary = match &summary {
                    Some(r) => Some(Totals {
                        granted: r.try_get("granted")?,
                        used: r.try_get("used")?,
                        expired: r.try_get("expired")?,
                        refunded: r.try_get("refunded")?,
                        adjusted: r.try_get("adjusted")?,
                        available: r.try_get("available")?,
                        held: r.try_get("held")?,
                    }),
                    None => None,
                };
                let (available, held) = match &last {
                    Some(r) => (r.try_get("available_after")?, r.try_get("held_after")?),
                    None => (0, 0),
                };
                let totals = Totals {
                    granted: sums.try_get("g")?,
                    used: sums.try_get("u")?,
                    expired: sums.try_get("x")?,
                    refunded: sums.try_get("f")?,
                    adjusted: sums.try_get("j")?,
                    available,
                    held,
                };
                Ok(Derived {
                    totals,
                    events: sums.try_get("n")?,
                    open_holds: sums.try_get("h")?,
                    summary,
                })
            }

            pub async fn ping(&self) -> Result<(), StoreError> {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
            }

            /// The ids of a wallet's holds the events up to `upto` leave open.
            pub async fn open_hold_ids(
                &self,
                account_id: &str,
                wallet: &str,
                upto: Option<(i64, i64)>,
            ) -> Result<Vec<String>, StoreError> {
                let (ms, seq) = upto.unwrap_or((i64::MAX, i64::MAX));
                Ok(sqlx::query_scalar(
                    "SELECT hold_id FROM tollgate_events \
                     WHERE account_id = $1 AND wallet = $2 AND hold_id <> '' \
                     AND (stream_ms, stream_seq) <= ($3, $4) \
                     GROUP BY hold_id HAVING SUM(CASE WHEN kind = 'hold' THEN 1 \
                       WHEN kind IN ('capture', 'release', 'expire_hold') THEN -1 \
                       ELSE 0 END) > 0 ORDER BY hold_id",
                )
                .bind(account_id.to_owned())
                .bind(wallet.to_owned())
                .bind(ms)
                .bind(seq)
                .fetch_all(&self.pool)
                .await?)
            }

            pub async fn shard_events(
                &self,
                shard: u16,
                after: Option<&WalletPosition>,
                limit: u32,
            ) -> Result<Vec<LedgerEvent>, StoreError> {
                let mut qb = QueryBuilder::<$db>::new(format!(
                    "SELECT {EVENT_COLUMNS} FROM tollgate_events WHERE shard = "
                ));
                qb.push_bind(i64::from(shard));
                if let Some(p) = after {
                    qb.push(" AND (account_id, wallet, stream_ms, stream_seq) > (")
                        .push_bind(p.account_id.clone())
                        .push(", ")
                        .push_bind(p.wallet.clone())
                        .push(", ")
                        .push_bind(p.stream_ms)
                        .push(", ")
                        .push_bind(p.stream_seq)
                        .push(")");
                }
                qb.push(" ORDER BY account_id, wallet, stream_ms, stream_seq LIMIT ")
                    .push_bind(i64::from(limit));
                let rows = qb.build().fetch_all(&self.pool).await?;
                rows.iter().map(event_from_row).collect()
            }

            pub async fn save_api_key(&self, key: &ApiKeyRecord) -> Result<(), StoreError> {
                // A revocation is kept once saved. A key's other fields never change, so a
                // later record fills in what an earlier, partial one lacked (a revocation
                // saved before the key's own record, which a CreateApiKey whose store write
                // failed saves later).
                sqlx::query(
                    "INSERT INTO tollgate_api_keys (key_id, account_id, digest, name, \
                     created_at_ms, revoked_at_ms, member_id, created_by) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                     ON CONFLICT (key_id) DO UPDATE SET revoked_at_ms = CASE \
                     WHEN excluded.revoked_at_ms > 0 THEN excluded.revoked_at_ms \
                     ELSE tollgate_api_keys.revoked_at_ms END, \
                     digest = CASE WHEN tollgate_api_keys.digest = '' \
                     THEN excluded.digest ELSE tollgate_api_keys.digest END, \
                     name = CASE WHEN tollgate_api_keys.name = '' \
                     THEN excluded.name ELSE tollgate_api_keys.name END, \
                     created_at_ms = CASE WHEN tollgate_api_keys.created_at_ms = 0 \
                     THEN excluded.created_at_ms ELSE tollgate_api_keys.created_at_ms END, \
                     member_id = CASE WHEN tollgate_api_keys.member_id = '' \
                     THEN excluded.member_id ELSE tollgate_api_keys.member_id END, \
                     created_by = CASE WHEN tollgate_api_keys.created_by = '' \
                     THEN excluded.created_by ELSE tollgate_api_keys.created_by END",
                )
                .bind(key.key_id.clone())
                .bind(key.account_id.clone())
                .bind(key.digest.clone())
                .bind(key.name.clone())
                .bind(key.created_at_ms)
                .bind(key.revoked_at_ms)
                .bind(key.member_id.clone())
                .bind(key.created_by.clone())
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            pub async fn api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
                let rows = sqlx::query(
                    "SELECT key_id, account_id, digest, name, created_at_ms, revoked_at_ms, \
                     member_id, created_by FROM tollgate_api_keys ORDER BY key_id",
                )
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|r| {
                        Ok(ApiKeyRecord {
                            key_id: r.try_get("key_id")?,
                            account_id: r.try_get("account_id")?,
                            digest: r.try_get("digest")?,
                            name: r.try_get("name")?,
                            created_at_ms: r.try_get("created_at_ms")?,
                            revoked_at_ms: r.try_get("revoked_at_ms")?,
                            member_id: r.try_get("member_id")?,
                            created_by: r.try_get("created_by")?,
                        })
                    })
                    .collect::<Result<Vec<_>, sqlx::Error>>()
                    .map_err(StoreError::from)
            }

            pub async fn shard_has_events(&self, shard: u16) -> Result<bool, StoreError> {
                let found: Option<i64> = sqlx::query_scalar(
                    "SELECT shard FROM tollgate_events WHERE shard = $1 LIMIT 1",
                )
                .bind(i64::from(shard))
                .fetch_optional(&self.pool)
                .await?;
                Ok(found.is_some())
            }

            /// The deployment's persisted shard count (schema_v10.sql), if one was written.
            pub async fn shard_count(&self) -> Result<Option<i64>, StoreError> {
                Ok(
                    sqlx::query_scalar("SELECT shards FROM tollgate_shard_count WHERE id = 1")
                        .fetch_optional(&self.pool)
                        .await?,
                )
            }

            /// Writes the shard count unless one is there already; answers the one that
            /// is there afterwards (another process's, written first, when they differ).
            pub async fn persist_shard_count(&self, count: u16) -> Result<i64, StoreError> {
                sqlx::query(
                    "INSERT INTO tollgate_shard_count (id, shards, written_at_ms) \
                     VALUES (1, $1, $2) ON CONFLICT (id) DO NOTHING",
                )
                .bind(i64::from(count))
                .bind(crate::ledger::wall_clock_ms())
                .execute(&self.pool)
                .await?;
                Ok(
                    sqlx::query_scalar("SELECT shards FROM tollgate_shard_count WHERE id = 1")
                        .fetch_one(&self.pool)
                        .await?,
                )
            }

            /// The highest shard number any settled event carries (None: no events).
            pub async fn highest_event_shard(&self) -> Result<Option<i64>, StoreError> {
                Ok(
                    sqlx::query_scalar::<_, Option<i64>>("SELECT MAX(shard) FROM tollgate_events")
                        .fetch_one(&self.pool)
                        .await?,
                )
            }

            pub async fn count_events(&self) -> Result<i64, StoreError> {
                Ok(sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM tollgate_events")
                    .fetch_one(&self.pool)
                    .await?)
            }
        }
    };
}

pub struct PgStore {
    pub(super) pool: sqlx::PgPool,
    /// (shard, marker) pairs this object's batches have committed to
    /// `tollgate_shard_epochs` (`record_epochs`): a few, one per shard and Redis
    /// incarnation settled from.
    seen_epochs: std::sync::Mutex<HashSet<(u16, i64)>>,
}

pub struct SqliteStore {
    pub(super) pool: sqlx::SqlitePool,
    /// As `PgStore::seen_epochs`.
    seen_epochs: std::sync::Mutex<HashSet<(u16, i64)>>,
}

/// Wallet summary rows of a batch, in key order.
type WalletRows<'a> = [((&'a str, &'a str), WalletBatch)];

/// PostgreSQL writes a batch's events with `COPY … FROM STDIN (FORMAT binary)` and its
/// wallet summaries with one `UNNEST` upsert (one array parameter per column).
///
/// `COPY` cannot skip rows that are already there, so it runs under a savepoint: a batch
/// holding a redelivered event (a settler died between its commit and its `XACK`, or a
/// batch was taken over by `XAUTOCLAIM` while its first reader still wrote it) fails on
/// the primary key, goes back to the savepoint, and is written again by
/// `INSERT … SELECT FROM UNNEST … ON CONFLICT DO NOTHING RETURNING event_id`, which says
/// which events were new. The common batch costs PostgreSQL a fifth less than that insert
/// (docs/BENCHMARKS.md, seventh session).
impl PgStore {
    /// Refuses a database whose encoding is not UTF8. Event text is any Unicode (a grant's
    /// description "café 🙂"); a LATIN1 or SQL_ASCII database refuses, or mangles, what
    /// its encoding lacks, and a refused row used to stop settlement on every shard.
    async fn check_database(&self) -> Result<(), StoreError> {
        let encoding: String = sqlx::query_scalar("SHOW server_encoding")
            .fetch_one(&self.pool)
            .await?;
        if !encoding.eq_ignore_ascii_case("UTF8") {
            return Err(StoreError::Unsupported(format!(
                "the database's encoding is {encoding}, not UTF8: events carry any Unicode \
                 text; create the database with UTF8 (CREATE DATABASE … ENCODING 'UTF8' \
                 TEMPLATE template0; docs/OPERATIONS.md)"
            )));
        }
        Ok(())
    }

    async fn insert_events(
        conn: &mut sqlx::PgConnection,
        events: &[&LedgerEvent],
        epochs: Option<&ShardEpochs>,
        settled_at: i64,
    ) -> Result<HashSet<String>, StoreError> {
        sqlx::raw_sql("SAVEPOINT tollgate_copy")
            .execute(&mut *conn)
            .await?;
        match Self::copy_events(conn, events, epochs, settled_at).await {
            Ok(()) => Ok(events.iter().map(|e| e.event_id.clone()).collect()),
            Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                sqlx::raw_sql("ROLLBACK TO SAVEPOINT tollgate_copy")
                    .execute(&mut *conn)
                    .await?;
                Self::insert_new_events(conn, events, epochs, settled_at).await
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Every event of the batch in one binary `COPY`; fails whole if any is already there.
    async fn copy_events(
        conn: &mut sqlx::PgConnection,
        events: &[&LedgerEvent],
        epochs: Option<&ShardEpochs>,
        settled_at: i64,
    ) -> Result<(), sqlx::Error> {
        let mut data = CopyBinary::with_capacity(events.len() * 320);
        for e in events {
            let (ms, seq) = e.stream_position();
            let d = e.deltas();
            data.row(28);
            data.text(&e.event_id)?;
            data.int(i64::from(e.shard()));
            data.int(ms);
            data.int(seq);
            data.text(e.kind.as_str())?;
            data.text(&e.account_id)?;
            data.text(&e.wallet)?;
            data.int(e.amount);
            data.int(e.available_after);
            data.int(e.held_after);
            data.text(&lots_text(&e.lots))?;
            data.text(&e.extra)?;
            data.text(&e.hold_id)?;
            data.text(&e.charge_id)?;
            data.text(&e.idempotency_key)?;
            data.text(&e.operation)?;
            data.text(&e.metadata)?;
            data.int(e.created_at_ms);
            data.int(i64::from(e.version));
            data.text(&e.member)?;
            data.text(&e.actor)?;
            data.int(d.granted);
            data.int(d.used);
            data.int(d.expired);
            data.int(d.refunded);
            data.int(d.adjusted);
            data.int(settled_at);
            data.int(read_epoch(epochs, e));
        }
        let mut copy = conn
            .copy_in_raw(&format!(
                "COPY tollgate_events ({EVENT_COLUMNS}, d_granted, d_used, d_expired, \
                 d_refunded, d_adjusted, settled_at_ms, redis_epoch) FROM STDIN (FORMAT binary)"
            ))
            .await?;
        copy.send(data.finish()).await?;
        copy.finish().await?;
        Ok(())
    }

    /// The batch's events that are not there yet, and which those were.
    async fn insert_new_events(
        conn: &mut sqlx::PgConnection,
        events: &[&LedgerEvent],
        epochs: Option<&ShardEpochs>,
        settled_at: i64,
    ) -> Result<HashSet<String>, StoreError> {
        let n = events.len();
        let mut event_id = Vec::with_capacity(n);
        let mut shard = Vec::with_capacity(n);
        let mut stream_ms = Vec::with_capacity(n);
        let mut stream_seq = Vec::with_capacity(n);
        let mut kind = Vec::with_capacity(n);
        let mut account_id = Vec::with_capacity(n);
        let mut wallet = Vec::with_capacity(n);
        let mut amount = Vec::with_capacity(n);
        let mut available_after = Vec::with_capacity(n);
        let mut held_after = Vec::with_capacity(n);
        let mut lots = Vec::with_capacity(n);
        let mut extra = Vec::with_capacity(n);
        let mut hold_id = Vec::with_capacity(n);
        let mut charge_id = Vec::with_capacity(n);
        let mut idempotency_key = Vec::with_capacity(n);
        let mut operation = Vec::with_capacity(n);
        let mut metadata = Vec::with_capacity(n);
        let mut created_at_ms = Vec::with_capacity(n);
        let mut version = Vec::with_capacity(n);
        let mut member = Vec::with_capacity(n);
        let mut actor = Vec::with_capacity(n);
        let mut d_granted = Vec::with_capacity(n);
        let mut d_used = Vec::with_capacity(n);
        let mut d_expired = Vec::with_capacity(n);
        let mut d_refunded = Vec::with_capacity(n);
        let mut d_adjusted = Vec::with_capacity(n);
        let mut redis_epoch = Vec::with_capacity(n);
        for e in events {
            let (ms, seq) = e.stream_position();
            let d = e.deltas();
            event_id.push(e.event_id.as_str());
            shard.push(i64::from(e.shard()));
            stream_ms.push(ms);
            stream_seq.push(seq);
            kind.push(e.kind.as_str());
            account_id.push(e.account_id.as_str());
            wallet.push(e.wallet.as_str());
            amount.push(e.amount);
            available_after.push(e.available_after);
            held_after.push(e.held_after);
            lots.push(lots_text(&e.lots));
            extra.push(e.extra.as_str());
            hold_id.push(e.hold_id.as_str());
            charge_id.push(e.charge_id.as_str());
            idempotency_key.push(e.idempotency_key.as_str());
            operation.push(e.operation.as_str());
            metadata.push(e.metadata.as_str());
            created_at_ms.push(e.created_at_ms);
            version.push(i64::from(e.version));
            member.push(e.member.as_str());
            actor.push(e.actor.as_str());
            d_granted.push(d.granted);
            d_used.push(d.used);
            d_expired.push(d.expired);
            d_refunded.push(d.refunded);
            d_adjusted.push(d.adjusted);
            redis_epoch.push(read_epoch(epochs, e));
        }
        let ids: Vec<String> = sqlx::query_scalar(
            "INSERT INTO tollgate_events (event_id, shard, stream_ms, stream_seq, kind, \
             account_id, wallet, amount, available_after, held_after, lots, extra, hold_id, \
             charge_id, idempotency_key, operation, metadata, created_at_ms, version, member, \
             actor, d_granted, d_used, d_expired, d_refunded, d_adjusted, redis_epoch, \
             settled_at_ms) \
             SELECT u.*, $28 FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], \
             $4::bigint[], $5::text[], $6::text[], $7::text[], $8::bigint[], $9::bigint[], \
             $10::bigint[], $11::text[], $12::text[], $13::text[], $14::text[], $15::text[], \
             $16::text[], $17::text[], $18::bigint[], $19::bigint[], $20::text[], \
             $21::text[], $22::bigint[], $23::bigint[], $24::bigint[], $25::bigint[], \
             $26::bigint[], $27::bigint[]) AS u \
             ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
        )
        .bind(event_id)
        .bind(shard)
        .bind(stream_ms)
        .bind(stream_seq)
        .bind(kind)
        .bind(account_id)
        .bind(wallet)
        .bind(amount)
        .bind(available_after)
        .bind(held_after)
        .bind(lots)
        .bind(extra)
        .bind(hold_id)
        .bind(charge_id)
        .bind(idempotency_key)
        .bind(operation)
        .bind(metadata)
        .bind(created_at_ms)
        .bind(version)
        .bind(member)
        .bind(actor)
        .bind(d_granted)
        .bind(d_used)
        .bind(d_expired)
        .bind(d_refunded)
        .bind(d_adjusted)
        .bind(redis_epoch)
        .bind(settled_at)
        .fetch_all(conn)
        .await?;
        Ok(ids.into_iter().collect())
    }

    async fn upsert_wallets(
        conn: &mut sqlx::PgConnection,
        rows: &WalletRows<'_>,
    ) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let n = rows.len();
        let mut account = Vec::with_capacity(n);
        let mut wallet = Vec::with_capacity(n);
        let mut cols: [Vec<i64>; 15] = std::array::from_fn(|_| Vec::with_capacity(n));
        for ((a, w), b) in rows {
            let (low, exhausted) = b.alert_flags();
            account.push(*a);
            wallet.push(*w);
            let values = [
                b.deltas.granted,
                b.deltas.used,
                b.deltas.expired,
                b.deltas.refunded,
                b.deltas.adjusted,
                b.available,
                b.held,
                b.last.0,
                b.last.1,
                b.events,
                b.last_grant,
                b.last_grant_at.0,
                b.last_grant_at.1,
                low,
                exhausted,
            ];
            for (col, v) in cols.iter_mut().zip(values) {
                col.push(v);
            }
        }
        let mut query = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO tollgate_wallets (account_id, wallet, granted, used, expired, \
             refunded, adjusted, available, held, last_stream_ms, last_stream_seq, events, \
             last_grant, last_grant_ms, last_grant_seq, low_alerted, exhausted_alerted) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[], \
             $5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], \
             $10::bigint[], $11::bigint[], $12::bigint[], $13::bigint[], $14::bigint[], \
             $15::bigint[], $16::bigint[], $17::bigint[]){SUMMARY_UPSERT_TAIL}"
        )))
        .bind(account)
        .bind(wallet);
        for col in cols {
            query = query.bind(col);
        }
        query.execute(conn).await?;
        Ok(())
    }
}

/// The payload of a binary `COPY` (PostgreSQL's documentation, "COPY", "Binary Format"):
/// a signature and two zero words, then per row its field count and each field as its
/// byte length and bytes (big-endian integers; text as UTF-8), then a -1 field count.
struct CopyBinary(Vec<u8>);

impl CopyBinary {
    fn with_capacity(bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(bytes + 32);
        buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        buf.extend_from_slice(&0i32.to_be_bytes());
        buf.extend_from_slice(&0i32.to_be_bytes());
        Self(buf)
    }

    fn row(&mut self, fields: i16) {
        self.0.extend_from_slice(&fields.to_be_bytes());
    }

    fn int(&mut self, value: i64) {
        self.0.extend_from_slice(&8i32.to_be_bytes());
        self.0.extend_from_slice(&value.to_be_bytes());
    }

    /// Fails for a value past a field's 2 GiB (the ledger's own limits keep event fields
    /// far below it).
    fn text(&mut self, value: &str) -> Result<(), sqlx::Error> {
        let len = i32::try_from(value.len())
            .map_err(|_| sqlx::Error::Encode("a text field longer than 2 GiB".into()))?;
        self.0.extend_from_slice(&len.to_be_bytes());
        self.0.extend_from_slice(value.as_bytes());
        Ok(())
    }

    fn finish(mut self) -> Vec<u8> {
        self.0.extend_from_slice(&(-1i16).to_be_bytes());
        self.0
    }
}

/// SQLite has no arrays: multi-row VALUES, one bind per value, in chunks that stay under
/// its parameter limit.
impl SqliteStore {
    /// Nothing to check: SQLite keeps text as the UTF-8 it is given.
    async fn check_database(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn insert_events(
        conn: &mut sqlx::SqliteConnection,
        sorted: &[&LedgerEvent],
        epochs: Option<&ShardEpochs>,
        settled_at: i64,
    ) -> Result<HashSet<String>, StoreError> {
        let mut inserted = HashSet::new();
        for chunk in sorted.chunks(INSERT_ROWS_MAX) {
            let mut qb = QueryBuilder::<sqlx::Sqlite>::new(format!(
                "INSERT INTO tollgate_events ({EVENT_COLUMNS}, d_granted, d_used, \
                 d_expired, d_refunded, d_adjusted, settled_at_ms, redis_epoch) "
            ));
            qb.push_values(chunk.iter(), |mut b, e| {
                let (ms, seq) = e.stream_position();
                let d = e.deltas();
                b.push_bind(e.event_id.clone())
                    .push_bind(i64::from(e.shard()))
                    .push_bind(ms)
                    .push_bind(seq)
                    .push_bind(e.kind.as_str())
                    .push_bind(e.account_id.clone())
                    .push_bind(e.wallet.clone())
                    .push_bind(e.amount)
                    .push_bind(e.available_after)
                    .push_bind(e.held_after)
                    .push_bind(lots_text(&e.lots))
                    .push_bind(e.extra.clone())
                    .push_bind(e.hold_id.clone())
                    .push_bind(e.charge_id.clone())
                    .push_bind(e.idempotency_key.clone())
                    .push_bind(e.operation.clone())
                    .push_bind(e.metadata.clone())
                    .push_bind(e.created_at_ms)
                    .push_bind(i64::from(e.version))
                    .push_bind(e.member.clone())
                    .push_bind(e.actor.clone())
                    .push_bind(d.granted)
                    .push_bind(d.used)
                    .push_bind(d.expired)
                    .push_bind(d.refunded)
                    .push_bind(d.adjusted)
                    .push_bind(settled_at)
                    .push_bind(read_epoch(epochs, e));
            });
            qb.push(" ON CONFLICT (event_id) DO NOTHING RETURNING event_id");
            for row in qb.build().fetch_all(&mut *conn).await? {
                inserted.insert(row.try_get::<String, _>("event_id")?);
            }
        }
        Ok(inserted)
    }

    async fn upsert_wallets(
        conn: &mut sqlx::SqliteConnection,
        rows: &WalletRows<'_>,
    ) -> Result<(), StoreError> {
        for chunk in rows.chunks(INSERT_ROWS_MAX) {
            let mut qb = QueryBuilder::<sqlx::Sqlite>::new(
                "INSERT INTO tollgate_wallets (account_id, wallet, granted, used, \
                 expired, refunded, adjusted, available, held, last_stream_ms, \
                 last_stream_seq, events, last_grant, last_grant_ms, last_grant_seq, \
                 low_alerted, exhausted_alerted) ",
            );
            qb.push_values(chunk.iter(), |mut b, ((account, wallet), w)| {
                let (low, exhausted) = w.alert_flags();
                b.push_bind(*account)
                    .push_bind(*wallet)
                    .push_bind(w.deltas.granted)
                    .push_bind(w.deltas.used)
                    .push_bind(w.deltas.expired)
                    .push_bind(w.deltas.refunded)
                    .push_bind(w.deltas.adjusted)
                    .push_bind(w.available)
                    .push_bind(w.held)
                    .push_bind(w.last.0)
                    .push_bind(w.last.1)
                    .push_bind(w.events)
                    .push_bind(w.last_grant)
                    .push_bind(w.last_grant_at.0)
                    .push_bind(w.last_grant_at.1)
                    .push_bind(low)
                    .push_bind(exhausted);
            });
            qb.push(SUMMARY_UPSERT_TAIL);
            qb.build().execute(&mut *conn).await?;
        }
        Ok(())
    }
}

// PostgreSQL serializes concurrent migrations with an advisory lock; SQLite's write lock
// does, taken at BEGIN IMMEDIATE: a deferred transaction reads (is the table there, is the
// version applied) before it writes, and in WAL mode its write fails at once, unretried by
// the busy timeout ("database is locked": SQLITE_BUSY, code 5, while another connection
// writes, SQLITE_BUSY_SNAPSHOT, 517, once it has committed since the read) when several
// processes start on a fresh file.
store_impl!(
    PgStore,
    sqlx::Postgres,
    "postgres",
    None::<&'static str>,
    Some("SELECT pg_advisory_xact_lock(7157680)"),
    // Reads in one transaction see one snapshot only at this level in PostgreSQL (a
    // SQLite read transaction in WAL mode always does).
    Some("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"),
    // Whether a table of the schema in use has a column ($1 table, $2 column).
    "SELECT CAST(COUNT(*) AS BIGINT) FROM information_schema.columns \
     WHERE table_schema = current_schema() AND CAST(table_name AS TEXT) = $1 \
     AND CAST(column_name AS TEXT) = $2"
);
store_impl!(
    SqliteStore,
    sqlx::Sqlite,
    "sqlite",
    Some("BEGIN IMMEDIATE"),
    None::<&'static str>,
    None::<&'static str>,
    "SELECT COUNT(*) FROM pragma_table_info($1) WHERE name = $2"
);

/// The configured store.
pub enum Store {
    Postgres(PgStore),
    Sqlite(SqliteStore),
}

/// The trait over the two implementations, delegating to their inherent methods.
macro_rules! ledger_store_trait {
    ($store:ident) => {
        impl LedgerStore for $store {
            fn kind(&self) -> &'static str {
                $store::kind(self)
            }
            async fn migrate(&self) -> Result<(), StoreError> {
                $store::migrate(self).await
            }
            async fn append(&self, events: &[LedgerEvent]) -> Result<u64, StoreError> {
                $store::append(self, events).await
            }
            async fn history(&self, q: &HistoryQuery) -> Result<HistoryPage, StoreError> {
                $store::history(self, q).await
            }
            async fn event(&self, event_id: &str) -> Result<Option<LedgerEvent>, StoreError> {
                $store::event(self, event_id).await
            }
            async fn wallets(&self) -> Result<Vec<WalletSummary>, StoreError> {
                $store::wallets(self).await
            }
            async fn derive(
                &self,
                account_id: &str,
                wallet: &str,
                upto: Option<(i64, i64)>,
            ) -> Result<Derived, StoreError> {
                $store::derive(self, account_id, wallet, upto).await
            }
            async fn ping(&self) -> Result<(), StoreError> {
                $store::ping(self).await
            }
            async fn count_events(&self) -> Result<i64, StoreError> {
                $store::count_events(self).await
            }
            async fn shard_events(
                &self,
                shard: u16,
                after: Option<&WalletPosition>,
                limit: u32,
            ) -> Result<Vec<LedgerEvent>, StoreError> {
                $store::shard_events(self, shard, after, limit).await
            }
            async fn save_api_key(&self, key: &ApiKeyRecord) -> Result<(), StoreError> {
                $store::save_api_key(self, key).await
            }
            async fn api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
                $store::api_keys(self).await
            }
            async fn shard_has_events(&self, shard: u16) -> Result<bool, StoreError> {
                $store::shard_has_events(self, shard).await
            }
        }
    };
}

ledger_store_trait!(PgStore);
ledger_store_trait!(SqliteStore);

macro_rules! dispatch {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            Store::Postgres($s) => $call,
            Store::Sqlite($s) => $call,
        }
    };
}

/// Refuses an in-memory SQLite database (`sqlite://:memory:`, `file::memory:`, or
/// `mode=memory`): each connection of the pool would open a private database of its own,
/// so a batch committed on one is missing on the next, and all of it is gone at exit,
/// while the outbox entries it held are acknowledged and trimmed in Redis.
fn sqlite_file(path: &str) -> Result<(), StoreError> {
    let lower = path.to_ascii_lowercase();
    let (name, query) = lower.split_once('?').unwrap_or((lower.as_str(), ""));
    let in_memory = name == ":memory:"
        || name.starts_with("file::memory:")
        || query.split('&').any(|pair| pair == "mode=memory");
    if in_memory {
        return Err(StoreError::BadUrl(
            "an in-memory SQLite database is private to each pooled connection and gone at \
             exit (events acknowledged in Redis would be lost): use sqlite://PATH to a file"
                .into(),
        ));
    }
    Ok(())
}

impl Store {
    /// Checks a store url without connecting (config validation runs outside the async
    /// runtime, where sqlx cannot build a pool).
    pub fn check_url(url: &str) -> Result<(), StoreError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            PgConnectOptions::from_str(url)
                .map(|_| ())
                .map_err(|e| StoreError::BadUrl(format!("not a valid postgres:// url ({e})")))
        } else if let Some(path) = url.strip_prefix("sqlite://").filter(|p| !p.is_empty()) {
            sqlite_file(path)
        } else {
            Err(StoreError::BadUrl(BAD_URL.into()))
        }
    }

    /// Connects lazily (tollgate starts while the database is down); a SQLite file is
    /// created at the first connection when missing (what `serve` and `settle` use: they
    /// migrate the store at start-up).
    pub fn connect_lazy(url: &str, connections: u32) -> Result<Self, StoreError> {
        Self::connect(url, connections, true)
    }

    /// Opens a store that `serve` or `settle` made, for the operator tools (`reconcile`,
    /// `end-lost-hold`, `restore`, `dead-letters replay`), and creates nothing: refused
    /// (`NotInitialized`) when the SQLite file does not exist, or when the database (in
    /// PostgreSQL, the schema in use: `current_schema()`, where `migrate` writes) has no
    /// tollgate schema (`tollgate_schema_migrations` with a version applied). Otherwise a
    /// tool would migrate a mistyped store and settle Redis's outbox into it: the events
    /// acknowledged in Redis, and missing from the store that `serve` and `settle` use.
    /// A store it accepts may still be migrated by the tool (an older schema version).
    pub async fn open_existing(url: &str, connections: u32) -> Result<Self, StoreError> {
        let store = Self::connect(url, connections, false)?;
        let found: i64 = match &store {
            Self::Postgres(s) => {
                let tables: i64 = sqlx::query_scalar(
                    "SELECT CAST(COUNT(*) AS BIGINT) FROM information_schema.tables \
                     WHERE table_schema = current_schema() \
                     AND CAST(table_name AS TEXT) = 'tollgate_schema_migrations'",
                )
                .fetch_one(&s.pool)
                .await?;
                s.check_database().await?;
                if tables == 0 {
                    0
                } else {
                    sqlx::query_scalar(
                        "SELECT CAST(COUNT(*) AS BIGINT) FROM tollgate_schema_migrations",
                    )
                    .fetch_one(&s.pool)
                    .await?
                }
            }
            Self::Sqlite(_) => {
                use sqlx::{ConnectOptions, Connection};
                let path = url.strip_prefix("sqlite://").unwrap_or_default();
                if !std::path::Path::new(path).exists() {
                    return Err(StoreError::NotInitialized("the file does not exist"));
                }
                // One connection of its own, without the pool's journal mode: looking
                // writes nothing, not even to a file that is no tollgate store.
                let mut con = SqliteConnectOptions::new()
                    .filename(path)
                    .create_if_missing(false)
                    .busy_timeout(POOL_ACQUIRE_TIMEOUT)
                    .connect()
                    .await?;
                let looked = async {
                    let tables: i64 = sqlx::query_scalar(
                        "SELECT COUNT(*) FROM sqlite_master \
                         WHERE type = 'table' AND name = 'tollgate_schema_migrations'",
                    )
                    .fetch_one(&mut con)
                    .await?;
                    if tables == 0 {
                        return Ok(0);
                    }
                    sqlx::query_scalar("SELECT COUNT(*) FROM tollgate_schema_migrations")
                        .fetch_one(&mut con)
                        .await
                }
                .await;
                let _ = con.close().await;
                looked?
            }
        };
        if found == 0 {
            return Err(StoreError::NotInitialized(
                "it has no tollgate schema (no tollgate_schema_migrations table with a version applied)",
            ));
        }
        Ok(store)
    }

    fn connect(url: &str, connections: u32, create: bool) -> Result<Self, StoreError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let options = PgConnectOptions::from_str(url)
                .map_err(|e| StoreError::BadUrl(format!("not a valid postgres:// url ({e})")))?;
            let pool = PgPoolOptions::new()
                .max_connections(connections)
                .acquire_timeout(POOL_ACQUIRE_TIMEOUT)
                .connect_lazy_with(options);
            Ok(Self::Postgres(PgStore {
                pool,
                seen_epochs: Default::default(),
            }))
        } else if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(StoreError::BadUrl(BAD_URL.into()));
            }
            sqlite_file(path)?;
            let options = SqliteConnectOptions::new()
                .filename(path)
                .create_if_missing(create)
                .journal_mode(SqliteJournalMode::Wal)
                // Acked outbox entries are gone from Redis: a commit must survive power loss.
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(POOL_ACQUIRE_TIMEOUT);
            let pool = SqlitePoolOptions::new()
                .max_connections(connections)
                .acquire_timeout(POOL_ACQUIRE_TIMEOUT)
                .connect_lazy_with(options);
            Ok(Self::Sqlite(SqliteStore {
                pool,
                seen_epochs: Default::default(),
            }))
        } else {
            Err(StoreError::BadUrl(BAD_URL.into()))
        }
    }

    pub fn kind(&self) -> &'static str {
        dispatch!(self, s => s.kind())
    }

    /// Brings the schema up to date. On SQLite, a migration that found the file locked
    /// past the busy timeout (several processes starting at once on a loaded machine
    /// each wait for the others' whole migrations) is tried again, for up to
    /// [`SQLITE_MIGRATION_BUSY_WAIT`]: it changed nothing (one transaction), and starting
    /// is what it holds up.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match self {
            Self::Postgres(s) => s.migrate().await,
            Self::Sqlite(s) => {
                let deadline = tokio::time::Instant::now() + SQLITE_MIGRATION_BUSY_WAIT;
                loop {
                    match s.migrate().await {
                        Err(StoreError::Query(why))
                            if why.contains("database is locked")
                                && tokio::time::Instant::now() < deadline =>
                        {
                            tracing::info!("the SQLite store is locked by another process's migration: trying again");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        done => return done,
                    }
                }
            }
        }
    }

    pub async fn append(&self, events: &[LedgerEvent]) -> Result<u64, StoreError> {
        dispatch!(self, s => s.append(events).await)
    }

    pub async fn append_batch(
        &self,
        events: &[LedgerEvent],
        epochs: Option<&ShardEpochs>,
        rules: Option<&Rules>,
    ) -> Result<Appended, StoreError> {
        dispatch!(self, s => s.append_batch(events, epochs, rules).await)
    }

    pub async fn raise_fence(&self, shard: u16, now: i64) -> Result<i64, StoreError> {
        dispatch!(self, s => s.raise_fence(shard, now).await)
    }

    pub async fn holds_open(&self) -> Result<i64, StoreError> {
        dispatch!(self, s => s.holds_open().await)
    }

    pub async fn history(&self, q: &HistoryQuery) -> Result<HistoryPage, StoreError> {
        dispatch!(self, s => s.history(q).await)
    }

    pub async fn event(&self, event_id: &str) -> Result<Option<LedgerEvent>, StoreError> {
        dispatch!(self, s => s.event(event_id).await)
    }

    pub async fn hold_event(
        &self,
        account_id: &str,
        wallet: &str,
        hold_id: &str,
    ) -> Result<Option<LedgerEvent>, StoreError> {
        dispatch!(self, s => s.hold_event(account_id, wallet, hold_id).await)
    }

    pub async fn wallets(&self) -> Result<Vec<WalletSummary>, StoreError> {
        dispatch!(self, s => s.wallets().await)
    }

    pub async fn derive(
        &self,
        account_id: &str,
        wallet: &str,
        upto: Option<(i64, i64)>,
    ) -> Result<Derived, StoreError> {
        dispatch!(self, s => s.derive(account_id, wallet, upto).await)
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        dispatch!(self, s => s.ping().await)
    }

    pub async fn shard_events(
        &self,
        shard: u16,
        after: Option<&WalletPosition>,
        limit: u32,
    ) -> Result<Vec<LedgerEvent>, StoreError> {
        dispatch!(self, s => s.shard_events(shard, after, limit).await)
    }

    pub async fn save_api_key(&self, key: &ApiKeyRecord) -> Result<(), StoreError> {
        dispatch!(self, s => s.save_api_key(key).await)
    }

    pub async fn api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        dispatch!(self, s => s.api_keys().await)
    }

    pub async fn shard_has_events(&self, shard: u16) -> Result<bool, StoreError> {
        dispatch!(self, s => s.shard_has_events(shard).await)
    }

    pub async fn shard_count(&self) -> Result<Option<i64>, StoreError> {
        dispatch!(self, s => s.shard_count().await)
    }

    pub async fn persist_shard_count(&self, count: u16) -> Result<i64, StoreError> {
        dispatch!(self, s => s.persist_shard_count(count).await)
    }

    pub async fn highest_event_shard(&self) -> Result<Option<i64>, StoreError> {
        dispatch!(self, s => s.highest_event_shard().await)
    }

    pub async fn open_hold_ids(
        &self,
        account_id: &str,
        wallet: &str,
        upto: Option<(i64, i64)>,
    ) -> Result<Vec<String>, StoreError> {
        dispatch!(self, s => s.open_hold_ids(account_id, wallet, upto).await)
    }

    pub async fn count_events(&self) -> Result<i64, StoreError> {
        dispatch!(self, s => s.count_events().await)
    }
}

/// Scratch stores for the tests that read query plans (here and in webhook_store.rs): each
/// migrated, and gone with its guard whether the test passes or not.
#[cfg(test)]
pub(crate) mod scratch {
    use super::Store;

    /// A fresh PostgreSQL database named `name` and this process's id.
    pub(crate) async fn postgres(
        name: &str,
        connections: u32,
    ) -> (crate::dev::ScratchDatabase, Store) {
        let admin = std::env::var("TOLLGATE_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let db =
            crate::dev::ScratchDatabase::create(&admin, &format!("{name}_{}", std::process::id()))
                .await
                .unwrap_or_else(|e| panic!("PostgreSQL must run (scripts/test starts it): {e}"));
        let store = Store::connect_lazy(&db.url, connections).expect("store");
        store.migrate().await.expect("migrate");
        (db, store)
    }

    /// Removes a SQLite database and its WAL files.
    pub(crate) struct SqliteFiles(std::path::PathBuf);

    impl Drop for SqliteFiles {
        fn drop(&mut self) {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", self.0.display()));
            }
        }
    }

    /// A fresh SQLite file named `name` and this process's id (a leftover of an earlier
    /// process of this pid goes first).
    pub(crate) async fn sqlite(name: &str) -> (SqliteFiles, Store) {
        let dir = std::env::temp_dir().join("tollgate-tests");
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(format!("{name}-{}.db", std::process::id()));
        drop(SqliteFiles(path.clone()));
        let files = SqliteFiles(path.clone());
        let store = Store::connect_lazy(&format!("sqlite://{}", path.display()), 1).expect("store");
        store.migrate().await.expect("migrate");
        (files, store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 20,000 events, the same text for both databases: the odd ones (one created_at_ms
    /// each, every fifth a hold, every thousandth a refund) are account "heavy"'s, the
    /// rest spread over 1,000 others.
    const PLAN_EVENTS: &str = "WITH RECURSIVE s(i) AS \
        (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 20000) \
        INSERT INTO tollgate_events (event_id, shard, stream_ms, stream_seq, kind, account_id, \
        wallet, amount, available_after, held_after, lots, extra, hold_id, charge_id, \
        idempotency_key, operation, metadata, created_at_ms, d_granted, d_used, d_expired, \
        d_refunded, d_adjusted, settled_at_ms) \
        SELECT '0-' || (1000 + i) || '-0', 0, 1000 + i, 0, \
        CASE WHEN i % 10 = 1 THEN 'hold' WHEN i % 2000 = 3 THEN 'refund' ELSE 'debit' END, \
        CASE WHEN i % 2 = 1 THEN 'heavy' ELSE 'a' || (i % 1000) END, 'default', 1, 0, 0, \
        '', '', CASE WHEN i % 10 = 1 THEN 'h' || i ELSE '' END, '', '', '', '', 1000 + i, \
        0, 1, 0, 0, 0, 0 FROM s";

    /// The page of "heavy"'s history after its event half way (10,001: 5,000 of its events
    /// are newer).
    fn half_way() -> HistoryQuery {
        HistoryQuery {
            account_id: "heavy".into(),
            page_size: 100,
            after: Some((11_001, "0-11001-0".into())),
            ..Default::default()
        }
    }

    /// Pages of "heavy"'s refunds (ten among its 10,000 events): the first, one after a
    /// cursor, and the first of refunds and lot expiries (none), the branch per kind.
    fn rare_kinds() -> [HistoryQuery; 3] {
        let first = HistoryQuery {
            account_id: "heavy".into(),
            kinds: vec![EventKind::Refund],
            page_size: 100,
            ..Default::default()
        };
        [
            first.clone(),
            HistoryQuery {
                after: Some((11_003, "0-11003-0".into())),
                ..first.clone()
            },
            HistoryQuery {
                kinds: vec![EventKind::ExpireLot, EventKind::Refund],
                ..first
            },
        ]
    }

    /// 120 events of account "ties", the same text for both databases: seven to a
    /// created_at_ms, in stream positions and shards (10 to 12) out of that order, four kinds in
    /// turn (`tie` gives the same in Rust).
    const TIE_EVENTS: &str = "WITH RECURSIVE s(i) AS \
        (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 120) \
        INSERT INTO tollgate_events (event_id, shard, stream_ms, stream_seq, kind, account_id, \
        wallet, amount, available_after, held_after, lots, extra, hold_id, charge_id, \
        idempotency_key, operation, metadata, created_at_ms, d_granted, d_used, d_expired, \
        d_refunded, d_adjusted, settled_at_ms) \
        SELECT (10 + i % 3) || '-' || (1000 + (i * 7) % 5) || '-' || ((i * 11) % 13), 10 + i % 3, \
        1000 + (i * 7) % 5, (i * 11) % 13, \
        CASE i % 4 WHEN 0 THEN 'hold' WHEN 1 THEN 'refund' WHEN 2 THEN 'debit' \
        ELSE 'grant' END, 'ties', 'default', 1, 0, 0, '', '', '', '', '', '', '', \
        5000 + i / 7, 0, 1, 0, 0, 0, 0 FROM s";

    /// The event `i` of TIE_EVENTS: (kind, created_at_ms, stream ms, stream seq, shard).
    fn tie(i: i64) -> (&'static str, i64, i64, i64, i64) {
        let kind = ["hold", "refund", "debit", "grant"][(i % 4) as usize];
        (
            kind,
            5000 + i / 7,
            1000 + (i * 7) % 5,
            (i * 11) % 13,
            10 + i % 3,
        )
    }

    /// Pages through "ties" with a `kinds` filter (and without), and finds the events of
    /// those kinds in history order, each once, page after page.
    async fn kind_pages_follow_the_history_order(store: &Store) {
        let ids = |kinds: &[&str]| {
            let mut all: Vec<_> = (1..=120)
                .map(tie)
                .filter(|t| kinds.is_empty() || kinds.contains(&t.0))
                .collect();
            all.sort_by_key(|t| std::cmp::Reverse((t.1, t.2, t.3, t.4)));
            all.iter()
                .map(|t| format!("{}-{}-{}", t.4, t.2, t.3))
                .collect::<Vec<_>>()
        };
        let cases: [(&[EventKind], &[&str], u32); 5] = [
            (&[EventKind::Refund], &["refund"], 2),
            (
                &[EventKind::Refund, EventKind::Hold],
                &["refund", "hold"],
                4,
            ),
            (
                &[
                    EventKind::Grant,
                    EventKind::Hold,
                    EventKind::Refund,
                    EventKind::Grant,
                ],
                &["grant", "hold", "refund"],
                7,
            ),
            (&EventKind::ALL, &[], 9),
            (&[], &[], 11),
        ];
        for (kinds, names, page_size) in cases {
            let mut q = HistoryQuery {
                account_id: "ties".into(),
                kinds: kinds.to_vec(),
                page_size,
                ..Default::default()
            };
            let mut seen = Vec::new();
            let mut pages = 0;
            loop {
                let page = store.history(&q).await.expect("history");
                pages += 1;
                assert!(page.events.len() <= page_size as usize);
                seen.extend(page.events.iter().map(|e| e.event_id.clone()));
                match page.next {
                    Some(next) => q.after = Some(next),
                    None => break,
                }
            }
            let want = ids(names);
            assert!(pages > 2, "{names:?}: {pages} pages");
            assert_eq!(seen, want, "{names:?} by {page_size}");
        }
    }

    /// A history page after a cursor starts its index range at the cursor, rather than
    /// reading (and dropping) every newer event of the account, and a hold's event is
    /// found by its own index, not by reading the wallet's events (or the whole table).
    #[tokio::test]
    async fn history_pages_and_hold_lookups_read_what_they_return_in_postgres() {
        let (_db, store) = scratch::postgres("tollgate_plans", 1).await;
        let Store::Postgres(pg) = &store else {
            panic!("a postgres url opens a PostgreSQL store");
        };
        sqlx::raw_sql(PLAN_EVENTS)
            .execute(&pg.pool)
            .await
            .expect("events");
        sqlx::raw_sql("ANALYZE tollgate_events")
            .execute(&pg.pool)
            .await
            .expect("analyze");
        let page = store.history(&half_way()).await.expect("history");
        assert_eq!(page.events.len(), 100);
        assert_eq!(page.events[0].event_id, "0-10999-0");

        let plan: Vec<String> = PgStore::history_query("EXPLAIN ANALYZE ", &half_way(), 100)
            .expect("query")
            .build()
            .fetch_all(&pg.pool)
            .await
            .expect("explain")
            .iter()
            .map(|r| r.get::<String, _>(0))
            .collect();
        let dropped: i64 = plan
            .iter()
            .filter_map(|line| line.split("Rows Removed by Filter: ").nth(1))
            .filter_map(|n| n.trim().parse::<i64>().ok())
            .sum();
        assert!(
            plan.iter().any(|l| l.contains("tollgate_events_newest"))
                && !plan.iter().any(|l| l.contains("Sort"))
                && dropped <= 1,
            "{plan:#?}"
        );

        let plan: Vec<String> = sqlx::query(sqlx::AssertSqlSafe(format!(
            "EXPLAIN SELECT {EVENT_COLUMNS} {HOLD_EVENT_FROM}"
        )))
        .bind("heavy")
        .bind("default")
        .bind("h10001")
        .fetch_all(&pg.pool)
        .await
        .expect("explain")
        .iter()
        .map(|r| r.get::<String, _>(0))
        .collect();
        assert!(
            plan.iter().any(|l| l.contains("tollgate_events_holds")),
            "{plan:#?}"
        );
        let hold = store
            .hold_event("heavy", "default", "h10001")
            .await
            .expect("hold event");
        assert_eq!(hold.map(|e| e.event_id).as_deref(), Some("0-11001-0"));

        // A `kinds` filter of a kind the account has few of reads those events only.
        for q in rare_kinds() {
            let page = store.history(&q).await.expect("history");
            let after = q.after.as_ref().map_or(i64::MAX, |a| a.0);
            assert_eq!(
                page.events.len(),
                (3..20_000)
                    .step_by(2000)
                    .filter(|i| 1000 + i < after)
                    .count()
            );
            let plan: Vec<String> = PgStore::history_query("EXPLAIN ANALYZE ", &q, 100)
                .expect("query")
                .build()
                .fetch_all(&pg.pool)
                .await
                .expect("explain")
                .iter()
                .map(|r| r.get::<String, _>(0))
                .collect();
            let dropped: i64 = plan
                .iter()
                .filter_map(|line| line.split("Rows Removed by Filter: ").nth(1))
                .filter_map(|n| n.trim().parse::<i64>().ok())
                .sum();
            // The most rows a step gave: the rare kind's, not the account's.
            let most = plan
                .iter()
                .filter_map(|line| line.split("(actual ").nth(1)?.split(" rows=").nth(1))
                .filter_map(|n| n.split(' ').next()?.parse::<i64>().ok())
                .max()
                .unwrap_or(0);
            assert!(
                plan.iter().any(|l| l.contains("tollgate_events_kind"))
                    && !plan
                        .iter()
                        .any(|l| l.contains("tollgate_events_newest") || l.contains("Seq Scan"))
                    && dropped <= 1
                    && most <= 10,
                "{q:?}: {plan:#?}"
            );
        }
        sqlx::raw_sql(TIE_EVENTS)
            .execute(&pg.pool)
            .await
            .expect("ties");
        kind_pages_follow_the_history_order(&store).await;
        pg.pool.close().await;
    }

    /// As above, in SQLite (its plan names the index and the range searched).
    #[tokio::test]
    async fn history_pages_and_hold_lookups_read_what_they_return_in_sqlite() {
        let (_files, store) = scratch::sqlite("plans").await;
        let Store::Sqlite(lite) = &store else {
            panic!("a sqlite url opens a SQLite store");
        };
        sqlx::raw_sql(PLAN_EVENTS)
            .execute(&lite.pool)
            .await
            .expect("events");
        let page = store.history(&half_way()).await.expect("history");
        assert_eq!(page.events.len(), 100);
        assert_eq!(page.events[0].event_id, "0-10999-0");

        // SQLite's plan of a history page: one line per step.
        let plan_of = |q: HistoryQuery| async move {
            SqliteStore::history_query("EXPLAIN QUERY PLAN ", &q, 100)
                .expect("query")
                .build()
                .fetch_all(&lite.pool)
                .await
                .expect("explain")
                .iter()
                .map(|r| r.get::<String, _>("detail"))
                .collect::<Vec<String>>()
        };
        let plan = plan_of(half_way()).await;
        assert!(
            plan.iter().any(|l| l.contains("tollgate_events_newest")
                && l.contains("account_id=? AND created_at_ms<?"))
                && !plan.iter().any(|l| l.contains("TEMP B-TREE")),
            "{plan:?}"
        );
        // The first page too: the index is the page's order, nothing is sorted.
        let first = HistoryQuery {
            after: None,
            ..half_way()
        };
        let plan = plan_of(first).await;
        assert!(
            plan.iter().any(|l| l.contains("tollgate_events_newest"))
                && !plan.iter().any(|l| l.contains("TEMP B-TREE")),
            "{plan:?}"
        );

        let plan: Vec<String> = sqlx::query(sqlx::AssertSqlSafe(format!(
            "EXPLAIN QUERY PLAN SELECT {EVENT_COLUMNS} {HOLD_EVENT_FROM}"
        )))
        .bind("heavy")
        .bind("default")
        .bind("h10001")
        .fetch_all(&lite.pool)
        .await
        .expect("explain")
        .iter()
        .map(|r| r.get::<String, _>("detail"))
        .collect();
        assert!(
            plan.iter().any(|l| l.contains("tollgate_events_holds")),
            "{plan:?}"
        );

        // A `kinds` filter of a kind the account has few of reads those events only.
        for q in rare_kinds() {
            let page = store.history(&q).await.expect("history");
            let after = q.after.as_ref().map_or(i64::MAX, |a| a.0);
            assert_eq!(
                page.events.len(),
                (3..20_000)
                    .step_by(2000)
                    .filter(|i| 1000 + i < after)
                    .count()
            );
            let plan = plan_of(q.clone()).await;
            let reads: Vec<&String> = plan
                .iter()
                .filter(|l| l.contains("tollgate_events"))
                .collect();
            // Several kinds: a co-routine per kind, whose page SQLite sorts again to
            // merge them (at most a page each).
            assert!(
                !reads.is_empty()
                    && reads.iter().all(|l| l.contains("tollgate_events_kind")
                        && l.contains("account_id=? AND kind=?"))
                    && (q.kinds.len() > 1 || !plan.iter().any(|l| l.contains("TEMP B-TREE"))),
                "{q:?}: {plan:?}"
            );
        }
        sqlx::raw_sql(TIE_EVENTS)
            .execute(&lite.pool)
            .await
            .expect("ties");
        kind_pages_follow_the_history_order(&store).await;
        lite.pool.close().await;
    }

    /// A delivery backlog as a receiver down for long leaves it (the same text for both
    /// databases): 20,000 deliveries of 200 accounts, each account's older half ended,
    /// the rest pending. Each account's oldest pending delivery heads its queue, tried a
    /// dozen times, its next attempt far off for nine accounts in ten (due for every
    /// tenth); the 49 behind each head were never tried, so are due since they were made.
    const PLAN_DELIVERIES: &str = "WITH RECURSIVE s(i) AS \
        (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i < 19999) \
        INSERT INTO tollgate_webhook_deliveries (delivery_id, account_id, wallet, event_type, \
        position_ms, position_seq, ordinal, payload, status, attempts, next_attempt_at_ms, \
        lease_until_ms, last_error, last_status_code, created_at_ms, delivered_at_ms, \
        is_head) \
        SELECT 'dlv_' || i, 'a' || (i % 200), 'default', 'balance.low', 1000 + i, 0, 0, '{}', \
        CASE WHEN i / 200 < 50 THEN 'delivered' ELSE 'pending' END, \
        CASE WHEN i / 200 < 50 THEN 1 WHEN i / 200 = 50 THEN 12 ELSE 0 END, \
        CASE WHEN i / 200 = 50 AND i % 10 <> 0 THEN 9000000000000 ELSE 1000 + i END, \
        0, '', 0, 1000 + i, 0, CASE WHEN i / 200 = 50 THEN 1 ELSE 0 END FROM s";

    /// When a round asks for due heads.
    const PLAN_NOW_MS: i64 = 1_000_000;
    /// The first 8 due heads (of the 20: the accounts `a0`, `a10`, …), oldest first.
    const PLAN_DUE_HEADS: [&str; 8] = [
        "dlv_10000",
        "dlv_10010",
        "dlv_10020",
        "dlv_10030",
        "dlv_10040",
        "dlv_10050",
        "dlv_10060",
        "dlv_10070",
    ];

    /// A dispatcher round reads the due heads off the heads index, in its order, and
    /// does not read the 9,800 pending deliveries waiting behind them (the anti-join it
    /// replaced read every one).
    #[tokio::test]
    async fn due_deliveries_read_only_the_heads_in_postgres() {
        let (_db, store) = scratch::postgres("tollgate_plans_heads", 1).await;
        let Store::Postgres(pg) = &store else {
            panic!("a postgres url opens a PostgreSQL store");
        };
        sqlx::raw_sql(PLAN_DELIVERIES)
            .execute(&pg.pool)
            .await
            .expect("deliveries");
        sqlx::raw_sql("ANALYZE tollgate_webhook_deliveries")
            .execute(&pg.pool)
            .await
            .expect("analyze");
        let due = store.due_deliveries(PLAN_NOW_MS, 8).await.expect("due");
        let ids: Vec<&str> = due.iter().map(|d| d.delivery_id.as_str()).collect();
        assert_eq!(ids, PLAN_DUE_HEADS);

        let explain = format!(
            "EXPLAIN ANALYZE {}",
            crate::settle::webhook_store::due_query()
        );
        let plan: Vec<String> = sqlx::query(sqlx::AssertSqlSafe(explain))
            .bind(PLAN_NOW_MS)
            .bind(8i64)
            .fetch_all(&pg.pool)
            .await
            .expect("explain")
            .iter()
            .map(|r| r.get::<String, _>(0))
            .collect();
        let dropped: i64 = plan
            .iter()
            .filter_map(|line| line.split("Rows Removed by Filter: ").nth(1))
            .filter_map(|n| n.trim().parse::<i64>().ok())
            .sum();
        assert!(
            plan.iter()
                .any(|l| l.contains("tollgate_webhook_deliveries_due_heads"))
                && !plan
                    .iter()
                    .any(|l| l.contains("Sort") || l.contains("Seq Scan"))
                && dropped == 0,
            "{plan:#?}"
        );
        pg.pool.close().await;
    }

    /// As above, in SQLite (its plan names the index and the range searched).
    #[tokio::test]
    async fn due_deliveries_read_only_the_heads_in_sqlite() {
        let (_files, store) = scratch::sqlite("plans-heads").await;
        let Store::Sqlite(lite) = &store else {
            panic!("a sqlite url opens a SQLite store");
        };
        sqlx::raw_sql(PLAN_DELIVERIES)
            .execute(&lite.pool)
            .await
            .expect("deliveries");
        let due = store.due_deliveries(PLAN_NOW_MS, 8).await.expect("due");
        let ids: Vec<&str> = due.iter().map(|d| d.delivery_id.as_str()).collect();
        assert_eq!(ids, PLAN_DUE_HEADS);
        let explain = format!(
            "EXPLAIN QUERY PLAN {}",
            crate::settle::webhook_store::due_query()
        );
        let plan: Vec<String> = sqlx::query(sqlx::AssertSqlSafe(explain))
            .bind(PLAN_NOW_MS)
            .bind(8i64)
            .fetch_all(&lite.pool)
            .await
            .expect("explain")
            .iter()
            .map(|r| r.get::<String, _>("detail"))
            .collect();
        assert!(
            plan.iter()
                .any(|l| l.contains("tollgate_webhook_deliveries_due_heads")
                    && l.contains("next_attempt_at_ms<?"))
                && !plan.iter().any(|l| l.contains("TEMP B-TREE")),
            "{plan:?}"
        );
        assert_eq!(plan.len(), 1, "one index range, nothing else: {plan:?}");
        lite.pool.close().await;
    }

    #[test]
    fn an_in_memory_sqlite_store_is_refused() {
        for url in [
            "sqlite://:memory:",
            "sqlite://:MEMORY:",
            "sqlite://:memory:?cache=shared",
            "sqlite://file::memory:",
            "sqlite://file::memory:?cache=shared",
            "sqlite://ledger.db?mode=memory",
            "sqlite://file:ledger?cache=shared&mode=memory",
        ] {
            let err = Store::check_url(url).expect_err(url);
            assert!(
                matches!(&err, StoreError::BadUrl(why) if why.contains("in-memory")),
                "{url}: {err}"
            );
            let err = Store::connect_lazy(url, 1).err();
            assert!(
                matches!(&err, Some(StoreError::BadUrl(why)) if why.contains("in-memory")),
                "{url}: {err:?}"
            );
        }
        for url in [
            "sqlite://tollgate.db",
            "sqlite:///var/lib/tollgate/ledger.db",
            "sqlite://memory.db",
            "sqlite://./:memory:.db",
            "sqlite://ledger.db?mode=rwc",
        ] {
            assert!(Store::check_url(url).is_ok(), "{url}");
        }
    }
}
