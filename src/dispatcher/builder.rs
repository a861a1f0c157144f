use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tower_service::Service;
use tracing::Instrument;

use super::connection::{Config, Connection, Parts};
use super::Dispatcher;
use crate::auth::{Authenticator, SharedToken};
use crate::codec::Codec;
use crate::context::{ContextFactory, Extensions};
use crate::envelope::EnvelopeKind;
use crate::error::IntoHandlerError;
use crate::handler::{DefaultErrorHandler, ErrorHandler, Incoming, Reply, Router};
use crate::limits::Limits;
use crate::message::Attributes;
use crate::middleware::{Middleware, OutgoingCall};
use crate::shared::{Lifecycle, Shared};
use crate::stream::Streams;
use crate::transport::Channel;

/// An inbound envelope, as the observer hook ([`Builder::on_inbound`]) sees it.
#[derive(Debug)]
#[non_exhaustive]
pub struct InboundEnvelope<'a> {
    /// The envelope kind.
    pub kind: EnvelopeKind,
    /// The request id (requests, responses, errors, cancels).
    pub id: Option<u64>,
    /// The method (requests and notifications).
    pub method: Option<&'a str>,
    /// The attributes (requests, notifications, responses, errors).
    pub attributes: Option<&'a Attributes>,
    /// The payload's encoded length.
    pub payload_len: usize,
}

pub(crate) type Observer = Arc<dyn Fn(&InboundEnvelope<'_>) + Send + Sync>;

/// Configures and starts a dispatcher on a [`Channel`].
///
/// Every setting has a default; `Dispatcher::builder().spawn(channel)` is a working client
/// with no routes.
///
/// # Examples
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::time::Duration;
/// use channel_dispatcher::{Channel, Dispatcher, Router};
///
/// let (a, _b) = Channel::pair();
/// let dispatcher = Dispatcher::builder()
///     .handler(Router::new())
///     .max_frame_length(1024 * 1024)
///     .default_timeout(Duration::from_secs(30))
///     .spawn(a);
/// # drop(dispatcher);
/// # }
/// ```
#[must_use = "a builder does nothing until `spawn` or `build`"]
pub struct Builder<S = Router> {
    handler: S,
    config: Config,
    default_timeout: Option<Duration>,
    max_in_flight: usize,
    max_queued_bytes: usize,
    token: Option<String>,
    outbound: Vec<Arc<dyn Middleware<OutgoingCall>>>,
    /// `None`: the default window, which grows for a fast consumer.
    stream_window: Option<u64>,
    stream_idle_timeout: Duration,
    max_streams: usize,
}

impl Builder<Router> {
    pub(crate) fn new() -> Self {
        Self {
            handler: Router::new(),
            config: Config {
                codec: Codec::default(),
                limits: Limits::default(),
                handshake_timeout: Duration::from_secs(10),
                drain_timeout: Duration::from_secs(5),
                max_concurrent_handlers: 1024,
                write_buffer_limit: 256 * 1024,
                write_stall_timeout: Duration::from_secs(30),
                authenticator: None,
                refuse_everyone: None,
                extensions: Extensions::default(),
                error_handler: Arc::new(DefaultErrorHandler),
                context_factory: None,
                observer: None,
                notification_classes: Vec::new(),
            },
            default_timeout: None,
            max_in_flight: 4096,
            max_queued_bytes: 4 * 1024 * 1024,
            token: None,
            outbound: Vec::new(),
            stream_window: None,
            stream_idle_timeout: Duration::from_secs(60),
            max_streams: 1024,
        }
    }
}

impl<S> Builder<S> {
    /// The handler of the peer's requests and notifications: a [`Router`], a
    /// [`Stack`](crate::middleware::Stack) of middlewares, or any
    /// `tower::Service<Incoming, Response = Reply>` failing with a [`HandlerError`](crate::HandlerError) or a boxed
    /// error (so tower layers such as `Timeout` and `ConcurrencyLimit` wrap it directly).
    /// Default: an empty router (every request is answered "unknown method").
    ///
    /// The handler's futures are polled by the connection's own task (no task per message):
    /// keep them from blocking, and spawn CPU-heavy work. The peer's requests and notifications
    /// start in the order they arrive, up to
    /// [`max_concurrent_handlers`](Self::max_concurrent_handlers) at once, and finish in
    /// whatever order their futures do.
    pub fn handler<T>(self, handler: T) -> Builder<T>
    where
        T: Service<Incoming, Response = Reply>,
        T::Error: IntoHandlerError,
    {
        Builder {
            handler,
            config: self.config,
            default_timeout: self.default_timeout,
            max_in_flight: self.max_in_flight,
            max_queued_bytes: self.max_queued_bytes,
            token: self.token,
            outbound: self.outbound,
            stream_window: self.stream_window,
            stream_idle_timeout: self.stream_idle_timeout,
            max_streams: self.max_streams,
        }
    }

    /// The codec; both peers must use the same one. Default: [`Codec::default`] (MessagePack).
    /// [`Codec::Php`] picks the PHP original's whole wire (framing, no handshake).
    pub fn codec(mut self, codec: Codec) -> Self {
        self.config.codec = codec;
        self
    }

    /// On the PHP wire ([`Codec::Php`]), a class the peer sends as a notification (a PHP
    /// `MeekRequest`, which looks like any request on the wire): it goes to the handler's
    /// notification of that name and is never answered. Call it once per class.
    ///
    /// # Examples
    /// ```
    /// use channel_dispatcher::{Codec, Dispatcher};
    ///
    /// let builder = Dispatcher::builder()
    ///     .codec(Codec::Php)
    ///     .php_notification("NotifyRequest");
    /// ```
    #[cfg(feature = "php")]
    #[cfg_attr(docsrs, doc(cfg(feature = "php")))]
    pub fn php_notification(mut self, class: impl Into<String>) -> Self {
        self.config.notification_classes.push(class.into());
        self
    }

    /// The largest frame this side accepts, told to the peer in the handshake (a compliant
    /// peer fails a larger message before sending it). A larger length prefix ends the
    /// connection with [`ProtocolError::FrameTooLarge`](crate::ProtocolError::FrameTooLarge);
    /// nothing is allocated for it. Default: 16 MiB. (The same as setting
    /// [`Limits::max_frame_length`].)
    pub fn max_frame_length(mut self, bytes: usize) -> Self {
        self.config.limits.max_frame_length = bytes.min(u32::MAX as usize);
        self
    }

    /// Limits on what the peer may send (frame length, attributes, method names, pending
    /// work), announced to it in the handshake; counts of pending work of 0 are taken as 1.
    /// Default: [`Limits::default`].
    pub fn limits(mut self, limits: Limits) -> Self {
        let max_frame_length = limits.max_frame_length;
        self.config.limits = limits.normalized();
        self.max_frame_length(max_frame_length)
    }

    /// How long the peer has to complete the handshake. Default: 10 s.
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.config.handshake_timeout = timeout;
        self
    }

    /// How long `stop()` lets running handlers finish before dropping them. Default: 5 s.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.config.drain_timeout = timeout;
        self
    }

    /// The timeout of every call that sets none itself. Default: none (wait until answered or
    /// the connection ends).
    pub fn default_timeout(mut self, timeout: Duration) -> Self {
        self.default_timeout = Some(timeout);
        self
    }

    /// How many calls made through handles may await answers, and notifications wait to be
    /// written, at once; a further call or notification waits for one to finish (backpressure
    /// on the caller). They also wait while the peer holds as much of this side's work as it
    /// announced it accepts ([`Limits`]). Nested calls from handlers take none (they are
    /// bounded by the handlers that make them); notifications from handlers have as many
    /// permits of their own. Values over the semaphore's maximum (about 2^61) are capped.
    /// Default: 4096.
    pub fn max_in_flight(mut self, limit: usize) -> Self {
        self.max_in_flight = limit.max(1);
        self
    }

    /// How many payload bytes of calls and notifications made through handles may wait to be
    /// written at once (for room in the write buffer, or in the peer's window); a further one
    /// waits, as for [`max_in_flight`](Self::max_in_flight). Notifications from handlers have
    /// as much room of their own. A message larger than this takes all of it: it goes alone.
    /// With [`write_buffer_limit`](Self::write_buffer_limit), this bounds what a peer that
    /// stops reading makes this side hold. Default: 4 MiB.
    pub fn max_queued_bytes(mut self, bytes: usize) -> Self {
        self.max_queued_bytes = bytes.max(1);
        self
    }

    /// How many of the peer's requests and notifications are handled at once (nested requests
    /// aside: see [`Limits::max_nested_requests`]); beyond it, the peer's new work waits in
    /// admission, within the [`Limits`] announced to it. Reading never stops: answers,
    /// cancels and stream credit keep flowing.
    ///
    /// Handlers are futures polled by the connection's own task, not tasks of their own:
    /// a handler that blocks or burns CPU holds up the connection (spawn such work, or use
    /// `spawn_blocking`). Requests and notifications start in the order they arrived, and
    /// finish in whatever order their handlers do.
    ///
    /// A handler waiting for a nested call of its own to the peer still takes its slot; but
    /// when every slot is held that way, the next admitted message starts beyond the limit
    /// (the peer may need it to answer those very calls). Default: 1024.
    pub fn max_concurrent_handlers(mut self, limit: usize) -> Self {
        self.config.max_concurrent_handlers = limit.max(1);
        self
    }

    /// How many bytes may wait in the write buffer before the connection starts no new work
    /// of its own (calls from handles, handlers for the peer, stream items) until the
    /// transport has taken them. Answers, cancels and credit are still written. Default:
    /// 256 KiB.
    ///
    /// The buffer's hard cap is 4 times this plus the peer's largest frame: past it no handler
    /// is polled (no more answers are made), and past it for
    /// [`write_stall_timeout`](Self::write_stall_timeout) the peer is taken to have stopped
    /// reading and is cut off. So this side's unsent bytes stay within the hard cap plus one
    /// frame, and what waits to be sent within [`max_queued_bytes`](Self::max_queued_bytes)
    /// (twice: handles', handlers') plus the nested calls of running handlers.
    pub fn write_buffer_limit(mut self, bytes: usize) -> Self {
        self.config.write_buffer_limit = bytes.max(1);
        self
    }

    /// How long the write buffer may stay over its hard cap (see
    /// [`write_buffer_limit`](Self::write_buffer_limit)) before the connection ends with
    /// [`ProtocolError::NotReading`](crate::ProtocolError::NotReading). Default: 30 s.
    pub fn write_stall_timeout(mut self, timeout: Duration) -> Self {
        self.config.write_stall_timeout = timeout;
        self
    }

    /// The most streams this side stores for the peer at once ([`Streams`]); a handler that
    /// stores one more gets an [`code::OVERLOADED`](crate::error::code::OVERLOADED) error to
    /// answer with. Default: 1024.
    pub fn max_streams(mut self, streams: usize) -> Self {
        self.max_streams = streams;
        self
    }

    /// Adds a middleware to the outbound pipeline, which every outgoing request and
    /// notification (nested ones included) passes through before it is sent, as an
    /// [`OutgoingCall`]; the first added is the outermost. Its
    /// [`Next`](crate::middleware::Next) sends the message and returns the peer's answer (a
    /// [`RawResponse`](crate::RawResponse), or the [`CallError`](crate::CallError) the caller
    /// gets). A middleware that returns without calling `next` sends nothing: its answer or
    /// error is the caller's. Default: none.
    ///
    /// To wrap only the calls made through one handle with tower layers, wrap its
    /// [`Dispatcher::service`](crate::Dispatcher::service) instead.
    ///
    /// # Examples
    /// ```
    /// use channel_dispatcher::middleware::{from_fn, Next, OutgoingCall};
    /// use channel_dispatcher::Dispatcher;
    ///
    /// let with_token = from_fn(|mut call: OutgoingCall, next: Next<OutgoingCall>| {
    ///     call.attributes_mut().insert("token", "s3cret");
    ///     next.run(call)
    /// });
    /// let builder = Dispatcher::builder().outbound(with_token);
    /// ```
    pub fn outbound(mut self, middleware: impl Middleware<OutgoingCall>) -> Self {
        self.outbound.push(Arc::new(middleware));
        self
    }

    /// The window of the remote streams this side consumes: how many items the producer may
    /// send ahead of consumption (and so the most that are ever buffered).
    ///
    /// Without this setting the window starts at 1024 items and grows for a consumer that
    /// finds itself waiting for items (the credit's round trip is then what holds it back):
    /// it doubles each time, up to 16,384 items and never past about 1 MiB of items at their
    /// average size so far. A window set here (or on a stream, with
    /// [`RemoteStream::window`](crate::RemoteStream::window)) is fixed: larger ones keep a
    /// fast consumer from waiting on credit (see BENCHMARKS.md), smaller ones bound memory
    /// for large items.
    pub fn stream_window(mut self, items: u64) -> Self {
        self.stream_window = Some(items.max(1));
        self
    }

    /// How long a stream this side offers may go unconsumed (no pull, no credit) before it is
    /// released. Default: 60 s.
    pub fn stream_idle_timeout(mut self, timeout: Duration) -> Self {
        self.stream_idle_timeout = timeout;
        self
    }

    /// The token this side presents in the handshake. It goes out in the hello, before the
    /// peer's hello is checked, in clear unless the transport encrypts: across machines, use
    /// TLS (`tls:` addresses).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Refuses peers that do not present this token in the handshake (compared in constant
    /// time); the same as `.authenticator(SharedToken::new(token))`.
    pub fn expect_token(self, token: impl Into<String>) -> Self {
        self.authenticator(SharedToken::new(token))
    }

    /// Refuses the peer in the handshake with `reason`, whatever it presents (even another
    /// codec), as soon as its hello shows it is a peer.
    pub(crate) fn refuse_everyone(mut self, reason: String) -> Self {
        self.config.refuse_everyone = Some(reason);
        self
    }

    /// Decides in the handshake which peers may connect and who they are (see
    /// [`Authenticator`]); the identity reaches handlers in [`Context::peer`](crate::Context::peer). Replaces
    /// [`expect_token`](Self::expect_token). Default: every peer is accepted.
    pub fn authenticator(mut self, authenticator: impl Authenticator) -> Self {
        self.config.authenticator = Some(Arc::new(authenticator));
        self
    }

    /// Gives every handler of this connection `state`, which they borrow with
    /// [`Context::state`](crate::Context::state), as [`Router::with_state`](crate::Router::with_state) does for a
    /// router's handlers (for a type both give, this one wins). For state that differs
    /// per connection, such as a server's per-peer setup.
    pub fn with_state<T: Send + Sync + 'static>(mut self, state: T) -> Self {
        self.config.extensions.insert(state);
        self
    }

    /// What handler failures and panics become. Default: [`DefaultErrorHandler`].
    pub fn error_handler(mut self, error_handler: impl ErrorHandler) -> Self {
        self.config.error_handler = Arc::new(error_handler);
        self
    }

    /// Prepares the context of every inbound message. Default: none.
    pub fn context_factory(mut self, factory: impl ContextFactory) -> Self {
        self.config.context_factory = Some(Arc::new(factory));
        self
    }

    /// Sees every inbound envelope, before it is handled: for metrics, logs, debugging.
    /// It runs on the connection task: keep it short.
    pub fn on_inbound(
        mut self,
        observer: impl Fn(&InboundEnvelope<'_>) + Send + Sync + 'static,
    ) -> Self {
        self.config.observer = Some(Arc::new(observer) as Observer);
        self
    }
}

impl<S> Builder<S>
where
    S: Service<Incoming, Response = Reply> + Send + 'static,
    S::Error: IntoHandlerError,
    S::Future: Send + 'static,
{
    /// Builds the dispatcher and its [`Connection`], which the caller drives (await it or
    /// spawn it). Calls made before the handshake completes wait for it.
    #[must_use = "the connection does nothing until it is awaited or spawned, and dropping the \
                  Dispatcher stops it"]
    pub fn build(self, channel: Channel) -> (Dispatcher, Connection<S>) {
        static CONNECTIONS: AtomicU64 = AtomicU64::new(1);
        let (tx, rx) = crate::commands::channel();
        let streams = Streams::new(
            self.config.codec,
            self.stream_idle_timeout,
            self.max_streams,
        );
        let lifecycle = Arc::new(Lifecycle::new(
            self.config.limits,
            self.max_in_flight,
            self.max_queued_bytes,
            streams,
        ));
        let shared = Arc::new(Shared::new(
            tx,
            self.config.codec,
            Arc::clone(&lifecycle),
            self.default_timeout,
            (!self.outbound.is_empty()).then(|| self.outbound.into()),
            self.stream_window,
        ));
        let dispatcher = Dispatcher::from_shared(shared);
        let span = tracing::info_span!(
            "connection",
            id = CONNECTIONS.fetch_add(1, Ordering::Relaxed),
            transport = channel.label()
        );
        let parts = Parts {
            service: self.handler,
            config: self.config,
            commands: rx,
            shared: dispatcher.downgrade(),
            lifecycle,
            stop_deadline: None,
        };
        let connection = Connection::new(channel, self.token, parts, span);
        (dispatcher, connection)
    }

    /// Builds the dispatcher and spawns its connection on the current tokio runtime.
    ///
    /// The connection lives as long as a [`Dispatcher`] handle (or a call, stream or handler
    /// of it) does: dropping the last one says goodbye to the peer ("the peer dropped its last
    /// Dispatcher handle") and ends it. So keep the result, also on a side that only serves:
    ///
    /// ```compile_fail
    /// #![deny(unused_must_use)]
    /// # use channel_dispatcher::{Channel, Dispatcher};
    /// # async fn serve(channel: Channel) {
    /// Dispatcher::builder().spawn(channel); // error: stopped at once
    /// # }
    /// ```
    ///
    /// ```
    /// # use channel_dispatcher::{Channel, Dispatcher};
    /// # async fn serve(channel: Channel) {
    /// let dispatcher = Dispatcher::builder().spawn(channel);
    /// dispatcher.closed().await; // serve until the peer stops
    /// # }
    /// ```
    ///
    /// # Panics
    /// Outside a tokio runtime.
    #[must_use = "dropping the Dispatcher stops the connection at once; keep it, for example \
                  with `dispatcher.closed().await`"]
    pub fn spawn(self, channel: Channel) -> Dispatcher {
        let (dispatcher, connection) = self.build(channel);
        let span = connection.span().clone();
        tokio::spawn(connection.instrument(span));
        dispatcher
    }

    /// Builds the dispatcher, spawns its connection and waits for the handshake.
    ///
    /// The connection serves the peer from the moment its handshake is done, so the peer's
    /// first requests may reach the handlers before this returns: set up whatever the handlers
    /// need before calling it. Everything this side sends is sent after the handshake.
    ///
    /// # Errors
    /// The [`Termination`](crate::Termination) if the connection ended before or during the
    /// handshake, typically [`Termination::Handshake`](crate::Termination::Handshake).
    #[must_use = "dropping the Dispatcher stops the connection at once"]
    pub async fn connect(self, channel: Channel) -> Result<Dispatcher, crate::Termination> {
        let dispatcher = self.spawn(channel);
        dispatcher.shared.lifecycle.handshake_done().await?;
        Ok(dispatcher)
    }
}

impl<S: fmt::Debug> fmt::Debug for Builder<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("handler", &self.handler)
            .field("codec", &self.config.codec)
            .field("limits", &self.config.limits)
            .field("default_timeout", &self.default_timeout)
            .finish_non_exhaustive()
    }
}
