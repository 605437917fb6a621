//! The ledger event as it sits in a shard's outbox stream (written by lua/lib.lua `emit`).
//!
//! Stream fields: `k` kind, `a` account, `w` wallet, `n` amount, `v` available after,
//! `h` held after, `l` lots, `x` per-kind extra, `hd` hold id, `c` charge id (refunds),
//! `i` idempotency key, `o` operation, `m` metadata (JSON), `t` server time (ms),
//! `ver` format version (absent = 1), `mb` the org member the event is attributed to
//! (absent = none), `ac` the owner or admin who made an org operation (AddMember,
//! RemoveMember, SetAllocation, AddAllocation; absent = none, and in events written
//! before it was added). New fields join within a format version: a reader skips those it
//! does not know. A kind it does not know is a newer writer's, not corruption
//! ([`LedgerEvent::written_by_newer_version`]): the settler leaves it for a newer settler.
//!
//! `l` and `x` by kind:
//!
//! | kind | `l` | `x` |
//! | --- | --- | --- |
//! | grant, adjust (+) | the new lot | `kind|description` of the lot |
//! | adjust (-), debit | lots drawn from | `|description` (adjust) or empty |
//! | hold | lots drawn from | on_expiry code (`c`/`r`) and deadline ms |
//! | capture, release, expire_hold | lots charged | lots the rest went back to |
//! | refund | new lots of kind `refund` | credits that expired at once |
//! | expire_lot | the lot and what expired | empty |
//! | member (no wallet) | empty | the member's new role, or `removed` |
//! | allocate | empty | change of the allocation (`n` is the new allocation; with operation `remove`, written by RemoveMember, the allocation is gone, not 0) |
//! | budget | empty | `period|window_ms|utc_offset_ms` (`n` is the limit, 0 = removed) |

use redis::Value;

use super::LedgerError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    Grant,
    Hold,
    Capture,
    Release,
    ExpireHold,
    Debit,
    Refund,
    ExpireLot,
    Adjust,
    /// An org member added, changed or removed (no wallet).
    Member,
    /// A member's allocation of an org wallet set or changed.
    Allocate,
    /// A budget set or removed.
    Budget,
}

impl EventKind {
    /// Every kind (`ListTransactions` names them when a `kinds` entry is unknown).
    pub const ALL: [Self; 12] = [
        Self::Grant,
        Self::Hold,
        Self::Capture,
        Self::Release,
        Self::ExpireHold,
        Self::Debit,
        Self::Refund,
        Self::ExpireLot,
        Self::Adjust,
        Self::Member,
        Self::Allocate,
        Self::Budget,
    ];

    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "grant" => Self::Grant,
            "hold" => Self::Hold,
            "capture" => Self::Capture,
            "release" => Self::Release,
            "expire_hold" => Self::ExpireHold,
            "debit" => Self::Debit,
            "refund" => Self::Refund,
            "expire_lot" => Self::ExpireLot,
            "adjust" => Self::Adjust,
            "member" => Self::Member,
            "allocate" => Self::Allocate,
            "budget" => Self::Budget,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Grant => "grant",
            Self::Hold => "hold",
            Self::Capture => "capture",
            Self::Release => "release",
            Self::ExpireHold => "expire_hold",
            Self::Debit => "debit",
            Self::Refund => "refund",
            Self::ExpireLot => "expire_lot",
            Self::Adjust => "adjust",
            Self::Member => "member",
            Self::Allocate => "allocate",
            Self::Budget => "budget",
        }
    }
}

/// Credits moved out of or into one lot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LotPiece {
    pub lot_id: String,
    pub amount: i64,
    /// Burn score (priority * 2^42 + expiry), when the event carries it.
    pub score: Option<i64>,
}

impl LotPiece {
    pub const PRIORITY_UNIT: i64 = 1 << 42;
    pub const NEVER: i64 = (1 << 42) - 1;

    /// Whether two events drew the same credits: the same lots, by id and amount, in
    /// order (the burn score is not in every event, so it is left out).
    pub fn same_draws(a: &[Self], b: &[Self]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| x.lot_id == y.lot_id && x.amount == y.amount)
    }

    pub fn parse_list(text: &str) -> Option<Vec<Self>> {
        if text.is_empty() {
            return Some(Vec::new());
        }
        text.split(',')
            .map(|piece| {
                let mut parts = piece.split(':');
                let lot_id = parts.next()?.to_owned();
                let amount = parts.next()?.parse().ok()?;
                let score = match parts.next() {
                    Some(s) => Some(s.parse().ok()?),
                    None => None,
                };
                Some(Self {
                    lot_id,
                    amount,
                    score,
                })
            })
            .collect()
    }

    pub fn priority(&self) -> Option<u8> {
        self.score
            .and_then(|s| u8::try_from(s / Self::PRIORITY_UNIT).ok())
    }

    /// Expiry in ms, 0 = never.
    pub fn expires_at_ms(&self) -> Option<i64> {
        self.score.map(|s| match s % Self::PRIORITY_UNIT {
            Self::NEVER => 0,
            e => e,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEvent {
    /// `<shard>-<stream id>`: unique, and the charge id of debits and captures.
    pub event_id: String,
    pub stream_id: String,
    pub kind: EventKind,
    pub account_id: String,
    pub wallet: String,
    pub amount: i64,
    pub available_after: i64,
    pub held_after: i64,
    pub lots: Vec<LotPiece>,
    pub extra: String,
    pub hold_id: String,
    pub charge_id: String,
    pub idempotency_key: String,
    pub operation: String,
    pub metadata: String,
    pub created_at_ms: i64,
    /// Event format version (`ver`; absent in the oldest entries: 1).
    pub version: u32,
    /// The org member the event is attributed to (`mb`); empty outside org workspaces.
    pub member: String,
    /// The owner or admin who made the org operation (`ac`): part of its request digest,
    /// so restore can re-derive its idempotency record. Empty for other events, and for
    /// org events written before the field was added.
    pub actor: String,
}

/// The newest event format this code reads and writes.
pub const EVENT_VERSION: u32 = 1;

impl LedgerEvent {
    /// The shard, from the event id.
    pub fn shard(&self) -> u16 {
        self.event_id
            .split_once('-')
            .and_then(|(s, _)| s.parse().ok())
            .unwrap_or(0)
    }

    /// Position in the shard's stream: (ms, sequence).
    pub fn stream_position(&self) -> (i64, i64) {
        parse_stream_id(&self.stream_id).unwrap_or((0, 0))
    }

    /// What this event changes in the wallet's running totals.
    pub fn deltas(&self) -> Deltas {
        let charged = || self.lots.iter().map(|p| p.amount).sum::<i64>();
        let mut d = Deltas::default();
        match self.kind {
            EventKind::Grant => d.granted = self.amount,
            EventKind::Adjust => d.adjusted = self.amount,
            EventKind::Debit => d.used = self.amount,
            EventKind::Capture | EventKind::ExpireHold => d.used = charged(),
            EventKind::ExpireLot => d.expired = self.amount,
            EventKind::Refund => {
                d.refunded = self.amount;
                d.expired = self.extra.parse().unwrap_or(0);
            }
            EventKind::Hold
            | EventKind::Release
            | EventKind::Member
            | EventKind::Allocate
            | EventKind::Budget => {}
        }
        d
    }

    /// How this event moves its member's allocation `used` (org workspaces): charges and
    /// holds count, returned hold credits and refunds give back. None for events that
    /// do not touch an allocation (no member, or no credits moved).
    pub fn allocation_delta(&self) -> Option<i64> {
        if self.member.is_empty() {
            return None;
        }
        match self.kind {
            EventKind::Debit | EventKind::Hold => Some(self.amount),
            EventKind::Capture | EventKind::Release | EventKind::ExpireHold => {
                Some(-self.returned_lots().iter().map(|p| p.amount).sum::<i64>())
            }
            EventKind::Refund => Some(-self.amount),
            _ => None,
        }
    }

    /// Lots credits went back to (capture, release, expire_hold).
    pub fn returned_lots(&self) -> Vec<LotPiece> {
        match self.kind {
            EventKind::Capture | EventKind::Release | EventKind::ExpireHold => {
                LotPiece::parse_list(&self.extra).unwrap_or_default()
            }
            _ => Vec::new(),
        }
    }

    /// Builds an event from one stream entry's fields.
    fn from_fields(shard: u16, stream_id: String, f: EntryFields) -> Result<Self, LedgerError> {
        let malformed = |what: &str| {
            LedgerError::Internal(format!("outbox entry {stream_id}: bad or missing {what}"))
        };
        let int = |value: &Option<String>, name: &str| -> Result<i64, LedgerError> {
            value
                .as_deref()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| malformed(name))
        };
        Ok(Self {
            event_id: format!("{shard}-{stream_id}"),
            kind: match f.kind.as_deref() {
                Some(name) if is_unknown_kind_name(name) => {
                    return Err(LedgerError::Internal(format!(
                        "outbox entry {stream_id}: kind {name:?} unknown to this version (a newer tollgate wrote it?)"
                    )))
                }
                kind => kind
                    .and_then(EventKind::parse)
                    .ok_or_else(|| malformed("k"))?,
            },
            amount: int(&f.amount, "n")?,
            available_after: int(&f.available_after, "v")?,
            held_after: int(&f.held_after, "h")?,
            lots: LotPiece::parse_list(f.lots.as_deref().unwrap_or_default())
                .ok_or_else(|| malformed("l"))?,
            created_at_ms: int(&f.created_at_ms, "t")?,
            version: match f.version.as_deref() {
                None => 1,
                Some(v) => v
                    .parse()
                    .ok()
                    .filter(|v| (1..=EVENT_VERSION).contains(v))
                    .ok_or_else(|| malformed("ver (a newer tollgate wrote it?)"))?,
            },
            account_id: f.account_id.unwrap_or_default(),
            wallet: f.wallet.unwrap_or_default(),
            extra: f.extra.unwrap_or_default(),
            hold_id: f.hold_id.unwrap_or_default(),
            charge_id: f.charge_id.unwrap_or_default(),
            idempotency_key: f.idempotency_key.unwrap_or_default(),
            operation: f.operation.unwrap_or_default(),
            metadata: f.metadata.unwrap_or_default(),
            member: f.member.unwrap_or_default(),
            actor: f.actor.unwrap_or_default(),
            stream_id,
        })
    }

    /// Parses an XRANGE / XREADGROUP entry list: `[[id, [field, value, ...]], ...]`.
    /// Each field is copied once, straight into its slot: no map per entry (the settler
    /// parses every event of a batch here). The reply is dropped whole at the end: moving
    /// its buffers into the events instead was measured slower (the allocator then
    /// consolidates the holes the rest of the reply leaves between them).
    pub fn from_stream_entries(shard: u16, value: Value) -> Result<Vec<Self>, LedgerError> {
        let Value::Array(entries) = &value else {
            return Err(reply_shape());
        };
        entries
            .iter()
            .map(|entry| Self::from_stream_entry(shard, entry))
            .collect()
    }

    /// Whether `name` is a field of an outbox entry this version reads.
    pub fn is_entry_field(name: &str) -> bool {
        EntryFields::default().slot(name.as_bytes()).is_some()
    }

    /// Whether an entry's fields (`[field, value, ...]`) were written by a newer tollgate,
    /// which a newer settler can read: a format version above [`EVENT_VERSION`], or a kind
    /// this version does not know whose name has the shape of one (`[a-z_]`, at most 32
    /// bytes). Kinds were added within version 1 (`member`, `allocate`, `budget`): an
    /// older settler took one for a corrupt entry and set it aside for good.
    pub fn written_by_newer_version(fields: &[Value]) -> bool {
        fn text(v: &Value) -> Option<&str> {
            match v {
                Value::BulkString(b) => std::str::from_utf8(b).ok(),
                Value::SimpleString(s) => Some(s.as_str()),
                _ => None,
            }
        }
        fields.chunks_exact(2).any(|pair| match text(&pair[0]) {
            Some("ver") => text(&pair[1])
                .and_then(|v| v.parse::<u32>().ok())
                .is_some_and(|v| v > EVENT_VERSION),
            Some("k") => text(&pair[1]).is_some_and(is_unknown_kind_name),
            _ => false,
        })
    }

    /// Parses one XRANGE / XREADGROUP entry, `[id, [field, value, ...]]`.
    pub fn from_stream_entry(shard: u16, entry: &Value) -> Result<Self, LedgerError> {
        let text = |v: &Value| match v {
            Value::BulkString(b) => std::str::from_utf8(b)
                .map(str::to_owned)
                .map_err(|_| reply_shape()),
            Value::SimpleString(s) => Ok(s.clone()),
            _ => Err(reply_shape()),
        };
        let Value::Array(parts) = entry else {
            return Err(reply_shape());
        };
        let [id, Value::Array(kv)] = parts.as_slice() else {
            return Err(reply_shape());
        };
        let mut fields = EntryFields::default();
        for pair in kv.chunks_exact(2) {
            let slot = match &pair[0] {
                Value::BulkString(b) => fields.slot(b),
                Value::SimpleString(s) => fields.slot(s.as_bytes()),
                _ => return Err(reply_shape()),
            };
            // Fields this version does not know are skipped (a newer writer's
            // additions within the same format version).
            if let Some(slot) = slot {
                *slot = Some(text(&pair[1])?);
            }
        }
        Self::from_fields(shard, text(id)?, fields)
    }
}

/// A kind name this version does not know, with the shape of one: a newer tollgate's
/// kind, not a corrupt field ([`LedgerEvent::written_by_newer_version`]).
fn is_unknown_kind_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
        && EventKind::parse(name).is_none()
}

fn reply_shape() -> LedgerError {
    LedgerError::Internal("unexpected stream reply shape".into())
}

/// One outbox entry's fields, by name (module docs).
#[derive(Default)]
struct EntryFields {
    kind: Option<String>,
    account_id: Option<String>,
    wallet: Option<String>,
    amount: Option<String>,
    available_after: Option<String>,
    held_after: Option<String>,
    lots: Option<String>,
    extra: Option<String>,
    hold_id: Option<String>,
    charge_id: Option<String>,
    idempotency_key: Option<String>,
    operation: Option<String>,
    metadata: Option<String>,
    created_at_ms: Option<String>,
    version: Option<String>,
    member: Option<String>,
    actor: Option<String>,
}

impl EntryFields {
    fn slot(&mut self, name: &[u8]) -> Option<&mut Option<String>> {
        Some(match name {
            b"k" => &mut self.kind,
            b"a" => &mut self.account_id,
            b"w" => &mut self.wallet,
            b"n" => &mut self.amount,
            b"v" => &mut self.available_after,
            b"h" => &mut self.held_after,
            b"l" => &mut self.lots,
            b"x" => &mut self.extra,
            b"hd" => &mut self.hold_id,
            b"c" => &mut self.charge_id,
            b"i" => &mut self.idempotency_key,
            b"o" => &mut self.operation,
            b"m" => &mut self.metadata,
            b"t" => &mut self.created_at_ms,
            b"ver" => &mut self.version,
            b"mb" => &mut self.member,
            b"ac" => &mut self.actor,
            _ => return None,
        })
    }
}

/// Changes to a wallet's running totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deltas {
    pub granted: i64,
    pub used: i64,
    pub expired: i64,
    pub refunded: i64,
    pub adjusted: i64,
}

impl std::ops::AddAssign for Deltas {
    fn add_assign(&mut self, o: Self) {
        self.granted += o.granted;
        self.used += o.used;
        self.expired += o.expired;
        self.refunded += o.refunded;
        self.adjusted += o.adjusted;
    }
}

/// `<ms>-<seq>` of a stream entry id.
pub fn parse_stream_id(id: &str) -> Option<(i64, i64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lot_pieces_round_trip_scores() {
        let score = 7 * LotPiece::PRIORITY_UNIT + 1_700_000_000_000;
        let pieces = LotPiece::parse_list(&format!("00000001:5:{score},00000002:3")).unwrap();
        assert_eq!(pieces[0].priority(), Some(7));
        assert_eq!(pieces[0].expires_at_ms(), Some(1_700_000_000_000));
        assert_eq!(pieces[1].score, None);
        let never = LotPiece::parse_list(&format!(
            "1:1:{}",
            50 * LotPiece::PRIORITY_UNIT + LotPiece::NEVER
        ))
        .unwrap();
        assert_eq!(never[0].expires_at_ms(), Some(0));
        assert!(LotPiece::parse_list("1:x").is_none());
        assert_eq!(LotPiece::parse_list("").unwrap(), vec![]);
    }
}
