//! Exponential back-off, the one used wherever something is tried again: accepting after an
//! error, starting a pool's worker, reconnecting a client.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// A pause that doubles from `shortest` to `longest` while attempts fail.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Backoff {
    shortest: Duration,
    longest: Duration,
    pause: Duration,
}

impl Backoff {
    pub(crate) fn new(shortest: Duration, longest: Duration) -> Self {
        Self {
            shortest,
            longest: longest.max(shortest),
            pause: shortest,
        }
    }

    /// The pause now.
    pub(crate) fn pause(&self) -> Duration {
        self.pause
    }

    /// The pause now, with up to half of it taken off at random, so that peers that failed
    /// together do not all come back at once.
    pub(crate) fn jittered(&self) -> Duration {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(self.pause.as_nanos() as u64);
        let fraction = (hasher.finish() % 1_000) as f64 / 2_000.0;
        self.pause.mul_f64(1.0 - fraction)
    }

    /// After a failure: the next pause is twice as long, up to the longest.
    pub(crate) fn failed(&mut self) {
        self.pause = (self.pause * 2).min(self.longest);
    }

    /// After a success: the next pause is the shortest again.
    pub(crate) fn reset(&mut self) {
        self.pause = self.shortest;
    }

    /// After something that lasted `lived`: a short life counts as a failure.
    pub(crate) fn lived(&mut self, lived: Duration) {
        match lived < Duration::from_secs(5) {
            true => self.failed(),
            false => self.reset(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pause_doubles_to_the_longest_and_jitter_takes_at_most_half() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let pauses: Vec<_> = (0..4)
            .map(|_| {
                let pause = backoff.pause();
                backoff.failed();
                pause.as_millis()
            })
            .collect();
        assert_eq!(pauses, [100, 200, 350, 350]);
        for _ in 0..100 {
            let jittered = backoff.jittered();
            assert!(jittered <= backoff.pause() && jittered >= backoff.pause() / 2);
        }
        backoff.lived(Duration::from_secs(60));
        assert_eq!(backoff.pause(), Duration::from_millis(100));
        backoff.lived(Duration::from_secs(1));
        assert_eq!(backoff.pause(), Duration::from_millis(200));
    }
}
