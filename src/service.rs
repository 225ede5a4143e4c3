//! The `idemd.v1.Idempotency` service: decode → validate → one store call →
//! encode. No transition is decided here; Begin's waiting (`wait_timeout`)
//! is the only logic, and it only re-runs the store's atomic Begin.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::auth::Principal;
use crate::config::{MAX_LEASE_TTL, MAX_WAIT_TIMEOUT, MIN_LEASE_TTL, ServeConfig};
use crate::deadline::{Deadline, arrived_at, wait_until};
use crate::domain::{
    self, BeginOutcome, CompleteRequest, MAX_CONTENT_TYPE_LEN, MAX_NONCE_LEN, MAX_REASON_LEN, Namespace, RecordId,
    check_fingerprint, check_lease_token, check_text,
};
use crate::error::{Error, Result};
use crate::limits::{RateLimiter, WaiterLimits};
use crate::metrics::Metrics;
use crate::observe::{Reply, RpcCall, observed};
use crate::pb;
use crate::store::Store;
use crate::telemetry::traced_span;
use crate::wakeups::Wakeups;
use crate::wire::{Addressed, duration_in, encode_begin, encode_record, timestamp};

/// A waiter re-checks its key about this often even without a wake-up: the
/// safety net under the notifications, which are reliable on their own
/// (in-process on SQLite; on Postgres a listener that loses its connection,
/// or stops answering its liveness check, wakes every waiter). Rare, because
/// every re-check is a statement: 10,000 waiters at 2 s were 5,000
/// statements a second. Each waiter's interval is jittered by ±25 %.
pub const WAITER_POLL: Duration = Duration::from_secs(20);
/// The same when no notification can arrive from other replicas (a
/// transaction pooler and no direct connection for LISTEN): the re-check is
/// then how a waiter learns of another replica's Complete.
pub const POLLING_WAITER_INTERVAL: Duration = Duration::from_millis(250);

/// What the service needs from the configuration.
#[derive(Debug, Clone)]
pub struct Limits {
    pub default_lease_ttl: Duration,
    pub default_retention: Duration,
    pub min_retention: Duration,
    pub max_retention: Duration,
    pub max_response_bytes: usize,
    pub store_timeout: Duration,
    /// Every call must carry credentials (`--auth-tokens-file` is set).
    pub auth_required: bool,
    pub max_waiters: usize,
    pub max_waiters_per_namespace: usize,
    pub max_waiters_per_credential: usize,
    pub rate_limit_per_namespace: u32,
    pub rate_limit_per_credential: u32,
    /// How often a parked waiter re-checks its key without a wake-up.
    pub waiter_poll: Duration,
    /// Store calls in progress at once: enough to keep every pooled
    /// connection (and group commit's batches) busy, few enough that a
    /// burst waits as small handlers rather than as queued store futures.
    pub store_concurrency: usize,
}

impl From<&ServeConfig> for Limits {
    fn from(config: &ServeConfig) -> Self {
        Limits {
            default_lease_ttl: config.default_lease_ttl,
            default_retention: config.default_retention,
            min_retention: config.min_retention,
            max_retention: config.max_retention,
            max_response_bytes: config.max_response_bytes,
            store_timeout: config.database.store_timeout,
            auth_required: config.auth_tokens_file.is_some(),
            max_waiters: config.max_waiters,
            max_waiters_per_namespace: config.max_waiters_per_namespace,
            max_waiters_per_credential: config.max_waiters_per_credential(),
            rate_limit_per_namespace: config.rate_limit_per_namespace,
            rate_limit_per_credential: config.rate_limit_per_credential(),
            waiter_poll: WAITER_POLL,
            store_concurrency: store_concurrency(&config.database),
        }
    }
}

/// Store calls admitted at once: eight per pooled connection (a call also
/// spends time outside the database: the pool, decoding, group commit's
/// queue), and never fewer than a full group commit batch in the database
/// and one gathering, per batch in flight and kind.
pub fn store_concurrency(database: &crate::config::DatabaseConfig) -> usize {
    let per_connection = database.db_max_connections as usize * 8;
    per_connection.max(database.group_commit_max_batch * 4 * database.group_commit_in_flight)
}

pub struct IdempotencyService<S> {
    store: S,
    wakeups: Arc<Wakeups>,
    metrics: Arc<Metrics>,
    limits: Limits,
    waiter_limits: Arc<WaiterLimits>,
    rate_limiter: Option<RateLimiter>,
    credential_rate_limiter: Option<RateLimiter>,
    /// Store calls in progress at once (see `bounded`).
    store_slots: tokio::sync::Semaphore,
    /// Cancelled when shutdown begins: parked waiters answer at once instead
    /// of holding the drain for up to a minute.
    stop_waiting: CancellationToken,
}

impl<S: Store> IdempotencyService<S> {
    pub fn new(
        store: S,
        wakeups: Arc<Wakeups>,
        metrics: Arc<Metrics>,
        limits: Limits,
        stop_waiting: CancellationToken,
    ) -> Self {
        let waiter_limits =
            WaiterLimits::new(limits.max_waiters, limits.max_waiters_per_namespace, limits.max_waiters_per_credential);
        let rate_limiter = RateLimiter::new(limits.rate_limit_per_namespace, "this namespace");
        let credential_rate_limiter = RateLimiter::new(limits.rate_limit_per_credential, "these credentials");
        let store_slots = tokio::sync::Semaphore::new(limits.store_concurrency);
        IdempotencyService {
            store,
            wakeups,
            metrics,
            limits,
            waiter_limits,
            rate_limiter,
            credential_rate_limiter,
            store_slots,
            stop_waiting,
        }
    }

    /// After the fields are valid and before the store: is this caller
    /// granted the namespace, and within its rate? The answer never depends
    /// on whether the key exists.
    fn admit(&self, principal: Option<&Principal>, namespace: &Namespace, grant: Grant) -> Result<()> {
        match principal {
            Some(principal) => grant(principal, namespace)?,
            // Fail closed: with auth on, a request the interceptor did not mark is refused.
            None if self.limits.auth_required => return Err(Error::Unauthenticated),
            None => {}
        }
        if let Some(limiter) = &self.rate_limiter {
            limiter.check(namespace.as_str())?;
        }
        if let (Some(limiter), Some(principal)) = (&self.credential_rate_limiter, principal) {
            limiter.check(principal.name())?;
        }
        Ok(())
    }

    /// Bounds one store call by `--store-timeout` and the caller's deadline,
    /// in a child span named after the store method. A call cut short may
    /// still take effect in the database: the caller gets an error and must
    /// not proceed (fail closed).
    ///
    /// At most `store_slots` calls are in the store at once; the others wait
    /// here (within the same bounds) before their store future exists. A
    /// burst of thousands of Begins then costs thousands of small waiting
    /// handlers, not thousands of large store futures queued for a
    /// connection. The future is boxed for the same
    /// reason: a Begin parked between calls carries a pointer, not room for it.
    async fn bounded<T, F: Future<Output = Result<T>>>(
        &self,
        operation: &'static str,
        deadline: Option<Instant>,
        call: impl FnOnce() -> F,
    ) -> Result<T> {
        let span = traced_span!("store", otel.name = store_span_name(operation), db.operation = operation);
        let store_limit = Instant::now() + self.limits.store_timeout;
        let (limit, callers_deadline) = match deadline {
            Some(deadline) if deadline < store_limit => (deadline, true),
            _ => (store_limit, false),
        };
        let run = async {
            let _slot = self.store_slots.acquire().await.map_err(|_| Error::Internal("store slots closed".into()))?;
            Box::pin(call()).await
        };
        let result = tokio::time::timeout_at(limit, run).instrument(span).await.unwrap_or(Err(if callers_deadline {
            Error::DeadlineExceeded
        } else {
            Error::StoreTimeout
        }));
        if let Err(error) = &result {
            self.metrics.store_error(error);
        }
        result
    }

    /// Re-runs the atomic Begin while the key is held by a live lease, until
    /// it is completed, acquired, or the wait (bounded by the deadline) ends.
    async fn begin_and_wait(
        &self,
        call: &RpcCall,
        request: &domain::BeginRequest,
        principal: Option<&Principal>,
        wait_until: Option<Instant>,
        deadline: Option<Instant>,
    ) -> Result<BeginOutcome> {
        let Some(wait_until) = wait_until else {
            return self.bounded("begin", deadline, || self.store.begin(request)).await;
        };
        // Subscribed before the first attempt: a wake-up between the attempt
        // and the wait is not lost.
        let mut subscription = self.wakeups.subscribe(&request.id);
        let mut parked = None;
        let mut watched = None;
        loop {
            let outcome = self.bounded("begin", deadline, || self.store.begin(request)).await?;
            let BeginOutcome::InProgress(busy) = &outcome else {
                return Ok(outcome);
            };
            let now = Instant::now();
            if now >= wait_until || self.stop_waiting.is_cancelled() {
                return Ok(outcome);
            }
            if parked.is_none() {
                parked = Some((self.waiter_limits.admit(&request.id.namespace, principal)?, self.metrics.waiting()));
                call.parked();
            }
            // The transition that ends this attempt wakes us only if it finds
            // the attempt marked as awaited; if it already ended, look again.
            // (Without LISTEN, other replicas' transitions reach nobody here.)
            if self.store.wakes_waiters() && watched != Some(busy.attempt) {
                if !self.bounded("watch", deadline, || self.store.watch(&request.id, busy.attempt)).await? {
                    continue;
                }
                watched = Some(busy.attempt);
            }
            // Wake at the latest when the holder's lease runs out (it may be
            // taken over then), or for the periodic re-check.
            let lease_end = now + busy.lease_remaining + Duration::from_millis(1);
            let poll = self.limits.waiter_poll.mul_f64(rand::random_range(0.75..1.25));
            let recheck = wait_until.min(lease_end).min(now + poll);
            tokio::select! {
                _ = subscription.woken() => {}
                _ = tokio::time::sleep_until(recheck) => {}
                _ = self.stop_waiting.cancelled() => {}
            }
        }
    }
}

/// Who a transition is recorded as done by: the credential's name, or `""`
/// with auth off.
pub(crate) fn principal_name(principal: Option<&Principal>) -> String {
    principal.map(|principal| principal.name().to_string()).unwrap_or_default()
}

/// `store.<operation>`, without an allocation per call.
fn store_span_name(operation: &'static str) -> &'static str {
    match operation {
        "begin" => "store.begin",
        "complete" => "store.complete",
        "abort" => "store.abort",
        "heartbeat" => "store.heartbeat",
        "lookup" => "store.lookup",
        "watch" => "store.watch",
        _ => "store",
    }
}

fn lease_ttl(value: Option<&prost_types::Duration>, limits: &Limits) -> Result<Duration> {
    duration_in("lease_ttl", value, limits.default_lease_ttl, MIN_LEASE_TTL, MAX_LEASE_TTL)
}

/// A Begin checked and ready for the store: all a Begin's future holds
/// while it waits for its key.
struct PreparedBegin {
    request: domain::BeginRequest,
    /// Whose waiter limits a wait counts against.
    principal: Option<Principal>,
    wait_until: Option<Instant>,
    deadline: Option<Instant>,
}

/// Which grant a method needs: the Idempotency service's, or for Lookup
/// either that or an admin grant.
type Grant = fn(&Principal, &Namespace) -> Result<()>;

/// A request past the prologue every call shares: the caller, its
/// deadline and the record are known, the method's own fields are checked,
/// and the caller may use the namespace at its rates.
struct Checked<T> {
    id: RecordId,
    principal: Option<Principal>,
    arrived: Instant,
    deadline: Option<Deadline>,
    /// What the method made of its own fields.
    fields: T,
}

impl<T> Checked<T> {
    /// By when the store must have answered.
    fn answer_by(&self) -> Option<Instant> {
        self.deadline.map(|deadline| deadline.answer_by)
    }
}

impl<S: Store> IdempotencyService<S> {
    /// The prologue of every call, in the contract's order: credentials (the
    /// interceptor checked them and named the principal), the record id and
    /// then the method's own fields (INVALID_ARGUMENT), then the namespace
    /// grant and rates (PERMISSION_DENIED, RESOURCE_EXHAUSTED). Nothing here
    /// depends on whether the key exists.
    fn prologue<M: Addressed, T>(
        &self,
        call: &RpcCall,
        request: Request<M>,
        grant: Grant,
        fields: impl FnOnce(M) -> Result<T>,
    ) -> Result<Checked<T>> {
        let (arrived, deadline) = (arrived_at(&request), Deadline::of(&request));
        let principal = request.extensions().get::<Principal>().cloned();
        let mut message = request.into_inner();
        let (namespace, key) = message.take_id();
        let id = RecordId::parse(namespace, key)?;
        call.namespace(id.namespace.as_str());
        let fields = fields(message)?;
        self.admit(principal.as_ref(), &id.namespace, grant)?;
        Ok(Checked { id, principal, arrived, deadline, fields })
    }

    /// Everything Begin checks before it touches the store, done before its
    /// future exists.
    fn prepare_begin(&self, call: &RpcCall, request: Request<pb::BeginRequest>) -> Result<PreparedBegin> {
        let limits = &self.limits;
        let checked = self.prologue(call, request, Principal::check, |message| {
            check_fingerprint(&message.fingerprint)?;
            let lease_ttl = lease_ttl(message.lease_ttl.as_ref(), limits)?;
            let retention = duration_in(
                "retention",
                message.retention.as_ref(),
                limits.default_retention,
                limits.min_retention,
                limits.max_retention,
            )?;
            let wait = duration_in(
                "wait_timeout",
                message.wait_timeout.as_ref(),
                Duration::ZERO,
                Duration::ZERO,
                MAX_WAIT_TIMEOUT,
            )?;
            check_text("attempt_nonce", &message.attempt_nonce, MAX_NONCE_LEN, true)?;
            Ok((message, lease_ttl, retention, wait))
        })?;
        let answer_by = checked.answer_by();
        let Checked { id, principal, arrived, deadline, fields: (message, lease_ttl, retention, wait) } = checked;
        let request = domain::BeginRequest {
            id,
            fingerprint: message.fingerprint,
            lease_ttl,
            retention,
            attempt_nonce: (!message.attempt_nonce.is_empty()).then_some(message.attempt_nonce),
            principal: principal_name(principal.as_ref()),
        };
        Ok(PreparedBegin { request, principal, wait_until: wait_until(arrived, wait, deadline), deadline: answer_by })
    }

    async fn run_begin(&self, call: &RpcCall, begin: &PreparedBegin) -> Result<Reply<pb::BeginResponse>> {
        let outcome = self
            .begin_and_wait(call, &begin.request, begin.principal.as_ref(), begin.wait_until, begin.deadline)
            .await?;
        let (label, attempt) = match &outcome {
            BeginOutcome::Acquired(lease) => ("acquired", lease.attempt),
            BeginOutcome::Completed(stored) => ("completed", stored.attempt),
            BeginOutcome::InProgress(busy) => ("in_progress", busy.attempt),
        };
        Ok(Reply { message: encode_begin(outcome), outcome: label, attempt: Some(attempt) })
    }

    async fn complete_call(
        &self,
        call: &RpcCall,
        request: Request<pb::CompleteRequest>,
    ) -> Result<Reply<pb::CompleteResponse>> {
        let max_response_bytes = self.limits.max_response_bytes;
        let checked = self.prologue(call, request, Principal::check, |message| {
            check_lease_token(&message.lease_token)?;
            if message.response.len() > max_response_bytes {
                return Err(Error::invalid("response", format!("response is longer than {max_response_bytes} bytes")));
            }
            check_text("content_type", &message.content_type, MAX_CONTENT_TYPE_LEN, true)?;
            Ok(message)
        })?;
        let answer_by = checked.answer_by();
        let message = checked.fields;
        let request = CompleteRequest {
            id: checked.id,
            lease_token: message.lease_token,
            response: message.response,
            response_code: message.response_code,
            content_type: message.content_type,
            principal: principal_name(checked.principal.as_ref()),
        };
        let completion = self.bounded("complete", answer_by, || self.store.complete(&request)).await?;
        Ok(Reply {
            message: pb::CompleteResponse {
                completed_at: Some(timestamp(completion.completed_at)),
                expires_at: Some(timestamp(completion.expires_at)),
            },
            outcome: "completed",
            attempt: None,
        })
    }

    async fn abort_call(&self, call: &RpcCall, request: Request<pb::AbortRequest>) -> Result<Reply<pb::AbortResponse>> {
        let checked = self.prologue(call, request, Principal::check, |message| {
            check_lease_token(&message.lease_token)?;
            check_text("reason", &message.reason, MAX_REASON_LEN, false)?;
            if message.reason.contains('\0') {
                return Err(Error::invalid("reason", "reason contains a NUL character"));
            }
            Ok(message)
        })?;
        let answer_by = checked.answer_by();
        let request = domain::AbortRequest {
            principal: principal_name(checked.principal.as_ref()),
            id: checked.id,
            lease_token: checked.fields.lease_token,
            reason: checked.fields.reason,
            outcome_unknown: checked.fields.outcome_unknown,
        };
        self.bounded("abort", answer_by, || self.store.abort(&request)).await?;
        Ok(Reply { message: pb::AbortResponse {}, outcome: "aborted", attempt: None })
    }

    async fn heartbeat_call(
        &self,
        call: &RpcCall,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Reply<pb::HeartbeatResponse>> {
        let limits = &self.limits;
        let checked = self.prologue(call, request, Principal::check, |message| {
            check_lease_token(&message.lease_token)?;
            let lease_ttl = lease_ttl(message.lease_ttl.as_ref(), limits)?;
            Ok((message.lease_token, lease_ttl))
        })?;
        let (id, (lease_token, lease_ttl)) = (&checked.id, &checked.fields);
        let lease_expires_at = self
            .bounded("heartbeat", checked.answer_by(), || self.store.heartbeat(id, lease_token, *lease_ttl))
            .await?;
        Ok(Reply {
            message: pb::HeartbeatResponse { lease_expires_at: Some(timestamp(lease_expires_at)) },
            outcome: "extended",
            attempt: None,
        })
    }

    async fn lookup_call(
        &self,
        call: &RpcCall,
        request: Request<pb::LookupRequest>,
    ) -> Result<Reply<pb::LookupResponse>> {
        let checked = self.prologue(call, request, Principal::check_lookup, |_| Ok(()))?;
        let record = self.bounded("lookup", checked.answer_by(), || self.store.lookup(&checked.id)).await?;
        let attempt = record.attempt;
        Ok(Reply {
            message: pb::LookupResponse { record: Some(encode_record(record)) },
            outcome: "found",
            attempt: Some(attempt),
        })
    }
}

#[tonic::async_trait]
impl<S: Store> pb::idempotency_server::Idempotency for IdempotencyService<S> {
    /// Begin is checked before its wait starts: what stays for the wait is
    /// the checked request, not the raw one.
    async fn begin(&self, request: Request<pb::BeginRequest>) -> Result<Response<pb::BeginResponse>, Status> {
        let call = RpcCall::start("Begin", &request, &self.metrics);
        let begin = match call.span().in_scope(|| self.prepare_begin(&call, request)) {
            Ok(begin) => begin,
            Err(error) => return call.finish(Err(error)),
        };
        let result = self.run_begin(&call, &begin).instrument(call.span().clone()).await;
        call.finish(result)
    }

    async fn complete(&self, request: Request<pb::CompleteRequest>) -> Result<Response<pb::CompleteResponse>, Status> {
        observed!(self, "Complete", complete_call, request)
    }

    async fn abort(&self, request: Request<pb::AbortRequest>) -> Result<Response<pb::AbortResponse>, Status> {
        observed!(self, "Abort", abort_call, request)
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        observed!(self, "Heartbeat", heartbeat_call, request)
    }

    async fn lookup(&self, request: Request<pb::LookupRequest>) -> Result<Response<pb::LookupResponse>, Status> {
        observed!(self, "Lookup", lookup_call, request)
    }
}
