//! Begin, answered in front of tonic's router.
//!
//! A Begin with `wait_timeout` parks, and a parked Begin keeps whatever the
//! server holds per call for as long as it waits. Through tonic's generated
//! service that is tonic's unary future (sized for decoding the request,
//! though the wait comes after it), the router's boxed future and the
//! handler's box, more than Begin's own state. Here the request is decoded
//! in a future of its own that is gone before the wait starts, and a parked
//! Begin holds two pointers besides Begin's own future: `benches/waiters.sh`
//! measured 4.8 KiB per waiter instead of 7.2.
//!
//! Nothing of the protocol is written anew: the message is decoded by tonic's
//! own framing decoder (`Streaming`, the same limits and framing errors as
//! every other method, which [`crate::codec::WireErrorsLayer`] then words),
//! credentials are checked by the same interceptor and before the body, the
//! call is the same `Idempotency::begin`, and errors are tonic's own
//! trailers-only replies. Only the success reply is framed here: one message
//! and `grpc-status: 0` in the trailers, what tonic sends for a unary call.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, BytesMut};
use futures::future::Either;
use http::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use http_body_util::{BodyExt, Full};
use prost::Message;
use tonic::body::Body;
use tonic::codec::Streaming;
use tonic::metadata::MetadataMap;
use tonic::service::Interceptor;
use tonic::{Request, Response, Status};

use crate::auth::AuthInterceptor;
use crate::codec::StrictDecoder;
use crate::error::Error;
use crate::pb;
use crate::pb::idempotency_server::Idempotency;
use crate::service::IdempotencyService;
use crate::store::Store;

/// The one path this layer answers; every other request goes on to tonic.
pub const BEGIN_PATH: &str = "/idemd.v1.Idempotency/Begin";

/// The header naming a request's compression.
const ENCODING_HEADER: &str = "grpc-encoding";

/// What answering Begin needs, shared by every connection.
pub struct BeginHandler<S: Store> {
    service: Arc<IdempotencyService<S>>,
    auth: AuthInterceptor,
    max_request_bytes: usize,
}

impl<S: Store> BeginHandler<S> {
    /// `service` is the same instance the generated server holds, so both
    /// share its waiter limits, rate limiter and store slots.
    pub fn new(service: Arc<IdempotencyService<S>>, auth: AuthInterceptor, max_request_bytes: usize) -> Arc<Self> {
        Arc::new(BeginHandler { service, auth, max_request_bytes })
    }

    /// What tonic does before calling a unary method: the interceptor, the
    /// compression check, then the first message (tonic reads and drops any
    /// further ones, and so does `trailers`) and the body's trailers.
    async fn decode<B>(self: Arc<Self>, request: http::Request<B>) -> Result<Request<pb::BeginRequest>, Status>
    where
        B: http_body::Body + Send + 'static,
        B::Error: Into<tonic::codegen::StdError>,
    {
        let (parts, body) = request.into_parts();
        let request = self.auth.clone().call(Request::from_http(http::Request::from_parts(parts, ())))?;
        refuse_compression(request.metadata())?;
        let mut stream = Streaming::new_request(
            StrictDecoder::<pb::BeginRequest>::default(),
            body,
            None,
            Some(self.max_request_bytes),
        );
        let message = stream.message().await?.ok_or_else(|| Status::internal("Missing request message."))?;
        let trailers = stream.trailers().await?;
        let (mut metadata, extensions, ()) = request.into_parts();
        if let Some(trailers) = trailers {
            metadata = merged(metadata, trailers);
        }
        Ok(Request::from_parts(metadata, extensions, message))
    }
}

/// No compression is enabled, so only `identity` (or none) is accepted,
/// with tonic's wording and its `grpc-accept-encoding` hint.
fn refuse_compression(metadata: &MetadataMap) -> Result<(), Status> {
    let Some(encoding) = metadata.get(ENCODING_HEADER) else { return Ok(()) };
    if encoding.as_bytes() == b"identity" {
        return Ok(());
    }
    let name = String::from_utf8_lossy(encoding.as_bytes()).into_owned();
    let mut status = Status::unimplemented(format!("Content is compressed with `{name}` which isn't supported"));
    status.metadata_mut().insert("grpc-accept-encoding", tonic::metadata::MetadataValue::from_static("identity"));
    Err(status)
}

/// The request's trailers added after its headers. tonic's own merge lets a
/// trailer replace a header of the same name; here the header's value stays
/// first (what `get` returns), so a trailer cannot change what the headers
/// said, e.g. `traceparent`. Credentials are checked before the body anyway.
fn merged(metadata: MetadataMap, trailers: MetadataMap) -> MetadataMap {
    let mut headers = metadata.into_headers();
    // A header's further values come without its name.
    let mut name = None;
    for (next, value) in trailers.into_headers() {
        if next.is_some() {
            name = next;
        }
        if let Some(name) = &name {
            headers.append(name.clone(), value);
        }
    }
    MetadataMap::from_headers(headers)
}

/// One length-prefixed, uncompressed message, then `grpc-status: 0`.
fn encode(response: Response<pb::BeginResponse>) -> http::Response<Body> {
    let (metadata, message, extensions) = response.into_parts();
    let length = message.encoded_len();
    let Ok(prefix) = u32::try_from(length) else {
        return reply_not_encoded(format!("a reply of {length} bytes does not fit in one gRPC message"));
    };
    let mut frame = BytesMut::with_capacity(5 + length);
    frame.put_u8(0);
    frame.put_u32(prefix);
    // The buffer was sized from encoded_len, so prost cannot run out of room.
    if let Err(error) = message.encode(&mut frame) {
        return reply_not_encoded(format!("encoding the reply: {error}"));
    }
    let mut trailers = HeaderMap::new();
    trailers.insert(Status::GRPC_STATUS, HeaderValue::from_static("0"));
    let body = Full::new(frame.freeze()).with_trailers(std::future::ready(Some(Ok::<_, Infallible>(trailers))));
    let mut reply = http::Response::new(Body::new(body));
    *reply.headers_mut() = metadata.into_headers();
    reply.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    *reply.extensions_mut() = extensions;
    reply
}

/// Neither failure can happen to a Begin reply (its size is bounded and the
/// buffer is sized for it), but if one did, the Begin may already hold a
/// lease: the caller must hear idemd's INTERNAL, with our details so that
/// [`crate::codec::WireErrorsLayer`] does not take it for a malformed request
/// (a bare INTERNAL in the headers is what tonic's framing errors look like).
fn reply_not_encoded(cause: String) -> http::Response<Body> {
    tracing::error!(rpc.method = "Begin", %cause, "internal error");
    Status::from(Error::Internal(cause)).into_http()
}

/// The layer in front of the router (see the module comment).
pub struct BeginRouteLayer<S: Store>(pub Arc<BeginHandler<S>>);

impl<S: Store> Clone for BeginRouteLayer<S> {
    fn clone(&self) -> Self {
        BeginRouteLayer(Arc::clone(&self.0))
    }
}

impl<S: Store, Inner> tower_layer::Layer<Inner> for BeginRouteLayer<S> {
    type Service = BeginRoute<S, Inner>;
    fn layer(&self, inner: Inner) -> BeginRoute<S, Inner> {
        BeginRoute { handler: Arc::clone(&self.0), inner }
    }
}

pub struct BeginRoute<S: Store, Inner> {
    handler: Arc<BeginHandler<S>>,
    inner: Inner,
}

impl<S: Store, Inner: Clone> Clone for BeginRoute<S, Inner> {
    fn clone(&self) -> Self {
        BeginRoute { handler: Arc::clone(&self.handler), inner: self.inner.clone() }
    }
}

type Answer<E> = Pin<Box<dyn Future<Output = Result<http::Response<Body>, E>> + Send>>;
type Decoding = Pin<Box<dyn Future<Output = Result<Request<pb::BeginRequest>, Status>> + Send>>;

impl<S, Inner, B> tower_service::Service<http::Request<B>> for BeginRoute<S, Inner>
where
    S: Store,
    Inner: tower_service::Service<http::Request<B>, Response = http::Response<Body>>,
    Inner::Error: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<Body>;
    type Error = Inner::Error;
    /// Both kinds boxed: a parked Begin's share of the server's per-call
    /// future is then two pointers, not the size of the router's future.
    type Future = Either<Answer<Inner::Error>, Pin<Box<Inner::Future>>>;

    /// tonic's router is always ready; Begin needs nothing to be ready for.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != BEGIN_PATH {
            return Either::Right(Box::pin(self.inner.call(request)));
        }
        let handler = Arc::clone(&self.handler);
        // Decoding holds the request and tonic's decoder; it is boxed apart
        // so that what stays allocated for the wait is this small future.
        let decoding: Decoding = Box::pin(Arc::clone(&handler).decode(request));
        Either::Left(Box::pin(async move {
            let request = match decoding.await {
                Ok(request) => request,
                Err(status) => return Ok(status.into_http()),
            };
            // Begin's future is boxed by the trait: the wait holds a pointer.
            let begin = handler.service.begin(request);
            Ok(match begin.await {
                Ok(response) => encode(response),
                Err(status) => status.into_http(),
            })
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use tower_layer::Layer;

    /// The body of a successful reply, read back as the client would see it.
    async fn frames_of(reply: http::Response<Body>) -> (Bytes, Option<HeaderMap>) {
        let collected = reply.into_body().collect().await.expect("body");
        let trailers = collected.trailers().cloned();
        (collected.to_bytes(), trailers)
    }

    #[tokio::test]
    async fn a_reply_is_one_prefixed_message_then_status_ok() {
        let lease = pb::Acquired { lease_token: "t".repeat(40), attempt: 3, ..Default::default() };
        let message = pb::BeginResponse { outcome: Some(pb::begin_response::Outcome::Acquired(lease)) };
        let reply = encode(Response::new(message.clone()));
        assert_eq!(reply.headers().get(CONTENT_TYPE).map(|v| v.as_bytes()), Some(&b"application/grpc"[..]));
        let (bytes, trailers) = frames_of(reply).await;
        assert_eq!(bytes[0], 0, "not compressed");
        assert_eq!(u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize, bytes.len() - 5);
        assert_eq!(pb::BeginResponse::decode(&bytes[5..]).expect("decodes"), message);
        let trailers = trailers.expect("trailers");
        assert_eq!(trailers.get("grpc-status").map(|v| v.as_bytes()), Some(&b"0"[..]));
    }

    /// Stands in for tonic's router, which Begin never reaches.
    struct NoRouter;

    impl tower_service::Service<http::Request<Body>> for NoRouter {
        type Response = http::Response<Body>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<http::Response<Body>, Infallible>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: http::Request<Body>) -> Self::Future {
            std::future::ready(Ok(http::Response::new(Body::empty())))
        }
    }

    /// What a parked waiter keeps of this layer: the handler and Begin's
    /// boxed future. Through tonic's router it was 2.7 KiB more per waiter.
    #[tokio::test]
    async fn a_parked_begin_holds_two_pointers_here() {
        let (service, _dir) = crate::service::test_support::sqlite_service().await;
        let handler = BeginHandler::new(Arc::new(service), AuthInterceptor(None), 1024);
        let mut route = BeginRouteLayer(handler).layer(NoRouter);
        let request = http::Request::builder().uri(BEGIN_PATH).body(Body::empty()).expect("request");
        let Either::Left(answer) = tower_service::Service::call(&mut route, request) else {
            panic!("Begin went to the router");
        };
        let size = std::mem::size_of_val(&*answer);
        assert!(size <= 64, "the Begin route's future grew to {size} bytes");
    }

    #[test]
    fn a_reply_that_cannot_be_encoded_is_idemds_internal_not_a_wire_error() {
        let reply = reply_not_encoded("too big".to_string());
        let headers = reply.headers();
        assert_eq!(headers.get("grpc-status").map(|v| v.as_bytes()), Some(&b"13"[..]));
        // What WireErrorsLayer looks for to leave a reply as it is.
        assert!(headers.contains_key("grpc-status-details-bin"), "{headers:?}");
        let status = Status::from_header_map(headers).expect("a status");
        assert_eq!(status.message(), "internal error", "the cause is logged, not sent");
    }

    #[test]
    fn trailers_join_the_headers_with_every_value() {
        let mut headers = MetadataMap::new();
        headers.insert("a", tonic::metadata::MetadataValue::from_static("1"));
        let mut trailers = MetadataMap::new();
        trailers.append("b", tonic::metadata::MetadataValue::from_static("2"));
        trailers.append("b", tonic::metadata::MetadataValue::from_static("3"));
        trailers.insert("a", tonic::metadata::MetadataValue::from_static("4"));
        let merged = merged(headers, trailers);
        let values = |name: &str| {
            merged.get_all(name).iter().map(|v| v.to_str().expect("ascii").to_string()).collect::<Vec<_>>()
        };
        assert_eq!(values("a"), ["1", "4"]);
        assert_eq!(values("b"), ["2", "3"]);
    }

    #[test]
    fn only_identity_encoding_is_accepted() {
        let mut metadata = MetadataMap::new();
        assert!(refuse_compression(&metadata).is_ok());
        metadata.insert(ENCODING_HEADER, tonic::metadata::MetadataValue::from_static("identity"));
        assert!(refuse_compression(&metadata).is_ok());
        metadata.insert(ENCODING_HEADER, tonic::metadata::MetadataValue::from_static("gzip"));
        let status = refuse_compression(&metadata).expect_err("gzip is refused");
        assert_eq!(status.code(), tonic::Code::Unimplemented);
        assert_eq!(status.metadata().get("grpc-accept-encoding").map(|v| v.as_bytes()), Some(&b"identity"[..]));
    }
}
