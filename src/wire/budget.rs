//! A server-wide budget for frame bodies being buffered (proto-spec.md §1 and §10, "frame memory budget").
//!
//! A connection that learns from a length prefix that a frame larger than [`SMALL_FRAME`] is coming takes that
//! many bytes from the budget before it buffers a single body byte, and gives them back once the frame is decoded
//! (or the connection ends). So the bytes all connections together hold in partial frames never exceed the
//! budget, however many connections send big frames and then stall. When the budget is spent, a newcomer waits;
//! if it must, the oldest holder (a frame that has been arriving for at least [`EVICT_AFTER`]) is evicted: its
//! connection ends with `Overloaded`. A frame arriving at full speed finishes long before it becomes the oldest,
//! so eviction falls on trickled frames, and a trickler cannot keep honest clients waiting.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Frames with bodies up to this size are not counted (every handshake frame is one, see
/// [`crate::HANDSHAKE_MAX_FRAME`]); a connection's own read buffer holds them.
pub const SMALL_FRAME: usize = crate::HANDSHAKE_MAX_FRAME as usize;

/// A holder younger than this is never evicted.
pub const EVICT_AFTER: Duration = Duration::from_secs(1);

/// Bytes of partial frames all connections may buffer together.
#[derive(Debug)]
pub struct FrameBudget {
    capacity: u64,
    state: Mutex<State>,
    released: Notify,
}

#[derive(Debug, Default)]
struct State {
    used: u64,
    next_id: u64,
    /// By id, which grows with time: the first entry is the oldest holder.
    holders: BTreeMap<u64, Holder>,
}

#[derive(Debug)]
struct Holder {
    bytes: u64,
    since: Instant,
    evict: CancellationToken,
}

/// Bytes taken from a [`FrameBudget`]; given back on drop.
#[derive(Debug)]
pub struct FrameGrant {
    budget: Arc<FrameBudget>,
    id: u64,
    evicted: CancellationToken,
}

impl FrameGrant {
    /// Fires when a newcomer needed these bytes and this frame was the oldest holder.
    pub fn evicted(&self) -> &CancellationToken {
        &self.evicted
    }
}

impl Drop for FrameGrant {
    fn drop(&mut self) {
        let mut state = self.budget.lock();
        if let Some(holder) = state.holders.remove(&self.id) {
            state.used -= holder.bytes;
        }
        drop(state);
        self.budget.released.notify_waiters();
    }
}

impl FrameBudget {
    /// A budget of `capacity` bytes.
    pub fn new(capacity: u64) -> Arc<FrameBudget> {
        Arc::new(FrameBudget {
            capacity,
            state: Mutex::default(),
            released: Notify::new(),
        })
    }

    /// Bytes currently held by partial frames and decoded messages not yet dealt with (tests read it).
    #[cfg(test)]
    pub fn in_use(&self) -> u64 {
        self.lock().used
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes `bytes` (at most the capacity), waiting up to `wait` for holders to finish or, past
    /// [`EVICT_AFTER`], to be evicted oldest first. `None`: the budget stayed spent. Cancel-safe.
    pub async fn acquire(self: &Arc<Self>, bytes: u64, wait: Duration) -> Option<FrameGrant> {
        let bytes = bytes.min(self.capacity);
        let deadline = Instant::now() + wait;
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            let retry_eviction_at = {
                let mut state = self.lock();
                if state.used + bytes <= self.capacity {
                    return Some(self.grant(&mut state, bytes));
                }
                evict_oldest(&mut state, bytes, self.capacity)
            };
            let wake = retry_eviction_at.map_or(deadline, |at| at.min(deadline));
            tokio::select! {
                () = &mut released => {}
                () = tokio::time::sleep_until(wake) => {
                    if Instant::now() >= deadline {
                        return None;
                    }
                }
            }
        }
    }

    fn grant(self: &Arc<Self>, state: &mut State, bytes: u64) -> FrameGrant {
        let id = state.next_id;
        state.next_id += 1;
        state.used += bytes;
        let evict = CancellationToken::new();
        state.holders.insert(
            id,
            Holder {
                bytes,
                since: Instant::now(),
                evict: evict.clone(),
            },
        );
        FrameGrant {
            budget: self.clone(),
            id,
            evicted: evict,
        }
    }
}

/// Evicts the oldest holders (of at least [`EVICT_AFTER`]) until `bytes` would fit once they let go. Returns when
/// the next holder becomes old enough to evict, if more room is still needed.
fn evict_oldest(state: &mut State, bytes: u64, capacity: u64) -> Option<Instant> {
    let mut freeing = state
        .holders
        .values()
        .filter(|h| h.evict.is_cancelled())
        .map(|h| h.bytes)
        .sum::<u64>();
    for holder in state.holders.values() {
        if state.used - freeing + bytes <= capacity {
            return None;
        }
        if holder.evict.is_cancelled() {
            continue;
        }
        if holder.since.elapsed() < EVICT_AFTER {
            return Some(holder.since + EVICT_AFTER);
        }
        holder.evict.cancel();
        freeing += holder.bytes;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn holders_are_bounded_and_the_oldest_is_evicted_for_a_newcomer() {
        let budget = FrameBudget::new(100);
        let a = budget.acquire(60, Duration::ZERO).await.unwrap();
        let b = budget.acquire(40, Duration::ZERO).await.unwrap();
        assert_eq!(budget.in_use(), 100);
        assert!(
            budget.acquire(10, Duration::from_millis(500)).await.is_none(),
            "young holders are not evicted, and the budget is never exceeded"
        );
        assert!(!a.evicted().is_cancelled());
        // Past EVICT_AFTER the oldest holder (a) is told to go; its bytes return when it drops the grant.
        let waiter = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.acquire(50, Duration::from_secs(10)).await })
        };
        a.evicted().cancelled().await;
        assert!(!b.evicted().is_cancelled(), "one eviction frees enough");
        assert_eq!(budget.in_use(), 100);
        drop(a);
        let c = waiter.await.unwrap().expect("granted once a let go");
        assert_eq!(budget.in_use(), 90);
        drop((b, c));
        assert_eq!(budget.in_use(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_larger_than_the_budget_is_clamped() {
        let budget = FrameBudget::new(10);
        let whole = budget.acquire(1000, Duration::ZERO).await.unwrap();
        assert_eq!(budget.in_use(), 10);
        drop(whole);
        assert_eq!(budget.in_use(), 0);
    }
}
