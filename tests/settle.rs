//! Settlement against real redis-server, real PostgreSQL (a fresh database per test) and
//! SQLite: exactly-once events in both stores, history paging, concurrent and dead
//! settlers, reconcile, and a database outage through a TCP fault proxy.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tollgate::api::pb;
use tollgate::ledger::event::{EventKind, LedgerEvent};
use tollgate::ledger::{Authorize, Clock, Debit, Ledger, Metadata, OnExpiry};
use tollgate::settle::reconcile::Drift;
use tollgate::settle::settler::{Settler, SettlerSettings};
use tollgate::settle::Store;

const START_MS: i64 = 1_800_000_000_000;
/// Generous: CI machines are busy; nothing here asserts on timing.
const DEADLINE: Duration = Duration::from_secs(120);

/// Settler settings with short waits for tests.
fn fast() -> SettlerSettings {
    SettlerSettings {
        claim_idle: Duration::from_millis(300),
        idle_wait: Duration::from_millis(10),
        backoff_max: Duration::from_millis(500),
        ..SettlerSettings::default()
    }
}

fn settler(ledger: &Arc<Ledger>, store: &Arc<Store>, group: &str, consumer: &str) -> Settler {
    Settler::new(
        ledger.clone(),
        store.clone(),
        SettlerSettings {
            group: group.into(),
            consumer: consumer.into(),
            ..fast()
        },
    )
}

async fn store(url: &str) -> Arc<Store> {
    let store = Arc::new(Store::connect_lazy(url, 4).expect("store url"));
    store.migrate().await.expect("migrate");
    store
}

/// A store in `pg` and one in a new SQLite file, named for the messages.
async fn to_both_stores(pg: &common::PgDatabase) -> [(&'static str, Arc<Store>); 2] {
    [
        ("to-postgres", store(&pg.url).await),
        ("to-sqlite", store(&common::temp_sqlite_url()).await),
    ]
}

fn pg_target() -> std::net::SocketAddr {
    let url = common::pg_admin_url();
    let host_port = url
        .split_once('@')
        .map(|(_, rest)| rest)
        .unwrap_or(&url)
        .split('/')
        .next()
        .expect("host:port");
    let host_port = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:5432")
    };
    host_port
        .replace("localhost", "127.0.0.1")
        .parse()
        .expect("PostgreSQL at an ip:port")
}

async fn assert_store_matches_outbox(store: &Store, outbox: &[LedgerEvent]) {
    assert_eq!(
        store.count_events().await.expect("count") as usize,
        outbox.len(),
        "{} store holds another number of events than the outbox",
        store.kind()
    );
    for e in outbox {
        let stored = store.event(&e.event_id).await.expect("event");
        assert_eq!(stored.as_ref(), Some(e), "{} event differs", store.kind());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_settles_exactly_once_in_postgres_and_sqlite() {
    let redis = common::RedisServer::start();
    let (clock, now) = Clock::manual(START_MS);
    let ledger = common::ledger(&redis, clock);
    common::add_observer_group(&ledger).await;
    common::workload::every_kind(&ledger, &now, 3, "w").await;
    let outbox = common::outbox_events(&ledger).await;
    let kinds: BTreeSet<&str> = outbox.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds.len(), 9, "the workload makes every kind: {kinds:?}");

    let pg = common::PgDatabase::create().await;
    let pg_store = store(&pg.url).await;
    let sqlite_store = store(&common::temp_sqlite_url()).await;
    settler(&ledger, &pg_store, "to-postgres", "a")
        .drain(DEADLINE)
        .await
        .expect("drain to postgres");
    settler(&ledger, &sqlite_store, "to-sqlite", "a")
        .drain(DEADLINE)
        .await
        .expect("drain to sqlite");
    for store in [&pg_store, &sqlite_store] {
        assert_store_matches_outbox(store, &outbox).await;
        // Redelivery is a no-op.
        assert_eq!(store.append(&outbox).await.expect("append again"), 0);
        assert_store_matches_outbox(store, &outbox).await;
        // The running summary equals the totals re-derived from the events, and Redis.
        for summary in store.wallets().await.expect("wallets") {
            let d = store
                .derive(&summary.account_id, &summary.wallet, None)
                .await
                .expect("derive");
            let (derived, events) = (d.totals, d.events);
            assert_eq!(d.summary, Some(summary.totals));
            assert_eq!(summary.totals, derived, "{summary:?}");
            assert_eq!(summary.events, events);
            let redis = &ledger
                .balance(&summary.account_id, &summary.wallet)
                .await
                .expect("balance")[0];
            assert_eq!(
                (
                    redis.available,
                    redis.held,
                    redis.granted,
                    redis.used,
                    redis.expired,
                    redis.refunded,
                    redis.adjusted
                ),
                (
                    derived.available,
                    derived.held,
                    derived.granted,
                    derived.used,
                    derived.expired,
                    derived.refunded,
                    derived.adjusted
                ),
                "store and redis differ for {}",
                summary.account_id
            );
        }
    }
    // The observer group never acknowledged, so nothing was trimmed.
    assert_eq!(common::outbox_len(&ledger).await, outbox.len());
    let report =
        tollgate::settle::reconcile::reconcile(ledger.clone(), pg_store.clone(), fast(), DEADLINE)
            .await
            .expect("reconcile");
    assert!(report.drifts.is_empty(), "{}", report.render());
    assert_eq!(report.events as usize, outbox.len());
}

/// A batch that mixes settled and new events (a batch taken over by `XAUTOCLAIM` while
/// its first reader's commit overlapped it) writes only the new ones, and counts only
/// them in the running summaries. PostgreSQL's `COPY` fails whole on such a batch and
/// falls back to its conflict-skipping insert; this is that path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_overlapping_settled_events_writes_only_the_new_ones() {
    let redis = common::RedisServer::start();
    let (clock, now) = Clock::manual(START_MS);
    let ledger = common::ledger(&redis, clock);
    common::workload::every_kind(&ledger, &now, 2, "o").await;
    let outbox = common::outbox_events(&ledger).await;
    let half = outbox.len() / 2;
    assert!(half > 0);
    let pg = common::PgDatabase::create().await;
    for store in [
        store(&pg.url).await,
        store(&common::temp_sqlite_url()).await,
    ] {
        assert_eq!(
            store.append(&outbox[..half]).await.expect("first half"),
            half as u64,
            "{}",
            store.kind()
        );
        // Settled events at both ends of the batch, new ones in between.
        let mut overlapping = outbox.clone();
        overlapping.push(outbox[0].clone());
        assert_eq!(
            store.append(&overlapping).await.expect("overlap"),
            (outbox.len() - half) as u64,
            "{}",
            store.kind()
        );
        assert_store_matches_outbox(&store, &outbox).await;
        for summary in store.wallets().await.expect("wallets") {
            let d = store
                .derive(&summary.account_id, &summary.wallet, None)
                .await
                .expect("derive");
            assert_eq!(summary.totals, d.totals, "{} {summary:?}", store.kind());
            assert_eq!(summary.events, d.events, "{} {summary:?}", store.kind());
        }
    }
}

/// A restore raising a shard's fence for the first time (the row a settler made at 0)
/// waits for a batch write in flight, which read its events from the old Redis: PostgreSQL
/// locks only the rows a `FOR SHARE` returns, so the batch must read the 0 row too, or the
/// restore would read the shard's events without that batch and it would land after.
/// The batch is held mid-transaction by a lock on its wallet's summary row, taken by the
/// test after the batch's fences; the fence must not move while it is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_fence_raise_waits_for_a_batch_in_flight() {
    let redis = common::RedisServer::start();
    let (clock, now) = Clock::manual(START_MS);
    let ledger = common::ledger(&redis, clock);
    ledger
        .grant(&common::purchase("inflight", 100, "g"))
        .await
        .expect("grant");
    now.store(START_MS + 1, Ordering::SeqCst);
    ledger
        .debit(&Debit {
            account_id: "inflight".into(),
            wallet: "default".into(),
            amount: 30,
            idempotency_key: "d".into(),
            operation: "op".into(),
            metadata: Metadata::new(),
            member_id: String::new(),
            price_inputs: None,
            attempt_mark: None,
        })
        .await
        .expect("debit");
    let outbox = common::outbox_events(&ledger).await;
    assert_eq!(outbox.len(), 2, "{outbox:?}");
    let shard = outbox[0].shard();
    // The Redis the events were read from: epoch 1 ms, older than any fence a restore sets.
    let epochs = vec![Some(1i64); usize::from(ledger.shards().count())];

    let pg = common::PgDatabase::create().await;
    let store = store(&pg.url).await;
    // The first batch makes the shard's fence row, at 0 (never restored).
    let first = store
        .append_batch(&outbox[..1], Some(&epochs), None)
        .await
        .expect("first batch");
    assert!(first.fenced.is_empty(), "{first:?}");

    // The wallet's summary row, locked: the next batch stops at its summary upsert, after
    // it took its fences.
    let pool = sqlx::PgPool::connect(&pg.url).await.expect("pg");
    let mut blocker = pool.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM tollgate_wallets WHERE account_id = 'inflight' FOR UPDATE")
        .execute(&mut *blocker)
        .await
        .expect("lock the summary row");
    let batch = {
        let (store, events, epochs) = (store.clone(), outbox[1..].to_vec(), epochs.clone());
        tokio::spawn(async move { store.append_batch(&events, Some(&epochs), None).await })
    };
    let waiting_on_locks = |pool: sqlx::PgPool, n: i64| async move {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&pool)
        .await
        .expect("pg_stat_activity");
        (waiting >= n).then_some(())
    };
    common::eventually(DEADLINE, "the batch waits for the summary row", || {
        waiting_on_locks(pool.clone(), 1)
    })
    .await;

    // A restore raises the fence meanwhile: it must wait for the batch.
    let raise = {
        let store = store.clone();
        tokio::spawn(async move { store.raise_fence(shard, START_MS + 10_000).await })
    };
    // Until PostgreSQL shows it waiting for a lock too (the batch and the raise: two),
    // the raise must not end.
    let deadline = Instant::now() + DEADLINE;
    while waiting_on_locks(pool.clone(), 2).await.is_none() {
        if raise.is_finished() {
            panic!(
                "the fence moved while a batch that read the old Redis was being written: {:?}",
                raise.await
            );
        }
        assert!(
            Instant::now() < deadline,
            "the raise never waited for a lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !raise.is_finished(),
        "the fence moved while a batch that read the old Redis was being written: {:?}",
        raise.await
    );
    assert!(!batch.is_finished(), "the batch did not wait for the row");

    // The batch ends: it was written (it took the fence before the raise), then the raise
    // goes through, and a batch read from the old Redis after it is refused.
    blocker.commit().await.expect("commit");
    let written = tokio::time::timeout(DEADLINE, batch)
        .await
        .expect("the batch ends")
        .expect("join")
        .expect("batch");
    assert!(written.fenced.is_empty(), "{written:?}");
    assert_eq!(written.new_events.len(), 1, "{written:?}");
    let fence = tokio::time::timeout(DEADLINE, raise)
        .await
        .expect("the raise ends")
        .expect("join")
        .expect("raise");
    assert_eq!(fence, START_MS + 10_000);
    let late = store
        .append_batch(&outbox[1..], Some(&epochs), None)
        .await
        .expect("late batch");
    assert_eq!(late.fenced, vec![outbox[1].event_id.clone()]);
}

/// A grant and three debits of one account (one shard), at distinct times.
async fn four_events(ledger: &Ledger, now: &std::sync::atomic::AtomicI64) -> Vec<LedgerEvent> {
    ledger
        .grant(&common::purchase("skewed", 100, "g"))
        .await
        .expect("grant");
    for (n, key) in ["d1", "d2", "d3"].into_iter().enumerate() {
        now.store(START_MS + 1 + n as i64, Ordering::SeqCst);
        ledger
            .debit(&Debit {
                account_id: "skewed".into(),
                wallet: "default".into(),
                amount: 10,
                idempotency_key: key.into(),
                operation: "op".into(),
                metadata: Metadata::new(),
                member_id: String::new(),
                price_inputs: None,
                attempt_mark: None,
            })
            .await
            .expect("debit");
    }
    let outbox = common::outbox_events(ledger).await;
    assert_eq!(outbox.len(), 4, "{outbox:?}");
    outbox
}

/// Restore fences strictly increase, whatever the restoring hosts' clocks: a second
/// restore of a shard from a host whose clock is behind the first's must still fence the
/// incarnation the first one made (whose marker is the first fence), so a late batch read
/// from it is refused. In PostgreSQL and SQLite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_restore_from_a_host_behind_the_first_still_fences_the_first_incarnation() {
    let redis = common::RedisServer::start();
    let (clock, now) = Clock::manual(START_MS);
    let ledger = common::ledger(&redis, clock);
    let outbox = four_events(&ledger, &now).await;
    let shard = outbox[0].shard();
    let marker = |epoch: i64| vec![Some(epoch); usize::from(ledger.shards().count())];
    let pg = common::PgDatabase::create().await;
    for url in [pg.url.clone(), common::temp_sqlite_url()] {
        let store = store(&url).await;
        let kind = store.kind();
        let appended = store
            .append_batch(&outbox[..1], Some(&marker(1)), None)
            .await
            .expect("batch");
        assert!(appended.fenced.is_empty(), "{kind} {appended:?}");
        // The first restore's host reads START_MS + 5 s; the shard it rebuilt has that as
        // its marker, and settles an event.
        let first = store
            .raise_fence(shard, START_MS + 5_000)
            .await
            .expect("first raise");
        assert_eq!(first, START_MS + 5_000, "{kind}");
        let appended = store
            .append_batch(&outbox[1..2], Some(&marker(first)), None)
            .await
            .expect("batch");
        assert!(appended.fenced.is_empty(), "{kind} {appended:?}");
        // That Redis is lost too; the second restore's host is 4 s behind the first's.
        let second = store
            .raise_fence(shard, START_MS + 1_000)
            .await
            .expect("second raise");
        assert!(
            second > first,
            "{kind}: the second fence {second} is not above the first {first}"
        );
        let late = store
            .append_batch(&outbox[2..3], Some(&marker(first)), None)
            .await
            .expect("late batch");
        assert_eq!(
            late.fenced,
            vec![outbox[2].event_id.clone()],
            "{kind}: a late batch of the first restore's incarnation was taken"
        );
        // The incarnation the second restore made (its marker is the fence) settles.
        let appended = store
            .append_batch(&outbox[2..], Some(&marker(second)), None)
            .await
            .expect("batch");
        assert!(appended.fenced.is_empty(), "{kind} {appended:?}");
        assert_eq!(store.count_events().await.expect("count"), 4, "{kind}");
        // Each marker a batch was settled under, once; not the fenced batch's again.
        assert_eq!(
            shard_epochs(&url).await,
            vec![(shard, 1), (shard, first), (shard, second)],
            "{kind}"
        );
    }
}

/// A batch whose transaction fails after it wrote its marker row (here: its wallet
/// summary upsert) is rolled back with it; the store must not take the marker as
/// recorded, so the batch retried records it, and a restore's fence rises above it. In
/// PostgreSQL and SQLite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_retried_after_a_failed_transaction_records_its_marker() {
    let redis = common::RedisServer::start();
    let (clock, now) = Clock::manual(START_MS);
    let ledger = common::ledger(&redis, clock);
    let outbox = four_events(&ledger, &now).await;
    let shard = outbox[0].shard();
    let ahead = vec![Some(START_MS + 3_600_000); usize::from(ledger.shards().count())];
    let pg = common::PgDatabase::create().await;
    for url in [pg.url.clone(), common::temp_sqlite_url()] {
        let store = store(&url).await;
        let kind = store.kind();
        let (fail, unfail) = if kind == "postgres" {
            (
                "CREATE FUNCTION tollgate_test_fail() RETURNS trigger AS \
                 $$ BEGIN RAISE EXCEPTION 'injected'; END $$ LANGUAGE plpgsql; \
                 CREATE TRIGGER tollgate_test_fail BEFORE INSERT ON tollgate_wallets \
                 FOR EACH ROW EXECUTE FUNCTION tollgate_test_fail();",
                "DROP TRIGGER tollgate_test_fail ON tollgate_wallets;",
            )
        } else {
            (
                "CREATE TRIGGER tollgate_test_fail BEFORE INSERT ON tollgate_wallets \
                 BEGIN SELECT RAISE(ABORT, 'injected'); END;",
                "DROP TRIGGER tollgate_test_fail;",
            )
        };
        common::run_sql(&url, fail.to_owned()).await;
        let failed = store.append_batch(&outbox, Some(&ahead), None).await;
        assert!(failed.is_err(), "{kind}: the batch was written: {failed:?}");
        assert_eq!(shard_epochs(&url).await, vec![], "{kind}");
        common::run_sql(&url, unfail.to_owned()).await;

        let appended = store
            .append_batch(&outbox, Some(&ahead), None)
            .await
            .expect("retried batch");
        assert_eq!(appended.new_events.len(), 4, "{kind} {appended:?}");
        assert_eq!(
            shard_epochs(&url).await,
            vec![(shard, START_MS + 3_600_000)],
            "{kind}: the retried batch did not record its marker"
        );
        let fence = store.raise_fence(shard, START_MS).await.expect("raise");
        assert!(fence > START_MS + 3_600_000, "{kind}: fence {fence}");
    }
}

/// The (shard, marker) rows of `tollgate_shard_epochs`, in order.
async fn shard_epochs(url: &str) -> Vec<(u16, i64)> {
    query_text(
        url,
        "SELECT CAST(shard AS TEXT) || ':' || CAST(epoch AS TEXT) FROM tollgate_shard_epochs \
         ORDER BY shard, epoch",
    )
    .await
    .iter()
    .map(|row| {
        let (shard, epoch) = row.split_once(':').expect("shard:epoch");
        (shard.parse().expect("shard"), epoch.parse().expect("epoch"))
    })
    .collect()
}

/// A shard marked new by a sidecar whose clock is an hour ahead of the host that later
/// restores it: the restore's fence must rise above the marker its settled events were
/// read under, or a late batch of that lost incarnation would be taken. In PostgreSQL
/// and SQLite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_fences_a_shard_marked_by_a_clock_ahead_of_its_own() {
    let redis = common::RedisServer::start();
    let (clock, now) = Clock::manual(START_MS);
    let ledger = common::ledger(&redis, clock);
    let outbox = four_events(&ledger, &now).await;
    let shard = outbox[0].shard();
    let ahead = vec![Some(START_MS + 3_600_000); usize::from(ledger.shards().count())];
    let pg = common::PgDatabase::create().await;
    for url in [pg.url.clone(), common::temp_sqlite_url()] {
        let store = store(&url).await;
        let kind = store.kind();
        let appended = store
            .append_batch(&outbox[..3], Some(&ahead), None)
            .await
            .expect("batch");
        assert!(appended.fenced.is_empty(), "{kind} {appended:?}");
        // The batch recorded the marker it was read under, which the restore reads.
        assert_eq!(
            shard_epochs(&url).await,
            vec![(shard, START_MS + 3_600_000)],
            "{kind}"
        );
        let fence = store.raise_fence(shard, START_MS).await.expect("raise");
        assert!(
            fence > START_MS + 3_600_000,
            "{kind}: the fence {fence} is not above the settled events' marker"
        );
        let late = store
            .append_batch(&outbox[3..], Some(&ahead), None)
            .await
            .expect("late batch");
        assert_eq!(
            late.fenced,
            vec![outbox[3].event_id.clone()],
            "{kind}: a late batch of the lost incarnation was taken"
        );
        assert_eq!(store.count_events().await.expect("count"), 3, "{kind}");
    }
}

/// A Redis url with `protocol=resp3`: XREADGROUP then answers a map (stream name to
/// entries) instead of RESP2's array of pairs. The settler must read it: otherwise every
/// batch it read is dropped, its entries left pending in this consumer (back only through
/// XAUTOCLAIM, which this settler's hour of claim idle keeps away).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settler_over_resp3_settles_every_event() {
    let redis = common::RedisServer::start();
    let url = format!("{}?protocol=resp3", redis.url());
    let (clock, now) = Clock::manual(START_MS);
    let ledger = tollgate::server::ledger_from_config(&common::test_config(&url), clock)
        .expect("ledger over RESP3");
    common::initialize_blocking(&ledger, &url);
    common::add_observer_group(&ledger).await;
    common::workload::every_kind(&ledger, &now, 2, "r3").await;
    let outbox = common::outbox_events(&ledger).await;
    assert!(!outbox.is_empty());

    let store = store(&common::temp_sqlite_url()).await;
    let mut settler = Settler::new(
        ledger.clone(),
        store.clone(),
        SettlerSettings {
            group: "resp3".into(),
            consumer: "a".into(),
            claim_idle: Duration::from_secs(3600),
            ..fast()
        },
    );
    settler
        .drain(Duration::from_secs(30))
        .await
        .expect("drained over RESP3");
    assert_store_matches_outbox(&store, &outbox).await;
}

/// The text of every row of a query's first column, on a test database.
async fn query_text(url: &str, sql: &'static str) -> Vec<String> {
    if url.starts_with("postgres") {
        let pool = sqlx::PgPool::connect(url).await.expect("pg");
        let rows = sqlx::query_scalar(sql).fetch_all(&pool).await.expect(sql);
        pool.close().await;
        rows
    } else {
        let pool = sqlx::SqlitePool::connect(url).await.expect("sqlite");
        let rows = sqlx::query_scalar(sql).fetch_all(&pool).await.expect(sql);
        pool.close().await;
        rows
    }
}

/// A database an older build migrated to version 5: schema_v5.sql as that build shipped
/// it (shard fences only, no `round_start_attempts`; the line was added to the file
/// later), with webhook deliveries as that build wrote them (a retry round's start kept
/// as a negated `delivered_at_ms`). Version 6 adds the column, moves the round starts into
/// it and indexes events by shard, in PostgreSQL and SQLite; the later versions follow
/// (7: the events' `actor` column, which the events read back carry; 8: the events'
/// `redis_epoch`, 0 for an event written without the markers a settler read; 9: API keys'
/// makers; 10: the persisted shard count; 11: the history index in the page's order and
/// the partial index of hold events; 12: the history index of one kind; 13: the webhook
/// queues' heads marked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_an_older_build_left_at_v5_migrates_to_v6() {
    let redis = common::RedisServer::start();
    let (clock, _) = Clock::manual(START_MS);
    let ledger = common::ledger(&redis, clock);
    ledger
        .grant(&common::purchase("old", 100, "g"))
        .await
        .expect("grant");
    let outbox = common::outbox_events(&ledger).await;
    let shard = outbox[0].shard();
    let pg = common::PgDatabase::create().await;
    for url in [pg.url.clone(), common::temp_sqlite_url()] {
        let mut old = String::from(
            "CREATE TABLE tollgate_schema_migrations \
             (version BIGINT PRIMARY KEY, applied_at_ms BIGINT NOT NULL);\n",
        );
        for sql in [
            include_str!("../src/settle/schema_v1.sql"),
            include_str!("../src/settle/schema_v2.sql"),
            include_str!("../src/settle/schema_v3.sql"),
            include_str!("../src/settle/schema_v4.sql"),
            "CREATE TABLE IF NOT EXISTS tollgate_shard_fences (\
             shard BIGINT PRIMARY KEY, epoch BIGINT NOT NULL);",
        ] {
            old.push_str(sql);
            old.push('\n');
        }
        old.push_str(
            "INSERT INTO tollgate_schema_migrations (version, applied_at_ms) \
             VALUES (1, 1), (2, 1), (3, 1), (4, 1), (5, 1);\n\
             INSERT INTO tollgate_webhook_deliveries (delivery_id, account_id, wallet, \
             event_type, position_ms, position_seq, ordinal, payload, status, attempts, \
             next_attempt_at_ms, lease_until_ms, last_error, last_status_code, \
             created_at_ms, delivered_at_ms) VALUES \
             ('retried', 'old', 'default', 'balance.low', 1, 0, 0, '{}', 'pending', 3, 5, 0, '', 500, 1, -3), \
             ('failed-again', 'old', 'default', 'balance.low', 1, 0, 1, '{}', 'failed', 6, 5, 0, '', 500, 1, -3), \
             ('delivered', 'old', 'default', 'balance.low', 1, 0, 2, '{}', 'delivered', 2, 5, 0, '', 200, 1, 1234);\n",
        );
        common::run_sql(&url, old).await;

        let store = store(&url).await;
        let kind = store.kind();
        let delivery = |id: &'static str| {
            let store = store.clone();
            async move {
                store
                    .delivery(id)
                    .await
                    .expect("read a delivery")
                    .expect("the delivery")
            }
        };
        let retried = delivery("retried").await;
        assert_eq!(
            (retried.round_start_attempts, retried.delivered_at_ms),
            (3, 0),
            "{kind} {retried:?}"
        );
        assert_eq!(retried.round_attempts(), 0, "{kind}");
        let failed = delivery("failed-again").await;
        assert_eq!(
            (failed.round_start_attempts, failed.delivered_at_ms),
            (3, 0),
            "{kind} {failed:?}"
        );
        let delivered = delivery("delivered").await;
        assert_eq!(
            (delivered.round_start_attempts, delivered.delivered_at_ms),
            (0, 1234),
            "{kind} {delivered:?}"
        );
        let retried = store
            .retry_delivery("failed-again", START_MS)
            .await
            .expect("retry")
            .expect("a failed delivery is retried");
        assert_eq!(retried, delivery("failed-again").await, "{kind}");
        assert_eq!(retried.round_start_attempts, 6, "{kind}");
        assert_eq!(
            query_text(
                &url,
                "SELECT CAST(MAX(version) AS TEXT) FROM tollgate_schema_migrations"
            )
            .await,
            vec!["15".to_owned()],
            "{kind}"
        );
        // The history of one kind of an account, in the page's order (a `kinds` filter).
        let kind_index = query_text(
            &url,
            if kind == "postgres" {
                "SELECT indexdef FROM pg_indexes WHERE indexname = 'tollgate_events_kind'"
            } else {
                "SELECT sql FROM sqlite_master WHERE name = 'tollgate_events_kind'"
            },
        )
        .await;
        assert!(
            kind_index.len() == 1
                && kind_index[0].contains("(account_id, kind, created_at_ms DESC")
                && kind_index[0].contains("shard DESC"),
            "{kind} {kind_index:?}"
        );
        // The history index in the page's order, in place of version 1's.
        let history_index = query_text(
            &url,
            if kind == "postgres" {
                "SELECT indexdef FROM pg_indexes WHERE indexname IN \
                 ('tollgate_events_newest', 'tollgate_events_history')"
            } else {
                "SELECT sql FROM sqlite_master WHERE name IN \
                 ('tollgate_events_newest', 'tollgate_events_history')"
            },
        )
        .await;
        assert!(
            history_index
                .iter()
                .any(|i| i.contains("tollgate_events_newest") && i.contains("stream_seq DESC")),
            "{kind} {history_index:?}"
        );
        // SQLite drops version 1's; PostgreSQL keeps it for the operator to drop
        // concurrently (a drop in the migration would lock behind long readers).
        assert_eq!(
            history_index.len(),
            if kind == "postgres" { 2 } else { 1 },
            "{kind} {history_index:?}"
        );
        // The partial index of hold events, which reconcile's hold lookups use.
        let holds_index = query_text(
            &url,
            if kind == "postgres" {
                "SELECT indexdef FROM pg_indexes WHERE indexname = 'tollgate_events_holds'"
            } else {
                "SELECT sql FROM sqlite_master WHERE name = 'tollgate_events_holds'"
            },
        )
        .await;
        assert!(
            holds_index.len() == 1
                && holds_index[0].contains("(account_id, wallet, hold_id)")
                && holds_index[0].contains("kind = 'hold'"),
            "{kind} {holds_index:?}"
        );
        // The shard index, which restore's reads use.
        let index = query_text(
            &url,
            if kind == "postgres" {
                "SELECT indexdef FROM pg_indexes WHERE indexname = 'tollgate_events_shard'"
            } else {
                "SELECT sql FROM sqlite_master WHERE name = 'tollgate_events_shard'"
            },
        )
        .await;
        assert!(
            index.len() == 1
                && index[0].contains("(shard, account_id, wallet, stream_ms, stream_seq)"),
            "{kind} {index:?}"
        );
        // The lots index the webhook dispatcher's pruning uses.
        let lots_index = query_text(
            &url,
            if kind == "postgres" {
                "SELECT indexdef FROM pg_indexes WHERE indexname = 'tollgate_lots_expires'"
            } else {
                "SELECT sql FROM sqlite_master WHERE name = 'tollgate_lots_expires'"
            },
        )
        .await;
        assert!(
            lots_index.len() == 1 && lots_index[0].contains("(expires_at_ms)"),
            "{kind} {lots_index:?}"
        );
        if kind == "sqlite" {
            let pool = sqlx::SqlitePool::connect(&url).await.expect("sqlite");
            let plan: Vec<String> = sqlx::query(
                "EXPLAIN QUERY PLAN SELECT event_id FROM tollgate_events WHERE shard = 3 \
                 ORDER BY account_id, wallet, stream_ms, stream_seq LIMIT 5000",
            )
            .fetch_all(&pool)
            .await
            .expect("plan")
            .iter()
            .map(|r| sqlx::Row::get::<String, _>(r, "detail"))
            .collect();
            pool.close().await;
            assert!(
                plan.iter().any(|d| d.contains("tollgate_events_shard"))
                    && !plan.iter().any(|d| d.contains("TEMP B-TREE")),
                "a scan and sort: {plan:?}"
            );
        }
        // Events settle and read back by shard; migrating again changes nothing.
        assert_eq!(store.append(&outbox).await.expect("append"), 1, "{kind}");
        let read = store
            .shard_events(shard, None, 10)
            .await
            .expect("shard events");
        assert_eq!(read, outbox, "{kind}");
        assert!(store.shard_has_events(shard).await.expect("has"), "{kind}");
        assert_eq!(
            query_text(
                &url,
                "SELECT CAST(redis_epoch AS TEXT) FROM tollgate_events"
            )
            .await,
            vec!["0".to_owned()],
            "{kind}"
        );
        // The markers table is there, and an event written without markers adds none.
        assert_eq!(shard_epochs(&url).await, vec![], "{kind}");
        store.migrate().await.expect("migrate again");
    }
}

/// The outbox's events that parse, entry by entry (unreadable ones left out).
async fn readable_outbox_events(ledger: &Ledger) -> Vec<LedgerEvent> {
    let mut all = Vec::new();
    for shard in 0..ledger.shards().count() {
        let entries = common::outbox_entries(ledger, shard).await;
        all.extend(
            entries
                .iter()
                .filter_map(|e| LedgerEvent::from_stream_entry(shard, e).ok()),
        );
    }
    all
}

/// Adds an outbox entry: a debit of this format with its amount `n` and version `ver`.
async fn plant_entry(ledger: &Ledger, shard: u16, n: &str, ver: &str) -> String {
    plant_entry_of(ledger, shard, "debit", n, ver).await
}

/// [`plant_entry`] of another kind.
async fn plant_entry_of(ledger: &Ledger, shard: u16, kind: &str, n: &str, ver: &str) -> String {
    ledger
        .redis()
        .query(
            redis::cmd("XADD")
                .arg(ledger.shards().outbox(shard))
                .arg("*")
                .arg(&[
                    "k", kind, "n", n, "v", "0", "h", "0", "l", "", "t", "1", "a", "acct-x", "w",
                    "default", "ver", ver,
                ]),
        )
        .await
        .expect("xadd")
}

/// A corrupt entry: its amount is not a number.
async fn plant_unreadable(ledger: &Ledger, shard: u16) -> String {
    plant_entry(ledger, shard, "five", "1").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_outbox_entry_is_set_aside_and_everything_else_settles() {
    let redis = common::RedisServer::start();
    let (clock, now) = Clock::manual(START_MS);
    let ledger = common::ledger(&redis, clock);
    assert!(ledger.shards().count() >= 2);
    common::workload::every_kind(&ledger, &now, 1, "u").await;
    // Shard 0: an unreadable entry among new ones, found by a read. Shard 1: one left
    // pending, with every entry before it, by a consumer that died; found by the claim.
    let read_bad = plant_unreadable(&ledger, 0).await;
    let claimed_bad = plant_unreadable(&ledger, 1).await;
    common::workload::every_kind(&ledger, &now, 1, "v").await;
    let readable = readable_outbox_events(&ledger).await;
    assert!(readable.len() > 10, "{}", readable.len());
    let sqlite_store = store(&common::temp_sqlite_url()).await;
    let mut settler = settler(&ledger, &sqlite_store, "tollgate-settler", "a");
    settler.ensure_groups().await.expect("groups");
    let _: redis::Value = ledger
        .redis()
        .query(
            redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg("tollgate-settler")
                .arg("dead")
                .arg("STREAMS")
                .arg(ledger.shards().outbox(1))
                .arg(">"),
        )
        .await
        .expect("dead consumer reads");

    settler.drain(DEADLINE).await.expect("drain");

    assert_store_matches_outbox(&sqlite_store, &readable).await;
    for (shard, id) in [(0, &read_bad), (1, &claimed_bad)] {
        let outbox = ledger.shards().outbox(shard);
        let dead: Vec<(String, HashMap<String, String>)> = ledger
            .redis()
            .query(
                redis::cmd("XRANGE")
                    .arg(format!("{outbox}:dead"))
                    .arg("-")
                    .arg("+"),
            )
            .await
            .expect("dead letters");
        assert_eq!(dead.len(), 1, "shard {shard}: {dead:?}");
        let fields = &dead[0].1;
        assert_eq!(fields.get("id"), Some(id), "shard {shard}");
        assert_eq!(fields.get("n").map(String::as_str), Some("five"));
        assert_eq!(fields.get("a").map(String::as_str), Some("acct-x"));
        assert!(
            fields
                .get("error")
                .is_some_and(|e| e.contains("bad or missing n")),
            "{fields:?}"
        );
        let pending: Vec<redis::Value> = ledger
            .redis()
            .query(redis::cmd("XPENDING").arg(outbox).arg("tollgate-settler"))
            .await
            .expect("xpending");
        assert_eq!(
            pending.first(),
            Some(&redis::Value::Int(0)),
            "shard {shard}"
        );
    }
    assert_eq!(
        common::outbox_len(&ledger).await,
        0,
        "the outboxes are trimmed past the unreadable entries"
    );
}

/// A set-aside entry is copied to the dead letters and acknowledged in one call: a
/// connection lost after the copy and before the acknowledgement reached Redis left the
/// entry pending, and the next round set it aside again (two letters for one entry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_is_set_aside_once_when_its_acknowledgement_was_lost() {
    let redis = common::RedisServer::start();
    let ledger = common::ledger(&redis, Clock::Redis);
    let bad = plant_unreadable(&ledger, 0).await;
    let proxy = common::proxy::AnswerDropProxy::start(([127, 0, 0, 1], redis.port).into()).await;
    let through_proxy = tollgate::server::ledger_from_config(
        &common::test_config(&proxy.redis_url()),
        Clock::Redis,
    )
    .expect("ledger");
    let sqlite_store = store(&common::temp_sqlite_url()).await;
    let mut settler = settler(&through_proxy, &sqlite_store, "tollgate-settler", "a");
    settler.ensure_groups().await.expect("groups");
    // The only acknowledgement a round sends is the set-aside's.
    proxy.arm_request(b"XACK");
    let deadline = Instant::now() + DEADLINE;
    while common::pending(&ledger, "tollgate-settler", None).await != Some(0) || proxy.fired() == 0
    {
        assert!(Instant::now() < deadline, "not set aside");
        let _ = settler.round().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(proxy.fired(), 1);
    let dead: Vec<(String, HashMap<String, String>)> = ledger
        .redis()
        .query(
            redis::cmd("XRANGE")
                .arg(format!("{}:dead", ledger.shards().outbox(0)))
                .arg("-")
                .arg("+"),
        )
        .await
        .expect("dead letters");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].1.get("id"), Some(&bad));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_of_a_newer_format_is_left_for_a_newer_settler() {
    left_for_a_newer_settler("debit", "99", "ver").await;
}

/// Kinds were added within format version 1 (`member`, `allocate`, `budget`): a settler
/// that does not know one leaves it for a newer settler, as a newer version's entry; it
/// used to set it aside as corrupt, for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_of_a_kind_this_version_does_not_know_is_left_for_a_newer_settler() {
    left_for_a_newer_settler("transfer", "1", "kind \"transfer\" unknown").await;
}

/// Plants an entry of `kind` and `ver` among readable ones: the settler's read fails
/// (naming `why`), and the entry is neither set aside nor acknowledged.
async fn left_for_a_newer_settler(kind: &str, ver: &str, why: &str) {
    let redis = common::RedisServer::start();
    let (clock, now) = Clock::manual(START_MS);
    let ledger = common::ledger(&redis, clock);
    common::workload::every_kind(&ledger, &now, 1, "w").await;
    let newer = plant_entry_of(&ledger, 0, kind, "5", ver).await;
    let sqlite_store = store(&common::temp_sqlite_url()).await;
    let mut settler = settler(&ledger, &sqlite_store, "tollgate-settler", "a");
    let refused = settler.drain(Duration::from_secs(5)).await;
    assert!(
        refused.as_ref().is_err_and(|e| e.to_string().contains(why)),
        "{refused:?}"
    );
    // Not set aside, not acknowledged: still in the outbox for a settler that reads it.
    let outbox = ledger.shards().outbox(0);
    let dead: usize = ledger
        .redis()
        .query(redis::cmd("XLEN").arg(format!("{outbox}:dead")))
        .await
        .expect("xlen");
    assert_eq!(dead, 0);
    let still: Vec<(String, HashMap<String, String>)> = ledger
        .redis()
        .query(redis::cmd("XRANGE").arg(outbox).arg(&newer).arg(&newer))
        .await
        .expect("xrange");
    assert_eq!(still.len(), 1);
    let pending: Vec<redis::Value> = ledger
        .redis()
        .query(redis::cmd("XPENDING").arg(outbox).arg("tollgate-settler"))
        .await
        .expect("xpending");
    assert_ne!(pending.first(), Some(&redis::Value::Int(0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_entries_are_trimmed_from_the_outbox() {
    let redis = common::RedisServer::start();
    let (clock, now) = Clock::manual(START_MS);
    let ledger = common::ledger(&redis, clock);
    common::workload::every_kind(&ledger, &now, 1, "t").await;
    let written = common::outbox_len(&ledger).await;
    assert!(written > 0);
    let events = common::outbox_events(&ledger).await;
    let sqlite_store = store(&common::temp_sqlite_url()).await;
    settler(&ledger, &sqlite_store, "tollgate-settler", "a")
        .drain(DEADLINE)
        .await
        .expect("drain");
    assert_eq!(
        sqlite_store.count_events().await.expect("count") as usize,
        written
    );
    assert_eq!(
        common::outbox_len(&ledger).await,
        0,
        "acknowledged entries stay in Redis"
    );
    // A wallet's snapshot (reconcile) still names its shard's last event: an empty outbox
    // is not "no position", or reconcile would count events written after the snapshot.
    let last = events.last().expect("events");
    let position = ledger
        .snapshot(&last.account_id, &last.wallet)
        .await
        .expect("snapshot")
        .last_entry_id;
    let shard_last = events
        .iter()
        .rfind(|e| e.shard() == last.shard())
        .expect("shard's last event");
    assert_eq!(position.as_deref(), Some(shard_last.stream_id.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_through_ten_thousand_events() {
    let redis = common::RedisServer::start();
    let pg = common::PgDatabase::create().await;
    let mut config = common::test_config(&redis.url());
    config.store.url = pg.url.clone();
    config.settler.enabled = true;
    let server = common::TestServer::start(config, Clock::Redis).await;
    let ledger = server.ledger.clone();
    let grant = common::purchase("busy", 1_000_000, "g");
    ledger.grant(&grant).await.expect("grant");
    let tasks: Vec<_> = (0..16)
        .map(|t| {
            let ledger = ledger.clone();
            tokio::spawn(async move {
                for i in (t..9_999).step_by(16) {
                    let debit = Debit {
                        account_id: "busy".into(),
                        wallet: "default".into(),
                        amount: 1,
                        idempotency_key: format!("d{i}"),
                        operation: "op".into(),
                        metadata: Metadata::new(),
                        member_id: String::new(),
                        price_inputs: None,
                        attempt_mark: None,
                    };
                    ledger.debit(&debit).await.expect("debit");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    let store = store(&pg.url).await;
    let deadline = Instant::now() + DEADLINE;
    while store.count_events().await.expect("count") < 10_000 {
        assert!(Instant::now() < deadline, "not settled in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut metering = server.metering().await;
    let mut token = String::new();
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        pages += 1;
        // 10,000 in pages of 333, and one more (an empty last page).
        assert!(
            pages <= 10_000usize.div_ceil(333) + 1,
            "page tokens never end"
        );
        let page = metering
            .list_transactions(pb::ListTransactionsRequest {
                account_id: "busy".into(),
                page_size: 333,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .expect("page")
            .into_inner();
        assert!(page.transactions.len() <= 333);
        seen.extend(page.transactions);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), 10_000);
    let ids: BTreeSet<&str> = seen.iter().map(|t| t.event_id.as_str()).collect();
    assert_eq!(ids.len(), 10_000, "repeats across pages");
    // Newest first: by time, then stream position as numbers (not the id as text).
    let position = |t: &pb::Transaction| {
        let n: Vec<i64> = t
            .event_id
            .split('-')
            .map(|n| n.parse().expect("event id"))
            .collect();
        (t.created_at_ms, n[1], n[2], n[0])
    };
    for pair in seen.windows(2) {
        assert!(position(&pair[0]) > position(&pair[1]), "not newest first");
    }
    let grant_tx = seen.last().expect("oldest");
    assert_eq!(
        (grant_tx.kind.as_str(), grant_tx.ledger_kind.as_str()),
        ("add", "grant")
    );
    assert_eq!(seen[0].kind, "consume");
    assert!(seen
        .iter()
        .all(|t| !t.idempotency_key.is_empty() && t.created_at_ms > 0));

    // Filters: kinds, wallet, time range; GetTransaction; bad input.
    let grants = metering
        .list_transactions(pb::ListTransactionsRequest {
            account_id: "busy".into(),
            kinds: vec!["grant".into()],
            ..Default::default()
        })
        .await
        .expect("kinds")
        .into_inner();
    assert_eq!(grants.transactions.len(), 1);
    let none = metering
        .list_transactions(pb::ListTransactionsRequest {
            account_id: "busy".into(),
            wallet: "other".into(),
            ..Default::default()
        })
        .await
        .expect("wallet filter")
        .into_inner();
    assert!(none.transactions.is_empty());
    let at = seen[5000].created_at_ms;
    let ranged = metering
        .list_transactions(pb::ListTransactionsRequest {
            account_id: "busy".into(),
            from_ms: at,
            to_ms: at + 1,
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("range")
        .into_inner();
    let expected = seen.iter().filter(|t| t.created_at_ms == at).count();
    assert_eq!(ranged.transactions.len(), expected.min(1000));
    let one = metering
        .get_transaction(pb::GetTransactionRequest {
            event_id: seen[10].event_id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(one, seen[10]);
    let missing = metering
        .get_transaction(pb::GetTransactionRequest {
            event_id: "0-1-0".into(),
        })
        .await
        .expect_err("missing");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    for nonsense in ["nonsense", "1-2", "1-2-3-4", "1--3", "a-1-0", ""] {
        let bad = metering
            .get_transaction(pb::GetTransactionRequest {
                event_id: nonsense.into(),
            })
            .await
            .expect_err("not an event id");
        assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{nonsense}");
        assert!(bad.message().contains("event_id"), "{nonsense}: {bad:?}");
    }
    let bad = metering
        .list_transactions(pb::ListTransactionsRequest {
            account_id: "busy".into(),
            kinds: vec!["gift".into()],
            page_token: "zz".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    use tonic_types::StatusExt;
    let fields: Vec<String> = bad
        .get_details_bad_request()
        .expect("bad request details")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert_eq!(fields, ["kinds", "page_token"]);

    // GetBalance and the store agree on total_used.
    let balance = metering
        .get_balance(pb::GetBalanceRequest {
            account_id: "busy".into(),
            wallet: "default".into(),
            ..Default::default()
        })
        .await
        .expect("balance")
        .into_inner();
    let summary = store.wallets().await.expect("wallets");
    assert_eq!(balance.wallets[0].total_used, summary[0].totals.used);
    assert_eq!(summary[0].totals.used, 9_999);
    server.stop().await;
}

/// Two settlers at once, plus one that died after reading a batch and one that died after
/// committing but before acknowledging: every event lands exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_and_dead_settlers_give_exactly_once_rows() {
    let redis = common::RedisServer::start();
    let (clock, now) = Clock::manual(START_MS);
    let ledger = common::ledger(&redis, clock);
    common::add_observer_group(&ledger).await;
    let pg = common::PgDatabase::create().await;
    let store = store(&pg.url).await;

    // Events exist before any settler: the dead ones take batches of them.
    common::workload::every_kind(&ledger, &now, 1, "early").await;
    let first = settler(&ledger, &store, "tollgate-settler", "probe");
    first.ensure_groups().await.expect("groups");
    for (consumer, commit) in [("dead-after-read", false), ("dead-after-commit", true)] {
        let taken = read_as(&ledger, "tollgate-settler", consumer, 5).await;
        assert!(!taken.is_empty(), "{consumer} took nothing");
        if commit {
            store.append(&taken).await.expect("commit without ack");
        }
    }

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let runs: Vec<_> = ["one", "two"]
        .into_iter()
        .map(|name| run_until(settler(&ledger, &store, "tollgate-settler", name), &stopped))
        .collect();
    common::workload::every_kind(&ledger, &now, 3, "late").await;
    let outbox = common::outbox_events(&ledger).await;
    let deadline = Instant::now() + DEADLINE;
    while (store.count_events().await.expect("count") as usize) < outbox.len() {
        assert!(Instant::now() < deadline, "not settled in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop.send(true);
    for r in runs {
        r.await.expect("settler task");
    }
    assert_store_matches_outbox(&store, &outbox).await;
    // Nothing is left pending in the settlers' group: the dead consumers' batches were
    // claimed and acknowledged.
    let mut finisher = settler(&ledger, &store, "tollgate-settler", "finisher");
    finisher.drain(DEADLINE).await.expect("drain");
    assert_eq!(
        common::pending(&ledger, "tollgate-settler", None).await,
        Some(0),
        "entries still pending"
    );
    let report =
        tollgate::settle::reconcile::reconcile(ledger.clone(), store.clone(), fast(), DEADLINE)
            .await
            .expect("reconcile");
    assert!(report.drifts.is_empty(), "{}", report.render());
}

/// A hold whose record was deleted from Redis by hand: once overdue it leaves the
/// deadline index and its credits stay held (lib.lua `expire_hold`), so the balances
/// still agree with the durable ledger; reconcile reports it by the count of open holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_reports_a_hold_redis_lost() {
    let redis = common::RedisServer::start();
    let (clock, now) = Clock::manual(START_MS);
    let ledger = common::ledger(&redis, clock);
    let pg = common::PgDatabase::create().await;
    let store = store(&pg.url).await;
    ledger
        .grant(&common::purchase("acme", 100, "g"))
        .await
        .expect("grant");
    let authorize = |key: &str| Authorize {
        account_id: "acme".into(),
        wallet: "default".into(),
        amount: 30,
        ttl_ms: 5_000,
        on_expiry: OnExpiry::Release,
        idempotency_key: key.into(),
        operation: "ocr.pages".into(),
        metadata: Metadata::new(),
        member_id: String::new(),
        price_inputs: None,
        attempt_mark: None,
    };
    let lost = ledger.authorize(&authorize("h1")).await.expect("hold 1");
    ledger.authorize(&authorize("h2")).await.expect("hold 2");
    let reconcile =
        || tollgate::settle::reconcile::reconcile(ledger.clone(), store.clone(), fast(), DEADLINE);
    let clean = reconcile().await.expect("reconcile");
    assert!(clean.drifts.is_empty(), "{}", clean.render());

    let shard = ledger.shards().of_account("acme");
    let record = format!("{}:h:{}", ledger.shards().tag(shard), lost.hold_id);
    let deleted: i64 = ledger
        .redis()
        .query(redis::cmd("DEL").arg(&record))
        .await
        .expect("DEL");
    assert_eq!(deleted, 1, "the hold record is where the test looks");
    // Both holds overdue; the next charge ends the one with its record by its policy.
    now.store(START_MS + 10_000, Ordering::SeqCst);
    let debit = ledger
        .debit(&Debit {
            account_id: "acme".into(),
            wallet: "default".into(),
            amount: 10,
            idempotency_key: "d".into(),
            operation: "ocr.pages".into(),
            metadata: Metadata::new(),
            member_id: String::new(),
            price_inputs: None,
            attempt_mark: None,
        })
        .await
        .expect("the wallet still works");
    assert_eq!((debit.available, debit.held), (60, 30));

    let report = reconcile().await.expect("reconcile");
    let open_holds = Drift {
        account_id: "acme".into(),
        wallet: "default".into(),
        check: "redis",
        field: "open_holds",
        expected: 1,
        found: 0,
    };
    assert_eq!(report.drifts, [open_holds], "{}", report.render());
    // It names the hold (the other one ended by its policy and is not listed).
    let named = tollgate::settle::reconcile::LostHold {
        account_id: "acme".into(),
        wallet: "default".into(),
        hold_id: lost.hold_id.clone(),
    };
    assert_eq!(report.lost_holds, [named], "{}", report.render());
    assert!(
        report.render().contains(&lost.hold_id),
        "{}",
        report.render()
    );

    // `tollgate end-lost-hold` ends it: past its deadline, by its policy (release). The
    // credits come back, reconcile is clean, and a second run is refused.
    use tollgate::ledger::error::HoldEnd;
    use tollgate::settle::reconcile::{end_lost_hold, LostHoldEnd, LostHoldError};
    let end = || {
        end_lost_hold(
            ledger.clone(),
            store.clone(),
            fast(),
            DEADLINE,
            "acme",
            "default",
            &lost.hold_id,
        )
    };
    let ended = end().await.expect("end the lost hold");
    assert_eq!(
        ended,
        LostHoldEnd::ByPolicy {
            how: HoldEnd::Expired,
            captured: 0
        }
    );
    let balance = ledger.balance("acme", "default").await.expect("balance");
    assert_eq!((balance[0].available, balance[0].held), (90, 0));
    let report = reconcile().await.expect("reconcile");
    assert!(report.drifts.is_empty(), "{}", report.render());
    assert!(report.lost_holds.is_empty());
    match end().await {
        Err(LostHoldError::Refused(why)) => assert!(why.contains("no open hold"), "{why}"),
        other => panic!("a second end-lost-hold: {other:?}"),
    }
}

/// `end-lost-hold` refuses a hold that did end in Redis but whose end the ledger lacks
/// (here its capture event deleted from the store, its record gone from Redis after its
/// retention): ending it again would charge twice. The credits the ledger's open holds
/// hold (from their hold events) differ from what Redis holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_lost_hold_refuses_a_hold_redis_ended() {
    use tollgate::ledger::EndHold;
    use tollgate::settle::reconcile::{end_lost_hold, LostHoldError};

    let redis = common::RedisServer::start();
    let ledger = common::ledger(&redis, Clock::Redis);
    let pg = common::PgDatabase::create().await;
    let store = store(&pg.url).await;
    ledger
        .grant(&common::purchase("ended", 100, "g"))
        .await
        .expect("grant");
    let hold = ledger
        .authorize(&Authorize {
            account_id: "ended".into(),
            wallet: "default".into(),
            amount: 30,
            ttl_ms: 60_000,
            on_expiry: OnExpiry::Capture,
            idempotency_key: "h".into(),
            operation: "ocr.pages".into(),
            metadata: Metadata::new(),
            member_id: String::new(),
            price_inputs: None,
            attempt_mark: None,
        })
        .await
        .expect("hold");
    ledger
        .end_hold(&EndHold::capture(hold.hold_id.clone(), None, "c".into()))
        .await
        .expect("capture");
    ledger
        .debit(&Debit {
            account_id: "ended".into(),
            wallet: "default".into(),
            amount: 5,
            idempotency_key: "d".into(),
            operation: "ocr.pages".into(),
            metadata: Metadata::new(),
            member_id: String::new(),
            price_inputs: None,
            attempt_mark: None,
        })
        .await
        .expect("debit");
    settler(&ledger, &store, "tollgate-settler", "a")
        .drain(DEADLINE)
        .await
        .expect("drain");
    let pool = sqlx::PgPool::connect(&pg.url).await.expect("pg");
    let gone = sqlx::query("DELETE FROM tollgate_events WHERE hold_id = $1 AND kind = 'capture'")
        .bind(&hold.hold_id)
        .execute(&pool)
        .await
        .expect("delete")
        .rows_affected();
    assert_eq!(gone, 1);
    let shard = ledger.shards().of_account("ended");
    let _: i64 = ledger
        .redis()
        .query(redis::cmd("DEL").arg(format!("{}:h:{}", ledger.shards().tag(shard), hold.hold_id)))
        .await
        .expect("del");
    match end_lost_hold(
        ledger.clone(),
        store.clone(),
        fast(),
        DEADLINE,
        "ended",
        "default",
        &hold.hold_id,
    )
    .await
    {
        Err(LostHoldError::Refused(why)) => {
            assert!(why.contains("missing from the ledger"), "{why}")
        }
        other => panic!("ending a hold Redis ended: {other:?}"),
    }
    let balance = ledger.balance("ended", "default").await.expect("balance");
    assert_eq!(
        (balance[0].available, balance[0].held),
        (65, 0),
        "nothing charged again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_command_finds_a_planted_drift() {
    let redis = common::RedisServer::start();
    let (clock, now) = Clock::manual(START_MS);
    let ledger = common::ledger(&redis, clock);
    common::workload::every_kind(&ledger, &now, 1, "r").await;
    let pg = common::PgDatabase::create().await;
    // The store `serve` or `settle` made: reconcile creates none (tests/toolstore.rs).
    store(&pg.url).await;
    let reconcile = || {
        common::output_within(
            common::tollgate()
                .args(["reconcile", "--redis-url", &redis.url(), "--store", &pg.url])
                .args(["--drain-timeout-secs", "120"]),
            common::COMMAND_TIMEOUT,
        )
    };
    let clean = reconcile();
    assert!(clean.status.success(), "{clean:?}");
    assert!(
        String::from_utf8_lossy(&clean.stdout).contains("0 drift"),
        "{clean:?}"
    );

    // Change a balance behind tollgate's back.
    let shard = ledger.shards().of_account("acme");
    let key = format!("{}:w:acme:default", ledger.shards().tag(shard));
    let _: i64 = ledger
        .redis()
        .query(redis::cmd("HINCRBY").arg(&key).arg("r").arg(5))
        .await
        .expect("plant");
    let drifted = reconcile();
    assert_eq!(drifted.status.code(), Some(1), "{drifted:?}");
    let out = String::from_utf8_lossy(&drifted.stdout);
    // Redis's available differs from the store's, and Redis no longer conserves credits.
    let rows: Vec<Vec<&str>> = out
        .lines()
        .filter(|l| l.starts_with("acme"))
        .map(|l| l.split_whitespace().collect())
        .collect();
    let checks: Vec<(&str, &str)> = rows.iter().map(|r| (r[2], r[3])).collect();
    assert_eq!(
        checks,
        [("redis", "available"), ("conservation", "redis")],
        "{out}"
    );
    assert_eq!(
        rows[0][5].parse::<i64>().ok(),
        rows[0][4].parse::<i64>().ok().map(|n| n + 5),
        "{out}"
    );
}

/// Settles the outboxes into each store under its own group.
async fn drain_into(ledger: &Arc<Ledger>, stores: &[(&str, Arc<Store>)]) {
    for (group, store) in stores {
        settler(ledger, store, group, "a")
            .drain(DEADLINE)
            .await
            .expect("drain");
    }
}

/// A Redis that came back behind the store (restarted from an RDB snapshot taken before
/// events the store has settled): reconcile reports each shard whose outbox is behind,
/// with both positions, and the events Redis lost wallet by wallet (a grant, an
/// adjustment, an allocation), although no event came after them: the outbox's last entry
/// id, where the store's side usually stops, is before them. PostgreSQL and SQLite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_reports_a_redis_that_came_back_behind_the_store() {
    use tollgate::ledger::org::AllocationChange;
    use tollgate::ledger::AdjustInput;
    use tollgate::settle::reconcile::{OutboxBehind, OUTBOX_BEHIND};

    let dir = common::temp_path("rdb");
    std::fs::create_dir_all(&dir).expect("dir");
    let dir_text = dir.display().to_string();
    let rdb = ["--dir", dir_text.as_str(), "--dbfilename", "dump.rdb"];
    let mut redis = common::RedisServer::start_with(&rdb);
    let ledger = common::ledger(&redis, Clock::Redis);
    // Nothing is trimmed: the outbox shows which events the snapshot has, and each store
    // settles all of them.
    common::add_observer_group(&ledger).await;
    let pg = common::PgDatabase::create().await;
    let stores = to_both_stores(&pg).await;
    ledger
        .grant(&common::purchase("alice", 100, "g1"))
        .await
        .expect("grant");
    ledger
        .grant(&common::purchase("acme", 1_000, "g-acme"))
        .await
        .expect("grant");
    ledger
        .create_org("acme", "olivia", "create")
        .await
        .expect("create org");
    ledger
        .add_member("acme", "olivia", "bob", "member", "add-bob")
        .await
        .expect("add member");
    let allocate = |amount, key: &'static str| {
        let ledger = ledger.clone();
        async move {
            ledger
                .allocate(
                    "acme",
                    "olivia",
                    "bob",
                    "",
                    AllocationChange::Set(amount),
                    key,
                )
                .await
                .expect("allocate")
        }
    };
    allocate(100, "alloc-1").await;
    drain_into(&ledger, &stores).await;
    let saved = common::outbox_events(&ledger).await;
    let mut con = redis.client().get_connection().expect("connection");
    let _: () = redis::cmd("SAVE").query(&mut con).expect("SAVE");
    drop(con);

    // Settled, then lost with the restart.
    ledger
        .grant(&common::purchase("alice", 1_000, "g2"))
        .await
        .expect("grant");
    let adjust = AdjustInput {
        account_id: "alice".into(),
        wallet: "default".into(),
        amount: -30,
        idempotency_key: "a1".into(),
        ..Default::default()
    }
    .into_command()
    .expect("adjust");
    ledger.adjust(&adjust).await.expect("adjust");
    allocate(250, "alloc-2").await;
    drain_into(&ledger, &stores).await;
    let all = common::outbox_events(&ledger).await;
    let newest = |events: &[tollgate::ledger::event::LedgerEvent], shard: u16| {
        events
            .iter()
            .filter(|e| e.shard() == shard)
            .map(|e| e.stream_position())
            .max()
    };
    let behind: Vec<OutboxBehind> = BTreeSet::from([
        ledger.shards().of_account("alice"),
        ledger.shards().of_account("acme"),
    ])
    .into_iter()
    .map(|shard| OutboxBehind {
        shard,
        settled: newest(&all, shard).expect("settled events"),
        redis: newest(&saved, shard),
    })
    .collect();

    redis.restart_with(&rdb);
    let ledger =
        tollgate::server::ledger_from_config(&common::test_config(&redis.url()), Clock::Redis)
            .expect("ledger");
    let balance = ledger.balance("alice", "default").await.expect("balance");
    assert_eq!(
        balance[0].available, 100,
        "Redis came back from the snapshot"
    );

    let mut expected: Vec<Drift> = behind
        .iter()
        .map(|b| Drift {
            account_id: ledger.shards().tag(b.shard).to_owned(),
            wallet: "-".into(),
            check: "redis",
            field: OUTBOX_BEHIND,
            expected: b.settled.0,
            found: b.redis.expect("the snapshot has earlier events").0,
        })
        .collect();
    let redis_drift = |field, expected, found| Drift {
        account_id: "alice".into(),
        wallet: "default".into(),
        check: "redis",
        field,
        expected,
        found,
    };
    expected.extend([
        redis_drift("available", 1_070, 100),
        redis_drift("granted", 1_100, 100),
        redis_drift("adjusted", -30, 0),
        Drift {
            account_id: "acme:bob".into(),
            wallet: "default".into(),
            check: "allocation",
            field: "allocated",
            expected: 250,
            found: 100,
        },
    ]);
    for (group, store) in &stores {
        let report = tollgate::settle::reconcile::reconcile(
            ledger.clone(),
            store.clone(),
            SettlerSettings {
                group: (*group).into(),
                ..fast()
            },
            DEADLINE,
        )
        .await
        .expect("reconcile");
        let text = report.render();
        println!("{}: {text}", store.kind());
        assert_eq!(report.drifts, expected, "{}: {text}", store.kind());
        assert_eq!(report.outboxes_behind, behind, "{}: {text}", store.kind());
        for b in &behind {
            let (ms, seq) = b.settled;
            assert!(text.contains(&format!("{ms}-{seq}")), "{text}");
        }
    }
    drop(redis);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Redis's `available` raised behind tollgate's back, then one charge: the store's
/// available and held are the charge event's, Redis's own figures, so the store and
/// Redis agree field by field; but neither conserves credits (granted + adjusted +
/// refunded − used − expired is not available + held), and reconcile reports it for
/// both. PostgreSQL and SQLite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_reports_a_wallet_that_does_not_conserve_credits() {
    let redis = common::RedisServer::start();
    let ledger = common::ledger(&redis, Clock::Redis);
    // Nothing is trimmed before both stores have settled it.
    common::add_observer_group(&ledger).await;
    let pg = common::PgDatabase::create().await;
    let stores = to_both_stores(&pg).await;
    ledger
        .grant(&common::purchase("acme", 100, "g"))
        .await
        .expect("grant");
    let shard = ledger.shards().of_account("acme");
    let key = format!("{}:w:acme:default", ledger.shards().tag(shard));
    let _: i64 = ledger
        .redis()
        .query(redis::cmd("HINCRBY").arg(&key).arg("r").arg(50))
        .await
        .expect("plant");
    let mut debit = member_debit("", "d".into());
    debit.account_id = "acme".into();
    let charged = ledger.debit(&debit).await.expect("debit");
    assert_eq!(charged.available, 149);
    drain_into(&ledger, &stores).await;
    let drift = |field, expected, found| Drift {
        account_id: "acme".into(),
        wallet: "default".into(),
        check: "conservation",
        field,
        expected,
        found,
    };
    for (group, store) in &stores {
        let report = tollgate::settle::reconcile::reconcile(
            ledger.clone(),
            store.clone(),
            SettlerSettings {
                group: (*group).into(),
                ..fast()
            },
            DEADLINE,
        )
        .await
        .expect("reconcile");
        assert_eq!(
            report.drifts,
            [drift("redis", 99, 149), drift("store", 99, 149)],
            "{}: {}",
            store.kind(),
            report.render()
        );
    }
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, f64::max)
}

/// An API key made while the store is down is answered with its secret (shown once: a
/// retry would replay without it) and saved in the store once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_made_while_the_store_is_down_is_answered_and_saved_later() {
    let redis = common::RedisServer::start();
    let pg = common::PgDatabase::create().await;
    let proxy = common::proxy::FaultProxy::start(pg_target()).await;
    let target = pg_target();
    let via_proxy = pg.url.replace(&target.to_string(), &proxy.addr.to_string());
    let mut config = common::test_config(&redis.url());
    config.store.url = via_proxy;
    let server = common::TestServer::start(config, Clock::Redis).await;

    proxy.cut();
    let made = tokio::time::timeout(
        DEADLINE,
        server
            .admin()
            .await
            .create_api_key(pb::CreateApiKeyRequest {
                account_id: "acme".into(),
                name: "ci".into(),
                idempotency_key: "k-1".into(),
                ..Default::default()
            }),
    )
    .await
    .expect("the call ends")
    .expect("made, though the store is down")
    .into_inner();
    assert!(!made.api_key.is_empty(), "the secret is in the answer");

    proxy.restore();
    let store = store(&pg.url).await;
    let deadline = Instant::now() + DEADLINE;
    loop {
        let keys = store.api_keys().await.expect("keys");
        if keys
            .iter()
            .any(|k| k.key_id == made.key_id && k.account_id == "acme")
        {
            break;
        }
        assert!(Instant::now() < deadline, "the key never reached the store");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    server.stop().await;
}

/// An API key made while the store hangs (its table locked: the save waits, without an
/// error) is answered with its secret within a bound far under the caller's deadline,
/// and saved once the store answers. The handler used to wait for the save: past the
/// caller's deadline the answer, the secret's only copy, was lost, and a retry replays
/// without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_made_while_the_store_hangs_is_answered_and_saved_later() {
    use sqlx::{Connection, Executor};
    let redis = common::RedisServer::start();
    let pg = common::PgDatabase::create().await;
    let mut config = common::test_config(&redis.url());
    config.store.url = pg.url.clone();
    let server = common::TestServer::start(config, Clock::Redis).await;
    let store = store(&pg.url).await;

    // Every write to the keys table waits on this lock (reads do not), held until the
    // answer is in.
    let mut locker = sqlx::PgConnection::connect(&pg.url).await.expect("connect");
    let mut lock = locker.begin().await.expect("begin");
    lock.execute("LOCK TABLE tollgate_api_keys IN EXCLUSIVE MODE")
        .await
        .expect("lock");
    // Generous, and far past the server's wait for the save (KEY_SAVE_WAIT).
    let caller_deadline = Duration::from_secs(20);
    assert!(caller_deadline > 5 * tollgate::api::admin::KEY_SAVE_WAIT);
    let mut request = tonic::Request::new(pb::CreateApiKeyRequest {
        account_id: "acme".into(),
        name: "ci".into(),
        idempotency_key: "k-1".into(),
        ..Default::default()
    });
    request.set_timeout(caller_deadline);
    let made = server
        .admin()
        .await
        .create_api_key(request)
        .await
        .expect("answered within the caller's deadline, though the store hangs")
        .into_inner();
    assert!(!made.api_key.is_empty(), "the secret is in the answer");
    assert!(!made.replayed);
    assert!(
        !store
            .api_keys()
            .await
            .expect("keys")
            .iter()
            .any(|k| k.key_id == made.key_id),
        "saved through the lock?"
    );

    lock.rollback().await.expect("unlock");
    common::eventually(DEADLINE, "the key saved in the store", || {
        let store = store.clone();
        let key_id = made.key_id.clone();
        async move {
            let keys = store.api_keys().await.expect("keys");
            keys.iter()
                .any(|k| k.key_id == key_id && k.account_id == "acme")
                .then_some(())
        }
    })
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_keeps_charges_flowing_and_the_ledger_catches_up() {
    let redis = common::RedisServer::start();
    let pg = common::PgDatabase::create().await;
    let proxy = common::proxy::FaultProxy::start(pg_target()).await;
    let target = pg_target();
    let via_proxy = pg.url.replace(&target.to_string(), &proxy.addr.to_string());
    assert_ne!(via_proxy, pg.url, "the store url goes through the proxy");
    let mut config = common::test_config(&redis.url());
    config.store.url = via_proxy;
    config.settler.enabled = true;
    config.settler.ready_lag_max_ms = 300;
    config.settler.backoff_max_ms = 300;
    config.settler.trim_interval_ms = 100;
    let server = common::TestServer::start(config, Clock::Redis).await;
    let ledger = server.ledger.clone();
    ledger
        .grant(&common::purchase("steady", 1_000_000, "g"))
        .await
        .expect("grant");

    let acked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let load = {
        let ledger = ledger.clone();
        let acked = acked.clone();
        tokio::spawn(async move {
            let mut i = 0u64;
            while !*stopped.borrow() {
                i += 1;
                let debit = Debit {
                    account_id: "steady".into(),
                    wallet: "default".into(),
                    amount: 1,
                    idempotency_key: format!("d{i}"),
                    operation: "op".into(),
                    metadata: Metadata::new(),
                    member_id: String::new(),
                    price_inputs: None,
                    attempt_mark: None,
                };
                ledger.debit(&debit).await.expect("charges keep working");
                acked.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let store = store(&pg.url).await;
    let deadline = Instant::now() + DEADLINE;
    while store.count_events().await.expect("count") < 20 {
        assert!(
            Instant::now() < deadline,
            "nothing settled before the outage"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    proxy.cut();
    let during = acked.load(Ordering::SeqCst);
    // Readiness reports the outage (store error and lag) as degraded and the serving pod
    // stays ready (its load balancer keeps it), the lag gauge rises, and charges keep
    // succeeding.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (code, body) = common::http_get(server.http_addr, "/readyz").await;
        let (_, metrics) = common::http_get(server.http_addr, "/metrics").await;
        let lag = metric(&metrics, "tollgate_outbox_oldest_unsettled_age_seconds");
        let json: serde_json::Value = serde_json::from_str(&body).expect("readyz JSON");
        let degraded = json["degraded"]
            .as_array()
            .is_some_and(|d| d.iter().any(|v| v == "outbox_lag"));
        // The settler's writes fail meanwhile (counted once one was tried: the outage
        // lasts until then, however slow the machine).
        let failed = metric(&metrics, "tollgate_store_errors_total") >= 1.0;
        if degraded && lag > 0.3 && failed {
            assert_eq!(
                (code, &json["ready"]),
                (200, &serde_json::json!(true)),
                "{body}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "readiness never reported the lag, or no store error was counted: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Charges go on while the store is still cut off. Readiness can see the lag before the
    // load task ran again on a busy machine, so wait (generously) for charges acknowledged
    // after the cut rather than expecting them at this instant.
    common::eventually(DEADLINE, "charges acknowledged during the outage", || {
        let acked = acked.clone();
        async move { (acked.load(Ordering::SeqCst) >= during + 20).then_some(()) }
    })
    .await;
    let settled_during = store.count_events().await.expect("count");

    proxy.restore();
    let _ = stop.send(true);
    load.await.expect("load");
    let total = acked.load(Ordering::SeqCst) as i64 + 1;
    assert!(total > settled_during, "the outage held events back");
    let deadline = Instant::now() + DEADLINE;
    while store.count_events().await.expect("count") < total {
        assert!(Instant::now() < deadline, "the ledger did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(store.count_events().await.expect("count"), total);
    let deadline = Instant::now() + DEADLINE;
    while common::http_get(server.http_addr, "/readyz").await.0 != 200 {
        assert!(Instant::now() < deadline, "never ready again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, metrics) = common::http_get(server.http_addr, "/metrics").await;
    assert!(
        metric(&metrics, "tollgate_store_errors_total") >= 1.0,
        "store errors counted"
    );
    server.stop().await;
    let report =
        tollgate::settle::reconcile::reconcile(ledger.clone(), store.clone(), fast(), DEADLINE)
            .await
            .expect("reconcile");
    assert!(report.drifts.is_empty(), "{}", report.render());
    let kinds: HashMap<EventKind, usize> = store
        .history(&tollgate::settle::store::HistoryQuery {
            account_id: "steady".into(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("history")
        .events
        .iter()
        .fold(HashMap::new(), |mut m, e| {
            *m.entry(e.kind).or_default() += 1;
            m
        });
    assert!(kinds.contains_key(&EventKind::Debit));
}

/// A store outage shorter than the lag threshold leaves a serving pod in traffic: charges
/// never wait for the store, so `/readyz` stays 200 and names the store under `degraded`
/// (a database blip must not take every gateway pod out of its load balancer at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_degrades_a_serving_pod_but_keeps_it_ready() {
    let redis = common::RedisServer::start();
    let pg = common::PgDatabase::create().await;
    let proxy = common::proxy::FaultProxy::start(pg_target()).await;
    let mut config = common::test_config(&redis.url());
    config.store.url = pg
        .url
        .replace(&pg_target().to_string(), &proxy.addr.to_string());
    config.settler.enabled = true;
    config.settler.ready_lag_max_ms = 600_000;
    config.settler.backoff_max_ms = 300;
    config.settler.trim_interval_ms = 100;
    let server = common::TestServer::start(config, Clock::Redis).await;
    let ledger = server.ledger.clone();
    let grant = |key: &str| common::purchase("blip", 10, key);
    let readyz = || async {
        let (code, body) = common::http_get(server.http_addr, "/readyz").await;
        let json: serde_json::Value = serde_json::from_str(&body).expect("readyz JSON body");
        (code, json)
    };
    ledger.grant(&grant("before")).await.expect("grant");
    let direct = store(&pg.url).await;
    let deadline = Instant::now() + DEADLINE;
    while direct.count_events().await.expect("count") < 1 {
        assert!(
            Instant::now() < deadline,
            "nothing settled before the outage"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, body) = readyz().await;
    assert_eq!((code, &body["degraded"]), (200, &json!([])), "{body}");

    proxy.cut();
    let deadline = Instant::now() + DEADLINE;
    for n in 0.. {
        // A grant each round: one settled through a connection the cut had not yet closed
        // would leave nothing for the settler to fail on.
        ledger
            .grant(&grant(&format!("during-{n}")))
            .await
            .expect("charges and grants do not need the store");
        let (code, body) = readyz().await;
        if body["degraded"] == json!(["store"]) {
            assert_eq!(
                code, 200,
                "a store error alone made the pod unready: {body}"
            );
            assert_eq!(body["ready"], true, "{body}");
            assert_ne!(body["checks"]["store"], "ok", "{body}");
            break;
        }
        assert_eq!(
            code, 200,
            "a store error alone made the pod unready: {body}"
        );
        assert!(
            Instant::now() < deadline,
            "the store error was never reported: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    proxy.restore();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (code, body) = readyz().await;
        if code == 200 && body["checks"]["store"] == "ok" && body["degraded"] == json!([]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the store error never cleared: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.stop().await;
}

/// A settler stuck without an error (here: its batch insert waits on a table lock, as a
/// store query that never returns would) stops measuring the outboxes. Its last
/// measurement, an age taken in the past, used to stand for ever: `/readyz` stayed green
/// with the lag it had seen last. Readiness now says the settler is stuck once the
/// measurement is older than `settler.ready_lag_max_ms` (a serving pod: degraded, still
/// ready), and all is well again once the store answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settler_stuck_on_a_store_query_that_never_returns_is_reported() {
    use sqlx::Connection;

    let redis = common::RedisServer::start();
    let pg = common::PgDatabase::create().await;
    let mut config = common::test_config(&redis.url());
    config.store.url = pg.url.clone();
    config.settler.enabled = true;
    config.settler.trim_interval_ms = 100;
    config.settler.backoff_max_ms = 300;
    // The bound on the measurement's age: short, long enough for a busy machine's rounds.
    config.settler.ready_lag_max_ms = 5_000;
    let server = common::TestServer::start(config, Clock::Redis).await;
    let ledger = server.ledger.clone();
    let readyz = || async {
        let (code, body) = common::http_get(server.http_addr, "/readyz").await;
        let json: serde_json::Value = serde_json::from_str(&body).expect("readyz JSON body");
        (code, json)
    };
    ledger
        .grant(&common::purchase("stuck", 10, "before"))
        .await
        .expect("grant");
    let direct = store(&pg.url).await;
    common::eventually(DEADLINE, "the first grant to settle", || async {
        (direct.count_events().await.expect("count") >= 1).then_some(())
    })
    .await;
    common::eventually(DEADLINE, "a green /readyz with the settler ok", || async {
        let (code, body) = readyz().await;
        (code == 200 && body["degraded"] == json!([]) && body["checks"]["settler"] == "ok")
            .then_some(())
    })
    .await;

    // Every write to the events table waits on this lock, without an error.
    let mut locker = sqlx::PgConnection::connect(&pg.url).await.expect("connect");
    let mut lock = locker.begin().await.expect("begin");
    sqlx::query("LOCK TABLE tollgate_events IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .expect("lock");
    ledger
        .grant(&common::purchase("stuck", 10, "during"))
        .await
        .expect("charges do not need the store");
    // The grant's event may have been measured unsettled before the insert blocked: its
    // lag then grows past the bound too (first, as it is older than the measurement).
    let deadline = Instant::now() + DEADLINE;
    let body = loop {
        let (code, body) = readyz().await;
        assert_eq!(
            code, 200,
            "a stuck settler made a serving pod unready: {body}"
        );
        let degraded = body["degraded"].clone();
        if degraded == json!(["settler"]) || degraded == json!(["outbox_lag", "settler"]) {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never reported the stuck settler: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(body["ready"], true, "{body}");
    let why = body["checks"]["settler"].as_str().unwrap_or_default();
    assert!(why.starts_with("stuck"), "{body}");
    assert!(
        body["checks"]["outbox"]["measured_ms_ago"].as_u64() > Some(5_000),
        "{body}"
    );

    lock.rollback().await.expect("unlock");
    common::eventually(DEADLINE, "the settler to recover", || async {
        let (code, body) = readyz().await;
        (code == 200 && body["degraded"] == json!([]) && body["checks"]["settler"] == "ok")
            .then_some(())
    })
    .await;
    common::eventually(DEADLINE, "the grant made while stuck to settle", || async {
        (direct.count_events().await.expect("count") >= 2).then_some(())
    })
    .await;
    server.stop().await;
}

/// Starts `command` (given its free ports; `http` the index of its HTTP port) while
/// another process holds the store's migration lock (src/settle/store.rs): it must answer
/// `/healthz` all the same, after a bounded wait, and turn ready once the lock is gone.
async fn answers_while_its_store_hangs(
    pg: &common::PgDatabase,
    ports: usize,
    http: usize,
    command: impl Fn(&[u16]) -> std::process::Command,
) {
    use sqlx::{Connection, Executor};
    let mut locker = sqlx::PgConnection::connect(&pg.url).await.expect("connect");
    let mut lock = locker.begin().await.expect("begin");
    lock.execute("SELECT pg_advisory_xact_lock(7157680)")
        .await
        .expect("lock");
    let child = common::spawn_listening(
        ports,
        DEADLINE,
        command,
        // Each probe bounded: a server that does not serve yet takes the connection (the
        // port is bound) and answers nothing.
        |ports| async move {
            let addr = ([127, 0, 0, 1], ports[http]).into();
            tokio::time::timeout(Duration::from_secs(5), common::http_get(addr, "/healthz"))
                .await
                .is_ok_and(|(code, _)| code == 200)
        },
    )
    .await;
    let http_addr: std::net::SocketAddr = ([127, 0, 0, 1], child.ports[http]).into();
    // The lock was held all along: the process answers unmigrated.
    lock.rollback().await.expect("unlock");
    common::eventually(DEADLINE, "ready once the store answers", || async {
        let (code, _) = common::http_get(http_addr, "/readyz").await;
        (code == 200).then_some(())
    })
    .await;
    drop(child);
}

/// `serve` whose store hangs at start-up serves all the same, after a bounded wait:
/// `/healthz` answers, and checks and charges, which never need the store, are taken. It
/// used to wait for the migration before serving, for as long as the store hung. Once the
/// store answers, the new shards are initialized in the background and the pod turns
/// ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_whose_store_hangs_at_start_up_serves() {
    let redis = common::RedisServer::start();
    let pg = common::PgDatabase::create().await;
    let redis_url = redis.url();
    answers_while_its_store_hangs(&pg, 2, 1, |ports| {
        let mut cmd = common::tollgate();
        cmd.arg("serve")
            .arg(format!("--redis-url={redis_url}"))
            .arg(format!("--store={}", pg.url))
            .arg(format!("--grpc-addr=127.0.0.1:{}", ports[0]))
            .arg(format!("--http-addr=127.0.0.1:{}", ports[1]))
            .env("TOLLGATE_ADMIN_TOKEN", common::ADMIN_TOKEN)
            .env("TOLLGATE_SERVICE_TOKEN", common::SERVICE_TOKEN)
            .env(
                "TOLLGATE_GATEWAY__SPOOL_PATH",
                common::temp_path("spool").display().to_string(),
            )
            .stdout(std::process::Stdio::null());
        cmd
    })
    .await;
}

/// `tollgate settle` whose store hangs at start-up answers `/healthz` after a bounded
/// wait, as `serve` does: it used to wait on the shard count check for as long as the
/// lock was held, serving nothing, so the liveness probe killed it in a loop. Once the
/// store answers it settles and turns ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settle_whose_store_hangs_at_start_up_answers_health_checks() {
    let redis = common::RedisServer::start();
    // A ledger whose shards serve (`serve` marks them; `settle` never does).
    let _ledger = common::ledger(&redis, Clock::Redis);
    let pg = common::PgDatabase::create().await;
    let redis_url = redis.url();
    answers_while_its_store_hangs(&pg, 1, 0, |ports| {
        let mut cmd = common::tollgate();
        cmd.args(["settle", "--redis-url", &redis_url, "--store", &pg.url])
            .arg(format!("--http-addr=127.0.0.1:{}", ports[0]))
            .stdout(std::process::Stdio::null());
        cmd
    })
    .await;
}

/// `tollgate settle` over `redis_url` and `store_url`, its HTTP port picked free (again
/// if another process took it first), accepting connections.
async fn settle_command(redis_url: &str, store_url: &str) -> common::Listening {
    common::spawn_listening(
        1,
        DEADLINE,
        |ports| {
            let mut cmd = common::tollgate();
            cmd.args(["settle", "--redis-url", redis_url, "--store", store_url])
                .arg(format!("--http-addr=127.0.0.1:{}", ports[0]))
                .stdout(std::process::Stdio::null());
            cmd
        },
        |ports| async move {
            tokio::net::TcpStream::connect(("127.0.0.1", ports[0]))
                .await
                .is_ok()
        },
    )
    .await
}

/// `tollgate settle` only settles: unlike a serving pod, it turns not-ready on a store
/// error, and ready again once the store is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_settle_command_fails_readiness_on_a_store_error() {
    let redis = common::RedisServer::start();
    let (clock, _) = Clock::manual(START_MS);
    let ledger = common::ledger(&redis, clock);
    let pg = common::PgDatabase::create().await;
    let proxy = common::proxy::FaultProxy::start(pg_target()).await;
    let via_proxy = pg
        .url
        .replace(&pg_target().to_string(), &proxy.addr.to_string());
    let child = std::sync::Mutex::new(settle_command(&redis.url(), &via_proxy).await);
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], child.lock().expect("child").ports[0]).into();
    let grants = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Waits for /readyz to answer `code` with `failed`, writing an event each round so the
    // settler has something to (fail to) write.
    let wait_for = |code: u16, failed: serde_json::Value| {
        let ledger = ledger.clone();
        let grants = grants.clone();
        let child = &child;
        async move {
            let deadline = Instant::now() + DEADLINE;
            loop {
                let rounds = grants.fetch_add(1, Ordering::SeqCst);
                ledger
                    .grant(&common::purchase("acme", 1, &format!("g{rounds}")))
                    .await
                    .expect("grant");
                let answer = if tokio::net::TcpStream::connect(addr).await.is_ok() {
                    let (got, body) = common::http_get(addr, "/readyz").await;
                    Some((
                        got,
                        serde_json::from_str::<serde_json::Value>(&body).unwrap_or_default(),
                    ))
                } else {
                    None
                };
                if let Some((got, body)) = &answer {
                    if *got == code && body["failed"] == failed {
                        return;
                    }
                }
                {
                    let mut child = child.lock().expect("child");
                    child.assert_running(&format!("waiting for {code} {failed}"));
                    assert!(
                        Instant::now() < deadline,
                        "never {code} {failed}: {answer:?}; its stderr:\n{}",
                        child.stderr()
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    wait_for(200, json!([])).await;
    proxy.cut();
    wait_for(503, json!(["store"])).await;
    proxy.restore();
    wait_for(200, json!([])).await;
}

/// `tollgate settle` alone: settles what `serve` (here: the ledger API) wrote, reports
/// ready, and migrations run once however often the store is opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_settle_command_runs_a_settler_alone() {
    let redis = common::RedisServer::start();
    let (clock, now) = Clock::manual(START_MS);
    let ledger = common::ledger(&redis, clock);
    common::workload::every_kind(&ledger, &now, 1, "s").await;
    let written = common::outbox_len(&ledger).await;
    let pg = common::PgDatabase::create().await;
    // Migrating twice (two settlers starting together) is harmless.
    store(&pg.url).await;
    let store = store(&pg.url).await;
    let mut child = settle_command(&redis.url(), &pg.url).await;
    let deadline = Instant::now() + DEADLINE;
    while (store.count_events().await.expect("count") as usize) < written {
        child.assert_running("settling");
        assert!(
            Instant::now() < deadline,
            "tollgate settle did not settle; its stderr:\n{}",
            child.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], child.ports[0]).into();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let ready = tokio::net::TcpStream::connect(addr).await.is_ok()
            && common::http_get(addr, "/readyz").await.0 == 200;
        if ready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tollgate settle never ready; its stderr:\n{}",
            child.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.child.0.id().to_string()])
        .status();
    let deadline = Instant::now() + DEADLINE;
    while child.child.0.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "tollgate settle ignored SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(store.count_events().await.expect("count") as usize, written);
}

/// Reconcile against a live system: charges keep flowing while it runs, and it still
/// finds no drift (each wallet is compared at a point the store has settled through).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_works_on_a_live_system() {
    let redis = common::RedisServer::start();
    let ledger = common::ledger(&redis, Clock::Redis);
    let pg = common::PgDatabase::create().await;
    let store = store(&pg.url).await;
    for a in common::workload::ACCOUNTS {
        ledger
            .grant(&common::purchase(a, 1_000_000, "g"))
            .await
            .expect("grant");
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let settle_task = run_until(
        settler(&ledger, &store, "tollgate-settler", "live"),
        &stopped,
    );
    // Debits made until now, shared with the load.
    let charged = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let load = {
        let ledger = ledger.clone();
        let stopped = stopped.clone();
        let charged = charged.clone();
        tokio::spawn(async move {
            let mut i = 0usize;
            while !*stopped.borrow() {
                i += 1;
                let debit = Debit {
                    account_id: common::workload::ACCOUNTS[i % 4].into(),
                    wallet: "default".into(),
                    amount: 1,
                    idempotency_key: format!("live{i}"),
                    operation: "op".into(),
                    metadata: Metadata::new(),
                    member_id: String::new(),
                    price_inputs: None,
                    attempt_mark: None,
                };
                ledger.debit(&debit).await.expect("debit");
                charged.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            i
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let overlapped = live_reconciles(&charged, || async {
        let report =
            tollgate::settle::reconcile::reconcile(ledger.clone(), store.clone(), fast(), DEADLINE)
                .await
                .expect("reconcile");
        assert!(report.drifts.is_empty(), "{}", report.render());
        assert_eq!(report.wallets, 4);
    })
    .await;
    println!("{overlapped} reconciles ran, each with debits landing during it");
    let _ = stop.send(true);
    assert!(load.await.expect("load") > 0);
    settle_task.await.expect("settler");
}

/// Reconciles that each had charges landing while it ran (`charged` counts them): runs
/// `reconcile` (which checks its report) until three of them did, at most twenty times
/// (one that ran between two charges proves nothing and does not count). Returns how many
/// ran.
async fn live_reconciles<F, Fut>(charged: &std::sync::atomic::AtomicUsize, reconcile: F) -> usize
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (mut ran, mut overlapped) = (0, 0);
    while overlapped < 3 {
        assert!(
            ran < 20,
            "only {overlapped} of {ran} reconciles had charges landing while they ran"
        );
        let before = charged.load(Ordering::SeqCst);
        reconcile().await;
        ran += 1;
        if charged.load(Ordering::SeqCst) > before {
            overlapped += 1;
        }
    }
    ran
}

/// A member's charge of 1 credit from the org "acme"'s default wallet.
fn member_debit(member: &str, idempotency_key: String) -> Debit {
    Debit {
        account_id: "acme".into(),
        wallet: "default".into(),
        amount: 1,
        idempotency_key,
        operation: "op".into(),
        metadata: Metadata::new(),
        member_id: member.into(),
        price_inputs: None,
        attempt_mark: None,
    }
}

/// Reconcile against a live org: a member's charges and holds keep flowing while it runs,
/// and the allocations still agree (each org wallet's allocation record is compared at a
/// point the store has settled through, as wallets are); an allocation changed by hand in
/// Redis meanwhile is still a drift, with exactly its figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_finds_no_allocation_drift_on_a_live_org_but_finds_a_real_one() {
    use tollgate::ledger::org::AllocationChange;

    let redis = common::RedisServer::start();
    let ledger = common::ledger(&redis, Clock::Redis);
    let pg = common::PgDatabase::create().await;
    let store = store(&pg.url).await;
    ledger
        .grant(&common::purchase("acme", 100_000_000, "g"))
        .await
        .expect("grant");
    ledger
        .create_org("acme", "olivia", "create")
        .await
        .expect("create org");
    for member in ["bob", "carol"] {
        ledger
            .add_member("acme", "olivia", member, "member", &format!("add-{member}"))
            .await
            .expect("add member");
    }
    for (member, amount) in [("bob", 1_000_000), ("carol", 1_000)] {
        ledger
            .allocate(
                "acme",
                "olivia",
                member,
                "",
                AllocationChange::Set(amount),
                &format!("alloc-{member}"),
            )
            .await
            .expect("allocate");
    }
    // Carol spends 3 before the load, nothing during it.
    for i in 0..3 {
        ledger
            .debit(&member_debit("carol", format!("carol{i}")))
            .await
            .expect("carol's debit");
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let settle_task = run_until(
        settler(&ledger, &store, "tollgate-settler", "live"),
        &stopped,
    );
    // Bob charges all along; every tenth round he also holds 5 and releases it (the
    // allocation's used goes up, then back down).
    let charged = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let load = {
        let ledger = ledger.clone();
        let stopped = stopped.clone();
        let charged = charged.clone();
        tokio::spawn(async move {
            let mut i = 0usize;
            while !*stopped.borrow() {
                i += 1;
                ledger
                    .debit(&member_debit("bob", format!("bob{i}")))
                    .await
                    .expect("bob's debit");
                charged.fetch_add(1, Ordering::SeqCst);
                if i.is_multiple_of(10) {
                    let held = ledger
                        .authorize(&Authorize {
                            account_id: "acme".into(),
                            wallet: "default".into(),
                            amount: 5,
                            ttl_ms: 600_000,
                            on_expiry: OnExpiry::Release,
                            idempotency_key: format!("bob-hold{i}"),
                            operation: "op".into(),
                            metadata: Metadata::new(),
                            member_id: "bob".into(),
                            price_inputs: None,
                            attempt_mark: None,
                        })
                        .await
                        .expect("bob's hold");
                    ledger
                        .end_hold(&tollgate::ledger::EndHold::release(
                            held.hold_id,
                            format!("bob-release{i}"),
                        ))
                        .await
                        .expect("bob's release");
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            i
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    live_reconciles(&charged, || async {
        let report =
            tollgate::settle::reconcile::reconcile(ledger.clone(), store.clone(), fast(), DEADLINE)
                .await
                .expect("reconcile");
        assert!(report.drifts.is_empty(), "{}", report.render());
    })
    .await;

    // A real drift, planted while bob keeps charging: bob's allocation lowered by hand
    // (his charges do not change it) and carol's used raised (she charges no more).
    let shard = ledger.shards().of_account("acme");
    let akey = format!("{}:al:acme:default", ledger.shards().tag(shard));
    let _: i64 = ledger
        .redis()
        .query(redis::cmd("HSET").arg(&akey).arg("bob").arg(999_000))
        .await
        .expect("plant bob's");
    let _: i64 = ledger
        .redis()
        .query(redis::cmd("HINCRBY").arg(&akey).arg("carol:u").arg(5))
        .await
        .expect("plant carol's");
    let before = charged.load(Ordering::SeqCst);
    let report =
        tollgate::settle::reconcile::reconcile(ledger.clone(), store.clone(), fast(), DEADLINE)
            .await
            .expect("reconcile");
    let during = charged.load(Ordering::SeqCst) - before;
    println!("{during} debits landed during the reconcile that found the planted drift");
    let drift = |member: &str, field, expected, found| Drift {
        account_id: format!("acme:{member}"),
        wallet: "default".into(),
        check: "allocation",
        field,
        expected,
        found,
    };
    assert_eq!(
        report.drifts,
        vec![
            drift("bob", "allocated", 1_000_000, 999_000),
            drift("carol", "used", 3, 8),
        ],
        "{}",
        report.render()
    );
    let _ = stop.send(true);
    assert!(load.await.expect("load") > 0);
    settle_task.await.expect("settler");
}

/// A read whose reply never arrived (the call timed out; Redis ran it later) leaves its
/// entries pending in this consumer, where no read of new entries finds them: the next
/// rounds read them back at once instead of waiting for a claim idle time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_of_a_read_whose_reply_was_lost_settle_on_the_next_rounds() {
    let mut redis = common::RedisServer::start();
    let (clock, now) = Clock::manual(START_MS);
    // The settler's ledger has a short call deadline (its read must time out while Redis
    // is stopped); the test's own writes and checks use the generous one of every test.
    let ledger =
        tollgate::server::ledger_from_config(&common::test_config(&redis.url()), clock.clone())
            .expect("ledger");
    common::initialize_blocking(&ledger, &redis.url());
    let mut short = common::test_config(&redis.url());
    short.redis.call_timeout_ms = 300;
    let short = tollgate::server::ledger_from_config(&short, clock).expect("ledger");
    let store = store(&common::temp_sqlite_url()).await;
    let mut settler = Settler::new(
        short,
        store.clone(),
        SettlerSettings {
            group: "tollgate-settler".into(),
            consumer: "a".into(),
            // No other settler's claim brings the entries back within this test.
            claim_idle: Duration::from_secs(3_600),
            ..fast()
        },
    );
    settler.ensure_groups().await.expect("groups");
    // A started settler first reads its own pending entries (none): then only new ones.
    assert_eq!(settler.round().await.expect("round"), 0);
    common::workload::every_kind(&ledger, &now, 1, "lost").await;
    let written = common::outbox_len(&ledger).await;
    assert!(written > 0);

    // Redis stopped: the round's read waits in Redis's socket, times out, and runs when
    // Redis continues; its entries are delivered to "a" and the reply is lost.
    redis.pause();
    let lost = settler.round().await;
    redis.resume();
    assert!(
        lost.is_err(),
        "the read must time out while Redis is stopped"
    );
    let deadline = Instant::now() + DEADLINE;
    while common::pending(&ledger, "tollgate-settler", Some("a"))
        .await
        .expect("XPENDING")
        < written as i64
    {
        assert!(Instant::now() < deadline, "the lost read never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(store.count_events().await.expect("count"), 0);

    // No new entries arrive; rounds (far below the claim idle time) settle them. A round
    // whose call a busy machine makes time out is simply tried again.
    let deadline = Instant::now() + DEADLINE;
    while (store.count_events().await.expect("count") as usize) < written {
        assert!(
            Instant::now() < deadline,
            "entries delivered to a lost read stay pending until a claim"
        );
        let _ = settler.round().await;
    }
    assert_eq!(
        store.count_events().await.expect("count") as usize,
        written,
        "entries delivered to a lost read stay pending until a claim"
    );
    assert_eq!(
        common::pending(&ledger, "tollgate-settler", Some("a"))
            .await
            .expect("XPENDING"),
        0
    );
    redis.kill();
}

/// A dead letter replayed. A real debit whose outbox entry got corrupted (its amount not
/// a number) is set aside by the settler, so the store lacks it and reconcile reports its
/// wallet. `tollgate dead-letters list` shows it; a replay whose correction still does
/// not read is refused and changes nothing, as does `--dry-run`; `replay --set n=30`
/// writes it under its entry's event id and deletes it; reconcile then agrees, and a
/// second replay finds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_replayed_with_its_amount_corrected_closes_the_drift() {
    let redis = common::RedisServer::start();
    let pg = common::PgDatabase::create().await;
    let ledger = common::ledger(&redis, Clock::Redis);
    let pg_store = store(&pg.url).await;
    let mut settler = settler(&ledger, &pg_store, "tollgate-settler", "a");
    ledger
        .grant(&common::purchase("dl", 100, "g-dl"))
        .await
        .expect("grant");
    settler.drain(DEADLINE).await.expect("drain");
    ledger
        .debit(&Debit {
            account_id: "dl".into(),
            wallet: "default".into(),
            amount: 30,
            idempotency_key: "d-dl".into(),
            operation: "op".into(),
            metadata: Metadata::default(),
            member_id: String::new(),
            price_inputs: None,
            attempt_mark: None,
        })
        .await
        .expect("debit");
    // The debit's entry, corrupted: deleted, then added again with its amount spoilt.
    let shard = ledger.shards().of_account("dl");
    let outbox = ledger.shards().outbox(shard).to_owned();
    let newest: Vec<(String, HashMap<String, String>)> = ledger
        .redis()
        .query(
            redis::cmd("XREVRANGE")
                .arg(&outbox)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1),
        )
        .await
        .expect("xrevrange");
    let (original, mut fields) = newest.into_iter().next().expect("the debit's entry");
    assert_eq!(fields.get("n").map(String::as_str), Some("30"));
    fields.insert("n".into(), "thirty".into());
    let _: i64 = ledger
        .redis()
        .query(redis::cmd("XDEL").arg(&outbox).arg(&original))
        .await
        .expect("xdel");
    let mut add = redis::cmd("XADD");
    add.arg(&outbox).arg("*");
    for (k, v) in &fields {
        add.arg(k).arg(v);
    }
    let entry: String = ledger.redis().query(&add).await.expect("xadd");
    settler.drain(DEADLINE).await.expect("drain");
    let reconcile = || {
        tollgate::settle::reconcile::reconcile(ledger.clone(), pg_store.clone(), fast(), DEADLINE)
    };
    let report = reconcile().await.expect("reconcile");
    assert!(!report.drifts.is_empty(), "the store lacks the debit");

    let run = |args: &[&str]| dead_letters(&redis, &pg, args);
    let (line, dead_id) = the_one_dead_letter(&run(&["list"]), &entry);
    assert!(line.contains("n=\"thirty\""), "{line}");
    assert!(line.contains("bad or missing n"), "{line}");
    let shard_arg = shard.to_string();
    let dead_len = || async {
        let n: i64 = ledger
            .redis()
            .query(redis::cmd("XLEN").arg(format!("{outbox}:dead")))
            .await
            .expect("xlen");
        n
    };
    let events_before = pg_store.count_events().await.expect("count");

    let still_bad = run(&["replay", &shard_arg, &dead_id, "--set", "n=3O"]);
    assert!(!still_bad.status.success(), "{still_bad:?}");
    assert!(
        String::from_utf8_lossy(&still_bad.stderr).contains("still does not read"),
        "{still_bad:?}"
    );
    let dry = run(&["replay", &shard_arg, &dead_id, "--set", "n=30", "--dry-run"]);
    assert!(dry.status.success(), "{dry:?}");
    assert!(
        String::from_utf8_lossy(&dry.stdout).contains("would write"),
        "{dry:?}"
    );
    assert_eq!(dead_len().await, 1);
    assert_eq!(pg_store.count_events().await.expect("count"), events_before);

    // Refused, changing nothing: a field no entry has, an account of another shard, a
    // partial id; a dead letter not in the settler's shape, or with bytes that are not
    // UTF-8 in a field not given again (both listed, and droppable).
    let other = (0..)
        .map(|i| format!("other{i}"))
        .find(|a| ledger.shards().of_account(a) != shard)
        .expect("an account of another shard");
    let elsewhere = format!("a={other}");
    let malformed: String = ledger
        .redis()
        .query(
            redis::cmd("XADD")
                .arg(format!("{outbox}:dead"))
                .arg("*")
                .arg("k")
                .arg("debit"),
        )
        .await
        .expect("xadd");
    let not_utf8: String = ledger
        .redis()
        .query(
            redis::cmd("XADD")
                .arg(format!("{outbox}:dead"))
                .arg("*")
                .arg(&["id", "1-1", "error", "x", "k", "debit", "n", "1", "m"])
                .arg(&b"\xff\xfe"[..]),
        )
        .await
        .expect("xadd");
    let listed = run(&["list"]);
    let stdout = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert_eq!(stdout.lines().count(), 3, "{stdout}");
    assert!(
        stdout.contains(&format!("dead {malformed} malformed")),
        "{stdout}"
    );
    for (args, why) in [
        (
            vec![dead_id.as_str(), "--set", "n=30", "--set", "nope=1"],
            "not a field",
        ),
        (
            vec![dead_id.as_str(), "--set", "n=30", "--set", &elsewhere],
            "whose shard is",
        ),
        (vec!["5", "--set", "n=30"], "not a stream entry id"),
        (vec![malformed.as_str()], "drop it"),
        (vec![not_utf8.as_str()], "field m"),
    ] {
        let refused = run(&[&["replay", shard_arg.as_str()], args.as_slice()].concat());
        assert!(!refused.status.success(), "{args:?}: {refused:?}");
        assert!(
            String::from_utf8_lossy(&refused.stderr).contains(why),
            "{args:?}: {refused:?}"
        );
    }
    assert_eq!(dead_len().await, 3);
    assert_eq!(pg_store.count_events().await.expect("count"), events_before);
    // The only copy of an applied event: not deleted without --force.
    let kept = run(&["drop", &shard_arg, &malformed]);
    assert!(!kept.status.success(), "{kept:?}");
    assert!(
        String::from_utf8_lossy(&kept.stderr).contains("--force"),
        "{kept:?}"
    );
    assert_eq!(dead_len().await, 3);
    for id in [&malformed, &not_utf8] {
        let dropped = run(&["drop", &shard_arg, id, "--force"]);
        assert!(dropped.status.success(), "{dropped:?}");
    }
    assert_eq!(dead_len().await, 1);

    let replayed = run(&["replay", &shard_arg, &dead_id, "--set", "n=30"]);
    assert!(replayed.status.success(), "{replayed:?}");
    assert!(
        String::from_utf8_lossy(&replayed.stdout).contains(&format!(
            "wrote event {shard}-{entry} (debit of 30 on dl/default)"
        )),
        "{replayed:?}"
    );
    assert_eq!(dead_len().await, 0);
    let report = reconcile().await.expect("reconcile");
    assert!(report.drifts.is_empty(), "{}", report.render());
    let again = run(&["replay", &shard_arg, &dead_id, "--set", "n=30"]);
    assert!(!again.status.success(), "{again:?}");
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("no dead letter"),
        "{again:?}"
    );
}

/// Runs a settler in the background until `stopped` turns true.
/// `tollgate dead-letters ARGS` against this test's Redis and store.
fn dead_letters(
    redis: &common::RedisServer,
    pg: &common::PgDatabase,
    args: &[&str],
) -> std::process::Output {
    common::output_within(
        common::tollgate()
            .arg("dead-letters")
            .args(["--redis-url", &redis.url(), "--store", &pg.url])
            .args(args),
        common::COMMAND_TIMEOUT,
    )
}

/// A `dead-letters list` that lists one entry, outbox entry `entry`: its line and its id
/// in the dead letters.
fn the_one_dead_letter(listed: &std::process::Output, entry: &str) -> (String, String) {
    assert!(listed.status.success(), "{listed:?}");
    let stdout = String::from_utf8_lossy(&listed.stdout).into_owned();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    assert!(lines[0].contains(&format!("entry {entry} ")), "{stdout}");
    let dead_id = lines[0]
        .split_whitespace()
        .skip_while(|w| *w != "dead")
        .nth(1)
        .expect("dead id")
        .to_owned();
    (lines[0].to_owned(), dead_id)
}

fn run_until(
    settler: Settler,
    stopped: &tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let mut rx = stopped.clone();
    tokio::spawn(settler.run(async move {
        let _ = rx.wait_for(|s| *s).await;
    }))
}

/// The newest outbox entry of a shard, written again (a new entry id) with `field` set to
/// `value`: an event Redis applied whose entry now carries what the test needs. Returns
/// the new entry id.
async fn rewrite_newest_entry(ledger: &Ledger, shard: u16, field: &str, value: &str) -> String {
    let outbox = ledger.shards().outbox(shard).to_owned();
    let newest: Vec<(String, Vec<(String, String)>)> = ledger
        .redis()
        .query(
            redis::cmd("XREVRANGE")
                .arg(&outbox)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1),
        )
        .await
        .expect("xrevrange");
    let (original, mut fields) = newest.into_iter().next().expect("an entry");
    fields
        .iter_mut()
        .find(|(k, _)| k == field)
        .expect("the field")
        .1 = value.to_owned();
    let _: i64 = ledger
        .redis()
        .query(redis::cmd("XDEL").arg(&outbox).arg(&original))
        .await
        .expect("xdel");
    let mut add = redis::cmd("XADD");
    add.arg(&outbox).arg("*");
    for (k, v) in &fields {
        add.arg(k).arg(v);
    }
    ledger.redis().query(&add).await.expect("xadd")
}

/// Every shard's dead letters, counted.
async fn dead_letters_len(ledger: &Ledger) -> i64 {
    let mut total = 0;
    for shard in 0..ledger.shards().count() {
        let n: i64 = ledger
            .redis()
            .query(redis::cmd("XLEN").arg(format!("{}:dead", ledger.shards().outbox(shard))))
            .await
            .expect("xlen");
        total += n;
    }
    total
}

/// An event the store refuses for its data (here a NUL byte, which PostgreSQL text never
/// holds, in an entry that reads fine; in production a character a LATIN1 database
/// lacks) used to stop settlement on every shard for good: its batch was retried for
/// ever. Now the batch is written in halves down to that event, which is set aside: every
/// other event of every shard settles and the outboxes are trimmed. `dead-letters list`
/// shows it with the store's error, a replay the store still refuses changes nothing,
/// one with the field corrected writes it, and reconcile then agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_store_refuses_is_set_aside_and_everything_else_settles() {
    let redis = common::RedisServer::start();
    let pg = common::PgDatabase::create().await;
    let (clock, now) = Clock::manual(START_MS);
    let ledger = common::ledger(&redis, clock);
    common::workload::every_kind(&ledger, &now, 1, "a").await;
    ledger
        .grant(&common::purchase("refused", 100, "g-refused"))
        .await
        .expect("grant");
    let shard = ledger.shards().of_account("refused");
    let entry = rewrite_newest_entry(&ledger, shard, "i", "g-\0refused").await;
    common::workload::every_kind(&ledger, &now, 1, "b").await;
    let (refused, rest): (Vec<LedgerEvent>, Vec<LedgerEvent>) = readable_outbox_events(&ledger)
        .await
        .into_iter()
        .partition(|e| e.stream_id == entry && e.shard() == shard);
    assert_eq!(refused.len(), 1);
    assert!(rest.len() > 20, "{}", rest.len());
    let pg_store = store(&pg.url).await;
    let mut settler = settler(&ledger, &pg_store, "tollgate-settler", "a");

    tokio::time::timeout(DEADLINE, settler.drain(DEADLINE))
        .await
        .expect("one refused event stops nothing: drained in time")
        .expect("drain");

    assert_store_matches_outbox(&pg_store, &rest).await;
    assert_eq!(dead_letters_len(&ledger).await, 1);
    assert_eq!(
        common::outbox_len(&ledger).await,
        0,
        "the outboxes are trimmed past the refused event"
    );
    let reconcile = || {
        tollgate::settle::reconcile::reconcile(ledger.clone(), pg_store.clone(), fast(), DEADLINE)
    };
    let report = reconcile().await.expect("reconcile");
    assert!(
        !report.drifts.is_empty() && report.drifts.iter().all(|d| d.account_id == "refused"),
        "only the set-aside event's wallet drifts: {}",
        report.render()
    );

    let run = |args: &[&str]| dead_letters(&redis, &pg, args);
    let (line, dead_id) = the_one_dead_letter(&run(&["list"]), &entry);
    assert!(line.contains("refused by the store"), "{line}");
    let shard_arg = shard.to_string();
    let events_before = pg_store.count_events().await.expect("count");

    let still_refused = run(&["replay", &shard_arg, &dead_id]);
    assert!(!still_refused.status.success(), "{still_refused:?}");
    assert_eq!(dead_letters_len(&ledger).await, 1);
    assert_eq!(pg_store.count_events().await.expect("count"), events_before);

    let replayed = run(&["replay", &shard_arg, &dead_id, "--set", "i=g-refused"]);
    assert!(replayed.status.success(), "{replayed:?}");
    assert_eq!(dead_letters_len(&ledger).await, 0);
    assert_eq!(
        pg_store.count_events().await.expect("count"),
        events_before + 1
    );
    let report = reconcile().await.expect("reconcile");
    assert!(report.drifts.is_empty(), "{}", report.render());
}

/// A store that refuses every row (a constraint added by hand) is a schema problem, not
/// a bad event: the settler sets aside at most `SET_ASIDE_WITHOUT_A_WRITE_MAX` events in
/// a row, then retries like an unreachable store (reported, the outbox kept), and settles
/// the rest once the store takes rows again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_refusing_every_row_sets_aside_only_a_few_events() {
    use tollgate::settle::settler::SET_ASIDE_WITHOUT_A_WRITE_MAX;
    let redis = common::RedisServer::start();
    let pg = common::PgDatabase::create().await;
    let (clock, now) = Clock::manual(START_MS);
    let ledger = common::ledger(&redis, clock);
    common::workload::every_kind(&ledger, &now, 1, "a").await;
    let total = readable_outbox_events(&ledger).await.len();
    assert!(total > SET_ASIDE_WITHOUT_A_WRITE_MAX + 5, "{total}");
    let pg_store = store(&pg.url).await;
    common::run_sql(
        &pg.url,
        "ALTER TABLE tollgate_events ADD CONSTRAINT refuse_all CHECK (event_id = '')".into(),
    )
    .await;
    let settler = settler(&ledger, &pg_store, "tollgate-settler", "a");
    let status = settler.status();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(settler.run(async move {
        let _ = stopped.await;
    }));

    let deadline = Instant::now() + DEADLINE;
    loop {
        let store_error = status.lock().expect("status").store_error.clone();
        if dead_letters_len(&ledger).await == SET_ASIDE_WITHOUT_A_WRITE_MAX as i64
            && store_error.is_some_and(|e| e.contains("refused"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "never stopped setting aside");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Retrying now: no more set aside (a slow machine only makes fewer), nothing written.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        dead_letters_len(&ledger).await,
        SET_ASIDE_WITHOUT_A_WRITE_MAX as i64
    );
    assert_eq!(pg_store.count_events().await.expect("count"), 0);

    common::run_sql(
        &pg.url,
        "ALTER TABLE tollgate_events DROP CONSTRAINT refuse_all".into(),
    )
    .await;
    let deadline = Instant::now() + DEADLINE;
    while pg_store.count_events().await.expect("count") as usize
        != total - SET_ASIDE_WITHOUT_A_WRITE_MAX
    {
        assert!(Instant::now() < deadline, "the rest never settled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop.send(());
    task.await.expect("settler task");
}

/// A fresh PostgreSQL database created LATIN1, as `createdb -E LATIN1 -T template0
/// --locale=C` makes it.
async fn latin1_database() -> common::PgDatabase {
    let pg = common::PgDatabase::create().await;
    let name = pg.url.rsplit('/').next().expect("database name").to_owned();
    // Made again under its own name: dropped with `pg` all the same.
    common::run_sql(
        &common::pg_admin_url(),
        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
    )
    .await;
    common::run_sql(
        &common::pg_admin_url(),
        format!(
            "CREATE DATABASE {name} ENCODING 'LATIN1' TEMPLATE template0 \
             LC_COLLATE 'C' LC_CTYPE 'C'"
        ),
    )
    .await;
    pg
}

/// A database that is not UTF8 cannot hold every event (a grant described "caf🙂" is
/// refused by a LATIN1 one), so migrating it is refused with an error that says why and
/// what to do, before anything is created in it; the operator tools' open refuses it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_not_created_utf8_is_refused() {
    let pg = latin1_database().await;
    assert_eq!(
        query_text(
            &pg.url,
            "SELECT CAST(current_setting('server_encoding') AS TEXT)"
        )
        .await,
        vec!["LATIN1".to_owned()]
    );
    let store = Store::connect_lazy(&pg.url, 2).expect("store url");
    let err = store.migrate().await.expect_err("refused");
    assert_eq!(err.kind(), "unsupported", "{err}");
    let why = err.to_string();
    assert!(why.contains("LATIN1") && why.contains("UTF8"), "{why}");
    assert_eq!(
        query_text(
            &pg.url,
            "SELECT CAST(table_name AS TEXT) FROM information_schema.tables \
             WHERE CAST(table_name AS TEXT) LIKE 'tollgate%'"
        )
        .await,
        Vec::<String>::new(),
        "nothing created"
    );
    let opened = Store::open_existing(&pg.url, 2).await;
    assert!(
        opened.as_ref().is_err_and(|e| e.kind() == "unsupported"),
        "{:?}",
        opened.err()
    );
}

/// Eight stores (as separate processes would have: a pool each) migrating a fresh
/// database at once: each at the first try.
async fn all_migrate_at_once(url: &str) {
    let mut starts = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let store = Store::connect_lazy(url, 2).expect("store url");
        starts.spawn(async move { store.migrate().await });
    }
    while let Some(migrated) = starts.join_next().await {
        migrated.expect("task").expect("migrated at the first try");
    }
}

/// Several processes starting at once on a fresh database all migrate it at the first
/// try: the migrations table is created under the migration lock (it used to be created
/// before it, and concurrent `CREATE TABLE IF NOT EXISTS` failed on PostgreSQL's catalog
/// index, pg_type_typname_nsp_index).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_migrations_all_succeed() {
    for _ in 0..4 {
        let pg = common::PgDatabase::create().await;
        all_migrate_at_once(&pg.url).await;
    }
}

/// The same on a fresh SQLite file: each process takes the write lock once, at `BEGIN
/// IMMEDIATE`, for the whole migration. (Deferred transactions failed at once on the
/// upgrade from read to write; then a write lock taken for every version starved some
/// processes past the busy timeout under load: "database is locked".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_migrations_all_succeed_sqlite() {
    for _ in 0..4 {
        all_migrate_at_once(&common::temp_sqlite_url()).await;
    }
}

/// A settler whose store is unreachable from start-up fails to migrate, round after
/// round: that is counted in `tollgate_store_errors_total` (what `TollgateStoreErrors`
/// watches), not only in the round errors; and every kind the counter can carry is
/// exported at 0 from the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_unreachable_from_start_up_counts_store_errors() {
    let redis = common::RedisServer::start();
    // Nothing listens on port 1: every connection is refused.
    let mut child = settle_command(&redis.url(), "postgres://tollgate@127.0.0.1:1/tollgate").await;
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], child.ports[0]).into();
    let (_, first) = common::http_get(addr, "/metrics").await;
    for kind in tollgate::settle::store::STORE_ERROR_KINDS {
        let series = format!("tollgate_store_errors_total{{kind=\"{kind}\"}}");
        assert!(first.contains(&series), "{series} missing:\n{first}");
    }
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (_, metrics) = common::http_get(addr, "/metrics").await;
        if metric(
            &metrics,
            "tollgate_store_errors_total{kind=\"unavailable\"}",
        ) >= 1.0
        {
            break;
        }
        child.assert_running("waiting for a store error");
        assert!(
            Instant::now() < deadline,
            "no store error counted:\n{metrics}\nits stderr:\n{}",
            child.stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Events one script writes share a millisecond of the stream and a created_at_ms (a
/// balance call expiring 12 lots). History lists them newest first by stream position as
/// numbers, in both stores and across pages: the event id compared as text put `…-9` above
/// `…-11`, so the first row (whose balance_after a portal shows as the balance) was not
/// the newest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_newest_first_within_one_millisecond() {
    use tollgate::settle::store::HistoryQuery;
    let redis = common::RedisServer::start();
    let (clock, now) = Clock::manual(START_MS);
    let ledger = common::ledger(&redis, clock);
    for i in 0..12 {
        let mut grant = common::purchase("acme", 10 + i, &format!("g{i}"));
        grant.expires_at_ms = START_MS + 1_000;
        ledger.grant(&grant).await.expect("grant");
    }
    now.fetch_add(2_000, Ordering::SeqCst);
    let balance = ledger.balance("acme", "default").await.expect("balance");
    assert_eq!(balance[0].available, 0, "one call expired every lot");
    // Which sequence numbers Redis gives depends on the real ms the scripts ran in: number
    // each created_at_ms's events from 0 in stream order, as one script's in a fresh ms
    // are (0..=11 for each group of 12: past 9, the text order differs).
    let mut next_seq: HashMap<i64, u32> = HashMap::new();
    let events: Vec<LedgerEvent> = common::outbox_events(&ledger)
        .await
        .into_iter()
        .map(|mut e| {
            let shard = e.shard();
            let seq = next_seq.entry(e.created_at_ms).or_default();
            e.stream_id = format!("{}-{seq}", e.created_at_ms);
            e.event_id = format!("{shard}-{}", e.stream_id);
            *seq += 1;
            e
        })
        .collect();
    assert_eq!(events.len(), 24);
    assert!(next_seq.values().all(|n| *n == 12), "{next_seq:?}");
    let newest_first: Vec<&str> = events.iter().rev().map(|e| e.event_id.as_str()).collect();

    let pg = common::PgDatabase::create().await;
    for url in [common::temp_sqlite_url(), pg.url.clone()] {
        let store = store(&url).await;
        assert_eq!(store.append(&events).await.expect("append"), 24);
        let mut query = HistoryQuery {
            account_id: "acme".into(),
            page_size: 5,
            ..Default::default()
        };
        let mut listed = Vec::new();
        loop {
            let page = store.history(&query).await.expect("history");
            listed.extend(page.events);
            match page.next {
                Some(after) => query.after = Some(after),
                None => break,
            }
            assert!(listed.len() <= 24, "{} pages never end", store.kind());
        }
        let ids: Vec<&str> = listed.iter().map(|e| e.event_id.as_str()).collect();
        assert_eq!(ids, newest_first, "{} history order", store.kind());
        assert_eq!(
            listed[0].available_after,
            balance[0].available,
            "{}: the first row is the balance",
            store.kind()
        );
    }
}

/// A refund of a charge whose lot has expired since gives back only what is still live:
/// the rest expires at once, carried in the event's `x` alone. The history's Transaction
/// shows it as `expired` (the refund's lots sum to amount - expired, which is what its
/// balance_after rose by), so the history adds up to the balance. And a capture of 0,
/// which charged nothing and gave the whole hold back, is a "release" in user terms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_shows_a_refunds_expired_part_and_a_capture_of_nothing_as_a_release() {
    use tollgate::api::metering::transaction;
    use tollgate::ledger::{EndHold, Refund};
    use tollgate::settle::store::HistoryQuery;
    let redis = common::RedisServer::start();
    let (clock, now) = Clock::manual(START_MS);
    let ledger = common::ledger(&redis, clock);
    common::add_observer_group(&ledger).await;
    // Lot A burns first and expires in 10 s; lot B never expires.
    let mut a = common::purchase("acme", 100, "gA");
    a.priority = 10;
    a.expires_at_ms = START_MS + 10_000;
    ledger.grant(&a).await.expect("grant A");
    ledger
        .grant(&common::purchase("acme", 100, "gB"))
        .await
        .expect("grant B");
    let debit = ledger
        .debit(&Debit {
            account_id: "acme".into(),
            wallet: "default".into(),
            amount: 150,
            idempotency_key: "d".into(),
            operation: "op".into(),
            metadata: Metadata::new(),
            member_id: String::new(),
            price_inputs: None,
            attempt_mark: None,
        })
        .await
        .expect("debit: 100 from A, 50 from B");
    now.fetch_add(11_000, Ordering::SeqCst);
    // Back from the last drawn: B's 50 (live), then 70 of A's (expired).
    let refund = ledger
        .refund(&Refund {
            charge_id: debit.event_id.clone(),
            amount: 120,
            idempotency_key: "r".into(),
            metadata: Metadata::new(),
        })
        .await
        .expect("refund");
    let hold = ledger
        .authorize(&Authorize {
            account_id: "acme".into(),
            wallet: "default".into(),
            amount: 30,
            ttl_ms: 60_000,
            on_expiry: OnExpiry::Release,
            idempotency_key: "h".into(),
            operation: "op".into(),
            metadata: Metadata::new(),
            member_id: String::new(),
            price_inputs: None,
            attempt_mark: None,
        })
        .await
        .expect("hold");
    let capture = ledger
        .end_hold(&EndHold::capture(hold.hold_id.clone(), Some(0), "c".into()))
        .await
        .expect("capture of 0");
    let available = ledger.balance("acme", "default").await.expect("balance")[0].available;
    assert_eq!(available, 200 - 150 + (120 - 70));

    let pg = common::PgDatabase::create().await;
    for (url, group) in [
        (common::temp_sqlite_url(), "to-sqlite"),
        (pg.url.clone(), "to-postgres"),
    ] {
        let store = store(&url).await;
        settler(&ledger, &store, group, "a")
            .drain(DEADLINE)
            .await
            .expect("drain");
        let page = store
            .history(&HistoryQuery {
                account_id: "acme".into(),
                page_size: 50,
                ..Default::default()
            })
            .await
            .expect("history");
        let txs: Vec<pb::Transaction> = page.events.into_iter().map(transaction).collect();
        let kind = store.kind();
        assert_eq!(txs[0].balance_after, available, "{kind}");
        let at = |id: &str| {
            txs.iter()
                .position(|t| t.event_id == id)
                .unwrap_or_else(|| panic!("{kind}: {id} listed"))
        };
        let r = at(&refund.event_id);
        let tx = &txs[r];
        assert_eq!(
            (tx.kind.as_str(), tx.amount, tx.expired),
            ("refund", 120, 70),
            "{kind}"
        );
        assert_eq!(tx.lots.iter().map(|l| l.amount).sum::<i64>(), 50, "{kind}");
        // The row before it in time is the next one in the list.
        assert_eq!(
            tx.balance_after - txs[r + 1].balance_after,
            tx.amount - tx.expired,
            "{kind}"
        );
        assert!(txs
            .iter()
            .all(|t| t.event_id == refund.event_id || t.expired == 0));
        let c = &txs[at(&capture.event_id)];
        assert_eq!(
            (c.ledger_kind.as_str(), c.amount, c.kind.as_str()),
            ("capture", 0, "release"),
            "{kind}"
        );
    }
}

/// A ledger on `redis` (a manual clock) where "acme" was granted 100 and debited 7: the
/// debit, and the two outbox events.
async fn granted_and_debited(
    redis: &common::RedisServer,
) -> (
    Arc<Ledger>,
    tollgate::ledger::DebitOutcome,
    Vec<LedgerEvent>,
) {
    let (clock, _now) = Clock::manual(START_MS);
    let ledger = common::ledger(redis, clock);
    ledger
        .grant(&common::purchase("acme", 100, "g"))
        .await
        .expect("grant");
    let debit = ledger
        .debit(&Debit {
            account_id: "acme".into(),
            wallet: "default".into(),
            amount: 7,
            idempotency_key: "d".into(),
            operation: "op".into(),
            metadata: Metadata::new(),
            member_id: String::new(),
            price_inputs: None,
            attempt_mark: None,
        })
        .await
        .expect("debit");
    let events = common::outbox_events(&ledger).await;
    assert_eq!(events.len(), 2);
    assert_eq!(events[1].event_id, debit.event_id);
    (ledger, debit, events)
}

/// The store holds `lost` (what a lost Redis incarnation settled under an id the outbox
/// now reuses); then a settler drains the outbox.
async fn settle_after_a_lost_incarnation(
    ledger: &Arc<Ledger>,
    store: &Arc<Store>,
    lost: &LedgerEvent,
) {
    assert_eq!(
        store
            .append(std::slice::from_ref(lost))
            .await
            .expect("lost"),
        1
    );
    settler(ledger, store, "tollgate-settler", "a")
        .drain(DEADLINE)
        .await
        .expect("drain");
}

/// Another event under `debit`'s id: a debit of 30 (from 100) with another key.
fn another_debit_under_the_id_of(debit: &LedgerEvent) -> LedgerEvent {
    let mut other = debit.clone();
    other.amount = 30;
    other.available_after = 70;
    other.lots[0].amount = 30;
    other.idempotency_key = "lost".into();
    other
}

/// A Redis rolled back with its clock behind the lost incarnation's can hand a new event
/// the id of a settled one. The store's dedupe took it as already written: its charge was
/// missing from the durable ledger without a trace. Now the settler compares what the
/// store holds under the id, and a different event goes to the dead letters ("event id
/// reused by a different event", counted), while the rest of its batch settles and a
/// redelivery of the same event is still simply already written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_reusing_a_settled_events_id_is_set_aside_not_dropped() {
    let pg = common::PgDatabase::create().await;
    for url in [common::temp_sqlite_url(), pg.url.clone()] {
        let redis = common::RedisServer::start();
        let (ledger, debit, events) = granted_and_debited(&redis).await;
        let store = store(&url).await;
        let kind = store.kind();
        // What the lost incarnation settled under the debit's id: a debit of 30.
        let lost = another_debit_under_the_id_of(&events[1]);
        settle_after_a_lost_incarnation(&ledger, &store, &lost).await;

        assert_eq!(
            store.event(&events[0].event_id).await.expect("event"),
            Some(events[0].clone()),
            "{kind}: the rest of the batch settles"
        );
        assert_eq!(
            store.event(&debit.event_id).await.expect("event"),
            Some(lost.clone()),
            "{kind}"
        );
        let letters = tollgate::settle::dead_letters::list(&ledger)
            .await
            .expect("dead letters");
        assert_eq!(letters.len(), 1, "{kind}: {letters:?}");
        assert_eq!(letters[0].entry_id, events[1].stream_id, "{kind}");
        assert!(
            letters[0]
                .error
                .contains("event id reused by a different event: the store holds debit of 30"),
            "{kind}: {}",
            letters[0].error
        );
        assert_eq!(
            common::pending(&ledger, "tollgate-settler", None).await,
            Some(0),
            "{kind}: acknowledged"
        );
        // A redelivery (the same events again) is already written, not a reuse.
        let again = store
            .append_batch(&[events[0].clone(), lost.clone()], None, None)
            .await
            .expect("again");
        assert!(
            again.new_events.is_empty() && again.reused.is_empty(),
            "{kind}: {again:?}"
        );
        let reused = store
            .append_batch(&events, None, None)
            .await
            .expect("reused");
        assert_eq!(
            reused
                .reused
                .iter()
                .map(|r| r.event_id.as_str())
                .collect::<Vec<_>>(),
            [debit.event_id.as_str()],
            "{kind}"
        );
    }
}

/// A reused id's event can match the settled one in amount and balances (the same debit
/// retried against a rolled-back Redis) and differ only in its time or lots. The settler
/// sets it aside; `dead-letters replay` then refuses it (the id is taken) and leaves it.
/// It used to compare amounts and balances only, take it for an earlier replay's write,
/// and delete the letter: the only copy of the event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_leaves_a_reused_ids_letter_of_the_same_amount() {
    let redis = common::RedisServer::start();
    let (ledger, debit, events) = granted_and_debited(&redis).await;
    let store = store(&common::temp_sqlite_url()).await;
    let mut lost = events[1].clone();
    lost.created_at_ms -= 60_000;
    lost.idempotency_key = "lost".into();
    settle_after_a_lost_incarnation(&ledger, &store, &lost).await;
    let letters = tollgate::settle::dead_letters::list(&ledger)
        .await
        .expect("dead letters");
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    let replayed = tollgate::settle::dead_letters::replay(
        &ledger,
        &store,
        None,
        letter.shard,
        &letter.dead_id,
        &[],
        false,
    )
    .await;
    assert!(
        matches!(
            replayed,
            Err(tollgate::settle::dead_letters::DeadLetterError::Conflict(ref id, _)) if *id == debit.event_id
        ),
        "{replayed:?}"
    );
    assert_eq!(
        tollgate::settle::dead_letters::list(&ledger)
            .await
            .expect("dead letters"),
        letters,
        "the letter stays"
    );
    assert_eq!(
        store.event(&debit.event_id).await.expect("event"),
        Some(lost),
        "the settled event stays"
    );
}

/// A round whose commit fails after the store took part of its batch (here: setting an
/// event aside, the dead-letter stream unwritable) leaves the batch pending in its consumer.
/// The next round reads it again from its own pending entries; it used to read only new
/// entries, so the batch waited for a claim (`claim_idle`, here an hour) behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_commit_failed_is_read_again_by_the_next_round() {
    let redis = common::RedisServer::start();
    let (ledger, _debit, events) = granted_and_debited(&redis).await;
    let store = store(&common::temp_sqlite_url()).await;
    // The debit's id is taken in the store by another event: the settler sets it aside.
    let other = another_debit_under_the_id_of(&events[1]);
    assert_eq!(store.append(&[other]).await.expect("other"), 1);
    // ... into a dead-letter stream that cannot be written (a key of another type).
    let dead = format!("{}:dead", ledger.shards().outbox(events[1].shard()));
    let _: () = ledger
        .redis()
        .query(redis::cmd("SET").arg(&dead).arg("not a stream"))
        .await
        .expect("set");
    let mut settler = Settler::new(
        ledger.clone(),
        store.clone(),
        SettlerSettings {
            group: "tollgate-settler".into(),
            consumer: "a".into(),
            claim_idle: Duration::from_secs(3600),
            ..fast()
        },
    );
    settler.ensure_groups().await.expect("groups");
    let mut failed = false;
    for _ in 0..10 {
        if settler.round().await.is_err() {
            failed = true;
            break;
        }
    }
    assert!(failed, "the set-aside failed the round");
    assert_eq!(
        common::pending(&ledger, "tollgate-settler", Some("a")).await,
        Some(2)
    );

    let _: () = ledger
        .redis()
        .query(redis::cmd("DEL").arg(&dead))
        .await
        .expect("del");
    for _ in 0..3 {
        settler.round().await.expect("round");
    }
    assert_eq!(
        common::pending(&ledger, "tollgate-settler", None).await,
        Some(0),
        "the batch was read again and acknowledged"
    );
    let letters = tollgate::settle::dead_letters::list(&ledger)
        .await
        .expect("dead letters");
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].entry_id, events[1].stream_id);
    assert_eq!(
        store.event(&events[0].event_id).await.expect("event"),
        Some(events[0].clone())
    );
}

/// Every shard's consumers of `group`: (name, pending) per shard.
async fn consumers(ledger: &Ledger, group: &str) -> Vec<Vec<(String, i64)>> {
    let mut out = Vec::new();
    for shard in 0..ledger.shards().count() {
        let reply: redis::Value = ledger
            .redis()
            .query(
                redis::cmd("XINFO")
                    .arg("CONSUMERS")
                    .arg(ledger.shards().outbox(shard))
                    .arg(group),
            )
            .await
            .expect("xinfo consumers");
        let redis::Value::Array(list) = reply else {
            panic!("xinfo consumers reply {reply:?}");
        };
        let mut here = Vec::new();
        for c in list {
            let fields: Vec<redis::Value> = match c {
                redis::Value::Array(f) => f,
                redis::Value::Map(pairs) => pairs.into_iter().flat_map(|(k, v)| [k, v]).collect(),
                other => panic!("consumer {other:?}"),
            };
            let (mut name, mut pending) = (String::new(), -1);
            for pair in fields.chunks_exact(2) {
                match &pair[0] {
                    redis::Value::BulkString(k) if k == b"name" => {
                        if let redis::Value::BulkString(n) = &pair[1] {
                            name = String::from_utf8_lossy(n).into_owned();
                        }
                    }
                    redis::Value::BulkString(k) if k == b"pending" => {
                        if let redis::Value::Int(n) = pair[1] {
                            pending = n;
                        }
                    }
                    _ => {}
                }
            }
            here.push((name, pending));
        }
        out.push(here);
    }
    out
}

/// Whether `name` is a consumer of `group` on any shard.
async fn has_consumer(ledger: &Ledger, group: &str, name: &str) -> bool {
    consumers(ledger, group)
        .await
        .iter()
        .flatten()
        .any(|(n, _)| n == name)
}

/// Reads up to `count` new entries per shard as `consumer`, never acknowledged (a settler
/// that read a batch and went away). Returns the events it took.
async fn read_as(ledger: &Ledger, group: &str, consumer: &str, count: usize) -> Vec<LedgerEvent> {
    let mut taken = Vec::new();
    for shard in 0..ledger.shards().count() {
        let reply: redis::Value = ledger
            .redis()
            .query(
                redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(group)
                    .arg(consumer)
                    .arg("COUNT")
                    .arg(count)
                    .arg("STREAMS")
                    .arg(ledger.shards().outbox(shard))
                    .arg(">"),
            )
            .await
            .expect("read");
        if let redis::Value::Array(mut streams) = reply {
            if let Some(redis::Value::Array(mut pair)) = streams.pop() {
                let entries = pair.pop().expect("entries");
                taken.extend(LedgerEvent::from_stream_entries(shard, entries).expect("parse"));
            }
        }
    }
    taken
}

/// A consumer in `group` on every shard that never read anything.
async fn create_consumer(ledger: &Ledger, group: &str, consumer: &str) {
    for shard in 0..ledger.shards().count() {
        let _: redis::Value = ledger
            .redis()
            .query(
                redis::cmd("XGROUP")
                    .arg("CREATECONSUMER")
                    .arg(ledger.shards().outbox(shard))
                    .arg(group)
                    .arg(consumer),
            )
            .await
            .expect("xgroup createconsumer");
    }
}

/// Every `<host>-<pid>` process used to leave its consumer in every shard's group for
/// good (~150 bytes of Redis each, and a longer XINFO CONSUMERS with every pod).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlers_that_stop_cleanly_leave_no_consumer_behind() {
    const GROUP: &str = "tollgate-settler";
    let redis = common::RedisServer::start();
    let (clock, now) = Clock::manual(START_MS);
    let ledger = common::ledger(&redis, clock);
    common::add_observer_group(&ledger).await;
    let store = store(&common::temp_sqlite_url()).await;
    common::workload::every_kind(&ledger, &now, 1, "early").await;

    // Three settlers, one after another and side by side, with charges flowing, and one
    // that stays.
    let (live_stop, live_stopped) = tokio::sync::watch::channel(false);
    let live = run_until(settler(&ledger, &store, GROUP, "live"), &live_stopped);
    for (i, name) in ["one", "two", "three"].into_iter().enumerate() {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let run = run_until(settler(&ledger, &store, GROUP, name), &stopped);
        common::workload::every_kind(&ledger, &now, 1, &format!("during-{i}")).await;
        let deadline = Instant::now() + DEADLINE;
        while !has_consumer(&ledger, GROUP, name).await {
            assert!(Instant::now() < deadline, "{name} never read");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = stop.send(true);
        run.await.expect("settler task");
        let left = consumers(&ledger, GROUP).await;
        assert!(
            left.iter().flatten().all(|(n, _)| n == "live"),
            "{name} stopped; consumers left: {left:?}"
        );
    }
    let outbox = common::outbox_events(&ledger).await;
    let deadline = Instant::now() + DEADLINE;
    while (store.count_events().await.expect("count") as usize) < outbox.len() {
        assert!(Instant::now() < deadline, "not settled in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = live_stop.send(true);
    live.await.expect("live settler task");
    let left = consumers(&ledger, GROUP).await;
    assert!(
        left.iter().all(|c| c.is_empty()),
        "every settler stopped; consumers left: {left:?}"
    );
    assert_eq!(common::pending(&ledger, GROUP, None).await, Some(0));
    assert_store_matches_outbox(&store, &outbox).await;

    // A settler stopped with a batch read and not yet written settles it, then goes.
    common::workload::every_kind(&ledger, &now, 1, "late").await;
    let outbox = common::outbox_events(&ledger).await;
    let taken = read_as(&ledger, GROUP, "four", 1000).await;
    assert!(!taken.is_empty(), "four read nothing");
    settler(&ledger, &store, GROUP, "four").leave(true).await;
    assert!(!has_consumer(&ledger, GROUP, "four").await, "four stayed");
    assert_eq!(common::pending(&ledger, GROUP, None).await, Some(0));
    assert_store_matches_outbox(&store, &outbox).await;
}

/// XGROUP DELCONSUMER throws away a consumer's pending entries, which would then be
/// trimmed unsettled: neither a settler leaving nor the prune removes a consumer that has
/// any; once another settler claimed and settled them, the prune removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_with_pending_entries_is_never_removed() {
    const GROUP: &str = "tollgate-settler";
    let redis = common::RedisServer::start();
    let (clock, now) = Clock::manual(START_MS);
    let ledger = common::ledger(&redis, clock);
    let store = store(&common::temp_sqlite_url()).await;
    common::workload::every_kind(&ledger, &now, 2, "w").await;
    let outbox = common::outbox_events(&ledger).await;
    let holder = settler(&ledger, &store, GROUP, "holder");
    holder.ensure_groups().await.expect("groups");
    let taken = read_as(&ledger, GROUP, "holder", 2).await;
    assert!(!taken.is_empty(), "holder read nothing");
    // A consumer that never read: the prune's proof of a pass over every shard.
    create_consumer(&ledger, GROUP, "empty").await;

    // Its own leaving (without settling: a store that was failing) keeps it.
    let mut holder = holder;
    holder.leave(false).await;
    assert_eq!(
        common::pending(&ledger, GROUP, Some("holder")).await,
        Some(taken.len() as i64)
    );
    assert!(has_consumer(&ledger, GROUP, "holder").await);

    // A settler pruning consumers idle for 1 ms, that claims nothing in this test.
    let pruning = |name: &str, claim_idle: Duration| {
        Settler::new(
            ledger.clone(),
            store.clone(),
            SettlerSettings {
                group: GROUP.into(),
                consumer: name.into(),
                consumer_idle_max: Duration::from_millis(1),
                trim_interval: Duration::from_millis(50),
                claim_idle,
                ..fast()
            },
        )
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let run = run_until(pruning("pruner", Duration::from_secs(3600)), &stopped);
    let deadline = Instant::now() + DEADLINE;
    while has_consumer(&ledger, GROUP, "empty").await {
        assert!(
            Instant::now() < deadline,
            "the empty consumer was never pruned"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A few more passes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop.send(true);
    run.await.expect("pruner task");
    assert_eq!(
        common::pending(&ledger, GROUP, Some("holder")).await,
        Some(taken.len() as i64),
        "the holder's pending entries were thrown away"
    );
    assert!(
        has_consumer(&ledger, GROUP, "holder").await,
        "holder removed"
    );

    // Another settler claims its batch and settles it; then the holder is empty and idle,
    // and is pruned.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let run = run_until(pruning("claimer", Duration::from_millis(300)), &stopped);
    let deadline = Instant::now() + DEADLINE;
    while (store.count_events().await.expect("count") as usize) < outbox.len()
        || has_consumer(&ledger, GROUP, "holder").await
    {
        assert!(
            Instant::now() < deadline,
            "not settled, or the holder not pruned once empty: {:?}",
            consumers(&ledger, GROUP).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop.send(true);
    run.await.expect("claimer task");
    assert_store_matches_outbox(&store, &outbox).await;
    assert_eq!(common::pending(&ledger, GROUP, None).await, Some(0));
}

/// A settler that crashed (or was killed) leaves its consumer; once it has not read for
/// `consumer_idle_max` and has nothing pending, a running settler removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_empty_consumer_is_pruned() {
    const GROUP: &str = "tollgate-settler";
    let redis = common::RedisServer::start();
    let (clock, now) = Clock::manual(START_MS);
    let ledger = common::ledger(&redis, clock);
    let store = store(&common::temp_sqlite_url()).await;
    common::workload::every_kind(&ledger, &now, 1, "w").await;
    let first = settler(&ledger, &store, GROUP, "live");
    first.ensure_groups().await.expect("groups");
    create_consumer(&ledger, GROUP, "crashed-1").await;
    create_consumer(&ledger, GROUP, "crashed-2").await;
    let live = Settler::new(
        ledger.clone(),
        store.clone(),
        SettlerSettings {
            group: GROUP.into(),
            consumer: "live".into(),
            consumer_idle_max: Duration::from_millis(200),
            ..fast()
        },
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let run = run_until(live, &stopped);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let left = consumers(&ledger, GROUP).await;
        let names: BTreeSet<&str> = left.iter().flatten().map(|(n, _)| n.as_str()).collect();
        if !names.contains("crashed-1") && !names.contains("crashed-2") {
            // The running settler's own consumer is not pruned while it reads.
            assert!(names.contains("live"), "{left:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "idle consumers not pruned: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop.send(true);
    run.await.expect("settler task");
}
