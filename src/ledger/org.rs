//! Organizations: members with roles, allocations of org wallets to members, and budgets
//! (spending caps per period) of accounts and org members. State lives under the org's
//! hash tag and changes only through `lua/org.lua`; charges check allocations and budgets
//! inside the debit and authorize scripts (docs/ARCHITECTURE.md, "Organizations").

use super::command::{digest, wallet_str_or_default, Violations, CREDITS_MAX};
use super::redis_pool::Answer;
use super::reply::ok_fields;
use super::{Ledger, LedgerError};

/// A member's role in an organization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Owner,
    Admin,
    Member,
}

impl Role {
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "owner" => Self::Owner,
            "admin" => Self::Admin,
            "member" => Self::Member,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Owner => "owner",
            Self::Admin => "admin",
            Self::Member => "member",
        }
    }

    /// Owners and admins see the org's balance and manage members, allocations and keys.
    pub fn manages(self) -> bool {
        matches!(self, Self::Owner | Self::Admin)
    }
}

/// A budget's period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetPeriod {
    /// A calendar day in the budget's UTC offset.
    Day,
    /// A calendar month in the budget's UTC offset.
    Month,
    /// A rolling window of this many ms (counted in buckets of 1/16 of it, so a charge may
    /// be refused up to 1/16 of the window early, never let through late).
    Window(i64),
}

impl BudgetPeriod {
    pub const WINDOW_MS_MAX: i64 = 366 * 24 * 3600 * 1000;

    pub fn name(self) -> &'static str {
        match self {
            Self::Day => "day",
            Self::Month => "month",
            Self::Window(_) => "window",
        }
    }

    fn code(self) -> &'static str {
        match self {
            Self::Day => "d",
            Self::Month => "m",
            Self::Window(_) => "w",
        }
    }

    fn window_ms(self) -> i64 {
        match self {
            Self::Window(ms) => ms,
            _ => 0,
        }
    }

    /// From the API's words: `day`, `month` (with `window_secs` 0) or `window` (with
    /// `window_secs`).
    pub fn parse(name: &str, window_secs: i64, v: &mut Violations) -> Option<Self> {
        match name {
            "day" | "month" if window_secs != 0 => {
                v.add(
                    "window_secs",
                    format!("must be 0 for period {name} (only a rolling window has one)"),
                );
                None
            }
            "day" => Some(Self::Day),
            "month" => Some(Self::Month),
            "window" => {
                if window_secs <= 0 || window_secs.saturating_mul(1000) > Self::WINDOW_MS_MAX {
                    v.add(
                        "window_secs",
                        "must be in 1..=31622400 for a rolling window",
                    );
                    None
                } else {
                    Some(Self::Window(window_secs * 1000))
                }
            }
            _ => {
                v.add("period", "must be day, month or window");
                None
            }
        }
    }
}

pub const UTC_OFFSET_MINUTES_MAX: i32 = 14 * 60;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetBudget {
    pub account_id: String,
    /// Empty: the account's own budget on the wallet (every charge of it); else the org
    /// member's budget on the org wallet.
    pub member_id: String,
    pub wallet: String,
    /// 0 removes the budget.
    pub limit: i64,
    pub period: BudgetPeriod,
    /// Calendar periods start at midnight of this UTC offset (0 for a rolling window).
    pub utc_offset_minutes: i32,
    pub idempotency_key: String,
}

/// How an allocation changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocationChange {
    Set(i64),
    Add(i64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrgEvent {
    pub event_id: String,
    pub replayed: bool,
    /// The keys a member's removal or demotion to plain member revoked (every live key the
    /// member made; on a removal, every live key bound to the member too); empty for every
    /// other operation. A replay names them again, except one whose record `tollgate
    /// restore` re-derived (the event does not list them).
    pub revoked_keys: Vec<RevokedOrgKey>,
}

/// An org key revoked because its maker left the org or became a plain member, or the
/// member it is bound to left (lua/org.lua): what the Admin API needs to save the
/// revocation in the durable ledger and drop the key from its identity cache, as
/// RevokeApiKey does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedOrgKey {
    pub key_id: String,
    /// SHA-256 of the key (hex), as the key record keeps it.
    pub digest_hex: String,
    pub revoked_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationOutcome {
    pub event_id: String,
    pub allocated: i64,
    pub used: i64,
    pub replayed: bool,
}

/// A member's allocation of one org wallet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationState {
    pub wallet: String,
    pub allocated: i64,
    pub used: i64,
    /// False for an owner or admin without an allocation: only the org balance bounds them.
    pub bounded: bool,
}

impl AllocationState {
    pub fn remaining(&self) -> i64 {
        (self.allocated - self.used).max(0)
    }
}

/// A budget and what was spent in its current period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetState {
    /// "account" or "member".
    pub scope: String,
    pub wallet: String,
    pub limit: i64,
    pub period: String,
    pub window_ms: i64,
    pub spent: i64,
    pub resets_at_ms: i64,
}

/// What GetBalance adds to balances: the caller's role, allocations and budgets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountView {
    /// The member's role; None outside an org (or for a non-member).
    pub role: Option<Role>,
    /// The account is an organization.
    pub is_org: bool,
    pub allocations: Vec<AllocationState>,
    pub budgets: Vec<BudgetState>,
}

impl AccountView {
    /// What the caller may spend now from `wallet`, whose balance is `available`: the
    /// tightest of the balance, the member's allocation left (when it bounds them) and
    /// every budget's headroom (limit − spent in its current period), never below 0. The
    /// figure a charge's answer reports after it (lib.lua `spendable_after`: the gateway's
    /// `x-credits-remaining`, DebitResponse.spendable), before any charge. Reads only
    /// what the view script read: the same allocation and budgets the charge scripts
    /// check (lib.lua `alloc_remaining`, `budgets_for`).
    pub fn spendable(&self, wallet: &str, available: i64) -> i64 {
        let allocation_left = self
            .allocations
            .iter()
            .filter(|a| a.wallet == wallet && a.bounded)
            .map(AllocationState::remaining);
        let headroom = self
            .budgets
            .iter()
            .filter(|b| b.wallet == wallet)
            .map(|b| b.limit - b.spent);
        allocation_left
            .chain(headroom)
            .fold(available, i64::min)
            .max(0)
    }
}

/// One org script call's parameters (unused ones empty).
#[derive(Default)]
struct OrgCall<'a> {
    op: &'a str,
    account: &'a str,
    idempotency_key: &'a str,
    actor: &'a str,
    member: &'a str,
    role: &'a str,
    wallet: &'a str,
    amount: i64,
    period: &'a str,
    window_ms: i64,
    offset_ms: i64,
}

impl Ledger {
    async fn org_call(&self, c: OrgCall<'_>) -> Result<Answer, LedgerError> {
        let shard = self.shards.of_account(c.account);
        let amount = c.amount.to_string();
        let window = c.window_ms.to_string();
        let offset = c.offset_ms.to_string();
        let digest = digest(&[
            "org", c.op, c.actor, c.member, c.role, c.wallet, &amount, c.period, &window, &offset,
        ]);
        let mut inv = self.invocation(&self.scripts.org, shard);
        inv.arg(c.op)
            .arg(c.account)
            .arg(c.idempotency_key)
            .arg(&digest)
            .arg(c.actor)
            .arg(c.member)
            .arg(c.role)
            .arg(c.wallet)
            .arg(&amount)
            .arg(c.period)
            .arg(&window)
            .arg(&offset)
            .arg(&self.wallets_max)
            .arg(&self.revoked_key_retention_ms)
            .arg(&self.members_max);
        self.redis.answer(&inv).await
    }

    /// Creates an organization (an account whose wallets its members spend) with its
    /// first owner. Returns the event and the creation time.
    pub async fn create_org(
        &self,
        org_id: &str,
        owner_id: &str,
        idempotency_key: &str,
    ) -> Result<(OrgEvent, i64), LedgerError> {
        let mut v = Violations::default();
        v.account_id("org_id", org_id);
        // Required, so not member_id's (which would name a bad one twice).
        v.account_id("owner_id", owner_id);
        if !owner_id.is_empty() && owner_id == org_id {
            v.add("owner_id", "must not be the organization itself");
        }
        v.idempotency_key("idempotency_key", idempotency_key);
        v.finish().map_err(LedgerError::InvalidArgument)?;
        let answer = self
            .org_call(OrgCall {
                op: "create",
                account: org_id,
                idempotency_key,
                member: owner_id,
                ..OrgCall::default()
            })
            .await?;
        let mut f = ok_fields(&answer)?;
        let _event_id = f.text()?;
        let created = f.int()?;
        Ok((org_event(&answer)?, created))
    }

    /// Adds a member (or changes a member's role); `actor_id` must be an owner or admin,
    /// and an owner to touch owners. An owner or admin made a plain member loses the
    /// keys they made (`revoked_keys`: revoked in Redis, in the same call).
    pub async fn add_member(
        &self,
        org_id: &str,
        actor_id: &str,
        member_id: &str,
        role: &str,
        idempotency_key: &str,
    ) -> Result<OrgEvent, LedgerError> {
        let mut v = Violations::default();
        v.account_id("org_id", org_id);
        v.account_id("actor_id", actor_id);
        v.account_id("member_id", member_id);
        if !member_id.is_empty() && member_id == org_id {
            v.add("member_id", "must not be the organization itself");
        }
        if Role::parse(role).is_none() {
            v.add("role", "must be owner, admin or member");
        }
        v.idempotency_key("idempotency_key", idempotency_key);
        v.finish().map_err(LedgerError::InvalidArgument)?;
        let answer = self
            .org_call(OrgCall {
                op: "add",
                account: org_id,
                idempotency_key,
                actor: actor_id,
                member: member_id,
                role,
                ..OrgCall::default()
            })
            .await?;
        member_change(&answer)
    }

    /// Removes a member: their allocations and member budgets go, and the keys they made
    /// and the keys bound to them are revoked (`revoked_keys`), in the same call.
    pub async fn remove_member(
        &self,
        org_id: &str,
        actor_id: &str,
        member_id: &str,
        idempotency_key: &str,
    ) -> Result<OrgEvent, LedgerError> {
        let mut v = Violations::default();
        v.account_id("org_id", org_id);
        v.account_id("actor_id", actor_id);
        v.account_id("member_id", member_id);
        v.idempotency_key("idempotency_key", idempotency_key);
        v.finish().map_err(LedgerError::InvalidArgument)?;
        let answer = self
            .org_call(OrgCall {
                op: "remove",
                account: org_id,
                idempotency_key,
                actor: actor_id,
                member: member_id,
                ..OrgCall::default()
            })
            .await?;
        member_change(&answer)
    }

    /// One page of members and roles, sorted by member id (bytes): the first `page_size`
    /// members whose id sorts after `after` (all when `after` is empty), and the id to
    /// pass as `after` for the next page when there is one. NotFound for an account that
    /// is no org; NotInitialized when the shard has no epoch marker (a Redis that lost its
    /// data: the org may well exist in the durable ledger), as every script-based read
    /// answers. Keyset paging: a member added or removed between pages does not shift
    /// the others. Each page reads the whole org record (a hash has no order to read a
    /// range of): bounded by `ledger.members_per_org_max`, while the answer is bounded by
    /// the page (docs/ARCHITECTURE.md, "Organizations").
    pub async fn members_page(
        &self,
        org_id: &str,
        after: &str,
        page_size: u32,
    ) -> Result<MembersPage, LedgerError> {
        let mut v = Violations::default();
        v.account_id("org_id", org_id);
        v.finish().map_err(LedgerError::InvalidArgument)?;
        let shard = self.shards.of_account(org_id);
        let key = format!("{}:org:{org_id}", self.shards.tag(shard));
        // One transaction (both keys carry the shard's hash tag): the marker and the org
        // record are read at the same moment.
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("EXISTS")
            .arg(self.shards.epoch_key(shard))
            .cmd("HGETALL")
            .arg(&key);
        let (initialized, fields): (i64, Vec<(String, String)>) =
            self.redis.pipeline(&pipe).await?;
        if initialized != 1 {
            return Err(LedgerError::NotInitialized);
        }
        if fields.is_empty() {
            return Err(LedgerError::NotFound("organization"));
        }
        let members = fields.into_iter().filter_map(|(field, role)| {
            Some((field.strip_prefix("m:")?.to_owned(), Role::parse(&role)?))
        });
        Ok(members_page_of(members, after, page_size))
    }

    /// Sets or changes a member's allocation of an org wallet; `actor_id` must be an owner
    /// or admin.
    pub async fn allocate(
        &self,
        org_id: &str,
        actor_id: &str,
        member_id: &str,
        wallet: &str,
        change: AllocationChange,
        idempotency_key: &str,
    ) -> Result<AllocationOutcome, LedgerError> {
        let mut v = Violations::default();
        v.account_id("org_id", org_id);
        v.account_id("actor_id", actor_id);
        v.account_id("member_id", member_id);
        v.wallet("wallet", wallet);
        let (op, amount) = match change {
            AllocationChange::Set(n) => {
                if !(0..=CREDITS_MAX).contains(&n) {
                    v.add("amount", format!("must be in 0..={CREDITS_MAX}"));
                }
                ("allocate_set", n)
            }
            AllocationChange::Add(d) => {
                if d == 0 || !(-CREDITS_MAX..=CREDITS_MAX).contains(&d) {
                    v.add(
                        "delta",
                        format!("must be non-zero and within ±{CREDITS_MAX}"),
                    );
                }
                ("allocate_add", d)
            }
        };
        v.idempotency_key("idempotency_key", idempotency_key);
        v.finish().map_err(LedgerError::InvalidArgument)?;
        let answer = self
            .org_call(OrgCall {
                op,
                account: org_id,
                idempotency_key,
                actor: actor_id,
                member: member_id,
                wallet: wallet_str_or_default(wallet),
                amount,
                ..OrgCall::default()
            })
            .await?;
        let mut f = ok_fields(&answer)?;
        Ok(AllocationOutcome {
            event_id: f.text()?.to_owned(),
            allocated: f.int()?,
            used: f.int()?,
            replayed: answer.replayed,
        })
    }

    /// The command's own field checks (the period is checked when it is parsed).
    pub fn check_budget(&self, cmd: &SetBudget) -> Result<(), Vec<super::FieldViolation>> {
        let mut v = Violations::default();
        v.account_id("account_id", &cmd.account_id);
        v.member_id("member_id", &cmd.member_id, &cmd.account_id);
        v.wallet("wallet", &cmd.wallet);
        if !(0..=CREDITS_MAX).contains(&cmd.limit) {
            v.add("limit", format!("must be in 0..={CREDITS_MAX} (0 removes)"));
        }
        // Not `abs()`: i32::MIN has none (it wraps to itself in release builds).
        if !(-UTC_OFFSET_MINUTES_MAX..=UTC_OFFSET_MINUTES_MAX).contains(&cmd.utc_offset_minutes) {
            v.add(
                "utc_offset_minutes",
                format!("must be within ±{UTC_OFFSET_MINUTES_MAX}"),
            );
        } else if matches!(cmd.period, BudgetPeriod::Window(_)) && cmd.utc_offset_minutes != 0 {
            // A rolling window has no calendar: the offset would play no part in it, yet a
            // different one would count as a new definition and wipe the window's spend.
            v.add(
                "utc_offset_minutes",
                "must be 0 for period window (only day and month start at a UTC offset)",
            );
        }
        v.idempotency_key("idempotency_key", &cmd.idempotency_key);
        v.finish()
    }

    /// Sets (limit > 0) or removes (limit 0) a budget.
    pub async fn set_budget(&self, cmd: &SetBudget) -> Result<OrgEvent, LedgerError> {
        self.check_budget(cmd)
            .map_err(LedgerError::InvalidArgument)?;
        let answer = self
            .org_call(OrgCall {
                op: "budget",
                account: &cmd.account_id,
                idempotency_key: &cmd.idempotency_key,
                member: &cmd.member_id,
                wallet: wallet_str_or_default(&cmd.wallet),
                amount: cmd.limit,
                period: cmd.period.code(),
                window_ms: cmd.period.window_ms(),
                offset_ms: i64::from(cmd.utc_offset_minutes) * 60_000,
                ..OrgCall::default()
            })
            .await?;
        org_event(&answer)
    }

    /// The role, allocations and budgets of an account (member empty) or an org member,
    /// for one wallet or every wallet (empty).
    pub async fn view(
        &self,
        account_id: &str,
        member_id: &str,
        wallet: &str,
    ) -> Result<AccountView, LedgerError> {
        let shard = self.shards.of_account(account_id);
        let mut inv = self.invocation(&self.scripts.view, shard);
        inv.arg(account_id).arg(member_id).arg(wallet);
        let rows: Vec<String> = self.redis.call_script(&inv).await?;
        parse_view(&rows)
    }
}

/// An org script's "OK|event_id|…" answer as the event it wrote.
fn org_event(answer: &Answer) -> Result<OrgEvent, LedgerError> {
    let mut f = ok_fields(answer)?;
    Ok(OrgEvent {
        event_id: f.text()?.to_owned(),
        replayed: answer.replayed,
        revoked_keys: Vec::new(),
    })
}

/// Members per ListMembers page unless asked otherwise, and the most a page may hold.
pub const MEMBERS_PAGE_DEFAULT: u32 = 100;
pub const MEMBERS_PAGE_MAX: u32 = 1000;

/// A page of an org's members ([`Ledger::members_page`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembersPage {
    /// Sorted by member id.
    pub members: Vec<(String, Role)>,
    /// The last member id of this page when more follow: the next page starts after it.
    pub next_after: Option<String>,
}

/// The page of `members` (any order) after `after` (empty: from the first), at most
/// `page_size` of them (at least 1).
fn members_page_of(
    members: impl Iterator<Item = (String, Role)>,
    after: &str,
    page_size: u32,
) -> MembersPage {
    let mut rest: Vec<(String, Role)> = members
        .filter(|(id, _)| after.is_empty() || id.as_str() > after)
        .collect();
    rest.sort_unstable();
    let page_size = page_size.max(1) as usize;
    let next_after = (rest.len() > page_size).then(|| rest[page_size - 1].0.clone());
    rest.truncate(page_size);
    MembersPage {
        members: rest,
        next_after,
    }
}

/// An add or remove answer: "OK|event_id|role", then "|revoked_ms|key_id:digest|…" when
/// the change revoked keys (the member's, or made by them).
fn member_change(answer: &Answer) -> Result<OrgEvent, LedgerError> {
    let mut f = ok_fields(answer)?;
    let event_id = f.text()?.to_owned();
    let _role = f.text()?;
    let mut revoked_keys = Vec::new();
    if let Some(revoked_at_ms) = f.optional_int()? {
        while let Some(pair) = f.optional_text() {
            let (key_id, digest_hex) = pair.split_once(':').ok_or_else(|| f.malformed())?;
            revoked_keys.push(RevokedOrgKey {
                key_id: key_id.to_owned(),
                digest_hex: digest_hex.to_owned(),
                revoked_at_ms,
            });
        }
        if revoked_keys.is_empty() {
            return Err(f.malformed());
        }
    }
    Ok(OrgEvent {
        event_id,
        replayed: answer.replayed,
        revoked_keys,
    })
}

fn parse_view(rows: &[String]) -> Result<AccountView, LedgerError> {
    let bad = |row: &str| {
        LedgerError::Internal(format!(
            "malformed view row ({})",
            crate::ledger::reply::shape(row)
        ))
    };
    let int = |text: &str, row: &str| text.parse::<i64>().map_err(|_| bad(row));
    let mut view = AccountView {
        role: rows.first().and_then(|r| Role::parse(r)),
        ..AccountView::default()
    };
    for row in rows.iter().skip(1) {
        let parts: Vec<&str> = row.split('|').collect();
        match parts.as_slice() {
            ["O"] => view.is_org = true,
            ["A", wallet, allocated, used, bounded] => view.allocations.push(AllocationState {
                wallet: (*wallet).to_owned(),
                allocated: int(allocated, row)?,
                used: int(used, row)?,
                bounded: *bounded == "1",
            }),
            ["B", scope, wallet, limit, period, window, spent, resets] => {
                view.budgets.push(BudgetState {
                    scope: (*scope).to_owned(),
                    wallet: (*wallet).to_owned(),
                    limit: int(limit, row)?,
                    period: match *period {
                        "d" => "day",
                        "m" => "month",
                        "w" => "window",
                        _ => return Err(bad(row)),
                    }
                    .to_owned(),
                    window_ms: int(window, row)?,
                    spent: int(spent, row)?,
                    resets_at_ms: int(resets, row)?,
                })
            }
            _ => return Err(bad(row)),
        }
    }
    Ok(view)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_pages_follow_the_id_order_and_concatenate() {
        let all: Vec<(String, Role)> = ["olivia", "bob", "alice", "zed", "carol"]
            .iter()
            .map(|id| (id.to_string(), Role::Member))
            .collect();
        let mut pages = Vec::new();
        let mut after = String::new();
        loop {
            let page = members_page_of(all.clone().into_iter(), &after, 2);
            assert!(page.members.len() <= 2);
            pages.extend(page.members.into_iter().map(|(id, _)| id));
            match page.next_after {
                Some(next) => after = next,
                None => break,
            }
        }
        assert_eq!(pages, ["alice", "bob", "carol", "olivia", "zed"]);
        // A full last page names no next one; an `after` past every id is an empty page.
        let last = members_page_of(all.clone().into_iter(), "bob", 3);
        assert_eq!(last.members.len(), 3);
        assert_eq!(last.next_after, None);
        let none = members_page_of(all.into_iter(), "zz", 10);
        assert_eq!((none.members.len(), none.next_after), (0, None));
    }

    #[test]
    fn member_changes_name_the_keys_they_revoked() {
        let answer = |text: &str| Answer {
            replayed: false,
            text: text.into(),
            identity: Vec::new(),
        };
        let plain = member_change(&answer("OK|3-1-0|removed")).unwrap();
        assert_eq!(plain.event_id, "3-1-0");
        assert!(plain.revoked_keys.is_empty());
        let revoked = member_change(&answer("OK|3-1-0|member|1700|k3-00aa:d1|k3-00bb:d2")).unwrap();
        assert_eq!(
            revoked.revoked_keys,
            [("k3-00aa", "d1"), ("k3-00bb", "d2")].map(|(id, digest)| RevokedOrgKey {
                key_id: id.into(),
                digest_hex: digest.into(),
                revoked_at_ms: 1700,
            })
        );
        for bad in [
            "OK|3-1-0|removed|1700",
            "OK|3-1-0|removed|1700|k3-00aa",
            "OK|3-1-0|removed|x|k:d",
        ] {
            assert!(member_change(&answer(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn view_rows_parse() {
        let rows: Vec<String> = [
            "member",
            "A|default|500|120|1",
            "B|member|default|100|d|0|40|86400000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let view = parse_view(&rows).unwrap();
        assert_eq!(view.role, Some(Role::Member));
        assert_eq!(view.allocations[0].remaining(), 380);
        assert_eq!(view.budgets[0].period, "day");
        assert!(parse_view(&["".into(), "A|x".into()]).is_err());
    }

    #[test]
    fn spendable_is_the_tightest_bound_of_the_wallet() {
        let budget = |scope: &str, wallet: &str, limit, spent| BudgetState {
            scope: scope.into(),
            wallet: wallet.into(),
            limit,
            period: "day".into(),
            window_ms: 0,
            spent,
            resets_at_ms: 0,
        };
        let allocation = |wallet: &str, allocated, used, bounded| AllocationState {
            wallet: wallet.into(),
            allocated,
            used,
            bounded,
        };
        // Nothing bounds a personal account but its balance.
        assert_eq!(AccountView::default().spendable("default", 70), 70);
        let member = AccountView {
            role: Some(Role::Member),
            is_org: true,
            allocations: vec![
                allocation("default", 500, 120, true),
                allocation("esign", 100, 0, true),
            ],
            budgets: vec![
                budget("member", "default", 100, 40),
                budget("account", "default", 1_000, 930),
                budget("member", "esign", 10, 0),
            ],
        };
        // Allocation left 380, member budget 60, account budget 70, balance 5,000.
        assert_eq!(member.spendable("default", 5_000), 60);
        // The balance when it is the tightest; each wallet only its own bounds.
        assert_eq!(member.spendable("default", 25), 25);
        assert_eq!(member.spendable("esign", 5_000), 10);
        // An owner without an allocation is not bounded by its (empty) record.
        let owner = AccountView {
            role: Some(Role::Owner),
            is_org: true,
            allocations: vec![allocation("default", 0, 0, false)],
            budgets: vec![],
        };
        assert_eq!(owner.spendable("default", 5_000), 5_000);
        // A budget overspent (lowered below its spend) or an allocation used past a
        // lowered amount leaves nothing, never a negative amount.
        let over = AccountView {
            allocations: vec![allocation("default", 50, 80, true)],
            budgets: vec![budget("account", "default", 10, 30)],
            ..AccountView::default()
        };
        assert_eq!(over.spendable("default", 5_000), 0);
        assert_eq!(AccountView::default().spendable("default", -3), 0);
    }

    #[test]
    fn periods_parse_with_their_field() {
        let mut v = Violations::default();
        assert_eq!(
            BudgetPeriod::parse("day", 0, &mut v),
            Some(BudgetPeriod::Day)
        );
        assert_eq!(
            BudgetPeriod::parse("window", 60, &mut v),
            Some(BudgetPeriod::Window(60_000))
        );
        assert!(v.finish().is_ok());
        let mut v = Violations::default();
        assert_eq!(BudgetPeriod::parse("window", 0, &mut v), None);
        assert_eq!(BudgetPeriod::parse("week", 0, &mut v), None);
        // A calendar period has no window: a window_secs with one is a mistake, not ignored.
        assert_eq!(BudgetPeriod::parse("day", -5, &mut v), None);
        assert_eq!(BudgetPeriod::parse("month", 60, &mut v), None);
        let fields: Vec<String> = v
            .finish()
            .unwrap_err()
            .into_iter()
            .map(|f| f.field)
            .collect();
        assert_eq!(
            fields,
            ["window_secs", "period", "window_secs", "window_secs"]
        );
    }
}
