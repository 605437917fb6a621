//! `tollgate bench` runs for a couple of seconds against a test redis-server (starting its
//! own `tollgate serve` child) and writes a well-formed result. No timing is asserted:
//! figures belong in docs/BENCHMARKS.md, not in tests.

mod common;

use std::time::{Duration, Instant};

use serde_json::Value;

/// The bench's server child's Redis call and check deadlines, as generous as every test
/// server's (tests/common): a busy CI machine must not turn into errors here.
const GENEROUS_DEADLINES: [&str; 4] = [
    "--server-set",
    "redis.call_timeout_ms=2000",
    "--server-set",
    "gateway.check_timeout_ms=5000",
];

/// Runs `tollgate bench`; answers its JSON result, its standard output and its process id.
fn bench(redis: &common::RedisServer, scenario: &str, extra: &[&str]) -> (Value, String, u32) {
    bench_with_env(redis, scenario, extra, &[])
}

/// [`bench`] with these variables in the bench's environment.
fn bench_with_env(
    redis: &common::RedisServer,
    scenario: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Value, String, u32) {
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "tollgate-bench-smoke-{}-{scenario}-{run}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let json_path = dir.join("result.json");
    let plot_path = dir.join("latency.svg");
    let (output, pid) = common::output_and_pid_within(
        common::tollgate()
            .args(["bench", scenario, "--redis-url", &redis.url()])
            .args(["--duration-secs", "2", "--warmup-secs", "0"])
            .args(["--concurrency", "4", "--accounts", "50"])
            .args(GENEROUS_DEADLINES)
            .arg("--json")
            .arg(&json_path)
            .arg("--plot")
            .arg(&plot_path)
            .args(extra)
            .envs(env.iter().copied()),
        common::COMMAND_TIMEOUT,
    );
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "tollgate bench {scenario} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).expect("json written"))
            .expect("well-formed JSON");
    let svg = std::fs::read_to_string(&plot_path).expect("plot written");
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    let _ = std::fs::remove_dir_all(&dir);
    assert_left_nothing(&json, pid);
    (json, stdout, pid)
}

/// Whether process `pid` runs (not gone, not a zombie), from /proc.
fn running(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat
            .rfind(')')
            .and_then(|i| stat.get(i + 1..))
            .and_then(|rest| rest.split_whitespace().next());
        !matches!(state, Some("Z" | "X"))
    })
}

/// The processes whose working directory is one of the private directories of bench
/// process `bench_pid` (redis-server runs in its --dir).
fn processes_in_dirs_of(bench_pid: u32) -> Vec<String> {
    let marker = format!("-{bench_pid}-");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| {
            let e = e.ok()?;
            let cwd = std::fs::read_link(e.path().join("cwd")).ok()?;
            let cwd = cwd.to_string_lossy().into_owned();
            (cwd.contains("tollgate-bench-") && cwd.contains(&marker))
                .then(|| format!("{}: {cwd}", e.file_name().to_string_lossy()))
        })
        .collect()
}

/// After the bench process `bench_pid` exited: its server children (pids in the JSON) no
/// longer run, no process runs in its private directories, and those are removed.
fn assert_left_nothing(json: &Value, bench_pid: u32) {
    let pids: Vec<u64> = [&json["server_pid"], &json["versus"]["server_pid"]]
        .iter()
        .filter_map(|v| v.as_u64())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    while (pids.iter().any(|&p| running(p)) || !processes_in_dirs_of(bench_pid).is_empty())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    for pid in pids {
        assert!(!running(pid), "the bench's server {pid} still runs");
    }
    let left = processes_in_dirs_of(bench_pid);
    assert!(left.is_empty(), "left running: {left:?}");
    let marker = format!("-{bench_pid}-");
    let dirs: Vec<String> = std::fs::read_dir(std::env::temp_dir())
        .expect("temp dir")
        .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
        .filter(|name| name.starts_with("tollgate-bench-") && name.contains(&marker))
        .collect();
    assert!(dirs.is_empty(), "left behind: {dirs:?}");
}

/// 0 < p50 ≤ p90 ≤ p99 ≤ p99.9 ≤ max.
fn assert_percentiles(latency: &Value) {
    let ms: Vec<f64> = ["p50", "p90", "p99", "p999", "max"]
        .iter()
        .map(|p| {
            latency[p]
                .as_f64()
                .unwrap_or_else(|| panic!("{p} in {latency}"))
        })
        .collect();
    assert!(ms[0] > 0.0, "{latency}");
    assert!(ms.windows(2).all(|w| w[0] <= w[1]), "{latency}");
}

/// A phase made no errors, but for the gateway's own deadline: a `check` or
/// `forward-auth` that waited past `gateway.check_timeout_ms` (150 ms) is denied
/// `unavailable` by the route's fail policy, which a debug build on a busy 2-core machine
/// meets now and then. Those may be a few (under 5% of the requests); any other kind fails.
fn assert_no_errors(phase: &Value, scenario: &str) {
    let errors = phase["errors"]
        .as_object()
        .unwrap_or_else(|| panic!("errors in {phase}"));
    let gateway = matches!(scenario, "check" | "forward-auth");
    let mut deadlines = 0;
    for (kind, count) in errors {
        let count = count
            .as_u64()
            .unwrap_or_else(|| panic!("{kind} in {phase}"));
        if gateway && kind == "denied:unavailable" {
            deadlines += count;
        } else {
            assert_eq!(count, 0, "{kind} errors: {phase}");
        }
    }
    assert_eq!(phase["errors_total"].as_u64(), Some(deadlines), "{phase}");
    let requests = phase["requests"]
        .as_u64()
        .unwrap_or_else(|| panic!("requests in {phase}"));
    assert!(
        deadlines * 20 < requests.max(1),
        "{deadlines} of {requests} requests past the check deadline: {phase}"
    );
}

fn assert_result(json: &Value, scenario: &str) {
    assert_eq!(json["scenario"], scenario);
    assert_eq!(json["concurrency"], 4);
    assert!(
        json["throughput_rps"].as_f64().is_some_and(|r| r > 0.0),
        "{json}"
    );
    assert_percentiles(&json["latency_ms"]);
    assert_no_errors(json, scenario);
    // Successes answered after the measured time are not in the throughput.
    let (ok, answered) = (json["succeeded"].as_u64(), json["requests"].as_u64());
    assert!(
        matches!((ok, answered), (Some(ok), Some(n)) if 0 < ok && ok <= n),
        "{json}"
    );
    assert!(
        json["server_rss_bytes"].as_u64().is_some_and(|b| b > 0),
        "{json}"
    );
}

/// The closed loop's throughput is over the measured time only (not the drain after it):
/// `elapsed_secs` is the duration asked for, to the microsecond.
fn assert_measured_for(phase: &Value, secs: f64) {
    let elapsed = phase["elapsed_secs"].as_f64().expect("elapsed_secs");
    assert!(
        (elapsed - secs).abs() < 1e-6,
        "elapsed {elapsed} in {phase}"
    );
}

/// `--baseline` (closed loop): the raw side ran cleanly and `ratio` is the throughputs'.
fn assert_baseline(json: &Value) {
    let base = &json["baseline"];
    assert_eq!(base["errors_total"], 0, "{json}");
    assert_percentiles(&base["latency_ms"]);
    let rps = json["throughput_rps"].as_f64().expect("throughput_rps");
    let base_rps = json["baseline_rps"].as_f64().expect("baseline_rps");
    assert!(rps > 0.0 && base_rps > 0.0, "{json}");
    assert_eq!(base["throughput_rps"].as_f64(), Some(base_rps), "{json}");
    let ratio = json["ratio"].as_f64().expect("ratio");
    assert!((ratio - rps / base_rps).abs() < 0.002, "{json}");
}

/// The bench's own server takes its whole configuration from the bench: TOLLGATE_*
/// variables of the bench's environment (here a wrong service token and another shard
/// count) do not reach it.
#[test]
fn debit_bench_with_baseline_writes_a_result() {
    let redis = common::RedisServer::start();
    let (json, stdout, _) = bench_with_env(
        &redis,
        "debit",
        &["--baseline"],
        &[
            ("TOLLGATE_SERVICE_TOKEN", "wrong"),
            ("TOLLGATE_LEDGER__SHARDS", "32"),
        ],
    );
    assert_result(&json, "debit");
    assert!(json["send_delay_ms"].is_null(), "closed loop: {json}");
    assert!(json["unsent"].is_null(), "closed loop: {json}");
    assert_baseline(&json);
    // 2 s in 4 rounds of each side.
    assert_measured_for(&json, 2.0);
    assert_measured_for(&json["baseline"], 2.0);
    assert!(stdout.contains("ratio tollgate ÷ raw"), "{stdout}");
}

#[test]
fn hold_bench_writes_a_result() {
    let redis = common::RedisServer::start();
    let (json, _, _) = bench(&redis, "hold", &[]);
    assert_result(&json, "hold");
    assert_measured_for(&json, 2.0);
}

/// Run twice against the same Redis (--redis-url): each run makes an API key per account
/// and revokes its keys at the end, so no account keeps a live key (runs used to pile
/// them up until the seeding failed `KeyLimit`).
#[test]
fn forward_auth_bench_writes_a_result() {
    let redis = common::RedisServer::start();
    for _ in 0..2 {
        let (json, stdout, _) = bench(&redis, "forward-auth", &[]);
        assert_result(&json, "forward-auth");
        assert_measured_for(&json, 2.0);
        assert!(stdout.contains("revoked the run's 50 API keys"), "{stdout}");
    }
    let live = bench_keys(&redis, "ks");
    assert!(live.is_empty(), "live key indexes left: {live:?}");
    let revoked = bench_keys(&redis, "kr");
    assert_eq!(
        revoked.len(),
        50,
        "each account's revoked keys: {revoked:?}"
    );
}

/// The bench accounts' API key indexes of one kind in `redis`: `ks` live, `kr` revoked.
fn bench_keys(redis: &common::RedisServer, index: &str) -> Vec<String> {
    let mut con = redis.client().get_connection().expect("redis");
    redis::cmd("KEYS")
        .arg(format!("*:{index}:bench-*"))
        .query(&mut con)
        .expect("KEYS")
}

/// A run that fails after seeding (here: its plot cannot be written) still revokes the
/// keys it made in a Redis of the caller's.
#[test]
fn a_bench_failing_after_seeding_revokes_its_keys() {
    let redis = common::RedisServer::start();
    let nowhere = common::temp_path("no-such-dir").join("latency.svg");
    let output = common::output_within(
        common::tollgate()
            .args(["bench", "forward-auth", "--redis-url", &redis.url()])
            .args(["--duration-secs", "1", "--warmup-secs", "0"])
            .args(["--concurrency", "2", "--accounts", "20"])
            .args(GENEROUS_DEADLINES)
            .arg("--plot")
            .arg(&nowhere),
        common::COMMAND_TIMEOUT,
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("no-such-dir"), "{stderr}");
    assert!(stdout.contains("revoked the run's 20 API keys"), "{stdout}");
    let live = bench_keys(&redis, "ks");
    assert!(live.is_empty(), "live key indexes left: {live:?}");
}

/// Open loop with --baseline: both sides are sent at one rate, so there is no throughput
/// ratio (null); their latencies are compared instead.
#[test]
fn check_bench_writes_a_result() {
    let redis = common::RedisServer::start();
    let (json, stdout, _) = bench(&redis, "check", &["--rate", "200", "--baseline"]);
    assert_result(&json, "check");
    assert!(json["ratio"].is_null(), "{json}");
    assert_eq!(json["baseline"]["errors_total"], 0, "{json}");
    assert_percentiles(&json["baseline"]["latency_ms"]);
    for p in ["p50", "p99"] {
        let compared = &json["latency_vs_baseline"][p];
        assert_eq!(compared["ms"], json["latency_ms"][p], "{json}");
        assert_eq!(
            compared["baseline_ms"], json["baseline"]["latency_ms"][p],
            "{json}"
        );
        assert!(
            compared["ratio"].as_f64().is_some_and(|r| r > 0.0),
            "{json}"
        );
    }
    assert!(json["unsent"].as_u64().is_some(), "{json}");
    assert!(!stdout.contains("ratio tollgate ÷ raw"), "{stdout}");
    assert!(
        stdout.contains("latency tollgate vs raw Redis script: p50"),
        "{stdout}"
    );
    // Open loop: the latency split into the time to the actual send and from it.
    for split in ["service_latency_ms", "send_delay_ms"] {
        for p in ["p50", "p99", "max"] {
            assert!(
                json[split][p].as_f64().is_some_and(|v| v >= 0.0),
                "{split}.{p} in {json}"
            );
        }
    }
    assert!(
        json["service_latency_ms"]["max"].as_f64() <= json["latency_ms"]["max"].as_f64(),
        "{json}"
    );
    assert!(stdout.contains("send delay"), "{stdout}");
}

/// Open loop faster than the workers can go: the requests due but not sent when the run
/// ends are counted (`unsent`), not dropped from the result.
#[test]
fn open_loop_counts_the_requests_it_could_not_send() {
    let redis = common::RedisServer::start();
    let (json, stdout, _) = bench(&redis, "debit", &["--rate", "20000"]);
    let sent = json["requests"].as_u64().expect("requests");
    let unsent = json["unsent"].as_u64().expect("unsent");
    assert!(sent > 0 && unsent > 0, "{json}");
    // Every request due within the 2 s was either sent or counted as unsent (the pacer
    // may not have released the last few before the run stopped).
    assert!(
        (36_000..=40_000).contains(&(sent + unsent)),
        "{sent} sent + {unsent} unsent"
    );
    // The unsent waited about as long as the run (their latency is up to the end).
    assert!(
        json["latency_ms"]["max"]
            .as_f64()
            .is_some_and(|ms| ms > 500.0),
        "{json}"
    );
    assert!(
        stdout.contains(&format!("unsent       {unsent} ")),
        "{stdout}"
    );
}

/// A run whose requests fail (here Debit with a wrong service token against a running
/// server) writes its result and then fails, naming the side, instead of ending with a
/// confident throughput.
#[test]
fn a_bench_whose_requests_fail_fails() {
    let redis = common::RedisServer::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let server = rt.block_on(common::TestServer::start(
        common::test_config(&redis.url()),
        tollgate::ledger::Clock::Redis,
    ));
    let json_path = common::temp_path("json");
    let output = common::output_within(
        common::tollgate()
            .args(["bench", "debit", "--redis-url", &redis.url()])
            .args(["--target", &server.grpc_addr.to_string()])
            .args(["--service-token", "wrong"])
            .args(["--duration-secs", "1", "--warmup-secs", "0"])
            .args(["--concurrency", "2", "--accounts", "10"])
            .arg("--json")
            .arg(&json_path),
        common::COMMAND_TIMEOUT,
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("debit: ") && stderr.contains("requests failed"),
        "{stderr}"
    );
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).expect("json written"))
            .expect("well-formed JSON");
    let _ = std::fs::remove_file(&json_path);
    assert_eq!(json["throughput_rps"], 0.0, "{json}");
    assert_eq!(json["succeeded"], 0, "{json}");
    assert!(
        json["errors"]["grpc:Unauthenticated"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "{json}"
    );
    drop(server);
}

/// `--settle-into postgres://…`: the child settles into a fresh database while the bench
/// samples the outbox lag from its /metrics; the database is dropped afterwards.
#[test]
fn check_bench_settling_into_postgres_reports_the_outbox_lag() {
    let redis = common::RedisServer::start();
    let admin_url = common::pg_admin_url();
    let (json, stdout, pid) = bench(&redis, "check", &["--settle-into", &admin_url]);
    assert_result(&json, "check");
    let lag = &json["outbox_lag_ms"];
    assert!(lag["samples"].as_u64().is_some_and(|n| n > 0), "{json}");
    for p in ["p50", "p99", "max"] {
        assert!(lag[p].as_u64().is_some(), "outbox_lag_ms.{p} in {json}");
    }
    assert!(stdout.contains("outbox lag"), "{stdout}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // This run's database (named by the bench's process id), not another run's.
    let name = format!("tollgate_bench_{pid}");
    assert!(stdout.contains(&name), "{stdout}");
    let left: i64 = rt.block_on(async {
        use sqlx::Connection;
        let mut con = sqlx::PgConnection::connect(&admin_url)
            .await
            .expect("PostgreSQL must run (scripts/test starts it)");
        sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
            .bind(&name)
            .fetch_one(&mut con)
            .await
            .expect("query")
    });
    assert_eq!(left, 0, "the bench database was not dropped");
}

/// Runs `tollgate bench` with redis-servers of its own (no --redis-url), 2 s in 2 rounds at
/// concurrency 4 over 50 accounts; answers its JSON result and its standard output.
fn bench_on_its_own(name: &str, args: &[&str]) -> (Value, String) {
    let dir = std::env::temp_dir().join(format!(
        "tollgate-bench-smoke-{}-{name}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let json_path = dir.join("result.json");
    let (output, pid) = common::output_and_pid_within(
        common::tollgate()
            .arg("bench")
            .args(args)
            .args(["--duration-secs", "2", "--warmup-secs", "0"])
            .args(["--rounds", "2", "--concurrency", "4", "--accounts", "50"])
            .args(GENEROUS_DEADLINES)
            .arg("--json")
            .arg(&json_path),
        common::COMMAND_TIMEOUT,
    );
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "tollgate bench {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).expect("json written"))
            .expect("well-formed JSON");
    let _ = std::fs::remove_dir_all(&dir);
    assert_left_nothing(&json, pid);
    (json, stdout)
}

/// `--durability replica-wait`: the bench starts its own primary and replica, and the
/// child server waits for the replica after every write (no --redis-url).
#[test]
fn debit_bench_at_replica_wait_durability() {
    let (json, stdout) = bench_on_its_own(
        "replica-wait",
        &["debit", "--durability", "replica-wait", "--baseline"],
    );
    assert_eq!(json["durability"], "replica-wait", "{json}");
    assert_eq!(json["wait_timeout_ms"], 100, "{json}");
    assert_eq!(json["errors_total"], 0, "{json}");
    assert_baseline(&json);
    assert!(
        stdout.contains("redis durability: replica-wait"),
        "{stdout}"
    );
}

/// `--versus-accounts`: a second stack (its own redis-server and server child) seeded with
/// another number of accounts, measured in slices alternating with the main one; the
/// ratio of their throughputs, and the raw function's own, come from the same run.
#[test]
fn check_bench_versus_another_number_of_accounts() {
    let (json, stdout) = bench_on_its_own(
        "versus",
        &["check", "--versus-accounts", "10", "--baseline"],
    );
    assert_result(&json, "check");
    let versus = &json["versus"];
    assert_eq!(versus["accounts"], 10, "{json}");
    assert_no_errors(versus, "check");
    assert!(versus["baseline"].is_object(), "{json}");
    // Each stack has a server of its own.
    let pids = (json["server_pid"].as_u64(), versus["server_pid"].as_u64());
    assert!(
        matches!(pids, (Some(a), Some(b)) if a != b),
        "server pids {pids:?}"
    );
    let rps = |v: &Value| v["throughput_rps"].as_f64().filter(|r| *r > 0.0);
    let (main_rps, versus_rps) = (rps(&json), rps(versus));
    let (Some(main_rps), Some(versus_rps)) = (main_rps, versus_rps) else {
        panic!("throughputs in {json}");
    };
    let ratio = json["accounts_ratio"].as_f64().expect("accounts_ratio");
    assert!((ratio - main_rps / versus_rps).abs() < 0.01, "{json}");
    let base_ratio = json["baseline_accounts_ratio"].as_f64();
    assert!(base_ratio.is_some_and(|r| r > 0.0), "{json}");
    assert_baseline(&json);
    assert_baseline(versus);
    // Both sides of each stack were measured in 2 slices of a second each.
    for phase in [&json, &json["baseline"], versus, &versus["baseline"]] {
        assert_measured_for(phase, 2.0);
    }
    for side in [&json, versus] {
        assert!(
            side["server_cpu_usec_per_request"]
                .as_f64()
                .is_some_and(|us| us > 0.0),
            "{side}"
        );
    }
    assert!(
        stdout.contains("throughput with 50 accounts ÷ with 10:"),
        "{stdout}"
    );
    assert!(stdout.contains("the raw function's own:"), "{stdout}");
}

/// `tollgate bench ARGS --redis-url …` is refused before it starts, naming `flag`.
fn refused_with_a_redis_url(args: &[&str], flag: &str) {
    let output = common::output_within(
        common::tollgate()
            .arg("bench")
            .args(args)
            .args(["--redis-url", "redis://127.0.0.1:1"]),
        common::COMMAND_TIMEOUT,
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(flag), "{stderr}");
}

#[test]
fn versus_accounts_needs_the_bench_own_stacks() {
    refused_with_a_redis_url(&["check", "--versus-accounts", "10"], "--versus-accounts");
}

#[test]
fn durability_needs_the_bench_own_redis() {
    refused_with_a_redis_url(&["debit", "--durability", "aof-always"], "--durability");
}
