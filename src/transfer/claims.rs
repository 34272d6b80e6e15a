//! One connection per destination at a time, with takeover by the same sender only.
//!
//! A receiver claims a destination before touching its partial file, naming what it will write there (the
//! manifest's id). A new claim with the same owner for a held destination cancels the holder (its session drains its
//! writer, persists what it has, and ends with `Superseded`) and waits for it to let go: a client whose link died
//! without a FIN can reconnect at once instead of waiting for the old session's idle timeout. A claim with another
//! owner (another client, or a changed source) waits for the holder to finish instead of taking over, so two
//! clients pushing different files to one destination take turns rather than destroying each other's progress.
//! Two writers never share a partial file.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::OwnedMutexGuard;
use tokio_util::sync::CancellationToken;

use super::TransferError;
use crate::manifest::Hash;
use crate::wire::ErrorCode;

struct Slot {
    lock: Arc<tokio::sync::Mutex<()>>,
    holder: CancellationToken,
    /// What the holder (or, once it lets go, the newest claimant) writes: its manifest id, and its file identity
    /// ([`file_identity`]), which a streamed offer claims with before its manifest id is known.
    owner: (Hash, Hash),
    /// The owner of the newest claim made.
    newest: (Hash, Hash),
}

impl Slot {
    fn new(owner: (Hash, Hash)) -> Self {
        Slot {
            lock: Arc::default(),
            holder: CancellationToken::new(),
            owner,
            newest: owner,
        }
    }
}

/// Whether a claim by `new` is the same content as `held`: the same manifest id, or the same file identity.
fn same(new: (Hash, Hash), held: (Hash, Hash)) -> bool {
    new.0 == held.0 || new.1 == held.1
}

/// The identity of an offered file before its manifest id is known (proto-spec.md §4, "Streamed offer",
/// Takeover): BLAKE3 of `"ferry streamed offer v1"`, size (u64), mtime seconds (i64) and nanoseconds (u32), little
/// endian. A streamed offer claims its path with it as both ids; a whole offer with its manifest id and this.
pub fn file_identity(size: u64, mtime: crate::manifest::FileTime) -> Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"ferry streamed offer v1");
    hasher.update(&size.to_le_bytes());
    hasher.update(&mtime.secs.to_le_bytes());
    hasher.update(&mtime.nanos.to_le_bytes());
    *hasher.finalize().as_bytes()
}

/// The set of claimed destinations of one server.
#[derive(Clone, Default)]
pub struct Claims {
    slots: Arc<Mutex<HashMap<String, Slot>>>,
}

/// Exclusive use of one destination; released on drop.
pub struct Claim {
    claims: Claims,
    key: String,
    /// Cancelled when a newer connection wants this destination.
    pub superseded: CancellationToken,
    _guard: OwnedMutexGuard<()>,
}

impl Claims {
    /// Claims `key` for `owner`, taking it over from a holder with the same owner; a holder with another owner is
    /// left to finish. Fails with `Busy` if the holder does not let go within `wait`.
    pub async fn claim(&self, key: &str, owner: Hash, wait: Duration) -> Result<Claim, TransferError> {
        self.claim_as(key, (owner, owner), wait).await
    }

    /// [`Claims::claim`] by a manifest id and a [`file_identity`] (`owner`): a holder with either takes over.
    pub async fn claim_as(&self, key: &str, owner: (Hash, Hash), wait: Duration) -> Result<Claim, TransferError> {
        let lock = {
            let mut slots = self.slots.lock().expect("claims lock poisoned");
            let slot = slots.entry(key.to_string()).or_insert_with(|| Slot::new(owner));
            if same(owner, slot.owner) {
                slot.holder.cancel();
            }
            slot.newest = owner;
            slot.lock.clone()
        };
        let guard = tokio::time::timeout(wait, lock.lock_owned()).await.map_err(|_| {
            TransferError::refused(ErrorCode::Busy, format!("{key} is being written by another connection"))
        })?;
        let superseded = CancellationToken::new();
        let mut slots = self.slots.lock().expect("claims lock poisoned");
        let slot = slots.entry(key.to_string()).or_insert_with(|| Slot {
            lock: OwnedMutexGuard::mutex(&guard).clone(),
            ..Slot::new(owner)
        });
        // More owners of the lock than the map and our guard: a newer claim is already waiting. If it is for the
        // same content it cancelled the previous holder's token, not ours: give way to it at once instead of making
        // it wait for Busy.
        if Arc::strong_count(&slot.lock) > 2 && same(slot.newest, owner) {
            superseded.cancel();
        }
        slot.holder = superseded.clone();
        slot.owner = owner;
        drop(slots);
        Ok(Claim {
            claims: self.clone(),
            key: key.to_string(),
            superseded,
            _guard: guard,
        })
    }

    /// Claims `key` only if nobody holds or waits for it, without disturbing anyone (used by expiry, which must
    /// never take a transfer away from a live session).
    pub fn try_claim(&self, key: &str) -> Option<Claim> {
        let mut slots = self.slots.lock().expect("claims lock poisoned");
        let slot = slots
            .entry(key.to_string())
            .or_insert_with(|| Slot::new(([0; 32], [0; 32])));
        let Ok(guard) = slot.lock.clone().try_lock_owned() else {
            return None;
        };
        let superseded = CancellationToken::new();
        slot.holder = superseded.clone();
        drop(slots);
        Some(Claim {
            claims: self.clone(),
            key: key.to_string(),
            superseded,
            _guard: guard,
        })
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut slots = self.claims.slots.lock().expect("claims lock poisoned");
        // Two owners of the lock (the map and our guard) means nobody is waiting: forget the slot.
        if slots
            .get(&self.key)
            .is_some_and(|slot| Arc::strong_count(&slot.lock) == 2)
        {
            slots.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAME: Hash = [1; 32];
    const OTHER: Hash = [2; 32];

    #[tokio::test]
    async fn a_claim_for_other_content_waits_instead_of_taking_over() {
        let claims = Claims::default();
        let first = claims.claim("a", SAME, Duration::from_secs(1)).await.unwrap();
        let err = claims.claim("a", OTHER, Duration::from_millis(50)).await.err().unwrap();
        assert_eq!(err.code(), ErrorCode::Busy);
        assert!(!first.superseded.is_cancelled(), "the holder keeps going");
        let waiter = {
            let claims = claims.clone();
            tokio::spawn(async move { claims.claim("a", OTHER, Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!first.superseded.is_cancelled());
        drop(first); // the holder finishes
        let second = waiter.await.unwrap().unwrap();
        assert!(!second.superseded.is_cancelled());
    }

    #[tokio::test]
    async fn a_new_claim_supersedes_the_holder() {
        let claims = Claims::default();
        let first = claims.claim("a", SAME, Duration::from_secs(1)).await.unwrap();
        let token = first.superseded.clone();
        let releaser = tokio::spawn(async move {
            token.cancelled().await;
            drop(first);
        });
        let second = claims.claim("a", SAME, Duration::from_secs(5)).await.unwrap();
        releaser.await.unwrap();
        assert!(!second.superseded.is_cancelled());
        drop(second);
        assert!(claims.slots.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_newest_of_several_waiting_claims_wins() {
        let claims = Claims::default();
        let first = claims.claim("a", SAME, Duration::from_secs(1)).await.unwrap();
        let (c1, c2) = (claims.clone(), claims.clone());
        let second = tokio::spawn(async move { c1.claim("a", SAME, Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let third = tokio::spawn(async move { c2.claim("a", SAME, Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(first.superseded.is_cancelled());
        drop(first);
        let second = second.await.unwrap().unwrap();
        assert!(second.superseded.is_cancelled(), "a newer claim was waiting");
        drop(second);
        let third = third.await.unwrap().unwrap();
        assert!(!third.superseded.is_cancelled());
    }

    #[tokio::test]
    async fn try_claim_never_takes_a_held_destination() {
        let claims = Claims::default();
        let held = claims.claim("a", SAME, Duration::from_secs(1)).await.unwrap();
        assert!(claims.try_claim("a").is_none());
        assert!(!held.superseded.is_cancelled(), "the holder was not disturbed");
        drop(held);
        let expiring = claims.try_claim("a").expect("free now");
        drop(expiring);
        assert!(claims.slots.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_holder_that_does_not_let_go_makes_the_claim_busy() {
        let claims = Claims::default();
        let _first = claims.claim("a", SAME, Duration::from_secs(1)).await.unwrap();
        let err = claims.claim("a", SAME, Duration::from_millis(50)).await.err().unwrap();
        assert_eq!(err.code(), ErrorCode::Busy);
    }
}
