//! The three credit systems of shared/domain, each run through its shipped example
//! (examples/pricebook-attestr.toml, pricebook-verifik.toml, pricebook-signsecure.toml)
//! end to end: grants of every kind, checks through HTTP forward-auth, refusals naming
//! the wallet, holds, expiry, refunds and organization allocations. And every shipped
//! example passes `tollgate check-config`, so none can rot.

mod common;

use std::sync::atomic::Ordering;

use tonic_types::StatusExt;

use common::gateways::{esign_config_from, example, http, HttpResponse};
use tollgate::api::pb;
use tollgate::ledger::Clock;

/// 2026-11-23 10:00:00 UTC.
const START_MS: i64 = 1_795_428_000_000;
const DAY_MS: i64 = 86_400_000;

fn reason(status: &tonic::Status) -> String {
    status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

/// A forward-auth check of `method path` with an API key (none when empty) and headers.
async fn check(
    server: &common::TestServer,
    key: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> HttpResponse {
    let mut all = vec![("x-forwarded-method", method), ("x-forwarded-uri", path)];
    if !key.is_empty() {
        all.push(("x-api-key", key));
    }
    all.extend_from_slice(headers);
    http(server.http_addr, "GET", "/v1/forward-auth", &all, "").await
}

fn charged(r: &HttpResponse) -> Option<i64> {
    r.header("x-tollgate-charged").and_then(|v| v.parse().ok())
}

async fn grant(server: &common::TestServer, request: pb::GrantRequest) -> pb::GrantResponse {
    server
        .admin()
        .await
        .grant(request)
        .await
        .expect("grant")
        .into_inner()
}

async fn personal_key(server: &common::TestServer, account: &str) -> String {
    server
        .admin()
        .await
        .create_api_key(pb::CreateApiKeyRequest {
            account_id: account.into(),
            name: "integration".into(),
            ..Default::default()
        })
        .await
        .expect("key")
        .into_inner()
        .api_key
}

async fn wallet(server: &common::TestServer, account: &str, wallet: &str) -> pb::WalletBalance {
    server
        .metering()
        .await
        .get_balance(pb::GetBalanceRequest {
            account_id: account.into(),
            wallet: wallet.into(),
            ..Default::default()
        })
        .await
        .expect("balance")
        .into_inner()
        .wallets
        .into_iter()
        .find(|w| w.wallet == wallet)
        .unwrap_or_else(|| panic!("no wallet {wallet}"))
}

async fn lots(server: &common::TestServer, account: &str, wallet: &str) -> Vec<pb::Lot> {
    server
        .metering()
        .await
        .list_lots(pb::ListLotsRequest {
            account_id: account.into(),
            wallet: wallet.into(),
            ..Default::default()
        })
        .await
        .expect("lots")
        .into_inner()
        .lots
}

#[test]
fn every_shipped_example_passes_check_config() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(dir).expect("examples/") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let out = common::output_within(
            common::tollgate()
                .args(["check-config", "--dev", "--config"])
                .arg(&path),
            common::COMMAND_TIMEOUT,
        );
        assert!(out.status.success(), "{}: {out:?}", path.display());
        checked.push(
            path.file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned(),
        );
    }
    checked.sort();
    for company in [
        "pricebook-attestr.toml",
        "pricebook-esign.toml",
        "pricebook-signsecure.toml",
        "pricebook-verifik.toml",
    ] {
        assert!(checked.iter().any(|c| c == company), "{checked:?}");
    }
}

/// Attestr: a wallet per service, demo credits once (burnt first), purchases that never
/// expire, no overdraft, and a refusal that names the wallet to top up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attestr_wallets_per_service_with_demo_credits_once() {
    let redis = common::RedisServer::start();
    let config = esign_config_from(&redis.url(), &example("pricebook-attestr.toml"));
    let server = common::TestServer::start(config, Clock::Redis).await;
    let demo = |wallet: &str, key: &str| pb::GrantRequest {
        account_id: "acme".into(),
        wallet: wallet.into(),
        amount: 3,
        kind: "demo".into(),
        priority: Some(10),
        idempotency_key: key.into(),
        ..Default::default()
    };
    grant(&server, demo("pan", "demo-pan")).await;
    // Offered once: a second demo grant into the wallet is refused, whatever its key.
    let again = server
        .admin()
        .await
        .grant(demo("pan", "demo-pan-again"))
        .await
        .expect_err("a second demo grant");
    assert_eq!(reason(&again), "DEMO_ALREADY_GRANTED", "{again:?}");
    // Once per account and wallet: another service's wallet gets its own.
    grant(&server, demo("gstin", "demo-gstin")).await;
    grant(
        &server,
        pb::GrantRequest {
            account_id: "acme".into(),
            wallet: "pan".into(),
            amount: 5,
            description: "order 1042".into(),
            idempotency_key: "order-1042".into(),
            ..Default::default()
        },
    )
    .await;
    let key = personal_key(&server, "acme").await;

    // PAN checks: the demo credits go first, then the purchase.
    for left in (5..8).rev() {
        let r = check(&server, &key, "POST", "/api/v2/public/checkx/pan", &[]).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("x-tollgate-operation"), Some("pan.verify"));
        assert_eq!(charged(&r), Some(1));
        assert_eq!(r.header("x-credits-remaining"), Some(&*left.to_string()));
    }
    let pan = lots(&server, "acme", "pan").await;
    assert_eq!(pan.len(), 1, "the demo lot is used up: {pan:?}");
    assert_eq!((pan[0].kind.as_str(), pan[0].remaining), ("purchase", 5));
    assert_eq!(pan[0].expires_at_ms, 0, "purchases never expire");

    // GSTIN: its 3 demo credits, then 402 naming its wallet; PAN's credits are not used.
    for _ in 0..3 {
        let r = check(&server, &key, "POST", "/api/v2/public/checkx/gstin", &[]).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    let r = check(&server, &key, "POST", "/api/v2/public/checkx/gstin", &[]).await;
    assert_eq!(r.status, 402, "{r:?}");
    assert_eq!(
        r.json(),
        serde_json::json!({
            "error": "insufficient_credits", "required": 1, "available": 0,
            "operation": "gstin.verify", "wallet": "gstin"
        })
    );
    // A service never bought: refused, naming its wallet.
    let r = check(
        &server,
        &key,
        "POST",
        "/api/v2/public/finx/bank-account",
        &[],
    )
    .await;
    assert_eq!(r.status, 402, "{r:?}");
    assert_eq!(r.json()["wallet"], "bank");
    assert_eq!(wallet(&server, "acme", "pan").await.available, 5);
    // An unpriced path is refused, not free.
    let r = check(&server, &key, "POST", "/api/v2/public/other", &[]).await;
    assert_eq!(r.status, 403, "{r:?}");
    server.stop().await;
}

/// Verifik: credit records per service with an expiry, a promotion burnt first, a hold
/// captured by the frames analysed or by its expiry, budgets, free reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verifik_expiring_credit_records_holds_and_budgets() {
    let redis = common::RedisServer::start();
    let (clock, now) = Clock::manual(START_MS);
    let config = esign_config_from(&redis.url(), &example("pricebook-verifik.toml"));
    let server = common::TestServer::start(config, clock).await;
    let smartcheck = |amount, kind: &str, priority, expires_at_ms, key: &str| pb::GrantRequest {
        account_id: "vk".into(),
        wallet: "smartcheck".into(),
        amount,
        kind: kind.into(),
        priority,
        expires_at_ms,
        description: format!("{kind} credits"),
        idempotency_key: key.into(),
        ..Default::default()
    };
    grant(
        &server,
        smartcheck(1000, "purchase", None, START_MS + DAY_MS, "p1"),
    )
    .await;
    grant(
        &server,
        smartcheck(200, "promo", Some(10), START_MS + 30 * DAY_MS, "promo"),
    )
    .await;
    grant(&server, smartcheck(500, "purchase", None, 0, "p2")).await;
    grant(
        &server,
        pb::GrantRequest {
            account_id: "vk".into(),
            wallet: "biometric".into(),
            amount: 100,
            idempotency_key: "bio".into(),
            ..Default::default()
        },
    )
    .await;
    let key = personal_key(&server, "vk").await;

    // SmartCheck costs 2, from the promotion first.
    let r = check(&server, &key, "POST", "/v2/smartcheck/cedula", &[]).await;
    assert_eq!((r.status, charged(&r)), (200, Some(2)), "{r:?}");
    let records = lots(&server, "vk", "smartcheck").await;
    let burn: Vec<_> = records
        .iter()
        .map(|l| (l.kind.as_str(), l.used, l.remaining, l.expires_at_ms))
        .collect();
    assert_eq!(
        burn,
        [
            ("promo", 2, 198, START_MS + 30 * DAY_MS),
            ("purchase", 0, 1000, START_MS + DAY_MS),
            ("purchase", 0, 500, 0),
        ]
    );
    assert_eq!(records[1].description, "purchase credits");

    // A day later the first purchase has expired, unused.
    now.store(START_MS + DAY_MS + 1, Ordering::SeqCst);
    let w = wallet(&server, "vk", "smartcheck").await;
    assert_eq!((w.available, w.total_expired), (698, 1000), "{w:?}");

    // Liveness: 20 held, 3 frames × 4 captured by the API, the rest released.
    let r = check(&server, &key, "POST", "/v2/biometrics/liveness", &[]).await;
    assert_eq!((r.status, charged(&r)), (200, Some(20)), "{r:?}");
    let hold = r.header("x-tollgate-hold-id").expect("hold id").to_owned();
    let settled = http(
        server.http_addr,
        "POST",
        &format!("/v1/holds/{hold}/capture"),
        &[(
            "authorization",
            &format!("Bearer {}", common::gateways::service_token()),
        )],
        r#"{"amount": 12}"#,
    )
    .await;
    assert_eq!(settled.status, 200, "{settled:?}");
    assert_eq!(
        (
            settled.json()["captured"].as_i64(),
            settled.json()["released"].as_i64()
        ),
        (Some(12), Some(8))
    );
    // One nobody settles is captured whole at its deadline (on_expiry = "capture").
    let r = check(&server, &key, "POST", "/v2/biometrics/liveness", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    now.fetch_add(120_001, Ordering::SeqCst);
    let w = wallet(&server, "vk", "biometric").await;
    assert_eq!((w.available, w.held, w.total_used), (68, 0, 32), "{w:?}");

    // A service not bought: 402 naming its wallet.
    let r = check(&server, &key, "POST", "/v2/smartenroll/onboard", &[]).await;
    assert_eq!(r.status, 402, "{r:?}");
    assert_eq!(r.json()["wallet"], "smartenroll");

    // Budget control: 4 credits a day of SmartCheck, so the third check is refused.
    server
        .admin()
        .await
        .set_budget(pb::SetBudgetRequest {
            account_id: "vk".into(),
            wallet: "smartcheck".into(),
            limit: 4,
            period: "day".into(),
            idempotency_key: "budget".into(),
            ..Default::default()
        })
        .await
        .expect("budget");
    for _ in 0..2 {
        let r = check(&server, &key, "POST", "/v2/smartcheck/cedula", &[]).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    let r = check(&server, &key, "POST", "/v2/smartcheck/cedula", &[]).await;
    assert_eq!(r.status, 429, "{r:?}");
    let body = r.json();
    assert_eq!(
        (&body["error"], &body["limit"], &body["wallet"]),
        (
            &serde_json::json!("budget_exceeded"),
            &serde_json::json!(4),
            &serde_json::json!("smartcheck")
        )
    );
    // Reading credit records is free and needs no key.
    let r = check(&server, "", "GET", "/v2/credits", &[]).await;
    assert_eq!((r.status, charged(&r)), (200, None), "{r:?}");
    server.stop().await;
}

/// SignSecure: envelopes mixing signature methods priced by one check, an org member's
/// envelope refunded in part when signers never signed (allocation given back), and the
/// balance by key in the organization context.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signsecure_mixed_envelopes_org_allocations_and_refunds() {
    let redis = common::RedisServer::start();
    let config = esign_config_from(&redis.url(), &example("pricebook-signsecure.toml"));
    assert_eq!(
        config.ledger.charge_retention_secs,
        60 * 86_400,
        "refunds of envelopes cancelled weeks later need their charge records"
    );
    let server = common::TestServer::start(config, Clock::Redis).await;
    grant(
        &server,
        pb::GrantRequest {
            account_id: "solo".into(),
            amount: 500,
            idempotency_key: "preset-500".into(),
            ..Default::default()
        },
    )
    .await;
    let key = personal_key(&server, "solo").await;
    let send = |headers: &'static [(&'static str, &'static str)]| {
        let server = &server;
        let key = key.clone();
        async move { check(server, &key, "POST", "/api/v1/envelopes", headers).await }
    };
    let cases: [(&[(&str, &str)], i64); 6] = [
        (&[], 1),
        (&[("x-flat-signature-methods", "electronic")], 11),
        (&[("x-flat-signature-methods", "DSC")], 11),
        (&[("x-flat-signature-methods", "dsc,electronic")], 21),
        (&[("x-aadhaar-signers", "3")], 46),
        (
            &[
                ("x-flat-signature-methods", "electronic"),
                ("x-aadhaar-signers", "3"),
            ],
            56,
        ),
    ];
    for (headers, price) in cases {
        let r = send(headers).await;
        assert_eq!(
            (r.status, charged(&r)),
            (200, Some(price)),
            "{headers:?}: {r:?}"
        );
    }
    let r = send(&[("x-flat-signature-methods", "wet-ink")]).await;
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.json()["header"], "x-flat-signature-methods");

    // The organization workspace: alice spends her allocation of the org wallet.
    common::org_with_members(&server, "acme", "olivia", 5_000, &[("alice", "member")]).await;
    let mut admin = server.admin().await;
    admin
        .set_allocation(pb::SetAllocationRequest {
            org_id: "acme".into(),
            member_id: "alice".into(),
            amount: 100,
            actor_id: "olivia".into(),
            idempotency_key: "alloc-alice".into(),
            ..Default::default()
        })
        .await
        .expect("allocate");
    let alice = admin
        .create_api_key(pb::CreateApiKeyRequest {
            org_id: "acme".into(),
            member_id: "alice".into(),
            actor_id: "olivia".into(),
            name: "alice".into(),
            ..Default::default()
        })
        .await
        .expect("org key")
        .into_inner();
    let r = check(
        &server,
        &alice.api_key,
        "POST",
        "/api/v1/envelopes",
        &[
            ("x-flat-signature-methods", "electronic"),
            ("x-aadhaar-signers", "3"),
        ],
    )
    .await;
    assert_eq!((r.status, charged(&r)), (200, Some(56)), "{r:?}");
    assert_eq!(r.header("x-tollgate-account"), Some("acme"));
    assert_eq!(r.header("x-credits-remaining"), Some("44"));
    let charge_id = r
        .header("x-tollgate-charge-id")
        .expect("charge id")
        .to_owned();
    // The next one does not fit her allocation: 402 naming it and the wallet.
    let r = check(
        &server,
        &alice.api_key,
        "POST",
        "/api/v1/envelopes",
        &[("x-aadhaar-signers", "3")],
    )
    .await;
    assert_eq!(r.status, 402, "{r:?}");
    assert_eq!(
        (&r.json()["error"], &r.json()["wallet"]),
        (
            &serde_json::json!("allocation_exceeded"),
            &serde_json::json!("default")
        )
    );
    // Two Aadhaar signers never signed: their 30 come back, to the org and to alice.
    let refund = server
        .metering()
        .await
        .refund(pb::RefundRequest {
            charge_id,
            amount: 30,
            idempotency_key: "cancel-envelope-1".into(),
            ..Default::default()
        })
        .await
        .expect("refund")
        .into_inner();
    assert_eq!(refund.refunded, 30);
    let view = server
        .metering()
        .await
        .get_balance(pb::GetBalanceRequest {
            key_id: alice.key_id,
            ..Default::default()
        })
        .await
        .expect("balance by key")
        .into_inner();
    assert_eq!(
        (view.context.as_str(), view.role.as_str()),
        ("organization", "member")
    );
    let allocation = view.allocations.first().expect("allocation");
    assert_eq!((allocation.used, allocation.remaining), (26, 74));
    let org = wallet(&server, "acme", "default").await;
    assert_eq!(
        (org.available, org.total_used, org.total_refunded),
        (4_974, 56, 30)
    );
    server.stop().await;
}
