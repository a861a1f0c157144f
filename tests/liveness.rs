//! Liveness: large messages both ways, nested calls at the handler limit and a peer that does
//! not read never leave a call unanswered, a `stop()` unfinished or our memory growing.
//!
//! Time is paused in most cases: a deadlock leaves the runtime idle, the clock jumps ahead and
//! the bound trips at once instead of after 20 s of wall time.

mod support;

use std::future::IntoFuture;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use channel_dispatcher::{
    notification, request, Attributes, Builder, CallError, Codec, Context, Dispatcher, Router,
    Termination,
};
use futures_util::future::join_all;
use serde::{Deserialize, Serialize};
use support::raw::RawPeer;
use support::{pair, within, Echo, Transport};
use tokio::sync::oneshot;

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;
/// How long a closing side waits for the peer's end of file after its goodbye (PROTOCOL.md 9).
const LINGER: Duration = Duration::from_secs(2);

/// Answers `Outer(n)` with a nested `Inner(n)` call back to the caller, plus one.
#[derive(Serialize, Deserialize)]
struct Outer(u32);
request!(Outer => u32, "outer");

#[derive(Serialize, Deserialize)]
struct Inner(u32);
request!(Inner => u32, "inner");

/// A chain of nested calls: `depth` 1 is answered at once, any other asks the peer for
/// `depth - 1` and adds one. The padding gives the write buffers something to hold.
#[derive(Serialize, Deserialize)]
struct Chain {
    depth: u32,
    pad: String,
}
request!(Chain => u32, "chain");

/// Makes `calls` nested calls to the peer at once, each with `payload_kib` KiB and a 1 s timeout;
/// answers how many timed out.
#[derive(Serialize, Deserialize)]
struct FanOut {
    calls: usize,
    payload_kib: usize,
}
request!(FanOut => usize, "fan-out");

/// Echoes after a second.
#[derive(Serialize, Deserialize)]
struct Delayed(String);
request!(Delayed => String, "delayed");

/// Sends up to `max` notifications of 64 KiB to the peer, counting each one queued.
#[derive(Serialize, Deserialize)]
struct Flood {
    max: usize,
}
request!(Flood => usize, "flood");

fn router(queued: Arc<AtomicUsize>) -> Router {
    Router::new()
        .request(|_cx: Context, Echo(s)| async move { Ok(s) })
        .request(|_cx: Context, Delayed(s)| async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok(s)
        })
        .request(|cx: Context, Outer(n)| async move { Ok(cx.request(Inner(n)).await? + 1) })
        .request(|_cx: Context, Inner(n)| async move { Ok(n * 2) })
        .request(|cx: Context, Chain { depth, pad }| async move {
            if depth <= 1 {
                return Ok(1);
            }
            let depth = depth - 1;
            Ok(cx.request(Chain { depth, pad }).await? + 1)
        })
        .request(|cx: Context, FanOut { calls, payload_kib }| async move {
            let payload = "n".repeat(payload_kib * KIB);
            let calls = (0..calls).map(|_| {
                cx.request(Echo(payload.clone()))
                    .timeout(Duration::from_secs(1))
                    .into_future()
            });
            let answers = join_all(calls).await;
            let timed_out = answers
                .iter()
                .filter(|answer| matches!(answer, Err(CallError::Timeout(_))))
                .count();
            Ok(timed_out)
        })
        .request(move |cx: Context, Flood { max }| {
            let queued = Arc::clone(&queued);
            async move {
                let payload = "f".repeat(64 * KIB);
                for _ in 0..max {
                    cx.notify(Bulk(payload.clone())).await?;
                    queued.fetch_add(1, Ordering::SeqCst);
                }
                Ok(max)
            }
        })
}

#[derive(Serialize, Deserialize)]
struct Bulk(String);
notification!(Bulk, "bulk");

fn peer_builder() -> Builder {
    Dispatcher::builder().handler(router(Arc::default()))
}

/// Two dispatchers over a Unix socket pair, both with the test router.
async fn unix_peers(
    one: impl FnOnce(Builder) -> Builder,
    two: impl FnOnce(Builder) -> Builder,
) -> (Dispatcher, Dispatcher) {
    let (a, b) = pair(Transport::Unix).await;
    (one(peer_builder()).spawn(a), two(peer_builder()).spawn(b))
}

/// `size` bytes that say which call they belong to.
fn payload(tag: usize, size: usize) -> String {
    let mut text = format!("{tag}:");
    let fill = char::from(b'a' + (tag % 26) as u8);
    text.push_str(&fill.to_string().repeat(size - text.len()));
    text
}

/// `count` echo calls of `size` bytes each from `from`, at once; each answer must be its own
/// payload.
async fn echo_all(from: &Dispatcher, count: usize, size: usize, first_tag: usize) {
    let calls = (first_tag..first_tag + count).map(|tag| {
        let from = from.clone();
        async move { (tag, from.request(Echo(payload(tag, size))).await) }
    });
    for (tag, answer) in join_all(calls).await {
        let answer = answer.unwrap_or_else(|e| panic!("call {tag} failed: {e:?}"));
        assert!(
            answer == payload(tag, size),
            "call {tag} got another payload"
        );
    }
}

async fn concurrent_echoes_are_all_answered(count: usize, size: usize) {
    let (client, _server) = unix_peers(|b| b, |b| b).await;
    within(echo_all(&client, count, size, 0)).await;
}

// issue 8, item 1
#[tokio::test(start_paused = true)]
async fn four_concurrent_256_kib_calls_over_a_unix_socket_are_all_answered() {
    concurrent_echoes_are_all_answered(4, 256 * KIB).await;
}

// issue 8, item 1
#[tokio::test(start_paused = true)]
async fn two_concurrent_1_mib_calls_over_a_unix_socket_are_both_answered() {
    concurrent_echoes_are_all_answered(2, MIB).await;
}

// issue 8, item 1
#[tokio::test(start_paused = true)]
async fn sixteen_concurrent_64_kib_calls_over_a_unix_socket_are_all_answered() {
    concurrent_echoes_are_all_answered(16, 64 * KIB).await;
}

// issue 8, item 1
#[tokio::test(start_paused = true)]
async fn sixty_four_1_mib_calls_each_way_at_once_are_all_answered_intact() {
    let (one, two) = unix_peers(|b| b, |b| b).await;
    within(async { tokio::join!(echo_all(&one, 64, MIB, 0), echo_all(&two, 64, MIB, 1000),) })
        .await;
}

async fn nested_calls_back_to_the_caller_complete(calls: u32, server: fn(Builder) -> Builder) {
    let (client, _server) = unix_peers(|b| b, server).await;
    let outers = (0..calls).map(|n| client.request(Outer(n)).into_future());
    let answers = within(join_all(outers)).await;
    for (n, answer) in (0..calls).zip(answers) {
        assert_eq!(answer.unwrap(), n * 2 + 1);
    }
}

// issue 8, item 2
#[tokio::test(start_paused = true)]
async fn more_calls_than_the_handler_limit_each_calling_back_all_complete() {
    // Default limit: 1024 handlers.
    nested_calls_back_to_the_caller_complete(1100, |b| b).await;
}

// issue 8, item 2
#[tokio::test(start_paused = true)]
async fn calls_that_fill_the_handler_limit_and_call_back_complete() {
    nested_calls_back_to_the_caller_complete(2, |b| b.max_concurrent_handlers(2)).await;
}

// issue 8, item 2
#[tokio::test(start_paused = true)]
async fn chains_of_nested_calls_alternating_sides_at_twice_the_handler_limit_complete() {
    let limited = |b: Builder| b.max_concurrent_handlers(2).write_buffer_limit(16 * KIB);
    let (a, _b) = unix_peers(limited, limited).await;
    let pad = "p".repeat(8 * KIB);
    let chains = (0..4).map(|_| {
        let pad = pad.clone();
        a.request(Chain { depth: 3, pad }).into_future()
    });
    for answer in within(join_all(chains)).await {
        assert_eq!(answer.unwrap(), 3);
    }
}

/// Sends 64 KiB notifications until one has waited 1 s for room (time is paused: only once
/// nothing else can run), then returns how many were taken.
async fn fill_until_blocked(dispatcher: &Dispatcher) -> usize {
    let payload = Codec::default().encode(&"x".repeat(64 * KIB)).unwrap();
    let mut queued = 0;
    loop {
        let notify = dispatcher.notify_raw("bulk", Attributes::new(), payload.clone());
        match tokio::time::timeout(Duration::from_secs(1), notify).await {
            Ok(result) => {
                result.unwrap();
                queued += 1;
                assert!(queued < 200, "{queued} notifications of 64 KiB taken");
            }
            Err(_elapsed) => return queued,
        }
    }
}

// issue 8, item 3
#[tokio::test(start_paused = true)]
async fn stop_returns_within_drain_and_linger_while_the_peer_does_not_read() {
    let drain = Duration::from_millis(100);
    let (dispatcher, _peer) =
        RawPeer::connect_with(peer_builder().drain_timeout(drain).max_in_flight(8)).await;
    fill_until_blocked(&dispatcher).await;
    let started = tokio::time::Instant::now();
    let bound = drain + LINGER + Duration::from_secs(1);
    let stopped = tokio::time::timeout(bound, dispatcher.stop()).await;
    assert!(
        stopped.is_ok(),
        "stop() still waiting after {:?} (drain {drain:?}, linger {LINGER:?}): the peer does not read",
        started.elapsed()
    );
}

// issue 8, item 3
#[tokio::test(start_paused = true)]
async fn dropping_every_handle_ends_the_connection_while_the_peer_does_not_read() {
    let drain = Duration::from_millis(100);
    let (dispatcher, _peer) =
        RawPeer::connect_with(peer_builder().drain_timeout(drain).max_in_flight(8)).await;
    let (stopped_tx, stopped) = oneshot::channel();
    dispatcher.on_stop(move |reason| {
        let _ = stopped_tx.send(reason.clone());
    });
    fill_until_blocked(&dispatcher).await;
    drop(dispatcher);
    let bound = drain + LINGER + Duration::from_secs(1);
    let reason = tokio::time::timeout(bound, stopped)
        .await
        .expect("on_stop has not run: every handle is gone, the connection still runs")
        .unwrap();
    assert!(matches!(reason, Termination::Dropped), "{reason:?}");
}

// issue 8, item 3
#[tokio::test(start_paused = true)]
async fn calls_to_a_peer_that_does_not_read_time_out_even_while_waiting_for_room() {
    let (dispatcher, _peer) = RawPeer::connect_with(peer_builder().max_in_flight(8)).await;
    // Far more than the socket and the write buffer hold, and than the in-flight limit.
    let payload = "c".repeat(256 * KIB);
    let calls: Vec<_> = (0..64)
        .map(|_| {
            let call = dispatcher
                .request(Echo(payload.clone()))
                .timeout(Duration::from_secs(1));
            tokio::spawn(call.into_future())
        })
        .collect();
    let mut results = Vec::new();
    for call in calls {
        let result = tokio::time::timeout(Duration::from_secs(10), call).await;
        results.push(result.map(|joined| joined.unwrap()));
    }
    let hung = results.iter().filter(|result| result.is_err()).count();
    assert_eq!(
        hung, 0,
        "{hung} of 64 calls with a 1 s timeout still waiting after 10 s"
    );
    for result in results {
        let result = result.unwrap();
        assert!(
            matches!(result, Err(CallError::Timeout(_))),
            "expected a timeout, got {result:?}"
        );
    }
}

// issue 8, item 3
#[tokio::test(start_paused = true)]
async fn notifications_from_a_handler_wait_for_room_while_the_peer_does_not_read() {
    let queued = Arc::new(AtomicUsize::new(0));
    let builder = Dispatcher::builder().handler(router(Arc::clone(&queued)));
    let (_dispatcher, mut peer) = RawPeer::connect_with(builder).await;
    // The peer asks for a flood of notifications, then never reads again.
    peer.request(1, "flood", &Flood { max: 1000 }).await;
    // Time is paused: this returns once nothing can run, the handler blocked or done.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let queued = queued.load(Ordering::SeqCst);
    assert!(
        queued < 200,
        "{queued} notifications of 64 KiB taken from a handler for a peer that does not read: memory grows"
    );
}

// issue 8, item 3
#[tokio::test(start_paused = true)]
async fn nested_calls_to_a_peer_that_does_not_read_are_not_kept_after_they_time_out() {
    const CALLS: usize = 1000;
    let (_dispatcher, mut peer) = RawPeer::connect_with(peer_builder()).await;
    peer.request(
        1,
        "fan-out",
        &FanOut {
            calls: CALLS,
            payload_kib: 16,
        },
    )
    .await;
    // Time is paused: once nothing can run, every call has timed out (after 1 s).
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Now the peer reads everything (until nothing more comes): whatever requests arrive were
    // kept for it all along, though their callers gave up.
    let (mut kept, mut answer) = (0, None);
    while let Some(envelope) = peer.read_within(Duration::from_secs(1)).await {
        match envelope[0].as_u64() {
            Some(1) if envelope[2] == "echo" => kept += 1,
            Some(3) if envelope[1] == 1 => answer = Some(envelope),
            _ => {}
        }
    }
    let answer = answer.expect("the fan-out is answered");
    assert_eq!(answer[3], CALLS, "every call timed out: {answer}");
    assert!(
        kept <= 300,
        "{kept} of {CALLS} calls of 16 KiB were kept and sent after they timed out: memory grows"
    );
}

// issue 8: a peer that never reads is cut off with the typed reason
#[tokio::test(start_paused = true)]
async fn a_peer_that_never_reads_is_cut_off_once_the_hard_cap_is_held_past_the_stall_timeout() {
    let stall = Duration::from_secs(5);
    let builder = peer_builder()
        .write_buffer_limit(KIB)
        .write_stall_timeout(stall);
    let (dispatcher, mut peer) = RawPeer::connect_with(builder).await;
    // 20 handlers start while the write buffer is empty, then answer 20 MiB at once to a peer
    // that reads none: over the hard cap (4 KiB + its 16 MiB frames), where the answers may
    // wait no longer than the stall timeout.
    let payload = "r".repeat(MIB);
    for id in 1..=20 {
        peer.request(id, "delayed", &payload).await;
    }
    let started = tokio::time::Instant::now();
    let reason = within(dispatcher.closed()).await;
    match reason {
        Termination::Protocol(channel_dispatcher::ProtocolError::NotReading {
            pending,
            waited,
        }) => {
            assert!(pending > 16 * MIB, "{pending}");
            assert!(waited >= stall, "{waited:?}");
        }
        other => panic!("expected the peer cut off for not reading, got {other:?}"),
    }
    assert!(started.elapsed() < stall + LINGER + Duration::from_secs(1));
    drop(peer);
}

// issue 8: room that a flush makes is used at once, even when nothing else wakes the driver
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_waiting_for_write_room_starts_once_a_large_answer_is_written() {
    let (client, _server) = unix_peers(|b| b, |b| b.write_buffer_limit(KIB)).await;
    // The first answer overfills the server's write buffer (and the socket); the second request
    // waits for room, which only the last write of that answer makes. (How the writes fall is
    // up to the socket: a few rounds make the case come up.)
    for _ in 0..20 {
        let large = client.request(Echo("l".repeat(MIB))).into_future();
        let small = client.request(Echo("s".into())).into_future();
        let (large, small) = within(futures_util::future::join(large, small)).await;
        assert_eq!(large.unwrap().len(), MIB);
        assert_eq!(small.unwrap(), "s");
    }
}
