//! The one place where ledger errors become gRPC statuses, HTTP status codes with a JSON
//! body, and gateway denials (with the status and body a gateway sends the client).

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::gateway::Denial;
use crate::ledger::{LedgerError, Refusal};

/// ErrorInfo domain of tollgate's refusals.
pub const ERROR_DOMAIN: &str = "tollgate.dev";

pub fn to_status(err: LedgerError) -> Status {
    match err {
        LedgerError::InvalidArgument(violations) => {
            let mut details = ErrorDetails::new();
            for v in &violations {
                details.add_bad_request_violation(&v.field, &v.description);
            }
            let message = LedgerError::InvalidArgument(violations).to_string();
            Status::with_error_details(Code::InvalidArgument, message, details)
        }
        LedgerError::Refused(refusal) => {
            let metadata: HashMap<String, String> = refusal
                .metadata()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect();
            let mut details = ErrorDetails::new();
            details.set_error_info(refusal.reason(), ERROR_DOMAIN, metadata);
            // A budget resets with time: retry later, as with a rate limit.
            let code = match refusal {
                Refusal::BudgetExceeded { .. } => Code::ResourceExhausted,
                Refusal::OrgExists => Code::AlreadyExists,
                _ => Code::FailedPrecondition,
            };
            Status::with_error_details(code, refusal.to_string(), details)
        }
        LedgerError::NotFound(what) => Status::not_found(format!("{what} not found")),
        LedgerError::OutboxFull => {
            let mut details = ErrorDetails::new();
            details.set_error_info("OUTBOX_FULL", ERROR_DOMAIN, HashMap::new());
            Status::with_error_details(
                Code::ResourceExhausted,
                "outbox full: the settler is behind",
                details,
            )
        }
        LedgerError::ExpiryBacklog => {
            let mut details = ErrorDetails::new();
            details.set_error_info("EXPIRY_BACKLOG", ERROR_DOMAIN, HashMap::new());
            Status::with_error_details(
                Code::Unavailable,
                "too many holds past their deadline to end in one call: retry",
                details,
            )
        }
        LedgerError::NotInitialized => {
            let mut details = ErrorDetails::new();
            details.set_error_info("LEDGER_NOT_INITIALIZED", ERROR_DOMAIN, HashMap::new());
            Status::with_error_details(
                Code::Unavailable,
                "ledger not initialized: Redis lost its data and awaits tollgate restore",
                details,
            )
        }
        LedgerError::Unavailable(why) => {
            crate::log_throttled!(WARN, error = %why, "redis unavailable");
            Status::unavailable("ledger unavailable")
        }
        LedgerError::Internal(why) => {
            crate::log_throttled!(ERROR, error = %why, "internal ledger error");
            Status::internal("internal ledger error")
        }
    }
}

/// A ledger error met while charging a gateway check of `operation`, which charges
/// `wallet`, as a gateway denial. (Redis unavailability is decided by the operation's fail
/// policy before this.)
pub fn gateway_denial(err: LedgerError, operation: &str, wallet: &str) -> Denial {
    match err {
        LedgerError::Refused(Refusal::InsufficientCredits {
            required,
            available,
        }) => Denial::InsufficientCredits {
            required,
            available,
            operation: operation.to_owned(),
            wallet: wallet.to_owned(),
        },
        LedgerError::Refused(Refusal::AllocationExceeded {
            required,
            remaining,
        }) => Denial::AllocationExceeded {
            required,
            remaining,
            operation: operation.to_owned(),
            wallet: wallet.to_owned(),
        },
        LedgerError::Refused(Refusal::BudgetExceeded {
            budget,
            limit,
            spent,
            resets_at_ms,
        }) => Denial::BudgetExceeded {
            budget: budget.as_str(),
            limit,
            spent,
            resets_at_ms,
            operation: operation.to_owned(),
            wallet: wallet.to_owned(),
        },
        LedgerError::Refused(Refusal::IdempotencyKeyReused) => Denial::RequestIdReused,
        LedgerError::Refused(Refusal::KeyRevoked { .. }) => Denial::RevokedKey,
        LedgerError::Refused(Refusal::HoldLimit { .. })
        | LedgerError::OutboxFull
        | LedgerError::ExpiryBacklog => Denial::Busy,
        LedgerError::Unavailable(_) => Denial::Unavailable,
        LedgerError::NotInitialized => Denial::NotInitialized,
        // An org key whose member was removed from the org since.
        LedgerError::InvalidArgument(violations)
            if violations.iter().any(|v| v.field == "member_id") =>
        {
            Denial::NotAMember
        }
        LedgerError::InvalidArgument(violations) => {
            // The price book and the identity made these fields: a configuration the
            // ledger refuses (e.g. an account id a key was made for before a rule change).
            crate::log_throttled!(
                ERROR,
                error = %LedgerError::InvalidArgument(violations),
                operation,
                "the ledger refused a gateway charge"
            );
            Denial::Internal
        }
        other => {
            crate::log_throttled!(ERROR, error = %other, operation, "gateway charge failed");
            Denial::Internal
        }
    }
}

/// How a gateway denial looks to the client: HTTP status, the `x-tollgate-reason` value
/// and a JSON body `{"error": reason, ...}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenialResponse {
    pub status: u16,
    pub reason: &'static str,
    pub body: String,
}

pub fn denial_response(denial: &Denial) -> DenialResponse {
    use serde_json::{json, Value};
    let (status, reason, fields): (u16, &'static str, Vec<(&str, Value)>) = match denial {
        Denial::MissingKey => (401, "missing_api_key", vec![]),
        Denial::UnknownKey => (401, "unknown_api_key", vec![]),
        Denial::RevokedKey => (403, "revoked_api_key", vec![]),
        Denial::UntrustedGateway => (403, "untrusted_gateway", vec![]),
        Denial::BadHeader { header, message } => (
            400,
            "bad_header",
            vec![("header", json!(header)), ("message", json!(message))],
        ),
        Denial::BadPath { message } => (
            400,
            "bad_path",
            vec![("field", json!("path")), ("message", json!(message))],
        ),
        Denial::NoRoute => (403, "no_route", vec![]),
        Denial::InsufficientCredits {
            required,
            available,
            operation,
            wallet,
        } => (
            402,
            "insufficient_credits",
            vec![
                ("required", json!(required)),
                ("available", json!(available)),
                ("operation", json!(operation)),
                ("wallet", json!(wallet)),
            ],
        ),
        Denial::AllocationExceeded {
            required,
            remaining,
            operation,
            wallet,
        } => (
            402,
            "allocation_exceeded",
            vec![
                ("limit", json!("allocation")),
                ("required", json!(required)),
                ("remaining", json!(remaining)),
                ("operation", json!(operation)),
                ("wallet", json!(wallet)),
            ],
        ),
        Denial::BudgetExceeded {
            budget,
            limit,
            spent,
            resets_at_ms,
            operation,
            wallet,
        } => (
            429,
            "budget_exceeded",
            vec![
                ("budget", json!(budget)),
                ("limit", json!(limit)),
                ("spent", json!(spent)),
                ("resets_at_ms", json!(resets_at_ms)),
                ("operation", json!(operation)),
                ("wallet", json!(wallet)),
            ],
        ),
        Denial::NotAMember => (403, "not_a_member", vec![]),
        Denial::Unavailable => (503, "unavailable", vec![]),
        Denial::NotInitialized => (503, "ledger_not_initialized", vec![]),
        Denial::RequestIdReused => (409, "request_id_reused", vec![]),
        Denial::Busy => (429, "busy", vec![]),
        Denial::Internal => (500, "internal", vec![]),
    };
    metrics::counter!(crate::telemetry::metrics::GATEWAY_DENIALS_TOTAL, "reason" => reason)
        .increment(1);
    // Written by hand to keep the documented field order ("error" first).
    let mut body = format!("{{\"error\":\"{reason}\"");
    for (name, value) in fields {
        body.push_str(&format!(",\"{name}\":{value}"));
    }
    body.push('}');
    DenialResponse {
        status,
        reason,
        body,
    }
}

/// A ledger error on the HTTP side (hold settlement endpoints): status and JSON body.
pub fn http_error(err: LedgerError) -> (u16, serde_json::Value) {
    use serde_json::json;
    match err {
        LedgerError::InvalidArgument(violations) => (
            400,
            json!({
                "error": "invalid_argument",
                "fields": violations
                    .iter()
                    .map(|v| json!({ "field": v.field, "description": v.description }))
                    .collect::<Vec<_>>(),
            }),
        ),
        LedgerError::Refused(refusal) => {
            let mut body = serde_json::Map::new();
            body.insert("error".into(), refusal.reason().to_ascii_lowercase().into());
            // ErrorInfo metadata is text; in JSON the numbers are numbers, as in the
            // success body (the text values, `ended` and `budget`, are words).
            for (k, v) in refusal.metadata() {
                let value = v.parse::<i64>().map_or_else(|_| v.into(), Into::into);
                body.insert(k.into(), value);
            }
            (409, serde_json::Value::Object(body))
        }
        LedgerError::NotFound(what) => (404, json!({ "error": "not_found", "what": what })),
        LedgerError::OutboxFull => (429, json!({ "error": "outbox_full" })),
        LedgerError::ExpiryBacklog => (503, json!({ "error": "expiry_backlog" })),
        LedgerError::NotInitialized => (503, json!({ "error": "ledger_not_initialized" })),
        LedgerError::Unavailable(why) => {
            crate::log_throttled!(WARN, error = %why, "redis unavailable");
            (503, json!({ "error": "unavailable" }))
        }
        LedgerError::Internal(why) => {
            crate::log_throttled!(ERROR, error = %why, "internal ledger error");
            (500, json!({ "error": "internal" }))
        }
    }
}

/// Durable-store errors (history, webhook deliveries) as statuses.
pub fn store_to_status(err: crate::settle::StoreError) -> Status {
    use crate::settle::StoreError;
    crate::log_throttled!(WARN, error = %err, "store error");
    match err {
        StoreError::Corrupt(_) => Status::internal("ledger store error"),
        _ => Status::unavailable("ledger store unavailable"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_402_body_is_the_documented_one() {
        let d = denial_response(&Denial::InsufficientCredits {
            required: 46,
            available: 3,
            operation: "envelope.send".into(),
            wallet: "esign".into(),
        });
        assert_eq!(d.status, 402);
        assert_eq!(
            d.body,
            r#"{"error":"insufficient_credits","required":46,"available":3,"operation":"envelope.send","wallet":"esign"}"#
        );
        let allocation = denial_response(&Denial::AllocationExceeded {
            required: 46,
            remaining: 10,
            operation: "envelope.send".into(),
            wallet: "esign".into(),
        });
        assert_eq!(
            allocation.body,
            r#"{"error":"allocation_exceeded","limit":"allocation","required":46,"remaining":10,"operation":"envelope.send","wallet":"esign"}"#
        );
        let budget = denial_response(&Denial::BudgetExceeded {
            budget: "member",
            limit: 100,
            spent: 90,
            resets_at_ms: 1_764_000_000_000,
            operation: "envelope.send".into(),
            wallet: "esign".into(),
        });
        assert_eq!((budget.status, budget.reason), (429, "budget_exceeded"));
        assert_eq!(
            budget.body,
            r#"{"error":"budget_exceeded","budget":"member","limit":100,"spent":90,"resets_at_ms":1764000000000,"operation":"envelope.send","wallet":"esign"}"#
        );
        let bad = denial_response(&Denial::BadHeader {
            header: "x-signers".into(),
            message: "must be a \"number\"".into(),
        });
        let parsed: serde_json::Value = serde_json::from_str(&bad.body).expect("valid JSON");
        assert_eq!(parsed["header"], "x-signers");
        assert_eq!(
            denial_response(&Denial::MissingKey).body,
            r#"{"error":"missing_api_key"}"#
        );
    }

    #[test]
    fn the_http_409_body_gives_numbers_as_numbers() {
        let (status, body) = http_error(LedgerError::Refused(Refusal::HoldEnded {
            how: crate::ledger::HoldEnd::Captured,
            captured: 6,
        }));
        assert_eq!(status, 409);
        assert_eq!(
            body,
            serde_json::json!({ "error": "hold_ended", "ended": "captured", "captured": 6 })
        );
    }
}
