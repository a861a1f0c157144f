//! Per-key wakers: each handler slot and each stored stream gets a waker of its own that
//! queues its key and wakes the driver, so the driver polls only what was woken, in place,
//! without a task per future.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Wake, Waker};

/// The keys woken since the driver last looked, and the driver to wake.
#[derive(Default)]
pub(crate) struct WakeQueue {
    woken: Mutex<Woken>,
}

#[derive(Default)]
struct Woken {
    keys: Vec<u64>,
    /// The driver's waker, from its last look at an empty queue: kept under the same lock as
    /// the keys, so that looking and registering are one step (as in `commands.rs`).
    driver: Option<Waker>,
}

impl WakeQueue {
    fn lock(&self) -> MutexGuard<'_, Woken> {
        self.woken.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves the woken keys into `into` (which should be empty); when there are none, keeps
    /// `waker` for the next key.
    pub(crate) fn take_or_register(&self, waker: &Waker, into: &mut Vec<u64>) {
        let mut woken = self.lock();
        std::mem::swap(&mut woken.keys, into);
        if !into.is_empty() {
            return;
        }
        let old = match &woken.driver {
            Some(driver) if driver.will_wake(waker) => None,
            _ => woken.driver.replace(waker.clone()),
        };
        drop(woken);
        drop(old);
    }

    /// Wakes the driver without queueing a key.
    pub(crate) fn wake_driver(&self) {
        let driver = self.lock().driver.clone();
        if let Some(driver) = driver {
            driver.wake();
        }
    }

    /// Queues `key`; the driver is woken when the queue was empty (it takes all keys at once,
    /// so a key queued behind others is taken with them).
    fn push(&self, key: u64) {
        let mut woken = self.lock();
        let driver = match woken.keys.is_empty() {
            true => woken.driver.clone(),
            false => None,
        };
        woken.keys.push(key);
        drop(woken);
        if let Some(driver) = driver {
            driver.wake();
        }
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
        let driver = futures_util::task::noop_waker_ref();
        let mut keys = Vec::new();
        queue.take_or_register(driver, &mut keys);
        assert_eq!(keys, [7]);

        keys.clear();
        waker.polling();
        as_waker.wake();
        queue.take_or_register(driver, &mut keys);
        assert_eq!(keys, [7], "queued again after a poll");
    }
}
