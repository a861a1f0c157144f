//! The [`Dispatcher`] handle, its [`Builder`] and the [`Connection`] that drives one channel.
//!
//! A dispatcher is two parts: a cheap, cloneable handle that user code calls through, and one
//! connection task that owns the channel, reads and writes frames, keeps the table of calls
//! awaiting answers and runs the handlers for inbound requests. They talk over one queue.

mod builder;
mod call;
mod connection;
mod service;

use std::fmt;
use std::future::IntoFuture;
use std::sync::{Arc, Weak};

use bytes::Bytes;
use serde::de::DeserializeOwned;

pub use crate::shared::RawResponse;
pub use builder::{Builder, InboundEnvelope};
pub(crate) use call::send_notification;
pub use call::{Call, ResponseFuture};
pub use connection::Connection;
pub(crate) use connection::RequestOver;
pub use service::{CallService, RawCall};

use crate::codec::Codec;
use crate::envelope::Method;
use crate::error::{CallError, Termination};
use crate::handler::Router;
use crate::limits::Limits;
use crate::message::{Attributes, Notification, Request, StreamRequest};
use crate::peer::PeerInfo;
use crate::shared::{Command, Permit, Shared};
use crate::stream::RemoteStream;

/// A handle to one connection: send requests and notifications to the peer, stop it, watch it
/// end. Cheap to clone; every clone talks to the same connection.
///
/// Dropping every handle (and every call in flight) stops the connection gracefully, as
/// [`stop`](Self::stop) does. Handlers get a weak handle through their [`Context`](crate::Context),
/// so they never keep a connection alive by themselves.
///
/// # Examples
/// ```
/// use channel_dispatcher::{request, Channel, Context, Dispatcher, Router};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct Ping(u32);
/// request!(Ping => u32, "ping");
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let (a, b) = Channel::pair();
/// let server = Dispatcher::builder()
///     .handler(Router::new().request(|_cx: Context, Ping(n)| async move {
///         Ok(n + 1)
///     }))
///     .spawn(b);
/// let client = Dispatcher::builder().spawn(a);
///
/// assert_eq!(client.request(Ping(41)).await?, 42);
///
/// client.stop().await;
/// server.closed().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Dispatcher {
    shared: Arc<Shared>,
}

impl Dispatcher {
    /// A builder with the defaults: no routes, MessagePack, 16 MiB frames.
    pub fn builder() -> Builder<Router> {
        Builder::new()
    }

    /// Sends a typed request; `.await` the returned [`Call`] for the response.
    ///
    /// The call can carry attributes and a timeout before it is awaited:
    /// `dispatcher.request(msg).attribute("trace", id).timeout(d).await`.
    ///
    /// # Errors
    /// See [`CallError`]: the peer's error answer, the end of the connection, a timeout, or a
    /// message that cannot be encoded or is too large.
    ///
    /// # Cancellation
    /// Dropping the future before it completes sends a cancel to the peer, whose handler is
    /// dropped; a late answer is discarded quietly.
    pub fn request<R: Request>(&self, request: R) -> Call<R::Response> {
        Call::new(
            Ok(self.shared.clone()),
            Method::from_static(R::METHOD),
            self.shared.codec.encode(&request),
            decode_typed::<R::Response>,
        )
    }

    /// Opens a stream: sends the streaming request, whose handler answers with a stream of
    /// items ([`Router::stream`]), and returns it as a [`RemoteStream`] (windowed; see
    /// [`RemoteStream::pull_mode`] and [`RemoteStream::window`]).
    ///
    /// # Cancellation
    /// Dropping the stream tells the producer, which drops its stream.
    pub fn stream<R: StreamRequest>(&self, request: R) -> RemoteStream<R::Item> {
        let answer = Call::new(
            Ok(self.shared.clone()),
            Method::from_static(R::METHOD),
            self.shared.codec.encode(&request),
            decode_typed::<u64>,
        )
        .into_future();
        RemoteStream::opening(
            Arc::clone(&self.shared),
            answer,
            self.shared.stream_window,
            None,
        )
    }

    /// Opens a stream by method name: `call` has the method, a payload already encoded with
    /// the connection's codec (see [`Codec::encode`]) and attributes; its items decode as `T`
    /// (with a self-describing codec, `serde_json::Value` takes any item). Otherwise as
    /// [`stream`](Self::stream).
    ///
    /// # Examples
    /// ```
    /// # use channel_dispatcher::{stream_request, Channel, Context, Dispatcher, RawCall, Router};
    /// # use futures_util::{stream, StreamExt};
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Serialize, Deserialize)] struct Count(u32);
    /// # stream_request!(Count => u32, "count");
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// # let (a, b) = Channel::pair();
    /// # let router = Router::new().stream(|_cx: Context, Count(n)| async move { Ok(stream::iter((0..n).map(Ok))) });
    /// # let _server = Dispatcher::builder().handler(router).spawn(b);
    /// let client = Dispatcher::builder().spawn(a);
    /// let payload = client.codec().encode(&3u32).unwrap();
    /// let items: Vec<u64> = client
    ///     .stream_raw::<u64>(RawCall::new("count", payload))
    ///     .map(Result::unwrap)
    ///     .collect()
    ///     .await;
    /// assert_eq!(items, [0, 1, 2]);
    /// # }
    /// ```
    pub fn stream_raw<T>(&self, call: RawCall) -> RemoteStream<T>
    where
        T: serde::de::DeserializeOwned + Send + 'static,
    {
        let (method, payload, attributes) = call.into_parts();
        let answer = Call::new(
            Ok(self.shared.clone()),
            Method::from(method),
            Ok(payload),
            decode_typed::<u64>,
        )
        .attributes(attributes)
        .into_future();
        RemoteStream::opening(
            Arc::clone(&self.shared),
            answer,
            self.shared.stream_window,
            None,
        )
    }

    /// Sends an untyped request: a method name and a payload already encoded with the
    /// connection's codec (see [`Codec::encode`]). The answer comes back raw.
    pub fn call_raw(&self, method: impl Into<String>, payload: Bytes) -> Call<RawResponse> {
        Call::new(
            Ok(self.shared.clone()),
            Method::from(method.into()),
            Ok(payload),
            |_, raw| Ok(raw),
        )
    }

    /// Sends a notification, never answered. It returns once the notification is queued:
    /// at once, unless the handshake is not done yet (the notification is checked against the
    /// limits the peer announces there), or [`Builder::max_in_flight`] messages (or
    /// [`Builder::max_queued_bytes`]) are queued or awaiting answers already, in which case it
    /// waits for room (backpressure).
    ///
    /// # Errors
    /// [`CallError::Terminated`] once the connection is stopping (or ended in its handshake);
    /// [`CallError::Encode`] or [`CallError::Limit`] for a message that cannot be sent.
    pub async fn notify<N: Notification>(&self, notification: N) -> Result<(), CallError> {
        self.notify_with(notification, Attributes::new()).await
    }

    /// Sends a notification with attributes.
    ///
    /// # Errors
    /// As [`notify`](Self::notify).
    pub async fn notify_with<N: Notification>(
        &self,
        notification: N,
        attributes: Attributes,
    ) -> Result<(), CallError> {
        let payload = self
            .shared
            .codec
            .encode(&notification)
            .map_err(CallError::Encode)?;
        let method = Method::from_static(N::METHOD);
        send_notification(&self.shared, method, attributes, payload, Permit::Handle).await
    }

    /// Sends an untyped notification with a payload already encoded with the connection's codec.
    ///
    /// # Errors
    /// As [`notify`](Self::notify).
    pub async fn notify_raw(
        &self,
        method: impl Into<String>,
        attributes: Attributes,
        payload: Bytes,
    ) -> Result<(), CallError> {
        let method = Method::from(method.into());
        send_notification(&self.shared, method, attributes, payload, Permit::Handle).await
    }

    /// Calls sent and not yet answered (as of the connection task's last turn).
    pub fn pending_calls(&self) -> usize {
        self.shared.lifecycle.pending_calls()
    }

    /// The peer's requests and notifications being handled (as of the connection task's last
    /// turn).
    pub fn running_handlers(&self) -> usize {
        self.shared.lifecycle.running_handlers()
    }

    /// The limits the peer announced in the handshake ([`Limits`]), which this side keeps to
    /// when it sends; `None` until the handshake is done.
    pub fn peer_limits(&self) -> Option<Limits> {
        self.shared.lifecycle.announced_peer_limits()
    }

    /// Waits for the handshake: `Err` with the reason if the connection ended first.
    pub(crate) async fn ready(&self) -> Result<(), Termination> {
        self.shared.lifecycle.handshake_done().await
    }

    /// What is known about the peer (its address, the identity this side's
    /// [`Authenticator`](crate::Authenticator) gave it), once the handshake is done.
    pub fn peer(&self) -> Option<PeerInfo> {
        self.shared.lifecycle.peer().cloned()
    }

    /// Stops gracefully and waits until the connection has ended.
    ///
    /// New calls fail at once with [`CallError::Terminated`]; queued notifications are
    /// written; handlers running for the peer may finish (up to the drain timeout,
    /// [`Builder::drain_timeout`]); calls still awaiting answers fail with
    /// `Terminated(Stopped)`; a goodbye is sent and the channel closed, waiting at most 2 s
    /// for the peer to close its side. So it returns within the drain timeout and 2 s,
    /// whatever the peer does. Calling it again, or after the connection ended, just waits for
    /// (or returns) the same end.
    ///
    /// Called from a handler of this connection, it starts the stop and returns at once (the
    /// connection waits for that very handler, whose answer still goes out), with the reason
    /// the connection will end with.
    pub async fn stop(&self) -> Termination {
        let lifecycle = &self.shared.lifecycle;
        lifecycle.set_stopping();
        let _ = self.shared.send_command(Command::Stop);
        if lifecycle.polled_by_handler() {
            return lifecycle.reason_or(Termination::Stopped);
        }
        self.closed().await
    }

    /// Waits until the connection has ended, and says why.
    pub async fn closed(&self) -> Termination {
        self.shared.lifecycle.closed().await
    }

    /// `true` once the connection has ended (what [`closed`](Self::closed) waits for).
    pub fn is_closed(&self) -> bool {
        self.shared.lifecycle.is_closed()
    }

    /// `true` once the connection takes no new calls: it is stopping (draining its handlers,
    /// saying goodbye) or has ended.
    pub fn is_stopping(&self) -> bool {
        self.shared.lifecycle.is_stopping()
    }

    /// Runs `callback` once when the connection ends (at once, on this thread, if it has ended
    /// already).
    ///
    /// Every callback runs exactly once, after every pending call has failed, on the task that
    /// ends the connection (usually the connection's own); keep it short. A callback that
    /// panics is logged, and the others still run.
    pub fn on_stop(&self, callback: impl FnOnce(&Termination) + Send + 'static) {
        self.shared.lifecycle.on_stop(Box::new(callback));
    }

    /// The connection's codec.
    pub fn codec(&self) -> Codec {
        self.shared.codec
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub(crate) fn downgrade(&self) -> Weak<Shared> {
        Arc::downgrade(&self.shared)
    }

    pub(crate) fn from_shared(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

fn decode_typed<T: DeserializeOwned>(codec: Codec, raw: RawResponse) -> Result<T, CallError> {
    codec.decode(&raw.payload).map_err(CallError::Decode)
}

impl fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dispatcher")
            .field("codec", &self.shared.codec)
            .field("stopping", &self.is_stopping())
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}
