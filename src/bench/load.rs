//! Seeding, the scenario clients and the load drivers.
//!
//! Closed loop: each of `concurrency` workers sends its next request when the last one
//! answered; latency is measured from the send. Open loop (`--rate`): a pacer thread
//! releases one permit per intended send time (std's sleep is precise to tens of µs,
//! tokio's timer only to 1 ms), a worker takes a permit, and latency is measured from the
//! request's *intended* send time, so a stalled server shows as latency instead of as
//! fewer requests (no coordinated omission).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use super::check_client::CheckClient;
use super::report::{Phase, RedisStats};
use super::{
    BenchArgs, Distribution, Scenario, BENCH_HOST, BENCH_OPERATION, BENCH_PATH, HOT_SHARE,
    REQUEST_TIMEOUT, SEED_BATCH_ACCOUNTS, SEED_CREDITS, SEED_PIPELINES_IN_FLIGHT,
};
use crate::api::pb;
use crate::gateway::forward_auth::FORWARD_AUTH_PATH;
use crate::gateway::identity::KeyStore;
use crate::ledger::{Debit, Grant, Ledger, LedgerError, LotKind, Metadata};

/// Latency histograms: 1 µs to 60 s, 3 significant digits.
const LATENCY_US_MAX: u64 = 60_000_000;
/// How often the progress bar, the throughput timeline and the RSS sample are taken.
const TICK: Duration = Duration::from_millis(250);
/// The pacer sleeps at most this long between releases.
const PACER_SLEEP_MAX: Duration = Duration::from_millis(1);

/// The seeded accounts: ids and, for scenarios with API keys, `Bearer <key>` values.
pub struct Accounts {
    pub ids: Vec<String>,
    pub bearer: Vec<String>,
    /// The ids of the keys in `bearer`, to revoke after a run against a Redis that
    /// outlives it ([`revoke_keys`]).
    pub key_ids: Vec<String>,
}

pub fn account_id(i: u32) -> String {
    format!("bench-{i:07}")
}

/// Grants every account its credits (idempotent: a re-run against the same Redis
/// replays) and, with `with_keys`, makes one API key per account; pipelined.
pub async fn seed(
    ledger: &Arc<Ledger>,
    keys: &Arc<KeyStore>,
    accounts: u32,
    with_keys: bool,
) -> Result<Arc<Accounts>, String> {
    let started = Instant::now();
    let ids: Vec<String> = (0..accounts).map(account_id).collect();
    let bar = ProgressBar::new(u64::from(accounts) * if with_keys { 2 } else { 1 });
    bar.set_style(
        ProgressStyle::with_template("seeding {wide_bar} {pos}/{len} {per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut tasks = tokio::task::JoinSet::new();
    let mut bearer = vec![String::new(); if with_keys { ids.len() } else { 0 }];
    let mut key_ids = vec![String::new(); bearer.len()];
    let seeded: Result<(), String> = async {
        for (n, chunk) in ids.chunks(SEED_BATCH_ACCOUNTS).enumerate() {
            while tasks.len() >= SEED_PIPELINES_IN_FLIGHT {
                collect_seed(&mut tasks, &mut bearer, &mut key_ids, &bar).await?;
            }
            let ledger = ledger.clone();
            let keys = keys.clone();
            let chunk: Vec<String> = chunk.to_vec();
            tasks.spawn(async move {
                let grants: Vec<Grant> = chunk
                    .iter()
                    .map(|id| Grant {
                        account_id: id.clone(),
                        wallet: "default".into(),
                        amount: SEED_CREDITS,
                        kind: LotKind::Purchase,
                        priority: crate::ledger::command::PRIORITY_DEFAULT,
                        expires_at_ms: 0,
                        description: String::new(),
                        idempotency_key: "bench-seed".into(),
                        metadata: Metadata::new(),
                    })
                    .collect();
                for result in ledger
                    .grant_batch(&grants)
                    .await
                    .map_err(|e| e.to_string())?
                {
                    result.map_err(|e| format!("seeding a grant: {e}"))?;
                }
                let mut made = Vec::new();
                if with_keys {
                    let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
                    made = keys
                        .create_batch(&refs, "bench")
                        .await
                        .map_err(|e| format!("seeding API keys: {e}"))?
                        .into_iter()
                        .map(|k| (format!("Bearer {}", k.api_key), k.key_id))
                        .collect();
                }
                Ok::<_, String>((n * SEED_BATCH_ACCOUNTS, chunk.len(), made))
            });
        }
        while !tasks.is_empty() {
            collect_seed(&mut tasks, &mut bearer, &mut key_ids, &bar).await?;
        }
        Ok(())
    }
    .await;
    if let Err(e) = seeded {
        bar.abandon();
        // The keys made before the failure would outlive a run against a Redis of the
        // caller's: the batches still in flight finish, and every key made is revoked.
        while let Some(joined) = tasks.join_next().await {
            if let Ok(Ok((start, _, made))) = joined {
                for (i, (_, key_id)) in made.into_iter().enumerate() {
                    key_ids[start + i] = key_id;
                }
            }
        }
        let made = Accounts {
            ids: Vec::new(),
            bearer: Vec::new(),
            key_ids,
        };
        if let Err(revoking) = revoke_keys(keys, &made).await {
            eprintln!("warning: {revoking} (the keys seeded before the failure stay)");
        }
        return Err(e);
    }
    bar.finish_and_clear();
    println!(
        "seeded {accounts} accounts{} in {:.1} s",
        if with_keys { " with API keys" } else { "" },
        started.elapsed().as_secs_f64()
    );
    Ok(Arc::new(Accounts {
        ids,
        bearer,
        key_ids,
    }))
}

/// Revokes the keys a run made (at most [`SEED_PIPELINES_IN_FLIGHT`] batches at once): a
/// key's secret is not stored, so no later run can use them, and against a Redis that
/// outlives the run they would pile up until the accounts reached their key cap.
/// Returns how many were revoked; the first error ends it.
pub async fn revoke_keys(keys: &Arc<KeyStore>, accounts: &Accounts) -> Result<usize, String> {
    let mut tasks = tokio::task::JoinSet::new();
    let mut revoked = 0;
    for chunk in accounts.key_ids.chunks(SEED_BATCH_ACCOUNTS) {
        while tasks.len() >= SEED_PIPELINES_IN_FLIGHT {
            if let Some(done) = tasks.join_next().await {
                revoked += done.map_err(|e| e.to_string())??;
            }
        }
        let keys = keys.clone();
        let chunk = chunk.to_vec();
        tasks.spawn(async move {
            for key_id in chunk.iter().filter(|id| !id.is_empty()) {
                keys.revoke(key_id)
                    .await
                    .map_err(|e| format!("revoking the bench's API keys: {e}"))?;
            }
            Ok::<_, String>(chunk.len())
        });
    }
    while let Some(done) = tasks.join_next().await {
        revoked += done.map_err(|e| e.to_string())??;
    }
    Ok(revoked)
}

type SeedResult = Result<(usize, usize, Vec<(String, String)>), String>;

async fn collect_seed(
    tasks: &mut tokio::task::JoinSet<SeedResult>,
    bearer: &mut [String],
    key_ids: &mut [String],
    bar: &ProgressBar,
) -> Result<(), String> {
    let Some(joined) = tasks.join_next().await else {
        return Ok(());
    };
    let (start, len, made) = joined.map_err(|e| e.to_string())??;
    bar.inc(len as u64 * if made.is_empty() { 1 } else { 2 });
    for (i, (value, key_id)) in made.into_iter().enumerate() {
        bearer[start + i] = value;
        key_ids[start + i] = key_id;
    }
    Ok(())
}

/// What a phase runs for and how requests are spread.
#[derive(Debug, Clone)]
pub struct Plan {
    pub duration: Duration,
    pub requests: Option<u64>,
    pub warmup: Duration,
    pub rate: Option<f64>,
    pub distribution: Distribution,
}

impl Plan {
    pub fn from_args(args: &BenchArgs) -> Self {
        Self {
            duration: Duration::from_secs(args.duration_secs),
            requests: args.requests,
            warmup: Duration::from_secs(args.warmup_secs),
            rate: args.rate,
            distribution: args.distribution,
        }
    }
}

/// Where the scenario clients connect.
pub struct Target {
    pub grpc_addr: String,
    pub http_addr: Option<String>,
    pub service_token: String,
}

/// Adds `authorization: Bearer <service token>` to tollgate.v1 calls.
#[derive(Clone)]
pub struct ServiceAuth(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for ServiceAuth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

type MeteringClient = pb::metering_client::MeteringClient<InterceptedService<Channel, ServiceAuth>>;

/// One worker's connection to what it loads.
pub enum Client {
    Check(CheckClient),
    Debit(MeteringClient),
    Hold(MeteringClient),
    ForwardAuth(HttpClient),
    /// The baseline: the ledger's debit function, FCALL straight to Redis.
    Raw(Arc<Ledger>),
}

pub fn raw_clients(ledger: &Arc<Ledger>, args: &BenchArgs) -> Vec<Client> {
    (0..args.concurrency)
        .map(|_| Client::Raw(ledger.clone()))
        .collect()
}

pub async fn scenario_clients(
    scenario: Scenario,
    target: &Target,
    args: &BenchArgs,
) -> Result<Vec<Client>, String> {
    if scenario == Scenario::ForwardAuth {
        let addr = target
            .http_addr
            .clone()
            .ok_or("forward-auth needs the HTTP address")?;
        let mut clients = Vec::with_capacity(args.concurrency);
        for _ in 0..args.concurrency {
            clients.push(Client::ForwardAuth(HttpClient::connect(&addr).await?));
        }
        return Ok(clients);
    }
    if scenario == Scenario::Check {
        let mut connections = Vec::with_capacity(args.connections);
        for _ in 0..args.connections {
            connections.push(CheckClient::connect(&target.grpc_addr).await?);
        }
        return Ok((0..args.concurrency)
            .map(|i| Client::Check(connections[i % connections.len()].clone()))
            .collect());
    }
    let uri = if target.grpc_addr.contains("://") {
        target.grpc_addr.clone()
    } else {
        format!("http://{}", target.grpc_addr)
    };
    let mut channels = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let channel = Endpoint::from_shared(uri.clone())
            .map_err(|e| format!("bad target {uri}: {e}"))?
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| format!("cannot reach {uri}: {e}"))?;
        channels.push(channel);
    }
    let auth = if target.service_token.is_empty() {
        ServiceAuth(None)
    } else {
        ServiceAuth(Some(
            format!("Bearer {}", target.service_token)
                .parse()
                .map_err(|_| "the service token is not a valid header value")?,
        ))
    };
    Ok((0..args.concurrency)
        .map(|i| {
            let channel = channels[i % channels.len()].clone();
            match scenario {
                Scenario::Hold => Client::Hold(
                    pb::metering_client::MeteringClient::with_interceptor(channel, auth.clone()),
                ),
                _ => Client::Debit(pb::metering_client::MeteringClient::with_interceptor(
                    channel,
                    auth.clone(),
                )),
            }
        })
        .collect())
}

/// An HTTP/1.1 keep-alive connection (forward-auth), reconnected when the server closes it.
pub struct HttpClient {
    addr: String,
    sender: Option<hyper::client::conn::http1::SendRequest<Empty<Bytes>>>,
}

impl HttpClient {
    async fn connect(addr: &str) -> Result<Self, String> {
        let mut client = Self {
            addr: addr.to_owned(),
            sender: None,
        };
        client.reconnect().await?;
        Ok(client)
    }

    async fn reconnect(&mut self) -> Result<(), String> {
        let stream = tokio::net::TcpStream::connect(&self.addr)
            .await
            .map_err(|e| format!("cannot reach {}: {e}", self.addr))?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| format!("http handshake: {e}"))?;
        tokio::spawn(connection);
        self.sender = Some(sender);
        Ok(())
    }

    async fn forward_auth(&mut self, bearer: &str, request_id: &str) -> Result<(), String> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            self.reconnect()
                .await
                .map_err(|_| "http:connect".to_owned())?;
        }
        let Some(sender) = self.sender.as_mut() else {
            return Err("http:connect".into());
        };
        sender.ready().await.map_err(|_| "http:closed".to_owned())?;
        let request = hyper::Request::builder()
            .method("GET")
            .uri(FORWARD_AUTH_PATH)
            .header("host", &self.addr)
            .header("x-forwarded-method", "POST")
            .header("x-forwarded-uri", BENCH_PATH)
            .header("x-forwarded-host", BENCH_HOST)
            .header("authorization", bearer)
            .header("x-request-id", request_id)
            .body(Empty::<Bytes>::new())
            .map_err(|_| "http:request".to_owned())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|_| "http:transport".to_owned())?;
        let status = response.status().as_u16();
        let reason = response
            .headers()
            .get("x-tollgate-reason")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        response
            .into_body()
            .collect()
            .await
            .map_err(|_| "http:body".to_owned())?;
        if status == 200 {
            Ok(())
        } else {
            Err(format!("http:{status}:{}", reason.unwrap_or_default()))
        }
    }
}

/// A plain `GET path`: (status, body), or None when it cannot be had within 2 s.
async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let io = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        let status = response.get(9..12)?.parse().ok()?;
        let body = response
            .split_once("\r\n\r\n")
            .map_or(String::new(), |(_, body)| body.to_owned());
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(2), io)
        .await
        .ok()
        .flatten()
}

/// The age of the oldest unsettled outbox event over all shards, in ms, as the server's
/// `/metrics` shows it.
async fn outbox_lag_ms_of(http_addr: &str) -> Option<u64> {
    let (_, body) = http_get(http_addr, "/metrics").await?;
    outbox_lag_ms_in(&body)
}

fn outbox_lag_ms_in(metrics: &str) -> Option<u64> {
    let name = crate::telemetry::metrics::OUTBOX_OLDEST_AGE_SECONDS;
    metrics
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .map(|secs| (secs * 1000.0).round() as u64)
        .max()
}

/// Status code of a plain `GET path` (readiness), or None when it cannot be had.
pub async fn http_get_status(addr: &str, path: &str) -> Option<u16> {
    http_get(addr, path).await.map(|(status, _)| status)
}

impl Client {
    /// One operation against account `i`; `id` is unique in the run. The error is its kind.
    async fn call(&mut self, accounts: &Accounts, i: usize, id: &str) -> Result<(), String> {
        match self {
            Self::Check(client) => client.check(&accounts.bearer[i], id).await,
            Self::Debit(client) => {
                client
                    .debit(pb::DebitRequest {
                        account_id: accounts.ids[i].clone(),
                        wallet: "default".into(),
                        amount: 1,
                        idempotency_key: id.to_owned(),
                        operation: BENCH_OPERATION.into(),
                        metadata: Default::default(),
                        member_id: String::new(),
                    })
                    .await
                    .map_err(|s| format!("grpc:{:?}", s.code()))?;
                Ok(())
            }
            Self::Hold(client) => {
                let hold = client
                    .authorize(pb::AuthorizeRequest {
                        account_id: accounts.ids[i].clone(),
                        wallet: "default".into(),
                        amount: 1,
                        ttl_ms: 60_000,
                        on_expiry: "release".into(),
                        idempotency_key: id.to_owned(),
                        operation: BENCH_OPERATION.into(),
                        metadata: Default::default(),
                        member_id: String::new(),
                    })
                    .await
                    .map_err(|s| format!("authorize:{:?}", s.code()))?
                    .into_inner();
                client
                    .capture(pb::CaptureRequest {
                        hold_id: hold.hold_id,
                        amount: None,
                        idempotency_key: format!("{id}:c"),
                        metadata: Default::default(),
                    })
                    .await
                    .map_err(|s| format!("capture:{:?}", s.code()))?;
                Ok(())
            }
            Self::ForwardAuth(client) => client.forward_auth(&accounts.bearer[i], id).await,
            Self::Raw(ledger) => {
                // The same idempotency key shape and operation as a gateway check.
                let cmd = Debit {
                    account_id: accounts.ids[i].clone(),
                    wallet: "default".into(),
                    amount: 1,
                    idempotency_key: crate::gateway::check_idempotency_key(
                        BENCH_OPERATION,
                        Some(id),
                    ),
                    operation: BENCH_OPERATION.into(),
                    metadata: Metadata::new(),
                    member_id: String::new(),
                    price_inputs: None,
                    attempt_mark: None,
                };
                let inv = ledger.debit_invocation(&cmd);
                let value: redis::Value = ledger
                    .redis()
                    .call_script(&inv)
                    .await
                    .map_err(|e| error_kind(&e))?;
                Ledger::debit_reply(value).map_err(|e| error_kind(&e))?;
                Ok(())
            }
        }
    }
}

/// The kind of a baseline error, as the errors table shows it.
fn error_kind(err: &LedgerError) -> String {
    match err {
        LedgerError::Refused(refusal) => format!("refused:{}", refusal.reason()),
        LedgerError::Unavailable(_) => "redis:unavailable".into(),
        LedgerError::NotInitialized => "redis:not_initialized".into(),
        LedgerError::OutboxFull => "redis:outbox_full".into(),
        LedgerError::ExpiryBacklog => "redis:expiry_backlog".into(),
        LedgerError::InvalidArgument(_) => "invalid_argument".into(),
        LedgerError::NotFound(_) => "not_found".into(),
        LedgerError::Internal(_) => "internal".into(),
    }
}

/// Picks accounts by the distribution (xorshift64*: cheap, no dependency, and the load
/// generator should not spend its CPU on randomness).
struct Picker {
    state: u64,
    accounts: usize,
    hot: usize,
    distribution: Distribution,
}

impl Picker {
    fn new(seed: u64, accounts: usize, distribution: Distribution) -> Self {
        Self {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            accounts,
            hot: (accounts / 100).max(1),
            distribution,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn pick(&mut self) -> usize {
        let r = self.next_u64();
        match self.distribution {
            Distribution::Uniform => (r % self.accounts as u64) as usize,
            Distribution::HotKey => {
                let hot = (r >> 11) as f64 / (1u64 << 53) as f64 <= HOT_SHARE;
                let n = if hot { self.hot } else { self.accounts };
                (self.next_u64() % n as u64) as usize
            }
        }
    }
}

/// Shared state of the workers of one phase.
struct Shared {
    accounts: Arc<Accounts>,
    run_id: u64,
    start: Instant,
    end: Option<Instant>,
    requests: Option<u64>,
    rate: Option<f64>,
    permits: Option<Arc<Semaphore>>,
    seq: AtomicU64,
    /// Answered requests (successes and errors), and errors among them.
    completed: AtomicU64,
    failed: AtomicU64,
    distribution: Distribution,
}

struct WorkerResult {
    client: Client,
    latency_us: Histogram<u64>,
    service_us: Histogram<u64>,
    send_delay_us: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    /// Successes answered by the phase's end (all of them when it has no end): what its
    /// throughput counts.
    succeeded: u64,
    finished: Instant,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("valid histogram bounds")
}

async fn worker(mut client: Client, shared: Arc<Shared>, index: usize) -> WorkerResult {
    let mut latency_us = histogram();
    let mut service_us = histogram();
    let mut send_delay_us = histogram();
    let mut errors = BTreeMap::new();
    let mut succeeded = 0u64;
    let mut picker = Picker::new(
        shared.run_id ^ (index as u64 + 1),
        shared.accounts.ids.len(),
        shared.distribution,
    );
    let mut id = String::with_capacity(48);
    loop {
        let seq;
        let intended;
        if let (Some(permits), Some(rate)) = (&shared.permits, shared.rate) {
            match permits.acquire().await {
                Ok(permit) => permit.forget(),
                Err(_) => break, // the pacer closed: the phase is over
            }
            seq = shared.seq.fetch_add(1, Ordering::Relaxed);
            intended = shared.start + Duration::from_secs_f64(seq as f64 / rate);
        } else {
            seq = shared.seq.fetch_add(1, Ordering::Relaxed);
            intended = Instant::now();
            if shared.end.is_some_and(|end| intended >= end) {
                break;
            }
        }
        if shared.requests.is_some_and(|n| seq >= n) {
            break;
        }
        let account = picker.pick();
        id.clear();
        use std::fmt::Write;
        let _ = write!(id, "b{:x}-{index}-{seq}", shared.run_id);
        let sent = Instant::now();
        let outcome =
            tokio::time::timeout(REQUEST_TIMEOUT, client.call(&shared.accounts, account, &id))
                .await
                .unwrap_or_else(|_| Err("timeout".into()));
        let done = Instant::now();
        let elapsed = done.saturating_duration_since(intended);
        latency_us.saturating_record((elapsed.as_micros() as u64).max(1));
        if shared.rate.is_some() {
            let service = done.saturating_duration_since(sent);
            service_us.saturating_record((service.as_micros() as u64).max(1));
            let late = sent.saturating_duration_since(intended);
            send_delay_us.saturating_record((late.as_micros() as u64).max(1));
        }
        match outcome {
            // A request still out when the phase ended does not count: throughput is what
            // was answered within the measured time (one stuck request would otherwise
            // stretch that time up to REQUEST_TIMEOUT).
            Ok(()) => succeeded += u64::from(shared.end.is_none_or(|end| done <= end)),
            Err(kind) => {
                shared.failed.fetch_add(1, Ordering::Relaxed);
                *errors.entry(kind).or_insert(0) += 1;
            }
        }
        shared.completed.fetch_add(1, Ordering::Relaxed);
    }
    WorkerResult {
        client,
        latency_us,
        service_us,
        send_delay_us,
        errors,
        succeeded,
        finished: Instant::now(),
    }
}

/// What the bench watches of the server under load: its RSS (by pid) and, when it settles,
/// the outbox lag (from its `/metrics`).
#[derive(Clone, Default)]
pub struct Probe {
    pub pid: Option<u32>,
    pub metrics_addr: Option<String>,
}

/// One side of an alternating measurement: one kind of client against one stack (its
/// Redis, and the accounts seeded there).
pub struct Side<'a> {
    pub label: String,
    pub clients: Vec<Client>,
    pub accounts: Arc<Accounts>,
    pub ledger: &'a Ledger,
    pub probe: Probe,
}

/// Warms each side up (unmeasured), then measures the sides in alternating slices
/// (`rounds` slices of each, in the order given), so a neighbour's build that starts
/// halfway through a run weighs on all of them alike. Answers one phase per side, in the
/// same order.
pub async fn measure_alternating(
    mut sides: Vec<Side<'_>>,
    plan: &Plan,
    rounds: u32,
) -> Result<Vec<Phase>, String> {
    for side in &mut sides {
        let clients = std::mem::take(&mut side.clients);
        side.clients = warm_up(&side.label, clients, plan, &side.accounts).await;
    }
    let rounds = rounds.max(1);
    let slice_plan = Plan {
        duration: plan.duration / rounds,
        requests: plan.requests.map(|n| n.div_ceil(u64::from(rounds))),
        ..plan.clone()
    };
    let mut phases: Vec<Option<Phase>> = sides.iter().map(|_| None).collect();
    for round in 1..=rounds {
        for (side, so_far) in sides.iter_mut().zip(&mut phases) {
            let label = format!("{} ({round}/{rounds})", side.label);
            let clients = std::mem::take(&mut side.clients);
            let (back, phase) = slice(
                &label,
                clients,
                &slice_plan,
                &side.accounts,
                side.ledger,
                &side.probe,
            )
            .await;
            side.clients = back;
            *so_far = Some(match so_far.take() {
                None => phase,
                Some(before) => before.merge(phase),
            });
        }
    }
    sides
        .iter()
        .zip(phases)
        .map(|(side, phase)| {
            let mut phase = phase.ok_or("no rounds")?;
            phase.label.clone_from(&side.label);
            Ok(phase)
        })
        .collect()
}

async fn warm_up(
    label: &str,
    clients: Vec<Client>,
    plan: &Plan,
    accounts: &Arc<Accounts>,
) -> Vec<Client> {
    if plan.warmup.is_zero() {
        return clients;
    }
    let warmup = Plan {
        duration: plan.warmup,
        requests: None,
        ..plan.clone()
    };
    drive(
        &format!("{label} warm-up"),
        clients,
        &warmup,
        accounts,
        &Probe::default(),
    )
    .await
    .0
}

/// One measured run, with Redis's statistics around it.
async fn slice(
    label: &str,
    clients: Vec<Client>,
    plan: &Plan,
    accounts: &Arc<Accounts>,
    ledger: &Ledger,
    probe: &Probe,
) -> (Vec<Client>, Phase) {
    let before = RedisStats::reset(ledger).await;
    let server_before = probe.pid.and_then(proc_cpu_secs);
    let bench_before = proc_cpu_secs(std::process::id());
    let (clients, mut phase) = drive(label, clients, plan, accounts, probe).await;
    phase.redis = match before {
        Some(cpu_before) => RedisStats::read(ledger, cpu_before).await,
        None => None,
    };
    let spent = |before: Option<f64>, pid: Option<u32>| Some(proc_cpu_secs(pid?)? - before?);
    phase.server_cpu_secs = spent(server_before, probe.pid);
    phase.bench_cpu_secs = spent(bench_before, Some(std::process::id()));
    phase.rss_hwm_bytes = probe.pid.and_then(|pid| proc_status_bytes(pid, "VmHWM:"));
    (clients, phase)
}

async fn drive(
    label: &str,
    clients: Vec<Client>,
    plan: &Plan,
    accounts: &Arc<Accounts>,
    probe: &Probe,
) -> (Vec<Client>, Phase) {
    let start = Instant::now();
    let end = plan.requests.is_none().then_some(start + plan.duration);
    let permits = plan.rate.map(|_| Arc::new(Semaphore::new(0)));
    let run_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    let shared = Arc::new(Shared {
        accounts: accounts.clone(),
        run_id,
        start,
        end,
        requests: plan.requests,
        rate: plan.rate,
        permits: permits.clone(),
        seq: AtomicU64::new(0),
        completed: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        distribution: plan.distribution,
    });
    let stop = Arc::new(AtomicBool::new(false));
    // The requests due before the end (a run of --duration-secs), or --requests.
    let scheduled = plan.rate.map(|rate| {
        plan.requests
            .unwrap_or_else(|| (plan.duration.as_secs_f64() * rate).ceil() as u64)
    });
    let pacer = match (&permits, plan.rate) {
        (Some(permits), Some(rate)) => Some(spawn_pacer(
            permits.clone(),
            rate,
            start,
            scheduled,
            stop.clone(),
        )),
        _ => None,
    };
    let workers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, client)| tokio::spawn(worker(client, shared.clone(), i)))
        .collect();

    let bar = match (plan.requests, end) {
        (Some(n), _) => ProgressBar::new(n),
        _ => ProgressBar::new(plan.duration.as_secs().max(1)),
    };
    bar.set_style(
        ProgressStyle::with_template("{prefix} {wide_bar} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix(label.to_owned());
    let mut timeline = Vec::new();
    let mut rss_max = None::<u64>;
    let mut outbox_lag_ms = Vec::new();
    let mut last = (start, 0u64);
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let now = Instant::now();
        let failed = shared.failed.load(Ordering::Relaxed);
        let done = shared.completed.load(Ordering::Relaxed);
        // The timeline, like the throughput, counts successes only.
        let ok = done.saturating_sub(failed);
        let interval = now.duration_since(last.0).as_secs_f64();
        if interval > 0.0 && now > start {
            let rps = ok.saturating_sub(last.1) as f64 / interval;
            timeline.push((now.duration_since(start).as_secs_f64(), rps));
            bar.set_message(format!("{done} done, {rps:.0}/s ok, {failed} errors"));
        }
        last = (now, ok);
        if let Some(pid) = probe.pid {
            if let Some(rss) = proc_status_bytes(pid, "VmRSS:") {
                rss_max = Some(rss_max.map_or(rss, |m| m.max(rss)));
            }
        }
        if let Some(addr) = &probe.metrics_addr {
            if let Some(lag) = outbox_lag_ms_of(addr).await {
                outbox_lag_ms.push(lag);
            }
        }
        match (plan.requests, end) {
            (Some(_), _) => bar.set_position(done),
            (None, Some(_)) => bar.set_position(now.duration_since(start).as_secs()),
            _ => {}
        }
        let time_up = end.is_some_and(|end| now >= end);
        let all_sent = plan.requests.is_some_and(|n| done >= n);
        if time_up || all_sent || workers.iter().all(|w| w.is_finished()) {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    // The pacer first, so that what it released is final; then the workers waiting for a
    // permit stop.
    let released = pacer.map(|pacer| pacer.join().unwrap_or_default());
    let stopped = Instant::now();
    // The schedule, not the pacer, says what was due by now: a pacer kept off its core
    // at the end stops without releasing the last requests, the latest of the run.
    let released = released.map(|released| match plan.rate {
        Some(rate) => released.max(due_by(stopped.duration_since(start), rate, scheduled)),
        None => released,
    });
    if let Some(permits) = &permits {
        permits.close();
    }
    let mut clients = Vec::with_capacity(workers.len());
    let mut latency_us = histogram();
    let mut service_us = histogram();
    let mut send_delay_us = histogram();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut succeeded = 0u64;
    let mut finished = start;
    for handle in workers {
        match handle.await {
            Ok(result) => {
                clients.push(result.client);
                let _ = latency_us.add(&result.latency_us);
                let _ = service_us.add(&result.service_us);
                let _ = send_delay_us.add(&result.send_delay_us);
                for (kind, n) in result.errors {
                    *errors.entry(kind).or_insert(0) += n;
                }
                succeeded += result.succeeded;
                finished = finished.max(result.finished);
            }
            Err(err) => {
                *errors.entry(format!("worker:{err}")).or_insert(0) += 1;
            }
        }
    }
    // Open loop: requests that were due but not sent when the phase stopped (all workers
    // busy: the slowest part of the run). Each is recorded with the latency it had reached
    // by then, from its intended send time: a lower bound.
    let unsent = match (released, plan.rate) {
        (Some(released), Some(rate)) => {
            let sent = shared.seq.load(Ordering::Relaxed).min(released);
            for seq in sent..released {
                let intended = start + Duration::from_secs_f64(seq as f64 / rate);
                let waited = stopped.saturating_duration_since(intended);
                latency_us.saturating_record((waited.as_micros() as u64).max(1));
            }
            Some(released - sent)
        }
        _ => None,
    };
    bar.finish_and_clear();
    let completed = shared.completed.load(Ordering::Relaxed);
    // The measured time: up to the phase's end (requests answered after it are in the
    // latencies, not in the throughput), or, for --requests, until the last answer.
    let elapsed = match end {
        Some(end) => end.duration_since(start),
        None => finished.duration_since(start),
    };
    (
        clients,
        Phase {
            label: label.to_owned(),
            latency_us,
            service_us,
            send_delay_us,
            completed,
            succeeded,
            unsent,
            errors,
            elapsed,
            timeline,
            rss_max_bytes: rss_max,
            rss_hwm_bytes: None,
            redis: None,
            server_cpu_secs: None,
            bench_cpu_secs: None,
            outbox_lag_ms,
        },
    )
}

/// Releases one permit per intended send time until stopped, at most `requests`; answers
/// how many it released. Request `n` is due at `start + n / rate`; the thread sleeps until
/// the next one is due (not a fixed period), so a permit is released within the OS timer's
/// slack of its send time.
fn spawn_pacer(
    permits: Arc<Semaphore>,
    rate: f64,
    start: Instant,
    requests: Option<u64>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut released = 0u64;
        while !stop.load(Ordering::Relaxed) {
            if requests.is_some_and(|n| released >= n) {
                std::thread::sleep(PACER_SLEEP_MAX);
                continue;
            }
            let next = start + Duration::from_secs_f64(released as f64 / rate);
            let now = Instant::now();
            if next > now {
                std::thread::sleep((next - now).min(PACER_SLEEP_MAX));
                continue;
            }
            let due = due_by(now.duration_since(start), rate, requests);
            // Bounded by the semaphore's limit; a backlog this large means the server
            // stopped answering, and the phase ends on time anyway.
            let add = (due - released).min(Semaphore::MAX_PERMITS as u64 / 2) as usize;
            permits.add_permits(add);
            released = due;
        }
        released
    })
}

/// How many requests of an open loop at `rate` are due `elapsed` after its start (request
/// `n` at `n / rate`), at most `requests`.
fn due_by(elapsed: Duration, rate: f64, requests: Option<u64>) -> u64 {
    let due = (elapsed.as_secs_f64() * rate) as u64 + 1;
    requests.map_or(due, |n| due.min(n))
}

/// A `Vm...:` line of /proc/<pid>/status, in bytes.
pub fn proc_status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// CPU time (user + system, all threads) a process has used so far, in seconds, from
/// /proc/<pid>/stat. Its clock ticks are USER_HZ, 100 per second on every Linux
/// architecture tollgate builds for.
pub fn proc_cpu_secs(pid: u32) -> Option<f64> {
    const USER_HZ: f64 = 100.0;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count fields after its ')'.
    let mut after = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
    let utime: u64 = after.nth(11)?.parse().ok()?;
    let stime: u64 = after.next()?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Request n is due at n / rate: at the start the first one, then one per period, never
    /// more than the run has.
    #[test]
    fn the_schedule_counts_what_is_due() {
        let ms = Duration::from_millis;
        assert_eq!(due_by(ms(0), 1000.0, None), 1);
        assert_eq!(due_by(ms(999), 1000.0, None), 1000);
        assert_eq!(due_by(ms(1000), 1000.0, None), 1001);
        assert_eq!(due_by(ms(2500), 1000.0, Some(2000)), 2000);
    }

    #[test]
    fn this_process_has_used_some_cpu() {
        let spin = std::time::Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let secs = proc_cpu_secs(std::process::id()).expect("/proc/self/stat");
        assert!(secs > 0.0, "{secs}");
        assert_eq!(proc_cpu_secs(u32::MAX), None);
    }

    #[test]
    fn outbox_lag_is_the_oldest_shard() {
        let metrics = "# HELP tollgate_outbox_oldest_unsettled_age_seconds x\n\
            # TYPE tollgate_outbox_oldest_unsettled_age_seconds gauge\n\
            tollgate_outbox_oldest_unsettled_age_seconds{shard=\"0\"} 0.25\n\
            tollgate_outbox_oldest_unsettled_age_seconds{shard=\"1\"} 1.5\n\
            tollgate_outbox_oldest_unsettled_age_seconds_other 99\n\
            tollgate_outbox_length{shard=\"1\"} 7\n";
        assert_eq!(outbox_lag_ms_in(metrics), Some(1500));
        assert_eq!(outbox_lag_ms_in("tollgate_outbox_length 3\n"), None);
    }
}
