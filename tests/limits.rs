//! The listeners' bounds (docs/ARCHITECTURE.md, "Listener limits"), seen from a client:
//!
//! - HTTP port: a client that never finishes its headers, or stays idle on a kept-alive
//!   connection, is disconnected; a request head past `server.http_header_bytes_max` is
//!   answered 431; HTTP/2 is not spoken; past `server.http_connections_max` a connection
//!   waits for a free one; a hold settlement is refused before its body is read when the
//!   caller has no token or declares a body past 4 KiB.
//! - gRPC port: a Check larger than `server.grpc_check_message_bytes_max` is refused by
//!   its declared length; SETTINGS advertise the stream cap; past
//!   `server.grpc_connections_max` a connection waits for a free one; a unary call that stalls is
//!   ended at its deadline while the access-log stream and a health `Watch` on the same
//!   connection stay open.
//!
//! Every wait is bounded generously (a busy 2-core machine); nothing asserts a duration
//! except that a connection is NOT served while the cap holds (a negative, which a slow
//! machine cannot make fail).

mod common;

use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_client::AccessLogServiceClient;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::{
    HttpAccessLogEntries, Identifier, LogEntries,
};
use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use tollgate::ledger::Clock;

/// Far past every bound under test (the header read timeout is 5 s, a settlement body's 10 s).
const CLOSE_DEADLINE: Duration = Duration::from_secs(20);
/// The gRPC unary deadline (`transport::GRPC_UNARY_TIMEOUT`) and then some.
const UNARY_DEADLINE_GUARD: Duration = Duration::from_secs(90);

async fn server() -> (common::RedisServer, common::TestServer) {
    let redis = common::RedisServer::start();
    let server = common::TestServer::start(common::test_config(&redis.url()), Clock::Redis).await;
    (redis, server)
}

/// Reads until the server closes the connection (EOF or a reset); what it sent. Panics
/// if it is still open after [`CLOSE_DEADLINE`].
async fn read_until_closed(stream: &mut TcpStream, what: &str) -> Vec<u8> {
    let mut got = Vec::new();
    let closed = tokio::time::timeout(CLOSE_DEADLINE, async {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "{what}: the connection is still open after {CLOSE_DEADLINE:?} (sent back: {:?})",
        String::from_utf8_lossy(&got)
    );
    got
}

/// Reads one response head (up to the blank line); its status code.
async fn read_status(stream: &mut TcpStream, what: &str) -> (u16, String) {
    let mut got = Vec::new();
    let read = tokio::time::timeout(CLOSE_DEADLINE, async {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                return Some(end);
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&got).into_owned();
    match read {
        Err(_) => panic!("{what}: no answer within {CLOSE_DEADLINE:?}"),
        Ok(None) => panic!("{what}: closed without an answer: {text:?}"),
        Ok(Some(_)) => {}
    }
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{what}: not an HTTP answer: {text:?}"));
    (code, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_headers_or_stays_idle_is_disconnected() {
    let (_redis, server) = server().await;
    // Slowloris: a request line and part of the headers, then nothing.
    let mut slow = TcpStream::connect(server.http_addr).await.expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: a")
        .await
        .expect("write");
    let sent_back = read_until_closed(&mut slow, "unfinished headers").await;
    // hyper answers 408 when it can, or just closes.
    assert!(
        sent_back.is_empty() || sent_back.starts_with(b"HTTP/1.1 408"),
        "{:?}",
        String::from_utf8_lossy(&sent_back)
    );

    // A kept-alive connection that sends nothing after its answer is closed as well.
    let mut idle = TcpStream::connect(server.http_addr).await.expect("connect");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let (code, _) = read_status(&mut idle, "a kept-alive GET").await;
    assert_eq!(code, 200);
    read_until_closed(&mut idle, "an idle kept-alive connection").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_past_the_bound_is_refused_and_http2_is_not_spoken() {
    let (_redis, server) = server().await;
    // What nginx or Envoy forward fits (32 KiB of one header)...
    let mut fits = TcpStream::connect(server.http_addr).await.expect("connect");
    let header = "a".repeat(32 * 1024);
    fits.write_all(
        format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {header}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("write");
    assert_eq!(read_status(&mut fits, "32 KiB of headers").await.0, 200);
    // ... 100 KiB does not (the default bound is 64 KiB; hyper's own ~400 KiB).
    let mut big = TcpStream::connect(server.http_addr).await.expect("connect");
    let header = "a".repeat(100 * 1024);
    // The server may answer and close before it has read everything: a failed write is
    // fine, the answer is what counts.
    let _ = big
        .write_all(
            format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {header}\r\n\r\n").as_bytes(),
        )
        .await;
    assert_eq!(read_status(&mut big, "100 KiB of headers").await.0, 431);

    // HTTP/2 with prior knowledge: no HTTP/2 SETTINGS frame comes back, the connection
    // is closed (it used to be served, 200 streams a connection).
    let mut h2 = TcpStream::connect(server.http_addr).await.expect("connect");
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .expect("write");
    let sent_back = read_until_closed(&mut h2, "an HTTP/2 preface").await;
    assert!(
        sent_back.is_empty() || sent_back.starts_with(b"HTTP/1.1 "),
        "HTTP/2 spoken: {sent_back:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_past_the_cap_waits_for_a_free_one() {
    let redis = common::RedisServer::start();
    let mut config = common::test_config(&redis.url());
    config.server.http_connections_max = 4;
    let server = common::TestServer::start(config, Clock::Redis).await;
    // Four connections each held by a settlement whose body never comes (the body has 10 s
    // to arrive, the header timeout no longer applies).
    let mut held = Vec::new();
    for n in 0..4 {
        let mut s = TcpStream::connect(server.http_addr).await.expect("connect");
        s.write_all(
            format!(
                "POST /v1/holds/h0-{n}/capture HTTP/1.1\r\nHost: x\r\n\
                 Authorization: Bearer {}\r\nContent-Length: 100\r\n\r\n",
                common::SERVICE_TOKEN
            )
            .as_bytes(),
        )
        .await
        .expect("write");
        held.push(s);
    }
    // Give the server time to take them (it accepts while it has permits).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut fifth = TcpStream::connect(server.http_addr).await.expect("connect");
    fifth
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_secs(1), fifth.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "a fifth connection was served while four held every permit: {early:?}"
    );
    // One held connection goes: the fifth is served.
    drop(held.pop());
    assert_eq!(read_status(&mut fifth, "the fifth connection").await.0, 200);
    drop(held);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settlement_body_is_not_read_without_a_token_nor_past_its_bound() {
    let (_redis, server) = server().await;
    let settle = |auth: bool, head: &str| {
        let auth = if auth {
            format!("Authorization: Bearer {}\r\n", common::SERVICE_TOKEN)
        } else {
            String::new()
        };
        format!("POST /v1/holds/h0-1/capture HTTP/1.1\r\nHost: x\r\n{auth}{head}\r\n")
    };
    // 3 MB declared, none sent: answered at once, without waiting for the body.
    let mut anonymous = TcpStream::connect(server.http_addr).await.expect("connect");
    anonymous
        .write_all(settle(false, "Content-Length: 3000000\r\nConnection: close\r\n").as_bytes())
        .await
        .expect("write");
    let (code, text) = read_status(&mut anonymous, "an unauthenticated 3 MB settlement").await;
    assert_eq!(code, 401, "{text}");

    let mut declared = TcpStream::connect(server.http_addr).await.expect("connect");
    declared
        .write_all(settle(true, "Content-Length: 3000000\r\nConnection: close\r\n").as_bytes())
        .await
        .expect("write");
    let answer = read_until_closed(&mut declared, "an authenticated 3 MB settlement").await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    assert!(
        answer.contains("payload_too_large") && answer.contains("\"field\":\"body\""),
        "{answer}"
    );

    // Chunked (no length declared): refused once the bound is passed.
    let chunk = "a".repeat(5000);
    let mut chunked = TcpStream::connect(server.http_addr).await.expect("connect");
    let request = format!(
        "{}{:x}\r\n{chunk}\r\n0\r\n\r\n",
        settle(true, "Transfer-Encoding: chunked\r\nConnection: close\r\n"),
        chunk.len()
    );
    let _ = chunked.write_all(request.as_bytes()).await;
    let (code, text) = read_status(&mut chunked, "a chunked 5,000-byte settlement").await;
    assert_eq!(code, 413, "{text}");
    server.stop().await;
}

fn check_request(path: &str, headers: &[(&str, String)]) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "GET".into(),
                    path: path.into(),
                    host: "api.example.com".into(),
                    headers: headers
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), v.clone()))
                        .collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_past_its_bound_is_refused_and_an_envoy_sized_one_is_not() {
    let (_redis, server) = server().await;
    let mut client = AuthorizationClient::new(server.channel().await);
    // Envoy's own limit is 60 KiB of headers; the path comes twice (a header and a field).
    let path = format!("/{}", "p".repeat(59 * 1024));
    client
        .check(check_request(
            &path,
            &[(":path", path.clone()), ("x-pad", "v".repeat(1024))],
        ))
        .await
        .expect("a Check as large as Envoy sends is answered");
    // 1 MiB of headers (tonic's default bound is 4 MiB): refused by its declared length,
    // with tonic's code for it (OUT_OF_RANGE; Envoy applies its status_on_error).
    let status = client
        .check(check_request("/", &[("x-big", "b".repeat(1024 * 1024))]))
        .await
        .expect_err("a 1 MiB Check");
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    // The connection still serves.
    client
        .check(check_request("/", &[]))
        .await
        .expect("a small Check after the refused one");
    server.stop().await;
}

/// Sends a gRPC health Check (an empty request) on a raw HTTP/2 connection; its answer.
fn health_check(client: &mut h2::client::SendRequest<bytes::Bytes>) -> h2::client::ResponseFuture {
    let request = http::Request::post("/grpc.health.v1.Health/Check")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let (answer, mut body) = client.send_request(request, false).expect("send");
    body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .expect("an empty HealthCheckRequest");
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_port_advertises_its_stream_cap() {
    let (_redis, server) = server().await;
    let tcp = TcpStream::connect(server.grpc_addr).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(connection);
    // One call answered: the server's SETTINGS came before it.
    let mut client = client.ready().await.expect("ready");
    let answer = health_check(&mut client);
    let answer = tokio::time::timeout(CLOSE_DEADLINE, answer)
        .await
        .expect("answered")
        .expect("a response");
    assert_eq!(answer.status(), 200);
    assert_eq!(
        client.current_max_send_streams(),
        tollgate::transport::GRPC_STREAMS_PER_CONNECTION_MAX as usize
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_connection_past_the_cap_waits_for_a_free_one() {
    let redis = common::RedisServer::start();
    let mut config = common::test_config(&redis.url());
    config.server.grpc_connections_max = 2;
    let server = common::TestServer::start(config, Clock::Redis).await;
    // Two connections that never say a word hold both permits.
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(TcpStream::connect(server.grpc_addr).await.expect("connect"));
    }
    // Give the server time to take them (it accepts while it has permits).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tcp = TcpStream::connect(server.grpc_addr).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(connection);
    let mut client = client.ready().await.expect("ready");
    let answer = health_check(&mut client);
    tokio::pin!(answer);
    let early = tokio::time::timeout(Duration::from_secs(1), answer.as_mut()).await;
    assert!(
        early.is_err(),
        "a third connection was served while two held every permit: {early:?}"
    );
    // One held connection goes: the third is served.
    drop(held.pop());
    let answer = tokio::time::timeout(CLOSE_DEADLINE, answer)
        .await
        .expect("answered once a permit was free")
        .expect("a response");
    assert_eq!(answer.status(), 200);
    drop(held);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_unary_call_is_ended_and_the_streams_beside_it_are_not() {
    let (_redis, server) = server().await;
    let channel = server.channel().await;
    // Envoy's access-log stream (one message, then kept open) and a health Watch.
    let (logs_tx, logs_rx) = tokio::sync::mpsc::channel::<StreamAccessLogsMessage>(4);
    let message = || StreamAccessLogsMessage {
        identifier: Some(Identifier {
            node: None,
            log_name: "tollgate-test".into(),
        }),
        log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries {
            log_entry: Vec::new(),
        })),
    };
    logs_tx.send(message()).await.expect("queue");
    let mut logs = AccessLogServiceClient::new(channel.clone());
    let access_log = tokio::spawn(async move {
        logs.stream_access_logs(tokio_stream::wrappers::ReceiverStream::new(logs_rx))
            .await
            .map(|_| ())
    });
    let mut watch = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();
    tokio::time::timeout(CLOSE_DEADLINE, watch.message())
        .await
        .expect("the watch answers")
        .expect("a status");

    // A Check whose message never completes: 10 of a declared 100 bytes.
    let tcp = TcpStream::connect(server.grpc_addr).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(connection);
    let mut client = client.ready().await.expect("ready");
    let request = http::Request::post("/envoy.service.auth.v3.Authorization/Check")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let (answer, mut body) = client.send_request(request, false).expect("send");
    body.send_data(
        bytes::Bytes::from_static(&[0, 0, 0, 0, 100, 10, 8, 0, 0, 0, 0, 0, 0, 0, 0]),
        false,
    )
    .expect("part of a message");
    let started = Instant::now();
    let answer = tokio::time::timeout(UNARY_DEADLINE_GUARD, answer)
        .await
        .unwrap_or_else(|_| {
            panic!("the stalled Check is still open after {UNARY_DEADLINE_GUARD:?}")
        })
        .expect("a response");
    let grpc_status = answer
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    assert_eq!(
        grpc_status.as_deref(),
        Some("4"),
        "DEADLINE_EXCEEDED: {answer:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(20),
        "ended by something else than the 30 s deadline, after {:?}",
        started.elapsed()
    );
    drop(body);

    // The streams beside it outlived the unary deadline: the watch is still open (it may
    // have sent status changes meanwhile: a busy machine can move readiness; it must not
    // have ended), and the access-log stream takes another message and ends OK when its
    // client ends it.
    for changes in 0.. {
        assert!(changes < 100, "the health Watch never went quiet");
        match tokio::time::timeout(Duration::from_millis(500), watch.message()).await {
            Err(_) => break,
            Ok(Ok(Some(change))) => eprintln!("health status change: {change:?}"),
            Ok(Ok(None)) => panic!("the health Watch ended"),
            Ok(Err(status)) => panic!("the health Watch ended: {status:?}"),
        }
    }
    assert!(!access_log.is_finished(), "the access-log stream ended");
    logs_tx.send(message()).await.expect("another message");
    drop(logs_tx);
    tokio::time::timeout(CLOSE_DEADLINE, access_log)
        .await
        .expect("the access-log stream ends once its client does")
        .expect("the client task")
        .expect("the access-log stream ends OK");
    server.stop().await;
}
