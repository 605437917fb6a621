//! Redis stopped mid-test under gateway checks: fail_closed operations answer 503 within
//! the check deadline, fail_open ones allow with `x-tollgate-degraded: 1`; when Redis
//! returns, checks succeed again without restarting tollgate, and the charges fail_open
//! allowed are applied from the spool, each once. Envoy's access-log entries that meet
//! the outage settle their holds when Redis returns, not by `on_expiry`. A key the
//! sidecar last found revoked or unknown stays refused through the outage.

mod common;

use std::time::{Duration, Instant};

use common::gateways::{
    access_log_entry, access_log_message, balance, esign_config, http, ocr_hold, seed,
    wait_balance, HttpResponse,
};
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_client::AccessLogServiceClient;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse as CheckAnswer;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use tollgate::api::pb;
use tollgate::config::{Config, Overrides};
use tollgate::gateway::identity::KeyStore;
use tollgate::ledger::Clock;

/// The tests of this file share one metrics recorder and both make fail_open charges:
/// they run one at a time, so the spool test's counter differences are its own.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Far above the configured deadlines: proves no check hangs (how soon a check answers
/// is bounded against the Redis call deadline in
/// `a_hung_redis_is_answered_at_the_check_deadline_not_the_call_deadline`).
const HANG_GUARD: Duration = Duration::from_secs(20);

const PRICEBOOK: &str = r#"
[pricebook]
default = "deny"
[[pricebook.routes]]
path = "/strict"
operation = "strict"
[[pricebook.routes]]
path = "/lenient"
operation = "lenient"
[[pricebook.routes]]
path = "/peek"
operation = "peek"
[pricebook.operations.strict]
base = 1
fail_policy = "fail_closed"
[pricebook.operations.lenient]
base = 1
fail_policy = "fail_open"
[pricebook.operations.peek]
base = 0
fail_policy = "fail_open"
"#;

fn config(redis_url: &str) -> Config {
    let mut config =
        Config::from_toml(PRICEBOOK, Vec::new(), &Overrides::default()).expect("config");
    let test = common::test_config(redis_url);
    config.redis = test.redis;
    config.auth = test.auth;
    // A private store the settler does not fill: Redis coming back empty is then a new
    // Redis, not a lost one (that case awaits `tollgate restore`; tests/restore.rs).
    config.store = test.store;
    config.gateway.spool_path = test.gateway.spool_path;
    config.settler = test.settler;
    // Deadlines a busy machine keeps before the outage; the tests using them only show
    // that no check hangs (HANG_GUARD): the check deadline itself is bounded by
    // `a_hung_redis_is_answered_at_the_check_deadline_not_the_call_deadline`.
    config.redis.call_timeout_ms = 1_000;
    config.gateway.check_timeout_ms = 2_000;
    // The identity stays cached through the outage, however slowly the checks run.
    config.gateway.identity_cache_ttl_ms = 3_600_000;
    config
}

async fn check(server: &common::TestServer, path: &str, key: &str) -> (HttpResponse, Duration) {
    check_as(server, path, key, None).await
}

/// A check with an `x-request-id` (the idempotency key of its charge) when given.
async fn check_as(
    server: &common::TestServer,
    path: &str,
    key: &str,
    request_id: Option<&str>,
) -> (HttpResponse, Duration) {
    let started = Instant::now();
    let mut headers = vec![
        ("x-forwarded-method", "POST"),
        ("x-forwarded-uri", path),
        ("x-api-key", key),
    ];
    if let Some(id) = request_id {
        headers.push(("x-request-id", id));
    }
    let response = tokio::time::timeout(
        HANG_GUARD,
        http(server.http_addr, "GET", "/v1/forward-auth", &headers, ""),
    )
    .await
    .expect("the check must not hang");
    (response, started.elapsed())
}

/// The same check through Envoy's Check: the denial's HTTP status (200 when allowed).
async fn envoy_check(server: &common::TestServer, path: &str, key: &str) -> i32 {
    let mut client = AuthorizationClient::new(server.channel().await);
    let request = CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "POST".into(),
                    path: path.into(),
                    host: "api.example.com".into(),
                    headers: [("x-api-key".to_owned(), key.to_owned())].into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    let answer = tokio::time::timeout(HANG_GUARD, client.check(request))
        .await
        .expect("the check must not hang")
        .expect("Check")
        .into_inner();
    match answer.http_response {
        Some(CheckAnswer::OkResponse(_)) => 200,
        Some(CheckAnswer::DeniedResponse(d)) => d.status.map_or(0, |s| s.code),
        other => panic!("{other:?}"),
    }
}

async fn wait_allowed(server: &common::TestServer, path: &str, key: &str) {
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        let (r, _) = check(server, path, key).await;
        if r.status == 200 && r.header("x-tollgate-degraded").is_none() {
            return;
        }
        assert!(Instant::now() < deadline, "never allowed again: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_503_fail_open_degraded_then_recovery_without_restart() {
    let _serial = SERIAL.lock().await;
    let mut redis = common::RedisServer::start();
    let server = common::TestServer::start(config(&redis.url()), Clock::Redis).await;
    let key = seed(&server, "acme", 100).await;
    let fresh_key = seed(&server, "other", 100).await;
    // Caches acme's identity (a key enters the cache on its second miss).
    for _ in 0..2 {
        let (r, _) = check(&server, "/strict", &key).await;
        assert_eq!(r.status, 200, "{r:?}");
    }

    // Hung Redis (SIGSTOP): nothing answers.
    redis.pause();
    let (r, took) = check(&server, "/strict", &key).await;
    println!("fail_closed answer with Redis hung took {took:?} (Redis call deadline 1 s)");
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.json()["error"], "unavailable");
    assert_eq!(envoy_check(&server, "/strict", &key).await, 503);
    assert_eq!(envoy_check(&server, "/lenient", &key).await, 200);
    let (r, took) = check(&server, "/lenient", &key).await;
    println!("fail_open answer with Redis hung took {took:?}");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-tollgate-degraded"), Some("1"));
    assert_eq!(
        r.header("x-tollgate-account"),
        Some("acme"),
        "identity was cached"
    );
    assert_eq!(r.header("x-tollgate-operation"), Some("lenient"));
    assert_eq!(r.header("x-credits-remaining"), None);
    // A key this sidecar has not seen cannot be looked up: fail_open still allows it.
    let (r, _) = check(&server, "/lenient", &fresh_key).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-tollgate-degraded"), Some("1"));
    assert_eq!(r.header("x-tollgate-account"), None);
    let (r, _) = check(&server, "/strict", &fresh_key).await;
    assert_eq!(r.status, 503, "{r:?}");

    redis.resume();
    wait_allowed(&server, "/strict", &key).await;
    wait_allowed(&server, "/lenient", &fresh_key).await;

    // Redis gone (connection refused), then back empty: refused fast, then allowed again
    // once the account is granted and keyed anew, all without restarting tollgate.
    redis.kill();
    let (r, _) = check(&server, "/strict", &key).await;
    assert_eq!(r.status, 503, "{r:?}");
    let (r, _) = check(&server, "/lenient", &key).await;
    assert_eq!(
        (r.status, r.header("x-tollgate-degraded")),
        (200, Some("1"))
    );
    redis.restart();
    let deadline = Instant::now() + HANG_GUARD;
    let new_key = loop {
        let seeded = tokio::time::timeout(HANG_GUARD, async {
            let mut admin = server.admin().await;
            admin
                .grant(tollgate::api::pb::GrantRequest {
                    account_id: "fresh".into(),
                    amount: 10,
                    idempotency_key: "after-restart".into(),
                    ..Default::default()
                })
                .await?;
            admin
                .create_api_key(tollgate::api::pb::CreateApiKeyRequest {
                    account_id: "fresh".into(),
                    name: "after restart".into(),
                    ..Default::default()
                })
                .await
        })
        .await
        .expect("no hang");
        match seeded {
            Ok(out) => break out.into_inner().api_key,
            Err(status) => {
                assert!(
                    Instant::now() < deadline,
                    "redis never came back: {status:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    wait_allowed(&server, "/strict", &new_key).await;
    let (r, _) = check(&server, "/strict", &new_key).await;
    assert_eq!(r.header("x-tollgate-account"), Some("fresh"));
}

/// DESIGN.md: a check never hangs past its deadline. With Redis hung (SIGSTOP: the
/// connection stays open, nothing answers) and a Redis call deadline far longer than the
/// check's, the answer comes from the check deadline: fail_closed 503, fail_open allowed
/// degraded, for a known key and for one the sidecar has not cached, all long before the
/// Redis call could have given up. Bounded against the call deadline, not the clock: a
/// busy machine may be seconds late, never the call deadline late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_is_answered_at_the_check_deadline_not_the_call_deadline() {
    const CHECK_DEADLINE: Duration = Duration::from_secs(1);
    // The longest a Redis call may be given (config.rs: REDIS_CALL_TIMEOUT_MS_MAX).
    const CALL_DEADLINE: Duration = Duration::from_secs(10);
    // Well before the call deadline: a check answered past it was not cut at its own.
    const WELL_BEFORE_THE_CALL_DEADLINE: Duration = Duration::from_secs(7);
    let _serial = SERIAL.lock().await;
    let redis = common::RedisServer::start();
    let mut config = config(&redis.url());
    config.redis.call_timeout_ms = CALL_DEADLINE.as_millis() as u64;
    config.gateway.check_timeout_ms = CHECK_DEADLINE.as_millis() as u64;
    let server = common::TestServer::start(config, Clock::Redis).await;
    let key = seed(&server, "acme", 100).await;
    let fresh_key = seed(&server, "other", 100).await;
    // Caches acme's identity (a key enters the cache on its second miss; a check a busy
    // machine took past the 1 s deadline is tried again).
    for _ in 0..2 {
        wait_allowed(&server, "/strict", &key).await;
    }

    redis.pause();
    for (path, key, status, degraded) in [
        ("/strict", &key, 503, None),
        ("/strict", &fresh_key, 503, None),
        ("/lenient", &key, 200, Some("1")),
        ("/lenient", &fresh_key, 200, Some("1")),
    ] {
        let (r, took) = check(&server, path, key).await;
        println!("{path} with Redis hung answered {} in {took:?} (check deadline {CHECK_DEADLINE:?}, Redis call deadline {CALL_DEADLINE:?})", r.status);
        assert_eq!(
            (r.status, r.header("x-tollgate-degraded")),
            (status, degraded),
            "{path}: {r:?}"
        );
        assert!(
            took < WELL_BEFORE_THE_CALL_DEADLINE,
            "{path} answered in {took:?}: not at the {CHECK_DEADLINE:?} check deadline \
             but at the {CALL_DEADLINE:?} Redis call deadline"
        );
    }
    let started = Instant::now();
    let code = envoy_check(&server, "/strict", &key).await;
    let took = started.elapsed();
    assert_eq!(code, 503);
    assert!(
        took < WELL_BEFORE_THE_CALL_DEADLINE,
        "Envoy's Check answered in {took:?}"
    );
    redis.resume();
    wait_allowed(&server, "/strict", &key).await;
    server.stop().await;
}

/// A counter's value on the server's `/metrics` (0 when absent).
async fn counter(server: &common::TestServer, series: &str) -> f64 {
    let (_, text) = common::http_get(server.http_addr, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The spool's counters: written, and replayed charged, duplicate, refused.
async fn spool_counters(server: &common::TestServer) -> [f64; 4] {
    let replayed = |result: &str| format!("tollgate_spool_replayed_total{{result=\"{result}\"}}");
    let series = [
        "tollgate_spool_written_total".to_owned(),
        replayed("charged"),
        replayed("duplicate"),
        replayed("refused"),
    ];
    let mut values = [0.0; 4];
    for (v, s) in values.iter_mut().zip(&series) {
        *v = counter(server, s).await;
    }
    values
}

async fn assert_degraded(server: &common::TestServer, key: &str, request_id: Option<&str>) {
    let (r, _) = check_as(server, "/lenient", key, request_id).await;
    assert_eq!(
        (r.status, r.header("x-tollgate-degraded")),
        (200, Some("1")),
        "{r:?}"
    );
}

/// redis-server arguments for a Redis that keeps its data across a restart (every write
/// in its append-only file before it answers), in a directory of its own.
fn aof_args() -> Vec<String> {
    let dir = common::temp_path("aof");
    std::fs::create_dir_all(&dir).expect("aof dir");
    ["--appendonly", "yes", "--appendfsync", "always", "--dir"]
        .into_iter()
        .map(str::to_owned)
        .chain([dir.display().to_string()])
        .collect()
}

/// DESIGN.md's failure policy: a fail_open check is allowed while Redis is down "and the
/// charge is recorded locally to be applied when Redis returns". Charges recorded while
/// Redis was gone are applied by the next tollgate process (the spool outlives a
/// restart), each once (a retried request id once in all), never beyond the balance;
/// a charge that reached a hung Redis anyway is not taken again by the replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_charges_are_spooled_and_applied_once_when_redis_returns() {
    let _serial = SERIAL.lock().await;
    let aof = aof_args();
    let aof: Vec<&str> = aof.iter().map(String::as_str).collect();
    let mut redis = common::RedisServer::start_with(&aof);
    let mut config = config(&redis.url());
    // "A retry of the same request" below is one charge.
    config.gateway.request_id_replay = true;
    let spool = std::path::PathBuf::from(&config.gateway.spool_path);
    let server = common::TestServer::start(config.clone(), Clock::Redis).await;
    let key = seed(&server, "acme", 100).await;
    let other_key = seed(&server, "other", 100).await;
    let poor_key = seed(&server, "poor", 2).await;
    let before = spool_counters(&server).await;
    let since = |now: [f64; 4]| -> [f64; 4] { std::array::from_fn(|i| now[i] - before[i]) };
    // Caches acme's and poor's identities (other's key stays unknown to this process).
    for k in [&key, &poor_key] {
        let (r, _) = check(&server, "/strict", k).await;
        assert_eq!(r.status, 200, "{r:?}");
    }

    // Redis gone: nothing reaches it. Eight charges are allowed and spooled.
    redis.kill();
    assert_degraded(&server, &key, Some("r-1")).await;
    assert_degraded(&server, &key, Some("r-1")).await; // a retry of the same request
    assert_degraded(&server, &key, None).await;
    assert_eq!(envoy_check(&server, "/lenient", &key).await, 200);
    assert_degraded(&server, &other_key, None).await; // by key: resolved on replay
    for _ in 0..3 {
        assert_degraded(&server, &poor_key, None).await; // one credit left for three
    }
    // The replayer moves the file aside each second and keeps what Redis did not take.
    let mut replay = spool.clone().into_os_string();
    replay.push(".replay");
    let replay = std::path::PathBuf::from(replay);
    common::eventually(HANG_GUARD, "eight spooled charges", || async {
        let lines =
            |p: &std::path::Path| std::fs::read_to_string(p).map_or(0, |t| t.lines().count());
        (lines(&spool) + lines(&replay) == 8).then_some(())
    })
    .await;
    common::eventually(HANG_GUARD, "eight written", || async {
        (since(spool_counters(&server).await)[0] == 8.0).then_some(())
    })
    .await;
    server.stop().await;

    // Redis back with its data; a new tollgate process replays what the last one spooled.
    redis.restart_with(&aof);
    let server = common::TestServer::start(config, Clock::Redis).await;
    wait_balance(&server, "acme", (96, 0, 4)).await;
    wait_balance(&server, "other", (99, 0, 1)).await;
    wait_balance(&server, "poor", (0, 0, 2)).await;
    common::eventually(HANG_GUARD, "the spool emptied", || async {
        (!spool.exists() && !replay.exists()).then_some(())
    })
    .await;
    // Once replayed, each exactly once (the waits above stop at the first match).
    assert_eq!(balance(&server, "acme").await, (96, 0, 4));
    assert_eq!(balance(&server, "other").await, (99, 0, 1));
    assert_eq!(balance(&server, "poor").await, (0, 0, 2));
    // written, charged, duplicate (the retried request id), refused (poor's last two).
    assert_eq!(since(spool_counters(&server).await), [8.0, 5.0, 1.0, 2.0]);

    // Redis hung: the charge times out and is allowed and spooled; if it was sent, Redis
    // runs it when it wakes, and the replay finds it done under the same idempotency key.
    redis.pause();
    assert_degraded(&server, &key, Some("r-2")).await;
    common::eventually(HANG_GUARD, "the hung charge spooled", || async {
        (spool.exists() || replay.exists()).then_some(())
    })
    .await;
    redis.resume();
    common::eventually(HANG_GUARD, "the hung charge replayed", || async {
        (!spool.exists() && !replay.exists()).then_some(())
    })
    .await;
    let [written, charged, duplicate, refused] = since(spool_counters(&server).await);
    // Found done by the replay if the hung Redis ran it on waking, else charged by it.
    assert_eq!((written, charged + duplicate, refused), (9.0, 7.0, 2.0));
    wait_balance(&server, "acme", (95, 0, 5)).await;
    // Nothing more arrives late.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    wait_balance(&server, "acme", (95, 0, 5)).await;
    server.stop().await;
}

/// A spooled charge the replay cannot apply yet (here its shard's outbox is full:
/// OUTBOX_FULL) is spooled again behind the others, round after round:
/// `tollgate_spool_written_total` counts fail_open charges, each once (it used to count
/// every re-spool as a new write), and none of them is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_spooled_again_is_counted_as_written_once() {
    let _serial = SERIAL.lock().await;
    let aof = aof_args();
    let aof: Vec<&str> = aof.iter().map(String::as_str).collect();
    let mut redis = common::RedisServer::start_with(&aof);
    let mut config = config(&redis.url());
    // The seed's grant fills its shard's outbox (no settler here): a debit there answers
    // OUTBOX_FULL, which the replay keeps for later.
    config.ledger.outbox_events_max = 1;
    let server = common::TestServer::start(config, Clock::Redis).await;
    let key = seed(&server, "full", 100).await;
    let counters = || async {
        [
            counter(&server, "tollgate_spool_written_total").await,
            counter(&server, "tollgate_spool_replayed_total{result=\"later\"}").await,
            counter(&server, "tollgate_spool_dropped_total").await,
        ]
    };
    let before = counters().await;

    // Redis gone: two charges allowed and spooled.
    redis.kill();
    assert_degraded(&server, &key, None).await;
    assert_degraded(&server, &key, None).await;
    // Back with its data (the full outbox too): each replay round (every second) finds
    // them refused for now and spools them again.
    redis.restart_with(&aof);
    let [written, later, dropped] = common::eventually(
        HANG_GUARD * 3,
        "three replay rounds spooling both charges again",
        || async {
            let now = counters().await;
            let since: [f64; 3] = std::array::from_fn(|i| now[i] - before[i]);
            (since[1] >= 6.0).then_some(since)
        },
    )
    .await;
    assert_eq!(
        (written, dropped),
        (2.0, 0.0),
        "two fail_open charges written once each ({later} re-spooled)"
    );
    assert_eq!(balance(&server, "full").await, (100, 0, 0));
    server.stop().await;
}

/// The key id in an API key (`<prefix><key id>_<secret>`), for RevokeApiKey.
async fn key_id(server: &common::TestServer, account: &str) -> String {
    let listed = server
        .admin()
        .await
        .list_api_keys(pb::ListApiKeysRequest {
            account_id: account.into(),
        })
        .await
        .expect("list keys")
        .into_inner()
        .keys;
    assert_eq!(listed.len(), 1, "{listed:?}");
    listed[0].key_id.clone()
}

/// Revokes through `server`, retrying while its Redis connection comes back.
async fn revoke(server: &common::TestServer, key_id: &str) {
    common::eventually(HANG_GUARD, "the key revoked", || async {
        let mut admin = server.admin().await;
        admin
            .revoke_api_key(pb::RevokeApiKeyRequest {
                key_id: key_id.to_owned(),
            })
            .await
            .ok()
    })
    .await;
}

/// A spooled charge is the key owner's only if the key was good when fail_open allowed
/// the call. A sidecar whose identity cache has not heard of a revocation another sidecar
/// made still allows and spools the key's calls while Redis is down: the replay drops
/// them. A key revoked after its spooled call pays for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spooled_charge_of_a_key_revoked_before_the_call_is_dropped() {
    let _serial = SERIAL.lock().await;
    let aof = aof_args();
    let aof: Vec<&str> = aof.iter().map(String::as_str).collect();
    let mut redis = common::RedisServer::start_with(&aof);
    let config = config(&redis.url());
    let spool = std::path::PathBuf::from(&config.gateway.spool_path);
    let server = common::TestServer::start(config.clone(), Clock::Redis).await;
    // Another sidecar on the same Redis and store, with a spool of its own.
    let mut other_config = config.clone();
    other_config.gateway.spool_path = common::test_config(&redis.url()).gateway.spool_path;
    let other = common::TestServer::start(other_config, Clock::Redis).await;
    let gone = seed(&server, "gone", 100).await;
    let late = seed(&server, "late", 100).await;
    let before = spool_counters(&server).await;
    let since = |now: [f64; 4]| -> [f64; 4] { std::array::from_fn(|i| now[i] - before[i]) };
    // This sidecar caches both identities (for an hour; a key enters the cache on its
    // second miss).
    for k in [&gone, &late, &gone, &late, &gone, &late] {
        let (r, _) = check(&server, "/strict", k).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    let (gone_before, late_before) = (
        balance(&server, "gone").await,
        balance(&server, "late").await,
    );
    // The other sidecar revokes gone's key: this one's cache still says it is good.
    revoke(&other, &key_id(&other, "gone").await).await;
    let late_id = key_id(&other, "late").await;

    redis.kill();
    assert_degraded(&server, &gone, None).await;
    assert_degraded(&server, &late, None).await;
    common::eventually(HANG_GUARD, "two written", || async {
        (since(spool_counters(&server).await)[0] == 2.0).then_some(())
    })
    .await;
    server.stop().await;

    // Redis back; late's key is revoked after its call, before the replay.
    redis.restart_with(&aof);
    revoke(&other, &late_id).await;
    other.stop().await;
    let server = common::TestServer::start(config, Clock::Redis).await;
    let mut replay = spool.clone().into_os_string();
    replay.push(".replay");
    let replay = std::path::PathBuf::from(replay);
    common::eventually(HANG_GUARD, "the spool emptied", || async {
        (!spool.exists() && !replay.exists()).then_some(())
    })
    .await;
    let (available, held, used) = late_before;
    wait_balance(&server, "late", (available - 1, held, used + 1)).await;
    assert_eq!(balance(&server, "gone").await, gone_before);
    // written, charged (late's), duplicate, refused (gone's).
    assert_eq!(since(spool_counters(&server).await), [2.0, 1.0, 0.0, 1.0]);
    server.stop().await;
}

/// A key this sidecar last found revoked or unknown is refused as such while Redis is
/// hung, however old that answer (an expired identity-cache entry), on fail_open routes
/// too: a charge (the keyed debit script's miss), a free check (the identity lookup),
/// and a key revoked through this sidecar (cached as revoked, not forgotten). README: a
/// revoked key stops working within `identity_cache_ttl_ms`, an unknown key never
/// becomes valid. A key last found active is still let through degraded. Here each
/// check of the outage ends at the Redis call's deadline (1 s, the check's is 2 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_last_known_revoked_or_unknown_stay_refused_while_redis_is_hung() {
    stale_refusals(|_| {}).await;
}

/// As above, with each check of the outage ended by the check's deadline (1 s), long
/// before the Redis call's (10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_last_known_revoked_or_unknown_stay_refused_past_the_check_deadline() {
    stale_refusals(|config| {
        config.redis.call_timeout_ms = 10_000;
        config.gateway.check_timeout_ms = 1_000;
    })
    .await;
}

async fn stale_refusals(deadlines: impl FnOnce(&mut Config)) {
    const HITS: &str = "tollgate_identity_cache_hits_total";
    const MISSES: &str = "tollgate_identity_cache_misses_total";
    const TTL: Duration = Duration::from_secs(2);
    let _serial = SERIAL.lock().await;
    let redis = common::RedisServer::start();
    let mut config = config(&redis.url());
    config.gateway.identity_cache_ttl_ms = TTL.as_millis() as u64;
    deadlines(&mut config);
    let server = common::TestServer::start(config, Clock::Redis).await;
    let good = seed(&server, "good", 100).await;
    let gone = seed(&server, "gone", 100).await;
    let local = seed(&server, "local", 100).await;
    // A made-up secret for a key id that exists: an unknown key.
    let made_up = format!("{}{}", &good[..good.len() - 64], "0".repeat(64));
    // Another sidecar revokes gone's key, this one local's.
    let elsewhere = KeyStore::new(
        server.ledger.redis().clone(),
        server.ledger.shards().clone(),
        TTL,
        100,
        10,
    );
    elsewhere.load_scripts().await.expect("key scripts");
    elsewhere
        .revoke(&key_id(&server, "gone").await)
        .await
        .expect("revoke");
    revoke(&server, &key_id(&server, "local").await).await;
    // This sidecar learns the others from Redis, each checked until its cache answers for
    // it (a key enters on its second miss, the third when the doorkeeper's clearing falls
    // between; a check a busy machine took past its deadline is tried again).
    for (key, status) in [(&good, 200), (&gone, 403), (&made_up, 401)] {
        common::eventually(HANG_GUARD, "the key cached", || async {
            let hits = counter(&server, HITS).await;
            let (r, _) = check(&server, "/lenient", key).await;
            if r.header("x-tollgate-degraded").is_some() {
                return None;
            }
            assert_eq!(r.status, status, "{r:?}");
            (counter(&server, HITS).await > hits).then_some(())
        })
        .await;
    }
    let refused = [
        ("gone", &gone, 403, "revoked_api_key"),
        ("local", &local, 403, "revoked_api_key"),
        ("made_up", &made_up, 401, "unknown_api_key"),
    ];

    // Hung Redis (SIGSTOP); every answer the cache holds expires.
    redis.pause();
    tokio::time::sleep(2 * TTL).await;
    let misses = counter(&server, MISSES).await;
    let mut checks = 0.0;
    for path in ["/lenient", "/peek", "/strict"] {
        for (name, key, status, error) in refused {
            let (r, _) = check(&server, path, key).await;
            checks += 1.0;
            assert_eq!(r.status, status, "{name} on {path}: {r:?}");
            assert_eq!(r.json()["error"], error, "{name} on {path}");
        }
    }
    // Only what the key last was decides: an active one follows the fail policy.
    assert_degraded(&server, &good, None).await;
    let (r, _) = check(&server, "/strict", &good).await;
    assert_eq!(r.status, 503, "{r:?}");
    checks += 2.0;
    assert_eq!(
        counter(&server, MISSES).await - misses,
        checks,
        "every check of the outage asked Redis (no fresh cache entry answered it)"
    );

    redis.resume();
    wait_allowed(&server, "/strict", &good).await;
    for (name, key, status, error) in refused {
        let (r, _) = check(&server, "/lenient", key).await;
        assert_eq!(r.status, status, "{name} after the outage: {r:?}");
        assert_eq!(r.json()["error"], error, "{name} after the outage");
    }
    server.stop().await;
}

/// A Redis that answers but refuses the call (here a replica after a failover: READONLY;
/// likewise LOADING, BUSY, OOM, …) follows the failure policy like a Redis that is down:
/// 503 for fail_closed, allowed and spooled for fail_open — not a 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_refuses_writes_follows_the_failure_policy() {
    let _serial = SERIAL.lock().await;
    let redis = common::RedisServer::start();
    let server = common::TestServer::start(config(&redis.url()), Clock::Redis).await;
    let key = seed(&server, "acme", 100).await;
    for path in ["/strict", "/lenient"] {
        let (r, _) = check(&server, path, &key).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    // It keeps its data and refuses writes.
    redis.read_only();
    let (r, _) = check(&server, "/strict", &key).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_degraded(&server, &key, None).await;

    redis.writable();
    let (r, _) = check(&server, "/strict", &key).await;
    assert_eq!(r.status, 200, "{r:?}");
    // Two charges before, one after, and the spooled one once applied.
    wait_balance(&server, "acme", (96, 0, 4)).await;
}

/// The state of the hold the Check answer's `metadata` names, read from Redis as it is:
/// `a` while open (src/ledger/lua/authorize.lua).
fn hold_state(
    server: &common::TestServer,
    con: &mut redis::Connection,
    metadata: &envoy_types::pb::google::protobuf::Struct,
) -> String {
    use envoy_types::pb::google::protobuf::value::Kind;
    let Some(Kind::StringValue(hold_id)) = metadata
        .fields
        .get("tollgate_hold_id")
        .and_then(|v| v.kind.as_ref())
    else {
        panic!("no hold id in {metadata:?}");
    };
    let shards = server.ledger.shards();
    let shard = shards.of_hold_id(hold_id).expect("a hold id");
    redis::cmd("HGET")
        .arg(format!("{}:h:{hold_id}", shards.tag(shard)))
        .arg("s")
        .query(con)
        .expect("hget")
}

/// Envoy's access-log entries arrive while Redis refuses writes (a replica after a
/// failover: READONLY; likewise a call timeout, a reconnect, LOADING): the capture and the
/// release they ask for are retried off the stream (which is answered at once) and
/// applied when Redis takes writes again, long before the holds' deadline (60 s,
/// `on_expiry = "release"`). They used to be dropped with a warning: the call the API
/// answered 200 was then free at the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_settlements_that_meet_a_redis_outage_are_retried_when_it_returns() {
    let redis = common::RedisServer::start();
    let server = common::TestServer::start(esign_config(&redis.url()), Clock::Redis).await;
    let key = seed(&server, "acme", 200).await;
    // ocr.pages: hold 50 for 60 s; capture 2 per page on 2xx, release otherwise.
    let answered = ocr_hold(server.channel().await, &key, "ocr-1").await;
    let failed = ocr_hold(server.channel().await, &key, "ocr-2").await;
    assert_eq!(balance(&server, "acme").await, (100, 100, 0));

    let mut con = redis.client().get_connection().expect("redis");
    redis.read_only();
    let message = access_log_message(vec![
        access_log_entry(&answered, 200, "4"),
        access_log_entry(&failed, 502, "0"),
    ]);
    let mut logs = AccessLogServiceClient::new(server.channel().await);
    tokio::time::timeout(
        HANG_GUARD,
        logs.stream_access_logs(tokio_stream::iter(vec![message])),
    )
    .await
    .expect("the stream is answered while Redis refuses writes")
    .expect("stream");
    // Both settlements met READONLY: the holds are still open (read from the replica as
    // it is; the ledger's own reads write too: they expire what is due).
    for metadata in [&answered, &failed] {
        assert_eq!(hold_state(&server, &mut con, metadata), "a");
    }
    // A few retries meet it too.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for metadata in [&answered, &failed] {
        assert_eq!(hold_state(&server, &mut con, metadata), "a");
    }

    redis.writable();
    // 4 pages × 2 captured, the failed call's hold released: within wait_balance's 30 s,
    // half the holds' 60 s ttl.
    wait_balance(&server, "acme", (192, 0, 8)).await;
    let (_, text) = common::http_get(server.http_addr, "/metrics").await;
    let retries = |result: &str| {
        common::prom::value(
            &text,
            "tollgate_access_log_retries_total",
            &[("result", result)],
        )
    };
    assert_eq!(retries("settled"), 2.0, "{text}");
    for result in ["hold_ended", "failed", "gave_up", "queue_full", "shutdown"] {
        assert_eq!(retries(result), 0.0, "{result}\n{text}");
    }
    server.stop().await;
}

/// A sidecar started while Redis holds writes (`CLIENT PAUSE WRITE`, as in a failover)
/// answers its checks by the fail policy at the check deadline: the scripts it loads at
/// start-up (FUNCTION LOAD, SCRIPT LOAD: writes, each given ten call deadlines) do not
/// keep it from serving until Redis takes writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_started_while_redis_holds_writes_answers_at_the_check_deadline() {
    const PAUSE: Duration = Duration::from_secs(30);
    let _serial = SERIAL.lock().await;
    let redis = common::RedisServer::start();
    // Seeded by another server, so the sidecar under test has served nothing yet.
    let seeder = common::TestServer::start(config(&redis.url()), Clock::Redis).await;
    let key = seed(&seeder, "acme", 100).await;
    seeder.stop().await;
    let mut admin = redis.client().get_connection().expect("redis");
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(PAUSE.as_millis() as u64)
        .arg("WRITE")
        .query(&mut admin)
        .expect("CLIENT PAUSE");
    let paused = Instant::now();
    let mut config = config(&redis.url());
    // The longest call deadline (config.rs: REDIS_CALL_TIMEOUT_MS_MAX): a script load
    // at start-up may then wait past the pause.
    config.redis.call_timeout_ms = 10_000;
    config.gateway.check_timeout_ms = 1_000;
    let server = common::TestServer::start(config, Clock::Redis).await;
    for (path, status, degraded) in [("/strict", 503, None), ("/lenient", 200, Some("1"))] {
        let (r, took) = check(&server, path, &key).await;
        println!("{path} with Redis holding writes: {} in {took:?}", r.status);
        assert_eq!(
            (r.status, r.header("x-tollgate-degraded")),
            (status, degraded),
            "{path}: {r:?}"
        );
    }
    // Well before the pause ends: the answers came from the check deadline.
    assert!(
        paused.elapsed() < PAUSE / 2,
        "answered {:?} after Redis began holding writes",
        paused.elapsed()
    );
    let _: () = redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query(&mut admin)
        .expect("CLIENT UNPAUSE");
    wait_allowed(&server, "/strict", &key).await;
    server.stop().await;
}
