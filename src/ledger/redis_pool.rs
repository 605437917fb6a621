//! Redis connections for the ledger: a few multiplexed connections used round-robin, so
//! concurrent script calls are pipelined on each, every call bounded by a deadline.
//!
//! Why not a pool of exclusive connections (deadpool-redis): with exclusive connections a
//! request waits for a free connection and Redis sees one script per round trip; a
//! multiplexed connection writes concurrent scripts back to back, which halves Redis's
//! CPU cost per call (shared/PERF-NOTES.md).
//!
//! Ledger script calls are measured here (latency, errors by kind, refusals, replays)
//! through handles resolved once per script ([`ScriptMetrics`]): nothing is looked up or
//! allocated per call for metrics.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use metrics::{Counter, Histogram};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, FromRedisValue, Script, ScriptInvocation, ToRedisArgs, Value};

use super::LedgerError;
use crate::telemetry::metrics as m;

/// Multiplexed connections per process unless configured otherwise.
pub const DEFAULT_CONNECTIONS: usize = 2;
/// Deadline of one Redis call: well under Envoy's default 200 ms ext_authz timeout.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_millis(100);
/// Deadline to establish a connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Clone)]
pub struct RedisPool {
    connections: std::sync::Arc<[ConnectionManager]>,
    next: std::sync::Arc<AtomicUsize>,
    call_timeout: Duration,
}

impl RedisPool {
    /// Creates the connections lazily: tollgate starts (not ready) while Redis is down
    /// and connects when it comes up.
    pub fn new(url: &str, connections: usize, call_timeout: Duration) -> Result<Self, LedgerError> {
        let client = redis::Client::open(url)
            .map_err(|e| LedgerError::Unavailable(format!("bad redis url: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(DEFAULT_CONNECT_TIMEOUT))
            .set_response_timeout(Some(call_timeout))
            // Reconnect attempts happen in the background; callers are bounded by
            // call_timeout either way.
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let connections = (0..connections.max(1))
            .map(|_| ConnectionManager::new_lazy_with_config(client.clone(), config.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            connections: connections.into(),
            next: Default::default(),
            call_timeout,
        })
    }

    fn connection(&self) -> ConnectionManager {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.connections.len();
        self.connections[i].clone()
    }

    /// Runs a script within the deadline; reloads it on NOSCRIPT.
    pub async fn call<T: FromRedisValue>(
        &self,
        inv: &ScriptInvocation<'_>,
    ) -> Result<T, LedgerError> {
        let mut con = self.connection();
        match tokio::time::timeout(self.call_timeout, inv.invoke_async(&mut con)).await {
            Ok(result) => result.map_err(LedgerError::from),
            Err(_) => Err(LedgerError::Unavailable(format!(
                "no answer within {} ms",
                self.call_timeout.as_millis()
            ))),
        }
    }

    /// Runs a ledger script call within the deadline; loads the script on NOSCRIPT (a
    /// Redis that restarted) and runs it again.
    pub async fn call_script<T: FromRedisValue>(
        &self,
        call: &ScriptCall<'_>,
    ) -> Result<T, LedgerError> {
        let mut con = self.connection();
        let run = async {
            match call.cmd.query_async::<T>(&mut con).await {
                Err(err)
                    if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    call.script.load_async(&mut con).await?;
                    call.cmd.query_async::<T>(&mut con).await
                }
                other => other,
            }
        };
        let started = Instant::now();
        let result = tokio::time::timeout(self.call_timeout, run).await;
        if let Some(metrics) = call.metrics {
            metrics.duration.record(started.elapsed().as_secs_f64());
        }
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => {
                if let Some(metrics) = call.metrics {
                    metrics.error(error_kind(&err));
                }
                Err(LedgerError::from(err))
            }
            Err(_) => {
                if let Some(metrics) = call.metrics {
                    metrics.error(ErrorKind::Timeout);
                }
                Err(LedgerError::Unavailable(format!(
                    "no answer within {} ms",
                    self.call_timeout.as_millis()
                )))
            }
        }
    }

    /// Runs a mutation script, which answers `{replayed, "CODE|field|..."}`.
    pub async fn answer(&self, call: &ScriptCall<'_>) -> Result<Answer, LedgerError> {
        let value: Value = self.call_script(call).await?;
        let answer = Answer::from_value(value);
        if let Some(metrics) = call.metrics {
            match &answer {
                Ok(a) => metrics.answered(a),
                Err(_) => metrics.error(ErrorKind::Reply),
            }
        }
        answer
    }
    /// Which of `scripts` Redis has in its script cache (SCRIPT EXISTS), within the
    /// deadline.
    pub async fn scripts_exist(&self, scripts: &[&Script]) -> Result<Vec<bool>, LedgerError> {
        let mut cmd = redis::cmd("SCRIPT");
        cmd.arg("EXISTS");
        for script in scripts {
            cmd.arg(script.get_hash());
        }
        let mut con = self.connection();
        match tokio::time::timeout(self.call_timeout, cmd.query_async::<Vec<bool>>(&mut con)).await
        {
            Ok(result) => result.map_err(LedgerError::from),
            Err(_) => Err(LedgerError::Unavailable("SCRIPT EXISTS timed out".into())),
        }
    }

    pub async fn load_scripts(&self, scripts: &[&Script]) -> Result<(), LedgerError> {
        for con in self.connections.iter() {
            let mut con = con.clone();
            for script in scripts {
                tokio::time::timeout(self.call_timeout * 10, script.load_async(&mut con))
                    .await
                    .map_err(|_| LedgerError::Unavailable("SCRIPT LOAD timed out".into()))??;
            }
        }
        Ok(())
    }

    /// PING within the deadline.
    pub async fn ping(&self) -> Result<(), LedgerError> {
        let mut con = self.connection();
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut con);
        match tokio::time::timeout(self.call_timeout, ping).await {
            Ok(result) => result.map(|_| ()).map_err(LedgerError::from),
            Err(_) => Err(LedgerError::Unavailable("PING timed out".into())),
        }
    }

    /// A plain command within the call deadline (identity lookups on a cache miss).
    pub async fn call_cmd<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, LedgerError> {
        let mut con = self.connection();
        match tokio::time::timeout(self.call_timeout, cmd.query_async::<T>(&mut con)).await {
            Ok(result) => result.map_err(LedgerError::from),
            Err(_) => Err(LedgerError::Unavailable(format!(
                "no answer within {} ms",
                self.call_timeout.as_millis()
            ))),
        }
    }

    /// A plain command within the deadline (admin and test tooling; not the hot path).
    pub async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, LedgerError> {
        let mut con = self.connection();
        match tokio::time::timeout(self.call_timeout * 10, cmd.query_async::<T>(&mut con)).await {
            Ok(result) => result.map_err(LedgerError::from),
            Err(_) => Err(LedgerError::Unavailable("command timed out".into())),
        }
    }
}

impl RedisPool {
    /// A pipeline of plain commands within the deadline (settler, tooling).
    pub async fn pipeline<T: FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, LedgerError> {
        let mut con = self.connection();
        match tokio::time::timeout(self.call_timeout * 10, pipe.query_async::<T>(&mut con)).await {
            Ok(result) => result.map_err(LedgerError::from),
            Err(_) => Err(LedgerError::Unavailable("pipeline timed out".into())),
        }
    }
}

/// Why a script call failed, as a metric label (`telemetry::metrics::SCRIPT_ERROR_KINDS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No answer within the call deadline.
    Timeout = 0,
    /// Redis could not be reached or the connection broke.
    Unavailable = 1,
    /// Redis answered with an error (a script error, OOM, a read-only replica, …).
    Redis = 2,
    /// An answer tollgate does not understand.
    Reply = 3,
}

fn error_kind(err: &redis::RedisError) -> ErrorKind {
    if err.is_timeout() {
        ErrorKind::Timeout
    } else if err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_unrecoverable_error()
    {
        ErrorKind::Unavailable
    } else if matches!(
        err.kind(),
        redis::ErrorKind::Parse | redis::ErrorKind::UnexpectedReturnType
    ) {
        ErrorKind::Reply
    } else {
        ErrorKind::Redis
    }
}

/// Answer codes other than OK that mutation scripts give (refusals and typed errors); a
/// code outside this list counts as "other".
pub const ANSWER_CODES: [&str; 13] = [
    "INSUFFICIENT_CREDITS",
    "HOLD_ENDED",
    "DEMO_ALREADY_GRANTED",
    "IDEMPOTENCY_KEY_REUSED",
    "REFUND_EXCEEDS_CHARGE",
    "LOT_LIMIT",
    "WALLET_LIMIT",
    "HOLD_LIMIT",
    "OUTBOX_FULL",
    "NOT_FOUND",
    "AMOUNT_EXCEEDS_HOLD",
    "BALANCE_LIMIT",
    "EXPIRES_IN_PAST",
];

/// One script's metric handles, resolved when the ledger is built (after the recorder is
/// installed: see `telemetry::metrics::install`).
pub struct ScriptMetrics {
    duration: Histogram,
    errors: [Counter; 4],
    replays: Counter,
    /// Per [`ANSWER_CODES`] entry, then "other". Empty for read-only scripts.
    refusals: Vec<Counter>,
}

impl ScriptMetrics {
    /// `mutates`: the script answers `{replayed, "CODE|..."}`, so refusals and replays are
    /// counted for it.
    pub fn new(script: &'static str, mutates: bool) -> Self {
        let errors = m::SCRIPT_ERROR_KINDS.map(|kind| {
            metrics::counter!(m::REDIS_SCRIPT_ERRORS_TOTAL, "script" => script, "kind" => kind)
        });
        let refusals = if mutates {
            ANSWER_CODES
                .iter()
                .chain(std::iter::once(&"other"))
                .map(|reason| {
                    metrics::counter!(
                        m::LEDGER_REFUSALS_TOTAL,
                        "script" => script,
                        "reason" => *reason
                    )
                })
                .collect()
        } else {
            Vec::new()
        };
        Self {
            duration: metrics::histogram!(m::REDIS_SCRIPT_SECONDS, "script" => script),
            errors,
            replays: if mutates {
                metrics::counter!(m::LEDGER_REPLAYS_TOTAL, "script" => script)
            } else {
                Counter::noop()
            },
            refusals,
        }
    }

    fn error(&self, kind: ErrorKind) {
        self.errors[kind as usize].increment(1);
    }

    fn answered(&self, answer: &Answer) {
        if answer.replayed {
            self.replays.increment(1);
        }
        let code = answer.text.split('|').next().unwrap_or("");
        if code == "OK" || self.refusals.is_empty() {
            return;
        }
        let index = ANSWER_CODES
            .iter()
            .position(|c| *c == code)
            .unwrap_or(ANSWER_CODES.len());
        self.refusals[index].increment(1);
    }
}

/// A script call packed straight into one command buffer: `EVALSHA <sha> <numkeys> keys...
/// args...`. (`redis::ScriptInvocation` keeps one `Vec` per argument and copies them all
/// into a new command on every call: about twenty allocations per ledger call, on the
/// hot path.)
pub struct ScriptCall<'a> {
    script: &'a Script,
    cmd: Cmd,
    /// The ledger script's metric handles (None for tooling calls).
    metrics: Option<&'a ScriptMetrics>,
}

/// Room for a typical ledger call: its arguments and their bytes.
const SCRIPT_CALL_ARGS: usize = 24;
const SCRIPT_CALL_BYTES: usize = 320;

impl<'a> ScriptCall<'a> {
    pub fn new(script: &'a Script, keys: &[&str]) -> Self {
        let mut cmd = Cmd::with_capacity(SCRIPT_CALL_ARGS, SCRIPT_CALL_BYTES);
        cmd.arg("EVALSHA").arg(script.get_hash()).arg(keys.len());
        for key in keys {
            cmd.arg(*key);
        }
        Self {
            script,
            cmd,
            metrics: None,
        }
    }

    /// Records this call's latency, errors and answer in the script's metrics.
    pub fn with_metrics(mut self, metrics: &'a ScriptMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Appends an `ARGV` entry.
    pub fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        self.cmd.arg(arg);
        self
    }

    /// The EVALSHA command (for pipelines: the script must be loaded first).
    pub fn cmd(&self) -> &Cmd {
        &self.cmd
    }
}

/// A mutation script's answer: whether it was replayed, and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub replayed: bool,
    pub text: String,
}

impl Answer {
    pub(crate) fn from_value(value: Value) -> Result<Self, LedgerError> {
        let bad = || LedgerError::Internal("unexpected script reply shape".into());
        let Value::Array(items) = value else {
            return Err(bad());
        };
        let [flag, text] = <[Value; 2]>::try_from(items).map_err(|_| bad())?;
        let replayed = matches!(flag, Value::Int(1));
        let text = match text {
            Value::BulkString(bytes) => String::from_utf8(bytes).map_err(|_| bad())?,
            Value::SimpleString(s) => s,
            _ => return Err(bad()),
        };
        Ok(Self { replayed, text })
    }
}
