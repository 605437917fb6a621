//! Changing `ledger.idempotency_window_secs` keeps the live idempotency records findable
//! (docs/ARCHITECTURE.md, "Changing the window"): the buckets are numbered by a span the
//! shard stores, and a sidecar with another window switches the numbering while the
//! previous one is still looked in. Without it a retry after the change is applied again:
//! a double charge, a double grant.

mod common;

use std::sync::Arc;

use common::RedisServer;
use tollgate::ledger::{
    Authorize, Clock, Debit, DebitOutcome, GrantOutcome, HoldOutcome, Ledger, LedgerError,
    Metadata, OnExpiry, Refund, RefundOutcome, Refusal,
};

const HOUR_SECS: u64 = 3600;
/// The window the records are made with.
const W1: u64 = 2 * HOUR_SECS;

/// A ledger over `redis` with its own idempotency window, as a sidecar configured so.
fn sidecar(redis: &RedisServer, window_secs: u64) -> Arc<Ledger> {
    let mut config = common::test_config(&redis.url());
    config.ledger.idempotency_window_secs = window_secs;
    config.ledger.hold_retention_secs = config.ledger.hold_retention_secs.max(window_secs);
    tollgate::server::ledger_from_config(&config, Clock::Redis).expect("ledger")
}

fn debit(account: &str, amount: i64, key: &str) -> Debit {
    Debit {
        account_id: account.into(),
        wallet: "default".into(),
        amount,
        idempotency_key: key.into(),
        operation: "op".into(),
        metadata: Metadata::new(),
        member_id: String::new(),
        price_inputs: None,
        attempt_mark: None,
    }
}

fn hold(account: &str, amount: i64, key: &str) -> Authorize {
    Authorize {
        account_id: account.into(),
        wallet: "default".into(),
        amount,
        ttl_ms: 3_600_000,
        on_expiry: OnExpiry::Release,
        idempotency_key: key.into(),
        operation: "op".into(),
        metadata: Metadata::new(),
        member_id: String::new(),
        price_inputs: None,
        attempt_mark: None,
    }
}

fn refund(charge_id: &str, amount: i64, key: &str) -> Refund {
    Refund {
        charge_id: charge_id.into(),
        amount,
        idempotency_key: key.into(),
        metadata: Metadata::new(),
    }
}

/// (available, held, granted, used, refunded) of the account's default wallet.
async fn totals(ledger: &Ledger, account: &str) -> (i64, i64, i64, i64, i64) {
    let rows = ledger.balance(account, "default").await.expect("balance");
    let w = &rows[0];
    assert!(w.is_conserved(), "{w:?}");
    (w.available, w.held, w.granted, w.used, w.refunded)
}

fn reused<T: std::fmt::Debug>(what: &str, answer: Result<T, LedgerError>) {
    assert!(
        matches!(
            answer,
            Err(LedgerError::Refused(Refusal::IdempotencyKeyReused))
        ),
        "{what}: {answer:?}"
    );
}

/// What one sidecar did, under its own idempotency keys.
struct Made {
    grant: GrantOutcome,
    debit: DebitOutcome,
    hold: HoldOutcome,
    refund: RefundOutcome,
    /// The idempotency keys' suffix.
    keys: String,
}

/// A grant, a debit, a hold and a refund of the debit, each under its own key.
async fn make(ledger: &Ledger, account: &str, keys: &str) -> Made {
    let grant = ledger
        .grant(&common::purchase(account, 1000, &format!("g-{keys}")))
        .await
        .expect("grant");
    let debit = ledger
        .debit(&debit(account, 30, &format!("d-{keys}")))
        .await
        .expect("debit");
    let hold = ledger
        .authorize(&hold(account, 50, &format!("h-{keys}")))
        .await
        .expect("hold");
    let refund = ledger
        .refund(&refund(&debit.event_id, 10, &format!("r-{keys}")))
        .await
        .expect("refund");
    assert!(
        !grant.replayed && !debit.replayed && !hold.replayed && !refund.replayed,
        "fresh keys made nothing new"
    );
    Made {
        grant,
        debit,
        hold,
        refund,
        keys: keys.into(),
    }
}

/// `ledger` (any window) retries everything `made` did: each answer is the first one,
/// replayed, and nothing changes; another request under each key is refused.
async fn retried(ledger: &Ledger, account: &str, made: &Made, by: &str) {
    let before = totals(ledger, account).await;
    let keys = &made.keys;
    let grant = ledger
        .grant(&common::purchase(account, 1000, &format!("g-{keys}")))
        .await
        .expect("grant retried");
    assert_eq!(
        grant,
        GrantOutcome {
            replayed: true,
            ..made.grant.clone()
        },
        "{by}: grant {keys} applied again"
    );
    let debit_again = ledger
        .debit(&debit(account, 30, &format!("d-{keys}")))
        .await
        .expect("debit retried");
    assert_eq!(
        debit_again,
        DebitOutcome {
            replayed: true,
            ..made.debit.clone()
        },
        "{by}: debit {keys} applied again"
    );
    let hold_again = ledger
        .authorize(&hold(account, 50, &format!("h-{keys}")))
        .await
        .expect("hold retried");
    assert_eq!(
        hold_again,
        HoldOutcome {
            replayed: true,
            ..made.hold.clone()
        },
        "{by}: hold {keys} applied again"
    );
    let refund_again = ledger
        .refund(&refund(&made.debit.event_id, 10, &format!("r-{keys}")))
        .await
        .expect("refund retried");
    assert_eq!(
        refund_again,
        RefundOutcome {
            replayed: true,
            ..made.refund.clone()
        },
        "{by}: refund {keys} applied again"
    );
    assert_eq!(
        totals(ledger, account).await,
        before,
        "{by}: a retry of {keys} changed the balance"
    );
    reused(
        &format!("{by}: grant {keys}"),
        ledger
            .grant(&common::purchase(account, 1001, &format!("g-{keys}")))
            .await,
    );
    reused(
        &format!("{by}: debit {keys}"),
        ledger
            .debit(&debit(account, 31, &format!("d-{keys}")))
            .await,
    );
    reused(
        &format!("{by}: hold {keys}"),
        ledger
            .authorize(&hold(account, 51, &format!("h-{keys}")))
            .await,
    );
    reused(
        &format!("{by}: refund {keys}"),
        ledger
            .refund(&refund(&made.debit.event_id, 11, &format!("r-{keys}")))
            .await,
    );
    assert_eq!(
        totals(ledger, account).await,
        before,
        "{by}: a refused request of {keys} changed the balance"
    );
}

/// The span (ms) the account's shard numbers its buckets by, as stored.
async fn stored_span(ledger: &Ledger, account: &str) -> Option<String> {
    let key = ledger
        .shards()
        .idem_span_key(ledger.shards().of_account(account));
    let value: Option<String> = ledger
        .redis()
        .query(redis::cmd("GET").arg(key))
        .await
        .expect("get span");
    value
}

/// Records made under W1, then retried by a sidecar with `other_secs`, which makes its
/// own; the two sidecars take turns (a rolling change), then W1 alone again finds both.
/// The sweeper runs in between, as it does in every sidecar.
async fn change_and_back(other_secs: u64) {
    let redis = RedisServer::start();
    let first = sidecar(&redis, W1);
    common::initialize_blocking(&first, &redis.url());
    let other = sidecar(&redis, other_secs);
    let account = "acct-window";
    let shard = first.shards().of_account(account);
    let by = format!("window {other_secs} s after {W1} s");

    let made_first = make(&first, account, "w1").await;
    let stored_first = stored_span(&first, account).await;
    // A shard written by a tollgate from before the stored span: the same numbering.
    let _: i64 = first
        .redis()
        .query(redis::cmd("DEL").arg(first.shards().idem_span_key(shard)))
        .await
        .expect("del span");
    retried(
        &first,
        account,
        &made_first,
        "the same window, span not stored yet",
    )
    .await;
    let stored_again = stored_span(&first, account).await;

    // The window changes.
    retried(&other, account, &made_first, &by).await;
    let w1_span = (W1 * 500).to_string();
    assert_eq!(stored_first.as_deref(), Some(w1_span.as_str()));
    assert_eq!(stored_again.as_deref(), Some(w1_span.as_str()));
    let switched = stored_span(&other, account).await.unwrap_or_default();
    assert!(
        switched.starts_with(&format!("{} {w1_span} ", other_secs * 500)),
        "{by}: switched, the previous numbering kept: {switched}"
    );
    common::sweep_once(&other, shard).await;
    retried(&other, account, &made_first, &by).await;
    let made_other = make(&other, account, "w2").await;

    // Both windows at once, taking turns.
    for turn in 0..3 {
        for (ledger, name) in [(&first, "first"), (&other, "other")] {
            let by = format!("{by}, turn {turn} of the {name} sidecar");
            retried(ledger, account, &made_first, &by).await;
            retried(ledger, account, &made_other, &by).await;
            common::sweep_once(ledger, shard).await;
        }
    }

    // Back to W1 only.
    let by = format!("back to {W1} s after {other_secs} s");
    retried(&first, account, &made_first, &by).await;
    retried(&first, account, &made_other, &by).await;
    common::sweep_once(&first, shard).await;
    retried(&first, account, &made_other, &by).await;
    let switched = stored_span(&first, account).await.unwrap_or_default();
    assert!(
        switched.starts_with(&format!("{} {} ", W1 * 500, other_secs * 500)),
        "{by}: switched back, the other numbering kept: {switched}"
    );

    // Everything applied exactly once: two grants, two debits less their refunds, two holds.
    assert_eq!(
        totals(&first, account).await,
        (2000 - 2 * 30 + 2 * 10 - 2 * 50, 100, 2000, 60, 20)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shorter_window_still_finds_the_records_and_back() {
    change_and_back(W1 / 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_longer_window_still_finds_the_records_and_back() {
    change_and_back(4 * W1).await;
}

const DAY: u64 = 24 * HOUR_SECS;

/// Redis's clock (ms), which idempotency buckets follow, at least a minute before the
/// end of a bucket of DAY's numbering (waits for the next one if need be).
async fn redis_now_ms(ledger: &Ledger) -> i64 {
    let s1 = DAY as i64 * 500;
    loop {
        let t: Vec<String> = ledger
            .redis()
            .query(&redis::cmd("TIME"))
            .await
            .expect("time");
        let now = t[0].parse::<i64>().expect("s") * 1000 + t[1].parse::<i64>().expect("us") / 1000;
        if (now + 60_000) / s1 == now / s1 {
            return now;
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// A window near DAY (DAY + `sign` * d seconds, d in 1..=60) for which `fits(now bucket
/// of DAY's numbering, now bucket of the other's, the other's span)` holds now and a
/// minute from now (no bucket ends during the test).
fn near_day(now_ms: i64, sign: i64, fits: impl Fn(i64, i64, i64) -> bool) -> u64 {
    let s1 = DAY as i64 * 500;
    (1..=60)
        .map(|d| (DAY as i64 + sign * d) as u64)
        .find(|w| {
            let s2 = *w as i64 * 500;
            [now_ms, now_ms + 60_000]
                .iter()
                .all(|t| fits(t / s1, t / s2, s2))
                && (now_ms + 60_000) / s1 == now_ms / s1
                && (now_ms + 60_000) / s2 == now_ms / s2
        })
        .expect("a window near a day whose bucket numbers meet DAY's")
}

/// Moves the records of `tag`'s bucket `from` to bucket `to` of the same numbering (span
/// `span`), with the expiry `remember` gives it: as if they were made while `to` was
/// the current bucket.
async fn age_bucket(ledger: &Ledger, tag: &str, from: i64, to: i64, span: i64) {
    let (from, to_key) = (format!("{tag}:i:{from}"), format!("{tag}:i:{to}"));
    let _: i64 = ledger
        .redis()
        .query(redis::cmd("COPY").arg(&from).arg(&to_key))
        .await
        .expect("copy bucket");
    let _: i64 = ledger
        .redis()
        .query(redis::cmd("DEL").arg(&from))
        .await
        .expect("del bucket");
    let _: i64 = ledger
        .redis()
        .query(redis::cmd("PEXPIREAT").arg(&to_key).arg((to + 4) * span))
        .await
        .expect("pexpireat");
}

/// A slightly shorter window numbers buckets a little ahead of the old one: the bucket
/// its sweeper would unlink as dead can be a live bucket of the old numbering. While that
/// numbering is live the sweeper unlinks none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slightly_shorter_window_sweeps_no_live_bucket_of_the_old_one() {
    let redis = RedisServer::start();
    let first = sidecar(&redis, DAY);
    common::initialize_blocking(&first, &redis.url());
    let s1 = DAY as i64 * 500;
    let now_ms = redis_now_ms(&first).await;
    // The shorter numbering's dead bucket (its now - 3) is one of the old numbering's two
    // buckets before now: a lookup there still reads it.
    let window = near_day(now_ms, -1, |b1, b2, _| b2 - 3 >= b1 - 2 && b2 - 3 < b1);
    let other = sidecar(&redis, window);
    let account = "acct-sweep";
    let tag = first.shards().tag(first.shards().of_account(account));
    let shard = first.shards().of_account(account);
    let (b1, b2) = (now_ms / s1, now_ms / (window as i64 * 500));

    let made = make(&first, account, "old").await;
    // The records were made a span or two ago: in the bucket the other sweeper takes for
    // dead.
    age_bucket(&first, tag, b1, b2 - 3, s1).await;
    retried(&first, account, &made, "the old window, records a span old").await;
    retried(&other, account, &made, "the shorter window").await;
    common::sweep_once(&other, shard).await;
    let exists: i64 = other
        .redis()
        .query(redis::cmd("EXISTS").arg(format!("{tag}:i:{}", b2 - 3)))
        .await
        .expect("exists");
    assert_eq!(
        exists, 1,
        "the sweeper unlinked a live bucket of the old numbering"
    );
    retried(&other, account, &made, "the shorter window, after a sweep").await;
}

/// A slightly longer window numbers buckets a little behind the old one: its current
/// bucket can be a bucket the old numbering made a span or two ago, whose expiry (by the
/// old span) comes before the new numbering's last lookup of it. Records then raise it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slightly_longer_window_raises_a_shared_bucket_s_expiry() {
    let redis = RedisServer::start();
    let first = sidecar(&redis, DAY);
    common::initialize_blocking(&first, &redis.url());
    let s1 = DAY as i64 * 500;
    let now_ms = redis_now_ms(&first).await;
    // The longer numbering's current bucket is one the old numbering made before now, and
    // the old expiry would drop it before the longer numbering's last lookup.
    let window = near_day(now_ms, 1, |b1, b2, s2| {
        b2 < b1 && b2 >= b1 - 2 && (b2 + 4) * s1 < (b2 + 3) * s2
    });
    let other = sidecar(&redis, window);
    let s2 = window as i64 * 500;
    let account = "acct-expiry";
    let tag = first.shards().tag(first.shards().of_account(account));
    let (b1, b2) = (now_ms / s1, now_ms / s2);

    let made = make(&first, account, "old").await;
    age_bucket(&first, tag, b1, b2, s1).await;
    retried(&other, account, &made, "the longer window").await;
    let made_other = make(&other, account, "new").await;
    let expires: i64 = other
        .redis()
        .query(redis::cmd("PEXPIRETIME").arg(format!("{tag}:i:{b2}")))
        .await
        .expect("pexpiretime");
    assert!(
        expires >= (b2 + 3) * s2,
        "bucket {b2} expires at {expires}, before its last lookup at {}",
        (b2 + 3) * s2
    );
    retried(&first, account, &made_other, "back to a day").await;
    retried(&first, account, &made, "back to a day").await;
}
