//! Logs of the real binary (`tollgate serve`, JSON format): one line per failed request
//! carrying its request id (the caller's `x-request-id`, or a generated one returned to
//! the caller), nothing for requests that succeed, and no tokens, API keys or account ids
//! anywhere in the output.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic::transport::Channel;

use tollgate::api::pb;

const ACCOUNT: &str = "acct-private-7781";
const WRONG_TOKEN: &str = "wrong-token-9931";

/// SIGTERM on drop, then SIGKILL.
struct Serve(Child);

impl Serve {
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.stop();
    }
}

fn with_request_id<T>(message: T, id: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("x-request-id", id.parse().expect("ascii"));
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_line_per_failed_request_with_its_id_and_no_secrets() {
    let redis = common::RedisServer::start();
    let dir = std::env::temp_dir().join(format!("tollgate-logs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("empty.toml");
    std::fs::write(&config, "").expect("config");
    let out_path = dir.join("stdout.log");
    let err_path = dir.join("stderr.log");
    let grpc_port = common::free_port();
    let http_port = common::free_port();
    let mut serve = Serve(
        common::tollgate()
            .args(["serve", "--config"])
            .arg(&config)
            .arg(format!("--grpc-addr=127.0.0.1:{grpc_port}"))
            .arg(format!("--http-addr=127.0.0.1:{http_port}"))
            .env("TOLLGATE_REDIS_URL", redis.url())
            .env("TOLLGATE_ADMIN_TOKEN", common::ADMIN_TOKEN)
            .env("TOLLGATE_SERVICE_TOKEN", common::SERVICE_TOKEN)
            .env("TOLLGATE_STORE__URL", common::temp_sqlite_url())
            .env("TOLLGATE_LOG__FORMAT", "json")
            .env("TOLLGATE_LOG__LEVEL", "info")
            .env_remove("RUST_LOG")
            .stdout(Stdio::from(std::fs::File::create(&out_path).expect("out")))
            .stderr(Stdio::from(std::fs::File::create(&err_path).expect("err")))
            .spawn()
            .expect("start tollgate serve"),
    );
    let channel = common::eventually(common::START_TIMEOUT, "the gRPC port", || async {
        Channel::from_shared(format!("http://127.0.0.1:{grpc_port}"))
            .expect("uri")
            .connect()
            .await
            .ok()
    })
    .await;
    let mut metering = pb::metering_client::MeteringClient::with_interceptor(
        channel.clone(),
        common::auth(Some(common::SERVICE_TOKEN)),
    );
    let mut admin = pb::admin_client::AdminClient::with_interceptor(
        channel.clone(),
        common::auth(Some(common::ADMIN_TOKEN)),
    );
    let mut intruder =
        pb::admin_client::AdminClient::with_interceptor(channel, common::auth(Some(WRONG_TOKEN)));

    // Succeeds: no line.
    admin
        .grant(with_request_id(
            pb::GrantRequest {
                account_id: ACCOUNT.into(),
                amount: 3,
                idempotency_key: "g1".into(),
                ..Default::default()
            },
            "req-ok-3",
        ))
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
        .grant(with_request_id(
            pb::GrantRequest {
                account_id: ACCOUNT.into(),
                amount: 1,
                idempotency_key: "g2".into(),
                ..Default::default()
            },
            "req-badtoken-2",
        ))
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
    let (code, _) = common::http_get(
        format!("127.0.0.1:{http_port}").parse().expect("addr"),
        "/healthz",
    )
    .await;
    assert_eq!(code, 200);
    // HTTP hold settlement without a token: one line. A forward-auth denial is an answer
    // (as an ext_authz Check's denial is a gRPC OK): none.
    let http_addr: std::net::SocketAddr = format!("127.0.0.1:{http_port}").parse().expect("addr");
    let status = raw_http(
        http_addr,
        "POST /v1/holds/h0-1/capture HTTP/1.1\r\nHost: x\r\nx-request-id: req-http-hold-4\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 401);
    let status = raw_http(
        http_addr,
        "GET /v1/forward-auth HTTP/1.1\r\nHost: x\r\nx-request-id: req-denied-5\r\n\
         Connection: close\r\n\r\n",
    )
    .await;
    assert!((400..500).contains(&status), "{status}");

    serve.stop();
    let stdout = std::fs::read_to_string(&out_path).expect("stdout");
    let stderr = std::fs::read_to_string(&err_path).expect("stderr");
    let output = format!("{stdout}{stderr}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let with_id = |id: &str| -> Vec<&serde_json::Value> {
        lines
            .iter()
            .filter(|l| l["fields"]["request_id"] == id)
            .collect()
    };
    let one = |id: &str, code: &str, path: &str| {
        let found = with_id(id);
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
    let http = with_id("req-http-hold-4");
    assert_eq!(http.len(), 1, "one line for the HTTP failure:\n{stdout}");
    assert_eq!(http[0]["fields"]["protocol"], "http");
    assert_eq!(http[0]["fields"]["status"], 401);
    assert_eq!(http[0]["fields"]["path"], "/v1/holds/h0-1/capture");
    assert!(!output.contains("req-ok-3"), "a success was logged");
    assert!(!output.contains("req-denied-5"), "a denial was logged");
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["fields"]["message"] == "request failed")
            .count(),
        4,
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
    let _ = std::fs::remove_dir_all(&dir);
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
