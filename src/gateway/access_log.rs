//! Envoy's gRPC access-log service (`envoy.service.accesslog.v3.AccessLogService/
//! StreamAccessLogs`): charge after the response. For each HTTP log entry of a request
//! that took a hold (its logged request headers carry `x-tollgate-hold-id`), the hold is
//! captured or released by the response status and the units the upstream reported.
//!
//! Envoy must log the headers tollgate reads (examples/envoy.yaml does):
//! `additional_request_headers_to_log: [x-tollgate-hold-id, x-tollgate-operation,
//! x-tollgate-charged]` and `additional_response_headers_to_log: [x-tollgate-units]`
//! (or whatever `capture_units_header` the operations use).
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
use tonic::{Request, Response, Status, Streaming};

use super::{Gateway, HEADER_CHARGED, HEADER_HOLD_ID, HEADER_OPERATION};
use crate::ledger::{LedgerError, Refusal};

pub struct AccessLog {
    gateway: Arc<Gateway>,
}

impl AccessLog {
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }
}

/// What one log entry asks of the ledger. Pure: read from the entry alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldToSettle<'a> {
    pub hold_id: &'a str,
    pub operation: Option<&'a str>,
    pub held: Option<i64>,
    /// 0 when Envoy answered without a status (e.g. the client went away): releases.
    pub status: u32,
    pub response_headers: &'a HashMap<String, String>,
}

/// The hold a log entry settles, if the request took one.
pub fn hold_to_settle(entry: &HttpAccessLogEntry) -> Option<HoldToSettle<'_>> {
    let request = entry.request.as_ref()?;
    let hold_id = request
        .request_headers
        .get(HEADER_HOLD_ID)
        .filter(|h| !h.is_empty())?;
    static EMPTY: std::sync::OnceLock<HashMap<String, String>> = std::sync::OnceLock::new();
    let response = entry.response.as_ref();
    Some(HoldToSettle {
        hold_id,
        operation: request
            .request_headers
            .get(HEADER_OPERATION)
            .map(String::as_str),
        held: request
            .request_headers
            .get(HEADER_CHARGED)
            .and_then(|c| c.parse().ok()),
        status: response
            .and_then(|r| r.response_code.as_ref())
            .map_or(0, |c| c.value),
        response_headers: response
            .map_or_else(|| EMPTY.get_or_init(HashMap::new), |r| &r.response_headers),
    })
}

#[tonic::async_trait]
impl AccessLogService for AccessLog {
    async fn stream_access_logs(
        &self,
        request: Request<Streaming<StreamAccessLogsMessage>>,
    ) -> Result<Response<StreamAccessLogsResponse>, Status> {
        let secret = request
            .metadata()
            .get(self.gateway.shared_secret_header())
            .and_then(|v| v.to_str().ok());
        if !self.gateway.trusts(secret) {
            return Err(Status::permission_denied("untrusted gateway"));
        }
        let mut stream = request.into_inner();
        while let Some(message) = stream.message().await? {
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

impl AccessLog {
    async fn settle(&self, hold: &HoldToSettle<'_>) {
        let headers = hold.response_headers;
        let units = |name: &str| headers.get(name).cloned();
        let result = self
            .gateway
            .settle(hold.hold_id, hold.operation, hold.held, hold.status, &units)
            .await;
        match result {
            Ok(out) => tracing::debug!(
                hold_id = hold.hold_id,
                status = hold.status,
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
    use envoy_types::pb::envoy::data::accesslog::v3::{
        HttpRequestProperties, HttpResponseProperties,
    };

    #[test]
    fn entries_without_a_hold_are_ignored() {
        let mut entry = HttpAccessLogEntry {
            request: Some(HttpRequestProperties::default()),
            response: Some(HttpResponseProperties {
                response_code: Some(envoy_types::pb::google::protobuf::UInt32Value { value: 200 }),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(hold_to_settle(&entry), None);
        let request = entry.request.as_mut().unwrap();
        request
            .request_headers
            .insert(HEADER_HOLD_ID.into(), "h3-7".into());
        request
            .request_headers
            .insert(HEADER_CHARGED.into(), "50".into());
        let hold = hold_to_settle(&entry).expect("a hold");
        assert_eq!(hold.hold_id, "h3-7");
        assert_eq!(hold.held, Some(50));
        assert_eq!(hold.status, 200);
        assert_eq!(hold.operation, None);
    }
}
