//! The sockets of both ports: accepting, capping and closing connections.
//!
//! idemd serves each connection itself (hyper under tonic's router) so that
//! it can bound what a peer holds without sending a single credential:
//!
//! - a slot per connection, taken at accept, at most `max_connections`;
//! - a deadline from accept to the first request (TLS handshake, HTTP/2
//!   preface and the first request's headers included): a silent socket is
//!   dropped;
//! - an idle timeout: a connection with no open stream for that long is
//!   closed gracefully (GOAWAY; gRPC clients reconnect on their next call);
//! - HTTP/2 keepalive pings, so a peer that stopped answering is dropped;
//! - a maximum age (optional): an older connection is closed gracefully, so
//!   that clients reconnect and a connection-balancing Service spreads them
//!   over the replicas there are now; calls outliving the grace are cut;
//! - when every slot is taken, a new connection takes the slot of the
//!   connection least worth keeping: one that never made an authenticated
//!   call and has no open stream, then one that never authenticated, then
//!   an authenticated one with no open stream. An authenticated connection
//!   with a call in flight is never closed for a newcomer; with none to
//!   spare, the newcomer is refused. Silent or unauthenticated peers can
//!   therefore not lock out a caller with valid credentials.
//! - accept errors (EMFILE above all) back off instead of spinning, and are
//!   logged at most once per [`LOG_EVERY`] with a count of what was not logged.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Accept errors and refusals are logged at most this often.
pub const LOG_EVERY: Duration = Duration::from_secs(10);
/// The longest pause after consecutive accept errors.
pub const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
/// The first pause after an accept error.
pub const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(5);
/// How long a connection asked to close gracefully may take before it is dropped.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// What bounds the connections of one port.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionPolicy {
    pub max_connections: usize,
    /// From accept to the first request's headers.
    pub first_request_timeout: Duration,
    /// With no open stream for this long, a connection is closed.
    pub idle_timeout: Duration,
    /// A connection this old (±10 %) is closed gracefully; `None`: no limit.
    pub max_age: Option<Duration>,
    /// How long the calls of a connection closed for its age may go on.
    pub max_age_grace: Duration,
}

impl ConnectionPolicy {
    /// When a connection accepted at `accepted` is closed for its age: the
    /// maximum age ±10 %, so that connections opened together (a fleet of
    /// clients started by one rollout) do not all reconnect at once.
    fn aged_at(&self, accepted: Instant) -> Option<Instant> {
        self.max_age.map(|age| accepted + age.mul_f64(rand::random_range(0.9..=1.1)))
    }
}

/// One open connection, shared by its serving task, the slot table and
/// (through the request extensions) the calls made on it.
#[derive(Debug)]
pub struct Connection {
    id: u64,
    accepted: Instant,
    open_streams: AtomicUsize,
    /// Milliseconds after `accepted` of the last stream opened or closed.
    last_activity_ms: AtomicU64,
    served: AtomicBool,
    authenticated: AtomicBool,
    /// Request bytes of calls that need no credentials, held at once.
    unauthenticated_bytes: AtomicUsize,
    close_gracefully: CancellationToken,
    close_now: CancellationToken,
}

impl Connection {
    fn new(id: u64) -> Self {
        Connection {
            id,
            accepted: Instant::now(),
            open_streams: AtomicUsize::new(0),
            last_activity_ms: AtomicU64::new(0),
            served: AtomicBool::new(false),
            authenticated: AtomicBool::new(false),
            unauthenticated_bytes: AtomicUsize::new(0),
            close_gracefully: CancellationToken::new(),
            close_now: CancellationToken::new(),
        }
    }

    /// A call on this connection passed authentication (or auth is off and
    /// it reached the Idempotency service): the connection is worth keeping.
    pub fn mark_authenticated(&self) {
        self.authenticated.store(true, Ordering::Relaxed);
    }

    pub fn is_authenticated(&self) -> bool {
        self.authenticated.load(Ordering::Relaxed)
    }

    /// What [`crate::request_guard`] counts against the connection's budget.
    pub fn unauthenticated_bytes(&self) -> &AtomicUsize {
        &self.unauthenticated_bytes
    }

    fn touch(&self) {
        let elapsed = self.accepted.elapsed().as_millis();
        self.last_activity_ms.store(u64::try_from(elapsed).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Counts a stream until the returned guard drops.
    fn open_stream(self: &Arc<Self>) -> StreamGuard {
        self.served.store(true, Ordering::Relaxed);
        self.open_streams.fetch_add(1, Ordering::Relaxed);
        self.touch();
        StreamGuard(Arc::clone(self))
    }

    fn busy(&self) -> bool {
        self.open_streams.load(Ordering::Relaxed) > 0
    }

    /// When the connection should next be looked at, and whether it must
    /// close: `Err(true)` drop it now, `Err(false)` close it gracefully.
    fn next_check(&self, policy: &ConnectionPolicy) -> Result<Instant, bool> {
        let now = Instant::now();
        if !self.served.load(Ordering::Relaxed) {
            let deadline = self.accepted + policy.first_request_timeout;
            return if now >= deadline { Err(true) } else { Ok(deadline) };
        }
        if self.busy() {
            return Ok(now + policy.idle_timeout);
        }
        let idle_since = self.accepted + Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed));
        let deadline = idle_since + policy.idle_timeout;
        if now >= deadline { Err(false) } else { Ok(deadline) }
    }

    /// How much a connection is worth keeping when a newcomer needs its
    /// slot (lower goes first); `None` for one that is never closed for that.
    fn eviction_rank(&self) -> Option<(u8, Instant)> {
        match (self.is_authenticated(), self.busy()) {
            (false, false) => Some((0, self.accepted)),
            (false, true) => Some((1, self.accepted)),
            (true, false) => Some((2, self.accepted)),
            (true, true) => None,
        }
    }
}

/// An open stream of a connection; the response body carries it to its end.
#[derive(Debug)]
pub struct StreamGuard(Arc<Connection>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.open_streams.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// The connection a request arrived on, in the request's extensions.
#[derive(Debug, Clone)]
pub struct ConnectionHandle(pub Arc<Connection>);

/// The slots of one port.
#[derive(Debug)]
pub struct Slots {
    port: &'static str,
    policy: ConnectionPolicy,
    open: Mutex<HashMap<u64, Arc<Connection>>>,
    next_id: AtomicU64,
    refusals: Mutex<Throttle>,
    evictions: Mutex<Throttle>,
}

/// A slot held by an accepted connection, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
    connection: Arc<Connection>,
}

impl Slot {
    pub fn connection(&self) -> &Arc<Connection> {
        &self.connection
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.slots.open();
        // An evicted connection's slot already went to its successor.
        if open.get(&self.connection.id).is_some_and(|held| Arc::ptr_eq(held, &self.connection)) {
            open.remove(&self.connection.id);
        }
    }
}

impl Slots {
    pub fn new(port: &'static str, policy: ConnectionPolicy) -> Arc<Self> {
        Arc::new(Slots {
            port,
            policy,
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            refusals: Mutex::new(Throttle::default()),
            evictions: Mutex::new(Throttle::default()),
        })
    }

    pub fn policy(&self) -> &ConnectionPolicy {
        &self.policy
    }

    fn open(&self) -> MutexGuard<'_, HashMap<u64, Arc<Connection>>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Connections holding a slot now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.open().len()
    }

    /// A slot for a new connection: a free one, or the slot of the
    /// connection least worth keeping, or `None` (refused).
    pub fn admit(self: &Arc<Self>) -> Option<Slot> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let connection = Arc::new(Connection::new(id));
        let mut open = self.open();
        if open.len() >= self.policy.max_connections {
            let victim = open
                .values()
                .filter_map(|held| held.eviction_rank().map(|rank| (rank, Arc::clone(held))))
                .min_by_key(|(rank, _)| *rank);
            let Some((rank, victim)) = victim else {
                drop(open);
                throttled(&self.refusals, |suppressed| {
                    tracing::warn!(
                        port = self.port,
                        suppressed,
                        "connection refused: every slot holds an authenticated call (--max-connections)"
                    )
                });
                return None;
            };
            open.remove(&victim.id);
            if victim.busy() {
                victim.close_now.cancel();
            } else {
                victim.close_gracefully.cancel();
            }
            throttled(&self.evictions, |suppressed| {
                tracing::info!(
                    port = self.port,
                    authenticated = rank.0 == 2,
                    suppressed,
                    "all connection slots taken: closed the connection least worth keeping for a new one"
                )
            });
        }
        open.insert(id, Arc::clone(&connection));
        Some(Slot { slots: Arc::clone(self), connection })
    }
}

/// A log line at most once per [`LOG_EVERY`], with how many were skipped.
#[derive(Debug, Default)]
pub struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// `Some(skipped since the last line)` when a line may be written now.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.duration_since(last) < LOG_EVERY => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

fn throttled(throttle: &Mutex<Throttle>, log: impl FnOnce(u64)) {
    let allowed = throttle.lock().unwrap_or_else(PoisonError::into_inner).allow(Instant::now());
    if let Some(suppressed) = allowed {
        log(suppressed);
    }
}

/// The pause after an accept error: doubling from [`MIN_ACCEPT_BACKOFF`]
/// to [`MAX_ACCEPT_BACKOFF`], back to none after a success.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    current: Duration,
}

impl AcceptBackoff {
    pub fn failed(&mut self) -> Duration {
        self.current = (self.current * 2).clamp(MIN_ACCEPT_BACKOFF, MAX_ACCEPT_BACKOFF);
        self.current
    }

    pub fn succeeded(&mut self) {
        self.current = Duration::ZERO;
    }
}

/// Errors that concern one connection that went away before it was
/// accepted, not the listener: retried at once.
fn is_per_connection(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(error.kind(), ConnectionAborted | ConnectionReset | Interrupted | WouldBlock)
}

/// Accepts connections until `stop`, gives each a slot and hands it to
/// `serve`; the listener closes when this returns.
pub async fn accept_loop(
    listener: TcpListener,
    slots: Arc<Slots>,
    stop: CancellationToken,
    mut serve: impl FnMut(TcpStream, SocketAddr, Slot),
) {
    let mut backoff = AcceptBackoff::default();
    let mut errors = Throttle::default();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff.succeeded();
                let Some(slot) = slots.admit() else { continue };
                // Small gRPC frames must not wait for Nagle's algorithm.
                let _ = stream.set_nodelay(true);
                serve(stream, peer, slot);
            }
            Err(error) if is_per_connection(&error) => {}
            Err(error) => {
                let pause = backoff.failed();
                if let Some(suppressed) = errors.allow(Instant::now()) {
                    tracing::warn!(port = slots.port, %error, ?pause, suppressed, "accept failed; backing off");
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

/// What serving one connection needs from its protocol (HTTP/2 for gRPC,
/// HTTP/1.1 for metrics): hyper's connection future and its graceful close.
pub trait ServedConnection: Future<Output = Result<(), hyper::Error>> {
    fn close_gracefully(self: Pin<&mut Self>);
}

impl<I, S, E, B> ServedConnection for hyper::server::conn::http2::Connection<I, S, E>
where
    Self: Future<Output = Result<(), hyper::Error>>,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    B: HttpBody + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn close_gracefully(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, B> ServedConnection for hyper::server::conn::http1::Connection<I, S>
where
    Self: Future<Output = Result<(), hyper::Error>>,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    B: HttpBody + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
{
    fn close_gracefully(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Drives one connection until it ends, closing it gracefully on `drain`,
/// when idle too long or when a newcomer takes its slot, and dropping it
/// when it never sends a request in time, when a newcomer needs the slot of
/// a busy unauthenticated connection, or when it outstays a graceful close
/// by [`CLOSE_GRACE`] with no stream open.
pub async fn drive<C: ServedConnection>(connection: C, slot: Slot, drain: CancellationToken) {
    let state = Arc::clone(slot.connection());
    let policy = *slot.slots.policy();
    let port = slot.slots.port;
    let mut connection = std::pin::pin!(connection);
    // When a graceful close began; the server's drain has its own grace.
    let mut closing: Option<Instant> = None;
    let mut draining = false;
    let aged_at = policy.aged_at(state.accepted);
    // When calls still open on a connection closed for its age are cut.
    let mut cut_at: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let check = match (closing, state.next_check(&policy)) {
            (_, Err(true)) => {
                tracing::debug!(port, "connection sent no request in time; dropped");
                break;
            }
            (Some(since), _) if !draining => {
                match (state.busy(), now >= since + CLOSE_GRACE) {
                    (false, true) => break,
                    // Streams end without telling us: look again soon.
                    (true, true) => now + CLOSE_GRACE / 4,
                    (_, false) => since + CLOSE_GRACE,
                }
            }
            (Some(_), _) => now + policy.idle_timeout,
            (None, Err(false)) => {
                tracing::debug!(port, "idle connection closed");
                connection.as_mut().close_gracefully();
                closing = Some(now);
                continue;
            }
            (None, Ok(at)) => at,
        };
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(port, %error, "connection ended with an error");
                }
                break;
            }
            _ = state.close_now.cancelled() => break,
            _ = sleep_until_some(aged_at), if cut_at.is_none() && !draining => {
                tracing::debug!(port, "connection reached --max-connection-age; closing it gracefully");
                if closing.is_none() {
                    connection.as_mut().close_gracefully();
                    closing = Some(Instant::now());
                }
                cut_at = Some(Instant::now() + policy.max_age_grace);
            }
            _ = sleep_until_some(cut_at) => {
                tracing::debug!(port, "calls outlived --max-connection-age-grace; connection dropped");
                break;
            }
            _ = state.close_gracefully.cancelled(), if closing.is_none() => {
                connection.as_mut().close_gracefully();
                closing = Some(Instant::now());
            }
            _ = drain.cancelled(), if !draining => {
                // Server shutdown: in-flight calls finish within --shutdown-grace.
                if closing.is_none() {
                    connection.as_mut().close_gracefully();
                }
                closing = Some(Instant::now());
                draining = true;
            }
            _ = tokio::time::sleep_until(check) => {}
        }
    }
    drop(slot);
}

/// Sleeps until `at`, or forever when there is none.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Runs `handshake` (TLS) within the first-request deadline, or drops the
/// connection when its slot is taken meanwhile.
pub async fn within_first_request_deadline<T>(slot: &Slot, handshake: impl Future<Output = Option<T>>) -> Option<T> {
    let deadline = slot.connection.accepted + slot.slots.policy.first_request_timeout;
    tokio::select! {
        done = handshake => done,
        _ = slot.connection.close_now.cancelled() => None,
        _ = slot.connection.close_gracefully.cancelled() => None,
        _ = tokio::time::sleep_until(deadline) => None,
    }
}

/// The per-connection tower service: counts the streams of the connection
/// and hands each request its connection's identity.
#[derive(Clone)]
pub struct ConnectionService<S, I> {
    inner: S,
    connection: Arc<Connection>,
    connect_info: I,
}

impl<S, I> ConnectionService<S, I> {
    pub fn new(inner: S, slot: &Slot, connect_info: I) -> Self {
        ConnectionService { inner, connection: Arc::clone(&slot.connection), connect_info }
    }
}

impl<S, I, RB> tower_service::Service<http::Request<hyper::body::Incoming>> for ConnectionService<S, I>
where
    S: tower_service::Service<http::Request<tonic::body::Body>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    I: Clone + Send + Sync + 'static,
    RB: HttpBody<Data = Bytes>,
{
    type Response = http::Response<Tracked<RB>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<hyper::body::Incoming>) -> Self::Future {
        let mut request = request.map(tonic::body::Body::new);
        request.extensions_mut().insert(self.connect_info.clone());
        request.extensions_mut().insert(ConnectionHandle(Arc::clone(&self.connection)));
        let stream = self.connection.open_stream();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await?;
            Ok(response.map(|body| Tracked { body, _stream: stream }))
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its stream counted until it is sent or dropped.
    pub struct Tracked<B> {
        #[pin]
        body: B,
        _stream: StreamGuard,
    }
}

impl<B: HttpBody<Data = Bytes>> HttpBody for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max: usize) -> ConnectionPolicy {
        ConnectionPolicy {
            max_connections: max,
            first_request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_age: None,
            max_age_grace: Duration::from_secs(30),
        }
    }

    #[tokio::test]
    async fn a_full_table_gives_the_least_valuable_slot_to_a_newcomer() {
        let slots = Slots::new("test", policy(3));
        let trusted_busy = slots.admit().expect("1");
        trusted_busy.connection().mark_authenticated();
        let _open = trusted_busy.connection().open_stream();
        let trusted_idle = slots.admit().expect("2");
        trusted_idle.connection().mark_authenticated();
        let silent = slots.admit().expect("3");
        assert_eq!(slots.len(), 3);

        // The silent socket goes first, and is told to close at once... gracefully: it has no stream.
        let _newcomer = slots.admit().expect("takes the silent socket's slot");
        assert!(silent.connection().close_gracefully.is_cancelled());
        assert_eq!(slots.len(), 3);
        drop(silent);
        assert_eq!(slots.len(), 3, "an evicted connection's slot is not given back twice");

        // The newcomer (never authenticated) goes before the idle authenticated one.
        let _second = slots.admit().expect("takes the newcomer's slot");
        assert!(!trusted_idle.connection().close_gracefully.is_cancelled());
        let _third = slots.admit().expect("takes the second newcomer's slot");
        assert!(!trusted_idle.connection().close_gracefully.is_cancelled());
        assert!(!trusted_busy.connection().close_now.is_cancelled(), "an authenticated call is never cut off");
    }

    #[tokio::test]
    async fn authenticated_calls_in_flight_are_never_evicted() {
        let slots = Slots::new("test", policy(1));
        let held = slots.admit().expect("1");
        held.connection().mark_authenticated();
        let stream = held.connection().open_stream();
        assert!(slots.admit().is_none(), "refused, not evicted");
        drop(stream);
        assert!(slots.admit().is_some(), "an idle authenticated connection may give way");
        assert!(held.connection().close_gracefully.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_before_the_first_request_and_when_idle() {
        let slots = Slots::new("test", policy(4));
        let slot = slots.admit().expect("slot");
        let connection = slot.connection();
        let policy = *slots.policy();
        assert!(connection.next_check(&policy).is_ok());
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(connection.next_check(&policy), Err(true), "no request within the first-request timeout");

        let slot = slots.admit().expect("slot");
        let connection = slot.connection();
        let stream = connection.open_stream();
        tokio::time::advance(Duration::from_secs(400)).await;
        assert!(connection.next_check(&policy).is_ok(), "a long call is not idleness");
        drop(stream);
        tokio::time::advance(Duration::from_secs(299)).await;
        assert!(connection.next_check(&policy).is_ok());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(connection.next_check(&policy), Err(false), "idle: closed gracefully");
    }

    #[test]
    fn accept_errors_back_off_and_reset() {
        let mut backoff = AcceptBackoff::default();
        let pauses: Vec<_> = (0..10).map(|_| backoff.failed()).collect();
        assert_eq!(pauses[0], MIN_ACCEPT_BACKOFF);
        assert!(pauses.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(pauses[9], MAX_ACCEPT_BACKOFF);
        backoff.succeeded();
        assert_eq!(backoff.failed(), MIN_ACCEPT_BACKOFF);
    }

    #[tokio::test(start_paused = true)]
    async fn log_lines_are_throttled_with_a_count() {
        let mut throttle = Throttle::default();
        let start = Instant::now();
        assert_eq!(throttle.allow(start), Some(0));
        let skipped = (1..1000).filter(|i| throttle.allow(start + Duration::from_millis(*i)).is_none()).count();
        assert_eq!(skipped, 999);
        assert_eq!(throttle.allow(start + LOG_EVERY), Some(999));
    }
}
