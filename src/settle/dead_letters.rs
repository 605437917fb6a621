//! Dead letters: outbox entries the settler could not read, or whose event the store
//! refused (a NUL byte, a value out of range, a constraint: settler.rs `commit`) or holds
//! a different event's id ("event id reused by a different event": a Redis rolled back
//! with its clock behind; `replay` refuses those, the id being taken), set aside
//! in `<outbox>:dead` (settler.rs `set_aside`) as the fields `id` (the outbox entry's id),
//! `error` (why: "refused by the store: …" for the second kind), then the entry's own
//! fields. A refused one reads fine: `replay` writes it as it is once the store takes it,
//! or corrected by `--set`; until then the store's error is returned and it stays. Redis applied each of them; the store lacks it, which
//! `tollgate reconcile` reports as a drift of its wallet, and a later restore would
//! rebuild Redis without it. `tollgate dead-letters list` shows them; `replay` writes one
//! into the store under its original event id, with fields corrected by hand
//! (`--set n=5`), then deletes it; `drop` deletes one.

use redis::Value;

use super::restore::dead_letters_key;
use super::store::{Store, StoreError};
use crate::ledger::event::{LedgerEvent, LotPiece};
use crate::ledger::{Ledger, LedgerError};
use crate::webhooks::rules::Rules;

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("shard {0} does not exist (the ledger has {1})")]
    NoSuchShard(u16, u16),
    #[error("no dead letter {1} in shard {0}")]
    NotFound(u16, String),
    #[error("{0:?} is not a stream entry id (MS-SEQ)")]
    BadId(String),
    #[error(
        "dead letter {0} is not one the settler wrote (it has no `id` and `error` first): drop it (--force)"
    )]
    Malformed(String),
    #[error("dead letter {0} still does not read as a ledger event: {1}")]
    Unreadable(String, String),
    #[error("{0:?} is not a field of an outbox entry")]
    UnknownField(String),
    #[error("field {0} of dead letter {1} is not UTF-8: give its value with --set {0}=…")]
    NotUtf8(String, String),
    #[error("the event is account {0:?}'s, whose shard is {1}, not {2}")]
    WrongShard(String, u16, u16),
    #[error(
        "the store holds another event under id {0} ({1}); the dead letter is left where it is"
    )]
    Conflict(String, String),
    #[error(transparent)]
    Redis(#[from] LedgerError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One set-aside entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub shard: u16,
    /// Its id in the dead-letter stream (what `replay` and `drop` take).
    pub dead_id: String,
    /// Its id in the outbox: the event id is "<shard>-<entry_id>".
    pub entry_id: String,
    pub error: String,
    /// The entry's fields as the settler found them.
    pub fields: Vec<(String, String)>,
    /// Fields whose bytes are not UTF-8 (shown with U+FFFD in `fields`).
    pub not_utf8: Vec<String>,
    /// Not in the shape the settler writes (`id`, `error`, then the fields): `fields` holds
    /// every pair; it can only be dropped.
    pub malformed: bool,
}

impl DeadLetter {
    /// One line: where it is, why it was set aside, its fields.
    pub fn render(&self) -> String {
        let fields: Vec<String> = self
            .fields
            .iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect();
        if self.malformed {
            return format!(
                "shard {} dead {} malformed (not written by the settler) fields {}",
                self.shard,
                self.dead_id,
                fields.join(" ")
            );
        }
        format!(
            "shard {} dead {} entry {} error {:?} fields {}",
            self.shard,
            self.dead_id,
            self.entry_id,
            self.error,
            fields.join(" ")
        )
    }

    /// The outbox entry it was, with `set` applied (a field replaced, or added).
    fn corrected(&self, set: &[(String, String)]) -> Value {
        let mut fields = self.fields.clone();
        for (key, value) in set {
            match fields.iter_mut().find(|(k, _)| k == key) {
                Some(field) => field.1 = value.clone(),
                None => fields.push((key.clone(), value.clone())),
            }
        }
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        Value::Array(vec![
            bulk(&self.entry_id),
            Value::Array(
                fields
                    .iter()
                    .flat_map(|(k, v)| [bulk(k), bulk(v)])
                    .collect(),
            ),
        ])
    }
}

/// What `replay` did.
#[derive(Debug)]
pub struct Replayed {
    pub event: LedgerEvent,
    /// False when the store already held an event of this id (nothing was written).
    pub written: bool,
}

/// Every dead letter, shard by shard, oldest first.
pub async fn list(ledger: &Ledger) -> Result<Vec<DeadLetter>, DeadLetterError> {
    let mut out = Vec::new();
    for shard in 0..ledger.shards().count() {
        out.extend(read(ledger, shard, "-", "+").await?);
    }
    Ok(out)
}

/// Writes one dead letter into the store as the event it was (with `set` applied), under
/// its original event id, then deletes it. With `dry_run` it only parses it. An event
/// already in the store is not written again (event ids are unique), and the dead letter
/// is deleted all the same. Redis is not written to: it applied the event long ago.
pub async fn replay(
    ledger: &Ledger,
    store: &Store,
    webhooks: Option<&Rules>,
    shard: u16,
    dead_id: &str,
    set: &[(String, String)],
    dry_run: bool,
) -> Result<Replayed, DeadLetterError> {
    if let Some((field, _)) = set.iter().find(|(k, _)| !LedgerEvent::is_entry_field(k)) {
        return Err(DeadLetterError::UnknownField(field.clone()));
    }
    let letter = one(ledger, shard, dead_id).await?;
    if letter.malformed {
        return Err(DeadLetterError::Malformed(letter.dead_id));
    }
    if let Some(field) = letter
        .not_utf8
        .iter()
        .find(|f| !set.iter().any(|(k, _)| k == *f))
    {
        return Err(DeadLetterError::NotUtf8(field.clone(), letter.dead_id));
    }
    let event = LedgerEvent::from_stream_entry(shard, &letter.corrected(set))
        .map_err(|e| DeadLetterError::Unreadable(letter.dead_id.clone(), e.to_string()))?;
    let home = ledger.shards().of_account(&event.account_id);
    if home != shard {
        return Err(DeadLetterError::WrongShard(event.account_id, home, shard));
    }
    if dry_run {
        return Ok(Replayed {
            event,
            written: false,
        });
    }
    // No fence check: a dead letter is in this Redis's dead-letter stream (a Redis that
    // loses its data loses its dead letters too), so it belongs to the shard as it serves.
    let appended = store
        .append_batch(std::slice::from_ref(&event), None, webhooks)
        .await?;
    let written = appended.new_events.contains(&event.event_id);
    if !written {
        // Written by an earlier replay whose deletion failed, or another event holds the
        // id: the dead letter goes only in the first case.
        let held = store.event(&event.event_id).await?;
        if !held.as_ref().is_some_and(|h| same_effect(h, &event)) {
            let what = held.map_or_else(
                || "gone again".to_owned(),
                |h| format!("{} of {}", h.kind.as_str(), h.amount),
            );
            return Err(DeadLetterError::Conflict(event.event_id, what));
        }
    }
    delete(ledger, shard, &letter.dead_id).await?;
    Ok(Replayed { event, written })
}

/// Whether two events with one id are the same event: what the settler compares before
/// calling an id reused (store.rs `reused_ids`: kind, account, wallet, amount, time, lots
/// by id and amount), and the balances after it. A reused id's event of the same amount
/// and balances (a retried debit of a rolled-back Redis) is another event all the same:
/// taking it for one already written would drop the only copy of the letter.
fn same_effect(a: &LedgerEvent, b: &LedgerEvent) -> bool {
    a.kind == b.kind
        && a.account_id == b.account_id
        && a.wallet == b.wallet
        && a.amount == b.amount
        && a.created_at_ms == b.created_at_ms
        && a.available_after == b.available_after
        && a.held_after == b.held_after
        && LotPiece::same_draws(&a.lots, &b.lots)
}

/// Deletes one dead letter without replaying it (a malformed one too).
pub async fn drop_letter(
    ledger: &Ledger,
    shard: u16,
    dead_id: &str,
) -> Result<(), DeadLetterError> {
    let letter = one(ledger, shard, dead_id).await?;
    delete(ledger, shard, &letter.dead_id).await
}

async fn one(ledger: &Ledger, shard: u16, dead_id: &str) -> Result<DeadLetter, DeadLetterError> {
    let count = ledger.shards().count();
    if shard >= count {
        return Err(DeadLetterError::NoSuchShard(shard, count));
    }
    // A whole id: XRANGE reads "5" as every id of millisecond 5.
    let whole = dead_id
        .split_once('-')
        .is_some_and(|(ms, seq)| ms.parse::<u64>().is_ok() && seq.parse::<u64>().is_ok());
    if !whole {
        return Err(DeadLetterError::BadId(dead_id.to_owned()));
    }
    read(ledger, shard, dead_id, dead_id)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| DeadLetterError::NotFound(shard, dead_id.to_owned()))
}

async fn delete(ledger: &Ledger, shard: u16, dead_id: &str) -> Result<(), DeadLetterError> {
    let key = dead_letters_key(ledger.shards().outbox(shard));
    let _: i64 = ledger
        .redis()
        .query(redis::cmd("XDEL").arg(key).arg(dead_id))
        .await?;
    Ok(())
}

async fn read(
    ledger: &Ledger,
    shard: u16,
    from: &str,
    to: &str,
) -> Result<Vec<DeadLetter>, DeadLetterError> {
    let key = dead_letters_key(ledger.shards().outbox(shard));
    let reply: Value = ledger
        .redis()
        .query(redis::cmd("XRANGE").arg(key).arg(from).arg(to))
        .await?;
    let Value::Array(entries) = reply else {
        return Ok(Vec::new());
    };
    entries
        .iter()
        .filter_map(|entry| match entry {
            Value::Array(parts) => match parts.as_slice() {
                [id, Value::Array(kv)] => Some((text(id).0, kv)),
                _ => None,
            },
            _ => None,
        })
        .map(|(dead_id, kv)| {
            let mut not_utf8 = Vec::new();
            let mut pairs: Vec<(String, String)> = kv
                .chunks_exact(2)
                .map(|p| {
                    let (k, _) = text(&p[0]);
                    let (v, exact) = text(&p[1]);
                    if !exact {
                        not_utf8.push(k.clone());
                    }
                    (k, v)
                })
                .collect();
            let settlers = pairs.len() >= 2 && pairs[0].0 == "id" && pairs[1].0 == "error";
            let (entry_id, error) = if settlers {
                let mut head = pairs.drain(..2);
                let id = head.next().map(|p| p.1).unwrap_or_default();
                let error = head.next().map(|p| p.1).unwrap_or_default();
                (id, error)
            } else {
                (String::new(), String::new())
            };
            Ok(DeadLetter {
                shard,
                dead_id,
                entry_id,
                error,
                fields: pairs,
                not_utf8,
                malformed: !settlers,
            })
        })
        .collect()
}

/// A reply element as text, and whether it was exactly that (bytes that are not UTF-8 are
/// shown replaced: such a field is what `--set` is for).
fn text(v: &Value) -> (String, bool) {
    match v {
        Value::BulkString(b) => match std::str::from_utf8(b) {
            Ok(s) => (s.to_owned(), true),
            Err(_) => (String::from_utf8_lossy(b).into_owned(), false),
        },
        Value::SimpleString(s) => (s.clone(), true),
        other => (format!("{other:?}"), false),
    }
}
