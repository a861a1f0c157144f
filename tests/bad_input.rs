//! Bad input from the peer: every case gets a typed error or a documented teardown, and the
//! other calls in flight on the connection complete or fail typed. The peer here is raw bytes
//! on a Unix socket, written by hand from PROTOCOL.md.

mod support;

use std::future::IntoFuture;
use std::time::Duration;

use channel_dispatcher::error::code;
use channel_dispatcher::{
    CallError, Channel, Context, Dispatcher, HandshakeError, ProtocolError, Router, Termination,
};
use serde_json::{json, Value};
use support::raw::{hello, NoAttributes, RawPeer, VERSION};
use support::{within, Echo};
use tokio::net::UnixStream;
use tokio::task::JoinHandle;

fn echo_router() -> Router {
    Router::new().request(|_cx: Context, Echo(s)| async move { Ok(s) })
}

/// A call from the dispatcher to the raw peer, left in flight while the test misbehaves.
async fn call_in_flight(
    dispatcher: &Dispatcher,
    peer: &mut RawPeer,
) -> (u64, JoinHandle<Result<String, CallError>>) {
    let call = tokio::spawn(dispatcher.request(Echo("in flight".into())).into_future());
    let id = peer.read_request("echo").await;
    (id, call)
}

fn assert_error(envelope: &Value, id: u64, code: i64) {
    assert_eq!(envelope[0], 4, "not an error: {envelope}");
    assert_eq!(envelope[1], id, "{envelope}");
    assert_eq!(envelope[3], code, "{envelope}");
}

#[tokio::test]
async fn truncated_frame_then_eof_ends_with_a_protocol_error() {
    let (dispatcher, mut peer) = RawPeer::connect(echo_router(), 1 << 20).await;
    let (_, call) = call_in_flight(&dispatcher, &mut peer).await;
    peer.send_raw(&100u32.to_be_bytes()).await;
    peer.send_raw(&[0x94, 3, 1, 0x80]).await;
    drop(peer);
    let expected = Termination::Protocol(ProtocolError::TruncatedFrame {
        received: 8,
        expected: 104,
    });
    assert_eq!(
        within(dispatcher.closed()).await.to_string(),
        expected.to_string()
    );
    let err = within(call).await.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            CallError::Terminated(Termination::Protocol(ProtocolError::TruncatedFrame { .. }))
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn peer_closing_without_goodbye_fails_calls_in_flight() {
    let (dispatcher, mut peer) = RawPeer::connect(echo_router(), 1 << 20).await;
    let (_, call) = call_in_flight(&dispatcher, &mut peer).await;
    drop(peer);
    assert!(matches!(
        within(dispatcher.closed()).await,
        Termination::Closed
    ));
    let err = within(call).await.unwrap().unwrap_err();
    assert!(
        matches!(err, CallError::Terminated(Termination::Closed)),
        "{err:?}"
    );
}

#[tokio::test]
async fn oversized_frame_ends_the_connection_naming_the_length() {
    let (dispatcher, mut peer) = RawPeer::connect(echo_router(), 1024).await;
    let (_, call) = call_in_flight(&dispatcher, &mut peer).await;
    // The peer knows our maximum from the handshake: a larger frame is a connection error.
    peer.request(9, "echo", &"x".repeat(10_000)).await;
    let fatal = peer.read().await;
    assert_eq!(fatal[0], 5, "a fatal error tells the peer why: {fatal}");
    assert_eq!(fatal[1], code::FRAME_TOO_LARGE, "{fatal}");
    match within(dispatcher.closed()).await {
        Termination::Protocol(ProtocolError::FrameTooLarge { len, max, text }) => {
            assert!(len > 10_000, "{len}");
            assert_eq!(
                (max, text),
                (1024, None),
                "a binary prefix is not taken for text"
            );
        }
        other => panic!("expected an over-length frame, got {other:?}"),
    }
    let err = within(call).await.unwrap().unwrap_err();
    assert!(
        matches!(err, CallError::Terminated(Termination::Protocol(_))),
        "{err:?}"
    );
}

#[tokio::test]
async fn envelope_over_the_receivers_limits_is_refused_by_id() {
    // A compliant sender checks against the limits we announced; this one does not.
    let mut limits = channel_dispatcher::Limits::default();
    limits.max_method_length = 4;
    let builder = Dispatcher::builder().handler(echo_router()).limits(limits);
    let (_dispatcher, mut peer) = RawPeer::connect_with(builder).await;
    peer.request(3, "a/long/method", "x").await;
    let answer = peer.read().await;
    assert_error(&answer, 3, code::INVALID_REQUEST);
    let message = answer[4].as_str().unwrap();
    assert!(message.contains("method name length"), "{message}");
    peer.request(4, "echo", "up").await;
    assert_eq!(peer.read().await, json!([3, 4, {}, "up"]));
}

#[tokio::test]
async fn garbage_frames_are_skipped_and_a_readable_request_id_is_answered() {
    let (dispatcher, mut peer) = RawPeer::connect(echo_router(), 1 << 20).await;
    let (call_id, call) = call_in_flight(&dispatcher, &mut peer).await;
    peer.send_frame(&[0xff, 0x00, 0xc1, 0x13, 0x37]).await;
    peer.send_frame(b"").await;
    // A request whose method is a number: kind and id are readable, so it is refused by id.
    peer.send(&(1u8, 11u64, 42u8)).await;
    assert_error(&peer.read().await, 11, code::INVALID_REQUEST);

    peer.request(12, "echo", "fine").await;
    assert_eq!(peer.read().await, json!([3, 12, {}, "fine"]));
    peer.respond(call_id, "ok").await;
    assert_eq!(within(call).await.unwrap().unwrap(), "ok");
}

#[tokio::test]
async fn unknown_envelope_kind_is_skipped() {
    let (dispatcher, mut peer) = RawPeer::connect(echo_router(), 1 << 20).await;
    let (call_id, call) = call_in_flight(&dispatcher, &mut peer).await;
    peer.send(&(99u8, 1u64, "future extension")).await;
    peer.request(13, "echo", "after").await;
    assert_eq!(peer.read().await, json!([3, 13, {}, "after"]));
    peer.respond(call_id, "ok").await;
    assert_eq!(within(call).await.unwrap().unwrap(), "ok");
}

#[tokio::test]
async fn unknown_method_is_answered_with_method_not_found() {
    let (dispatcher, mut peer) = RawPeer::connect(echo_router(), 1 << 20).await;
    let (call_id, call) = call_in_flight(&dispatcher, &mut peer).await;
    peer.request(14, "no/such/method", "x").await;
    let answer = peer.read().await;
    assert_error(&answer, 14, code::METHOD_NOT_FOUND);
    assert!(answer[4].as_str().unwrap().contains("no/such/method"));
    peer.respond(call_id, "ok").await;
    assert_eq!(within(call).await.unwrap().unwrap(), "ok");
}

#[tokio::test]
async fn answer_to_an_id_nobody_waits_for_is_dropped_quietly() {
    let (dispatcher, mut peer) = RawPeer::connect(echo_router(), 1 << 20).await;
    let (call_id, call) = call_in_flight(&dispatcher, &mut peer).await;
    peer.respond(999_999, "stray").await;
    peer.send(&(4u8, 888_888u64, NoAttributes::new(), -1i64, "stray error"))
        .await;
    peer.send(&(6u8, 777_777u64)).await;
    // Nothing comes back for the strays: the next frame is the answer to this request.
    peer.request(15, "echo", "next").await;
    assert_eq!(peer.read().await, json!([3, 15, {}, "next"]));
    peer.respond(call_id, "mine").await;
    assert_eq!(within(call).await.unwrap().unwrap(), "mine");
    assert!(!dispatcher.is_stopping());
}

#[tokio::test]
async fn dropped_call_sends_a_cancel_and_its_late_answer_is_dropped_quietly() {
    let (dispatcher, mut peer) = RawPeer::connect(echo_router(), 1 << 20).await;
    let (id, call) = call_in_flight(&dispatcher, &mut peer).await;
    call.abort();
    assert_eq!(
        peer.read().await,
        json!([6, id]),
        "a cancel for the dropped call"
    );
    // The answer crosses the cancel: it is dropped, never answered with a fatal.
    peer.respond(id, "too late").await;
    peer.request(21, "echo", "still here").await;
    assert_eq!(peer.read().await, json!([3, 21, {}, "still here"]));
    assert!(!dispatcher.is_stopping());
}

#[tokio::test]
async fn duplicate_request_id_in_flight_is_refused_and_the_first_answered() {
    let (release, gate) = tokio::sync::watch::channel(false);
    let router = echo_router().raw("wait", move |incoming: channel_dispatcher::Incoming| {
        let mut gate = gate.clone();
        async move {
            let _ = gate.wait_for(|open| *open).await;
            Ok(channel_dispatcher::Reply::value(incoming.payload().clone()))
        }
    });
    let (dispatcher, mut peer) = RawPeer::connect(router, 1 << 20).await;
    let (call_id, call) = call_in_flight(&dispatcher, &mut peer).await;
    peer.request(5, "wait", "first").await;
    peer.request(5, "wait", "second").await;
    // Both are in; only then open the gate.
    peer.request(6, "echo", "sync").await;
    assert_eq!(peer.read().await, json!([3, 6, {}, "sync"]));
    release.send_replace(true);
    assert_eq!(peer.read().await, json!([3, 5, {}, "first"]));
    peer.request(7, "echo", "after").await;
    assert_eq!(
        peer.read().await,
        json!([3, 7, {}, "after"]),
        "no second answer for id 5"
    );
    peer.respond(call_id, "ok").await;
    assert_eq!(within(call).await.unwrap().unwrap(), "ok");
}

#[tokio::test]
async fn handshake_version_mismatch_is_a_typed_error_on_both_sides() {
    let (a, b) = UnixStream::pair().unwrap();
    let dispatcher = Dispatcher::builder().spawn(Channel::from(a));
    let call = tokio::spawn(dispatcher.request(Echo("never sent".into())).into_future());
    let mut peer = RawPeer::new(b);
    peer.send_frame(&hello(99, "msgpack")).await;
    assert_eq!(&peer.read_frame().await.unwrap()[..4], b"CHDP");
    let verdict = peer.read_frame().await.unwrap();
    assert_eq!(verdict[0], 1, "refused");
    let reason = String::from_utf8(verdict[1..].to_vec()).unwrap();
    assert!(reason.contains("version"), "{reason}");

    match within(dispatcher.closed()).await {
        Termination::Handshake(HandshakeError::VersionMismatch {
            ours: VERSION,
            theirs: 99,
        }) => {}
        other => panic!("expected a version mismatch, got {other:?}"),
    }
    let err = within(call).await.unwrap().unwrap_err();
    assert!(
        matches!(err, CallError::Terminated(Termination::Handshake(_))),
        "{err:?}"
    );
}

#[tokio::test]
async fn something_that_is_not_a_peer_is_refused() {
    let (a, b) = UnixStream::pair().unwrap();
    let dispatcher = Dispatcher::builder().spawn(Channel::from(a));
    let mut peer = RawPeer::new(b);
    peer.send_raw(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    assert!(matches!(
        within(dispatcher.closed()).await,
        Termination::Handshake(HandshakeError::NotAPeer)
    ));
}

#[tokio::test(start_paused = true)]
async fn silent_peer_times_out_in_the_handshake() {
    let (a, _silent) = UnixStream::pair().unwrap();
    let dispatcher = Dispatcher::builder()
        .handshake_timeout(Duration::from_secs(3))
        .spawn(Channel::from(a));
    assert!(matches!(
        dispatcher.closed().await,
        Termination::Handshake(HandshakeError::Timeout(t)) if t == Duration::from_secs(3)
    ));
}

#[tokio::test]
async fn wrong_token_is_refused_and_both_sides_say_why() {
    let (a, b) = Channel::pair();
    let server = Dispatcher::builder().expect_token("s3cret").spawn(a);
    let client = Dispatcher::builder().token("guess").spawn(b);
    assert!(matches!(
        within(server.closed()).await,
        Termination::Handshake(HandshakeError::Unauthenticated { .. })
    ));
    match within(client.closed()).await {
        Termination::Handshake(HandshakeError::Refused { reason }) => {
            assert!(reason.contains("token"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    let (a, b) = Channel::pair();
    let _server = Dispatcher::builder()
        .expect_token("s3cret")
        .handler(echo_router())
        .spawn(a);
    let client = Dispatcher::builder()
        .token("s3cret")
        .connect(b)
        .await
        .expect("the right token is accepted");
    assert_eq!(
        within(client.request(Echo("in".into()))).await.unwrap(),
        "in"
    );
}

#[cfg(feature = "json")]
#[tokio::test]
async fn codec_mismatch_is_a_typed_error_on_both_sides() {
    use channel_dispatcher::Codec;
    let (a, b) = Channel::pair();
    let one = Dispatcher::builder().codec(Codec::MessagePack).spawn(a);
    let two = Dispatcher::builder().codec(Codec::Json).connect(b).await;
    for reason in [within(one.closed()).await, two.unwrap_err()] {
        match reason {
            Termination::Handshake(HandshakeError::CodecMismatch { ours, theirs }) => {
                assert_ne!(ours, theirs);
            }
            other => panic!("expected a codec mismatch, got {other:?}"),
        }
    }
}
