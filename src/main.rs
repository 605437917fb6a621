//! The `tollgate` binary: a thin shell over the library.

use std::process::ExitCode;

use clap::Parser;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use tollgate::api::pb;
use tollgate::cli::{
    AdminArgs, AdminCommand, CheckConfigArgs, Cli, Command, DeadLettersArgs, DeadLettersCommand,
    EndLostHoldArgs, OrgCommand, PruneFunctionsArgs, ReconcileArgs, RestoreArgs, ServeArgs,
    SettleArgs, ToolTarget, BALANCE_FIELDS, BUDGET_FIELDS, CREATE_KEY_FIELDS, GRANT_FIELDS,
    KEYS_FIELDS, LOTS_FIELDS, ORG_FIELDS, REFUND_FIELDS, REVOKE_KEY_FIELDS,
};
use tollgate::config::{default_worker_threads, url_for_logs, Config, Overrides};
use tollgate::dev::{DevRedis, DEV_ADMIN_TOKEN, DEV_SERVICE_TOKEN};
use tollgate::ledger::command::wallet_str_or_default;
use tollgate::ledger::Clock;
use tollgate::settle::restore::RestoreMode;
use tollgate::{server, telemetry};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        // serve and settle size their runtime from the config, so it is loaded first.
        Command::Serve(args) => {
            match load_config(args.config.as_deref(), &serve_overrides(&args)) {
                Ok(config) => run_on(config.server.runtime_workers(), async move {
                    serve(args, config).await.map_err(Exit::stopped)
                }),
                Err(message) => Exit::message(message).0,
            }
        }
        Command::Settle(args) => {
            match load_config(args.config.as_deref(), &settle_overrides(&args)) {
                Ok(config) => run_on(config.server.runtime_workers(), async move {
                    settle(config).await.map_err(Exit::stopped)
                }),
                Err(message) => Exit::message(message).0,
            }
        }
        // Ctrl-C (or SIGTERM) drops the bench, which kills the children it started.
        Command::Bench(args) => run_on(usize::from(args.threads), async move {
            tokio::select! {
                result = tollgate::bench::run(args) => result.map(|_| ()).map_err(Exit::message),
                _ = shutdown_signal() => Err(Exit::message("bench interrupted".into())),
            }
        }),
        Command::Reconcile(args) => run_on(default_worker_threads(), async move {
            Err(Exit(reconcile(args).await))
        }),
        Command::Restore(args) => run_on(default_worker_threads(), async move {
            restore(args).await.map_err(Exit::message)
        }),
        Command::EndLostHold(args) => run_on(default_worker_threads(), async move {
            end_lost_hold(args).await.map_err(Exit::message)
        }),
        Command::DeadLetters(args) => run_on(default_worker_threads(), async move {
            dead_letters(args).await.map_err(Exit::message)
        }),
        Command::PruneFunctions(args) => run_on(default_worker_threads(), async move {
            prune_functions(args).await.map_err(Exit::message)
        }),
        Command::Admin(args) => run_on(default_worker_threads(), async move {
            admin(args).await.map_err(Exit::message)
        }),
        Command::CheckConfig(args) => check_config(args)
            .map_or_else(|message| Exit::message(message).0, |()| ExitCode::SUCCESS),
    }
}

/// Runs a command on a runtime of `workers` threads: with one, a current-thread runtime
/// (the command's own future and every task on the one thread; a multi-threaded runtime
/// of one worker would still run the command's future on the main thread and hand work
/// between the two: 12% more sidecar CPU per check, docs/BENCHMARKS.md twelfth session).
fn run_on(
    workers: usize,
    command: impl std::future::Future<Output = Result<(), Exit>>,
) -> ExitCode {
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tollgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Exit(code)) => code,
    }
}

/// How a command ends when it does not succeed plainly.
struct Exit(ExitCode);

impl Exit {
    fn message(message: String) -> Self {
        eprintln!("tollgate: {message}");
        Self(ExitCode::FAILURE)
    }

    /// `serve` or `settle` stopping on an error: logged as well (ERROR `stopped`), since a
    /// log pipeline reads the log (stdout; JSON lines) and would otherwise not learn why
    /// the process ended.
    fn stopped(message: String) -> Self {
        tracing::error!(error = %message, "stopped");
        Self::message(message)
    }
}

/// Loads the config: `--config`, else ./tollgate.toml when present; env; flags.
fn load_config(path: Option<&std::path::Path>, overrides: &Overrides) -> Result<Config, String> {
    let path = path.map(|p| p.to_path_buf()).or_else(|| {
        let default = std::path::PathBuf::from("tollgate.toml");
        default.exists().then_some(default)
    });
    let env = tollgate::config::env_vars().map_err(|e| e.to_string())?;
    let config = Config::load(path.as_deref(), env, overrides).map_err(|e| e.to_string())?;
    telemetry::init_logs(&config.log);
    Ok(config)
}

/// `tollgate check-config`: the config is loaded exactly as `serve` loads it, and held
/// to what `serve` then requires (the tokens).
fn check_config(args: CheckConfigArgs) -> Result<(), String> {
    let path = args.config.or_else(|| {
        let default = std::path::PathBuf::from("tollgate.toml");
        default.exists().then_some(default)
    });
    let env = tollgate::config::env_vars().map_err(|e| e.to_string())?;
    let config =
        Config::load(path.as_deref(), env, &Overrides::default()).map_err(|e| e.to_string())?;
    let tokens = !config.auth.admin_token.is_empty() && !config.auth.service_token.is_empty();
    if !tokens && !args.dev {
        return Err(format!(
            "{} (or check it with --dev, as `serve --dev` would run it)",
            tollgate::server::ServeError::MissingTokens
        ));
    }
    println!(
        "config ok: {} price book route(s){}",
        config.pricebook.routes_len(),
        if tokens { "" } else { ", dev tokens" }
    );
    Ok(())
}

fn serve_overrides(args: &ServeArgs) -> Overrides {
    Overrides {
        redis_url: args.redis_url.clone(),
        grpc_addr: args.grpc_addr.clone(),
        http_addr: args.http_addr.clone(),
        store_url: args.store.clone(),
    }
}

fn settle_overrides(args: &SettleArgs) -> Overrides {
    Overrides {
        redis_url: args.redis_url.clone(),
        http_addr: args.http_addr.clone(),
        store_url: args.store.clone(),
        ..Overrides::default()
    }
}

async fn settle(config: Config) -> Result<(), String> {
    let ledger = server::ledger_from_config(&config, Clock::Redis).map_err(|e| e.to_string())?;
    let http = tokio::net::TcpListener::bind(&config.server.http_addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.server.http_addr))?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        http = %config.server.http_addr,
        redis = %url_for_logs(&config.redis.url),
        store = %url_for_logs(&config.store.url),
        shards = config.ledger.shards,
        "settling"
    );
    server::run_settler(config, ledger, http, shutdown_signal())
        .await
        .map_err(|e| e.to_string())
}

async fn reconcile(args: ReconcileArgs) -> ExitCode {
    let run = async {
        let (config, ledger) = tool_ledger(&args.target)?;
        let store = tool_store(&config).await?;
        tool_shard_count(&ledger, &store).await?;
        tollgate::settle::reconcile::reconcile(
            ledger,
            store,
            config.settler_settings(),
            std::time::Duration::from_secs(args.drain_timeout_secs),
        )
        .await
        .map_err(|e| e.to_string())
    };
    match run.await {
        Ok(report) => {
            print!("{}", report.render());
            if report.drifts.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(message) => {
            eprintln!("tollgate: reconcile failed: {message}");
            ExitCode::from(2)
        }
    }
}

async fn prune_functions(args: PruneFunctionsArgs) -> Result<(), String> {
    let overrides = Overrides {
        redis_url: args.redis_url.clone(),
        ..Default::default()
    };
    let config = load_config(args.config.as_deref(), &overrides)?;
    let ledger = server::ledger_from_config(&config, Clock::Redis).map_err(|e| e.to_string())?;
    let pruned = ledger
        .prune_libraries(args.dry_run, args.force)
        .await
        .map_err(|e| e.to_string())?;
    let (verb, done) = if args.dry_run {
        ("would delete", "to delete")
    } else {
        ("deleted", "deleted")
    };
    for name in &pruned {
        println!("{verb} {name}");
    }
    println!(
        "{} earlier librar{} {done}; this version's is {}",
        pruned.len(),
        if pruned.len() == 1 { "y" } else { "ies" },
        ledger.library().name()
    );
    Ok(())
}

/// A command's config (file, environment, `--redis-url` and `--store`) and its ledger.
fn tool_ledger(
    target: &ToolTarget,
) -> Result<(Config, std::sync::Arc<tollgate::ledger::Ledger>), String> {
    let overrides = Overrides {
        redis_url: target.redis_url.clone(),
        store_url: target.store.clone(),
        ..Default::default()
    };
    let config = load_config(target.config.as_deref(), &overrides)?;
    let ledger = server::ledger_from_config(&config, Clock::Redis).map_err(|e| e.to_string())?;
    Ok((config, ledger))
}

/// Refuses an operator tool configured with another shard count than the deployment's
/// (`ledger.shards`): it would look for accounts in other shards than theirs.
async fn tool_shard_count(
    ledger: &tollgate::ledger::Ledger,
    store: &tollgate::settle::Store,
) -> Result<(), String> {
    tollgate::settle::shard_count::check(ledger, store)
        .await
        .map_err(|e| e.to_string())
}

/// The store an operator tool reads and writes: one that `serve` or `settle` made. A
/// store that does not exist, or holds no tollgate schema, is refused before anything is
/// read from Redis, and nothing is created (a tool that drained the outbox into a new
/// store would leave the events acknowledged in Redis and missing from the real one).
async fn tool_store(config: &Config) -> Result<std::sync::Arc<tollgate::settle::Store>, String> {
    use tollgate::settle::StoreError;
    let url = url_for_logs(&config.store.url);
    server::existing_store_from_config(config)
        .await
        .map_err(|e| match e {
            StoreError::NotInitialized(why) => format!(
                "the store {url} is not a tollgate store ({why}); this command creates no \
                 store and writes into none but the one `serve` and `settle` use: pass it \
                 with --store URL (or store.url in the config, TOLLGATE_STORE__URL)"
            ),
            other => format!("the store {url}: {other}"),
        })
}

async fn end_lost_hold(args: EndLostHoldArgs) -> Result<(), String> {
    use tollgate::settle::reconcile::LostHoldEnd;
    let (config, ledger) = tool_ledger(&args.target)?;
    let store = tool_store(&config).await?;
    tool_shard_count(&ledger, &store).await?;
    let ended = tollgate::settle::reconcile::end_lost_hold(
        ledger,
        store,
        config.settler_settings(),
        std::time::Duration::from_secs(args.drain_timeout_secs),
        &args.account,
        &args.wallet,
        &args.hold_id,
    )
    .await
    .map_err(|e| e.to_string())?;
    match ended {
        LostHoldEnd::Released { amount } => {
            println!("hold {} released: {amount} credits available again", args.hold_id)
        }
        LostHoldEnd::ByPolicy { how, captured } => println!(
            "hold {} was past its deadline and ended by its on_expiry policy: {} ({captured} captured)",
            args.hold_id,
            how.as_str()
        ),
    }
    Ok(())
}

async fn dead_letters(args: DeadLettersArgs) -> Result<(), String> {
    use tollgate::settle::dead_letters;
    let (config, ledger) = tool_ledger(&args.target)?;
    match args.command {
        DeadLettersCommand::List => {
            let letters = dead_letters::list(&ledger)
                .await
                .map_err(|e| e.to_string())?;
            for letter in &letters {
                println!("{}", letter.render());
            }
            eprintln!("{} dead letter(s)", letters.len());
        }
        DeadLettersCommand::Replay {
            shard,
            dead_id,
            set,
            dry_run,
        } => {
            let store = tool_store(&config).await?;
            // A dry run changes nothing, the store's schema included.
            if !dry_run {
                store.migrate().await.map_err(|e| e.to_string())?;
                tool_shard_count(&ledger, &store).await?;
            }
            let webhooks = config.webhooks.rules();
            let replayed = dead_letters::replay(
                &ledger,
                &store,
                webhooks.as_deref(),
                shard,
                &dead_id,
                &set,
                dry_run,
            )
            .await
            .map_err(|e| e.to_string())?;
            let e = &replayed.event;
            let what = format!(
                "event {} ({} of {} on {}/{})",
                e.event_id,
                e.kind.as_str(),
                e.amount,
                e.account_id,
                e.wallet
            );
            if dry_run {
                println!("would write {what}");
            } else if replayed.written {
                println!("wrote {what}; dead letter {dead_id} deleted");
            } else {
                println!("the store already held {what}; dead letter {dead_id} deleted");
            }
        }
        DeadLettersCommand::Drop {
            shard,
            dead_id,
            force,
        } => {
            if !force {
                return Err(format!(
                    "dead letter {dead_id} is the only copy of an event Redis applied: \
                     replay it, or pass --force to delete it for good"
                ));
            }
            dead_letters::drop_letter(&ledger, shard, &dead_id)
                .await
                .map_err(|e| e.to_string())?;
            println!("dead letter {dead_id} deleted");
        }
    }
    Ok(())
}

async fn restore(args: RestoreArgs) -> Result<(), String> {
    let (config, ledger) = tool_ledger(&args.target)?;
    // A store that does not exist is refused, not read as an empty ledger: restoring
    // from it would mark every lost shard serving, empty.
    let store = tool_store(&config).await?;
    tool_shard_count(&ledger, &store).await?;
    let mode = if args.rebuild_serving {
        RestoreMode::RebuildServing {
            group: tollgate::settle::settler::DEFAULT_GROUP.into(),
        }
    } else if args.force {
        RestoreMode::Force
    } else {
        RestoreMode::Lost
    };
    let report = tollgate::settle::restore::restore(ledger, store, mode, |shard, count| {
        if shard.skipped {
            eprintln!("shard {:>4}/{count}: serves, left alone", shard.shard + 1);
        } else {
            eprintln!(
                "shard {:>4}/{count}: {} wallets, {} events, {} open holds",
                shard.shard + 1,
                shard.wallets,
                shard.events,
                shard.open_holds
            );
        }
    })
    .await
    .map_err(|e| e.to_string())?;
    print!("{}", report.render());
    Ok(())
}

async fn serve(args: ServeArgs, mut config: Config) -> Result<(), String> {
    let early_hangups = ignore_hangups_until_serving();
    // From the first line: a SIGTERM or Ctrl-C while starting (a dev Redis, `--restore`,
    // which can take minutes) used to end the process where it stood, by the signal's
    // default action, leaving the dev redis-server running.
    let stop = StopSignal::listen();
    // Kept alive until serve returns; dropping it stops the child redis-server.
    let mut _dev_redis = None;
    // The dev ledger file of the private redis-server: removed on a clean exit.
    let mut dev_store = None;
    if args.dev {
        if args.redis_url.is_none() {
            let redis = tokio::select! {
                redis = DevRedis::start() => redis?,
                () = stop.received() => {
                    stopped_before_serving(None);
                    return Ok(());
                }
            };
            config.redis.url = redis.url.clone();
            _dev_redis = Some(redis);
        }
        let configured = config.store.url != tollgate::settle::store::DEFAULT_STORE_URL;
        if args.store.is_none() && (_dev_redis.is_some() || !configured) {
            // The dev redis-server starts empty each time: pair it with a fresh ledger file
            // (a store holding events would mark the empty Redis as having lost its data),
            // also over a store a config or the environment names: a real one, migrated
            // by a dev process, restored into its throwaway Redis (`server.restore`),
            // its shards' fences raised under the real settlers. `--store` says otherwise.
            if configured {
                eprintln!(
                    "serve --dev: the configured store is not used with the private Redis \
                     (a fresh SQLite file is); give --store to use one"
                );
            }
            let path = std::env::temp_dir().join(format!("tollgate-dev-{}.db", std::process::id()));
            if _dev_redis.is_some() {
                // A file left by an earlier process of the same id (ids repeat, e.g. in
                // containers, or one killed before its clean exit) belongs to a Redis that
                // is gone.
                remove_sqlite_files(&path);
                dev_store = Some(path.clone());
            }
            config.store.url = format!("sqlite://{}", path.display());
        }
        if config.auth.admin_token.is_empty() {
            config.auth.admin_token = DEV_ADMIN_TOKEN.into();
        }
        if config.auth.service_token.is_empty() {
            config.auth.service_token = DEV_SERVICE_TOKEN.into();
        }
        // The dev tokens are shown; tokens a config or the environment gave are not.
        let shown = |token: &str, dev: &str| {
            if token == dev {
                token.to_owned()
            } else {
                "(as configured)".to_owned()
            }
        };
        println!("tollgate dev mode");
        println!("  redis:         {}", url_for_logs(&config.redis.url));
        println!("  store:         {}", url_for_logs(&config.store.url));
        println!("  gRPC:          {}", config.server.grpc_addr);
        println!("  HTTP:          {}", config.server.http_addr);
        println!(
            "  admin token:   {}",
            shown(&config.auth.admin_token, DEV_ADMIN_TOKEN)
        );
        println!(
            "  service token: {}",
            shown(&config.auth.service_token, DEV_SERVICE_TOKEN)
        );
        // As this process was started (scripts/dev runs target/debug/tollgate).
        let me = std::env::args().next().unwrap_or_else(|| "tollgate".into());
        let admin = if config.server.grpc_addr == tollgate::config::DEFAULT_GRPC_ADDR {
            format!("{me} admin")
        } else {
            format!("{me} admin --server {}", config.server.grpc_addr)
        };
        println!("  try:           {admin} grant alice 100 && {admin} balance alice");
    }

    let ledger = server::ledger_from_config(&config, Clock::Redis).map_err(|e| e.to_string())?;
    if args.restore {
        config.server.restore = true;
    }
    if config.server.restore {
        // A look that fails (Redis or the store unreachable, a restore cut short) is not
        // fatal: a pod rescheduled during a Redis outage would otherwise crash in a loop
        // until it ended. It serves instead, and the background restore (`server.restore`,
        // every few seconds) restores once Redis is back; a lost shard refuses charges
        // meanwhile (LEDGER_NOT_INITIALIZED), so nothing is served from it unrestored.
        let restored = tokio::select! {
            restored = server::restore_if_lost(&config, &ledger) => restored,
            // As a crash would: a restore cut short leaves its lease to expire (30 s)
            // and its shard marked, rebuilt by the next restore (docs/ARCHITECTURE.md).
            () = stop.received() => {
                stopped_before_serving(dev_store.as_deref());
                return Ok(());
            }
        };
        if let Err(err) = restored {
            tracing::warn!(
                error = %err,
                "could not look for shards Redis lost before serving; serving, and trying again in the background"
            );
        }
    }
    let grpc = tokio::net::TcpListener::bind(&config.server.grpc_addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.server.grpc_addr))?;
    let http = tokio::net::TcpListener::bind(&config.server.http_addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.server.http_addr))?;
    // What an operator checks first in an incident: which build, where it listens, which
    // Redis and store (without credentials) and how many shards.
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        grpc = %config.server.grpc_addr,
        http = %config.server.http_addr,
        redis = %url_for_logs(&config.redis.url),
        store = %url_for_logs(&config.store.url),
        shards = config.ledger.shards,
        "serving"
    );
    if let Some(task) = early_hangups {
        task.abort();
    }
    // A signal that came meanwhile stops it as soon as it serves.
    server::run(config, ledger, grpc, http, stop.received())
        .await
        .map_err(|e| e.to_string())?;
    // The private redis-server stops with this process, and its ledger is worth nothing
    // without it (the next `serve --dev` starts both afresh).
    if let Some(path) = dev_store {
        remove_sqlite_files(&path);
    }
    Ok(())
}

/// Removes a SQLite file and its WAL and shared-memory files, where they exist.
fn remove_sqlite_files(path: &std::path::Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

/// SIGHUP ends a process by default, and `server::run` listens for it (price book reloads)
/// from its first line: before that (starting a dev Redis, `--restore`, which can take
/// minutes) one is logged and ignored instead. Once registered, the handler stays for the
/// life of the process.
fn ignore_hangups_until_serving() -> Option<tokio::task::JoinHandle<()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(mut hangups) => {
                return Some(tokio::spawn(async move {
                    while hangups.recv().await.is_some() {
                        tracing::warn!(
                            "SIGHUP before serving: ignored (nothing is reloaded); send it again once serving"
                        );
                    }
                }));
            }
            Err(err) => tracing::warn!(error = %err, "cannot listen for SIGHUP before serving"),
        }
    }
    None
}

/// A stop signal came while `serve` started: it ends there, its dev ledger file (if any)
/// removed as on a clean exit.
fn stopped_before_serving(dev_store: Option<&std::path::Path>) {
    tracing::info!("a stop signal before serving: stopping");
    if let Some(path) = dev_store {
        remove_sqlite_files(path);
    }
}

/// SIGTERM or Ctrl-C, listened for from [`StopSignal::listen`] on, for every waiter
/// that asks after it.
#[derive(Clone)]
struct StopSignal(tokio::sync::watch::Receiver<bool>);

impl StopSignal {
    fn listen() -> Self {
        let signal = shutdown_signal();
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            signal.await;
            let _ = tx.send(true);
        });
        Self(rx)
    }

    /// Completes once the signal has come (at once if it came already).
    fn received(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.0.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }
}

/// SIGTERM or Ctrl-C. The handlers are installed by this call, not when the future is
/// first polled: until then the signals keep their default action (ending the process).
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
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
        match listening {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = int.recv() => {},
                    _ = term.recv() => {},
                }
            }
            (Ok(mut term), Err(_)) => {
                term.recv().await;
            }
            (Err(_), _) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn admin(args: AdminArgs) -> Result<(), String> {
    let token = args.token.unwrap_or_else(|| DEV_ADMIN_TOKEN.to_owned());
    let header: MetadataValue<_> = format!("Bearer {token}")
        .parse()
        .map_err(|_| "the token is not a valid header value".to_owned())?;
    // Bounded: a back-office command must not hang on a server that does not answer.
    let server = server_url(&args.server)?;
    let channel = Channel::from_shared(server.clone())
        .map_err(|e| format!("bad --server {}: {e}", args.server))?
        .connect_timeout(std::time::Duration::from_secs(10))
        .timeout(std::time::Duration::from_secs(60))
        .connect()
        .await
        .map_err(|e| format!("cannot reach {server}: {e}"))?;
    let with_auth = move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", header.clone());
        Ok(req)
    };
    match args.command {
        AdminCommand::Grant {
            account,
            amount,
            wallet,
            kind,
            priority,
            expires_at,
            description,
            idempotency_key,
        } => {
            let mut client = pb::admin_client::AdminClient::with_interceptor(channel, with_auth);
            let shown_wallet = wallet_str_or_default(&wallet).to_owned();
            let out = client
                .grant(pb::GrantRequest {
                    account_id: account.clone(),
                    wallet,
                    amount,
                    kind,
                    priority,
                    expires_at_ms: expires_at,
                    description,
                    idempotency_key: idempotency_key.unwrap_or_else(fresh_key),
                    metadata: Default::default(),
                })
                .await
                .map_err(status_naming(GRANT_FIELDS))?
                .into_inner();
            let done = format!(
                "granted {amount} to {account} ({shown_wallet}): lot {} (event {}), available {}",
                out.lot_id, out.event_id, out.available
            );
            println!("{}", replayed_or(out.replayed, done));
        }
        AdminCommand::Balance {
            account,
            wallet,
            member,
        } => {
            let mut client =
                pb::metering_client::MeteringClient::with_interceptor(channel, with_auth);
            let out = client
                .get_balance(pb::GetBalanceRequest {
                    account_id: account.clone(),
                    wallet,
                    member_id: member,
                    key_id: String::new(),
                })
                .await
                .map_err(status_naming(BALANCE_FIELDS))?
                .into_inner();
            if out.role.is_empty() {
                println!("account {account} ({})", out.context);
            } else {
                println!(
                    "org {account} as {} ({}, {})",
                    out.member_id, out.role, out.context
                );
            }
            for a in &out.allocations {
                if a.bounded {
                    println!(
                        "allocation {}: {} allocated, {} used, {} remaining",
                        a.wallet, a.allocated, a.used, a.remaining
                    );
                } else {
                    // An owner or admin without an allocation spends the org's balance.
                    println!(
                        "allocation {}: none (spends the org's balance), {} used",
                        a.wallet, a.used
                    );
                }
            }
            for b in &out.budgets {
                println!(
                    "budget {} ({}): {} of {} per {} spent, resets at {}",
                    b.wallet,
                    b.scope,
                    b.spent,
                    b.limit,
                    b.period,
                    tollgate::cli::utc_time(b.resets_at_ms)
                );
            }
            // A plain member is shown what they may spend, never the org's totals: the
            // answer leaves those at 0, which a full table would print as the org's.
            let member_view =
                tollgate::ledger::org::Role::parse(&out.role).is_some_and(|role| !role.manages());
            if member_view {
                println!("{:<16} {:>12} {:>12}", "wallet", "available", "spendable");
                for w in &out.wallets {
                    println!("{:<16} {:>12} {:>12}", w.wallet, w.available, w.spendable);
                }
                println!("(a member's view: the org's own totals are shown to owners and admins)");
                return Ok(());
            }
            println!(
                "{:<16} {:>12} {:>10} {:>12} {:>12} {:>10} {:>10} {:>10}",
                "wallet", "available", "held", "granted", "used", "expired", "refunded", "adjusted"
            );
            if out.wallets.is_empty() {
                println!("(no wallet: nothing was ever granted to this account)");
            }
            for w in out.wallets {
                println!(
                    "{:<16} {:>12} {:>10} {:>12} {:>12} {:>10} {:>10} {:>10}",
                    w.wallet,
                    w.available,
                    w.held,
                    w.total_granted,
                    w.total_used,
                    w.total_expired,
                    w.total_refunded,
                    w.total_adjusted
                );
                // Only when an allocation, a budget or the org's balance is tighter.
                if w.spendable != w.available {
                    println!("{:<16} {:>12} spendable now", "", w.spendable);
                }
            }
        }
        AdminCommand::CreateKey {
            account,
            name,
            org,
            member,
            actor,
            idempotency_key,
        } => {
            let mut client = pb::admin_client::AdminClient::with_interceptor(channel, with_auth);
            let out = client
                .create_api_key(pb::CreateApiKeyRequest {
                    account_id: account,
                    name,
                    org_id: org,
                    member_id: member,
                    actor_id: actor,
                    idempotency_key: idempotency_key.unwrap_or_default(),
                })
                .await
                .map_err(status_naming(CREATE_KEY_FIELDS))?
                .into_inner();
            if out.replayed {
                println!(
                    "key {} was made for {} by an earlier call with this idempotency key; its \
                     secret was shown then only (revoke it and create another if it is lost)",
                    out.key_id, out.account_id
                );
                return Ok(());
            }
            println!(
                "api key for {}{} (shown once; keep it secret):",
                out.account_id,
                if out.member_id.is_empty() {
                    String::new()
                } else {
                    format!(" as member {}", out.member_id)
                }
            );
            println!("{}", out.api_key);
            println!("key id: {}", out.key_id);
        }
        AdminCommand::RevokeKey { key_id } => {
            let mut client = pb::admin_client::AdminClient::with_interceptor(channel, with_auth);
            let out = client
                .revoke_api_key(pb::RevokeApiKeyRequest { key_id })
                .await
                .map_err(status_naming(REVOKE_KEY_FIELDS))?
                .into_inner();
            println!(
                "revoked {} of {} at {}{}",
                out.key_id,
                out.account_id,
                out.revoked_at_ms,
                if out.already_revoked {
                    " [already revoked]"
                } else {
                    ""
                }
            );
        }
        AdminCommand::Org(cmd) => {
            let mut client = pb::admin_client::AdminClient::with_interceptor(channel, with_auth);
            org_command(&mut client, cmd).await?;
        }
        AdminCommand::Keys { account } => {
            let mut client = pb::admin_client::AdminClient::with_interceptor(channel, with_auth);
            let out = client
                .list_api_keys(pb::ListApiKeysRequest {
                    account_id: account,
                })
                .await
                .map_err(status_naming(KEYS_FIELDS))?
                .into_inner();
            println!(
                "{:<22} {:>15} {:>15} {:<16} {:<16}  name",
                "key id", "created_at_ms", "revoked_at_ms", "member", "made by"
            );
            let or_dash = |text: &str| {
                if text.is_empty() {
                    "-".to_owned()
                } else {
                    text.to_owned()
                }
            };
            for k in out.keys {
                let revoked = if k.revoked_at_ms == 0 {
                    "-".to_owned()
                } else {
                    k.revoked_at_ms.to_string()
                };
                println!(
                    "{:<22} {:>15} {:>15} {:<16} {:<16}  {}",
                    k.key_id,
                    k.created_at_ms,
                    revoked,
                    or_dash(&k.member_id),
                    or_dash(&k.created_by),
                    k.name
                );
            }
        }
        AdminCommand::Lots { account, wallet } => {
            let mut client =
                pb::metering_client::MeteringClient::with_interceptor(channel, with_auth);
            let mut token = String::new();
            // The header follows the first page, so a refusal is not printed under it.
            let mut header = true;
            loop {
                let out = client
                    .list_lots(pb::ListLotsRequest {
                        account_id: account.clone(),
                        wallet: wallet.clone(),
                        page_size: 0,
                        page_token: token,
                    })
                    .await
                    .map_err(status_naming(LOTS_FIELDS))?
                    .into_inner();
                if std::mem::take(&mut header) {
                    println!(
                        "{:<10} {:<11} {:>4} {:>10} {:>10} {:>10} {:>8} {:>20}  description",
                        "lot",
                        "kind",
                        "prio",
                        "amount",
                        "used",
                        "remaining",
                        "held",
                        "expires_at (UTC)"
                    );
                }
                for l in out.lots {
                    // An expired lot is listed while open holds hold credits of it.
                    let expired = if l.expired {
                        format!(" (expired: {} credits)", l.expired_credits)
                    } else {
                        String::new()
                    };
                    println!(
                        "{:<10} {:<11} {:>4} {:>10} {:>10} {:>10} {:>8} {:>20}  {}{expired}",
                        l.lot_id,
                        l.kind,
                        l.priority,
                        l.amount,
                        l.used,
                        l.remaining,
                        l.held,
                        if l.expires_at_ms == 0 {
                            "never".to_owned()
                        } else {
                            tollgate::cli::utc_time(l.expires_at_ms)
                        },
                        l.description
                    );
                }
                if out.next_page_token.is_empty() {
                    break;
                }
                token = out.next_page_token;
            }
        }
        AdminCommand::Adjust {
            account,
            amount,
            wallet,
            priority,
            expires_at,
            description,
            idempotency_key,
        } => {
            // Only a positive adjustment makes a lot: a lot's settings on a negative one
            // would be ignored, and the caller would think they took effect.
            if amount < 0 {
                let given: Vec<&str> = [
                    priority.is_some().then_some("--priority"),
                    (expires_at != 0).then_some("--expires-at"),
                ]
                .into_iter()
                .flatten()
                .collect();
                if !given.is_empty() {
                    return Err(format!(
                        "InvalidArgument: {}: only for a positive adjustment (a negative one \
                         takes credits and makes no lot)",
                        given.join(", ")
                    ));
                }
            }
            let mut client = pb::admin_client::AdminClient::with_interceptor(channel, with_auth);
            let out = client
                .adjust(pb::AdjustRequest {
                    account_id: account.clone(),
                    wallet: wallet.clone(),
                    amount,
                    description,
                    idempotency_key: idempotency_key.unwrap_or_else(fresh_key),
                    priority,
                    expires_at_ms: expires_at,
                    metadata: Default::default(),
                })
                .await
                .map_err(status_naming(GRANT_FIELDS))?
                .into_inner();
            // A negative adjustment makes no lot.
            let lot = if out.lot_id.is_empty() {
                String::new()
            } else {
                format!("lot {}, ", out.lot_id)
            };
            let done = format!(
                "adjusted {account} ({wallet}) by {amount:+}: {lot}event {}, available {}",
                out.event_id, out.available
            );
            println!("{}", replayed_or(out.replayed, done));
        }
        AdminCommand::Refund {
            charge_id,
            amount,
            idempotency_key,
        } => {
            let mut client =
                pb::metering_client::MeteringClient::with_interceptor(channel, with_auth);
            let out = client
                .refund(pb::RefundRequest {
                    charge_id: charge_id.clone(),
                    amount,
                    idempotency_key: idempotency_key.unwrap_or_else(fresh_key),
                    metadata: Default::default(),
                })
                .await
                .map_err(status_naming(REFUND_FIELDS))?
                .into_inner();
            let expired = if out.expired > 0 {
                format!(
                    "; {} of it expired at once (the lot it came from has expired)",
                    out.expired
                )
            } else {
                String::new()
            };
            let done = format!(
                "refunded {} of charge {charge_id} (event {}; {} of the charge refunded so far), \
                 available {}{expired}",
                out.refunded, out.event_id, out.refunded_total, out.available
            );
            println!("{}", replayed_or(out.replayed, done));
        }
    }
    Ok(())
}

/// A money or org command's answer as a person reads it. A replayed answer is the one an
/// earlier call with the same idempotency key got, verbatim (its balance is as of then):
/// said so, since nothing changed now.
fn replayed_or(replayed: bool, done: String) -> String {
    if replayed {
        format!(
            "replayed (an earlier call with this idempotency key got this answer; nothing \
             changed now): {done}"
        )
    } else {
        done
    }
}

/// The keys a member's removal or demotion revoked (the keys they made; on a removal
/// the keys bound to them too), as a clause ("" for none).
fn keys_revoked(key_ids: &[String]) -> String {
    if key_ids.is_empty() {
        String::new()
    } else {
        format!("; revoked keys: {}", key_ids.join(", "))
    }
}

async fn org_command<T>(
    client: &mut pb::admin_client::AdminClient<T>,
    cmd: OrgCommand,
) -> Result<(), String>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    match cmd {
        OrgCommand::Create {
            org,
            owner,
            idempotency_key,
        } => {
            let out = client
                .create_organization(pb::CreateOrganizationRequest {
                    org_id: org,
                    owner_id: owner,
                    idempotency_key: idempotency_key.unwrap_or_else(fresh_key),
                })
                .await
                .map_err(status_naming(ORG_FIELDS))?
                .into_inner();
            let done = format!(
                "organization {} created, owner {} (event {})",
                out.org_id, out.owner_id, out.event_id
            );
            println!("{}", replayed_or(out.replayed, done));
        }
        OrgCommand::AddMember {
            org,
            member,
            role,
            actor,
            idempotency_key,
        } => {
            let out = client
                .add_member(pb::AddMemberRequest {
                    org_id: org,
                    member_id: member,
                    role,
                    actor_id: actor,
                    idempotency_key: idempotency_key.unwrap_or_else(fresh_key),
                })
                .await
                .map_err(status_naming(ORG_FIELDS))?
                .into_inner();
            let done = format!(
                "{} is {} of {} (event {}){}",
                out.member_id,
                out.role,
                out.org_id,
                out.event_id,
                keys_revoked(&out.revoked_key_ids)
            );
            println!("{}", replayed_or(out.replayed, done));
        }
        OrgCommand::RemoveMember {
            org,
            member,
            actor,
            idempotency_key,
        } => {
            let out = client
                .remove_member(pb::RemoveMemberRequest {
                    org_id: org,
                    member_id: member,
                    actor_id: actor,
                    idempotency_key: idempotency_key.unwrap_or_else(fresh_key),
                })
                .await
                .map_err(status_naming(ORG_FIELDS))?
                .into_inner();
            let done = format!(
                "{} removed from {} (event {}){}",
                out.member_id,
                out.org_id,
                out.event_id,
                keys_revoked(&out.revoked_key_ids)
            );
            println!("{}", replayed_or(out.replayed, done));
        }
        OrgCommand::Members { org } => {
            // Every page, in member id order.
            let mut token = String::new();
            loop {
                let out = client
                    .list_members(pb::ListMembersRequest {
                        org_id: org.clone(),
                        page_size: 0,
                        page_token: token,
                    })
                    .await
                    .map_err(|s| {
                        if s.code() == tonic::Code::NotFound {
                            format!("NotFound: {org} is not an organization (<ORG>)")
                        } else {
                            status_naming(ORG_FIELDS)(s)
                        }
                    })?
                    .into_inner();
                for m in out.members {
                    println!("{:<32} {}", m.member_id, m.role);
                }
                if out.next_page_token.is_empty() {
                    break;
                }
                token = out.next_page_token;
            }
        }
        OrgCommand::Allocate {
            org,
            member,
            amount,
            wallet,
            add,
            actor,
            idempotency_key,
        } => {
            let idempotency_key = idempotency_key.unwrap_or_else(fresh_key);
            let out = if add {
                client
                    .add_allocation(pb::AddAllocationRequest {
                        org_id: org,
                        member_id: member,
                        wallet,
                        delta: amount,
                        actor_id: actor,
                        idempotency_key,
                    })
                    .await
            } else {
                client
                    .set_allocation(pb::SetAllocationRequest {
                        org_id: org,
                        member_id: member,
                        wallet,
                        amount,
                        actor_id: actor,
                        idempotency_key,
                    })
                    .await
            }
            .map_err(status_naming(ORG_FIELDS))?
            .into_inner();
            let done = format!(
                "{} in {} ({}): {} allocated, {} used, {} remaining (event {})",
                out.member_id,
                out.org_id,
                out.wallet,
                out.allocated,
                out.used,
                out.remaining,
                out.event_id
            );
            println!("{}", replayed_or(out.replayed, done));
        }
        OrgCommand::Budget {
            account,
            limit,
            period,
            window_secs,
            member,
            wallet,
            utc_offset_minutes,
            idempotency_key,
        } => {
            // Whose budget: an org member's, or the account's own (every charge of the wallet).
            let shown_wallet = wallet_str_or_default(&wallet);
            let whose = if member.is_empty() {
                format!("account budget of {account} ({shown_wallet})")
            } else {
                format!("member budget of {member} in {account} ({shown_wallet})")
            };
            let out = client
                .set_budget(pb::SetBudgetRequest {
                    account_id: account,
                    member_id: member,
                    wallet,
                    limit,
                    period,
                    window_secs,
                    utc_offset_minutes,
                    idempotency_key: idempotency_key.unwrap_or_else(fresh_key),
                })
                .await
                .map_err(|s| {
                    // Removing a budget that is not there: say which one was looked for.
                    if s.code() == tonic::Code::NotFound && limit == 0 {
                        format!("NotFound: there is no {whose} to remove")
                    } else {
                        status_naming(BUDGET_FIELDS)(s)
                    }
                })?
                .into_inner();
            let done = if out.limit == 0 {
                format!("{whose} removed (event {})", out.event_id)
            } else {
                format!(
                    "{whose}: {} per {}, {} spent so far (event {})",
                    out.limit,
                    budget_period(&out.period, out.window_secs, utc_offset_minutes),
                    out.spent,
                    out.event_id
                )
            };
            println!("{}", replayed_or(out.replayed, done));
        }
    }
    Ok(())
}

/// `--server` as a URL: a bare HOST:PORT (as `serve` prints its gRPC address, and as
/// `server.grpc_addr` is written) is taken as http://HOST:PORT.
/// The `--server` as a URL: a bare HOST:PORT means http://. https:// is refused: the
/// gRPC client is built without TLS, and given one it spoke plain HTTP/2 to the port,
/// sending the admin token in clear while the operator believed it encrypted.
fn server_url(server: &str) -> Result<String, String> {
    match server.split_once("://") {
        None => Ok(format!("http://{server}")),
        Some((scheme, _)) if scheme.eq_ignore_ascii_case("http") => Ok(server.to_owned()),
        Some((scheme, _)) if scheme.eq_ignore_ascii_case("https") => Err(format!(
            "--server {server}: TLS is not supported by this build (the admin token would \
             go in clear); reach the gRPC port over a private network or a port-forward \
             (kubectl port-forward), with http://"
        )),
        Some(_) => Err(format!(
            "--server {server}: must be http://HOST:PORT or HOST:PORT"
        )),
    }
}

/// A budget's period as a person reads it: `day`, `month`, `day (UTC+01:00)` when its
/// calendar is not UTC's, `3600 s window` for a rolling window.
fn budget_period(period: &str, window_secs: i64, utc_offset_minutes: i32) -> String {
    if period == "window" {
        return format!("{window_secs} s window");
    }
    if utc_offset_minutes == 0 {
        return period.to_owned();
    }
    let sign = if utc_offset_minutes < 0 { '-' } else { '+' };
    let minutes = utc_offset_minutes.unsigned_abs();
    format!(
        "{period} (UTC{sign}{:02}:{:02})",
        minutes / 60,
        minutes % 60
    )
}

/// A refusal as a person reads it: the code, the message (without repeating the code),
/// and where to look when the call never reached the ledger.
fn status(s: tonic::Status) -> String {
    let message = s.message();
    let message = message
        .strip_prefix("invalid argument: ")
        .unwrap_or(message);
    let hint = match s.code() {
        tonic::Code::Unauthenticated => " (the admin token: --token or TOLLGATE_ADMIN_TOKEN)",
        // The server's own answers (api/status.rs): it is up, its Redis is not.
        tonic::Code::Unavailable if message == "ledger unavailable" => {
            " (tollgate answered: its Redis is not answering)"
        }
        tonic::Code::Unavailable if message.starts_with("ledger not initialized") => "",
        tonic::Code::Unavailable => " (is tollgate serving at --server or TOLLGATE_SERVER?)",
        _ => "",
    };
    format!("{:?}: {message}{hint}", s.code())
}

/// As [`status`], for a command whose arguments are not named as the request's fields:
/// each bad field of an `INVALID_ARGUMENT` (its `google.rpc.BadRequest`) is named as the
/// command line names it (`fields`: request field → argument), e.g. `--expires-at` for
/// `expires_at_ms`. Fields the command does not set keep their names.
fn status_naming(
    fields: &'static [(&'static str, &'static str)],
) -> impl Fn(tonic::Status) -> String {
    use tonic_types::StatusExt;
    move |s| {
        let violations = match s.get_details_bad_request() {
            Some(bad) if s.code() == tonic::Code::InvalidArgument => bad.field_violations,
            _ => return status(s),
        };
        if violations.is_empty() {
            return status(s);
        }
        let mut named: Vec<String> = Vec::with_capacity(violations.len());
        for v in &violations {
            let field = fields
                .iter()
                .find(|(sent, _)| *sent == v.field)
                .map_or(v.field.as_str(), |(_, argument)| argument);
            // Two request fields may be one argument (e.g. both sides of a pair refused
            // alike): say it once.
            let part = format!("{field}: {}", v.description);
            if !named.contains(&part) {
                named.push(part);
            }
        }
        let named = named.join("; ");
        format!("{:?}: {named}", s.code())
    }
}

/// A fresh idempotency key for a command typed by a person.
fn fresh_key() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("cli-{}-{nanos}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::{server_url, status};

    /// https:// is refused (no TLS in this build); a bare HOST:PORT means http://.
    #[test]
    fn admin_server_urls() {
        assert_eq!(
            server_url("10.0.0.1:50051").as_deref(),
            Ok("http://10.0.0.1:50051")
        );
        assert_eq!(server_url("http://h:1").as_deref(), Ok("http://h:1"));
        assert!(server_url("https://h:1").is_err_and(|e| e.contains("TLS")));
        assert!(server_url("ftp://h:1").is_err());
    }

    #[test]
    fn unavailable_says_whether_the_server_or_its_redis_did_not_answer() {
        let unreachable = status(tonic::Status::unavailable("tcp connect error"));
        assert!(unreachable.contains("is tollgate serving"), "{unreachable}");
        let redis_down = status(tonic::Status::unavailable("ledger unavailable"));
        assert!(!redis_down.contains("is tollgate serving"), "{redis_down}");
        assert!(
            redis_down.contains("its Redis is not answering"),
            "{redis_down}"
        );
        let lost = status(tonic::Status::unavailable(
            "ledger not initialized: Redis lost its data and awaits tollgate restore",
        ));
        assert!(!lost.contains("is tollgate serving"), "{lost}");
    }
}
