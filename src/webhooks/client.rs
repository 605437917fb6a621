//! The HTTP(S) client that POSTs deliveries: hyper with rustls (webpki roots, so no system
//! certificate store is needed in a slim image), one pooled client per dispatcher.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, USER_AGENT};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

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
    /// Empty: none.
    secret_previous: Vec<u8>,
    timeout: Duration,
}

impl WebhookClient {
    /// `url` was validated with the config.
    pub fn new(
        url: &str,
        secret: &str,
        secret_previous: &str,
        timeout: Duration,
    ) -> Result<Self, AttemptError> {
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
            // Without a timer the pool only drops an expired connection when it next
            // hands one out: a burst's keep-alive sockets stayed open until the receiver
            // closed them.
            .pool_timer(TokioTimer::new())
            .build(https);
        Ok(Self {
            client,
            url,
            secret: secret.as_bytes().to_vec(),
            secret_previous: secret_previous.as_bytes().to_vec(),
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
        let mut signature = signature::sign(&self.secret, &timestamp, body.as_bytes());
        if !self.secret_previous.is_empty() {
            signature.push(',');
            signature.push_str(&signature::sign(
                &self.secret_previous,
                &timestamp,
                body.as_bytes(),
            ));
        }
        let request = http::Request::post(self.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(USER_AGENT, concat!("tollgate/", env!("CARGO_PKG_VERSION")))
            .header(HEADER_DELIVERY, delivery_id)
            .header(HEADER_EVENT, event_type)
            .header(HEADER_TIMESTAMP, &timestamp)
            .header(HEADER_SIGNATURE, signature)
            .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
            .map_err(|e| AttemptError::Transport(e.to_string()))?;
        let response = match tokio::time::timeout(self.timeout, self.client.request(request)).await
        {
            Err(_) => return Err(AttemptError::Timeout(self.timeout.as_millis() as u64)),
            Ok(Err(e)) => return Err(AttemptError::Transport(error_chain(&e))),
            Ok(Ok(response)) => response,
        };
        // The status is the answer: a 2xx whose body is slow to come was still received
        // (sending it again would be a duplicate). The body is drained, bounded in size and
        // time, so the connection can serve the next delivery; one not drained in time is
        // dropped with its connection.
        let status = response.status();
        let drain = Limited::new(response.into_body(), RESPONSE_BODY_BYTES_MAX).collect();
        let _ = tokio::time::timeout(self.timeout.min(BODY_DRAIN_MAX), drain).await;
        if status.is_success() {
            Ok(status.as_u16())
        } else {
            Err(AttemptError::Status(status.as_u16()))
        }
    }
}

/// The longest a response body is drained after its status came (within the lease
/// margin the dispatcher adds to the timeout).
const BODY_DRAIN_MAX: Duration = Duration::from_secs(1);

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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A receiver that answers 200 at once and then never finishes its body: the
    /// delivery was received, whatever the body does after.
    #[tokio::test]
    async fn a_2xx_with_a_stalled_body_is_a_success() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut request = vec![0u8; 64 * 1024];
            let _ = socket.read(&mut request).await;
            socket
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhalf")
                .await
                .expect("write");
            // Holds the connection open, the body unfinished, past the client's timeout.
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let client = WebhookClient::new(
            &format!("http://{addr}/hook"),
            "secret",
            "",
            Duration::from_millis(1_500),
        )
        .expect("client");
        let answer = client.post("d-1", "balance.low", "{}").await;
        server.abort();
        assert_eq!(answer.expect("a 2xx is a success"), 200);
    }
}
