//! The `tollgate serve` child a bench starts when it has no --target: the current
//! executable with a generated config (a priced bench route, no in-process settler),
//! killed when dropped — also when the bench is interrupted.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::process::{Child, Command};

use super::{Durability, BENCH_OPERATION, BENCH_PATH};
use crate::dev::DevRedis;
use crate::ledger::WaitReplicas;

pub const ADMIN_TOKEN: &str = "bench-admin-token";
pub const SERVICE_TOKEN: &str = "bench-service-token";
/// How long the child gets to answer /readyz.
pub const SERVER_START_TIMEOUT: Duration = Duration::from_secs(60);
/// How many times a bench server is started on fresh ports when one was taken.
const SERVER_START_ATTEMPTS: usize = 5;
/// How long a bench replica gets to finish its first sync.
pub const REPLICA_SYNC_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a killed child gets to be gone before its directory is removed anyway.
const EXIT_WAIT: Duration = Duration::from_secs(5);
/// Lines of the child server's log an error quotes (the log is removed with its directory).
const LOG_TAIL_LINES: usize = 40;

/// A fresh directory of this process's own under the temp directory, named
/// `tollgate-bench-{what}-{pid}-{n}`: every call gets another one (the two stacks of
/// `--versus-accounts` never share one), and one left behind by an earlier process with
/// the same id is not reused.
pub fn private_dir(what: &str) -> Result<PathBuf, String> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("tollgate-bench-{what}-{}-{n}", std::process::id()));
        match std::fs::create_dir(&path) {
            Ok(()) => return Ok(path),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    }
}

/// Whether process `pid` has exited (gone, or a zombie nobody reaped yet), from
/// /proc/<pid>/stat; true where there is no /proc.
fn exited(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    // The state follows the command name, which may hold spaces: look after its ')'.
    stat.rfind(')')
        .and_then(|i| stat.get(i + 1..))
        .and_then(|rest| rest.split_whitespace().next())
        .is_some_and(|state| state == "Z" || state == "X")
}

/// Waits (blocking, at most [`EXIT_WAIT`]) until every process of `pids` has exited.
fn wait_exited(pids: &[u32]) {
    let deadline = std::time::Instant::now() + EXIT_WAIT;
    while !pids.iter().all(|&pid| exited(pid)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The last [`LOG_TAIL_LINES`] lines of a log file (empty when it cannot be read).
fn log_tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    let from = lines.len().saturating_sub(LOG_TAIL_LINES);
    let mut tail = String::new();
    if from > 0 {
        tail.push_str(&format!("[{from} earlier lines left out]\n"));
    }
    tail.push_str(&lines[from..].join("\n"));
    tail
}

/// The bench's private redis-server at a durability level (and its replica for
/// `replica-wait`); killed, and then its AOF directory removed, when dropped.
pub struct BenchRedis {
    url: String,
    /// Always Some until dropped (taken in `drop` to kill the servers before the directory
    /// goes).
    primary: Option<DevRedis>,
    replica: Option<DevRedis>,
    /// Process ids of the primary and the replica (to wait for their exit).
    pids: Vec<u32>,
    dir: Option<PathBuf>,
}

impl BenchRedis {
    pub async fn start(durability: Durability) -> Result<Self, String> {
        let mut dir = None;
        let mut args: Vec<String> = durability
            .redis_args()
            .iter()
            .map(|a| (*a).to_owned())
            .collect();
        if durability != Durability::None {
            // AOF files, and the RDB a replica receives on its first sync, go to a private
            // directory (not the current one), one per stack.
            let path = private_dir(&format!("redis-{}", durability.name()))?;
            args.extend(["--dir".to_owned(), path.display().to_string()]);
            dir = Some(path);
        }
        let mut this = Self {
            url: String::new(),
            primary: None,
            replica: None,
            pids: Vec::new(),
            dir,
        };
        // From here on a failure drops `this`: what was started is killed, the directory
        // removed.
        let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let primary = DevRedis::start_with(&arg_refs).await?;
        this.url = primary.url.clone();
        this.pids.extend(redis_pid(&primary.url).await);
        this.primary = Some(primary);
        if durability == Durability::ReplicaWait {
            let port = this
                .url
                .rsplit(':')
                .next()
                .ok_or("bad redis url")?
                .to_owned();
            let dir = this
                .dir
                .as_ref()
                .ok_or("no directory for the replica")?
                .display()
                .to_string();
            let replica =
                DevRedis::start_with(&["--replicaof", "127.0.0.1", &port, "--dir", &dir]).await?;
            this.pids.extend(redis_pid(&replica.url).await);
            let replica_url = replica.url.clone();
            this.replica = Some(replica);
            wait_in_sync(&this.url, &replica_url).await?;
        }
        Ok(this)
    }

    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for BenchRedis {
    /// Kills the replica and the primary (a `DevRedis` is killed when dropped), waits until
    /// they have exited, and only then removes their directory: a live redis-server could
    /// still write into it.
    fn drop(&mut self) {
        drop(self.replica.take());
        drop(self.primary.take());
        if let Some(dir) = &self.dir {
            wait_exited(&self.pids);
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The process id a redis-server reports (`INFO server`), None when it cannot be had.
async fn redis_pid(url: &str) -> Option<u32> {
    let client = redis::Client::open(url).ok()?;
    let mut con = client.get_multiplexed_async_connection().await.ok()?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut con)
        .await
        .ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Waits until the replica's link is up and the primary counts it.
async fn wait_in_sync(primary_url: &str, replica_url: &str) -> Result<(), String> {
    async fn info(url: &str) -> String {
        let Ok(client) = redis::Client::open(url) else {
            return String::new();
        };
        let Ok(mut con) = client.get_multiplexed_async_connection().await else {
            return String::new();
        };
        redis::cmd("INFO")
            .arg("replication")
            .query_async::<String>(&mut con)
            .await
            .unwrap_or_default()
    }
    let deadline = tokio::time::Instant::now() + REPLICA_SYNC_TIMEOUT;
    loop {
        if info(replica_url).await.contains("master_link_status:up")
            && info(primary_url).await.contains("connected_slaves:1")
        {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "the bench replica did not sync within {} s",
                REPLICA_SYNC_TIMEOUT.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Where the child server settles (`--settle-into`).
pub enum SettleStore {
    /// A fresh SQLite file in the bench's directory.
    Sqlite,
    /// A fresh PostgreSQL database (its URL).
    Postgres(String),
}

pub struct BenchServer {
    pub grpc_addr: String,
    pub http_addr: String,
    pub pid: u32,
    child: Child,
    dir: PathBuf,
}

impl BenchServer {
    /// `wait`: the child's `redis.wait_replicas` and `redis.wait_timeout_ms` (None = off);
    /// `overrides`: `TOLLGATE_*` variables set on the child (`--server-set`).
    ///
    /// Its ports are free when picked but nobody holds them until the child binds them, so
    /// another process (a parallel test's server, an outgoing connection's local port) may
    /// take one first: then the child exits at start, or is found waiting while another
    /// process listens there (and may answer /readyz: see [`wait_ready`]), and is killed and
    /// started again on other ports, at most [`SERVER_START_ATTEMPTS`] times.
    pub async fn start(
        redis_url: &str,
        redis_connections: usize,
        wait: Option<WaitReplicas>,
        settle: Option<&SettleStore>,
        overrides: &[(String, String)],
    ) -> Result<Self, String> {
        let mut attempt = 1;
        loop {
            match Self::start_once(redis_url, redis_connections, wait, settle, overrides).await {
                Err(StartError::PortTaken(_)) if attempt < SERVER_START_ATTEMPTS => attempt += 1,
                Err(StartError::PortTaken(e) | StartError::Other(e)) => return Err(e),
                Ok(server) => return Ok(server),
            }
        }
    }

    async fn start_once(
        redis_url: &str,
        redis_connections: usize,
        wait: Option<WaitReplicas>,
        settle: Option<&SettleStore>,
        overrides: &[(String, String)],
    ) -> Result<Self, StartError> {
        let port = || crate::dev::free_port().map_err(|e| format!("no free port: {e}"));
        let ports = [port()?, port()?];
        let grpc_addr = format!("127.0.0.1:{}", ports[0]);
        let http_addr = format!("127.0.0.1:{}", ports[1]);
        let dir = private_dir("server")?;
        let config_path = dir.join("tollgate.toml");
        let log_path = dir.join("server.log");
        // The settler is off unless asked for (--settle-into): it competes for the same
        // cores, and settlement has its own benchmark (cargo bench --bench settle).
        let store_url = match settle {
            Some(SettleStore::Postgres(url)) => url.clone(),
            _ => format!("sqlite://{}", dir.join("ledger.db").display()),
        };
        let config = format!(
            r#"[server]
grpc_addr = "{grpc_addr}"
http_addr = "{http_addr}"

[redis]
url = "{redis_url}"
connections = {redis_connections}
wait_replicas = {wait_replicas}
wait_timeout_ms = {wait_timeout_ms}

[auth]
admin_token = "{ADMIN_TOKEN}"
service_token = "{SERVICE_TOKEN}"

[store]
url = "{store_url}"

[gateway]
spool_path = "{spool_path}"

[settler]
enabled = {settle}

[log]
level = "warn"

[pricebook]
default = "deny"

[[pricebook.routes]]
method = "POST"
path = "{BENCH_PATH}"
operation = "{BENCH_OPERATION}"

[pricebook.operations."{BENCH_OPERATION}"]
wallet = "default"
mode = "debit"
base = 1
fail_policy = "fail_closed"
"#,
            settle = settle.is_some(),
            // Its own fail-open spool (the price book is fail_closed, but the file is
            // opened and locked at start): not one in the current directory shared with
            // the other stack's server.
            spool_path = dir.join("spool.jsonl").display(),
            wait_replicas = wait.map_or(0, |w| w.replicas),
            wait_timeout_ms = wait.map_or(
                crate::ledger::redis_pool::DEFAULT_WAIT_TIMEOUT.as_millis() as u64,
                |w| w.timeout.as_millis() as u64
            ),
        );
        let spawned = (|| {
            std::fs::write(&config_path, config)
                .map_err(|e| format!("{}: {e}", config_path.display()))?;
            let exe = std::env::current_exe().map_err(|e| format!("cannot find tollgate: {e}"))?;
            let log = std::fs::File::create(&log_path)
                .map_err(|e| format!("{}: {e}", log_path.display()))?;
            let mut command = Command::new(exe);
            // The generated config is the whole configuration: TOLLGATE_* variables of the
            // bench's environment (a service token, a Redis URL, a shard count…) would
            // override it, and RUST_LOG its log level.
            for (name, _) in std::env::vars_os() {
                if name.to_string_lossy().starts_with("TOLLGATE_") {
                    command.env_remove(name);
                }
            }
            command.envs(overrides.iter().map(|(k, v)| (k, v)));
            command
                .arg("serve")
                .arg("--config")
                .arg(&config_path)
                .env_remove("RUST_LOG")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| format!("cannot start tollgate serve: {e}"))
        })();
        let child = match spawned {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e.into());
            }
        };
        let pid = child.id().unwrap_or_default();
        let mut server = Self {
            grpc_addr,
            http_addr,
            pid,
            child,
            dir,
        };
        // On an error `server` is dropped: the child is killed and reaped.
        wait_ready(&mut server.child, ports, &log_path).await?;
        Ok(server)
    }
}

/// Waits (at most [`SERVER_START_TIMEOUT`]) until the `tollgate serve` child, its log in
/// `log_path`, answers 200 on `GET /readyz` at 127.0.0.1:`http_port` as itself, the
/// ports being `[grpc_port, http_port]`, picked free.
///
/// Another process may take a picked port before the child binds it, and may answer the
/// probe (a parallel test's tollgate server, say). So the probe counts only once /proc
/// shows the child's own sockets listening on both ports ([`crate::dev::listens_on`]):
/// from then on nothing else can listen there, and whatever answers is the child. When
/// another process listens on a picked port, the child can never bind it: that is
/// [`StartError::PortTaken`], as is the child exiting because a port was taken
/// ([`a_port_was_taken`]); the caller kills the child and starts another on fresh ports.
/// Where this process's /proc cannot be read (not Linux), the probe alone counts.
async fn wait_ready(child: &mut Child, ports: [u16; 2], log_path: &Path) -> Result<(), StartError> {
    let [_, http_port] = ports;
    let http_addr = format!("127.0.0.1:{http_port}");
    let pid = child.id().unwrap_or_default();
    let proc_readable = crate::dev::listeners(std::process::id()).is_some();
    let deadline = tokio::time::Instant::now() + SERVER_START_TIMEOUT;
    loop {
        let owned = if proc_readable {
            let seen = crate::dev::listeners(pid).unwrap_or_default();
            if let Some(taken) = ports.iter().find(|p| seen.others.contains(p)) {
                return Err(StartError::PortTaken(format!(
                    "another process listens on port {taken}, picked for tollgate serve"
                )));
            }
            ports.iter().all(|p| seen.own.contains(p))
        } else {
            true
        };
        // Its own sockets first, then the probe: whatever answers is this child.
        let up = owned && super::load::http_get_status(&http_addr, "/readyz").await == Some(200);
        // An exit after the probe: the answer may have come from another process that
        // took a port the child has just let go of.
        if let Ok(Some(status)) = child.try_wait() {
            let log = log_tail(log_path);
            let message = format!("tollgate serve exited ({status}); its log:\n{log}");
            return Err(if a_port_was_taken(&log) {
                StartError::PortTaken(message)
            } else {
                StartError::Other(message)
            });
        }
        if up {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            // The log goes with the directory when the server is dropped: quote it.
            return Err(StartError::Other(format!(
                "tollgate serve was not ready within {} s (listening itself on ports {:?} \
                 of {ports:?}); its log:\n{}",
                SERVER_START_TIMEOUT.as_secs(),
                crate::dev::listeners(pid).unwrap_or_default().own,
                log_tail(log_path)
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Why a bench server did not start.
#[derive(Debug)]
enum StartError {
    /// One of its ports was taken between being picked and being bound: worth another try.
    PortTaken(String),
    Other(String),
}

impl From<String> for StartError {
    fn from(message: String) -> Self {
        Self::Other(message)
    }
}

/// Whether a server's log says it could not bind a port because someone holds it (what
/// `tollgate serve` prints: "cannot listen on ADDR: Address already in use (os error 98)",
/// [`crate::dev::PORT_TAKEN`]).
fn a_port_was_taken(log: &str) -> bool {
    log.lines()
        .any(|line| line.contains("cannot listen on") && line.contains(crate::dev::PORT_TAKEN))
}

impl Drop for BenchServer {
    /// Kills the server and reaps it, and only then removes its directory (its config,
    /// log and SQLite store): a live server could still write into it.
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let deadline = std::time::Instant::now() + EXIT_WAIT;
        while matches!(self.child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_private_dir_is_another() {
        let a = private_dir("test").expect("a");
        let b = private_dir("test").expect("b");
        assert_ne!(a, b);
        assert!(a.is_dir() && b.is_dir());
        for dir in [a, b] {
            std::fs::remove_dir_all(dir).expect("remove");
        }
    }

    #[test]
    fn the_log_tail_is_its_last_lines() {
        let dir = private_dir("test-log").expect("dir");
        let path = dir.join("server.log");
        let log: String = (1..=100).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, log).expect("write");
        let tail = log_tail(&path);
        assert!(
            tail.starts_with("[60 earlier lines left out]\nline 61\n"),
            "{tail}"
        );
        assert!(tail.ends_with("line 100"), "{tail}");
        assert_eq!(log_tail(&dir.join("missing.log")), "");
        std::fs::remove_dir_all(dir).expect("remove");
    }

    /// Dropping a bench redis-server with a directory (AOF) kills it and waits for its exit
    /// before the directory goes.
    #[tokio::test]
    async fn a_dropped_redis_has_exited_and_its_directory_is_gone() {
        let redis = BenchRedis::start(Durability::AofEverysec)
            .await
            .expect("redis-server must be installed");
        let dir = redis.dir.clone().expect("an AOF directory");
        let pids = redis.pids.clone();
        assert_eq!(pids.len(), 1, "{pids:?}");
        assert!(dir.is_dir() && !exited(pids[0]));
        drop(redis);
        assert!(exited(pids[0]), "redis-server {} still runs", pids[0]);
        assert!(!dir.exists(), "{} is left", dir.display());
    }

    /// The message the retry looks for is the one `tollgate serve` prints when a port is
    /// held (bound here for real), and no other start failure is mistaken for it.
    #[test]
    fn a_taken_port_is_told_from_other_start_failures() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = held.local_addr().expect("addr");
        let err = std::net::TcpListener::bind(addr).expect_err("the port is held");
        // The words looked for are the OS's own for a held port.
        assert!(err.to_string().contains(crate::dev::PORT_TAKEN), "{err}");
        let log = format!("warning: something else\ntollgate: cannot listen on {addr}: {err}\n");
        assert!(a_port_was_taken(&log), "{log}");
        assert!(!a_port_was_taken(
            "tollgate: cannot listen on 127.0.0.1:1: Permission denied (os error 13)"
        ));
        assert!(!a_port_was_taken(
            "tollgate: redis: Address already in use (os error 98)"
        ));
    }

    /// A listener of this test process (not of the child: another process, as far as the
    /// child is concerned) answering every request `200 OK`, as a tollgate server's /readyz
    /// would; from a thread of its own. Returns the listener's port.
    fn answer_200(listener: std::net::TcpListener) -> u16 {
        use std::io::{Read, Write};
        let port = listener.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                );
            }
        });
        port
    }

    /// A `sleep` child standing in for a `tollgate serve` that has not bound its ports (yet,
    /// or ever: one was taken); its stdin and stdout as given, killed when dropped.
    fn sleeper(stdin: Stdio, stdout: Stdio) -> Child {
        Command::new("sleep")
            .arg("600")
            .stdin(stdin)
            .stdout(stdout)
            .kill_on_drop(true)
            .spawn()
            .expect("sleep")
    }

    /// The hole the readiness wait had: another process took the HTTP port picked for the
    /// child and answers /readyz 200 there, while the child has not found out yet that it
    /// cannot bind it (`sleep` stands in for it and never binds). That answer is not the
    /// child's: the start is given up as a taken port (to be retried on fresh ports), not
    /// taken for a ready bench server.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_readyz_answered_by_another_process_is_a_taken_port() {
        let http_port = answer_200(std::net::TcpListener::bind("127.0.0.1:0").expect("bind"));
        let grpc_port = crate::dev::free_port().expect("a free port");
        let http_addr = format!("127.0.0.1:{http_port}");
        // The probe alone would take it for a ready server.
        assert_eq!(
            super::super::load::http_get_status(&http_addr, "/readyz").await,
            Some(200)
        );
        let dir = private_dir("test-taken").expect("dir");
        let log_path = dir.join("server.log");
        std::fs::write(&log_path, "").expect("log");
        let mut child = sleeper(Stdio::null(), Stdio::null());
        let pid = child.id().expect("pid");
        let ready = wait_ready(&mut child, [grpc_port, http_port], &log_path).await;
        assert!(
            matches!(&ready, Err(StartError::PortTaken(e)) if e.contains(&http_port.to_string())),
            "{ready:?}"
        );
        assert!(!crate::dev::listens_on(pid, &[http_port]));
        drop(child);
        std::fs::remove_dir_all(dir).expect("remove");
    }

    /// A child whose own sockets listen on both ports (the test's listeners handed to it as
    /// its stdin and stdout) and answers /readyz 200 is ready.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_child_listening_itself_and_answering_is_ready() {
        let grpc = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let http = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let grpc_port = grpc.local_addr().expect("addr").port();
        let its_http = std::os::fd::OwnedFd::from(http.try_clone().expect("clone"));
        let mut child = sleeper(
            Stdio::from(std::os::fd::OwnedFd::from(grpc)),
            Stdio::from(its_http),
        );
        let http_port = answer_200(http);
        let pid = child.id().expect("pid");
        assert!(crate::dev::listens_on(pid, &[grpc_port, http_port]));
        let dir = private_dir("test-ready").expect("dir");
        let log_path = dir.join("server.log");
        std::fs::write(&log_path, "").expect("log");
        let ready = wait_ready(&mut child, [grpc_port, http_port], &log_path).await;
        assert!(ready.is_ok(), "{ready:?}");
        drop(child);
        std::fs::remove_dir_all(dir).expect("remove");
    }

    /// A child that exits at start is a taken port when its log says it could not bind
    /// one (the message a held port really gives), any other failure otherwise.
    #[tokio::test]
    async fn an_exit_at_start_is_a_taken_port_only_when_its_log_says_so() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = held.local_addr().expect("addr");
        let err = std::net::TcpListener::bind(addr).expect_err("the port is held");
        let ports = [
            crate::dev::free_port().expect("a free port"),
            crate::dev::free_port().expect("a free port"),
        ];
        let dir = private_dir("test-exit").expect("dir");
        for (line, taken) in [
            (format!("tollgate: cannot listen on {addr}: {err}"), true),
            ("tollgate: cannot reach Redis".to_owned(), false),
        ] {
            let log_path = dir.join("server.log");
            let log = std::fs::File::create(&log_path).expect("log");
            let mut child = Command::new("sh")
                .args(["-c", "echo \"$1\" >&2; exit 1", "sh", &line])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .kill_on_drop(true)
                .spawn()
                .expect("sh");
            let ready = wait_ready(&mut child, ports, &log_path).await;
            match (&ready, taken) {
                (Err(StartError::PortTaken(e)), true) | (Err(StartError::Other(e)), false) => {
                    assert!(e.contains(&line), "{e}");
                }
                _ => panic!("{line}: {ready:?}"),
            }
        }
        std::fs::remove_dir_all(dir).expect("remove");
    }

    #[test]
    fn a_running_process_has_not_exited() {
        assert!(!exited(std::process::id()));
        assert!(exited(u32::MAX));
    }
}
