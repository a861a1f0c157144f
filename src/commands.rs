//! The handles' commands to their connection's driver: one locked queue that the driver takes
//! whole (a swap of two `VecDeque`s) and works through at its own pace, instead of a channel
//! whose every message costs atomics, block bookkeeping and a budget check on both ends. A
//! sender wakes the driver only when the queue was empty: the driver takes everything queued
//! after it was woken, so the later senders of a burst need not.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use crate::shared::Command;
use crate::wake::DriverWaker;

/// The most room for commands kept after a burst.
const KEPT: usize = 1024;

struct Queue {
    commands: Mutex<Queued>,
}

#[derive(Default)]
struct Queued {
    commands: VecDeque<Command>,
    /// The driver's waker, from its last look at an empty queue.
    driver: DriverWaker,
    /// The sender (the handles' shared state) is gone.
    sender_gone: bool,
    /// The driver takes no more.
    closed: bool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Queued> {
        // NB. Nothing panics while it is held; a poisoned queue is still consistent.
        self.commands.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A queue's two ends.
pub(crate) fn channel() -> (CommandSender, CommandReceiver) {
    let queue = Arc::new(Queue {
        commands: Mutex::default(),
    });
    let receiver = CommandReceiver {
        queue: Arc::clone(&queue),
        batch: VecDeque::new(),
    };
    (CommandSender { queue }, receiver)
}

/// The driver takes no more commands.
#[derive(Debug)]
pub(crate) struct Closed;

/// The handles' end (one per connection, in their shared state); dropping it tells the driver
/// that every handle is gone.
pub(crate) struct CommandSender {
    queue: Arc<Queue>,
}

impl CommandSender {
    /// Queues a command; `Err` when the driver takes no more (the command is dropped).
    pub(crate) fn send(&self, command: Command) -> Result<(), Closed> {
        let mut queued = self.queue.lock();
        if queued.closed {
            drop(queued);
            drop(command);
            return Err(Closed);
        }
        let driver = queued.driver.for_push(queued.commands.is_empty());
        queued.commands.push_back(command);
        drop(queued);
        if let Some(driver) = driver {
            driver.wake();
        }
        Ok(())
    }
}

impl Drop for CommandSender {
    fn drop(&mut self) {
        let driver = {
            let mut queued = self.queue.lock();
            queued.sender_gone = true;
            queued.driver.take()
        };
        if let Some(driver) = driver {
            driver.wake();
        }
    }
}

/// The driver's end; dropping it closes the queue and drops what is left in it (a call's
/// answer slot then tells its caller that the connection is gone).
pub(crate) struct CommandReceiver {
    queue: Arc<Queue>,
    /// Taken from the queue, not yet handed out.
    batch: VecDeque<Command>,
}

impl CommandReceiver {
    /// The next command; `None` once the sender is gone and every command was taken.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Command>> {
        if let Some(command) = self.batch.pop_front() {
            return Poll::Ready(Some(command));
        }
        if self.batch.capacity() > KEPT {
            // A burst is over: its room goes back to the allocator, not to the next swap.
            self.batch = VecDeque::new();
        }
        let mut queued = self.queue.lock();
        std::mem::swap(&mut queued.commands, &mut self.batch);
        if !self.batch.is_empty() {
            drop(queued);
            return Poll::Ready(self.batch.pop_front());
        }
        if queued.sender_gone {
            return Poll::Ready(None);
        }
        // NB. Looked and registered under one lock: a command queued after it finds the waker.
        let old = queued.driver.register(cx.waker());
        drop(queued);
        drop(old);
        Poll::Pending
    }

    /// Takes no more: later sends fail.
    pub(crate) fn close(&mut self) {
        self.queue.lock().closed = true;
    }

    /// The next command, without waiting.
    pub(crate) fn try_recv(&mut self) -> Option<Command> {
        self.batch
            .pop_front()
            .or_else(|| self.queue.lock().commands.pop_front())
    }
}

impl Drop for CommandReceiver {
    fn drop(&mut self) {
        let left = {
            let mut queued = self.queue.lock();
            queued.closed = true;
            std::mem::take(&mut queued.commands)
        };
        // Dropped outside the lock: dropping a call's answer slot wakes its caller.
        drop(left);
    }
}

impl std::fmt::Debug for CommandReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandReceiver")
            .field("batch", &self.batch.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Wake, Waker};

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn ids(receiver: &mut CommandReceiver, cx: &mut Context<'_>) -> Vec<u64> {
        let mut ids = Vec::new();
        while let Poll::Ready(Some(Command::Cancel(id))) = receiver.poll_recv(cx) {
            ids.push(id);
        }
        ids
    }

    #[test]
    fn commands_arrive_in_order_and_a_burst_wakes_the_driver_once() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&count));
        let mut cx = Context::from_waker(&waker);
        let (sender, mut receiver) = channel();
        assert!(receiver.poll_recv(&mut cx).is_pending());
        for id in 0..5 {
            sender.send(Command::Cancel(id)).unwrap();
        }
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "one wake for the burst");
        assert_eq!(ids(&mut receiver, &mut cx), [0, 1, 2, 3, 4]);
        sender.send(Command::Cancel(5)).unwrap();
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            2,
            "empty again: woken again"
        );
        assert_eq!(ids(&mut receiver, &mut cx), [5]);
        drop(sender);
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            3,
            "the sender's drop wakes it"
        );
        assert!(matches!(receiver.poll_recv(&mut cx), Poll::Ready(None)));
    }

    #[test]
    fn commands_from_other_threads_all_arrive_in_each_senders_order() {
        struct Unpark(std::thread::Thread);
        impl Wake for Unpark {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let (sender, mut receiver) = channel();
        let sender = Arc::new(sender);
        let threads: Vec<_> = (0..4u64)
            .map(|thread| {
                let sender = Arc::clone(&sender);
                std::thread::spawn(move || {
                    for i in 0..5_000 {
                        sender.send(Command::Cancel(thread << 32 | i)).unwrap();
                    }
                })
            })
            .collect();
        drop(sender);
        // The receiver parks when it has nothing: only the senders' wakes bring it back.
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        let mut next = [0u64; 4];
        loop {
            match receiver.poll_recv(&mut cx) {
                Poll::Ready(Some(Command::Cancel(id))) => {
                    let thread = (id >> 32) as usize;
                    assert_eq!(id & 0xffff_ffff, next[thread], "in order per sender");
                    next[thread] += 1;
                }
                Poll::Ready(Some(_)) => unreachable!("only cancels are sent"),
                Poll::Ready(None) => break,
                Poll::Pending => {
                    let parked = std::time::Instant::now();
                    std::thread::park_timeout(std::time::Duration::from_secs(10));
                    assert!(
                        parked.elapsed() < std::time::Duration::from_secs(10),
                        "a command came and nobody woke the receiver"
                    );
                }
            }
        }
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(next, [5_000; 4], "every command arrived");
    }

    #[test]
    fn a_closed_or_dropped_receiver_refuses_commands_and_drops_what_was_queued() {
        let (sender, mut receiver) = channel();
        sender.send(Command::Cancel(1)).unwrap();
        receiver.close();
        assert!(sender.send(Command::Cancel(2)).is_err());
        assert!(matches!(receiver.try_recv(), Some(Command::Cancel(1))));
        assert!(receiver.try_recv().is_none());
        let (sender, receiver) = channel();
        let (reply, mut answer) = crate::answers::test_channel();
        let call = Command::Call {
            id: 1,
            call: crate::shared::Outbound::new(
                crate::envelope::Method::from_static("m"),
                crate::message::Attributes::new(),
                bytes::Bytes::new(),
                crate::shared::Permit::None,
                0,
                None,
            ),
            deadline: None,
            reply,
        };
        sender.send(call).unwrap();
        drop(receiver);
        assert!(
            matches!(answer.try_recv(), Err(crate::answers::TryRecvError::Closed)),
            "the queued call learns that the connection is gone"
        );
        assert!(sender.send(Command::Cancel(3)).is_err());
    }

    /// A command is moved into the queue and out of it: at 128 bytes or less the compiler
    /// moves it without calling `memcpy`.
    #[test]
    fn a_command_stays_small() {
        let size = std::mem::size_of::<Command>();
        assert!(size <= 128, "a command takes {size} bytes");
    }
}
