//! The bytes a streamed offer's hashing thread read, held for the sender (proto-spec.md §4, "Streamed offer"), so a
//! chunk the receiver asks for soon enough goes out as it was hashed: not read from the file again, not hashed
//! again. A held chunk's bytes are a copy of exactly the bytes its manifest hash was computed from, so they match
//! their entry by construction; the end-of-hashing check (size and mtime unchanged) and the receiver's whole-file
//! digest keep the guarantees of a chunk read again.
//!
//! [`Hold`] owns the byte budget that bounds them, shared by the hashing thread (which copies chunks in while the
//! budget has room) and the sender's pipeline (which sends held chunks, or drops those the receiver does not need,
//! and gives their room back). A chunk that finds no room is not held; the sender reads and re-hashes it as before.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// Bytes of hashed chunks the hashing thread may hold for the sender at once, by default.
pub const HOLD_BUDGET: u64 = 8 * 1024 * 1024;

/// The budget of held chunk bytes, shared by the hashing thread and the sender.
pub struct Hold {
    budget: u64,
    state: Mutex<HoldState>,
    /// Signalled when held bytes leave or the sender is gone.
    freed: Condvar,
}

#[derive(Default)]
struct HoldState {
    /// Bytes held: copied, not yet sent or dropped.
    held: u64,
    /// Of those, bytes of chunks the receiver asked for: they leave as the socket takes them, whatever the hashing
    /// does, so the hashing may wait for them.
    needed: u64,
    /// The sender is gone: nothing more is held and nobody waits.
    closed: bool,
    /// Buffers of chunks that left, for the next copies (their capacity counts against the budget too).
    spare: Vec<Vec<u8>>,
    spare_bytes: u64,
}

impl Hold {
    /// A hold of at most `budget` bytes.
    pub fn new(budget: u64) -> Hold {
        Hold {
            budget,
            state: Mutex::new(HoldState::default()),
            freed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HoldState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// On the hashing thread: a copy of `bytes` for the sender, or `None` if the budget has no room (the sender then
    /// reads and re-hashes the chunk). Waits for room only while some held bytes are already asked for: those
    /// leave without anything more from the hashing, so the wait ends; bytes only a `Need` could free (a piece not
    /// answered yet, or a receiver that answers only at `ManifestEnd`) are never waited for.
    pub fn admit(&self, bytes: &[u8]) -> Option<Vec<u8>> {
        let len = bytes.len() as u64;
        let mut state = self.lock();
        while !state.closed && state.held + len > self.budget && state.needed > 0 {
            state = self.freed.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
        if state.closed || state.held + len > self.budget {
            return None;
        }
        state.held += len;
        // A spare buffer large enough, else a new one of exactly this size (a grown one could take twice the room).
        let fits = state.spare.iter().position(|buf| buf.capacity() >= bytes.len());
        let mut buf = match fits {
            Some(at) => {
                let buf = state.spare.swap_remove(at);
                state.spare_bytes -= buf.capacity() as u64;
                buf
            }
            None => Vec::new(),
        };
        drop(state);
        buf.clear();
        buf.reserve_exact(bytes.len());
        buf.extend_from_slice(bytes);
        Some(buf)
    }

    /// The receiver asked for a held chunk of `len` bytes.
    pub fn needed(&self, len: u64) {
        self.lock().needed += len;
    }

    /// A held chunk left: sent (`was_needed`) or dropped. Its room is free again, and its buffer kept for the next copy.
    pub fn release(&self, buf: Vec<u8>, was_needed: bool) {
        let len = buf.len() as u64;
        let mut state = self.lock();
        state.held = state.held.saturating_sub(len);
        if was_needed {
            state.needed = state.needed.saturating_sub(len);
        }
        let capacity = buf.capacity() as u64;
        // Held and spare bytes together stay within the budget (the smallest spare goes first).
        while state.held + state.spare_bytes + capacity > self.budget && !state.spare.is_empty() {
            let smallest = (0..state.spare.len())
                .min_by_key(|&i| state.spare[i].capacity())
                .unwrap_or(0);
            let gone = state.spare.swap_remove(smallest);
            state.spare_bytes -= gone.capacity() as u64;
        }
        if state.held + state.spare_bytes + capacity <= self.budget {
            state.spare_bytes += capacity;
            state.spare.push(buf);
        }
        drop(state);
        self.freed.notify_all();
    }

    /// The sender is gone: wakes a waiting hashing thread; nothing is held from now on.
    pub fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.spare.clear();
        state.spare_bytes = 0;
        drop(state);
        self.freed.notify_all();
    }

    /// Bytes held now.
    #[cfg(test)]
    pub fn held(&self) -> u64 {
        self.lock().held
    }
}

/// Closes a [`Hold`] when the sender's side of a streamed offer ends, however it ends.
pub struct CloseOnDrop(pub std::sync::Arc<Hold>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn admits_within_the_budget_and_never_waits_for_unanswered_bytes() {
        let hold = Hold::new(10);
        let a = hold.admit(&[1; 6]).expect("room");
        assert_eq!(a, vec![1; 6]);
        // Full, and nothing held is asked for: not held, and no wait.
        assert!(hold.admit(&[2; 6]).is_none());
        hold.release(a, false);
        assert_eq!(hold.held(), 0);
        let b = hold.admit(&[3; 6]).expect("room again");
        assert_eq!(b, vec![3; 6]);
    }

    #[test]
    fn waits_for_needed_bytes_to_leave_and_closing_wakes_it() {
        let hold = Arc::new(Hold::new(10));
        let a = hold.admit(&[1; 6]).unwrap();
        hold.needed(6);
        let waiting = {
            let hold = hold.clone();
            std::thread::spawn(move || hold.admit(&[2; 6]))
        };
        hold.release(a, true);
        assert_eq!(
            waiting.join().unwrap(),
            Some(vec![2; 6]),
            "admitted once the needed bytes left"
        );
        hold.needed(6);
        let waiting = {
            let hold = hold.clone();
            std::thread::spawn(move || hold.admit(&[3; 6]))
        };
        hold.close();
        assert_eq!(
            waiting.join().unwrap(),
            None,
            "a closed hold wakes the hashing and holds nothing"
        );
    }
}
