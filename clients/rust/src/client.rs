//! The connection to idemd for one namespace: its settings ([`Policy`]),
//! the checks of API.md's field rules made before any call, and the RPCs
//! `run_once` is built from, each retried on UNAVAILABLE and
//! DEADLINE_EXCEEDED.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use rand::Rng;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use crate::error::Error;
use crate::pb::{self, begin_response::Outcome, idempotency_client::IdempotencyClient};

const MIN_LEASE_TTL: Duration = Duration::from_secs(1);
const MAX_LEASE_TTL: Duration = Duration::from_secs(3600);
const MAX_WAIT: Duration = Duration::from_secs(60);

/// How calls behave; the defaults suit a payment call. A client's policy is
/// the default of its calls; [`Client::with_policy`] changes it for some.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Lease of each attempt, 1 s to 1 h: how long a crashed caller blocks
    /// the key (heartbeats renew it every third of it while the operation
    /// runs, so it does not bound the operation).
    pub lease_ttl: Duration,
    /// How long the outcome is kept and replayed; `None` takes the server's
    /// default (24 h). Within the server's range ([24 h, 30 d] unless
    /// configured otherwise); make it longer than your callers' retry window.
    pub retention: Option<Duration>,
    /// How long one Begin waits server-side for a concurrent attempt on the
    /// same key, 0 to 60 s.
    pub wait: Duration,
    /// How long `run_once` keeps waiting in all while another attempt holds
    /// the key, then [`ErrorKind::InProgress`](crate::ErrorKind::InProgress).
    pub in_progress_budget: Duration,
    /// Retries of one RPC on UNAVAILABLE / DEADLINE_EXCEEDED, with jittered
    /// exponential backoff.
    pub rpc_retries: u32,
    /// Deadline of one RPC (Begin adds its wait to it).
    pub rpc_timeout: Duration,
    /// `authorization: Bearer <token>` on every call, when idemd runs with
    /// a tokens file.
    pub token: Option<String>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            lease_ttl: Duration::from_secs(30),
            retention: None,
            wait: Duration::from_secs(5),
            in_progress_budget: Duration::from_secs(60),
            rpc_retries: 5,
            rpc_timeout: Duration::from_secs(5),
            token: None,
        }
    }
}

impl Policy {
    /// What idemd (or the client) would refuse, in words naming the setting.
    pub(crate) fn check(&self) -> Result<(), String> {
        if !(MIN_LEASE_TTL..=MAX_LEASE_TTL).contains(&self.lease_ttl) {
            return Err(format!("lease_ttl {:?}: must be 1s to 1h", self.lease_ttl));
        }
        if self.retention.is_some_and(|retention| retention.is_zero()) {
            return Err("retention 0s: must be positive (None: the server's default)".into());
        }
        if self.wait > MAX_WAIT {
            return Err(format!("wait {:?}: must be 0 to 60s", self.wait));
        }
        if self.rpc_timeout.is_zero() {
            return Err("rpc_timeout 0s: must be positive".into());
        }
        if let Some(token) = &self.token
            && (token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err("token: must be non-empty printable ASCII without spaces".into());
        }
        Ok(())
    }
}

/// A connection to idemd for one namespace. Cheap to clone (clones share
/// the connection); make one per process and namespace.
#[derive(Debug, Clone)]
pub struct Client {
    pub(crate) grpc: IdempotencyClient<Channel>,
    pub(crate) namespace: String,
    pub(crate) policy: Policy,
}

impl Client {
    /// A client on a channel you built (TLS, a custom connector). The
    /// namespace (1-64 characters of `[a-z0-9._-]`) and the policy are
    /// checked here: an error is [`ErrorKind::InvalidArgument`](crate::ErrorKind::InvalidArgument).
    pub fn new(channel: Channel, namespace: impl Into<String>, policy: Policy) -> Result<Self, Error> {
        let namespace = namespace.into();
        check_namespace(&namespace).map_err(|message| Error::invalid("", message))?;
        policy.check().map_err(|message| Error::invalid("", message))?;
        Ok(Client { grpc: IdempotencyClient::new(channel), namespace, policy })
    }

    /// Connects lazily (at the first call) to idemd at `addr`:
    /// `host:port` or `http://host:port`. Call it inside a tokio runtime
    /// (the connection's background task lives there). For TLS
    /// (`https://`), build the channel with tonic's TLS features and use
    /// [`Client::new`].
    pub fn connect_lazy(addr: &str, namespace: impl Into<String>, policy: Policy) -> Result<Self, Error> {
        let endpoint = endpoint(addr).map_err(|message| Error::invalid("", message))?;
        Client::new(endpoint.connect_lazy(), namespace, policy)
    }

    /// This client with another policy for the calls made through it: a
    /// cheap copy sharing the connection. Checked at each call.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use idemd_client::{Client, Policy};
    /// /// For calls whose callers retry for up to a month.
    /// fn kept_a_month(client: &Client) -> Client {
    ///     client.with_policy(Policy { retention: Some(Duration::from_secs(30 * 86_400)), ..client.policy().clone() })
    /// }
    /// ```
    pub fn with_policy(&self, policy: Policy) -> Self {
        Client { policy, ..self.clone() }
    }

    /// The namespace every call of this client uses.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The typed stub, for calls `run_once` does not cover (Lookup). It does
    /// not add the policy's token.
    pub fn grpc(&self) -> IdempotencyClient<Channel> {
        self.grpc.clone()
    }

    fn request<T>(&self, message: T, timeout: Duration) -> Request<T> {
        let mut request = Request::new(message);
        request.set_timeout(timeout);
        // Checked to be printable ASCII, which always parses.
        if let Some(token) = &self.policy.token
            && let Ok(value) = format!("Bearer {token}").parse()
        {
            request.metadata_mut().insert("authorization", value);
        }
        request
    }

    /// One RPC, retried on UNAVAILABLE and DEADLINE_EXCEEDED with jittered
    /// backoff. A request is retried as is: Begin with the same attempt
    /// nonce gets the same lease back, and Complete, Abort and Heartbeat are
    /// idempotent for the same lease token.
    async fn retrying<T, F, Fut>(&self, mut call: F) -> Result<T, Status>
    where
        F: FnMut(IdempotencyClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut backoff = Duration::from_millis(50);
        let mut tries = 0;
        loop {
            match call(self.grpc.clone()).await.map_err(unavailable_if_transport) {
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

    pub(crate) async fn begin(
        &self,
        key: &str,
        fingerprint: &[u8],
        nonce: &str,
        wait: Duration,
    ) -> Result<Outcome, Status> {
        let message = pb::BeginRequest {
            namespace: self.namespace.clone(),
            key: key.to_string(),
            fingerprint: fingerprint.to_vec(),
            lease_ttl: Some(pb::duration(self.policy.lease_ttl)),
            wait_timeout: Some(pb::duration(wait)),
            attempt_nonce: nonce.to_string(),
            retention: self.policy.retention.map(pb::duration),
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

    /// Renews the lease every third of its TTL, forever: it runs beside the
    /// operation and ends when that does. A lost lease stops the renewals;
    /// Complete will report it.
    pub(crate) async fn heartbeats(&self, key: &str, token: &str) -> Infallible {
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
                && matches!(status.code(), Code::FailedPrecondition | Code::NotFound)
            {
                std::future::pending::<()>().await;
            }
        }
    }

    pub(crate) async fn complete(&self, key: &str, token: &str, response: &crate::Response) -> Result<(), Status> {
        let message = pb::CompleteRequest {
            namespace: self.namespace.clone(),
            key: key.to_string(),
            lease_token: token.to_string(),
            response: response.body.clone(),
            response_code: response.code,
            content_type: response.content_type.clone(),
        };
        self.retrying(|mut grpc| {
            let request = self.request(message.clone(), self.policy.rpc_timeout);
            async move { grpc.complete(request).await }
        })
        .await
        .map(drop)
    }

    /// Ends the lease. Its failure is not reported: LEASE_LOST means the
    /// lease already ended, and if idemd is unreachable the lease expires by
    /// itself, which idemd records as outcome-unknown anyway.
    pub(crate) async fn abort(&self, key: &str, token: &str, reason: &str, outcome_unknown: bool) {
        let message = pb::AbortRequest {
            namespace: self.namespace.clone(),
            key: key.to_string(),
            lease_token: token.to_string(),
            reason: reason.to_string(),
            outcome_unknown,
        };
        let _ = self
            .retrying(|mut grpc| {
                let request = self.request(message.clone(), self.policy.rpc_timeout);
                async move { grpc.abort(request).await }
            })
            .await;
    }
}

/// A call that failed in the transport (a connection that broke, e.g. to a
/// server that stopped) as UNAVAILABLE, the code gRPC gives it elsewhere:
/// tonic reports it as UNKNOWN "transport error", which would neither be
/// retried nor tell the caller what happened. idemd never answered it, so a
/// retry is safe (every idemd RPC is idempotent when retried as is).
fn unavailable_if_transport(status: Status) -> Status {
    let mut source = std::error::Error::source(&status);
    while let Some(error) = source {
        if error.is::<tonic::transport::Error>() {
            return Status::unavailable(format!("{}: {error}", status.message()));
        }
        source = error.source();
    }
    status
}

/// `host:port` or `http://host:port` (a trailing `/` is fine), as a lazy
/// endpoint.
fn endpoint(addr: &str) -> Result<Endpoint, String> {
    let wrong = || format!("address {addr:?}: want host:port or http://host:port");
    if addr.starts_with("https://") {
        return Err(format!(
            "address {addr:?}: for TLS, build a tonic Channel with its TLS features and use Client::new"
        ));
    }
    let authority = addr.strip_prefix("http://").unwrap_or(addr).trim_end_matches('/');
    if authority.is_empty() || authority.contains(['/', '@', ' ']) || authority.contains("://") {
        return Err(wrong());
    }
    let uri: http::Uri = format!("http://{authority}").parse().map_err(|_| wrong())?;
    if uri.port_u16().is_none() {
        return Err(wrong());
    }
    Ok(Endpoint::from(uri).connect_timeout(Duration::from_secs(2)))
}

fn check_namespace(namespace: &str) -> Result<(), String> {
    let allowed = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-');
    if namespace.is_empty() || namespace.len() > 64 || !namespace.bytes().all(allowed) {
        return Err(format!("namespace {namespace:?}: must be 1-64 characters of [a-z0-9._-]"));
    }
    Ok(())
}

fn is_control(c: char) -> bool {
    c <= '\u{1f}' || ('\u{7f}'..='\u{9f}').contains(&c)
}

/// API.md's rules for the key: 1-255 bytes of UTF-8 without control
/// characters.
pub(crate) fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("key is required".into());
    }
    if key.len() > 255 {
        return Err(format!("key: {} bytes, at most 255", key.len()));
    }
    if let Some(c) = key.chars().find(|&c| is_control(c)) {
        return Err(format!("key: contains the control character {:?}", c));
    }
    Ok(())
}

pub(crate) fn check_fingerprint(fingerprint: &[u8]) -> Result<(), String> {
    if fingerprint.len() > 64 {
        return Err(format!("fingerprint: {} bytes, at most 64 (use fingerprint(), a SHA-256)", fingerprint.len()));
    }
    Ok(())
}

/// What Complete would refuse, found before it is sent.
pub(crate) fn check_response(response: &crate::Response) -> Result<(), String> {
    let content_type = &response.content_type;
    if content_type.len() > 255 {
        return Err(format!("response content type: {} bytes, at most 255", content_type.len()));
    }
    if let Some(c) = content_type.chars().find(|&c| is_control(c)) {
        return Err(format!("response content type: contains the control character {:?}", c));
    }
    Ok(())
}

/// ±50 % so that retrying callers do not move in lockstep.
pub(crate) fn jitter(base: Duration) -> Duration {
    base.mul_f64(rand::rng().random_range(0.5..1.5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_with_and_without_scheme() {
        for good in ["127.0.0.1:50051", "http://127.0.0.1:50051", "http://idemd:50051/", "[::1]:50051", "idemd.svc:1"] {
            assert!(endpoint(good).is_ok(), "{good}");
        }
        for bad in ["", "idemd", "http://", "https://idemd:443", "grpc://idemd:1", "idemd:1/path", "user@idemd:1"] {
            assert!(endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn field_rules() {
        assert!(check_namespace("payments-eu.v2_x").is_ok());
        for bad in ["", "Payments", "pay ments", &"n".repeat(65)] {
            assert!(check_namespace(bad).is_err(), "{bad}");
        }
        assert!(check_key(&"k".repeat(255)).is_ok());
        assert!(check_key("ü-Ω 1").is_ok());
        for bad in ["", "a\nb", "a\u{85}b", &"k".repeat(256)] {
            assert!(check_key(bad).is_err(), "{bad:?}");
        }
        assert!(check_fingerprint(&[0; 64]).is_ok());
        assert!(check_fingerprint(&[0; 65]).is_err());
    }

    #[test]
    fn policy_rules() {
        assert_eq!(Policy::default().check(), Ok(()));
        let bad = [
            Policy { lease_ttl: Duration::from_millis(999), ..Policy::default() },
            Policy { lease_ttl: Duration::from_secs(3601), ..Policy::default() },
            Policy { retention: Some(Duration::ZERO), ..Policy::default() },
            Policy { wait: Duration::from_secs(61), ..Policy::default() },
            Policy { rpc_timeout: Duration::ZERO, ..Policy::default() },
            Policy { token: Some("two words".into()), ..Policy::default() },
        ];
        for policy in bad {
            assert!(policy.check().is_err(), "{policy:?}");
        }
    }
}
