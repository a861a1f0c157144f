//! Conversations on the PHP original's wire ([`Codec::Php`]) with a scripted peer that replays
//! the frames the PHP library itself produced (tests/data/php-wire-samples.txt) and answers as
//! PHP does: requests and answers, PHP's 404, errors with codes, fatal errors, meek
//! notifications, 1,000 requests with 64 in flight, iterators of 10,000 items each way, the
//! stop marker each way, and frames PHP would never send.

#[path = "support/php_peer.rs"]
mod php_peer;
#[path = "../examples/php/protocol.rs"]
mod protocol;

use std::time::Duration;

use bytes::BytesMut;
use channel_dispatcher::php::framing::Frames;
use channel_dispatcher::php::{PhpObject, PhpValue, Property};
use channel_dispatcher::{
    CallError, Channel, Codec, Context, Dispatcher, Notification, ProtocolError, RemoteStream,
    Router, Termination,
};
use futures_util::{StreamExt, TryStreamExt};
use php_peer::*;
use protocol::*;
use tokio::io::AsyncWriteExt;

/// The payload of the recorded frame whose title starts with `title`.
fn sample(title: &str) -> Vec<u8> {
    let text = include_str!("data/php-wire-samples.txt");
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line
            .strip_prefix("## ")
            .is_some_and(|t| t.starts_with(title))
        {
            let hex = lines.next().unwrap();
            let frame: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            return frame[5..].to_vec();
        }
    }
    panic!("no sample {title}")
}

/// Sets the property `name` (whatever its visibility) to `value`.
fn set(object: &mut PhpObject, name: &str, value: PhpValue) {
    let slot = object
        .properties
        .iter_mut()
        .find(|(property, _)| property.name == name.as_bytes())
        .unwrap_or_else(|| panic!("no {name}"));
    slot.1 = value;
}

/// A Rust side configured as the example's, and the scripted PHP peer on the other end.
fn connect() -> (Dispatcher, Php) {
    let (php, channel) = Php::pipe();
    let rust = Dispatcher::builder()
        .codec(Codec::Php)
        .php_notification(NotifyRequest::METHOD)
        .handler(worker_router())
        .spawn(channel);
    (rust, php)
}

/// The example worker's routes, and a notification whose effect the test sees.
fn worker_router() -> Router {
    router().notification(|cx: Context, NotifyRequest { text }| async move {
        // A request of ours back to PHP.
        let php = cx.dispatcher().unwrap();
        tokio::spawn(async move {
            let note = format!("notified: {text}");
            let _ = php.request(PingRequest { note }).await;
        });
        Ok(())
    })
}

/// Our answers' own private `id` is a per-process counter, as PHP's is: set it to `id` to
/// compare with what PHP wrote.
fn with_own_id(mut answer: PhpObject, id: i64) -> Vec<u8> {
    set(&mut answer, "id", PhpValue::Int(id));
    PhpValue::Object(answer).to_bytes()
}

// ===== A PHP client of a Rust server =====

#[tokio::test]
async fn a_recorded_ping_is_answered_with_the_pong_php_itself_wrote() {
    let (_rust, mut php) = connect();
    php.send_bytes(&sample("PingRequest")).await;
    let pong = php.recv_object().await;
    assert_eq!(with_own_id(pong, 0), sample("PongResponse"));
}

#[tokio::test]
async fn an_echo_gives_back_the_payload_exactly() {
    let (_rust, mut php) = connect();
    let request = sample("EchoRequest with array payload");
    let payload = object(decode(&request)).get(b"payload").unwrap().clone();
    php.send_bytes(&request).await;
    let answer = php.recv_object().await;
    assert_eq!(answer.class, b"EchoResponse");
    let echoed = answer.get(b"payload").unwrap();
    assert_eq!(
        echoed.to_bytes(),
        payload.to_bytes(),
        "same types, order and bytes"
    );
    assert_eq!(
        int(&answer, "requestId"),
        int(&object(decode(&request)), "id")
    );
}

#[tokio::test]
async fn an_unknown_class_gets_phps_404_and_a_throwing_handler_its_code() {
    let (_rust, mut php) = connect();
    php.send(&message("UnknownRequest", &[("what", s("x"))], 1))
        .await;
    let answer = php.recv_object().await;
    assert_eq!(
        with_own_id(answer, 1),
        sample("ErrorResponse (router: unknown request class)")
    );

    let throw = [("message", s("boom")), ("code", PhpValue::Int(42))];
    php.send(&message("ThrowRequest", &throw, 2)).await;
    let answer = php.recv_object().await;
    assert_eq!(
        with_own_id(answer, 2),
        sample("ErrorResponse (handler threw")
    );
}

#[tokio::test]
async fn a_meek_notification_is_handled_and_never_answered() {
    let (_rust, mut php) = connect();
    php.send(&message("NotifyRequest", &[("text", s("hi"))], 7))
        .await;
    // The handler's request comes, and no answer (any answer would make PHP end the link).
    let request = php.recv_object().await;
    assert_eq!(
        request.class, b"PingRequest",
        "not an answer to the notification"
    );
    assert_eq!(request.get(b"note"), Some(&s("notified: hi")));
    assert_eq!(request.get(b"requestId"), None);
}

#[tokio::test]
async fn a_thousand_requests_with_64_in_flight_are_all_answered_to_their_ids() {
    let (_rust, mut php) = connect();
    let mut next = 0;
    let mut answered = std::collections::HashSet::new();
    while answered.len() < 1000 {
        while next < 1000 && next - answered.len() < 64 {
            php.send(&message(
                "PingRequest",
                &[("note", s(&format!("n{next}")))],
                next as i64,
            ))
            .await;
            next += 1;
        }
        let pong = php.recv_object().await;
        let id = int(&pong, "requestId");
        assert_eq!(pong.get(b"reply"), Some(&s(&format!("pong: n{id}"))));
        assert!(answered.insert(id), "answered twice: {id}");
    }
}

#[tokio::test]
async fn php_pulls_an_iterator_of_10000_items_one_at_a_time() {
    let (_rust, mut php) = connect();
    php.send(&message(
        "OpenIteratorRequest",
        &[("count", PhpValue::Int(10_000))],
        0,
    ))
    .await;
    let opened = php.recv_object().await;
    assert_eq!(opened.class, b"OpenIteratorResponse");
    let iterator = int(&opened, "iteratorId");
    for i in 0..10_000 {
        php.send(&pull(iterator, i + 1)).await;
        let answer = php.recv_object().await;
        assert_eq!(answer.get(b"continue"), Some(&PhpValue::Bool(true)));
        assert_eq!(int(&answer, "position"), i);
        assert_eq!(answer.get(b"value"), Some(&s(&format!("item-{i}"))));
        assert_eq!(int(&answer, "requestId"), i + 1);
    }
    php.send(&pull(iterator, 10_001)).await;
    let end = php.recv_object().await;
    let mut recorded = object(decode(&sample("Response\\IteratorContinue (exhausted")));
    set(&mut recorded, "requestId", PhpValue::Int(10_001));
    assert_eq!(
        with_own_id(end, 0),
        with_own_id(recorded, 0),
        "as PHP ends one"
    );
}

#[tokio::test]
async fn the_stop_marker_is_answered_and_the_connection_ends_cleanly() {
    let (rust, mut php) = connect();
    php.send_bytes(&sample("null sent by Dispatcher::stop()"))
        .await;
    assert_eq!(php.recv().await, PhpValue::Null, "null answers null");
    assert_eq!(php.recv_bytes().await, None, "then the end");
    let reason = tokio::time::timeout(LONG, rust.closed()).await.unwrap();
    assert!(reason.is_graceful(), "{reason}");
}

// ===== A Rust client of a PHP server =====

#[tokio::test]
async fn a_ping_goes_out_as_php_writes_it_and_the_recorded_pong_answers_it() {
    let (rust, mut php) = connect();
    let call = tokio::spawn({
        let rust = rust.clone();
        async move {
            rust.request(PingRequest {
                note: "hello".into(),
            })
            .await
        }
    });
    let request = php.recv_object().await;
    let id = int(&request, "id");
    // The same bytes as PHP's, but for the id, which is our own counter's.
    assert_eq!(with_own_id(request, 0), sample("PingRequest"));
    let mut pong = object(decode(&sample("PongResponse")));
    set(&mut pong, "requestId", PhpValue::Int(id));
    php.send(&PhpValue::Object(pong)).await;
    let pong = call.await.unwrap().unwrap();
    assert_eq!(pong.reply, "pong: hello");
}

#[tokio::test]
async fn phps_error_answers_fail_the_call_with_their_code_and_message() {
    let (rust, mut php) = connect();
    let calls = tokio::spawn({
        let rust = rust.clone();
        async move {
            let thrown = rust
                .request(ThrowRequest {
                    message: "boom".into(),
                    code: 42,
                })
                .await;
            let unknown = rust.request(UnknownRequest { what: "x".into() }).await;
            (thrown, unknown)
        }
    });
    for title in ["ErrorResponse (handler threw", "ErrorResponse (router"] {
        let request = php.recv_object().await;
        let mut error = object(decode(&sample(title)));
        set(&mut error, "requestId", PhpValue::Int(int(&request, "id")));
        php.send(&PhpValue::Object(error)).await;
    }
    let (thrown, unknown) = calls.await.unwrap();
    match thrown {
        Err(CallError::Remote(error)) => assert_eq!((error.code, &*error.message), (42, "boom")),
        other => panic!("{other:?}"),
    }
    match unknown {
        Err(CallError::Remote(error)) => {
            assert_eq!(error.code, 404);
            assert_eq!(error.message, "No handler for UnknownRequest");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_fatal_error_ends_our_side_and_fails_what_is_pending() {
    let (rust, mut php) = connect();
    let call = tokio::spawn({
        let rust = rust.clone();
        async move {
            rust.request(FatalRequest {
                message: "fatal on purpose".into(),
            })
            .await
        }
    });
    let _request = php.recv_object().await;
    php.send_bytes(&sample("FatalErrorResponse (returned by a handler"))
        .await;
    let failed = call.await.unwrap();
    assert!(
        matches!(failed, Err(CallError::Terminated(_))),
        "{failed:?}"
    );
    match tokio::time::timeout(LONG, rust.closed()).await.unwrap() {
        Termination::PeerFatal { message, .. } => assert_eq!(message, "fatal on purpose"),
        other => panic!("{other}"),
    }
    // As PHP does: the stop marker, then the end.
    assert_eq!(php.recv().await, PhpValue::Null);
    assert_eq!(php.recv_bytes().await, None);
}

#[tokio::test]
async fn our_notification_is_meek_and_phps_answer_to_it_is_swallowed() {
    let (rust, mut php) = connect();
    rust.notify(NotifyRequest { text: "hi".into() })
        .await
        .unwrap();
    let notification = php.recv_object().await;
    assert_eq!(notification.class, b"NotifyRequest");
    assert_eq!(notification.get(b"text"), Some(&s("hi")));
    // A PHP server answers a MeekRequest anyway.
    let success = PhpObject::new(format!("{NS}SuccessResponse"))
        .with(
            Property::public("requestId"),
            PhpValue::Int(int(&notification, "id")),
        )
        .with(
            Property::private(format!("{NS}SuccessResponse"), "id"),
            PhpValue::Int(0),
        );
    php.send(&PhpValue::Object(success)).await;
    // Not taken for anything, not answered: the next call goes through.
    let call = tokio::spawn({
        let rust = rust.clone();
        async move {
            rust.request(PingRequest {
                note: "after".into(),
            })
            .await
        }
    });
    let request = php.recv_object().await;
    assert_eq!(request.class, b"PingRequest", "nothing but the call");
    let pong = PhpObject::new("PongResponse")
        .with(Property::public("reply"), s("pong: after"))
        .with(
            Property::public("requestId"),
            PhpValue::Int(int(&request, "id")),
        );
    php.send(&PhpValue::Object(pong)).await;
    assert_eq!(call.await.unwrap().unwrap().reply, "pong: after");
    assert!(!rust.is_closed());
}

#[tokio::test]
async fn notifications_flow_without_credit_which_this_wire_lacks() {
    let (mut php, channel) = Php::pipe();
    let mut limits = channel_dispatcher::Limits::default();
    limits.max_pending_notifications = 8;
    let rust = Dispatcher::builder()
        .codec(Codec::Php)
        .limits(limits)
        .spawn(channel);

    let sender = tokio::spawn(async move {
        for i in 0..100 {
            let text = format!("n{i}");
            rust.notify(NotifyRequest { text }).await.unwrap();
        }
        rust
    });
    for i in 0..100 {
        let notification = php.recv_object().await;
        assert_eq!(notification.get(b"text"), Some(&s(&format!("n{i}"))));
    }
    tokio::time::timeout(LONG, sender).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_thousand_calls_with_64_in_flight_are_matched_to_their_answers() {
    let (rust, mut php) = connect();
    let calls = tokio::spawn({
        let rust = rust.clone();
        async move {
            futures_util::stream::iter(0..1000)
                .map(|i| {
                    let rust = rust.clone();
                    async move {
                        let pong = rust
                            .request(PingRequest {
                                note: format!("n{i}"),
                            })
                            .await?;
                        assert_eq!(pong.reply, format!("pong: n{i}"));
                        Ok::<_, CallError>(())
                    }
                })
                .buffer_unordered(64)
                .try_collect::<Vec<()>>()
                .await
        }
    });
    // PHP answers in its own order: each batch of 64 from the last.
    let mut answered = 0;
    while answered < 1000 {
        let mut batch = Vec::new();
        while batch.len() < 64.min(1000 - answered) {
            batch.push(php.recv_object().await);
        }
        for request in batch.into_iter().rev() {
            let note = match request.get(b"note") {
                Some(PhpValue::String(note)) => String::from_utf8(note.clone()).unwrap(),
                other => panic!("{other:?}"),
            };
            let pong = PhpObject::new("PongResponse")
                .with(Property::public("reply"), s(&format!("pong: {note}")))
                .with(
                    Property::public("requestId"),
                    PhpValue::Int(int(&request, "id")),
                );
            php.send(&PhpValue::Object(pong)).await;
            answered += 1;
        }
    }
    assert_eq!(calls.await.unwrap().unwrap().len(), 1000);
}

#[tokio::test]
async fn a_php_iterator_of_10000_items_is_a_remote_stream() {
    let (rust, mut php) = connect();
    let consumer = tokio::spawn({
        let rust = rust.clone();
        async move {
            let opened = rust.request(OpenIteratorRequest { count: 10_000 }).await?;
            RemoteStream::<String>::pull(&rust, opened.iterator_id)
                .try_collect::<Vec<String>>()
                .await
        }
    });
    let open = php.recv_object().await;
    assert_eq!(int(&open, "count"), 10_000);
    let mut opened = object(decode(&sample("OpenIteratorResponse")));
    set(&mut opened, "requestId", PhpValue::Int(int(&open, "id")));
    php.send(&PhpValue::Object(opened)).await;
    let continue_response = format!("{NS}Response\\IteratorContinue");
    for i in 0..=10_000 {
        let pull = php.recv_object().await;
        assert_eq!(
            pull.class,
            format!("{NS}Request\\IteratorContinue").as_bytes()
        );
        assert_eq!(int(&pull, "iteratorId"), 143, "the id PHP answered");
        let (more, position, value) = match i {
            10_000 => (false, PhpValue::Null, PhpValue::Null),
            i => (true, PhpValue::Int(i), s(&format!("item-{i}"))),
        };
        let answer = PhpObject::new(continue_response.clone())
            .with(Property::public("continue"), PhpValue::Bool(more))
            .with(Property::public("position"), position)
            .with(Property::public("value"), value)
            .with(
                Property::public("requestId"),
                PhpValue::Int(int(&pull, "id")),
            );
        php.send(&PhpValue::Object(answer)).await;
    }
    let items = consumer.await.unwrap().unwrap();
    assert_eq!(items.len(), 10_000);
    assert!(items
        .iter()
        .enumerate()
        .all(|(i, item)| *item == format!("item-{i}")));
}

#[tokio::test]
async fn stopping_sends_the_stop_marker_and_closes() {
    let (rust, mut php) = connect();
    let stopped = tokio::spawn({
        let rust = rust.clone();
        async move { rust.stop().await }
    });
    assert_eq!(php.recv().await, PhpValue::Null);
    // PHP answers null with null.
    php.send(&PhpValue::Null).await;
    assert_eq!(php.recv_bytes().await, None);
    let reason = tokio::time::timeout(LONG, stopped).await.unwrap().unwrap();
    assert!(reason.is_graceful(), "{reason}");
}

#[tokio::test]
async fn our_unit_answer_is_a_success_response_and_a_non_object_answer_an_error() {
    let (mut php, channel) = Php::pipe();
    let router = Router::new()
        .raw("Nothing", |_incoming| async move {
            Ok(channel_dispatcher::Reply::value(bytes::Bytes::new()))
        })
        .raw("Scalar", |_incoming| async move {
            Ok(channel_dispatcher::Reply::value(
                Codec::Php.encode(&5).unwrap(),
            ))
        });
    let _rust = Dispatcher::builder()
        .codec(Codec::Php)
        .handler(router)
        .spawn(channel);

    for (id, class) in [(1, "Nothing"), (2, "Scalar")] {
        php.send(&message(class, &[], id)).await;
    }
    let success = php.recv_object().await;
    assert_eq!(success.class, format!("{NS}SuccessResponse").as_bytes());
    assert_eq!(int(&success, "requestId"), 1);
    let error = php.recv_object().await;
    assert_eq!(error.class, format!("{NS}ErrorResponse").as_bytes());
    assert_eq!(int(&error, "requestId"), 2);
}

#[tokio::test]
async fn a_call_whose_payload_is_not_an_object_is_refused_here() {
    let (rust, _php) = connect();
    let payload = Codec::Php.encode(&"just a string").unwrap();
    match rust.call_raw("PingRequest", payload).await {
        Err(CallError::Encode(error)) => {
            assert!(error.to_string().contains("is an object"), "{error}")
        }
        other => panic!("{other:?}"),
    }
}

// ===== What PHP would never send =====

#[tokio::test]
async fn a_bad_prefix_or_a_zero_length_ends_the_connection_with_the_rule() {
    for (bytes, rule) in [
        (&b"\x01\x02\x00\x00\x00N;"[..], "starts with 0x00"),
        (&b"\x00\x00\x00\x00\x00"[..], "length 0"),
        (&b"Warning: something\n"[..], "wrote text to the channel"),
    ] {
        let (rust, mut php) = connect();
        php.write.write_all(bytes).await.unwrap();
        let reason = tokio::time::timeout(LONG, rust.closed()).await.unwrap();
        match &reason {
            Termination::Protocol(ProtocolError::MalformedFrame { reason }) => {
                assert!(reason.contains(rule), "{reason}")
            }
            other => panic!("{other}"),
        }
        // The PHP peer is told with the one message that ends it.
        let fatal = php.recv_object().await;
        assert_eq!(fatal.class, format!("{NS}FatalErrorResponse").as_bytes());
    }
}

#[tokio::test]
async fn frames_split_byte_by_byte_or_coalesced_are_read_alike() {
    let (_rust, mut php) = connect();
    let mut bytes = BytesMut::new();
    for id in 0..3 {
        let ping = message("PingRequest", &[("note", s("x"))], id);
        Frames::encode(&ping.to_bytes(), &mut bytes);
    }
    // The first frame a byte at a time, the other two in one write.
    let first = u32::from_le_bytes(bytes[1..5].try_into().unwrap()) as usize + 5;
    for byte in &bytes[..first] {
        php.write.write_all(&[*byte]).await.unwrap();
        php.write.flush().await.unwrap();
    }
    php.write.write_all(&bytes[first..]).await.unwrap();
    let mut ids: Vec<i64> = Vec::new();
    for _ in 0..3 {
        ids.push(int(&php.recv_object().await, "requestId"));
    }
    ids.sort_unstable();
    assert_eq!(ids, [0, 1, 2]);
}

#[tokio::test]
async fn hostile_payloads_are_refused_and_the_connection_goes_on() {
    let (rust, mut php) = connect();
    // A request with an enum case (refused) before its id: it is answered all the same, as
    // PHP has no timeout to give up waiting.
    php.send_bytes(
        b"O:11:\"PingRequest\":2:{s:4:\"note\";E:7:\"Foo:Bar\";s:15:\"\0PingRequest\0id\";i:7;}",
    )
    .await;
    let error = php.recv_object().await;
    assert_eq!(error.class, format!("{NS}ErrorResponse").as_bytes());
    assert_eq!(int(&error, "requestId"), 7);
    assert!(
        matches!(error.get(b"message"), Some(PhpValue::String(m)) if m.starts_with(b"malformed request"))
    );
    // The same in a meek notification is not answered.
    php.send_bytes(b"O:13:\"NotifyRequest\":2:{s:4:\"text\";E:7:\"Foo:Bar\";s:2:\"id\";i:8;}")
        .await;
    // A reference, nesting past the limit, a top-level scalar, an object with a bad id type.
    php.send_bytes(b"O:11:\"PingRequest\":2:{s:4:\"note\";s:1:\"x\";s:4:\"more\";r:1;}")
        .await;
    let deep = "a:1:{i:0;".repeat(100) + "N;" + &"}".repeat(100);
    let deep = format!("O:11:\"PingRequest\":1:{{s:4:\"note\";{deep}}}");
    php.send_bytes(deep.as_bytes()).await;
    php.send_bytes(b"i:42;").await;
    php.send_bytes(b"O:11:\"PingRequest\":2:{s:4:\"note\";i:5;s:2:\"id\";i:9;}")
        .await;
    // The last is a request with an id: it is answered, with an error (note is not a string).
    let error = php.recv_object().await;
    assert_eq!(error.class, format!("{NS}ErrorResponse").as_bytes());
    assert_eq!(int(&error, "requestId"), 9);
    // And the connection still serves.
    php.send(&message("PingRequest", &[("note", s("still"))], 10))
        .await;
    let pong = php.recv_object().await;
    assert_eq!(pong.get(b"reply"), Some(&s("pong: still")));
    assert!(!rust.is_closed());
}

#[tokio::test]
async fn an_answer_that_does_not_decode_fails_its_call_at_once() {
    let (rust, mut php) = connect();
    let call = tokio::spawn({
        let rust = rust.clone();
        async move {
            rust.request(EchoRequest {
                payload: PhpValue::Null,
            })
            .await
        }
    });
    let request = php.recv_object().await;
    let id = int(&request, "id");
    let answer = format!(
        "O:12:\"EchoResponse\":2:{{s:7:\"payload\";a:2:{{i:0;i:1;i:1;R:2;}}s:9:\"requestId\";i:{id};}}"
    );
    php.send_bytes(answer.as_bytes()).await;
    let failed = tokio::time::timeout(LONG, call).await.unwrap().unwrap();
    assert!(matches!(failed, Err(CallError::Decode(_))), "{failed:?}");
    assert!(!rust.is_closed());
}

#[tokio::test]
async fn php_request_0_is_a_request_like_any_other_for_nested_calls() {
    // One handler slot: PHP's request 0 calls back into PHP, and PHP, before it answers, sends
    // a request of its own, which must still be served (it is nested in our call).
    let (mut php, channel) = Php::pipe();
    let router = Router::new()
        .request(|cx: Context, OpenIteratorRequest { count }| async move {
            let pong = cx
                .request(PingRequest {
                    note: count.to_string(),
                })
                .await?;
            assert_eq!(pong.reply, "pong: 3");
            Ok(OpenIteratorResponse { iterator_id: 77 })
        })
        .request(|_cx: Context, PingRequest { note }| async move {
            Ok(PongResponse {
                reply: format!("inner {note}"),
            })
        });
    let _rust = Dispatcher::builder()
        .codec(Codec::Php)
        .max_concurrent_handlers(1)
        .handler(router)
        .spawn(channel);
    php.send(&message(
        "OpenIteratorRequest",
        &[("count", PhpValue::Int(3))],
        0,
    ))
    .await;
    let nested = php.recv_object().await;
    assert_eq!(nested.class, b"PingRequest");
    php.send(&message("PingRequest", &[("note", s("x"))], 1))
        .await;
    let answer = php.recv_object().await;
    assert_eq!(
        answer.get(b"reply"),
        Some(&s("inner x")),
        "served while request 0 waits"
    );
    assert_eq!(int(&answer, "requestId"), 1);
    let pong = PhpObject::new("PongResponse")
        .with(Property::public("reply"), s("pong: 3"))
        .with(
            Property::public("requestId"),
            PhpValue::Int(int(&nested, "id")),
        );
    php.send(&PhpValue::Object(pong)).await;
    let opened = php.recv_object().await;
    assert_eq!(int(&opened, "iteratorId"), 77);
    assert_eq!(int(&opened, "requestId"), 0);
}

#[tokio::test]
async fn an_ended_iterator_goes_on_ending_and_an_unknown_one_is_not_found() {
    let (_rust, mut php) = connect();
    php.send(&message(
        "OpenIteratorRequest",
        &[("count", PhpValue::Int(1))],
        0,
    ))
    .await;
    let iterator = int(&php.recv_object().await, "iteratorId");
    php.send(&pull(iterator, 1)).await;
    assert_eq!(
        php.recv_object().await.get(b"continue"),
        Some(&PhpValue::Bool(true))
    );
    for id in 2..5 {
        php.send(&pull(iterator, id)).await;
        let end = php.recv_object().await;
        assert_eq!(
            end.get(b"continue"),
            Some(&PhpValue::Bool(false)),
            "pull {id}"
        );
        assert_eq!(end.get(b"position"), Some(&PhpValue::Null));
        assert_eq!(int(&end, "requestId"), id);
    }
    php.send(&pull(999, 5)).await;
    let unknown = php.recv_object().await;
    assert_eq!(unknown.class, format!("{NS}ErrorResponse").as_bytes());
    assert_eq!(unknown.get(b"message"), Some(&s("Iterator not found")));
    assert_eq!(int(&unknown, "code"), 0);
}

#[cfg(feature = "msgpack")]
#[tokio::test]
async fn notification_classes_are_for_the_php_wire_only() {
    let (left, right) = Channel::pair();
    let _server = Dispatcher::builder().php_notification("m").spawn(right);
    let client = Dispatcher::builder().spawn(left);
    let answer = tokio::time::timeout(LONG, client.call_raw("m", bytes::Bytes::new())).await;
    match answer.unwrap() {
        Err(CallError::Remote(error)) => assert_eq!(error.code, -32601, "answered"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn an_iterator_yielding_null_is_refused_rather_than_sent() {
    let (mut php, channel) = Php::pipe();
    let router = Router::new().request(|cx: Context, OpenIteratorRequest { .. }| async move {
        let items = futures_util::stream::iter([Ok(None::<i64>)]);
        let iterator_id = cx.streams().unwrap().add(items)?;
        Ok(OpenIteratorResponse { iterator_id })
    });
    let _rust = Dispatcher::builder()
        .codec(Codec::Php)
        .handler(router)
        .spawn(channel);

    php.send(&message(
        "OpenIteratorRequest",
        &[("count", PhpValue::Int(1))],
        0,
    ))
    .await;
    let iterator = int(&php.recv_object().await, "iteratorId");
    php.send(&pull(iterator, 1)).await;
    let answer = php.recv_object().await;
    assert_eq!(answer.class, format!("{NS}ErrorResponse").as_bytes());
    assert_eq!(int(&answer, "requestId"), 1);
}

#[tokio::test]
async fn phps_own_fatal_for_an_unknown_request_id_ends_our_side_with_its_message() {
    let (rust, mut php) = connect();
    // The recorded request is served first: its answer carries the recorded id.
    php.send_bytes(&sample("OpenIteratorRequest")).await;
    let opened = php.recv_object().await;
    assert_eq!(int(&opened, "requestId"), 4, "the recorded request's id");
    php.send_bytes(&sample("FatalErrorResponse (dispatcher"))
        .await;
    match tokio::time::timeout(LONG, rust.closed()).await.unwrap() {
        Termination::PeerFatal { message, .. } => {
            assert!(message.starts_with("Cannot find recipient"), "{message}")
        }
        other => panic!("{other}"),
    }
}

// ===== The example worker, spawned as a PHP parent spawns it =====

/// `target/<profile>/examples/php_worker`, which `cargo test` builds beside this test.
fn example_worker() -> Option<std::path::PathBuf> {
    let deps = std::env::current_exe().ok()?.parent()?.to_path_buf();
    let worker = deps
        .parent()?
        .join("examples")
        .join(format!("php_worker{}", std::env::consts::EXE_SUFFIX));
    worker.exists().then_some(worker)
}

#[tokio::test]
async fn the_example_worker_serves_a_php_parent_over_stdio_and_exits_0_on_the_stop_marker() {
    let Some(worker) = example_worker() else {
        panic!("the php_worker example is not built: run the tests with `--features php`");
    };
    let mut child = tokio::process::Command::new(worker)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut php = Php::new(child.stdout.take().unwrap(), child.stdin.take().unwrap());
    php.send_bytes(&sample("PingRequest")).await;
    let pong = php.recv_object().await;
    assert_eq!(with_own_id(pong, 0), sample("PongResponse"));

    let echo = sample("EchoRequest with array payload");
    let payload = object(decode(&echo)).get(b"payload").unwrap().to_bytes();
    php.send_bytes(&echo).await;
    let echoed = php.recv_object().await;
    assert_eq!(echoed.get(b"payload").unwrap().to_bytes(), payload);

    php.send(&message(
        "OpenIteratorRequest",
        &[("count", PhpValue::Int(3))],
        10,
    ))
    .await;
    let opened = php.recv_object().await;
    let iterator = int(&opened, "iteratorId");
    let mut items = Vec::new();
    for id in 11.. {
        php.send(&pull(iterator, id)).await;
        let answer = php.recv_object().await;
        if answer.get(b"continue") != Some(&PhpValue::Bool(true)) {
            break;
        }
        items.push(answer.get(b"value").unwrap().clone());
    }
    assert_eq!(items, [s("item-0"), s("item-1"), s("item-2")]);

    php.send(&PhpValue::Null).await;
    assert_eq!(php.recv().await, PhpValue::Null, "null answers null");
    assert_eq!(php.recv_bytes().await, None, "then stdout closes");
    let status = tokio::time::timeout(LONG, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "the worker exits with status 0: {status}");
}

// ===== PHP clients of a Rust server =====

#[tokio::test]
async fn a_server_on_the_php_wire_serves_php_clients_refuses_over_its_limit_and_stops_them() {
    use channel_dispatcher::server::Server;
    use channel_dispatcher::PeerInfo;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let server = Server::builder()
        .max_connections(2)
        .serve(listener, |_: &PeerInfo| {
            Dispatcher::builder()
                .codec(Codec::Php)
                .handler(worker_router())
        });
    let connect = || async move {
        let stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let (read, write) = stream.into_split();
        Php::new(read, write)
    };
    let mut clients = vec![connect().await, connect().await];
    for (id, php) in clients.iter_mut().enumerate() {
        php.send(&message(
            "PingRequest",
            &[("note", s(&format!("client {id}")))],
            0,
        ))
        .await;
        let pong = php.recv_object().await;
        assert_eq!(pong.get(b"reply"), Some(&s(&format!("pong: client {id}"))));
    }
    // A third is told why, with the one message that ends a PHP peer.
    let mut third = connect().await;
    let refusal = third.recv_object().await;
    assert_eq!(refusal.class, format!("{NS}FatalErrorResponse").as_bytes());
    assert!(
        matches!(refusal.get(b"message"), Some(PhpValue::String(m)) if String::from_utf8_lossy(m).contains("limit of 2")),
        "{}",
        PhpValue::Object(refusal.clone())
    );
    // Shutting down sends each PHP client the stop marker; each answers it, as PHP does.
    let shutdown = tokio::spawn(async move { server.shutdown().await });
    for php in &mut clients {
        assert_eq!(php.recv().await, PhpValue::Null);
        php.send(&PhpValue::Null).await;
        assert_eq!(php.recv_bytes().await, None);
    }
    tokio::time::timeout(LONG, shutdown).await.unwrap().unwrap();
}

// ===== More of what PHP would never send =====

#[tokio::test]
async fn ids_at_the_edges_are_answered_with_the_same_ids() {
    let (_rust, mut php) = connect();
    for id in [i64::MAX, i64::MIN, -1, 0] {
        php.send(&message("PingRequest", &[("note", s("edge"))], id))
            .await;
        let pong = php.recv_object().await;
        assert_eq!(int(&pong, "requestId"), id);
    }
}

#[tokio::test]
async fn a_duplicate_id_in_flight_is_dropped_and_the_first_answered_once() {
    let (mut php, channel) = Php::pipe();
    let (release, released) = tokio::sync::watch::channel(false);
    let router = Router::new().request(move |_cx: Context, PingRequest { note }| {
        let mut released = released.clone();
        async move {
            let _ = released.wait_for(|r| *r).await;
            Ok(PongResponse { reply: note })
        }
    });
    let rust = Dispatcher::builder()
        .codec(Codec::Php)
        .handler(router)
        .spawn(channel);
    php.send(&message("PingRequest", &[("note", s("first"))], 5))
        .await;
    php.send(&message("PingRequest", &[("note", s("second"))], 5))
        .await;
    php.send(&message("PingRequest", &[("note", s("other"))], 6))
        .await;
    // Frames are handled in order: once 6 runs, the duplicate was seen.
    tokio::time::timeout(LONG, async {
        while rust.running_handlers() < 2 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap();
    release.send(true).unwrap();
    let mut replies = Vec::new();
    for _ in 0..2 {
        let pong = php.recv_object().await;
        replies.push((int(&pong, "requestId"), pong.get(b"reply").cloned()));
    }
    replies.sort_by_key(|(id, _)| *id);
    assert_eq!(replies, [(5, Some(s("first"))), (6, Some(s("other")))]);
    // Nothing more: the duplicate got no answer (PHP would take one as a stray).
    php.send(&message("PingRequest", &[("note", s("last"))], 7))
        .await;
    assert_eq!(int(&php.recv_object().await, "requestId"), 7);
}

#[tokio::test]
async fn the_stop_marker_while_our_calls_wait_fails_them_at_once() {
    let (rust, mut php) = connect();
    let call = tokio::spawn({
        let rust = rust.clone();
        async move { rust.request(PingRequest { note: "x".into() }).await }
    });
    let _request = php.recv_object().await;
    php.send(&PhpValue::Null).await;
    let failed = tokio::time::timeout(LONG, call).await.unwrap().unwrap();
    assert!(
        matches!(failed, Err(CallError::Terminated(_))),
        "{failed:?}"
    );
    assert_eq!(php.recv().await, PhpValue::Null);
    tokio::time::timeout(LONG, rust.closed()).await.unwrap();
}

#[tokio::test]
async fn a_falsy_top_level_value_ends_the_link_as_it_ends_php() {
    for falsy in [&b"b:0;"[..], b"i:0;", b"s:0:\"\";", b"a:0:{}"] {
        let (rust, mut php) = connect();
        php.send_bytes(falsy).await;
        let reason = tokio::time::timeout(LONG, rust.closed()).await.unwrap();
        assert!(reason.is_graceful(), "{reason}");
        assert_eq!(php.recv().await, PhpValue::Null);
    }
}

#[tokio::test]
async fn a_frame_over_our_maximum_and_an_end_inside_a_frame_end_the_link_with_the_rule() {
    let (mut php, channel) = Php::pipe();
    let mut limits = channel_dispatcher::Limits::default();
    limits.max_frame_length = 1024;
    let rust = Dispatcher::builder()
        .codec(Codec::Php)
        .limits(limits)
        .spawn(channel);
    php.write.write_all(b"\x00\x01\x04\x00\x00").await.unwrap(); // 1025 bytes claimed
    match tokio::time::timeout(LONG, rust.closed()).await.unwrap() {
        Termination::Protocol(ProtocolError::FrameTooLarge {
            len: 1025,
            max: 1024,
            ..
        }) => {}
        other => panic!("{other}"),
    }

    let (mut php, channel) = Php::pipe();
    let rust = Dispatcher::builder().codec(Codec::Php).spawn(channel);
    php.write
        .write_all(b"\x00\x10\x00\x00\x00O:1:")
        .await
        .unwrap();
    php.write.shutdown().await.unwrap();
    match tokio::time::timeout(LONG, rust.closed()).await.unwrap() {
        Termination::Protocol(ProtocolError::TruncatedFrame { expected: 21, .. }) => {}
        other => panic!("{other}"),
    }
}

#[tokio::test]
async fn answers_to_calls_never_made_are_dropped_and_the_link_goes_on() {
    let (rust, mut php) = connect();
    for request_id in [PhpValue::Int(12345), PhpValue::Int(-7), s("1")] {
        let stray = PhpObject::new("PongResponse")
            .with(Property::public("reply"), s("?"))
            .with(Property::public("requestId"), request_id);
        php.send(&PhpValue::Object(stray)).await;
    }
    php.send(&message("PingRequest", &[("note", s("still"))], 1))
        .await;
    assert_eq!(
        php.recv_object().await.get(b"reply"),
        Some(&s("pong: still"))
    );
    assert!(!rust.is_closed());
}
