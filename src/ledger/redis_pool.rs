//! Redis connections for the ledger: a few multiplexed connections used round-robin, so
//! concurrent script calls are pipelined on each, every call bounded by a deadline.
//!
//! Why not a pool of exclusive connections (deadpool-redis): with exclusive connections a
//! request waits for a free connection and Redis sees one script per round trip; a
//! multiplexed connection writes concurrent scripts back to back, which halves Redis's
//! CPU cost per call (measured here: 11–12 µs for a minimal debit script, 22–24 µs
//! unpipelined).
//!
//! Ledger script calls are measured here (latency, errors by kind, refusals, replays)
//! through handles resolved once per script ([`ScriptMetrics`]): nothing is looked up or
//! allocated per call for metrics.
//!
//! A connection that stops answering without being closed (Redis's host crashed or lost
//! power, a network partition, a failover that moved the name to another address) is
//! replaced by a watchdog: redis-rs's `ConnectionManager` reconnects only when a request
//! fails or the socket closes, and a call cut at its deadline does neither, so without it
//! every call would time out until the kernel gave up on the socket (~15 minutes). See
//! [`WATCHDOG_TIMEOUTS`]. TCP keepalive and `TCP_USER_TIMEOUT` ([`tcp_settings`]) let the
//! kernel close such a socket sooner as well.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use metrics::{Counter, Histogram};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::io::tcp::{socket2::TcpKeepalive, TcpSettings};
use redis::{
    Cmd, FromRedisValue, IntoConnectionInfo, Script, ScriptInvocation, ToRedisArgs, Value,
};
use tokio::time::error::Elapsed;

use super::error::broke_under_a_call;
use super::library::Library;
use super::LedgerError;
use crate::telemetry::metrics as m;

/// Multiplexed connections of a process on one runtime thread without `WAIT`. One:
/// every concurrent script of the runtime goes out in one write and Redis answers the
/// batch in one, the fewest wake-ups on both sides. On the sixteenth session's 2-core host
/// one connection gave `check` 0.78–0.84 of the raw function, two 0.61–0.69
/// (docs/BENCHMARKS.md). [`auto_connections`] gives more where one would queue calls.
pub const DEFAULT_CONNECTIONS: usize = 1;
/// The fewest connections with `WAIT` on: each write's `WAIT` holds its connection for a
/// replica round trip (Redis runs a blocked client's next command only after it), so the
/// calls of one connection go at most one such round trip at a time.
pub const WAIT_CONNECTIONS_MIN: usize = 8;

/// `redis.connections = 0` (the default): one per runtime thread (each thread's
/// concurrent calls pipelined on its own), and at least [`WAIT_CONNECTIONS_MIN`] when
/// writes wait for replicas; at most what `redis.connections` may be set to (a process
/// without a CPU limit sizes its runtime by the node's cores).
pub fn auto_connections(runtime_threads: usize, wait_replicas: u32) -> usize {
    let per_thread = runtime_threads.max(DEFAULT_CONNECTIONS);
    let wanted = if wait_replicas > 0 {
        per_thread.max(WAIT_CONNECTIONS_MIN)
    } else {
        per_thread
    };
    wanted.min(crate::config::REDIS_CONNECTIONS_MAX)
}
/// How the error of a script call that passed its deadline begins: the call may have
/// been sent, and may still run ([`LedgerError::is_deadline`]).
pub const DEADLINE_PASSED: &str = "no answer within";

/// Deadline of one Redis call: well under Envoy's default 200 ms ext_authz timeout.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_millis(100);
/// Deadline to establish a connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Deadline of `WAIT` unless configured otherwise (`redis.wait_timeout_ms`).
pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_millis(100);
/// At most one warning about short `WAIT`s per this interval (the metric counts each).
const WAIT_SHORT_WARN_INTERVAL_MS: u64 = 10_000;
/// After a short `WAIT`, writes skip WAIT for this long (each counted as short), then try
/// again. Redis runs a client's commands in order, so a WAIT that blocks for its timeout
/// holds up every command pipelined behind it on that connection: without the back-off a
/// dead replica would cap each connection at one write per `wait_timeout_ms`.
pub const WAIT_BACKOFF: Duration = Duration::from_secs(1);

/// The watchdog suspects a connection after this many calls in a row ended at their
/// deadline with no answer in between (any answer, an error too, ends the run)…
pub const WATCHDOG_TIMEOUTS: u32 = 3;
/// …and at least this long since the first of them. Three calls and a second: a single
/// slow call (a bulk pipeline, a call queued behind one) or a stall of Redis shorter than
/// a second (a fork for a snapshot) never gets a connection probed.
pub const WATCHDOG_SILENCE: Duration = Duration::from_secs(1);
/// The probe of a suspected connection: PING on it and on a freshly connected one, each
/// within this (or the call deadline when longer). Only when the fresh connection answers
/// and the old one does not is the old one replaced: a Redis that is merely slow answers
/// both, a stopped or unreachable one neither, so neither churns connections.
pub const WATCHDOG_PROBE: Duration = Duration::from_secs(1);
/// At most one probe per connection per this interval: while Redis is unreachable, each
/// probe is one new connection (its manager retries twice at most within the probe).
pub const WATCHDOG_RETRY: Duration = Duration::from_secs(5);

/// TCP keepalive on Redis sockets: the first probe after this long idle…
pub const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// …then one every this long (Linux)…
pub const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// …and the socket is closed after this many unanswered probes (Linux).
pub const TCP_KEEPALIVE_RETRIES: u32 = 3;
/// `TCP_USER_TIMEOUT` on Redis sockets (Linux): the kernel closes a socket whose sent data
/// has gone unacknowledged this long (a partition, a dead host), and the connection then
/// reconnects by itself. Redis's kernel acknowledges data even while Redis itself is
/// stopped or busy, so a slow Redis does not trip it; lost packets are retransmitted well
/// within it.
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);

/// Synchronous replication: after every ledger write, `WAIT replicas timeout` on the same
/// connection, in the same round trip (`redis.wait_replicas`, `redis.wait_timeout_ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitReplicas {
    /// Replicas that must acknowledge the write (at least 1).
    pub replicas: u32,
    /// How long Redis waits for them (at least 1 ms: `WAIT n 0` would block forever).
    pub timeout: Duration,
}

/// The WAIT command and what tells of a short one, resolved once.
struct WaitState {
    replicas: u32,
    timeout: Duration,
    cmd: Cmd,
    short: Counter,
    started: Instant,
    /// When (ms since `started`, plus one) the last short-wait warning was logged; 0 = never.
    last_warn_ms: AtomicU64,
    /// Short waits since the last warning.
    unwarned: AtomicU64,
    /// Until when (ms since `started`) writes skip WAIT after a short one.
    backoff_until_ms: AtomicU64,
}

impl WaitState {
    /// Counts (and now and then logs) a WAIT that heard from fewer replicas than asked.
    /// The script has committed on the primary: the caller still gets its answer.
    fn check(&self, acked: &Value) {
        let heard = match acked {
            Value::Int(n) => *n,
            _ => -1,
        };
        if heard >= i64::from(self.replicas) {
            return;
        }
        let now = self.now_ms();
        self.backoff_until_ms
            .fetch_max(now + WAIT_BACKOFF.as_millis() as u64, Ordering::Relaxed);
        self.short.increment(1);
        let unwarned = self.unwarned.fetch_add(1, Ordering::Relaxed) + 1;
        let last = self.last_warn_ms.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= WAIT_SHORT_WARN_INTERVAL_MS)
            && self
                .last_warn_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.unwarned.fetch_sub(unwarned, Ordering::Relaxed);
            // No account ids: the count and the replica figures only.
            match acked {
                Value::Int(n) => tracing::warn!(
                    acknowledged = *n,
                    wanted = self.replicas,
                    timeout_ms = self.timeout.as_millis() as u64,
                    short_waits = unwarned,
                    backoff_ms = WAIT_BACKOFF.as_millis() as u64,
                    "ledger writes committed on the primary but not acknowledged by enough replicas in time (WAIT); writes skip WAIT for the back-off, then try again; see tollgate_redis_wait_short_total"
                ),
                other => tracing::warn!(
                    wanted = self.replicas,
                    short_waits = unwarned,
                    answer = ?other,
                    "WAIT after a ledger write failed; the write is committed on the primary only"
                ),
            }
        }
    }

    /// Ms since `started`, plus one (0 means "never" in the atomics).
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64 + 1
    }

    /// Whether writes skip WAIT now (the back-off after a short one).
    fn backing_off(&self) -> bool {
        self.now_ms() < self.backoff_until_ms.load(Ordering::Relaxed)
    }
}

/// One connection of the pool, and what its watchdog knows of it.
struct Slot {
    con: ArcSwap<ConnectionManager>,
    /// Calls in a row that ended at their deadline with no answer in between.
    timeouts: AtomicU32,
    /// When (ms since `Connections::started`, plus one) the first of them ended; 0 = none.
    silent_since_ms: AtomicU64,
    /// When the last probe started (same clock); 0 = never.
    probed_ms: AtomicU64,
    /// A probe is running.
    probing: AtomicBool,
    /// Whether the connection worked when last heard of: its last call got an answer (an
    /// error answer too), not a broken connection. Starts false: a ledger call on a slot
    /// not known to work PINGs first ([`RedisPool::verified`]).
    live: AtomicBool,
}

/// The slot a call was sent on, and whether its connection worked then ([`Slot::live`]).
#[derive(Debug, Clone, Copy)]
struct Taken {
    slot: usize,
    live: bool,
}

impl Taken {
    /// The call's error as a [`LedgerError`]. A connection that broke under a call may
    /// have run it ([`CONNECTION_LOST`](super::error::CONNECTION_LOST)), but only if it
    /// was working when the call was sent: on one not known to work (its last call broke
    /// it), the call waited for a reconnect, and a reconnect that fails fails the same way
    /// (a broken pipe or an early EOF at the handshake, as from a proxy that accepts and
    /// closes while Redis is down), having sent nothing. Calling those in doubt made every
    /// check of an outage start a void and filled the void queue. Ledger calls are never
    /// sent on such a connection: they PING first ([`RedisPool::verified`]).
    fn error(self, err: redis::RedisError) -> LedgerError {
        if !self.live && broke_under_a_call(&err) {
            LedgerError::Unavailable(format!("{RECONNECT_FAILED}: {err}"))
        } else {
            LedgerError::from(err)
        }
    }
}

/// How an [`LedgerError::Unavailable`] of a call sent on a connection known to be broken
/// begins (see [`Taken::error`]).
pub const RECONNECT_FAILED: &str = "no working connection to Redis";

/// The pool's connections and what a replacement is made from.
struct Connections {
    slots: Box<[Slot]>,
    client: redis::Client,
    config: ConnectionManagerConfig,
    /// Each probe's PING deadline ([`WATCHDOG_PROBE`], or the call deadline if longer).
    probe_timeout: Duration,
    started: Instant,
    replaced: Counter,
    /// Replacements made by this pool (the metric counts those of every pool).
    replaced_here: AtomicU64,
}

impl Connections {
    /// Ms since `started`, plus one (0 means "never" in the atomics).
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64 + 1
    }

    /// A call on slot `i` got an answer (or an error) before its deadline: the connection
    /// is alive.
    fn answered(&self, i: usize) {
        let slot = &self.slots[i];
        // Read first: the hot path only reads the shared line.
        if slot.timeouts.load(Ordering::Relaxed) != 0 {
            slot.timeouts.store(0, Ordering::Relaxed);
            slot.silent_since_ms.store(0, Ordering::Relaxed);
        }
    }

    /// A call on slot `i` ended at its deadline: probes the connection when it has been
    /// silent long enough (see [`WATCHDOG_TIMEOUTS`]). Never waits: the probe runs in
    /// its own task.
    fn timed_out(self: &Arc<Self>, i: usize) {
        let slot = &self.slots[i];
        let now = self.now_ms();
        let _ = slot
            .silent_since_ms
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        let timeouts = slot.timeouts.fetch_add(1, Ordering::Relaxed) + 1;
        let since = slot.silent_since_ms.load(Ordering::Relaxed);
        if timeouts < WATCHDOG_TIMEOUTS
            || since == 0
            || now.saturating_sub(since) < WATCHDOG_SILENCE.as_millis() as u64
        {
            return;
        }
        let probed = slot.probed_ms.load(Ordering::Relaxed);
        if probed != 0 && now.saturating_sub(probed) < WATCHDOG_RETRY.as_millis() as u64 {
            return;
        }
        if slot.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        slot.probed_ms.store(now, Ordering::Relaxed);
        let silent_ms = now.saturating_sub(since);
        tokio::spawn(Arc::clone(self).probe(i, timeouts, silent_ms));
    }

    /// PINGs the suspected connection of slot `i` and a fresh one at the same time; swaps
    /// the fresh one in when it answers and the old one does not. The old one is dropped
    /// once the calls still holding it end (they are bounded by their deadlines).
    async fn probe(self: Arc<Self>, i: usize, timeouts: u32, silent_ms: u64) {
        let slot = &self.slots[i];
        let old = slot.con.load_full();
        match ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone()) {
            Ok(fresh) => {
                let (old_ok, fresh_ok) = tokio::join!(
                    ping(&old, self.probe_timeout),
                    ping(&fresh, self.probe_timeout)
                );
                if old_ok {
                    // Slow, not dead: keep it (and its pipelined calls).
                    tracing::debug!(
                        connection = i,
                        timeouts,
                        "a Redis connection whose calls timed out answered a PING: kept"
                    );
                    self.answered(i);
                } else if fresh_ok {
                    slot.con.store(Arc::new(fresh));
                    slot.live.store(true, Ordering::Relaxed);
                    slot.timeouts.store(0, Ordering::Relaxed);
                    slot.silent_since_ms.store(0, Ordering::Relaxed);
                    self.replaced.increment(1);
                    self.replaced_here.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        connection = i,
                        timeouts,
                        silent_ms,
                        "a Redis connection stopped answering while a new one answers: replaced (Redis moved, or the old socket is dead without having been closed); see tollgate_redis_connections_replaced_total"
                    );
                } else {
                    tracing::debug!(
                        connection = i,
                        timeouts,
                        "a new Redis connection does not answer either: Redis is unreachable or stalled; the connection is kept"
                    );
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot make a Redis connection to replace a silent one");
            }
        }
        slot.probing.store(false, Ordering::Release);
    }
}

/// PING on `con` within `deadline`: whether it answered.
async fn ping(con: &ConnectionManager, deadline: Duration) -> bool {
    let mut con = con.clone();
    let cmd = redis::cmd("PING");
    matches!(
        tokio::time::timeout(deadline, cmd.query_async::<Value>(&mut con)).await,
        Ok(Ok(_))
    )
}

/// TCP settings of Redis sockets: keepalive and (Linux) `TCP_USER_TIMEOUT` on top of
/// `base` (what the URL gave), so the kernel closes a socket whose peer vanished (see
/// [`TCP_USER_TIMEOUT`]).
pub fn tcp_settings(base: TcpSettings) -> TcpSettings {
    let keepalive = TcpKeepalive::new().with_time(TCP_KEEPALIVE_IDLE);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let keepalive = keepalive
        .with_interval(TCP_KEEPALIVE_INTERVAL)
        .with_retries(TCP_KEEPALIVE_RETRIES);
    let settings = base.set_keepalive(keepalive);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let settings = settings.set_user_timeout(TCP_USER_TIMEOUT);
    settings
}

/// A client for `url` whose sockets get [`tcp_settings`].
fn client(url: &str) -> Result<redis::Client, LedgerError> {
    let bad = |e: redis::RedisError| LedgerError::Unavailable(format!("bad redis url: {e}"));
    let info = url.into_connection_info().map_err(bad)?;
    let tcp = tcp_settings(info.tcp_settings().clone());
    redis::Client::open(info.set_tcp_settings(tcp)).map_err(bad)
}

#[derive(Clone)]
pub struct RedisPool {
    connections: Arc<Connections>,
    next: Arc<AtomicUsize>,
    call_timeout: Duration,
    /// Synchronous replication after ledger writes; None = off (the default).
    wait: Option<Arc<WaitState>>,
}

impl RedisPool {
    /// Creates the connections lazily: tollgate starts (not ready) while Redis is down
    /// and connects when it comes up.
    pub fn new(url: &str, connections: usize, call_timeout: Duration) -> Result<Self, LedgerError> {
        Self::with_wait(url, connections, call_timeout, None)
    }

    /// As [`RedisPool::new`], plus `WAIT` after every ledger write when `wait` is set.
    /// A write's deadline is then `call_timeout` plus the WAIT timeout.
    pub fn with_wait(
        url: &str,
        connections: usize,
        call_timeout: Duration,
        wait: Option<WaitReplicas>,
    ) -> Result<Self, LedgerError> {
        let wait = wait.filter(|w| w.replicas > 0).map(|w| {
            let timeout = w.timeout.max(Duration::from_millis(1));
            let mut cmd = redis::cmd("WAIT");
            cmd.arg(w.replicas).arg(timeout.as_millis() as u64);
            std::sync::Arc::new(WaitState {
                replicas: w.replicas,
                timeout,
                cmd,
                short: metrics::counter!(m::REDIS_WAIT_SHORT_TOTAL),
                started: Instant::now(),
                last_warn_ms: AtomicU64::new(0),
                unwarned: AtomicU64::new(0),
                backoff_until_ms: AtomicU64::new(0),
            })
        });
        // Present (at 0) on /metrics whether or not WAIT is on, so dashboards find it.
        metrics::counter!(m::REDIS_WAIT_SHORT_TOTAL).increment(0);
        let replaced = metrics::counter!(m::REDIS_CONNECTIONS_REPLACED_TOTAL);
        replaced.increment(0);
        let client = client(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(DEFAULT_CONNECT_TIMEOUT))
            // No connection-level response timeout: every call of the pool has its own
            // deadline (call_timeout; ten times that for bulk pipelines, which a
            // connection-wide call_timeout cut short), and a second timer per call cost
            // a timer-wheel insert and, on an idle runtime, an eventfd wake-up.
            .set_response_timeout(None)
            // Reconnect attempts happen in the background; callers are bounded by
            // call_timeout either way.
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let slots = (0..connections.max(1))
            .map(|_| {
                Ok(Slot {
                    con: ArcSwap::from_pointee(ConnectionManager::new_lazy_with_config(
                        client.clone(),
                        config.clone(),
                    )?),
                    timeouts: AtomicU32::new(0),
                    silent_since_ms: AtomicU64::new(0),
                    probed_ms: AtomicU64::new(0),
                    probing: AtomicBool::new(false),
                    live: AtomicBool::new(false),
                })
            })
            .collect::<Result<Vec<_>, redis::RedisError>>()?;
        Ok(Self {
            connections: Arc::new(Connections {
                slots: slots.into(),
                client,
                config,
                probe_timeout: WATCHDOG_PROBE.max(call_timeout),
                started: Instant::now(),
                replaced,
                replaced_here: AtomicU64::new(0),
            }),
            next: Default::default(),
            call_timeout,
            wait,
        })
    }

    /// Connections this pool's watchdog replaced (see [`WATCHDOG_TIMEOUTS`]).
    pub fn connections_replaced(&self) -> u64 {
        self.connections.replaced_here.load(Ordering::Relaxed)
    }

    /// The `WAIT` after ledger writes, if on.
    pub fn wait_replicas(&self) -> Option<WaitReplicas> {
        self.wait.as_ref().map(|w| WaitReplicas {
            replicas: w.replicas,
            timeout: w.timeout,
        })
    }

    /// The WAIT command to append after a batch of ledger writes (pipelines), if on.
    pub(crate) fn wait_cmd(&self) -> Option<&Cmd> {
        self.wait.as_ref().map(|w| &w.cmd)
    }

    /// Counts a short WAIT answer of a pipeline that ended with [`RedisPool::wait_cmd`].
    pub(crate) fn check_wait(&self, acked: &Value) {
        if let Some(wait) = &self.wait {
            wait.check(acked);
        }
    }

    /// The next connection round-robin, and its slot (for [`RedisPool::watch`]).
    fn connection(&self) -> (Taken, ConnectionManager) {
        let slots = &self.connections.slots;
        let i = self.next.fetch_add(1, Ordering::Relaxed) % slots.len();
        (self.taken(i), (**slots[i].con.load()).clone())
    }

    fn taken(&self, i: usize) -> Taken {
        Taken {
            slot: i,
            live: self.connections.slots[i].live.load(Ordering::Relaxed),
        }
    }

    /// Before a ledger call (a charge a broken connection leaves in doubt) on a slot not
    /// known to work ([`Slot::live`]: new, or its last call broke its connection): a PING
    /// on the connection it will be sent on. Failing, nothing was sent ([`Taken::error`]
    /// says so); answered, the connection works, and a call it loses is in doubt. The
    /// flag alone would take a call written on a fresh reconnection that breaks before
    /// its first answer for one never sent.
    async fn verified(
        &self,
        taken: &mut Taken,
        con: &mut ConnectionManager,
    ) -> redis::RedisResult<()> {
        if !taken.live {
            redis::cmd("PING").query_async::<()>(con).await?;
            self.connections.slots[taken.slot]
                .live
                .store(true, Ordering::Relaxed);
            taken.live = true;
        }
        Ok(())
    }

    /// Tells the watchdog how a call bounded by a deadline ended, and the slot whether
    /// its connection works ([`Slot::live`]).
    fn watch<T>(&self, taken: Taken, result: &Result<redis::RedisResult<T>, Elapsed>) {
        match result {
            Ok(answer) => {
                self.connections.answered(taken.slot);
                let live = !matches!(answer, Err(err) if broke_under_a_call(err));
                let slot = &self.connections.slots[taken.slot];
                // Read first: the hot path only reads the shared line.
                if slot.live.load(Ordering::Relaxed) != live {
                    slot.live.store(live, Ordering::Relaxed);
                }
            }
            Err(_) => self.connections.timed_out(taken.slot),
        }
    }

    /// Runs a script within the deadline; reloads it on NOSCRIPT.
    pub async fn call<T: FromRedisValue>(
        &self,
        inv: &ScriptInvocation<'_>,
    ) -> Result<T, LedgerError> {
        let (slot, mut con) = self.connection();
        let result = tokio::time::timeout(self.call_timeout, inv.invoke_async(&mut con)).await;
        self.watch(slot, &result);
        match result {
            Ok(result) => result.map_err(|e| slot.error(e)),
            Err(_) => Err(LedgerError::Unavailable(format!(
                "{DEADLINE_PASSED} {} ms",
                self.call_timeout.as_millis()
            ))),
        }
    }

    /// Runs a ledger function call within the deadline; loads the library when Redis
    /// lacks it (a Redis that restarted empty) and runs it again.
    pub async fn call_script<T: FromRedisValue>(
        &self,
        call: &ScriptCall<'_>,
    ) -> Result<T, LedgerError> {
        if call.writes {
            if let Some(wait) = &self.wait {
                if !wait.backing_off() {
                    return self.call_script_and_wait(call, wait).await;
                }
                // Back-off after a short WAIT: committed without the replicas' word.
                let result = self.call_script_once(call).await;
                if result.is_ok() {
                    wait.short.increment(1);
                }
                return result;
            }
        }
        self.call_script_once(call).await
    }

    /// The script call alone (no WAIT), loading the library when Redis lacks it.
    async fn call_script_once<T: FromRedisValue>(
        &self,
        call: &ScriptCall<'_>,
    ) -> Result<T, LedgerError> {
        let (mut slot, mut con) = self.connection();
        let run = async {
            self.verified(&mut slot, &mut con).await?;
            match call.cmd.query_async::<T>(&mut con).await {
                Err(err) if is_missing_function(&err) => {
                    load(call.library, &mut con).await?;
                    call.cmd.query_async::<T>(&mut con).await
                }
                other => other,
            }
        };
        let started = Instant::now();
        let result = tokio::time::timeout(self.call_timeout, run).await;
        self.watch(slot, &result);
        finish(call, slot, self.call_timeout, started, result)
    }

    /// A ledger write followed by `WAIT n timeout`, pipelined on the same connection (one
    /// round trip; WAIT covers every write this connection made before it). A WAIT that
    /// hears from fewer replicas is counted and the script's answer returned all the same:
    /// the write is committed on the primary, and pretending otherwise would make a
    /// client retry (or a gateway deny) a charge that happened.
    async fn call_script_and_wait<T: FromRedisValue>(
        &self,
        call: &ScriptCall<'_>,
        wait: &WaitState,
    ) -> Result<T, LedgerError> {
        let (mut slot, mut con) = self.connection();
        let mut pipe = redis::pipe();
        pipe.ignore_errors()
            .add_command(call.cmd.clone())
            .add_command(wait.cmd.clone());
        let run = async {
            self.verified(&mut slot, &mut con).await?;
            let mut reloaded = false;
            loop {
                let values: Vec<Value> = pipe.query_async(&mut con).await?;
                let [script, acked] = <[Value; 2]>::try_from(values).map_err(|_| {
                    redis::RedisError::from((
                        redis::ErrorKind::UnexpectedReturnType,
                        "FCALL+WAIT: not two answers",
                    ))
                })?;
                match script.extract_error() {
                    Err(err) if is_missing_function(&err) && !reloaded => {
                        // The script did not run; WAIT waited for nothing. Load and rerun.
                        load(call.library, &mut con).await?;
                        reloaded = true;
                    }
                    Err(err) => return Err(err),
                    Ok(value) => {
                        wait.check(&acked);
                        return Ok(redis::from_redis_value::<T>(value)?);
                    }
                }
            }
        };
        let started = Instant::now();
        let deadline = self.call_timeout + wait.timeout;
        let result = tokio::time::timeout(deadline, run).await;
        self.watch(slot, &result);
        finish(call, slot, deadline, started, result)
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
        let (slot, mut con) = self.connection();
        let result =
            tokio::time::timeout(self.call_timeout, cmd.query_async::<Vec<bool>>(&mut con)).await;
        self.watch(slot, &result);
        match result {
            Ok(result) => result.map_err(|e| slot.error(e)),
            Err(_) => Err(LedgerError::Unavailable("SCRIPT EXISTS timed out".into())),
        }
    }

    /// Whether Redis holds the function library (FUNCTION LIST LIBRARYNAME), within the
    /// deadline.
    pub async fn library_exists(&self, library: &Library) -> Result<bool, LedgerError> {
        let mut cmd = redis::cmd("FUNCTION");
        cmd.arg("LIST").arg("LIBRARYNAME").arg(library.name());
        let (slot, mut con) = self.connection();
        let result =
            tokio::time::timeout(self.call_timeout, cmd.query_async::<Vec<Value>>(&mut con)).await;
        self.watch(slot, &result);
        match result {
            Ok(result) => Ok(!result.map_err(|e| slot.error(e))?.is_empty()),
            Err(_) => Err(LedgerError::Unavailable("FUNCTION LIST timed out".into())),
        }
    }

    /// Names of the tollgate function libraries in Redis (`FUNCTION LIST LIBRARYNAME`):
    /// this version's and those earlier versions loaded.
    pub async fn tollgate_libraries(&self) -> Result<Vec<String>, LedgerError> {
        let mut cmd = redis::cmd("FUNCTION");
        // LIBRARYNAME takes a glob pattern.
        cmd.arg("LIST")
            .arg("LIBRARYNAME")
            .arg(format!("{}*", super::library::NAME_PREFIX));
        let (slot, mut con) = self.connection();
        let result =
            tokio::time::timeout(self.call_timeout, cmd.query_async::<Vec<Value>>(&mut con)).await;
        self.watch(slot, &result);
        let list = match result {
            Ok(result) => result.map_err(|e| slot.error(e))?,
            Err(_) => return Err(LedgerError::Unavailable("FUNCTION LIST timed out".into())),
        };
        let text = |v: &Value| match v {
            Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
            Value::SimpleString(s) => Some(s.clone()),
            _ => None,
        };
        // Each library is a map (RESP3) or a flat key/value array (RESP2).
        let mut names: Vec<String> = list
            .iter()
            .filter_map(|lib| match lib {
                Value::Map(kv) => kv
                    .iter()
                    .find(|(k, _)| text(k).as_deref() == Some("library_name"))
                    .and_then(|(_, v)| text(v)),
                Value::Array(kv) => kv
                    .chunks_exact(2)
                    .find(|pair| text(&pair[0]).as_deref() == Some("library_name"))
                    .and_then(|pair| text(&pair[1])),
                _ => None,
            })
            .filter(|name| super::library::is_tollgate_library(name))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Deletes a function library (`FUNCTION DELETE`); true when it existed.
    pub async fn delete_library(&self, name: &str) -> Result<bool, LedgerError> {
        let mut cmd = redis::cmd("FUNCTION");
        cmd.arg("DELETE").arg(name);
        let (slot, mut con) = self.connection();
        let result = tokio::time::timeout(self.call_timeout, cmd.query_async::<()>(&mut con)).await;
        self.watch(slot, &result);
        match result {
            Ok(Ok(())) => Ok(true),
            Ok(Err(err))
                if err
                    .detail()
                    .is_some_and(|d| d.starts_with("Library not found")) =>
            {
                Ok(false)
            }
            Ok(Err(err)) => Err(slot.error(err)),
            Err(_) => Err(LedgerError::Unavailable("FUNCTION DELETE timed out".into())),
        }
    }

    /// Loads the function library (functions are server-wide: once is enough).
    pub async fn load_library(&self, library: &Library) -> Result<(), LedgerError> {
        let (slot, mut con) = self.connection();
        let result = tokio::time::timeout(self.call_timeout * 10, load(library, &mut con)).await;
        self.watch(slot, &result);
        result.map_err(|_| LedgerError::Unavailable("FUNCTION LOAD timed out".into()))??;
        Ok(())
    }

    pub async fn load_scripts(&self, scripts: &[&Script]) -> Result<(), LedgerError> {
        for (i, slot) in self.connections.slots.iter().enumerate() {
            let mut con = (**slot.con.load()).clone();
            for script in scripts {
                let taken = self.taken(i);
                let result =
                    tokio::time::timeout(self.call_timeout * 10, script.load_async(&mut con)).await;
                self.watch(taken, &result);
                result.map_err(|_| LedgerError::Unavailable("SCRIPT LOAD timed out".into()))??;
            }
        }
        Ok(())
    }

    /// PING within the deadline.
    pub async fn ping(&self) -> Result<(), LedgerError> {
        let (slot, mut con) = self.connection();
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut con);
        let result = tokio::time::timeout(self.call_timeout, ping).await;
        self.watch(slot, &result);
        match result {
            Ok(result) => result.map(|_| ()).map_err(|e| slot.error(e)),
            Err(_) => Err(LedgerError::Unavailable("PING timed out".into())),
        }
    }

    /// A plain command within the call deadline (identity lookups on a cache miss).
    pub async fn call_cmd<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, LedgerError> {
        let (slot, mut con) = self.connection();
        let result = tokio::time::timeout(self.call_timeout, cmd.query_async::<T>(&mut con)).await;
        self.watch(slot, &result);
        match result {
            Ok(result) => result.map_err(|e| slot.error(e)),
            Err(_) => Err(LedgerError::Unavailable(format!(
                "no answer within {} ms",
                self.call_timeout.as_millis()
            ))),
        }
    }

    /// A pipeline of plain commands within the call deadline (identity lookups).
    pub async fn call_pipeline<T: FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, LedgerError> {
        let (slot, mut con) = self.connection();
        let result = tokio::time::timeout(self.call_timeout, pipe.query_async::<T>(&mut con)).await;
        self.watch(slot, &result);
        match result {
            Ok(result) => result.map_err(|e| slot.error(e)),
            Err(_) => Err(LedgerError::Unavailable(format!(
                "no answer within {} ms",
                self.call_timeout.as_millis()
            ))),
        }
    }

    /// A plain command within the deadline (admin and test tooling; not the hot path).
    pub async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, LedgerError> {
        let (slot, mut con) = self.connection();
        let result =
            tokio::time::timeout(self.call_timeout * 10, cmd.query_async::<T>(&mut con)).await;
        self.watch(slot, &result);
        match result {
            Ok(result) => result.map_err(|e| slot.error(e)),
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
        let (slot, mut con) = self.connection();
        let result =
            tokio::time::timeout(self.call_timeout * 10, pipe.query_async::<T>(&mut con)).await;
        self.watch(slot, &result);
        match result {
            Ok(result) => result.map_err(|e| slot.error(e)),
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

/// Records a script call's metrics and maps its outcome.
fn finish<T>(
    call: &ScriptCall<'_>,
    slot: Taken,
    deadline: Duration,
    started: Instant,
    result: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
) -> Result<T, LedgerError> {
    if let Some(metrics) = call.metrics {
        metrics.duration.record(started.elapsed().as_secs_f64());
    }
    match result {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => {
            if let Some(metrics) = call.metrics {
                metrics.error(error_kind(&err));
            }
            Err(slot.error(err))
        }
        Err(_) => {
            if let Some(metrics) = call.metrics {
                metrics.error(ErrorKind::Timeout);
            }
            Err(LedgerError::Unavailable(format!(
                "{DEADLINE_PASSED} {} ms",
                deadline.as_millis()
            )))
        }
    }
}

/// `FCALL` of a function Redis does not have (a Redis that restarted empty, or a
/// `FUNCTION FLUSH`): "ERR Function not found".
fn is_missing_function(err: &redis::RedisError) -> bool {
    err.detail()
        .is_some_and(|d| d.starts_with("Function not found"))
        || err.to_string().contains("Function not found")
}

/// `FUNCTION LOAD REPLACE` of the library on one connection.
async fn load(library: &Library, con: &mut ConnectionManager) -> redis::RedisResult<()> {
    library
        .load_cmd()
        .query_async::<Value>(con)
        .await
        .map(|_| ())
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
pub const ANSWER_CODES: [&str; 15] = [
    "INSUFFICIENT_CREDITS",
    "HOLD_ENDED",
    "DEMO_ALREADY_GRANTED",
    "IDEMPOTENCY_KEY_REUSED",
    "REFUND_EXCEEDS_CHARGE",
    "LOT_LIMIT",
    "WALLET_LIMIT",
    "HOLD_LIMIT",
    "MEMBER_LIMIT",
    "OUTBOX_FULL",
    "EXPIRY_BACKLOG",
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
        // KEY_*: the debit script by API key resolving the key, not a ledger refusal.
        if code == "OK" || code.starts_with("KEY_") || self.refusals.is_empty() {
            return;
        }
        let index = ANSWER_CODES
            .iter()
            .position(|c| *c == code)
            .unwrap_or(ANSWER_CODES.len());
        self.refusals[index].increment(1);
    }
}

/// A ledger function call packed straight into one command buffer: `FCALL <function>
/// <numkeys> keys... args...` (lib.lua and [`Library`]). One buffer: a command built
/// argument by argument keeps one `Vec` per argument, about twenty allocations per ledger
/// call, on the hot path.
pub struct ScriptCall<'a> {
    /// Loaded again when Redis lacks it.
    library: &'a Library,
    cmd: Cmd,
    /// The ledger script's metric handles (None for tooling calls).
    metrics: Option<&'a ScriptMetrics>,
    /// The script writes the ledger: followed by `WAIT` when `redis.wait_replicas` is set.
    writes: bool,
}

/// Room for a typical ledger call: its arguments and their bytes.
const SCRIPT_CALL_ARGS: usize = 24;
const SCRIPT_CALL_BYTES: usize = 320;

impl<'a> ScriptCall<'a> {
    pub fn new(library: &'a Library, function: &str, keys: &[&str]) -> Self {
        let mut cmd = Cmd::with_capacity(SCRIPT_CALL_ARGS, SCRIPT_CALL_BYTES);
        cmd.arg("FCALL").arg(function).arg(keys.len());
        for key in keys {
            cmd.arg(*key);
        }
        Self {
            library,
            cmd,
            metrics: None,
            writes: false,
        }
    }

    /// Marks the call as a ledger write (see [`RedisPool::with_wait`]).
    pub fn writes(mut self, writes: bool) -> Self {
        self.writes = writes;
        self
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

    /// The FCALL command (for pipelines: the library must be loaded first).
    pub fn cmd(&self) -> &Cmd {
        &self.cmd
    }
}

/// A mutation script's answer: whether it was replayed, and its text. The debit script
/// called by API key adds who the key belongs to (`identity`: the account, and the member
/// of an org key; a revoked key's answer adds its member or "" and when it was revoked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub replayed: bool,
    pub text: String,
    pub identity: Vec<String>,
}

impl Answer {
    pub(crate) fn from_value(value: Value) -> Result<Self, LedgerError> {
        let bad = || LedgerError::Internal("unexpected script reply shape".into());
        let text = |value: Value| match value {
            Value::BulkString(bytes) => String::from_utf8(bytes).map_err(|_| bad()),
            Value::SimpleString(s) => Ok(s),
            _ => Err(bad()),
        };
        let Value::Array(items) = value else {
            return Err(bad());
        };
        if !(2..=5).contains(&items.len()) {
            return Err(bad());
        }
        let mut items = items.into_iter();
        let replayed = matches!(items.next(), Some(Value::Int(1)));
        let answer = text(items.next().ok_or_else(bad)?)?;
        Ok(Self {
            replayed,
            text: answer,
            identity: items.map(text).collect::<Result<_, _>>()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> WaitState {
        WaitState {
            replicas: 2,
            timeout: Duration::from_millis(100),
            cmd: redis::cmd("WAIT"),
            short: Counter::noop(),
            started: Instant::now(),
            last_warn_ms: AtomicU64::new(0),
            unwarned: AtomicU64::new(0),
            backoff_until_ms: AtomicU64::new(0),
        }
    }

    #[test]
    fn answers_carry_the_identity_a_keyed_debit_found() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let plain = Answer::from_value(Value::Array(vec![Value::Int(1), bulk("OK|1")])).unwrap();
        assert!(plain.replayed && plain.text == "OK|1" && plain.identity.is_empty());
        let keyed = Answer::from_value(Value::Array(vec![
            Value::Int(0),
            bulk("KEY_MEMBER"),
            bulk("acme"),
            bulk("alice"),
        ]))
        .unwrap();
        assert!(!keyed.replayed);
        assert_eq!(keyed.identity, ["acme", "alice"]);
        let revoked = Answer::from_value(Value::Array(vec![
            Value::Int(0),
            bulk("KEY_REVOKED"),
            bulk("acme"),
            bulk(""),
            bulk("1796506072169"),
        ]))
        .unwrap();
        assert_eq!(revoked.identity, ["acme", "", "1796506072169"]);
        for bad in [
            vec![Value::Int(0)],
            vec![
                Value::Int(0),
                bulk("a"),
                bulk("b"),
                bulk("c"),
                bulk("d"),
                bulk("e"),
            ],
            vec![Value::Int(0), bulk("OK"), Value::Int(3)],
        ] {
            assert!(Answer::from_value(Value::Array(bad)).is_err());
        }
    }

    /// The watchdog's trigger: three timeouts in a row and a second of silence, then at
    /// most one probe per WATCHDOG_RETRY; any answer ends the run. (The probe itself, and
    /// the replacement, run against real Redis in tests/redis_black_hole.rs.)
    #[tokio::test]
    async fn the_watchdog_probes_after_three_timeouts_and_a_second_of_silence() {
        // Nothing listens there: a probe finds both connections silent and keeps the old.
        let pool = RedisPool::new("redis://127.0.0.1:1", 1, DEFAULT_CALL_TIMEOUT).unwrap();
        let c = &pool.connections;
        let slot = &c.slots[0];
        let probed = || slot.probed_ms.load(Ordering::Relaxed) != 0;
        let silence = || tokio::time::sleep(WATCHDOG_SILENCE + Duration::from_millis(20));
        c.timed_out(0);
        silence().await;
        c.timed_out(0);
        assert!(!probed(), "two timeouts are not enough, however far apart");
        c.answered(0);
        assert_eq!(slot.timeouts.load(Ordering::Relaxed), 0);
        assert_eq!(slot.silent_since_ms.load(Ordering::Relaxed), 0);
        for _ in 0..3 {
            c.timed_out(0);
        }
        assert!(!probed(), "three timeouts within a second are not enough");
        // Silent for a second since the first of them: the next timeout probes.
        silence().await;
        c.timed_out(0);
        assert!(probed());
        let first = slot.probed_ms.load(Ordering::Relaxed);
        // The probe ends (nothing answers: the connection is kept, nothing replaced).
        while slot.probing.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(pool.connections_replaced(), 0);
        // Within WATCHDOG_RETRY of the last probe, no other one.
        c.timed_out(0);
        assert_eq!(slot.probed_ms.load(Ordering::Relaxed), first);
        assert!(!slot.probing.load(Ordering::Acquire));
    }

    #[test]
    fn enough_replicas_keep_waiting() {
        let wait = state();
        wait.check(&Value::Int(2));
        wait.check(&Value::Int(3));
        assert!(!wait.backing_off());
        assert_eq!(wait.last_warn_ms.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_short_wait_starts_the_back_off_and_warns_once() {
        for answer in [Value::Int(1), Value::Nil] {
            let wait = state();
            wait.check(&answer);
            assert!(wait.backing_off(), "{answer:?}");
            let warned = wait.last_warn_ms.load(Ordering::Relaxed);
            assert!(warned > 0);
            // A second short wait within the interval is counted, not logged again.
            wait.check(&answer);
            assert_eq!(wait.last_warn_ms.load(Ordering::Relaxed), warned);
            assert_eq!(wait.unwarned.load(Ordering::Relaxed), 1);
            // The back-off ends.
            wait.backoff_until_ms.store(1, Ordering::Relaxed);
            assert!(!wait.backing_off());
        }
    }

    /// A Redis behind a proxy that accepts and closes (Redis down behind an Envoy or
    /// HAProxy): a connection never known to work, and then one whose last call broke it,
    /// leave no call in doubt: they wait for reconnects that fail, having sent nothing.
    #[tokio::test]
    async fn calls_on_a_connection_known_broken_are_not_in_doubt() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let closer = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                drop(socket);
            }
        });
        let pool =
            RedisPool::new(&format!("redis://{addr}"), 1, Duration::from_secs(5)).expect("pool");
        let mut in_doubt = Vec::new();
        for _ in 0..4 {
            let err = pool
                .call_cmd::<String>(&redis::cmd("PING"))
                .await
                .expect_err("nothing answers");
            assert!(matches!(err, LedgerError::Unavailable(_)), "{err:?}");
            in_doubt.push(err.may_have_run());
            if !err.may_have_run() {
                assert!(err.to_string().contains(RECONNECT_FAILED), "{err}");
            }
        }
        assert_eq!(in_doubt, [false; 4]);
        closer.abort();
    }

    /// A fake Redis: answers the client's handshake (`CLIENT SETINFO`) and PINGs, and
    /// closes the connection at an FCALL (or, `close_at_once`, as soon as it is accepted).
    async fn fake_redis(
        close_at_once: bool,
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                if close_at_once {
                    continue;
                }
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    while let Ok(n) = socket.read(&mut buf).await {
                        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                        if n == 0 || text.contains("FCALL") {
                            return;
                        }
                        let mut answer = "+OK\r\n".repeat(text.matches("SETINFO").count());
                        answer += &"+PONG\r\n".repeat(text.matches("PING").count());
                        if socket.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, task)
    }

    /// A ledger call is sent only on a connection that answered (a PING first when its
    /// slot is not known to work): behind a proxy that accepts and closes, no call is in
    /// doubt, the first one included; on a connection that answered the PING and broke
    /// under the call, it is.
    #[tokio::test]
    async fn a_ledger_call_is_in_doubt_only_on_a_connection_that_answered() {
        let library = Library::new("tg_test", &[]);
        for (close_at_once, expected) in [(true, [false; 3]), (false, [true; 3])] {
            let (addr, server) = fake_redis(close_at_once).await;
            let pool = RedisPool::new(&format!("redis://{addr}"), 1, Duration::from_secs(5))
                .expect("pool");
            let mut in_doubt = Vec::new();
            for _ in 0..3 {
                let call = ScriptCall::new(&library, "tg_test_f", &["k"]);
                let err = pool.call_script::<i64>(&call).await.expect_err("no answer");
                assert!(matches!(err, LedgerError::Unavailable(_)), "{err:?}");
                in_doubt.push(err.may_have_run());
            }
            assert_eq!(in_doubt, expected, "closing at once: {close_at_once}");
            server.abort();
        }
    }
}
