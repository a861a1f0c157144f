//! The calling side as a tower `Service`: tower's `Timeout`, `Retry` (retrying only what the
//! peer marked retryable), `RateLimit` and `LoadShed` wrap a dispatcher's outgoing calls, and
//! `poll_ready` reflects its in-flight permits.

mod support;

use std::future::{Future, IntoFuture};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use channel_dispatcher::error::code;
use channel_dispatcher::{
    request, CallError, Channel, Context, Dispatcher, HandlerError, RawCall, Router,
};
use serde::{Deserialize, Serialize};
use support::{within, Echo, Hang};
use tower::retry::Policy;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};

/// Fails with `code` the first `failures` times it is called, then answers the attempt number.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Flaky {
    code: i64,
    failures: usize,
}
request!(Flaky => usize, "flaky");

/// Takes `ms` to answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Slow(u64);
request!(Slow => u64, "slow");

fn server(attempts: Arc<AtomicUsize>) -> Router {
    Router::new()
        .request(|_cx: Context, Echo(s)| async move { Ok(s) })
        .request(|_cx: Context, Hang| std::future::pending::<Result<(), HandlerError>>())
        .request(|_cx: Context, Slow(ms)| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(ms)
        })
        .request(move |_cx: Context, flaky: Flaky| {
            let attempt = attempts.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                match attempt <= flaky.failures {
                    true => Err(HandlerError::new(flaky.code, "not now")),
                    false => Ok(attempt),
                }
            }
        })
}

fn connected(max_in_flight: usize) -> (Dispatcher, Dispatcher, Arc<AtomicUsize>) {
    let attempts = Arc::new(AtomicUsize::new(0));
    let (a, b) = Channel::pair();
    let peer = Dispatcher::builder()
        .handler(server(attempts.clone()))
        .spawn(b);
    let client = Dispatcher::builder().max_in_flight(max_in_flight).spawn(a);
    (client, peer, attempts)
}

/// Retries what the peer marked retryable, after `pause`, at most `left` more times.
#[derive(Clone)]
struct RetryRetryable {
    left: usize,
    pause: Duration,
}

impl<Req: Clone, Res> Policy<Req, Res, CallError> for RetryRetryable {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        _request: &mut Req,
        result: &mut Result<Res, CallError>,
    ) -> Option<Self::Future> {
        match result {
            Err(error) if error.is_retryable() && self.left > 0 => {
                self.left -= 1;
                Some(tokio::time::sleep(self.pause))
            }
            _ => None,
        }
    }

    fn clone_request(&mut self, request: &Req) -> Option<Req> {
        Some(request.clone())
    }
}

#[tokio::test]
async fn a_timeout_layer_bounds_a_call_and_cancels_it_on_the_peer() {
    let (client, peer, _) = connected(16);
    let mut service = ServiceBuilder::new()
        .timeout(Duration::from_millis(100))
        .service(client.service());
    let error = within(service.ready().await.unwrap().call(Hang))
        .await
        .unwrap_err();
    assert!(
        error.is::<tower::timeout::error::Elapsed>(),
        "not a timeout: {error}"
    );
    // The dropped call was cancelled: the peer's handler is gone.
    within(async {
        while peer.running_handlers() != 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_eq!(client.pending_calls(), 0);
}

#[tokio::test]
async fn a_retry_layer_retries_only_what_the_peer_marked_retryable() {
    let (client, _peer, attempts) = connected(16);
    let mut service = ServiceBuilder::new()
        .retry(RetryRetryable {
            left: 5,
            pause: Duration::ZERO,
        })
        .service(client.service());
    let overloaded = Flaky {
        code: code::OVERLOADED,
        failures: 2,
    };
    let answer = within(service.ready().await.unwrap().call(overloaded))
        .await
        .unwrap();
    assert_eq!(answer, 3, "two refusals, then the third attempt ran");

    attempts.store(0, Ordering::SeqCst);
    let failing = Flaky {
        code: -32000,
        failures: 1,
    };
    let error = within(service.ready().await.unwrap().call(failing))
        .await
        .unwrap_err();
    assert!(!error.is_retryable());
    assert_eq!(error.as_remote().map(|e| e.code), Some(-32000));
    assert_eq!(attempts.load(Ordering::SeqCst), 1, "not retried");
}

#[tokio::test(start_paused = true)]
async fn a_rate_limit_layer_spaces_calls_out() {
    let (client, _peer, _) = connected(16);
    let mut service = ServiceBuilder::new()
        .rate_limit(2, Duration::from_millis(100))
        .service(client.service());
    let start = tokio::time::Instant::now();
    for i in 0..10 {
        let text = i.to_string();
        let answer = service
            .ready()
            .await
            .unwrap()
            .call(Echo(text.clone()))
            .await
            .unwrap();
        assert_eq!(answer, text);
    }
    // Two calls per 100 ms: the tenth goes out in the fifth period.
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_millis(400), "{elapsed:?}");
}

#[tokio::test]
async fn a_load_shed_layer_refuses_at_once_while_every_permit_is_taken() {
    let (client, _peer, _) = connected(1);
    let slow = tokio::spawn(client.request(Slow(300)).into_future());
    // The only permit is taken by the slow call.
    within(async {
        while client.pending_calls() != 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let mut service = ServiceBuilder::new().load_shed().service(client.service());
    let shed = within(service.ready().await.unwrap().call(Echo("x".into())))
        .await
        .unwrap_err();
    assert!(
        shed.is::<tower::load_shed::error::Overloaded>(),
        "not shed: {shed}"
    );
    assert_eq!(within(slow).await.unwrap().unwrap(), 300);
    let answer = within(service.ready().await.unwrap().call(Echo("y".into())))
        .await
        .unwrap();
    assert_eq!(answer, "y");
}

#[tokio::test]
async fn poll_ready_holds_a_permit_until_the_call_or_the_drop() {
    let (client, _peer, _) = connected(1);
    let mut first = client.service::<RawCall>();
    let mut second = client.service::<RawCall>();
    assert_eq!(within(poll_once(&mut first)).await, Poll::Ready(true));
    assert_eq!(
        within(poll_once(&mut second)).await,
        Poll::Pending,
        "the one permit is held by the first"
    );
    // A plain request waits too, behind the second service in the permit's queue.
    let mut waiting = Box::pin(client.request(Echo("later".into())).into_future());
    let pending = futures_util::future::poll_fn(|cx| Poll::Ready(waiting.as_mut().poll(cx)));
    assert!(pending.await.is_pending());
    drop(first); // its permit goes to the next in line: the second service
    let payload = client.codec().encode(&"raw").unwrap();
    let answer = within(async {
        second
            .ready()
            .await
            .unwrap()
            .call(RawCall::new("echo", payload))
            .await
    })
    .await
    .unwrap();
    assert_eq!(answer.decode::<String>().unwrap(), "raw");
    assert_eq!(within(waiting).await.unwrap(), "later");
}

/// One `poll_ready`: ready (and whether with success), or pending.
async fn poll_once(service: &mut channel_dispatcher::CallService<RawCall>) -> Poll<bool> {
    futures_util::future::poll_fn(|cx| Poll::Ready(service.poll_ready(cx).map(|r| r.is_ok()))).await
}

#[allow(dead_code)]
fn boxed_errors_convert(error: CallError) -> BoxError {
    error.into()
}

#[allow(dead_code)]
fn assert_service_future_is_send<F: Future + Send>(_: F) {}

#[tokio::test(start_paused = true)]
async fn the_peer_sheds_load_as_retryable_and_the_callers_retry_gets_through() {
    use channel_dispatcher::IntoHandlerError;
    // The handler's side: one call at a time, and shed the rest as overloaded (-32005).
    let handler = ServiceBuilder::new()
        .map_err(
            |error: BoxError| match error.is::<tower::load_shed::error::Overloaded>() {
                true => HandlerError::new(code::OVERLOADED, "busy: try again"),
                false => error.into_handler_error(),
            },
        )
        .load_shed()
        .concurrency_limit(1)
        .service(server(Arc::default()));
    let (a, b) = Channel::pair();
    let _peer = Dispatcher::builder().handler(handler).spawn(b);
    let client = Dispatcher::builder().spawn(a);

    // Without a retry, the second of two concurrent calls is shed.
    let (first, second) = tokio::join!(
        client.request(Slow(100)).into_future(),
        client.request(Slow(100)).into_future()
    );
    let shed = [&first, &second]
        .into_iter()
        .filter(|r| r.as_ref().is_err_and(CallError::is_retryable))
        .count();
    assert_eq!(shed, 1, "{first:?} {second:?}");

    // With one, both get through.
    let service = ServiceBuilder::new()
        .retry(RetryRetryable {
            left: 10,
            pause: Duration::from_millis(50),
        })
        .service(client.service::<Slow>());
    let (first, second) = tokio::join!(
        service.clone().oneshot(Slow(100)),
        service.clone().oneshot(Slow(100))
    );
    assert_eq!((first.unwrap(), second.unwrap()), (100, 100));
}

#[tokio::test(start_paused = true)]
async fn a_rate_limit_on_the_handlers_side_spaces_them_out() {
    let handler = ServiceBuilder::new()
        .rate_limit(2, Duration::from_millis(100))
        .service(server(Arc::default()));
    let (a, b) = Channel::pair();
    let _peer = Dispatcher::builder().handler(handler).spawn(b);
    let client = Dispatcher::builder().spawn(a);
    let start = tokio::time::Instant::now();
    let calls: Vec<_> = (0..10)
        .map(|i| client.request(Echo(i.to_string())).into_future())
        .collect();
    for (i, answer) in futures_util::future::join_all(calls)
        .await
        .into_iter()
        .enumerate()
    {
        assert_eq!(answer.unwrap(), i.to_string());
    }
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_millis(400), "{elapsed:?}");
}

#[tokio::test]
async fn a_ready_service_of_a_stopping_connection_is_no_longer_ready() {
    let (client, _peer, _) = connected(4);
    let mut service = client.service::<RawCall>();
    assert_eq!(within(poll_once(&mut service)).await, Poll::Ready(true));
    let stopping = tokio::spawn({
        let client = client.clone();
        async move { client.stop().await }
    });
    within(async {
        while !client.is_stopping() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    // A balancer that asks now is told to drop this endpoint.
    assert_eq!(within(poll_once(&mut service)).await, Poll::Ready(false));
    within(stopping).await.unwrap();
}
