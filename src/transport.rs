//! How the two ports take connections, and the bounds that keep a client from holding
//! memory or connections without end (docs/ARCHITECTURE.md, "Listener limits"): the gRPC
//! server's stream cap, keepalives and message sizes, the deadline of unary calls
//! ([`Deadline`]); the HTTP/1.1 server loop ([`serve_http`]) with its header read timeout
//! (also the idle keep-alive timeout), read buffer bound, connection cap and graceful
//! drain. `server.rs` wires them to the services.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{HeaderMap, HeaderName, Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use pin_project_lite::pin_project;
use tokio::net::TcpListener;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tonic::server::NamedService;
use tonic::transport::server::{Connected, TcpIncoming};

/// SETTINGS_MAX_CONCURRENT_STREAMS of the gRPC port (tonic's default is no limit). Envoy's
/// connection pool opens another connection once one is at the limit its peer advertised,
/// but it may put more streams on a new connection before our SETTINGS reach it, and the
/// ones past the limit would be refused: 1024 is Envoy's default circuit-breaker bound on
/// the requests in flight to one cluster (`max_requests`), so a default Envoy never goes
/// past it, even on its first connection. ext_authz Checks, the access-log streams (one per
/// Envoy worker) and a client's tollgate.v1 calls all count.
pub const GRPC_STREAMS_PER_CONNECTION_MAX: u32 = 1024;
/// HTTP/2 PING every interval on every gRPC connection, which is closed when one is not
/// answered within the timeout: a peer that went away (a host lost without a FIN) no
/// longer keeps its streams, among them an access-log stream, open for good.
pub const GRPC_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const GRPC_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// TCP keepalive of accepted gRPC connections: first probe after this idle time, then
/// every interval, given up after the retries (below the HTTP/2 ping, for a connection
/// whose write side is blocked).
pub const GRPC_TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
pub const GRPC_TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const GRPC_TCP_KEEPALIVE_RETRIES: u32 = 3;
/// How long a unary call may take, from its headers to its answer (reading its message
/// included): DEADLINE_EXCEEDED past it. Far above the longest work a call does (a check's
/// `gateway.check_timeout_ms` and every Redis call's `redis.call_timeout_ms` are at most
/// 10 s, the store pool waits 5 s for a connection); what it cuts is a client that sends
/// part of a message and stops. Not applied to streams: Envoy's access-log stream stays
/// open as long as Envoy runs, as does a health `Watch`.
pub const GRPC_UNARY_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest ext_authz CheckRequest read, unless `server.grpc_check_message_bytes_max` says
/// otherwise. A CheckRequest carries the client request's headers twice over at most (the
/// header map, and the path and host again as fields) plus a few hundred bytes of
/// addresses and context; Envoy refuses a request whose headers pass
/// `max_request_headers_kb` (60 KiB by default), so Envoy's own limits make it ≈ 125 KiB
/// at most: 256 KiB leaves twice that.
pub const DEFAULT_GRPC_CHECK_MESSAGE_BYTES_MAX: usize = 256 * 1024;
/// Largest tollgate.v1 Metering or Admin request read. The largest valid one is a few KiB
/// (metadata ≤ 1 KiB encoded, a description ≤ 256 characters, ids and keys ≤ 128 bytes,
/// the transaction kinds); these services check their token before they read a byte.
pub const API_MESSAGE_BYTES_MAX: usize = 64 * 1024;
/// Largest message of Envoy's access-log stream read. Envoy sends its buffer when it
/// passes `buffer_size_bytes` (16 KiB by default) or at `buffer_flush_interval`, so a
/// message is that plus one entry (bounded by Envoy's header limits), and the stream's
/// first message also carries Envoy's node (its extension list: tens of KiB). The stream
/// is refused before anything is read unless the caller is trusted (access_log.rs).
pub const ACCESS_LOG_MESSAGE_BYTES_MAX: usize = 1024 * 1024;
/// Largest gRPC health or reflection request read (a service or symbol name).
pub const PROBE_MESSAGE_BYTES_MAX: usize = 16 * 1024;

/// The gRPC server with the port's connection limits.
pub fn grpc_server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .max_concurrent_streams(GRPC_STREAMS_PER_CONNECTION_MAX)
        .http2_keepalive_interval(Some(GRPC_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(GRPC_KEEPALIVE_TIMEOUT))
}

/// The gRPC listener's accepted connections: no Nagle delay (Envoy's Check is on the
/// request path), TCP keepalive, and at most `connections_max` open at once
/// ([`LimitedIncoming`]).
pub fn grpc_incoming(listener: TcpListener, connections_max: usize) -> LimitedIncoming {
    let tcp = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(GRPC_TCP_KEEPALIVE_IDLE))
        .with_keepalive_interval(Some(GRPC_TCP_KEEPALIVE_INTERVAL))
        .with_keepalive_retries(Some(GRPC_TCP_KEEPALIVE_RETRIES));
    LimitedIncoming::new(tcp, connections_max)
}

type Acquiring =
    Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, tokio::sync::AcquireError>> + Send>>;

/// Accepted connections, at most `connections_max` open at once: each holds a permit
/// until it closes, and no connection is accepted while none is left, so a client past
/// the cap waits in the kernel's listen backlog (as on the HTTP port) rather than being
/// refused. Every connection is bounded on its own (streams, message sizes, the unary
/// deadline); this bounds how many there are. Dropped with the server: the listening
/// socket closes with it.
///
/// An accept error that is not about one connection (the process out of file
/// descriptors) pauses accepting for [`ACCEPT_ERROR_PAUSE`], as on the HTTP port: tonic
/// polls again at once after any error, and the loop spun a core.
pub struct LimitedIncoming<S = TcpIncoming> {
    inner: S,
    permits: Arc<Semaphore>,
    /// The permit the next accepted connection takes.
    permit: Option<OwnedSemaphorePermit>,
    /// Waiting for a permit (all taken).
    acquiring: Option<Acquiring>,
    /// Accepting again when this ends.
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> LimitedIncoming<S> {
    pub fn new(inner: S, connections_max: usize) -> Self {
        Self {
            inner,
            permits: Arc::new(Semaphore::new(connections_max)),
            permit: None,
            acquiring: None,
            pause: None,
        }
    }

    fn poll_permit(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        while self.permit.is_none() {
            if let Some(acquiring) = self.acquiring.as_mut() {
                // The semaphore is never closed.
                if let Ok(permit) = ready!(acquiring.as_mut().poll(cx)) {
                    self.permit = Some(permit);
                }
                self.acquiring = None;
            } else if let Ok(permit) = self.permits.clone().try_acquire_owned() {
                self.permit = Some(permit);
            } else {
                self.acquiring = Some(Box::pin(self.permits.clone().acquire_owned()));
            }
        }
        Poll::Ready(())
    }
}

impl<S, IO> futures_core::Stream for LimitedIncoming<S>
where
    S: futures_core::Stream<Item = std::io::Result<IO>> + Unpin,
{
    type Item = std::io::Result<Permitted<IO>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(pause) = this.pause.as_mut() {
                ready!(pause.as_mut().poll(cx));
                this.pause = None;
            }
            ready!(this.poll_permit(cx));
            match ready!(Pin::new(&mut this.inner).poll_next(cx)) {
                Some(Err(err)) if !is_connection_error(&err) => {
                    tracing::error!(error = %err, "cannot accept gRPC connections");
                    this.pause = Some(Box::pin(tokio::time::sleep(ACCEPT_ERROR_PAUSE)));
                }
                accepted => {
                    return Poll::Ready(accepted.map(|accepted| {
                        accepted.map(|io| Permitted {
                            io,
                            _permit: this.permit.take(),
                        })
                    }))
                }
            }
        }
    }
}

pin_project! {
    /// A connection holding its place under the listener's connection cap until it is
    /// dropped.
    pub struct Permitted<IO> {
        #[pin]
        io: IO,
        _permit: Option<OwnedSemaphorePermit>,
    }
}

impl<IO: tokio::io::AsyncRead> tokio::io::AsyncRead for Permitted<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl<IO: tokio::io::AsyncWrite> tokio::io::AsyncWrite for Permitted<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<IO: Connected> Connected for Permitted<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// A unary gRPC service whose calls answer DEADLINE_EXCEEDED once `timeout` has passed
/// since their headers arrived, whatever they were doing (reading the message, or the
/// work): the call's future is dropped, as when the client gives up.
///
/// It also answers a request message that does not decode as INVALID_ARGUMENT (see
/// [`decode_failure_as_invalid_argument`]): it wraps exactly the unary services (Metering,
/// Admin, ext_authz), inside the request log, which then counts and logs the real code.
///
/// A call whose `grpc-timeout` is no longer than `timeout` gets no second timer: tonic
/// already ends it at that deadline (Envoy sends its ext_authz `timeout` so, 200 ms in
/// the examples), so the Check of a gateway pays for one timer, as before.
#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
    timeout: Duration,
}

impl<S> Deadline<S> {
    pub fn new(inner: S, timeout: Duration) -> Self {
        Self { inner, timeout }
    }
}

impl<S: NamedService> NamedService for Deadline<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<Request<B>> for Deadline<S>
where
    S: tower::Service<Request<B>, Response = Response<tonic::body::Body>, Error = Infallible>,
{
    type Response = Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = DeadlineFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let sleep = (!caller_deadline_within(request.headers(), self.timeout))
            .then(|| tokio::time::sleep(self.timeout));
        DeadlineFuture {
            inner: self.inner.call(request),
            sleep,
        }
    }
}

pin_project! {
    /// The answer of a [`Deadline`] call.
    pub struct DeadlineFuture<F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: Option<tokio::time::Sleep>,
    }
}

impl<F> Future for DeadlineFuture<F>
where
    F: Future<Output = Result<Response<tonic::body::Body>, Infallible>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(answer) = this.inner.poll(cx) {
            return Poll::Ready(answer.map(decode_failure_as_invalid_argument));
        }
        let Some(sleep) = this.sleep.as_pin_mut() else {
            return Poll::Pending;
        };
        ready!(sleep.poll(cx));
        Poll::Ready(Ok(tonic::Status::deadline_exceeded(
            "the call took longer than the server's deadline for unary calls",
        )
        .into_http()))
    }
}

/// What tonic's message starts with when a request message does not decode (prost's
/// `DecodeError`).
const DECODE_FAILURE: &str = "failed to decode Protobuf message: ";

/// tonic answers a request message that does not decode (a string field that is not
/// UTF-8, a wrong wire type) with INTERNAL, "failed to decode Protobuf message:
/// DebitRequest.account_id: invalid string value", which the request log counted and
/// logged as a server fault. It is the caller's message that is bad: INVALID_ARGUMENT,
/// with a BadRequest naming the field by its path (`account_id`; `attributes.request` for a
/// nested one) when the message names one. prost's text names types, fields and what is
/// wrong, never a value. A unary call's status is in the headers (trailers-only).
fn decode_failure_as_invalid_argument(
    response: Response<tonic::body::Body>,
) -> Response<tonic::body::Body> {
    let Some(status) = tonic::Status::from_header_map(response.headers()) else {
        return response;
    };
    if status.code() != tonic::Code::Internal {
        return response;
    }
    let Some(detail) = status.message().strip_prefix(DECODE_FAILURE) else {
        return response;
    };
    // "Inner.field: Outer.field: description": prost lists the innermost message first.
    let mut path = Vec::new();
    let mut rest = detail;
    while let Some((segment, after)) = rest.split_once(": ") {
        let Some((_, field)) = segment
            .rsplit_once('.')
            .filter(|_| !segment.contains(' ') && !segment.is_empty())
        else {
            break;
        };
        path.push(field);
        rest = after;
    }
    path.reverse();
    let description = format!("could not be decoded: {rest}");
    let replaced = if path.is_empty() {
        tonic::Status::invalid_argument(format!("the request message {description}"))
    } else {
        crate::api::status::to_status(crate::ledger::LedgerError::InvalidArgument(vec![
            crate::ledger::command::FieldViolation::new(path.join("."), description),
        ]))
    };
    let (mut parts, _) = response.into_parts();
    for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
        parts.headers.remove(name);
    }
    let mut answer = replaced.into_http::<tonic::body::Body>();
    for (name, value) in parts.headers.iter() {
        answer
            .headers_mut()
            .entry(name)
            .or_insert_with(|| value.clone());
    }
    answer
}

const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// Whether the call's `grpc-timeout` (which tonic enforces) ends it no later than `bound`.
/// The format is tonic's: at most 8 digits and a unit; a malformed one is ignored by tonic,
/// so it bounds nothing here either.
fn caller_deadline_within(headers: &HeaderMap, bound: Duration) -> bool {
    let Some((&unit, digits)) = headers
        .get(&GRPC_TIMEOUT)
        .and_then(|v| v.as_bytes().split_last())
    else {
        return false;
    };
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let n = digits
        .iter()
        .fold(0u64, |n, digit| n * 10 + u64::from(digit - b'0'));
    let timeout = match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return false,
    };
    timeout <= bound
}

/// How long an HTTP client has to send a request's head (request line and headers). hyper
/// starts the timer when a connection opens and again when a response has been sent, so
/// this is also how long a kept-alive connection may stay idle: nginx's and Go's (Traefik)
/// pools drop a connection the server closed, and retry a request that met the close.
pub const HTTP_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Default of `server.grpc_connections_max`: far above what gateways open (Envoy keeps
/// one or a few HTTP/2 connections a worker to a cluster), each bounded on its own.
pub const DEFAULT_GRPC_CONNECTIONS_MAX: usize = 1024;
/// Default of `server.http_connections_max`.
pub const DEFAULT_HTTP_CONNECTIONS_MAX: usize = 1024;
/// Default of `server.http_header_bytes_max`: nginx reads a client's headers into at most
/// 4 buffers of 8 KiB (`large_client_header_buffers`) and Envoy refuses more than 60 KiB
/// (`max_request_headers_kb`), so what they forward fits; hyper's default is ~400 KiB.
pub const DEFAULT_HTTP_HEADER_BYTES_MAX: usize = 64 * 1024;
/// Least read buffer hyper takes.
pub const HTTP_HEADER_BYTES_MIN: usize = 8 * 1024;
/// Pause of the accept loop after an error that is not about one connection (the process
/// out of file descriptors): retrying at once would spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// The HTTP port's bounds (from `[server]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections open at once; past it, new ones wait in the listen backlog.
    pub connections_max: usize,
    /// hyper's read buffer: a request head larger than this is answered 431.
    pub header_bytes_max: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            connections_max: DEFAULT_HTTP_CONNECTIONS_MAX,
            header_bytes_max: DEFAULT_HTTP_HEADER_BYTES_MAX,
        }
    }
}

/// Serves `router` over HTTP/1.1 until `stop` completes, then stops accepting, lets every
/// connection finish the request it is on (hyper's graceful shutdown: an idle one closes
/// at once), and returns when the last one has closed. The caller bounds that wait
/// (`server::drained`).
///
/// HTTP/1.1 only: nginx's auth_request, Traefik's ForwardAuth, Kong, kubelet probes and
/// Prometheus all speak it, and HTTP/2 (which `axum::serve` also took, with 200 streams a
/// connection) would be one more thing to bound. At most `connections_max` connections
/// are open at once: each holds a permit until it closes, and the loop accepts no more
/// while none is left, so a client past the cap waits (in the kernel's listen backlog)
/// rather than being refused: a burst of gateway connections is served late, not failed.
pub async fn serve_http(
    listener: TcpListener,
    router: axum::Router,
    limits: HttpLimits,
    stop: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.connections_max));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HTTP_HEADER_READ_TIMEOUT)
        // The head's bound (431 past it); the read buffer's too, which hyper otherwise
        // grows to ~400 KiB (one read may still take it past the bound, not twice past).
        .max_header_size(limits.header_bytes_max)
        .max_buf_size(limits.header_bytes_max.max(HTTP_HEADER_BYTES_MIN))
        .keep_alive(true);
    let (closing, closing_rx) = watch::channel(false);
    tokio::pin!(stop);
    loop {
        let permit = tokio::select! {
            biased;
            () = &mut stop => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break, // never closed
            },
        };
        let tcp = tokio::select! {
            biased;
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(err) => {
                    if !is_connection_error(&err) {
                        tracing::error!(error = %err, "cannot accept HTTP connections");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    }
                    continue;
                }
            },
        };
        // Forward-auth is on the request path of nginx, Traefik and Kong: no Nagle delay
        // on its answers.
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(error = %err, "could not set TCP_NODELAY");
        }
        let connection =
            builder.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(router.clone()));
        let mut closing = closing_rx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => return,
                _ = closing.wait_for(|closing| *closing) => {}
            }
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        });
    }
    // Closes the listening socket: new connections are refused from here on.
    drop(listener);
    let _ = closing.send(true);
    // Every connection holds a permit until it has closed.
    let all = u32::try_from(limits.connections_max).unwrap_or(u32::MAX);
    let _ = permits.acquire_many(all).await;
    Ok(())
}

/// An accept error about one connection (the client gave up before it was accepted),
/// after which the next accept may succeed at once.
fn is_connection_error(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Out of file descriptors, the gRPC accept loop pauses instead of asking again at
    /// once: here every accept fails with EMFILE, and within 300 ms the stream asks its
    /// listener once (it handed every error on, and tonic asked again at once: a spin).
    #[tokio::test]
    async fn the_grpc_accept_loop_pauses_after_an_error_not_about_one_connection() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let asked = Arc::new(AtomicUsize::new(0));
        /// Every accept fails with EMFILE; counts the asks.
        struct OutOfFds(Arc<AtomicUsize>);
        impl futures_core::Stream for OutOfFds {
            type Item = std::io::Result<()>;
            fn poll_next(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
                self.0.fetch_add(1, Ordering::Relaxed);
                Poll::Ready(Some(Err(std::io::Error::from_raw_os_error(24))))
            }
        }
        let failing = OutOfFds(asked.clone());
        let mut incoming = LimitedIncoming::new(failing, 4);
        let next = tokio_stream::StreamExt::next(&mut incoming);
        assert!(
            tokio::time::timeout(Duration::from_millis(300), next)
                .await
                .is_err(),
            "nothing to accept"
        );
        // Once (twice or so should the test stall past the pause); spinning, thousands.
        assert!(asked.load(Ordering::Relaxed) < 10, "{asked:?}");

        // An error about one connection is handed on, and the next accept tried at once.
        let reset = tokio_stream::iter([Err::<(), _>(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        ))]);
        let mut incoming = LimitedIncoming::new(reset, 4);
        let first = tokio_stream::StreamExt::next(&mut incoming).await;
        assert!(matches!(first, Some(Err(_))));
    }

    /// The field a decode failure names, by its path; `None` for no field.
    fn decode_field(message: &str) -> (tonic::Code, Option<String>) {
        use tonic_types::StatusExt;
        let answer =
            decode_failure_as_invalid_argument(tonic::Status::internal(message).into_http());
        let status = tonic::Status::from_header_map(answer.headers()).expect("a status");
        let field = status
            .get_details_bad_request()
            .and_then(|b| b.field_violations.into_iter().next())
            .map(|v| v.field);
        (status.code(), field)
    }

    #[test]
    fn decode_failures_name_the_field_by_its_path() {
        let invalid = tonic::Code::InvalidArgument;
        assert_eq!(
            decode_field(
                "failed to decode Protobuf message: DebitRequest.account_id: invalid string value"
            ),
            (invalid, Some("account_id".into()))
        );
        assert_eq!(
            decode_field(
                "failed to decode Protobuf message: HttpRequest.path: Request.http: \
                 AttributeContext.request: CheckRequest.attributes: invalid string value"
            ),
            (invalid, Some("attributes.request.http.path".into()))
        );
        assert_eq!(
            decode_field("failed to decode Protobuf message: invalid wire type: Varint (expected LengthDelimited)"),
            (invalid, None)
        );
        // Any other INTERNAL is left as it is.
        assert_eq!(
            decode_field("the ledger broke"),
            (tonic::Code::Internal, None)
        );
    }

    fn within(value: &str, bound_ms: u64) -> bool {
        let mut headers = HeaderMap::new();
        headers.insert(GRPC_TIMEOUT, value.parse().expect("header value"));
        caller_deadline_within(&headers, Duration::from_millis(bound_ms))
    }

    #[test]
    fn a_caller_deadline_within_the_bound_spares_the_second_timer() {
        assert!(within("200m", 30_000));
        assert!(within("30S", 30_000));
        assert!(within("1000000u", 30_000));
        assert!(within("5n", 30_000));
        assert!(!within("31S", 30_000));
        assert!(!within("1M", 30_000));
        assert!(!within("1H", 30_000));
        // Malformed (tonic ignores it): our deadline applies.
        for bad in ["", "m", "200", "200x", "123456789m", "-1S", "2 S"] {
            assert!(!within(bad, 30_000), "{bad:?}");
        }
        assert!(!caller_deadline_within(
            &HeaderMap::new(),
            Duration::from_secs(30)
        ));
    }
}
