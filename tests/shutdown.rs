//! Shutdown of a real `tollgate serve` process while clients hold gRPC streams open.
//!
//! A graceful drain waits for every connection to close, and GOAWAY does not end a stream
//! already open: Envoy's access-log stream (open as long as Envoy runs) kept tollgate
//! waiting until SIGKILL, so the fail_open spool flush and the task joins after the drain
//! never ran. The access-log handler now ends its streams itself on shutdown (with OK, so
//! Envoy opens its next one elsewhere), and the drain of whatever else stays open (here a
//! `grpc.health.v1.Health/Watch`, which only its client ends) is bounded by
//! `SHUTDOWN_GRACE`.

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

use tollgate::server::SHUTDOWN_GRACE;

/// `tollgate serve` on free (gRPC, HTTP) ports, answering on both, its logs (stdout) in
/// `log`; killed on drop.
async fn serve(redis_url: &str, log: &std::path::Path) -> common::Listening {
    common::spawn_listening(
        2,
        common::START_TIMEOUT,
        |ports| {
            let mut cmd = common::tollgate();
            cmd.arg("serve")
                .arg(format!("--redis-url={redis_url}"))
                .arg(format!("--grpc-addr=127.0.0.1:{}", ports[0]))
                .arg(format!("--http-addr=127.0.0.1:{}", ports[1]))
                .arg(format!("--store={}", common::temp_sqlite_url()))
                .env("TOLLGATE_ADMIN_TOKEN", common::ADMIN_TOKEN)
                .env("TOLLGATE_SERVICE_TOKEN", common::SERVICE_TOKEN)
                .env("RUST_LOG", "info")
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
    let mut server = serve(&redis.url(), &log).await;
    let grpc = server.ports[0];

    // Envoy's access-log stream: one message (its identifier, as Envoy sends first), then
    // kept open, as Envoy keeps it for as long as it runs.
    let (logs_tx, logs_rx) = tokio::sync::mpsc::channel::<StreamAccessLogsMessage>(4);
    logs_tx
        .send(StreamAccessLogsMessage {
            identifier: Some(Identifier {
                node: None,
                log_name: "tollgate-test".into(),
            }),
            log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries {
                log_entry: Vec::new(),
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
    // The server has the access-log stream open (and its first message read).
    tokio::time::sleep(Duration::from_millis(500)).await;
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
