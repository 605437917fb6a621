//! Rotating a secret without downtime: while `auth.admin_token_previous`,
//! `auth.service_token_previous` or `gateway.shared_secret_previous` is set, the previous
//! value is accepted next to the current one (each still only where it was: a previous
//! service token does not pass Admin), and anything else is refused as before. (The
//! webhook key's rotation is in tests/webhooks.rs; the settings' validation in
//! src/config.rs.)

mod common;

use common::gateways::{balance, esign_config, http, seed};
use tollgate::api::pb;
use tollgate::ledger::Clock;
use tonic::Code;

const OLD_ADMIN: &str = "old-admin-token";
const OLD_SERVICE: &str = "old-service-token";

fn grant(account: &str, key: &str) -> pb::GrantRequest {
    pb::GrantRequest {
        account_id: account.into(),
        amount: 10,
        idempotency_key: key.into(),
        ..Default::default()
    }
}

fn debit(account: &str, key: &str) -> pb::DebitRequest {
    pb::DebitRequest {
        account_id: account.into(),
        amount: 1,
        idempotency_key: key.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previous_tokens_pass_where_their_current_ones_do() {
    let redis = common::RedisServer::start();
    let mut config = common::test_config(&redis.url());
    config.auth.admin_token_previous = OLD_ADMIN.into();
    config.auth.service_token_previous = OLD_SERVICE.into();
    let server = common::TestServer::start(config, Clock::Redis).await;

    // Admin: both admin tokens; a service token, current or previous, is known but not
    // enough; anything else is unknown.
    for (i, token) in [common::ADMIN_TOKEN, OLD_ADMIN].into_iter().enumerate() {
        server
            .admin_with(Some(token))
            .await
            .grant(grant("acct", &format!("g{i}")))
            .await
            .unwrap_or_else(|e| panic!("{token}: {e:?}"));
    }
    for (token, code) in [
        (common::SERVICE_TOKEN, Code::PermissionDenied),
        (OLD_SERVICE, Code::PermissionDenied),
        ("another-token", Code::Unauthenticated),
    ] {
        let err = server
            .admin_with(Some(token))
            .await
            .grant(grant("acct", "refused"))
            .await
            .expect_err(token);
        assert_eq!(err.code(), code, "{token}: {err:?}");
    }

    // Metering: the four tokens; nothing else.
    for (i, token) in [
        common::SERVICE_TOKEN,
        OLD_SERVICE,
        common::ADMIN_TOKEN,
        OLD_ADMIN,
    ]
    .into_iter()
    .enumerate()
    {
        server
            .metering_with(Some(token))
            .await
            .debit(debit("acct", &format!("d{i}")))
            .await
            .unwrap_or_else(|e| panic!("{token}: {e:?}"));
    }
    let err = server
        .metering_with(Some("another-token"))
        .await
        .debit(debit("acct", "refused"))
        .await
        .expect_err("unknown token");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    // Two grants of 10, four debits of 1; the refused calls changed nothing.
    assert_eq!(balance(&server, "acct").await, (16, 0, 4));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_previous_gateway_secret_is_trusted_too() {
    let redis = common::RedisServer::start();
    let mut config = esign_config(&redis.url());
    config.gateway.shared_secret = "new-secret".into();
    config.gateway.shared_secret_previous = "old-secret".into();
    let server = common::TestServer::start(config, Clock::Redis).await;
    let key = seed(&server, "acme", 100).await;
    let forward_auth = |secret: Option<&'static str>| {
        let key = key.clone();
        async move {
            let mut headers = vec![
                ("x-forwarded-method", "POST"),
                ("x-forwarded-uri", "/v1/envelopes"),
                ("x-signature-method", "electronic"),
                ("x-api-key", key.as_str()),
            ];
            if let Some(secret) = secret {
                headers.push(("x-tollgate-gateway-secret", secret));
            }
            http(server.http_addr, "GET", "/v1/forward-auth", &headers, "").await
        }
    };
    for secret in ["new-secret", "old-secret"] {
        let r = forward_auth(Some(secret)).await;
        assert_eq!(r.status, 200, "{secret}: {r:?}");
    }
    for secret in [Some("other-secret"), Some(""), None] {
        let r = forward_auth(secret).await;
        assert_eq!(r.status, 403, "{secret:?}: {r:?}");
        assert_eq!(r.json()["error"], "untrusted_gateway", "{secret:?}: {r:?}");
    }
    // Two envelopes of 11 credits; the refused checks charged nothing.
    assert_eq!(balance(&server, "acme").await, (78, 0, 22));
    server.stop().await;
}
