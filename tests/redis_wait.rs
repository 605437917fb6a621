//! `redis.wait_replicas`: every ledger write is followed by `WAIT` on the same connection,
//! so the answer comes only once a replica holds the write; a replica that does not answer
//! costs about `redis.wait_timeout_ms`, the write still answers (it is committed on the
//! primary) and `tollgate_redis_wait_short_total` counts it. Real redis-server primary and
//! replica; timings only bounded generously (busy 2-core machine).

mod common;

use std::time::{Duration, Instant};

use tollgate::api::pb;
use tollgate::ledger::Clock;

/// Far above every configured deadline: only proves a call does not hang.
const HANG_GUARD: Duration = Duration::from_secs(30);

/// The tests of this binary run one at a time: `tollgate_redis_wait_short_total` lives in
/// the process's one metrics recorder, which one test bumps on purpose and the other
/// expects unchanged.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn debit(key: &str) -> pb::DebitRequest {
    pb::DebitRequest {
        account_id: "alice".into(),
        amount: 1,
        idempotency_key: key.into(),
        ..Default::default()
    }
}

/// The wallet hash of alice's default wallet, as `redis` holds it (sorted field pairs).
fn wallet(redis: &common::RedisServer, ledger: &tollgate::ledger::Ledger) -> Vec<(String, String)> {
    let shard = ledger.shards().of_account("alice");
    let key = format!("{}:w:alice:default", ledger.shards().tag(shard));
    let mut con = redis.client().get_connection().expect("redis connection");
    let mut fields: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(&key)
        .query(&mut con)
        .expect("HGETALL");
    fields.sort();
    fields
}

fn replica_of(primary: &common::RedisServer) -> common::RedisServer {
    let port = primary.port.to_string();
    // A replica stores the RDB of its first sync in its directory: not the crate's.
    let dir = std::env::temp_dir().join(format!("tollgate-replica-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("replica dir");
    let dir = dir.display().to_string();
    let replica =
        common::RedisServer::start_with(&["--replicaof", "127.0.0.1", &port, "--dir", &dir]);
    // In sync: the replica's link is up and the primary counts it.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info = |r: &common::RedisServer| -> String {
            r.client()
                .get_connection()
                .ok()
                .and_then(|mut c| redis::cmd("INFO").arg("replication").query(&mut c).ok())
                .unwrap_or_default()
        };
        if info(&replica).contains("master_link_status:up")
            && info(primary).contains("connected_slaves:1")
        {
            return replica;
        }
        assert!(Instant::now() < deadline, "the replica never synced");
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn short_waits(server: &common::TestServer) -> f64 {
    let (code, body) = common::http_get(server.http_addr, "/metrics").await;
    assert_eq!(code, 200);
    common::prom::value(&body, "tollgate_redis_wait_short_total", &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_wait_for_the_replica() {
    let _serial = SERIAL.lock().await;
    let primary = common::RedisServer::start();
    let replica = replica_of(&primary);

    let mut config = common::test_config(&primary.url());
    config.redis.wait_replicas = 1;
    // Long enough that the paused replica below is waited for, not timed out.
    config.redis.wait_timeout_ms = 4_000;
    // No sweeps: they are writes too, and would take the WAITs this test looks at.
    config.ledger.sweep_interval_ms = 3_600_000;
    let server = common::TestServer::start(config, Clock::Redis).await;
    // The process's counter (the other test may have bumped it before this one ran).
    let shorts_before = short_waits(&server).await;
    let mut admin = server.admin().await;
    let mut metering = server.metering().await;
    admin
        .grant(pb::GrantRequest {
            account_id: "alice".into(),
            amount: 100,
            idempotency_key: "g1".into(),
            ..Default::default()
        })
        .await
        .expect("grant");

    // With the replica in sync: the replica holds the debit when its answer arrives.
    let before = wallet(&replica, &server.ledger);
    assert!(
        !before.is_empty(),
        "the grant is on the replica (WAIT after it)"
    );
    let out = tokio::time::timeout(HANG_GUARD, metering.debit(debit("d1")))
        .await
        .expect("no hang")
        .expect("debit")
        .into_inner();
    let on_replica = wallet(&replica, &server.ledger);
    assert_eq!(out.available, 99);
    assert_ne!(
        on_replica, before,
        "the replica must hold the debit already"
    );
    assert_eq!(on_replica, wallet(&primary, &server.ledger));

    // The answer waits for the replica: paused, the debit cannot answer; resumed, it does,
    // and the replica then holds it.
    let before = wallet(&replica, &server.ledger);
    replica.pause();
    let mut pending = tokio::spawn({
        let mut metering = metering.clone();
        async move { metering.debit(debit("d2")).await }
    });
    let early = tokio::time::timeout(Duration::from_millis(500), &mut pending).await;
    assert!(
        early.is_err(),
        "the debit answered while its replica was stopped: {early:?}"
    );
    replica.resume();
    let out = tokio::time::timeout(HANG_GUARD, pending)
        .await
        .expect("no hang")
        .expect("task")
        .expect("debit")
        .into_inner();
    let on_replica = wallet(&replica, &server.ledger);
    assert_eq!(out.available, 98);
    assert_ne!(on_replica, before);
    assert_eq!(on_replica, wallet(&primary, &server.ledger));
    assert_eq!(
        short_waits(&server).await,
        shorts_before,
        "every write was acknowledged by the replica"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_replica_costs_the_wait_timeout_and_is_counted() {
    let _serial = SERIAL.lock().await;
    let primary = common::RedisServer::start();
    let replica = replica_of(&primary);

    let mut config = common::test_config(&primary.url());
    config.redis.wait_replicas = 1;
    config.redis.wait_timeout_ms = 600;
    config.ledger.sweep_interval_ms = 3_600_000;
    let server = common::TestServer::start(config, Clock::Redis).await;
    let mut admin = server.admin().await;
    let mut metering = server.metering().await;
    admin
        .grant(pb::GrantRequest {
            account_id: "alice".into(),
            amount: 100,
            idempotency_key: "g1".into(),
            ..Default::default()
        })
        .await
        .expect("grant");
    let shorts = short_waits(&server).await;

    replica.pause();
    let started = Instant::now();
    let out = tokio::time::timeout(HANG_GUARD, metering.debit(debit("d1")))
        .await
        .expect("no hang")
        .expect("the write is committed on the primary: it answers")
        .into_inner();
    let took = started.elapsed();
    // The debit happened (and says so), after WAIT gave up on the replica.
    assert_eq!(out.available, 99);
    assert!(
        took >= Duration::from_millis(500),
        "answered in {took:?}, before the WAIT timeout"
    );
    assert!(short_waits(&server).await >= shorts + 1.0);
    // Replays answer the same; the primary holds one debit.
    let again = metering
        .debit(debit("d1"))
        .await
        .expect("replay")
        .into_inner();
    assert_eq!(again.available, 99);
    replica.resume();
    server.stop().await;
}
