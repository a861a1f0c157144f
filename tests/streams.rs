//! Remote streams: windowed and pull modes, flow control, release, errors.

mod support;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use channel_dispatcher::{
    request, stream_request, CallError, Channel, Context, Dispatcher, HandlerError, RemoteStream,
    Router, Termination,
};
use futures_util::{stream, StreamExt};
use serde::{Deserialize, Serialize};
use support::{within, Echo};
use tokio::sync::mpsc;

/// The numbers `0..n`.
#[derive(Serialize, Deserialize)]
struct Numbers(u64);
stream_request!(Numbers => u64, "numbers");

/// `n` items, every other one `None`.
#[derive(Serialize, Deserialize)]
struct Sparse(u32);
stream_request!(Sparse => Option<u32>, "sparse");

/// Three items, then an error.
#[derive(Serialize, Deserialize)]
struct Broken;
stream_request!(Broken => u64, "broken");

/// Stores `0..n` in the storage and answers its id (the seed's way).
#[derive(Serialize, Deserialize)]
struct Store(u64);
request!(Store => u64, "store");

/// How many streams the storage holds.
#[derive(Serialize, Deserialize)]
struct Stored;
request!(Stored => usize, "stored");

/// Endless, counting what it produces, signalling when dropped.
#[derive(Serialize, Deserialize)]
struct Endless;
stream_request!(Endless => u64, "endless");

/// Never yields; its handler's stream is stored, and removed again by `Unstore`.
#[derive(Serialize, Deserialize)]
struct Silent;
request!(Silent => u64, "silent");

/// Removes stored stream `0` from the producer's storage.
#[derive(Serialize, Deserialize)]
struct Unstore(u64);
request!(Unstore => bool, "unstore");

#[derive(Clone, Default)]
struct Probe {
    produced: Arc<AtomicU64>,
    dropped: Arc<AtomicUsize>,
    drops: Option<mpsc::UnboundedSender<()>>,
}

struct DropGuard(Probe);

impl Drop for DropGuard {
    fn drop(&mut self) {
        self.0.dropped.fetch_add(1, Ordering::SeqCst);
        if let Some(tx) = &self.0.drops {
            let _ = tx.send(());
        }
    }
}

fn router(probe: Probe) -> Router {
    Router::new()
        .stream(|_cx: Context, Numbers(n)| async move { Ok(stream::iter((0..n).map(Ok))) })
        .stream(|_cx: Context, Sparse(n)| async move {
            Ok(stream::iter((0..n).map(|i| Ok((i % 2 == 0).then_some(i)))))
        })
        .stream(|_cx: Context, Broken| async move {
            let items = (0..3).map(Ok).chain([Err(HandlerError::new(7, "broken"))]);
            Ok(stream::iter(items))
        })
        .request(|cx: Context, Store(n)| async move {
            let streams = cx.streams().ok_or_else(|| HandlerError::internal("gone"))?;
            streams.add(stream::iter((0..n).map(Ok::<_, HandlerError>)))
        })
        .request(|_cx: Context, Echo(s)| async move { Ok(s) })
        .request(|cx: Context, Silent| async move {
            let streams = cx.streams().ok_or_else(|| HandlerError::internal("gone"))?;
            streams.add(stream::pending::<Result<u64, HandlerError>>())
        })
        .request(|cx: Context, Unstore(id)| async move {
            Ok(cx.streams().is_some_and(|s| s.remove(id)))
        })
        .request(|cx: Context, Stored| async move { Ok(cx.streams().map_or(0, |s| s.len())) })
        .stream(move |_cx: Context, Endless| {
            let probe = probe.clone();
            async move {
                let guard = DropGuard(probe.clone());
                let produced = Arc::clone(&probe.produced);
                Ok(stream::iter(0..10_000_000u64).map(move |i| {
                    let _keep = &guard;
                    produced.fetch_add(1, Ordering::SeqCst);
                    Ok(i)
                }))
            }
        })
}

fn peers_with(
    probe: Probe,
    server: impl FnOnce(channel_dispatcher::Builder) -> channel_dispatcher::Builder,
) -> (Dispatcher, Dispatcher) {
    let (a, b) = Channel::pair();
    let server = server(Dispatcher::builder().handler(router(probe.clone()))).spawn(b);
    let client = Dispatcher::builder().handler(router(probe)).spawn(a);
    (client, server)
}

fn peers() -> (Dispatcher, Dispatcher) {
    peers_with(Probe::default(), |b| b)
}

async fn collect<T: serde::de::DeserializeOwned>(
    stream: RemoteStream<T>,
) -> Vec<Result<T, CallError>> {
    within(stream.collect::<Vec<_>>()).await
}

#[tokio::test]
async fn windowed_stream_delivers_every_item_in_order_with_positions() {
    let (client, _server) = peers();
    let mut numbers = client.stream(Numbers(1000)).window(16);
    let mut expected = 0;
    while let Some(item) = within(numbers.next()).await {
        assert_eq!(item.unwrap(), expected);
        assert_eq!(numbers.position(), Some(expected));
        expected += 1;
    }
    assert_eq!(expected, 1000);
    assert!(numbers.next().await.is_none(), "stays ended");
}

#[tokio::test]
async fn pull_mode_is_one_request_per_item_and_gives_the_same_items() {
    let (client, _server) = peers();
    let items = collect(client.stream(Numbers(50)).pull_mode()).await;
    let items: Vec<u64> = items.into_iter().map(Result::unwrap).collect();
    assert_eq!(items, (0..50).collect::<Vec<_>>());
}

#[tokio::test]
async fn the_seeds_model_storage_id_and_a_stream_built_from_it() {
    let (client, _server) = peers();
    for pull in [false, true] {
        let id = within(client.request(Store(20))).await.unwrap();
        let stream: RemoteStream<u64> = if pull {
            RemoteStream::pull(&client, id)
        } else {
            RemoteStream::windowed(&client, id)
        };
        let items: Vec<u64> = collect(stream)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(items, (0..20).collect::<Vec<_>>(), "pull: {pull}");
    }
    // Exhausted streams are released by the producer.
    assert_eq!(within(client.request(Stored)).await.unwrap(), 0);
}

#[tokio::test]
async fn null_like_items_are_ordinary_values_in_both_modes() {
    let (client, _server) = peers();
    for pull in [false, true] {
        let stream = client.stream(Sparse(6));
        let stream = if pull { stream.pull_mode() } else { stream };
        let items: Vec<Option<u32>> = collect(stream)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            items,
            [Some(0), None, Some(2), None, Some(4), None],
            "pull: {pull}"
        );
    }
}

#[tokio::test]
async fn producer_error_is_an_error_item_then_the_end_and_nothing_else_breaks() {
    let (client, _server) = peers();
    let mut other = client.stream(Numbers(100)).window(4);
    assert_eq!(within(other.next()).await.unwrap().unwrap(), 0);
    for pull in [false, true] {
        let stream = client.stream(Broken);
        let stream = if pull { stream.pull_mode() } else { stream };
        let items = collect(stream).await;
        assert_eq!(items.len(), 4, "pull: {pull}");
        for (i, item) in items[..3].iter().enumerate() {
            assert_eq!(*item.as_ref().unwrap(), i as u64);
        }
        let remote = items[3]
            .as_ref()
            .unwrap_err()
            .as_remote()
            .expect("a remote error");
        assert_eq!((remote.code, remote.message.as_str()), (7, "broken"));
    }
    // The other stream and the connection carry on.
    let rest: Vec<u64> = within(other.map(Result::unwrap).collect::<Vec<_>>()).await;
    assert_eq!(rest, (1..100).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_streams_both_directions_at_once_moved_between_tasks() {
    let (client, server) = peers();
    let mut tasks = Vec::new();
    for (side, dispatcher) in [(0u64, &client), (1, &server)] {
        for n in 0..10u64 {
            // Created here, consumed in another task.
            let stream = dispatcher.stream(Numbers(100 + n + side)).window(8);
            tasks.push(tokio::spawn(async move {
                let items: Vec<u64> = stream.map(Result::unwrap).collect().await;
                assert_eq!(items, (0..100 + n + side).collect::<Vec<_>>());
            }));
        }
    }
    for task in tasks {
        within(task).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_bounds_what_the_producer_makes_to_the_window() {
    let probe = Probe::default();
    let (client, _server) = peers_with(probe.clone(), |b| b);
    const WINDOW: u64 = 64;
    let mut endless = client.stream(Endless).window(WINDOW);
    for consumed in 1..=3_000u64 {
        assert_eq!(within(endless.next()).await.unwrap().unwrap(), consumed - 1);
        if consumed % 100 == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await; // a slow reader
        }
        let produced = probe.produced.load(Ordering::SeqCst);
        assert!(
            produced <= consumed + WINDOW,
            "{produced} produced for {consumed} consumed: more than a window ahead"
        );
        assert!(endless.buffered_len() as u64 <= WINDOW);
    }
    assert!(probe.produced.load(Ordering::SeqCst) < 10_000_000);
}

#[tokio::test]
async fn dropping_the_remote_stream_drops_the_producers_stream() {
    let (drops_tx, mut drops) = mpsc::unbounded_channel();
    let probe = Probe {
        drops: Some(drops_tx),
        ..Probe::default()
    };
    let (client, _server) = peers_with(probe.clone(), |b| b);
    let mut endless = client.stream(Endless).window(8);
    assert_eq!(within(endless.next()).await.unwrap().unwrap(), 0);
    drop(endless);
    within(drops.recv()).await.unwrap();
    assert_eq!(within(client.request(Stored)).await.unwrap(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_stream_nobody_consumes_is_released_after_the_idle_time() {
    let (client, _server) = peers_with(Probe::default(), |b| {
        b.stream_idle_timeout(Duration::from_secs(10))
    });
    let id = client.request(Store(5)).await.unwrap();
    assert_eq!(client.request(Stored).await.unwrap(), 1);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(client.request(Stored).await.unwrap(), 0, "released");
    let items = RemoteStream::<u64>::pull(&client, id)
        .collect::<Vec<_>>()
        .await;
    assert!(
        matches!(&items[..], [Err(CallError::Remote(_))]),
        "{items:?}"
    );
}

#[tokio::test]
async fn stop_disposes_local_streams_and_ends_remote_ones_with_terminated() {
    let (drops_tx, mut drops) = mpsc::unbounded_channel();
    let probe = Probe {
        drops: Some(drops_tx),
        ..Probe::default()
    };
    let (client, server) = peers_with(probe, |b| b);
    let mut endless = client.stream(Endless).window(4);
    assert_eq!(within(endless.next()).await.unwrap().unwrap(), 0);
    within(server.stop()).await;
    within(drops.recv()).await.unwrap();
    let rest = within(endless.collect::<Vec<_>>()).await;
    match rest.last() {
        Some(Err(CallError::Terminated(Termination::PeerStopped { .. }))) => {}
        other => panic!("expected the stream to end terminated, got {other:?}"),
    }
}

// issue 14: a MessagePack batch stays encoded until its items are taken; they count as buffered.
#[tokio::test]
async fn items_of_a_batch_not_yet_taken_count_as_buffered() {
    let (client, _server) = peers();
    let id = within(client.request(Store(50))).await.unwrap();
    let mut stream = RemoteStream::<u64>::windowed(&client, id).window(8);
    assert_eq!(within(stream.next()).await.unwrap().unwrap(), 0);
    // The stored stream has every item ready: the first batch takes the whole credit.
    assert_eq!(stream.buffered_len(), 7, "{stream:?}");
    assert_eq!(within(stream.next()).await.unwrap().unwrap(), 1);
    assert_eq!(stream.buffered_len(), 6);
}

#[tokio::test]
async fn window_set_on_a_stream_built_from_an_id_applies() {
    let (client, _server) = peers();
    let id = within(client.request(Store(50))).await.unwrap();
    let mut stream = RemoteStream::<u64>::windowed(&client, id).window(3);
    let mut next = 0;
    while let Some(item) = within(stream.next()).await {
        assert_eq!(item.unwrap(), next);
        assert!(
            stream.buffered_len() < 3,
            "{} buffered",
            stream.buffered_len()
        );
        next += 1;
    }
    assert_eq!(next, 50);
}

// issue 8: a pull left waiting by a stream removed meanwhile is answered, and its place freed
#[tokio::test(start_paused = true)]
async fn a_pull_waiting_on_a_stream_the_producer_removes_is_answered() {
    let (client, _server) = peers_with(Probe::default(), |b| b);
    let id = client.request(Silent).await.unwrap();
    let mut pulled = RemoteStream::<u64>::pull(&client, id);
    let next = tokio::spawn(async move { pulled.next().await });
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(client.request(Unstore(id)).await.unwrap());
    let item = within(next).await.unwrap();
    assert!(matches!(item, Some(Err(CallError::Remote(_)))), "{item:?}");
}

// issue 8: dropping a stream with a pull waiting frees the pull's place in the peer's window
#[tokio::test(start_paused = true)]
async fn dropping_a_pulled_stream_mid_pull_keeps_both_sides_counts_in_step() {
    let mut limits = channel_dispatcher::Limits::default();
    limits.max_pending_requests = 1;
    let (client, _server) = peers_with(Probe::default(), |b| b.limits(limits));
    for _ in 0..3 {
        let id = client.request(Silent).await.unwrap();
        let mut pulled = RemoteStream::<u64>::pull(&client, id);
        assert!(
            tokio::time::timeout(Duration::from_millis(10), pulled.next())
                .await
                .is_err()
        );
        drop(pulled);
        // With the pull counted still, this one would be over the limit of 1 and refused.
        let answer = within(client.request(Echo("after".into()))).await;
        assert_eq!(answer.unwrap(), "after");
    }
}
