//! What every RPC reports: one span (parented on the caller's W3C trace
//! context) with the attributes operators filter on, and its request count
//! and latency. Never a key, a payload or a lease token.

use std::sync::Arc;

use tokio::time::Instant;
use tonic::{Request, Response, Status};
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::error::Error;
use crate::metrics::Metrics;
use crate::pb::SERVICE_NAME;
use crate::telemetry::remote_context;

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
    started: Instant,
    metrics: Arc<Metrics>,
}

impl RpcCall {
    pub fn start<T>(method: &'static str, request: &Request<T>, metrics: &Arc<Metrics>) -> Self {
        let span = tracing::info_span!(
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
        span.set_attribute("rpc.service", SERVICE_NAME);
        RpcCall { method, span, started: Instant::now(), metrics: Arc::clone(metrics) }
    }

    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    /// Records the namespace once it is known to be valid (bounded in size).
    pub fn namespace(&self, namespace: &str) {
        self.span.record("idemd.namespace", namespace);
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
                let outcome = outcome_of_error(&error);
                let status = self.span.in_scope(|| Status::from(error));
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
        self.metrics.rpc(self.method, code, self.started.elapsed());
        answer
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
        _ => SERVICE_NAME,
    }
}

fn outcome_of_error(error: &Error) -> &'static str {
    match error {
        Error::InvalidField { .. } => "invalid_field",
        Error::FingerprintMismatch => "fingerprint_mismatch",
        Error::LeaseLost => "lease_lost",
        Error::NotFound => "not_found",
        Error::StoreUnavailable(_) | Error::StoreTimeout | Error::Contention(_) => "store_unavailable",
        Error::DeadlineExceeded => "deadline_exceeded",
        Error::Unauthenticated => "unauthenticated",
        Error::NamespaceDenied => "namespace_denied",
        Error::TooManyWaiters(_) => "too_many_waiters",
        Error::RateLimited => "rate_limited",
        Error::Internal(_) => "internal",
    }
}
