//! tollgate.v1.Metering handlers.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::pb::{self, metering_server::Metering};
use super::status::to_status;
use crate::ledger::command::CREDITS_MAX;
use crate::ledger::event::{EventKind, LedgerEvent};
use crate::ledger::{
    Authorize, Debit, EndHold, FieldViolation, Ledger, LedgerError, LotCursor, OnExpiry, Refund,
    LOTS_PAGE_DEFAULT as LOTS_PAGE_DEFAULT_U32, LOTS_PAGE_MAX,
};
use crate::settle::store::{HistoryQuery, HISTORY_PAGE_MAX};
use crate::settle::{Store, StoreError};

pub struct MeteringService {
    ledger: Arc<Ledger>,
    store: Arc<Store>,
}

impl MeteringService {
    pub fn new(ledger: Arc<Ledger>, store: Arc<Store>) -> Self {
        Self { ledger, store }
    }
}

/// History page size unless asked otherwise.
pub const HISTORY_PAGE_DEFAULT: u32 = 100;

/// What a history page token is bound to: the query it continues (account, wallet,
/// kinds as a set, time window; not the page size), so a token passed with another one
/// is refused, not read as a place in a listing it was never in.
pub fn history_binding(
    account_id: &str,
    wallet: &str,
    kinds: &[EventKind],
    from_ms: i64,
    to_ms: i64,
) -> String {
    let mut names: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
    names.sort_unstable();
    let (kinds, from, to) = (names.join(","), from_ms.to_string(), to_ms.to_string());
    crate::ledger::command::digest(&["history", account_id, wallet, &kinds, &from, &to])
}

/// History page tokens: hex of "<created_at_ms>/<event_id>/<binding>" (opaque to clients;
/// [`history_binding`]).
pub fn history_token(created_at_ms: i64, event_id: &str, binding: &str) -> String {
    hex::encode(format!("{created_at_ms}/{event_id}/{binding}"))
}

/// A history page token's place and binding (`None`: a token of a tollgate from before
/// bindings, "<created_at_ms>/<event_id>", still taken during a rolling upgrade).
pub fn parse_history_token(token: &str) -> Option<(i64, String, Option<String>)> {
    if !token.len().is_multiple_of(2) || token.len() > 256 {
        return None;
    }
    let text = String::from_utf8(hex::decode(token).ok()?).ok()?;
    let mut parts = text.splitn(3, '/');
    let (at, id, binding) = (parts.next()?, parts.next()?, parts.next());
    // Only an event id goes to the store: a forged token's NUL byte was a store error.
    if !crate::ledger::keys::ShardMap::is_event_id(id) {
        return None;
    }
    let binding = token_binding(binding)?;
    Some((at.parse().ok()?, id.to_owned(), binding))
}

/// A page token's binding part (a digest, 16 hex digits): `Some(None)` when the token has
/// none (an older tollgate's, still taken), `None` when it is not one.
pub fn token_binding(part: Option<&str>) -> Option<Option<String>> {
    match part {
        Some(b) if b.len() == 16 && b.bytes().all(|c| c.is_ascii_hexdigit()) => {
            Some(Some(b.to_owned()))
        }
        Some(_) => None,
        None => Some(None),
    }
}

/// The event in user terms. A hold's end that charged nothing (a capture of 0, a release,
/// an expiry by the release policy) is a "release": the whole hold went back.
pub fn user_kind(e: &LedgerEvent) -> &'static str {
    match e.kind {
        EventKind::Grant => "add",
        EventKind::Adjust if e.amount > 0 => "add",
        EventKind::Adjust | EventKind::Debit => "consume",
        EventKind::Capture | EventKind::ExpireHold if e.lots.iter().any(|p| p.amount > 0) => {
            "consume"
        }
        EventKind::Capture | EventKind::ExpireHold | EventKind::Release => "release",
        EventKind::Hold => "hold",
        EventKind::Refund => "refund",
        EventKind::ExpireLot => "expire",
        EventKind::Member => "membership",
        EventKind::Allocate => "allocation",
        EventKind::Budget => "budget",
    }
}

pub fn transaction(e: LedgerEvent) -> pb::Transaction {
    let kind = user_kind(&e).to_owned();
    // A refund's credits whose lot had expired expire at once: in the event's `x` only.
    let expired = match e.kind {
        EventKind::Refund => e.deltas().expired,
        _ => 0,
    };
    pb::Transaction {
        kind,
        expired,
        ledger_kind: e.kind.as_str().to_owned(),
        metadata: serde_json::from_str(&e.metadata).unwrap_or_default(),
        lots: e
            .lots
            .iter()
            .map(|p| pb::LotAmount {
                lot_id: p.lot_id.clone(),
                amount: p.amount,
            })
            .collect(),
        event_id: e.event_id,
        idempotency_key: e.idempotency_key,
        created_at_ms: e.created_at_ms,
        account_id: e.account_id,
        wallet: e.wallet,
        amount: e.amount,
        balance_after: e.available_after,
        held_after: e.held_after,
        operation: e.operation,
        hold_id: e.hold_id,
        charge_id: e.charge_id,
        member_id: e.member,
    }
}

fn store_status(err: StoreError) -> Status {
    crate::log_throttled!(WARN, error = %err, "store unavailable for history");
    match err {
        StoreError::Corrupt(_) => Status::internal("ledger store error"),
        _ => Status::unavailable("ledger store unavailable"),
    }
}

fn invalid(field: &str, description: &str) -> Status {
    to_status(LedgerError::InvalidArgument(vec![FieldViolation::new(
        field,
        description,
    )]))
}

/// What a `kinds` entry may be: one of the ledger's event kinds.
fn kinds_description() -> String {
    let names: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
    format!("each must be one of {}", names.join(", "))
}

/// Where a ListLots page starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LotsFrom {
    /// An offset in listing order: the first page (0), or a token of a tollgate from before
    /// the keyset tokens (`p` and the offset in hex; still taken during a rolling upgrade).
    Offset(u32),
    /// Just after a lot ([`LotCursor`]).
    After(LotCursor),
}

/// What a lots page token is bound to: the account and wallet (as read: empty is
/// "default") of the listing it continues, so a token passed with another account or
/// wallet is refused, not read as a place in a listing it was never in.
fn lots_binding(account_id: &str, wallet: &str) -> String {
    let wallet = crate::ledger::command::wallet_str_or_default(wallet);
    crate::ledger::command::digest(&["lots", account_id, wallet])
}

/// Lots page tokens, opaque to clients: "c" and the hex of
/// "<l|x>/<score>/<lot id>/<binding>" (the cursor just after the page's last lot).
pub fn lots_token(account_id: &str, wallet: &str, cursor: &LotCursor) -> String {
    let index = if cursor.expired { "x" } else { "l" };
    let text = format!(
        "{index}/{}/{}/{}",
        cursor.score,
        cursor.lot_id,
        lots_binding(account_id, wallet)
    );
    format!("c{}", hex::encode(text))
}

/// Why a lots page token is refused (`page_token`'s description).
pub const FOREIGN_TOKEN: &str = "was returned for another account or wallet";
pub const UNKNOWN_TOKEN: &str = "is not a token this API returned";
/// Why a history page token is refused: the query's other fields changed.
pub const HISTORY_FOREIGN_TOKEN: &str =
    "was returned for another query (account_id, wallet, kinds, from_ms and to_ms must be those of the first page)";

/// A lots page token as [`lots_token`] (or an older tollgate) wrote it, for this account
/// and wallet; else what is wrong with it.
pub fn parse_lots_token(
    token: &str,
    account_id: &str,
    wallet: &str,
) -> Result<LotsFrom, &'static str> {
    if token.is_empty() {
        return Ok(LotsFrom::Offset(0));
    }
    if let Some(offset) = token.strip_prefix('p') {
        return u32::from_str_radix(offset, 16)
            .map(LotsFrom::Offset)
            .map_err(|_| UNKNOWN_TOKEN);
    }
    let parse = || -> Option<(LotCursor, String)> {
        let text = token.strip_prefix('c').filter(|t| t.len() <= 256)?;
        let text = String::from_utf8(hex::decode(text).ok()?).ok()?;
        let mut parts = text.split('/');
        let expired = match parts.next()? {
            "l" => false,
            "x" => true,
            _ => return None,
        };
        let score: i64 = parts.next()?.parse().ok()?;
        let lot_id = parts.next()?;
        let binding = parts.next()?;
        let lot_id_shaped =
            (1..=20).contains(&lot_id.len()) && lot_id.bytes().all(|b| b.is_ascii_digit());
        if parts.next().is_some() || !lot_id_shaped || !(0..=CREDITS_MAX).contains(&score) {
            return None;
        }
        let cursor = LotCursor {
            expired,
            score,
            lot_id: lot_id.to_owned(),
        };
        Some((cursor, binding.to_owned()))
    };
    let (cursor, binding) = parse().ok_or(UNKNOWN_TOKEN)?;
    if binding != lots_binding(account_id, wallet) {
        return Err(FOREIGN_TOKEN);
    }
    Ok(LotsFrom::After(cursor))
}

#[tonic::async_trait]
impl Metering for MeteringService {
    async fn debit(
        &self,
        request: Request<pb::DebitRequest>,
    ) -> Result<Response<pb::DebitResponse>, Status> {
        let r = request.into_inner();
        let cmd = Debit {
            account_id: r.account_id,
            wallet: r.wallet,
            amount: r.amount,
            idempotency_key: r.idempotency_key,
            operation: r.operation,
            metadata: super::metadata(r.metadata),
            member_id: r.member_id,
            price_inputs: None,
            attempt_mark: None,
        }
        .normalized();
        let out = self.ledger.debit(&cmd).await.map_err(to_status)?;
        Ok(Response::new(pb::DebitResponse {
            spendable: out.remaining(),
            charge_id: out.event_id.clone(),
            event_id: out.event_id,
            amount: out.amount,
            available: out.available,
            held: out.held,
            replayed: out.replayed,
        }))
    }

    async fn authorize(
        &self,
        request: Request<pb::AuthorizeRequest>,
    ) -> Result<Response<pb::AuthorizeResponse>, Status> {
        let r = request.into_inner();
        let on_expiry = OnExpiry::parse(&r.on_expiry);
        let cmd = Authorize {
            account_id: r.account_id,
            wallet: r.wallet,
            amount: r.amount,
            ttl_ms: r.ttl_ms,
            on_expiry: on_expiry.unwrap_or(OnExpiry::Release),
            idempotency_key: r.idempotency_key,
            operation: r.operation,
            metadata: super::metadata(r.metadata),
            member_id: r.member_id,
            price_inputs: None,
            attempt_mark: None,
        }
        .normalized();
        // Every bad field at once, the policy (parsed here) included.
        let mut violations = cmd.validate().err().unwrap_or_default();
        if on_expiry.is_none() {
            violations.push(FieldViolation::new(
                "on_expiry",
                "must be capture or release",
            ));
        }
        if !violations.is_empty() {
            return Err(to_status(LedgerError::InvalidArgument(violations)));
        }
        let out = self.ledger.authorize(&cmd).await.map_err(to_status)?;
        Ok(Response::new(pb::AuthorizeResponse {
            spendable: out.remaining(),
            hold_id: out.hold_id,
            event_id: out.event_id,
            amount: out.amount,
            expires_at_ms: out.expires_at_ms,
            available: out.available,
            held: out.held,
            replayed: out.replayed,
        }))
    }

    async fn capture(
        &self,
        request: Request<pb::CaptureRequest>,
    ) -> Result<Response<pb::CaptureResponse>, Status> {
        let r = request.into_inner();
        let mut cmd = EndHold::capture(r.hold_id, r.amount, r.idempotency_key);
        cmd.metadata = super::metadata(r.metadata);
        let out = self.ledger.end_hold(&cmd).await.map_err(to_status)?;
        Ok(Response::new(pb::CaptureResponse {
            charge_id: out.event_id.clone(),
            event_id: out.event_id,
            captured: out.captured,
            released: out.released,
            available: out.available,
            held: out.held,
            replayed: out.replayed,
            expired: out.expired,
        }))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let r = request.into_inner();
        let mut cmd = EndHold::release(r.hold_id, r.idempotency_key);
        cmd.metadata = super::metadata(r.metadata);
        let out = self.ledger.end_hold(&cmd).await.map_err(to_status)?;
        Ok(Response::new(pb::ReleaseResponse {
            event_id: out.event_id,
            released: out.released,
            available: out.available,
            held: out.held,
            replayed: out.replayed,
            expired: out.expired,
        }))
    }

    async fn refund(
        &self,
        request: Request<pb::RefundRequest>,
    ) -> Result<Response<pb::RefundResponse>, Status> {
        let r = request.into_inner();
        let cmd = Refund {
            charge_id: r.charge_id,
            amount: r.amount,
            idempotency_key: r.idempotency_key,
            metadata: super::metadata(r.metadata),
        };
        let out = self.ledger.refund(&cmd).await.map_err(to_status)?;
        Ok(Response::new(pb::RefundResponse {
            event_id: out.event_id,
            refunded: out.refunded,
            refunded_total: out.refunded_total,
            available: out.available,
            expired: out.expired,
            replayed: out.replayed,
        }))
    }

    async fn get_balance(
        &self,
        request: Request<pb::GetBalanceRequest>,
    ) -> Result<Response<pb::GetBalanceResponse>, Status> {
        let r = request.into_inner();
        // By key id: the key's account, and its member for an org workspace key.
        let by_key = !r.key_id.is_empty();
        let (account_id, member_id) = if by_key {
            if !r.account_id.is_empty() || !r.member_id.is_empty() {
                return Err(to_status(LedgerError::InvalidArgument(vec![
                    FieldViolation::new("key_id", "give a key id or an account, not both"),
                ])));
            }
            crate::gateway::identity::key_binding(&self.ledger, &r.key_id)
                .await
                .map_err(to_status)?
        } else {
            let mut v = crate::ledger::command::Violations::default();
            v.member_id("member_id", &r.member_id, &r.account_id);
            v.finish()
                .map_err(|e| to_status(LedgerError::InvalidArgument(e)))?;
            (r.account_id, r.member_id)
        };
        let wallets = self
            .ledger
            .balance(&account_id, &r.wallet)
            .await
            .map_err(to_status)?;
        let view = self
            .ledger
            .view(&account_id, &member_id, &r.wallet)
            .await
            .map_err(to_status)?;
        let role = match (&view.role, member_id.is_empty()) {
            (Some(role), false) => Some(*role),
            (None, false) => {
                // An account that is no organization has no members: name the account.
                let (field, why) = match (by_key, view.is_org) {
                    (true, _) => ("key_id", "is not a member of the organization"),
                    (false, true) => ("member_id", "is not a member of the organization"),
                    (false, false) => (
                        "account_id",
                        "is not an organization (member_id names an org member)",
                    ),
                };
                return Err(to_status(LedgerError::InvalidArgument(vec![
                    FieldViolation::new(field, why),
                ])));
            }
            (_, true) => None,
        };
        // An org's own account (asked without a member, or by a member-less key) is an
        // organization too.
        let context = if role.is_some() || view.is_org {
            "organization"
        } else {
            "personal"
        };
        // A plain member sees what they may spend (their remaining allocation), never
        // the wallet's totals (the budgets that bind them, the account's included, are
        // shown with their spend: docs/ARCHITECTURE.md, "Balance context").
        let member_view = role.is_some_and(|r| !r.manages());
        let wallets = wallets
            .into_iter()
            .map(|w| {
                // From the view already read: no other Redis call.
                let spendable = view.spendable(&w.wallet, w.available);
                if member_view {
                    let remaining = view
                        .allocations
                        .iter()
                        .find(|a| a.wallet == w.wallet)
                        .map(|a| a.remaining())
                        .unwrap_or(0);
                    pb::WalletBalance {
                        wallet: w.wallet,
                        available: remaining,
                        spendable,
                        ..pb::WalletBalance::default()
                    }
                } else {
                    pb::WalletBalance {
                        wallet: w.wallet,
                        available: w.available,
                        held: w.held,
                        total_granted: w.granted,
                        total_used: w.used,
                        total_expired: w.expired,
                        total_refunded: w.refunded,
                        total_adjusted: w.adjusted,
                        spendable,
                    }
                }
            })
            .collect();
        Ok(Response::new(pb::GetBalanceResponse {
            context: context.into(),
            wallets,
            role: role.map(|r| r.as_str().to_owned()).unwrap_or_default(),
            allocations: view
                .allocations
                .iter()
                .map(|a| pb::MemberAllocation {
                    wallet: a.wallet.clone(),
                    allocated: a.allocated,
                    used: a.used,
                    remaining: a.remaining(),
                    bounded: a.bounded,
                })
                .collect(),
            budgets: view
                .budgets
                .into_iter()
                .map(|b| pb::Budget {
                    account_id: account_id.clone(),
                    member_id: if b.scope == "member" {
                        member_id.clone()
                    } else {
                        String::new()
                    },
                    wallet: b.wallet,
                    limit: b.limit,
                    period: b.period,
                    window_secs: b.window_ms / 1000,
                    spent: b.spent,
                    resets_at_ms: b.resets_at_ms,
                    scope: b.scope,
                    ..pb::Budget::default()
                })
                .collect(),
            account_id,
            member_id,
        }))
    }

    async fn list_lots(
        &self,
        request: Request<pb::ListLotsRequest>,
    ) -> Result<Response<pb::ListLotsResponse>, Status> {
        let r = request.into_inner();
        let mut v = crate::ledger::command::Violations::default();
        v.account_id("account_id", &r.account_id);
        v.wallet("wallet", &r.wallet);
        let from = parse_lots_token(&r.page_token, &r.account_id, &r.wallet)
            .map_err(|why| v.add("page_token", why))
            .unwrap_or(LotsFrom::Offset(0));
        if !(0..=LOTS_PAGE_MAX as i32).contains(&r.page_size) {
            v.add("page_size", format!("must be in 0..={LOTS_PAGE_MAX}"));
        }
        v.finish()
            .map_err(|e| to_status(LedgerError::InvalidArgument(e)))?;
        let page_size = match r.page_size {
            0 => LOTS_PAGE_DEFAULT_U32,
            n => n as u32,
        };
        let page = match &from {
            LotsFrom::Offset(offset) => {
                self.ledger
                    .lots(&r.account_id, &r.wallet, *offset, page_size)
                    .await
            }
            LotsFrom::After(cursor) => {
                self.ledger
                    .lots_after(&r.account_id, &r.wallet, cursor, page_size)
                    .await
            }
        }
        .map_err(to_status)?;
        Ok(Response::new(pb::ListLotsResponse {
            next_page_token: page
                .next
                .as_ref()
                .map(|c| lots_token(&r.account_id, &r.wallet, c))
                .unwrap_or_default(),
            lots: page
                .lots
                .into_iter()
                .map(|l| pb::Lot {
                    lot_id: l.lot_id,
                    wallet: l.wallet,
                    kind: l.kind,
                    priority: i32::from(l.priority),
                    amount: l.amount,
                    used: l.used,
                    remaining: l.remaining,
                    held: l.held,
                    expired: l.expired,
                    expired_credits: l.expired_credits,
                    expires_at_ms: l.expires_at_ms,
                    created_at_ms: l.created_at_ms,
                    updated_at_ms: l.updated_at_ms,
                    description: l.description,
                })
                .collect(),
        }))
    }

    async fn list_transactions(
        &self,
        request: Request<pb::ListTransactionsRequest>,
    ) -> Result<Response<pb::ListTransactionsResponse>, Status> {
        let r = request.into_inner();
        let mut v = crate::ledger::command::Violations::default();
        v.account_id("account_id", &r.account_id);
        v.wallet("wallet", &r.wallet);
        // Each kind once: the store binds one parameter per kind, and a list repeating
        // "grant" 100,000 times made SQLite fail ("too many SQL variables"), answered
        // UNAVAILABLE and logged as a store outage. At most EventKind::ALL.len() now.
        let mut kinds = Vec::new();
        let mut unknown = false;
        for name in &r.kinds {
            match EventKind::parse(name) {
                Some(k) if !kinds.contains(&k) => kinds.push(k),
                Some(_) => {}
                None => unknown = true,
            }
        }
        if unknown {
            // The field and what it takes, never the value: error messages are logged.
            v.add("kinds", kinds_description());
        }
        if r.from_ms < 0 {
            v.add("from_ms", "must not be negative");
        }
        if r.to_ms < 0 {
            v.add("to_ms", "must not be negative");
        }
        // A window that ends before it starts matches nothing: a mistake (the two
        // swapped), not a question, so it is named rather than answered with no page.
        if r.from_ms > 0 && r.to_ms > 0 && r.to_ms < r.from_ms {
            v.add("to_ms", "must not be before from_ms");
        }
        if !(0..=HISTORY_PAGE_MAX as i32).contains(&r.page_size) {
            v.add("page_size", format!("must be in 0..={HISTORY_PAGE_MAX}"));
        }
        let binding = history_binding(&r.account_id, &r.wallet, &kinds, r.from_ms, r.to_ms);
        let after = if r.page_token.is_empty() {
            None
        } else {
            match parse_history_token(&r.page_token) {
                Some((_, _, Some(bound))) if bound != binding => {
                    v.add("page_token", HISTORY_FOREIGN_TOKEN);
                    None
                }
                Some((at, id, _)) => Some((at, id)),
                None => {
                    v.add("page_token", UNKNOWN_TOKEN);
                    None
                }
            }
        };
        v.finish()
            .map_err(|e| to_status(LedgerError::InvalidArgument(e)))?;
        let query = HistoryQuery {
            account_id: r.account_id,
            wallet: (!r.wallet.is_empty()).then_some(r.wallet),
            kinds,
            from_ms: (r.from_ms > 0).then_some(r.from_ms),
            to_ms: (r.to_ms > 0).then_some(r.to_ms),
            page_size: if r.page_size == 0 {
                HISTORY_PAGE_DEFAULT
            } else {
                r.page_size as u32
            },
            after,
        };
        let page = self.store.history(&query).await.map_err(store_status)?;
        Ok(Response::new(pb::ListTransactionsResponse {
            next_page_token: page
                .next
                .map(|(at, id)| history_token(at, &id, &binding))
                .unwrap_or_default(),
            transactions: page.events.into_iter().map(transaction).collect(),
        }))
    }

    async fn get_transaction(
        &self,
        request: Request<pb::GetTransactionRequest>,
    ) -> Result<Response<pb::Transaction>, Status> {
        let r = request.into_inner();
        // `<shard>-<ms>-<seq>`, as every event id (and charge id) is written.
        let shaped = r.event_id.len() <= 64
            && r.event_id.split('-').count() == 3
            && r.event_id
                .split('-')
                .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if !shaped {
            return Err(invalid(
                "event_id",
                "must be an event id: <shard>-<ms>-<seq>",
            ));
        }
        match self.store.event(&r.event_id).await.map_err(store_status)? {
            Some(e) => Ok(Response::new(transaction(e))),
            None => Err(Status::not_found(
                "transaction not found (or not settled yet)",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip() {
        let cursor = LotCursor {
            expired: true,
            score: 1_800_000_000_000,
            lot_id: "00000017".into(),
        };
        let token = lots_token("acct", "", &cursor);
        let parsed = |token: &str, wallet: &str| parse_lots_token(token, "acct", wallet);
        // The empty wallet is "default": the same listing.
        for wallet in ["", "default"] {
            assert_eq!(parsed(&token, wallet), Ok(LotsFrom::After(cursor.clone())));
        }
        assert_eq!(parsed(&token, "other"), Err(FOREIGN_TOKEN));
        assert_eq!(parse_lots_token(&token, "acct2", ""), Err(FOREIGN_TOKEN));
        // An older tollgate's offsets are still taken.
        assert_eq!(parsed("p1f", ""), Ok(LotsFrom::Offset(31)));
        assert_eq!(parsed("", ""), Ok(LotsFrom::Offset(0)));
        for bad in ["zz", "p", "c", "czz"] {
            assert_eq!(parsed(bad, ""), Err(UNKNOWN_TOKEN), "{bad:?}");
        }
        for text in [
            "l/1/0001",
            "l/-1/0001/b",
            "q/1/0001/b",
            "l/1/x1/b",
            "l/1/1/b/c",
        ] {
            let forged = format!("c{}", hex::encode(text));
            assert_eq!(parsed(&forged, ""), Err(UNKNOWN_TOKEN), "{text:?}");
        }
        let binding = history_binding("acct", "", &[EventKind::Debit, EventKind::Grant], 0, 0);
        // The kinds are a set.
        assert_eq!(
            binding,
            history_binding("acct", "", &[EventKind::Grant, EventKind::Debit], 0, 0)
        );
        assert_ne!(binding, history_binding("acct", "", &[], 0, 0));
        assert_ne!(binding, history_binding("acct2", "", &[], 0, 0));
        let t = history_token(1_700_000_000_000, "3-17-0", &binding);
        assert_eq!(
            parse_history_token(&t),
            Some((1_700_000_000_000, "3-17-0".into(), Some(binding.clone())))
        );
        // An older tollgate's token, without a binding.
        assert_eq!(
            parse_history_token(&hex::encode("5/3-17-0")),
            Some((5, "3-17-0".into(), None))
        );
        assert_eq!(parse_history_token("zz"), None);
        assert_eq!(parse_history_token("abc"), None);
        assert_eq!(parse_history_token(&hex::encode("5/3-17-0/xyz")), None);
        // Only an event id's shape is taken: a NUL byte reached the store.
        for id in ["3-17-0\0", "3-17", "x-17-0", "3-17-0-1", ""] {
            assert_eq!(
                parse_history_token(&history_token(1, id, &binding)),
                None,
                "{id:?}"
            );
        }
    }
}
