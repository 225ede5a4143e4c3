//! The protobuf codec of the generated service: prost, except that bytes
//! which do not decode as the request message are INVALID_ARGUMENT
//! (`INVALID_FIELD`) naming the field, not tonic's default INTERNAL.

use std::marker::PhantomData;

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

impl<U: Message + Default> Decoder for StrictDecoder<U> {
    type Item = U;
    type Error = Status;

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
