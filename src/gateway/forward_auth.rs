//! HTTP forward-auth on the HTTP port, for gateways that ask over HTTP before
//! forwarding: Traefik ForwardAuth and Kong send `X-Forwarded-Method/-Uri/-Host`, nginx
//! auth_request `X-Original-Method/-URI`. Same decisions and headers as ext_authz.
//!
//! nginx's auth_request honours only 2xx, 401 and 403 (anything else becomes a 500), so
//! `?mode=nginx` (or `x-tollgate-auth-mode: nginx`) answers every other denial with 403
//! and says the real status and body in `x-tollgate-status` / `x-tollgate-body`, which
//! examples/nginx.conf turns back into the real answer for the client.
//!
//! Also here: `POST /v1/holds/{hold_id}/capture|release`, for upstreams that settle their
//! holds over HTTP (service token required).

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use axum::Router;

use super::{Call, Decision, Gateway, HEADER_REQUEST_ID};
use crate::api::auth::TokenCheck;
use crate::api::status::{denial_response, http_error};
use crate::ledger::command::Violations;
use crate::ledger::{EndHold, LedgerError};

pub const FORWARD_AUTH_PATH: &str = "/v1/forward-auth";
pub const HEADER_AUTH_MODE: &str = "x-tollgate-auth-mode";
pub const HEADER_REASON: &str = "x-tollgate-reason";
pub const HEADER_STATUS: &str = "x-tollgate-status";
pub const HEADER_BODY: &str = "x-tollgate-body";
/// Largest body the settlement endpoints read.
pub const SETTLE_BODY_BYTES_MAX: usize = 4096;

pub struct HttpGateway {
    gateway: Arc<Gateway>,
    service_tokens: TokenCheck,
}

/// The forward-auth and hold settlement routes.
pub fn router(gateway: Arc<Gateway>, service_tokens: TokenCheck) -> Router {
    Router::new()
        .route(FORWARD_AUTH_PATH, any(forward_auth))
        .route("/v1/holds/{hold_id}/{action}", post(settle_hold))
        .with_state(Arc::new(HttpGateway {
            gateway,
            service_tokens,
        }))
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The value of `forwarded` or `original`, whichever is present; `Err(forwarded)` when
/// both are and they differ.
fn one_of<'a>(
    headers: &'a HeaderMap,
    forwarded: &'static str,
    original: &'static str,
) -> Result<Option<&'a str>, &'static str> {
    match (header(headers, forwarded), header(headers, original)) {
        (Some(f), Some(o)) if f != o => Err(forwarded),
        (f, o) => Ok(f.or(o)),
    }
}

async fn forward_auth(
    State(state): State<Arc<HttpGateway>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let nginx = uri
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "mode=nginx"))
        || header(&headers, HEADER_AUTH_MODE) == Some("nginx");
    let gateway = &state.gateway;
    if !gateway.trusts(header(&headers, gateway.shared_secret_header())) {
        return denied(&super::Denial::UntrustedGateway, nginx);
    }
    // Traefik and Kong send x-forwarded-*, nginx (examples/nginx.conf) x-original-*; each
    // proxy overwrites its own but passes the other family on from the client. So both
    // present and different means a client is trying to price one request as another.
    let (original_method, original_uri) = match (
        one_of(&headers, "x-forwarded-method", "x-original-method"),
        one_of(&headers, "x-forwarded-uri", "x-original-uri"),
    ) {
        (Ok(m), Ok(u)) => (
            m.unwrap_or(method.as_str()),
            u.unwrap_or_else(|| uri.path_and_query().map_or("/", |p| p.as_str())),
        ),
        (Err(header), _) | (_, Err(header)) => {
            let bad = super::Denial::BadHeader {
                header: header.into(),
                message: "disagrees with its x-original-* counterpart: the proxy must send \
                          one family and drop the client's"
                    .into(),
            };
            return denied(&bad, nginx);
        }
    };
    let host = header(&headers, "x-forwarded-host")
        .or_else(|| header(&headers, "x-original-host"))
        .or_else(|| header(&headers, "host"))
        .unwrap_or("");
    // A header sent more than once is read as its values joined by commas (as Envoy hands
    // them to ext_authz), so `x-signers: 1` then `x-signers: 50` is a bad header, not a
    // price for 1 with an upstream that may read 50.
    let repeated: Vec<(&str, String)> = headers
        .keys()
        .filter(|name| headers.get_all(*name).iter().nth(1).is_some())
        .map(|name| {
            let values: Vec<&str> = headers
                .get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap_or(""))
                .collect();
            (name.as_str(), values.join(","))
        })
        .collect();
    let lookup = |name: &str| match repeated.iter().find(|(n, _)| *n == name) {
        Some((_, joined)) => Some(joined.as_str()),
        None => header(&headers, name),
    };
    let call = Call {
        method: original_method,
        host,
        path: original_uri,
        request_id: header(&headers, HEADER_REQUEST_ID),
        headers: &lookup,
    };
    match gateway.check(&call).await {
        Decision::Allow(allowed) => {
            let mut response = StatusCode::OK.into_response();
            let out = response.headers_mut();
            for (name, value) in allowed
                .upstream_headers()
                .into_iter()
                .chain(allowed.client_headers())
            {
                if let Ok(value) = HeaderValue::from_str(&value) {
                    out.insert(HeaderName::from_static(name), value);
                }
            }
            response
        }
        Decision::Deny(denial) => denied(&denial, nginx),
    }
}

fn denied(denial: &super::Denial, nginx: bool) -> Response {
    let d = denial_response(denial);
    let status = if nginx && !matches!(d.status, 401 | 403) {
        StatusCode::FORBIDDEN
    } else {
        StatusCode::from_u16(d.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    };
    let mut response = Response::new(Body::from(d.body.clone()));
    *response.status_mut() = status;
    let out = response.headers_mut();
    out.insert(
        HeaderName::from_static("content-type"),
        HeaderValue::from_static("application/json"),
    );
    out.insert(
        HeaderName::from_static(HEADER_REASON),
        HeaderValue::from_static(d.reason),
    );
    if nginx {
        out.insert(HeaderName::from_static(HEADER_STATUS), d.status.into());
        if let Ok(body) = HeaderValue::from_str(&d.body) {
            out.insert(HeaderName::from_static(HEADER_BODY), body);
        }
    }
    response
}

fn json_response(status: u16, body: serde_json::Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(body)).into_response()
}

/// `POST /v1/holds/{hold_id}/capture` (optional JSON body `{"amount": n}`; all of the
/// hold when absent) or `/release`. The idempotency key is the `idempotency-key` header,
/// else one per hold and action, so a retried settlement changes nothing. Every bad field
/// is named at once (the header as `idempotency-key`), before anything reaches Redis.
async fn settle_hold(
    State(state): State<Arc<HttpGateway>>,
    Path((hold_id, action)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(status) = state
        .service_tokens
        .check(header(&headers, "authorization"))
    {
        return json_response(
            401,
            serde_json::json!({ "error": "unauthenticated", "message": status.message() }),
        );
    }
    let mut v = Violations::default();
    if hold_id.is_empty() {
        v.add("hold_id", "is required");
    } else if state
        .gateway
        .ledger()
        .shards()
        .of_hold_id(&hold_id)
        .is_none()
    {
        v.add("hold_id", "is not a tollgate hold id");
    }
    let capture = match action.as_str() {
        "capture" => true,
        "release" => false,
        _ => {
            v.add("action", "must be capture or release");
            false
        }
    };
    let amount = if body.len() > SETTLE_BODY_BYTES_MAX {
        v.add("body", format!("larger than {SETTLE_BODY_BYTES_MAX} bytes"));
        None
    } else if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(serde_json::Value::Object(fields)) => match fields.get("amount") {
                None | Some(serde_json::Value::Null) => None,
                Some(value) => {
                    let amount = value.as_i64();
                    if amount.is_none() {
                        v.add("amount", "must be an integer");
                    }
                    amount
                }
            },
            _ => {
                v.add("body", "must be a JSON object");
                None
            }
        }
    };
    if action == "release" && amount.is_some() {
        v.add("amount", "a release charges nothing");
    }
    let key = idempotency_key(&headers, &mut v);
    if let Err(violations) = v.finish() {
        let (status, body) = http_error(LedgerError::InvalidArgument(violations));
        return json_response(status, body);
    }
    // Absent: one key per hold and action (both checked above, so it fits the key limit).
    let key = key.unwrap_or_else(|| format!("http:{action}:{hold_id}"));
    let cmd = if capture {
        EndHold::capture(hold_id, amount, key)
    } else {
        EndHold::release(hold_id, key)
    };
    match state.gateway.ledger().end_hold(&cmd).await {
        Ok(out) => json_response(
            200,
            serde_json::json!({
                "event_id": out.event_id,
                "captured": out.captured,
                "released": out.released,
                "available": out.available,
                "held": out.held,
                "replayed": out.replayed,
            }),
        ),
        Err(err) => {
            let (status, body) = http_error(err);
            json_response(status, body)
        }
    }
}

/// The `idempotency-key` header of a settlement: `None` when absent; when present it must
/// be a valid idempotency key, sent once (a violation naming the header otherwise).
fn idempotency_key(headers: &HeaderMap, v: &mut Violations) -> Option<String> {
    const NAME: &str = "idempotency-key";
    let mut values = headers.get_all(NAME).iter();
    let value = values.next()?;
    if values.next().is_some() {
        v.add(NAME, "is sent more than once");
        return Some(String::new());
    }
    match value.to_str() {
        Ok("") => v.add(NAME, "must not be empty"),
        Ok(text) => v.idempotency_key(NAME, text),
        Err(_) => v.add(NAME, "may hold only printable ASCII without spaces"),
    }
    Some(value.to_str().unwrap_or_default().to_owned())
}
