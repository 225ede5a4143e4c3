//! What operators see: `/metrics` after a scripted mix of calls (and the
//! series alerts and dashboards rely on, through faults), spans over OTLP
//! joined to the caller's trace, and the reaper's warning.

use std::time::Duration;

use idemd::pb::begin_response::Outcome;
use idemd::pb::idempotency_client::IdempotencyClient;

use crate::helpers::*;

/// The collector shows attribute values as `StringValue("x")` / `IntValue(1)`.
fn plain(value: &str) -> String {
    let inner = value.rsplit_once("Value(").map(|(_, rest)| rest).unwrap_or(value);
    inner.trim_end_matches([')', ' ', '}']).trim_matches('"').to_string()
}

fn sample(samples: &std::collections::BTreeMap<String, f64>, series: &str) -> f64 {
    *samples.get(series).unwrap_or_else(|| panic!("no sample {series} in {samples:#?}"))
}

async fn metrics_count_a_scripted_mix(backend: Backend) {
    let app = spawn_app(backend).await;
    let a = app.acquire(begin_req("a")).await;
    let b = app.acquire(begin_req("b")).await;
    app.acquire(begin_req("c")).await;
    app.complete("a", &a.lease_token, b"ok").await.expect("complete");
    app.complete("b", &b.lease_token, b"ok").await.expect("complete");
    for key in ["a", "b"] {
        assert!(matches!(app.begin(begin_req(key)).await.expect("replay"), Outcome::Completed(_)));
    }
    let mut mismatch = begin_req("c");
    mismatch.fingerprint = b"other".to_vec();
    app.begin(mismatch).await.expect_err("mismatch");
    assert!(matches!(app.begin(begin_req("c")).await.expect("busy"), Outcome::InProgress(_)));
    app.lookup("absent").await.expect_err("not found");

    let samples = scrape(app.metrics_addr).await;
    assert_eq!(sample(&samples, r#"idemd_begin_outcomes_total{outcome="acquired"}"#), 3.0);
    assert_eq!(sample(&samples, r#"idemd_begin_outcomes_total{outcome="completed"}"#), 2.0);
    assert_eq!(sample(&samples, r#"idemd_begin_outcomes_total{outcome="fingerprint_mismatch"}"#), 1.0);
    assert_eq!(sample(&samples, r#"idemd_begin_outcomes_total{outcome="in_progress"}"#), 1.0);
    assert_eq!(sample(&samples, r#"idemd_requests_total{code="OK",rpc="Begin"}"#), 6.0);
    assert_eq!(sample(&samples, r#"idemd_requests_total{code="FAILED_PRECONDITION",rpc="Begin"}"#), 1.0);
    assert_eq!(sample(&samples, r#"idemd_requests_total{code="OK",rpc="Complete"}"#), 2.0);
    assert_eq!(sample(&samples, r#"idemd_requests_total{code="NOT_FOUND",rpc="Lookup"}"#), 1.0);
    assert_eq!(sample(&samples, r#"idemd_request_duration_seconds_count{code="OK",rpc="Begin"}"#), 6.0);
    assert!(sample(&samples, r#"idemd_request_duration_seconds_sum{code="OK",rpc="Begin"}"#) > 0.0);
    assert_eq!(sample(&samples, r#"idemd_request_duration_seconds_bucket{code="OK",le="+Inf",rpc="Begin"}"#), 6.0);
    assert_eq!(sample(&samples, "idemd_waiters"), 0.0);
    let version = format!(r#"idemd_build_info{{version="{}"}}"#, env!("CARGO_PKG_VERSION"));
    assert_eq!(sample(&samples, &version), 1.0);
    assert!(sample(&samples, r#"idemd_db_pool_connections{state="idle"}"#) >= 0.0);
    assert!(sample(&samples, r#"idemd_db_pool_connections{state="in_use"}"#) >= 0.0);
    // No label carries a key or a namespace.
    assert!(samples.keys().all(|series| !series.contains("payments") && !series.contains(r#""a""#)), "{samples:#?}");
}

async fn metrics_count_waiters_reaped_leases_and_purges(backend: Backend) {
    let app = spawn_app_with(backend, |c| {
        c.reaper_interval = Duration::from_millis(100);
        c.purge_interval = Duration::from_millis(100);
        c.min_retention = Duration::from_secs(1);
    })
    .await;
    app.acquire(begin_req("held")).await;
    let mut client = app.client.clone();
    let waiter = tokio::spawn(async move {
        let mut request = begin_req("held");
        request.wait_timeout = secs(3);
        client.begin(request).await
    });
    eventually("one waiter", Duration::from_secs(5), || async {
        (scrape(app.metrics_addr).await.get("idemd_waiters") == Some(&1.0)).then_some(())
    })
    .await;
    waiter.await.expect("task").expect("answered");
    assert_eq!(sample(&scrape(app.metrics_addr).await, "idemd_waiters"), 0.0);

    let mut short = begin_req("crash");
    short.lease_ttl = secs(1);
    // The lease ends before the record expires, so the reaper sees it first.
    short.retention = secs(2);
    app.acquire(short).await;
    eventually("reaped and purged", Duration::from_secs(15), || async {
        let samples = scrape(app.metrics_addr).await;
        (samples.get("idemd_reaped_leases_total") == Some(&1.0)
            && samples.get("idemd_purged_records_total") == Some(&1.0))
        .then_some(())
    })
    .await;
}

crate::both_stores!(
    metrics_count_a_scripted_mix,
    metrics_count_waiters_reaped_leases_and_purges,
    what_the_alerts_watch_is_exported_from_the_start,
    the_latency_objective_leaves_out_begins_that_parked,
    the_reaper_and_purger_report_their_last_pass_and_how_late_they_were
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_the_otlp_collector_under_the_callers_trace() {
    let mut collector = fake_opentelemetry_collector::FakeCollectorServer::start().await.expect("collector");
    let mut idemd = Binary::start(&[], &[("OTEL_EXPORTER_OTLP_ENDPOINT", &collector.endpoint())]);
    let mut client = IdempotencyClient::connect(idemd.url()).await.expect("connect");
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_span = "00f067aa0ba902b7";
    fn traced<T>(message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        request.metadata_mut().insert("traceparent", traceparent.parse().expect("ascii"));
        request
    }
    let Some(Outcome::Acquired(lease)) =
        client.begin(traced(begin_req("traced"))).await.expect("begin").into_inner().outcome
    else {
        panic!("expected acquired");
    };
    client
        .complete(traced(idemd::pb::CompleteRequest {
            namespace: NS.into(),
            key: "traced".into(),
            lease_token: lease.lease_token.clone(),
            response: b"secret-payload".to_vec(),
            ..Default::default()
        }))
        .await
        .expect("complete");
    // SIGTERM flushes the batch exporter.
    assert_eq!(idemd.terminate().await.code(), Some(0));

    let spans = collector.exported_spans(4, Duration::from_secs(20)).await;
    let rpc = |method: &str| {
        spans
            .iter()
            .find(|s| s.name == format!("idemd.v1.Idempotency/{method}"))
            .unwrap_or_else(|| panic!("no {method} span in {spans:#?}"))
    };
    let begin = rpc("Begin");
    assert_eq!(begin.trace_id, trace_id);
    assert_eq!(begin.parent_span_id, parent_span);
    assert_eq!(begin.attributes.get("rpc.system").map(|v| plain(v)), Some("grpc".to_string()));
    assert_eq!(begin.attributes.get("rpc.service").map(|v| plain(v)), Some("idemd.v1.Idempotency".to_string()));
    assert_eq!(begin.attributes.get("rpc.method").map(|v| plain(v)), Some("Begin".to_string()));
    assert_eq!(begin.attributes.get("rpc.grpc.status_code").map(|v| plain(v)), Some("0".to_string()));
    assert_eq!(begin.attributes.get("idemd.namespace").map(|v| plain(v)), Some(NS.to_string()));
    assert_eq!(begin.attributes.get("idemd.outcome").map(|v| plain(v)), Some("acquired".to_string()));
    assert_eq!(begin.attributes.get("idemd.attempt").map(|v| plain(v)), Some("1".to_string()));
    // Nothing that is the same for every span (or meaningless for async work).
    for constant in [
        "code.file.path",
        "code.line.number",
        "code.module.name",
        "thread.id",
        "thread.name",
        "target",
        "busy_ns",
        "idle_ns",
    ] {
        assert!(!begin.attributes.contains_key(constant), "{constant} in {:?}", begin.attributes);
    }
    let complete = rpc("Complete");
    assert_eq!(complete.trace_id, trace_id);
    assert_eq!(complete.attributes.get("idemd.outcome").map(|v| plain(v)), Some("completed".to_string()));
    // Store calls are child spans of the RPC.
    let store = spans.iter().find(|s| s.name == "store.begin").unwrap_or_else(|| panic!("no store span: {spans:#?}"));
    assert_eq!(store.parent_span_id, begin.span_id);
    // Never a payload or a lease token.
    let everything = format!("{spans:?}");
    assert!(!everything.contains("secret-payload") && !everything.contains(&lease.lease_token));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reaped_lease_logs_a_warning_naming_it() {
    let idemd = Binary::start(&["--reaper-interval", "100ms"], &[]);
    let mut client = IdempotencyClient::connect(idemd.url()).await.expect("connect");
    let mut request = begin_req("crashed-caller");
    request.lease_ttl = secs(1);
    let outcome = client.begin(request).await.expect("begin").into_inner().outcome;
    let Some(Outcome::Acquired(lease)) = outcome else { panic!("{outcome:?}") };
    let line = idemd.wait_for_log("aborted by the reaper", Duration::from_secs(15));
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains(r#"namespace="payments""#), "{line}");
    assert!(line.contains(r#"key="crashed-caller""#), "{line}");
    assert!(line.contains("attempt=1"), "{line}");
    assert!(!line.contains(&lease.lease_token), "{line}");
}

/// Now as Unix time, to compare with the timestamp gauges.
fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_secs_f64()
}

/// Alerts count increases, and Prometheus cannot see a series' first sample
/// as one: what they watch is exported at 0 before anything happens.
async fn what_the_alerts_watch_is_exported_from_the_start(backend: Backend) {
    let started = unix_now();
    let app = spawn_app(backend).await;
    let samples = scrape(app.metrics_addr).await;
    assert_eq!(sample(&samples, "idemd_ready"), 1.0);
    assert_eq!(sample(&samples, "idemd_db_pool_max_connections"), 8.0, "test_config's --db-max-connections");
    for outcome in ["acquired", "completed", "in_progress", "fingerprint_mismatch"] {
        assert_eq!(sample(&samples, &format!(r#"idemd_begin_outcomes_total{{outcome="{outcome}"}}"#)), 0.0);
    }
    for kind in ["unavailable", "timeout", "contention", "internal"] {
        assert_eq!(sample(&samples, &format!(r#"idemd_store_errors_total{{kind="{kind}"}}"#)), 0.0);
    }
    for (rpc, code) in [("Complete", "FAILED_PRECONDITION"), ("Begin", "RESOURCE_EXHAUSTED"), ("Begin", "UNAVAILABLE")]
    {
        assert_eq!(sample(&samples, &format!(r#"idemd_requests_total{{code="{code}",rpc="{rpc}"}}"#)), 0.0);
    }
    for task in ["reaper", "purger"] {
        let at = sample(&samples, &format!(r#"idemd_maintenance_last_success_timestamp_seconds{{task="{task}"}}"#));
        assert!(at >= started - 1.0 && at <= unix_now() + 1.0, "{task}: {at} is not the start");
        assert_eq!(sample(&samples, &format!(r#"idemd_maintenance_lag_seconds_total{{task="{task}"}}"#)), 0.0);
    }

    // A Complete that outlived its lease: the record moved on to attempt 2.
    let first = app.acquire(begin_req("k")).await;
    app.abort("k", &first.lease_token, "timed out").await.expect("abort");
    app.acquire(begin_req("k")).await;
    let status = app.complete("k", &first.lease_token, b"late").await.expect_err("lease lost");
    assert_error(&status, tonic::Code::FailedPrecondition, "LEASE_LOST");
    let samples = scrape(app.metrics_addr).await;
    assert_eq!(sample(&samples, r#"idemd_requests_total{code="FAILED_PRECONDITION",rpc="Complete"}"#), 1.0);
}

/// A Begin parked on `wait_timeout` waits for the holder, not for idemd:
/// it counts as a request but not in the latency objective's histogram.
async fn the_latency_objective_leaves_out_begins_that_parked(backend: Backend) {
    let app = spawn_app(backend).await;
    app.acquire(begin_req("held")).await;
    let mut parked = begin_req("held");
    parked.wait_timeout = secs(1);
    assert!(matches!(app.begin(parked).await.expect("answered"), Outcome::InProgress(_)));
    app.acquire(begin_req("other")).await;
    let samples = scrape(app.metrics_addr).await;
    assert_eq!(sample(&samples, r#"idemd_request_duration_seconds_count{code="OK",rpc="Begin"}"#), 3.0);
    assert_eq!(sample(&samples, r#"idemd_request_sli_duration_seconds_count{rpc="Begin"}"#), 2.0);
    let fast = sample(&samples, r#"idemd_request_sli_duration_seconds_bucket{le="0.5",rpc="Begin"}"#);
    assert_eq!(fast, 2.0, "the parked second is not in it: {samples:#?}");
}

async fn the_reaper_and_purger_report_their_last_pass_and_how_late_they_were(backend: Backend) {
    let app = spawn_app_with(backend, |c| {
        c.reaper_interval = Duration::from_millis(100);
        c.purge_interval = Duration::from_millis(100);
        c.min_retention = Duration::from_secs(1);
    })
    .await;
    let last_pass = |samples: &std::collections::BTreeMap<String, f64>, task: &str| {
        sample(samples, &format!(r#"idemd_maintenance_last_success_timestamp_seconds{{task="{task}"}}"#))
    };
    let before = scrape(app.metrics_addr).await;
    let mut short = begin_req("crash");
    short.lease_ttl = secs(1);
    short.retention = secs(2);
    app.acquire(short).await;
    let samples = eventually("reaped and purged", Duration::from_secs(15), || async {
        let samples = scrape(app.metrics_addr).await;
        (samples.get("idemd_reaped_leases_total") == Some(&1.0)
            && samples.get("idemd_purged_records_total") == Some(&1.0))
        .then_some(samples)
    })
    .await;
    for task in ["reaper", "purger"] {
        let lag = sample(&samples, &format!(r#"idemd_maintenance_lag_seconds_total{{task="{task}"}}"#));
        // Due at the lease's end (the record's expiry), handled within a few passes.
        assert!(lag > 0.0 && lag < 5.0, "{task} lag {lag}");
        assert!(last_pass(&samples, task) > last_pass(&before, task), "{task} passes are recorded");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_store_errors_and_the_reaper_show_a_postgres_outage() {
    let cluster = crate::pg_cluster::Cluster::new("ready-gauge");
    let database_url = fresh_postgres_database(&cluster.url()).await;
    let app = spawn_on(test_config(&database_url)).await;
    assert_eq!(sample(&scrape(app.metrics_addr).await, "idemd_ready"), 1.0);

    cluster.stop_immediately();
    eventually("idemd_ready drops", Duration::from_secs(20), || async {
        (scrape(app.metrics_addr).await.get("idemd_ready") == Some(&0.0)).then_some(())
    })
    .await;
    app.begin(begin_req("during")).await.expect_err("the store is down");
    let reaper = r#"idemd_maintenance_last_success_timestamp_seconds{task="reaper"}"#;
    let samples = scrape(app.metrics_addr).await;
    let failed = sample(&samples, r#"idemd_store_errors_total{kind="unavailable"}"#)
        + sample(&samples, r#"idemd_store_errors_total{kind="timeout"}"#);
    assert!(failed >= 1.0, "{samples:#?}");
    // The reaper runs every 200 ms and fails each time: its last good pass stays put.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(sample(&scrape(app.metrics_addr).await, reaper), sample(&samples, reaper));

    cluster.start();
    eventually("idemd_ready is back", Duration::from_secs(30), || async {
        let samples = scrape(app.metrics_addr).await;
        (samples.get("idemd_ready") == Some(&1.0) && sample(&samples, reaper) > unix_now() - 5.0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_batch_sizes_are_counted_by_kind() {
    let app = spawn_app(Backend::PostgresBatched).await;
    let keys: Vec<String> = (0..20).map(|i| format!("batch-{i}")).collect();
    let begins = keys.iter().map(|key| {
        let mut client = app.client.clone();
        let request = begin_req(key);
        tokio::spawn(async move { client.begin(request).await })
    });
    let mut leases = Vec::new();
    for (key, begin) in keys.iter().zip(begins.collect::<Vec<_>>()) {
        let outcome = begin.await.expect("task").expect("begin").into_inner().outcome;
        let Some(Outcome::Acquired(lease)) = outcome else { panic!("{outcome:?}") };
        leases.push((key.clone(), lease.lease_token));
    }
    let completes = leases.into_iter().map(|(key, token)| {
        let mut client = app.client.clone();
        tokio::spawn(async move {
            client
                .complete(idemd::pb::CompleteRequest {
                    namespace: NS.into(),
                    key,
                    lease_token: token,
                    response: b"ok".to_vec(),
                    ..Default::default()
                })
                .await
        })
    });
    for complete in completes.collect::<Vec<_>>() {
        complete.await.expect("task").expect("complete");
    }
    let samples = scrape(app.metrics_addr).await;
    for kind in ["begin", "complete"] {
        // Every call is in exactly one batch, however they were grouped.
        assert_eq!(sample(&samples, &format!(r#"idemd_group_commit_batch_size_sum{{kind="{kind}"}}"#)), 20.0);
        let batches = sample(&samples, &format!(r#"idemd_group_commit_batch_size_count{{kind="{kind}"}}"#));
        assert!((1.0..=20.0).contains(&batches), "{kind}: {batches} batches");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_certificate_reload_shows_until_good_files_return() {
    use crate::security::{Ca, tls_app, write};
    let dir = tempfile::tempdir().expect("dir");
    let ca = Ca::new("server ca");
    let app = tls_app(dir.path(), &ca, None, |_| {}).await;
    let in_force = || async { scrape(app.metrics_addr).await.get("idemd_tls_certificate_in_force").copied() };
    assert_eq!(in_force().await, Some(1.0));
    write(dir.path(), "tls.crt", "not a certificate\n");
    eventually("the rejected reload shows", Duration::from_secs(15), || async {
        (in_force().await == Some(0.0)).then_some(())
    })
    .await;
    let (cert, key) = ca.leaf("idemd", None);
    write(dir.path(), "tls.key", &key);
    write(dir.path(), "tls.crt", &cert);
    eventually("good files are in force again", Duration::from_secs(15), || async {
        (in_force().await == Some(1.0)).then_some(())
    })
    .await;
}
