//! What operators see: `/metrics` after a scripted mix of calls, spans over
//! OTLP joined to the caller's trace, and the reaper's warning.

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

crate::both_stores!(metrics_count_a_scripted_mix, metrics_count_waiters_reaped_leases_and_purges);

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
