//! Envoy's gRPC access-log service (`envoy.service.accesslog.v3.AccessLogService/
//! StreamAccessLogs`): charge after the response. For each HTTP log entry of a request
//! that took a hold, the hold is captured or released by the response status and the
//! units the upstream reported.
//!
//! The hold is named by the **dynamic metadata** the Check answer set (namespace
//! `envoy.filters.http.ext_authz`, which Envoy copies into every log entry), never by a
//! request header: a request Envoy logs without passing it through ext_authz's Allow (a
//! denied one, one that failed before the filter) still carries the client's own
//! `x-tollgate-hold-id`, and a client could release anyone's hold by naming it.
//!
//! Envoy must log the response header with the units (examples/envoy.yaml does):
//! `additional_response_headers_to_log: [x-tollgate-units]` (or whatever
//! `capture_units_header` the operations use), and the trailer of that name too where the
//! upstream is gRPC: a gRPC server knows the units when the call ends and sends them as
//! trailing metadata. A logged trailer is read before the header.
//!
//! A gRPC call's outcome is its `grpc-status`, not its HTTP status: a failed call (say
//! grpc-status 13) comes over HTTP 200, which `capture_statuses = ["2xx"]` would capture
//! in full. Envoy must log `grpc-status` as a response trailer (where a call that sent a
//! message puts it) and as a response header (where a trailers-only answer, and Envoy's own
//! gRPC error answers, put it): `additional_response_trailers_to_log: [grpc-status]` and
//! `grpc-status` in `additional_response_headers_to_log`. A logged grpc-status other than
//! 0 releases the hold whatever the HTTP status; without one the HTTP status decides.
//!
//! Not every logged status is the API's answer. When Envoy ends a request itself after the
//! API may have received it (the client went away: status 0; the route timeout: Envoy's
//! 504; the upstream connection reset or closed: 503; an idle or duration timeout), the
//! API may well have done the work (many frameworks finish a handler whose client left),
//! and releasing the hold on that status made every paid call free to a client that hangs
//! up right after sending. Envoy's `response_flags` say which it was ([`delivery`]): such
//! an entry captures if its status captures and otherwise leaves the hold open, to the
//! API's own settlement (it has `x-tollgate-hold-id`) or its `on_expiry` policy, counted
//! in `tollgate_access_log_holds_left_open_total{reason}`; an entry whose flags show the
//! API never got the request (no upstream connection, no route, …) releases it.
//!
//! Only a request's final entry settles (`access_log_type` `DownstreamEnd`, or none from
//! an older Envoy): the periodic, tunnel and upstream entries Envoy may also send carry
//! the same metadata before the call has ended ([`is_final`]).
//!
//! The stream is lossy by design (Envoy drops entries it cannot send); a hold whose entry
//! is lost follows its `on_expiry` policy at its deadline. An entry whose settlement meets
//! a transient ledger error (Redis unavailable, a shard awaiting restore) is not lost: it
//! is retried off the stream, for up to 30 s ([`retry`]).
//!
//! Envoy keeps one stream open for as long as it runs, and a server's graceful shutdown
//! (GOAWAY) does not end a stream already open: on shutdown ([`AccessLog::stopping`]) the
//! handler settles the entries it has received and ends the stream itself, with OK, so
//! Envoy opens its next one to another tollgate and this one's drain is not held up.
//!
//! Each stream is read and settled by a task of its own, which the handler waits for:
//! when Envoy resets the stream or its connection is lost (a restart), hyper drops the
//! handler, and a handler that settled in its own future was dropped mid-message, the
//! rest of a flush (hundreds of entries) left to `on_expiry` (a 2xx call free with
//! `release`, a failed one charged with `capture`). The task settles every entry it
//! received, then meets the stream's end and ends; shutdown waits for such tasks too
//! ([`StreamTasks`], within the server's grace).

pub mod retry;

use std::collections::HashMap;
use std::sync::Arc;

use envoy_types::pb::envoy::data::accesslog::v3::{
    AccessLogCommon, AccessLogType, HttpAccessLogEntry, ResponseFlags,
};
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_server::AccessLogService;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::LogEntries;
use envoy_types::pb::envoy::service::accesslog::v3::{
    StreamAccessLogsMessage, StreamAccessLogsResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use tonic::{Request, Response, Status, Streaming};

use super::pricing::Settlement;
use super::{Allowed, Gateway};
use crate::api::auth::TokenCheck;
use crate::telemetry::metrics as m;
use retry::{Answer, Retries};

#[derive(Clone)]
pub struct AccessLog {
    gateway: Arc<Gateway>,
    service_tokens: TokenCheck,
    /// tollgate's gRPC port listens on loopback only (the chart's sidecar mode): every
    /// caller is on this host.
    local_only: bool,
    /// Turns true when the process shuts down: open streams end then.
    stopping: Option<tokio::sync::watch::Receiver<bool>>,
    /// Where settlements that met a transient ledger error go (its `Retrier` runs as a
    /// task of the server).
    retries: Retries,
    /// Each stream's task holds a receiver of this while it runs: [`StreamTasks::ended`].
    tasks: Arc<tokio::sync::watch::Sender<()>>,
}

/// The streams' tasks (see the module docs), for the server's shutdown to wait for: a
/// task whose handler hyper dropped (its connection gone) still settles what it received,
/// and the process must not exit under it.
#[derive(Clone)]
pub struct StreamTasks(Arc<tokio::sync::watch::Sender<()>>);

impl StreamTasks {
    /// Completes once no stream's task runs (at once when none does).
    pub async fn ended(self) {
        self.0.closed().await;
    }
}

impl AccessLog {
    pub fn new(
        gateway: Arc<Gateway>,
        service_tokens: TokenCheck,
        local_only: bool,
        retries: Retries,
    ) -> Self {
        // At 0 from the start, so alerts on their increase see the first one.
        for reason in LEFT_OPEN_REASONS {
            metrics::counter!(m::ACCESS_LOG_HOLDS_LEFT_OPEN_TOTAL, "reason" => reason).increment(0);
        }
        Self {
            gateway,
            service_tokens,
            local_only,
            stopping: None,
            retries,
            tasks: Arc::new(tokio::sync::watch::Sender::new(())),
        }
    }

    /// The streams' tasks, for the server's shutdown to wait for.
    pub fn tasks(&self) -> StreamTasks {
        StreamTasks(self.tasks.clone())
    }

    /// Ends every open stream (with OK) once `stopping` turns true: see the module docs.
    pub fn stopping(mut self, stopping: tokio::sync::watch::Receiver<bool>) -> Self {
        self.stopping = Some(stopping);
        self
    }

    /// Who may stream log entries, which capture and release holds: with
    /// `gateway.shared_secret` set, whoever presents it; without, a caller with the
    /// service token (`authorization: Bearer`), or anyone when the port is loopback-only.
    /// It used to be anyone whenever no shared secret was set, so any client that could
    /// reach the port could settle any hold.
    fn authorized<T>(&self, request: &Request<T>) -> bool {
        let text = |name: &str| request.metadata().get(name).and_then(|v| v.to_str().ok());
        if self.gateway.has_shared_secret() {
            return self
                .gateway
                .trusts(text(self.gateway.shared_secret_header()));
        }
        self.local_only || self.service_tokens.check(text("authorization")).is_ok()
    }
}

/// What one log entry asks of the ledger. Pure: read from the entry alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldToSettle<'a> {
    pub hold_id: &'a str,
    pub operation: Option<&'a str>,
    /// The settlement terms of the book that placed the hold (absent from a hold an older
    /// tollgate placed: the current book's then settle it).
    pub capture_terms: Option<&'a str>,
    pub held: Option<i64>,
    /// The HTTP status Envoy logged; 0 when Envoy answered without one (e.g. the client
    /// went away).
    pub http_status: u32,
    /// The answer's `grpc-status`, from its trailers, else its headers (a trailers-only
    /// answer); `None` for an answer that is not gRPC (or Envoy not logging it).
    pub grpc_status: Option<&'a str>,
    pub response_headers: &'a HashMap<String, String>,
    pub response_trailers: &'a HashMap<String, String>,
    /// Whether the status is the API's answer, by Envoy's response flags.
    pub delivery: Delivery,
}

impl HoldToSettle<'_> {
    /// The units the upstream reported under `name`: a trailer (a gRPC server's trailing
    /// metadata, the call's last word), else a header.
    pub fn units(&self, name: &str) -> Option<&str> {
        self.response_trailers
            .get(name)
            .or_else(|| self.response_headers.get(name))
            .map(String::as_str)
    }

    /// The status the hold is settled by: the HTTP status, except 0 for a gRPC call that
    /// failed (a grpc-status other than 0, or one that is not a number), as for no status
    /// at all. No `capture_statuses` names 0 (they are 100..=599), so both release.
    pub fn status(&self) -> u32 {
        match self.grpc_status {
            Some(code) if code.trim() != "0" => 0,
            _ => self.http_status,
        }
    }
}

/// Whether a logged status is the API's answer, read from the entry's `response_flags`
/// (envoy.data.accesslog.v3.ResponseFlags), `response_code_details` and
/// `upstream_request_attempt_count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The status settles the hold: the API's own answer, or one Envoy gave with no sign
    /// that the API was reached and cut off.
    Answered,
    /// Envoy ended the request itself after the API may have received it: the status is
    /// not the API's verdict. A status that captures still captures (a 2xx is the API's:
    /// the client left mid-body, say); any other leaves the hold open (the API's own
    /// settlement, else `on_expiry`). The reason is Envoy's flag (`DC`, `UT`, …),
    /// `no_response` or `retried`: a label of
    /// `tollgate_access_log_holds_left_open_total`.
    Interrupted(&'static str),
    /// Envoy answered itself and the API never got the request (its flag): released
    /// whatever the status.
    NotDelivered(&'static str),
}

impl Delivery {
    /// How the hold ends, given what its status settles by the operation's policy; an
    /// error leaves it open, for that reason.
    pub fn settle(self, by_status: Settlement) -> Result<Settlement, &'static str> {
        match (self, by_status) {
            (Delivery::NotDelivered(_), _) => Ok(Settlement::Release),
            (Delivery::Interrupted(reason), Settlement::Release) => Err(reason),
            (_, settlement) => Ok(settlement),
        }
    }
}

/// One of Envoy's response flags: its short name (as in `%RESPONSE_FLAGS%`) and whether
/// an entry's flags have it.
type Flag = (&'static str, fn(&ResponseFlags) -> bool);

/// Flags of a request Envoy ended after the API may have received it (all of it, or its
/// headers and part of its body, which many frameworks act on): the status is Envoy's,
/// not the API's, so it must not release the hold. The client went away or reset the
/// stream (DC, DR), or sent a malformed body midway (DPE); the route timeout fired (UT,
/// Envoy's 504; the API is still working); the upstream reset or closed the stream, or
/// answered garbage (UR, UC, UPE); Envoy reset it (LR), on an idle, duration or
/// max-stream-duration timeout (SI, DT, UMSDR) or under memory pressure (OM, which can
/// also refuse a request before forwarding: taken as the worse case); retries ran out
/// (URX: an earlier attempt may have reached the API).
const INTERRUPTED: [Flag; 13] = [
    ("DC", |f| f.downstream_connection_termination),
    ("DR", |f| f.downstream_remote_reset),
    ("DPE", |f| f.downstream_protocol_error),
    ("UT", |f| f.upstream_request_timeout),
    ("UR", |f| f.upstream_remote_reset),
    ("UC", |f| f.upstream_connection_termination),
    ("UPE", |f| f.upstream_protocol_error),
    ("LR", |f| f.local_reset),
    ("SI", |f| f.stream_idle_timeout),
    ("DT", |f| f.duration_timeout),
    ("UMSDR", |f| f.upstream_max_stream_duration_reached),
    ("OM", |f| f.overload_manager),
    ("URX", |f| f.upstream_retry_limit_exceeded),
];

/// Flags of a request Envoy answered itself before the API could get it: no connection to
/// the upstream (UF, and DF: its name did not resolve), no healthy or no such upstream
/// (UH, NC), the circuit breaker (UO), no route (NR), this Envoy failing its health check
/// (LH), rate limiting (RL, RLSE), an authorization refusal (UAEX: tollgate's own, or
/// another ext_authz's), an injected fault (FI), strictly checked x-envoy-* headers (IH),
/// a filter without its configuration (NFCF). Release, as by their 4xx/5xx. They prove
/// it for the last attempt only: with more than one attempt (a route's retry_policy) the
/// hold is left open instead (`retried`). Neither list: DI (a delay, then proxied) and
/// RFCF (served from a cache): their status decides.
const NOT_DELIVERED: [Flag; 13] = [
    ("UF", |f| f.upstream_connection_failure),
    ("DF", |f| f.dns_resolution_failure),
    ("UH", |f| f.no_healthy_upstream),
    ("NC", |f| f.no_cluster_found),
    ("UO", |f| f.upstream_overflow),
    ("NR", |f| f.no_route_found),
    ("LH", |f| f.failed_local_healthcheck),
    ("RL", |f| f.rate_limited),
    ("RLSE", |f| f.rate_limit_service_error),
    ("UAEX", |f| f.unauthorized_details.is_some()),
    ("FI", |f| f.fault_injected),
    ("IH", |f| f.invalid_envoy_request_headers),
    ("NFCF", |f| f.no_filter_config_found),
];

/// No response at all (status 0) and no flag saying why.
const NO_RESPONSE: &str = "no_response";
/// A not-delivered flag on a request Envoy sent more than once.
const RETRIED: &str = "retried";

/// Every `reason` of `tollgate_access_log_holds_left_open_total`.
pub const LEFT_OPEN_REASONS: [&str; 15] = [
    "DC",
    "DR",
    "DPE",
    "UT",
    "UR",
    "UC",
    "UPE",
    "LR",
    "SI",
    "DT",
    "UMSDR",
    "OM",
    "URX",
    NO_RESPONSE,
    RETRIED,
];

/// Envoy's `response_code_details` of a status the upstream sent.
const VIA_UPSTREAM: &str = "via_upstream";

/// Whether an entry's status is the API's answer. In order: a status Envoy marks as the
/// upstream's (`via_upstream`, and not 0) is the API's verdict, whatever came after it (the client
/// leaving mid-body); then an interrupting flag; then no response at all (status 0, which
/// Envoy never answers with: the client is gone); then a not-delivered flag (one attempt
/// only); else the status decides.
pub fn delivery(entry: &HttpAccessLogEntry) -> Delivery {
    let response = entry.response.as_ref();
    let status = response
        .and_then(|r| r.response_code.as_ref())
        .map_or(0, |c| c.value);
    if status != 0 && response.is_some_and(|r| r.response_code_details == VIA_UPSTREAM) {
        return Delivery::Answered;
    }
    let common = entry.common_properties.as_ref();
    let flags = common
        .and_then(|c| c.response_flags.as_ref())
        .copied()
        .unwrap_or_default();
    let has = |list: &[Flag]| {
        list.iter()
            .find(|(_, set)| set(&flags))
            .map(|(name, _)| *name)
    };
    if let Some(name) = has(&INTERRUPTED) {
        return Delivery::Interrupted(name);
    }
    if status == 0 {
        return Delivery::Interrupted(NO_RESPONSE);
    }
    match has(&NOT_DELIVERED) {
        Some(_) if common.is_some_and(|c| c.upstream_request_attempt_count > 1) => {
            Delivery::Interrupted(RETRIED)
        }
        Some(name) => Delivery::NotDelivered(name),
        None => Delivery::Answered,
    }
}

/// Where Envoy files the dynamic metadata of an ext_authz Check answer.
pub const EXT_AUTHZ_NAMESPACE: &str = "envoy.filters.http.ext_authz";
const META_HOLD_ID: &str = "tollgate_hold_id";
const META_OPERATION: &str = "tollgate_operation";
const META_HELD: &str = "tollgate_held";
/// The hold's settlement terms from the price book that placed it
/// (`HoldPolicy::capture_terms`): a reload before the entry arrives does not change them.
const META_CAPTURE: &str = "tollgate_capture";
/// The gRPC status of an answer: a trailer, or a header of a trailers-only answer.
pub const GRPC_STATUS: &str = "grpc-status";

/// The dynamic metadata of an allowed check that took a hold (else `None`): what its log
/// entry will name the hold by.
pub fn hold_metadata(allowed: &Allowed) -> Option<Struct> {
    let hold_id = allowed.hold_id.as_ref()?;
    let text = |s: String| Value {
        kind: Some(Kind::StringValue(s)),
    };
    let mut fields = HashMap::from([
        (META_HOLD_ID.to_owned(), text(hold_id.clone())),
        (META_HELD.to_owned(), text(allowed.charged.to_string())),
    ]);
    if let Some(op) = &allowed.operation {
        fields.insert(META_OPERATION.to_owned(), text(op.clone()));
    }
    if let Some(terms) = &allowed.capture_terms {
        fields.insert(META_CAPTURE.to_owned(), text(terms.clone()));
    }
    Some(Struct { fields })
}

/// Whether an entry is the request's final one, which alone settles: `DownstreamEnd`, or
/// `NotSet` from an Envoy older than `access_log_type` unless it marked the entry
/// intermediate. Envoy also logs a request before it ends, each entry carrying the Check
/// answer's metadata: `access_log_flush_interval` (`DownstreamPeriodic`), a WebSocket's
/// 101 with `flush_log_on_tunnel_successfully_established`
/// (`DownstreamTunnelSuccessfullyEstablished`), the logger used as a router `upstream_log`
/// (`UpstreamPoolReady` / `UpstreamPeriodic` / `UpstreamEnd`, one per attempt). Such an
/// entry settled the hold by a status and units that were not the call's last word (a
/// streaming call's first periodic 200 captured the whole hold; its final grpc-status 13
/// then met `HOLD_ENDED`). A type newer than the vendored protos is not final either.
pub fn is_final(common: &AccessLogCommon) -> bool {
    match AccessLogType::try_from(common.access_log_type) {
        Ok(AccessLogType::DownstreamEnd) => true,
        // The deprecated flag is what Envoys before `access_log_type` set on a periodic
        // flush; newer ones set both.
        #[allow(deprecated)]
        Ok(AccessLogType::NotSet) => !common.intermediate_log_entry,
        _ => false,
    }
}

/// The hold a log entry settles, if the request took one (by the Check answer's dynamic
/// metadata; module docs) and the entry is its final one ([`is_final`]).
pub fn hold_to_settle(entry: &HttpAccessLogEntry) -> Option<HoldToSettle<'_>> {
    let common = entry.common_properties.as_ref()?;
    if !is_final(common) {
        return None;
    }
    let fields = &common
        .metadata
        .as_ref()?
        .filter_metadata
        .get(EXT_AUTHZ_NAMESPACE)?
        .fields;
    let text = |name: &str| match fields.get(name).and_then(|v| v.kind.as_ref()) {
        Some(Kind::StringValue(s)) if !s.is_empty() => Some(s.as_str()),
        _ => None,
    };
    let hold_id = text(META_HOLD_ID)?;
    static EMPTY: std::sync::OnceLock<HashMap<String, String>> = std::sync::OnceLock::new();
    let response = entry.response.as_ref();
    Some(HoldToSettle {
        hold_id,
        operation: text(META_OPERATION),
        capture_terms: text(META_CAPTURE),
        held: text(META_HELD).and_then(|c| c.parse().ok()),
        http_status: response
            .and_then(|r| r.response_code.as_ref())
            .map_or(0, |c| c.value),
        grpc_status: response.and_then(|r| {
            r.response_trailers
                .get(GRPC_STATUS)
                .or_else(|| r.response_headers.get(GRPC_STATUS))
                .map(String::as_str)
        }),
        response_headers: response
            .map_or_else(|| EMPTY.get_or_init(HashMap::new), |r| &r.response_headers),
        response_trailers: response
            .map_or_else(|| EMPTY.get_or_init(HashMap::new), |r| &r.response_trailers),
        delivery: delivery(entry),
    })
}

#[tonic::async_trait]
impl AccessLogService for AccessLog {
    async fn stream_access_logs(
        &self,
        request: Request<Streaming<StreamAccessLogsMessage>>,
    ) -> Result<Response<StreamAccessLogsResponse>, Status> {
        if !self.authorized(&request) {
            // Envoy does not say it was refused: holds would then all end by their
            // on_expiry policy. No caller details: the address is not logged either.
            tracing::warn!(
                "an access-log stream was refused: Envoy needs the gateway shared secret, or \
                 the service token as initial_metadata (docs/envoy.yaml)"
            );
            return Err(Status::unauthenticated(
                "the access log needs the gateway shared secret or the service token",
            ));
        }
        // The reading and settling run in a task of their own: hyper drops this handler's
        // future when Envoy resets the stream or its connection is lost, and with it a
        // loop that was still settling a message (hundreds of entries in one flush):
        // the rest of its holds then ended by on_expiry. The task outlives the handler:
        // it settles what it received, then sees the stream's end (an error: it broke
        // off) and ends. The server's shutdown waits for it ([`StreamTasks`]).
        let me = self.clone();
        let running = self.tasks.subscribe();
        let stream = request.into_inner();
        let task = tokio::spawn(async move {
            let answer = me.read_and_settle(stream).await;
            drop(running);
            answer
        });
        match task.await {
            Ok(answer) => answer,
            Err(err) => {
                tracing::error!(error = %err, "an access-log stream's task failed");
                Err(Status::internal("the access-log stream's task failed"))
            }
        }
    }
}

impl AccessLog {
    async fn read_and_settle(
        &self,
        mut stream: Streaming<StreamAccessLogsMessage>,
    ) -> Result<Response<StreamAccessLogsResponse>, Status> {
        let mut stopping = self.stopping.clone();
        loop {
            // What has arrived first: the stream ends only when nothing is waiting.
            let next = tokio::select! {
                biased;
                next = stream.message() => next,
                () = shutting_down(&mut stopping) => {
                    tracing::info!(
                        "shutting down: ending an access-log stream (Envoy opens its next \
                         one to another tollgate)"
                    );
                    break;
                }
            };
            let message = match next {
                Ok(Some(message)) => message,
                Ok(None) => break,
                Err(status) if broke_off(&status) => {
                    // Envoy went away (a restart, a shutdown, a lost connection): the
                    // stream's end, not a failure. What it sent before was settled.
                    tracing::info!(
                        detail = status.message(),
                        "an access-log stream broke off (Envoy went away); the entries \
                         received were settled"
                    );
                    break;
                }
                Err(status) => return Err(status),
            };
            let Some(LogEntries::HttpLogs(logs)) = message.log_entries else {
                continue;
            };
            // In order, one at a time: a stream's entries are few per flush, and a
            // settlement is one script call.
            for entry in &logs.log_entry {
                if let Some(hold) = hold_to_settle(entry) {
                    self.settle(&hold).await;
                }
            }
        }
        Ok(Response::new(StreamAccessLogsResponse {}))
    }
}

/// Completes once `stopping` turns true; never without one (or once its sender is gone
/// without having said so).
async fn shutting_down(stopping: &mut Option<tokio::sync::watch::Receiver<bool>>) {
    if let Some(rx) = stopping {
        if rx.wait_for(|stop| *stop).await.is_ok() {
            return;
        }
    }
    std::future::pending().await
}

/// Whether a stream's error is its connection breaking off (the peer went away, or the
/// transport failed under it) rather than a bad message: tonic gives a transport error
/// (hyper's, h2's, an I/O error) as the status's source, and a message it could not
/// decode as a status of its own without one.
fn broke_off(status: &Status) -> bool {
    std::error::Error::source(status).is_some()
        || matches!(
            status.code(),
            tonic::Code::Cancelled | tonic::Code::Unavailable
        )
}

impl AccessLog {
    async fn settle(&self, hold: &HoldToSettle<'_>) {
        let units = |name: &str| hold.units(name).map(str::to_owned);
        let by_status = self.gateway.settlement(
            hold.operation,
            hold.capture_terms,
            hold.held,
            hold.status(),
            &units,
        );
        let settlement = match hold.delivery.settle(by_status) {
            Ok(settlement) => settlement,
            Err(reason) => {
                metrics::counter!(m::ACCESS_LOG_HOLDS_LEFT_OPEN_TOTAL, "reason" => reason)
                    .increment(1);
                tracing::debug!(
                    hold_id = hold.hold_id,
                    status = hold.http_status,
                    reason,
                    "hold left open: Envoy ended the request after the API may have received it; \
                 the API's own settlement or the hold's on_expiry decides"
                );
                return;
            }
        };
        if self.retries.failing() {
            // The last settlement met a transient error: this one goes straight to the
            // retries, so a Redis that answers nothing (each call waiting for its
            // deadline) does not slow the reading of the stream.
            self.retries.push(hold.hold_id, settlement, false);
            return;
        }
        let result = self.gateway.end_hold(hold.hold_id, settlement).await;
        let answer = retry::judge(&result);
        self.retries.answered(answer);
        match (answer, result) {
            (_, Ok(out)) => tracing::debug!(
                hold_id = hold.hold_id,
                status = hold.http_status,
                grpc_status = hold.grpc_status,
                captured = out.captured,
                released = out.released,
                replayed = out.replayed,
                "hold settled from the access log"
            ),
            // Settled already (by the upstream, or an earlier copy of this entry).
            (Answer::HoldEnded, _) => {}
            (Answer::Transient, Err(err)) => {
                tracing::debug!(
                    hold_id = hold.hold_id,
                    error = %err,
                    "could not settle a hold from the access log yet; retrying it off the stream"
                );
                self.retries.push(hold.hold_id, settlement, true);
            }
            (_, Err(err)) => tracing::warn!(
                hold_id = hold.hold_id,
                error = %err,
                "could not settle a hold from the access log; it follows its on_expiry policy"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::pricing::{HoldPolicy, Settlement};
    use envoy_types::pb::envoy::data::accesslog::v3::{
        HttpRequestProperties, HttpResponseProperties,
    };

    #[test]
    fn a_hold_is_named_by_the_check_metadata_never_by_a_request_header() {
        let mut entry = HttpAccessLogEntry {
            request: Some(HttpRequestProperties::default()),
            response: Some(HttpResponseProperties {
                response_code: Some(envoy_types::pb::google::protobuf::UInt32Value { value: 200 }),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(hold_to_settle(&entry), None);
        // A client's own header (a request denied, or failed before ext_authz) is ignored.
        let request = entry.request.as_mut().unwrap();
        request
            .request_headers
            .insert(super::super::HEADER_HOLD_ID.into(), "h3-7".into());
        assert_eq!(hold_to_settle(&entry), None);
        // An allowed check without a hold sets no metadata.
        assert_eq!(hold_metadata(&Allowed::default()), None);
        let allowed = Allowed {
            hold_id: Some("h3-8".into()),
            charged: 50,
            ..Allowed::default()
        };
        let metadata = envoy_types::pb::envoy::config::core::v3::Metadata {
            filter_metadata: HashMap::from([(
                EXT_AUTHZ_NAMESPACE.to_owned(),
                hold_metadata(&allowed).expect("metadata"),
            )]),
            ..Default::default()
        };
        entry.common_properties = Some(AccessLogCommon {
            metadata: Some(metadata),
            ..Default::default()
        });
        let hold = hold_to_settle(&entry).expect("a hold");
        assert_eq!(hold.hold_id, "h3-8");
        assert_eq!(hold.held, Some(50));
        assert_eq!(hold.http_status, 200);
        assert_eq!(hold.grpc_status, None);
        assert_eq!(hold.status(), 200);
        assert_eq!(hold.operation, None);
        // A hold placed by a tollgate from before the terms were carried.
        assert_eq!(hold.capture_terms, None);
        let allowed = Allowed {
            capture_terms: Some("2;200-299;x-tollgate-units".into()),
            ..allowed
        };
        entry
            .common_properties
            .as_mut()
            .and_then(|c| c.metadata.as_mut())
            .expect("metadata")
            .filter_metadata
            .insert(
                EXT_AUTHZ_NAMESPACE.to_owned(),
                hold_metadata(&allowed).expect("metadata"),
            );
        let hold = hold_to_settle(&entry).expect("a hold");
        assert_eq!(hold.capture_terms, Some("2;200-299;x-tollgate-units"));
    }

    #[test]
    fn only_a_requests_final_entry_settles_its_hold() {
        let typed = |t: AccessLogType| {
            let mut entry = held_entry(Some(200), &[], &[]);
            if let Some(c) = entry.common_properties.as_mut() {
                c.access_log_type = t as i32;
            }
            entry
        };
        assert!(hold_to_settle(&typed(AccessLogType::DownstreamEnd)).is_some());
        // An Envoy older than access_log_type.
        assert!(hold_to_settle(&typed(AccessLogType::NotSet)).is_some());
        for t in [
            AccessLogType::DownstreamStart,
            AccessLogType::DownstreamPeriodic,
            AccessLogType::DownstreamTunnelSuccessfullyEstablished,
            AccessLogType::UpstreamPoolReady,
            AccessLogType::UpstreamPeriodic,
            AccessLogType::UpstreamEnd,
        ] {
            assert_eq!(hold_to_settle(&typed(t)), None, "{t:?}");
        }
        // Such an older Envoy's periodic flush.
        let mut entry = typed(AccessLogType::NotSet);
        #[allow(deprecated)]
        if let Some(c) = entry.common_properties.as_mut() {
            c.intermediate_log_entry = true;
        }
        assert_eq!(hold_to_settle(&entry), None);
        // A type newer than the vendored protos.
        let mut entry = typed(AccessLogType::NotSet);
        if let Some(c) = entry.common_properties.as_mut() {
            c.access_log_type = 99;
        }
        assert_eq!(hold_to_settle(&entry), None);
    }

    /// A log entry of a request that took a hold of 50, answered with this HTTP status,
    /// response headers and trailers.
    fn held_entry(
        status: Option<u32>,
        headers: &[(&str, &str)],
        trailers: &[(&str, &str)],
    ) -> HttpAccessLogEntry {
        let allowed = Allowed {
            hold_id: Some("h3-9".into()),
            charged: 50,
            ..Allowed::default()
        };
        let map = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        HttpAccessLogEntry {
            common_properties: Some(AccessLogCommon {
                metadata: Some(envoy_types::pb::envoy::config::core::v3::Metadata {
                    filter_metadata: HashMap::from([(
                        EXT_AUTHZ_NAMESPACE.to_owned(),
                        hold_metadata(&allowed).expect("metadata"),
                    )]),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            response: Some(HttpResponseProperties {
                response_code: status
                    .map(|value| envoy_types::pb::google::protobuf::UInt32Value { value }),
                response_headers: map(headers),
                response_trailers: map(trailers),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// What the entry does to the hold, under `capture_statuses = ["2xx"]` and the units
    /// header the entry logged: how it ends it, or (an error) why it leaves it open.
    fn decision(entry: &HttpAccessLogEntry) -> Result<Settlement, &'static str> {
        let hold = hold_to_settle(entry).expect("a hold");
        let policy = HoldPolicy::fallback();
        hold.delivery.settle(policy.settle(
            hold.status(),
            hold.units(&policy.capture_units_header),
            hold.held,
        ))
    }

    /// `held_entry` as Envoy logged it: these response flags, `response_code_details` and
    /// upstream attempts.
    fn flagged(
        mut entry: HttpAccessLogEntry,
        flags: ResponseFlags,
        details: &str,
        attempts: u32,
    ) -> HttpAccessLogEntry {
        let common = entry.common_properties.as_mut().expect("common");
        common.response_flags = Some(flags);
        common.upstream_request_attempt_count = attempts;
        entry
            .response
            .as_mut()
            .expect("response")
            .response_code_details = details.into();
        entry
    }

    /// Envoy's response flags with those `set` sets.
    fn with(set: fn(&mut ResponseFlags)) -> ResponseFlags {
        let mut flags = ResponseFlags::default();
        set(&mut flags);
        flags
    }

    #[test]
    fn envoy_ending_a_request_the_api_may_have_received_leaves_its_hold_open() {
        use envoy_types::pb::envoy::data::accesslog::v3::response_flags::Unauthorized;
        let none = ResponseFlags::default();
        // The API answered: its status decides.
        let entry = flagged(held_entry(Some(200), &[], &[]), none, VIA_UPSTREAM, 1);
        assert_eq!(decision(&entry), Ok(Settlement::Capture(None)));
        let entry = flagged(held_entry(Some(500), &[], &[]), none, VIA_UPSTREAM, 1);
        assert_eq!(decision(&entry), Ok(Settlement::Release));

        // The client closed the connection before the answer (no status at all): the API
        // may be doing the work; no release.
        let dc = with(|f| f.downstream_connection_termination = true);
        let gone = "downstream_remote_disconnect";
        let entry = flagged(held_entry(None, &[], &[]), dc, gone, 1);
        assert_eq!(
            hold_to_settle(&entry).expect("a hold").delivery,
            Delivery::Interrupted("DC")
        );
        assert_eq!(decision(&entry), Err("DC"));
        // No status is nobody's answer, whatever the details say.
        let entry = flagged(held_entry(None, &[], &[]), dc, VIA_UPSTREAM, 1);
        assert_eq!(decision(&entry), Err("DC"));
        // ...nor on a status Envoy made up: the route timeout's 504, a reset's 503, the
        // stream idle timeout's 408, a gRPC call's local reply (grpc-status 14 over 200).
        let uf = with(|f| f.upstream_connection_failure = true);
        for (status, grpc, flags, reason) in [
            (504, None, with(|f| f.upstream_request_timeout = true), "UT"),
            (
                503,
                None,
                with(|f| f.upstream_connection_termination = true),
                "UC",
            ),
            (503, None, with(|f| f.upstream_remote_reset = true), "UR"),
            (408, None, with(|f| f.stream_idle_timeout = true), "SI"),
            (408, None, with(|f| f.duration_timeout = true), "DT"),
            (0, None, with(|f| f.downstream_remote_reset = true), "DR"),
            (
                200,
                Some("14"),
                with(|f| f.upstream_request_timeout = true),
                "UT",
            ),
            // Retries ran out: an earlier attempt may have reached the API, whatever the
            // last one says.
            (
                503,
                None,
                with(|f| {
                    f.upstream_connection_failure = true;
                    f.upstream_retry_limit_exceeded = true;
                }),
                "URX",
            ),
        ] {
            let headers: Vec<_> = grpc.map(|g| ("grpc-status", g)).into_iter().collect();
            let entry = flagged(held_entry(Some(status), &headers, &[]), flags, "local", 1);
            assert_eq!(decision(&entry), Err(reason), "{status} {reason}");
        }
        let entry = flagged(held_entry(Some(503), &[], &[]), uf, "local", 2);
        assert_eq!(decision(&entry), Err("retried"));
        // No status and no flag (an entry logged before the response): not an answer.
        let entry = held_entry(None, &[], &[]);
        assert_eq!(decision(&entry), Err("no_response"));

        // A status that captures still captures: the API answered 2xx and the client
        // left mid-body (Envoy may then say so instead of via_upstream).
        let units = [("x-tollgate-units", "3")];
        let entry = flagged(held_entry(Some(200), &units, &[]), dc, gone, 1);
        assert_eq!(decision(&entry), Ok(Settlement::Capture(Some(3))));
        // The API's own error answer, then the client left: the API's verdict releases.
        let entry = flagged(held_entry(Some(500), &[], &[]), dc, VIA_UPSTREAM, 1);
        assert_eq!(decision(&entry), Ok(Settlement::Release));

        // The API never got the request: released, whatever capture_statuses says.
        let uaex = with(|f| f.unauthorized_details = Some(Unauthorized { reason: 1 }));
        for (status, flags, reason) in [
            (503, uf, "UF"),
            (503, with(|f| f.no_healthy_upstream = true), "UH"),
            (503, with(|f| f.upstream_overflow = true), "UO"),
            (404, with(|f| f.no_route_found = true), "NR"),
            (429, with(|f| f.rate_limited = true), "RL"),
            (403, uaex, "UAEX"),
            (200, with(|f| f.fault_injected = true), "FI"),
        ] {
            let entry = flagged(held_entry(Some(status), &[], &[]), flags, "local", 1);
            assert_eq!(
                hold_to_settle(&entry).expect("a hold").delivery,
                Delivery::NotDelivered(reason)
            );
            assert_eq!(decision(&entry), Ok(Settlement::Release), "{reason}");
        }
        // One attempt, or none (Envoy answered before the router tried), proves it.
        let entry = flagged(held_entry(Some(503), &[], &[]), uf, "local", 0);
        assert_eq!(decision(&entry), Ok(Settlement::Release));

        // A delay injected, then proxied: the status decides.
        let di = with(|f| f.delay_injected = true);
        let entry = flagged(held_entry(Some(200), &[], &[]), di, VIA_UPSTREAM, 1);
        assert_eq!(decision(&entry), Ok(Settlement::Capture(None)));

        // Every reason is a label registered at zero.
        for (name, _) in INTERRUPTED {
            assert!(LEFT_OPEN_REASONS.contains(&name), "{name}");
        }
        assert!(LEFT_OPEN_REASONS.contains(&NO_RESPONSE) && LEFT_OPEN_REASONS.contains(&RETRIED));
        assert_eq!(LEFT_OPEN_REASONS.len(), INTERRUPTED.len() + 2);
    }

    #[test]
    fn a_failed_grpc_call_releases_its_hold_though_its_http_status_is_200() {
        // A gRPC error in the trailers (the call had begun answering) over HTTP 200.
        let entry = held_entry(
            Some(200),
            &[("x-tollgate-units", "3")],
            &[("grpc-status", "13")],
        );
        assert_eq!(
            hold_to_settle(&entry).expect("a hold").grpc_status,
            Some("13")
        );
        assert_eq!(decision(&entry), Ok(Settlement::Release));
        // A trailers-only answer (or Envoy's own gRPC error answer): grpc-status in the
        // headers.
        let entry = held_entry(Some(200), &[("grpc-status", "14")], &[]);
        assert_eq!(decision(&entry), Ok(Settlement::Release));
        // Not a number: not a success either.
        let entry = held_entry(Some(200), &[], &[("grpc-status", "oops")]);
        assert_eq!(decision(&entry), Ok(Settlement::Release));
        // The trailer is the call's last word when both are logged.
        let entry = held_entry(Some(200), &[("grpc-status", "0")], &[("grpc-status", "2")]);
        assert_eq!(decision(&entry), Ok(Settlement::Release));

        // grpc-status 0 succeeded: captured by the units reported, or in full.
        let entry = held_entry(
            Some(200),
            &[("x-tollgate-units", "3")],
            &[("grpc-status", "0")],
        );
        assert_eq!(decision(&entry), Ok(Settlement::Capture(Some(3))));
        let entry = held_entry(Some(200), &[("grpc-status", "0")], &[]);
        assert_eq!(decision(&entry), Ok(Settlement::Capture(None)));
        // A gRPC server reports its units as trailing metadata; the trailer wins over a
        // header of the same name.
        let entry = held_entry(
            Some(200),
            &[],
            &[("grpc-status", "0"), ("x-tollgate-units", "4")],
        );
        assert_eq!(decision(&entry), Ok(Settlement::Capture(Some(4))));
        let entry = held_entry(
            Some(200),
            &[("x-tollgate-units", "9")],
            &[("grpc-status", "0"), ("x-tollgate-units", "2")],
        );
        assert_eq!(decision(&entry), Ok(Settlement::Capture(Some(2))));
        // ...but never on an HTTP status that releases.
        let entry = held_entry(Some(503), &[], &[("grpc-status", "0")]);
        assert_eq!(decision(&entry), Ok(Settlement::Release));

        // Not gRPC: the HTTP status alone decides.
        let entry = held_entry(Some(200), &[], &[]);
        assert_eq!(decision(&entry), Ok(Settlement::Capture(None)));
        let entry = held_entry(Some(502), &[], &[]);
        assert_eq!(decision(&entry), Ok(Settlement::Release));
    }
}
