//! Builder settings at their extremes: every count, size and duration at its largest value
//! works (clamped where the machinery has a smaller maximum) instead of panicking or
//! overflowing.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use channel_dispatcher::{stream_request, Builder, Channel, Context, Dispatcher, Limits, Router};
use futures_util::{stream, StreamExt};
use serde::{Deserialize, Serialize};
use support::{within, Count, Echo, Square};

#[derive(Serialize, Deserialize)]
struct Numbers(u64);
stream_request!(Numbers => u64, "numbers");

fn largest<S>(builder: Builder<S>) -> Builder<S> {
    let mut limits = Limits::default();
    limits.max_frame_length = usize::MAX;
    limits.max_attributes = usize::MAX;
    limits.max_attribute_bytes = usize::MAX;
    limits.max_method_length = usize::MAX;
    limits.max_pending_requests = usize::MAX;
    limits.max_nested_requests = usize::MAX;
    limits.max_pending_notifications = usize::MAX;
    limits.max_pending_bytes = usize::MAX;
    builder
        .limits(limits)
        .max_frame_length(usize::MAX)
        .max_in_flight(usize::MAX)
        .max_queued_bytes(usize::MAX)
        .max_concurrent_handlers(usize::MAX)
        .write_buffer_limit(usize::MAX)
        .max_streams(usize::MAX)
        .stream_window(u64::MAX)
        .handshake_timeout(Duration::MAX)
        .drain_timeout(Duration::MAX)
        .default_timeout(Duration::MAX)
        .write_stall_timeout(Duration::MAX)
        .stream_idle_timeout(Duration::MAX)
}

// issue 9, item 6: `max_in_flight(usize::MAX)` used to panic (a semaphore over its maximum).
#[tokio::test]
async fn every_setting_at_its_largest_value_works() {
    let counted = Arc::new(AtomicU32::new(0));
    let seen = Arc::clone(&counted);
    let router = Router::new()
        .request(|_cx: Context, Square(n)| async move { Ok(n * n) })
        // A nested call back to the caller, through every window at its largest.
        .request(|cx: Context, Echo(s)| async move {
            let n = cx.request(Square(s.len() as u64)).await?;
            Ok(format!("{s}:{n}"))
        })
        .stream(|_cx: Context, Numbers(n)| async move { Ok(stream::iter((0..n).map(Ok))) })
        .notification(move |_cx: Context, Count(n)| {
            seen.fetch_add(n, Ordering::SeqCst);
            async { Ok(()) }
        });
    let (a, b) = Channel::pair();
    let server = largest(Dispatcher::builder().handler(router.clone())).spawn(b);
    let client = within(largest(Dispatcher::builder().handler(router)).connect(a))
        .await
        .unwrap();

    assert_eq!(within(client.request(Square(12))).await.unwrap(), 144);
    assert_eq!(
        within(client.request(Echo("abc".into()))).await.unwrap(),
        "abc:9"
    );
    let items: Vec<u64> = within(client.stream(Numbers(3000)).map(Result::unwrap).collect()).await;
    assert_eq!(items, (0..3000).collect::<Vec<_>>());
    within(client.notify(Count(7))).await.unwrap();
    within(async {
        while counted.load(Ordering::SeqCst) != 7 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    within(client.stop()).await;
    within(server.closed()).await;
}
