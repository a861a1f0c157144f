//! Per-key wakers: each handler slot and each stored stream gets a waker of its own that
//! queues its key and wakes the driver, so the driver polls only what was woken, in place,
//! without a task per future.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Wake, Waker};

use futures_util::task::AtomicWaker;

/// The keys woken since the driver last looked, and the driver to wake.
#[derive(Default)]
pub(crate) struct WakeQueue {
    keys: Mutex<Vec<u64>>,
    driver: AtomicWaker,
}

impl WakeQueue {
    /// Registers the driver's waker; call before [`take`](Self::take) so no wake is lost.
    pub(crate) fn register(&self, waker: &Waker) {
        self.driver.register(waker);
    }

    /// Moves the woken keys into `into` (which should be empty).
    pub(crate) fn take(&self, into: &mut Vec<u64>) {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::swap(&mut *keys, into);
    }

    /// Wakes the driver without queueing a key.
    pub(crate) fn wake_driver(&self) {
        self.driver.wake();
    }

    fn push(&self, key: u64) {
        self.keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(key);
        self.driver.wake();
    }
}

/// Wakes one key: queues it (once until it is polled again) and wakes the driver.
pub(crate) struct KeyWaker {
    key: u64,
    queued: AtomicBool,
    queue: Arc<WakeQueue>,
}

impl KeyWaker {
    pub(crate) fn new(key: u64, queue: Arc<WakeQueue>) -> Self {
        Self {
            key,
            queued: AtomicBool::new(false),
            queue,
        }
    }

    /// Called just before the key's future is polled: a wake from now on queues it again.
    pub(crate) fn polling(&self) {
        self.queued.store(false, Ordering::Release);
    }

    pub(crate) fn wake_key(&self) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            self.queue.push(self.key);
        }
    }
}

impl Wake for KeyWaker {
    fn wake(self: Arc<Self>) {
        self.wake_key();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.wake_key();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_queued_once_until_polled_again() {
        let queue = Arc::new(WakeQueue::default());
        let waker = Arc::new(KeyWaker::new(7, Arc::clone(&queue)));
        let as_waker = Waker::from(Arc::clone(&waker));
        as_waker.wake_by_ref();
        as_waker.wake_by_ref();
        let mut keys = Vec::new();
        queue.take(&mut keys);
        assert_eq!(keys, [7]);

        keys.clear();
        waker.polling();
        as_waker.wake();
        queue.take(&mut keys);
        assert_eq!(keys, [7], "queued again after a poll");
    }
}
