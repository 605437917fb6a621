//! Parsing of script answers ("CODE|field|...") into outcomes and refusals. Every field
//! is checked: a malformed answer is an internal error, never a silent zero.

use super::error::BudgetScope;
use super::redis_pool::Answer;
use super::{
    DebitOutcome, EndHoldOutcome, GrantOutcome, HoldEnd, HoldOutcome, LedgerError, Lot, LotCursor,
    LotsPage, RefundOutcome, Refusal, VoidOutcome, Voided, WalletBalance,
};
use crate::ledger::command::FieldViolation;

pub(super) struct Fields<'a> {
    parts: std::str::Split<'a, char>,
    text: &'a str,
}

impl<'a> Fields<'a> {
    fn new(text: &'a str) -> Self {
        Self {
            parts: text.split('|'),
            text,
        }
    }

    pub(super) fn malformed(&self) -> LedgerError {
        LedgerError::Internal(format!("malformed script answer ({})", shape(self.text)))
    }

    pub(super) fn text(&mut self) -> Result<&'a str, LedgerError> {
        self.parts.next().ok_or_else(|| self.malformed())
    }

    /// A trailing field that only some answers carry.
    pub(super) fn optional_int(&mut self) -> Result<Option<i64>, LedgerError> {
        match self.parts.next() {
            None => Ok(None),
            Some(part) => part.parse().map(Some).map_err(|_| self.malformed()),
        }
    }

    /// The next field, if any (a list that ends the answer).
    pub(super) fn optional_text(&mut self) -> Option<&'a str> {
        self.parts.next()
    }

    pub(super) fn int(&mut self) -> Result<i64, LedgerError> {
        let part = self.text()?;
        part.parse().map_err(|_| self.malformed())
    }
}

/// What a malformed answer or row looks like, for an error that is logged: its code (the
/// first field, when it is one), how many `|`-separated fields and bytes it has — never its
/// text, which may carry an account id, a member id or a description.
pub(crate) fn shape(text: &str) -> String {
    let mut parts = text.split('|');
    let first = parts.next().unwrap_or_default();
    let code = if !first.is_empty()
        && first.len() <= 32
        && first.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
    {
        first
    } else {
        "?"
    };
    format!(
        "code {code}, {} fields, {} bytes",
        1 + parts.count(),
        text.len()
    )
}

/// Maps the refusal codes every mutation may answer; returns the fields after "OK".
pub(super) fn ok_fields(answer: &Answer) -> Result<Fields<'_>, LedgerError> {
    let mut f = Fields::new(&answer.text);
    let code = f.text()?;
    let refusal = match code {
        "OK" => return Ok(f),
        "INSUFFICIENT_CREDITS" => Refusal::InsufficientCredits {
            required: f.int()?,
            available: f.int()?,
        },
        "HOLD_ENDED" => {
            let how = match f.text()? {
                "captured" => HoldEnd::Captured,
                "released" => HoldEnd::Released,
                "expired" => HoldEnd::Expired,
                _ => return Err(f.malformed()),
            };
            Refusal::HoldEnded {
                how,
                captured: f.int()?,
            }
        }
        "DEMO_ALREADY_GRANTED" => Refusal::DemoAlreadyGranted,
        "IDEMPOTENCY_KEY_REUSED" => Refusal::IdempotencyKeyReused,
        "REFUND_EXCEEDS_CHARGE" => Refusal::RefundExceedsCharge {
            refundable: f.int()?,
        },
        "LOT_LIMIT" => Refusal::LotLimit { max: f.int()? },
        "WALLET_LIMIT" => Refusal::WalletLimit { max: f.int()? },
        "HOLD_LIMIT" => Refusal::HoldLimit { max: f.int()? },
        "MEMBER_LIMIT" => Refusal::MemberLimit { max: f.int()? },
        "ALLOCATION_EXCEEDED" => Refusal::AllocationExceeded {
            required: f.int()?,
            remaining: f.int()?,
        },
        "BUDGET_EXCEEDED" => Refusal::BudgetExceeded {
            budget: match f.text()? {
                "account" => BudgetScope::Account,
                "member" => BudgetScope::Member,
                _ => return Err(f.malformed()),
            },
            limit: f.int()?,
            spent: f.int()?,
            resets_at_ms: f.int()?,
        },
        "ORG_EXISTS" => Refusal::OrgExists,
        "BAD_FIELD" => {
            let field = f.text()?.to_owned();
            let why = f.text()?.to_owned();
            return Err(LedgerError::InvalidArgument(vec![FieldViolation::new(
                field, why,
            )]));
        }
        "OUTBOX_FULL" => return Err(LedgerError::OutboxFull),
        "EXPIRY_BACKLOG" => return Err(LedgerError::ExpiryBacklog),
        // A gateway charge that came after the void of its check (lib.lua
        // recall_charge): nothing charged; its check was answered unavailable already.
        "VOIDED" => {
            return Err(LedgerError::Unavailable(
                "the check was answered unavailable and its charge voided".into(),
            ))
        }
        "LEDGER_NOT_INITIALIZED" => return Err(LedgerError::NotInitialized),
        "NOT_FOUND" => {
            return Err(LedgerError::NotFound(match f.text()? {
                "hold" => "hold",
                "charge" => "charge",
                "budget" => "budget",
                _ => return Err(f.malformed()),
            }))
        }
        "AMOUNT_EXCEEDS_HOLD" => {
            let held = f.int()?;
            return Err(LedgerError::InvalidArgument(vec![FieldViolation::new(
                "amount",
                format!("exceeds the {held} credits held"),
            )]));
        }
        "BALANCE_LIMIT" => {
            return Err(LedgerError::InvalidArgument(vec![FieldViolation::new(
                "amount",
                "would take the balance or its totals past 2^53-1 credits",
            )]));
        }
        "EXPIRES_IN_PAST" => {
            let now = f.int()?;
            return Err(LedgerError::InvalidArgument(vec![FieldViolation::new(
                "expires_at_ms",
                format!("is not after the server time {now}"),
            )]));
        }
        _ => return Err(f.malformed()),
    };
    Err(LedgerError::Refused(refusal))
}

pub(super) fn debit(answer: &Answer) -> Result<DebitOutcome, LedgerError> {
    let mut f = ok_fields(answer)?;
    Ok(DebitOutcome {
        event_id: f.text()?.to_owned(),
        amount: f.int()?,
        available: f.int()?,
        held: f.int()?,
        // Only when an allocation or a budget bounds the caller (debit.lua).
        spendable: f.optional_int()?,
        replayed: answer.replayed,
    })
}

pub(super) fn hold(answer: &Answer) -> Result<HoldOutcome, LedgerError> {
    let mut f = ok_fields(answer)?;
    Ok(HoldOutcome {
        event_id: f.text()?.to_owned(),
        hold_id: f.text()?.to_owned(),
        amount: f.int()?,
        expires_at_ms: f.int()?,
        available: f.int()?,
        held: f.int()?,
        // Only when an allocation or a budget bounds the caller (debit.lua).
        spendable: f.optional_int()?,
        replayed: answer.replayed,
    })
}

pub(super) fn end_hold(answer: &Answer) -> Result<EndHoldOutcome, LedgerError> {
    let mut f = ok_fields(answer)?;
    Ok(EndHoldOutcome {
        event_id: f.text()?.to_owned(),
        captured: f.int()?,
        released: f.int()?,
        available: f.int()?,
        held: f.int()?,
        // Absent from answers recorded before it was added (replayed from the record).
        expired: f.optional_int()?.unwrap_or(0),
        replayed: answer.replayed,
    })
}

pub(super) fn refund(answer: &Answer) -> Result<RefundOutcome, LedgerError> {
    let mut f = ok_fields(answer)?;
    Ok(RefundOutcome {
        event_id: f.text()?.to_owned(),
        refunded: f.int()?,
        refunded_total: f.int()?,
        available: f.int()?,
        expired: f.int()?,
        replayed: answer.replayed,
    })
}

pub(super) fn void(answer: &Answer) -> Result<VoidOutcome, LedgerError> {
    let mut f = ok_fields(answer)?;
    let voided = match f.text()? {
        "VOIDED_DEBIT" => Voided::Debit {
            refund_event_id: f.text()?.to_owned(),
            charge_id: f.text()?.to_owned(),
            refunded: f.int()?,
            available: f.int()?,
        },
        "RELEASED_HOLD" => Voided::Hold {
            hold_id: f.text()?.to_owned(),
            release_event_id: f.text()?.to_owned(),
            released: f.int()?,
        },
        "NONE" => Voided::Nothing(f.text()?.to_owned()),
        _ => return Err(f.malformed()),
    };
    Ok(VoidOutcome {
        voided,
        replayed: answer.replayed,
    })
}

pub(super) fn grant(answer: &Answer) -> Result<GrantOutcome, LedgerError> {
    let mut f = ok_fields(answer)?;
    Ok(GrantOutcome {
        event_id: f.text()?.to_owned(),
        lot_id: f.text()?.to_owned(),
        available: f.int()?,
        replayed: answer.replayed,
    })
}

fn int(text: &str) -> Result<i64, LedgerError> {
    text.parse()
        .map_err(|_| LedgerError::Internal(format!("not an integer in script reply: {text:?}")))
}

pub(super) fn balances(rows: &[String]) -> Result<Vec<WalletBalance>, LedgerError> {
    if !rows.len().is_multiple_of(8) {
        return Err(LedgerError::Internal("balance reply of odd length".into()));
    }
    rows.chunks_exact(8)
        .map(|row| {
            Ok(WalletBalance {
                wallet: row[0].clone(),
                available: int(&row[1])?,
                held: int(&row[2])?,
                granted: int(&row[3])?,
                used: int(&row[4])?,
                expired: int(&row[5])?,
                refunded: int(&row[6])?,
                adjusted: int(&row[7])?,
            })
        })
        .collect()
}

pub(super) fn lots(wallet: &str, rows: &[String]) -> Result<LotsPage, LedgerError> {
    let [total, start, rows @ ..] = rows else {
        return Err(LedgerError::Internal("short lots reply".into()));
    };
    let (total, start) = (int(total)?, int(start)?);
    if !rows.len().is_multiple_of(8) {
        return Err(LedgerError::Internal("lots reply of odd length".into()));
    }
    let mut last = None;
    let lots = rows
        .chunks_exact(8)
        .map(|row| {
            last = Some((&row[6], &row[7], &row[0]));
            lot(wallet, &row[..6])
        })
        .collect::<Result<Vec<_>, _>>()?;
    let end = start + lots.len() as i64;
    let more = end < total && !lots.is_empty();
    let next = match (more, last) {
        (true, Some((index, score, lot_id))) => Some(LotCursor {
            expired: match index.as_str() {
                "l" => false,
                "x" => true,
                _ => return Err(LedgerError::Internal("lots reply with no index".into())),
            },
            score: int(score)?,
            lot_id: lot_id.clone(),
        }),
        _ => None,
    };
    Ok(LotsPage {
        lots,
        next_offset: next.as_ref().and_then(|_| u32::try_from(end).ok()),
        next,
    })
}

/// One lot from `id, remaining, held, meta, updated_at_ms, expired`, where meta is
/// `amount|priority|expires_at_ms|created_at_ms|kind|description` and expired is empty
/// for a live lot, else the credits of it that expired.
fn lot(wallet: &str, row: &[String]) -> Result<Lot, LedgerError> {
    let malformed =
        || LedgerError::Internal(format!("malformed lot record ({})", shape(&row.join("|"))));
    let mut meta = row[3].splitn(6, '|');
    let mut next = || meta.next().ok_or_else(malformed);
    let amount = int(next()?)?;
    let priority = u8::try_from(int(next()?)?).map_err(|_| malformed())?;
    let expires_at_ms = int(next()?)?;
    let created_at_ms = int(next()?)?;
    let kind = next()?.to_owned();
    let description = next()?.to_owned();
    let remaining = int(&row[1])?;
    let held = int(&row[2])?;
    let (expired, expired_credits) = match row[5].as_str() {
        "" => (false, 0),
        n => (true, int(n)?),
    };
    Ok(Lot {
        lot_id: row[0].clone(),
        wallet: wallet.to_owned(),
        kind,
        priority,
        amount,
        used: amount - remaining - held - expired_credits,
        remaining,
        held,
        expired,
        expired_credits,
        expires_at_ms,
        created_at_ms,
        updated_at_ms: int(&row[4])?,
        description,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(text: &str) -> Answer {
        Answer {
            replayed: false,
            text: text.into(),
            identity: Vec::new(),
        }
    }

    #[test]
    fn a_malformed_answer_is_described_without_its_text() {
        // A keyed debit answer carries the account; an error that is logged must not.
        match debit(&answer("OK|3-17-0|5|95|x|acct-secret-42")) {
            Err(LedgerError::Internal(why)) => {
                assert!(!why.contains("acct-secret-42"), "{why}");
                assert!(why.contains("code OK, 6 fields"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(shape("acct-1|2"), "code ?, 2 fields, 8 bytes");
    }

    #[test]
    fn parses_success_and_refusals() {
        let ok = debit(&answer("OK|3-17-0|5|95|0")).unwrap();
        assert_eq!(ok.event_id, "3-17-0");
        assert_eq!((ok.amount, ok.available, ok.held), (5, 95, 0));
        assert_eq!((ok.spendable, ok.remaining()), (None, 95));
        // Bound by an allocation or a budget: what is left of it, within the balance.
        let bound = debit(&answer("OK|3-17-0|5|95|0|10")).unwrap();
        assert_eq!((bound.spendable, bound.remaining()), (Some(10), 10));
        match debit(&answer("INSUFFICIENT_CREDITS|5|2")) {
            Err(LedgerError::Refused(Refusal::InsufficientCredits {
                required: 5,
                available: 2,
            })) => {}
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            end_hold(&answer("HOLD_ENDED|expired|7")),
            Err(LedgerError::Refused(Refusal::HoldEnded {
                how: HoldEnd::Expired,
                captured: 7
            }))
        ));
        assert!(matches!(
            debit(&answer("OUTBOX_FULL")),
            Err(LedgerError::OutboxFull)
        ));
        assert!(matches!(
            debit(&answer("VOIDED")),
            Err(LedgerError::Unavailable(_))
        ));
        assert!(matches!(
            debit(&answer("EXPIRY_BACKLOG")),
            Err(LedgerError::ExpiryBacklog)
        ));
        assert!(matches!(
            debit(&answer("OK|x|notanumber|1|1")),
            Err(LedgerError::Internal(_))
        ));
        assert!(matches!(
            debit(&answer("WHAT")),
            Err(LedgerError::Internal(_))
        ));
    }

    #[test]
    fn lot_meta_keeps_pipes_in_description() {
        let row: Vec<String> = [
            "00000001",
            "40",
            "10",
            "100|50|0|1000|purchase|a|b",
            "2000",
            "",
        ]
        .map(String::from)
        .to_vec();
        let lot = lot("default", &row).unwrap();
        assert_eq!(lot.description, "a|b");
        assert_eq!(lot.used, 50);
        assert!(!lot.expired);
    }

    #[test]
    fn an_expired_lot_counts_its_expired_credits_apart_from_used() {
        let row: Vec<String> = ["00000001", "0", "20", "100|50|900|100|promo|", "1000", "60"]
            .map(String::from)
            .to_vec();
        let lot = lot("default", &row).unwrap();
        assert!(lot.expired);
        assert_eq!(
            (lot.used, lot.remaining, lot.held, lot.expired_credits),
            (20, 0, 20, 60)
        );
    }
}
