//! Durable state in sled, behind a narrow API so another embedded store could replace it.
//!
//! [`Store`] opens the database; [`ReceiverStore`] holds transfer records, received-chunk bitmaps and committed
//! file records; [`SenderStore`] holds the manifest cache and push records. Every write that a later step relies
//! on (a chunk mark before its Ack, a commit record) is flushed before the call returns. sled is synchronous: call
//! these from blocking threads. [`StateLock`] keeps a client state directory to one run at a time.

mod lock;
mod receiver;
mod sender;

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use thiserror::Error;

pub use lock::{LockError, StateLock, LOCK_FILE};
pub use receiver::{
    ChunkLocation, CommittedFile, OpenTransfer, PartialTransfer, Progress, ReceiverStore, TransferRecord,
    TransferRecordRef, TransferSummary, Usage,
};
pub use sender::{ManifestKey, Pruned, PushRecord, PushState, SenderStore};

/// The store failed.
#[derive(Debug, Error)]
pub enum StoreError {
    /// Another process has the store open.
    #[error("state store {0} is in use by another ferry process")]
    Locked(String),
    /// sled failed.
    #[error("state store: {0}")]
    Sled(#[from] sled::Error),
    /// A record could not be decoded (written by an incompatible version, or damaged).
    #[error("state store record {key}: {reason}")]
    Corrupt {
        /// The record's key.
        key: String,
        /// What went wrong.
        reason: String,
    },
}

/// An open sled database.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Sled(e.into()))?;
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(16 * 1024 * 1024)
            // No background flushes: what must be durable is flushed explicitly, in the order proto-spec.md gives.
            .flush_every_ms(None)
            .open()
            .map_err(|e| match e {
                // sled reports a held lock as an I/O error whose text names it.
                sled::Error::Io(ref io) if io.to_string().contains("could not acquire lock") => {
                    StoreError::Locked(dir.display().to_string())
                }
                other => StoreError::Sled(other),
            })?;
        Ok(Store { db })
    }

    /// Flushes everything to disk.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree(name)?)
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `prefix` + NUL + `key`: one tree holds several record kinds without collisions.
fn prefixed(prefix: &str, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(prefix.len() + 1 + key.len());
    out.extend_from_slice(prefix.as_bytes());
    out.push(0);
    out.extend_from_slice(key);
    out
}

fn decode<T: serde::de::DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    crate::wire::codec::decode_record(bytes).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

fn get<T: serde::de::DeserializeOwned>(tree: &sled::Tree, key: &[u8]) -> Result<Option<T>, StoreError> {
    tree.get(key)?.map(|bytes| decode(key, &bytes)).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_in_use_is_reported_as_locked() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        let second = Store::open(dir.path());
        assert!(matches!(second, Err(StoreError::Locked(_))), "{:?}", second.err());
    }
}
