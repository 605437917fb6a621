//! Model-based property test of organizations against a real redis-server: members,
//! allocations and budgets in the ledger core.
//!
//! Each case builds an org (an owner, three members as "member" or "admin", random
//! allocations, budgets on the org wallet and on members, a random grant), then:
//!
//! 1. Sequential phase: random debits, holds, captures, releases and refunds by random
//!    members (and by the org itself), interleaved with allocation, budget, role and grant
//!    changes, day changes, clock advances and replays. Some holds are short (up to a
//!    minute; released or captured on expiry) and expire as the clock moves: the model
//!    ends them lazily where the scripts do (every charge script and GetBalance, not the
//!    org scripts or the view), giving back to allocations and budgets. A replay (same
//!    key, same parameters) must answer exactly the first answer (ids, refusals and
//!    numbers of then) and change nothing. An in-memory model predicts every answer
//!    exactly (accepted outcomes, and which refusal with which numbers); the full state
//!    (balance, every member's allocation and budgets) is compared along the way.
//! 2. Concurrent phase: 8 tasks charge at once (debits, holds, captures, releases,
//!    refunds by random members, replays) while a monitor reads the state and checks
//!    that no allocation, budget or the org balance is ever exceeded. The tasks share
//!    holds, charges and requests: any task ends or refunds any task's hold or charge and
//!    replays any task's request; some requests go twice at once with the same key (one
//!    fresh answer and its exact replay, or the same refusal twice), some captures race a
//!    release of the same hold (one ends it, the other is told how) and some refunds
//!    race a refund of the same charge (never both: together they exceed it).
//!    Afterwards every acknowledged mutation is replayed into the model in the order
//!    Redis ran it (the order of its event ids in the shard's outbox): each acknowledged
//!    charge must have been allowed at its moment (allocation, budgets, balance), every
//!    answer must match, and the final state must equal the model's. Every refusal must
//!    be one of AllocationExceeded, BudgetExceeded or InsufficientCredits, with
//!    consistent numbers; every HoldEnded refusal must name how the model ended the hold,
//!    and every RefundExceedsCharge what was refundable at some moment.
//!
//! Wherever the state is compared, every actor's GetBalance `spendable` (what the API
//! computes from the balance and the view) must equal the model's own min(balance,
//! allocation left, every budget's headroom), and be the real bound: the model allows a
//! charge of exactly it and refuses one credit more, and a real debit of one credit more is
//! refused as the model says (a refusal changes nothing). In the sequential phase some
//! steps debit exactly what GetBalance says is spendable: accepted, leaving nothing.
//!
//! Balances never go negative and conservation (granted + adjusted == available + held +
//! used + expired - refunded) holds throughout.
//!
//! Tallies of refusals, expiries, replays and contention are printed and, with the default
//! number of cases or more, must all be non-zero.
//!
//! Knobs: PROPTEST_CASES (runs; default 24, about 6 s).

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};

use tollgate::ledger::org::{
    AccountView, AllocationChange, AllocationOutcome, AllocationState, BudgetPeriod, BudgetState,
    OrgEvent, Role, SetBudget,
};
use tollgate::ledger::{
    Authorize, BudgetScope, Clock, Debit, DebitOutcome, EndHold, EndHoldOutcome, Grant,
    GrantOutcome, HoldEnd, HoldOutcome, Ledger, LedgerError, LedgerSettings, LotKind, Metadata,
    OnExpiry, RedisPool, Refund, RefundOutcome, Refusal, WalletBalance,
};

/// Mid-day UTC, so a day later is mid-day of the next day.
const START_MS: i64 = 1_800_000_000_000;
const DAY_MS: i64 = 86_400_000;
const ORG: &str = "acme";
const OWNER: &str = "own";
const WALLET: &str = "default";
/// Actors: the owner, three members, and "" (the org charging for itself, no member).
const ACTORS: [&str; 5] = [OWNER, "m1", "m2", "m3", ""];
/// Members (actors with a role).
const MEMBERS: [&str; 4] = [OWNER, "m1", "m2", "m3"];
/// Holds other than the short ones live long enough never to expire in a case (at most 3
/// days pass).
const HOLD_TTL_MS: i64 = 7 * DAY_MS;
const DAYS_MAX: i64 = 3;
const TASKS: usize = 8;
/// Cases per run unless PROPTEST_CASES says otherwise.
const ORG_CASES: u32 = 24;

/// Tallies over a run, printed at the end (`--nocapture` shows them) and checked: each
/// must be non-zero after the default number of cases, or the cases stopped reaching a
/// refusal, an expiry, a replay or the contention the test is for.
mod tally {
    use std::sync::atomic::{AtomicUsize, Ordering};

    pub static SEQ_ACCEPTED: AtomicUsize = AtomicUsize::new(0);
    /// Debits of exactly what GetBalance said was spendable (more than 0), accepted.
    pub static SEQ_SPENT_ALL: AtomicUsize = AtomicUsize::new(0);
    /// Replays in the sequential phase (first answer again, state unchanged).
    pub static SEQ_REPLAYS: AtomicUsize = AtomicUsize::new(0);
    /// Holds the model ended by expiry (the ledger agreed, or the state checks failed).
    pub static EXPIRED: AtomicUsize = AtomicUsize::new(0);
    /// Captures and releases refused because the hold had expired.
    pub static SEQ_ENDED_EXPIRED: AtomicUsize = AtomicUsize::new(0);
    pub static CON_ACCEPTED: AtomicUsize = AtomicUsize::new(0);
    pub static MONITOR_SNAPSHOTS: AtomicUsize = AtomicUsize::new(0);
    /// Same-key requests sent twice at once: one fresh answer and its replay.
    pub static CON_TWIN_REPLAYED: AtomicUsize = AtomicUsize::new(0);
    /// Same-key requests sent twice at once: the same refusal twice.
    pub static CON_TWIN_REFUSED: AtomicUsize = AtomicUsize::new(0);
    /// A capture and a release of one hold at once: one ended it, the other was told how.
    pub static CON_END_RIVALS_SPLIT: AtomicUsize = AtomicUsize::new(0);
    /// Two refunds of one charge at once: one refunded, the other refused.
    pub static CON_REFUND_RIVALS_SPLIT: AtomicUsize = AtomicUsize::new(0);
    /// Holds ended by a task other than the one that placed them.
    pub static CON_ENDED_BY_ANOTHER: AtomicUsize = AtomicUsize::new(0);
    /// Captures and releases refused: the hold had ended.
    pub static CON_HOLD_ENDED: AtomicUsize = AtomicUsize::new(0);
    /// Replays of any task's request, answered as the first time.
    pub static CON_REPLAYS: AtomicUsize = AtomicUsize::new(0);
    /// [allocation, budget account, budget member, insufficient] x [sequential, concurrent]
    pub static REFUSED: [[AtomicUsize; 2]; 4] = [
        [AtomicUsize::new(0), AtomicUsize::new(0)],
        [AtomicUsize::new(0), AtomicUsize::new(0)],
        [AtomicUsize::new(0), AtomicUsize::new(0)],
        [AtomicUsize::new(0), AtomicUsize::new(0)],
    ];

    pub fn add(counter: &AtomicUsize, n: usize) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn refusal(r: &tollgate::ledger::Refusal, concurrent: bool) {
        use tollgate::ledger::{BudgetScope, Refusal};
        let row = match r {
            Refusal::AllocationExceeded { .. } => 0,
            Refusal::BudgetExceeded {
                budget: BudgetScope::Account,
                ..
            } => 1,
            Refusal::BudgetExceeded {
                budget: BudgetScope::Member,
                ..
            } => 2,
            Refusal::InsufficientCredits { .. } => 3,
            _ => return,
        };
        add(&REFUSED[row][usize::from(concurrent)], 1);
    }

    fn counts() -> Vec<(&'static str, usize)> {
        let n = |c: &AtomicUsize| c.load(Ordering::Relaxed);
        let r = |row: usize, col: usize| n(&REFUSED[row][col]);
        vec![
            ("sequential charges accepted", n(&SEQ_ACCEPTED)),
            ("debits of all that was spendable", n(&SEQ_SPENT_ALL)),
            ("sequential allocation refusals", r(0, 0)),
            ("sequential org budget refusals", r(1, 0)),
            ("sequential member budget refusals", r(2, 0)),
            ("sequential balance refusals", r(3, 0)),
            ("sequential replays", n(&SEQ_REPLAYS)),
            ("holds expired", n(&EXPIRED)),
            ("ends refused after expiry", n(&SEQ_ENDED_EXPIRED)),
            ("concurrent mutations acknowledged", n(&CON_ACCEPTED)),
            ("concurrent allocation refusals", r(0, 1)),
            ("concurrent org budget refusals", r(1, 1)),
            ("concurrent member budget refusals", r(2, 1)),
            ("concurrent balance refusals", r(3, 1)),
            ("monitor snapshots", n(&MONITOR_SNAPSHOTS)),
            ("twins answered fresh and replayed", n(&CON_TWIN_REPLAYED)),
            ("twins refused alike", n(&CON_TWIN_REFUSED)),
            ("rival ends split", n(&CON_END_RIVALS_SPLIT)),
            ("rival refunds split", n(&CON_REFUND_RIVALS_SPLIT)),
            ("holds ended by another task", n(&CON_ENDED_BY_ANOTHER)),
            ("concurrent HoldEnded refusals", n(&CON_HOLD_ENDED)),
            ("concurrent replays", n(&CON_REPLAYS)),
        ]
    }

    pub fn report() -> String {
        counts()
            .into_iter()
            .map(|(what, n)| format!("{n} {what}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Panics naming every tally still at zero.
    pub fn check() {
        let zero: Vec<&str> = counts()
            .into_iter()
            .filter(|(_, n)| *n == 0)
            .map(|(what, _)| what)
            .collect();
        assert!(
            zero.is_empty(),
            "the cases never reached: {zero:?} ({})",
            report()
        );
    }
}

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn day_start(now: i64) -> i64 {
    now.div_euclid(DAY_MS) * DAY_MS
}

// ---------------------------------------------------------------------------------------
// The model

#[derive(Debug, Clone)]
struct ModelBudget {
    limit: i64,
    /// Spent in period `ps` (as Redis keeps it: a stale period reads as 0).
    s: i64,
    ps: Option<i64>,
    /// Which budget this is: a budget removed and set again is a new one, and a hold
    /// counted in the old one gives nothing back to it (the scripts' creation stamp).
    generation: u64,
}

impl ModelBudget {
    fn spent(&self, now: i64) -> i64 {
        if self.ps == Some(day_start(now)) {
            self.s
        } else {
            0
        }
    }
}

#[derive(Debug, Clone)]
struct ModelHold {
    member: String,
    amount: i64,
    /// Budgets it counted in: (key: "" the org's, else the member; period; generation).
    refs: Vec<(String, i64, u64)>,
    /// None while open; else how it ended and what it captured.
    ended: Option<(HoldEnd, i64)>,
    deadline_ms: i64,
    capture_on_expiry: bool,
}

#[derive(Debug, Clone)]
struct ModelCharge {
    member: String,
    amount: i64,
    refunded: i64,
}

#[derive(Debug, Clone, Default)]
struct Model {
    available: i64,
    held: i64,
    granted: i64,
    used: i64,
    refunded: i64,
    roles: HashMap<String, Role>,
    allocated: HashMap<String, i64>,
    alloc_used: HashMap<String, i64>,
    /// "" = the org's (account) budget; else the member's.
    budgets: HashMap<String, ModelBudget>,
    /// Budgets created so far (the next one's generation).
    budget_generations: u64,
    holds: HashMap<String, ModelHold>,
    charges: HashMap<String, ModelCharge>,
}

/// What an accepted charge left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Charged {
    available: i64,
    held: i64,
    /// What the caller may spend after the charge when an allocation or a budget bounds
    /// them: min(allocation left, every budget's headroom, balance), never below 0.
    remaining: Option<i64>,
    refs: Vec<(String, i64, u64)>,
}

impl Model {
    fn used_of(&self, member: &str) -> i64 {
        self.alloc_used.get(member).copied().unwrap_or(0)
    }

    /// None: unbounded (owner or admin without an allocation).
    fn remaining(&self, member: &str) -> Option<i64> {
        if member.is_empty() {
            return None;
        }
        if let Some(a) = self.allocated.get(member) {
            return Some((a - self.used_of(member)).max(0));
        }
        match self.roles.get(member) {
            Some(Role::Member) => Some(0),
            _ => None,
        }
    }

    /// The budgets a charge by `member` counts in, in the order the scripts check them.
    fn budgets_for(&self, member: &str) -> Vec<(String, BudgetScope)> {
        let mut out = Vec::new();
        if self.budgets.contains_key("") {
            out.push((String::new(), BudgetScope::Account));
        }
        if !member.is_empty() && self.budgets.contains_key(member) {
            out.push((member.to_owned(), BudgetScope::Member));
        }
        out
    }

    /// What `member` may spend now, from the model's own state: the tightest of the
    /// balance, the allocation left (when one bounds them) and the headroom (limit − spent
    /// today) of every budget a charge by them counts in, never below 0. GetBalance's
    /// `spendable` must say exactly this; `check` allows exactly this much and refuses one
    /// credit more.
    fn spendable(&self, now: i64, member: &str) -> i64 {
        let mut bound = self.available;
        if let Some(left) = self.remaining(member) {
            bound = bound.min(left);
        }
        for (key, _) in self.budgets_for(member) {
            let b = &self.budgets[&key];
            bound = bound.min(b.limit - b.spent(now));
        }
        bound.max(0)
    }

    /// Whether `member` may charge `amount` now; the refusal the scripts give if not.
    fn check(&self, now: i64, member: &str, amount: i64) -> Result<(), Refusal> {
        if let Some(r) = self.remaining(member) {
            if r < amount {
                return Err(Refusal::AllocationExceeded {
                    required: amount,
                    remaining: r,
                });
            }
        }
        for (key, scope) in self.budgets_for(member) {
            let b = &self.budgets[&key];
            let spent = b.spent(now);
            if spent + amount > b.limit {
                return Err(Refusal::BudgetExceeded {
                    budget: scope,
                    limit: b.limit,
                    spent,
                    resets_at_ms: day_start(now) + DAY_MS,
                });
            }
        }
        if self.available < amount {
            return Err(Refusal::InsufficientCredits {
                required: amount,
                available: self.available,
            });
        }
        Ok(())
    }

    /// A debit (hold false) or a hold (hold true): checks, then counts it everywhere.
    fn charge(
        &mut self,
        now: i64,
        member: &str,
        amount: i64,
        hold: bool,
    ) -> Result<Charged, Refusal> {
        self.check(now, member, amount)?;
        let mut spendable = self.remaining(member).map(|r| r - amount);
        let mut refs = Vec::new();
        let period = day_start(now);
        for (key, _) in self.budgets_for(member) {
            let b = self.budgets.get_mut(&key).expect("budget");
            b.s = b.spent(now) + amount;
            b.ps = Some(period);
            let headroom = b.limit - b.s;
            spendable = Some(spendable.map_or(headroom, |s| s.min(headroom)));
            refs.push((key, period, b.generation));
        }
        if !member.is_empty() {
            *self.alloc_used.entry(member.to_owned()).or_default() += amount;
        }
        self.available -= amount;
        if hold {
            self.held += amount;
        } else {
            self.used += amount;
        }
        Ok(Charged {
            available: self.available,
            held: self.held,
            remaining: spendable.map(|s| s.min(self.available).max(0)),
            refs,
        })
    }

    /// Captures `capture` (None: releases) of an open hold; Some((captured, released)).
    fn end_hold(
        &mut self,
        hold_id: &str,
        capture: Option<Option<i64>>,
    ) -> Result<(i64, i64), Refusal> {
        let h = self.holds.get(hold_id).expect("known hold");
        if let Some((how, captured)) = h.ended {
            return Err(Refusal::HoldEnded { how, captured });
        }
        let captured = capture_of(capture, h.amount);
        let how = if capture.is_some() {
            HoldEnd::Captured
        } else {
            HoldEnd::Released
        };
        Ok(self.close(hold_id, captured, how))
    }

    /// Lazy expiry, as every charge script and GetBalance run it first (the org scripts
    /// and the view do not): each open hold past its deadline ends by its policy, in
    /// deadline order.
    fn settle(&mut self, now: i64) {
        let mut due: Vec<(i64, String)> = self
            .holds
            .iter()
            .filter(|(_, h)| h.ended.is_none() && h.deadline_ms <= now)
            .map(|(id, h)| (h.deadline_ms, id.clone()))
            .collect();
        due.sort();
        for (_, id) in due {
            let h = &self.holds[&id];
            let captured = if h.capture_on_expiry { h.amount } else { 0 };
            self.close(&id, captured, HoldEnd::Expired);
            tally::add(&tally::EXPIRED, 1);
        }
    }

    /// Ends an open hold: charges `captured`, gives the rest back (to the member's
    /// allocation, and to the budgets it counted in if they are the same ones, same
    /// period). Returns (captured, released).
    fn close(&mut self, hold_id: &str, captured: i64, how: HoldEnd) -> (i64, i64) {
        let h = self.holds.get(hold_id).expect("known hold").clone();
        let back = h.amount - captured;
        if !h.member.is_empty() {
            *self.alloc_used.entry(h.member.clone()).or_default() -= back;
        }
        if back > 0 {
            for (key, pid, generation) in &h.refs {
                if let Some(b) = self.budgets.get_mut(key) {
                    if b.ps == Some(*pid) && b.generation == *generation {
                        b.s = (b.s - back).max(0);
                    }
                }
            }
        }
        self.held -= h.amount;
        self.used += captured;
        self.available += back;
        self.holds.get_mut(hold_id).expect("hold").ended = Some((how, captured));
        (captured, back)
    }

    fn refund(&mut self, charge_id: &str, amount: i64) -> Result<i64, Refusal> {
        let c = self.charges.get_mut(charge_id).expect("known charge");
        if amount > c.amount - c.refunded {
            return Err(Refusal::RefundExceedsCharge {
                refundable: c.amount - c.refunded,
            });
        }
        c.refunded += amount;
        let total = c.refunded;
        let member = c.member.clone();
        if !member.is_empty() {
            *self.alloc_used.entry(member).or_default() -= amount;
        }
        self.available += amount;
        self.refunded += amount;
        Ok(total)
    }

    fn balance(&self) -> WalletBalance {
        WalletBalance {
            wallet: WALLET.into(),
            available: self.available,
            held: self.held,
            granted: self.granted,
            used: self.used,
            expired: 0,
            refunded: self.refunded,
            adjusted: 0,
        }
    }

    fn view(&self, now: i64, member: &str) -> AccountView {
        let role = if member.is_empty() {
            None
        } else {
            self.roles.get(member).copied()
        };
        let mut allocations = Vec::new();
        if let Some(role) = role {
            allocations.push(AllocationState {
                wallet: WALLET.into(),
                allocated: self.allocated.get(member).copied().unwrap_or(0),
                used: self.used_of(member),
                bounded: self.allocated.contains_key(member) || role == Role::Member,
            });
        }
        let budgets = self
            .budgets_for(if role.is_some() { member } else { "" })
            .into_iter()
            .map(|(key, scope)| {
                let b = &self.budgets[&key];
                BudgetState {
                    scope: match scope {
                        BudgetScope::Account => "account",
                        BudgetScope::Member => "member",
                    }
                    .into(),
                    wallet: WALLET.into(),
                    limit: b.limit,
                    period: "day".into(),
                    window_ms: 0,
                    spent: b.spent(now),
                    resets_at_ms: day_start(now) + DAY_MS,
                }
            })
            .collect();
        AccountView {
            role,
            is_org: true,
            allocations,
            budgets,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Operations

#[derive(Debug, Clone)]
enum Op {
    Debit {
        actor: usize,
        amount: i64,
    },
    Authorize {
        actor: usize,
        amount: i64,
        /// A short hold: (ttl ms, capture on expiry). None: it outlives the case.
        short: Option<(i64, bool)>,
    },
    /// Capture a known hold: percent of it (None = all).
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
    /// A debit of exactly what GetBalance says the actor may spend (nothing when that is
    /// 0): always accepted, leaving nothing to spend.
    SpendAll {
        actor: usize,
    },
    /// The owner sets or changes a member's allocation.
    Allocate {
        member: usize,
        set: bool,
        amount: i64,
    },
    /// A day budget: None = the org's, else a member's; limit 0 removes it.
    Budget {
        member: Option<usize>,
        limit: i64,
    },
    /// The owner makes m1..m3 an admin or a plain member.
    Role {
        member: usize,
        admin: bool,
    },
    Grant {
        amount: i64,
    },
    NextDay,
    /// The clock moves on (short holds expire; never across a day).
    Advance {
        ms: i64,
    },
    /// An earlier request again, same key and parameters: the first answer, unchanged
    /// state.
    Replay {
        index: usize,
    },
}

/// `short_holds`: some holds expire within a minute (the sequential phase, whose clock
/// moves); else every hold outlives the case.
fn charge_op(short_holds: bool) -> impl Strategy<Value = Op> {
    let short = if short_holds {
        prop::option::weighted(0.4, (1_000i64..60_000, any::<bool>())).boxed()
    } else {
        Just(None).boxed()
    };
    prop_oneof![
        5 => (0..ACTORS.len(), 1i64..60).prop_map(|(actor, amount)| Op::Debit { actor, amount }),
        4 => (0..ACTORS.len(), 1i64..60, short).prop_map(|(actor, amount, short)| Op::Authorize { actor, amount, short }),
        3 => (any::<usize>(), prop_oneof![1 => Just(None), 3 => (0i64..=100).prop_map(Some)])
            .prop_map(|(hold, percent)| Op::Capture { hold, percent }),
        2 => any::<usize>().prop_map(|hold| Op::Release { hold }),
        2 => (any::<usize>(), 1i64..40).prop_map(|(charge, amount)| Op::Refund { charge, amount }),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        16 => charge_op(true),
        1 => (0..ACTORS.len()).prop_map(|actor| Op::SpendAll { actor }),
        2 => (0..MEMBERS.len(), any::<bool>(), -100i64..300).prop_map(|(member, set, amount)| {
            let amount = if set { amount.max(0) } else if amount == 0 { 1 } else { amount };
            Op::Allocate { member, set, amount }
        }),
        2 => (prop::option::weighted(0.7, 0..MEMBERS.len()), prop_oneof![2 => Just(0i64), 5 => 20i64..600])
            .prop_map(|(member, limit)| Op::Budget { member, limit }),
        1 => (1usize..MEMBERS.len(), prop::bool::weighted(0.3)).prop_map(|(member, admin)| Op::Role { member, admin }),
        1 => (1i64..200).prop_map(|amount| Op::Grant { amount }),
        1 => Just(Op::NextDay),
        1 => (1_000i64..90_000).prop_map(|ms| Op::Advance { ms }),
        2 => any::<usize>().prop_map(|index| Op::Replay { index }),
    ]
}

/// A concurrent task's step: a charge (any task's hold or charge for the ends and
/// refunds), or a replay of any task's request; and how it is sent.
fn task_op() -> impl Strategy<Value = (Op, Mode)> {
    let op = prop_oneof![
        16 => charge_op(false),
        2 => any::<usize>().prop_map(|index| Op::Replay { index }),
    ];
    (op, mode_strategy())
}

/// The org's starting state, as operations run through the model like any other.
fn setup_strategy() -> impl Strategy<Value = Vec<Op>> {
    (
        50i64..700,
        prop::array::uniform3(prop::bool::weighted(0.2)),
        prop::option::weighted(0.3, 0i64..300),
        prop::array::uniform3(prop::option::weighted(0.85, 0i64..400)),
        prop::option::weighted(0.35, 100i64..1500),
        prop::array::uniform4(prop::option::weighted(0.4, 20i64..300)),
    )
        .prop_map(
            |(grant, admins, owner_alloc, allocs, org_budget, budgets)| {
                let mut ops = Vec::new();
                for (i, admin) in admins.into_iter().enumerate() {
                    ops.push(Op::Role {
                        member: i + 1,
                        admin,
                    });
                }
                ops.push(Op::Grant { amount: grant });
                for (member, alloc) in std::iter::once(owner_alloc).chain(allocs).enumerate() {
                    if let Some(amount) = alloc {
                        ops.push(Op::Allocate {
                            member,
                            set: true,
                            amount,
                        });
                    }
                }
                if let Some(limit) = org_budget {
                    ops.push(Op::Budget {
                        member: None,
                        limit,
                    });
                }
                for (member, budget) in budgets.into_iter().enumerate() {
                    if let Some(limit) = budget {
                        ops.push(Op::Budget {
                            member: Some(member),
                            limit,
                        });
                    }
                }
                ops
            },
        )
}

#[derive(Debug, Clone)]
struct Case {
    setup: Vec<Op>,
    sequential: Vec<Op>,
    /// Credits granted between the phases.
    top_up: i64,
    /// Allocation and budget changes between the phases (fresh room to contend for).
    between: Vec<Op>,
    tasks: Vec<Vec<(Op, Mode)>>,
}

fn between_strategy() -> impl Strategy<Value = Vec<Op>> {
    (
        prop::array::uniform4(prop::option::weighted(0.7, 30i64..300)),
        prop::option::weighted(0.5, prop_oneof![1 => Just(0i64), 3 => 150i64..1500]),
    )
        .prop_map(|(adds, org_budget)| {
            let mut ops: Vec<Op> = adds
                .into_iter()
                .enumerate()
                .filter_map(|(member, add)| {
                    add.map(|amount| Op::Allocate {
                        member,
                        set: false,
                        amount,
                    })
                })
                .collect();
            if let Some(limit) = org_budget {
                ops.push(Op::Budget {
                    member: None,
                    limit,
                });
            }
            ops
        })
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        setup_strategy(),
        prop::collection::vec(op_strategy(), 60..120),
        0i64..400,
        between_strategy(),
        prop::collection::vec(prop::collection::vec(task_op(), 25..50), TASKS),
    )
        .prop_map(|(setup, sequential, top_up, between, tasks)| Case {
            setup,
            sequential,
            top_up,
            between,
            tasks,
        })
}

// ---------------------------------------------------------------------------------------
// Talking to the ledger

fn new_ledger(redis: &common::RedisServer, clock: Clock) -> Arc<Ledger> {
    let pool = RedisPool::new(&redis.url(), 4, std::time::Duration::from_secs(5)).expect("pool");
    Arc::new(Ledger::new(pool, LedgerSettings::default(), clock))
}

async fn flush(ledger: &Ledger) {
    let _: () = ledger
        .redis()
        .query(&redis::cmd("FLUSHALL"))
        .await
        .expect("flushall");
    ledger.initialize_all().await.expect("initialize");
}

/// A comparable answer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Got {
    Debited {
        amount: i64,
        available: i64,
        held: i64,
        remaining: Option<i64>,
    },
    Held {
        amount: i64,
        expires_at_ms: i64,
        available: i64,
        held: i64,
        remaining: Option<i64>,
    },
    Ended {
        captured: i64,
        released: i64,
        available: i64,
        held: i64,
    },
    Refunded {
        refunded: i64,
        total: i64,
        available: i64,
    },
    Allocated {
        allocated: i64,
        used: i64,
    },
    Granted {
        available: i64,
    },
    Done,
    Refused(Refusal),
    Invalid,
    /// Removing a budget that is not there.
    NotFound,
}

fn debit_cmd(member: &str, amount: i64, key: String) -> Debit {
    Debit {
        account_id: ORG.into(),
        wallet: WALLET.into(),
        amount,
        idempotency_key: key,
        operation: "op.debit".into(),
        metadata: Metadata::new(),
        member_id: member.into(),
        price_inputs: None,
        attempt_mark: None,
    }
}

fn authorize_cmd(member: &str, amount: i64, short: Option<(i64, bool)>, key: String) -> Authorize {
    let (ttl_ms, capture_on_expiry) = short.unwrap_or((HOLD_TTL_MS, false));
    Authorize {
        account_id: ORG.into(),
        wallet: WALLET.into(),
        amount,
        ttl_ms,
        on_expiry: if capture_on_expiry {
            OnExpiry::Capture
        } else {
            OnExpiry::Release
        },
        idempotency_key: key,
        operation: "op.hold".into(),
        metadata: Metadata::new(),
        member_id: member.into(),
        price_inputs: None,
        attempt_mark: None,
    }
}

fn refund_cmd(charge_id: &str, amount: i64, key: String) -> Refund {
    Refund {
        charge_id: charge_id.into(),
        amount,
        idempotency_key: key,
        metadata: Metadata::new(),
    }
}

fn end_cmd(hold_id: &str, capture: Option<Option<i64>>, key: String) -> EndHold {
    match capture {
        Some(amount) => EndHold::capture(hold_id.into(), amount, key),
        None => EndHold::release(hold_id.into(), key),
    }
}

fn grant_cmd(amount: i64, key: String) -> Grant {
    Grant {
        account_id: ORG.into(),
        wallet: WALLET.into(),
        amount,
        kind: LotKind::Purchase,
        priority: 50,
        expires_at_ms: 0,
        description: String::new(),
        idempotency_key: key,
        metadata: Metadata::new(),
    }
}

/// The amount a percent of a hold captures (None: all of it).
fn capture_amount(hold_amount: i64, percent: Option<i64>) -> Option<i64> {
    percent.map(|p| hold_amount * p / 100)
}

/// What a Capture (Some) or Release (None) of a hold of `amount` captures.
fn capture_of(capture: Option<Option<i64>>, amount: i64) -> i64 {
    match capture {
        None => 0,
        Some(None) => amount,
        Some(Some(n)) => n,
    }
}

/// A request as sent, so it can be sent again (Replay).
#[derive(Debug, Clone)]
enum Sent {
    Debit(Debit),
    Authorize(Authorize),
    End(EndHold),
    Refund(Refund),
    /// The owner changes a member's allocation.
    Allocate {
        member: String,
        change: AllocationChange,
        key: String,
    },
    Budget(SetBudget),
    /// The owner adds a member with a role (or changes it).
    Role {
        member: String,
        role: Role,
        key: String,
    },
    Grant(Grant),
}

/// An answer in full (ids and the replayed flag included), to compare a replay with.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Raw {
    Debited(DebitOutcome),
    Held(HoldOutcome),
    Ended(EndHoldOutcome),
    Refunded(RefundOutcome),
    Allocated(AllocationOutcome),
    Done(OrgEvent),
    Granted(GrantOutcome),
    Refused(Refusal),
    Invalid,
    NotFound(&'static str),
}

impl Raw {
    fn from<T>(r: Result<T, LedgerError>, ok: impl FnOnce(T) -> Raw) -> Raw {
        match r {
            Ok(v) => ok(v),
            Err(LedgerError::Refused(refusal)) => Raw::Refused(refusal),
            Err(LedgerError::InvalidArgument(_)) => Raw::Invalid,
            Err(LedgerError::NotFound(what)) => Raw::NotFound(what),
            Err(e) => panic!("ledger failure: {e}"),
        }
    }

    /// What the model predicts of it.
    fn got(&self) -> Got {
        match self {
            Raw::Debited(d) => Got::Debited {
                amount: d.amount,
                available: d.available,
                held: d.held,
                remaining: d.spendable,
            },
            Raw::Held(h) => Got::Held {
                amount: h.amount,
                expires_at_ms: h.expires_at_ms,
                available: h.available,
                held: h.held,
                remaining: h.spendable,
            },
            Raw::Ended(e) => {
                assert_eq!(e.expired, 0, "no lot expires here: {e:?}");
                Got::Ended {
                    captured: e.captured,
                    released: e.released,
                    available: e.available,
                    held: e.held,
                }
            }
            Raw::Refunded(r) => {
                assert_eq!(r.expired, 0, "no lot expires here: {r:?}");
                Got::Refunded {
                    refunded: r.refunded,
                    total: r.refunded_total,
                    available: r.available,
                }
            }
            Raw::Allocated(a) => Got::Allocated {
                allocated: a.allocated,
                used: a.used,
            },
            Raw::Done(_) => Got::Done,
            Raw::Granted(g) => Got::Granted {
                available: g.available,
            },
            Raw::Refused(r) => Got::Refused(r.clone()),
            Raw::Invalid => Got::Invalid,
            Raw::NotFound(what) => {
                assert_eq!(*what, "budget", "only a budget is looked for here");
                Got::NotFound
            }
        }
    }

    fn replayed(&self) -> bool {
        match self {
            Raw::Debited(o) => o.replayed,
            Raw::Held(o) => o.replayed,
            Raw::Ended(o) => o.replayed,
            Raw::Refunded(o) => o.replayed,
            Raw::Allocated(o) => o.replayed,
            Raw::Done(o) => o.replayed,
            Raw::Granted(o) => o.replayed,
            Raw::Refused(_) | Raw::Invalid | Raw::NotFound(_) => false,
        }
    }

    /// The same answer as a replay gives it (a refusal is an error: no flag).
    fn as_replay(&self) -> Raw {
        let mut r = self.clone();
        match &mut r {
            Raw::Debited(o) => o.replayed = true,
            Raw::Held(o) => o.replayed = true,
            Raw::Ended(o) => o.replayed = true,
            Raw::Refunded(o) => o.replayed = true,
            Raw::Allocated(o) => o.replayed = true,
            Raw::Done(o) => o.replayed = true,
            Raw::Granted(o) => o.replayed = true,
            Raw::Refused(_) | Raw::Invalid | Raw::NotFound(_) => {}
        }
        r
    }

    fn accepted(&self) -> bool {
        !matches!(self, Raw::Refused(_) | Raw::Invalid | Raw::NotFound(_))
    }

    /// Whether its key keeps it, so a replay returns it: every answer but bad input.
    fn remembered(&self) -> bool {
        !matches!(self, Raw::Invalid)
    }
}

async fn send(ledger: &Ledger, sent: &Sent) -> Raw {
    match sent {
        Sent::Debit(c) => Raw::from(ledger.debit(c).await, Raw::Debited),
        Sent::Authorize(c) => Raw::from(ledger.authorize(c).await, Raw::Held),
        Sent::End(c) => Raw::from(ledger.end_hold(c).await, Raw::Ended),
        Sent::Refund(c) => Raw::from(ledger.refund(c).await, Raw::Refunded),
        Sent::Allocate {
            member,
            change,
            key,
        } => Raw::from(
            ledger
                .allocate(ORG, OWNER, member, WALLET, *change, key)
                .await,
            Raw::Allocated,
        ),
        Sent::Budget(c) => Raw::from(ledger.set_budget(c).await, Raw::Done),
        Sent::Role { member, role, key } => Raw::from(
            ledger
                .add_member(ORG, OWNER, member, role.as_str(), key)
                .await,
            Raw::Done,
        ),
        Sent::Grant(c) => Raw::from(ledger.grant(c).await, Raw::Granted),
    }
}

// ---------------------------------------------------------------------------------------
// Sequential phase

struct Run {
    ledger: Arc<Ledger>,
    now: Arc<AtomicI64>,
    model: Model,
    /// Every hold and charge placed, in order (ids).
    hold_ids: Vec<String>,
    charge_ids: Vec<String>,
    /// Every request sent, with its first answer (for Replay).
    history: Vec<(Sent, Raw)>,
    days: i64,
    next_key: u64,
}

impl Run {
    fn key(&mut self) -> String {
        self.next_key += 1;
        format!("s{}", self.next_key)
    }

    fn now(&self) -> i64 {
        self.now.load(Ordering::SeqCst)
    }

    /// Sends a new request; remembers it for Replay.
    async fn send(&mut self, sent: Sent) -> Raw {
        let raw = send(&self.ledger, &sent).await;
        self.history.push((sent, raw.clone()));
        raw
    }

    async fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let now = self.now();
        let key = self.key();
        match op.clone() {
            Op::Debit { actor, amount } => {
                self.debit(ACTORS[actor], amount, key, op).await?;
            }
            Op::SpendAll { actor } => {
                let member = ACTORS[actor];
                // GetBalance ends overdue holds first (the model too).
                self.model.settle(now);
                let spendable = get_balance_spendable(&self.ledger, member).await;
                prop_assert_eq!(
                    spendable,
                    self.model.spendable(now, member),
                    "{:?}: GetBalance's spendable of {:?}",
                    op,
                    member
                );
                if spendable > 0 {
                    let raw = self.debit(member, spendable, key, op).await?;
                    let Raw::Debited(d) = raw else {
                        return Err(TestCaseError::fail(format!(
                            "{op:?}: a debit of exactly spendable ({spendable}) by {member:?}: {raw:?}"
                        )));
                    };
                    // Nothing left: the bound that gave `spendable` is used up.
                    prop_assert_eq!(d.spendable.unwrap_or(d.available), 0, "{:?}: {:?}", op, d);
                    tally::add(&tally::SEQ_SPENT_ALL, 1);
                }
            }
            Op::Authorize {
                actor,
                amount,
                short,
            } => {
                let member = ACTORS[actor];
                let cmd = authorize_cmd(member, amount, short, key);
                let (ttl_ms, capture_on_expiry) = (cmd.ttl_ms, cmd.on_expiry == OnExpiry::Capture);
                let raw = self.send(Sent::Authorize(cmd)).await;
                self.model.settle(now);
                let expect = match self.model.charge(now, member, amount, true) {
                    Ok(c) => {
                        if let Raw::Held(h) = &raw {
                            self.model.holds.insert(
                                h.hold_id.clone(),
                                ModelHold {
                                    member: member.into(),
                                    amount,
                                    refs: c.refs.clone(),
                                    ended: None,
                                    deadline_ms: now + ttl_ms,
                                    capture_on_expiry,
                                },
                            );
                            self.hold_ids.push(h.hold_id.clone());
                        }
                        Got::Held {
                            amount,
                            expires_at_ms: now + ttl_ms,
                            available: c.available,
                            held: c.held,
                            remaining: c.remaining,
                        }
                    }
                    Err(r) => Got::Refused(r),
                };
                tally_seq(&expect);
                prop_assert_eq!(raw.got(), expect, "{:?}", op);
                prop_assert!(!raw.replayed(), "{:?}: {:?}", op, raw);
            }
            Op::Capture { hold, percent } if !self.hold_ids.is_empty() => {
                let id = self.hold_ids[hold % self.hold_ids.len()].clone();
                let amount = self.model.holds[&id].amount;
                self.end(&id, Some(capture_amount(amount, percent)), key, op)
                    .await?;
            }
            Op::Release { hold } if !self.hold_ids.is_empty() => {
                let id = self.hold_ids[hold % self.hold_ids.len()].clone();
                self.end(&id, None, key, op).await?;
            }
            Op::Refund { charge, amount } if !self.charge_ids.is_empty() => {
                let id = self.charge_ids[charge % self.charge_ids.len()].clone();
                let raw = self.send(Sent::Refund(refund_cmd(&id, amount, key))).await;
                self.model.settle(now);
                let expect = match self.model.refund(&id, amount) {
                    Ok(total) => Got::Refunded {
                        refunded: amount,
                        total,
                        available: self.model.available,
                    },
                    Err(r) => Got::Refused(r),
                };
                prop_assert_eq!(raw.got(), expect, "{:?}", op);
                prop_assert!(!raw.replayed(), "{:?}: {:?}", op, raw);
            }
            Op::Capture { .. } | Op::Release { .. } | Op::Refund { .. } => {}
            Op::Allocate {
                member,
                set,
                amount,
            } => {
                let m = MEMBERS[member];
                let change = if set {
                    AllocationChange::Set(amount)
                } else {
                    AllocationChange::Add(amount)
                };
                let raw = self
                    .send(Sent::Allocate {
                        member: m.into(),
                        change,
                        key,
                    })
                    .await;
                let before = self.model.allocated.get(m).copied().unwrap_or(0);
                let after = if set { amount } else { before + amount };
                let expect = if after < 0 {
                    Got::Invalid
                } else {
                    self.model.allocated.insert(m.into(), after);
                    Got::Allocated {
                        allocated: after,
                        used: self.model.used_of(m),
                    }
                };
                prop_assert_eq!(raw.got(), expect, "{:?}", op);
            }
            Op::Budget { member, limit } => {
                let m = member.map_or("", |i| MEMBERS[i]);
                let raw = self
                    .send(Sent::Budget(SetBudget {
                        account_id: ORG.into(),
                        member_id: m.into(),
                        wallet: WALLET.into(),
                        limit,
                        period: BudgetPeriod::Day,
                        utc_offset_minutes: 0,
                        idempotency_key: key,
                    }))
                    .await;
                let want = if limit == 0 {
                    // A budget not there to remove is refused, and nothing changes.
                    if self.model.budgets.remove(m).is_some() {
                        Got::Done
                    } else {
                        Got::NotFound
                    }
                } else {
                    if let Some(b) = self.model.budgets.get_mut(m) {
                        b.limit = limit;
                    } else {
                        self.model.budget_generations += 1;
                        let generation = self.model.budget_generations;
                        self.model.budgets.insert(
                            m.into(),
                            ModelBudget {
                                limit,
                                s: 0,
                                ps: None,
                                generation,
                            },
                        );
                    }
                    Got::Done
                };
                prop_assert_eq!(raw.got(), want, "{:?}", op);
            }
            Op::Role { member, admin } => {
                let m = MEMBERS[member];
                let role = if admin { Role::Admin } else { Role::Member };
                let raw = self
                    .send(Sent::Role {
                        member: m.into(),
                        role,
                        key,
                    })
                    .await;
                self.model.roles.insert(m.into(), role);
                prop_assert_eq!(raw.got(), Got::Done, "{:?}", op);
            }
            Op::Grant { amount } => {
                let raw = self.send(Sent::Grant(grant_cmd(amount, key))).await;
                self.model.settle(now);
                self.model.available += amount;
                self.model.granted += amount;
                prop_assert_eq!(
                    raw.got(),
                    Got::Granted {
                        available: self.model.available
                    },
                    "{:?}",
                    op
                );
            }
            Op::NextDay => {
                if self.days < DAYS_MAX - 1 {
                    self.days += 1;
                    self.now.fetch_add(DAY_MS, Ordering::SeqCst);
                    self.compare_state("after a day change").await?;
                }
            }
            Op::Advance { ms } => {
                let later = now + ms;
                if day_start(later) == day_start(now) {
                    self.now.store(later, Ordering::SeqCst);
                }
            }
            Op::Replay { index } => {
                if self.history.is_empty() {
                    return Ok(());
                }
                let (sent, first) = self.history[index % self.history.len()].clone();
                if !first.remembered() {
                    return Ok(());
                }
                let again = send(&self.ledger, &sent).await;
                prop_assert_eq!(
                    &again,
                    &first.as_replay(),
                    "{:?}: replay of {:?} (first answered {:?})",
                    op,
                    sent,
                    first
                );
                tally::add(&tally::SEQ_REPLAYS, 1);
                // The model did not move: neither may the ledger.
                self.compare_state(&format!("after a replay of {sent:?}"))
                    .await?;
            }
        }
        Ok(())
    }

    /// A debit by `member` (sent, then predicted by the model): its answer.
    async fn debit(
        &mut self,
        member: &str,
        amount: i64,
        key: String,
        op: &Op,
    ) -> Result<Raw, TestCaseError> {
        let now = self.now();
        let raw = self.send(Sent::Debit(debit_cmd(member, amount, key))).await;
        self.model.settle(now);
        let expect = match self.model.charge(now, member, amount, false) {
            Ok(c) => {
                if let Raw::Debited(d) = &raw {
                    self.model.charges.insert(
                        d.event_id.clone(),
                        ModelCharge {
                            member: member.into(),
                            amount,
                            refunded: 0,
                        },
                    );
                    self.charge_ids.push(d.event_id.clone());
                }
                Got::Debited {
                    amount,
                    available: c.available,
                    held: c.held,
                    remaining: c.remaining,
                }
            }
            Err(r) => Got::Refused(r),
        };
        tally_seq(&expect);
        prop_assert_eq!(raw.got(), expect, "{:?}", op);
        prop_assert!(!raw.replayed(), "{:?}: {:?}", op, raw);
        Ok(raw)
    }

    async fn end(
        &mut self,
        hold_id: &str,
        capture: Option<Option<i64>>,
        key: String,
        op: &Op,
    ) -> Result<(), TestCaseError> {
        let raw = self.send(Sent::End(end_cmd(hold_id, capture, key))).await;
        self.model.settle(self.now());
        let expect = match self.model.end_hold(hold_id, capture) {
            Ok((captured, released)) => {
                if captured > 0 {
                    if let Raw::Ended(e) = &raw {
                        let member = self.model.holds[hold_id].member.clone();
                        self.model.charges.insert(
                            e.event_id.clone(),
                            ModelCharge {
                                member,
                                amount: captured,
                                refunded: 0,
                            },
                        );
                        self.charge_ids.push(e.event_id.clone());
                    }
                }
                Got::Ended {
                    captured,
                    released,
                    available: self.model.available,
                    held: self.model.held,
                }
            }
            Err(r) => {
                if let Refusal::HoldEnded {
                    how: HoldEnd::Expired,
                    ..
                } = r
                {
                    tally::add(&tally::SEQ_ENDED_EXPIRED, 1);
                }
                Got::Refused(r)
            }
        };
        prop_assert_eq!(raw.got(), expect, "{:?} of {}", op, hold_id);
        prop_assert!(!raw.replayed(), "{:?}: {:?}", op, raw);
        Ok(())
    }

    /// The balance and every actor's view against the model.
    async fn compare_state(&mut self, when: &str) -> Result<(), TestCaseError> {
        let now = self.now();
        compare_state(&self.ledger, &mut self.model, now, when).await
    }
}

fn tally_seq(expect: &Got) {
    match expect {
        Got::Refused(r) => tally::refusal(r, false),
        _ => tally::add(&tally::SEQ_ACCEPTED, 1),
    }
}

/// GetBalance's `spendable` of the org wallet for `actor`, from the same two reads the API
/// makes (src/api/metering.rs `get_balance`: the balance, which ends overdue holds, then
/// the view) and the same figure it computes from them.
async fn get_balance_spendable(ledger: &Ledger, actor: &str) -> i64 {
    let balance = ledger.balance(ORG, WALLET).await.expect("balance");
    let view = ledger.view(ORG, actor, WALLET).await.expect("view");
    view.spendable(WALLET, balance[0].available)
}

/// Idempotency keys of the probes of compare_state (fresh ones: a probe is never replayed).
static PROBES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The balance and every actor's view against the model. GetBalance ends overdue holds
/// (the model too, first); the view does not. And every actor's GetBalance `spendable`
/// against the model's, as the real bound: the model allows a charge of exactly it and
/// refuses one credit more, and the ledger refuses that one as the model says (a refusal
/// changes nothing, so the model stays as it is).
async fn compare_state(
    ledger: &Ledger,
    model: &mut Model,
    now: i64,
    when: &str,
) -> Result<(), TestCaseError> {
    model.settle(now);
    let balance = ledger.balance(ORG, WALLET).await.expect("balance");
    prop_assert_eq!(balance.len(), 1);
    let b = &balance[0];
    prop_assert_eq!(b, &model.balance(), "balance {}", when);
    prop_assert!(b.is_conserved(), "conservation {when}: {b:?}");
    prop_assert!(b.available >= 0 && b.held >= 0, "negative {when}: {b:?}");
    for actor in ACTORS {
        let view = ledger.view(ORG, actor, WALLET).await.expect("view");
        prop_assert_eq!(
            &view,
            &model.view(now, actor),
            "view of {:?} {}",
            actor,
            when
        );
        // What GetBalance computes from these two reads (src/api/metering.rs).
        let spendable = view.spendable(WALLET, b.available);
        prop_assert_eq!(
            spendable,
            model.spendable(now, actor),
            "GetBalance's spendable of {:?} {}",
            actor,
            when
        );
        if spendable > 0 {
            prop_assert_eq!(
                model.check(now, actor, spendable),
                Ok(()),
                "{:?} may not spend all of spendable ({}) {}",
                actor,
                spendable,
                when
            );
        }
        let over = model.check(now, actor, spendable + 1);
        prop_assert!(
            over.is_err(),
            "{actor:?} may spend past spendable ({spendable}) {when}"
        );
        let probe = format!("probe{}", PROBES.fetch_add(1, Ordering::Relaxed));
        let raw = send(ledger, &Sent::Debit(debit_cmd(actor, spendable + 1, probe))).await;
        prop_assert_eq!(
            raw.got(),
            Got::Refused(over.unwrap_err()),
            "a debit of spendable ({}) + 1 by {:?} {}",
            spendable,
            actor,
            when
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Concurrent phase

/// An acknowledged mutation of a concurrent task, to replay in Redis's order.
#[derive(Debug, Clone)]
enum Ack {
    Debited {
        event_id: String,
        member: String,
        amount: i64,
        got: Got,
    },
    Held {
        event_id: String,
        hold_id: String,
        member: String,
        amount: i64,
        got: Got,
    },
    Ended {
        event_id: String,
        hold_id: String,
        capture: Option<Option<i64>>,
        got: Got,
    },
    Refunded {
        event_id: String,
        charge_id: String,
        amount: i64,
        got: Got,
    },
}

impl Ack {
    fn event_id(&self) -> &str {
        match self {
            Ack::Debited { event_id, .. }
            | Ack::Held { event_id, .. }
            | Ack::Ended { event_id, .. }
            | Ack::Refunded { event_id, .. } => event_id,
        }
    }
}

/// Order of an event id "<shard>-<ms>-<seq>" in its shard's outbox.
fn stream_order(event_id: &str) -> (u64, u64, u64) {
    let parts: Vec<u64> = event_id
        .split('-')
        .map(|p| p.parse().expect("event id part"))
        .collect();
    assert_eq!(parts.len(), 3, "event id {event_id}");
    (parts[0], parts[1], parts[2])
}

/// Checks a charge refusal is one the org rules allow, with consistent numbers.
fn check_charge_refusal(
    r: &Refusal,
    amount: i64,
    limits: &HashMap<String, i64>,
    member: &str,
) -> Result<(), String> {
    match r {
        Refusal::AllocationExceeded {
            required,
            remaining,
        } if *required == amount && *remaining < amount && !member.is_empty() => Ok(()),
        Refusal::BudgetExceeded {
            budget,
            limit,
            spent,
            ..
        } => {
            let key = match budget {
                BudgetScope::Account => "",
                BudgetScope::Member => member,
            };
            if limits.get(key) == Some(limit) && spent + amount > *limit && *spent >= 0 {
                Ok(())
            } else {
                Err(format!("inconsistent {r:?} for {amount} by {member:?}"))
            }
        }
        Refusal::InsufficientCredits {
            required,
            available,
        } if *required == amount && *available < amount && *available >= 0 => Ok(()),
        other => Err(format!(
            "unexpected refusal {other:?} of {amount} by {member:?}"
        )),
    }
}

/// How a concurrent step sends its request.
#[derive(Debug, Clone, Copy)]
enum Mode {
    Once,
    /// The same request (same idempotency key) twice at once, `tokio::join!`: the scripts
    /// run one after the other, so one answer is fresh and the other its replay (or the
    /// same refusal twice). A Replay step sends the earlier request twice at once.
    Twin,
    /// For Capture/Release/Refund: two requests with different keys at once on the same
    /// hold (one captures, the other releases) or the same charge (amounts summing past
    /// it, so never both). Other operations are sent once.
    Rival,
}

fn mode_strategy() -> impl Strategy<Value = Mode> {
    prop_oneof![5 => Just(Mode::Once), 2 => Just(Mode::Twin), 2 => Just(Mode::Rival)]
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

/// What the concurrent tasks share: every hold and charge (any task may end or refund
/// any of them), every request with its first answer (any task may replay it), and what
/// the answers said, checked against the model once the acknowledged mutations are
/// replayed in Redis's order.
#[derive(Default)]
struct Shared {
    /// (hold id, amount, the task that placed it)
    holds: Vec<(String, i64, usize)>,
    /// (charge id, amount)
    charges: Vec<(String, i64)>,
    sent: Vec<(Sent, Raw)>,
    acks: Vec<Ack>,
    /// (hold id, how, captured) of every HoldEnded refusal.
    ended_refusals: Vec<(String, HoldEnd, i64)>,
    /// (charge id, amount asked, refundable) of every RefundExceedsCharge refusal.
    refund_refusals: Vec<(String, i64, i64)>,
}

/// What every concurrent task works with.
struct TaskCtx {
    ledger: Arc<Ledger>,
    shared: Mutex<Shared>,
    /// Budget limits during the phase ("" the org's, else the member's).
    limits: HashMap<String, i64>,
}

impl TaskCtx {
    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().expect("shared state")
    }

    /// Checks a fresh answer against its request and records it.
    fn take_fresh(&self, task: usize, sent: &Sent, raw: &Raw) -> Result<(), String> {
        if raw.replayed() {
            return Err(format!("{sent:?} with a fresh key: {raw:?}"));
        }
        let mut sh = self.shared();
        match (sent, raw) {
            (Sent::Debit(c), Raw::Debited(d)) => {
                if d.amount != c.amount || d.available < 0 {
                    return Err(format!("debit of {}: {d:?}", c.amount));
                }
                sh.charges.push((d.event_id.clone(), c.amount));
                sh.acks.push(Ack::Debited {
                    event_id: d.event_id.clone(),
                    member: c.member_id.clone(),
                    amount: c.amount,
                    got: raw.got(),
                });
            }
            (Sent::Authorize(c), Raw::Held(h)) => {
                if h.amount != c.amount || h.available < 0 {
                    return Err(format!("hold of {}: {h:?}", c.amount));
                }
                sh.holds.push((h.hold_id.clone(), c.amount, task));
                sh.acks.push(Ack::Held {
                    event_id: h.event_id.clone(),
                    hold_id: h.hold_id.clone(),
                    member: c.member_id.clone(),
                    amount: c.amount,
                    got: raw.got(),
                });
            }
            (
                Sent::Debit(Debit {
                    amount, member_id, ..
                }),
                Raw::Refused(r),
            )
            | (
                Sent::Authorize(Authorize {
                    amount, member_id, ..
                }),
                Raw::Refused(r),
            ) => {
                tally::refusal(r, true);
                check_charge_refusal(r, *amount, &self.limits, member_id)?;
            }
            (Sent::End(c), Raw::Ended(e)) => {
                let &(_, amount, placed_by) = sh
                    .holds
                    .iter()
                    .find(|(id, ..)| *id == c.hold_id)
                    .expect("a known hold");
                let captured = capture_of(c.capture, amount);
                if e.captured != captured || e.released != amount - captured {
                    return Err(format!("{c:?} of a hold of {amount}: {e:?}"));
                }
                if placed_by != task {
                    tally::add(&tally::CON_ENDED_BY_ANOTHER, 1);
                }
                if captured > 0 {
                    sh.charges.push((e.event_id.clone(), captured));
                }
                sh.acks.push(Ack::Ended {
                    event_id: e.event_id.clone(),
                    hold_id: c.hold_id.clone(),
                    capture: c.capture,
                    got: raw.got(),
                });
            }
            (Sent::End(c), Raw::Refused(Refusal::HoldEnded { how, captured })) => {
                tally::add(&tally::CON_HOLD_ENDED, 1);
                sh.ended_refusals.push((c.hold_id.clone(), *how, *captured));
            }
            (Sent::Refund(c), Raw::Refunded(r)) => {
                if r.refunded != c.amount {
                    return Err(format!("{c:?}: {r:?}"));
                }
                sh.acks.push(Ack::Refunded {
                    event_id: r.event_id.clone(),
                    charge_id: c.charge_id.clone(),
                    amount: c.amount,
                    got: raw.got(),
                });
            }
            (Sent::Refund(c), Raw::Refused(Refusal::RefundExceedsCharge { refundable }))
                if *refundable < c.amount =>
            {
                sh.refund_refusals
                    .push((c.charge_id.clone(), c.amount, *refundable));
            }
            _ => return Err(format!("{sent:?}: {raw:?}")),
        }
        sh.sent.push((sent.clone(), raw.clone()));
        Ok(())
    }

    async fn send_once(&self, task: usize, sent: &Sent) -> Result<(), String> {
        let raw = send(&self.ledger, sent).await;
        self.take_fresh(task, sent, &raw)
    }

    /// Sends a request twice at once with the same key: one fresh answer and its replay,
    /// or the same refusal twice.
    async fn send_twin(&self, task: usize, sent: &Sent) -> Result<(), String> {
        let (a, b) = tokio::join!(send(&self.ledger, sent), send(&self.ledger, sent));
        if a.accepted() || b.accepted() {
            let (first, again) = if a.replayed() { (b, a) } else { (a, b) };
            if first.replayed() || again != first.as_replay() {
                return Err(format!(
                    "{sent:?} twice at once: {first:?} and {again:?} (want one fresh answer and its replay)"
                ));
            }
            tally::add(&tally::CON_TWIN_REPLAYED, 1);
            self.take_fresh(task, sent, &first)
        } else if a.remembered() && b.remembered() {
            if a != b {
                return Err(format!("{sent:?} twice at once: {a:?} and {b:?}"));
            }
            tally::add(&tally::CON_TWIN_REFUSED, 1);
            self.take_fresh(task, sent, &a)
        } else {
            // Bad input is not recorded under its key: each ran afresh.
            self.take_fresh(task, sent, &a)?;
            self.take_fresh(task, sent, &b)
        }
    }

    /// Two ends of one hold (one captures, one releases) or two refunds of one charge
    /// (more than it together) at once, with different keys.
    async fn send_rivals(&self, task: usize, sent: &Sent, rival: &Sent) -> Result<(), String> {
        let (a, b) = tokio::join!(send(&self.ledger, sent), send(&self.ledger, rival));
        let pair = || format!("{sent:?} -> {a:?} and at once {rival:?} -> {b:?}");
        match (&a, &b) {
            (Raw::Ended(_), Raw::Ended(_)) => {
                return Err(format!("a hold ended twice: {}", pair()))
            }
            (Raw::Refunded(_), Raw::Refunded(_)) => {
                return Err(format!("refunded past the charge: {}", pair()))
            }
            (Raw::Ended(e), Raw::Refused(Refusal::HoldEnded { how, captured }))
            | (Raw::Refused(Refusal::HoldEnded { how, captured }), Raw::Ended(e)) => {
                let Sent::End(winner) = (if a.accepted() { sent } else { rival }) else {
                    unreachable!("rival ends")
                };
                let want = if winner.capture.is_some() {
                    HoldEnd::Captured
                } else {
                    HoldEnd::Released
                };
                if (*how, *captured) != (want, e.captured) {
                    return Err(format!("the refusal names another end: {}", pair()));
                }
                tally::add(&tally::CON_END_RIVALS_SPLIT, 1);
            }
            (Raw::Refused(x @ Refusal::HoldEnded { .. }), Raw::Refused(y)) if x != y => {
                return Err(format!("two ends named: {}", pair()))
            }
            (Raw::Refunded(_), Raw::Refused(Refusal::RefundExceedsCharge { .. }))
            | (Raw::Refused(Refusal::RefundExceedsCharge { .. }), Raw::Refunded(_)) => {
                tally::add(&tally::CON_REFUND_RIVALS_SPLIT, 1);
            }
            // Both refunds refused (checked one by one below).
            _ => {}
        }
        self.take_fresh(task, sent, &a)?;
        self.take_fresh(task, rival, &b)
    }
}

/// One task: charges by random members; ends and refunds any task's holds and charges;
/// replays any task's requests.
async fn concurrent_task(
    ctx: Arc<TaskCtx>,
    task: usize,
    ops: Vec<(Op, Mode)>,
) -> Result<(), String> {
    for (i, (op, mode)) in ops.into_iter().enumerate() {
        let key = format!("c{task}-{i}");
        let rival_key = format!("c{task}-{i}r");
        let sent = match op {
            Op::Debit { actor, amount } => Sent::Debit(debit_cmd(ACTORS[actor], amount, key)),
            Op::Authorize { actor, amount, .. } => {
                Sent::Authorize(authorize_cmd(ACTORS[actor], amount, None, key))
            }
            Op::Capture { hold, .. } | Op::Release { hold } => {
                let picked = {
                    let sh = ctx.shared();
                    (!sh.holds.is_empty())
                        .then(|| sh.holds[recent_or_any(hold, sh.holds.len())].clone())
                };
                let Some((hold_id, amount, _)) = picked else {
                    continue;
                };
                let capture = match op {
                    Op::Capture { percent, .. } => Some(capture_amount(amount, percent)),
                    _ => None,
                };
                let end = end_cmd(&hold_id, capture, key);
                if let Mode::Rival = mode {
                    let other = if capture.is_some() { None } else { Some(None) };
                    let rival = end_cmd(&hold_id, other, rival_key);
                    ctx.send_rivals(task, &Sent::End(end), &Sent::End(rival))
                        .await?;
                    continue;
                }
                Sent::End(end)
            }
            Op::Refund { charge, amount } => {
                let picked = {
                    let sh = ctx.shared();
                    (!sh.charges.is_empty())
                        .then(|| sh.charges[recent_or_any(charge, sh.charges.len())].clone())
                };
                let Some((charge_id, charged)) = picked else {
                    continue;
                };
                if let Mode::Rival = mode {
                    // a + b = charged + 1: never both.
                    let a = amount % charged + 1;
                    let b = charged - a + 1;
                    let x = refund_cmd(&charge_id, a, key);
                    let y = refund_cmd(&charge_id, b, rival_key);
                    ctx.send_rivals(task, &Sent::Refund(x), &Sent::Refund(y))
                        .await?;
                    continue;
                }
                Sent::Refund(refund_cmd(&charge_id, amount, key))
            }
            Op::Replay { index } => {
                let picked = {
                    let sh = ctx.shared();
                    (!sh.sent.is_empty()).then(|| sh.sent[index % sh.sent.len()].clone())
                };
                let Some((sent, first)) = picked else {
                    continue;
                };
                let want = first.as_replay();
                let answers = if let Mode::Twin = mode {
                    let (a, b) = tokio::join!(send(&ctx.ledger, &sent), send(&ctx.ledger, &sent));
                    vec![a, b]
                } else {
                    vec![send(&ctx.ledger, &sent).await]
                };
                for again in answers {
                    if again != want {
                        return Err(format!(
                            "replay of {sent:?}: {again:?}, first answered {first:?}"
                        ));
                    }
                    tally::add(&tally::CON_REPLAYS, 1);
                }
                continue;
            }
            other => unreachable!("not a concurrent step: {other:?}"),
        };
        if let Mode::Twin = mode {
            ctx.send_twin(task, &sent).await?;
        } else {
            ctx.send_once(task, &sent).await?;
        }
    }
    Ok(())
}

/// What the monitor may see: the ceilings each allocation and budget must stay under
/// (the larger of the limit and where it stood when the phase began, since a limit
/// lowered earlier may sit under what was already spent).
#[derive(Clone)]
struct Ceilings {
    allocations: HashMap<String, i64>,
    budgets: HashMap<(String, String), i64>,
}

/// Reads the state again and again while the tasks run; every snapshot must keep the
/// invariants. Returns how many snapshots it checked.
async fn monitor(
    ledger: Arc<Ledger>,
    ceilings: Ceilings,
    stop: Arc<AtomicBool>,
) -> Result<usize, String> {
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) {
        let balance = ledger
            .balance(ORG, WALLET)
            .await
            .map_err(|e| e.to_string())?;
        let b = &balance[0];
        if b.available < 0 || b.held < 0 || !b.is_conserved() {
            return Err(format!("balance broke an invariant: {b:?}"));
        }
        for actor in ACTORS {
            let view = ledger
                .view(ORG, actor, WALLET)
                .await
                .map_err(|e| e.to_string())?;
            for a in &view.allocations {
                if a.used < 0 {
                    return Err(format!("{actor:?}: negative used {a:?}"));
                }
                if a.bounded {
                    let ceiling = ceilings.allocations.get(actor).copied().unwrap_or(0);
                    if a.used > ceiling {
                        return Err(format!(
                            "{actor:?} spent past the allocation: {a:?} (ceiling {ceiling})"
                        ));
                    }
                }
            }
            for bs in &view.budgets {
                let key = if bs.scope == "account" { "" } else { actor };
                let ceiling = ceilings
                    .budgets
                    .get(&(key.to_owned(), bs.scope.clone()))
                    .copied()
                    .unwrap_or(bs.limit);
                if bs.spent < 0 || bs.spent > ceiling {
                    return Err(format!(
                        "{actor:?}: budget past its limit: {bs:?} (ceiling {ceiling})"
                    ));
                }
            }
        }
        n += 1;
        tokio::task::yield_now().await;
    }
    Ok(n)
}

async fn run_case(
    ledger: Arc<Ledger>,
    now: Arc<AtomicI64>,
    case: Case,
) -> Result<(), TestCaseError> {
    let (_, created) = ledger
        .create_org(ORG, OWNER, "setup-org")
        .await
        .expect("create org");
    prop_assert_eq!(created, START_MS);
    let mut run = Run {
        ledger: ledger.clone(),
        now: now.clone(),
        model: Model::default(),
        hold_ids: Vec::new(),
        charge_ids: Vec::new(),
        history: Vec::new(),
        days: 0,
        next_key: 0,
    };
    run.model.roles.insert(OWNER.into(), Role::Owner);
    for op in &case.setup {
        run.step(op).await?;
    }
    run.compare_state("after setup").await?;
    for (i, op) in case.sequential.iter().enumerate() {
        run.step(op).await?;
        if i % 10 == 9 {
            run.compare_state(&format!("after sequential op {i} ({op:?})"))
                .await?;
        }
    }
    run.compare_state("after the sequential phase").await?;

    // Between the phases: a new day (budgets start over), more credits.
    run.step(&Op::NextDay).await?;
    if case.top_up > 0 {
        run.step(&Op::Grant {
            amount: case.top_up,
        })
        .await?;
    }
    for op in &case.between {
        run.step(op).await?;
    }
    run.compare_state("before the concurrent phase").await?;
    let now_ms = run.now();
    let mut model = run.model;

    let limits: HashMap<String, i64> = model
        .budgets
        .iter()
        .map(|(k, b)| (k.clone(), b.limit))
        .collect();
    let ceilings = Ceilings {
        allocations: MEMBERS
            .iter()
            .map(|m| {
                let allocated = model.allocated.get(*m).copied().unwrap_or(0);
                (m.to_string(), allocated.max(model.used_of(m)))
            })
            .collect(),
        budgets: model
            .budgets
            .iter()
            .map(|(k, b)| {
                let scope = if k.is_empty() { "account" } else { "member" };
                ((k.clone(), scope.to_owned()), b.limit.max(b.spent(now_ms)))
            })
            .collect(),
    };
    let allocation_ceilings = ceilings.allocations.clone();
    let budget_ceilings = ceilings.budgets.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn(monitor(ledger.clone(), ceilings, stop.clone()));
    let ctx = Arc::new(TaskCtx {
        ledger: ledger.clone(),
        shared: Mutex::default(),
        limits,
    });
    let handles: Vec<_> = case
        .tasks
        .into_iter()
        .enumerate()
        .map(|(i, ops)| tokio::spawn(concurrent_task(ctx.clone(), i, ops)))
        .collect();
    for h in handles {
        if let Err(e) = h.await.expect("task") {
            prop_assert!(false, "concurrent task: {e}");
        }
    }
    let told = std::mem::take(&mut *ctx.shared());
    let mut acks = told.acks;
    stop.store(true, Ordering::SeqCst);
    match watcher.await.expect("monitor") {
        Ok(n) => tally::add(&tally::MONITOR_SNAPSHOTS, n),
        Err(e) => prop_assert!(false, "monitor: {e}"),
    }

    tally::add(&tally::CON_ACCEPTED, acks.len());
    // Replay the acknowledged mutations in the order Redis ran them.
    acks.sort_by_key(|a| stream_order(a.event_id()));
    // Each charge's refunded total after each of its refunds, in order.
    let mut refunded_totals: HashMap<&str, Vec<i64>> = HashMap::new();
    for ack in &acks {
        match ack {
            Ack::Debited {
                event_id,
                member,
                amount,
                got,
            } => {
                let c = model.charge(now_ms, member, *amount, false);
                let c = match c {
                    Ok(c) => c,
                    Err(r) => {
                        return Err(TestCaseError::fail(format!("acknowledged debit {event_id} of {amount} by {member:?} was not allowed then: {r:?}")))
                    }
                };
                prop_assert_eq!(
                    got,
                    &Got::Debited {
                        amount: *amount,
                        available: c.available,
                        held: c.held,
                        remaining: c.remaining
                    },
                    "debit {}",
                    event_id
                );
                model.charges.insert(
                    event_id.clone(),
                    ModelCharge {
                        member: member.clone(),
                        amount: *amount,
                        refunded: 0,
                    },
                );
            }
            Ack::Held {
                event_id,
                hold_id,
                member,
                amount,
                got,
            } => {
                let c = match model.charge(now_ms, member, *amount, true) {
                    Ok(c) => c,
                    Err(r) => {
                        return Err(TestCaseError::fail(format!("acknowledged hold {event_id} of {amount} by {member:?} was not allowed then: {r:?}")))
                    }
                };
                prop_assert_eq!(
                    got,
                    &Got::Held {
                        amount: *amount,
                        expires_at_ms: now_ms + HOLD_TTL_MS,
                        available: c.available,
                        held: c.held,
                        remaining: c.remaining
                    },
                    "hold {}",
                    event_id
                );
                model.holds.insert(
                    hold_id.clone(),
                    ModelHold {
                        member: member.clone(),
                        amount: *amount,
                        refs: c.refs,
                        ended: None,
                        deadline_ms: now_ms + HOLD_TTL_MS,
                        capture_on_expiry: false,
                    },
                );
            }
            Ack::Ended {
                event_id,
                hold_id,
                capture,
                got,
            } => {
                let (captured, released) = match model.end_hold(hold_id, *capture) {
                    Ok(v) => v,
                    Err(r) => {
                        return Err(TestCaseError::fail(format!(
                            "acknowledged end {event_id}: model says {r:?}"
                        )))
                    }
                };
                prop_assert_eq!(
                    got,
                    &Got::Ended {
                        captured,
                        released,
                        available: model.available,
                        held: model.held
                    },
                    "end {}",
                    event_id
                );
                if captured > 0 {
                    let member = model.holds[hold_id].member.clone();
                    model.charges.insert(
                        event_id.clone(),
                        ModelCharge {
                            member,
                            amount: captured,
                            refunded: 0,
                        },
                    );
                }
            }
            Ack::Refunded {
                event_id,
                charge_id,
                amount,
                got,
            } => {
                let total = match model.refund(charge_id, *amount) {
                    Ok(t) => {
                        refunded_totals
                            .entry(charge_id.as_str())
                            .or_default()
                            .push(t);
                        t
                    }
                    Err(r) => {
                        return Err(TestCaseError::fail(format!(
                            "acknowledged refund {event_id}: model says {r:?}"
                        )))
                    }
                };
                prop_assert_eq!(
                    got,
                    &Got::Refunded {
                        refunded: *amount,
                        total,
                        available: model.available
                    },
                    "refund {}",
                    event_id
                );
            }
        }
    }
    // Every refusal of an end named how the hold really ended (it ends once; the model
    // ended it by the acknowledged answer that did), and every refusal of a refund what
    // was refundable at some moment.
    for (hold_id, how, captured) in &told.ended_refusals {
        prop_assert_eq!(
            model.holds[hold_id].ended,
            Some((*how, *captured)),
            "a HoldEnded refusal of {} names another end",
            hold_id
        );
    }
    for (charge_id, asked, refundable) in &told.refund_refusals {
        let charged = model.charges[charge_id].amount;
        let moments: Vec<i64> = std::iter::once(charged)
            .chain(
                refunded_totals
                    .get(charge_id.as_str())
                    .into_iter()
                    .flatten()
                    .map(|t| charged - t),
            )
            .collect();
        prop_assert!(
            moments.contains(refundable),
            "a refusal of a refund of {} of {}: {} refundable, never so ({:?})",
            asked,
            charge_id,
            refundable,
            moments
        );
    }
    compare_state(&ledger, &mut model, now_ms, "after the concurrent phase").await?;

    // The acceptance point, in plain terms: no bounded member spent past the allocation
    // (or past what it had spent already when a lowered allocation left it over), no
    // budget past its limit, the balance never below zero (compare_state checked it).
    for m in MEMBERS {
        let view = ledger.view(ORG, m, WALLET).await.expect("view");
        for a in &view.allocations {
            if a.bounded {
                let ceiling = allocation_ceilings.get(m).copied().unwrap_or(0);
                prop_assert!(
                    a.used <= ceiling,
                    "{m} past allocation: {a:?} (ceiling {ceiling})"
                );
            }
        }
        for b in &view.budgets {
            let key = if b.scope == "account" { "" } else { m };
            let ceiling = budget_ceilings
                .get(&(key.to_owned(), b.scope.clone()))
                .copied()
                .unwrap_or(b.limit);
            prop_assert!(
                b.spent <= ceiling,
                "{m}: budget past its limit: {b:?} (ceiling {ceiling})"
            );
        }
    }
    Ok(())
}

#[test]
fn org_charges_respect_allocations_budgets_and_balance() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let redis = common::RedisServer::start();
    let runner_cases = cases(ORG_CASES);
    let mut runner = TestRunner::new(ProptestConfig {
        rng_seed: common::proptest_seed("org_charges_respect_allocations_budgets_and_balance"),
        cases: runner_cases,
        // The concurrent phase is not reproducible: shrink only a little.
        max_shrink_iters: 50,
        ..ProptestConfig::default()
    });
    runner
        .run(&case_strategy(), |case| {
            runtime.block_on(async {
                let (clock, now) = Clock::manual(START_MS);
                let ledger = new_ledger(&redis, clock);
                flush(&ledger).await;
                run_case(ledger, now, case).await
            })
        })
        .expect("org model and ledger agree");
    eprintln!("org_model: {}", tally::report());
    // Fewer cases than the default (PROPTEST_CASES) may miss some: only counted then.
    if runner_cases >= ORG_CASES {
        tally::check();
    }
}
