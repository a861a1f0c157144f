//! The scripted PHP peer of the PHP-wire tests: it writes and reads whole frames of the PHP
//! library's wire, and the helpers that build and read its messages.

#![allow(dead_code)] // each test file uses its own share

use std::time::Duration;

use bytes::BytesMut;
use channel_dispatcher::php::framing::Frames;
use channel_dispatcher::php::{DecodeLimits, PhpObject, PhpValue, Property};
use channel_dispatcher::Channel;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub(crate) const NS: &str = "Flyokai\\AmpChannelDispatcher\\";
pub(crate) const LONG: Duration = Duration::from_secs(30);

pub(crate) fn fqcn(name: &str) -> String {
    format!("{NS}{name}")
}

pub(crate) fn decode(bytes: &[u8]) -> PhpValue {
    PhpValue::from_bytes(bytes, &DecodeLimits::default()).unwrap()
}

pub(crate) fn object(value: PhpValue) -> PhpObject {
    match value {
        PhpValue::Object(object) => object,
        other => panic!("expected an object, got {other}"),
    }
}

pub(crate) fn s(text: &str) -> PhpValue {
    PhpValue::String(text.as_bytes().to_vec())
}

pub(crate) fn int(object: &PhpObject, name: &str) -> i64 {
    match object.get(name.as_bytes()) {
        Some(PhpValue::Int(value)) => *value,
        other => panic!(
            "{name} is {other:?} in {}",
            PhpValue::Object(object.clone())
        ),
    }
}

pub(crate) fn text(object: &PhpObject, name: &str) -> String {
    match object.get(name.as_bytes()) {
        Some(PhpValue::String(bytes)) => String::from_utf8_lossy(bytes).into_owned(),
        other => panic!(
            "{name} is {other:?} in {}",
            PhpValue::Object(object.clone())
        ),
    }
}

/// A message of `class` as PHP writes one: its properties in order, then its private `id`.
pub(crate) fn message(class: &str, properties: &[(&str, PhpValue)], id: i64) -> PhpValue {
    let mut object = PhpObject::new(class);
    for (name, value) in properties {
        object = object.with(Property::public(*name), value.clone());
    }
    PhpValue::Object(object.with(Property::private(class, "id"), PhpValue::Int(id)))
}

pub(crate) fn ping(note: &str, id: i64) -> PhpValue {
    message("PingRequest", &[("note", s(note))], id)
}

/// What PHP's `RemoteIterator` sends for the next item of `iterator`.
pub(crate) fn pull(iterator: i64, id: i64) -> PhpValue {
    message(
        &fqcn("Request\\IteratorContinue"),
        &[("iteratorId", PhpValue::Int(iterator))],
        id,
    )
}

pub(crate) fn framed(payload: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    Frames::encode(payload, &mut out);
    out.to_vec()
}

/// The PHP side, scripted: writes and reads whole frames on the raw wire.
pub(crate) struct Php {
    pub(crate) read: Box<dyn AsyncRead + Unpin + Send>,
    pub(crate) write: Box<dyn AsyncWrite + Unpin + Send>,
    pub(crate) buf: BytesMut,
}

impl Php {
    pub(crate) fn new(
        read: impl AsyncRead + Unpin + Send + 'static,
        write: impl AsyncWrite + Unpin + Send + 'static,
    ) -> Self {
        Self {
            read: Box::new(read),
            write: Box::new(write),
            buf: BytesMut::new(),
        }
    }

    /// The other end of a fresh duplex pipe, whose end for the Rust side comes with it.
    pub(crate) fn pipe() -> (Self, Channel) {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let (read, write) = tokio::io::split(theirs);
        (Self::new(read, write), Channel::from_io(ours))
    }

    /// Takes the write half away (for a task of its own); this one writes nowhere after.
    pub(crate) fn take_write(&mut self) -> Box<dyn AsyncWrite + Unpin + Send> {
        std::mem::replace(&mut self.write, Box::new(tokio::io::sink()))
    }

    pub(crate) async fn send_bytes(&mut self, payload: &[u8]) {
        self.write.write_all(&framed(payload)).await.unwrap();
    }

    pub(crate) async fn send(&mut self, value: &PhpValue) {
        self.send_bytes(&value.to_bytes()).await;
    }

    /// The next frame's payload; `None` at end of file.
    pub(crate) async fn recv_bytes(&mut self) -> Option<Vec<u8>> {
        let frames = Frames::new(1 << 24);
        loop {
            if let Some(payload) = frames.decode(&mut self.buf).unwrap() {
                return Some(payload.to_vec());
            }
            let read = tokio::time::timeout(LONG, self.read.read_buf(&mut self.buf))
                .await
                .expect("the Rust side went quiet")
                .unwrap();
            if read == 0 {
                assert!(self.buf.is_empty(), "end of file inside a frame");
                return None;
            }
        }
    }

    pub(crate) async fn recv(&mut self) -> PhpValue {
        decode(&self.recv_bytes().await.expect("a frame, not the end"))
    }

    pub(crate) async fn recv_object(&mut self) -> PhpObject {
        object(self.recv().await)
    }

    /// The stop marker, then the end of file: how our side ends a PHP peer.
    pub(crate) async fn expect_stop_marker_then_eof(&mut self) {
        assert_eq!(self.recv().await, PhpValue::Null, "the stop marker");
        assert_eq!(self.recv_bytes().await, None, "then the end");
    }
}
