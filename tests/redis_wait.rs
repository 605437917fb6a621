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

async fn short_waits(server: &common::TestServer) -> f64 {
    let (code, body) = common::http_get(server.http_addr, "/metrics").await;
    assert_eq!(code, 200);
    common::prom::value(&body, "tollgate_redis_wait_short_total", &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_wait_for_the_replica() {
    let _serial = SERIAL.lock().await;
    let primary = common::RedisServer::start();
    let replica = common::replica_of(&primary);

    let mut config = common::test_config(&primary.url());
    config.redis.wait_replicas = 1;
    // Long enough that the paused replica below is waited for, not timed out.
    config.redis.wait_timeout_ms = 10_000;
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
    let replica = common::replica_of(&primary);

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

/// Failover (DESIGN.md: "documented loss window, measured in a test"), with
/// `redis.wait_replicas = 1`: debits are acknowledged while the replica keeps up; then the
/// replication link is cut (the replica replicates through a fault proxy: what the primary
/// writes after the cut never reaches it), more debits are sent, and the primary is killed
/// (SIGKILL) while they wait for the replica; the replica is promoted. No debit is
/// acknowledged after the cut, and every acknowledged debit is on the promoted replica
/// (its outbox event; the balance counts it): with WAIT, a charge is acknowledged only
/// once a replica holds it, so the loss window holds no acknowledged charge while WAIT
/// does not time out (a short WAIT is counted: `tollgate_redis_wait_short_total`).
/// Without WAIT the debits sent after the cut would be acknowledged and lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_replica_holds_every_acknowledged_debit() {
    let _serial = SERIAL.lock().await;
    let mut primary = common::RedisServer::start();
    let link = common::proxy::FaultProxy::start(([127, 0, 0, 1], primary.port).into()).await;
    let replica = common::replica_through(&primary, link.addr.port());
    let mut config = common::test_config(&primary.url());
    config.redis.wait_replicas = 1;
    // Far longer than the stall below: no WAIT comes back short in this test.
    config.redis.wait_timeout_ms = 30_000;
    config.ledger.sweep_interval_ms = 3_600_000;
    let server = common::TestServer::start(config, Clock::Redis).await;
    server
        .admin()
        .await
        .grant(pb::GrantRequest {
            account_id: "alice".into(),
            amount: 1_000,
            idempotency_key: "g1".into(),
            ..Default::default()
        })
        .await
        .expect("grant");
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    // Each task debits until a debit fails (the primary is gone) or `limit` are done.
    let spawn = |phase: &'static str, limit: usize| {
        let acked = acked.clone();
        let server = &server;
        async move {
            let mut tasks = Vec::new();
            for t in 0..4 {
                let mut metering = server.metering().await;
                let acked = acked.clone();
                tasks.push(tokio::spawn(async move {
                    for i in 0..limit {
                        let key = format!("{phase}-{t}-{i}");
                        match tokio::time::timeout(HANG_GUARD, metering.debit(debit(&key))).await {
                            Ok(Ok(out)) => {
                                acked.lock().expect("acked").push(out.into_inner().event_id)
                            }
                            Ok(Err(_)) => return,
                            Err(_) => panic!("a debit hung"),
                        }
                    }
                }));
            }
            tasks
        }
    };
    for task in spawn("before", 25).await {
        task.await.expect("task");
    }
    let before = acked.lock().expect("acked").len();
    assert_eq!(before, 100);

    link.cut();
    let stalled = spawn("stalled", 1_000).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    primary.kill();
    for task in stalled {
        task.await.expect("task");
    }

    let acked = acked.lock().expect("acked").clone();
    assert_eq!(
        acked.len(),
        before,
        "debits were acknowledged while no replica could hold them"
    );
    replica.writable();
    let mut con = replica
        .client()
        .get_connection()
        .expect("replica connection");
    let mut lost = Vec::new();
    for event_id in &acked {
        // "<shard>-<stream id>"
        let (shard, stream_id) = event_id.split_once('-').expect("event id");
        let shard: u16 = shard.parse().expect("shard");
        let found: Vec<redis::Value> = redis::cmd("XRANGE")
            .arg(server.ledger.shards().outbox(shard))
            .arg(stream_id)
            .arg(stream_id)
            .query(&mut con)
            .expect("XRANGE");
        if found.is_empty() {
            lost.push(event_id.clone());
        }
    }
    println!(
        "failover with WAIT: {} debits acknowledged ({} after the replication link was cut), {} missing on the promoted replica",
        acked.len(),
        acked.len() - before,
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "{} acknowledged debits lost in failover, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    let fields: std::collections::HashMap<String, String> =
        wallet(&replica, &server.ledger).into_iter().collect();
    let used: i64 = fields["u"].parse().expect("used");
    let available: i64 = fields["r"].parse().expect("available");
    assert!(
        used >= acked.len() as i64,
        "used {used} < {} acknowledged",
        acked.len()
    );
    assert_eq!(
        used + available,
        1_000,
        "conservation on the promoted replica"
    );
}
