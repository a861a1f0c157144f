//! Review attacks on the rewritten connection driver (PROTOCOL.md v2).
//!
//! Every test asserts the CORRECT behaviour, so a test that fails names a bug. Each says what it
//! attacks and where the cause is thought to be. Tests that pass are kept when they cover what
//! the other suites do not (marked "coverage").
//!
//! All tests in this file run one at a time (`serial()`): two of them measure the process's
//! resident memory, which other tests running at once would blur.

mod support;

use std::future::IntoFuture;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use channel_dispatcher::{
    notification, request, stream_request, Attributes, Builder, CallError, Channel, Context,
    Dispatcher, HandlerError, Limits, Router, Streams, Termination,
};
use futures_util::future::join_all;
use futures_util::{stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::json;
use support::raw::{envelope, frame, hello, NoAttributes, RawPeer, VERSION};
use support::{within, Echo, Hang};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

// ===== helpers =====

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs the tests of this file one at a time.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

/// Lets every task run (paused time jumps ahead once all are idle).
async fn settle() {
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// This process's resident memory, in bytes (Linux).
fn rss() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// A unit-like message whose handler never answers (and keeps its context).
#[derive(Serialize, Deserialize)]
struct Hold;
request!(Hold => (), "hold");

/// Answered after 20 ms with twice its number.
#[derive(Serialize, Deserialize)]
struct SlowInner(u32);
request!(SlowInner => u32, "slow-inner");

/// Answered with a nested `SlowInner(n)` call back to the caller, plus one.
#[derive(Serialize, Deserialize)]
struct Outer(u32);
request!(Outer => u32, "outer");

/// Makes `n` nested `SlowInner` calls back to the caller at once; answers how many succeeded.
#[derive(Serialize, Deserialize)]
struct FanOut(u32);
request!(FanOut => u32, "fan-out");

/// Its handler sends `n` notifications to the caller (from the handler), then answers `n`.
#[derive(Serialize, Deserialize)]
struct Report(u32);
request!(Report => u32, "report");

/// Its handler asks the caller for a `Report(n)` (a nested call) and answers its answer.
#[derive(Serialize, Deserialize)]
struct AskReport(u32);
request!(AskReport => u32, "ask-report");

/// `0..n`, as a remote stream.
#[derive(Serialize, Deserialize)]
struct Numbers(u32);
stream_request!(Numbers => u32, "numbers");

/// `n` strings of 1 KiB each, as a remote stream.
#[derive(Serialize, Deserialize)]
struct Kilobytes(u32);
stream_request!(Kilobytes => String, "kilobytes");

/// Never yields an item.
#[derive(Serialize, Deserialize)]
struct Silent;
stream_request!(Silent => u64, "silent");

/// Its handler consumes `Numbers(n)` from the caller, through its context's dispatcher
/// handle (the only way a handler can open a stream), and answers the sum.
#[derive(Serialize, Deserialize)]
struct SumFromCaller(u32);
request!(SumFromCaller => u32, "sum-from-caller");

/// Its handler asks the caller for `SumFromCaller(n)` (a nested call).
#[derive(Serialize, Deserialize)]
struct AskSum(u32);
request!(AskSum => u32, "ask-sum");

/// Its handler waits until a `Release` notification arrives (any connection of the router).
#[derive(Serialize, Deserialize)]
struct WaitForRelease;
request!(WaitForRelease => (), "wait-for-release");

#[derive(Serialize, Deserialize)]
struct Release;
notification!(Release, "release");

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Note(String);
notification!(Note, "note");

/// What the routers tell the test.
#[derive(Clone, Default)]
struct Probe {
    notes: Option<mpsc::UnboundedSender<String>>,
    streams: Arc<Mutex<Option<Streams>>>,
    release: Arc<tokio::sync::Notify>,
}

fn router(probe: Probe) -> Router {
    let notes = probe.notes.clone();
    let streams = Arc::clone(&probe.streams);
    let release = Arc::clone(&probe.release);
    let released = Arc::clone(&probe.release);
    Router::new()
        .request(|_cx: Context, Echo(s)| async move { Ok(s) })
        .request(|_cx: Context, Hang| std::future::pending::<Result<(), HandlerError>>())
        .request(|cx: Context, Hold| async move {
            let _keep = cx;
            std::future::pending::<Result<(), HandlerError>>().await
        })
        .request(|_cx: Context, SlowInner(n)| async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(n * 2)
        })
        .request(|cx: Context, Outer(n)| async move { Ok(cx.request(SlowInner(n)).await? + 1) })
        .request(|cx: Context, FanOut(n)| async move {
            let calls = (0..n).map(|i| cx.request(SlowInner(i)).into_future());
            let answers = join_all(calls).await;
            let failures: Vec<String> = answers
                .iter()
                .filter_map(|a| a.as_ref().err().map(|e| format!("{e:?}")))
                .collect();
            if !failures.is_empty() {
                return Err(HandlerError::internal(format!(
                    "nested calls failed: {failures:?}"
                )));
            }
            Ok(n)
        })
        .request(|cx: Context, Report(n)| async move {
            for i in 0..n {
                cx.notify(Note(format!("report {i}"))).await?;
            }
            Ok(n)
        })
        .request(|cx: Context, AskReport(n)| async move { Ok(cx.request(Report(n)).await?) })
        .stream(|_cx: Context, Numbers(n)| async move { Ok(stream::iter((0..n).map(Ok))) })
        .stream(|_cx: Context, Kilobytes(n)| async move {
            Ok(stream::iter((0..n).map(|i| Ok(format!("{i:>1024}")))))
        })
        .stream(move |cx: Context, Silent| {
            let streams = Arc::clone(&streams);
            async move {
                *streams.lock().unwrap() = cx.streams();
                Ok(stream::pending::<Result<u64, HandlerError>>())
            }
        })
        .request(|cx: Context, SumFromCaller(n)| async move {
            // Through the context: nested in this request, as a handler's calls must be.
            let items: Vec<Result<u32, CallError>> = cx.stream(Numbers(n)).collect().await;
            let mut sum = 0;
            for item in items {
                sum += item.map_err(|e| HandlerError::internal(format!("{e:?}")))?;
            }
            Ok(sum)
        })
        .request(|cx: Context, AskSum(n)| async move { Ok(cx.request(SumFromCaller(n)).await?) })
        .request(move |_cx: Context, WaitForRelease| {
            let release = Arc::clone(&release);
            async move {
                release.notified().await;
                Ok(())
            }
        })
        .notification(move |_cx: Context, Release| {
            let released = Arc::clone(&released);
            async move {
                released.notify_waiters();
                released.notify_one();
                Ok(())
            }
        })
        .notification(move |_cx: Context, Note(text)| {
            let notes = notes.clone();
            async move {
                if let Some(notes) = notes {
                    let _ = notes.send(text);
                }
                Ok(())
            }
        })
}

fn builder(probe: Probe) -> Builder {
    Dispatcher::builder().handler(router(probe))
}

/// A client and a server over the in-memory pair.
fn peers(client: Builder, server: Builder) -> (Dispatcher, Dispatcher) {
    let (a, b) = Channel::pair();
    (client.spawn(a), server.spawn(b))
}

fn limits(edit: impl FnOnce(&mut Limits)) -> Limits {
    let mut limits = Limits::default();
    edit(&mut limits);
    limits
}

fn remote_code(result: &Result<impl std::fmt::Debug, CallError>) -> Option<i64> {
    match result {
        Err(CallError::Remote(e)) => Some(e.code),
        _ => None,
    }
}

// ===== admission drift between two compliant dispatchers =====

// Regression (found in review). Attacks the in-flight permits (shared.rs, `Permits::acquire`): it takes the count
// permit, `forget`s it, then waits for queued-bytes room. A call that times out (or is dropped)
// while it waits for bytes never gives the count back: every such timeout loses one of
// `max_in_flight` slots for good, until calls hang.
#[tokio::test(start_paused = true)]
async fn a_call_that_times_out_waiting_for_queued_bytes_gives_its_in_flight_slot_back() {
    let _serial = serial().await;
    let server = builder(Probe::default())
        .max_concurrent_handlers(1)
        .limits(limits(|l| l.max_pending_notifications = 1));
    let client = Dispatcher::builder().max_in_flight(3).max_queued_bytes(64);
    let (client, _server) = peers(client, server);
    // The server's only handler slot, taken: the notifications below wait there, uncredited.
    let hang = tokio::spawn(client.request(Hang).into_future());
    settle().await;
    // Written, waits at the server: the server's window of one notification is full.
    client.notify(Note("first".into())).await.unwrap();
    settle().await;
    // Waits in our outbox for that window, holding all 64 queued bytes (and a slot).
    client.notify(Note("x".repeat(100))).await.unwrap();
    settle().await;
    // The third slot is free, the bytes are not: this call waits for bytes, and times out.
    let waiter = client
        .request(Echo("w".into()))
        .timeout(Duration::from_millis(100))
        .await;
    assert!(matches!(waiter, Err(CallError::Timeout(_))), "{waiter:?}");
    // Everything is given back: the hang is cancelled, the notifications go out and run.
    hang.abort();
    settle().await;
    // Three slots: three calls at once are all written.
    let calls: Vec<_> = (0..3)
        .map(|_| tokio::spawn(client.request(Hang).into_future()))
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        client.pending_calls(),
        3,
        "an in-flight slot was lost by the call that timed out waiting for queued bytes"
    );
    calls.iter().for_each(|c| c.abort());
}

// Regression (found in review). Attacks pull-mode accounting (inbound.rs `StreamCancel` / `Cancel`, storage.rs
// `remove`/`cancel_pull`). Dropping a pulled `RemoteStream` while a pull waits sends the stream
// cancel, then the pull's cancel. The stream cancel removes the stored stream with its pending
// pull; the pull's cancel then finds no pull, so `Admission::pull_done` never runs: the
// producer counts one request of ours for good, while our window freed it. With
// `max_pending_requests = 1` every later call of a compliant peer is refused `-32005`.
#[tokio::test(start_paused = true)]
async fn dropping_a_pulled_stream_while_its_pull_waits_frees_the_pulls_place_at_the_producer() {
    let _serial = serial().await;
    let server = builder(Probe::default()).limits(limits(|l| l.max_pending_requests = 1));
    let (client, _server) = peers(Dispatcher::builder(), server);
    let mut silent = client.stream(Silent).pull_mode();
    let first = tokio::time::timeout(Duration::from_secs(1), silent.next()).await;
    assert!(first.is_err(), "the silent stream yielded {first:?}");
    drop(silent);
    settle().await;
    let answer = within(client.request(Echo("after".into()))).await;
    assert_eq!(
        answer.as_ref().ok().map(String::as_str),
        Some("after"),
        "a compliant call was refused: {answer:?}"
    );
}

// Regression (found in review). Attacks the "a count of 0 is read as 1" rule of PROTOCOL.md section 2. The sender
// (`PeerWindow::new`) reads a 0 as 1, but the receiver (`Admission`, builder `limits()`) uses
// its own 0 as it is: the one request the peer may send is refused, and with a strike limit
// of 0, the connection is cut off at the first one; a notification cuts it off at once.
#[tokio::test(start_paused = true)]
async fn own_admission_limits_of_zero_are_read_as_one_on_both_sides() {
    let _serial = serial().await;
    let (notes, mut noted) = mpsc::unbounded_channel();
    let probe = Probe {
        notes: Some(notes),
        ..Probe::default()
    };
    let server = builder(probe).limits(limits(|l| {
        l.max_pending_requests = 0;
        l.max_pending_notifications = 0;
    }));
    let (client, server) = peers(Dispatcher::builder(), server);
    let answer = within(client.request(Echo("one".into()))).await;
    assert!(
        answer.is_ok(),
        "a single call to a peer announcing 0 failed: {answer:?}"
    );
    client.notify(Note("one".into())).await.unwrap();
    let got = within(noted.recv()).await;
    assert_eq!(got.as_deref(), Some("one"));
    assert!(!server.is_stopping() && !client.is_stopping());
}

// Regression (found in review). Attacks nested admission: the sender (driver.rs `on_command`, outgoing.rs) never holds
// nested calls back against the peer's `max_nested_requests`, while the receiver
// (admission.rs `request`) refuses them over it AND counts each refusal as a strike against
// `max_pending_requests`. A compliant handler that makes 3 nested calls at once to a peer that
// announced 1 nested / 1 pending gets `-32005` for the second and the connection is cut off
// (`AdmissionExceeded`) at the third, between two real dispatchers.
#[tokio::test(start_paused = true)]
async fn nested_calls_beyond_the_peers_nested_limit_never_cut_a_compliant_peer_off() {
    let _serial = serial().await;
    let client = builder(Probe::default()).limits(limits(|l| {
        l.max_pending_requests = 1;
        l.max_nested_requests = 1;
    }));
    let (client, server) = peers(client, builder(Probe::default()));
    let answer = within(client.request(FanOut(3))).await;
    settle().await;
    assert!(
        !client.is_stopping() && !server.is_stopping(),
        "the connection was cut off: {answer:?}; client: {:?}",
        tokio::time::timeout(Duration::from_millis(1), client.closed()).await
    );
    assert_eq!(
        answer.ok(),
        Some(3),
        "nested calls of a compliant peer were refused"
    );
}

// Regression (found in review). Attacks the check of a message against the peer's limits before the handshake
// (shared.rs `check_limits` uses our own limits until the peer's hello arrived). A notification
// queued then with more attributes than the peer announced is sent anyway; the peer discards
// it as over a limit (inbound.rs `on_frame` -> `reject`) and never credits it, so our window
// (`PeerWindow`) keeps it for good: with `max_pending_notifications = 1` no later
// notification is ever written.
#[tokio::test(start_paused = true)]
async fn a_notification_queued_before_the_handshake_is_held_to_the_peers_limits() {
    let _serial = serial().await;
    let (notes, mut noted) = mpsc::unbounded_channel();
    let probe = Probe {
        notes: Some(notes),
        ..Probe::default()
    };
    let server = builder(probe).limits(limits(|l| {
        l.max_attributes = 1;
        l.max_pending_notifications = 1;
    }));
    let (client, _server) = peers(Dispatcher::builder(), server);
    assert!(
        client.peer_limits().is_none(),
        "the handshake is not done yet"
    );
    let two: Attributes = [("a", "1"), ("b", "2")].into_iter().collect();
    let first = client.notify_with(Note("first".into()), two).await;
    client.notify(Note("second".into())).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), noted.recv()).await;
    assert_eq!(
        got.ok().flatten().as_deref(),
        Some("second"),
        "the notification after one over the peer's limits was never delivered (first: {first:?})"
    );
    assert!(
        matches!(first, Err(CallError::Limit(_))),
        "a notification over the peer's announced limits was not failed locally: {first:?}"
    );
}

// Coverage (passes): a compliant mixed load against a server with tiny admission limits:
// cancels racing answers, timeouts shorter and longer than the handler, empty payloads,
// payloads over `max_pending_bytes` (the "one message alone" rule) and notifications. No call
// may be refused `-32005` and the connection must stay up.
#[tokio::test(start_paused = true)]
async fn a_compliant_mixed_load_is_never_refused_by_tiny_admission_limits() {
    let _serial = serial().await;
    let server = builder(Probe::default())
        .max_concurrent_handlers(1)
        .limits(limits(|l| {
            l.max_pending_requests = 2;
            l.max_pending_notifications = 2;
            l.max_pending_bytes = 300;
        }));
    let client = Dispatcher::builder().max_in_flight(8).max_queued_bytes(512);
    let (client, server) = peers(client, server);
    let refused = Arc::new(AtomicUsize::new(0));
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut tasks = Vec::new();
    for i in 0..300u64 {
        let client = client.clone();
        let refused = Arc::clone(&refused);
        let r = next();
        tasks.push(tokio::spawn(async move {
            let size = [0usize, 1, 100, 299, 300, 301, 2000][(r % 7) as usize];
            let result = match (r >> 8) % 5 {
                0 => client
                    .request(SlowInner(i as u32))
                    .timeout(Duration::from_millis(r % 40))
                    .await
                    .map(drop),
                1 => {
                    // Dropped at a random moment: a cancel racing the answer.
                    let call = client.request(Echo("c".repeat(size))).into_future();
                    let _ = tokio::time::timeout(Duration::from_millis(r % 30), call).await;
                    Ok(())
                }
                2 => client.notify(Note("n".repeat(size))).await,
                3 => client
                    .call_raw("echo", client.codec().encode(&"e".repeat(size)).unwrap())
                    .await
                    .map(drop),
                _ => client
                    .call_raw("no/such/method", Default::default())
                    .await
                    .map(drop),
            };
            if remote_code(&result) == Some(-32005) {
                refused.fetch_add(1, Ordering::SeqCst);
            }
        }));
        if r % 3 == 0 {
            tokio::time::sleep(Duration::from_millis(r % 7)).await;
        }
    }
    within(join_all(tasks)).await;
    assert_eq!(
        refused.load(Ordering::SeqCst),
        0,
        "compliant calls were refused -32005"
    );
    assert!(!client.is_stopping() && !server.is_stopping());
    let after = within(client.request(Echo("after".into()))).await;
    assert_eq!(after.unwrap(), "after");
}

// ===== deadlocks between two healthy dispatchers =====

// Regression (found in review). Attacks notification credit (admission.rs: credited when a notification STARTS, which
// needs a free handler slot) combined with handler notifications waiting for that credit
// while holding a `Permit::Handler` slot. The server's only handler slot runs `AskReport`,
// which waits for our nested `Report`; `Report`'s handler notifies the server: the first
// notification waits for the server's busy slot (uncredited), the second waits in our outbox
// for that credit holding the only handler permit, the third waits for that permit. Nothing
// can move: a deadlock between two healthy peers.
#[tokio::test(start_paused = true)]
async fn a_nested_handler_that_notifies_a_busy_caller_completes() {
    let _serial = serial().await;
    let server = builder(Probe::default())
        .max_concurrent_handlers(1)
        .limits(limits(|l| l.max_pending_notifications = 1));
    let client = builder(Probe::default()).max_in_flight(1);
    let (client, _server) = peers(client, server);
    let answer = within(client.request(AskReport(3))).await;
    assert_eq!(answer.unwrap(), 3);
}

// Regression (found in review). Attacks calls that a handler makes through its context's dispatcher handle
// (`cx.dispatcher()`), the only way a handler can open a remote stream: they take a
// `Permit::Handle`, which the very call waiting for this handler may hold. With
// `max_in_flight(1)`, our `AskSum` call holds the only slot; the server's handler calls us back
// (nested); our handler opens a stream from the server and waits for a slot forever.
#[tokio::test(start_paused = true)]
async fn a_handler_that_consumes_a_stream_from_its_caller_completes_with_one_in_flight_slot() {
    let _serial = serial().await;
    let client = builder(Probe::default()).max_in_flight(1);
    let (client, _server) = peers(client, builder(Probe::default()));
    let answer = within(client.request(AskSum(4))).await;
    assert_eq!(answer.unwrap(), 6);
}

// Regression (found in review; same cause, without any in-flight limit). The stream's open request is an ordinary
// call: with the server's window of one request taken by `AskSum` itself, the handler's open
// waits for that window, which only its own answer frees. A handler cannot open a stream as a
// nested call.
#[tokio::test(start_paused = true)]
async fn a_handler_that_consumes_a_stream_from_its_caller_completes_when_the_callers_window_is_one()
{
    let _serial = serial().await;
    let server = builder(Probe::default()).limits(limits(|l| l.max_pending_requests = 1));
    let (client, _server) = peers(builder(Probe::default()), server);
    let answer = within(client.request(AskSum(4))).await;
    assert_eq!(answer.unwrap(), 6);
}

// Regression (found in review). Attacks windowed batching (storage.rs `Typed::poll_batch`, driver.rs `send_produced`):
// a batch holds up to `min(credit, MAX_BATCH)` items whatever their size, and a batch over
// the consumer's maximum frame length ends the stream with `-32001` ("use a smaller window").
// A compliant consumer announcing 64 KiB frames, with the default window, cannot read a stream
// of 1 KiB items: the producer should cut batches to the frame limit.
#[tokio::test(start_paused = true)]
async fn a_stream_of_small_items_is_readable_by_a_consumer_with_small_frames() {
    let _serial = serial().await;
    let client = builder(Probe::default()).max_frame_length(64 * KIB);
    let (client, _server) = peers(client, builder(Probe::default()));
    let items: Vec<Result<String, CallError>> =
        within(client.stream(Kilobytes(200)).collect::<Vec<_>>()).await;
    let failed: Vec<_> = items.iter().filter_map(|i| i.as_ref().err()).collect();
    assert!(failed.is_empty(), "the stream failed: {failed:?}");
    assert_eq!(items.len(), 200);
}

// Coverage (passes): nested calls and handler notifications through caller-side middleware
// on both sides, with one in-flight slot and one handler slot each: they take no handle slot
// and complete.
#[tokio::test(start_paused = true)]
async fn nested_calls_and_handler_notifications_through_outbound_middleware_complete() {
    let _serial = serial().await;
    let passthrough = || {
        channel_dispatcher::middleware::from_fn(
            |call: channel_dispatcher::middleware::OutgoingCall,
             next: channel_dispatcher::middleware::Next<
                channel_dispatcher::middleware::OutgoingCall,
            >| async move { next.run(call).await },
        )
    };
    let side = || {
        builder(Probe::default())
            .outbound(passthrough())
            .max_in_flight(1)
            .max_concurrent_handlers(1)
            .limits(limits(|l| l.max_pending_notifications = 4))
    };
    let (client, _server) = peers(side(), side());
    assert_eq!(within(client.request(Outer(5))).await.unwrap(), 11);
    assert_eq!(within(client.request(AskReport(2))).await.unwrap(), 2);
}

// Regression (found in review; ordering across kinds). Attacks the outbox (outgoing.rs `Outbox::pop_ready`): calls and
// notifications wait in ONE queue, so a notification whose window has room waits behind a call
// that waits for the peer's request window. Here the server's only request slot is held by a
// handler that waits for our `Release` notification; a second call waits for that slot; the
// notification, sent after it, waits behind it: neither ever goes out.
#[tokio::test(start_paused = true)]
async fn a_notification_is_not_held_behind_a_call_that_waits_for_the_request_window() {
    let _serial = serial().await;
    let server = builder(Probe::default()).limits(limits(|l| l.max_pending_requests = 1));
    let (client, _server) = peers(Dispatcher::builder(), server);
    let waiting = tokio::spawn(client.request(WaitForRelease).into_future());
    settle().await;
    let second = tokio::spawn(client.request(Echo("second".into())).into_future());
    settle().await;
    client.notify(Release).await.unwrap();
    let released = within(waiting).await.unwrap();
    assert!(released.is_ok(), "{released:?}");
    assert_eq!(within(second).await.unwrap().unwrap(), "second");
}

// Regression (found in review). Attacks draining (driver.rs `begin_stop` -> `fail_outgoing(true)`): PROTOCOL.md
// section 10 lets a stopping side's running handlers finish "and their nested requests", but
// `begin_stop` fails and cancels every pending call, the nested calls those handlers are
// waiting on included. The handler gets `Terminated(Stopped)` instead of its answer, and the
// peer gets an error for a request the drain was meant to finish.
#[tokio::test(start_paused = true)]
async fn stop_lets_a_running_handler_finish_its_pending_nested_call() {
    let _serial = serial().await;
    let client = builder(Probe::default());
    let (client, server) = peers(client, builder(Probe::default()));
    let outer = tokio::spawn(client.request(Outer(20)).into_future());
    // The server's handler is now waiting for its nested `SlowInner` (20 ms).
    tokio::time::sleep(Duration::from_millis(5)).await;
    let stopping = tokio::spawn(async move { server.stop().await });
    let answer = within(outer).await.unwrap();
    assert_eq!(
        answer.as_ref().ok(),
        Some(&41),
        "the handler's nested call was failed by the stop: {answer:?}"
    );
    assert!(matches!(
        within(stopping).await.unwrap(),
        Termination::Stopped
    ));
}

// ===== lifecycle =====

// Regression (found in review). Attacks the drop guard (mod.rs `Drop for Connection` -> driver.rs `Driver::finish`,
// which creates `tokio::time::sleep(Duration::ZERO)`): a running `Connection` (from
// `Builder::build`) dropped outside a Tokio runtime panics in its drop guard ("there is no
// reactor running"), where the docs promise it "must not panic", and `on_stop` never runs.
#[test]
fn dropping_a_running_connection_outside_any_runtime_does_not_panic() {
    let _serial = SERIAL.blocking_lock();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (stopped_tx, stopped) = std::sync::mpsc::channel();
    let (client, connection) = runtime.block_on(async {
        let (a, b) = Channel::pair();
        let _server = builder(Probe::default()).spawn(b);
        let (client, connection) = builder(Probe::default()).build(a);
        let mut connection = Box::pin(connection);
        let ready = async {
            while client.peer_limits().is_none() {
                tokio::task::yield_now().await;
            }
        };
        tokio::select! {
            reason = &mut connection => panic!("ended early: {reason:?}"),
            () = within(ready) => {}
        }
        (client, connection)
    });
    client.on_stop(move |reason| {
        let _ = stopped_tx.send(reason.clone());
    });
    drop(runtime);
    let dropped = std::panic::catch_unwind(AssertUnwindSafe(move || drop(connection)));
    assert!(dropped.is_ok(), "the drop guard panicked outside a runtime");
    let reason = stopped.recv_timeout(Duration::from_secs(1));
    assert!(matches!(reason, Ok(Termination::Aborted)), "{reason:?}");
}

// Coverage (passes): the `Connection` future dropped in the middle of its drain (a handler
// keeps the drain going): `stop()` returns, `on_stop` runs exactly once, `closed()` says
// `Stopped` (the first reason wins).
#[tokio::test(start_paused = true)]
async fn dropping_the_connection_in_the_middle_of_its_drain_ends_it_exactly_once() {
    let _serial = serial().await;
    let (a, b) = Channel::pair();
    let client = builder(Probe::default()).spawn(a);
    let (server, connection) = builder(Probe::default()).build(b);
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&runs);
    server.on_stop(move |_| {
        counted.fetch_add(1, Ordering::SeqCst);
    });
    let driving = tokio::spawn(connection);
    let held = tokio::spawn(client.request(Hold).into_future());
    settle().await;
    let stopping = tokio::spawn({
        let server = server.clone();
        async move { server.stop().await }
    });
    settle().await;
    assert!(
        !driving.is_finished(),
        "the drain should still wait for the handler"
    );
    driving.abort();
    let reason = within(stopping).await.unwrap();
    assert!(matches!(reason, Termination::Stopped), "{reason:?}");
    assert!(matches!(
        within(server.closed()).await,
        Termination::Stopped
    ));
    settle().await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "on_stop ran more or less than once"
    );
    let _ = within(held).await;
}

// Regression (found in review; conformance). Same cause as the notification test above, for requests: a call made
// before the handshake is checked against our own limits (shared.rs `check_limits`), not
// the peer's; PROTOCOL.md section 1 / `Limits` docs: "it fails a message that is too large
// before sending it". Sent anyway, it comes back as the peer's `-32600` "malformed request".
#[tokio::test(start_paused = true)]
async fn a_call_made_before_the_handshake_is_held_to_the_peers_limits() {
    let _serial = serial().await;
    let server = builder(Probe::default()).limits(limits(|l| l.max_attributes = 1));
    let (client, _server) = peers(Dispatcher::builder(), server);
    assert!(
        client.peer_limits().is_none(),
        "the handshake is not done yet"
    );
    let call = client
        .request(Echo("x".into()))
        .attribute("a", "1")
        .attribute("b", "2")
        .into_future();
    let answer = within(call).await;
    assert!(
        matches!(answer, Err(CallError::Limit(_))),
        "a call over the peer's announced limits was sent: {answer:?}"
    );
}

// Regression (found in review; conformance). PROTOCOL.md section 9 / 7: a stream released after the producer's idle
// time ends with `-32004`. A pulled stream's consumer has no windowed entry, so the stream end
// the sweep sends is dropped (consumers.rs `end`), and its next pull is answered `-32602` "no
// stream": the consumer never learns why.
#[tokio::test(start_paused = true)]
async fn a_pulled_stream_released_for_idleness_reports_minus_32004() {
    let _serial = serial().await;
    let server = builder(Probe::default()).stream_idle_timeout(Duration::from_secs(1));
    let (client, _server) = peers(Dispatcher::builder(), server);
    let mut numbers = client.stream(Numbers(5)).pull_mode();
    assert_eq!(within(numbers.next()).await.unwrap().unwrap(), 0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let next = within(numbers.next()).await;
    assert_eq!(
        next.as_ref().and_then(remote_code),
        Some(-32004),
        "an idle-released pulled stream reported {next:?}"
    );
}

// ===== protocol conformance against a raw peer =====

async fn open_silent(peer: &mut RawPeer, id: u64) -> u64 {
    peer.request(id, "silent", &()).await;
    let answer = peer.read().await;
    assert_eq!(
        (answer[0].as_u64(), answer[1].as_u64()),
        (Some(3), Some(id)),
        "{answer}"
    );
    answer[3].as_u64().expect("a stream id")
}

// Regression (found in review; conformance). Attacks the reused-id rule of PROTOCOL.md section 5 ("A request id must
// not be reused while that request is pending (running or waiting to run). A receiver that
// sees a reused id drops the second request"): inbound.rs `on_request` checks running handlers
// and the admission queue, not pulls waiting for an item. A request reusing the id of a pending
// pull is run and answered, and that answer reads as the pull's.
#[tokio::test]
async fn a_request_that_reuses_the_id_of_a_pending_pull_is_dropped() {
    let _serial = serial().await;
    let (_dispatcher, mut peer) = RawPeer::connect_with(builder(Probe::default())).await;
    let stream = open_silent(&mut peer, 1).await;
    peer.request(2, "$stream/next", &stream).await;
    assert!(
        peer.read_within(Duration::from_millis(200)).await.is_none(),
        "the pull waits"
    );
    peer.request(2, "echo", "reused").await;
    let answer = peer.read_within(Duration::from_millis(500)).await;
    assert!(
        answer.is_none(),
        "a request reusing the id of a pending pull was answered: {answer:?}"
    );
}

// Regression (found in review; conformance). PROTOCOL.md section 9: credit for a pulled stream "ends it with stream
// end -32600 (the stream is released...)". When a pull is waiting at that moment
// (storage.rs `grant` removes the entry with its pending pull), that pull is never answered
// and stays counted against our `max_pending_requests` (inbound.rs never calls `pull_done`).
#[tokio::test]
async fn credit_for_a_stream_with_a_pending_pull_still_answers_the_pull() {
    let _serial = serial().await;
    let (_dispatcher, mut peer) = RawPeer::connect_with(builder(Probe::default())).await;
    let stream = open_silent(&mut peer, 1).await;
    peer.request(2, "$stream/next", &stream).await;
    assert!(
        peer.read_within(Duration::from_millis(200)).await.is_none(),
        "the pull waits"
    );
    peer.stream_credit(stream, 5).await;
    let end = peer.read().await;
    assert_eq!(end[0], 9, "a stream end: {end}");
    let pull = peer.read_within(Duration::from_secs(2)).await;
    assert!(
        pull.as_ref()
            .is_some_and(|p| p[1] == 2 && (p[0] == 3 || p[0] == 4)),
        "the pending pull of the released stream was never answered: {pull:?}"
    );
}

// Coverage (passes; conformance, PROTOCOL.md section 6): the notifications a receiver
// starts in one turn are credited back in one notification credit.
#[tokio::test]
async fn notifications_started_in_one_turn_are_credited_in_one_envelope() {
    let _serial = serial().await;
    let (_dispatcher, mut peer) = RawPeer::connect_with(builder(Probe::default())).await;
    let mut burst = Vec::new();
    for i in 0..10 {
        burst.extend(frame(&envelope(&(
            2u8,
            "note",
            NoAttributes::new(),
            format!("n{i}"),
        ))));
    }
    peer.send_raw(&burst).await;
    assert_eq!(peer.read().await, json!([12, 10]));
}

// Coverage (passes): `stop()` returns within the drain timeout plus the 2 s linger while the
// peer reads, keeps sending requests after our goodbye, and never closes its side.
#[tokio::test]
async fn stop_returns_in_time_while_the_peer_keeps_sending_and_never_closes() {
    let _serial = serial().await;
    let drain = Duration::from_millis(300);
    let builder = builder(Probe::default()).drain_timeout(drain);
    let (dispatcher, mut peer) = RawPeer::connect_with(builder).await;
    peer.request(1, "hold", &()).await;
    let (mut read, mut write) = peer.io.into_split();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0; 64 * KIB];
        while read.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        read
    });
    let writer = tokio::spawn(async move {
        for id in 2u64.. {
            let request = (1u8, id, "echo", NoAttributes::new(), 0u64, 0u64, "flood");
            if write.write_all(&frame(&envelope(&request))).await.is_err() {
                break;
            }
            if id % 64 == 0 {
                tokio::task::yield_now().await;
            }
        }
        write
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    let reason = within(dispatcher.stop()).await;
    let took = started.elapsed();
    assert!(matches!(reason, Termination::Stopped), "{reason:?}");
    assert!(
        took < drain + Duration::from_millis(2_500),
        "stop() took {took:?} (drain {drain:?} + 2 s linger)"
    );
    writer.abort();
    reader.abort();
}

// ===== memory a hostile peer controls =====

/// A raw peer over a Unix socket whose hello announces `max_frame` instead of the default.
async fn raw_peer_with_max_frame(builder: Builder, max_frame: u32) -> (Dispatcher, RawPeer) {
    let (a, b) = UnixStream::pair().unwrap();
    let dispatcher = builder.spawn(Channel::from(a));
    let mut peer = RawPeer::new(b);
    let mut ours = hello(VERSION, "msgpack");
    let at = ours.len() - 8 * 4;
    ours[at..at + 4].copy_from_slice(&max_frame.to_be_bytes());
    peer.send_frame(&ours).await;
    peer.send_frame(&[0]).await;
    assert_eq!(&peer.read_frame().await.unwrap()[..4], b"CHDP");
    assert_eq!(peer.read_frame().await.unwrap(), [0]);
    (dispatcher, peer)
}

// Regression (found in review). Attacks the write side's bound (write.rs): answers to bad
// input are written whatever the buffer holds. A peer that does not read and sends requests
// nested in no pending call (answered `-32600` outside admission, no strike) used to grow our
// write buffer by ~8x its own traffic until the stall timeout, far past the 128 KiB hard cap;
// now it is cut off at twice the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_to_bad_requests_keep_the_write_buffer_near_its_hard_cap() {
    let _serial = serial().await;
    let builder = builder(Probe::default())
        .write_buffer_limit(16 * KIB)
        .write_stall_timeout(Duration::from_secs(120));
    // Hard cap: 4 x 16 KiB + the 64 KiB frames the peer announces = 128 KiB.
    let (dispatcher, peer) = raw_peer_with_max_frame(builder, 64 * KIB as u32).await;
    let mut flood = Vec::new();
    for id in 1..=300_000u64 {
        let request = (
            1u8,
            id,
            "x",
            NoAttributes::new(),
            0u64,
            1_000_000_000u64,
            (),
        );
        flood.extend(frame(&envelope(&request)));
    }
    let (_read, mut write) = peer.io.into_split();
    let baseline = rss();
    let writer = tokio::spawn(async move {
        // Cut off half way: the rest of the flood fails to go.
        let _ = write.write_all(&flood).await;
        write
    });
    let mut peak = 0;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        peak = peak.max(rss().saturating_sub(baseline));
        if writer.is_finished() || peak > 64 * MIB {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // What was read is handled by now, give or take a turn.
    for _ in 0..25 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        peak = peak.max(rss().saturating_sub(baseline));
    }
    assert!(
        peak < 8 * MIB,
        "the write buffer grew to ~{} MiB for a peer that does not read (hard cap 128 KiB)",
        peak / MIB
    );
    let reason = within(dispatcher.closed()).await;
    assert!(
        matches!(
            reason,
            Termination::Protocol(channel_dispatcher::ProtocolError::NotReading { .. })
        ),
        "{reason:?}"
    );
    writer.abort();
}

// Regression (found in review). Attacks the read buffer's zero-copy slicing (frame.rs `FrameReader::next_frame`,
// `split_to().freeze()`; envelope.rs `Method::from_frame`): a small request keeps alive the
// whole allocation it was read into. A peer that sends, 64 times, a 1 MiB answer nobody
// waits for (dropped quietly) then a tiny request whose handler runs for long makes each tiny
// request pin ~1 MiB: 64 MiB held for 64 requests of a few bytes each, while
// `max_pending_bytes` is 64 KiB. With the default limits (4096 requests, 16 MiB frames) that
// is 64 GiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_pending_requests_do_not_pin_the_large_frames_read_before_them() {
    let _serial = serial().await;
    let builder = builder(Probe::default()).limits(limits(|l| {
        l.max_frame_length = 2 * MIB;
        l.max_pending_bytes = 64 * KIB;
        l.max_pending_requests = 256;
    }));
    let (dispatcher, mut peer) = RawPeer::connect_with(builder).await;
    let junk = "j".repeat(MIB - 64);
    let baseline = rss();
    for i in 0..64u64 {
        peer.respond(1_000_000 + i, junk.as_str()).await;
        peer.request(i + 1, "hold", &()).await;
    }
    peer.request(10_000, "echo", "done").await;
    let done = peer.read_until(|e| e[1] == 10_000).await;
    assert_eq!(done[3], "done", "{done}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let held = rss().saturating_sub(baseline);
    assert_eq!(dispatcher.running_handlers(), 64);
    assert!(
        held < 16 * MIB,
        "64 pending requests of a few bytes hold ~{} MiB of read buffers",
        held / MIB
    );
}
