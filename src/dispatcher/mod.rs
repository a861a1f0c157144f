//! The [`Dispatcher`] handle, its [`Builder`] and the [`Connection`] that drives one channel.
//!
//! A dispatcher is two parts: a cheap, cloneable handle that user code calls through, and one
//! connection task that owns the channel, reads and writes frames, keeps the table of calls
//! awaiting answers and runs the handlers for inbound requests. They talk over one queue.

mod builder;
mod call;
mod connection;
mod in_flight;

use std::fmt;
use std::future::IntoFuture;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

pub use builder::{Builder, InboundEnvelope};
pub use call::{Call, RawResponse, ResponseFuture};
pub use connection::Connection;
pub(crate) use in_flight::RequestOver;

use crate::codec::Codec;
use crate::context::Context;
use crate::envelope::Method;
use crate::error::HandlerError;
use crate::error::{CallError, Termination};
use crate::handler::{Incoming, Reply, Router};
use crate::limits::Limits;
use crate::message::{Attributes, Notification, Request, StreamRequest};
use crate::middleware::Endpoint;
use crate::middleware::{Middleware, Next};
use crate::stream::{RemoteStream, StreamEvent, Streams};

/// A handle to one connection: send requests and notifications to the peer, stop it, watch it
/// end. Cheap to clone; every clone talks to the same connection.
///
/// Dropping every handle (and every call in flight) stops the connection gracefully, as
/// [`stop`](Self::stop) does. Handlers get a weak handle through their [`Context`](crate::Context),
/// so they never keep a connection alive by themselves.
///
/// # Examples
/// ```
/// use channel_dispatcher::{request, Channel, Context, Dispatcher, HandlerError, Router};
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
///         Ok::<_, HandlerError>(n + 1)
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

/// What the handles share; the connection task holds it weakly.
pub(crate) struct Shared {
    commands: mpsc::UnboundedSender<Command>,
    next_id: AtomicU64,
    codec: Codec,
    lifecycle: Arc<Lifecycle>,
    default_timeout: Option<std::time::Duration>,
    limits: Limits,
    /// The caller-side pipeline, if any (`Builder::outbound`).
    outbound: Option<Arc<[Arc<dyn Middleware>]>>,
    /// The default window of remote streams (`Builder::stream_window`).
    stream_window: u64,
}

/// The part of a connection that outlives its handles: how it ended, and who to tell.
pub(crate) struct Lifecycle {
    /// Set as soon as the connection stops taking calls.
    stopping: AtomicBool,
    reason: OnceLock<Termination>,
    state: watch::Sender<State>,
    on_stop: Mutex<Option<Vec<StopCallback>>>,
    /// The peer's maximum frame length, known after the handshake.
    peer_max_frame: AtomicUsize,
    /// Calls and queued notifications made through handles (`Builder::max_in_flight`).
    permits: Semaphore,
    /// The streams this side offers the peer.
    pub(crate) streams: Streams,
    pending_calls: AtomicUsize,
    running_handlers: AtomicUsize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Handshaking,
    Ready,
    Closed,
}

type StopCallback = Box<dyn FnOnce(&Termination) + Send>;

/// An outbound call or notification, as queued for the connection task.
#[derive(Debug)]
pub(crate) struct Outbound {
    /// Holds one of the in-flight permits, which the connection task gives back.
    pub(crate) limited: bool,
    pub(crate) id: u64,
    pub(crate) method: Method,
    pub(crate) attributes: Attributes,
    pub(crate) timeout_us: u64,
    pub(crate) payload: Bytes,
}

pub(crate) type ReplySender = oneshot::Sender<Result<RawResponse, CallError>>;

#[derive(Debug)]
pub(crate) enum Command {
    Call(Outbound, ReplySender),
    Notify(Outbound),
    Cancel(u64),
    Stop,
    /// A consumer starts reading the peer's stream: route its items here, grant `credit`.
    OpenStream {
        stream: u64,
        events: mpsc::UnboundedSender<StreamEvent>,
        credit: u64,
    },
    GrantCredit {
        stream: u64,
        credit: u64,
    },
    CancelStream {
        stream: u64,
    },
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
        RemoteStream::opening(Arc::clone(&self.shared), answer, self.shared.stream_window)
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
    /// at once, unless [`Builder::max_in_flight`] messages are queued or awaiting answers
    /// already, in which case it waits for room (backpressure).
    ///
    /// # Errors
    /// [`CallError::Terminated`] once the connection is stopping; [`CallError::Encode`] or
    /// [`CallError::Limit`] for a message that cannot be sent.
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
        self.shared
            .send_notification(Method::from_static(N::METHOD), attributes, payload, true)
            .await
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
        self.shared
            .send_notification(Method::from(method.into()), attributes, payload, true)
            .await
    }

    /// Calls sent and not yet answered (as of the connection task's last turn).
    pub fn pending_calls(&self) -> usize {
        self.shared.lifecycle.pending_calls.load(Ordering::Relaxed)
    }

    /// The peer's requests and notifications being handled (as of the connection task's last
    /// turn).
    pub fn running_handlers(&self) -> usize {
        self.shared
            .lifecycle
            .running_handlers
            .load(Ordering::Relaxed)
    }

    /// Stops gracefully and waits until the connection has ended.
    ///
    /// New calls fail at once with [`CallError::Terminated`]; queued messages are written;
    /// handlers running for the peer may finish (up to the drain timeout,
    /// [`Builder::drain_timeout`]); calls still awaiting answers fail with
    /// `Terminated(Stopped)`; a goodbye is sent and the channel closed. Calling it again, or
    /// after the connection ended, just waits for (or returns) the same end.
    pub async fn stop(&self) -> Termination {
        self.shared
            .lifecycle
            .stopping
            .store(true, Ordering::Release);
        let _ = self.shared.commands.send(Command::Stop);
        self.closed().await
    }

    /// Waits until the connection has ended, and says why.
    pub async fn closed(&self) -> Termination {
        self.shared.lifecycle.closed().await
    }

    /// `true` once the connection has stopped taking calls (stopping or ended).
    pub fn is_closed(&self) -> bool {
        self.shared.lifecycle.stopping.load(Ordering::Acquire)
    }

    /// Runs `callback` once when the connection ends (at once if it has ended already).
    ///
    /// Every callback runs exactly once, on the connection task, after every pending call has
    /// failed; keep it short.
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
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

// ===== impl Shared =====

impl Shared {
    pub(crate) fn codec(&self) -> Codec {
        self.codec
    }

    pub(crate) fn lifecycle(&self) -> &Lifecycle {
        &self.lifecycle
    }

    pub(crate) fn stream_window(&self) -> u64 {
        self.stream_window
    }

    /// Queues a command for the connection task; `Err` when it is gone.
    pub(crate) fn send_command(&self, command: Command) -> Result<(), ()> {
        self.commands.send(command).map_err(drop)
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The error for a call that cannot be made because the connection is stopping or over.
    pub(crate) fn terminated(&self) -> CallError {
        CallError::Terminated(self.lifecycle.reason_or(Termination::Stopped))
    }

    /// Fails when the message is over a limit, or cannot fit in one of the peer's frames (a
    /// lower bound of its size; the connection task checks the exact size).
    fn check_limits(
        &self,
        method: &Method,
        attributes: &Attributes,
        payload: &Bytes,
    ) -> Result<(), CallError> {
        self.limits.check_parts(Some(method.as_str()), attributes)?;
        let size = payload.len() + method.as_str().len() + attributes.encoded_len_hint();
        let max = self.lifecycle.peer_max_frame.load(Ordering::Relaxed);
        Limits::check_frame(size, max)?;
        Ok(())
    }

    /// Takes one in-flight permit, waiting for one when all are taken.
    pub(crate) async fn admit(&self) -> Result<(), CallError> {
        match self.lifecycle.permits.try_acquire() {
            Ok(permit) => permit.forget(),
            Err(_) => match self.lifecycle.permits.acquire().await {
                Ok(permit) => permit.forget(),
                Err(_) => return Err(self.terminated()),
            },
        }
        Ok(())
    }

    pub(crate) async fn send_notification(
        self: &Arc<Self>,
        method: Method,
        attributes: Attributes,
        payload: Bytes,
        limited: bool,
    ) -> Result<(), CallError> {
        let Some(middlewares) = self.outbound.clone() else {
            return self
                .queue_notification(method, attributes, payload, limited)
                .await;
        };
        // Through the caller-side pipeline: at its end, the notification is queued.
        let context = Context::outbound(
            Arc::downgrade(self),
            self.codec,
            None,
            method,
            attributes,
            None,
        );
        let incoming = Incoming { context, payload };
        let shared = Arc::clone(self);
        let endpoint: Endpoint = Box::new(move |incoming: Incoming| {
            Box::pin(async move {
                let (context, payload) = incoming.into_parts();
                let (method, attributes) = context.into_call_parts();
                shared
                    .queue_notification(method, attributes, payload, limited)
                    .await
                    .map(|()| Reply::nothing())
                    .map_err(HandlerError::from_call)
            })
        });
        match Next::new(middlewares, endpoint).run(incoming).await {
            Ok(_) => Ok(()),
            Err(error) => Err(error.into_call_error()),
        }
    }

    async fn queue_notification(
        &self,
        method: Method,
        attributes: Attributes,
        payload: Bytes,
        limited: bool,
    ) -> Result<(), CallError> {
        if self.lifecycle.stopping.load(Ordering::Acquire) {
            return Err(self.terminated());
        }
        self.check_limits(&method, &attributes, &payload)?;
        if limited {
            self.admit().await?;
        }
        let outbound = Outbound {
            limited,
            id: 0,
            method,
            attributes,
            timeout_us: 0,
            payload,
        };
        self.commands.send(Command::Notify(outbound)).map_err(|_| {
            self.lifecycle.release(limited);
            self.terminated()
        })
    }
}

// ===== impl Lifecycle =====

impl Lifecycle {
    pub(crate) fn new(max_frame: usize, max_in_flight: usize, streams: Streams) -> Self {
        Self {
            streams,
            permits: Semaphore::new(max_in_flight),
            pending_calls: AtomicUsize::new(0),
            running_handlers: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            reason: OnceLock::new(),
            state: watch::Sender::new(State::Handshaking),
            on_stop: Mutex::new(Some(Vec::new())),
            peer_max_frame: AtomicUsize::new(max_frame),
        }
    }

    pub(crate) fn reason_or(&self, fallback: Termination) -> Termination {
        self.reason.get().cloned().unwrap_or(fallback)
    }

    async fn closed(&self) -> Termination {
        let mut rx = self.state.subscribe();
        let _ = rx.wait_for(|state| *state == State::Closed).await;
        self.reason_or(Termination::Stopped)
    }

    /// Waits for the end of the handshake: `Err` when the connection ended instead.
    async fn handshake_done(&self) -> Result<(), Termination> {
        let mut rx = self.state.subscribe();
        let state = match rx.wait_for(|state| *state != State::Handshaking).await {
            Ok(state) => *state,
            Err(_) => State::Closed,
        };
        match state {
            State::Closed => Err(self.reason_or(Termination::Stopped)),
            _ => Ok(()),
        }
    }

    pub(crate) fn set_ready(&self, peer_max_frame: usize) {
        self.peer_max_frame.store(peer_max_frame, Ordering::Relaxed);
        self.state.send_if_modified(|state| {
            let handshaking = *state == State::Handshaking;
            if handshaking {
                *state = State::Ready;
            }
            handshaking
        });
    }

    fn on_stop(&self, callback: StopCallback) {
        let mut slot = self.on_stop.lock().unwrap_or_else(|e| e.into_inner());
        match slot.as_mut() {
            Some(callbacks) => callbacks.push(callback),
            None => {
                drop(slot);
                callback(&self.reason_or(Termination::Stopped));
            }
        }
    }

    /// Gives back the in-flight permit of a message that held one.
    pub(crate) fn release(&self, limited: bool) {
        self.release_many(usize::from(limited));
    }

    pub(crate) fn release_many(&self, permits: usize) {
        if permits > 0 {
            self.permits.add_permits(permits);
        }
    }

    /// Publishes the connection task's counters.
    pub(crate) fn set_counts(&self, pending_calls: usize, running_handlers: usize) {
        self.pending_calls.store(pending_calls, Ordering::Relaxed);
        self.running_handlers
            .store(running_handlers, Ordering::Relaxed);
    }

    /// Records why the connection ends; the first reason wins.
    pub(crate) fn set_reason(&self, reason: Termination) {
        self.stopping.store(true, Ordering::Release);
        let _ = self.reason.set(reason);
    }

    /// Runs the `on_stop` callbacks (once) and wakes everyone waiting in `closed()`.
    pub(crate) fn finish(&self) {
        // Callers waiting for a permit fail with the reason instead of waiting forever.
        self.permits.close();
        self.set_counts(0, 0);
        let reason = self.reason_or(Termination::Stopped);
        let callbacks = self
            .on_stop
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        for callback in callbacks.into_iter().flatten() {
            callback(&reason);
        }
        self.state.send_replace(State::Closed);
    }
}
