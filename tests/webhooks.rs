//! Usage webhooks end to end, against real redis-server and real PostgreSQL and SQLite:
//! a receiver started here gets `balance.low` once when the balance crosses the
//! threshold and `balance.exhausted` once, each with a valid signature; while the receiver
//! fails, deliveries are retried (and later ones of the account wait), and after it
//! recovers each delivery id arrives exactly once, in order. Also: thresholds per account
//! through the Admin API (percent of the last grant), `lot.expiring` / `lot.expired`,
//! and the deliveries listed through the Admin API.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::receiver::{expected_signature, Receiver};
use tollgate::api::pb;
use tollgate::config::Config;
use tollgate::ledger::Clock;

/// Generous: the waits only bound polling, nothing is timed.
const DEADLINE: Duration = Duration::from_secs(120);
const SECRET: &str = "whsec-test-4471";

fn config(redis: &common::RedisServer, store_url: &str, receiver: &Receiver) -> Config {
    let mut c = common::test_config(&redis.url());
    c.store.url = store_url.to_owned();
    c.settler.enabled = true;
    c.settler.idle_wait_ms = 10;
    c.settler.trim_interval_ms = 100;
    c.settler.backoff_max_ms = 500;
    c.ledger.sweep_interval_ms = 100;
    c.webhooks.url = receiver.url();
    c.webhooks.secret = SECRET.into();
    c.webhooks.low_balance = 20;
    c.webhooks.poll_interval_ms = 50;
    c.webhooks.backoff_min_ms = 50;
    c.webhooks.backoff_max_ms = 400;
    c
}

fn debit(account: &str, amount: i64, key: &str) -> pb::DebitRequest {
    pb::DebitRequest {
        account_id: account.into(),
        amount,
        idempotency_key: key.into(),
        ..Default::default()
    }
}

/// A debit of the default wallet straight on the ledger.
fn ledger_debit(account: &str, amount: i64, key: &str) -> tollgate::ledger::Debit {
    tollgate::ledger::Debit {
        account_id: account.into(),
        wallet: "default".into(),
        amount,
        idempotency_key: key.into(),
        operation: "op".into(),
        metadata: Default::default(),
        member_id: String::new(),
        price_inputs: None,
        attempt_mark: None,
    }
}

fn grant(account: &str, amount: i64, key: &str) -> pb::GrantRequest {
    pb::GrantRequest {
        account_id: account.into(),
        amount,
        idempotency_key: key.into(),
        ..Default::default()
    }
}

/// Every delivery of the account through the Admin API, oldest first. None while the
/// store is not migrated yet (the settler migrates it when it starts).
async fn deliveries(
    server: &common::TestServer,
    account: &str,
) -> Option<Vec<pb::WebhookDelivery>> {
    let mut admin = server.admin().await;
    let mut all = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        pages += 1;
        // Far more than any test here makes (a few deliveries per account, 2 a page).
        assert!(pages <= 100, "delivery page tokens never end");
        let page = match admin
            .list_webhook_deliveries(pb::ListWebhookDeliveriesRequest {
                account_id: account.into(),
                page_size: 2,
                page_token: token,
                ..Default::default()
            })
            .await
        {
            Ok(page) => page.into_inner(),
            Err(s) if s.code() == tonic::Code::Unavailable => return None,
            Err(s) => panic!("list deliveries: {s:?}"),
        };
        all.extend(page.deliveries);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    all.reverse();
    Some(all)
}

/// Waits until the account has `count` deliveries and none is pending.
async fn settled_deliveries(
    server: &common::TestServer,
    account: &str,
    count: usize,
) -> Vec<pb::WebhookDelivery> {
    common::eventually(DEADLINE, "deliveries to be delivered", || async {
        let list = deliveries(server, account).await?;
        (list.len() == count && list.iter().all(|d| d.status == "delivered")).then_some(list)
    })
    .await
}

fn types_of(received: &[common::receiver::Received], account: &str) -> Vec<String> {
    received
        .iter()
        .filter(|r| r.json()["account_id"] == account)
        .map(|r| r.event_type.clone())
        .collect()
}

fn assert_signed(received: &[common::receiver::Received]) {
    for r in received {
        assert_eq!(
            r.signature,
            expected_signature(SECRET, &r.timestamp, &r.body),
            "bad signature on {}",
            r.delivery_id
        );
        let json = r.json();
        assert_eq!(json["id"], r.delivery_id.as_str());
        assert_eq!(json["type"], r.event_type.as_str());
    }
}

async fn low_and_exhausted_once(store_url: &str) {
    let redis = common::RedisServer::start();
    let receiver = Receiver::start().await;
    let server =
        common::TestServer::start(config(&redis, store_url, &receiver), Clock::Redis).await;
    let mut admin = server.admin().await;
    let mut metering = server.metering().await;
    admin.grant(grant("alice", 100, "g1")).await.expect("grant");
    for (i, amount) in [50, 35, 10, 5].into_iter().enumerate() {
        metering
            .debit(debit("alice", amount, &format!("d{i}")))
            .await
            .expect("debit");
    }
    // At zero: refused, and no further webhook for it.
    metering
        .debit(debit("alice", 1, "d-refused"))
        .await
        .expect_err("exhausted");

    let listed = settled_deliveries(&server, "alice", 3).await;
    let types: Vec<&str> = listed.iter().map(|d| d.event_type.as_str()).collect();
    assert_eq!(types, ["grant.created", "balance.low", "balance.exhausted"]);
    assert!(listed
        .iter()
        .all(|d| d.attempts == 1 && d.last_status_code == 200));

    let received = receiver.received();
    assert_eq!(
        types_of(&received, "alice"),
        ["grant.created", "balance.low", "balance.exhausted"],
        "each once, in order"
    );
    assert!(received.iter().all(|r| r.accepted));
    assert_signed(&received);
    let low = received[1].json();
    assert_eq!(low["data"]["available"], 15);
    assert_eq!(low["data"]["threshold"], 20);
    assert_eq!(low["wallet"], "default");
    assert_eq!(received[2].json()["data"]["available"], 0);

    // Percent of the last grant, set for one account through the Admin API.
    let t = admin
        .set_balance_threshold(pb::SetBalanceThresholdRequest {
            account_id: "bob".into(),
            wallet: String::new(),
            low_balance: Some(0),
            low_balance_percent: Some(50),
        })
        .await
        .expect("threshold")
        .into_inner();
    assert!(t.account_specific);
    assert_eq!((t.low_balance, t.low_balance_percent), (0, 50));
    let bad = admin
        .set_balance_threshold(pb::SetBalanceThresholdRequest {
            account_id: "bob".into(),
            wallet: String::new(),
            low_balance: Some(-1),
            low_balance_percent: Some(101),
        })
        .await
        .expect_err("bad threshold");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("low_balance_percent"), "{bad:?}");
    admin.grant(grant("bob", 200, "g2")).await.expect("grant");
    metering.debit(debit("bob", 90, "b1")).await.expect("debit");
    metering.debit(debit("bob", 30, "b2")).await.expect("debit");
    let bob = settled_deliveries(&server, "bob", 2).await;
    assert_eq!(bob[1].event_type, "balance.low");
    let payload: serde_json::Value = serde_json::from_str(&bob[1].payload).expect("payload");
    assert_eq!(payload["data"]["available"], 80);
    assert_eq!(payload["data"]["threshold"], 100);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_and_exhausted_once_with_valid_signatures_postgres() {
    let pg = common::PgDatabase::create().await;
    low_and_exhausted_once(&pg.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_and_exhausted_once_with_valid_signatures_sqlite() {
    low_and_exhausted_once(&common::temp_sqlite_url()).await;
}

async fn retried_until_the_receiver_recovers(store_url: &str) {
    let redis = common::RedisServer::start();
    let receiver = Receiver::start().await;
    receiver.set_failing(true);
    let server =
        common::TestServer::start(config(&redis, store_url, &receiver), Clock::Redis).await;
    let mut admin = server.admin().await;
    let mut metering = server.metering().await;
    admin.grant(grant("carol", 100, "g1")).await.expect("grant");
    metering
        .debit(debit("carol", 85, "d1"))
        .await
        .expect("debit");
    metering
        .debit(debit("carol", 15, "d2"))
        .await
        .expect("debit");

    // The first delivery fails again and again; the later ones wait behind it.
    let first = common::eventually(DEADLINE, "several failed attempts", || async {
        let list = deliveries(&server, "carol").await?;
        let head = list.first()?;
        (list.len() == 3 && head.attempts >= 3).then(|| head.clone())
    })
    .await;
    assert_eq!(first.event_type, "grant.created");
    assert_eq!(first.status, "pending");
    assert_eq!(first.last_status_code, 503);
    let seen = receiver.received();
    assert!(
        seen.iter().all(|r| r.delivery_id == first.delivery_id),
        "later deliveries of the account must wait: {:?}",
        seen.iter().map(|r| &r.event_type).collect::<Vec<_>>()
    );

    receiver.set_failing(false);
    let listed = settled_deliveries(&server, "carol", 3).await;
    let received = receiver.received();
    assert_signed(&received);
    // Exactly one accepted receipt per delivery id, in the account's order.
    let mut accepted: BTreeMap<&str, usize> = BTreeMap::new();
    let mut failed: BTreeMap<&str, i64> = BTreeMap::new();
    for r in &received {
        if r.accepted {
            *accepted.entry(&r.delivery_id).or_default() += 1;
        } else {
            *failed.entry(&r.delivery_id).or_default() += 1;
        }
    }
    assert_eq!(accepted.len(), 3);
    assert!(accepted.values().all(|n| *n == 1), "{accepted:?}");
    let order: Vec<String> = received
        .iter()
        .filter(|r| r.accepted)
        .map(|r| r.event_type.clone())
        .collect();
    assert_eq!(order, ["grant.created", "balance.low", "balance.exhausted"]);
    // The store counted every attempt.
    for d in &listed {
        let failures = failed.get(d.delivery_id.as_str()).copied().unwrap_or(0);
        assert_eq!(d.attempts, failures + 1, "{d:?}");
        assert_eq!(d.last_error, "");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_until_the_receiver_recovers_postgres() {
    let pg = common::PgDatabase::create().await;
    retried_until_the_receiver_recovers(&pg.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_until_the_receiver_recovers_sqlite() {
    retried_until_the_receiver_recovers(&common::temp_sqlite_url()).await;
}

/// Receipts of one delivery id so far.
fn receipts_of(receiver: &Receiver, delivery_id: &str) -> usize {
    receiver
        .received()
        .iter()
        .filter(|r| r.delivery_id == delivery_id)
        .count()
}

/// Waits until the account has one delivery and it is `status`.
async fn only_delivery(
    server: &common::TestServer,
    account: &str,
    status: &str,
) -> pb::WebhookDelivery {
    common::eventually(
        DEADLINE,
        &format!("the delivery to be {status}"),
        || async {
            let list = deliveries(server, account).await?;
            let [d] = list.as_slice() else { return None };
            (d.status == status).then(|| d.clone())
        },
    )
    .await
}

/// Admin RetryWebhookDelivery gives a given-up delivery a new round: up to `attempts_max`
/// more attempts with backoff (not one), while `attempts` keeps counting them all.
async fn a_manual_retry_gets_a_new_round_of_attempts(store_url: &str) {
    const ATTEMPTS_MAX: i64 = 3;
    let redis = common::RedisServer::start();
    let receiver = Receiver::start().await;
    receiver.set_failing(true);
    let mut c = config(&redis, store_url, &receiver);
    c.webhooks.attempts_max = ATTEMPTS_MAX as u32;
    let server = common::TestServer::start(c, Clock::Redis).await;
    let mut admin = server.admin().await;
    admin.grant(grant("erin", 100, "g1")).await.expect("grant");

    let given_up = only_delivery(&server, "erin", "failed").await;
    assert_eq!(given_up.event_type, "grant.created");
    assert_eq!(given_up.attempts, ATTEMPTS_MAX);
    assert_eq!(given_up.last_status_code, 503);
    let id = given_up.delivery_id.clone();
    assert_eq!(receipts_of(&receiver, &id), ATTEMPTS_MAX as usize);

    let retried = admin
        .retry_webhook_delivery(pb::RetryWebhookDeliveryRequest {
            delivery_id: id.clone(),
        })
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(retried.status, "pending");
    assert_eq!(retried.attempts, ATTEMPTS_MAX, "the total is kept");
    assert_eq!(retried.delivered_at_ms, 0);

    // The receiver still fails: a whole new round, then given up again.
    let again = only_delivery(&server, "erin", "failed").await;
    assert_eq!(
        receipts_of(&receiver, &id),
        2 * ATTEMPTS_MAX as usize,
        "a manual retry gets attempts_max more attempts"
    );
    assert_eq!(again.attempts, 2 * ATTEMPTS_MAX, "{again:?}");
    assert_eq!(again.delivered_at_ms, 0, "{again:?}");

    // Once the receiver is back, a further retry delivers it.
    receiver.set_failing(false);
    admin
        .retry_webhook_delivery(pb::RetryWebhookDeliveryRequest {
            delivery_id: id.clone(),
        })
        .await
        .expect("retry");
    let delivered = only_delivery(&server, "erin", "delivered").await;
    assert_eq!(delivered.attempts, 2 * ATTEMPTS_MAX + 1);
    assert!(delivered.delivered_at_ms > 0, "{delivered:?}");
    assert_eq!(receiver.accepted().len(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_retry_gets_a_new_round_of_attempts_postgres() {
    let pg = common::PgDatabase::create().await;
    a_manual_retry_gets_a_new_round_of_attempts(&pg.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_retry_gets_a_new_round_of_attempts_sqlite() {
    a_manual_retry_gets_a_new_round_of_attempts(&common::temp_sqlite_url()).await;
}

/// The fields an INVALID_ARGUMENT names in its BadRequest (any other answer fails).
#[track_caller]
fn bad_fields(answer: Result<impl std::fmt::Debug, tonic::Status>) -> Vec<String> {
    use tonic_types::StatusExt;
    let status = answer.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let details = status
        .get_details_bad_request()
        .unwrap_or_else(|| panic!("no BadRequest in {status:?}"));
    details
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect()
}

/// A forged page token or delivery id holding a NUL byte is a bad argument naming its
/// field: it used to reach PostgreSQL, which refuses NUL in text, and be answered
/// UNAVAILABLE (and logged as a store outage). Only the ids' shapes are taken now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_page_tokens_and_delivery_ids_are_bad_arguments_postgres() {
    let redis = common::RedisServer::start();
    let pg = common::PgDatabase::create().await;
    let mut c = common::test_config(&redis.url());
    c.store.url = pg.url.clone();
    let server = common::TestServer::start(c, Clock::Redis).await;
    let mut admin = server.admin().await;
    let mut metering = server.metering().await;

    let forged_event = hex::encode("1700000000000/3-17-0\0");
    let answer = metering
        .list_transactions(pb::ListTransactionsRequest {
            account_id: "acct-n".into(),
            page_token: forged_event,
            ..Default::default()
        })
        .await;
    assert_eq!(bad_fields(answer), ["page_token"]);

    let forged_delivery = hex::encode("1/2/3/dlv_\0");
    let answer = admin
        .list_webhook_deliveries(pb::ListWebhookDeliveriesRequest {
            page_token: forged_delivery,
            ..Default::default()
        })
        .await;
    assert_eq!(bad_fields(answer), ["page_token"]);

    for id in ["dlv_\0", "dlv_0123456789abcdef0123456\0", "x"] {
        let answer = admin
            .retry_webhook_delivery(pb::RetryWebhookDeliveryRequest {
                delivery_id: id.into(),
            })
            .await;
        assert_eq!(bad_fields(answer), ["delivery_id"], "{id:?}");
    }
    // A well-formed id the store does not hold is still NOT_FOUND: the store answers.
    let answer = admin
        .retry_webhook_delivery(pb::RetryWebhookDeliveryRequest {
            delivery_id: "dlv_0123456789abcdef01234567".into(),
        })
        .await;
    let status = answer.expect_err("no such delivery");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    server.stop().await;
}

/// A server with lot webhooks (a 1 h lead) on `store_url`, its ledger on a clock of the
/// test's set to this machine's time: (redis, receiver, server, the ledger's clock, its
/// time at the start).
async fn lot_webhook_server(
    store_url: &str,
) -> (
    common::RedisServer,
    Receiver,
    common::TestServer,
    std::sync::Arc<std::sync::atomic::AtomicI64>,
    i64,
) {
    let redis = common::RedisServer::start();
    let receiver = Receiver::start().await;
    let mut c = config(&redis, store_url, &receiver);
    c.webhooks.lot_expiring_lead_secs = 3600;
    c.webhooks.events = vec!["lot.expiring".into(), "lot.expired".into()];
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    let (clock, ledger_now) = Clock::manual(now_ms);
    let server = common::TestServer::start(c, clock).await;
    (redis, receiver, server, ledger_now, now_ms)
}

/// `lot.expiring` for a lot within the lead of its expiry, then `lot.expired` once it
/// expired; none for a lot that never expires. The ledger runs on a clock of the test's
/// (set to this machine's time), the dispatcher on this machine's: the lot expires for
/// the ledger only when the test moves its clock past the expiry, after `lot.expiring`
/// was delivered, which the dispatcher sends while the expiry is ahead of its own clock
/// (half an hour: however slowly the grant is settled).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lot_expiring_then_expired() {
    let store_url = common::temp_sqlite_url();
    let (_redis, receiver, server, ledger_now, now_ms) = lot_webhook_server(&store_url).await;
    let mut admin = server.admin().await;
    // Expires in 30 min: within the 1 h lead at once.
    let expires_at_ms = now_ms + 1_800_000;
    let lot = admin
        .grant(pb::GrantRequest {
            expires_at_ms,
            ..grant("dave", 40, "g1")
        })
        .await
        .expect("grant")
        .into_inner()
        .lot_id;
    admin
        .grant(grant("dave", 10, "g-never"))
        .await
        .expect("a lot that never expires: no lot.expiring");
    let listed = settled_deliveries(&server, "dave", 1).await;
    assert_eq!(listed[0].event_type, "lot.expiring", "{listed:?}");
    // The ledger's clock past the expiry: the sweeper expires the lot.
    ledger_now.store(expires_at_ms + 1_000, std::sync::atomic::Ordering::SeqCst);
    let listed = settled_deliveries(&server, "dave", 2).await;
    let types: Vec<&str> = listed.iter().map(|d| d.event_type.as_str()).collect();
    assert_eq!(types, ["lot.expiring", "lot.expired"]);
    let received = receiver.accepted();
    assert_signed(&received);
    let expiring = received[0].json();
    assert_eq!(expiring["type"], "lot.expiring");
    assert_eq!(expiring["data"]["lot_id"], lot.as_str());
    assert_eq!(expiring["data"]["remaining"], 40);
    assert_eq!(expiring["data"]["expires_at_ms"], expires_at_ms);
    let expired = received[1].json();
    assert_eq!(expired["type"], "lot.expired");
    assert_eq!(expired["data"]["lot_id"], lot.as_str());
    assert_eq!(expired["data"]["amount"], 40);
    assert_eq!(received.len(), 2, "each once");
    server.stop().await;
}

async fn lot_rows(db: &mut sqlx::SqliteConnection, lot: &str) -> i64 {
    sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM tollgate_lots WHERE lot_id = ?")
        .bind(lot)
        .fetch_one(db)
        .await
        .expect("count")
}

/// A lot whose tracking row is gone (pruned, or granted before lot webhooks were on) and
/// then expires: its `expire_lot` names it without an expiry, which makes a row of
/// unknown expiry and negative credits. The dispatcher's housekeeping forgets it instead
/// of keeping it for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lot_expired_without_its_tracking_row_leaves_no_row_behind() {
    use sqlx::Connection;

    let store_url = common::temp_sqlite_url();
    let (_redis, _receiver, server, ledger_now, now_ms) = lot_webhook_server(&store_url).await;
    let mut admin = server.admin().await;
    let expires_at_ms = now_ms + 1_800_000;
    let lot = admin
        .grant(pb::GrantRequest {
            expires_at_ms,
            ..grant("erin", 40, "g1")
        })
        .await
        .expect("grant")
        .into_inner()
        .lot_id;
    settled_deliveries(&server, "erin", 1).await;
    let mut db = sqlx::SqliteConnection::connect(&store_url)
        .await
        .expect("store");
    assert_eq!(lot_rows(&mut db, &lot).await, 1, "the lot is tracked");
    sqlx::query("DELETE FROM tollgate_lots")
        .execute(&mut db)
        .await
        .expect("forget the lot");
    ledger_now.store(expires_at_ms + 1_000, std::sync::atomic::Ordering::SeqCst);
    settled_deliveries(&server, "erin", 2).await;
    common::eventually(DEADLINE, "the untracked lot's row to be pruned", || async {
        let mut db = sqlx::SqliteConnection::connect(&store_url)
            .await
            .expect("store");
        (lot_rows(&mut db, &lot).await == 0).then_some(())
    })
    .await;
    server.stop().await;
}

/// Two settlers (PostgreSQL) committing batches of the same brand-new wallet at once: the
/// second waits for the first's row instead of judging the wallet from an empty state, so
/// `balance.low` is not made twice. The first batch is held open by hand here (its row
/// inserted, `low_alerted` set, not committed) while the second is settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_settlers_judge_a_new_wallet_in_turn() {
    use sqlx::Connection;

    let redis = common::RedisServer::start();
    let ledger = common::ledger(&redis, Clock::Redis);
    let pg = common::PgDatabase::create().await;
    let store =
        std::sync::Arc::new(tollgate::settle::Store::connect_lazy(&pg.url, 4).expect("store"));
    store.migrate().await.expect("migrate");
    let ledger_api = |amount: i64, key: &str| ledger_debit("acme", amount, key);
    ledger
        .grant(&common::purchase("acme", 100, "g"))
        .await
        .expect("grant");
    ledger.debit(&ledger_api(90, "d1")).await.expect("debit");
    ledger.debit(&ledger_api(2, "d2")).await.expect("debit");
    let events = common::outbox_events(&ledger).await;
    assert_eq!(events.len(), 3);
    let (first, second) = (&events[1], events[2].clone());
    let rules = low_below_20();

    // Settler A's batch (the grant and the debit to 10, which alerted): in its
    // transaction, not committed yet.
    let mut a = sqlx::PgConnection::connect(&pg.url).await.expect("connect");
    let (ms, seq) = first.stream_position();
    sqlx::query("BEGIN").execute(&mut a).await.expect("begin");
    sqlx::query(
        "INSERT INTO tollgate_wallets (account_id, wallet, granted, used, expired, refunded, \
         adjusted, available, held, last_stream_ms, last_stream_seq, events, last_grant, \
         low_alerted, exhausted_alerted) \
         VALUES ('acme', 'default', 100, 90, 0, 0, 0, 10, 0, $1, $2, 2, 100, 1, 0)",
    )
    .bind(ms)
    .bind(seq)
    .execute(&mut a)
    .await
    .expect("A's row");

    // Settler B's batch (the debit to 8) meanwhile: it waits for A, until PostgreSQL
    // shows it waiting for a lock (A's row), and does not end before A commits.
    let b = tokio::spawn({
        let store = store.clone();
        async move { store.append_batch(&[second], None, Some(&rules)).await }
    });
    let mut watcher = sqlx::PgConnection::connect(&pg.url).await.expect("connect");
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&mut watcher)
        .await
        .expect("pg_stat_activity");
        if waiting >= 1 {
            break;
        }
        if b.is_finished() {
            panic!(
                "B settled without waiting for A's uncommitted row: {:?}",
                b.await
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "B never waited for A's row lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!b.is_finished(), "B ended while A's row was locked");
    sqlx::query("COMMIT").execute(&mut a).await.expect("commit");
    tokio::time::timeout(DEADLINE, b)
        .await
        .expect("B settles once A committed")
        .expect("task")
        .expect("append");
    assert_eq!(
        store.pending_deliveries().await.expect("deliveries"),
        0,
        "A already alerted: B must not alert again"
    );
}

/// Every webhook subscribed; `balance.low` below 20 credits.
fn low_below_20() -> tollgate::webhooks::rules::Rules {
    tollgate::webhooks::rules::Rules::every_type_below(20)
}

/// A store (at `store_url`) holding one pending `balance.low` delivery, settled from a
/// real ledger; its Redis (kept alive by the caller), the delivery and the time it was due.
async fn one_low_balance_delivery(
    store_url: &str,
) -> (
    common::RedisServer,
    tollgate::settle::Store,
    tollgate::settle::webhook_store::Delivery,
    i64,
) {
    let redis = common::RedisServer::start();
    let ledger = common::ledger(&redis, Clock::Redis);
    let store = tollgate::settle::Store::connect_lazy(store_url, 2).expect("store");
    store.migrate().await.expect("migrate");
    ledger
        .grant(&common::purchase("acme", 100, "g"))
        .await
        .expect("grant");
    ledger
        .debit(&ledger_debit("acme", 90, "d1"))
        .await
        .expect("debit");
    let events = common::outbox_events(&ledger).await;
    store
        .append_batch(&events, None, Some(&low_below_20()))
        .await
        .expect("settle");
    let now = tollgate::ledger::wall_clock_ms();
    let due = store.due_deliveries(now, 10).await.expect("due");
    let [delivery] = due.as_slice() else {
        panic!("one balance.low delivery: {due:?}");
    };
    (redis, store, delivery.clone(), now)
}

/// A dispatcher told to stop waits for its attempt in flight (the receiver answers
/// within the wait) and records it delivered: it used to abandon it at once, so every
/// rolling deploy sent the deliveries in flight again after their leases expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_dispatcher_records_the_attempt_in_flight() {
    use tollgate::webhooks::dispatcher::Dispatcher;

    let url = common::temp_sqlite_url();
    let (_redis, store, delivery, _) = one_low_balance_delivery(&url).await;
    let receiver = Receiver::start().await;
    receiver.hold_account("acme");
    let settings = tollgate::webhooks::DispatchSettings {
        url: receiver.url(),
        secret: "s".into(),
        secret_previous: String::new(),
        timeout: Duration::from_secs(5),
        attempts_max: 3,
        backoff_min: Duration::from_secs(60),
        backoff_max: Duration::from_secs(60),
        poll_interval: Duration::from_millis(20),
        concurrency: 4,
        delivery_retention: None,
    };
    let store = Arc::new(store);
    let dispatcher =
        Dispatcher::new(store.clone(), settings, Arc::new(low_below_20())).expect("dispatcher");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(dispatcher.run(async {
        let _ = stopped.await;
    }));
    common::eventually(DEADLINE, "the POST to be held", || async {
        (receiver.held_now() == 1).then_some(())
    })
    .await;
    let _ = stop.send(());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!running.is_finished(), "it waits for the attempt in flight");
    receiver.release();
    tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .expect("the dispatcher stops once its attempt is recorded")
        .expect("no panic");
    let recorded = store
        .delivery(&delivery.delivery_id)
        .await
        .expect("store")
        .expect("the delivery");
    assert_eq!(recorded.status, "delivered", "{recorded:?}");
    assert_eq!(recorded.attempts, 1);
}

/// A dispatcher whose attempt outlived its lease (a stalled process) finishes after
/// another dispatcher leased the delivery again and delivered it: the late answer is not
/// recorded, so it cannot put the delivered webhook back to pending.
async fn a_late_attempt_does_not_overwrite_a_newer_one(store_url: &str) {
    use tollgate::settle::webhook_store::AttemptOutcome;

    let (_redis, store, delivery, now) = one_low_balance_delivery(store_url).await;
    let id = &delivery.delivery_id;

    // Dispatcher A leases it for a second and stalls; B leases it once that has passed.
    let (lease_a, lease_b) = (now + 1_000, now + 3_000);
    assert!(store
        .lease_delivery(id, 0, now, lease_a)
        .await
        .expect("lease"));
    assert!(!store
        .lease_delivery(id, 0, now + 500, lease_b)
        .await
        .expect("lease"));
    assert!(store
        .lease_delivery(id, 0, now + 1_500, lease_b)
        .await
        .expect("lease"));
    let delivered = AttemptOutcome::Delivered { status_code: 204 };
    assert!(store
        .finish_attempt(id, lease_b, now + 1_600, &delivered)
        .await
        .expect("finish"));
    let late = AttemptOutcome::Failed {
        status_code: 0,
        error: "timed out".into(),
        next_attempt_at_ms: now + 5_000,
        give_up: false,
    };
    assert!(!store
        .finish_attempt(id, lease_a, now + 2_000, &late)
        .await
        .expect("finish"));
    let row = store
        .delivery(id)
        .await
        .expect("read")
        .expect("the delivery");
    assert_eq!(
        (row.status.as_str(), row.attempts, row.last_status_code),
        ("delivered", 1, 204)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_attempt_does_not_overwrite_a_newer_one_postgres() {
    let pg = common::PgDatabase::create().await;
    a_late_attempt_does_not_overwrite_a_newer_one(&pg.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_attempt_does_not_overwrite_a_newer_one_sqlite() {
    a_late_attempt_does_not_overwrite_a_newer_one(&common::temp_sqlite_url()).await;
}

/// Two dispatchers (every serving pod runs one) read the same due delivery in their
/// rounds; B leases it first, its POST fails fast and the failure sets the next attempt in
/// the future. A, leasing from the list it read before, must not get the delivery: its
/// POST would skip the retry backoff. Nor when the backoff has passed but an attempt was
/// made since A read it (its copy is stale: the next round reads it again).
async fn a_lease_from_an_earlier_read_respects_the_retry_backoff(store_url: &str) {
    use tollgate::settle::webhook_store::AttemptOutcome;

    let (_redis, store, delivery, now) = one_low_balance_delivery(store_url).await;
    let id = &delivery.delivery_id;
    // What A and B both read in their rounds.
    let seen = delivery.attempts;
    assert_eq!(seen, 0);

    // B leases, POSTs, fails fast: next attempt in a minute.
    let lease_b = now + 10_000;
    assert!(store
        .lease_delivery(id, seen, now, lease_b)
        .await
        .expect("lease"));
    let failed = |next_attempt_at_ms| AttemptOutcome::Failed {
        status_code: 503,
        error: "503 Service Unavailable".into(),
        next_attempt_at_ms,
        give_up: false,
    };
    assert!(store
        .finish_attempt(id, lease_b, now + 5, &failed(now + 60_000))
        .await
        .expect("finish"));
    // A, a moment later, with the copy it read before B's attempt.
    assert!(
        !store
            .lease_delivery(id, seen, now + 10, now + 10_010)
            .await
            .expect("lease"),
        "a dispatcher leased a delivery whose next attempt is a minute away"
    );
    let row = store.delivery(id).await.expect("read").expect("delivery");
    assert_eq!(
        (row.attempts, row.next_attempt_at_ms),
        (1, now + 60_000),
        "untouched by the refused lease"
    );

    // Past the backoff, a copy read before that attempt is still refused; a fresh one
    // (the next round's read) gets it.
    let due = now + 60_000;
    assert!(
        !store
            .lease_delivery(id, seen, due, due + 10_000)
            .await
            .expect("lease"),
        "a lease with a stale attempt count was granted"
    );
    assert!(store
        .lease_delivery(id, row.attempts, due, due + 10_000)
        .await
        .expect("lease"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_from_an_earlier_read_respects_the_retry_backoff_postgres() {
    let pg = common::PgDatabase::create().await;
    a_lease_from_an_earlier_read_respects_the_retry_backoff(&pg.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_from_an_earlier_read_respects_the_retry_backoff_sqlite() {
    a_lease_from_an_earlier_read_respects_the_retry_backoff(&common::temp_sqlite_url()).await;
}

/// Ended deliveries are deleted once older than the retention; a pending one stays
/// whatever its age (its account's queue waits on it).
async fn ended_deliveries_are_pruned_pending_ones_kept(store_url: &str) {
    use tollgate::settle::webhook_store::AttemptOutcome;

    let (_redis, store, delivery, now) = one_low_balance_delivery(store_url).await;
    let id = &delivery.delivery_id;
    let later = now + 60_000;
    assert_eq!(store.prune_deliveries(later, 100).await.expect("prune"), 0);
    assert!(
        store.delivery(id).await.expect("read").is_some(),
        "pending kept"
    );

    assert!(store
        .lease_delivery(id, 0, now, now + 10_000)
        .await
        .expect("lease"));
    let delivered = AttemptOutcome::Delivered { status_code: 200 };
    assert!(store
        .finish_attempt(id, now + 10_000, now + 1, &delivered)
        .await
        .expect("finish"));
    // Younger than the cutoff's event time: kept.
    assert_eq!(
        store
            .prune_deliveries(delivery.position.0, 100)
            .await
            .expect("prune"),
        0
    );
    assert!(store.delivery(id).await.expect("read").is_some());
    assert_eq!(store.prune_deliveries(later, 100).await.expect("prune"), 1);
    assert!(store.delivery(id).await.expect("read").is_none(), "deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_deliveries_are_pruned_pending_ones_kept_postgres() {
    let pg = common::PgDatabase::create().await;
    ended_deliveries_are_pruned_pending_ones_kept(&pg.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_deliveries_are_pruned_pending_ones_kept_sqlite() {
    ended_deliveries_are_pruned_pending_ones_kept(&common::temp_sqlite_url()).await;
}

/// The wallet's last grant (what `low_balance_percent` is a percent of) is the newest
/// grant, also when a batch mixes an older grant (a claimed batch of a dead settler) with
/// events newer than what the store has: the batch as a whole is newer, its grant is not.
/// With webhooks off too (no rules to pass over it), on both stores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_grant_settled_late_does_not_replace_the_last_grant() {
    let redis = common::RedisServer::start();
    let ledger = common::ledger(&redis, Clock::Redis);
    ledger
        .grant(&common::purchase("acme", 100, "g1"))
        .await
        .expect("grant");
    ledger
        .grant(&common::purchase("acme", 1_000, "g2"))
        .await
        .expect("grant");
    ledger
        .debit(&ledger_debit("acme", 100, "d1"))
        .await
        .expect("debit");
    let events = common::outbox_events(&ledger).await;
    let [g1, g2, d1] = events.as_slice() else {
        panic!("three events: {events:?}");
    };
    let rules = tollgate::webhooks::WebhookConfig {
        url: "http://127.0.0.1:9/hook".into(),
        secret: "s".into(),
        low_balance_percent: 10,
        ..Default::default()
    }
    .rules()
    .expect("rules");
    let pg = common::PgDatabase::create().await;
    let pg_off = common::PgDatabase::create().await;
    for (url, rules) in [
        (pg.url.clone(), Some(&*rules)),
        (pg_off.url.clone(), None),
        (common::temp_sqlite_url(), Some(&*rules)),
        (common::temp_sqlite_url(), None),
    ] {
        let store = tollgate::settle::Store::connect_lazy(&url, 2).expect("store");
        store.migrate().await.expect("migrate");
        store
            .append_batch(std::slice::from_ref(g2), None, rules)
            .await
            .expect("the newer grant");
        store
            .append_batch(&[g1.clone(), d1.clone()], None, rules)
            .await
            .expect("the older grant with a newer debit");
        let last_grant = query_i64(
            &url,
            "SELECT last_grant FROM tollgate_wallets WHERE account_id = 'acme' AND wallet = 'default'",
        )
        .await;
        assert_eq!(last_grant, 1_000, "{url} webhooks on: {}", rules.is_some());
    }
}

/// One number a query answers, from either kind of store.
async fn query_i64(url: &str, sql: &'static str) -> i64 {
    use sqlx::Connection;
    if url.starts_with("sqlite:") {
        let mut con = sqlx::SqliteConnection::connect(url).await.expect("sqlite");
        sqlx::query_scalar(sql)
            .fetch_one(&mut con)
            .await
            .expect("query")
    } else {
        let mut con = sqlx::PgConnection::connect(url).await.expect("postgres");
        sqlx::query_scalar(sql)
            .fetch_one(&mut con)
            .await
            .expect("query")
    }
}

/// One delivery of an account in flight at a time, across dispatchers: an older event
/// settled late takes the queue's head from the delivery another dispatcher is sending
/// (leased), and its own delivery waits for that attempt to end instead of going out
/// beside it (the lease only looked at its own row).
async fn an_older_delivery_waits_for_the_one_in_flight(store_url: &str) {
    use tollgate::settle::webhook_store::AttemptOutcome;

    let redis = common::RedisServer::start();
    let ledger = common::ledger(&redis, Clock::Redis);
    for key in ["g1", "g2"] {
        ledger
            .grant(&common::purchase("acme", 100, key))
            .await
            .expect("grant");
    }
    let events = common::outbox_events(&ledger).await;
    let [g1, g2] = events.as_slice() else {
        panic!("two events: {events:?}");
    };
    let rules = tollgate::webhooks::WebhookConfig {
        url: "http://127.0.0.1:9/hook".into(),
        secret: "s".into(),
        ..Default::default()
    }
    .rules()
    .expect("rules");
    let store = tollgate::settle::Store::connect_lazy(store_url, 2).expect("store");
    store.migrate().await.expect("migrate");
    store
        .append_batch(std::slice::from_ref(g2), None, Some(&rules))
        .await
        .expect("the newer grant");
    let now = tollgate::ledger::wall_clock_ms();
    let due = store.due_deliveries(now, 10).await.expect("due");
    let [newer] = due.as_slice() else {
        panic!("one delivery: {due:?}");
    };
    let lease = now + 60_000;
    assert!(store
        .lease_delivery(&newer.delivery_id, newer.attempts, now, lease)
        .await
        .expect("lease"));

    store
        .append_batch(std::slice::from_ref(g1), None, Some(&rules))
        .await
        .expect("the older grant, settled late");
    let now = tollgate::ledger::wall_clock_ms();
    let due = store.due_deliveries(now, 10).await.expect("due");
    let older = due
        .iter()
        .find(|d| d.delivery_id != newer.delivery_id)
        .expect("the older delivery heads the queue");
    assert!(
        !store
            .lease_delivery(&older.delivery_id, older.attempts, now, now + 60_000)
            .await
            .expect("lease"),
        "two of acme's deliveries in flight at once"
    );

    // The attempt in flight ends: the older one goes.
    assert!(store
        .finish_attempt(
            &newer.delivery_id,
            lease,
            now,
            &AttemptOutcome::Delivered { status_code: 204 }
        )
        .await
        .expect("finish"));
    let now = tollgate::ledger::wall_clock_ms();
    assert!(store
        .lease_delivery(&older.delivery_id, older.attempts, now, now + 60_000)
        .await
        .expect("lease"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_delivery_waits_for_the_one_in_flight_postgres() {
    let pg = common::PgDatabase::create().await;
    an_older_delivery_waits_for_the_one_in_flight(&pg.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_delivery_waits_for_the_one_in_flight_sqlite() {
    an_older_delivery_waits_for_the_one_in_flight(&common::temp_sqlite_url()).await;
}

/// Settles every event of the ledger's outbox (those already settled are no-ops), as a
/// settler with these webhook rules (None: webhooks off) would.
async fn settle_outbox(
    ledger: &tollgate::ledger::Ledger,
    store: &tollgate::settle::Store,
    rules: Option<&tollgate::webhooks::rules::Rules>,
) {
    store
        .append_batch(&common::outbox_events(ledger).await, None, rules)
        .await
        .expect("settle");
}

/// A lot tracked for `lot.expiring`, then used while lot tracking is off (webhooks off,
/// as a settler without `[webhooks]` in a rolling deploy, then webhooks on without
/// `lot.expiring`): its credits left stay current, so once it is delivered again the lot
/// is announced with what it has left, not with what it had when tracking stopped. A lot
/// granted while tracking is off is not tracked (nor made a row for).
async fn a_tracked_lot_stays_current_while_lot_tracking_is_off(store_url: &str) {
    use tollgate::webhooks::rules::WebhookType;

    let redis = common::RedisServer::start();
    let ledger = common::ledger(&redis, Clock::Redis);
    let store = tollgate::settle::Store::connect_lazy(store_url, 2).expect("store");
    store.migrate().await.expect("migrate");
    let tracking = low_below_20();
    let mut not_tracking = low_below_20();
    not_tracking.subscribed[WebhookType::LotExpiring as usize] = false;
    assert!(!not_tracking.tracks_lots());
    let now = tollgate::ledger::wall_clock_ms();
    let expiring = |amount: i64, key: &str| tollgate::ledger::Grant {
        expires_at_ms: now + 1_800_000,
        ..common::purchase("acme", amount, key)
    };

    let tracked = ledger.grant(&expiring(1_000, "g1")).await.expect("grant");
    settle_outbox(&ledger, &store, Some(&tracking)).await;
    ledger
        .debit(&ledger_debit("acme", 400, "d1"))
        .await
        .expect("debit");
    settle_outbox(&ledger, &store, None).await;
    ledger
        .debit(&ledger_debit("acme", 300, "d2"))
        .await
        .expect("debit");
    settle_outbox(&ledger, &store, Some(&not_tracking)).await;
    let untracked = ledger.grant(&expiring(50, "g2")).await.expect("grant");
    settle_outbox(&ledger, &store, None).await;
    // lot.expiring delivered again.
    settle_outbox(&ledger, &store, Some(&tracking)).await;

    let lots = store
        .expiring_lots(now, now + 3_600_000, 10)
        .await
        .expect("expiring lots");
    let found: Vec<(&str, i64)> = lots
        .iter()
        .map(|l| (l.lot_id.as_str(), l.remaining))
        .collect();
    assert_eq!(
        found,
        [(tracked.lot_id.as_str(), 300)],
        "the tracked lot with what it has left ({} was granted while untracked)",
        untracked.lot_id
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tracked_lot_stays_current_while_lot_tracking_is_off_postgres() {
    let pg = common::PgDatabase::create().await;
    a_tracked_lot_stays_current_while_lot_tracking_is_off(&pg.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tracked_lot_stays_current_while_lot_tracking_is_off_sqlite() {
    a_tracked_lot_stays_current_while_lot_tracking_is_off(&common::temp_sqlite_url()).await;
}

/// A wallet alerted (`balance.low` below 500), topped up while webhooks are off, then
/// falling below 500 again once they are on: alerted again (the top-up re-armed it). A
/// wallet that only spent while they were off stays alerted: not told twice.
async fn a_top_up_while_webhooks_are_off_re_arms_the_alerts(store_url: &str) {
    let redis = common::RedisServer::start();
    let ledger = common::ledger(&redis, Clock::Redis);
    let store = tollgate::settle::Store::connect_lazy(store_url, 2).expect("store");
    store.migrate().await.expect("migrate");
    let rules = tollgate::webhooks::rules::Rules::every_type_below(500);
    let low_alerts = || async {
        let page = store
            .list_deliveries(&tollgate::settle::webhook_store::DeliveryQuery {
                event_type: Some("balance.low".into()),
                page_size: 100,
                ..Default::default()
            })
            .await
            .expect("deliveries");
        page.deliveries
            .iter()
            .map(|d| {
                let payload: serde_json::Value = serde_json::from_str(&d.payload).expect("payload");
                payload["data"]["available"].as_i64().expect("available")
            })
            .collect::<Vec<i64>>()
    };

    ledger
        .grant(&common::purchase("acme", 1_000, "g1"))
        .await
        .expect("grant");
    ledger
        .debit(&ledger_debit("acme", 600, "d1"))
        .await
        .expect("debit");
    settle_outbox(&ledger, &store, Some(&rules)).await;
    assert_eq!(low_alerts().await, [400]);

    // Webhooks off: topped up to 1,400.
    ledger
        .grant(&common::purchase("acme", 1_000, "g2"))
        .await
        .expect("grant");
    settle_outbox(&ledger, &store, None).await;
    // On again: down to 400.
    ledger
        .debit(&ledger_debit("acme", 1_000, "d2"))
        .await
        .expect("debit");
    settle_outbox(&ledger, &store, Some(&rules)).await;
    assert_eq!(low_alerts().await, [400, 400], "newest first: told again");

    // Spent while off, then on: still alerted, not told a third time.
    ledger
        .debit(&ledger_debit("acme", 100, "d3"))
        .await
        .expect("debit");
    settle_outbox(&ledger, &store, None).await;
    ledger
        .debit(&ledger_debit("acme", 100, "d4"))
        .await
        .expect("debit");
    settle_outbox(&ledger, &store, Some(&rules)).await;
    assert_eq!(low_alerts().await, [400, 400]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_top_up_while_webhooks_are_off_re_arms_the_alerts_postgres() {
    let pg = common::PgDatabase::create().await;
    a_top_up_while_webhooks_are_off_re_arms_the_alerts(&pg.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_top_up_while_webhooks_are_off_re_arms_the_alerts_sqlite() {
    a_top_up_while_webhooks_are_off_re_arms_the_alerts(&common::temp_sqlite_url()).await;
}

/// While the webhook key rotates (`webhooks.secret_previous` set), every delivery carries
/// a signature by each key, `v1=<current>,v1=<previous>`: a receiver that still has the
/// previous key and one that has the new key both verify it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotating_key_signs_with_both() {
    const PREVIOUS: &str = "whsec-old-0913";
    let redis = common::RedisServer::start();
    let receiver = Receiver::start().await;
    let mut config = config(&redis, &common::temp_sqlite_url(), &receiver);
    config.webhooks.secret_previous = PREVIOUS.into();
    let server = common::TestServer::start(config, Clock::Redis).await;
    let mut admin = server.admin().await;
    admin.grant(grant("carol", 100, "g1")).await.expect("grant");
    settled_deliveries(&server, "carol", 1).await;
    let received = receiver.received();
    assert!(!received.is_empty());
    for r in &received {
        let signatures: Vec<&str> = r.signature.split(',').collect();
        assert_eq!(
            signatures,
            [
                expected_signature(SECRET, &r.timestamp, &r.body),
                expected_signature(PREVIOUS, &r.timestamp, &r.body),
            ],
            "{}",
            r.delivery_id
        );
        for key in [SECRET, PREVIOUS] {
            assert!(
                tollgate::webhooks::signature::verify(
                    key.as_bytes(),
                    &r.timestamp,
                    r.body.as_bytes(),
                    &r.signature
                ),
                "{key}"
            );
        }
    }
    server.stop().await;
}

/// Webhook state (what alerts fired, lot.expiring marks) lives in the store, with the
/// deliveries, not in Redis: a restore after Redis lost its data sends nothing again. A
/// debit after the restore that stays under the threshold is not a second `balance.low`;
/// the settle of that debit is where one would be made (in the same transaction).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_sends_no_webhook_again() {
    use std::sync::Arc;
    use tollgate::settle::restore::{restore, RestoreMode};

    let redis = common::RedisServer::start();
    let receiver = Receiver::start().await;
    let store_url = common::temp_sqlite_url();
    let server =
        common::TestServer::start(config(&redis, &store_url, &receiver), Clock::Redis).await;
    let mut admin = server.admin().await;
    let mut metering = server.metering().await;
    admin.grant(grant("alice", 100, "g1")).await.expect("grant");
    metering
        .debit(debit("alice", 85, "d1"))
        .await
        .expect("debit");
    let before = settled_deliveries(&server, "alice", 2).await;
    assert_eq!(
        types_of(&receiver.received(), "alice"),
        ["grant.created", "balance.low"]
    );

    let mut con = redis.client().get_connection().expect("redis");
    let _: () = redis::cmd("FLUSHALL").query(&mut con).expect("flushall");
    let store = Arc::new(tollgate::settle::Store::connect_lazy(&store_url, 2).expect("store"));
    restore(
        server.ledger.clone(),
        store.clone(),
        RestoreMode::Lost,
        |_, _| {},
    )
    .await
    .expect("restore");
    let after = metering
        .debit(debit("alice", 5, "d2"))
        .await
        .expect("debit after the restore")
        .into_inner();
    common::eventually(
        DEADLINE,
        "the debit after the restore to settle",
        || async { store.event(&after.event_id).await.ok().flatten() },
    )
    .await;
    assert_eq!(deliveries(&server, "alice").await, Some(before));
    assert_eq!(
        types_of(&receiver.received(), "alice"),
        ["grant.created", "balance.low"]
    );
    server.stop().await;
}

/// A database at schema version 11 (as the builds before the queue heads left it),
/// holding these deliveries: `(id, account, position_ms, ordinal, status, attempts,
/// next_attempt_at_ms)`.
async fn deliveries_at_v11(url: &str, rows: &[(&str, &str, i64, i64, &str, i64, i64)]) {
    let mut sql = String::from(
        "CREATE TABLE tollgate_schema_migrations \
         (version BIGINT PRIMARY KEY, applied_at_ms BIGINT NOT NULL);\n",
    );
    for version in [
        include_str!("../src/settle/schema_v1.sql"),
        include_str!("../src/settle/schema_v2.sql"),
        include_str!("../src/settle/schema_v3.sql"),
        include_str!("../src/settle/schema_v4.sql"),
        include_str!("../src/settle/schema_v5.sql"),
        include_str!("../src/settle/schema_v6.sql"),
        include_str!("../src/settle/schema_v7.sql"),
        include_str!("../src/settle/schema_v8.sql"),
        include_str!("../src/settle/schema_v9.sql"),
        include_str!("../src/settle/schema_v10.sql"),
        include_str!("../src/settle/schema_v11.sql"),
    ] {
        sql.push_str(version);
        sql.push('\n');
    }
    sql.push_str("INSERT INTO tollgate_schema_migrations (version, applied_at_ms) VALUES ");
    let versions: Vec<String> = (1..=11).map(|v| format!("({v}, 1)")).collect();
    sql.push_str(&versions.join(", "));
    sql.push_str(
        ";\nINSERT INTO tollgate_webhook_deliveries (delivery_id, account_id, wallet, \
         event_type, position_ms, position_seq, ordinal, payload, status, attempts, \
         next_attempt_at_ms, lease_until_ms, last_error, last_status_code, created_at_ms, \
         delivered_at_ms) VALUES ",
    );
    let values: Vec<String> = rows
        .iter()
        .map(|(id, account, ms, ordinal, status, attempts, next)| {
            format!(
                "('{id}', '{account}', 'default', 'grant.created', {ms}, 0, {ordinal}, '{{}}', \
                 '{status}', {attempts}, {next}, 0, '', 0, 1, 0)"
            )
        })
        .collect();
    sql.push_str(&values.join(", "));
    sql.push_str(";\n");
    common::run_sql(url, sql).await;
}

/// What a dispatcher does, without the HTTP: reads the due heads at `now`, leases each
/// and records it delivered, round after round until none is due. Returns the ids in the
/// order they were delivered.
async fn deliver_due(store: &tollgate::settle::Store, now: i64) -> Vec<String> {
    use tollgate::settle::webhook_store::AttemptOutcome;
    let mut sent = Vec::new();
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let due = store.due_deliveries(now, 10).await.expect("due");
        if due.is_empty() {
            return sent;
        }
        assert!(std::time::Instant::now() < deadline, "still due: {due:?}");
        for d in due {
            let lease = now + 10_000;
            assert!(store
                .lease_delivery(&d.delivery_id, d.attempts, now, lease)
                .await
                .expect("lease"));
            let delivered = AttemptOutcome::Delivered { status_code: 204 };
            assert!(store
                .finish_attempt(&d.delivery_id, lease, now, &delivered)
                .await
                .expect("finish"));
            sent.push(d.delivery_id);
        }
    }
}

fn ids(deliveries: &[tollgate::settle::webhook_store::Delivery]) -> Vec<&str> {
    deliveries.iter().map(|d| d.delivery_id.as_str()).collect()
}

/// Deliveries an older build wrote (no head marks) are in order once migrated: each
/// account's oldest pending delivery heads its queue (the next one between two of equal
/// position goes by id), a head retried later still holds its queue until it ends, an
/// older delivery put back by RetryWebhookDelivery heads the queue again (a lease of the
/// head read before that is refused), and each delivery ended hands the head on.
async fn queue_heads_hold_across_the_migration(url: &str) {
    use tollgate::settle::webhook_store::AttemptOutcome;
    const LATER: i64 = 9_000_000_000_000;
    deliveries_at_v11(
        url,
        &[
            ("a-0", "a", 1, 0, "delivered", 1, 5),
            // Tried three times, its next attempt far off: "a" waits for it.
            ("a-1", "a", 2, 0, "pending", 3, LATER),
            ("a-2", "a", 3, 0, "pending", 0, 5),
            ("a-3", "a", 3, 1, "pending", 0, 5),
            ("b-old", "b", 1, 0, "failed", 6, 5),
            // Two of one position: by id.
            ("b-y", "b", 5, 0, "pending", 0, 5),
            ("b-x", "b", 5, 0, "pending", 0, 5),
            ("b-z", "b", 6, 0, "pending", 0, 5),
            ("c-1", "c", 1, 0, "delivered", 1, 5),
        ],
    )
    .await;
    let store = tollgate::settle::Store::connect_lazy(url, 2).expect("store");
    store.migrate().await.expect("migrate");
    let kind = store.kind();
    let now = tollgate::ledger::wall_clock_ms();

    let due = store.due_deliveries(now, 10).await.expect("due");
    assert_eq!(ids(&due), ["b-x"], "{kind}");
    assert!(store
        .retry_delivery("b-old", now)
        .await
        .expect("retry")
        .is_some());
    assert!(
        !store
            .lease_delivery("b-x", 0, now, now + 10_000)
            .await
            .expect("lease"),
        "{kind}: b-x no longer heads its queue"
    );
    assert_eq!(
        deliver_due(&store, now).await,
        ["b-old", "b-x", "b-y", "b-z"],
        "{kind}"
    );
    // "a" still waits for its head; once that is given up, the rest go in order.
    let later = store.due_deliveries(LATER, 10).await.expect("due");
    assert_eq!(ids(&later), ["a-1"], "{kind}");
    assert!(store
        .lease_delivery("a-1", 3, LATER, LATER + 10_000)
        .await
        .expect("lease"));
    let give_up = AttemptOutcome::Failed {
        status_code: 500,
        error: "HTTP 500".into(),
        next_attempt_at_ms: LATER + 60_000,
        give_up: true,
    };
    assert!(store
        .finish_attempt("a-1", LATER + 10_000, LATER, &give_up)
        .await
        .expect("finish"));
    assert_eq!(deliver_due(&store, now).await, ["a-2", "a-3"], "{kind}");
    assert_eq!(store.pending_deliveries().await.expect("pending"), 0);

    // An older pod still running after the migration (a rolling upgrade) inserts into
    // "c"'s empty queue and "a"'s without marking a head, ends a head without handing it
    // on ("d"), and puts an older delivery back (RetryWebhookDelivery) behind a marked
    // head ("e"): the repair marks what the dispatcher would otherwise never try, or try
    // out of order.
    common::run_sql(
        url,
        "INSERT INTO tollgate_webhook_deliveries (delivery_id, account_id, wallet, \
         event_type, position_ms, position_seq, ordinal, payload, status, attempts, \
         next_attempt_at_ms, lease_until_ms, last_error, last_status_code, created_at_ms, \
         delivered_at_ms) VALUES \
         ('c-2', 'c', 'default', 'grant.created', 7, 0, 0, '{}', 'pending', 0, 5, 0, '', 0, 1, 0), \
         ('a-4', 'a', 'default', 'grant.created', 7, 0, 0, '{}', 'pending', 0, 5, 0, '', 0, 1, 0), \
         ('d-1', 'd', 'default', 'grant.created', 7, 0, 0, '{}', 'pending', 0, 5, 0, '', 0, 1, 0), \
         ('d-2', 'd', 'default', 'grant.created', 8, 0, 0, '{}', 'pending', 0, 5, 0, '', 0, 1, 0), \
         ('e-1', 'e', 'default', 'grant.created', 7, 0, 0, '{}', 'pending', 6, 5, 0, '', 0, 1, 0), \
         ('e-2', 'e', 'default', 'grant.created', 8, 0, 0, '{}', 'pending', 0, 5, 0, '', 0, 1, 0); \
         UPDATE tollgate_webhook_deliveries SET is_head = 1 WHERE delivery_id IN ('d-1', 'e-2'); \
         UPDATE tollgate_webhook_deliveries SET status = 'delivered' WHERE delivery_id = 'd-1';"
            .to_owned(),
    )
    .await;
    assert_eq!(
        ids(&store.due_deliveries(now, 10).await.expect("due")),
        ["e-2"],
        "{kind}: only the wrong head is due before the repair"
    );
    assert_eq!(store.repair_heads().await.expect("repair"), 4, "{kind}");
    assert_eq!(store.repair_heads().await.expect("repair"), 0, "{kind}");
    let sent = deliver_due(&store, now).await;
    let at = |id: &str| sent.iter().position(|s| s == id);
    assert!(at("e-1") < at("e-2"), "{kind}: {sent:?}");
    let mut sent = sent.clone();
    sent.sort();
    assert_eq!(sent, ["a-4", "c-2", "d-2", "e-1", "e-2"], "{kind}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_heads_hold_across_the_migration_postgres() {
    let pg = common::PgDatabase::create().await;
    queue_heads_hold_across_the_migration(&pg.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_heads_hold_across_the_migration_sqlite() {
    queue_heads_hold_across_the_migration(&common::temp_sqlite_url()).await;
}

/// Three dispatchers work the queues while a settler keeps adding deliveries to them
/// (grants, a `grant.created` each), some attempts failing once: every account's
/// deliveries are attempted one at a time and in order, and every one is delivered — no
/// queue is left without a head when a delivery is added to it just as its last one
/// ends (each would see the other's row as it was without the queue lock).
async fn queues_stay_in_order_under_concurrent_dispatchers(store_url: &str) {
    use std::collections::BTreeSet;
    use std::sync::{Arc, Mutex};
    use tollgate::settle::webhook_store::AttemptOutcome;

    const ACCOUNTS: usize = 12;
    const GRANTS: usize = 10;
    let redis = common::RedisServer::start();
    let ledger = common::ledger(&redis, Clock::Redis);
    for g in 0..GRANTS {
        for a in 0..ACCOUNTS {
            ledger
                .grant(&common::purchase(
                    &format!("acct{a}"),
                    100,
                    &format!("g{g}"),
                ))
                .await
                .expect("grant");
        }
    }
    let events = common::outbox_events(&ledger).await;
    let store = Arc::new(tollgate::settle::Store::connect_lazy(store_url, 8).expect("store"));
    store.migrate().await.expect("migrate");
    let kind = store.kind();

    let settled = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Who holds a lease of each account's deliveries, and the order they were taken in.
    let in_flight = Arc::new(Mutex::new(BTreeSet::new()));
    let taken = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..3 {
        let (store, settled, in_flight, taken) = (
            store.clone(),
            settled.clone(),
            in_flight.clone(),
            taken.clone(),
        );
        tasks.spawn(async move {
            let deadline = std::time::Instant::now() + DEADLINE;
            loop {
                let now = tollgate::ledger::wall_clock_ms();
                let due = store.due_deliveries(now, 4).await.expect("due");
                if due.is_empty() {
                    if settled.load(std::sync::atomic::Ordering::SeqCst)
                        && store.pending_deliveries().await.expect("pending") == 0
                    {
                        return;
                    }
                    assert!(
                        std::time::Instant::now() < deadline,
                        "deliveries pending and none due: a queue without a head"
                    );
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    continue;
                }
                for d in due {
                    let now = tollgate::ledger::wall_clock_ms();
                    let lease = now + 60_000;
                    if !store
                        .lease_delivery(&d.delivery_id, d.attempts, now, lease)
                        .await
                        .expect("lease")
                    {
                        continue;
                    }
                    assert!(
                        in_flight.lock().expect("lock").insert(d.account_id.clone()),
                        "two deliveries of one account in flight: {d:?}"
                    );
                    taken.lock().expect("lock").push((
                        d.account_id.clone(),
                        d.position,
                        d.delivery_id.clone(),
                    ));
                    // The POST: while it runs, another dispatcher taking a delivery of the
                    // same account would find the account in flight.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    // A delivery of every third grant fails once, retried at once.
                    let fails = d.attempts == 0 && d.position.0 % 3 == 0;
                    let outcome = if fails {
                        AttemptOutcome::Failed {
                            status_code: 503,
                            error: "HTTP 503".into(),
                            next_attempt_at_ms: now,
                            give_up: false,
                        }
                    } else {
                        AttemptOutcome::Delivered { status_code: 204 }
                    };
                    in_flight.lock().expect("lock").remove(&d.account_id);
                    assert!(store
                        .finish_attempt(&d.delivery_id, lease, now, &outcome)
                        .await
                        .expect("finish"));
                }
            }
        });
    }
    // The settler: small batches, in stream order, as the dispatchers go.
    for batch in events.chunks(3) {
        store
            .append_batch(batch, None, Some(&low_below_20()))
            .await
            .expect("settle");
        tokio::task::yield_now().await;
    }
    settled.store(true, std::sync::atomic::Ordering::SeqCst);
    while let Some(joined) = tasks.join_next().await {
        joined.expect("dispatcher");
    }

    let taken = taken.lock().expect("lock").clone();
    /// A delivery taken: its position in the account's queue and its id.
    type Taken = ((i64, i64, i64), String);
    let mut per_account: BTreeMap<String, Vec<Taken>> = BTreeMap::new();
    for (account, position, id) in taken {
        let list = per_account.entry(account).or_default();
        // A failed attempt's retry takes the same delivery again, next.
        if list.last().map(|(_, last)| last) != Some(&id) {
            list.push((position, id));
        }
    }
    assert_eq!(per_account.len(), ACCOUNTS, "{kind}");
    for (account, list) in per_account {
        let mut sorted = list.clone();
        sorted.sort();
        assert_eq!(list, sorted, "{kind}: {account}'s deliveries out of order");
        assert_eq!(list.len(), GRANTS, "{kind}: {account}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queues_stay_in_order_under_concurrent_dispatchers_postgres() {
    let pg = common::PgDatabase::create().await;
    queues_stay_in_order_under_concurrent_dispatchers(&pg.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queues_stay_in_order_under_concurrent_dispatchers_sqlite() {
    queues_stay_in_order_under_concurrent_dispatchers(&common::temp_sqlite_url()).await;
}

/// A store (at `store_url`) holding the `grant.created` deliveries of `grants` (account,
/// number of grants), settled from a real ledger; its Redis, kept alive by the caller.
async fn granted_deliveries(
    store_url: &str,
    grants: &[(&str, usize)],
) -> (common::RedisServer, std::sync::Arc<tollgate::settle::Store>) {
    let redis = common::RedisServer::start();
    let ledger = common::ledger(&redis, Clock::Redis);
    for (account, count) in grants {
        for g in 0..*count {
            ledger
                .grant(&common::purchase(account, 100, &format!("g{g}")))
                .await
                .expect("grant");
        }
    }
    let store = tollgate::settle::Store::connect_lazy(store_url, 4).expect("store");
    store.migrate().await.expect("migrate");
    let events = common::outbox_events(&ledger).await;
    store
        .append_batch(&events, None, Some(&low_below_20()))
        .await
        .expect("settle");
    (redis, std::sync::Arc::new(store))
}

/// A dispatcher POSTing to `receiver`, whose attempts time out after `timeout`; stopped
/// when the sender is dropped or sent to.
fn start_dispatcher(
    store: &std::sync::Arc<tollgate::settle::Store>,
    receiver: &Receiver,
    timeout: Duration,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let settings = tollgate::webhooks::DispatchSettings {
        url: receiver.url(),
        secret: SECRET.into(),
        secret_previous: String::new(),
        timeout,
        attempts_max: 30,
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
        poll_interval: Duration::from_millis(50),
        concurrency: 4,
        delivery_retention: None,
    };
    let dispatcher = tollgate::webhooks::dispatcher::Dispatcher::new(
        store.clone(),
        settings,
        std::sync::Arc::new(low_below_20()),
    )
    .expect("dispatcher");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(dispatcher.run(async move {
        let _ = stopped.await;
    }));
    (stop, task)
}

/// Ids the receiver accepted of the account's deliveries, in the order received.
fn accepted_ids(receiver: &Receiver, account: &str) -> Vec<String> {
    receiver
        .accepted()
        .iter()
        .filter(|r| r.json()["account_id"] == account)
        .map(|r| r.delivery_id.clone())
        .collect()
}

/// A receiver hanging on one account's delivery holds one of the dispatcher's slots, not
/// the others: another account's deliveries all go out while that attempt still hangs
/// (the dispatcher used to wait for every attempt of a batch before reading the next
/// heads, so each later delivery waited for the hanging one's deadline). The hanging
/// account's next delivery waits behind it, and goes once it is answered.
async fn a_receiver_hanging_on_one_account_holds_up_only_that_account(store_url: &str) {
    const FAST: usize = 6;
    let (_redis, store) = granted_deliveries(store_url, &[("slow", 2), ("fast", FAST)]).await;
    let receiver = Receiver::start().await;
    receiver.hold_account("slow");
    // Longer than this test waits: the held attempt does not time out meanwhile.
    let (stop, task) = start_dispatcher(&store, &receiver, Duration::from_secs(600));

    // Both in whichever order a busy machine runs the two accounts' attempts.
    common::eventually(DEADLINE, "fast's deliveries while slow's hangs", || async {
        (accepted_ids(&receiver, "fast").len() == FAST && receiver.held_now() == 1).then_some(())
    })
    .await;
    let slow: Vec<_> = receiver
        .received()
        .into_iter()
        .filter(|r| r.json()["account_id"] == "slow")
        .collect();
    assert_eq!(
        slow.len(),
        1,
        "slow's second delivery waits behind its first"
    );
    assert_eq!(
        receiver.held_now(),
        1,
        "slow's first attempt still in flight"
    );

    receiver.release();
    let slow_ids = common::eventually(DEADLINE, "slow's deliveries once answered", || async {
        let ids = accepted_ids(&receiver, "slow");
        (ids.len() == 2).then_some(ids)
    })
    .await;
    assert_eq!(slow_ids[0], slow[0].delivery_id);
    for (account, ids) in [
        ("fast", accepted_ids(&receiver, "fast")),
        ("slow", slow_ids),
    ] {
        let listed = store
            .list_deliveries(&tollgate::settle::webhook_store::DeliveryQuery {
                account_id: Some(account.into()),
                page_size: 100,
                ..Default::default()
            })
            .await
            .expect("list");
        let mut in_order: Vec<_> = listed.deliveries.iter().collect();
        in_order.sort_by_key(|d| d.position);
        let expected: Vec<_> = in_order.iter().map(|d| d.delivery_id.clone()).collect();
        assert_eq!(ids, expected, "{account}: each once, in order");
        assert!(
            in_order
                .iter()
                .all(|d| d.status == "delivered" && d.attempts == 1),
            "{account}: {in_order:?}"
        );
    }
    let _ = stop.send(());
    task.await.expect("dispatcher");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_hanging_on_one_account_holds_up_only_that_account_postgres() {
    let pg = common::PgDatabase::create().await;
    a_receiver_hanging_on_one_account_holds_up_only_that_account(&pg.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_hanging_on_one_account_holds_up_only_that_account_sqlite() {
    a_receiver_hanging_on_one_account_holds_up_only_that_account(&common::temp_sqlite_url()).await;
}

/// Housekeeping that keeps failing (here the lot tracking table is gone, so announcing
/// expiring lots and pruning lots fail every time) is logged and does not stop the
/// deliveries: it used to end every round before any head was read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_housekeeping_does_not_stop_deliveries() {
    use sqlx::Connection;

    let store_url = common::temp_sqlite_url();
    let (_redis, store) = granted_deliveries(&store_url, &[("acme", 3)]).await;
    let mut db = sqlx::SqliteConnection::connect(&store_url)
        .await
        .expect("connect");
    sqlx::query("DROP TABLE tollgate_lots")
        .execute(&mut db)
        .await
        .expect("drop");
    let receiver = Receiver::start().await;
    let (stop, task) = start_dispatcher(&store, &receiver, Duration::from_secs(30));
    common::eventually(DEADLINE, "acme's deliveries", || async {
        (accepted_ids(&receiver, "acme").len() == 3).then_some(())
    })
    .await;
    let _ = stop.send(());
    task.await.expect("dispatcher");
}

/// A store error leasing one head does not cancel the attempts already started: they
/// finish and are recorded (the dispatcher used to return at once, dropping its started
/// attempts mid-POST: never recorded, sent again once their leases expired). Here a
/// trigger refuses every lease of one account's delivery, counting each refusal in a
/// sequence (not rolled back with the statement); the other account's attempt is held
/// at the receiver until a refusal came after it started, then answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_lease_does_not_cancel_attempts_in_flight_postgres() {
    let pg = common::PgDatabase::create().await;
    let (_redis, store) = granted_deliveries(&pg.url, &[("first", 1), ("broken", 1)]).await;
    let pool = sqlx::PgPool::connect(&pg.url).await.expect("connect");
    for statement in [
        // `first`'s head is read before `broken`'s: both due.
        "UPDATE tollgate_webhook_deliveries SET next_attempt_at_ms = \
         CASE account_id WHEN 'first' THEN 1 ELSE 2 END",
        "CREATE SEQUENCE test_refused_leases",
        "CREATE FUNCTION test_refuse_lease() RETURNS trigger AS $$ BEGIN \
         IF NEW.account_id = 'broken' AND NEW.lease_until_ms <> OLD.lease_until_ms THEN \
         PERFORM nextval('test_refused_leases'); RAISE EXCEPTION 'lease refused by the test'; \
         END IF; RETURN NEW; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER test_refuse_lease BEFORE UPDATE ON tollgate_webhook_deliveries \
         FOR EACH ROW EXECUTE FUNCTION test_refuse_lease()",
    ] {
        sqlx::query(statement)
            .execute(&pool)
            .await
            .expect(statement);
    }
    let refused = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM test_refused_leases",
        )
        .fetch_one(&pool)
        .await
        .expect("refusals")
    };
    let receiver = Receiver::start().await;
    receiver.hold_account("first");
    // Longer than this test waits: the lease of `first`'s delivery does not expire.
    let (stop, task) = start_dispatcher(&store, &receiver, Duration::from_secs(600));
    common::eventually(DEADLINE, "first's attempt to arrive", || async {
        (receiver.held_now() == 1).then_some(())
    })
    .await;
    let before = refused().await;
    common::eventually(DEADLINE, "a lease refused after it", || async {
        (refused().await > before).then_some(())
    })
    .await;
    receiver.release();
    let delivery = common::eventually(DEADLINE, "first's attempt recorded", || async {
        let listed = store
            .list_deliveries(&tollgate::settle::webhook_store::DeliveryQuery {
                account_id: Some("first".into()),
                page_size: 10,
                ..Default::default()
            })
            .await
            .expect("list");
        listed
            .deliveries
            .into_iter()
            .find(|d| d.status == "delivered")
    })
    .await;
    assert_eq!(delivery.attempts, 1);
    assert_eq!(accepted_ids(&receiver, "first"), [delivery.delivery_id]);
    let _ = stop.send(());
    task.await.expect("dispatcher");
}
