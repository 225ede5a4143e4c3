//! What every RPC reports: one span (parented on the caller's W3C trace
//! context) with the attributes operators filter on, and its request count
//! and latency. Never a key, a payload or a lease token.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::time::Instant;
use tonic::{Request, Response, Status};
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::error::Error;
use crate::metrics::Metrics;
use crate::pb::{ADMIN_SERVICE_NAME, SERVICE_NAME};
use crate::telemetry::{remote_context, traced_span};

/// A successful RPC's message and what to report about it.
pub struct Reply<T> {
    pub message: T,
    /// `idemd.outcome`: acquired, completed, in_progress, aborted, extended, found.
    pub outcome: &'static str,
    pub attempt: Option<u32>,
}

pub struct RpcCall {
    method: &'static str,
    span: tracing::Span,
    /// For the log line of a failed call: its span may be off (DEBUG).
    namespace: OnceLock<String>,
    /// A Begin that waited for another holder: its latency is theirs.
    parked: AtomicBool,
    started: Instant,
    metrics: Arc<Metrics>,
}

impl RpcCall {
    pub fn start<T>(method: &'static str, request: &Request<T>, metrics: &Arc<Metrics>) -> Self {
        let span = traced_span!(
            "rpc",
            otel.name = span_name(method),
            otel.kind = "server",
            rpc.method = method,
            rpc.grpc.status_code = Empty,
            otel.status_code = Empty,
            idemd.namespace = Empty,
            idemd.outcome = Empty,
            idemd.attempt = Empty,
        );
        // Without a trace exporter there is no OpenTelemetry context to join.
        let _ = span.set_parent(remote_context(request.metadata()));
        // The same for every call: given to the trace only, not formatted
        // into every log line's span context (and kept by every parked
        // waiter's span as text).
        span.set_attribute("rpc.system", "grpc");
        span.set_attribute("rpc.service", admin_action(method).map_or(SERVICE_NAME, |_| ADMIN_SERVICE_NAME));
        RpcCall {
            method,
            span,
            namespace: OnceLock::new(),
            parked: AtomicBool::new(false),
            started: Instant::now(),
            metrics: Arc::clone(metrics),
        }
    }

    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    /// Records the namespace once it is known to be valid (bounded in size).
    pub fn namespace(&self, namespace: &str) {
        self.span.record("idemd.namespace", namespace);
        let _ = self.namespace.set(namespace.to_string());
    }

    /// The call parked on `wait_timeout` behind another holder.
    pub fn parked(&self) {
        self.parked.store(true, Ordering::Relaxed);
    }

    /// Reports the call and turns its result into the gRPC answer.
    pub fn finish<T>(self, result: Result<Reply<T>, Error>) -> Result<Response<T>, Status> {
        let (code, outcome, answer) = match result {
            Ok(reply) => {
                if let Some(attempt) = reply.attempt {
                    self.span.record("idemd.attempt", attempt);
                }
                (tonic::Code::Ok, reply.outcome, Ok(Response::new(reply.message)))
            }
            Err(error) => {
                let outcome = error.outcome();
                self.span.in_scope(|| self.log_failure(&error));
                let status = Status::from(error);
                self.span.record("otel.status_code", "ERROR");
                (status.code(), outcome, Err(status))
            }
        };
        self.span.record("rpc.grpc.status_code", code as i32);
        self.span.record("idemd.outcome", outcome);
        if self.method == "Begin"
            && matches!(outcome, "acquired" | "completed" | "in_progress" | "fingerprint_mismatch")
        {
            self.metrics.begin_outcome(outcome);
        }
        if let Some(action) = admin_action(self.method) {
            self.metrics.admin_action(action, outcome);
        }
        self.metrics.rpc(self.method, code, self.started.elapsed(), self.parked.load(Ordering::Relaxed));
        answer
    }

    /// An outage or a bug is worth a line naming the call; a caller's
    /// mistake (a bad field, a lost lease) is not.
    fn log_failure(&self, error: &Error) {
        let namespace = self.namespace.get().map(String::as_str);
        match error {
            Error::StoreUnavailable(source) => {
                tracing::warn!(rpc.method = self.method, idemd.namespace = namespace, error = %source, "store unavailable");
            }
            Error::Internal(_) | Error::DatabaseBug { .. } => {
                tracing::error!(rpc.method = self.method, idemd.namespace = namespace, detail = %error, "internal error");
            }
            _ => {}
        }
    }
}

/// `idemd.v1.Idempotency/<Method>`, without an allocation per call.
fn span_name(method: &'static str) -> &'static str {
    match method {
        "Begin" => "idemd.v1.Idempotency/Begin",
        "Complete" => "idemd.v1.Idempotency/Complete",
        "Abort" => "idemd.v1.Idempotency/Abort",
        "Heartbeat" => "idemd.v1.Idempotency/Heartbeat",
        "Lookup" => "idemd.v1.Idempotency/Lookup",
        "ListRecords" => "idemd.v1.Admin/ListRecords",
        "GetHistory" => "idemd.v1.Admin/GetHistory",
        "Resolve" => "idemd.v1.Admin/Resolve",
        "Release" => "idemd.v1.Admin/Release",
        "Invalidate" => "idemd.v1.Admin/Invalidate",
        _ => SERVICE_NAME,
    }
}

/// The `action` label of an Admin method in `idemd_admin_actions`.
fn admin_action(method: &'static str) -> Option<&'static str> {
    match method {
        "ListRecords" => Some("list"),
        "GetHistory" => Some("history"),
        "Resolve" => Some("resolve"),
        "Release" => Some("release"),
        "Invalidate" => Some("invalidate"),
        _ => None,
    }
}

/// Each RPC of a service: a span and metrics around `$self.$inner(&call,
/// request)`, one answer. The service has a `metrics` field.
macro_rules! observed {
    ($self:ident, $method:literal, $inner:ident, $request:ident) => {{
        let call = $crate::observe::RpcCall::start($method, &$request, &$self.metrics);
        let result = tracing::Instrument::instrument($self.$inner(&call, $request), call.span().clone()).await;
        call.finish(result)
    }};
}
pub(crate) use observed;

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tracing::Level;

    use super::*;

    /// Log output, kept for the test to read.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("log buffer").extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_store_outage_is_logged_naming_the_call_though_its_span_is_off() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_max_level(Level::INFO)
            .with_ansi(false)
            .finish();
        let metrics = Metrics::new().expect("metrics");
        tracing::subscriber::with_default(subscriber, || {
            let call = RpcCall::start("Begin", &Request::new(()), &metrics);
            call.namespace("payments");
            let status = call.finish::<()>(Err(Error::StoreUnavailable(sqlx::Error::PoolTimedOut))).expect_err("fails");
            assert_eq!(status.code(), tonic::Code::Unavailable);
            assert!(!status.message().contains("pool"), "the cause is logged, not sent: {status:?}");
        });
        let logged = String::from_utf8(captured.0.lock().expect("log buffer").clone()).expect("utf-8");
        assert!(logged.contains("WARN") && logged.contains("store unavailable"), "{logged}");
        assert!(logged.contains(r#"rpc.method="Begin""#), "{logged}");
        assert!(logged.contains(r#"idemd.namespace="payments""#), "{logged}");
        assert!(logged.contains("pool timed out"), "the cause: {logged}");
        assert!(!logged.contains("rpc{"), "no trace exporter: the RPC span is DEBUG: {logged}");
    }
}
