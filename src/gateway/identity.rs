//! API keys and the identity they prove: who pays for a request.
//!
//! A key is `tg_<key_id>_<secret>`: `key_id` is `k<shard>-<16 hex>`, public (listed,
//! used to revoke) and routes to the shard of the account the key was made for; the
//! secret is 256 random bits in hex. Redis stores only the SHA-256 of the whole key, in a
//! record under the account's shard hash tag, so creating, revoking and listing touch one
//! Cluster slot. A key is bound to its account for life (the record is never re-pointed).
//!
//! Lookups are cached in process, bounded in entries and in time: a revoked key keeps
//! working on other sidecars for at most `gateway.identity_cache_ttl_ms` (the sidecar that
//! revokes it caches it as revoked at once). A key enters the cache on its second miss
//! within a TTL ([`Doorkeeper`]), so keys used less often than that (a million keys used
//! evenly) do not churn the cache; a key that is not well-formed never enters it. An
//! expired answer stays in the cache until it is replaced or evicted: while Redis is
//! unavailable, a key it last said was revoked or unknown is still refused
//! ([`KeyMiss::refused`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::Script;
use sha2::{Digest, Sha256};

use crate::api::auth::constant_time_eq;
use crate::gateway::spool::Payer;
use crate::ledger::command::{Violations, DESCRIPTION_LEN_MAX};
use crate::ledger::keys::ShardMap;
use crate::ledger::{FieldViolation, LedgerError, RedisPool, Refusal};

pub const API_KEY_PREFIX: &str = "tg_";
/// How long a looked-up key (valid, revoked or unknown) is trusted without asking Redis:
/// the longest a revocation takes to reach every sidecar.
pub const DEFAULT_IDENTITY_CACHE_TTL: Duration = Duration::from_secs(10);
/// Keys remembered per process.
pub const DEFAULT_IDENTITY_CACHE_ENTRIES_MAX: usize = 100_000;
pub const DEFAULT_KEYS_PER_ACCOUNT_MAX: u32 = 100;
/// How long a revoked key's record is kept after its revocation
/// (`gateway.revoked_key_retention_secs`): then the account's next key creation or
/// revocation drops it (lua/key_prune.lua), and the key answers as unknown instead of
/// revoked.
pub const DEFAULT_REVOKED_KEY_RETENTION: Duration = Duration::from_secs(30 * 86_400);
pub const KEY_NAME_LEN_MAX: usize = 64;
const KEY_ID_RANDOM_HEX_LEN: usize = 16;
const SECRET_HEX_LEN: usize = 64;

/// Who a valid key belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub account_id: String,
    /// An org workspace key bound to a member: their allocation and budget apply.
    pub member_id: String,
}

/// What an org workspace key is bound to, besides its account (the org).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyBinding {
    /// The organization: the key is checked against it when made (the actor's role, the
    /// member's membership). Empty for a personal key.
    pub org_id: String,
    pub member_id: String,
    /// The owner or admin who makes an org key.
    pub actor_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("unknown api key")]
    Unknown,
    #[error("revoked api key")]
    Revoked,
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    /// The key's shard has no epoch marker: Redis lost its data (until `tollgate
    /// restore`), so a missing key record says nothing about the key.
    #[error("ledger not initialized")]
    NotInitialized,
    #[error("internal: {0}")]
    Internal(String),
}

/// A key as created: the secret is shown once and never stored (nor printed by `Debug`).
#[derive(Clone)]
pub struct CreatedKey {
    pub key_id: String,
    pub api_key: String,
    /// SHA-256 of the key, hex: what the durable ledger keeps.
    pub digest_hex: String,
    pub created_at_ms: i64,
    /// A repeat of an earlier creation (same idempotency key): the key it made, whose
    /// secret (`api_key`, empty here) was only in that first answer.
    pub replayed: bool,
}

impl std::fmt::Debug for CreatedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedKey")
            .field("key_id", &self.key_id)
            .field("api_key", &"<redacted>")
            .field("digest_hex", &self.digest_hex)
            .field("created_at_ms", &self.created_at_ms)
            .field("replayed", &self.replayed)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub key_id: String,
    pub member_id: String,
    /// The owner or admin who made an org key ("" for a personal key, or an org key made
    /// before keys named their maker).
    pub created_by: String,
    pub name: String,
    pub created_at_ms: i64,
    /// 0 while the key is active.
    pub revoked_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedKey {
    pub key_id: String,
    pub account_id: String,
    pub revoked_at_ms: i64,
    pub already_revoked: bool,
}

/// The key id of a well-formed key, and its shard. Pure: no Redis.
pub fn parse_key<'a>(key: &'a str, shards: &ShardMap) -> Option<(&'a str, u16)> {
    let rest = key.strip_prefix(API_KEY_PREFIX)?;
    let (key_id, secret) = rest.split_once('_')?;
    if secret.len() != SECRET_HEX_LEN || !secret.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some((key_id, shard_of_key_id(key_id, shards)?))
}

/// The shard of a key id `k<shard>-<16 hex>`.
pub fn shard_of_key_id(key_id: &str, shards: &ShardMap) -> Option<u16> {
    let (shard, random) = key_id.strip_prefix('k')?.split_once('-')?;
    if random.len() != KEY_ID_RANDOM_HEX_LEN || !random.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    shards.checked(shard)
}

/// SHA-256 of a whole key. Keys are 256-bit random secrets, so a fast hash is right (no
/// password stretching needed).
pub fn key_digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    out
}

fn random_hex(bytes: usize) -> Result<String, LedgerError> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf)
        .map_err(|e| LedgerError::Internal(format!("no randomness for a key: {e}")))?;
    Ok(hex(&buf))
}

/// The account and member a key id is bound to, read straight from Redis (GetBalance by
/// key id). NotInitialized when the key's shard has no epoch marker (Redis lost its data:
/// the key may well exist in the durable ledger), not NotFound. A revoked key is refused
/// (`KeyRevoked`, with when), as the gateway refuses it: it answers for no one any more;
/// NotFound once its record is dropped, `gateway.revoked_key_retention_secs` after the
/// revocation (lua/key_prune.lua).
pub async fn key_binding(
    ledger: &crate::ledger::Ledger,
    key_id: &str,
) -> Result<(String, String), LedgerError> {
    let shards = ledger.shards();
    let shard = shard_of_key_id(key_id, shards).ok_or_else(|| {
        LedgerError::InvalidArgument(vec![FieldViolation::new(
            "key_id",
            "is not a tollgate key id",
        )])
    })?;
    // One transaction (both keys carry the shard's hash tag): the marker and the record
    // are read at the same moment.
    let mut pipe = redis::pipe();
    pipe.atomic()
        .cmd("EXISTS")
        .arg(shards.epoch_key(shard))
        .cmd("HMGET")
        .arg(format!("{}:k:{key_id}", shards.tag(shard)))
        .arg("a")
        .arg("mb")
        .arg("r");
    let (initialized, fields): (i64, Vec<Option<String>>) =
        ledger.redis().call_pipeline(&pipe).await?;
    if initialized != 1 {
        return Err(LedgerError::NotInitialized);
    }
    match fields.as_slice() {
        [Some(_), _, Some(revoked)] => Err(LedgerError::Refused(Refusal::KeyRevoked {
            revoked_at_ms: revoked.parse().map_err(|_| {
                LedgerError::Internal(format!("key {key_id}: malformed revocation time"))
            })?,
        })),
        [Some(account), member, None] => Ok((account.clone(), member.clone().unwrap_or_default())),
        _ => Err(LedgerError::NotFound("api key")),
    }
}

/// What is known about a presented key (the cache keeps it by the key's digest).
#[derive(Debug, Clone)]
pub enum Known {
    Active(Arc<Identity>),
    Revoked,
    Unknown,
}

/// A presented key, as the cache sees it.
pub enum Presented<'k> {
    /// A fresh answer from the cache (or a key that is not even well-formed).
    Known(Result<Arc<Identity>, IdentityError>),
    /// Redis must be asked.
    Miss(KeyMiss<'k>),
}

/// A well-formed key the cache does not know: its id, its shard and its digest.
#[derive(Debug, Clone)]
pub struct KeyMiss<'k> {
    pub key_id: &'k str,
    pub shard: u16,
    digest: [u8; 32],
    /// The expired answer the cache holds for the key: the new one replaces it whatever
    /// the doorkeeper says (the fail-open spool reads answers however old), and while
    /// Redis is unavailable a revoked or unknown one still refuses the key
    /// ([`KeyMiss::refused`]).
    stale: Option<Known>,
    /// This process's revocations before the lookup ([`KeyStore::learn`]).
    revocations: u64,
    /// When the lookup began: an answer's age counts from here, not from its arrival, so
    /// a slow call does not stretch how long a key another sidecar revoked still works
    /// (at most `gateway.identity_cache_ttl_ms` after Redis read it as active).
    asked: Instant,
}

impl KeyMiss<'_> {
    /// SHA-256 of the presented key, hex: what the key record stores.
    pub fn digest_hex(&self) -> String {
        hex(&self.digest)
    }

    /// The key proved to belong to `account_id` (and `member_id` for an org key).
    pub fn active(&self, account_id: String, member_id: String) -> Known {
        Known::Active(Arc::new(Identity {
            account_id,
            member_id,
        }))
    }

    /// The answer for the key while Redis is unavailable: refused as revoked or unknown
    /// when that is what the cache's expired entry for it says (a revocation is for good,
    /// and an unknown key could only become known by a creation that chose its random id
    /// and secret), so a fail_open route does not let it through; `None` (the fail policy
    /// decides) for a key last known active or not cached at all.
    pub fn refused(&self) -> Option<IdentityError> {
        match self.stale {
            Some(Known::Revoked) => Some(IdentityError::Revoked),
            Some(Known::Unknown) => Some(IdentityError::Unknown),
            Some(Known::Active(_)) | None => None,
        }
    }
}

#[derive(Debug, Clone)]
struct Cached {
    known: Known,
    at: Instant,
}

/// The doorkeeper is cleared at most this often, whatever the cache TTL: clearing takes
/// the request that finds it due a moment, and a longer period only lets more keys in.
const DOORKEEPER_PERIOD_MIN_MS: u64 = 1_000;

/// Which keys missed the cache lately (TinyLFU's doorkeeper): a bit array that two bits
/// of a key's digest (SHA-256, so already uniform) mark, cleared once per cache TTL (at
/// most once a second). An answer is remembered only for a key marked before: an entry
/// lives at most a TTL, so a key that does not come back within one would only have cost
/// an insertion, an eviction and the allocations of both. A key in steady use misses
/// twice instead of once when it first comes (three times when a clearing falls
/// between); then its expired entry lets the next answer in ([`KeyMiss`]'s `stale`).
struct Doorkeeper {
    words: Box<[AtomicU64]>,
    /// The number of bits minus one (a power of two).
    mask: u64,
    started: Instant,
    /// When the bits were last cleared, in ms since `started`.
    cleared_ms: AtomicU64,
    period_ms: u64,
}

impl Doorkeeper {
    /// At least 16 bits per cache entry (2^21 for the default 100,000), at most 2^24 (2 MiB,
    /// cleared in well under a millisecond). With n keys marked since the last clearing
    /// out of m bits, an unmarked key passes for a marked one with probability
    /// (1 - e^(-2n/m))^2: 0.8% for n = 100,000 at the default size, 3% for 200,000.
    fn new(entries_max: usize, period: Duration, now: Instant) -> Self {
        let bits = entries_max
            .saturating_mul(16)
            .clamp(1 << 12, 1 << 24)
            .next_power_of_two();
        Self {
            words: (0..bits / 64).map(|_| AtomicU64::new(0)).collect(),
            mask: bits as u64 - 1,
            started: now,
            cleared_ms: AtomicU64::new(0),
            period_ms: u64::try_from(period.as_millis())
                .unwrap_or(u64::MAX)
                .max(DOORKEEPER_PERIOD_MIN_MS),
        }
    }

    /// Marks the key; answers whether it was marked already since the last clearing.
    fn mark(&self, digest: &[u8; 32], now: Instant) -> bool {
        self.clear_if_due(now);
        let mut seen = true;
        for half in digest.chunks_exact(8).take(2) {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(half);
            let n = u64::from_le_bytes(bytes) & self.mask;
            let bit = 1u64 << (n & 63);
            let word = &self.words[(n >> 6) as usize];
            seen &= word.fetch_or(bit, Ordering::Relaxed) & bit != 0;
        }
        seen
    }

    fn clear_if_due(&self, now: Instant) {
        let now_ms = u64::try_from(now.saturating_duration_since(self.started).as_millis())
            .unwrap_or(u64::MAX);
        let cleared = self.cleared_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(cleared) < self.period_ms {
            return;
        }
        // One caller clears; a mark set meanwhile may be lost, which costs one more miss.
        if self
            .cleared_ms
            .compare_exchange(cleared, now_ms, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            for word in self.words.iter() {
                word.store(0, Ordering::Relaxed);
            }
        }
    }
}

struct KeyScripts {
    create: Script,
    revoke: Script,
    list: Script,
}

/// The scripts that create and revoke keys drop the account's long-revoked keys
/// (lua/key_prune.lua, prepended to each).
macro_rules! pruning_script {
    ($file:literal) => {
        Script::new(concat!(
            include_str!("lua/key_prune.lua"),
            "\n",
            include_str!($file)
        ))
    };
}

/// API keys in Redis, with the in-process identity cache.
pub struct KeyStore {
    redis: RedisPool,
    shards: ShardMap,
    scripts: KeyScripts,
    cache: quick_cache::sync::Cache<[u8; 32], Cached>,
    doorkeeper: Doorkeeper,
    /// Keys this process revoked: an answer read from Redis before a revocation must not
    /// replace the revoked entry the revocation left in the cache.
    revocations: AtomicU64,
    cache_ttl: Duration,
    keys_per_account_max: String,
    /// How long a key creation's idempotency record lives (ms, as a script argument).
    idempotency_window_ms: String,
    /// How long a revoked key's record is kept (ms, as a script argument).
    revoked_key_retention_ms: String,
    /// The ledger's clock: key records are stamped with the time its scripts take.
    clock: crate::ledger::Clock,
}

impl KeyStore {
    pub fn new(
        redis: RedisPool,
        shards: ShardMap,
        cache_ttl: Duration,
        cache_entries_max: usize,
        keys_per_account_max: u32,
    ) -> Self {
        Self {
            redis,
            shards,
            scripts: KeyScripts {
                create: pruning_script!("lua/key_create.lua"),
                revoke: pruning_script!("lua/key_revoke.lua"),
                list: Script::new(include_str!("lua/key_list.lua")),
            },
            cache: {
                // Registered at 0 so the series exist before the first check.
                metrics::counter!(crate::telemetry::metrics::IDENTITY_CACHE_HITS_TOTAL)
                    .increment(0);
                metrics::counter!(crate::telemetry::metrics::IDENTITY_CACHE_MISSES_TOTAL)
                    .increment(0);
                quick_cache::sync::Cache::new(cache_entries_max.max(1))
            },
            doorkeeper: Doorkeeper::new(cache_entries_max, cache_ttl, Instant::now()),
            revocations: AtomicU64::new(0),
            cache_ttl,
            keys_per_account_max: keys_per_account_max.to_string(),
            idempotency_window_ms: crate::ledger::DEFAULT_IDEMPOTENCY_WINDOW
                .as_millis()
                .to_string(),
            revoked_key_retention_ms: DEFAULT_REVOKED_KEY_RETENTION.as_millis().to_string(),
            clock: crate::ledger::Clock::Redis,
        }
    }

    /// How long a revoked key's record is kept: the account's next creation or revocation
    /// of a key drops those revoked longer ago (lua/key_prune.lua).
    pub fn with_revoked_key_retention(mut self, retention: Duration) -> Self {
        self.revoked_key_retention_ms = retention.as_millis().max(1).to_string();
        self
    }

    /// The clock the key scripts take the time from: the ledger's (tests drive a manual
    /// one), so a revocation's time and the pruning's cut-off agree with lua/org.lua's.
    pub fn with_clock(mut self, clock: crate::ledger::Clock) -> Self {
        self.clock = clock;
        self
    }

    /// How long a retry of a key creation (same idempotency key) finds the first one.
    pub fn with_idempotency_window(mut self, window: Duration) -> Self {
        self.idempotency_window_ms = window.as_millis().max(1).to_string();
        self
    }

    pub async fn load_scripts(&self) -> Result<(), LedgerError> {
        let s = &self.scripts;
        self.redis
            .load_scripts(&[&s.create, &s.revoke, &s.list])
            .await
    }

    fn record_key(&self, shard: u16, key_id: &str) -> String {
        format!("{}:k:{key_id}", self.shards.tag(shard))
    }

    /// The account's live keys (key id → created ms): the keys-per-account cap counts them.
    fn account_keys(&self, shard: u16, account_id: &str) -> String {
        format!("{}:ks:{account_id}", self.shards.tag(shard))
    }

    /// The account's revoked keys (key id scored by revocation ms): key_revoke.lua and
    /// lua/org.lua move a key's id here from [`KeyStore::account_keys`].
    fn revoked_account_keys(&self, shard: u16, account_id: &str) -> String {
        format!("{}:kr:{account_id}", self.shards.tag(shard))
    }

    /// The account's organization record (lua/org.lua): present iff the account is an org.
    fn org_record(&self, shard: u16, account_id: &str) -> String {
        format!("{}:org:{account_id}", self.shards.tag(shard))
    }

    /// Who a presented key belongs to: from the cache when it is fresh, else one HMGET.
    pub async fn identify(&self, key: &str) -> Result<Arc<Identity>, IdentityError> {
        match self.presented(key) {
            Presented::Known(known) => known,
            Presented::Miss(miss) => self.identify_miss(&miss).await,
        }
    }

    /// Asks Redis about a key the cache missed, and remembers the answer. While Redis is
    /// unavailable, a key the cache last knew as revoked or unknown is refused as such
    /// ([`KeyMiss::refused`]).
    pub async fn identify_miss(&self, miss: &KeyMiss<'_>) -> Result<Arc<Identity>, IdentityError> {
        let known = match self.lookup(miss).await {
            Ok(known) => known,
            Err(IdentityError::Unavailable(why)) => {
                return Err(miss.refused().unwrap_or(IdentityError::Unavailable(why)))
            }
            Err(err) => return Err(err),
        };
        self.learn(miss, || known.clone());
        answer(known)
    }

    /// What the cache knows about a presented key, or what it takes to ask Redis: the
    /// gateway resolves a miss inside its debit script (one call per check), anything
    /// else with [`KeyStore::identify`].
    ///
    /// A key that is not even well-formed is unknown without a lookup (and is not cached:
    /// a flood of made-up keys costs no Redis call and no cache entry).
    pub fn presented<'k>(&self, key: &'k str) -> Presented<'k> {
        let Some((key_id, shard)) = parse_key(key, &self.shards) else {
            return Presented::Known(Err(IdentityError::Unknown));
        };
        let digest = key_digest(key);
        // The cache hands out a copy: its answer is moved out of it, hit or miss (an
        // `Arc` at most, never an allocation).
        let stale = match self.cache.get(&digest) {
            Some(Cached { known, at }) if at.elapsed() < self.cache_ttl => {
                metrics::counter!(crate::telemetry::metrics::IDENTITY_CACHE_HITS_TOTAL)
                    .increment(1);
                return Presented::Known(answer(known));
            }
            expired => expired.map(|cached| cached.known),
        };
        metrics::counter!(crate::telemetry::metrics::IDENTITY_CACHE_MISSES_TOTAL).increment(1);
        Presented::Miss(KeyMiss {
            key_id,
            shard,
            digest,
            stale,
            revocations: self.revocations.load(Ordering::SeqCst),
            asked: Instant::now(),
        })
    }

    /// The key id, its shard and the key's SHA-256 (hex), as a charge by key sends them
    /// (a void of such a charge: gateway::void); None for a key of no shard.
    pub fn key_parts(&self, key: &str) -> Option<(String, u16, String)> {
        let (key_id, shard) = parse_key(key, &self.shards)?;
        Some((key_id.to_owned(), shard, hex(&key_digest(key))))
    }

    /// What the cache last said about a key, however old, when that refuses it (revoked
    /// or unknown; [`KeyMiss::refused`]): the answer of a check that ran out of time
    /// waiting for Redis. Counts no cache lookup.
    pub fn refused(&self, key: &str) -> Option<IdentityError> {
        match self.cache.peek(&key_digest(key))?.known {
            Known::Revoked => Some(IdentityError::Revoked),
            Known::Unknown => Some(IdentityError::Unknown),
            Known::Active(_) => None,
        }
    }

    /// Who a key allowed while Redis was unavailable pays, for the fail-open spool: the
    /// key's id, shard and digest, for the ledger to resolve when the charge is replayed.
    /// Not the identity the cache holds: that may be older than a revocation another
    /// sidecar made, and the replay drops the charge of a key revoked before the call.
    /// `None` for a key known not to be active or not well-formed (the gateway refuses a
    /// key last known revoked or unknown during an outage, so it is only a check raced
    /// by a revocation that gets here with one). Counts no cache lookup.
    pub fn payer(&self, key: &str) -> Option<Payer> {
        let digest = key_digest(key);
        if let Some(Known::Revoked | Known::Unknown) = self.cache.get(&digest).map(|c| c.known) {
            return None;
        }
        parse_key(key, &self.shards).map(|(key_id, shard)| Payer::Key {
            key_id: key_id.to_owned(),
            shard,
            digest: hex(&digest),
        })
    }

    /// Remembers what Redis said about a missed key (`known`, made only if it is kept):
    /// when the cache holds an older answer for it, or the doorkeeper saw it miss before.
    /// Not if this process revoked a key since the lookup began: the answer may predate
    /// the revocation, and must not replace the revoked entry the revocation left. Checked
    /// before inserting and again after: an answer inserted across a revocation is removed
    /// unless it says revoked (should that revocation's entry have been overwritten by it,
    /// the key is only asked about again). And never over a revoked entry, whoever revoked
    /// the key (a revocation is for good): two lookups of a key another sidecar revoked
    /// meanwhile may answer out of order, and the older "valid" replaced the newer
    /// "revoked" for a whole TTL (then, expired, it let the key through fail_open).
    pub fn learn(&self, miss: &KeyMiss<'_>, known: impl FnOnce() -> Known) {
        let now = Instant::now();
        let revoked_since = || self.revocations.load(Ordering::SeqCst) != miss.revocations;
        if (miss.stale.is_some() || self.doorkeeper.mark(&miss.digest, now)) && !revoked_since() {
            let mut fresh = Some(Cached {
                known: known(),
                at: miss.asked,
            });
            // Under the cache shard's lock, so no other answer lands between the look and
            // the write. Retained when the key had an entry (updated in place, or kept
            // revoked); no loader holds a placeholder in this cache, so Vacant is the only
            // other answer.
            let entry = self
                .cache
                .entry(&miss.digest, Some(Duration::ZERO), |_, cached| {
                    let keep = matches!(cached.known, Known::Revoked)
                        && !matches!(fresh.as_ref().map(|f| &f.known), Some(Known::Revoked));
                    if !keep {
                        if let Some(fresh) = fresh.take() {
                            *cached = fresh;
                        }
                    }
                    quick_cache::sync::EntryAction::Retain(())
                });
            if let quick_cache::sync::EntryResult::Vacant(guard) = entry {
                if let Some(fresh) = fresh.take() {
                    let _ = guard.insert(fresh);
                }
            }
            if revoked_since() {
                self.cache
                    .remove_if(&miss.digest, |c| !matches!(c.known, Known::Revoked));
            }
        }
    }

    /// The key's record, and whether its shard serves (its epoch marker), in one round
    /// trip: a shard Redis lost has no key records, and its keys must not be taken (and
    /// cached) for unknown ones.
    async fn lookup(&self, miss: &KeyMiss<'_>) -> Result<Known, IdentityError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HMGET")
            .arg(self.record_key(miss.shard, miss.key_id))
            .arg("a")
            .arg("s")
            .arg("r")
            .arg("mb")
            .cmd("EXISTS")
            .arg(self.shards.epoch_key(miss.shard));
        let (fields, serving): (Vec<Option<String>>, bool) =
            self.redis.call_pipeline(&pipe).await.map_err(|e| match e {
                LedgerError::Unavailable(why) => IdentityError::Unavailable(why),
                other => IdentityError::Internal(other.to_string()),
            })?;
        if !serving {
            return Err(IdentityError::NotInitialized);
        }
        let [account, stored, revoked, member] = <[Option<String>; 4]>::try_from(fields)
            .map_err(|_| IdentityError::Internal("HMGET answer shape".into()))?;
        let (Some(account_id), Some(stored)) = (account, stored) else {
            return Ok(Known::Unknown);
        };
        if !constant_time_eq(miss.digest_hex().as_bytes(), stored.as_bytes()) {
            return Ok(Known::Unknown);
        }
        if revoked.is_some() {
            return Ok(Known::Revoked);
        }
        Ok(miss.active(account_id, member.unwrap_or_default()))
    }

    /// Makes a key for an account (a personal key; refused, atomically in the script, for
    /// an account that is an organization) or, with `binding.org_id`, an org workspace key
    /// (only by an owner or admin); the secret is in the answer only.
    /// With an `idempotency_key`, a repeat within the idempotency window answers the key
    /// the first call made (`replayed`, without its secret, which only the first answer
    /// held) instead of making another; the same key with other parameters is refused.
    /// NotInitialized, with nothing written, when the account's shard has no epoch marker
    /// (Redis lost its data: its org record is gone too, until `tollgate restore`).
    pub async fn create(
        &self,
        account_id: &str,
        name: &str,
        binding: &KeyBinding,
        idempotency_key: &str,
    ) -> Result<CreatedKey, LedgerError> {
        // Every bad field at once.
        let mut v = Violations::default();
        if !idempotency_key.is_empty() {
            v.idempotency_key("idempotency_key", idempotency_key);
        }
        let account_id = if binding.org_id.is_empty() {
            // A member or actor means nothing without the org: it would be stored on a
            // personal key unchecked (and break the key's listing and every check by it).
            v.account_id("account_id", account_id);
            for (field, value) in [
                ("member_id", &binding.member_id),
                ("actor_id", &binding.actor_id),
            ] {
                if !value.is_empty() {
                    v.add(field, "must be empty without org_id");
                }
            }
            account_id
        } else {
            v.account_id("org_id", &binding.org_id);
            v.account_id("actor_id", &binding.actor_id);
            v.member_id("member_id", &binding.member_id, &binding.org_id);
            if !account_id.is_empty() && account_id != binding.org_id {
                v.add("account_id", "must be empty or the org_id for an org key");
            }
            &binding.org_id
        };
        check_key_name(&mut v, name);
        v.finish().map_err(LedgerError::InvalidArgument)?;
        let (key_id, api_key, record, index, digest) = self.new_key(account_id, name)?;
        let shard = self.shards.of_account(account_id);
        let mut inv = self.scripts.create.prepare_invoke();
        // The org record goes with a personal key too: the script refuses one for an
        // account that is an organization. The shard's epoch marker: a shard Redis lost
        // has no org record either, so the script refuses it first.
        inv.key(record)
            .key(index)
            .key(self.org_record(shard, account_id))
            .key(self.shards.epoch_key(shard));
        let (record_id, request) = if idempotency_key.is_empty() {
            (String::new(), String::new())
        } else {
            let record = Sha256::digest(format!("{account_id}:{idempotency_key}").as_bytes());
            let request = Sha256::digest(
                format!(
                    "{name}\u{1f}{}\u{1f}{}",
                    binding.member_id, binding.actor_id
                )
                .as_bytes(),
            );
            (hex(&record[..15]), hex(&request[..8]))
        };
        inv.arg(account_id)
            .arg(&digest)
            .arg(name)
            .arg(&self.keys_per_account_max)
            .arg(&key_id)
            .arg(&binding.member_id)
            .arg(&binding.actor_id)
            .arg(&record_id)
            .arg(&request)
            .arg(&self.idempotency_window_ms)
            .arg(self.clock.override_ms())
            .arg(&self.revoked_key_retention_ms);
        let answer: String = self.redis.call(&inv).await?;
        created(key_id, api_key, digest, &answer)
    }

    /// One new key per account, in one pipeline (seeding: `tollgate bench`). Scripts must
    /// be loaded first ([`KeyStore::load_scripts`]).
    pub async fn create_batch(
        &self,
        account_ids: &[&str],
        name: &str,
    ) -> Result<Vec<CreatedKey>, LedgerError> {
        let mut pipe = redis::pipe();
        let mut made = Vec::with_capacity(account_ids.len());
        let mut invocations = Vec::with_capacity(account_ids.len());
        for account_id in account_ids {
            let (key_id, api_key, record, index, digest) = self.new_key(account_id, name)?;
            let shard = self.shards.of_account(account_id);
            let mut inv = self.scripts.create.prepare_invoke();
            inv.key(record)
                .key(index)
                .key(self.org_record(shard, account_id))
                .key(self.shards.epoch_key(shard))
                .arg(*account_id)
                .arg(&digest)
                .arg(name)
                .arg(&self.keys_per_account_max)
                .arg(&key_id)
                .arg("")
                .arg("")
                .arg("")
                .arg("")
                .arg("0")
                .arg(self.clock.override_ms())
                .arg(&self.revoked_key_retention_ms);
            invocations.push(inv);
            made.push((key_id, api_key, digest));
        }
        for inv in &invocations {
            pipe.invoke_script(inv);
        }
        let answers: Vec<String> = self.redis.pipeline(&pipe).await?;
        made.into_iter()
            .zip(answers)
            .map(|((key_id, api_key, digest), answer)| created(key_id, api_key, digest, &answer))
            .collect()
    }

    /// A fresh key for an account, checked: (key id, key, record key, index key, digest).
    fn new_key(
        &self,
        account_id: &str,
        name: &str,
    ) -> Result<(String, String, String, String, String), LedgerError> {
        let mut v = Violations::default();
        v.account_id("account_id", account_id);
        check_key_name(&mut v, name);
        v.finish().map_err(LedgerError::InvalidArgument)?;
        let shard = self.shards.of_account(account_id);
        let key_id = format!(
            "k{}-{}",
            self.shards.number(shard),
            random_hex(KEY_ID_RANDOM_HEX_LEN / 2)?
        );
        let api_key = format!(
            "{API_KEY_PREFIX}{key_id}_{}",
            random_hex(SECRET_HEX_LEN / 2)?
        );
        debug_assert_eq!(
            parse_key(&api_key, &self.shards),
            Some((key_id.as_str(), shard))
        );
        let record = self.record_key(shard, &key_id);
        let index = self.account_keys(shard, account_id);
        let digest = hex(&key_digest(&api_key));
        Ok((key_id, api_key, record, index, digest))
    }

    /// Revokes a key for good; this process caches it as revoked at once (refused even
    /// while Redis is unavailable), others learn it within the cache TTL. NotInitialized
    /// when the key's shard has no epoch marker (not NotFound: the key comes back with
    /// `tollgate restore`).
    pub async fn revoke(&self, key_id: &str) -> Result<RevokedKey, LedgerError> {
        let shard = shard_of_key_id(key_id, &self.shards).ok_or_else(|| {
            LedgerError::InvalidArgument(vec![FieldViolation::new(
                "key_id",
                "is not a tollgate key id",
            )])
        })?;
        let mut inv = self.scripts.revoke.prepare_invoke();
        inv.key(self.record_key(shard, key_id))
            .key(self.shards.epoch_key(shard))
            .arg(self.clock.override_ms())
            .arg(&self.revoked_key_retention_ms);
        let answer: String = self.redis.call(&inv).await?;
        let parts: Vec<&str> = answer.splitn(5, '|').collect();
        match parts.as_slice() {
            ["NOT_FOUND"] => Err(LedgerError::NotFound("api key")),
            ["OK", account, revoked_at, already, digest] => {
                self.revocations.fetch_add(1, Ordering::SeqCst);
                self.remember_revoked(digest);
                Ok(RevokedKey {
                    key_id: key_id.to_owned(),
                    account_id: (*account).to_owned(),
                    revoked_at_ms: revoked_at.parse().unwrap_or_default(),
                    already_revoked: *already == "1",
                })
            }
            _ => Err(LedgerError::Internal(format!(
                "unexpected key_revoke answer ({})",
                crate::ledger::reply::shape(&answer)
            ))),
        }
    }

    /// Caches keys revoked elsewhere than [`KeyStore::revoke`] (a member's removal or
    /// demotion revokes the keys they made, a removal those bound to them too, in
    /// lua/org.lua) as revoked in this process at once, as `revoke` does; other processes
    /// learn it within the cache TTL.
    pub fn forget_revoked<'d>(&self, digests_hex: impl IntoIterator<Item = &'d str>) {
        self.revocations.fetch_add(1, Ordering::SeqCst);
        for digest in digests_hex {
            self.remember_revoked(digest);
        }
    }

    /// Replaces whatever the cache holds for a key this process just revoked with a
    /// revoked entry (not a removal: an expired entry still refuses the key while Redis
    /// is unavailable, [`KeyMiss::refused`]). Like any entry it takes a slot of the
    /// bounded cache until it is evicted.
    fn remember_revoked(&self, digest_hex: &str) {
        let mut digest = [0u8; 32];
        if digest_hex.len() != 64 {
            return;
        }
        for (i, byte) in digest.iter_mut().enumerate() {
            match u8::from_str_radix(&digest_hex[2 * i..2 * i + 2], 16) {
                Ok(b) => *byte = b,
                Err(_) => return,
            }
        }
        self.cache.insert(
            digest,
            Cached {
                known: Known::Revoked,
                at: Instant::now(),
            },
        );
    }

    /// The account's keys (without secrets), oldest first: every live key and the most
    /// recently revoked ones, up to `gateway.keys_per_account_max` of them
    /// (lua/key_list.lua). NotInitialized when the account's shard has no epoch marker
    /// (not an empty list).
    pub async fn list(&self, account_id: &str) -> Result<Vec<KeyInfo>, LedgerError> {
        let mut v = Violations::default();
        v.account_id("account_id", account_id);
        v.finish().map_err(LedgerError::InvalidArgument)?;
        let shard = self.shards.of_account(account_id);
        let mut inv = self.scripts.list.prepare_invoke();
        inv.key(self.account_keys(shard, account_id))
            .key(self.shards.epoch_key(shard))
            .key(self.revoked_account_keys(shard, account_id))
            .arg(self.shards.tag(shard))
            .arg(&self.keys_per_account_max);
        let rows: Vec<String> = self.redis.call(&inv).await?;
        let mut keys = rows
            .iter()
            .map(|row| {
                // The name is last: it may hold '|'.
                let parts: Vec<&str> = row.splitn(6, '|').collect();
                match parts.as_slice() {
                    [key_id, created, revoked, member, maker, name] => Ok(KeyInfo {
                        key_id: (*key_id).to_owned(),
                        member_id: (*member).to_owned(),
                        created_by: (*maker).to_owned(),
                        name: (*name).to_owned(),
                        created_at_ms: created.parse().unwrap_or_default(),
                        revoked_at_ms: revoked.parse().unwrap_or_default(),
                    }),
                    _ => Err(LedgerError::Internal(format!(
                        "bad key row ({})",
                        crate::ledger::reply::shape(row)
                    ))),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        keys.sort_by(|a, b| (a.created_at_ms, &a.key_id).cmp(&(b.created_at_ms, &b.key_id)));
        Ok(keys)
    }
}

fn check_key_name(v: &mut Violations, name: &str) {
    if name.len() > KEY_NAME_LEN_MAX {
        v.add("name", format!("longer than {KEY_NAME_LEN_MAX} bytes"));
    } else {
        v.description("name", name);
    }
    const { assert!(KEY_NAME_LEN_MAX <= DESCRIPTION_LEN_MAX) };
}

/// A key_create answer: "OK|created_ms" or "KEY_LIMIT|max".
fn created(
    key_id: String,
    api_key: String,
    digest_hex: String,
    answer: &str,
) -> Result<CreatedKey, LedgerError> {
    let mut parts = answer.split('|');
    match (parts.next(), parts.next()) {
        (Some("OK"), Some(created)) => Ok(CreatedKey {
            key_id,
            api_key,
            digest_hex,
            created_at_ms: created.parse().unwrap_or_default(),
            replayed: false,
        }),
        (Some("REPLAY"), Some(first)) => Ok(CreatedKey {
            key_id: first.to_owned(),
            api_key: String::new(),
            created_at_ms: parts
                .next()
                .and_then(|c| c.parse().ok())
                .unwrap_or_default(),
            digest_hex: parts.next().unwrap_or_default().to_owned(),
            replayed: true,
        }),
        // The same idempotency key with other parameters: the refusal every other
        // mutation gives (FAILED_PRECONDITION, IDEMPOTENCY_KEY_REUSED), not a bad field.
        (Some("IDEMPOTENCY_KEY_REUSED"), None) => {
            Err(LedgerError::Refused(Refusal::IdempotencyKeyReused))
        }
        (Some("KEY_LIMIT"), Some(max)) => Err(LedgerError::Refused(Refusal::KeyLimit {
            max: max.parse().unwrap_or_default(),
        })),
        (Some("BAD_FIELD"), Some(field)) => {
            Err(LedgerError::InvalidArgument(vec![FieldViolation::new(
                field,
                parts.next().unwrap_or("is not valid"),
            )]))
        }
        _ => Err(LedgerError::Internal(format!(
            "unexpected key_create answer ({})",
            crate::ledger::reply::shape(answer)
        ))),
    }
}

fn answer(known: Known) -> Result<Arc<Identity>, IdentityError> {
    match known {
        Known::Active(identity) => Ok(identity),
        Known::Revoked => Err(IdentityError::Revoked),
        Known::Unknown => Err(IdentityError::Unknown),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_to_their_shard() {
        let shards = ShardMap::new(16);
        let secret = "ab".repeat(32);
        let key = format!("tg_k7-0123456789abcdef_{secret}");
        assert_eq!(parse_key(&key, &shards), Some(("k7-0123456789abcdef", 7)));
        for bad in [
            format!("tg_k16-0123456789abcdef_{secret}"),
            format!("tg_k-0123456789abcdef_{secret}"),
            format!("tg_kx-0123456789abcdef_{secret}"),
            format!("tg_k00007-0123456789abcdef_{secret}"),
            format!("tg_7-0123456789abcdef_{secret}"),
            format!("tg_k7-0123456789abcde_{secret}"),
            format!("tg_k7-0123456789abcdef_{}", &secret[1..]),
            format!("tg_k7-0123456789abcdeg_{secret}"),
            format!("xx_k7-0123456789abcdef_{secret}"),
            "tg_".to_owned(),
            String::new(),
        ] {
            assert_eq!(parse_key(&bad, &shards), None, "{bad}");
        }
    }

    #[test]
    fn a_created_key_debug_prints_no_secret() {
        let key = CreatedKey {
            key_id: "k7-0123456789abcdef".into(),
            api_key: format!("tg_k7-0123456789abcdef_{}", "ab".repeat(32)),
            digest_hex: "00".repeat(32),
            created_at_ms: 1,
            replayed: false,
        };
        let printed = format!("{key:?}");
        assert!(printed.contains("k7-0123456789abcdef"), "{printed}");
        assert!(!printed.contains(&"ab".repeat(32)), "{printed}");
    }

    /// A cached answer is as old as its lookup: an answer that took longer than the TTL
    /// to come back is not trusted at all. It used to be timed from its arrival, so a
    /// slow call stretched how long a key revoked meanwhile on another sidecar kept
    /// working, by up to `gateway.check_timeout_ms`.
    #[tokio::test]
    async fn a_cached_answer_is_timed_from_its_lookup() {
        let ttl = Duration::from_secs(10);
        let redis = RedisPool::new("redis://127.0.0.1:1", 1, Duration::from_millis(100))
            .expect("a lazy pool");
        let keys = KeyStore::new(redis, ShardMap::new(1), ttl, 100, 10);
        let key = format!("tg_k0-0123456789abcdef_{}", "ab".repeat(32));
        let learn = |asked_ago: Duration| {
            let Presented::Miss(mut miss) = keys.presented(&key) else {
                panic!("a hit before the key was learnt");
            };
            miss.asked = Instant::now()
                .checked_sub(asked_ago)
                .expect("the clock has run longer than the TTL");
            keys.learn(&miss, || miss.active("acct".into(), String::new()));
        };
        let hit = || matches!(keys.presented(&key), Presented::Known(Ok(_)));
        // The doorkeeper lets the key in on its second miss.
        learn(Duration::ZERO);
        assert!(!hit());
        // Asked a TTL ago, answered now: already expired.
        learn(ttl + Duration::from_secs(1));
        assert!(!hit(), "an answer older than the TTL was trusted");
        // Asked just now: trusted.
        learn(Duration::ZERO);
        assert!(hit());
    }

    #[test]
    fn the_doorkeeper_lets_a_key_in_on_its_second_miss_within_a_period() {
        let start = Instant::now();
        let period = Duration::from_secs(10);
        let door = Doorkeeper::new(1_000, period, start);
        let (a, b) = (key_digest("a"), key_digest("b"));
        assert!(!door.mark(&a, start));
        assert!(door.mark(&a, start + Duration::from_secs(1)));
        assert!(!door.mark(&b, start + Duration::from_secs(2)));
        assert!(door.mark(&a, start + Duration::from_secs(9)));
        // A period on, every mark is gone.
        assert!(!door.mark(&a, start + period + Duration::from_secs(1)));
        assert!(!door.mark(&b, start + period + Duration::from_secs(2)));
        assert!(door.mark(&b, start + period + Duration::from_secs(3)));
    }

    #[test]
    fn the_doorkeeper_is_cleared_at_most_once_a_second() {
        let start = Instant::now();
        let door = Doorkeeper::new(1_000, Duration::from_millis(1), start);
        let a = key_digest("a");
        assert!(!door.mark(&a, start));
        assert!(door.mark(&a, start + Duration::from_millis(900)));
        assert!(!door.mark(&a, start + Duration::from_millis(1_001)));
    }

    #[test]
    fn a_full_doorkeeper_rarely_takes_a_new_key_for_a_known_one() {
        let now = Instant::now();
        let entries = 10_000;
        let door = Doorkeeper::new(entries, Duration::from_secs(10), now);
        for i in 0..entries {
            door.mark(&key_digest(&format!("known-{i}")), now);
        }
        let taken = (0..entries)
            .filter(|i| door.mark(&key_digest(&format!("new-{i}")), now))
            .count();
        assert!(
            taken * 100 < entries * 2,
            "{taken} of {entries} new keys taken"
        );
    }

    #[test]
    fn digests_are_sha256() {
        assert_eq!(
            hex(&key_digest("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
