//! /metrics after a scripted workload: exact counter values, cross-checked against the
//! ledger's own totals. This binary holds one test only: the Prometheus recorder is global
//! to the process, so a second test would add to the counts.
//!
//! It also writes the scrape to metrics-sample.txt in the target directory
//! ($CARGO_TARGET_DIR, else target/), which scripts/check-chart.py uses to check that every
//! metric the Grafana dashboard and the chart's alerts query exists.

mod common;

use std::time::Duration;

use common::prom;
use tollgate::api::pb;
use tollgate::ledger::Clock;

/// Generous: nothing here measures time; it only bounds the waits.
const DEADLINE: Duration = Duration::from_secs(120);

async fn scrape(server: &common::TestServer) -> String {
    let (code, body) = common::http_get(server.http_addr, "/metrics").await;
    assert_eq!(code, 200, "{body}");
    body
}

fn grant(account: &str, amount: i64, kind: &str, key: &str) -> pb::GrantRequest {
    pb::GrantRequest {
        account_id: account.into(),
        amount,
        kind: kind.into(),
        idempotency_key: key.into(),
        ..Default::default()
    }
}

fn debit(account: &str, amount: i64, key: &str) -> pb::DebitRequest {
    pb::DebitRequest {
        account_id: account.into(),
        amount,
        idempotency_key: key.into(),
        operation: "test.call".into(),
        ..Default::default()
    }
}

fn authorize(account: &str, amount: i64, key: &str) -> pb::AuthorizeRequest {
    pb::AuthorizeRequest {
        account_id: account.into(),
        amount,
        ttl_ms: 600_000,
        idempotency_key: key.into(),
        ..Default::default()
    }
}

/// A forward-auth check of `POST /v1/envelopes` with an electronic signature; its status.
async fn forward_auth(addr: std::net::SocketAddr, key: Option<&str>, request_id: &str) -> u16 {
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    forward_auth_of(
        addr,
        "POST",
        "/v1/envelopes",
        &format!("x-signature-method: electronic\r\nx-request-id: {request_id}\r\n{auth}"),
    )
    .await
}

/// A forward-auth check of `method uri` with extra header lines; its status.
async fn forward_auth_of(
    addr: std::net::SocketAddr,
    method: &str,
    uri: &str,
    headers: &str,
) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("http");
    let request = format!(
        "GET /v1/forward-auth HTTP/1.1\r\nHost: x\r\nX-Forwarded-Method: {method}\r\n\
         X-Forwarded-Uri: {uri}\r\nX-Forwarded-Host: api.example.com\r\n{headers}\
         Connection: close\r\n\r\n"
    );
    s.write_all(request.as_bytes()).await.expect("write");
    let mut text = String::new();
    s.read_to_string(&mut text).await.expect("read");
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_after_a_scripted_workload() {
    let redis = common::RedisServer::start();
    let receiver = common::receiver::Receiver::start().await;
    // The esign price book, so gateway checks run too.
    let mut config = common::gateways::esign_config(&redis.url());
    config.settler.enabled = true;
    config.settler.idle_wait_ms = 10;
    config.settler.trim_interval_ms = 100;
    config.settler.backoff_max_ms = 500;
    config.webhooks.url = receiver.url();
    config.webhooks.secret = "metrics-test-secret".into();
    config.webhooks.poll_interval_ms = 50;
    // The identity cache's counts below are exact: an entry, and the doorkeeper's memory
    // of a key's first miss (cleared once per TTL from the server's start), must outlast
    // the checks however slowly a busy machine runs them.
    config.gateway.identity_cache_ttl_ms = 3_600_000;
    let server = common::TestServer::start(config, Clock::Redis).await;
    let mut admin = server.admin().await;
    let mut metering = server.metering().await;

    // A message that does not decode (account_id not UTF-8): the caller's fault, counted
    // as INVALID_ARGUMENT (tonic's own answer, INTERNAL, was counted as a server fault).
    let status = common::raw_unary_error(
        &server,
        "/tollgate.v1.Metering/Debit",
        common::RawField1 { field1: vec![0xff] },
    )
    .await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    // The workload: 17 ledger events.
    admin
        .grant(grant("alice", 100, "purchase", "g1"))
        .await
        .expect("grant");
    admin
        .grant(grant("alice", 50, "promo", "g2"))
        .await
        .expect("grant");
    admin
        .grant(grant("bob", 30, "purchase", "g3"))
        .await
        .expect("grant");
    let mut charges = Vec::new();
    for i in 1..=5 {
        let out = metering
            .debit(debit("alice", 7, &format!("d{i}")))
            .await
            .expect("debit")
            .into_inner();
        charges.push(out.charge_id);
    }
    let replay = metering
        .debit(debit("alice", 7, "d1"))
        .await
        .expect("replay")
        .into_inner();
    assert!(replay.replayed);
    let refused = metering
        .debit(debit("bob", 40, "b1"))
        .await
        .expect_err("insufficient");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    metering.debit(debit("bob", 10, "b2")).await.expect("debit");
    let h1 = metering
        .authorize(authorize("alice", 20, "h1"))
        .await
        .expect("hold")
        .into_inner()
        .hold_id;
    metering
        .capture(pb::CaptureRequest {
            hold_id: h1,
            amount: Some(12),
            idempotency_key: "c1".into(),
            ..Default::default()
        })
        .await
        .expect("capture");
    let h2 = metering
        .authorize(authorize("alice", 5, "h2"))
        .await
        .expect("hold")
        .into_inner()
        .hold_id;
    metering
        .release(pb::ReleaseRequest {
            hold_id: h2,
            idempotency_key: "r1".into(),
            ..Default::default()
        })
        .await
        .expect("release");
    metering
        .authorize(authorize("bob", 5, "h3"))
        .await
        .expect("hold stays open");
    metering
        .refund(pb::RefundRequest {
            charge_id: charges[1].clone(),
            amount: 3,
            idempotency_key: "f1".into(),
            ..Default::default()
        })
        .await
        .expect("refund");
    admin
        .adjust(pb::AdjustRequest {
            account_id: "alice".into(),
            amount: -2,
            idempotency_key: "a1".into(),
            ..Default::default()
        })
        .await
        .expect("adjust down");
    admin
        .adjust(pb::AdjustRequest {
            account_id: "bob".into(),
            amount: 4,
            idempotency_key: "a2".into(),
            ..Default::default()
        })
        .await
        .expect("adjust up");

    // Settled (17 events), the open hold counted, the three grant.created delivered.
    let text = common::eventually(DEADLINE, "settlement and webhook delivery", || async {
        let text = scrape(&server).await;
        let settled = prom::value(&text, "tollgate_settled_events_total", &[]);
        let holds = prom::value(&text, "tollgate_holds_active", &[]);
        let delivered = prom::value(
            &text,
            "tollgate_webhook_attempts_total",
            &[("result", "delivered")],
        );
        let ready = prom::value(&text, "tollgate_ready", &[]);
        let redis_up = prom::value(&text, "tollgate_redis_up", &[]);
        (settled == 17.0 && holds == 1.0 && delivered == 3.0 && ready == 1.0 && redis_up == 1.0)
            .then_some(text)
    })
    .await;

    let v = |name: &str, labels: &[(&str, &str)]| prom::value(&text, name, labels);
    let calls = |script: &str| {
        v(
            "tollgate_redis_script_duration_seconds_count",
            &[("script", script)],
        )
    };
    // Script calls, exactly: a replay and a refusal are calls too.
    assert_eq!(calls("debit"), 8.0);
    assert_eq!(calls("grant"), 3.0);
    assert_eq!(calls("authorize"), 3.0);
    assert_eq!(calls("end_hold"), 2.0);
    assert_eq!(calls("refund"), 1.0);
    assert_eq!(calls("adjust"), 2.0);
    assert_eq!(v("tollgate_redis_script_errors_total", &[]), 0.0);
    // Registered at zero; a healthy Redis's connection is never replaced.
    assert!(prom::has(
        &text,
        "tollgate_redis_connections_replaced_total"
    ));
    assert_eq!(v("tollgate_redis_connections_replaced_total", &[]), 0.0);
    assert_eq!(
        v(
            "tollgate_ledger_refusals_total",
            &[("script", "debit"), ("reason", "INSUFFICIENT_CREDITS")]
        ),
        1.0
    );
    assert_eq!(v("tollgate_ledger_refusals_total", &[]), 1.0);
    assert_eq!(
        v("tollgate_ledger_replays_total", &[("script", "debit")]),
        1.0
    );
    assert_eq!(
        v(
            "tollgate_grpc_failed_requests_total",
            &[
                ("service", "tollgate.v1.Metering"),
                ("code", "FAILED_PRECONDITION")
            ]
        ),
        1.0
    );
    assert_eq!(
        v(
            "tollgate_grpc_failed_requests_total",
            &[
                ("service", "tollgate.v1.Metering"),
                ("code", "INVALID_ARGUMENT")
            ]
        ),
        1.0
    );
    assert_eq!(
        v(
            "tollgate_grpc_failed_requests_total",
            &[("code", "INTERNAL")]
        ),
        0.0
    );

    // Credits, exactly, and equal to the ledger's own totals.
    assert_eq!(
        v("tollgate_credits_charged_total", &[("event", "debit")]),
        45.0
    );
    assert_eq!(
        v("tollgate_credits_charged_total", &[("event", "capture")]),
        12.0
    );
    assert_eq!(
        v("tollgate_credits_granted_total", &[("kind", "purchase")]),
        130.0
    );
    assert_eq!(
        v("tollgate_credits_granted_total", &[("kind", "promo")]),
        50.0
    );
    assert_eq!(v("tollgate_credits_refunded_total", &[]), 3.0);
    assert_eq!(v("tollgate_credits_expired_total", &[]), 0.0);
    assert_eq!(
        v("tollgate_credits_adjusted_total", &[("direction", "up")]),
        4.0
    );
    assert_eq!(
        v("tollgate_credits_adjusted_total", &[("direction", "down")]),
        2.0
    );
    let mut used = 0;
    let mut granted = 0;
    let mut refunded = 0;
    for account in ["alice", "bob"] {
        let balance = metering
            .get_balance(pb::GetBalanceRequest {
                account_id: account.into(),
                wallet: String::new(),
                ..Default::default()
            })
            .await
            .expect("balance")
            .into_inner();
        for w in balance.wallets {
            used += w.total_used;
            granted += w.total_granted;
            refunded += w.total_refunded;
        }
    }
    assert_eq!(v("tollgate_credits_charged_total", &[]), used as f64);
    assert_eq!(v("tollgate_credits_granted_total", &[]), granted as f64);
    assert_eq!(v("tollgate_credits_refunded_total", &[]), refunded as f64);

    // Settlement and webhooks.
    assert_eq!(v("tollgate_settle_batch_events_sum", &[]), 17.0);
    assert_eq!(v("tollgate_store_errors_total", &[]), 0.0);
    assert_eq!(
        v(
            "tollgate_webhook_events_total",
            &[("type", "grant.created")]
        ),
        3.0
    );
    assert_eq!(v("tollgate_webhook_events_total", &[]), 3.0);
    assert_eq!(receiver.accepted().len(), 3);

    // Labels are bounded: no account id, key or charge id anywhere in the exposition.
    for secret in ["alice", "bob", "d1", "g1", "h1", charges[1].as_str()] {
        assert!(
            !text.contains(&format!("\"{secret}\"")),
            "{secret} leaked into /metrics"
        );
    }

    // A hold that ends by expiry lowers the open-holds gauge as a capture or a release does
    // (the store's count, src/settle/store.rs `holds_delta`): bob's 1-ms hold is overdue at
    // once and GetBalance ends it; h3 stays the one open hold.
    metering
        .authorize(pb::AuthorizeRequest {
            on_expiry: "release".into(),
            ttl_ms: 1,
            ..authorize("bob", 2, "h4")
        })
        .await
        .expect("short hold");
    common::eventually(DEADLINE, "the short hold expired", || async {
        let held = metering
            .clone()
            .get_balance(pb::GetBalanceRequest {
                account_id: "bob".into(),
                wallet: "default".into(),
                ..Default::default()
            })
            .await
            .expect("balance")
            .into_inner()
            .wallets[0]
            .held;
        (held == 5).then_some(())
    })
    .await;
    let text = common::eventually(DEADLINE, "the hold and its expiry settled", || async {
        let text = scrape(&server).await;
        (prom::value(&text, "tollgate_settled_events_total", &[]) == 19.0).then_some(text)
    })
    .await;
    assert_eq!(prom::value(&text, "tollgate_holds_active", &[]), 1.0);

    // Gateway checks through forward-auth: one allowed (charged 1+10), one without a key.
    let key = admin
        .create_api_key(pb::CreateApiKeyRequest {
            account_id: "carol".into(),
            name: "metrics".into(),
            ..Default::default()
        })
        .await
        .expect("key")
        .into_inner()
        .api_key;
    admin
        .grant(grant("carol", 100, "purchase", "gc"))
        .await
        .expect("grant");
    let allowed = forward_auth(server.http_addr, Some(&key), "m-1").await;
    assert_eq!(allowed, 200);
    // The same key again: a second miss lets it into the identity cache, the third use
    // is answered from there.
    assert_eq!(forward_auth(server.http_addr, Some(&key), "m-3").await, 200);
    assert_eq!(forward_auth(server.http_addr, Some(&key), "m-4").await, 200);
    let denied = forward_auth(server.http_addr, None, "m-2").await;
    assert_eq!(denied, 401);
    let text = scrape(&server).await;
    let v = |name: &str, labels: &[(&str, &str)]| prom::value(&text, name, labels);
    assert_eq!(
        v(
            "tollgate_checks_total",
            &[("decision", "allow"), ("operation", "envelope.send")]
        ),
        3.0
    );
    assert_eq!(v("tollgate_checks_total", &[("decision", "deny")]), 1.0);
    // Every check is labelled with the price-book target it was routed to, whatever
    // the decision: the 401 above on a priced route too.
    assert_eq!(
        v(
            "tollgate_checks_total",
            &[("decision", "deny"), ("operation", "envelope.send")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        v(
            "tollgate_gateway_denials_total",
            &[("reason", "missing_api_key")]
        ),
        1.0
    );
    assert_eq!(v("tollgate_identity_cache_misses_total", &[]), 2.0);
    assert_eq!(v("tollgate_identity_cache_hits_total", &[]), 1.0);
    assert_eq!(v("tollgate_fail_open_total", &[]), 0.0);
    assert_eq!(v("tollgate_config_reloads_total", &[]), 0.0);
    // Access-log retries: every result present from the start (the chart's alert on the
    // lost ones sees the first), none counted (no access log here).
    for result in [
        "settled",
        "hold_ended",
        "failed",
        "gave_up",
        "queue_full",
        "shutdown",
    ] {
        let series = format!("tollgate_access_log_retries_total{{result=\"{result}\"}} 0");
        assert!(text.contains(&series), "{series}\n{text}");
    }
    // Voids of late fail_closed charges: every outcome present from the start, none
    // counted (no check met a deadline).
    for outcome in [
        "refunded", "released", "nothing", "failed", "gave_up", "dropped",
    ] {
        let series = format!("tollgate_gateway_voids_total{{outcome=\"{outcome}\"}} 0");
        assert!(text.contains(&series), "{series}\n{text}");
    }
    assert!(text.contains("tollgate_check_duration_seconds_bucket"));
    assert!(!text.contains(&key), "an API key leaked into /metrics");

    // A 400 (bad units header) on a priced route, a free route, a request no route
    // matches: each under its price-book target, never a label of the request's own.
    let bad_units = format!(
        "x-signature-method: aadhaar\r\nx-signers: many\r\nAuthorization: Bearer {key}\r\n"
    );
    assert_eq!(
        forward_auth_of(server.http_addr, "POST", "/v1/envelopes", &bad_units).await,
        400
    );
    assert_eq!(
        forward_auth_of(server.http_addr, "GET", "/v1/status-of-something", "").await,
        200
    );
    assert_eq!(
        forward_auth_of(server.http_addr, "GET", "/elsewhere/unrouted", "").await,
        403
    );
    let text = scrape(&server).await;
    let v = |name: &str, labels: &[(&str, &str)]| prom::value(&text, name, labels);
    let checks = |decision: &str, operation: &str| {
        v(
            "tollgate_checks_total",
            &[("decision", decision), ("operation", operation)],
        )
    };
    assert_eq!(checks("deny", "envelope.send"), 2.0, "{text}");
    assert_eq!(checks("allow", "free"), 1.0, "{text}");
    assert_eq!(checks("deny", "deny"), 1.0, "{text}");
    assert_eq!(checks("allow", ""), 0.0, "{text}");
    assert_eq!(checks("deny", ""), 0.0, "{text}");
    for sample in prom::parse(&text) {
        if sample.name == "tollgate_checks_total" {
            let op = sample.labels.get("operation").map(String::as_str);
            assert!(
                matches!(op, Some("envelope.send" | "free" | "deny")),
                "{sample:?}"
            );
        }
    }
    // Every background task of `serve` is supervised: its series is there, at 0 (no task
    // ended before shutdown). The restorer runs only with `server.restore`, off here.
    for task in [
        "settler",
        "webhooks",
        "sweeper",
        "spool_replayer",
        "access_log_retrier",
        "shard_initializer",
        "reloader",
    ] {
        let ended: Vec<f64> = prom::parse(&text)
            .into_iter()
            .filter(|s| {
                s.name == "tollgate_background_task_ended"
                    && s.labels.get("task").map(String::as_str) == Some(task)
            })
            .map(|s| s.value)
            .collect();
        assert_eq!(ended, [0.0], "{task}: {text}");
    }

    // A sample for scripts/check-chart.py (dashboard queries must name real metrics), in the
    // target directory: $CARGO_TARGET_DIR (relative to the package root when relative), as
    // cargo and the script read it, else target/.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .filter(|dir| !dir.is_empty())
        .unwrap_or_else(|| "target".into());
    let sample = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(target);
    std::fs::create_dir_all(&sample).expect("target dir");
    std::fs::write(sample.join("metrics-sample.txt"), &text).expect("write the sample");
    server.stop().await;
}
