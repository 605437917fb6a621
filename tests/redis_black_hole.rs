//! A Redis connection that stops answering without being closed (Redis's host crashed or
//! lost power, a network partition, a failover that moved the name to another address):
//! the socket stays "established", so redis-rs never reconnects by itself and every call
//! would time out until the kernel gave up on it (~15 minutes). The pool's watchdog
//! replaces such a connection once a fresh one answers (src/ledger/redis_pool.rs). A TCP
//! proxy between tollgate and a real redis-server black-holes the connections open at a
//! given moment (no FIN, no RST, nothing forwarded or read) while new ones go through.
//! A Redis that is merely stopped (SIGSTOP) must not make the pool churn connections.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::proxy::BlackHoleProxy;
use tollgate::api::pb;
use tollgate::ledger::redis_pool::WATCHDOG_RETRY;
use tollgate::ledger::Clock;
use tollgate::settle::settler::{Settler, SettlerSettings};
use tollgate::settle::Store;

/// Generous: the watchdog needs a few timed-out calls and a second of silence, then a
/// probe of a second; a busy 2-core machine may be seconds late.
const RECOVERY: Duration = Duration::from_secs(30);
/// Short, so that calls pile up timeouts quickly once black-holed, yet long enough for a
/// busy machine's calls to a healthy Redis (a call that times out before the black hole
/// is retried).
const CALL_TIMEOUT_MS: u64 = 300;

fn target(redis: &common::RedisServer) -> SocketAddr {
    ([127, 0, 0, 1], redis.port).into()
}

fn debit(key: &str) -> pb::DebitRequest {
    pb::DebitRequest {
        account_id: "alice".into(),
        amount: 1,
        idempotency_key: key.into(),
        ..Default::default()
    }
}

/// A server whose Redis (one connection, calls bounded by CALL_TIMEOUT_MS) is reached
/// through `proxy`, with alice granted 10 credits.
async fn alice_with_10(
    proxy: &BlackHoleProxy,
) -> (
    common::TestServer,
    pb::metering_client::MeteringClient<common::AuthChannel>,
) {
    let mut config = common::test_config(&proxy.redis_url());
    config.redis.call_timeout_ms = CALL_TIMEOUT_MS;
    config.redis.connections = 1;
    let server = common::TestServer::start(config, Clock::Redis).await;
    let mut admin = server.admin().await;
    let metering = server.metering().await;
    let deadline = Instant::now() + RECOVERY;
    loop {
        let granted = admin
            .grant(pb::GrantRequest {
                account_id: "alice".into(),
                amount: 10,
                idempotency_key: "g1".into(),
                ..Default::default()
            })
            .await;
        match granted {
            Ok(_) => break,
            // A busy machine's call past the short deadline: retried (same key).
            Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < deadline => {}
            Err(s) => panic!("grant: {s:?}"),
        }
    }
    (server, metering)
}

/// Debits `key` until it succeeds (UNAVAILABLE is retried under the same key, so it is
/// charged at most once), within RECOVERY; returns how long it took.
async fn debit_until_ok(
    metering: &mut pb::metering_client::MeteringClient<common::AuthChannel>,
    key: &str,
) -> Duration {
    let started = Instant::now();
    debit_answer(metering, key).await;
    started.elapsed()
}

/// [`debit_until_ok`]'s answer: once the connection works, any call may still meet a
/// stall of a busy machine longer than CALL_TIMEOUT_MS, and is retried the same way.
async fn debit_answer(
    metering: &mut pb::metering_client::MeteringClient<common::AuthChannel>,
    key: &str,
) -> pb::DebitResponse {
    let started = Instant::now();
    loop {
        match metering.debit(debit(key)).await {
            Ok(answer) => return answer.into_inner(),
            Err(s) if s.code() == tonic::Code::Unavailable => {
                assert!(
                    started.elapsed() < RECOVERY,
                    "debit {key}: no recovery within {RECOVERY:?}: {s:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => panic!("debit {key}: {s:?}"),
        }
    }
}

/// Alice's available credits; a read, retried on UNAVAILABLE (a call past the short
/// deadline on a busy machine) within RECOVERY.
async fn available(metering: &mut pb::metering_client::MeteringClient<common::AuthChannel>) -> i64 {
    let started = Instant::now();
    loop {
        let answer = metering
            .get_balance(pb::GetBalanceRequest {
                account_id: "alice".into(),
                ..Default::default()
            })
            .await;
        match answer {
            Ok(balance) => return balance.into_inner().wallets[0].available,
            Err(s) if s.code() == tonic::Code::Unavailable => {
                assert!(
                    started.elapsed() < RECOVERY,
                    "balance: no answer within {RECOVERY:?}: {s:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => panic!("balance: {s:?}"),
        }
    }
}

/// The connection goes silent: debits answer UNAVAILABLE at their deadline, then succeed
/// again over a new connection (the watchdog's replacement) without a restart; each
/// successful debit is charged once, and the replacement is counted on /metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_stopped_answering_is_replaced() {
    let redis = common::RedisServer::start();
    let proxy = BlackHoleProxy::start(target(&redis)).await;
    let (server, mut metering) = alice_with_10(&proxy).await;
    debit_until_ok(&mut metering, "d1").await;
    assert_eq!(available(&mut metering).await, 9);
    // A stall of the test machine itself could already have had a connection replaced.
    let replaced_before = server.ledger.redis().connections_replaced();

    proxy.black_hole();
    let accepted = proxy.accepted();
    let status = metering
        .debit(debit("d2"))
        .await
        .expect_err("the connection is black-holed");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    // d2 never reached Redis (nothing is forwarded): retried under the same key until a
    // new connection carries it.
    let took = debit_until_ok(&mut metering, "d2").await;
    println!(
        "recovered after {took:?}; {} new connection(s) through the proxy",
        proxy.accepted() - accepted
    );
    assert!(server.ledger.redis().connections_replaced() > replaced_before);
    assert!(proxy.accepted() > accepted, "no new connection was made");
    // A retry of d2 replays; a new debit is charged once (each retried, under its key, if
    // a stall outlasts the short deadline).
    let again = debit_answer(&mut metering, "d2").await;
    assert!(again.replayed, "d2 again: {again:?}");
    debit_answer(&mut metering, "d3").await;
    assert_eq!(
        available(&mut metering).await,
        7,
        "d1, d2 and d3 each charged once"
    );
    let (status, body) = common::http_get(server.http_addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        common::prom::value(&body, "tollgate_redis_connections_replaced_total", &[]) >= 1.0,
        "{body}"
    );
    server.stop().await;
}

/// A stopped Redis (SIGSTOP: every connection, old and new, is silent) is not a dead
/// connection: the watchdog's probe finds a new connection silent too and keeps the old
/// one, so a pause of a few seconds makes no reconnect storm, and calls succeed again on
/// resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_redis_does_not_churn_connections() {
    let redis = common::RedisServer::start();
    let proxy = BlackHoleProxy::start(target(&redis)).await;
    let (server, mut metering) = alice_with_10(&proxy).await;
    debit_until_ok(&mut metering, "d1").await;
    let accepted = proxy.accepted();

    redis.pause();
    let paused = Instant::now();
    let mut timed_out = 0;
    while paused.elapsed() < Duration::from_secs(4) {
        let status = metering
            .debit(debit("d2"))
            .await
            .expect_err("redis is stopped");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        timed_out += 1;
    }
    redis.resume();
    debit_until_ok(&mut metering, "d2").await;
    let pause = paused.elapsed();
    let made = proxy.accepted() - accepted;
    let replaced = server.ledger.redis().connections_replaced();
    println!(
        "{timed_out} debits timed out during a pause of {pause:?}; {made} new connection(s), {replaced} replaced"
    );
    assert!(timed_out >= 3, "the pause must have timed out a few calls");
    // At most one probe per connection per WATCHDOG_RETRY (one probe in a 4 s pause, two
    // if a slow machine stretched it), each at most three connection attempts (the
    // connection manager's first try and its two retries, within the probe's deadline).
    let probes = (pause.as_millis() / WATCHDOG_RETRY.as_millis()) as usize + 1;
    assert!(
        made <= probes * 3,
        "{made} new connections during a pause of {pause:?} ({timed_out} calls timed out)"
    );
    // The probe keeps the old connection unless the new one answers and the old one does
    // not: only a resume landing between the two answers (within a millisecond or so of
    // the probe's deadline) could replace it, once.
    assert!(replaced <= 1, "{replaced} replacements during a 4 s pause");
    assert_eq!(
        available(&mut metering).await,
        8,
        "d1 and d2 each charged once"
    );
    server.stop().await;
}

/// Settler rounds until the store holds `written` events, within RECOVERY; how long it
/// took.
async fn settle_all(settler: &mut Settler, store: &Store, written: usize) -> Duration {
    let started = Instant::now();
    loop {
        let _ = settler.round().await;
        let settled = store.count_events().await.expect("count") as usize;
        if settled == written {
            return started.elapsed();
        }
        assert!(settled < written, "{settled} settled of {written} written");
        assert!(
            started.elapsed() < RECOVERY,
            "{settled} of {written} events settled within {RECOVERY:?}"
        );
    }
}

/// The settler's own connection goes silent: its rounds fail at their deadline, then the
/// watchdog replaces the connection and every event written meanwhile settles, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settler_whose_connection_went_silent_settles_again() {
    let redis = common::RedisServer::start();
    let proxy = BlackHoleProxy::start(target(&redis)).await;
    let (clock, now) = Clock::manual(1_800_000_000_000);
    // Events are written straight to Redis; only the settler goes through the proxy.
    let writer = common::ledger(&redis, clock.clone());
    let mut config = common::test_config(&proxy.redis_url());
    // The settler's reads are bounded by ten times the call deadline: a shorter one so
    // that the watchdog's timeouts add up sooner.
    config.redis.call_timeout_ms = 200;
    config.redis.connections = 1;
    let ledger = tollgate::server::ledger_from_config(&config, clock).expect("ledger");
    let store =
        std::sync::Arc::new(Store::connect_lazy(&common::temp_sqlite_url(), 4).expect("store url"));
    store.migrate().await.expect("migrate");
    let mut settler = Settler::new(
        ledger.clone(),
        store.clone(),
        SettlerSettings {
            group: "tollgate-settler".into(),
            consumer: "a".into(),
            claim_idle: Duration::from_millis(300),
            idle_wait: Duration::from_millis(10),
            backoff_max: Duration::from_millis(500),
            ..SettlerSettings::default()
        },
    );
    let deadline = Instant::now() + RECOVERY;
    while settler.ensure_groups().await.is_err() {
        assert!(Instant::now() < deadline, "no consumer groups");
    }
    // The store is compared with the whole stream.
    common::add_observer_group(&writer).await;
    common::workload::every_kind(&writer, &now, 1, "before").await;
    let written = common::outbox_len(&writer).await;
    assert!(written > 0);
    settle_all(&mut settler, &store, written).await;

    proxy.black_hole();
    let accepted = proxy.accepted();
    common::workload::every_kind(&writer, &now, 1, "after").await;
    let events = common::outbox_events(&writer).await;
    assert!(events.len() > written);
    let took = settle_all(&mut settler, &store, events.len()).await;
    println!(
        "settled again after {took:?}; {} new connection(s) through the proxy",
        proxy.accepted() - accepted
    );
    assert!(ledger.redis().connections_replaced() >= 1);
    for e in &events {
        let stored = store.event(&e.event_id).await.expect("event");
        assert_eq!(stored.as_ref(), Some(e), "event differs");
    }
}
