//! A seeded randomized liveness test: two peers under small limits, both calling each other at
//! once with everything mixed (payloads up to the largest frame, nested chains, cancels,
//! timeouts, notifications, streams consumed whole or dropped half way). Every operation must
//! end, with its answer or a typed error, within a bound; afterwards both ledgers and both
//! stream tables are empty.
//!
//! A failure prints the seed; rerun one with `LIVENESS_SEED=<seed> cargo test --test
//! random_liveness`.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use channel_dispatcher::error::code;
use channel_dispatcher::{
    notification, request, stream_request, Builder, CallError, Channel, Context, Dispatcher,
    Limits, Router,
};
use futures_util::future::join_all;
use futures_util::{stream, StreamExt};
use serde::{Deserialize, Serialize};
use support::within;
use tokio::net::UnixStream;

const MAX_FRAME: usize = 256 * 1024;
const OPERATIONS: usize = 400;

#[derive(Serialize, Deserialize)]
struct Echo(String);
request!(Echo => usize, "echo");

/// A chain of nested calls back and forth, `depth` levels, with a pause at the bottom.
#[derive(Serialize, Deserialize)]
struct Chain {
    depth: u32,
    pause_ms: u64,
}
request!(Chain => u32, "chain");

#[derive(Serialize, Deserialize)]
struct Note(u32);
notification!(Note, "note");

#[derive(Serialize, Deserialize)]
struct Numbers {
    count: u32,
    size: usize,
}
stream_request!(Numbers => Vec<u8>, "numbers");

#[derive(Serialize, Deserialize)]
struct Stored;
request!(Stored => usize, "stored");

fn router(notes: Arc<AtomicUsize>) -> Router {
    Router::new()
        .request(|_cx: Context, Echo(text)| async move {
            tokio::task::yield_now().await;
            Ok(text.len())
        })
        .request(|cx: Context, Chain { depth, pause_ms }| async move {
            if depth <= 1 {
                tokio::time::sleep(Duration::from_millis(pause_ms)).await;
                return Ok(1);
            }
            let below = cx.request(Chain {
                depth: depth - 1,
                pause_ms,
            });
            Ok(below.await? + 1)
        })
        .notification(move |_cx: Context, Note(_)| {
            let notes = Arc::clone(&notes);
            async move {
                notes.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .stream(|_cx: Context, Numbers { count, size }| async move {
            let items = (0..count).map(move |i| Ok(vec![i as u8; size]));
            Ok(stream::iter(items).then(|item| async move {
                tokio::task::yield_now().await;
                item
            }))
        })
        .request(|cx: Context, Stored| async move { Ok(cx.streams().map_or(0, |s| s.len())) })
}

fn limited(notes: Arc<AtomicUsize>) -> Builder {
    let mut limits = Limits::default();
    limits.max_frame_length = MAX_FRAME;
    limits.max_pending_requests = 24;
    limits.max_nested_requests = 24;
    limits.max_pending_notifications = 8;
    limits.max_pending_bytes = 1024 * 1024;
    Dispatcher::builder()
        .handler(router(notes))
        .limits(limits)
        .max_concurrent_handlers(3)
        .max_in_flight(16)
        .write_buffer_limit(16 * 1024)
        .stream_window(4)
        .stream_idle_timeout(Duration::from_millis(300))
}

struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A typed end that is not a hang: what a call under random load may fail with.
fn typed(error: &CallError) -> bool {
    match error {
        CallError::Timeout(_) => true,
        // Nested chains deeper than the peer's nested limit are refused at once.
        CallError::Remote(remote) => remote.code == code::OVERLOADED,
        _ => false,
    }
}

/// One random operation from `from` to its peer; returns a description of what went wrong.
async fn operation(from: Dispatcher, seed: u64) -> Result<(), String> {
    let mut random = Random(seed | 1);
    let timeout = match random.below(4) {
        0 => Some(Duration::from_millis(5 + random.below(200))),
        _ => None,
    };
    let cancel_after = (random.below(8) == 0).then(|| Duration::from_millis(random.below(20)));
    let work = async {
        match random.below(10) {
            0..=3 => {
                // Payloads up to the largest frame (minus the envelope around them).
                let size = match random.below(4) {
                    0 => MAX_FRAME - 1024,
                    _ => random.below(64 * 1024) as usize,
                };
                let mut call = from.request(Echo("e".repeat(size)));
                if let Some(t) = timeout {
                    call = call.timeout(t);
                }
                match call.await {
                    Ok(len) if len == size => Ok(()),
                    Ok(len) => Err(format!("echo of {size} bytes answered {len}")),
                    Err(e) if typed(&e) => Ok(()),
                    Err(e) => Err(format!("echo of {size} bytes: {e:?}")),
                }
            }
            4..=5 => {
                let depth = 1 + random.below(4) as u32;
                let pause_ms = random.below(10);
                let mut call = from.request(Chain { depth, pause_ms });
                if let Some(t) = timeout {
                    call = call.timeout(t);
                }
                match call.await {
                    Ok(n) if n == depth => Ok(()),
                    Ok(n) => Err(format!("chain of {depth} answered {n}")),
                    Err(e) if typed(&e) => Ok(()),
                    Err(e) => Err(format!("chain of {depth}: {e:?}")),
                }
            }
            6..=7 => from
                .notify(Note(random.below(100) as u32))
                .await
                .map_err(|e| format!("notify: {e:?}")),
            _ => {
                let count = random.below(40) as u32;
                let size = random.below(4096) as usize;
                let take = random.below(count as u64 + 1) as usize;
                let mut items = from.stream(Numbers { count, size });
                let mut seen = 0;
                while seen < take {
                    match items.next().await {
                        Some(Ok(item)) if item.len() == size => seen += 1,
                        Some(Ok(item)) => return Err(format!("item of {} bytes", item.len())),
                        Some(Err(e)) if typed(&e) => return Ok(()),
                        Some(Err(e)) => return Err(format!("stream: {e:?}")),
                        None if seen == count as usize => break,
                        None => return Err(format!("stream ended after {seen} of {count}")),
                    }
                }
                // Dropped here, whole or half way: the producer is told.
                Ok(())
            }
        }
    };
    match cancel_after {
        // Dropped mid-way: whatever it was doing is cancelled, with nothing to check.
        Some(after) => {
            let _ = tokio::time::timeout(after, work).await;
            Ok(())
        }
        None => work.await,
    }
}

async fn run(seed: u64) {
    let (a, b) = UnixStream::pair().unwrap();
    let notes = Arc::new(AtomicUsize::new(0));
    let one = limited(Arc::clone(&notes)).spawn(Channel::from(a));
    let two = limited(Arc::clone(&notes)).spawn(Channel::from(b));
    let mut random = Random(seed);
    let operations = (0..OPERATIONS).map(|_| {
        let from = if random.below(2) == 0 { &one } else { &two };
        tokio::spawn(operation(from.clone(), random.next()))
    });
    let outcomes = tokio::time::timeout(support::PATIENCE, join_all(operations))
        .await
        .unwrap_or_else(|_| panic!("seed {seed}: an operation hangs"));
    let failures: Vec<String> = outcomes
        .into_iter()
        .filter_map(|outcome| outcome.expect("an operation panicked").err())
        .collect();
    assert!(failures.is_empty(), "seed {seed}: {failures:#?}");

    // Everything drains: no stream stored (those whose opening call was cancelled are
    // released by the idle sweep), then no call pending and no handler running (counters the
    // drivers publish at the end of each turn: read while no call is in flight).
    let drained = tokio::time::timeout(support::PATIENCE, async {
        loop {
            let stored = (
                one.request(Stored).await.unwrap(),
                two.request(Stored).await.unwrap(),
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
            let idle = [&one, &two]
                .iter()
                .all(|d| d.pending_calls() == 0 && d.running_handlers() == 0);
            if stored == (0, 0) && idle {
                break;
            }
        }
    })
    .await;
    assert!(drained.is_ok(), "seed {seed}: the ledgers do not drain");
    one.stop().await;
    within(two.closed()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_mixed_load_in_both_directions_always_ends_and_drains() {
    let seeds: Vec<u64> = match std::env::var("LIVENESS_SEED") {
        Ok(seed) => vec![seed.parse().expect("LIVENESS_SEED is a number")],
        Err(_) => vec![0x9E37_79B9_7F4A_7C15, 0xD1B5_4A32_D192_ED03, 42, 7],
    };
    for seed in seeds {
        run(seed).await;
    }
}
