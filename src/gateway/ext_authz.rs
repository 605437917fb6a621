//! Envoy ext_authz v3 (`envoy.service.auth.v3.Authorization/Check`): decode the
//! CheckRequest, decide with [`Gateway::check`], encode the CheckResponse.

use std::sync::{Arc, LazyLock};

use envoy_types::ext_authz::v3::pb::{
    Authorization, CheckRequest, CheckResponse, DeniedHttpResponse, HeaderAppendAction,
    HeaderValue, HeaderValueOption, HttpResponse, HttpStatus, OkHttpResponse,
};
use envoy_types::pb::google::rpc;
use tonic::{Request, Response, Status};

use super::aliases::HeaderAliases;
use super::{
    Call, Decision, Denial, Gateway, MethodOverride, HEADER_REQUEST_ID, METHOD_OVERRIDE_HEADERS,
    UPSTREAM_HEADERS,
};
use crate::api::status::{denial_response, to_status};
use crate::ledger::command::FieldViolation;
use crate::ledger::LedgerError;

/// google.rpc codes of the CheckResponse status (Envoy only tells OK from not OK).
const RPC_OK: i32 = 0;
const RPC_PERMISSION_DENIED: i32 = 7;
const RPC_UNAUTHENTICATED: i32 = 16;
const RPC_UNAVAILABLE: i32 = 14;
const RPC_INVALID_ARGUMENT: i32 = 3;

pub struct ExtAuthz {
    gateway: Arc<Gateway>,
}

impl ExtAuthz {
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }
}

#[tonic::async_trait]
impl Authorization for ExtAuthz {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let secret = request
            .metadata()
            .get(self.gateway.shared_secret_header())
            .and_then(|v| v.to_str().ok());
        if !self.gateway.trusts(secret) {
            return Ok(Response::new(denied(&Denial::UntrustedGateway)));
        }
        let request = request.into_inner();
        let Some(http) = request
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref())
        else {
            // A BadRequest naming the field, as every INVALID_ARGUMENT (a plain status
            // named it only in its message).
            return Err(to_status(LedgerError::InvalidArgument(vec![
                FieldViolation::new("attributes.request.http", "is required"),
            ])));
        };
        let headers = &http.headers;
        let lookup = |name: &str| headers.get(name).map(String::as_str);
        let request_id = headers
            .get(HEADER_REQUEST_ID)
            .map(String::as_str)
            .or((!http.id.is_empty()).then_some(http.id.as_str()));
        let host = if http.host.is_empty() {
            headers.get(":authority").map_or("", String::as_str)
        } else {
            &http.host
        };
        let call = Call {
            method: &http.method,
            host,
            path: &http.path,
            request_id,
            headers: &lookup,
        };
        let decision = self.gateway.check(&call).await;
        Ok(Response::new(match decision {
            Decision::Allow(allowed) => {
                let upstream = allowed.upstream_headers();
                // Other spellings of tollgate's upstream headers and of the headers the
                // price book reads (units, variants): the upstream must read only what
                // was priced. The book's list is made when it is loaded, not here. So are
                // those of the method-override headers when they are refused (the check
                // read the real names only).
                let book = self.gateway.pricebook_now();
                let overrides = match self.gateway.method_override() {
                    MethodOverride::Refuse => Some(&*OVERRIDE_ALIASES),
                    MethodOverride::Ignore => None,
                };
                let priced = book.request_header_aliases();
                let headers_to_remove = UPSTREAM_HEADERS
                    .iter()
                    .filter(|h| !upstream.iter().any(|(set, _)| set == *h))
                    .map(|h| (*h).to_owned())
                    .chain(
                        headers
                            .keys()
                            .filter(|n| {
                                UPSTREAM_ALIASES.is_alias(n)
                                    || priced.is_alias(n)
                                    || overrides.is_some_and(|o| o.is_alias(n))
                            })
                            .cloned(),
                    )
                    .collect();
                CheckResponse {
                    status: Some(rpc::Status {
                        code: RPC_OK,
                        ..Default::default()
                    }),
                    http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                        headers: upstream.into_iter().map(overwrite).collect(),
                        headers_to_remove,
                        response_headers_to_add: allowed
                            .client_headers()
                            .into_iter()
                            .map(overwrite)
                            .collect(),
                        ..Default::default()
                    })),
                    // The access log names the hold by this, not by a header a client
                    // could send (access_log.rs).
                    dynamic_metadata: super::access_log::hold_metadata(&allowed),
                }
            }
            Decision::Deny(denial) => denied(&denial),
        }))
    }
}

/// Other spellings of tollgate's upstream headers and of the method-override headers
/// (see [`HeaderAliases::is_alias`]). Envoy forwards such names by default
/// (`headers_with_underscores_action: ALLOW`, and no setting at all for dots), so the
/// Check answer removes them with the client's own values of the real names. Names come
/// lowercased from Envoy.
static UPSTREAM_ALIASES: LazyLock<HeaderAliases> =
    LazyLock::new(|| HeaderAliases::new(UPSTREAM_HEADERS));
static OVERRIDE_ALIASES: LazyLock<HeaderAliases> =
    LazyLock::new(|| HeaderAliases::new(METHOD_OVERRIDE_HEADERS));

fn overwrite((key, value): (&str, String)) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value,
            ..Default::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

fn denied(denial: &Denial) -> CheckResponse {
    let response = denial_response(denial);
    let code = match response.status {
        401 => RPC_UNAUTHENTICATED,
        400 => RPC_INVALID_ARGUMENT,
        503 => RPC_UNAVAILABLE,
        _ => RPC_PERMISSION_DENIED,
    };
    CheckResponse {
        status: Some(rpc::Status {
            code,
            message: response.reason.to_owned(),
            details: Vec::new(),
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: i32::from(response.status),
            }),
            headers: vec![
                overwrite(("content-type", "application/json".to_owned())),
                overwrite(("x-tollgate-reason", response.reason.to_owned())),
            ],
            body: response.body,
        })),
        dynamic_metadata: None,
    }
}

#[cfg(test)]
mod tests {
    use super::{HeaderAliases, UPSTREAM_ALIASES};

    #[test]
    fn other_spellings_of_tollgate_headers_are_aliases() {
        for alias in [
            "x_tollgate_account",
            "x-tollgate_hold-id",
            "x.tollgate.charge.id",
            "x-tollgate~operation",
        ] {
            assert!(UPSTREAM_ALIASES.is_alias(alias), "{alias}");
        }
        for name in [
            "x-tollgate-account",
            "x-tollgate-hold-id",
            "x-tollgate-units",
            "x_tollgate_accounts",
            "x-tollgateaaccount",
            "authorization",
        ] {
            assert!(!UPSTREAM_ALIASES.is_alias(name), "{name}");
        }
    }

    /// The price book's own headers are guarded too, whichever way they are spelled.
    #[test]
    fn other_spellings_of_priced_headers_are_aliases() {
        let priced = HeaderAliases::new(["x-signature-method", "x_pages"]);
        for alias in [
            "x.signature.method",
            "x_signature_method",
            "x-pages",
            "x.pages",
        ] {
            assert!(priced.is_alias(alias), "{alias}");
        }
        for name in [
            "x-signature-method",
            "x_pages",
            "x-signers",
            "x-signature-methods",
        ] {
            assert!(!priced.is_alias(name), "{name}");
        }
    }
}
