//! `tollgate serve --config examples/pricebook-esign.toml` as a real process: the shipped
//! price book loads, SIGHUP reloads it while checks keep flowing (none dropped), a broken
//! price book on reload is reported with its paths and the current one stays, and a
//! broken one at start-up stops the server with every error listed.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::gateways::{example, http, replace, try_http, TempDir};

/// Whether a `tollgate serve` answers on these ports: /healthz on HTTP, gRPC accepting.
async fn answers(grpc: u16, http_port: u16) -> bool {
    let http_addr: std::net::SocketAddr = ([127, 0, 0, 1], http_port).into();
    try_http(http_addr, "GET", "/healthz", &[], "")
        .await
        .is_ok_and(|r| r.status == 200)
        && tokio::net::TcpStream::connect(("127.0.0.1", grpc))
            .await
            .is_ok()
}

/// `tollgate serve` built by `make` for its (gRPC, HTTP) ports, picked free and picked
/// again if another process took one first; answering; SIGTERM on drop. Its logs
/// (stdout) go to `log`.
async fn serve_on_free_ports(
    log: &Path,
    make: impl Fn(u16, u16) -> Command,
) -> (common::Terminating, u16, u16) {
    let listening = common::spawn_listening(
        2,
        common::START_TIMEOUT,
        |ports| {
            let mut cmd = make(ports[0], ports[1]);
            cmd.stdout(std::fs::File::create(log).expect("log"));
            cmd
        },
        |ports| answers(ports[0], ports[1]),
    )
    .await;
    let (grpc, http_port) = (listening.ports[0], listening.ports[1]);
    (common::Terminating(listening), grpc, http_port)
}

async fn serve(config: &Path, redis_url: &str, log: &Path) -> (common::Terminating, u16, u16) {
    serve_on_free_ports(log, |grpc, http_port| {
        let mut cmd = common::tollgate();
        cmd.arg("serve")
            .arg(format!("--config={}", config.display()))
            .arg(format!("--redis-url={redis_url}"))
            .arg(format!("--grpc-addr=127.0.0.1:{grpc}"))
            .arg(format!("--http-addr=127.0.0.1:{http_port}"))
            // A private ledger file: a store shared across runs would mark this fresh
            // Redis as one that lost its data.
            .arg(format!("--store={}", common::temp_sqlite_url()))
            .env("TOLLGATE_ADMIN_TOKEN", common::ADMIN_TOKEN)
            .env("TOLLGATE_SERVICE_TOKEN", common::SERVICE_TOKEN)
            .env("RUST_LOG", "info")
            // The file's `default = "deny"` is overridden: a reload keeps the override.
            .env("TOLLGATE_PRICEBOOK__DEFAULT", "free");
        // Logs go to stdout.
        cmd
    })
    .await
}

fn charge(r: &common::gateways::HttpResponse) -> Option<&str> {
    r.header("x-tollgate-charged")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_price_book_without_dropping_requests() {
    let redis = common::RedisServer::start();
    let dir = TempDir::new("reload");
    let config = dir.0.join("tollgate.toml");
    let log = dir.0.join("serve.log");
    let original = example("pricebook-esign.toml");
    std::fs::write(&config, &original).expect("write config");
    let (server, grpc, http_port) = serve(&config, &redis.url(), &log).await;
    let http_addr: std::net::SocketAddr = ([127, 0, 0, 1], http_port).into();

    // Seed through the real admin API.
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{grpc}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut admin = tollgate::api::pb::admin_client::AdminClient::with_interceptor(
        channel,
        common::auth(Some(common::ADMIN_TOKEN)),
    );
    admin
        .grant(tollgate::api::pb::GrantRequest {
            account_id: "acme".into(),
            amount: 1_000_000,
            idempotency_key: "g".into(),
            ..Default::default()
        })
        .await
        .expect("grant");
    let key = admin
        .create_api_key(tollgate::api::pb::CreateApiKeyRequest {
            account_id: "acme".into(),
            name: "reload".into(),
            ..Default::default()
        })
        .await
        .expect("key")
        .into_inner()
        .api_key;
    let headers = [
        ("x-forwarded-method", "POST"),
        ("x-forwarded-uri", "/v1/envelopes"),
        ("x-api-key", key.as_str()),
    ];
    let r = http(http_addr, "GET", "/v1/forward-auth", &headers, "").await;
    assert_eq!(charge(&r), Some("1"), "{r:?}");
    let unrouted = [
        ("x-forwarded-method", "DELETE"),
        ("x-forwarded-uri", "/not-priced"),
        ("x-api-key", key.as_str()),
    ];
    let r = http(http_addr, "GET", "/v1/forward-auth", &unrouted, "").await;
    assert_eq!(r.status, 200, "the environment's default = free: {r:?}");

    // Checks keep flowing from another task through the reloads.
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn({
        let stop = stop.clone();
        let key = key.clone();
        async move {
            let mut answers = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let headers = [
                    ("x-forwarded-method", "POST"),
                    ("x-forwarded-uri", "/v1/envelopes"),
                    ("x-api-key", key.as_str()),
                ];
                let r = try_http(http_addr, "GET", "/v1/forward-auth", &headers, "").await;
                answers.push(r.map(|r| r.status).map_err(|e| e.to_string()));
            }
            answers
        }
    });

    // Envelopes now cost 5: reloaded on SIGHUP.
    let cheaper = replace(
        &original,
        "mode = \"debit\"\nbase = 1\n",
        "mode = \"debit\"\nbase = 5\n",
    );
    std::fs::write(&config, cheaper).expect("rewrite config");
    let hup = || server.0.signal("-HUP");
    hup();
    let deadline = Instant::now() + common::START_TIMEOUT;
    loop {
        let r = http(http_addr, "GET", "/v1/forward-auth", &headers, "").await;
        if charge(&r) == Some("5") {
            break;
        }
        assert!(Instant::now() < deadline, "never reloaded: {r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Files a reload must refuse, each reported with its paths while the current book
    // stays: a broken price book; and files whose [pricebook] alone would compile: a typo
    // in the section's name (no [pricebook] left: a book that denies everything), a bad
    // setting in another section, and an empty (truncated) file.
    let broken = replace(&original, "base = 1\n", "base = \"one\"\n");
    let broken = replace(&broken, "hold_ttl_ms = 60000\n", "");
    let refusals = |text: &str| text.matches("price book not reloaded").count();
    for (file, says) in [
        (
            broken,
            &[
                "pricebook.operations.\"envelope.send\".base",
                "pricebook.operations.\"ocr.pages\".hold_ttl_ms",
            ][..],
        ),
        (
            replace(&original, "[pricebook]\n", "[pricebok]\n"),
            &["pricebok: unknown section"],
        ),
        (
            format!("[ledger]\nshards = 0\n{original}"),
            &["ledger.shards"],
        ),
        (String::new(), &["pricebook: missing from the file"]),
    ] {
        let before = refusals(&std::fs::read_to_string(&log).unwrap_or_default());
        std::fs::write(&config, file).expect("rewrite config");
        hup();
        let deadline = Instant::now() + common::START_TIMEOUT;
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if refusals(&text) > before {
                assert!(says.iter().all(|s| text.contains(s)), "{says:?}:\n{text}");
                break;
            }
            assert!(Instant::now() < deadline, "no reload error logged:\n{text}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let r = http(http_addr, "GET", "/v1/forward-auth", &headers, "").await;
        assert_eq!(
            charge(&r),
            Some("5"),
            "refused ({says:?}), the last good book stays: {r:?}"
        );
    }
    let r = http(http_addr, "GET", "/v1/forward-auth", &unrouted, "").await;
    assert_eq!(
        r.status, 200,
        "the reload kept the environment's default: {r:?}"
    );

    stop.store(true, Ordering::Relaxed);
    let answers = load.await.expect("load task");
    assert!(!answers.is_empty());
    let bad: Vec<_> = answers.iter().filter(|a| **a != Ok(200)).collect();
    assert!(
        bad.is_empty(),
        "{} of {} checks failed: {bad:?}",
        bad.len(),
        answers.len()
    );
    drop(server);
}

/// A channel to the server's gRPC port, and an API key of account "acme" granted
/// 1,000,000 credits.
async fn acme_with_credits(grpc: u16) -> (tonic::transport::Channel, String) {
    use tollgate::api::pb;
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{grpc}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut admin = pb::admin_client::AdminClient::with_interceptor(
        channel.clone(),
        common::auth(Some(common::ADMIN_TOKEN)),
    );
    admin
        .grant(pb::GrantRequest {
            account_id: "acme".into(),
            amount: 1_000_000,
            idempotency_key: "g".into(),
            ..Default::default()
        })
        .await
        .expect("grant");
    let key = admin
        .create_api_key(pb::CreateApiKeyRequest {
            account_id: "acme".into(),
            name: "reload".into(),
            ..Default::default()
        })
        .await
        .expect("key")
        .into_inner()
        .api_key;
    (channel, key)
}

/// A hold is settled by the terms of the price book it was placed under, not by the
/// book in force when Envoy's access log reaches tollgate: a reload between the Check
/// and the access-log entry used to price the upstream's units at the new book's
/// `capture_per_unit` (here 10 instead of 2: a price never in force while the request
/// ran), and a renamed units header would have captured the whole hold. Holds placed
/// under each book are settled while the other book is in force, across reloads both
/// ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_is_settled_by_the_book_it_was_placed_under() {
    use tollgate::api::pb;
    let redis = common::RedisServer::start();
    let dir = TempDir::new("reload-hold");
    let config = dir.0.join("tollgate.toml");
    let log = dir.0.join("serve.log");
    let cheap = example("pricebook-esign.toml");
    // Book B: holds 60 (so a hold's metadata says which book placed it) and captures 10
    // a page.
    let dear = replace(
        &replace(
            &cheap,
            "mode = \"hold\"\nbase = 50\n",
            "mode = \"hold\"\nbase = 60\n",
        ),
        "capture_per_unit = 2\n",
        "capture_per_unit = 10\n",
    );
    std::fs::write(&config, &cheap).expect("write config");
    let (server, grpc, _) = serve(&config, &redis.url(), &log).await;
    let (channel, key) = acme_with_credits(grpc).await;
    let held = |m: &envoy_types::pb::google::protobuf::Struct| match m
        .fields
        .get("tollgate_held")
        .and_then(|v| v.kind.as_ref())
    {
        Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(s)) => {
            s.parse::<i64>().expect("held")
        }
        other => panic!("no tollgate_held: {other:?}"),
    };
    // Holds made until one shows the wanted book is in force (those before it were
    // placed under the other book), then `more` under it.
    let mut n = 0;
    let mut holds = Vec::new();
    let mut hold_under = |base: i64, more: usize| {
        let channel = channel.clone();
        let key = key.clone();
        let mut made = Vec::new();
        let start = n;
        n += 1000;
        async move {
            let deadline = Instant::now() + common::START_TIMEOUT;
            let mut i = start;
            let mut left = more;
            while left > 0 {
                i += 1;
                let m = common::gateways::ocr_hold(channel.clone(), &key, &format!("r{i}")).await;
                let h = held(&m);
                if h == base {
                    left -= 1;
                } else {
                    assert!(Instant::now() < deadline, "never reloaded (held {h})");
                }
                made.push((h, m));
            }
            made
        }
    };
    holds.extend(hold_under(50, 4).await);
    let mut logs = envoy_types::pb::envoy::service::accesslog::v3::access_log_service_client::AccessLogServiceClient::with_interceptor(
        channel.clone(),
        common::auth(Some(common::SERVICE_TOKEN)),
    );
    let metering = pb::metering_client::MeteringClient::with_interceptor(
        channel.clone(),
        common::auth(Some(common::SERVICE_TOKEN)),
    );
    let mut want_used = 0;
    for (round, (book, base)) in [(&dear, 60), (&cheap, 50), (&dear, 60), (&cheap, 50)]
        .into_iter()
        .enumerate()
    {
        std::fs::write(&config, book).expect("rewrite config");
        server.0.signal("-HUP");
        let placed = hold_under(base, 3).await;
        // Settle every hold made before this reload, now that the other book is in
        // force: 4 pages each, at the rate of the book that placed the hold.
        let entries: Vec<_> = holds
            .drain(..)
            .map(|(h, m)| {
                want_used += if h == 50 { 4 * 2 } else { 4 * 10 };
                common::gateways::access_log_entry(&m, 200, "4")
            })
            .collect();
        logs.stream_access_logs(tokio_stream::iter(vec![
            common::gateways::access_log_message(entries),
        ]))
        .await
        .expect("access log");
        holds = placed;
        // Settled: what is held is this round's holds, no more.
        let open: i64 = holds.iter().map(|(h, _)| h).sum();
        let used = common::eventually(common::START_TIMEOUT, "the holds settled", || {
            let mut metering = metering.clone();
            async move {
                let b = metering
                    .get_balance(pb::GetBalanceRequest {
                        account_id: "acme".into(),
                        wallet: "default".into(),
                        ..Default::default()
                    })
                    .await
                    .ok()?
                    .into_inner();
                let w = b.wallets.first()?;
                (w.held == open).then_some(w.total_used)
            }
        })
        .await;
        assert_eq!(
            used, want_used,
            "round {round}: each hold captured at the rate of the book that placed it"
        );
    }
    drop(server);
}

/// Debits while the price book is reloaded over and over: every allowed check is charged
/// exactly once, at a price one of the books had (1 or 5), and the ledger's total is the
/// sum of what the checks said they charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debits_under_reloads_are_charged_once_at_a_price_in_force() {
    use tollgate::api::pb;
    let redis = common::RedisServer::start();
    let dir = TempDir::new("reload-debits");
    let config = dir.0.join("tollgate.toml");
    let log = dir.0.join("serve.log");
    let one = example("pricebook-esign.toml");
    let five = replace(
        &one,
        "mode = \"debit\"\nbase = 1\n",
        "mode = \"debit\"\nbase = 5\n",
    );
    std::fs::write(&config, &one).expect("write config");
    let (server, grpc, http_port) = serve(&config, &redis.url(), &log).await;
    let http_addr: std::net::SocketAddr = ([127, 0, 0, 1], http_port).into();
    let (channel, key) = acme_with_credits(grpc).await;
    let stop = Arc::new(AtomicBool::new(false));
    // Checks charged 5 so far: each book is kept until one was (a busy machine may not
    // run a check between two reloads otherwise).
    let fives = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let loaders: Vec<_> = (0..3)
        .map(|_| {
            let stop = stop.clone();
            let fives = fives.clone();
            let key = key.clone();
            tokio::spawn(async move {
                let mut charged = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let headers = [
                        ("x-forwarded-method", "POST"),
                        ("x-forwarded-uri", "/v1/envelopes"),
                        ("x-api-key", key.as_str()),
                    ];
                    let r = http(http_addr, "GET", "/v1/forward-auth", &headers, "").await;
                    assert_eq!(r.status, 200, "{r:?}");
                    let n = charge(&r).expect("charged").parse::<i64>().expect("n");
                    if n == 5 {
                        fives.fetch_add(1, Ordering::SeqCst);
                    }
                    charged.push(n);
                }
                charged
            })
        })
        .collect();
    // Each reload is logged as done before the next.
    let reloads = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("price book reloaded")
            .count()
    };
    for book in [&five, &one, &five, &one] {
        let before = reloads();
        let fives_before = fives.load(Ordering::SeqCst);
        std::fs::write(&config, book).expect("rewrite config");
        server.0.signal("-HUP");
        common::eventually(common::START_TIMEOUT, "the reload is done", || async {
            (reloads() > before).then_some(())
        })
        .await;
        if book == &five {
            common::eventually(
                common::START_TIMEOUT,
                "a check at the new price",
                || async { (fives.load(Ordering::SeqCst) > fives_before).then_some(()) },
            )
            .await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for loader in loaders {
        all.extend(loader.await.expect("loader"));
    }
    assert!(all.iter().all(|c| *c == 1 || *c == 5), "{all:?}");
    assert!(all.contains(&5), "no check ran under the second book");
    let sum: i64 = all.iter().sum();
    let metering = pb::metering_client::MeteringClient::with_interceptor(
        channel.clone(),
        common::auth(Some(common::SERVICE_TOKEN)),
    );
    let used = metering
        .clone()
        .get_balance(pb::GetBalanceRequest {
            account_id: "acme".into(),
            wallet: "default".into(),
            ..Default::default()
        })
        .await
        .expect("balance")
        .into_inner()
        .wallets[0]
        .total_used;
    assert_eq!(used, sum, "each allowed check charged exactly once");
    drop(server);
}

/// With `gateway.request_id_replay`, a request retried with its request id after a reload
/// that changed its price replays its first answer: charged once, at the first price, the
/// same charge or hold. Its idempotency record used to hold a digest of the amount, so the
/// retry was refused 409 `request_id_reused` although the client did nothing wrong. The
/// same request id with other units or another variant is still another request (409).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_retried_after_a_reload_that_changed_its_price_replays_its_first_answer() {
    use envoy_types::pb::google::protobuf::{value::Kind, Struct};
    use tollgate::api::pb;
    let redis = common::RedisServer::start();
    let dir = TempDir::new("reload-replay");
    let config = dir.0.join("tollgate.toml");
    let log = dir.0.join("serve.log");
    let cheap = replace(
        &example("pricebook-esign.toml"),
        "[gateway]\n",
        "[gateway]\nrequest_id_replay = true\n",
    );
    // Dearer: an envelope 2 and 20 per Aadhaar signer; OCR holds 60.
    let dear = replace(
        &replace(
            &replace(
                &cheap,
                "mode = \"debit\"\nbase = 1\n",
                "mode = \"debit\"\nbase = 2\n",
            ),
            "aadhaar = { per_unit = 15,",
            "aadhaar = { per_unit = 20,",
        ),
        "mode = \"hold\"\nbase = 50\n",
        "mode = \"hold\"\nbase = 60\n",
    );
    std::fs::write(&config, &cheap).expect("write config");
    let (server, grpc, http_port) = serve(&config, &redis.url(), &log).await;
    let http_addr: std::net::SocketAddr = ([127, 0, 0, 1], http_port).into();
    let (channel, key) = acme_with_credits(grpc).await;
    let envelope = |request_id: &'static str, signers: &'static str, method: &'static str| {
        let key = key.clone();
        async move {
            let headers = [
                ("x-forwarded-method", "POST"),
                ("x-forwarded-uri", "/v1/envelopes"),
                ("x-api-key", key.as_str()),
                ("x-request-id", request_id),
                ("x-signature-method", method),
                ("x-signers", signers),
            ];
            http(http_addr, "GET", "/v1/forward-auth", &headers, "").await
        }
    };
    let text = |m: &Struct, field: &str| match m.fields.get(field).and_then(|v| v.kind.as_ref()) {
        Some(Kind::StringValue(s)) => s.clone(),
        other => panic!("no {field}: {other:?}"),
    };

    let first = envelope("env-1", "3", "aadhaar").await;
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(charge(&first), Some("46"), "1 + 15 x 3");
    let charge_id = first.header("x-tollgate-charge-id").expect("charge id");
    let hold = common::gateways::ocr_hold(channel.clone(), &key, "ocr-1").await;
    assert_eq!(text(&hold, "tollgate_held"), "50");

    let reloads = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("price book reloaded")
            .count()
    };
    let before = reloads();
    std::fs::write(&config, &dear).expect("rewrite config");
    server.0.signal("-HUP");
    common::eventually(common::START_TIMEOUT, "the reload is done", || async {
        (reloads() > before).then_some(())
    })
    .await;
    let fresh = envelope("env-2", "3", "aadhaar").await;
    assert_eq!(
        charge(&fresh),
        Some("62"),
        "the dear book is in force: {fresh:?}"
    );

    // The retries: the first answers, charged once.
    let retried = envelope("env-1", "3", "aadhaar").await;
    assert_eq!(retried.status, 200, "{retried:?}");
    assert_eq!(charge(&retried), Some("46"), "the first price");
    assert_eq!(retried.header("x-tollgate-charge-id"), Some(charge_id));
    // The same units spelled otherwise are the same request.
    let spelled = envelope("env-1", "03", "AADHAAR").await;
    assert_eq!(spelled.header("x-tollgate-charge-id"), Some(charge_id));
    let hold_again = common::gateways::ocr_hold(channel.clone(), &key, "ocr-1").await;
    assert_eq!(text(&hold_again, "tollgate_held"), "50");
    assert_eq!(
        text(&hold_again, "tollgate_hold_id"),
        text(&hold, "tollgate_hold_id")
    );

    // The same request id for another request: refused, nothing charged.
    for (signers, method) in [("4", "aadhaar"), ("3", "dsc")] {
        let other = envelope("env-1", signers, method).await;
        assert_eq!(other.status, 409, "{signers} {method}: {other:?}");
        assert_eq!(other.json()["error"], "request_id_reused");
    }

    let metering = pb::metering_client::MeteringClient::with_interceptor(
        channel.clone(),
        common::auth(Some(common::SERVICE_TOKEN)),
    );
    let wallet = metering
        .clone()
        .get_balance(pb::GetBalanceRequest {
            account_id: "acme".into(),
            wallet: "default".into(),
            ..Default::default()
        })
        .await
        .expect("balance")
        .into_inner()
        .wallets[0]
        .clone();
    assert_eq!(
        (wallet.total_used, wallet.held),
        (46 + 62, 50),
        "each request charged once, at the price it was first charged"
    );
    drop(server);
}

/// A SIGHUP to a server without a config file (settings from the environment) is
/// logged and ignored: it must not end the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_without_a_config_file_does_not_stop_the_server() {
    let redis = common::RedisServer::start();
    let dir = TempDir::new("reload-none");
    let log = dir.0.join("serve.log");
    let (mut server, _, http_port) = serve_on_free_ports(&log, |grpc, http_port| {
        let mut cmd = common::tollgate();
        cmd.arg("serve")
            .arg(format!("--redis-url={}", redis.url()))
            .arg(format!("--grpc-addr=127.0.0.1:{grpc}"))
            .arg(format!("--http-addr=127.0.0.1:{http_port}"))
            .arg(format!("--store={}", common::temp_sqlite_url()))
            .current_dir(&dir.0)
            .env("TOLLGATE_ADMIN_TOKEN", common::ADMIN_TOKEN)
            .env("TOLLGATE_SERVICE_TOKEN", common::SERVICE_TOKEN)
            .env("RUST_LOG", "info");
        cmd
    })
    .await;
    let http_addr: std::net::SocketAddr = ([127, 0, 0, 1], http_port).into();
    common::eventually(common::START_TIMEOUT, "the server answers", || async move {
        try_http(http_addr, "GET", "/healthz", &[], "")
            .await
            .is_ok_and(|r| r.status == 200)
            .then_some(())
    })
    .await;
    server.0.signal("-HUP");
    common::eventually(common::START_TIMEOUT, "the SIGHUP is logged", || {
        let log = log.clone();
        async move {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("nothing to reload")
                .then_some(())
        }
    })
    .await;
    server.0.assert_running("the server ended on SIGHUP");
    assert_eq!(common::http_get(http_addr, "/healthz").await.0, 200);
}

#[test]
fn a_broken_price_book_stops_start_up_with_every_error() {
    let dir = TempDir::new("badbook");
    let config = dir.0.join("tollgate.toml");
    let broken = replace(
        &example("pricebook-esign.toml"),
        "operation = \"ocr.pages\"",
        "operation = \"ocr.page\"",
    );
    let broken = replace(
        &broken,
        "capture_statuses = [\"2xx\"]",
        "capture_statuses = [\"2xy\"]",
    );
    std::fs::write(&config, broken).expect("write");
    // Nothing of the machine's defaults (a Redis that is not there, a private store, free
    // ports): were the book taken, the server would not answer, and `output_within` ends
    // it instead of the test hanging.
    let out = common::output_within(
        common::tollgate()
            .arg("serve")
            .arg(format!("--config={}", config.display()))
            .arg("--redis-url=redis://127.0.0.1:1")
            .arg(format!("--store={}", common::temp_sqlite_url()))
            .arg(format!("--grpc-addr=127.0.0.1:{}", common::free_port()))
            .arg(format!("--http-addr=127.0.0.1:{}", common::free_port()))
            .env("TOLLGATE_ADMIN_TOKEN", "a")
            .env("TOLLGATE_SERVICE_TOKEN", "s"),
        Duration::from_secs(60),
    );
    assert!(!out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stderr);
    for path in [
        "pricebook.routes[1].operation",
        "pricebook.operations.\"ocr.pages\".capture_statuses[0]",
    ] {
        assert!(text.contains(path), "{path} missing:\n{text}");
    }
}
