//! nginx with examples/nginx.conf (auth_request to /v1/forward-auth?mode=nginx), in front
//! of an upstream served by the test, with the shipped esign price book.

mod common;

use common::gateways::{
    assert_no_forged_alias, balance, esign_config, esign_config_from, esign_replay_config, example,
    http, raw_http, replace, seed, start_nginx, Upstream, FORGED_ALIASES,
};
use tollgate::ledger::Clock;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_meters_charges_once_and_turns_denials_into_real_answers() {
    let redis = common::RedisServer::start();
    // The replay of a request id through the proxy (the default charges every check).
    let server = common::TestServer::start(esign_replay_config(&redis.url()), Clock::Redis).await;
    let upstream = Upstream::start().await;
    let nginx = start_nginx(server.http_addr, upstream.addr).await;
    let key = seed(&server, "acme", 100).await;
    let bearer = format!("Bearer {key}");

    // Allowed: the upstream gets the tollgate headers (a client's own are replaced), the
    // client gets x-credits-remaining; charged once, also when retried with the same id.
    let mut request = vec![
        ("authorization", bearer.as_str()),
        ("x-signature-method", "dsc"),
        ("x-request-id", "nginx-req-1"),
        ("x-tollgate-account", "forged"),
        ("x-test-tag", "allowed"),
    ];
    request.extend(FORGED_ALIASES);
    let r = http(nginx.addr, "POST", "/v1/envelopes", &request, "{}").await;
    assert_eq!(r.status, 200, "{r:?}\n{}", nginx.log());
    assert_eq!(r.header("x-credits-remaining"), Some("89"), "{r:?}");
    let again = http(nginx.addr, "POST", "/v1/envelopes", &request, "{}").await;
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(balance(&server, "acme").await, (89, 0, 11), "charged once");
    let seen = upstream.seen_tagged("allowed");
    assert_eq!(seen.len(), 2);
    let h = &seen[0].headers;
    assert_eq!(
        h.get("x-tollgate-account").map(String::as_str),
        Some("acme")
    );
    assert_eq!(
        h.get("x-tollgate-operation").map(String::as_str),
        Some("envelope.send")
    );
    assert_eq!(h.get("x-tollgate-charged").map(String::as_str), Some("11"));
    // The debit's id, passed on for a refund (the example config copies it upstream).
    assert!(
        h.get("x-tollgate-charge-id")
            .is_some_and(|id| !id.is_empty()),
        "{h:?}"
    );
    assert_eq!(
        h.get("x-request-id").map(String::as_str),
        Some("nginx-req-1")
    );
    assert_eq!(h.get("x-tollgate-hold-id"), None);
    for s in &seen {
        assert_no_forged_alias(s);
    }

    // Without an x-request-id, nginx's own $request_id keys the check: two requests, two
    // charges.
    let plain = [("x-api-key", key.as_str()), ("x-test-tag", "plain")];
    for _ in 0..2 {
        let r = http(nginx.addr, "POST", "/v1/envelopes", &plain, "").await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    assert_eq!(balance(&server, "acme").await, (87, 0, 13));

    // A client's own x-forwarded-* cannot price the request as a free one: nginx drops
    // them, tollgate sees the real POST, which needs a key.
    let disguised = [
        ("x-forwarded-method", "GET"),
        ("x-forwarded-uri", "/v1/"),
        ("x-test-tag", "disguised"),
    ];
    let r = http(nginx.addr, "POST", "/v1/envelopes", &disguised, "").await;
    assert_eq!(r.status, 401, "{r:?}");
    assert!(upstream.seen_tagged("disguised").is_empty());

    // No credits: the client gets 402 with the JSON body (auth_request itself only
    // honours 401/403; examples/nginx.conf restores the real answer).
    let poor = seed(&server, "poor", 0).await;
    let r = http(
        nginx.addr,
        "POST",
        "/v1/envelopes",
        &[("x-api-key", poor.as_str()), ("x-test-tag", "poor")],
        "",
    )
    .await;
    assert_eq!(r.status, 402, "{r:?}\n{}", nginx.log());
    assert_eq!(r.header("x-tollgate-reason"), Some("insufficient_credits"));
    let body = r.json();
    assert_eq!(body["error"], "insufficient_credits");
    assert_eq!(body["required"], 1);
    assert_eq!(body["available"], 0);
    assert_eq!(body["operation"], "envelope.send");

    // No key: 401 (JSON body too); a bad header: 400 naming it.
    let r = http(
        nginx.addr,
        "POST",
        "/v1/envelopes",
        &[("x-test-tag", "nokey")],
        "",
    )
    .await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.json()["error"], "missing_api_key");
    let r = http(
        nginx.addr,
        "POST",
        "/v1/envelopes",
        &[
            ("x-api-key", key.as_str()),
            ("x-signature-method", "aadhaar"),
            ("x-signers", "lots"),
            ("x-test-tag", "bad"),
        ],
        "",
    )
    .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.json()["header"], "x-signers");
    for tag in ["poor", "nokey", "bad"] {
        assert!(
            upstream.seen_tagged(tag).is_empty(),
            "{tag} reached the upstream"
        );
    }
    assert_eq!(
        balance(&server, "acme").await,
        (87, 0, 13),
        "denials charge nothing"
    );

    // A URI with raw UTF-8 (nginx copies the request line into X-Original-URI as it is)
    // is priced as itself, a hold on `/v1/documents/{id}/ocr`, not as tollgate's own
    // `/v1/forward-auth` (which no route matches: 403).
    let r = http(
        nginx.addr,
        "POST",
        "/v1/documents/é/ocr",
        &[("x-api-key", key.as_str()), ("x-test-tag", "utf8")],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}\n{}", nginx.log());
    assert_eq!(r.header("x-credits-remaining"), Some("37"), "{r:?}");
    assert_eq!(balance(&server, "acme").await, (37, 50, 13));
    let seen = upstream.seen_tagged("utf8");
    assert_eq!(seen.len(), 1);
    let h = &seen[0].headers;
    assert_eq!(
        h.get("x-tollgate-operation").map(String::as_str),
        Some("ocr.pages")
    );
    assert!(h.contains_key("x-tollgate-hold-id"), "{h:?}");

    // A dot segment: nginx matches its location by the resolved path but passes the
    // request line as sent, to tollgate (X-Original-URI) and to the API (proxy_pass
    // without a URI), which might resolve it otherwise: refused, 400 bad_path.
    let r = http(
        nginx.addr,
        "POST",
        "/v1/documents/../envelopes/ocr",
        &[("x-api-key", key.as_str()), ("x-test-tag", "dots")],
        "",
    )
    .await;
    assert_eq!(r.status, 400, "{r:?}\n{}", nginx.log());
    assert_eq!(r.json()["error"], "bad_path", "{r:?}");
    assert!(upstream.seen_tagged("dots").is_empty());
    assert_eq!(balance(&server, "acme").await, (37, 50, 13));
}

/// tollgate down: the auth subrequest gets nginx's 502, which auth_request turns into a
/// 500. examples/nginx.conf catches that 500 too (`error_page 401 403 500`), so the
/// client gets the JSON 503 `unavailable` instead of nginx's HTML 500 page, and the
/// request is still refused (fail-closed), a free route included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_answers_json_503_and_refuses_when_tollgate_is_down() {
    let redis = common::RedisServer::start();
    let server = common::TestServer::start(esign_config(&redis.url()), Clock::Redis).await;
    let upstream = Upstream::start().await;
    let nginx = start_nginx(server.http_addr, upstream.addr).await;
    let key = seed(&server, "acme", 100).await;
    // Up: allowed (the proxy works).
    let r = http(
        nginx.addr,
        "POST",
        "/v1/envelopes",
        &[("x-api-key", key.as_str()), ("x-test-tag", "up")],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}\n{}", nginx.log());
    assert_eq!(upstream.seen_tagged("up").len(), 1);

    // Stopped: its HTTP port no longer listens.
    let http_addr = server.http_addr;
    server.stop().await;
    assert!(
        tokio::net::TcpStream::connect(http_addr).await.is_err(),
        "tollgate's HTTP port still listens"
    );
    for (method, path, tag) in [
        ("POST", "/v1/envelopes", "down-charged"),
        ("GET", "/v1/envelopes", "down-free"),
    ] {
        let r = http(
            nginx.addr,
            method,
            path,
            &[("x-api-key", key.as_str()), ("x-test-tag", tag)],
            "",
        )
        .await;
        assert_eq!(r.status, 503, "{method} {path}: {r:?}\n{}", nginx.log());
        assert_eq!(r.header("content-type"), Some("application/json"), "{r:?}");
        assert_eq!(r.header("x-tollgate-reason"), Some("unavailable"), "{r:?}");
        assert_eq!(
            r.json(),
            serde_json::json!({"error": "unavailable"}),
            "{r:?}"
        );
        assert!(
            upstream.seen_tagged(tag).is_empty(),
            "{method} {path} reached the upstream without tollgate"
        );
    }
}

/// The host tollgate prices is the one nginx serves, never one a client names. The price
/// book makes `POST /v1/envelopes` free on `partner.example` only. nginx passes `$host`
/// as `X-Original-Host` (next to `X-Original-URI`), replacing a client's own; tollgate
/// reads the host from the URI's family only. An HTTP/1.0 request without Host (empty
/// `$host`, so no X-Original-Host) with a client's `X-Original-Host: partner.example`
/// used to be priced under that host (nginx dropped its empty `X-Forwarded-Host` and
/// tollgate fell through to the client's header): free. Now its host is empty: charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_prices_the_host_it_serves_not_one_the_client_names() {
    let redis = common::RedisServer::start();
    let book = replace(
        &example("pricebook-esign.toml"),
        "[[pricebook.routes]]\nmethod = \"POST\"\npath = \"/v1/envelopes\"\n",
        "[[pricebook.routes]]\nhost = \"partner.example\"\nmethod = \"POST\"\n\
         path = \"/v1/envelopes\"\noperation = \"free\"\n\n\
         [[pricebook.routes]]\nmethod = \"POST\"\npath = \"/v1/envelopes\"\n",
    );
    let server =
        common::TestServer::start(esign_config_from(&redis.url(), &book), Clock::Redis).await;
    let upstream = Upstream::start().await;
    let nginx = start_nginx(server.http_addr, upstream.addr).await;
    let key = seed(&server, "acme", 100).await;

    // The host nginx serves (the client's Host) is priced: free on partner.example.
    let r = raw_http(
        nginx.addr,
        &format!(
            "POST /v1/envelopes HTTP/1.1\r\nHost: partner.example\r\nx-api-key: {key}\r\n\
             x-test-tag: partner\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}\n{}", nginx.log());
    assert_eq!(upstream.seen_tagged("partner").len(), 1);
    assert_eq!(
        balance(&server, "acme").await,
        (100, 0, 0),
        "free on its host"
    );

    // A client naming partner.example in proxy headers is charged: with its own Host, and
    // with none at all (HTTP/1.0).
    let named = "x-original-host: partner.example\r\nx-forwarded-host: partner.example\r\n";
    for (tag, request_line) in [
        ("named-1.1", "HTTP/1.1\r\nHost: api.example.com"),
        ("named-1.0", "HTTP/1.0"),
    ] {
        let r = raw_http(
            nginx.addr,
            &format!(
                "POST /v1/envelopes {request_line}\r\n{named}x-api-key: {key}\r\n\
                 x-test-tag: {tag}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            ),
        )
        .await;
        assert_eq!(r.status, 200, "{tag}: {r:?}\n{}", nginx.log());
        let seen = upstream.seen_tagged(tag);
        assert_eq!(seen.len(), 1, "{tag}");
        let h = &seen[0].headers;
        assert_eq!(
            (
                h.get("x-tollgate-operation").map(String::as_str),
                h.get("x-tollgate-charged").map(String::as_str)
            ),
            (Some("envelope.send"), Some("1")),
            "{tag}: priced under the client's host: {h:?}"
        );
    }
    assert_eq!(balance(&server, "acme").await, (98, 0, 2));
}
