//! Spare chunk payload buffers, kept for the next chunks instead of going back to the allocator.
//!
//! A receiver reads each big chunk's payload into a buffer of its own ([`super::Connection`]), verifies and writes it
//! on the writer's thread, and hands it to the digest follower, which drops it: one buffer of about a chunk per chunk.
//! Freshly allocated, such a buffer is new memory to the process (glibc gives it from a fresh `mmap` or from the
//! top of a heap it trimmed): the socket copy faults in and zeroes every page of it, about a quarter of a fresh
//! push's pages (71,000 faults per GiB). A [`ChunkBuffers`] pool takes the buffers back once their bytes are written
//! and hashed and gives them to the next payloads, whose pages are then already mapped.
//!
//! The pool is shared by every connection of a receiver (a server, or a pulling client) and keeps at most
//! [`SPARE_BYTES`] of spare capacity: what it holds when idle is bounded, whatever the number of connections.

use std::sync::{Arc, Mutex};

/// Most capacity, in bytes, a pool keeps in spare buffers (the largest buffers are kept).
pub const SPARE_BYTES: usize = 32 << 20;

/// Payloads smaller than this are not pooled (their buffers come from the allocator's small bins, already mapped).
pub const MIN_POOLED: usize = 64 << 10;

/// A shared pool of spare payload buffers ([module docs](self)); clones share the pool.
#[derive(Clone, Debug)]
pub struct ChunkBuffers {
    inner: Arc<Mutex<Spare>>,
}

/// The spare buffers, smallest capacity first, and their total capacity.
#[derive(Debug, Default)]
struct Spare {
    buffers: Vec<Vec<u8>>,
    bytes: usize,
    limit: usize,
}

impl Default for ChunkBuffers {
    fn default() -> Self {
        ChunkBuffers::with_limit(SPARE_BYTES)
    }
}

impl ChunkBuffers {
    /// A pool that keeps at most `limit` bytes of spare capacity.
    pub fn with_limit(limit: usize) -> Self {
        ChunkBuffers {
            inner: Arc::new(Mutex::new(Spare {
                limit,
                ..Spare::default()
            })),
        }
    }

    /// An empty buffer with room for `len` bytes: the smallest spare one that has it, else a new one (its capacity
    /// rounded up to a power of two, so that it fits the next chunks of about the same size too).
    pub fn take(&self, len: usize) -> Vec<u8> {
        if len < MIN_POOLED {
            return Vec::with_capacity(len);
        }
        let mut spare = self.lock();
        if let Some(at) = spare.buffers.iter().position(|b| b.capacity() >= len) {
            let buffer = spare.buffers.remove(at);
            spare.bytes -= buffer.capacity();
            return buffer;
        }
        drop(spare);
        Vec::with_capacity(len.checked_next_power_of_two().unwrap_or(len))
    }

    /// Takes `buffer` back for a later [`ChunkBuffers::take`] (emptied); the smallest spare buffers are freed while the
    /// pool holds more than its limit.
    pub fn give(&self, mut buffer: Vec<u8>) {
        if buffer.capacity() < MIN_POOLED {
            return;
        }
        buffer.clear();
        let mut spare = self.lock();
        spare.bytes += buffer.capacity();
        let at = spare.buffers.partition_point(|b| b.capacity() < buffer.capacity());
        spare.buffers.insert(at, buffer);
        while spare.bytes > spare.limit {
            let smallest = spare.buffers.remove(0);
            spare.bytes -= smallest.capacity();
        }
    }

    /// Spare buffers held now.
    pub fn spare(&self) -> usize {
        self.lock().buffers.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Spare> {
        // The pool's state is valid after any panic (each step leaves it consistent): a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_given_back_serves_the_next_payload_that_fits() {
        let pool = ChunkBuffers::default();
        let mut first = pool.take(1_000_000);
        assert_eq!(first.capacity(), 1 << 20, "rounded up to a power of two");
        first.extend_from_slice(&[7; 1000]);
        let at = first.as_ptr();
        pool.give(first);
        let again = pool.take(900_000);
        assert_eq!(again.as_ptr(), at, "the same allocation, pages already mapped");
        assert!(again.is_empty());
        assert_eq!(pool.spare(), 0);
        let bigger = pool.take(2_000_000);
        assert_ne!(bigger.as_ptr(), at);
        pool.give(again);
        assert_eq!(
            pool.take(1_500_000).capacity(),
            2 << 20,
            "a spare buffer too small is not used"
        );
        assert_eq!(pool.spare(), 1, "it stays for a payload it fits");
    }

    #[test]
    fn the_smallest_buffer_goes_when_the_pool_is_full_and_small_payloads_are_not_pooled() {
        let pool = ChunkBuffers::with_limit(3 << 20);
        let small = pool.take(1 << 20);
        let large = pool.take(2 << 20);
        let other = pool.take(2 << 20);
        let kept = large.as_ptr();
        pool.give(small);
        pool.give(large);
        assert_eq!(pool.spare(), 2);
        pool.give(other);
        assert_eq!(
            pool.spare(),
            1,
            "3 MiB of room: the 1 MiB buffer and one 2 MiB buffer went"
        );
        assert_eq!(pool.take(1).capacity(), 1, "a small payload is allocated as it is");
        pool.give(Vec::with_capacity(100));
        assert_eq!(pool.spare(), 1);
        let last = pool.take(2 << 20);
        assert_eq!(last.as_ptr(), kept, "of two alike, the buffer given back first stays");
    }
}
