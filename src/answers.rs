//! The answers to one connection's calls: a table of reusable slots shared by the callers and
//! the driver, instead of a oneshot channel per call (an allocation, and its atomics, each
//! time). A slot has two owners, the call's [`AnswerSender`] (with the driver) and its
//! [`AnswerReceiver`] (in the call's future); it is free again once both are done with it.
//!
//! The lock is held for a few instructions at a time and never while user code runs: a waker
//! is woken after it is released.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use crate::error::CallError;
use crate::shared::RawAnswer;

/// The slots of one connection's pending calls.
#[derive(Default)]
pub(crate) struct Answers {
    table: Mutex<Table>,
    /// Slots whose caller stopped waiting before the answer: while there are none, nobody
    /// has to take the lock to ask whether a call is still wanted (the driver asks of each).
    abandoned: AtomicUsize,
}

#[derive(Default)]
struct Table {
    slots: Vec<Slot>,
    free: Vec<u32>,
}

enum Slot {
    Free,
    /// The call waits for its answer; the waker of its last poll.
    Waiting(Option<Waker>),
    Answered(RawAnswer),
    /// The sender went without an answer (the connection is gone).
    Closed,
    /// The caller stopped waiting; an answer is dropped.
    Abandoned,
}

impl Table {
    /// Makes `key` free for the next call.
    fn free(&mut self, key: u32) {
        self.slots[key as usize] = Slot::Free;
        self.free.push(key);
    }
}

impl Answers {
    /// `slot` was taken out of the table: one abandoned slot fewer if it was one.
    fn forget(&self, slot: &Slot) {
        if matches!(slot, Slot::Abandoned) {
            self.abandoned.fetch_sub(1, Ordering::Release);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // NB. Nothing panics while it is held; a poisoned table is still consistent.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot for a new call: its two ends.
    pub(crate) fn channel(self: &Arc<Self>) -> (AnswerSender, AnswerReceiver) {
        let mut table = self.lock();
        let key = match table.free.pop() {
            Some(key) => {
                table.slots[key as usize] = Slot::Waiting(None);
                key
            }
            None => {
                let key = u32::try_from(table.slots.len()).expect("fewer than 2^32 pending calls");
                table.slots.push(Slot::Waiting(None));
                key
            }
        };
        drop(table);
        let sender = AnswerSender {
            answers: Arc::clone(self),
            key,
            sent: false,
        };
        (sender, AnswerReceiver { key, done: false })
    }

    /// Slots in use, for tests.
    #[cfg(test)]
    fn in_use(&self) -> usize {
        let table = self.lock();
        table.slots.len() - table.free.len()
    }
}

/// The driver's end of a call's slot; dropping it unanswered fails the call as closed.
pub(crate) struct AnswerSender {
    answers: Arc<Answers>,
    key: u32,
    sent: bool,
}

impl AnswerSender {
    /// Delivers the answer; `Err` with it when the caller stopped waiting.
    pub(crate) fn send(mut self, answer: RawAnswer) -> Result<(), RawAnswer> {
        self.sent = true;
        let mut table = self.answers.lock();
        let slot = &mut table.slots[self.key as usize];
        match std::mem::replace(slot, Slot::Answered(answer)) {
            Slot::Waiting(waker) => {
                drop(table);
                if let Some(waker) = waker {
                    waker.wake();
                }
                Ok(())
            }
            old => {
                let Slot::Answered(answer) = std::mem::replace(slot, Slot::Free) else {
                    unreachable!("just set")
                };
                table.free(self.key);
                drop(table);
                self.answers.forget(&old);
                Err(answer)
            }
        }
    }

    /// Fails the call with `error` (boxed here, for every failure alike); ignored when the
    /// caller stopped waiting.
    pub(crate) fn fail(self, error: CallError) {
        let _ = self.send(Err(Box::new(error)));
    }

    /// `true` when the caller stopped waiting. (A caller that stops a moment after is told
    /// by its cancel.)
    pub(crate) fn is_closed(&self) -> bool {
        self.answers.abandoned.load(Ordering::Acquire) > 0
            && matches!(
                self.answers.lock().slots[self.key as usize],
                Slot::Abandoned
            )
    }
}

impl Drop for AnswerSender {
    fn drop(&mut self) {
        if self.sent {
            return;
        }
        let mut table = self.answers.lock();
        let slot = &mut table.slots[self.key as usize];
        match std::mem::replace(slot, Slot::Closed) {
            Slot::Waiting(waker) => {
                drop(table);
                if let Some(waker) = waker {
                    waker.wake();
                }
            }
            old => {
                table.free(self.key);
                drop(table);
                self.answers.forget(&old);
            }
        }
    }
}

impl std::fmt::Debug for AnswerSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnswerSender")
            .field("key", &self.key)
            .finish()
    }
}

/// The call's end of its slot, polled through the connection's [`Answers`] (the call holds
/// them already). It must be given back with [`AnswerReceiver::release`] unless it was
/// answered through [`AnswerReceiver::poll`].
#[derive(Debug)]
pub(crate) struct AnswerReceiver {
    key: u32,
    done: bool,
}

/// The sender went without an answer.
#[derive(Debug)]
pub(crate) struct Closed;

impl AnswerReceiver {
    /// The answer, once there; the slot is free after `Ready`.
    pub(crate) fn poll(
        &mut self,
        answers: &Answers,
        cx: &mut Context<'_>,
    ) -> Poll<Result<RawAnswer, Closed>> {
        if self.done {
            return Poll::Ready(Err(Closed));
        }
        let mut table = answers.lock();
        let slot = &mut table.slots[self.key as usize];
        let outcome = match slot {
            Slot::Waiting(Some(waker)) if waker.will_wake(cx.waker()) => return Poll::Pending,
            Slot::Waiting(waker) => {
                let old = waker.replace(cx.waker().clone());
                drop(table);
                drop(old);
                return Poll::Pending;
            }
            Slot::Answered(_) => match std::mem::replace(slot, Slot::Free) {
                Slot::Answered(answer) => Ok(answer),
                _ => unreachable!("just matched"),
            },
            // NB. Never an abandoned slot: `done` keeps a released receiver from polling (an
            // abandoned slot freed here would stay in the count).
            other => {
                debug_assert!(!matches!(other, Slot::Abandoned), "polled after release");
                Err(Closed)
            }
        };
        table.free(self.key);
        self.done = true;
        Poll::Ready(outcome)
    }

    /// Gives the slot back when the call stops waiting unanswered.
    pub(crate) fn release(&mut self, answers: &Answers) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let mut table = answers.lock();
        let slot = &mut table.slots[self.key as usize];
        let old = std::mem::replace(slot, Slot::Abandoned);
        // A waiting slot is the sender's to free.
        match old {
            Slot::Waiting(_) => {
                answers.abandoned.fetch_add(1, Ordering::Release);
            }
            _ => table.free(self.key),
        }
        drop(table);
        // An unread answer (or an old waker) is dropped outside the lock.
        drop(old);
    }
}

/// A receiver that frees its slot when dropped, as a oneshot's does, for the driver's tests.
#[cfg(test)]
pub(crate) struct TestReceiver {
    answers: Arc<Answers>,
    rx: AnswerReceiver,
}

/// Why [`TestReceiver::try_recv`] has no answer.
#[cfg(test)]
#[derive(Debug)]
pub(crate) enum TryRecvError {
    Empty,
    Closed,
}

#[cfg(test)]
impl TestReceiver {
    pub(crate) fn try_recv(&mut self) -> Result<RawAnswer, TryRecvError> {
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        match self.rx.poll(&self.answers, &mut cx) {
            Poll::Ready(Ok(answer)) => Ok(answer),
            Poll::Ready(Err(Closed)) => Err(TryRecvError::Closed),
            Poll::Pending => Err(TryRecvError::Empty),
        }
    }
}

#[cfg(test)]
impl Drop for TestReceiver {
    fn drop(&mut self) {
        self.rx.release(&self.answers);
    }
}

/// A slot in a table of its own.
#[cfg(test)]
pub(crate) fn test_channel() -> (AnswerSender, TestReceiver) {
    let answers = Arc::new(Answers::default());
    let (tx, rx) = answers.channel();
    (tx, TestReceiver { answers, rx })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Codec;
    use crate::message::Attributes;
    use crate::shared::RawResponse;
    use bytes::Bytes;
    use std::task::Waker;

    fn answer() -> RawAnswer {
        Ok(RawResponse {
            payload: Bytes::from_static(b"x"),
            attributes: Attributes::new(),
            codec: Codec::default(),
        })
    }

    #[test]
    fn every_ending_frees_the_slot_once_both_ends_are_done() {
        let answers = Arc::new(Answers::default());
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        // Answered, then taken.
        let (tx, mut rx) = answers.channel();
        assert!(rx.poll(&answers, &mut cx).is_pending());
        assert!(!tx.is_closed());
        tx.send(answer()).unwrap();
        assert!(matches!(rx.poll(&answers, &mut cx), Poll::Ready(Ok(_))));
        assert_eq!(answers.in_use(), 0);
        // Abandoned, then answered: the answer comes back.
        let (tx, mut rx) = answers.channel();
        rx.release(&answers);
        assert!(tx.is_closed());
        assert!(tx.send(answer()).is_err());
        assert_eq!(answers.in_use(), 0);
        // Answered, then abandoned unread.
        let (tx, mut rx) = answers.channel();
        tx.send(answer()).unwrap();
        rx.release(&answers);
        assert_eq!(answers.in_use(), 0);
        // The sender dropped: closed.
        let (tx, mut rx) = answers.channel();
        drop(tx);
        assert!(matches!(
            rx.poll(&answers, &mut cx),
            Poll::Ready(Err(Closed))
        ));
        rx.release(&answers);
        assert_eq!(answers.in_use(), 0);
        // Both dropped unanswered, in either order.
        let (tx, mut rx) = answers.channel();
        rx.release(&answers);
        drop(tx);
        let (tx, mut rx) = answers.channel();
        drop(tx);
        rx.release(&answers);
        assert_eq!(answers.in_use(), 0);
        // The slots were reused: no more than the two of the last case.
        assert!(answers.lock().slots.len() <= 2);
        assert_eq!(
            answers.abandoned.load(Ordering::SeqCst),
            0,
            "every abandoned slot was counted out when freed"
        );
    }

    #[test]
    fn senders_and_receivers_on_other_threads_leave_no_slot_behind() {
        // Each caller thread makes calls whose answers another thread sends, or drops
        // unanswered, while the caller waits, gives up at once, or polls first: every slot is
        // free at the end, and every answer sent to a waiting caller reaches it.
        let answers = Arc::new(Answers::default());
        let (to_driver, from_callers) = std::sync::mpsc::channel::<(usize, AnswerSender)>();
        let driver = std::thread::spawn(move || {
            for (n, sender) in from_callers {
                match n % 3 {
                    0 => drop(sender),
                    _ => {
                        let _ = sender.send(answer());
                    }
                }
            }
        });
        let callers: Vec<_> = (0..4)
            .map(|thread| {
                let answers = Arc::clone(&answers);
                let to_driver = to_driver.clone();
                std::thread::spawn(move || {
                    let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
                    for i in 0..2_000 {
                        let n = thread * 7 + i;
                        let (sender, mut receiver) = answers.channel();
                        to_driver.send((n, sender)).unwrap();
                        match n % 4 {
                            0 => receiver.release(&answers),
                            1 => {
                                let _ = receiver.poll(&answers, &mut cx);
                                receiver.release(&answers);
                            }
                            _ => loop {
                                match receiver.poll(&answers, &mut cx) {
                                    Poll::Ready(Ok(_)) => break assert_ne!(n % 3, 0),
                                    Poll::Ready(Err(Closed)) => break assert_eq!(n % 3, 0),
                                    Poll::Pending => std::thread::yield_now(),
                                }
                            },
                        }
                    }
                })
            })
            .collect();
        drop(to_driver);
        for caller in callers {
            caller.join().unwrap();
        }
        driver.join().unwrap();
        assert_eq!(answers.in_use(), 0);
        assert_eq!(answers.abandoned.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn an_answer_wakes_the_waker_of_the_last_poll() {
        struct Count(std::sync::atomic::AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let count = Arc::new(Count(Default::default()));
        let waker = Waker::from(Arc::clone(&count));
        let answers = Arc::new(Answers::default());
        let (tx, mut rx) = answers.channel();
        assert!(rx
            .poll(&answers, &mut Context::from_waker(&waker))
            .is_pending());
        tx.send(answer()).unwrap();
        assert_eq!(count.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        let (tx, mut rx) = answers.channel();
        assert!(rx
            .poll(&answers, &mut Context::from_waker(&waker))
            .is_pending());
        drop(tx);
        assert_eq!(count.0.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert!(rx
            .poll(&answers, &mut Context::from_waker(&waker))
            .is_ready());
    }

    /// One slot per pending call: an answer's rare error is boxed to keep it small.
    #[test]
    fn a_slot_stays_small() {
        let size = std::mem::size_of::<Slot>();
        assert!(size <= 56, "a slot takes {size} bytes");
    }
}
