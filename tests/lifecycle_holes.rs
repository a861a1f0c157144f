//! Holes in the lifecycle: panics in user hooks, a connection future that is dropped, a
//! producer that panics, a pull left waiting, a handler that stops its own connection, extreme
//! timeouts and a handshake refusal that races the refused side's verdict. In every case the
//! connection ends (or carries on) with every waiter told: `stop()`, `closed()` and `on_stop`
//! complete, calls get an answer or a typed error.

mod support;

use std::future::IntoFuture;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use channel_dispatcher::error::code;
use channel_dispatcher::middleware::{from_fn, Next, OutgoingCall};
use channel_dispatcher::{
    request, stream_request, Builder, Call, CallError, Channel, Context, Dispatcher, ErrorHandler,
    Failed, HandlerError, HandshakeError, Reply, Router, Termination,
};
use futures_util::{stream, FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::json;
use support::raw::{frame, hello, RawPeer, VERSION};
use support::{pair, within, Echo, Hang, Transport};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Three items, then a panic in the producer's stream.
#[derive(Serialize, Deserialize)]
struct Doomed;
stream_request!(Doomed => u64, "doomed");

/// Never yields anything; says when it is polled and when it is dropped.
#[derive(Serialize, Deserialize)]
struct Silent;
stream_request!(Silent => u64, "silent");

/// Its handler asks the peer a nested `Hang`, which never answers.
#[derive(Serialize, Deserialize)]
struct AskHang;
request!(AskHang => (), "ask-hang");

/// Its handler stops its own connection, then answers.
#[derive(Serialize, Deserialize)]
struct StopYourself;
request!(StopYourself => String, "stop-yourself");

#[derive(Clone, Default)]
struct Probe {
    polled: Option<mpsc::UnboundedSender<()>>,
    dropped: Option<mpsc::UnboundedSender<()>>,
}

struct DropSignal(Option<mpsc::UnboundedSender<()>>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        if let Some(dropped) = &self.0 {
            let _ = dropped.send(());
        }
    }
}

fn router(probe: Probe) -> Router {
    Router::new()
        .request(|_cx: Context, Echo(s)| async move { Ok(s) })
        .request(|_cx: Context, Hang| std::future::pending::<Result<(), HandlerError>>())
        .request(|cx: Context, AskHang| async move {
            cx.request(Hang).await?;
            Ok(())
        })
        .stream(|_cx: Context, Doomed| async move {
            let panics = stream::poll_fn(|_| -> Poll<Option<Result<u64, HandlerError>>> {
                panic!("the producer's stream panicked")
            });
            Ok(stream::iter((0..3).map(Ok)).chain(panics))
        })
        .stream(move |_cx: Context, Silent| {
            let probe = probe.clone();
            async move {
                let guard = DropSignal(probe.dropped);
                let polled = probe.polled;
                Ok(stream::poll_fn(move |_| {
                    let _keep = &guard;
                    if let Some(polled) = &polled {
                        let _ = polled.send(());
                    }
                    Poll::<Option<Result<u64, HandlerError>>>::Pending
                }))
            }
        })
        .request(|cx: Context, StopYourself| async move {
            let dispatcher = cx
                .dispatcher()
                .ok_or_else(|| HandlerError::internal("no dispatcher"))?;
            dispatcher.stop().await;
            Ok("stopping".to_string())
        })
}

fn with_router(probe: Probe) -> Builder {
    Dispatcher::builder().handler(router(probe))
}

/// A client and a server over the in-memory pair, both with the test router.
fn peers(client: Builder, server: Builder) -> (Dispatcher, Dispatcher) {
    let (a, b) = Channel::pair();
    (client.spawn(a), server.spawn(b))
}

/// An `on_stop` callback that hands the reason over.
fn on_stop(dispatcher: &Dispatcher) -> oneshot::Receiver<Termination> {
    let (tx, rx) = oneshot::channel();
    dispatcher.on_stop(move |reason| {
        let _ = tx.send(reason.clone());
    });
    rx
}

/// `server` hits a panic in a hook when it gets `trigger`'s message: the message is answered
/// with an error, the next call works, and the server stops as usual.
async fn survives_a_panic_in_a_hook<T: std::fmt::Debug>(
    server: Builder,
    trigger: impl FnOnce(&Dispatcher) -> Call<T>,
) {
    let (client, server) = peers(with_router(Probe::default()), server);
    let stopped = on_stop(&server);
    let answer = within(trigger(&client)).await;
    assert!(
        matches!(answer, Err(CallError::Remote(_))),
        "the message whose hook panicked is not answered with an error: {answer:?}"
    );
    let after = within(client.request(Echo("after".into()))).await;
    assert_eq!(after.unwrap(), "after");
    assert!(matches!(within(server.stop()).await, Termination::Stopped));
    within(server.closed()).await;
    within(stopped).await.expect("on_stop ran");
}

// issue 8, item 11
#[tokio::test(start_paused = true)]
async fn a_panic_in_the_context_factory_is_answered_and_the_connection_survives() {
    let server = with_router(Probe::default()).context_factory(|cx: &mut Context| {
        if cx.attributes().get("panic").is_some() {
            panic!("the context factory panicked");
        }
    });
    survives_a_panic_in_a_hook(server, |client| {
        client
            .request(Echo("boom".into()))
            .attribute("panic", "yes")
    })
    .await;
}

struct PanickingErrorHandler;

impl ErrorHandler for PanickingErrorHandler {
    fn handle_error(&self, _failed: Failed<'_>, _error: HandlerError) -> Reply {
        panic!("the error handler panicked")
    }
}

// issue 8, item 11
#[tokio::test(start_paused = true)]
async fn a_panic_in_the_error_handler_is_answered_and_the_connection_survives() {
    let server = with_router(Probe::default()).error_handler(PanickingErrorHandler);
    survives_a_panic_in_a_hook(server, |client| {
        client.call_raw("no/such/method", Default::default())
    })
    .await;
}

// issue 8, item 11
#[tokio::test(start_paused = true)]
async fn a_panic_in_the_inbound_observer_is_answered_and_the_connection_survives() {
    let server = with_router(Probe::default()).on_inbound(|envelope| {
        if envelope.method == Some("boom") {
            panic!("the inbound observer panicked");
        }
    });
    survives_a_panic_in_a_hook(server, |client| client.call_raw("boom", Default::default())).await;
}

// issue 8, item 11
#[tokio::test(start_paused = true)]
async fn dropping_the_connection_future_unpolled_ends_the_dispatcher() {
    let (a, _b) = Channel::pair();
    let (dispatcher, connection) = Dispatcher::builder().build(a);
    let stopped = on_stop(&dispatcher);
    let mut call = dispatcher.request(Echo("never sent".into())).into_future();
    assert!((&mut call).now_or_never().is_none(), "the call waits");
    drop(connection);
    within(dispatcher.closed()).await;
    let err = within(call).await.unwrap_err();
    assert!(matches!(err, CallError::Terminated(_)), "{err:?}");
    within(stopped).await.expect("on_stop ran");
}

// issue 8, item 11
#[tokio::test(start_paused = true)]
async fn dropping_the_connection_future_while_it_runs_ends_the_dispatcher() {
    let (a, b) = Channel::pair();
    let _server = with_router(Probe::default()).spawn(b);
    let (client, connection) = Dispatcher::builder().build(a);
    let stopped = on_stop(&client);
    let running = tokio::spawn(connection);
    let pending = tokio::spawn(client.request(Hang).into_future());
    // The server answers calls in order of arrival: the hanging call is in flight.
    within(client.request(Echo("sync".into()))).await.unwrap();
    running.abort();
    within(client.closed()).await;
    let err = within(pending).await.unwrap().unwrap_err();
    assert!(matches!(err, CallError::Terminated(_)), "{err:?}");
    within(stopped).await.expect("on_stop ran");
}

// issue 8, item 11
#[tokio::test]
async fn shutting_down_the_runtime_that_drives_the_connection_ends_the_dispatcher() {
    // Real time: the other runtime's progress is not visible to a paused clock.
    let soon = Duration::from_secs(5);
    let other = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (a, b) = Channel::pair();
    let _server = with_router(Probe::default()).spawn(b);
    let (client, connection) = Dispatcher::builder().build(a);
    let stopped = on_stop(&client);
    other.spawn(connection);
    let answer = tokio::time::timeout(soon, client.request(Echo("up".into()))).await;
    assert_eq!(answer.unwrap().unwrap(), "up");
    other.shutdown_background();
    let reason = tokio::time::timeout(soon, stopped)
        .await
        .expect("on_stop has not run after the connection's runtime shut down");
    assert!(reason.is_ok(), "on_stop ran");
    let closed = tokio::time::timeout(soon, client.closed()).await;
    assert!(closed.is_ok(), "closed() still waiting");
}

// issue 8, item 12
#[tokio::test(start_paused = true)]
async fn a_panicking_on_stop_callback_does_not_keep_stop_from_returning() {
    let (client, _server) = peers(with_router(Probe::default()), with_router(Probe::default()));
    let ran = Arc::new(AtomicUsize::new(0));
    let first = Arc::clone(&ran);
    client.on_stop(move |_| {
        first.fetch_add(1, Ordering::SeqCst);
    });
    client.on_stop(|_| panic!("an on_stop callback panicked"));
    let last = on_stop(&client);
    let reason = within(client.stop()).await;
    assert!(matches!(reason, Termination::Stopped), "{reason:?}");
    assert_eq!(ran.load(Ordering::SeqCst), 1);
    within(last)
        .await
        .expect("the callback after the panicking one ran");
}

async fn a_panicking_producer_yields_its_items_then_an_error(pull: bool) {
    let (client, _server) = peers(with_router(Probe::default()), with_router(Probe::default()));
    let doomed = client.stream(Doomed);
    let doomed = if pull { doomed.pull_mode() } else { doomed };
    let items = tokio::time::timeout(Duration::from_secs(5), doomed.collect::<Vec<_>>())
        .await
        .expect("the stream stalls after its producer panicked");
    let ok: Vec<u64> = items
        .iter()
        .filter_map(|item| item.as_ref().ok().copied())
        .collect();
    assert_eq!(ok, [0, 1, 2], "the items made before the panic: {items:?}");
    assert_eq!(items.len(), 4, "{items:?}");
    assert!(matches!(items.last(), Some(Err(_))), "{items:?}");
}

// issue 8, item 13
#[tokio::test(start_paused = true)]
async fn a_windowed_stream_whose_producer_panics_yields_its_items_then_an_error() {
    a_panicking_producer_yields_its_items_then_an_error(false).await;
}

// issue 8, item 13
#[tokio::test(start_paused = true)]
async fn a_pulled_stream_whose_producer_panics_yields_its_items_then_an_error() {
    a_panicking_producer_yields_its_items_then_an_error(true).await;
}

// issue 8, item 14
#[tokio::test(start_paused = true)]
async fn a_pull_left_waiting_does_not_keep_the_producers_stream_after_the_end() {
    let (polled_tx, mut polled) = mpsc::unbounded_channel();
    let (dropped_tx, mut dropped) = mpsc::unbounded_channel();
    let probe = Probe {
        polled: Some(polled_tx),
        dropped: Some(dropped_tx),
    };
    let (client, server) = peers(with_router(Probe::default()), with_router(probe));
    let consumer = tokio::spawn(client.stream(Silent).pull_mode().collect::<Vec<_>>());
    within(polled.recv())
        .await
        .expect("the pull reached the producer");
    within(client.stop()).await;
    within(server.closed()).await;
    tokio::time::timeout(Duration::from_secs(5), dropped.recv())
        .await
        .expect("the producer's stream outlives the connection: a pull still holds it");
    let items = within(consumer).await.unwrap();
    assert!(matches!(items.last(), Some(Err(_))), "{items:?}");
}

// issue 8, item 15
#[tokio::test(start_paused = true)]
async fn a_handler_that_stops_its_own_connection_gets_its_answer_out() {
    let drain = Duration::from_secs(2);
    let (client, server) = peers(
        with_router(Probe::default()),
        with_router(Probe::default()).drain_timeout(drain),
    );
    let started = Instant::now();
    let answer = within(client.request(StopYourself)).await;
    assert_eq!(answer.unwrap(), "stopping", "the handler's answer is lost");
    within(server.closed()).await;
    assert!(
        started.elapsed() < drain,
        "stopped after {:?}: the handler waited for itself until the drain timeout",
        started.elapsed()
    );
}

/// Runs `call` in a task of its own, so that a panic in it shows as a failure with its message.
async fn without_panicking<T: Send + 'static>(
    call: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    match within(tokio::spawn(call)).await {
        Ok(answer) => answer,
        Err(panic) => panic!("the caller panicked: {panic}"),
    }
}

// issue 8, item 16
#[tokio::test(start_paused = true)]
async fn a_call_with_a_timeout_of_duration_max_completes_normally() {
    let (client, _server) = peers(Dispatcher::builder(), with_router(Probe::default()));
    let call = async move {
        client
            .request(Echo("patient".into()))
            .timeout(Duration::MAX)
            .await
    };
    assert_eq!(without_panicking(call).await.unwrap(), "patient");
}

// issue 8, item 16
#[tokio::test(start_paused = true)]
async fn a_default_timeout_of_duration_max_lets_calls_complete_normally() {
    let client = Dispatcher::builder().default_timeout(Duration::MAX);
    let (client, _server) = peers(client, with_router(Probe::default()));
    let call = async move { client.request(Echo("patient".into())).await };
    assert_eq!(without_panicking(call).await.unwrap(), "patient");
}

// issue 8, item 16
#[tokio::test(start_paused = true)]
async fn a_timeout_of_duration_max_through_outbound_middleware_completes_normally() {
    let pass = from_fn(|call: OutgoingCall, next: Next<OutgoingCall>| next.run(call));
    let client = Dispatcher::builder().outbound(pass);
    let (client, _server) = peers(client, with_router(Probe::default()));
    let call = async move {
        client
            .request(Echo("patient".into()))
            .timeout(Duration::MAX)
            .await
    };
    assert_eq!(without_panicking(call).await.unwrap(), "patient");
}

// issue 8, item 16
#[tokio::test(start_paused = true)]
async fn a_calls_timeout_runs_while_it_waits_for_an_in_flight_slot() {
    let client = Dispatcher::builder().max_in_flight(1);
    let (client, _server) = peers(client, with_router(Probe::default()));
    // Takes the only slot, for good.
    let hanging = tokio::spawn(client.request(Hang).into_future());
    let started = Instant::now();
    let waiting = client
        .request(Echo("waits for a slot".into()))
        .timeout(Duration::from_millis(100));
    let result = tokio::time::timeout(Duration::from_secs(10), waiting).await;
    let elapsed = started.elapsed();
    assert!(
        matches!(result, Ok(Err(CallError::Timeout(_)))),
        "expected a timeout after 100 ms, got {result:?} after {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(1),
        "timed out after {elapsed:?}"
    );
    hanging.abort();
}

async fn a_wrong_token_is_reported_as_a_refusal_every_time(transport: Transport) {
    let mut wrong = Vec::new();
    for _ in 0..20 {
        let (a, b) = pair(transport).await;
        let server = Dispatcher::builder().expect_token("right").spawn(a);
        let client = Dispatcher::builder().token("wrong").spawn(b);
        let reason = within(client.closed()).await;
        within(server.closed()).await;
        if !matches!(
            reason,
            Termination::Handshake(HandshakeError::Refused { .. })
        ) {
            wrong.push(reason);
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of 20 refused clients were told something else: {wrong:?}",
        wrong.len()
    );
}

// issue 8, item 18
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_reported_as_a_refusal_every_time_over_unix_sockets() {
    a_wrong_token_is_reported_as_a_refusal_every_time(Transport::Unix).await;
}

// issue 8, item 18
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_reported_as_a_refusal_every_time_over_tcp() {
    a_wrong_token_is_reported_as_a_refusal_every_time(Transport::Tcp).await;
}

// issue 8, item 18
#[tokio::test]
async fn a_refusal_that_arrives_before_our_verdict_is_written_is_reported_as_a_refusal() {
    let (ours, theirs) = tokio::net::UnixStream::pair().unwrap();
    let client = Dispatcher::builder().spawn(Channel::from(ours));
    let mut server = RawPeer::new(theirs);
    assert_eq!(&server.read_frame().await.unwrap()[..4], b"CHDP");
    // The server's hello and its refusal at once, then it closes: the client's own verdict
    // finds nobody to read it, and the refusal waits in the client's socket.
    let mut refusal = vec![1];
    refusal.extend_from_slice(b"the peer's authentication token was missing or wrong");
    let mut bytes = frame(&hello(VERSION, "msgpack"));
    bytes.extend(frame(&refusal));
    server.send_raw(&bytes).await;
    drop(server);
    match within(client.closed()).await {
        Termination::Handshake(HandshakeError::Refused { reason }) => {
            assert!(reason.contains("token"), "{reason}")
        }
        other => panic!("expected the refusal, got {other:?}"),
    }
}

// issue 8, item 3: stop() returns whatever the peer does, also before the handshake is done
#[tokio::test(start_paused = true)]
async fn stop_during_the_handshake_with_a_silent_peer_returns_within_the_drain_timeout() {
    let drain = Duration::from_millis(200);
    let (ours, _silent) = tokio::net::UnixStream::pair().unwrap();
    let client = Dispatcher::builder()
        .drain_timeout(drain)
        .spawn(Channel::from(ours));
    let call = tokio::spawn(client.request(Echo("never".into())).into_future());
    let started = tokio::time::Instant::now();
    let reason = within(client.stop()).await;
    assert!(matches!(reason, Termination::Stopped), "{reason:?}");
    assert!(
        started.elapsed() <= drain,
        "stop() waited {:?} for a handshake that never comes (the handshake timeout is 10 s)",
        started.elapsed()
    );
    let err = within(call).await.unwrap().unwrap_err();
    assert!(matches!(err, CallError::Terminated(_)), "{err:?}");
}

// issue 8, item 3: dropping every handle ends the connection, also before the handshake
#[tokio::test(start_paused = true)]
async fn dropping_every_handle_during_the_handshake_ends_the_connection() {
    let drain = Duration::from_millis(200);
    let (ours, _silent) = tokio::net::UnixStream::pair().unwrap();
    let client = Dispatcher::builder()
        .drain_timeout(drain)
        .spawn(Channel::from(ours));
    let stopped = on_stop(&client);
    let started = tokio::time::Instant::now();
    drop(client);
    let reason = within(stopped).await.expect("on_stop ran");
    assert!(matches!(reason, Termination::Dropped), "{reason:?}");
    assert!(started.elapsed() <= drain, "{:?}", started.elapsed());
}

// issue 8, item 17: a handler failing because its nested call timed out on the inherited
// deadline answers the deadline error, which its caller reads as its own timeout
#[tokio::test(start_paused = true)]
async fn a_handler_whose_nested_call_timed_out_answers_the_deadline_error() {
    let (_dispatcher, mut peer) = RawPeer::connect_with(with_router(Probe::default())).await;
    // The raw peer's request with a 100 ms deadline; its handler asks back, nested.
    peer.send(&(
        1u8,
        9u64,
        "ask-hang",
        support::raw::NoAttributes::new(),
        100_000u64,
        0u64,
        (),
    ))
    .await;
    let nested = peer.read().await;
    assert_eq!(
        (&nested[0], &nested[2], &nested[5]),
        (&json!(1), &json!("hang"), &json!(9))
    );
    // Never answered: the nested call times out with the inherited deadline.
    let answer = peer.read_until(|e| e[0] != 6).await;
    assert_eq!((&answer[0], &answer[1]), (&json!(4), &json!(9)), "{answer}");
    assert_eq!(answer[3], code::DEADLINE_EXCEEDED, "{answer}");
}
