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

impl DevRedis {
    pub async fn start() -> Result<Self, String> {
        Self::start_with(&[]).await
    }

    /// Starts with extra redis-server arguments after the defaults (no persistence), e.g.
    /// `--appendonly yes --dir …` or `--replicaof 127.0.0.1 <port>`.
    pub async fn start_with(extra: &[&str]) -> Result<Self, String> {
        let port = free_port().map_err(|e| format!("no free port: {e}"))?;
        let child = Command::new("redis-server")
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
        let client = redis::Client::open(url.as_str()).map_err(|e| e.to_string())?;
        let deadline = tokio::time::Instant::now() + REDIS_START_TIMEOUT;
        loop {
            if let Ok(mut con) = client.get_multiplexed_async_connection().await {
                if redis::cmd("PING")
                    .query_async::<String>(&mut con)
                    .await
                    .is_ok()
                {
                    break;
                }
            }
            if tokio::time::Instant::now() > deadline {
                return Err("redis-server did not answer PING in time".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self { url, _child: child })
    }
}
