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
    driver: DriverWaker,
}

/// The driver's waker, kept under the lock of the queue it waits on (this one, and the
/// command queue): looking at the queue and registering are then one step, and a push wakes
/// the driver only when it found the queue empty, since the driver takes all it holds at once.
/// Wakers are dropped and woken by the callers once the lock is released.
#[derive(Default)]
pub(crate) struct DriverWaker(Option<Waker>);

impl DriverWaker {
    /// Keeps `waker` unless the kept one wakes the same task; the one it replaces.
    #[inline]
    #[must_use = "drop the old waker once the lock is released"]
    pub(crate) fn register(&mut self, waker: &Waker) -> Option<Waker> {
        match &self.0 {
            Some(kept) if kept.will_wake(waker) => None,
            _ => self.0.replace(waker.clone()),
        }
    }

    /// The waker to wake for a push that found the queue empty.
    #[inline]
    pub(crate) fn for_push(&self, was_empty: bool) -> Option<Waker> {
        match was_empty {
            true => self.0.clone(),
            false => None,
        }
    }

    /// The waker, taken out: nothing will wait on the queue again.
    #[inline]
    pub(crate) fn take(&mut self) -> Option<Waker> {
        self.0.take()
    }
}

impl WakeQueue {
    fn lock(&self) -> MutexGuard<'_, Woken> {
        self.woken.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves the woken keys into `into` (which should be empty), and keeps `waker` for the
    /// next key.
    ///
    /// NB. Kept at every take, not only at one that finds nothing: the driver may end its turn
    /// right after a take that found keys (the streams' queue is looked at once a pass), and
    /// the next key must find this task's waker, not an older task's or none.
    pub(crate) fn take_or_register(&self, waker: &Waker, into: &mut Vec<u64>) {
        let mut woken = self.lock();
        std::mem::swap(&mut woken.keys, into);
        let old = woken.driver.register(waker);
        drop(woken);
        drop(old);
    }

    /// Wakes the driver without queueing a key.
    pub(crate) fn wake_driver(&self) {
        let driver = self.lock().driver.for_push(true);
        if let Some(driver) = driver {
            driver.wake();
        }
    }

    /// Queues `key`; the driver is woken when the queue was empty (it takes all keys at once,
    /// so a key queued behind others is taken with them).
    fn push(&self, key: u64) {
        let mut woken = self.lock();
        let driver = woken.driver.for_push(woken.keys.is_empty());
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

    /// A driver's waker that counts its wakes.
    struct Count(std::sync::atomic::AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_first_key_after_a_look_at_an_empty_queue_wakes_the_driver_once() {
        let count = Arc::new(Count(Default::default()));
        let driver = Waker::from(Arc::clone(&count));
        let queue = Arc::new(WakeQueue::default());
        let mut keys = Vec::new();
        queue.take_or_register(&driver, &mut keys);
        for key in 1..=3 {
            Waker::from(Arc::new(KeyWaker::new(key, Arc::clone(&queue)))).wake();
        }
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "one wake for the three");
        queue.take_or_register(&driver, &mut keys);
        assert_eq!(keys, [1, 2, 3]);
        Waker::from(Arc::new(KeyWaker::new(4, Arc::clone(&queue)))).wake();
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            2,
            "taken: the next key wakes it again"
        );
        queue.wake_driver();
        assert_eq!(count.0.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_take_that_finds_keys_keeps_the_new_drivers_waker() {
        let (old, new) = (
            Arc::new(Count(Default::default())),
            Arc::new(Count(Default::default())),
        );
        let queue = Arc::new(WakeQueue::default());
        let mut keys = Vec::new();
        // The driver's task looked once, then moved to another task (or never looked at an
        // empty queue): its next look finds a key.
        queue.take_or_register(&Waker::from(Arc::clone(&old)), &mut keys);
        Waker::from(Arc::new(KeyWaker::new(1, Arc::clone(&queue)))).wake();
        queue.take_or_register(&Waker::from(Arc::clone(&new)), &mut keys);
        assert_eq!(keys, [1]);
        // It may end its turn now: the next key must wake the task that took the first.
        Waker::from(Arc::new(KeyWaker::new(2, Arc::clone(&queue)))).wake();
        assert_eq!(new.0.load(Ordering::SeqCst), 1, "the taking task is woken");
        assert_eq!(old.0.load(Ordering::SeqCst), 1, "only by the first key");
    }

    #[test]
    fn keys_woken_on_other_threads_all_arrive_and_wake_a_parked_driver() {
        struct Unpark(std::thread::Thread);
        impl Wake for Unpark {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let queue = Arc::new(WakeQueue::default());
        let driver = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut keys = Vec::new();
        queue.take_or_register(&driver, &mut keys);
        assert!(keys.is_empty());
        let threads: Vec<_> = (0..4u64)
            .map(|thread| {
                let queue = Arc::clone(&queue);
                std::thread::spawn(move || {
                    for i in 0..1_000 {
                        let waker = Arc::new(KeyWaker::new(thread * 1_000 + i, Arc::clone(&queue)));
                        Waker::from(waker).wake();
                    }
                })
            })
            .collect();
        let mut seen = std::collections::HashSet::new();
        while seen.len() < 4_000 {
            keys.clear();
            queue.take_or_register(&driver, &mut keys);
            if keys.is_empty() {
                let parked = std::time::Instant::now();
                std::thread::park_timeout(std::time::Duration::from_secs(10));
                assert!(
                    parked.elapsed() < std::time::Duration::from_secs(10),
                    "a key was queued and nobody woke the driver"
                );
            }
            seen.extend(keys.iter().copied());
        }
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(seen.len(), 4_000);
    }

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
