//! Bench results: percentiles, the printed summary, the JSON result and the SVG plot
//! (hand-written: two line charts need no plotting library, and no fonts either — the
//! viewer renders the text).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use super::BenchArgs;
use crate::ledger::Ledger;

/// The share of a measured side's requests that may fail: past it the bench ends with an
/// error naming the side (after writing its result), as its throughput, and any ratio made
/// of it, measure a misconfiguration more than the server.
pub const ERROR_SHARE_MAX: f64 = 0.01;

/// One measured phase (the scenario, or the baseline).
pub struct Phase {
    pub label: String,
    /// From the intended send time (open loop) or the send (closed loop) to the answer.
    pub latency_us: Histogram<u64>,
    /// Open loop only (empty otherwise): from the actual send to the answer (the service
    /// time), and from the intended send time to the actual send (how late the load
    /// generator itself was: its pacer's wake-ups and a free worker).
    pub service_us: Histogram<u64>,
    pub send_delay_us: Histogram<u64>,
    /// Requests answered, successes and errors (all of them in the latencies).
    pub completed: u64,
    /// Successes answered within the measured time: what the throughput counts.
    pub succeeded: u64,
    /// Open loop only (None otherwise): requests due but not sent when the phase ended
    /// (every worker busy). They are in the latencies, from their intended send time to
    /// the end: a lower bound.
    pub unsent: Option<u64>,
    pub errors: BTreeMap<String, u64>,
    /// The measured time: the phase's duration (a request answered after it is not in the
    /// throughput), or with --requests until the last answer.
    pub elapsed: Duration,
    /// (seconds since the start, requests/s over the last tick)
    pub timeline: Vec<(f64, f64)>,
    pub rss_max_bytes: Option<u64>,
    pub rss_hwm_bytes: Option<u64>,
    pub redis: Option<RedisStats>,
    /// CPU seconds the server (when its pid is known) and the load generator itself used
    /// during the phase.
    pub server_cpu_secs: Option<f64>,
    pub bench_cpu_secs: Option<f64>,
    /// Samples (every tick) of the server's outbox lag in ms, when it settles.
    pub outbox_lag_ms: Vec<u64>,
}

impl Phase {
    /// Successful requests per second: an error (refused, timed out, unreachable) is not
    /// throughput.
    pub fn throughput_rps(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.succeeded as f64 / secs
        } else {
            0.0
        }
    }

    /// This phase followed by `next` (alternating rounds): counts and histograms add up,
    /// the timeline continues.
    pub fn merge(mut self, next: Phase) -> Phase {
        let offset = self.elapsed.as_secs_f64();
        let _ = self.latency_us.add(&next.latency_us);
        let _ = self.service_us.add(&next.service_us);
        let _ = self.send_delay_us.add(&next.send_delay_us);
        self.completed += next.completed;
        self.succeeded += next.succeeded;
        self.unsent = match (self.unsent, next.unsent) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        for (kind, n) in next.errors {
            *self.errors.entry(kind).or_insert(0) += n;
        }
        self.elapsed += next.elapsed;
        self.timeline
            .extend(next.timeline.into_iter().map(|(t, rps)| (t + offset, rps)));
        self.rss_max_bytes = self.rss_max_bytes.max(next.rss_max_bytes);
        self.rss_hwm_bytes = self.rss_hwm_bytes.max(next.rss_hwm_bytes);
        self.outbox_lag_ms.extend(next.outbox_lag_ms);
        let add = |a: Option<f64>, b: Option<f64>| Some(a? + b?);
        self.server_cpu_secs = add(self.server_cpu_secs, next.server_cpu_secs);
        self.bench_cpu_secs = add(self.bench_cpu_secs, next.bench_cpu_secs);
        self.redis = match (self.redis, next.redis) {
            (Some(a), Some(b)) => Some(a.merge(&b)),
            (a, b) => a.or(b),
        };
        self
    }

    fn latency_json(&self) -> Value {
        percentiles_json(&self.latency_us)
    }

    /// The open loop's split of the latency (null in a closed loop).
    fn open_loop_json(&self, h: &Histogram<u64>) -> Value {
        if h.is_empty() {
            Value::Null
        } else {
            percentiles_json(h)
        }
    }

    /// Outbox lag percentiles over the samples (None when the server did not settle).
    fn outbox_lag_json(&self) -> Value {
        if self.outbox_lag_ms.is_empty() {
            return Value::Null;
        }
        let mut samples = self.outbox_lag_ms.clone();
        samples.sort_unstable();
        let at = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
        json!({
            "p50": at(0.5),
            "p99": at(0.99),
            "max": at(1.0),
            "samples": samples.len(),
        })
    }

    /// CPU µs per completed request.
    fn cpu_usec_per_request(&self, secs: Option<f64>) -> Option<f64> {
        (self.completed > 0).then_some(())?;
        Some(round1(secs? * 1e6 / self.completed as f64))
    }

    fn errors_total(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Why this phase's figures cannot be trusted: more than [`ERROR_SHARE_MAX`] of its
    /// requests failed, or none succeeded.
    fn failure(&self) -> Option<String> {
        let errors = self.errors_total();
        // Errors of a worker that panicked are not among the answered requests.
        let requests = self.completed.max(errors);
        if requests == 0 {
            return Some(format!("{}: no request was answered", self.label));
        }
        let share = errors as f64 / requests as f64;
        if share > ERROR_SHARE_MAX {
            let mut kinds: Vec<(&String, &u64)> = self.errors.iter().collect();
            kinds.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            let kinds: Vec<String> = kinds
                .iter()
                .take(3)
                .map(|(kind, n)| format!("{kind} {n}"))
                .collect();
            return Some(format!(
                "{}: {errors} of {requests} requests failed ({:.1}%, more than {}%; {}{})",
                self.label,
                share * 100.0,
                ERROR_SHARE_MAX * 100.0,
                kinds.join(", "),
                if self.errors.len() > 3 { ", …" } else { "" }
            ));
        }
        if self.succeeded == 0 {
            return Some(format!(
                "{}: no request succeeded within the measured time",
                self.label
            ));
        }
        None
    }

    fn json(&self) -> Value {
        json!({
            "throughput_rps": round(self.throughput_rps()),
            "requests": self.completed,
            "succeeded": self.succeeded,
            "unsent": self.unsent,
            "elapsed_secs": self.elapsed.as_secs_f64(),
            "latency_ms": self.latency_json(),
            "service_latency_ms": self.open_loop_json(&self.service_us),
            "send_delay_ms": self.open_loop_json(&self.send_delay_us),
            "errors": self.errors,
            "errors_total": self.errors_total(),
            "redis": self.redis.as_ref().map(RedisStats::json),
            "server_cpu_usec_per_request": self.cpu_usec_per_request(self.server_cpu_secs),
            "bench_cpu_usec_per_request": self.cpu_usec_per_request(self.bench_cpu_secs),
        })
    }

    fn render(&self, out: &mut String) {
        let _ = writeln!(out, "{}", self.label);
        let _ = writeln!(
            out,
            "  throughput   {:>10.0} req/s ({} successful of {} requests in {:.1} s)",
            self.throughput_rps(),
            self.succeeded,
            self.completed,
            self.elapsed.as_secs_f64()
        );
        let _ = writeln!(out, "  latency ms   {}", percentiles_line(&self.latency_us));
        if !self.service_us.is_empty() {
            let _ = writeln!(out, "   from send   {}", percentiles_line(&self.service_us));
            let _ = writeln!(
                out,
                "   send delay  {}",
                percentiles_line(&self.send_delay_us)
            );
        }
        if let Some(unsent) = self.unsent {
            let _ = writeln!(
                out,
                "  unsent       {unsent} (due but not sent by the end; in the latencies up to the end, a lower bound)"
            );
        }
        if self.errors.is_empty() {
            let _ = writeln!(out, "  errors       none");
        } else {
            let _ = writeln!(out, "  errors       {}", self.errors_total());
            for (kind, n) in &self.errors {
                let _ = writeln!(out, "    {kind:<40} {n}");
            }
        }
        if let Value::Object(lag) = self.outbox_lag_json() {
            let _ = writeln!(
                out,
                "  outbox lag   p50 {} ms  p99 {} ms  max {} ms ({} samples)",
                lag["p50"], lag["p99"], lag["max"], lag["samples"]
            );
        }
        if let Some(redis) = &self.redis {
            let _ = writeln!(
                out,
                "  redis        {} FCALL, {:.1} µs/call (commandstats), {:.1} µs CPU per call",
                redis.script_calls, redis.script_usec_per_call, redis.cpu_usec_per_call
            );
        }
        let server = self.cpu_usec_per_request(self.server_cpu_secs);
        if let Some(bench) = self.cpu_usec_per_request(self.bench_cpu_secs) {
            let server = server.map_or(String::new(), |s| format!("server {s:.1} µs, "));
            let _ = writeln!(
                out,
                "  cpu          {server}load generator {bench:.1} µs per request"
            );
        }
    }
}

/// Redis's own cost, measured the way shared/PERF-NOTES.md says: CONFIG RESETSTAT before
/// the phase, then `INFO commandstats` and the change of `used_cpu_*` per call.
pub struct RedisStats {
    pub script_calls: u64,
    pub script_usec_per_call: f64,
    /// Redis process CPU (user + sys) during the phase ÷ ledger script calls.
    pub cpu_usec_per_call: f64,
}

impl RedisStats {
    /// Resets the command statistics; returns Redis's CPU seconds so far (None when the
    /// server refuses CONFIG, e.g. a managed Redis).
    pub async fn reset(ledger: &Ledger) -> Option<f64> {
        let _: () = ledger
            .redis()
            .query(redis::cmd("CONFIG").arg("RESETSTAT"))
            .await
            .ok()?;
        redis_cpu_secs(ledger).await
    }

    pub async fn read(ledger: &Ledger, cpu_before_secs: f64) -> Option<Self> {
        let cpu = redis_cpu_secs(ledger).await? - cpu_before_secs;
        let info: String = ledger
            .redis()
            .query(redis::cmd("INFO").arg("commandstats"))
            .await
            .ok()?;
        // Ledger calls are FCALLs; EVALSHA too, for a target running an older tollgate.
        let (mut calls, mut usec) = (0.0, 0.0);
        for line in info
            .lines()
            .filter(|l| l.starts_with("cmdstat_fcall:") || l.starts_with("cmdstat_evalsha:"))
        {
            let field = |name: &str| -> f64 {
                line.split([':', ','])
                    .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0.0)
            };
            calls += field("calls");
            usec += field("usec");
        }
        let per_call = |total: f64| if calls > 0.0 { total / calls } else { 0.0 };
        Some(Self {
            script_calls: calls as u64,
            script_usec_per_call: per_call(usec),
            cpu_usec_per_call: per_call(cpu * 1e6),
        })
    }

    fn merge(self, other: &Self) -> Self {
        let calls = self.script_calls + other.script_calls;
        let weighted = |a: f64, b: f64| {
            if calls == 0 {
                0.0
            } else {
                (a * self.script_calls as f64 + b * other.script_calls as f64) / calls as f64
            }
        };
        Self {
            script_calls: calls,
            script_usec_per_call: weighted(self.script_usec_per_call, other.script_usec_per_call),
            cpu_usec_per_call: weighted(self.cpu_usec_per_call, other.cpu_usec_per_call),
        }
    }

    fn json(&self) -> Value {
        json!({
            "script_calls": self.script_calls,
            "script_usec_per_call": round1(self.script_usec_per_call),
            "cpu_usec_per_call": round1(self.cpu_usec_per_call),
        })
    }
}

async fn redis_cpu_secs(ledger: &Ledger) -> Option<f64> {
    let info: String = ledger
        .redis()
        .query(redis::cmd("INFO").arg("cpu"))
        .await
        .ok()?;
    let get = |name: &str| -> Option<f64> {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
    };
    Some(get("used_cpu_user")? + get("used_cpu_sys")?)
}

fn round(x: f64) -> f64 {
    x.round()
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn ms(h: &Histogram<u64>, quantile: f64) -> f64 {
    h.value_at_quantile(quantile) as f64 / 1000.0
}

fn percentiles_json(h: &Histogram<u64>) -> Value {
    json!({
        "p50": ms(h, 0.50),
        "p90": ms(h, 0.90),
        "p99": ms(h, 0.99),
        "p999": ms(h, 0.999),
        "max": h.max() as f64 / 1000.0,
        "mean": h.mean() / 1000.0,
    })
}

fn percentiles_line(h: &Histogram<u64>) -> String {
    format!(
        "p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
        ms(h, 0.5),
        ms(h, 0.9),
        ms(h, 0.99),
        ms(h, 0.999),
        h.max() as f64 / 1000.0
    )
}

/// The same scenario against a second stack seeded with another number of accounts
/// (`--versus-accounts`), measured in slices alternating with the main stack's.
pub struct Versus {
    pub accounts: u32,
    pub server_pid: Option<u32>,
    pub main: Phase,
    pub baseline: Option<Phase>,
}

/// `a ÷ b` by throughput (0 when `b` did nothing).
fn throughput_ratio(a: &Phase, b: &Phase) -> f64 {
    if b.throughput_rps() > 0.0 {
        a.throughput_rps() / b.throughput_rps()
    } else {
        0.0
    }
}

/// `a ÷ b` of a latency quantile (0 when `b`'s is 0).
fn latency_ratio(a: &Phase, b: &Phase, quantile: f64) -> f64 {
    let (a, b) = (ms(&a.latency_us, quantile), ms(&b.latency_us, quantile));
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// Open loop: `a`'s p50 and p99 next to `b`'s (`other` names b's), and their ratio.
fn latency_comparison_json(a: &Phase, b: &Phase, other: &str) -> Value {
    let mut json = json!({});
    for (name, quantile) in [("p50", 0.5), ("p99", 0.99)] {
        json[name] = json!({
            "ms": ms(&a.latency_us, quantile),
            format!("{other}_ms"): ms(&b.latency_us, quantile),
            "ratio": round3(latency_ratio(a, b, quantile)),
        });
    }
    json
}

/// Open loop: "p50 A vs B ms (×r), p99 C vs D ms (×r)".
fn latency_comparison_line(a: &Phase, b: &Phase) -> String {
    let quantile = |name: &str, q: f64| {
        format!(
            "{name} {:.3} vs {:.3} ms (×{:.2})",
            ms(&a.latency_us, q),
            ms(&b.latency_us, q),
            latency_ratio(a, b, q)
        )
    };
    format!("{}, {}", quantile("p50", 0.5), quantile("p99", 0.99))
}

/// `baseline_rps`, `ratio` (scenario ÷ raw function, by throughput) and the baseline's own
/// figures. In an open loop both sides are sent at the same rate, so their throughputs
/// match by construction: `ratio` is then null, and `latency_vs_baseline` compares their
/// latencies instead.
fn add_baseline(json: &mut Value, main: &Phase, baseline: Option<&Phase>, open_loop: bool) {
    if let Some(base) = baseline {
        json["baseline_rps"] = json!(round(base.throughput_rps()));
        if open_loop {
            json["ratio"] = Value::Null;
            json["latency_vs_baseline"] = latency_comparison_json(main, base, "baseline");
        } else {
            json["ratio"] = json!(round3(throughput_ratio(main, base)));
        }
        json["baseline"] = base.json();
    }
}

/// The whole result of a bench run.
pub struct Report {
    pub json: Value,
    /// `--rate`: both sides ran at one rate, so only latencies compare.
    open_loop: bool,
    main: Phase,
    baseline: Option<Phase>,
    versus: Option<Versus>,
}

impl Report {
    pub fn new(
        args: &BenchArgs,
        main: Phase,
        baseline: Option<Phase>,
        versus: Option<Versus>,
        server_pid: Option<u32>,
    ) -> Self {
        let mut json = json!({
            "scenario": args.scenario.name(),
            "concurrency": args.concurrency,
            "connections": args.connections,
            "redis_connections": args.redis_connections(),
            "durability": args.durability,
            "wait_timeout_ms": (args.durability == super::Durability::ReplicaWait).then_some(args.wait_timeout_ms),
            "accounts": args.accounts,
            "distribution": args.distribution,
            "rate_rps": args.rate,
            "duration_secs": args.duration_secs,
            "warmup_secs": args.warmup_secs,
            "rounds": if args.baseline || versus.is_some() { args.rounds } else { 1 },
            "throughput_rps": round(main.throughput_rps()),
            "requests": main.completed,
            "succeeded": main.succeeded,
            "unsent": main.unsent,
            "elapsed_secs": main.elapsed.as_secs_f64(),
            "latency_ms": main.latency_json(),
            "service_latency_ms": main.open_loop_json(&main.service_us),
            "send_delay_ms": main.open_loop_json(&main.send_delay_us),
            "errors": main.errors,
            "errors_total": main.errors_total(),
            "server_pid": server_pid,
            "server_rss_bytes": main.rss_max_bytes,
            "server_rss_hwm_bytes": main.rss_hwm_bytes,
            "redis": main.redis.as_ref().map(RedisStats::json),
            "server_cpu_usec_per_request": main.cpu_usec_per_request(main.server_cpu_secs),
            "bench_cpu_usec_per_request": main.cpu_usec_per_request(main.bench_cpu_secs),
            "settle_into": args.settle_into.as_deref().map(|url| url.split('@').next_back().unwrap_or("")),
            "outbox_lag_ms": main.outbox_lag_json(),
            "machine": machine(),
            "version": env!("CARGO_PKG_VERSION"),
        });
        let open_loop = args.rate.is_some();
        add_baseline(&mut json, &main, baseline.as_ref(), open_loop);
        if let Some(versus) = &versus {
            let mut other = versus.main.json();
            other["accounts"] = json!(versus.accounts);
            other["server_pid"] = json!(versus.server_pid);
            other["server_rss_bytes"] = json!(versus.main.rss_max_bytes);
            add_baseline(
                &mut other,
                &versus.main,
                versus.baseline.as_ref(),
                open_loop,
            );
            json["versus"] = other;
            // Open loop: both stacks ran at one rate; their latencies compare instead.
            let ratio = |a: &Phase, b: &Phase| {
                if open_loop {
                    Value::Null
                } else {
                    json!(round3(throughput_ratio(a, b)))
                }
            };
            json["accounts_ratio"] = ratio(&main, &versus.main);
            if open_loop {
                json["latency_vs_versus"] = latency_comparison_json(&main, &versus.main, "versus");
            }
            if let (Some(a), Some(b)) = (&baseline, &versus.baseline) {
                json["baseline_accounts_ratio"] = ratio(a, b);
            }
        }
        Self {
            json,
            open_loop,
            main,
            baseline,
            versus,
        }
        .marked_untrusted()
    }

    /// `untrusted` in the JSON: why the figures are not to be trusted ([`Report::check`]),
    /// or null.
    fn marked_untrusted(mut self) -> Self {
        self.json["untrusted"] = match self.check() {
            Ok(()) => Value::Null,
            Err(why) => json!(why),
        };
        self
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Some(level) = self.json["durability"].as_str() {
            let _ = writeln!(out, "redis durability: {level}");
        }
        if let Some(base) = &self.baseline {
            base.render(&mut out);
        }
        self.main.render(&mut out);
        match (self.main.rss_max_bytes, self.main.rss_hwm_bytes) {
            (Some(rss), hwm) => {
                let _ = writeln!(
                    out,
                    "  server RSS   {:.1} MB under load (peak {:.1} MB)",
                    rss as f64 / 1e6,
                    hwm.unwrap_or(rss) as f64 / 1e6
                );
            }
            _ => {
                let _ = writeln!(out, "  server RSS   unknown (give --server-pid)");
            }
        }
        if let Some(versus) = &self.versus {
            if let Some(base) = &versus.baseline {
                base.render(&mut out);
            }
            versus.main.render(&mut out);
        }
        if let Some(why) = self.json["untrusted"].as_str() {
            let _ = writeln!(out, "NOT TO BE TRUSTED, the comparisons below: {why}");
        }
        if self.open_loop {
            self.render_open_loop_comparisons(&mut out);
            return out;
        }
        if let Some(base) = &self.baseline {
            let _ = writeln!(
                out,
                "ratio tollgate ÷ raw Redis script: {:.3} ({:.0} ÷ {:.0} req/s)",
                throughput_ratio(&self.main, base),
                self.main.throughput_rps(),
                base.throughput_rps()
            );
        }
        if let Some(versus) = &self.versus {
            if let Some(base) = &versus.baseline {
                let _ = writeln!(
                    out,
                    "ratio tollgate ÷ raw Redis script with {} accounts: {:.3} ({:.0} ÷ {:.0} req/s)",
                    versus.accounts,
                    throughput_ratio(&versus.main, base),
                    versus.main.throughput_rps(),
                    base.throughput_rps()
                );
            }
            let _ = writeln!(
                out,
                "throughput with {} accounts ÷ with {}: {:.3} ({:.0} ÷ {:.0} req/s)",
                self.json["accounts"],
                versus.accounts,
                throughput_ratio(&self.main, &versus.main),
                self.main.throughput_rps(),
                versus.main.throughput_rps()
            );
            if let (Some(a), Some(b)) = (&self.baseline, &versus.baseline) {
                let _ = writeln!(
                    out,
                    "  the raw function's own: {:.3} ({:.0} ÷ {:.0} req/s)",
                    throughput_ratio(a, b),
                    a.throughput_rps(),
                    b.throughput_rps()
                );
            }
        }
        out
    }

    /// Open loop: every side was sent at the same rate, so a throughput ratio would be 1 by
    /// construction; the latencies are compared instead.
    fn render_open_loop_comparisons(&self, out: &mut String) {
        if self.baseline.is_none() && self.versus.is_none() {
            return;
        }
        let _ = writeln!(
            out,
            "open loop at {} req/s: every side was sent at that rate, so no throughput ratio; latencies compared:",
            self.json["rate_rps"]
        );
        if let Some(base) = &self.baseline {
            let _ = writeln!(
                out,
                "latency tollgate vs raw Redis script: {}",
                latency_comparison_line(&self.main, base)
            );
        }
        if let Some(versus) = &self.versus {
            if let Some(base) = &versus.baseline {
                let _ = writeln!(
                    out,
                    "latency tollgate vs raw Redis script with {} accounts: {}",
                    versus.accounts,
                    latency_comparison_line(&versus.main, base)
                );
            }
            let _ = writeln!(
                out,
                "latency with {} accounts vs with {}: {}",
                self.json["accounts"],
                versus.accounts,
                latency_comparison_line(&self.main, &versus.main)
            );
            if let (Some(a), Some(b)) = (&self.baseline, &versus.baseline) {
                let _ = writeln!(
                    out,
                    "  the raw function's own: {}",
                    latency_comparison_line(a, b)
                );
            }
        }
    }

    /// Err naming every measured side whose figures cannot be trusted (too many errors):
    /// the bench then exits non-zero, so a misconfigured run does not end with a confident
    /// ratio.
    pub fn check(&self) -> Result<(), String> {
        let mut phases = Vec::new();
        phases.extend(&self.baseline);
        phases.push(&self.main);
        if let Some(versus) = &self.versus {
            phases.extend(&versus.baseline);
            phases.push(&versus.main);
        }
        let failures: Vec<String> = phases.iter().filter_map(|p| p.failure()).collect();
        if failures.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "the figures of this run are not to be trusted (result written all the same): {}",
                failures.join("; ")
            ))
        }
    }

    pub fn write_json(&self, path: &Path) -> Result<(), String> {
        let text = serde_json::to_string_pretty(&self.json).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn write_svg(&self, path: &Path) -> Result<(), String> {
        let mut phases = vec![&self.main];
        phases.extend(&self.baseline);
        if let Some(versus) = &self.versus {
            phases.push(&versus.main);
            phases.extend(&versus.baseline);
        }
        let title = format!(
            "tollgate bench {} — concurrency {}{}",
            self.json["scenario"].as_str().unwrap_or(""),
            self.json["concurrency"],
            self.json["rate_rps"]
                .as_f64()
                .map(|r| format!(", open loop at {r:.0} req/s"))
                .unwrap_or_default()
        );
        std::fs::write(path, svg(&title, &phases)).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// nproc, CPU model and memory of this machine (the figures only mean something with it).
fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: Option<u64> = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
    json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": model,
        "memory_bytes": mem_kib.map(|k| k * 1024),
    })
}

const COLORS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e"];
const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 400.0;

/// Left: latency by percentile (the HdrHistogram view: x is log-scaled "nines"). Right:
/// throughput over time.
fn svg(title: &str, phases: &[&Phase]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    );
    // Percentile panel.
    let nines_max = 4.0; // up to p99.99
    let curves: Vec<Vec<(f64, f64)>> = phases
        .iter()
        .map(|p| {
            (0..=80)
                .map(|i| {
                    let x = nines_max * f64::from(i) / 80.0;
                    let q = 1.0 - 10f64.powf(-x);
                    (x, ms(&p.latency_us, q))
                })
                .collect()
        })
        .collect();
    let y_max = nice_max(curves.iter().flatten().map(|p| p.1).fold(0.0, f64::max));
    let ticks = [
        (0.0, "p0"),
        (1.0, "p90"),
        (2.0, "p99"),
        (3.0, "p99.9"),
        (4.0, "p99.99"),
    ];
    let area = Area::new(60.0, 50.0, 400.0, 300.0, nines_max, y_max);
    area.frame(&mut s, "percentile", "latency (ms)", &ticks);
    for (i, curve) in curves.iter().enumerate() {
        area.line(&mut s, curve, COLORS[i % COLORS.len()]);
    }
    // Throughput panel.
    let t_max = phases
        .iter()
        .flat_map(|p| p.timeline.iter().map(|t| t.0))
        .fold(1.0, f64::max);
    let rps_max = nice_max(
        phases
            .iter()
            .flat_map(|p| p.timeline.iter().map(|t| t.1))
            .fold(0.0, f64::max),
    );
    let area2 = Area::new(540.0, 50.0, 400.0, 300.0, t_max, rps_max);
    let time_ticks: Vec<(f64, String)> = (0..=4)
        .map(|i| {
            let t = t_max * f64::from(i) / 4.0;
            (t, format!("{t:.0}s"))
        })
        .collect();
    let time_ticks: Vec<(f64, &str)> = time_ticks.iter().map(|(t, l)| (*t, l.as_str())).collect();
    area2.frame(&mut s, "time", "requests/s", &time_ticks);
    for (i, phase) in phases.iter().enumerate() {
        area2.line(&mut s, &phase.timeline, COLORS[i % COLORS.len()]);
    }
    // Legend.
    for (i, phase) in phases.iter().enumerate() {
        let y = HEIGHT - 22.0 + 0.0 * i as f64;
        let x = 60.0 + 440.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="{}" width="14" height="4" fill="{}"/><text x="{}" y="{y}">{}: {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms</text>"#,
            y - 4.0,
            COLORS[i % COLORS.len()],
            x + 20.0,
            escape(&phase.label),
            phase.throughput_rps(),
            ms(&phase.latency_us, 0.5),
            ms(&phase.latency_us, 0.99)
        );
    }
    s.push_str("</svg>\n");
    s
}

struct Area {
    x: f64,
    y: f64,
    w: f64,
    h: f64,
    x_max: f64,
    y_max: f64,
}

impl Area {
    fn new(x: f64, y: f64, w: f64, h: f64, x_max: f64, y_max: f64) -> Self {
        Self {
            x,
            y,
            w,
            h,
            x_max: if x_max > 0.0 { x_max } else { 1.0 },
            y_max: if y_max > 0.0 { y_max } else { 1.0 },
        }
    }

    fn px(&self, x: f64, y: f64) -> (f64, f64) {
        (
            self.x + self.w * (x / self.x_max).clamp(0.0, 1.0),
            self.y + self.h * (1.0 - (y / self.y_max).clamp(0.0, 1.0)),
        )
    }

    fn frame(&self, s: &mut String, x_label: &str, y_label: &str, x_ticks: &[(f64, &str)]) {
        let _ = writeln!(
            s,
            r##"<rect x="{}" y="{}" width="{}" height="{}" fill="none" stroke="#444"/>"##,
            self.x, self.y, self.w, self.h
        );
        for i in 0..=5 {
            let v = self.y_max * f64::from(i) / 5.0;
            let (_, py) = self.px(0.0, v);
            let _ = writeln!(
                s,
                r##"<line x1="{}" y1="{py}" x2="{}" y2="{py}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
                self.x,
                self.x + self.w,
                self.x - 4.0,
                py + 4.0,
                short(v)
            );
        }
        for (v, label) in x_ticks {
            let (px, _) = self.px(*v, 0.0);
            let _ = writeln!(
                s,
                r##"<line x1="{px}" y1="{}" x2="{px}" y2="{}" stroke="#ddd"/><text x="{px}" y="{}" text-anchor="middle">{}</text>"##,
                self.y,
                self.y + self.h,
                self.y + self.h + 16.0,
                escape(label)
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text><text x="{}" y="{}" text-anchor="middle" transform="rotate(-90 {} {})">{}</text>"#,
            self.x + self.w / 2.0,
            self.y + self.h + 32.0,
            escape(x_label),
            self.x - 45.0,
            self.y + self.h / 2.0,
            self.x - 45.0,
            self.y + self.h / 2.0,
            escape(y_label)
        );
    }

    fn line(&self, s: &mut String, points: &[(f64, f64)], color: &str) {
        if points.is_empty() {
            return;
        }
        let mut d = String::new();
        for (i, (x, y)) in points.iter().enumerate() {
            let (px, py) = self.px(*x, *y);
            let _ = write!(d, "{}{px:.1},{py:.1}", if i == 0 { "M" } else { " L" });
        }
        let _ = writeln!(
            s,
            r#"<path d="{d}" fill="none" stroke="{color}" stroke-width="2"/>"#
        );
    }
}

/// A round axis maximum at or above `v`.
fn nice_max(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(v.log10().floor());
    for step in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if v <= step * magnitude {
            return step * magnitude;
        }
    }
    10.0 * magnitude
}

fn short(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn args(args: &[&str]) -> BenchArgs {
        Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied()))
            .expect("bench arguments")
            .bench
    }

    /// A phase of 1 s: `ok` successes at `latency_us`, and `errors` of kind "timeout".
    fn phase(label: &str, ok: u64, errors: u64, latency_us: u64) -> Phase {
        let mut h = Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram");
        h.record_n(latency_us, ok + errors).expect("record");
        let empty = Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram");
        Phase {
            label: label.into(),
            latency_us: h,
            service_us: empty.clone(),
            send_delay_us: empty,
            completed: ok + errors,
            succeeded: ok,
            unsent: None,
            errors: if errors > 0 {
                BTreeMap::from([("timeout".to_owned(), errors)])
            } else {
                BTreeMap::new()
            },
            elapsed: Duration::from_secs(1),
            timeline: Vec::new(),
            rss_max_bytes: None,
            rss_hwm_bytes: None,
            redis: None,
            server_cpu_secs: None,
            bench_cpu_secs: None,
            outbox_lag_ms: Vec::new(),
        }
    }

    #[test]
    fn errors_are_not_throughput() {
        let p = phase("debit", 900, 100, 500);
        assert_eq!(p.throughput_rps(), 900.0);
        let json = p.json();
        assert_eq!(json["throughput_rps"], 900.0);
        assert_eq!(json["requests"], 1000);
        assert_eq!(json["succeeded"], 900);
        assert_eq!(json["errors_total"], 100);
    }

    #[test]
    fn a_side_with_more_than_one_percent_errors_fails_the_run() {
        let a = args(&["debit", "--baseline"]);
        // 1% exactly is tolerated.
        let report = Report::new(
            &a,
            phase("debit", 990, 10, 500),
            Some(phase("baseline (raw FCALL debit)", 1000, 0, 100)),
            None,
            None,
        );
        report.check().expect("1% of errors");
        assert_eq!(report.json["ratio"], 0.99);
        assert!(report.json["untrusted"].is_null());
        assert!(!report.render().contains("NOT TO BE TRUSTED"));
        let report = Report::new(
            &a,
            phase("debit", 1000, 0, 500),
            Some(phase("baseline (raw FCALL debit)", 980, 20, 100)),
            None,
            None,
        );
        let err = report.check().expect_err("2% of errors");
        assert_eq!(report.json["untrusted"], err.as_str());
        assert!(
            report
                .render()
                .contains("NOT TO BE TRUSTED, the comparisons below"),
            "{}",
            report.render()
        );
        assert!(
            err.contains("baseline (raw FCALL debit): 20 of 1000 requests failed (2.0%")
                && err.contains("timeout 20")
                && !err.contains("debit: "),
            "{err}"
        );
        // A side that answered nothing fails too.
        let report = Report::new(&a, phase("debit", 0, 0, 1), None, None, None);
        let err = report.check().expect_err("nothing answered");
        assert!(err.contains("debit: no request was answered"), "{err}");
    }

    #[test]
    fn open_loop_compares_latencies_not_throughputs() {
        let report = Report::new(
            &args(&["check", "--rate", "1000", "--baseline"]),
            phase("check", 1000, 0, 2_000),
            Some(phase("baseline (raw FCALL debit)", 1000, 0, 500)),
            None,
            None,
        );
        assert!(report.json["ratio"].is_null(), "{}", report.json);
        assert_eq!(report.json["baseline_rps"], 1000.0);
        let p99 = &report.json["latency_vs_baseline"]["p99"];
        assert_eq!(p99["ms"], 2.0, "{p99}");
        assert_eq!(p99["baseline_ms"], 0.5, "{p99}");
        assert!((p99["ratio"].as_f64().expect("ratio") - 4.0).abs() < 0.01);
        let text = report.render();
        assert!(!text.contains("ratio tollgate ÷ raw"), "{text}");
        assert!(
            text.contains("latency tollgate vs raw Redis script: p50 2.000 vs 0.500 ms (×4.00)"),
            "{text}"
        );
        // Closed loop: the throughput ratio.
        let report = Report::new(
            &args(&["check", "--baseline"]),
            phase("check", 800, 0, 2_000),
            Some(phase("baseline (raw FCALL debit)", 1000, 0, 500)),
            None,
            None,
        );
        assert_eq!(report.json["ratio"], 0.8);
        assert!(report.json.get("latency_vs_baseline").is_none());
        assert!(report
            .render()
            .contains("ratio tollgate ÷ raw Redis script: 0.800"));
    }

    #[test]
    fn unsent_requests_add_up_and_are_reported() {
        let mut a = phase("check (1/2)", 10, 0, 100);
        a.unsent = Some(3);
        let mut b = phase("check (2/2)", 10, 0, 100);
        b.unsent = Some(4);
        let merged = a.merge(b);
        assert_eq!(merged.unsent, Some(7));
        assert_eq!(merged.json()["unsent"], 7);
        let mut text = String::new();
        merged.render(&mut text);
        assert!(text.contains("unsent       7 "), "{text}");
        assert!(phase("check", 1, 0, 1).json()["unsent"].is_null());
    }

    #[test]
    fn axis_maxima_are_round() {
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(0.73), 1.0);
        assert_eq!(nice_max(1.2), 2.0);
        assert_eq!(nice_max(23_000.0), 25_000.0);
    }

    #[test]
    fn svg_is_a_document() {
        let mut latency_us = Histogram::new_with_bounds(1, 60_000_000, 3).unwrap();
        for v in [200, 300, 400, 5_000] {
            latency_us.record(v).unwrap();
        }
        let phase = Phase {
            label: "check <64>".into(),
            service_us: latency_us.clone(),
            send_delay_us: Histogram::new_with_bounds(1, 60_000_000, 3).unwrap(),
            latency_us,
            completed: 4,
            succeeded: 4,
            unsent: Some(0),
            errors: BTreeMap::new(),
            elapsed: Duration::from_secs(1),
            timeline: vec![(0.25, 4.0), (0.5, 8.0)],
            rss_max_bytes: None,
            rss_hwm_bytes: None,
            redis: None,
            server_cpu_secs: Some(0.002),
            bench_cpu_secs: None,
            outbox_lag_ms: Vec::new(),
        };
        assert_eq!(
            phase.cpu_usec_per_request(phase.server_cpu_secs),
            Some(500.0)
        );
        assert_eq!(phase.cpu_usec_per_request(phase.bench_cpu_secs), None);
        let doc = svg("t", &[&phase]);
        assert!(doc.starts_with("<svg") && doc.trim_end().ends_with("</svg>"));
        assert!(doc.contains("check &lt;64&gt;"));
    }
}
