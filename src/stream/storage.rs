//! The producer side: the connection's stream storage (the seed's `IteratorStorage`), the
//! type-erased streams in it, and the pump that sends a windowed stream's items as credit
//! allows.

use std::collections::HashMap;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use serde::Serialize;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::codec::Codec;
use crate::envelope::{Envelope, ErrorBody};
use crate::error::HandlerError;

/// Most items in one batch, whatever the credit.
const MAX_BATCH: usize = 1024;

/// What a stream produced when polled for a batch.
pub(crate) enum Batch {
    /// `count` items from `position`, encoded as one sequence.
    Items {
        position: u64,
        count: usize,
        payload: Bytes,
    },
    End,
    Failed(HandlerError),
}

/// A typed stream behind a type-erased face: polls up to `max` ready items and encodes them.
pub(crate) trait ErasedStream: Send {
    fn poll_batch(&mut self, cx: &mut Context<'_>, max: usize) -> Poll<Batch>;
}

struct Typed<S, T> {
    stream: Pin<Box<S>>,
    codec: Codec,
    position: u64,
    /// An error or the end seen after a batch's last item, reported on the next poll.
    after: Option<Batch>,
    items: Vec<T>,
}

impl<S, T> ErasedStream for Typed<S, T>
where
    S: Stream<Item = Result<T, HandlerError>> + Send,
    T: Serialize + Send,
{
    fn poll_batch(&mut self, cx: &mut Context<'_>, max: usize) -> Poll<Batch> {
        if let Some(after) = self.after.take() {
            return Poll::Ready(after);
        }
        let max = max.clamp(1, MAX_BATCH);
        while self.items.len() < max {
            let next = match self.stream.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(item))) => {
                    self.items.push(item);
                    continue;
                }
                Poll::Ready(Some(Err(error))) => Batch::Failed(error),
                Poll::Ready(None) => Batch::End,
                Poll::Pending if self.items.is_empty() => return Poll::Pending,
                Poll::Pending => break,
            };
            if self.items.is_empty() {
                return Poll::Ready(next);
            }
            self.after = Some(next);
            break;
        }
        let payload = match self.codec.encode(&self.items) {
            Ok(payload) => payload,
            Err(e) => {
                self.items.clear();
                return Poll::Ready(Batch::Failed(HandlerError::internal(format!(
                    "could not encode a stream item: {e}"
                ))));
            }
        };
        let count = self.items.len();
        self.items.clear();
        let position = self.position;
        self.position += count as u64;
        Poll::Ready(Batch::Items {
            position,
            count,
            payload,
        })
    }
}

pub(crate) type Source = Arc<tokio::sync::Mutex<Box<dyn ErasedStream>>>;

struct Entry {
    source: Source,
    /// Credit granted by the consumer and not used yet (windowed mode).
    credit: Arc<Semaphore>,
    pump: Option<JoinHandle<()>>,
    last_used: Instant,
}

impl Drop for Entry {
    fn drop(&mut self) {
        if let Some(pump) = self.pump.take() {
            pump.abort();
        }
    }
}

/// The streams this side offers the peer, by id (the seed's `IteratorStorage`). Reach it from
/// a handler with [`Context::streams`](crate::Context::streams).
///
/// A stream stays here until the consumer drops it, it ends, it sits unused for the idle time
/// ([`Builder::stream_idle_timeout`](crate::Builder::stream_idle_timeout)), or the connection
/// stops.
#[derive(Clone)]
pub struct Streams {
    inner: Arc<Storage>,
}

pub(crate) struct Storage {
    entries: Mutex<HashMap<u64, Entry>>,
    next_id: AtomicU64,
    codec: Codec,
    idle: Duration,
}

/// A snapshot of one stored stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamStatus {
    /// Credit the consumer granted that is not used yet (windowed mode).
    pub credit: usize,
    /// Time since the consumer last pulled or granted credit.
    pub idle: Duration,
}

impl Streams {
    pub(crate) fn new(codec: Codec, idle: Duration) -> Self {
        Self {
            inner: Arc::new(Storage {
                entries: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                codec,
                idle,
            }),
        }
    }

    /// Stores a stream for the peer to consume and returns its id (answer it to the peer,
    /// which builds a [`RemoteStream`](crate::RemoteStream) from it).
    pub fn add<S, T>(&self, stream: S) -> u64
    where
        S: Stream<Item = Result<T, HandlerError>> + Send + 'static,
        T: Serialize + Send + 'static,
    {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let source: Box<dyn ErasedStream> = Box::new(Typed {
            stream: Box::pin(stream),
            codec: self.inner.codec,
            position: 0,
            after: None,
            items: Vec::new(),
        });
        let entry = Entry {
            source: Arc::new(tokio::sync::Mutex::new(source)),
            credit: Arc::new(Semaphore::new(0)),
            pump: None,
            last_used: Instant::now(),
        };
        self.entries().insert(id, entry);
        id
    }

    /// The status of stream `id`, if stored.
    pub fn get(&self, id: u64) -> Option<StreamStatus> {
        self.entries().get(&id).map(|entry| StreamStatus {
            credit: entry.credit.available_permits(),
            idle: entry.last_used.elapsed(),
        })
    }

    /// Drops stream `id`; `false` if it was not stored.
    pub fn remove(&self, id: u64) -> bool {
        let entry = self.entries().remove(&id);
        entry.is_some()
    }

    /// How many streams are stored.
    pub fn len(&self) -> usize {
        self.entries().len()
    }

    /// `true` when none are.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.inner.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The source of stream `id` for one pull (pull mode); refreshes its idle time.
    pub(crate) fn source(&self, id: u64) -> Option<Source> {
        let mut entries = self.entries();
        let entry = entries.get_mut(&id)?;
        entry.last_used = Instant::now();
        Some(Arc::clone(&entry.source))
    }

    /// The consumer granted `credit` more items: starts the pump on the first grant.
    pub(crate) fn grant(&self, id: u64, credit: u64, out: &mpsc::UnboundedSender<Envelope>) {
        let mut entries = self.entries();
        let Some(entry) = entries.get_mut(&id) else {
            return; // released already: the consumer learns from the end we sent
        };
        entry.last_used = Instant::now();
        let credit = usize::try_from(credit).unwrap_or(Semaphore::MAX_PERMITS);
        let room = Semaphore::MAX_PERMITS - entry.credit.available_permits();
        entry.credit.add_permits(credit.min(room));
        if entry.pump.is_none() {
            entry.pump = Some(tokio::spawn(pump(
                id,
                Arc::clone(&entry.source),
                Arc::clone(&entry.credit),
                out.clone(),
                self.clone(),
            )));
        }
    }

    /// Releases streams unused for the idle time; returns their ids.
    pub(crate) fn sweep(&self) -> Vec<u64> {
        let idle = self.inner.idle;
        let mut released = Vec::new();
        self.entries().retain(|&id, entry| {
            let keep = entry.last_used.elapsed() < idle;
            if !keep {
                released.push(id);
            }
            keep
        });
        released
    }

    /// Drops every stream (the connection stops).
    pub(crate) fn clear(&self) {
        let entries = std::mem::take(&mut *self.entries());
        drop(entries);
    }

    pub(crate) fn idle_timeout(&self) -> Duration {
        self.inner.idle
    }

    fn touch(&self, id: u64) {
        if let Some(entry) = self.entries().get_mut(&id) {
            entry.last_used = Instant::now();
        }
    }
}

impl fmt::Debug for Streams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Streams").field("len", &self.len()).finish()
    }
}

/// Sends a windowed stream's items as credit allows, batching what is ready.
async fn pump(
    id: u64,
    source: Source,
    credit: Arc<Semaphore>,
    out: mpsc::UnboundedSender<Envelope>,
    streams: Streams,
) {
    let mut source = source.lock().await;
    loop {
        let Ok(permit) = credit.acquire().await else {
            return;
        };
        permit.forget();
        let extra = credit.available_permits().min(MAX_BATCH - 1);
        if let Ok(more) = credit.try_acquire_many(extra as u32) {
            more.forget();
        }
        let granted = extra + 1;
        let batch = std::future::poll_fn(|cx| source.poll_batch(cx, granted)).await;
        let envelope = match batch {
            Batch::Items {
                position,
                count,
                payload,
            } => {
                credit.add_permits(granted - count);
                streams.touch(id);
                Envelope::StreamItems {
                    stream: id,
                    position,
                    payload,
                }
            }
            Batch::End => Envelope::StreamEnd {
                stream: id,
                error: None,
            },
            Batch::Failed(error) => Envelope::StreamEnd {
                stream: id,
                error: Some(ErrorBody {
                    code: error.code,
                    message: error.message,
                    data: None,
                }),
            },
        };
        let last = matches!(envelope, Envelope::StreamEnd { .. });
        if out.send(envelope).is_err() || last {
            if last {
                // NB. Release only after queueing the end: the entry's drop aborts this task.
                drop(source);
                streams.remove(id);
            }
            return;
        }
    }
}
