//! Organizations: the SignSecure scenario through the HTTP forward-auth gateway (org
//! wallet, member allocations, org-bound keys, 402 naming the allocation, 429 naming the
//! budget, balance context), budgets rolling over with a controllable clock, bad input
//! that changes nothing, and org state through the settler, reconcile and restore (real
//! redis-server, real PostgreSQL).

mod common;

use std::time::Duration;

use tonic_types::StatusExt;

use common::gateways::{esign_config, http};
use tollgate::api::pb;
use tollgate::ledger::Clock;

const DEADLINE: Duration = Duration::from_secs(120);
/// 2026-11-23 10:00:00 UTC.
const START_MS: i64 = 1_795_428_000_000;
const DAY_MS: i64 = 86_400_000;
/// An electronic-signature envelope in examples/pricebook-esign.toml: 1 + 10.
const ENVELOPE: i64 = 11;

fn bad_fields(status: &tonic::Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

fn reason(status: &tonic::Status) -> String {
    status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

/// The org "acme": owner olivia, members alice and bob, 5,000 credits, alice 500 and bob
/// 200 allocated; org keys for alice and bob made by olivia. Returns (alice key, bob key,
/// alice key id).
async fn signsecure(server: &common::TestServer) -> (String, String, String) {
    common::org_with_members(
        server,
        "acme",
        "olivia",
        5_000,
        &[("alice", "member"), ("bob", "member")],
    )
    .await;
    let mut admin = server.admin().await;
    for (member, amount) in [("alice", 500), ("bob", 200)] {
        let a = admin
            .set_allocation(pb::SetAllocationRequest {
                org_id: "acme".into(),
                member_id: member.into(),
                amount,
                actor_id: "olivia".into(),
                idempotency_key: format!("alloc-{member}"),
                ..Default::default()
            })
            .await
            .expect("allocate")
            .into_inner();
        assert_eq!((a.allocated, a.used, a.remaining), (amount, 0, amount));
    }
    let key = |member: &'static str| {
        let mut admin = admin.clone();
        async move {
            admin
                .create_api_key(pb::CreateApiKeyRequest {
                    org_id: "acme".into(),
                    member_id: member.into(),
                    actor_id: "olivia".into(),
                    name: format!("{member}'s integration"),
                    ..Default::default()
                })
                .await
                .expect("org key")
                .into_inner()
        }
    };
    let alice = key("alice").await;
    let bob = key("bob").await;
    assert_eq!(alice.account_id, "acme", "an org key belongs to the org");
    assert_eq!(alice.member_id, "alice");
    (alice.api_key, bob.api_key, alice.key_id)
}

async fn send_envelope(server: &common::TestServer, key: &str) -> common::gateways::HttpResponse {
    http(
        server.http_addr,
        "GET",
        "/v1/forward-auth",
        &[
            ("x-forwarded-method", "POST"),
            ("x-forwarded-uri", "/v1/envelopes"),
            ("x-forwarded-host", "api.example.com"),
            ("x-signature-method", "electronic"),
            ("x-api-key", key),
        ],
        "",
    )
    .await
}

async fn view(server: &common::TestServer, member: &str, key_id: &str) -> pb::GetBalanceResponse {
    let mut metering = server.metering().await;
    let (account_id, member_id) = if key_id.is_empty() {
        ("acme".to_owned(), member.to_owned())
    } else {
        (String::new(), String::new())
    };
    metering
        .get_balance(pb::GetBalanceRequest {
            account_id,
            member_id,
            key_id: key_id.into(),
            ..Default::default()
        })
        .await
        .expect("balance")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signsecure_members_spend_the_org_wallet_within_their_allocations() {
    let redis = common::RedisServer::start();
    let server = common::TestServer::start(esign_config(&redis.url()), Clock::Redis).await;
    let (alice, bob, alice_key_id) = signsecure(&server).await;

    // Alice sends envelopes until her allocation is spent: 45 × 11 = 495 of 500.
    let mut sent = 0;
    let refused = loop {
        let r = send_envelope(&server, &alice).await;
        if r.status != 200 {
            break r;
        }
        sent += 1;
        assert_eq!(r.header("x-tollgate-account"), Some("acme"));
        // The upstream learns which member called (the key's first use resolves it in the
        // charge script, later ones from the identity cache).
        assert_eq!(r.header("x-tollgate-member"), Some("alice"));
        // What alice may still spend, not the org's balance.
        assert_eq!(
            r.header("x-credits-remaining"),
            Some((500 - sent * ENVELOPE).to_string().as_str())
        );
        assert!(sent <= 500 / ENVELOPE, "spent past the allocation");
    };
    assert_eq!(sent, 500 / ENVELOPE);
    assert_eq!(refused.status, 402, "{refused:?}");
    let body = refused.json();
    assert_eq!(body["error"], "allocation_exceeded");
    assert_eq!(body["limit"], "allocation");
    assert_eq!(body["required"], ENVELOPE);
    assert_eq!(body["remaining"], 500 - sent * ENVELOPE);
    assert_eq!(
        body["wallet"], "default",
        "the 402 names the wallet to top up"
    );

    // Bob still spends: his allocation is his own.
    let r = send_envelope(&server, &bob).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-credits-remaining"), Some("189"));
    assert_eq!(r.header("x-tollgate-member"), Some("bob"));

    // A member budget of 15 a day, counted from now: bob's next envelope fits (11), the
    // one after (22 > 15) is refused with 429.
    let mut admin = server.admin().await;
    admin
        .set_budget(pb::SetBudgetRequest {
            account_id: "acme".into(),
            member_id: "bob".into(),
            limit: 15,
            period: "day".into(),
            idempotency_key: "bob-budget".into(),
            ..Default::default()
        })
        .await
        .expect("budget");
    // What bob may still spend is the budget's 4 left, not the 167 of his allocation.
    let r = send_envelope(&server, &bob).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-credits-remaining"), Some("4"));
    let r = send_envelope(&server, &bob).await;
    assert_eq!(r.status, 429, "{r:?}");
    let body = r.json();
    assert_eq!(body["error"], "budget_exceeded");
    assert_eq!(body["budget"], "member");
    assert_eq!(body["limit"], 15);
    assert_eq!(body["wallet"], "default");
    assert_eq!(
        body["spent"], ENVELOPE,
        "the budget counts from when it was set"
    );
    let resets = body["resets_at_ms"].as_i64().expect("resets_at_ms");
    assert_eq!(resets % DAY_MS, 0, "a UTC day budget resets at midnight");

    // The owner sees the org's balance; each member their own remaining allocation.
    let spent = sent * ENVELOPE + 2 * ENVELOPE;
    let owner = view(&server, "olivia", "").await;
    assert_eq!(owner.context, "organization");
    assert_eq!(owner.role, "owner");
    assert_eq!(owner.wallets[0].available, 5_000 - spent);
    assert_eq!(owner.wallets[0].total_used, spent);
    let a = view(&server, "alice", "").await;
    assert_eq!(
        (a.context.as_str(), a.role.as_str()),
        ("organization", "member")
    );
    assert_eq!(a.wallets[0].available, 500 - sent * ENVELOPE);
    assert_eq!(
        a.wallets[0].total_granted, 0,
        "members do not see org totals"
    );
    assert_eq!(a.allocations[0].remaining, 5);
    let b = view(&server, "bob", "").await;
    assert_eq!(b.wallets[0].available, 200 - 2 * ENVELOPE);
    assert_eq!(b.budgets.len(), 1);
    assert_eq!((b.budgets[0].limit, b.budgets[0].spent), (15, ENVELOPE));
    // By key: the same member view.
    let by_key = view(&server, "", &alice_key_id).await;
    assert_eq!(by_key.context, "organization");
    assert_eq!(by_key.member_id, "alice");
    assert_eq!(by_key.wallets[0].available, 5);
    // A personal account keeps the personal context.
    let personal = common::gateways::seed(&server, "pat", 10).await;
    assert_eq!(send_envelope(&server, &personal).await.status, 402);
    let mut metering = server.metering().await;
    let p = metering
        .get_balance(pb::GetBalanceRequest {
            account_id: "pat".into(),
            ..Default::default()
        })
        .await
        .expect("personal")
        .into_inner();
    assert_eq!(p.context, "personal");
    // A member of a personal account: the account is what is wrong, not the member; and
    // a stranger of an org is the member.
    for (account, member, field) in [
        ("pat", "alice", "account_id"),
        ("acme", "mallory", "member_id"),
    ] {
        let refused = metering
            .get_balance(pb::GetBalanceRequest {
                account_id: account.into(),
                member_id: member.into(),
                ..Default::default()
            })
            .await
            .expect_err("not an org member");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        assert_eq!(bad_fields(&refused), vec![field.to_owned()], "{refused:?}");
    }
    // The org's own account, asked without a member, is an organization.
    let org = metering
        .get_balance(pb::GetBalanceRequest {
            account_id: "acme".into(),
            ..Default::default()
        })
        .await
        .expect("the org's account")
        .into_inner();
    assert_eq!(org.context, "organization");

    // A refund of alice's charge gives her allocation back.
    let history = metering
        .debit(pb::DebitRequest {
            account_id: "acme".into(),
            member_id: "alice".into(),
            amount: 5,
            idempotency_key: "last-five".into(),
            ..Default::default()
        })
        .await
        .expect("the last 5 fit")
        .into_inner();
    assert_eq!(view(&server, "alice", "").await.allocations[0].remaining, 0);
    metering
        .refund(pb::RefundRequest {
            charge_id: history.charge_id,
            amount: 5,
            idempotency_key: "refund".into(),
            ..Default::default()
        })
        .await
        .expect("refund");
    assert_eq!(view(&server, "alice", "").await.allocations[0].remaining, 5);

    // Bob leaves the org: his key goes with him (revoked by the removal, 403).
    let mut admin = server.admin().await;
    admin
        .remove_member(pb::RemoveMemberRequest {
            org_id: "acme".into(),
            member_id: "bob".into(),
            actor_id: "olivia".into(),
            idempotency_key: "bob-leaves".into(),
        })
        .await
        .expect("remove bob");
    let r = send_envelope(&server, &bob).await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.json()["error"], "revoked_api_key");
}

/// An org key made with an idempotency key: a retry answers the same key; once its actor
/// is no longer an owner or admin, even a retry is refused (who may make an org key is
/// checked first, as a revoked API key is refused before a repeat's answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_org_key_creation_is_checked_against_the_actor_first() {
    let redis = common::RedisServer::start();
    let server = common::TestServer::start(esign_config(&redis.url()), Clock::Redis).await;
    signsecure(&server).await;
    let mut admin = server.admin().await;
    admin
        .add_member(pb::AddMemberRequest {
            org_id: "acme".into(),
            member_id: "adam".into(),
            role: "admin".into(),
            actor_id: "olivia".into(),
            idempotency_key: "add-adam".into(),
        })
        .await
        .expect("add admin");
    let request = || pb::CreateApiKeyRequest {
        org_id: "acme".into(),
        member_id: "alice".into(),
        actor_id: "adam".into(),
        name: "made by adam".into(),
        idempotency_key: "adam-makes".into(),
        ..Default::default()
    };
    let first = admin
        .create_api_key(request())
        .await
        .expect("org key")
        .into_inner();
    let again = admin
        .create_api_key(request())
        .await
        .expect("retry")
        .into_inner();
    assert!(!first.replayed && again.replayed);
    assert_eq!(
        (
            again.key_id.as_str(),
            again.account_id.as_str(),
            again.member_id.as_str()
        ),
        (first.key_id.as_str(), "acme", "alice")
    );
    admin
        .remove_member(pb::RemoveMemberRequest {
            org_id: "acme".into(),
            member_id: "adam".into(),
            actor_id: "olivia".into(),
            idempotency_key: "adam-leaves".into(),
        })
        .await
        .expect("remove adam");
    let status = admin
        .create_api_key(request())
        .await
        .expect_err("adam is no longer an admin");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("actor_id"), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_budget_refuses_the_crossing_charge_and_rolls_over_at_midnight() {
    let redis = common::RedisServer::start();
    let (clock, now) = Clock::manual(START_MS);
    let server = common::TestServer::start(common::test_config(&redis.url()), clock).await;
    let mut admin = server.admin().await;
    let mut metering = server.metering().await;
    admin
        .grant(pb::GrantRequest {
            account_id: "dave".into(),
            amount: 1_000,
            idempotency_key: "g".into(),
            ..Default::default()
        })
        .await
        .expect("grant");
    let budget = admin
        .set_budget(pb::SetBudgetRequest {
            account_id: "dave".into(),
            limit: 100,
            period: "day".into(),
            idempotency_key: "b".into(),
            ..Default::default()
        })
        .await
        .expect("budget")
        .into_inner();
    assert_eq!((budget.scope.as_str(), budget.spent), ("account", 0));
    let midnight = (START_MS / DAY_MS + 1) * DAY_MS;
    assert_eq!(budget.resets_at_ms, midnight);
    let debit_client = metering.clone();
    let debit = |key: &str, amount: i64| {
        let mut metering = debit_client.clone();
        let key = key.to_owned();
        async move {
            metering
                .debit(pb::DebitRequest {
                    account_id: "dave".into(),
                    amount,
                    idempotency_key: key,
                    ..Default::default()
                })
                .await
        }
    };
    // What dave may still spend: the budget's headroom, not the wallet's 1,000 - 30n.
    for (i, spendable) in [70, 40, 10].into_iter().enumerate() {
        let d = debit(&format!("d{i}"), 30)
            .await
            .expect("within budget")
            .into_inner();
        assert_eq!(
            (d.available, d.spendable),
            (1_000 - 30 * (i as i64 + 1), spendable)
        );
    }
    let refused = debit("d3", 30).await.expect_err("crosses 100");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert_eq!(reason(&refused), "BUDGET_EXCEEDED");
    let info = refused.get_details_error_info().expect("error info");
    assert_eq!(info.metadata["spent"], "90");
    assert_eq!(info.metadata["limit"], "100");
    assert_eq!(info.metadata["resets_at_ms"], midnight.to_string());
    // Exactly up to the limit is fine.
    let d = debit("d4", 10).await.expect("reaches 100").into_inner();
    assert_eq!((d.available, d.spendable), (1_000 - 100, 0));
    assert!(debit("d5", 1).await.is_err());

    // One ms before midnight: still the same day.
    now.store(midnight - 1, std::sync::atomic::Ordering::SeqCst);
    assert!(debit("d6", 1).await.is_err());
    // The next day: accepted again.
    now.store(midnight, std::sync::atomic::Ordering::SeqCst);
    debit("d7", 30).await.expect("a new day");
    let b = metering
        .get_balance(pb::GetBalanceRequest {
            account_id: "dave".into(),
            ..Default::default()
        })
        .await
        .expect("balance")
        .into_inner();
    assert_eq!(b.wallets[0].available, 1_000 - 130);
    assert_eq!(b.budgets.len(), 1);
    assert_eq!(b.budgets[0].spent, 30);
    assert_eq!(b.budgets[0].resets_at_ms, midnight + DAY_MS);

    // A hold counts when placed and gives back what it does not capture.
    let hold = metering
        .authorize(pb::AuthorizeRequest {
            account_id: "dave".into(),
            amount: 60,
            ttl_ms: 60_000,
            idempotency_key: "h".into(),
            ..Default::default()
        })
        .await
        .expect("hold")
        .into_inner();
    assert_eq!((hold.available, hold.spendable), (1_000 - 190, 10));
    assert!(debit("d8", 20).await.is_err(), "30 + 60 held + 20 > 100");
    metering
        .capture(pb::CaptureRequest {
            hold_id: hold.hold_id,
            amount: Some(10),
            idempotency_key: "c".into(),
            ..Default::default()
        })
        .await
        .expect("capture 10");
    debit("d9", 60).await.expect("30 + 10 + 60 = 100");

    // A rolling window: 50 per 60 s, counted in 60/16 s buckets.
    admin
        .set_budget(pb::SetBudgetRequest {
            account_id: "dave".into(),
            wallet: "api".into(),
            limit: 50,
            period: "window".into(),
            window_secs: 60,
            idempotency_key: "w".into(),
            ..Default::default()
        })
        .await
        .expect("window budget");
    admin
        .grant(pb::GrantRequest {
            account_id: "dave".into(),
            wallet: "api".into(),
            amount: 1_000,
            idempotency_key: "g-api".into(),
            ..Default::default()
        })
        .await
        .expect("grant api");
    let api_client = metering.clone();
    let on_api = |key: &str, amount: i64| {
        let mut metering = api_client.clone();
        let key = key.to_owned();
        async move {
            metering
                .debit(pb::DebitRequest {
                    account_id: "dave".into(),
                    wallet: "api".into(),
                    amount,
                    idempotency_key: key,
                    ..Default::default()
                })
                .await
        }
    };
    let w = on_api("w1", 50).await.expect("window").into_inner();
    assert_eq!((w.available, w.spendable), (950, 0));
    let refused = on_api("w2", 1).await.expect_err("window full");
    let resets: i64 = refused.get_details_error_info().expect("info").metadata["resets_at_ms"]
        .parse()
        .expect("resets");
    assert!(resets > midnight && resets <= midnight + 65_000, "{resets}");
    now.store(midnight + 30_000, std::sync::atomic::Ordering::SeqCst);
    assert!(on_api("w3", 1).await.is_err(), "half a window later");
    now.store(resets, std::sync::atomic::Ordering::SeqCst);
    on_api("w4", 50).await.expect("the window rolled");
}

/// The org "acme" (owner olivia, member carol) holding `credits`.
async fn acme_with_carol(server: &common::TestServer, credits: i64) {
    common::org_with_members(server, "acme", "olivia", credits, &[("carol", "member")]).await;
}

/// GetBalance's `spendable`: what the caller may spend now, the tightest of the balance,
/// the member's allocation left and every budget binding them on the wallet (the member's
/// and the account-wide one), as a charge's own `spendable` reports right after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_balance_says_what_the_caller_may_spend_now() {
    let redis = common::RedisServer::start();
    // A manual clock: a day budget must not roll over at a real midnight mid-test.
    let (clock, _now) = Clock::manual(START_MS);
    let server = common::TestServer::start(common::test_config(&redis.url()), clock).await;
    let mut admin = server.admin().await;
    let mut metering = server.metering().await;
    acme_with_carol(&server, 1_000).await;
    admin
        .set_allocation(pb::SetAllocationRequest {
            org_id: "acme".into(),
            member_id: "carol".into(),
            amount: 500,
            actor_id: "olivia".into(),
            idempotency_key: "alloc".into(),
            ..Default::default()
        })
        .await
        .expect("allocate");
    let budget = |account: &str, member: &str, limit: i64, key: &str| pb::SetBudgetRequest {
        account_id: account.into(),
        member_id: member.into(),
        limit,
        period: "day".into(),
        idempotency_key: key.into(),
        ..Default::default()
    };
    admin
        .set_budget(budget("acme", "carol", 100, "carol-day"))
        .await
        .expect("member budget");
    let debit_client = metering.clone();
    let debit = |account: &str, member: &str, amount: i64, key: &str| {
        let mut metering = debit_client.clone();
        let request = pb::DebitRequest {
            account_id: account.into(),
            member_id: member.into(),
            amount,
            idempotency_key: key.into(),
            ..Default::default()
        };
        async move { metering.debit(request).await.expect("debit").into_inner() }
    };
    let wallet = |v: pb::GetBalanceResponse| {
        assert_eq!(v.wallets.len(), 1, "{v:?}");
        let w = &v.wallets[0];
        (w.available, w.spendable)
    };

    // Carol's available is her allocation left (500); the day budget's 100 is tighter.
    assert_eq!(wallet(view(&server, "carol", "").await), (500, 100));
    // A debit lowers both; GetBalance then says what the Debit said.
    let d = debit("acme", "carol", 30, "d1").await;
    assert_eq!(d.spendable, 70);
    assert_eq!(wallet(view(&server, "carol", "").await), (470, d.spendable));
    // A hold counts in the budget at once, as in its answer.
    let hold = metering
        .authorize(pb::AuthorizeRequest {
            account_id: "acme".into(),
            member_id: "carol".into(),
            amount: 20,
            ttl_ms: 3_600_000,
            idempotency_key: "h1".into(),
            ..Default::default()
        })
        .await
        .expect("hold")
        .into_inner();
    assert_eq!(hold.spendable, 50);
    assert_eq!(
        wallet(view(&server, "carol", "").await),
        (450, hold.spendable)
    );

    // An account-wide budget binds every caller of the wallet, carol and the owner too;
    // it counts from when it is set.
    admin
        .set_budget(budget("acme", "", 40, "acme-day"))
        .await
        .expect("account budget");
    assert_eq!(wallet(view(&server, "carol", "").await), (450, 40));
    let d = debit("acme", "carol", 10, "d2").await;
    assert_eq!(d.spendable, 30);
    assert_eq!(wallet(view(&server, "carol", "").await), (440, d.spendable));
    // The owner sees the org's balance (1,000 - 40 used - 20 held), bound by that budget
    // only (no allocation, no budget of their own).
    assert_eq!(wallet(view(&server, "olivia", "").await), (940, 30));
    let d = debit("acme", "olivia", 25, "d3").await;
    assert_eq!(d.spendable, 5);
    assert_eq!(wallet(view(&server, "olivia", "").await), (915, 5));
    assert_eq!(wallet(view(&server, "carol", "").await), (440, 5));

    // A personal account: spendable is what it has, until a budget caps it.
    admin
        .grant(pb::GrantRequest {
            account_id: "pat".into(),
            amount: 100,
            idempotency_key: "pat-buys".into(),
            ..Default::default()
        })
        .await
        .expect("grant pat");
    let d = debit("pat", "", 10, "p1").await;
    let personal_client = metering.clone();
    let personal = || {
        let request = pb::GetBalanceRequest {
            account_id: "pat".into(),
            ..Default::default()
        };
        let mut metering = personal_client.clone();
        async move {
            metering
                .get_balance(request)
                .await
                .expect("personal balance")
                .into_inner()
        }
    };
    assert_eq!(wallet(personal().await), (90, 90));
    assert_eq!(d.spendable, 90);
    admin
        .set_budget(budget("pat", "", 25, "pat-day"))
        .await
        .expect("personal budget");
    assert_eq!(wallet(personal().await), (90, 25));
    let d = debit("pat", "", 5, "p2").await;
    assert_eq!(wallet(personal().await), (85, d.spendable));
    assert_eq!(d.spendable, 20);
}

/// A debit of acme's default wallet by `member`.
async fn acme_debit(
    server: &common::TestServer,
    member: &str,
    amount: i64,
    key: &str,
) -> Result<pb::DebitResponse, tonic::Status> {
    let mut metering = server.metering().await;
    metering
        .debit(pb::DebitRequest {
            account_id: "acme".into(),
            member_id: member.into(),
            amount,
            idempotency_key: key.into(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

/// GetBalance's `spendable` of acme's only wallet for `member`.
async fn acme_spendable(server: &common::TestServer, member: &str) -> i64 {
    let v = view(server, member, "").await;
    assert_eq!(v.wallets.len(), 1, "{v:?}");
    v.wallets[0].spendable
}

/// The strongest check of GetBalance's `spendable` for `member` (which must be `want`):
/// it is the real bound. A debit of one credit more is refused by `refused_by` (the
/// scope of the budget that refuses it, else the refusal's reason); a debit of exactly
/// it goes through and reports nothing left, as GetBalance then says too.
async fn spend_all_that_is_spendable(
    server: &common::TestServer,
    member: &str,
    want: i64,
    refused_by: &str,
    key: &str,
) {
    let spendable = acme_spendable(server, member).await;
    assert_eq!(spendable, want, "{key}: {member}'s spendable");
    let over = acme_debit(server, member, spendable + 1, &format!("{key}-over"))
        .await
        .expect_err("a debit of one credit more than spendable");
    let info = over.get_details_error_info().expect("error info");
    let by = info.metadata.get("budget").unwrap_or(&info.reason);
    assert_eq!(by, refused_by, "{key}: {over:?}");
    if spendable == 0 {
        return;
    }
    let d = acme_debit(server, member, spendable, key)
        .await
        .unwrap_or_else(|e| panic!("{key}: a debit of exactly spendable ({spendable}): {e:?}"));
    assert_eq!(
        d.spendable, 0,
        "{key}: nothing left after spending all of it"
    );
    assert_eq!(acme_spendable(server, member).await, d.spendable, "{key}");
}

/// The `resets_at_ms` of the budget of `scope` that binds `member` in GetBalance.
async fn acme_resets(server: &common::TestServer, member: &str, scope: &str) -> i64 {
    let v = view(server, member, "").await;
    let b = v
        .budgets
        .iter()
        .find(|b| b.scope == scope)
        .unwrap_or_else(|| panic!("no {scope} budget binds {member}: {v:?}"));
    b.resets_at_ms
}

/// GetBalance's `spendable` is the real bound as a rolling window slides and a calendar
/// month resets (manual clock, moved to the exact ms): before and after each, it is what
/// the next Debit reports, one credit more is refused and exactly it goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_balance_spendable_is_the_real_bound_as_windows_slide_and_months_reset() {
    use std::sync::atomic::Ordering::SeqCst;
    /// A 60 s window counts in buckets of 60/16 s.
    const BUCKET: i64 = 60_000 / 16;
    assert_eq!(
        START_MS % BUCKET,
        0,
        "the test starts on a bucket's first ms"
    );
    let redis = common::RedisServer::start();
    let (clock, now) = Clock::manual(START_MS);
    let server = common::TestServer::start(common::test_config(&redis.url()), clock).await;
    let mut admin = server.admin().await;
    acme_with_carol(&server, 5_000).await;
    let allocate = |amount: i64, key: &str| pb::SetAllocationRequest {
        org_id: "acme".into(),
        member_id: "carol".into(),
        amount,
        actor_id: "olivia".into(),
        idempotency_key: key.into(),
        ..Default::default()
    };
    admin
        .set_allocation(allocate(1_000, "alloc"))
        .await
        .expect("allocate");
    // Carol: 100 per rolling minute. Every caller of the wallet: 250 per calendar month
    // of UTC+1.
    admin
        .set_budget(pb::SetBudgetRequest {
            account_id: "acme".into(),
            member_id: "carol".into(),
            limit: 100,
            period: "window".into(),
            window_secs: 60,
            idempotency_key: "carol-window".into(),
            ..Default::default()
        })
        .await
        .expect("window budget");
    admin
        .set_budget(pb::SetBudgetRequest {
            account_id: "acme".into(),
            limit: 250,
            period: "month".into(),
            utc_offset_minutes: 60,
            idempotency_key: "acme-month".into(),
            ..Default::default()
        })
        .await
        .expect("month budget");
    // 2026-12-01 00:00 at UTC+1: 2026-11-30 23:00 UTC.
    let month_end = ((START_MS / DAY_MS + 1) + 7) * DAY_MS - 3_600_000;
    assert_eq!(acme_resets(&server, "carol", "account").await, month_end);
    let at = |ms: i64| now.store(ms, SeqCst);

    // The window is the tightest bound (100 of a balance of 5,000, an allocation of 1,000
    // and a month's 250).
    assert_eq!(acme_spendable(&server, "carol").await, 100);
    let d = acme_debit(&server, "carol", 30, "w1").await.expect("debit");
    assert_eq!(d.spendable, 70);
    assert_eq!(acme_spendable(&server, "carol").await, d.spendable);
    // 20 s later (bucket 5 of the window): the other 70, not one more.
    at(START_MS + 20_000);
    spend_all_that_is_spendable(&server, "carol", 70, "member", "w2").await;

    // The first bucket (30) leaves the window 17 buckets after it began: not a ms before.
    let slide = acme_resets(&server, "carol", "member").await;
    assert_eq!(slide, START_MS + 17 * BUCKET);
    at(slide - 1);
    spend_all_that_is_spendable(&server, "carol", 0, "member", "w3").await;
    at(slide);
    spend_all_that_is_spendable(&server, "carol", 30, "member", "w4").await;
    // Then the second (70, bucket 5).
    let slide = acme_resets(&server, "carol", "member").await;
    assert_eq!(slide, START_MS + (5 + 17) * BUCKET);
    at(slide - 1);
    spend_all_that_is_spendable(&server, "carol", 0, "member", "w5").await;
    at(slide);
    spend_all_that_is_spendable(&server, "carol", 70, "member", "w6").await;

    // Ten minutes on the window is empty (100), but the month has 250 - 200 left: the
    // month is the bound, for carol and for the owner (no allocation, no budget of
    // their own).
    at(START_MS + 600_000);
    spend_all_that_is_spendable(&server, "olivia", 50, "account", "m1").await;
    spend_all_that_is_spendable(&server, "carol", 0, "account", "m2").await;

    // Carol's allocation lowered to 250 (200 used): 50 left.
    admin
        .set_allocation(allocate(250, "alloc-250"))
        .await
        .expect("lower the allocation");
    // The last ms of the month: nothing for anyone.
    at(month_end - 1);
    spend_all_that_is_spendable(&server, "carol", 0, "account", "m3").await;
    spend_all_that_is_spendable(&server, "olivia", 0, "account", "m4").await;
    // The next month: 250 again. Carol is bound by what her allocation has left.
    at(month_end);
    assert_eq!(
        acme_resets(&server, "carol", "account").await,
        month_end + 31 * DAY_MS
    );
    assert_eq!(acme_spendable(&server, "carol").await, 50);
    let d = acme_debit(&server, "carol", 20, "m5").await.expect("debit");
    assert_eq!(d.spendable, 30);
    assert_eq!(acme_spendable(&server, "carol").await, d.spendable);
    spend_all_that_is_spendable(&server, "carol", 30, "ALLOCATION_EXCEEDED", "m6").await;
    // The owner: the month's 250 - 50.
    spend_all_that_is_spendable(&server, "olivia", 200, "account", "m7").await;
    spend_all_that_is_spendable(&server, "carol", 0, "ALLOCATION_EXCEEDED", "m8").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_names_the_field_and_changes_nothing() {
    let redis = common::RedisServer::start();
    let server = common::TestServer::start(esign_config(&redis.url()), Clock::Redis).await;
    signsecure(&server).await;
    let mut admin = server.admin().await;
    let mut metering = server.metering().await;
    let outbox = common::outbox_len(&server.ledger).await;
    let before = (
        view(&server, "alice", "").await,
        view(&server, "olivia", "").await,
    );

    let cases: Vec<(&str, tonic::Status)> = vec![
        (
            "member_id",
            admin
                .set_allocation(pb::SetAllocationRequest {
                    org_id: "acme".into(),
                    member_id: "mallory".into(),
                    amount: 10,
                    actor_id: "olivia".into(),
                    idempotency_key: "x1".into(),
                    ..Default::default()
                })
                .await
                .expect_err("unknown member"),
        ),
        (
            "amount",
            admin
                .set_allocation(pb::SetAllocationRequest {
                    org_id: "acme".into(),
                    member_id: "alice".into(),
                    amount: -5,
                    actor_id: "olivia".into(),
                    idempotency_key: "x2".into(),
                    ..Default::default()
                })
                .await
                .expect_err("negative allocation"),
        ),
        (
            "delta",
            admin
                .add_allocation(pb::AddAllocationRequest {
                    org_id: "acme".into(),
                    member_id: "alice".into(),
                    delta: -501,
                    actor_id: "olivia".into(),
                    idempotency_key: "x3".into(),
                    ..Default::default()
                })
                .await
                .expect_err("allocation below zero"),
        ),
        (
            "delta",
            admin
                .add_allocation(pb::AddAllocationRequest {
                    org_id: "acme".into(),
                    member_id: "alice".into(),
                    delta: (1 << 53) - 1,
                    actor_id: "olivia".into(),
                    idempotency_key: "x3b".into(),
                    ..Default::default()
                })
                .await
                .expect_err("allocation above 2^53-1"),
        ),
        (
            "actor_id",
            admin
                .create_api_key(pb::CreateApiKeyRequest {
                    org_id: "acme".into(),
                    member_id: "alice".into(),
                    actor_id: "bob".into(),
                    ..Default::default()
                })
                .await
                .expect_err("a member makes an org key"),
        ),
        (
            "actor_id",
            admin
                .set_allocation(pb::SetAllocationRequest {
                    org_id: "acme".into(),
                    member_id: "bob".into(),
                    amount: 1_000,
                    actor_id: "bob".into(),
                    idempotency_key: "x4".into(),
                    ..Default::default()
                })
                .await
                .expect_err("a member allocates to themselves"),
        ),
        (
            "member_id",
            metering
                .debit(pb::DebitRequest {
                    account_id: "acme".into(),
                    member_id: "mallory".into(),
                    amount: 1,
                    idempotency_key: "x5".into(),
                    ..Default::default()
                })
                .await
                .expect_err("a stranger charges the org"),
        ),
        // A member on an account that is no organization: the account is what is wrong.
        (
            "account_id",
            metering
                .debit(pb::DebitRequest {
                    account_id: "solo".into(),
                    member_id: "alice".into(),
                    amount: 1,
                    idempotency_key: "x5b".into(),
                    ..Default::default()
                })
                .await
                .expect_err("a member charges a personal account"),
        ),
        (
            "account_id",
            metering
                .authorize(pb::AuthorizeRequest {
                    account_id: "solo".into(),
                    member_id: "alice".into(),
                    amount: 1,
                    ttl_ms: 60_000,
                    idempotency_key: "x5c".into(),
                    ..Default::default()
                })
                .await
                .expect_err("a member holds on a personal account"),
        ),
        (
            "role",
            admin
                .add_member(pb::AddMemberRequest {
                    org_id: "acme".into(),
                    member_id: "carol".into(),
                    role: "boss".into(),
                    actor_id: "olivia".into(),
                    idempotency_key: "x6".into(),
                })
                .await
                .expect_err("unknown role"),
        ),
        (
            "period",
            admin
                .set_budget(pb::SetBudgetRequest {
                    account_id: "acme".into(),
                    member_id: "alice".into(),
                    limit: 10,
                    period: "fortnight".into(),
                    idempotency_key: "x7".into(),
                    ..Default::default()
                })
                .await
                .expect_err("unknown period"),
        ),
        (
            "member_id",
            admin
                .remove_member(pb::RemoveMemberRequest {
                    org_id: "acme".into(),
                    member_id: "olivia".into(),
                    actor_id: "olivia".into(),
                    idempotency_key: "x8".into(),
                })
                .await
                .expect_err("the last owner"),
        ),
        (
            "role",
            admin
                .add_member(pb::AddMemberRequest {
                    org_id: "acme".into(),
                    member_id: "olivia".into(),
                    role: "admin".into(),
                    actor_id: "olivia".into(),
                    idempotency_key: "x9".into(),
                })
                .await
                .expect_err("the last owner demoted: nobody could make an owner again"),
        ),
        (
            "utc_offset_minutes",
            admin
                .set_budget(pb::SetBudgetRequest {
                    account_id: "acme".into(),
                    member_id: "alice".into(),
                    limit: 10,
                    period: "month".into(),
                    utc_offset_minutes: i32::MIN,
                    idempotency_key: "x10".into(),
                    ..Default::default()
                })
                .await
                .expect_err("an offset with no absolute value"),
        ),
        (
            "member_id",
            admin
                .create_api_key(pb::CreateApiKeyRequest {
                    account_id: "acme".into(),
                    name: "personal".into(),
                    member_id: "mallory:x|y".into(),
                    ..Default::default()
                })
                .await
                .expect_err("a member on a personal key"),
        ),
        (
            "window_secs",
            admin
                .set_budget(pb::SetBudgetRequest {
                    account_id: "acme".into(),
                    limit: 10,
                    period: "day".into(),
                    window_secs: -5,
                    idempotency_key: "x11".into(),
                    ..Default::default()
                })
                .await
                .expect_err("a window on a day budget"),
        ),
        (
            "window_secs",
            admin
                .set_budget(pb::SetBudgetRequest {
                    account_id: "acme".into(),
                    member_id: "alice".into(),
                    limit: 10,
                    period: "month".into(),
                    window_secs: 60,
                    idempotency_key: "x12".into(),
                    ..Default::default()
                })
                .await
                .expect_err("a window on a month budget"),
        ),
        (
            "account_id",
            admin
                .create_api_key(pb::CreateApiKeyRequest {
                    account_id: "acme".into(),
                    name: "x".into(),
                    ..Default::default()
                })
                .await
                .expect_err("a personal key on the org's account: no actor check"),
        ),
        // A malformed owner or member is named once, not once per rule it is checked by.
        (
            "owner_id",
            admin
                .create_organization(pb::CreateOrganizationRequest {
                    org_id: "globex".into(),
                    owner_id: "bad id!".into(),
                    idempotency_key: "x13".into(),
                })
                .await
                .expect_err("a malformed owner"),
        ),
        (
            "member_id",
            admin
                .add_member(pb::AddMemberRequest {
                    org_id: "acme".into(),
                    member_id: "bad id!".into(),
                    role: "member".into(),
                    actor_id: "olivia".into(),
                    idempotency_key: "x14".into(),
                })
                .await
                .expect_err("a malformed member"),
        ),
    ];
    for (field, status) in &cases {
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert_eq!(bad_fields(status), vec![field.to_string()], "{status:?}");
    }
    // Every bad field of a CreateApiKey at once.
    let status = admin
        .create_api_key(pb::CreateApiKeyRequest {
            account_id: "bad id!".into(),
            name: "a\u{7}".into(),
            idempotency_key: "has space".into(),
            ..Default::default()
        })
        .await
        .expect_err("three bad fields");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let mut fields = bad_fields(&status);
    fields.sort();
    assert_eq!(
        fields,
        ["account_id", "idempotency_key", "name"],
        "{status:?}"
    );
    // Nothing changed: no event, same views, no key made.
    assert_eq!(common::outbox_len(&server.ledger).await, outbox);
    let after = (
        view(&server, "alice", "").await,
        view(&server, "olivia", "").await,
    );
    assert_eq!(before, after);
    let keys = admin
        .list_api_keys(pb::ListApiKeysRequest {
            account_id: "acme".into(),
        })
        .await
        .expect("keys")
        .into_inner();
    assert_eq!(keys.keys.len(), 2, "only the owner's two keys");
    let members = admin
        .list_members(pb::ListMembersRequest {
            org_id: "acme".into(),
            ..Default::default()
        })
        .await
        .expect("members")
        .into_inner();
    let names: Vec<_> = members
        .members
        .iter()
        .map(|m| (m.member_id.as_str(), m.role.as_str()))
        .collect();
    assert_eq!(
        names,
        [("alice", "member"), ("bob", "member"), ("olivia", "owner")]
    );
    // A second CreateOrganization of the same org is refused (replay with the same key
    // answers the first).
    let again = admin
        .create_organization(pb::CreateOrganizationRequest {
            org_id: "acme".into(),
            owner_id: "eve".into(),
            idempotency_key: "other".into(),
        })
        .await
        .expect_err("exists");
    assert_eq!(again.code(), tonic::Code::AlreadyExists);
    assert_eq!(reason(&again), "ORG_EXISTS");
    let replay = admin
        .create_organization(pb::CreateOrganizationRequest {
            org_id: "acme".into(),
            owner_id: "olivia".into(),
            idempotency_key: "create".into(),
        })
        .await
        .expect("replay")
        .into_inner();
    assert!(replay.replayed);
}

async fn key_count(server: &common::TestServer, account_id: &str) -> usize {
    server
        .admin()
        .await
        .list_api_keys(pb::ListApiKeysRequest {
            account_id: account_id.into(),
        })
        .await
        .expect("keys")
        .into_inner()
        .keys
        .len()
}

/// A personal key is never made on an org's account (it would charge the org wallet with
/// no actor, member or allocation check), and an account with live personal keys is not
/// made an org (they would turn into such keys); both checked in the script that writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_personal_key_never_charges_an_org_wallet() {
    let redis = common::RedisServer::start();
    let server = common::TestServer::start(esign_config(&redis.url()), Clock::Redis).await;
    signsecure(&server).await;
    let mut admin = server.admin().await;
    admin
        .add_member(pb::AddMemberRequest {
            org_id: "acme".into(),
            member_id: "mallory".into(),
            role: "member".into(),
            actor_id: "olivia".into(),
            idempotency_key: "add-mallory".into(),
        })
        .await
        .expect("add mallory");
    let outbox = common::outbox_len(&server.ledger).await;
    let before = view(&server, "olivia", "").await;

    // The org path checks the actor; the personal path to the same account is refused,
    // a retry with an idempotency key included.
    let status = admin
        .create_api_key(pb::CreateApiKeyRequest {
            org_id: "acme".into(),
            actor_id: "mallory".into(),
            name: "x".into(),
            ..Default::default()
        })
        .await
        .expect_err("mallory is a plain member");
    assert_eq!(bad_fields(&status), ["actor_id"], "{status:?}");
    for idempotency_key in ["", "k1", "k1"] {
        let status = admin
            .create_api_key(pb::CreateApiKeyRequest {
                account_id: "acme".into(),
                name: "x".into(),
                idempotency_key: idempotency_key.into(),
                ..Default::default()
            })
            .await
            .expect_err("a personal key on an org account");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert_eq!(bad_fields(&status), ["account_id"], "{status:?}");
        assert!(
            status.message().contains("org_id") && status.message().contains("actor_id"),
            "{status:?}"
        );
    }
    assert_eq!(key_count(&server, "acme").await, 2, "no key made");
    assert_eq!(common::outbox_len(&server.ledger).await, outbox);
    assert_eq!(view(&server, "olivia", "").await, before);

    // The reverse: initech has a personal key, then is to become an org.
    admin
        .grant(pb::GrantRequest {
            account_id: "initech".into(),
            amount: 100,
            idempotency_key: "buy".into(),
            ..Default::default()
        })
        .await
        .expect("grant");
    let personal = admin
        .create_api_key(pb::CreateApiKeyRequest {
            account_id: "initech".into(),
            name: "laptop".into(),
            ..Default::default()
        })
        .await
        .expect("personal key")
        .into_inner();
    let r = send_envelope(&server, &personal.api_key).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-tollgate-account"), Some("initech"));
    assert_eq!(
        r.header("x-tollgate-member"),
        None,
        "a personal key has no member"
    );
    let outbox = common::outbox_len(&server.ledger).await;
    let make_org = || pb::CreateOrganizationRequest {
        org_id: "initech".into(),
        owner_id: "ian".into(),
        idempotency_key: "make-org".into(),
    };
    for _ in 0..2 {
        let status = admin
            .create_organization(make_org())
            .await
            .expect_err("initech has a live personal key");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert_eq!(bad_fields(&status), ["org_id"], "{status:?}");
        // Fields, not values: no key id in a message the request log writes.
        assert!(!status.message().contains(&personal.key_id), "{status:?}");
    }
    assert_eq!(common::outbox_len(&server.ledger).await, outbox);
    let members = admin
        .list_members(pb::ListMembersRequest {
            org_id: "initech".into(),
            ..Default::default()
        })
        .await
        .expect_err("no org made");
    assert_eq!(members.code(), tonic::Code::NotFound, "{members:?}");
    // The key still charges only initech's own wallet, as before.
    let r = send_envelope(&server, &personal.api_key).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-credits-remaining"), Some("78"));

    // Revoked, the key no longer counts: the same request now makes the org, and the key
    // stays refused at the gateway.
    admin
        .revoke_api_key(pb::RevokeApiKeyRequest {
            key_id: personal.key_id.clone(),
        })
        .await
        .expect("revoke");
    let org = admin
        .create_organization(make_org())
        .await
        .expect("no live key left")
        .into_inner();
    assert!(!org.replayed);
    assert_eq!(send_envelope(&server, &personal.api_key).await.status, 403);
    let status = admin
        .create_api_key(pb::CreateApiKeyRequest {
            account_id: "initech".into(),
            name: "laptop 2".into(),
            ..Default::default()
        })
        .await
        .expect_err("initech is an org now");
    assert_eq!(bad_fields(&status), ["account_id"], "{status:?}");
    assert_eq!(
        key_count(&server, "initech").await,
        1,
        "only the revoked key"
    );
}

/// CreateOrganization and a personal CreateApiKey racing on one account: exactly one
/// wins, never an org with a live personal key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_org_and_a_personal_key_racing_on_one_account_never_both_happen() {
    let redis = common::RedisServer::start();
    let server = common::TestServer::start(esign_config(&redis.url()), Clock::Redis).await;
    let admin = server.admin().await;
    let mut races = Vec::new();
    for i in 0..32 {
        let account = format!("race-{i}");
        let (mut a, mut b) = (admin.clone(), admin.clone());
        let org = pb::CreateOrganizationRequest {
            org_id: account.clone(),
            owner_id: "owner".into(),
            idempotency_key: "org".into(),
        };
        let key = pb::CreateApiKeyRequest {
            account_id: account.clone(),
            name: "k".into(),
            ..Default::default()
        };
        races.push(tokio::spawn(async move {
            let (org, key) = tokio::join!(a.create_organization(org), b.create_api_key(key));
            (account, org, key)
        }));
    }
    let (mut orgs, mut keys) = (0, 0);
    for race in races {
        let (account, org, key) = race.await.expect("race");
        match (&org, &key) {
            (Ok(_), Err(refused)) => {
                assert_eq!(
                    bad_fields(refused),
                    ["account_id"],
                    "{account}: {refused:?}"
                );
                orgs += 1;
            }
            (Err(refused), Ok(_)) => {
                assert_eq!(bad_fields(refused), ["org_id"], "{account}: {refused:?}");
                keys += 1;
            }
            _ => panic!("{account}: {org:?} and {key:?}"),
        }
    }
    assert_eq!(orgs + keys, 32);
}

type View = (
    String,
    Vec<pb::WalletBalance>,
    Vec<pb::MemberAllocation>,
    Vec<pb::Budget>,
);

async fn views(server: &common::TestServer) -> Vec<View> {
    let mut out = Vec::new();
    for member in ["olivia", "alice", "bob"] {
        let v = view(server, member, "").await;
        out.push((v.role, v.wallets, v.allocations, v.budgets));
    }
    out
}

/// `tollgate reconcile` of this Redis against this store, as a job for `spawn_blocking`.
fn reconcile_job(
    redis_url: String,
    store_url: String,
) -> impl FnOnce() -> std::process::Output + Clone + Send + 'static {
    move || {
        tool(&[
            "reconcile",
            "--redis-url",
            &redis_url,
            "--store",
            &store_url,
            "--drain-timeout-secs",
            "120",
        ])
    }
}

fn tool(args: &[&str]) -> std::process::Output {
    common::tollgate()
        .args(args)
        .output()
        .expect("run tollgate")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn org_events_settle_reconcile_and_restore() {
    let mut redis = common::RedisServer::start();
    let pg = common::PgDatabase::create().await;
    let mut config = esign_config(&redis.url());
    config.store.url = pg.url.clone();
    config.settler.enabled = true;
    let server = common::TestServer::start(config, Clock::Redis).await;
    let (alice, bob, _) = signsecure(&server).await;
    for _ in 0..3 {
        assert_eq!(send_envelope(&server, &alice).await.status, 200);
    }
    assert_eq!(send_envelope(&server, &bob).await.status, 200);
    let mut admin = server.admin().await;
    admin
        .set_budget(pb::SetBudgetRequest {
            account_id: "acme".into(),
            member_id: "bob".into(),
            limit: 100,
            period: "month".into(),
            idempotency_key: "bb".into(),
            ..Default::default()
        })
        .await
        .expect("budget");
    assert_eq!(send_envelope(&server, &bob).await.status, 200);
    admin
        .add_allocation(pb::AddAllocationRequest {
            org_id: "acme".into(),
            member_id: "bob".into(),
            delta: 50,
            actor_id: "olivia".into(),
            idempotency_key: "more".into(),
            ..Default::default()
        })
        .await
        .expect("more for bob");
    // The org's own budget too; a hold of bob's captured in part gives the rest back to
    // both budgets, and the restore must rebuild their spend net of it.
    admin
        .set_budget(pb::SetBudgetRequest {
            account_id: "acme".into(),
            limit: 10_000,
            period: "month".into(),
            idempotency_key: "ab".into(),
            ..Default::default()
        })
        .await
        .expect("org budget");
    let mut metering = server.metering().await;
    let bob_hold = metering
        .authorize(pb::AuthorizeRequest {
            account_id: "acme".into(),
            member_id: "bob".into(),
            amount: 30,
            ttl_ms: 600_000,
            idempotency_key: "bob-hold".into(),
            ..Default::default()
        })
        .await
        .expect("bob's hold")
        .into_inner();
    metering
        .capture(pb::CaptureRequest {
            hold_id: bob_hold.hold_id.clone(),
            amount: Some(5),
            idempotency_key: "bob-capture".into(),
            ..Default::default()
        })
        .await
        .expect("bob's capture");
    let hold = metering
        .authorize(pb::AuthorizeRequest {
            account_id: "acme".into(),
            member_id: "alice".into(),
            amount: 40,
            ttl_ms: 600_000,
            idempotency_key: "open-hold".into(),
            ..Default::default()
        })
        .await
        .expect("hold")
        .into_inner();
    assert!(!hold.hold_id.is_empty());
    // Carol, a member with an allocation, charges and holds with idempotency keys: after
    // the restore, the same requests must get the same answers, not be charged again.
    admin
        .add_member(pb::AddMemberRequest {
            org_id: "acme".into(),
            member_id: "carol".into(),
            role: "member".into(),
            actor_id: "olivia".into(),
            idempotency_key: "add-carol".into(),
        })
        .await
        .expect("add carol");
    admin
        .set_allocation(pb::SetAllocationRequest {
            org_id: "acme".into(),
            member_id: "carol".into(),
            amount: 100,
            actor_id: "olivia".into(),
            idempotency_key: "alloc-carol".into(),
            ..Default::default()
        })
        .await
        .expect("allocate carol");
    let carol_debit = |key: &str| tollgate::ledger::Debit {
        account_id: "acme".into(),
        wallet: "default".into(),
        amount: 7,
        idempotency_key: key.into(),
        operation: "envelope.send".into(),
        metadata: tollgate::ledger::Metadata::new(),
        member_id: "carol".into(),
        price_inputs: None,
        attempt_mark: None,
    };
    let carol_hold = tollgate::ledger::command::Authorize {
        account_id: "acme".into(),
        wallet: "default".into(),
        amount: 20,
        ttl_ms: 3_600_000,
        on_expiry: tollgate::ledger::command::OnExpiry::Release,
        idempotency_key: "carol-hold".into(),
        operation: "envelope.send".into(),
        metadata: tollgate::ledger::Metadata::new(),
        member_id: "carol".into(),
        price_inputs: None,
        attempt_mark: None,
    };
    let debited = server
        .ledger
        .debit(&carol_debit("carol-1"))
        .await
        .expect("carol's debit");
    let held = server
        .ledger
        .authorize(&carol_hold)
        .await
        .expect("carol's hold");
    // A later charge moves her allocation on: the replays must answer as of their time.
    server
        .ledger
        .debit(&carol_debit("carol-2"))
        .await
        .expect("carol's second debit");
    assert_eq!(debited.spendable, Some(100 - 7));
    assert_eq!(held.spendable, Some(100 - 7 - 20));
    // Bob's hold was bounded by his month budget (11 + 30 of 100), not his allocation.
    assert_eq!(bob_hold.spendable, 100 - ENVELOPE - 30);
    // Dave, a personal account with a month budget of 100: his answers carry the
    // budget's headroom, which restore must re-derive (a capture gives 15 back).
    let dave_debit = |amount: i64, key: &str| tollgate::ledger::Debit {
        account_id: "dave".into(),
        wallet: "default".into(),
        amount,
        idempotency_key: key.into(),
        operation: "envelope.send".into(),
        metadata: tollgate::ledger::Metadata::new(),
        member_id: String::new(),
        price_inputs: None,
        attempt_mark: None,
    };
    let dave_hold = tollgate::ledger::command::Authorize {
        account_id: "dave".into(),
        member_id: String::new(),
        idempotency_key: "dave-hold".into(),
        ..carol_hold.clone()
    };
    server
        .ledger
        .grant(&common::purchase("dave", 1_000, "dave-buy"))
        .await
        .expect("dave buys");
    admin
        .set_budget(pb::SetBudgetRequest {
            account_id: "dave".into(),
            limit: 100,
            period: "month".into(),
            idempotency_key: "dave-budget".into(),
            ..Default::default()
        })
        .await
        .expect("dave's budget");
    let d1 = server
        .ledger
        .debit(&dave_debit(30, "dave-1"))
        .await
        .expect("dave's debit");
    assert_eq!(d1.spendable, Some(100 - 30));
    let h = server
        .ledger
        .authorize(&dave_hold)
        .await
        .expect("dave's hold");
    assert_eq!(h.spendable, Some(100 - 30 - 20));
    server
        .ledger
        .end_hold(&tollgate::ledger::command::EndHold::capture(
            h.hold_id.clone(),
            Some(5),
            "dave-capture".into(),
        ))
        .await
        .expect("dave's capture");
    let d2 = server
        .ledger
        .debit(&dave_debit(10, "dave-2"))
        .await
        .expect("dave's second debit");
    assert_eq!(d2.spendable, Some(100 - 30 - 5 - 10));
    let before = views(&server).await;

    // Every org event reaches PostgreSQL, and reconcile (allocations included) agrees.
    let reconcile = |redis_url: String| reconcile_job(redis_url, pg.url.clone());
    let run = reconcile(redis.url());
    let clean = tokio::task::spawn_blocking(run.clone())
        .await
        .expect("join");
    assert!(clean.status.success(), "{clean:?}");
    let store = tollgate::settle::Store::connect_lazy(&pg.url, 2).expect("store");
    let q = tollgate::settle::store::HistoryQuery {
        account_id: "acme".into(),
        page_size: 1000,
        ..Default::default()
    };
    let history = store.history(&q).await.expect("history");
    let kinds: Vec<&str> = history.events.iter().map(|e| e.kind.as_str()).collect();
    for kind in ["member", "allocate", "budget", "debit", "hold"] {
        assert!(kinds.contains(&kind), "{kind} not settled: {kinds:?}");
    }
    assert!(
        history
            .events
            .iter()
            .filter(|e| e.kind.as_str() == "debit")
            .all(|e| ["alice", "bob", "carol"].contains(&e.member.as_str())),
        "every org charge names its member"
    );

    // A planted allocation drift is found.
    let shard = server.ledger.shards().of_account("acme");
    let akey = format!("{}:al:acme:default", server.ledger.shards().tag(shard));
    let _: i64 = server
        .ledger
        .redis()
        .query(redis::cmd("HINCRBY").arg(&akey).arg("alice:u").arg(-7))
        .await
        .expect("plant");
    let drifted = tokio::task::spawn_blocking(run.clone())
        .await
        .expect("join");
    assert_eq!(drifted.status.code(), Some(1), "{drifted:?}");
    let out = String::from_utf8_lossy(&drifted.stdout);
    assert!(
        out.lines()
            .any(|l| l.starts_with("acme:alice") && l.contains("allocation") && l.contains("used")),
        "{out}"
    );
    let _: i64 = server
        .ledger
        .redis()
        .query(redis::cmd("HINCRBY").arg(&akey).arg("alice:u").arg(7))
        .await
        .expect("undo");
    server.stop().await;

    // Redis loses everything; restore rebuilds members, allocations, budgets and keys.
    redis.restart();
    let restored = tool(&["restore", "--redis-url", &redis.url(), "--store", &pg.url]);
    assert!(restored.status.success(), "{restored:?}");
    let mut config = esign_config(&redis.url());
    config.store.url = pg.url.clone();
    config.settler.enabled = true;
    let server = common::TestServer::start(config, Clock::Redis).await;
    assert_eq!(views(&server).await, before);
    // Carol's retries are answered as the first time, and charge nothing again.
    let replayed = server
        .ledger
        .debit(&carol_debit("carol-1"))
        .await
        .expect("carol's debit replayed");
    assert_eq!(
        replayed,
        tollgate::ledger::DebitOutcome {
            replayed: true,
            ..debited
        }
    );
    let replayed = server
        .ledger
        .authorize(&carol_hold)
        .await
        .expect("carol's hold replayed");
    assert_eq!(
        replayed,
        tollgate::ledger::HoldOutcome {
            replayed: true,
            ..held.clone()
        }
    );
    assert_eq!(views(&server).await, before, "a replay charged again");
    // Bob's and dave's too, with the budget headroom of their time.
    let again = server
        .metering()
        .await
        .authorize(pb::AuthorizeRequest {
            account_id: "acme".into(),
            member_id: "bob".into(),
            amount: 30,
            ttl_ms: 600_000,
            idempotency_key: "bob-hold".into(),
            ..Default::default()
        })
        .await
        .expect("bob's hold replayed")
        .into_inner();
    assert_eq!(
        again,
        pb::AuthorizeResponse {
            replayed: true,
            ..bob_hold.clone()
        }
    );
    for (key, amount, first) in [("dave-1", 30, d1), ("dave-2", 10, d2)] {
        let again = server
            .ledger
            .debit(&dave_debit(amount, key))
            .await
            .expect("dave's debit replayed");
        assert_eq!(
            again,
            tollgate::ledger::DebitOutcome {
                replayed: true,
                ..first
            }
        );
    }
    let again = server
        .ledger
        .authorize(&dave_hold)
        .await
        .expect("dave's hold replayed");
    assert_eq!(
        again,
        tollgate::ledger::HoldOutcome {
            replayed: true,
            ..h
        }
    );
    let again = tokio::task::spawn_blocking(reconcile(redis.url()))
        .await
        .expect("join");
    assert!(again.status.success(), "{again:?}");
    // The org keys work again, bound to the same members and allocations.
    let r = send_envelope(&server, &alice).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.header("x-credits-remaining"),
        Some((500 - 4 * ENVELOPE - 40).to_string().as_str())
    );
    // Bob's month budget kept its spend: the envelope sent after it was set and the 5 his
    // hold captured (the 25 it gave back stay given back).
    let spent = |v: &pb::GetBalanceResponse, scope: &str| {
        v.budgets
            .iter()
            .find(|b| b.scope == scope)
            .map(|b| b.spent)
            .unwrap_or_else(|| panic!("no {scope} budget in {v:?}"))
    };
    let b = view(&server, "bob", "").await;
    assert_eq!(spent(&b, "member"), ENVELOPE + 5);
    // Carol's open hold, restored, gives back to the org's budget when released.
    let org_spent = spent(&view(&server, "olivia", "").await, "account");
    server
        .ledger
        .end_hold(&tollgate::ledger::command::EndHold {
            hold_id: held.hold_id.clone(),
            capture: None,
            idempotency_key: "carol-release".into(),
            metadata: tollgate::ledger::Metadata::new(),
        })
        .await
        .expect("release carol's restored hold");
    assert_eq!(
        spent(&view(&server, "olivia", "").await, "account"),
        org_spent - 20
    );
    let _ = DEADLINE;
}

/// A member's charge counts what an overdue hold gives back when the same call ends it:
/// the allocation is read after the lazy expiry, not before (else the charge would be
/// refused ALLOCATION_EXCEEDED with the credits already free, and the answer, which
/// restore rebuilds from the events in order, would not be the one the events imply).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_members_charge_sees_the_allocation_an_overdue_hold_gave_back() {
    use tollgate::ledger::command::{Authorize, OnExpiry};
    use tollgate::ledger::org::AllocationChange;
    use tollgate::ledger::{Debit, Metadata};
    let redis = common::RedisServer::start();
    let (ledger, now) = carol_org_clocked(&redis).await;
    ledger
        .allocate(
            "acme",
            "olivia",
            "carol",
            "default",
            AllocationChange::Set(100),
            "a",
        )
        .await
        .expect("allocate");
    let held = ledger
        .authorize(&Authorize {
            account_id: "acme".into(),
            wallet: "default".into(),
            amount: 60,
            ttl_ms: 1_000,
            on_expiry: OnExpiry::Release,
            idempotency_key: "h".into(),
            operation: "op".into(),
            metadata: Metadata::new(),
            member_id: "carol".into(),
            price_inputs: None,
            attempt_mark: None,
        })
        .await
        .expect("hold");
    assert_eq!(held.spendable, Some(40));
    // Past the deadline, before any sweep: the debit's own call releases the hold first.
    now.fetch_add(2_000, std::sync::atomic::Ordering::SeqCst);
    let debited = ledger
        .debit(&Debit {
            account_id: "acme".into(),
            wallet: "default".into(),
            amount: 50,
            idempotency_key: "d".into(),
            operation: "op".into(),
            metadata: Metadata::new(),
            member_id: "carol".into(),
            price_inputs: None,
            attempt_mark: None,
        })
        .await
        .expect("the released hold's 60 are carol's again");
    assert_eq!(debited.spendable, Some(100 - 50));
    assert_eq!((debited.available, debited.held), (1_000 - 50, 0));
}

/// As above with more of the member's holds overdue than one call's batch ends (lib.lua
/// `DUE_HOLDS_MAX`, 256): the charge is decided with all of them ended, never refused
/// ALLOCATION_EXCEEDED (and the refusal recorded) while some still count in the
/// allocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_members_charge_sees_the_allocation_overdue_holds_past_one_batch_gave_back() {
    use tollgate::ledger::org::AllocationChange;
    let redis = common::RedisServer::start();
    let (ledger, now) = carol_org_clocked(&redis).await;
    ledger
        .allocate(
            "acme",
            "olivia",
            "carol",
            "default",
            AllocationChange::Set(300),
            "a",
        )
        .await
        .expect("allocate");
    for i in 0..300 {
        ledger
            .authorize(&tollgate::ledger::command::Authorize {
                ttl_ms: 1_000,
                ..carol_hold(1, &format!("h{i}"))
            })
            .await
            .expect("hold");
    }
    now.fetch_add(2_000, std::sync::atomic::Ordering::SeqCst);
    let debited = ledger
        .debit(&carol_debit(300, "d"))
        .await
        .expect("every overdue hold gave carol's allocation back first");
    assert_eq!(debited.spendable, Some(0));
    assert_eq!((debited.available, debited.held), (1_000 - 300, 0));
    let again = ledger.debit(&carol_debit(300, "d")).await.expect("replay");
    assert!(again.replayed);
    assert_eq!(again.event_id, debited.event_id);
}

/// A hold gives back what it did not charge only to the budget it was counted in: not to
/// one removed and set again since (else its release would lift the new budget past its
/// limit: 500 held, budget removed and set again, 600 charged, the hold released, 900
/// more let through under a limit of 1,000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_hold_gives_nothing_back_to_a_budget_set_again() {
    use tollgate::ledger::command::{Authorize, EndHold, OnExpiry};
    use tollgate::ledger::org::{BudgetPeriod, SetBudget};
    use tollgate::ledger::{BudgetScope, Debit, LedgerError, Metadata, Refusal};
    const T0: i64 = 1_800_000_000_000;
    let redis = common::RedisServer::start();
    let (clock, _) = Clock::manual(T0);
    let ledger = common::ledger(&redis, clock);
    // "legacy": the first budget was made before budgets had a creation stamp (an
    // upgraded deployment's), so the hold's ref carries an empty one.
    for (acct, unstamped) in [("solo", false), ("legacy", true)] {
        ledger
            .grant(&common::purchase(acct, 5_000, "g"))
            .await
            .expect("grant");
        let budget = |limit: i64, key: &str| SetBudget {
            account_id: acct.into(),
            member_id: String::new(),
            wallet: "default".into(),
            limit,
            period: BudgetPeriod::Day,
            utc_offset_minutes: 0,
            idempotency_key: key.into(),
        };
        let debit = |amount: i64, key: &str| Debit {
            account_id: acct.into(),
            wallet: "default".into(),
            amount,
            idempotency_key: key.into(),
            operation: "op".into(),
            metadata: Metadata::new(),
            member_id: String::new(),
            price_inputs: None,
            attempt_mark: None,
        };
        ledger
            .set_budget(&budget(1_000, "b1"))
            .await
            .expect("budget");
        if unstamped {
            let tag = ledger.shards().tag(ledger.shards().of_account(acct));
            let removed: i64 = ledger
                .redis()
                .query(
                    redis::cmd("HDEL")
                        .arg(format!("{tag}:bg:{acct}:default"))
                        .arg("c"),
                )
                .await
                .expect("hdel");
            assert_eq!(removed, 1, "the budget's stamp");
        }
        let held = ledger
            .authorize(&Authorize {
                account_id: acct.into(),
                wallet: "default".into(),
                amount: 500,
                ttl_ms: 3_600_000,
                on_expiry: OnExpiry::Release,
                idempotency_key: "h".into(),
                operation: "op".into(),
                metadata: Metadata::new(),
                member_id: String::new(),
                price_inputs: None,
                attempt_mark: None,
            })
            .await
            .expect("hold");
        ledger.set_budget(&budget(0, "b2")).await.expect("remove");
        ledger
            .set_budget(&budget(1_000, "b3"))
            .await
            .expect("set again");
        ledger
            .debit(&debit(600, "d1"))
            .await
            .expect("600 of the new 1,000");
        ledger
            .end_hold(&EndHold {
                hold_id: held.hold_id,
                capture: None,
                idempotency_key: "r".into(),
                metadata: Metadata::new(),
            })
            .await
            .expect("release");
        match ledger.debit(&debit(900, "d2")).await {
            Err(LedgerError::Refused(Refusal::BudgetExceeded {
                budget,
                limit,
                spent,
                ..
            })) => {
                assert_eq!((budget, limit, spent), (BudgetScope::Account, 1_000, 600));
            }
            other => panic!("{acct}: 900 more under a budget of 1,000 with 600 spent: {other:?}"),
        }
    }
}

/// An org with a member "carol" (role `member`) and 1,000 credits, on a manual clock.
async fn carol_org(redis: &common::RedisServer) -> std::sync::Arc<tollgate::ledger::Ledger> {
    carol_org_clocked(redis).await.0
}

/// [`carol_org`], and the hand of its clock (starting at 1,800,000,000,000 ms).
async fn carol_org_clocked(
    redis: &common::RedisServer,
) -> (
    std::sync::Arc<tollgate::ledger::Ledger>,
    std::sync::Arc<std::sync::atomic::AtomicI64>,
) {
    let (clock, now) = Clock::manual(1_800_000_000_000);
    let ledger = common::ledger(redis, clock);
    ledger.create_org("acme", "olivia", "c").await.expect("org");
    ledger
        .grant(&common::purchase("acme", 1_000, "g"))
        .await
        .expect("grant");
    ledger
        .add_member("acme", "olivia", "carol", "member", "m")
        .await
        .expect("member");
    (ledger, now)
}

fn carol_debit(amount: i64, key: &str) -> tollgate::ledger::Debit {
    tollgate::ledger::Debit {
        account_id: "acme".into(),
        wallet: "default".into(),
        amount,
        idempotency_key: key.into(),
        operation: "op".into(),
        metadata: tollgate::ledger::Metadata::new(),
        member_id: "carol".into(),
        price_inputs: None,
        attempt_mark: None,
    }
}

fn carol_hold(amount: i64, key: &str) -> tollgate::ledger::command::Authorize {
    tollgate::ledger::command::Authorize {
        account_id: "acme".into(),
        wallet: "default".into(),
        amount,
        ttl_ms: 3_600_000,
        on_expiry: tollgate::ledger::command::OnExpiry::Release,
        idempotency_key: key.into(),
        operation: "op".into(),
        metadata: tollgate::ledger::Metadata::new(),
        member_id: "carol".into(),
        price_inputs: None,
        attempt_mark: None,
    }
}

/// An allocation lowered below what the member already used leaves nothing to spend:
/// ALLOCATION_EXCEEDED says `remaining` 0, never a negative amount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allocation_lowered_below_its_use_reports_nothing_remaining() {
    use tollgate::ledger::org::AllocationChange;
    use tollgate::ledger::{LedgerError, Refusal};
    let redis = common::RedisServer::start();
    let ledger = carol_org(&redis).await;
    let allocate = |amount: i64, key: &'static str| {
        let ledger = ledger.clone();
        async move {
            ledger
                .allocate(
                    "acme",
                    "olivia",
                    "carol",
                    "default",
                    AllocationChange::Set(amount),
                    key,
                )
                .await
                .expect("allocate")
        }
    };
    allocate(100, "a1").await;
    ledger
        .debit(&carol_debit(80, "d1"))
        .await
        .expect("80 of 100");
    let lowered = allocate(50, "a2").await;
    assert_eq!((lowered.allocated, lowered.used), (50, 80));
    let refused = |r: Result<(), LedgerError>| match r {
        Err(LedgerError::Refused(Refusal::AllocationExceeded {
            required,
            remaining,
        })) => (required, remaining),
        other => panic!("not ALLOCATION_EXCEEDED: {other:?}"),
    };
    let debit = ledger.debit(&carol_debit(10, "d2")).await.map(|_| ());
    assert_eq!(refused(debit), (10, 0), "a debit");
    let hold = ledger.authorize(&carol_hold(10, "h1")).await.map(|_| ());
    assert_eq!(refused(hold), (10, 0), "a hold");
}

/// ListMembers after Redis lost its data answers LEDGER_NOT_INITIALIZED, as every other
/// read does, not NOT_FOUND (the org is in the durable ledger, waiting for a restore).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_members_after_redis_lost_its_data_is_not_initialized() {
    use tollgate::ledger::org::Role;
    use tollgate::ledger::LedgerError;
    let redis = common::RedisServer::start();
    let ledger = carol_org(&redis).await;
    assert_eq!(
        ledger.members_page("acme", "", 10).await.expect("members"),
        tollgate::ledger::org::MembersPage {
            members: vec![
                ("carol".to_owned(), Role::Member),
                ("olivia".to_owned(), Role::Owner)
            ],
            next_after: None,
        }
    );
    assert!(
        matches!(
            ledger.members_page("nobody", "", 10).await,
            Err(LedgerError::NotFound("organization"))
        ),
        "an account that is no org"
    );
    let _: String = ledger
        .redis()
        .query(&redis::cmd("FLUSHALL"))
        .await
        .expect("Redis loses its data");
    for org in ["acme", "nobody"] {
        match ledger.members_page(org, "", 10).await {
            Err(LedgerError::NotInitialized) => {}
            other => panic!("{org}: {other:?}"),
        }
        // As the script-based reads answer.
        assert!(
            matches!(
                ledger.view(org, "carol", "").await,
                Err(LedgerError::NotInitialized)
            ),
            "view of {org}"
        );
    }
}

/// A rolling window has no calendar, so a UTC offset is refused for it, naming the field
/// (else a different offset would count as a new definition and wipe the window's spend);
/// the refusal changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_budget_refuses_a_utc_offset_and_keeps_its_spend() {
    use tollgate::ledger::org::{BudgetPeriod, SetBudget};
    use tollgate::ledger::LedgerError;
    let redis = common::RedisServer::start();
    let ledger = carol_org(&redis).await;
    let budget = |member: &str, limit: i64, offset: i32, key: &str| SetBudget {
        account_id: "acme".into(),
        member_id: member.into(),
        wallet: "default".into(),
        limit,
        period: BudgetPeriod::Window(3_600_000),
        utc_offset_minutes: offset,
        idempotency_key: key.into(),
    };
    for member in ["", "olivia"] {
        ledger
            .set_budget(&budget(member, 500, 0, &format!("b-{member}")))
            .await
            .expect("window budget");
    }
    ledger
        .debit(&tollgate::ledger::Debit {
            member_id: "olivia".into(),
            ..carol_debit(30, "d")
        })
        .await
        .expect("30 counted in both budgets");
    let spent = || async {
        let view = ledger
            .view("acme", "olivia", "default")
            .await
            .expect("view");
        view.budgets
            .iter()
            .map(|b| (b.scope.clone(), b.limit, b.spent))
            .collect::<Vec<_>>()
    };
    let before = spent().await;
    assert_eq!(
        before,
        [("account".into(), 500, 30), ("member".into(), 500, 30)]
    );
    for member in ["", "olivia"] {
        for offset in [60, -60] {
            match ledger
                .set_budget(&budget(
                    member,
                    400,
                    offset,
                    &format!("z-{member}-{offset}"),
                ))
                .await
            {
                Err(LedgerError::InvalidArgument(v)) => {
                    let fields: Vec<&str> = v.iter().map(|f| f.field.as_str()).collect();
                    assert_eq!(fields, ["utc_offset_minutes"], "{member:?} {offset}");
                }
                other => panic!("{member:?} {offset}: {other:?}"),
            }
        }
    }
    assert_eq!(spent().await, before, "a refusal changed the budgets");
    // A window budget stored with an offset before offsets were refused for windows keeps
    // its spend when it is set again with offset 0 (the only one accepted now).
    let shard = ledger.shards().of_account("acme");
    let member_budget = format!("{}:bg:acme:default:olivia", ledger.shards().tag(shard));
    let _: i64 = ledger
        .redis()
        .query(
            redis::cmd("HSET")
                .arg(&member_budget)
                .arg("z")
                .arg(3_600_000),
        )
        .await
        .expect("plant an older budget's offset");
    ledger
        .set_budget(&budget("olivia", 400, 0, "again"))
        .await
        .expect("the same window, offset 0");
    assert_eq!(
        spent().await,
        [("account".into(), 500, 30), ("member".into(), 400, 30)],
        "the window's spend was wiped"
    );
    // A calendar period still takes an offset.
    ledger
        .set_budget(&SetBudget {
            period: BudgetPeriod::Day,
            ..budget("", 500, 60, "day")
        })
        .await
        .expect("a day budget at UTC+1");
}

/// Org "acme" (owner olivia, member carol) with 1,000 credits in its first wallet, on a
/// ledger whose wallet cap is 2, at a fixed time.
async fn capped_org() -> (
    common::RedisServer,
    std::sync::Arc<tollgate::ledger::Ledger>,
) {
    let redis = common::RedisServer::start();
    let mut config = common::test_config(&redis.url());
    config.ledger.wallets_per_account_max = 2;
    let (clock, _) = Clock::manual(1_800_000_000_000);
    let ledger = tollgate::server::ledger_from_config(&config, clock).expect("ledger");
    common::initialize_blocking(&ledger, &redis.url());
    ledger.create_org("acme", "olivia", "c").await.expect("org");
    ledger
        .grant(&common::purchase("acme", 1_000, "g"))
        .await
        .expect("grant: the org's first wallet");
    ledger
        .add_member("acme", "olivia", "carol", "member", "m")
        .await
        .expect("member");
    (redis, ledger)
}

/// An allocation on a new org wallet counts against the per-account wallet cap and joins
/// the org's wallet set, as a budget does: past the cap it is refused WALLET_LIMIT, and
/// within it GetBalance shows the wallet and the member's allocation of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allocation_on_a_new_wallet_is_within_the_wallet_cap_and_shown() {
    use tollgate::ledger::org::AllocationChange;
    use tollgate::ledger::{LedgerError, Refusal};
    let (_redis, ledger) = capped_org().await;
    let allocate = |wallet: &'static str, change: AllocationChange, key: &'static str| {
        let ledger = ledger.clone();
        async move {
            ledger
                .allocate("acme", "olivia", "carol", wallet, change, key)
                .await
        }
    };
    allocate("esign", AllocationChange::Set(70), "a1")
        .await
        .expect("the org's second wallet");
    let view = ledger.view("acme", "carol", "").await.expect("view");
    let allocations: Vec<(&str, i64)> = view
        .allocations
        .iter()
        .map(|a| (a.wallet.as_str(), a.allocated))
        .collect();
    assert_eq!(allocations, [("default", 0), ("esign", 70)]);
    let wallets: Vec<String> = ledger
        .balance("acme", "")
        .await
        .expect("balance")
        .into_iter()
        .map(|w| w.wallet)
        .collect();
    assert_eq!(wallets, ["default", "esign"]);
    for (change, key) in [
        (AllocationChange::Set(5), "a2"),
        (AllocationChange::Add(5), "a3"),
    ] {
        match allocate("third", change, key).await {
            Err(LedgerError::Refused(Refusal::WalletLimit { max: 2 })) => {}
            other => panic!("a third wallet past a cap of 2: {other:?}"),
        }
    }
    let view = ledger.view("acme", "carol", "third").await.expect("view");
    assert_eq!(
        view.allocations[0].allocated, 0,
        "the refusal changed nothing"
    );
    // A wallet already in the set takes any allocation.
    allocate("esign", AllocationChange::Add(30), "a4")
        .await
        .expect("esign again");
    // A wallet allocated before allocations joined the wallet set (planted here: an
    // allocation record outside the set, at the cap) can still be changed and cleared.
    let shard = ledger.shards().of_account("acme");
    let legacy = format!("{}:al:acme:legacy", ledger.shards().tag(shard));
    let _: i64 = ledger
        .redis()
        .query(redis::cmd("HSET").arg(&legacy).arg("carol").arg(40))
        .await
        .expect("plant an older allocation");
    let cleared = allocate("legacy", AllocationChange::Set(0), "a5")
        .await
        .expect("an older allocation past the cap is cleared");
    assert_eq!(cleared.allocated, 0);
}

/// Carol's allocations and budgets, as GetBalance shows them to her (none when she is no
/// member): (wallet, allocated, used, bounded) and (scope, wallet, limit).
async fn carol_state(
    ledger: &tollgate::ledger::Ledger,
    member: &str,
) -> (Vec<(String, i64, i64, bool)>, Vec<(String, String, i64)>) {
    let view = ledger.view("acme", member, "").await.expect("view");
    (
        view.allocations
            .into_iter()
            .map(|a| (a.wallet, a.allocated, a.used, a.bounded))
            .collect(),
        view.budgets
            .into_iter()
            .map(|b| (b.scope, b.wallet, b.limit))
            .collect(),
    )
}

/// A member who leaves leaves no allocation or budget behind, in any org wallet: re-added,
/// they have neither (a plain member can spend nothing again until an allocation is set;
/// an admin is bounded by the org balance only), so re-adding no longer hands the old
/// allocation straight back. What they used stays, and their hold open across the
/// removal still gives back to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_leaves_no_allocation_or_budget_behind() {
    use tollgate::ledger::org::{AllocationChange, BudgetPeriod, SetBudget};
    use tollgate::ledger::{EndHold, LedgerError, Metadata, Refusal};
    let redis = common::RedisServer::start();
    let ledger = carol_org(&redis).await;
    let allocate = |member: &'static str, wallet: &'static str, amount: i64, key: String| {
        let ledger = ledger.clone();
        async move {
            ledger
                .allocate(
                    "acme",
                    "olivia",
                    member,
                    wallet,
                    AllocationChange::Set(amount),
                    &key,
                )
                .await
                .expect("allocate")
        }
    };
    allocate("carol", "default", 100, "a1".into()).await;
    allocate("carol", "esign", 40, "a2".into()).await;
    for wallet in ["default", "esign"] {
        ledger
            .set_budget(&SetBudget {
                account_id: "acme".into(),
                member_id: "carol".into(),
                wallet: wallet.into(),
                limit: 80,
                period: BudgetPeriod::Day,
                utc_offset_minutes: 0,
                idempotency_key: format!("b-{wallet}"),
            })
            .await
            .expect("carol's budget");
    }
    ledger.debit(&carol_debit(30, "d1")).await.expect("debit");
    let held = ledger.authorize(&carol_hold(20, "h1")).await.expect("hold");
    assert_eq!(
        carol_state(&ledger, "carol").await,
        (
            vec![
                ("default".into(), 100, 50, true),
                ("esign".into(), 40, 0, true)
            ],
            vec![
                ("member".into(), "default".into(), 80),
                ("member".into(), "esign".into(), 80)
            ]
        )
    );

    ledger
        .remove_member("acme", "olivia", "carol", "leave")
        .await
        .expect("carol leaves");
    ledger
        .add_member("acme", "olivia", "carol", "member", "back")
        .await
        .expect("carol is back");
    assert_eq!(
        carol_state(&ledger, "carol").await,
        (
            vec![
                ("default".into(), 0, 50, true),
                ("esign".into(), 0, 0, true)
            ],
            vec![]
        ),
        "the old allocations and budgets stayed behind"
    );
    match ledger.debit(&carol_debit(1, "d2")).await {
        Err(LedgerError::Refused(Refusal::AllocationExceeded {
            required: 1,
            remaining: 0,
        })) => {}
        other => panic!("the old allocation handed back: {other:?}"),
    }
    // A new allocation counts what she used; her hold from before the removal still
    // gives back to it when it ends.
    let set = allocate("carol", "default", 60, "a3".into()).await;
    assert_eq!((set.allocated, set.used), (60, 50));
    ledger
        .end_hold(&EndHold {
            hold_id: held.hold_id,
            capture: None,
            idempotency_key: "r".into(),
            metadata: Metadata::new(),
        })
        .await
        .expect("release");
    let debited = ledger.debit(&carol_debit(30, "d3")).await.expect("60 - 30");
    assert_eq!(debited.spendable, Some(0));

    // Back as an admin: no allocation, so only the org balance bounds her.
    ledger
        .remove_member("acme", "olivia", "carol", "leave-2")
        .await
        .expect("carol leaves again");
    ledger
        .add_member("acme", "olivia", "carol", "admin", "back-2")
        .await
        .expect("carol is back as an admin");
    let (allocations, budgets) = carol_state(&ledger, "carol").await;
    assert!(
        allocations.iter().all(|a| a.1 == 0 && !a.3),
        "{allocations:?}"
    );
    assert!(budgets.is_empty(), "{budgets:?}");
    let debited = ledger
        .debit(&carol_debit(200, "d4"))
        .await
        .expect("unbounded");
    assert_eq!(debited.spendable, None);
}

/// A member's removal settles, reconciles and restores: the events that drop their
/// allocations and budgets are rebuilt as they were (an admin re-added is unbounded
/// again, not bounded by an allocation of 0), and reconcile finds no drift before or
/// after the restore.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_members_removal_settles_reconciles_and_restores() {
    use tollgate::ledger::org::{AllocationChange, BudgetPeriod, SetBudget};
    let mut redis = common::RedisServer::start();
    let pg = common::PgDatabase::create().await;
    let config = |redis: &common::RedisServer| {
        let mut config = common::test_config(&redis.url());
        config.store.url = pg.url.clone();
        config.settler.enabled = true;
        config
    };
    let server = common::TestServer::start(config(&redis), Clock::Redis).await;
    let ledger = server.ledger.clone();
    ledger.create_org("acme", "olivia", "c").await.expect("org");
    ledger
        .grant(&common::purchase("acme", 1_000, "g"))
        .await
        .expect("grant");
    for (member, role) in [("carol", "member"), ("dave", "admin")] {
        ledger
            .add_member("acme", "olivia", member, role, &format!("add-{member}"))
            .await
            .expect("member");
        for (wallet, amount) in [("default", 100), ("esign", 40)] {
            ledger
                .allocate(
                    "acme",
                    "olivia",
                    member,
                    wallet,
                    AllocationChange::Set(amount),
                    &format!("a-{member}-{wallet}"),
                )
                .await
                .expect("allocate");
        }
        ledger
            .set_budget(&SetBudget {
                account_id: "acme".into(),
                member_id: member.into(),
                wallet: "esign".into(),
                limit: 80,
                period: BudgetPeriod::Month,
                utc_offset_minutes: 0,
                idempotency_key: format!("b-{member}"),
            })
            .await
            .expect("budget");
        ledger
            .debit(&tollgate::ledger::Debit {
                member_id: member.into(),
                ..carol_debit(30, &format!("d-{member}"))
            })
            .await
            .expect("debit");
    }
    let held = ledger.authorize(&carol_hold(20, "h")).await.expect("hold");
    for (member, role) in [("carol", "member"), ("dave", "admin")] {
        ledger
            .remove_member("acme", "olivia", member, &format!("leave-{member}"))
            .await
            .expect("leave");
        ledger
            .add_member("acme", "olivia", member, role, &format!("back-{member}"))
            .await
            .expect("back");
    }
    ledger
        .allocate(
            "acme",
            "olivia",
            "carol",
            "default",
            AllocationChange::Set(70),
            "a-again",
        )
        .await
        .expect("a new allocation");
    // A wallet with an allocation and nothing else: restore puts it in the org's wallet
    // set too.
    ledger
        .allocate(
            "acme",
            "olivia",
            "carol",
            "sms",
            AllocationChange::Set(15),
            "a-sms",
        )
        .await
        .expect("an allocation on a third wallet");
    // Carol's hold from before her removal ends after it.
    ledger
        .end_hold(&tollgate::ledger::EndHold {
            hold_id: held.hold_id,
            capture: Some(Some(5)),
            idempotency_key: "capture".into(),
            metadata: tollgate::ledger::Metadata::new(),
        })
        .await
        .expect("capture");
    let states = |ledger: std::sync::Arc<tollgate::ledger::Ledger>| async move {
        let mut out = Vec::new();
        for member in ["carol", "dave"] {
            out.push(carol_state(&ledger, member).await);
        }
        out
    };
    let before = states(ledger.clone()).await;
    assert_eq!(
        before,
        [
            (
                vec![
                    ("default".into(), 70, 35, true),
                    ("esign".into(), 0, 0, true),
                    ("sms".into(), 15, 0, true)
                ],
                vec![]
            ),
            (
                vec![
                    ("default".into(), 0, 30, false),
                    ("esign".into(), 0, 0, false),
                    ("sms".into(), 0, 0, false)
                ],
                vec![]
            ),
        ]
    );
    let reconcile = |redis_url: String| reconcile_job(redis_url, pg.url.clone());
    let clean = tokio::task::spawn_blocking(reconcile(redis.url()))
        .await
        .expect("join");
    assert!(clean.status.success(), "{clean:?}");
    server.stop().await;

    redis.restart();
    let restored = tool(&["restore", "--redis-url", &redis.url(), "--store", &pg.url]);
    assert!(restored.status.success(), "{restored:?}");
    let server = common::TestServer::start(config(&redis), Clock::Redis).await;
    assert_eq!(states(server.ledger.clone()).await, before);
    let again = tokio::task::spawn_blocking(reconcile(redis.url()))
        .await
        .expect("join");
    assert!(again.status.success(), "{again:?}");
    server.stop().await;
}

/// Org operations keep their idempotency records across a restore, in PostgreSQL and in
/// SQLite: each retry with its key is answered as the first time (an AddAllocation is not
/// added twice), and the same key with another request, another actor's included, gets
/// IDEMPOTENCY_KEY_REUSED as live Redis gives it. An operation settled before its event
/// named the actor (no `actor` in the store) restores all the same, without a record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn org_operations_replay_after_a_restore() {
    use tollgate::ledger::org::{AllocationChange, BudgetPeriod, SetBudget};
    use tollgate::settle::restore::{restore, RestoreMode};
    use tollgate::settle::settler::{Settler, SettlerSettings};
    use tollgate::settle::Store;

    let pg = common::PgDatabase::create().await;
    for url in [pg.url.clone(), common::temp_sqlite_url()] {
        let redis = common::RedisServer::start();
        let ledger = common::ledger(&redis, Clock::Redis);
        let store = std::sync::Arc::new(Store::connect_lazy(&url, 2).expect("store"));
        store.migrate().await.expect("migrate");
        let kind = store.kind();
        let ledger = &ledger;
        let allocate = |actor: &'static str, member: &'static str, change, key: &'static str| {
            ledger.allocate("acme", actor, member, "default", change, key)
        };
        let budget = |limit: i64| SetBudget {
            account_id: "acme".into(),
            member_id: "carol".into(),
            wallet: String::new(),
            limit,
            period: BudgetPeriod::Day,
            utc_offset_minutes: 60,
            idempotency_key: "budget".into(),
        };

        ledger
            .grant(&common::purchase("acme", 1_000, "g"))
            .await
            .expect("grant");
        let created = ledger.create_org("acme", "olivia", "c").await.expect("org");
        let mut added = Vec::new();
        for (member, role) in [("carol", "member"), ("adam", "admin"), ("dave", "member")] {
            added.push(
                ledger
                    .add_member("acme", "olivia", member, role, &format!("add-{member}"))
                    .await
                    .expect("add"),
            );
        }
        let set = allocate("olivia", "carol", AllocationChange::Set(100), "set")
            .await
            .expect("set");
        ledger.debit(&carol_debit(30, "d")).await.expect("debit");
        let more = allocate("olivia", "carol", AllocationChange::Add(50), "more")
            .await
            .expect("add");
        assert_eq!((more.allocated, more.used), (150, 30), "{kind}");
        // Made by the admin: the actor is theirs.
        let dave = allocate("adam", "dave", AllocationChange::Add(20), "dave-more")
            .await
            .expect("dave's");
        let budgeted = ledger.set_budget(&budget(80)).await.expect("budget");
        let removed = ledger
            .remove_member("acme", "olivia", "dave", "rm-dave")
            .await
            .expect("remove");
        // An allocation whose event will lose its actor, as one settled before it was
        // stored.
        ledger
            .add_member("acme", "olivia", "erin", "member", "add-erin")
            .await
            .expect("erin");
        allocate("olivia", "erin", AllocationChange::Add(10), "erin-more")
            .await
            .expect("erin's");
        // The conflicts live Redis answers: another delta, another actor, another limit.
        let conflicts = || async {
            vec![
                format!(
                    "{:?}",
                    allocate("olivia", "carol", AllocationChange::Add(60), "more").await
                ),
                format!(
                    "{:?}",
                    allocate("adam", "carol", AllocationChange::Add(50), "more").await
                ),
                format!(
                    "{:?}",
                    allocate("olivia", "carol", AllocationChange::Set(101), "set").await
                ),
                format!("{:?}", ledger.set_budget(&budget(81)).await),
                format!(
                    "{:?}",
                    ledger
                        .add_member("acme", "olivia", "carol", "admin", "add-carol")
                        .await
                ),
                format!(
                    "{:?}",
                    ledger
                        .remove_member("acme", "adam", "dave", "rm-dave")
                        .await
                ),
            ]
        };
        let live = conflicts().await;
        for answer in &live {
            assert!(answer.contains("IdempotencyKeyReused"), "{kind}: {answer}");
        }
        let before = carol_state(ledger, "carol").await;
        assert_eq!(before.0, [("default".into(), 150, 30, true)], "{kind}");

        Settler::new(
            ledger.clone(),
            store.clone(),
            SettlerSettings {
                consumer: "orgidem-test".into(),
                ..SettlerSettings::default()
            },
        )
        .drain(DEADLINE)
        .await
        .expect("settled");
        let settled = store
            .history(&tollgate::settle::store::HistoryQuery {
                account_id: "acme".into(),
                page_size: 1000,
                ..Default::default()
            })
            .await
            .expect("history");
        let actor_of = |key: &str| -> Vec<&str> {
            settled
                .events
                .iter()
                .filter(|e| e.idempotency_key == key)
                .map(|e| e.actor.as_str())
                .collect()
        };
        assert_eq!(actor_of("more"), ["olivia"], "{kind}");
        assert_eq!(actor_of("dave-more"), ["adam"], "{kind}");
        // RemoveMember's own event and the one that drops dave's allocation.
        assert_eq!(actor_of("rm-dave"), ["olivia", "olivia"], "{kind}");
        assert_eq!(actor_of("c"), [""], "{kind}");
        assert_eq!(actor_of("budget"), [""], "{kind}");
        forget_actor(&url, "erin-more").await;
        let mut con = redis.client().get_connection().expect("redis");
        let _: () = redis::cmd("FLUSHALL").query(&mut con).expect("flushall");

        restore(ledger.clone(), store.clone(), RestoreMode::Lost, |_, _| {})
            .await
            .expect("restore");
        assert_eq!(carol_state(ledger, "carol").await, before, "{kind}");
        // Every retry is answered as the first time and changes nothing.
        let again = ledger.create_org("acme", "olivia", "c").await;
        assert_eq!(
            again.expect("create again"),
            (
                tollgate::ledger::org::OrgEvent {
                    replayed: true,
                    ..created.0.clone()
                },
                created.1
            ),
            "{kind}"
        );
        for ((member, role), first) in [("carol", "member"), ("adam", "admin"), ("dave", "member")]
            .into_iter()
            .zip(&added)
        {
            let again = ledger
                .add_member("acme", "olivia", member, role, &format!("add-{member}"))
                .await
                .expect("add again");
            assert!(
                again.replayed && again.event_id == first.event_id,
                "{kind} {again:?}"
            );
        }
        for (actor, member, change, key, first) in [
            ("olivia", "carol", AllocationChange::Set(100), "set", &set),
            ("olivia", "carol", AllocationChange::Add(50), "more", &more),
            (
                "adam",
                "dave",
                AllocationChange::Add(20),
                "dave-more",
                &dave,
            ),
        ] {
            let again = allocate(actor, member, change, key)
                .await
                .expect("allocate again");
            assert_eq!(
                again,
                tollgate::ledger::org::AllocationOutcome {
                    replayed: true,
                    ..first.clone()
                },
                "{kind} {key}"
            );
        }
        let again = ledger.set_budget(&budget(80)).await.expect("budget again");
        assert!(
            again.replayed && again.event_id == budgeted.event_id,
            "{kind} {again:?}"
        );
        let again = ledger
            .remove_member("acme", "olivia", "dave", "rm-dave")
            .await
            .expect("remove again");
        assert!(
            again.replayed && again.event_id == removed.event_id,
            "{kind} {again:?}"
        );
        assert_eq!(
            carol_state(ledger, "carol").await,
            before,
            "{kind}: a retry changed the allocation"
        );
        // Another request with a used key is refused as live Redis refused it.
        assert_eq!(conflicts().await, live, "{kind}");
        assert_eq!(carol_state(ledger, "carol").await, before, "{kind}");
        // Without its actor, the record cannot be rebuilt: the retry is evaluated again.
        let erin = allocate("olivia", "erin", AllocationChange::Add(10), "erin-more")
            .await
            .expect("erin's again");
        assert!(!erin.replayed, "{kind} {erin:?}");
        drop(redis);
    }
}

/// Blanks the actor of the events of one idempotency key in a store, as events settled
/// before they carried it are.
async fn forget_actor(url: &str, key: &str) {
    let sql = "UPDATE tollgate_events SET actor = '' WHERE idempotency_key = $1";
    if url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(url).await.expect("sqlite");
        let done = sqlx::query(sql)
            .bind(key)
            .execute(&pool)
            .await
            .expect("update");
        assert!(done.rows_affected() > 0);
        pool.close().await;
    } else {
        let pool = sqlx::PgPool::connect(url).await.expect("postgres");
        let done = sqlx::query(sql)
            .bind(key)
            .execute(&pool)
            .await
            .expect("update");
        assert!(done.rows_affected() > 0);
        pool.close().await;
    }
}

/// Removing a budget that is not there (the account's or a member's) is NOT_FOUND and
/// changes nothing: no event, no wallet joins the account's set. The answer is kept under
/// the key: a retry of the same request (its answer lost) answers NOT_FOUND again, and does
/// not remove a budget someone set meanwhile. A budget there is removed once, and removing
/// it again is NOT_FOUND.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_budget_that_is_not_there_is_not_found_and_records_nothing() {
    use tollgate::ledger::org::{BudgetPeriod, SetBudget};
    use tollgate::ledger::LedgerError;
    let redis = common::RedisServer::start();
    let ledger = common::ledger(&redis, Clock::Redis);
    ledger.create_org("acme", "olivia", "c").await.expect("org");
    ledger
        .add_member("acme", "olivia", "alice", "member", "m")
        .await
        .expect("member");
    let budget = |member: &str, wallet: &str, limit: i64, key: &str| SetBudget {
        account_id: "acme".into(),
        member_id: member.into(),
        wallet: wallet.into(),
        limit,
        period: BudgetPeriod::Day,
        utc_offset_minutes: 0,
        idempotency_key: key.into(),
    };
    let events = common::outbox_len(&ledger).await;
    let wallets = ledger.balance("acme", "").await.expect("balance").len();
    for (member, wallet, key) in [
        ("", "default", "rm-0"),
        ("alice", "default", "rm"),
        ("", "esign", "rm-2"),
    ] {
        let err = ledger
            .set_budget(&budget(member, wallet, 0, key))
            .await
            .expect_err("nothing to remove");
        assert!(
            matches!(err, LedgerError::NotFound("budget")),
            "{member}/{wallet}: {err:?}"
        );
    }
    assert_eq!(common::outbox_len(&ledger).await, events, "no event");
    assert_eq!(
        ledger.balance("acme", "").await.expect("balance").len(),
        wallets,
        "no wallet made for it"
    );

    ledger
        .set_budget(&budget("alice", "default", 100, "set"))
        .await
        .expect("set");
    // The key "rm" kept its answer: a retry does not remove the budget set since.
    let err = ledger
        .set_budget(&budget("alice", "default", 0, "rm"))
        .await
        .expect_err("the first answer again");
    assert!(matches!(err, LedgerError::NotFound("budget")), "{err:?}");
    assert_eq!(common::outbox_len(&ledger).await, events + 1, "set only");
    let removed = ledger
        .set_budget(&budget("alice", "default", 0, "rm-1"))
        .await
        .expect("remove");
    assert!(!removed.replayed);
    let again = ledger
        .set_budget(&budget("alice", "default", 0, "rm-1"))
        .await
        .expect("a replay of the removal");
    assert!(again.replayed);
    let err = ledger
        .set_budget(&budget("alice", "default", 0, "rm-3"))
        .await
        .expect_err("removed already");
    assert!(matches!(err, LedgerError::NotFound("budget")), "{err:?}");
    assert_eq!(
        common::outbox_len(&ledger).await,
        events + 2,
        "set, removed"
    );
}

/// An org key made through the Admin API by `actor` (bound to `member`, or org-wide).
async fn org_key(
    server: &common::TestServer,
    actor: &str,
    member: &str,
) -> pb::CreateApiKeyResponse {
    server
        .admin()
        .await
        .create_api_key(pb::CreateApiKeyRequest {
            org_id: "acme".into(),
            member_id: member.into(),
            actor_id: actor.into(),
            name: format!(
                "{actor}'s key for {}",
                if member.is_empty() { "acme" } else { member }
            ),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("{actor} makes a key: {s:?}"))
        .into_inner()
}

/// acme (1,000 credits): owner olivia, admins bob and dave, member alice (100 allocated);
/// bob's allocation is 10.
async fn acme_with_admins(server: &common::TestServer) {
    common::org_with_members(
        server,
        "acme",
        "olivia",
        1_000,
        &[("bob", "admin"), ("dave", "admin"), ("alice", "member")],
    )
    .await;
    let mut admin = server.admin().await;
    for (member, amount) in [("bob", 10), ("alice", 100)] {
        admin
            .set_allocation(pb::SetAllocationRequest {
                org_id: "acme".into(),
                member_id: member.into(),
                amount,
                actor_id: "olivia".into(),
                idempotency_key: format!("alloc-{member}"),
                ..Default::default()
            })
            .await
            .expect("allocate");
    }
}

/// acme's keys, by key id.
async fn acme_keys(server: &common::TestServer) -> Vec<pb::ApiKey> {
    let mut keys = server
        .admin()
        .await
        .list_api_keys(pb::ListApiKeysRequest {
            account_id: "acme".into(),
        })
        .await
        .expect("list")
        .into_inner()
        .keys;
    keys.sort_by(|a, b| a.key_id.cmp(&b.key_id));
    keys
}

/// The reviewer's sequence: bob, an admin held to an allocation of 10, makes an org-wide
/// key (bounded only by the org balance) and one bound to alice; removed from the org,
/// bob's keys must not spend the org's credits — neither the org-wide one nor the one
/// spending alice's allocation. RemoveMember revokes every key the member made, whatever
/// member it is bound to, and a demotion to plain member does the same (dave); an owner's
/// keys stay. The key records name their maker, ListApiKeys shows it, and the store keeps
/// both the maker and the revocation, so a restore brings neither the keys back to life
/// nor loses the maker — even when a revocation never reached the store (restore revokes
/// a live key whose maker is no longer an owner or admin in the restored org).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_or_demoted_admins_keys_are_revoked_and_stay_so_after_a_restore() {
    let mut redis = common::RedisServer::start();
    let pg = common::PgDatabase::create().await;
    let config = |redis: &common::RedisServer| {
        let mut config = esign_config(&redis.url());
        config.store.url = pg.url.clone();
        config.settler.enabled = true;
        config
    };
    let server = common::TestServer::start(config(&redis), Clock::Redis).await;
    acme_with_admins(&server).await;
    let mut metering = server.metering().await;
    let over = metering
        .debit(pb::DebitRequest {
            account_id: "acme".into(),
            member_id: "bob".into(),
            amount: 50,
            idempotency_key: "bob-50".into(),
            ..Default::default()
        })
        .await
        .expect_err("bob's allocation is 10");
    assert_eq!(reason(&over), "ALLOCATION_EXCEEDED", "{over:?}");

    let bob_wide = org_key(&server, "bob", "").await;
    let bob_for_alice = org_key(&server, "bob", "alice").await;
    let dave_wide = org_key(&server, "dave", "").await;
    let dave_for_alice = org_key(&server, "dave", "alice").await;
    let olivia_wide = org_key(&server, "olivia", "").await;
    let olivia_for_alice = org_key(&server, "olivia", "alice").await;
    for key in [
        &bob_wide,
        &bob_for_alice,
        &dave_wide,
        &dave_for_alice,
        &olivia_wide,
        &olivia_for_alice,
    ] {
        let r = send_envelope(&server, &key.api_key).await;
        assert_eq!(r.status, 200, "{r:?}");
    }

    let mut admin = server.admin().await;
    let remove = pb::RemoveMemberRequest {
        org_id: "acme".into(),
        member_id: "bob".into(),
        actor_id: "olivia".into(),
        idempotency_key: "bob-leaves".into(),
    };
    let removed = admin
        .remove_member(remove.clone())
        .await
        .expect("remove bob")
        .into_inner();
    let sorted = |mut ids: Vec<String>| {
        ids.sort();
        ids
    };
    assert_eq!(
        removed.revoked_key_ids,
        sorted(vec![bob_wide.key_id.clone(), bob_for_alice.key_id.clone()])
    );
    let demoted = admin
        .add_member(pb::AddMemberRequest {
            org_id: "acme".into(),
            member_id: "dave".into(),
            role: "member".into(),
            actor_id: "olivia".into(),
            idempotency_key: "dave-demoted".into(),
        })
        .await
        .expect("demote dave")
        .into_inner();
    assert_eq!(
        demoted.revoked_key_ids,
        sorted(vec![
            dave_wide.key_id.clone(),
            dave_for_alice.key_id.clone()
        ])
    );
    let refused = |r: common::gateways::HttpResponse| {
        assert_eq!(r.status, 403, "{r:?}");
        assert_eq!(r.json()["error"], "revoked_api_key", "{r:?}");
    };
    // The org balance is out of reach of both (bob's key would have spent 500 of it), and
    // so is alice's allocation (bob's key for her would have spent it all).
    let made_by_them = [&bob_wide, &bob_for_alice, &dave_wide, &dave_for_alice];
    for key in made_by_them {
        refused(send_envelope(&server, &key.api_key).await);
    }
    assert_eq!(
        send_envelope(&server, &olivia_wide.api_key).await.status,
        200
    );
    let r = send_envelope(&server, &olivia_for_alice.api_key).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-tollgate-member"), Some("alice"));
    // A retry of the removal (its answer lost) answers the same, keys included.
    let again = admin
        .remove_member(remove.clone())
        .await
        .expect("retry")
        .into_inner();
    assert!(again.replayed);
    assert_eq!(again.revoked_key_ids, removed.revoked_key_ids);
    refused(send_envelope(&server, &bob_wide.api_key).await);

    let before = acme_keys(&server).await;
    let revoked: Vec<&str> = before
        .iter()
        .filter(|k| k.revoked_at_ms > 0)
        .map(|k| k.key_id.as_str())
        .collect();
    let mut expected: Vec<&str> = made_by_them.iter().map(|k| k.key_id.as_str()).collect();
    expected.sort();
    assert_eq!(revoked, expected, "{before:?}");
    // Every key names its maker.
    for (key, maker) in [
        (&bob_wide, "bob"),
        (&bob_for_alice, "bob"),
        (&dave_wide, "dave"),
        (&dave_for_alice, "dave"),
        (&olivia_wide, "olivia"),
        (&olivia_for_alice, "olivia"),
    ] {
        let listed = before
            .iter()
            .find(|k| k.key_id == key.key_id)
            .expect("listed");
        assert_eq!(listed.created_by, maker, "{listed:?}");
    }

    // The store has the revocations. Two of them are taken out again (saves that never
    // landed): the restore must not bring dave's keys back to life.
    let store = tollgate::settle::Store::connect_lazy(&pg.url, 1).expect("store");
    let stored = store.api_keys().await.expect("keys");
    for id in &expected {
        let k = stored.iter().find(|k| &k.key_id == id).expect("stored");
        assert!(k.revoked_at_ms > 0, "{k:?}");
        assert!(!k.digest.is_empty() && !k.name.is_empty(), "{k:?}");
    }
    for (key, maker, member) in [(&bob_wide, "bob", ""), (&bob_for_alice, "bob", "alice")] {
        let k = stored
            .iter()
            .find(|k| k.key_id == key.key_id)
            .expect("stored");
        assert_eq!(
            (k.created_by.as_str(), k.member_id.as_str()),
            (maker, member)
        );
    }
    let pool = sqlx::PgPool::connect(&pg.url).await.expect("postgres");
    for key in [&dave_wide, &dave_for_alice] {
        sqlx::query("UPDATE tollgate_api_keys SET revoked_at_ms = 0 WHERE key_id = $1")
            .bind(&key.key_id)
            .execute(&pool)
            .await
            .expect("update");
    }
    pool.close().await;

    let clean = tokio::task::spawn_blocking(reconcile_job(redis.url(), pg.url.clone()))
        .await
        .expect("join");
    assert!(clean.status.success(), "{clean:?}");
    server.stop().await;
    redis.restart();
    let restored = tool(&["restore", "--redis-url", &redis.url(), "--store", &pg.url]);
    assert!(restored.status.success(), "{restored:?}");
    let server = common::TestServer::start(config(&redis), Clock::Redis).await;
    assert_eq!(acme_keys(&server).await, before, "the keys as they were");
    for key in made_by_them {
        refused(send_envelope(&server, &key.api_key).await);
    }
    assert_eq!(
        send_envelope(&server, &olivia_wide.api_key).await.status,
        200
    );
    assert_eq!(
        send_envelope(&server, &olivia_for_alice.api_key)
            .await
            .status,
        200
    );
    let stored = store.api_keys().await.expect("keys");
    for key in [&dave_wide, &dave_for_alice] {
        let dave = stored
            .iter()
            .find(|k| k.key_id == key.key_id)
            .expect("stored");
        assert!(
            dave.revoked_at_ms > 0,
            "the restore saved the revocation: {dave:?}"
        );
    }
    server.stop().await;
}

/// An admin cannot act on an owner: no allocation of an owner's (setting it to 0 would
/// freeze them) and no key bound to an owner, as AddMember refuses an admin touching an
/// owner. The refusal names `actor_id` and changes nothing; an owner may do both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_cannot_act_on_an_owner_through_allocations_or_keys() {
    let redis = common::RedisServer::start();
    let server = common::TestServer::start(esign_config(&redis.url()), Clock::Redis).await;
    acme_with_admins(&server).await;
    let mut admin = server.admin().await;
    admin
        .add_member(pb::AddMemberRequest {
            org_id: "acme".into(),
            member_id: "owen".into(),
            role: "owner".into(),
            actor_id: "olivia".into(),
            idempotency_key: "add-owen".into(),
        })
        .await
        .expect("a second owner");
    let set = |actor: &str, member: &str, amount: i64, key: &str| pb::SetAllocationRequest {
        org_id: "acme".into(),
        member_id: member.into(),
        amount,
        actor_id: actor.into(),
        idempotency_key: key.into(),
        ..Default::default()
    };
    let add = |actor: &str, member: &str, key: &str| pb::AddAllocationRequest {
        org_id: "acme".into(),
        member_id: member.into(),
        delta: 5,
        actor_id: actor.into(),
        idempotency_key: key.into(),
        ..Default::default()
    };
    let key = |actor: &str, member: &str| pb::CreateApiKeyRequest {
        org_id: "acme".into(),
        member_id: member.into(),
        actor_id: actor.into(),
        name: "for an owner".into(),
        ..Default::default()
    };
    let keys_before = key_count(&server, "acme").await;
    for owner in ["olivia", "owen"] {
        for refused in [
            admin
                .set_allocation(set("bob", owner, 0, &format!("freeze-{owner}")))
                .await,
            admin
                .add_allocation(add("bob", owner, &format!("bump-{owner}")))
                .await,
        ] {
            let refused = refused.expect_err("an admin on an owner");
            assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
            assert_eq!(bad_fields(&refused), ["actor_id"], "{refused:?}");
        }
        let refused = admin
            .create_api_key(key("bob", owner))
            .await
            .expect_err("an admin's key bound to an owner");
        assert_eq!(bad_fields(&refused), ["actor_id"], "{refused:?}");
        // Nothing changed: the owner has no allocation (unbounded) and no key.
        let v = view(&server, owner, "").await;
        assert!(v.allocations.iter().all(|a| !a.bounded), "{v:?}");
    }
    assert_eq!(key_count(&server, "acme").await, keys_before);
    // The owner spends, unfrozen.
    let mut metering = server.metering().await;
    metering
        .debit(pb::DebitRequest {
            account_id: "acme".into(),
            member_id: "olivia".into(),
            amount: 50,
            idempotency_key: "olivia-50".into(),
            ..Default::default()
        })
        .await
        .expect("the owner is not frozen");
    // An admin still acts on members and admins; an owner on owners.
    admin
        .set_allocation(set("bob", "alice", 30, "bob-alice"))
        .await
        .expect("an admin on a member");
    admin
        .set_allocation(set("bob", "dave", 30, "bob-dave"))
        .await
        .expect("an admin on an admin");
    admin
        .set_allocation(set("olivia", "owen", 30, "olivia-owen"))
        .await
        .expect("an owner on an owner");
    admin
        .add_allocation(add("owen", "olivia", "owen-olivia"))
        .await
        .expect("an owner on an owner");
    admin
        .create_api_key(key("olivia", "owen"))
        .await
        .expect("an owner's key for an owner");
    admin
        .create_api_key(key("bob", "alice"))
        .await
        .expect("an admin's key for a member");
}

/// GetBalance by key id refuses a revoked key (FAILED_PRECONDITION, reason KEY_REVOKED, as
/// the gateway refuses it with 403 `revoked_api_key`), a personal one and an org one alike;
/// an unknown key id stays NOT_FOUND.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_balance_by_a_revoked_key_id_is_refused() {
    let redis = common::RedisServer::start();
    let server = common::TestServer::start(esign_config(&redis.url()), Clock::Redis).await;
    acme_with_admins(&server).await;
    let personal = common::gateways::seed(&server, "pat", 10).await;
    let personal_id = personal.split('_').nth(1).expect("key id").to_owned();
    let org = org_key(&server, "olivia", "alice").await;
    let mut admin = server.admin().await;
    let mut metering = server.metering().await;
    for key_id in [&personal_id, &org.key_id] {
        metering
            .get_balance(pb::GetBalanceRequest {
                key_id: key_id.clone(),
                ..Default::default()
            })
            .await
            .expect("a live key's balance");
        let revoked = admin
            .revoke_api_key(pb::RevokeApiKeyRequest {
                key_id: key_id.clone(),
            })
            .await
            .expect("revoke")
            .into_inner();
        let refused = metering
            .get_balance(pb::GetBalanceRequest {
                key_id: key_id.clone(),
                ..Default::default()
            })
            .await
            .expect_err("a revoked key");
        assert_eq!(
            refused.code(),
            tonic::Code::FailedPrecondition,
            "{refused:?}"
        );
        assert_eq!(reason(&refused), "KEY_REVOKED", "{refused:?}");
        let info = refused.get_details_error_info().expect("error info");
        assert_eq!(
            info.metadata.get("revoked_at_ms"),
            Some(&revoked.revoked_at_ms.to_string()),
            "{refused:?}"
        );
    }
    let unknown = metering
        .get_balance(pb::GetBalanceRequest {
            key_id: "k0-0123456789abcdef".into(),
            ..Default::default()
        })
        .await
        .expect_err("an unknown key");
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
}

/// A removed member's own keys (bound to them) are revoked by the removal: refused on a
/// priced route before too (`not_a_member`), they still authenticated on a zero-priced
/// one, telling the upstream the caller was a member who no longer is one, and came back
/// to life when the member was added again. Now the gateway refuses them as revoked on
/// every route, the store keeps the revocation (a restore keeps them revoked, even when
/// the save never landed), and a re-added member gets new keys, not the old ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_members_own_keys_are_revoked_on_every_route_and_stay_so() {
    let mut redis = common::RedisServer::start();
    let pg = common::PgDatabase::create().await;
    // envelope.send without a signature method costs its base: 0 here.
    let book = common::gateways::replace(
        &common::gateways::example("pricebook-esign.toml"),
        "base = 1\n",
        "base = 0\n",
    );
    let config = |redis: &common::RedisServer| {
        let mut config = common::gateways::esign_config_from(&redis.url(), &book);
        config.store.url = pg.url.clone();
        config.settler.enabled = true;
        config
    };
    let server = common::TestServer::start(config(&redis), Clock::Redis).await;
    acme_with_admins(&server).await;
    let free = |server: &common::TestServer, key: String| {
        let addr = server.http_addr;
        async move {
            http(
                addr,
                "GET",
                "/v1/forward-auth",
                &[
                    ("x-forwarded-method", "POST"),
                    ("x-forwarded-uri", "/v1/envelopes"),
                    ("x-forwarded-host", "api.example.com"),
                    ("x-api-key", &key),
                ],
                "",
            )
            .await
        }
    };
    let alice_own = org_key(&server, "olivia", "alice").await;
    let bob_for_alice = org_key(&server, "bob", "alice").await;
    let olivia_for_bob = org_key(&server, "olivia", "bob").await;
    for key in [&alice_own, &bob_for_alice] {
        let r = free(&server, key.api_key.clone()).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("x-tollgate-member"), Some("alice"), "{r:?}");
        let r = send_envelope(&server, &key.api_key).await;
        assert_eq!(r.status, 200, "{r:?}");
    }

    let mut admin = server.admin().await;
    let removed = admin
        .remove_member(pb::RemoveMemberRequest {
            org_id: "acme".into(),
            member_id: "alice".into(),
            actor_id: "olivia".into(),
            idempotency_key: "alice-leaves".into(),
        })
        .await
        .expect("remove alice")
        .into_inner();
    let mut alices = vec![alice_own.key_id.clone(), bob_for_alice.key_id.clone()];
    alices.sort();
    assert_eq!(removed.revoked_key_ids, alices);
    let refused = |r: common::gateways::HttpResponse| {
        assert_eq!(r.status, 403, "{r:?}");
        assert_eq!(r.json()["error"], "revoked_api_key", "{r:?}");
    };
    for key in [&alice_own, &bob_for_alice] {
        refused(free(&server, key.api_key.clone()).await);
        refused(send_envelope(&server, &key.api_key).await);
    }
    // Another member's key, made by the same owner, is untouched.
    let r = free(&server, olivia_for_bob.api_key.clone()).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-tollgate-member"), Some("bob"), "{r:?}");

    // Re-added, alice does not get her old keys back.
    admin
        .add_member(pb::AddMemberRequest {
            org_id: "acme".into(),
            member_id: "alice".into(),
            role: "member".into(),
            actor_id: "olivia".into(),
            idempotency_key: "alice-back".into(),
        })
        .await
        .expect("re-add alice");
    for key in [&alice_own, &bob_for_alice] {
        refused(free(&server, key.api_key.clone()).await);
    }
    let alice_new = org_key(&server, "olivia", "alice").await;
    assert_eq!(free(&server, alice_new.api_key.clone()).await.status, 200);

    // The store has the revocations; one is taken out again (a save that never landed):
    // the restore revokes it again, and leaves the key made since the re-add live.
    let store = tollgate::settle::Store::connect_lazy(&pg.url, 1).expect("store");
    let stored = store.api_keys().await.expect("keys");
    for id in &alices {
        let k = stored.iter().find(|k| &k.key_id == id).expect("stored");
        assert!(k.revoked_at_ms > 0, "{k:?}");
        assert_eq!(k.member_id, "alice", "{k:?}");
    }
    let pool = sqlx::PgPool::connect(&pg.url).await.expect("postgres");
    sqlx::query("UPDATE tollgate_api_keys SET revoked_at_ms = 0 WHERE key_id = $1")
        .bind(&alice_own.key_id)
        .execute(&pool)
        .await
        .expect("update");
    pool.close().await;
    let before = acme_keys(&server).await;
    let clean = tokio::task::spawn_blocking(reconcile_job(redis.url(), pg.url.clone()))
        .await
        .expect("join");
    assert!(clean.status.success(), "{clean:?}");
    server.stop().await;
    redis.restart();
    let restored = tool(&["restore", "--redis-url", &redis.url(), "--store", &pg.url]);
    assert!(restored.status.success(), "{restored:?}");
    let server = common::TestServer::start(config(&redis), Clock::Redis).await;
    assert_eq!(acme_keys(&server).await, before, "the keys as they were");
    for key in [&alice_own, &bob_for_alice] {
        refused(free(&server, key.api_key.clone()).await);
    }
    assert_eq!(free(&server, alice_new.api_key.clone()).await.status, 200);
    let stored = store.api_keys().await.expect("keys");
    let k = stored
        .iter()
        .find(|k| k.key_id == alice_own.key_id)
        .expect("stored");
    assert!(
        k.revoked_at_ms > 0,
        "the restore saved the revocation: {k:?}"
    );
    // The restore put each id in the live or the revoked index, as the scripts keep them
    // (the keys-per-account cap counts the live one).
    let tag = server
        .ledger
        .shards()
        .tag(server.ledger.shards().of_account("acme"))
        .to_owned();
    let mut con = redis.client().get_connection().expect("redis");
    let sorted = |mut ids: Vec<String>| {
        ids.sort();
        ids
    };
    let live: Vec<String> = redis::cmd("HKEYS")
        .arg(format!("{tag}:ks:acme"))
        .query(&mut con)
        .expect("live index");
    assert_eq!(
        sorted(live),
        sorted(vec![
            olivia_for_bob.key_id.clone(),
            alice_new.key_id.clone()
        ])
    );
    let revoked: Vec<String> = redis::cmd("ZRANGE")
        .arg(format!("{tag}:kr:acme"))
        .arg(0)
        .arg(-1)
        .query(&mut con)
        .expect("revoked index");
    assert_eq!(sorted(revoked), alices);
    server.stop().await;
}

/// The keys-per-account cap counts live keys: a revoked key's id leaves the live index
/// for the revoked one, so creating and revoking keys never locks an account (or an org,
/// whose members share its cap) out of making keys. ListApiKeys still shows the revoked
/// keys, the most recent ones up to the cap. Keys revoked before the revoked index existed
/// (their ids still in the live index) are moved out by a create that finds the index at
/// the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_cap_counts_live_keys_only() {
    const CAP: usize = 3;
    let redis = common::RedisServer::start();
    let mut config = esign_config(&redis.url());
    config.gateway.keys_per_account_max = CAP as u32;
    let server = common::TestServer::start(config, Clock::Redis).await;
    let mut admin = server.admin().await;
    let personal = |name: String| pb::CreateApiKeyRequest {
        account_id: "initech".into(),
        name,
        ..Default::default()
    };
    let mut live = Vec::new();
    for i in 0..CAP {
        live.push(
            admin
                .create_api_key(personal(format!("live-{i}")))
                .await
                .expect("under the cap")
                .into_inner(),
        );
    }
    let over = admin
        .create_api_key(personal("over".into()))
        .await
        .expect_err("at the cap");
    assert_eq!(reason(&over), "KEY_LIMIT", "{over:?}");
    // Many more rounds of create + revoke than the cap: each finds a free place.
    let slot = live.pop().expect("a key");
    admin
        .revoke_api_key(pb::RevokeApiKeyRequest {
            key_id: slot.key_id.clone(),
        })
        .await
        .expect("revoke");
    let mut revoked = vec![slot.key_id];
    for i in 0..(3 * CAP) {
        let key = admin
            .create_api_key(personal(format!("round-{i}")))
            .await
            .unwrap_or_else(|s| panic!("round {i}: {s:?}"))
            .into_inner();
        admin
            .revoke_api_key(pb::RevokeApiKeyRequest {
                key_id: key.key_id.clone(),
            })
            .await
            .expect("revoke");
        revoked.push(key.key_id);
    }
    // The live keys and the CAP most recently revoked ones are listed.
    let list = || async {
        server
            .admin()
            .await
            .list_api_keys(pb::ListApiKeysRequest {
                account_id: "initech".into(),
            })
            .await
            .expect("list")
            .into_inner()
            .keys
    };
    let keys = list().await;
    let mut listed_live: Vec<&str> = keys
        .iter()
        .filter(|k| k.revoked_at_ms == 0)
        .map(|k| k.key_id.as_str())
        .collect();
    listed_live.sort();
    let mut expected_live: Vec<&str> = live.iter().map(|k| k.key_id.as_str()).collect();
    expected_live.sort();
    assert_eq!(listed_live, expected_live, "{keys:?}");
    let mut listed_revoked: Vec<&str> = keys
        .iter()
        .filter(|k| k.revoked_at_ms > 0)
        .map(|k| k.key_id.as_str())
        .collect();
    listed_revoked.sort();
    assert_eq!(listed_revoked.len(), CAP, "{keys:?}");
    for id in &listed_revoked {
        assert!(revoked.contains(&id.to_string()), "{id} {keys:?}");
    }
    // Still one free place.
    let fresh = admin
        .create_api_key(personal("fresh".into()))
        .await
        .expect("a free place")
        .into_inner();
    admin
        .create_api_key(personal("over".into()))
        .await
        .expect_err("at the cap again");

    // A key revoked before the revoked index existed: its id back in the live index.
    let shard = server.ledger.shards().of_account("initech");
    let tag = server.ledger.shards().tag(shard).to_owned();
    {
        let mut con = redis.client().get_connection().expect("redis");
        let _: () = redis::cmd("HSET")
            .arg(format!("{tag}:ks:initech"))
            .arg(&fresh.key_id)
            .arg(fresh.created_at_ms)
            .query(&mut con)
            .expect("hset");
        let _: () = redis::cmd("HSET")
            .arg(format!("{tag}:k:{}", fresh.key_id))
            .arg("r")
            .arg(fresh.created_at_ms + 1)
            .query(&mut con)
            .expect("hset");
    }
    let made = admin
        .create_api_key(personal("after the old revocation".into()))
        .await
        .expect("the old revoked key does not count")
        .into_inner();
    let keys = list().await;
    let listed = |id: &str| keys.iter().find(|k| k.key_id == id).cloned();
    assert!(listed(&made.key_id).is_some_and(|k| k.revoked_at_ms == 0));
    assert!(
        listed(&fresh.key_id).is_some_and(|k| k.revoked_at_ms == fresh.created_at_ms + 1),
        "{keys:?}"
    );

    // An org's members share its cap; a member's removal frees the places of their keys.
    common::org_with_members(&server, "globex", "olivia", 100, &[("alice", "member")]).await;
    let org_key = |member: &str| pb::CreateApiKeyRequest {
        org_id: "globex".into(),
        member_id: member.into(),
        actor_id: "olivia".into(),
        name: format!("for {member}"),
        ..Default::default()
    };
    for _ in 0..CAP {
        admin
            .create_api_key(org_key("alice"))
            .await
            .expect("under the cap");
    }
    let over = admin
        .create_api_key(org_key("olivia"))
        .await
        .expect_err("at the cap");
    assert_eq!(reason(&over), "KEY_LIMIT", "{over:?}");
    admin
        .remove_member(pb::RemoveMemberRequest {
            org_id: "globex".into(),
            member_id: "alice".into(),
            actor_id: "olivia".into(),
            idempotency_key: "alice-leaves".into(),
        })
        .await
        .expect("remove alice");
    admin
        .create_api_key(org_key("olivia"))
        .await
        .expect("alice's places are free");
    server.stop().await;
}

/// The wallet cap counts live org wallets: an allocation or a member budget keeps a wallet
/// without credits in the set, and a wallet whose allocation left with its member (only
/// what the member used stays) is dead, leaves the full set for a new wallet, and comes
/// back within the cap, not past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocations_and_budgets_keep_an_org_wallet_in_a_full_wallet_set() {
    use tollgate::ledger::org::{AllocationChange, BudgetPeriod, SetBudget};
    use tollgate::ledger::{LedgerError, Refusal};
    let (_redis, ledger) = capped_org().await;
    let allocate = |wallet: &'static str, amount: i64, key: &'static str| {
        let ledger = ledger.clone();
        async move {
            ledger
                .allocate(
                    "acme",
                    "olivia",
                    "carol",
                    wallet,
                    AllocationChange::Set(amount),
                    key,
                )
                .await
        }
    };
    let budget = |wallet: &'static str, limit: i64, key: &'static str| {
        let ledger = ledger.clone();
        async move {
            ledger
                .set_budget(&SetBudget {
                    account_id: "acme".into(),
                    member_id: "carol".into(),
                    wallet: wallet.into(),
                    limit,
                    period: BudgetPeriod::Day,
                    utc_offset_minutes: 0,
                    idempotency_key: key.into(),
                })
                .await
        }
    };
    let names = || {
        let ledger = ledger.clone();
        async move {
            ledger
                .balance("acme", "")
                .await
                .expect("balance")
                .into_iter()
                .map(|w| w.wallet)
                .collect::<Vec<_>>()
        }
    };
    let refused = |r: Result<_, LedgerError>, what: &str| match r {
        Err(LedgerError::Refused(Refusal::WalletLimit { max: 2 })) => {}
        other => panic!("{what}: {other:?}"),
    };
    allocate("esign", 70, "a1").await.expect("esign");
    ledger
        .grant(&tollgate::ledger::Grant {
            wallet: "esign".into(),
            ..common::purchase("acme", 50, "g-esign")
        })
        .await
        .expect("esign credits");
    ledger
        .debit(&tollgate::ledger::Debit {
            wallet: "esign".into(),
            ..carol_debit(50, "d-esign")
        })
        .await
        .expect("carol spends esign");
    // esign has no credits left, but carol's allocation of it.
    refused(
        allocate("third", 5, "a2").await,
        "an allocated wallet is live",
    );
    assert_eq!(names().await, ["default", "esign"]);

    // Carol leaves: her allocation goes, what she used stays. esign is dead.
    ledger
        .remove_member("acme", "olivia", "carol", "leave")
        .await
        .expect("carol leaves");
    ledger
        .add_member("acme", "olivia", "carol", "member", "back")
        .await
        .expect("carol is back");
    budget("mb", 80, "b1")
        .await
        .expect("a member budget on a new wallet");
    assert_eq!(names().await, ["default", "mb"]);
    // esign comes back within the cap, not past it: mb has carol's budget.
    refused(
        allocate("esign", 10, "a3").await,
        "a wallet budgeted for a member is live",
    );
    let esign = ledger.balance("acme", "esign").await.expect("by name");
    assert_eq!(
        (esign[0].granted, esign[0].used, esign[0].available),
        (50, 50, 0)
    );
    budget("mb", 0, "b2").await.expect("budget removed");
    let back = allocate("esign", 10, "a4").await.expect("mb is dead now");
    assert_eq!((back.allocated, back.used), (10, 50));
    assert_eq!(names().await, ["default", "esign"]);
}

/// Revoked keys are dropped from Redis `gateway.revoked_key_retention_secs` after their
/// revocation, by the account's next key creation or revocation (a RevokeApiKey, a
/// member's removal, a CreateApiKey), at most 32 per call: their records and their
/// entries in the account's revoked index go, while keys revoked within the retention
/// stay and still answer revoked. A dropped key answers as unknown. Times come from the
/// ledger's manual clock, which the key scripts follow as lua/org.lua does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_revoked_longer_ago_than_the_retention_are_dropped_by_the_accounts_next_key_change() {
    const RETENTION_MS: i64 = 2 * DAY_MS;
    let redis = common::RedisServer::start();
    let (clock, now) = Clock::manual(START_MS);
    let mut config = esign_config(&redis.url());
    config.gateway.revoked_key_retention_secs = (RETENTION_MS / 1000) as u64;
    // Every check asks Redis: the sidecar that revoked a key caches it as revoked.
    config.gateway.identity_cache_ttl_ms = 1;
    let server = common::TestServer::start(config, clock).await;
    let mut admin = server.admin().await;
    let mut con = redis.client().get_connection().expect("redis");
    let shards = server.ledger.shards().clone();
    let tag = |account: &str| shards.tag(shards.of_account(account)).to_owned();
    // (whether the key's record exists, its score in its account's revoked index).
    let mut stored = |account: &str, key_id: &str| -> (bool, Option<i64>) {
        let tag = tag(account);
        let exists: bool = redis::cmd("EXISTS")
            .arg(format!("{tag}:k:{key_id}"))
            .query(&mut con)
            .expect("exists");
        let score: Option<i64> = redis::cmd("ZSCORE")
            .arg(format!("{tag}:kr:{account}"))
            .arg(key_id)
            .query(&mut con)
            .expect("zscore");
        (exists, score)
    };
    let personal = |name: &str| pb::CreateApiKeyRequest {
        account_id: "carol".into(),
        name: name.into(),
        ..Default::default()
    };
    let revoke = |key_id: &str| pb::RevokeApiKeyRequest {
        key_id: key_id.into(),
    };
    let by_key_id = |key_id: &str| pb::GetBalanceRequest {
        key_id: key_id.into(),
        ..Default::default()
    };
    let mut metering = server.metering().await;

    // carol revokes 40 keys at START_MS, one more a day later; 2 stay live.
    let mut old = Vec::new();
    for i in 0..40 {
        let k = admin
            .create_api_key(personal(&format!("old {i}")))
            .await
            .expect("create")
            .into_inner();
        admin
            .revoke_api_key(revoke(&k.key_id))
            .await
            .expect("revoke");
        old.push(k);
    }
    now.store(START_MS + DAY_MS, std::sync::atomic::Ordering::SeqCst);
    let day_one = admin
        .create_api_key(personal("day one"))
        .await
        .expect("create")
        .into_inner();
    let revoked = admin
        .revoke_api_key(revoke(&day_one.key_id))
        .await
        .expect("revoke")
        .into_inner();
    assert_eq!(
        revoked.revoked_at_ms,
        START_MS + DAY_MS,
        "the ledger's clock"
    );
    let mut live = Vec::new();
    for name in ["live a", "live b"] {
        let k = admin.create_api_key(personal(name)).await.expect("create");
        live.push(k.into_inner());
    }
    for k in &old {
        assert_eq!(stored("carol", &k.key_id), (true, Some(START_MS)), "{k:?}");
    }

    // Past the retention of the first 40, nothing drops them until carol's keys change.
    now.store(
        START_MS + RETENTION_MS + 1,
        std::sync::atomic::Ordering::SeqCst,
    );
    assert!(stored("carol", &old[0].key_id).0);
    let third = admin
        .create_api_key(personal("third"))
        .await
        .expect("create")
        .into_inner();
    let kept = admin
        .revoke_api_key(revoke(&third.key_id))
        .await
        .expect("revoke")
        .into_inner();
    assert_eq!(kept.revoked_at_ms, START_MS + RETENTION_MS + 1);
    // The creation dropped 32 of the 40, oldest (by revocation, then id) first; the
    // revocation the other 8.
    for k in &old {
        assert_eq!(stored("carol", &k.key_id), (false, None), "{k:?}");
    }
    for k in [&day_one, &third] {
        assert!(stored("carol", &k.key_id).0, "{k:?}");
    }
    // A dropped key answers as unknown; one revoked within the retention still as revoked.
    let gone = metering
        .get_balance(by_key_id(&old[0].key_id))
        .await
        .expect_err("dropped");
    assert_eq!(gone.code(), tonic::Code::NotFound, "{gone:?}");
    for k in [&day_one, &third] {
        let refused = metering
            .get_balance(by_key_id(&k.key_id))
            .await
            .expect_err("revoked");
        assert_eq!(reason(&refused), "KEY_REVOKED", "{refused:?}");
    }
    let r = send_envelope(&server, &old[1].api_key).await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (401, Some("unknown_api_key"))
    );
    let r = send_envelope(&server, &day_one.api_key).await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (403, Some("revoked_api_key"))
    );
    // A repeat of a dropped key's revocation finds no key.
    let again = admin
        .revoke_api_key(revoke(&old[2].key_id))
        .await
        .expect_err("dropped");
    assert_eq!(again.code(), tonic::Code::NotFound, "{again:?}");
    let mut listed: Vec<(String, i64)> = admin
        .list_api_keys(pb::ListApiKeysRequest {
            account_id: "carol".into(),
        })
        .await
        .expect("list")
        .into_inner()
        .keys
        .into_iter()
        .map(|k| (k.key_id, k.revoked_at_ms))
        .collect();
    listed.sort();
    let mut expected = vec![
        (day_one.key_id.clone(), START_MS + DAY_MS),
        (third.key_id.clone(), START_MS + RETENTION_MS + 1),
        (live[0].key_id.clone(), 0),
        (live[1].key_id.clone(), 0),
    ];
    expected.sort();
    assert_eq!(listed, expected);

    // An org: a member's removal (lua/org.lua) revokes the keys they made and drops those
    // revoked longer ago than the retention, whoever revoked them; a creation too.
    common::org_with_members(
        &server,
        "acme",
        "olivia",
        1_000,
        &[("bob", "admin"), ("dave", "admin")],
    )
    .await;
    let remove = |member: &str| pb::RemoveMemberRequest {
        org_id: "acme".into(),
        member_id: member.into(),
        actor_id: "olivia".into(),
        idempotency_key: format!("{member}-leaves"),
    };
    let (bob, dave, olivia) = (
        org_key(&server, "bob", "").await,
        org_key(&server, "dave", "").await,
        org_key(&server, "olivia", "").await,
    );
    let t0 = START_MS + 10 * DAY_MS;
    now.store(t0, std::sync::atomic::Ordering::SeqCst);
    admin
        .remove_member(remove("dave"))
        .await
        .expect("remove dave");
    assert_eq!(stored("acme", &dave.key_id), (true, Some(t0)));
    now.store(t0 + DAY_MS, std::sync::atomic::Ordering::SeqCst);
    admin
        .revoke_api_key(revoke(&olivia.key_id))
        .await
        .expect("revoke");
    now.store(t0 + RETENTION_MS + 1, std::sync::atomic::Ordering::SeqCst);
    let removed = admin
        .remove_member(remove("bob"))
        .await
        .expect("remove bob")
        .into_inner();
    assert_eq!(removed.revoked_key_ids, std::slice::from_ref(&bob.key_id));
    assert_eq!(stored("acme", &dave.key_id), (false, None));
    assert_eq!(stored("acme", &olivia.key_id), (true, Some(t0 + DAY_MS)));
    assert_eq!(
        stored("acme", &bob.key_id),
        (true, Some(t0 + RETENTION_MS + 1))
    );
    now.store(
        t0 + DAY_MS + RETENTION_MS + 1,
        std::sync::atomic::Ordering::SeqCst,
    );
    let made = org_key(&server, "olivia", "").await;
    assert_eq!(stored("acme", &olivia.key_id), (false, None));
    assert_eq!(
        stored("acme", &bob.key_id),
        (true, Some(t0 + RETENTION_MS + 1))
    );
    assert_eq!(stored("acme", &made.key_id), (true, None));
    let refused = metering
        .get_balance(by_key_id(&bob.key_id))
        .await
        .expect_err("revoked");
    assert_eq!(reason(&refused), "KEY_REVOKED", "{refused:?}");
}

/// Every page of ListMembers, following the tokens: (member id, role) pairs in order, and
/// the size of each page.
async fn all_member_pages(
    server: &common::TestServer,
    org: &str,
    page_size: i32,
) -> (Vec<(String, String)>, Vec<usize>) {
    let mut admin = server.admin().await;
    let (mut members, mut sizes) = (Vec::new(), Vec::new());
    let mut token = String::new();
    loop {
        let page = admin
            .list_members(pb::ListMembersRequest {
                org_id: org.into(),
                page_size,
                page_token: token,
            })
            .await
            .expect("members page")
            .into_inner();
        sizes.push(page.members.len());
        members.extend(page.members.into_iter().map(|m| (m.member_id, m.role)));
        if page.next_page_token.is_empty() {
            return (members, sizes);
        }
        token = page.next_page_token;
    }
}

/// An org has at most `ledger.members_per_org_max` members: AddMember of a new member at
/// the cap is refused MEMBER_LIMIT naming the cap, and changes nothing (no event, the
/// same members; a retry with the same key gets the same answer). A role change at the
/// cap is no new member and goes through; a removal makes room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_member_past_the_cap_is_refused_naming_it_and_changes_nothing() {
    let redis = common::RedisServer::start();
    let mut config = common::test_config(&redis.url());
    config.ledger.members_per_org_max = 3;
    let server = common::TestServer::start(config, Clock::Redis).await;
    common::org_with_members(
        &server,
        "acme",
        "olivia",
        1_000,
        &[("alice", "member"), ("bob", "member")],
    )
    .await;
    let mut admin = server.admin().await;
    let add = |member: &str, role: &str, key: &str| pb::AddMemberRequest {
        org_id: "acme".into(),
        member_id: member.into(),
        role: role.into(),
        actor_id: "olivia".into(),
        idempotency_key: key.into(),
    };
    let outbox = common::outbox_len(&server.ledger).await;
    let before = all_member_pages(&server, "acme", 0).await.0;
    assert_eq!(before.len(), 3);
    for attempt in ["first", "retry with the same key"] {
        let refused = admin
            .add_member(add("carol", "member", "add-carol"))
            .await
            .expect_err(attempt);
        assert_eq!(
            refused.code(),
            tonic::Code::FailedPrecondition,
            "{refused:?}"
        );
        let info = refused.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "MEMBER_LIMIT", "{attempt}");
        assert_eq!(info.metadata.get("max").map(String::as_str), Some("3"));
        assert_eq!(
            common::outbox_len(&server.ledger).await,
            outbox,
            "{attempt}"
        );
        assert_eq!(all_member_pages(&server, "acme", 0).await.0, before);
    }
    // Not a new member: a role change at the cap is made.
    let promoted = admin
        .add_member(add("alice", "admin", "promote-alice"))
        .await
        .expect("a role change at the cap")
        .into_inner();
    assert_eq!(promoted.role, "admin");
    // A removal makes room for one.
    admin
        .remove_member(pb::RemoveMemberRequest {
            org_id: "acme".into(),
            member_id: "bob".into(),
            actor_id: "olivia".into(),
            idempotency_key: "remove-bob".into(),
        })
        .await
        .expect("remove bob");
    admin
        .add_member(add("carol", "member", "add-carol-again"))
        .await
        .expect("room made");
    let names = |members: Vec<(String, String)>| -> Vec<String> {
        members.into_iter().map(|(id, _)| id).collect()
    };
    assert_eq!(
        names(all_member_pages(&server, "acme", 0).await.0),
        ["alice", "carol", "olivia"]
    );
    server.stop().await;
}

/// ListMembers pages by member id: the pages, each at most `page_size`, concatenate to
/// every member in id order; a member removed between two pages shifts no other; a token
/// is bound to its org (another org's is INVALID_ARGUMENT naming page_token, as is a
/// token this API never returned), and a page size out of range names page_size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_pages_concatenate_to_every_member_and_tokens_are_bound_to_their_org() {
    let redis = common::RedisServer::start();
    let server = common::TestServer::start(common::test_config(&redis.url()), Clock::Redis).await;
    let ids = [
        "zoe",
        "m-07",
        "alice",
        "Bob",
        "carol",
        "m-10",
        "dave@x.io",
        "erin",
        "m-01",
    ];
    let members: Vec<(&str, &str)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (*id, if i % 3 == 0 { "admin" } else { "member" }))
        .collect();
    common::org_with_members(&server, "acme", "olivia", 1_000, &members).await;
    common::org_with_members(&server, "globex", "gina", 1_000, &[("hank", "member")]).await;
    let mut expected: Vec<(String, String)> = members
        .iter()
        .map(|(id, role)| (id.to_string(), role.to_string()))
        .chain(std::iter::once(("olivia".into(), "owner".into())))
        .collect();
    expected.sort();
    let (listed, sizes) = all_member_pages(&server, "acme", 4).await;
    assert_eq!(listed, expected);
    assert_eq!(sizes, [4, 4, 2]);
    // One page holds them all with the default size.
    assert_eq!(
        all_member_pages(&server, "acme", 0).await,
        (expected.clone(), vec![10])
    );

    let mut admin = server.admin().await;
    let page = |org: &str, page_size: i32, page_token: &str| pb::ListMembersRequest {
        org_id: org.into(),
        page_size,
        page_token: page_token.into(),
    };
    let first = admin
        .list_members(page("acme", 3, ""))
        .await
        .expect("first page")
        .into_inner();
    assert_eq!(first.members.len(), 3);
    // The last member listed leaves: the next page starts after it all the same.
    let last = first.members[2].member_id.clone();
    admin
        .remove_member(pb::RemoveMemberRequest {
            org_id: "acme".into(),
            member_id: last.clone(),
            actor_id: "olivia".into(),
            idempotency_key: "remove".into(),
        })
        .await
        .expect("remove");
    let second = admin
        .list_members(page("acme", 3, &first.next_page_token))
        .await
        .expect("second page")
        .into_inner();
    let second: Vec<String> = second.members.into_iter().map(|m| m.member_id).collect();
    let want: Vec<String> = expected[3..6].iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(second, want, "after {last}");

    for (request, field) in [
        (page("globex", 3, &first.next_page_token), "page_token"),
        (page("acme", 3, "not-a-token"), "page_token"),
        (page("acme", 1001, ""), "page_size"),
        (page("acme", -1, ""), "page_size"),
    ] {
        let refused = admin
            .list_members(request.clone())
            .await
            .expect_err("refused");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{request:?}");
        assert_eq!(bad_fields(&refused), [field], "{request:?}");
    }
    server.stop().await;
}
