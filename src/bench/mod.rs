//! `tollgate bench`: the built-in load generator, and the raw-Redis baseline it is
//! measured against in the same run.
//!
//! - `children`: the private redis-server and `tollgate serve` child processes a bench
//!   starts when it is not given a target (killed when the bench ends, Ctrl-C included)
//! - `load`: seeding, the scenario clients (ext_authz Check, Debit, Authorize+Capture,
//!   forward-auth, raw FCALL) and the closed- and open-loop drivers
//! - `report`: percentiles, the printed summary, the JSON result and the SVG plot
//!
//! Only ratios to the baseline are meaningful on a shared machine: the baseline runs the
//! ledger's own debit function (FCALL, same arguments as tollgate sends) straight against
//! the same Redis, with the same concurrency, in slices alternating with the scenario's.

mod check_client;
mod children;
mod load;
mod report;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::gateway::identity::KeyStore;
use crate::ledger::{Clock, Ledger, LedgerSettings, RedisPool, WaitReplicas};
use report::Phase;
pub use report::Report;

/// Default name of the route the bench's requests take (priced by the child server).
pub const BENCH_PATH: &str = "/v1/bench";
pub const BENCH_HOST: &str = "bench.local";
pub const BENCH_OPERATION: &str = "bench.call";
/// Credits each seeded account gets: never runs out during a bench.
pub const SEED_CREDITS: i64 = 1_000_000_000_000;
/// Accounts seeded per pipeline, and pipelines in flight while seeding.
pub const SEED_BATCH_ACCOUNTS: usize = 1_000;
pub const SEED_PIPELINES_IN_FLIGHT: usize = 4;
pub const ACCOUNTS_MAX: u32 = 1_000_000;
pub const CONCURRENCY_MAX: usize = 4_096;
/// The longest measured phase or warm-up (a day): a run is minutes; past this an
/// `Instant` sum could overflow, after the seeding.
pub const PHASE_SECS_MAX: u64 = 86_400;
/// Deadline of one bench request: a request slower than this counts as an error.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Hot-key distribution: this share of requests goes to the hottest 1% of accounts.
pub const HOT_SHARE: f64 = 0.9;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Envoy ext_authz Check over gRPC (identity, price book, one debit).
    Check,
    /// tollgate.v1 Metering/Debit over gRPC.
    Debit,
    /// tollgate.v1 Authorize then Capture (one operation = both calls).
    Hold,
    /// HTTP forward-auth (Traefik/Kong style headers).
    ForwardAuth,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Self::Check => "check",
            Self::Debit => "debit",
            Self::Hold => "hold",
            Self::ForwardAuth => "forward-auth",
        }
    }

    /// Whether requests carry API keys (seeded along with the accounts).
    fn needs_keys(self) -> bool {
        matches!(self, Self::Check | Self::ForwardAuth)
    }
}

/// The Redis durability level a bench's private redis-server runs at (docs/OPERATIONS.md
/// says what each can lose).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// `--save "" --appendonly no`.
    None,
    /// `--appendonly yes --appendfsync everysec`.
    AofEverysec,
    /// `--appendonly yes --appendfsync always`.
    AofAlways,
    /// No persistence, one replica (`--replicaof`), and tollgate configured with
    /// `redis.wait_replicas = 1`: every ledger write waits for the replica. The baseline's
    /// raw FCALL is followed by the same WAIT.
    ReplicaWait,
}

impl Durability {
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::AofEverysec => "aof-everysec",
            Self::AofAlways => "aof-always",
            Self::ReplicaWait => "replica-wait",
        }
    }

    /// redis-server arguments of the primary (after `--save "" --appendonly no`).
    fn redis_args(self) -> &'static [&'static str] {
        match self {
            Self::None | Self::ReplicaWait => &[],
            Self::AofEverysec => &["--appendonly", "yes", "--appendfsync", "everysec"],
            Self::AofAlways => &["--appendonly", "yes", "--appendfsync", "always"],
        }
    }

    /// The WAIT the child server and the baseline issue after every ledger write.
    fn wait(self, timeout_ms: u64) -> Option<WaitReplicas> {
        (self == Self::ReplicaWait).then(|| WaitReplicas {
            replicas: 1,
            timeout: Duration::from_millis(timeout_ms),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Distribution {
    /// Every account equally likely.
    Uniform,
    /// 90% of requests go to the hottest 1% of accounts (at least one).
    HotKey,
}

/// `tollgate bench SCENARIO [--target ADDR] [--redis-url URL] [--concurrency N]
/// [--duration-secs S] [--accounts N] [--rate RPS] [--baseline] [--durability LEVEL]
/// [--json PATH] [--plot PATH]`
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// gRPC address of a running tollgate (host:port). Without it the bench starts its own
    /// `tollgate serve` child (and a private redis-server without --redis-url).
    #[arg(long)]
    pub target: Option<String>,
    /// HTTP address of the running tollgate, for forward-auth with --target.
    #[arg(long)]
    pub target_http: Option<String>,
    /// Redis the accounts are seeded into and the baseline runs against. Required with
    /// --target (it must be the target's Redis, with the default shard count).
    #[arg(long)]
    pub redis_url: Option<String>,
    /// Requests in flight at once (closed loop), or most in flight (open loop).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// How long the measured part runs (after the warm-up).
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Stop after this many requests instead of after --duration-secs.
    #[arg(long)]
    pub requests: Option<u64>,
    /// Unmeasured warm-up before each measured phase.
    #[arg(long, default_value_t = 1)]
    pub warmup_secs: u64,
    /// Accounts seeded (each with a wallet and, for check and forward-auth, an API key).
    #[arg(long, default_value_t = 1_000)]
    pub accounts: u32,
    #[arg(long, value_enum, default_value = "uniform")]
    pub distribution: Distribution,
    /// Open loop: send at this fixed rate (requests/s) and measure latency from each
    /// request's intended send time, so a stall is not hidden (no coordinated omission).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Also drive the ledger's debit function straight against Redis (FCALL) with the same
    /// concurrency, in slices alternating with the scenario's (--rounds), and report
    /// tollgate ÷ raw.
    #[arg(long)]
    pub baseline: bool,
    /// With --baseline: the measured time is split into this many alternating slices of
    /// baseline and scenario, so noise from neighbours weighs on both alike.
    #[arg(long, default_value_t = 4)]
    pub rounds: u32,
    /// Also run the scenario against a second stack of its own (a private redis-server and
    /// a `tollgate serve` child) seeded with this many accounts, in slices alternating with
    /// the main stack's, and report throughput with --accounts ÷ with this many. Both
    /// figures then come from the same minutes of a noisy machine (with --baseline, each
    /// stack's raw function is measured too).
    #[arg(long)]
    pub versus_accounts: Option<u32>,
    /// Write the result as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write an SVG latency plot here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// gRPC (HTTP/2) connections the load generator spreads its requests over.
    #[arg(long, default_value_t = 2)]
    pub connections: usize,
    /// Worker threads of the load generator's own runtime (it shares the machine with the
    /// sidecar and Redis; one, a current-thread runtime, keeps its wake-ups on one core).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub threads: u16,
    /// Multiplexed Redis connections of the child server and of the baseline (default:
    /// what the server chooses by itself, `redis.connections = 0`: one per runtime thread,
    /// at least 8 with `--durability replica-wait`).
    #[arg(long)]
    pub redis_connections: Option<usize>,
    /// Durability level of the private redis-server (not with --redis-url or --target:
    /// configure those yourself). `replica-wait` also starts a replica and sets
    /// `redis.wait_replicas = 1` in the child server.
    #[arg(long, value_enum, default_value = "none")]
    pub durability: Durability,
    /// With `--durability replica-wait`: the child's `redis.wait_timeout_ms`.
    #[arg(long, default_value_t = crate::ledger::redis_pool::DEFAULT_WAIT_TIMEOUT.as_millis() as u64)]
    pub wait_timeout_ms: u64,
    /// Run the child server's settler into a store and report the outbox lag (the age of
    /// the oldest unsettled event, from the server's /metrics) under the load. `sqlite`: a
    /// fresh file; `postgres://…/db`: a fresh database created on that server (the URL's
    /// database is only used to create it) and dropped at the end. Not with --target.
    #[arg(long)]
    pub settle_into: Option<String>,
    /// Process id of the --target server, to report its RSS.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Service token for Debit/Authorize/Capture against --target (default: the
    /// TOLLGATE_SERVICE_TOKEN environment variable). Without --target the bench's own
    /// server has a token of its own, and the variable is ignored.
    #[arg(long)]
    pub service_token: Option<String>,
    /// A setting of the bench's own server, by its tollgate.toml key (repeatable):
    /// `--server-set redis.call_timeout_ms=2000`. The child gets it as its `TOLLGATE_`
    /// environment override; the bench's own `TOLLGATE_*` variables never reach the child.
    #[arg(long = "server-set", value_name = "KEY=VALUE")]
    pub server_set: Vec<String>,
}

/// `--server-set KEY=VALUE` as the child's environment override: `redis.call_timeout_ms`
/// becomes `TOLLGATE_REDIS__CALL_TIMEOUT_MS`.
fn server_override(setting: &str) -> Result<(String, String), String> {
    let (key, value) = setting
        .split_once('=')
        .ok_or_else(|| format!("--server-set {setting:?}: expected KEY=VALUE"))?;
    let well_formed = !key.is_empty()
        && key.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        });
    if !well_formed {
        return Err(format!(
            "--server-set {setting:?}: the key must be a tollgate.toml key such as redis.call_timeout_ms"
        ));
    }
    // What the bench sets itself, or mirrors on the baseline side and in its seeding: a
    // different value would measure two different setups against each other.
    const OWN: [&str; 8] = [
        "server.",
        "redis.url",
        "redis.connections",
        "redis.wait_",
        "auth.",
        "store.",
        "ledger.",
        "pricebook",
    ];
    if let Some(own) = OWN.iter().find(|own| key.starts_with(*own)) {
        return Err(format!(
            "--server-set {setting:?}: {own}… is the bench's own (its flags set it for both sides)"
        ));
    }
    Ok((
        format!("TOLLGATE_{}", key.to_ascii_uppercase().replace('.', "__")),
        value.to_owned(),
    ))
}

impl BenchArgs {
    /// `--redis-connections`, or what the child server chooses by itself (its runtime
    /// threads are the default: `server.worker_threads` is the bench's own).
    pub fn redis_connections(&self) -> usize {
        self.redis_connections.unwrap_or_else(|| {
            crate::ledger::redis_pool::auto_connections(
                crate::config::default_worker_threads(),
                self.durability
                    .wait(self.wait_timeout_ms)
                    .map_or(0, |w| w.replicas),
            )
        })
    }

    fn validate(&self) -> Result<(), String> {
        let mut bad = Vec::new();
        if !(1..=CONCURRENCY_MAX).contains(&self.concurrency) {
            bad.push(format!("--concurrency must be in 1..={CONCURRENCY_MAX}"));
        }
        if !(1..=ACCOUNTS_MAX).contains(&self.accounts) {
            bad.push(format!("--accounts must be in 1..={ACCOUNTS_MAX}"));
        }
        if self.duration_secs == 0 && self.requests.is_none() {
            bad.push("--duration-secs must be at least 1".into());
        }
        if self.duration_secs > PHASE_SECS_MAX {
            bad.push(format!(
                "--duration-secs must be at most {PHASE_SECS_MAX} (a day)"
            ));
        }
        if self.warmup_secs > PHASE_SECS_MAX {
            bad.push(format!(
                "--warmup-secs must be at most {PHASE_SECS_MAX} (a day)"
            ));
        }
        if self.requests == Some(0) {
            bad.push("--requests must be at least 1".into());
        }
        if let Some(rate) = self.rate {
            if !(rate.is_finite() && rate > 0.0) {
                bad.push("--rate must be a positive number of requests/s".into());
            }
        }
        if !(1..=100).contains(&self.rounds) {
            bad.push("--rounds must be in 1..=100".into());
        }
        if !(1..=64).contains(&self.connections) {
            bad.push("--connections must be in 1..=64".into());
        }
        if self
            .redis_connections
            .is_some_and(|n| !(1..=crate::config::REDIS_CONNECTIONS_MAX).contains(&n))
        {
            bad.push(format!(
                "--redis-connections must be in 1..={}",
                crate::config::REDIS_CONNECTIONS_MAX
            ));
        }
        if self.durability != Durability::None && self.redis_url.is_some() {
            bad.push("--durability starts its own redis-server: not with --redis-url (set the persistence of that Redis, and TOLLGATE_REDIS__WAIT_REPLICAS for the server, yourself)".into());
        }
        if !(1..=crate::config::REDIS_WAIT_TIMEOUT_MS_MAX).contains(&self.wait_timeout_ms) {
            bad.push(format!(
                "--wait-timeout-ms must be in 1..={}",
                crate::config::REDIS_WAIT_TIMEOUT_MS_MAX
            ));
        }
        if let Some(url) = &self.settle_into {
            if self.target.is_some() {
                bad.push(
                    "--settle-into configures the bench's own server: not with --target".into(),
                );
            }
            if url != "sqlite"
                && !url.starts_with("postgres://")
                && !url.starts_with("postgresql://")
            {
                bad.push("--settle-into must be sqlite or a postgres:// url".into());
            }
        }
        if let Some(n) = self.versus_accounts {
            if !(1..=ACCOUNTS_MAX).contains(&n) {
                bad.push(format!("--versus-accounts must be in 1..={ACCOUNTS_MAX}"));
            }
            if self.target.is_some() || self.redis_url.is_some() || self.settle_into.is_some() {
                bad.push("--versus-accounts starts two stacks of its own: not with --target, --redis-url or --settle-into".into());
            }
        }
        for setting in &self.server_set {
            if let Err(e) = server_override(setting) {
                bad.push(e);
            }
        }
        if self.target.is_some() && !self.server_set.is_empty() {
            bad.push("--server-set configures the bench's own server: not with --target".into());
        }
        if self.target.is_none() {
            // Only meaningful against a running server: silently ignoring them would
            // measure something else than asked for.
            for (flag, given) in [
                ("--target-http", self.target_http.is_some()),
                ("--server-pid", self.server_pid.is_some()),
                ("--service-token", self.service_token.is_some()),
            ] {
                if given {
                    bad.push(format!(
                        "{flag} is for the server given with --target: not without it"
                    ));
                }
            }
        }
        if self.target.is_some() {
            if self.redis_url.is_none() {
                bad.push("--target needs --redis-url (the target's Redis: the bench seeds accounts there)".into());
            }
            if self.scenario == Scenario::ForwardAuth && self.target_http.is_none() {
                bad.push("forward-auth with --target needs --target-http".into());
            }
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(bad.join("; "))
        }
    }
}

/// Runs a bench end to end; the children it started are killed when it returns or when
/// the future is dropped (Ctrl-C).
pub async fn run(args: BenchArgs) -> Result<Report, String> {
    args.validate()?;
    if cfg!(debug_assertions) {
        // The child server is this executable: a debug build measures the debug build.
        eprintln!(
            "warning: this tollgate is a debug build; its figures (and the ratio to raw Redis) \
             say little about a release build: cargo build --release"
        );
    }
    let stack = Stack::start(&args, args.accounts).await?;
    let versus = match args.versus_accounts {
        Some(n) => match Stack::start(&args, n).await {
            Ok(other) => Some(other),
            Err(e) => {
                stack.revoke_keys().await;
                return Err(e);
            }
        },
        None => None,
    };
    // The keys are revoked whether the run measured or failed on the way.
    let measured = measure(&args, &stack, versus.as_ref()).await;
    for s in std::iter::once(&stack).chain(versus.as_ref()) {
        s.revoke_keys().await;
    }
    drop(versus);
    drop(stack);
    let report = measured?;
    // After the result is written: a side with too many errors fails the run.
    report.check()?;
    Ok(report)
}

/// Measures the sides of a run's stacks and writes the report (printout, JSON, plot).
async fn measure(
    args: &BenchArgs,
    stack: &Stack,
    versus: Option<&Stack>,
) -> Result<Report, String> {
    let plan = load::Plan::from_args(args);
    let stacks: Vec<&Stack> = std::iter::once(stack).chain(versus).collect();
    let mut sides = Vec::new();
    for s in &stacks {
        let of = if versus.is_some() {
            format!(", {} accounts", s.accounts_seeded)
        } else {
            String::new()
        };
        if args.baseline {
            sides.push(load::Side {
                label: format!("baseline (raw FCALL debit){of}"),
                clients: load::raw_clients(&s.ledger, args),
                accounts: s.accounts.clone(),
                ledger: &s.ledger,
                probe: load::Probe::default(),
            });
        }
        sides.push(load::Side {
            label: format!("{}{of}", args.scenario.name()),
            clients: load::scenario_clients(args.scenario, &s.target, args).await?,
            accounts: s.accounts.clone(),
            ledger: &s.ledger,
            probe: s.probe.clone(),
        });
    }
    // One side (no baseline, no second stack) is measured in one piece.
    let rounds = if sides.len() == 1 { 1 } else { args.rounds };
    let mut phases = load::measure_alternating(sides, &plan, rounds)
        .await?
        .into_iter();
    // Per stack, in the order the sides were made: the baseline (with --baseline), then
    // the scenario.
    let mut next_pair = || -> Result<(Phase, Option<Phase>), String> {
        let base = if args.baseline { phases.next() } else { None };
        Ok((phases.next().ok_or("a phase is missing")?, base))
    };
    let (main, baseline) = next_pair()?;
    let versus_report = match versus {
        Some(other) => {
            let (main, baseline) = next_pair()?;
            Some(report::Versus {
                accounts: other.accounts_seeded,
                server_pid: other.server_pid,
                main,
                baseline,
            })
        }
        None => None,
    };

    let report = Report::new(args, main, baseline, versus_report, stack.server_pid);
    print!("{}", report.render());
    if let Some(path) = &args.json {
        report.write_json(path)?;
        println!("result written to {}", path.display());
    }
    if let Some(path) = &args.plot {
        report.write_svg(path)?;
        println!("latency plot written to {}", path.display());
    }
    Ok(report)
}

/// What one measured side runs against: a Redis (private unless --redis-url), the server
/// (a `tollgate serve` child unless --target), and the accounts seeded there. Dropping it
/// kills the children and drops a --settle-into database.
struct Stack {
    accounts_seeded: u32,
    ledger: Arc<Ledger>,
    keys: Arc<KeyStore>,
    /// A Redis of the caller's (--redis-url): it outlives the run, and so would the keys
    /// the run made.
    redis_outlives_run: bool,
    accounts: Arc<load::Accounts>,
    target: load::Target,
    probe: load::Probe,
    server_pid: Option<u32>,
    // Dropped in this order: the server before its Redis and its store.
    _server: Option<children::BenchServer>,
    _settle_db: Option<crate::dev::ScratchDatabase>,
    _redis: Option<children::BenchRedis>,
}

impl Stack {
    async fn start(args: &BenchArgs, accounts_seeded: u32) -> Result<Self, String> {
        let mut redis_child = None;
        let redis_url = match &args.redis_url {
            Some(url) => url.clone(),
            None => {
                let redis = children::BenchRedis::start(args.durability).await?;
                let url = redis.url().to_owned();
                redis_child = Some(redis);
                url
            }
        };
        let wait = args.durability.wait(args.wait_timeout_ms);
        let mut settle_db = None;
        let settle_store = match args.settle_into.as_deref() {
            None => None,
            Some("sqlite") => Some(children::SettleStore::Sqlite),
            Some(url) => {
                let name = format!("tollgate_bench_{}", std::process::id());
                let db = crate::dev::ScratchDatabase::create(url, &name)
                    .await
                    .map_err(|e| format!("--settle-into: {e}"))?;
                println!("settling into PostgreSQL database {name} (dropped at the end)");
                let store = children::SettleStore::Postgres(db.url.clone());
                settle_db = Some(db);
                Some(store)
            }
        };
        let server = match &args.target {
            Some(_) => None,
            None => Some(
                children::BenchServer::start(
                    &redis_url,
                    args.redis_connections(),
                    wait,
                    settle_store.as_ref(),
                    &args
                        .server_set
                        .iter()
                        .map(|s| server_override(s))
                        .collect::<Result<Vec<_>, _>>()?,
                )
                .await?,
            ),
        };
        let (target, server_pid) = match &server {
            Some(s) => (
                load::Target {
                    grpc_addr: s.grpc_addr.clone(),
                    http_addr: Some(s.http_addr.clone()),
                    service_token: children::SERVICE_TOKEN.to_owned(),
                },
                Some(s.pid),
            ),
            None => (
                load::Target {
                    grpc_addr: args.target.clone().unwrap_or_default(),
                    http_addr: args.target_http.clone(),
                    service_token: args
                        .service_token
                        .clone()
                        .or_else(|| std::env::var("TOLLGATE_SERVICE_TOKEN").ok())
                        .unwrap_or_default(),
                },
                args.server_pid,
            ),
        };

        // With replica-wait the baseline's FCALL is followed by the same WAIT, so the
        // ratio compares tollgate with raw Redis at the same durability level.
        let pool =
            RedisPool::with_wait(&redis_url, args.redis_connections(), REQUEST_TIMEOUT, wait)
                .map_err(|e| e.to_string())?;
        let ledger = Arc::new(Ledger::new(
            pool.clone(),
            LedgerSettings::default(),
            Clock::Redis,
        ));
        ledger
            .load_scripts()
            .await
            .map_err(|e| format!("cannot load the ledger scripts into {redis_url}: {e}"))?;
        let keys = Arc::new(KeyStore::new(
            pool,
            ledger.shards().clone(),
            Duration::from_secs(1),
            1,
            crate::gateway::identity::DEFAULT_KEYS_PER_ACCOUNT_MAX,
        ));
        keys.load_scripts().await.map_err(|e| e.to_string())?;
        let accounts =
            load::seed(&ledger, &keys, accounts_seeded, args.scenario.needs_keys()).await?;
        let probe = load::Probe {
            pid: server_pid,
            metrics_addr: settle_store.and(target.http_addr.clone()),
        };
        Ok(Self {
            accounts_seeded,
            ledger,
            keys,
            redis_outlives_run: args.redis_url.is_some(),
            accounts,
            target,
            probe,
            server_pid,
            _server: server,
            _settle_db: settle_db,
            _redis: redis_child,
        })
    }
}

impl Stack {
    /// Revokes the run's API keys in a Redis that outlives the run (a private one goes
    /// with them). A failure is reported, not fatal: the figures are written already.
    async fn revoke_keys(&self) {
        if !self.redis_outlives_run || self.accounts.key_ids.is_empty() {
            return;
        }
        match load::revoke_keys(&self.keys, &self.accounts).await {
            Ok(n) => println!("revoked the run's {n} API keys"),
            Err(e) => eprintln!("warning: {e} (they stay, revoked by nobody)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn validated(args: &[&str]) -> Result<(), String> {
        let cli = Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        cli.bench.validate()
    }

    #[test]
    fn target_flags_are_refused_without_a_target() {
        for (flag, value) in [
            ("--target-http", "127.0.0.1:8080"),
            ("--server-pid", "1"),
            ("--service-token", "t"),
        ] {
            let err = validated(&["debit", flag, value]).expect_err(flag);
            assert!(err.contains(flag) && err.contains("--target"), "{err}");
            validated(&[
                "debit",
                "--target",
                "127.0.0.1:50051",
                "--redis-url",
                "redis://127.0.0.1:6379",
                flag,
                value,
            ])
            .expect(flag);
        }
        validated(&["debit"]).expect("no target flags");
    }

    /// A phase too long for an `Instant` sum is refused up front, not after the seeding.
    #[test]
    fn phases_are_bounded() {
        for flag in ["--duration-secs", "--warmup-secs"] {
            validated(&["check", flag, "86400"]).expect(flag);
            for value in ["86401", &u64::MAX.to_string()] {
                let err = validated(&["check", flag, value]).expect_err(flag);
                assert!(err.contains(flag), "{err}");
            }
        }
    }

    #[test]
    fn server_settings_become_the_childs_environment_overrides() {
        assert_eq!(
            server_override("redis.call_timeout_ms=2000"),
            Ok(("TOLLGATE_REDIS__CALL_TIMEOUT_MS".into(), "2000".into()))
        );
        assert_eq!(
            server_override("log.level=info=x"),
            Ok(("TOLLGATE_LOG__LEVEL".into(), "info=x".into()))
        );
        for bad in [
            "redis.call_timeout_ms",
            "=1",
            "Redis.url=x",
            "redis..url=x",
            "a b=1",
            "redis.url=redis://elsewhere",
            "redis.connections=32",
            "ledger.shards=32",
            "auth.service_token=x",
        ] {
            let err = validated(&["debit", "--server-set", bad]).expect_err(bad);
            assert!(err.contains("--server-set"), "{err}");
        }
        let err = validated(&[
            "debit",
            "--target",
            "127.0.0.1:50051",
            "--redis-url",
            "redis://127.0.0.1:6379",
            "--server-set",
            "redis.call_timeout_ms=2000",
        ])
        .expect_err("with --target");
        assert!(err.contains("--server-set"), "{err}");
        validated(&["debit", "--server-set", "redis.call_timeout_ms=2000"]).expect("valid");
    }
}
