//! Traefik with examples/traefik.yml (ForwardAuth to /v1/forward-auth), in front of an
//! upstream served by the test, with the shipped esign price book.

mod common;

use common::gateways::{
    assert_no_forged_alias, balance, esign_replay_config, http, seed, start_traefik, Upstream,
    FORGED_ALIASES,
};
use tollgate::ledger::Clock;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traefik_meters_charges_once_and_passes_402_through() {
    let redis = common::RedisServer::start();
    // The replay of a request id through the proxy (the default charges every check).
    let server = common::TestServer::start(esign_replay_config(&redis.url()), Clock::Redis).await;
    let upstream = Upstream::start().await;
    let traefik = start_traefik(server.http_addr, upstream.addr).await;
    let key = seed(&server, "acme", 100).await;
    let bearer = format!("Bearer {key}");

    // Allowed: the upstream gets the tollgate headers (authResponseHeaders replace a
    // client's own, and aliasHeadersStrategy drops their underscore spellings); charged
    // once for a retry with the same x-request-id.
    let mut request = vec![
        ("authorization", bearer.as_str()),
        ("x-signature-method", "aadhaar"),
        ("x-signers", "2"),
        ("x-request-id", "traefik-req-1"),
        ("x-tollgate-hold-id", "h1-1"),
        ("x-test-tag", "allowed"),
    ];
    request.extend(FORGED_ALIASES);
    let r = http(
        traefik.addr,
        "POST",
        "/v1/envelopes?draft=false",
        &request,
        "{}",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}\n{}", traefik.log());
    let again = http(
        traefik.addr,
        "POST",
        "/v1/envelopes?draft=false",
        &request,
        "{}",
    )
    .await;
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(
        balance(&server, "acme").await,
        (69, 0, 31),
        "1 + 15 × 2, once"
    );
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
    assert_eq!(h.get("x-tollgate-charged").map(String::as_str), Some("31"));
    // The debit's id, passed on for a refund (the example config copies it upstream).
    assert!(
        h.get("x-tollgate-charge-id")
            .is_some_and(|id| !id.is_empty()),
        "{h:?}"
    );
    assert_eq!(h.get("x-credits-remaining").map(String::as_str), Some("69"));
    assert_eq!(
        h.get("x-tollgate-hold-id"),
        None,
        "a client's own header is dropped"
    );
    for s in &seen {
        assert_no_forged_alias(s);
    }

    // No credits: tollgate's 402 and JSON body pass through as they are.
    let poor = seed(&server, "poor", 0).await;
    let r = http(
        traefik.addr,
        "POST",
        "/v1/envelopes",
        &[("x-api-key", poor.as_str()), ("x-test-tag", "poor")],
        "",
    )
    .await;
    assert_eq!(r.status, 402, "{r:?}");
    assert_eq!(r.header("x-tollgate-reason"), Some("insufficient_credits"));
    let body = r.json();
    assert_eq!(body["error"], "insufficient_credits");
    assert_eq!(body["required"], 1);
    assert_eq!(body["available"], 0);
    assert_eq!(body["operation"], "envelope.send");

    // No key: 401.
    let r = http(
        traefik.addr,
        "POST",
        "/v1/envelopes",
        &[("x-test-tag", "nokey")],
        "",
    )
    .await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.json()["error"], "missing_api_key");

    // A client's own x-forwarded-* cannot price the request as a free one: the entry point
    // trusts no client's X-Forwarded-* (forwardedHeaders.insecure off, the default), and
    // ForwardAuth sends the real method and URI. (With both trusted, this is a 200.)
    let disguised = [
        ("x-forwarded-method", "GET"),
        ("x-forwarded-uri", "/v1/"),
        ("x-test-tag", "disguised"),
    ];
    let r = http(traefik.addr, "POST", "/v1/envelopes", &disguised, "").await;
    assert_eq!(r.status, 401, "{r:?}");
    // An ambiguous encoded character in the path is refused before it is priced: a
    // backend decoding %2F itself would serve another route than the one charged.
    let encoded = [
        ("authorization", bearer.as_str()),
        ("x-test-tag", "encoded"),
    ];
    let r = http(traefik.addr, "POST", "/v1/envelopes%2Fbulk", &encoded, "").await;
    assert_eq!(r.status, 400, "{r:?}");
    // A dot segment: Traefik resolves it (its entry point's sanitizePath) before the
    // ForwardAuth request and the forward: one path, priced and served as /v1/envelopes.
    let dots = [("authorization", bearer.as_str()), ("x-test-tag", "dots")];
    let r = http(
        traefik.addr,
        "POST",
        "/v1/documents/../envelopes",
        &dots,
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen = upstream.seen_tagged("dots");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/v1/envelopes");
    assert_eq!(
        seen[0]
            .headers
            .get("x-tollgate-operation")
            .map(String::as_str),
        Some("envelope.send")
    );
    for tag in ["poor", "nokey", "disguised", "encoded"] {
        assert!(
            upstream.seen_tagged(tag).is_empty(),
            "{tag} reached the upstream"
        );
    }
    assert_eq!(balance(&server, "acme").await, (68, 0, 32));
    // The example is clean: Traefik has nothing to warn about in it (an unbounded
    // ForwardAuth response body, say).
    let log = traefik.log();
    let warnings: Vec<&str> = log
        .lines()
        // Its console format, coloured even into a file: "…Z \x1b[33mWRN\x1b[0m …".
        .filter(|l| l.contains("WRN"))
        .collect();
    assert!(warnings.is_empty(), "Traefik warned: {warnings:#?}");
}
