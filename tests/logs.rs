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
    let config = r#"
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
    let mut running = Running::start("nginx5xx", config, &redis).await;
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
