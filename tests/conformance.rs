//! Wire behaviours of PROTOCOL.md that the other suites check only between two dispatchers,
//! checked here byte for byte by a raw peer (see PROTOCOL.md, "Conformance").

mod support;

use std::future::IntoFuture;
use std::time::Duration;

use channel_dispatcher::error::code;
use channel_dispatcher::{
    request, stream_request, Channel, Context, Dispatcher, HandshakeError, Router, Termination,
};
use futures_util::stream;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use support::raw::{hello, RawPeer, VERSION};
use support::{within, Echo};
use tokio::net::UnixStream;

#[derive(Serialize, Deserialize)]
struct Numbers(u64);
stream_request!(Numbers => u64, "numbers");

/// A stream that never yields: a pull of it waits.
#[derive(Serialize, Deserialize)]
struct Never;
stream_request!(Never => u64, "never");

/// Never answered: keeps a handler running.
#[derive(Serialize, Deserialize)]
struct Hang;
request!(Hang => (), "hang");

fn router() -> Router {
    Router::new()
        .request(|_cx: Context, Echo(s)| async move { Ok(s) })
        .request(|_cx: Context, Hang| std::future::pending())
        .stream(|_cx: Context, Numbers(n)| async move { Ok(stream::iter((0..n).map(Ok))) })
        .stream(|_cx: Context, Never| async move { Ok(stream::pending()) })
}

/// The byte offset of the first limit (`max_frame_length`) in a hello without a token.
const FIRST_LIMIT: usize = 4 + 2 + 1 + "msgpack".len() + 2;

/// A raw peer's hello presenting `token`.
fn hello_with_token(token: &str) -> Vec<u8> {
    let mut body = hello(VERSION, "msgpack");
    let at = FIRST_LIMIT - 2;
    body.splice(at..at + 2, (token.len() as u16).to_be_bytes());
    body.splice(at + 2..at + 2, token.bytes());
    body
}

/// The refusal a dispatcher expecting a token sends to a raw hello, and how it ended.
async fn refusal_of(hello: Vec<u8>) -> (Vec<u8>, Termination) {
    let (a, b) = UnixStream::pair().unwrap();
    let dispatcher = Dispatcher::builder()
        .expect_token("s3cret")
        .spawn(Channel::from(a));
    let mut peer = RawPeer::new(b);
    peer.send_frame(&hello).await;
    peer.send_frame(&[0]).await;
    assert_eq!(&peer.read_frame().await.unwrap()[..4], b"CHDP");
    let verdict = peer.read_frame().await.expect("a verdict");
    (verdict, within(dispatcher.closed()).await)
}

/// Reads the stream's items (kind 8) until `count` have come; returns them.
async fn read_items(peer: &mut RawPeer, stream: u64, count: usize) -> Vec<u64> {
    let mut items = Vec::new();
    while items.len() < count {
        let envelope = peer.read().await;
        if envelope[0] == 8 && envelope[1] == stream {
            assert_eq!(envelope[2], items.len(), "contiguous positions: {envelope}");
            let batch = envelope[3].as_array().expect("a batch");
            items.extend(batch.iter().map(|item| item.as_u64().unwrap()));
        }
    }
    items
}

/// PROTOCOL.md section 2: "missing" and "wrong" are refused alike.
#[tokio::test]
async fn a_missing_token_is_refused_like_a_wrong_one() {
    let (missing, missing_end) = refusal_of(hello(VERSION, "msgpack")).await;
    let (wrong, wrong_end) = refusal_of(hello_with_token("guess")).await;
    assert_eq!(missing[0], 1, "a refusal");
    assert_eq!(
        missing, wrong,
        "the same refusal: a prober cannot tell which"
    );
    for end in [missing_end, wrong_end] {
        assert!(
            matches!(
                end,
                Termination::Handshake(HandshakeError::Unauthenticated { .. })
            ),
            "{end:?}"
        );
    }
    // The right token is accepted.
    let (a, b) = UnixStream::pair().unwrap();
    let _dispatcher = Dispatcher::builder()
        .expect_token("s3cret")
        .spawn(Channel::from(a));
    let mut peer = RawPeer::new(b);
    peer.send_frame(&hello_with_token("s3cret")).await;
    peer.send_frame(&[0]).await;
    peer.read_frame().await.unwrap();
    assert_eq!(peer.read_frame().await.unwrap(), [0], "accepted");
}

/// PROTOCOL.md section 10: goodbye is `[7, reason]`, reported by the receiver, which answers
/// with its own goodbye and closes.
#[tokio::test]
async fn a_goodbye_is_reported_with_its_reason_and_answered_by_a_goodbye() {
    let (dispatcher, mut peer) = RawPeer::connect(router(), 1 << 20).await;
    peer.send(&(7u8, "the raw peer is leaving")).await;
    let end = within(dispatcher.closed()).await;
    let Termination::PeerStopped { reason } = &end else {
        panic!("not the peer's goodbye: {end:?}");
    };
    assert_eq!(reason, "the raw peer is leaving");
    let goodbye = peer.read().await;
    assert_eq!(goodbye[0], 7, "{goodbye}");
    assert!(goodbye[1].is_string(), "a reason: {goodbye}");
    assert_eq!(peer.read_frame().await, None, "nothing after the goodbye");
}

/// PROTOCOL.md section 10: a stopping side cancels each call its users made, before goodbye.
#[tokio::test]
async fn a_stopping_side_cancels_its_pending_calls_before_its_goodbye() {
    let (dispatcher, mut peer) = RawPeer::connect(router(), 1 << 20).await;
    let first = tokio::spawn(dispatcher.request(Echo("one".into())).into_future());
    let second = tokio::spawn(dispatcher.request(Echo("two".into())).into_future());
    let mut ids = vec![
        peer.read_request("echo").await,
        peer.read_request("echo").await,
    ];
    let stopping = dispatcher.clone();
    let stop = tokio::spawn(async move { stopping.stop().await });
    let mut cancelled = Vec::new();
    let goodbye = loop {
        let envelope = peer.read().await;
        match envelope[0].as_u64() {
            Some(6) => cancelled.push(envelope[1].as_u64().unwrap()),
            Some(7) => break envelope,
            _ => panic!("neither a cancel nor the goodbye: {envelope}"),
        }
    };
    ids.sort_unstable();
    cancelled.sort_unstable();
    assert_eq!(
        cancelled, ids,
        "one cancel per pending call, before {goodbye}"
    );
    assert_eq!(goodbye[1], "the peer called stop()");
    for call in [first, second] {
        assert!(call.await.unwrap().is_err());
    }
    drop(peer);
    within(stop).await.unwrap();
}

/// PROTOCOL.md section 10: while a side drains, new requests are answered `-32002`.
#[tokio::test]
async fn a_draining_side_answers_new_requests_shutting_down() {
    let (dispatcher, mut peer) = RawPeer::connect_with(
        Dispatcher::builder()
            .handler(router())
            .drain_timeout(Duration::from_secs(60)),
    )
    .await;
    peer.request(1, "hang", &()).await; // keeps the dispatcher draining
                                        // A call of ours: its cancel tells the raw peer that the stop has begun.
    let call = tokio::spawn(dispatcher.request(Echo("x".into())).into_future());
    let id = peer.read_request("echo").await;
    let stopping = dispatcher.clone();
    let _stop = tokio::spawn(async move { stopping.stop().await });
    assert_eq!(peer.read().await, json!([6, id]));
    peer.request(2, "echo", "late").await;
    let answer = peer.read().await;
    assert_eq!(
        (&answer[0], &answer[1], &answer[3]),
        (&json!(4), &json!(2), &json!(code::SHUTTING_DOWN)),
        "{answer}"
    );
    assert!(call.await.unwrap().is_err());
}

/// PROTOCOL.md section 7: a response over the caller's maximum frame is answered `-32001`
/// instead, and the connection stays.
#[tokio::test]
async fn an_answer_too_large_for_the_caller_is_answered_frame_too_large() {
    let (a, b) = UnixStream::pair().unwrap();
    let _dispatcher = Dispatcher::builder()
        .handler(router())
        .spawn(Channel::from(a));
    let mut peer = RawPeer::new(b);
    let mut small = hello(VERSION, "msgpack");
    small.splice(FIRST_LIMIT..FIRST_LIMIT + 4, 1024u32.to_be_bytes());
    peer.send_frame(&small).await;
    peer.send_frame(&[0]).await;
    peer.read_frame().await.unwrap();
    assert_eq!(peer.read_frame().await.unwrap(), [0]);
    peer.request(1, "echo", &"x".repeat(2000)).await;
    let answer = peer.read().await;
    assert_eq!(
        (&answer[0], &answer[1], &answer[3]),
        (&json!(4), &json!(1), &json!(code::FRAME_TOO_LARGE)),
        "{answer}"
    );
    peer.request(2, "echo", "small").await;
    assert_eq!(peer.read().await, json!([3, 2, {}, "small"]));
}

/// PROTOCOL.md section 5: after a cancel, nothing is sent for its id.
#[tokio::test]
async fn nothing_is_sent_for_a_cancelled_request() {
    let (_dispatcher, mut peer) = RawPeer::connect(router(), 1 << 20).await;
    peer.request(5, "hang", &()).await;
    peer.send(&(6u8, 5u64)).await;
    peer.request(6, "echo", "after").await;
    assert_eq!(
        peer.read().await,
        json!([3, 6, {}, "after"]),
        "nothing for id 5 before it"
    );
    assert_eq!(peer.read_within(Duration::from_millis(300)).await, None);
}

/// PROTOCOL.md section 9: stream credit adds to what is left.
#[tokio::test]
async fn stream_credit_is_additive() {
    let (_dispatcher, mut peer) = RawPeer::connect(router(), 1 << 20).await;
    let stream = peer.open_stream(1, "numbers", &100u64).await;
    peer.stream_credit(stream, 2).await;
    peer.stream_credit(stream, 3).await;
    assert_eq!(read_items(&mut peer, stream, 5).await, [0, 1, 2, 3, 4]);
    assert_eq!(
        peer.read_within(Duration::from_millis(300)).await,
        None,
        "not one item beyond 2 + 3"
    );
    peer.stream_credit(stream, 1).await;
    let next = peer.read().await;
    assert_eq!(next, json!([8, stream, 5, [5]]));
}

/// PROTOCOL.md section 9: a pulled item comes with its position in `stream-position`.
#[tokio::test]
async fn a_pulled_item_carries_its_position() {
    let (_dispatcher, mut peer) = RawPeer::connect(router(), 1 << 20).await;
    let stream = peer.open_stream(1, "numbers", &2u64).await;
    for (id, position) in [(2u64, "0"), (3, "1")] {
        peer.request(id, "$stream/next", &stream).await;
        let answer = peer.read().await;
        let item: u64 = position.parse().unwrap();
        assert_eq!(
            answer,
            json!([3, id, {"stream-position": position}, [item]]),
            "{answer}"
        );
    }
    peer.request(4, "$stream/next", &stream).await;
    let end = peer.read().await;
    assert_eq!(
        (&end[0], &end[1], &end[3]),
        (&json!(3), &json!(4), &json!([])),
        "{end}"
    );
}

/// PROTOCOL.md section 9: one pull at a time per stream.
#[tokio::test]
async fn a_second_pull_while_one_waits_is_an_invalid_request() {
    let (_dispatcher, mut peer) = RawPeer::connect(router(), 1 << 20).await;
    let stream = peer.open_stream(1, "never", &()).await;
    peer.request(2, "$stream/next", &stream).await;
    peer.request(3, "$stream/next", &stream).await;
    let answer = peer.read().await;
    assert_eq!(
        (&answer[0], &answer[1], &answer[3]),
        (&json!(4), &json!(3), &json!(code::INVALID_REQUEST)),
        "{answer}"
    );
}

/// PROTOCOL.md section 3: integers in any MessagePack integer encoding.
#[tokio::test]
async fn integers_are_read_in_any_messagepack_encoding() {
    let (_dispatcher, mut peer) = RawPeer::connect(router(), 1 << 20).await;
    // [1, 7 as int8, "echo", {}, 0 as uint64, 0 as int16, "x"]
    let mut body = vec![0x97, 0x01, 0xd0, 0x07, 0xa4];
    body.extend_from_slice(b"echo");
    body.extend_from_slice(&[0x80, 0xcf, 0, 0, 0, 0, 0, 0, 0, 0, 0xd1, 0, 0, 0xa1, b'x']);
    peer.send_frame(&body).await;
    assert_eq!(peer.read().await, json!([3, 7, {}, "x"]));
    // An integral float where an id is expected is undecodable: its kind is readable, its id not.
    let mut float = vec![0x97, 0x01, 0xcb];
    float.extend_from_slice(&8f64.to_be_bytes());
    peer.send_frame(&float).await;
    peer.request(9, "echo", "still here").await;
    let answer: Value = peer.read().await;
    assert_eq!(
        answer,
        json!([3, 9, {}, "still here"]),
        "the float request is dropped"
    );
}
