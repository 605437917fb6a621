//! Logs of the real binary (`tollgate serve`, JSON format): one line per failed request
//! carrying its request id (the caller's `x-request-id`, or a generated one returned to
//! the caller), nothing for requests that succeed, and no tokens, API keys or account ids
//! anywhere in the output.

mod common;

use std::process::Stdio;
use std::time::Duration;

use tonic::transport::Channel;

use tollgate::api::pb;

const ACCOUNT: &str = "acct-private-7781";
const WRONG_TOKEN: &str = "wrong-token-9931";

fn with_request_id<T>(message: T, id: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("x-request-id", id.parse().expect("ascii"));
    request
}

/// A grant of `amount` to [`ACCOUNT`].
fn grant(amount: i64, idempotency_key: &str) -> pb::GrantRequest {
    pb::GrantRequest {
        account_id: ACCOUNT.into(),
        amount,
        idempotency_key: idempotency_key.into(),
        ..Default::default()
    }
}

/// The lines carrying request id `id`.
fn with_id<'a>(lines: &'a [serde_json::Value], id: &str) -> Vec<&'a serde_json::Value> {
    lines
        .iter()
        .filter(|l| l["fields"]["request_id"] == id)
        .collect()
}

/// `tollgate serve` with JSON logs at INFO, its stdout and stderr in files; SIGTERM on
/// drop.
struct Running {
    serve: common::Terminating,
    dir: std::path::PathBuf,
    channel: Channel,
    grpc_addr: std::net::SocketAddr,
    http_addr: std::net::SocketAddr,
    out_path: std::path::PathBuf,
}

impl Running {
    async fn start(name: &str, config_text: &str, redis: &common::RedisServer) -> Self {
        Self::start_with_env(name, config_text, redis, &[]).await
    }

    /// As [`start`](Self::start), with more (or other) environment settings.
    async fn start_with_env(
        name: &str,
        config_text: &str,
        redis: &common::RedisServer,
        env: &[(&str, &str)],
    ) -> Self {
        let dir = std::env::temp_dir().join(format!("tollgate-logs-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let config = dir.join("config.toml");
        std::fs::write(&config, config_text).expect("config");
        let out_path = dir.join("stdout.log");
        // On ports picked free (again if another process took one first); stderr in a file.
        let listening = common::spawn_listening(
            2,
            common::START_TIMEOUT,
            |ports| {
                let mut cmd = common::tollgate();
                cmd.args(["serve", "--config"])
                    .arg(&config)
                    .arg(format!("--grpc-addr=127.0.0.1:{}", ports[0]))
                    .arg(format!("--http-addr=127.0.0.1:{}", ports[1]))
                    .env("TOLLGATE_REDIS_URL", redis.url())
                    .env("TOLLGATE_ADMIN_TOKEN", common::ADMIN_TOKEN)
                    .env("TOLLGATE_SERVICE_TOKEN", common::SERVICE_TOKEN)
                    .env("TOLLGATE_STORE__URL", common::temp_sqlite_url())
                    .env("TOLLGATE_LOG__FORMAT", "json")
                    .env("TOLLGATE_LOG__LEVEL", "info")
                    .env_remove("RUST_LOG")
                    .envs(env.iter().copied())
                    .stdout(Stdio::from(std::fs::File::create(&out_path).expect("out")));
                cmd
            },
            |ports| async move {
                Channel::from_shared(format!("http://127.0.0.1:{}", ports[0]))
                    .expect("uri")
                    .connect()
                    .await
                    .is_ok()
            },
        )
        .await;
        let (grpc_port, http_port) = (listening.ports[0], listening.ports[1]);
        let serve = common::Terminating(listening);
        let channel = Channel::from_shared(format!("http://127.0.0.1:{grpc_port}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        Self {
            serve,
            dir,
            channel,
            grpc_addr: format!("127.0.0.1:{grpc_port}").parse().expect("addr"),
            http_addr: format!("127.0.0.1:{http_port}").parse().expect("addr"),
            out_path,
        }
    }

    /// An admin client with the admin token.
    fn admin(&self) -> pb::admin_client::AdminClient<common::AuthChannel> {
        pb::admin_client::AdminClient::with_interceptor(
            self.channel.clone(),
            common::auth(Some(common::ADMIN_TOKEN)),
        )
    }

    /// A metering client with the service token.
    fn metering(&self) -> pb::metering_client::MeteringClient<common::AuthChannel> {
        pb::metering_client::MeteringClient::with_interceptor(
            self.channel.clone(),
            common::auth(Some(common::SERVICE_TOKEN)),
        )
    }

    /// Stops the server; its (stdout, stdout + stderr).
    fn stop(&mut self) -> (String, String) {
        self.serve.0.terminate();
        let stdout = std::fs::read_to_string(&self.out_path).expect("stdout");
        let stderr = std::fs::read_to_string(&self.serve.0.stderr_path).expect("stderr");
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(&self.serve.0.stderr_path);
        let output = format!("{stdout}{stderr}");
        (stdout, output)
    }
}

/// stdout's lines, each a JSON object.
fn json_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_line_per_failed_request_with_its_id_and_no_secrets() {
    let redis = common::RedisServer::start();
    let mut running = Running::start("failed", "", &redis).await;
    let mut metering = running.metering();
    let mut admin = running.admin();
    let mut intruder = pb::admin_client::AdminClient::with_interceptor(
        running.channel.clone(),
        common::auth(Some(WRONG_TOKEN)),
    );

    // Succeeds: no line.
    admin
        .grant(with_request_id(grant(3, "g1"), "req-ok-3"))
        .await
        .expect("grant");
    // Refused: one line with the caller's id.
    let refused = metering
        .debit(with_request_id(
            pb::DebitRequest {
                account_id: ACCOUNT.into(),
                amount: 5,
                idempotency_key: "d1".into(),
                ..Default::default()
            },
            "req-insufficient-1",
        ))
        .await
        .expect_err("insufficient credits");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    // Wrong token: one line, the token nowhere.
    let denied = intruder
        .grant(with_request_id(grant(1, "g2"), "req-badtoken-2"))
        .await
        .expect_err("bad token");
    assert_eq!(denied.code(), tonic::Code::Unauthenticated);
    // No request id: a generated one, returned to the caller.
    let invalid = metering
        .debit(pb::DebitRequest {
            account_id: ACCOUNT.into(),
            amount: 0,
            idempotency_key: "d2".into(),
            ..Default::default()
        })
        .await
        .expect_err("invalid amount");
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);
    let generated = invalid
        .metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .expect("a generated request id in the answer")
        .to_owned();
    // HTTP: a probe is never logged.
    let (code, _) = common::http_get(running.http_addr, "/healthz").await;
    assert_eq!(code, 200);
    // HTTP hold settlement without a token: one line. A forward-auth denial is an answer
    // (as an ext_authz Check's denial is a gRPC OK): none.
    let http_addr = running.http_addr;
    let status = raw_http(
        http_addr,
        "POST /v1/holds/h0-1/capture HTTP/1.1\r\nHost: x\r\nx-request-id: req-http-hold-4\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 401);
    // A bad settlement: its line says which field, never the value.
    let auth = format!("authorization: Bearer {}", common::SERVICE_TOKEN);
    let status = raw_http(
        http_addr,
        &format!(
            "POST /v1/holds/h0-1/capture HTTP/1.1\r\nHost: x\r\nx-request-id: req-http-hold-6\r\n\
             {auth}\r\nContent-Length: 25\r\nConnection: close\r\n\r\n{{\"amount\": \"sevensecret\"}}"
        ),
    )
    .await;
    assert_eq!(status, 400);
    let status = raw_http(
        http_addr,
        "GET /v1/forward-auth HTTP/1.1\r\nHost: x\r\nx-request-id: req-denied-5\r\n\
         Connection: close\r\n\r\n",
    )
    .await;
    assert!((400..500).contains(&status), "{status}");

    let (stdout, output) = running.stop();
    let lines = json_lines(&stdout);
    let one = |id: &str, code: &str, path: &str| {
        let found = with_id(&lines, id);
        assert_eq!(found.len(), 1, "one line for {id}:\n{stdout}");
        let fields = &found[0]["fields"];
        assert_eq!(fields["message"], "request failed");
        assert_eq!(fields["code"], code, "{fields}");
        assert_eq!(fields["path"], path, "{fields}");
        assert_eq!(fields["protocol"], "grpc");
        assert!(fields["latency_ms"].is_number());
    };
    one(
        "req-insufficient-1",
        "FAILED_PRECONDITION",
        "/tollgate.v1.Metering/Debit",
    );
    one(
        "req-badtoken-2",
        "UNAUTHENTICATED",
        "/tollgate.v1.Admin/Grant",
    );
    one(
        &generated,
        "INVALID_ARGUMENT",
        "/tollgate.v1.Metering/Debit",
    );
    let http = with_id(&lines, "req-http-hold-4");
    assert_eq!(http.len(), 1, "one line for the HTTP failure:\n{stdout}");
    assert_eq!(http[0]["fields"]["protocol"], "http");
    assert_eq!(http[0]["fields"]["status"], 401);
    assert_eq!(http[0]["fields"]["path"], "/v1/holds/h0-1/capture");
    assert_eq!(http[0]["fields"]["detail"], "unauthenticated", "{stdout}");
    let bad = with_id(&lines, "req-http-hold-6");
    assert_eq!(bad.len(), 1, "one line for the bad settlement:\n{stdout}");
    assert_eq!(bad[0]["fields"]["status"], 400);
    assert_eq!(
        bad[0]["fields"]["detail"], "invalid_argument: amount must be an integer",
        "{stdout}"
    );
    assert!(!stdout.contains("sevensecret"), "a value was logged");
    assert!(!output.contains("req-ok-3"), "a success was logged");
    assert!(!output.contains("req-denied-5"), "a denial was logged");
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["fields"]["message"] == "request failed")
            .count(),
        5,
        "{stdout}"
    );
    for secret in [
        ACCOUNT,
        WRONG_TOKEN,
        common::ADMIN_TOKEN,
        common::SERVICE_TOKEN,
    ] {
        assert!(
            !output.contains(secret),
            "{secret} appears in the logs:\n{output}"
        );
    }
}

/// Forward-auth's 5xx answers are logged, its 4xx denials are not, whatever the wire
/// status: nginx mode answers a 503 `unavailable` as 403 (auth_request honours no other
/// denial), and the log decided by that 403 and skipped it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_auth_5xx_answers_are_logged_also_in_nginx_mode() {
    let mut redis = common::RedisServer::start();
    let mut running = Running::start("nginx5xx", PRICED, &redis).await;
    let mut admin = running.admin();
    admin.grant(grant(10, "g1")).await.expect("grant");
    let api_key = admin
        .create_api_key(pb::CreateApiKeyRequest {
            account_id: ACCOUNT.into(),
            name: "test".into(),
            ..Default::default()
        })
        .await
        .expect("create key")
        .into_inner()
        .api_key;
    let check = |mode: &str, request_id: &str| {
        format!(
            "GET /v1/forward-auth{mode} HTTP/1.1\r\nHost: x\r\nx-request-id: {request_id}\r\n\
             x-original-method: POST\r\nx-original-uri: /v1/charged\r\n\
             x-api-key: {api_key}\r\nConnection: close\r\n\r\n"
        )
    };
    // A denial (no route) in nginx mode: 403, not logged.
    let status = raw_http(
        running.http_addr,
        &check("?mode=nginx", "req-denied-1").replace("/v1/charged", "/v1/free"),
    )
    .await;
    assert_eq!(status, 403);
    // Redis gone, the operation fail_closed: 503 (nginx mode: 403 saying 503). Both are
    // logged as the 503 they are.
    redis.kill();
    let status = raw_http(running.http_addr, &check("", "req-plain-503")).await;
    assert_eq!(status, 503);
    let status = raw_http(running.http_addr, &check("?mode=nginx", "req-nginx-503")).await;
    assert_eq!(status, 403);

    let (stdout, output) = running.stop();
    let lines = json_lines(&stdout);
    for id in ["req-plain-503", "req-nginx-503"] {
        let found = with_id(&lines, id);
        assert_eq!(found.len(), 1, "one line for {id}:\n{stdout}");
        let fields = &found[0]["fields"];
        assert_eq!(fields["message"], "request failed", "{fields}");
        assert_eq!(fields["protocol"], "http", "{fields}");
        assert_eq!(fields["path"], "/v1/forward-auth", "{fields}");
        assert_eq!(fields["status"], 503, "{fields}");
        assert_eq!(found[0]["level"], "WARN", "{fields}");
    }
    assert!(!output.contains("req-denied-1"), "a denial was logged");
    for secret in [ACCOUNT, api_key.as_str(), common::ADMIN_TOKEN] {
        assert!(
            !output.contains(secret),
            "{secret} appears in the logs:\n{output}"
        );
    }
}

/// Sends one raw HTTP/1.1 request; returns the answer's status.
async fn raw_http(addr: std::net::SocketAddr, request: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("http connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut text = String::new();
    s.read_to_string(&mut text).await.expect("read");
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code")
}

/// An Envoy that goes away (a restart, a shutdown) breaks its access-log stream off
/// mid-stream: that is the stream's end, not a server failure. The entries it sent are
/// settled; no `request failed` line, no `tollgate_grpc_failed_requests_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_access_log_stream_that_breaks_off_is_its_end_not_a_failure() {
    use envoy_types::pb::envoy::config::core::v3::Metadata;
    use envoy_types::pb::envoy::data::accesslog::v3::{
        AccessLogCommon, HttpAccessLogEntry, HttpResponseProperties,
    };
    use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_client::AccessLogServiceClient;
    use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::{
        HttpAccessLogEntries, LogEntries,
    };
    use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
    use envoy_types::pb::google::protobuf::UInt32Value;

    let redis = common::RedisServer::start();
    let mut running = Running::start("accesslog", "", &redis).await;
    let mut metering = running.metering();
    running.admin().grant(grant(10, "g1")).await.expect("grant");
    let hold = metering
        .authorize(pb::AuthorizeRequest {
            account_id: ACCOUNT.into(),
            amount: 4,
            ttl_ms: 3_600_000,
            idempotency_key: "a1".into(),
            ..Default::default()
        })
        .await
        .expect("authorize")
        .into_inner()
        .hold_id;

    // "Envoy": a stream through a TCP proxy, one entry that captures the hold (a 200
    // without an operation captures all of it), the stream left open.
    let proxy = common::proxy::FaultProxy::start(running.grpc_addr).await;
    let channel = Channel::from_shared(format!("http://{}", proxy.addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect through the proxy");
    let metadata = tollgate::gateway::access_log::hold_metadata(&tollgate::gateway::Allowed {
        hold_id: Some(hold),
        charged: 4,
        ..Default::default()
    })
    .expect("metadata");
    let entry = HttpAccessLogEntry {
        common_properties: Some(AccessLogCommon {
            metadata: Some(Metadata {
                filter_metadata: std::collections::HashMap::from([(
                    tollgate::gateway::access_log::EXT_AUTHZ_NAMESPACE.to_owned(),
                    metadata,
                )]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        response: Some(HttpResponseProperties {
            response_code: Some(UInt32Value { value: 200 }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let (send, receive) = tokio::sync::mpsc::channel(1);
    send.send(StreamAccessLogsMessage {
        identifier: None,
        log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries {
            log_entry: vec![entry],
        })),
    })
    .await
    .expect("queue the entry");
    let stream = tokio::spawn(async move {
        AccessLogServiceClient::new(channel)
            .stream_access_logs(tokio_stream::wrappers::ReceiverStream::new(receive))
            .await
    });
    let held = || {
        let mut metering = metering.clone();
        async move {
            let wallets = metering
                .get_balance(pb::GetBalanceRequest {
                    account_id: ACCOUNT.into(),
                    ..Default::default()
                })
                .await
                .expect("balance")
                .into_inner()
                .wallets;
            wallets.first().map(|w| (w.available, w.held, w.total_used))
        }
    };
    common::eventually(
        Duration::from_secs(30),
        "the entry to capture the hold",
        || async { (held().await == Some((6, 0, 4))).then_some(()) },
    )
    .await;

    // Envoy goes away: the connection is cut under the open stream.
    proxy.cut();
    let out_path = running.out_path.clone();
    // The server's word on the stream's end: the line it logs now, or (before this was
    // fixed) the failed request's line naming the method.
    let lines = common::eventually(
        Duration::from_secs(30),
        "a log line about the broken stream",
        || {
            let out_path = out_path.clone();
            async move {
                let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
                (stdout.contains("broke off") || stdout.contains("StreamAccessLogs"))
                    .then_some(stdout)
            }
        },
    )
    .await;
    drop(send);
    let _ = tokio::time::timeout(Duration::from_secs(30), stream).await;
    let (_, metrics) = common::http_get(running.http_addr, "/metrics").await;
    assert_eq!(
        common::prom::value(&metrics, "tollgate_grpc_failed_requests_total", &[]),
        0.0,
        "{metrics}"
    );
    let (stdout, output) = running.stop();
    let broke_off: Vec<serde_json::Value> = json_lines(&stdout)
        .into_iter()
        .filter(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("broke off"))
        })
        .collect();
    assert_eq!(broke_off.len(), 1, "{lines}");
    assert_eq!(broke_off[0]["level"], "INFO", "{lines}");
    assert!(
        !stdout.contains("request failed"),
        "the broken stream was logged as a failure:\n{stdout}"
    );
    assert!(!output.contains(ACCOUNT), "the account id was logged");
}

/// A priced route whose operation is refused while Redis is away (`fail_closed`).
const PRICED: &str = r#"
[pricebook]
default = "deny"

[[pricebook.routes]]
method = "POST"
path = "/v1/charged"
operation = "charged"

[pricebook.operations.charged]
mode = "debit"
base = 1
fail_policy = "fail_closed"
"#;

/// Requests of a flood: as many as a busy gateway sends in well under a second.
const FLOOD: usize = 200;
/// Requests of a flood in flight at once.
const FLOOD_CONCURRENCY: usize = 20;

/// The lines whose message is `message`.
fn with_message<'a>(lines: &'a [serde_json::Value], message: &str) -> Vec<&'a serde_json::Value> {
    lines
        .iter()
        .filter(|l| l["fields"]["message"] == message)
        .collect()
}

/// Waits (generously) until the health watcher logged `message` about `check`.
async fn wait_for_check_line(running: &Running, message: &'static str, check: &'static str) {
    let out_path = running.out_path.clone();
    common::eventually(
        Duration::from_secs(60),
        &format!("a {message:?} line about {check}"),
        || {
            let out_path = out_path.clone();
            async move {
                let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
                stdout
                    .lines()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .any(|l| l["fields"]["message"] == message && l["fields"]["check"] == check)
                    .then_some(())
            }
        },
    )
    .await;
}

/// Sends `count` forward-auth checks of POST /v1/charged with `api_key`,
/// [`FLOOD_CONCURRENCY`] at a time; their statuses.
async fn forward_auth_flood(addr: std::net::SocketAddr, api_key: &str, count: usize) -> Vec<u16> {
    let mut statuses = Vec::with_capacity(count);
    let mut sent = 0;
    while sent < count {
        let mut batch = tokio::task::JoinSet::new();
        for i in sent..count.min(sent + FLOOD_CONCURRENCY) {
            let request = format!(
                "GET /v1/forward-auth HTTP/1.1\r\nHost: x\r\nx-request-id: req-flood-{i}\r\n\
                 x-original-method: POST\r\nx-original-uri: /v1/charged\r\n\
                 x-api-key: {api_key}\r\nConnection: close\r\n\r\n"
            );
            batch.spawn(async move { raw_http(addr, &request).await });
        }
        sent = count.min(sent + FLOOD_CONCURRENCY);
        while let Some(status) = batch.join_next().await {
            statuses.push(status.expect("a flood request's task"));
        }
    }
    statuses
}

/// The most lines one throttled call site may write over `elapsed`: its budget for each
/// window the time spans, plus one for a window begun before.
fn throttled_lines_max(elapsed: Duration) -> usize {
    use tollgate::telemetry::throttle::{LINES_PER_SITE_MAX, THROTTLE_INTERVAL};
    let windows = elapsed.as_secs_f64() / THROTTLE_INTERVAL.as_secs_f64();
    LINES_PER_SITE_MAX as usize * (windows.ceil() as usize + 1)
}

/// The failed requests the request log told of: its lines, and the counts of those it
/// left out.
fn request_failures_told(lines: &[serde_json::Value]) -> u64 {
    lines
        .iter()
        .map(|l| {
            let fields = &l["fields"];
            let suppressed = fields["suppressed"].as_u64().unwrap_or(0);
            if fields["message"] == "request failed" {
                1 + suppressed
            } else if fields["message"] == "log lines left out"
                && fields["site"]
                    .as_str()
                    .is_some_and(|s| s.contains("request_log"))
            {
                suppressed
            } else {
                0
            }
        })
        .sum()
}

/// Redis killed under a flood of checks and API calls, then restarted: the outage is one
/// WARN line when the health watcher sees it (what failed, that the pod stays ready) and
/// one INFO line when Redis answers again, and the per-request lines (`request failed`,
/// `charge: redis unavailable`, …) stay within their sites' budgets, the ones left out
/// counted as `suppressed`. Every line is JSON; the startup line says the version, the
/// addresses, the Redis and the store without credentials and the shard count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_is_logged_once_each_way_and_its_failed_requests_are_throttled() {
    let mut redis = common::RedisServer::start();
    let mut running = Running::start("outage", PRICED, &redis).await;
    let mut admin = running.admin();
    admin.grant(grant(1_000, "g1")).await.expect("grant");
    let api_key = admin
        .create_api_key(pb::CreateApiKeyRequest {
            account_id: ACCOUNT.into(),
            name: "test".into(),
            ..Default::default()
        })
        .await
        .expect("create key")
        .into_inner()
        .api_key;

    redis.kill();
    let flood_started = std::time::Instant::now();
    let statuses = forward_auth_flood(running.http_addr, &api_key, FLOOD).await;
    assert!(statuses.iter().all(|s| *s == 503), "{statuses:?}");
    let mut debits = tokio::task::JoinSet::new();
    for i in 0..FLOOD {
        let mut metering = running.metering();
        debits.spawn(async move {
            metering
                .debit(pb::DebitRequest {
                    account_id: ACCOUNT.into(),
                    amount: 1,
                    idempotency_key: format!("d{i}"),
                    ..Default::default()
                })
                .await
        });
        if debits.len() >= FLOOD_CONCURRENCY {
            let answer = debits.join_next().await.expect("a debit").expect("task");
            assert_eq!(
                answer.expect_err("redis is down").code(),
                tonic::Code::Unavailable
            );
        }
    }
    while let Some(answer) = debits.join_next().await {
        let answer = answer.expect("task");
        assert_eq!(
            answer.expect_err("redis is down").code(),
            tonic::Code::Unavailable
        );
    }
    let flood_took = flood_started.elapsed();
    wait_for_check_line(&running, "health check failing", "redis").await;
    redis.restart();
    wait_for_check_line(&running, "health check passes again", "redis").await;
    // Every failed request is accounted for: its own line, or a count on a later line of
    // its site (the next one, or `log lines left out` once its window is over).
    let out_path = running.out_path.clone();
    common::eventually(
        Duration::from_secs(60),
        "every failed request logged or counted",
        || {
            let out_path = out_path.clone();
            async move {
                let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
                let lines: Vec<serde_json::Value> = stdout
                    .lines()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect();
                (request_failures_told(&lines) == 2 * FLOOD as u64).then_some(())
            }
        },
    )
    .await;

    let (stdout, output) = running.stop();
    // Every line is a JSON object with the same top-level fields.
    let lines = json_lines(&stdout);
    for line in &lines {
        for field in ["timestamp", "level", "target"] {
            assert!(line[field].is_string(), "no {field}: {line}");
        }
        assert!(line["fields"]["message"].is_string(), "no message: {line}");
    }
    let serving = with_message(&lines, "serving");
    assert_eq!(serving.len(), 1, "{stdout}");
    let fields = &serving[0]["fields"];
    assert_eq!(fields["version"], env!("CARGO_PKG_VERSION"), "{fields}");
    assert_eq!(fields["grpc"], running.grpc_addr.to_string(), "{fields}");
    assert_eq!(fields["http"], running.http_addr.to_string(), "{fields}");
    assert_eq!(fields["redis"], redis.url(), "{fields}");
    assert!(
        fields["store"]
            .as_str()
            .is_some_and(|s| s.starts_with("sqlite://")),
        "{fields}"
    );
    assert_eq!(fields["shards"], 16, "{fields}");

    // The outage: one line as it starts, one as it ends.
    let about_redis = |message: &str| -> Vec<&serde_json::Value> {
        with_message(&lines, message)
            .into_iter()
            .filter(|l| l["fields"]["check"] == "redis")
            .collect()
    };
    let failing = about_redis("health check failing");
    assert_eq!(failing.len(), 1, "{stdout}");
    assert_eq!(failing[0]["level"], "WARN", "{stdout}");
    assert_eq!(failing[0]["fields"]["effect"], "degraded", "{stdout}");
    assert_eq!(failing[0]["fields"]["ready"], true, "{stdout}");
    assert!(
        failing[0]["fields"]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("unavailable")),
        "{stdout}"
    );
    let again = about_redis("health check passes again");
    assert_eq!(again.len(), 1, "{stdout}");
    assert_eq!(again[0]["level"], "INFO", "{stdout}");
    assert!(again[0]["fields"]["failed_for_ms"].is_u64(), "{stdout}");

    // The per-request lines: within budget, the rest counted.
    let max = throttled_lines_max(flood_took);
    assert!(
        max < FLOOD,
        "the flood took too long to tell ({flood_took:?})"
    );
    for message in [
        "charge: redis unavailable",
        "identity lookup: redis unavailable",
        "redis unavailable",
    ] {
        let found = with_message(&lines, message);
        assert!(
            found.len() <= max,
            "{} {message:?} lines (at most {max})",
            found.len()
        );
    }
    let failed = with_message(&lines, "request failed");
    let (grpc, http): (Vec<&serde_json::Value>, Vec<&serde_json::Value>) = failed
        .into_iter()
        .partition(|l| l["fields"]["protocol"] == "grpc");
    for (protocol, found) in [("grpc", &grpc), ("http", &http)] {
        assert!(!found.is_empty(), "no {protocol} request failed line");
        assert!(
            found.len() <= max,
            "{} {protocol} request failed lines (at most {max})",
            found.len()
        );
    }
    for secret in [
        ACCOUNT,
        api_key.as_str(),
        common::ADMIN_TOKEN,
        common::SERVICE_TOKEN,
    ] {
        assert!(
            !output.contains(secret),
            "{secret} appears in the logs:\n{output}"
        );
    }
}

/// `serve` stopping on an error (here its gRPC port taken) says why in its log, as an
/// ERROR JSON line, not only as plain text on stderr where a pipeline reading the JSON
/// log does not look.
#[test]
fn a_fatal_error_is_logged_not_only_printed() {
    let redis = common::RedisServer::start();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_addr = taken.local_addr().expect("addr");
    let output = common::output_within(
        common::tollgate()
            .arg("serve")
            .arg(format!("--grpc-addr={taken_addr}"))
            .arg(format!("--http-addr=127.0.0.1:{}", common::free_port()))
            .env("TOLLGATE_REDIS_URL", redis.url())
            .env("TOLLGATE_ADMIN_TOKEN", common::ADMIN_TOKEN)
            .env("TOLLGATE_SERVICE_TOKEN", common::SERVICE_TOKEN)
            .env("TOLLGATE_STORE__URL", common::temp_sqlite_url())
            .env("TOLLGATE_LOG__FORMAT", "json")
            .env("TOLLGATE_LOG__LEVEL", "info")
            .env_remove("RUST_LOG"),
        Duration::from_secs(60),
    );
    assert!(!output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    let lines = json_lines(&stdout);
    let stopped = with_message(&lines, "stopped");
    assert_eq!(stopped.len(), 1, "{stdout}");
    assert_eq!(stopped[0]["level"], "ERROR", "{stdout}");
    assert!(
        stopped[0]["fields"]["error"]
            .as_str()
            .is_some_and(|e| e.contains(&taken_addr.to_string())),
        "{stdout}"
    );
    drop(taken);
}

/// The store (PostgreSQL) unreachable while charges are settled, then back: one WARN line
/// when the settler's failed write shows in readiness (`store`, degraded), one INFO line
/// when it writes again; the password in the store URL appears nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_is_logged_once_each_way_without_the_password() {
    const PASSWORD: &str = "pw-secret-5521";
    let redis = common::RedisServer::start();
    let db = common::PgDatabase::create().await;
    let name = db
        .url
        .rsplit('/')
        .next()
        .expect("a database name")
        .to_owned();
    let proxy = common::proxy::FaultProxy::start("127.0.0.1:5432".parse().expect("addr")).await;
    // The test server trusts local connections: the password only has to stay unlogged.
    let store_url = format!("postgres://postgres:{PASSWORD}@{}/{name}", proxy.addr);
    let mut running = Running::start_with_env(
        "store",
        "",
        &redis,
        &[("TOLLGATE_STORE__URL", store_url.as_str())],
    )
    .await;
    let mut admin = running.admin();
    admin.grant(grant(5, "g1")).await.expect("grant");

    proxy.cut();
    admin
        .grant(grant(5, "g2"))
        .await
        .expect("a grant needs no store");
    wait_for_check_line(&running, "health check failing", "store").await;
    proxy.restore();
    wait_for_check_line(&running, "health check passes again", "store").await;

    let (stdout, output) = running.stop();
    let lines = json_lines(&stdout);
    let about_store = |message: &str| -> Vec<&serde_json::Value> {
        with_message(&lines, message)
            .into_iter()
            .filter(|l| l["fields"]["check"] == "store")
            .collect()
    };
    let failing = about_store("health check failing");
    assert_eq!(failing.len(), 1, "{stdout}");
    assert_eq!(failing[0]["level"], "WARN", "{stdout}");
    assert_eq!(failing[0]["fields"]["effect"], "degraded", "{stdout}");
    assert_eq!(
        about_store("health check passes again").len(),
        1,
        "{stdout}"
    );
    let serving = with_message(&lines, "serving");
    assert_eq!(
        serving[0]["fields"]["store"],
        format!("postgres://{}/{name}", proxy.addr),
        "{stdout}"
    );
    for secret in [PASSWORD, ACCOUNT, common::ADMIN_TOKEN] {
        assert!(
            !output.contains(secret),
            "{secret} appears in the logs:\n{output}"
        );
    }
}

/// A flood of bad credentials: forward-auth checks with an unknown API key are answers
/// (401), not logged at all (the denial metrics count them); gRPC calls with a wrong token
/// are a client's mistake, one INFO line each (not throttled: the request's trail), and
/// no credential reaches the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_api_keys_log_nothing_and_bad_tokens_a_client_line_each() {
    const BAD_KEY: &str = "tg_bad-key-4471";
    let redis = common::RedisServer::start();
    let mut running = Running::start("badkeys", PRICED, &redis).await;
    let statuses = forward_auth_flood(running.http_addr, BAD_KEY, FLOOD).await;
    assert!(statuses.iter().all(|s| *s == 401), "{statuses:?}");
    let mut intruder = pb::admin_client::AdminClient::with_interceptor(
        running.channel.clone(),
        common::auth(Some(WRONG_TOKEN)),
    );
    for i in 0..FLOOD {
        let denied = intruder
            .grant(grant(1, &format!("g{i}")))
            .await
            .expect_err("bad token");
        assert_eq!(denied.code(), tonic::Code::Unauthenticated);
    }
    let out_path = running.out_path.clone();
    common::eventually(
        Duration::from_secs(60),
        "every failed request logged or counted",
        || {
            let out_path = out_path.clone();
            async move {
                let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
                let lines: Vec<serde_json::Value> = stdout
                    .lines()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect();
                (request_failures_told(&lines) == FLOOD as u64).then_some(())
            }
        },
    )
    .await;
    let (stdout, output) = running.stop();
    let lines = json_lines(&stdout);
    // A client's failed request keeps its own line (its request id is the trail support
    // follows): only server faults are throttled.
    let failed = with_message(&lines, "request failed");
    assert_eq!(failed.len(), FLOOD, "one line per failed request");
    for line in &failed {
        assert_eq!(line["level"], "INFO", "{line}");
        assert_eq!(line["fields"]["code"], "UNAUTHENTICATED", "{line}");
        assert!(line["fields"].get("suppressed").is_none(), "{line}");
    }
    assert!(
        !output.contains("req-flood-"),
        "a forward-auth denial was logged"
    );
    for secret in [BAD_KEY, WRONG_TOKEN, common::ADMIN_TOKEN] {
        assert!(
            !output.contains(secret),
            "{secret} appears in the logs:\n{output}"
        );
    }
}
