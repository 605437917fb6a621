//! Voids (gateway::void, lua/void.lua): a fail_closed check whose charge passes its
//! deadline is answered 503 `unavailable`, but the charge was already on the wire and Redis
//! runs it late. The gateway voids it: the debit is refunded in full (a refund event of
//! operation `void`), the hold released, and the request's idempotency record forgotten,
//! so a retry with the same request id is charged again rather than allowed from the
//! record of a charge that was refunded.
//!
//! The charge is made late with `CLIENT PAUSE <ms> WRITE` on the test's redis-server: the
//! FCALL waits until the pause ends, past the call deadline, and then runs.

mod common;

use std::time::{Duration, Instant};

use common::gateways::{http, seed, HttpResponse};
use common::RedisServer;
use tollgate::config::{Config, Overrides};
use tollgate::ledger::event::{EventKind, LedgerEvent};
use tollgate::ledger::{
    AttemptMark, Authorize, ChargeRef, Clock, Debit, KeyRef, LedgerError, Metadata, OnExpiry,
    Refund, Voided,
};

/// The longest Redis holds writes: far past the call and check deadlines below (the pause
/// ends as soon as the paused check has answered).
const PAUSE_MS: u64 = 120_000;
/// Generous for a busy 2-core machine: a void runs once the pause ends.
const VOID_DEADLINE: Duration = Duration::from_secs(30);

const PRICEBOOK: &str = r#"
[pricebook]
default = "deny"
[[pricebook.routes]]
path = "/strict"
operation = "strict"
[[pricebook.routes]]
path = "/held"
operation = "held"
[pricebook.operations.strict]
base = 3
fail_policy = "fail_closed"
[pricebook.operations.held]
mode = "hold"
base = 7
hold_ttl_ms = 600000
on_expiry = "capture"
fail_policy = "fail_closed"
"#;

fn config(redis_url: &str, request_id_replay: bool) -> Config {
    config_from(PRICEBOOK, redis_url, request_id_replay)
}

/// [`config`] with another price book.
fn config_from(pricebook: &str, redis_url: &str, request_id_replay: bool) -> Config {
    let mut config =
        Config::from_toml(pricebook, Vec::new(), &Overrides::default()).expect("config");
    let test = common::test_config(redis_url);
    config.redis = test.redis;
    config.auth = test.auth;
    config.store = test.store;
    config.settler = test.settler;
    config.gateway.spool_path = test.gateway.spool_path;
    // Deadlines well inside the pause, and long enough for an unpaused call on a busy
    // machine.
    config.redis.call_timeout_ms = 500;
    config.gateway.check_timeout_ms = 700;
    config.gateway.identity_cache_ttl_ms = 3_600_000;
    config.gateway.request_id_replay = request_id_replay;
    config
}

async fn check(
    server: &common::TestServer,
    path: &str,
    key: &str,
    request_id: Option<&str>,
) -> HttpResponse {
    let mut headers = vec![
        ("x-forwarded-method", "POST"),
        ("x-forwarded-uri", path),
        ("x-api-key", key),
    ];
    if let Some(id) = request_id {
        headers.push(("x-request-id", id));
    }
    http(server.http_addr, "GET", "/v1/forward-auth", &headers, "").await
}

/// Runs `f` while every write (FCALL included) on the test's Redis is held, then lets the
/// writes go: what `f` sent runs late, after its deadlines. The pause lasts until `f` has
/// its answer however slow the machine (`CLIENT UNPAUSE`); `PAUSE_MS` only bounds it if the
/// test fails first.
async fn with_writes_paused<F: std::future::Future>(redis: &RedisServer, f: F) -> F::Output {
    let mut con = redis.client().get_connection().expect("redis connection");
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(PAUSE_MS)
        .arg("WRITE")
        .query(&mut con)
        .expect("CLIENT PAUSE");
    let answer = f.await;
    let _: () = redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query(&mut con)
        .expect("CLIENT UNPAUSE");
    answer
}

/// Waits until a client of the paused Redis has a call queued behind the one it is paused
/// on (bytes in its query buffer: `CLIENT LIST` `qbuf`).
async fn wait_for_a_second_queued_call(redis: &RedisServer) {
    let mut con = redis.client().get_connection().expect("redis connection");
    let deadline = Instant::now() + VOID_DEADLINE;
    loop {
        let clients: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query(&mut con)
            .expect("CLIENT LIST");
        let queued = clients.lines().any(|line| {
            line.split(' ')
                .find_map(|field| field.strip_prefix("qbuf="))
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|n| n > 0)
        });
        if queued {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no call queued behind the paused one: {clients}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// (available, held) of the account's default wallet.
async fn wallet(server: &common::TestServer, account: &str) -> (i64, i64) {
    let wallets = server
        .ledger
        .balance(account, "default")
        .await
        .expect("balance");
    wallets.first().map_or((0, 0), |w| (w.available, w.held))
}

/// Polls the outbox (reads, which the pause does not hold) until the account has an
/// event of `kind` from a void, then expects the wallet back to `want`: the late charge ran,
/// and its void.
async fn wait_void(server: &common::TestServer, account: &str, kind: EventKind, want: (i64, i64)) {
    let deadline = Instant::now() + VOID_DEADLINE;
    loop {
        let events = events_of(server, account).await;
        if events
            .iter()
            .any(|e| e.kind == kind && e.metadata.contains("void"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{account}: the late charge was not voided: {events:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(wallet(server, account).await, want, "{account}");
}

async fn events_of(server: &common::TestServer, account: &str) -> Vec<LedgerEvent> {
    common::outbox_events(&server.ledger)
        .await
        .into_iter()
        .filter(|e| e.account_id == account)
        .collect()
}

/// The account's late debit and its void: a debit of `amount`, then a refund of all of it
/// naming the debit, of operation "void".
async fn assert_debit_voided(server: &common::TestServer, account: &str, amount: i64) {
    let events = events_of(server, account).await;
    let debits: Vec<_> = events
        .iter()
        .filter(|e| e.kind == EventKind::Debit)
        .collect();
    let voids: Vec<_> = events
        .iter()
        .filter(|e| e.kind == EventKind::Refund && e.operation == "void")
        .collect();
    let late = debits.last().expect("the late debit is in the ledger");
    assert_eq!(late.amount, amount);
    assert_eq!(voids.len(), 1, "one void refund: {events:#?}");
    assert_eq!(voids[0].charge_id, late.event_id);
    assert_eq!(voids[0].amount, amount);
    assert!(
        voids[0].metadata.contains("void"),
        "{:?}",
        voids[0].metadata
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_debit_of_a_cached_identity_is_voided() {
    let redis = RedisServer::start();
    let server = common::TestServer::start(config(&redis.url(), false), Clock::Redis).await;
    let key = seed(&server, "void-cached", 100).await;
    // Two checks cache the identity (the cache admits a key on its second miss): the
    // late one is a charge by account.
    for _ in 0..2 {
        assert_eq!(check(&server, "/strict", &key, None).await.status, 200);
    }
    assert_eq!(wallet(&server, "void-cached").await, (94, 0));

    let denied = with_writes_paused(&redis, check(&server, "/strict", &key, None)).await;
    assert_eq!(denied.status, 503, "{denied:?}");

    wait_void(&server, "void-cached", EventKind::Refund, (94, 0)).await;
    assert_debit_voided(&server, "void-cached", 3).await;
    // The refunded debit stays refunded: nothing else moves.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(wallet(&server, "void-cached").await, (94, 0));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_debit_by_api_key_is_voided() {
    let redis = RedisServer::start();
    let server = common::TestServer::start(config(&redis.url(), false), Clock::Redis).await;
    let key = seed(&server, "void-keyed", 100).await;
    // No check before: the identity cache misses, and the debit script resolves the key
    // (charge_by_key).
    let denied = with_writes_paused(&redis, check(&server, "/strict", &key, None)).await;
    assert_eq!(denied.status, 503, "{denied:?}");

    wait_void(&server, "void-keyed", EventKind::Refund, (100, 0)).await;
    assert_debit_voided(&server, "void-keyed", 3).await;
    server.stop().await;
}

/// The connection breaks after Redis ran the charge and before its answer came back (a
/// reset, a killed client connection, a failover): the charge ran, and the check is denied
/// 503 all the same. The gateway voids it as it voids a charge past its deadline; it used
/// to void only those, taking a broken connection for a call that never ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debit_whose_answer_a_broken_connection_lost_is_voided() {
    let redis = RedisServer::start();
    let proxy = common::proxy::AnswerDropProxy::start(([127, 0, 0, 1], redis.port).into()).await;
    let server = common::TestServer::start(config(&proxy.redis_url(), false), Clock::Redis).await;
    let key = seed(&server, "void-lost", 100).await;
    // The debit function's name ends the FCALL's second argument: `tg_<hash>_debit`.
    proxy.arm(b"_debit\r\n");
    let denied = check(&server, "/strict", &key, None).await;
    assert_eq!(denied.status, 503, "{denied:?}");
    assert_eq!(proxy.fired(), 1, "the debit's connection was closed");

    wait_void(&server, "void-lost", EventKind::Refund, (100, 0)).await;
    assert_debit_voided(&server, "void-lost", 3).await;
    server.stop().await;
}

/// The whole check's deadline (`gateway.check_timeout_ms`) passes first: the charge's
/// future is dropped mid-call, and what it had sent is voided all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_debit_cut_off_by_the_check_deadline_is_voided() {
    let redis = RedisServer::start();
    let mut config = config(&redis.url(), false);
    config.redis.call_timeout_ms = 1_200;
    config.gateway.check_timeout_ms = 500;
    let server = common::TestServer::start(config, Clock::Redis).await;
    let key = seed(&server, "void-cut", 100).await;
    let denied = with_writes_paused(&redis, check(&server, "/strict", &key, None)).await;
    assert_eq!(denied.status, 503, "{denied:?}");

    wait_void(&server, "void-cut", EventKind::Refund, (100, 0)).await;
    assert_debit_voided(&server, "void-cut", 3).await;
    server.stop().await;
}

/// The check's future is dropped before it decides, here by tonic at the caller's
/// `grpc-timeout` (as Envoy's ext_authz timeout sends it; Envoy also cancels a Check whose
/// client went away): the charge it had sent is voided all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_debit_of_a_check_dropped_by_its_caller_is_voided() {
    use envoy_types::pb::envoy::service::auth::v3::{
        attribute_context::{HttpRequest, Request},
        authorization_client::AuthorizationClient,
        AttributeContext, CheckRequest,
    };
    let redis = RedisServer::start();
    let mut config = config(&redis.url(), false);
    // Neither the call's nor the check's own deadline passes within the pause: only the
    // caller gives up. One connection: the void runs after the charge.
    config.redis.call_timeout_ms = 20_000;
    config.gateway.check_timeout_ms = 20_000;
    config.redis.connections = 1;
    let server = common::TestServer::start(config, Clock::Redis).await;
    let key = seed(&server, "void-dropped", 100).await;
    let mut client = AuthorizationClient::new(server.channel().await);
    let mut request = tonic::Request::new(CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "POST".into(),
                    path: "/strict".into(),
                    host: "api.example.com".into(),
                    headers: [("x-api-key".to_owned(), key.clone())].into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    });
    request.set_timeout(Duration::from_millis(200));
    // The writes stay paused until the void's call is queued behind the charge: the
    // server drops the check at its own reading of the deadline, which on a busy machine
    // may come after the caller's; unpaused before it, the charge answers the check,
    // which then stands (as it should: it decided).
    let answer = with_writes_paused(&redis, async {
        let answer = client.check(request).await;
        wait_for_a_second_queued_call(&redis).await;
        answer
    })
    .await;
    assert!(answer.is_err(), "the caller's deadline: {answer:?}");

    wait_void(&server, "void-dropped", EventKind::Refund, (100, 0)).await;
    assert_debit_voided(&server, "void-dropped", 3).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_hold_is_released() {
    let redis = RedisServer::start();
    let server = common::TestServer::start(config(&redis.url(), false), Clock::Redis).await;
    let key = seed(&server, "void-held", 100).await;
    let denied = with_writes_paused(&redis, check(&server, "/held", &key, None)).await;
    assert_eq!(denied.status, 503, "{denied:?}");

    // Nothing held: the hold (on_expiry capture) would otherwise be charged in full at its
    // deadline.
    assert_hold_voided(&server, "void-held", 7).await;
    server.stop().await;
}

/// Waits for the void of the account's late hold of `amount`, then expects the hold and
/// its release (of operation `void`) in the ledger and the wallet whole.
async fn assert_hold_voided(server: &common::TestServer, account: &str, amount: i64) {
    wait_void(server, account, EventKind::Release, (100, 0)).await;
    let events = events_of(server, account).await;
    let hold = events
        .iter()
        .find(|e| e.kind == EventKind::Hold)
        .expect("the late hold is in the ledger");
    let release = events
        .iter()
        .find(|e| e.kind == EventKind::Release)
        .expect("the hold was released");
    assert_eq!(hold.amount, amount);
    assert_eq!(release.hold_id, hold.hold_id);
    assert_eq!(release.amount, amount);
    assert!(release.metadata.contains("void"), "{:?}", release.metadata);
}

/// A hold-mode operation that is `fail_open`: a check past its deadline is allowed
/// (degraded), with no hold id for anyone to settle.
const FAIL_OPEN_HOLD: &str = r#"
[pricebook]
default = "deny"
[[pricebook.routes]]
path = "/open-held"
operation = "open_held"
[pricebook.operations.open_held]
mode = "hold"
base = 9
hold_ttl_ms = 600000
on_expiry = "capture"
fail_policy = "fail_open"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_hold_of_a_check_allowed_by_fail_open_is_released() {
    let redis = RedisServer::start();
    let config = config_from(FAIL_OPEN_HOLD, &redis.url(), false);
    let server = common::TestServer::start(config, Clock::Redis).await;
    let key = seed(&server, "void-open-held", 100).await;
    let allowed = with_writes_paused(&redis, check(&server, "/open-held", &key, None)).await;
    assert_eq!(allowed.status, 200, "{allowed:?}");
    assert_eq!(
        allowed.header("x-tollgate-degraded"),
        Some("1"),
        "{allowed:?}"
    );
    assert_eq!(allowed.header("x-tollgate-hold-id"), None, "{allowed:?}");

    // The request went on free: the hold Redis placed once it woke is released, not left
    // to be captured whole at its deadline.
    assert_hold_voided(&server, "void-open-held", 9).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voided_request_retried_with_its_request_id_is_charged_again() {
    let redis = RedisServer::start();
    let server = common::TestServer::start(config(&redis.url(), true), Clock::Redis).await;
    let key = seed(&server, "void-retry", 100).await;
    assert_eq!(check(&server, "/strict", &key, None).await.status, 200);

    let denied =
        with_writes_paused(&redis, check(&server, "/strict", &key, Some("req-void-1"))).await;
    assert_eq!(denied.status, 503, "{denied:?}");
    wait_void(&server, "void-retry", EventKind::Refund, (97, 0)).await;
    assert_debit_voided(&server, "void-retry", 3).await;
    let voided = events_of(&server, "void-retry")
        .await
        .into_iter()
        .rfind(|e| e.kind == EventKind::Debit)
        .expect("the voided debit")
        .event_id;

    // The client retries the request: charged afresh, not allowed from the voided record.
    let retried = check(&server, "/strict", &key, Some("req-void-1")).await;
    assert_eq!(retried.status, 200, "{retried:?}");
    let charge_id = retried
        .header("x-tollgate-charge-id")
        .expect("a charge id")
        .to_owned();
    assert_ne!(charge_id, voided, "the retry replayed the voided charge");
    assert_eq!(wallet(&server, "void-retry").await, (94, 0));
    // And it stays charged once: a second retry replays it.
    let again = check(&server, "/strict", &key, Some("req-void-1")).await;
    assert_eq!(
        again.header("x-tollgate-charge-id"),
        Some(charge_id.as_str())
    );
    assert_eq!(wallet(&server, "void-retry").await, (94, 0));
    server.stop().await;
}

/// A request charged by a sidecar under one price book and retried, with its request id,
/// through a sidecar whose book prices it otherwise (a deploy of a new book), the retry
/// late: the retry's charge replays the first one's record (the same request: its digest
/// covers what was asked, not the price), and its void finds that record, made by the
/// first attempt, which was answered: it leaves it (`other_attempt`, not `other_request`,
/// which a digest of the amount would have given). The request stays charged once, at the
/// first price, from either sidecar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_retry_priced_by_another_book_leaves_the_first_charge() {
    let redis = RedisServer::start();
    let old = common::TestServer::start(config(&redis.url(), true), Clock::Redis).await;
    let dearer = PRICEBOOK.replace("base = 3\n", "base = 5\n");
    assert_ne!(dearer, PRICEBOOK);
    let new =
        common::TestServer::start(config_from(&dearer, &redis.url(), true), Clock::Redis).await;
    let key = seed(&old, "void-repriced", 100).await;
    let first = check(&old, "/strict", &key, Some("req-repriced")).await;
    assert_eq!(first.status, 200, "{first:?}");
    let charge_id = first.header("x-tollgate-charge-id").expect("charge id");
    assert_eq!(wallet(&old, "void-repriced").await, (97, 0));

    // The new sidecar has served a request of its own (at its price).
    let other = check(&new, "/strict", &key, Some("req-other")).await;
    assert_eq!(other.header("x-tollgate-charged"), Some("5"), "{other:?}");
    assert_eq!(wallet(&old, "void-repriced").await, (92, 0));

    let denied =
        with_writes_paused(&redis, check(&new, "/strict", &key, Some("req-repriced"))).await;
    assert_eq!(denied.status, 503, "{denied:?}");
    assert_eq!(
        wait_void_answers(&redis, 1).await,
        ["OK|NONE|other_attempt"]
    );
    assert_eq!(wallet(&new, "void-repriced").await, (92, 0));
    assert_no_void_refund(&new, "void-repriced").await;

    let retried = check(&new, "/strict", &key, Some("req-repriced")).await;
    assert_eq!(retried.status, 200, "{retried:?}");
    assert_eq!(retried.header("x-tollgate-charge-id"), Some(charge_id));
    assert_eq!(retried.header("x-tollgate-charged"), Some("3"));
    let again = check(&old, "/strict", &key, Some("req-repriced")).await;
    assert_eq!(again.header("x-tollgate-charge-id"), Some(charge_id));
    assert_eq!(wallet(&old, "void-repriced").await, (92, 0));
    new.stop().await;
    old.stop().await;
}

/// The answers recorded by the voids that ran on `redis` (each records its own, under
/// its own key), once there are `count` of them: a void's answer is the only trace of one
/// that changed nothing. Reads, which `CLIENT PAUSE … WRITE` does not hold.
async fn wait_void_answers(redis: &RedisServer, count: usize) -> Vec<String> {
    let deadline = Instant::now() + VOID_DEADLINE;
    let mut con = redis.client().get_connection().expect("redis connection");
    loop {
        let buckets: Vec<String> = redis::cmd("KEYS")
            .arg("{tg:*}:i:*")
            .query(&mut con)
            .expect("KEYS");
        let mut answers = Vec::new();
        for bucket in buckets.iter().filter(|b| !b.ends_with(":span")) {
            let values: Vec<String> = redis::cmd("HVALS")
                .arg(bucket)
                .query(&mut con)
                .expect("HVALS");
            // A void's record: 16 hex digits of its digest, then its answer.
            answers.extend(values.into_iter().filter_map(|v| {
                let answer = v.get(16..)?;
                ["OK|NONE|", "OK|VOIDED_DEBIT|", "OK|RELEASED_HOLD|"]
                    .iter()
                    .any(|p| answer.starts_with(p))
                    .then(|| answer.to_owned())
            }));
        }
        if answers.len() >= count {
            answers.sort();
            return answers;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {count} voids ran: {answers:?}",
            answers.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// No void refunded or released anything of the account's.
async fn assert_no_void_refund(server: &common::TestServer, account: &str) {
    let events = events_of(server, account).await;
    assert!(
        !events.iter().any(|e| e.metadata.contains("void")),
        "{events:#?}"
    );
}

/// The bug a per-attempt mark fixes: a request answered (charged, the upstream served it)
/// and retried with its request id, the retry's charge late (held past the deadlines): the
/// retry is answered `unavailable` and voided, but its charge only replayed the first
/// attempt's record, charging nothing. Its void finds that record holding another
/// attempt's mark and leaves the charge: the served request stays charged once. A hold
/// the same way stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_retry_of_an_answered_request_leaves_its_charge() {
    let redis = RedisServer::start();
    let server = common::TestServer::start(config(&redis.url(), true), Clock::Redis).await;
    let key = seed(&server, "void-served", 100).await;
    let first = check(&server, "/strict", &key, Some("req-served")).await;
    assert_eq!(first.status, 200, "{first:?}");
    let charge_id = first
        .header("x-tollgate-charge-id")
        .expect("a charge id")
        .to_owned();
    assert_eq!(wallet(&server, "void-served").await, (97, 0));

    let denied =
        with_writes_paused(&redis, check(&server, "/strict", &key, Some("req-served"))).await;
    assert_eq!(denied.status, 503, "{denied:?}");
    assert_eq!(
        wait_void_answers(&redis, 1).await,
        ["OK|NONE|other_attempt"]
    );
    assert_eq!(wallet(&server, "void-served").await, (97, 0));
    assert_no_void_refund(&server, "void-served").await;
    let debits = events_of(&server, "void-served")
        .await
        .into_iter()
        .filter(|e| e.kind == EventKind::Debit)
        .map(|e| e.event_id)
        .collect::<Vec<_>>();
    assert_eq!(debits, std::slice::from_ref(&charge_id), "one charge");
    // A further retry replays the one charge.
    let again = check(&server, "/strict", &key, Some("req-served")).await;
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(
        again.header("x-tollgate-charge-id"),
        Some(charge_id.as_str())
    );
    assert_eq!(wallet(&server, "void-served").await, (97, 0));

    // A hold placed by an answered check, its retry late: the hold stays open.
    let held = check(&server, "/held", &key, Some("req-served-hold")).await;
    assert_eq!(held.status, 200, "{held:?}");
    assert_eq!(wallet(&server, "void-served").await, (90, 7));
    let denied = with_writes_paused(
        &redis,
        check(&server, "/held", &key, Some("req-served-hold")),
    )
    .await;
    assert_eq!(denied.status, 503, "{denied:?}");
    assert_eq!(
        wait_void_answers(&redis, 2).await,
        ["OK|NONE|other_attempt", "OK|NONE|other_attempt"]
    );
    assert_eq!(wallet(&server, "void-served").await, (90, 7));
    assert_no_void_refund(&server, "void-served").await;
    server.stop().await;
}

/// A rolling upgrade: a request an older tollgate charged (its idempotency record holds
/// the digest of the amount) and retried through this one replays that charge rather
/// than being refused; retried late, the older charge is voided. Priced otherwise as
/// well (a new book in the same deploy) it is refused 409: never charged twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_across_an_upgrade_finds_the_charge_an_older_sidecar_made() {
    let redis = RedisServer::start();
    let server = common::TestServer::start(config(&redis.url(), true), Clock::Redis).await;
    let key = seed(&server, "void-upgrade", 100).await;
    // What the older sidecar's check sent: the amount its book gave, no price inputs.
    let older = |request_id: &str| Debit {
        account_id: "void-upgrade".into(),
        wallet: "default".into(),
        amount: 3,
        idempotency_key: format!("gw:strict:{request_id}"),
        operation: "strict".into(),
        metadata: Metadata::new(),
        member_id: String::new(),
        price_inputs: None,
        attempt_mark: None,
    };
    let charged = server
        .ledger
        .debit(&older("req-up-1"))
        .await
        .expect("debit");
    let retried = check(&server, "/strict", &key, Some("req-up-1")).await;
    assert_eq!(retried.status, 200, "{retried:?}");
    assert_eq!(
        retried.header("x-tollgate-charge-id"),
        Some(charged.event_id.as_str())
    );
    assert_eq!(wallet(&server, "void-upgrade").await, (97, 0));
    let dearer = PRICEBOOK.replace("base = 3\n", "base = 5\n");
    let repriced =
        common::TestServer::start(config_from(&dearer, &redis.url(), true), Clock::Redis).await;
    let refused = check(&repriced, "/strict", &key, Some("req-up-1")).await;
    assert_eq!(refused.status, 409, "{refused:?}");
    assert_eq!(wallet(&server, "void-upgrade").await, (97, 0));
    repriced.stop().await;

    let charged = server
        .ledger
        .debit(&older("req-up-2"))
        .await
        .expect("debit");
    assert_eq!(wallet(&server, "void-upgrade").await, (94, 0));
    let denied =
        with_writes_paused(&redis, check(&server, "/strict", &key, Some("req-up-2"))).await;
    assert_eq!(denied.status, 503, "{denied:?}");
    wait_void(&server, "void-upgrade", EventKind::Refund, (97, 0)).await;
    let voided = events_of(&server, "void-upgrade")
        .await
        .into_iter()
        .filter(|e| e.kind == EventKind::Refund && e.operation == "void")
        .map(|e| e.charge_id)
        .collect::<Vec<_>>();
    assert_eq!(voided, [charged.event_id]);
    server.stop().await;
}

fn debit(account: &str, key: &str, amount: i64) -> Debit {
    Debit {
        account_id: account.into(),
        wallet: "default".into(),
        amount,
        idempotency_key: key.into(),
        operation: "strict".into(),
        metadata: Metadata::new(),
        member_id: String::new(),
        price_inputs: None,
        attempt_mark: None,
    }
}

/// A void undoes a debit: the budgets it was counted in get it back (a refund, a
/// correction, does not), so the retry the void lets through is not refused
/// `BUDGET_EXCEEDED` for a charge that no longer stands. A budget set again since the
/// debit gets nothing back (it never counted the debit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voided_debit_is_given_back_to_its_budgets() {
    use tollgate::ledger::org::{BudgetPeriod, SetBudget};
    let redis = RedisServer::start();
    // Redis's clock: the debit's time is its event id's (the ledger's clock in production).
    let ledger = common::ledger(&redis, Clock::Redis);
    let meta = void_metadata();
    // A calendar day whose midnight is about twelve hours away, whatever the time now.
    let now_minutes = (tollgate::ledger::wall_clock_ms() / 60_000 % (24 * 60)) as i32;
    let noon_offset = (12 * 60 - now_minutes).clamp(-14 * 60, 14 * 60);
    for (acct, period, offset) in [
        ("void-day", BudgetPeriod::Day, noon_offset),
        ("void-window", BudgetPeriod::Window(3_600_000), 0),
    ] {
        ledger
            .grant(&common::purchase(acct, 100, "g"))
            .await
            .expect("grant");
        let budget = |limit: i64, key: &str| SetBudget {
            account_id: acct.into(),
            member_id: String::new(),
            wallet: "default".into(),
            limit,
            period,
            utc_offset_minutes: offset,
            idempotency_key: key.into(),
        };
        let spent = || async {
            let view = ledger.view(acct, "", "default").await.expect("view");
            view.budgets.first().map(|b| b.spent)
        };
        ledger.set_budget(&budget(10, "b1")).await.expect("budget");
        // A budget made in the debit's own millisecond gets nothing back (below).
        tokio::time::sleep(Duration::from_millis(5)).await;
        let first = debit(acct, "req-1", 6);
        ledger.debit(&first).await.expect("debit");
        assert_eq!(spent().await, Some(6), "{acct}");
        let out = ledger
            .void(ChargeRef::Debit(&first), None, "void-1", &meta)
            .await
            .expect("void");
        assert!(
            matches!(out.voided, Voided::Debit { .. }),
            "{acct}: {out:?}"
        );
        assert_eq!(spent().await, Some(0), "{acct}: the void gave it back");
        // The retry is charged afresh, within the budget.
        let retried = ledger
            .debit(&first)
            .await
            .expect("the retry fits the budget");
        assert!(!retried.replayed, "{acct}");
        assert_eq!(spent().await, Some(6), "{acct}");

        // Set again after the charge: a new budget, which never counted it.
        tokio::time::sleep(Duration::from_millis(5)).await;
        ledger.set_budget(&budget(0, "b2")).await.expect("removed");
        ledger
            .set_budget(&budget(10, "b3"))
            .await
            .expect("set again");
        ledger.debit(&debit(acct, "req-2", 3)).await.expect("debit");
        assert_eq!(spent().await, Some(3), "{acct}");
        ledger
            .void(ChargeRef::Debit(&first), None, "void-2", &meta)
            .await
            .expect("void");
        assert_eq!(
            spent().await,
            Some(3),
            "{acct}: nothing back to a budget set since"
        );
        let b = &ledger.balance(acct, "default").await.expect("balance")[0];
        assert_eq!(b.available, 97, "{acct}");

        // A budget set again in the debit's own millisecond, after it (its stamp is that
        // millisecond × 1000 and a little): it never counted the debit, and a void gave
        // the debit back to it all the same, letting the member spend past its limit.
        let late_cmd = debit(acct, "req-3", 4);
        let late = ledger.debit(&late_cmd).await.expect("debit");
        ledger.set_budget(&budget(0, "b4")).await.expect("removed");
        ledger
            .set_budget(&budget(10, "b5"))
            .await
            .expect("set again");
        ledger.debit(&debit(acct, "req-4", 5)).await.expect("debit");
        let debit_ms: i64 = late
            .event_id
            .split('-')
            .nth(1)
            .and_then(|ms| ms.parse().ok())
            .expect("event id <shard>-<ms>-<seq>");
        let shard = ledger.shards().of_account(acct);
        let mut con = redis.client().get_connection().expect("redis");
        let _: () = redis::cmd("HSET")
            .arg(format!("{}:bg:{acct}:default", ledger.shards().tag(shard)))
            .arg("c")
            .arg(debit_ms * 1000 + 5)
            .query(&mut con)
            .expect("the stamp of a budget made in the debit's millisecond");
        ledger
            .void(ChargeRef::Debit(&late_cmd), None, "void-3", &meta)
            .await
            .expect("void");
        assert_eq!(
            spent().await,
            Some(5),
            "{acct}: nothing back to a budget made in the debit's millisecond"
        );
    }
}

/// After a restore the shard's sequence runs ~16 minutes ahead of the clock (past the
/// lost Redis's hold ids), and budget stamps come from it: a budget set then had a stamp
/// "after" every debit of those minutes, and a void of such a debit gave it nothing back,
/// so the retry the void lets through was counted twice. The budget now keeps the
/// millisecond it was made when its stamp is ahead of the clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_void_gives_back_to_a_budget_set_while_the_sequence_ran_ahead() {
    use tollgate::ledger::org::{BudgetPeriod, SetBudget};
    let redis = RedisServer::start();
    let ledger = common::ledger(&redis, Clock::Redis);
    let acct = "void-ahead";
    ledger
        .grant(&common::purchase(acct, 100, "g"))
        .await
        .expect("grant");
    // What `tollgate restore` leaves: the sequence 10^9 past the clock (in µs).
    let shard = ledger.shards().of_account(acct);
    let ahead = tollgate::ledger::wall_clock_ms() * 1000 + 1_000_000_000;
    let mut con = redis.client().get_connection().expect("redis");
    let _: () = redis::cmd("SET")
        .arg(format!("{}:seq", ledger.shards().tag(shard)))
        .arg(ahead)
        .query(&mut con)
        .expect("SET seq");
    ledger
        .set_budget(&SetBudget {
            account_id: acct.into(),
            member_id: String::new(),
            wallet: "default".into(),
            limit: 10,
            period: BudgetPeriod::Window(3_600_000),
            utc_offset_minutes: 0,
            idempotency_key: "b1".into(),
        })
        .await
        .expect("budget");
    tokio::time::sleep(Duration::from_millis(5)).await;
    let first = debit(acct, "req-1", 6);
    ledger.debit(&first).await.expect("debit");
    let spent = || async {
        let view = ledger.view(acct, "", "default").await.expect("view");
        view.budgets.first().map(|b| b.spent)
    };
    assert_eq!(spent().await, Some(6));
    ledger
        .void(ChargeRef::Debit(&first), None, "void-1", &void_metadata())
        .await
        .expect("void");
    assert_eq!(spent().await, Some(0), "the void gave it back");
}

fn void_metadata() -> Metadata {
    [("tollgate".to_owned(), "void".to_owned())].into()
}

/// A gateway charge keyed by a client request id, priced, of attempt `mark`.
fn attempt(account: &str, key: &str, amount: i64, mark: &str) -> Debit {
    Debit {
        price_inputs: Some(String::new()),
        attempt_mark: AttemptMark::parse(mark),
        ..debit(account, key, amount)
    }
}

/// Every order in which Redis may run two attempts of one request and the voids of the
/// timed-out ones (the void, the late charge and the retry may each go out on another
/// connection). Attempt 1 timed out (void 1); attempt 2 either was answered, so the
/// request was served and must stay charged exactly once, or timed out too (void 2): then
/// it is charged nothing, unless the later charge replayed the earlier one's before
/// either void ran (that attempt could have been served by it, so it stands). A void
/// overtaken by another attempt's void, charge or refund still fences its own attempt off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_served_once_is_charged_once_in_every_order_of_charges_and_voids() {
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Step {
        Charge(usize),
        Void(usize),
    }
    fn orders(steps: &[Step]) -> Vec<Vec<Step>> {
        if steps.len() <= 1 {
            return vec![steps.to_vec()];
        }
        let mut all = Vec::new();
        for i in 0..steps.len() {
            let mut rest = steps.to_vec();
            let first = rest.remove(i);
            for mut tail in orders(&rest) {
                tail.insert(0, first);
                all.push(tail);
            }
        }
        all
    }

    let redis = RedisServer::start();
    let ledger = common::ledger(&redis, Clock::Redis);
    let meta = void_metadata();
    let served = [Step::Charge(0), Step::Void(0), Step::Charge(1)];
    let neither = [
        Step::Charge(0),
        Step::Void(0),
        Step::Charge(1),
        Step::Void(1),
    ];
    let mut case = 0;
    for (steps, second_served) in [(&served[..], true), (&neither[..], false)] {
        for order in orders(steps) {
            case += 1;
            let account = format!("orders-{case}");
            ledger
                .grant(&common::purchase(&account, 50, "g"))
                .await
                .expect("grant");
            let attempts = [
                attempt(&account, "req", 5, "aaaaaaaa"),
                attempt(&account, "req", 5, "bbbbbbbb"),
            ];
            for step in &order {
                match *step {
                    Step::Charge(i) => {
                        // The late attempt's answer goes nowhere: its check answered 503.
                        let _ = ledger.debit(&attempts[i]).await;
                    }
                    Step::Void(i) => {
                        ledger
                            .void(
                                ChargeRef::Debit(&attempts[i]),
                                None,
                                &format!("void-{i}"),
                                &meta,
                            )
                            .await
                            .expect("void");
                    }
                }
            }
            let b = &ledger.balance(&account, "default").await.expect("b")[0];
            assert!(b.is_conserved(), "{order:?}: {b:?}");
            let charged = b.used - b.refunded;
            if second_served {
                assert_eq!(charged, 5, "served once, charged {charged}: {order:?}");
            } else {
                // Charged only when the later charge replayed the earlier one's before
                // either void ran (it could have been served by it: the flag).
                let at = |step: fn(usize) -> Step, i: usize| {
                    order
                        .iter()
                        .position(|s| *s == step(i))
                        .unwrap_or(usize::MAX)
                };
                let (first, later) = if at(Step::Charge, 0) < at(Step::Charge, 1) {
                    (0, 1)
                } else {
                    (1, 0)
                };
                let replayed = at(Step::Charge, later) < at(Step::Void, first)
                    && at(Step::Charge, later) < at(Step::Void, later);
                assert_eq!(
                    charged,
                    if replayed { 5 } else { 0 },
                    "served never, charged {charged}: {order:?}"
                );
            }
        }
    }
    assert_eq!(case, 6 + 24);
}

/// lua/void.lua by itself: a void refunds a debit once however often it runs, answers
/// the same to a retry under its own key, changes nothing when there is no charge (or
/// another request's) but fences off that attempt's charge should it still come, and
/// lets the request be charged again by another attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_void_refunds_once_and_only_its_own_charge() {
    let redis = RedisServer::start();
    let ledger = common::ledger(&redis, Clock::Redis);
    ledger
        .grant(&common::purchase("void-lua", 50, "g1"))
        .await
        .expect("grant");
    let meta = void_metadata();

    // No charge ran under the key: nothing to undo. The charge, when it comes after all
    // (sent on another connection than the void), charges nothing.
    let late = attempt("void-lua", "req-1", 5, "aaaaaaaa");
    let out = ledger
        .void(ChargeRef::Debit(&late), None, "void-0", &meta)
        .await
        .expect("void");
    assert_eq!(out.voided, Voided::Nothing("no_charge".into()));
    let fenced = ledger.debit(&late).await;
    assert!(
        matches!(fenced, Err(LedgerError::Unavailable(_))),
        "the voided attempt's late charge: {fenced:?}"
    );

    // So does a hold.
    let late_hold = Authorize {
        account_id: "void-lua".into(),
        wallet: "default".into(),
        amount: 10,
        ttl_ms: 60_000,
        on_expiry: OnExpiry::Capture,
        idempotency_key: "req-late-hold".into(),
        operation: "held".into(),
        metadata: Metadata::new(),
        member_id: String::new(),
        price_inputs: Some(String::new()),
        attempt_mark: AttemptMark::parse("aaaaaaaa"),
    };
    let out = ledger
        .void(ChargeRef::Hold(&late_hold), None, "void-late-hold", &meta)
        .await
        .expect("void");
    assert_eq!(out.voided, Voided::Nothing("no_charge".into()));
    let fenced = ledger.authorize(&late_hold).await;
    assert!(
        matches!(fenced, Err(LedgerError::Unavailable(_))),
        "the voided attempt's late hold: {fenced:?}"
    );
    let b = &ledger.balance("void-lua", "default").await.expect("b")[0];
    assert_eq!((b.available, b.held), (50, 0));

    // Another attempt of the request is charged.
    let none = attempt("void-lua", "req-1", 5, "bbbbbbbb");
    let charged = ledger.debit(&none).await.expect("debit");
    assert!(!charged.replayed);
    assert_eq!(charged.available, 45);
    // Another request under the same key (another amount): not this void's charge.
    let other = debit("void-lua", "req-1", 6);
    let out = ledger
        .void(ChargeRef::Debit(&other), None, "void-1", &meta)
        .await
        .expect("void");
    assert_eq!(out.voided, Voided::Nothing("other_request".into()));

    let out = ledger
        .void(ChargeRef::Debit(&none), None, "void-2", &meta)
        .await
        .expect("void");
    let Voided::Debit {
        charge_id,
        refunded,
        available,
        ..
    } = &out.voided
    else {
        panic!("{out:?}");
    };
    assert_eq!(
        (charge_id.as_str(), *refunded, *available),
        (charged.event_id.as_str(), 5, 50)
    );
    assert!(!out.replayed);
    // The same void again replays its answer; another void finds nothing left.
    let again = ledger
        .void(ChargeRef::Debit(&none), None, "void-2", &meta)
        .await
        .expect("void");
    assert_eq!(again.voided, out.voided);
    assert!(again.replayed);
    let later = ledger
        .void(ChargeRef::Debit(&none), None, "void-3", &meta)
        .await
        .expect("void");
    assert_eq!(later.voided, Voided::Nothing("no_charge".into()));
    let b = &ledger
        .balance("void-lua", "default")
        .await
        .expect("balance")[0];
    assert_eq!((b.available, b.used, b.refunded), (50, 5, 5));
    assert!(b.is_conserved(), "{b:?}");
    let refunds = common::outbox_events(&ledger)
        .await
        .into_iter()
        .filter(|e| e.kind == EventKind::Refund)
        .count();
    assert_eq!(refunds, 1, "refunded once");

    // The request runs afresh (another attempt): charged, not replayed from the voided
    // record, nor fenced off by the later void that found nothing.
    let retried = ledger
        .debit(&attempt("void-lua", "req-1", 5, "cccccccc"))
        .await
        .expect("debit");
    assert!(!retried.replayed);
    assert_ne!(retried.event_id, charged.event_id);
    assert_eq!(retried.available, 45);
    // The first void's retry (its own key) still replays, and never touches the new charge.
    let replay = ledger
        .void(ChargeRef::Debit(&none), None, "void-2", &meta)
        .await
        .expect("void");
    assert!(replay.replayed);
    assert_eq!(
        ledger.balance("void-lua", "default").await.expect("b")[0].available,
        45
    );

    // A hold: released once; a refused charge: nothing.
    let hold = Authorize {
        account_id: "void-lua".into(),
        wallet: "default".into(),
        amount: 10,
        ttl_ms: 60_000,
        on_expiry: OnExpiry::Capture,
        idempotency_key: "req-h".into(),
        operation: "held".into(),
        metadata: Metadata::new(),
        member_id: String::new(),
        price_inputs: None,
        attempt_mark: None,
    };
    let held = ledger.authorize(&hold).await.expect("hold");
    let out = ledger
        .void(ChargeRef::Hold(&hold), None, "void-h", &meta)
        .await
        .expect("void");
    assert!(
        matches!(&out.voided, Voided::Hold { hold_id, released: 10, .. } if *hold_id == held.hold_id),
        "{out:?}"
    );
    let out = ledger
        .void(ChargeRef::Hold(&hold), None, "void-h2", &meta)
        .await
        .expect("void");
    assert_eq!(out.voided, Voided::Nothing("no_charge".into()));
    let b = &ledger.balance("void-lua", "default").await.expect("b")[0];
    assert_eq!((b.available, b.held), (45, 0));
    let too_much = debit("void-lua", "req-big", 1_000);
    assert!(ledger.debit(&too_much).await.is_err());
    let out = ledger
        .void(ChargeRef::Debit(&too_much), None, "void-big", &meta)
        .await
        .expect("void");
    assert_eq!(out.voided, Voided::Nothing("refused".into()));
    // By an unknown API key: nothing.
    let by_key = debit("", "req-k", 5);
    let key = KeyRef {
        key_id: "k0-0000000000000000",
        shard: 0,
        digest_hex: "00",
    };
    let out = ledger
        .void(ChargeRef::Debit(&by_key), Some(&key), "void-k", &meta)
        .await
        .expect("void");
    assert_eq!(out.voided, Voided::Nothing("unknown_key".into()));
}

/// A void of a debit an admin already refunded in full does nothing (lua/void.lua: nothing
/// left to refund is `Nothing("refunded")`): no refund event of 0 credits, and the
/// request's idempotency record stays, so its retry replays rather than being charged again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_void_of_a_fully_refunded_debit_does_nothing() {
    let redis = RedisServer::start();
    let ledger = common::ledger(&redis, Clock::Redis);
    ledger
        .grant(&common::purchase("void-refunded", 50, "g1"))
        .await
        .expect("grant");
    let req = debit("void-refunded", "req-1", 5);
    let charged = ledger.debit(&req).await.expect("debit");
    ledger
        .refund(&Refund {
            charge_id: charged.event_id.clone(),
            amount: 5,
            idempotency_key: "rf-1".into(),
            metadata: Metadata::new(),
        })
        .await
        .expect("refund");
    let before = common::outbox_events(&ledger).await.len();

    let out = ledger
        .void(ChargeRef::Debit(&req), None, "void-1", &void_metadata())
        .await
        .expect("void");
    assert_eq!(out.voided, Voided::Nothing("refunded".into()));
    let events = common::outbox_events(&ledger).await;
    assert_eq!(events.len(), before, "no event: {:?}", events.last());
    let b = &ledger
        .balance("void-refunded", "default")
        .await
        .expect("balance")[0];
    assert_eq!((b.available, b.used, b.refunded), (50, 5, 5));
    let again = ledger.debit(&req).await.expect("retry");
    assert!(
        again.replayed,
        "the retry replays the refunded charge: {again:?}"
    );
    assert_eq!(again.event_id, charged.event_id);
}

/// A priced debit as a gateway check sends it, with this attempt's mark.
fn marked(account: &str, key: &str, mark: Option<&str>) -> Debit {
    Debit {
        price_inputs: Some("units=1".into()),
        attempt_mark: mark.map(|m| AttemptMark::parse(m).expect("a mark")),
        ..debit(account, key, 5)
    }
}

/// lua/void.lua and lib.lua by themselves: a charge's idempotency record keeps the mark of
/// the attempt that made it (a replay by another attempt flags it, and never shows it in
/// the answer); a void with another attempt's mark changes nothing (`other_attempt`), nor
/// does the void of the attempt that made it once another attempt replayed it; before
/// that, that void undoes it; a record without a mark (an older tollgate's) is voided as
/// before, whatever the void's mark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_void_undoes_only_the_charge_its_own_attempt_made() {
    let redis = RedisServer::start();
    let ledger = common::ledger(&redis, Clock::Redis);
    ledger
        .grant(&common::purchase("void-mark", 50, "g1"))
        .await
        .expect("grant");
    let meta = void_metadata();

    let first = marked("void-mark", "gw:strict:req-1", Some("aaaaaaaa"));
    let retry = marked("void-mark", "gw:strict:req-1", Some("bbbbbbbb"));
    let charged = ledger.debit(&first).await.expect("debit");
    let replayed = ledger.debit(&retry).await.expect("replay");
    assert!(replayed.replayed);
    assert_eq!(
        (
            replayed.event_id.as_str(),
            replayed.amount,
            replayed.available,
            replayed.held
        ),
        (charged.event_id.as_str(), 5, 45, 0),
        "the replay answers the stored answer, without the mark"
    );
    // The record: the digest (upper case: an older tollgate's recall takes it for
    // another request's), the first attempt's mark, the answer.
    let mut con = redis.client().get_connection().expect("redis connection");
    let buckets: Vec<String> = redis::cmd("KEYS")
        .arg("{tg:*}:i:*")
        .query(&mut con)
        .expect("KEYS");
    let values: Vec<String> = buckets
        .iter()
        .filter(|b| !b.ends_with(":span"))
        .flat_map(|b| {
            redis::cmd("HVALS")
                .arg(b)
                .query::<Vec<String>>(&mut con)
                .expect("HVALS")
        })
        .filter(|v| v.contains(&charged.event_id))
        .collect();
    assert_eq!(values.len(), 1, "{values:?}");
    let (digest, rest) = values[0].split_at(16);
    assert!(
        digest
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b)),
        "{digest}"
    );
    // The mark's last letter upper-cased: another attempt replayed it.
    assert!(rest.starts_with("aaaaaaaAOK|"), "{rest}");

    let out = ledger
        .void(ChargeRef::Debit(&retry), None, "void-b", &meta)
        .await
        .expect("void");
    assert_eq!(out.voided, Voided::Nothing("other_attempt".into()));
    // The retry that replayed it may have been served by it: the first attempt's void
    // leaves it too.
    let out = ledger
        .void(ChargeRef::Debit(&first), None, "void-a", &meta)
        .await
        .expect("void");
    assert_eq!(out.voided, Voided::Nothing("other_attempt".into()));
    // Before any other attempt replayed it, the void of the attempt that made it undoes it.
    let alone = marked("void-mark", "gw:strict:req-5", Some("gggggggg"));
    let alone_charged = ledger.debit(&alone).await.expect("debit");
    let out = ledger
        .void(ChargeRef::Debit(&alone), None, "void-g", &meta)
        .await
        .expect("void");
    assert!(
        matches!(&out.voided, Voided::Debit { charge_id, refunded: 5, .. } if *charge_id == alone_charged.event_id),
        "{out:?}"
    );

    // A record an older tollgate made (no mark): voided by a marked attempt, as before.
    let older = marked("void-mark", "gw:strict:req-2", None);
    let charged = ledger.debit(&older).await.expect("debit");
    let later = marked("void-mark", "gw:strict:req-2", Some("cccccccc"));
    assert!(ledger.debit(&later).await.expect("replay").replayed);
    let out = ledger
        .void(ChargeRef::Debit(&later), None, "void-c", &meta)
        .await
        .expect("void");
    assert!(
        matches!(&out.voided, Voided::Debit { charge_id, .. } if *charge_id == charged.event_id),
        "{out:?}"
    );

    // A hold: another attempt's void leaves it open; its own releases it.
    let hold = |mark: &str| Authorize {
        account_id: "void-mark".into(),
        wallet: "default".into(),
        amount: 10,
        ttl_ms: 60_000,
        on_expiry: OnExpiry::Capture,
        idempotency_key: "gw:held:req-3".into(),
        operation: "held".into(),
        metadata: Metadata::new(),
        member_id: String::new(),
        price_inputs: Some("units=1".into()),
        attempt_mark: AttemptMark::parse(mark),
    };
    let held = ledger.authorize(&hold("dddddddd")).await.expect("hold");
    let out = ledger
        .void(ChargeRef::Hold(&hold("eeeeeeee")), None, "void-e", &meta)
        .await
        .expect("void");
    assert_eq!(out.voided, Voided::Nothing("other_attempt".into()));
    let out = ledger
        .void(ChargeRef::Hold(&hold("dddddddd")), None, "void-d", &meta)
        .await
        .expect("void");
    assert!(
        matches!(&out.voided, Voided::Hold { hold_id, released: 10, .. } if *hold_id == held.hold_id),
        "{out:?}"
    );
    let b = &ledger.balance("void-mark", "default").await.expect("b")[0];
    assert_eq!((b.available, b.held), (45, 0), "req-1's charge stands");
    assert!(b.is_conserved(), "{b:?}");

    // A mark is for a priced charge only.
    let unpriced = Debit {
        attempt_mark: AttemptMark::parse("ffffffff"),
        ..debit("void-mark", "req-4", 5)
    };
    assert!(ledger.debit(&unpriced).await.is_err());
}
