//! `serve --dev`: a private redis-server child on a free port, stopped with tollgate,
//! so one command runs the whole thing on a fresh machine.

use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

pub const DEV_ADMIN_TOKEN: &str = "dev-admin-token";
pub const DEV_SERVICE_TOKEN: &str = "dev-service-token";
/// How long the child gets to answer PING.
pub const REDIS_START_TIMEOUT: Duration = Duration::from_secs(10);

/// A redis-server child process; killed when dropped.
pub struct DevRedis {
    pub url: String,
    _child: Child,
}

/// A port nobody listens on right now (the OS picks it).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Who listens on TCP ports, as seen from one process: see [`listeners`].
#[derive(Debug, Default)]
pub struct Listeners {
    /// Ports a socket of this process listens on.
    pub own: std::collections::BTreeSet<u16>,
    /// Ports a socket of another process listens on (in this process's network namespace).
    pub others: std::collections::BTreeSet<u16>,
}

/// The TCP ports process `pid` listens on and those other processes listen on, from /proc
/// (Linux): the LISTEN rows of /proc/<pid>/net/tcp and tcp6, each its own when its
/// socket's inode is one of /proc/<pid>/fd's. The table is read before the descriptors: a
/// socket the process opens in between is then not in the table yet, rather than in the
/// table and taken for another process's. `None` while its descriptors cannot be read
/// (it has exited, or there is no /proc).
pub fn listeners(pid: u32) -> Option<Listeners> {
    // LISTEN rows: (local port, socket inode).
    let mut rows = Vec::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue; // no IPv6 here
        };
        // `sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode …`
        for fields in text
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
        {
            let (Some(local), Some(&"0A"), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue; // a socket that is not listening (0A is LISTEN)
            };
            let port = local
                .rsplit_once(':')
                .and_then(|(_, port)| u16::from_str_radix(port, 16).ok());
            if let (Some(port), Ok(inode)) = (port, inode.parse::<u64>()) {
                rows.push((port, inode));
            }
        }
    }
    let mut inodes = std::collections::HashSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        let target = std::fs::read_link(entry.path()).unwrap_or_default();
        let inode = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:["))
            .and_then(|t| t.strip_suffix(']'))
            .and_then(|t| t.parse::<u64>().ok());
        inodes.extend(inode);
    }
    let mut listeners = Listeners::default();
    for (port, inode) in rows {
        if inodes.contains(&inode) {
            listeners.own.insert(port);
        } else {
            listeners.others.insert(port);
        }
    }
    Some(listeners)
}

/// Whether process `pid` itself listens on every one of `ports` (see [`listeners`]). Once
/// it does, a connection to one of them reaches it and no other process: a listening
/// address has one owner (tollgate does not set `SO_REUSEPORT`).
pub fn listens_on(pid: u32, ports: &[u16]) -> bool {
    listeners(pid).is_some_and(|l| ports.iter().all(|p| l.own.contains(p)))
}

/// The OS's words for a port already taken (`EADDRINUSE`), in tollgate's "cannot listen on
/// <addr>: …" (src/main.rs) as in redis-server's log.
pub const PORT_TAKEN: &str = "Address already in use";

impl DevRedis {
    pub async fn start() -> Result<Self, String> {
        Self::start_with(&[]).await
    }

    /// Starts with extra redis-server arguments after the defaults (no persistence), e.g.
    /// `--appendonly yes --dir …` or `--replicaof 127.0.0.1 <port>`.
    ///
    /// The port is free when picked but nobody holds it until redis-server binds it, so
    /// another process may take it first. Then this child exits (and is started again on
    /// another port), or, worse, someone else's Redis answers on it: the one answering
    /// must report this child's process id.
    pub async fn start_with(extra: &[&str]) -> Result<Self, String> {
        const ATTEMPTS: usize = 5;
        let mut last_error = String::new();
        for _ in 0..ATTEMPTS {
            let port = free_port().map_err(|e| format!("no free port: {e}"))?;
            let mut child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| {
                    format!("cannot start redis-server ({e}); install it (scripts/dev does)")
                })?;
            let url = format!("redis://127.0.0.1:{port}");
            match wait_until_ours(&mut child, &url).await {
                Ok(()) => return Ok(Self { url, _child: child }),
                Err(e) => last_error = e,
            }
            let _ = child.kill().await;
        }
        Err(last_error)
    }
}

/// Waits until the redis-server `child` answers on `url` as itself.
async fn wait_until_ours(child: &mut Child, url: &str) -> Result<(), String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + REDIS_START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("redis-server exited at start ({status})"));
        }
        if let Ok(mut con) = client.get_multiplexed_async_connection().await {
            if let Ok(info) = redis::cmd("INFO")
                .arg("server")
                .query_async::<String>(&mut con)
                .await
            {
                let pid = info
                    .lines()
                    .find_map(|l| l.strip_prefix("process_id:"))
                    .and_then(|v| v.trim().parse::<u32>().ok());
                if pid.is_some() && pid == child.id() {
                    return Ok(());
                }
                return Err(format!("another Redis answers on {url}"));
            }
        }
        if tokio::time::Instant::now() > deadline {
            return Err("redis-server did not answer PING in time".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A PostgreSQL database of its own (for a bench run or a test), created next to the
/// database of an admin URL and dropped (with its connections) when this is dropped.
pub struct ScratchDatabase {
    pub url: String,
    admin_url: String,
    name: String,
}

impl ScratchDatabase {
    /// Creates `name` (replacing a leftover of that name) on the server of `admin_url`.
    pub async fn create(admin_url: &str, name: &str) -> Result<Self, String> {
        use sqlx::Connection;
        let (base, _) = admin_url
            .rsplit_once('/')
            .filter(|(base, _)| base.contains("://") && !base.ends_with('/'))
            .ok_or("needs a postgres://host/database url")?;
        let mut con = sqlx::PgConnection::connect(admin_url)
            .await
            .map_err(|e| format!("cannot reach PostgreSQL: {e}"))?;
        for statement in [
            format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            // UTF8 whatever the cluster's default (a cluster made under the C locale is
            // SQL_ASCII): the store refuses any other encoding.
            format!("CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8'"),
        ] {
            sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
                .execute(&mut con)
                .await
                .map_err(|e| format!("cannot create database {name}: {e}"))?;
        }
        Ok(Self {
            url: format!("{base}/{name}"),
            admin_url: admin_url.to_owned(),
            name: name.to_owned(),
        })
    }
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop may run inside an async runtime: a thread with its own, waited for.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                use sqlx::Connection;
                let mut con = sqlx::PgConnection::connect(&admin_url).await.ok()?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut con)
                .await
                .ok()
            })
        });
        let _ = dropped.join();
    }
}
