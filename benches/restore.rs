//! Restore time (not a test: the figure goes in docs/BENCHMARKS.md).
//!
//! `cargo bench --bench restore` fills a fresh PostgreSQL database
//! (TOLLGATE_TEST_DATABASE_URL) with the ledger of RESTORE_BENCH_ACCOUNTS accounts (default
//! 100,000), each with two lots (one expiring) and a debit, then times `tollgate restore`'s
//! library call into an empty redis-server of its own, and checks a sample of balances.
//! Under `cargo test` it runs a 500-account smoke version.
//!
//! With RESTORE_BENCH_HISTORY=<n> it times instead one account's long history: a grant of
//! n credits and n debits of 1, their times 1 ms apart and older than every retention
//! (no charge or idempotency record is written back), so the figure is the replay's.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::Instant;

use tollgate::ledger::event::{EventKind, LedgerEvent, LotPiece};
use tollgate::ledger::Clock;
use tollgate::settle::restore::RestoreMode;
use tollgate::settle::Store;

const NEVER_SCORE: i64 = 50 * LotPiece::PRIORITY_UNIT + LotPiece::NEVER;

// A synthetic ledger event: every field is a parameter, on purpose.
#[allow(clippy::too_many_arguments)]
fn event(
    shard: u16,
    seq: i64,
    kind: EventKind,
    account: &str,
    amount: i64,
    available: i64,
    lots: Vec<LotPiece>,
    extra: &str,
) -> LedgerEvent {
    let stream_id = format!("1800000000000-{seq}");
    LedgerEvent {
        event_id: format!("{shard}-{stream_id}"),
        stream_id,
        kind,
        account_id: account.to_owned(),
        wallet: "default".into(),
        amount,
        available_after: available,
        held_after: 0,
        lots,
        extra: extra.into(),
        hold_id: String::new(),
        charge_id: String::new(),
        idempotency_key: String::new(),
        operation: String::new(),
        metadata: String::new(),
        created_at_ms: 1_800_000_000_000,
        version: 1,
        member: String::new(),
        actor: String::new(),
    }
}

fn piece(id: &str, amount: i64, score: i64) -> LotPiece {
    LotPiece {
        lot_id: id.into(),
        amount,
        score: Some(score),
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let accounts: usize = std::env::var("RESTORE_BENCH_ACCOUNTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 100_000 } else { 500 });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let history: Option<usize> = std::env::var("RESTORE_BENCH_HISTORY")
        .ok()
        .and_then(|v| v.parse().ok());
    if let Some(history) = history {
        runtime.block_on(one_account(history));
        return;
    }
    runtime.block_on(async {
        let redis = common::RedisServer::start();
        let config = common::test_config(&redis.url());
        let ledger = tollgate::server::ledger_from_config(&config, Clock::Redis).expect("ledger");
        let pg = common::PgDatabase::create().await;
        let store = Arc::new(Store::connect_lazy(&pg.url, 4).expect("store"));
        store.migrate().await.expect("migrate");

        let expiring = 10 * LotPiece::PRIORITY_UNIT + 4_000_000_000_000;
        let started = Instant::now();
        let mut seq = vec![0i64; usize::from(ledger.shards().count())];
        let mut batch = Vec::with_capacity(6000);
        for i in 0..accounts {
            let account = format!("acct{i:07}");
            let shard = ledger.shards().of_account(&account);
            let s = &mut seq[usize::from(shard)];
            let mut next = || {
                *s += 1;
                *s
            };
            batch.push(event(
                shard,
                next(),
                EventKind::Grant,
                &account,
                100,
                100,
                vec![piece("00000001", 100, NEVER_SCORE)],
                "purchase|pack",
            ));
            batch.push(event(
                shard,
                next(),
                EventKind::Grant,
                &account,
                50,
                150,
                vec![piece("00000002", 50, expiring)],
                "promo|",
            ));
            batch.push(event(
                shard,
                next(),
                EventKind::Debit,
                &account,
                20,
                130,
                vec![piece("00000002", 20, expiring)],
                "",
            ));
            if batch.len() >= 6000 {
                store.append(&batch).await.expect("append");
                batch.clear();
            }
        }
        store.append(&batch).await.expect("append");
        let filled = started.elapsed();

        let started = Instant::now();
        let report = tollgate::settle::restore::restore(
            ledger.clone(),
            store.clone(),
            RestoreMode::Lost,
            |_, _| {},
        )
        .await
        .expect("restore");
        let restore_secs = started.elapsed().as_secs_f64();
        let wallets: usize = report.shards.iter().map(|s| s.wallets).sum();
        assert_eq!(wallets, accounts);
        for i in (0..accounts).step_by((accounts / 20).max(1)) {
            let b = ledger
                .balance(&format!("acct{i:07}"), "default")
                .await
                .expect("balance");
            assert_eq!((b[0].available, b[0].used, b[0].granted), (130, 20, 150));
        }
        let result = serde_json::json!({
            "accounts": accounts,
            "ledger_events": accounts * 3,
            "store_fill_seconds": (filled.as_secs_f64() * 10.0).round() / 10.0,
            "restore_seconds": (restore_secs * 10.0).round() / 10.0,
            "restored_wallets_per_second": (wallets as f64 / restore_secs).round(),
        });
        println!("{}", serde_json::to_string_pretty(&result).expect("json"));
        let _ = std::fs::create_dir_all("target");
        let _ = std::fs::write("target/bench-restore.json", result.to_string());
    });
}

/// One account, a grant of `history` credits then `history` debits of 1: see the header.
async fn one_account(history: usize) {
    let redis = common::RedisServer::start();
    let config = common::test_config(&redis.url());
    let ledger = tollgate::server::ledger_from_config(&config, Clock::Redis).expect("ledger");
    let pg = common::PgDatabase::create().await;
    let store = Arc::new(Store::connect_lazy(&pg.url, 4).expect("store"));
    store.migrate().await.expect("migrate");
    let account = "long-history";
    let shard = ledger.shards().of_account(account);
    let total = i64::try_from(history).expect("history");
    // 60 days back: past the charge retention and the idempotency window.
    let start_ms = tollgate::ledger::wall_clock_ms() - 60 * 86_400_000;
    let at = |mut e: LedgerEvent, n: i64| {
        e.created_at_ms = start_ms + n;
        e.stream_id = format!("{}-0", start_ms + n);
        e.event_id = format!("{shard}-{}", e.stream_id);
        e
    };
    let started = Instant::now();
    let mut batch = Vec::with_capacity(6000);
    batch.push(at(
        event(
            shard,
            0,
            EventKind::Grant,
            account,
            total,
            total,
            vec![piece("00000001", total, NEVER_SCORE)],
            "purchase|pack",
        ),
        0,
    ));
    for n in 1..=total {
        batch.push(at(
            event(
                shard,
                0,
                EventKind::Debit,
                account,
                1,
                total - n,
                vec![piece("00000001", 1, NEVER_SCORE)],
                "",
            ),
            n,
        ));
        if batch.len() >= 6000 {
            store.append(&batch).await.expect("append");
            batch.clear();
        }
    }
    store.append(&batch).await.expect("append");
    let filled = started.elapsed();

    let started = Instant::now();
    let report = tollgate::settle::restore::restore(
        ledger.clone(),
        store.clone(),
        RestoreMode::Lost,
        |_, _| {},
    )
    .await
    .expect("restore");
    let restore_secs = started.elapsed().as_secs_f64();
    let events: usize = report.shards.iter().map(|s| s.events).sum();
    assert_eq!(events, history + 1);
    let b = ledger.balance(account, "default").await.expect("balance");
    assert_eq!((b[0].available, b[0].used, b[0].granted), (0, total, total));
    let result = serde_json::json!({
        "accounts": 1,
        "ledger_events": history + 1,
        "store_fill_seconds": (filled.as_secs_f64() * 10.0).round() / 10.0,
        "restore_seconds": (restore_secs * 100.0).round() / 100.0,
        "replayed_events_per_second": (events as f64 / restore_secs).round(),
    });
    println!("{}", serde_json::to_string_pretty(&result).expect("json"));
}
