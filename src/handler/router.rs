use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use crate::context::{Context, Extensions};
use crate::error::HandlerError;
use crate::handler::{Incoming, Reply};
use crate::hash::SeededState;
use crate::message::{Notification, Request, StreamRequest};

type BoxFuture = Pin<Box<dyn Future<Output = Result<Reply, HandlerError>> + Send>>;
type Route = Box<dyn Fn(Incoming) -> BoxFuture + Send + Sync>;

/// Maps method names to async handlers: the usual handler of a dispatcher.
///
/// Typed routes decode the payload into the message type and encode the answer; raw routes see
/// the [`Incoming`] as it is. A method without a route fails with
/// [`HandlerError::is_unknown_method`], which the [`ErrorHandler`](crate::ErrorHandler) turns
/// into a `-32601` error response (or, for a notification, a log event).
///
/// Cloning a router is cheap: clones share their routes.
///
/// Handlers run as futures polled by the connection's task, not as tasks of their own: an
/// `async` handler that awaits is cheap, one that blocks holds the connection up (use
/// `tokio::task::spawn_blocking`). Messages start in the order they arrive; notifications, like
/// requests, finish in whatever order their handlers do.
///
/// A handler's error type is [`HandlerError`], so `Ok(value)` needs no annotation, and `?`
/// turns any `std::error::Error` (and a failed nested call) into one.
///
/// # Examples
/// ```
/// use channel_dispatcher::{notification, request, Context, HandlerError, Router};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct Add(i64, i64);
/// request!(Add => i64, "add");
///
/// #[derive(Serialize, Deserialize)]
/// struct Parse(String);
/// request!(Parse => i64, "parse");
///
/// #[derive(Serialize, Deserialize)]
/// struct Log(String);
/// notification!(Log, "log");
///
/// // A named handler says its error type once, in its signature.
/// async fn parse(_cx: Context, Parse(text): Parse) -> Result<i64, HandlerError> {
///     Ok(text.trim().parse::<i64>()?) // a ParseIntError becomes an internal error
/// }
///
/// let router = Router::new()
///     .request(|_cx: Context, Add(a, b)| async move { Ok(a + b) })
///     .request(parse)
///     .notification(|_cx: Context, Log(line)| async move {
///         tracing::info!("{line}");
///         Ok(())
///     });
/// ```
///
/// A handler error of another type converts with `?` (a closure bound to a variable before it
/// is routed has no expected type, so its `Ok` names the error type:
/// `Ok::<_, HandlerError>(..)`).
#[derive(Clone, Default)]
pub struct Router {
    routes: Arc<HashMap<String, Route, SeededState>>,
    state: Extensions,
}

impl Router {
    /// A router without routes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Gives every handler of this router `state`, which they borrow with
    /// [`Context::state`] (`cx.state::<T>()?`): no clones captured by each closure. Call it
    /// once per type (a second value of the same type replaces the first); the state is
    /// shared, not copied, per message. A value of the same type that a middleware or the
    /// [`ContextFactory`](crate::ContextFactory) attached to a message wins over it.
    ///
    /// # Examples
    /// ```
    /// use std::collections::HashMap;
    /// use std::sync::Mutex;
    /// use channel_dispatcher::{request, Context, Router};
    /// use serde::{Deserialize, Serialize};
    ///
    /// #[derive(Serialize, Deserialize)]
    /// struct Put(String, String);
    /// request!(Put => Option<String>, "put");
    ///
    /// #[derive(Default)]
    /// struct Store(Mutex<HashMap<String, String>>);
    ///
    /// let router = Router::new()
    ///     .with_state(Store::default())
    ///     .request(|cx: Context, Put(key, value)| async move {
    ///         let store = cx.state::<Store>()?;
    ///         Ok(store.0.lock().unwrap().insert(key, value))
    ///     });
    /// ```
    pub fn with_state<T: Send + Sync + 'static>(mut self, state: T) -> Self {
        self.state.insert(state);
        self
    }

    /// Routes `R::METHOD` to `handler`, which gets the context and the decoded request and
    /// returns the response or an error.
    ///
    /// # Panics
    /// If the router is shared (cloned) already: add every route before using it.
    pub fn request<R, F, Fut>(self, handler: F) -> Self
    where
        R: Request,
        F: Fn(Context, R) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R::Response, HandlerError>> + Send + 'static,
    {
        self.typed(R::METHOD, handler, Context::codec, encode_answer)
    }

    /// Routes `N::METHOD` to `handler`, which gets the context and the decoded notification.
    ///
    /// # Panics
    /// If the router is shared (cloned) already.
    pub fn notification<N, F, Fut>(self, handler: F) -> Self
    where
        N: Notification,
        F: Fn(Context, N) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        self.typed(N::METHOD, handler, |_| (), |(), ()| Ok(Reply::nothing()))
    }

    /// Routes `R::METHOD` to a streaming handler, which gets the context and the decoded request
    /// and returns a stream of items (or an error). The stream is stored in the connection's
    /// [`Streams`](crate::Streams) and its id answered; the caller's
    /// [`Dispatcher::stream`](crate::Dispatcher::stream) consumes it.
    ///
    /// # Panics
    /// If the router is shared (cloned) already.
    pub fn stream<R, F, Fut, S>(self, handler: F) -> Self
    where
        R: StreamRequest,
        F: Fn(Context, R) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<S, HandlerError>> + Send + 'static,
        S: futures_util::Stream<Item = Result<R::Item, HandlerError>> + Send + 'static,
    {
        let prepare = |cx: &Context| (cx.codec(), cx.streams());
        self.typed(
            R::METHOD,
            handler,
            prepare,
            |(codec, streams), stream: S| {
                let streams = streams.ok_or_else(|| HandlerError::internal("connection closed"))?;
                encode_answer(codec, streams.add(stream)?)
            },
        )
    }

    /// The one shape of every typed route: decode the message, run the handler, turn what it
    /// returns into a reply with what `prepare` took from the context before the handler got it.
    fn typed<M, F, Fut, T, P>(
        self,
        method: &'static str,
        handler: F,
        prepare: fn(&Context) -> P,
        answer: fn(P, T) -> Result<Reply, HandlerError>,
    ) -> Self
    where
        M: serde::de::DeserializeOwned,
        F: Fn(Context, M) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, HandlerError>> + Send + 'static,
        T: 'static,
        P: Send + 'static,
    {
        self.route(
            method,
            Box::new(move |incoming: Incoming| {
                let (cx, payload) = incoming.into_parts();
                let message = match decode::<M>(&cx, &payload, method) {
                    Ok(message) => message,
                    Err(error) => return failed(error),
                };
                let prepared = Some(prepare(&cx));
                let fut = handler(cx, message);
                Box::pin(Answering {
                    fut,
                    prepared,
                    answer,
                })
            }),
        )
    }

    /// Routes `method` to a handler of raw [`Incoming`] messages, for generic tools and
    /// proxies.
    ///
    /// # Panics
    /// If the router is shared (cloned) already.
    pub fn raw<F, Fut>(self, method: impl Into<String>, handler: F) -> Self
    where
        F: Fn(Incoming) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Reply, HandlerError>> + Send + 'static,
    {
        self.route(
            method.into(),
            Box::new(move |incoming| Box::pin(handler(incoming))),
        )
    }

    fn route(mut self, method: impl Into<String>, route: Route) -> Self {
        let routes = Arc::get_mut(&mut self.routes)
            .expect("add every route before cloning or using the router");
        routes.insert(method.into(), route);
        self
    }

    /// The methods with a route, in no particular order.
    pub fn methods(&self) -> impl Iterator<Item = &str> {
        self.routes.keys().map(String::as_str)
    }
}

pin_project_lite::pin_project! {
    /// A typed route's run: the handler's future, then what it returns made a reply.
    ///
    /// NB. Not an `async` block: one keeps the handler's future twice (the captured one and
    /// the one it awaits), which doubled what a waiting request holds.
    struct Answering<Fut, P, T> {
        #[pin]
        fut: Fut,
        prepared: Option<P>,
        answer: fn(P, T) -> Result<Reply, HandlerError>,
    }
}

impl<Fut, P, T> Future for Answering<Fut, P, T>
where
    Fut: Future<Output = Result<T, HandlerError>>,
{
    type Output = Result<Reply, HandlerError>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.project();
        assert!(
            this.prepared.is_some(),
            "a route's future polled after it ended"
        );
        let result = std::task::ready!(this.fut.poll(cx));
        let prepared = this.prepared.take().expect("checked above");
        Poll::Ready(result.and_then(|value| (this.answer)(prepared, value)))
    }
}

/// Decodes a route's message, or says why the payload is not one.
fn decode<M: serde::de::DeserializeOwned>(
    cx: &Context,
    payload: &bytes::Bytes,
    method: &str,
) -> Result<M, HandlerError> {
    cx.codec()
        .decode(payload)
        .map_err(|e| HandlerError::invalid_payload(method, &e))
}

fn encode_answer<T: serde::Serialize>(
    codec: crate::Codec,
    value: T,
) -> Result<Reply, HandlerError> {
    codec
        .encode(&value)
        .map(Reply::value)
        .map_err(|e| HandlerError::internal(format!("could not encode the answer: {e}")))
}

fn failed(error: HandlerError) -> BoxFuture {
    Box::pin(std::future::ready(Err(error)))
}

impl tower_service::Service<Incoming> for Router {
    type Response = Reply;
    type Error = HandlerError;
    type Future = Pin<Box<dyn Future<Output = Result<Reply, HandlerError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut TaskContext<'_>) -> Poll<Result<(), HandlerError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut incoming: Incoming) -> Self::Future {
        match self.routes.get(incoming.method()) {
            Some(route) => {
                if !self.state.is_empty() {
                    let extensions = incoming.context_mut().extensions_mut();
                    extensions.fill_from(&self.state);
                }
                route(incoming)
            }
            None => {
                let codec = incoming.context().codec();
                failed(HandlerError::unknown_method(incoming.method(), codec))
            }
        }
    }
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut methods: Vec<_> = self.methods().collect();
        methods.sort_unstable();
        f.debug_struct("Router").field("methods", &methods).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{request, Codec};
    use serde::{Deserialize, Serialize};
    use tower_service::Service;

    #[derive(Serialize, Deserialize)]
    struct Hold;
    request!(Hold => u8, "hold");

    #[test]
    fn a_waiting_route_holds_its_handlers_future_once() {
        const HELD: usize = 4096;
        let mut router = Router::new().request(|_cx: Context, Hold| async move {
            let buffer = [1u8; HELD];
            std::future::pending::<()>().await;
            Ok(buffer[HELD - 1])
        });
        let payload = Codec::default().encode(&Hold).unwrap();
        let fut = router.call(Incoming::new("hold", Some(1), payload, Codec::default()));
        let size = std::mem::size_of_val(&*fut);
        // NB. An `async` wrapper kept it twice: over 2 * HELD.
        assert!(size < HELD + 256, "the route's future takes {size} bytes");
    }
}
