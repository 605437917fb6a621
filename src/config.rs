//! Configuration: one typed struct, read from `tollgate.toml` (or `--config`), then
//! `TOLLGATE_` environment overrides, then command-line flags, validated once at start-up.
//! Every bad setting is reported with its path, all at once; unknown settings are refused.
//!
//! Environment overrides: `TOLLGATE_<SECTION>__<KEY>` (e.g. `TOLLGATE_LEDGER__SHARDS=32`),
//! plus the shortcuts `TOLLGATE_REDIS_URL`, `TOLLGATE_ADMIN_TOKEN`, `TOLLGATE_SERVICE_TOKEN`.
//! A string setting takes the value as written (as clap reads the same variables: a token
//! `0x5eed` stays `0x5eed`); any other setting reads it as a TOML number, boolean or array.
//! Error messages name the setting and what is wrong, never its value: any may be a secret.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::gateway::{self, identity, pricing::PriceBook};
use crate::ledger::{self, keys::SHARDS_MAX, LedgerSettings};
use crate::settle::settler::{default_consumer, SettlerSettings};
use crate::settle::store;
use crate::transport;

pub const DEFAULT_GRPC_ADDR: &str = "127.0.0.1:50051";
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:8080";
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
/// Where fail_open charges wait for Redis, relative to the working directory (beside the
/// default SQLite store).
pub const DEFAULT_SPOOL_PATH: &str = "tollgate-spool.jsonl";
/// Shortest idempotency window accepted: retries of one request arrive within it.
pub const IDEMPOTENCY_WINDOW_SECS_MIN: u64 = 60;
/// The longest idempotency window, hold and charge retention (10 years).
pub const RETENTION_SECS_MAX: u64 = 10 * 365 * 86_400;
/// The longest interval or idle time in ms (30 days): Redis reads `XAUTOCLAIM`'s idle time
/// as a signed 64-bit number, and a wait meant as "never" is a misconfiguration, not a
/// reason for every settler round to fail.
pub const INTERVAL_MS_MAX: u64 = 30 * 86_400_000;
pub const REDIS_CONNECTIONS_MAX: usize = 64;
pub const WORKER_THREADS_MAX: usize = 256;
pub const SETTLER_LINGER_MS_MAX: u64 = 10_000;
pub const REDIS_CALL_TIMEOUT_MS_MAX: u64 = 10_000;
/// Most replicas a ledger write may wait for.
pub const REDIS_WAIT_REPLICAS_MAX: u32 = 16;
pub const REDIS_WAIT_TIMEOUT_MS_MAX: u64 = 10_000;
/// Readiness fails when settlement lags more than this (a minute by default).
pub const DEFAULT_READY_LAG_MAX_MS: u64 = 60_000;
pub const SETTLER_BATCH_EVENTS_MAX: usize = 50_000;
pub const CHECK_TIMEOUT_MS_MAX: u64 = 10_000;
pub const IDENTITY_CACHE_TTL_MS_MAX: u64 = 3_600_000;
pub const IDENTITY_CACHE_ENTRIES_MAX: usize = 10_000_000;
pub const KEYS_PER_ACCOUNT_MAX: u32 = 10_000;
/// The most `ledger.members_per_org_max` may be: every ListMembers page reads the whole
/// org record (HGETALL), so this bounds one page's Redis cost (about 1 ms at 10,000).
pub const MEMBERS_PER_ORG_MAX: u32 = 10_000;
pub const HTTP_CONNECTIONS_MAX: usize = 65_536;
pub const GRPC_CONNECTIONS_MAX: usize = 65_536;
/// Largest `server.shutdown_delay_ms`: endpoint removal takes seconds, and the chart's
/// `terminationGracePeriodSeconds` must cover the delay and the drain after it.
pub const SHUTDOWN_DELAY_MS_MAX: u64 = 60_000;
pub const HTTP_HEADER_BYTES_MAX: usize = 1024 * 1024;
/// Twice Envoy's largest `max_request_headers_kb` (8 MiB).
pub const GRPC_CHECK_MESSAGE_BYTES_MAX: usize = 16 * 1024 * 1024;
pub const GRPC_CHECK_MESSAGE_BYTES_MIN: usize = 16 * 1024;

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub redis: RedisConfig,
    pub auth: AuthConfig,
    pub ledger: LedgerConfig,
    pub store: StoreConfig,
    pub settler: SettlerConfig,
    pub gateway: GatewayConfig,
    /// The `[pricebook]` table, compiled (see gateway/pricing.rs for its format).
    #[serde(skip)]
    pub pricebook: PriceBook,
    pub log: LogConfig,
    /// Usage webhooks (`[webhooks]`, see webhooks/mod.rs).
    pub webhooks: crate::webhooks::WebhookConfig,
    /// The file this config was read from: SIGHUP reloads its price book.
    #[serde(skip)]
    pub source: Option<PathBuf>,
    /// The command-line settings it was read with (a reload applies them again).
    #[serde(skip)]
    pub overrides: Overrides,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// gRPC listen address (tollgate.v1 services).
    pub grpc_addr: String,
    /// HTTP listen address (/healthz, /readyz).
    pub http_addr: String,
    /// Async runtime worker threads; 0 (the default) takes half of the machine's CPUs, at
    /// least one: the sidecar shares its host with Redis and the gateway.
    pub worker_threads: usize,
    /// Rebuild from the durable store the shards Redis lost (no epoch marker, events in
    /// the store): before serving, and in the background whenever Redis loses them while
    /// this process serves (docs/OPERATIONS.md). `serve --restore` sets it.
    pub restore: bool,
    /// HTTP connections open at once; past it, a new connection waits (in the listen
    /// backlog) until one closes.
    pub http_connections_max: usize,
    /// Largest request head (request line and headers) the HTTP port reads: a larger one
    /// is answered 431. At least the largest your gateway forwards.
    pub http_header_bytes_max: usize,
    /// Largest Envoy ext_authz CheckRequest the gRPC port reads (it carries the client
    /// request's headers): a larger Check fails (OUT_OF_RANGE) and Envoy applies its
    /// `status_on_error`. At least twice Envoy's `max_request_headers_kb`.
    pub grpc_check_message_bytes_max: usize,
    /// gRPC connections open at once; past it, a new connection waits (in the listen
    /// backlog) until one closes.
    pub grpc_connections_max: usize,
    /// How long `serve` goes on serving after SIGTERM, not ready (`/readyz` 503, gRPC
    /// health NOT_SERVING), before it closes its listeners and drains: Kubernetes takes
    /// a terminating pod out of its Service and its gateways' endpoints while it is
    /// signalled, not before, and connections opened in between were refused. 0 (the
    /// default) drains at once; a second signal ends the delay.
    pub shutdown_delay_ms: u64,
}

impl ServerConfig {
    /// The HTTP port's bounds.
    pub fn http_limits(&self) -> transport::HttpLimits {
        transport::HttpLimits {
            connections_max: self.http_connections_max,
            header_bytes_max: self.http_header_bytes_max,
        }
    }

    /// The worker threads the runtime gets: the configured count, or half the CPUs.
    pub fn runtime_workers(&self) -> usize {
        match self.worker_threads {
            0 => default_worker_threads(),
            n => n,
        }
    }
}

/// A Redis or store URL as logs and dev output may show it: scheme, host, port and path,
/// without user, password or query (where `?password=` may be). The query goes first (an
/// `@` is legal in it); then everything up to the last `@`, so a password holding an
/// unescaped `/` or `@` is not shown either. A password holding an unescaped `?` or `#`
/// would leave part of itself where the host goes (`redis://:pa?ss@h` cut to `:pa`): what
/// is left is shown only if it reads as a host and port, else `(hidden)`.
pub fn url_for_logs(url: &str) -> String {
    let url = url.split(['?', '#']).next().unwrap_or_default();
    let Some((scheme, rest)) = url.split_once("://") else {
        return "(not a URL)".into();
    };
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let authority = rest.split('/').next().unwrap_or_default();
    // `[…]` is an IPv6 address, colons and all.
    let (host, port) = match authority.strip_prefix('[').and_then(|a| a.split_once(']')) {
        Some((address, port)) => (address, port.strip_prefix(':').unwrap_or("0")),
        None => authority.rsplit_once(':').unwrap_or((authority, "0")),
    };
    let host_like = host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b".-_:".contains(&b))
        && (authority.starts_with('[') || !host.contains(':'))
        && !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit());
    if host_like {
        format!("{scheme}://{rest}")
    } else {
        format!("{scheme}://(hidden)")
    }
}

/// A secret as `Debug` shows it: whether it is set, never its value.
pub fn redacted(secret: &str) -> &'static str {
    if secret.is_empty() {
        ""
    } else {
        "***"
    }
}

// The sections holding secrets (tokens, shared secrets, URLs that may carry a password)
// print them redacted: a `{:?}` of the config in a log line or a panic message must not
// leak one.

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &url_for_logs(&self.url))
            .field("connections", &self.connections)
            .field("call_timeout_ms", &self.call_timeout_ms)
            .field("wait_replicas", &self.wait_replicas)
            .field("wait_timeout_ms", &self.wait_timeout_ms)
            .finish()
    }
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("admin_token", &redacted(&self.admin_token))
            .field("service_token", &redacted(&self.service_token))
            .field(
                "admin_token_previous",
                &redacted(&self.admin_token_previous),
            )
            .field(
                "service_token_previous",
                &redacted(&self.service_token_previous),
            )
            .finish()
    }
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("url", &url_for_logs(&self.url))
            .field("connections", &self.connections)
            .finish()
    }
}

impl std::fmt::Debug for GatewayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayConfig")
            .field("api_key_headers", &self.api_key_headers)
            .field("shared_secret", &redacted(&self.shared_secret))
            .field(
                "shared_secret_previous",
                &redacted(&self.shared_secret_previous),
            )
            .field("shared_secret_header", &self.shared_secret_header)
            .field("check_timeout_ms", &self.check_timeout_ms)
            .field("identity_cache_ttl_ms", &self.identity_cache_ttl_ms)
            .field(
                "identity_cache_entries_max",
                &self.identity_cache_entries_max,
            )
            .field("keys_per_account_max", &self.keys_per_account_max)
            .field(
                "revoked_key_retention_secs",
                &self.revoked_key_retention_secs,
            )
            .field("spool_path", &self.spool_path)
            .field("request_id_replay", &self.request_id_replay)
            .field("allow_encoded_slashes", &self.allow_encoded_slashes)
            .field("method_override", &self.method_override)
            .finish()
    }
}

impl std::fmt::Debug for Overrides {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let url = |u: &Option<String>| u.as_deref().map(url_for_logs);
        f.debug_struct("Overrides")
            .field("redis_url", &url(&self.redis_url))
            .field("grpc_addr", &self.grpc_addr)
            .field("http_addr", &self.http_addr)
            .field("store_url", &url(&self.store_url))
            .finish()
    }
}

/// Half of the CPUs this process may use, at least one.
pub fn default_worker_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get() / 2)
        .unwrap_or(1)
        .max(1)
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            grpc_addr: DEFAULT_GRPC_ADDR.into(),
            http_addr: DEFAULT_HTTP_ADDR.into(),
            worker_threads: 0,
            restore: false,
            http_connections_max: transport::DEFAULT_HTTP_CONNECTIONS_MAX,
            http_header_bytes_max: transport::DEFAULT_HTTP_HEADER_BYTES_MAX,
            grpc_check_message_bytes_max: transport::DEFAULT_GRPC_CHECK_MESSAGE_BYTES_MAX,
            grpc_connections_max: transport::DEFAULT_GRPC_CONNECTIONS_MAX,
            shutdown_delay_ms: 0,
        }
    }
}

#[derive(Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db`.
    pub url: String,
    /// Multiplexed connections per process; 0 (the default) lets tollgate choose: one per
    /// runtime thread, and at least 8 with `wait_replicas` > 0, since a `WAIT` holds its
    /// connection for a replica round trip (`Config::redis_connections`).
    pub connections: usize,
    /// Deadline of one ledger call; past it the call fails with UNAVAILABLE.
    pub call_timeout_ms: u64,
    /// Synchronous replication: after every ledger write (debit, authorize, capture,
    /// release, refund, grant, adjust, sweep), `WAIT <wait_replicas> <wait_timeout_ms>`
    /// in the same round trip, so the reply comes once that many replicas hold the write.
    /// 0 = off (the default). A WAIT that hears from fewer replicas in time still answers
    /// (the write is committed on the primary) and counts `tollgate_redis_wait_short_total`.
    pub wait_replicas: u32,
    /// How long Redis waits for the replicas (`WAIT`'s timeout); added to
    /// `call_timeout_ms` for the deadline of a write when `wait_replicas` > 0.
    pub wait_timeout_ms: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: DEFAULT_REDIS_URL.into(),
            connections: 0,
            call_timeout_ms: ledger::redis_pool::DEFAULT_CALL_TIMEOUT.as_millis() as u64,
            wait_replicas: 0,
            wait_timeout_ms: ledger::redis_pool::DEFAULT_WAIT_TIMEOUT.as_millis() as u64,
        }
    }
}

#[derive(Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Bearer token of the Admin service (and accepted by Metering).
    pub admin_token: String,
    /// Bearer token of the Metering service.
    pub service_token: String,
    /// A second admin token accepted while a rotation rolls out (the one being replaced);
    /// empty = none. Only with `admin_token`.
    pub admin_token_previous: String,
    /// A second service token accepted while a rotation rolls out; empty = none. Only
    /// with `service_token`.
    pub service_token_previous: String,
}

impl AuthConfig {
    /// The tokens Admin takes: the admin token, and the previous one during a rotation.
    pub fn admin_tokens(&self) -> [String; 2] {
        [self.admin_token.clone(), self.admin_token_previous.clone()]
    }

    /// The service tokens Metering takes (it takes the admin tokens too).
    pub fn service_tokens(&self) -> [String; 2] {
        [
            self.service_token.clone(),
            self.service_token_previous.clone(),
        ]
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LedgerConfig {
    /// Virtual shards (hash tags and outbox streams). Fixed for a deployment's life.
    pub shards: u16,
    /// How long a replay of an idempotency key returns the first answer.
    pub idempotency_window_secs: u64,
    /// How long an ended hold is remembered (for HOLD_ENDED answers).
    pub hold_retention_secs: u64,
    /// How long a charge can be refunded from Redis.
    pub charge_retention_secs: u64,
    pub lots_per_wallet_max: u32,
    pub wallets_per_account_max: u32,
    pub holds_per_wallet_max: u32,
    /// Members per organization: AddMember of a new member past it is MEMBER_LIMIT (a
    /// role change or a removal is never refused by it). At most [`MEMBERS_PER_ORG_MAX`].
    pub members_per_org_max: u32,
    /// Unsettled events per shard before Debit and Authorize answer OUTBOX_FULL (0 = no bound).
    pub outbox_events_max: u64,
    /// How often the sweeper expires lots and holds of idle wallets.
    pub sweep_interval_ms: u64,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        let d = LedgerSettings::default();
        Self {
            shards: d.shards,
            idempotency_window_secs: d.idempotency_window.as_secs(),
            hold_retention_secs: d.hold_retention.as_secs(),
            charge_retention_secs: d.charge_retention.as_secs(),
            lots_per_wallet_max: d.lots_per_wallet_max,
            wallets_per_account_max: d.wallets_per_account_max,
            holds_per_wallet_max: d.holds_per_wallet_max,
            members_per_org_max: d.members_per_org_max,
            outbox_events_max: d.outbox_events_max,
            sweep_interval_ms: ledger::sweeper::DEFAULT_SWEEP_INTERVAL.as_millis() as u64,
        }
    }
}

/// The gateway front doors: Envoy ext_authz, forward-auth, access-log settlement.
#[derive(Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Request headers an API key is read from, first present wins; `authorization`
    /// expects `Bearer <key>`, any other header the bare key.
    pub api_key_headers: Vec<String>,
    /// Optional shared secret the gateway must send (Envoy: gRPC initial metadata;
    /// forward-auth: a request header) in `shared_secret_header`; empty = not required.
    pub shared_secret: String,
    /// A second shared secret accepted while a rotation rolls out (the one being
    /// replaced); empty = none. Only with `shared_secret`.
    pub shared_secret_previous: String,
    pub shared_secret_header: String,
    /// Deadline of one whole check (identity lookup + ledger call); past it the
    /// operation's fail policy applies. Keep it under Envoy's ext_authz timeout (200 ms).
    pub check_timeout_ms: u64,
    /// How long a looked-up API key is trusted without asking Redis: the longest a
    /// revoked key keeps working on another sidecar.
    pub identity_cache_ttl_ms: u64,
    /// API keys remembered per process.
    pub identity_cache_entries_max: usize,
    /// Live (unrevoked) keys per account, an org's members' together: CreateApiKey past
    /// it is KEY_LIMIT. ListApiKeys lists at most as many revoked keys besides.
    pub keys_per_account_max: u32,
    /// How long a revoked key's record is kept in Redis after its revocation: then the
    /// account's next key creation or revocation drops it, and the key answers as unknown
    /// (401) instead of revoked (403). At least [`Config::revoked_key_retention_floor`].
    pub revoked_key_retention_secs: u64,
    /// File where debit charges allowed by `fail_open` while Redis is unavailable wait to
    /// be applied (relative to the working directory); empty = not recorded (such
    /// requests are then free).
    pub spool_path: String,
    /// Whether a check's request id (`x-request-id`) is its idempotency key, so a repeat
    /// answers the first decision and is charged once. Off by default: a client that can
    /// choose the id would get every later request with the same id free. Turn it on only
    /// where the gateway stamps the id itself and a client cannot set it.
    pub request_id_replay: bool,
    /// Whether a request path may hold an encoded slash or backslash (`%2F`, `%5C`; kept
    /// as such and matched literally). Off by default: an upstream that decodes them
    /// would serve another path than the one priced (`gateway::pricing::normal_path`).
    pub allow_encoded_slashes: bool,
    /// A request whose `x-http-method-override`, `x-http-method` or `x-method-override`
    /// names another method than its own: "refuse" (400 `bad_header`, the default: tollgate
    /// prices the request's own method, and an upstream that honours the header would run
    /// another) or "ignore" (for an API that honours none of them).
    pub method_override: gateway::MethodOverride,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            api_key_headers: vec!["authorization".into(), "x-api-key".into()],
            shared_secret: String::new(),
            shared_secret_previous: String::new(),
            shared_secret_header: gateway::DEFAULT_SHARED_SECRET_HEADER.into(),
            check_timeout_ms: gateway::DEFAULT_CHECK_TIMEOUT.as_millis() as u64,
            identity_cache_ttl_ms: identity::DEFAULT_IDENTITY_CACHE_TTL.as_millis() as u64,
            identity_cache_entries_max: identity::DEFAULT_IDENTITY_CACHE_ENTRIES_MAX,
            keys_per_account_max: identity::DEFAULT_KEYS_PER_ACCOUNT_MAX,
            revoked_key_retention_secs: identity::DEFAULT_REVOKED_KEY_RETENTION.as_secs(),
            spool_path: DEFAULT_SPOOL_PATH.into(),
            request_id_replay: false,
            allow_encoded_slashes: false,
            method_override: gateway::MethodOverride::Refuse,
        }
    }
}

#[derive(Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `postgres://…` or `sqlite://PATH`.
    pub url: String,
    /// Pooled connections.
    pub connections: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: store::DEFAULT_STORE_URL.into(),
            connections: store::DEFAULT_POOL_CONNECTIONS,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SettlerConfig {
    /// Run a settler inside `tollgate serve` (`tollgate settle` runs one alone).
    pub enabled: bool,
    /// Consumer name in the group; default `<host>-<pid>`. A fixed name lets a restarted
    /// process pick up its own pending batch at once instead of after `claim_idle_ms`.
    pub consumer: String,
    /// Events read per shard per round.
    pub batch_events_max: usize,
    /// Pause between rounds when the outboxes are empty.
    pub idle_wait_ms: u64,
    /// A batch pending this long in another consumer is taken over.
    pub claim_idle_ms: u64,
    pub backoff_min_ms: u64,
    pub backoff_max_ms: u64,
    /// How often settled entries are trimmed and the lag measured.
    pub trim_interval_ms: u64,
    /// After a small batch, the next read waits this long (from the start of the commit)
    /// so batches grow: fewer store transactions, this much more lag. 0 = off.
    pub linger_ms: u64,
    /// /readyz fails when the oldest unsettled event is older than this.
    pub ready_lag_max_ms: u64,
    /// Other settlers' consumers that have not read for this long and have nothing
    /// pending are removed from the group (those a crash or a kill left behind).
    pub consumer_idle_max_ms: u64,
}

impl Default for SettlerConfig {
    fn default() -> Self {
        let d = SettlerSettings::default();
        Self {
            enabled: true,
            consumer: String::new(),
            batch_events_max: d.batch_events_max,
            idle_wait_ms: d.idle_wait.as_millis() as u64,
            claim_idle_ms: d.claim_idle.as_millis() as u64,
            backoff_min_ms: d.backoff_min.as_millis() as u64,
            backoff_max_ms: d.backoff_max.as_millis() as u64,
            trim_interval_ms: d.trim_interval.as_millis() as u64,
            linger_ms: d.linger.as_millis() as u64,
            ready_lag_max_ms: DEFAULT_READY_LAG_MAX_MS,
            consumer_idle_max_ms: d.consumer_idle_max.as_millis() as u64,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter, e.g. "info" or "tollgate=debug" (RUST_LOG wins when set).
    pub level: String,
    /// "text" or "json".
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

/// One bad setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// All bad settings of one load.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration:\n{}", .0.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors(pub Vec<ConfigError>);

/// Settings given on the command line, applied last.
#[derive(Clone, Default, PartialEq)]
pub struct Overrides {
    pub redis_url: Option<String>,
    pub grpc_addr: Option<String>,
    pub http_addr: Option<String>,
    pub store_url: Option<String>,
}

impl Config {
    /// Reads the file (if any), applies the environment and the flags, validates.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Self, ConfigErrors> {
        let text = match path {
            Some(path) => read_file(path)?,
            None => String::new(),
        };
        let mut config = Self::from_toml(&text, env, overrides)?;
        config.source = path.map(Path::to_path_buf);
        Ok(config)
    }

    /// The config file read again as at start-up (the environment and the command-line
    /// settings applied, every section checked), for a SIGHUP reload. Refuses a file
    /// without a `[pricebook]` table (a truncated or half-written file would otherwise
    /// install a book that denies every request); an empty `[pricebook]` says that.
    pub fn reread(
        &self,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigErrors> {
        let Some(path) = &self.source else {
            return Err(ConfigErrors(vec![ConfigError {
                path: "(file)".into(),
                message: "no config file to read again".into(),
            }]));
        };
        let text = read_file(path)?;
        let has_pricebook = text
            .parse::<toml::Table>()
            .is_ok_and(|t| t.contains_key("pricebook"));
        let mut config = Self::from_toml(&text, env, &self.overrides)?;
        if !has_pricebook {
            return Err(ConfigErrors(vec![ConfigError {
                path: "pricebook".into(),
                message: "missing from the file (write an empty [pricebook] to deny every \
                          request on purpose)"
                    .into(),
            }]));
        }
        config.source = self.source.clone();
        Ok(config)
    }

    /// The sections in which `other` differs in a setting a reload does not apply
    /// (anything but the price book); names only, since a value may be a secret.
    pub fn sections_changed_beyond_pricebook(&self, other: &Self) -> Vec<&'static str> {
        let mut changed = Vec::new();
        let mut check = |name: &'static str, same: bool| {
            if !same {
                changed.push(name);
            }
        };
        check("server", self.server == other.server);
        check("redis", self.redis == other.redis);
        check("auth", self.auth == other.auth);
        check("ledger", self.ledger == other.ledger);
        check("store", self.store == other.store);
        check("settler", self.settler == other.settler);
        check("gateway", self.gateway == other.gateway);
        check("log", self.log == other.log);
        check("webhooks", self.webhooks == other.webhooks);
        // A section added to Config and not above still counts, unnamed.
        let strip = |c: &Self| Self {
            pricebook: PriceBook::default(),
            ..c.clone()
        };
        if changed.is_empty() && strip(self) != strip(other) {
            changed.push("(other)");
        }
        changed
    }

    pub fn from_toml(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Self, ConfigErrors> {
        let mut table: toml::Table = text
            .parse()
            .map_err(|e| ConfigErrors(vec![file_error(text, &e)]))?;
        let (from_env, misspelled) = apply_env(&mut table, env);
        let mut set = |section: &str, key: &str, value: &Option<String>| {
            if let Some(v) = value {
                set_value(&mut table, section, key, toml::Value::String(v.clone()));
            }
        };
        set("redis", "url", &overrides.redis_url);
        set("server", "grpc_addr", &overrides.grpc_addr);
        set("server", "http_addr", &overrides.http_addr);
        set("store", "url", &overrides.store_url);

        let mut errors = misspelled;
        let config = Config {
            server: section(&table, "server", &mut errors),
            redis: section(&table, "redis", &mut errors),
            auth: section(&table, "auth", &mut errors),
            ledger: section(&table, "ledger", &mut errors),
            store: section(&table, "store", &mut errors),
            settler: section(&table, "settler", &mut errors),
            gateway: section(&table, "gateway", &mut errors),
            pricebook: PriceBook::from_toml(table.get("pricebook"), &mut errors),
            log: section(&table, "log", &mut errors),
            webhooks: section(&table, "webhooks", &mut errors),
            source: None,
            overrides: overrides.clone(),
        };
        for (name, _) in table.iter() {
            if name != "pricebook" && !SECTIONS.iter().any(|(section, _)| section == name) {
                errors.push(ConfigError {
                    path: name.clone(),
                    message: "unknown section".into(),
                });
            }
        }
        config.validate(&mut errors);
        name_variables(&mut errors, &from_env);
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    fn validate(&self, errors: &mut Vec<ConfigError>) {
        let mut bad = |path: &str, message: String| {
            errors.push(ConfigError {
                path: path.into(),
                message,
            })
        };
        for (path, addr) in [
            ("server.grpc_addr", &self.server.grpc_addr),
            ("server.http_addr", &self.server.http_addr),
        ] {
            if addr.parse::<SocketAddr>().is_err() {
                bad(path, format!("{addr:?} is not an ip:port address"));
            }
        }
        if self.server.worker_threads > WORKER_THREADS_MAX {
            bad(
                "server.worker_threads",
                format!("must be in 0..={WORKER_THREADS_MAX} (0 = half the CPUs)"),
            );
        }
        if !(1..=HTTP_CONNECTIONS_MAX).contains(&self.server.http_connections_max) {
            bad(
                "server.http_connections_max",
                format!("must be in 1..={HTTP_CONNECTIONS_MAX}"),
            );
        }
        if !(1..=GRPC_CONNECTIONS_MAX).contains(&self.server.grpc_connections_max) {
            bad(
                "server.grpc_connections_max",
                format!("must be in 1..={GRPC_CONNECTIONS_MAX}"),
            );
        }
        if self.server.shutdown_delay_ms > SHUTDOWN_DELAY_MS_MAX {
            bad(
                "server.shutdown_delay_ms",
                format!("must be in 0..={SHUTDOWN_DELAY_MS_MAX}"),
            );
        }
        if !(transport::HTTP_HEADER_BYTES_MIN..=HTTP_HEADER_BYTES_MAX)
            .contains(&self.server.http_header_bytes_max)
        {
            bad(
                "server.http_header_bytes_max",
                format!(
                    "must be in {}..={HTTP_HEADER_BYTES_MAX}",
                    transport::HTTP_HEADER_BYTES_MIN
                ),
            );
        }
        if !(GRPC_CHECK_MESSAGE_BYTES_MIN..=GRPC_CHECK_MESSAGE_BYTES_MAX)
            .contains(&self.server.grpc_check_message_bytes_max)
        {
            bad(
                "server.grpc_check_message_bytes_max",
                format!(
                    "must be in {GRPC_CHECK_MESSAGE_BYTES_MIN}..={GRPC_CHECK_MESSAGE_BYTES_MAX}"
                ),
            );
        }
        if redis::parse_redis_url(&self.redis.url).is_none() {
            bad("redis.url", redis_url_problem(&self.redis.url));
        } else if self.redis.url.split_once("://").is_some_and(|(scheme, _)| {
            ["rediss", "valkeys"].contains(&scheme.to_ascii_lowercase().as_str())
        }) {
            // It parses, and then every connection failed at start-up ("the feature is
            // not enabled"): the redis client is built without TLS.
            bad(
                "redis.url",
                "TLS (rediss://) is not supported by this build: reach Redis over a private \
                 network, or through a TLS-terminating sidecar (stunnel, Envoy), with redis://"
                    .into(),
            );
        }
        if self.redis.connections > REDIS_CONNECTIONS_MAX {
            bad(
                "redis.connections",
                format!("must be in 0..={REDIS_CONNECTIONS_MAX} (0 = chosen by tollgate)"),
            );
        }
        if !(1..=REDIS_CALL_TIMEOUT_MS_MAX).contains(&self.redis.call_timeout_ms) {
            bad(
                "redis.call_timeout_ms",
                format!("must be in 1..={REDIS_CALL_TIMEOUT_MS_MAX}"),
            );
        }
        if self.redis.wait_replicas > REDIS_WAIT_REPLICAS_MAX {
            bad(
                "redis.wait_replicas",
                format!("must be in 0..={REDIS_WAIT_REPLICAS_MAX} (0 = off)"),
            );
        }
        if !(1..=REDIS_WAIT_TIMEOUT_MS_MAX).contains(&self.redis.wait_timeout_ms) {
            bad(
                "redis.wait_timeout_ms",
                format!("must be in 1..={REDIS_WAIT_TIMEOUT_MS_MAX}"),
            );
        } else if self.redis.wait_replicas > 0
            && self.redis.wait_timeout_ms >= self.gateway.check_timeout_ms
        {
            // Otherwise a check whose WAIT runs short hits its own deadline after the
            // charge committed, and the fail policy answers for a charged request.
            bad(
                "redis.wait_timeout_ms",
                format!(
                    "must be less than gateway.check_timeout_ms ({}) when redis.wait_replicas is set",
                    self.gateway.check_timeout_ms
                ),
            );
        }
        // A token a client can present: gRPC metadata and HTTP header values are visible
        // ASCII and spaces, and a presented token is trimmed (auth::bearer), so one that
        // ends in a newline (a Kubernetes Secret made with --from-file) would refuse every
        // call with "invalid token".
        let a = &self.auth;
        for (path, token) in [
            ("auth.admin_token", &a.admin_token),
            ("auth.service_token", &a.service_token),
            ("auth.admin_token_previous", &a.admin_token_previous),
            ("auth.service_token_previous", &a.service_token_previous),
        ] {
            if !token.bytes().all(|b| (b' '..=b'~').contains(&b)) || token.trim() != token {
                bad(
                    path,
                    "may hold only printable ASCII, without leading or trailing spaces (a trailing newline?)"
                        .into(),
                );
            }
        }
        for (path, previous, current_path, current) in [
            (
                "auth.admin_token_previous",
                &a.admin_token_previous,
                "auth.admin_token",
                &a.admin_token,
            ),
            (
                "auth.service_token_previous",
                &a.service_token_previous,
                "auth.service_token",
                &a.service_token,
            ),
        ] {
            if current.is_empty() && !previous.is_empty() {
                bad(
                    path,
                    format!(
                        "is set without {current_path} (the previous token is only accepted \
                         next to the current one, during a rotation)"
                    ),
                );
            }
        }
        // The admin tokens pass Metering too; a service token equal to one would pass
        // Admin, which refuses service tokens.
        let admin = a.admin_tokens();
        for (path, token) in [
            ("auth.service_token", &a.service_token),
            ("auth.service_token_previous", &a.service_token_previous),
        ] {
            if !token.is_empty() && admin.contains(token) {
                bad(
                    path,
                    "must differ from auth.admin_token and auth.admin_token_previous (a \
                     service token must not pass Admin)"
                        .into(),
                );
            }
        }
        let l = &self.ledger;
        // Beyond this, a time in ms no longer fits Redis's Lua integer formatting: a
        // retention meant as "forever" would make every record expire at once.
        for (path, value) in [
            ("ledger.idempotency_window_secs", l.idempotency_window_secs),
            ("ledger.hold_retention_secs", l.hold_retention_secs),
            ("ledger.charge_retention_secs", l.charge_retention_secs),
        ] {
            if value > RETENTION_SECS_MAX {
                bad(
                    path,
                    format!("must be at most {RETENTION_SECS_MAX} (10 years)"),
                );
            }
        }
        if !(1..=SHARDS_MAX).contains(&l.shards) {
            bad("ledger.shards", format!("must be in 1..={SHARDS_MAX}"));
        }
        if l.idempotency_window_secs < IDEMPOTENCY_WINDOW_SECS_MIN {
            bad(
                "ledger.idempotency_window_secs",
                format!("must be at least {IDEMPOTENCY_WINDOW_SECS_MIN}"),
            );
        }
        for (path, value) in [
            ("ledger.hold_retention_secs", l.hold_retention_secs),
            ("ledger.charge_retention_secs", l.charge_retention_secs),
            (
                "ledger.lots_per_wallet_max",
                u64::from(l.lots_per_wallet_max),
            ),
            (
                "ledger.wallets_per_account_max",
                u64::from(l.wallets_per_account_max),
            ),
            (
                "ledger.holds_per_wallet_max",
                u64::from(l.holds_per_wallet_max),
            ),
        ] {
            if value == 0 {
                bad(path, "must be positive".into());
            }
        }
        if !(1..=INTERVAL_MS_MAX).contains(&l.sweep_interval_ms) {
            bad(
                "ledger.sweep_interval_ms",
                format!("must be in 1..={INTERVAL_MS_MAX} (30 days)"),
            );
        }
        // A replayed capture or release within the idempotency window must find its hold
        // to find its answer (the answer is recorded under the hold's account).
        if l.hold_retention_secs > 0 && l.hold_retention_secs < l.idempotency_window_secs {
            bad(
                "ledger.hold_retention_secs",
                format!(
                    "must be at least ledger.idempotency_window_secs ({}): a replayed capture or release must find its hold",
                    l.idempotency_window_secs
                ),
            );
        }
        if let Err(e) = store::Store::check_url(&self.store.url) {
            bad("store.url", e.to_string());
        }
        if self.store.connections == 0 {
            bad("store.connections", "must be positive".into());
        }
        let st = &self.settler;
        if !(1..=SETTLER_BATCH_EVENTS_MAX).contains(&st.batch_events_max) {
            bad(
                "settler.batch_events_max",
                format!("must be in 1..={SETTLER_BATCH_EVENTS_MAX}"),
            );
        }
        if st.linger_ms > SETTLER_LINGER_MS_MAX {
            bad(
                "settler.linger_ms",
                format!("must be in 0..={SETTLER_LINGER_MS_MAX} (0 = off)"),
            );
        }
        for (path, value) in [
            ("settler.idle_wait_ms", st.idle_wait_ms),
            ("settler.claim_idle_ms", st.claim_idle_ms),
            ("settler.backoff_min_ms", st.backoff_min_ms),
            ("settler.trim_interval_ms", st.trim_interval_ms),
            ("settler.ready_lag_max_ms", st.ready_lag_max_ms),
            ("settler.backoff_max_ms", st.backoff_max_ms),
            ("settler.consumer_idle_max_ms", st.consumer_idle_max_ms),
        ] {
            if !(1..=INTERVAL_MS_MAX).contains(&value) {
                bad(path, format!("must be in 1..={INTERVAL_MS_MAX} (30 days)"));
            }
        }
        if st.backoff_max_ms < st.backoff_min_ms {
            bad(
                "settler.backoff_max_ms",
                "must not be less than settler.backoff_min_ms".into(),
            );
        }
        // The settler measures the outboxes this often, and readiness calls a measurement
        // older than ready_lag_max_ms a stuck settler: a longer interval would flap.
        if st.trim_interval_ms > 0 && st.trim_interval_ms.saturating_mul(2) > st.ready_lag_max_ms {
            bad(
                "settler.trim_interval_ms",
                format!(
                    "must be at most half of settler.ready_lag_max_ms ({}): a measurement older than that reads as a stuck settler",
                    st.ready_lag_max_ms
                ),
            );
        }
        let g = &self.gateway;
        if g.api_key_headers.is_empty() {
            bad(
                "gateway.api_key_headers",
                "needs at least one header".into(),
            );
        }
        for (i, h) in g.api_key_headers.iter().enumerate() {
            if !is_header_name(h) {
                bad(
                    &format!("gateway.api_key_headers[{i}]"),
                    format!("{h:?} is not a lowercase header name"),
                );
            }
        }
        if !is_header_name(&g.shared_secret_header) {
            bad(
                "gateway.shared_secret_header",
                format!(
                    "{:?} is not a lowercase header name",
                    g.shared_secret_header
                ),
            );
        }
        for (path, secret) in [
            ("gateway.shared_secret", &g.shared_secret),
            ("gateway.shared_secret_previous", &g.shared_secret_previous),
        ] {
            if !secret.bytes().all(|b| b.is_ascii_graphic()) {
                bad(path, "may hold only printable ASCII without spaces".into());
            }
        }
        if g.shared_secret.is_empty() && !g.shared_secret_previous.is_empty() {
            bad(
                "gateway.shared_secret_previous",
                "is set without gateway.shared_secret (the previous secret is only \
                 accepted next to the current one, during a rotation)"
                    .into(),
            );
        }
        if !(1..=CHECK_TIMEOUT_MS_MAX).contains(&g.check_timeout_ms) {
            bad(
                "gateway.check_timeout_ms",
                format!("must be in 1..={CHECK_TIMEOUT_MS_MAX}"),
            );
        }
        if !(1..=IDENTITY_CACHE_TTL_MS_MAX).contains(&g.identity_cache_ttl_ms) {
            bad(
                "gateway.identity_cache_ttl_ms",
                format!("must be in 1..={IDENTITY_CACHE_TTL_MS_MAX}"),
            );
        }
        if !(1..=IDENTITY_CACHE_ENTRIES_MAX).contains(&g.identity_cache_entries_max) {
            bad(
                "gateway.identity_cache_entries_max",
                format!("must be in 1..={IDENTITY_CACHE_ENTRIES_MAX}"),
            );
        }
        if !(1..=MEMBERS_PER_ORG_MAX).contains(&l.members_per_org_max) {
            bad(
                "ledger.members_per_org_max",
                format!("must be in 1..={MEMBERS_PER_ORG_MAX}"),
            );
        }
        if !(1..=KEYS_PER_ACCOUNT_MAX).contains(&g.keys_per_account_max) {
            bad(
                "gateway.keys_per_account_max",
                format!("must be in 1..={KEYS_PER_ACCOUNT_MAX}"),
            );
        }
        let (floor_ms, horizon) = self.revoked_key_retention_floor();
        if g.revoked_key_retention_secs > RETENTION_SECS_MAX {
            bad(
                "gateway.revoked_key_retention_secs",
                format!("must be at most {RETENTION_SECS_MAX} (10 years)"),
            );
        } else if u128::from(g.revoked_key_retention_secs) * 1000 < u128::from(floor_ms) {
            bad(
                "gateway.revoked_key_retention_secs",
                format!(
                    "must be at least {} (seconds; the longest horizon that still reads a revoked key's record: {horizon})",
                    floor_ms.div_ceil(1000)
                ),
            );
        }
        if !["text", "json"].contains(&self.log.format.as_str()) {
            bad("log.format", "must be text or json".into());
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            bad(
                "log.level",
                format!("{:?} is not a log filter", self.log.level),
            );
        }
        self.webhooks.validate(errors);
    }

    pub fn settler_settings(&self) -> SettlerSettings {
        let st = &self.settler;
        SettlerSettings {
            group: crate::settle::settler::DEFAULT_GROUP.into(),
            consumer: if st.consumer.is_empty() {
                default_consumer()
            } else {
                st.consumer.clone()
            },
            batch_events_max: st.batch_events_max,
            idle_wait: Duration::from_millis(st.idle_wait_ms),
            claim_idle: Duration::from_millis(st.claim_idle_ms),
            backoff_min: Duration::from_millis(st.backoff_min_ms),
            backoff_max: Duration::from_millis(st.backoff_max_ms),
            trim_interval: Duration::from_millis(st.trim_interval_ms),
            linger: Duration::from_millis(st.linger_ms),
            webhooks: self.webhooks.rules(),
            consumer_idle_max: Duration::from_millis(st.consumer_idle_max_ms),
        }
    }

    /// The Redis connections a process opens: `redis.connections`, or when 0
    /// [`ledger::redis_pool::auto_connections`] of the runtime threads and `WAIT`.
    pub fn redis_connections(&self) -> usize {
        match self.redis.connections {
            0 => ledger::redis_pool::auto_connections(
                self.server.runtime_workers(),
                self.redis.wait_replicas,
            ),
            n => n,
        }
    }

    /// The `WAIT` after ledger writes, when `redis.wait_replicas` > 0.
    pub fn wait_replicas(&self) -> Option<ledger::WaitReplicas> {
        (self.redis.wait_replicas > 0).then(|| ledger::WaitReplicas {
            replicas: self.redis.wait_replicas,
            timeout: Duration::from_millis(self.redis.wait_timeout_ms),
        })
    }

    /// The shortest `gateway.revoked_key_retention_secs` (ms), and what sets it: the
    /// longest time after a key's revocation that something may still look its record up
    /// and act on what it says.
    /// - `ledger.idempotency_window_secs`: a repeated CreateApiKey answers the key it made
    ///   from its record (its digest, which the Admin API saves in the durable ledger).
    /// - The gateway's void retries ([`gateway::void::VOID_RETRY_WINDOW`]): a void of a
    ///   charge made by key finds the charge's account from the key's record; without it
    ///   a denied request would stay charged.
    /// - `gateway.identity_cache_ttl_ms`: other sidecars let a revoked key through for up
    ///   to this long, and charges made then are looked up by key.
    ///
    /// The access log's retries settle holds by hold id and never read a key. The fail-open
    /// spool has no horizon (a charge waits for Redis as long as the outage lasts): a
    /// charge spooled before the key's revocation and replayed after the retention finds
    /// no key and is dropped (docs/ARCHITECTURE.md, "Revoked keys").
    pub fn revoked_key_retention_floor(&self) -> (u64, &'static str) {
        let void_ms = u64::try_from(gateway::void::VOID_RETRY_WINDOW.as_millis()).unwrap_or(0);
        [
            (
                self.ledger.idempotency_window_secs.saturating_mul(1000),
                "ledger.idempotency_window_secs (a repeated CreateApiKey reads the key's record)",
            ),
            (
                void_ms,
                "the gateway's void retry window (a void of a charge by key reads the key's record)",
            ),
            (
                self.gateway.identity_cache_ttl_ms,
                "gateway.identity_cache_ttl_ms (other sidecars still let the key through this long)",
            ),
        ]
        .into_iter()
        .max_by_key(|(ms, _)| *ms)
        .unwrap_or((void_ms, ""))
    }

    pub fn ledger_settings(&self) -> LedgerSettings {
        let l = &self.ledger;
        LedgerSettings {
            shards: l.shards,
            idempotency_window: Duration::from_secs(l.idempotency_window_secs),
            hold_retention: Duration::from_secs(l.hold_retention_secs),
            charge_retention: Duration::from_secs(l.charge_retention_secs),
            lots_per_wallet_max: l.lots_per_wallet_max,
            wallets_per_account_max: l.wallets_per_account_max,
            holds_per_wallet_max: l.holds_per_wallet_max,
            members_per_org_max: l.members_per_org_max,
            outbox_events_max: l.outbox_events_max,
            revoked_key_retention: Duration::from_secs(self.gateway.revoked_key_retention_secs),
        }
    }
}

/// What is wrong with a Redis URL that does not parse, without the URL: it may carry a
/// password.
fn redis_url_problem(url: &str) -> String {
    // The schemes redis::parse_redis_url takes.
    const SCHEMES: [&str; 7] = [
        "redis",
        "rediss",
        "unix",
        "redis+unix",
        "valkey",
        "valkeys",
        "valkey+unix",
    ];
    match url.split_once("://") {
        None => "is not a url (redis://[user:password@]host:port[/db])".into(),
        Some((scheme, _)) if !SCHEMES.contains(&scheme.to_ascii_lowercase().as_str()) => {
            "is not a redis:// url (its scheme must be redis or unix)".into()
        }
        Some(_) => "does not parse as a url: check the host and port (reserved characters \
                    in the password must be percent-encoded)"
            .into(),
    }
}

/// Lowercase HTTP header name (gRPC metadata and Envoy's header maps are lowercase).
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
}

/// Whether the setting `key` of the section type `T` takes `raw` as a string. `T` itself
/// is asked, so the answer follows the struct: a `String` field takes any string, a number
/// or a list none.
fn takes_str<T: DeserializeOwned>(key: &str, raw: &str) -> bool {
    let mut single = toml::Table::new();
    single.insert(key.to_owned(), toml::Value::String(raw.to_owned()));
    T::deserialize(single).is_ok()
}

/// The sections of [`Config`] read with [`section`], each with [`takes_str`] of its type
/// (`pricebook` has its own format). A section missing here is refused as unknown.
type TakesStr = fn(&str, &str) -> bool;
const SECTIONS: [(&str, TakesStr); 9] = [
    ("server", takes_str::<ServerConfig>),
    ("redis", takes_str::<RedisConfig>),
    ("auth", takes_str::<AuthConfig>),
    ("ledger", takes_str::<LedgerConfig>),
    ("store", takes_str::<StoreConfig>),
    ("settler", takes_str::<SettlerConfig>),
    ("gateway", takes_str::<GatewayConfig>),
    ("log", takes_str::<LogConfig>),
    ("webhooks", takes_str::<crate::webhooks::WebhookConfig>),
];

/// Deserializes one section key by key, so each bad key is reported with its own path,
/// then the whole section (which then succeeds).
fn section<T: DeserializeOwned + Default>(
    table: &toml::Table,
    name: &str,
    errors: &mut Vec<ConfigError>,
) -> T {
    match table.get(name) {
        Some(value) => table_fields(value, name, errors),
        None => T::default(),
    }
}

/// Deserializes a TOML table into `T` key by key: each key that does not deserialize
/// alone is reported as `<path>.<key>`, and `T` is built from the good keys, so the
/// semantic checks still see them when a neighbour is bad. Shared with the price book.
pub(crate) fn table_fields<T: DeserializeOwned + Default>(
    value: &toml::Value,
    path: &str,
    errors: &mut Vec<ConfigError>,
) -> T {
    let Some(keys) = value.as_table() else {
        errors.push(ConfigError {
            path: path.into(),
            message: "must be a table".into(),
        });
        return T::default();
    };
    let mut good = toml::Table::new();
    for (key, value) in keys {
        let mut single = toml::Table::new();
        single.insert(key.clone(), value.clone());
        match T::deserialize(single) {
            Ok(_) => {
                good.insert(key.clone(), value.clone());
            }
            Err(e) => errors.push(ConfigError {
                path: format!("{path}.{}", toml_key(key)),
                message: without_value(&e.to_string()),
            }),
        }
    }
    T::deserialize(good).unwrap_or_else(|e| {
        errors.push(ConfigError {
            path: path.into(),
            message: without_value(&e.to_string()),
        });
        T::default()
    })
}

/// A deserialization error on one line, without the value it quotes: any setting may hold
/// a secret. serde's `invalid type: integer `84629173`, expected a string` becomes
/// `invalid type: integer, expected a string` (what was given is named by its kind, what
/// was expected and where are kept); so do `invalid value: …` and `unknown variant …`.
fn without_value(message: &str) -> String {
    let message = message.trim().replace('\n', " ");
    for prefix in ["invalid type: ", "invalid value: ", "unknown variant "] {
        let Some(rest) = message.strip_prefix(prefix) else {
            continue;
        };
        // The value may hold ", expected " (a string, quoted with escapes); what serde
        // expected never does, so the last one ends the value.
        let (given, expected) = rest
            .rfind(", expected ")
            .map_or((rest, ""), |at| rest.split_at(at));
        // serde's kinds: integer `1`, floating point `inf`, boolean `true`, string "s".
        let kind = given.split(['`', '"']).next().unwrap_or_default();
        let mut without = format!("{prefix}{kind}");
        without.truncate(without.trim_end().len());
        without.push_str(expected);
        return without;
    }
    message
}

/// A TOML syntax error in the config file, at its line and column but without the line
/// (toml's own message quotes it, and it may hold a secret).
fn file_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let message = e.message().trim().replace('\n', " ");
    let message = match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before
                .rsplit('\n')
                .next()
                .unwrap_or_default()
                .chars()
                .count()
                + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    };
    ConfigError {
        path: "(file)".into(),
        message,
    }
}

/// A key as TOML writes it in a dotted path: bare when it can be, quoted otherwise
/// (`operations."envelope.send"`).
pub(crate) fn toml_key(key: &str) -> String {
    if !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        key.to_owned()
    } else {
        format!("{key:?}")
    }
}

fn set_value(table: &mut toml::Table, section: &str, key: &str, value: toml::Value) {
    let entry = table
        .entry(section.to_owned())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let Some(t) = entry.as_table_mut() {
        t.insert(key.to_owned(), value);
    }
}

fn read_file(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            path: path.display().to_string(),
            message: format!("cannot read: {e}"),
        }])
    })
}

/// Points each error about a setting the environment set at its variable: the file may
/// hold another value, and a user would look there first. A list (or other non-string
/// value) is read as TOML, which the message says when the variable was not.
fn name_variables(errors: &mut [ConfigError], from_env: &[(String, String)]) {
    for e in errors {
        let var = from_env
            .iter()
            .find(|(path, _)| {
                *path == e.path || path.split_once('.').is_some_and(|(s, _)| s == e.path)
            })
            .map(|(_, var)| var);
        if let Some(var) = var {
            e.message.push_str(&format!(" (set by {var}"));
            if e.message.contains("expected a sequence") {
                e.message
                    .push_str("; a list is written as TOML there: [\"a\", \"b\"]");
            }
            e.message.push(')');
        }
    }
}

/// Whether a variable name (after `TOLLGATE_`, lowercase) is one Kubernetes sets for a
/// service in the namespace (`enableServiceLinks`): the chart's `tollgate-settler`
/// service gives every pod `TOLLGATE_SETTLER_SERVICE_HOST`, `TOLLGATE_SETTLER_PORT`,
/// `TOLLGATE_SETTLER_PORT_9090_TCP_ADDR`, …
fn is_service_link(name: &str) -> bool {
    name.ends_with("_service_host")
        || name.contains("_service_port")
        || name.ends_with("_port")
        || name
            .split("_port_")
            .skip(1)
            .any(|after| after.bytes().next().is_some_and(|b| b.is_ascii_digit()))
}

/// The process environment as the config reads it: each `TOLLGATE_` variable, or an error
/// naming each one whose value is not UTF-8 (never the value: it may be a token). Other
/// variables, and names that are not UTF-8, are not looked at. `std::env::vars()`, used
/// before, panics on any variable that is not Unicode and prints its value, so one odd
/// unrelated variable stopped every command and could print a secret.
pub fn env_vars() -> Result<Vec<(String, String)>, ConfigErrors> {
    let mut vars = Vec::new();
    let mut errors = Vec::new();
    for (name, value) in std::env::vars_os() {
        let Some(name) = name.to_str().filter(|n| n.starts_with("TOLLGATE_")) else {
            continue;
        };
        match value.into_string() {
            Ok(value) => vars.push((name.to_owned(), value)),
            Err(_) => errors.push(ConfigError {
                path: name.to_owned(),
                message: "is not UTF-8 (the value is not shown: it may be a secret)".into(),
            }),
        }
    }
    if errors.is_empty() {
        Ok(vars)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Applies the `TOLLGATE_` variables of `env` to `table`; answers (`section.key`,
/// variable) for each one applied, and an error for each variable that misspells a
/// setting's, and for each that sets a setting another variable already set.
///
/// Two variables of one setting (`TOLLGATE_REDIS_URL` and `TOLLGATE_REDIS__URL`, or
/// `TOLLGATE_REDIS__URL` and `TOLLGATE_redis__url`) are refused, whatever their values,
/// naming both and neither value (a value may be a token): the one later in the process
/// environment used to win without a word.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> (Vec<(String, String)>, Vec<ConfigError>) {
    let mut applied: Vec<(String, String)> = Vec::new();
    let mut misspelled = Vec::new();
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix("TOLLGATE_") else {
            continue;
        };
        let (section, key) = match rest {
            "REDIS_URL" => ("redis".to_owned(), "url".to_owned()),
            "ADMIN_TOKEN" => ("auth".to_owned(), "admin_token".to_owned()),
            "SERVICE_TOKEN" => ("auth".to_owned(), "service_token".to_owned()),
            _ => match rest.split_once("__") {
                Some((s, k)) => (s.to_ascii_lowercase(), k.to_ascii_lowercase()),
                None => {
                    // TOLLGATE_STORE_URL, TOLLGATE_LEDGER_SHARDS: a setting's name with one
                    // underscore, which would otherwise be ignored without a word (the
                    // ledger written to ./tollgate.db, another shard count than the other
                    // sidecars'). Other TOLLGATE_ names (TOLLGATE_SERVER, the scripts'
                    // own, Kubernetes' service links) are not settings and stay ignored.
                    let lower = rest.to_ascii_lowercase();
                    if is_service_link(&lower) {
                        continue;
                    }
                    if let Some((section, key)) = SECTIONS.iter().find_map(|(section, _)| {
                        lower
                            .strip_prefix(section)
                            .and_then(|k| k.strip_prefix('_'))
                            .filter(|k| !k.is_empty())
                            .map(|k| (*section, k))
                    }) {
                        misspelled.push(ConfigError {
                            path: name.clone(),
                            message: format!(
                                "is not a setting: a setting's variable has two underscores after its section, as TOLLGATE_{}__{}",
                                section.to_ascii_uppercase(),
                                key.to_ascii_uppercase()
                            ),
                        });
                    }
                    continue;
                }
            },
        };
        let path = format!("{section}.{key}");
        if let Some((_, first)) = applied.iter().find(|(p, _)| *p == path) {
            let message = if *first == name {
                format!("sets {path} twice in the environment: set it once")
            } else {
                format!("sets {path}, as {first} does: set only one of them")
            };
            misspelled.push(ConfigError {
                path: name,
                message,
            });
            continue;
        }
        // A string setting takes the value as written, as clap reads the same variables
        // (TOLLGATE_ADMIN_TOKEN=0x5eed is that token, not 24301). Any other reads it as a
        // TOML number, boolean or array; anything else stays a string, for the type error.
        let takes_string = SECTIONS
            .iter()
            .any(|(name, takes_str)| *name == section && takes_str(&key, &raw));
        let value = if takes_string {
            toml::Value::String(raw)
        } else {
            format!("v = {raw}")
                .parse::<toml::Table>()
                .ok()
                .and_then(|mut t| t.remove("v"))
                .filter(|v| !v.is_table())
                .unwrap_or(toml::Value::String(raw))
        };
        set_value(table, &section, &key, value);
        applied.push((path, name));
    }
    (applied, misspelled)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigErrors> {
        Config::from_toml(text, Vec::new(), &Overrides::default())
    }

    /// A TLS Redis URL parses, but this build has no TLS: refused naming the field (every
    /// connection failed at start-up, after `check-config` had said ok).
    #[test]
    fn a_tls_redis_url_is_refused() {
        for url in ["rediss://cache:6380", "valkeys://cache:6380"] {
            let err = load(&format!("[redis]\nurl = \"{url}\"\n"))
                .expect_err("refused")
                .to_string();
            assert!(err.contains("redis.url") && err.contains("TLS"), "{err}");
        }
        assert!(load("[redis]\nurl = \"redis://cache:6379\"\n").is_ok());
    }

    #[test]
    fn urls_are_logged_without_credentials() {
        for (url, shown) in [
            (
                "postgres://u:pw@db:5432/ledger?sslmode=require",
                "postgres://db:5432/ledger",
            ),
            (
                "postgres://db/ledger?password=pw&user=u",
                "postgres://db/ledger",
            ),
            ("redis://:pw@cache:6379/0", "redis://cache:6379/0"),
            ("rediss://user:p@ss@cache", "rediss://cache"),
            ("postgres://u:pa/ss@db/x", "postgres://db/x"),
            ("postgres://db/x?password=p@ss", "postgres://db/x"),
            ("sqlite://tollgate.db", "sqlite://tollgate.db"),
            (
                "sqlite:///var/lib/tollgate/l.db",
                "sqlite:///var/lib/tollgate/l.db",
            ),
            ("redis://[::1]:6379", "redis://[::1]:6379"),
            // An unescaped `?` or `#` in the password: what is left is no host.
            ("redis://:pa?ss@cache:6379", "redis://(hidden)"),
            ("redis://user:se#cret@cache", "redis://(hidden)"),
            ("postgres://u:p/a?ss@db/x", "postgres://(hidden)"),
            ("nonsense pw", "(not a URL)"),
        ] {
            assert_eq!(url_for_logs(url), shown, "{url}");
        }
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(load("").unwrap(), Config::default());
    }

    #[test]
    fn every_bad_field_is_reported_with_its_path() {
        let errors = load(
            r#"
            colour = "blue"
            [server]
            grpc_addr = "nowhere"
            [redis]
            connections = "many"
            timeout = 5
            [ledger]
            shards = 0
            idempotency_window_secs = 1
            [log]
            format = "xml"
            "#,
        )
        .unwrap_err()
        .0;
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        for expected in [
            "colour",
            "server.grpc_addr",
            "redis.connections",
            "redis.timeout",
            "ledger.shards",
            "ledger.idempotency_window_secs",
            "log.format",
        ] {
            assert!(
                paths.contains(&expected),
                "{expected} missing from {errors:?}"
            );
        }
        let unknown = errors.iter().find(|e| e.path == "redis.timeout").unwrap();
        assert!(unknown.message.contains("unknown field"), "{unknown:?}");
    }

    #[test]
    fn the_member_cap_is_bounded() {
        for (value, ok) in [(0, false), (1, true), (10_000, true), (10_001, false)] {
            let text = format!("[ledger]\nmembers_per_org_max = {value}\n");
            match Config::from_toml(&text, Vec::new(), &Overrides::default()) {
                Ok(config) => {
                    assert!(ok, "{value} taken");
                    assert_eq!(config.ledger_settings().members_per_org_max, value);
                }
                Err(ConfigErrors(errors)) => {
                    assert!(!ok, "{value} refused: {errors:?}");
                    assert_eq!(errors.len(), 1, "{errors:?}");
                    assert_eq!(errors[0].path, "ledger.members_per_org_max");
                    assert!(errors[0].message.contains("1..=10000"), "{errors:?}");
                }
            }
        }
    }

    /// An interval or idle time meant as "never" (u64::MAX) is refused where it is read,
    /// not at the first settler round (Redis refuses `XAUTOCLAIM`'s idle time past i64).
    #[test]
    fn intervals_are_bounded() {
        for path in [
            "ledger.sweep_interval_ms",
            "settler.idle_wait_ms",
            "settler.claim_idle_ms",
            "settler.backoff_max_ms",
            "settler.ready_lag_max_ms",
            "settler.consumer_idle_max_ms",
        ] {
            let (section, key) = path.split_once('.').unwrap();
            for (value, ok) in [
                (0, false),
                (INTERVAL_MS_MAX, true),
                (INTERVAL_MS_MAX + 1, false),
                (i64::MAX as u64, false),
            ] {
                let text = format!("[{section}]\n{key} = {value}\n");
                let errors = match load(&text) {
                    Ok(_) => Vec::new(),
                    Err(ConfigErrors(errors)) => errors,
                };
                let named = errors.iter().any(|e| e.path == path);
                assert_eq!(!named, ok, "{path} = {value}: {errors:?}");
            }
        }
    }
    #[test]
    fn holds_are_kept_at_least_the_idempotency_window() {
        let text = "[ledger]\nidempotency_window_secs = 7200\nhold_retention_secs = 3600\n";
        let ConfigErrors(errors) =
            Config::from_toml(text, Vec::new(), &Overrides::default()).unwrap_err();
        assert!(
            errors
                .iter()
                .any(|e| e.path == "ledger.hold_retention_secs"),
            "{errors:?}"
        );
        let text = "[ledger]\nidempotency_window_secs = 7200\nhold_retention_secs = 7200\n";
        assert!(Config::from_toml(text, Vec::new(), &Overrides::default()).is_ok());
    }

    #[test]
    fn environment_then_flags_override_the_file() {
        let env = vec![
            ("TOLLGATE_LEDGER__SHARDS".to_owned(), "32".to_owned()),
            ("TOLLGATE_ADMIN_TOKEN".to_owned(), "a".to_owned()),
            ("TOLLGATE_REDIS_URL".to_owned(), "redis://env:1".to_owned()),
            ("OTHER".to_owned(), "x".to_owned()),
        ];
        let flags = Overrides {
            redis_url: Some("redis://flag:2".into()),
            ..Default::default()
        };
        let c = Config::from_toml("[ledger]\nshards = 8\n", env, &flags).unwrap();
        assert_eq!(c.ledger.shards, 32);
        assert_eq!(c.wait_replicas(), None);
        assert_eq!(c.auth.admin_token, "a");
        assert_eq!(c.redis.url, "redis://flag:2");
    }

    #[test]
    fn debug_output_never_shows_a_secret() {
        let text = r#"
            [redis]
            url = "redis://:redispass@r:6379/0"
            [store]
            url = "postgres://u:storepass@db/x?sslpassword=sslpass"
            [auth]
            admin_token = "admintok"
            admin_token_previous = "oldadmintok"
            service_token = "servicetok"
            service_token_previous = "oldservicetok"
            [gateway]
            shared_secret = "gwsecret"
            shared_secret_previous = "oldgwsecret"
            [webhooks]
            url = "https://hooks.example/x?token=hooktok"
            secret = "hooksecret"
            secret_previous = "oldhooksecret"
        "#;
        let flags = Overrides {
            store_url: Some("postgres://u:flagpass@db/x".into()),
            ..Default::default()
        };
        let c = Config::from_toml(text, Vec::new(), &flags).unwrap();
        assert_eq!(c.gateway.shared_secret, "gwsecret");
        let shown = format!("{c:?} {:?}", c.overrides);
        for secret in [
            "redispass",
            "storepass",
            "sslpass",
            "admintok",
            "servicetok",
            "gwsecret",
            "hooktok",
            "hooksecret",
            "flagpass",
        ] {
            assert!(!shown.contains(secret), "{secret} shown in {shown}");
        }
        // What is not secret still shows, and a set secret shows as set.
        assert!(shown.contains("redis://r:6379/0"), "{shown}");
        assert!(shown.contains("shared_secret: \"***\""), "{shown}");
        assert!(shown.contains("admin_token_previous: \"***\""), "{shown}");
    }

    #[test]
    fn redis_connections_follow_the_runtime_threads_and_wait() {
        let c = load("").unwrap();
        assert_eq!(c.redis.connections, 0);
        assert_eq!(c.redis_connections(), c.server.runtime_workers());
        // One runtime thread: one connection (docs/BENCHMARKS.md, sixteenth session).
        let c = load("[server]\nworker_threads = 1\n").unwrap();
        assert_eq!(c.redis_connections(), 1);
        let c = load("[server]\nworker_threads = 4\n").unwrap();
        assert_eq!(c.redis_connections(), 4);
        // A WAIT holds its connection for a replica round trip: never one for everything.
        let c = load("[server]\nworker_threads = 1\n[redis]\nwait_replicas = 1\n").unwrap();
        assert_eq!(c.redis_connections(), 8);
        let c = load("[server]\nworker_threads = 12\n[redis]\nwait_replicas = 1\n").unwrap();
        assert_eq!(c.redis_connections(), 12);
        // Never past what may be set.
        assert_eq!(
            ledger::redis_pool::auto_connections(200, 0),
            REDIS_CONNECTIONS_MAX
        );
        // Set: as set.
        let c = load("[redis]\nconnections = 3\nwait_replicas = 1\n").unwrap();
        assert_eq!(c.redis_connections(), 3);
        let errors = load("[redis]\nconnections = 65\n").unwrap_err().0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].path, "redis.connections");
    }

    #[test]
    fn listener_limits_have_defaults_env_overrides_and_bounds() {
        let c = load("").unwrap();
        assert_eq!(c.server.http_limits(), transport::HttpLimits::default());
        assert_eq!(
            c.server.grpc_check_message_bytes_max,
            transport::DEFAULT_GRPC_CHECK_MESSAGE_BYTES_MAX
        );
        let env = vec![
            (
                "TOLLGATE_SERVER__HTTP_CONNECTIONS_MAX".to_owned(),
                "4".to_owned(),
            ),
            (
                "TOLLGATE_SERVER__GRPC_CHECK_MESSAGE_BYTES_MAX".to_owned(),
                "1048576".to_owned(),
            ),
            (
                "TOLLGATE_SERVER__GRPC_CONNECTIONS_MAX".to_owned(),
                "8".to_owned(),
            ),
        ];
        let c = Config::from_toml(
            "[server]\nhttp_header_bytes_max = 8192\n",
            env,
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(
            c.server.http_limits(),
            transport::HttpLimits {
                connections_max: 4,
                header_bytes_max: 8192,
            }
        );
        assert_eq!(c.server.grpc_check_message_bytes_max, 1 << 20);
        assert_eq!(c.server.grpc_connections_max, 8);
        let errors = load(
            "[server]\nhttp_connections_max = 0\nhttp_header_bytes_max = 4096\n\
             grpc_check_message_bytes_max = 100000000\ngrpc_connections_max = 0\n\
             shutdown_delay_ms = 60001\n",
        )
        .unwrap_err()
        .0;
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "server.http_connections_max",
                "server.grpc_connections_max",
                "server.shutdown_delay_ms",
                "server.http_header_bytes_max",
                "server.grpc_check_message_bytes_max"
            ],
            "{errors:?}"
        );
    }

    #[test]
    fn worker_threads_default_to_half_the_cpus_and_are_bounded() {
        let c = load("").unwrap();
        assert_eq!(c.server.worker_threads, 0);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(c.server.runtime_workers(), (cpus / 2).max(1));
        let env = vec![("TOLLGATE_SERVER__WORKER_THREADS".to_owned(), "3".to_owned())];
        let c = Config::from_toml("", env, &Overrides::default()).unwrap();
        assert_eq!(c.server.runtime_workers(), 3);
        let errors = load("[server]\nworker_threads = 1000\n[settler]\nlinger_ms = 60000\n")
            .unwrap_err()
            .0;
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(errors[1].path, "settler.linger_ms");
        assert_eq!(load("").unwrap().settler_settings().linger.as_millis(), 100);
        let errors = load("[server]\nworker_threads = 1000\n").unwrap_err().0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].path, "server.worker_threads");
    }

    #[test]
    fn wait_replicas_from_the_environment_and_validated() {
        let env = vec![
            ("TOLLGATE_REDIS__WAIT_REPLICAS".to_owned(), "1".to_owned()),
            (
                "TOLLGATE_REDIS__WAIT_TIMEOUT_MS".to_owned(),
                "50".to_owned(),
            ),
        ];
        let c = Config::from_toml("", env, &Overrides::default()).unwrap();
        assert_eq!(
            c.wait_replicas(),
            Some(ledger::WaitReplicas {
                replicas: 1,
                timeout: Duration::from_millis(50)
            })
        );
        let errors = load("[redis]\nwait_replicas = 99\nwait_timeout_ms = 0\n")
            .unwrap_err()
            .0;
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert!(paths.contains(&"redis.wait_replicas"), "{errors:?}");
        assert!(paths.contains(&"redis.wait_timeout_ms"), "{errors:?}");
        // The WAIT must end before the gateway check's deadline.
        let errors = load("[redis]\nwait_replicas = 1\nwait_timeout_ms = 500\n")
            .unwrap_err()
            .0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].path, "redis.wait_timeout_ms");
        assert!(errors[0].message.contains("check_timeout_ms"), "{errors:?}");
        let negative = load("[redis]\nwait_replicas = -1\n").unwrap_err().0;
        assert_eq!(negative[0].path, "redis.wait_replicas", "{negative:?}");
    }

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn load_env(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
        Config::from_toml(text, env(vars), &Overrides::default())
    }

    #[test]
    fn string_settings_from_the_environment_are_taken_as_written() {
        // What clap reads from the same variables, and what the Helm chart passes.
        for token in [
            "84629173",
            "0x5eed",
            "inf",
            "nan",
            "-0",
            "1e3",
            "true",
            "'quoted'",
            "\"quoted\"",
            "[1]",
            "{ a = 1 }",
            "1979-05-27",
        ] {
            // The service token must differ from the admin token. Both spellings: the
            // shortcut and the section's (one variable a setting).
            let service = format!("s{token}");
            let c = load_env(
                "",
                &[
                    ("TOLLGATE_ADMIN_TOKEN", token),
                    ("TOLLGATE_AUTH__SERVICE_TOKEN", &service),
                    ("TOLLGATE_WEBHOOKS__URL", "https://hooks.example.com/usage"),
                    ("TOLLGATE_WEBHOOKS__SECRET", token),
                    ("TOLLGATE_SETTLER__CONSUMER", token),
                ],
            )
            .unwrap_or_else(|e| panic!("{token:?}: {e}"));
            assert_eq!(c.auth.admin_token, token);
            assert_eq!(c.auth.service_token, service);
            assert_eq!(c.webhooks.secret, token);
            assert_eq!(c.settler.consumer, token);
        }
        // A StatefulSet ordinal as the settler's consumer name.
        let c = load_env("", &[("TOLLGATE_SETTLER__CONSUMER", "0")]).unwrap();
        assert_eq!(c.settler_settings().consumer, "0");
        let c = load_env("", &[("TOLLGATE_GATEWAY__SHARED_SECRET", "12345")]).unwrap();
        assert_eq!(c.gateway.shared_secret, "12345");
    }

    #[test]
    fn other_settings_from_the_environment_read_as_toml() {
        let c = load_env(
            "",
            &[
                ("TOLLGATE_LEDGER__SHARDS", "32"),
                ("TOLLGATE_SETTLER__ENABLED", "false"),
                ("TOLLGATE_SERVER__RESTORE", "true"),
                ("TOLLGATE_GATEWAY__API_KEY_HEADERS", r#"["x-api-key"]"#),
            ],
        )
        .unwrap();
        assert_eq!(c.ledger.shards, 32);
        assert!(!c.settler.enabled);
        assert!(c.server.restore);
        assert_eq!(c.gateway.api_key_headers, ["x-api-key"]);
    }

    #[test]
    fn method_override_is_refuse_unless_set_to_ignore() {
        use crate::gateway::MethodOverride;
        assert_eq!(
            load("").unwrap().gateway.method_override,
            MethodOverride::Refuse
        );
        let c = load("[gateway]\nmethod_override = \"ignore\"\n").unwrap();
        assert_eq!(c.gateway.method_override, MethodOverride::Ignore);
        let c = load_env("", &[("TOLLGATE_GATEWAY__METHOD_OVERRIDE", "ignore")]).unwrap();
        assert_eq!(c.gateway.method_override, MethodOverride::Ignore);
        let errors = load_env("", &[("TOLLGATE_GATEWAY__METHOD_OVERRIDE", "allow")])
            .expect_err("not a choice")
            .to_string();
        assert!(errors.contains("gateway.method_override"), "{errors}");
    }

    #[test]
    fn a_reload_names_the_sections_it_cannot_apply() {
        let at_start = load("[ledger]\nshards = 4\n").expect("valid");
        let book_only = load("[ledger]\nshards = 4\n[pricebook]\n").expect("valid");
        assert_eq!(
            at_start.sections_changed_beyond_pricebook(&book_only),
            Vec::<&str>::new()
        );
        let more = load("[ledger]\nshards = 8\n[log]\nlevel = \"debug\"\n").expect("valid");
        assert_eq!(
            at_start.sections_changed_beyond_pricebook(&more),
            ["ledger", "log"]
        );
    }

    #[test]
    fn a_bad_setting_from_the_environment_names_its_variable() {
        let report = |file: &str, env: &[(&str, &str)]| match load_env(file, env) {
            Ok(_) => panic!("{env:?} was accepted"),
            Err(e) => e.to_string(),
        };
        let r = report("", &[("TOLLGATE_LEDGR__SHARDS", "32")]);
        assert!(
            r.contains("ledgr: unknown section (set by TOLLGATE_LEDGR__SHARDS)"),
            "{r}"
        );
        // The file's own value is fine; the variable's is not, and the message says so.
        let r = report(
            "[ledger]\nshards = 4\n",
            &[("TOLLGATE_LEDGER__SHARDS", "abc")],
        );
        assert!(
            r.contains("ledger.shards: ") && r.contains("(set by TOLLGATE_LEDGER__SHARDS)"),
            "{r}"
        );
        let r = report("", &[("TOLLGATE_GATEWAY__API_KEY_HEADERS", "x-key")]);
        assert!(
            r.contains(
                "(set by TOLLGATE_GATEWAY__API_KEY_HEADERS; a list is written as TOML there"
            ),
            "{r}"
        );
        assert!(!r.contains("x-key"), "{r}");
        // An error of the file's own is not blamed on a variable of another setting.
        let r = report(
            "[ledger]\nshards = \"x\"\n",
            &[
                ("TOLLGATE_LEDGER__SHARDZ_UNUSED", "1"),
                ("TOLLGATE_SERVER__WORKER_THREADS", "1"),
            ],
        );
        assert!(
            r.contains("ledger.shards: ") && !r.contains("set by TOLLGATE_SERVER"),
            "{r}"
        );
    }

    #[test]
    fn a_bad_setting_is_reported_with_its_type_never_its_value() {
        let errors = load_env("", &[("TOLLGATE_SERVER__WORKER_THREADS", "abc")])
            .unwrap_err()
            .0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].path, "server.worker_threads");
        assert!(errors[0].message.contains("usize"), "{errors:?}");
        assert!(!errors[0].message.contains("abc"), "{errors:?}");
        // Any setting may hold a secret, from the file too.
        let errors = load_env(
            "[auth]\nadmin_token = 84629173\n[gateway]\napi_key_headers = [\"a\", 7405]\n",
            &[("TOLLGATE_LEDGER__SHARDS", "70000")],
        )
        .unwrap_err();
        let report = errors.to_string();
        for (path, expected) in [
            ("auth.admin_token", "string"),
            ("gateway.api_key_headers", "string"),
            ("ledger.shards", "u16"),
        ] {
            let e = errors.0.iter().find(|e| e.path == path);
            assert!(
                e.is_some_and(|e| e.message.contains(expected)),
                "{path}: {report}"
            );
        }
        for value in ["84629173", "7405", "70000"] {
            assert!(!report.contains(value), "{value} in {report}");
        }
        // Nor a line of a file that is not TOML.
        let errors = load("[auth]\nadmin_token = abc123secret\n").unwrap_err().0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].path, "(file)");
        assert!(
            errors[0].message.starts_with("line 2, column 15: "),
            "{errors:?}"
        );
        assert!(!errors[0].message.contains("abc123secret"), "{errors:?}");
    }

    #[test]
    fn an_in_memory_sqlite_store_is_a_store_url_error() {
        for url in ["sqlite://:memory:", "sqlite://ledger.db?mode=memory"] {
            let errors = load_env("", &[("TOLLGATE_STORE__URL", url)]).unwrap_err();
            assert_eq!(errors.0.len(), 1, "{errors}");
            assert_eq!(errors.0[0].path, "store.url");
            assert!(errors.0[0].message.contains("in-memory"), "{errors}");
        }
    }

    #[test]
    fn a_bad_url_is_reported_without_its_password() {
        for url in [
            "redis://:hunter2@host:notaport",
            "redis://user:hunter2@[::1",
            "http://:hunter2@host:6379",
            "hunter2",
        ] {
            let errors = load_env("", &[("TOLLGATE_REDIS_URL", url)]).unwrap_err();
            assert_eq!(errors.0.len(), 1, "{errors}");
            assert_eq!(errors.0[0].path, "redis.url");
            assert!(!errors.to_string().contains("hunter2"), "{errors}");
        }
        for url in [
            "postgres://app:hunter2@db:notaport/tollgate",
            "postgres://app:hunter2@db:5432/tollgate?sslmode=sometimes",
            "mysql://app:hunter2@db/tollgate",
            "hunter2",
        ] {
            let errors = load_env("", &[("TOLLGATE_STORE__URL", url)]).unwrap_err();
            assert_eq!(errors.0.len(), 1, "{errors}");
            assert_eq!(errors.0[0].path, "store.url");
            assert!(!errors.to_string().contains("hunter2"), "{errors}");
        }
    }

    #[test]
    fn every_string_setting_takes_the_environment_as_written() {
        // Every setting whose type is a string, and a few that are not.
        let strings = [
            "server.grpc_addr",
            "server.http_addr",
            "redis.url",
            "auth.admin_token",
            "auth.service_token",
            "auth.admin_token_previous",
            "auth.service_token_previous",
            "store.url",
            "settler.consumer",
            "gateway.shared_secret",
            "gateway.shared_secret_previous",
            "gateway.shared_secret_header",
            "gateway.spool_path",
            "log.level",
            "log.format",
            "webhooks.url",
            "webhooks.secret",
            "webhooks.secret_previous",
        ];
        let others = [
            "server.worker_threads",
            "server.restore",
            "redis.connections",
            "ledger.shards",
            "settler.enabled",
            "gateway.api_key_headers",
            "webhooks.events",
            "webhooks.low_balance",
            "pricebook.default",
            "nosuch.thing",
        ];
        let var = |path: &str| format!("TOLLGATE_{}", path.replace('.', "__").to_uppercase());
        let mut table = toml::Table::new();
        let _ = apply_env(
            &mut table,
            strings
                .iter()
                .chain(&others)
                .map(|path| (var(path), "7".to_owned())),
        );
        let value = |path: &str| {
            let (section, key) = path.split_once('.').unwrap_or_default();
            table.get(section).and_then(|s| s.get(key)).cloned()
        };
        for path in strings {
            assert_eq!(value(path), Some(toml::Value::String("7".into())), "{path}");
        }
        for path in others {
            assert_eq!(value(path), Some(toml::Value::Integer(7)), "{path}");
        }
    }

    #[test]
    fn tokens_no_client_can_present_or_that_pass_admin_as_a_service_are_refused() {
        let paths = |text: &str| -> Vec<String> {
            load(text).map_or_else(
                |e| e.0.into_iter().map(|e| e.path).collect(),
                |_| Vec::new(),
            )
        };
        // A Secret made with --from-file ends in a newline.
        assert_eq!(
            paths("[auth]\nadmin_token = \"secret\\n\"\n"),
            ["auth.admin_token"]
        );
        assert_eq!(
            paths("[auth]\nservice_token = \" secret\"\n"),
            ["auth.service_token"]
        );
        assert_eq!(
            paths("[auth]\nservice_token = \"s\\u00e9cret\"\n"),
            ["auth.service_token"]
        );
        assert_eq!(
            paths("[auth]\nadmin_token = \"same\"\nservice_token = \"same\"\n"),
            ["auth.service_token"]
        );
        // Inner spaces reach the server as sent (bearer() trims only the ends).
        assert!(paths("[auth]\nadmin_token = \"a b\"\nservice_token = \"c\"\n").is_empty());
        assert!(paths("").is_empty());
    }

    #[test]
    fn previous_secrets_are_checked_as_the_current_ones_and_need_them() {
        let paths = |text: &str| -> Vec<String> {
            load(text).map_or_else(
                |e| e.0.into_iter().map(|e| e.path).collect(),
                |_| Vec::new(),
            )
        };
        let auth = "[auth]\nadmin_token = \"a\"\nservice_token = \"s\"\n";
        assert!(paths(&format!(
            "{auth}admin_token_previous = \"a0\"\nservice_token_previous = \"s0\"\n"
        ))
        .is_empty());
        for (extra, path) in [
            (
                "admin_token_previous = \"a0\\n\"",
                "auth.admin_token_previous",
            ),
            (
                "service_token_previous = \" s0\"",
                "auth.service_token_previous",
            ),
            // A service token, current or previous, equal to an admin token would pass
            // Admin.
            (
                "service_token_previous = \"a\"",
                "auth.service_token_previous",
            ),
            ("admin_token_previous = \"s\"", "auth.service_token"),
        ] {
            assert_eq!(paths(&format!("{auth}{extra}\n")), [path], "{extra}");
        }
        // A previous value alone is no rotation: refused, naming it.
        for (text, path) in [
            (
                "[auth]\nadmin_token_previous = \"a0\"\n",
                "auth.admin_token_previous",
            ),
            (
                "[auth]\nservice_token_previous = \"s0\"\n",
                "auth.service_token_previous",
            ),
            (
                "[gateway]\nshared_secret_previous = \"g0\"\n",
                "gateway.shared_secret_previous",
            ),
            (
                "[webhooks]\nsecret_previous = \"w0\"\n",
                "webhooks.secret_previous",
            ),
        ] {
            assert_eq!(paths(text), [path], "{text}");
        }
        assert_eq!(
            paths("[gateway]\nshared_secret = \"g\"\nshared_secret_previous = \"g 0\"\n"),
            ["gateway.shared_secret_previous"]
        );
        assert_eq!(
            paths(
                "[webhooks]\nurl = \"http://127.0.0.1:1/h\"\nsecret = \"w\"\n\
                 secret_previous = \"w0\\n\"\n"
            ),
            ["webhooks.secret_previous"]
        );
        // From the environment, as the other settings.
        let c = load_env(
            auth,
            &[
                ("TOLLGATE_AUTH__ADMIN_TOKEN_PREVIOUS", "a0"),
                ("TOLLGATE_AUTH__SERVICE_TOKEN_PREVIOUS", "s0"),
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.auth.admin_tokens(), ["a".to_owned(), "a0".to_owned()]);
        assert_eq!(c.auth.service_tokens(), ["s".to_owned(), "s0".to_owned()]);
    }

    #[test]
    fn retentions_beyond_ten_years_are_refused() {
        for path in [
            "idempotency_window_secs",
            "hold_retention_secs",
            "charge_retention_secs",
        ] {
            let text = format!("[ledger]\n{path} = 9223372036854775807\n");
            let errors = load(&text).unwrap_err().0;
            assert!(
                errors
                    .iter()
                    .any(|e| e.path == format!("ledger.{path}") && e.message.contains("at most")),
                "{path}: {errors:?}"
            );
        }
        // A revoked key's record outlives the idempotency window (see below).
        let ten_years = format!(
            "[ledger]\nidempotency_window_secs = {RETENTION_SECS_MAX}\nhold_retention_secs = {RETENTION_SECS_MAX}\ncharge_retention_secs = {RETENTION_SECS_MAX}\n[gateway]\nrevoked_key_retention_secs = {RETENTION_SECS_MAX}\n"
        );
        load(&ten_years).unwrap_or_else(|e| panic!("{e:?}"));
        let errors = load(&format!(
            "[gateway]\nrevoked_key_retention_secs = {}\n",
            RETENTION_SECS_MAX + 1
        ))
        .unwrap_err()
        .0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].path, "gateway.revoked_key_retention_secs");
        assert!(errors[0].message.contains("at most"), "{errors:?}");
    }

    /// A revoked key's record is dropped `gateway.revoked_key_retention_secs` after its
    /// revocation: a retention shorter than a horizon that still reads the record (the
    /// idempotency window, the void retries, the identity cache TTL) is refused by name,
    /// the horizon named too; from the file or from its TOLLGATE_ variable.
    #[test]
    fn a_revoked_key_retention_shorter_than_a_horizon_that_reads_the_key_is_refused() {
        let c = load("").unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(c.gateway.revoked_key_retention_secs, 30 * 86_400);
        assert_eq!(
            c.ledger_settings().revoked_key_retention,
            Duration::from_secs(30 * 86_400)
        );
        let refused = |text: &str, vars: &[(&str, &str)]| -> Vec<ConfigError> {
            load_env(text, vars).map_or_else(|e| e.0, |_| Vec::new())
        };
        let named = |errors: &[ConfigError], horizon: &str, floor: &str| {
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert_eq!(errors[0].path, "gateway.revoked_key_retention_secs");
            assert!(
                errors[0].message.contains(horizon)
                    && errors[0].message.contains(&format!("at least {floor} ")),
                "{errors:?}"
            );
        };
        // Shorter than the idempotency window (24 h by default).
        let errors = refused("[gateway]\nrevoked_key_retention_secs = 86399\n", &[]);
        named(&errors, "ledger.idempotency_window_secs", "86400");
        let errors = refused(
            "",
            &[("TOLLGATE_GATEWAY__REVOKED_KEY_RETENTION_SECS", "3600")],
        );
        named(&errors, "ledger.idempotency_window_secs", "86400");
        // A longer window raises the floor; a shorter one leaves the void retries and the
        // identity cache TTL.
        let errors = refused(
            "[ledger]\nidempotency_window_secs = 7776000\nhold_retention_secs = 7776000\n",
            &[],
        );
        named(&errors, "ledger.idempotency_window_secs", "7776000");
        let errors = refused(
            "[ledger]\nidempotency_window_secs = 60\n[gateway]\nrevoked_key_retention_secs = 59\n",
            &[],
        );
        named(&errors, "void retry window", "60");
        let errors = refused(
            "[ledger]\nidempotency_window_secs = 60\n[gateway]\nidentity_cache_ttl_ms = 3600000\nrevoked_key_retention_secs = 3599\n",
            &[],
        );
        named(&errors, "gateway.identity_cache_ttl_ms", "3600");
        // At the floor it is taken.
        let c = load_env(
            "[ledger]\nidempotency_window_secs = 60\n",
            &[("TOLLGATE_GATEWAY__REVOKED_KEY_RETENTION_SECS", "60")],
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(c.gateway.revoked_key_retention_secs, 60);
        assert_eq!(
            c.ledger_settings().revoked_key_retention,
            Duration::from_secs(60)
        );
    }

    #[test]
    fn a_variable_misspelling_a_setting_is_refused_by_name() {
        let errors = load_env(
            "",
            &[
                ("TOLLGATE_STORE_URL", "postgres://db/ledger"),
                ("TOLLGATE_LEDGER_SHARDS", "32"),
            ],
        )
        .unwrap_err()
        .0;
        let named: Vec<(&str, &str)> = errors
            .iter()
            .map(|e| (e.path.as_str(), e.message.as_str()))
            .collect();
        assert_eq!(named.len(), 2, "{named:?}");
        assert!(named[0].0 == "TOLLGATE_STORE_URL" && named[0].1.contains("TOLLGATE_STORE__URL"));
        assert!(
            named[1].0 == "TOLLGATE_LEDGER_SHARDS"
                && named[1].1.contains("TOLLGATE_LEDGER__SHARDS")
        );
        // Not settings: the CLI's, the shortcuts, the scripts', Kubernetes' service links
        // (the chart's tollgate-settler service).
        let c = load_env(
            "",
            &[
                ("TOLLGATE_SERVER", "http://127.0.0.1:50051"),
                ("TOLLGATE_REDIS_URL", "redis://127.0.0.1:6390"),
                (
                    "TOLLGATE_TEST_DATABASE_URL",
                    "postgres://postgres@127.0.0.1/test",
                ),
                ("TOLLGATE_SETTLER_SERVICE_HOST", "10.0.0.7"),
                ("TOLLGATE_SETTLER_SERVICE_PORT", "9090"),
                ("TOLLGATE_SETTLER_SERVICE_PORT_METRICS", "9090"),
                ("TOLLGATE_SETTLER_PORT", "tcp://10.0.0.7:9090"),
                ("TOLLGATE_SETTLER_PORT_9090_TCP_ADDR", "10.0.0.7"),
                ("TOLLGATE_PORT_8080_TCP", "tcp://10.0.0.8:8080"),
            ],
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(c.redis.url, "redis://127.0.0.1:6390");
    }

    #[test]
    fn two_variables_of_one_setting_are_refused_naming_both_not_the_values() {
        let url = "redis://:sekr1t-one@cache:6379";
        let other_url = "redis://:sekr1t-two@cache:6379";
        for (first, second, path, one, two) in [
            (
                "TOLLGATE_REDIS_URL",
                "TOLLGATE_REDIS__URL",
                "redis.url",
                url,
                other_url,
            ),
            (
                "TOLLGATE_REDIS__URL",
                "TOLLGATE_REDIS_URL",
                "redis.url",
                url,
                other_url,
            ),
            // Equal values too: which one was meant is not for tollgate to guess.
            (
                "TOLLGATE_REDIS_URL",
                "TOLLGATE_REDIS__URL",
                "redis.url",
                url,
                url,
            ),
            (
                "TOLLGATE_ADMIN_TOKEN",
                "TOLLGATE_AUTH__ADMIN_TOKEN",
                "auth.admin_token",
                "sekr1t-one",
                "sekr1t-two",
            ),
            (
                "TOLLGATE_SERVICE_TOKEN",
                "TOLLGATE_AUTH__SERVICE_TOKEN",
                "auth.service_token",
                "sekr1t-one",
                "sekr1t-one",
            ),
            (
                "TOLLGATE_LEDGER__SHARDS",
                "TOLLGATE_ledger__shards",
                "ledger.shards",
                "32",
                "16",
            ),
        ] {
            let errors = load_env("", &[(first, one), (second, two)]).unwrap_err();
            let text = errors.to_string();
            assert_eq!(errors.0.len(), 1, "{text}");
            let e = &errors.0[0];
            assert_eq!(e.path, second, "{text}");
            assert!(
                e.message.contains(first) && e.message.contains(path),
                "{text}"
            );
            assert!(!text.contains("sekr1t"), "a value is printed: {text}");
        }
        let errors = load_env(
            "",
            &[
                ("TOLLGATE_LEDGER__SHARDS", "32"),
                ("TOLLGATE_LEDGER__SHARDS", "16"),
            ],
        )
        .unwrap_err();
        assert_eq!(errors.0.len(), 1, "{errors}");
        assert!(errors.0[0].message.contains("twice"), "{errors}");
        // One variable a setting still loads.
        let c = load_env(
            "",
            &[
                ("TOLLGATE_REDIS_URL", "redis://127.0.0.1:6390"),
                ("TOLLGATE_LEDGER__SHARDS", "32"),
            ],
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(c.redis.url, "redis://127.0.0.1:6390");
        assert_eq!(c.ledger.shards, 32);
    }

    #[test]
    fn a_trim_interval_the_stuck_check_would_flap_on_is_refused() {
        let errors = load("[settler]\ntrim_interval_ms = 40000\nready_lag_max_ms = 60000\n")
            .unwrap_err()
            .0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].path, "settler.trim_interval_ms");
        load("[settler]\ntrim_interval_ms = 30000\nready_lag_max_ms = 60000\n")
            .unwrap_or_else(|e| panic!("{e:?}"));
    }

    #[test]
    fn the_consumer_idle_bound_is_a_day_and_must_be_positive() {
        let config = load("").unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(
            config.settler_settings().consumer_idle_max,
            Duration::from_secs(24 * 3600)
        );
        let errors = load("[settler]\nconsumer_idle_max_ms = 0\n").unwrap_err().0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].path, "settler.consumer_idle_max_ms");
        let config =
            load("[settler]\nconsumer_idle_max_ms = 60000\n").unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(
            config.settler_settings().consumer_idle_max,
            Duration::from_secs(60)
        );
    }
}
