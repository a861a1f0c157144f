//! A hand-written peer: frames in, frames out, MessagePack envelopes as PROTOCOL.md draws them,
//! over a Unix socket. For the suites that play a peer the dispatcher cannot trust.

use std::collections::BTreeMap;
use std::io;
use std::time::Duration;

use channel_dispatcher::{Builder, Channel, Dispatcher, Router};
use serde::Serialize;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::within;

pub type NoAttributes = BTreeMap<String, String>;

/// The protocol version of PROTOCOL.md.
pub const VERSION: u16 = 2;

/// The limits a raw peer announces (PROTOCOL.md, section 2): the defaults.
pub const LIMITS: [u32; 8] = [16 << 20, 64, 16 << 10, 256, 4096, 1024, 4096, 64 << 20];

/// The body of a hello frame (PROTOCOL.md, section 2): no token, the default limits. Every raw
/// peer builds its hello here, so a change of the handshake format is made in one place.
pub fn hello(version: u16, codec: &str) -> Vec<u8> {
    let mut body = b"CHDP".to_vec();
    body.extend_from_slice(&version.to_be_bytes());
    body.push(codec.len() as u8);
    body.extend_from_slice(codec.as_bytes());
    body.extend_from_slice(&0u16.to_be_bytes());
    for limit in LIMITS {
        body.extend_from_slice(&limit.to_be_bytes());
    }
    body
}

/// `body` with its length prefix.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    frame
}

/// An envelope (a tuple such as `(3u8, id, NoAttributes::new(), payload)`) as a frame body.
pub fn envelope<T: Serialize>(envelope: &T) -> Vec<u8> {
    rmp_serde::to_vec(envelope).unwrap()
}

/// A hand-written peer: frames in, frames out.
pub struct RawPeer {
    pub io: UnixStream,
}

impl RawPeer {
    pub fn new(io: UnixStream) -> Self {
        Self { io }
    }

    /// A dispatcher with `router` on one end, this raw peer (handshake done) on the other.
    pub async fn connect(router: Router, max_frame: usize) -> (Dispatcher, RawPeer) {
        Self::connect_with(
            Dispatcher::builder()
                .handler(router)
                .max_frame_length(max_frame),
        )
        .await
    }

    /// A dispatcher built by `builder` on one end, this raw peer (handshake done) on the other.
    pub async fn connect_with(builder: Builder) -> (Dispatcher, RawPeer) {
        let (a, b) = UnixStream::pair().unwrap();
        let dispatcher = builder.spawn(Channel::from(a));
        let mut peer = RawPeer::new(b);
        peer.handshake().await;
        (dispatcher, peer)
    }

    /// Sends our hello and an accept, then reads the dispatcher's hello and its accept.
    pub async fn handshake(&mut self) {
        self.send_frame(&hello(VERSION, "msgpack")).await;
        self.send_frame(&[0]).await;
        assert_eq!(&self.read_frame().await.unwrap()[..4], b"CHDP");
        assert_eq!(
            self.read_frame().await.unwrap(),
            [0],
            "the dispatcher accepts"
        );
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.unwrap();
    }

    /// Writes `bytes`, which the dispatcher may refuse to read (it may end the connection).
    pub async fn try_send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.io.write_all(bytes).await
    }

    pub async fn send_frame(&mut self, body: &[u8]) {
        self.send_raw(&frame(body)).await;
    }

    pub async fn send<T: Serialize>(&mut self, envelope: &T) {
        self.send_frame(&self::envelope(envelope)).await;
    }

    /// The next frame body; `None` at end of file.
    pub async fn read_frame(&mut self) -> Option<Vec<u8>> {
        within(self.next_frame()).await
    }

    async fn next_frame(&mut self) -> Option<Vec<u8>> {
        let len = self.io.read_u32().await.ok()? as usize;
        let mut body = vec![0; len];
        self.io.read_exact(&mut body).await.ok()?;
        Some(body)
    }

    /// The next envelope, as JSON for easy matching.
    pub async fn read(&mut self) -> Value {
        let frame = self.read_frame().await.expect("a frame");
        rmp_serde::from_slice(&frame).expect("a MessagePack envelope")
    }

    /// The next envelope, if one arrives within `patience`.
    pub async fn read_within(&mut self, patience: Duration) -> Option<Value> {
        let frame = tokio::time::timeout(patience, self.next_frame())
            .await
            .ok()??;
        Some(rmp_serde::from_slice(&frame).expect("a MessagePack envelope"))
    }

    /// Reads envelopes until one matches `wanted`, and returns it; the others are dropped.
    pub async fn read_until(&mut self, mut wanted: impl FnMut(&Value) -> bool) -> Value {
        loop {
            let envelope = self.read().await;
            if wanted(&envelope) {
                return envelope;
            }
        }
    }

    /// Reads the dispatcher's request and returns its id.
    pub async fn read_request(&mut self, method: &str) -> u64 {
        let request = self.read().await;
        assert_eq!(request[0], 1, "{request}");
        assert_eq!(request[2], method, "{request}");
        request[1].as_u64().unwrap()
    }

    /// Reads a stream credit (kind 10) for `stream` and returns the credit.
    pub async fn read_credit(&mut self, stream: u64) -> u64 {
        let credit = self.read().await;
        assert_eq!(credit[0], 10, "not a stream credit: {credit}");
        assert_eq!(credit[1], stream, "{credit}");
        credit[2].as_u64().unwrap()
    }

    pub async fn request<P: Serialize + ?Sized>(&mut self, id: u64, method: &str, payload: &P) {
        self.send(&(1u8, id, method, NoAttributes::new(), 0u64, 0u64, payload))
            .await;
    }

    /// A request whose payload is `payload`, raw MessagePack bytes spliced in as they are.
    pub async fn request_with_raw_payload(&mut self, id: u64, method: &str, payload: &[u8]) {
        let mut body = envelope(&(1u8, id, method, NoAttributes::new(), 0u64, 0u64, ()));
        assert_eq!(body.pop(), Some(0xc0), "the unit payload is the last byte");
        body.extend_from_slice(payload);
        self.send_frame(&body).await;
    }

    pub async fn respond<P: Serialize + ?Sized>(&mut self, id: u64, payload: &P) {
        self.send(&(3u8, id, NoAttributes::new(), payload)).await;
    }

    /// Asks for a stream with request `id` and returns the stream id answered.
    pub async fn open_stream<P: Serialize + ?Sized>(
        &mut self,
        id: u64,
        method: &str,
        payload: &P,
    ) -> u64 {
        self.request(id, method, payload).await;
        let answer = self.read().await;
        assert_eq!(
            (answer[0].as_u64(), answer[1].as_u64()),
            (Some(3), Some(id)),
            "{answer}"
        );
        answer[3].as_u64().expect("a stream id")
    }

    /// An error answer (kind 4).
    pub async fn respond_error(&mut self, id: u64, code: i64, message: &str) {
        self.send(&(4u8, id, NoAttributes::new(), code, message))
            .await;
    }

    /// A batch of stream items (kind 8) starting at `position`.
    pub async fn stream_items<T: Serialize>(&mut self, stream: u64, position: u64, items: &[T]) {
        self.send(&(8u8, stream, position, items)).await;
    }

    /// The end of a stream (kind 9).
    pub async fn stream_end(&mut self, stream: u64) {
        self.send(&(9u8, stream)).await;
    }

    /// Credit for a stream (kind 10).
    pub async fn stream_credit(&mut self, stream: u64, credit: u64) {
        self.send(&(10u8, stream, credit)).await;
    }

    /// The cancel of a stream (kind 11).
    pub async fn stream_cancel(&mut self, stream: u64) {
        self.send(&(11u8, stream)).await;
    }
}
