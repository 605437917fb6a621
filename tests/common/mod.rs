//! Test harness: real redis-server processes on free ports and in-process tollgate
//! servers, each stopped when dropped. No mock stands in for Redis.

#![allow(dead_code)]

pub mod gateways;
pub mod model;
pub mod prom;
pub mod proxy;
pub mod receiver;
pub mod workload;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use tollgate::api::pb;
use tollgate::config::{Config, Overrides};
use tollgate::ledger::{Clock, Ledger};

/// Generous: a busy 2-core CI machine may be slow to start a process.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a test server may take to stop: its shutdown waits up to
/// `tollgate::server::SHUTDOWN_GRACE` for each of its background tasks in turn.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(120);
pub const ADMIN_TOKEN: &str = "test-admin-token";
pub const SERVICE_TOKEN: &str = "test-service-token";

/// A redis-server child on a free port; killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Child,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts with extra arguments (e.g. persistence settings); retries on port races.
    pub fn start_with(extra: &[&str]) -> Self {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let port = free_port();
            let mut child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server must be installed (scripts/test installs it)");
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // exited: probably lost the port race; try another port
                }
                if redis_ping(port) {
                    // Someone else's server may have won the port race: make sure the
                    // one answering is ours.
                    if redis_pid(port) == Some(child.id()) {
                        return Self { port, child };
                    }
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            assert!(Instant::now() < deadline, "redis-server did not start");
        }
    }

    /// Starts a new redis-server on this same port (after `kill`), with an empty dataset.
    pub fn restart(&mut self) {
        self.restart_with(&[]);
    }

    /// Starts a new redis-server on this same port with extra arguments (e.g. the same
    /// AOF directory, so it reloads what was persisted).
    pub fn restart_with(&mut self, extra: &[&str]) {
        self.kill();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let mut child = Command::new("redis-server")
                .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server");
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if redis_ping(self.port) && redis_pid(self.port) == Some(child.id()) {
                    self.child = child;
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            assert!(Instant::now() < deadline, "redis-server did not restart");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("redis url")
    }

    /// Makes the server a replica of a primary that is not there: it keeps its data and
    /// answers every write READONLY, until [`writable`](Self::writable).
    pub fn read_only(&self) {
        let nowhere = free_port().to_string();
        self.replicaof(&["127.0.0.1", &nowhere]);
    }

    /// Undoes [`read_only`](Self::read_only): the replica is promoted (`REPLICAOF NO ONE`).
    pub fn writable(&self) {
        self.replicaof(&["NO", "ONE"]);
    }

    fn replicaof(&self, args: &[&str]) {
        let mut con = self.client().get_connection().expect("redis");
        let _: () = redis::cmd("REPLICAOF")
            .arg(args)
            .query(&mut con)
            .unwrap_or_else(|e| panic!("REPLICAOF {args:?}: {e}"));
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing answers, as with a
    /// hung Redis.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Undoes [`pause`](Self::pause) (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal} redis-server");
    }

    /// Stops the server (as a crash would): SIGKILL.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A replica of `primary`, in sync.
pub fn replica_of(primary: &RedisServer) -> RedisServer {
    replica_through(primary, primary.port)
}

/// A replica of `primary` that reaches it at `port` on loopback (the primary's own, or a
/// proxy's in front of it), in sync.
pub fn replica_through(primary: &RedisServer, port: u16) -> RedisServer {
    let port = port.to_string();
    // A replica stores the RDB of its first sync in its directory: not the crate's.
    let dir = std::env::temp_dir().join(format!("tollgate-replica-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("replica dir");
    let dir = dir.display().to_string();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port, "--dir", &dir]);
    // In sync: the replica's link is up and the primary counts it.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info = |r: &RedisServer| -> String {
            r.client()
                .get_connection()
                .ok()
                .and_then(|mut c| redis::cmd("INFO").arg("replication").query(&mut c).ok())
                .unwrap_or_default()
        };
        if info(&replica).contains("master_link_status:up")
            && info(primary).contains("connected_slaves:1")
        {
            return replica;
        }
        assert!(Instant::now() < deadline, "the replica never synced");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a redis-server answers `PING` on `port`.
pub fn redis_ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// The process id of the redis-server answering on `port`.
pub fn redis_pid(port: u16) -> Option<u32> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
    let mut con = client.get_connection().ok()?;
    let info: String = redis::cmd("INFO").arg("server").query(&mut con).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|v| v.trim().parse().ok())
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A fresh SQLite store path under the system temp dir.
/// The tollgate binary as tests run it: nothing inherited from the `TOLLGATE_*`
/// environment the tests run in, and Redis and check deadlines a busy CI machine does not
/// miss (production's 100 ms fails a call on one scheduling stall; the deadlines
/// themselves are tested in-process with a hung Redis: tests/redis_down.rs and
/// tests/gateway_redis_down.rs, `a_hung_redis_…`).
pub fn tollgate() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TOLLGATE_") {
            cmd.env_remove(name);
        }
    }
    cmd.env("TOLLGATE_REDIS__CALL_TIMEOUT_MS", "2000")
        .env("TOLLGATE_GATEWAY__CHECK_TIMEOUT_MS", "5000")
        // A spool of its own: concurrent processes would contend for one file's lock (the
        // losers running without a spool) and replay each other's charges.
        .env(
            "TOLLGATE_GATEWAY__SPOOL_PATH",
            temp_path("spool").display().to_string(),
        );
    cmd
}

/// The seed of a property test's random runs, printed so a failure can be rerun:
/// `PROPTEST_RNG_SEED=<seed>` (the seed is otherwise new each run).
pub fn proptest_seed(test: &str) -> proptest::test_runner::RngSeed {
    let seed = std::env::var("PROPTEST_RNG_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            nanos ^ (u64::from(std::process::id()) << 32)
        });
    println!("{test}: proptest seed {seed} (rerun with PROPTEST_RNG_SEED={seed})");
    proptest::test_runner::RngSeed::Fixed(seed)
}

/// A child process killed (and reaped) when dropped, also when the test panics.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How long a tollgate command a test runs to its end (`admin`, `restore`, `reconcile`,
/// `bench`, …) may take before [`output_within`] kills it and fails the test: minutes, far
/// more than any of them needs on a busy machine (`reconcile --drain-timeout-secs 120`
/// included), so only a command that hangs reaches it.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs `cmd` to its end within `timeout`, its stdout and stderr captured in files (a pipe
/// nobody reads could stall it), and returns its output. Past the deadline it is killed
/// and the test fails with what it printed: a command that should end (a refused config,
/// say) and serves instead never hangs the test.
pub fn output_within(cmd: &mut Command, timeout: Duration) -> std::process::Output {
    output_and_pid_within(cmd, timeout).0
}

/// [`output_within`], with the process id the command ran as (to look for what it may
/// have left running).
pub fn output_and_pid_within(cmd: &mut Command, timeout: Duration) -> (std::process::Output, u32) {
    let (out_path, err_path) = (temp_path("stdout"), temp_path("stderr"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let pid = child.id();
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} still running after {timeout:?} (killed); stdout:\n{}\nstderr:\n{}",
                read_lossy(&out_path),
                read_lossy(&err_path)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = std::process::Output {
        status,
        stdout: std::fs::read(&out_path).unwrap_or_default(),
        stderr: std::fs::read(&err_path).unwrap_or_default(),
    };
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(&err_path);
    (output, pid)
}

/// A file's text, empty when it cannot be read.
pub fn read_lossy(path: &std::path::Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

/// A child process listening on ports it was given, picked free: see [`spawn_listening`].
pub struct Listening {
    pub child: KillOnDrop,
    pub ports: Vec<u16>,
    /// Where the child's stderr goes.
    pub stderr_path: std::path::PathBuf,
}

impl Listening {
    /// What the child wrote to stderr until now.
    pub fn stderr(&self) -> String {
        read_lossy(&self.stderr_path)
    }

    /// Fails the test if the child has exited, with its status and stderr.
    pub fn assert_running(&mut self, what: &str) {
        if let Some(status) = self.child.0.try_wait().expect("try_wait") {
            panic!(
                "{what}: the child exited ({status}); stderr:\n{}",
                self.stderr()
            );
        }
    }

    /// Sends the child `signal` (`-HUP`, `-TERM`, …), failing the test if it cannot.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.0.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal} {}", self.child.0.id());
    }

    /// Stops the child as a pod is stopped: SIGTERM, then SIGKILL if it has not ended
    /// within [`TERM_GRACE`]. A child that ended already is left alone (its pid may be
    /// another process's by now).
    pub fn terminate(&mut self) {
        let child = &mut self.child.0;
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + TERM_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// How long a child stopped with SIGTERM may take to end before it is killed: generous,
/// its shutdown drains what it serves.
pub const TERM_GRACE: Duration = Duration::from_secs(30);

/// A [`Listening`] child stopped with SIGTERM when dropped ([`Listening::terminate`]),
/// also when the test panics, so that it ends as in production (drains, flushes its logs).
pub struct Terminating(pub Listening);

impl Drop for Terminating {
    fn drop(&mut self) {
        self.0.terminate();
    }
}

// Who listens on a port, from /proc: the library's (the bench's server start uses them
// too). Not every test crate uses each one, as with the rest of this module.
#[allow(unused_imports)]
pub use tollgate::dev::{listeners, listens_on, Listeners, PORT_TAKEN};

/// Starts the child `make` builds for `ports` ports picked free, its stderr in a file, and
/// waits (up to `timeout`) until it is this child that listens on every one of them and
/// `ready` says it answers there.
///
/// A port picked free may be taken by another process before the child binds it, and
/// that process may answer `ready`'s probe. So a probe counts only once /proc shows the
/// child's own sockets listening on every port ([`listens_on`]): from then on nothing else
/// can listen there, and whatever answers is the child. When another process listens on
/// a picked port, the child can never bind it: it is killed and started again on other
/// ports, as it is when it exits saying the port was taken ([`PORT_TAKEN`]), whether or not
/// it ever got to say so. Any other exit, or no answer by the deadline, fails the test
/// with the child's stderr. Every child started is killed when dropped (the last one with
/// the returned [`Listening`]). Linux only (/proc), as the tests' hosts are.
pub async fn spawn_listening<Make, Ready, Fut>(
    ports: usize,
    timeout: Duration,
    make: Make,
    ready: Ready,
) -> Listening
where
    Make: Fn(&[u16]) -> Command,
    Ready: Fn(Vec<u16>) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    spawn_listening_picking(
        || {
            let mut picked: Vec<u16> = Vec::new();
            while picked.len() < ports {
                let port = free_port();
                if !picked.contains(&port) {
                    picked.push(port);
                }
            }
            picked
        },
        timeout,
        make,
        ready,
    )
    .await
}

/// [`spawn_listening`] on the ports `pick` gives each start: a test can hand it a port
/// another process holds, as a lost race would.
pub async fn spawn_listening_picking<Pick, Make, Ready, Fut>(
    mut pick: Pick,
    timeout: Duration,
    make: Make,
    ready: Ready,
) -> Listening
where
    Pick: FnMut() -> Vec<u16>,
    Make: Fn(&[u16]) -> Command,
    Ready: Fn(Vec<u16>) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    // Why each earlier child was given up, for the failure message.
    let mut lost = Vec::new();
    loop {
        let picked = pick();
        let stderr_path = temp_path("stderr");
        let mut cmd = make(&picked);
        let child = cmd
            .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let pid = child.id();
        let mut listening = Listening {
            child: KillOnDrop(child),
            ports: picked,
            stderr_path,
        };
        loop {
            let seen = listeners(pid).unwrap_or_default();
            if let Some(taken) = listening.ports.iter().find(|p| seen.others.contains(p)) {
                lost.push(format!("another process listens on port {taken}"));
                break; // dropping `listening` kills the child
            }
            // Its own sockets first, then the probe: whatever answers is this child.
            let owned = listening.ports.iter().all(|p| seen.own.contains(p));
            let up = owned && ready(listening.ports.clone()).await;
            if let Some(status) = listening.child.0.try_wait().expect("try_wait") {
                let stderr = listening.stderr();
                assert!(
                    stderr.contains(PORT_TAKEN),
                    "{cmd:?} exited ({status}); its stderr:\n{stderr}"
                );
                lost.push(format!("{status}: {}", stderr.trim_end()));
                break;
            }
            if up {
                return listening;
            }
            assert!(
                Instant::now() < deadline,
                "{cmd:?} never listened and answered on ports {:?} within {timeout:?} \
                 (listening itself on {:?}); its stderr:\n{}",
                listening.ports,
                seen.own,
                listening.stderr()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            Instant::now() < deadline,
            "{cmd:?} never listened and answered within {timeout:?}; each start lost a port:\n{}",
            lost.join("\n")
        );
    }
}

pub fn temp_sqlite_url() -> String {
    format!("sqlite://{}", temp_path("db").display())
}

/// A fresh file path under the temp directory, unique to this process and call.
pub fn temp_path(ext: &str) -> std::path::PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join("tollgate-tests");
    std::fs::create_dir_all(&dir).expect("temp dir");
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    dir.join(format!("{}-{n}-{}.{ext}", std::process::id(), unique()))
}

fn unique() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        % 1_000_000_000
}

/// Test config pointing at a redis-server, with test tokens, a private SQLite store and
/// no in-process settler (tests that settle turn it on), so the outbox stays readable.
pub fn test_config(redis_url: &str) -> Config {
    let mut config = Config::from_toml("", Vec::new(), &Overrides::default()).expect("defaults");
    config.redis.url = redis_url.to_owned();
    config.store.url = temp_sqlite_url();
    // A private spool: servers of concurrent tests never replay each other's charges.
    config.gateway.spool_path = temp_path("spool").display().to_string();
    config.settler.enabled = false;
    config.auth.admin_token = ADMIN_TOKEN.into();
    config.auth.service_token = SERVICE_TOKEN.into();
    // Generous deadlines: CI is busy; the deadlines themselves are tested with a hung
    // Redis (tests/redis_down.rs, tests/gateway_redis_down.rs).
    config.redis.call_timeout_ms = 2_000;
    config.gateway.check_timeout_ms = 5_000;
    config
}

/// A ledger over a redis-server, with the given clock, every shard initialized.
pub fn ledger(redis: &RedisServer, clock: Clock) -> Arc<Ledger> {
    let ledger =
        tollgate::server::ledger_from_config(&test_config(&redis.url()), clock).expect("ledger");
    initialize_blocking(&ledger, &redis.url());
    ledger
}

/// Writes every shard's epoch marker (a fresh ledger), over its own connection.
/// A purchase of `amount` credits into `account`'s default wallet, never expiring.
pub fn purchase(account: &str, amount: i64, idempotency_key: &str) -> tollgate::ledger::Grant {
    tollgate::ledger::Grant {
        account_id: account.into(),
        wallet: "default".into(),
        amount,
        kind: tollgate::ledger::LotKind::Purchase,
        priority: 50,
        expires_at_ms: 0,
        description: String::new(),
        idempotency_key: idempotency_key.into(),
        metadata: tollgate::ledger::Metadata::new(),
    }
}

pub fn initialize_blocking(ledger: &Ledger, redis_url: &str) {
    let client = redis::Client::open(redis_url).expect("redis url");
    let mut con = client.get_connection().expect("redis connection");
    // As `serve` writes it: the time in ms (the settler compares it with the store's
    // shard fences, which a restore raises).
    let epoch = tollgate::ledger::new_epoch();
    for shard in 0..ledger.shards().count() {
        let _: Option<String> = redis::cmd("SET")
            .arg(ledger.shards().epoch_key(shard))
            .arg(&epoch)
            .arg("NX")
            .query(&mut con)
            .expect("initialize");
    }
}

pub type AuthChannel = InterceptedService<Channel, Auth>;

#[derive(Clone)]
pub struct Auth(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub fn auth(token: Option<&str>) -> Auth {
    Auth(token.map(|t| format!("Bearer {t}").parse().expect("header")))
}

/// A protobuf message that is field 1 as raw bytes: a string or an embedded message of the
/// test's making (one that is not UTF-8, say), which the generated types cannot hold.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RawField1 {
    #[prost(bytes = "vec", tag = "1")]
    pub field1: Vec<u8>,
}

/// A unary gRPC call of `path` (`/tollgate.v1.Metering/Debit`) sending `message` with the
/// admin token (which Metering takes too); the status it fails with (the test fails if it
/// succeeds).
pub async fn raw_unary_error(
    server: &TestServer,
    path: &'static str,
    message: RawField1,
) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.expect("ready");
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {ADMIN_TOKEN}").parse().expect("header"),
    );
    let codec = tonic_prost::ProstCodec::<RawField1, RawField1>::default();
    grpc.unary(request, http::uri::PathAndQuery::from_static(path), codec)
        .await
        .expect_err("a message that does not decode")
}

/// An in-process tollgate server on free ports; shut down on drop.
pub struct TestServer {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub ledger: Arc<Ledger>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), String>>>,
}

impl TestServer {
    pub async fn start(config: Config, clock: Clock) -> Self {
        Self::start_bound(config, clock, "127.0.0.1:0").await
    }

    /// As [`TestServer::start`], with the gRPC port on every interface (as in a
    /// Kubernetes pod behind a Service) instead of loopback only.
    pub async fn start_on_all_interfaces(config: Config, clock: Clock) -> Self {
        Self::start_bound(config, clock, "0.0.0.0:0").await
    }

    async fn start_bound(config: Config, clock: Clock, grpc_bind: &str) -> Self {
        let default_store = Config::from_toml("", Vec::new(), &Overrides::default())
            .expect("defaults")
            .store
            .url;
        assert_ne!(
            config.store.url, default_store,
            "a test server needs its own store (common::test_config), not the working directory's"
        );
        assert_ne!(
            config.gateway.spool_path,
            tollgate::config::DEFAULT_SPOOL_PATH,
            "a test server needs its own fail-open spool (common::test_config)"
        );
        let ledger = tollgate::server::ledger_from_config(&config, clock).expect("ledger");
        let grpc = tokio::net::TcpListener::bind(grpc_bind)
            .await
            .expect("bind");
        let http = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        // Clients connect over loopback whatever the port listens on.
        let grpc_addr = SocketAddr::from(([127, 0, 0, 1], grpc.local_addr().expect("addr").port()));
        let http_addr = http.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let mut task = tokio::spawn({
            let ledger = ledger.clone();
            async move {
                tollgate::server::run(config, ledger, grpc, http, async {
                    let _ = stopped.await;
                })
                .await
                .map_err(|e| e.to_string())
            }
        });
        // Ready to serve once every shard is initialized (every test server starts on a
        // fresh Redis and store, or a Redis that kept its data); a server that ended or
        // never got there fails the test here, with the reason.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if task.is_finished() {
                let ended = (&mut task).await;
                panic!(
                    "the test server ended during start-up: {}",
                    ended_how(ended)
                );
            }
            let shards = match ledger.initialized_shards().await {
                Ok(shards) if shards.iter().all(|s| *s) => break,
                other => other,
            };
            assert!(
                Instant::now() < deadline,
                "the test server's ledger was not initialized within {START_TIMEOUT:?}: {shards:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self {
            grpc_addr,
            http_addr,
            ledger,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn channel(&self) -> Channel {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match Channel::from_shared(format!("http://{}", self.grpc_addr))
                .expect("uri")
                .connect()
                .await
            {
                Ok(c) => return c,
                Err(e) if Instant::now() > deadline => panic!("cannot connect: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    pub async fn metering(&self) -> pb::metering_client::MeteringClient<AuthChannel> {
        self.metering_with(Some(SERVICE_TOKEN)).await
    }

    pub async fn metering_with(
        &self,
        token: Option<&str>,
    ) -> pb::metering_client::MeteringClient<AuthChannel> {
        pb::metering_client::MeteringClient::with_interceptor(self.channel().await, auth(token))
    }

    pub async fn admin(&self) -> pb::admin_client::AdminClient<AuthChannel> {
        self.admin_with(Some(ADMIN_TOKEN)).await
    }

    pub async fn admin_with(
        &self,
        token: Option<&str>,
    ) -> pb::admin_client::AdminClient<AuthChannel> {
        pb::admin_client::AdminClient::with_interceptor(self.channel().await, auth(token))
    }

    /// Stops the server and waits for it to drain; fails the test if it does not stop
    /// within [`STOP_TIMEOUT`] or ended with an error or a panic.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            match tokio::time::timeout(STOP_TIMEOUT, task).await {
                Err(_) => panic!("the test server did not stop within {STOP_TIMEOUT:?}"),
                Ok(Ok(Ok(()))) => {}
                Ok(ended) => panic!("the test server failed: {}", ended_how(ended)),
            }
        }
    }
}

/// How a test server's task ended, for a failure message.
fn ended_how(ended: Result<Result<(), String>, tokio::task::JoinError>) -> String {
    match ended {
        Ok(Ok(())) => "it returned".into(),
        Ok(Err(e)) => format!("it returned an error: {e}"),
        Err(e) if e.is_panic() => {
            let payload = e.into_panic();
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(not a string)".into());
            format!("it panicked: {message}")
        }
        Err(e) => format!("{e}"),
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take() {
            // A server that already ended by itself (an error or a panic while the test
            // ran) fails the test, unless it is failing already.
            if task.is_finished() && !std::thread::panicking() {
                use std::future::Future;
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                if let std::task::Poll::Ready(ended) = std::pin::Pin::new(&mut task).poll(&mut cx) {
                    if !matches!(ended, Ok(Ok(()))) {
                        panic!("the test server failed: {}", ended_how(ended));
                    }
                }
            }
            task.abort();
        }
    }
}

/// Sets up an organization through the admin API: `org` is granted `credits` (idempotency
/// key "buy"), created with `owner` ("create"), and each `(member, role)` is added by the
/// owner ("add-<member>").
pub async fn org_with_members(
    server: &TestServer,
    org: &str,
    owner: &str,
    credits: i64,
    members: &[(&str, &str)],
) {
    let mut admin = server.admin().await;
    admin
        .grant(pb::GrantRequest {
            account_id: org.into(),
            amount: credits,
            idempotency_key: "buy".into(),
            ..Default::default()
        })
        .await
        .expect("the org buys credits");
    admin
        .create_organization(pb::CreateOrganizationRequest {
            org_id: org.into(),
            owner_id: owner.into(),
            idempotency_key: "create".into(),
        })
        .await
        .expect("create the org");
    for (member, role) in members {
        admin
            .add_member(pb::AddMemberRequest {
                org_id: org.into(),
                member_id: (*member).into(),
                role: (*role).into(),
                actor_id: owner.into(),
                idempotency_key: format!("add-{member}"),
            })
            .await
            .unwrap_or_else(|s| panic!("add {member}: {s:?}"));
    }
}

/// One sweep call on a shard with the sweeper's bounds.
pub async fn sweep_once(ledger: &Ledger, shard: u16) -> tollgate::ledger::SweepOutcome {
    use tollgate::ledger::sweeper::{SWEEP_WALLETS_PER_CALL_MAX, SWEEP_WORK_PER_CALL_MAX};
    ledger
        .sweep_shard(shard, SWEEP_WALLETS_PER_CALL_MAX, SWEEP_WORK_PER_CALL_MAX)
        .await
        .expect("sweep")
}

/// Sweeps every shard until nothing in it is due (each call is bounded, so as many calls
/// as that takes).
pub async fn sweep_all(ledger: &Ledger) {
    for shard in 0..ledger.shards().count() {
        let mut calls = 0;
        while sweep_once(ledger, shard).await.more {
            calls += 1;
            assert!(calls < 100_000, "shard {shard} is never done");
        }
    }
}

/// Every event in every shard's outbox, in stream order per shard.
pub async fn outbox_events(ledger: &Ledger) -> Vec<tollgate::ledger::event::LedgerEvent> {
    let mut all = Vec::new();
    for shard in 0..ledger.shards().count() {
        for entry in outbox_entries(ledger, shard).await {
            all.push(
                tollgate::ledger::event::LedgerEvent::from_stream_entry(shard, &entry)
                    .expect("events parse"),
            );
        }
    }
    all
}

/// A shard outbox's entries as Redis returns them (`[id, [field, value, ...]]` each).
pub async fn outbox_entries(ledger: &Ledger, shard: u16) -> Vec<redis::Value> {
    let value: redis::Value = ledger
        .redis()
        .query(
            redis::cmd("XRANGE")
                .arg(ledger.shards().outbox(shard))
                .arg("-")
                .arg("+"),
        )
        .await
        .expect("xrange");
    match value {
        redis::Value::Array(entries) => entries,
        other => panic!("xrange reply {other:?}"),
    }
}

/// A consumer group that never acknowledges: the outbox keeps every event (trimming
/// respects every group), so tests can compare the store with the full stream.
pub async fn add_observer_group(ledger: &Ledger) {
    for shard in 0..ledger.shards().count() {
        let _: redis::Value = ledger
            .redis()
            .query(
                redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(ledger.shards().outbox(shard))
                    .arg("observer")
                    .arg("0")
                    .arg("MKSTREAM"),
            )
            .await
            .expect("observer group");
    }
}

/// Number of entries in all outboxes.
pub async fn outbox_len(ledger: &Ledger) -> usize {
    let mut n = 0;
    for shard in 0..ledger.shards().count() {
        let len: usize = ledger
            .redis()
            .query(redis::cmd("XLEN").arg(ledger.shards().outbox(shard)))
            .await
            .expect("xlen");
        n += len;
    }
    n
}

/// Entries pending in a consumer group over every shard outbox (only `consumer`'s, when
/// given); None when Redis refuses (the group does not exist yet, say).
pub async fn pending(ledger: &Ledger, group: &str, consumer: Option<&str>) -> Option<i64> {
    let mut total = 0;
    for shard in 0..ledger.shards().count() {
        let mut cmd = redis::cmd("XPENDING");
        cmd.arg(ledger.shards().outbox(shard)).arg(group);
        if let Some(consumer) = consumer {
            cmd.arg("-").arg("+").arg(1_000_000).arg(consumer);
        }
        let reply: redis::Value = ledger.redis().query(&cmd).await.ok()?;
        total += match (consumer, reply) {
            (Some(_), redis::Value::Array(entries)) => entries.len() as i64,
            (None, redis::Value::Array(summary)) => match summary.first() {
                Some(redis::Value::Int(n)) => *n,
                _ => return None,
            },
            _ => return None,
        };
    }
    Some(total)
}

/// A fresh PostgreSQL database for one test (from TOLLGATE_TEST_DATABASE_URL, default
/// postgres://postgres@127.0.0.1:5432/test); dropped with the value.
pub struct PgDatabase {
    pub url: String,
    _db: tollgate::dev::ScratchDatabase,
}

pub fn pg_admin_url() -> String {
    std::env::var("TOLLGATE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

impl PgDatabase {
    /// A fresh database of this test's own, dropped with it.
    pub async fn create() -> Self {
        let name = format!("tollgate_t{}_{}", std::process::id(), unique());
        let db = tollgate::dev::ScratchDatabase::create(&pg_admin_url(), &name)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL must run (scripts/test starts it): {e}"));
        Self {
            url: db.url.clone(),
            _db: db,
        }
    }
}

/// How long [`http_get`] waits for a whole answer before it fails the test: generous, a
/// test server answers in milliseconds when not stalled.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(60);

/// A plain HTTP/1.1 GET: (status, body). Fails the test past [`HTTP_TIMEOUT`].
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    tokio::time::timeout(HTTP_TIMEOUT, http_get_unbounded(addr, path))
        .await
        .unwrap_or_else(|_| panic!("GET {path} via {addr}: no answer within {HTTP_TIMEOUT:?}"))
}

async fn http_get_unbounded(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("http connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    (
        code,
        if chunked {
            dechunk(body)
        } else {
            body.to_owned()
        },
    )
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// How long an attempt of [`eventually`] begun before its deadline may run past it.
const EVENTUALLY_ATTEMPT_GRACE: Duration = Duration::from_secs(10);

/// Polls `f` until it returns Some, or panics with `what` after `timeout`. An attempt that
/// never ends (a call that hangs) fails the test too: each runs at most until the deadline
/// or [`EVENTUALLY_ATTEMPT_GRACE`] from its start, whichever is later.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let bound = deadline
            .saturating_duration_since(Instant::now())
            .max(EVENTUALLY_ATTEMPT_GRACE);
        match tokio::time::timeout(bound, f()).await {
            Ok(Some(v)) => return v,
            Ok(None) => {}
            Err(_) => panic!("timed out waiting for {what}: an attempt ran for {bound:?}"),
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Redis `MONITOR` on a test server: every command it executes, one line each, as Redis
/// prints them (`<time> [<db> <client addr>|lua] "CMD" "arg" …`; commands a script runs say
/// `lua`). The reading thread ends when the monitor is dropped.
pub struct Monitor {
    lines: Arc<std::sync::Mutex<Vec<String>>>,
    stream: std::net::TcpStream,
    port: u16,
}

impl Monitor {
    pub fn start(redis: &RedisServer) -> Self {
        use std::io::{BufRead, BufReader, Write};
        let mut stream =
            std::net::TcpStream::connect(("127.0.0.1", redis.port)).expect("monitor connect");
        stream.write_all(b"MONITOR\r\n").expect("MONITOR");
        let mut reader = BufReader::new(stream.try_clone().expect("monitor stream"));
        let mut ok = String::new();
        reader.read_line(&mut ok).expect("MONITOR answer");
        assert_eq!(ok.trim_end(), "+OK");
        let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in reader.lines() {
                let Ok(line) = line else { return };
                if let Ok(mut lines) = sink.lock() {
                    lines.push(line);
                }
            }
        });
        Self {
            lines,
            stream,
            port: redis.port,
        }
    }

    /// Every line seen until now: sends a marker through another connection and waits for
    /// it, so all that Redis executed before is in.
    pub async fn lines(&self) -> Vec<String> {
        let marker = format!("monitor-mark-{}", MARKS.fetch_add(1, Ordering::Relaxed));
        let client =
            redis::Client::open(format!("redis://127.0.0.1:{}", self.port)).expect("redis url");
        let mut con = client
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        let _: String = redis::cmd("ECHO")
            .arg(&marker)
            .query_async(&mut con)
            .await
            .expect("ECHO");
        eventually(START_TIMEOUT, "the monitor marker", || {
            let lines = self.lines.lock().map(|l| l.clone()).unwrap_or_default();
            let seen = lines.iter().any(|l| l.contains(&marker));
            async move { seen.then_some(lines) }
        })
        .await
    }
}

static MARKS: AtomicUsize = AtomicUsize::new(0);

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// Runs SQL on a test database (PostgreSQL or SQLite, by url) outside the store.
pub async fn run_sql(url: &str, sql: String) {
    if url.starts_with("postgres") {
        let pool = sqlx::PgPool::connect(url).await.expect("pg");
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&pool)
            .await
            .expect("pg sql");
        pool.close().await;
    } else {
        let options = <sqlx::sqlite::SqliteConnectOptions as std::str::FromStr>::from_str(url)
            .expect("sqlite url")
            .create_if_missing(true);
        let pool = sqlx::SqlitePool::connect_with(options)
            .await
            .expect("sqlite");
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&pool)
            .await
            .expect("sqlite sql");
        pool.close().await;
    }
}
