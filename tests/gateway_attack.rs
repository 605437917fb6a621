//! A client attacking the metering through a real gateway with the shipped examples:
//! headers tollgate never priced (other spellings of the price book's headers, a method
//! override), a hold left for nobody to settle, and the API key passed on to the API.

mod common;

use std::time::{Duration, Instant};

use common::gateways::{
    balance, esign_config, esign_config_from, example, http, replace, seed, start_envoy,
    start_nginx, start_traefik, Seen, Upstream, REQUEST_TIMEOUT,
};
use tollgate::ledger::Clock;

/// The value a backend that maps header names to variables (CGI, WSGI, PHP: every
/// character but letters and digits becomes `_`) reads for `name` (`x-signers`), by
/// whichever spelling reached it.
fn cgi_read<'a>(seen: &'a Seen, name: &str) -> Option<&'a str> {
    let variable = |n: &str| -> String {
        n.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect()
    };
    let want = variable(name);
    seen.headers
        .iter()
        .find_map(|(k, v)| (variable(k) == want).then_some(v.as_str()))
}

/// Through examples/envoy.yaml, a client spells the price book's own request headers
/// (`x-signature-method`, `x-signers`) with `.` or `_` for a dash: tollgate does not read
/// them (no variant, a plain envelope: 1 credit), and Envoy forwards them, so a backend
/// that maps header names to variables (HTTP_X_SIGNATURE_METHOD) would read an Aadhaar
/// envelope for 50 signers, worth 1 + 15 × 50 = 751. The Check answer removes them. So it
/// does a spelling of a method-override header (tollgate reads only the real name).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_forwards_aliases_of_the_price_books_headers() {
    let redis = common::RedisServer::start();
    let server = common::TestServer::start(esign_config(&redis.url()), Clock::Redis).await;
    let upstream = Upstream::start().await;
    let envoy = start_envoy(server.grpc_addr, upstream.addr).await;
    let key = seed(&server, "acme", 1000).await;
    let bearer = format!("Bearer {key}");
    let r = http(
        envoy.addr,
        "POST",
        "/v1/envelopes",
        &[
            ("authorization", bearer.as_str()),
            ("x.signature.method", "aadhaar"),
            ("x_signers", "50"),
            ("x_http_method_override", "DELETE"),
            ("x-test-tag", "alias"),
        ],
        "{}",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}\n{}", envoy.log());
    assert_eq!(
        balance(&server, "acme").await,
        (999, 0, 1),
        "a plain envelope"
    );
    let seen = upstream.seen_tagged("alias");
    assert_eq!(seen.len(), 1, "{seen:?}");
    for name in ["x-signature-method", "x-signers", "x-http-method-override"] {
        assert_eq!(
            cgi_read(&seen[0], name),
            None,
            "the upstream reads {name} though tollgate never priced it: {:?}",
            seen[0].headers
        );
    }
}

/// examples/pricebook-esign.toml's OCR hold: a client that hangs up once the API has its
/// request leaves the hold open (Envoy made the status up: tollgate cannot tell whether
/// the work was done), and nobody settles it. With `on_expiry = "release"` the example
/// gave that OCR away; with "capture" the hold is taken whole when it expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_client_hanging_up_gets_the_example_ocr_for_free() {
    use tokio::io::AsyncWriteExt;
    let redis = common::RedisServer::start();
    // The example's price book, its hold's TTL shortened so the test can wait it out;
    // long enough that the hold is still open when it is first looked at on a busy machine.
    let book = replace(
        &example("pricebook-esign.toml"),
        "hold_ttl_ms = 60000",
        "hold_ttl_ms = 10000",
    );
    let server =
        common::TestServer::start(esign_config_from(&redis.url(), &book), Clock::Redis).await;
    let upstream = Upstream::start().await;
    let envoy = start_envoy(server.grpc_addr, upstream.addr).await;
    let key = seed(&server, "acme", 200).await;
    let mut stream = tokio::net::TcpStream::connect(envoy.addr)
        .await
        .expect("connect");
    let request = format!(
        "POST /v1/documents/d-1/ocr HTTP/1.1\r\nHost: api.example.com\r\n\
         authorization: Bearer {key}\r\nx-test-hang: 1\r\nx-test-tag: gone\r\n\
         Content-Length: 0\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("send");
    common::eventually(REQUEST_TIMEOUT, "the API to get the request", || async {
        (!upstream.seen_tagged("gone").is_empty()).then_some(())
    })
    .await;
    let held = balance(&server, "acme").await;
    assert_eq!(held.1, 50, "held at the check: {held:?}");
    drop(stream); // the client hangs up; the API has the request and works on
                  // The hold's 10 s, the sweeper's round, and a busy machine's slack.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = balance(&server, "acme").await;
    while last.1 != 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        last = balance(&server, "acme").await;
    }
    assert_eq!(
        last,
        (150, 0, 50),
        "the API got the OCR request: its expired hold is captured, not given away"
    );
}

/// tollgate prices the request's own method: `GET /v1/envelopes` is free (no key needed)
/// by examples/pricebook-esign.toml, while an upstream honouring `X-HTTP-Method-Override`
/// (Rails, Laravel, Express's method-override, ...) would run a POST. Refused with 400
/// naming the header through nginx; an override naming the request's own method passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_passes_a_method_override_tollgate_never_priced() {
    let redis = common::RedisServer::start();
    let server = common::TestServer::start(esign_config(&redis.url()), Clock::Redis).await;
    let upstream = Upstream::start().await;
    let nginx = start_nginx(server.http_addr, upstream.addr).await;
    for header in [
        "X-HTTP-Method-Override",
        "X-HTTP-Method",
        "X-Method-Override",
    ] {
        let r = http(
            nginx.addr,
            "GET",
            "/v1/envelopes",
            &[(header, "POST"), ("x-test-tag", "override")],
            "",
        )
        .await;
        assert_eq!(r.status, 400, "{header}: {r:?}\n{}", nginx.log());
        let body = r.json();
        assert_eq!(body["error"], "bad_header", "{body}");
        assert_eq!(body["header"], header.to_ascii_lowercase(), "{body}");
    }
    assert!(upstream.seen_tagged("override").is_empty());
    let same = http(
        nginx.addr,
        "GET",
        "/v1/envelopes",
        &[("x-http-method-override", "get"), ("x-test-tag", "same")],
        "",
    )
    .await;
    assert_eq!(same.status, 200, "{same:?}");
    assert_eq!(upstream.seen_tagged("same").len(), 1);
}

/// `gateway.method_override = "ignore"`: for an API that honours none of these headers,
/// a request carrying one is priced as before (here through forward-auth, as Traefik asks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_override_ignore_lets_the_header_through() {
    let redis = common::RedisServer::start();
    let book = replace(
        &example("pricebook-esign.toml"),
        "[gateway]\n",
        "[gateway]\nmethod_override = \"ignore\"\n",
    );
    let server =
        common::TestServer::start(esign_config_from(&redis.url(), &book), Clock::Redis).await;
    let r = http(
        server.http_addr,
        "GET",
        "/v1/forward-auth",
        &[
            ("x-forwarded-method", "GET"),
            ("x-forwarded-uri", "/v1/envelopes"),
            ("x-forwarded-host", "api.example.com"),
            ("x-http-method-override", "POST"),
        ],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
}

/// The API key is tollgate's business: the API gets the account (`x-tollgate-account`).
/// Each example config drops the key headers (`authorization`, `x-api-key`) on the way to
/// the API, after tollgate has read them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_gateways_keep_the_api_key_from_the_api() {
    let redis = common::RedisServer::start();
    let server = common::TestServer::start(esign_config(&redis.url()), Clock::Redis).await;
    let upstream = Upstream::start().await;
    let key = seed(&server, "acme", 1000).await;
    let bearer = format!("Bearer {key}");
    let gateways = [
        start_envoy(server.grpc_addr, upstream.addr).await,
        start_nginx(server.http_addr, upstream.addr).await,
        start_traefik(server.http_addr, upstream.addr).await,
    ];
    for gateway in &gateways {
        for (header, value) in [("authorization", bearer.as_str()), ("x-api-key", &key)] {
            let tag = format!("{}-{header}", gateway.name);
            let r = http(
                gateway.addr,
                "POST",
                "/v1/envelopes",
                &[(header, value), ("x-test-tag", &tag)],
                "{}",
            )
            .await;
            assert_eq!(r.status, 200, "{tag}: {r:?}\n{}", gateway.log());
            let seen = upstream.seen_tagged(&tag);
            assert_eq!(seen.len(), 1, "{tag}");
            let h = &seen[0].headers;
            assert_eq!(
                h.get("x-tollgate-account").map(String::as_str),
                Some("acme"),
                "{tag}: {h:?}"
            );
            assert!(
                !h.contains_key("authorization") && !h.contains_key("x-api-key"),
                "{tag}: the API got the key: {h:?}"
            );
        }
    }
    assert_eq!(balance(&server, "acme").await, (994, 0, 6));
}

/// examples/pricebook-esign.toml under a free default, with a cheaper prefix over the
/// documents: a client capitalises the path. Express (by default) and ASP.NET Core route
/// ignoring case, so `POST /V1/Envelopes` runs the envelope handler and
/// `/v1/documents/d-1/OCR` the OCR one; tollgate matched literal segments as written, so
/// the first passed free and the second paid the prefix's 1 instead of the OCR hold's 50.
/// Through Envoy (ext_authz) and nginx (forward-auth), both are priced as their route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capitalised_path_is_priced_as_its_route() {
    let redis = common::RedisServer::start();
    let book = replace(
        &replace(
            &example("pricebook-esign.toml"),
            "default = \"deny\"",
            "default = \"free\"",
        ),
        "[[pricebook.routes]]\nmethod = \"GET\"\npath_prefix = \"/v1/\"",
        "[[pricebook.routes]]\npath_prefix = \"/v1/documents/\"\noperation = \"envelope.send\"\n\n\
         [[pricebook.routes]]\nmethod = \"GET\"\npath_prefix = \"/v1/\"",
    );
    let server =
        common::TestServer::start(esign_config_from(&redis.url(), &book), Clock::Redis).await;
    let upstream = Upstream::start().await;
    let key = seed(&server, "acme", 1000).await;
    let gateways = [
        start_envoy(server.grpc_addr, upstream.addr).await,
        start_nginx(server.http_addr, upstream.addr).await,
    ];
    for gateway in &gateways {
        for (path, operation) in [
            ("/V1/Envelopes", "envelope.send"),
            ("/v1/ENVELOPES/", "envelope.send"),
            ("/v1/documents/d-1/OCR", "ocr.pages"),
            ("/V1/Documents/d-1/Ocr", "ocr.pages"),
        ] {
            let tag = format!("{}-{path}", gateway.name);
            let r = http(
                gateway.addr,
                "POST",
                path,
                &[("x-api-key", &key), ("x-test-tag", &tag)],
                "{}",
            )
            .await;
            assert_eq!(r.status, 200, "{tag}: {r:?}\n{}", gateway.log());
            let seen = upstream.seen_tagged(&tag);
            assert_eq!(seen.len(), 1, "{tag}");
            assert_eq!(
                seen[0]
                    .headers
                    .get("x-tollgate-operation")
                    .map(String::as_str),
                Some(operation),
                "{tag}: {:?}",
                seen[0].headers
            );
        }
        // Without a key: a priced route, so 401, not a free pass.
        let r = http(gateway.addr, "POST", "/V1/Envelopes", &[], "{}").await;
        assert_eq!(r.status, 401, "{}: {r:?}", gateway.name);
    }
}

/// Symfony and Laravel (by default) run a POST carrying `_method` in its query string as
/// that method: priced as the POST it is sent as (here free: no POST route for one
/// document), `POST /v1/documents/d-1?_method=DELETE` would run the API's DELETE. Refused
/// like a method-override header, 400 `bad_header` naming `_method`, through Envoy and
/// nginx, whatever the spelling of the name; one naming the request's own method passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_override_in_the_query_string_is_refused() {
    let redis = common::RedisServer::start();
    let book = replace(
        &example("pricebook-esign.toml"),
        "default = \"deny\"",
        "default = \"free\"",
    );
    let server =
        common::TestServer::start(esign_config_from(&redis.url(), &book), Clock::Redis).await;
    let upstream = Upstream::start().await;
    let gateways = [
        start_envoy(server.grpc_addr, upstream.addr).await,
        start_nginx(server.http_addr, upstream.addr).await,
    ];
    for gateway in &gateways {
        for query in [
            "_method=DELETE",
            "x=1&_METHOD=delete",
            "%5Fmethod=DELETE",
            "_method=DEL%45TE",
            "_method=POST&_method=PUT",
        ] {
            let tag = format!("{}-{query}", gateway.name);
            let r = http(
                gateway.addr,
                "POST",
                &format!("/v1/documents/d-1?{query}"),
                &[("x-test-tag", &tag)],
                "",
            )
            .await;
            assert_eq!(r.status, 400, "{tag}: {r:?}\n{}", gateway.log());
            let body = r.json();
            assert_eq!(body["error"], "bad_header", "{tag}: {body}");
            assert_eq!(body["header"], "_method", "{tag}: {body}");
            assert!(upstream.seen_tagged(&tag).is_empty(), "{tag}");
        }
        let tag = format!("{}-same", gateway.name);
        let r = http(
            gateway.addr,
            "POST",
            "/v1/documents/d-1?_method=post&method=DELETE",
            &[("x-test-tag", &tag)],
            "",
        )
        .await;
        assert_eq!(r.status, 200, "{tag}: {r:?}");
        assert_eq!(upstream.seen_tagged(&tag).len(), 1, "{tag}");
    }
}
