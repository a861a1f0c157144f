//! Cancellation, deadlines, backpressure, limits and graceful stop with a deadline.

mod support;

use std::future::IntoFuture;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use channel_dispatcher::{
    request, Attributes, CallError, Channel, Context, Dispatcher, Limit, LimitExceeded, Limits,
    Router, Termination,
};
use futures_util::FutureExt;
use serde::{Deserialize, Serialize};
use support::{within, Echo};
use tokio::sync::{mpsc, watch};

/// Runs until dropped, and says so: the handler of `Slow`.
#[derive(Serialize, Deserialize)]
struct Slow;
request!(Slow => (), "slow");

/// Answers with the time its handler has left, in milliseconds.
#[derive(Serialize, Deserialize)]
struct Remaining;
request!(Remaining => Option<u64>, "remaining");

/// Asks the peer for `Remaining` from inside a handler.
#[derive(Serialize, Deserialize)]
struct AskRemaining;
request!(AskRemaining => Option<u64>, "ask-remaining");

/// Waits for the gate to open, then answers.
#[derive(Serialize, Deserialize)]
struct Gated(u32);
request!(Gated => u32, "gated");

/// Signals from the handlers to the test.
#[derive(Clone)]
struct Probe {
    started: mpsc::UnboundedSender<&'static str>,
    dropped: mpsc::UnboundedSender<&'static str>,
    gate: watch::Receiver<bool>,
    gated: Arc<AtomicUsize>,
}

struct DropSignal(mpsc::UnboundedSender<&'static str>, &'static str);

impl Drop for DropSignal {
    fn drop(&mut self) {
        let _ = self.0.send(self.1);
    }
}

struct Probes {
    started: mpsc::UnboundedReceiver<&'static str>,
    dropped: mpsc::UnboundedReceiver<&'static str>,
    gate: watch::Sender<bool>,
    gated: Arc<AtomicUsize>,
}

fn probe() -> (Probe, Probes) {
    let (started_tx, started) = mpsc::unbounded_channel();
    let (dropped_tx, dropped) = mpsc::unbounded_channel();
    let (gate, gate_rx) = watch::channel(false);
    let gated = Arc::new(AtomicUsize::new(0));
    (
        Probe {
            started: started_tx,
            dropped: dropped_tx,
            gate: gate_rx,
            gated: Arc::clone(&gated),
        },
        Probes {
            started,
            dropped,
            gate,
            gated,
        },
    )
}

fn router(probe: Probe) -> Router {
    let slow = probe.clone();
    let gated = probe.clone();
    Router::new()
        .request(|_cx: Context, Echo(s)| async move { Ok(s) })
        .request(move |cx: Context, Slow| {
            let probe = slow.clone();
            async move {
                let _guard = DropSignal(probe.dropped.clone(), "slow");
                // Work handed to another task watches for the end of the request.
                let watcher = probe.dropped.clone();
                tokio::spawn(async move {
                    cx.cancelled().await;
                    let _ = watcher.send("context cancelled");
                });
                let _ = probe.started.send("slow");
                std::future::pending::<()>().await;
                Ok(())
            }
        })
        .request(|cx: Context, Remaining| async move {
            Ok(cx.remaining().map(|d| d.as_millis() as u64))
        })
        .request(|cx: Context, AskRemaining| async move { Ok(cx.request(Remaining).await?) })
        .request(move |_cx: Context, Gated(n)| {
            let probe = gated.clone();
            async move {
                probe.gated.fetch_add(1, Ordering::SeqCst);
                let _ = probe.started.send("gated");
                let mut gate = probe.gate.clone();
                let _ = gate.wait_for(|open| *open).await;
                Ok(n)
            }
        })
}

/// A client (plain) and a server (with the probe's router), configured by `server`.
fn peers(
    server: impl FnOnce(channel_dispatcher::Builder) -> channel_dispatcher::Builder,
    client: impl FnOnce(channel_dispatcher::Builder) -> channel_dispatcher::Builder,
) -> (Dispatcher, Dispatcher, Probes) {
    let (a, b) = Channel::pair();
    let (probe, probes) = probe();
    let server = server(Dispatcher::builder().handler(router(probe.clone()))).spawn(b);
    let client = client(Dispatcher::builder().handler(router(probe))).spawn(a);
    (client, server, probes)
}

async fn until(mut condition: impl FnMut() -> bool) {
    within(async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
}

#[tokio::test]
async fn dropping_a_call_cancels_the_handler_on_the_peer() {
    let (client, server, mut probes) = peers(|b| b, |b| b);
    let call = tokio::spawn(client.request(Slow).into_future());
    assert_eq!(within(probes.started.recv()).await, Some("slow"));
    call.abort();
    let mut seen = vec![
        within(probes.dropped.recv()).await.unwrap(),
        within(probes.dropped.recv()).await.unwrap(),
    ];
    seen.sort_unstable();
    assert_eq!(seen, ["context cancelled", "slow"]);
    until(|| server.running_handlers() == 0 && client.pending_calls() == 0).await;
    assert_eq!(
        within(client.request(Echo("up".into()))).await.unwrap(),
        "up"
    );
}

#[tokio::test]
async fn cancel_is_matched_against_the_right_direction() {
    // Both sides have request id 1 in flight at once, each to the other.
    let (client, server, mut probes) = peers(|b| b, |b| b);
    let from_client = tokio::spawn(client.request(Slow).into_future());
    assert_eq!(within(probes.started.recv()).await, Some("slow"));
    let from_server = tokio::spawn(server.request(Gated(7)).into_future());
    assert_eq!(within(probes.started.recv()).await, Some("gated"));

    // The client gives up on its id 1: the server drops its handler of the client's id 1 and
    // keeps its own call with id 1.
    from_client.abort();
    assert_eq!(within(probes.dropped.recv()).await.map(|_| ()), Some(()));
    probes.gate.send_replace(true);
    assert_eq!(within(from_server).await.unwrap().unwrap(), 7);
}

#[tokio::test]
async fn late_answer_to_a_cancelled_call_is_dropped_quietly() {
    let (client, _server, mut probes) = peers(|b| b, |b| b);
    let call = tokio::spawn(client.request(Gated(1)).into_future());
    assert_eq!(within(probes.started.recv()).await, Some("gated"));
    call.abort();
    let _ = call.await;
    // The handler was dropped by the cancel; a racing answer, if any, is dropped by the caller.
    probes.gate.send_replace(true);
    assert_eq!(within(client.request(Gated(2))).await.unwrap(), 2);
    until(|| client.pending_calls() == 0).await;
    assert!(!client.is_stopping());
}

#[tokio::test(start_paused = true)]
async fn caller_timeout_fails_the_call_and_stops_the_peer_handler() {
    let (client, server, mut probes) = peers(|b| b, |b| b.default_timeout(Duration::from_secs(3)));
    let err = client.request(Slow).await.unwrap_err();
    assert!(
        matches!(err, CallError::Timeout(d) if d == Duration::from_secs(3)),
        "{err:?}"
    );
    assert!(probes.dropped.recv().await.is_some());
    until(|| server.running_handlers() == 0).await;

    // A per-call timeout overrides the default.
    let err = client
        .request(Slow)
        .timeout(Duration::from_millis(10))
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::Timeout(d) if d == Duration::from_millis(10)));
}

#[tokio::test(start_paused = true)]
async fn handler_past_the_callers_deadline_is_stopped_by_the_peer_itself() {
    // The call's future stays alive (no cancel is sent); the deadline alone stops the handler.
    let (client, _server, mut probes) = peers(|b| b, |b| b);
    let call = client
        .request(Slow)
        .timeout(Duration::from_secs(2))
        .into_future();
    let call = tokio::spawn(async move {
        // Outlive the timeout without ever polling the call again.
        let mut call = Box::pin(call);
        assert!((&mut call).now_or_never().is_none());
        tokio::time::sleep(Duration::from_secs(10)).await;
        drop(call);
    });
    assert_eq!(probes.started.recv().await, Some("slow"));
    let started = tokio::time::Instant::now();
    let first = probes.dropped.recv().await.unwrap();
    let second = probes.dropped.recv().await.unwrap();
    assert!([first, second].contains(&"slow"));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(10),
        "stopped after {waited:?}: by the deadline, before any cancel"
    );
    call.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn nested_calls_inherit_the_deadline() {
    let (client, _server, _probes) = peers(|b| b, |b| b);
    let left = client
        .request(AskRemaining)
        .timeout(Duration::from_secs(5))
        .await
        .unwrap()
        .expect("the nested call carries a deadline");
    assert!(left <= 5000, "{left} ms");
    assert_eq!(
        client.request(Remaining).await.unwrap(),
        None,
        "no timeout, no deadline"
    );
}

#[tokio::test(start_paused = true)]
async fn calls_beyond_max_in_flight_wait_for_a_slot() {
    let (client, server, mut probes) = peers(|b| b, |b| b.max_in_flight(2));
    let first = tokio::spawn(client.request(Gated(1)).into_future());
    let second = tokio::spawn(client.request(Gated(2)).into_future());
    for _ in 0..2 {
        assert_eq!(probes.started.recv().await, Some("gated"));
    }
    let third = tokio::spawn(client.request(Gated(3)).into_future());
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        probes.gated.load(Ordering::SeqCst),
        2,
        "the third call waits for a slot"
    );
    assert_eq!(server.running_handlers(), 2);
    probes.gate.send_replace(true);
    for (call, n) in [(first, 1), (second, 2), (third, 3)] {
        assert_eq!(call.await.unwrap().unwrap(), n);
    }
}

#[tokio::test(start_paused = true)]
async fn handler_limit_pauses_reading() {
    let (client, server, mut probes) = peers(|b| b.max_concurrent_handlers(1), |b| b);
    let first = tokio::spawn(client.request(Gated(1)).into_future());
    let second = tokio::spawn(client.request(Gated(2)).into_future());
    assert_eq!(probes.started.recv().await, Some("gated"));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        probes.gated.load(Ordering::SeqCst),
        1,
        "the second request is not read yet"
    );
    assert_eq!(server.running_handlers(), 1);
    probes.gate.send_replace(true);
    assert_eq!(first.await.unwrap().unwrap(), 1);
    assert_eq!(second.await.unwrap().unwrap(), 2);
}

#[tokio::test]
async fn a_handler_that_never_returns_does_not_block_other_calls() {
    let (client, _server, mut probes) = peers(|b| b, |b| b);
    let _hanging = tokio::spawn(client.request(Slow).into_future());
    assert_eq!(within(probes.started.recv()).await, Some("slow"));
    for i in 0..100 {
        let answer = within(client.request(Echo(i.to_string()))).await.unwrap();
        assert_eq!(answer, i.to_string());
    }
}

#[tokio::test(start_paused = true)]
async fn stop_drops_handlers_still_running_after_the_drain_timeout() {
    let (client, server, mut probes) = peers(|b| b.drain_timeout(Duration::from_secs(2)), |b| b);
    let call = tokio::spawn(client.request(Slow).into_future());
    assert_eq!(probes.started.recv().await, Some("slow"));
    let started = tokio::time::Instant::now();
    assert!(matches!(server.stop().await, Termination::Stopped));
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "the handler had its drain time"
    );
    assert!(probes.dropped.recv().await.is_some());
    let err = call.await.unwrap().unwrap_err();
    assert!(
        matches!(err, CallError::Terminated(Termination::PeerStopped { .. })),
        "{err:?}"
    );
    assert!(matches!(
        client.closed().await,
        Termination::PeerStopped { .. }
    ));
}

#[tokio::test]
async fn each_limit_breach_is_a_typed_error_naming_the_limit() {
    // The receiver's limits, announced in the handshake, are what the sender checks against.
    let mut limits = Limits::default();
    limits.max_attributes = 2;
    limits.max_attribute_bytes = 32;
    limits.max_method_length = 8;
    limits.max_frame_length = 1024;
    let (client, _server, _probes) = peers(|b| b.limits(limits), |b| b);
    within(client.request(Echo("ready".into()))).await.unwrap(); // the peer's limits are known

    let breach = |err: CallError| match err {
        CallError::Limit(LimitExceeded { limit, value, max }) => (limit, value, max),
        other => panic!("expected a limit error, got {other:?}"),
    };
    let err = client
        .call_raw("a/very/long/method", Default::default())
        .await
        .unwrap_err();
    assert_eq!(breach(err), (Limit::MethodLength, 18, 8));
    let three: Attributes = [("a", "1"), ("b", "2"), ("c", "3")].into_iter().collect();
    let err = client
        .request(Echo("x".into()))
        .attributes(three)
        .await
        .unwrap_err();
    assert_eq!(breach(err), (Limit::Attributes, 3, 2));
    let err = client
        .request(Echo("x".into()))
        .attribute("k", "v".repeat(40))
        .await
        .unwrap_err();
    assert_eq!(breach(err), (Limit::AttributeBytes, 41, 32));
    let err = client.request(Echo("x".repeat(2000))).await.unwrap_err();
    let (limit, value, max) = breach(err);
    assert_eq!((limit, max), (Limit::FrameLength, 1024));
    assert!(value > 2000);

    let err = client
        .call_raw("a/very/long/method", Default::default())
        .await
        .unwrap_err();
    // One line says it all, and nothing of it again in a source.
    assert_eq!(
        err.to_string(),
        "the message is over the peer's limits (nothing was sent): method name length in bytes \
         is 18, over the limit of 8"
    );
    assert!(std::error::Error::source(&err).is_none());
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_stops_reading_makes_senders_wait_instead_of_growing_memory() {
    use tokio::io::AsyncWriteExt;
    let (ours, mut theirs) = tokio::net::UnixStream::pair().unwrap();
    let client = Dispatcher::builder()
        .max_in_flight(8)
        .spawn(Channel::from(ours));
    // The peer completes the handshake by writing, then never reads a byte.
    let hello = support::raw::frame(&support::raw::hello(support::raw::VERSION, "msgpack"));
    theirs.write_all(&hello).await.unwrap();
    theirs.write_all(&support::raw::frame(&[0])).await.unwrap();

    let payload = channel_dispatcher::Codec::default()
        .encode(&"x".repeat(64 * 1024))
        .unwrap();
    let mut queued = 0;
    loop {
        let notify = client.notify_raw("bulk", Attributes::new(), payload.clone());
        match tokio::time::timeout(Duration::from_secs(1), notify).await {
            Ok(result) => {
                result.unwrap();
                queued += 1;
                assert!(
                    queued < 200,
                    "{queued} notifications of 64 KiB taken: memory grows"
                );
            }
            Err(_elapsed) => break,
        }
    }
    // Bounded by the in-flight limit, the write buffer's high-water mark and the socket's buffers.
    assert!(queued >= 8, "only {queued} queued");
    drop(theirs);
}

#[derive(Serialize, Deserialize)]
struct Tagged(u64);
request!(Tagged => u64, "tagged");

fn tagged_router() -> Router {
    Router::new().request(|_cx: Context, Tagged(n)| async move {
        for _ in 0..n % 3 {
            tokio::task::yield_now().await;
        }
        Ok(n)
    })
}

/// `total` calls with at most `window` in flight; about one in ten is cancelled after it was
/// sent. Every other call must get exactly its own answer. Returns how many were cancelled.
async fn load(dispatcher: Dispatcher, total: u64, window: usize, mut seed: u64) -> u64 {
    use futures_util::stream::{FuturesUnordered, StreamExt};
    let mut random = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut in_flight = FuturesUnordered::new();
    let mut cancelled = 0;
    for n in 0..total {
        let tag = (n << 8) | (random() % 256);
        let mut call = dispatcher.request(Tagged(tag)).into_future();
        if random() % 10 == 0 {
            // Sent (polled once), then dropped: a cancel follows it on the wire.
            assert!(matches!((&mut call).now_or_never(), None | Some(Ok(_))));
            cancelled += 1;
            continue;
        }
        in_flight.push(call.map(move |answer| (tag, answer)));
        if in_flight.len() == window {
            let (tag, answer) = in_flight.next().await.unwrap();
            assert_eq!(answer.unwrap(), tag, "a call got another call's answer");
        }
    }
    while let Some((tag, answer)) = in_flight.next().await {
        assert_eq!(answer.unwrap(), tag, "a call got another call's answer");
    }
    cancelled
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_with_random_cancellation_in_both_directions() {
    let (a, b) = Channel::pair();
    let one = Dispatcher::builder().handler(tagged_router()).spawn(a);
    let two = Dispatcher::builder().handler(tagged_router()).spawn(b);
    let (left, right) = within(async {
        tokio::join!(
            tokio::spawn(load(one.clone(), 50_000, 1024, 0x9E37_79B9)),
            tokio::spawn(load(two.clone(), 50_000, 1024, 0x7F4A_7C15)),
        )
    })
    .await;
    let cancelled = left.unwrap() + right.unwrap();
    assert!(
        (5_000..15_000).contains(&cancelled),
        "{cancelled} of 100000 cancelled"
    );
    // Every ledger drains: no call left pending, no handler left running.
    until(|| {
        [&one, &two]
            .iter()
            .all(|d| d.pending_calls() == 0 && d.running_handlers() == 0)
    })
    .await;
}
