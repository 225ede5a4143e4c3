//! The Rust client: a typed connection to idemd and [`Client::run_once`],
//! which runs an operation exactly once per key and does the protocol's hard
//! parts in one place:
//!
//! `Begin` → **completed**: return the stored response without running;
//! **acquired**: run the operation with the `downstream_key`, heartbeating
//! while it runs, then `Complete` with its response (success or a final
//! failure, both replayed to every retry) or `Abort` on a retryable failure
//! (nothing happened) or an unknown outcome (it may have happened: the abort
//! says so, and the next attempt sees it in [`Attempt::previous`]);
//! **in_progress**: wait (Begin's `wait_timeout`), then retry with backoff
//! and jitter until the budget runs out. Each RPC is retried only on
//! UNAVAILABLE and DEADLINE_EXCEEDED, a bounded number of times, with the
//! same attempt nonce so a lost `Begin` reply cannot orphan a lease.
//!
//! If the caller's task is dropped mid-operation (its process "crashes"),
//! the heartbeats stop with it: they run inside the same future, so the lease
//! expires and the next attempt re-acquires with the same `downstream_key`,
//! its outcome unknown.
//!
//! A provider that deduplicates on `downstream_key` makes that retry safe by
//! itself. For one that does not, [`Client::run_once_with_reconcile`] first
//! asks the provider (a reconcile hook) whenever the previous attempt's
//! outcome is unknown, and stores what it already did instead of doing it
//! again.
//!
//! This crate depends on tonic's client side only; [`pb`] is the contract's
//! generated code (messages and the raw `IdempotencyClient`).

use std::future::Future;
use std::time::{Duration, SystemTime};

use rand::{Rng, RngCore};
use sha2::{Digest, Sha256};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::pb::{begin_response::Outcome, idempotency_client::IdempotencyClient};

/// Code generated from `proto/idemd/v1/idempotency.proto` (client side).
pub mod pb {
    // The proto's comments are prose, not HTML ("subject:<CN or URI SAN>").
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("idemd.v1");

    /// A std duration as a protobuf Duration (saturating).
    pub fn duration(value: std::time::Duration) -> prost_types::Duration {
        prost_types::Duration {
            seconds: i64::try_from(value.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(value.subsec_nanos()).unwrap_or(0),
        }
    }
}

/// The UUIDv5 namespace of [`entity_key`]: UUIDv5(URL, "urn:idemd:key").
/// Keys are the same in every client language.
pub fn entity_key(entity: &str, operation: &str) -> String {
    let namespace = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, b"urn:idemd:key");
    uuid::Uuid::new_v5(&namespace, format!("{operation}\n{entity}").as_bytes()).to_string()
}

/// SHA-256 over a canonical encoding of named request fields: sorted by
/// name, each name and value length-prefixed (u32, big-endian), so field
/// order does not matter and no two different requests collide by
/// concatenation. The same bytes in every client language.
pub fn fingerprint(fields: &[(&str, &[u8])]) -> Vec<u8> {
    let mut sorted: Vec<&(&str, &[u8])> = fields.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut hasher = Sha256::new();
    for (name, value) in sorted {
        hasher.update((name.len() as u32).to_be_bytes());
        hasher.update(name.as_bytes());
        hasher.update((value.len() as u32).to_be_bytes());
        hasher.update(value);
    }
    hasher.finalize().to_vec()
}

/// How [`Client::run_once`] behaves; the defaults suit a payment call.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Lease per attempt; heartbeats renew it every third of it.
    pub lease_ttl: Duration,
    /// How long one Begin waits for a concurrent attempt (server-side).
    pub wait: Duration,
    /// How long `run_once` keeps trying while another attempt holds the key.
    pub in_progress_budget: Duration,
    /// Retries of one RPC on UNAVAILABLE / DEADLINE_EXCEEDED.
    pub rpc_retries: u32,
    /// Per-RPC deadline (Begin adds its wait to it).
    pub rpc_timeout: Duration,
    /// `authorization: Bearer <token>` when idemd runs with auth.
    pub token: Option<String>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            lease_ttl: Duration::from_secs(30),
            wait: Duration::from_secs(5),
            in_progress_budget: Duration::from_secs(60),
            rpc_retries: 5,
            rpc_timeout: Duration::from_secs(5),
            token: None,
        }
    }
}

/// What the operation is told about its attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// Pass it to the payment provider as its idempotency key.
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

/// A stored outcome: what the operation answered, replayed to every retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub body: Vec<u8>,
    /// An application status, e.g. 201 for a charge, 402 for a declined card.
    pub code: i32,
    pub content_type: String,
}

/// How an operation failed.
#[derive(Debug)]
pub enum Failure<E> {
    /// Deterministic (card declined): stored with Complete and replayed.
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

/// The result of a successful `run_once`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    pub response: Response,
    /// True when the operation did not run here: the stored response of an
    /// earlier attempt was replayed.
    pub replayed: bool,
    /// True when the operation did not run here because the reconcile hook
    /// found the provider's result of an earlier attempt (now stored).
    pub reconciled: bool,
    pub attempt: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError<E> {
    /// The operation failed transiently and was aborted; retry later.
    #[error("retryable failure (aborted): {0:?}")]
    Retryable(E),
    /// Aborted with its outcome unknown: the provider may have done it.
    /// Retrying is safe when the provider deduplicates on `downstream_key`
    /// or a reconcile hook looks it up first. Returned for
    /// [`Failure::OutcomeUnknown`], for a failed reconcile hook, and for a
    /// [`Failure::Retryable`] that followed an outcome-unknown attempt
    /// nobody reconciled (the record keeps saying outcome-unknown, and this
    /// error kind always says what the record says).
    #[error("outcome unknown (aborted as outcome-unknown): {0:?}")]
    OutcomeUnknown(E),
    /// Another attempt still holds the key after the in-progress budget.
    #[error("another attempt is still in progress")]
    InProgress,
    /// The key was first used with another request.
    #[error("the key was used with a different request (fingerprint mismatch)")]
    FingerprintMismatch,
    /// The operation ran but its lease was lost before Complete, and no
    /// stored response could be read back: retry (same downstream key).
    #[error("the lease was lost before the outcome was stored; retry")]
    LeaseLost,
    /// idemd failed, or kept failing past the retry budget.
    #[error("idemd: {0}")]
    Rpc(Status),
}

/// How one acquired attempt ends.
enum Step<E> {
    Complete { response: Response, reconciled: bool },
    Abort { reason: &'static str, outcome_unknown: bool, error: E },
}

/// The reconcile hook of a plain `run_once`: never called.
type NoReconcile<E> = fn(Attempt) -> std::future::Ready<Result<Option<Response>, E>>;

fn reason(status: &Status) -> Option<String> {
    use tonic_types::StatusExt;
    status.get_details_error_info().map(|info| info.reason)
}

/// A connection to idemd for one namespace.
#[derive(Debug, Clone)]
pub struct Client {
    grpc: IdempotencyClient<Channel>,
    namespace: String,
    policy: Policy,
}

impl Client {
    pub fn new(channel: Channel, namespace: impl Into<String>, policy: Policy) -> Self {
        Client { grpc: IdempotencyClient::new(channel), namespace: namespace.into(), policy }
    }

    /// Connects lazily to `addr` (e.g. `http://idemd:50051`).
    pub fn connect_lazy(
        addr: &str,
        namespace: impl Into<String>,
        policy: Policy,
    ) -> Result<Self, http::uri::InvalidUri> {
        let channel = Channel::from_shared(addr.to_string())?.connect_timeout(Duration::from_secs(2)).connect_lazy();
        Ok(Client::new(channel, namespace, policy))
    }

    /// The typed stub, for calls `run_once` does not cover.
    pub fn grpc(&self) -> IdempotencyClient<Channel> {
        self.grpc.clone()
    }

    fn request<T>(&self, message: T, timeout: Duration) -> Request<T> {
        let mut request = Request::new(message);
        request.set_timeout(timeout);
        if let Some(token) = &self.policy.token
            && let Ok(value) = format!("Bearer {token}").parse()
        {
            request.metadata_mut().insert("authorization", value);
        }
        request
    }

    /// Retries one RPC on UNAVAILABLE and DEADLINE_EXCEEDED with jittered backoff.
    async fn retrying<T, F, Fut>(&self, mut call: F) -> Result<T, Status>
    where
        F: FnMut(IdempotencyClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut backoff = Duration::from_millis(50);
        let mut tries = 0;
        loop {
            match call(self.grpc.clone()).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status)
                    if matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded)
                        && tries < self.policy.rpc_retries =>
                {
                    tries += 1;
                    tokio::time::sleep(jitter(backoff)).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(status) => return Err(status),
            }
        }
    }

    async fn begin(&self, key: &str, fingerprint: &[u8], nonce: &str, wait: Duration) -> Result<Outcome, Status> {
        let message = pb::BeginRequest {
            namespace: self.namespace.clone(),
            key: key.to_string(),
            fingerprint: fingerprint.to_vec(),
            lease_ttl: Some(pb::duration(self.policy.lease_ttl)),
            wait_timeout: Some(pb::duration(wait)),
            attempt_nonce: nonce.to_string(),
            ..Default::default()
        };
        let timeout = self.policy.rpc_timeout + wait;
        let response = self
            .retrying(|mut grpc| {
                let request = self.request(message.clone(), timeout);
                async move { grpc.begin(request).await }
            })
            .await?;
        response.outcome.ok_or_else(|| Status::internal("Begin answered without an outcome"))
    }

    async fn heartbeats(&self, key: &str, token: &str) {
        let every = self.policy.lease_ttl / 3;
        loop {
            tokio::time::sleep(every).await;
            let message = pb::HeartbeatRequest {
                namespace: self.namespace.clone(),
                key: key.to_string(),
                lease_token: token.to_string(),
                lease_ttl: Some(pb::duration(self.policy.lease_ttl)),
            };
            let timeout = self.policy.rpc_timeout.min(every);
            if let Err(status) = self
                .retrying(|mut grpc| {
                    let request = self.request(message.clone(), timeout);
                    async move { grpc.heartbeat(request).await }
                })
                .await
                && status.code() == Code::FailedPrecondition
            {
                // Lost: Complete will say so; keep the operation running.
                std::future::pending::<()>().await;
            }
        }
    }

    async fn abort(&self, key: &str, token: &str, reason: &str, outcome_unknown: bool) {
        let message = pb::AbortRequest {
            namespace: self.namespace.clone(),
            key: key.to_string(),
            lease_token: token.to_string(),
            reason: reason.to_string(),
            outcome_unknown,
        };
        // LEASE_LOST or an unreachable idemd: the lease ends by itself, and
        // an expired lease always counts as outcome-unknown.
        let _ = self
            .retrying(|mut grpc| {
                let request = self.request(message.clone(), self.policy.rpc_timeout);
                async move { grpc.abort(request).await }
            })
            .await;
    }

    /// Runs `operation` at most once per `key` (in this client's namespace)
    /// and returns its response, or the stored response of the attempt that
    /// ran it. See the module documentation for the protocol.
    ///
    /// For a provider that deduplicates on `downstream_key`. For one that
    /// does not, use [`Client::run_once_with_reconcile`].
    pub async fn run_once<F, Fut, E>(&self, key: &str, fingerprint: &[u8], operation: F) -> Result<Done, RunError<E>>
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
    ///   and the caller gets [`RunError::OutcomeUnknown`].
    ///
    /// `reconcile` is not called on attempt 1 or after an attempt that ended
    /// with nothing done.
    pub async fn run_once_with_reconcile<R, RFut, F, Fut, E>(
        &self,
        key: &str,
        fingerprint: &[u8],
        reconcile: R,
        operation: F,
    ) -> Result<Done, RunError<E>>
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
        reconcile: Option<R>,
        operation: F,
    ) -> Result<Done, RunError<E>>
    where
        R: FnOnce(Attempt) -> RFut,
        RFut: Future<Output = Result<Option<Response>, E>>,
        F: FnOnce(Attempt) -> Fut,
        Fut: Future<Output = Result<Response, Failure<E>>>,
    {
        let nonce = {
            let mut bytes = [0u8; 16];
            rand::rng().fill_bytes(&mut bytes);
            hex::encode(bytes)
        };
        let give_up = tokio::time::Instant::now() + self.policy.in_progress_budget;
        let lease = loop {
            let left = give_up.saturating_duration_since(tokio::time::Instant::now());
            match self.begin(key, fingerprint, &nonce, self.policy.wait.min(left)).await {
                Ok(Outcome::Completed(done)) => return Ok(replay(done)),
                Ok(Outcome::Acquired(lease)) => break lease,
                Ok(Outcome::InProgress(busy)) => {
                    if tokio::time::Instant::now() >= give_up {
                        return Err(RunError::InProgress);
                    }
                    let hint = busy.retry_after.map(from_proto).unwrap_or(Duration::from_millis(200));
                    tokio::time::sleep(jitter(hint)).await;
                }
                Err(status) if reason(&status).as_deref() == Some("FINGERPRINT_MISMATCH") => {
                    return Err(RunError::FingerprintMismatch);
                }
                Err(status) => return Err(RunError::Rpc(status)),
            }
        };
        let attempt = Attempt {
            downstream_key: lease.downstream_key.clone(),
            attempt: lease.attempt,
            previous: lease.previous.as_ref().map(PreviousAttempt::from),
        };
        let step = async {
            // Whether attempt − 1 may have done it and nobody has checked.
            let mut unresolved = attempt.previous.as_ref().is_some_and(|previous| previous.outcome_unknown);
            if unresolved && let Some(reconcile) = reconcile {
                match reconcile(attempt.clone()).await {
                    Ok(Some(response)) => return Step::Complete { response, reconciled: true },
                    Ok(None) => unresolved = false,
                    Err(error) => return Step::Abort { reason: "reconcile failed", outcome_unknown: true, error },
                }
            }
            match operation(attempt).await {
                Ok(response) | Err(Failure::Final(response)) => Step::Complete { response, reconciled: false },
                // Nothing happened here, but an unreconciled earlier attempt
                // may still have: keep the record saying so, or the attempt
                // after this one would skip its reconcile hook.
                Err(Failure::Retryable(error)) if unresolved => Step::Abort {
                    reason: "retryable failure; the previous outcome is unknown",
                    outcome_unknown: true,
                    error,
                },
                Err(Failure::Retryable(error)) => {
                    Step::Abort { reason: "retryable failure", outcome_unknown: false, error }
                }
                Err(Failure::OutcomeUnknown(error)) => {
                    Step::Abort { reason: "outcome unknown", outcome_unknown: true, error }
                }
            }
        };
        // Heartbeats live in this future: if the caller is dropped, they stop.
        let step = tokio::select! {
            step = step => step,
            _ = self.heartbeats(key, &lease.lease_token) => unreachable!("heartbeats never end"),
        };
        let (response, reconciled) = match step {
            Step::Complete { response, reconciled } => (response, reconciled),
            // The caller's error kind says what the record says.
            Step::Abort { reason, outcome_unknown, error } => {
                self.abort(key, &lease.lease_token, reason, outcome_unknown).await;
                return Err(if outcome_unknown { RunError::OutcomeUnknown(error) } else { RunError::Retryable(error) });
            }
        };
        let message = pb::CompleteRequest {
            namespace: self.namespace.clone(),
            key: key.to_string(),
            lease_token: lease.lease_token.clone(),
            response: response.body.clone(),
            response_code: response.code,
            content_type: response.content_type.clone(),
        };
        match self
            .retrying(|mut grpc| {
                let request = self.request(message.clone(), self.policy.rpc_timeout);
                async move { grpc.complete(request).await }
            })
            .await
        {
            Ok(_) => Ok(Done { response, replayed: false, reconciled, attempt: lease.attempt }),
            Err(status) if reason(&status).as_deref() == Some("LEASE_LOST") => {
                // Another attempt took over: replay its result if it stored one.
                match self.begin(key, fingerprint, &nonce, self.policy.wait).await {
                    Ok(Outcome::Completed(done)) => Ok(replay(done)),
                    _ => Err(RunError::LeaseLost),
                }
            }
            Err(status) => Err(RunError::Rpc(status)),
        }
    }
}

fn replay(done: pb::Completed) -> Done {
    Done {
        response: Response { body: done.response, code: done.response_code, content_type: done.content_type },
        replayed: true,
        reconciled: false,
        attempt: done.attempt,
    }
}

/// ±50 % so that retrying callers do not move in lockstep.
fn jitter(base: Duration) -> Duration {
    base.mul_f64(rand::rng().random_range(0.5..1.5))
}

fn from_proto(value: prost_types::Duration) -> Duration {
    Duration::new(value.seconds.max(0).unsigned_abs(), value.nanos.max(0).unsigned_abs())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `clients/testdata/vectors.json`, which every client's tests read.
    fn vectors() -> serde_json::Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/vectors.json");
        let text = std::fs::read_to_string(path).expect("clients/testdata/vectors.json");
        serde_json::from_str(&text).expect("vectors are JSON")
    }

    fn text<'a>(value: &'a serde_json::Value, field: &str) -> &'a str {
        value[field].as_str().expect("a string")
    }

    #[test]
    fn entity_keys_match_the_shared_vectors() {
        let vectors = vectors();
        let cases = vectors["entity_keys"].as_array().expect("entity_keys");
        assert!(!cases.is_empty());
        for case in cases {
            assert_eq!(entity_key(text(case, "entity"), text(case, "operation")), text(case, "key"), "{case}");
        }
    }

    #[test]
    fn fingerprints_match_the_shared_vectors() {
        let vectors = vectors();
        let cases = vectors["fingerprints"].as_array().expect("fingerprints");
        assert!(!cases.is_empty());
        for case in cases {
            let fields: Vec<(&str, &[u8])> = case["fields"]
                .as_object()
                .expect("fields")
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_str().expect("text").as_bytes()))
                .collect();
            assert_eq!(hex::encode(fingerprint(&fields)), text(case, "sha256_hex"), "{case}");
        }
        assert_ne!(fingerprint(&[("a", b"bc")]), fingerprint(&[("ab", b"c")]));
    }
}
