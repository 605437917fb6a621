//! Model-based property tests of the ledger against a real redis-server.
//!
//! 1. `sequential_runs_match_the_model`: random sequences of every operation (replays and
//!    reused keys included, a manual clock driving lot and hold expiry, sweeps) against
//!    the in-memory model, which predicts every answer; full state compared after each run.
//! 2. `concurrent_runs_keep_the_invariants`: 16 tasks run random operations at once on
//!    shared accounts, and share their holds, charges and requests: any task captures,
//!    releases or refunds any task's hold or charge, and replays any task's request.
//!    Some requests go twice at once with the same idempotency key (one fresh answer,
//!    one identical replay); some Capture/Release pairs race on one hold (one ends it,
//!    the other is told how it ended) and some Refund pairs on one charge (never both).
//!    The outbox events, replayed in order, must pass every invariant and reproduce
//!    Redis's final state exactly; every acknowledged charge is in the outbox exactly
//!    once; every hold ended once, by the answer that said so, and every HoldEnded and
//!    RefundExceedsCharge refusal names what really happened; each wallet's totals are
//!    what the fresh answers add up to. Coverage counts (printed) must all be non-zero.
//!
//! Both send every other Debit and Authorize by API key (`Ledger::debit_by_key`,
//! `authorize_by_key`: the gateway's path on an identity-cache miss), replays included:
//! the answers must be the model's all the same.
//!
//! Knobs: PROPTEST_CASES (runs per test; default 6 sequential and 3 concurrent, which
//! with the run lengths below is over 2,000 operations per CI run).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};

use common::model::{Expect, Model, ModelLimits, Outcome, Replayer};
use tollgate::gateway::identity::{shard_of_key_id, KeyBinding, KeyStore};
use tollgate::ledger::{
    Adjust, Authorize, Clock, Debit, EndHold, Grant, HoldEnd, KeyRef, Keyed, Ledger,
    LedgerSettings, LotKind, Metadata, OnExpiry, RedisPool, Refund, Refusal,
};

const START_MS: i64 = 1_800_000_000_000;
const ACCOUNTS: [&str; 3] = ["alice", "bob.co", "carol@x"];
const WALLETS: [&str; 2] = ["default", "esign"];
const LIMITS: ModelLimits = ModelLimits {
    lots_per_wallet_max: 6,
    wallets_per_account_max: 2,
    holds_per_wallet_max: 5,
};

/// Concurrent cases per run unless PROPTEST_CASES says otherwise.
const CONCURRENT_CASES: u32 = 3;

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
                    price_inputs: None,
                    attempt_mark: None,
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
                    price_inputs: None,
                    attempt_mark: None,
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
                common::sweep_all(&self.ledger).await;
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
                            lot.expired,
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
                            !m.listed,
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
    // Dead wallets that left a full wallet set for a new one (lib.lua
    // `wallet_set_refuses`): the model predicts which, GetBalance lists what is left.
    let retired = AtomicUsize::new(0);
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
                retired.fetch_add(run.model.wallets_retired, Ordering::Relaxed);
                run.check_final_state().await
            })
        })
        .expect("model and ledger agree");
    let retired = retired.into_inner();
    println!("dead wallets retired from a full wallet set: {retired}");
    if runner_cases_default(6) {
        assert!(retired > 0, "no run retired a dead wallet");
    }
}

/// Whether this run has at least `default` cases (coverage is only asserted then).
fn runner_cases_default(default: u32) -> bool {
    cases(default) >= default
}

/// How a concurrent step sends its request.
#[derive(Debug, Clone, Copy)]
enum Mode {
    Once,
    /// The same request (same idempotency key) twice at once, `tokio::join!`: the scripts
    /// run one after the other, so one answer is fresh and the other its replay (or the
    /// same refusal twice). Replays of an earlier request are sent twice at once too.
    Twin,
    /// For Capture/Release/Refund: two requests with different keys at once on the same
    /// hold (one captures, the other releases) or the same charge (amounts summing past
    /// it, so both can never succeed). Other operations are sent once.
    Rival,
}

fn mode_strategy() -> impl Strategy<Value = Mode> {
    prop_oneof![5 => Just(Mode::Once), 2 => Just(Mode::Twin), 2 => Just(Mode::Rival)]
}

#[derive(Debug, Clone)]
struct HoldInfo {
    amount: i64,
    account: String,
    wallet: String,
    /// The task that placed it.
    task: usize,
}

#[derive(Debug, Clone)]
struct ChargeInfo {
    amount: i64,
    account: String,
    wallet: String,
}

/// What the tasks were told was done to one wallet (fresh answers only): what Redis's
/// totals must come to.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Totals {
    granted: i64,
    adjusted: i64,
    used: i64,
    refunded: i64,
}

/// What all concurrent tasks share: every hold and charge (any task may end or refund any
/// of them), every request with its first answer (any task may replay it), and what the
/// answers said, checked against the outbox once the tasks are done.
#[derive(Default)]
struct Shared {
    hold_ids: Vec<String>,
    holds: HashMap<String, HoldInfo>,
    charge_ids: Vec<String>,
    charges: HashMap<String, ChargeInfo>,
    sent: Vec<(Sent, Answer)>,
    /// Event ids of fresh (not replayed) answers.
    acknowledged: Vec<String>,
    /// (hold id, event id) of every fresh Capture/Release answer.
    ended: Vec<(String, String)>,
    /// (hold id, how, captured) of every HoldEnded refusal.
    ended_refusals: Vec<(String, HoldEnd, i64)>,
    /// (charge id, amount, refunded_total) of every fresh refund.
    refunds: Vec<(String, i64, i64)>,
    /// (charge id, amount asked, refundable) of every RefundExceedsCharge refusal.
    refund_refusals: Vec<(String, i64, i64)>,
    totals: BTreeMap<(String, String), Totals>,
}

type SharedRef = Arc<Mutex<Shared>>;

fn lock(shared: &SharedRef) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().expect("shared state")
}

/// What the concurrent cases reached, summed over all cases: each required one must
/// happen at least once (with the default number of cases or more), or the generator no
/// longer reaches the contention the test is for.
#[derive(Debug, Clone, Copy)]
enum Seen {
    TwinFreshAndReplay,
    TwinSameRefusal,
    TwinReplay,
    EndRivalsSplit,
    EndedByAnotherTask,
    EndedRefusal,
    ExpiredRefusal,
    RefundRivalsSplit,
    Replay,
    ReuseRefused,
    EndGaveBackExpired,
}

const SEEN: [&str; 11] = [
    "twin requests answered once fresh, once replayed",
    "twin requests refused alike",
    "replays sent twice at once",
    "rival ends of a hold: one ended it, the other was told how",
    "holds ended by another task than the one that placed them",
    "HoldEnded refusals",
    "HoldEnded refusals naming an expiry",
    "rival refunds of a charge: one refunded, the other refused",
    "replays of any task's request",
    "reused keys refused",
    "ends whose given-back credits expired at once (their lot expired while held; \
     too rare to require)",
];

/// Whether a run with the default number of cases must reach it.
fn required(seen: usize) -> bool {
    seen != Seen::EndGaveBackExpired as usize
}

#[derive(Default)]
struct Coverage([AtomicUsize; SEEN.len()]);

impl Coverage {
    fn add(&self, seen: Seen) {
        self.0[seen as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The counts; with `require`, panics naming any required one that never happened.
    fn check(&self, require: bool) -> String {
        let counts: Vec<usize> = self.0.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let report = SEEN
            .iter()
            .zip(&counts)
            .map(|(what, n)| format!("{n} {what}"))
            .collect::<Vec<_>>()
            .join("; ");
        for (i, (what, n)) in SEEN.iter().zip(&counts).enumerate() {
            assert!(
                *n > 0 || !require || !required(i),
                "the concurrent cases never reached: {what} ({report})"
            );
        }
        report
    }
}

/// What a Capture (Some) or Release (None) of a hold of `amount` captures.
fn capture_of(capture: Option<Option<i64>>, amount: i64) -> i64 {
    match capture {
        None => 0,
        Some(None) => amount,
        Some(Some(a)) => a,
    }
}

/// An index into a list of `len` holds or charges: every other pick among the newest
/// four (likely still open, and likely picked by other tasks at the same time).
fn recent_or_any(pick: usize, len: usize) -> usize {
    if pick.is_multiple_of(2) {
        len - 1 - (pick / 2) % len.min(4)
    } else {
        (pick / 2) % len
    }
}

/// Whether the first answer to a request is stored under its key (so a replay returns it).
fn remembered(first: &Outcome) -> bool {
    first.event_id().is_some() || matches!(first, Outcome::Refused(_))
}

/// An answer as the concurrent test compares it: the `Outcome`, and for a Capture or
/// Release the part of what it gave back that expired at once
/// (`EndHoldOutcome::expired`, which `Outcome` leaves out): a replay repeats it too.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    out: Outcome,
    expired: i64,
}

impl Answer {
    fn with_replayed(&self) -> Self {
        Self {
            out: self.out.with_replayed(),
            expired: self.expired,
        }
    }
}

async fn send_full(ledger: &Ledger, keys: &Keys, sent: &Sent) -> Answer {
    match sent {
        Sent::End(c) => {
            let r = ledger.end_hold(c).await;
            let expired = r.as_ref().map_or(0, |e| e.expired);
            Answer {
                out: common::model::ended(r),
                expired,
            }
        }
        _ => Answer {
            out: send(ledger, keys, sent).await,
            expired: 0,
        },
    }
}

/// Checks a fresh answer against its request and records it in `shared`.
fn take_fresh(
    shared: &SharedRef,
    coverage: &Coverage,
    task: usize,
    sent: &Sent,
    answer: &Answer,
) -> Result<(), String> {
    let out = &answer.out;
    if matches!(out, Outcome::Failed(_)) || out.replayed() {
        return Err(format!("{sent:?} with a fresh key: {out:?}"));
    }
    let mut sh = lock(shared);
    let sh = &mut *sh;
    if let Some(id) = out.event_id() {
        sh.acknowledged.push(id.to_owned());
    }
    match (sent, out) {
        (Sent::Grant(c), Outcome::Granted { .. }) => {
            sh.totals
                .entry((c.account_id.clone(), c.wallet.clone()))
                .or_default()
                .granted += c.amount;
        }
        (Sent::Adjust(c), Outcome::Granted { .. }) => {
            sh.totals
                .entry((c.account_id.clone(), c.wallet.clone()))
                .or_default()
                .adjusted += c.amount;
        }
        (
            Sent::Debit(c),
            Outcome::Debited {
                event_id, amount, ..
            },
        ) => {
            if *amount != c.amount {
                return Err(format!("{c:?}: {out:?}"));
            }
            sh.totals
                .entry((c.account_id.clone(), c.wallet.clone()))
                .or_default()
                .used += c.amount;
            sh.charge_ids.push(event_id.clone());
            sh.charges.insert(
                event_id.clone(),
                ChargeInfo {
                    amount: c.amount,
                    account: c.account_id.clone(),
                    wallet: c.wallet.clone(),
                },
            );
        }
        (
            Sent::Authorize(c),
            Outcome::Held {
                hold_id, amount, ..
            },
        ) => {
            if *amount != c.amount {
                return Err(format!("{c:?}: {out:?}"));
            }
            sh.hold_ids.push(hold_id.clone());
            sh.holds.insert(
                hold_id.clone(),
                HoldInfo {
                    amount: c.amount,
                    account: c.account_id.clone(),
                    wallet: c.wallet.clone(),
                    task,
                },
            );
        }
        (
            Sent::End(c),
            Outcome::Ended {
                event_id,
                captured,
                released,
                ..
            },
        ) => {
            let hold = sh.holds[&c.hold_id].clone();
            let want = capture_of(c.capture, hold.amount);
            if (*captured, *released) != (want, hold.amount - want)
                || !(0..=*released).contains(&answer.expired)
            {
                return Err(format!("{c:?} of a hold of {}: {out:?}", hold.amount));
            }
            if hold.task != task {
                coverage.add(Seen::EndedByAnotherTask);
            }
            if answer.expired > 0 {
                coverage.add(Seen::EndGaveBackExpired);
            }
            sh.totals
                .entry((hold.account.clone(), hold.wallet.clone()))
                .or_default()
                .used += want;
            sh.ended.push((c.hold_id.clone(), event_id.clone()));
            if want > 0 {
                sh.charge_ids.push(event_id.clone());
                sh.charges.insert(
                    event_id.clone(),
                    ChargeInfo {
                        amount: want,
                        account: hold.account,
                        wallet: hold.wallet,
                    },
                );
            }
        }
        (Sent::End(c), Outcome::Refused(Refusal::HoldEnded { how, captured })) => {
            coverage.add(Seen::EndedRefusal);
            if *how == HoldEnd::Expired {
                coverage.add(Seen::ExpiredRefusal);
            }
            sh.ended_refusals.push((c.hold_id.clone(), *how, *captured));
        }
        (Sent::End(c), Outcome::Invalid(field)) => {
            let amount = sh.holds[&c.hold_id].amount;
            if field != "amount" || capture_of(c.capture, amount) <= amount {
                return Err(format!("{c:?} of a hold of {amount}: {out:?}"));
            }
        }
        (Sent::End(c), _) => return Err(format!("{c:?}: {out:?}")),
        (
            Sent::Refund(c),
            Outcome::Refunded {
                refunded,
                refunded_total,
                ..
            },
        ) => {
            if *refunded != c.amount {
                return Err(format!("{c:?}: {out:?}"));
            }
            let charge = sh.charges[&c.charge_id].clone();
            sh.totals
                .entry((charge.account, charge.wallet))
                .or_default()
                .refunded += c.amount;
            sh.refunds
                .push((c.charge_id.clone(), c.amount, *refunded_total));
        }
        (Sent::Refund(c), Outcome::Refused(Refusal::RefundExceedsCharge { refundable })) => {
            if *refundable >= c.amount {
                return Err(format!("{c:?}: {out:?}"));
            }
            sh.refund_refusals
                .push((c.charge_id.clone(), c.amount, *refundable));
        }
        (Sent::Refund(_), Outcome::Refused(Refusal::LotLimit { .. })) => {}
        (Sent::Refund(c), _) => return Err(format!("{c:?}: {out:?}")),
        _ => {}
    }
    sh.sent.push((sent.clone(), answer.clone()));
    Ok(())
}

/// Sends a request twice at once with the same key; checks one answer is fresh and the
/// other its replay (or both the same refusal) and records the fresh one.
async fn send_twin(ctx: &TaskCtx, task: usize, sent: &Sent) -> Result<(), String> {
    let (a, b) = tokio::join!(
        send_full(&ctx.ledger, &ctx.keys, sent),
        send_full(&ctx.ledger, &ctx.keys, sent)
    );
    if a.out.event_id().is_some() || b.out.event_id().is_some() {
        let (first, again) = if a.out.replayed() { (b, a) } else { (a, b) };
        if first.out.replayed() || again != first.with_replayed() {
            return Err(format!(
                "{sent:?} twice at once: {first:?} and {again:?} (want one fresh answer and its replay)"
            ));
        }
        ctx.coverage.add(Seen::TwinFreshAndReplay);
        take_fresh(&ctx.shared, &ctx.coverage, task, sent, &first)
    } else if remembered(&a.out) && remembered(&b.out) {
        if a != b {
            return Err(format!("{sent:?} twice at once: {a:?} and {b:?}"));
        }
        ctx.coverage.add(Seen::TwinSameRefusal);
        take_fresh(&ctx.shared, &ctx.coverage, task, sent, &a)
    } else {
        // Bad input (a capture past the hold) is not recorded under its key: the later
        // of the two ran afresh, maybe after another task ended the hold.
        take_fresh(&ctx.shared, &ctx.coverage, task, sent, &a)?;
        take_fresh(&ctx.shared, &ctx.coverage, task, sent, &b)
    }
}

/// Sends two different requests at once on one hold or charge (`rival` ends the hold the
/// other way, or refunds so much that both refunds cannot fit); checks the pair.
async fn send_rivals(ctx: &TaskCtx, task: usize, sent: &Sent, rival: &Sent) -> Result<(), String> {
    let (answer_a, answer_b) = tokio::join!(
        send_full(&ctx.ledger, &ctx.keys, sent),
        send_full(&ctx.ledger, &ctx.keys, rival)
    );
    let (a, b) = (&answer_a.out, &answer_b.out);
    let pair = || format!("{sent:?} -> {a:?} and at once {rival:?} -> {b:?}");
    match (sent, rival) {
        (Sent::End(x), Sent::End(y)) => {
            let ended = |o: &Outcome| matches!(o, Outcome::Ended { .. });
            match (a, b) {
                (Outcome::Ended { .. }, Outcome::Ended { .. }) => {
                    return Err(format!("a hold ended twice: {}", pair()))
                }
                (winner, Outcome::Refused(Refusal::HoldEnded { how, captured }))
                | (Outcome::Refused(Refusal::HoldEnded { how, captured }), winner)
                    if ended(winner) =>
                {
                    let end = if ended(a) { x } else { y };
                    let want_how = if end.capture.is_some() {
                        HoldEnd::Captured
                    } else {
                        HoldEnd::Released
                    };
                    let Outcome::Ended { captured: c, .. } = winner else {
                        unreachable!()
                    };
                    if (*how, *captured) != (want_how, *c) {
                        return Err(format!("the refusal names another end: {}", pair()));
                    }
                    ctx.coverage.add(Seen::EndRivalsSplit);
                }
                (
                    Outcome::Refused(Refusal::HoldEnded { .. }),
                    Outcome::Refused(Refusal::HoldEnded { .. }),
                ) if a != b => return Err(format!("two ends named: {}", pair())),
                // Both refused alike (the hold had ended already), or one asked to
                // capture more than the hold (checked by take_fresh).
                _ => {}
            }
        }
        (Sent::Refund(_), Sent::Refund(_)) => {
            let refunded = |o: &Outcome| matches!(o, Outcome::Refunded { .. });
            let over =
                |o: &Outcome| matches!(o, Outcome::Refused(Refusal::RefundExceedsCharge { .. }));
            if refunded(a) && refunded(b) {
                return Err(format!("refunded past the charge: {}", pair()));
            }
            if (refunded(a) && over(b)) || (over(a) && refunded(b)) {
                ctx.coverage.add(Seen::RefundRivalsSplit);
            }
        }
        _ => unreachable!("rivals are ends or refunds"),
    }
    take_fresh(&ctx.shared, &ctx.coverage, task, sent, &answer_a)?;
    take_fresh(&ctx.shared, &ctx.coverage, task, rival, &answer_b)
}

/// What every concurrent task works with.
struct TaskCtx {
    ledger: Arc<Ledger>,
    keys: Arc<Keys>,
    now: Arc<AtomicI64>,
    shared: SharedRef,
    coverage: Arc<Coverage>,
}

async fn concurrent_task(
    ctx: Arc<TaskCtx>,
    task: usize,
    ops: Vec<(Op, Mode)>,
) -> Result<(), String> {
    let ledger = &ctx.ledger;
    for (i, (op, mode)) in ops.into_iter().enumerate() {
        let key = format!("t{task}-{i}");
        let at = ctx.now.load(Ordering::SeqCst);
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
                price_inputs: None,
                attempt_mark: None,
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
                price_inputs: None,
                attempt_mark: None,
            }),
            Op::Capture { hold, .. } | Op::Release { hold } => {
                // Any task's hold: ends race with other tasks' ends and with expiry.
                let picked = {
                    let sh = lock(&ctx.shared);
                    (!sh.hold_ids.is_empty()).then(|| {
                        let id = sh.hold_ids[recent_or_any(hold, sh.hold_ids.len())].clone();
                        let amount = sh.holds[&id].amount;
                        (id, amount)
                    })
                };
                let Some((hold_id, amount)) = picked else {
                    continue;
                };
                let end = match op {
                    Op::Capture { percent, .. } => {
                        EndHold::capture(hold_id.clone(), percent.map(|p| amount * p / 100), key)
                    }
                    _ => EndHold::release(hold_id.clone(), key),
                };
                if let Mode::Rival = mode {
                    let other_key = format!("t{task}-{i}r");
                    let other = if end.capture.is_some() {
                        EndHold::release(hold_id, other_key)
                    } else {
                        EndHold::capture(hold_id, None, other_key)
                    };
                    send_rivals(&ctx, task, &Sent::End(end), &Sent::End(other)).await?;
                    continue;
                }
                Sent::End(end)
            }
            Op::Refund { charge, amount } => {
                let picked = {
                    let sh = lock(&ctx.shared);
                    (!sh.charge_ids.is_empty()).then(|| {
                        let id = sh.charge_ids[recent_or_any(charge, sh.charge_ids.len())].clone();
                        let charged = sh.charges[&id].amount;
                        (id, charged)
                    })
                };
                let Some((charge_id, charged)) = picked else {
                    continue;
                };
                let refund = |amount: i64, idempotency_key: String| Refund {
                    charge_id: charge_id.clone(),
                    amount,
                    idempotency_key,
                    metadata: Metadata::new(),
                };
                if let Mode::Rival = mode {
                    // a + b = charged + 1: never both.
                    let a = amount % charged + 1;
                    let b = charged - a + 1;
                    let (x, y) = (refund(a, key), refund(b, format!("t{task}-{i}r")));
                    send_rivals(&ctx, task, &Sent::Refund(x), &Sent::Refund(y)).await?;
                    continue;
                }
                Sent::Refund(refund(amount % 5 + 1, key))
            }
            Op::Advance { ms } => {
                ctx.now.fetch_add(ms / 4, Ordering::SeqCst);
                continue;
            }
            Op::Replay { index } => {
                // Any task's request, after its first answer came back.
                let picked = {
                    let sh = lock(&ctx.shared);
                    (!sh.sent.is_empty()).then(|| sh.sent[index % sh.sent.len()].clone())
                };
                let Some((sent, first)) = picked else {
                    continue;
                };
                if !remembered(&first.out) {
                    continue;
                }
                let want = first.with_replayed();
                let answers = if let Mode::Twin = mode {
                    let (a, b) = tokio::join!(
                        send_full(ledger, &ctx.keys, &sent),
                        send_full(ledger, &ctx.keys, &sent)
                    );
                    ctx.coverage.add(Seen::TwinReplay);
                    vec![a, b]
                } else {
                    vec![send_full(ledger, &ctx.keys, &sent).await]
                };
                for again in answers {
                    if again != want {
                        return Err(format!(
                            "replay of {sent:?}: {again:?}, first answered {first:?}"
                        ));
                    }
                    ctx.coverage.add(Seen::Replay);
                }
                continue;
            }
            Op::Reuse { index } => {
                let picked = {
                    let sh = lock(&ctx.shared);
                    (!sh.sent.is_empty()).then(|| sh.sent[index % sh.sent.len()].clone())
                };
                let Some((sent, first)) = picked else {
                    continue;
                };
                if !remembered(&first.out) {
                    continue;
                }
                let other = with_other_amount(&sent);
                let got = send(ledger, &ctx.keys, &other).await;
                if got != Outcome::Refused(Refusal::IdempotencyKeyReused) {
                    return Err(format!(
                        "{other:?} reuses the key of {sent:?} (first answered {first:?}): {got:?}"
                    ));
                }
                ctx.coverage.add(Seen::ReuseRefused);
                continue;
            }
            Op::Balance { account } => {
                let balance = ledger
                    .balance(ACCOUNTS[account], "")
                    .await
                    .map_err(|e| e.to_string())?;
                for b in &balance {
                    if b.available < 0 || b.held < 0 || !b.is_conserved() {
                        return Err(format!("balance of {}: {b:?}", ACCOUNTS[account]));
                    }
                }
                continue;
            }
            Op::Sweep => {
                for shard in 0..ledger.shards().count() {
                    common::sweep_once(ledger, shard).await;
                }
                continue;
            }
        };
        if let Mode::Twin = mode {
            send_twin(&ctx, task, &sent).await?;
        } else {
            let answer = send_full(ledger, &ctx.keys, &sent).await;
            take_fresh(&ctx.shared, &ctx.coverage, task, &sent, &answer)?;
        }
    }
    Ok(())
}

/// Checks what the tasks were told against the outbox and Redis: every hold ended once,
/// by the answer that said it ended it, and every HoldEnded refusal names that end;
/// each charge's refunds add up one after the other and every RefundExceedsCharge names
/// what was refundable at some moment; each wallet's totals are what the fresh answers
/// (and the expiries in the outbox) add up to, so no replay changed anything.
async fn check_told(ledger: &Ledger, sh: &Shared) -> Result<(), TestCaseError> {
    use tollgate::ledger::event::EventKind;
    let events = common::outbox_events(ledger).await;
    let mut totals = sh.totals.clone();
    let mut ends: HashMap<&str, (&str, HoldEnd, i64)> = HashMap::new();
    for e in &events {
        let how = match e.kind {
            EventKind::Capture => HoldEnd::Captured,
            EventKind::Release => HoldEnd::Released,
            EventKind::ExpireHold => HoldEnd::Expired,
            _ => continue,
        };
        let captured: i64 = e.lots.iter().map(|p| p.amount).sum();
        if how == HoldEnd::Expired {
            totals
                .entry((e.account_id.clone(), e.wallet.clone()))
                .or_default()
                .used += captured;
        }
        prop_assert!(
            ends.insert(&e.hold_id, (&e.event_id, how, captured))
                .is_none(),
            "hold {} ended twice",
            e.hold_id
        );
    }
    for (hold, event_id) in &sh.ended {
        prop_assert_eq!(
            ends.get(hold.as_str()).map(|e| e.0),
            Some(event_id.as_str()),
            "the answer that ended hold {} is not its end in the outbox",
            hold
        );
    }
    for (hold, how, captured) in &sh.ended_refusals {
        prop_assert_eq!(
            ends.get(hold.as_str()).map(|e| (e.1, e.2)),
            Some((*how, *captured)),
            "a HoldEnded refusal of hold {} names another end",
            hold
        );
    }
    let mut refunds: HashMap<&str, Vec<(i64, i64)>> = HashMap::new();
    for (charge, amount, total) in &sh.refunds {
        refunds
            .entry(charge.as_str())
            .or_default()
            .push((*total, *amount));
    }
    let mut refundable: HashMap<&str, Vec<i64>> = HashMap::new();
    for (charge, info) in &sh.charges {
        let mut list = refunds.remove(charge.as_str()).unwrap_or_default();
        list.sort();
        let mut done = 0;
        let mut left = vec![info.amount];
        for (total, amount) in list {
            prop_assert_eq!(
                total,
                done + amount,
                "refunds of {} do not add up one after the other",
                charge
            );
            done = total;
            left.push(info.amount - done);
        }
        prop_assert!(done <= info.amount, "{charge} refunded past the charge");
        refundable.insert(charge.as_str(), left);
    }
    for (charge, asked, left) in &sh.refund_refusals {
        prop_assert!(
            refundable[charge.as_str()].contains(left),
            "refusal of a refund of {} of {}: {} refundable, never so",
            asked,
            charge,
            left
        );
    }
    for account in ACCOUNTS {
        let balance = ledger.balance(account, "").await.expect("balance");
        for b in &balance {
            let told = totals
                .remove(&(account.to_owned(), b.wallet.clone()))
                .unwrap_or_default();
            prop_assert_eq!(
                (b.granted, b.adjusted, b.used, b.refunded),
                (told.granted, told.adjusted, told.used, told.refunded),
                "totals of {}/{}: redis's, then what the answers added up to",
                account,
                b.wallet
            );
        }
    }
    prop_assert!(
        totals.values().all(|t| *t == Totals::default()),
        "answers changed wallets redis does not list: {:?}",
        totals
    );
    Ok(())
}

#[test]
fn concurrent_runs_keep_the_invariants() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let redis = common::RedisServer::start();
    let runner_cases = cases(CONCURRENT_CASES);
    let mut runner = TestRunner::new(ProptestConfig {
        rng_seed: common::proptest_seed("concurrent_runs_keep_the_invariants"),
        cases: runner_cases,
        // Concurrent runs are not reproducible: shrinking would chase noise.
        max_shrink_iters: 0,
        ..ProptestConfig::default()
    });
    let coverage = Arc::new(Coverage::default());
    let strategy = prop::collection::vec(
        prop::collection::vec((op_strategy(), mode_strategy()), 40..60),
        16,
    );
    runner
        .run(&strategy, |tasks| {
            runtime.block_on(async {
                let (clock, now) = Clock::manual(START_MS);
                let ledger = new_ledger(&redis, clock);
                let keys = flush(&ledger).await;
                let shared = SharedRef::default();
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
                        lock(&shared)
                            .totals
                            .entry((account.into(), wallet.into()))
                            .or_default()
                            .granted += g.amount;
                    }
                }
                let ctx = Arc::new(TaskCtx {
                    ledger: ledger.clone(),
                    keys,
                    now: now.clone(),
                    shared: shared.clone(),
                    coverage: coverage.clone(),
                });
                let handles: Vec<_> = tasks
                    .into_iter()
                    .enumerate()
                    .map(|(i, ops)| tokio::spawn(concurrent_task(ctx.clone(), i, ops)))
                    .collect();
                for h in handles {
                    if let Err(e) = h.await.expect("task") {
                        prop_assert!(false, "concurrent task: {}", e);
                    }
                }
                // Settle everything due, then replay the outbox against Redis's state.
                now.fetch_add(100_000, Ordering::SeqCst);
                common::sweep_all(&ledger).await;
                let replayer = check_outbox_replay(&ledger).await;
                prop_assert_eq!(
                    replayer.open_holds(),
                    0,
                    "holds past their deadline left open"
                );
                let sh = std::mem::take(&mut *lock(&shared));
                check_told(&ledger, &sh).await?;
                let events = common::outbox_events(&ledger).await;
                let mut seen: HashMap<&str, usize> = HashMap::new();
                for e in &events {
                    *seen.entry(e.event_id.as_str()).or_default() += 1;
                }
                let acked: HashSet<&str> = sh.acknowledged.iter().map(String::as_str).collect();
                prop_assert_eq!(
                    acked.len(),
                    sh.acknowledged.len(),
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
    // Fewer cases than the default (PROPTEST_CASES) may miss some: only counted then.
    let report = coverage.check(runner_cases >= CONCURRENT_CASES);
    println!("concurrent_runs_keep_the_invariants: {report}");
}
