//! The producer side: the connection's stream storage and the
//! type-erased streams in it.
//!
//! The driver polls stored streams itself, in place, when the consumer wants items (credit in
//! windowed mode, a pull in pull mode) and the write buffer has room: no task and no queue per
//! stream, and nothing is produced that the connection cannot send yet.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use serde::Serialize;
use tokio::time::Instant;

use crate::codec::Codec;
use crate::error::{code, HandlerError};
use crate::wake::{KeyWaker, WakeQueue};

/// Most items in one batch, whatever the credit.
pub(crate) const MAX_BATCH: u64 = 1024;
/// How many of the streams released for idleness a storage remembers.
const SWEPT_REMEMBERED: usize = 1024;
/// The largest credit a stream holds: grants beyond it saturate here (PROTOCOL.md, section 9).
pub(crate) const MAX_CREDIT: u64 = u32::MAX as u64;

/// What a stream produced when polled for a batch.
pub(crate) enum Batch {
    /// `count` items from `position`, encoded as one sequence.
    Items {
        position: u64,
        count: u64,
        payload: Bytes,
    },
    End,
    Failed(HandlerError),
}

/// A typed stream behind a type-erased face: polls up to `max` ready items and encodes them.
pub(crate) trait ErasedStream: Send {
    /// Polls up to `max` items (fewer if their encoding would exceed `max_bytes`).
    fn poll_batch(&mut self, cx: &mut Context<'_>, max: u64, max_bytes: usize) -> Poll<Batch>;
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
    fn poll_batch(&mut self, cx: &mut Context<'_>, max: u64, max_bytes: usize) -> Poll<Batch> {
        let max = max.clamp(1, MAX_BATCH) as usize;
        // What ended the stream is told once the items before it are out.
        if self.items.is_empty() {
            if let Some(after) = self.after.take() {
                return Poll::Ready(after);
            }
        }
        while self.after.is_none() && self.items.len() < max {
            // A panic ends the stream with an error, after the items it made before.
            let polled = catch_unwind(AssertUnwindSafe(|| self.stream.as_mut().poll_next(cx)));
            let next = match polled {
                Ok(Poll::Ready(Some(Ok(item)))) => {
                    self.items.push(item);
                    continue;
                }
                Ok(Poll::Ready(Some(Err(error)))) => Batch::Failed(error),
                Ok(Poll::Ready(None)) => Batch::End,
                Ok(Poll::Pending) if self.items.is_empty() => return Poll::Pending,
                Ok(Poll::Pending) => break,
                Err(panic) => Batch::Failed(HandlerError::panicked(panic_message(&*panic))),
            };
            if self.items.is_empty() {
                return Poll::Ready(next);
            }
            self.after = Some(next);
        }
        // The longest run of items that fits the consumer's frames; the rest go next time.
        let mut count = self.items.len().min(max);
        loop {
            let payload = match self.codec.encode(&self.items[..count]) {
                Ok(payload) => payload,
                Err(e) => {
                    self.items.clear();
                    let message = format!("could not encode a stream item: {e}");
                    return Poll::Ready(Batch::Failed(HandlerError::internal(message)));
                }
            };
            if payload.len() <= max_bytes {
                self.items.drain(..count);
                let position = self.position;
                self.position = self.position.saturating_add(count as u64);
                return Poll::Ready(Batch::Items {
                    position,
                    count: count as u64,
                    payload,
                });
            }
            if count == 1 {
                self.items.clear();
                self.after = None;
                let message = format!(
                    "a stream item of {} bytes does not fit the consumer's frames of {max_bytes}",
                    payload.len()
                );
                let error = HandlerError::new(code::FRAME_TOO_LARGE, message);
                return Poll::Ready(Batch::Failed(error));
            }
            // As many as would fit at this size per item, and fewer each time it still does not.
            count = (count * max_bytes / payload.len()).clamp(1, count - 1);
        }
    }
}

/// A panic's message, when it has one.
pub(crate) fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(non-string panic payload)")
}

/// What the consumer asked of a stream: nothing yet, items (windowed mode), or one item for a
/// pull request (pull mode). The first credit or pull settles the mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Demand {
    Unclaimed,
    Credit(u64),
    /// A pull request waiting for the next item, by its request id.
    Pull(Option<u64>),
}

struct Entry {
    /// Taken out while the driver polls it (so the lock is not held across user code).
    source: Option<Box<dyn ErasedStream>>,
    demand: Demand,
    last_used: Instant,
    waker: Arc<KeyWaker>,
}

/// The streams this side offers the peer, by id. Reach it from
/// a handler with [`Context::streams`](crate::Context::streams).
///
/// A stream stays here until the consumer drops it, it ends, it sits unused for the idle time
/// ([`Builder::stream_idle_timeout`](crate::Builder::stream_idle_timeout)), or the connection
/// ends. At most [`Builder::max_streams`](crate::Builder::max_streams) are stored at once.
#[derive(Clone)]
pub struct Streams {
    inner: Arc<Storage>,
}

struct Storage {
    table: Mutex<Table>,
    codec: Codec,
    idle: Duration,
    max: usize,
    woken: Arc<WakeQueue>,
    /// Set (after the push, under no lock) when `Table::orphaned` may hold pulls: the driver
    /// looks at it every turn, and most connections never have one.
    orphans: AtomicBool,
    /// How many streams the table held when its lock was last released: the driver's turn
    /// asks whether there are any without taking the lock.
    stored: AtomicUsize,
}

/// The table, locked; releasing it publishes how many streams it holds.
struct TableGuard<'a> {
    table: MutexGuard<'a, Table>,
    stored: &'a AtomicUsize,
}

impl std::ops::Deref for TableGuard<'_> {
    type Target = Table;

    fn deref(&self) -> &Table {
        &self.table
    }
}

impl std::ops::DerefMut for TableGuard<'_> {
    fn deref_mut(&mut self) -> &mut Table {
        &mut self.table
    }
}

impl Drop for TableGuard<'_> {
    fn drop(&mut self) {
        self.stored
            .store(self.table.entries.len(), Ordering::Release);
    }
}

struct Table {
    entries: HashMap<u64, Entry>,
    next_id: u64,
    closed: bool,
    /// Pull requests left waiting by streams removed meanwhile (stream, request), for the
    /// driver to answer.
    orphaned: Vec<(u64, u64)>,
    /// The streams released last for their idle time (a bounded few): a pull of one is told
    /// so, rather than that the stream is unknown.
    swept: VecDeque<u64>,
}

impl Table {
    /// Removes stream `id`; a pull request waiting on it is kept to be answered.
    fn remove(&mut self, id: u64) -> Option<Entry> {
        let entry = self.entries.remove(&id)?;
        if let Demand::Pull(Some(request)) = entry.demand {
            self.orphaned.push((id, request));
        }
        Some(entry)
    }
}

/// A snapshot of one stored stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamStatus {
    /// Credit the consumer granted that is not used yet (windowed mode).
    pub credit: u64,
    /// Time since the consumer last pulled or granted credit, or an item was sent.
    pub idle: Duration,
}

/// What polling a stream gave, for the driver to send.
#[derive(Debug)]
pub(crate) enum Produced {
    /// A batch; `pull` is the pull request it answers (pull mode).
    Items {
        stream: u64,
        position: u64,
        payload: Bytes,
        pull: Option<u64>,
    },
    /// The end (`error` if it failed); the stream is released.
    End {
        stream: u64,
        error: Option<HandlerError>,
        pull: Option<u64>,
    },
}

/// The answer to a pull request the storage could not take.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PullRefused {
    Unknown,
    /// Released for its idle time.
    Released,
    Windowed,
    AlreadyPending,
}

/// What a credit grant found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Granted {
    Windowed,
    Unknown,
    /// The stream is in pull mode: it is released, and the consumer must be told.
    PullMode,
}

impl Streams {
    pub(crate) fn new(codec: Codec, idle: Duration, max: usize) -> Self {
        Self {
            inner: Arc::new(Storage {
                table: Mutex::new(Table {
                    entries: HashMap::new(),
                    next_id: 1,
                    closed: false,
                    orphaned: Vec::new(),
                    swept: VecDeque::new(),
                }),
                codec,
                idle,
                max,
                woken: Arc::default(),
                orphans: AtomicBool::new(false),
                stored: AtomicUsize::new(0),
            }),
        }
    }

    /// `true` for an id this storage gave out, whether or not the stream is still stored.
    pub(crate) fn was_issued(&self, id: u64) -> bool {
        id != 0 && id < self.table().next_id
    }

    /// Stores a stream for the peer to consume and returns its id (answer it to the peer,
    /// which builds a [`RemoteStream`](crate::RemoteStream) from it).
    ///
    /// # Errors
    /// [`code::OVERLOADED`] when [`Builder::max_streams`](crate::Builder::max_streams) streams
    /// are stored already, [`code::SHUTTING_DOWN`] once the connection has ended; the stream is
    /// dropped. Return the error from the handler (`?`): the peer gets it as the answer.
    pub fn add<S, T>(&self, stream: S) -> Result<u64, HandlerError>
    where
        S: Stream<Item = Result<T, HandlerError>> + Send + 'static,
        T: Serialize + Send + 'static,
    {
        let mut table = self.table();
        if table.closed {
            return Err(HandlerError::new(
                code::SHUTTING_DOWN,
                "the connection has ended: no stream can be stored",
            ));
        }
        if table.entries.len() >= self.inner.max {
            return Err(HandlerError::new(
                code::OVERLOADED,
                format!(
                    "too many streams: {} are stored, the most this side keeps; consume or drop \
                     some first",
                    self.inner.max
                ),
            ));
        }
        let id = table.next_id;
        table.next_id = table.next_id.wrapping_add(1).max(1);
        let source: Box<dyn ErasedStream> = Box::new(Typed {
            stream: Box::pin(stream),
            codec: self.inner.codec,
            position: 0,
            after: None,
            items: Vec::new(),
        });
        let entry = Entry {
            source: Some(source),
            demand: Demand::Unclaimed,
            last_used: Instant::now(),
            waker: Arc::new(KeyWaker::new(id, Arc::clone(&self.inner.woken))),
        };
        table.entries.insert(id, entry);
        Ok(id)
    }

    /// The status of stream `id`, if stored.
    pub fn get(&self, id: u64) -> Option<StreamStatus> {
        self.table().entries.get(&id).map(|entry| StreamStatus {
            credit: match entry.demand {
                Demand::Credit(credit) => credit,
                _ => 0,
            },
            idle: entry.last_used.elapsed(),
        })
    }

    /// Drops stream `id`; `false` if it was not stored.
    pub fn remove(&self, id: u64) -> bool {
        let (entry, orphaned) = {
            let mut table = self.table();
            let entry = table.remove(id);
            (entry, !table.orphaned.is_empty())
        };
        if orphaned {
            // The driver answers the pull that waited on it.
            self.inner.orphans.store(true, Ordering::Release);
            self.inner.woken.wake_driver();
        }
        entry.is_some()
    }

    /// The pull requests whose streams were removed while they waited: (stream, request).
    /// Most turns find none: then it is a flag's load, inlined into the driver's turn.
    #[inline]
    pub(crate) fn take_orphaned_pulls(&self) -> Vec<(u64, u64)> {
        if !self.inner.orphans.load(Ordering::Acquire)
            || !self.inner.orphans.swap(false, Ordering::Acquire)
        {
            return Vec::new();
        }
        std::mem::take(&mut self.table().orphaned)
    }

    /// How many streams are stored.
    pub fn len(&self) -> usize {
        self.inner.stored.load(Ordering::Acquire)
    }

    /// `true` when none are.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn table(&self) -> TableGuard<'_> {
        TableGuard {
            table: self.inner.table.lock().unwrap_or_else(|e| e.into_inner()),
            stored: &self.inner.stored,
        }
    }

    /// The consumer granted `credit` more items (saturating at [`MAX_CREDIT`]).
    pub(crate) fn grant(&self, id: u64, credit: u64) -> Granted {
        let mut table = self.table();
        let Some(entry) = table.entries.get_mut(&id) else {
            return Granted::Unknown; // released already: the consumer learns from the end we sent
        };
        entry.last_used = Instant::now();
        match &mut entry.demand {
            Demand::Pull(_) => {
                table.remove(id);
                if !table.orphaned.is_empty() {
                    self.inner.orphans.store(true, Ordering::Release);
                }
                return Granted::PullMode;
            }
            Demand::Unclaimed => entry.demand = Demand::Credit(credit.min(MAX_CREDIT)),
            Demand::Credit(left) => *left = left.saturating_add(credit).min(MAX_CREDIT),
        }
        entry.waker.wake_key();
        Granted::Windowed
    }

    /// A pull request `request` for the next item of stream `id`.
    pub(crate) fn pull(&self, id: u64, request: u64) -> Result<(), PullRefused> {
        let mut table = self.table();
        if !table.entries.contains_key(&id) {
            return Err(match table.swept.contains(&id) {
                true => PullRefused::Released,
                false => PullRefused::Unknown,
            });
        }
        let entry = table.entries.get_mut(&id).ok_or(PullRefused::Unknown)?;
        entry.last_used = Instant::now();
        match entry.demand {
            Demand::Credit(_) => return Err(PullRefused::Windowed),
            Demand::Pull(Some(_)) => return Err(PullRefused::AlreadyPending),
            Demand::Unclaimed | Demand::Pull(None) => entry.demand = Demand::Pull(Some(request)),
        }
        entry.waker.wake_key();
        Ok(())
    }

    /// Forgets the pull request `request` (the peer cancelled it).
    pub(crate) fn cancel_pull(&self, request: u64) -> bool {
        let mut table = self.table();
        let pending = table
            .entries
            .values_mut()
            .find(|entry| entry.demand == Demand::Pull(Some(request)));
        match pending {
            Some(entry) => {
                entry.demand = Demand::Pull(None);
                true
            }
            None => false,
        }
    }

    /// Registers the driver's waker and takes the ids of streams woken since the last call.
    pub(crate) fn take_woken(&self, waker: &Waker, into: &mut Vec<u64>) {
        self.inner.woken.take_or_register(waker, into);
    }

    /// Polls stream `id` if its consumer wants items; `max` caps the batch's items, `max_bytes`
    /// its encoding. `None` when it wants nothing or has nothing ready (it wakes the driver
    /// later).
    pub(crate) fn poll_stream(&self, id: u64, max: u64, max_bytes: usize) -> Option<Produced> {
        let (mut source, want, waker) = {
            let mut table = self.table();
            let entry = table.entries.get_mut(&id)?;
            // NB. Taken off the wake queue: a wake from now on queues it again, demand or not.
            entry.waker.polling();
            let want = match entry.demand {
                Demand::Credit(credit) if credit > 0 => credit.min(max.max(1)),
                Demand::Pull(Some(_)) => 1,
                _ => return None,
            };
            (entry.source.take()?, want, Arc::clone(&entry.waker))
        };
        let waker = Waker::from(waker);
        let polled = catch_unwind(AssertUnwindSafe(|| {
            source.poll_batch(&mut Context::from_waker(&waker), want, max_bytes)
        }));
        let mut table = self.table();
        // A handler may have removed it meanwhile: then the source is simply dropped.
        let entry = table.entries.get_mut(&id)?;
        let pull = match entry.demand {
            Demand::Pull(request) => request,
            _ => None,
        };
        let batch = match polled {
            Ok(Poll::Pending) => {
                entry.source = Some(source);
                return None;
            }
            Ok(Poll::Ready(batch)) => batch,
            Err(panic) => Batch::Failed(HandlerError::panicked(panic_message(&*panic))),
        };
        match batch {
            Batch::Items {
                position,
                count,
                payload,
            } => {
                entry.source = Some(source);
                entry.last_used = Instant::now();
                match &mut entry.demand {
                    Demand::Credit(credit) => *credit = credit.saturating_sub(count),
                    Demand::Pull(request) => *request = None,
                    Demand::Unclaimed => {}
                }
                // More may be ready: look again on the driver's next turn.
                entry.waker.wake_key();
                Some(Produced::Items {
                    stream: id,
                    position,
                    payload,
                    pull,
                })
            }
            Batch::End | Batch::Failed(_) => {
                table.entries.remove(&id);
                drop(table);
                drop(source);
                let error = match batch {
                    Batch::Failed(error) => Some(error),
                    _ => None,
                };
                Some(Produced::End {
                    stream: id,
                    error,
                    pull,
                })
            }
        }
    }

    /// Releases streams nobody consumed for the idle time (no credit left, no pull waiting);
    /// returns their ids.
    pub(crate) fn sweep(&self) -> Vec<u64> {
        let idle = self.inner.idle;
        let mut released = Vec::new();
        let mut dropped = Vec::new();
        let mut table = self.table();
        table.entries.retain(|&id, entry| {
            let waiting = matches!(entry.demand, Demand::Credit(c) if c > 0)
                || matches!(entry.demand, Demand::Pull(Some(_)));
            let keep = waiting || entry.last_used.elapsed() < idle;
            if !keep {
                released.push(id);
                dropped.push(entry.source.take());
            }
            keep
        });
        for &id in &released {
            if table.swept.len() == SWEPT_REMEMBERED {
                table.swept.pop_front();
            }
            table.swept.push_back(id);
        }
        drop(table);
        drop(dropped);
        released
    }

    /// Drops every stream and refuses new ones (the connection ends).
    pub(crate) fn close(&self) {
        let entries = {
            let mut table = self.table();
            table.closed = true;
            std::mem::take(&mut table.entries)
        };
        drop(entries);
    }

    pub(crate) fn idle_timeout(&self) -> Duration {
        self.inner.idle
    }
}

impl fmt::Debug for Streams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Streams").field("len", &self.len()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::stream;

    fn storage(max: usize) -> Streams {
        Streams::new(Codec::default(), Duration::from_secs(60), max)
    }

    fn items(produced: Option<Produced>) -> (u64, Vec<u32>, Option<u64>) {
        match produced {
            Some(Produced::Items {
                position,
                payload,
                pull,
                ..
            }) => (position, Codec::default().decode(&payload).unwrap(), pull),
            other => panic!("expected items, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn the_count_follows_every_way_a_stream_comes_and_goes() {
        let streams = storage(8);
        let one = || stream::iter([Ok::<_, HandlerError>(1u32)]);
        let (a, b, c) = (
            streams.add(one()).unwrap(),
            streams.add(one()).unwrap(),
            streams.add(one()).unwrap(),
        );
        assert_eq!((streams.len(), streams.is_empty()), (3, false));
        assert!(streams.remove(a));
        assert_eq!(streams.len(), 2);
        // Ending: the item, then the end releases it.
        streams.grant(b, 5);
        assert_eq!(items(streams.poll_stream(b, MAX_BATCH, usize::MAX)).1, [1]);
        assert!(matches!(
            streams.poll_stream(b, MAX_BATCH, usize::MAX),
            Some(Produced::End { .. })
        ));
        assert_eq!(streams.len(), 1);
        let _ = c;
        streams.close();
        assert_eq!((streams.len(), streams.is_empty()), (0, true));
    }

    #[tokio::test]
    async fn credit_bounds_each_batch_and_saturates() {
        let streams = storage(8);
        let id = streams
            .add(stream::iter((0..10u32).map(Ok::<_, HandlerError>)))
            .unwrap();
        assert!(
            streams.poll_stream(id, MAX_BATCH, usize::MAX).is_none(),
            "no credit yet"
        );
        assert_eq!(streams.grant(id, 3), Granted::Windowed);
        assert_eq!(
            items(streams.poll_stream(id, MAX_BATCH, usize::MAX)),
            (0, vec![0, 1, 2], None)
        );
        assert!(
            streams.poll_stream(id, MAX_BATCH, usize::MAX).is_none(),
            "credit used up"
        );
        streams.grant(id, u64::MAX);
        streams.grant(id, u64::MAX);
        assert_eq!(streams.get(id).unwrap().credit, MAX_CREDIT);
        assert_eq!(
            items(streams.poll_stream(id, 2, usize::MAX)).1,
            [3, 4],
            "the write side's cap"
        );
    }

    #[tokio::test]
    async fn pull_and_credit_do_not_mix() {
        let streams = storage(8);
        let pulled = streams
            .add(stream::iter((0..3u32).map(Ok::<_, HandlerError>)))
            .unwrap();
        assert_eq!(streams.pull(pulled, 41), Ok(()));
        assert_eq!(streams.pull(pulled, 42), Err(PullRefused::AlreadyPending));
        assert_eq!(
            items(streams.poll_stream(pulled, MAX_BATCH, usize::MAX)),
            (0, vec![0], Some(41))
        );
        assert_eq!(streams.grant(pulled, 5), Granted::PullMode);
        assert!(streams.get(pulled).is_none(), "released");

        let windowed = streams
            .add(stream::iter((0..3u32).map(Ok::<_, HandlerError>)))
            .unwrap();
        streams.grant(windowed, 1);
        assert_eq!(streams.pull(windowed, 43), Err(PullRefused::Windowed));
        assert_eq!(streams.pull(999, 44), Err(PullRefused::Unknown));
    }

    #[tokio::test]
    async fn a_panicking_stream_ends_with_an_error_after_its_items() {
        let streams = storage(8);
        let mut n = 0u32;
        let id = streams
            .add(stream::poll_fn(move |_| {
                n += 1;
                assert!(n < 3, "producer bug");
                Poll::Ready(Some(Ok(n)))
            }))
            .unwrap();
        streams.grant(id, 10);
        assert_eq!(
            items(streams.poll_stream(id, MAX_BATCH, usize::MAX)).1,
            [1, 2]
        );
        match streams.poll_stream(id, MAX_BATCH, usize::MAX) {
            Some(Produced::End {
                error: Some(error), ..
            }) => assert!(error.is_panic(), "{error}"),
            other => panic!("expected the end, got {other:?}"),
        }
        assert!(streams.is_empty());
    }

    #[tokio::test]
    async fn batches_are_cut_to_the_consumers_frames_and_an_item_too_large_fails() {
        let streams = storage(8);
        let items = (0..10u32).map(|n| Ok(vec![n as u8; 100]));
        let id = streams.add(stream::iter(items)).unwrap();
        streams.grant(id, 10);
        let sizes: Vec<usize> = std::iter::from_fn(|| match streams.poll_stream(id, 10, 350) {
            Some(Produced::Items { payload, .. }) => Some(payload.len()),
            _ => None,
        })
        .collect();
        assert!(sizes.iter().all(|&len| len <= 350), "{sizes:?}");
        assert!(sizes.len() >= 4, "cut into several batches: {sizes:?}");

        let big = streams.add(stream::iter([Ok(vec![0u8; 1000])])).unwrap();
        streams.grant(big, 1);
        match streams.poll_stream(big, 1, 350) {
            Some(Produced::End {
                error: Some(error), ..
            }) => assert_eq!(error.code(), code::FRAME_TOO_LARGE),
            other => panic!("expected an error end, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn storage_is_capped_and_closes() {
        let streams = storage(2);
        let add = || streams.add(stream::empty::<Result<u32, HandlerError>>());
        add().unwrap();
        add().unwrap();
        assert_eq!(add().unwrap_err().code(), code::OVERLOADED);
        streams.close();
        assert!(streams.is_empty());
        assert_eq!(add().unwrap_err().code(), code::SHUTTING_DOWN);
    }
}
