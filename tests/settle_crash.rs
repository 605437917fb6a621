//! Crash test: the `tollgate serve` binary runs as a child process under concurrent load
//! and is SIGKILLed at random moments (TOLLGATE_CRASH_KILLS times, default 5), then
//! restarted. Clients retry with the same idempotency key until they get an answer. In
//! the end every acknowledged charge is in PostgreSQL exactly once, nothing refused is,
//! and `tollgate reconcile` exits 0.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tollgate::api::pb;

const DEADLINE: Duration = Duration::from_secs(120);
const CLIENTS: usize = 8;
const ACCOUNTS: usize = 5;

fn random_below(n: u64) -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        % n
}

struct Tollgate {
    child: Option<Child>,
    config: std::path::PathBuf,
    /// Every run's stderr, one after the other.
    stderr: std::path::PathBuf,
}

impl Tollgate {
    fn start(config: &std::path::Path, stderr: &std::path::Path) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(stderr)
            .expect("stderr file");
        let child = common::tollgate()
            .args(["serve", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start tollgate");
        Self {
            child: Some(child),
            config: config.to_owned(),
            stderr: stderr.to_owned(),
        }
    }

    fn sigkill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn restart(&mut self) {
        self.sigkill();
        *self = Self::start(&self.config.clone(), &self.stderr.clone());
    }

    /// How the running child ended, if it did (not by this test's SIGKILL).
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().expect("try_wait")
    }

    /// The end of what the runs wrote to stderr, for a failure message.
    fn stderr_tail(&self) -> String {
        let text = common::read_lossy(&self.stderr);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Tollgate {
    fn drop(&mut self) {
        self.sigkill();
    }
}

/// The config of the tollgate under test, on these ports.
fn write_config(path: &std::path::Path, grpc_port: u16, http_port: u16, redis: &str, pg: &str) {
    std::fs::write(
        path,
        format!(
            "[server]\ngrpc_addr = \"127.0.0.1:{grpc_port}\"\nhttp_addr = \"127.0.0.1:{http_port}\"\n\
             [redis]\nurl = \"{redis}\"\ncall_timeout_ms = 2000\n\
             [auth]\nadmin_token = \"{}\"\nservice_token = \"{}\"\n\
             [store]\nurl = \"{pg}\"\n\
             [settler]\nconsumer = \"crash\"\nclaim_idle_ms = 1000\nidle_wait_ms = 10\n",
            common::ADMIN_TOKEN,
            common::SERVICE_TOKEN,
        ),
    )
    .expect("config");
}

/// Grants `account` its credits through the server at `grpc` (the same grant whatever
/// the attempt: one idempotency key).
async fn fund(grpc: &str, account: String) -> Result<(), tonic::Status> {
    let channel = tonic::transport::Channel::from_shared(grpc.to_owned())
        .expect("uri")
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    pb::admin_client::AdminClient::with_interceptor(
        channel,
        common::auth(Some(common::ADMIN_TOKEN)),
    )
    .grant(pb::GrantRequest {
        account_id: account,
        amount: 1_000_000,
        idempotency_key: "fund".into(),
        ..Default::default()
    })
    .await
    .map(|_| ())
}

#[derive(Default)]
struct Seen {
    /// Event ids of acknowledged debits.
    acked: BTreeSet<String>,
    /// Idempotency keys that were refused.
    refused: HashSet<String>,
}

async fn client(
    grpc: String,
    id: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
    seen: Arc<Mutex<Seen>>,
) {
    let mut n = 0u64;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        n += 1;
        let key = format!("c{id}-{n}");
        // Every fifth request goes to an account with no credits: refused.
        let account = if n.is_multiple_of(5) {
            "broke".to_owned()
        } else {
            format!("acct{}", random_below(ACCOUNTS as u64))
        };
        let request = pb::DebitRequest {
            account_id: account,
            amount: 1 + random_below(3) as i64,
            idempotency_key: key.clone(),
            operation: "crash.test".into(),
            ..Default::default()
        };
        let deadline = Instant::now() + DEADLINE;
        loop {
            let answer = async {
                let channel = tonic::transport::Channel::from_shared(grpc.clone())
                    .expect("uri")
                    .connect_timeout(Duration::from_secs(1))
                    .timeout(Duration::from_secs(5))
                    .connect()
                    .await
                    .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                let mut metering = pb::metering_client::MeteringClient::with_interceptor(
                    channel,
                    common::auth(Some(common::SERVICE_TOKEN)),
                );
                metering.debit(request.clone()).await
            }
            .await;
            match answer {
                Ok(out) => {
                    seen.lock()
                        .expect("seen")
                        .acked
                        .insert(out.into_inner().event_id);
                    break;
                }
                Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                    seen.lock().expect("seen").refused.insert(key.clone());
                    break;
                }
                Err(s) => {
                    // The server is down or restarting: the same key again.
                    assert!(Instant::now() < deadline, "no answer for {key}: {s:?}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_and_duplicates_nothing() {
    let kills: usize = std::env::var("TOLLGATE_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let redis = common::RedisServer::start();
    let pg = common::PgDatabase::create().await;
    let dir = std::env::temp_dir().join(format!("tollgate-crash-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("tollgate.toml");
    let stderr = dir.join("stderr.log");

    // Started on ports picked free (again if another process took one before it bound
    // them: it then exits), answering: the accounts funded through it. Its restarts keep
    // these ports.
    let deadline = Instant::now() + DEADLINE;
    let (mut tollgate, grpc) = 'started: loop {
        let _ = std::fs::remove_file(&stderr);
        let (grpc_port, http_port) = (common::free_port(), common::free_port());
        write_config(&config, grpc_port, http_port, &redis.url(), &pg.url);
        let mut tollgate = Tollgate::start(&config, &stderr);
        let grpc = format!("http://127.0.0.1:{grpc_port}");
        let mut funded = 0;
        while funded < ACCOUNTS {
            let granted = fund(&grpc, format!("acct{funded}")).await;
            // Looked at after the answer: a port another process took answers for it.
            if let Some(status) = tollgate.exited() {
                // Only a port taken meanwhile is tried again ("cannot listen on …").
                let stderr = tollgate.stderr_tail();
                assert!(
                    stderr.contains("cannot listen on") && Instant::now() < deadline,
                    "server did not start: it exited ({status}); its stderr:\n{stderr}"
                );
                continue 'started;
            }
            if granted.is_ok() {
                funded += 1;
                continue;
            }
            assert!(
                Instant::now() < deadline,
                "server did not start: {granted:?}; its stderr:\n{}",
                tollgate.stderr_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        break (tollgate, grpc);
    };

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| tokio::spawn(client(grpc.clone(), i, stop.clone(), seen.clone())))
        .collect();
    for kill in 0..kills {
        // Each kill lands under load: the (re)started server has acknowledged charges
        // first, however slowly a busy machine starts it.
        let acked = || seen.lock().expect("seen").acked.len();
        let before = acked();
        let deadline = Instant::now() + DEADLINE;
        while acked() < before + 10 {
            assert!(
                Instant::now() < deadline,
                "no charge acknowledged before kill {kill} (server ended: {:?}); its stderr:\n{}",
                tollgate.exited(),
                tollgate.stderr_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let delay = 300 + random_below(900);
        println!("kill {kill}: {delay} ms after the 10th acknowledged charge");
        tokio::time::sleep(Duration::from_millis(delay)).await;
        tollgate.restart();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for c in clients {
        c.await.expect("client");
    }
    tollgate.sigkill();

    // Reconcile drains what the killed settlers left and compares.
    let out = common::output_within(
        common::tollgate()
            .args(["reconcile", "--config"])
            .arg(&config),
        common::COMMAND_TIMEOUT,
    );
    assert!(
        out.status.success(),
        "reconcile: {out:?}; the server's stderr:\n{}",
        tollgate.stderr_tail()
    );

    let seen = std::mem::take(&mut *seen.lock().expect("seen"));
    assert!(
        seen.acked.len() > 50,
        "too little load: {}",
        seen.acked.len()
    );
    assert!(!seen.refused.is_empty());
    let store = tollgate::settle::Store::connect_lazy(&pg.url, 2).expect("store");
    for id in &seen.acked {
        let event = store.event(id).await.expect("query");
        assert!(
            event.is_some(),
            "acknowledged charge {id} missing from the ledger"
        );
    }
    // Exactly once: the store's debits are exactly the acknowledged ones.
    let mut stored = BTreeSet::new();
    // A page cap: every event the store holds, in pages of 1000, and a couple more.
    let pages_max = store.count_events().await.expect("count") as usize / 1000 + 3;
    for a in 0..ACCOUNTS {
        let mut after = None;
        let mut pages = 0;
        loop {
            pages += 1;
            assert!(pages <= pages_max, "acct{a}: history pages never end");
            let page = store
                .history(&tollgate::settle::store::HistoryQuery {
                    account_id: format!("acct{a}"),
                    kinds: vec![tollgate::ledger::event::EventKind::Debit],
                    page_size: 1000,
                    after: after.clone(),
                    ..Default::default()
                })
                .await
                .expect("history");
            for e in page.events {
                assert!(stored.insert(e.event_id), "duplicate row");
            }
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
    }
    assert_eq!(
        stored, seen.acked,
        "ledger debits differ from acknowledged charges"
    );
    let broke = store
        .history(&tollgate::settle::store::HistoryQuery {
            account_id: "broke".into(),
            page_size: 10,
            ..Default::default()
        })
        .await
        .expect("history");
    assert!(
        broke.events.is_empty(),
        "a refused charge reached the ledger"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
