//! A hostile (or just careless) peer, written by hand from PROTOCOL.md: stream credit and
//! positions at the edges of `u64`, producers that ignore credit or reuse ids, consumers that
//! never consume, answers that race our own timers, and text where frames should be. Each
//! case ends in a typed error or a bounded wait, never a panic, a hang or unbounded memory.

mod support;

use std::future::IntoFuture;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use channel_dispatcher::error::code;
use channel_dispatcher::{
    request, stream_request, CallError, Channel, Context, Dispatcher, HandlerError, ProtocolError,
    RemoteStream, Router, Termination,
};
use futures_util::{stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use support::raw::{envelope, frame, NoAttributes, RawPeer};
use support::{error_text, within, Echo};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The numbers `0..n`.
#[derive(Serialize, Deserialize)]
struct Numbers(u64);
stream_request!(Numbers => u64, "numbers");

/// The same request as `Numbers`, answered with the stream's id only (never consumed).
#[derive(Serialize, Deserialize)]
struct OpenNumbers(u64);
request!(OpenNumbers => u64, "numbers");

/// The items the test feeds, one at a time; it ends when the test drops the feed.
#[derive(Serialize, Deserialize)]
struct Fed;
stream_request!(Fed => u64, "fed");

/// Endless items of about 1 KiB (capped at `PRODUCER_CAP`), counted as they are made.
#[derive(Serialize, Deserialize)]
struct Kilobytes;
stream_request!(Kilobytes => String, "kilobytes");

/// `n` items of 2 KiB each.
#[derive(Serialize, Deserialize)]
struct Blocks(u64);
stream_request!(Blocks => String, "blocks");

/// A notification whose handler never finishes.
#[derive(Serialize, Deserialize)]
struct Hold;
channel_dispatcher::notification!(Hold, "hold");

/// How many streams the producer's storage holds.
#[derive(Serialize, Deserialize)]
struct Stored;
request!(Stored => usize, "stored");

/// The stream id a raw producer answers with.
const STREAM: u64 = 77;
/// Where the `Kilobytes` producer stops, so a failing run stays within ~50 MiB.
const PRODUCER_CAP: usize = 50_000;

#[derive(Clone, Default)]
struct Probe {
    produced: Arc<AtomicUsize>,
    feed: Arc<Mutex<Option<mpsc::UnboundedReceiver<u64>>>>,
}

fn router(probe: Probe) -> Router {
    let fed = probe.clone();
    let kilobytes = probe;
    Router::new()
        .request(|_cx: Context, Echo(s)| async move { Ok(s) })
        .stream(|_cx: Context, Numbers(n)| async move { Ok(stream::iter((0..n).map(Ok))) })
        .stream(move |_cx: Context, Fed| {
            let items = fed.feed.lock().unwrap().take();
            async move {
                let items = items.ok_or_else(|| HandlerError::internal("one fed stream only"))?;
                Ok(stream::unfold(items, |mut items| async move {
                    let item = items.recv().await?;
                    Some((Ok(item), items))
                }))
            }
        })
        .stream(move |_cx: Context, Kilobytes| {
            let produced = Arc::clone(&kilobytes.produced);
            async move {
                Ok(stream::iter(0..PRODUCER_CAP).map(move |i| {
                    produced.fetch_add(1, Ordering::SeqCst);
                    Ok(format!("{i:>1000}"))
                }))
            }
        })
        .request(|cx: Context, Stored| async move { Ok(cx.streams().map_or(0, |s| s.len())) })
}

async fn connect(probe: Probe) -> (Dispatcher, RawPeer) {
    RawPeer::connect(router(probe), 1 << 20).await
}

/// The dispatcher's request for a stream, answered by the raw peer with `STREAM`; returns the
/// credit the dispatcher grants.
async fn answer_stream_request(peer: &mut RawPeer) -> u64 {
    let id = peer.read_request("numbers").await;
    peer.respond(id, &STREAM).await;
    peer.read_credit(STREAM).await
}

/// Reads the items of stream `id` until its end; returns them and the end envelope.
async fn read_stream(peer: &mut RawPeer, id: u64) -> (Vec<u64>, Value) {
    let mut items = Vec::new();
    loop {
        let envelope = peer.read().await;
        match envelope[0].as_u64() {
            Some(8) if envelope[1] == id => {
                let batch = envelope[3].as_array().expect("a batch is an array");
                items.extend(batch.iter().map(|item| item.as_u64().unwrap()));
            }
            Some(9) if envelope[1] == id => return (items, envelope),
            _ => {}
        }
    }
}

fn consume<T>(stream: RemoteStream<T>) -> JoinHandle<Vec<Result<T, CallError>>>
where
    T: serde::de::DeserializeOwned + Send + 'static,
{
    tokio::spawn(stream.collect::<Vec<_>>())
}

/// What a consumer task collected; a panic in it fails the test with its message.
async fn collected<T>(
    consumer: JoinHandle<Vec<Result<T, CallError>>>,
) -> Vec<Result<T, CallError>> {
    match within(consumer).await {
        Ok(items) => items,
        Err(panic) => panic!("the consumer panicked: {panic}"),
    }
}

// issue 8, item 4
#[tokio::test(start_paused = true)]
async fn credit_of_u64_max_twice_does_not_panic_the_producer() {
    let probe = Probe::default();
    let (feed, items) = mpsc::unbounded_channel();
    *probe.feed.lock().unwrap() = Some(items);
    let (_dispatcher, mut peer) = connect(probe).await;
    let id = peer.open_stream(1, "fed", &Fed).await;
    peer.stream_credit(id, u64::MAX).await;
    feed.send(0).unwrap();
    assert_eq!(peer.read().await, json!([8, id, 0, [0]]));
    // The producer now waits for its next item, with the credit for a batch taken: the second
    // grant tops the credit up to the maximum under it.
    peer.stream_credit(id, u64::MAX).await;
    peer.request(2, "echo", "sync").await;
    assert_eq!(
        peer.read().await,
        json!([3, 2, {}, "sync"]),
        "the credit is in"
    );
    for item in 1..=10 {
        feed.send(item).unwrap();
    }
    drop(feed);
    let (items, end) = read_stream(&mut peer, id).await;
    assert_eq!(items, (1..=10).collect::<Vec<_>>());
    assert_eq!(end, json!([9, id]), "a normal end");
}

// issue 8, item 5
#[tokio::test(start_paused = true)]
async fn a_consumer_that_grants_u64_max_and_stops_reading_does_not_make_the_producer_grow() {
    let probe = Probe::default();
    let (_dispatcher, mut peer) = connect(probe.clone()).await;
    let id = peer.open_stream(1, "kilobytes", &Kilobytes).await;
    peer.stream_credit(id, u64::MAX).await;
    // The peer never reads again. Time is paused: each sleep returns once nothing can run
    // (the producer waits, or it has made all it can).
    let mut produced = Vec::new();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        produced.push(probe.produced.load(Ordering::SeqCst));
    }
    let last = *produced.last().unwrap();
    assert!(
        last < 20_000,
        "{last} items of 1 KiB made for a consumer that reads nothing (over time: {produced:?}): \
         memory grows with them"
    );
}

// issue 14: a batch's items are decoded as they are taken, so a batch that is cut short, or
// holds an item of the wrong type, yields the items before the fault, then an error item; the
// consumer cancels the stream and the connection stays up.
#[tokio::test(start_paused = true)]
async fn a_batch_cut_short_yields_its_whole_items_then_an_error() {
    let (dispatcher, mut peer) = connect(Probe::default()).await;
    let consumer = consume(dispatcher.stream(Numbers(3)));
    answer_stream_request(&mut peer).await;
    // [8, stream, position 0, items]: three items announced, two sent.
    peer.send_frame(&[0x94, 8, STREAM as u8, 0, 0x93, 0, 1])
        .await;
    let items = collected(consumer).await;
    assert!(
        matches!(items[..], [Ok(0), Ok(1), Err(CallError::Decode(_))]),
        "{items:?}"
    );
    assert!(error_text(items[2].as_ref().unwrap_err()).contains("cut short or malformed"));
    let cancel = peer.read_until(|envelope| envelope[0] == 11).await;
    assert_eq!(cancel[1], STREAM);
    assert_still_up(&dispatcher, &mut peer).await;
}

#[tokio::test(start_paused = true)]
async fn an_item_of_the_wrong_type_ends_the_stream_after_the_items_before_it() {
    let (dispatcher, mut peer) = connect(Probe::default()).await;
    let consumer = consume(dispatcher.stream(Numbers(3)));
    answer_stream_request(&mut peer).await;
    peer.send(&(8u8, STREAM, 0u64, (0u64, "one", 2u64))).await;
    peer.stream_end(STREAM).await;
    let items = collected(consumer).await;
    assert!(
        matches!(items[..], [Ok(0), Err(CallError::Decode(_))]),
        "{items:?}"
    );
    assert_still_up(&dispatcher, &mut peer).await;
}

// issue 8, item 6
#[tokio::test(start_paused = true)]
async fn a_producer_that_ignores_credit_ends_the_connection() {
    let (dispatcher, mut peer) = connect(Probe::default()).await;
    let mut numbers = dispatcher.stream(Numbers(3)).window(8);
    let first = tokio::spawn(async move {
        let first = numbers.next().await;
        (first, numbers)
    });
    assert_eq!(answer_stream_request(&mut peer).await, 8);
    // Ten thousand batches of one item, against a credit of 8.
    let flood: Vec<u8> = (0..10_000u64)
        .flat_map(|i| frame(&envelope(&(8u8, STREAM, i, [i]))))
        .collect();
    let _ = tokio::time::timeout(Duration::from_secs(5), peer.try_send_raw(&flood)).await;
    let (first, numbers) = within(first).await.unwrap();
    assert_eq!(first.unwrap().unwrap(), 0);

    let reason = tokio::time::timeout(Duration::from_secs(5), dispatcher.closed())
        .await
        .expect("the connection is still up after 10,000 items over a credit of 8: all buffered");
    assert!(
        matches!(
            reason,
            Termination::Protocol(ProtocolError::CreditExceeded { credit: 0, .. })
        ),
        "{reason:?}"
    );
    assert!(error_text(&reason).contains("credit"), "{reason}");
    let rest = within(numbers.collect::<Vec<_>>()).await;
    assert!(rest.len() <= 8, "{} more items yielded", rest.len());
    assert!(matches!(rest.last(), Some(Err(_))), "{rest:?}");
}

/// The raw peer, as producer, sends `batches` (position, items), then ends the stream; returns
/// what the dispatcher's consumer made of them.
async fn consume_batches(
    dispatcher: &Dispatcher,
    peer: &mut RawPeer,
    batches: &[(u64, &[u64])],
) -> Vec<Result<u64, CallError>> {
    let consumer = consume(dispatcher.stream(Numbers(3)));
    answer_stream_request(peer).await;
    for (position, items) in batches {
        peer.stream_items(STREAM, *position, items).await;
    }
    peer.stream_end(STREAM).await;
    collected(consumer).await
}

/// A call from the dispatcher, answered by the raw peer: the connection is up.
async fn assert_still_up(dispatcher: &Dispatcher, peer: &mut RawPeer) {
    let call = tokio::spawn(dispatcher.request(Echo("up?".into())).into_future());
    let request = peer
        .read_until(|envelope| envelope[0] == 1 && envelope[2] == "echo")
        .await;
    peer.respond(request[1].as_u64().unwrap(), "up").await;
    assert_eq!(within(call).await.unwrap().unwrap(), "up");
}

// issue 8, item 7
#[tokio::test(start_paused = true)]
async fn a_batch_at_position_u64_max_is_an_error_item_not_a_panic() {
    let (dispatcher, mut peer) = connect(Probe::default()).await;
    let items = consume_batches(&dispatcher, &mut peer, &[(u64::MAX, &[7, 8])]).await;
    assert!(matches!(items.last(), Some(Err(_))), "{items:?}");
    assert_still_up(&dispatcher, &mut peer).await;
}

// issue 8, item 7
#[tokio::test(start_paused = true)]
async fn a_batch_that_skips_positions_is_an_error_item() {
    let (dispatcher, mut peer) = connect(Probe::default()).await;
    let items = consume_batches(&dispatcher, &mut peer, &[(0, &[0]), (5, &[5])]).await;
    assert!(matches!(items.first(), Some(Ok(0))), "{items:?}");
    assert!(matches!(items.last(), Some(Err(_))), "{items:?}");
    assert!(
        !items.iter().any(|item| matches!(item, Ok(5))),
        "an item at a position that was never announced: {items:?}"
    );
    assert_still_up(&dispatcher, &mut peer).await;
}

// issue 8, item 8
#[tokio::test]
async fn a_client_that_opens_streams_and_never_consumes_them_is_refused_beyond_the_cap() {
    let (a, b) = Channel::pair();
    let _server = Dispatcher::builder()
        .handler(router(Probe::default()))
        .spawn(b);
    let client = Dispatcher::builder().spawn(a);
    let (mut opened, mut refused) = (0, 0);
    for _ in 0..2000 {
        match within(client.request(OpenNumbers(5))).await {
            Ok(_) => opened += 1,
            Err(error) => {
                let remote = error.as_remote().unwrap_or_else(|| panic!("{error:?}"));
                assert_eq!(remote.code, code::OVERLOADED, "{remote}");
                refused += 1;
            }
        }
    }
    let stored = within(client.request(Stored)).await.unwrap();
    assert!(
        stored <= 1024,
        "{stored} streams stored for a client that consumes none ({opened} opened, {refused} refused)"
    );
    assert!(opened <= 1024, "{opened} opened");
    assert_eq!(opened + refused, 2000);
}

// issue 8, item 9
#[tokio::test(start_paused = true)]
async fn a_producer_that_reuses_a_stream_id_fails_both_streams() {
    let (dispatcher, mut peer) = connect(Probe::default()).await;
    let first = consume(dispatcher.stream(Numbers(1)));
    answer_stream_request(&mut peer).await;
    let second = consume(dispatcher.stream(Numbers(2)));
    let id = peer.read_request("numbers").await;
    peer.respond(id, &STREAM).await; // the same id again
                                     // Whatever the dispatcher says about it (credit, a cancel), until it has nothing more to
                                     // say (time is paused: until nothing can run), so both consumers have started.
    while peer.read_within(Duration::from_secs(1)).await.is_some() {}
    peer.stream_items(STREAM, 0, &[0u64, 1]).await;
    peer.stream_end(STREAM).await;
    let (first, second) = (collected(first).await, collected(second).await);
    assert!(
        matches!(first.last(), Some(Err(_))),
        "the first stream ends cleanly, though its producer never ended it: {first:?}"
    );
    assert!(
        matches!(second.last(), Some(Err(_))),
        "the second stream took over the first one's id: {second:?}"
    );
}

// issue 8, item 17
#[tokio::test(start_paused = true)]
async fn a_deadline_answer_that_beats_our_own_timer_is_a_timeout() {
    let (dispatcher, mut peer) = connect(Probe::default()).await;
    let call = dispatcher
        .request(Echo("late".into()))
        .timeout(Duration::from_secs(5));
    let call = tokio::spawn(call.into_future());
    let id = peer.read_request("echo").await;
    peer.respond_error(id, code::DEADLINE_EXCEEDED, "deadline")
        .await;
    let err = within(call).await.unwrap().unwrap_err();
    assert!(matches!(err, CallError::Timeout(_)), "{err:?}");
}

// issue 8, item 19
#[tokio::test]
async fn a_pull_on_a_stream_that_had_credit_is_answered_at_once() {
    let (_dispatcher, mut peer) = connect(Probe::default()).await;
    let id = peer.open_stream(1, "numbers", &Numbers(100)).await;
    peer.stream_credit(id, 4).await;
    let mut received = 0;
    while received < 4 {
        let batch = peer.read_until(|envelope| envelope[0] == 8).await;
        received += batch[3].as_array().unwrap().len();
    }
    // The window is used up; now the same stream is pulled.
    peer.request(2, "$stream/next", &id).await;
    let answered = |envelope: &Value| (envelope[0] == 3 || envelope[0] == 4) && envelope[1] == 2;
    let answer = tokio::time::timeout(Duration::from_secs(1), peer.read_until(answered)).await;
    assert!(
        answer.is_ok(),
        "the pull is not answered within 1 s: it waits for the windowed producer (until the idle release)"
    );
}

// issue 8, item 20
#[tokio::test(start_paused = true)]
async fn text_where_a_frame_length_should_be_ends_the_connection_at_once() {
    let (dispatcher, mut peer) = RawPeer::connect_with(Dispatcher::builder()).await;
    let call = tokio::spawn(dispatcher.request(Echo("in flight".into())).into_future());
    peer.read_request("echo").await;
    peer.send_raw(b"Hello world\n").await;
    let reason = tokio::time::timeout(Duration::from_secs(5), dispatcher.closed())
        .await
        .expect("the connection is still up, reading a 1.2 GB frame that is text");
    let claimed = u32::from_be_bytes(*b"Hell") as usize;
    match &reason {
        Termination::Protocol(ProtocolError::FrameTooLarge { len, text, .. }) => {
            assert_eq!((*len, text.as_deref()), (claimed, Some("Hell")));
        }
        other => panic!("expected an over-length frame, got {other:?}"),
    }
    let text = error_text(&reason);
    assert!(text.contains(&claimed.to_string()), "{text}");
    assert!(text.contains("wrote text"), "{text}");
    let err = within(call).await.unwrap().unwrap_err();
    assert!(matches!(err, CallError::Terminated(_)), "{err:?}");
    drop(peer);
}

// issue 8: windowed and pull modes on one stream
#[tokio::test]
async fn credit_for_a_pulled_stream_ends_it_with_an_error_at_once() {
    let (_dispatcher, mut peer) = connect(Probe::default()).await;
    let stream = peer.open_stream(1, "numbers", &5u64).await;
    peer.request(2, "$stream/next", &stream).await;
    let first = peer.read().await;
    assert_eq!(
        (&first[0], &first[1], &first[3]),
        (&json!(3), &json!(2), &json!([0]))
    );
    peer.stream_credit(stream, 10).await;
    let end = peer.read().await;
    assert_eq!((&end[0], &end[1]), (&json!(9), &json!(stream)), "{end}");
    assert_eq!(end[2], code::INVALID_REQUEST, "{end}");
    assert!(end[3].as_str().unwrap().contains("pull mode"), "{end}");
    peer.request(3, "$stream/next", &stream).await;
    let gone = peer.read().await;
    assert_eq!(
        (&gone[0], &gone[3]),
        (&json!(4), &json!(code::INVALID_PARAMS)),
        "{gone}"
    );
}

// A pull that waits when its stream goes (credit on a pulled stream removes it) is answered:
// nothing else would, and a PHP-style consumer waits for ever.
#[tokio::test]
async fn a_pull_waiting_when_its_stream_is_removed_is_answered() {
    let probe = Probe::default();
    let (_feed, items) = mpsc::unbounded_channel();
    *probe.feed.lock().unwrap() = Some(items);
    let (_dispatcher, mut peer) = connect(probe).await;
    let stream = peer.open_stream(1, "fed", &()).await;
    peer.request(2, "$stream/next", &stream).await;
    assert!(
        peer.read_within(Duration::from_millis(200)).await.is_none(),
        "nothing was fed: the pull waits"
    );
    peer.stream_credit(stream, 10).await;
    let (mut ended, mut answered) = (false, false);
    while !(ended && answered) {
        let envelope = peer.read().await;
        match envelope[0].as_u64() {
            Some(9) => ended = true,
            Some(4) => {
                assert_eq!(envelope[1], json!(2), "{envelope}");
                let message = envelope[4].as_str().unwrap();
                assert!(
                    message.contains("released while this pull waited"),
                    "{envelope}"
                );
                answered = true;
            }
            _ => panic!("unexpected: {envelope}"),
        }
    }
}

// issue 8: admission limits are announced; a peer over them is refused, then cut off
#[tokio::test]
async fn requests_over_the_announced_limit_are_refused_then_the_flood_is_cut_off() {
    let (release, gate) = tokio::sync::watch::channel(false);
    let router =
        router(Probe::default()).raw("wait", move |incoming: channel_dispatcher::Incoming| {
            let mut gate = gate.clone();
            async move {
                let _ = gate.wait_for(|open| *open).await;
                Ok(channel_dispatcher::Reply::value(incoming.payload().clone()))
            }
        });
    let mut limits = channel_dispatcher::Limits::default();
    limits.max_pending_requests = 2;
    let builder = Dispatcher::builder().handler(router).limits(limits);
    let (dispatcher, mut peer) = RawPeer::connect_with(builder).await;
    for id in 1..=2 {
        peer.request(id, "wait", "held").await;
    }
    // Over the limit of 2: refused at once, with a reason to retry.
    peer.request(3, "wait", "one too many").await;
    let refused = peer.read().await;
    assert_eq!(
        (&refused[0], &refused[1], &refused[3]),
        (&json!(4), &json!(3), &json!(code::OVERLOADED))
    );
    assert!(
        refused[4].as_str().unwrap().contains("pending requests"),
        "{refused}"
    );
    // Answering frees room: the next one is admitted.
    release.send_replace(true);
    for _ in 0..2 {
        assert_eq!(peer.read().await[0], 3);
    }
    let _ = release.send_replace(false);
    // A peer that keeps sending over the limit is cut off, naming the limit.
    for id in 10..20 {
        peer.request(id, "wait", "flood").await;
    }
    let reason = within(dispatcher.closed()).await;
    match reason {
        Termination::Protocol(ProtocolError::AdmissionExceeded { limit, max }) => {
            assert_eq!(
                (limit, max),
                (channel_dispatcher::Limit::PendingRequests, 2)
            );
        }
        other => panic!("expected a cut-off, got {other:?}"),
    }
    let fatal = peer.read_until(|e| e[0] == 5).await;
    assert_eq!(fatal[1], code::OVERLOADED, "{fatal}");
}

// issue 8: a notification cannot be refused, so one over the window ends the connection
#[tokio::test]
async fn notifications_over_the_announced_window_cut_the_peer_off() {
    let router = router(Probe::default()).notification(|_cx: Context, Hold| async move {
        std::future::pending::<()>().await;
        Ok(())
    });
    let mut limits = channel_dispatcher::Limits::default();
    limits.max_pending_notifications = 3;
    let builder = Dispatcher::builder()
        .handler(router)
        .limits(limits)
        .max_concurrent_handlers(1);
    let (dispatcher, mut peer) = RawPeer::connect_with(builder).await;
    // One runs, three wait: the window is full; the fifth is over it.
    for _ in 0..5 {
        peer.send(&(2u8, "hold", NoAttributes::new(), ())).await;
    }
    let fatal = peer.read_until(|e| e[0] == 5).await;
    assert!(
        fatal[2].as_str().unwrap().contains("notifications"),
        "{fatal}"
    );
    match within(dispatcher.closed()).await {
        Termination::Protocol(ProtocolError::AdmissionExceeded { limit, max }) => {
            assert_eq!(
                (limit, max),
                (channel_dispatcher::Limit::PendingNotifications, 3)
            );
        }
        other => panic!("expected a cut-off, got {other:?}"),
    }
}

// issue 8: a request that claims to be nested in a call that is not pending is refused
#[tokio::test]
async fn a_request_nested_in_no_pending_call_is_refused() {
    let (_dispatcher, mut peer) = connect(Probe::default()).await;
    peer.send(&(1u8, 5u64, "echo", NoAttributes::new(), 0u64, 999u64, "x"))
        .await;
    let answer = peer.read().await;
    assert_eq!(
        (&answer[0], &answer[1], &answer[3]),
        (&json!(4), &json!(5), &json!(code::INVALID_REQUEST))
    );
    assert!(answer[4].as_str().unwrap().contains("999"), "{answer}");
}

/// Makes two calls back to the caller at once, through its context; answers their sum.
#[derive(Serialize, Deserialize)]
struct Twice;
request!(Twice => u64, "twice");

/// What `Twice` asks the caller for.
#[derive(Serialize, Deserialize)]
struct Back;
request!(Back => u64, "back");

// A peer's request 0 breaks PROTOCOL.md §5 (ids count from 1), and the wire cannot say that a
// call is nested in it (parent 0 is "none"): its handler's calls keep to the peer's request
// window like any other, or the peer would count them over the window it announced.
#[tokio::test]
async fn calls_of_the_handler_of_a_request_0_keep_to_the_peers_request_window() {
    let router = Router::new().request(|cx: Context, Twice| async move {
        let (a, b) = tokio::join!(
            cx.request(Back).into_future(),
            cx.request(Back).into_future()
        );
        Ok(a? + b?)
    });
    let (a, b) = tokio::net::UnixStream::pair().unwrap();
    let _dispatcher = Dispatcher::builder()
        .handler(router)
        .spawn(Channel::from(a));
    let mut peer = RawPeer::new(b);
    // The hello's limits end it, eight u32s; the fifth is `max_pending_requests`.
    let mut hello = support::raw::hello(support::raw::VERSION, "msgpack");
    let at = hello.len() - 16;
    hello[at..at + 4].copy_from_slice(&1u32.to_be_bytes());
    peer.send_frame(&hello).await;
    peer.send_frame(&[0]).await;
    assert_eq!(&peer.read_frame().await.unwrap()[..4], b"CHDP");
    assert_eq!(peer.read_frame().await.unwrap(), [0]);
    peer.request(0, "twice", &()).await;
    let first = peer.read_request("back").await;
    let early = peer.read_within(Duration::from_millis(300)).await;
    assert!(
        early.is_none(),
        "a second call beyond the window of 1 the peer announced: {early:?}"
    );
    peer.respond(first, &1u64).await;
    let second = peer.read_request("back").await;
    peer.respond(second, &2u64).await;
    let answer = peer.read().await;
    assert_eq!(
        (&answer[0], &answer[1], &answer[3]),
        (&json!(3), &json!(0), &json!(3)),
        "{answer}"
    );
}

/// The raw peer, as producer of `method`'s stream, sends `items` in batches of `per_batch`
/// against the credit it was first given; returns that first credit and the credit the
/// consumer grants after it took them all and waits for more.
async fn credit_around_one_window<T: Serialize>(
    peer: &mut RawPeer,
    method: &str,
    items: &[T],
    per_batch: usize,
) -> (u64, u64) {
    let id = peer.read_request(method).await;
    peer.respond(id, &STREAM).await;
    let first = peer.read_credit(STREAM).await;
    for (n, batch) in items.chunks(per_batch).enumerate() {
        let position = (n * per_batch) as u64;
        peer.send(&(8u8, STREAM, position, batch)).await;
    }
    let mut granted = 0;
    while let Some(credit) = peer.read_within(Duration::from_millis(300)).await {
        assert_eq!(
            (&credit[0], &credit[1]),
            (&json!(10), &json!(STREAM)),
            "{credit}"
        );
        granted += credit[2].as_u64().unwrap();
    }
    (first, granted)
}

// issue 14: a consumer left waiting once it took its whole default window grows the window
// (the producer is granted more than was consumed); a window set by hand stays, and so does
// one whose items are too large for the growth's byte bound.
#[tokio::test]
async fn a_waiting_consumer_grows_a_default_window_but_never_a_set_one_or_past_the_byte_bound() {
    let numbers: Vec<u64> = (0..1024).collect();
    for fixed in [false, true] {
        let (dispatcher, mut peer) = connect(Probe::default()).await;
        let stream = match fixed {
            true => dispatcher.stream(Numbers(1)).window(1024),
            false => dispatcher.stream(Numbers(1)),
        };
        let consumer = tokio::spawn(stream.count());
        let (first, granted) = credit_around_one_window(&mut peer, "numbers", &numbers, 256).await;
        assert_eq!(first, 1024);
        match fixed {
            true => assert_eq!(
                granted, 1024,
                "a set window renews what was consumed, no more"
            ),
            false => assert_eq!(
                granted,
                1024 + 1024,
                "the window doubled once the consumer waited"
            ),
        }
        consumer.abort();
    }
    // Items of 2,000 bytes: 1 MiB holds 524 of them, fewer than the window already is.
    let (dispatcher, mut peer) = connect(Probe::default()).await;
    let consumer = tokio::spawn(dispatcher.stream(Kilobytes).count());
    let large: Vec<String> = (0..1024).map(|i| format!("{i:>2000}")).collect();
    let (first, granted) = credit_around_one_window(&mut peer, "kilobytes", &large, 128).await;
    assert_eq!(
        (first, granted),
        (1024, 1024),
        "no growth past the byte bound"
    );
    consumer.abort();
}

// issue 14: a turn of the driver ends once every source waits for a wake, so streams that take
// turns for the write buffer, and queue themselves behind one another, must each be polled
// again (a liveness check; the lost wake a review found here needs a timing this test does not
// force)
#[tokio::test]
async fn streams_that_fill_the_transport_all_finish_once_the_peer_reads() {
    const STREAMS: u64 = 4;
    const ITEMS: u64 = 300;
    // Each item waits for a wake first: the streams queue themselves, often behind others.
    let router = Router::new().stream(|_cx: Context, Blocks(n)| async move {
        Ok(stream::iter(0..n).then(|_| async {
            tokio::task::yield_now().await;
            Ok("x".repeat(2048))
        }))
    });
    // A small write buffer, so the streams take turns for room; the idle sweep (which polls
    // the streams again) far away, so it cannot hide a stream nobody polls.
    let builder = Dispatcher::builder()
        .handler(router)
        .write_buffer_limit(8 * 1024)
        .stream_idle_timeout(Duration::from_secs(3600));
    let (_dispatcher, mut peer) = RawPeer::connect_with(builder).await;
    let mut streams = Vec::new();
    for request in 1..=STREAMS {
        streams.push(peer.open_stream(request, "blocks", &Blocks(ITEMS)).await);
    }
    for &stream in &streams {
        // One more than the items: the producer looks for the end only with credit left.
        peer.stream_credit(stream, ITEMS + 1).await;
    }
    // The peer reads nothing for a while: the socket fills, the producers wait for room.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut items = vec![0u64; streams.len()];
    let mut ended = 0;
    while ended < streams.len() {
        let envelope = peer.read().await;
        let Some(at) = streams.iter().position(|&s| envelope[1] == s) else {
            continue;
        };
        match envelope[0].as_u64() {
            Some(8) => items[at] += envelope[3].as_array().expect("a batch").len() as u64,
            Some(9) => {
                assert_eq!(envelope, json!([9, streams[at]]), "a normal end");
                ended += 1;
            }
            _ => {}
        }
    }
    assert_eq!(items, vec![ITEMS; streams.len()]);
}
