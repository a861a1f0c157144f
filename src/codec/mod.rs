//! Codecs: how values and whole envelopes become frame bodies.
//!
//! A codec encodes and decodes *whole envelopes*, not only payloads, so a codec with a
//! different envelope shape (such as the PHP original's own wire format, where the method is a
//! class name) can be added here without touching the dispatcher. Every codec keeps the user
//! payload as the last part of the frame, so decoding slices it out without copying.
//!
//! | codec | feature | self-describing | notes |
//! | --- | --- | --- | --- |
//! | [`Codec::MessagePack`] | `msgpack` (default) | yes | compact and fast, structs by field name; the default |
//! | [`Codec::MessagePackCompact`] | `msgpack` | yes | structs as arrays: smaller, both sides must declare fields alike |
//! | [`Codec::Json`] | `json` | yes | readable on the wire; for debugging and other languages |
//! | [`Codec::Postcard`] | `postcard` | no | smallest frames; both sides need the same Rust types |
//! | [`Codec::Php`] | `php` | yes | the PHP original's own wire: `serialize()` objects, no handshake (see [`php`](crate::php)) |

#[cfg(feature = "json")]
mod json;
#[cfg(feature = "msgpack")]
pub(crate) mod msgpack;
#[cfg(feature = "php")]
pub(crate) mod php;
#[cfg(feature = "postcard")]
mod postcard;

use bytes::{Bytes, BytesMut};
use serde::de::DeserializeOwned;
#[cfg(feature = "postcard")]
use serde::Deserialize;
use serde::Serialize;

use crate::envelope::{Envelope, EnvelopeError};
use crate::error::CodecError;

/// Values are encoded into per-thread chunks of this size and split off, so a small payload
/// costs no allocation of its own; a chunk is freed once every payload cut from it is dropped.
const CHUNK_SIZE: usize = 8 * 1024;
const CHUNK_REFILL: usize = 512;
/// The deepest nesting a MessagePack value may have (serde_json's own limit is the same): deeper
/// input is an error, not a stack overflow.
#[cfg(feature = "msgpack")]
const MAX_DEPTH: usize = 128;

/// The most attributes a decoder reads from one envelope, whatever the limits say: a peer's
/// count never sizes more than this.
pub(crate) const MAX_DECODED_ATTRIBUTES: usize = u16::MAX as usize;

/// `io::Write` into a `BytesMut`, each write one `extend_from_slice`: bytes' own `Writer` goes
/// through `BufMut::put` and `write_all`'s loop, which cost more than a small value's bytes.
pub(crate) struct Sink<'a>(pub(crate) &'a mut BytesMut);

impl std::io::Write for Sink<'_> {
    #[inline]
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    #[inline]
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.0.extend_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A sequence's items, still encoded: each is decoded when it is taken (see
/// [`Codec::split_sequence`]).
#[cfg_attr(not(feature = "msgpack"), allow(dead_code))]
pub(crate) struct EncodedItems {
    codec: Codec,
    bytes: Bytes,
    /// Where the next item starts.
    at: usize,
    /// Items not taken yet, as the sequence's header counts them.
    left: u32,
}

impl EncodedItems {
    /// Items not taken yet.
    pub(crate) fn len(&self) -> u32 {
        self.left
    }

    /// Decodes the next item; `None` after the last. After an error the rest is dropped.
    pub(crate) fn take<T: DeserializeOwned>(&mut self) -> Option<Result<T, CodecError>> {
        if self.left == 0 {
            return None;
        }
        let item = match self.codec {
            #[cfg(feature = "msgpack")]
            Codec::MessagePack | Codec::MessagePackCompact => {
                let rest = &self.bytes[self.at..];
                match msgpack::value_len(rest) {
                    Some(len) => {
                        self.at += len;
                        let mut de = rmp_serde::Deserializer::from_read_ref(&rest[..len]);
                        de.set_max_depth(MAX_DEPTH);
                        T::deserialize(&mut de).map_err(|e| CodecError::new(self.codec.name(), e))
                    }
                    None => Err(sequence_cut_short(self.codec, self.left)),
                }
            }
            // NB. No other codec makes encoded items (see `split_sequence`).
            #[allow(unreachable_patterns)]
            _ => Err(sequence_cut_short(self.codec, self.left)),
        };
        self.left = match item {
            Ok(_) => self.left - 1,
            Err(_) => 0,
        };
        Some(item)
    }
}

#[cold]
fn sequence_cut_short(codec: Codec, left: u32) -> CodecError {
    CodecError::new(
        codec.name(),
        format_args!(
            "stream batch item unreadable: cut short or malformed, with {left} of the \
             sequence's items left"
        ),
    )
}

thread_local! {
    static ENCODE_CHUNK: std::cell::RefCell<BytesMut> = std::cell::RefCell::new(BytesMut::new());
}

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
    /// MessagePack, with structs as maps of field names to values, as JSON has them: a peer
    /// that declares the fields in another order, or one field more (with
    /// `#[serde(default)]`), reads them right. Structs encoded as arrays are read too.
    #[cfg(feature = "msgpack")]
    #[cfg_attr(docsrs, doc(cfg(feature = "msgpack")))]
    MessagePack,
    /// MessagePack with structs as arrays of their values, in declaration order: smaller and
    /// faster, but both sides must declare every struct's fields alike. It is the same codec
    /// on the wire (`msgpack` in the handshake): it reads structs encoded as maps too, so it
    /// talks to [`Codec::MessagePack`].
    #[cfg(feature = "msgpack")]
    #[cfg_attr(docsrs, doc(cfg(feature = "msgpack")))]
    MessagePackCompact,
    /// JSON.
    #[cfg(feature = "json")]
    #[cfg_attr(docsrs, doc(cfg(feature = "json")))]
    Json,
    /// postcard: compact, not self-describing.
    #[cfg(feature = "postcard")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postcard")))]
    Postcard,
    /// The PHP original's wire (flyokai/amp-channel-dispatcher): PHP `serialize()` values in
    /// its own framing, with no handshake. A struct is an object of the class its serde name
    /// gives; a request's class is its method. Choosing it picks the whole wire: see the
    /// [`php`](crate::php) module for what maps to what and how features degrade.
    #[cfg(feature = "php")]
    #[cfg_attr(docsrs, doc(cfg(feature = "php")))]
    Php,
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
    /// The codec's name in the handshake: `msgpack`, `json` or `postcard` (`php` has no
    /// handshake).
    pub fn name(self) -> &'static str {
        match self {
            #[cfg(feature = "msgpack")]
            Self::MessagePack | Self::MessagePackCompact => "msgpack",
            #[cfg(feature = "json")]
            Self::Json => "json",
            #[cfg(feature = "postcard")]
            Self::Postcard => "postcard",
            #[cfg(feature = "php")]
            Self::Php => "php",
        }
    }

    /// `true` for the PHP original's wire.
    pub(crate) fn is_php(self) -> bool {
        #[cfg(feature = "php")]
        return self == Self::Php;
        #[cfg(not(feature = "php"))]
        return false;
    }

    /// The framing of this codec's wire.
    pub(crate) fn framing(self) -> crate::transport::frame::Framing {
        #[cfg(feature = "php")]
        if self == Self::Php {
            return crate::transport::frame::Framing::Php;
        }
        crate::transport::frame::Framing::Native
    }

    /// `false` for an envelope this codec's wire has no form for (the writer leaves it out).
    pub(crate) fn carries(self, envelope: &Envelope) -> bool {
        #[cfg(feature = "php")]
        if self == Self::Php {
            return php::carries(envelope);
        }
        let _ = envelope;
        true
    }

    /// Encodes a value.
    ///
    /// # Errors
    /// A [`CodecError`] when serde refuses the value (for example a map with non-string keys in
    /// JSON).
    pub fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Bytes, CodecError> {
        ENCODE_CHUNK.with(|chunk| match chunk.try_borrow_mut() {
            Ok(mut chunk) => {
                if chunk.capacity() < CHUNK_REFILL {
                    *chunk = BytesMut::with_capacity(CHUNK_SIZE);
                }
                let result = self.encode_into(value, &mut chunk);
                let encoded = chunk.split();
                result.map(|()| encoded.freeze())
            }
            // A `Serialize` impl that encodes with a codec itself: use a buffer of its own.
            Err(_) => {
                let mut buf = BytesMut::new();
                self.encode_into(value, &mut buf)?;
                Ok(buf.freeze())
            }
        })
    }

    pub(crate) fn encode_into<T: Serialize + ?Sized>(
        self,
        value: &T,
        dst: &mut BytesMut,
    ) -> Result<(), CodecError> {
        #[cfg(feature = "php")]
        if self == Self::Php {
            return php::encode_value(value, dst);
        }
        let name = self.name();
        let writer = Sink(dst);
        match self {
            #[cfg(feature = "msgpack")]
            Self::MessagePack => value
                .serialize(&mut rmp_serde::Serializer::new(writer).with_struct_map())
                .map_err(|e| CodecError::new(name, e)),
            #[cfg(feature = "msgpack")]
            Self::MessagePackCompact => value
                .serialize(&mut rmp_serde::Serializer::new(writer))
                .map_err(|e| CodecError::new(name, e)),
            #[cfg(feature = "json")]
            Self::Json => {
                serde_json::to_writer(writer, value).map_err(|e| CodecError::new(name, e))
            }
            #[cfg(feature = "postcard")]
            Self::Postcard => ::postcard::to_io(value, writer)
                .map(drop)
                .map_err(|e| CodecError::new(name, e)),
            #[cfg(feature = "php")]
            Self::Php => unreachable!("written above"),
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
            Self::MessagePack | Self::MessagePackCompact => {
                let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
                de.set_max_depth(MAX_DEPTH);
                T::deserialize(&mut de).map_err(|e| CodecError::new(name, e))
            }
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
            #[cfg(feature = "php")]
            Self::Php => php::decode_value(bytes),
        }
    }

    /// Decodes a sequence (a batch of stream items) onto the end of `into`, all of it or, on
    /// an error, none: for the codecs whose sequences cannot be split undecoded (see
    /// [`Codec::split_sequence`]).
    pub(crate) fn decode_extend<T: DeserializeOwned>(
        self,
        bytes: &[u8],
        into: &mut std::collections::VecDeque<T>,
    ) -> Result<(), CodecError> {
        into.extend(self.decode::<Vec<T>>(bytes)?);
        Ok(())
    }

    /// A sequence (a batch of stream items) whose items stay encoded until each is taken, for
    /// a codec that finds an item's end without its type (MessagePack); `None` for one that
    /// decodes a sequence whole.
    ///
    /// NB. A consumer then holds one decoded item at a time instead of a batch of them: for
    /// small items, every allocation comes from the allocator's per-thread cache.
    pub(crate) fn split_sequence(self, bytes: &Bytes) -> Option<Result<EncodedItems, CodecError>> {
        match self {
            #[cfg(feature = "msgpack")]
            Self::MessagePack | Self::MessagePackCompact => {
                let mut rest = &bytes[..];
                Some(match rmp::decode::read_array_len(&mut rest) {
                    Ok(left) => Ok(EncodedItems {
                        codec: self,
                        at: bytes.len() - rest.len(),
                        left,
                        bytes: bytes.clone(),
                    }),
                    Err(e) => Err(CodecError::new(
                        self.name(),
                        format_args!("not a sequence: {e}"),
                    )),
                })
            }
            #[allow(unreachable_patterns)]
            _ => {
                let _ = bytes;
                None
            }
        }
    }

    /// The number of items in an encoded sequence (a batch of stream items), read without
    /// decoding the items where the codec allows it.
    pub(crate) fn sequence_len(self, bytes: &[u8]) -> Result<usize, CodecError> {
        let name = self.name();
        match self {
            #[cfg(feature = "msgpack")]
            Self::MessagePack | Self::MessagePackCompact => {
                rmp::decode::read_array_len(&mut &bytes[..])
                    .map(|len| len as usize)
                    .map_err(|e| CodecError::new(name, format_args!("not a sequence: {e}")))
            }
            #[cfg(feature = "json")]
            Self::Json => {
                let mut de = serde_json::Deserializer::from_slice(bytes);
                serde::Deserializer::deserialize_seq(&mut de, CountItems)
                    .map_err(|e| CodecError::new(name, e))
            }
            #[cfg(feature = "postcard")]
            Self::Postcard => ::postcard::take_from_bytes::<Varint>(bytes)
                .map(|(Varint(len), _)| usize::try_from(len).unwrap_or(usize::MAX))
                .map_err(|e| CodecError::new(name, format_args!("not a sequence: {e}"))),
            #[cfg(feature = "php")]
            Self::Php => php::sequence_len(bytes),
        }
    }

    /// How many bytes `payload` takes in a frame (an empty one is written as the unit value):
    /// the measure of the peer's pending-bytes window, the same on both sides.
    pub(crate) fn payload_len(self, payload: &[u8]) -> usize {
        if payload.is_empty() {
            self.unit().len()
        } else {
            payload.len()
        }
    }

    /// The encoding of the unit value, written where a payload is empty.
    pub(crate) fn unit(self) -> &'static [u8] {
        match self {
            #[cfg(feature = "msgpack")]
            Self::MessagePack | Self::MessagePackCompact => &[0xc0],
            #[cfg(feature = "json")]
            Self::Json => b"null",
            #[cfg(feature = "postcard")]
            Self::Postcard => &[],
            #[cfg(feature = "php")]
            Self::Php => b"N;",
        }
    }

    /// Appends the envelope's encoding to `dst`.
    pub(crate) fn encode_envelope(self, envelope: &Envelope, dst: &mut BytesMut) {
        match self {
            #[cfg(feature = "msgpack")]
            Self::MessagePack | Self::MessagePackCompact => msgpack::encode(envelope, dst),
            #[cfg(feature = "json")]
            Self::Json => json::encode(envelope, dst),
            #[cfg(feature = "postcard")]
            Self::Postcard => postcard::encode(envelope, dst),
            #[cfg(feature = "php")]
            Self::Php => php::encode(envelope, dst),
        }
    }

    /// Decodes one frame body; the payload is sliced from `frame`, not copied.
    pub(crate) fn decode_envelope(self, frame: Bytes) -> Result<Envelope, EnvelopeError> {
        match self {
            #[cfg(feature = "msgpack")]
            Self::MessagePack | Self::MessagePackCompact => msgpack::decode(frame),
            #[cfg(feature = "json")]
            Self::Json => json::decode(frame),
            #[cfg(feature = "postcard")]
            Self::Postcard => postcard::decode(frame),
            #[cfg(feature = "php")]
            Self::Php => php::decode(frame),
        }
    }

    /// Every codec of this crate's own protocol that this build supports ([`Codec::Php`],
    /// another wire, is not one of them).
    pub fn all() -> &'static [Codec] {
        &[
            #[cfg(feature = "msgpack")]
            Self::MessagePack,
            #[cfg(feature = "msgpack")]
            Self::MessagePackCompact,
            #[cfg(feature = "json")]
            Self::Json,
            #[cfg(feature = "postcard")]
            Self::Postcard,
        ]
    }
}

/// Counts the elements of a sequence, skipping over each.
#[cfg(feature = "json")]
struct CountItems;

#[cfg(feature = "json")]
impl<'de> serde::de::Visitor<'de> for CountItems {
    type Value = usize;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a sequence of items")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
        let mut count = 0;
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
            count += 1;
        }
        Ok(count)
    }
}

/// A postcard sequence's length prefix.
#[cfg(feature = "postcard")]
struct Varint(u64);

#[cfg(feature = "postcard")]
impl<'de> Deserialize<'de> for Varint {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        u64::deserialize(deserializer).map(Varint)
    }
}

/// A payload for the wire: the codec's unit value when empty.
#[cfg(any(feature = "msgpack", feature = "json"))]
pub(crate) fn payload_or_unit(codec: Codec, payload: &Bytes) -> &[u8] {
    if payload.is_empty() {
        codec.unit()
    } else {
        payload
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{ErrorBody, Method};
    use crate::message::Attributes;
    use proptest::prelude::*;

    type Value = (u32, String, Vec<u8>, Option<bool>);

    fn attributes() -> impl Strategy<Value = Attributes> {
        proptest::collection::btree_map(".{0,8}", ".{0,12}", 0..4)
            .prop_map(|map| map.into_iter().collect())
    }

    /// Any envelope, with payloads encoded by `codec` (a payload is always one codec value).
    fn envelope(codec: Codec) -> impl Strategy<Value = Envelope> {
        let payload = any::<Value>().prop_map(move |v| codec.encode(&v).unwrap());
        prop_oneof![
            (
                any::<u64>(),
                ".{0,16}",
                attributes(),
                any::<u64>(),
                any::<u64>(),
                payload.clone()
            )
                .prop_map(|(id, method, attributes, timeout_us, parent, payload)| {
                    Envelope::Request {
                        id,
                        method: Method::from(method),
                        attributes,
                        timeout_us,
                        parent,
                        payload,
                    }
                }),
            (".{0,16}", attributes(), payload.clone()).prop_map(|(method, attributes, payload)| {
                Envelope::Notification {
                    method: Method::from(method),
                    attributes,
                    payload,
                }
            }),
            (any::<u64>(), attributes(), payload.clone()).prop_map(|(id, attributes, payload)| {
                Envelope::Response {
                    id,
                    attributes,
                    payload,
                }
            }),
            (
                any::<u64>(),
                attributes(),
                any::<i64>(),
                ".{0,24}",
                proptest::option::of(payload)
            )
                .prop_map(|(id, attributes, code, message, data)| Envelope::Error {
                    id,
                    attributes,
                    error: ErrorBody {
                        code,
                        message,
                        data,
                    },
                }),
            (any::<i64>(), ".{0,24}").prop_map(|(code, message)| Envelope::Fatal { code, message }),
            any::<u64>().prop_map(|id| Envelope::Cancel { id }),
            ".{0,24}".prop_map(|reason| Envelope::Goodbye { reason }),
            (
                any::<u64>(),
                any::<u64>(),
                proptest::collection::vec(any::<Value>(), 0..4)
            )
                .prop_map(move |(stream, position, items)| Envelope::StreamItems {
                    stream,
                    position,
                    payload: codec.encode(&items).unwrap(),
                }),
            (
                any::<u64>(),
                proptest::option::of((any::<i64>(), ".{0,24}"))
            )
                .prop_map(|(stream, error)| Envelope::StreamEnd {
                    stream,
                    error: error.map(|(code, message)| ErrorBody {
                        code,
                        message,
                        data: None,
                    }),
                }),
            (any::<u64>(), any::<u64>())
                .prop_map(|(stream, credit)| Envelope::StreamCredit { stream, credit }),
            any::<u64>().prop_map(|stream| Envelope::StreamCancel { stream }),
            any::<u64>().prop_map(|credit| Envelope::NotificationCredit { credit }),
        ]
    }

    fn encode(codec: Codec, envelope: &Envelope) -> Bytes {
        let mut buf = BytesMut::new();
        codec.encode_envelope(envelope, &mut buf);
        buf.freeze()
    }

    fn codec_and_envelope() -> impl Strategy<Value = (Codec, Envelope)> {
        proptest::sample::select(Codec::all()).prop_flat_map(|codec| (Just(codec), envelope(codec)))
    }

    proptest! {
        #[test]
        fn every_envelope_round_trips_through_every_codec((codec, envelope) in codec_and_envelope()) {
            let decoded = codec.decode_envelope(encode(codec, &envelope));
            prop_assert_eq!(decoded.map_err(|e| e.error.to_string()), Ok(envelope));
        }

        #[test]
        fn any_bytes_decode_to_an_envelope_or_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            for &codec in Codec::all() {
                if let Err(e) = codec.decode_envelope(Bytes::from(bytes.clone())) {
                    prop_assert!(!e.error.to_string().is_empty(), "an error that says what is wrong");
                }
            }
        }

        #[test]
        fn corrupted_envelopes_never_panic(
            (codec, envelope) in codec_and_envelope(),
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let bytes = encode(codec, &envelope).to_vec();
            let _ = codec.decode_envelope(Bytes::from(bytes[..cut.index(bytes.len() + 1)].to_vec()));
            let mut flipped = bytes.clone();
            let at = flip.index(flipped.len());
            flipped[at] ^= byte;
            let _ = codec.decode_envelope(Bytes::from(flipped));
        }
    }

    #[test]
    fn a_batch_decodes_onto_the_queue_whole_or_not_at_all() {
        for &codec in Codec::all() {
            let mut queue = std::collections::VecDeque::from(["first".to_string()]);
            let batch = codec.encode(&vec!["a", "b"]).unwrap();
            codec.decode_extend(&batch, &mut queue).unwrap();
            assert_eq!(queue, ["first", "a", "b"], "{codec:?}");
            // The second item cut short: nothing of the batch stays.
            let cut = &batch[..batch.len() - 1];
            assert!(codec.decode_extend::<String>(cut, &mut queue).is_err());
            assert_eq!(queue, ["first", "a", "b"], "{codec:?}");
        }
    }

    #[cfg(feature = "msgpack")]
    #[test]
    fn messagepack_structs_go_by_field_name_and_both_forms_are_read() {
        #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
        struct Writer {
            a: i32,
            b: i32,
        }
        #[derive(serde::Deserialize, Debug, PartialEq)]
        struct Reader {
            b: i32,
            a: i32,
            #[serde(default)]
            c: i32,
        }
        let value = Writer { a: 1, b: 2 };
        let maps = Codec::MessagePack.encode(&value).unwrap();
        assert_eq!(maps[0], 0x82, "a map of two fields");
        let read: Reader = Codec::MessagePack.decode(&maps).unwrap();
        assert_eq!(
            (read.a, read.b, read.c),
            (1, 2, 0),
            "by name, whatever the order"
        );
        let arrays = Codec::MessagePackCompact.encode(&value).unwrap();
        assert_eq!(arrays[0], 0x92, "an array of two values");
        assert!(arrays.len() < maps.len());
        for codec in [Codec::MessagePack, Codec::MessagePackCompact] {
            for bytes in [&maps, &arrays] {
                assert_eq!(codec.decode::<Writer>(bytes).unwrap(), value, "{codec:?}");
            }
        }
        assert_eq!(Codec::MessagePackCompact.name(), Codec::MessagePack.name());
    }

    #[test]
    fn request_header_is_readable_from_a_broken_request() {
        for &codec in Codec::all() {
            let request = Envelope::Request {
                id: 77,
                method: Method::from_static("m"),
                attributes: Attributes::new(),
                timeout_us: 0,
                parent: 0,
                payload: codec.encode(&1u8).unwrap(),
            };
            let bytes = encode(codec, &request);
            // Cut inside the method name: the kind and the id come first and survive.
            let cut = bytes.len() - 4;
            let error = codec
                .decode_envelope(bytes.slice(..cut))
                .expect_err("a cut request does not decode");
            assert_eq!(
                error.header.kind,
                Some(crate::EnvelopeKind::Request),
                "{codec:?}"
            );
            assert_eq!(error.header.id, Some(77), "{codec:?}");
        }
    }

    #[test]
    fn payload_is_sliced_from_the_frame_not_copied() {
        for &codec in Codec::all() {
            let payload = codec.encode(&"a payload of some length").unwrap();
            let frame = encode(
                codec,
                &Envelope::Response {
                    id: 1,
                    attributes: Attributes::new(),
                    payload: payload.clone(),
                },
            );
            let Ok(Envelope::Response {
                payload: decoded, ..
            }) = codec.decode_envelope(frame.clone())
            else {
                panic!("{codec:?}: not a response");
            };
            assert_eq!(decoded, payload);
            let inside = frame.as_ptr() as usize..frame.as_ptr() as usize + frame.len();
            assert!(inside.contains(&(decoded.as_ptr() as usize)), "{codec:?}");
        }
    }
}

/// The examples in PROTOCOL.md, byte for byte.
#[cfg(test)]
mod protocol_examples {
    use super::*;
    use crate::message::Attributes;

    fn response(codec: Codec) -> Bytes {
        let mut buf = BytesMut::new();
        codec.encode_envelope(
            &Envelope::Response {
                id: 7,
                attributes: Attributes::new(),
                payload: codec.encode(&5u8).unwrap(),
            },
            &mut buf,
        );
        buf.freeze()
    }

    #[cfg(feature = "msgpack")]
    #[test]
    fn msgpack_response_bytes() {
        assert_eq!(
            &response(Codec::MessagePack)[..],
            [0x94, 0x03, 0x07, 0x80, 0x05]
        );
    }

    #[cfg(feature = "json")]
    #[test]
    fn json_request_text() {
        use crate::envelope::Method;

        #[derive(serde::Serialize)]
        struct Add {
            a: i32,
            b: i32,
        }
        let mut buf = BytesMut::new();
        Codec::Json.encode_envelope(
            &Envelope::Request {
                id: 7,
                method: Method::from_static("math/add"),
                attributes: [("trace-id", "ab12")].into_iter().collect(),
                timeout_us: 0,
                parent: 0,
                payload: Codec::Json.encode(&Add { a: 2, b: 3 }).unwrap(),
            },
            &mut buf,
        );
        assert_eq!(
            &buf[..],
            br#"[1,7,"math/add",{"trace-id":"ab12"},0,0,{"a":2,"b":3}]"#
        );
        assert_eq!(&response(Codec::Json)[..], b"[3,7,{},5]");
    }

    #[cfg(feature = "postcard")]
    #[test]
    fn postcard_response_bytes() {
        assert_eq!(&response(Codec::Postcard)[..], [3, 7, 0, 5]);
    }
}
/// The encodings of each serde shape, as PROTOCOL.md section 4 states them for a peer in
/// another language.
#[cfg(all(test, feature = "msgpack", feature = "json", feature = "postcard"))]
mod payload_shapes {
    use super::Codec;
    use serde::{Serialize, Serializer};

    #[derive(Serialize)]
    struct Struct {
        a: u8,
        b: &'static str,
    }
    #[derive(Serialize)]
    struct Newtype(u8);
    #[derive(Serialize)]
    struct Tuple(u8, bool);
    #[derive(Serialize)]
    struct UnitStruct;
    #[derive(Serialize)]
    enum Enum {
        Unit,
        Newtype(u8),
        Tuple(u8, u8),
        Struct { x: u8 },
    }
    /// What `serde_bytes` makes of a byte slice.
    struct ByteString(&'static [u8]);
    impl Serialize for ByteString {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.serialize_bytes(self.0)
        }
    }

    /// `[msgpack, msgpack compact, json, postcard]`: MessagePack and postcard in hex.
    fn check<V: Serialize>(shape: &str, value: &V, expected: [&str; 4]) {
        let codecs = [
            Codec::MessagePack,
            Codec::MessagePackCompact,
            Codec::Json,
            Codec::Postcard,
        ];
        for (codec, expected) in codecs.into_iter().zip(expected) {
            let bytes = codec.encode(value).unwrap();
            let seen = match codec {
                Codec::Json => String::from_utf8(bytes.to_vec()).unwrap(),
                _ => bytes
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(" "),
            };
            assert_eq!(seen, expected, "{shape} in {codec:?}");
        }
    }

    #[test]
    fn each_serde_shape_is_encoded_as_protocol_md_says() {
        let s = Struct { a: 1, b: "x" };
        check(
            "struct",
            &s,
            [
                "82 a1 61 01 a1 62 a1 78",
                "92 01 a1 78",
                r#"{"a":1,"b":"x"}"#,
                "01 01 78",
            ],
        );
        check("newtype struct", &Newtype(1), ["01", "01", "1", "01"]);
        check(
            "tuple struct",
            &Tuple(1, true),
            ["92 01 c3", "92 01 c3", "[1,true]", "01 01"],
        );
        check("unit struct", &UnitStruct, ["90", "90", "null", ""]);
        check("unit", &(), ["c0", "c0", "null", ""]);
        check("None", &None::<u8>, ["c0", "c0", "null", "00"]);
        check("Some", &Some(1u8), ["01", "01", "1", "01 01"]);
        check(
            "unit variant",
            &Enum::Unit,
            ["a4 55 6e 69 74", "a4 55 6e 69 74", r#""Unit""#, "00"],
        );
        let newtype = [
            "81 a7 4e 65 77 74 79 70 65 01",
            "81 a7 4e 65 77 74 79 70 65 01",
        ];
        check(
            "newtype variant",
            &Enum::Newtype(1),
            [newtype[0], newtype[1], r#"{"Newtype":1}"#, "01 01"],
        );
        let tuple = "81 a5 54 75 70 6c 65 92 01 02";
        check(
            "tuple variant",
            &Enum::Tuple(1, 2),
            [tuple, tuple, r#"{"Tuple":[1,2]}"#, "02 01 02"],
        );
        check(
            "struct variant",
            &Enum::Struct { x: 1 },
            [
                "81 a6 53 74 72 75 63 74 81 a1 78 01",
                "81 a6 53 74 72 75 63 74 91 01",
                r#"{"Struct":{"x":1}}"#,
                "03 01",
            ],
        );
        check(
            "Vec<u8>",
            &vec![1u8, 2],
            ["92 01 02", "92 01 02", "[1,2]", "02 01 02"],
        );
        check(
            "byte string",
            &ByteString(&[1, 2]),
            ["c4 02 01 02", "c4 02 01 02", "[1,2]", "02 01 02"],
        );
        let map = std::collections::BTreeMap::from([("k", 1u8)]);
        check(
            "map",
            &map,
            ["81 a1 6b 01", "81 a1 6b 01", r#"{"k":1}"#, "01 01 6b 01"],
        );
        check(
            "f64",
            &1.5f64,
            [
                "cb 3f f8 00 00 00 00 00 00",
                "cb 3f f8 00 00 00 00 00 00",
                "1.5",
                "00 00 00 00 00 00 f8 3f",
            ],
        );
        check("i64", &-3i64, ["fd", "fd", "-3", "05"]);
    }
}
