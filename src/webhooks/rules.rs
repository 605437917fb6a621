//! Which webhook deliveries a wallet's newly settled events make. Pure: the settler feeds
//! it one wallet's events in stream order with the wallet's stored alert state, inside the
//! transaction that writes the events.
//!
//! Alerts fire once per crossing and re-arm only when credits are ADDED (grant, positive
//! adjustment, refund) and bring the balance back: `balance.low` when a decrease takes
//! available credits below the wallet's threshold, `balance.exhausted` when a decrease
//! takes them to zero. A hold that is released again does not re-arm them, so a customer
//! hovering at the threshold is told once, not on every request.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::ledger::event::{EventKind, LedgerEvent, LotPiece};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WebhookType {
    BalanceLow = 0,
    BalanceExhausted = 1,
    LotExpiring = 2,
    LotExpired = 3,
    GrantCreated = 4,
}

impl WebhookType {
    pub const ALL: [Self; 5] = [
        Self::BalanceLow,
        Self::BalanceExhausted,
        Self::LotExpiring,
        Self::LotExpired,
        Self::GrantCreated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::BalanceLow => "balance.low",
            Self::BalanceExhausted => "balance.exhausted",
            Self::LotExpiring => "lot.expiring",
            Self::LotExpired => "lot.expired",
            Self::GrantCreated => "grant.created",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == name)
    }
}

/// A low-balance threshold: absolute credits and/or a percent of the last grant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Threshold {
    /// 0 = no absolute bound.
    pub low_balance: i64,
    /// 0 = off.
    pub low_balance_percent: u32,
}

impl Threshold {
    /// Credits below which the wallet is low, given its last grant (0 = never low).
    pub fn credits(&self, last_grant: i64) -> i64 {
        let percent = i128::from(last_grant.max(0)) * i128::from(self.low_balance_percent) / 100;
        self.low_balance.max(percent as i64)
    }
}

/// What the settler applies (from `[webhooks]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    /// Per [`WebhookType`] (by discriminant): delivered or not.
    pub subscribed: [bool; 5],
    pub default_threshold: Threshold,
    /// By wallet name.
    pub wallet_thresholds: BTreeMap<String, Threshold>,
    pub lot_expiring_lead: Duration,
}

impl Rules {
    /// Every webhook type delivered, one low-balance line of `low_balance` credits for
    /// every wallet, `lot.expiring` a minute ahead.
    pub fn every_type_below(low_balance: i64) -> Self {
        Self {
            subscribed: [true; 5],
            default_threshold: Threshold {
                low_balance,
                low_balance_percent: 0,
            },
            wallet_thresholds: BTreeMap::new(),
            lot_expiring_lead: Duration::from_secs(60),
        }
    }

    pub fn subscribed(&self, t: WebhookType) -> bool {
        self.subscribed[t as usize]
    }

    /// The threshold of a wallet: the account's own (set through the Admin API), else the
    /// wallet name's, else the default.
    pub fn threshold(&self, wallet: &str, account_override: Option<Threshold>) -> Threshold {
        account_override
            .or_else(|| self.wallet_thresholds.get(wallet).copied())
            .unwrap_or(self.default_threshold)
    }

    /// Whether expiring lots must be tracked (for `lot.expiring`).
    pub fn tracks_lots(&self) -> bool {
        self.subscribed(WebhookType::LotExpiring)
    }
}

/// A wallet's alert state, stored with its summary in the durable store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WalletState {
    pub available: i64,
    /// Stream position of the newest settled event.
    pub last: (i64, i64),
    pub last_grant: i64,
    pub low_alerted: bool,
    pub exhausted_alerted: bool,
}

/// A delivery to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDelivery {
    pub delivery_id: String,
    pub account_id: String,
    pub wallet: String,
    pub event_type: WebhookType,
    /// Order within the account: (stream ms, stream seq, ordinal within the event).
    pub position: (i64, i64, i64),
    /// The JSON body.
    pub payload: String,
    pub created_at_ms: i64,
}

/// A stable id: the same source always gives the same id, so a receiver can deduplicate
/// retries by it (the body's signed `id`; the `x-tollgate-delivery` header is a copy).
pub fn delivery_id(source: &str) -> String {
    let digest = Sha256::digest(source.as_bytes());
    format!("dlv_{}", hex::encode(&digest[..12]))
}

/// Whether `text` has the shape of a [`delivery_id`]: `dlv_` and 24 lowercase hex digits.
/// Nothing else is looked up: a forged id holding a NUL byte was a store error (PostgreSQL
/// refuses it as text) answered UNAVAILABLE instead of a bad argument.
pub fn is_delivery_id(text: &str) -> bool {
    text.strip_prefix("dlv_").is_some_and(|digits| {
        digits.len() == 24
            && digits
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

fn delivery(e: &LedgerEvent, t: WebhookType, ordinal: i64, data: serde_json::Value) -> NewDelivery {
    let id = delivery_id(&format!("{}/{}", e.event_id, t.as_str()));
    let (ms, seq) = e.stream_position();
    let payload = json!({
        "id": id,
        "type": t.as_str(),
        "created_at_ms": e.created_at_ms,
        "account_id": e.account_id,
        "wallet": e.wallet,
        "data": data,
    });
    NewDelivery {
        delivery_id: id,
        account_id: e.account_id.clone(),
        wallet: e.wallet.clone(),
        event_type: t,
        position: (ms, seq, ordinal),
        payload: payload.to_string(),
        created_at_ms: e.created_at_ms,
    }
}

/// Whether an event adds credits (grant, refund, positive adjustment): what re-arms the
/// balance alerts.
pub fn adds_credits(e: &LedgerEvent) -> bool {
    matches!(e.kind, EventKind::Grant | EventKind::Refund)
        || (e.kind == EventKind::Adjust && e.amount > 0)
}

/// The deliveries one wallet's newly settled events make, and the wallet's state after
/// them. `events` are this wallet's, in stream order. Events older than the stored state
/// (settled late, after a newer one) make only the deliveries that do not depend on the
/// balance before them (`grant.created`, `lot.expired`).
pub fn derive(
    rules: &Rules,
    threshold: Threshold,
    prior: &WalletState,
    events: &[&LedgerEvent],
) -> (Vec<NewDelivery>, WalletState) {
    let mut state = *prior;
    let mut out = Vec::new();
    for e in events {
        let mut ordinal = 0;
        let mut emit = |t: WebhookType, data: serde_json::Value, out: &mut Vec<NewDelivery>| {
            if rules.subscribed(t) {
                out.push(delivery(e, t, ordinal, data));
                ordinal += 1;
            }
        };
        match e.kind {
            EventKind::Grant => {
                let lot = e.lots.first();
                emit(
                    WebhookType::GrantCreated,
                    json!({
                        "event_id": e.event_id,
                        "lot_id": lot.map(|l| l.lot_id.as_str()).unwrap_or(""),
                        "amount": e.amount,
                        "kind": e.extra.split('|').next().unwrap_or(""),
                        "expires_at_ms": lot.and_then(LotPiece::expires_at_ms).unwrap_or(0),
                        "available": e.available_after,
                    }),
                    &mut out,
                );
            }
            EventKind::ExpireLot => {
                emit(
                    WebhookType::LotExpired,
                    json!({
                        "event_id": e.event_id,
                        "lot_id": e.lots.first().map(|l| l.lot_id.as_str()).unwrap_or(""),
                        "amount": e.amount,
                        "available": e.available_after,
                    }),
                    &mut out,
                );
            }
            _ => {}
        }
        let position = e.stream_position();
        if position <= state.last {
            continue;
        }
        if e.kind == EventKind::Grant {
            state.last_grant = e.amount;
        }
        let after = e.available_after;
        // The balance before the first event settled for a wallet: the store has nothing
        // before it. When the wallet's first batch settles after a newer one (several
        // settlers), that is not 0: the events that take credits say it themselves.
        let before = if state.last == (0, 0) {
            match e.kind {
                EventKind::Debit | EventKind::Hold | EventKind::ExpireLot => after + e.amount,
                EventKind::Adjust if e.amount < 0 => after - e.amount,
                _ => state.available,
            }
        } else {
            state.available
        };
        let threshold_credits = threshold.credits(state.last_grant);
        if adds_credits(e) {
            if after >= threshold_credits {
                state.low_alerted = false;
            }
            if after > 0 {
                state.exhausted_alerted = false;
            }
        }
        // A type not subscribed leaves its flag down: a wallet that crossed while
        // `webhooks.events` left it out is told at its next debit once it is added (its
        // flag used to be set all the same, and the crossing never told).
        if after < before {
            if threshold_credits > 0
                && after < threshold_credits
                && !state.low_alerted
                && rules.subscribed(WebhookType::BalanceLow)
            {
                state.low_alerted = true;
                emit(
                    WebhookType::BalanceLow,
                    json!({
                        "event_id": e.event_id,
                        "available": after,
                        "held": e.held_after,
                        "threshold": threshold_credits,
                    }),
                    &mut out,
                );
            }
            if after == 0
                && !state.exhausted_alerted
                && rules.subscribed(WebhookType::BalanceExhausted)
            {
                state.exhausted_alerted = true;
                emit(
                    WebhookType::BalanceExhausted,
                    json!({
                        "event_id": e.event_id,
                        "available": 0,
                        "held": e.held_after,
                    }),
                    &mut out,
                );
            }
        }
        state.available = after;
        state.last = position;
    }
    (out, state)
}

/// A `lot.expiring` delivery for a tracked lot.
pub fn expiring_delivery(
    account_id: &str,
    wallet: &str,
    lot_id: &str,
    expires_at_ms: i64,
    remaining: i64,
    now_ms: i64,
) -> NewDelivery {
    let t = WebhookType::LotExpiring;
    let id = delivery_id(&format!(
        "{}/{account_id}/{wallet}/{lot_id}/{expires_at_ms}",
        t.as_str()
    ));
    let payload = json!({
        "id": id,
        "type": t.as_str(),
        "created_at_ms": now_ms,
        "account_id": account_id,
        "wallet": wallet,
        "data": {
            "lot_id": lot_id,
            "expires_at_ms": expires_at_ms,
            "remaining": remaining,
        },
    });
    NewDelivery {
        delivery_id: id,
        account_id: account_id.to_owned(),
        wallet: wallet.to_owned(),
        event_type: t,
        position: (now_ms, 0, 0),
        payload: payload.to_string(),
        created_at_ms: now_ms,
    }
}

/// How an event changes the credits left in lots that expire (for `lot.expiring`):
/// (lot id, expiry if the event says it, credits). Lots known never to expire are left out.
pub fn lot_deltas(e: &LedgerEvent) -> Vec<(&str, Option<i64>, i64)> {
    let pieces: Vec<(&LotPiece, i64)> = match e.kind {
        EventKind::Grant | EventKind::Refund => e.lots.iter().map(|p| (p, 1)).collect(),
        EventKind::Adjust if e.amount > 0 => e.lots.iter().map(|p| (p, 1)).collect(),
        EventKind::Adjust | EventKind::Debit | EventKind::Hold | EventKind::ExpireLot => {
            e.lots.iter().map(|p| (p, -1)).collect()
        }
        EventKind::Capture | EventKind::Release | EventKind::ExpireHold => {
            return returned(e);
        }
        EventKind::Member | EventKind::Allocate | EventKind::Budget => Vec::new(),
    };
    pieces
        .into_iter()
        .filter(|(p, _)| p.expires_at_ms() != Some(0))
        .map(|(p, sign)| (p.lot_id.as_str(), p.expires_at_ms(), sign * p.amount))
        .collect()
}

fn returned(e: &LedgerEvent) -> Vec<(&str, Option<i64>, i64)> {
    // Returned lots are in `extra` as "id:amount:score,...": parse without owning.
    e.extra
        .split(',')
        .filter(|p| !p.is_empty())
        .filter_map(|piece| {
            let mut parts = piece.split(':');
            let id = parts.next()?;
            let amount: i64 = parts.next()?.parse().ok()?;
            let expires = match parts.next() {
                Some(score) => {
                    let p = LotPiece {
                        lot_id: String::new(),
                        amount,
                        score: Some(score.parse().ok()?),
                    };
                    p.expires_at_ms()
                }
                None => None,
            };
            (expires != Some(0)).then_some((id, expires, amount))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules::every_type_below(20)
    }

    fn event(seq: i64, kind: EventKind, amount: i64, available: i64) -> LedgerEvent {
        LedgerEvent {
            event_id: format!("0-1000-{seq}"),
            stream_id: format!("1000-{seq}"),
            kind,
            account_id: "acct".into(),
            wallet: "default".into(),
            amount,
            available_after: available,
            held_after: 0,
            lots: vec![LotPiece {
                lot_id: "00000001".into(),
                amount,
                score: Some(50 * LotPiece::PRIORITY_UNIT + LotPiece::NEVER),
            }],
            extra: "purchase|".into(),
            hold_id: String::new(),
            charge_id: String::new(),
            idempotency_key: String::new(),
            operation: String::new(),
            metadata: String::new(),
            created_at_ms: 1000,
            version: 1,
            member: String::new(),
            actor: String::new(),
        }
    }

    fn refs_of(events: &[LedgerEvent]) -> Vec<&LedgerEvent> {
        events.iter().collect()
    }

    fn types(out: &[NewDelivery]) -> Vec<&'static str> {
        out.iter().map(|d| d.event_type.as_str()).collect()
    }

    #[test]
    fn low_and_exhausted_fire_once_per_crossing() {
        let rules = rules();
        let t = rules.threshold("default", None);
        let events = [
            event(1, EventKind::Grant, 100, 100),
            event(2, EventKind::Debit, 50, 50),
            event(3, EventKind::Debit, 35, 15),
            event(4, EventKind::Debit, 10, 5),
            event(5, EventKind::Hold, 5, 0),
            event(6, EventKind::Release, 5, 5),
            event(7, EventKind::Hold, 5, 0),
        ];
        let refs: Vec<&LedgerEvent> = events.iter().collect();
        let (out, state) = derive(&rules, t, &WalletState::default(), &refs);
        assert_eq!(
            types(&out),
            ["grant.created", "balance.low", "balance.exhausted"]
        );
        assert!(state.low_alerted && state.exhausted_alerted);
        assert_eq!(state.available, 0);
        // Credits added re-arm both; the same events again (already settled) make nothing.
        let more = [
            event(8, EventKind::Grant, 100, 100),
            event(9, EventKind::Debit, 100, 0),
        ];
        let refs: Vec<&LedgerEvent> = more.iter().collect();
        let (out2, _) = derive(&rules, t, &state, &refs);
        assert_eq!(
            types(&out2),
            ["grant.created", "balance.low", "balance.exhausted"]
        );
        let (late, same) = derive(&rules, t, &state, &[&events[2]]);
        assert!(late.is_empty());
        assert_eq!(same, state);
        // Ids are stable and distinct.
        assert_ne!(out[1].delivery_id, out2[1].delivery_id);
        let again = derive(&rules, t, &WalletState::default(), &refs_of(&events[..3])).0;
        assert_eq!(out[1].delivery_id, again[1].delivery_id);
    }

    /// A crossing while its type is not subscribed (`webhooks.events` leaves it out) does
    /// not mark the wallet alerted: once the type is added, the next debit below the
    /// threshold tells it (it was marked, and never told until a top-up and a new
    /// crossing).
    #[test]
    fn a_crossing_of_a_type_left_out_is_told_once_it_is_subscribed() {
        let mut only_exhausted = rules();
        only_exhausted.subscribed[WebhookType::BalanceLow as usize] = false;
        let t = only_exhausted.threshold("default", None);
        let events = [
            event(1, EventKind::Grant, 100, 100),
            event(2, EventKind::Debit, 90, 10),
        ];
        let (out, state) = derive(
            &only_exhausted,
            t,
            &WalletState::default(),
            &refs_of(&events),
        );
        assert_eq!(types(&out), ["grant.created"]);
        assert!(!state.low_alerted);
        let later = [event(3, EventKind::Debit, 5, 5)];
        let (out, state) = derive(&rules(), t, &state, &refs_of(&later));
        assert_eq!(types(&out), ["balance.low"]);
        assert!(state.low_alerted);
    }

    /// Several settlers: a new wallet's newer batch (the debit) settles before its first
    /// one (the grant). The debit still makes `balance.low`, once.
    #[test]
    fn a_new_wallet_settled_out_of_order_still_alerts() {
        let rules = rules();
        let t = rules.threshold("default", None);
        let grant = event(1, EventKind::Grant, 100, 100);
        let debit = event(2, EventKind::Debit, 95, 5);
        let (newer, state) = derive(&rules, t, &WalletState::default(), &[&debit]);
        assert_eq!(types(&newer), ["balance.low"]);
        let (older, _) = derive(&rules, t, &state, &[&grant]);
        assert_eq!(types(&older), ["grant.created"]);
        // In order: the same deliveries, with the same ids.
        let (in_order, _) = derive(&rules, t, &WalletState::default(), &[&grant, &debit]);
        assert_eq!(types(&in_order), ["grant.created", "balance.low"]);
        assert_eq!(in_order[1].delivery_id, newer[0].delivery_id);
        // A first batch that empties the wallet: exhausted too.
        let empty = event(2, EventKind::Hold, 100, 0);
        let (out, _) = derive(&rules, t, &WalletState::default(), &[&empty]);
        assert_eq!(types(&out), ["balance.low", "balance.exhausted"]);
    }

    #[test]
    fn percent_of_last_grant() {
        let t = Threshold {
            low_balance: 5,
            low_balance_percent: 10,
        };
        assert_eq!(t.credits(0), 5);
        assert_eq!(t.credits(1000), 100);
        assert!(t.credits(i64::MAX) > 0, "no overflow");
        let rules = Rules {
            default_threshold: t,
            ..rules()
        };
        let events = [
            event(1, EventKind::Grant, 1000, 1000),
            event(2, EventKind::Debit, 850, 150),
            event(3, EventKind::Debit, 60, 90),
        ];
        let refs: Vec<&LedgerEvent> = events.iter().collect();
        let (out, _) = derive(&rules, t, &WalletState::default(), &refs);
        assert_eq!(types(&out), ["grant.created", "balance.low"]);
        assert!(out[1].payload.contains("\"threshold\":100"));
    }

    #[test]
    fn unsubscribed_types_are_not_made() {
        let mut rules = rules();
        rules.subscribed[WebhookType::GrantCreated as usize] = false;
        let t = rules.threshold("default", None);
        let events = [event(1, EventKind::Grant, 10, 10)];
        let (out, _) = derive(&rules, t, &WalletState::default(), &[&events[0]]);
        assert!(out.is_empty());
    }

    #[test]
    fn lot_deltas_follow_expiring_lots() {
        let mut grant = event(1, EventKind::Grant, 10, 10);
        grant.lots[0].score = Some(50 * LotPiece::PRIORITY_UNIT + 5000);
        assert_eq!(lot_deltas(&grant), vec![("00000001", Some(5000), 10)]);
        let never = event(2, EventKind::Debit, 3, 7);
        assert!(lot_deltas(&never).is_empty());
        let mut release = event(3, EventKind::Release, 4, 11);
        release.extra = format!("00000002:4:{}", 50 * LotPiece::PRIORITY_UNIT + 9000);
        assert_eq!(lot_deltas(&release), vec![("00000002", Some(9000), 4)]);
        let mut expired = event(4, EventKind::ExpireLot, 6, 0);
        expired.lots[0].score = None;
        assert_eq!(lot_deltas(&expired), vec![("00000001", None, -6)]);
    }
}
