//! Redis unreachable: calls answer UNAVAILABLE within the deadline (never hang), /readyz
//! lists Redis as degraded (the pod stays ready: its free and fail_open routes still
//! work), and everything works again when Redis is back, without a restart.

mod common;

use std::time::Duration;

use tollgate::api::pb;
use tollgate::ledger::Clock;

/// Far above the configured deadline: proves a call does not hang (how soon it answers is
/// bounded in `a_hung_redis_is_given_up_on_at_the_call_deadline`).
const HANG_GUARD: Duration = Duration::from_secs(20);

fn debit(key: &str) -> pb::DebitRequest {
    pb::DebitRequest {
        account_id: "alice".into(),
        amount: 1,
        idempotency_key: key.into(),
        ..Default::default()
    }
}

/// Polls `/readyz` (each answer within HANG_GUARD: readiness never hangs) until it
/// answers `want`, with Redis listed as degraded or not: it answers from the health
/// watcher's latest round, which notices a change within HEALTH_CHECK_INTERVAL plus a
/// round's own time.
async fn wait_readyz(server: &common::TestServer, want: u16, redis_degraded: bool) {
    let deadline = tokio::time::Instant::now() + HANG_GUARD;
    loop {
        let (code, body) = tokio::time::timeout(HANG_GUARD, readyz(server))
            .await
            .expect("readiness must not hang");
        let json: serde_json::Value = serde_json::from_str(&body).expect("readyz JSON body");
        let degraded = json["degraded"]
            .as_array()
            .is_some_and(|d| d.iter().any(|c| c == "redis"));
        if code == want && degraded == redis_degraded {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz still {code} {body}, not {want} with redis degraded: {redis_degraded}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `/readyz`'s status and body, over a connection of its own.
async fn readyz(server: &common::TestServer) -> (u16, String) {
    get(server, "/readyz").await
}

/// A GET's status and body, over a connection of its own.
async fn get(server: &common::TestServer, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(server.http_addr)
        .await
        .expect("http");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut text = String::new();
    s.read_to_string(&mut text).await.expect("read");
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (code, body)
}

/// A server whose Redis calls have this deadline, with alice granted 10 credits; its admin
/// and metering clients.
async fn alice_with_10(
    redis: &common::RedisServer,
    call_deadline: Duration,
) -> (
    common::TestServer,
    pb::admin_client::AdminClient<common::AuthChannel>,
    pb::metering_client::MeteringClient<common::AuthChannel>,
) {
    let mut config = common::test_config(&redis.url());
    config.redis.call_timeout_ms = call_deadline.as_millis() as u64;
    let server = common::TestServer::start(config, Clock::Redis).await;
    let mut admin = server.admin().await;
    let metering = server.metering().await;
    admin
        .grant(pb::GrantRequest {
            account_id: "alice".into(),
            amount: 10,
            idempotency_key: "g1".into(),
            ..Default::default()
        })
        .await
        .expect("grant");
    (server, admin, metering)
}

/// A hung Redis (SIGSTOP: the connection stays open, nothing answers) is given up on at
/// the call deadline: UNAVAILABLE, long before HANG_GUARD, and readiness says so; resumed,
/// calls succeed again. Bounded generously (a busy machine may be seconds late), against
/// a hang, not against the clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_is_given_up_on_at_the_call_deadline() {
    const CALL_DEADLINE: Duration = Duration::from_secs(1);
    const WELL_PAST_THE_DEADLINE: Duration = Duration::from_secs(8);
    let redis = common::RedisServer::start();
    let (server, _admin, mut metering) = alice_with_10(&redis, CALL_DEADLINE).await;

    redis.pause();
    let started = std::time::Instant::now();
    let status = tokio::time::timeout(HANG_GUARD, metering.debit(debit("d1")))
        .await
        .expect("the call must not hang")
        .expect_err("redis is hung");
    let took = started.elapsed();
    println!(
        "debit with Redis hung: {:?} after {took:?} (call deadline {CALL_DEADLINE:?})",
        status.code()
    );
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        took < WELL_PAST_THE_DEADLINE,
        "the debit answered after {took:?}, not at its {CALL_DEADLINE:?} deadline"
    );
    wait_readyz(&server, 200, true).await;

    redis.resume();
    // d1 may have run once Redis woke up (its answer was lost): a retry of it replays,
    // a new debit is charged once.
    let deadline = tokio::time::Instant::now() + HANG_GUARD;
    loop {
        match metering.debit(debit("d2")).await {
            Ok(_) => break,
            Err(s) if s.code() == tonic::Code::Unavailable => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no recovery after the resume: {s:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => panic!("no recovery: {s:?}"),
        }
    }
    metering.debit(debit("d1")).await.expect("d1 again");
    let balance = metering
        .get_balance(pb::GetBalanceRequest {
            account_id: "alice".into(),
            ..Default::default()
        })
        .await
        .expect("balance")
        .into_inner();
    assert_eq!(
        balance.wallets[0].available, 8,
        "d1 and d2 each charged once"
    );
    server.stop().await;
}

/// A Redis that answers reads but refuses writes (here at `maxmemory` with `noeviction`:
/// OOM; a demoted primary's READONLY, MISCONF and NOREPLICAS alike) fails every charge:
/// /readyz lists `redis` as degraded (the pod stays ready) and `tollgate_redis_up` is 0,
/// as when it is unreachable. It used to look healthy: the checks only read. Once Redis
/// takes writes again, both recover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_refuses_writes_is_degraded_then_recovers() {
    let redis = common::RedisServer::start();
    let (server, _admin, mut metering) = alice_with_10(&redis, Duration::from_secs(1)).await;
    wait_readyz(&server, 200, false).await;
    let redis_up = |text: &str| common::prom::value(text, "tollgate_redis_up", &[]);
    assert_eq!(redis_up(&get(&server, "/metrics").await.1), 1.0);

    let mut con = redis.client().get_connection().expect("redis");
    let config = |con: &mut redis::Connection, name: &str, value: &str| {
        let () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(name)
            .arg(value)
            .query(con)
            .expect("CONFIG SET");
    };
    config(&mut con, "maxmemory-policy", "noeviction");
    config(&mut con, "maxmemory", "1");
    let status = tokio::time::timeout(HANG_GUARD, metering.debit(debit("d1")))
        .await
        .expect("the call must not hang")
        .expect_err("redis refuses writes");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    wait_readyz(&server, 200, true).await;
    let (_, body) = readyz(&server).await;
    assert!(body.contains("refuses writes"), "{body}");
    assert_eq!(redis_up(&get(&server, "/metrics").await.1), 0.0);

    config(&mut con, "maxmemory", "0");
    wait_readyz(&server, 200, false).await;
    assert_eq!(redis_up(&get(&server, "/metrics").await.1), 1.0);
    let out = metering
        .debit(debit("d2"))
        .await
        .expect("debit")
        .into_inner();
    assert_eq!(out.available, 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_within_deadline_then_recovers() {
    let mut redis = common::RedisServer::start();
    // Short enough to see a stopped Redis fail fast; long enough for a busy machine.
    let (server, mut admin, mut metering) = alice_with_10(&redis, Duration::from_secs(1)).await;
    wait_readyz(&server, 200, false).await;

    redis.kill();
    let status = tokio::time::timeout(HANG_GUARD, metering.debit(debit("d1")))
        .await
        .expect("the call must not hang")
        .expect_err("redis is down");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    wait_readyz(&server, 200, true).await;

    // Back, empty (no persistence): calls succeed again without restarting tollgate
    // (scripts are reloaded on NOSCRIPT).
    redis.restart();
    let deadline = tokio::time::Instant::now() + HANG_GUARD;
    loop {
        let granted = admin
            .grant(pb::GrantRequest {
                account_id: "alice".into(),
                amount: 5,
                idempotency_key: "g2".into(),
                ..Default::default()
            })
            .await;
        match granted {
            Ok(out) => {
                assert_eq!(out.into_inner().available, 5);
                break;
            }
            Err(s)
                if s.code() == tonic::Code::Unavailable
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => panic!("no recovery: {s:?}"),
        }
    }
    let out = metering
        .debit(debit("d2"))
        .await
        .expect("debit")
        .into_inner();
    assert_eq!(out.available, 4);
    // Every shard (not only alice's) is re-initialized by the background retry, so
    // readiness returns within a deadline rather than at the same instant.
    wait_readyz(&server, 200, false).await;
}
