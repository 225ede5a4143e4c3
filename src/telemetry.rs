//! Logs and traces. Logs are text or JSON lines on stderr, filtered by
//! `RUST_LOG` (default `info`). Spans are exported over OTLP when the
//! standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or `…_TRACES_ENDPOINT`) is set,
//! honouring the other standard `OTEL_*` variables, and nothing is exported
//! otherwise. [`init`] returns a guard that flushes the exporter on shutdown.
//! Never a payload or lease token in a span or a log line.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::Extractor;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;

/// Whether OTLP export is configured, by the general endpoint variable or
/// the signal-specific one.
pub fn otlp_configured(signal_variable: &str) -> bool {
    ["OTEL_EXPORTER_OTLP_ENDPOINT", signal_variable]
        .iter()
        .any(|name| std::env::var(name).is_ok_and(|value| !value.trim().is_empty()))
}

/// `service.name` is `idemd` unless `OTEL_SERVICE_NAME` (or
/// `OTEL_RESOURCE_ATTRIBUTES`) says otherwise.
pub fn resource() -> Resource {
    let builder = Resource::builder();
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok()
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="));
    if named { builder.build() } else { builder.with_service_name("idemd").build() }
}

/// Flushes and stops the trace exporter when dropped or shut down.
#[derive(Debug, Default)]
pub struct TelemetryGuard {
    tracer_provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    pub fn shutdown(mut self) {
        self.flush();
    }

    fn flush(&mut self) {
        if let Some(provider) = self.tracer_provider.take()
            && let Err(error) = provider.shutdown()
        {
            eprintln!("idemd: flushing traces failed: {error}");
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Set once the trace exporter is installed.
static TRACES_EXPORTED: AtomicBool = AtomicBool::new(false);

/// Whether spans go anywhere but log lines. The RPC and store spans are
/// INFO then, and DEBUG otherwise: at the default `info` they would only be
/// the context of log lines, which have their own fields, and each costs a
/// registry entry with formatted fields for as long as its call lasts
/// (a parked waiter's call lasts up to a minute).
pub fn traces_exported() -> bool {
    TRACES_EXPORTED.load(Ordering::Relaxed)
}

/// A span that is INFO when traces are exported and DEBUG otherwise (see
/// [`traces_exported`]); one call site per level, since a span's level is
/// static.
macro_rules! traced_span {
    ($name:literal, $($fields:tt)*) => {
        if $crate::telemetry::traces_exported() {
            tracing::info_span!($name, $($fields)*)
        } else {
            tracing::debug_span!($name, $($fields)*)
        }
    };
}
pub(crate) use traced_span;

/// Installs the global subscriber: log lines, plus spans over OTLP when
/// configured. A second call (tests) keeps the first subscriber.
pub fn init(format: LogFormat) -> anyhow::Result<TelemetryGuard> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only for a person at a terminal, never in collected logs.
    let ansi = std::io::stderr().is_terminal();
    let logs = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr).boxed(),
    };
    let mut guard = TelemetryGuard::default();
    let traces = if otlp_configured("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().build()?;
        let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource()).build();
        let tracer = provider.tracer("idemd");
        guard.tracer_provider = Some(provider);
        // The span macro's file and line, the creating thread, the target
        // and busy/idle time are the same for every RPC span or meaningless
        // for async work, and each span carries them for as long as its call
        // lasts.
        let layer = tracing_opentelemetry::layer()
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_tracked_inactivity(false);
        Some(layer.with_tracer(tracer))
    } else {
        None
    };
    let exporting = traces.is_some();
    if tracing_subscriber::registry().with(filter).with(logs).with(traces).try_init().is_ok() && exporting {
        TRACES_EXPORTED.store(true, Ordering::Relaxed);
    }
    Ok(guard)
}

/// Reads W3C `traceparent`/`tracestate` from gRPC metadata.
struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|key| match key {
                tonic::metadata::KeyRef::Ascii(key) => Some(key.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// The caller's trace context, to parent the RPC's span.
pub fn remote_context(metadata: &tonic::metadata::MetadataMap) -> opentelemetry::Context {
    opentelemetry::global::get_text_map_propagator(|propagator| propagator.extract(&MetadataExtractor(metadata)))
}
