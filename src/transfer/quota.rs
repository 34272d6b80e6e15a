//! Namespace quotas: the bytes a receiver root may hold, committed files and open transfers together.
//!
//! Checked when a file is offered, against the records in the store: a file that replaces a committed one (or
//! resumes an open transfer) at the same path is counted once. Sessions of one namespace running at the same time
//! are each checked against what is recorded, so together they can overshoot by what they have in flight.

use super::TransferError;
use crate::store::ReceiverStore;
use crate::wire::ErrorCode;

/// What a namespace may still take, tracked across the files of one offer (a tree).
pub(crate) struct Budget {
    quota: u64,
    held: u64,
}

impl Budget {
    /// Reads what the namespace holds now. Blocking.
    pub fn open(store: &ReceiverStore, quota: u64) -> Result<Budget, TransferError> {
        Ok(Budget {
            quota,
            held: store.held_bytes()?,
        })
    }

    /// Takes `size` bytes for the file at `path`, or refuses with `QuotaExceeded` (nothing taken). Blocking.
    pub fn take(&mut self, store: &ReceiverStore, path: &str, size: u64) -> Result<(), TransferError> {
        let replaced = store.committed(path)?.map_or(0, |f| f.size);
        let resumed = store.transfer(path)?.map_or(0, |t| t.manifest.size);
        let after = self
            .held
            .saturating_sub(replaced.saturating_add(resumed))
            .saturating_add(size);
        if after > self.quota {
            return Err(TransferError::refused(
                ErrorCode::QuotaExceeded,
                format!(
                    "{path} ({size} bytes) would bring this namespace to {after} bytes, over its quota of {} bytes",
                    self.quota
                ),
            ));
        }
        self.held = after;
        Ok(())
    }
}

/// Whether one file of `size` bytes at `path` fits the quota. Blocking.
pub(crate) fn check(store: &ReceiverStore, quota: u64, path: &str, size: u64) -> Result<(), TransferError> {
    Budget::open(store, quota)?.take(store, path, size)
}
