//! The handler slots: the peer's requests and notifications our handlers are working on.
//!
//! A slab of reusable pinned slots instead of a `FuturesUnordered`: a handler is polled once
//! as soon as it is started (most finish right there, with no queueing), a running one is woken
//! through its slot's own waker, and a cancelled one is dropped in place at once.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use pin_project_lite::pin_project;
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use crate::envelope::Method;
use crate::error::HandlerError;
use crate::handler::Reply;
use crate::hash::SeededState;
use crate::wake::{KeyWaker, WakeQueue};

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

/// What a handler run is for: its request (or notification), and how the admission counted it.
#[derive(Clone, Debug)]
pub(crate) struct Run {
    /// The request id; `None` for a notification.
    pub(crate) id: Option<u64>,
    pub(crate) method: Method,
    pub(crate) deadline: Option<Instant>,
    /// A nested request: it ran outside the handler limit.
    pub(crate) nested: bool,
    /// Payload bytes counted against the pending-bytes limit while it runs (a frame's, so
    /// they fit: `u32` keeps the record, which each waiting request holds, a word smaller).
    bytes: u32,
}

impl Run {
    pub(crate) fn new(
        id: Option<u64>,
        method: Method,
        deadline: Option<Instant>,
        nested: bool,
        bytes: usize,
    ) -> Self {
        Self {
            id,
            method,
            deadline,
            nested,
            // NB. A frame's payload, and frames are at most `u32::MAX` long (the builder caps
            // the limit): the saturation never happens.
            bytes: u32::try_from(bytes).unwrap_or(u32::MAX),
        }
    }

    /// Payload bytes counted against the pending-bytes limit while it runs.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes as usize
    }

    /// What a slot's run is left with while its future is dropped.
    fn placeholder() -> Self {
        Self {
            id: None,
            method: Method::from_static(""),
            deadline: None,
            nested: false,
            bytes: 0,
        }
    }
}

/// A finished handler run.
pub(crate) struct Finished {
    pub(crate) run: Run,
    pub(crate) outcome: Outcome,
}

pin_project! {
    /// One handler run: the service's future, made panic-safe and deadline-bound.
    struct InFlight<F> {
        #[pin]
        fut: F,
        // Entered while the future is polled and dropped. Boxed, and only when a subscriber
        // wants it: a disabled span would take 40 bytes of every waiting request.
        span: Option<Box<tracing::Span>>,
        deadline: Option<Pin<Box<Sleep>>>,
        run: Run,
    }
}

impl<F: Future<Output = Result<Reply, HandlerError>>> InFlight<F> {
    /// Polls once; `Some` with the outcome when the run is over.
    fn poll_outcome(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Option<Outcome> {
        let mut this = self.project();
        let polled = {
            let _entered = this.span.as_deref().map(tracing::Span::enter);
            catch_unwind(AssertUnwindSafe(|| this.fut.as_mut().poll(cx)))
        };
        match polled {
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

/// Wakes one slot (queues its index for the driver), and tells the run's context when the run
/// is over.
struct SlotWaker {
    wake: KeyWaker,
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
        self.wake.wake_key();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.wake.wake_key();
    }
}

struct Slot<F> {
    /// Reused from run to run: a new handler future is pinned into the same allocation.
    run: Pin<Box<Option<InFlight<F>>>>,
    waker: Arc<SlotWaker>,
    /// Its request is in `Handlers::requests` (a run that finishes at its first poll, as most
    /// do, never is).
    indexed: bool,
}

/// The peer's requests (and notifications) our handlers are working on.
pub(crate) struct Handlers<F> {
    slots: Vec<Slot<F>>,
    free: Vec<usize>,
    queue: Arc<WakeQueue>,
    /// Indices taken from the queue and not yet polled.
    batch: Vec<u64>,
    /// Slots of running requests, by the peer's id.
    requests: HashMap<u64, usize, SeededState>,
    running: usize,
    /// Runs that count against the handler limit (all but nested requests).
    ordinary: usize,
}

impl<F> Handlers<F> {
    pub(crate) fn new() -> Self {
        Self {
            slots: Vec::new(),
            free: Vec::new(),
            queue: Arc::default(),
            batch: Vec::new(),
            requests: HashMap::default(),
            running: 0,
            ordinary: 0,
        }
    }

    /// Takes a slot for a run about to start; its [`RequestOver`] goes into the context.
    pub(crate) fn reserve(&mut self) -> (usize, RequestOver) {
        let index = self.free.pop().unwrap_or_else(|| {
            let index = self.slots.len();
            self.slots.push(Slot {
                indexed: false,
                run: Box::pin(None),
                waker: Arc::new(SlotWaker {
                    wake: KeyWaker::new(index as u64, Arc::clone(&self.queue)),
                    generation: AtomicU64::new(0),
                    listening: AtomicBool::new(false),
                    over: Notify::new(),
                }),
            });
            index
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

    /// Runs in progress.
    pub(crate) fn len(&self) -> usize {
        self.running
    }

    /// Runs in progress that count against the handler limit.
    pub(crate) fn ordinary(&self) -> usize {
        self.ordinary
    }

    /// `true` when a request with this id is running (a peer must not reuse it until answered).
    pub(crate) fn is_running(&self, id: u64) -> bool {
        self.requests.contains_key(&id)
    }

    /// `true` when request `id` runs and counts against the handler limit (not nested).
    pub(crate) fn is_running_ordinary(&self, id: u64) -> bool {
        self.requests.get(&id).is_some_and(|&index| {
            self.slots[index]
                .run
                .as_ref()
                .as_pin_ref()
                .is_some_and(|run| !run.project_ref().run.nested)
        })
    }

    fn end_generation(&self, index: usize) {
        let slot = &self.slots[index].waker;
        slot.generation.fetch_add(1, Ordering::SeqCst);
        if slot.listening.swap(false, Ordering::SeqCst) {
            slot.over.notify_waiters();
        }
    }

    /// Ends the run in slot `index` (its future is dropped in place); its [`Run`].
    fn release(&mut self, index: usize) -> Option<Run> {
        let in_flight = self.slots[index].run.as_mut().as_pin_mut()?.project();
        // Taken out, not cloned: the future is dropped right after, in its span.
        let run = std::mem::replace(in_flight.run, Run::placeholder());
        let span = in_flight.span.take();
        let entered = span.as_deref().map(tracing::Span::enter);
        self.slots[index].run.as_mut().set(None);
        drop(entered);
        self.end_generation(index);
        self.free.push(index);
        self.running -= 1;
        self.ordinary -= usize::from(!run.nested);
        if std::mem::take(&mut self.slots[index].indexed) {
            if let Some(id) = run.id {
                self.requests.remove(&id);
            }
        }
        Some(run)
    }

    /// Drops the request the peer cancelled; its [`Run`], if it was running.
    pub(crate) fn cancel_request(&mut self, id: u64) -> Option<Run> {
        let index = *self.requests.get(&id)?;
        self.release(index)
    }

    /// Drops every running request (notifications keep running); their [`Run`]s.
    pub(crate) fn cancel_requests(&mut self) -> Vec<Run> {
        let running: Vec<usize> = self.requests.values().copied().collect();
        running
            .into_iter()
            .filter_map(|index| self.release(index))
            .collect()
    }

    /// Drops every running handler.
    pub(crate) fn abort_all(&mut self) {
        for index in 0..self.slots.len() {
            self.release(index);
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.running == 0
    }
}

/// Every run is dropped through [`Handlers::release`], in its span, even when the handlers
/// go without `abort_all` (an unwind through the driver's end).
impl<F> Drop for Handlers<F> {
    fn drop(&mut self) {
        self.abort_all();
    }
}

impl<F: Future<Output = Result<Reply, HandlerError>>> Handlers<F> {
    /// Starts a handler run in a reserved slot and polls it once; `Some` when it finished
    /// right away.
    pub(crate) fn start(
        &mut self,
        index: usize,
        fut: F,
        run: Run,
        span: tracing::Span,
    ) -> Option<Finished> {
        self.running += 1;
        self.ordinary += usize::from(!run.nested);
        let id = run.id;
        self.slots[index].run.as_mut().set(Some(InFlight {
            fut,
            span: (!span.is_disabled()).then(|| Box::new(span)),
            deadline: run.deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            run,
        }));
        // NB. Indexed by its id only if it is still running after this poll: nothing looks
        // the id up while the driver polls it (what the handler asks of the connection waits
        // in the command queue until the driver is back).
        let finished = self.poll_slot(index);
        if let (None, Some(id)) = (&finished, id) {
            self.requests.insert(id, index);
            self.slots[index].indexed = true;
        }
        finished
    }

    fn poll_slot(&mut self, index: usize) -> Option<Finished> {
        let slot = &mut self.slots[index];
        slot.waker.wake.polling();
        let waker = Waker::from(Arc::clone(&slot.waker));
        let outcome = slot
            .run
            .as_mut()
            .as_pin_mut()?
            .poll_outcome(&mut Context::from_waker(&waker))?;
        let run = self.release(index)?;
        Some(Finished { run, outcome })
    }

    /// Polls the woken handlers until one finishes.
    pub(crate) fn poll_finished(&mut self, cx: &mut Context<'_>) -> Poll<Option<Finished>> {
        loop {
            if let Some(index) = self.batch.pop() {
                if let Some(finished) = self.poll_slot(index as usize) {
                    return Poll::Ready(Some(finished));
                }
                continue;
            }
            self.queue.take_or_register(cx.waker(), &mut self.batch);
            if self.batch.is_empty() {
                return Poll::Pending;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type BoxHandler = Pin<Box<dyn Future<Output = Result<Reply, HandlerError>> + Send>>;

    /// Every waiting request holds its run record.
    #[test]
    fn a_run_record_stays_small() {
        let size = std::mem::size_of::<Run>();
        assert!(size <= 72, "a run takes {size} bytes");
    }

    fn run(id: Option<u64>, method: &'static str, deadline: Option<Instant>) -> Run {
        Run::new(id, Method::from_static(method), deadline, false, 0)
    }

    fn start(
        incoming: &mut Handlers<BoxHandler>,
        fut: BoxHandler,
        id: Option<u64>,
        method: &'static str,
        deadline: Option<Instant>,
    ) -> Option<Finished> {
        let (index, _) = incoming.reserve();
        incoming.start(index, fut, run(id, method, deadline), tracing::Span::none())
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
        let mut incoming = Handlers::new();
        let (index, over) = incoming.reserve();
        let fut: BoxHandler = Box::pin(async move {
            let _guard = guard;
            std::future::pending::<Result<Reply, HandlerError>>().await
        });
        let started = incoming.start(
            index,
            fut,
            run(Some(3), "slow", None),
            tracing::Span::none(),
        );
        assert!(started.is_none());
        assert!(incoming.is_running(3));
        assert!(!dropped.load(Ordering::SeqCst) && !over.is_over());
        assert!(incoming.cancel_request(3).is_some());
        assert!(
            dropped.load(Ordering::SeqCst),
            "the handler future is dropped by the cancel"
        );
        assert!(over.is_over(), "the context sees its request is over");
        assert!(!incoming.is_running(3) && incoming.is_empty());
        assert!(start(&mut incoming, pending(), Some(4), "next", None).is_none());
        assert_eq!(incoming.slots.len(), 1, "the slot is reused");
    }

    #[test]
    fn ready_handler_finishes_on_dispatch() {
        let mut incoming = Handlers::new();
        let fut: Pin<Box<dyn Future<Output = _> + Send>> = Box::pin(async { Ok(Reply::nothing()) });
        let finished =
            start(&mut incoming, fut, Some(1), "fast", None).expect("finished without waiting");
        assert!(matches!(finished.outcome, Outcome::Done(Ok(_))));
        assert!(incoming.is_empty() && !incoming.is_running(1));
    }

    #[tokio::test]
    async fn woken_handler_finishes_through_poll_finished() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut incoming = Handlers::new();
        let fut: Pin<Box<dyn Future<Output = _> + Send>> = Box::pin(async move {
            let _ = rx.await;
            Ok(Reply::nothing())
        });
        assert!(start(&mut incoming, fut, None, "n", None).is_none());
        tx.send(()).unwrap();
        let finished = std::future::poll_fn(|cx| incoming.poll_finished(cx))
            .await
            .unwrap();
        assert!(finished.run.id.is_none());
        assert!(incoming.is_empty());
    }

    #[tokio::test]
    async fn panicking_handler_is_caught() {
        let mut incoming = Handlers::new();
        let fut: Pin<Box<dyn Future<Output = Result<Reply, HandlerError>> + Send>> =
            Box::pin(async {
                if true {
                    panic!("boom");
                }
                Ok(Reply::nothing())
            });
        let finished = start(&mut incoming, fut, None, "bad", None).expect("a panic ends the run");
        match finished.outcome {
            Outcome::Panicked(p) => assert_eq!(p.downcast_ref::<&str>(), Some(&"boom")),
            _ => panic!("expected a caught panic"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn handler_past_its_deadline_expires() {
        let mut incoming = Handlers::new();
        let deadline = Instant::now() + std::time::Duration::from_secs(1);
        assert!(start(&mut incoming, pending(), Some(9), "slow", Some(deadline)).is_none());
        let finished = std::future::poll_fn(|cx| incoming.poll_finished(cx))
            .await
            .unwrap();
        assert!(matches!(finished.outcome, Outcome::Expired));
        assert!(!incoming.is_running(9));
    }
}
