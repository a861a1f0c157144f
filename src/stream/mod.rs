//! Remote streams: a large result consumed lazily, as a `futures::Stream`, without a round
//! trip per item.
//!
//! The producer keeps a stream in its connection's [`Streams`] storage and answers its id; the
//! consumer wraps the id in a [`RemoteStream`], an ordinary `futures::Stream` that can move
//! between tasks. Two modes:
//!
//! - **windowed** (the default): the consumer grants credit for a window of items; the producer
//!   sends up to that many without waiting, batched into as few frames as possible; the consumer
//!   renews credit as it consumes. A slow consumer makes the producer wait, so at most a window
//!   of items is ever buffered. The default window grows for a consumer that waits for items
//!   (up to 16,384 items and about 1 MiB of them); one set by hand stays as set (see
//!   [`Builder::stream_window`](crate::Builder::stream_window)).
//! - **pull**: one request per item, answered with the item and its position (the PHP
//!   original's remote iterators work this way).
//!
//! A typed streaming request does the open in one step: declare it with
//! [`stream_request!`](crate::stream_request!), serve it with
//! [`Router::stream`](crate::Router::stream) (the handler returns any `Stream`), and consume it
//! with [`Dispatcher::stream`](crate::Dispatcher::stream).
//!
//! Dropping a `RemoteStream` tells the producer, which drops its stream; a stream that ends is
//! released on both sides; a stored stream nobody consumes is released after an idle time; and
//! stopping the connection disposes every local stream and ends every remote one with
//! [`CallError::Terminated`].
//!
//! # Examples
//! ```
//! use channel_dispatcher::{stream_request, Channel, Context, Dispatcher, Router};
//! use futures_util::StreamExt;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Count(u32);
//! stream_request!(Count => u32, "count");
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let (a, b) = Channel::pair();
//! let router = Router::new().stream(|_cx: Context, Count(n)| async move {
//!     Ok(futures_util::stream::iter((0..n).map(Ok)))
//! });
//! let _server = Dispatcher::builder().handler(router).spawn(b);
//! let client = Dispatcher::builder().spawn(a);
//!
//! let items: Vec<u32> = client.stream(Count(5)).map(Result::unwrap).collect().await;
//! assert_eq!(items, [0, 1, 2, 3, 4]);
//! # }
//! ```

pub(crate) mod storage;

use std::collections::VecDeque;
use std::fmt;
use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::Stream;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

pub use storage::{StreamStatus, Streams};

use crate::codec::EncodedItems;
use crate::dispatcher::ResponseFuture;
use crate::error::{CallError, RemoteError, Termination};
use crate::shared::{Command, RawResponse, Shared, StreamEvent};

/// The reserved method of a pull-mode request: its payload is the stream id, its answer the
/// next item as a one-item sequence (empty at the end) with the position in an attribute.
pub(crate) const PULL_METHOD: &str = "$stream/next";
/// The attribute carrying a pulled item's position.
pub(crate) const POSITION_ATTRIBUTE: &str = "stream-position";

/// The window a stream starts with when none is set.
pub(crate) const DEFAULT_WINDOW: u64 = 1024;
/// How far a default window grows, in items.
const MAX_GROWN_WINDOW: u64 = 16 * DEFAULT_WINDOW;
/// How far a default window grows, in bytes of items at their average size so far.
const MAX_GROWN_BYTES: u64 = 1 << 20;

/// A stream of items produced by the peer: a `futures::Stream` of `Result<T, CallError>`.
///
/// After an error item the stream ends. See the [module docs](self).
///
/// With MessagePack, the items of a batch are decoded one at a time, as they are taken: a
/// batch that a peer got wrong (cut short, or with an item that is not a `T`) yields the
/// items before the fault, then a [`CallError::Decode`] item. The other codecs decode a
/// batch whole, so such a batch yields the error item alone.
///
/// # Cancellation
/// Dropping it tells the producer, which drops its stream.
#[must_use = "streams do nothing unless polled"]
pub struct RemoteStream<T> {
    shared: Option<Arc<Shared>>,
    state: State,
    window: u64,
    /// Whether `window` may grow when the consumer waits for items (it was not set).
    grows: bool,
    /// Items and payload bytes received, for their average size.
    received: (u64, u64),
    /// Items received when the window last grew: it grows once per wait at most.
    grown_at: u64,
    /// Items yielded since the last credit grant.
    consumed: u64,
    /// Items received, decoded (see `encoded`).
    buffer: VecDeque<T>,
    /// Items received, still encoded, for a codec that splits a batch without decoding it;
    /// they come after `buffer`'s.
    encoded: Option<EncodedItems>,
    /// Position of the next item in `buffer` or `encoded`.
    next_position: u64,
    /// Position of the last item yielded.
    position: Option<u64>,
    /// The peer's request whose handler consumes this stream, if any: pulls are nested.
    parent: Option<u64>,
    _item: PhantomData<fn() -> T>,
}

enum State {
    /// The streaming request is in flight; its answer is the stream id.
    Opening {
        answer: ResponseFuture<u64>,
        pull: bool,
    },
    /// Built from a known id; starts at the first poll (so `window` and `pull_mode` apply).
    Unopened {
        id: u64,
        pull: bool,
    },
    Windowed {
        id: u64,
        events: mpsc::UnboundedReceiver<StreamEvent>,
    },
    Pulling {
        id: u64,
        next: Option<ResponseFuture<RawResponse>>,
    },
    /// An error to yield, then the end.
    Failing(Option<CallError>),
    Done,
}

impl<T: DeserializeOwned> RemoteStream<T> {
    /// The stream whose opening call is `answer`; `parent` is the peer's request whose
    /// handler opens it, if any: its pull requests are nested in that request too.
    pub(crate) fn opening(
        shared: Arc<Shared>,
        answer: ResponseFuture<u64>,
        window: u64,
        parent: Option<u64>,
    ) -> Self {
        let mut stream = Self::with_state(
            Some(shared),
            State::Opening {
                answer,
                pull: false,
            },
            window,
        );
        stream.parent = parent;
        stream
    }

    /// A stream that yields `error`, then ends.
    pub(crate) fn failed(error: CallError) -> Self {
        Self::with_state(None, State::Failing(Some(error)), 1)
    }

    fn with_state(shared: Option<Arc<Shared>>, mut state: State, window: u64) -> Self {
        // NB. The PHP wire has no credit: its iterators are pulled, one item per request.
        if shared.as_ref().is_some_and(|shared| shared.codec.is_php()) {
            if let State::Opening { pull, .. } | State::Unopened { pull, .. } = &mut state {
                *pull = true;
            }
        }
        let grows = shared
            .as_ref()
            .is_some_and(|shared| shared.stream_window_grows);
        Self {
            shared,
            state,
            window: window.clamp(1, storage::MAX_CREDIT),
            grows,
            received: (0, 0),
            grown_at: 0,
            consumed: 0,
            buffer: VecDeque::new(),
            encoded: None,
            next_position: 0,
            position: None,
            parent: None,
            _item: PhantomData,
        }
    }

    /// The windowed stream `id` that the peer stored (its handler answered the id).
    pub fn windowed(dispatcher: &crate::Dispatcher, id: u64) -> Self {
        let shared = Arc::clone(dispatcher.shared());
        let window = shared.stream_window;
        Self::with_state(Some(shared), State::Unopened { id, pull: false }, window)
    }

    /// The stream `id` that the peer stored, pulled one request per item (as the PHP original's
    /// `RemoteIterator`).
    pub fn pull(dispatcher: &crate::Dispatcher, id: u64) -> Self {
        let shared = Arc::clone(dispatcher.shared());
        let window = shared.stream_window;
        Self::with_state(Some(shared), State::Unopened { id, pull: true }, window)
    }

    /// Uses pull mode (one request per item) instead of windows. It applies before the first
    /// poll; afterwards the mode is settled.
    pub fn pull_mode(mut self) -> Self {
        if let State::Opening { pull, .. } | State::Unopened { pull, .. } = &mut self.state {
            *pull = true;
        }
        self
    }

    /// The window: how many items the producer may send ahead of consumption (from 1 to
    /// 2^32 - 1; other values are clamped). A window set here is fixed; the default is
    /// [`Builder::stream_window`](crate::Builder::stream_window)'s. It applies before the first
    /// poll.
    pub fn window(mut self, window: u64) -> Self {
        self.window = window.clamp(1, storage::MAX_CREDIT);
        self.grows = false;
        self
    }

    /// The position of the last item yielded, from 0.
    pub fn position(&self) -> Option<u64> {
        self.position
    }

    /// Items received and not yet yielded.
    pub fn buffered_len(&self) -> usize {
        self.buffered()
    }

    fn start(&mut self, id: u64, pull: bool) {
        let Some(shared) = &self.shared else {
            self.state = State::Failing(Some(CallError::Terminated(Termination::Dropped)));
            return;
        };
        if pull {
            self.state = State::Pulling { id, next: None };
            return;
        }
        let (tx, events) = mpsc::unbounded_channel();
        let open = Command::OpenStream {
            stream: id,
            events: tx,
            credit: self.window,
        };
        if shared.send_command(open).is_err() {
            self.state = State::Failing(Some(shared.terminated()));
            return;
        }
        self.state = State::Windowed { id, events };
    }

    /// Tells the producer the stream is dropped, unless it is over.
    fn cancel(&mut self) {
        let id = match &self.state {
            State::Windowed { id, .. } | State::Pulling { id, .. } | State::Unopened { id, .. } => {
                *id
            }
            _ => return,
        };
        self.state = State::Done;
        if let Some(shared) = &self.shared {
            let _ = shared.send_command(Command::CancelStream { stream: id });
        }
    }

    fn yield_item(&mut self, item: T) -> Poll<Option<Result<T, CallError>>> {
        self.position = Some(self.next_position);
        self.next_position = self.next_position.saturating_add(1);
        if let (State::Windowed { id, .. }, Some(shared)) = (&self.state, &self.shared) {
            self.consumed += 1;
            // Renew credit in halves of the window: fewer frames than one grant per item.
            if self.consumed >= (self.window / 2).max(1) {
                let grant = Command::GrantCredit {
                    stream: *id,
                    credit: std::mem::take(&mut self.consumed),
                };
                let _ = shared.send_command(grant);
            }
        }
        Poll::Ready(Some(Ok(item)))
    }

    fn fail(&mut self, error: CallError) -> Poll<Option<Result<T, CallError>>> {
        self.encoded = None;
        self.cancel();
        self.state = State::Done;
        Poll::Ready(Some(Err(error)))
    }

    fn decode_batch(&mut self, position: u64, payload: Bytes) -> Result<(), CallError> {
        // NB. `poll_next` takes every buffered item before it looks for the next batch.
        debug_assert_eq!(
            self.buffered_len(),
            0,
            "a batch arrived over buffered items"
        );
        let codec = self.shared.as_ref().map(|s| s.codec).unwrap_or_default();
        let bytes = payload.len() as u64;
        let count = match codec.split_sequence(&payload) {
            Some(items) => {
                let items = items.map_err(CallError::Decode)?;
                let count = items.len();
                self.encoded = Some(items).filter(|items| items.len() > 0);
                u64::from(count)
            }
            None => {
                let before = self.buffer.len();
                codec
                    .decode_extend(&payload, &mut self.buffer)
                    .map_err(CallError::Decode)?;
                (self.buffer.len() - before) as u64
            }
        };
        self.next_position = position;
        let (items, received) = &mut self.received;
        *items = items.saturating_add(count);
        *received = received.saturating_add(bytes);
        Ok(())
    }

    /// The next item received, decoded.
    fn next_buffered(&mut self) -> Option<Result<T, CallError>> {
        if let Some(item) = self.buffer.pop_front() {
            return Some(Ok(item));
        }
        let item = self.encoded.as_mut()?.take();
        if item.is_none() {
            self.encoded = None;
        }
        Some(item?.map_err(CallError::Decode))
    }

    /// The consumer waits for items with none buffered: the credit's round trip holds it
    /// back, so a window that may grow doubles (see `Builder::stream_window`), and the
    /// producer is granted the difference at once.
    fn grow_window(&mut self, id: u64) {
        let (items, bytes) = self.received;
        if !self.grows || items == self.grown_at {
            return; // fixed, waiting for the first batch, or grown for this wait already
        }
        self.grown_at = items;
        let by_bytes = MAX_GROWN_BYTES / (bytes / items).max(1);
        let grown = self
            .window
            .saturating_mul(2)
            .min(MAX_GROWN_WINDOW)
            .min(by_bytes);
        if grown <= self.window {
            return;
        }
        let Some(shared) = &self.shared else {
            return;
        };
        let credit = grown - self.window;
        self.window = grown;
        let _ = shared.send_command(Command::GrantCredit { stream: id, credit });
    }
}

impl<T: DeserializeOwned> Stream for RemoteStream<T> {
    type Item = Result<T, CallError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            match this.next_buffered() {
                Some(Ok(item)) => return this.yield_item(item),
                Some(Err(error)) => return this.fail(error),
                None => {}
            }
            match &mut this.state {
                State::Done => return Poll::Ready(None),
                State::Failing(error) => {
                    let error = error.take();
                    this.state = State::Done;
                    return Poll::Ready(error.map(Err));
                }
                State::Unopened { id, pull } => {
                    let (id, pull) = (*id, *pull);
                    this.start(id, pull);
                }
                State::Opening { answer, pull } => {
                    let pull = *pull;
                    match std::task::ready!(Pin::new(answer).poll(cx)) {
                        Ok(id) => this.start(id, pull),
                        Err(error) => return this.fail(error),
                    }
                }
                State::Windowed { id, events } => match events.poll_recv(cx) {
                    Poll::Pending => {
                        let id = *id;
                        this.grow_window(id);
                        return Poll::Pending;
                    }
                    Poll::Ready(Some(StreamEvent::Items { position, payload })) => {
                        if let Err(error) = this.decode_batch(position, payload) {
                            return this.fail(error);
                        }
                    }
                    Poll::Ready(Some(StreamEvent::End(None))) => this.state = State::Done,
                    // NB. Not a clean end: only the producer's end is one.
                    Poll::Ready(None) => {
                        let reason = this.shared.as_ref().map_or(Termination::Dropped, |s| {
                            s.lifecycle.reason_or(Termination::Stopped)
                        });
                        this.state = State::Failing(Some(CallError::Terminated(reason)))
                    }
                    Poll::Ready(Some(StreamEvent::End(Some(error)))) => {
                        this.state = State::Failing(Some(CallError::Remote(error)))
                    }
                    Poll::Ready(Some(StreamEvent::Terminated(reason))) => {
                        this.state = State::Failing(Some(CallError::Terminated(reason)))
                    }
                },
                State::Pulling { id, next } => {
                    let id = *id;
                    let Some(shared) = &this.shared else {
                        return this.fail(CallError::Terminated(Termination::Dropped));
                    };
                    let pending = next.get_or_insert_with(|| {
                        let payload = shared.codec.encode(&id).unwrap_or_default();
                        let pull = crate::Dispatcher::from_shared(Arc::clone(shared))
                            .call_raw(PULL_METHOD, payload);
                        match this.parent {
                            None => pull,
                            parent => pull.nested(parent),
                        }
                        .into_future()
                    });
                    let answer = std::task::ready!(Pin::new(pending).poll(cx));
                    *next = None;
                    match answer {
                        Ok(raw) => {
                            let position = raw
                                .attributes
                                .get(POSITION_ATTRIBUTE)
                                .and_then(|p| p.parse().ok())
                                .unwrap_or(this.next_position);
                            if position != this.next_position {
                                let error = CallError::Remote(RemoteError {
                                    code: crate::error::code::INVALID_REQUEST,
                                    message: format!(
                                        "stream {id} answered a pull with position {position}, \
                                         expected {}",
                                        this.next_position
                                    ),
                                    data: None,
                                    codec: shared.codec,
                                });
                                return this.fail(error);
                            }
                            if let Err(error) = this.decode_batch(position, raw.payload) {
                                return this.fail(error);
                            }
                            if this.buffer.is_empty() && this.encoded.is_none() {
                                // The end: the producer released the stream itself.
                                this.state = State::Done;
                            }
                        }
                        Err(error) => return this.fail(error),
                    }
                }
            }
        }
    }
}

impl<T> RemoteStream<T> {
    /// Items received and not yet yielded, decoded or not.
    fn buffered(&self) -> usize {
        let encoded = self.encoded.as_ref().map_or(0, |items| items.len());
        self.buffer.len() + encoded as usize
    }
}

// NB. Nothing in it is pinned structurally (items are moved out of the buffer by value).
impl<T> Unpin for RemoteStream<T> {}

impl<T> Drop for RemoteStream<T> {
    fn drop(&mut self) {
        if let (
            State::Windowed { id, .. } | State::Pulling { id, .. } | State::Unopened { id, .. },
            Some(shared),
        ) = (&self.state, &self.shared)
        {
            let _ = shared.send_command(Command::CancelStream { stream: *id });
        }
    }
}

impl<T> fmt::Debug for RemoteStream<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Opening { .. } => "opening",
            State::Unopened { .. } => "unopened",
            State::Windowed { .. } => "windowed",
            State::Pulling { .. } => "pulling",
            State::Failing(_) => "failing",
            State::Done => "done",
        };
        f.debug_struct("RemoteStream")
            .field("state", &state)
            .field("position", &self.position)
            .field("buffered", &self.buffered())
            .finish_non_exhaustive()
    }
}
