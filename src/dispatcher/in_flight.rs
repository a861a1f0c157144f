//! The connection's two ledgers: our calls awaiting the peer's answers, and the peer's requests
//! our handlers are working on. Each direction has its own table, so a peer's cancel is never
//! matched against our own ids.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::future::{AbortHandle, AbortRegistration, Abortable};
use futures_util::stream::FuturesUnordered;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tracing::Instrument;

use super::{RawResponse, ReplySender};
use crate::envelope::Method;
use crate::error::{CallError, HandlerError};
use crate::handler::Reply;
use crate::hash::SeededState;

/// Our calls awaiting answers.
#[derive(Default)]
pub(crate) struct Outgoing {
    pending: HashMap<u64, ReplySender, SeededState>,
}

impl Outgoing {
    pub(crate) fn insert_request(&mut self, id: u64, reply: ReplySender) {
        self.pending.insert(id, reply);
    }

    /// Delivers an answer; `false` when nobody waits for `id` (late, cancelled or unknown).
    pub(crate) fn complete_request(
        &mut self,
        id: u64,
        answer: Result<RawResponse, CallError>,
    ) -> bool {
        match self.pending.remove(&id) {
            Some(reply) => {
                // The caller may have dropped its future a moment ago; then nobody reads this.
                let _ = reply.send(answer);
                true
            }
            None => false,
        }
    }

    /// Forgets a call the caller gave up on; `true` if it was still pending.
    pub(crate) fn cancel_request(&mut self, id: u64) -> bool {
        self.pending.remove(&id).is_some()
    }

    #[cfg(test)]
    pub(crate) fn contains(&self, id: u64) -> bool {
        self.pending.contains_key(&id)
    }

    /// Fails every pending call with `error()`, returning their ids.
    pub(crate) fn fail_all(&mut self, error: impl Fn() -> CallError) -> Vec<u64> {
        self.pending
            .drain()
            .map(|(id, reply)| {
                let _ = reply.send(Err(error()));
                id
            })
            .collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.pending.len()
    }
}

/// How a handler run ended.
pub(crate) enum Outcome {
    Done(Result<Reply, HandlerError>),
    Panicked(Box<dyn Any + Send>),
    /// The peer cancelled the request, or the connection is ending.
    Aborted,
    /// The caller's deadline passed.
    Expired,
}

impl Outcome {
    pub(crate) fn describe(&self) -> &'static str {
        match self {
            Self::Done(Ok(_)) => "done",
            Self::Done(Err(_)) => "failed",
            Self::Panicked(_) => "panicked",
            Self::Aborted => "aborted",
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
    /// One handler run: the service's future, made abortable, panic-safe and deadline-bound.
    pub(crate) struct InFlight<F> {
        #[pin]
        fut: tracing::instrument::Instrumented<Abortable<F>>,
        deadline: Option<Pin<Box<Sleep>>>,
        id: Option<u64>,
        method: Option<Method>,
    }
}

impl<F: Future<Output = Result<Reply, HandlerError>>> Future for InFlight<F> {
    type Output = Finished;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Finished> {
        let mut this = self.project();
        let outcome = match catch_unwind(AssertUnwindSafe(|| this.fut.as_mut().poll(cx))) {
            Ok(Poll::Ready(Ok(result))) => Outcome::Done(result),
            Ok(Poll::Ready(Err(_aborted))) => Outcome::Aborted,
            Err(panic) => Outcome::Panicked(panic),
            Ok(Poll::Pending) => {
                let expired = this
                    .deadline
                    .as_mut()
                    .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready());
                if !expired {
                    return Poll::Pending;
                }
                Outcome::Expired
            }
        };
        Poll::Ready(Finished {
            id: *this.id,
            method: this.method.take().unwrap_or(Method::from_static("")),
            outcome,
        })
    }
}

/// The peer's requests (and notifications) our handlers are working on.
pub(crate) struct Incoming<F> {
    running: FuturesUnordered<InFlight<F>>,
    /// Abort handles of running requests, by the peer's id.
    requests: HashMap<u64, AbortHandle, SeededState>,
}

impl<F> Incoming<F> {
    pub(crate) fn len(&self) -> usize {
        self.running.len()
    }
}

impl<F: Future<Output = Result<Reply, HandlerError>>> Incoming<F> {
    pub(crate) fn new() -> Self {
        Self {
            running: FuturesUnordered::new(),
            requests: HashMap::default(),
        }
    }

    /// `true` when a request with this id is running (a peer must not reuse it until answered).
    pub(crate) fn is_running(&self, id: u64) -> bool {
        self.requests.contains_key(&id)
    }

    /// Registers a handler run; returns the registration its future must be made abortable with.
    pub(crate) fn registration(&mut self, id: Option<u64>) -> AbortRegistration {
        let (handle, registration) = AbortHandle::new_pair();
        if let Some(id) = id {
            self.requests.insert(id, handle);
        }
        registration
    }

    pub(crate) fn push(
        &mut self,
        fut: F,
        registration: AbortRegistration,
        id: Option<u64>,
        method: Method,
        deadline: Option<Instant>,
        span: tracing::Span,
    ) {
        self.running.push(InFlight {
            fut: Abortable::new(fut, registration).instrument(span),
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            id,
            method: Some(method),
        });
    }

    /// Aborts the request the peer cancelled; `false` if it was not running.
    pub(crate) fn cancel_request(&mut self, id: u64) -> bool {
        match self.requests.remove(&id) {
            Some(handle) => {
                handle.abort();
                true
            }
            None => false,
        }
    }

    /// Aborts every running request (notifications keep running).
    pub(crate) fn cancel_requests(&mut self) {
        for (_, handle) in self.requests.drain() {
            handle.abort();
        }
    }

    /// Takes a finished run's id out of the table; `false` when it was cancelled meanwhile.
    pub(crate) fn complete_request(&mut self, id: u64) -> bool {
        self.requests.remove(&id).is_some()
    }

    pub(crate) fn poll_finished(&mut self, cx: &mut Context<'_>) -> Poll<Option<Finished>> {
        use futures_util::StreamExt;
        self.running.poll_next_unpin(cx)
    }

    /// Drops every running handler.
    pub(crate) fn abort_all(&mut self) {
        self.running.clear();
        self.requests.clear();
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.running.is_empty()
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
        outgoing.insert_request(7, tx);
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
    }

    #[test]
    fn cancelled_request_is_forgotten() {
        let mut outgoing = Outgoing::default();
        let (tx, _rx) = oneshot::channel();
        outgoing.insert_request(1, tx);
        assert!(outgoing.cancel_request(1));
        assert!(!outgoing.contains(1));
        assert!(!outgoing.cancel_request(1));
    }

    #[tokio::test]
    async fn cancelled_handler_finishes_as_aborted() {
        let mut incoming = Incoming::new();
        let registration = incoming.registration(Some(3));
        incoming.push(
            Box::pin(std::future::pending::<Result<Reply, HandlerError>>()),
            registration,
            Some(3),
            Method::from_static("slow"),
            None,
            tracing::Span::none(),
        );
        assert!(incoming.is_running(3));
        assert!(incoming.cancel_request(3));
        let finished = std::future::poll_fn(|cx| incoming.poll_finished(cx))
            .await
            .unwrap();
        assert!(matches!(finished.outcome, Outcome::Aborted));
        assert!(!incoming.complete_request(3));
    }

    #[tokio::test]
    async fn panicking_handler_is_caught() {
        let mut incoming = Incoming::new();
        let registration = incoming.registration(None);
        incoming.push(
            Box::pin(async {
                if true {
                    panic!("boom");
                }
                Ok(Reply::nothing())
            }) as Pin<Box<dyn Future<Output = Result<Reply, HandlerError>> + Send>>,
            registration,
            None,
            Method::from_static("bad"),
            None,
            tracing::Span::none(),
        );
        let finished = std::future::poll_fn(|cx| incoming.poll_finished(cx))
            .await
            .unwrap();
        match finished.outcome {
            Outcome::Panicked(p) => assert_eq!(p.downcast_ref::<&str>(), Some(&"boom")),
            _ => panic!("expected a caught panic"),
        }
    }
}
