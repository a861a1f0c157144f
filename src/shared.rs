//! What the handles of one connection share with each other and with its driver: the command
//! queue to the driver ([`Command`]), and the connection's [`Lifecycle`] (how it ended, who to
//! tell, the peer's limits, the in-flight permits).
//!
//! A leaf: it knows envelopes, codecs, errors and the stream storage, nothing of the driver,
//! the handlers or the call futures, which all build on it (the caller-side middleware is only
//! named, as the trait objects it keeps).

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;

use crate::codec::Codec;
use crate::envelope::Method;
use crate::error::{CallError, CodecError, RemoteError, Termination};
use crate::limits::Limits;
use crate::message::Attributes;
use crate::middleware::{Middleware, OutgoingCall};
use crate::peer::PeerInfo;
use crate::stream::storage::Streams;

/// What the handles share; the driver holds it weakly, so dropping every handle stops it.
pub(crate) struct Shared {
    pub(crate) commands: crate::commands::CommandSender,
    /// The slots of the calls' answers.
    pub(crate) answers: Arc<crate::answers::Answers>,
    next_id: AtomicU64,
    pub(crate) codec: Codec,
    pub(crate) lifecycle: Arc<Lifecycle>,
    pub(crate) default_timeout: Option<Duration>,
    /// The caller-side pipeline, if any (`Builder::outbound`).
    pub(crate) outbound: Option<Arc<[Arc<dyn Middleware<OutgoingCall>>]>>,
    /// The window of remote streams (`Builder::stream_window`), and whether it may grow (it
    /// was not set).
    pub(crate) stream_window: u64,
    pub(crate) stream_window_grows: bool,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // A driver still in its handshake sees that every handle is gone.
        self.lifecycle.handshaking.wake();
    }
}

/// An outbound call or notification, as queued for the driver.
#[derive(Debug)]
pub(crate) struct Outbound {
    pub(crate) method: Method,
    pub(crate) attributes: Attributes,
    pub(crate) payload: Bytes,
    /// The in-flight permit it holds until written (a notification) or answered (a call).
    pub(crate) permit: Permit,
    /// The queued bytes it holds (of its permit's class) until written.
    pub(crate) queued: u32,
    /// The peer's request whose handler makes this call, if `nested` (any id: 0 is a PHP
    /// peer's first, and "none" only on the native wire). Not an `Option`: the flag fits
    /// beside the permit, and a command stays small enough to move without `memcpy`.
    parent_id: u64,
    nested: bool,
}

impl Outbound {
    pub(crate) fn new(
        method: Method,
        attributes: Attributes,
        payload: Bytes,
        permit: Permit,
        queued: u32,
        parent: Option<u64>,
    ) -> Self {
        Self {
            method,
            attributes,
            payload,
            permit,
            queued,
            parent_id: parent.unwrap_or(0),
            nested: parent.is_some(),
        }
    }

    /// The peer's request whose handler makes this call, if any.
    pub(crate) fn parent(&self) -> Option<u64> {
        self.nested.then_some(self.parent_id)
    }

    /// Makes it an ordinary call, not nested in a peer's request.
    pub(crate) fn not_nested(&mut self) {
        self.nested = false;
    }
}

/// Which in-flight permit a message holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Permit {
    /// None: a nested call (bounded by the handlers that make them).
    None,
    /// One of `Builder::max_in_flight`, for calls and notifications made through handles.
    Handle,
    /// One of as many again, for notifications made by handlers. They must not wait for the
    /// handles' permits, which calls waiting on those very handlers may hold.
    Handler,
}

/// The answer to a call, as it arrived: payload still encoded, attributes the peer sent back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawResponse {
    /// The encoded payload.
    pub payload: Bytes,
    /// Attributes set by the peer's handler or middleware.
    pub attributes: Attributes,
    pub(crate) codec: Codec,
}

impl RawResponse {
    /// Decodes the payload.
    ///
    /// # Errors
    /// A [`CodecError`] when the payload is not a `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, CodecError> {
        self.codec.decode(&self.payload)
    }
}

/// What the connection task hands a consumer.
#[derive(Debug)]
pub(crate) enum StreamEvent {
    Items { position: u64, payload: Bytes },
    End(Option<RemoteError>),
    Terminated(Termination),
}

/// An answer to a call, as the driver delivers it.
/// The error boxed: it is rare, and an answer waits in a slot (one per pending call).
pub(crate) type RawAnswer = Result<RawResponse, Box<CallError>>;

pub(crate) type ReplySender = crate::answers::AnswerSender;

#[derive(Debug)]
pub(crate) enum Command {
    Call {
        id: u64,
        call: Outbound,
        /// When the caller stops waiting; the peer is told the time left when it is written.
        deadline: Option<Instant>,
        reply: ReplySender,
    },
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

impl Shared {
    pub(crate) fn new(
        commands: crate::commands::CommandSender,
        codec: Codec,
        lifecycle: Arc<Lifecycle>,
        default_timeout: Option<Duration>,
        outbound: Option<Arc<[Arc<dyn Middleware<OutgoingCall>>]>>,
        stream_window: Option<u64>,
    ) -> Self {
        Self {
            commands,
            answers: Arc::default(),
            next_id: AtomicU64::new(1),
            codec,
            lifecycle,
            default_timeout,
            outbound,
            stream_window: stream_window.unwrap_or(crate::stream::DEFAULT_WINDOW),
            stream_window_grows: stream_window.is_none(),
        }
    }

    /// Queues a command for the driver; `Err` when it is gone.
    pub(crate) fn send_command(&self, command: Command) -> Result<(), ()> {
        self.commands.send(command).map_err(drop)
    }

    /// A new request id: from 1 upwards (0 stands for "no request" on the wire).
    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The error for a call that cannot be made because the connection is stopping or over.
    pub(crate) fn terminated(&self) -> CallError {
        CallError::Terminated(self.lifecycle.reason_or(Termination::Stopped))
    }

    /// Fails when the message is over one of the peer's limits, or cannot fit in one of its
    /// frames (a lower bound of its size; the driver checks the exact size).
    pub(crate) fn check_limits(
        &self,
        method: &Method,
        attributes: &Attributes,
        payload: &Bytes,
    ) -> Result<(), CallError> {
        let peer = self.lifecycle.peer_limits();
        peer.check_parts(Some(method.as_str()), attributes)?;
        let size = payload.len() + method.as_str().len() + attributes.encoded_len_hint();
        Limits::check_frame(size, peer.max_frame_length)?;
        Ok(())
    }

    /// Takes an in-flight permit of the kind and room for `len` queued bytes, waiting for
    /// them when they are taken; the queued bytes it holds.
    pub(crate) async fn admit(&self, permit: Permit, len: usize) -> Result<u32, CallError> {
        match self.lifecycle.permits(permit) {
            Some(permits) => permits.acquire(len).await.ok_or_else(|| self.terminated()),
            None => Ok(0),
        }
    }

    /// Takes an in-flight permit of the kind and room for `len` queued bytes, if free.
    pub(crate) fn try_admit(&self, permit: Permit, len: usize) -> Option<u32> {
        match self.lifecycle.permits(permit) {
            Some(permits) => permits.try_acquire(len),
            None => Some(0),
        }
    }

    /// Room for `len` queued bytes of a handle's call whose in-flight permit is reserved.
    pub(crate) fn try_admit_bytes(&self, len: usize) -> Option<u32> {
        self.lifecycle.handle_permits.try_acquire_bytes(len)
    }

    /// As [`try_admit_bytes`](Self::try_admit_bytes), waiting for the room.
    pub(crate) async fn admit_bytes(&self, len: usize) -> Result<u32, CallError> {
        let permits = &self.lifecycle.handle_permits;
        permits
            .acquire_bytes(len)
            .await
            .ok_or_else(|| self.terminated())
    }
}

/// A handle's in-flight permit taken ahead of its call (a tower `poll_ready`): given back when
/// dropped, unless a call took it over.
pub(crate) struct Reserved(Arc<Shared>);

impl Reserved {
    /// Takes a permit if one is free.
    pub(crate) fn try_new(shared: &Arc<Shared>) -> Option<Self> {
        let count = &shared.lifecycle.handle_permits.count;
        count.try_acquire().ok()?.forget();
        Some(Self(Arc::clone(shared)))
    }

    /// Waits for a permit; `None` once the connection ended.
    pub(crate) async fn new(shared: Arc<Shared>) -> Option<Self> {
        let count = &shared.lifecycle.handle_permits.count;
        count.acquire().await.ok()?.forget();
        Some(Self(shared))
    }

    /// The permit now belongs to the call that was admitted with it.
    pub(crate) fn take_over(self) {
        std::mem::forget(self);
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.0.lifecycle.release(Permit::Handle, 1, 0);
    }
}

impl std::fmt::Debug for Reserved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reserved")
    }
}

/// The part of a connection that outlives its handles: how it ended, and who to tell.
pub(crate) struct Lifecycle {
    /// Set as soon as the connection stops taking calls.
    stopping: AtomicBool,
    /// The driver before its handshake is done, to wake when the handles stop or go.
    handshaking: AtomicWaker,
    reason: OnceLock<Termination>,
    state: watch::Sender<State>,
    on_stop: Mutex<Option<Vec<StopCallback>>>,
    /// Our own limits, which stand for the peer's until its hello arrives.
    own_limits: Limits,
    peer_limits: OnceLock<Limits>,
    peer: OnceLock<PeerInfo>,
    /// Calls and queued notifications made through handles (`Builder::max_in_flight`).
    handle_permits: Permits,
    /// Queued notifications made by handlers (as many).
    handler_permits: Permits,
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

thread_local! {
    /// The lifecycle whose driver is polling handlers on this thread right now (its address).
    static POLLING_HANDLERS: Cell<usize> = const { Cell::new(0) };
}

/// Marks the current thread as polling one connection's handlers until dropped.
pub(crate) struct PollingHandlers {
    previous: usize,
}

impl Drop for PollingHandlers {
    fn drop(&mut self) {
        POLLING_HANDLERS.with(|current| current.set(self.previous));
    }
}

impl Lifecycle {
    pub(crate) fn new(
        limits: Limits,
        max_in_flight: usize,
        max_queued_bytes: usize,
        streams: Streams,
    ) -> Self {
        Self {
            streams,
            handle_permits: Permits::new(max_in_flight, max_queued_bytes),
            handler_permits: Permits::new(max_in_flight, max_queued_bytes),
            pending_calls: AtomicUsize::new(0),
            running_handlers: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            handshaking: AtomicWaker::new(),
            reason: OnceLock::new(),
            state: watch::Sender::new(State::Handshaking),
            on_stop: Mutex::new(Some(Vec::new())),
            own_limits: limits,
            peer_limits: OnceLock::new(),
            peer: OnceLock::new(),
        }
    }

    pub(crate) fn reason_or(&self, fallback: Termination) -> Termination {
        self.reason.get().cloned().unwrap_or(fallback)
    }

    /// `true` once the connection stopped taking calls.
    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Marks the connection stopping (new calls fail at once).
    pub(crate) fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Release);
        self.handshaking.wake();
    }

    /// Registers the driver that is still handshaking, woken by [`set_stopping`] and by the
    /// last handle going.
    ///
    /// [`set_stopping`]: Self::set_stopping
    pub(crate) fn register_handshaking(&self, waker: &std::task::Waker) {
        self.handshaking.register(waker);
    }

    /// The limits the peer announced, or ours until it has.
    /// The peer, once the handshake is done.
    pub(crate) fn peer(&self) -> Option<&PeerInfo> {
        self.peer.get()
    }

    pub(crate) fn peer_limits(&self) -> Limits {
        self.peer_limits.get().copied().unwrap_or(self.own_limits)
    }

    /// The limits the peer announced, once it has.
    pub(crate) fn announced_peer_limits(&self) -> Option<Limits> {
        self.peer_limits.get().copied()
    }

    pub(crate) async fn closed(&self) -> Termination {
        let mut rx = self.state.subscribe();
        let _ = rx.wait_for(|state| *state == State::Closed).await;
        self.reason_or(Termination::Stopped)
    }

    /// `true` once the connection has ended.
    pub(crate) fn is_closed(&self) -> bool {
        *self.state.borrow() == State::Closed
    }

    /// Waits for the end of the handshake: `Err` when the connection ended instead.
    pub(crate) async fn handshake_done(&self) -> Result<(), Termination> {
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

    pub(crate) fn set_ready(&self, peer_limits: Limits, peer: PeerInfo) {
        let _ = self.peer.set(peer);
        let _ = self.peer_limits.set(peer_limits);
        self.state.send_if_modified(|state| {
            let handshaking = *state == State::Handshaking;
            if handshaking {
                *state = State::Ready;
            }
            handshaking
        });
    }

    pub(crate) fn on_stop(&self, callback: StopCallback) {
        let mut slot = self.on_stop.lock().unwrap_or_else(|e| e.into_inner());
        match slot.as_mut() {
            Some(callbacks) => callbacks.push(callback),
            None => {
                drop(slot);
                run_callback(callback, &self.reason_or(Termination::Stopped));
            }
        }
    }

    fn permits(&self, permit: Permit) -> Option<&Permits> {
        match permit {
            Permit::None => None,
            Permit::Handle => Some(&self.handle_permits),
            Permit::Handler => Some(&self.handler_permits),
        }
    }

    /// Gives back `count` in-flight permits of a kind, and `bytes` of its queued room.
    pub(crate) fn release(&self, permit: Permit, count: usize, bytes: usize) {
        if let Some(permits) = self.permits(permit) {
            permits.release(count, bytes);
        }
    }

    /// Publishes the driver's counters.
    pub(crate) fn set_counts(&self, pending_calls: usize, running_handlers: usize) {
        self.pending_calls.store(pending_calls, Ordering::Relaxed);
        self.running_handlers
            .store(running_handlers, Ordering::Relaxed);
    }

    pub(crate) fn pending_calls(&self) -> usize {
        self.pending_calls.load(Ordering::Relaxed)
    }

    pub(crate) fn running_handlers(&self) -> usize {
        self.running_handlers.load(Ordering::Relaxed)
    }

    /// Records why the connection ends; the first reason wins.
    pub(crate) fn set_reason(&self, reason: Termination) {
        self.set_stopping();
        let _ = self.reason.set(reason);
    }

    /// Runs the `on_stop` callbacks (once, each panic-isolated) and wakes everyone waiting in
    /// `closed()`. Safe to call again: later calls do nothing new.
    pub(crate) fn finish(&self) {
        self.set_stopping();
        // Callers waiting for a permit fail with the reason instead of waiting forever.
        self.handle_permits.close();
        self.handler_permits.close();
        self.streams.close();
        self.set_counts(0, 0);
        let reason = self.reason_or(Termination::Stopped);
        let callbacks = self
            .on_stop
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        for callback in callbacks.into_iter().flatten() {
            run_callback(callback, &reason);
        }
        self.state.send_replace(State::Closed);
    }

    /// Marks this thread as polling this connection's handlers (see [`Self::polled_by_handler`]).
    pub(crate) fn enter_handlers(&self) -> PollingHandlers {
        let me = self as *const Self as usize;
        PollingHandlers {
            previous: POLLING_HANDLERS.with(|current| current.replace(me)),
        }
    }

    /// `true` when called from one of this connection's handlers, as its driver polls it.
    pub(crate) fn polled_by_handler(&self) -> bool {
        POLLING_HANDLERS.with(|current| current.get() == self as *const Self as usize)
    }
}

/// One class of in-flight permits: how many messages may be in flight, and how many of their
/// payload bytes may wait to be written (a message larger than all the room takes all of it,
/// so it goes alone).
struct Permits {
    count: Semaphore,
    bytes: Semaphore,
    max_bytes: usize,
}

impl Permits {
    fn new(count: usize, max_bytes: usize) -> Self {
        let max_bytes = max_bytes.clamp(1, u32::MAX as usize);
        Self {
            count: Semaphore::new(count.min(Semaphore::MAX_PERMITS)),
            bytes: Semaphore::new(max_bytes),
            max_bytes,
        }
    }

    fn bytes_for(&self, len: usize) -> u32 {
        len.clamp(1, self.max_bytes) as u32
    }

    /// `None` once closed (the connection ended).
    async fn acquire(&self, len: usize) -> Option<u32> {
        let bytes = self.bytes_for(len);
        // NB. Both are kept only once both are held: a caller that gives up while it waits
        // for the bytes gives the count back.
        let count = self.count.acquire().await.ok()?;
        self.bytes.acquire_many(bytes).await.ok()?.forget();
        count.forget();
        Some(bytes)
    }

    fn try_acquire_bytes(&self, len: usize) -> Option<u32> {
        let bytes = self.bytes_for(len);
        self.bytes.try_acquire_many(bytes).ok()?.forget();
        Some(bytes)
    }

    async fn acquire_bytes(&self, len: usize) -> Option<u32> {
        let bytes = self.bytes_for(len);
        self.bytes.acquire_many(bytes).await.ok()?.forget();
        Some(bytes)
    }

    fn try_acquire(&self, len: usize) -> Option<u32> {
        let bytes = self.bytes_for(len);
        self.count.try_acquire().ok()?.forget();
        match self.bytes.try_acquire_many(bytes) {
            Ok(room) => room.forget(),
            Err(_) => {
                self.count.add_permits(1);
                return None;
            }
        }
        Some(bytes)
    }

    fn release(&self, count: usize, bytes: usize) {
        if count > 0 {
            self.count.add_permits(count);
        }
        if bytes > 0 {
            self.bytes.add_permits(bytes);
        }
    }

    fn close(&self) {
        self.count.close();
        self.bytes.close();
    }
}

fn run_callback(callback: StopCallback, reason: &Termination) {
    if catch_unwind(AssertUnwindSafe(|| callback(reason))).is_err() {
        tracing::error!("an on_stop callback panicked; the others still run");
    }
}
