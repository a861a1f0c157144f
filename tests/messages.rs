//! Messages, built-in responses, handlers and contexts, over every transport.

mod support;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};

use channel_dispatcher::error::code;
use channel_dispatcher::{
    notification, request, Accepted, Attributes, CallError, Channel, Codec, Context, Dispatcher,
    EnvelopeKind, ErrorHandler, Failed, HandlerError, Incoming, Reply, Router, Service, Success,
    Termination,
};
use serde::{Deserialize, Serialize};
use support::{pair, within, Count, Echo, Transport};

#[derive(Serialize, Deserialize)]
struct Save(String);
request!(Save => Success, "save");

#[derive(Serialize, Deserialize)]
struct Enqueue;
request!(Enqueue => Accepted, "enqueue");

#[derive(Serialize, Deserialize)]
struct Fail;
request!(Fail => (), "fail");

#[derive(Serialize, Deserialize)]
struct Panic;
request!(Panic => (), "panic");

#[derive(Serialize, Deserialize)]
struct Whoami;
request!(Whoami => (Option<u64>, String, Option<String>), "whoami");

/// Asks the peer for `Depth(n - 1)` until 0: nested calls ping-pong between the peers.
#[derive(Serialize, Deserialize)]
struct Depth(u32);
request!(Depth => Vec<String>, "depth");

#[derive(Serialize, Deserialize)]
struct Unrouted;
request!(Unrouted => (), "nobody/handles/this");

#[derive(Serialize, Deserialize)]
struct Explode;
notification!(Explode, "explode");

#[derive(Serialize, Deserialize)]
struct Typo;
notification!(Typo, "no-such-notification");

#[derive(Debug, thiserror::Error)]
#[error("disk full")]
struct DiskFull;

fn router(name: &'static str, notified: Arc<AtomicUsize>) -> Router {
    Router::new()
        .request(|_cx: Context, Echo(s)| async move { Ok(s) })
        .request(|_cx: Context, Save(_)| async { Ok(Success) })
        .request(|_cx: Context, Enqueue| async { Ok(Accepted) })
        .request(|_cx: Context, Fail| async { Err::<(), _>(HandlerError::from(DiskFull)) })
        .request(|_cx: Context, Panic| async {
            if name.len() < 100 {
                panic!("handler blew up");
            }
            Ok::<(), HandlerError>(())
        })
        .request(|cx: Context, Whoami| async move {
            Ok((
                cx.id(),
                cx.method().to_string(),
                cx.attributes().get("tenant").map(String::from),
            ))
        })
        .request(move |cx: Context, Depth(n)| async move {
            let mut trail = if n == 0 {
                Vec::new()
            } else {
                cx.request(Depth(n - 1)).await?
            };
            trail.push(format!("{name}{n}"));
            Ok(trail)
        })
        .notification(move |_cx: Context, Count(n)| {
            let notified = notified.clone();
            async move {
                notified.fetch_add(n as usize, Ordering::SeqCst);
                Ok(())
            }
        })
        .notification(|_cx: Context, Explode| async { Err(HandlerError::internal("boom")) })
        .raw("raw/echo-attributes", |incoming: Incoming| async move {
            let mut reply = Reply::value(incoming.payload().clone());
            for (k, v) in incoming.attributes().iter() {
                reply = reply.with_attribute(format!("echo-{k}"), v);
            }
            Ok(reply)
        })
        .raw("raw/fatal", |_incoming: Incoming| async {
            Ok(Reply::fatal(7, "cannot go on"))
        })
        .raw("raw/error-with-data", |incoming: Incoming| async move {
            let data = incoming.context().encode(&vec![1u8, 2, 3])?;
            Err(HandlerError::new(42, "bad input").with_data(data))
        })
}

async fn peers(transport: Transport) -> (Dispatcher, Dispatcher, Arc<AtomicUsize>) {
    let (a, b) = pair(transport).await;
    let notified = Arc::new(AtomicUsize::new(0));
    let one = Dispatcher::builder()
        .handler(router("a", Arc::default()))
        .spawn(a);
    let two = Dispatcher::builder()
        .handler(router("b", Arc::clone(&notified)))
        .spawn(b);
    (one, two, notified)
}

async fn built_in_responses_arrive_typed(transport: Transport) {
    let (one, _two, _) = peers(transport).await;
    assert_eq!(
        within(one.request(Save("x".into()))).await.unwrap(),
        Success
    );
    assert_eq!(within(one.request(Enqueue)).await.unwrap(), Accepted);
}

async fn error_response_answers_one_call_and_keeps_the_connection(transport: Transport) {
    let (one, two, _) = peers(transport).await;
    let err = within(one.request(Fail)).await.unwrap_err();
    let remote = err.as_remote().expect("a remote error");
    assert_eq!(remote.code, code::INTERNAL_ERROR);
    assert_eq!(remote.message, "disk full");

    let raw = within(one.call_raw("raw/error-with-data", Default::default()))
        .await
        .unwrap_err();
    let remote = raw.as_remote().unwrap();
    assert_eq!((remote.code, remote.message.as_str()), (42, "bad input"));
    assert_eq!(remote.data::<Vec<u8>>().unwrap(), Some(vec![1, 2, 3]));

    assert_eq!(
        within(one.request(Echo("still up".into()))).await.unwrap(),
        "still up"
    );
    assert!(!two.is_stopping());
}

async fn unknown_method_is_an_error_response_and_the_connection_stays(transport: Transport) {
    let (one, _two, _) = peers(transport).await;
    let err = within(one.request(Unrouted)).await.unwrap_err();
    let remote = err.as_remote().unwrap();
    assert_eq!(remote.code, code::METHOD_NOT_FOUND);
    assert!(
        remote.message.contains("nobody/handles/this"),
        "{}",
        remote.message
    );
    assert_eq!(within(one.request(Echo("ok".into()))).await.unwrap(), "ok");
}

async fn panicking_handler_answers_an_error(transport: Transport) {
    let (one, _two, _) = peers(transport).await;
    let err = within(one.request(Panic)).await.unwrap_err();
    let remote = err.as_remote().unwrap();
    assert_eq!(remote.code, code::INTERNAL_ERROR);
    assert!(
        remote.message.contains("handler blew up"),
        "{}",
        remote.message
    );
    assert_eq!(within(one.request(Echo("ok".into()))).await.unwrap(), "ok");
}

async fn fatal_response_terminates_both_sides_with_its_message(transport: Transport) {
    let (one, two, _) = peers(transport).await;
    let err = within(one.call_raw("raw/fatal", Default::default()))
        .await
        .unwrap_err();
    match err {
        CallError::Terminated(Termination::PeerFatal { code, message }) => {
            assert_eq!((code, message.as_str()), (7, "cannot go on"));
        }
        other => panic!("expected a peer fatal, got {other:?}"),
    }
    assert!(matches!(
        within(one.closed()).await,
        Termination::PeerFatal { code: 7, .. }
    ));
    match within(two.closed()).await {
        Termination::LocalFatal { message, .. } => assert_eq!(message, "cannot go on"),
        other => panic!("expected a local fatal, got {other:?}"),
    }
}

async fn failed_notification_handler_is_logged_and_the_connection_carries_on(transport: Transport) {
    let (one, two, notified) = peers(transport).await;
    one.notify(Explode).await.unwrap();
    one.notify(Count(2)).await.unwrap();
    assert_eq!(within(one.request(Echo("up".into()))).await.unwrap(), "up");
    assert!(!one.is_stopping() && !two.is_stopping());
    within(one.stop()).await;
    within(two.closed()).await;
    assert_eq!(notified.load(Ordering::SeqCst), 2);
}

async fn failed_notification_handler_is_fatal_with_the_strict_error_handler(transport: Transport) {
    let (a, b) = pair(transport).await;
    let one = Dispatcher::builder()
        .handler(router("a", Arc::default()))
        .spawn(a);
    let two = Dispatcher::builder()
        .handler(router("b", Arc::default()))
        .error_handler(channel_dispatcher::StrictErrorHandler)
        .spawn(b);
    one.notify(Explode).await.unwrap();
    assert!(matches!(
        within(two.closed()).await,
        Termination::LocalFatal { .. }
    ));
    match within(one.closed()).await {
        Termination::PeerFatal { message, .. } => assert_eq!(message, "boom"),
        other => panic!("expected a peer fatal, got {other:?}"),
    }
}

async fn unknown_notification_is_logged_not_fatal(transport: Transport) {
    let (one, two, notified) = peers(transport).await;
    one.notify(Typo).await.unwrap();
    one.notify(Count(3)).await.unwrap();
    assert_eq!(within(one.request(Echo("up".into()))).await.unwrap(), "up");
    within(one.stop()).await;
    within(two.closed()).await;
    assert_eq!(notified.load(Ordering::SeqCst), 3);
}

async fn notification_is_never_answered(transport: Transport) {
    let (a, b) = pair(transport).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    let one = Dispatcher::builder()
        .on_inbound(move |envelope| log.lock().unwrap().push(envelope.kind))
        .spawn(a);
    let notified = Arc::new(AtomicUsize::new(0));
    let _two = Dispatcher::builder()
        .handler(router("b", Arc::clone(&notified)))
        .spawn(b);
    // A handled notification and an unroutable one: neither may be answered.
    one.notify(Count(1)).await.unwrap();
    one.notify(Typo).await.unwrap();
    // Frames are handled in order: once this answer is back, an answer to either notification
    // would have been seen first.
    within(one.request(Echo("after".into()))).await.unwrap();
    let mut seen = seen.lock().unwrap().clone();
    // The peer gives back notification credit as it starts them: that is no answer.
    seen.retain(|kind| *kind != EnvelopeKind::NotificationCredit);
    assert_eq!(seen, [EnvelopeKind::Response]);
    assert_eq!(notified.load(Ordering::SeqCst), 1);
}

async fn attributes_travel_both_ways(transport: Transport) {
    let (one, _two, _) = peers(transport).await;
    let answer = within(
        one.call_raw(
            "raw/echo-attributes",
            Codec::default().encode("body").unwrap(),
        )
        .attribute("trace-id", "abc")
        .attribute("tenant", "acme"),
    )
    .await
    .unwrap();
    assert_eq!(answer.decode::<String>().unwrap(), "body");
    assert_eq!(answer.attributes.get("echo-trace-id"), Some("abc"));
    assert_eq!(answer.attributes.get("echo-tenant"), Some("acme"));

    let (id, method, tenant) = within(one.request(Whoami).attribute("tenant", "acme"))
        .await
        .unwrap();
    assert!(id.is_some());
    assert_eq!(method, "whoami");
    assert_eq!(tenant.as_deref(), Some("acme"));
}

async fn nested_calls_three_deep_in_both_directions(transport: Transport) {
    let (one, two, _) = peers(transport).await;
    // one -> two(3) -> one(2) -> two(1) -> one(0): each handler waits on the peer while the peer
    // waits on it.
    let trail = within(one.request(Depth(3))).await.unwrap();
    assert_eq!(trail, ["a0", "b1", "a2", "b3"]);
    let trail = within(two.request(Depth(3))).await.unwrap();
    assert_eq!(trail, ["b0", "a1", "b2", "a3"]);
    // Both directions at once.
    let (x, y) = tokio::join!(one.request(Depth(4)), two.request(Depth(4)));
    assert_eq!(x.unwrap().len(), 5);
    assert_eq!(y.unwrap().len(), 5);
}

over_every_transport!(
    built_in_responses_arrive_typed,
    error_response_answers_one_call_and_keeps_the_connection,
    unknown_method_is_an_error_response_and_the_connection_stays,
    panicking_handler_answers_an_error,
    fatal_response_terminates_both_sides_with_its_message,
    failed_notification_handler_is_logged_and_the_connection_carries_on,
    failed_notification_handler_is_fatal_with_the_strict_error_handler,
    unknown_notification_is_logged_not_fatal,
    notification_is_never_answered,
    attributes_travel_both_ways,
    nested_calls_three_deep_in_both_directions,
);

// ===== one transport is enough for these =====

#[tokio::test]
async fn every_codec_carries_requests_and_notifications() {
    for &codec in Codec::all() {
        let (a, b) = channel_dispatcher::Channel::pair();
        let notified = Arc::new(AtomicUsize::new(0));
        let one = Dispatcher::builder().codec(codec).spawn(a);
        let two = Dispatcher::builder()
            .codec(codec)
            .handler(router("b", Arc::clone(&notified)))
            .spawn(b);
        assert_eq!(
            within(one.request(Echo("é\"\\".into()))).await.unwrap(),
            "é\"\\",
            "{codec:?}"
        );
        assert_eq!(
            within(one.request(Depth(0))).await.unwrap(),
            ["b0"],
            "{codec:?}"
        );
        one.notify(Count(5)).await.unwrap();
        let err = within(one.request(Fail)).await.unwrap_err();
        assert_eq!(err.as_remote().unwrap().message, "disk full", "{codec:?}");
        within(one.stop()).await;
        within(two.closed()).await;
        assert_eq!(notified.load(Ordering::SeqCst), 5, "{codec:?}");
    }
}

#[tokio::test]
async fn context_factory_and_extensions_reach_the_handler() {
    #[derive(Clone)]
    struct Tenant(&'static str);

    #[derive(Serialize, Deserialize)]
    struct WhichTenant;
    request!(WhichTenant => String, "which-tenant");

    let (a, b) = channel_dispatcher::Channel::pair();
    let _server = Dispatcher::builder()
        .context_factory(|cx: &mut Context| cx.extensions_mut().insert(Tenant("acme")))
        .handler(
            Router::new().request(|cx: Context, WhichTenant| async move {
                Ok(cx
                    .extensions()
                    .get::<Tenant>()
                    .map_or("none", |t| t.0)
                    .to_string())
            }),
        )
        .spawn(b);
    let client = Dispatcher::builder().spawn(a);
    assert_eq!(within(client.request(WhichTenant)).await.unwrap(), "acme");
}

#[tokio::test]
async fn custom_error_handler_decides_what_failures_become() {
    struct Opaque(Arc<AtomicUsize>);
    impl ErrorHandler for Opaque {
        fn handle_error(&self, failed: Failed<'_>, error: HandlerError) -> Reply {
            self.0.fetch_add(1, Ordering::SeqCst);
            assert_eq!(
                failed.method,
                if error.is_panic() { "panic" } else { "fail" }
            );
            Reply::error(-1, "request failed")
        }
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let (a, b) = channel_dispatcher::Channel::pair();
    let _server = Dispatcher::builder()
        .error_handler(Opaque(Arc::clone(&calls)))
        .handler(router("b", Arc::default()))
        .spawn(b);
    let client = Dispatcher::builder().spawn(a);
    for err in [
        within(client.request(Fail)).await.unwrap_err(),
        within(client.request(Panic)).await.unwrap_err(),
    ] {
        let remote = err.as_remote().unwrap();
        assert_eq!(
            (remote.code, remote.message.as_str()),
            (-1, "request failed")
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// A hand-written tower service: anything with the right types can be the handler.
#[derive(Clone)]
struct Upper;

impl Service<Incoming> for Upper {
    type Response = Reply;
    type Error = HandlerError;
    type Future = Pin<Box<dyn Future<Output = Result<Reply, HandlerError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut TaskContext<'_>) -> Poll<Result<(), HandlerError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, incoming: Incoming) -> Self::Future {
        Box::pin(async move {
            let text: String = incoming.decode()?;
            Ok(Reply::value(
                incoming.context().encode(&text.to_uppercase())?,
            ))
        })
    }
}

#[tokio::test]
async fn any_tower_service_can_be_the_handler() {
    let (a, b) = channel_dispatcher::Channel::pair();
    let _server = Dispatcher::builder().handler(Upper).spawn(b);
    let client = Dispatcher::builder().spawn(a);
    assert_eq!(
        within(client.request(Echo("shout".into()))).await.unwrap(),
        "SHOUT"
    );
}

#[tokio::test]
async fn observer_sees_every_inbound_envelope() {
    let (a, b) = channel_dispatcher::Channel::pair();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    let server = Dispatcher::builder()
        .on_inbound(move |e| {
            log.lock().unwrap().push((
                e.kind,
                e.method.map(String::from),
                e.attributes.and_then(|a| a.get("k").map(String::from)),
            ))
        })
        .handler(router("b", Arc::default()))
        .spawn(b);
    let client = Dispatcher::builder().spawn(a);
    client
        .notify_with(Count(1), Attributes::from_iter([("k", "v")]))
        .await
        .unwrap();
    within(client.request(Echo("x".into()))).await.unwrap();
    within(client.stop()).await;
    within(server.closed()).await;
    let seen = seen.lock().unwrap();
    assert_eq!(
        *seen,
        [
            (
                EnvelopeKind::Notification,
                Some("count".to_string()),
                Some("v".to_string())
            ),
            (EnvelopeKind::Request, Some("echo".to_string()), None),
            (EnvelopeKind::Goodbye, None, None),
        ]
    );
}

/// The same request as two versions of a program declare it: fields in another order, and a
/// field more on the newer side.
mod versions {
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize)]
    pub(super) struct SubOld {
        pub(super) a: i64,
        pub(super) b: i64,
    }
    channel_dispatcher::request!(SubOld => i64, "sub");

    #[derive(Serialize, Deserialize)]
    pub(super) struct SubNew {
        pub(super) b: i64,
        pub(super) a: i64,
        #[serde(default)]
        pub(super) scale: Option<i64>,
    }
    channel_dispatcher::request!(SubNew => i64, "sub");
}

// issue 9, item 1
#[tokio::test]
async fn peers_with_other_versions_of_a_struct_talk_by_field_name() {
    use versions::{SubNew, SubOld};
    let old = Router::new().request(|_cx: Context, SubOld { a, b }| async move { Ok(a - b) });
    let new = Router::new().request(|_cx: Context, sub: SubNew| async move {
        Ok((sub.a - sub.b) * sub.scale.unwrap_or(1))
    });
    let (a, b) = Channel::pair();
    let older = Dispatcher::builder()
        .codec(Codec::MessagePack)
        .handler(old)
        .spawn(a);
    let newer = Dispatcher::builder()
        .codec(Codec::MessagePack)
        .handler(new)
        .spawn(b);
    // The newer side sends its fields in its own order, and one the older side does not know.
    let sub = SubNew {
        b: 3,
        a: 12,
        scale: Some(5),
    };
    assert_eq!(within(newer.request(sub)).await.unwrap(), 9, "not -9");
    // The older side sends no `scale`: the newer side takes the default.
    let sub = SubOld { a: 12, b: 3 };
    assert_eq!(within(older.request(sub)).await.unwrap(), 9);
}

mod state {
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize)]
    pub(super) struct Hit;
    channel_dispatcher::request!(Hit => (String, u64), "hit");

    #[derive(Serialize, Deserialize)]
    pub(super) struct Missing;
    channel_dispatcher::request!(Missing => (), "missing");

    pub(super) struct Counter(pub(super) AtomicU64);
    pub(super) struct Name(pub(super) &'static str);
    pub(super) struct NotGiven;

    use std::sync::atomic::AtomicU64;
}

// issue 9, item 8
#[tokio::test]
async fn handlers_borrow_the_routers_typed_state() {
    use state::{Counter, Hit, Missing, Name, NotGiven};
    use std::sync::atomic::{AtomicU64, Ordering};
    let router = Router::new()
        .with_state(Counter(AtomicU64::new(0)))
        .with_state(Name("router"))
        .request(|cx: Context, Hit| async move {
            let hits = cx.state::<Counter>()?.0.fetch_add(1, Ordering::SeqCst) + 1;
            Ok((cx.state::<Name>()?.0.to_owned(), hits))
        })
        .request(|cx: Context, Missing| async move {
            cx.state::<NotGiven>()?;
            Ok(())
        });
    let (a, b) = Channel::pair();
    let _server = Dispatcher::builder()
        .handler(router.clone())
        // A value a factory attaches to the message wins over the router's.
        .context_factory(|cx: &mut Context| {
            if cx.attributes().get("who").is_some() {
                cx.extensions_mut().insert(Name("message"));
            }
        })
        .spawn(b);
    let client = Dispatcher::builder().spawn(a);
    assert_eq!(
        within(client.request(Hit)).await.unwrap(),
        ("router".to_owned(), 1)
    );
    assert_eq!(
        within(client.request(Hit)).await.unwrap(),
        ("router".to_owned(), 2)
    );
    let mut attributes = Attributes::new();
    attributes.insert("who", "me");
    assert_eq!(
        within(client.request(Hit).attributes(attributes))
            .await
            .unwrap(),
        ("message".to_owned(), 3)
    );
    let err = within(client.request(Missing)).await.unwrap_err();
    let remote = err.as_remote().expect("an error answer");
    assert_eq!(remote.code, code::INTERNAL_ERROR);
    assert!(
        remote.message.contains("NotGiven") && remote.message.contains("Router::with_state"),
        "{remote:?}"
    );
}
