//! Codecs: how values and whole envelopes become frame bodies.
//!
//! A codec encodes and decodes *whole envelopes*, not only payloads, so a codec with a
//! different envelope shape (such as the PHP seed's own wire format, where the method is a
//! class name) can be added here without touching the dispatcher. Every codec keeps the user
//! payload as the last part of the frame, so decoding slices it out without copying.
//!
//! | codec | feature | self-describing | notes |
//! | --- | --- | --- | --- |
//! | [`Codec::MessagePack`] | `msgpack` (default) | yes | compact and fast; the default |
//! | [`Codec::Json`] | `json` | yes | readable on the wire; for debugging and other languages |
//! | [`Codec::Postcard`] | `postcard` | no | smallest frames; both sides need the same Rust types |

#[cfg(feature = "json")]
mod json;
#[cfg(feature = "msgpack")]
mod msgpack;
#[cfg(feature = "postcard")]
mod postcard;

use bytes::{BufMut, Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::envelope::{Envelope, EnvelopeError};
use crate::error::CodecError;

#[cfg(not(any(feature = "msgpack", feature = "json", feature = "postcard")))]
compile_error!("channel-dispatcher needs at least one codec feature: msgpack, json or postcard");

/// The serialization format of a connection. Both peers must use the same one; the handshake
/// checks it.
///
/// # Examples
/// ```
/// use channel_dispatcher::Codec;
///
/// let bytes = Codec::default().encode(&(1, "two")).unwrap();
/// let back: (i32, String) = Codec::default().decode(&bytes).unwrap();
/// assert_eq!(back, (1, "two".to_string()));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Codec {
    /// MessagePack, with structs as arrays (`rmp-serde` defaults).
    #[cfg(feature = "msgpack")]
    MessagePack,
    /// JSON.
    #[cfg(feature = "json")]
    Json,
    /// postcard: compact, not self-describing.
    #[cfg(feature = "postcard")]
    Postcard,
}

impl Default for Codec {
    /// MessagePack when the `msgpack` feature is on (the default), else the first enabled codec.
    fn default() -> Self {
        #[cfg(feature = "msgpack")]
        return Self::MessagePack;
        #[cfg(all(not(feature = "msgpack"), feature = "json"))]
        return Self::Json;
        #[cfg(all(not(feature = "msgpack"), not(feature = "json")))]
        return Self::Postcard;
    }
}

impl Codec {
    /// The codec's name in the handshake: `msgpack`, `json` or `postcard`.
    pub fn name(self) -> &'static str {
        match self {
            #[cfg(feature = "msgpack")]
            Self::MessagePack => "msgpack",
            #[cfg(feature = "json")]
            Self::Json => "json",
            #[cfg(feature = "postcard")]
            Self::Postcard => "postcard",
        }
    }

    /// Encodes a value.
    ///
    /// # Errors
    /// A [`CodecError`] when serde refuses the value (for example a map with non-string keys in
    /// JSON).
    pub fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Bytes, CodecError> {
        let mut buf = BytesMut::with_capacity(64);
        self.encode_into(value, &mut buf)?;
        Ok(buf.freeze())
    }

    pub(crate) fn encode_into<T: Serialize + ?Sized>(
        self,
        value: &T,
        dst: &mut BytesMut,
    ) -> Result<(), CodecError> {
        let name = self.name();
        let writer = dst.writer();
        match self {
            #[cfg(feature = "msgpack")]
            Self::MessagePack => {
                let mut writer = writer;
                value
                    .serialize(&mut rmp_serde::Serializer::new(&mut writer))
                    .map_err(|e| CodecError::new(name, e))
            }
            #[cfg(feature = "json")]
            Self::Json => {
                serde_json::to_writer(writer, value).map_err(|e| CodecError::new(name, e))
            }
            #[cfg(feature = "postcard")]
            Self::Postcard => ::postcard::to_io(value, writer)
                .map(drop)
                .map_err(|e| CodecError::new(name, e)),
        }
    }

    /// Decodes a value. An empty input decodes as the codec's unit value (`()`, `None`,
    /// [`Success`](crate::Success)), which is how a raw call with an empty payload is read.
    ///
    /// # Errors
    /// A [`CodecError`] when the bytes are not a `T`.
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, CodecError> {
        let name = self.name();
        let bytes = if bytes.is_empty() { self.unit() } else { bytes };
        match self {
            #[cfg(feature = "msgpack")]
            Self::MessagePack => rmp_serde::from_slice(bytes).map_err(|e| CodecError::new(name, e)),
            #[cfg(feature = "json")]
            Self::Json => serde_json::from_slice(bytes).map_err(|e| CodecError::new(name, e)),
            #[cfg(feature = "postcard")]
            Self::Postcard => match ::postcard::take_from_bytes(bytes) {
                Ok((value, [])) => Ok(value),
                Ok((_, rest)) => Err(CodecError::new(
                    name,
                    format_args!("{} trailing bytes after the value", rest.len()),
                )),
                Err(e) => Err(CodecError::new(name, e)),
            },
        }
    }

    /// The encoding of the unit value, written where a payload is empty.
    pub(crate) fn unit(self) -> &'static [u8] {
        match self {
            #[cfg(feature = "msgpack")]
            Self::MessagePack => &[0xc0],
            #[cfg(feature = "json")]
            Self::Json => b"null",
            #[cfg(feature = "postcard")]
            Self::Postcard => &[],
        }
    }

    /// Appends the envelope's encoding to `dst`.
    pub(crate) fn encode_envelope(self, envelope: &Envelope, dst: &mut BytesMut) {
        match self {
            #[cfg(feature = "msgpack")]
            Self::MessagePack => msgpack::encode(envelope, dst),
            #[cfg(feature = "json")]
            Self::Json => json::encode(envelope, dst),
            #[cfg(feature = "postcard")]
            Self::Postcard => postcard::encode(envelope, dst),
        }
    }

    /// Decodes one frame body; the payload is sliced from `frame`, not copied.
    pub(crate) fn decode_envelope(self, frame: Bytes) -> Result<Envelope, EnvelopeError> {
        match self {
            #[cfg(feature = "msgpack")]
            Self::MessagePack => msgpack::decode(frame),
            #[cfg(feature = "json")]
            Self::Json => json::decode(frame),
            #[cfg(feature = "postcard")]
            Self::Postcard => postcard::decode(frame),
        }
    }

    /// Every codec this build supports.
    pub fn all() -> &'static [Codec] {
        &[
            #[cfg(feature = "msgpack")]
            Self::MessagePack,
            #[cfg(feature = "json")]
            Self::Json,
            #[cfg(feature = "postcard")]
            Self::Postcard,
        ]
    }
}

/// A payload for the wire: the codec's unit value when empty.
pub(crate) fn payload_or_unit(codec: Codec, payload: &Bytes) -> &[u8] {
    if payload.is_empty() {
        codec.unit()
    } else {
        payload
    }
}
