//! A webhook receiver for tests: records every POST (headers and body), answers 503 while
//! told to fail and 200 otherwise; told to hold an account, it answers that account's
//! POSTs only once released (a receiver hanging on one account). Verifies nothing itself:
//! tests check the signatures with their own HMAC.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub delivery_id: String,
    pub event_type: String,
    pub timestamp: String,
    pub signature: String,
    pub body: String,
    /// Whether the receiver answered 2xx to it.
    pub accepted: bool,
}

impl Received {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).expect("delivery body is JSON")
    }
}

struct Inner {
    received: Vec<Received>,
    failing: bool,
    /// POSTs of this account (the body's `account_id`) wait for `release`.
    held_account: Option<String>,
    release: tokio::sync::watch::Sender<bool>,
    /// POSTs waiting for `release` now (one whose connection the client closed is
    /// dropped by the server, and counted out).
    held_now: usize,
}

/// Counts a held POST out when it is answered or dropped.
struct HeldGuard(Arc<Mutex<Inner>>);

impl Drop for HeldGuard {
    fn drop(&mut self) {
        if let Ok(mut inner) = self.0.lock() {
            inner.held_now -= 1;
        }
    }
}

pub struct Receiver {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    task: tokio::task::JoinHandle<()>,
}

fn header(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

async fn hook(
    State(inner): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    body: String,
) -> StatusCode {
    let account = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["account_id"].as_str().map(str::to_owned));
    let (accepted, held) = {
        let mut state = inner.lock().expect("receiver lock");
        let accepted = !state.failing;
        state.received.push(Received {
            delivery_id: header(&headers, "x-tollgate-delivery"),
            event_type: header(&headers, "x-tollgate-event"),
            timestamp: header(&headers, "x-tollgate-timestamp"),
            signature: header(&headers, "x-tollgate-signature"),
            body,
            accepted,
        });
        let held = (state.held_account.is_some() && state.held_account == account).then(|| {
            state.held_now += 1;
            (HeldGuard(inner.clone()), state.release.subscribe())
        });
        (accepted, held)
    };
    if let Some((_guard, mut released)) = held {
        let _ = released.wait_for(|r| *r).await;
    }
    if accepted {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

impl Receiver {
    pub async fn start() -> Self {
        let inner = Arc::new(Mutex::new(Inner {
            received: Vec::new(),
            failing: false,
            held_account: None,
            release: tokio::sync::watch::channel(false).0,
            held_now: 0,
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().expect("addr");
        let app = axum::Router::new()
            .route("/hook", post(hook))
            .with_state(inner.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, inner, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// While failing, every POST gets 503.
    pub fn set_failing(&self, failing: bool) {
        self.inner.lock().expect("receiver lock").failing = failing;
    }

    /// From now on, POSTs of `account` are answered only after `release`.
    pub fn hold_account(&self, account: &str) {
        let mut inner = self.inner.lock().expect("receiver lock");
        inner.held_account = Some(account.to_owned());
        inner.release.send_replace(false);
    }

    /// Answers the held POSTs, and holds no more.
    pub fn release(&self) {
        let mut inner = self.inner.lock().expect("receiver lock");
        inner.held_account = None;
        inner.release.send_replace(true);
    }

    /// POSTs being held now (their client still waiting).
    pub fn held_now(&self) -> usize {
        self.inner.lock().expect("receiver lock").held_now
    }

    pub fn received(&self) -> Vec<Received> {
        self.inner.lock().expect("receiver lock").received.clone()
    }

    pub fn accepted(&self) -> Vec<Received> {
        self.received().into_iter().filter(|r| r.accepted).collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The signature a delivery must carry: HMAC-SHA256(secret, timestamp + "." + body),
/// computed here independently of tollgate's code.
pub fn expected_signature(secret: &str, timestamp: &str, body: &str) -> String {
    use hmac::{Hmac, KeyInit, Mac};
    let mut mac =
        <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}
