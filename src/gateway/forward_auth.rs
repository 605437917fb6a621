//! HTTP forward-auth on the HTTP port, for gateways that ask over HTTP before
//! forwarding: Traefik ForwardAuth and Kong send `X-Forwarded-Method/-Uri/-Host`, nginx
//! auth_request (examples/nginx.conf) `X-Original-Method/-URI/-Host`. Same decisions and
//! headers as ext_authz.
//!
//! nginx's auth_request honours only 2xx, 401 and 403 (anything else becomes a 500), so
//! `?mode=nginx` (or `x-tollgate-auth-mode: nginx`) answers every other denial with 403
//! and says the real status and body in `x-tollgate-status` / `x-tollgate-body`, which
//! examples/nginx.conf turns back into the real answer for the client.
//!
//! Also here: `POST /v1/holds/{hold_id}/capture|release`, for upstreams that settle their
//! holds over HTTP (service token required).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::path::ErrorKind as PathErrorKind;
use axum::extract::rejection::PathRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use axum::Router;

use super::{Call, Decision, Gateway, HEADER_REQUEST_ID};
use crate::api::auth::TokenCheck;
use crate::api::status::{denial_response, http_error};
use crate::ledger::command::{FieldViolation, Violations, CREDITS_MAX};
use crate::ledger::{EndHold, LedgerError};
use crate::telemetry::request_log::{FailureDetail, RealStatus};

pub const FORWARD_AUTH_PATH: &str = "/v1/forward-auth";
pub const HEADER_AUTH_MODE: &str = "x-tollgate-auth-mode";
pub const HEADER_REASON: &str = "x-tollgate-reason";
pub const HEADER_STATUS: &str = "x-tollgate-status";
pub const HEADER_BODY: &str = "x-tollgate-body";
/// Largest body the settlement endpoints read: a larger declared `content-length` is
/// answered 413 before a byte of it is read, and a body that turns out larger (chunked)
/// when the bound is reached.
pub const SETTLE_BODY_BYTES_MAX: usize = 4096;
/// How long a settlement's body may take to arrive once its headers have (hyper's header
/// read timeout does not cover the body): 408 past it, so a client that declares 4 KiB
/// and sends it a byte a minute does not hold its connection for good.
pub const SETTLE_BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

pub struct HttpGateway {
    gateway: Arc<Gateway>,
    service_tokens: TokenCheck,
}

/// The forward-auth and hold settlement routes.
pub fn router(gateway: Arc<Gateway>, service_tokens: TokenCheck) -> Router {
    Router::new()
        .route(FORWARD_AUTH_PATH, any(forward_auth))
        // The settlement reads its body itself, within SETTLE_BODY_BYTES_MAX; the default
        // limit says the same to any extractor added later (axum's default is 2 MiB).
        // Forward-auth reads no body and gets no layer: it would cost every check an
        // allocation (the limit travels in the request's extensions).
        .route(
            "/v1/holds/{hold_id}/{action}",
            post(settle_hold).layer(DefaultBodyLimit::max(SETTLE_BODY_BYTES_MAX)),
        )
        .with_state(Arc::new(HttpGateway {
            gateway,
            service_tokens,
        }))
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

type Denied = Box<super::Denial>;

fn bad_header(header: &str, message: &str) -> Denied {
    Box::new(super::Denial::BadHeader {
        header: header.into(),
        message: message.into(),
    })
}

/// The raw value of `forwarded` or `original`, whichever is present, with its name; a bad
/// header when both are and they differ. A header that is present decides, whatever it
/// holds: only an absent one lets the caller fall back to tollgate's own request.
fn one_of<'a>(
    headers: &'a HeaderMap,
    forwarded: &'static str,
    original: &'static str,
) -> Result<Option<(&'static str, &'a [u8])>, Denied> {
    let raw = |name| headers.get(name).map(HeaderValue::as_bytes);
    match (raw(forwarded), raw(original)) {
        (Some(f), Some(o)) if f != o => Err(bad_header(
            forwarded,
            "disagrees with its x-original-* counterpart: the proxy must send one family \
             and drop the client's",
        )),
        (Some(f), _) => Ok(Some((forwarded, f))),
        (None, Some(o)) => Ok(Some((original, o))),
        (None, None) => Ok(None),
    }
}

/// The original request's method (`name` is the header it came in): a token of printable
/// ASCII.
fn original_method<'a>(name: &str, raw: &'a [u8]) -> Result<&'a str, Denied> {
    match std::str::from_utf8(raw) {
        Ok(method) if !method.is_empty() && raw.iter().all(u8::is_ascii_graphic) => Ok(method),
        _ => Err(bad_header(name, "must be an HTTP method (printable ASCII)")),
    }
}

/// The original request's URI as routes see it. nginx copies the raw request line, so a
/// client's `/v1/documents/é/ocr` arrives as UTF-8 bytes: bytes above ASCII are
/// percent-encoded, as a client that encodes its URI would send them (routes match the
/// encoded form; `{param}` segments match it too). Control characters are refused.
fn original_uri<'a>(name: &str, raw: &'a [u8]) -> Result<Cow<'a, str>, Denied> {
    if raw.iter().any(u8::is_ascii_control) {
        return Err(bad_header(name, "holds a control character"));
    }
    if let Some(ascii) = raw
        .is_ascii()
        .then(|| std::str::from_utf8(raw).ok())
        .flatten()
    {
        return Ok(Cow::Borrowed(ascii));
    }
    let mut encoded = String::with_capacity(raw.len() * 3);
    for &byte in raw {
        if byte.is_ascii() {
            encoded.push(char::from(byte));
        } else {
            encoded.push('%');
            encoded.push(char::from(HEX[usize::from(byte >> 4)]));
            encoded.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
    }
    Ok(Cow::Owned(encoded))
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// The original request's host, given the header its URI came in (`None`: the
/// forward-auth request is the original one, e.g. Envoy's HTTP ext_authz, and its own
/// `host` is the request's). Never the auth request's own `host` otherwise (nginx sends
/// its upstream's name there), and empty when the proxy sent none (it drops the header
/// when the client sent no host, e.g. HTTP/1.0 without `Host`): an empty host matches
/// only routes without a `host`.
///
/// - URI in `x-forwarded-uri` (Traefik, Kong): `x-forwarded-host` only. Traefik passes a
///   client's `x-original-host` on, and drops its own header for a request without host.
/// - URI in `x-original-uri` (nginx): `x-original-host` or `x-forwarded-host`, and a bad
///   header when both are present and differ. examples/nginx.conf sets the first to
///   `$host` and clears the second; a config from before it set only the second, and
///   passed a client's `x-original-host` on: with it, a client naming another host than
///   the one nginx served is refused, never priced under its choice.
fn original_host<'a>(headers: &'a HeaderMap, uri_header: Option<&str>) -> Result<&'a str, Denied> {
    let (name, raw) = match uri_header {
        Some("x-forwarded-uri") => match headers.get("x-forwarded-host") {
            Some(value) => ("x-forwarded-host", value.as_bytes()),
            None => return Ok(""),
        },
        Some(_) => match one_of(headers, "x-forwarded-host", "x-original-host")? {
            Some(found) => found,
            None => return Ok(""),
        },
        None => match headers.get("host") {
            Some(value) => ("host", value.as_bytes()),
            None => return Ok(""),
        },
    };
    match std::str::from_utf8(raw) {
        Ok(host) if raw.iter().all(u8::is_ascii_graphic) => Ok(host),
        _ => Err(bad_header(name, "must be a host name (printable ASCII)")),
    }
}

/// The values of a header that is sent more than once or is not plain ASCII, as the
/// price book reads them: joined by commas (as Envoy hands repeated headers to
/// ext_authz), bytes that are not UTF-8 replaced. Such a header is present, so it is a
/// bad header (units, variants) or an unknown key, never taken for a missing one.
fn unusual_headers(headers: &HeaderMap) -> Vec<(&str, String)> {
    headers
        .keys()
        .filter(|name| {
            let mut values = headers.get_all(*name).iter();
            let first = values.next();
            values.next().is_some() || first.is_some_and(|v| v.to_str().is_err())
        })
        .map(|name| {
            let values: Vec<Cow<'_, str>> = headers
                .get_all(name)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()))
                .collect();
            (name.as_str(), values.join(","))
        })
        .collect()
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
    let original = original_request(&headers, &method, &uri);
    let (original_method, original_uri, host) = match original {
        Ok(original) => original,
        Err(bad) => return denied(&bad, nginx),
    };
    // A header sent more than once is read as its values joined by commas, so
    // `x-signers: 1` then `x-signers: 50` is a bad header, not a price for 1 with an
    // upstream that may read 50; one that is not ASCII is read as it is, not as absent.
    let unusual = unusual_headers(&headers);
    let lookup = |name: &str| match unusual.iter().find(|(n, _)| *n == name) {
        Some((_, joined)) => Some(joined.as_str()),
        None => header(&headers, name),
    };
    let call = Call {
        method: original_method,
        host,
        path: &original_uri,
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

/// (method, URI, host) of the request the proxy asks about. Traefik and Kong send
/// x-forwarded-*, nginx (examples/nginx.conf) x-original-*; each proxy overwrites its own
/// but passes the other family on from the client, so both present and different means a
/// client is trying to price one request as another. A header that is present decides
/// (a bad value is a 400 naming it); only an absent one falls back to tollgate's own
/// request, which would otherwise price `/v1/forward-auth` instead of the client's. The
/// host follows the URI's header ([`original_host`]): it used to be the first of
/// `x-forwarded-host`, `x-original-host` and `host`, so behind nginx an HTTP/1.0 request
/// without `Host` (nginx then drops its own header) was priced under the client's
/// `x-original-host`, or nginx's upstream name.
fn original_request<'a>(
    headers: &'a HeaderMap,
    method: &'a Method,
    uri: &'a Uri,
) -> Result<(&'a str, Cow<'a, str>, &'a str), Denied> {
    let original_method = match one_of(headers, "x-forwarded-method", "x-original-method")? {
        Some((name, raw)) => original_method(name, raw)?,
        None => method.as_str(),
    };
    let uri_header = one_of(headers, "x-forwarded-uri", "x-original-uri")?;
    let original_uri = match uri_header {
        Some((name, raw)) => original_uri(name, raw)?,
        None => Cow::Borrowed(uri.path_and_query().map_or("/", |p| p.as_str())),
    };
    let host = original_host(headers, uri_header.map(|(name, _)| name))?;
    Ok((original_method, original_uri, host))
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
    // The request log decides by the real status (a 5xx is logged, a 4xx denial is not).
    response.extensions_mut().insert(RealStatus(d.status));
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
        if let Ok(body) = HeaderValue::from_str(&ascii_json(&d.body)) {
            out.insert(HeaderName::from_static(HEADER_BODY), body);
        }
    }
    response
}

/// JSON text with every character above ASCII written as a `\uXXXX` escape (the same
/// JSON), so it fits a header value: a denial may quote a client's non-ASCII header.
fn ascii_json(json: &str) -> Cow<'_, str> {
    if json.is_ascii() {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    Cow::Owned(out)
}

/// A JSON answer of the HTTP port (also its 404 and 405: server.rs).
pub(crate) fn json_response(status: u16, body: serde_json::Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(body)).into_response()
}

/// `POST /v1/holds/{hold_id}/capture` (optional JSON body `{"amount": n}`; all of the
/// hold when absent) or `/release`. The idempotency key is the `idempotency-key` header,
/// else one per hold and action, so a retried settlement changes nothing. Every bad field
/// is named at once (the header as `idempotency-key`), before anything reaches Redis.
///
/// The token is checked before the body is read, and the body is read only up to
/// [`SETTLE_BODY_BYTES_MAX`] (a larger `content-length` is refused without reading it):
/// it used to be read whole, up to axum's 2 MiB default, by anyone.
async fn settle_hold(
    State(state): State<Arc<HttpGateway>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Err(status) = state
        .service_tokens
        .check(header(&headers, "authorization"))
    {
        return failed(
            401,
            serde_json::json!({ "error": "unauthenticated", "message": status.message() }),
        );
    }
    // The path is taken as a result so that the token is checked first and a segment
    // that is not UTF-8 once decoded (`/v1/holds/%FF/capture`) is a JSON 400 naming it,
    // not axum's text/plain answer to anyone.
    let (hold_id, action) = match path {
        Ok(Path(segments)) => segments,
        Err(rejection) => {
            let field = match &rejection {
                PathRejection::FailedToDeserializePathParams(e) => match e.kind() {
                    PathErrorKind::InvalidUtf8InPathParam { key } if key == "action" => "action",
                    _ => "hold_id",
                },
                _ => "hold_id",
            };
            let description = if field == "action" {
                "must be capture or release"
            } else {
                "is not a tollgate hold id"
            };
            let violation = FieldViolation::new(field, description);
            let (status, body) = http_error(LedgerError::InvalidArgument(vec![violation]));
            return failed(status, body);
        }
    };
    let body = match read_settle_body(&headers, body).await {
        Ok(body) => body,
        Err(refused) => return refused,
    };
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
    let amount = settle_amount(&body, &mut v);
    if action == "release" && amount.is_some() {
        v.add("amount", "a release charges nothing");
    }
    let key = idempotency_key(&headers, &mut v);
    if let Err(violations) = v.finish() {
        let (status, body) = http_error(LedgerError::InvalidArgument(violations));
        return failed(status, body);
    }
    // Absent: one key per hold and action (both checked above, so it fits the key limit).
    let key = key.unwrap_or_else(|| format!("http:{action}:{hold_id}"));
    let cmd = if capture {
        EndHold::capture(hold_id, amount, key)
    } else {
        EndHold::release(hold_id, key)
    };
    match state.gateway.ledger().end_hold(&cmd).await {
        Ok(out) => {
            let mut body = serde_json::json!({
                "event_id": out.event_id,
                "captured": out.captured,
                "released": out.released,
                "expired": out.expired,
                "available": out.available,
                "held": out.held,
                "replayed": out.replayed,
            });
            // A capture's event is the charge: its id is what Refund takes (as gRPC
            // CaptureResponse.charge_id).
            if capture {
                body["charge_id"] = out.event_id.into();
            }
            json_response(200, body)
        }
        Err(err) => {
            let (status, body) = http_error(err);
            failed(status, body)
        }
    }
}

/// The `amount` a settlement's body gives: `None` for an empty body, `{}` or
/// `{"amount": null}` (a capture takes all of the hold). The body must be a JSON object
/// whose only field is `amount`, given at most once: a misspelled field (`{"amout": 3}`)
/// used to be ignored, so the capture took the whole hold, and a repeated `amount` was
/// taken at its last value; both charge what the client did not mean, so both are refused.
/// An unknown field is named as sent when it is a short printable name, else as `body`.
/// The amount's range (`0..=CREDITS_MAX`, as the ledger's) is checked here, with the other
/// fields: left to the ledger, a bad amount was named only after the bad header was fixed.
fn settle_amount(body: &[u8], v: &mut Violations) -> Option<i64> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    let Ok(BodyFields(fields)) = serde_json::from_slice::<BodyFields>(body) else {
        v.add("body", "must be a JSON object");
        return None;
    };
    let mut amount = None;
    let mut seen = false;
    for (name, value) in fields {
        if name != "amount" {
            let printable =
                !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_graphic());
            if printable {
                v.add(&name, "is not a field of a settlement (only amount is)");
            } else {
                v.add("body", "has a field other than amount");
            }
            continue;
        }
        if seen {
            v.add("amount", "is given more than once");
            continue;
        }
        seen = true;
        match value {
            serde_json::Value::Null => {}
            value => match value.as_i64() {
                Some(n) if (0..=CREDITS_MAX).contains(&n) => amount = Some(n),
                Some(_) => v.add("amount", format!("must be in 0..={CREDITS_MAX}")),
                None => v.add("amount", "must be an integer"),
            },
        }
    }
    amount
}

/// A JSON object's fields in the order sent, repeats kept (`serde_json::Value` keeps only
/// the last of a repeated field, which is how a repeated `amount` went unnoticed).
struct BodyFields(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for BodyFields {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = BodyFields;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<BodyFields, A::Error> {
                let mut fields = Vec::new();
                while let Some(field) = map.next_entry::<String, serde_json::Value>()? {
                    fields.push(field);
                }
                Ok(BodyFields(fields))
            }
        }
        d.deserialize_map(Fields)
    }
}

/// A settlement's body, at most [`SETTLE_BODY_BYTES_MAX`] bytes within
/// [`SETTLE_BODY_READ_TIMEOUT`]; else the answer: 413 (declared larger, or found larger),
/// 408 (too slow), 400 (the client broke off).
async fn read_settle_body(headers: &HeaderMap, body: Body) -> Result<Bytes, Response> {
    let too_large = || {
        failed(
            413,
            serde_json::json!({
                "error": "payload_too_large",
                "fields": [{
                    "field": "body",
                    "description": format!("larger than {SETTLE_BODY_BYTES_MAX} bytes"),
                }],
            }),
        )
    };
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > SETTLE_BODY_BYTES_MAX as u64) {
        return Err(too_large());
    }
    let read = axum::body::to_bytes(body, SETTLE_BODY_BYTES_MAX);
    match tokio::time::timeout(SETTLE_BODY_READ_TIMEOUT, read).await {
        Ok(Ok(body)) => Ok(body),
        Ok(Err(err))
            if std::error::Error::source(&err)
                .is_some_and(|e| e.is::<http_body_util::LengthLimitError>()) =>
        {
            Err(too_large())
        }
        Ok(Err(_)) => Err(failed(
            400,
            serde_json::json!({ "error": "invalid_argument", "fields": [{
                "field": "body", "description": "could not be read (the client broke off)",
            }]}),
        )),
        Err(_) => Err(failed(
            408,
            serde_json::json!({
                "error": "request_timeout",
                "message": format!(
                    "the body did not arrive within {} s",
                    SETTLE_BODY_READ_TIMEOUT.as_secs()
                ),
            }),
        )),
    }
}

/// A failed settlement's answer, carrying what it says for the request log's line: the
/// `error`, and for a 400 each field it names with what is wrong (never a value, an
/// account or a key).
fn failed(status: u16, body: serde_json::Value) -> Response {
    let mut detail = body["error"].as_str().unwrap_or("error").to_owned();
    if let Some(fields) = body["fields"].as_array() {
        let named: Vec<String> = fields
            .iter()
            .map(|f| {
                format!(
                    "{} {}",
                    f["field"].as_str().unwrap_or_default(),
                    f["description"].as_str().unwrap_or_default()
                )
            })
            .collect();
        detail = format!("{detail}: {}", named.join("; "));
    }
    let mut response = json_response(status, body);
    response.extensions_mut().insert(FailureDetail(detail));
    response
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_uris_are_percent_encoded_above_ascii_and_refuse_control_characters() {
        let uri = |raw: &[u8]| original_uri("x-original-uri", raw).map(Cow::into_owned);
        assert_eq!(uri(b"/v1/a?b=c").ok().as_deref(), Some("/v1/a?b=c"));
        assert_eq!(
            uri("/v1/documents/é/ocr".as_bytes()).ok().as_deref(),
            Some("/v1/documents/%C3%A9/ocr")
        );
        // Not UTF-8 at all: still each byte encoded.
        assert_eq!(uri(b"/v1/\xff").ok().as_deref(), Some("/v1/%FF"));
        for bad in [&b"/v1/a\tb"[..], b"/v1/\x7f", b"/v1/\x01"] {
            assert!(
                matches!(*uri(bad).unwrap_err(), crate::gateway::Denial::BadHeader { ref header, .. } if header == "x-original-uri"),
                "{bad:?}"
            );
        }
    }

    /// (method, URI, host) forward-auth reads from these headers, or the header a 400
    /// names.
    fn read(headers: &[(&'static str, &str)]) -> Result<(String, String, String), String> {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(*name, HeaderValue::from_str(value).expect("value"));
        }
        let method = Method::GET;
        let uri = Uri::from_static("/v1/forward-auth?mode=nginx");
        match original_request(&map, &method, &uri) {
            Ok((m, u, h)) => Ok((m.to_owned(), u.into_owned(), h.to_owned())),
            Err(denial) => match *denial {
                crate::gateway::Denial::BadHeader { header, .. } => Err(header),
                other => panic!("{other:?}"),
            },
        }
    }

    fn host(headers: &[(&'static str, &str)]) -> String {
        read(headers).expect("read").2
    }

    #[test]
    fn the_host_comes_from_the_uris_family_and_is_empty_when_it_has_none() {
        // nginx (examples/nginx.conf): x-original-*. Its host, whatever a client added of
        // the other family; nginx's upstream name in `host` is never the request's host.
        let nginx = [
            ("x-original-method", "POST"),
            ("x-original-uri", "/v1/envelopes"),
            ("host", "tollgate"),
        ];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut h = nginx.to_vec();
            h.extend_from_slice(extra);
            h
        };
        assert_eq!(
            read(&with(&[("x-original-host", "api.example.com")])),
            Ok((
                "POST".to_owned(),
                "/v1/envelopes".to_owned(),
                "api.example.com".to_owned()
            ))
        );
        // Two hosts: refused, never priced under either (the nginx.conf of before
        // 2026-12-06 set x-forwarded-host and passed a client's x-original-host on).
        assert_eq!(
            read(&with(&[
                ("x-original-host", "other.example"),
                ("x-forwarded-host", "api.example.com"),
            ])),
            Err("x-forwarded-host".to_owned())
        );
        // That older config alone (its x-forwarded-host, no x-original-host): its host.
        assert_eq!(
            host(&with(&[("x-forwarded-host", "api.example.com")])),
            "api.example.com"
        );
        // The client sent no host (HTTP/1.0 without Host: nginx's $host is empty and an
        // empty proxy_set_header is not sent): empty, not nginx's `Host: tollgate`.
        assert_eq!(host(&nginx), "");

        // Traefik and Kong: x-forwarded-*. A client's x-original-host, passed on by
        // Traefik, is never read, also when Traefik sends no X-Forwarded-Host (a request
        // without Host).
        let traefik = [
            ("x-forwarded-method", "POST"),
            ("x-forwarded-uri", "/v1/envelopes"),
            ("host", "tollgate:8080"),
            ("x-original-host", "other.example"),
        ];
        assert_eq!(host(&traefik), "");
        let mut with_host = traefik.to_vec();
        with_host.push(("x-forwarded-host", "api.example.com"));
        assert_eq!(host(&with_host), "api.example.com");
        // The URI decides the family (a method header alone does not).
        assert_eq!(
            host(&[
                ("x-original-method", "POST"),
                ("x-forwarded-uri", "/v1/envelopes"),
                ("x-original-host", "other.example"),
            ]),
            ""
        );

        // No URI header: the forward-auth request is the original one (Envoy's HTTP
        // ext_authz), its own Host included; the proxy families' hosts are not read.
        assert_eq!(
            read(&[
                ("host", "api.example.com"),
                ("x-forwarded-host", "other.example"),
                ("x-original-host", "other.example"),
            ]),
            Ok((
                "GET".to_owned(),
                "/v1/forward-auth?mode=nginx".to_owned(),
                "api.example.com".to_owned()
            ))
        );

        // A host that is not printable ASCII is a 400 naming the header read; beside
        // Traefik's x-forwarded-uri, a client's x-original-host is not read at all.
        let mut bad = nginx.to_vec();
        bad.push(("x-original-host", "api example"));
        assert_eq!(read(&bad), Err("x-original-host".to_owned()));
        let mut other = nginx.to_vec();
        other.push(("x-forwarded-host", "api example"));
        assert_eq!(read(&other), Err("x-forwarded-host".to_owned()));
        let mut ignored = traefik.to_vec();
        ignored.retain(|(name, _)| *name != "x-original-host");
        ignored.push(("x-original-host", "api example"));
        assert_eq!(host(&ignored), "");
    }

    #[test]
    fn nginx_body_headers_escape_what_is_not_ascii() {
        let json = r#"{"message":"unknown value \"dsç\" 😀"}"#;
        let escaped = ascii_json(json);
        assert!(escaped.is_ascii(), "{escaped}");
        let a: serde_json::Value = serde_json::from_str(json).expect("json");
        let b: serde_json::Value = serde_json::from_str(&escaped).expect("escaped json");
        assert_eq!(a, b);
        assert!(HeaderValue::from_str(&escaped).is_ok());
    }
}
