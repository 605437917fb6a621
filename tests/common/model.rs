//! An in-memory model of the ledger, written from DESIGN.md and the documented script
//! semantics (burn order, holds, refunds, lazy expiry), independent of the Lua code.
//! `Model` predicts every answer of a sequential run; `Replayer` rebuilds state from
//! outbox events and checks the invariants event by event.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};

use tollgate::ledger::event::{EventKind, LedgerEvent, LotPiece};
use tollgate::ledger::{
    DebitOutcome, EndHoldOutcome, GrantOutcome, HoldEnd, HoldOutcome, LedgerError, RefundOutcome,
    Refusal, WalletBalance,
};

pub const NEVER: i64 = (1 << 42) - 1;
pub const PRIORITY_UNIT: i64 = 1 << 42;

/// A comparable form of every answer the ledger gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Granted {
        event_id: String,
        lot_id: String,
        available: i64,
        replayed: bool,
    },
    Debited {
        event_id: String,
        amount: i64,
        available: i64,
        held: i64,
        replayed: bool,
    },
    Held {
        event_id: String,
        hold_id: String,
        amount: i64,
        expires_at_ms: i64,
        available: i64,
        held: i64,
        replayed: bool,
    },
    Ended {
        event_id: String,
        captured: i64,
        released: i64,
        available: i64,
        held: i64,
        replayed: bool,
    },
    Refunded {
        event_id: String,
        refunded: i64,
        refunded_total: i64,
        available: i64,
        expired: i64,
        replayed: bool,
    },
    Refused(Refusal),
    /// INVALID_ARGUMENT naming this field.
    Invalid(String),
    NotFound(&'static str),
    Failed(String),
}

impl Outcome {
    /// The same answer with ids blanked and `replayed` cleared: what the model predicts.
    pub fn without_ids(&self) -> Self {
        let mut o = self.clone();
        match &mut o {
            Outcome::Granted {
                event_id, replayed, ..
            }
            | Outcome::Debited {
                event_id, replayed, ..
            }
            | Outcome::Ended {
                event_id, replayed, ..
            }
            | Outcome::Refunded {
                event_id, replayed, ..
            } => {
                event_id.clear();
                *replayed = false;
            }
            Outcome::Held {
                event_id,
                hold_id,
                replayed,
                ..
            } => {
                event_id.clear();
                hold_id.clear();
                *replayed = false;
            }
            _ => {}
        }
        o
    }

    pub fn replayed(&self) -> bool {
        match self {
            Outcome::Granted { replayed, .. }
            | Outcome::Debited { replayed, .. }
            | Outcome::Held { replayed, .. }
            | Outcome::Ended { replayed, .. }
            | Outcome::Refunded { replayed, .. } => *replayed,
            _ => false,
        }
    }

    pub fn with_replayed(&self) -> Self {
        let mut o = self.clone();
        match &mut o {
            Outcome::Granted { replayed, .. }
            | Outcome::Debited { replayed, .. }
            | Outcome::Held { replayed, .. }
            | Outcome::Ended { replayed, .. }
            | Outcome::Refunded { replayed, .. } => *replayed = true,
            _ => {}
        }
        o
    }

    pub fn event_id(&self) -> Option<&str> {
        match self {
            Outcome::Granted { event_id, .. }
            | Outcome::Debited { event_id, .. }
            | Outcome::Held { event_id, .. }
            | Outcome::Ended { event_id, .. }
            | Outcome::Refunded { event_id, .. } => Some(event_id),
            _ => None,
        }
    }
}

fn from_error(err: LedgerError) -> Outcome {
    match err {
        LedgerError::Refused(r) => Outcome::Refused(r),
        LedgerError::InvalidArgument(v) => Outcome::Invalid(v[0].field.clone()),
        LedgerError::NotFound(what) => Outcome::NotFound(what),
        other => Outcome::Failed(other.to_string()),
    }
}

pub fn granted(r: Result<GrantOutcome, LedgerError>) -> Outcome {
    match r {
        Ok(o) => Outcome::Granted {
            event_id: o.event_id,
            lot_id: o.lot_id,
            available: o.available,
            replayed: o.replayed,
        },
        Err(e) => from_error(e),
    }
}

pub fn debited(r: Result<DebitOutcome, LedgerError>) -> Outcome {
    match r {
        Ok(o) => Outcome::Debited {
            event_id: o.event_id,
            amount: o.amount,
            available: o.available,
            held: o.held,
            replayed: o.replayed,
        },
        Err(e) => from_error(e),
    }
}

pub fn held(r: Result<HoldOutcome, LedgerError>) -> Outcome {
    match r {
        Ok(o) => Outcome::Held {
            event_id: o.event_id,
            hold_id: o.hold_id,
            amount: o.amount,
            expires_at_ms: o.expires_at_ms,
            available: o.available,
            held: o.held,
            replayed: o.replayed,
        },
        Err(e) => from_error(e),
    }
}

pub fn ended(r: Result<EndHoldOutcome, LedgerError>) -> Outcome {
    match r {
        Ok(o) => Outcome::Ended {
            event_id: o.event_id,
            captured: o.captured,
            released: o.released,
            available: o.available,
            held: o.held,
            replayed: o.replayed,
        },
        Err(e) => from_error(e),
    }
}

pub fn refunded(r: Result<RefundOutcome, LedgerError>) -> Outcome {
    match r {
        Ok(o) => Outcome::Refunded {
            event_id: o.event_id,
            refunded: o.refunded,
            refunded_total: o.refunded_total,
            available: o.available,
            expired: o.expired,
            replayed: o.replayed,
        },
        Err(e) => from_error(e),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelLot {
    pub amount: i64,
    pub remaining: i64,
    pub held: i64,
    pub priority: u8,
    /// 0 = never.
    pub expires_at_ms: i64,
    pub kind: String,
    pub description: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// In the burn index (not yet expired).
    pub listed: bool,
}

impl ModelLot {
    pub fn score(&self) -> i64 {
        i64::from(self.priority) * PRIORITY_UNIT
            + if self.expires_at_ms == 0 {
                NEVER
            } else {
                self.expires_at_ms
            }
    }
}

#[derive(Debug, Clone, Default)]
pub struct ModelWallet {
    pub lots: BTreeMap<String, ModelLot>,
    pub seq: u64,
    pub granted: i64,
    pub used: i64,
    pub expired: i64,
    pub refunded: i64,
    pub adjusted: i64,
    pub held: i64,
    pub demo: bool,
}

impl ModelWallet {
    pub fn available(&self) -> i64 {
        self.lots.values().map(|l| l.remaining).sum()
    }

    /// Listed lots in burn order: score, then lot id.
    fn burn_order(&self) -> Vec<String> {
        let mut ids: Vec<(i64, String)> = self
            .lots
            .iter()
            .filter(|(_, l)| l.listed)
            .map(|(id, l)| (l.score(), id.clone()))
            .collect();
        ids.sort();
        ids.into_iter().map(|(_, id)| id).collect()
    }

    fn maybe_drop(&mut self, id: &str) {
        if let Some(l) = self.lots.get(id) {
            if l.remaining <= 0 && l.held <= 0 {
                self.lots.remove(id);
            }
        }
    }

    fn add_lot(
        &mut self,
        now: i64,
        amount: i64,
        kind: &str,
        priority: u8,
        expires_at_ms: i64,
        description: &str,
    ) -> String {
        self.seq += 1;
        let id = format!("{:08}", self.seq);
        self.lots.insert(
            id.clone(),
            ModelLot {
                amount,
                remaining: amount,
                held: 0,
                priority,
                expires_at_ms,
                kind: kind.to_owned(),
                description: description.to_owned(),
                created_at_ms: now,
                updated_at_ms: now,
                listed: true,
            },
        );
        id
    }

    /// Draws in burn order; returns (lot id, amount, score) pieces.
    fn draw(&mut self, now: i64, amount: i64, for_hold: bool) -> Vec<(String, i64, i64)> {
        let mut need = amount;
        let mut pieces = Vec::new();
        for id in self.burn_order() {
            if need == 0 {
                break;
            }
            let lot = self.lots.get_mut(&id).expect("listed lot");
            if lot.remaining <= 0 {
                continue;
            }
            let take = lot.remaining.min(need);
            lot.remaining -= take;
            lot.updated_at_ms = now;
            if for_hold {
                lot.held += take;
            }
            need -= take;
            pieces.push((id.clone(), take, lot.score()));
            if !for_hold {
                self.maybe_drop(&id);
            }
        }
        assert_eq!(need, 0, "model: lots do not cover available");
        pieces
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldState {
    Active,
    Ended(HoldEnd, i64),
}

#[derive(Debug, Clone)]
pub struct ModelHold {
    pub account: String,
    pub wallet: String,
    pub amount: i64,
    pub pieces: Vec<(String, i64, i64)>,
    pub deadline_ms: i64,
    pub capture_on_expiry: bool,
    pub state: HoldState,
}

#[derive(Debug, Clone)]
pub struct ModelCharge {
    pub account: String,
    pub wallet: String,
    pub amount: i64,
    pub refunded: i64,
    pub pieces: Vec<(String, i64, i64)>,
}

/// Limits the model enforces (mirror the ledger settings of the test).
#[derive(Debug, Clone, Copy)]
pub struct ModelLimits {
    pub lots_per_wallet_max: usize,
    pub wallets_per_account_max: usize,
    pub holds_per_wallet_max: usize,
}

/// What the model expects of one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// A fresh answer (ids blank); `remember` says whether it is stored under its key.
    Fresh { outcome: Outcome, remember: bool },
    /// The answer first given for this key, replayed.
    Replay(Outcome),
}

type IdemKey = (String, String);

pub struct Model {
    pub wallets: BTreeMap<(String, String), ModelWallet>,
    /// Wallets per account with a grant, a positive adjustment or a refund back into lots
    /// (the account's wallet set), less the dead ones that left it at the cap.
    pub wallet_sets: BTreeMap<String, Vec<String>>,
    /// How many dead wallets left a wallet set at the cap (coverage).
    pub wallets_retired: usize,
    pub holds: HashMap<String, ModelHold>,
    pub charges: HashMap<String, ModelCharge>,
    /// (account, key) -> (parameters, first real answer).
    pub idempotency: HashMap<IdemKey, (String, Outcome)>,
    pub limits: ModelLimits,
}

impl Model {
    pub fn new(limits: ModelLimits) -> Self {
        Self {
            wallets: BTreeMap::new(),
            wallet_sets: BTreeMap::new(),
            wallets_retired: 0,
            holds: HashMap::new(),
            charges: HashMap::new(),
            idempotency: HashMap::new(),
            limits,
        }
    }

    fn wallet(&mut self, account: &str, wallet: &str) -> &mut ModelWallet {
        self.wallets
            .entry((account.to_owned(), wallet.to_owned()))
            .or_default()
    }

    fn recall(&self, account: &str, key: &str, params: &str) -> Option<Expect> {
        let (first_params, first) = self
            .idempotency
            .get(&(account.to_owned(), key.to_owned()))?;
        Some(if first_params == params {
            Expect::Replay(first.with_replayed())
        } else {
            Expect::Fresh {
                outcome: Outcome::Refused(Refusal::IdempotencyKeyReused),
                remember: false,
            }
        })
    }

    /// Records the real first answer under its key (after the caller checked it).
    pub fn remember(&mut self, account: &str, key: &str, params: &str, real: &Outcome) {
        self.idempotency.insert(
            (account.to_owned(), key.to_owned()),
            (params.to_owned(), real.clone()),
        );
    }

    /// Lazy expiry of one wallet: lots past expiry, then holds past their deadline.
    pub fn settle_due(&mut self, now: i64, account: &str, wallet: &str) {
        let w = self.wallet(account, wallet);
        let due: Vec<String> = w
            .lots
            .iter()
            .filter(|(_, l)| l.listed && l.expires_at_ms != 0 && l.expires_at_ms <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let lot = w.lots.get_mut(&id).expect("lot");
            lot.listed = false;
            if lot.remaining > 0 {
                w.expired += lot.remaining;
                lot.remaining = 0;
                lot.updated_at_ms = now;
            }
            w.maybe_drop(&id);
        }
        let mut due_holds: Vec<(i64, String)> = self
            .holds
            .iter()
            .filter(|(_, h)| {
                h.account == account
                    && h.wallet == wallet
                    && h.state == HoldState::Active
                    && h.deadline_ms <= now
            })
            .map(|(id, h)| (h.deadline_ms, id.clone()))
            .collect();
        due_holds.sort();
        for (_, hold_id) in due_holds {
            let hold = self.holds.get(&hold_id).expect("hold").clone();
            let capture = if hold.capture_on_expiry {
                hold.amount
            } else {
                0
            };
            self.end_hold(now, &hold_id, capture, HoldEnd::Expired);
        }
    }

    /// Ends a hold; returns what was captured and the charge it makes, if any.
    fn end_hold(
        &mut self,
        now: i64,
        hold_id: &str,
        capture: i64,
        how: HoldEnd,
    ) -> Option<ModelCharge> {
        let hold = self.holds.get(hold_id).expect("hold").clone();
        let w = self.wallet(&hold.account, &hold.wallet);
        let mut left = capture;
        let mut charged = Vec::new();
        let mut lapsed = 0;
        for (id, a, score) in &hold.pieces {
            let c = left.min(*a);
            left -= c;
            let back = a - c;
            if c > 0 {
                charged.push((id.clone(), c, *score));
            }
            let lot = w.lots.get_mut(id).expect("held lot record");
            lot.held -= a;
            lot.updated_at_ms = now;
            if back > 0 {
                let exp = score % PRIORITY_UNIT;
                if exp != NEVER && exp <= now {
                    lapsed += back;
                } else {
                    lot.remaining += back;
                }
            }
            w.maybe_drop(id);
        }
        w.held -= hold.amount;
        w.used += capture;
        w.expired += lapsed;
        if let Some(h) = self.holds.get_mut(hold_id) {
            h.state = HoldState::Ended(how, capture);
        }
        (capture > 0).then(|| ModelCharge {
            account: hold.account.clone(),
            wallet: hold.wallet.clone(),
            amount: capture,
            refunded: 0,
            pieces: charged,
        })
    }

    fn in_wallet_set(&self, account: &str, wallet: &str) -> bool {
        self.wallet_sets
            .get(account)
            .is_some_and(|s| s.iter().any(|w| w == wallet))
    }

    /// Whether a wallet outside the account's set is refused for the cap. At the cap,
    /// every wallet of the set has what is due in it ended, and the dead ones (no lot
    /// record, no open hold) leave the set first (lib.lua `wallet_set_refuses`); their
    /// totals stay, and they rejoin when used again.
    fn wallet_set_full(&mut self, now: i64, account: &str, wallet: &str) -> bool {
        let max = self.limits.wallets_per_account_max;
        if self.in_wallet_set(account, wallet)
            || self.wallet_sets.get(account).map_or(0, Vec::len) < max
        {
            return false;
        }
        let mut names = self.wallet_sets.get(account).cloned().unwrap_or_default();
        names.sort();
        for name in &names {
            self.settle_due(now, account, name);
        }
        let dead: Vec<String> = names
            .into_iter()
            .filter(|name| {
                let open = self.holds.values().any(|h| {
                    h.account == account && h.wallet == *name && h.state == HoldState::Active
                });
                let w = self.wallets.get(&(account.to_owned(), name.clone()));
                !open && w.is_none_or(|w| w.lots.is_empty() && w.held == 0)
            })
            .collect();
        if !dead.is_empty() {
            self.wallets_retired += dead.len();
            if let Some(set) = self.wallet_sets.get_mut(account) {
                set.retain(|name| !dead.contains(name));
            }
        }
        self.wallet_sets.get(account).map_or(0, Vec::len) >= max
    }

    fn add_to_wallet_set(&mut self, account: &str, wallet: &str) {
        if !self.in_wallet_set(account, wallet) {
            self.wallet_sets
                .entry(account.to_owned())
                .or_default()
                .push(wallet.to_owned());
        }
    }

    fn listed_lots(&mut self, account: &str, wallet: &str) -> usize {
        self.wallet(account, wallet)
            .lots
            .values()
            .filter(|l| l.listed)
            .count()
    }

    #[allow(clippy::too_many_arguments)]
    pub fn grant(
        &mut self,
        now: i64,
        account: &str,
        wallet: &str,
        amount: i64,
        kind: &str,
        priority: u8,
        expires_at_ms: i64,
        key: &str,
        params: &str,
    ) -> Expect {
        if let Some(e) = self.recall(account, key, params) {
            return e;
        }
        if expires_at_ms != 0 && expires_at_ms <= now {
            return Expect::Fresh {
                outcome: Outcome::Invalid("expires_at_ms".into()),
                remember: false,
            };
        }
        self.settle_due(now, account, wallet);
        let refusal = if kind == "demo" && self.wallet(account, wallet).demo {
            Some(Refusal::DemoAlreadyGranted)
        } else if self.listed_lots(account, wallet) >= self.limits.lots_per_wallet_max {
            Some(Refusal::LotLimit {
                max: self.limits.lots_per_wallet_max as i64,
            })
        } else if self.wallet_set_full(now, account, wallet) {
            Some(Refusal::WalletLimit {
                max: self.limits.wallets_per_account_max as i64,
            })
        } else {
            None
        };
        if let Some(r) = refusal {
            return Expect::Fresh {
                outcome: Outcome::Refused(r),
                remember: true,
            };
        }
        self.add_to_wallet_set(account, wallet);
        let w = self.wallet(account, wallet);
        if kind == "demo" {
            w.demo = true;
        }
        let lot_id = w.add_lot(now, amount, kind, priority, expires_at_ms, "");
        w.granted += amount;
        Expect::Fresh {
            outcome: Outcome::Granted {
                event_id: String::new(),
                lot_id,
                available: w.available(),
                replayed: false,
            },
            remember: true,
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn adjust(
        &mut self,
        now: i64,
        account: &str,
        wallet: &str,
        amount: i64,
        priority: u8,
        expires_at_ms: i64,
        key: &str,
        params: &str,
    ) -> Expect {
        if let Some(e) = self.recall(account, key, params) {
            return e;
        }
        if amount > 0 && expires_at_ms != 0 && expires_at_ms <= now {
            return Expect::Fresh {
                outcome: Outcome::Invalid("expires_at_ms".into()),
                remember: false,
            };
        }
        self.settle_due(now, account, wallet);
        if amount > 0 {
            let refusal = if self.listed_lots(account, wallet) >= self.limits.lots_per_wallet_max {
                Some(Refusal::LotLimit {
                    max: self.limits.lots_per_wallet_max as i64,
                })
            } else if self.wallet_set_full(now, account, wallet) {
                Some(Refusal::WalletLimit {
                    max: self.limits.wallets_per_account_max as i64,
                })
            } else {
                None
            };
            if let Some(r) = refusal {
                return Expect::Fresh {
                    outcome: Outcome::Refused(r),
                    remember: true,
                };
            }
            self.add_to_wallet_set(account, wallet);
            let w = self.wallet(account, wallet);
            let lot_id = w.add_lot(now, amount, "adjustment", priority, expires_at_ms, "");
            w.adjusted += amount;
            return Expect::Fresh {
                outcome: Outcome::Granted {
                    event_id: String::new(),
                    lot_id,
                    available: w.available(),
                    replayed: false,
                },
                remember: true,
            };
        }
        let w = self.wallet(account, wallet);
        let available = w.available();
        if available < -amount {
            return Expect::Fresh {
                outcome: Outcome::Refused(Refusal::InsufficientCredits {
                    required: -amount,
                    available,
                }),
                remember: true,
            };
        }
        w.draw(now, -amount, false);
        w.adjusted += amount;
        Expect::Fresh {
            outcome: Outcome::Granted {
                event_id: String::new(),
                lot_id: String::new(),
                available: w.available(),
                replayed: false,
            },
            remember: true,
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn debit(
        &mut self,
        now: i64,
        account: &str,
        wallet: &str,
        amount: i64,
        key: &str,
        params: &str,
        real: &Outcome,
    ) -> Expect {
        if let Some(e) = self.recall(account, key, params) {
            return e;
        }
        self.settle_due(now, account, wallet);
        let w = self.wallet(account, wallet);
        let available = w.available();
        if available < amount {
            return Expect::Fresh {
                outcome: Outcome::Refused(Refusal::InsufficientCredits {
                    required: amount,
                    available,
                }),
                remember: true,
            };
        }
        let pieces = w.draw(now, amount, false);
        w.used += amount;
        let outcome = Outcome::Debited {
            event_id: String::new(),
            amount,
            available: w.available(),
            held: w.held,
            replayed: false,
        };
        if let Some(id) = real.event_id() {
            self.charges.insert(
                id.to_owned(),
                ModelCharge {
                    account: account.to_owned(),
                    wallet: wallet.to_owned(),
                    amount,
                    refunded: 0,
                    pieces,
                },
            );
        }
        Expect::Fresh {
            outcome,
            remember: true,
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn authorize(
        &mut self,
        now: i64,
        account: &str,
        wallet: &str,
        amount: i64,
        ttl_ms: i64,
        capture_on_expiry: bool,
        key: &str,
        params: &str,
        real: &Outcome,
    ) -> Expect {
        if let Some(e) = self.recall(account, key, params) {
            return e;
        }
        self.settle_due(now, account, wallet);
        let open_holds = self
            .holds
            .values()
            .filter(|h| h.account == account && h.wallet == wallet && h.state == HoldState::Active)
            .count();
        let holds_max = self.limits.holds_per_wallet_max;
        let w = self.wallet(account, wallet);
        let available = w.available();
        if available < amount {
            return Expect::Fresh {
                outcome: Outcome::Refused(Refusal::InsufficientCredits {
                    required: amount,
                    available,
                }),
                remember: true,
            };
        }
        if open_holds >= holds_max {
            return Expect::Fresh {
                outcome: Outcome::Refused(Refusal::HoldLimit {
                    max: holds_max as i64,
                }),
                remember: true,
            };
        }
        let pieces = w.draw(now, amount, true);
        w.held += amount;
        let outcome = Outcome::Held {
            event_id: String::new(),
            hold_id: String::new(),
            amount,
            expires_at_ms: now + ttl_ms,
            available: w.available(),
            held: w.held,
            replayed: false,
        };
        if let Outcome::Held { hold_id, .. } = real {
            self.holds.insert(
                hold_id.clone(),
                ModelHold {
                    account: account.to_owned(),
                    wallet: wallet.to_owned(),
                    amount,
                    pieces,
                    deadline_ms: now + ttl_ms,
                    capture_on_expiry,
                    state: HoldState::Active,
                },
            );
        }
        Expect::Fresh {
            outcome,
            remember: true,
        }
    }

    /// Capture (`capture = Some(amount or None for all)`) or Release (`capture = None`).
    pub fn end(
        &mut self,
        now: i64,
        hold_id: &str,
        capture: Option<Option<i64>>,
        key: &str,
        params: &str,
        real: &Outcome,
    ) -> Expect {
        let Some(hold) = self.holds.get(hold_id).cloned() else {
            return Expect::Fresh {
                outcome: Outcome::NotFound("hold"),
                remember: false,
            };
        };
        if let Some(e) = self.recall(&hold.account, key, params) {
            return e;
        }
        self.settle_due(now, &hold.account, &hold.wallet);
        let hold = self.holds.get(hold_id).expect("hold").clone();
        if let HoldState::Ended(how, captured) = hold.state {
            return Expect::Fresh {
                outcome: Outcome::Refused(Refusal::HoldEnded { how, captured }),
                remember: true,
            };
        }
        let amount = match capture {
            Some(Some(a)) => a,
            Some(None) => hold.amount,
            None => 0,
        };
        if amount > hold.amount {
            return Expect::Fresh {
                outcome: Outcome::Invalid("amount".into()),
                remember: false,
            };
        }
        let how = if capture.is_some() {
            HoldEnd::Captured
        } else {
            HoldEnd::Released
        };
        let charge = self.end_hold(now, hold_id, amount, how);
        if let (Some(charge), Some(id)) = (charge, real.event_id()) {
            self.charges.insert(id.to_owned(), charge);
        }
        let w = self.wallet(&hold.account, &hold.wallet);
        Expect::Fresh {
            outcome: Outcome::Ended {
                event_id: String::new(),
                captured: amount,
                released: hold.amount - amount,
                available: w.available(),
                held: w.held,
                replayed: false,
            },
            remember: true,
        }
    }

    pub fn refund(
        &mut self,
        now: i64,
        charge_id: &str,
        amount: i64,
        key: &str,
        params: &str,
    ) -> Expect {
        let Some(charge) = self.charges.get(charge_id).cloned() else {
            return Expect::Fresh {
                outcome: Outcome::NotFound("charge"),
                remember: false,
            };
        };
        if let Some(e) = self.recall(&charge.account, key, params) {
            return e;
        }
        self.settle_due(now, &charge.account, &charge.wallet);
        let refundable = charge.amount - charge.refunded;
        if amount > refundable {
            return Expect::Fresh {
                outcome: Outcome::Refused(Refusal::RefundExceedsCharge { refundable }),
                remember: true,
            };
        }
        let mut skip = charge.refunded;
        let mut need = amount;
        let mut expired = 0;
        let mut groups: Vec<(i64, i64)> = Vec::new();
        for (_, a, score) in charge.pieces.iter().rev() {
            let s = skip.min(*a);
            skip -= s;
            let a = a - s;
            let take = need.min(a);
            if take == 0 {
                continue;
            }
            need -= take;
            let exp = score % PRIORITY_UNIT;
            if exp != NEVER && exp <= now {
                expired += take;
            } else if let Some(g) = groups.iter_mut().find(|(sc, _)| sc == score) {
                g.1 += take;
            } else {
                groups.push((*score, take));
            }
        }
        let lots_max = self.limits.lots_per_wallet_max;
        if !groups.is_empty()
            && self.listed_lots(&charge.account, &charge.wallet) + groups.len() > lots_max
        {
            return Expect::Fresh {
                outcome: Outcome::Refused(Refusal::LotLimit {
                    max: lots_max as i64,
                }),
                remember: true,
            };
        }
        if !groups.is_empty() {
            // Credits back in lots: the wallet is live, back in its set past the cap.
            self.add_to_wallet_set(&charge.account, &charge.wallet);
        }
        let w = self.wallet(&charge.account, &charge.wallet);
        for (score, a) in groups {
            let priority = u8::try_from(score / PRIORITY_UNIT).expect("priority");
            let exp = match score % PRIORITY_UNIT {
                NEVER => 0,
                e => e,
            };
            w.add_lot(
                now,
                a,
                "refund",
                priority,
                exp,
                &format!("refund of {charge_id}"),
            );
        }
        w.expired += expired;
        w.refunded += amount;
        let available = w.available();
        let c = self.charges.get_mut(charge_id).expect("charge");
        c.refunded += amount;
        Expect::Fresh {
            outcome: Outcome::Refunded {
                event_id: String::new(),
                refunded: amount,
                refunded_total: c.refunded,
                available,
                expired,
                replayed: false,
            },
            remember: true,
        }
    }

    /// GetBalance settles what is due, like the script.
    pub fn balance(&mut self, now: i64, account: &str) -> Vec<WalletBalance> {
        let mut wallets = self.wallet_sets.get(account).cloned().unwrap_or_default();
        wallets.sort();
        wallets
            .into_iter()
            .map(|wallet| {
                self.settle_due(now, account, &wallet);
                let w = self.wallet(account, &wallet);
                WalletBalance {
                    wallet,
                    available: w.available(),
                    held: w.held,
                    granted: w.granted,
                    used: w.used,
                    expired: w.expired,
                    refunded: w.refunded,
                    adjusted: w.adjusted,
                }
            })
            .collect()
    }

    /// What the sweeper does: settle every wallet.
    pub fn sweep(&mut self, now: i64) {
        let keys: Vec<(String, String)> = self.wallets.keys().cloned().collect();
        for (a, w) in keys {
            self.settle_due(now, &a, &w);
        }
    }

    /// A wallet's lots as ListLots shows them: (lot id, lot). The listed ones in burn
    /// order, then the expired ones that open holds still hold credits of (their record
    /// lives on), by expiry.
    pub fn lots(&mut self, account: &str, wallet: &str) -> Vec<(String, ModelLot)> {
        let w = self.wallet(account, wallet);
        let mut expired: Vec<(i64, String)> = w
            .lots
            .iter()
            .filter(|(_, l)| !l.listed)
            .map(|(id, l)| (l.expires_at_ms, id.clone()))
            .collect();
        expired.sort();
        w.burn_order()
            .into_iter()
            .chain(expired.into_iter().map(|(_, id)| id))
            .map(|id| (id.clone(), w.lots[&id].clone()))
            .collect()
    }
}

/// Rebuilds wallets from outbox events and checks every invariant event by event.
#[derive(Default)]
pub struct Replayer {
    pub wallets: BTreeMap<(String, String), ReplayWallet>,
    holds: HashMap<String, (i64, bool)>,
    charges: HashMap<String, (i64, i64)>,
}

#[derive(Debug, Default, Clone)]
pub struct ReplayWallet {
    pub lots: BTreeMap<String, (i64, i64)>,
    pub granted: i64,
    pub used: i64,
    pub expired: i64,
    pub refunded: i64,
    pub adjusted: i64,
    pub held: i64,
}

impl ReplayWallet {
    pub fn available(&self) -> i64 {
        self.lots.values().map(|(r, _)| r).sum()
    }
}

impl Replayer {
    /// Applies one event; panics with the event on any broken invariant.
    pub fn apply(&mut self, e: &LedgerEvent) {
        let w = self
            .wallets
            .entry((e.account_id.clone(), e.wallet.clone()))
            .or_default();
        let take = |w: &mut ReplayWallet, pieces: &[LotPiece], into_hold: bool| {
            for p in pieces {
                let lot = w
                    .lots
                    .get_mut(&p.lot_id)
                    .unwrap_or_else(|| panic!("draw from unknown lot in {e:?}"));
                lot.0 -= p.amount;
                assert!(lot.0 >= 0, "lot remaining negative after {e:?}");
                if into_hold {
                    lot.1 += p.amount;
                }
            }
        };
        let create = |w: &mut ReplayWallet, pieces: &[LotPiece]| {
            for p in pieces {
                assert!(
                    w.lots.insert(p.lot_id.clone(), (p.amount, 0)).is_none() || p.amount == 0,
                    "lot created twice in {e:?}"
                );
            }
        };
        let sum = |pieces: &[LotPiece]| pieces.iter().map(|p| p.amount).sum::<i64>();
        match e.kind {
            EventKind::Grant => {
                create(w, &e.lots);
                w.granted += e.amount;
            }
            EventKind::Adjust if e.amount > 0 => {
                create(w, &e.lots);
                w.adjusted += e.amount;
            }
            EventKind::Adjust => {
                assert_eq!(sum(&e.lots), -e.amount, "{e:?}");
                take(w, &e.lots, false);
                w.adjusted += e.amount;
            }
            EventKind::Debit => {
                assert_eq!(sum(&e.lots), e.amount, "{e:?}");
                take(w, &e.lots, false);
                w.used += e.amount;
                self.charges.insert(e.event_id.clone(), (e.amount, 0));
            }
            EventKind::Hold => {
                assert_eq!(sum(&e.lots), e.amount, "{e:?}");
                take(w, &e.lots, true);
                w.held += e.amount;
                assert!(
                    self.holds
                        .insert(e.hold_id.clone(), (e.amount, true))
                        .is_none(),
                    "hold placed twice: {e:?}"
                );
            }
            EventKind::Capture | EventKind::Release | EventKind::ExpireHold => {
                let hold = self
                    .holds
                    .get_mut(&e.hold_id)
                    .unwrap_or_else(|| panic!("end of unknown hold {e:?}"));
                assert!(hold.1, "hold ended twice: {e:?}");
                hold.1 = false;
                let charged = e.lots.clone();
                let returned = e.returned_lots();
                assert_eq!(sum(&charged) + sum(&returned), hold.0, "{e:?}");
                for p in charged.iter().chain(&returned) {
                    let lot = w.lots.get_mut(&p.lot_id).expect("held lot");
                    lot.1 -= p.amount;
                    assert!(lot.1 >= 0, "lot held negative: {e:?}");
                }
                for p in &returned {
                    w.lots.get_mut(&p.lot_id).expect("lot").0 += p.amount;
                }
                w.held -= hold.0;
                w.used += sum(&charged);
                if sum(&charged) > 0 {
                    self.charges.insert(e.event_id.clone(), (sum(&charged), 0));
                }
            }
            EventKind::ExpireLot => {
                for p in &e.lots {
                    let lot = w.lots.get_mut(&p.lot_id).expect("expired lot");
                    lot.0 -= p.amount;
                    assert!(lot.0 >= 0, "expired more than remained: {e:?}");
                }
                w.expired += e.amount;
            }
            // Organization events move no credits.
            EventKind::Member | EventKind::Allocate | EventKind::Budget => {}
            EventKind::Refund => {
                let charge = self
                    .charges
                    .get_mut(&e.charge_id)
                    .unwrap_or_else(|| panic!("refund of unknown charge {e:?}"));
                charge.1 += e.amount;
                assert!(charge.1 <= charge.0, "refunded more than charged: {e:?}");
                create(w, &e.lots);
                let expired: i64 = e.extra.parse().expect("refund extra");
                assert_eq!(sum(&e.lots) + expired, e.amount, "{e:?}");
                w.expired += expired;
                w.refunded += e.amount;
            }
        }
        w.lots.retain(|_, (r, h)| *r > 0 || *h > 0);
        assert_eq!(w.available(), e.available_after, "available after {e:?}");
        assert_eq!(w.held, e.held_after, "held after {e:?}");
        assert!(
            w.available() >= 0 && w.held >= 0,
            "negative balance at {e:?}"
        );
        assert_eq!(
            w.granted + w.adjusted,
            w.available() + w.held + w.used + w.expired - w.refunded,
            "conservation broken at {e:?}"
        );
    }

    pub fn open_holds(&self) -> usize {
        self.holds.values().filter(|(_, open)| *open).count()
    }
}
