//! `idemd bench` smoke test: a few seconds against a local server.

use std::time::Duration;

use idemd::bench::{BenchConfig, Mode};

use crate::helpers::*;

/// Two seconds of pairs against `app`, four workers; a test changes what it exercises.
fn bench_config(app: &TestApp) -> BenchConfig {
    BenchConfig {
        addr: format!("http://{}", app.addr),
        concurrency: 4,
        duration: Duration::from_secs(2),
        keys: 1_000_000,
        duplicate_ratio: 0.0,
        payload_bytes: 600,
        namespace: "bench".into(),
        mode: Mode::Pairs,
        channels: None,
        token: None,
        json: true,
        rate: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_reports_throughput_and_no_errors() {
    let app = spawn_app(Backend::Sqlite).await;
    let config = BenchConfig { duplicate_ratio: 0.3, ..bench_config(&app) };
    let report = idemd::bench::run(config).await.expect("bench runs");
    assert!(report["pairs_per_second"].as_f64().is_some_and(|r| r > 0.0), "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    assert!(report["outcomes"]["completed"].as_u64().is_some_and(|n| n > 0), "duplicates replay: {report}");
    for rpc in ["begin", "complete", "pair"] {
        for q in ["p50", "p90", "p99", "p999"] {
            assert!(report["latency_ms"][rpc][q].as_f64().is_some_and(|ms| ms > 0.0), "{rpc} {q}: {report}");
        }
    }
    assert!(idemd::bench::render(&report).contains("pairs/s"));
}

/// `--rate` paces the workers: never faster than asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_rate_paces_the_workers() {
    let app = spawn_app(Backend::Sqlite).await;
    let config = BenchConfig { payload_bytes: 100, rate: Some(20.0), ..bench_config(&app) };
    let report = idemd::bench::run(config).await.expect("bench runs");
    let pairs = report["pairs"].as_u64().expect("pairs");
    // Each of 4 workers starts at most one pair per 200 ms: 11 each in 2 s.
    assert!(pairs > 0 && pairs <= 44, "{pairs} pairs at 20/s for 2 s: {report}");
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["rate_target"], 20.0, "{report}");
}

/// Park mode: the bench holds a key and every worker waits on it until the
/// end, so each Begin answers `in_progress` after its wait, never an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_park_mode_parks_waiters_until_the_end() {
    let app = spawn_app(Backend::Sqlite).await;
    let config = BenchConfig {
        concurrency: 50,
        keys: 1,
        payload_bytes: 0,
        mode: Mode::Park,
        channels: Some(2),
        ..bench_config(&app)
    };
    let parked = tokio::spawn(idemd::bench::run(config));
    eventually("50 waiters parked", Duration::from_secs(10), || async {
        (scrape(app.metrics_addr).await.get("idemd_waiters").copied() == Some(50.0)).then_some(())
    })
    .await;
    let report = parked.await.expect("task").expect("bench runs");
    assert_eq!(report["errors"], 0, "{report}");
    assert!(report["outcomes"]["in_progress"].as_u64().is_some_and(|n| n >= 50), "{report}");
    assert_eq!(report["outcomes"]["acquired"], 0, "nobody takes the held key: {report}");
}

/// Ping mode: health Checks only, the round trip without a store call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_ping_mode_measures_the_round_trip_alone() {
    let app = spawn_app(Backend::Sqlite).await;
    let report = idemd::bench::run(BenchConfig { mode: Mode::Ping, ..bench_config(&app) }).await.expect("bench runs");
    assert!(report["pings_per_second"].as_f64().is_some_and(|r| r > 0.0), "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["begins_per_second"], 0.0, "no Idempotency call: {report}");
    assert!(report["latency_ms"]["ping"]["p50"].as_f64().is_some_and(|ms| ms > 0.0), "{report}");
    assert!(idemd::bench::render(&report).contains("pings/s"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_command_prints_one_json_object() {
    let app = spawn_app(Backend::Sqlite).await;
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_idemd"))
        .args(["bench", "--addr", &format!("http://{}", app.addr), "--duration", "1s", "--concurrency", "2"])
        .args(["--mode", "begin", "--json"])
        .output()
        .await
        .expect("idemd bench");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("one JSON object");
    assert!(report["begins_per_second"].as_f64().is_some_and(|r| r > 0.0), "{report}");
    assert_eq!(report["errors"], 0);
    assert!(report["pairs_per_second"].is_number());
}
