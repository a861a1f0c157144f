//! Middleware: code that runs around the handler, and around outgoing calls, as tower layers.
//!
//! A [`Middleware`] gets each message and the [`Next`] step of the pipeline. It may read and
//! set attributes before calling `next`, answer by itself without calling it (an auth check),
//! change the answer after it, or time it. [`from_fn`] makes one of an async closure, as axum's
//! `middleware::from_fn` does, and it is a tower [`Layer`]: `ServiceBuilder::new()
//! .layer(from_fn(..)).layer(ConcurrencyLimitLayer::new(8)).service(router)` mixes the crate's
//! middleware with tower's, and every layer's readiness (`poll_ready`) is honoured, so a
//! concurrency limit anywhere in the stack makes the connection wait before it starts more
//! handlers (it keeps reading answers, cancels and credit).
//!
//! A tower limit holds back every request, the peer's nested calls too: a handler that calls
//! the peer, whose handler calls back, waits for itself once the limit is reached. Where
//! handlers make such calls, bound them with
//! [`Builder::max_concurrent_handlers`](crate::Builder::max_concurrent_handlers), which admits
//! nested calls beyond it, rather than with tower's `ConcurrencyLimit`.
//!
//! The pipeline comes in two kinds, each with its own message types:
//! - **inbound**, around the handler: [`Incoming`] messages, answered with a [`Reply`] (or a
//!   [`HandlerError`]); notifications pass through it too ([`Incoming::is_notification`]), and
//!   whatever is returned for them is not sent.
//! - **outbound**, around every message this side sends (handles', and handlers' nested calls):
//!   [`OutgoingCall`]s, answered with the peer's [`RawResponse`] (or a [`CallError`]), set with
//!   [`Builder::outbound`](crate::Builder::outbound). At its end, `next` sends the message.
//!
//! [`stack_middleware`] keeps the PHP original's shape: a handler and a list of middlewares,
//! the first one outermost; it is [`MiddlewareLayer`] applied to the handler.
//!
//! # Examples
//! ```
//! use channel_dispatcher::middleware::{from_fn, stack_middleware, Middleware, Next};
//! use channel_dispatcher::{Incoming, Reply, Router};
//! use tower::ServiceBuilder;
//!
//! let logger = from_fn(|incoming: Incoming, next: Next| async move {
//!     let method = incoming.method().to_owned();
//!     let reply = next.run(incoming).await;
//!     tracing::info!(%method, ok = reply.is_ok(), "handled");
//!     reply
//! });
//! let auth = from_fn(|incoming: Incoming, next: Next| async move {
//!     if incoming.attributes().get("token") != Some("s3cret") {
//!         return Ok(Reply::error(401, "unauthorized"));
//!     }
//!     next.run(incoming).await
//! });
//! // The PHP original's shape...
//! let handler = stack_middleware(Router::new(), [logger.clone().boxed(), auth.clone().boxed()]);
//! // ...or tower's, with its layers in between.
//! let handler = ServiceBuilder::new()
//!     .layer(logger)
//!     .concurrency_limit(64)
//!     .layer(auth)
//!     .service(Router::new());
//! ```

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use crate::codec::Codec;
use crate::envelope::Method;
use crate::error::{CallError, CodecError, HandlerError, IntoHandlerError};
use crate::handler::{HandlerResult, Incoming, Reply};
use crate::message::Attributes;
use crate::shared::RawResponse;

/// What a pipeline carries: [`Incoming`] (inbound, answered with a [`Reply`]) or
/// [`OutgoingCall`] (outbound, answered with the peer's [`RawResponse`]).
pub trait PipelineRequest: Send + 'static + sealed::Sealed {
    /// The answer a step returns.
    type Response: Send + 'static;
    /// The failure a step returns.
    type Error: Send + 'static;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for crate::handler::Incoming {}
    impl Sealed for super::OutgoingCall {}
}

impl PipelineRequest for Incoming {
    type Response = Reply;
    type Error = HandlerError;
}

impl PipelineRequest for OutgoingCall {
    type Response = RawResponse;
    type Error = CallError;
}

/// The future a middleware returns.
pub type MiddlewareFuture<R = Incoming> = Pin<
    Box<
        dyn Future<Output = Result<<R as PipelineRequest>::Response, <R as PipelineRequest>::Error>>
            + Send,
    >,
>;

/// Runs around the handler (or, for [`OutgoingCall`]s, around the sending of every outgoing
/// message): see the [module docs](self).
///
/// # Examples
/// ```
/// use channel_dispatcher::middleware::{Middleware, MiddlewareFuture, Next};
/// use channel_dispatcher::Incoming;
///
/// /// Stamps every message with a trace id before the handler sees it.
/// struct TraceId;
///
/// impl Middleware for TraceId {
///     fn call(&self, mut incoming: Incoming, next: Next) -> MiddlewareFuture {
///         if incoming.attributes().get("trace-id").is_none() {
///             incoming.attributes_mut().insert("trace-id", "generated");
///         }
///         next.run(incoming)
///     }
/// }
/// ```
pub trait Middleware<R: PipelineRequest = Incoming>: Send + Sync + 'static {
    /// Handles one message; call `next.run(request)` to go on down the pipeline.
    fn call(&self, request: R, next: Next<R>) -> MiddlewareFuture<R>;

    /// This middleware as a shared trait object, for [`stack_middleware`]'s list.
    fn boxed(self) -> Arc<dyn Middleware<R>>
    where
        Self: Sized,
    {
        Arc::new(self)
    }
}

impl<R: PipelineRequest> fmt::Debug for dyn Middleware<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("dyn Middleware")
    }
}

/// The innermost step of a pipeline: the handler, or (outbound) the send to the peer.
pub(crate) type Endpoint<R = Incoming> = Box<dyn FnOnce(R) -> MiddlewareFuture<R> + Send>;

/// The rest of the pipeline, handed to each middleware.
pub struct Next<R: PipelineRequest = Incoming> {
    middlewares: Arc<[Arc<dyn Middleware<R>>]>,
    index: usize,
    endpoint: Endpoint<R>,
}

impl<R: PipelineRequest> Next<R> {
    pub(crate) fn new(middlewares: Arc<[Arc<dyn Middleware<R>>]>, endpoint: Endpoint<R>) -> Self {
        Self {
            middlewares,
            index: 0,
            endpoint,
        }
    }

    /// Runs the rest of the pipeline (the next middleware, or at the end the handler, or the
    /// send to the peer).
    pub fn run(mut self, request: R) -> MiddlewareFuture<R> {
        match self.middlewares.get(self.index).cloned() {
            Some(middleware) => {
                self.index += 1;
                middleware.call(request, self)
            }
            None => (self.endpoint)(request),
        }
    }
}

impl<R: PipelineRequest> fmt::Debug for Next<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Next")
            .field("remaining", &(self.middlewares.len() - self.index))
            .finish()
    }
}

/// A middleware made of an async closure `(R, Next<R>) -> Result<R::Response, R::Error>`;
/// see [`from_fn`]. It is a tower [`Layer`] (inbound).
pub struct FromFn<F, R = Incoming> {
    f: F,
    _request: PhantomData<fn(R)>,
}

impl<F: Clone, R> Clone for FromFn<F, R> {
    fn clone(&self) -> Self {
        Self {
            f: self.f.clone(),
            _request: PhantomData,
        }
    }
}

/// Makes a middleware of an async closure, as axum's `middleware::from_fn`: of
/// `|incoming: Incoming, next: Next|` for the handler's side (it is then also a tower
/// [`Layer`]), of `|call: OutgoingCall, next: Next<OutgoingCall>|` for
/// [`Builder::outbound`](crate::Builder::outbound).
pub fn from_fn<R, F, Fut>(f: F) -> FromFn<F, R>
where
    R: PipelineRequest,
    F: Fn(R, Next<R>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R::Response, R::Error>> + Send + 'static,
{
    FromFn {
        f,
        _request: PhantomData,
    }
}

impl<R, F, Fut> Middleware<R> for FromFn<F, R>
where
    R: PipelineRequest,
    F: Fn(R, Next<R>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R::Response, R::Error>> + Send + 'static,
{
    fn call(&self, request: R, next: Next<R>) -> MiddlewareFuture<R> {
        Box::pin((self.f)(request, next))
    }
}

impl<F, R> fmt::Debug for FromFn<F, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FromFn").finish_non_exhaustive()
    }
}

impl<S, F, Fut> Layer<S> for FromFn<F, Incoming>
where
    F: Fn(Incoming, Next) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Reply, HandlerError>> + Send + 'static,
{
    type Service = Stack<S>;

    fn layer(&self, handler: S) -> Stack<S> {
        Stack {
            handler,
            middlewares: Arc::new([self.clone().boxed()]),
        }
    }
}

/// Middlewares, the first one outermost, as a tower [`Layer`] around a handler.
#[derive(Clone, Debug)]
pub struct MiddlewareLayer {
    middlewares: Arc<[Arc<dyn Middleware>]>,
}

impl MiddlewareLayer {
    /// The layer of `middlewares`, the first one outermost.
    pub fn new(middlewares: impl IntoIterator<Item = Arc<dyn Middleware>>) -> Self {
        Self {
            middlewares: middlewares.into_iter().collect(),
        }
    }
}

impl<S> Layer<S> for MiddlewareLayer {
    type Service = Stack<S>;

    fn layer(&self, handler: S) -> Stack<S> {
        Stack {
            handler,
            middlewares: Arc::clone(&self.middlewares),
        }
    }
}

/// Composes `handler` with `middlewares`, the first one outermost (the PHP original's
/// `stackMiddleware($handler, $m1, $m2)`: m1, then m2, then the handler); the same as
/// `MiddlewareLayer::new(middlewares).layer(handler)`.
///
/// `handler` is any cloneable tower service of [`Incoming`] (a [`Router`](crate::Router), a
/// service wrapped in tower layers, another stack).
pub fn stack_middleware<S>(
    handler: S,
    middlewares: impl IntoIterator<Item = Arc<dyn Middleware>>,
) -> Stack<S>
where
    S: Service<Incoming, Response = Reply> + Clone + Send + Sync + 'static,
    S::Error: IntoHandlerError,
    S::Future: Send + 'static,
{
    MiddlewareLayer::new(middlewares).layer(handler)
}

/// A handler wrapped in middlewares: what [`stack_middleware`] and the layers of this module
/// make. A tower `Service` that is ready when its handler is.
pub struct Stack<S> {
    handler: S,
    middlewares: Arc<[Arc<dyn Middleware>]>,
}

impl<S: Clone> Clone for Stack<S> {
    fn clone(&self) -> Self {
        Self {
            handler: self.handler.clone(),
            middlewares: Arc::clone(&self.middlewares),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Stack<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stack")
            .field("handler", &self.handler)
            .field("middlewares", &self.middlewares.len())
            .finish()
    }
}

impl<S> Service<Incoming> for Stack<S>
where
    S: Service<Incoming, Response = Reply> + Clone + Send + 'static,
    S::Error: IntoHandlerError,
    S::Future: Send + 'static,
{
    type Response = Reply;
    type Error = HandlerError;
    type Future = MiddlewareFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.handler
            .poll_ready(cx)
            .map_err(IntoHandlerError::into_handler_error)
    }

    fn call(&mut self, incoming: Incoming) -> MiddlewareFuture {
        // The handler made ready by `poll_ready` serves this message (a concurrency limit's
        // permit goes with it); a fresh clone waits for the next one.
        let fresh = self.handler.clone();
        let mut handler = std::mem::replace(&mut self.handler, fresh);
        let endpoint: Endpoint = Box::new(move |incoming| {
            let answer = handler.call(incoming);
            // NB. Not an `async` block, which would keep the handler's future twice.
            Box::pin(HandlerResult::new(answer))
        });
        Next::new(Arc::clone(&self.middlewares), endpoint).run(incoming)
    }
}

/// An outgoing request or notification, as the outbound pipeline sees it
/// ([`Builder::outbound`](crate::Builder::outbound)): a middleware may read and change its
/// attributes, refuse it (return an error without calling `next`), or answer it itself.
#[derive(Debug)]
pub struct OutgoingCall {
    pub(crate) method: Method,
    pub(crate) attributes: Attributes,
    pub(crate) payload: Bytes,
    pub(crate) deadline: Option<Instant>,
    pub(crate) notification: bool,
    pub(crate) codec: Codec,
}

impl OutgoingCall {
    /// The method name.
    pub fn method(&self) -> &str {
        self.method.as_str()
    }

    /// `true` for a notification (never answered: its answer here is empty once it is
    /// queued), `false` for a request.
    pub fn is_notification(&self) -> bool {
        self.notification
    }

    /// The attributes it carries.
    pub fn attributes(&self) -> &Attributes {
        &self.attributes
    }

    /// The attributes, to change.
    pub fn attributes_mut(&mut self) -> &mut Attributes {
        &mut self.attributes
    }

    /// The encoded payload.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Decodes the payload.
    ///
    /// # Errors
    /// A [`CodecError`] when the payload is not a `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, CodecError> {
        self.codec.decode(&self.payload)
    }

    /// How long the caller still waits for the answer, if it has a deadline.
    pub fn time_left(&self) -> Option<Duration> {
        self.deadline
            .map(|deadline| deadline.saturating_duration_since(Instant::now()))
    }

    /// An answer a middleware gives instead of the peer's: `payload` encoded with the
    /// connection's codec.
    pub fn answer(&self, payload: Bytes) -> RawResponse {
        RawResponse {
            payload,
            attributes: Attributes::new(),
            codec: self.codec,
        }
    }
}
