//! Real gateways (Envoy, nginx, Traefik) started on free loopback ports with configs
//! generated from the shipped examples and stopped on drop; an upstream HTTP server that
//! records what reaches it; a small HTTP/1.1 client; helpers to seed accounts and keys.
//!
//! A missing gateway binary FAILS the test (never skips it): scripts/test installs them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use envoy_types::pb::envoy::data::accesslog::v3::{
    AccessLogCommon, HttpAccessLogEntry, HttpResponseProperties,
};
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::{
    HttpAccessLogEntries, LogEntries,
};
use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse as CheckAnswer;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use envoy_types::pb::google::protobuf::Struct;
use tollgate::api::pb;
use tollgate::config::{Config, Overrides};

use super::{free_port, listeners, TestServer, ADMIN_TOKEN, SERVICE_TOKEN, START_TIMEOUT};

/// Generous: checks go through a real gateway on a busy 2-core machine.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
pub enum Tool {
    Envoy,
    Nginx,
    Traefik,
}

impl Tool {
    fn env(self) -> &'static str {
        match self {
            Self::Envoy => "TOLLGATE_ENVOY_BIN",
            Self::Nginx => "TOLLGATE_NGINX_BIN",
            Self::Traefik => "TOLLGATE_TRAEFIK_BIN",
        }
    }

    /// Where scripts/tools.sh puts the binary when the variable is not set.
    fn default_paths(self) -> Vec<PathBuf> {
        let venv = std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".cache/tollgate/tools-venv"))
            .unwrap_or_default();
        match self {
            Self::Nginx => vec!["/usr/sbin/nginx".into()],
            Self::Traefik => vec![venv.join("bin/traefik")],
            Self::Envoy => std::fs::read_dir(venv.join("lib"))
                .into_iter()
                .flatten()
                .flatten()
                .map(|python| python.path().join("site-packages/envoy/_bin/envoy"))
                .collect(),
        }
    }
}

/// The gateway binary, or a failure telling how to install it.
pub fn tool_binary(tool: Tool) -> PathBuf {
    let candidates = match std::env::var_os(tool.env()) {
        Some(path) => vec![PathBuf::from(path)],
        None => tool.default_paths(),
    };
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{tool:?} is not installed ({} unset or wrong, and not at the default path): \
                 run scripts/test, which installs nginx, Envoy and Traefik and exports {}",
                tool.env(),
                tool.env()
            )
        })
}

/// A private directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(label: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "tollgate-{label}-{}-{n}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn example(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Replaces text the example must contain (so an edited example fails loudly here).
pub fn replace(text: &str, from: &str, to: &str) -> String {
    assert!(
        text.contains(from),
        "the example no longer contains {from:?}"
    );
    text.replace(from, to)
}

/// A gateway process; SIGTERM on drop (then SIGKILL if it lingers).
pub struct GatewayProcess {
    pub name: &'static str,
    pub addr: SocketAddr,
    child: Child,
    log: PathBuf,
    _dir: TempDir,
}

impl GatewayProcess {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the gateway itself listens on its port and a free route goes through it
    /// to the upstream. The port was picked free, but another process (another test's
    /// gateway) may take it first: an answer counts only once /proc shows the child's own
    /// socket listening there ([`listeners`]; then nobody else can), and another process
    /// listening there gives the start up at once, for another port.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        let port = self.addr.port();
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("{} exited: {status}\n{}", self.name, self.log()));
            }
            let seen = listeners(self.child.id()).unwrap_or_default();
            if seen.others.contains(&port) {
                return Err(format!(
                    "another process listens on {}'s port {port}\n{}",
                    self.name,
                    self.log()
                ));
            }
            if seen.own.contains(&port) {
                // Each probe bounded: the deadline is checked between probes only.
                let probe = try_http(self.addr, "GET", "/v1/ready", &[], "");
                if let Ok(Ok(r)) = tokio::time::timeout(REQUEST_TIMEOUT, probe).await {
                    if r.status == 200 {
                        return Ok(());
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!(
            "{} did not proxy within {START_TIMEOUT:?}\n{}",
            self.name,
            self.log()
        ))
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a gateway, retrying on a lost port race.
async fn start(
    name: &'static str,
    label: &str,
    spawn: impl Fn(&TempDir, u16) -> (Command, PathBuf),
) -> GatewayProcess {
    let mut last = String::new();
    for _ in 0..3 {
        let dir = TempDir::new(label);
        let port = free_port();
        let (mut command, log) = spawn(&dir, port);
        let log_file = std::fs::File::create(&log).expect("log file");
        let child = command
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let mut process = GatewayProcess {
            name,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child,
            log,
            _dir: dir,
        };
        match process.wait_ready().await {
            Ok(()) => return process,
            Err(e) => last = e,
        }
    }
    panic!("{last}");
}

/// Envoy from examples/envoy.yaml: ext_authz and the access log at tollgate's gRPC port.
pub async fn start_envoy(tollgate_grpc: SocketAddr, upstream: SocketAddr) -> GatewayProcess {
    start_envoy_from(tollgate_grpc, upstream, example("envoy.yaml")).await
}

/// As [`start_envoy`], with the example's route timeout (the API's time to answer)
/// replaced by `timeout` (`"5s"`).
pub async fn start_envoy_with_route_timeout(
    tollgate_grpc: SocketAddr,
    upstream: SocketAddr,
    timeout: &str,
) -> GatewayProcess {
    let template = replace(
        &example("envoy.yaml"),
        &format!("timeout: {ENVOY_ROUTE_TIMEOUT}"),
        &format!("timeout: {timeout}"),
    );
    start_envoy_from(tollgate_grpc, upstream, template).await
}

/// The route timeout examples/envoy.yaml sets.
pub const ENVOY_ROUTE_TIMEOUT: &str = "30s";

async fn start_envoy_from(
    tollgate_grpc: SocketAddr,
    upstream: SocketAddr,
    template: String,
) -> GatewayProcess {
    let binary = tool_binary(Tool::Envoy);
    start("envoy", "envoy", move |dir, port| {
        let mut config = replace(
            &template,
            "port_value: 10000",
            &format!("port_value: {port}"),
        );
        config = replace(
            &config,
            "port_value: 50051",
            &format!("port_value: {}", tollgate_grpc.port()),
        );
        config = replace(
            &config,
            "port_value: 9000",
            &format!("port_value: {}", upstream.port()),
        );
        config = replace(
            &config,
            "port_value: 9901",
            &format!("port_value: {}", free_port()),
        );
        // A busy CI machine: give tollgate time (the deadline is tested apart).
        config = replace(&config, "timeout: 0.2s", "timeout: 10s");
        // No SO_REUSEPORT (Envoy's default on Linux): another test's Envoy given the same
        // port must fail to bind it rather than share its connections.
        config = replace(
            &config,
            "  listeners:\n  - name: api\n",
            "  listeners:\n  - name: api\n    enable_reuse_port: false\n",
        );
        let path = dir.0.join("envoy.yaml");
        std::fs::write(&path, config).expect("write envoy.yaml");
        let mut command = Command::new(&binary);
        command
            .arg("-c")
            .arg(&path)
            .args(["--base-id", &(free_port() as u32 * 7 + 1).to_string()])
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "-l",
                "warning",
            ]);
        (command, dir.0.join("envoy.log"))
    })
    .await
}

/// nginx from examples/nginx.conf, auth_request at tollgate's HTTP port.
pub async fn start_nginx(tollgate_http: SocketAddr, upstream: SocketAddr) -> GatewayProcess {
    let binary = tool_binary(Tool::Nginx);
    let template = example("nginx.conf");
    start("nginx", "nginx", move |dir, port| {
        let mut config = replace(
            &template,
            "listen 127.0.0.1:8000;",
            &format!("listen 127.0.0.1:{port};"),
        );
        config = replace(
            &config,
            "server 127.0.0.1:8080;",
            &format!("server {tollgate_http};"),
        );
        config = replace(
            &config,
            "server 127.0.0.1:9000;",
            &format!("server {upstream};"),
        );
        let d = dir.0.display();
        config = replace(
            &config,
            "pid /run/nginx-tollgate.pid;",
            &format!("pid {d}/nginx.pid;"),
        );
        // Private temp and log paths, so parallel tests never share them.
        config = replace(
            &config,
            "http {",
            &format!(
                "http {{\n    access_log {d}/access.log;\n    client_body_temp_path {d}/body;\n    \
                 proxy_temp_path {d}/proxy;\n    fastcgi_temp_path {d}/fastcgi;\n    \
                 uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;"
            ),
        );
        let path = dir.0.join("nginx.conf");
        std::fs::write(&path, config).expect("write nginx.conf");
        let mut command = Command::new(&binary);
        command
            .arg("-p")
            .arg(&dir.0)
            .arg("-c")
            .arg(&path)
            .args(["-e", "stderr"]);
        (command, dir.0.join("nginx.log"))
    })
    .await
}

/// Traefik from examples/traefik.yml, ForwardAuth at tollgate's HTTP port.
pub async fn start_traefik(tollgate_http: SocketAddr, upstream: SocketAddr) -> GatewayProcess {
    let binary = tool_binary(Tool::Traefik);
    let template = example("traefik.yml");
    start("traefik", "traefik", move |dir, port| {
        let path = dir.0.join("traefik.yml");
        let mut config = replace(
            &template,
            "address: \"127.0.0.1:8000\"",
            &format!("address: \"127.0.0.1:{port}\""),
        );
        config = replace(
            &config,
            "http://127.0.0.1:8080/v1/forward-auth",
            &format!("http://{tollgate_http}/v1/forward-auth"),
        );
        config = replace(
            &config,
            "http://127.0.0.1:9000",
            &format!("http://{upstream}"),
        );
        config = replace(
            &config,
            "filename: examples/traefik.yml",
            &format!("filename: {}", path.display()),
        );
        std::fs::write(&path, config).expect("write traefik.yml");
        let mut command = Command::new(&binary);
        command.arg(format!("--configFile={}", path.display()));
        (command, dir.0.join("traefik.log"))
    })
    .await
}

/// What reached the upstream.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: HashMap<String, String>,
}

/// An upstream API served by the test. It answers 200 "ok", or the status in the
/// request's `x-test-status`, with `x-tollgate-units` copied from `x-test-units`. With
/// `x-test-grpc-status` it answers as a gRPC server's trailers-only answer does: HTTP 200,
/// `content-type: application/grpc` and that `grpc-status` header, no body. With
/// `x-test-hang` it records the request and never answers (work still in progress).
pub struct Upstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new()
            .fallback(upstream_handler)
            .with_state(seen.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, seen, task }
    }

    /// Requests that reached the upstream, except readiness probes.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen
            .lock()
            .expect("lock")
            .iter()
            .filter(|s| s.path != "/v1/ready")
            .cloned()
            .collect()
    }

    /// The requests that carried this x-test-tag.
    pub fn seen_tagged(&self, tag: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.headers.get("x-test-tag").map(String::as_str) == Some(tag))
            .collect()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn upstream_handler(
    State(seen): State<Arc<Mutex<Vec<Seen>>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let status = get("x-test-status")
        .and_then(|s| s.parse().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let units = get("x-test-units").map(str::to_owned);
    let grpc_status = get("x-test-grpc-status").and_then(|s| HeaderValue::from_str(s).ok());
    seen.lock().expect("lock").push(Seen {
        method: method.to_string(),
        path: uri.to_string(),
        headers: headers
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect(),
    });
    if get("x-test-hang").is_some() {
        std::future::pending::<()>().await;
    }
    let mut response = match grpc_status {
        Some(code) => {
            let mut r = StatusCode::OK.into_response();
            let h = r.headers_mut();
            h.insert(
                HeaderName::from_static("content-type"),
                HeaderValue::from_static("application/grpc"),
            );
            h.insert(HeaderName::from_static("grpc-status"), code);
            r
        }
        None => (status, "ok").into_response(),
    };
    if let Some(units) = units.and_then(|u| HeaderValue::from_str(&u).ok()) {
        response
            .headers_mut()
            .insert(HeaderName::from_static("x-tollgate-units"), units);
    }
    response
}

#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Lowercase names.
    pub headers: HashMap<String, String>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?} {:?}", self.status, self.body))
    }
}

/// One HTTP/1.1 request (Connection: close); panics past [`REQUEST_TIMEOUT`].
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> HttpResponse {
    tokio::time::timeout(REQUEST_TIMEOUT, try_http(addr, method, path, headers, body))
        .await
        .unwrap_or_else(|_| panic!("{method} {path} via {addr}: no answer in {REQUEST_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("{method} {path} via {addr}: {e}"))
}

pub async fn try_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<HttpResponse> {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: api.example.com\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    try_raw_http(addr, request.as_bytes()).await
}

/// A request written as given (e.g. HTTP/1.0 without a Host header), read to the end of
/// the connection; panics past [`REQUEST_TIMEOUT`].
pub async fn raw_http(addr: SocketAddr, request: &str) -> HttpResponse {
    tokio::time::timeout(REQUEST_TIMEOUT, try_raw_http(addr, request.as_bytes()))
        .await
        .unwrap_or_else(|_| panic!("{request:?} via {addr}: no answer in {REQUEST_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("{request:?} via {addr}: {e}"))
}

async fn try_raw_http(addr: SocketAddr, request: &[u8]) -> std::io::Result<HttpResponse> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(request).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut payload = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let mut map = HashMap::new();
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            map.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    if map.get("transfer-encoding").map(String::as_str) == Some("chunked") {
        payload = dechunk(&payload);
    }
    Ok(HttpResponse {
        status,
        headers: map,
        body: String::from_utf8_lossy(&payload).to_string(),
    })
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(end) = data.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&data[..end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = end + 2;
        let stop = (start + size).min(data.len());
        out.extend_from_slice(&data[start..stop]);
        data = &data[(stop + 2).min(data.len())..];
    }
    out
}

/// The shipped esign price book, pointed at a test redis-server.
/// [`esign_config`] with `gateway.request_id_replay` on: a repeated `x-request-id` is
/// charged once.
pub fn esign_replay_config(redis_url: &str) -> Config {
    let mut config = esign_config(redis_url);
    config.gateway.request_id_replay = true;
    config
}

pub fn esign_config(redis_url: &str) -> Config {
    esign_config_from(redis_url, &example("pricebook-esign.toml"))
}

/// [`esign_config`] from an edited copy of examples/pricebook-esign.toml.
pub fn esign_config_from(redis_url: &str, toml: &str) -> Config {
    let mut config = Config::from_toml(toml, Vec::new(), &Overrides::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let test = super::test_config(redis_url);
    config.redis = test.redis;
    config.auth = test.auth;
    config.store = test.store;
    config.settler = test.settler;
    config.gateway.check_timeout_ms = test.gateway.check_timeout_ms;
    config.gateway.spool_path = test.gateway.spool_path;
    config
}

/// Grants credits to an account and makes it an API key.
pub async fn seed(server: &TestServer, account: &str, credits: i64) -> String {
    let mut admin = server.admin().await;
    if credits > 0 {
        admin
            .grant(pb::GrantRequest {
                account_id: account.into(),
                amount: credits,
                idempotency_key: format!("seed-{account}-{credits}"),
                ..Default::default()
            })
            .await
            .expect("grant");
    }
    admin
        .create_api_key(pb::CreateApiKeyRequest {
            account_id: account.into(),
            name: "test".into(),
            ..Default::default()
        })
        .await
        .expect("create key")
        .into_inner()
        .api_key
}

/// (available, held, used) of an account's default wallet.
pub async fn balance(server: &TestServer, account: &str) -> (i64, i64, i64) {
    let wallets = server
        .ledger
        .balance(account, "default")
        .await
        .expect("balance");
    wallets
        .first()
        .map_or((0, 0, 0), |w| (w.available, w.held, w.used))
}

/// Polls until the balance is as expected (settlement through the access log is
/// asynchronous); panics with the last balance past a generous deadline.
pub async fn wait_balance(server: &TestServer, account: &str, want: (i64, i64, i64)) {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    loop {
        let got = balance(server, account).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{account}: balance (available, held, used) {got:?}, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn admin_token() -> &'static str {
    ADMIN_TOKEN
}

pub fn service_token() -> &'static str {
    SERVICE_TOKEN
}

/// Spellings of tollgate's upstream headers that a backend mapping header names to
/// variables (WSGI, CGI, PHP: `HTTP_X_TOLLGATE_ACCOUNT`; every character but letters and
/// digits becomes `_`) reads as the real ones: a client sends them to forge an account
/// or a hold. A gateway must never pass them on.
pub const FORGED_ALIASES: [(&str, &str); 3] = [
    ("X_Tollgate_Account", "victim"),
    ("X-Tollgate_Hold-Id", "h1-1"),
    ("X.Tollgate.Charge.Id", "forged"),
];

/// Fails when a header that reached the upstream spells a tollgate header other than
/// exactly (`_`, `.` or another token character for a dash): [`FORGED_ALIASES`] got
/// through.
pub fn assert_no_forged_alias(seen: &Seen) {
    for name in seen.headers.keys() {
        let canonical: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        assert!(
            !canonical.starts_with("x-tollgate-") || canonical == *name,
            "the upstream received the forged alias {name:?}: {:?}",
            seen.headers
        );
    }
}

/// Takes a hold through Envoy's Check on `channel` (a tollgate's gRPC port): `POST
/// /v1/documents/d/ocr` with `key`, which examples/pricebook-esign.toml prices as
/// `ocr.pages` (hold 50 for 60 s, `on_expiry = "capture"`; 2 per page on 2xx, released
/// otherwise). Returns the answer's dynamic metadata, which Envoy copies into the
/// request's access-log entry.
pub async fn ocr_hold(channel: tonic::transport::Channel, key: &str, request_id: &str) -> Struct {
    let mut client = AuthorizationClient::new(channel);
    let headers = [("x-api-key", key), ("x-request-id", request_id)]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
    let request = CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "POST".into(),
                    path: "/v1/documents/d/ocr".into(),
                    host: "api.example.com".into(),
                    headers: headers.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    let answer = tokio::time::timeout(REQUEST_TIMEOUT, client.check(request))
        .await
        .expect("the check must not hang")
        .expect("Check")
        .into_inner();
    assert!(
        matches!(answer.http_response, Some(CheckAnswer::OkResponse(_))),
        "{answer:?}"
    );
    answer.dynamic_metadata.expect("hold metadata")
}

/// Envoy's access-log entry of a request whose Check answer set `metadata`, answered by
/// the upstream with `status` and `units` in `x-tollgate-units`.
pub fn access_log_entry(metadata: &Struct, status: u32, units: &str) -> HttpAccessLogEntry {
    HttpAccessLogEntry {
        common_properties: Some(AccessLogCommon {
            metadata: Some(envoy_types::pb::envoy::config::core::v3::Metadata {
                filter_metadata: [(
                    tollgate::gateway::access_log::EXT_AUTHZ_NAMESPACE.to_owned(),
                    metadata.clone(),
                )]
                .into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        response: Some(HttpResponseProperties {
            response_code: Some(envoy_types::pb::google::protobuf::UInt32Value { value: status }),
            response_code_details: "via_upstream".into(),
            response_headers: [("x-tollgate-units".to_owned(), units.to_owned())].into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One message of Envoy's access-log stream carrying `entries`.
pub fn access_log_message(entries: Vec<HttpAccessLogEntry>) -> StreamAccessLogsMessage {
    StreamAccessLogsMessage {
        identifier: None,
        log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries {
            log_entry: entries,
        })),
    }
}
