//! Decoding requests off the wire. The protobuf codec of the generated
//! service is prost, except that bytes which do not decode as the request
//! message are INVALID_ARGUMENT (`INVALID_FIELD`) naming the field, not
//! tonic's default INTERNAL. [`WireErrorsLayer`] does the same for the
//! framing errors tonic answers before any codec runs (an empty body, a
//! truncated frame, an oversized message).

use std::marker::PhantomData;
use std::task::{Context, Poll};

use futures::TryFutureExt;
use futures::future::MapOk;

use prost::Message;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use crate::error::Error;

#[derive(Debug, Clone)]
pub struct StrictCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for StrictCodec<T, U> {
    fn default() -> Self {
        StrictCodec(PhantomData)
    }
}

impl<T, U> Codec for StrictCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = StrictEncoder<T>;
    type Decoder = StrictDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        StrictEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictDecoder(PhantomData)
    }
}

#[derive(Debug)]
pub struct StrictEncoder<T>(PhantomData<T>);

impl<T: Message> Encoder for StrictEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        // EncodeBuf grows on demand, so prost's only error (no capacity) cannot happen.
        item.encode(buf).map_err(|e| Status::internal(format!("encoding the reply: {e}")))
    }
}

#[derive(Debug)]
pub struct StrictDecoder<U>(PhantomData<U>);

impl<U> Default for StrictDecoder<U> {
    fn default() -> Self {
        StrictDecoder(PhantomData)
    }
}

impl<U: Message + Default> Decoder for StrictDecoder<U> {
    type Item = U;
    type Error = Status;

    /// Requests are decoded from a buffer that starts small instead of at
    /// tonic's default and grows for large Completes: all other requests are
    /// a few hundred bytes, and a burst of thousands (waiters arriving at
    /// once) leaves its peak in the allocator.
    fn buffer_settings(&self) -> tonic::codec::BufferSettings {
        tonic::codec::BufferSettings::new(1024, 32 * 1024)
    }

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|error| {
            let description = error.to_string();
            Status::from(Error::invalid(field_of(&description), description))
        })
    }
}

/// Best effort: prost names the failing field as `Message.field: reason`.
fn field_of(description: &str) -> String {
    description
        .split(": ")
        .find_map(|part| {
            let (message, field) = part.split_once('.')?;
            let plain = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            (plain(message) && plain(field)).then(|| field.to_string())
        })
        .unwrap_or_else(|| "request".to_string())
}

/// Rewrites the error replies tonic produces itself, which carry no
/// details, into idemd's errors with their ErrorInfo: malformed framing
/// (INTERNAL, or OUT_OF_RANGE for an oversized message) becomes
/// INVALID_ARGUMENT / `INVALID_FIELD` for the field `request`, and
/// UNIMPLEMENTED (an unknown method, a compression idemd does not accept)
/// keeps its code and gains reason `UNIMPLEMENTED`. Replies that carry our
/// details (every idemd error does) pass unchanged, so a genuine INTERNAL
/// from a bug is never disguised.
#[derive(Debug, Clone, Copy, Default)]
pub struct WireErrorsLayer;

impl<S> tower_layer::Layer<S> for WireErrorsLayer {
    type Service = WireErrors<S>;
    fn layer(&self, inner: S) -> WireErrors<S> {
        WireErrors { inner }
    }
}

#[derive(Debug, Clone)]
pub struct WireErrors<S> {
    inner: S,
}

impl<S, B, RB> tower_service::Service<http::Request<B>> for WireErrors<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = MapOk<S::Future, fn(http::Response<RB>) -> http::Response<RB>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        self.inner.call(request).map_ok(rewrite_wire_error as fn(_) -> _)
    }
}

fn rewrite_wire_error<RB>(mut response: http::Response<RB>) -> http::Response<RB> {
    let headers = response.headers_mut();
    if headers.contains_key("grpc-status-details-bin") {
        return response;
    }
    // tonic's own status, its message percent-decoded (it is encoded again below).
    let Some(tonic_status) = Status::from_header_map(headers) else { return response };
    let error = match tonic_status.code() {
        tonic::Code::Internal | tonic::Code::OutOfRange => {
            let message = match tonic_status.message() {
                "" => "malformed gRPC request",
                message => message,
            };
            Error::invalid("request", format!("malformed request: {message}"))
        }
        tonic::Code::Unimplemented => Error::Unimplemented(match tonic_status.message() {
            "" => "no such method".to_string(),
            message => message.to_string(),
        }),
        _ => return response,
    };
    let status = Status::from(error);
    headers.remove("grpc-message");
    // Only fails for header values that cannot be encoded, which ours can.
    let _ = status.add_header(headers);
    response
}

#[cfg(test)]
mod tests {
    use super::field_of;

    #[test]
    fn names_the_field_prost_reports() {
        assert_eq!(
            field_of(
                "failed to decode Protobuf message: BeginRequest.key: invalid string value: data is not UTF-8 encoded"
            ),
            "key"
        );
        assert_eq!(field_of("failed to decode Protobuf message: buffer underflow"), "request");
    }
}
