//! The connection's two ledgers: our calls awaiting the peer's answers, and the peer's requests
//! our handlers are working on. Each direction has its own table, so a peer's cancel is never
//! matched against our own ids.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;
use pin_project_lite::pin_project;
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};
use tracing::Instrument;

use super::{RawResponse, ReplySender};
use crate::envelope::Method;
use crate::error::{CallError, HandlerError, IntoHandlerError};
use crate::handler::Reply;
use crate::hash::SeededState;

/// Our calls awaiting answers.
#[derive(Default)]
pub(crate) struct Outgoing {
    /// The reply channel of each call, and whether it holds an in-flight permit.
    pending: HashMap<u64, (ReplySender, bool), SeededState>,
    /// Permits of finished calls, to give back in one go.
    released: usize,
}

impl Outgoing {
    pub(crate) fn insert_request(&mut self, id: u64, reply: ReplySender, limited: bool) {
        self.pending.insert(id, (reply, limited));
    }

    fn forget(&mut self, limited: bool) {
        self.released += usize::from(limited);
    }

    /// Permits of calls finished since the last time, to give back.
    pub(crate) fn take_released(&mut self) -> usize {
        std::mem::take(&mut self.released)
    }

    /// Delivers an answer; `false` when nobody waits for `id` (late, cancelled or unknown).
    pub(crate) fn complete_request(
        &mut self,
        id: u64,
        answer: Result<RawResponse, CallError>,
    ) -> bool {
        match self.pending.remove(&id) {
            Some((reply, limited)) => {
                // The caller may have dropped its future a moment ago; then nobody reads this.
                let _ = reply.send(answer);
                self.forget(limited);
                true
            }
            None => false,
        }
    }

    /// Forgets a call the caller gave up on; `true` if it was still pending.
    pub(crate) fn cancel_request(&mut self, id: u64) -> bool {
        match self.pending.remove(&id) {
            Some((_, limited)) => {
                self.forget(limited);
                true
            }
            None => false,
        }
    }

    #[cfg(test)]
    pub(crate) fn contains(&self, id: u64) -> bool {
        self.pending.contains_key(&id)
    }

    /// Fails every pending call with `error()`, returning their ids.
    pub(crate) fn fail_all(&mut self, error: impl Fn() -> CallError) -> Vec<u64> {
        let mut released = 0;
        let ids = self
            .pending
            .drain()
            .map(|(id, (reply, limited))| {
                let _ = reply.send(Err(error()));
                released += usize::from(limited);
                id
            })
            .collect();
        self.released += released;
        ids
    }

    pub(crate) fn len(&self) -> usize {
        self.pending.len()
    }
}

/// How a handler run ended.
pub(crate) enum Outcome {
    Done(Result<Reply, HandlerError>),
    Panicked(Box<dyn Any + Send>),
    /// The caller's deadline passed.
    Expired,
}

impl Outcome {
    pub(crate) fn describe(&self) -> &'static str {
        match self {
            Self::Done(Ok(_)) => "done",
            Self::Done(Err(_)) => "failed",
            Self::Panicked(_) => "panicked",
            Self::Expired => "expired",
        }
    }
}

/// A finished handler run.
pub(crate) struct Finished {
    pub(crate) id: Option<u64>,
    pub(crate) method: Method,
    pub(crate) outcome: Outcome,
}

pin_project! {
    /// A handler service's future, with its error made a [`HandlerError`].
    pub(crate) struct HandlerResult<F> {
        #[pin]
        fut: F,
    }
}

impl<F> HandlerResult<F> {
    pub(crate) fn new(fut: F) -> Self {
        Self { fut }
    }
}

impl<F, E> Future for HandlerResult<F>
where
    F: Future<Output = Result<Reply, E>>,
    E: IntoHandlerError,
{
    type Output = Result<Reply, HandlerError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project()
            .fut
            .poll(cx)
            .map(|result| result.map_err(IntoHandlerError::into_handler_error))
    }
}

pin_project! {
    /// One handler run: the service's future, made panic-safe and deadline-bound.
    struct InFlight<F> {
        #[pin]
        fut: tracing::instrument::Instrumented<F>,
        deadline: Option<Pin<Box<Sleep>>>,
        id: Option<u64>,
        method: Method,
    }
}

impl<F: Future<Output = Result<Reply, HandlerError>>> InFlight<F> {
    /// Polls once; `Some` with the outcome when the run is over.
    fn poll_outcome(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Option<Outcome> {
        let mut this = self.project();
        match catch_unwind(AssertUnwindSafe(|| this.fut.as_mut().poll(cx))) {
            Ok(Poll::Ready(result)) => Some(Outcome::Done(result)),
            Err(panic) => Some(Outcome::Panicked(panic)),
            Ok(Poll::Pending) => this
                .deadline
                .as_mut()
                .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready())
                .then_some(Outcome::Expired),
        }
    }
}

/// Slot indices whose handler was woken, and the connection task to tell.
#[derive(Default)]
struct ReadyQueue {
    indices: Mutex<Vec<usize>>,
    connection: AtomicWaker,
}

/// Wakes one slot: queues its index (once until polled) and wakes the connection task.
struct SlotWaker {
    index: usize,
    queued: AtomicBool,
    queue: Arc<ReadyQueue>,
    /// Bumped each time a run in this slot ends; a run's [`RequestOver`] knows its own.
    generation: AtomicU64,
    /// Someone waits in [`RequestOver::wait`]: only then is `over` notified.
    listening: AtomicBool,
    over: Notify,
}

/// Tells whether one handler run is over (see [`Context::cancelled`](crate::Context::cancelled)).
#[derive(Clone)]
pub(crate) struct RequestOver {
    slot: Arc<SlotWaker>,
    generation: u64,
}

impl RequestOver {
    pub(crate) fn is_over(&self) -> bool {
        self.slot.generation.load(Ordering::SeqCst) != self.generation
    }

    pub(crate) async fn wait(&self) {
        loop {
            let notified = self.slot.over.notified();
            let mut notified = std::pin::pin!(notified);
            // NB. Register, announce, then check: a release between the check and the await
            // still finds the registration and wakes it.
            notified.as_mut().enable();
            self.slot.listening.store(true, Ordering::SeqCst);
            if self.is_over() {
                return;
            }
            notified.await;
        }
    }
}

impl std::fmt::Debug for RequestOver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestOver")
            .field("over", &self.is_over())
            .finish()
    }
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            self.queue
                .indices
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(self.index);
            self.queue.connection.wake();
        }
    }
}

struct Slot<F> {
    /// Reused from run to run: a new handler future is pinned into the same allocation.
    run: Pin<Box<Option<InFlight<F>>>>,
    waker: Arc<SlotWaker>,
}

/// The peer's requests (and notifications) our handlers are working on.
///
/// A slab of reusable pinned slots instead of a `FuturesUnordered`: a handler is polled once
/// as soon as it is dispatched (most finish right there, with no queueing), a running one is
/// woken through its slot's own waker, and a cancelled one is dropped in place at once.
pub(crate) struct Incoming<F> {
    slots: Vec<Slot<F>>,
    free: Vec<usize>,
    queue: Arc<ReadyQueue>,
    /// Indices taken from the queue and not yet polled.
    batch: Vec<usize>,
    /// Slots of running requests, by the peer's id.
    requests: HashMap<u64, usize, SeededState>,
    running: usize,
}

impl<F> Incoming<F> {
    pub(crate) fn len(&self) -> usize {
        self.running
    }
}

impl<F: Future<Output = Result<Reply, HandlerError>>> Incoming<F> {
    pub(crate) fn new() -> Self {
        Self {
            slots: Vec::new(),
            free: Vec::new(),
            queue: Arc::default(),
            batch: Vec::new(),
            requests: HashMap::default(),
            running: 0,
        }
    }

    /// `true` when a request with this id is running (a peer must not reuse it until answered).
    pub(crate) fn is_running(&self, id: u64) -> bool {
        self.requests.contains_key(&id)
    }

    /// Starts a handler run and polls it once; `Some` when it finished right away.
    /// Takes a slot for a run about to start; its [`RequestOver`] goes into the context.
    pub(crate) fn reserve(&mut self) -> (usize, RequestOver) {
        let index = self.free.pop().unwrap_or_else(|| {
            self.slots.push(Slot {
                run: Box::pin(None),
                waker: Arc::new(SlotWaker {
                    index: self.slots.len(),
                    queued: AtomicBool::new(false),
                    queue: Arc::clone(&self.queue),
                    generation: AtomicU64::new(0),
                    listening: AtomicBool::new(false),
                    over: Notify::new(),
                }),
            });
            self.slots.len() - 1
        });
        let slot = Arc::clone(&self.slots[index].waker);
        let generation = slot.generation.load(Ordering::SeqCst);
        (index, RequestOver { slot, generation })
    }

    /// Gives back a reserved slot whose run never started (the service panicked).
    pub(crate) fn unreserve(&mut self, index: usize) {
        self.end_generation(index);
        self.free.push(index);
    }

    fn end_generation(&self, index: usize) {
        let slot = &self.slots[index].waker;
        slot.generation.fetch_add(1, Ordering::SeqCst);
        if slot.listening.swap(false, Ordering::SeqCst) {
            slot.over.notify_waiters();
        }
    }

    /// Starts a handler run in a reserved slot and polls it once; `Some` when it finished
    /// right away.
    pub(crate) fn start(
        &mut self,
        index: usize,
        fut: F,
        id: Option<u64>,
        method: Method,
        deadline: Option<Instant>,
        span: tracing::Span,
    ) -> Option<Finished> {
        self.slots[index].run.as_mut().set(Some(InFlight {
            fut: fut.instrument(span),
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            id,
            method,
        }));
        self.running += 1;
        if let Some(id) = id {
            self.requests.insert(id, index);
        }
        self.poll_slot(index)
    }

    fn poll_slot(&mut self, index: usize) -> Option<Finished> {
        let slot = &mut self.slots[index];
        slot.waker.queued.store(false, Ordering::Release);
        let waker = Waker::from(Arc::clone(&slot.waker));
        let outcome = slot
            .run
            .as_mut()
            .as_pin_mut()?
            .poll_outcome(&mut Context::from_waker(&waker))?;
        let (id, method) = match slot.run.as_ref().get_ref() {
            Some(run) => (run.id, run.method.clone()),
            None => return None,
        };
        self.release(index, id);
        Some(Finished {
            id,
            method,
            outcome,
        })
    }

    fn release(&mut self, index: usize, id: Option<u64>) {
        self.slots[index].run.as_mut().set(None);
        self.end_generation(index);
        self.free.push(index);
        self.running -= 1;
        if let Some(id) = id {
            self.requests.remove(&id);
        }
    }

    /// Drops the request the peer cancelled; `false` if it was not running.
    pub(crate) fn cancel_request(&mut self, id: u64) -> bool {
        match self.requests.get(&id) {
            Some(&index) => {
                self.release(index, Some(id));
                true
            }
            None => false,
        }
    }

    /// Drops every running request (notifications keep running).
    pub(crate) fn cancel_requests(&mut self) {
        let running: Vec<(u64, usize)> = self.requests.drain().collect();
        for (_, index) in running {
            self.release(index, None);
        }
    }

    /// Polls the woken handlers until one finishes.
    pub(crate) fn poll_finished(&mut self, cx: &mut Context<'_>) -> Poll<Option<Finished>> {
        loop {
            if let Some(index) = self.batch.pop() {
                if let Some(finished) = self.poll_slot(index) {
                    return Poll::Ready(Some(finished));
                }
                continue;
            }
            self.queue.connection.register(cx.waker());
            let mut queued = self.queue.indices.lock().unwrap_or_else(|e| e.into_inner());
            if queued.is_empty() {
                return Poll::Pending;
            }
            std::mem::swap(&mut *queued, &mut self.batch);
        }
    }

    /// Drops every running handler.
    pub(crate) fn abort_all(&mut self) {
        for index in 0..self.slots.len() {
            if self.slots[index].run.is_some() {
                self.release(index, None);
            }
        }
        self.requests.clear();
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.running == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    #[test]
    fn complete_request_delivers_once_and_late_answers_are_refused() {
        let mut outgoing = Outgoing::default();
        let (tx, mut rx) = oneshot::channel();
        outgoing.insert_request(7, tx, true);
        let answer = || {
            Ok(RawResponse {
                payload: bytes::Bytes::new(),
                attributes: Default::default(),
                codec: Default::default(),
            })
        };
        assert!(outgoing.complete_request(7, answer()));
        assert!(rx.try_recv().is_ok());
        assert!(
            !outgoing.complete_request(7, answer()),
            "a second answer finds nobody"
        );
        assert_eq!(outgoing.len(), 0);
        assert_eq!(
            outgoing.take_released(),
            1,
            "the call's permit is given back once"
        );
        assert_eq!(outgoing.take_released(), 0);
    }

    #[test]
    fn cancelled_request_is_forgotten() {
        let mut outgoing = Outgoing::default();
        let (tx, _rx) = oneshot::channel();
        outgoing.insert_request(1, tx, false);
        assert!(outgoing.cancel_request(1));
        assert!(!outgoing.contains(1));
        assert!(!outgoing.cancel_request(1));
    }

    type BoxHandler = Pin<Box<dyn Future<Output = Result<Reply, HandlerError>> + Send>>;

    fn start(
        incoming: &mut Incoming<BoxHandler>,
        fut: BoxHandler,
        id: Option<u64>,
        method: Method,
        deadline: Option<Instant>,
        span: tracing::Span,
    ) -> Option<Finished> {
        let (index, _) = incoming.reserve();
        incoming.start(index, fut, id, method, deadline, span)
    }

    fn pending() -> BoxHandler {
        Box::pin(std::future::pending())
    }

    #[test]
    fn cancelled_handler_is_dropped_at_once_and_its_slot_reused() {
        struct DropGuard(Arc<AtomicBool>);
        impl Drop for DropGuard {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let dropped = Arc::new(AtomicBool::new(false));
        let guard = DropGuard(Arc::clone(&dropped));
        let mut incoming = Incoming::new();
        let (index, over) = incoming.reserve();
        let fut: BoxHandler = Box::pin(async move {
            let _guard = guard;
            std::future::pending::<Result<Reply, HandlerError>>().await
        });
        let span = tracing::Span::none();
        let started = incoming.start(index, fut, Some(3), Method::from_static("slow"), None, span);
        assert!(started.is_none());
        assert!(incoming.is_running(3));
        assert!(!dropped.load(Ordering::SeqCst) && !over.is_over());
        assert!(incoming.cancel_request(3));
        assert!(
            dropped.load(Ordering::SeqCst),
            "the handler future is dropped by the cancel"
        );
        assert!(over.is_over(), "the context sees its request is over");
        assert!(!incoming.is_running(3) && incoming.is_empty());
        assert!(start(
            &mut incoming,
            pending(),
            Some(4),
            Method::from_static("next"),
            None,
            tracing::Span::none()
        )
        .is_none());
        assert_eq!(incoming.slots.len(), 1, "the slot is reused");
    }

    #[test]
    fn ready_handler_finishes_on_dispatch() {
        let mut incoming = Incoming::new();
        let fut: Pin<Box<dyn Future<Output = _> + Send>> = Box::pin(async { Ok(Reply::nothing()) });
        let finished = start(
            &mut incoming,
            fut,
            Some(1),
            Method::from_static("fast"),
            None,
            tracing::Span::none(),
        )
        .expect("finished without waiting");
        assert!(matches!(finished.outcome, Outcome::Done(Ok(_))));
        assert!(incoming.is_empty() && !incoming.is_running(1));
    }

    #[tokio::test]
    async fn woken_handler_finishes_through_poll_finished() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut incoming = Incoming::new();
        let fut: Pin<Box<dyn Future<Output = _> + Send>> = Box::pin(async move {
            let _ = rx.await;
            Ok(Reply::nothing())
        });
        assert!(start(
            &mut incoming,
            fut,
            None,
            Method::from_static("n"),
            None,
            tracing::Span::none()
        )
        .is_none());
        tx.send(()).unwrap();
        let finished = std::future::poll_fn(|cx| incoming.poll_finished(cx))
            .await
            .unwrap();
        assert!(finished.id.is_none());
        assert!(incoming.is_empty());
    }

    #[tokio::test]
    async fn panicking_handler_is_caught() {
        let mut incoming = Incoming::new();
        let fut: Pin<Box<dyn Future<Output = Result<Reply, HandlerError>> + Send>> =
            Box::pin(async {
                if true {
                    panic!("boom");
                }
                Ok(Reply::nothing())
            });
        let finished = start(
            &mut incoming,
            fut,
            None,
            Method::from_static("bad"),
            None,
            tracing::Span::none(),
        )
        .expect("a panic ends the run");
        match finished.outcome {
            Outcome::Panicked(p) => assert_eq!(p.downcast_ref::<&str>(), Some(&"boom")),
            _ => panic!("expected a caught panic"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn handler_past_its_deadline_expires() {
        let mut incoming = Incoming::new();
        let deadline = Instant::now() + std::time::Duration::from_secs(1);
        assert!(start(
            &mut incoming,
            pending(),
            Some(9),
            Method::from_static("slow"),
            Some(deadline),
            tracing::Span::none()
        )
        .is_none());
        let finished = std::future::poll_fn(|cx| incoming.poll_finished(cx))
            .await
            .unwrap();
        assert!(matches!(finished.outcome, Outcome::Expired));
        assert!(!incoming.is_running(9));
    }
}
