//! The protobuf codec of `lagprobe.v1.ConsistencyProbe`: tonic's prost codec, except that
//! bytes that do not decode as the expected message are `INVALID_ARGUMENT` naming the
//! message type. tonic answers `INTERNAL` there, which tells a client that lagprobe broke
//! (and is worth retrying) when it was the client that sent something lagprobe cannot read.
//!
//! build.rs points the generated code at [`ProbeCodec`] (`codec_path`), so every method of
//! the service, present and future, decodes through it. The generated client uses it too;
//! lagprobe's own answers always decode, so there it changes nothing.

use std::marker::PhantomData;

use prost::Message;
use tonic::{
    Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
};
use tonic_prost::ProstEncoder;

use crate::error::Error;

/// Encodes `T` as tonic's prost codec does; decodes `U`, refusing malformed bytes as the
/// caller's mistake.
#[derive(Debug, Clone)]
pub struct ProbeCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for ProbeCodec<T, U> {
    fn default() -> Self {
        ProbeCodec(PhantomData)
    }
}

impl<T, U> Codec for ProbeCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProbeDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProbeDecoder(PhantomData)
    }
}

/// Decodes one `U` per gRPC frame.
#[derive(Debug)]
pub struct ProbeDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for ProbeDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf)
            .map(Some)
            .map_err(|error| malformed(message_name::<U>(), &error))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// The generated message's name (`RunRequest`) without its Rust module path.
fn message_name<U>() -> &'static str {
    let path = std::any::type_name::<U>();
    path.rsplit("::").next().unwrap_or(path)
}

/// A message that does not decode, as a status: through the transport's one error mapping,
/// so it is also logged like every other refused request.
fn malformed(message: &str, error: &prost::DecodeError) -> Status {
    super::status_of(Error::invalid(
        "request",
        format!("malformed protobuf, not a valid {message}: {error}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;

    #[test]
    fn names_the_generated_message_without_its_module_path() {
        assert_eq!(message_name::<pb::RunRequest>(), "RunRequest");
    }

    #[test]
    fn a_decode_error_is_invalid_argument_naming_the_message() {
        let error = pb::RunRequest::decode(&[0x0f][..]).unwrap_err();
        let status = malformed("RunRequest", &error);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("RunRequest"), "{status:?}");
    }
}
