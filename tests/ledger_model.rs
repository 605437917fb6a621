//! Model-based property tests of the ledger against a real redis-server.
//!
//! 1. `sequential_runs_match_the_model`: random sequences of every operation (replays and
//!    reused keys included, a manual clock driving lot and hold expiry, sweeps) against
//!    the in-memory model, which predicts every answer; full state compared after each run.
//! 2. `concurrent_runs_keep_the_invariants`: 16 tasks run random operations at once on
//!    shared accounts; the outbox events, replayed in order, must pass every invariant
//!    and reproduce Redis's final state exactly; every acknowledged charge is in the
//!    outbox exactly once.
//!
//! Both send every other Debit and Authorize by API key (`Ledger::debit_by_key`,
//! `authorize_by_key`: the gateway's path on an identity-cache miss), replays included:
//! the answers must be the model's all the same.
//!
//! Knobs: PROPTEST_CASES (runs per test; default 6 sequential and 3 concurrent, which
//! with the run lengths below is over 2,000 operations per CI run).

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};

use common::model::{Expect, Model, ModelLimits, Outcome, Replayer};
use tollgate::gateway::identity::{shard_of_key_id, KeyBinding, KeyStore};
use tollgate::ledger::{
    Adjust, Authorize, Clock, Debit, EndHold, Grant, KeyRef, Keyed, Ledger, LedgerSettings,
    LotKind, Metadata, OnExpiry, RedisPool, Refund,
};

const START_MS: i64 = 1_800_000_000_000;
const ACCOUNTS: [&str; 3] = ["alice", "bob.co", "carol@x"];
const WALLETS: [&str; 2] = ["default", "esign"];
const LIMITS: ModelLimits = ModelLimits {
    lots_per_wallet_max: 6,
    wallets_per_account_max: 2,
    holds_per_wallet_max: 5,
};

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Debug, Clone)]
enum Op {
    Grant {
        account: usize,
        wallet: usize,
        amount: i64,
        kind: usize,
        priority: u8,
        expires_in_ms: Option<i64>,
    },
    Adjust {
        account: usize,
        wallet: usize,
        amount: i64,
        expires_in_ms: Option<i64>,
    },
    Debit {
        account: usize,
        wallet: usize,
        amount: i64,
    },
    Authorize {
        account: usize,
        wallet: usize,
        amount: i64,
        ttl_ms: i64,
        capture_on_expiry: bool,
    },
    /// Capture a known hold: percent of its amount (None = all; over 100 = too much).
    Capture {
        hold: usize,
        percent: Option<i64>,
    },
    Release {
        hold: usize,
    },
    Refund {
        charge: usize,
        amount: i64,
    },
    Advance {
        ms: i64,
    },
    /// Run an earlier operation again with its key and parameters.
    Replay {
        index: usize,
    },
    /// Run an earlier operation's key with another amount.
    Reuse {
        index: usize,
    },
    Balance {
        account: usize,
    },
    Sweep,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let acct = 0..ACCOUNTS.len();
    let wallet = prop_oneof![4 => Just(0usize), 1 => Just(1usize), 1 => Just(2usize)];
    let expires =
        prop_oneof![2 => Just(None), 3 => (1i64..40_000).prop_map(Some), 1 => Just(Some(-5))];
    prop_oneof![
        6 => (acct.clone(), wallet.clone(), 1i64..300, 0usize..4, prop::sample::select(vec![10u8, 50, 90]), expires.clone())
            .prop_map(|(account, wallet, amount, kind, priority, expires_in_ms)| Op::Grant { account, wallet, amount, kind, priority, expires_in_ms }),
        2 => (acct.clone(), wallet.clone(), prop_oneof![-120i64..-1, 1i64..120], expires)
            .prop_map(|(account, wallet, amount, expires_in_ms)| Op::Adjust { account, wallet, amount, expires_in_ms }),
        10 => (acct.clone(), wallet.clone(), 1i64..150)
            .prop_map(|(account, wallet, amount)| Op::Debit { account, wallet, amount }),
        7 => (acct.clone(), wallet.clone(), 1i64..150, 500i64..30_000, any::<bool>())
            .prop_map(|(account, wallet, amount, ttl_ms, capture_on_expiry)| Op::Authorize { account, wallet, amount, ttl_ms, capture_on_expiry }),
        5 => (any::<usize>(), prop_oneof![1 => Just(None), 4 => (0i64..=110).prop_map(Some)])
            .prop_map(|(hold, percent)| Op::Capture { hold, percent }),
        3 => any::<usize>().prop_map(|hold| Op::Release { hold }),
        4 => (any::<usize>(), 1i64..80).prop_map(|(charge, amount)| Op::Refund { charge, amount }),
        4 => (0i64..12_000).prop_map(|ms| Op::Advance { ms }),
        4 => any::<usize>().prop_map(|index| Op::Replay { index }),
        1 => any::<usize>().prop_map(|index| Op::Reuse { index }),
        2 => acct.prop_map(|account| Op::Balance { account }),
        1 => Just(Op::Sweep),
    ]
}

/// A mutation as it was sent, so it can be sent again (Replay / Reuse).
#[derive(Debug, Clone)]
enum Sent {
    Grant(Grant),
    Adjust(Adjust),
    Debit(Debit),
    Authorize(Authorize),
    End(EndHold),
    Refund(Refund),
}

fn wallet_name(i: usize) -> String {
    // Index 2 is a third wallet, past the per-account wallet limit of 2 when both
    // others exist.
    ["default", "esign", "verify"][i].to_owned()
}

fn settings() -> LedgerSettings {
    LedgerSettings {
        lots_per_wallet_max: LIMITS.lots_per_wallet_max as u32,
        wallets_per_account_max: LIMITS.wallets_per_account_max as u32,
        holds_per_wallet_max: LIMITS.holds_per_wallet_max as u32,
        ..LedgerSettings::default()
    }
}

fn new_ledger(redis: &common::RedisServer, clock: Clock) -> Arc<Ledger> {
    let pool = RedisPool::new(&redis.url(), 2, std::time::Duration::from_secs(5)).expect("pool");
    Arc::new(Ledger::new(pool, settings(), clock))
}

/// An API key of every test account. Every other Debit and Authorize (replays included)
/// is sent by key, as the gateway does on an identity-cache miss: the scripts resolve the
/// key themselves, and no answer may differ from the same call by account.
struct Keys {
    by_account: HashMap<String, (String, u16, String)>,
    turn: AtomicI64,
}

impl Keys {
    /// The key to send the next charge of `account` by, every other call.
    fn next(&self, account: &str) -> Option<KeyRef<'_>> {
        if self.turn.fetch_add(1, Ordering::Relaxed) % 2 == 0 {
            return None;
        }
        let (key_id, shard, digest_hex) = self.by_account.get(account)?;
        Some(KeyRef {
            key_id,
            shard: *shard,
            digest_hex,
        })
    }
}

/// The charge's answer, from a call by key that must have resolved to `account`.
fn charged<T: std::fmt::Debug>(
    account: &str,
    keyed: Result<Keyed<T>, tollgate::ledger::LedgerError>,
) -> Result<T, tollgate::ledger::LedgerError> {
    match keyed? {
        Keyed::Charged { account_id, result } => {
            assert_eq!(account_id, account, "the key resolved to its account");
            result
        }
        other => panic!("a call by the key of {account}: {other:?}"),
    }
}

async fn flush(ledger: &Ledger) -> Arc<Keys> {
    let _: () = ledger
        .redis()
        .query(&redis::cmd("FLUSHALL"))
        .await
        .expect("flushall");
    ledger.initialize_all().await.expect("initialize");
    let store = KeyStore::new(
        ledger.redis().clone(),
        ledger.shards().clone(),
        std::time::Duration::from_secs(10),
        10,
        10,
    );
    store.load_scripts().await.expect("key scripts");
    let mut by_account = HashMap::new();
    for account in ACCOUNTS {
        let key = store
            .create(account, "model", &KeyBinding::default(), "")
            .await
            .expect("api key");
        let shard = shard_of_key_id(&key.key_id, ledger.shards()).expect("key shard");
        by_account.insert(account.to_owned(), (key.key_id, shard, key.digest_hex));
    }
    Arc::new(Keys {
        by_account,
        turn: AtomicI64::new(0),
    })
}

/// Sends a mutation; returns the comparable outcome.
async fn send(ledger: &Ledger, keys: &Keys, sent: &Sent) -> Outcome {
    use common::model::{debited, ended, granted, held, refunded};
    match sent {
        Sent::Grant(c) => granted(ledger.grant(c).await),
        Sent::Adjust(c) => granted(ledger.adjust(c).await),
        Sent::Debit(c) => debited(match keys.next(&c.account_id) {
            Some(key) => {
                let by_key = Debit {
                    account_id: String::new(),
                    ..c.clone()
                };
                charged(&c.account_id, ledger.debit_by_key(&by_key, &key).await)
            }
            None => ledger.debit(c).await,
        }),
        Sent::Authorize(c) => held(match keys.next(&c.account_id) {
            Some(key) => {
                let by_key = Authorize {
                    account_id: String::new(),
                    ..c.clone()
                };
                charged(&c.account_id, ledger.authorize_by_key(&by_key, &key).await)
            }
            None => ledger.authorize(c).await,
        }),
        Sent::End(c) => ended(ledger.end_hold(c).await),
        Sent::Refund(c) => refunded(ledger.refund(c).await),
    }
}

/// The model's view of a mutation: its prediction, given the real answer for ids.
fn predict(model: &mut Model, now: i64, sent: &Sent, real: &Outcome) -> (Expect, String, String) {
    match sent {
        Sent::Grant(c) => {
            let params = format!(
                "grant|{}|{}|{}|{}|{}",
                c.wallet,
                c.amount,
                c.kind.as_str(),
                c.priority,
                c.expires_at_ms
            );
            let e = model.grant(
                now,
                &c.account_id,
                &c.wallet,
                c.amount,
                c.kind.as_str(),
                c.priority,
                c.expires_at_ms,
                &c.idempotency_key,
                &params,
            );
            (e, c.account_id.clone(), params)
        }
        Sent::Adjust(c) => {
            let params = format!(
                "adjust|{}|{}|{}|{}",
                c.wallet, c.amount, c.priority, c.expires_at_ms
            );
            let e = model.adjust(
                now,
                &c.account_id,
                &c.wallet,
                c.amount,
                c.priority,
                c.expires_at_ms,
                &c.idempotency_key,
                &params,
            );
            (e, c.account_id.clone(), params)
        }
        Sent::Debit(c) => {
            let params = format!("debit|{}|{}", c.wallet, c.amount);
            let e = model.debit(
                now,
                &c.account_id,
                &c.wallet,
                c.amount,
                &c.idempotency_key,
                &params,
                real,
            );
            (e, c.account_id.clone(), params)
        }
        Sent::Authorize(c) => {
            let params = format!(
                "authorize|{}|{}|{}|{:?}",
                c.wallet, c.amount, c.ttl_ms, c.on_expiry
            );
            let e = model.authorize(
                now,
                &c.account_id,
                &c.wallet,
                c.amount,
                c.ttl_ms,
                c.on_expiry == OnExpiry::Capture,
                &c.idempotency_key,
                &params,
                real,
            );
            (e, c.account_id.clone(), params)
        }
        Sent::End(c) => {
            let params = format!("end|{}|{:?}", c.hold_id, c.capture);
            let account = model
                .holds
                .get(&c.hold_id)
                .map(|h| h.account.clone())
                .unwrap_or_default();
            let e = model.end(
                now,
                &c.hold_id,
                c.capture,
                &c.idempotency_key,
                &params,
                real,
            );
            (e, account, params)
        }
        Sent::Refund(c) => {
            let params = format!("refund|{}|{}", c.charge_id, c.amount);
            let account = model
                .charges
                .get(&c.charge_id)
                .map(|h| h.account.clone())
                .unwrap_or_default();
            let e = model.refund(now, &c.charge_id, c.amount, &c.idempotency_key, &params);
            (e, account, params)
        }
    }
}

fn key_of(sent: &Sent) -> &str {
    match sent {
        Sent::Grant(c) => &c.idempotency_key,
        Sent::Adjust(c) => &c.idempotency_key,
        Sent::Debit(c) => &c.idempotency_key,
        Sent::Authorize(c) => &c.idempotency_key,
        Sent::End(c) => &c.idempotency_key,
        Sent::Refund(c) => &c.idempotency_key,
    }
}

/// The same mutation with another amount (for Reuse).
fn with_other_amount(sent: &Sent) -> Sent {
    let mut s = sent.clone();
    match &mut s {
        Sent::Grant(c) => c.amount += 1,
        Sent::Adjust(c) => c.amount += if c.amount == -1 { -1 } else { 1 },
        Sent::Debit(c) => c.amount += 1,
        Sent::Authorize(c) => c.amount += 1,
        Sent::End(c) => {
            c.capture = match c.capture {
                Some(Some(a)) => Some(Some(a + 1)),
                Some(None) => Some(Some(1)),
                None => Some(None),
            }
        }
        Sent::Refund(c) => c.amount += 1,
    }
    s
}

struct Run {
    ledger: Arc<Ledger>,
    keys: Arc<Keys>,
    now: Arc<AtomicI64>,
    model: Model,
    history: Vec<Sent>,
    hold_ids: Vec<String>,
    charge_ids: Vec<String>,
    next_key: u64,
}

impl Run {
    fn key(&mut self) -> String {
        self.next_key += 1;
        format!("k{}", self.next_key)
    }

    fn now(&self) -> i64 {
        self.now.load(Ordering::SeqCst)
    }

    /// Sends one mutation and checks the answer against the model.
    async fn mutate(&mut self, sent: Sent, op: &Op) -> Result<(), TestCaseError> {
        let real = send(&self.ledger, &self.keys, &sent).await;
        let now = self.now();
        let (expect, account, params) = predict(&mut self.model, now, &sent, &real);
        match expect {
            Expect::Replay(first) => {
                // Refusals carry no replayed flag (they are errors); successes must.
                prop_assert!(
                    real.replayed() || first.event_id().is_none(),
                    "{op:?}: expected a replay, got {real:?}"
                );
                prop_assert_eq!(&real, &first, "{:?}: replay differs", op);
            }
            Expect::Fresh { outcome, remember } => {
                prop_assert!(!real.replayed(), "{op:?}: unexpected replay {real:?}");
                prop_assert_eq!(real.without_ids(), outcome, "{:?}", op);
                if remember {
                    self.model.remember(&account, key_of(&sent), &params, &real);
                }
            }
        }
        if let Outcome::Held { hold_id, .. } = &real {
            if !real.replayed() {
                self.hold_ids.push(hold_id.clone());
            }
        }
        if let Outcome::Debited { event_id, .. } | Outcome::Ended { event_id, .. } = &real {
            if !real.replayed() && self.model.charges.contains_key(event_id) {
                self.charge_ids.push(event_id.clone());
            }
        }
        self.history.push(sent);
        Ok(())
    }

    async fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let now = self.now();
        match op.clone() {
            Op::Grant {
                account,
                wallet,
                amount,
                kind,
                priority,
                expires_in_ms,
            } => {
                let kind = [
                    LotKind::Purchase,
                    LotKind::Demo,
                    LotKind::Promo,
                    LotKind::Adjustment,
                ][kind];
                let cmd = Grant {
                    account_id: ACCOUNTS[account].into(),
                    wallet: wallet_name(wallet),
                    amount,
                    kind,
                    priority,
                    expires_at_ms: expires_in_ms.map_or(0, |ms| now + ms),
                    description: String::new(),
                    idempotency_key: self.key(),
                    metadata: Metadata::new(),
                };
                self.mutate(Sent::Grant(cmd), op).await
            }
            Op::Adjust {
                account,
                wallet,
                amount,
                expires_in_ms,
            } => {
                let cmd = Adjust {
                    account_id: ACCOUNTS[account].into(),
                    wallet: wallet_name(wallet),
                    amount,
                    priority: 50,
                    expires_at_ms: expires_in_ms.map_or(0, |ms| now + ms),
                    description: String::new(),
                    idempotency_key: self.key(),
                    metadata: Metadata::new(),
                };
                self.mutate(Sent::Adjust(cmd), op).await
            }
            Op::Debit {
                account,
                wallet,
                amount,
            } => {
                let cmd = Debit {
                    account_id: ACCOUNTS[account].into(),
                    wallet: wallet_name(wallet),
                    amount,
                    idempotency_key: self.key(),
                    operation: "op.debit".into(),
                    metadata: Metadata::new(),
                    member_id: String::new(),
                };
                self.mutate(Sent::Debit(cmd), op).await
            }
            Op::Authorize {
                account,
                wallet,
                amount,
                ttl_ms,
                capture_on_expiry,
            } => {
                let cmd = Authorize {
                    account_id: ACCOUNTS[account].into(),
                    wallet: wallet_name(wallet),
                    amount,
                    ttl_ms,
                    on_expiry: if capture_on_expiry {
                        OnExpiry::Capture
                    } else {
                        OnExpiry::Release
                    },
                    idempotency_key: self.key(),
                    operation: "op.hold".into(),
                    metadata: Metadata::new(),
                    member_id: String::new(),
                };
                self.mutate(Sent::Authorize(cmd), op).await
            }
            Op::Capture { hold, percent } => {
                if self.hold_ids.is_empty() {
                    return Ok(());
                }
                let hold_id = self.hold_ids[hold % self.hold_ids.len()].clone();
                let held = self.model.holds.get(&hold_id).map_or(1, |h| h.amount);
                let amount = percent.map(|p| held * p / 100);
                let key = self.key();
                self.mutate(Sent::End(EndHold::capture(hold_id, amount, key)), op)
                    .await
            }
            Op::Release { hold } => {
                if self.hold_ids.is_empty() {
                    return Ok(());
                }
                let hold_id = self.hold_ids[hold % self.hold_ids.len()].clone();
                let key = self.key();
                self.mutate(Sent::End(EndHold::release(hold_id, key)), op)
                    .await
            }
            Op::Refund { charge, amount } => {
                if self.charge_ids.is_empty() {
                    return Ok(());
                }
                let charge_id = self.charge_ids[charge % self.charge_ids.len()].clone();
                let cmd = Refund {
                    charge_id,
                    amount,
                    idempotency_key: self.key(),
                    metadata: Metadata::new(),
                };
                self.mutate(Sent::Refund(cmd), op).await
            }
            Op::Advance { ms } => {
                self.now.fetch_add(ms, Ordering::SeqCst);
                Ok(())
            }
            Op::Replay { index } => {
                if self.history.is_empty() {
                    return Ok(());
                }
                let sent = self.history[index % self.history.len()].clone();
                self.mutate(sent, op).await
            }
            Op::Reuse { index } => {
                if self.history.is_empty() {
                    return Ok(());
                }
                let sent = with_other_amount(&self.history[index % self.history.len()]);
                self.mutate(sent, op).await
            }
            Op::Balance { account } => {
                let real = self
                    .ledger
                    .balance(ACCOUNTS[account], "")
                    .await
                    .expect("balance");
                let expected = self.model.balance(now, ACCOUNTS[account]);
                prop_assert_eq!(real, expected, "{:?}", op);
                Ok(())
            }
            Op::Sweep => {
                for shard in 0..self.ledger.shards().count() {
                    self.ledger.sweep_shard(shard, 1000).await.expect("sweep");
                }
                self.model.sweep(now);
                Ok(())
            }
        }
    }

    /// Compares every wallet's balance and lots with the model, then replays the outbox.
    async fn check_final_state(&mut self) -> Result<(), TestCaseError> {
        let now = self.now();
        for account in ACCOUNTS {
            let real = self.ledger.balance(account, "").await.expect("balance");
            let expected = self.model.balance(now, account);
            prop_assert_eq!(&real, &expected, "final balance of {}", account);
            for b in &real {
                prop_assert!(b.is_conserved(), "conservation: {b:?}");
                prop_assert!(b.available >= 0 && b.held >= 0);
            }
            for wallet in WALLETS.iter().copied().chain(["verify"]) {
                let page = self
                    .ledger
                    .lots(account, wallet, 0, 1000)
                    .await
                    .expect("lots");
                let expected = self.model.lots(account, wallet);
                prop_assert_eq!(
                    page.lots.len(),
                    expected.len(),
                    "lots of {}/{}",
                    account,
                    wallet
                );
                for (lot, (id, m)) in page.lots.iter().zip(&expected) {
                    prop_assert_eq!(&lot.lot_id, id);
                    prop_assert_eq!(
                        (
                            lot.amount,
                            lot.remaining,
                            lot.held,
                            lot.priority,
                            lot.expires_at_ms,
                            lot.kind.as_str(),
                            lot.created_at_ms,
                            lot.updated_at_ms
                        ),
                        (
                            m.amount,
                            m.remaining,
                            m.held,
                            m.priority,
                            m.expires_at_ms,
                            m.kind.as_str(),
                            m.created_at_ms,
                            m.updated_at_ms
                        ),
                        "lot {} of {}/{}",
                        id,
                        account,
                        wallet
                    );
                }
            }
        }
        check_outbox_replay(&self.ledger).await;
        Ok(())
    }
}

/// Replays every outbox event (per shard, in stream order) and checks the rebuilt
/// wallets against Redis's live state.
async fn check_outbox_replay(ledger: &Ledger) -> Replayer {
    let events = common::outbox_events(ledger).await;
    let mut ids = HashSet::new();
    let mut replayer = Replayer::default();
    for e in &events {
        assert!(
            ids.insert(e.event_id.clone()),
            "duplicate event id {}",
            e.event_id
        );
        replayer.apply(e);
    }
    for ((account, wallet), w) in &replayer.wallets {
        let real = ledger.balance(account, wallet).await.expect("balance");
        let real = &real[0];
        assert_eq!(
            (
                real.available,
                real.held,
                real.granted,
                real.used,
                real.expired,
                real.refunded,
                real.adjusted
            ),
            (
                w.available(),
                w.held,
                w.granted,
                w.used,
                w.expired,
                w.refunded,
                w.adjusted
            ),
            "outbox replay of {account}/{wallet} differs from redis"
        );
        let page = ledger.lots(account, wallet, 0, 1000).await.expect("lots");
        for lot in &page.lots {
            let (remaining, held) = w.lots.get(&lot.lot_id).copied().unwrap_or((0, 0));
            assert_eq!(
                (lot.remaining, lot.held),
                (remaining, held),
                "lot {} of {account}/{wallet}",
                lot.lot_id
            );
        }
        let listed: i64 = page.lots.iter().map(|l| l.remaining).sum();
        assert_eq!(
            listed,
            w.available(),
            "lots of {account}/{wallet} do not sum to available"
        );
    }
    replayer
}

#[test]
fn sequential_runs_match_the_model() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let redis = common::RedisServer::start();
    let mut runner = TestRunner::new(ProptestConfig {
        rng_seed: common::proptest_seed("sequential_runs_match_the_model"),
        cases: cases(6),
        max_shrink_iters: 200,
        ..ProptestConfig::default()
    });
    let strategy = prop::collection::vec(op_strategy(), 200..300);
    runner
        .run(&strategy, |ops| {
            runtime.block_on(async {
                let (clock, now) = Clock::manual(START_MS);
                let ledger = new_ledger(&redis, clock);
                let keys = flush(&ledger).await;
                let mut run = Run {
                    ledger,
                    keys,
                    now,
                    model: Model::new(LIMITS),
                    history: Vec::new(),
                    hold_ids: Vec::new(),
                    charge_ids: Vec::new(),
                    next_key: 0,
                };
                for op in &ops {
                    run.step(op).await?;
                }
                run.check_final_state().await
            })
        })
        .expect("model and ledger agree");
}

/// What one concurrent task saw.
#[derive(Default)]
struct TaskLog {
    /// Event ids of acknowledged mutations (first answers).
    acknowledged: Vec<String>,
    /// (first answer, replayed answer) pairs.
    replays: Vec<(Outcome, Outcome)>,
}

async fn concurrent_task(
    ledger: Arc<Ledger>,
    keys: Arc<Keys>,
    now: Arc<AtomicI64>,
    task: usize,
    ops: Vec<Op>,
) -> TaskLog {
    let mut log = TaskLog::default();
    let mut sent_log: Vec<(Sent, Outcome)> = Vec::new();
    let mut holds: Vec<String> = Vec::new();
    let mut charges: Vec<String> = Vec::new();
    for (i, op) in ops.into_iter().enumerate() {
        let key = format!("t{task}-{i}");
        let at = now.load(Ordering::SeqCst);
        let sent = match op {
            Op::Grant {
                account,
                wallet,
                amount,
                priority,
                expires_in_ms,
                ..
            } => Sent::Grant(Grant {
                account_id: ACCOUNTS[account].into(),
                wallet: WALLETS[wallet % 2].into(),
                amount,
                kind: LotKind::Purchase,
                priority,
                expires_at_ms: expires_in_ms.filter(|ms| *ms > 0).map_or(0, |ms| at + ms),
                description: String::new(),
                idempotency_key: key,
                metadata: Metadata::new(),
            }),
            Op::Adjust {
                account,
                wallet,
                amount,
                ..
            } => Sent::Adjust(Adjust {
                account_id: ACCOUNTS[account].into(),
                wallet: WALLETS[wallet % 2].into(),
                amount,
                priority: 50,
                expires_at_ms: 0,
                description: String::new(),
                idempotency_key: key,
                metadata: Metadata::new(),
            }),
            Op::Debit {
                account,
                wallet,
                amount,
            } => Sent::Debit(Debit {
                account_id: ACCOUNTS[account].into(),
                wallet: WALLETS[wallet % 2].into(),
                amount,
                idempotency_key: key,
                operation: String::new(),
                metadata: Metadata::new(),
                member_id: String::new(),
            }),
            Op::Authorize {
                account,
                wallet,
                amount,
                ttl_ms,
                capture_on_expiry,
            } => Sent::Authorize(Authorize {
                account_id: ACCOUNTS[account].into(),
                wallet: WALLETS[wallet % 2].into(),
                amount,
                ttl_ms,
                on_expiry: if capture_on_expiry {
                    OnExpiry::Capture
                } else {
                    OnExpiry::Release
                },
                idempotency_key: key,
                operation: String::new(),
                metadata: Metadata::new(),
                member_id: String::new(),
            }),
            Op::Capture { hold, percent } if !holds.is_empty() => Sent::End(EndHold::capture(
                holds[hold % holds.len()].clone(),
                percent.map(|p| p.min(100) / 10),
                key,
            )),
            Op::Release { hold } if !holds.is_empty() => {
                Sent::End(EndHold::release(holds[hold % holds.len()].clone(), key))
            }
            Op::Refund { charge, amount } if !charges.is_empty() => Sent::Refund(Refund {
                charge_id: charges[charge % charges.len()].clone(),
                amount: amount % 5 + 1,
                idempotency_key: key,
                metadata: Metadata::new(),
            }),
            Op::Advance { ms } => {
                now.fetch_add(ms / 4, Ordering::SeqCst);
                continue;
            }
            Op::Replay { index } if !sent_log.is_empty() => {
                let (sent, first) = sent_log[index % sent_log.len()].clone();
                let again = send(&ledger, &keys, &sent).await;
                if first.event_id().is_some() || matches!(first, Outcome::Refused(_)) {
                    log.replays.push((first, again));
                }
                continue;
            }
            Op::Sweep => {
                for shard in 0..ledger.shards().count() {
                    ledger.sweep_shard(shard, 100).await.expect("sweep");
                }
                continue;
            }
            _ => continue,
        };
        let out = send(&ledger, &keys, &sent).await;
        assert!(
            !matches!(out, Outcome::Failed(_)),
            "ledger failure: {out:?}"
        );
        if let Some(id) = out.event_id() {
            log.acknowledged.push(id.to_owned());
        }
        match &out {
            Outcome::Held { hold_id, .. } => holds.push(hold_id.clone()),
            Outcome::Debited { event_id, .. } => charges.push(event_id.clone()),
            Outcome::Ended {
                event_id, captured, ..
            } if *captured > 0 => charges.push(event_id.clone()),
            _ => {}
        }
        sent_log.push((sent, out));
    }
    log
}

#[test]
fn concurrent_runs_keep_the_invariants() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let redis = common::RedisServer::start();
    let mut runner = TestRunner::new(ProptestConfig {
        rng_seed: common::proptest_seed("concurrent_runs_keep_the_invariants"),
        cases: cases(3),
        // Concurrent runs are not reproducible: shrinking would chase noise.
        max_shrink_iters: 0,
        ..ProptestConfig::default()
    });
    let strategy = prop::collection::vec(prop::collection::vec(op_strategy(), 40..60), 16);
    runner
        .run(&strategy, |tasks| {
            runtime.block_on(async {
                let (clock, now) = Clock::manual(START_MS);
                let ledger = new_ledger(&redis, clock);
                let keys = flush(&ledger).await;
                // Seed every wallet so the tasks contend for real credits.
                for account in ACCOUNTS {
                    for wallet in WALLETS {
                        let g = Grant {
                            account_id: account.into(),
                            wallet: wallet.into(),
                            amount: 2_000,
                            kind: LotKind::Purchase,
                            priority: 50,
                            expires_at_ms: 0,
                            description: String::new(),
                            idempotency_key: format!("seed-{wallet}"),
                            metadata: Metadata::new(),
                        };
                        ledger.grant(&g).await.expect("seed");
                    }
                }
                let handles: Vec<_> = tasks
                    .into_iter()
                    .enumerate()
                    .map(|(i, ops)| {
                        tokio::spawn(concurrent_task(
                            ledger.clone(),
                            keys.clone(),
                            now.clone(),
                            i,
                            ops,
                        ))
                    })
                    .collect();
                let mut acknowledged = Vec::new();
                let mut replays = Vec::new();
                for h in handles {
                    let log = h.await.expect("task");
                    acknowledged.extend(log.acknowledged);
                    replays.extend(log.replays);
                }
                for (first, again) in &replays {
                    match first {
                        Outcome::Refused(_) => prop_assert_eq!(again, first),
                        _ => prop_assert_eq!(again, &first.with_replayed()),
                    }
                }
                // Settle everything due, then replay the outbox against Redis's state.
                now.fetch_add(100_000, Ordering::SeqCst);
                for shard in 0..ledger.shards().count() {
                    ledger.sweep_shard(shard, 1000).await.expect("sweep");
                }
                let replayer = check_outbox_replay(&ledger).await;
                prop_assert_eq!(
                    replayer.open_holds(),
                    0,
                    "holds past their deadline left open"
                );
                let events = common::outbox_events(&ledger).await;
                let mut seen: HashMap<&str, usize> = HashMap::new();
                for e in &events {
                    *seen.entry(e.event_id.as_str()).or_default() += 1;
                }
                let acked: HashSet<&str> = acknowledged.iter().map(String::as_str).collect();
                prop_assert_eq!(
                    acked.len(),
                    acknowledged.len(),
                    "an event id was acknowledged twice"
                );
                for id in &acked {
                    prop_assert_eq!(
                        seen.get(id).copied(),
                        Some(1),
                        "acknowledged event {} not in the outbox once",
                        id
                    );
                }
                for e in &events {
                    let unacked_kind = matches!(
                        e.kind,
                        tollgate::ledger::event::EventKind::ExpireLot
                            | tollgate::ledger::event::EventKind::ExpireHold
                    ) || e.idempotency_key.starts_with("seed-");
                    prop_assert!(
                        unacked_kind || acked.contains(e.event_id.as_str()),
                        "event nobody asked for: {e:?}"
                    );
                }
                Ok(())
            })
        })
        .expect("invariants hold under concurrency");
}
