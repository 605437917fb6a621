//! Health: `grpc.health.v1.Health` and gRPC reflection answer a tonic client; `/readyz`
//! lists a stopped Redis as degraded and stays ready (scripts reloaded into the new,
//! empty Redis by the readiness check itself when it returns), turns not-ready when Redis
//! answers but lost the ledger's data, and gRPC health follows it.

mod common;

use std::time::Duration;

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

use tollgate::api::pb;
use tollgate::ledger::Clock;

/// Generous: the waits only bound polling, nothing is timed.
const DEADLINE: Duration = Duration::from_secs(60);
const SERVICES: [&str; 4] = [
    "",
    "tollgate.v1.Metering",
    "tollgate.v1.Admin",
    "envoy.service.auth.v3.Authorization",
];

async fn health(server: &common::TestServer, service: &str) -> Option<ServingStatus> {
    let mut client = HealthClient::new(server.channel().await);
    let answer = client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .ok()?
        .into_inner();
    ServingStatus::try_from(answer.status).ok()
}

async fn wait_health(server: &common::TestServer, want: ServingStatus) {
    for service in SERVICES {
        common::eventually(DEADLINE, &format!("{service:?} to be {want:?}"), || async {
            (health(server, service).await == Some(want)).then_some(())
        })
        .await;
    }
}

async fn reflect(server: &common::TestServer, request: MessageRequest) -> MessageResponse {
    let mut client = ServerReflectionClient::new(server.channel().await);
    let requests = tokio_stream::iter(vec![ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    }]);
    let mut answers = client
        .server_reflection_info(requests)
        .await
        .expect("reflection")
        .into_inner();
    answers
        .message()
        .await
        .expect("reflection answer")
        .and_then(|a| a.message_response)
        .expect("a response")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_and_reflection_answer() {
    let redis = common::RedisServer::start();
    let server = common::TestServer::start(common::test_config(&redis.url()), Clock::Redis).await;
    wait_health(&server, ServingStatus::Serving).await;
    // No token needed for health and reflection (probes and tools have none).
    let unknown = HealthClient::new(server.channel().await)
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .expect_err("unknown service");
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    let MessageResponse::ListServicesResponse(list) =
        reflect(&server, MessageRequest::ListServices(String::new())).await
    else {
        panic!("not a service list");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    // Exactly what README's Health section says reflection lists: the Envoy services are
    // served but not listed (envoy-types ships generated code without descriptors).
    assert_eq!(
        names,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "tollgate.v1.Admin",
            "tollgate.v1.Metering",
        ],
    );
    let missing = ServerReflectionClient::new(server.channel().await)
        .server_reflection_info(tokio_stream::iter(vec![ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "envoy.service.auth.v3.Authorization".into(),
            )),
        }]))
        .await
        .expect("reflection")
        .into_inner()
        .message()
        .await;
    assert!(
        matches!(&missing, Err(s) if s.code() == tonic::Code::NotFound),
        "a descriptor for envoy.service.auth.v3.Authorization (update README): {missing:?}"
    );
    let MessageResponse::FileDescriptorResponse(files) = reflect(
        &server,
        MessageRequest::FileContainingSymbol("tollgate.v1.Admin".into()),
    )
    .await
    else {
        panic!("no descriptor for tollgate.v1.Admin");
    };
    assert!(!files.file_descriptor_proto.is_empty());
    server.stop().await;
}

/// Every HTTP error is JSON, also for a path no route serves and a method a route does
/// not take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_and_methods_answer_json() {
    let redis = common::RedisServer::start();
    let server = common::TestServer::start(common::test_config(&redis.url()), Clock::Redis).await;
    let (code, body) = common::http_get(server.http_addr, "/v1/nothing-here").await;
    assert_eq!(code, 404, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(json["error"], "not_found", "{body}");
    // The hold settlement routes take POST only.
    let (code, body) = common::http_get(server.http_addr, "/v1/holds/h1-1/capture").await;
    assert_eq!(code, 405, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(json["error"], "method_not_allowed", "{body}");
    server.stop().await;
}

/// `tollgate settle` (a settler pod) exports `tollgate_ready` as a serving pod does (the
/// chart's not-ready alert reads it) and answers unknown paths and methods with JSON too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_settle_command_exports_readiness_and_answers_json() {
    let redis = common::RedisServer::start();
    // Initializes the shards, as the serving pods do; a settler alone never does.
    let _ledger = common::ledger(&redis, Clock::Redis);
    let pg = common::PgDatabase::create().await;
    // On a port picked free (again if another process took it first): the probe below
    // counts only once the settler itself listens there.
    let listening = common::spawn_listening(
        1,
        DEADLINE,
        |ports| {
            let mut cmd = common::tollgate();
            cmd.args(["settle", "--redis-url", &redis.url(), "--store", &pg.url])
                .arg(format!("--http-addr=127.0.0.1:{}", ports[0]))
                .stdout(std::process::Stdio::null());
            cmd
        },
        |ports| async move {
            let addr: std::net::SocketAddr =
                format!("127.0.0.1:{}", ports[0]).parse().expect("addr");
            let (code, text) = common::http_get(addr, "/metrics").await;
            code == 200 && common::prom::value(&text, "tollgate_ready", &[]) == 1.0
        },
    )
    .await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", listening.ports[0])
        .parse()
        .expect("addr");
    let (code, body) = common::http_get(addr, "/v1/nothing-here").await;
    assert_eq!(code, 404, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(json["error"], "not_found", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_redis_and_reloads_scripts() {
    let mut redis = common::RedisServer::start();
    let mut config = common::test_config(&redis.url());
    // Short enough to see a stopped Redis fail fast; long enough for a busy machine.
    config.redis.call_timeout_ms = 1_000;
    let server = common::TestServer::start(config, Clock::Redis).await;
    let ready = || async {
        let (code, body) = common::http_get(server.http_addr, "/readyz").await;
        let json: serde_json::Value = serde_json::from_str(&body).expect("readyz JSON body");
        (code, json)
    };
    let (code, body) = ready().await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["checks"]["scripts"], "ok", "{body}");
    assert_eq!(body["checks"]["lua_numbers"], "ok", "{body}");
    wait_health(&server, ServingStatus::Serving).await;

    // Scripts and functions flushed: readiness (the health watcher's checks, which
    // `/readyz` answers from) notices and loads them again.
    // The watcher may reload them between the flush and the look that follows it (it
    // checks every HEALTH_CHECK_INTERVAL): flush again until they are seen gone.
    let mut con = redis.client().get_connection().expect("redis");
    let mut flushes = 0;
    loop {
        for what in ["SCRIPT", "FUNCTION"] {
            let _: () = redis::cmd(what)
                .arg("FLUSH")
                .query(&mut con)
                .expect("flush");
        }
        flushes += 1;
        let (loaded, _) = server.ledger.check_scripts(false).await.expect("exists");
        if loaded == 0 {
            break;
        }
        assert!(flushes < 20, "the ledger's functions never seen gone");
    }
    // The health watcher's next round (every HEALTH_CHECK_INTERVAL) loads them again;
    // `/readyz` answers from its rounds.
    common::eventually(DEADLINE, "readiness to reload the scripts", || async {
        let (loaded, total) = server.ledger.check_scripts(false).await.expect("exists");
        (loaded == total).then_some(())
    })
    .await;
    let (code, body) = ready().await;
    assert_eq!(code, 200, "{body}");

    // Redis stopped: still ready (a serving pod keeps its free and fail_open routes in
    // traffic; every pod shares the Redis, so unreadying would take them all out), with
    // Redis and the scripts listed as degraded; gRPC health stays SERVING.
    redis.kill();
    let body = common::eventually(DEADLINE, "/readyz to list redis degraded", || async {
        let (code, body) = ready().await;
        assert_eq!(
            code, 200,
            "a Redis outage made a serving pod unready: {body}"
        );
        (body["degraded"] == serde_json::json!(["redis", "scripts"])).then_some(body)
    })
    .await;
    assert_eq!(body["ready"], true, "{body}");
    assert_eq!(body["failed"], serde_json::json!([]), "{body}");
    assert_ne!(body["checks"]["redis"], "ok", "{body}");
    wait_health(&server, ServingStatus::Serving).await;
    // A call meanwhile fails and is counted by script and kind.
    let mut metering = server.metering().await;
    let status = metering
        .debit(pb::DebitRequest {
            account_id: "alice".into(),
            amount: 1,
            idempotency_key: "down-1".into(),
            ..Default::default()
        })
        .await
        .expect_err("redis is down");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    let (_, text) = common::http_get(server.http_addr, "/metrics").await;
    let errors = common::prom::value(
        &text,
        "tollgate_redis_script_errors_total",
        &[("script", "debit")],
    );
    assert!(errors >= 1.0, "{text}");

    // Back (empty: no scripts, a new Redis for an empty store): nothing degraded, with
    // the scripts loaded by readiness.
    redis.restart();
    let body = common::eventually(DEADLINE, "/readyz to recover", || async {
        let (code, body) = ready().await;
        (code == 200 && body["degraded"] == serde_json::json!([])).then_some(body)
    })
    .await;
    assert_eq!(body["checks"]["redis"], "ok");
    assert_eq!(body["checks"]["scripts"], "ok");
    let (loaded, total) = server.ledger.check_scripts(false).await.expect("exists");
    assert_eq!(loaded, total);
    wait_health(&server, ServingStatus::Serving).await;
    server.stop().await;
}

/// A Redis that answers but lost the ledger's data (a shard whose events are in the store
/// has no epoch marker: DESIGN.md, "not ready" until `tollgate restore`) is a hard
/// readiness failure, unlike a Redis that cannot be reached: `/readyz` 503 naming
/// `ledger`, gRPC health NOT_SERVING.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_when_redis_lost_the_ledger() {
    let redis = common::RedisServer::start();
    let mut config = common::test_config(&redis.url());
    // A settler, so that the store holds alice's event: her shard is then lost, not new.
    config.settler.enabled = true;
    let store_url = config.store.url.clone();
    let server = common::TestServer::start(config, Clock::Redis).await;
    server
        .admin()
        .await
        .grant(pb::GrantRequest {
            account_id: "alice".into(),
            amount: 10,
            idempotency_key: "g1".into(),
            ..Default::default()
        })
        .await
        .expect("grant");
    let store = tollgate::settle::Store::connect_lazy(&store_url, 1).expect("store");
    common::eventually(DEADLINE, "the grant settled", || async {
        (store.count_events().await.ok()? >= 1).then_some(())
    })
    .await;
    wait_health(&server, ServingStatus::Serving).await;

    let mut con = redis.client().get_connection().expect("redis");
    let _: () = redis::cmd("FLUSHALL").query(&mut con).expect("flushall");
    let body = common::eventually(DEADLINE, "/readyz to fail on the lost ledger", || async {
        let (code, body) = common::http_get(server.http_addr, "/readyz").await;
        let json: serde_json::Value = serde_json::from_str(&body).expect("readyz JSON body");
        (code == 503).then_some(json)
    })
    .await;
    assert_eq!(body["ready"], false, "{body}");
    assert_eq!(body["failed"], serde_json::json!(["ledger"]), "{body}");
    assert_eq!(body["checks"]["redis"], "ok", "{body}");
    assert!(
        body["checks"]["ledger"]
            .as_str()
            .is_some_and(|s| s.contains("tollgate restore")),
        "{body}"
    );
    wait_health(&server, ServingStatus::NotServing).await;
    server.stop().await;
}

/// The commands `INFO commandstats` has counted, by name (`exists`, `function|list`).
fn command_calls(redis: &common::RedisServer) -> std::collections::HashMap<String, u64> {
    let mut con = redis.client().get_connection().expect("redis");
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut con)
        .expect("INFO commandstats");
    info.lines()
        .filter_map(|line| {
            let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = stats.split(',').find_map(|s| s.strip_prefix("calls="))?;
            Some((name.to_owned(), calls.parse().ok()?))
        })
        .collect()
}

/// `/readyz` answers from the health watcher's latest round: a flood of probes (it is
/// unauthenticated) costs Redis nothing. It used to run an `EXISTS` per shard and a
/// `FUNCTION LIST` for every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_asks_redis_nothing_per_request() {
    let redis = common::RedisServer::start();
    let server = common::TestServer::start(common::test_config(&redis.url()), Clock::Redis).await;
    common::eventually(DEADLINE, "ready", || async {
        (common::http_get(server.http_addr, "/readyz").await.0 == 200).then_some(())
    })
    .await;
    let requests = 200;
    let before = command_calls(&redis);
    let started = std::time::Instant::now();
    for _ in 0..requests {
        let (code, body) = common::http_get(server.http_addr, "/readyz").await;
        assert_eq!(code, 200, "{body}");
    }
    let elapsed = started.elapsed();
    let after = command_calls(&redis);
    let calls =
        |name: &str| after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0);
    // What the background tasks send meanwhile, rounded up: the health watcher a round
    // every HEALTH_CHECK_INTERVAL (an EXISTS per shard and a FUNCTION LIST), the shard
    // initializer an EXISTS per shard every INITIALIZE_RETRY.
    let rounds = |every: Duration| (elapsed.as_secs_f64() / every.as_secs_f64()).ceil() as u64 + 2;
    let watcher = rounds(tollgate::server::HEALTH_CHECK_INTERVAL);
    let initializer = rounds(tollgate::server::INITIALIZE_RETRY);
    let shards = u64::from(server.ledger.shards().count());
    assert!(
        calls("function|list") <= watcher,
        "{} FUNCTION LIST for {requests} /readyz in {elapsed:?}",
        calls("function|list")
    );
    assert!(
        calls("exists") <= shards * (watcher + initializer),
        "{} EXISTS for {requests} /readyz in {elapsed:?} ({shards} shards)",
        calls("exists")
    );
    server.stop().await;
}
