//! The middleware pipeline: order, attributes, short-circuits, replies, notifications, tower
//! layers both ways, and the caller-side pipeline.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use channel_dispatcher::middleware::{from_fn, stack_middleware, Middleware, Next, OutgoingCall};
use channel_dispatcher::{
    request, CallError, Channel, Context, Dispatcher, HandlerError, Incoming, Reply, Router,
};
use serde::{Deserialize, Serialize};
use support::{within, Count, Echo};
use tower::Layer;

/// Answers with the attribute `seen` as the handler saw it.
#[derive(Serialize, Deserialize)]
struct Seen;
request!(Seen => Option<String>, "seen");

#[derive(Serialize, Deserialize)]
struct Sleep(u64);
request!(Sleep => (), "sleep");

type Log = Arc<Mutex<Vec<String>>>;

fn router(log: Log) -> Router {
    let handler_log = Arc::clone(&log);
    let notified = Arc::clone(&log);
    Router::new()
        .request(move |_cx: Context, Echo(s)| {
            let log = Arc::clone(&handler_log);
            async move {
                log.lock().unwrap().push("handler".into());
                Ok(s)
            }
        })
        .request(
            |cx: Context, Seen| async move { Ok(cx.attributes().get("seen").map(String::from)) },
        )
        .request(|_cx: Context, Sleep(ms)| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(())
        })
        .notification(move |_cx: Context, Count(n)| {
            let log = Arc::clone(&notified);
            async move {
                log.lock().unwrap().push(format!("notified {n}"));
                Ok(())
            }
        })
}

fn recorder(name: &'static str, log: &Log) -> Arc<dyn Middleware> {
    recording::<Router>(name, log).boxed()
}

/// A middleware (and tower layer) that logs `<name> in` and `<name> out` around the rest.
fn recording<S>(
    name: &'static str,
    log: &Log,
) -> impl Middleware + tower::Layer<S, Service = channel_dispatcher::middleware::Stack<S>> + Clone {
    let log = Arc::clone(log);
    from_fn(move |incoming: Incoming, next: Next| {
        let log = Arc::clone(&log);
        async move {
            log.lock().unwrap().push(format!("{name} in"));
            let reply = next.run(incoming).await;
            log.lock().unwrap().push(format!("{name} out"));
            reply
        }
    })
}

async fn serve<S>(handler: S) -> Dispatcher
where
    S: channel_dispatcher::Service<Incoming, Response = Reply> + Send + Unpin + 'static,
    S::Error: channel_dispatcher::IntoHandlerError,
    S::Future: Send + 'static,
{
    let (a, b) = Channel::pair();
    let server = Dispatcher::builder().handler(handler).spawn(b);
    std::mem::forget(server); // lives as long as the client's connection
    Dispatcher::builder().spawn(a)
}

#[tokio::test]
async fn middlewares_run_in_the_seeds_order() {
    let log = Log::default();
    let stack = stack_middleware(
        router(Arc::clone(&log)),
        [recorder("m1", &log), recorder("m2", &log)],
    );
    let client = serve(stack).await;
    assert_eq!(within(client.request(Echo("x".into()))).await.unwrap(), "x");
    assert_eq!(
        *log.lock().unwrap(),
        ["m1 in", "m2 in", "handler", "m2 out", "m1 out"]
    );
}

#[tokio::test]
async fn middleware_sets_attributes_short_circuits_and_replaces_replies() {
    let log = Log::default();
    let stamp = from_fn(|mut incoming: Incoming, next: Next| async move {
        incoming.attributes_mut().insert("seen", "stamped");
        next.run(incoming).await
    });
    let auth = from_fn(|incoming: Incoming, next: Next| async move {
        if incoming.attributes().get("token") != Some("ok") {
            return Ok(Reply::error(401, "unauthorized"));
        }
        next.run(incoming).await
    });
    let timer = from_fn(|incoming: Incoming, next: Next| async move {
        let started = tokio::time::Instant::now();
        let reply = next.run(incoming).await?;
        Ok(reply.with_attribute("took-us", started.elapsed().as_micros().to_string()))
    });
    let stack = stack_middleware(
        router(Arc::clone(&log)),
        [timer.boxed(), auth.boxed(), stamp.boxed()],
    );
    let client = serve(stack).await;

    let err = within(client.request(Echo("no token".into())))
        .await
        .unwrap_err();
    let remote = err.as_remote().unwrap();
    assert_eq!(
        (remote.code, remote.message.as_str()),
        (401, "unauthorized")
    );
    assert!(log.lock().unwrap().is_empty(), "the handler never ran");

    let seen = within(client.request(Seen).attribute("token", "ok"))
        .await
        .unwrap();
    assert_eq!(
        seen.as_deref(),
        Some("stamped"),
        "set before next, seen by the handler"
    );
    let raw = within(
        client
            .call_raw(
                "echo",
                channel_dispatcher::Codec::default()
                    .encode(&Echo("t".into()))
                    .unwrap(),
            )
            .attribute("token", "ok"),
    )
    .await
    .unwrap();
    assert!(
        raw.attributes.get("took-us").is_some(),
        "set after next, sent back"
    );
}

#[tokio::test]
async fn notifications_pass_through_and_can_be_dropped() {
    let log = Log::default();
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&seen);
    let drop_odd = from_fn(move |incoming: Incoming, next: Next| {
        let counter = Arc::clone(&counter);
        async move {
            if incoming.is_notification() {
                counter.fetch_add(1, Ordering::SeqCst);
                let Count(n) = incoming.decode()?;
                if n % 2 == 1 {
                    return Ok(Reply::nothing());
                }
            }
            next.run(incoming).await
        }
    });
    let client = serve(stack_middleware(
        router(Arc::clone(&log)),
        [drop_odd.boxed()],
    ))
    .await;
    for n in 1..=4 {
        client.notify(Count(n)).await.unwrap();
    }
    within(client.request(Echo("sync".into()))).await.unwrap();
    assert_eq!(seen.load(Ordering::SeqCst), 4);
    assert_eq!(
        *log.lock().unwrap(),
        ["notified 2", "notified 4", "handler"]
    );
}

#[tokio::test(start_paused = true)]
async fn tower_timeout_layer_wraps_the_pipeline() {
    let stack = stack_middleware(router(Log::default()), []);
    let handler = tower::timeout::TimeoutLayer::new(Duration::from_secs(1)).layer(stack);
    let client = serve(handler).await;
    within(client.request(Sleep(10))).await.unwrap();
    let err = client.request(Sleep(5_000)).await.unwrap_err();
    let remote = err.as_remote().expect("an error answer");
    assert!(remote.message.contains("timed out"), "{}", remote.message);
    // A handler's own error keeps its code through the layer's boxed errors.
    let failing =
        tower::timeout::TimeoutLayer::new(Duration::from_secs(1)).layer(Router::new().request(
            |_cx: Context, Echo(_)| async { Err::<String, _>(HandlerError::new(418, "teapot")) },
        ));
    let client = serve(failing).await;
    let err = client.request(Echo("x".into())).await.unwrap_err();
    assert_eq!(err.as_remote().unwrap().code, 418);
}

#[tokio::test(start_paused = true)]
async fn tower_concurrency_limit_layer_bounds_running_handlers() {
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (r, p) = (Arc::clone(&running), Arc::clone(&peak));
    let slow = Router::new().request(move |_cx: Context, Sleep(ms)| {
        let (running, peak) = (Arc::clone(&r), Arc::clone(&p));
        async move {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            running.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        }
    });
    let handler = tower::limit::ConcurrencyLimitLayer::new(2).layer(stack_middleware(slow, []));
    let client = serve(handler).await;
    let calls: Vec<_> = (0..6)
        .map(|_| std::future::IntoFuture::into_future(client.request(Sleep(100))))
        .collect();
    for result in futures_util::future::join_all(calls).await {
        result.unwrap();
    }
    assert_eq!(peak.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_tower_service_can_be_the_handler_inside_a_stack() {
    let upper = tower::service_fn(|incoming: Incoming| async move {
        let Echo(text) = incoming.decode()?;
        Ok::<_, HandlerError>(Reply::value(
            incoming.context().encode(&text.to_uppercase())?,
        ))
    });
    let log = Log::default();
    let client = serve(stack_middleware(upper, [recorder("m", &log)])).await;
    assert_eq!(
        within(client.request(Echo("loud".into()))).await.unwrap(),
        "LOUD"
    );
    assert_eq!(*log.lock().unwrap(), ["m in", "m out"]);
}

#[tokio::test]
async fn outbound_middleware_sees_every_outgoing_message_and_the_answer() {
    let log = Log::default();
    let outbound_log = Arc::clone(&log);
    let stamp = from_fn(move |mut call: OutgoingCall, next: Next<OutgoingCall>| {
        let log = Arc::clone(&outbound_log);
        async move {
            log.lock().unwrap().push(format!("out {}", call.method()));
            call.attributes_mut().insert("seen", "by outbound");
            let answer = next.run(call).await;
            log.lock().unwrap().push(format!(
                "answer error={:?}",
                answer
                    .as_ref()
                    .err()
                    .and_then(|e| e.as_remote())
                    .map(|e| e.code)
            ));
            answer
        }
    });
    let (a, b) = Channel::pair();
    let _server = Dispatcher::builder()
        .handler(router(Log::default()))
        .spawn(b);
    let client = Dispatcher::builder().outbound(stamp).spawn(a);

    let seen = within(client.request(Seen)).await.unwrap();
    assert_eq!(seen.as_deref(), Some("by outbound"));
    let err = within(client.call_raw("nope", Default::default()))
        .await
        .unwrap_err();
    assert_eq!(
        err.as_remote().unwrap().code,
        channel_dispatcher::error::code::METHOD_NOT_FOUND
    );
    client.notify(Count(1)).await.unwrap();
    assert_eq!(
        *log.lock().unwrap(),
        [
            "out seen",
            "answer error=None",
            "out nope",
            "answer error=Some(-32601)",
            "out count",
            "answer error=None"
        ]
    );
}

#[tokio::test]
async fn outbound_middleware_can_refuse_to_send() {
    let refuse = from_fn(|call: OutgoingCall, next: Next<OutgoingCall>| async move {
        if call.method() == "echo" {
            return Err(CallError::Refused {
                code: 451,
                message: "not allowed to ask that".into(),
            });
        }
        next.run(call).await
    });
    let (a, b) = Channel::pair();
    let served = Log::default();
    let _server = Dispatcher::builder()
        .handler(router(Arc::clone(&served)))
        .spawn(b);
    let client = Dispatcher::builder().outbound(refuse).spawn(a);
    match within(client.request(Echo("x".into()))).await {
        Err(CallError::Refused { code, message }) => {
            assert_eq!((code, message.as_str()), (451, "not allowed to ask that"));
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(within(client.request(Seen)).await.unwrap(), None);
    assert!(
        served.lock().unwrap().is_empty(),
        "the refused call never reached the peer"
    );
}

/// Waits for the test to open its gate.
#[derive(Serialize, Deserialize)]
struct Gate;
request!(Gate => (), "gate");

#[tokio::test]
async fn a_concurrency_limit_inside_a_stack_holds_new_handlers_back() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let opened = Arc::clone(&gate);
    let router = Router::new().request(move |_cx: Context, Gate| {
        let gate = Arc::clone(&opened);
        async move {
            gate.acquire().await.unwrap().forget();
            Ok(())
        }
    });
    let log = Log::default();
    // A middleware outside, the limit inside: the stack is ready only when the limit is.
    let handler = stack_middleware(
        tower::limit::ConcurrencyLimitLayer::new(1).layer(router),
        [recorder("outer", &log)],
    );
    let (a, b) = Channel::pair();
    let server = Dispatcher::builder().handler(handler).spawn(b);
    let client = Dispatcher::builder().spawn(a);
    let calls: Vec<_> = (0..3)
        .map(|_| tokio::spawn(std::future::IntoFuture::into_future(client.request(Gate))))
        .collect();
    within(async {
        while server.running_handlers() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    // The others have arrived by now; they wait in admission, not inside the pipeline.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(server.running_handlers(), 1);
    assert_eq!(*log.lock().unwrap(), ["outer in"]);
    gate.add_permits(3);
    for call in calls {
        within(call).await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn from_fn_is_a_tower_layer_that_mixes_with_towers_own() {
    let log = Log::default();
    let handler = tower::ServiceBuilder::new()
        .layer(recording("first", &log))
        .concurrency_limit(4)
        .layer(recording("second", &log))
        .service(router(Arc::clone(&log)));
    let client = serve(handler).await;
    assert_eq!(within(client.request(Echo("x".into()))).await.unwrap(), "x");
    assert_eq!(
        *log.lock().unwrap(),
        [
            "first in",
            "second in",
            "handler",
            "second out",
            "first out"
        ]
    );
}
