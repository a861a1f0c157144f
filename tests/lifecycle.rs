//! Lifecycle: start, correlation under load, graceful stop, goodbye, drop. Every case runs over
//! the in-memory pair, a Unix socket and TCP loopback.

mod support;

use std::future::IntoFuture;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use channel_dispatcher::{CallError, Context, Dispatcher, HandlerError, Router, Termination};
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use support::{pair, within, Count, Echo, Hang, Square, Transport};

fn router(counter: Arc<AtomicUsize>) -> Router {
    Router::new()
        .request(|_cx: Context, Echo(s)| async move { Ok(s) })
        .request(|_cx: Context, Square(n)| async move {
            // Answers come back out of order: later requests often finish first.
            tokio::time::sleep(Duration::from_micros((997 * n) % 2000)).await;
            Ok(n * n)
        })
        .request(|_cx: Context, Hang| std::future::pending::<Result<(), HandlerError>>())
        .notification(move |_cx: Context, Count(n)| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(n as usize, Ordering::SeqCst);
                Ok(())
            }
        })
}

type Peers = (Dispatcher, Dispatcher, Arc<AtomicUsize>, Arc<AtomicUsize>);

async fn peers(transport: Transport) -> Peers {
    peers_draining_for(transport, Duration::from_secs(5)).await
}

async fn peers_draining_for(transport: Transport, drain: Duration) -> Peers {
    let (a, b) = pair(transport).await;
    let (count_a, count_b) = (Arc::default(), Arc::default());
    let build = |count: &Arc<AtomicUsize>| {
        Dispatcher::builder()
            .handler(router(Arc::clone(count)))
            .drain_timeout(drain)
    };
    let one = build(&count_a).spawn(a);
    let two = build(&count_b).spawn(b);
    (one, two, count_a, count_b)
}

async fn request_gets_its_response(transport: Transport) {
    let (one, two, ..) = peers(transport).await;
    assert_eq!(within(one.request(Echo("hi".into()))).await.unwrap(), "hi");
    assert_eq!(
        within(two.request(Echo("back".into()))).await.unwrap(),
        "back"
    );
    one.stop().await;
}

async fn thousands_in_flight_both_ways_answered_out_of_order(transport: Transport) {
    let (one, two, ..) = peers(transport).await;
    const N: u64 = 2000;
    let mut calls = FuturesUnordered::new();
    for n in 0..N {
        let (one, two) = (one.clone(), two.clone());
        calls.push(async move { (n, one.request(Square(n)).await) }.boxed());
        calls.push(async move { (n, two.request(Square(n + N)).await.map(|_| n * n)) }.boxed());
    }
    let mut answered = 0;
    while let Some((n, answer)) = within(calls.next()).await {
        assert_eq!(answer.unwrap(), n * n);
        answered += 1;
    }
    assert_eq!(answered, 2 * N);
    one.stop().await;
}

async fn stop_fails_pending_calls_and_runs_on_stop_once(transport: Transport) {
    let (one, two, ..) = peers(transport).await;
    let stops = Arc::new(AtomicUsize::new(0));
    for dispatcher in [&one, &two] {
        let stops = Arc::clone(&stops);
        dispatcher.on_stop(move |_| {
            stops.fetch_add(1, Ordering::SeqCst);
        });
    }
    let pending = tokio::spawn(one.request(Hang).into_future());
    // The call is in flight once the peer has answered a later one.
    within(one.request(Echo("sync".into()))).await.unwrap();

    let reason = within(one.stop()).await;
    assert!(matches!(reason, Termination::Stopped), "{reason:?}");
    let err = within(pending).await.unwrap().unwrap_err();
    assert!(
        matches!(err, CallError::Terminated(Termination::Stopped)),
        "{err:?}"
    );
    assert!(matches!(
        within(two.closed()).await,
        Termination::PeerStopped { .. }
    ));

    // Stopping again, or a call after stop, changes nothing and fails at once.
    within(one.stop()).await;
    let late = one
        .request(Echo("late".into()))
        .into_future()
        .now_or_never();
    assert!(
        matches!(late, Some(Err(CallError::Terminated(Termination::Stopped)))),
        "{late:?}"
    );
    assert!(matches!(
        one.notify(Count(1)).now_or_never(),
        Some(Err(CallError::Terminated(_)))
    ));
    assert_eq!(
        stops.load(Ordering::SeqCst),
        2,
        "each side's on_stop runs exactly once"
    );

    // Registered after the end: runs at once.
    let late_stop = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&late_stop);
    two.on_stop(move |reason| {
        assert!(matches!(reason, Termination::PeerStopped { .. }));
        counter.fetch_add(1, Ordering::SeqCst);
    });
    assert_eq!(late_stop.load(Ordering::SeqCst), 1);
}

async fn stop_flushes_queued_notifications(transport: Transport) {
    let (one, two, _, received) = peers(transport).await;
    for _ in 0..500 {
        one.notify(Count(2)).await.unwrap();
    }
    within(one.stop()).await;
    within(two.closed()).await;
    assert_eq!(received.load(Ordering::SeqCst), 1000);
}

async fn peer_goodbye_fails_our_pending_calls(transport: Transport) {
    // `two` drains for a short while only: its handler for `Hang` never finishes.
    let (one, two, ..) = peers_draining_for(transport, Duration::from_millis(100)).await;
    let pending = tokio::spawn(one.request(Hang).into_future());
    within(one.request(Echo("sync".into()))).await.unwrap();
    assert!(matches!(within(two.stop()).await, Termination::Stopped));
    let err = within(pending).await.unwrap().unwrap_err();
    assert!(
        matches!(err, CallError::Terminated(Termination::PeerStopped { .. })),
        "{err:?}"
    );
    assert!(matches!(
        within(one.closed()).await,
        Termination::PeerStopped { .. }
    ));
}

async fn dropping_every_handle_stops_the_connection(transport: Transport) {
    let (one, two, ..) = peers(transport).await;
    let reason = Arc::new(std::sync::Mutex::new(None));
    let slot = Arc::clone(&reason);
    one.on_stop(move |r| *slot.lock().unwrap() = Some(r.clone()));
    within(one.request(Echo("x".into()))).await.unwrap();
    drop(one);
    assert!(matches!(
        within(two.closed()).await,
        Termination::PeerStopped { .. }
    ));
    // The dropped side's connection ends too, and says why.
    within(async {
        while reason.lock().unwrap().is_none() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(matches!(
        *reason.lock().unwrap(),
        Some(Termination::Dropped)
    ));
}

async fn stop_lets_running_handlers_answer(transport: Transport) {
    let (a, b) = pair(transport).await;
    let (release, gate) = tokio::sync::watch::channel(false);
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let slow = Router::new().request(move |_cx: Context, Echo(s)| {
        let mut gate = gate.clone();
        let started_tx = started_tx.clone();
        async move {
            let _ = started_tx.send(());
            let _ = gate.wait_for(|open| *open).await;
            Ok(s)
        }
    });
    let server = Dispatcher::builder().handler(slow).spawn(b);
    let client = Dispatcher::builder().spawn(a);
    let call = tokio::spawn(client.request(Echo("drained".into())).into_future());
    within(started.recv()).await.unwrap();
    // The server stops while its handler runs; the handler still answers.
    let stopping = tokio::spawn({
        let server = server.clone();
        async move { server.stop().await }
    });
    within(async {
        while !server.is_stopping() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    release.send_replace(true);
    assert_eq!(within(call).await.unwrap().unwrap(), "drained");
    assert!(matches!(
        within(stopping).await.unwrap(),
        Termination::Stopped
    ));
}

over_every_transport!(
    request_gets_its_response,
    thousands_in_flight_both_ways_answered_out_of_order,
    stop_fails_pending_calls_and_runs_on_stop_once,
    stop_flushes_queued_notifications,
    peer_goodbye_fails_our_pending_calls,
    dropping_every_handle_stops_the_connection,
    stop_lets_running_handlers_answer,
);
