//! The durable side of usage webhooks (schema version 2): wallet alert state read inside a
//! batch's transaction, per-account thresholds, tracked expiring lots, and the deliveries
//! table the dispatcher works from. Written once for both drivers (`webhook_store_impl!`),
//! like `store.rs`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use sqlx::{QueryBuilder, Row};

use super::store::{PgStore, SqliteStore, Store, StoreError};
use crate::ledger::event::LedgerEvent;
use crate::webhooks::rules::{lot_deltas, NewDelivery, Threshold, WalletState, WebhookType};

/// Wallets per `WHERE (..) OR (..)` lookup (two parameters each).
const LOOKUP_WALLETS_MAX: usize = 500;
/// Rows per multi-row INSERT (16 parameters a delivery row).
const INSERT_ROWS_MAX: usize = 1000;
/// Deliveries per ListWebhookDeliveries page.
pub const DELIVERIES_PAGE_MAX: u32 = 1000;

pub const STATUS_PENDING: &str = "pending";
pub const STATUS_DELIVERED: &str = "delivered";
pub const STATUS_FAILED: &str = "failed";

/// One delivery as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub delivery_id: String,
    pub account_id: String,
    pub wallet: String,
    pub event_type: String,
    pub payload: String,
    /// pending | delivered | failed
    pub status: String,
    /// Every attempt made, across manual retries.
    pub attempts: i64,
    /// Attempts made before the current round: 0, or `attempts` as it was when Admin
    /// RetryWebhookDelivery last put the delivery back. A round gives up after
    /// `attempts_max` attempts of its own.
    pub round_start_attempts: i64,
    pub created_at_ms: i64,
    pub next_attempt_at_ms: i64,
    /// 0 until delivered.
    pub delivered_at_ms: i64,
    pub last_error: String,
    /// 0 = no HTTP response.
    pub last_status_code: i64,
    /// Order within the account: (stream ms, stream seq, ordinal).
    pub position: (i64, i64, i64),
}

impl Delivery {
    /// Attempts made in the current round (since the last manual retry).
    pub fn round_attempts(&self) -> i64 {
        self.attempts - self.round_start_attempts
    }
}

/// A ListWebhookDeliveries query: newest first.
#[derive(Debug, Clone, Default)]
pub struct DeliveryQuery {
    pub account_id: Option<String>,
    pub status: Option<String>,
    pub event_type: Option<String>,
    pub page_size: u32,
    /// Continue after this delivery (its position and id).
    pub after: Option<DeliveryCursor>,
}

/// Where a page of deliveries ends: newest first by position, then id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryCursor {
    pub position: (i64, i64, i64),
    pub delivery_id: String,
}

#[derive(Debug, Clone, Default)]
pub struct DeliveryPage {
    pub deliveries: Vec<Delivery>,
    pub next: Option<DeliveryCursor>,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptOutcome {
    Delivered {
        status_code: i64,
    },
    /// Try again at `next_attempt_at_ms`, or give up (status "failed") when `give_up`.
    Failed {
        status_code: i64,
        error: String,
        next_attempt_at_ms: i64,
        give_up: bool,
    },
}

/// A lot that expires soon with credits left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiringLot {
    pub account_id: String,
    pub wallet: String,
    pub lot_id: String,
    pub expires_at_ms: i64,
    pub remaining: i64,
}

const DELIVERY_COLUMNS: &str = "delivery_id, account_id, wallet, event_type, payload, status, \
    attempts, created_at_ms, next_attempt_at_ms, delivered_at_ms, last_error, last_status_code, \
    position_ms, position_seq, ordinal, round_start_attempts";

fn delivery_from_row<R: Row>(r: &R) -> Result<Delivery, sqlx::Error>
where
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    Ok(Delivery {
        delivery_id: r.try_get("delivery_id")?,
        account_id: r.try_get("account_id")?,
        wallet: r.try_get("wallet")?,
        event_type: r.try_get("event_type")?,
        payload: r.try_get("payload")?,
        status: r.try_get("status")?,
        attempts: r.try_get("attempts")?,
        round_start_attempts: r.try_get("round_start_attempts")?,
        created_at_ms: r.try_get("created_at_ms")?,
        next_attempt_at_ms: r.try_get("next_attempt_at_ms")?,
        delivered_at_ms: r.try_get("delivered_at_ms")?,
        last_error: r.try_get("last_error")?,
        last_status_code: r.try_get("last_status_code")?,
        position: (
            r.try_get("position_ms")?,
            r.try_get("position_seq")?,
            r.try_get("ordinal")?,
        ),
    })
}

/// The due heads of the accounts' queues, in the order a round takes them: read off the
/// partial index of heads (schema_v13.sql), so a round reads what it returns, however
/// many deliveries wait behind the heads. `$1` now, `$2` the most to return.
pub(crate) fn due_query() -> String {
    format!(
        "SELECT {DELIVERY_COLUMNS} FROM tollgate_webhook_deliveries \
         WHERE is_head = 1 AND status = 'pending' AND next_attempt_at_ms <= $1 \
         AND lease_until_ms <= $1 \
         ORDER BY next_attempt_at_ms, position_ms, position_seq, ordinal LIMIT $2"
    )
}

/// The id of the oldest pending delivery of the account in `account` (a column of the
/// enclosing statement), or NULL: the head its queue should have. One entry of the
/// pending index (more only between deliveries of equal position).
fn oldest_pending(account: &str) -> String {
    format!(
        "SELECT e.delivery_id FROM tollgate_webhook_deliveries e \
         WHERE e.account_id = {account} AND e.status = 'pending' \
         ORDER BY e.position_ms, e.position_seq, e.ordinal, e.delivery_id LIMIT 1"
    )
}

/// PostgreSQL advisory locks of webhook queues use the two-key form with this first key
/// (the migration's lock is a one-key lock: another key space).
const QUEUE_LOCK_CLASS: i32 = 7_157_681;

/// The second key of an account's queue lock: FNV-1a of its id, the same in every
/// process and build. Two accounts may share one, and then only take turns.
fn queue_lock_key(account_id: &str) -> i32 {
    let mut hash: u32 = 0x811c_9dc5;
    for b in account_id.bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    i32::from_ne_bytes(hash.to_ne_bytes())
}

impl PgStore {
    /// Locks the webhook queues of `accounts` until the transaction ends, in key order
    /// (no two transactions wait for each other's). Whatever changes which delivery
    /// heads a queue (deliveries inserted, one ended, one put back) takes it before it
    /// writes, so the head is moved by one transaction at a time, each seeing the
    /// others' committed rows: without it, a settler inserting into a queue whose head
    /// a dispatcher is ending could leave it with no head (each seeing the other's row
    /// as it was) and the queue would wait for ever.
    async fn lock_queues(
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        accounts: &BTreeSet<&str>,
    ) -> Result<(), StoreError> {
        let mut keys: Vec<i32> = accounts.iter().map(|a| queue_lock_key(a)).collect();
        keys.sort_unstable();
        keys.dedup();
        if keys.is_empty() {
            return Ok(());
        }
        // A volatile function in the select list runs after the ORDER BY, row by row.
        sqlx::query(
            "SELECT pg_advisory_xact_lock($1, k) \
             FROM unnest($2::int4[]) WITH ORDINALITY AS t(k, n) ORDER BY n",
        )
        .bind(QUEUE_LOCK_CLASS)
        .bind(keys)
        .fetch_all(&mut **tx)
        .await?;
        Ok(())
    }
}

impl SqliteStore {
    /// Nothing to lock: a SQLite transaction that writes holds the database's write lock.
    async fn lock_queues(
        _tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
        _accounts: &BTreeSet<&str>,
    ) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Per-lot sums of the credit changes of events in lots that expire.
fn lot_changes(events: &[&LedgerEvent]) -> BTreeMap<(String, String, String), (i64, i64)> {
    let mut lots: BTreeMap<(String, String, String), (i64, i64)> = BTreeMap::new();
    for e in events {
        for (lot_id, expires, delta) in lot_deltas(e) {
            let entry = lots
                .entry((e.account_id.clone(), e.wallet.clone(), lot_id.to_owned()))
                .or_default();
            entry.0 = entry.0.max(expires.unwrap_or(0));
            entry.1 += delta;
        }
    }
    lots
}

macro_rules! webhook_store_impl {
    ($store:ident, $db:ty, $lock_rows:expr, $claim_new_wallets:expr) => {
        impl $store {
            /// Stored alert state of wallets, locked for the batch's transaction.
            pub(crate) async fn wallet_states(
                &self,
                tx: &mut sqlx::Transaction<'_, $db>,
                keys: &[(String, String)],
            ) -> Result<HashMap<(String, String), WalletState>, StoreError> {
                let mut out = HashMap::with_capacity(keys.len());
                Self::read_states(tx, keys, &mut out).await?;
                let new: Vec<(String, String)> = keys
                    .iter()
                    .filter(|k| !out.contains_key(*k))
                    .cloned()
                    .collect();
                if $claim_new_wallets && !new.is_empty() {
                    // A wallet without a row has nothing to lock, and another settler's
                    // uncommitted batch may be judging the same new wallet: both would
                    // start from an empty state and both alert. An empty row claims it
                    // (waiting for that batch to commit when it inserted the row first),
                    // then the rows are read again, locked. The batch's own summary
                    // upsert fills the row before it commits.
                    //
                    // The claims go in key order, but a batch locks the rows it found
                    // (above) before the ones it claims, so two batches' lock orders can
                    // cross when a third commits between their reads, and PostgreSQL
                    // then finds a deadlock: U finds neither wallet x nor y (x < y) and
                    // inserts x; V, which had inserted y, commits; T finds y, locks it,
                    // and waits for U's x; U's insert of y does nothing (V's row is
                    // there) and its locked read of y waits for T. PostgreSQL aborts one
                    // of the two (after deadlock_timeout, 1 s by default): its whole
                    // transaction rolls back and `Settler::commit` writes the batch again
                    // (a store error, logged and counted, retried with backoff). A delay,
                    // nothing written wrong.
                    for chunk in new.chunks(INSERT_ROWS_MAX) {
                        let mut qb = QueryBuilder::<$db>::new(
                            "INSERT INTO tollgate_wallets (account_id, wallet, granted, used, \
                             expired, refunded, adjusted, available, held, last_stream_ms, \
                             last_stream_seq, events) ",
                        );
                        qb.push_values(chunk, |mut b, (account, wallet)| {
                            b.push_bind(account.clone()).push_bind(wallet.clone());
                            for _ in 0..10 {
                                b.push_bind(0i64);
                            }
                        });
                        qb.push(" ON CONFLICT (account_id, wallet) DO NOTHING");
                        qb.build().execute(&mut **tx).await?;
                    }
                    Self::read_states(tx, &new, &mut out).await?;
                }
                Ok(out)
            }

            async fn read_states(
                tx: &mut sqlx::Transaction<'_, $db>,
                keys: &[(String, String)],
                out: &mut HashMap<(String, String), WalletState>,
            ) -> Result<(), StoreError> {
                for chunk in keys.chunks(LOOKUP_WALLETS_MAX) {
                    let mut qb = QueryBuilder::<$db>::new(
                        "SELECT account_id, wallet, available, last_stream_ms, last_stream_seq, \
                         last_grant, low_alerted, exhausted_alerted FROM tollgate_wallets WHERE ",
                    );
                    push_wallet_filter(&mut qb, chunk);
                    qb.push($lock_rows);
                    for r in qb.build().fetch_all(&mut **tx).await? {
                        let key = (r.try_get("account_id")?, r.try_get("wallet")?);
                        let state = WalletState {
                            available: r.try_get("available")?,
                            last: (r.try_get("last_stream_ms")?, r.try_get("last_stream_seq")?),
                            last_grant: r.try_get("last_grant")?,
                            low_alerted: r.try_get::<i64, _>("low_alerted")? == 1,
                            exhausted_alerted: r.try_get::<i64, _>("exhausted_alerted")? == 1,
                        };
                        out.insert(key, state);
                    }
                }
                Ok(())
            }

            /// Thresholds set for these wallets through the Admin API.
            pub(crate) async fn threshold_overrides(
                &self,
                tx: &mut sqlx::Transaction<'_, $db>,
                keys: &[(String, String)],
            ) -> Result<HashMap<(String, String), Threshold>, StoreError> {
                let mut out = HashMap::new();
                for chunk in keys.chunks(LOOKUP_WALLETS_MAX) {
                    let mut qb = QueryBuilder::<$db>::new(
                        "SELECT account_id, wallet, low_balance, low_balance_percent \
                         FROM tollgate_balance_thresholds WHERE ",
                    );
                    push_wallet_filter(&mut qb, chunk);
                    for r in qb.build().fetch_all(&mut **tx).await? {
                        let percent: i64 = r.try_get("low_balance_percent")?;
                        out.insert(
                            (r.try_get("account_id")?, r.try_get("wallet")?),
                            Threshold {
                                low_balance: r.try_get("low_balance")?,
                                low_balance_percent: u32::try_from(percent).unwrap_or(0),
                            },
                        );
                    }
                }
                Ok(out)
            }

            /// Records deliveries (a delivery id already present is left alone); returns
            /// how many were new, per type.
            pub(crate) async fn insert_deliveries(
                &self,
                tx: &mut sqlx::Transaction<'_, $db>,
                deliveries: &[NewDelivery],
            ) -> Result<[u64; 5], StoreError> {
                let mut created = [0u64; 5];
                let now = crate::ledger::wall_clock_ms();
                let accounts: BTreeSet<&str> =
                    deliveries.iter().map(|d| d.account_id.as_str()).collect();
                Self::lock_queues(tx, &accounts).await?;
                let mut touched = BTreeSet::new();
                for chunk in deliveries.chunks(INSERT_ROWS_MAX) {
                    let mut qb = QueryBuilder::<$db>::new(
                        "INSERT INTO tollgate_webhook_deliveries (delivery_id, account_id, \
                         wallet, event_type, position_ms, position_seq, ordinal, payload, \
                         status, attempts, next_attempt_at_ms, lease_until_ms, last_error, \
                         last_status_code, created_at_ms, delivered_at_ms) ",
                    );
                    qb.push_values(chunk.iter(), |mut b, d| {
                        b.push_bind(d.delivery_id.clone())
                            .push_bind(d.account_id.clone())
                            .push_bind(d.wallet.clone())
                            .push_bind(d.event_type.as_str())
                            .push_bind(d.position.0)
                            .push_bind(d.position.1)
                            .push_bind(d.position.2)
                            .push_bind(d.payload.clone())
                            .push_bind(STATUS_PENDING)
                            .push_bind(0i64)
                            .push_bind(now)
                            .push_bind(0i64)
                            .push_bind("")
                            .push_bind(0i64)
                            .push_bind(d.created_at_ms)
                            .push_bind(0i64);
                    });
                    qb.push(
                        " ON CONFLICT (delivery_id) DO NOTHING RETURNING account_id, event_type",
                    );
                    for r in qb.build().fetch_all(&mut **tx).await? {
                        let name: String = r.try_get("event_type")?;
                        if let Some(t) = WebhookType::parse(&name) {
                            created[t as usize] += 1;
                        }
                        touched.insert(r.try_get::<String, _>("account_id")?);
                    }
                }
                let touched: Vec<&str> = touched.iter().map(String::as_str).collect();
                Self::mark_heads(tx, &touched).await?;
                Ok(created)
            }

            /// Moves the head marks of these accounts' queues to their oldest pending
            /// deliveries, after their queues changed (under `lock_queues`). Two
            /// statements per 500 accounts, each reading the heads index and one entry of
            /// the pending index per account; a mark already right is not written.
            async fn mark_heads(
                tx: &mut sqlx::Transaction<'_, $db>,
                accounts: &[&str],
            ) -> Result<(), StoreError> {
                for chunk in accounts.chunks(LOOKUP_WALLETS_MAX) {
                    // Heads that are no longer their queue's oldest pending delivery.
                    let mut qb = QueryBuilder::<$db>::new(format!(
                        "UPDATE tollgate_webhook_deliveries SET is_head = 0 \
                         WHERE is_head = 1 AND delivery_id <> COALESCE(({}), '') \
                         AND account_id IN (",
                        oldest_pending("tollgate_webhook_deliveries.account_id")
                    ));
                    let mut list = qb.separated(", ");
                    for account in chunk {
                        list.push_bind(account.to_string());
                    }
                    qb.push(")");
                    qb.build().execute(&mut **tx).await?;
                    // The oldest pending delivery of each, where it is not marked yet.
                    let mut qb = QueryBuilder::<$db>::new("WITH a (account_id) AS (VALUES ");
                    let mut list = qb.separated(", ");
                    for account in chunk {
                        list.push("(").push_bind_unseparated(account.to_string());
                        list.push_unseparated(")");
                    }
                    qb.push(format!(
                        ") UPDATE tollgate_webhook_deliveries SET is_head = 1 \
                         WHERE is_head = 0 AND delivery_id IN (SELECT ({}) FROM a)",
                        oldest_pending("a.account_id")
                    ));
                    qb.build().execute(&mut **tx).await?;
                }
                Ok(())
            }

            /// The account a delivery belongs to (it never changes), to lock its queue
            /// before the delivery is written.
            async fn delivery_account(
                &self,
                delivery_id: &str,
            ) -> Result<Option<String>, StoreError> {
                Ok(sqlx::query_scalar::<_, String>(
                    "SELECT account_id FROM tollgate_webhook_deliveries WHERE delivery_id = $1",
                )
                .bind(delivery_id.to_owned())
                .fetch_optional(&self.pool)
                .await?)
            }

            /// Keeps the credits left in expiring lots current (for lot.expiring): every
            /// expiring lot the events touch gets its row (`only_tracked` false, while
            /// lot.expiring is delivered), or only the lots that already have one
            /// (`only_tracked`, while it is not: no row is made, so the table does not
            /// grow where nothing reads it, but a lot tracked before keeps its credits
            /// left right, instead of announcing stale ones once it is turned back on).
            /// One statement per 1,000 lots, none when no event touches an expiring lot.
            ///
            /// The rows are written in (account, wallet, lot) order either way, so two
            /// settlers touching the same lots lock them in the same order.
            pub(crate) async fn track_lots(
                &self,
                tx: &mut sqlx::Transaction<'_, $db>,
                events: &[&LedgerEvent],
                only_tracked: bool,
            ) -> Result<(), StoreError> {
                let changes: Vec<_> = lot_changes(events).into_iter().collect();
                for chunk in changes.chunks(INSERT_ROWS_MAX) {
                    let mut qb = if only_tracked {
                        // The same upsert, from the rows that already exist: an INSERT
                        // (not an UPDATE over a join, whose lock order is the plan's) that
                        // meets its conflict on every row it keeps. SQLite needs the WHERE
                        // to parse an upsert from a SELECT.
                        QueryBuilder::<$db>::new(
                            "WITH changes (account_id, wallet, lot_id, expires_at_ms, \
                             remaining, expiring_notified) AS (",
                        )
                    } else {
                        QueryBuilder::<$db>::new(
                            "INSERT INTO tollgate_lots (account_id, wallet, lot_id, \
                             expires_at_ms, remaining, expiring_notified) ",
                        )
                    };
                    qb.push_values(chunk.iter(), |mut b, ((account, wallet, lot), (expires, delta))| {
                        b.push_bind(account.clone())
                            .push_bind(wallet.clone())
                            .push_bind(lot.clone())
                            .push_bind(*expires)
                            .push_bind(*delta)
                            .push_bind(0i64);
                    });
                    if only_tracked {
                        qb.push(
                            ") INSERT INTO tollgate_lots (account_id, wallet, lot_id, \
                             expires_at_ms, remaining, expiring_notified) \
                             SELECT account_id, wallet, lot_id, expires_at_ms, remaining, \
                             expiring_notified FROM changes WHERE EXISTS (SELECT 1 FROM \
                             tollgate_lots t WHERE t.account_id = changes.account_id \
                             AND t.wallet = changes.wallet AND t.lot_id = changes.lot_id) \
                             ORDER BY account_id, wallet, lot_id",
                        );
                    }
                    qb.push(
                        " ON CONFLICT (account_id, wallet, lot_id) DO UPDATE SET \
                         remaining = tollgate_lots.remaining + excluded.remaining, \
                         expires_at_ms = CASE WHEN excluded.expires_at_ms > 0 \
                         THEN excluded.expires_at_ms ELSE tollgate_lots.expires_at_ms END",
                    );
                    qb.build().execute(&mut **tx).await?;
                }
                Ok(())
            }

            pub async fn set_threshold(
                &self,
                account_id: &str,
                wallet: &str,
                threshold: Option<Threshold>,
            ) -> Result<(), StoreError> {
                match threshold {
                    Some(t) => {
                        sqlx::query(
                            "INSERT INTO tollgate_balance_thresholds (account_id, wallet, \
                             low_balance, low_balance_percent, updated_at_ms) \
                             VALUES ($1, $2, $3, $4, $5) \
                             ON CONFLICT (account_id, wallet) DO UPDATE SET \
                             low_balance = excluded.low_balance, \
                             low_balance_percent = excluded.low_balance_percent, \
                             updated_at_ms = excluded.updated_at_ms",
                        )
                        .bind(account_id.to_owned())
                        .bind(wallet.to_owned())
                        .bind(t.low_balance)
                        .bind(i64::from(t.low_balance_percent))
                        .bind(crate::ledger::wall_clock_ms())
                        .execute(&self.pool)
                        .await?;
                    }
                    None => {
                        sqlx::query(
                            "DELETE FROM tollgate_balance_thresholds \
                             WHERE account_id = $1 AND wallet = $2",
                        )
                        .bind(account_id.to_owned())
                        .bind(wallet.to_owned())
                        .execute(&self.pool)
                        .await?;
                    }
                }
                Ok(())
            }

            pub async fn threshold_override(
                &self,
                account_id: &str,
                wallet: &str,
            ) -> Result<Option<Threshold>, StoreError> {
                let row = sqlx::query(
                    "SELECT low_balance, low_balance_percent FROM tollgate_balance_thresholds \
                     WHERE account_id = $1 AND wallet = $2",
                )
                .bind(account_id.to_owned())
                .bind(wallet.to_owned())
                .fetch_optional(&self.pool)
                .await?;
                match row {
                    None => Ok(None),
                    Some(r) => {
                        let percent: i64 = r.try_get("low_balance_percent")?;
                        Ok(Some(Threshold {
                            low_balance: r.try_get("low_balance")?,
                            low_balance_percent: u32::try_from(percent).unwrap_or(0),
                        }))
                    }
                }
            }

            /// Due deliveries that head their account's queue (the oldest pending one
            /// of each account, marked `is_head`), unleased.
            pub async fn due_deliveries(
                &self,
                now_ms: i64,
                limit: u32,
            ) -> Result<Vec<Delivery>, StoreError> {
                let rows = sqlx::query(sqlx::AssertSqlSafe(due_query()))
                .bind(now_ms)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                Ok(rows
                    .iter()
                    .map(delivery_from_row)
                    .collect::<Result<Vec<_>, _>>()?)
            }

            /// Takes a delivery for `until_ms`, as it was read with `seen_attempts`
            /// attempts (compare-and-set: false if another dispatcher holds it, it is no
            /// longer pending, it is not due yet, an attempt was made since it was read,
            /// or it no longer heads its queue: an older delivery was inserted or put
            /// back since, and goes first; or another delivery of its account holds a
            /// live lease: one in flight per account, across dispatchers). The last two keep a dispatcher leasing from a list read earlier
            /// in its round from skipping the retry backoff: another dispatcher may have
            /// leased it, failed and released it with `next_attempt_at_ms` in the future
            /// meanwhile, and only those two columns tell.
            pub async fn lease_delivery(
                &self,
                delivery_id: &str,
                seen_attempts: i64,
                now_ms: i64,
                until_ms: i64,
            ) -> Result<bool, StoreError> {
                // Nor while another delivery of the account is in flight (a live lease):
                // an older event settled late takes the queue's head from the one a
                // dispatcher is sending, and its delivery waits for that attempt to end.
                // The literal `lease_until_ms > 0` lets both databases read the partial
                // index of leased deliveries (schema_v14.sql), not the account's backlog.
                let done = sqlx::query(
                    "UPDATE tollgate_webhook_deliveries SET lease_until_ms = $1 \
                     WHERE delivery_id = $2 AND status = 'pending' AND lease_until_ms <= $3 \
                     AND next_attempt_at_ms <= $3 AND attempts = $4 AND is_head = 1 \
                     AND NOT EXISTS (SELECT 1 FROM tollgate_webhook_deliveries AS other \
                       WHERE other.account_id = tollgate_webhook_deliveries.account_id \
                       AND other.status = 'pending' AND other.lease_until_ms > 0 \
                       AND other.lease_until_ms > $3 \
                       AND other.delivery_id <> $2)",
                )
                .bind(until_ms)
                .bind(delivery_id.to_owned())
                .bind(now_ms)
                .bind(seen_attempts)
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected() == 1)
            }

            /// Records an attempt and releases the lease, if the lease is still the one
            /// the attempt was made under (`lease_until_ms`, as `lease_delivery` set it):
            /// false when it is not — the attempt outlived its lease and another
            /// dispatcher took the delivery — and then nothing is written, so a late
            /// answer cannot overwrite what the newer attempt recorded. An attempt that
            /// ends the delivery (delivered, or given up) passes its queue's head on to
            /// the next pending delivery, in the same transaction.
            pub async fn finish_attempt(
                &self,
                delivery_id: &str,
                lease_until_ms: i64,
                now_ms: i64,
                outcome: &AttemptOutcome,
            ) -> Result<bool, StoreError> {
                let ends = match outcome {
                    AttemptOutcome::Delivered { .. } => true,
                    AttemptOutcome::Failed { give_up, .. } => *give_up,
                };
                let account = if ends {
                    match self.delivery_account(delivery_id).await? {
                        Some(account) => Some(account),
                        None => return Ok(false),
                    }
                } else {
                    None
                };
                let accounts: BTreeSet<&str> = account.iter().map(String::as_str).collect();
                let mut tx = self.pool.begin().await?;
                Self::lock_queues(&mut tx, &accounts).await?;
                let done = match outcome {
                    AttemptOutcome::Delivered { status_code } => {
                        sqlx::query(
                            "UPDATE tollgate_webhook_deliveries SET status = 'delivered', \
                             attempts = attempts + 1, delivered_at_ms = $1, lease_until_ms = 0, \
                             last_status_code = $2, last_error = '', is_head = 0 \
                             WHERE delivery_id = $3 AND lease_until_ms = $4",
                        )
                        .bind(now_ms)
                        .bind(*status_code)
                        .bind(delivery_id.to_owned())
                        .bind(lease_until_ms)
                        .execute(&mut *tx)
                        .await?
                    }
                    AttemptOutcome::Failed {
                        status_code,
                        error,
                        next_attempt_at_ms,
                        give_up,
                    } => {
                        sqlx::query(
                            "UPDATE tollgate_webhook_deliveries SET status = $1, \
                             attempts = attempts + 1, next_attempt_at_ms = $2, \
                             lease_until_ms = 0, last_status_code = $3, last_error = $4, \
                             is_head = $7 * is_head \
                             WHERE delivery_id = $5 AND lease_until_ms = $6",
                        )
                        .bind(if *give_up { STATUS_FAILED } else { STATUS_PENDING })
                        .bind(*next_attempt_at_ms)
                        .bind(*status_code)
                        .bind(error.clone())
                        .bind(delivery_id.to_owned())
                        .bind(lease_until_ms)
                        .bind(if *give_up { 0i64 } else { 1i64 })
                        .execute(&mut *tx)
                        .await?
                    }
                };
                if done.rows_affected() != 1 {
                    return Ok(false);
                }
                if let Some(account) = &account {
                    Self::mark_heads(&mut tx, &[account.as_str()]).await?;
                }
                tx.commit().await?;
                Ok(true)
            }

            pub async fn list_deliveries(
                &self,
                q: &DeliveryQuery,
            ) -> Result<DeliveryPage, StoreError> {
                let page_size = q.page_size.clamp(1, DELIVERIES_PAGE_MAX);
                let mut qb = QueryBuilder::<$db>::new(format!(
                    "SELECT {DELIVERY_COLUMNS} FROM tollgate_webhook_deliveries WHERE 1 = 1"
                ));
                if let Some(account) = &q.account_id {
                    qb.push(" AND account_id = ").push_bind(account.clone());
                }
                if let Some(status) = &q.status {
                    qb.push(" AND status = ").push_bind(status.clone());
                }
                if let Some(t) = &q.event_type {
                    qb.push(" AND event_type = ").push_bind(t.clone());
                }
                if let Some(c) = &q.after {
                    qb.push(" AND (position_ms, position_seq, ordinal, delivery_id) < (")
                        .push_bind(c.position.0)
                        .push(", ")
                        .push_bind(c.position.1)
                        .push(", ")
                        .push_bind(c.position.2)
                        .push(", ")
                        .push_bind(c.delivery_id.clone())
                        .push(")");
                }
                qb.push(
                    " ORDER BY position_ms DESC, position_seq DESC, ordinal DESC, \
                     delivery_id DESC LIMIT ",
                )
                .push_bind(i64::from(page_size) + 1);
                let rows = qb.build().fetch_all(&self.pool).await?;
                let mut deliveries = rows
                    .iter()
                    .map(delivery_from_row)
                    .collect::<Result<Vec<_>, _>>()?;
                let next = if deliveries.len() > page_size as usize {
                    deliveries.truncate(page_size as usize);
                    deliveries.last().map(|d| DeliveryCursor {
                        position: d.position,
                        delivery_id: d.delivery_id.clone(),
                    })
                } else {
                    None
                };
                Ok(DeliveryPage { deliveries, next })
            }

            pub async fn delivery(&self, delivery_id: &str) -> Result<Option<Delivery>, StoreError> {
                let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {DELIVERY_COLUMNS} FROM tollgate_webhook_deliveries \
                     WHERE delivery_id = $1"
                )))
                .bind(delivery_id.to_owned())
                .fetch_optional(&self.pool)
                .await?;
                Ok(row.as_ref().map(delivery_from_row).transpose()?)
            }

            /// Puts a given-up delivery back in its queue for a new round of attempts
            /// (`attempts` keeps counting; the round starts at its current value,
            /// `round_start_attempts`). False if it is not "failed". It heads its queue
            /// again if it is the oldest pending delivery there. The delivery as the retry
            /// left it (read in its transaction, before a dispatcher can attempt it), or
            /// `None` if it was not "failed".
            pub async fn retry_delivery(
                &self,
                delivery_id: &str,
                now_ms: i64,
            ) -> Result<Option<Delivery>, StoreError> {
                let Some(account) = self.delivery_account(delivery_id).await? else {
                    return Ok(None);
                };
                let mut tx = self.pool.begin().await?;
                Self::lock_queues(&mut tx, &BTreeSet::from([account.as_str()])).await?;
                let done = sqlx::query(
                    "UPDATE tollgate_webhook_deliveries SET status = 'pending', \
                     next_attempt_at_ms = $1, lease_until_ms = 0, round_start_attempts = attempts \
                     WHERE delivery_id = $2 AND status = 'failed'",
                )
                .bind(now_ms)
                .bind(delivery_id.to_owned())
                .execute(&mut *tx)
                .await?;
                if done.rows_affected() != 1 {
                    return Ok(None);
                }
                Self::mark_heads(&mut tx, &[account.as_str()]).await?;
                let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {DELIVERY_COLUMNS} FROM tollgate_webhook_deliveries \
                     WHERE delivery_id = $1"
                )))
                .bind(delivery_id.to_owned())
                .fetch_one(&mut *tx)
                .await?;
                let retried = delivery_from_row(&row)?;
                tx.commit().await?;
                Ok(Some(retried))
            }

            /// Lots with credits left that expire in (now, until], not yet announced.
            pub async fn expiring_lots(
                &self,
                now_ms: i64,
                until_ms: i64,
                limit: u32,
            ) -> Result<Vec<ExpiringLot>, StoreError> {
                let rows = sqlx::query(
                    "SELECT account_id, wallet, lot_id, expires_at_ms, remaining \
                     FROM tollgate_lots WHERE expiring_notified = 0 AND expires_at_ms > $1 \
                     AND expires_at_ms <= $2 AND remaining > 0 \
                     ORDER BY expires_at_ms LIMIT $3",
                )
                .bind(now_ms)
                .bind(until_ms)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|r| {
                        Ok(ExpiringLot {
                            account_id: r.try_get("account_id")?,
                            wallet: r.try_get("wallet")?,
                            lot_id: r.try_get("lot_id")?,
                            expires_at_ms: r.try_get("expires_at_ms")?,
                            remaining: r.try_get("remaining")?,
                        })
                    })
                    .collect::<Result<Vec<_>, sqlx::Error>>()
                    .map_err(StoreError::from)
            }

            /// Marks a lot announced and records its lot.expiring delivery, once.
            pub async fn announce_expiring(
                &self,
                lot: &ExpiringLot,
                delivery: &NewDelivery,
            ) -> Result<bool, StoreError> {
                let mut tx = self.pool.begin().await?;
                // The queue first, as the settler takes it before the lots it tracks.
                Self::lock_queues(&mut tx, &BTreeSet::from([lot.account_id.as_str()])).await?;
                let done = sqlx::query(
                    "UPDATE tollgate_lots SET expiring_notified = 1 WHERE account_id = $1 \
                     AND wallet = $2 AND lot_id = $3 AND expiring_notified = 0",
                )
                .bind(lot.account_id.clone())
                .bind(lot.wallet.clone())
                .bind(lot.lot_id.clone())
                .execute(&mut *tx)
                .await?;
                if done.rows_affected() != 1 {
                    return Ok(false);
                }
                self.insert_deliveries(&mut tx, std::slice::from_ref(delivery))
                    .await?;
                tx.commit().await?;
                Ok(true)
            }

            /// Deletes up to `limit` delivered or failed deliveries whose event is older
            /// than `before_ms` (pending ones stay until they end); returns how many.
            pub async fn prune_deliveries(
                &self,
                before_ms: i64,
                limit: i64,
            ) -> Result<u64, StoreError> {
                let done = sqlx::query(
                    "DELETE FROM tollgate_webhook_deliveries WHERE delivery_id IN \
                     (SELECT delivery_id FROM tollgate_webhook_deliveries \
                      WHERE position_ms < $1 AND status <> 'pending' \
                      ORDER BY position_ms LIMIT $2)",
                )
                .bind(before_ms)
                .bind(limit)
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected())
            }

            /// Forgets tracked lots that expired before `before_ms`, and rows of unknown
            /// expiry (0): an `expire_lot` names its lot without the expiry, so when the
            /// lot's row was already gone (pruned, or the lot granted before lot webhooks
            /// were on) it makes a row that can never be announced and would stay for good.
            pub async fn prune_lots(&self, before_ms: i64) -> Result<u64, StoreError> {
                let done = sqlx::query("DELETE FROM tollgate_lots WHERE expires_at_ms < $1")
                .bind(before_ms)
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected())
            }

            /// Marks the heads of queues a build before schema v13 left unmarked (it
            /// does not keep the marks: during a rolling upgrade an older pod can insert
            /// into an empty queue, or end a head without handing it on, and that queue
            /// would not be tried again): accounts with pending deliveries and no pending
            /// head, a head that has ended, or a pending delivery older than the marked
            /// head (an older pod's RetryWebhookDelivery put it back unmarked). Each is
            /// locked and marked as `mark_heads` does. Reads every pending delivery
            /// (28–35 ms at 200,000 on PostgreSQL): the dispatcher runs it when it starts
            /// and every `HEAD_REPAIR_INTERVAL`. Returns how many queues it marked.
            pub async fn repair_heads(&self) -> Result<u64, StoreError> {
                let found: Vec<String> = sqlx::query_scalar(
                    "SELECT DISTINCT account_id FROM tollgate_webhook_deliveries d \
                     WHERE d.status = 'pending' AND NOT EXISTS (SELECT 1 \
                       FROM tollgate_webhook_deliveries h WHERE h.account_id = d.account_id \
                       AND h.is_head = 1 AND h.status = 'pending') \
                     UNION SELECT account_id FROM tollgate_webhook_deliveries \
                     WHERE is_head = 1 AND status <> 'pending' \
                     UNION SELECT d.account_id FROM tollgate_webhook_deliveries d \
                     JOIN tollgate_webhook_deliveries h ON h.account_id = d.account_id \
                       AND h.is_head = 1 AND h.status = 'pending' \
                     WHERE d.status = 'pending' AND d.is_head = 0 \
                       AND (d.position_ms, d.position_seq, d.ordinal, d.delivery_id) \
                         < (h.position_ms, h.position_seq, h.ordinal, h.delivery_id)",
                )
                .fetch_all(&self.pool)
                .await?;
                for chunk in found.chunks(LOOKUP_WALLETS_MAX) {
                    let accounts: BTreeSet<&str> = chunk.iter().map(String::as_str).collect();
                    let mut tx = self.pool.begin().await?;
                    Self::lock_queues(&mut tx, &accounts).await?;
                    let accounts: Vec<&str> = accounts.into_iter().collect();
                    Self::mark_heads(&mut tx, &accounts).await?;
                    tx.commit().await?;
                }
                Ok(found.len() as u64)
            }

            pub async fn pending_deliveries(&self) -> Result<i64, StoreError> {
                Ok(sqlx::query_scalar::<_, i64>(
                    "SELECT COUNT(*) FROM tollgate_webhook_deliveries WHERE status = 'pending'",
                )
                .fetch_one(&self.pool)
                .await?)
            }
        }
    };
}

fn push_wallet_filter<DB: sqlx::Database>(qb: &mut QueryBuilder<DB>, keys: &[(String, String)])
where
    String: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    for (i, (account, wallet)) in keys.iter().enumerate() {
        if i > 0 {
            qb.push(" OR ");
        }
        qb.push("(account_id = ")
            .push_bind(account.clone())
            .push(" AND wallet = ")
            .push_bind(wallet.clone())
            .push(")");
    }
}

// PostgreSQL locks the wallet rows a batch reads (and claims the new ones), so two
// settlers judging the same wallet's crossing take turns; a SQLite transaction already
// holds the write lock (the batch's INSERT came first).
webhook_store_impl!(PgStore, sqlx::Postgres, " FOR UPDATE", true);
webhook_store_impl!(SqliteStore, sqlx::Sqlite, "", false);

macro_rules! dispatch {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            Store::Postgres($s) => $call,
            Store::Sqlite($s) => $call,
        }
    };
}

impl Store {
    pub async fn set_threshold(
        &self,
        account_id: &str,
        wallet: &str,
        threshold: Option<Threshold>,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.set_threshold(account_id, wallet, threshold).await)
    }

    pub async fn threshold_override(
        &self,
        account_id: &str,
        wallet: &str,
    ) -> Result<Option<Threshold>, StoreError> {
        dispatch!(self, s => s.threshold_override(account_id, wallet).await)
    }

    pub async fn due_deliveries(
        &self,
        now_ms: i64,
        limit: u32,
    ) -> Result<Vec<Delivery>, StoreError> {
        dispatch!(self, s => s.due_deliveries(now_ms, limit).await)
    }

    pub async fn lease_delivery(
        &self,
        delivery_id: &str,
        seen_attempts: i64,
        now_ms: i64,
        until_ms: i64,
    ) -> Result<bool, StoreError> {
        dispatch!(self, s => s.lease_delivery(delivery_id, seen_attempts, now_ms, until_ms).await)
    }

    pub async fn finish_attempt(
        &self,
        delivery_id: &str,
        lease_until_ms: i64,
        now_ms: i64,
        outcome: &AttemptOutcome,
    ) -> Result<bool, StoreError> {
        dispatch!(self, s => s.finish_attempt(delivery_id, lease_until_ms, now_ms, outcome).await)
    }

    pub async fn list_deliveries(&self, q: &DeliveryQuery) -> Result<DeliveryPage, StoreError> {
        dispatch!(self, s => s.list_deliveries(q).await)
    }

    pub async fn delivery(&self, delivery_id: &str) -> Result<Option<Delivery>, StoreError> {
        dispatch!(self, s => s.delivery(delivery_id).await)
    }

    pub async fn retry_delivery(
        &self,
        delivery_id: &str,
        now_ms: i64,
    ) -> Result<Option<Delivery>, StoreError> {
        dispatch!(self, s => s.retry_delivery(delivery_id, now_ms).await)
    }

    pub async fn expiring_lots(
        &self,
        now_ms: i64,
        until_ms: i64,
        limit: u32,
    ) -> Result<Vec<ExpiringLot>, StoreError> {
        dispatch!(self, s => s.expiring_lots(now_ms, until_ms, limit).await)
    }

    pub async fn announce_expiring(
        &self,
        lot: &ExpiringLot,
        delivery: &NewDelivery,
    ) -> Result<bool, StoreError> {
        dispatch!(self, s => s.announce_expiring(lot, delivery).await)
    }

    pub async fn prune_lots(&self, before_ms: i64) -> Result<u64, StoreError> {
        dispatch!(self, s => s.prune_lots(before_ms).await)
    }

    pub async fn prune_deliveries(&self, before_ms: i64, limit: i64) -> Result<u64, StoreError> {
        dispatch!(self, s => s.prune_deliveries(before_ms, limit).await)
    }

    pub async fn pending_deliveries(&self) -> Result<i64, StoreError> {
        dispatch!(self, s => s.pending_deliveries().await)
    }

    pub async fn repair_heads(&self) -> Result<u64, StoreError> {
        dispatch!(self, s => s.repair_heads().await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A settler's batch adds a delivery to an account's queue while a dispatcher ends
    /// the queue's only delivery: the dispatcher's transaction waits for the batch's
    /// queue lock, then sees its delivery and hands it the head. Without the lock each
    /// saw the other's row as it was, and the new delivery was left without a head
    /// (never tried).
    #[tokio::test]
    async fn a_delivery_added_while_the_head_ends_gets_the_head_in_postgres() {
        let (_db, store) = crate::settle::store::scratch::postgres("tollgate_queue_lock", 4).await;
        let store = std::sync::Arc::new(store);
        let Store::Postgres(pg) = &*store else {
            panic!("a postgres url opens a PostgreSQL store");
        };
        let insert = |id: &str, ms: i64, head: i64, lease: i64| {
            format!(
                "INSERT INTO tollgate_webhook_deliveries (delivery_id, account_id, wallet, \
                 event_type, position_ms, position_seq, ordinal, payload, status, attempts, \
                 next_attempt_at_ms, lease_until_ms, last_error, last_status_code, \
                 created_at_ms, delivered_at_ms, is_head) VALUES ('{id}', 'acme', 'default', \
                 'grant.created', {ms}, 0, 0, '{{}}', 'pending', 0, 1, {lease}, '', 0, 1, 0, \
                 {head})"
            )
        };
        // The head, leased by a dispatcher until 5000.
        sqlx::raw_sql(sqlx::AssertSqlSafe(insert("dlv_h", 1, 1, 5000)))
            .execute(&pg.pool)
            .await
            .expect("head");
        // The batch: locks the queue, adds a delivery, marks heads; not committed yet.
        let mut batch = pg.pool.begin().await.expect("begin");
        PgStore::lock_queues(&mut batch, &BTreeSet::from(["acme"]))
            .await
            .expect("lock");
        sqlx::raw_sql(sqlx::AssertSqlSafe(insert("dlv_n", 2, 0, 0)))
            .execute(&mut *batch)
            .await
            .expect("insert");
        PgStore::mark_heads(&mut batch, &["acme"])
            .await
            .expect("mark");
        // The dispatcher ends the head meanwhile.
        let finishing = {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .finish_attempt(
                        "dlv_h",
                        5000,
                        10,
                        &AttemptOutcome::Delivered { status_code: 204 },
                    )
                    .await
            })
        };
        // Until it is done, or waits for the queue lock.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
                 AND database = (SELECT oid FROM pg_database \
                 WHERE datname = current_database())",
            )
            .fetch_one(&pg.pool)
            .await
            .expect("locks");
            if waiting > 0 || finishing.is_finished() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "finish neither done nor waiting"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        batch.commit().await.expect("commit");
        assert!(finishing.await.expect("task").expect("finish"));
        let due = store.due_deliveries(100, 10).await.expect("due");
        let ids: Vec<&str> = due.iter().map(|d| d.delivery_id.as_str()).collect();
        assert_eq!(ids, ["dlv_n"]);
        pg.pool.close().await;
    }
}
