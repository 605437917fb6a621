//! Shutdown of a real `tollgate serve` process while clients hold gRPC streams open.
//!
//! A graceful drain waits for every connection to close, and GOAWAY does not end a stream
//! already open: Envoy's access-log stream (open as long as Envoy runs) kept tollgate
//! waiting until SIGKILL, so the fail_open spool flush and the task joins after the drain
//! never ran. The access-log handler now ends its streams itself on shutdown (with OK, so
//! Envoy opens its next one elsewhere), and the drain of whatever else stays open (here a
//! `grpc.health.v1.Health/Watch`, which only its client ends) is bounded by
//! `SHUTDOWN_GRACE`. Access-log settlements waiting for a retry (Redis unavailable) do not
//! hold it up either: they are dropped, with a WARN, after a grace of their own.

mod common;

use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_client::AccessLogServiceClient;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::{
    HttpAccessLogEntries, Identifier, LogEntries,
};
use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use tollgate::api::pb;
use tollgate::gateway::access_log::retry::RETRY_SHUTDOWN_GRACE;
use tollgate::server::SHUTDOWN_GRACE;

/// `tollgate serve` on free (gRPC, HTTP) ports, answering on both, its logs (stdout) in
/// `log`, with these extra arguments and environment variables; killed on drop.
async fn serve_with(
    redis_url: &str,
    log: &std::path::Path,
    args: &[&str],
    envs: &[(&str, &str)],
) -> common::Listening {
    common::spawn_listening(
        2,
        common::START_TIMEOUT,
        |ports| {
            let mut cmd = common::tollgate();
            cmd.arg("serve")
                .args(args)
                .arg(format!("--redis-url={redis_url}"))
                .arg(format!("--grpc-addr=127.0.0.1:{}", ports[0]))
                .arg(format!("--http-addr=127.0.0.1:{}", ports[1]))
                .arg(format!("--store={}", common::temp_sqlite_url()))
                .env("TOLLGATE_ADMIN_TOKEN", common::ADMIN_TOKEN)
                .env("TOLLGATE_SERVICE_TOKEN", common::SERVICE_TOKEN)
                // A private fail-open spool: this file's servers run side by side.
                .env(
                    "TOLLGATE_GATEWAY__SPOOL_PATH",
                    common::temp_path("spool").display().to_string(),
                )
                .env("RUST_LOG", "info")
                .envs(envs.iter().copied())
                .stdout(std::fs::File::create(log).expect("log file"));
            cmd
        },
        |ports| async move {
            let http: std::net::SocketAddr = ([127, 0, 0, 1], ports[1]).into();
            tokio::net::TcpStream::connect(("127.0.0.1", ports[0]))
                .await
                .is_ok()
                && common::http_get(http, "/readyz").await.0 == 200
        },
    )
    .await
}

async fn channel(port: u16) -> Channel {
    Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_open_streams_and_the_process_within_the_grace() {
    let redis = common::RedisServer::start();
    let log = common::temp_path("log");
    let (mut server, key) = esign_server_with_key(&redis, &log, 100).await;
    let grpc = server.ports[0];
    let hold = common::gateways::ocr_hold(channel(grpc).await, &key, "ocr-open").await;

    // Envoy's access-log stream: one message (its identifier, as Envoy sends first, and
    // the entry of the OCR request: its settlement shows the server read it), then kept
    // open, as Envoy keeps it for as long as it runs.
    let (logs_tx, logs_rx) = tokio::sync::mpsc::channel::<StreamAccessLogsMessage>(4);
    logs_tx
        .send(StreamAccessLogsMessage {
            identifier: Some(Identifier {
                node: None,
                log_name: "tollgate-test".into(),
            }),
            log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries {
                log_entry: vec![common::gateways::access_log_entry(&hold, 200, "3")],
            })),
        })
        .await
        .expect("queue the first message");
    let mut logs = AccessLogServiceClient::new(channel(grpc).await);
    let access_log = tokio::spawn(async move {
        let ended = logs
            .stream_access_logs(tokio_stream::wrappers::ReceiverStream::new(logs_rx))
            .await;
        (ended.map(|_| ()), Instant::now())
    });
    // A health watch on a connection of its own: only its client ends it.
    let mut health = HealthClient::new(channel(grpc).await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(30), watch.message())
        .await
        .expect("the watch answers")
        .expect("a status");
    assert!(first.is_some(), "the watch sends the current status");
    // The server has the access-log stream open and its first message read: the hold is
    // captured (3 pages at 2).
    let metering = pb::metering_client::MeteringClient::with_interceptor(
        channel(grpc).await,
        common::auth(Some(common::SERVICE_TOKEN)),
    );
    common::eventually(Duration::from_secs(60), "the first entry settled", || {
        let mut metering = metering.clone();
        async move {
            let balance = metering
                .get_balance(pb::GetBalanceRequest {
                    account_id: "acme".into(),
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner();
            let wallet = balance.wallets.first()?;
            (wallet.held == 0 && wallet.total_used == 6).then_some(())
        }
    })
    .await;
    drop(metering);
    assert!(!access_log.is_finished(), "the stream is open");
    server.assert_running("before SIGTERM");

    let signalled = Instant::now();
    server.signal("-TERM");

    // The access-log stream ends at once, with OK (Envoy then opens its next one to
    // another tollgate), long before the grace is up.
    let (ended, at) = tokio::time::timeout(Duration::from_secs(60), access_log)
        .await
        .expect("the access-log stream ended")
        .expect("the client task");
    assert!(
        ended.is_ok(),
        "the access-log stream ended with {ended:?}, not OK; stderr:\n{}",
        server.stderr()
    );
    assert!(
        at.duration_since(signalled) < SHUTDOWN_GRACE,
        "the access-log stream ended {:?} after SIGTERM, not at once",
        at.duration_since(signalled)
    );

    // The process ends, within the grace (the watch is still open) plus a margin, and
    // cleanly. `watch` is kept open until then.
    let deadline = signalled + SHUTDOWN_GRACE + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = server.child.0.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "tollgate serve still running {:?} after SIGTERM (a stream held its drain); \
             stderr:\n{}",
            signalled.elapsed(),
            server.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let logs = common::read_lossy(&log);
    assert!(
        status.success(),
        "exit {status}; stderr:\n{}\nlogs:\n{logs}",
        server.stderr()
    );
    // The watch held the drain until the grace ran out; then the flush and the joins ran.
    assert!(
        logs.contains("connections still open after the shutdown grace"),
        "{logs}"
    );
    assert!(!logs.contains("spool was not flushed"), "{logs}");
    assert!(
        !logs.contains("background tasks still running after the shutdown grace"),
        "{logs}"
    );
    drop(watch);
    let _ = std::fs::remove_file(&log);
}

/// With `server.shutdown_delay_ms`, SIGTERM first turns the pod not ready while it goes
/// on serving: Kubernetes takes a terminating pod out of its endpoints while it signals
/// it, not before, and gateways and kube-proxy still sent it new connections, which a
/// listener closed at the signal refused (a check Envoy could not make, a forward-auth
/// nginx could not ask: the client's request failed). During the delay a new connection
/// is answered, `/readyz` says `shutdown` (503) and gRPC health NOT_SERVING, and a call
/// still goes through; a second SIGTERM ends the delay (the operator who will not wait),
/// and the process drains and exits 0 as without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_delay_keeps_serving_not_ready_until_a_second_signal() {
    let redis = common::RedisServer::start();
    let log = common::temp_path("log");
    // The largest delay: the test ends it with a second signal, long before it is up.
    let delay = tollgate::config::SHUTDOWN_DELAY_MS_MAX;
    let delay_ms = delay.to_string();
    let mut server = serve_with(
        &redis.url(),
        &log,
        &[],
        &[("TOLLGATE_SERVER__SHUTDOWN_DELAY_MS", &delay_ms)],
    )
    .await;
    let (grpc, http) = (server.ports[0], server.ports[1]);
    let http_addr: std::net::SocketAddr = ([127, 0, 0, 1], http).into();

    let signalled = Instant::now();
    server.signal("-TERM");
    // Each probe on a new connection: the listener still takes them.
    let deadline = signalled + Duration::from_secs(30);
    let body = loop {
        let (code, body) = common::http_get(http_addr, "/readyz").await;
        if code == 503 {
            break body;
        }
        assert_eq!(code, 200, "{body}");
        assert!(
            Instant::now() < deadline,
            "/readyz still ready {:?} after SIGTERM: {body}",
            signalled.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let readyz: serde_json::Value = serde_json::from_str(&body).expect("/readyz is JSON");
    assert_eq!(readyz["failed"], serde_json::json!(["shutdown"]), "{body}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = HealthClient::new(channel(grpc).await)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health check")
            .into_inner()
            .status;
        if status == tonic_health::pb::health_check_response::ServingStatus::NotServing as i32 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "gRPC health still {status} while /readyz says shutdown"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A call on a new connection is still answered (what a gateway sends meanwhile).
    let mut admin = pb::admin_client::AdminClient::with_interceptor(
        channel(grpc).await,
        common::auth(Some(common::ADMIN_TOKEN)),
    );
    admin
        .grant(pb::GrantRequest {
            account_id: "acme".into(),
            amount: 5,
            idempotency_key: "during-the-delay".into(),
            ..Default::default()
        })
        .await
        .expect("a grant during the shutdown delay");
    server.assert_running("during the shutdown delay");

    let again = Instant::now();
    server.signal("-TERM");
    let logs = ended_within(&mut server, &log, again, SHUTDOWN_GRACE).await;
    assert!(
        signalled.elapsed() < Duration::from_millis(delay),
        "the second signal did not end the delay ({:?})",
        signalled.elapsed()
    );
    assert!(logs.contains("a second stop signal"), "{logs}");
    let _ = std::fs::remove_file(&log);
}

/// A "PostgreSQL" that takes connections and never answers: its URL, and the task that
/// holds them (abort it to let them go).
async fn silent_store() -> (String, tokio::task::JoinHandle<()>) {
    let store = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!(
        "postgres://postgres@{}/tollgate",
        store.local_addr().expect("addr")
    );
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((conn, _)) = store.accept().await {
            open.push(conn);
        }
    });
    (url, held)
}

/// SIGTERM to a `serve` whose store has not answered since it started (the shard count
/// still unverified) ends it cleanly. The shard-count task's verification returned on
/// shutdown having completed the stop future it was lent, and the task then polled it
/// again: a panic (`async fn` resumed after completion) on every such shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_the_store_unreachable_since_start_up_stops_without_a_panic() {
    let redis = common::RedisServer::start();
    let log = common::temp_path("log");
    let (store_url, held) = silent_store().await;
    let redis_url = redis.url();
    // Serves after the start-up wait for the store (5 s), not ready (no shard can be
    // initialized before the store answers): waited for on /healthz.
    let mut server = common::spawn_listening(
        2,
        common::START_TIMEOUT,
        |ports| {
            let mut cmd = common::tollgate();
            cmd.arg("serve")
                .arg(format!("--redis-url={redis_url}"))
                .arg(format!("--grpc-addr=127.0.0.1:{}", ports[0]))
                .arg(format!("--http-addr=127.0.0.1:{}", ports[1]))
                .arg(format!("--store={store_url}"))
                .env("TOLLGATE_ADMIN_TOKEN", common::ADMIN_TOKEN)
                .env("TOLLGATE_SERVICE_TOKEN", common::SERVICE_TOKEN)
                .env(
                    "TOLLGATE_GATEWAY__SPOOL_PATH",
                    common::temp_path("spool").display().to_string(),
                )
                .env("RUST_LOG", "info")
                .stdout(std::fs::File::create(&log).expect("log file"));
            cmd
        },
        // Each probe bounded: until it serves, the bound port takes the connection and
        // answers nothing.
        |ports| async move {
            let addr = ([127, 0, 0, 1], ports[1]).into();
            tokio::time::timeout(Duration::from_secs(5), common::http_get(addr, "/healthz"))
                .await
                .is_ok_and(|(code, _)| code == 200)
        },
    )
    .await;
    let signalled = Instant::now();
    server.signal("-TERM");
    ended_within(&mut server, &log, signalled, SHUTDOWN_GRACE).await;
    let stderr = server.stderr();
    assert!(!stderr.contains("panicked"), "{stderr}");
    held.abort();
    let _ = std::fs::remove_file(&log);
}

/// SIGTERM while `serve` starts (here `--restore` looking at a store that does not
/// answer, then the start-up wait for it: 10 s before it serves) ends it cleanly, exit 0,
/// without serving. The signal handlers used to be installed only once the server ran,
/// so a signal during the start ended the process by the signal's default action, where
/// it stood (a `--dev` redis-server was left running, a restore cut anywhere).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_starting_stops_cleanly_before_serving() {
    let redis = common::RedisServer::start();
    let log = common::temp_path("log");
    let (store_url, held) = silent_store().await;
    let mut cmd = common::tollgate();
    cmd.arg("serve")
        .arg("--restore")
        .arg(format!("--redis-url={}", redis.url()))
        .arg(format!("--grpc-addr=127.0.0.1:{}", common::free_port()))
        .arg(format!("--http-addr=127.0.0.1:{}", common::free_port()))
        .arg(format!("--store={store_url}"))
        .env("TOLLGATE_ADMIN_TOKEN", common::ADMIN_TOKEN)
        .env("TOLLGATE_SERVICE_TOKEN", common::SERVICE_TOKEN)
        .env(
            "TOLLGATE_GATEWAY__SPOOL_PATH",
            common::temp_path("spool").display().to_string(),
        )
        .env("RUST_LOG", "info")
        .stdout(std::fs::File::create(&log).expect("log file"));
    let mut child = common::KillOnDrop(cmd.spawn().expect("spawn tollgate serve"));
    let pid = child.0.id();

    // Signalled once it handles SIGTERM (its caught-signals mask says so), not before: a
    // signal sent earlier ends any process by its default action.
    let caught = |pid: u32| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            .is_some_and(|mask| mask & (1 << (15 - 1)) != 0)
    };
    common::eventually(
        Duration::from_secs(30),
        "tollgate handles SIGTERM",
        || async { caught(pid).then_some(()) },
    )
    .await;
    let signalled = Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = signalled + SHUTDOWN_GRACE + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "tollgate serve still running {:?} after SIGTERM",
            signalled.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let logs = common::read_lossy(&log);
    assert!(status.success(), "exit {status}; logs:\n{logs}");
    // Stopped where it was, in the restore's look: it never served.
    assert!(logs.contains("a stop signal before serving"), "{logs}");
    assert!(!logs.contains("price book loaded"), "{logs}");
    held.abort();
    let _ = std::fs::remove_file(&log);
}

/// Waits (generously) for the process to end after SIGTERM at `signalled`, within
/// `grace` plus a margin for a busy machine; returns its logs, having checked it exited 0.
async fn ended_within(
    server: &mut common::Listening,
    log: &std::path::Path,
    signalled: Instant,
    grace: Duration,
) -> String {
    let deadline = signalled + grace + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = server.child.0.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "tollgate serve still running {:?} after SIGTERM; stderr:\n{}",
            signalled.elapsed(),
            server.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let logs = common::read_lossy(log);
    assert!(
        status.success(),
        "exit {status}; stderr:\n{}\nlogs:\n{logs}",
        server.stderr()
    );
    logs
}

/// `serve` with the esign price book, account `acme` granted `credits`, and an API key of
/// it: the server and the key.
async fn esign_server_with_key(
    redis: &common::RedisServer,
    log: &std::path::Path,
    credits: i64,
) -> (common::Listening, String) {
    let pricebook = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join("pricebook-esign.toml");
    let config = format!("--config={}", pricebook.display());
    let server = serve_with(&redis.url(), log, &[&config], &[]).await;
    let grpc = server.ports[0];

    let mut admin = pb::admin_client::AdminClient::with_interceptor(
        channel(grpc).await,
        common::auth(Some(common::ADMIN_TOKEN)),
    );
    admin
        .grant(pb::GrantRequest {
            account_id: "acme".into(),
            amount: credits,
            idempotency_key: "g1".into(),
            ..Default::default()
        })
        .await
        .expect("grant");
    let key = admin
        .create_api_key(pb::CreateApiKeyRequest {
            account_id: "acme".into(),
            name: "test".into(),
            ..Default::default()
        })
        .await
        .expect("key")
        .into_inner()
        .api_key;
    (server, key)
}

/// An access-log settlement that met a Redis refusing writes waits for a retry when
/// SIGTERM comes: the retries go on for `RETRY_SHUTDOWN_GRACE` at most (Redis still
/// refuses), then the settlement is dropped with a WARN (its hold follows `on_expiry`),
/// and the process exits before the grace of its task joins runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlements_waiting_for_a_retry_do_not_hold_up_shutdown() {
    let redis = common::RedisServer::start();
    let log = common::temp_path("log");
    let (mut server, key) = esign_server_with_key(&redis, &log, 100).await;
    let grpc = server.ports[0];
    let hold = common::gateways::ocr_hold(channel(grpc).await, &key, "ocr-1").await;

    // READONLY to every write, until the end.
    redis.read_only();
    let mut logs = AccessLogServiceClient::new(channel(grpc).await);
    let message = common::gateways::access_log_message(vec![common::gateways::access_log_entry(
        &hold, 200, "3",
    )]);
    tokio::time::timeout(
        Duration::from_secs(60),
        logs.stream_access_logs(tokio_stream::iter(vec![message])),
    )
    .await
    .expect("the stream is answered")
    .expect("stream");

    let signalled = Instant::now();
    server.signal("-TERM");
    let logs = ended_within(&mut server, &log, signalled, RETRY_SHUTDOWN_GRACE).await;
    assert!(
        logs.contains("access-log settlements still waiting for the ledger were dropped"),
        "{logs}"
    );
    assert!(logs.contains("result=\"shutdown\""), "{logs}");
    assert!(
        !logs.contains("background tasks still running after the shutdown grace"),
        "{logs}"
    );
    let _ = std::fs::remove_file(&log);
}

/// Envoy stopping with the pod: its connection goes away while tollgate is still settling
/// the flush it sent last, and SIGTERM comes at once. The stream's task (whose handler
/// hyper dropped with the connection) settles every entry of that flush before the
/// process exits: the shutdown waits for it as for the other tasks. Exiting under it
/// left the rest of the flush to `on_expiry` (`release` here: calls answered 200, free).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_whose_envoy_went_away_is_settled_before_the_process_exits() {
    // Enough that settling them takes far longer than noticing the first and stopping.
    const HOLDS: i64 = 500;
    let redis = common::RedisServer::start();
    let log = common::temp_path("log");
    let (mut server, key) = esign_server_with_key(&redis, &log, 1_000_000).await;
    let grpc = server.ports[0];
    let checks = channel(grpc).await;
    let mut holds = Vec::new();
    for i in 0..HOLDS {
        holds.push(common::gateways::ocr_hold(checks.clone(), &key, &format!("ocr-{i}")).await);
    }
    drop(checks);
    // Read from Redis directly (the process is gone by the end): what is held.
    let ledger = tollgate::server::ledger_from_config(
        &common::test_config(&redis.url()),
        tollgate::ledger::Clock::Redis,
    )
    .expect("ledger");
    let held = || async {
        let wallets = ledger.balance("acme", "default").await.expect("balance");
        wallets.first().map_or(0, |w| w.held)
    };
    assert_eq!(held().await, 50 * HOLDS);

    // "Envoy": one flush of every entry (answered 200, 1 page: 2 captured, 48 released),
    // on a connection of its own through a proxy, the stream left open.
    let proxy = common::proxy::FaultProxy::start(([127, 0, 0, 1], grpc).into()).await;
    let envoy = Channel::from_shared(format!("http://{}", proxy.addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect through the proxy");
    let (send, receive) = tokio::sync::mpsc::channel(1);
    send.send(common::gateways::access_log_message(
        holds
            .iter()
            .map(|h| common::gateways::access_log_entry(h, 200, "1"))
            .collect(),
    ))
    .await
    .expect("queue the flush");
    let stream = tokio::spawn(async move {
        AccessLogServiceClient::new(envoy)
            .stream_access_logs(tokio_stream::wrappers::ReceiverStream::new(receive))
            .await
    });
    // Once tollgate is settling the flush (a hold settled), Envoy goes away and the pod
    // stops.
    let deadline = Instant::now() + Duration::from_secs(60);
    while held().await == 50 * HOLDS {
        assert!(
            Instant::now() < deadline,
            "no entry of the flush was ever settled"
        );
        tokio::task::yield_now().await;
    }
    proxy.cut();
    let signalled = Instant::now();
    server.signal("-TERM");
    let open_at_the_signal = held().await / 50;
    drop(send);
    stream.abort();
    let logs = ended_within(&mut server, &log, signalled, 2 * SHUTDOWN_GRACE).await;
    assert_eq!(
        held().await,
        0,
        "{open_at_the_signal} of {HOLDS} holds were open at SIGTERM; logs:\n{logs}"
    );
    let _ = std::fs::remove_file(&log);
}

/// Another shard count than the deployment's, found while the shutdown delay still serves
/// (the count unverified at the start: the store had not answered), ends the process with
/// its error, as outside the delay: it was dropped, and the process served on to the end
/// of the delay and exited cleanly. Here the store never answers and Redis is found to
/// hold another count once the delay has begun.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_count_refusal_during_the_shutdown_delay_ends_serve_with_its_error() {
    let redis = common::RedisServer::start();
    let (store_url, held) = silent_store().await;
    let mut config = common::test_config(&redis.url());
    config.store.url = store_url;
    // The largest delay: the refusal must end it, long before it is up.
    config.server.shutdown_delay_ms = tollgate::config::SHUTDOWN_DELAY_MS_MAX;
    let other_count = (config.ledger.shards + 1).to_string();
    let ledger = tollgate::server::ledger_from_config(&config, tollgate::ledger::Clock::Redis)
        .expect("ledger");
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let http = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let http_addr = http.local_addr().expect("addr");
    let (signal, signalled) = tokio::sync::oneshot::channel::<()>();
    let serve = tokio::spawn(tollgate::server::run(config, ledger, grpc, http, async {
        let _ = signalled.await;
    }));
    // Serving (after the start-up wait for the store), the shard count unverified.
    common::eventually(Duration::from_secs(60), "serving", || async {
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            common::http_get(http_addr, "/healthz"),
        )
        .await;
        answer.is_ok_and(|(code, _)| code == 200).then_some(())
    })
    .await;
    let _ = signal.send(());
    common::eventually(Duration::from_secs(30), "in the shutdown delay", || async {
        let (code, body) = common::http_get(http_addr, "/readyz").await;
        let readyz: serde_json::Value = serde_json::from_str(&body).ok()?;
        let failed = readyz["failed"].as_array()?;
        (code == 503 && failed.contains(&serde_json::json!("shutdown"))).then_some(())
    })
    .await;
    let mut con = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let () = redis::cmd("SET")
        .arg("{tg:0}:shards")
        .arg(&other_count)
        .query_async(&mut con)
        .await
        .expect("SET");
    let ended = tokio::time::timeout(Duration::from_secs(120), serve)
        .await
        .expect("serve still runs")
        .expect("serve's task");
    let err = ended
        .expect_err("a clean exit: the refusal was dropped")
        .to_string();
    assert!(err.contains(&other_count), "{err}");
    held.abort();
}
