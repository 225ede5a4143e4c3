//! [`Client::run_once`]: an operation at most once per key, and the types it
//! hands to the operation and back to the caller.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::{Duration, SystemTime};

use rand::RngCore;
use tonic::Code;

use crate::client::{Client, check_fingerprint, check_key, check_response, jitter};
use crate::error::{Cause, Error, ErrorKind, reason};
use crate::pb::{self, begin_response::Outcome};

/// What the operation is told about its attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// `idk_` and 32 hex digits: pass it to the payment provider as its
    /// idempotency key. Every attempt of the key gets the same one, so a
    /// provider that deduplicates on it charges once even when an earlier
    /// attempt crashed after charging.
    pub downstream_key: String,
    /// 1, 2, …: a fencing number to forward downstream.
    pub attempt: u32,
    /// How attempt − 1 ended; `None` on attempt 1. When its
    /// `outcome_unknown` is set, the earlier attempt may already have
    /// charged under this same `downstream_key`.
    pub previous: Option<PreviousAttempt>,
}

/// How the attempt before this one ended (idemd's `Acquired.previous`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviousAttempt {
    /// Always the current attempt − 1.
    pub attempt: u32,
    /// Its caller (Abort), the reaper (its lease expired) or an operator.
    pub aborted_by: pb::AbortedBy,
    /// `"lease expired"` for an expired lease, else the reason given.
    pub abort_reason: String,
    /// The side effect may have happened: its caller aborted it as
    /// [`Failure::OutcomeUnknown`], an operator released it so, or its lease
    /// expired.
    pub outcome_unknown: bool,
    /// When it ended (idemd's clock).
    pub ended_at: Option<SystemTime>,
}

impl From<&pb::PreviousAttempt> for PreviousAttempt {
    fn from(previous: &pb::PreviousAttempt) -> Self {
        PreviousAttempt {
            attempt: previous.attempt,
            aborted_by: previous.aborted_by(),
            abort_reason: previous.abort_reason.clone(),
            outcome_unknown: previous.outcome_unknown,
            ended_at: previous.ended_at.and_then(|at| SystemTime::try_from(at).ok()),
        }
    }
}

impl From<&pb::Acquired> for Attempt {
    fn from(lease: &pb::Acquired) -> Self {
        Attempt {
            downstream_key: lease.downstream_key.clone(),
            attempt: lease.attempt,
            previous: lease.previous.as_ref().map(PreviousAttempt::from),
        }
    }
}

/// A stored outcome: what the operation answered, replayed to every retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub body: Vec<u8>,
    /// An application status, e.g. 201 for a charge, 402 for a declined card.
    pub code: i32,
    /// At most 255 bytes, no control characters.
    pub content_type: String,
}

impl Response {
    /// `Response::new(201, charge.to_json(), "application/json")`.
    pub fn new(code: i32, body: impl Into<Vec<u8>>, content_type: impl Into<String>) -> Self {
        Response { body: body.into(), code, content_type: content_type.into() }
    }
}

/// How an operation failed.
#[derive(Debug)]
pub enum Failure<E> {
    /// Deterministic (card declined): stored with Complete and replayed to
    /// every later run, like a success.
    Final(Response),
    /// Nothing happened (503, connection refused, "idempotency key in
    /// use"): aborted, so the caller's retry runs the operation again.
    Retryable(E),
    /// It may or may not have happened: the request left and its answer was
    /// lost (a timeout or a dropped connection after sending). Aborted with
    /// `outcome_unknown`, so the next attempt learns that the provider may
    /// already hold this `downstream_key` (and calls its reconcile hook).
    OutcomeUnknown(E),
}

/// The result of a successful `run_once`: an outcome, run here or replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    pub response: Response,
    /// True when the operation did not run here: the stored response of an
    /// earlier attempt was replayed.
    pub replayed: bool,
    /// True when the operation did not run here because the reconcile hook
    /// found the provider's result of an earlier attempt (now stored).
    pub reconciled: bool,
    /// The attempt that produced the response.
    pub attempt: u32,
}

impl Done {
    /// The stored response, or the caller's own error when it is a final
    /// failure: `final_error` sees every outcome, run here or replayed, and
    /// returns `Some(error)` for a final failure (usually by its code), the
    /// way Stripe's SDKs re-raise a replayed decline as a card error.
    ///
    /// ```
    /// # use idemd_client::{Done, Response};
    /// #[derive(Debug, PartialEq)]
    /// struct CardDeclined(String);
    ///
    /// # let done = Done { response: Response { body: b"insufficient_funds".to_vec(), code: 402, content_type: "text/plain".into() }, replayed: true, reconciled: false, attempt: 1 };
    /// let charge = done.into_result(|stored| {
    ///     (stored.code == 402).then(|| CardDeclined(String::from_utf8_lossy(&stored.body).into_owned()))
    /// });
    /// assert_eq!(charge, Err(CardDeclined("insufficient_funds".into())));
    /// ```
    pub fn into_result<E>(self, final_error: impl FnOnce(&Response) -> Option<E>) -> Result<Response, E> {
        match final_error(&self.response) {
            Some(error) => Err(error),
            None => Ok(self.response),
        }
    }
}

/// How many times one call begins again after its lease was taken over
/// before it gives up with LeaseLost: each loss means another attempt owns
/// the key, and chasing it forever would never return.
const LEASE_LOSSES: u32 = 2;

/// What a round of Begin found: the key is this call's, or already done.
enum Begun {
    Acquired(pb::Acquired),
    Completed(pb::Completed),
}

/// How an acquired attempt's own work ended.
enum Ending<E> {
    Store { response: Response, reconciled: bool },
    Abort { reason: &'static str, outcome_unknown: bool, error: E },
}

/// The reconcile hook of a plain `run_once`: never called.
type NoReconcile<E> = fn(Attempt) -> std::future::Ready<Result<Option<Response>, E>>;

impl Client {
    /// Runs `operation` at most once per `key` (in this client's namespace)
    /// and returns its response, or the stored response of the attempt that
    /// ran it. `fingerprint` identifies the request (at most 64 bytes; see
    /// [`fingerprint`](crate::fingerprint)): a key reused with another one is
    /// [`ErrorKind::FingerprintMismatch`].
    ///
    /// Begin first: a completed key is replayed without running; a key
    /// another attempt holds is waited on ([`Policy::wait`](crate::Policy) per
    /// Begin, then backoff until `in_progress_budget`); an acquired key runs
    /// the operation with heartbeats every third of the lease TTL, then
    /// Complete (a success or [`Failure::Final`]) or Abort (the other
    /// failures). The lease always ends here, never left to expire:
    ///
    /// - a panic of the operation aborts it as outcome-unknown (the helper
    ///   cannot tell whether the provider was called before it), then goes
    ///   on unwinding;
    /// - a `run_once` future dropped while it holds the lease (a timeout
    ///   around it, an aborted task) aborts it as outcome-unknown from a
    ///   task spawned on the current tokio runtime.
    ///
    /// If Complete answers LEASE_LOST (the lease expired or an operator
    /// released it), `run_once` begins again: it returns the winner's stored
    /// result, or, when it gets the same record back, stores the response it
    /// already has under the new attempt (the operation never runs twice in
    /// one call); at most twice more, then [`ErrorKind::LeaseLost`].
    ///
    /// For a provider that deduplicates on `downstream_key`. For one that
    /// does not, use [`Client::run_once_with_reconcile`].
    pub async fn run_once<F, Fut, E>(&self, key: &str, fingerprint: &[u8], operation: F) -> Result<Done, Error<E>>
    where
        F: FnOnce(Attempt) -> Fut,
        Fut: Future<Output = Result<Response, Failure<E>>>,
    {
        self.run(key, fingerprint, None::<NoReconcile<E>>, operation).await
    }

    /// [`Client::run_once`] for a provider that does not deduplicate on
    /// `downstream_key`: when the attempt before this one ended with its
    /// outcome unknown (`attempt.previous` has `outcome_unknown`: it was
    /// aborted as [`Failure::OutcomeUnknown`], its lease expired, or an
    /// operator released it so), `reconcile` runs first, under the lease
    /// and with heartbeats, and asks the provider what it holds for
    /// `attempt.downstream_key`:
    ///
    /// - `Ok(Some(response))`: the earlier attempt did it. The response is
    ///   stored with `Complete` (so give a declined card its 402 here) and
    ///   returned with [`Done::reconciled`]; `operation` does not run.
    /// - `Ok(None)`: it did not; `operation` runs as usual.
    /// - `Err(error)`: the question stays open, so the attempt is aborted
    ///   with `outcome_unknown` still set (the next attempt reconciles again)
    ///   and the call fails with [`ErrorKind::OutcomeUnknown`].
    ///
    /// `reconcile` is not called on attempt 1 or after an attempt that ended
    /// with nothing done. A lookup cannot see a request still in flight at
    /// the provider: let the provider's own request timeout pass since
    /// `previous.ended_at` before you trust an empty answer.
    pub async fn run_once_with_reconcile<R, RFut, F, Fut, E>(
        &self,
        key: &str,
        fingerprint: &[u8],
        reconcile: R,
        operation: F,
    ) -> Result<Done, Error<E>>
    where
        R: FnOnce(Attempt) -> RFut,
        RFut: Future<Output = Result<Option<Response>, E>>,
        F: FnOnce(Attempt) -> Fut,
        Fut: Future<Output = Result<Response, Failure<E>>>,
    {
        self.run(key, fingerprint, Some(reconcile), operation).await
    }

    async fn run<R, RFut, F, Fut, E>(
        &self,
        key: &str,
        fingerprint: &[u8],
        mut reconcile: Option<R>,
        operation: F,
    ) -> Result<Done, Error<E>>
    where
        R: FnOnce(Attempt) -> RFut,
        RFut: Future<Output = Result<Option<Response>, E>>,
        F: FnOnce(Attempt) -> Fut,
        Fut: Future<Output = Result<Response, Failure<E>>>,
    {
        for check in [check_key(key), check_fingerprint(fingerprint), self.policy.check()] {
            check.map_err(|message| Error::invalid(key, message))?;
        }
        let mut operation = Some(operation);
        // What this call's operation (or hook) produced, once it has run,
        // and under which downstream key: kept across a lost lease.
        let mut known: Option<(Response, bool, String)> = None;
        let mut losses = 0;
        loop {
            let lease = match self.acquire(key, fingerprint).await? {
                Begun::Acquired(lease) => lease,
                Begun::Completed(done) => return Ok(replay(done)),
            };
            let mut guard = LeaseGuard::new(self, key, &lease.lease_token);
            let (response, reconciled) = match (&known, operation.take()) {
                (None, Some(operation)) => {
                    match self.attempt(key, &lease, reconcile.take(), operation, &mut guard).await {
                        Ending::Store { response, reconciled } => (response, reconciled),
                        // The caller's error kind always says what the record says.
                        Ending::Abort { reason, outcome_unknown, error } => {
                            self.abort(key, &lease.lease_token, reason, outcome_unknown).await;
                            guard.disarm();
                            let kind = if outcome_unknown { ErrorKind::OutcomeUnknown } else { ErrorKind::Retryable };
                            return Err(Error::new(kind, key, lease.attempt, Cause::Operation(error)));
                        }
                    }
                }
                // The same record again after LEASE_LOST: this call already
                // knows what happened under this downstream key.
                (Some((response, reconciled, downstream_key)), _) if *downstream_key == lease.downstream_key => {
                    (response.clone(), *reconciled)
                }
                _ => {
                    // The record was invalidated (or expired) and replaced
                    // meanwhile: this call's operation did not run for it.
                    self.abort(
                        key,
                        &lease.lease_token,
                        "the record was replaced after this call lost its lease",
                        false,
                    )
                    .await;
                    guard.disarm();
                    let message = "the lease was lost after the operation ran, and the key now names a new record; \
                                   its result was not stored";
                    return Err(Error::new(ErrorKind::LeaseLost, key, lease.attempt, Cause::Message(message.into())));
                }
            };
            if let Err(message) = check_response(&response) {
                self.abort(key, &lease.lease_token, "the operation's response cannot be stored", true).await;
                guard.disarm();
                let cause = Cause::Message(format!("the operation ran but its response cannot be stored: {message}"));
                return Err(Error::new(ErrorKind::OutcomeUnknown, key, lease.attempt, cause));
            }
            match self.complete(key, &lease.lease_token, &response).await {
                Ok(()) => {
                    guard.disarm();
                    return Ok(Done { response, replayed: false, reconciled, attempt: lease.attempt });
                }
                Err(status) if reason(&status).as_deref() == Some("LEASE_LOST") => {
                    guard.disarm();
                    if losses >= LEASE_LOSSES {
                        return Err(Error::new(ErrorKind::LeaseLost, key, lease.attempt, Cause::Status(status)));
                    }
                    losses += 1;
                    known = Some((response, reconciled, lease.downstream_key.clone()));
                }
                Err(status) => {
                    // It happened (or the provider holds it) but is not
                    // stored: the next attempt must reconcile.
                    self.abort(key, &lease.lease_token, "the outcome could not be stored", true).await;
                    guard.disarm();
                    return Err(Error::new(ErrorKind::OutcomeUnknown, key, lease.attempt, Cause::Status(status)));
                }
            }
        }
    }

    /// Begin until the key is acquired or found completed, waiting on
    /// another attempt up to the in-progress budget. One nonce serves every
    /// Begin of the round, so a Begin whose reply was lost and is sent again
    /// gets the same lease back.
    async fn acquire<E>(&self, key: &str, fingerprint: &[u8]) -> Result<Begun, Error<E>> {
        let nonce = {
            let mut bytes = [0u8; 16];
            rand::rng().fill_bytes(&mut bytes);
            hex::encode(bytes)
        };
        let budget = self.policy.in_progress_budget;
        let give_up = tokio::time::Instant::now() + budget;
        loop {
            let left = give_up.saturating_duration_since(tokio::time::Instant::now());
            match self.begin(key, fingerprint, &nonce, self.policy.wait.min(left)).await {
                Ok(Outcome::InProgress(busy)) => {
                    if tokio::time::Instant::now() >= give_up {
                        let message = format!("attempt {} still holds the key after waiting {budget:?}", busy.attempt);
                        return Err(Error::new(ErrorKind::InProgress, key, 0, Cause::Message(message)));
                    }
                    let hint = busy.retry_after.map(from_proto).filter(|hint| !hint.is_zero());
                    let pause = jitter(hint.unwrap_or(Duration::from_millis(200)));
                    tokio::time::sleep(pause.min(give_up.saturating_duration_since(tokio::time::Instant::now()))).await;
                }
                Ok(Outcome::Acquired(lease)) => return Ok(Begun::Acquired(lease)),
                Ok(Outcome::Completed(done)) => return Ok(Begun::Completed(done)),
                Err(status) => {
                    let kind = if reason(&status).as_deref() == Some("FINGERPRINT_MISMATCH") {
                        ErrorKind::FingerprintMismatch
                    } else if status.code() == Code::InvalidArgument {
                        ErrorKind::InvalidArgument
                    } else {
                        ErrorKind::Rpc
                    };
                    return Err(Error::new(kind, key, 0, Cause::Status(status)));
                }
            }
        }
    }

    /// Runs the reconcile hook (when due) and the operation under the
    /// lease, with heartbeats beside them, and says how the attempt ends. A
    /// panic ends the lease (outcome unknown) before it goes on.
    async fn attempt<R, RFut, F, Fut, E>(
        &self,
        key: &str,
        lease: &pb::Acquired,
        reconcile: Option<R>,
        operation: F,
        guard: &mut LeaseGuard,
    ) -> Ending<E>
    where
        R: FnOnce(Attempt) -> RFut,
        RFut: Future<Output = Result<Option<Response>, E>>,
        F: FnOnce(Attempt) -> Fut,
        Fut: Future<Output = Result<Response, Failure<E>>>,
    {
        let attempt = Attempt::from(lease);
        let in_hook = AtomicBool::new(false);
        let work = async {
            // Whether attempt − 1 may have done it and nobody has checked.
            let mut unresolved = attempt.previous.as_ref().is_some_and(|previous| previous.outcome_unknown);
            if unresolved && let Some(reconcile) = reconcile {
                in_hook.store(true, Ordering::Relaxed);
                let found = reconcile(attempt.clone()).await;
                in_hook.store(false, Ordering::Relaxed);
                match found {
                    Ok(Some(response)) => return Ending::Store { response, reconciled: true },
                    Ok(None) => unresolved = false,
                    Err(error) => return Ending::Abort { reason: "reconcile failed", outcome_unknown: true, error },
                }
            }
            match operation(attempt).await {
                Ok(response) | Err(Failure::Final(response)) => Ending::Store { response, reconciled: false },
                // Nothing happened here, but an unreconciled earlier attempt
                // may still have: keep the record saying so, or the attempt
                // after this one would skip its reconcile hook.
                Err(Failure::Retryable(error)) if unresolved => Ending::Abort {
                    reason: "retryable failure; the previous outcome is unknown",
                    outcome_unknown: true,
                    error,
                },
                Err(Failure::Retryable(error)) => {
                    Ending::Abort { reason: "retryable failure", outcome_unknown: false, error }
                }
                Err(Failure::OutcomeUnknown(error)) => {
                    Ending::Abort { reason: "outcome unknown", outcome_unknown: true, error }
                }
            }
        };
        // Heartbeats live in this future: they end with the work, also when
        // the caller drops it.
        let ended = tokio::select! {
            ended = catch_unwind(work) => ended,
            never = self.heartbeats(key, &lease.lease_token) => match never {},
        };
        match ended {
            Ok(ending) => ending,
            Err(panic) => {
                let reason = if in_hook.load(Ordering::Relaxed) {
                    "the reconcile hook panicked"
                } else {
                    "the operation panicked"
                };
                self.abort(key, &lease.lease_token, reason, true).await;
                guard.disarm();
                std::panic::resume_unwind(panic)
            }
        }
    }
}

/// Ends a held lease as outcome-unknown when the `run_once` future holding
/// it is dropped (a timeout around the call, an aborted task): the key is
/// free at once instead of after the lease TTL. Disarmed whenever the call
/// ends the lease itself.
struct LeaseGuard {
    held: Option<(Client, String, String)>,
}

impl LeaseGuard {
    fn new(client: &Client, key: &str, token: &str) -> Self {
        LeaseGuard { held: Some((client.clone(), key.to_string(), token.to_string())) }
    }

    fn disarm(&mut self) {
        self.held = None;
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        // Without a runtime (it is shutting down) the lease expires by
        // itself, which idemd records as outcome-unknown too.
        if let Some((client, key, token)) = self.held.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                client.abort(&key, &token, "the caller stopped waiting while the operation ran", true).await;
            });
        }
    }
}

/// Polls `future`, catching a panic so that the lease can be ended before
/// the panic goes on.
async fn catch_unwind<T>(future: impl Future<Output = T>) -> Result<T, Box<dyn Any + Send>> {
    let mut future = pin!(future);
    std::future::poll_fn(move |cx| match std::panic::catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx))) {
        Ok(Poll::Ready(value)) => Poll::Ready(Ok(value)),
        Ok(Poll::Pending) => Poll::Pending,
        Err(panic) => Poll::Ready(Err(panic)),
    })
    .await
}

fn replay(done: pb::Completed) -> Done {
    Done {
        response: Response { body: done.response, code: done.response_code, content_type: done.content_type },
        replayed: true,
        reconciled: false,
        attempt: done.attempt,
    }
}

fn from_proto(value: prost_types::Duration) -> Duration {
    Duration::new(value.seconds.max(0).unsigned_abs(), value.nanos.max(0).unsigned_abs())
}
