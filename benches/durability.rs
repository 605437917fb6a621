//! What each Redis durability level costs (not a test: figures go in docs/OPERATIONS.md).
//!
//! `cargo bench --bench durability` runs the same debit load (DURABILITY_BENCH_CONCURRENCY
//! tasks, default 32, for DURABILITY_BENCH_SECS, default 10) through the ledger against a
//! redis-server of its own in each mode, in one run, and prints throughput as a ratio to
//! the no-persistence run:
//! - `none`: `--save "" --appendonly no`
//! - `aof-everysec`: `--appendonly yes --appendfsync everysec`
//! - `aof-always`: `--appendonly yes --appendfsync always`
//! - `replica-wait`: no persistence, one replica, and `WAIT 1 1000` after every debit on the
//!   same connection (synchronous replication as a client would drive it)
//!
//! Under `cargo test` it runs a one-second smoke version.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate::ledger::{Clock, Debit, Grant, Ledger, LedgerSettings, LotKind, Metadata, RedisPool};

const ACCOUNTS: usize = 100;

fn knob(name: &str, bench: u64, smoke: u64, full: bool) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { bench } else { smoke })
}

async fn run(url: &str, concurrency: u64, secs: u64, wait_replicas: bool) -> f64 {
    // One multiplexed connection: a WAIT covers the writes sent before it on it.
    let connections = if wait_replicas { 1 } else { 2 };
    let pool = RedisPool::new(url, connections, Duration::from_secs(5)).expect("pool");
    let ledger = Arc::new(Ledger::new(pool, LedgerSettings::default(), Clock::Redis));
    ledger.initialize_all().await.expect("initialize");
    for a in 0..ACCOUNTS {
        ledger
            .grant(&Grant {
                account_id: format!("acct{a:03}"),
                wallet: "default".into(),
                amount: 1_000_000_000,
                kind: LotKind::Purchase,
                priority: 50,
                expires_at_ms: 0,
                description: String::new(),
                idempotency_key: "fund".into(),
                metadata: Metadata::new(),
            })
            .await
            .expect("grant");
    }
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let end = started + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..concurrency)
        .map(|t| {
            let (ledger, done) = (ledger.clone(), done.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < end {
                    n += 1;
                    let debit = Debit {
                        account_id: format!("acct{:03}", (t * 31 + n) % ACCOUNTS as u64),
                        wallet: "default".into(),
                        amount: 1,
                        idempotency_key: format!("t{t}-{n}"),
                        operation: "bench".into(),
                        metadata: Metadata::new(),
                        member_id: String::new(),
                    };
                    ledger.debit(&debit).await.expect("debit");
                    if wait_replicas {
                        let acked: i64 = ledger
                            .redis()
                            .query(redis::cmd("WAIT").arg(1).arg(1000))
                            .await
                            .expect("wait");
                        assert_eq!(acked, 1, "the replica did not acknowledge");
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let concurrency = knob("DURABILITY_BENCH_CONCURRENCY", 32, 4, full);
    let secs = knob("DURABILITY_BENCH_SECS", 10, 1, full);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let dir = std::env::temp_dir().join(format!("tollgate-durability-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let dir_text = dir.display().to_string();
        let mut results = Vec::new();
        for (mode, args) in [
            ("none", vec![]),
            (
                "aof-everysec",
                vec!["--appendonly", "yes", "--appendfsync", "everysec"],
            ),
            (
                "aof-always",
                vec!["--appendonly", "yes", "--appendfsync", "always"],
            ),
        ] {
            let sub = format!("{dir_text}/{mode}");
            std::fs::create_dir_all(&sub).expect("dir");
            let mut all = args.clone();
            all.extend(["--dir", sub.as_str()]);
            let redis = common::RedisServer::start_with(&all);
            let rps = run(&redis.url(), concurrency, secs, false).await;
            results.push((mode, rps));
        }
        let master = common::RedisServer::start();
        let replica_of = format!("127.0.0.1 {}", master.port);
        let replica = common::RedisServer::start_with(&["--replicaof", &replica_of]);
        // Wait for the replica to be in sync before measuring.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let client = replica.client();
            let mut con = client.get_connection().expect("replica");
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query(&mut con)
                .expect("info");
            if info.contains("master_link_status:up") {
                break;
            }
            assert!(Instant::now() < deadline, "replica never synced");
            std::thread::sleep(Duration::from_millis(100));
        }
        let rps = run(&master.url(), concurrency, secs, true).await;
        results.push(("replica-wait", rps));
        let baseline = results[0].1;
        let json: Vec<_> = results
            .iter()
            .map(|(mode, rps)| {
                serde_json::json!({
                    "mode": mode,
                    "debits_per_second": rps.round(),
                    "ratio_to_no_persistence": (rps / baseline * 1000.0).round() / 1000.0,
                })
            })
            .collect();
        let out =
            serde_json::json!({ "concurrency": concurrency, "seconds": secs, "results": json });
        println!("{}", serde_json::to_string_pretty(&out).expect("json"));
        let _ = std::fs::create_dir_all("target");
        let _ = std::fs::write("target/bench-durability.json", out.to_string());
        let _ = std::fs::remove_dir_all(&dir);
    });
}
