//! Key layout: accounts map to a fixed number of virtual shards, each with its own hash
//! tag `{tg:<shard>}` and outbox stream, so every key one script touches lives in one
//! Redis Cluster slot. Hold ids and event ids carry their shard, so a Capture or a Refund
//! finds its keys without a lookup.

/// Virtual shards unless configured otherwise. Fixed for the life of a deployment:
/// changing it moves accounts to other shards, so the count is persisted (each shard's
/// [`shard_count_key`], and the store) and a process configured otherwise refuses to start
/// (`settle::shard_count`).
pub const SHARDS_DEFAULT: u16 = 16;
/// Upper bound on the shard count (the settler reads one stream per shard).
pub const SHARDS_MAX: u16 = 1024;

/// FNV-1a, 64 bits: stable across processes, versions and platforms, which shard
/// placement and idempotency digests need (std's hasher promises neither).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Largest number in an id (a hold's sequence, an event id's milliseconds and sequence):
/// Lua reads them as doubles, exact up to 2^53 - 1 (16 digits at most).
pub const ID_NUMBER_MAX: u64 = (1 << 53) - 1;

/// Whether `text` is a decimal number an id may carry: 1 to 16 digits, at most
/// [`ID_NUMBER_MAX`]. Bounds the length of every id that reaches Redis.
fn id_number(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 16
        && text.bytes().all(|b| b.is_ascii_digit())
        && text.parse::<u64>().is_ok_and(|n| n <= ID_NUMBER_MAX)
}

/// The epoch marker of any shard number, in range of this deployment or not (the shard
/// count check looks past the configured count).
pub fn epoch_key_of(shard: u16) -> String {
    format!("{{tg:{shard}}}:epoch")
}

/// The shard count the shard belongs to, "<count>": written with its epoch marker in the
/// same atomic step (`Ledger::mark_new_shard`, `Ledger::initialize_shard`, restore), and by
/// the first start that persists the count of a deployment made before it was persisted.
pub fn shard_count_key(shard: u16) -> String {
    format!("{{tg:{shard}}}:shards")
}

/// Precomputed per-shard key names.
#[derive(Debug, Clone)]
pub struct ShardMap {
    tags: Vec<String>,
    outboxes: Vec<String>,
    numbers: Vec<String>,
}

impl ShardMap {
    pub fn new(shards: u16) -> Self {
        assert!(
            (1..=SHARDS_MAX).contains(&shards),
            "shard count out of range"
        );
        let tags: Vec<String> = (0..shards).map(|s| format!("{{tg:{s}}}")).collect();
        let outboxes = tags.iter().map(|t| format!("{t}:o")).collect();
        let numbers = (0..shards).map(|s| s.to_string()).collect();
        Self {
            tags,
            outboxes,
            numbers,
        }
    }

    pub fn count(&self) -> u16 {
        self.tags.len() as u16
    }

    pub fn of_account(&self, account_id: &str) -> u16 {
        (fnv1a64(account_id.as_bytes()) % self.tags.len() as u64) as u16
    }

    pub fn tag(&self, shard: u16) -> &str {
        &self.tags[usize::from(shard)]
    }

    pub fn outbox(&self, shard: u16) -> &str {
        &self.outboxes[usize::from(shard)]
    }

    /// The shard's epoch marker (see lua/lib.lua `initialized`).
    pub fn epoch_key(&self, shard: u16) -> String {
        format!("{}:epoch", self.tag(shard))
    }

    /// The shard's persisted shard count ([`shard_count_key`]).
    pub fn count_key(&self, shard: u16) -> String {
        format!("{}:shards", self.tag(shard))
    }

    /// The span (ms) that numbers the shard's idempotency buckets, "<span>" or "<span>
    /// <previous span> <until ms>" (see lua/lib.lua `idem_numbering`). `initialized` reads
    /// it with the epoch marker; `tollgate restore` writes the span its records use.
    pub fn idem_span_key(&self, shard: u16) -> String {
        format!("{}:i:span", self.tag(shard))
    }

    pub fn number(&self, shard: u16) -> &str {
        &self.numbers[usize::from(shard)]
    }

    /// Shard of a hold id `h<shard>-<seq>`, if it is well formed (`seq` at most
    /// [`ID_NUMBER_MAX`]) and its shard in range.
    pub fn of_hold_id(&self, hold_id: &str) -> Option<u16> {
        let rest = hold_id.strip_prefix('h')?;
        let (shard, seq) = rest.split_once('-')?;
        if !id_number(seq) {
            return None;
        }
        self.checked(shard)
    }

    /// Whether `event_id` has the shape of an event id, `<shard>-<ms>-<seq>`, whatever
    /// this deployment's shard count: what a page token may carry to the store (a forged
    /// one holding a NUL byte was answered UNAVAILABLE, PostgreSQL refusing it as text).
    pub fn is_event_id(event_id: &str) -> bool {
        let Some((shard, stream_id)) = event_id.split_once('-') else {
            return false;
        };
        let Some((ms, seq)) = stream_id.split_once('-') else {
            return false;
        };
        !shard.is_empty()
            && shard.len() <= 4
            && shard.bytes().all(|b| b.is_ascii_digit())
            && id_number(ms)
            && id_number(seq)
    }

    /// Shard of an event id `<shard>-<ms>-<seq>` (also a charge id), if it is well formed
    /// (`ms` and `seq` at most [`ID_NUMBER_MAX`]) and its shard in range.
    pub fn of_event_id(&self, event_id: &str) -> Option<u16> {
        let (shard, stream_id) = event_id.split_once('-')?;
        let (ms, seq) = stream_id.split_once('-')?;
        if !id_number(ms) || !id_number(seq) {
            return None;
        }
        self.checked(shard)
    }

    /// A shard number as ids write it (decimal, at most 4 digits), if it is in range.
    pub fn checked(&self, shard: &str) -> Option<u16> {
        if shard.is_empty() || shard.len() > 4 || !shard.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let shard: u16 = shard.parse().ok()?;
        (usize::from(shard) < self.tags.len()).then_some(shard)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn ids_route_to_their_shard() {
        let map = ShardMap::new(16);
        assert_eq!(map.of_hold_id("h3-17"), Some(3));
        assert_eq!(map.of_hold_id("h16-1"), None);
        assert_eq!(map.of_hold_id("h3-"), None);
        assert_eq!(map.of_hold_id("x3-1"), None);
        assert_eq!(map.of_event_id("15-1732370000000-0"), Some(15));
        assert_eq!(map.of_event_id("15-1732370000000"), None);
        assert_eq!(map.of_event_id("a-1-0"), None);
        // Numbers Lua reads exactly, so ids stay short.
        // Hold numbers are floored by Redis's clock, ms x 1000 (lib.lua `next_seq`): 16
        // digits now, and under 2^53 until the year 2255.
        assert_eq!(map.of_hold_id("h3-1796568904123000"), Some(3));
        assert_eq!(map.of_hold_id("h3-9007199254740991"), Some(3));
        assert_eq!(map.of_hold_id("h3-9007199254740992"), None);
        assert_eq!(map.of_hold_id("h3-00000000000000001"), None);
        assert_eq!(map.of_hold_id(&format!("h3-{}", "9".repeat(1 << 20))), None);
        assert_eq!(
            map.of_event_id("3-9007199254740991-9007199254740991"),
            Some(3)
        );
        assert_eq!(map.of_event_id("3-9007199254740992-0"), None);
        assert_eq!(map.of_event_id("3-1-9007199254740992"), None);
        assert_eq!(
            map.of_event_id(&format!("3-1-{}", "1".repeat(1 << 20))),
            None
        );
        assert_eq!(map.tag(3), "{tg:3}");
        assert_eq!(map.outbox(3), "{tg:3}:o");
        assert_eq!(map.epoch_key(3), "{tg:3}:epoch");
        assert_eq!(map.idem_span_key(3), "{tg:3}:i:span");
    }

    #[test]
    fn accounts_spread_over_shards() {
        let map = ShardMap::new(16);
        let mut seen = [0u32; 16];
        for i in 0..1600 {
            seen[usize::from(map.of_account(&format!("acct-{i}")))] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    }
}
