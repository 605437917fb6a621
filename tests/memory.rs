//! Redis memory per idempotency record, per account, per charge record and per unsettled
//! outbox event, measured on a real redis-server (the README quotes these figures). Run
//! with `--nocapture` to see them.

mod common;

use tollgate::ledger::{AttemptMark, Clock, Debit, Grant, LotKind, Metadata};

const ACCOUNTS: usize = 2_000;
/// Budget from the performance issue (1 KiB); the test fails if the layout grows past it.
/// Measured 869 B on 2026-11-23 (Redis 7.0.15, jemalloc): `used_memory` delta, so Redis's
/// per-key overhead counts too.
const ACCOUNT_BYTES_MAX: f64 = 1024.0;
/// Budget from the performance issue. Records are fields of per-shard bucket hashes
/// (lua/lib.lua); with a few hundred records per bucket the hashes are hashtable-encoded,
/// as in production, so the figure is the one at scale.
const IDEMPOTENCY_RECORD_BYTES_MAX: f64 = 150.0;
/// Sizing figures for operators (README, "Redis memory"): a charge record is a field of an
/// hourly bucket hash; an unsettled debit event an outbox stream entry. Budgets ~1.5x the figures
/// measured on 2026-12-02 (140 B in hourly buckets, 192 B as a key each before; 175 B),
/// so a layout change that grows them fails.
const CHARGE_RECORD_BYTES_MAX: f64 = 210.0;
const OUTBOX_EVENT_BYTES_MAX: f64 = 260.0;
/// Idempotency records per account in the measurement: 16,000 records spread over 16
/// shards, far past the 128 fields a listpack-encoded (smaller) hash holds.
const RECORDS_PER_ACCOUNT: usize = 8;

fn account(i: usize) -> String {
    format!("acct_{i:07}")
}

async fn used_memory(ledger: &tollgate::ledger::Ledger) -> f64 {
    let info: String = ledger
        .redis()
        .query(redis::cmd("INFO").arg("memory"))
        .await
        .expect("info");
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("used_memory")
}

async fn delete_matching(ledger: &tollgate::ledger::Ledger, pattern: &str) {
    let keys: Vec<String> = ledger
        .redis()
        .query(redis::cmd("KEYS").arg(pattern))
        .await
        .expect("keys");
    for chunk in keys.chunks(500) {
        let _: i64 = ledger
            .redis()
            .query(redis::cmd("DEL").arg(chunk))
            .await
            .expect("del");
    }
}

#[tokio::test]
async fn memory_per_account_and_per_idempotency_record() {
    let redis = common::RedisServer::start();
    let ledger = common::ledger(&redis, Clock::Redis);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;

    // Scripts compiled in Redis's Lua VM count in used_memory: load them before measuring,
    // so the per-account figure holds only per-account state.
    ledger.load_scripts().await.expect("scripts");
    let before = used_memory(&ledger).await;
    for i in 0..ACCOUNTS {
        for (n, (kind, expires)) in [(LotKind::Purchase, 0), (LotKind::Demo, now_ms + 86_400_000)]
            .into_iter()
            .enumerate()
        {
            let grant = Grant {
                account_id: account(i),
                wallet: "default".into(),
                amount: 1_000,
                kind,
                priority: 50,
                expires_at_ms: expires,
                description: String::new(),
                idempotency_key: format!("grant-{n}"),
                metadata: Metadata::new(),
            };
            ledger.grant(&grant).await.expect("grant");
        }
    }
    // Leave only the accounts' live state: no idempotency records, no outbox entries.
    delete_matching(&ledger, "{tg:*}:i:*").await;
    delete_matching(&ledger, "{tg:*}:o").await;
    let per_account = (used_memory(&ledger).await - before) / ACCOUNTS as f64;

    // Idempotency records of gateway-style debits: a 36-character request id.
    let per_record = per_idempotency_record(&ledger, "a", false).await;
    // The same as a gateway check keyed by the request id makes them: priced, with the
    // attempt's mark (8 more bytes of value).
    let per_marked_record = per_idempotency_record(&ledger, "b", true).await;

    // What each of those debits keeps besides: its charge record (for refunds, kept
    // `ledger.charge_retention_secs`) and its outbox entry (until settled and trimmed).
    // (Both runs of per_idempotency_record.)
    let debits = (2 * ACCOUNTS * RECORDS_PER_ACCOUNT) as f64;
    let before_charges = used_memory(&ledger).await;
    delete_matching(&ledger, "{tg:*}:cb:*").await;
    let per_charge = (before_charges - used_memory(&ledger).await) / debits;
    let before_outbox = used_memory(&ledger).await;
    delete_matching(&ledger, "{tg:*}:o").await;
    let per_event = (before_outbox - used_memory(&ledger).await) / debits;

    println!("redis memory per account (one wallet, two lots): {per_account:.0} B");
    println!("redis memory per idempotency record: {per_record:.0} B");
    println!("redis memory per idempotency record with an attempt mark: {per_marked_record:.0} B");
    println!("redis memory per charge record: {per_charge:.0} B");
    println!("redis memory per unsettled outbox event (a debit): {per_event:.0} B");
    assert!(
        per_charge > 0.0 && per_charge <= CHARGE_RECORD_BYTES_MAX,
        "{per_charge}"
    );
    assert!(
        per_event > 0.0 && per_event <= OUTBOX_EVENT_BYTES_MAX,
        "{per_event}"
    );
    assert!(
        per_account > 0.0 && per_account <= ACCOUNT_BYTES_MAX,
        "{per_account}"
    );
    for per_record in [per_record, per_marked_record] {
        assert!(
            per_record > 0.0 && per_record <= IDEMPOTENCY_RECORD_BYTES_MAX,
            "{per_record}"
        );
    }
}

/// Memory per idempotency record of [`RECORDS_PER_ACCOUNT`] debits per account (their
/// records deleted after): `marked`, priced debits with an attempt mark, as a gateway
/// check keyed by the client's request id sends them. The debits go to the account's
/// wallet (its balance is not measured here); `run` keeps the keys of two runs apart.
async fn per_idempotency_record(
    ledger: &std::sync::Arc<tollgate::ledger::Ledger>,
    run: &'static str,
    marked: bool,
) -> f64 {
    let before = used_memory(ledger).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..ACCOUNTS {
        let ledger = ledger.clone();
        let account = account(i);
        tasks.spawn(async move {
            for n in 0..RECORDS_PER_ACCOUNT {
                let debit = Debit {
                    account_id: account.clone(),
                    wallet: "default".into(),
                    amount: 1,
                    idempotency_key: format!(
                        "gw:envelope.send:0b7c6f1e-3d2a-4c5{run}-{n:04}-{i:012}"
                    ),
                    operation: "envelope.send".into(),
                    metadata: Metadata::new(),
                    member_id: String::new(),
                    price_inputs: marked.then(|| "units=1".to_owned()),
                    attempt_mark: marked.then(AttemptMark::random),
                };
                ledger.debit(&debit).await.expect("debit");
            }
        });
        if tasks.len() >= 32 {
            tasks.join_next().await.expect("task").expect("debits");
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("debits");
    }
    let after_debits = used_memory(ledger).await;
    delete_matching(ledger, "{tg:*}:i:*").await;
    let after_delete = used_memory(ledger).await;
    assert!(after_debits > before);
    (after_debits - after_delete) / (ACCOUNTS * RECORDS_PER_ACCOUNT) as f64
}
