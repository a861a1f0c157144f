//! A hostile PHP peer on the PHP original's wire ([`Codec::Php`]): a scripted raw peer over
//! `tokio::io::duplex` sends what real PHP never sends (ids at the ends of `i64`, duplicate and
//! stray ids, floods past the limits, lengths that lie, nesting at and past the limit, odd
//! classes, falsy frames, a stop marker amid pending work, a peer that stops reading, end of
//! file inside a frame), and the tests check the crate's promises: no panic, memory bounded by
//! the limits, the connection ends once with a typed reason or keeps serving, no hang, and
//! answers only to the ids the peer sent.
//!
//! Tests that expose a bug are kept, marked `#[ignore = "BUG: ..."]`.

#[path = "support/php_peer.rs"]
mod php_peer;
#[path = "../examples/php/protocol.rs"]
mod protocol;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use channel_dispatcher::error::code;
use channel_dispatcher::php::{PhpObject, PhpValue, Property};
use channel_dispatcher::{
    Builder, CallError, Codec, Context, Dispatcher, HandlerError, Limit, Limits, Notification,
    ProtocolError, RemoteStream, Request, Router, Termination,
};
use futures_util::StreamExt;
use php_peer::*;
use protocol::*;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, Semaphore};

// ===== What only these attacks use (the scripted peer is tests/support/php_peer.rs) =====

/// An answer of `class` to `request_id`: its properties, `requestId`, then its private `id`.
fn answer(class: &str, properties: &[(&str, PhpValue)], request_id: PhpValue) -> PhpValue {
    let mut object = PhpObject::new(class);
    for (name, value) in properties {
        object = object.with(Property::public(*name), value.clone());
    }
    let object = object
        .with(Property::public("requestId"), request_id)
        .with(Property::private(class, "id"), PhpValue::Int(0));
    PhpValue::Object(object)
}

/// `O:<len>:"<class>":<n>:{…}` of raw serialized properties (names written as strings here).
fn raw_object(class: &str, properties: &[(&str, &str)]) -> String {
    let mut out = format!("O:{}:\"{class}\":{}:{{", class.len(), properties.len());
    for (name, value) in properties {
        out.push_str(&format!("s:{}:\"{name}\";{value}", name.len()));
    }
    out.push('}');
    out
}

/// The private `id` of `class`, mangled as PHP writes it.
fn private_id(class: &str) -> String {
    format!("\0{class}\0id")
}

impl Php {
    /// A ping whose pong is the next frame: nothing else was sent before it.
    async fn still_serves(&mut self, id: i64) {
        self.send(&ping("still", id)).await;
        let pong = self.recv_object().await;
        assert_eq!(
            pong.class,
            b"PongResponse",
            "{}",
            PhpValue::Object(pong.clone())
        );
        assert_eq!(text(&pong, "reply"), "pong: still");
        assert_eq!(int(&pong, "requestId"), id);
    }
}

fn is_error(object: &PhpObject) -> bool {
    object.class == fqcn("ErrorResponse").as_bytes()
}

fn is_fatal(object: &PhpObject) -> bool {
    object.class == fqcn("FatalErrorResponse").as_bytes()
}

/// What the Rust side's handlers wait for: permits to answer `PingRequest("wait…")` and
/// `NotifyRequest("wait…")`, and the items of the iterator `OpenIteratorRequest(-1)` opens.
struct Gates {
    handlers: Arc<Semaphore>,
    items: mpsc::UnboundedSender<String>,
}

fn gated_router() -> (Router, Gates) {
    let handlers = Arc::new(Semaphore::new(0));
    let (items, receiver) = mpsc::unbounded_channel::<String>();
    let receiver = Arc::new(Mutex::new(Some(receiver)));
    let (ping_gate, notify_gate) = (handlers.clone(), handlers.clone());
    let router = Router::new()
        .request(move |_cx: Context, PingRequest { note }| {
            let gate = ping_gate.clone();
            async move {
                if note.starts_with("wait") {
                    gate.acquire().await.unwrap().forget();
                }
                Ok(PongResponse {
                    reply: format!("pong: {note}"),
                })
            }
        })
        .request(
            |_cx: Context, EchoRequest { payload }| async move { Ok(EchoResponse { payload }) },
        )
        .request(move |cx: Context, OpenIteratorRequest { count }| {
            let receiver = receiver.clone();
            async move {
                let streams = cx.streams().unwrap();
                let iterator_id = if count < 0 {
                    let receiver = receiver.lock().unwrap().take().expect("one gated iterator");
                    let items = futures_util::stream::unfold(receiver, |mut receiver| async move {
                        let item = receiver.recv().await?;
                        Some((Ok::<_, HandlerError>(item), receiver))
                    });
                    streams.add(items)?
                } else {
                    let items = (0..count).map(|i| Ok::<_, HandlerError>(format!("item-{i}")));
                    streams.add(futures_util::stream::iter(items))?
                };
                Ok(OpenIteratorResponse { iterator_id })
            }
        })
        .notification(move |_cx: Context, NotifyRequest { text }| {
            let gate = notify_gate.clone();
            async move {
                if text.starts_with("wait") {
                    gate.acquire().await.unwrap().forget();
                }
                Ok(())
            }
        });
    (router, Gates { handlers, items })
}

/// A Rust side on the PHP wire, configured by `configure`, with the gated routes.
fn spawn_with(configure: impl FnOnce(Builder) -> Builder) -> (Dispatcher, Php, Gates) {
    let (php, channel) = Php::pipe();
    let (router, gates) = gated_router();
    let builder = Dispatcher::builder()
        .codec(Codec::Php)
        .php_notification(NotifyRequest::METHOD);
    let rust = configure(builder).handler(router).spawn(channel);
    (rust, php, gates)
}

fn spawn() -> (Dispatcher, Php, Gates) {
    spawn_with(|builder| builder)
}

/// Lets the Rust side take in what was sent (time is paused: it stands still meanwhile, but
/// every task runs until it waits).
async fn settle() {
    tokio::time::sleep(Duration::from_millis(10)).await;
}

async fn closed(rust: &Dispatcher) -> Termination {
    tokio::time::timeout(LONG, rust.closed())
        .await
        .expect("the connection never ended")
}

/// Opens an iterator on the Rust side (`count` items, or gated for -1) with request `id`.
async fn open_iterator(php: &mut Php, count: i64, id: i64) -> i64 {
    php.send(&message(
        "OpenIteratorRequest",
        &[("count", PhpValue::Int(count))],
        id,
    ))
    .await;
    let opened = php.recv_object().await;
    assert_eq!(opened.class, b"OpenIteratorResponse");
    assert_eq!(int(&opened, "requestId"), id);
    int(&opened, "iteratorId")
}

const EXTREME_IDS: [i64; 8] = [i64::MAX, i64::MIN, -1, 0, 1, i64::MAX - 1, i64::MIN + 1, -2];

// ===== Ids =====

#[tokio::test(start_paused = true)]
async fn extreme_request_ids_are_answered_with_exactly_the_ids_sent() {
    let (rust, mut php, _gates) = spawn();
    for id in EXTREME_IDS {
        php.send(&ping(&format!("n{id}"), id)).await;
    }
    let mut answered = std::collections::HashMap::new();
    for _ in EXTREME_IDS {
        let pong = php.recv_object().await;
        assert_eq!(pong.class, b"PongResponse");
        let id = int(&pong, "requestId");
        assert_eq!(text(&pong, "reply"), format!("pong: n{id}"));
        assert!(answered.insert(id, ()).is_none(), "answered twice: {id}");
    }
    let mut sent = EXTREME_IDS.to_vec();
    let mut got: Vec<i64> = answered.into_keys().collect();
    sent.sort_unstable();
    got.sort_unstable();
    assert_eq!(got, sent);
    // Errors (from the router and from salvage) carry the ids too.
    for id in EXTREME_IDS {
        php.send(&message("UnknownRequest", &[("what", s("x"))], id))
            .await;
        let error = php.recv_object().await;
        assert!(is_error(&error));
        assert_eq!(int(&error, "code"), 404);
        assert_eq!(int(&error, "requestId"), id);
        let hostile =
            format!("O:11:\"PingRequest\":2:{{s:2:\"id\";i:{id};s:4:\"note\";E:7:\"Foo:Bar\";}}");
        php.send_bytes(hostile.as_bytes()).await;
        let error = php.recv_object().await;
        assert!(is_error(&error));
        assert_eq!(int(&error, "requestId"), id, "salvaged");
    }
    assert!(!rust.is_closed());
}

#[tokio::test(start_paused = true)]
async fn extreme_pull_ids_are_answered_with_exactly_the_ids_sent() {
    let (_rust, mut php, _gates) = spawn();
    let iterator = open_iterator(&mut php, EXTREME_IDS.len() as i64, 42).await;
    for (position, id) in EXTREME_IDS.into_iter().enumerate() {
        php.send(&pull(iterator, id)).await;
        let item = php.recv_object().await;
        assert_eq!(item.class, fqcn("Response\\IteratorContinue").as_bytes());
        assert_eq!(int(&item, "requestId"), id);
        assert_eq!(item.get(b"continue"), Some(&PhpValue::Bool(true)));
        assert_eq!(int(&item, "position"), position as i64);
        assert_eq!(text(&item, "value"), format!("item-{position}"));
    }
    for id in EXTREME_IDS {
        php.send(&pull(iterator, id)).await;
        let end = php.recv_object().await;
        assert_eq!(end.get(b"continue"), Some(&PhpValue::Bool(false)));
        assert_eq!(int(&end, "requestId"), id);
    }
}

/// PHP's request `php_id` makes a call back into PHP, and PHP, before it answers, sends a
/// request of its own: with one handler slot, it must still be served (the call is nested).
async fn nested_call_with_php_id(php_id: i64) {
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
        php_id,
    ))
    .await;
    let nested = php.recv_object().await;
    assert_eq!(nested.class, b"PingRequest");
    let inner = php_id.wrapping_add(1);
    php.send(&ping("x", inner)).await;
    let served = php.recv_object().await;
    assert_eq!(
        served.get(b"reply"),
        Some(&s("inner x")),
        "served while request {php_id} waits"
    );
    assert_eq!(int(&served, "requestId"), inner);
    let pong = answer(
        "PongResponse",
        &[("reply", s("pong: 3"))],
        PhpValue::Int(int(&nested, "id")),
    );
    php.send(&pong).await;
    let opened = php.recv_object().await;
    assert_eq!(int(&opened, "iteratorId"), 77);
    assert_eq!(int(&opened, "requestId"), php_id);
}

#[tokio::test(start_paused = true)]
async fn requests_at_the_ends_of_i64_keep_their_nested_calls_nested() {
    for php_id in [i64::MAX, i64::MIN, -2] {
        nested_call_with_php_id(php_id).await;
    }
}

#[tokio::test(start_paused = true)]
async fn request_id_minus_1_keeps_its_nested_calls_nested() {
    nested_call_with_php_id(-1).await;
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_in_flight_request_id_is_answered_once() {
    let (rust, mut php, gates) = spawn();
    php.send(&ping("wait-first", 5)).await;
    settle().await;
    assert_eq!(rust.running_handlers(), 1);
    // The same id while the first runs: dropped (an answer would be read as the first's).
    php.send(&ping("duplicate", 5)).await;
    php.send(&ping("other", 6)).await;
    let other = php.recv_object().await;
    assert_eq!(
        int(&other, "requestId"),
        6,
        "{}",
        PhpValue::Object(other.clone())
    );
    gates.handlers.add_permits(1);
    let first = php.recv_object().await;
    assert_eq!(int(&first, "requestId"), 5);
    assert_eq!(text(&first, "reply"), "pong: wait-first");
    // No second answer to 5 comes before this one.
    php.still_serves(7).await;
    // And once answered, the id may be used again.
    php.still_serves(5).await;
    assert!(!rust.is_closed());
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_queued_request_id_is_answered_once() {
    let (rust, mut php, gates) = spawn_with(|b| b.max_concurrent_handlers(1));
    php.send(&ping("wait-running", 1)).await;
    settle().await;
    assert_eq!(rust.running_handlers(), 1);
    php.send(&ping("queued", 2)).await;
    php.send(&ping("duplicate of queued", 2)).await;
    settle().await;
    gates.handlers.add_permits(1);
    let running = php.recv_object().await;
    assert_eq!(int(&running, "requestId"), 1);
    let queued = php.recv_object().await;
    assert_eq!(int(&queued, "requestId"), 2);
    assert_eq!(text(&queued, "reply"), "pong: queued");
    php.still_serves(3).await;
}

// ===== Floods past the limits =====

#[tokio::test(start_paused = true)]
async fn a_request_flood_past_the_limit_is_refused_by_id_then_cut_off() {
    let mut limits = Limits::default();
    limits.max_pending_requests = 4;
    let (rust, mut php, _gates) = spawn_with(|b| b.limits(limits).max_concurrent_handlers(1));
    for id in 0..4 {
        php.send(&ping(&format!("wait-{id}"), id)).await;
    }
    // Over the limit: refused, each to its own id, as many times as requests may be pending.
    for id in 4..8 {
        php.send(&ping("over", id)).await;
        let refused = php.recv_object().await;
        assert!(is_error(&refused), "{}", PhpValue::Object(refused.clone()));
        assert_eq!(int(&refused, "code"), code::OVERLOADED);
        assert_eq!(int(&refused, "requestId"), id);
    }
    // Then the peer is cut off, with the one message that ends a PHP peer.
    php.send(&ping("over", 8)).await;
    let fatal = php.recv_object().await;
    assert!(is_fatal(&fatal), "{}", PhpValue::Object(fatal.clone()));
    match closed(&rust).await {
        Termination::Protocol(ProtocolError::AdmissionExceeded { limit, max }) => {
            assert_eq!((limit, max), (Limit::PendingRequests, 4))
        }
        other => panic!("{other}"),
    }
    assert_eq!(php.recv_bytes().await, None, "nothing after the fatal");
}

#[tokio::test(start_paused = true)]
async fn a_notification_flood_past_the_limit_is_cut_off_and_never_answered() {
    let mut limits = Limits::default();
    limits.max_pending_notifications = 4;
    let (rust, mut php, _gates) = spawn_with(|b| b.limits(limits).max_concurrent_handlers(1));
    for id in 0..100 {
        php.send(&message("NotifyRequest", &[("text", s("wait"))], id))
            .await;
        if rust.is_closed() {
            break;
        }
    }
    match closed(&rust).await {
        Termination::Protocol(ProtocolError::AdmissionExceeded { limit, max }) => {
            assert_eq!((limit, max), (Limit::PendingNotifications, 4))
        }
        other => panic!("{other}"),
    }
    let fatal = php.recv_object().await;
    assert!(
        is_fatal(&fatal),
        "no answer to a notification, only the fatal"
    );
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_stops_reading_for_an_hour_then_reads_gets_every_answer() {
    let (rust, mut php, _gates) = spawn_with(|b| b.write_buffer_limit(4096));
    let mut write = php.take_write();
    let payload = PhpValue::String(vec![b'x'; 8 * 1024]);
    let expected = payload.to_bytes();
    let writer = tokio::spawn(async move {
        for id in 0..200 {
            let echo = message("EchoRequest", &[("payload", payload.clone())], id);
            write.write_all(&framed(&echo.to_bytes())).await.unwrap();
        }
        write
    });
    // 1.6 MB of answers for a pipe of 64 KiB: our side holds them back, keeps reading.
    let _write = tokio::time::timeout(LONG, writer)
        .await
        .expect("our side stopped reading")
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert!(!rust.is_closed(), "{:?}", rust.closed().await);
    let mut ids = Vec::new();
    for _ in 0..200 {
        let echoed = php.recv_object().await;
        assert_eq!(echoed.class, b"EchoResponse");
        assert_eq!(echoed.get(b"payload").unwrap().to_bytes(), expected);
        ids.push(int(&echoed, "requestId"));
    }
    ids.sort_unstable();
    assert_eq!(ids, (0..200).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_floods_bad_requests_and_never_reads_is_cut_off() {
    let (rust, mut php, _gates) = spawn_with(|b| b.max_frame_length(4096).write_buffer_limit(4096));
    let mut write = php.take_write();
    let flood = tokio::spawn(async move {
        // Each is answered at once (an ErrorResponse salvaged by id), room or not.
        for id in 0..100_000 {
            let bad = format!(
                "O:11:\"PingRequest\":2:{{s:2:\"id\";i:{id};s:4:\"note\";E:7:\"Foo:Bar\";}}"
            );
            if write.write_all(&framed(bad.as_bytes())).await.is_err() {
                return id;
            }
        }
        100_000
    });
    match closed(&rust).await {
        Termination::Protocol(ProtocolError::NotReading { .. }) => {}
        other => panic!("{other}"),
    }
    let sent = tokio::time::timeout(LONG, flood).await.unwrap().unwrap();
    assert!(sent < 100_000, "cut off before the flood ended: {sent}");
}

// ===== Iterators =====

#[tokio::test(start_paused = true)]
async fn pulls_of_iterators_never_issued_are_not_found() {
    let (rust, mut php, _gates) = spawn();
    let issued = open_iterator(&mut php, 1, 0).await;
    for (id, iterator) in [
        (1, 0),
        (2, issued + 1),
        (3, 12_345),
        (4, i64::MAX),
        (5, u32::MAX as i64),
    ] {
        php.send(&pull(iterator, id)).await;
        let unknown = php.recv_object().await;
        assert!(is_error(&unknown), "{}", PhpValue::Object(unknown.clone()));
        assert_eq!(text(&unknown, "message"), "Iterator not found");
        assert_eq!(int(&unknown, "code"), 0);
        assert_eq!(int(&unknown, "requestId"), id);
    }
    // Malformed pulls: no iteratorId, a string one; answered by id all the same.
    let class = fqcn("Request\\IteratorContinue");
    php.send(&message(&class, &[], 6)).await;
    php.send(&message(&class, &[("iteratorId", s("1"))], 7))
        .await;
    for id in [6, 7] {
        let error = php.recv_object().await;
        assert!(is_error(&error));
        assert_eq!(int(&error, "requestId"), id);
    }
    // Without an id there is nobody to answer.
    let no_id =
        PhpObject::new(class.clone()).with(Property::public("iteratorId"), PhpValue::Int(1));
    php.send(&PhpValue::Object(no_id)).await;
    php.still_serves(8).await;
    assert!(!rust.is_closed());
}

#[tokio::test(start_paused = true)]
async fn negative_iterator_ids_are_not_found_as_php_says() {
    let (_rust, mut php, _gates) = spawn();
    for (id, iterator) in [(1, -1), (2, i64::MIN)] {
        php.send(&pull(iterator, id)).await;
        let unknown = php.recv_object().await;
        assert!(is_error(&unknown));
        assert_eq!(int(&unknown, "requestId"), id);
        assert_eq!(text(&unknown, "message"), "Iterator not found");
        assert_eq!(int(&unknown, "code"), 0);
    }
}

#[tokio::test(start_paused = true)]
async fn concurrent_pulls_of_one_iterator_refuse_the_second_by_its_id() {
    let (rust, mut php, gates) = spawn();
    let iterator = open_iterator(&mut php, -1, 0).await;
    php.send(&pull(iterator, 1)).await;
    php.send(&pull(iterator, 2)).await;
    let refused = php.recv_object().await;
    assert!(is_error(&refused), "{}", PhpValue::Object(refused.clone()));
    assert_eq!(int(&refused, "requestId"), 2);
    gates.items.send("a".into()).unwrap();
    let item = php.recv_object().await;
    assert_eq!(int(&item, "requestId"), 1);
    assert_eq!(int(&item, "position"), 0);
    assert_eq!(text(&item, "value"), "a");
    // The iterator goes on from where it was.
    php.send(&pull(iterator, 3)).await;
    gates.items.send("b".into()).unwrap();
    let item = php.recv_object().await;
    assert_eq!(int(&item, "requestId"), 3);
    assert_eq!(int(&item, "position"), 1);
    drop(gates.items);
    php.send(&pull(iterator, 4)).await;
    let end = php.recv_object().await;
    assert_eq!(end.get(b"continue"), Some(&PhpValue::Bool(false)));
    assert_eq!(int(&end, "requestId"), 4);
    for id in 5..10 {
        php.send(&pull(iterator, id)).await;
        let end = php.recv_object().await;
        assert_eq!(end.get(b"continue"), Some(&PhpValue::Bool(false)));
        assert_eq!(int(&end, "requestId"), id);
    }
    assert!(!rust.is_closed());
}

#[tokio::test(start_paused = true)]
async fn a_request_reusing_the_id_of_a_pending_pull_is_not_answered_ahead_of_it() {
    for duplicate in [pull(1, 10), ping("same id", 10)] {
        let (_rust, mut php, gates) = spawn();
        let iterator = open_iterator(&mut php, -1, 0).await;
        assert_eq!(iterator, 1);
        php.send(&pull(iterator, 10)).await;
        php.send(&duplicate).await;
        gates.items.send("first".into()).unwrap();
        let first = php.recv_object().await;
        assert_eq!(int(&first, "requestId"), 10);
        assert_eq!(
            first.class,
            fqcn("Response\\IteratorContinue").as_bytes(),
            "the first answer to 10 is the pull's: {}",
            PhpValue::Object(first.clone())
        );
        php.still_serves(11).await;
    }
}

#[tokio::test(start_paused = true)]
async fn duplicate_pull_ids_are_dropped_and_leak_no_pending_place() {
    let mut limits = Limits::default();
    limits.max_pending_requests = 2;
    let (rust, mut php, gates) = spawn_with(|b| b.limits(limits));
    let iterator = open_iterator(&mut php, -1, 0).await;
    for (round, id) in [10, 11, 12, 13].into_iter().enumerate() {
        // The same pull twice while it waits: the second is dropped, as a reused id is.
        php.send(&pull(iterator, id)).await;
        php.send(&pull(iterator, id)).await;
        settle().await;
        gates.items.send(format!("item {round}")).unwrap();
        let item = php.recv_object().await;
        assert_eq!(item.class, fqcn("Response\\IteratorContinue").as_bytes());
        assert_eq!(int(&item, "requestId"), id);
        assert_eq!(int(&item, "position"), round as i64);
    }
    // Nothing is pending now: requests are served, up to the limit at once.
    php.send(&ping("wait", 20)).await;
    php.still_serves(21).await;
    assert!(!rust.is_closed());
}

// ===== Lengths, sizes and nesting that lie =====

#[tokio::test(start_paused = true)]
async fn huge_declared_lengths_with_few_bytes_are_refused_by_id_without_trusting_them() {
    let (rust, mut php, _gates) = spawn();
    let notes = [
        "s:4294967295:\"ab\";",
        "s:18446744073709551615:\"x\";",
        "s:99999999999999999999999:\"x\";",
        "s:-1:\"x\";",
        "s:+5:\"hello\";",
        "s:5:\"hi\";",
        "a:999999999999:{i:0;N;}",
        "a:4294967295:{}",
        "O:999999999:\"x\":0:{}",
        "O:1:\"x\":18446744073709551615:{}",
        "a:1:{i:0;",
        "i:99999999999999999999;",
        "d:1e999999999999;",
        "b:2;",
        "i:;",
        "s:1:\"ab\";",
    ];
    for (id, note) in notes.iter().enumerate() {
        let frame = format!("O:11:\"PingRequest\":2:{{s:2:\"id\";i:{id};s:4:\"note\";{note}}}");
        php.send_bytes(frame.as_bytes()).await;
        let error = php.recv_object().await;
        assert!(
            is_error(&error),
            "{note}: {}",
            PhpValue::Object(error.clone())
        );
        assert_eq!(int(&error, "requestId"), id as i64, "{note}");
        // Refused by the decoder, or (`d:1e999999999999;` is INF, as in PHP) by the type.
        let message = text(&error, "message");
        assert!(
            message.starts_with("malformed request") || message.contains("expected a string"),
            "{note}: {message}"
        );
    }
    // Lengths that lie at the top: nothing to read an id from, nothing answered.
    for frame in [
        &b"O:4294967295:\"PingRequest\":1:{s:2:\"id\";i:1;}"[..],
        b"O:11:\"PingRequest\":4294967295:{s:2:\"id\";i:1;}",
        b"a:4294967295:{i:0;N;}",
        b"s:4294967295:\"x\";",
        b"O:11:\"PingRequest\"",
    ] {
        php.send_bytes(frame).await;
    }
    php.still_serves(100).await;
    assert!(!rust.is_closed());
}

/// The message `build` makes, padded to `len` bytes exactly.
fn padded(len: usize, build: impl Fn(&str) -> PhpValue) -> PhpValue {
    let mut pad = len - build("").to_bytes().len();
    loop {
        let value = build(&"x".repeat(pad));
        match value.to_bytes().len() {
            at if at == len => return value,
            at if at > len => pad -= at - len,
            _ => panic!("no padding makes {len} bytes"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_frame_at_the_maximum_is_served_and_one_just_over_ends_the_connection() {
    let max = 1024;
    let mut limits = Limits::default();
    limits.max_frame_length = max;
    let (rust, mut php, _gates) = spawn_with(|b| b.limits(limits));
    // An UnknownRequest padded to exactly the maximum: answered (404, a small answer).
    let exact = padded(max, |pad| message("UnknownRequest", &[("what", s(pad))], 1));
    php.send(&exact).await;
    let error = php.recv_object().await;
    assert_eq!((int(&error, "code"), int(&error, "requestId")), (404, 1));
    // A ping at the maximum, whose pong would be over it (the peer is taken to keep our
    // limits): answered with an error to its id rather than a frame it would refuse.
    php.send(&padded(max, |pad| ping(pad, 2))).await;
    let error = php.recv_object().await;
    assert!(is_error(&error), "{}", PhpValue::Object(error.clone()));
    assert_eq!(int(&error, "code"), code::FRAME_TOO_LARGE);
    assert_eq!(int(&error, "requestId"), 2);
    // One byte over: the connection ends at the header, with the rule.
    let mut over = vec![0u8];
    over.extend_from_slice(&(max as u32 + 1).to_le_bytes());
    over.extend_from_slice(b"O:11:\"PingRequest\"");
    php.write.write_all(&over).await.unwrap();
    match closed(&rust).await {
        Termination::Protocol(ProtocolError::FrameTooLarge {
            len, max: limit, ..
        }) => {
            assert_eq!((len, limit), (max + 1, max))
        }
        other => panic!("{other}"),
    }
    let fatal = php.recv_object().await;
    assert!(is_fatal(&fatal), "{}", PhpValue::Object(fatal.clone()));
    assert_eq!(php.recv_bytes().await, None);
}

#[tokio::test(start_paused = true)]
async fn a_header_claiming_4_gib_ends_the_connection_at_once() {
    let (rust, mut php, _gates) = spawn();
    php.write
        .write_all(b"\x00\xff\xff\xff\xffO:11:")
        .await
        .unwrap();
    match closed(&rust).await {
        Termination::Protocol(ProtocolError::FrameTooLarge { len, .. }) => {
            assert_eq!(len, u32::MAX as usize)
        }
        other => panic!("{other}"),
    }
    assert!(is_fatal(&php.recv_object().await));
}

fn nested_arrays(depth: usize) -> String {
    "a:1:{i:0;".repeat(depth) + "i:1;" + &"}".repeat(depth)
}

fn nested_objects(depth: usize) -> String {
    "O:1:\"X\":1:{s:1:\"x\";".repeat(depth) + "N;" + &"}".repeat(depth)
}

#[tokio::test(start_paused = true)]
async fn nesting_at_the_limit_is_served_and_just_past_it_is_refused_by_id() {
    let (rust, mut php, _gates) = spawn();
    // The request object is level 1: 63 arrays in it make 64, the default limit.
    let echo_id = private_id("EchoRequest");
    let echo = |payload: &str, id: i64| {
        let id = format!("i:{id};");
        raw_object("EchoRequest", &[("payload", payload), (&echo_id, &id)])
    };
    let at_limit = nested_arrays(63);
    php.send_bytes(echo(&at_limit, 1).as_bytes()).await;
    let echoed = php.recv_object().await;
    assert_eq!(echoed.class, b"EchoResponse");
    assert_eq!(
        echoed.get(b"payload").unwrap().to_bytes(),
        at_limit.as_bytes()
    );
    assert_eq!(int(&echoed, "requestId"), 1);
    // Objects count as levels too.
    let objects = nested_objects(63);
    php.send_bytes(echo(&objects, 2).as_bytes()).await;
    let echoed = php.recv_object().await;
    assert_eq!(
        echoed.get(b"payload").unwrap().to_bytes(),
        objects.as_bytes()
    );
    // One more, with the id last (as PHP writes it): refused, answered by its id.
    for (id, payload) in [
        (3, nested_arrays(64)),
        (4, nested_objects(64)),
        (5, nested_arrays(500)),
    ] {
        php.send_bytes(echo(&payload, id).as_bytes()).await;
        let error = php.recv_object().await;
        assert!(is_error(&error), "{}", PhpValue::Object(error.clone()));
        assert_eq!(int(&error, "requestId"), id);
        assert!(text(&error, "message").contains("deeper than 64"));
    }
    // Far past it, with the id first: no stack overflow, still answered.
    let deep = nested_arrays(200_000);
    let frame = format!("O:11:\"EchoRequest\":2:{{s:2:\"id\";i:6;s:7:\"payload\";{deep}}}");
    php.send_bytes(frame.as_bytes()).await;
    let error = php.recv_object().await;
    assert_eq!(int(&error, "requestId"), 6);
    // Nested inside the value of `id` or `requestId` (not ints: nothing to answer).
    let deep = nested_arrays(100);
    php.send_bytes(raw_object("PingRequest", &[("id", &deep)]).as_bytes())
        .await;
    php.send_bytes(raw_object("PongResponse", &[("requestId", &deep)]).as_bytes())
        .await;
    php.still_serves(7).await;
    assert!(!rust.is_closed());
}

#[tokio::test(start_paused = true)]
async fn a_request_nested_600_deep_with_its_id_last_is_still_answered() {
    let (_rust, mut php, _gates) = spawn();
    let payload = nested_arrays(600);
    let id = private_id("EchoRequest");
    let frame = raw_object("EchoRequest", &[("payload", &payload), (&id, "i:1;")]);
    php.send_bytes(frame.as_bytes()).await;
    let error = php.recv_object().await;
    assert!(is_error(&error), "{}", PhpValue::Object(error.clone()));
    assert_eq!(int(&error, "requestId"), 1);
}

/// The attack of [`a_deep_id_or_request_id_value_does_not_overflow_the_stack`], on a thread
/// with tokio's default worker stack (2 MiB).
fn deep_id_values_on_a_2_mib_stack() {
    let attack = || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(async {
            let (rust, mut php, _gates) = spawn();
            let deep = nested_arrays(511);
            php.send_bytes(raw_object("PingRequest", &[("id", &deep)]).as_bytes())
                .await;
            php.send_bytes(raw_object("PongResponse", &[("requestId", &deep)]).as_bytes())
                .await;
            php.still_serves(1).await;
            assert!(!rust.is_closed());
        });
    };
    std::thread::Builder::new()
        .stack_size(2 * 1024 * 1024)
        .spawn(attack)
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn a_deep_id_or_request_id_value_does_not_overflow_the_stack() {
    const CHILD: &str = "PHP_ATTACKS_STACK_CHILD";
    if std::env::var_os(CHILD).is_some() {
        return deep_id_values_on_a_2_mib_stack();
    }
    // A stack overflow aborts the process: the attack runs in a child test process.
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_deep_id_or_request_id_value_does_not_overflow_the_stack",
            "--include-ignored",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "the attacked process died: {status}");
}

#[tokio::test(start_paused = true)]
async fn too_many_values_are_refused_by_id() {
    let (rust, mut php, _gates) = spawn();
    // 600,000 entries are 1,200,000 values, over the default 1,000,000: about 4 MB.
    let entries = 600_000;
    let mut payload = format!("a:{entries}:{{");
    for _ in 0..entries {
        payload.push_str("i:0;N;");
    }
    payload.push('}');
    let frame = format!("O:11:\"EchoRequest\":2:{{s:2:\"id\";i:1;s:7:\"payload\";{payload}}}");
    php.send_bytes(frame.as_bytes()).await;
    let error = php.recv_object().await;
    assert!(is_error(&error), "{}", PhpValue::Object(error.clone()));
    assert_eq!(int(&error, "requestId"), 1);
    assert!(text(&error, "message").contains("more than 1000000 values"));
    php.still_serves(2).await;
    assert!(!rust.is_closed());
}

// ===== Odd classes and properties =====

#[tokio::test(start_paused = true)]
async fn odd_class_names_are_answered_by_id() {
    let (rust, mut php, _gates) = spawn();
    let long = "A".repeat(300);
    let classes = [
        "".to_string(),
        "Ping\0Request".into(),
        "\\PingRequest".into(),
        long,
        // The library's own classes, as requests (they have no requestId).
        fqcn("ErrorResponse"),
        fqcn("SuccessResponse"),
        fqcn("Response\\IteratorContinue"),
        fqcn("FatalErrorResponse").to_lowercase(),
    ];
    let frames: Vec<(i64, String)> = classes
        .iter()
        .enumerate()
        .map(|(id, class)| (id as i64, raw_object(class, &[("id", &format!("i:{id};"))])))
        .collect();
    for (id, frame) in &frames {
        php.send_bytes(frame.as_bytes()).await;
        let error = php.recv_object().await;
        assert!(
            is_error(&error),
            "{id}: {}",
            PhpValue::Object(error.clone())
        );
        assert_eq!(int(&error, "requestId"), *id);
    }
    php.still_serves(8).await;
    assert!(!rust.is_closed());
}

#[tokio::test(start_paused = true)]
async fn a_request_whose_class_is_not_utf8_is_answered_by_id() {
    let (_rust, mut php, _gates) = spawn();
    php.send_bytes(b"O:2:\"\xff\xfe\":1:{s:2:\"id\";i:4;}")
        .await;
    let error = php.recv_object().await;
    assert!(is_error(&error), "{}", PhpValue::Object(error.clone()));
    assert_eq!(int(&error, "requestId"), 4);
}

#[tokio::test(start_paused = true)]
async fn an_answer_whose_class_is_not_utf8_or_empty_still_answers_its_call() {
    let (rust, mut php, _gates) = spawn();
    for class in [&b"\xff\xfe"[..], b""] {
        let call = tokio::spawn({
            let rust = rust.clone();
            async move { rust.request(PingRequest { note: "n".into() }).await }
        });
        let request = php.recv_object().await;
        let id = int(&request, "id");
        let answer = PhpObject::new(class)
            .with(Property::public("reply"), s("pong: n"))
            .with(Property::public("requestId"), PhpValue::Int(id));
        php.send(&PhpValue::Object(answer)).await;
        let pong = tokio::time::timeout(LONG, call).await.unwrap().unwrap();
        assert_eq!(pong.unwrap().reply, "pong: n");
    }
    php.still_serves(1).await;
}

#[tokio::test(start_paused = true)]
async fn mangled_property_names_that_lie_do_not_panic() {
    let (rust, mut php, _gates) = spawn();
    let names: [&[u8]; 7] = [
        b"\0",
        b"\0\0",
        b"\0*",
        b"\0*\0",
        b"\0X",
        b"\0PingRequest\0",
        b"\0PingRequest\0\0id",
    ];
    for (id, name) in names.iter().enumerate() {
        let mut frame = format!("O:11:\"PingRequest\":3:{{s:{}:\"", name.len()).into_bytes();
        frame.extend_from_slice(name);
        frame.extend_from_slice(
            format!("\";s:1:\"v\";s:4:\"note\";s:1:\"n\";s:2:\"id\";i:{id};}}").as_bytes(),
        );
        php.send_bytes(&frame).await;
        let pong = php.recv_object().await;
        assert_eq!(
            pong.class,
            b"PongResponse",
            "{}",
            PhpValue::Object(pong.clone())
        );
        assert_eq!(int(&pong, "requestId"), id as i64);
    }
    // The private `id` of another class, the protected one, an int key for a name.
    for (id, frame) in [
        (
            20,
            &b"O:11:\"PingRequest\":2:{s:4:\"note\";s:1:\"n\";s:9:\"\0Other\0id\";i:20;}"[..],
        ),
        (
            21,
            b"O:11:\"PingRequest\":2:{s:4:\"note\";s:1:\"n\";s:5:\"\0*\0id\";i:21;}",
        ),
        (
            22,
            b"O:11:\"PingRequest\":3:{i:5;i:1;s:4:\"note\";s:1:\"n\";s:2:\"id\";i:22;}",
        ),
    ] {
        php.send_bytes(frame).await;
        let pong = php.recv_object().await;
        assert_eq!(int(&pong, "requestId"), id);
    }
    assert!(!rust.is_closed());
}

// ===== Answers for nothing, late answers, odd answers =====

#[tokio::test(start_paused = true)]
async fn answers_for_calls_never_made_are_dropped_without_a_word() {
    let (rust, mut php, _gates) = spawn();
    let frames: Vec<Vec<u8>> = vec![
        answer(&fqcn("SuccessResponse"), &[], PhpValue::Int(999)).to_bytes(),
        answer(&fqcn("AcceptedResponse"), &[], PhpValue::Int(0)).to_bytes(),
        answer(
            &fqcn("ErrorResponse"),
            &[("message", s("no")), ("code", PhpValue::Int(1))],
            PhpValue::Int(5),
        )
        .to_bytes(),
        answer(
            "PongResponse",
            &[("reply", s("x"))],
            PhpValue::Int(i64::MAX),
        )
        .to_bytes(),
        answer(
            "PongResponse",
            &[("reply", s("x"))],
            PhpValue::Int(i64::MIN),
        )
        .to_bytes(),
        answer("PongResponse", &[("reply", s("x"))], PhpValue::Int(-1)).to_bytes(),
        answer("PongResponse", &[("reply", s("x"))], PhpValue::Null).to_bytes(),
        answer("PongResponse", &[("reply", s("x"))], s("1")).to_bytes(),
        answer(
            &fqcn("Response\\IteratorContinue"),
            &[
                ("continue", PhpValue::Bool(true)),
                ("position", PhpValue::Int(0)),
                ("value", s("v")),
            ],
            PhpValue::Int(3),
        )
        .to_bytes(),
        answer(
            &fqcn("Response\\IteratorContinue"),
            &[("continue", PhpValue::Int(1))],
            PhpValue::Int(4),
        )
        .to_bytes(),
        b"O:12:\"PongResponse\":2:{s:5:\"reply\";E:7:\"Foo:Bar\";s:9:\"requestId\";i:8;}".to_vec(),
        b"O:12:\"PongResponse\":2:{s:9:\"requestId\";i:9;s:5:\"reply\";r:1;}".to_vec(),
    ];
    for frame in &frames {
        php.send_bytes(frame).await;
    }
    // Nothing was sent back (a FatalErrorResponse would end a PHP peer): the pong is next.
    php.still_serves(1).await;
    assert!(!rust.is_closed());
    // And our own calls, made after, are not answered by any of those.
    let call = tokio::spawn({
        let rust = rust.clone();
        async move {
            rust.request(PingRequest {
                note: "mine".into(),
            })
            .await
        }
    });
    let request = php.recv_object().await;
    let pong = answer(
        "PongResponse",
        &[("reply", s("pong: mine"))],
        PhpValue::Int(int(&request, "id")),
    );
    php.send(&pong).await;
    assert_eq!(call.await.unwrap().unwrap().reply, "pong: mine");
}

#[tokio::test(start_paused = true)]
async fn an_answer_after_our_call_timed_out_is_dropped_and_the_next_call_is_matched() {
    let (rust, mut php, _gates) = spawn();
    let call = tokio::spawn({
        let rust = rust.clone();
        async move {
            rust.request(PingRequest {
                note: "late".into(),
            })
            .timeout(Duration::from_secs(1))
            .await
        }
    });
    let request = php.recv_object().await;
    let late_id = int(&request, "id");
    match tokio::time::timeout(LONG, call).await.unwrap().unwrap() {
        Err(CallError::Timeout(timeout)) => assert_eq!(timeout, Duration::from_secs(1)),
        other => panic!("{other:?}"),
    }
    // PHP answers anyway, twice: nothing is sent back (no cancel exists on this wire).
    for _ in 0..2 {
        let late = answer(
            "PongResponse",
            &[("reply", s("pong: late"))],
            PhpValue::Int(late_id),
        );
        php.send(&late).await;
    }
    php.still_serves(1).await;
    let call = tokio::spawn({
        let rust = rust.clone();
        async move {
            rust.request(PingRequest {
                note: "next".into(),
            })
            .await
        }
    });
    let request = php.recv_object().await;
    let id = int(&request, "id");
    assert_ne!(id, late_id, "a fresh id");
    // A stale answer to the old id first, then the right one.
    php.send(&answer(
        "PongResponse",
        &[("reply", s("stale"))],
        PhpValue::Int(late_id),
    ))
    .await;
    php.send(&answer(
        "PongResponse",
        &[("reply", s("pong: next"))],
        PhpValue::Int(id),
    ))
    .await;
    assert_eq!(call.await.unwrap().unwrap().reply, "pong: next");
    assert!(!rust.is_closed());
}

#[tokio::test(start_paused = true)]
async fn a_success_response_with_a_non_int_request_id_lets_the_call_time_out_typed() {
    let (rust, mut php, _gates) = spawn_with(|b| b.default_timeout(Duration::from_secs(5)));
    for (round, request_id) in [
        |id: i64| s(&id.to_string()),
        |id: i64| PhpValue::Float(id as f64),
        |_| PhpValue::Bool(true),
        |_| PhpValue::Null,
        |id: i64| {
            PhpValue::Array(vec![(
                channel_dispatcher::php::ArrayKey::Int(0),
                PhpValue::Int(id),
            )])
        },
    ]
    .into_iter()
    .enumerate()
    {
        let call = tokio::spawn({
            let rust = rust.clone();
            async move {
                rust.call_raw(
                    ThrowRequest::METHOD,
                    Codec::Php
                        .encode(&ThrowRequest {
                            message: "m".into(),
                            code: 1,
                        })
                        .unwrap(),
                )
                .await
            }
        });
        let request = php.recv_object().await;
        let success = answer(
            &fqcn("SuccessResponse"),
            &[],
            request_id(int(&request, "id")),
        );
        php.send(&success).await;
        match tokio::time::timeout(LONG, call).await.unwrap().unwrap() {
            Err(CallError::Timeout(_)) => {}
            other => panic!("round {round}: {other:?}"),
        }
    }
    php.still_serves(1).await;
    assert!(!rust.is_closed());
}

#[tokio::test(start_paused = true)]
async fn answers_of_the_wrong_shape_fail_our_calls_typed() {
    let (rust, mut php, _gates) = spawn();
    let wrong: [fn(i64) -> PhpValue; 5] = [
        // A unit answer for a call that wants a PongResponse.
        |id| answer(&fqcn("SuccessResponse"), &[], PhpValue::Int(id)),
        // A pong without its reply, or with an int one.
        |id| answer("PongResponse", &[], PhpValue::Int(id)),
        |id| {
            answer(
                "PongResponse",
                &[("reply", PhpValue::Int(5))],
                PhpValue::Int(id),
            )
        },
        // An iterator's answer to a plain call.
        |id| {
            answer(
                &fqcn("Response\\IteratorContinue"),
                &[("continue", PhpValue::Bool(false))],
                PhpValue::Int(id),
            )
        },
        // An error with nothing in it.
        |id| {
            answer(
                &fqcn("ErrorResponse"),
                &[("code", s("x"))],
                PhpValue::Int(id),
            )
        },
    ];
    for (round, wrong) in wrong.into_iter().enumerate() {
        let call = tokio::spawn({
            let rust = rust.clone();
            async move { rust.request(PingRequest { note: "n".into() }).await }
        });
        let request = php.recv_object().await;
        php.send(&wrong(int(&request, "id"))).await;
        match tokio::time::timeout(LONG, call).await.unwrap().unwrap() {
            Err(CallError::Decode(_)) => assert!(round < 4, "round {round}"),
            Err(CallError::Remote(error)) => {
                assert_eq!(round, 4);
                assert_eq!((error.code, &*error.message), (0, ""));
            }
            other => panic!("round {round}: {other:?}"),
        }
    }
    // Answered twice: the second answer is dropped.
    let call = tokio::spawn({
        let rust = rust.clone();
        async move { rust.request(PingRequest { note: "n".into() }).await }
    });
    let request = php.recv_object().await;
    let id = int(&request, "id");
    for reply in ["pong: first", "pong: second"] {
        php.send(&answer(
            "PongResponse",
            &[("reply", s(reply))],
            PhpValue::Int(id),
        ))
        .await;
    }
    assert_eq!(call.await.unwrap().unwrap().reply, "pong: first");
    php.still_serves(1).await;
    assert!(!rust.is_closed());
}

#[tokio::test(start_paused = true)]
async fn hostile_answers_to_our_pulls_fail_the_stream_typed() {
    let continue_response = fqcn("Response\\IteratorContinue");
    let hostile: [fn(&str, i64) -> PhpValue; 6] = [
        // Out of order: position 3 first.
        |class, id| {
            answer(
                class,
                &[
                    ("continue", PhpValue::Bool(true)),
                    ("position", PhpValue::Int(3)),
                    ("value", s("v")),
                ],
                PhpValue::Int(id),
            )
        },
        // A negative position, a string one, none.
        |class, id| {
            answer(
                class,
                &[
                    ("continue", PhpValue::Bool(true)),
                    ("position", PhpValue::Int(-1)),
                    ("value", s("v")),
                ],
                PhpValue::Int(id),
            )
        },
        |class, id| {
            answer(
                class,
                &[
                    ("continue", PhpValue::Bool(true)),
                    ("position", s("0")),
                    ("value", s("v")),
                ],
                PhpValue::Int(id),
            )
        },
        |class, id| {
            answer(
                class,
                &[("continue", PhpValue::Bool(true))],
                PhpValue::Int(id),
            )
        },
        // A `continue` that is not a bool.
        |class, id| answer(class, &[("continue", PhpValue::Int(1))], PhpValue::Int(id)),
        // PHP's "not found".
        |_, id| {
            answer(
                &fqcn("ErrorResponse"),
                &[
                    ("message", s("Iterator not found")),
                    ("code", PhpValue::Int(0)),
                ],
                PhpValue::Int(id),
            )
        },
    ];
    let (rust, mut php, _gates) = spawn();
    for (round, hostile) in hostile.into_iter().enumerate() {
        let consumer = tokio::spawn({
            let rust = rust.clone();
            async move {
                let mut stream = RemoteStream::<String>::pull(&rust, 131);
                let first = stream.next().await;
                // A failed stream ends.
                let after = stream.next().await;
                (first, after.is_none())
            }
        });
        let request = php.recv_object().await;
        assert_eq!(request.class, fqcn("Request\\IteratorContinue").as_bytes());
        assert_eq!(int(&request, "iteratorId"), 131);
        php.send(&hostile(&continue_response, int(&request, "id")))
            .await;
        let (first, ended) = tokio::time::timeout(LONG, consumer).await.unwrap().unwrap();
        match (round, first) {
            (0, Some(Err(CallError::Remote(error)))) => {
                assert_eq!(error.code, code::INVALID_REQUEST);
                assert!(error.message.contains("position 3"), "{}", error.message);
            }
            (1..=4, Some(Err(CallError::Decode(_)))) => {}
            (5, Some(Err(CallError::Remote(error)))) => {
                assert_eq!((error.code, &*error.message), (0, "Iterator not found"));
            }
            (round, other) => panic!("round {round}: {other:?}"),
        }
        assert!(ended, "round {round}: the stream ends after its error");
    }
    php.still_serves(1).await;
    assert!(!rust.is_closed());
}

// ===== Fatal errors, stop markers and falsy frames =====

#[tokio::test(start_paused = true)]
async fn fatal_error_responses_with_odd_fields_end_the_connection_once() {
    let fatal = fqcn("FatalErrorResponse");
    let cases: Vec<(Vec<u8>, i64, String)> = vec![
        (
            format!("O:{}:\"{fatal}\":0:{{}}", fatal.len()).into_bytes(),
            0,
            String::new(),
        ),
        (
            message(
                &fatal,
                &[
                    ("message", PhpValue::Array(vec![])),
                    ("code", s("42")),
                    ("requestId", s("x")),
                ],
                0,
            )
            .to_bytes(),
            0,
            String::new(),
        ),
        (
            message(
                &fatal,
                &[
                    ("message", PhpValue::String(b"bad \xff\xfe bytes".to_vec())),
                    ("code", PhpValue::Int(i64::MIN)),
                ],
                0,
            )
            .to_bytes(),
            i64::MIN,
            "bad \u{fffd}\u{fffd} bytes".into(),
        ),
        (
            message(
                &fqcn("Response\\FatalErrorResponse"),
                &[("message", s("moved")), ("code", PhpValue::Int(7))],
                0,
            )
            .to_bytes(),
            7,
            "moved".into(),
        ),
    ];
    for (frame, code, text) in cases {
        let (rust, mut php, _gates) = spawn();
        php.send_bytes(&frame).await;
        match closed(&rust).await {
            Termination::PeerFatal { code: got, message } => {
                assert_eq!((got, message), (code, text.clone()))
            }
            other => panic!("{other}"),
        }
        php.expect_stop_marker_then_eof().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_fatal_error_answering_a_pending_call_ends_everything() {
    let (rust, mut php, gates) = spawn();
    // Work of both sides pending: our call, PHP's request in a handler.
    php.send(&ping("wait", 1)).await;
    let call = tokio::spawn({
        let rust = rust.clone();
        async move { rust.request(PingRequest { note: "n".into() }).await }
    });
    let request = php.recv_object().await;
    let fatal = answer(
        &fqcn("FatalErrorResponse"),
        &[("message", s("dying")), ("code", PhpValue::Int(3))],
        PhpValue::Int(int(&request, "id")),
    );
    php.send(&fatal).await;
    match tokio::time::timeout(LONG, call).await.unwrap().unwrap() {
        Err(CallError::Terminated(Termination::PeerFatal { code: 3, message })) => {
            assert_eq!(message, "dying")
        }
        other => panic!("{other:?}"),
    }
    gates.handlers.add_permits(1);
    // No answer to request 1 after a fatal: the stop marker, then the end.
    php.expect_stop_marker_then_eof().await;
    assert!(matches!(closed(&rust).await, Termination::PeerFatal { .. }));
    match rust
        .request(PingRequest {
            note: "after".into(),
        })
        .await
    {
        Err(CallError::Terminated(Termination::PeerFatal { .. })) => {}
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn the_stop_marker_amid_pending_work_fails_our_calls_typed_and_ends_once() {
    let (rust, mut php, gates) = spawn();
    php.send(&ping("wait", 1)).await;
    let iterator = open_iterator(&mut php, -1, 2).await;
    php.send(&pull(iterator, 3)).await;
    let calls = tokio::spawn({
        let rust = rust.clone();
        async move {
            let ping = rust.request(PingRequest { note: "n".into() });
            let pulled = async {
                let mut stream = RemoteStream::<String>::pull(&rust, 131);
                stream.next().await
            };
            tokio::join!(ping, pulled)
        }
    });
    // Our two calls are out.
    for _ in 0..2 {
        php.recv_object().await;
    }
    php.send(&PhpValue::Null).await;
    let (ping, pulled) = tokio::time::timeout(LONG, calls).await.unwrap().unwrap();
    assert!(
        matches!(
            ping,
            Err(CallError::Terminated(Termination::PeerStopped { .. }))
        ),
        "{ping:?}"
    );
    assert!(
        matches!(pulled, Some(Err(CallError::Terminated(_)))),
        "{pulled:?}"
    );
    gates.handlers.add_permits(1);
    let _ = gates.items.send("late".into());
    // Nothing answers PHP's pending work once it stopped: the stop marker, then the end.
    php.expect_stop_marker_then_eof().await;
    let reason = closed(&rust).await;
    assert!(
        matches!(reason, Termination::PeerStopped { .. }),
        "{reason}"
    );
    assert!(reason.is_graceful());
    assert!(matches!(
        rust.request(PingRequest {
            note: "after".into()
        })
        .await,
        Err(CallError::Terminated(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn requests_after_the_stop_marker_get_no_answer_and_the_end_comes_once() {
    let (rust, mut php, _gates) = spawn();
    // The stop marker and requests behind it in the same write, another stop marker, a fatal.
    let mut bytes = framed(b"N;");
    bytes.extend(framed(&ping("after", 1).to_bytes()));
    bytes.extend(framed(&pull(1, 2).to_bytes()));
    bytes.extend(framed(b"N;"));
    bytes.extend(framed(
        &message(&fqcn("FatalErrorResponse"), &[("message", s("x"))], 0).to_bytes(),
    ));
    php.write.write_all(&bytes).await.unwrap();
    php.expect_stop_marker_then_eof().await;
    match closed(&rust).await {
        Termination::PeerStopped { reason } => assert_eq!(reason, ""),
        other => panic!("{other}"),
    }
}

#[tokio::test(start_paused = true)]
async fn falsy_top_level_values_end_the_connection_as_null_does() {
    for falsy in [
        &b"b:0;"[..],
        b"i:0;",
        b"s:0:\"\";",
        b"a:0:{}",
        b"d:0;",
        b"d:-0;",
        b"s:1:\"0\";",
        b"i:-0;",
    ] {
        let (rust, mut php, _gates) = spawn();
        let call = tokio::spawn({
            let rust = rust.clone();
            async move { rust.request(PingRequest { note: "n".into() }).await }
        });
        php.recv_object().await;
        php.send_bytes(falsy).await;
        let failed = tokio::time::timeout(LONG, call).await.unwrap().unwrap();
        assert!(
            matches!(failed, Err(CallError::Terminated(_))),
            "{failed:?}"
        );
        match closed(&rust).await {
            Termination::PeerStopped { reason } => {
                assert!(reason.contains("ends a PHP peer's read loop"), "{reason}")
            }
            other => panic!("{:?}: {other}", String::from_utf8_lossy(falsy)),
        }
        php.expect_stop_marker_then_eof().await;
    }
}

#[tokio::test(start_paused = true)]
async fn truthy_top_level_non_objects_are_dropped_and_the_connection_goes_on() {
    let (rust, mut php, _gates) = spawn();
    for truthy in [
        &b"b:1;"[..],
        b"i:1;",
        b"i:-1;",
        b"d:0.5;",
        b"d:NAN;",
        b"s:1:\"x\";",
        b"s:2:\"00\";",
        b"a:1:{i:0;i:0;}",
        b"x",
        b"N",
        b"N;N;",
        b"\0",
    ] {
        php.send_bytes(truthy).await;
    }
    php.still_serves(1).await;
    assert!(!rust.is_closed());
}

// ===== End of file =====

#[tokio::test(start_paused = true)]
async fn end_of_file_inside_a_frame_ends_with_the_frame_it_cut() {
    let mut partial = framed(&ping("cut", 1).to_bytes());
    let whole = partial.len();
    partial.truncate(15);
    for (bytes, expected) in [
        (partial.clone(), whole),
        (vec![0x00, 0x05, 0x00], 0),
        (vec![0x00], 0),
    ] {
        let (rust, mut php, _gates) = spawn();
        let call = tokio::spawn({
            let rust = rust.clone();
            async move { rust.request(PingRequest { note: "n".into() }).await }
        });
        php.recv_object().await;
        php.write.write_all(&bytes).await.unwrap();
        php.write.shutdown().await.unwrap();
        match closed(&rust).await {
            Termination::Protocol(ProtocolError::TruncatedFrame {
                received,
                expected: got,
            }) => {
                assert_eq!((received, got), (bytes.len(), expected))
            }
            other => panic!("{other}"),
        }
        let failed = tokio::time::timeout(LONG, call).await.unwrap().unwrap();
        assert!(
            matches!(failed, Err(CallError::Terminated(Termination::Protocol(_)))),
            "{failed:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn end_of_file_between_frames_with_work_pending_ends_closed() {
    let (rust, mut php, gates) = spawn();
    php.send(&ping("wait", 1)).await;
    let call = tokio::spawn({
        let rust = rust.clone();
        async move { rust.request(PingRequest { note: "n".into() }).await }
    });
    php.recv_object().await;
    php.write.shutdown().await.unwrap();
    let failed = tokio::time::timeout(LONG, call).await.unwrap().unwrap();
    assert!(
        matches!(failed, Err(CallError::Terminated(Termination::Closed))),
        "{failed:?}"
    );
    gates.handlers.add_permits(1);
    assert!(matches!(closed(&rust).await, Termination::Closed));
}

// ===== Ids that are not ints =====

#[tokio::test(start_paused = true)]
async fn a_request_whose_id_is_not_an_int_gets_no_answer_to_an_id_never_sent() {
    let (rust, mut php, _gates) = spawn();
    for (round, id) in [
        s("5"),
        PhpValue::Float(5.0),
        PhpValue::Null,
        PhpValue::Bool(true),
    ]
    .into_iter()
    .enumerate()
    {
        let frame = PhpObject::new("PingRequest")
            .with(Property::public("note"), s("n"))
            .with(Property::private("PingRequest", "id"), id);
        php.send(&PhpValue::Object(frame)).await;
        php.send(&ping("marker", 1000 + round as i64)).await;
        // The first answer is the marker's: nothing answers an id PHP never sent.
        let frame = php.recv_object().await;
        assert_eq!(
            int(&frame, "requestId"),
            1000 + round as i64,
            "round {round}: an answer to an id never sent: {}",
            PhpValue::Object(frame.clone())
        );
    }
    assert!(!rust.is_closed());
}
