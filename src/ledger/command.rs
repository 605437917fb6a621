//! Ledger commands and their validation: pure functions, checked before any script runs,
//! reporting every bad field at once.

use std::collections::BTreeMap;

use super::keys::fnv1a64;

/// Largest amount of credits anywhere: Lua numbers are doubles, exact up to 2^53 - 1.
pub const CREDITS_MAX: i64 = (1 << 53) - 1;
pub const ACCOUNT_ID_LEN_MAX: usize = 64;
pub const WALLET_LEN_MAX: usize = 32;
pub const IDEMPOTENCY_KEY_LEN_MAX: usize = 128;
pub const OPERATION_LEN_MAX: usize = 64;
pub const DESCRIPTION_LEN_MAX: usize = 256;
/// Metadata is copied into the ledger event: bounded in entries and in encoded bytes.
pub const METADATA_ENTRIES_MAX: usize = 16;
pub const METADATA_BYTES_MAX: usize = 1024;
pub const PRIORITY_MAX: u8 = 100;
pub const PRIORITY_DEFAULT: u8 = 50;
/// Longest hold: a week. Longer reservations are a different product (prepaid orders).
pub const HOLD_TTL_MS_MAX: i64 = 7 * 24 * 3_600_000;
/// Lot expiries must fit the 42 bits the burn score gives them (year 2109).
pub const EXPIRES_AT_MS_MAX: i64 = (1 << 42) - 2;
pub const DEFAULT_WALLET: &str = "default";

pub type Metadata = BTreeMap<String, String>;

/// One bad field of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// The mark of one attempt of a gateway charge ([`Debit::attempt_mark`]): 8 letters a-z,
/// random, new for every attempt. Not a secret (it tells apart two attempts of one
/// request), but it goes in no log either. Letters, so that lib.lua tells a marked
/// idempotency record from an unmarked one (an answer starts with an upper-case code).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptMark([u8; AttemptMark::LEN]);

impl AttemptMark {
    pub const LEN: usize = 8;

    /// A new random mark (26^8, ~2^37 of them). Without the system's randomness, one from
    /// the clock and a process counter: two attempts of a request still get two marks.
    pub fn random() -> Self {
        let mut random = [0u8; Self::LEN];
        if getrandom::fill(&mut random).is_err() {
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or_default();
            random = (nanos ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_le_bytes();
        }
        Self(random.map(|b| b'a' + b % 26))
    }

    /// A mark from its text: exactly 8 letters a-z.
    pub fn parse(text: &str) -> Option<Self> {
        let bytes: [u8; Self::LEN] = text.as_bytes().try_into().ok()?;
        bytes
            .iter()
            .all(u8::is_ascii_lowercase)
            .then_some(Self(bytes))
    }

    pub fn as_str(&self) -> &str {
        // Letters a-z only (random, parse): always UTF-8.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// Collects violations so a request reports all its bad fields together.
#[derive(Debug, Default)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    pub fn add(&mut self, field: &str, description: impl Into<String>) {
        self.0.push(FieldViolation::new(field, description));
    }

    pub fn finish(self) -> Result<(), Vec<FieldViolation>> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.0)
        }
    }

    pub fn account_id(&mut self, field: &str, value: &str) {
        if value.is_empty() {
            self.add(field, "is required");
        } else if value.len() > ACCOUNT_ID_LEN_MAX {
            self.add(field, format!("longer than {ACCOUNT_ID_LEN_MAX} bytes"));
        } else if !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'@'))
        {
            self.add(field, "may hold only letters, digits and _ - . @");
        }
    }

    /// An optional org member: empty, or an account id other than the org's.
    pub fn member_id(&mut self, field: &str, value: &str, org: &str) {
        if value.is_empty() {
            return;
        }
        self.account_id(field, value);
        if value == org {
            self.add(field, "must not be the organization itself");
        }
    }

    pub fn wallet(&mut self, field: &str, value: &str) {
        if value.len() > WALLET_LEN_MAX {
            self.add(field, format!("longer than {WALLET_LEN_MAX} bytes"));
        } else if !value.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'.')
        }) {
            self.add(field, "may hold only lowercase letters, digits and _ - .");
        }
    }

    /// A mark only on a priced charge (its digest argument carries it after both forms).
    pub fn attempt_mark(&mut self, mark: &Option<AttemptMark>, price_inputs: &Option<String>) {
        if mark.is_some() && price_inputs.is_none() {
            self.add("attempt_mark", "only for a charge with price inputs");
        }
    }

    pub fn idempotency_key(&mut self, field: &str, value: &str) {
        if value.is_empty() {
            self.add(field, "is required");
        } else if value.len() > IDEMPOTENCY_KEY_LEN_MAX {
            self.add(
                field,
                format!("longer than {IDEMPOTENCY_KEY_LEN_MAX} bytes"),
            );
        } else if !value.bytes().all(|b| b.is_ascii_graphic()) {
            self.add(field, "may hold only printable ASCII without spaces");
        }
    }

    pub fn operation(&mut self, field: &str, value: &str) {
        if value.len() > OPERATION_LEN_MAX {
            self.add(field, format!("longer than {OPERATION_LEN_MAX} bytes"));
        } else if !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'/' | b':'))
        {
            self.add(field, "may hold only letters, digits and _ - . / :");
        }
    }

    pub fn description(&mut self, field: &str, value: &str) {
        if value.len() > DESCRIPTION_LEN_MAX {
            self.add(field, format!("longer than {DESCRIPTION_LEN_MAX} bytes"));
        } else if value.chars().any(char::is_control) {
            self.add(field, "may not hold control characters");
        }
    }

    pub fn credits(&mut self, field: &str, value: i64) {
        if !(1..=CREDITS_MAX).contains(&value) {
            self.add(field, format!("must be in 1..={CREDITS_MAX}"));
        }
    }

    pub fn metadata(&mut self, field: &str, value: &Metadata) {
        if value.len() > METADATA_ENTRIES_MAX {
            self.add(field, format!("more than {METADATA_ENTRIES_MAX} entries"));
        } else if encode_metadata(value).len() > METADATA_BYTES_MAX {
            self.add(
                field,
                format!("larger than {METADATA_BYTES_MAX} bytes encoded"),
            );
        } else if value.keys().any(|k| k.is_empty()) {
            self.add(field, "keys may not be empty");
        }
    }

    pub fn priority(&mut self, field: &str, value: Option<i32>) {
        if let Some(p) = value {
            if !(0..=i32::from(PRIORITY_MAX)).contains(&p) {
                self.add(field, format!("must be in 0..={PRIORITY_MAX}"));
            }
        }
    }

    pub fn expires_at_ms(&mut self, field: &str, value: i64) {
        if !(0..=EXPIRES_AT_MS_MAX).contains(&value) {
            self.add(
                field,
                format!("must be 0 (never) or a time in ms up to {EXPIRES_AT_MS_MAX}"),
            );
        }
    }
}

/// Metadata as it goes into the ledger event: compact JSON with sorted keys (a BTreeMap),
/// so the same map always encodes, and digests, the same way. Empty map: empty string.
pub fn encode_metadata(metadata: &Metadata) -> String {
    if metadata.is_empty() {
        return String::new();
    }
    serde_json::to_string(metadata).unwrap_or_default()
}

/// A wallet field as the ledger reads it: empty means the default wallet.
pub fn wallet_or_default(wallet: String) -> String {
    if wallet.is_empty() {
        DEFAULT_WALLET.to_owned()
    } else {
        wallet
    }
}

/// [`wallet_or_default`], borrowed.
pub fn wallet_str_or_default(wallet: &str) -> &str {
    if wallet.is_empty() {
        DEFAULT_WALLET
    } else {
        wallet
    }
}

/// Digest of a request's parameters, stored with its idempotency record: 16 hex digits.
/// Parts are length-prefixed so no two parameter lists digest alike by concatenation.
pub fn digest(parts: &[&str]) -> String {
    // FNV-1a over the same bytes as `fnv1a64(len ‖ part ‖ len ‖ part …)`, streamed: no
    // buffer on the hot path.
    let mut hash = fnv1a64(&[]);
    let mut feed = |bytes: &[u8]| {
        for byte in bytes {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for part in parts {
        feed(&(part.len() as u64).to_le_bytes());
        feed(part.as_bytes());
    }
    format!("{hash:016x}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LotKind {
    Purchase,
    Demo,
    Promo,
    Adjustment,
}

impl LotKind {
    pub const NAMES: &'static str = "purchase, demo, promo, adjustment";

    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "" | "purchase" => Self::Purchase,
            "demo" => Self::Demo,
            "promo" => Self::Promo,
            "adjustment" => Self::Adjustment,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Purchase => "purchase",
            Self::Demo => "demo",
            Self::Promo => "promo",
            Self::Adjustment => "adjustment",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnExpiry {
    Capture,
    Release,
}

impl OnExpiry {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "" | "release" => Some(Self::Release),
            "capture" => Some(Self::Capture),
            _ => None,
        }
    }

    /// The one-letter code stored in the hold record.
    pub fn code(self) -> &'static str {
        match self {
            Self::Capture => "c",
            Self::Release => "r",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Debit {
    pub account_id: String,
    pub wallet: String,
    pub amount: i64,
    pub idempotency_key: String,
    pub operation: String,
    pub metadata: Metadata,
    /// Org workspace: `account_id` is the organization and this member's allocation and
    /// budget bound the charge. Empty: a personal charge.
    pub member_id: String,
    /// What a price book priced the charge from, when `amount` is the book's answer rather
    /// than the caller's own (a gateway check: [`crate::gateway::pricing::Quote`]). Its
    /// request digest then covers these instead of the amount, so a retry priced by a book
    /// reloaded since is the same request and replays its first answer. None: the caller
    /// named the amount (the API), and the digest covers it.
    pub price_inputs: Option<String>,
    /// This attempt's mark ([`AttemptMark`]), for a priced charge that a later attempt of
    /// the same request may replay (a gateway check keyed by the client's request id): the
    /// idempotency record the charge makes keeps it, and a void of an attempt whose mark
    /// differs leaves that charge alone (lua/void.lua). Needs `price_inputs`. None: no
    /// mark (the API's charges, which are never voided).
    pub attempt_mark: Option<AttemptMark>,
}

impl Debit {
    pub fn validate(&self) -> Result<(), Vec<FieldViolation>> {
        let mut v = Violations::default();
        v.account_id("account_id", &self.account_id);
        self.charge_fields(&mut v);
        v.member_id("member_id", &self.member_id, &self.account_id);
        v.finish()
    }

    /// The fields of the charge itself, for a debit whose account an API key decides
    /// ([`crate::ledger::Ledger::debit_by_key`]).
    pub fn validate_charge(&self) -> Result<(), Vec<FieldViolation>> {
        let mut v = Violations::default();
        self.charge_fields(&mut v);
        v.finish()
    }

    fn charge_fields(&self, v: &mut Violations) {
        v.wallet("wallet", &self.wallet);
        v.credits("amount", self.amount);
        v.idempotency_key("idempotency_key", &self.idempotency_key);
        v.operation("operation", &self.operation);
        v.metadata("metadata", &self.metadata);
        v.attempt_mark(&self.attempt_mark, &self.price_inputs);
    }

    pub fn normalized(mut self) -> Self {
        self.wallet = wallet_or_default(self.wallet);
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorize {
    pub account_id: String,
    pub wallet: String,
    pub amount: i64,
    pub ttl_ms: i64,
    pub on_expiry: OnExpiry,
    pub idempotency_key: String,
    pub operation: String,
    pub metadata: Metadata,
    /// As [`Debit::member_id`].
    pub member_id: String,
    /// As [`Debit::price_inputs`]; the digest then leaves out the TTL and the expiry
    /// policy too (the book's, not the caller's).
    pub price_inputs: Option<String>,
    /// As [`Debit::attempt_mark`].
    pub attempt_mark: Option<AttemptMark>,
}

impl Authorize {
    pub fn validate(&self) -> Result<(), Vec<FieldViolation>> {
        let mut v = Violations::default();
        v.account_id("account_id", &self.account_id);
        self.charge_fields(&mut v);
        v.member_id("member_id", &self.member_id, &self.account_id);
        v.finish()
    }

    /// The fields of the hold itself, for a hold whose account an API key decides
    /// ([`crate::ledger::Ledger::authorize_by_key`]).
    pub fn validate_charge(&self) -> Result<(), Vec<FieldViolation>> {
        let mut v = Violations::default();
        self.charge_fields(&mut v);
        v.finish()
    }

    fn charge_fields(&self, v: &mut Violations) {
        v.wallet("wallet", &self.wallet);
        v.credits("amount", self.amount);
        if !(1..=HOLD_TTL_MS_MAX).contains(&self.ttl_ms) {
            v.add("ttl_ms", format!("must be in 1..={HOLD_TTL_MS_MAX}"));
        }
        v.idempotency_key("idempotency_key", &self.idempotency_key);
        v.operation("operation", &self.operation);
        v.metadata("metadata", &self.metadata);
        v.attempt_mark(&self.attempt_mark, &self.price_inputs);
    }

    pub fn normalized(mut self) -> Self {
        self.wallet = wallet_or_default(self.wallet);
        self
    }
}

/// Capture (with an amount, None = all of it) or Release (amount Some(0) is not the same:
/// a capture of 0 is recorded as a capture).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndHold {
    pub hold_id: String,
    pub capture: Option<Option<i64>>,
    pub idempotency_key: String,
    pub metadata: Metadata,
}

impl EndHold {
    pub fn capture(hold_id: String, amount: Option<i64>, idempotency_key: String) -> Self {
        Self {
            hold_id,
            capture: Some(amount),
            idempotency_key,
            metadata: Metadata::new(),
        }
    }

    pub fn release(hold_id: String, idempotency_key: String) -> Self {
        Self {
            hold_id,
            capture: None,
            idempotency_key,
            metadata: Metadata::new(),
        }
    }

    /// `routable`: whether the hold id names a shard of this deployment.
    pub fn validate(&self, routable: bool) -> Result<(), Vec<FieldViolation>> {
        let mut v = Violations::default();
        if self.hold_id.is_empty() {
            v.add("hold_id", "is required");
        } else if !routable {
            v.add("hold_id", "is not a tollgate hold id");
        }
        if let Some(Some(amount)) = self.capture {
            if !(0..=CREDITS_MAX).contains(&amount) {
                v.add("amount", format!("must be in 0..={CREDITS_MAX}"));
            }
        }
        v.idempotency_key("idempotency_key", &self.idempotency_key);
        v.metadata("metadata", &self.metadata);
        v.finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refund {
    pub charge_id: String,
    pub amount: i64,
    pub idempotency_key: String,
    pub metadata: Metadata,
}

impl Refund {
    /// `routable`: whether the charge id names a shard of this deployment.
    pub fn validate(&self, routable: bool) -> Result<(), Vec<FieldViolation>> {
        let mut v = Violations::default();
        if self.charge_id.is_empty() {
            v.add("charge_id", "is required");
        } else if !routable {
            v.add("charge_id", "is not a tollgate charge (event) id");
        }
        v.credits("amount", self.amount);
        v.idempotency_key("idempotency_key", &self.idempotency_key);
        v.metadata("metadata", &self.metadata);
        v.finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub account_id: String,
    pub wallet: String,
    pub amount: i64,
    pub kind: LotKind,
    pub priority: u8,
    pub expires_at_ms: i64,
    pub description: String,
    pub idempotency_key: String,
    pub metadata: Metadata,
}

/// A Grant as it arrives, before its kind and priority are parsed.
#[derive(Debug, Clone, Default)]
pub struct GrantInput {
    pub account_id: String,
    pub wallet: String,
    pub amount: i64,
    pub kind: String,
    pub priority: Option<i32>,
    pub expires_at_ms: i64,
    pub description: String,
    pub idempotency_key: String,
    pub metadata: Metadata,
}

impl GrantInput {
    pub fn into_command(self) -> Result<Grant, Vec<FieldViolation>> {
        let mut v = Violations::default();
        v.account_id("account_id", &self.account_id);
        v.wallet("wallet", &self.wallet);
        v.credits("amount", self.amount);
        let kind = LotKind::parse(&self.kind);
        if kind.is_none() {
            v.add("kind", format!("must be one of {}", LotKind::NAMES));
        }
        v.priority("priority", self.priority);
        v.expires_at_ms("expires_at_ms", self.expires_at_ms);
        v.description("description", &self.description);
        v.idempotency_key("idempotency_key", &self.idempotency_key);
        v.metadata("metadata", &self.metadata);
        v.finish()?;
        Ok(Grant {
            account_id: self.account_id,
            wallet: wallet_or_default(self.wallet),
            amount: self.amount,
            kind: kind.unwrap_or(LotKind::Purchase),
            priority: priority_or_default(self.priority),
            expires_at_ms: self.expires_at_ms,
            description: self.description,
            idempotency_key: self.idempotency_key,
            metadata: self.metadata,
        })
    }
}

fn priority_or_default(priority: Option<i32>) -> u8 {
    priority
        .and_then(|p| u8::try_from(p).ok())
        .unwrap_or(PRIORITY_DEFAULT)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adjust {
    pub account_id: String,
    pub wallet: String,
    pub amount: i64,
    pub priority: u8,
    pub expires_at_ms: i64,
    pub description: String,
    pub idempotency_key: String,
    pub metadata: Metadata,
}

#[derive(Debug, Clone, Default)]
pub struct AdjustInput {
    pub account_id: String,
    pub wallet: String,
    pub amount: i64,
    pub priority: Option<i32>,
    pub expires_at_ms: i64,
    pub description: String,
    pub idempotency_key: String,
    pub metadata: Metadata,
}

impl AdjustInput {
    pub fn into_command(self) -> Result<Adjust, Vec<FieldViolation>> {
        let mut v = Violations::default();
        v.account_id("account_id", &self.account_id);
        v.wallet("wallet", &self.wallet);
        if self.amount == 0 || !(-CREDITS_MAX..=CREDITS_MAX).contains(&self.amount) {
            v.add(
                "amount",
                format!("must be non-zero and in -{CREDITS_MAX}..={CREDITS_MAX}"),
            );
        }
        if self.amount < 0 {
            // A negative adjustment takes credits from the lots there are and makes none:
            // a lot's settings would be ignored, and the caller would think they took effect.
            const NO_LOT: &str =
                "only for a positive adjustment (a negative one takes credits and makes no lot)";
            if self.priority.is_some() {
                v.add("priority", NO_LOT);
            }
            if self.expires_at_ms != 0 {
                v.add("expires_at_ms", NO_LOT);
            }
        } else {
            v.priority("priority", self.priority);
            v.expires_at_ms("expires_at_ms", self.expires_at_ms);
        }
        v.description("description", &self.description);
        v.idempotency_key("idempotency_key", &self.idempotency_key);
        v.metadata("metadata", &self.metadata);
        v.finish()?;
        Ok(Adjust {
            account_id: self.account_id,
            wallet: wallet_or_default(self.wallet),
            amount: self.amount,
            priority: priority_or_default(self.priority),
            expires_at_ms: self.expires_at_ms,
            description: self.description,
            idempotency_key: self.idempotency_key,
            metadata: self.metadata,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn debit() -> Debit {
        Debit {
            account_id: "acct_1".into(),
            wallet: "default".into(),
            amount: 5,
            idempotency_key: "req-1".into(),
            operation: "envelope.send".into(),
            metadata: Metadata::new(),
            member_id: String::new(),
            price_inputs: None,
            attempt_mark: None,
        }
    }

    #[test]
    fn every_bad_field_is_reported() {
        let bad = Debit {
            account_id: "has space".into(),
            wallet: "Upper".into(),
            amount: 0,
            idempotency_key: String::new(),
            operation: "op with space".into(),
            metadata: Metadata::new(),
            member_id: String::new(),
            price_inputs: None,
            attempt_mark: None,
        };
        let fields: Vec<String> = bad
            .validate()
            .unwrap_err()
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(
            fields,
            [
                "account_id",
                "wallet",
                "amount",
                "idempotency_key",
                "operation"
            ]
        );
        assert!(debit().validate().is_ok());
    }

    #[test]
    fn amounts_are_bounded_by_double_precision() {
        let mut d = debit();
        d.amount = CREDITS_MAX;
        assert!(d.validate().is_ok());
        d.amount = CREDITS_MAX + 1;
        assert_eq!(d.validate().unwrap_err()[0].field, "amount");
        d.amount = -1;
        assert_eq!(d.validate().unwrap_err()[0].field, "amount");
    }

    #[test]
    fn metadata_is_bounded() {
        let mut d = debit();
        d.metadata = (0..17).map(|i| (format!("k{i}"), "v".into())).collect();
        assert_eq!(d.validate().unwrap_err()[0].field, "metadata");
        d.metadata = [("k".to_owned(), "x".repeat(2000))].into();
        assert_eq!(d.validate().unwrap_err()[0].field, "metadata");
    }

    #[test]
    fn digest_separates_parameters() {
        // Stored records were written with the buffered form: the digest must not change.
        let mut bytes = Vec::new();
        for part in ["debit", "default", "5"] {
            bytes.extend_from_slice(&(part.len() as u64).to_le_bytes());
            bytes.extend_from_slice(part.as_bytes());
        }
        assert_eq!(
            digest(&["debit", "default", "5"]),
            format!("{:016x}", fnv1a64(&bytes))
        );
        assert_ne!(digest(&["ab", "c"]), digest(&["a", "bc"]));
        assert_eq!(digest(&["a", "b"]), digest(&["a", "b"]));
        assert_eq!(digest(&["a"]).len(), 16);
    }

    #[test]
    fn grant_defaults_and_kinds() {
        let g = GrantInput {
            account_id: "a".into(),
            amount: 10,
            idempotency_key: "k".into(),
            ..Default::default()
        }
        .into_command()
        .unwrap();
        assert_eq!(g.wallet, "default");
        assert_eq!(g.kind, LotKind::Purchase);
        assert_eq!(g.priority, PRIORITY_DEFAULT);
        let err = GrantInput {
            account_id: "a".into(),
            amount: 10,
            kind: "gift".into(),
            priority: Some(101),
            expires_at_ms: -1,
            idempotency_key: "k".into(),
            ..Default::default()
        }
        .into_command()
        .unwrap_err();
        let fields: Vec<&str> = err.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["kind", "priority", "expires_at_ms"]);
    }
}
