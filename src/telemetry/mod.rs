//! Telemetry: logs (tracing: text or JSON, level from config unless RUST_LOG is set;
//! account ids, keys and tokens are never logged), metrics (`metrics`: every name in one
//! place, Prometheus exposition), the failed-request log layer (`request_log`) and the
//! per-site budget of lines a failure repeats for every request (`throttle`).

use tracing_subscriber::EnvFilter;

use crate::config::LogConfig;

pub fn init_logs(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        // sqlx logs PostgreSQL's notices (e.g. "already exists, skipping") at info.
        .or_else(|_| EnvFilter::try_new(format!("{},sqlx=warn", config.level)))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a terminal: a log written to a file or a pipe stays plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    let _ = if config.format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

pub mod metrics;
pub mod request_log;
pub mod throttle;
