//! `tollgate bench` runs for a couple of seconds against a test redis-server (starting its
//! own `tollgate serve` child) and writes a well-formed result. No timing is asserted:
//! figures belong in docs/BENCHMARKS.md, not in tests.

mod common;

use serde_json::Value;

/// Runs `tollgate bench`; answers its JSON result, its standard output and its process id.
fn bench(redis: &common::RedisServer, scenario: &str, extra: &[&str]) -> (Value, String, u32) {
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "tollgate-bench-smoke-{}-{scenario}-{run}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let json_path = dir.join("result.json");
    let plot_path = dir.join("latency.svg");
    let child = common::tollgate()
        .args(["bench", scenario, "--redis-url", &redis.url()])
        .args(["--duration-secs", "2", "--warmup-secs", "0"])
        .args(["--concurrency", "4", "--accounts", "50"])
        .arg("--json")
        .arg(&json_path)
        .arg("--plot")
        .arg(&plot_path)
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run tollgate bench");
    let pid = child.id();
    let output = child.wait_with_output().expect("tollgate bench output");
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
    (json, stdout, pid)
}

fn assert_result(json: &Value, scenario: &str) {
    assert_eq!(json["scenario"], scenario);
    assert_eq!(json["concurrency"], 4);
    assert!(
        json["throughput_rps"].as_f64().is_some_and(|r| r > 0.0),
        "{json}"
    );
    for p in ["p50", "p90", "p99", "p999", "max"] {
        assert!(
            json["latency_ms"][p].as_f64().is_some_and(|v| v >= 0.0),
            "latency_ms.{p} in {json}"
        );
    }
    assert!(json["errors"].is_object(), "{json}");
    assert_eq!(json["errors_total"], 0, "{json}");
    assert!(
        json["server_rss_bytes"].as_u64().is_some_and(|b| b > 0),
        "{json}"
    );
}

#[test]
fn debit_bench_with_baseline_writes_a_result() {
    let redis = common::RedisServer::start();
    let (json, stdout, _) = bench(&redis, "debit", &["--baseline"]);
    assert_result(&json, "debit");
    assert!(json["send_delay_ms"].is_null(), "closed loop: {json}");
    assert!(
        json["baseline_rps"].as_f64().is_some_and(|r| r > 0.0),
        "{json}"
    );
    assert!(json["ratio"].as_f64().is_some_and(|r| r > 0.0), "{json}");
    assert!(stdout.contains("ratio tollgate ÷ raw"), "{stdout}");
}

#[test]
fn check_bench_writes_a_result() {
    let redis = common::RedisServer::start();
    let (json, stdout, _) = bench(&redis, "check", &["--rate", "200"]);
    assert_result(&json, "check");
    assert!(json.get("ratio").is_none());
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
    let output = common::tollgate()
        .arg("bench")
        .args(args)
        .args(["--duration-secs", "2", "--warmup-secs", "0"])
        .args(["--rounds", "2", "--concurrency", "4", "--accounts", "50"])
        .arg("--json")
        .arg(&json_path)
        .output()
        .expect("run tollgate bench");
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
    assert!(json["ratio"].as_f64().is_some_and(|r| r > 0.0), "{json}");
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
    assert_eq!(versus["errors_total"], 0, "{json}");
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
    // Both sides of each stack were measured in 2 slices of about a second each.
    for phase in [&json["baseline"], versus, &versus["baseline"]] {
        assert!(
            phase["elapsed_secs"].as_f64().is_some_and(|s| s >= 1.5),
            "{phase}"
        );
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
    let output = common::tollgate()
        .arg("bench")
        .args(args)
        .args(["--redis-url", "redis://127.0.0.1:1"])
        .output()
        .expect("run tollgate bench");
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
