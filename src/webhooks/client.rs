//! The HTTP(S) client that POSTs deliveries: hyper with rustls (webpki roots, so no system
//! certificate store is needed in a slim image), one pooled client per dispatcher.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, USER_AGENT};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::signature::{self, HEADER_DELIVERY, HEADER_EVENT, HEADER_SIGNATURE, HEADER_TIMESTAMP};

/// Response bodies are read (so the connection can be reused) up to this size, then
/// dropped: tollgate only needs the status.
pub const RESPONSE_BODY_BYTES_MAX: usize = 64 * 1024;
/// Idle pooled connections are closed after this long.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttemptError {
    #[error("no response within {0} ms")]
    Timeout(u64),
    #[error("request failed: {0}")]
    Transport(String),
    #[error("receiver answered HTTP {0}")]
    Status(u16),
}

impl AttemptError {
    /// The HTTP status, when the receiver answered.
    pub fn status_code(&self) -> u16 {
        match self {
            Self::Status(code) => *code,
            _ => 0,
        }
    }
}

pub struct WebhookClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    url: http::Uri,
    secret: Vec<u8>,
    timeout: Duration,
}

impl WebhookClient {
    /// `url` was validated with the config.
    pub fn new(url: &str, secret: &str, timeout: Duration) -> Result<Self, AttemptError> {
        let url = url
            .parse::<http::Uri>()
            .map_err(|e| AttemptError::Transport(format!("bad url: {e}")))?;
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(https);
        Ok(Self {
            client,
            url,
            secret: secret.as_bytes().to_vec(),
            timeout,
        })
    }

    /// POSTs one delivery, signed now. Ok(status) for a 2xx answer.
    pub async fn post(
        &self,
        delivery_id: &str,
        event_type: &str,
        body: &str,
    ) -> Result<u16, AttemptError> {
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default()
            .to_string();
        let signature = signature::sign(&self.secret, &timestamp, body.as_bytes());
        let request = http::Request::post(self.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(USER_AGENT, concat!("tollgate/", env!("CARGO_PKG_VERSION")))
            .header(HEADER_DELIVERY, delivery_id)
            .header(HEADER_EVENT, event_type)
            .header(HEADER_TIMESTAMP, &timestamp)
            .header(HEADER_SIGNATURE, signature)
            .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
            .map_err(|e| AttemptError::Transport(e.to_string()))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| AttemptError::Transport(error_chain(&e)))?;
            let status = response.status();
            // Drain a bounded body so the connection can serve the next delivery.
            let _ = Limited::new(response.into_body(), RESPONSE_BODY_BYTES_MAX)
                .collect()
                .await;
            Ok(status)
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Err(_) => Err(AttemptError::Timeout(self.timeout.as_millis() as u64)),
            Ok(Err(e)) => Err(e),
            Ok(Ok(status)) if status.is_success() => Ok(status.as_u16()),
            Ok(Ok(status)) => Err(AttemptError::Status(status.as_u16())),
        }
    }
}

/// An error and its causes on one line (hyper's top-level message alone says little).
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
