//! One log line per failed request, with its request id: a tower layer around the gRPC
//! server (a status other than OK) and the HTTP router (a 4xx/5xx answer, except the
//! probe and metrics endpoints, which orchestrators poll all the time, and forward-auth's
//! denials below 500: those are its answers, as an ext_authz Check's denial is a gRPC OK,
//! counted by the gateway's metrics; a gateway logs them itself). An answer whose wire
//! status is not its real one (forward-auth's nginx mode: 403 for any other denial)
//! carries a [`RealStatus`], which decides and is logged.
//!
//! The request id is the `x-request-id` header (Envoy and most gateways stamp one); a
//! failed request without one gets a generated id, returned in the response's
//! `x-request-id` so the caller can quote it. Nothing is formatted or allocated for
//! requests that succeed. The line carries the path, the status and its message (tollgate's
//! messages name fields, never their values), never headers: tokens and API keys travel in
//! headers.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use http::{HeaderValue, Method, Uri};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::metrics as m;

pub const HEADER_REQUEST_ID: &str = "x-request-id";
/// Longer (or non-printable) request ids are replaced by a generated one in logs.
pub const REQUEST_ID_LEN_MAX: usize = 128;
/// HTTP paths whose failures are not logged: probes and scrapes.
pub const QUIET_PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// A response extension: the status an answer stands for when the one on the wire differs.
/// Forward-auth's nginx mode answers 403 for every denial but 401 and 403 (nginx's
/// auth_request honours no other), with the real status in a header; this layer decides
/// and logs by the real one, so a 503 `unavailable` is logged as the 5xx it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RealStatus(pub u16);

/// A response extension: what a failed HTTP answer says (its `error`, and the fields a
/// 400 names with what is wrong with them, never their values), logged as the line's
/// `detail`, as a gRPC line carries its status message. The HTTP hold settlement sets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureDetail(pub String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    Http,
}

#[derive(Debug, Clone, Copy)]
pub struct RequestLogLayer {
    protocol: Protocol,
}

impl RequestLogLayer {
    pub fn grpc() -> Self {
        Self {
            protocol: Protocol::Grpc,
        }
    }

    pub fn http() -> Self {
        Self {
            protocol: Protocol::Http,
        }
    }
}

impl<S> Layer<S> for RequestLogLayer {
    type Service = RequestLog<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestLog {
            inner,
            protocol: self.protocol,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RequestLog<S> {
    inner: S,
    protocol: Protocol,
}

impl<S, B, ResBody> Service<http::Request<B>> for RequestLog<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // Cheap clones (reference-counted bytes); formatted only if the request fails.
        let request_id = request.headers().get(HEADER_REQUEST_ID).cloned();
        let uri = request.uri().clone();
        let method = request.method().clone();
        ResponseFuture {
            inner: self.inner.call(request),
            started: Instant::now(),
            request_id,
            uri,
            method,
            protocol: self.protocol,
        }
    }
}

pin_project! {
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        started: Instant,
        request_id: Option<HeaderValue>,
        uri: Uri,
        method: Method,
        protocol: Protocol,
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = match ready!(this.inner.poll(cx)) {
            Ok(response) => response,
            Err(err) => return Poll::Ready(Err(err)),
        };
        let failure = match this.protocol {
            Protocol::Grpc => tonic::Status::from_header_map(response.headers())
                .filter(|s| s.code() != tonic::Code::Ok)
                .map(Failure::Grpc),
            Protocol::Http => {
                let status = response
                    .extensions()
                    .get::<RealStatus>()
                    .map_or(response.status().as_u16(), |real| real.0);
                let path = this.uri.path();
                let denial =
                    status < 500 && path == crate::gateway::forward_auth::FORWARD_AUTH_PATH;
                (status >= 400 && !QUIET_PATHS.contains(&path) && !denial).then(|| {
                    let detail = response.extensions_mut().remove::<FailureDetail>();
                    Failure::Http(status, detail.map(|d| d.0))
                })
            }
        };
        if let Some(failure) = failure {
            let request_id = match this.request_id.as_ref().and_then(valid_request_id) {
                Some(id) => id.to_owned(),
                None => {
                    let id = generate_request_id();
                    if let Ok(value) = HeaderValue::from_str(&id) {
                        response.headers_mut().insert(HEADER_REQUEST_ID, value);
                    }
                    id
                }
            };
            log_failure(
                &failure,
                &request_id,
                this.method,
                this.uri.path(),
                this.started.elapsed().as_secs_f64() * 1000.0,
            );
        }
        Poll::Ready(Ok(response))
    }
}

enum Failure {
    Grpc(tonic::Status),
    Http(u16, Option<String>),
}

fn log_failure(failure: &Failure, request_id: &str, method: &Method, path: &str, latency_ms: f64) {
    match failure {
        Failure::Grpc(status) => {
            let code = m::grpc_code_label(status.code());
            metrics::counter!(
                m::GRPC_FAILED_REQUESTS_TOTAL,
                "service" => m::grpc_service_label(path),
                "code" => code
            )
            .increment(1);
            // A server fault repeats for every request while a dependency is down (the
            // health watcher logs the outage itself): throttled per site. A client's
            // failed request keeps its line, the trail support follows by request id
            // (a client's own flood is that client's traffic, like an access log's).
            if is_server_fault(status.code()) {
                crate::log_throttled!(
                    WARN,
                    request_id,
                    protocol = "grpc",
                    path,
                    code,
                    detail = status.message(),
                    latency_ms,
                    "request failed"
                );
            } else {
                tracing::info!(
                    request_id,
                    protocol = "grpc",
                    path,
                    code,
                    detail = status.message(),
                    latency_ms,
                    "request failed"
                );
            }
        }
        Failure::Http(status, detail) => {
            let method = method.as_str();
            let detail = detail.as_deref();
            if *status >= 500 {
                crate::log_throttled!(
                    WARN,
                    request_id,
                    protocol = "http",
                    method,
                    path,
                    status,
                    detail,
                    latency_ms,
                    "request failed"
                );
            } else {
                tracing::info!(
                    request_id,
                    protocol = "http",
                    method,
                    path,
                    status,
                    detail,
                    latency_ms,
                    "request failed"
                );
            }
        }
    }
}

/// Statuses that say tollgate (or what it depends on) failed, rather than the caller.
fn is_server_fault(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Unknown | DeadlineExceeded | Unimplemented | Internal | Unavailable | DataLoss
    )
}

fn valid_request_id(value: &HeaderValue) -> Option<&str> {
    let id = value.to_str().ok()?;
    (!id.is_empty() && id.len() <= REQUEST_ID_LEN_MAX && id.bytes().all(|b| b.is_ascii_graphic()))
        .then_some(id)
}

fn generate_request_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    format!("tg-{:016x}", hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_checked() {
        assert_eq!(
            valid_request_id(&HeaderValue::from_static("abc-123")),
            Some("abc-123")
        );
        assert_eq!(valid_request_id(&HeaderValue::from_static("a b")), None);
        let long = "x".repeat(REQUEST_ID_LEN_MAX + 1);
        assert_eq!(
            valid_request_id(&HeaderValue::from_str(&long).unwrap()),
            None
        );
        let generated = generate_request_id();
        assert!(generated.starts_with("tg-") && generated.len() == 19);
    }
}
