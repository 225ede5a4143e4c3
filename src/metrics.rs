//! The metrics of one server: OpenTelemetry instruments read by a
//! Prometheus registry (served at `/metrics` on `--metrics-listen`) and, when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, pushed over OTLP as well.
//!
//! Labels are bounded: RPC names, gRPC codes, outcomes and error kinds.
//! Never a key, a namespace, a token or a payload.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Gauge, Histogram, Meter, MeterProvider as _, UpDownCounter};
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::connections::{self, ConnectionService, Slots};
use crate::error::{Error, STORE_ERROR_KINDS};

/// Latency buckets in seconds: from a cached replay to a long wait. The
/// latency objective of `deploy/prometheus` must be one of them.
const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Calls per group-commit batch: 1 (a lone call) up to `--group-commit-max-batch`.
const BATCH_SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

/// The Idempotency RPCs and the codes alerts count: exported at 0 from the
/// start, because Prometheus's `increase()` cannot see a series' first
/// sample as an increase, and the first LEASE_LOST must not go unseen.
const WATCHED_RPCS: [&str; 5] = ["Begin", "Complete", "Abort", "Heartbeat", "Lookup"];
const WATCHED_CODES: [tonic::Code; 4] =
    [tonic::Code::Ok, tonic::Code::FailedPrecondition, tonic::Code::ResourceExhausted, tonic::Code::Unavailable];

/// Everything Begin can answer, for `idemd_begin_outcomes`.
const BEGIN_OUTCOMES: [&str; 4] = ["acquired", "completed", "in_progress", "fingerprint_mismatch"];

/// Connections of the request pool, for the pool gauges.
#[derive(Debug, Clone, Copy, Default)]
pub struct PoolStats {
    pub in_use: u64,
    pub idle: u64,
    /// `--db-max-connections`: in_use / max is the pool's saturation.
    pub max: u64,
}

pub struct Metrics {
    registry: prometheus::Registry,
    provider: SdkMeterProvider,
    meter: Meter,
    requests: Counter<u64>,
    duration: Histogram<f64>,
    begin_outcomes: Counter<u64>,
    reaped: Counter<u64>,
    purged: Counter<u64>,
    waiters: UpDownCounter<i64>,
    store_errors: Counter<u64>,
    admin_actions: Counter<u64>,
    /// RPC latency without the time a Begin parked on `wait_timeout`.
    sli_duration: Histogram<f64>,
    batch_sizes: Histogram<u64>,
    /// A counter, not a histogram: a histogram's series appear with its
    /// first observation, which `rate()` cannot see, and the first late
    /// row after a start is the one that matters.
    maintenance_lag: Counter<f64>,
    last_success: Gauge<f64>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// A fresh registry; adds an OTLP push exporter when the standard
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` (or the metrics-specific one) is set.
    pub fn new() -> anyhow::Result<Arc<Self>> {
        let registry = prometheus::Registry::new();
        let prometheus = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .without_target_info()
            .scope_info_enabled(false)
            .build()?;
        let mut builder =
            SdkMeterProvider::builder().with_reader(prometheus).with_resource(crate::telemetry::resource());
        if crate::telemetry::otlp_configured("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") {
            let exporter = opentelemetry_otlp::MetricExporter::builder().with_tonic().build()?;
            builder = builder.with_reader(PeriodicReader::builder(exporter).build());
        }
        let provider = builder.build();
        let meter = provider.meter("idemd");
        let metrics = Metrics {
            requests: meter
                .u64_counter("idemd_requests")
                .with_description("RPCs answered, by method and gRPC code")
                .build(),
            duration: meter
                .f64_histogram("idemd_request_duration")
                .with_unit("s")
                .with_description("RPC latency, by method and gRPC code")
                .with_boundaries(LATENCY_BUCKETS.to_vec())
                .build(),
            begin_outcomes: meter
                .u64_counter("idemd_begin_outcomes")
                .with_description("Begin results: acquired, completed (a replay), in_progress, fingerprint_mismatch")
                .build(),
            reaped: meter
                .u64_counter("idemd_reaped_leases")
                .with_description("Leases the reaper aborted because their caller never finished")
                .build(),
            purged: meter.u64_counter("idemd_purged_records").with_description("Expired records deleted").build(),
            waiters: meter
                .i64_up_down_counter("idemd_waiters")
                .with_description("Begin calls currently waiting for a holder (wait_timeout)")
                .build(),
            store_errors: meter
                .u64_counter("idemd_store_errors")
                .with_description("Store calls that failed, by kind: unavailable, timeout, contention, internal")
                .build(),
            admin_actions: meter
                .u64_counter("idemd_admin_actions")
                .with_description(
                    "Admin service calls, by action (list, history, resolve, release, invalidate) and outcome",
                )
                .build(),
            sli_duration: meter
                .f64_histogram("idemd_request_sli_duration")
                .with_unit("s")
                .with_description(
                    "RPC latency for the latency objective, by method: every call but Begins that parked on wait_timeout (their time is the holder's)",
                )
                .with_boundaries(LATENCY_BUCKETS.to_vec())
                .build(),
            batch_sizes: meter
                .u64_histogram("idemd_group_commit_batch_size")
                .with_description("Calls per group-commit statement on Postgres, by kind: begin, complete")
                .with_boundaries(BATCH_SIZE_BUCKETS.to_vec())
                .build(),
            maintenance_lag: meter
                .f64_counter("idemd_maintenance_lag")
                .with_unit("s")
                .with_description(
                    "Seconds past due, summed over the leases the reaper aborted and the records the purger deleted, by task: over idemd_reaped_leases_total or idemd_purged_records_total, their mean lateness",
                )
                .build(),
            last_success: meter
                .f64_gauge("idemd_maintenance_last_success_timestamp")
                .with_unit("s")
                .with_description(
                    "Unix time the reaper or the purger last finished a pass without error (their start until then), by task",
                )
                .build(),
            registry,
            provider,
            meter,
        };
        // Exported from the start, so dashboards and alerts see 0, not "no data".
        metrics.waiters.add(0, &[]);
        metrics.reaped.add(0, &[]);
        metrics.purged.add(0, &[]);
        for task in ["reaper", "purger"] {
            metrics.maintenance_lag.add(0.0, &[KeyValue::new("task", task)]);
        }
        for outcome in BEGIN_OUTCOMES {
            metrics.begin_outcomes.add(0, &[KeyValue::new("outcome", outcome)]);
        }
        for kind in STORE_ERROR_KINDS {
            metrics.store_errors.add(0, &[KeyValue::new("kind", kind)]);
        }
        for rpc in WATCHED_RPCS {
            for code in WATCHED_CODES {
                metrics.requests.add(0, &[KeyValue::new("rpc", rpc), KeyValue::new("code", code_name(code))]);
            }
        }
        metrics
            .meter
            .u64_observable_gauge("idemd_build_info")
            .with_description("Always 1; the version label says which build runs")
            .with_callback(|gauge| gauge.observe(1, &[KeyValue::new("version", env!("CARGO_PKG_VERSION"))]))
            .build();
        Ok(Arc::new(metrics))
    }

    /// Reports the request pool's connections and its size, read at each scrape.
    pub fn observe_pool(&self, stats: impl Fn() -> PoolStats + Send + Sync + 'static) {
        let stats = Arc::new(stats);
        let connections = Arc::clone(&stats);
        self.meter
            .u64_observable_gauge("idemd_db_pool_connections")
            .with_description("Connections of the request pool, by state: in_use, idle")
            .with_callback(move |gauge| {
                let stats = connections();
                gauge.observe(stats.in_use, &[KeyValue::new("state", "in_use")]);
                gauge.observe(stats.idle, &[KeyValue::new("state", "idle")]);
            })
            .build();
        self.meter
            .u64_observable_gauge("idemd_db_pool_max_connections")
            .with_description("Most connections the request pool opens (--db-max-connections)")
            .with_callback(move |gauge| gauge.observe(stats().max, &[]))
            .build();
    }

    /// Reports readiness (1 while the store answers and shutdown has not
    /// begun), read at each scrape.
    pub fn observe_readiness(&self, serving: impl Fn() -> bool + Send + Sync + 'static) {
        self.meter
            .u64_observable_gauge("idemd_ready")
            .with_description("1 while readiness is SERVING: the store answers its probe and shutdown has not begun")
            .with_callback(move |gauge| gauge.observe(u64::from(serving()), &[]))
            .build();
    }

    /// Reports whether the TLS certificates in force are the files on disk,
    /// read at each scrape.
    pub fn observe_tls(&self, in_force: impl Fn() -> bool + Send + Sync + 'static) {
        self.meter
            .u64_observable_gauge("idemd_tls_certificate_in_force")
            .with_description("1 when the TLS certificates in force are the files on disk, 0 when a reload was rejected and the previous ones stay")
            .with_callback(move |gauge| gauge.observe(u64::from(in_force()), &[]))
            .build();
    }

    /// Reports whether the tokens file on disk is what is in force, and
    /// its bad lines, read at each scrape.
    pub fn observe_tokens_file(&self, authenticator: Arc<Authenticator>) {
        let state = Arc::clone(&authenticator);
        self.meter
            .u64_observable_gauge("idemd_auth_tokens_file_in_force")
            .with_description("1 when the grants in force are exactly the tokens file on disk, 0 when a reload left lines out or kept the previous grants")
            .with_callback(move |gauge| gauge.observe(u64::from(state.file_in_force()), &[]))
            .build();
        self.meter
            .u64_observable_gauge("idemd_auth_tokens_file_bad_lines")
            .with_description("Lines of the tokens file last read that were left out")
            .with_callback(move |gauge| gauge.observe(authenticator.bad_lines() as u64, &[]))
            .build();
    }

    /// One RPC answered; `parked` when a Begin waited for another holder,
    /// which leaves it out of the latency objective's histogram.
    pub fn rpc(&self, method: &'static str, code: tonic::Code, elapsed: Duration, parked: bool) {
        let labels = [KeyValue::new("rpc", method), KeyValue::new("code", code_name(code))];
        self.requests.add(1, &labels);
        self.duration.record(elapsed.as_secs_f64(), &labels);
        if !parked {
            self.sli_duration.record(elapsed.as_secs_f64(), &labels[..1]);
        }
    }

    /// The calls of one group-commit statement (`kind`: begin, complete).
    pub fn group_commit_batch(&self, kind: &'static str, size: usize) {
        self.batch_sizes.record(size as u64, &[KeyValue::new("kind", kind)]);
    }

    /// How long after it was due the reaper or the purger (`task`) handled one row.
    pub fn maintenance_lag(&self, task: &'static str, overdue: Duration) {
        self.maintenance_lag.add(overdue.as_secs_f64(), &[KeyValue::new("task", task)]);
    }

    /// The reaper or the purger (`task`) finished a pass without error, or started.
    pub fn maintenance_succeeded(&self, task: &'static str) {
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        self.last_success.record(now.as_secs_f64(), &[KeyValue::new("task", task)]);
    }

    pub fn admin_action(&self, action: &'static str, outcome: &'static str) {
        self.admin_actions.add(1, &[KeyValue::new("action", action), KeyValue::new("outcome", outcome)]);
    }

    pub fn begin_outcome(&self, outcome: &'static str) {
        self.begin_outcomes.add(1, &[KeyValue::new("outcome", outcome)]);
    }

    pub fn reaped(&self, count: u64) {
        self.reaped.add(count, &[]);
    }

    pub fn purged(&self, count: u64) {
        self.purged.add(count, &[]);
    }

    /// Counts a waiter until the returned guard drops.
    pub fn waiting(self: &Arc<Self>) -> WaiterGuard {
        self.waiters.add(1, &[]);
        WaiterGuard(Arc::clone(self))
    }

    /// Counts a failed store call by kind; other errors are not store errors.
    pub fn store_error(&self, error: &Error) {
        if let Some(kind) = error.store_kind() {
            self.store_errors.add(1, &[KeyValue::new("kind", kind)]);
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let families = self.registry.gather();
        prometheus::TextEncoder::new()
            .encode_to_string(&families)
            .unwrap_or_else(|error| format!("# encoding metrics failed: {error}\n"))
    }

    /// Pushes what is left over OTLP; called once the server has drained.
    pub fn shutdown(&self) {
        if let Err(error) = self.provider.shutdown() {
            tracing::debug!(%error, "metrics provider shutdown");
        }
    }
}

/// Decrements the waiter gauge when the wait ends, however it ends.
pub struct WaiterGuard(Arc<Metrics>);

impl Drop for WaiterGuard {
    fn drop(&mut self) {
        self.0.waiters.add(-1, &[]);
    }
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Serves `/metrics` on `listener` until `shutdown`, with the same
/// connection slots and timeouts as the gRPC port (`crate::connections`)
/// and hyper's header-read timeout set to the first-request timeout.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, slots: Arc<Slots>, shutdown: CancellationToken) {
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1.timer(TokioTimer::new()).header_read_timeout(slots.policy().first_request_timeout).keep_alive(true);
    let endpoint = MetricsEndpoint(metrics);
    let connections = TaskTracker::new();
    connections::accept_loop(listener, slots, shutdown.clone(), |stream, peer, slot| {
        let service = TowerToHyperService::new(ConnectionService::new(endpoint.clone(), &slot, peer));
        let connection = http1.serve_connection(TokioIo::new(stream), service);
        connections.spawn(connections::drive(connection, slot, shutdown.clone()));
    })
    .await;
    connections.close();
    connections.wait().await;
}

/// `GET /metrics`: the Prometheus text exposition; anything else is 404/405.
#[derive(Clone)]
struct MetricsEndpoint(Arc<Metrics>);

impl tower_service::Service<http::Request<tonic::body::Body>> for MetricsEndpoint {
    type Response = http::Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let reply = |status: http::StatusCode, content_type: &'static str, body: String| {
            let mut response = http::Response::new(Full::new(Bytes::from(body)));
            *response.status_mut() = status;
            response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
            response
        };
        let response = match (request.uri().path(), request.method()) {
            ("/metrics", &http::Method::GET | &http::Method::HEAD) => {
                reply(http::StatusCode::OK, "text/plain; version=0.0.4", self.0.render())
            }
            ("/metrics", _) => reply(http::StatusCode::METHOD_NOT_ALLOWED, "text/plain", "use GET\n".into()),
            _ => reply(http::StatusCode::NOT_FOUND, "text/plain", "metrics are at /metrics\n".into()),
        };
        std::future::ready(Ok(response))
    }
}
