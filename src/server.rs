//! `tollgate serve`: wires the ledger and the gateway to the gRPC and HTTP listeners and
//! the sweeper, reloads the price book on SIGHUP, and drains on shutdown. Tests call
//! [`run`] with their own listeners and shutdown signal.
//!
//! Operability lives here too: `/healthz`, `/readyz` (with a JSON body naming the failed
//! check), `/metrics`, `grpc.health.v1.Health` (kept in step with readiness by a watcher
//! task), gRPC reflection, the failed-request log layer, and the webhook dispatcher next
//! to the settler.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::Json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::api::admin::AdminService;
use crate::api::auth::TokenCheck;
use crate::api::metering::MeteringService;
use crate::api::pb::admin_server::AdminServer;
use crate::api::pb::metering_server::MeteringServer;
use crate::config::Config;
use crate::gateway::access_log::{self, AccessLog};
use crate::gateway::ext_authz::ExtAuthz;
use crate::gateway::{forward_auth, Gateway};
use crate::ledger::{sweeper, Clock, Ledger, LedgerError, RedisPool};
use crate::settle::restore::RestoreMode;
use crate::settle::settler::{Settler, SettlerStatus};
use crate::settle::shard_count::{self, ShardCountError};
use crate::settle::{Store, StoreError};
use crate::telemetry;
use crate::telemetry::request_log::RequestLogLayer;
use crate::transport::{self, Deadline};
use crate::webhooks::dispatcher::Dispatcher;
use envoy_types::ext_authz::v3::pb::AuthorizationServer;
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_server::AccessLogServiceServer;

/// How long shutdown waits for the listeners to drain (in-flight requests, open streams)
/// before closing what is still open; and then, once more, for the fail_open spool flush
/// and the background tasks together ([`drained`]). At most twice this from the signal to
/// the exit: the chart's `terminationGracePeriodSeconds` (30) leaves room.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long `serve` waits for the store at start-up before serving anyway: for its
/// schema and the first new-shard check together, and (`--restore`) for the restore's
/// look for lost shards. A store that hangs (a migration lock held, a stalled server)
/// used to keep the process from serving until it answered: checks and charges, which
/// never need it, went unanswered, `/healthz` too. The settler, the new-shard check
/// (every [`INITIALIZE_RETRY`]) and the background restore carry on from there.
pub const STORE_STARTUP_WAIT: Duration = Duration::from_secs(5);
/// How often the health watcher re-runs the readiness checks: gRPC health, the
/// `tollgate_ready` gauge and `/readyz` follow its rounds.
pub const HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// The services `grpc.health.v1.Health` reports on ("" = the whole server). The Envoy
/// service is served by the gateway module; its status follows readiness like the others.
pub const HEALTH_SERVICES: [&str; 4] = [
    "",
    "tollgate.v1.Metering",
    "tollgate.v1.Admin",
    "envoy.service.auth.v3.Authorization",
];

/// Builds the ledger a config describes (connections are made lazily).
pub fn ledger_from_config(config: &Config, clock: Clock) -> Result<Arc<Ledger>, LedgerError> {
    // The ledger resolves its metric handles when built: the recorder must exist first.
    telemetry::metrics::install();
    let redis = RedisPool::with_wait(
        &config.redis.url,
        config.redis_connections(),
        Duration::from_millis(config.redis.call_timeout_ms),
        config.wait_replicas(),
    )?;
    Ok(Arc::new(Ledger::new(
        redis,
        config.ledger_settings(),
        clock,
    )))
}

/// How often uninitialized shards are looked at again.
pub const INITIALIZE_RETRY: Duration = Duration::from_secs(1);

/// The start-up check of the shard count (`settle::shard_count`): `Ok(true)` when it
/// matches (and is persisted), `Ok(false)` when Redis or the store did not answer (the
/// process starts, and [`verify_shard_count`] asks again), an error when it differs: the
/// process refuses to start.
pub async fn shard_count_at_start(ledger: &Ledger, store: &Store) -> Result<bool, ShardCountError> {
    match shard_count::check(ledger, store).await {
        Ok(()) => Ok(true),
        Err(err) if err.is_transient() => {
            count_store_error(&err);
            tracing::warn!(error = %err, "shard count not checked yet: no shard is marked new until it is; checking again");
            Ok(false)
        }
        Err(err) => Err(err),
    }
}

/// [`shard_count_at_start`] in a task of its own, waited for until `deadline`: a store
/// that hangs (another process holds the migration lock) must not keep the process from
/// answering health checks. Not checked by then (`Ok(false)`): logged, with what the
/// process does `meanwhile` until it is; the check goes on in its task.
async fn shard_count_until(
    ledger: &Arc<Ledger>,
    store: &Arc<Store>,
    deadline: tokio::time::Instant,
    meanwhile: &str,
) -> Result<bool, ShardCountError> {
    let count_check = tokio::spawn({
        let (ledger, store) = (ledger.clone(), store.clone());
        async move { shard_count_at_start(&ledger, &store).await }
    });
    match tokio::time::timeout_at(deadline, count_check).await {
        Ok(Ok(verified)) => verified,
        Ok(Err(err)) => {
            tracing::error!(error = %err, "the shard count check's task failed");
            Ok(false)
        }
        Err(_) => {
            tracing::warn!(
                "the shard count has not been checked yet (the store has not answered): \
                 {meanwhile} until it is (asked every second)"
            );
            Ok(false)
        }
    }
}

/// A store error of the shard count check counts in `tollgate_store_errors_total`, as
/// the settler's own do: a `settle` whose store is unreachable from start-up waits on
/// the check, and `TollgateStoreErrors` still sees it.
fn count_store_error(err: &ShardCountError) {
    if let ShardCountError::Store(err) = err {
        metrics::counter!(telemetry::metrics::STORE_ERRORS_TOTAL, "kind" => err.kind())
            .increment(1);
    }
}

/// Asks again every [`INITIALIZE_RETRY`] until Redis and the store answer: `Ok` when the
/// count matches (or on shutdown), the error when it differs (the process then stops).
pub async fn verify_shard_count(
    ledger: &Ledger,
    store: &Store,
    stop: impl Future<Output = ()>,
) -> Result<(), ShardCountError> {
    let mut stop = std::pin::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = tokio::time::sleep(INITIALIZE_RETRY) => {}
        }
        match shard_count::check(ledger, store).await {
            Ok(()) => return Ok(()),
            Err(err) if err.is_transient() => {
                count_store_error(&err);
                tracing::debug!(error = %err, "shard count not checked yet");
            }
            Err(err) => return Err(err),
        }
    }
}

/// Marks shards without an epoch marker initialized when that is safe: the store has never
/// settled an event of the shard, so Redis is new rather than emptied. A shard whose events
/// are in the store lost its data: it stays uninitialized (charges refused with
/// LEDGER_NOT_INITIALIZED, not ready) until `tollgate restore`. Returns whether every shard
/// is initialized.
pub async fn initialize_new_shards(ledger: &Ledger, store: &Store) -> bool {
    let Ok(initialized) = ledger.initialized_shards().await else {
        return false;
    };
    if initialized.iter().all(|done| *done) {
        return true;
    }
    if let Err(err) = store.migrate().await {
        tracing::warn!(error = %err, "cannot reach the store to check a new Redis shard");
        return false;
    }
    let mut all = true;
    for (shard, done) in initialized.into_iter().enumerate() {
        if done {
            continue;
        }
        let shard = shard as u16;
        // Claimed in Redis before the store is asked, and marked only while the claim is
        // still there (Ledger::mark_new_shard): what the store said is about this Redis.
        let token = match ledger.claim_new_shard(shard).await {
            Ok(token) => token,
            Err(err) => {
                tracing::warn!(shard, error = %err, "cannot claim a new shard");
                all = false;
                continue;
            }
        };
        match store.shard_has_events(shard).await {
            Ok(false) => {
                match ledger
                    .mark_new_shard(shard, &crate::ledger::new_epoch(), &token)
                    .await
                {
                    Ok(true) => tracing::info!(shard, "initialized a new ledger shard"),
                    // Another process marked it meanwhile, or Redis changed under the
                    // claim: the next look decides.
                    Ok(false) => {
                        all = ledger.shard_initialized(shard).await.unwrap_or(false) && all;
                    }
                    Err(err) => {
                        tracing::warn!(shard, error = %err, "cannot initialize shard");
                        all = false;
                    }
                }
            }
            Ok(true) => {
                tracing::error!(shard, "Redis lost this shard's data (the store has its events): charges are refused until `tollgate restore`");
                all = false;
            }
            Err(err) => {
                tracing::warn!(shard, error = %err, "cannot check the store for a new Redis shard");
                all = false;
            }
        }
    }
    all
}

/// `serve --restore`: rebuilds the shards Redis lost (no epoch marker, events in the store)
/// before serving; see [`restore_lost_shards`]. A failed look is the caller's to log: `serve`
/// serves anyway, and its background restore looks again.
///
/// The look (the store's schema and which lost shards have events there) waits for the
/// store at most [`STORE_STARTUP_WAIT`], then gives up (an error; the look itself goes
/// on, and ends when the store answers): a store that hangs used to keep `serve
/// --restore` from serving until it answered. A restore that has started runs to its
/// end, which may take minutes on a large ledger.
pub async fn restore_if_lost(config: &Config, ledger: &Arc<Ledger>) -> Result<(), String> {
    let store = store_from_config(config).map_err(|e| e.to_string())?;
    // A task of its own, which the wait does not cut short (its migration is not rolled
    // back): it ends when the store answers.
    let look = tokio::spawn({
        let ledger = ledger.clone();
        let store = store.clone();
        async move { lost_shards(&ledger, &store).await }
    });
    let lost = tokio::time::timeout(STORE_STARTUP_WAIT, look)
        .await
        .map_err(|_| {
            format!(
                "the store did not answer within {} s",
                STORE_STARTUP_WAIT.as_secs()
            )
        })?
        .map_err(|e| format!("the look for lost shards failed: {e}"))??;
    if lost {
        restore_lost(ledger, store).await?;
    }
    Ok(())
}

/// What [`restore_lost_shards`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostShards {
    /// Every shard serves, or the shards that do not have no events in the store.
    NoneLost,
    Restored,
    /// Another restore holds the lease.
    Busy,
    /// Refused: a shard that does not serve holds data of unknown origin, or dead letters.
    Refused,
}

/// `server.restore`: how often a serving process looks for shards Redis lost meanwhile.
pub const RESTORE_RETRY: Duration = Duration::from_secs(5);
/// ... and after a refusal or a failure, which a person has to act on.
pub const RESTORE_RETRY_REFUSED: Duration = Duration::from_secs(60);

/// `server.restore`: while serving, looks every [`RESTORE_RETRY`] for shards Redis lost
/// (it restarted empty, or lost them while running) and restores them in the background;
/// the other shards keep serving. One restore runs at a time across sidecars (the lease).
async fn keep_restoring(ledger: Arc<Ledger>, store: Arc<Store>, stop: impl Future<Output = ()>) {
    let mut stop = std::pin::pin!(stop);
    let mut wait = RESTORE_RETRY;
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = match restore_lost_shards(&ledger, store.clone()).await {
            Ok(LostShards::Refused) => RESTORE_RETRY_REFUSED,
            Ok(_) => RESTORE_RETRY,
            // Redis unreachable is no one's to act on: look again as soon as usual, so that
            // a Redis back from an outage (a pod started during it) is restored at once
            // rather than up to a minute later, its lost shards refusing charges meanwhile.
            Err(err) if ledger.initialized_shards().await.is_err() => {
                tracing::warn!(error = %err, "could not look for shards Redis lost: Redis unreachable; trying again");
                RESTORE_RETRY
            }
            Err(err) => {
                tracing::warn!(error = %err, "could not restore the shards Redis lost; trying again later");
                RESTORE_RETRY_REFUSED
            }
        };
    }
}

/// Restores the shards that lost their data: no epoch marker, and events in the store. A
/// shard that serves is left alone, whether it kept its data or was marked new by a running
/// sidecar since. When another restore is running (its lease is held), this one serves
/// meanwhile: the shards being restored refuse charges until that restore is done.
pub async fn restore_lost_shards(
    ledger: &Arc<Ledger>,
    store: Arc<Store>,
) -> Result<LostShards, String> {
    if !lost_shards(ledger, &store).await? {
        return Ok(LostShards::NoneLost);
    }
    restore_lost(ledger, store).await
}

/// Whether a shard lost its data: it has no epoch marker and the store has its events.
async fn lost_shards(ledger: &Ledger, store: &Store) -> Result<bool, String> {
    let initialized = ledger
        .initialized_shards()
        .await
        .map_err(|e| e.to_string())?;
    if initialized.iter().all(|i| *i) {
        return Ok(false);
    }
    // Never rebuilt under another shard count than the deployment's (it migrates the
    // store too).
    shard_count::check(ledger, store)
        .await
        .map_err(|e| e.to_string())?;
    let mut lost = false;
    for (shard, done) in initialized.iter().enumerate() {
        if !done {
            lost |= store
                .shard_has_events(shard as u16)
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(lost)
}

/// The restore of [`restore_lost_shards`], once [`lost_shards`] found some.
async fn restore_lost(ledger: &Arc<Ledger>, store: Arc<Store>) -> Result<LostShards, String> {
    tracing::warn!("Redis lost shards whose events are in the store: restoring them");
    let restored =
        crate::settle::restore::restore(ledger.clone(), store, RestoreMode::Lost, |s, count| {
            tracing::info!(
                shard = s.shard,
                of = count,
                wallets = s.wallets,
                events = s.events,
                skipped = s.skipped,
                "restored shard"
            );
        })
        .await;
    match restored {
        Ok(report) => {
            tracing::info!(report = %report.render().trim(), "restore done");
            Ok(LostShards::Restored)
        }
        Err(err @ crate::settle::restore::RestoreError::Busy(..)) => {
            tracing::info!(error = %err, "serving while another restore runs");
            Ok(LostShards::Busy)
        }
        // Another restore finished first.
        Err(crate::settle::restore::RestoreError::NotEmpty(_))
            if ledger
                .initialized_shards()
                .await
                .is_ok_and(|s| s.iter().all(|i| *i)) =>
        {
            Ok(LostShards::NoneLost)
        }
        // Every shard serves by now (another restore finished first), or a shard that
        // does not serve holds data of unknown origin (not a dead restore's: those are
        // redone), or dead letters:
        // serve the shards that do serve; the others refuse charges, not ready, until
        // `tollgate restore` (with `--force` for the second case: it rewrites only shards
        // that do not serve) is run by hand.
        Err(
            err @ (crate::settle::restore::RestoreError::NotEmpty(..)
            | crate::settle::restore::RestoreError::DeadLetters(..)),
        ) => {
            tracing::error!(error = %err, "not restored: serving the shards that are initialized");
            Ok(LostShards::Refused)
        }
        Err(err) => Err(err.to_string()),
    }
}

/// The durable store a config describes (connections are made lazily).
pub fn store_from_config(config: &Config) -> Result<Arc<Store>, StoreError> {
    Ok(Arc::new(Store::connect_lazy(
        &config.store.url,
        config.store.connections,
    )?))
}

/// The store of an operator tool (`reconcile`, `end-lost-hold`, `restore`, `dead-letters
/// replay`): one `serve` or `settle` made, never created here (`Store::open_existing`).
pub async fn existing_store_from_config(config: &Config) -> Result<Arc<Store>, StoreError> {
    Ok(Arc::new(
        Store::open_existing(&config.store.url, config.store.connections).await?,
    ))
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(
        "the admin and service tokens must be configured (auth.admin_token, auth.service_token)"
    )]
    MissingTokens,
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("HTTP server failed: {0}")]
    Http(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("cannot start the settler thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    ShardCount(#[from] ShardCountError),
}

/// What the HTTP endpoints read.
#[derive(Clone)]
struct HttpState {
    ledger: Arc<Ledger>,
    settlement: Settlement,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// `serve` answers charges: readiness checks (and loads) the ledger scripts, and a
    /// store error only degrades it (the hot path does not need the store; the lag
    /// threshold still applies). `settle` only settles: a store error fails it.
    serving: bool,
    /// The readiness checks that ask Redis, as the health watcher last ran them.
    last_checks: LastChecks,
    /// True from the stop signal on: readiness fails (`shutdown`) while `serve` goes on
    /// serving for `server.shutdown_delay_ms`, then drains.
    shutting_down: watch::Receiver<bool>,
}

/// What readiness and `/metrics` read about settlement in this process.
#[derive(Clone, Default)]
struct Settlement {
    /// The settler's status, when one runs here.
    settler: Option<Arc<std::sync::Mutex<SettlerStatus>>>,
    /// Whether a webhook dispatcher runs here.
    webhooks: bool,
    /// `settler.ready_lag_max_ms`: the lag bound, and how old the settler's last outbox
    /// measurement may be before readiness says the settler is stuck.
    ready_lag_max_ms: u64,
    tasks: Tasks,
}

/// The background tasks besides the settler and the webhook dispatcher that run until
/// shutdown (the ones a process runs: `settle` runs only the reloader), with what stops
/// happening while one is gone. One that ended early degrades readiness.
const BACKGROUND_TASKS: [(&str, &str); 6] = [
    (
        "sweeper",
        "holds past their deadline and lots past their expiry end only when their wallet is \
         next used",
    ),
    (
        "spool_replayer",
        "fail_open charges spooled to disk are not applied",
    ),
    (
        "access_log_retrier",
        "access-log settlements that met a ledger error are not retried (their holds follow \
         on_expiry)",
    ),
    (
        "shard_initializer",
        "a shard Redis lost or never had is not looked at again",
    ),
    (
        "restorer",
        "shards Redis lost are not restored by this process",
    ),
    ("reloader", "SIGHUP does not reload the price book"),
];

/// The background tasks readiness depends on, which run until shutdown: each one that
/// ended before it (a panic, an early return) is named here with how it ended, and
/// degrades or fails readiness from then on (the settler and the dispatcher fail
/// `settle`'s; [`BACKGROUND_TASKS`] only degrade).
#[derive(Clone, Default)]
struct Tasks(Arc<std::sync::Mutex<Vec<(&'static str, String)>>>);

impl Tasks {
    /// How `name` ended, if it ended before shutdown.
    fn ended(&self, name: &str) -> Option<String> {
        let ended = self.0.lock().unwrap_or_else(|e| e.into_inner());
        ended
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, how)| how.clone())
    }

    /// Waits for `task` (the task itself, or what completes when it ends): if it ends
    /// before `stopping` turns true, logs it and records it (readiness reports it, and
    /// `tollgate_background_task_ended{task}` turns 1). The
    /// handle completes when the task has ended: shutdown joins it.
    fn supervise(
        &self,
        name: &'static str,
        task: impl Future<Output = Result<(), String>> + Send + 'static,
        stopping: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let tasks = self.clone();
        // At 0 from the start, so an alert on it sees the change.
        metrics::gauge!(telemetry::metrics::BACKGROUND_TASK_ENDED, "task" => name).set(0.0);
        tokio::spawn(async move {
            let ended = task.await;
            if *stopping.borrow() {
                return;
            }
            let how = match ended {
                Ok(()) => "returned".to_owned(),
                Err(how) => how,
            };
            tracing::error!(
                task = name,
                how = %how,
                "a background task ended before shutdown: the process reports it (serve: \
                 degraded; settle: not ready) until it is restarted"
            );
            metrics::gauge!(telemetry::metrics::BACKGROUND_TASK_ENDED, "task" => name).set(1.0);
            tasks
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((name, how));
        })
    }

    /// Spawns `task` and supervises it ([`Tasks::supervise`]).
    fn spawn(
        &self,
        name: &'static str,
        task: impl Future<Output = ()> + Send + 'static,
        stopping: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        self.supervise(name, joined(tokio::spawn(task)), stopping)
    }
}

/// How a spawned task ended, for [`Tasks::supervise`]: its panic message.
async fn joined(task: tokio::task::JoinHandle<()>) -> Result<(), String> {
    task.await.map_err(|err| {
        if !err.is_panic() {
            return "cancelled".to_owned();
        }
        let panic = err.into_panic();
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        format!("panicked: {message}")
    })
}

/// The probe and metrics routes. The request log layer goes on last, around every route
/// merged in (a layer only wraps the routes added before it).
fn http_router(state: HttpState) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        // They read no body: none for an extractor added later either.
        .layer(DefaultBodyLimit::max(0))
        .with_state(state)
}

/// A path no route serves: a JSON answer like every other error of the HTTP API.
async fn no_route() -> axum::response::Response {
    forward_auth::json_response(404, serde_json::json!({ "error": "not_found" }))
}

/// A route asked with a method it does not take.
async fn method_not_allowed() -> axum::response::Response {
    forward_auth::json_response(405, serde_json::json!({ "error": "method_not_allowed" }))
}

/// Starts the webhook dispatcher when webhooks are configured (next to a settler).
fn spawn_dispatcher(
    config: &Config,
    store: &Arc<Store>,
    stopped: impl Future<Output = ()> + Send + 'static,
) -> Option<tokio::task::JoinHandle<()>> {
    let settings = config.webhooks.dispatch_settings()?;
    let rules = config.webhooks.rules()?;
    match Dispatcher::new(store.clone(), settings, rules) {
        Ok(dispatcher) => Some(tokio::spawn(dispatcher.run(stopped))),
        Err(err) => {
            tracing::error!(error = %err, "webhook dispatcher not started");
            None
        }
    }
}

/// Starts the settler if configured; returns its status handle and a receiver that
/// completes when it has stopped.
///
/// It runs on its own thread, with its own single-threaded runtime, Redis connections and
/// store pool: parsing and writing a batch of thousands of events then never holds up the
/// runtime that answers checks (one thread on a 2-core host), and its large stream replies
/// never queue in front of a check's script reply on a shared connection.
fn spawn_settler(
    config: &Config,
    stopped: impl Future<Output = ()> + Send + 'static,
) -> Result<Option<SettlerThread>, ServeError> {
    if !config.settler.enabled {
        return Ok(None);
    }
    let ledger = ledger_from_config(config, Clock::Redis)?;
    let store = store_from_config(config)?;
    let settler = Settler::new(ledger, store, config.settler_settings());
    let status = settler.status();
    let (done, stopped_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("tollgate-settler".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime.block_on(settler.run(stopped)),
                Err(err) => tracing::error!(error = %err, "settler runtime not started"),
            }
            let _ = done.send(());
        })
        .map_err(ServeError::Thread)?;
    Ok(Some(SettlerThread {
        status,
        stopped: stopped_rx,
    }))
}

/// The in-process settler: its status, and what completes once it has stopped.
struct SettlerThread {
    status: Arc<std::sync::Mutex<SettlerStatus>>,
    stopped: tokio::sync::oneshot::Receiver<()>,
}

/// `tollgate settle`: a settler alone, with /healthz, /readyz and /metrics.
pub async fn run_settler(
    config: Config,
    ledger: Arc<Ledger>,
    http_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let hangups = listen_for_hangups();
    let store = store_from_config(&config)?;
    // The shard count first (see `run`): a settler of another count would leave the
    // outboxes of the shards past it unsettled. Bounded as in `run`: a store that hangs
    // (another process holds the migration lock) must not keep /healthz from answering
    // (the liveness probe would kill the pod in a loop); unchecked by then, the settler
    // waits for it before settling.
    let deadline = tokio::time::Instant::now() + STORE_STARTUP_WAIT;
    let count_verified = shard_count_until(&ledger, &store, deadline, "nothing is settled").await?;
    let (count_refused_tx, count_refused) = tokio::sync::oneshot::channel::<ShardCountError>();
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopping = stop_rx.clone();
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let tasks = Tasks::default();
    let settler = Settler::new(ledger.clone(), store.clone(), config.settler_settings());
    let status = settler.status();
    let settling = {
        let (ledger, store) = (ledger.clone(), store.clone());
        let (stop, stopped, refused_stop) = (stopped(), stopped(), stopped());
        async move {
            // Redis or the store did not answer at start: nothing is settled before the
            // count is known to be the deployment's.
            if !count_verified {
                if let Err(err) = verify_shard_count(&ledger, &store, stop).await {
                    let _ = count_refused_tx.send(err);
                    // Ends with the process (not reported as a task that ended early).
                    refused_stop.await;
                    return;
                }
            }
            settler.run(stopped).await
        }
    };
    let task = tasks.spawn("settler", settling, stopping.clone());
    tasks.spawn(
        "reloader",
        reload_on_sighup(None, config.clone(), hangups, stopped()),
        stopping.clone(),
    );
    let dispatcher = spawn_dispatcher(&config, &store, stopped())
        .map(|d| tasks.supervise("webhooks", joined(d), stopping.clone()));
    let state = HttpState {
        ledger,
        settlement: Settlement {
            settler: Some(status),
            webhooks: dispatcher.is_some(),
            ready_lag_max_ms: config.settler.ready_lag_max_ms,
            tasks,
        },
        metrics: telemetry::metrics::install(),
        serving: false,
        last_checks: LastChecks::default(),
        // No delay here: nothing but probes and scrapes reaches a settler's port.
        shutting_down: watch::channel(false).1,
    };
    // `tollgate_ready` is what the chart's not-ready alert and dashboard read, for
    // settler pods as for serving ones.
    let watcher = tokio::spawn(not_serving_after_a_panic(
        tokio::spawn(watch_health(state.clone(), None, stopped())),
        None,
        state.last_checks.clone(),
    ));
    let http = transport::serve_http(
        http_listener,
        http_router(state)
            .fallback(no_route)
            .method_not_allowed_fallback(method_not_allowed)
            .layer(RequestLogLayer::http()),
        config.server.http_limits(),
        stopped(),
    );
    let refused = Arc::new(std::sync::Mutex::new(None::<ShardCountError>));
    tokio::spawn({
        let refused = refused.clone();
        async move {
            tokio::select! {
                _ = shutdown => {}
                Ok(err) = count_refused => {
                    tracing::error!(error = %err, "another shard count than the deployment's: stopping");
                    *refused.lock().unwrap_or_else(|e| e.into_inner()) = Some(err);
                }
            }
            let _ = stop_tx.send(true);
        }
    });
    let http = drained(http, stopped()).await;
    let mut tasks = vec![task, watcher];
    tasks.extend(dispatcher);
    join_until(tokio::time::Instant::now() + SHUTDOWN_GRACE, tasks).await;
    if let Some(err) = refused.lock().unwrap_or_else(|e| e.into_inner()).take() {
        return Err(err.into());
    }
    if let Some(http) = http {
        http?;
    }
    Ok(())
}

/// Serves until `shutdown` resolves, then drains.
pub async fn run(
    config: Config,
    ledger: Arc<Ledger>,
    grpc_listener: TcpListener,
    http_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let hangups = listen_for_hangups();
    if config.auth.admin_token.is_empty() || config.auth.service_token.is_empty() {
        return Err(ServeError::MissingTokens);
    }
    let store = store_from_config(&config)?;
    // Before anything registers a metric series.
    let metrics_handle = telemetry::metrics::install();
    for result in ["ok", "error"] {
        metrics::counter!(telemetry::metrics::CONFIG_RELOADS_TOTAL, "result" => result)
            .increment(0);
    }
    let gateway = Arc::new(Gateway::new(&config, ledger.clone()));
    tracing::info!(
        routes = config.pricebook.routes_len(),
        reloadable_on_sighup = config.source.is_some(),
        "price book loaded"
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopping = stop_rx.clone();
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    // Set at the stop signal, `server.shutdown_delay_ms` before `stop_tx`.
    let (shutting_down_tx, shutting_down_rx) = watch::channel(false);
    // Both bounded together by STORE_STARTUP_WAIT: a store that hangs (a lock, a stalled
    // server) must not keep the hot path, which never needs it, from serving. Each runs
    // as a task of its own, which goes on past the wait: a migration cut short would be
    // rolled back, its work (an index over every event) started again by the settler.
    let store_wait = tokio::time::Instant::now() + STORE_STARTUP_WAIT;
    // The Admin API writes API keys to the store: have its schema ready when it answers.
    let migration = tokio::spawn({
        let store = store.clone();
        async move { store.migrate().await }
    });
    match tokio::time::timeout_at(store_wait, migration).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(err))) => {
            tracing::warn!(error = %err, "store not migrated yet (the settler retries)");
        }
        Ok(Err(err)) => tracing::error!(error = %err, "the store's migration task failed"),
        Err(_) => tracing::warn!(
            wait_ms = STORE_STARTUP_WAIT.as_millis() as u64,
            "the store has not answered its migration yet: serving meanwhile (the migration \
             goes on, and the settler's)"
        ),
    }
    // The shard count before anything is marked or served: another count than the
    // deployment's is refused here, or (Redis or the store unreachable now, or not
    // answering within the same wait) once they answer, by the initializer below, which
    // then stops the process.
    let count_verified = shard_count_until(
        &ledger,
        &store,
        store_wait,
        "serving meanwhile, no shard marked new",
    )
    .await?;
    let (count_refused_tx, count_refused) = tokio::sync::oneshot::channel::<ShardCountError>();
    // First look before serving (a fresh deployment is ready at once), then keep looking:
    // Redis may come up later, or lose its data while we run.
    if count_verified {
        let first_look = tokio::spawn({
            let ledger = ledger.clone();
            let store = store.clone();
            async move { initialize_new_shards(&ledger, &store).await }
        });
        if tokio::time::timeout_at(store_wait, first_look)
            .await
            .is_err()
        {
            tracing::warn!(
                "the store has not answered the new-shard check yet: serving meanwhile, not ready \
                 until a shard Redis does not have is initialized (looked at every second)"
            );
        }
    }
    // In the background, not before serving: FUNCTION LOAD and SCRIPT LOAD are writes,
    // which a Redis pausing writes (`CLIENT PAUSE WRITE`, as a failover does) holds for
    // up to ten call deadlines each, while checks would wait unanswered in the listeners'
    // backlog past `gateway.check_timeout_ms`. Nothing needs them first: a call that
    // misses a script loads it, and readiness loads a missing library. After the
    // start-up reads above: a held load holds the reads behind it on its connection.
    tokio::spawn({
        let ledger = ledger.clone();
        let keys = gateway.keys().clone();
        async move {
            let loaded = match ledger.load_scripts().await {
                Ok(()) => keys.load_scripts().await,
                Err(err) => Err(err),
            };
            if let Err(err) = loaded {
                // Not fatal: tollgate reports not-ready and loads the library when a call
                // misses it.
                tracing::warn!(error = %err, "could not load scripts into redis yet");
            }
        }
    });
    // The background tasks readiness reports when one ends before shutdown.
    let tasks = Tasks::default();
    if config.server.restore {
        // Its own Redis connections: a restore's pipelines (thousands of commands) must
        // not queue the checks behind them on the shared ones.
        let restorer = ledger_from_config(&config, Clock::Redis)?;
        tasks.spawn(
            "restorer",
            keep_restoring(restorer, store.clone(), stopped()),
            stopping.clone(),
        );
    }
    let initializer = {
        let ledger = ledger.clone();
        let store = store.clone();
        // One each: the verification returns on shutdown having completed its own, and
        // the loop polled that completed future again (a panic, "`async fn` resumed after
        // completion", on every shutdown of a pod whose store had not answered yet).
        let (verify_stop, stop) = (stopped(), stopped());
        let initializing = async move {
            let mut stop = std::pin::pin!(stop);
            if !count_verified {
                if let Err(err) = verify_shard_count(&ledger, &store, verify_stop).await {
                    let _ = count_refused_tx.send(err);
                    // The process stops for it: not reported as a task that ended early.
                    stop.await;
                    return;
                }
            }
            loop {
                tokio::select! {
                    _ = &mut stop => return,
                    _ = tokio::time::sleep(INITIALIZE_RETRY) => {
                        initialize_new_shards(&ledger, &store).await;
                    }
                }
            }
        };
        tasks.spawn("shard_initializer", initializing, stopping.clone())
    };

    // Each with the previous token too, while a rotation rolls out (empty ones are
    // dropped: they never pass).
    let admin_check = TokenCheck::new(config.auth.admin_tokens()).refusing(
        config.auth.service_tokens(),
        "the service token may not call Admin: it needs the admin token",
    );
    let service_check = TokenCheck::new(
        config
            .auth
            .service_tokens()
            .into_iter()
            .chain(config.auth.admin_tokens()),
    );
    let service_check_http = service_check.clone();
    // Settlements from the access log that met a transient ledger error are retried by
    // a task of their own, off the streams (gateway::access_log::retry).
    let (settle_retries, settle_retrier) = access_log::retry::queue(gateway.clone());
    let access_log = AccessLog::new(
        gateway.clone(),
        service_check.clone(),
        grpc_listener
            .local_addr()
            .is_ok_and(|a| a.ip().is_loopback()),
        settle_retries,
    )
    // Envoy's stream stays open as long as Envoy runs: it ends on shutdown instead.
    .stopping(stopping.clone());
    let access_log_tasks = access_log.tasks();
    let (health, health_service) = not_serving_health_reporter().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::api::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    // grpcurl and older clients still ask v1alpha.
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::api::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    // Bounds: transport.rs and docs/ARCHITECTURE.md ("Listener limits"). Metering and
    // Admin check their token before reading a message; unary services get a deadline,
    // the streams (access log, health Watch, reflection) none.
    let grpc = transport::grpc_server()
        .layer(RequestLogLayer::grpc())
        .add_service(InterceptedService::new(
            Deadline::new(
                MeteringServer::new(MeteringService::new(ledger.clone(), store.clone()))
                    .max_decoding_message_size(transport::API_MESSAGE_BYTES_MAX),
                transport::GRPC_UNARY_TIMEOUT,
            ),
            service_check,
        ))
        .add_service(InterceptedService::new(
            Deadline::new(
                AdminServer::new(
                    AdminService::new(ledger.clone(), gateway.keys().clone())
                        .with_store(store.clone(), config.webhooks.rules()),
                )
                .max_decoding_message_size(transport::API_MESSAGE_BYTES_MAX),
                transport::GRPC_UNARY_TIMEOUT,
            ),
            admin_check,
        ))
        // Envoy authenticates by the optional gateway shared secret, checked inside; the
        // access log (it settles holds) also by the service token (access_log.rs).
        .add_service(Deadline::new(
            AuthorizationServer::new(ExtAuthz::new(gateway.clone()))
                .max_decoding_message_size(config.server.grpc_check_message_bytes_max),
            transport::GRPC_UNARY_TIMEOUT,
        ))
        .add_service(
            AccessLogServiceServer::new(access_log)
                .max_decoding_message_size(transport::ACCESS_LOG_MESSAGE_BYTES_MAX),
        )
        .add_service(health_service.max_decoding_message_size(transport::PROBE_MESSAGE_BYTES_MAX))
        .add_service(reflection.max_decoding_message_size(transport::PROBE_MESSAGE_BYTES_MAX))
        .add_service(
            reflection_v1alpha.max_decoding_message_size(transport::PROBE_MESSAGE_BYTES_MAX),
        )
        .serve_with_incoming_shutdown(
            transport::grpc_incoming(grpc_listener, config.server.grpc_connections_max),
            stopped(),
        );

    let settler = spawn_settler(&config, stopped())?;
    let settler_status = settler.as_ref().map(|s| s.status.clone());
    let settler_task = settler.map(|s| {
        // The thread drops `stopped`'s sender unsent when the settler panics.
        let ended = async move {
            s.stopped
                .await
                .map_err(|_| "panicked (its thread ended)".to_owned())
        };
        tasks.supervise("settler", ended, stopping.clone())
    });
    let dispatcher = if config.settler.enabled {
        spawn_dispatcher(&config, &store, stopped())
            .map(|d| tasks.supervise("webhooks", joined(d), stopping.clone()))
    } else {
        None
    };
    let state = HttpState {
        ledger: ledger.clone(),
        settlement: Settlement {
            settler: settler_status,
            webhooks: dispatcher.is_some(),
            ready_lag_max_ms: config.settler.ready_lag_max_ms,
            tasks: tasks.clone(),
        },
        metrics: metrics_handle,
        serving: true,
        last_checks: LastChecks::default(),
        shutting_down: shutting_down_rx.clone(),
    };
    // Reports NOT_SERVING from the signal on, through the shutdown delay.
    let shutting_down = {
        let mut rx = shutting_down_rx;
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let watcher = tokio::spawn(not_serving_after_a_panic(
        tokio::spawn(watch_health(
            state.clone(),
            Some(health.clone()),
            shutting_down,
        )),
        Some(health),
        state.last_checks.clone(),
    ));
    let http = http_router(state)
        .merge(forward_auth::router(gateway.clone(), service_check_http))
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(RequestLogLayer::http());
    let http = transport::serve_http(http_listener, http, config.server.http_limits(), stopped());

    tasks.spawn(
        "reloader",
        reload_on_sighup(Some(gateway.clone()), config.clone(), hangups, stopped()),
        stopping.clone(),
    );

    let sweep_interval = Duration::from_millis(config.ledger.sweep_interval_ms);
    let sweeper = tasks.spawn(
        "sweeper",
        sweeper::run(ledger.clone(), sweep_interval, stopped()),
        stopping.clone(),
    );
    let replayer = tasks.spawn(
        "spool_replayer",
        replay_spool(gateway.clone(), stopped()),
        stopping.clone(),
    );
    let settle_retrier = tasks.spawn(
        "access_log_retrier",
        settle_retrier.run(stopped()),
        stopping.clone(),
    );

    let refused = Arc::new(std::sync::Mutex::new(None::<ShardCountError>));
    let shutdown_delay = Duration::from_millis(config.server.shutdown_delay_ms);
    tokio::spawn({
        let refused = refused.clone();
        async move {
            let mut count_refused = std::pin::pin!(count_refused);
            let refuse = |err: ShardCountError| {
                tracing::error!(error = %err, "another shard count than the deployment's: stopping");
                *refused.lock().unwrap_or_else(|e| e.into_inner()) = Some(err);
            };
            tokio::select! {
                _ = shutdown => {
                    if shutdown_delay.is_zero() {
                        tracing::info!("shutting down");
                    } else {
                        let again = another_stop_signal();
                        let _ = shutting_down_tx.send(true);
                        tracing::info!(
                            delay_ms = shutdown_delay.as_millis() as u64,
                            "shutting down: not ready, serving on for server.shutdown_delay_ms \
                             while load balancers take this pod out, then draining"
                        );
                        tokio::select! {
                            () = tokio::time::sleep(shutdown_delay) => {}
                            () = again => {
                                tracing::info!("a second stop signal: draining now");
                            }
                            // Still an error exit, not a clean one, when it comes meanwhile.
                            Ok(err) = &mut count_refused => refuse(err),
                        }
                    }
                }
                Ok(err) = &mut count_refused => refuse(err),
            }
            let _ = shutting_down_tx.send(true);
            let _ = stop_tx.send(true);
        }
    });

    let servers = drained(async { tokio::join!(grpc, http) }, stopped()).await;
    // Checks have drained (or the grace ran out): what fail_open spooled reaches the disk
    // before the process ends, and the tasks stop, within one more grace together.
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    if !gateway.flush_spool(SHUTDOWN_GRACE).await {
        tracing::error!("the fail_open spool was not flushed: queued charges are lost");
    }
    // The retrier ends within its own grace (access_log::retry::RETRY_SHUTDOWN_GRACE),
    // well before this deadline.
    // A stream's task whose connection went away may still be settling the entries it
    // received (access_log.rs): the process does not exit under it.
    let access_logs = tokio::spawn(access_log_tasks.ended());
    let mut tasks = vec![
        sweeper,
        replayer,
        initializer,
        watcher,
        settle_retrier,
        access_logs,
    ];
    tasks.extend(settler_task);
    tasks.extend(dispatcher);
    join_until(deadline, tasks).await;
    if let Some(err) = refused.lock().unwrap_or_else(|e| e.into_inner()).take() {
        return Err(err.into());
    }
    if let Some((grpc, http)) = servers {
        grpc?;
        http?;
    }
    Ok(())
}

/// Waits for the listeners' graceful drain (`servers`), at most [`SHUTDOWN_GRACE`] once
/// `stopped` has completed; `None` when the grace ran out, and what is still open is cut
/// when the process exits.
///
/// A graceful drain waits for every connection to close, and a stream open on one ends
/// only when its client ends it (GOAWAY does not): an Envoy that outlived the pod kept
/// its access-log stream open, and tollgate waited until SIGKILL, so the fail_open spool
/// was never flushed nor the settler and dispatcher joined. The access-log handler ends
/// its streams itself on shutdown; this bounds the rest (a gRPC health `Watch`, a
/// client's own stream, a slow request).
async fn drained<T>(
    servers: impl std::future::IntoFuture<Output = T>,
    stopped: impl Future<Output = ()>,
) -> Option<T> {
    let grace = async {
        stopped.await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        biased;
        done = servers.into_future() => Some(done),
        () = grace => {
            tracing::warn!(
                grace_ms = SHUTDOWN_GRACE.as_millis() as u64,
                "connections still open after the shutdown grace: closing them"
            );
            None
        }
    }
}

/// Joins background tasks that end at the stop signal, giving up on them at `deadline`.
async fn join_until(deadline: tokio::time::Instant, tasks: Vec<tokio::task::JoinHandle<()>>) {
    let all = async {
        for task in tasks {
            let _ = task.await;
        }
    };
    if tokio::time::timeout_at(deadline, all).await.is_err() {
        tracing::warn!("background tasks still running after the shutdown grace: leaving them");
    }
    // The health watcher, which reports what throttled sites left out, has stopped: what
    // they left out since (an outage during the shutdown delay) is reported now.
    telemetry::throttle::log_all_suppressed();
}

/// How often the fail-open spool is looked at (two `stat`s when it is empty).
const SPOOL_REPLAY_INTERVAL: Duration = Duration::from_secs(1);

/// Applies the fail_open charges spooled while Redis was unavailable, a round per
/// interval: from the start (what a previous process left) and after every outage.
async fn replay_spool(gateway: Arc<Gateway>, stopped: impl Future<Output = ()>) {
    tokio::pin!(stopped);
    let mut tick = tokio::time::interval(SPOOL_REPLAY_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut more = false;
    loop {
        if more {
            // A full chunk went through: the next one right away.
            tokio::select! {
                _ = &mut stopped => return,
                _ = tokio::task::yield_now() => {}
            }
        } else {
            tokio::select! {
                _ = &mut stopped => return,
                _ = tick.tick() => {}
            }
        }
        more = match gateway.replay_spool().await {
            Ok((0, more)) => more,
            Ok((charges, more)) => {
                tracing::info!(charges, "applied spooled fail_open charges");
                more
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the fail_open spool");
                false
            }
        };
    }
}

/// A SIGTERM or SIGINT after the one that began the shutdown: it ends the shutdown delay.
/// Listened for from this call on, which comes before readiness turns: a signal sent
/// once `/readyz` says `shutdown` is seen. Never completes where signals cannot be
/// listened for.
fn another_stop_signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    let listening = {
        use tokio::signal::unix::{signal, SignalKind};
        (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        )
    };
    async move {
        #[cfg(unix)]
        if let (Ok(mut term), Ok(mut int)) = listening {
            tokio::select! {
                _ = term.recv() => return,
                _ = int.recv() => return,
            }
        }
        std::future::pending::<()>().await
    }
}

/// SIGHUP, listened for from the first line of `run` and `run_settler`: one that arrives
/// while they start (loading scripts, migrating the store) waits for the reloader instead
/// of being lost.
#[cfg(unix)]
type Hangups = std::io::Result<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangups = ();

fn listen_for_hangups() -> Hangups {
    #[cfg(unix)]
    {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
    }
}

/// Re-reads the config file on every SIGHUP, as at start-up (the environment and the
/// command-line settings applied again, every section checked), and swaps in its price
/// book. A bad file is reported (every error with its path) and the current price book
/// stays; checks in flight finish with the book they started with, so no request is
/// dropped. Other settings take effect on a restart (a reload that changes them says so).
/// Without a config file (or a gateway: `tollgate settle`) a SIGHUP is logged and ignored
/// rather than ending the process.
async fn reload_on_sighup(
    gateway: Option<Arc<Gateway>>,
    config: Config,
    hangups: Hangups,
    stopped: impl Future<Output = ()>,
) {
    // Registered (at 0) as soon as reloads are possible, so dashboards see the series.
    let reloads_ok = metrics::counter!(telemetry::metrics::CONFIG_RELOADS_TOTAL, "result" => "ok");
    let reloads_failed =
        metrics::counter!(telemetry::metrics::CONFIG_RELOADS_TOTAL, "result" => "error");
    #[cfg(unix)]
    {
        let mut hangups = match hangups {
            Ok(s) => s,
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGHUP: no price book reloads");
                // Not a task that ended early (supervised): it ends with the process.
                stopped.await;
                return;
            }
        };
        tokio::pin!(stopped);
        // What the file said at start-up, to tell whether a reload changes settings it
        // does not apply (the running config may differ from the file: `--dev` fills in
        // its own Redis, store and tokens).
        let at_start = gateway
            .as_ref()
            .and_then(|_| crate::config::env_vars().ok())
            .and_then(|env| config.reread(env).ok());
        loop {
            tokio::select! {
                _ = &mut stopped => return,
                got = hangups.recv() => {
                    if got.is_none() {
                        tracing::warn!("the SIGHUP stream ended: no price book reloads");
                        (&mut stopped).await;
                        return;
                    }
                    let (Some(gateway), Some(path)) = (&gateway, &config.source) else {
                        tracing::info!("SIGHUP: no config file or price book here, nothing to reload");
                        continue;
                    };
                    match crate::config::env_vars().and_then(|env| config.reread(env)) {
                        Ok(new) => {
                            reloads_ok.increment(1);
                            let before = gateway.pricebook().routes_len();
                            let routes = new.pricebook.routes_len();
                            let changed = at_start
                                .as_ref()
                                .map(|s| s.sections_changed_beyond_pricebook(&new))
                                .unwrap_or_default();
                            if !changed.is_empty() {
                                tracing::warn!(
                                    path = %path.display(),
                                    sections = %changed.join(","),
                                    "settings outside [pricebook] changed in the file: they take effect on a restart"
                                );
                            }
                            gateway.set_pricebook(new.pricebook);
                            tracing::info!(path = %path.display(), routes_before = before, routes, "price book reloaded");
                        }
                        Err(errors) => {
                            reloads_failed.increment(1);
                            tracing::error!(
                                path = %path.display(),
                                "price book not reloaded, keeping the current one: {errors}"
                            )
                        }
                    }
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (gateway, config, hangups);
        stopped.await;
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// What the readiness checks found.
struct Readiness {
    ready: bool,
    failed: Vec<&'static str>,
    /// Checks that failed without making the process unready.
    degraded: Vec<&'static str>,
    checks: serde_json::Map<String, serde_json::Value>,
}

/// How old the health watcher's last checks may be before `/readyz` stops vouching for
/// them (five of its rounds): a watcher that stopped (a panic) must not leave a pod ready.
pub const READINESS_STALE_AFTER: Duration = Duration::from_secs(10);

/// The readiness checks that ask Redis, with when they ran.
#[derive(Clone)]
struct LedgerChecks {
    at: tokio::time::Instant,
    /// Whether Redis answered (`tollgate_redis_up`).
    redis_up: bool,
    failed: Vec<&'static str>,
    degraded: Vec<&'static str>,
    checks: serde_json::Map<String, serde_json::Value>,
}

impl LedgerChecks {
    /// No checks to answer from: `readiness` failed, saying `why`.
    fn readiness_failed(why: &str) -> Self {
        let mut checks = serde_json::Map::new();
        checks.insert("readiness".into(), why.into());
        Self {
            at: tokio::time::Instant::now(),
            redis_up: false,
            failed: vec!["readiness"],
            degraded: Vec::new(),
            checks,
        }
    }
}

/// The health watcher's latest [`LedgerChecks`], which `/readyz` answers from: a probe
/// costs Redis nothing (it used to cost an `EXISTS` per shard and a `FUNCTION LIST`, for
/// anyone who asked, as often as they asked).
#[derive(Clone)]
struct LastChecks {
    latest: Arc<watch::Sender<Option<LedgerChecks>>>,
    /// When the watcher's round in progress began (None between rounds).
    round_started: Arc<std::sync::Mutex<Option<tokio::time::Instant>>>,
    /// The watcher ended before shutdown (a panic: [`not_serving_after_a_panic`]).
    watcher_ended: Arc<std::sync::atomic::AtomicBool>,
}

impl Default for LastChecks {
    fn default() -> Self {
        Self {
            latest: Arc::new(watch::Sender::new(None)),
            round_started: Arc::default(),
            watcher_ended: Arc::default(),
        }
    }
}

impl LastChecks {
    fn round_starts(&self) {
        if let Ok(mut started) = self.round_started.lock() {
            *started = Some(tokio::time::Instant::now());
        }
    }

    fn store(&self, checks: LedgerChecks) {
        self.latest.send_replace(Some(checks));
        if let Ok(mut started) = self.round_started.lock() {
            *started = None;
        }
    }

    fn watcher_ended(&self) {
        self.watcher_ended
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The latest checks; until the watcher's first round is done (at start-up), waits
    /// for it. A watcher that ended, checks older than [`READINESS_STALE_AFTER`] with no
    /// round running, or none by then, are a failed `readiness` check. Checks that old
    /// with a round running are a Redis that has not answered the round for that long
    /// (each of its calls may wait ten call deadlines): `redis` then fails, or for
    /// `serving` only degrades, as when Redis is unreachable, instead of failing every
    /// pod on it at once as a stopped watcher.
    async fn latest(&self, serving: bool) -> LedgerChecks {
        if self
            .watcher_ended
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return LedgerChecks::readiness_failed(
                "the health watcher has stopped (a bug: see the log)",
            );
        }
        let mut latest = self.latest.subscribe();
        let found = tokio::time::timeout(READINESS_STALE_AFTER, latest.wait_for(Option::is_some))
            .await
            .ok()
            .and_then(|found| found.ok().and_then(|checks| checks.clone()));
        let Some(mut checks) = found else {
            return LedgerChecks::readiness_failed("not checked yet");
        };
        let age = checks.at.elapsed();
        let running = self
            .round_started
            .lock()
            .ok()
            .and_then(|started| *started)
            .filter(|started| *started >= checks.at);
        if let (true, Some(started)) = (age > READINESS_STALE_AFTER, running) {
            checks.redis_up = false;
            checks.checks.insert(
                "redis".into(),
                format!(
                    "no answer for {} ms: the health checks wait on Redis",
                    started.elapsed().as_millis()
                )
                .into(),
            );
            let list = if serving {
                &mut checks.degraded
            } else {
                &mut checks.failed
            };
            if !list.contains(&"redis") {
                list.push("redis");
            }
        } else if age > READINESS_STALE_AFTER {
            checks.failed.push("readiness");
            checks.checks.insert(
                "readiness".into(),
                format!(
                    "these checks are {} ms old: the health watcher has stopped",
                    age.as_millis()
                )
                .into(),
            );
        }
        checks
    }
}

/// The checks that ask Redis: it answers within the deadline, every shard is initialized,
/// and (`serve`) Redis holds the ledger's function library, loaded here when missing:
/// after a Redis restart nothing else would, since a not-ready pod gets no traffic.
///
/// A Redis that cannot be reached (or does not answer in time) fails `tollgate settle`,
/// which has nothing else to do, but only degrades `serve`: checks then follow each
/// operation's fail policy (DESIGN.md), and free and `fail_open` routes keep working only
/// if the pod stays in its load balancer. With every pod sharing one Redis, failing
/// readiness on it would take every pod out at once (in sidecar mode, the API with it).
/// `tollgate_redis_up` and its alert say Redis is gone instead. A Redis that answers but
/// lost its data (a shard awaits restore), or that will not take the library, fails both:
/// this pod can serve nothing priced from it, and another pod may well be fine.
async fn ledger_checks(state: &HttpState) -> LedgerChecks {
    let mut checks = serde_json::Map::new();
    let mut failed = Vec::new();
    let mut degraded = Vec::new();
    let redis_up = match state.ledger.initialized_shards().await {
        Ok(shards) => {
            // Reads alone pass on a Redis that refuses every write (OOM, READONLY,
            // MISCONF, NOREPLICAS): every charge fails there, as when it is unreachable.
            let writes = match state.ledger.take_write().await {
                Ok(()) => None,
                Err(err @ LedgerError::Unavailable(_)) => Some(err),
                // Another refusal (an ACL without SET on the key, say) says nothing
                // about the ledger's own calls: not held against readiness.
                Err(err) => {
                    tracing::debug!(error = %err, "the health watcher's write was refused");
                    None
                }
            };
            match &writes {
                None => {
                    checks.insert("redis".into(), "ok".into());
                }
                Some(err) => {
                    checks.insert("redis".into(), format!("refuses writes: {err}").into());
                    if state.serving {
                        degraded.push("redis");
                    } else {
                        failed.push("redis");
                    }
                }
            }
            let missing = shards.iter().filter(|ok| !**ok).count();
            if missing == 0 {
                checks.insert("ledger".into(), "ok".into());
            } else {
                checks.insert(
                    "ledger".into(),
                    format!("{missing} shard(s) not initialized: Redis lost its data; run tollgate restore").into(),
                );
                failed.push("ledger");
            }
            writes.is_none()
        }
        Err(err @ LedgerError::Unavailable(_)) => {
            checks.insert("redis".into(), err.to_string().into());
            if state.serving {
                degraded.push("redis");
            } else {
                failed.push("redis");
            }
            false
        }
        // It answered, with something the ledger does not understand.
        Err(err) => {
            checks.insert("redis".into(), err.to_string().into());
            failed.push("redis");
            false
        }
    };
    if state.serving {
        if !redis_up {
            checks.insert("scripts".into(), "unknown: redis unreachable".into());
            if failed.contains(&"redis") {
                failed.push("scripts");
            } else {
                degraded.push("scripts");
            }
        } else {
            match state.ledger.check_scripts(true).await {
                Ok((loaded, total)) if loaded == total => {
                    checks.insert("scripts".into(), "ok".into());
                }
                Ok((loaded, total)) => {
                    checks.insert(
                        "scripts".into(),
                        format!("{loaded} of {total} loaded").into(),
                    );
                    failed.push("scripts");
                }
                // Gone since the look above, or too slow to answer: as when unreachable.
                Err(err @ LedgerError::Unavailable(_)) => {
                    checks.insert("scripts".into(), err.to_string().into());
                    degraded.push("scripts");
                }
                // Redis refused the library (a script error, out of memory, …).
                Err(err) => {
                    checks.insert("scripts".into(), err.to_string().into());
                    failed.push("scripts");
                }
            }
            match state.ledger.lua_numbers_intact().await {
                Ok(true) => {
                    checks.insert("lua_numbers".into(), "ok".into());
                }
                Ok(false) => {
                    checks.insert(
                        "lua_numbers".into(),
                        "this Redis hands whole numbers from scripts to commands in exponent \
                         form (100000000 as 1e+08: Redis 7.2.0 to 7.2.4, redis/redis#13113); \
                         balances and events would be corrupted: upgrade Redis (7.2.5 or later)"
                            .into(),
                    );
                    failed.push("lua_numbers");
                }
                // Not known (an ACL without EVAL, Redis gone since): nothing held against
                // readiness for it.
                Err(err) => {
                    checks.insert("lua_numbers".into(), format!("unknown: {err}").into());
                }
            }
        }
    }
    LedgerChecks {
        at: tokio::time::Instant::now(),
        redis_up,
        failed,
        degraded,
        checks,
    }
}

/// Ready when the [`ledger_checks`] pass (a serving pod's unreachable Redis only degrades
/// it) and, with a settler in this process, settlement
/// lags less than `settler.ready_lag_max_ms`, the settler measured the outboxes within
/// that time, and neither it nor the webhook dispatcher has ended. A store error, the lag
/// or a stuck settler fails `tollgate settle`; a process serving charges is only
/// `degraded` by them: charges never wait for the store, so a database blip must not take
/// every gateway pod out of traffic (the lag threshold is the operator's bound on how long
/// that may last). A settler or dispatcher that ended fails both
/// ([`Settlement::check`]). The settlement checks read this process's memory only, and
/// are computed now.
fn readiness(state: &HttpState, ledger: LedgerChecks) -> Readiness {
    let mut readiness = Readiness {
        ready: false,
        failed: ledger.failed,
        degraded: ledger.degraded,
        checks: ledger.checks,
    };
    state.settlement.check(
        state.serving,
        crate::ledger::wall_clock_ms(),
        &mut readiness,
    );
    if *state.shutting_down.borrow() {
        // Before the listeners close (`server.shutdown_delay_ms`): load balancers that
        // probe take the pod out while it still answers.
        readiness.failed.push("shutdown");
        readiness
            .checks
            .insert("shutdown".into(), "shutting down: draining".into());
    }
    readiness.ready = readiness.failed.is_empty();
    readiness
}

impl Settlement {
    /// The readiness checks about settlement at `now_ms`: the store, the outbox lag, the
    /// settler still measuring, and the settler and the dispatcher still running.
    ///
    /// The lag and the measurement's age are computed here, from the times the settler
    /// recorded: a settler that stopped measuring (its task died, a store query hangs)
    /// used to leave its last small age in place, so readiness stayed green and the lag
    /// gauge froze.
    fn check(&self, serving: bool, now_ms: i64, r: &mut Readiness) {
        // Like a store error, the lag and a stuck settler leave a serving pod ready
        // (docs/DESIGN.md: a store outage leaves the hot path unaffected; the outbox bound,
        // not readiness, decides when charges stop), or every pod would leave its load
        // balancer at once. `tollgate settle` only settles: they fail it.
        let soft = |r: &mut Readiness, name: &'static str| {
            if serving {
                r.degraded.push(name);
            } else {
                r.failed.push(name);
            }
        };
        if let Some(status) = &self.settler {
            let status = status.lock().map(|s| s.clone()).unwrap_or_default();
            match &status.store_error {
                None => {
                    r.checks.insert("store".into(), "ok".into());
                }
                Some(err) => {
                    r.checks.insert("store".into(), err.clone().into());
                    soft(r, "store");
                }
            }
            let lag_ms = status.lag_ms(now_ms);
            let measured_ago_ms = status.measured_ago_ms(now_ms);
            r.checks.insert(
                "outbox".into(),
                serde_json::json!({
                    "length": status.outbox_len(),
                    "oldest_unsettled_ms": lag_ms,
                    "max_ms": self.ready_lag_max_ms,
                    "measured_ms_ago": measured_ago_ms,
                }),
            );
            if lag_ms > self.ready_lag_max_ms {
                soft(r, "outbox_lag");
            }
            if let Some(how) = self.tasks.ended("settler") {
                r.checks.insert(
                    "settler".into(),
                    format!("the settler stopped ({how}): nothing settles in this process until it restarts").into(),
                );
                // Soft as well: one bug that ends every pod's settler must not take every
                // gateway pod out of its load balancer; the outbox bound decides.
                soft(r, "settler");
            } else if measured_ago_ms > self.ready_lag_max_ms {
                // Nothing vouches for the lag any more: events written since the last
                // measurement are not counted in it.
                r.checks.insert(
                    "settler".into(),
                    format!(
                        "stuck: no outbox measurement for {measured_ago_ms} ms (settler.ready_lag_max_ms \
                         is {}); a store or Redis call that does not return?",
                        self.ready_lag_max_ms
                    )
                    .into(),
                );
                soft(r, "settler");
            } else {
                r.checks.insert("settler".into(), "ok".into());
            }
        }
        if self.webhooks {
            if let Some(how) = self.tasks.ended("webhooks") {
                r.checks.insert(
                    "webhooks".into(),
                    format!("the webhook dispatcher stopped ({how}): no webhooks are sent from this process until it restarts").into(),
                );
                soft(r, "webhooks");
            } else {
                r.checks.insert("webhooks".into(), "ok".into());
            }
        }
        // The other tasks: each degrades either process (none is what it is for).
        for (name, stops) in BACKGROUND_TASKS {
            if let Some(how) = self.tasks.ended(name) {
                r.checks.insert(
                    name.into(),
                    format!("the {name} task stopped ({how}): {stops} until the process restarts")
                        .into(),
                );
                r.degraded.push(name);
            }
        }
    }

    /// Sets the settlement gauges that are ages from the settler's recorded times, as of
    /// `now_ms` (on every scrape: they keep moving when the settler stops measuring).
    fn set_age_gauges(&self, ledger: &Ledger, now_ms: i64) {
        let Some(status) = &self.settler else {
            return;
        };
        let status = status.lock().map(|s| s.clone()).unwrap_or_default();
        let shards = ledger.shards();
        for shard in 0..shards.count() {
            metrics::gauge!(
                telemetry::metrics::OUTBOX_OLDEST_AGE_SECONDS,
                "shard" => shards.number(shard).to_owned()
            )
            .set(status.shard_lag_ms(usize::from(shard), now_ms) as f64 / 1000.0);
        }
        metrics::gauge!(telemetry::metrics::SETTLER_MEASURED_AGE_SECONDS)
            .set(status.measured_ago_ms(now_ms) as f64 / 1000.0);
    }
}

/// The body says which check failed. The Redis checks are the health watcher's latest
/// (at most [`HEALTH_CHECK_INTERVAL`] old, plus a round's own time), the settlement
/// checks are computed now.
async fn readyz(State(state): State<HttpState>) -> (StatusCode, Json<serde_json::Value>) {
    let Readiness {
        ready,
        failed,
        degraded,
        checks,
    } = readiness(&state, state.last_checks.latest(state.serving).await);
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(serde_json::json!({
            "ready": ready,
            "failed": failed,
            "degraded": degraded,
            "checks": checks,
        })),
    )
}

/// Runs the readiness checks every [`HEALTH_CHECK_INTERVAL`] until `stopped`: keeps the
/// Redis ones for `/readyz`, and the gRPC health service (`serve`; `settle` has none) and
/// the `tollgate_ready` and `tollgate_redis_up` gauges in step; then reports NOT_SERVING and 0 while the server
/// drains.
async fn watch_health(
    state: HttpState,
    health: Option<HealthReporter>,
    stopped: impl Future<Output = ()>,
) {
    let ready_gauge = metrics::gauge!(telemetry::metrics::READY);
    let redis_up_gauge = metrics::gauge!(telemetry::metrics::REDIS_UP);
    let mut last: Option<bool> = None;
    let mut failing = FailingChecks::default();
    tokio::pin!(stopped);
    loop {
        state.last_checks.round_starts();
        let checks = ledger_checks(&state).await;
        redis_up_gauge.set(if checks.redis_up { 1.0 } else { 0.0 });
        state.last_checks.store(checks.clone());
        let readiness = readiness(&state, checks);
        failing.log_changes(&readiness, std::time::Instant::now());
        telemetry::throttle::log_suppressed();
        let ready = readiness.ready;
        if last != Some(ready) {
            let status = if ready {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            if let Some(health) = &health {
                for service in HEALTH_SERVICES {
                    health.set_service_status(service, status).await;
                }
            }
            ready_gauge.set(if ready { 1.0 } else { 0.0 });
            last = Some(ready);
        }
        tokio::select! {
            _ = &mut stopped => break,
            _ = tokio::time::sleep(HEALTH_CHECK_INTERVAL) => {}
        }
    }
    report_not_serving(health.as_ref()).await;
}

/// The gRPC health service, every service NOT_SERVING until the health watcher's first
/// round says otherwise (tonic-health starts the server-wide `""` at SERVING: a pod
/// whose Redis lost its data or does not answer looked ready for that whole round).
async fn not_serving_health_reporter() -> (
    HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) {
    let (health, service) = tonic_health::server::health_reporter();
    for name in HEALTH_SERVICES {
        health
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }
    (health, service)
}

/// gRPC health NOT_SERVING for every service, and `tollgate_ready` 0.
async fn report_not_serving(health: Option<&HealthReporter>) {
    if let Some(health) = health {
        for service in HEALTH_SERVICES {
            health
                .set_service_status(service, ServingStatus::NotServing)
                .await;
        }
    }
    metrics::gauge!(telemetry::metrics::READY).set(0.0);
}

/// Waits for the health watcher; should it panic, reports NOT_SERVING as its own end does.
/// `/readyz` stops vouching for checks the watcher has not renewed
/// ([`READINESS_STALE_AFTER`]), but only the watcher moves gRPC health and
/// `tollgate_ready`: a panic left them at SERVING and 1 while `/readyz` answered 503.
async fn not_serving_after_a_panic(
    watcher: tokio::task::JoinHandle<()>,
    health: Option<HealthReporter>,
    last_checks: LastChecks,
) {
    if let Err(how) = joined(watcher).await {
        last_checks.watcher_ended();
        tracing::error!(
            how = %how,
            "the health watcher ended: gRPC health and tollgate_ready report not ready \
             until the process is restarted"
        );
        report_not_serving(health.as_ref()).await;
    }
}

/// The readiness checks failing as of the health watcher's last round, with since when.
/// Each check that starts failing is logged once at WARN (what it says, and whether it
/// fails readiness or only degrades it), and once at INFO when it passes again (how long
/// it failed): an outage of Redis or the store is two lines, however many requests fail
/// in between (their own lines are throttled, [`telemetry::throttle`]).
#[derive(Default)]
struct FailingChecks(std::collections::HashMap<&'static str, std::time::Instant>);

impl FailingChecks {
    fn log_changes(&mut self, r: &Readiness, now: std::time::Instant) {
        for (names, effect) in [(&r.failed, "failed"), (&r.degraded, "degraded")] {
            for &check in names {
                if self.0.contains_key(check) {
                    continue;
                }
                self.0.insert(check, now);
                let detail = check_detail(&r.checks, check);
                tracing::warn!(
                    check,
                    effect,
                    ready = r.ready,
                    detail = %detail,
                    "health check failing"
                );
            }
        }
        self.0.retain(|&check, since| {
            let still = r.failed.contains(&check) || r.degraded.contains(&check);
            if !still {
                let failed_for_ms = now.saturating_duration_since(*since).as_millis() as u64;
                tracing::info!(check, failed_for_ms, "health check passes again");
            }
            still
        });
    }
}

/// What `/readyz` says about a failing check (the lag check's numbers are under `outbox`).
fn check_detail(checks: &serde_json::Map<String, serde_json::Value>, check: &str) -> String {
    let key = if check == "outbox_lag" {
        "outbox"
    } else {
        check
    };
    match checks.get(key) {
        Some(serde_json::Value::String(text)) => text.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

async fn metrics_text(State(state): State<HttpState>) -> (StatusCode, String) {
    match &state.metrics {
        Some(handle) => {
            state
                .settlement
                .set_age_gauges(&state.ledger, crate::ledger::wall_clock_ms());
            (StatusCode::OK, handle.render())
        }
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder not installed\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settle::settler::OutboxMeasure;

    /// Before the watcher's first round, gRPC health says NOT_SERVING, the server-wide
    /// `""` included (tonic-health starts it at SERVING).
    #[tokio::test]
    async fn grpc_health_starts_not_serving() {
        use tonic_health::pb::health_server::Health;
        let (reporter, _server) = not_serving_health_reporter().await;
        let health = tonic_health::server::HealthService::from_health_reporter(reporter);
        for service in HEALTH_SERVICES {
            let request = tonic_health::pb::HealthCheckRequest {
                service: service.to_owned(),
            };
            let status = health
                .check(tonic::Request::new(request))
                .await
                .expect("a registered service")
                .into_inner()
                .status;
            assert_eq!(
                status,
                tonic_health::pb::health_check_response::ServingStatus::NotServing as i32,
                "{service:?}"
            );
        }
    }

    /// Checks past [`READINESS_STALE_AFTER`] while a round still waits on Redis (each of
    /// its calls may wait ten call deadlines) are a Redis not answering: a serving pod is
    /// degraded, a settler fails `redis`; neither fails as a stopped watcher. With no
    /// round running they are a stopped watcher.
    #[tokio::test]
    async fn a_long_round_is_redis_not_answering_not_a_stopped_watcher() {
        let ago = |d: Duration| tokio::time::Instant::now().checked_sub(d).expect("uptime");
        let last = LastChecks::default();
        let mut ok = serde_json::Map::new();
        ok.insert("redis".into(), "ok".into());
        let stale = LedgerChecks {
            at: ago(READINESS_STALE_AFTER + HEALTH_CHECK_INTERVAL),
            redis_up: true,
            failed: Vec::new(),
            degraded: Vec::new(),
            checks: ok,
        };
        last.store(stale.clone());
        // A round began after those checks and has not ended.
        *last.round_started.lock().expect("lock") = Some(ago(READINESS_STALE_AFTER));
        let serving = last.latest(true).await;
        assert!(serving.failed.is_empty(), "{:?}", serving.failed);
        assert_eq!(serving.degraded, ["redis"]);
        assert!(!serving.redis_up);
        let settling = last.latest(false).await;
        assert_eq!(settling.failed, ["redis"]);
        let waited_ms = settling.checks["redis"]
            .as_str()
            .and_then(|why| why.strip_prefix("no answer for "))
            .and_then(|rest| rest.split(' ').next())
            .and_then(|ms| ms.parse::<u128>().ok());
        assert!(
            waited_ms.is_some_and(|ms| ms >= READINESS_STALE_AFTER.as_millis()),
            "{:?}",
            settling.checks
        );

        // No round running: a stopped watcher.
        last.store(stale);
        assert_eq!(last.latest(true).await.failed, ["readiness"]);
    }

    /// The health watcher's panic turns gRPC health NOT_SERVING (it stayed SERVING).
    #[tokio::test]
    async fn a_panicked_health_watcher_leaves_grpc_health_not_serving() {
        use tonic_health::pb::health_server::Health;
        let (reporter, _server) = tonic_health::server::health_reporter();
        for service in HEALTH_SERVICES {
            reporter
                .set_service_status(service, ServingStatus::Serving)
                .await;
        }
        let status = |service: &'static str| {
            let health =
                tonic_health::server::HealthService::from_health_reporter(reporter.clone());
            async move {
                let request = tonic_health::pb::HealthCheckRequest {
                    service: service.to_owned(),
                };
                health
                    .check(tonic::Request::new(request))
                    .await
                    .expect("a registered service")
                    .into_inner()
                    .status
            }
        };
        let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
        // A watcher that ends at shutdown, as it should: left as it was.
        not_serving_after_a_panic(
            tokio::spawn(async {}),
            Some(reporter.clone()),
            LastChecks::default(),
        )
        .await;
        assert_eq!(status(HEALTH_SERVICES[0]).await, serving);
        let watcher = tokio::spawn(async { panic!("a bug in the watcher") });
        let last_checks = LastChecks::default();
        not_serving_after_a_panic(watcher, Some(reporter.clone()), last_checks.clone()).await;
        assert_eq!(last_checks.latest(true).await.failed, ["readiness"]);
        for service in HEALTH_SERVICES {
            assert_ne!(status(service).await, serving, "{service}");
        }
    }

    fn readiness_of(settlement: &Settlement, serving: bool, now_ms: i64) -> Readiness {
        let mut r = Readiness {
            ready: false,
            failed: Vec::new(),
            degraded: Vec::new(),
            checks: serde_json::Map::new(),
        };
        settlement.check(serving, now_ms, &mut r);
        r.ready = r.failed.is_empty();
        r
    }

    /// A settler that measured at `measured_at_ms`, one shard's oldest unsettled event
    /// written at `oldest`.
    fn settlement(measured_at_ms: i64, oldest: Option<i64>) -> Settlement {
        Settlement {
            settler: Some(Arc::new(std::sync::Mutex::new(SettlerStatus {
                shards: vec![
                    OutboxMeasure {
                        len: 1,
                        oldest_unsettled_at_ms: oldest,
                    },
                    OutboxMeasure::default(),
                ],
                measured_at_ms,
                ..Default::default()
            }))),
            webhooks: true,
            ready_lag_max_ms: 60_000,
            tasks: Tasks::default(),
        }
    }

    #[test]
    fn a_settler_that_stopped_measuring_is_reported_stuck() {
        // Measured an empty outbox a moment ago: all well.
        let s = settlement(1_000_000, None);
        let r = readiness_of(&s, true, 1_000_500);
        assert!(r.ready && r.degraded.is_empty(), "{:?}", r.checks);
        assert_eq!(r.checks["settler"], "ok");
        assert_eq!(r.checks["outbox"]["measured_ms_ago"], 500);

        // No measurement since, past the bound: the last one (an empty outbox, lag 0)
        // vouches for nothing. A serving pod is degraded, `tollgate settle` not ready.
        let later = 1_000_000 + 60_001;
        let r = readiness_of(&s, true, later);
        assert!(r.ready, "{:?}", r.checks);
        assert_eq!(r.degraded, ["settler"]);
        assert!(
            r.checks["settler"].as_str().unwrap().starts_with("stuck"),
            "{:?}",
            r.checks
        );
        let r = readiness_of(&s, false, later);
        assert!(!r.ready);
        assert_eq!(r.failed, ["settler"]);
    }

    #[test]
    fn the_lag_keeps_growing_without_a_measurement() {
        // An event unsettled at the last measurement, 1 s old then.
        let s = settlement(1_000_000, Some(999_000));
        let r = readiness_of(&s, false, 1_000_000);
        assert!(r.ready, "{:?}", r.checks);
        assert_eq!(r.checks["outbox"]["oldest_unsettled_ms"], 1_000);
        // Read later, its age has grown with the time, past the bound.
        let r = readiness_of(&s, false, 1_000_000 + 59_500);
        assert_eq!(r.checks["outbox"]["oldest_unsettled_ms"], 60_500);
        assert_eq!(r.failed, ["outbox_lag"]);
        let r = readiness_of(&s, true, 1_000_000 + 59_500);
        assert_eq!(
            (r.ready, r.degraded.as_slice()),
            (true, &["outbox_lag"][..])
        );
    }

    #[tokio::test]
    async fn a_settler_or_dispatcher_that_ends_before_shutdown_degrades_serve_and_fails_settle() {
        let s = settlement(1_000_000, None);
        let (stop_tx, stop_rx) = watch::channel(false);
        // The dispatcher panics; the settler returns early.
        let dispatcher = tokio::spawn(async { panic!("boom") });
        s.tasks
            .supervise("webhooks", joined(dispatcher), stop_rx.clone())
            .await
            .expect("supervisor");
        // Serving: degraded, still ready (the hot path does not need them).
        let r = readiness_of(&s, true, 1_000_001);
        assert!(r.ready && r.failed.is_empty(), "{:?}", r.checks);
        assert_eq!(r.degraded, ["webhooks"], "{:?}", r.checks);
        // `tollgate settle`: not ready.
        assert_eq!(
            readiness_of(&s, false, 1_000_001).failed,
            ["webhooks"],
            "{:?}",
            r.checks
        );
        assert!(
            r.checks["webhooks"]
                .as_str()
                .unwrap()
                .contains("panicked: boom"),
            "{:?}",
            r.checks
        );
        s.tasks
            .supervise("settler", async { Ok(()) }, stop_rx.clone())
            .await
            .expect("supervisor");
        let r = readiness_of(&s, true, 1_000_001);
        assert!(r.ready);
        assert_eq!(r.degraded, ["settler", "webhooks"], "{:?}", r.checks);
        let r = readiness_of(&s, false, 1_000_001);
        assert!(!r.ready);
        assert_eq!(r.failed, ["settler", "webhooks"], "{:?}", r.checks);

        // Ending once shutdown has begun is what tasks do: nothing recorded.
        let s = settlement(1_000_000, None);
        stop_tx.send(true).expect("stop");
        s.tasks
            .supervise("settler", async { Ok(()) }, stop_rx)
            .await
            .expect("supervisor");
        assert!(readiness_of(&s, false, 1_000_001).ready);
    }

    #[tokio::test]
    async fn another_background_task_that_ends_early_degrades_either_process() {
        let s = settlement(1_000_000, None);
        let (_stop_tx, stop_rx) = watch::channel(false);
        s.tasks
            .spawn("sweeper", async { panic!("swept away") }, stop_rx.clone())
            .await
            .expect("supervisor");
        // Not what `settle` is for either: degraded in both, never failed.
        for serving in [true, false] {
            let r = readiness_of(&s, serving, 1_000_001);
            assert!(r.ready && r.failed.is_empty(), "{:?}", r.checks);
            assert_eq!(r.degraded, ["sweeper"], "{:?}", r.checks);
            let check = r.checks["sweeper"].as_str().unwrap_or_default();
            assert!(
                check.contains("panicked: swept away") && check.contains("past their deadline"),
                "{check}"
            );
        }
        // One that returns early is reported as well.
        s.tasks
            .spawn("spool_replayer", async {}, stop_rx)
            .await
            .expect("supervisor");
        assert_eq!(
            readiness_of(&s, true, 1_000_001).degraded,
            ["sweeper", "spool_replayer"]
        );
    }
}
