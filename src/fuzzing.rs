//! Entry points for the fuzz targets (`fuzz/`) and their proptest twins; not part of the API.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::transport::frame::{Frame, FrameReader};
use crate::transport::handshake::{Hello, PROTOCOL_VERSION};
use crate::{
    request, stream_request, Channel, Codec, Context, Dispatcher, HandlerError, Incoming, Limits,
    Reply, Router,
};

/// Cuts `bytes` into frames, as the read loop does; returns how many whole frames.
pub fn frames(bytes: &[u8], max_frame: usize) -> usize {
    let mut reader = FrameReader::new(Box::new(tokio::io::empty()), max_frame);
    reader.feed(bytes);
    let mut whole = 0;
    while let Some(frame) = reader.next_frame() {
        match frame {
            Frame::Whole(body) => {
                assert!(body.len() <= max_frame);
                whole += 1;
            }
            Frame::TooLarge { len, .. } => {
                assert!(len > max_frame);
                break;
            }
            Frame::Malformed(reason) => {
                assert!(!reason.is_empty());
                break;
            }
        }
    }
    whole
}

/// Decodes one frame body as an envelope with `codec` and checks it against the default
/// limits; `true` when it is a valid envelope.
pub fn envelope(codec: Codec, body: &[u8]) -> bool {
    match codec.decode_envelope(bytes::Bytes::copy_from_slice(body)) {
        Ok(envelope) => Limits::default().check_envelope(&envelope).is_ok(),
        Err(e) => {
            assert!(!e.error.to_string().is_empty());
            false
        }
    }
}

/// Finds the length of the MessagePack value `body` starts with, as a stream batch's items are
/// split, and checks it against rmp_serde: one finds a value where the other does, of the same
/// length.
#[cfg(feature = "msgpack")]
pub fn value_len(body: &[u8]) {
    let found = crate::codec::msgpack::value_len(body);
    let mut rest = body;
    let mut de = rmp_serde::Deserializer::new(&mut rest);
    // NB. Deeper than any fuzzed input nests, yet bounded: rmp_serde recurses per level.
    de.set_max_depth(4096);
    let read = <serde::de::IgnoredAny as serde::Deserialize>::deserialize(&mut de).is_ok();
    drop(de);
    let read = read.then_some(body.len() - rest.len());
    assert_eq!(found, read, "{body:x?}");
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Numbers(u8);
stream_request!(Numbers => u8, "numbers");

/// Asks the peer back, nested, for `n - 1`, down to 0.
#[derive(serde::Serialize, serde::Deserialize)]
struct Back(u8);
request!(Back => u8, "back");

/// The largest frame the fuzzed connection accepts.
pub const MAX_FRAME: usize = 64 * 1024;

/// Opens an iterator of `count` numbers (a stored stream the peer pulls, as PHP's are).
#[derive(serde::Serialize, serde::Deserialize)]
struct Open {
    count: u8,
}
request!(Open => Opened, "Open");

#[derive(serde::Serialize, serde::Deserialize)]
struct Opened {
    #[serde(rename = "iteratorId")]
    iterator_id: u64,
}

/// Runs a connection (MessagePack, small limits, a router with echo, a nested call back, a
/// stream and a notification that never ends) against a peer that completes the handshake
/// and then sends `frames` (each given its length prefix; with `raw`, the bytes as they are),
/// reads everything, and closes. The connection must end, in time, without a panic.
pub fn connection(frames: &[Vec<u8>], raw: bool) {
    connection_with(Codec::MessagePack, frames, raw)
}

/// As [`connection`], on the wire of `codec`: with [`Codec::Php`] the PHP original's (its
/// framing, no handshake).
pub fn connection_with(codec: Codec, frames: &[Vec<u8>], raw: bool) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("a runtime");
    runtime.block_on(run_connection(codec, frames, raw));
}

async fn run_connection(codec: Codec, frames: &[Vec<u8>], raw: bool) {
    let limits = Limits {
        max_frame_length: MAX_FRAME,
        max_attributes: 4,
        max_attribute_bytes: 256,
        max_method_length: 32,
        max_pending_requests: 8,
        max_nested_requests: 4,
        max_pending_notifications: 4,
        max_pending_bytes: 128 * 1024,
    };
    let router = Router::new()
        .raw("echo", |incoming: Incoming| async move {
            Ok(Reply::value(incoming.payload().clone()))
        })
        .request(|cx: Context, Back(n)| async move {
            match n {
                0 => Ok(0),
                n => Ok(cx.request(Back(n - 1)).await?.saturating_add(1)),
            }
        })
        .raw("hold", |_incoming: Incoming| async move {
            std::future::pending::<()>().await;
            Ok(Reply::nothing())
        })
        .stream(
            |_cx: Context, Numbers(n)| async move { Ok(futures_util::stream::iter(0..n).map(Ok)) },
        )
        .request(|cx: Context, Open { count }| async move {
            let streams = cx
                .streams()
                .ok_or_else(|| HandlerError::internal("ended"))?;
            let iterator_id = streams.add(futures_util::stream::iter(0..count).map(Ok))?;
            Ok(Opened { iterator_id })
        });
    let (ours, theirs) = tokio::io::duplex(16 * 1024);
    let builder = Dispatcher::builder().codec(codec);
    #[cfg(feature = "php")]
    let builder = builder.php_notification("hold");
    let (dispatcher, connection) = builder
        .handler(router)
        .limits(limits)
        .max_concurrent_handlers(2)
        .max_in_flight(4)
        .write_buffer_limit(4096)
        .stream_window(4)
        .build(Channel::from_io(ours));
    // Something of ours in flight for the peer's answers to find.
    let calls = async {
        let _ = dispatcher.call_raw("echo", bytes::Bytes::new()).await;
        let _ = dispatcher.stream(Numbers(3)).collect::<Vec<_>>().await;
        if let Ok(opened) = dispatcher.request(Open { count: 3 }).await {
            let pulled = crate::RemoteStream::<u8>::pull(&dispatcher, opened.iterator_id);
            let _ = pulled.collect::<Vec<_>>().await;
        }
    };
    let (mut read, mut write) = tokio::io::split(theirs);
    let peer = async move {
        let hello = Hello {
            version: PROTOCOL_VERSION,
            codec: Codec::MessagePack.name().to_owned(),
            token: None,
            limits: Limits::default(),
        };
        let mut bytes = Vec::new();
        let php = codec.is_php();
        if !php {
            for body in [&hello.encode()[..], &[0]] {
                bytes.extend_from_slice(&(body.len() as u32).to_be_bytes());
                bytes.extend_from_slice(body);
            }
        }
        for frame in frames {
            match (raw, php) {
                (true, _) => {}
                (false, false) => bytes.extend_from_slice(&(frame.len() as u32).to_be_bytes()),
                (false, true) => {
                    bytes.push(0);
                    bytes.extend_from_slice(&(frame.len() as u32).to_le_bytes());
                }
            }
            bytes.extend_from_slice(frame);
        }
        // The connection may end before it read everything: a failed write is fine.
        let _ = write.write_all(&bytes).await;
        let _ = write.shutdown().await;
        drop(write);
    };
    let drain = async move {
        let mut buf = vec![0; 16 * 1024];
        while read.read(&mut buf).await.is_ok_and(|n| n > 0) {}
    };
    let bounded = tokio::time::timeout(Duration::from_secs(600), async {
        futures_util::future::join4(connection, calls, peer, drain)
            .await
            .0
    });
    // NB. Driven here, not spawned: a panic in the driver is the fuzzer's crash.
    let reason = bounded
        .await
        .expect("the connection ends after the peer's end of file");
    drop(reason);
    assert!(dispatcher.is_closed());
}

/// The fuzz target's own input format: frames as `len: u8` (255: a `u16` LE follows) and that
/// many bytes; the first byte's low bit asks for raw bytes (no length prefixes), its next bit
/// for the PHP wire (with the `php` feature).
pub fn connection_from_bytes(data: &[u8]) {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let mut frames = Vec::new();
    while let Some((&len, tail)) = rest.split_first() {
        let (len, tail) = match (len, tail) {
            (255, [low, high, tail @ ..]) => (u16::from_le_bytes([*low, *high]) as usize, tail),
            (len, tail) => (len as usize, tail),
        };
        let len = len.min(tail.len());
        frames.push(tail[..len].to_vec());
        rest = &tail[len..];
    }
    #[cfg(feature = "php")]
    let codec = match mode & 2 {
        0 => Codec::MessagePack,
        _ => Codec::Php,
    };
    #[cfg(not(feature = "php"))]
    let codec = Codec::MessagePack;
    connection_with(codec, &frames, mode & 1 == 1);
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::{json, Value};

    /// A field an envelope could have: ids, lengths and credits near the edges, the router's
    /// methods, attribute maps, payloads.
    fn field() -> impl Strategy<Value = Value> {
        prop_oneof![
            (0u64..5).prop_map(Value::from),
            Just(json!(u64::MAX)),
            Just(json!(u32::MAX)),
            Just(json!(-1)),
            prop::sample::select(vec!["echo", "back", "hold", "numbers", "$stream/next", "x"])
                .prop_map(Value::from),
            Just(json!({})),
            Just(json!({"trace": "t"})),
            Just(Value::Null),
            prop::collection::vec(0u8..4, 0..4).prop_map(|items| json!(items)),
            ".{0,8}".prop_map(Value::from),
        ]
    }

    /// An envelope-shaped frame (a MessagePack array of a kind and fields), or garbage.
    fn frame() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            4 => (0u64..14, prop::collection::vec(field(), 0..8)).prop_map(|(kind, fields)| {
                let mut array = vec![json!(kind)];
                array.extend(fields);
                rmp_serde::to_vec(&array).expect("a value encodes")
            }),
            1 => prop::collection::vec(any::<u8>(), 0..48),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The fuzz target's property in every CI run: whatever the peer sends after a valid
        /// handshake, the connection ends once the peer closes, without a panic.
        #[test]
        fn any_peer_input_ends_the_connection_without_a_panic(
            frames in prop::collection::vec(frame(), 0..24),
            raw in prop::bool::weighted(0.1),
        ) {
            super::connection(&frames, raw);
        }
    }

    /// A PHP value a field of a PHP message could hold: ids near the edges, the router's
    /// classes as strings, bools, null, a nested array.
    #[cfg(feature = "php")]
    fn php_field() -> impl Strategy<Value = crate::php::PhpValue> {
        use crate::php::{ArrayKey, PhpValue};
        prop_oneof![
            (-2i64..5).prop_map(PhpValue::Int),
            Just(PhpValue::Int(i64::MAX)),
            Just(PhpValue::Int(i64::MIN)),
            any::<bool>().prop_map(PhpValue::Bool),
            Just(PhpValue::Null),
            ".{0,8}".prop_map(|s| PhpValue::String(s.into_bytes())),
            Just(PhpValue::Array(vec![(ArrayKey::Int(0), PhpValue::Null)])),
        ]
    }

    /// A PHP-message-shaped frame (an object of a class the connection knows, or of PHP's own,
    /// with properties it reads), `null`, or garbage.
    #[cfg(feature = "php")]
    fn php_frame() -> impl Strategy<Value = Vec<u8>> {
        use crate::php::{PhpObject, PhpValue, Property};
        let class = prop::sample::select(vec![
            "echo",
            "back",
            "hold",
            "numbers",
            "Open",
            "Flyokai\\AmpChannelDispatcher\\Request\\IteratorContinue",
            "Flyokai\\AmpChannelDispatcher\\Response\\IteratorContinue",
            "Flyokai\\AmpChannelDispatcher\\SuccessResponse",
            "Flyokai\\AmpChannelDispatcher\\ErrorResponse",
            "Flyokai\\AmpChannelDispatcher\\FatalErrorResponse",
            "Unknown",
        ]);
        let name = prop::sample::select(vec![
            "id",
            "requestId",
            "iteratorId",
            "count",
            "continue",
            "position",
            "value",
            "code",
            "message",
        ]);
        let object = (class, prop::collection::vec((name, php_field()), 0..6)).prop_map(
            |(class, properties)| {
                let mut object = PhpObject::new(class);
                for (name, value) in properties {
                    object = object.with(Property::public(name), value);
                }
                PhpValue::Object(object).to_bytes()
            },
        );
        prop_oneof![
            8 => object,
            1 => Just(b"N;".to_vec()),
            1 => prop::collection::vec(any::<u8>(), 0..48),
        ]
    }

    #[cfg(feature = "php")]
    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The same on the PHP wire (no handshake there).
        #[test]
        fn any_php_peer_input_ends_the_connection_without_a_panic(
            frames in prop::collection::vec(php_frame(), 0..24),
            raw in prop::bool::weighted(0.1),
        ) {
            super::connection_with(crate::Codec::Php, &frames, raw);
        }
    }
}
