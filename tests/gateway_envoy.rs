//! Envoy end to end (examples/envoy.yaml): ext_authz over gRPC with
//! failure_mode_allow: false and the gRPC access log both at tollgate, in front of an
//! upstream served by the test, with the shipped esign price book. Hold settlement by
//! the response's grpc-status uses the upstream's trailers-only gRPC answer over HTTP/1.1
//! (the test upstream speaks HTTP/1.1 only; a gRPC error in the trailers is covered by
//! access_log.rs's unit tests).

mod common;

use common::gateways::{
    assert_no_forged_alias, balance, esign_config_from, esign_replay_config, example, http,
    replace, seed, start_envoy, start_envoy_with_route_timeout, wait_balance, Upstream,
    FORGED_ALIASES, REQUEST_TIMEOUT,
};
use tollgate::api::pb;
use tollgate::ledger::Clock;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_meters_charges_once_denies_and_settles_holds_by_the_response() {
    let redis = common::RedisServer::start();
    // The replay of a request id through the proxy (the default charges every check).
    let server = common::TestServer::start(esign_replay_config(&redis.url()), Clock::Redis).await;
    let upstream = Upstream::start().await;
    let envoy = start_envoy(server.grpc_addr, upstream.addr).await;
    let key = seed(&server, "acme", 200).await;
    let bearer = format!("Bearer {key}");

    // Allowed: reaches the upstream with the tollgate headers, charged once even when the
    // same request (same x-request-id) comes again.
    let electronic = [
        ("authorization", bearer.as_str()),
        ("x-signature-method", "electronic"),
        ("x-request-id", "req-electronic-1"),
        ("x-test-tag", "electronic"),
    ];
    let first = http(envoy.addr, "POST", "/v1/envelopes", &electronic, "{}").await;
    assert_eq!(first.status, 200, "{first:?}\n{}", envoy.log());
    assert_eq!(
        first.header("x-credits-remaining"),
        Some("189"),
        "{first:?}"
    );
    let again = http(envoy.addr, "POST", "/v1/envelopes", &electronic, "{}").await;
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(
        again.header("x-credits-remaining"),
        Some("189"),
        "replayed: {again:?}"
    );
    assert_eq!(balance(&server, "acme").await, (189, 0, 11), "1 + 10, once");
    let seen = upstream.seen_tagged("electronic");
    assert_eq!(seen.len(), 2, "both attempts reach the upstream");
    for s in &seen {
        assert_eq!(
            s.headers.get("x-tollgate-account").map(String::as_str),
            Some("acme")
        );
        assert_eq!(
            s.headers.get("x-tollgate-operation").map(String::as_str),
            Some("envelope.send")
        );
        assert_eq!(
            s.headers.get("x-tollgate-charged").map(String::as_str),
            Some("11")
        );
        assert_eq!(s.headers.get("x-tollgate-hold-id"), None);
    }
    // The charge's id, the same for the replay: what a Refund takes.
    let charge_ids: Vec<_> = seen
        .iter()
        .map(|s| s.headers.get("x-tollgate-charge-id").cloned())
        .collect();
    assert!(
        charge_ids[0].as_deref().is_some_and(|id| !id.is_empty()) && charge_ids[0] == charge_ids[1],
        "{charge_ids:?}"
    );

    // Three Aadhaar signers: 1 + 15 × 3. A client's own tollgate headers never pass.
    let mut aadhaar = vec![
        ("authorization", bearer.as_str()),
        ("x-signature-method", "aadhaar"),
        ("x-signers", "3"),
        ("x-tollgate-hold-id", "h0-1"),
        ("x-tollgate-account", "someone-else"),
        ("x-tollgate-charge-id", "forged"),
        ("x-test-tag", "aadhaar"),
    ];
    aadhaar.extend(FORGED_ALIASES);
    let r = http(envoy.addr, "POST", "/v1/envelopes", &aadhaar, "{}").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(balance(&server, "acme").await, (189 - 46, 0, 57));
    let seen = upstream.seen_tagged("aadhaar");
    assert_eq!(
        seen[0]
            .headers
            .get("x-tollgate-charged")
            .map(String::as_str),
        Some("46")
    );
    assert_eq!(
        seen[0]
            .headers
            .get("x-tollgate-account")
            .map(String::as_str),
        Some("acme")
    );
    assert_eq!(
        seen[0].headers.get("x-tollgate-hold-id"),
        None,
        "forged header removed"
    );
    assert_no_forged_alias(&seen[0]);
    // The upstream's work failed: it refunds the charge it was told of.
    let charge_id = seen[0]
        .headers
        .get("x-tollgate-charge-id")
        .cloned()
        .expect("a charge id");
    assert_ne!(charge_id, "forged");
    let refund = server
        .metering()
        .await
        .refund(pb::RefundRequest {
            charge_id,
            amount: 46,
            idempotency_key: "aadhaar-failed".into(),
            ..Default::default()
        })
        .await
        .expect("refund by the upstream's charge id")
        .into_inner();
    assert_eq!(refund.refunded, 46);
    // Refunded credits are available again; used counts what was charged.
    assert_eq!(balance(&server, "acme").await, (189, 0, 57));

    // Missing key: 401; bad header: 400 naming it; nothing reaches the upstream.
    let r = http(
        envoy.addr,
        "POST",
        "/v1/envelopes",
        &[("x-test-tag", "nokey")],
        "",
    )
    .await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.json()["error"], "missing_api_key");
    let r = http(
        envoy.addr,
        "POST",
        "/v1/envelopes",
        &[
            ("x-api-key", key.as_str()),
            ("x-signature-method", "fax"),
            ("x-test-tag", "bad"),
        ],
        "",
    )
    .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.json()["header"], "x-signature-method");
    assert!(upstream.seen_tagged("nokey").is_empty() && upstream.seen_tagged("bad").is_empty());

    // Hold mode: 50 held at the check; a 2xx answer reporting 3 pages captures 2 × 3
    // through the access-log stream; a 5xx answer releases the hold.
    let before = balance(&server, "acme").await.0;
    let ok_pages = [
        ("authorization", bearer.as_str()),
        ("x-test-units", "3"),
        ("x-test-tag", "ocr-ok"),
    ];
    let r = http(envoy.addr, "POST", "/v1/documents/d-1/ocr", &ok_pages, "").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.header("x-credits-remaining"),
        Some((before - 50).to_string().as_str())
    );
    let seen = upstream.seen_tagged("ocr-ok");
    let hold_id = seen[0]
        .headers
        .get("x-tollgate-hold-id")
        .expect("hold id upstream");
    assert!(hold_id.starts_with('h'), "{hold_id}");
    assert_eq!(
        seen[0]
            .headers
            .get("x-tollgate-charged")
            .map(String::as_str),
        Some("50")
    );
    wait_balance(&server, "acme", (before - 6, 0, 57 + 6)).await;

    let failing = [
        ("authorization", bearer.as_str()),
        ("x-test-status", "503"),
        ("x-test-units", "9"),
        ("x-test-tag", "ocr-fail"),
    ];
    let r = http(envoy.addr, "POST", "/v1/documents/d-2/ocr", &failing, "").await;
    assert_eq!(r.status, 503, "the upstream's own answer: {r:?}");
    assert_eq!(upstream.seen_tagged("ocr-fail").len(), 1);
    wait_balance(&server, "acme", (before - 6, 0, 57 + 6)).await;
    let events = common::outbox_events(&server.ledger).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "release").count(),
        1,
        "the failed OCR's hold was released: {kinds:?}"
    );

    // A gRPC call's outcome is its grpc-status, not its HTTP status: a failed call comes
    // over HTTP 200 (here a trailers-only answer, grpc-status in the headers) and its hold
    // is released, not captured in full; grpc-status 0 captures by the units reported.
    let grpc_failing = [
        ("authorization", bearer.as_str()),
        ("x-test-grpc-status", "13"),
        ("x-test-units", "9"),
        ("x-test-tag", "ocr-grpc-fail"),
    ];
    let r = http(
        envoy.addr,
        "POST",
        "/v1/documents/d-6/ocr",
        &grpc_failing,
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("grpc-status"), Some("13"), "{r:?}");
    assert_eq!(upstream.seen_tagged("ocr-grpc-fail").len(), 1);
    let grpc_ok = [
        ("authorization", bearer.as_str()),
        ("x-test-grpc-status", "0"),
        ("x-test-units", "2"),
        ("x-test-tag", "ocr-grpc-ok"),
    ];
    let r = http(envoy.addr, "POST", "/v1/documents/d-7/ocr", &grpc_ok, "").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("grpc-status"), Some("0"), "{r:?}");
    wait_balance(&server, "acme", (before - 10, 0, 57 + 10)).await;
    let events = common::outbox_events(&server.ledger).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "release").count(),
        2,
        "the failed gRPC call's hold was released: {kinds:?}"
    );

    // A client cannot settle someone's hold by naming it: a request Envoy denies (no key)
    // is logged with the client's own x-tollgate-hold-id, and the log names holds only by
    // the Check answer's metadata. The hold stays held; a later request's capture, in the
    // same log stream after it, shows the forged entry was read.
    let open = open_hold(&server, &bearer).await;
    let forged = [
        ("x-tollgate-hold-id", open.as_str()),
        ("x-tollgate-operation", "ocr.pages"),
        ("x-test-tag", "forged"),
    ];
    let r = http(envoy.addr, "POST", "/v1/documents/d-4/ocr", &forged, "").await;
    assert_eq!(r.status, 401, "{r:?}");
    let later = [
        ("authorization", bearer.as_str()),
        ("x-test-units", "3"),
        ("x-test-tag", "ocr-later"),
    ];
    let r = http(envoy.addr, "POST", "/v1/documents/d-5/ocr", &later, "").await;
    assert_eq!(r.status, 200, "{r:?}");
    wait_balance(&server, "acme", (before - 66, 50, 57 + 16)).await;

    // Empty balance: 402 with the JSON body, and the upstream is not reached.
    let poor = seed(&server, "poor", 0).await;
    let r = http(
        envoy.addr,
        "POST",
        "/v1/envelopes",
        &[("x-api-key", poor.as_str()), ("x-test-tag", "poor")],
        "",
    )
    .await;
    assert_eq!(r.status, 402, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"));
    let body = r.json();
    assert_eq!(body["error"], "insufficient_credits");
    assert_eq!(body["required"], 1);
    assert_eq!(body["available"], 0);
    assert_eq!(body["operation"], "envelope.send");
    assert!(upstream.seen_tagged("poor").is_empty());

    // One reading of the path (the example's normalize_path and merge_slashes): Envoy
    // resolves ".." and merges "//" before tollgate sees the path, and forwards it so:
    // priced as, and served as, /v1/envelopes. An encoded slash is left as sent and
    // refused by tollgate (400 bad_path), and the upstream is not reached.
    let charged = balance(&server, "acme").await;
    for (path, tag) in [
        ("/v1/documents/../envelopes", "dots"),
        ("/v1//envelopes", "slashes"),
    ] {
        let headers = [("authorization", bearer.as_str()), ("x-test-tag", tag)];
        let r = http(envoy.addr, "POST", path, &headers, "").await;
        assert_eq!(r.status, 200, "{path}: {r:?}");
        let seen = upstream.seen_tagged(tag);
        assert_eq!(seen.len(), 1, "{path}");
        assert_eq!(seen[0].path, "/v1/envelopes", "{path}");
        assert_eq!(
            seen[0]
                .headers
                .get("x-tollgate-operation")
                .map(String::as_str),
            Some("envelope.send"),
            "{path}"
        );
    }
    let headers = [
        ("authorization", bearer.as_str()),
        ("x-test-tag", "encoded"),
    ];
    let r = http(envoy.addr, "POST", "/v1/documents/a%2Fb/ocr", &headers, "").await;
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.json()["error"], "bad_path", "{r:?}");
    assert!(upstream.seen_tagged("encoded").is_empty());
    assert_eq!(
        balance(&server, "acme").await,
        (charged.0 - 2, charged.1, charged.2 + 2),
        "two envelopes, no OCR hold"
    );
    drop(envoy);
}

/// A client that hangs up once the API has its request, and a request Envoy's route
/// timeout ends while the API still works on it: Envoy logs status 0 (flag DC) and its
/// own 504 (UT), neither of them the API's answer, and the holds stay open for the API's
/// own settlement or their on_expiry policy. Releasing them on those statuses made every
/// paid call free to a client that closes the connection right after sending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_ending_a_request_the_api_received_leaves_its_hold_open() {
    let redis = common::RedisServer::start();
    // Holds that outlive the slowest run of this test on a busy machine: an expiry would
    // end them for another reason.
    let pricebook = replace(
        &example("pricebook-esign.toml"),
        "hold_ttl_ms = 60000",
        "hold_ttl_ms = 600000",
    );
    let server =
        common::TestServer::start(esign_config_from(&redis.url(), &pricebook), Clock::Redis).await;
    let upstream = Upstream::start().await;
    // A route timeout the test can wait out; every other request answers at once.
    let envoy = start_envoy_with_route_timeout(server.grpc_addr, upstream.addr, "5s").await;
    let key = seed(&server, "acme", 200).await;
    let bearer = format!("Bearer {key}");

    // The client sends a paid OCR request and closes the connection once the API has it
    // (the API is still working: it never answers).
    let gone = [
        ("authorization", bearer.as_str()),
        ("x-test-hang", "1"),
        ("x-test-tag", "ocr-gone"),
    ];
    let client = send_only(envoy.addr, "/v1/documents/d-1/ocr", &gone).await;
    common::eventually(REQUEST_TIMEOUT, "the API to get the request", || async {
        (!upstream.seen_tagged("ocr-gone").is_empty()).then_some(())
    })
    .await;
    assert_eq!(
        balance(&server, "acme").await,
        (150, 50, 0),
        "held at the check"
    );
    drop(client);

    // Envoy's route timeout: its own 504 while the API works on.
    let slow = [
        ("authorization", bearer.as_str()),
        ("x-test-hang", "1"),
        ("x-test-tag", "ocr-slow"),
    ];
    let r = http(envoy.addr, "POST", "/v1/documents/d-2/ocr", &slow, "").await;
    assert_eq!(r.status, 504, "Envoy's route timeout: {r:?}");
    assert_eq!(upstream.seen_tagged("ocr-slow").len(), 1);

    // A later request in the same log stream: its capture (2 × 3 pages) shows the two
    // entries before it were read. Both holds are still held.
    let later = [
        ("authorization", bearer.as_str()),
        ("x-test-units", "3"),
        ("x-test-tag", "ocr-later"),
    ];
    let r = http(envoy.addr, "POST", "/v1/documents/d-3/ocr", &later, "").await;
    assert_eq!(r.status, 200, "{r:?}");
    wait_balance(&server, "acme", (200 - 100 - 6, 100, 6)).await;
    let events = common::outbox_events(&server.ledger).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert!(!kinds.contains(&"release"), "no hold released: {kinds:?}");

    // Counted by the reason Envoy gave, no account in the labels.
    let (code, text) = common::http_get(server.http_addr, "/metrics").await;
    assert_eq!(code, 200, "{text}");
    for reason in ["DC", "UT"] {
        let left_open = common::prom::value(
            &text,
            "tollgate_access_log_holds_left_open_total",
            &[("reason", reason)],
        );
        assert!(left_open >= 1.0, "{reason}: {left_open}\n{text}");
    }
    assert!(
        !text.contains("acme"),
        "no account id in the metrics: {text}"
    );
    drop(envoy);
}

/// Sends `POST path` with these headers and an empty body, reads nothing: the open
/// connection, for the caller to close.
async fn send_only(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to Envoy");
    let mut request = format!("POST {path} HTTP/1.1\r\nHost: api.example.com\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("Content-Length: 0\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send the request");
    stream
}

/// A hold taken by a Check straight to tollgate (not through Envoy): its id.
async fn open_hold(server: &common::TestServer, bearer: &str) -> String {
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
    use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
    use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
    use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
    let request = CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "POST".into(),
                    path: "/v1/documents/d-3/ocr".into(),
                    host: "api.example.com".into(),
                    headers: [("authorization".to_owned(), bearer.to_owned())].into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    let answer = AuthorizationClient::new(server.channel().await)
        .check(request)
        .await
        .expect("check")
        .into_inner();
    let Some(HttpResponse::OkResponse(ok)) = answer.http_response else {
        panic!("not allowed: {answer:?}");
    };
    ok.headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .find(|h| h.key == "x-tollgate-hold-id")
        .map(|h| h.value.clone())
        .expect("a hold")
}
