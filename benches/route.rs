//! What routing a request costs the sidecar, the path's normal form included (not a test:
//! the figure goes in docs/BENCHMARKS.md).
//!
//! `cargo bench --bench route` routes request paths through the shipped price book
//! (examples/pricebook-esign.toml) as `Gateway::check` does: `normal_path`, then
//! `PriceBook::route`. Its baseline, in the same run, is `PriceBook::route` alone on the
//! same paths (what a check did before the normal form). It prints ns per request for
//! each and the ratio. Under `cargo test` (no `--bench` argument) it runs a few iterations
//! and checks the answers, so CI keeps it working.

use std::hint::black_box;
use std::time::Instant;

use tollgate::gateway::pricing::{normal_path, PriceBook};

/// Paths as clients send them: plain ones (no `%`: nothing copied), an escaped one, and
/// one refused.
const PATHS: [(&str, &str); 5] = [
    ("POST", "/v1/envelopes"),
    ("POST", "/v1/documents/d-42/ocr?lang=de"),
    ("GET", "/v1/envelopes/7/"),
    ("POST", "/v1/documents/caf%c3%a9/ocr"),
    ("POST", "/v1/documents/../envelopes/ocr"),
];

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let rounds: u32 = if full { 2_000_000 } else { 1_000 };
    let book = PriceBook::from_config_text(include_str!("../examples/pricebook-esign.toml"))
        .unwrap_or_else(|e| panic!("the example price book: {e}"));

    // What each path routes to, checked once (also under `cargo test`).
    let routed: Vec<String> = PATHS
        .iter()
        .map(|(method, path)| match normal_path(path, false) {
            Ok(normal) => book
                .route("api.example.com", method, &normal)
                .name()
                .to_owned(),
            Err(bad) => format!("bad_path: {}", bad.0),
        })
        .collect();
    assert_eq!(
        routed,
        [
            "envelope.send",
            "ocr.pages",
            "free",
            "ocr.pages",
            "bad_path: has a dot segment (. or ..)"
        ],
        "{routed:?}"
    );

    // Alternated, best of five rounds each: the machine is shared and noisy.
    let mut route_only = f64::MAX;
    let mut with_normal = f64::MAX;
    for _ in 0..5 {
        route_only = route_only.min(ns_per_request(rounds, |method, path| {
            black_box(book.route("api.example.com", method, path));
        }));
        with_normal = with_normal.min(ns_per_request(rounds, |method, path| {
            if let Ok(normal) = normal_path(path, false) {
                black_box(book.route("api.example.com", method, &normal));
            }
        }));
    }
    println!(
        "routing, {} paths x {rounds} rounds, best of 5:",
        PATHS.len()
    );
    println!("  PriceBook::route alone (baseline):  {route_only:8.1} ns per request");
    println!("  normal_path + PriceBook::route:     {with_normal:8.1} ns per request");
    println!(
        "  ratio (baseline / with the normal form): {:.3}",
        route_only / with_normal
    );
}

fn ns_per_request(rounds: u32, mut route: impl FnMut(&str, &str)) -> f64 {
    let started = Instant::now();
    for _ in 0..rounds {
        for (method, path) in PATHS {
            route(black_box(method), black_box(path));
        }
    }
    started.elapsed().as_nanos() as f64 / (f64::from(rounds) * PATHS.len() as f64)
}
