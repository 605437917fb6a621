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
//! The stream is lossy by design (Envoy drops entries it cannot send); a hold whose entry
//! is lost follows its `on_expiry` policy at its deadline.

use std::collections::HashMap;
use std::sync::Arc;

use envoy_types::pb::envoy::data::accesslog::v3::HttpAccessLogEntry;
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_server::AccessLogService;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::LogEntries;
use envoy_types::pb::envoy::service::accesslog::v3::{
    StreamAccessLogsMessage, StreamAccessLogsResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use tonic::{Request, Response, Status, Streaming};

use super::{Allowed, Gateway};
use crate::api::auth::TokenCheck;
use crate::ledger::{LedgerError, Refusal};

pub struct AccessLog {
    gateway: Arc<Gateway>,
    service_tokens: TokenCheck,
    /// tollgate's gRPC port listens on loopback only (the chart's sidecar mode): every
    /// caller is on this host.
    local_only: bool,
}

impl AccessLog {
    pub fn new(gateway: Arc<Gateway>, service_tokens: TokenCheck, local_only: bool) -> Self {
        Self {
            gateway,
            service_tokens,
            local_only,
        }
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
    pub held: Option<i64>,
    /// The HTTP status Envoy logged; 0 when Envoy answered without one (e.g. the client
    /// went away).
    pub http_status: u32,
    /// The answer's `grpc-status`, from its trailers, else its headers (a trailers-only
    /// answer); `None` for an answer that is not gRPC (or Envoy not logging it).
    pub grpc_status: Option<&'a str>,
    pub response_headers: &'a HashMap<String, String>,
    pub response_trailers: &'a HashMap<String, String>,
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

/// Where Envoy files the dynamic metadata of an ext_authz Check answer.
pub const EXT_AUTHZ_NAMESPACE: &str = "envoy.filters.http.ext_authz";
const META_HOLD_ID: &str = "tollgate_hold_id";
const META_OPERATION: &str = "tollgate_operation";
const META_HELD: &str = "tollgate_held";
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
    Some(Struct { fields })
}

/// The hold a log entry settles, if the request took one (by the Check answer's dynamic
/// metadata; module docs).
pub fn hold_to_settle(entry: &HttpAccessLogEntry) -> Option<HoldToSettle<'_>> {
    let fields = &entry
        .common_properties
        .as_ref()?
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
        let mut stream = request.into_inner();
        loop {
            let message = match stream.message().await {
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
        let result = self
            .gateway
            .settle(
                hold.hold_id,
                hold.operation,
                hold.held,
                hold.status(),
                &units,
            )
            .await;
        match result {
            Ok(out) => tracing::debug!(
                hold_id = hold.hold_id,
                status = hold.http_status,
                grpc_status = hold.grpc_status,
                captured = out.captured,
                released = out.released,
                replayed = out.replayed,
                "hold settled from the access log"
            ),
            // Settled already (by the upstream, or an earlier copy of this entry).
            Err(LedgerError::Refused(
                Refusal::HoldEnded { .. } | Refusal::IdempotencyKeyReused,
            )) => {}
            Err(err) => tracing::warn!(
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
        AccessLogCommon, HttpRequestProperties, HttpResponseProperties,
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

    /// What the entry settles the hold by, under `capture_statuses = ["2xx"]` and the
    /// units header the entry logged.
    fn decision(entry: &HttpAccessLogEntry) -> Settlement {
        let hold = hold_to_settle(entry).expect("a hold");
        let policy = HoldPolicy::fallback();
        policy.settle(
            hold.status(),
            hold.units(&policy.capture_units_header),
            hold.held,
        )
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
        assert_eq!(decision(&entry), Settlement::Release);
        // A trailers-only answer (or Envoy's own gRPC error answer): grpc-status in the
        // headers.
        let entry = held_entry(Some(200), &[("grpc-status", "14")], &[]);
        assert_eq!(decision(&entry), Settlement::Release);
        // Not a number: not a success either.
        let entry = held_entry(Some(200), &[], &[("grpc-status", "oops")]);
        assert_eq!(decision(&entry), Settlement::Release);
        // The trailer is the call's last word when both are logged.
        let entry = held_entry(Some(200), &[("grpc-status", "0")], &[("grpc-status", "2")]);
        assert_eq!(decision(&entry), Settlement::Release);

        // grpc-status 0 succeeded: captured by the units reported, or in full.
        let entry = held_entry(
            Some(200),
            &[("x-tollgate-units", "3")],
            &[("grpc-status", "0")],
        );
        assert_eq!(decision(&entry), Settlement::Capture(Some(3)));
        let entry = held_entry(Some(200), &[("grpc-status", "0")], &[]);
        assert_eq!(decision(&entry), Settlement::Capture(None));
        // A gRPC server reports its units as trailing metadata; the trailer wins over a
        // header of the same name.
        let entry = held_entry(
            Some(200),
            &[],
            &[("grpc-status", "0"), ("x-tollgate-units", "4")],
        );
        assert_eq!(decision(&entry), Settlement::Capture(Some(4)));
        let entry = held_entry(
            Some(200),
            &[("x-tollgate-units", "9")],
            &[("grpc-status", "0"), ("x-tollgate-units", "2")],
        );
        assert_eq!(decision(&entry), Settlement::Capture(Some(2)));
        // ...but never on an HTTP status that releases.
        let entry = held_entry(Some(503), &[], &[("grpc-status", "0")]);
        assert_eq!(decision(&entry), Settlement::Release);

        // Not gRPC: the HTTP status alone decides; no status at all releases.
        let entry = held_entry(Some(200), &[], &[]);
        assert_eq!(decision(&entry), Settlement::Capture(None));
        let entry = held_entry(Some(502), &[], &[]);
        assert_eq!(decision(&entry), Settlement::Release);
        let entry = held_entry(None, &[], &[]);
        assert_eq!(decision(&entry), Settlement::Release);
    }
}
