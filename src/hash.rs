//! A small keyed hasher for the connection's tables (request ids, method names): a folded
//! 64x64->128-bit multiply, as in foldhash and ahash. Much cheaper than SipHash for 8-byte
//! keys; the random per-table seed keeps a peer from choosing ids that all collide, since every
//! input bit reaches the low (bucket) bits through the fold.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

const MULTIPLIER: u64 = 0x9E37_79B9_7F4A_7C15;

#[inline]
fn fold_multiply(x: u64, y: u64) -> u64 {
    let full = u128::from(x) * u128::from(y);
    (full as u64) ^ ((full >> 64) as u64)
}

/// Builds [`FoldHasher`]s with one random seed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SeededState {
    seed: u64,
}

impl Default for SeededState {
    fn default() -> Self {
        Self {
            seed: RandomState::new().hash_one(0x5eed_u64) | 1,
        }
    }
}

impl BuildHasher for SeededState {
    type Hasher = FoldHasher;

    fn build_hasher(&self) -> FoldHasher {
        FoldHasher { state: self.seed }
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct FoldHasher {
    state: u64,
}

impl Hasher for FoldHasher {
    #[inline]
    fn finish(&self) -> u64 {
        self.state
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let word = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
            self.write_u64(word);
        }
        let mut tail = [0u8; 8];
        let rest = chunks.remainder();
        tail[..rest.len()].copy_from_slice(rest);
        self.write_u64(u64::from_le_bytes(tail) ^ (rest.len() as u64) << 59);
    }

    #[inline]
    fn write_u64(&mut self, word: u64) {
        self.state = fold_multiply(self.state ^ word, MULTIPLIER);
    }

    #[inline]
    fn write_usize(&mut self, word: usize) {
        self.write_u64(word as u64);
    }

    #[inline]
    fn write_u8(&mut self, byte: u8) {
        self.write_u64(u64::from(byte));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_differing_only_in_high_bits_spread_over_buckets() {
        let state = SeededState::default();
        let buckets: HashSet<u64> = (0..1024u64)
            .map(|i| state.hash_one(i << 40) & 1023)
            .collect();
        assert!(
            buckets.len() > 500,
            "only {} of 1024 buckets used",
            buckets.len()
        );
    }

    #[test]
    fn strings_of_every_length_hash_differently() {
        let state = SeededState::default();
        let hashes: HashSet<u64> = (0..64).map(|n| state.hash_one("a".repeat(n))).collect();
        assert_eq!(hashes.len(), 64);
    }
}
