//! The `tollgate serve` child a bench starts when it has no --target: the current
//! executable with a generated config (a priced bench route, no in-process settler),
//! killed when dropped — also when the bench is interrupted.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::{Durability, BENCH_OPERATION, BENCH_PATH};
use crate::dev::DevRedis;
use crate::ledger::WaitReplicas;

pub const ADMIN_TOKEN: &str = "bench-admin-token";
pub const SERVICE_TOKEN: &str = "bench-service-token";
/// How long the child gets to answer /readyz.
pub const SERVER_START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a bench replica gets to finish its first sync.
pub const REPLICA_SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// The bench's private redis-server at a durability level (and its replica for
/// `replica-wait`); killed, and its AOF directory removed, when dropped.
pub struct BenchRedis {
    primary: DevRedis,
    _replica: Option<DevRedis>,
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
            // directory (not the current one).
            let path = std::env::temp_dir().join(format!(
                "tollgate-bench-redis-{}-{}",
                std::process::id(),
                durability.name()
            ));
            std::fs::create_dir_all(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            args.extend(["--dir".to_owned(), path.display().to_string()]);
            dir = Some(path);
        }
        let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let primary = DevRedis::start_with(&arg_refs).await?;
        let replica = if durability == Durability::ReplicaWait {
            let port = primary
                .url
                .rsplit(':')
                .next()
                .ok_or("bad redis url")?
                .to_owned();
            let dir = dir
                .as_ref()
                .ok_or("no directory for the replica")?
                .display()
                .to_string();
            let replica =
                DevRedis::start_with(&["--replicaof", "127.0.0.1", &port, "--dir", &dir]).await?;
            wait_in_sync(&primary.url, &replica.url).await?;
            Some(replica)
        } else {
            None
        };
        Ok(Self {
            primary,
            _replica: replica,
            dir,
        })
    }

    pub fn url(&self) -> &str {
        &self.primary.url
    }
}

impl Drop for BenchRedis {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
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
    /// `wait`: the child's `redis.wait_replicas` and `redis.wait_timeout_ms` (None = off).
    pub async fn start(
        redis_url: &str,
        redis_connections: usize,
        wait: Option<WaitReplicas>,
        settle: Option<&SettleStore>,
    ) -> Result<Self, String> {
        let port = || crate::dev::free_port().map_err(|e| format!("no free port: {e}"));
        let grpc_addr = format!("127.0.0.1:{}", port()?);
        let http_addr = format!("127.0.0.1:{}", port()?);
        let dir = std::env::temp_dir().join(format!("tollgate-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let config_path = dir.join("tollgate.toml");
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
            wait_replicas = wait.map_or(0, |w| w.replicas),
            wait_timeout_ms = wait.map_or(
                crate::ledger::redis_pool::DEFAULT_WAIT_TIMEOUT.as_millis() as u64,
                |w| w.timeout.as_millis() as u64
            ),
        );
        std::fs::write(&config_path, config)
            .map_err(|e| format!("{}: {e}", config_path.display()))?;
        let exe = std::env::current_exe().map_err(|e| format!("cannot find tollgate: {e}"))?;
        let log_path = dir.join("server.log");
        let log =
            std::fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
        let child = Command::new(exe)
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start tollgate serve: {e}"))?;
        let pid = child.id().unwrap_or_default();
        let mut server = Self {
            grpc_addr,
            http_addr,
            pid,
            child,
            dir,
        };
        server.wait_ready(&log_path).await?;
        Ok(server)
    }

    async fn wait_ready(&mut self, log_path: &std::path::Path) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + SERVER_START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = std::fs::read_to_string(log_path).unwrap_or_default();
                return Err(format!("tollgate serve exited ({status}):\n{log}"));
            }
            if super::load::http_get_status(&self.http_addr, "/readyz").await == Some(200) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!(
                    "tollgate serve was not ready within {} s (log: {})",
                    SERVER_START_TIMEOUT.as_secs(),
                    log_path.display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for BenchServer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
