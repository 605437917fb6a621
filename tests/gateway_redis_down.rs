//! Redis stopped mid-test under gateway checks: fail_closed operations answer 503 within
//! the check deadline, fail_open ones allow with `x-tollgate-degraded: 1`; when Redis
//! returns, checks succeed again without restarting tollgate.

mod common;

use std::time::{Duration, Instant};

use common::gateways::{http, seed, HttpResponse};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse as CheckAnswer;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use tollgate::config::{Config, Overrides};
use tollgate::ledger::Clock;

/// Far above the configured deadline: the test only proves no check hangs.
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
[pricebook.operations.strict]
base = 1
fail_policy = "fail_closed"
[pricebook.operations.lenient]
base = 1
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
    config.settler = test.settler;
    // Deadlines a busy machine keeps before the outage; the test only shows that no check
    // outlives them (HANG_GUARD), not how short they are.
    config.redis.call_timeout_ms = 1_000;
    config.gateway.check_timeout_ms = 2_000;
    // The identity stays cached through the outage, however slowly the checks run.
    config.gateway.identity_cache_ttl_ms = 3_600_000;
    config
}

async fn check(server: &common::TestServer, path: &str, key: &str) -> (HttpResponse, Duration) {
    let started = Instant::now();
    let response = tokio::time::timeout(
        HANG_GUARD,
        http(
            server.http_addr,
            "GET",
            "/v1/forward-auth",
            &[
                ("x-forwarded-method", "POST"),
                ("x-forwarded-uri", path),
                ("x-api-key", key),
            ],
            "",
        ),
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
    let mut redis = common::RedisServer::start();
    let server = common::TestServer::start(config(&redis.url()), Clock::Redis).await;
    let key = seed(&server, "acme", 100).await;
    let fresh_key = seed(&server, "other", 100).await;
    // Caches acme's identity.
    let (r, _) = check(&server, "/strict", &key).await;
    assert_eq!(r.status, 200, "{r:?}");

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
