//! `envoy.service.auth.v3.Authorization/Check` driven directly through a tonic client of
//! the Envoy types, for the finer cases: every denial reason, replay by request id, bad
//! headers, API key lifecycle and the identity cache, holds settled through the access-log
//! service and the HTTP endpoints, forward-auth modes, price book errors.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::data::accesslog::v3::{
    AccessLogCommon, HttpAccessLogEntry, HttpRequestProperties, HttpResponseProperties,
};
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_client::AccessLogServiceClient;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::{
    HttpAccessLogEntries, LogEntries,
};
use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use envoy_types::pb::google::protobuf::UInt32Value;
use tonic::transport::Channel;
use tonic_types::StatusExt;

use common::gateways::{
    access_log_entry, access_log_message, balance, esign_config, esign_config_from,
    esign_replay_config, example, http, ocr_hold, replace, seed, wait_balance,
};
use tollgate::api::pb;
use tollgate::config::{Config, ConfigErrors, Overrides};
use tollgate::gateway::identity::{
    CreatedKey, IdentityError, KeyBinding, KeyStore, Known, Presented,
};
use tollgate::ledger::{Clock, Ledger};

/// What a CheckResponse says, flattened.
#[derive(Debug)]
struct Answer {
    /// HTTP status Envoy would send on a denial; 200 when allowed.
    status: i32,
    /// Upstream headers (allowed) or response headers (denied).
    headers: HashMap<String, String>,
    /// Headers to add to the client's response (allowed).
    client_headers: HashMap<String, String>,
    removed: Vec<String>,
    body: serde_json::Value,
    /// The dynamic metadata of the answer (Envoy copies it into the access log).
    metadata: Option<envoy_types::pb::google::protobuf::Struct>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// `x-credits-remaining` on the client's response.
    fn remaining(&self) -> Option<&str> {
        self.client_headers
            .get("x-credits-remaining")
            .map(String::as_str)
    }
}

fn flatten(response: CheckResponse) -> Answer {
    let pairs = |options: &[envoy_types::pb::envoy::config::core::v3::HeaderValueOption]| {
        options
            .iter()
            .filter_map(|o| o.header.as_ref())
            .map(|h| (h.key.clone(), h.value.clone()))
            .collect::<HashMap<_, _>>()
    };
    let code = response.status.as_ref().map_or(-1, |s| s.code);
    let metadata = response.dynamic_metadata;
    match response.http_response.expect("http_response") {
        HttpResponse::OkResponse(ok) => {
            assert_eq!(code, 0);
            Answer {
                status: 200,
                headers: pairs(&ok.headers),
                client_headers: pairs(&ok.response_headers_to_add),
                removed: ok.headers_to_remove,
                body: serde_json::Value::Null,
                metadata,
            }
        }
        HttpResponse::DeniedResponse(denied) => {
            assert_ne!(code, 0);
            Answer {
                status: denied.status.map_or(0, |s| s.code),
                headers: pairs(&denied.headers),
                client_headers: HashMap::new(),
                removed: Vec::new(),
                body: serde_json::from_str(&denied.body).expect("JSON body"),
                metadata,
            }
        }
        other => panic!("unexpected {other:?}"),
    }
}

struct Checker {
    client: AuthorizationClient<Channel>,
}

impl Checker {
    async fn new(server: &common::TestServer) -> Self {
        Self {
            client: AuthorizationClient::new(server.channel().await),
        }
    }

    async fn check(&mut self, method: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
        let request = CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request {
                    http: Some(HttpRequest {
                        method: method.into(),
                        path: path.into(),
                        host: "api.example.com".into(),
                        headers: headers
                            .iter()
                            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                            .collect(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        };
        flatten(
            self.client
                .check(request)
                .await
                .expect("Check")
                .into_inner(),
        )
    }
}

async fn events_len(server: &common::TestServer) -> usize {
    common::outbox_len(&server.ledger).await
}

/// Without `gateway.request_id_replay` (the default) a request id a client can choose
/// buys nothing: every check with it is charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_request_id_is_charged_again_by_default() {
    let redis = common::RedisServer::start();
    let server = common::TestServer::start(esign_config(&redis.url()), Clock::Redis).await;
    let mut c = Checker::new(&server).await;
    let key = seed(&server, "acme", 30).await;
    let bearer = format!("Bearer {key}");
    for remaining in ["29", "28", "27"] {
        let a = c
            .check(
                "POST",
                "/v1/envelopes",
                &[("authorization", &bearer), ("x-request-id", "same-id")],
            )
            .await;
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(a.remaining(), Some(remaining));
    }
    assert_eq!(balance(&server, "acme").await, (27, 0, 3));
}

/// Sets a day budget on an account's default wallet.
async fn day_budget(server: &common::TestServer, account: &str, limit: i64) {
    server
        .admin()
        .await
        .set_budget(pb::SetBudgetRequest {
            account_id: account.into(),
            limit,
            period: "day".into(),
            idempotency_key: format!("budget-{account}"),
            ..Default::default()
        })
        .await
        .expect("budget");
}

/// `x-credits-remaining` is what the caller may still spend: the wallet's balance within
/// its budget's headroom (limit - spent today), on ext_authz and forward-auth alike,
/// after a hold as after a debit — not a balance the budget will refuse to let them use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_remaining_header_is_the_budget_headroom_when_the_budget_is_tighter() {
    let redis = common::RedisServer::start();
    // 2026-11-23 10:00 UTC, still: the day budget never rolls over mid-test.
    let (clock, _now) = Clock::manual(1_795_428_000_000);
    let server = common::TestServer::start(esign_config(&redis.url()), clock).await;
    let mut c = Checker::new(&server).await;
    let key = seed(&server, "tight", 1_000).await;
    day_budget(&server, "tight", 60).await;
    // An envelope through forward-auth: 1 credit, 11 with an electronic signature.
    let addr = server.http_addr;
    let forward_auth = |key: String, electronic: bool| async move {
        let mut headers = vec![
            ("x-forwarded-method", "POST"),
            ("x-forwarded-uri", "/v1/envelopes"),
            ("x-forwarded-host", "api.example.com"),
            ("x-api-key", key.as_str()),
        ];
        if electronic {
            headers.push(("x-signature-method", "electronic"));
        }
        http(addr, "GET", "/v1/forward-auth", &headers, "").await
    };

    // An OCR hold of 50: 10 of the budget left, though the wallet has 950.
    let a = ocr_check(&mut c, &key, "ocr-1").await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.header("x-tollgate-charged"), Some("50"));
    assert_eq!(a.remaining(), Some("10"));
    // Envelopes of 1 (no signature): one less each time, on either gateway.
    let a = c
        .check("POST", "/v1/envelopes", &[("x-api-key", &key)])
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.remaining(), Some("9"));
    let r = forward_auth(key.clone(), false).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-credits-remaining"), Some("8"));
    assert_eq!(balance(&server, "tight").await, (948, 50, 2));
    // An electronic envelope (11) would cross the 8 the header announced: refused by both.
    let a = c
        .check(
            "POST",
            "/v1/envelopes",
            &[("x-api-key", &key), ("x-signature-method", "electronic")],
        )
        .await;
    assert_eq!(a.status, 429, "{a:?}");
    assert_eq!(a.body["error"], "budget_exceeded");
    assert_eq!(a.body["spent"], 52);
    let r = forward_auth(key.clone(), true).await;
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.json()["error"], "budget_exceeded");
    // Up to exactly what it said: 8 envelopes of 1, the last leaving 0.
    for left in (0..8).rev() {
        let r = forward_auth(key.clone(), false).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(
            r.header("x-credits-remaining"),
            Some(left.to_string().as_str())
        );
    }
    let a = c
        .check("POST", "/v1/envelopes", &[("x-api-key", &key)])
        .await;
    assert_eq!(a.status, 429, "{a:?}");
    assert_eq!(balance(&server, "tight").await, (940, 50, 10));

    // A budget looser than the balance changes nothing: the header is the balance.
    let roomy = seed(&server, "roomy", 30).await;
    day_budget(&server, "roomy", 1_000).await;
    let a = c
        .check("POST", "/v1/envelopes", &[("x-api-key", &roomy)])
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.remaining(), Some("29"));
    let r = forward_auth(roomy.clone(), true).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-credits-remaining"), Some("18"));
    let a = ocr_check(&mut c, &roomy, "ocr-roomy").await;
    assert_eq!(a.status, 402, "{a:?}");
    assert_eq!(a.body["error"], "insufficient_credits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_denial_reason_and_replay_by_request_id() {
    let redis = common::RedisServer::start();
    let server = common::TestServer::start(esign_replay_config(&redis.url()), Clock::Redis).await;
    let mut c = Checker::new(&server).await;
    let key = seed(&server, "acme", 30).await;
    let bearer = format!("Bearer {key}");

    // Allowed, with every header; tollgate headers it does not set are removed.
    let a = c
        .check(
            "POST",
            "/v1/envelopes",
            &[("authorization", &bearer), ("x-request-id", "r-1")],
        )
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.header("x-tollgate-account"), Some("acme"));
    assert_eq!(a.header("x-tollgate-operation"), Some("envelope.send"));
    assert_eq!(a.header("x-tollgate-charged"), Some("1"));
    assert_eq!(a.remaining(), Some("29"));
    assert!(
        a.removed.contains(&"x-tollgate-hold-id".to_owned()),
        "{a:?}"
    );
    assert!(
        a.removed.contains(&"x-tollgate-degraded".to_owned()),
        "{a:?}"
    );

    // Replay by request id: same answer, charged once. The same id for another operation
    // is another check.
    let again = c
        .check(
            "POST",
            "/v1/envelopes",
            &[("authorization", &bearer), ("x-request-id", "r-1")],
        )
        .await;
    assert_eq!(again.status, 200);
    assert_eq!(again.remaining(), Some("29"));
    assert_eq!(balance(&server, "acme").await, (29, 0, 1));
    // Same id, different price: refused, nothing charged.
    let reused = c
        .check(
            "POST",
            "/v1/envelopes",
            &[
                ("authorization", &bearer),
                ("x-request-id", "r-1"),
                ("x-signature-method", "dsc"),
            ],
        )
        .await;
    assert_eq!(reused.status, 409, "{reused:?}");
    assert_eq!(reused.body["error"], "request_id_reused");
    assert_eq!(balance(&server, "acme").await, (29, 0, 1));

    // The x-api-key header works as well.
    let a = c
        .check(
            "POST",
            "/v1/envelopes",
            &[("x-api-key", &key), ("x-request-id", "r-2")],
        )
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(balance(&server, "acme").await, (28, 0, 2));

    // Bad headers: 400 naming the header; nothing charged, no event written.
    let events = events_len(&server).await;
    for (headers, named) in [
        (vec![("x-signature-method", "fax")], "x-signature-method"),
        (
            vec![("x-signature-method", "aadhaar"), ("x-signers", "two")],
            "x-signers",
        ),
        (
            vec![("x-signature-method", "aadhaar"), ("x-signers", "51")],
            "x-signers",
        ),
        (
            vec![
                ("x-signature-method", "aadhaar"),
                ("x-signers", "184467440737095516160"),
            ],
            "x-signers",
        ),
    ] {
        let mut all = vec![("authorization", bearer.as_str())];
        all.extend(headers.iter().copied());
        let d = c.check("POST", "/v1/envelopes", &all).await;
        assert_eq!(d.status, 400, "{headers:?}: {d:?}");
        assert_eq!(d.body["error"], "bad_header");
        assert_eq!(d.body["header"], named, "{d:?}");
        assert_eq!(d.header("x-tollgate-reason"), Some("bad_header"));
    }
    assert_eq!(
        events_len(&server).await,
        events,
        "bad requests write nothing"
    );
    assert_eq!(balance(&server, "acme").await, (28, 0, 2));

    // Missing key, malformed key, well-formed unknown key, wrong secret of a real key id.
    let d = c.check("POST", "/v1/envelopes", &[]).await;
    assert_eq!(
        (d.status, d.body["error"].as_str()),
        (401, Some("missing_api_key"))
    );
    let d = c
        .check(
            "POST",
            "/v1/envelopes",
            &[("authorization", "Basic YWxhZGRpbjpvcGVu")],
        )
        .await;
    assert_eq!(
        (d.status, d.body["error"].as_str()),
        (401, Some("missing_api_key"))
    );
    let d = c
        .check("POST", "/v1/envelopes", &[("x-api-key", "garbage")])
        .await;
    assert_eq!(
        (d.status, d.body["error"].as_str()),
        (401, Some("unknown_api_key"))
    );
    let forged = format!("{}{}", &key[..key.len() - 64], "0".repeat(64));
    let d = c
        .check("POST", "/v1/envelopes", &[("x-api-key", &forged)])
        .await;
    assert_eq!(
        (d.status, d.body["error"].as_str()),
        (401, Some("unknown_api_key"))
    );

    // Insufficient credits: 402 with the numbers, the operation and its wallet.
    let d = c
        .check(
            "POST",
            "/v1/documents/doc-9/ocr",
            &[("authorization", &bearer), ("x-request-id", "ocr-too-big")],
        )
        .await;
    assert_eq!(d.status, 402, "{d:?}");
    assert_eq!(
        d.body,
        serde_json::json!({
            "error": "insufficient_credits", "required": 50, "available": 28,
            "operation": "ocr.pages", "wallet": "default"
        })
    );
    assert_eq!(d.header("content-type"), Some("application/json"));

    // No route (default deny): 403; a free route needs no key and charges nothing.
    let d = c
        .check("DELETE", "/v1/envelopes", &[("authorization", &bearer)])
        .await;
    assert_eq!(
        (d.status, d.body["error"].as_str()),
        (403, Some("no_route"))
    );
    let a = c.check("GET", "/v1/envelopes/7", &[]).await;
    assert_eq!(a.status, 200);
    assert!(a.headers.is_empty(), "{a:?}");

    // Revoked key: 403 at once on the sidecar that revoked it.
    let mut admin = server.admin().await;
    let listed = admin
        .list_api_keys(pb::ListApiKeysRequest {
            account_id: "acme".into(),
        })
        .await
        .expect("list")
        .into_inner()
        .keys;
    assert_eq!(listed.len(), 1);
    assert!(key.contains(&listed[0].key_id));
    assert_eq!(listed[0].revoked_at_ms, 0);
    let revoked = admin
        .revoke_api_key(pb::RevokeApiKeyRequest {
            key_id: listed[0].key_id.clone(),
        })
        .await
        .expect("revoke")
        .into_inner();
    assert_eq!(revoked.account_id, "acme");
    assert!(!revoked.already_revoked);
    let d = c
        .check("POST", "/v1/envelopes", &[("authorization", &bearer)])
        .await;
    assert_eq!(
        (d.status, d.body["error"].as_str()),
        (403, Some("revoked_api_key"))
    );
    assert_eq!(balance(&server, "acme").await, (28, 0, 2));
    let twice = admin
        .revoke_api_key(pb::RevokeApiKeyRequest {
            key_id: listed[0].key_id.clone(),
        })
        .await
        .expect("revoke again")
        .into_inner();
    assert!(twice.already_revoked);
    assert_eq!(twice.revoked_at_ms, revoked.revoked_at_ms);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_are_hashed_bound_to_one_account_and_validated() {
    let redis = common::RedisServer::start();
    let server = common::TestServer::start(esign_config(&redis.url()), Clock::Redis).await;
    let mut admin = server.admin().await;
    let created = admin
        .create_api_key(pb::CreateApiKeyRequest {
            account_id: "acme".into(),
            name: "production".into(),
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner();
    assert!(created
        .api_key
        .starts_with(&format!("tg_{}_", created.key_id)));
    assert_eq!(created.account_id, "acme");
    // Redis holds the SHA-256 of the key, never the key or its secret.
    let mut con = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut con)
        .await
        .unwrap();
    let secret = &created.api_key[created.api_key.len() - 64..];
    for k in &keys {
        assert!(!k.contains(secret));
        let t: String = redis::cmd("TYPE")
            .arg(k)
            .query_async(&mut con)
            .await
            .unwrap();
        if t == "hash" {
            let fields: Vec<String> = redis::cmd("HGETALL")
                .arg(k)
                .query_async(&mut con)
                .await
                .unwrap();
            assert!(
                fields.iter().all(|f| !f.contains(secret)),
                "{k}: {fields:?}"
            );
        }
    }
    let record = keys
        .iter()
        .find(|k| k.ends_with(&format!(":k:{}", created.key_id)))
        .expect("key record");
    assert!(
        record.starts_with("{tg:"),
        "under the account's shard tag: {record}"
    );

    // Bad requests name their fields; unknown key ids are NOT_FOUND.
    let status = admin
        .create_api_key(pb::CreateApiKeyRequest {
            account_id: "has space".into(),
            name: "x".repeat(65),
            ..Default::default()
        })
        .await
        .expect_err("invalid");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("account_id") && status.message().contains("name"));
    let status = admin
        .revoke_api_key(pb::RevokeApiKeyRequest {
            key_id: "k1-0000000000000000".into(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(status.code(), tonic::Code::NotFound);
    let status = admin
        .revoke_api_key(pb::RevokeApiKeyRequest {
            key_id: "nonsense".into(),
        })
        .await
        .expect_err("malformed");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    // Admin RPCs need the admin token.
    let mut service = server.admin_with(Some(common::SERVICE_TOKEN)).await;
    let status = service
        .list_api_keys(pb::ListApiKeysRequest {
            account_id: "acme".into(),
        })
        .await
        .expect_err("service token is not admin");
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
}

/// RevokeApiKey moves the key's id out of its account's live key index
/// (`{tg:S}:ks:<account>`, a hash of key id to created ms, which the keys-per-account cap
/// counts) into the revoked one (`{tg:S}:kr:<account>`, scored by revocation ms); a repeat
/// leaves it there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_leaves_the_live_key_index_for_the_revoked_one() {
    let redis = common::RedisServer::start();
    let server = common::TestServer::start(esign_config(&redis.url()), Clock::Redis).await;
    let mut admin = server.admin().await;
    let created = admin
        .create_api_key(pb::CreateApiKeyRequest {
            account_id: "acme".into(),
            name: "production".into(),
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner();
    let mut con = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let records: Vec<String> = redis::cmd("KEYS")
        .arg(format!("*:k:{}", created.key_id))
        .query_async(&mut con)
        .await
        .expect("keys");
    let [record] = &records[..] else {
        panic!("one key record: {records:?}");
    };
    let tag = &record[..=record.find('}').expect("hash tag")];
    let (live, revoked) = (format!("{tag}:ks:acme"), format!("{tag}:kr:acme"));
    // Whether the live index lists the key, and its score in the revoked one.
    async fn indexed(
        con: &mut redis::aio::MultiplexedConnection,
        live: &str,
        revoked: &str,
        key_id: &str,
    ) -> (bool, Option<i64>) {
        let is_live: bool = redis::cmd("HEXISTS")
            .arg(live)
            .arg(key_id)
            .query_async(con)
            .await
            .expect("hexists");
        let revoked_at: Option<i64> = redis::cmd("ZSCORE")
            .arg(revoked)
            .arg(key_id)
            .query_async(con)
            .await
            .expect("zscore");
        (is_live, revoked_at)
    }
    let key_id = created.key_id.clone();
    assert_eq!(
        indexed(&mut con, &live, &revoked, &key_id).await,
        (true, None),
        "a new key is live"
    );

    let out = admin
        .revoke_api_key(pb::RevokeApiKeyRequest {
            key_id: created.key_id.clone(),
        })
        .await
        .expect("revoke")
        .into_inner();
    assert!(!out.already_revoked);
    assert_eq!(
        indexed(&mut con, &live, &revoked, &key_id).await,
        (false, Some(out.revoked_at_ms)),
        "revoked: out of {live}, into {revoked}"
    );

    let again = admin
        .revoke_api_key(pb::RevokeApiKeyRequest {
            key_id: created.key_id.clone(),
        })
        .await
        .expect("revoke again")
        .into_inner();
    assert!(again.already_revoked);
    assert_eq!(
        indexed(&mut con, &live, &revoked, &key_id).await,
        (false, Some(out.revoked_at_ms))
    );
    server.stop().await;
}

/// CreateApiKey with an idempotency key: a retry makes no second key; it answers the first
/// one (`replayed`, without its secret). The same idempotency key with another name is
/// FAILED_PRECONDITION IDEMPOTENCY_KEY_REUSED (as for every other mutation), a bad one
/// INVALID_ARGUMENT naming the field; neither makes anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_key_creation_makes_one_key() {
    let redis = common::RedisServer::start();
    let config = esign_config(&redis.url());
    let store = tollgate::settle::Store::connect_lazy(&config.store.url, 1).expect("store");
    let server = common::TestServer::start(config, Clock::Redis).await;
    let mut admin = server.admin().await;
    let create = |name: &str, idempotency_key: &str| pb::CreateApiKeyRequest {
        account_id: "retry".into(),
        name: name.into(),
        idempotency_key: idempotency_key.into(),
        ..Default::default()
    };
    let first = admin
        .create_api_key(create("ci", "create-1"))
        .await
        .expect("create")
        .into_inner();
    assert!(!first.replayed);
    assert!(first.api_key.starts_with("tg_"));
    let again = admin
        .create_api_key(create("ci", "create-1"))
        .await
        .expect("retry")
        .into_inner();
    assert!(again.replayed);
    assert_eq!(again.key_id, first.key_id);
    assert_eq!(again.created_at_ms, first.created_at_ms);
    assert_eq!(again.api_key, "", "the secret is in the first answer only");
    let listed = |admin: &mut pb::admin_client::AdminClient<common::AuthChannel>| {
        let mut admin = admin.clone();
        async move {
            admin
                .list_api_keys(pb::ListApiKeysRequest {
                    account_id: "retry".into(),
                })
                .await
                .expect("list")
                .into_inner()
                .keys
                .len()
        }
    };
    assert_eq!(listed(&mut admin).await, 1);
    // The same idempotency key with another name is the refusal every mutation gives
    // (it was INVALID_ARGUMENT here only, so a client's one handler for a reused key
    // missed it); a malformed key is a bad field.
    let reused = admin
        .create_api_key(create("other", "create-1"))
        .await
        .expect_err("refused");
    assert_eq!(reused.code(), tonic::Code::FailedPrecondition, "{reused:?}");
    let info = reused.get_details_error_info().expect("ErrorInfo");
    assert_eq!(
        (info.reason.as_str(), info.domain.as_str()),
        ("IDEMPOTENCY_KEY_REUSED", "tollgate.dev")
    );
    let bad = admin
        .create_api_key(create("ci", "has space"))
        .await
        .expect_err("refused");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("idempotency_key"), "{bad:?}");
    assert_eq!(listed(&mut admin).await, 1);
    // Another idempotency key, or none, makes another key.
    for key in ["create-2", ""] {
        let made = admin
            .create_api_key(create("ci", key))
            .await
            .expect("create")
            .into_inner();
        assert!(!made.replayed && made.key_id != first.key_id);
    }
    assert_eq!(listed(&mut admin).await, 3);

    // A retry after the key was revoked still answers it, and leaves it revoked in the
    // durable ledger too (which a restore reads).
    admin
        .revoke_api_key(pb::RevokeApiKeyRequest {
            key_id: first.key_id.clone(),
        })
        .await
        .expect("revoke");
    let late = admin
        .create_api_key(create("ci", "create-1"))
        .await
        .expect("retry")
        .into_inner();
    assert!(late.replayed && late.key_id == first.key_id);
    let stored = store.api_keys().await.expect("api keys");
    let kept = stored
        .iter()
        .find(|k| k.key_id == first.key_id)
        .expect("stored");
    assert!(kept.revoked_at_ms > 0, "{kept:?}");
    assert!(!kept.digest.is_empty(), "{kept:?}");
}

/// Sidecar C's identity cache TTL, which is also its doorkeeper's clearing period: the
/// steps a round below takes fit in it many times over on a busy machine, and C is waited
/// for to forget a revoked key for about this long.
const C_IDENTITY_TTL: Duration = Duration::from_secs(5);
/// How long past C's TTL its check of a revoked key may still answer 200: a busy machine's
/// stalls, nothing of the cache's (an entry is never trusted past its TTL).
const C_STALL_MARGIN: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_stops_working_on_other_sidecars_within_the_cache_ttl() {
    let redis = common::RedisServer::start();
    // Sidecar B trusts its cache for an hour, C for C_IDENTITY_TTL; A revokes.
    let a = common::TestServer::start(esign_config(&redis.url()), Clock::Redis).await;
    let mut config_b = esign_config(&redis.url());
    config_b.gateway.identity_cache_ttl_ms = 3_600_000;
    let b = common::TestServer::start(config_b, Clock::Redis).await;
    let mut config_c = esign_config(&redis.url());
    config_c.gateway.identity_cache_ttl_ms = C_IDENTITY_TTL.as_millis() as u64;
    let c = common::TestServer::start(config_c, Clock::Redis).await;
    // A round: a new key used on every sidecar, revoked on A, checked on C at once. A key
    // enters a sidecar's cache on its second miss since its doorkeeper's last clearing
    // (once per TTL: an hour on B, C_IDENTITY_TTL on C), so of three checks on C within
    // C_IDENTITY_TTL two have no clearing between them: the key is cached, at the earliest
    // when the round began. So when the round's check on C after the revocation ends
    // within C_IDENTITY_TTL of the round's start, C must still trust the key. A round this
    // machine ran slower than that cannot tell, and is run again with another key.
    const ROUNDS_MAX: usize = 5;
    let mut round = 0;
    let (key, revoked_at) = loop {
        round += 1;
        let key = seed(&a, &format!("acme{round}"), 1_000).await;
        let headers = [("x-api-key", key.as_str())];
        let began = Instant::now();
        for server in [&a, &b, &c, &a, &b, &c, &c] {
            let r = Checker::new(server)
                .await
                .check("POST", "/v1/envelopes", &headers)
                .await;
            assert_eq!(r.status, 200, "{r:?}");
        }
        let mut checker_c = Checker::new(&c).await;
        let key_id = key.split('_').nth(1).expect("key id").to_owned();
        a.admin()
            .await
            .revoke_api_key(pb::RevokeApiKeyRequest { key_id })
            .await
            .expect("revoke");
        let revoked_at = Instant::now();
        let on_c = checker_c.check("POST", "/v1/envelopes", &headers).await;
        let took = began.elapsed();
        // A forgets at once; B still trusts its cached identity (the documented delay).
        let r = Checker::new(&a)
            .await
            .check("POST", "/v1/envelopes", &headers)
            .await;
        assert_eq!(r.status, 403, "{r:?}");
        assert_eq!(r.body["error"], "revoked_api_key");
        let r = Checker::new(&b)
            .await
            .check("POST", "/v1/envelopes", &headers)
            .await;
        assert_eq!(r.status, 200, "within B's cache TTL: {r:?}");
        if took < C_IDENTITY_TTL {
            assert_eq!(on_c.status, 200, "within C's cache TTL: {on_c:?}");
            break (key, revoked_at);
        }
        println!("round {round} took {took:?}, C's TTL is {C_IDENTITY_TTL:?}: again");
        assert!(
            round < ROUNDS_MAX,
            "{ROUNDS_MAX} rounds each took C's TTL ({C_IDENTITY_TTL:?}) or longer"
        );
    };
    // C asks Redis again once its entry (made before the revocation) is older than its
    // TTL: a check from then on is refused.
    let headers = [("x-api-key", key.as_str())];
    let mut checker = Checker::new(&c).await;
    let deadline = revoked_at + C_IDENTITY_TTL + C_STALL_MARGIN;
    loop {
        let r = checker.check("POST", "/v1/envelopes", &headers).await;
        if r.status == 403 {
            assert_eq!(r.body["error"], "revoked_api_key");
            break;
        }
        assert_eq!(r.status, 200, "{r:?}");
        assert!(
            Instant::now() < deadline,
            "C still accepts a key revoked {:?} ago (its TTL {C_IDENTITY_TTL:?}, \
             {C_STALL_MARGIN:?} allowed for stalls): {r:?}",
            revoked_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // B, trusting for an hour, still does.
    let r = Checker::new(&b)
        .await
        .check("POST", "/v1/envelopes", &headers)
        .await;
    assert_eq!(r.status, 200, "within B's cache TTL: {r:?}");
}

/// Checks flowing on the sidecar that revokes the key, through the revocation, round
/// after round: every check that starts after RevokeApiKey answered is refused
/// `revoked_api_key` (this sidecar's bound is "at once", however the checks' own lookups
/// interleave with it), and the ledger charged exactly the checks that were allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_racing_a_revocation_on_its_sidecar_are_refused_from_its_answer_on() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let redis = common::RedisServer::start();
    let server = common::TestServer::start(esign_config(&redis.url()), Clock::Redis).await;
    for round in 0..6 {
        let account = format!("racer{round}");
        let key = seed(&server, &account, 1_000_000).await;
        let revoked = Arc::new(AtomicBool::new(false));
        let mut checkers = Vec::new();
        for _ in 0..3 {
            let mut c = Checker::new(&server).await;
            let key = key.clone();
            let revoked = revoked.clone();
            checkers.push(tokio::spawn(async move {
                let mut allowed = 0i64;
                loop {
                    let after_revocation = revoked.load(Ordering::SeqCst);
                    let r = c
                        .check("POST", "/v1/envelopes", &[("x-api-key", key.as_str())])
                        .await;
                    if r.status == 200 {
                        assert!(!after_revocation, "allowed after the revocation: {r:?}");
                        allowed += 1;
                    } else {
                        assert_eq!(r.body["error"], "revoked_api_key", "{r:?}");
                        if after_revocation {
                            return allowed;
                        }
                    }
                }
            }));
        }
        // Let the checks warm the cache (a key is cached on its second miss), then revoke.
        tokio::time::sleep(Duration::from_millis(20 * (round + 1))).await;
        let key_id = key.split('_').nth(1).expect("key id").to_owned();
        server
            .admin()
            .await
            .revoke_api_key(pb::RevokeApiKeyRequest { key_id })
            .await
            .expect("revoke");
        revoked.store(true, Ordering::SeqCst);
        let mut allowed = 0;
        for checker in checkers {
            allowed += tokio::time::timeout(common::START_TIMEOUT, checker)
                .await
                .expect("checks refused after the revocation")
                .expect("checker");
        }
        let (_, _, used) = balance(&server, &account).await;
        assert_eq!(
            used, allowed,
            "round {round}: charged exactly the allowed checks"
        );
    }
}

/// A key store on `ledger`'s Redis, as a sidecar's, whose answers live `ttl`.
fn key_store(ledger: &Ledger, ttl: Duration) -> KeyStore {
    KeyStore::new(
        ledger.redis().clone(),
        ledger.shards().clone(),
        ttl,
        100,
        10,
    )
}

/// An expired answer in the identity cache is replaced by the next one from Redis even
/// when the doorkeeper would not let the key in (it forgot the key's first miss): the
/// fail-open spool reads cached answers however old, and spools no charge for a key the
/// cache knows is revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_cached_identity_is_replaced_by_the_next_answer() {
    let redis = common::RedisServer::start();
    let ledger = common::ledger(&redis, Clock::Redis);
    let sidecar = key_store(&ledger, Duration::from_millis(300));
    let admin = key_store(&ledger, Duration::from_millis(300));
    admin.load_scripts().await.expect("key scripts");
    let key = admin
        .create("acme", "k", &KeyBinding::default(), "")
        .await
        .expect("key");
    // A key enters the cache on its second miss since the doorkeeper's last clearing (once
    // a second here, counted from the store's creation): a clearing between the first two
    // makes it the third. Asked until the cache answers for it (a fresh entry: a stall
    // past the 300 ms TTL between the two calls makes another round).
    let deadline = Instant::now() + common::START_TIMEOUT;
    loop {
        let identity = sidecar.identify(&key.api_key).await.expect("valid key");
        assert_eq!(identity.account_id, "acme");
        if matches!(sidecar.presented(&key.api_key), Presented::Known(Ok(_))) {
            break;
        }
        assert!(Instant::now() < deadline, "the key never entered the cache");
    }
    admin.revoke(&key.key_id).await.expect("revoke");
    // Past the TTL (300 ms) and the doorkeeper's period (at least 1 s).
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert!(matches!(
        sidecar.identify(&key.api_key).await,
        Err(IdentityError::Revoked)
    ));
    assert!(
        sidecar.payer(&key.api_key).is_none(),
        "a revoked key's stale identity would still pay"
    );
}

/// A key of a shard Redis lost (no epoch marker: its key records are gone too) is not
/// an unknown key: the lookup says the ledger is not initialized (503 at the gateway,
/// as every charge then), and nothing is cached, so once a restore brings the key record
/// back the key works at once (it was cached as unknown for a TTL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_of_a_lost_shard_is_not_taken_for_an_unknown_one() {
    let redis = common::RedisServer::start();
    let ledger = common::ledger(&redis, Clock::Redis);
    let sidecar = key_store(&ledger, Duration::from_secs(3_600));
    sidecar.load_scripts().await.expect("key scripts");
    let key = sidecar
        .create("acme", "k", &KeyBinding::default(), "")
        .await
        .expect("key");
    let shard = ledger.shards().of_account("acme");
    let record = format!("{}:k:{}", ledger.shards().tag(shard), key.key_id);
    let mut con = redis.client().get_connection().expect("redis");
    let saved: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(&record)
        .query(&mut con)
        .expect("key record");
    // Redis loses the shard: its key record and its epoch marker.
    let _: () = redis::cmd("DEL")
        .arg(&record)
        .arg(ledger.shards().epoch_key(shard))
        .query(&mut con)
        .expect("del");
    for _ in 0..3 {
        assert!(
            matches!(
                sidecar.identify(&key.api_key).await,
                Err(IdentityError::NotInitialized)
            ),
            "a lost shard's key taken for an unknown one"
        );
    }
    // A restore brings both back: the key is known at once.
    let mut hset = redis::cmd("HSET");
    hset.arg(&record);
    for (field, value) in &saved {
        hset.arg(field).arg(value);
    }
    let _: () = hset.query(&mut con).expect("hset");
    common::initialize_blocking(&ledger, &redis.url());
    let identity = sidecar.identify(&key.api_key).await.expect("valid key");
    assert_eq!(identity.account_id, "acme");
}

/// A key of "acme" made by `maker`, which `sidecar` looked up once: the doorkeeper lets it
/// into `sidecar`'s cache from the next answer on.
async fn a_key_missed_once(maker: &KeyStore, sidecar: &KeyStore) -> CreatedKey {
    maker.load_scripts().await.expect("key scripts");
    let key = maker
        .create("acme", "k", &KeyBinding::default(), "")
        .await
        .expect("key");
    sidecar.identify(&key.api_key).await.expect("valid key");
    key
}

/// A lookup that read a key from Redis before this sidecar revoked it answers after the
/// revocation: its "valid" must not replace the revoked entry the revocation left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_from_before_a_revocation_is_not_cached_after_it() {
    let redis = common::RedisServer::start();
    let ledger = common::ledger(&redis, Clock::Redis);
    let sidecar = key_store(&ledger, Duration::from_secs(3_600));
    let key = a_key_missed_once(&sidecar, &sidecar).await;
    let Presented::Miss(miss) = sidecar.presented(&key.api_key) else {
        panic!("not cached after one miss");
    };
    // The lookup read "valid"; meanwhile this sidecar revokes the key; then it answers.
    sidecar.revoke(&key.key_id).await.expect("revoke");
    sidecar.learn(&miss, || miss.active("acme".into(), String::new()));
    assert!(
        matches!(
            sidecar.presented(&key.api_key),
            Presented::Known(Err(IdentityError::Revoked))
        ),
        "a revoked key cached as valid, or its revocation forgotten"
    );
    assert!(matches!(
        sidecar.identify(&key.api_key).await,
        Err(IdentityError::Revoked)
    ));
}

/// Two lookups of a key that another sidecar revokes between them answer out of order:
/// the older "valid" must not replace the newer "revoked" (a revocation is for good). It
/// did, for a whole TTL, and once expired let the key through a fail_open route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_valid_answer_does_not_replace_a_newer_revoked_one() {
    let redis = common::RedisServer::start();
    let ledger = common::ledger(&redis, Clock::Redis);
    let store = || key_store(&ledger, Duration::from_secs(3_600));
    let (sidecar, other) = (store(), store());
    let key = a_key_missed_once(&other, &sidecar).await;
    let (Presented::Miss(first), Presented::Miss(second)) = (
        sidecar.presented(&key.api_key),
        sidecar.presented(&key.api_key),
    ) else {
        panic!("not cached after one miss");
    };
    // The first lookup read "valid"; the other sidecar revokes the key; the second lookup
    // reads "revoked" and answers first.
    other.revoke(&key.key_id).await.expect("revoke");
    sidecar.learn(&second, || Known::Revoked);
    sidecar.learn(&first, || first.active("acme".into(), String::new()));
    assert!(
        matches!(
            sidecar.presented(&key.api_key),
            Presented::Known(Err(IdentityError::Revoked))
        ),
        "an older valid answer replaced the revoked one"
    );
    assert!(matches!(
        sidecar.refused(&key.api_key),
        Some(IdentityError::Revoked)
    ));
}

/// The commands tollgate sent Redis itself (not those its scripts ran) that name `needle`.
fn sent_naming<'a>(lines: &'a [String], needle: &str) -> Vec<&'a str> {
    lines
        .iter()
        .filter(|l| !l.contains(" lua] ") && l.contains(needle))
        .map(String::as_str)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_the_identity_cache_misses_is_still_one_script_call() {
    let redis = common::RedisServer::start();
    let mut config = esign_config(&redis.url());
    // Cached until this test drops it, however slowly a busy machine runs the steps.
    config.gateway.identity_cache_ttl_ms = 3_600_000;
    config.gateway.request_id_replay = true;
    let server = common::TestServer::start(config, Clock::Redis).await;
    let key = seed(&server, "acme", 10).await;
    let key_id = key.split('_').nth(1).expect("key id").to_owned();
    let headers = |key: &str, id: &str| {
        [
            ("x-api-key", key.to_owned()),
            ("x-request-id", id.to_owned()),
        ]
    };
    let check = |key: String, id: &'static str| {
        let server = &server;
        async move {
            let h = headers(&key, id);
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            Checker::new(server)
                .await
                .check("POST", "/v1/envelopes", &h)
                .await
        }
    };

    // First sight of the key: the debit script reads the key record itself. Redis gets
    // one FCALL naming the key id and no separate lookup of the key record.
    let monitor = common::Monitor::start(&redis);
    let first = check(key.clone(), "m-1").await;
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.header("x-tollgate-account"), Some("acme"));
    assert_eq!(first.header("x-tollgate-charged"), Some("1"));
    let lines = monitor.lines().await;
    let sent = sent_naming(&lines, &key_id);
    assert_eq!(sent.len(), 1, "one call names the key: {sent:#?}");
    assert!(sent[0].contains("\"FCALL\""), "{sent:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains(" lua] ") && l.contains(&format!(":k:{key_id}"))),
        "the script read the key record"
    );
    assert_eq!(balance(&server, "acme").await, (9, 0, 1));

    // The replay of the same request is the key's second miss: by key again, answered
    // from the idempotency record the first call wrote (charged once), and the key
    // enters the identity cache.
    let again = check(key.clone(), "m-1").await;
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(again.remaining(), Some("9"));
    let lines = monitor.lines().await;
    assert_eq!(
        sent_naming(&lines, &key_id).len(),
        2,
        "a miss sends the key id"
    );
    // Cached now: the next replay goes by account, answered from the same record.
    let third = check(key.clone(), "m-1").await;
    assert_eq!(third.status, 200, "{third:?}");
    assert_eq!(third.remaining(), Some("9"));
    let lines = monitor.lines().await;
    assert_eq!(
        sent_naming(&lines, &key_id).len(),
        2,
        "a cache hit sends no key id"
    );
    assert_eq!(balance(&server, "acme").await, (9, 0, 1));

    // A hold route on a cache miss: the authorize script resolves the key the same way.
    let beta = seed(&server, "beta", 200).await;
    let beta_id = beta.split('_').nth(1).expect("key id").to_owned();
    let monitor = common::Monitor::start(&redis);
    let hold = ocr_check(&mut Checker::new(&server).await, &beta, "ocr-m-1").await;
    assert_eq!(hold.status, 200, "{hold:?}");
    assert_eq!(hold.header("x-tollgate-account"), Some("beta"));
    assert!(hold.header("x-tollgate-hold-id").is_some(), "{hold:?}");
    let lines = monitor.lines().await;
    let sent = sent_naming(&lines, &beta_id);
    assert_eq!(sent.len(), 1, "one call names the key: {sent:#?}");
    assert!(sent[0].contains("\"FCALL\""), "{sent:?}");
    assert_eq!(balance(&server, "beta").await, (150, 50, 0));

    // Another sidecar has not seen the key: its keyed call finds the same record.
    let other = common::TestServer::start(esign_replay_config(&redis.url()), Clock::Redis).await;
    let h = headers(&key, "m-1");
    let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let replayed = Checker::new(&other)
        .await
        .check("POST", "/v1/envelopes", &h)
        .await;
    assert_eq!(replayed.status, 200, "{replayed:?}");
    assert_eq!(balance(&server, "acme").await, (9, 0, 1), "charged once");

    // The right key id with another secret is unknown: nothing charged, nothing written.
    let events = events_len(&server).await;
    let forged = format!("tg_{key_id}_{}", "0".repeat(64));
    let denied = check(forged, "m-2").await;
    assert_eq!(denied.status, 401, "{denied:?}");
    assert_eq!(denied.body["error"], "unknown_api_key");

    // Revoked: a sidecar that never saw the key learns it from the keyed call.
    server
        .admin()
        .await
        .revoke_api_key(pb::RevokeApiKeyRequest {
            key_id: key_id.clone(),
        })
        .await
        .expect("revoke");
    let fresh = common::TestServer::start(esign_config(&redis.url()), Clock::Redis).await;
    let h = headers(&key, "m-3");
    let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let revoked = Checker::new(&fresh)
        .await
        .check("POST", "/v1/envelopes", &h)
        .await;
    assert_eq!(revoked.status, 403, "{revoked:?}");
    assert_eq!(revoked.body["error"], "revoked_api_key");
    assert_eq!(balance(&server, "acme").await, (9, 0, 1));
    assert_eq!(
        events_len(&server).await,
        events,
        "refused keys write nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_are_settled_by_the_access_log_and_over_http() {
    let redis = common::RedisServer::start();
    let server = common::TestServer::start(esign_replay_config(&redis.url()), Clock::Redis).await;
    let mut c = Checker::new(&server).await;
    let key = seed(&server, "acme", 200).await;
    let hold = |answer: &Answer| {
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(answer.header("x-tollgate-charged"), Some("50"));
        (
            answer
                .header("x-tollgate-hold-id")
                .expect("hold id")
                .to_owned(),
            answer.metadata.clone().expect("hold metadata"),
        )
    };
    let (h1, m1) = hold(&ocr_check(&mut c, &key, "ocr-1").await);
    let (_, m2) = hold(&ocr_check(&mut c, &key, "ocr-2").await);
    let (h3, _) = hold(&ocr_check(&mut c, &key, "ocr-3").await);
    // A replayed check returns the same hold.
    assert_eq!(hold(&ocr_check(&mut c, &key, "ocr-1").await).0, h1);
    assert_eq!(balance(&server, "acme").await, (50, 150, 0));

    // Access log: h1 answered 200 with 4 pages → 8 captured; h2 answered 502 → released;
    // an entry without a hold is ignored; a duplicate entry changes nothing. The hold is
    // named by the Check answer's dynamic metadata, as Envoy logs it: an entry whose only
    // hold id is a request header (a client's own, on a request that was denied) is
    // ignored, so h3 stays held.
    let entry = |metadata: Option<&envoy_types::pb::google::protobuf::Struct>,
                 status: u32,
                 units: Option<&str>| {
        let mut request_headers = HashMap::new();
        request_headers.insert("x-tollgate-hold-id".to_owned(), h3.clone());
        let mut response_headers = HashMap::new();
        if let Some(u) = units {
            response_headers.insert("x-tollgate-units".to_owned(), u.to_owned());
        }
        let common_properties = metadata.map(|m| AccessLogCommon {
            metadata: Some(envoy_types::pb::envoy::config::core::v3::Metadata {
                filter_metadata: HashMap::from([(
                    "envoy.filters.http.ext_authz".to_owned(),
                    m.clone(),
                )]),
                ..Default::default()
            }),
            ..Default::default()
        });
        HttpAccessLogEntry {
            common_properties,
            request: Some(HttpRequestProperties {
                request_headers,
                ..Default::default()
            }),
            response: Some(HttpResponseProperties {
                response_code: Some(UInt32Value { value: status }),
                response_headers,
                ..Default::default()
            }),
            ..Default::default()
        }
    };
    let message = StreamAccessLogsMessage {
        identifier: None,
        log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries {
            log_entry: vec![
                entry(Some(&m1), 200, Some("4")),
                entry(Some(&m2), 502, Some("4")),
                entry(None, 503, Some("4")),
                entry(Some(&m1), 200, Some("4")),
            ],
        })),
    };
    let mut logs = AccessLogServiceClient::new(server.channel().await);
    logs.stream_access_logs(tokio_stream_once(message))
        .await
        .expect("stream");
    wait_balance(&server, "acme", (50 + 42 + 50, 50, 8)).await;

    // Over HTTP: the upstream captures h3 with the amount it decides.
    let path = format!("/v1/holds/{h3}/capture");
    let r = http(server.http_addr, "POST", &path, &[], r#"{"amount": 7}"#).await;
    assert_eq!(r.status, 401, "service token required: {r:?}");
    let auth = format!("Bearer {}", common::SERVICE_TOKEN);
    let r = http(
        server.http_addr,
        "POST",
        &path,
        &[("authorization", &auth)],
        r#"{"amount": 7}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["captured"], 7);
    // The capture's charge id (its event id), which a later refund takes.
    let charge_id = r.json()["charge_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no charge_id: {r:?}"))
        .to_owned();
    assert_eq!(r.json()["event_id"], charge_id.as_str());
    let retry = http(
        server.http_addr,
        "POST",
        &path,
        &[("authorization", &auth)],
        r#"{"amount": 7}"#,
    )
    .await;
    assert_eq!(retry.json()["replayed"], true, "{retry:?}");
    assert_eq!(retry.json()["charge_id"], charge_id.as_str(), "{retry:?}");
    let release = http(
        server.http_addr,
        "POST",
        &format!("/v1/holds/{h3}/release"),
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(release.status, 409, "{release:?}");
    // Numbers as numbers, as in the success body.
    assert_eq!(
        release.json(),
        serde_json::json!({ "error": "hold_ended", "ended": "captured", "captured": 7 }),
        "{release:?}"
    );
    let bad = http(
        server.http_addr,
        "POST",
        &path,
        &[("authorization", &auth)],
        r#"{"amount": "seven"}"#,
    )
    .await;
    assert_eq!(bad.status, 400, "{bad:?}");
    assert_eq!(bad.json()["fields"][0]["field"], "amount");
    assert_eq!(balance(&server, "acme").await, (185, 0, 15));
    // The upstream's work failed after all: it refunds the capture by its charge id.
    let refund = server
        .metering()
        .await
        .refund(pb::RefundRequest {
            charge_id,
            amount: 7,
            idempotency_key: "h3-failed".into(),
            ..Default::default()
        })
        .await
        .expect("refund by the HTTP capture's charge id")
        .into_inner();
    assert_eq!(refund.refunded, 7);
    assert_eq!(balance(&server, "acme").await, (192, 0, 15));

    // A hold placed by an older tollgate (no capture terms in its metadata) whose
    // operation the price book no longer has (renamed by a reload while it was open): 2xx
    // captures everything held, whatever units the upstream reported.
    let (h4, _) = hold(&ocr_check(&mut c, &key, "ocr-4").await);
    let renamed = tollgate::gateway::access_log::hold_metadata(&tollgate::gateway::Allowed {
        hold_id: Some(h4),
        operation: Some("ocr.pages.v0".into()),
        charged: 50,
        ..Default::default()
    })
    .expect("metadata");
    let message = StreamAccessLogsMessage {
        identifier: None,
        log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries {
            log_entry: vec![entry(Some(&renamed), 200, Some("3"))],
        })),
    };
    logs.stream_access_logs(tokio_stream_once(message))
        .await
        .expect("stream");
    wait_balance(&server, "acme", (142, 0, 65)).await;
}

/// The hold id a Check answer placed (or replayed), and its dynamic metadata.
fn ocr_hold_of(answer: &Answer) -> (String, envoy_types::pb::google::protobuf::Struct) {
    assert_eq!(answer.status, 200, "{answer:?}");
    (
        answer
            .header("x-tollgate-hold-id")
            .expect("hold id")
            .to_owned(),
        answer.metadata.clone().expect("hold metadata"),
    )
}

/// With `gateway.request_id_replay`, a request retried (same request id) after its hold
/// was released (the upstream failed; the access log, or the upstream over HTTP, released
/// it) is charged afresh: a new hold. It used to replay "allowed, hold h1", and the
/// retry's settlement met an ended hold: the work it did was free. Retried while the hold
/// is open, or after it was captured, it is the same hold, charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_retried_after_its_hold_was_released_is_charged_afresh() {
    let redis = common::RedisServer::start();
    let server = common::TestServer::start(esign_replay_config(&redis.url()), Clock::Redis).await;
    let mut c = Checker::new(&server).await;
    let key = seed(&server, "acme", 200).await;
    let mut logs = AccessLogServiceClient::new(server.channel().await);

    // Through the access log: attempt 1 answered 502, its hold is released.
    let (h1, m1) = ocr_hold_of(&ocr_check(&mut c, &key, "retry-1").await);
    assert_eq!(ocr_hold_of(&ocr_check(&mut c, &key, "retry-1").await).0, h1);
    logs.stream_access_logs(tokio_stream_once(access_log_message(vec![
        access_log_entry(&m1, 502, "4"),
    ])))
    .await
    .expect("stream");
    wait_balance(&server, "acme", (200, 0, 0)).await;
    // The retry: a hold of its own, not h1.
    let (h2, m2) = ocr_hold_of(&ocr_check(&mut c, &key, "retry-1").await);
    assert_ne!(h2, h1, "the retry was handed the released hold");
    assert_eq!(balance(&server, "acme").await, (150, 50, 0));
    // It answered 200 with 4 pages: 8 captured.
    logs.stream_access_logs(tokio_stream_once(access_log_message(vec![
        access_log_entry(&m2, 200, "4"),
    ])))
    .await
    .expect("stream");
    wait_balance(&server, "acme", (192, 0, 8)).await;
    // Retried once more after that capture: replayed, nothing more taken.
    assert_eq!(ocr_hold_of(&ocr_check(&mut c, &key, "retry-1").await).0, h2);
    assert_eq!(balance(&server, "acme").await, (192, 0, 8));

    // Over HTTP: the upstream releases; the retry is a new hold, which it captures.
    let auth = format!("Bearer {}", common::SERVICE_TOKEN);
    let (h3, _) = ocr_hold_of(&ocr_check(&mut c, &key, "retry-2").await);
    let r = http(
        server.http_addr,
        "POST",
        &format!("/v1/holds/{h3}/release"),
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(balance(&server, "acme").await, (192, 0, 8));
    let (h4, _) = ocr_hold_of(&ocr_check(&mut c, &key, "retry-2").await);
    assert_ne!(h4, h3, "the retry was handed the released hold");
    assert_eq!(balance(&server, "acme").await, (142, 50, 8));
    let r = http(
        server.http_addr,
        "POST",
        &format!("/v1/holds/{h4}/capture"),
        &[("authorization", &auth)],
        r#"{"amount": 6}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(balance(&server, "acme").await, (186, 0, 14));

    // The release itself forgets the check's record: a retry after the ended hold's own
    // record is gone (past ledger.hold_retention_secs, which a hold that expired keeps to,
    // while the check's record lives up to 1.5 idempotency windows) is charged afresh too.
    let (h5, m5) = ocr_hold_of(&ocr_check(&mut c, &key, "retry-3").await);
    logs.stream_access_logs(tokio_stream_once(access_log_message(vec![
        access_log_entry(&m5, 503, "4"),
    ])))
    .await
    .expect("stream");
    wait_balance(&server, "acme", (186, 0, 14)).await;
    let shards = server.ledger.shards();
    let record = format!(
        "{}:h:{h5}",
        shards.tag(shards.of_hold_id(&h5).expect("a hold id"))
    );
    let mut con = redis.client().get_connection().expect("redis");
    let _: () = redis::cmd("DEL").arg(&record).query(&mut con).expect("del");
    let (h6, _) = ocr_hold_of(&ocr_check(&mut c, &key, "retry-3").await);
    assert_ne!(h6, h5, "the retry was handed the released hold");
    assert_eq!(balance(&server, "acme").await, (136, 50, 14));
}

/// Only a request's final access-log entry settles its hold. Envoy also logs a request
/// before it ends (`access_log_flush_interval`: `DownstreamPeriodic`; a router
/// `upstream_log`: `UpstreamEnd`, one per attempt), each entry carrying the Check answer's
/// metadata; the first such entry used to settle the hold by figures that were not the
/// call's last word, and the final one then met `HOLD_ENDED`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_final_access_log_entry_settles_a_hold() {
    use envoy_types::pb::envoy::data::accesslog::v3::AccessLogType;
    let redis = common::RedisServer::start();
    let server = common::TestServer::start(esign_replay_config(&redis.url()), Clock::Redis).await;
    let mut c = Checker::new(&server).await;
    let key = seed(&server, "acme", 200).await;
    let mut logs = AccessLogServiceClient::new(server.channel().await);
    let typed = |mut entry: HttpAccessLogEntry, t: AccessLogType| {
        if let Some(common) = entry.common_properties.as_mut() {
            common.access_log_type = t as i32;
        }
        entry
    };

    // A long call flushed twice on its way (1 page, then 2 so far), then ended with 4
    // pages: 8 captured, not 2.
    let (_, m1) = ocr_hold_of(&ocr_check(&mut c, &key, "final-1").await);
    logs.stream_access_logs(tokio_stream_once(access_log_message(vec![
        typed(
            access_log_entry(&m1, 200, "1"),
            AccessLogType::DownstreamPeriodic,
        ),
        typed(access_log_entry(&m1, 200, "2"), AccessLogType::UpstreamEnd),
        typed(
            access_log_entry(&m1, 200, "4"),
            AccessLogType::DownstreamEnd,
        ),
    ])))
    .await
    .expect("stream");
    wait_balance(&server, "acme", (192, 0, 8)).await;

    // A streaming gRPC call: its periodic entry is a 200 with no trailers yet; it ends
    // with grpc-status 13, which releases the hold. An older Envoy sends no type: its
    // final entry settles as before.
    let (_, m2) = ocr_hold_of(&ocr_check(&mut c, &key, "final-2").await);
    let mut failed = typed(access_log_entry(&m2, 200, "4"), AccessLogType::NotSet);
    if let Some(response) = failed.response.as_mut() {
        response
            .response_trailers
            .insert("grpc-status".into(), "13".into());
    }
    logs.stream_access_logs(tokio_stream_once(access_log_message(vec![
        typed(
            access_log_entry(&m2, 200, "4"),
            AccessLogType::DownstreamPeriodic,
        ),
        typed(
            access_log_entry(&m2, 101, "4"),
            AccessLogType::DownstreamTunnelSuccessfullyEstablished,
        ),
        failed,
    ])))
    .await
    .expect("stream");
    wait_balance(&server, "acme", (192, 0, 8)).await;
}

/// As above for a hold that nobody settled and that expired by `on_expiry = "release"`:
/// a retry after its deadline is a new hold (whether the hold was ended before the retry
/// or by it), not the expired one that settles nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_retried_after_its_hold_expired_uncharged_is_charged_afresh() {
    let redis = common::RedisServer::start();
    let book = replace(
        &replace(
            &example("pricebook-esign.toml"),
            "hold_ttl_ms = 60000",
            "hold_ttl_ms = 300",
        ),
        "on_expiry = \"capture\"",
        "on_expiry = \"release\"",
    );
    let mut config = esign_config_from(&redis.url(), &book);
    config.gateway.request_id_replay = true;
    // The ledger's clock is the test's: it moves past h1's deadline and then stands still,
    // so h2 cannot expire (300 ms) before the balance is read, however slow the machine.
    let t0 = 1_795_428_000_000;
    let (clock, now) = Clock::manual(t0);
    let server = common::TestServer::start(config, clock).await;
    let mut c = Checker::new(&server).await;
    let key = seed(&server, "acme", 200).await;
    let (h1, _) = ocr_hold_of(&ocr_check(&mut c, &key, "late-1").await);
    now.store(t0 + 1_000, std::sync::atomic::Ordering::SeqCst);
    let (h2, _) = ocr_hold_of(&ocr_check(&mut c, &key, "late-1").await);
    assert_ne!(h2, h1, "the retry was handed the expired hold");
    assert_eq!(balance(&server, "acme").await, (150, 50, 0));
}

/// Envoy flushes its access log in messages of many entries. When it goes away (a
/// restart: its connection cut) while tollgate is still settling one, every entry of
/// that message is settled all the same. hyper drops the stream's handler with the
/// connection, and the handler used to settle in its own future: the rest of the message
/// was abandoned, those holds left to their on_expiry (`release` here: answered 200,
/// they were free).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_entries_received_before_envoy_goes_away_are_all_settled() {
    // Enough that settling them takes far longer than noticing the first and cutting.
    const HOLDS: i64 = 300;
    let redis = common::RedisServer::start();
    let server = common::TestServer::start(esign_config(&redis.url()), Clock::Redis).await;
    let credits = 1_000_000;
    let key = seed(&server, "acme", credits).await;
    let channel = server.channel().await;
    let mut holds = Vec::new();
    for i in 0..HOLDS {
        holds.push(ocr_hold(channel.clone(), &key, &format!("ocr-{i}")).await);
    }
    // ocr.pages holds 50; answered 200 with 1 page it captures 2 and releases the rest.
    assert_eq!(
        balance(&server, "acme").await,
        (credits - 50 * HOLDS, 50 * HOLDS, 0)
    );

    // "Envoy": one flush of every entry, on a connection of its own through a proxy, the
    // stream left open.
    let proxy = common::proxy::FaultProxy::start(server.grpc_addr).await;
    let envoy = Channel::from_shared(format!("http://{}", proxy.addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect through the proxy");
    let (send, receive) = tokio::sync::mpsc::channel(1);
    send.send(access_log_message(
        holds
            .iter()
            .map(|h| access_log_entry(h, 200, "1"))
            .collect(),
    ))
    .await
    .expect("queue the flush");
    let stream = tokio::spawn(async move {
        AccessLogServiceClient::new(envoy)
            .stream_access_logs(tokio_stream::wrappers::ReceiverStream::new(receive))
            .await
    });
    // Envoy goes away once tollgate has the message and is settling it (a hold settled).
    let deadline = Instant::now() + common::gateways::REQUEST_TIMEOUT;
    while balance(&server, "acme").await.1 == 50 * HOLDS {
        assert!(
            Instant::now() < deadline,
            "no entry of the flush was ever settled"
        );
        tokio::task::yield_now().await;
    }
    proxy.cut();
    let open_at_the_cut = balance(&server, "acme").await.1 / 50;
    eprintln!("{open_at_the_cut} of {HOLDS} holds still open when the connection was cut");
    drop(send);
    stream.abort();

    wait_balance(&server, "acme", (credits - 2 * HOLDS, 0, 2 * HOLDS)).await;
    server.stop().await;
}

/// A Check whose message does not decode (a path that is not UTF-8) is INVALID_ARGUMENT
/// naming the field by its path: tonic answered INTERNAL, logged as a server fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_that_does_not_decode_is_an_invalid_argument() {
    use prost::Message;
    let redis = common::RedisServer::start();
    let server = common::TestServer::start(esign_config(&redis.url()), Clock::Redis).await;
    let marker = "/v1/ocr-MARKER";
    let request = CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "POST".into(),
                    path: marker.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    // The encoded request with the path's bytes made not UTF-8 (the same length), sent as
    // field 1 (CheckRequest.attributes) holding those bytes.
    let mut attributes = request.attributes.expect("attributes").encode_to_vec();
    let at = attributes
        .windows(marker.len())
        .position(|w| w == marker.as_bytes())
        .expect("the path in the encoding");
    attributes[at + marker.len() - 2] = 0xff;
    let status = common::raw_unary_error(
        &server,
        "/envoy.service.auth.v3.Authorization/Check",
        common::RawField1 { field1: attributes },
    )
    .await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let fields: Vec<String> = tonic_types::StatusExt::get_details_bad_request(&status)
        .expect("BadRequest")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert_eq!(fields, ["attributes.request.http.path"], "{status:?}");
}

/// A Check without `attributes.request.http` (no attributes, no request, no http) is
/// INVALID_ARGUMENT with a BadRequest naming that field, as every INVALID_ARGUMENT: it
/// was a plain status naming the field only in its message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_without_its_http_request_names_the_field() {
    let redis = common::RedisServer::start();
    let server = common::TestServer::start(esign_config(&redis.url()), Clock::Redis).await;
    let mut c = Checker::new(&server).await;
    let events = events_len(&server).await;
    let no_http = AttributeContext {
        request: Some(Request::default()),
        ..Default::default()
    };
    for attributes in [None, Some(AttributeContext::default()), Some(no_http)] {
        let status = c
            .client
            .check(CheckRequest {
                attributes: attributes.clone(),
            })
            .await
            .expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        let fields: Vec<String> = tonic_types::StatusExt::get_details_bad_request(&status)
            .unwrap_or_else(|| panic!("BadRequest in {status:?} ({attributes:?})"))
            .field_violations
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(fields, ["attributes.request.http"], "{status:?}");
    }
    assert_eq!(events_len(&server).await, events, "no ledger event");
}

/// A settlement request (path, headers, body) and the fields its 400 must name.
type SettleCase<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str, &'a [&'a str]);

/// The HTTP hold settlement names every bad field (the header as `idempotency-key`)
/// before anything reaches Redis, and changes nothing: an overlong hold id is not taken
/// for an unknown hold nor blamed on the key derived from it, and a key header that is
/// present but not a valid key is refused rather than replaced by the derived key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_hold_settlement_names_the_bad_field_and_changes_nothing() {
    let redis = common::RedisServer::start();
    let server = common::TestServer::start(esign_config(&redis.url()), Clock::Redis).await;
    let mut c = Checker::new(&server).await;
    let key = seed(&server, "acme", 200).await;
    let answer = ocr_check(&mut c, &key, "ocr-1").await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let hold = answer
        .header("x-tollgate-hold-id")
        .expect("hold id")
        .to_owned();
    assert_eq!(balance(&server, "acme").await, (150, 50, 0));
    let events = events_len(&server).await;

    let auth = format!("Bearer {}", common::SERVICE_TOKEN);
    let fields = |r: &common::gateways::HttpResponse| -> Vec<String> {
        assert_eq!(r.status, 400, "{r:?}");
        assert_eq!(r.json()["error"], "invalid_argument", "{r:?}");
        let mut names: Vec<String> = r.json()["fields"]
            .as_array()
            .unwrap_or_else(|| panic!("fields in {r:?}"))
            .iter()
            .map(|f| f["field"].as_str().unwrap_or_default().to_owned())
            .collect();
        names.sort();
        names
    };
    let capture = format!("/v1/holds/{hold}/capture");
    let long_digits = format!("/v1/holds/h0-{}/capture", "9".repeat(200));
    let seventeen = format!("/v1/holds/h0-{}/release", "1".repeat(17));
    let long_key = "k".repeat(129);
    let release = format!("/v1/holds/{hold}/release");
    let cases: [SettleCase; 16] = [
        // No idempotency-key header: the bad hold id is named, not the derived key.
        (&long_digits, vec![], "", &["hold_id"]),
        (&seventeen, vec![], "", &["hold_id"]),
        ("/v1/holds/h99-1/capture", vec![], "", &["hold_id"]),
        // A header that is present is the key, or a bad field named as the header.
        (
            &capture,
            vec![("idempotency-key", "")],
            "",
            &["idempotency-key"],
        ),
        (
            &capture,
            vec![("idempotency-key", "   ")],
            "",
            &["idempotency-key"],
        ),
        (
            &capture,
            vec![("idempotency-key", "a b")],
            "",
            &["idempotency-key"],
        ),
        (
            &capture,
            vec![("idempotency-key", "clé-1")],
            "",
            &["idempotency-key"],
        ),
        (
            &capture,
            vec![("idempotency-key", &long_key)],
            "",
            &["idempotency-key"],
        ),
        // Every bad field at once.
        (
            &long_digits,
            vec![("idempotency-key", "clé-2")],
            r#"{"amount": "seven"}"#,
            &["amount", "hold_id", "idempotency-key"],
        ),
        // An amount out of range is named with the other fields, not left to the ledger
        // (which named it only once the header was fixed).
        (
            &capture,
            vec![("idempotency-key", "clé-3")],
            r#"{"amount": -1}"#,
            &["amount", "idempotency-key"],
        ),
        (
            &capture,
            vec![("idempotency-key", "a b")],
            r#"{"amount": 9007199254740992}"#,
            &["amount", "idempotency-key"],
        ),
        // The body holds `amount` alone, once: a misspelled field was ignored (so the
        // capture took the whole hold) and a repeated one taken at its last value.
        (&capture, vec![], r#"{"amout": 3}"#, &["amout"]),
        (
            &capture,
            vec![],
            r#"{"amount": 3, "amount": 50}"#,
            &["amount"],
        ),
        (
            &capture,
            vec![],
            r#"{"amount": 3, "montant é": 3}"#,
            &["body"],
        ),
        (&release, vec![], r#"{"reason": "done"}"#, &["reason"]),
        (&capture, vec![], "[3]", &["body"]),
    ];
    for (path, headers, body, want) in cases {
        let mut headers = headers;
        headers.push(("authorization", &auth));
        let r = http(server.http_addr, "POST", path, &headers, body).await;
        assert_eq!(fields(&r), want.to_vec(), "{path} {headers:?}");
    }
    let r = http(
        server.http_addr,
        "POST",
        &format!("/v1/holds/{hold}/release"),
        &[("authorization", &auth), ("idempotency-key", "r-1")],
        r#"{"amount": 3}"#,
    )
    .await;
    assert_eq!(fields(&r), ["amount"]);
    // A path segment that is not UTF-8 once decoded: the token is checked first, then
    // a JSON 400 names the segment (axum's own answer was a text/plain 400 to anyone).
    let r = http(server.http_addr, "POST", "/v1/holds/%FF/capture", &[], "").await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.json()["error"], "unauthenticated", "{r:?}");
    let r = http(
        server.http_addr,
        "POST",
        "/v1/holds/%FF/capture",
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(fields(&r), ["hold_id"]);
    let r = http(
        server.http_addr,
        "POST",
        &format!("/v1/holds/{hold}/%FF"),
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(fields(&r), ["action"]);
    assert_eq!(balance(&server, "acme").await, (150, 50, 0), "still held");
    assert_eq!(events_len(&server).await, events, "no ledger event");

    // The hold is still open, and none of the refused keys was remembered.
    let r = http(
        server.http_addr,
        "POST",
        &capture,
        &[("authorization", &auth), ("idempotency-key", "r-1")],
        r#"{"amount": 5}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        (
            r.json()["captured"].as_i64(),
            r.json()["replayed"].as_bool()
        ),
        (Some(5), Some(false))
    );
    assert_eq!(balance(&server, "acme").await, (195, 0, 5));
}

/// The access log settles holds, so on a gRPC port other hosts can reach it takes a
/// stream only with the service token (or the gateway shared secret, when set).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_needs_the_service_token_on_a_reachable_port() {
    let redis = common::RedisServer::start();
    let server =
        common::TestServer::start_on_all_interfaces(esign_config(&redis.url()), Clock::Redis).await;
    let mut c = Checker::new(&server).await;
    let key = seed(&server, "acme", 100).await;
    let answer = ocr_check(&mut c, &key, "ocr-1").await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let metadata = answer.metadata.expect("hold metadata");
    assert_eq!(balance(&server, "acme").await, (50, 50, 0));
    let release = || StreamAccessLogsMessage {
        identifier: None,
        log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries {
            log_entry: vec![HttpAccessLogEntry {
                common_properties: Some(AccessLogCommon {
                    metadata: Some(envoy_types::pb::envoy::config::core::v3::Metadata {
                        filter_metadata: HashMap::from([(
                            "envoy.filters.http.ext_authz".to_owned(),
                            metadata.clone(),
                        )]),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                response: Some(HttpResponseProperties {
                    response_code: Some(UInt32Value { value: 500 }),
                    ..Default::default()
                }),
                ..Default::default()
            }],
        })),
    };
    let mut logs = AccessLogServiceClient::new(server.channel().await);
    let refused = logs
        .stream_access_logs(tokio_stream_once(release()))
        .await
        .expect_err("no token");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert_eq!(balance(&server, "acme").await, (50, 50, 0), "still held");

    let mut request = tonic::Request::new(tokio_stream_once(release()));
    let bearer = format!("Bearer {}", common::SERVICE_TOKEN);
    request
        .metadata_mut()
        .insert("authorization", bearer.parse().expect("metadata value"));
    logs.stream_access_logs(request)
        .await
        .expect("with the token");
    wait_balance(&server, "acme", (100, 0, 0)).await;
}

async fn ocr_check(c: &mut Checker, key: &str, request_id: &str) -> Answer {
    c.check(
        "POST",
        "/v1/documents/d/ocr",
        &[("x-api-key", key), ("x-request-id", request_id)],
    )
    .await
}

/// A one-message request stream.
fn tokio_stream_once<T: Send + 'static>(
    item: T,
) -> impl tokio_stream::Stream<Item = T> + Send + 'static {
    tokio_stream::iter(vec![item])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_auth_reads_the_original_request_and_has_an_nginx_mode() {
    let redis = common::RedisServer::start();
    let mut config = esign_config(&redis.url());
    config.gateway.shared_secret = "s3cret".into();
    let server = common::TestServer::start(config, Clock::Redis).await;
    let key = seed(&server, "acme", 10).await;
    let addr = server.http_addr;
    let secret = ("x-tollgate-gateway-secret", "s3cret");

    // Traefik/Kong style.
    let r = http(
        addr,
        "GET",
        "/v1/forward-auth",
        &[
            secret,
            ("x-forwarded-method", "POST"),
            ("x-forwarded-uri", "/v1/envelopes?x=1"),
            ("x-forwarded-host", "api.example.com"),
            ("x-api-key", &key),
        ],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-tollgate-account"), Some("acme"));
    assert_eq!(r.header("x-credits-remaining"), Some("9"));

    // A client's x-original-* passed on by Traefik, or x-forwarded-* passed on by nginx,
    // disagreeing with what the proxy set: refused, naming the header, nothing charged.
    for (header, value) in [("x-original-method", "GET"), ("x-original-uri", "/v1/")] {
        let r = http(
            addr,
            "GET",
            "/v1/forward-auth",
            &[
                secret,
                ("x-forwarded-method", "POST"),
                ("x-forwarded-uri", "/v1/envelopes"),
                (header, value),
                ("x-api-key", &key),
            ],
            "",
        )
        .await;
        assert_eq!(r.status, 400, "{r:?}");
        assert_eq!(r.json()["error"], "bad_header", "{r:?}");
        let named = r.json()["header"].as_str().unwrap_or_default().to_owned();
        assert_eq!(named, header.replace("original", "forwarded"), "{r:?}");
    }
    // A pricing header sent twice is read as both values, a bad header: not priced by the
    // first while the upstream may read the last.
    let r = http(
        addr,
        "GET",
        "/v1/forward-auth",
        &[
            secret,
            ("x-forwarded-method", "POST"),
            ("x-forwarded-uri", "/v1/envelopes"),
            ("x-api-key", &key),
            ("x-signature-method", "aadhaar"),
            ("x-signers", "1"),
            ("x-signers", "50"),
        ],
        "",
    )
    .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.json()["header"], "x-signers", "{r:?}");
    assert_eq!(balance(&server, "acme").await, (9, 0, 1));

    // nginx style, and nginx mode: a 402 becomes 403 with the real answer in headers.
    let nginx = |uri: &'static str| {
        [
            secret,
            ("x-original-method", "POST"),
            ("x-original-uri", uri),
            ("x-api-key", key.as_str()),
        ]
    };
    let r = http(
        addr,
        "GET",
        "/v1/forward-auth",
        &nginx("/v1/documents/a/ocr"),
        "",
    )
    .await;
    assert_eq!(r.status, 402, "{r:?}");
    assert_eq!(r.json()["error"], "insufficient_credits");
    let r = http(
        addr,
        "GET",
        "/v1/forward-auth?mode=nginx",
        &nginx("/v1/documents/a/ocr"),
        "",
    )
    .await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.header("x-tollgate-status"), Some("402"));
    assert_eq!(r.header("x-tollgate-reason"), Some("insufficient_credits"));
    let body: serde_json::Value =
        serde_json::from_str(r.header("x-tollgate-body").expect("body header")).unwrap();
    assert_eq!(body["required"], 50);

    // Without the configured shared secret: refused before anything else.
    let r = http(
        addr,
        "GET",
        "/v1/forward-auth",
        &[
            ("x-forwarded-method", "POST"),
            ("x-forwarded-uri", "/v1/envelopes"),
            ("x-api-key", &key),
        ],
        "",
    )
    .await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.json()["error"], "untrusted_gateway");
    let mut c = Checker::new(&server).await;
    let d = c
        .check("POST", "/v1/envelopes", &[("x-api-key", &key)])
        .await;
    assert_eq!(
        (d.status, d.body["error"].as_str()),
        (403, Some("untrusted_gateway"))
    );
    assert_eq!(balance(&server, "acme").await, (9, 0, 1));
}

/// A proxy header that is present decides, whatever bytes it holds: nginx copies the raw
/// request line into x-original-uri, so a client's `POST /v1/documents/é/ocr` arrives as
/// UTF-8. It used to be taken for a missing header and the check priced tollgate's own
/// request (`/v1/forward-auth`): 403 no_route here, or free under a free default or
/// catch-all. Bytes above ASCII are percent-encoded and routed; control characters, a
/// method or host that is not ASCII are a 400 naming the header; other headers that are
/// not ASCII are read as they are (a bad units header, not the default units).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_auth_prices_the_original_request_whatever_bytes_it_holds() {
    let redis = common::RedisServer::start();
    let server = common::TestServer::start(esign_config(&redis.url()), Clock::Redis).await;
    let key = seed(&server, "acme", 500).await;
    let addr = server.http_addr;
    let nginx_headers = |uri: &'static str| {
        vec![
            ("x-original-method", "POST"),
            ("x-original-uri", uri),
            ("x-api-key", key.as_str()),
        ]
    };

    // Raw UTF-8 in the URI: routed as its percent-encoded form, charged (a hold) as the
    // `/v1/documents/{id}/ocr` route says, by nginx (both modes) and Traefik headers.
    let traefik = vec![
        ("x-forwarded-method", "POST"),
        ("x-forwarded-uri", "/v1/documents/ü/ocr?lang=de"),
        ("x-api-key", key.as_str()),
    ];
    for (path, headers) in [
        ("/v1/forward-auth", nginx_headers("/v1/documents/é/ocr")),
        (
            "/v1/forward-auth?mode=nginx",
            nginx_headers("/v1/documents/é/ocr"),
        ),
        ("/v1/forward-auth", traefik),
    ] {
        let r = http(addr, "GET", path, &headers, "").await;
        assert_eq!(r.status, 200, "{path} {headers:?}: {r:?}");
        assert_eq!(r.header("x-tollgate-operation"), Some("ocr.pages"), "{r:?}");
        assert_eq!(r.header("x-tollgate-charged"), Some("50"), "{r:?}");
        assert!(r.header("x-tollgate-hold-id").is_some(), "{r:?}");
    }
    assert_eq!(balance(&server, "acme").await, (350, 150, 0));
    let events = events_len(&server).await;

    // Present but unusable: 400 bad_header naming the header (in nginx mode 403 with the
    // real status and body in headers), nothing charged. Each of these used to be allowed:
    // the method fell back to this GET (a free `GET /v1/` route), the host to `host`, the
    // tab went into the route, the units header counted as absent (1 signer), the variant
    // header too (no surcharge).
    let cases: [(Vec<(&str, &str)>, &str); 6] = [
        (
            vec![
                ("x-original-method", "PÖST"),
                ("x-original-uri", "/v1/envelopes"),
            ],
            "x-original-method",
        ),
        (
            vec![
                ("x-forwarded-method", "POST"),
                ("x-forwarded-uri", "/v1/envelopes"),
                ("x-forwarded-host", "ápi.example.com"),
            ],
            "x-forwarded-host",
        ),
        (
            vec![
                ("x-original-method", "POST"),
                ("x-original-uri", "/v1/documents/a\tb/ocr"),
            ],
            "x-original-uri",
        ),
        (
            vec![
                ("x-forwarded-method", "POST"),
                ("x-forwarded-uri", "/v1/documents/a\tb/ocr"),
            ],
            "x-forwarded-uri",
        ),
        (
            vec![
                ("x-original-method", "POST"),
                ("x-original-uri", "/v1/envelopes"),
                ("x-signature-method", "aadhaar"),
                ("x-signers", "5é"),
            ],
            "x-signers",
        ),
        (
            vec![
                ("x-original-method", "POST"),
                ("x-original-uri", "/v1/envelopes"),
                ("x-signature-method", "dsç"),
            ],
            "x-signature-method",
        ),
    ];
    for (headers, named) in cases {
        let mut headers = headers;
        headers.push(("x-api-key", key.as_str()));
        let r = http(addr, "GET", "/v1/forward-auth", &headers, "").await;
        assert_eq!(r.status, 400, "{headers:?}: {r:?}");
        assert_eq!(r.json()["error"], "bad_header", "{r:?}");
        assert_eq!(r.json()["header"], named, "{r:?}");
        let r = http(addr, "GET", "/v1/forward-auth?mode=nginx", &headers, "").await;
        assert_eq!(r.status, 403, "{headers:?}: {r:?}");
        assert_eq!(r.header("x-tollgate-status"), Some("400"), "{r:?}");
        assert_eq!(r.header("x-tollgate-reason"), Some("bad_header"), "{r:?}");
        let body: serde_json::Value =
            serde_json::from_str(r.header("x-tollgate-body").expect("body header"))
                .expect("JSON body header");
        assert_eq!(body["header"], named, "{r:?}");
    }
    assert_eq!(
        balance(&server, "acme").await,
        (350, 150, 0),
        "nothing charged"
    );
    assert_eq!(events_len(&server).await, events, "no ledger event");
}

/// A path with more than one reading (a dot segment, `//`, an encoded slash or backslash,
/// a backslash, a malformed encoding) is refused before it is routed: 400 `bad_path`
/// naming the path, by Check and by forward-auth, charging nothing. Otherwise the route
/// priced and the resource an upstream that resolves or decodes it serves could differ
/// (`/v1/documents/../envelopes/ocr` is priced by the OCR route, id `..`). Percent-encoded
/// unreserved characters are read decoded: `/v1/%65nvelopes` is `/v1/envelopes`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_with_two_readings_is_refused_before_it_is_routed() {
    let redis = common::RedisServer::start();
    let server = common::TestServer::start(esign_config(&redis.url()), Clock::Redis).await;
    let mut c = Checker::new(&server).await;
    let key = seed(&server, "acme", 100).await;
    let events = events_len(&server).await;
    for path in [
        "/v1/documents/../envelopes/ocr",
        "/v1/documents/%2e%2E/envelopes/ocr",
        "/v1/documents/./ocr",
        "/v1/documents/..;/envelopes/ocr",
        "/v1//envelopes",
        "/v1/documents/a%2Fb/ocr",
        "/v1/documents/a%5cb/ocr",
        "/v1\\envelopes",
        "/v1/%zz",
    ] {
        let d = c.check("POST", path, &[("x-api-key", &key)]).await;
        assert_eq!(
            (d.status, d.body["error"].as_str(), d.body["field"].as_str()),
            (400, Some("bad_path"), Some("path")),
            "{path}: {d:?}"
        );
        assert_eq!(d.header("x-tollgate-reason"), Some("bad_path"), "{d:?}");
        let r = http(
            server.http_addr,
            "GET",
            "/v1/forward-auth",
            &[
                ("x-forwarded-method", "POST"),
                ("x-forwarded-uri", path),
                ("x-api-key", &key),
            ],
            "",
        )
        .await;
        assert_eq!(r.status, 400, "{path}: {r:?}");
        assert_eq!(r.json()["error"], "bad_path", "{path}: {r:?}");
    }
    assert_eq!(events_len(&server).await, events, "nothing recorded");
    assert_eq!(balance(&server, "acme").await, (100, 0, 0));

    let a = c
        .check("POST", "/v1/%65nvelopes", &[("x-api-key", &key)])
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.header("x-tollgate-operation"), Some("envelope.send"));
    assert_eq!(balance(&server, "acme").await, (99, 0, 1));

    // gateway.allow_encoded_slashes: kept, as one segment: the OCR route's id.
    let mut config = esign_config(&redis.url());
    config.gateway.allow_encoded_slashes = true;
    let lenient = common::TestServer::start(config, Clock::Redis).await;
    let mut c = Checker::new(&lenient).await;
    let a = c
        .check("POST", "/v1/documents/a%2fb/ocr", &[("x-api-key", &key)])
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.header("x-tollgate-operation"), Some("ocr.pages"), "{a:?}");
    let d = c
        .check(
            "POST",
            "/v1/documents/../envelopes/ocr",
            &[("x-api-key", &key)],
        )
        .await;
    assert_eq!(d.status, 400, "{d:?}");
}

#[test]
fn price_book_errors_are_reported_all_at_once_with_their_paths() {
    let text = r#"
        [pricebook]
        default = "envelope.sent"
        [[pricebook.routes]]
        method = "POST"
        path = "/v1/envelopes/{id"
        operation = "envelope.send"
        [[pricebook.routes]]
        grpc_method = "esign.v1.Envelopes/Send"
        operation = "nope"
        [pricebook.operations."envelope.send"]
        base = "one"
        variant_header = "x-signature-method"
        [pricebook.operations."envelope.send".variants]
        aadhaar = { per_unit = -15, units_header = "x signers" }
        [pricebook.operations."ocr.pages"]
        mode = "hold"
        on_expiry = "later"
        "#;
    let ConfigErrors(errors) = Config::from_toml(text, Vec::new(), &Overrides::default())
        .expect_err("a broken price book");
    let report: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    for expected in [
        "pricebook.default: \"envelope.sent\" is neither",
        "pricebook.routes[0].path: segment \"{id\"",
        "pricebook.routes[1].operation: \"nope\" is neither",
        "pricebook.operations.\"envelope.send\".base: invalid type",
        "pricebook.operations.\"envelope.send\".variants.aadhaar.per_unit: must be in 0..=",
        "pricebook.operations.\"envelope.send\".variants.aadhaar.units_header: \"x signers\" is not a header name",
        "pricebook.operations.\"ocr.pages\".hold_ttl_ms: is required for holds",
        "pricebook.operations.\"ocr.pages\".on_expiry: \"later\": must be capture or release",
    ] {
        assert!(
            report.iter().any(|line| line.starts_with(expected)),
            "{expected:?} not in\n{}",
            report.join("\n")
        );
    }
    assert_eq!(report.len(), 8, "exactly these:\n{}", report.join("\n"));
}
