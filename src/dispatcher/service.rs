//! The calling side as a tower `Service`: [`CallService`].

use std::fmt;
use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tower_service::Service;

use super::call::ResponseFuture;
use super::Dispatcher;
use crate::error::CallError;
use crate::message::{Attributes, Request};
use crate::shared::{RawResponse, Reserved};

type Reserving = Pin<Box<dyn Future<Output = Option<Reserved>> + Send>>;

/// A connection's calling side as a tower [`Service`] of one request type: a typed
/// [`Request`] `R` (answered `R::Response`) or [`RawCall`] (answered [`RawResponse`]), so that
/// tower layers wrap outgoing calls: `Timeout`, `Retry`, `RateLimit`, `LoadShed`,
/// `ConcurrencyLimit`, a balancer... [`Dispatcher::service`] makes one.
///
/// `poll_ready` takes one of the connection's in-flight permits
/// ([`Builder::max_in_flight`](crate::Builder::max_in_flight)) ahead of the call, so it is
/// pending while all are taken: back-pressure reaches the layers above (a `LoadShed` sheds,
/// a balancer picks another peer). The permit is given back if the service is dropped before
/// `call`. Clones share the connection, not a taken permit.
///
/// Errors are [`CallError`]s; [`CallError::is_retryable`] tells a retry policy which ones the
/// peer refused before doing any work.
///
/// # Examples
/// ```
/// # use channel_dispatcher::{request, Channel, Context, Dispatcher, Router};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Serialize, Deserialize)] struct Add(i64, i64);
/// # request!(Add => i64, "add");
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// # let (a, b) = Channel::pair();
/// # let router = Router::new().request(|_cx: Context, Add(x, y)| async move { Ok(x + y) });
/// # let _server = Dispatcher::builder().handler(router).spawn(b);
/// use std::time::Duration;
/// use tower::{Service, ServiceBuilder, ServiceExt};
///
/// let client = Dispatcher::builder().spawn(a);
/// let mut add = ServiceBuilder::new()
///     .timeout(Duration::from_secs(1))
///     .service(client.service::<Add>());
/// let sum: i64 = add.ready().await?.call(Add(2, 3)).await?;
/// assert_eq!(sum, 5);
/// # Ok(())
/// # }
/// ```
pub struct CallService<R> {
    dispatcher: Dispatcher,
    reserved: Option<Reserved>,
    reserving: Option<Reserving>,
    _request: PhantomData<fn(R)>,
}

impl Dispatcher {
    /// This connection's calling side as a tower [`Service`] of requests `R` (a [`Request`]
    /// type, or [`RawCall`]): see [`CallService`].
    pub fn service<R>(&self) -> CallService<R>
    where
        CallService<R>: Service<R>,
    {
        CallService {
            dispatcher: self.clone(),
            reserved: None,
            reserving: None,
            _request: PhantomData,
        }
    }
}

impl<R> CallService<R> {
    /// The dispatcher whose calls this service makes.
    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }

    fn poll_reserve(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), CallError>> {
        let shared = &self.dispatcher.shared;
        // Checked first: a service that stays ready while its connection drains would keep a
        // balancer sending it calls that can only fail.
        if shared.lifecycle.is_stopping() {
            self.reserved = None;
            self.reserving = None;
            return Poll::Ready(Err(shared.terminated()));
        }
        if self.reserved.is_some() {
            return Poll::Ready(Ok(()));
        }
        if self.reserving.is_none() {
            if let Some(reserved) = Reserved::try_new(shared) {
                self.reserved = Some(reserved);
                return Poll::Ready(Ok(()));
            }
            self.reserving = Some(Box::pin(Reserved::new(shared.clone())));
        }
        let reserving = self.reserving.as_mut().expect("set just above");
        let reserved = std::task::ready!(reserving.as_mut().poll(cx));
        self.reserving = None;
        match reserved {
            Some(reserved) => {
                self.reserved = Some(reserved);
                Poll::Ready(Ok(()))
            }
            None => Poll::Ready(Err(shared.terminated())),
        }
    }
}

impl<R> Clone for CallService<R> {
    fn clone(&self) -> Self {
        Self {
            dispatcher: self.dispatcher.clone(),
            reserved: None,
            reserving: None,
            _request: PhantomData,
        }
    }
}

impl<R> fmt::Debug for CallService<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallService")
            .field("ready", &self.reserved.is_some())
            .finish_non_exhaustive()
    }
}

impl<R: Request> Service<R> for CallService<R> {
    type Response = R::Response;
    type Error = CallError;
    type Future = ResponseFuture<R::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), CallError>> {
        self.poll_reserve(cx)
    }

    /// Sends `request` with the permit `poll_ready` took (without one, it waits for one as
    /// [`Dispatcher::request`] does).
    fn call(&mut self, request: R) -> Self::Future {
        self.dispatcher
            .request(request)
            .with_reserved(self.reserved.take())
            .into_future()
    }
}

/// An untyped request for [`CallService`]: a method, a payload encoded with the connection's
/// codec, and attributes.
#[derive(Clone, Debug)]
pub struct RawCall {
    method: String,
    payload: Bytes,
    attributes: Attributes,
}

impl RawCall {
    /// A request of `method` with an encoded `payload` (see [`Codec::encode`](crate::Codec::encode)).
    pub fn new(method: impl Into<String>, payload: Bytes) -> Self {
        Self {
            method: method.into(),
            payload,
            attributes: Attributes::new(),
        }
    }

    /// Adds an attribute.
    pub fn attribute(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.attributes.insert(name, value);
        self
    }

    /// The method.
    pub fn method(&self) -> &str {
        &self.method
    }

    /// The encoded payload.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The attributes.
    pub fn attributes(&self) -> &Attributes {
        &self.attributes
    }

    pub(crate) fn into_parts(self) -> (String, Bytes, Attributes) {
        (self.method, self.payload, self.attributes)
    }
}

impl Service<RawCall> for CallService<RawCall> {
    type Response = RawResponse;
    type Error = CallError;
    type Future = ResponseFuture<RawResponse>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), CallError>> {
        self.poll_reserve(cx)
    }

    fn call(&mut self, request: RawCall) -> Self::Future {
        let (method, payload, attributes) = request.into_parts();
        self.dispatcher
            .call_raw(method, payload)
            .attributes(attributes)
            .with_reserved(self.reserved.take())
            .into_future()
    }
}
