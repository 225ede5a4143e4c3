//! Bounds on what a request body may cost before any handler sees it.
//!
//! tonic buffers a message until its last byte arrives, up to the service's
//! decode limit, and waits for the body's end for as long as the peer keeps
//! the stream open. A peer could therefore hold a large buffer per stream,
//! for ever, without sending a credential (health and reflection need none).
//! [`RequestGuardLayer`] wraps every request body so that:
//!
//! - each message is at most the largest legitimate message of its method
//!   ([`message_limit`]); a larger declared length fails at once, before
//!   its bytes are buffered;
//! - a unary request's whole body arrives within `--request-read-timeout`
//!   of the request's headers, and each message of a stream within that
//!   long of its first byte, whatever `grpc-timeout` says;
//! - the bodies of calls that need no credentials (health, reflection,
//!   unknown methods) hold at most [`UNAUTHENTICATED_BYTES_PER_CONNECTION`]
//!   per connection at once.
//!
//! A body that breaks a bound ends with an idemd error, which tonic answers
//! as the call's status (with ErrorInfo) and which drops the buffered bytes.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::Sleep;
use tonic::Status;
use tonic::body::Body;

use crate::connections::{Connection, ConnectionHandle};
use crate::error::Error;

/// The largest message of Begin, Abort, Heartbeat and Lookup: twice what
/// their fields at the proto's limits add up to, with room for additions.
pub const SMALL_MESSAGE_BYTES: usize = 4 * 1024;
/// Health check requests name a service.
pub const HEALTH_MESSAGE_BYTES: usize = 1024;
/// Reflection requests name a file or a symbol.
pub const REFLECTION_MESSAGE_BYTES: usize = 8 * 1024;
/// Bodies of unknown methods are never read; a little room for the framing.
pub const UNKNOWN_MESSAGE_BYTES: usize = 1024;
/// Room for the other fields of a CompleteRequest next to the largest response.
pub const COMPLETE_OVERHEAD_BYTES: usize = 64 * 1024;
/// What the calls that need no credentials may hold per connection at once.
pub const UNAUTHENTICATED_BYTES_PER_CONNECTION: usize = 64 * 1024;

/// How a path's requests are bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageLimit {
    pub max_bytes: usize,
    /// Several messages on one stream (reflection).
    pub streaming: bool,
    /// Reached without credentials: counted against the connection's budget.
    pub open: bool,
}

/// The largest CompleteRequest: the largest response and room for the rest.
pub fn complete_limit(max_response_bytes: usize) -> usize {
    max_response_bytes + COMPLETE_OVERHEAD_BYTES
}

/// The bound of each method, from its largest legitimate message.
pub fn message_limit(path: &str, max_response_bytes: usize) -> MessageLimit {
    let limit = |max_bytes, streaming, open| MessageLimit { max_bytes, streaming, open };
    if let Some(method) = path.strip_prefix("/idemd.v1.Idempotency/") {
        return match method {
            "Complete" => limit(complete_limit(max_response_bytes), false, false),
            _ => limit(SMALL_MESSAGE_BYTES, false, false),
        };
    }
    if let Some(method) = path.strip_prefix("/idemd.v1.Admin/") {
        return match method {
            // Resolve carries a response, as Complete does.
            "Resolve" => limit(complete_limit(max_response_bytes), false, false),
            _ => limit(SMALL_MESSAGE_BYTES, false, false),
        };
    }
    if path.starts_with("/grpc.health.v1.Health/") {
        return limit(HEALTH_MESSAGE_BYTES, false, true);
    }
    if path.starts_with("/grpc.reflection.v1.ServerReflection/")
        || path.starts_with("/grpc.reflection.v1alpha.ServerReflection/")
    {
        return limit(REFLECTION_MESSAGE_BYTES, true, true);
    }
    limit(UNKNOWN_MESSAGE_BYTES, false, true)
}

#[derive(Debug, Clone, Copy)]
pub struct RequestGuardLayer {
    pub max_response_bytes: usize,
    pub read_timeout: Duration,
}

impl<S> tower_layer::Layer<S> for RequestGuardLayer {
    type Service = RequestGuard<S>;
    fn layer(&self, inner: S) -> RequestGuard<S> {
        RequestGuard { inner, config: *self }
    }
}

#[derive(Debug, Clone)]
pub struct RequestGuard<S> {
    inner: S,
    config: RequestGuardLayer,
}

impl<S> tower_service::Service<http::Request<Body>> for RequestGuard<S>
where
    S: tower_service::Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> S::Future {
        let limit = message_limit(request.uri().path(), self.config.max_response_bytes);
        let budget = match (limit.open, request.extensions().get::<ConnectionHandle>()) {
            (true, Some(handle)) => Some(Arc::clone(&handle.0)),
            _ => None,
        };
        let timeout = self.config.read_timeout;
        let request = request.map(|body| Body::new(GuardedBody::new(body, limit, timeout, budget)));
        self.inner.call(request)
    }
}

/// A request body within its method's bounds (see the module comment).
pub struct GuardedBody {
    inner: Body,
    limit: MessageLimit,
    read_timeout: Duration,
    /// Running while a message (unary: the whole body) is incomplete.
    deadline: Option<Pin<Box<Sleep>>>,
    /// The 5-byte prefix of the message being received.
    prefix: [u8; 5],
    prefix_len: usize,
    /// Payload bytes still to come of the message being received.
    remaining: usize,
    /// The connection whose budget this open call's bytes count against.
    budget: Option<Arc<Connection>>,
    counted: usize,
    failed: bool,
}

impl GuardedBody {
    pub fn new(inner: Body, limit: MessageLimit, read_timeout: Duration, budget: Option<Arc<Connection>>) -> Self {
        GuardedBody {
            inner,
            limit,
            read_timeout,
            deadline: Some(Box::pin(tokio::time::sleep(read_timeout))),
            prefix: [0; 5],
            prefix_len: 0,
            remaining: 0,
            budget,
            counted: 0,
            failed: false,
        }
    }

    /// Follows the gRPC framing through one chunk of data.
    fn account(&mut self, data: &Bytes) -> Result<(), Error> {
        if let Some(connection) = &self.budget {
            let held = connection.unauthenticated_bytes().fetch_add(data.len(), Ordering::Relaxed) + data.len();
            self.counted += data.len();
            if held > UNAUTHENTICATED_BYTES_PER_CONNECTION {
                return Err(Error::UnauthenticatedBytes(UNAUTHENTICATED_BYTES_PER_CONNECTION));
            }
        }
        let mut chunk = data.clone();
        while chunk.has_remaining() {
            if self.prefix_len < 5 {
                if self.prefix_len == 0 && self.deadline.is_none() {
                    self.deadline = Some(Box::pin(tokio::time::sleep(self.read_timeout)));
                }
                self.prefix[self.prefix_len] = chunk.get_u8();
                self.prefix_len += 1;
                if self.prefix_len == 5 {
                    let declared = u32::from_be_bytes([self.prefix[1], self.prefix[2], self.prefix[3], self.prefix[4]]);
                    let declared = usize::try_from(declared).unwrap_or(usize::MAX);
                    if declared > self.limit.max_bytes {
                        return Err(Error::invalid(
                            "request",
                            format!(
                                "a message of {declared} bytes is over this method's limit of {} bytes",
                                self.limit.max_bytes
                            ),
                        ));
                    }
                    self.remaining = declared;
                }
            } else {
                let taken = self.remaining.min(chunk.remaining());
                chunk.advance(taken);
                self.remaining -= taken;
            }
            if self.prefix_len == 5 && self.remaining == 0 {
                self.prefix_len = 0;
                if self.limit.streaming {
                    self.deadline = None;
                }
            }
        }
        Ok(())
    }

    fn release_budget(&mut self) {
        if let Some(connection) = &self.budget {
            connection.unauthenticated_bytes().fetch_sub(std::mem::take(&mut self.counted), Ordering::Relaxed);
        }
    }

    fn fail(&mut self, error: Error) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.failed = true;
        self.deadline = None;
        self.release_budget();
        Poll::Ready(Some(Err(Status::from(error))))
    }
}

impl Drop for GuardedBody {
    fn drop(&mut self) {
        self.release_budget();
    }
}

impl HttpBody for GuardedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.failed {
            return Poll::Ready(None);
        }
        if let Some(deadline) = this.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            return this.fail(Error::RequestReadTimeout(this.read_timeout));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                this.deadline = None;
                this.release_budget();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                match frame.data_ref() {
                    Some(data) => {
                        if let Err(error) = this.account(data) {
                            return this.fail(error);
                        }
                    }
                    // Trailers end the body.
                    None => this.deadline = None,
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn frame(declared: u32, payload: &[u8]) -> Bytes {
        let mut bytes = vec![0];
        bytes.extend_from_slice(&declared.to_be_bytes());
        bytes.extend_from_slice(payload);
        Bytes::from(bytes)
    }

    #[test]
    fn each_method_has_the_limit_of_its_largest_message() {
        let complete = message_limit("/idemd.v1.Idempotency/Complete", 1000);
        assert_eq!(complete.max_bytes, 1000 + COMPLETE_OVERHEAD_BYTES);
        assert!(!complete.open);
        assert_eq!(message_limit("/idemd.v1.Idempotency/Begin", 1 << 20).max_bytes, SMALL_MESSAGE_BYTES);
        let health = message_limit("/grpc.health.v1.Health/Check", 1 << 20);
        assert!(health.open && health.max_bytes == HEALTH_MESSAGE_BYTES);
        assert!(message_limit("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", 0).streaming);
        assert!(message_limit("/no.Such/Method", 1 << 20).open);
    }

    async fn read(mut body: GuardedBody) -> Result<usize, Status> {
        let mut bytes = 0;
        while let Some(frame) = body.frame().await {
            bytes += frame?.into_data().map(|d| d.len()).unwrap_or(0);
        }
        Ok(bytes)
    }

    #[tokio::test]
    async fn a_declared_length_over_the_limit_fails_before_its_bytes_arrive() {
        let limit = MessageLimit { max_bytes: 10, streaming: false, open: false };
        let body = Body::new(http_body_util::Full::new(frame(11, b"")));
        let status = read(GuardedBody::new(body, limit, Duration::from_secs(5), None)).await.expect_err("too large");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        let body = Body::new(http_body_util::Full::new(frame(10, &[0; 10])));
        assert_eq!(read(GuardedBody::new(body, limit, Duration::from_secs(5), None)).await.expect("fits"), 15);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_never_ends_fails_at_the_read_timeout() {
        let limit = MessageLimit { max_bytes: 100, streaming: false, open: false };
        use futures::StreamExt;
        // All but the last byte of the message, then silence.
        let frames = futures::stream::iter([Ok::<_, Status>(Frame::data(frame(50, &[0; 49])))])
            .chain(futures::stream::pending());
        let body = Body::new(http_body_util::StreamBody::new(frames));
        let guarded = GuardedBody::new(body, limit, Duration::from_secs(5), None);
        let reading = tokio::spawn(read(guarded));
        tokio::time::sleep(Duration::from_secs(6)).await;
        let status = reading.await.expect("task").expect_err("timed out");
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
    }
}
