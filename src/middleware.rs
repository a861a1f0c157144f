//! Middleware: code that runs around the handler, as an async trait, as closures ([`from_fn`]), and as tower layers.
//!
//! A [`Middleware`] gets each [`Incoming`] message and the [`Next`] step of the pipeline. It may
//! read and set attributes before calling `next`, answer by itself without calling it (an auth
//! check), change the [`Reply`] after it, or time it. Notifications pass through the same
//! pipeline ([`Incoming::is_notification`]); whatever is returned for them is not sent.
//!
//! [`stack_middleware`] composes a handler with middlewares in order: the first one
//! is the outermost. The result is a `tower::Service`, so tower layers (`TimeoutLayer`,
//! `ConcurrencyLimitLayer`, ...) wrap it like any other service, and any tower service can be the
//! handler inside it.
//!
//! The same trait serves the caller side: [`Builder::outbound`](crate::Builder::outbound) runs
//! every outgoing request and notification through a pipeline, where `next` sends it to the peer
//! and returns the peer's answer as a [`Reply`].
//!
//! # Examples
//! ```
//! use channel_dispatcher::middleware::{from_fn, stack_middleware, Middleware, Next};
//! use channel_dispatcher::{Incoming, Reply, Router};
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
//! let handler = stack_middleware(Router::new(), [logger.boxed(), auth.boxed()]);
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower_service::Service;

use crate::error::{HandlerError, IntoHandlerError};
use crate::handler::{Incoming, Reply};

/// The future a middleware returns.
pub type MiddlewareFuture = Pin<Box<dyn Future<Output = Result<Reply, HandlerError>> + Send>>;

/// Runs around the handler: see the [module docs](self).
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
pub trait Middleware: Send + Sync + 'static {
    /// Handles one message; call `next.run(incoming)` to go on down the pipeline.
    fn call(&self, incoming: Incoming, next: Next) -> MiddlewareFuture;

    /// This middleware as a shared trait object, for [`stack_middleware`]'s list.
    fn boxed(self) -> Arc<dyn Middleware>
    where
        Self: Sized,
    {
        Arc::new(self)
    }
}

impl fmt::Debug for dyn Middleware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("dyn Middleware")
    }
}

/// The innermost step of a pipeline: the handler, or (caller side) the send to the peer.
pub(crate) type Endpoint = Box<dyn FnOnce(Incoming) -> MiddlewareFuture + Send>;

/// The rest of the pipeline, handed to each middleware.
pub struct Next {
    middlewares: Arc<[Arc<dyn Middleware>]>,
    index: usize,
    endpoint: Endpoint,
}

impl Next {
    pub(crate) fn new(middlewares: Arc<[Arc<dyn Middleware>]>, endpoint: Endpoint) -> Self {
        Self {
            middlewares,
            index: 0,
            endpoint,
        }
    }

    /// Runs the rest of the pipeline (the next middleware, or at the end the handler).
    pub fn run(mut self, incoming: Incoming) -> MiddlewareFuture {
        match self.middlewares.get(self.index).cloned() {
            Some(middleware) => {
                self.index += 1;
                middleware.call(incoming, self)
            }
            None => (self.endpoint)(incoming),
        }
    }
}

impl fmt::Debug for Next {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Next")
            .field("remaining", &(self.middlewares.len() - self.index))
            .finish()
    }
}

/// A middleware made of an async closure `(Incoming, Next) -> Result<Reply, HandlerError>`;
/// see [`from_fn`].
#[derive(Clone)]
pub struct FromFn<F> {
    f: F,
}

/// Makes a middleware of an async closure, as axum's `middleware::from_fn`.
pub fn from_fn<F, Fut>(f: F) -> FromFn<F>
where
    F: Fn(Incoming, Next) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Reply, HandlerError>> + Send + 'static,
{
    FromFn { f }
}

impl<F, Fut> Middleware for FromFn<F>
where
    F: Fn(Incoming, Next) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Reply, HandlerError>> + Send + 'static,
{
    fn call(&self, incoming: Incoming, next: Next) -> MiddlewareFuture {
        Box::pin((self.f)(incoming, next))
    }
}

impl<F> fmt::Debug for FromFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FromFn").finish_non_exhaustive()
    }
}

/// Composes `handler` with `middlewares`, the first one outermost (the PHP original's
/// `stackMiddleware($handler, $m1, $m2)`: m1, then m2, then the handler).
///
/// `handler` is any cloneable tower service of [`Incoming`] (a [`Router`](crate::Router), a
/// service wrapped in tower layers, another stack); it is cloned per message, as tower services
/// usually are, and its `poll_ready` is awaited before each call.
pub fn stack_middleware<S>(
    handler: S,
    middlewares: impl IntoIterator<Item = Arc<dyn Middleware>>,
) -> Stack<S>
where
    S: Service<Incoming, Response = Reply> + Clone + Send + Sync + 'static,
    S::Error: IntoHandlerError,
    S::Future: Send + 'static,
{
    Stack {
        handler,
        middlewares: middlewares.into_iter().collect(),
    }
}

/// A handler wrapped in middlewares: what [`stack_middleware`] returns. A tower `Service`.
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
    S: Service<Incoming, Response = Reply> + Clone + Send + Sync + 'static,
    S::Error: IntoHandlerError,
    S::Future: Send + 'static,
{
    type Response = Reply;
    type Error = HandlerError;
    type Future = MiddlewareFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        // The handler's readiness is awaited per message, inside the pipeline.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, incoming: Incoming) -> MiddlewareFuture {
        let mut handler = self.handler.clone();
        let endpoint: Endpoint = Box::new(move |incoming| {
            Box::pin(async move {
                std::future::poll_fn(|cx| handler.poll_ready(cx))
                    .await
                    .map_err(IntoHandlerError::into_handler_error)?;
                handler
                    .call(incoming)
                    .await
                    .map_err(IntoHandlerError::into_handler_error)
            })
        });
        Next::new(Arc::clone(&self.middlewares), endpoint).run(incoming)
    }
}
