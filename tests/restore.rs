//! Redis loses its data: detection (not ready, LEDGER_NOT_INITIALIZED), `tollgate restore`
//! from the durable ledger (real PostgreSQL), reconcile agreeing afterwards, restore's
//! refusals, and a SIGKILL of an AOF `everysec` redis-server under load.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic_types::StatusExt;

use tollgate::api::pb;
use tollgate::ledger::Clock;
use tollgate::settle::Store;

const DEADLINE: Duration = Duration::from_secs(120);
const ACCOUNTS: usize = 200;

fn account(i: usize) -> String {
    format!("acct{i:04}")
}

/// Status 0, and what went wrong, when nothing answers within `common::HTTP_TIMEOUT`.
async fn http_status(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    tokio::time::timeout(common::HTTP_TIMEOUT, http_status_unbounded(addr, path))
        .await
        .unwrap_or_else(|_| (0, format!("no answer within {:?}", common::HTTP_TIMEOUT)))
}

async fn http_status_unbounded(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return (0, String::new());
    };
    let _ = s
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
    let mut text = String::new();
    let _ = s.read_to_string(&mut text).await;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

fn tool(args: &[&str]) -> std::process::Output {
    common::output_within(common::tollgate().args(args), common::COMMAND_TIMEOUT)
}

async fn seed(server: &common::TestServer, now_ms: i64) {
    let mut admin = server.admin().await;
    for i in 0..ACCOUNTS {
        for (n, (amount, expires, priority)) in [(1_000, 0, 50), (300, now_ms + 3_600_000, 10)]
            .into_iter()
            .enumerate()
        {
            admin
                .grant(pb::GrantRequest {
                    account_id: account(i),
                    amount,
                    expires_at_ms: expires,
                    priority: Some(priority),
                    kind: if n == 1 { "demo".into() } else { String::new() },
                    idempotency_key: format!("seed-{n}"),
                    ..Default::default()
                })
                .await
                .expect("seed grant");
        }
    }
}

/// What [`load`] did that the restore must bring back.
#[derive(Default)]
struct Loaded {
    /// Acknowledged debits (request, event id), to replay after the restore.
    acked: Vec<(pb::DebitRequest, String)>,
    /// Holds acknowledged and left open (never captured nor released).
    open_holds: Vec<String>,
}

/// Mixed load: debits, holds captured, released or left open, refunds.
async fn load(server_grpc: std::net::SocketAddr, stop: Arc<AtomicBool>, task: usize) -> Loaded {
    let channel = tonic::transport::Channel::from_shared(format!("http://{server_grpc}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut m = pb::metering_client::MeteringClient::with_interceptor(
        channel,
        common::auth(Some(common::SERVICE_TOKEN)),
    );
    let mut loaded = Loaded::default();
    let mut n = 0usize;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let acct = account((task * 7919 + n) % ACCOUNTS);
        let debit = pb::DebitRequest {
            account_id: acct.clone(),
            amount: 1 + (n % 3) as i64,
            idempotency_key: format!("t{task}-d{n}"),
            operation: "envelope.send".into(),
            ..Default::default()
        };
        let Ok(out) = m.debit(debit.clone()).await else {
            // Redis is gone or the ledger awaits its restore: wait.
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let event_id = out.into_inner().event_id;
        if n.is_multiple_of(4) {
            let _ = m
                .refund(pb::RefundRequest {
                    charge_id: event_id.clone(),
                    amount: 1,
                    idempotency_key: format!("t{task}-r{n}"),
                    ..Default::default()
                })
                .await;
        }
        loaded.acked.push((debit, event_id));
        if let Ok(h) = m
            .authorize(pb::AuthorizeRequest {
                account_id: acct,
                amount: 5,
                ttl_ms: 600_000,
                idempotency_key: format!("t{task}-h{n}"),
                ..Default::default()
            })
            .await
        {
            let hold_id = h.into_inner().hold_id;
            if n.is_multiple_of(3) {
                let _ = m
                    .capture(pb::CaptureRequest {
                        hold_id,
                        amount: Some(2),
                        idempotency_key: format!("t{task}-c{n}"),
                        ..Default::default()
                    })
                    .await;
            } else if n % 3 == 1 {
                let _ = m
                    .release(pb::ReleaseRequest {
                        hold_id,
                        idempotency_key: format!("t{task}-rel{n}"),
                        ..Default::default()
                    })
                    .await;
            } else {
                // Left open: restored as an open hold once settled.
                loaded.open_holds.push(hold_id);
            }
        }
    }
    loaded
}

/// Waits (generously) until the store holds what the restore test checks after the loss:
/// a refund of the load, and a hold the load leaves open (`t{task}-h{n}`, n % 3 == 2). A
/// fixed sleep was not enough on a busy machine, where the load or the settler can lag.
async fn load_settled_in_store(url: &str) {
    use sqlx::Connection;
    let mut con = sqlx::PgConnection::connect(url).await.expect("store");
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (refunds, open_holds) = sqlx::query_as::<_, (i64, i64)>(
            "SELECT \
               (SELECT count(*) FROM tollgate_events \
                  WHERE kind = 'refund' AND idempotency_key LIKE 't%'), \
               (SELECT count(*) FROM tollgate_events \
                  WHERE kind = 'hold' AND idempotency_key ~ '^t[0-9]+-h[0-9]+$' \
                  AND split_part(idempotency_key, '-h', 2)::bigint % 3 = 2)",
        )
        .fetch_one(&mut con)
        .await
        .expect("count the load's settled events");
        if refunds > 0 && open_holds > 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the load's refunds ({refunds}) and open holds ({open_holds}) never settled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_settled(store: &Store, ledger: &tollgate::ledger::Ledger) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let outbox = common::outbox_len(ledger).await;
        let pending = common::pending(ledger, "tollgate-settler", None)
            .await
            .unwrap_or(0);
        if outbox == 0 && pending == 0 {
            let _ = store.count_events().await;
            return;
        }
        assert!(
            Instant::now() < deadline,
            "outbox not settled: {outbox} entries"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_loses_its_data_then_restore_rebuilds_it() {
    let mut redis = common::RedisServer::start();
    let pg = common::PgDatabase::create().await;
    let mut config = common::test_config(&redis.url());
    config.store.url = pg.url.clone();
    config.settler.enabled = true;
    config.settler.idle_wait_ms = 10;
    config.settler.trim_interval_ms = 100;
    config.settler.claim_idle_ms = 500;
    let server = common::TestServer::start(config, Clock::Redis).await;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    seed(&server, now_ms).await;
    // API keys: one active, one revoked; both must come back.
    let mut admin = server.admin().await;
    let mut keys = Vec::new();
    for name in ["live", "old"] {
        keys.push(
            admin
                .create_api_key(pb::CreateApiKeyRequest {
                    account_id: account(7),
                    name: name.into(),
                    ..Default::default()
                })
                .await
                .expect("create key")
                .into_inner(),
        );
    }
    admin
        .revoke_api_key(pb::RevokeApiKeyRequest {
            key_id: keys[1].key_id.clone(),
        })
        .await
        .expect("revoke");
    let keys_before = admin
        .list_api_keys(pb::ListApiKeysRequest {
            account_id: account(7),
        })
        .await
        .expect("list keys")
        .into_inner();

    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..4)
        .map(|t| tokio::spawn(load(server.grpc_addr, stop.clone(), t)))
        .collect();
    load_settled_in_store(&pg.url).await;

    // Redis loses everything (restart without persistence) under load.
    redis.restart();
    let mut metering = server.metering().await;
    let deadline = Instant::now() + DEADLINE;
    let refusal = loop {
        let tried = metering
            .debit(pb::DebitRequest {
                account_id: account(1),
                amount: 1,
                idempotency_key: "after-loss".into(),
                ..Default::default()
            })
            .await;
        match tried {
            Err(s)
                if s.get_details_error_info()
                    .is_some_and(|i| i.reason == "LEDGER_NOT_INITIALIZED") =>
            {
                break s
            }
            other => {
                assert!(
                    Instant::now() < deadline,
                    "no LEDGER_NOT_INITIALIZED: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(refusal.code(), tonic::Code::Unavailable);
    // `/readyz` answers from the health watcher's latest round (every 2 s).
    let deadline = Instant::now() + DEADLINE;
    let (code, body) = loop {
        let (code, body) = http_status(server.http_addr, "/readyz").await;
        if code == 503 || Instant::now() > deadline {
            break (code, body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("ledger") && body.contains("restore"),
        "{body}"
    );
    let balance = metering
        .get_balance(pb::GetBalanceRequest {
            account_id: account(1),
            ..Default::default()
        })
        .await
        .expect_err("no empty balances served as real");
    assert_eq!(balance.code(), tonic::Code::Unavailable);
    // Still refused a while later: nothing re-initializes a shard whose events exist.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(http_status(server.http_addr, "/readyz").await.0, 503);
    stop.store(true, Ordering::SeqCst);
    let mut acked = Vec::new();
    let mut open_holds = std::collections::BTreeSet::new();
    for t in tasks {
        let loaded = t.await.expect("load task");
        acked.extend(loaded.acked);
        open_holds.extend(loaded.open_holds);
    }
    assert!(acked.len() > 20, "too little load: {}", acked.len());

    let out = tool(&["restore", "--redis-url", &redis.url(), "--store", &pg.url]);
    assert!(out.status.success(), "restore failed: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("restored 16 shards") && text.contains("not restored"),
        "{text}"
    );
    // Each outbox's next id comes after the shard's newest settled event, whatever the
    // restored Redis's clock says.
    let store = Store::connect_lazy(&pg.url, 2).expect("store");
    // A page cap, so that page positions that never end fail instead of looping: every
    // event the store holds now, in pages of 1000, and a couple more.
    let pages_max = store.count_events().await.expect("count") as usize / 1000 + 3;
    for shard in 0..server.ledger.shards().count() {
        let mut newest = (0i64, 0i64);
        let mut after = None;
        let mut pages = 0;
        loop {
            pages += 1;
            assert!(pages <= pages_max, "shard {shard}: event pages never end");
            let page = store
                .shard_events(shard, after.as_ref(), 1000)
                .await
                .expect("shard events");
            newest = page
                .iter()
                .map(|e| e.stream_position())
                .fold(newest, std::cmp::max);
            let Some(last) = page.last() else { break };
            let (stream_ms, stream_seq) = last.stream_position();
            after = Some(tollgate::settle::store::WalletPosition {
                account_id: last.account_id.clone(),
                wallet: last.wallet.clone(),
                stream_ms,
                stream_seq,
            });
        }
        if newest == (0, 0) {
            continue;
        }
        let info: HashMap<String, redis::Value> = server
            .ledger
            .redis()
            .query(
                redis::cmd("XINFO")
                    .arg("STREAM")
                    .arg(server.ledger.shards().outbox(shard)),
            )
            .await
            .expect("xinfo");
        let last_id = match info.get("last-generated-id") {
            Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            other => panic!("last-generated-id {other:?}"),
        };
        let position = tollgate::ledger::event::parse_stream_id(&last_id).expect("stream id");
        assert!(
            position >= newest,
            "shard {shard}: outbox at {last_id}, newest event {newest:?}"
        );
    }

    // Ready again; Redis matches the ledger wallet by wallet; reconcile agrees.
    let deadline = Instant::now() + DEADLINE;
    while http_status(server.http_addr, "/readyz").await.0 != 200 {
        assert!(Instant::now() < deadline, "never ready after the restore");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let summaries = store.wallets().await.expect("wallets");
    assert_eq!(summaries.len(), ACCOUNTS);
    for s in &summaries {
        let b = metering
            .get_balance(pb::GetBalanceRequest {
                account_id: s.account_id.clone(),
                wallet: s.wallet.clone(),
                ..Default::default()
            })
            .await
            .expect("balance")
            .into_inner();
        let w = &b.wallets[0];
        assert_eq!(
            (
                w.available,
                w.held,
                w.total_used,
                w.total_granted,
                w.total_refunded
            ),
            (
                s.totals.available,
                s.totals.held,
                s.totals.used,
                s.totals.granted,
                s.totals.refunded
            ),
            "{} differs from the ledger after the restore",
            s.account_id
        );
    }
    let out = tool(&["reconcile", "--redis-url", &redis.url(), "--store", &pg.url]);
    assert!(out.status.success(), "reconcile after restore: {out:?}");
    let keys_after = admin
        .list_api_keys(pb::ListApiKeysRequest {
            account_id: account(7),
        })
        .await
        .expect("list keys")
        .into_inner();
    assert_eq!(keys_after, keys_before, "API keys after the restore");
    assert!(keys_after.keys.iter().any(|k| k.revoked_at_ms > 0));

    // Charges succeed again, a demo grant is still refused, an open hold captures, and a
    // replay of a settled debit answers from the restored idempotency record.
    let ok = metering
        .debit(pb::DebitRequest {
            account_id: account(2),
            amount: 1,
            idempotency_key: "after-restore".into(),
            ..Default::default()
        })
        .await
        .expect("charges work again");
    assert!(!ok.into_inner().replayed);
    let mut admin = server.admin().await;
    let demo = admin
        .grant(pb::GrantRequest {
            account_id: account(2),
            amount: 5,
            kind: "demo".into(),
            idempotency_key: "demo-again".into(),
            ..Default::default()
        })
        .await
        .expect_err("demo marker restored");
    assert_eq!(
        demo.get_details_error_info().map(|i| i.reason),
        Some("DEMO_ALREADY_GRANTED".into())
    );
    let settled: Vec<_> = {
        let mut v = Vec::new();
        for (req, id) in &acked {
            if store.event(id).await.expect("event").is_some() {
                v.push((req.clone(), id.clone()));
            }
        }
        v
    };
    assert!(!settled.is_empty(), "no settled debit to replay");
    for (req, id) in settled.iter().take(20) {
        let again = metering
            .debit(req.clone())
            .await
            .expect("replay")
            .into_inner();
        assert!(
            again.replayed,
            "replay of {id} after the restore was charged again"
        );
        assert_eq!(&again.event_id, id);
    }
    // Their charge records were rebuilt (in their hourly buckets): they refund, unless the
    // load refunded them whole already — never NOT_FOUND.
    let mut refunded = 0;
    for (n, (_, id)) in settled.iter().take(20).enumerate() {
        match metering
            .refund(pb::RefundRequest {
                charge_id: id.clone(),
                amount: 1,
                idempotency_key: format!("refund-after-restore-{n}"),
                ..Default::default()
            })
            .await
        {
            Ok(r) => {
                assert_eq!(r.into_inner().refunded, 1);
                refunded += 1;
            }
            Err(status) => assert_ne!(
                status.code(),
                tonic::Code::NotFound,
                "charge {id} not restored: {status:?}"
            ),
        }
    }
    assert!(refunded > 0, "no restored charge refunded");
    // Every hold the load left open whose authorization was settled before Redis lost
    // its data is restored open: each captures whole (not NOT_FOUND, not HOLD_ENDED).
    let mut settled_open = Vec::new();
    // A page cap: every event the store holds now, in pages of 1000, and a couple more.
    let pages_max = store.count_events().await.expect("count") as usize / 1000 + 3;
    for i in 0..ACCOUNTS {
        let mut after = None;
        let mut pages = 0;
        loop {
            pages += 1;
            assert!(
                pages <= pages_max,
                "{}: history pages never end",
                account(i)
            );
            let page = store
                .history(&tollgate::settle::store::HistoryQuery {
                    account_id: account(i),
                    kinds: vec![tollgate::ledger::event::EventKind::Hold],
                    page_size: 1000,
                    after: after.clone(),
                    ..Default::default()
                })
                .await
                .expect("history");
            settled_open.extend(
                page.events
                    .iter()
                    .filter(|h| open_holds.contains(&h.hold_id))
                    .map(|h| h.hold_id.clone()),
            );
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
    }
    assert!(
        !settled_open.is_empty(),
        "no hold left open was settled before the loss ({} left open)",
        open_holds.len()
    );
    for hold_id in &settled_open {
        let captured = metering
            .capture(pb::CaptureRequest {
                hold_id: hold_id.clone(),
                idempotency_key: format!("post-restore-{hold_id}"),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("open hold {hold_id} not restored open: {s:?}"));
        assert_eq!(captured.into_inner().captured, 5, "hold {hold_id}");
    }
    println!(
        "{} holds left open by the load, {} of them settled before the loss, each captured after the restore",
        open_holds.len(),
        settled_open.len()
    );

    // A settled refund's retry answers from its restored record even once its charge's
    // record is gone: the restore rebuilt the refund's `:rf:` pointer too.
    let mut retried_refund = false;
    'refunds: for i in 0..ACCOUNTS {
        let refunds = store
            .history(&tollgate::settle::store::HistoryQuery {
                account_id: account(i),
                kinds: vec![tollgate::ledger::event::EventKind::Refund],
                page_size: 1000,
                ..Default::default()
            })
            .await
            .expect("history");
        for r in &refunds.events {
            if !r.idempotency_key.starts_with('t') {
                continue;
            }
            let ms: i64 = r
                .charge_id
                .split('-')
                .nth(1)
                .and_then(|ms| ms.parse().ok())
                .expect("charge id");
            let tag = server
                .ledger
                .shards()
                .tag(server.ledger.shards().of_account(&r.account_id))
                .to_owned();
            let _: i64 = server
                .ledger
                .redis()
                .query(redis::cmd("UNLINK").arg(format!("{tag}:cb:{}", ms / 3_600_000)))
                .await
                .expect("unlink");
            let again = metering
                .refund(pb::RefundRequest {
                    charge_id: r.charge_id.clone(),
                    amount: r.amount,
                    idempotency_key: r.idempotency_key.clone(),
                    ..Default::default()
                })
                .await
                .expect("a refund's retry after the restore")
                .into_inner();
            assert!(again.replayed, "{again:?}");
            assert_eq!(again.event_id, r.event_id);
            retried_refund = true;
            break 'refunds;
        }
    }
    assert!(retried_refund, "no settled refund to retry");

    // Restore again: refused, nothing changed.
    let balance_before = metering
        .get_balance(pb::GetBalanceRequest {
            account_id: account(3),
            ..Default::default()
        })
        .await
        .expect("balance")
        .into_inner();
    let again = tool(&["restore", "--redis-url", &redis.url(), "--store", &pg.url]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already holds tollgate data"),
        "{again:?}"
    );
    let balance_after = metering
        .get_balance(pb::GetBalanceRequest {
            account_id: account(3),
            ..Default::default()
        })
        .await
        .expect("balance")
        .into_inner();
    assert_eq!(balance_before, balance_after);

    // --rebuild-serving after draining gives the same state again.
    let ledger = server.ledger.clone();
    wait_settled(&store, &ledger).await;
    server.stop().await;
    let forced = tool(&[
        "restore",
        "--redis-url",
        &redis.url(),
        "--store",
        &pg.url,
        "--rebuild-serving",
    ]);
    assert!(forced.status.success(), "{forced:?}");
    let out = tool(&["reconcile", "--redis-url", &redis.url(), "--store", &pg.url]);
    assert!(
        out.status.success(),
        "reconcile after a forced restore: {out:?}"
    );
}

/// AOF `everysec`: a SIGKILL of redis-server under load loses at most about the last
/// second of charges; restore plus reconcile then agree with the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aof_everysec_sigkill_loses_about_the_last_second() {
    let dir = std::env::temp_dir().join(format!(
        "tollgate-aof-{}-{}",
        std::process::id(),
        common::free_port()
    ));
    std::fs::create_dir_all(&dir).expect("dir");
    let dir_text = dir.display().to_string();
    let aof = [
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
        "--dir",
        dir_text.as_str(),
    ];
    let mut redis = common::RedisServer::start_with(&aof);
    let pg = common::PgDatabase::create().await;
    let mut config = common::test_config(&redis.url());
    config.store.url = pg.url.clone();
    config.settler.enabled = true;
    config.settler.idle_wait_ms = 10;
    config.settler.claim_idle_ms = 500;
    let server = common::TestServer::start(config, Clock::Redis).await;
    let mut admin = server.admin().await;
    admin
        .grant(pb::GrantRequest {
            account_id: "steady".into(),
            amount: 10_000_000,
            idempotency_key: "fund".into(),
            ..Default::default()
        })
        .await
        .expect("grant");
    let acked = Arc::new(AtomicI64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let loader = {
        let (acked, stop) = (acked.clone(), stop.clone());
        let mut m = server.metering().await;
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let r = m
                    .debit(pb::DebitRequest {
                        account_id: "steady".into(),
                        amount: 1,
                        idempotency_key: format!("d{n}"),
                        ..Default::default()
                    })
                    .await;
                if r.is_ok() {
                    acked.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };
    let deadline = Instant::now() + DEADLINE;
    while acked.load(Ordering::SeqCst) < 500 {
        assert!(Instant::now() < deadline, "no load");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let started = Instant::now();
    let before_kill = acked.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rate =
        (acked.load(Ordering::SeqCst) - before_kill) as f64 / started.elapsed().as_secs_f64();
    redis.kill();
    stop.store(true, Ordering::SeqCst);
    loader.await.expect("loader");
    let acknowledged = acked.load(Ordering::SeqCst);
    redis.restart_with(&aof);

    // What the AOF kept.
    let mut metering = server.metering().await;
    let deadline = Instant::now() + DEADLINE;
    let kept = loop {
        match metering
            .get_balance(pb::GetBalanceRequest {
                account_id: "steady".into(),
                wallet: "default".into(),
                ..Default::default()
            })
            .await
        {
            Ok(b) => break b.into_inner().wallets[0].total_used,
            Err(e) => {
                assert!(Instant::now() < deadline, "redis did not come back: {e:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let lost = acknowledged - kept;
    println!(
        "AOF everysec SIGKILL: {acknowledged} charges acknowledged, {kept} kept, {lost} lost \
         (load {rate:.0}/s, so about {:.2} s of charges)",
        lost as f64 / rate.max(1.0)
    );
    assert!(lost >= 0, "more charges than acknowledged");
    assert!(
        (lost as f64) <= rate * 3.0 + 50.0,
        "lost {lost} charges at {rate:.0}/s: more than about a second's worth"
    );

    // The settler drains what the AOF kept; restore rebuilds from the ledger (which may
    // hold charges Redis lost); reconcile agrees.
    let store = Store::connect_lazy(&pg.url, 2).expect("store");
    wait_settled(&store, &server.ledger).await;
    server.stop().await;
    let forced = tool(&[
        "restore",
        "--redis-url",
        &redis.url(),
        "--store",
        &pg.url,
        "--rebuild-serving",
    ]);
    assert!(forced.status.success(), "{forced:?}");
    let out = tool(&["reconcile", "--redis-url", &redis.url(), "--store", &pg.url]);
    assert!(
        out.status.success(),
        "reconcile after the AOF restart and restore: {out:?}"
    );
    drop(redis);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `account` granted `amount`, settled into a fresh PostgreSQL database; then Redis loses
/// everything.
async fn settled_then_lost(
    account: &str,
    amount: i64,
) -> (
    common::RedisServer,
    common::PgDatabase,
    Arc<tollgate::ledger::Ledger>,
    Arc<Store>,
) {
    let redis = common::RedisServer::start();
    let pg = common::PgDatabase::create().await;
    let ledger = common::ledger(&redis, Clock::Redis);
    let store = Arc::new(Store::connect_lazy(&pg.url, 2).expect("store"));
    store.migrate().await.expect("migrate");
    ledger
        .grant(&common::purchase(account, amount, &format!("g-{account}")))
        .await
        .expect("grant");
    settle_then_lose_redis(&redis, &ledger, &store, account).await;
    (redis, pg, ledger, store)
}

/// Settles everything into the store (a settler named after `account`), then Redis loses
/// everything.
async fn settle_then_lose_redis(
    redis: &common::RedisServer,
    ledger: &Arc<tollgate::ledger::Ledger>,
    store: &Arc<Store>,
    account: &str,
) {
    use tollgate::settle::settler::{Settler, SettlerSettings};

    Settler::new(
        ledger.clone(),
        store.clone(),
        SettlerSettings {
            consumer: format!("{account}-test"),
            ..SettlerSettings::default()
        },
    )
    .drain(DEADLINE)
    .await
    .expect("settled");
    let mut con = redis.client().get_connection().expect("redis");
    let _: () = redis::cmd("FLUSHALL").query(&mut con).expect("flushall");
}

/// A sidecar marks a shard new only for the Redis it claimed it in before asking the
/// store: a mark that arrives after Redis lost its data (a process paused between the
/// store's answer and its write) marks nothing, where a plain `SET NX` of the epoch
/// marker would have declared the emptied shard new, serving it from zero balances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_new_shard_mark_after_redis_lost_its_data_marks_nothing() {
    let redis = common::RedisServer::start();
    let ledger = common::ledger(&redis, Clock::Redis);
    let mut con = redis.client().get_connection().expect("redis");
    let _: () = redis::cmd("FLUSHALL").query(&mut con).expect("flushall");
    let stale = ledger.claim_new_shard(0).await.expect("claim");
    // Meanwhile another sidecar marks the shard, charges are made and settled, and Redis
    // loses everything again: the claim is gone with the rest.
    let _: () = redis::cmd("FLUSHALL").query(&mut con).expect("flushall");
    assert!(!ledger
        .mark_new_shard(0, &tollgate::ledger::new_epoch(), &stale)
        .await
        .expect("mark"));
    assert!(!ledger.shard_initialized(0).await.expect("look"));
    // A claim of this Redis marks it, once.
    let token = ledger.claim_new_shard(0).await.expect("claim");
    assert!(ledger
        .mark_new_shard(0, &tollgate::ledger::new_epoch(), &token)
        .await
        .expect("mark"));
    assert!(ledger.shard_initialized(0).await.expect("look"));
    assert!(!ledger
        .mark_new_shard(0, &tollgate::ledger::new_epoch(), &token)
        .await
        .expect("a second mark with the same claim"));
}

/// What a wallet has available, or the error's text (a shard awaiting restore refuses).
async fn available(ledger: &tollgate::ledger::Ledger, account_id: &str) -> Result<i64, String> {
    ledger
        .balance(account_id, "default")
        .await
        .map(|rows| rows.iter().map(|w| w.available).sum())
        .map_err(|e| e.to_string())
}

/// Restores never write over a shard that serves. After Redis lost its data a running
/// sidecar marks the shards the store has no events of as new, and charges land there; a
/// `serve --restore` then rebuilds the lost shards and leaves the serving ones (and their
/// charges) alone. One restore runs at a time: while another holds the lease, `tollgate
/// restore` is refused and `serve --restore` serves without restoring; the lease is held
/// during a restore and freed after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_never_write_over_a_shard_that_serves() {
    use tollgate::settle::restore::{
        dead_letters_key, lease_key, restore, RestoreError, RestoreMode,
    };
    use tollgate::settle::settler::{Settler, SettlerSettings};

    let redis = common::RedisServer::start();
    let pg = common::PgDatabase::create().await;
    let ledger = common::ledger(&redis, Clock::Redis);
    let store = Arc::new(Store::connect_lazy(&pg.url, 4).expect("store"));
    store.migrate().await.expect("migrate");
    let shards = ledger.shards().clone();
    // `lost` has events in the store; `fresh` is in a shard the store knows nothing of.
    let lost = account(1);
    let fresh = (2..)
        .map(account)
        .find(|a| shards.of_account(a) != shards.of_account(&lost))
        .expect("an account in another shard");
    ledger
        .grant(&common::purchase(&lost, 1000, "g-lost"))
        .await
        .expect("grant");
    let mut settler = Settler::new(
        ledger.clone(),
        store.clone(),
        SettlerSettings {
            consumer: "restore-test".into(),
            ..SettlerSettings::default()
        },
    );
    settler.drain(DEADLINE).await.expect("settled");

    // Redis loses everything; a running sidecar marks the shards without stored events
    // new (the real start-up path), and a grant lands on one of them.
    let mut con = redis.client().get_connection().expect("redis");
    let _: () = redis::cmd("FLUSHALL").query(&mut con).expect("flushall");
    assert!(
        !tollgate::server::initialize_new_shards(&ledger, &store).await,
        "the lost shard must stay uninitialized"
    );
    ledger
        .grant(&common::purchase(&fresh, 300, "g-fresh"))
        .await
        .expect("a grant on a serving shard");
    assert!(available(&ledger, &lost)
        .await
        .is_err_and(|e| e.contains("NOT_INITIALIZED") || e.contains("not initialized")));

    // Another restore holds the lease: refused, and `serve --restore` serves without it.
    let key = lease_key(&ledger);
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("someone-else")
        .arg("PX")
        .arg(60_000)
        .query(&mut con)
        .expect("set lease");
    match restore(ledger.clone(), store.clone(), RestoreMode::Lost, |_, _| {}).await {
        Err(RestoreError::Busy(k, ms)) => assert!(k == key && ms > 0, "{k} {ms}"),
        other => panic!("restore under another's lease: {other:?}"),
    }
    tollgate::server::restore_lost_shards(&ledger, store.clone())
        .await
        .expect("serve --restore while another restore runs");
    assert!(available(&ledger, &lost).await.is_err(), "nothing restored");
    let _: () = redis::cmd("DEL").arg(&key).query(&mut con).expect("del");

    // Now `serve --restore` restores the lost shard only, holding the lease meanwhile.
    let report = {
        let mut lease_seen = Vec::new();
        let mut probe = redis.client().get_connection().expect("redis");
        let report = restore(ledger.clone(), store.clone(), RestoreMode::Lost, |s, _| {
            let held: i64 = redis::cmd("EXISTS")
                .arg(&key)
                .query(&mut probe)
                .unwrap_or(0);
            lease_seen.push((s.shard, s.skipped, held));
        })
        .await
        .expect("restore");
        assert!(
            lease_seen.iter().all(|(_, _, held)| *held == 1),
            "{lease_seen:?}"
        );
        let restored: Vec<u16> = lease_seen
            .iter()
            .filter(|(_, skipped, _)| !skipped)
            .map(|(s, _, _)| *s)
            .collect();
        assert_eq!(restored, vec![shards.of_account(&lost)], "{lease_seen:?}");
        report
    };
    assert!(
        report.render().contains("left 15 shards alone"),
        "{}",
        report.render()
    );
    let lease_left: i64 = redis::cmd("EXISTS")
        .arg(&key)
        .query(&mut con)
        .expect("exists");
    assert_eq!(lease_left, 0, "the lease is freed");
    assert_eq!(available(&ledger, &lost).await, Ok(1000));
    assert_eq!(
        available(&ledger, &fresh).await,
        Ok(300),
        "the serving shard kept its grant"
    );

    // A charge after the restore, not settled; then one other shard (no wallets) loses its
    // marker. A restore rebuilds that shard only: the charge stays.
    ledger
        .debit(&tollgate::ledger::Debit {
            account_id: lost.clone(),
            wallet: "default".into(),
            amount: 400,
            idempotency_key: "d-after".into(),
            operation: "op".into(),
            metadata: Default::default(),
            member_id: String::new(),
            price_inputs: None,
            attempt_mark: None,
        })
        .await
        .expect("debit");
    let other = (0..shards.count())
        .find(|s| *s != shards.of_account(&lost) && *s != shards.of_account(&fresh))
        .expect("a third shard");
    let _: () = redis::cmd("DEL")
        .arg(shards.epoch_key(other))
        .query(&mut con)
        .expect("del epoch");
    let again = restore(ledger.clone(), store.clone(), RestoreMode::Lost, |_, _| {})
        .await
        .expect("restore of one shard");
    let rebuilt: Vec<u16> = again
        .shards
        .iter()
        .filter(|s| !s.skipped)
        .map(|s| s.shard)
        .collect();
    assert_eq!(rebuilt, vec![other]);
    assert_eq!(
        available(&ledger, &lost).await,
        Ok(600),
        "the charge since stays"
    );

    // Every shard serves now: a second restore is refused and changes nothing.
    match restore(ledger.clone(), store.clone(), RestoreMode::Lost, |_, _| {}).await {
        Err(RestoreError::NotEmpty(_)) => {}
        other => panic!("restore with every shard serving: {other:?}"),
    }
    tollgate::server::restore_lost_shards(&ledger, store.clone())
        .await
        .expect("serve --restore with nothing lost");
    assert_eq!(available(&ledger, &fresh).await, Ok(300));

    // A shard with wallets but neither an epoch marker nor a restore's marker: data of
    // unknown origin. Restore refuses it, and `serve --restore` serves the other shards
    // instead of failing to start.
    let _: () = redis::cmd("DEL")
        .arg(shards.epoch_key(shards.of_account(&lost)))
        .query(&mut con)
        .expect("del epoch");
    match restore(ledger.clone(), store.clone(), RestoreMode::Lost, |_, _| {}).await {
        Err(RestoreError::NotEmpty(found)) => {
            assert!(found.contains("a wallet in shard"), "{found}");
            assert!(!found.contains(&lost), "the account id is logged: {found}");
        }
        other => panic!("restore over a half-written shard: {other:?}"),
    }
    tollgate::server::restore_lost_shards(&ledger, store.clone())
        .await
        .expect("serve --restore after a restore died partway");
    assert_eq!(available(&ledger, &fresh).await, Ok(300));

    // `--force` rewrites that shard from the store (drained first: what it held goes) and
    // leaves the serving shards alone, a charge not yet settled included. Not while the
    // shard has dead letters (their events are in Redis but not in the store): those are
    // replayed or dropped first, and the dead-letter streams themselves stay.
    settler.drain(DEADLINE).await.expect("settled");
    ledger
        .grant(&common::purchase(&fresh, 50, "g-fresh-2"))
        .await
        .expect("an unsettled grant on a serving shard");
    let (lost_shard, fresh_shard) = (shards.of_account(&lost), shards.of_account(&fresh));
    let mut dead_ids = Vec::new();
    for shard in [lost_shard, fresh_shard] {
        let id: String = redis::cmd("XADD")
            .arg(dead_letters_key(shards.outbox(shard)))
            .arg("*")
            .arg("id")
            .arg("1-1")
            .arg("error")
            .arg("unreadable")
            .query(&mut con)
            .expect("xadd dead letter");
        dead_ids.push(id);
    }
    let newest = |con: &mut redis::Connection, shard: u16| -> Vec<(String, redis::Value)> {
        redis::cmd("XREVRANGE")
            .arg(shards.outbox(shard))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query(con)
            .expect("xrevrange")
    };
    let epoch = |con: &mut redis::Connection, shard: u16| -> Option<String> {
        redis::cmd("GET")
            .arg(shards.epoch_key(shard))
            .query(con)
            .expect("get epoch")
    };
    let dead_streams = |con: &mut redis::Connection| -> Vec<(i64, i64)> {
        [lost_shard, fresh_shard]
            .iter()
            .map(|s| {
                let key = dead_letters_key(shards.outbox(*s));
                let exists: i64 = redis::cmd("EXISTS").arg(&key).query(con).expect("exists");
                let len: i64 = redis::cmd("XLEN").arg(&key).query(con).expect("xlen");
                (exists, len)
            })
            .collect()
    };
    let fresh_newest = newest(&mut con, fresh_shard);
    let fresh_epoch = epoch(&mut con, fresh_shard);
    assert!(fresh_epoch.is_some());
    match restore(ledger.clone(), store.clone(), RestoreMode::Force, |_, _| {}).await {
        Err(RestoreError::DeadLetters(why)) => {
            assert!(why.contains(&format!("shard {lost_shard}: 1")), "{why}")
        }
        other => panic!("--force over a shard with dead letters: {other:?}"),
    }
    assert!(available(&ledger, &lost).await.is_err(), "nothing restored");
    tollgate::settle::dead_letters::drop_letter(&ledger, lost_shard, &dead_ids[0])
        .await
        .expect("drop the dead letter");
    let forced = restore(ledger.clone(), store.clone(), RestoreMode::Force, |_, _| {})
        .await
        .expect("restore --force");
    let rebuilt: Vec<u16> = forced
        .shards
        .iter()
        .filter(|s| !s.skipped)
        .map(|s| s.shard)
        .collect();
    assert_eq!(rebuilt, vec![lost_shard]);
    assert_eq!(available(&ledger, &lost).await, Ok(600));
    assert_eq!(
        available(&ledger, &fresh).await,
        Ok(350),
        "the unsettled grant stays"
    );
    assert_eq!(newest(&mut con, fresh_shard), fresh_newest);
    assert_eq!(epoch(&mut con, fresh_shard), fresh_epoch);
    assert_eq!(dead_streams(&mut con), vec![(1, 0), (1, 1)]);

    // `--rebuild-serving` rewrites every shard, but only once nothing is set aside and
    // everything is settled.
    let group = tollgate::settle::settler::DEFAULT_GROUP.to_owned();
    let rebuild = || {
        restore(
            ledger.clone(),
            store.clone(),
            RestoreMode::RebuildServing {
                group: group.clone(),
            },
            |_, _| {},
        )
    };
    match rebuild().await {
        Err(RestoreError::DeadLetters(why)) => {
            assert!(why.contains(&format!("shard {fresh_shard}: 1")), "{why}")
        }
        other => panic!("a rebuild with a dead letter: {other:?}"),
    }
    tollgate::settle::dead_letters::drop_letter(&ledger, fresh_shard, &dead_ids[1])
        .await
        .expect("drop the dead letter");
    match rebuild().await {
        Err(RestoreError::Unsettled(why)) => {
            assert!(why.contains(shards.outbox(fresh_shard)), "{why}")
        }
        other => panic!("a rebuild with an unsettled grant: {other:?}"),
    }
    assert_eq!(available(&ledger, &fresh).await, Ok(350));
    settler.drain(DEADLINE).await.expect("settled");
    let everything = rebuild().await.expect("restore --rebuild-serving");
    assert!(everything.shards.iter().all(|s| !s.skipped));
    assert_eq!(available(&ledger, &lost).await, Ok(600));
    assert_eq!(available(&ledger, &fresh).await, Ok(350));
    assert_ne!(epoch(&mut con, fresh_shard), fresh_epoch, "rebuilt");
    assert_eq!(dead_streams(&mut con), vec![(1, 0), (1, 0)]);
}

/// A SIGHUP before `serve --restore` serves (here while its restore waits for the store's
/// migration lock, which the test holds: for up to `STORE_STARTUP_WAIT`, 5 s, and the
/// SIGHUP is sent as soon as the wait is seen) is logged and ignored; its default action
/// would end the process. Once the lock is free the background restore runs, and the
/// server (serving by then) turns ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_during_serve_restore_is_ignored() {
    let (redis, pg, ledger, _store) = settled_then_lost("hup", 700).await;

    // The migration lock (src/settle/store.rs), held until the end of this transaction.
    let pool = sqlx::PgPool::connect(&pg.url).await.expect("pg");
    let mut lock = pool.begin().await.expect("begin");
    sqlx::query("SELECT pg_advisory_xact_lock(7157680)")
        .execute(&mut *lock)
        .await
        .expect("lock");

    let log = common::temp_path("log");
    let stderr = common::temp_path("stderr");
    let serve_restore = |grpc_port: u16, http_port: u16| {
        let mut cmd = common::tollgate();
        cmd.arg("serve")
            .arg("--restore")
            .arg(format!("--redis-url={}", redis.url()))
            .arg(format!("--store={}", pg.url))
            .arg(format!("--grpc-addr=127.0.0.1:{grpc_port}"))
            .arg(format!("--http-addr=127.0.0.1:{http_port}"))
            .env("TOLLGATE_ADMIN_TOKEN", common::ADMIN_TOKEN)
            .env("TOLLGATE_SERVICE_TOKEN", common::SERVICE_TOKEN)
            .env("RUST_LOG", "info")
            .stdout(std::fs::File::create(&log).expect("log"));
        cmd
    };
    // Its ports are bound only after the restore: picked free now, they may be taken by
    // then (see below).
    let (grpc_port, http_port) = (common::free_port(), common::free_port());
    let mut server = common::KillOnDrop(
        serve_restore(grpc_port, http_port)
            .stderr(std::fs::File::create(&stderr).expect("stderr"))
            .spawn()
            .expect("start tollgate serve --restore"),
    );
    common::eventually(
        common::START_TIMEOUT,
        "serve --restore waits for the lock",
        || {
            let pool = pool.clone();
            // In this test's database (`pool`'s): other tests' stores take the same lock
            // in theirs.
            async move {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_locks \
                     WHERE locktype = 'advisory' AND objid = 7157680 AND NOT granted \
                     AND database = (SELECT oid FROM pg_database \
                     WHERE datname = current_database())",
                )
                .fetch_one(&pool)
                .await
                .expect("pg_locks");
                (waiting > 0).then_some(())
            }
        },
    )
    .await;
    let pid = server.0.id().to_string();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill -HUP");
    assert!(status.success());
    common::eventually(common::START_TIMEOUT, "the SIGHUP is logged", || {
        let ended = server.0.try_wait().expect("try_wait");
        assert!(
            ended.is_none(),
            "serve --restore ended on SIGHUP: {ended:?}"
        );
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        async move { text.contains("SIGHUP before serving").then_some(()) }
    })
    .await;
    lock.rollback().await.expect("unlock");

    // Restored and serving (the answer its own: it listens on both ports first); if
    // another process took a port meanwhile, the restore is done and the child ended
    // unable to listen: serving again on ports picked anew.
    let http_addr: std::net::SocketAddr = ([127, 0, 0, 1], http_port).into();
    let deadline = Instant::now() + DEADLINE;
    let mut _again = None;
    loop {
        let ready = common::listens_on(server.0.id(), &[grpc_port, http_port])
            && http_status(http_addr, "/readyz").await.0 == 200;
        if let Some(status) = server.0.try_wait().expect("try_wait") {
            let text = common::read_lossy(&stderr);
            assert!(
                text.contains(common::PORT_TAKEN),
                "serve --restore ended ({status}); its stderr:\n{text}"
            );
            _again = Some(
                common::spawn_listening(
                    2,
                    DEADLINE,
                    |ports| serve_restore(ports[0], ports[1]),
                    |ports| async move {
                        let http_addr = ([127, 0, 0, 1], ports[1]).into();
                        http_status(http_addr, "/readyz").await.0 == 200
                    },
                )
                .await,
            );
            break;
        }
        if ready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "serve --restore never restored and served; its stderr:\n{}",
            common::read_lossy(&stderr)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(available(&ledger, "hup").await, Ok(700));
}

/// `serve --restore` whose store hangs (another process holds the schema's migration
/// lock) serves after a bounded wait instead of waiting for the store: `/healthz`
/// answers, and the lost shard refuses charges meanwhile (not ready). Once the store
/// answers, the background restore rebuilds the shard. Its look before serving used to
/// wait for the store for as long as it hung, the process serving nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_restore_whose_store_hangs_serves_and_restores_once_it_answers() {
    let (redis, pg, ledger, _store) = settled_then_lost("hang", 300).await;
    // The migration lock (src/settle/store.rs), held until the end of this transaction.
    let pool = sqlx::PgPool::connect(&pg.url).await.expect("pg");
    let mut lock = pool.begin().await.expect("begin");
    sqlx::query("SELECT pg_advisory_xact_lock(7157680)")
        .execute(&mut *lock)
        .await
        .expect("lock");

    let redis_url = redis.url();
    let mut server = common::spawn_listening(
        2,
        DEADLINE,
        |ports| {
            let mut cmd = common::tollgate();
            cmd.arg("serve")
                .arg("--restore")
                .arg(format!("--redis-url={redis_url}"))
                .arg(format!("--store={}", pg.url))
                .arg(format!("--grpc-addr=127.0.0.1:{}", ports[0]))
                .arg(format!("--http-addr=127.0.0.1:{}", ports[1]))
                .env("TOLLGATE_ADMIN_TOKEN", common::ADMIN_TOKEN)
                .env("TOLLGATE_SERVICE_TOKEN", common::SERVICE_TOKEN)
                .stdout(std::process::Stdio::null());
            cmd
        },
        // Each probe bounded: a server that does not serve yet answers nothing.
        |ports| async move {
            let http_addr = ([127, 0, 0, 1], ports[1]).into();
            tokio::time::timeout(Duration::from_secs(5), http_status(http_addr, "/healthz"))
                .await
                .is_ok_and(|(code, _)| code == 200)
        },
    )
    .await;
    let http_addr: std::net::SocketAddr = ([127, 0, 0, 1], server.ports[1]).into();
    // The lock is still held: nothing was restored, and the lost shard does not serve.
    assert_ne!(available(&ledger, "hang").await, Ok(300));
    assert_eq!(http_status(http_addr, "/readyz").await.0, 503);

    lock.rollback().await.expect("unlock");
    common::eventually(DEADLINE, "the lost shard restored", || async {
        (available(&ledger, "hang").await == Ok(300)).then_some(())
    })
    .await;
    common::eventually(DEADLINE, "ready once restored", || async {
        (http_status(http_addr, "/readyz").await.0 == 200).then_some(())
    })
    .await;
    server.assert_running("after the restore");
}

/// `serve --restore` started while Redis is down (a pod rescheduled during a Redis
/// outage) serves: it used to exit at once ("redis unavailable"), so the pod crashed in
/// a loop for as long as the outage lasted. It answers `/healthz`, is ready with Redis
/// listed as degraded, and once Redis is back (empty: its data lost) the background
/// restore rebuilds the lost shard at its next look (every 5 s; after a look that met
/// Redis down it used to wait a minute, the shard refusing charges meanwhile).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_restore_started_while_redis_is_down_serves_and_restores_once_it_is_back() {
    let (mut redis, pg, ledger, _store) = settled_then_lost("late", 400).await;
    redis.kill();
    let redis_url = redis.url();
    let log = common::temp_path("log");
    let mut server = common::spawn_listening(
        2,
        DEADLINE,
        |ports| {
            let mut cmd = common::tollgate();
            cmd.arg("serve")
                .arg("--restore")
                .arg(format!("--redis-url={redis_url}"))
                .arg(format!("--store={}", pg.url))
                .arg(format!("--grpc-addr=127.0.0.1:{}", ports[0]))
                .arg(format!("--http-addr=127.0.0.1:{}", ports[1]))
                .env("TOLLGATE_ADMIN_TOKEN", common::ADMIN_TOKEN)
                .env("TOLLGATE_SERVICE_TOKEN", common::SERVICE_TOKEN)
                .env("RUST_LOG", "info")
                .stdout(std::fs::File::create(&log).expect("log"));
            cmd
        },
        |ports| async move {
            let http_addr = ([127, 0, 0, 1], ports[1]).into();
            http_status(http_addr, "/healthz").await.0 == 200
        },
    )
    .await;
    let http_addr: std::net::SocketAddr = ([127, 0, 0, 1], server.ports[1]).into();
    // The readiness body's `degraded` list.
    let degraded = |text: &str| -> Vec<String> {
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|json| serde_json::from_value(json["degraded"].clone()).ok())
            .unwrap_or_default()
    };
    let (code, body) = http_status(http_addr, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    assert!(degraded(&body).iter().any(|d| d == "redis"), "{body}");
    let (_, metrics) = http_status(http_addr, "/metrics").await;
    assert!(
        common::prom::has(&metrics, "tollgate_redis_up"),
        "{metrics}"
    );
    assert_eq!(
        common::prom::value(&metrics, "tollgate_redis_up", &[]),
        0.0,
        "{metrics}"
    );
    server.assert_running("serving while Redis is down");
    // The background restore has looked once, and met Redis down (the look before
    // serving logs "before serving").
    common::eventually(DEADLINE, "a background look failing", || {
        let text = common::read_lossy(&log);
        async move {
            text.lines()
                .any(|l| l.contains("trying again") && !l.contains("before serving"))
                .then_some(())
        }
    })
    .await;

    redis.restart();
    // Far less than the minute it used to wait; far more than its 5 s.
    common::eventually(
        Duration::from_secs(40),
        "the lost shard restored",
        || async { (available(&ledger, "late").await == Ok(400)).then_some(()) },
    )
    .await;
    common::eventually(DEADLINE, "ready with nothing degraded", || async {
        let (code, body) = http_status(http_addr, "/readyz").await;
        (code == 200 && degraded(&body).is_empty()).then_some(())
    })
    .await;
    let (_, metrics) = http_status(http_addr, "/metrics").await;
    assert_eq!(
        common::prom::value(&metrics, "tollgate_redis_up", &[]),
        1.0,
        "{metrics}"
    );
    server.assert_running("after the restore");
}

/// `server.restore`: a serving process rebuilds by itself, in the background, the shards
/// Redis lost while it serves; nobody runs `tollgate restore`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serving_process_restores_the_shards_redis_loses() {
    let redis = common::RedisServer::start();
    let pg = common::PgDatabase::create().await;
    let mut config = common::test_config(&redis.url());
    config.store.url = pg.url.clone();
    config.settler.enabled = true;
    config.settler.idle_wait_ms = 10;
    config.server.restore = true;
    let server = common::TestServer::start(config, Clock::Redis).await;
    server
        .ledger
        .grant(&common::purchase("bg", 500, "g-bg"))
        .await
        .expect("grant");
    let store = Store::connect_lazy(&pg.url, 2).expect("store");
    wait_settled(&store, &server.ledger).await;

    let mut con = redis.client().get_connection().expect("redis");
    let _: () = redis::cmd("FLUSHALL").query(&mut con).expect("flushall");
    let ledger = server.ledger.clone();
    common::eventually(DEADLINE, "the lost shard restored while serving", || {
        let ledger = ledger.clone();
        async move { (available(&ledger, "bg").await == Ok(500)).then_some(()) }
    })
    .await;
    server.stop().await;
}

/// A restore that died partway leaves its marker in the shard it was writing. The next
/// restore (the plain one `serve --restore` runs) then deletes that shard's half-written
/// state and rebuilds it, where a shard holding data of unknown origin (no marker) is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_a_dead_restore_half_wrote_is_rebuilt_by_the_next() {
    use tollgate::settle::restore::{restore, restoring_key, RestoreError, RestoreMode};

    let (redis, _pg, ledger, store) = settled_then_lost("half", 1000).await;
    let mut con = redis.client().get_connection().expect("redis");
    let shard = ledger.shards().of_account("half");
    let marked = |con: &mut redis::Connection| -> Option<String> {
        redis::cmd("GET")
            .arg(restoring_key(&ledger, shard))
            .query(con)
            .expect("get marker")
    };
    // A restore that fails partway: a string where it writes the wallet's burn index
    // makes its pipeline fail after the wallet itself was written. It leaves its marker.
    let burn_index = format!("{}:b:half:default", ledger.shards().tag(shard));
    let _: () = redis::cmd("SET")
        .arg(&burn_index)
        .arg("in the way")
        .query(&mut con)
        .expect("set");
    let failed = restore(ledger.clone(), store.clone(), RestoreMode::Lost, |_, _| {}).await;
    assert!(failed.is_err(), "{failed:?}");
    assert!(
        marked(&mut con).is_some(),
        "a restore marks the shard it writes"
    );
    assert!(available(&ledger, "half").await.is_err(), "not serving");
    let _: () = redis::cmd("DEL")
        .arg(&burn_index)
        .query(&mut con)
        .expect("del");
    restore(ledger.clone(), store.clone(), RestoreMode::Lost, |_, _| {})
        .await
        .expect("the next restore redoes the shard");
    assert_eq!(available(&ledger, "half").await, Ok(1000));
    assert_eq!(
        marked(&mut con),
        None,
        "the marker goes with the epoch's writing"
    );

    let wallet_key = format!("{}:w:half:default", ledger.shards().tag(shard));
    let half_write = |con: &mut redis::Connection, marker: bool| {
        let _: () = redis::cmd("DEL")
            .arg(ledger.shards().epoch_key(shard))
            .query(con)
            .expect("del epoch");
        let _: () = redis::cmd("HSET")
            .arg(&wallet_key)
            .arg("r")
            .arg(7)
            .query(con)
            .expect("hset");
        if marker {
            let _: () = redis::cmd("SET")
                .arg(restoring_key(&ledger, shard))
                .arg("a-restore-that-died")
                .query(con)
                .expect("set marker");
        }
    };
    half_write(&mut con, false);
    match restore(ledger.clone(), store.clone(), RestoreMode::Lost, |_, _| {}).await {
        Err(RestoreError::NotEmpty(found)) => {
            assert!(found.contains("a wallet in shard"), "{found}");
            assert!(!found.contains("half"), "the account id is logged: {found}");
        }
        other => panic!("a half-written shard without a marker: {other:?}"),
    }
    half_write(&mut con, true);
    let report = restore(ledger.clone(), store.clone(), RestoreMode::Lost, |_, _| {})
        .await
        .expect("the next restore redoes the shard");
    let rebuilt: Vec<u16> = report
        .shards
        .iter()
        .filter(|s| !s.skipped)
        .map(|s| s.shard)
        .collect();
    assert_eq!(rebuilt, vec![shard]);
    assert_eq!(available(&ledger, "half").await, Ok(1000));
    let marker: i64 = redis::cmd("EXISTS")
        .arg(restoring_key(&ledger, shard))
        .query(&mut con)
        .expect("exists");
    assert_eq!(marker, 0, "the marker goes with the shard's epoch");
}

/// A batch a settler read from a Redis that then lost its data, written after a restore
/// read the store, would put a charge in the store the rebuilt Redis never had: every
/// later event of the wallet then disagrees with it, reconcile reports a drift, and the
/// next restore cannot replay the shard. The restore raises the shard's fence in the
/// store first, so the late batch is refused; the ledger stays whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_read_from_the_lost_redis_cannot_land_after_the_restore() {
    use tollgate::ledger::{Debit, Metadata};
    use tollgate::settle::restore::{restore, RestoreMode};
    use tollgate::settle::settler::{Settler, SettlerSettings};

    let debit = |key: &str, amount: i64| Debit {
        account_id: "fenced".into(),
        wallet: "default".into(),
        amount,
        idempotency_key: key.into(),
        operation: "op".into(),
        metadata: Metadata::new(),
        member_id: String::new(),
        price_inputs: None,
        attempt_mark: None,
    };
    let settings = |consumer: &str| SettlerSettings {
        consumer: consumer.into(),
        claim_idle: Duration::from_millis(300),
        idle_wait: Duration::from_millis(10),
        backoff_max: Duration::from_millis(300),
        ..SettlerSettings::default()
    };
    let mut redis = common::RedisServer::start();
    let pg = common::PgDatabase::create().await;
    // The settler reaches PostgreSQL through a proxy the test can cut.
    let host = pg
        .url
        .split_once("://")
        .map(|(_, rest)| rest.split_once('@').map_or(rest, |(_, r)| r))
        .and_then(|rest| rest.split('/').next())
        .expect("a host:port in the test database url")
        .to_owned();
    let pg_addr = std::net::ToSocketAddrs::to_socket_addrs(host.as_str())
        .ok()
        .and_then(|mut addrs| addrs.next())
        .expect("the test database's address");
    let proxy = common::proxy::FaultProxy::start(pg_addr).await;
    let via_proxy = pg.url.replacen(&host, &proxy.addr.to_string(), 1);
    let ledger = common::ledger(&redis, Clock::Redis);
    let store = Arc::new(Store::connect_lazy(&pg.url, 2).expect("store"));
    store.migrate().await.expect("migrate");
    let settler_store = Arc::new(Store::connect_lazy(&via_proxy, 2).expect("store"));

    ledger
        .grant(&common::purchase("fenced", 100, "g"))
        .await
        .expect("grant");
    let settler = Settler::new(ledger.clone(), settler_store, settings("s1"));
    let status = settler.status();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(settler.run(async move {
        let _ = stopped.await;
    }));
    let deadline = Instant::now() + DEADLINE;
    while store.count_events().await.expect("count") < 1 {
        assert!(Instant::now() < deadline, "the grant was never settled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The settler's way to the database breaks while it holds a debit it read.
    proxy.cut();
    ledger.debit(&debit("d1", 30)).await.expect("debit");
    let deadline = Instant::now() + DEADLINE;
    while status.lock().expect("status").store_error.is_none() {
        assert!(
            Instant::now() < deadline,
            "the debit's batch never failed to commit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Redis loses its data; the operator restores it from the store the settler cannot
    // reach: the debit is not there.
    redis.restart();
    reconnected(&ledger).await;
    let report = restore(ledger.clone(), store.clone(), RestoreMode::Lost, |_, _| {})
        .await
        .expect("restore");
    assert!(report.shards.iter().any(|s| s.wallets > 0), "{report:?}");
    assert_eq!(available(&ledger, "fenced").await, Ok(100));

    // The settler reaches the database again: its batch from the lost Redis is refused.
    proxy.restore();
    let deadline = Instant::now() + DEADLINE;
    while status.lock().expect("status").store_error.is_some() {
        assert!(Instant::now() < deadline, "the settler never wrote again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(store.count_events().await.expect("count"), 1);

    // The rebuilt Redis goes on, and its own events settle.
    ledger.debit(&debit("d2", 10)).await.expect("debit");
    let deadline = Instant::now() + DEADLINE;
    while store.count_events().await.expect("count") < 2 {
        assert!(
            Instant::now() < deadline,
            "the rebuilt shard's debit never settled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(());
    let _ = task.await;
    let reconciled = tollgate::settle::reconcile::reconcile(
        ledger.clone(),
        store.clone(),
        settings("reconcile"),
        DEADLINE,
    )
    .await
    .expect("reconcile");
    assert!(reconciled.drifts.is_empty(), "{}", reconciled.render());

    // A later loss is restored from a ledger that still replays.
    redis.restart();
    reconnected(&ledger).await;
    restore(ledger.clone(), store.clone(), RestoreMode::Lost, |_, _| {})
        .await
        .expect("a second restore");
    assert_eq!(available(&ledger, "fenced").await, Ok(90));
}

/// A shard marked new by a sidecar whose clock is an hour ahead of the host that later
/// restores it: the restore's fence, and the rebuilt shard's epoch marker (the same
/// value), must rise above the marker the shard's events were settled under, or a late
/// batch read from the lost Redis (a debit the restore never saw) would still be taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_fences_a_shard_marked_by_a_sidecar_whose_clock_is_ahead() {
    use tollgate::ledger::{Debit, Metadata};
    use tollgate::settle::restore::{restore, RestoreMode};
    use tollgate::settle::settler::{Settler, SettlerSettings};

    let mut redis = common::RedisServer::start();
    let client = redis.client();
    let mut con = client.get_connection().expect("redis");
    let ledger = common::ledger(&redis, Clock::Redis);
    let shards = ledger.shards().count();
    // The sidecar that marked the shards new had a clock an hour ahead of this host's.
    let ahead = tollgate::ledger::wall_clock_ms() + 3_600_000;
    for shard in 0..shards {
        let _: () = redis::cmd("SET")
            .arg(ledger.shards().epoch_key(shard))
            .arg(ahead)
            .query(&mut con)
            .expect("marker");
    }
    ledger
        .grant(&common::purchase("ahead", 100, "g"))
        .await
        .expect("grant");
    let pg = common::PgDatabase::create().await;
    let store = Arc::new(Store::connect_lazy(&pg.url, 2).expect("store"));
    store.migrate().await.expect("migrate");
    let mut settler = Settler::new(
        ledger.clone(),
        store.clone(),
        SettlerSettings {
            consumer: "s1".into(),
            ..SettlerSettings::default()
        },
    );
    settler.drain(DEADLINE).await.expect("settled");
    // A debit a settler read but could not write before Redis lost its data.
    ledger
        .debit(&Debit {
            account_id: "ahead".into(),
            wallet: "default".into(),
            amount: 30,
            idempotency_key: "lost".into(),
            operation: "op".into(),
            metadata: Metadata::new(),
            member_id: String::new(),
            price_inputs: None,
            attempt_mark: None,
        })
        .await
        .expect("debit");
    let lost: Vec<_> = common::outbox_events(&ledger)
        .await
        .into_iter()
        .filter(|e| e.kind.as_str() == "debit")
        .collect();
    assert_eq!(lost.len(), 1, "{lost:?}");
    let shard = lost[0].shard();

    redis.restart();
    reconnected(&ledger).await;
    restore(ledger.clone(), store.clone(), RestoreMode::Lost, |_, _| {})
        .await
        .expect("restore");
    assert_eq!(available(&ledger, "ahead").await, Ok(100));
    let mut con = client.get_connection().expect("redis");
    let marker: i64 = redis::cmd("GET")
        .arg(ledger.shards().epoch_key(shard))
        .query(&mut con)
        .expect("the rebuilt shard's marker");
    assert!(
        marker > ahead,
        "the rebuilt shard's marker {marker} is not above the lost one's {ahead}"
    );
    let pool = sqlx::PgPool::connect(&pg.url).await.expect("pg");
    let fence: i64 = sqlx::query_scalar("SELECT epoch FROM tollgate_shard_fences WHERE shard = $1")
        .bind(i64::from(shard))
        .fetch_one(&pool)
        .await
        .expect("fence");
    assert_eq!(fence, marker, "the marker is the fence");

    // The late batch, read under the lost Redis's marker, is refused.
    let epochs = vec![Some(ahead); usize::from(shards)];
    let late = store
        .append_batch(&lost, Some(&epochs), None)
        .await
        .expect("late batch");
    assert_eq!(late.fenced, vec![lost[0].event_id.clone()], "{late:?}");
    assert_eq!(store.count_events().await.expect("count"), 1);
}

/// Holds opened in the loss window (applied by the lost Redis, never settled) had their
/// ids handed to their callers. The restore moves each shard's hold id sequence
/// `HOLD_SEQ_GAP` past the highest settled one, so no new hold gets one of those ids, and
/// a late capture of a lost hold finds no hold instead of ending another caller's. One
/// account's shard has settled holds, the other's only a grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_never_hands_out_a_lost_hold_id_again() {
    use tollgate::ledger::{Authorize, EndHold, LedgerError, Metadata, OnExpiry};
    use tollgate::settle::restore::{restore, RestoreMode, HOLD_SEQ_GAP};
    use tollgate::settle::settler::{Settler, SettlerSettings};

    let redis = common::RedisServer::start();
    let pg = common::PgDatabase::create().await;
    let ledger = common::ledger(&redis, Clock::Redis);
    let store = Arc::new(Store::connect_lazy(&pg.url, 2).expect("store"));
    store.migrate().await.expect("migrate");
    let held = "ids-held";
    let shard = ledger.shards().of_account(held);
    let quiet = (0..)
        .map(|i| format!("ids-quiet{i}"))
        .find(|a| ledger.shards().of_account(a) != shard)
        .expect("an account in another shard");
    let authorize = |account: &str, key: &str| Authorize {
        account_id: account.into(),
        wallet: "default".into(),
        amount: 10,
        ttl_ms: 600_000,
        on_expiry: OnExpiry::Release,
        idempotency_key: key.into(),
        operation: "op".into(),
        metadata: Metadata::new(),
        member_id: String::new(),
        price_inputs: None,
        attempt_mark: None,
    };
    let seq = |hold_id: &str| -> i64 {
        hold_id
            .rsplit_once('-')
            .and_then(|(_, s)| s.parse().ok())
            .expect("a hold id h<shard>-<seq>")
    };
    for account in [held, quiet.as_str()] {
        ledger
            .grant(&common::purchase(account, 1000, "g"))
            .await
            .expect("grant");
    }
    let mut settled_max = 0;
    for key in ["h1", "h2"] {
        let hold = ledger.authorize(&authorize(held, key)).await.expect("hold");
        settled_max = settled_max.max(seq(&hold.hold_id));
    }
    let mut settler = Settler::new(
        ledger.clone(),
        store.clone(),
        SettlerSettings {
            consumer: "ids-test".into(),
            ..SettlerSettings::default()
        },
    );
    settler.drain(DEADLINE).await.expect("settled");
    // The loss window: holds Redis applied and the store never got.
    let mut lost = Vec::new();
    for account in [held, quiet.as_str()] {
        let hold = ledger
            .authorize(&authorize(account, "lost"))
            .await
            .expect("lost hold");
        lost.push(hold.hold_id);
    }
    let mut con = redis.client().get_connection().expect("redis");
    let _: () = redis::cmd("FLUSHALL").query(&mut con).expect("flushall");

    restore(ledger.clone(), store.clone(), RestoreMode::Lost, |_, _| {})
        .await
        .expect("restore");
    let mut fresh = Vec::new();
    for account in [held, quiet.as_str()] {
        let hold = ledger
            .authorize(&authorize(account, "after"))
            .await
            .expect("hold after the restore");
        assert!(
            !lost.contains(&hold.hold_id),
            "{} issued again",
            hold.hold_id
        );
        fresh.push(hold.hold_id);
    }
    assert!(
        seq(&fresh[0]) > settled_max + HOLD_SEQ_GAP,
        "{fresh:?} settled max {settled_max}"
    );
    assert!(seq(&fresh[1]) > HOLD_SEQ_GAP, "{fresh:?}");
    // A late capture of a lost hold finds none.
    for hold_id in lost {
        let late = ledger
            .end_hold(&EndHold::capture(hold_id.clone(), None, "late".into()))
            .await;
        assert!(
            matches!(late, Err(LedgerError::NotFound(_))),
            "{hold_id}: {late:?}"
        );
    }
    assert_eq!(available(&ledger, held).await, Ok(1000 - 2 * 10 - 10));
    assert_eq!(available(&ledger, &quiet).await, Ok(1000 - 10));
}

/// Redis's real time in ms (TIME).
fn redis_ms(redis: &common::RedisServer) -> i64 {
    let mut con = redis.client().get_connection().expect("redis");
    let (secs, micros): (i64, i64) = redis::cmd("TIME").query(&mut con).expect("TIME");
    secs * 1000 + micros / 1000
}

/// A Redis that rolls back without losing its epoch marker (here a replica promoted
/// after missing the primary's last writes; a restart from an everysec AOF or an RDB
/// snapshot is the same) has an older hold id sequence than the ids it handed out. It
/// must still never give a new hold the id of a lost one: a late capture of alice's lost
/// hold would otherwise capture bob's new hold of the same id. The sequence is floored
/// by Redis's clock (lib.lua `next_seq`), and the promoted replica comes back later in
/// time than the lost holds were opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_redis_never_hands_out_a_lost_hold_id_again() {
    use tollgate::ledger::{Authorize, EndHold, LedgerError, Metadata, OnExpiry};

    let primary = common::RedisServer::start();
    let replica = common::replica_of(&primary);
    let before = common::ledger(&primary, Clock::Redis);
    let alice = "rollback-alice";
    let shard = before.shards().of_account(alice);
    // Both in one shard: they share its hold id sequence.
    let bob = (0..)
        .map(|i| format!("rollback-bob{i}"))
        .find(|a| before.shards().of_account(a) == shard)
        .expect("an account in alice's shard");
    let authorize = |account: &str, key: &str| Authorize {
        account_id: account.into(),
        wallet: "default".into(),
        amount: 10,
        ttl_ms: 600_000,
        on_expiry: OnExpiry::Release,
        idempotency_key: key.into(),
        operation: "op".into(),
        metadata: Metadata::new(),
        member_id: String::new(),
        price_inputs: None,
        attempt_mark: None,
    };
    for account in [alice, bob.as_str()] {
        before
            .grant(&common::purchase(account, 1000, "g"))
            .await
            .expect("grant");
    }
    let kept = before
        .authorize(&authorize(alice, "kept"))
        .await
        .expect("hold");
    {
        let mut con = primary.client().get_connection().expect("redis");
        let acked: i64 = redis::cmd("WAIT")
            .arg(1)
            .arg(60_000)
            .query(&mut con)
            .expect("WAIT");
        assert_eq!(acked, 1, "the replica has everything so far");
    }
    // The failover: the replica is promoted, so the primary's next writes are lost.
    replica.writable();
    let mut lost = Vec::new();
    for key in ["lost1", "lost2", "lost3"] {
        let hold = before
            .authorize(&authorize(alice, key))
            .await
            .expect("a hold the promoted replica never gets");
        lost.push(hold.hold_id);
    }
    // As any real failover: the promoted Redis serves later than the lost writes were made
    // (both servers read this host's clock).
    let lost_at = redis_ms(&primary);
    common::eventually(
        DEADLINE,
        "the replica's clock passes the lost holds",
        || async { (redis_ms(&replica) > lost_at).then_some(()) },
    )
    .await;

    let after = common::ledger(&replica, Clock::Redis);
    let mut fresh = Vec::new();
    for key in ["new1", "new2", "new3"] {
        let hold = after
            .authorize(&authorize(&bob, key))
            .await
            .expect("a hold after the rollback");
        assert!(
            !lost.contains(&hold.hold_id) && hold.hold_id != kept.hold_id,
            "{} handed out again (lost {lost:?})",
            hold.hold_id
        );
        fresh.push(hold.hold_id);
    }
    // alice's backend captures and releases its lost holds late: no hold has their ids.
    for (i, hold_id) in lost.iter().enumerate() {
        let late = after
            .end_hold(&EndHold::capture(hold_id.clone(), None, format!("late{i}")))
            .await;
        assert!(
            matches!(late, Err(LedgerError::NotFound(_))),
            "{hold_id}: {late:?}"
        );
        let late = after
            .end_hold(&EndHold::release(
                hold_id.clone(),
                format!("late-release{i}"),
            ))
            .await;
        assert!(
            matches!(late, Err(LedgerError::NotFound(_))),
            "{hold_id}: {late:?}"
        );
    }
    // bob's holds are still open and he was charged nothing; alice has only her kept hold.
    assert_eq!(available(&after, &bob).await, Ok(1000 - 3 * 10));
    assert_eq!(available(&after, alice).await, Ok(1000 - 10));
    for (i, hold_id) in fresh.iter().enumerate() {
        let released = after
            .end_hold(&EndHold::release(hold_id.clone(), format!("end{i}")))
            .await;
        assert!(released.is_ok(), "{hold_id}: {released:?}");
    }
    assert_eq!(available(&after, &bob).await, Ok(1000));
}

/// What a restore rebuilds lives as long as in the Redis it replaces: an idempotency
/// record between one and 1.5 windows old (live Redis still finds it: lookups read the
/// current bucket and the two before it) still answers a retry, and a hold ended by a
/// capture, whose answer can be replayed that long, is still found after
/// `hold_retention` (here the window) has passed, so a retry is told the hold ended
/// instead of `NOT_FOUND`. The charges are made 1.1 to 1.4 windows before the restore
/// (the test clock); the window is chosen so that the restore and the retries fall in
/// the middle of an idempotency bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_keeps_records_as_long_as_live_redis_does() {
    use tollgate::ledger::{Authorize, Debit, EndHold, LedgerError, Metadata, OnExpiry, Refusal};
    use tollgate::settle::restore::{restore, RestoreMode};
    use tollgate::settle::settler::{Settler, SettlerSettings};

    let now = tollgate::ledger::wall_clock_ms();
    // A window whose buckets (half of it) put now between 20% and 80% of one: the
    // records below are in the oldest bucket a lookup reads for minutes.
    let window_secs = (600..1800)
        .find(|w: &i64| {
            let span = w * 500;
            let into = (now % span) as f64 / span as f64;
            (0.2..0.8).contains(&into)
        })
        .expect("a window");
    let span = window_secs * 500;
    let then = (now / span - 2) * span;
    assert!(now - then > 2 * span, "older than one window");

    let redis = common::RedisServer::start();
    let pg = common::PgDatabase::create().await;
    let mut config = common::test_config(&redis.url());
    config.ledger.idempotency_window_secs = window_secs as u64;
    config.ledger.hold_retention_secs = window_secs as u64;
    let (clock, _) = Clock::manual(then);
    let ledger = tollgate::server::ledger_from_config(&config, clock).expect("ledger");
    common::initialize_blocking(&ledger, &redis.url());
    let store = Arc::new(Store::connect_lazy(&pg.url, 2).expect("store"));
    store.migrate().await.expect("migrate");

    let debit = Debit {
        account_id: "lives".into(),
        wallet: "default".into(),
        amount: 30,
        idempotency_key: "d".into(),
        operation: "op".into(),
        metadata: Metadata::new(),
        member_id: String::new(),
        price_inputs: None,
        attempt_mark: None,
    };
    ledger
        .grant(&common::purchase("lives", 1000, "g"))
        .await
        .expect("grant");
    ledger.debit(&debit).await.expect("debit");
    let hold = ledger
        .authorize(&Authorize {
            account_id: "lives".into(),
            wallet: "default".into(),
            amount: 50,
            ttl_ms: 60_000,
            on_expiry: OnExpiry::Release,
            idempotency_key: "h".into(),
            operation: "op".into(),
            metadata: Metadata::new(),
            member_id: String::new(),
            price_inputs: None,
            attempt_mark: None,
        })
        .await
        .expect("hold");
    ledger
        .end_hold(&EndHold::capture(
            hold.hold_id.clone(),
            Some(20),
            "c".into(),
        ))
        .await
        .expect("capture");
    let mut settler = Settler::new(
        ledger.clone(),
        store.clone(),
        SettlerSettings {
            consumer: "lives-test".into(),
            ..SettlerSettings::default()
        },
    );
    settler.drain(DEADLINE).await.expect("settled");
    let mut con = redis.client().get_connection().expect("redis");
    let _: () = redis::cmd("FLUSHALL").query(&mut con).expect("flushall");

    restore(ledger.clone(), store.clone(), RestoreMode::Lost, |_, _| {})
        .await
        .expect("restore");
    // The restored shard numbers its buckets by the span the records were written with,
    // so a sidecar with another window (the first to look after the restore) switches
    // from it and still finds them.
    let shard = ledger.shards().of_account("lives");
    let stored: Option<String> = redis::cmd("GET")
        .arg(ledger.shards().idem_span_key(shard))
        .query(&mut con)
        .expect("get span");
    assert_eq!(stored, Some(span.to_string()));
    let mut longer = config.clone();
    longer.ledger.idempotency_window_secs = 2 * window_secs as u64;
    let other = tollgate::server::ledger_from_config(&longer, Clock::Redis).expect("ledger");
    let again = other
        .debit(&debit)
        .await
        .expect("debit retried, other window");
    assert!(again.replayed, "the retry was charged again: {again:?}");
    assert_eq!(available(&ledger, "lives").await, Ok(1000 - 30 - 20));
    let again = ledger.debit(&debit).await.expect("debit retried");
    assert!(again.replayed, "the retry was charged again: {again:?}");
    assert_eq!(available(&ledger, "lives").await, Ok(1000 - 30 - 20));
    let late = ledger
        .end_hold(&EndHold::capture(
            hold.hold_id.clone(),
            Some(20),
            "c2".into(),
        ))
        .await;
    assert!(
        matches!(
            late,
            Err(LedgerError::Refused(Refusal::HoldEnded {
                captured: 20,
                ..
            }))
        ),
        "{late:?}"
    );
}

/// A charge older than `ledger.charge_retention_secs` is not restored (the replay does
/// not keep it either), yet refunds made while live Redis still had its record (a bucket
/// lives to the end of its hour past the retention) replay after a restore, each with what
/// the charge had refunded by then; and the restore does not fail on them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_replays_refunds_of_a_charge_older_than_the_retention() {
    use tollgate::ledger::{Debit, LedgerError, Metadata, Refund};
    use tollgate::settle::restore::{restore, RestoreMode};

    let now = tollgate::ledger::wall_clock_ms();
    let redis = common::RedisServer::start();
    let pg = common::PgDatabase::create().await;
    let mut config = common::test_config(&redis.url());
    config.ledger.charge_retention_secs = 60;
    // The debit's event time is two hours back: past the retention when restored.
    let (clock, at) = Clock::manual(now - 7_200_000);
    let ledger = tollgate::server::ledger_from_config(&config, clock).expect("ledger");
    common::initialize_blocking(&ledger, &redis.url());
    let store = Arc::new(Store::connect_lazy(&pg.url, 2).expect("store"));
    store.migrate().await.expect("migrate");
    ledger
        .grant(&common::purchase("old-charge", 1000, "g"))
        .await
        .expect("grant");
    let charge = ledger
        .debit(&Debit {
            account_id: "old-charge".into(),
            wallet: "default".into(),
            amount: 30,
            idempotency_key: "d".into(),
            operation: "op".into(),
            metadata: Metadata::new(),
            member_id: String::new(),
            price_inputs: None,
            attempt_mark: None,
        })
        .await
        .expect("debit");
    at.store(now, std::sync::atomic::Ordering::SeqCst);
    let refund = |amount, key: &str| Refund {
        charge_id: charge.event_id.clone(),
        amount,
        idempotency_key: key.into(),
        metadata: Metadata::new(),
    };
    let first = ledger.refund(&refund(10, "r1")).await.expect("refund");
    let second = ledger.refund(&refund(5, "r2")).await.expect("refund");
    assert_eq!((first.refunded_total, second.refunded_total), (10, 15));

    settle_then_lose_redis(&redis, &ledger, &store, "old-charge").await;
    restore(ledger.clone(), store.clone(), RestoreMode::Lost, |_, _| {})
        .await
        .expect("restore");
    for (amount, key, done) in [(10, "r1", &first), (5, "r2", &second)] {
        let again = ledger.refund(&refund(amount, key)).await.expect("retried");
        assert!(again.replayed, "{again:?}");
        assert_eq!(again.event_id, done.event_id);
        assert_eq!(again.refunded_total, done.refunded_total);
    }
    assert_eq!(available(&ledger, "old-charge").await, Ok(1000 - 30 + 15));
    // The charge itself was not written back, as live Redis drops it.
    let late = ledger.refund(&refund(5, "r3")).await;
    assert!(matches!(late, Err(LedgerError::NotFound(_))), "{late:?}");
}

/// Waits until the ledger's connections reach the restarted redis-server.
async fn reconnected(ledger: &tollgate::ledger::Ledger) {
    let deadline = Instant::now() + DEADLINE;
    while ledger.initialized_shards().await.is_err() {
        assert!(Instant::now() < deadline, "never reconnected to Redis");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// API keys of a shard Redis lost answer LEDGER_NOT_INITIALIZED until the restore, as
/// its charges do, and write nothing (in Redis or the store): its org records are gone
/// too, so a personal CreateApiKey on an org's account would pass the "is this account an
/// organization" check and make an org-wide key no owner or admin made, which the restore
/// would then rebuild with the org; ListApiKeys would answer an empty list as if real,
/// RevokeApiKey of a leaked key NOT_FOUND (and the key would come back live with the
/// restore), GetBalance by key id NOT_FOUND. After the restore the org has exactly the
/// key it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_of_a_lost_shard_are_refused_until_the_restore() {
    use tollgate::settle::restore::{restore, RestoreMode};

    let redis = common::RedisServer::start();
    let mut config = common::test_config(&redis.url());
    let store_url = config.store.url.clone();
    config.settler.enabled = true;
    config.settler.idle_wait_ms = 10;
    config.settler.trim_interval_ms = 100;
    let server = common::TestServer::start(config, Clock::Redis).await;
    let mut admin = server.admin().await;
    // globex: an org (owner olivia, member mallory) with one org-wide key olivia made.
    common::org_with_members(&server, "globex", "olivia", 100, &[("mallory", "member")]).await;
    let org_key = admin
        .create_api_key(pb::CreateApiKeyRequest {
            org_id: "globex".into(),
            actor_id: "olivia".into(),
            name: "ci".into(),
            ..Default::default()
        })
        .await
        .expect("org key")
        .into_inner();
    let store = Arc::new(Store::connect_lazy(&store_url, 2).expect("store"));
    wait_settled(&store, &server.ledger).await;
    let stored_keys = store.api_keys().await.expect("stored keys");
    assert_eq!(stored_keys.len(), 1, "{stored_keys:?}");

    // Redis loses its data. The store has the shard's events: it stays lost (serve marks
    // only new shards) until the restore.
    let mut con = redis.client().get_connection().expect("redis");
    let _: () = redis::cmd("FLUSHALL").query(&mut con).expect("flushall");
    let shard = server.ledger.shards().of_account("globex");
    let mut metering = server.metering().await;
    let personal = |idempotency_key: &str| pb::CreateApiKeyRequest {
        account_id: "globex".into(),
        name: "mine".into(),
        idempotency_key: idempotency_key.into(),
        ..Default::default()
    };
    let answers: Vec<(&str, Result<(), tonic::Status>)> = vec![
        (
            "a personal CreateApiKey on the org's account",
            admin.create_api_key(personal("")).await.map(|_| ()),
        ),
        (
            "the same with an idempotency key",
            admin.create_api_key(personal("mine-1")).await.map(|_| ()),
        ),
        (
            "an org CreateApiKey by the owner",
            admin
                .create_api_key(pb::CreateApiKeyRequest {
                    org_id: "globex".into(),
                    actor_id: "olivia".into(),
                    member_id: "mallory".into(),
                    name: "mallory's".into(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
        ),
        (
            "RevokeApiKey",
            admin
                .revoke_api_key(pb::RevokeApiKeyRequest {
                    key_id: org_key.key_id.clone(),
                })
                .await
                .map(|_| ()),
        ),
        (
            "ListApiKeys",
            admin
                .list_api_keys(pb::ListApiKeysRequest {
                    account_id: "globex".into(),
                })
                .await
                .map(|_| ()),
        ),
        (
            "GetBalance by key id",
            metering
                .get_balance(pb::GetBalanceRequest {
                    key_id: org_key.key_id.clone(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
        ),
    ];
    let wrong: Vec<String> = answers
        .iter()
        .filter(|(_, answer)| {
            !answer.as_ref().is_err_and(|s| {
                s.code() == tonic::Code::Unavailable
                    && s.get_details_error_info()
                        .is_some_and(|i| i.reason == "LEDGER_NOT_INITIALIZED")
            })
        })
        .map(|(what, answer)| format!("{what}: {answer:?}"))
        .collect();
    assert!(
        wrong.is_empty(),
        "not refused with LEDGER_NOT_INITIALIZED:\n{}",
        wrong.join("\n")
    );
    // Nothing written: no key record, key index or idempotency record in the shard, and
    // nothing new (or revoked) in the store.
    let tag = server.ledger.shards().tag(shard).to_owned();
    for pattern in [
        format!("{tag}:k:*"),
        format!("{tag}:ks:*"),
        format!("{tag}:kr:*"),
        format!("{tag}:ki:*"),
    ] {
        let found: Vec<String> = redis::cmd("KEYS")
            .arg(&pattern)
            .query(&mut con)
            .expect("keys");
        assert!(found.is_empty(), "{pattern}: {found:?}");
    }
    assert_eq!(store.api_keys().await.expect("stored keys"), stored_keys);

    // The restore brings back the org with the one key it had, live.
    restore(
        server.ledger.clone(),
        store.clone(),
        RestoreMode::Lost,
        |_, _| {},
    )
    .await
    .expect("restore");
    let keys = admin
        .list_api_keys(pb::ListApiKeysRequest {
            account_id: "globex".into(),
        })
        .await
        .expect("list keys")
        .into_inner()
        .keys;
    assert_eq!(
        keys.iter()
            .map(|k| (k.key_id.as_str(), k.revoked_at_ms))
            .collect::<Vec<_>>(),
        [(org_key.key_id.as_str(), 0)]
    );
    let balance = metering
        .get_balance(pb::GetBalanceRequest {
            key_id: org_key.key_id.clone(),
            ..Default::default()
        })
        .await
        .expect("balance by key id")
        .into_inner();
    assert_eq!(balance.account_id, "globex");
    server.stop().await;
}

/// A lot that expired while open holds held credits of it is listed as expired (ListLots)
/// until they end: `tollgate restore` rebuilds it so, with what of it expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_lists_an_expired_lot_that_holds_still_hold_as_before() {
    use tollgate::ledger::command::{Authorize, EndHold, OnExpiry};
    use tollgate::ledger::{Debit, Grant, Metadata};
    use tollgate::settle::restore::{restore, RestoreMode};

    const T0: i64 = 1_800_000_000_000;
    let account = "held-expired";
    let redis = common::RedisServer::start();
    let pg = common::PgDatabase::create().await;
    let (clock, now) = Clock::manual(T0);
    let ledger = common::ledger(&redis, clock);
    let store = Arc::new(Store::connect_lazy(&pg.url, 2).expect("store"));
    store.migrate().await.expect("migrate");
    ledger
        .grant(&Grant {
            expires_at_ms: T0 + 5_000,
            ..common::purchase(account, 100, "g1")
        })
        .await
        .expect("grant expiring");
    ledger
        .grant(&common::purchase(account, 100, "g2"))
        .await
        .expect("grant");
    ledger
        .debit(&Debit {
            account_id: account.into(),
            wallet: "default".into(),
            amount: 10,
            idempotency_key: "d".into(),
            operation: "op".into(),
            metadata: Metadata::new(),
            member_id: String::new(),
            price_inputs: None,
            attempt_mark: None,
        })
        .await
        .expect("debit");
    let mut holds = Vec::new();
    for (amount, key) in [(30, "h1"), (20, "h2")] {
        let hold = ledger
            .authorize(&Authorize {
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
            })
            .await
            .expect("hold");
        holds.push(hold.hold_id);
    }
    now.store(T0 + 6_000, Ordering::SeqCst);
    ledger
        .end_hold(&EndHold::capture(holds[0].clone(), Some(10), "c1".into()))
        .await
        .expect("capture");
    let before = ledger
        .lots(account, "default", 0, 100)
        .await
        .expect("lots")
        .lots;
    assert_eq!(before.len(), 2, "{before:#?}");
    assert!(before[1].expired, "{before:#?}");
    assert_eq!(
        (before[1].used, before[1].held, before[1].expired_credits),
        (20, 20, 60)
    );

    settle_then_lose_redis(&redis, &ledger, &store, account).await;
    restore(ledger.clone(), store.clone(), RestoreMode::Lost, |_, _| {})
        .await
        .expect("restore");
    let after = ledger
        .lots(account, "default", 0, 100)
        .await
        .expect("lots")
        .lots;
    assert_eq!(after, before);
}

/// A void (lua/void.lua) forgets the idempotency record of the charge it undid, so a retry
/// of the request is charged again; a restore does not bring that record back from the
/// charge's event: after it, the voided debit's and hold's retries are charged afresh,
/// while a debit nobody voided still replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_does_not_bring_back_the_record_of_a_voided_charge() {
    use tollgate::ledger::{Authorize, ChargeRef, Debit, Metadata, OnExpiry, Voided};
    use tollgate::settle::restore::{restore, RestoreMode};

    let (redis, _pg, ledger, store) = settled_then_lost("voided", 1000).await;
    let debit = |key: &str| Debit {
        account_id: "voided".into(),
        wallet: "default".into(),
        amount: 30,
        idempotency_key: key.into(),
        operation: "op".into(),
        metadata: Metadata::new(),
        member_id: String::new(),
        price_inputs: None,
        attempt_mark: None,
    };
    let hold = Authorize {
        account_id: "voided".into(),
        wallet: "default".into(),
        amount: 50,
        ttl_ms: 600_000,
        on_expiry: OnExpiry::Release,
        idempotency_key: "h".into(),
        operation: "op".into(),
        metadata: Metadata::new(),
        member_id: String::new(),
        price_inputs: None,
        attempt_mark: None,
    };
    restore(ledger.clone(), store.clone(), RestoreMode::Lost, |_, _| {})
        .await
        .expect("restore");
    let meta: Metadata = [("tollgate".to_owned(), "void".to_owned())].into();
    ledger.debit(&debit("kept")).await.expect("debit");
    let voided = ledger.debit(&debit("voided")).await.expect("debit");
    ledger.authorize(&hold).await.expect("hold");
    let out = ledger
        .void(ChargeRef::Debit(&debit("voided")), None, "v1", &meta)
        .await
        .expect("void");
    assert!(matches!(out.voided, Voided::Debit { .. }), "{out:?}");
    let out = ledger
        .void(ChargeRef::Hold(&hold), None, "v2", &meta)
        .await
        .expect("void");
    assert!(matches!(out.voided, Voided::Hold { .. }), "{out:?}");
    assert_eq!(available(&ledger, "voided").await, Ok(1000 - 30));

    settle_then_lose_redis(&redis, &ledger, &store, "voided-2").await;
    restore(ledger.clone(), store.clone(), RestoreMode::Lost, |_, _| {})
        .await
        .expect("restore");
    assert_eq!(available(&ledger, "voided").await, Ok(1000 - 30));
    let kept = ledger.debit(&debit("kept")).await.expect("debit");
    assert!(kept.replayed, "{kept:?}");
    let retried = ledger.debit(&debit("voided")).await.expect("debit");
    assert!(
        !retried.replayed,
        "the voided debit's record came back: {retried:?}"
    );
    assert_ne!(retried.event_id, voided.event_id);
    let held = ledger.authorize(&hold).await.expect("hold");
    assert!(
        !held.replayed,
        "the voided hold's record came back: {held:?}"
    );
    assert_eq!(available(&ledger, "voided").await, Ok(1000 - 30 - 30 - 50));
}

/// A void gives a debit back to its budgets, in live Redis and in a restore: the restored
/// spend leaves out a voided debit (counted once, by its retry), and a void after the
/// restore gives back to the restored budget, whose creation stamp is the restore's own
/// ("r<ms>"; lib.lua `budgets_undo_debit` once failed on it after the refund was written,
/// so the retry replayed the refunded charge's "allowed"). A part of the debit refunded
/// before its void is given back to the budget too (the void gave back only what was
/// left, live and in the restore, so the budget kept counting an undone charge).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_counts_a_voided_debit_once_and_a_later_void_gives_back_to_its_budget() {
    use tollgate::ledger::org::{BudgetPeriod, SetBudget};
    use tollgate::ledger::{ChargeRef, Debit, Metadata, Refund, Voided};
    use tollgate::settle::restore::{restore, RestoreMode};

    let (redis, _pg, ledger, store) = settled_then_lost("vb-day", 100).await;
    restore(ledger.clone(), store.clone(), RestoreMode::Lost, |_, _| {})
        .await
        .expect("restore");
    // A calendar day whose midnight is about twelve hours away, whatever the time now.
    let now_minutes = (tollgate::ledger::wall_clock_ms() / 60_000 % (24 * 60)) as i32;
    let noon_offset = (12 * 60 - now_minutes).clamp(-14 * 60, 14 * 60);
    let accounts = [
        ("vb-day", BudgetPeriod::Day, noon_offset),
        ("vb-window", BudgetPeriod::Window(3_600_000), 0),
    ];
    ledger
        .grant(&common::purchase("vb-window", 100, "g-vb-window"))
        .await
        .expect("grant");
    let debit = |account: &str, key: &str, amount: i64| Debit {
        account_id: account.into(),
        wallet: "default".into(),
        amount,
        idempotency_key: key.into(),
        operation: "op".into(),
        metadata: Metadata::new(),
        member_id: String::new(),
        price_inputs: None,
        attempt_mark: None,
    };
    let meta: Metadata = [("tollgate".to_owned(), "void".to_owned())].into();
    let spent = |account: &'static str| {
        let ledger = ledger.clone();
        async move {
            let view = ledger.view(account, "", "default").await.expect("view");
            view.budgets.first().map(|b| b.spent)
        }
    };
    for (account, period, offset) in accounts {
        ledger
            .set_budget(&SetBudget {
                account_id: account.into(),
                member_id: String::new(),
                wallet: "default".into(),
                limit: 10,
                period,
                utc_offset_minutes: offset,
                idempotency_key: "b1".into(),
            })
            .await
            .expect("budget");
        // A void gives nothing back to a budget made in its debit's own millisecond.
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let first = debit(account, "req-1", 6);
        let charged = ledger.debit(&first).await.expect("debit");
        ledger
            .refund(&Refund {
                charge_id: charged.event_id.clone(),
                amount: 2,
                idempotency_key: "part".into(),
                metadata: Metadata::new(),
            })
            .await
            .expect("refund");
        assert_eq!(
            spent(account).await,
            Some(6),
            "{account}: a refund gives none back"
        );
        let out = ledger
            .void(ChargeRef::Debit(&first), None, "void-1", &meta)
            .await
            .expect("void");
        assert!(matches!(out.voided, Voided::Debit { .. }), "{out:?}");
        assert_eq!(
            spent(account).await,
            Some(0),
            "{account}: all of it given back"
        );
        let retried = ledger.debit(&first).await.expect("retry");
        assert!(!retried.replayed, "{account}: {retried:?}");
        assert_eq!(spent(account).await, Some(6), "{account}");
    }

    settle_then_lose_redis(&redis, &ledger, &store, "vb-2").await;
    restore(ledger.clone(), store.clone(), RestoreMode::Lost, |_, _| {})
        .await
        .expect("restore");
    for (account, _, _) in accounts {
        assert_eq!(
            spent(account).await,
            Some(6),
            "{account}: the voided debit counted in the restored spend"
        );
        let second = debit(account, "req-2", 3);
        ledger.debit(&second).await.expect("debit");
        assert_eq!(spent(account).await, Some(9), "{account}");
        let out = ledger
            .void(ChargeRef::Debit(&second), None, "void-2", &meta)
            .await
            .expect("a void on a restored budget");
        assert!(
            matches!(out.voided, Voided::Debit { .. }),
            "{account}: {out:?}"
        );
        assert_eq!(spent(account).await, Some(6), "{account}: given back");
        let retried = ledger.debit(&second).await.expect("retry");
        assert!(
            !retried.replayed,
            "{account}: the voided charge's answer replayed: {retried:?}"
        );
        assert_eq!(available(&ledger, account).await, Ok(100 - 6 - 3));
    }
}

/// A negative adjustment retried after a restore replays its first answer: its record is
/// rebuilt from its event (a negative adjustment has no priority or expiry, so the event
/// holds every part of the request). It used to be left out, and the retry took the
/// credits again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_negative_adjustment_retried_after_a_restore_is_not_taken_twice() {
    use tollgate::ledger::Adjust;
    use tollgate::settle::restore::{restore, RestoreMode};

    let (redis, _pg, ledger, store) = settled_then_lost("adjusted", 1000).await;
    restore(ledger.clone(), store.clone(), RestoreMode::Lost, |_, _| {})
        .await
        .expect("restore");
    let chargeback = |key: &str, description: &str| Adjust {
        account_id: "adjusted".into(),
        wallet: "default".into(),
        amount: -100,
        priority: tollgate::ledger::command::PRIORITY_DEFAULT,
        expires_at_ms: 0,
        description: description.into(),
        idempotency_key: key.into(),
        metadata: [("case".to_owned(), "42".to_owned())].into(),
    };
    let first = ledger
        .adjust(&chargeback("corr-7", "chargeback"))
        .await
        .expect("adjust");
    assert_eq!(available(&ledger, "adjusted").await, Ok(900));

    settle_then_lose_redis(&redis, &ledger, &store, "adjusted-2").await;
    restore(ledger.clone(), store.clone(), RestoreMode::Lost, |_, _| {})
        .await
        .expect("restore");
    assert_eq!(available(&ledger, "adjusted").await, Ok(900));
    let again = ledger
        .adjust(&chargeback("corr-7", "chargeback"))
        .await
        .expect("the retry");
    assert!(again.replayed, "taken again: {again:?}");
    assert_eq!(
        (again.event_id.as_str(), again.available),
        (first.event_id.as_str(), first.available)
    );
    assert_eq!(available(&ledger, "adjusted").await, Ok(900));
    // The same key with another request is refused, as before the loss.
    let other = ledger
        .adjust(&chargeback("corr-7", "another reason"))
        .await
        .expect_err("another request under the key");
    assert!(
        matches!(
            other,
            tollgate::ledger::LedgerError::Refused(
                tollgate::ledger::error::Refusal::IdempotencyKeyReused
            )
        ),
        "{other:?}"
    );
    assert_eq!(available(&ledger, "adjusted").await, Ok(900));
}

/// What the Admin and Metering APIs say of `account`'s keys: GetBalance by each key id
/// (the account, or the refusal's code and reason) and ListApiKeys (id, revoked ms).
async fn key_answers(
    server: &common::TestServer,
    account: &str,
    key_ids: &[&str],
) -> (Vec<String>, Vec<(String, i64)>) {
    let mut metering = server.metering().await;
    let mut admin = server.admin().await;
    let mut answers = Vec::new();
    for key_id in key_ids {
        let answer = metering
            .get_balance(pb::GetBalanceRequest {
                key_id: (*key_id).into(),
                ..Default::default()
            })
            .await;
        answers.push(match answer {
            Ok(b) => format!("{key_id}: {}", b.into_inner().account_id),
            Err(s) => format!(
                "{key_id}: {:?} {}",
                s.code(),
                s.get_details_error_info()
                    .map(|i| i.reason)
                    .unwrap_or_default()
            ),
        });
    }
    let mut listed: Vec<(String, i64)> = admin
        .list_api_keys(pb::ListApiKeysRequest {
            account_id: account.into(),
        })
        .await
        .expect("list keys")
        .into_inner()
        .keys
        .into_iter()
        .map(|k| (k.key_id, k.revoked_at_ms))
        .collect();
    listed.sort();
    (answers, listed)
}

/// A personal API key of carol's named `name`.
async fn carol_key(
    admin: &mut pb::admin_client::AdminClient<common::AuthChannel>,
    name: &str,
) -> pb::CreateApiKeyResponse {
    admin
        .create_api_key(pb::CreateApiKeyRequest {
            account_id: "carol".into(),
            name: name.into(),
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner()
}

async fn revoke_key(admin: &mut pb::admin_client::AdminClient<common::AuthChannel>, key_id: &str) {
    admin
        .revoke_api_key(pb::RevokeApiKeyRequest {
            key_id: key_id.into(),
        })
        .await
        .expect("revoke");
}

/// Live Redis drops a key revoked longer ago than `gateway.revoked_key_retention_secs`
/// (gateway/lua/key_prune.lua, at the account's next key change): it answers as unknown
/// and is no longer listed. The store keeps it; a restore leaves it out as of its own
/// clock, instead of bringing it back revoked (403 where it was 401), listed and taking
/// memory again. A key revoked within the retention comes back revoked, a live one live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_leaves_out_keys_revoked_longer_ago_than_the_retention() {
    use tollgate::settle::restore::{restore, RestoreMode};

    const DAY_MS: i64 = 86_400_000;
    let redis = common::RedisServer::start();
    // The ledger's clock starts 10 days back: the first key is revoked then.
    let (clock, now) = Clock::manual(tollgate::ledger::wall_clock_ms() - 10 * DAY_MS);
    let mut config = common::test_config(&redis.url());
    config.gateway.revoked_key_retention_secs = 2 * 86_400;
    let store_url = config.store.url.clone();
    let server = common::TestServer::start(config, clock).await;
    let store = Arc::new(Store::connect_lazy(&store_url, 2).expect("store"));
    let mut admin = server.admin().await;
    server
        .ledger
        .grant(&common::purchase("carol", 100, "g"))
        .await
        .expect("grant");
    let rotated = carol_key(&mut admin, "rotated").await;
    revoke_key(&mut admin, &rotated.key_id).await;
    // Now: the next key change drops the one revoked 10 days ago.
    now.store(tollgate::ledger::wall_clock_ms(), Ordering::SeqCst);
    let live = carol_key(&mut admin, "live").await;
    let recent = carol_key(&mut admin, "recent").await;
    revoke_key(&mut admin, &recent.key_id).await;
    let ids = [
        rotated.key_id.as_str(),
        live.key_id.as_str(),
        recent.key_id.as_str(),
    ];
    let before = key_answers(&server, "carol", &ids).await;
    assert_eq!(
        before.0,
        [
            format!("{}: NotFound ", rotated.key_id),
            format!("{}: carol", live.key_id),
            format!("{}: FailedPrecondition KEY_REVOKED", recent.key_id),
        ],
        "live Redis dropped the key revoked past the retention"
    );
    assert_eq!(before.1.len(), 2, "{before:?}");
    // The store has all three (CreateApiKey saves in the background), both revocations.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let stored = store.api_keys().await.expect("stored keys");
        if stored.iter().filter(|k| k.revoked_at_ms > 0).count() == 2 && stored.len() == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "keys not saved: {stored:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    settle_then_lose_redis(&redis, &server.ledger, &store, "carol").await;
    let report = restore(
        server.ledger.clone(),
        store.clone(),
        RestoreMode::Lost,
        |_, _| {},
    )
    .await
    .expect("restore");
    assert_eq!(key_answers(&server, "carol", &ids).await, before);
    assert_eq!((report.api_keys, report.api_keys_dropped), (2, 1));
    server.stop().await;
}

/// A restore writes the store's keys into the shards it leaves alone too (a shard a
/// serving process marked new after Redis lost its data lost its keys with it): a key made
/// before the shard's epoch marker comes back. But not a key that shard's Redis itself
/// dropped: made after the marker, revoked past the retention and pruned at the account's
/// next key change, its revocation missing from the store (a save that failed), it came
/// back live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_does_not_bring_back_a_key_a_serving_shard_dropped() {
    use tollgate::settle::restore::{restore, RestoreMode};

    const DAY_MS: i64 = 86_400_000;
    let redis = common::RedisServer::start();
    let real_now = tollgate::ledger::wall_clock_ms();
    let (clock, now) = Clock::manual(real_now - 12 * DAY_MS);
    let mut config = common::test_config(&redis.url());
    config.gateway.revoked_key_retention_secs = 2 * 86_400;
    let store_url = config.store.url.clone();
    let server = common::TestServer::start(config, clock).await;
    let store = Arc::new(Store::connect_lazy(&store_url, 2).expect("store"));
    let shards = server.ledger.shards().clone();
    let carol_shard = shards.of_account("carol");
    let mut admin = server.admin().await;
    // dave's shard is lost below; carol's serves throughout.
    let dave = (0..)
        .map(account)
        .find(|a| shards.of_account(a) != carol_shard)
        .expect("an account in another shard");
    for (who, key) in [("carol", "g"), (dave.as_str(), "g")] {
        server
            .ledger
            .grant(&common::purchase(who, 100, key))
            .await
            .expect("grant");
    }
    // 12 days ago: a key made in an earlier Redis, lost with it.
    let lost = carol_key(&mut admin, "lost").await;
    // 10 days ago, in the Redis that serves carol's shard since 11 days ago: a key
    // revoked then.
    now.store(real_now - 10 * DAY_MS, Ordering::SeqCst);
    let rotated = carol_key(&mut admin, "rotated").await;
    revoke_key(&mut admin, &rotated.key_id).await;
    // Now: the next key change drops the key revoked 10 days ago.
    now.store(tollgate::ledger::wall_clock_ms(), Ordering::SeqCst);
    let live = carol_key(&mut admin, "live").await;
    let mut con = redis.client().get_connection().expect("redis");
    let tag = shards.tag(carol_shard).to_owned();
    let _: () = redis::cmd("SET")
        .arg(shards.epoch_key(carol_shard))
        .arg(real_now - 11 * DAY_MS)
        .query(&mut con)
        .expect("epoch");
    let _: () = redis::cmd("DEL")
        .arg(format!("{tag}:k:{}", lost.key_id))
        .query(&mut con)
        .expect("del");
    let _: () = redis::cmd("HDEL")
        .arg(format!("{tag}:ks:carol"))
        .arg(&lost.key_id)
        .query(&mut con)
        .expect("hdel");
    let ids = [
        lost.key_id.as_str(),
        rotated.key_id.as_str(),
        live.key_id.as_str(),
    ];
    let before = key_answers(&server, "carol", &ids).await;
    assert_eq!(
        before.0,
        [
            format!("{}: NotFound ", lost.key_id),
            format!("{}: NotFound ", rotated.key_id),
            format!("{}: carol", live.key_id),
        ]
    );
    let deadline = Instant::now() + DEADLINE;
    while store.api_keys().await.expect("stored keys").len() < 3 {
        assert!(Instant::now() < deadline, "keys not saved");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The revocation's save was lost: the store has the key live.
    let pool = sqlx::SqlitePool::connect(&store_url).await.expect("sqlite");
    sqlx::query("UPDATE tollgate_api_keys SET revoked_at_ms = 0 WHERE key_id = $1")
        .bind(&rotated.key_id)
        .execute(&pool)
        .await
        .expect("update");
    pool.close().await;

    // dave's shard loses its data (settled first); carol's is left alone.
    tollgate::settle::settler::Settler::new(
        server.ledger.clone(),
        store.clone(),
        tollgate::settle::settler::SettlerSettings {
            consumer: "gone-test".into(),
            ..Default::default()
        },
    )
    .drain(DEADLINE)
    .await
    .expect("settled");
    let gone: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", shards.tag(shards.of_account(&dave))))
        .query(&mut con)
        .expect("keys");
    assert!(!gone.is_empty());
    let _: () = redis::cmd("DEL").arg(&gone).query(&mut con).expect("del");

    let report = restore(
        server.ledger.clone(),
        store.clone(),
        RestoreMode::Lost,
        |_, _| {},
    )
    .await
    .expect("restore");
    assert_eq!(report.api_keys_gone_from_serving, 1, "{}", report.render());
    let after = key_answers(&server, "carol", &ids).await;
    assert_eq!(
        after.0,
        [
            format!("{}: carol", lost.key_id),
            format!("{}: NotFound ", rotated.key_id),
            format!("{}: carol", live.key_id),
        ]
    );
    server.stop().await;
}

/// GetBalance of `account`: every listed wallet (the account-wide listing, the wallet
/// set), then each of `by_name` read by name.
async fn wallet_answers(
    server: &common::TestServer,
    account: &str,
    by_name: &[&str],
) -> (Vec<pb::WalletBalance>, Vec<pb::WalletBalance>) {
    let metering = server.metering().await;
    let read = |wallet: &str| {
        let request = pb::GetBalanceRequest {
            account_id: account.into(),
            wallet: wallet.into(),
            ..Default::default()
        };
        let mut metering = metering.clone();
        async move {
            metering
                .get_balance(request)
                .await
                .expect("balance")
                .into_inner()
                .wallets
        }
    };
    let mut listed = read("").await;
    listed.sort_by(|a, b| a.wallet.cmp(&b.wallet));
    let mut named = Vec::new();
    for wallet in by_name {
        named.extend(read(wallet).await);
    }
    (listed, named)
}

/// The wallet cap counts live wallets (docs/ARCHITECTURE.md, "Wallet cap"): a grant to a
/// new wallet at the cap drops the dead ones from the account's wallet set. A restore
/// gives back every wallet's totals, readable by name, and the same cap: the next new
/// wallet is refused as before. It replays the drops (restore.rs `wallet_sets`), so the
/// dead wallet the live Redis dropped is not listed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_gives_back_the_wallet_set_with_dead_wallets_dropped() {
    use tollgate::settle::restore::{restore, RestoreMode};

    let redis = common::RedisServer::start();
    let mut config = common::test_config(&redis.url());
    config.ledger.wallets_per_account_max = 2;
    let store_url = config.store.url.clone();
    let server = common::TestServer::start(config, Clock::Redis).await;
    let store = Arc::new(Store::connect_lazy(&store_url, 2).expect("store"));
    let mut admin = server.admin().await;
    let mut metering = server.metering().await;
    let grant = |wallet: &str| pb::GrantRequest {
        account_id: "periods".into(),
        wallet: wallet.into(),
        amount: 10,
        idempotency_key: format!("g-{wallet}"),
        ..Default::default()
    };
    // "2026-10" is spent out (dead); "2026-12" takes its place at the cap of 2.
    admin.grant(grant("2026-10")).await.expect("grant");
    metering
        .debit(pb::DebitRequest {
            account_id: "periods".into(),
            wallet: "2026-10".into(),
            amount: 10,
            idempotency_key: "spent".into(),
            ..Default::default()
        })
        .await
        .expect("debit");
    admin.grant(grant("2026-11")).await.expect("grant");
    admin.grant(grant("2026-12")).await.expect("room made");
    let names = ["2026-10", "2026-11", "2026-12"];
    let before = wallet_answers(&server, "periods", &names).await;
    assert_eq!(
        before
            .0
            .iter()
            .map(|w| w.wallet.as_str())
            .collect::<Vec<_>>(),
        ["2026-11", "2026-12"]
    );
    assert_eq!(before.1.len(), 3, "{before:?}");
    let at_cap = |status: tonic::Status| {
        status
            .get_details_error_info()
            .map(|i| i.reason)
            .unwrap_or_default()
    };
    let refused = admin.grant(grant("2027-01")).await.expect_err("at the cap");
    assert_eq!(at_cap(refused), "WALLET_LIMIT");

    settle_then_lose_redis(&redis, &server.ledger, &store, "periods").await;
    restore(
        server.ledger.clone(),
        store.clone(),
        RestoreMode::Lost,
        |_, _| {},
    )
    .await
    .expect("restore");
    // Not listed again: the restore drops it where the grant of "2026-12" did.
    assert_eq!(wallet_answers(&server, "periods", &names).await, before);
    let refused = admin.grant(grant("2027-01")).await.expect_err("at the cap");
    assert_eq!(at_cap(refused), "WALLET_LIMIT");
    assert_eq!(wallet_answers(&server, "periods", &names).await, before);
    server.stop().await;
}

/// A GetBalance without a wallet lists after a restore what it listed before the loss: a
/// wallet emptied by spending and one by expiry that a grant at the cap dropped from the
/// set stay unlisted, a live one and the new one are listed, and each still reads by name
/// with its lots as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_lists_the_wallets_the_lost_redis_listed() {
    let account = "listed";
    let redis = common::RedisServer::start();
    let mut config = common::test_config(&redis.url());
    config.ledger.wallets_per_account_max = 3;
    let store_url = config.store.url.clone();
    let server = common::TestServer::start(config, Clock::Redis).await;
    let store = Arc::new(Store::connect_lazy(&store_url, 2).expect("store"));
    let mut admin = server.admin().await;
    let mut metering = server.metering().await;
    let grant = |wallet: &str, expires_at_ms: i64| pb::GrantRequest {
        account_id: account.into(),
        wallet: wallet.into(),
        amount: 10,
        expires_at_ms,
        idempotency_key: format!("g-{wallet}"),
        ..Default::default()
    };
    admin.grant(grant("spent", 0)).await.expect("grant");
    metering
        .debit(pb::DebitRequest {
            account_id: account.into(),
            wallet: "spent".into(),
            amount: 10,
            idempotency_key: "spend-all".into(),
            ..Default::default()
        })
        .await
        .expect("debit");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    admin
        .grant(grant("expired", now_ms + 1_000))
        .await
        .expect("grant");
    admin.grant(grant("live", 0)).await.expect("grant");
    // The expiring lot ends (a read by name ends what is due).
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (_, named) = wallet_answers(&server, account, &["expired"]).await;
        if named.iter().all(|w| w.available == 0) {
            break;
        }
        assert!(Instant::now() < deadline, "{named:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // At the cap of 3: the grant of "new" drops the two dead wallets.
    admin.grant(grant("new", 0)).await.expect("room made");
    let names = ["expired", "live", "new", "spent"];
    /// Each wallet's lots, by name.
    async fn lots(server: &common::TestServer, account: &str, names: &[&str]) -> Vec<Vec<pb::Lot>> {
        let mut metering = server.metering().await;
        let mut all = Vec::new();
        for wallet in names {
            let page = metering
                .list_lots(pb::ListLotsRequest {
                    account_id: account.into(),
                    wallet: (*wallet).into(),
                    ..Default::default()
                })
                .await
                .expect("lots")
                .into_inner();
            all.push(page.lots);
        }
        all
    }
    let before = wallet_answers(&server, account, &names).await;
    assert_eq!(
        before
            .0
            .iter()
            .map(|w| w.wallet.as_str())
            .collect::<Vec<_>>(),
        ["live", "new"]
    );
    assert_eq!(before.1.len(), 4, "{before:?}");
    let lots_before = lots(&server, account, &names).await;

    lose_redis_then_restore(&redis, &server, &store, account).await;
    assert_eq!(wallet_answers(&server, account, &names).await, before);
    assert_eq!(lots(&server, account, &names).await, lots_before);
    server.stop().await;
}

/// Settles everything, loses Redis's data, and restores it from the store.
async fn lose_redis_then_restore(
    redis: &common::RedisServer,
    server: &common::TestServer,
    store: &Arc<Store>,
    account: &str,
) {
    use tollgate::settle::restore::{restore, RestoreMode};

    settle_then_lose_redis(redis, &server.ledger, store, account).await;
    restore(
        server.ledger.clone(),
        store.clone(),
        RestoreMode::Lost,
        |_, _| {},
    )
    .await
    .expect("restore");
}

/// A wallet counts as dead by what it has now, as lib.lua `wallet_dead` looks: one whose
/// budget was removed, and one whose allocation went with its member, then each emptied,
/// are dropped by a new wallet at the cap, and a restore does not list them again. An
/// allocation of the dropped wallet comes back within the cap (it has none left), so it
/// drops the set's dead wallets as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_drops_a_wallet_whose_allocation_or_budget_was_removed_as_live_redis_did() {
    let org = "unbound";
    let redis = common::RedisServer::start();
    let mut config = common::test_config(&redis.url());
    config.ledger.wallets_per_account_max = 3;
    let store_url = config.store.url.clone();
    let server = common::TestServer::start(config, Clock::Redis).await;
    let store = Arc::new(Store::connect_lazy(&store_url, 2).expect("store"));
    // The org's credits are in its default wallet: one live wallet of the set.
    common::org_with_members(
        &server,
        org,
        "olga",
        10,
        &[("max", "member"), ("mia", "member")],
    )
    .await;
    let mut admin = server.admin().await;
    let mut metering = server.metering().await;
    let grant = |wallet: &str| pb::GrantRequest {
        account_id: org.into(),
        wallet: wallet.into(),
        amount: 10,
        idempotency_key: format!("g-{wallet}"),
        ..Default::default()
    };
    let spend_all = |wallet: &str| pb::DebitRequest {
        account_id: org.into(),
        wallet: wallet.into(),
        amount: 10,
        idempotency_key: format!("spend-{wallet}"),
        ..Default::default()
    };
    admin.grant(grant("budgeted")).await.expect("grant");
    for (limit, key) in [(100, "budget"), (0, "no-budget")] {
        admin
            .set_budget(pb::SetBudgetRequest {
                account_id: org.into(),
                wallet: "budgeted".into(),
                limit,
                period: "day".into(),
                idempotency_key: key.into(),
                ..Default::default()
            })
            .await
            .expect("budget");
    }
    metering.debit(spend_all("budgeted")).await.expect("debit");
    admin.grant(grant("allocated")).await.expect("grant");
    let allocate = |member: &str| pb::SetAllocationRequest {
        org_id: org.into(),
        member_id: member.into(),
        wallet: "allocated".into(),
        amount: 5,
        actor_id: "olga".into(),
        idempotency_key: format!("alloc-{member}"),
    };
    admin
        .set_allocation(allocate("max"))
        .await
        .expect("allocate");
    // Max's allocation goes with him.
    admin
        .remove_member(pb::RemoveMemberRequest {
            org_id: org.into(),
            member_id: "max".into(),
            actor_id: "olga".into(),
            idempotency_key: "max-leaves".into(),
        })
        .await
        .expect("remove max");
    metering.debit(spend_all("allocated")).await.expect("debit");
    // At the cap of 3: the grant of "new" drops the two dead wallets.
    admin.grant(grant("new")).await.expect("room made");
    // At the cap again with "spent" dead: Mia's allocation drops it.
    admin.grant(grant("spent")).await.expect("grant");
    metering.debit(spend_all("spent")).await.expect("debit");
    admin
        .set_allocation(allocate("mia"))
        .await
        .expect("room made");
    let names = ["allocated", "budgeted", "new", "spent"];
    let before = wallet_answers(&server, org, &names).await;
    let listed: Vec<&str> = before.0.iter().map(|w| w.wallet.as_str()).collect();
    assert_eq!(listed, ["allocated", "default", "new"], "{before:?}");
    assert_eq!(before.1.len(), 4, "{before:?}");

    lose_redis_then_restore(&redis, &server, &store, org).await;
    assert_eq!(wallet_answers(&server, org, &names).await, before);
    server.stop().await;
}

/// The settler's consumer group goes with the lost Redis: the running settler makes it
/// again (from the first entry) once its reads fail, before or after the restore, and
/// only its own consumer is in it: a consumer of a settler gone before the loss (never
/// pruned) does not come back. Charges made after the restore are settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restore_the_running_settler_settles_with_no_stale_consumer() {
    use tollgate::settle::restore::{restore, RestoreMode};

    let redis = common::RedisServer::start();
    let mut config = common::test_config(&redis.url());
    let store_url = config.store.url.clone();
    config.settler.enabled = true;
    config.settler.idle_wait_ms = 10;
    let group = "tollgate-settler";
    let server = common::TestServer::start(config, Clock::Redis).await;
    let store = Arc::new(Store::connect_lazy(&store_url, 2).expect("store"));
    let mut admin = server.admin().await;
    let mut metering = server.metering().await;
    admin
        .grant(pb::GrantRequest {
            account_id: "settled".into(),
            amount: 100,
            idempotency_key: "g".into(),
            ..Default::default()
        })
        .await
        .expect("grant");
    wait_settled(&store, &server.ledger).await;
    let shard = server.ledger.shards().of_account("settled");
    let outbox = server.ledger.shards().outbox(shard).to_owned();
    let mut con = redis.client().get_connection().expect("redis");
    let consumers = |con: &mut redis::Connection| -> Option<Vec<String>> {
        let info: redis::RedisResult<Vec<HashMap<String, redis::Value>>> = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(&outbox)
            .arg(group)
            .query(con);
        info.ok().map(|rows| {
            let mut names: Vec<String> = rows
                .iter()
                .filter_map(|row| match row.get("name") {
                    Some(redis::Value::BulkString(b)) => {
                        Some(String::from_utf8_lossy(b).into_owned())
                    }
                    _ => None,
                })
                .collect();
            names.sort();
            names
        })
    };
    let _: i64 = redis::cmd("XGROUP")
        .arg("CREATECONSUMER")
        .arg(&outbox)
        .arg(group)
        .arg("gone-pod")
        .query(&mut con)
        .expect("a consumer of a settler gone");
    let live = consumers(&mut con).expect("consumers");
    assert!(live.contains(&"gone-pod".to_owned()), "{live:?}");

    let _: () = redis::cmd("FLUSHALL").query(&mut con).expect("flushall");
    // The running settler makes its group again on the lost shard's outbox.
    let deadline = Instant::now() + DEADLINE;
    while consumers(&mut con).is_none() {
        assert!(
            Instant::now() < deadline,
            "the settler never made its group again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    restore(
        server.ledger.clone(),
        store.clone(),
        RestoreMode::Lost,
        |_, _| {},
    )
    .await
    .expect("restore");
    let debit = metering
        .debit(pb::DebitRequest {
            account_id: "settled".into(),
            amount: 1,
            idempotency_key: "after".into(),
            ..Default::default()
        })
        .await
        .expect("debit after the restore")
        .into_inner();
    while store.event(&debit.event_id).await.expect("event").is_none() {
        assert!(
            Instant::now() < deadline,
            "a charge after the restore was never settled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = consumers(&mut con).expect("consumers");
    assert!(!after.contains(&"gone-pod".to_owned()), "{after:?}");
    assert_eq!(
        after.len(),
        1,
        "only the running settler's consumer: {after:?}"
    );
    server.stop().await;
}

/// A restore rebuilds an org with every member its history has, whatever the member cap
/// is now: the cap (`ledger.members_per_org_max`) refuses new members in AddMember only,
/// never a restore. With the cap lowered below the org's size, the restored org keeps
/// all its members, role changes and removals go through, and a new member is refused
/// MEMBER_LIMIT until removals bring the org below the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_keeps_every_member_past_a_lowered_member_cap() {
    use tollgate::ledger::{LedgerError, Refusal};

    let org = "crowd";
    let redis = common::RedisServer::start();
    let config = common::test_config(&redis.url());
    let store_url = config.store.url.clone();
    let server = common::TestServer::start(config.clone(), Clock::Redis).await;
    let store = Arc::new(Store::connect_lazy(&store_url, 2).expect("store"));
    common::org_with_members(
        &server,
        org,
        "olga",
        10,
        &[("max", "member"), ("mia", "admin"), ("moe", "member")],
    )
    .await;
    let before = server
        .ledger
        .members_page(org, "", 100)
        .await
        .expect("members");
    assert_eq!(before.members.len(), 4);
    lose_redis_then_restore(&redis, &server, &store, org).await;

    // A sidecar whose cap is now 2.
    let mut lowered = config;
    lowered.ledger.members_per_org_max = 2;
    let ledger = tollgate::server::ledger_from_config(&lowered, Clock::Redis).expect("ledger");
    assert_eq!(
        ledger.members_page(org, "", 100).await.expect("members"),
        before
    );
    let at_cap = |result: Result<tollgate::ledger::org::OrgEvent, LedgerError>| match result {
        Err(LedgerError::Refused(Refusal::MemberLimit { max: 2 })) => {}
        other => panic!("not MEMBER_LIMIT: {other:?}"),
    };
    at_cap(
        ledger
            .add_member(org, "olga", "nina", "member", "add-nina")
            .await,
    );
    ledger
        .add_member(org, "olga", "max", "admin", "promote-max")
        .await
        .expect("a role change past the cap");
    ledger
        .remove_member(org, "olga", "moe", "remove-moe")
        .await
        .expect("a removal past the cap");
    at_cap(
        ledger
            .add_member(org, "olga", "nina", "member", "add-nina-2")
            .await,
    );
    let after = ledger.members_page(org, "", 100).await.expect("members");
    let roles: Vec<(&str, &str)> = after
        .members
        .iter()
        .map(|(id, role)| (id.as_str(), role.as_str()))
        .collect();
    assert_eq!(
        roles,
        [("max", "admin"), ("mia", "admin"), ("olga", "owner")]
    );
    server.stop().await;
}
