//! Settlement throughput and lag (not a test: figures go in docs/BENCHMARKS.md).
//!
//! `cargo bench --bench settle` measures, on its own redis-server and a fresh PostgreSQL
//! database (TOLLGATE_TEST_DATABASE_URL) and SQLite file:
//! 1. raw Redis: reading the outbox entries with XRANGE (the baseline of this run);
//! 2. settled events per second draining a pre-filled outbox into PostgreSQL (one settler,
//!    then two of one group, as two pods run) and SQLite, with the ratio to the baseline;
//! 3. the outbox lag (age of the oldest unsettled event) while debits run at a fixed rate
//!    with a settler writing to PostgreSQL.
//!
//! Under `cargo test` (no `--bench` argument) it runs a small smoke version, so CI keeps
//! the benchmark working. Knobs: SETTLE_BENCH_EVENTS, SETTLE_BENCH_RATE, SETTLE_BENCH_SECS.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate::ledger::{Clock, Debit, Grant, Ledger, LotKind, Metadata};
use tollgate::settle::settler::{Settler, SettlerSettings};
use tollgate::settle::Store;

const ACCOUNTS: usize = 1000;

fn knob(name: &str, bench: usize, smoke: usize, full: bool) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { bench } else { smoke })
}

fn settings(group: &str) -> SettlerSettings {
    SettlerSettings {
        group: group.into(),
        consumer: "bench".into(),
        idle_wait: Duration::from_millis(5),
        trim_interval: Duration::from_millis(100),
        ..SettlerSettings::default()
    }
}

/// Fills the outboxes with `events` debit-shaped entries, pipelined.
async fn fill(ledger: &Ledger, events: usize) {
    let shards = ledger.shards();
    let mut written = 0;
    while written < events {
        let mut pipe = redis::pipe();
        for i in written..(written + 5000).min(events) {
            let account = format!("acct{:05}", i % ACCOUNTS);
            let shard = shards.of_account(&account);
            pipe.cmd("XADD")
                .arg(shards.outbox(shard))
                .arg("*")
                .arg(&[
                    ("k", "debit"),
                    ("a", account.as_str()),
                    ("w", "default"),
                    ("n", "1"),
                    ("v", "99"),
                    ("h", "0"),
                    ("l", "00000001:1:219902325555199"),
                    ("x", ""),
                    ("hd", ""),
                    ("c", ""),
                    ("i", &format!("bench-{i}")),
                    ("o", "envelope.send"),
                    ("m", ""),
                    ("t", "1800000000000"),
                ])
                .ignore();
        }
        let _: () = ledger.redis().pipeline(&pipe).await.expect("fill");
        written = (written + 5000).min(events);
    }
}

/// Raw Redis baseline: events/s reading every outbox entry with XRANGE pages.
async fn raw_read(ledger: &Ledger) -> f64 {
    let started = Instant::now();
    let mut read = 0usize;
    for shard in 0..ledger.shards().count() {
        let mut from = "-".to_owned();
        loop {
            let value: redis::Value = ledger
                .redis()
                .query(
                    redis::cmd("XRANGE")
                        .arg(ledger.shards().outbox(shard))
                        .arg(&from)
                        .arg("+")
                        .arg("COUNT")
                        .arg(2000),
                )
                .await
                .expect("xrange");
            let events = tollgate::ledger::event::LedgerEvent::from_stream_entries(shard, value)
                .expect("parse");
            if events.is_empty() {
                break;
            }
            read += events.len();
            let last = &events[events.len() - 1].stream_id;
            from = format!("({last}");
        }
    }
    read as f64 / started.elapsed().as_secs_f64()
}

/// Settles a pre-filled outbox the way a running settler does (rounds, each reading the
/// next batch while the current one is written) and returns events per second.
/// (`Settler::drain`, which `reconcile` uses, reads without read-ahead: it must stop at
/// what the outboxes held when it started. Measuring it instead understated the settler.)
async fn drain(ledger: &Arc<Ledger>, store: &Arc<Store>, group: &str, events: usize) -> f64 {
    store.migrate().await.expect("migrate");
    let mut settler = Settler::new(
        ledger.clone(),
        store.clone(),
        SettlerSettings {
            // A backlog never lingers; the last, short batch should not either.
            linger: Duration::ZERO,
            ..settings(group)
        },
    );
    settler.ensure_groups().await.expect("groups");
    let started = Instant::now();
    let mut settled = 0;
    while settled < events {
        settled += settler.round().await.expect("round");
    }
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(store.count_events().await.expect("count") as usize, events);
    events as f64 / secs
}

/// `drain` with two settlers of one group (two pods, or `tollgate settle` twice): each
/// reads its share of the entries and writes it in its own transactions, concurrently.
async fn drain_pair(ledger: &Arc<Ledger>, store: &Arc<Store>, group: &str, events: usize) -> f64 {
    store.migrate().await.expect("migrate");
    let settled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = ["bench-a", "bench-b"]
        .into_iter()
        .map(|consumer| {
            let mut settler = Settler::new(
                ledger.clone(),
                store.clone(),
                SettlerSettings {
                    consumer: consumer.into(),
                    linger: Duration::ZERO,
                    ..settings(group)
                },
            );
            let settled = settled.clone();
            tokio::spawn(async move {
                use std::sync::atomic::Ordering::SeqCst;
                while settled.load(SeqCst) < events {
                    let n = settler.round().await.expect("round");
                    if settled.fetch_add(n, SeqCst) + n < events && n == 0 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("settler");
    }
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(store.count_events().await.expect("count") as usize, events);
    events as f64 / secs
}

/// Debits at `rate` per second for `secs` with a settler into `store`; returns the
/// achieved rate and the lag samples (ms).
async fn lag_under_load(
    ledger: Arc<Ledger>,
    store: Arc<Store>,
    rate: usize,
    secs: usize,
) -> (f64, Vec<u64>) {
    store.migrate().await.expect("migrate");
    for a in 0..ACCOUNTS {
        let grant = Grant {
            account_id: format!("acct{a:05}"),
            wallet: "default".into(),
            amount: 10_000_000,
            kind: LotKind::Purchase,
            priority: 50,
            expires_at_ms: 0,
            description: String::new(),
            idempotency_key: "fund".into(),
            metadata: Metadata::new(),
        };
        ledger.grant(&grant).await.expect("grant");
    }
    let settler = Settler::new(ledger.clone(), store.clone(), settings("tollgate-settler"));
    let status = settler.status();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut rx = stopped.clone();
    let settle_task = tokio::spawn(settler.run(async move {
        let _ = rx.wait_for(|s| *s).await;
    }));
    let workers = 64;
    let per_worker = rate as f64 / workers as f64;
    let started = Instant::now();
    let end = started + Duration::from_secs(secs as u64);
    let done: Vec<_> = (0..workers)
        .map(|w| {
            let ledger = ledger.clone();
            tokio::spawn(async move {
                let mut sent = 0u64;
                while Instant::now() < end {
                    // Open loop: each worker keeps its own schedule.
                    let due = started + Duration::from_secs_f64(sent as f64 / per_worker);
                    if due > Instant::now() {
                        tokio::time::sleep_until(due.into()).await;
                    }
                    let debit = Debit {
                        account_id: format!("acct{:05}", (w * 7919 + sent as usize) % ACCOUNTS),
                        wallet: "default".into(),
                        amount: 1,
                        idempotency_key: format!("w{w}-{sent}"),
                        operation: "envelope.send".into(),
                        metadata: Metadata::new(),
                        member_id: String::new(),
                        price_inputs: None,
                        attempt_mark: None,
                    };
                    ledger.debit(&debit).await.expect("debit");
                    sent += 1;
                }
                sent
            })
        })
        .collect();
    let mut samples = Vec::new();
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok(s) = status.lock() {
            // As of its last measurement, as the bench has always sampled it.
            samples.push(s.lag_ms(s.measured_at_ms));
        }
    }
    let mut sent = 0;
    for d in done {
        sent += d.await.expect("worker");
    }
    let achieved = sent as f64 / started.elapsed().as_secs_f64();
    let _ = stop.send(true);
    let _ = settle_task.await;
    (achieved, samples)
}

fn percentile(samples: &mut [u64], p: f64) -> u64 {
    if samples.is_empty() {
        return 0;
    }
    samples.sort_unstable();
    samples[((samples.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let events = knob("SETTLE_BENCH_EVENTS", 200_000, 2_000, full);
    let rate = knob("SETTLE_BENCH_RATE", 20_000, 1_000, full);
    let secs = knob("SETTLE_BENCH_SECS", 10, 1, full);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let redis = common::RedisServer::start();
        let ledger = common::ledger(&redis, Clock::Redis);
        ledger.load_scripts().await.expect("scripts");
        fill(&ledger, events).await;
        let baseline = raw_read(&ledger).await;

        let pg = common::PgDatabase::create().await;
        let pg_store = Arc::new(Store::connect_lazy(&pg.url, 4).expect("pg"));
        let sqlite_store =
            Arc::new(Store::connect_lazy(&common::temp_sqlite_url(), 4).expect("sqlite"));
        let pg_pair = common::PgDatabase::create().await;
        let pg_pair_store = Arc::new(Store::connect_lazy(&pg_pair.url, 4).expect("pg"));
        // Every group exists before any drains: trimming waits for every group.
        for group in ["bench-sqlite", "bench-pg-pair"] {
            Settler::new(ledger.clone(), sqlite_store.clone(), settings(group))
                .ensure_groups()
                .await
                .expect("group");
        }
        let pg_rate = drain(&ledger, &pg_store, "bench-pg", events).await;
        let pg_pair_rate = drain_pair(&ledger, &pg_pair_store, "bench-pg-pair", events).await;
        let sqlite_rate = drain(&ledger, &sqlite_store, "bench-sqlite", events).await;
        drop(ledger);
        drop(redis);

        let redis = common::RedisServer::start();
        let ledger = common::ledger(&redis, Clock::Redis);
        let pg2 = common::PgDatabase::create().await;
        let store = Arc::new(Store::connect_lazy(&pg2.url, 4).expect("pg"));
        let (achieved, mut lags) = lag_under_load(ledger, store, rate, secs).await;

        let result = serde_json::json!({
            "events": events,
            "raw_redis_read_events_per_s": baseline.round(),
            "postgres_settled_events_per_s": pg_rate.round(),
            "postgres_ratio_to_raw_read": (pg_rate / baseline * 1000.0).round() / 1000.0,
            "postgres_two_settlers_events_per_s": pg_pair_rate.round(),
            "postgres_two_settlers_ratio_to_raw_read":
                (pg_pair_rate / baseline * 1000.0).round() / 1000.0,
            "sqlite_settled_events_per_s": sqlite_rate.round(),
            "sqlite_ratio_to_raw_read": (sqlite_rate / baseline * 1000.0).round() / 1000.0,
            "load_target_per_s": rate,
            "load_achieved_per_s": achieved.round(),
            "outbox_lag_ms_p50": percentile(&mut lags, 0.5),
            "outbox_lag_ms_p99": percentile(&mut lags, 0.99),
            "outbox_lag_ms_max": lags.iter().copied().max().unwrap_or(0),
        });
        println!("{}", serde_json::to_string_pretty(&result).expect("json"));
        let _ = std::fs::create_dir_all("target");
        let _ = std::fs::write("target/bench-settle.json", result.to_string());
    });
}
