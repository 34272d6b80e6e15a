//! Durable state in sled, behind a narrow API so another embedded store could replace it.
//!
//! [`Store`] opens the database; [`ReceiverStore`] holds transfer records, received-chunk bitmaps and committed
//! file records; [`SenderStore`] holds the manifest cache and push records. Every write that a later step relies
//! on (a chunk mark before its Ack, a commit record) is flushed before the call returns. sled is synchronous: call
//! these from blocking threads. [`StateLock`] keeps a client state directory to one run at a time.
//!
//! sled stays inside this module: callers see [`StoreError`] (its backend error opaque) and [`RecordBatch`], never a
//! sled type. A store sled cannot read (it may refuse to open with a Corruption error after an abrupt kill) is moved
//! aside and replaced by a fresh one ([`Store::open`]): it holds resume records and caches, never file data.

mod lock;
mod receiver;
mod sender;

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use thiserror::Error;

pub use lock::{LockError, StateLock, LOCK_FILE};
pub use receiver::{
    ChunkLocation, CommittedFile, FileStamp, OpenTransfer, PartialTransfer, PrefixRecord, Progress, ReceiverStore,
    TransferRecord, TransferRecordRef, TransferSummary, Usage,
};
pub use sender::{HashingRecord, ManifestKey, Pruned, PushRecord, PushState, SenderStore, SMALL_FILE_MAX};

/// The store failed.
#[derive(Debug, Error)]
pub enum StoreError {
    /// Another process has the store open.
    #[error("state store {0} is in use by another ferry process")]
    Locked(String),
    /// The embedded database failed.
    #[error("state store: {0}")]
    Backend(BackendError),
    /// A record could not be decoded (written by an incompatible version, or damaged).
    #[error("state store record {key}: {reason}")]
    Corrupt {
        /// The record's key.
        key: String,
        /// What went wrong.
        reason: String,
    },
    /// The store was unreadable and could not be moved aside.
    #[error(
        "state store {dir} is unreadable ({reason}) and could not be moved aside ({source}); it holds resume \
         records and caches only, never file data: move it away (mv {dir} {dir}.corrupt) and run again"
    )]
    Unrecoverable {
        /// The store's directory.
        dir: String,
        /// Why it could not be opened.
        reason: String,
        /// Why it could not be moved.
        source: std::io::Error,
    },
}

/// An error of the embedded database, opaque outside this module so that another store could replace it.
#[derive(Debug)]
pub struct BackendError(sled::Error);

impl std::fmt::Display for BackendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BackendError {}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Backend(BackendError(e))
    }
}

/// Writes to apply together, atomically ([`ReceiverStore::apply`]); what they are is up to the typed stores.
#[derive(Default)]
pub struct RecordBatch {
    batch: sled::Batch,
    writes: usize,
}

impl RecordBatch {
    fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.batch.insert(key, value);
        self.writes += 1;
    }

    fn remove(&mut self, key: Vec<u8>) {
        self.batch.remove(key);
        self.writes += 1;
    }

    /// How many writes (inserts and removes) were added; each costs sled a lookup of its key when applied.
    pub fn len(&self) -> usize {
        self.writes
    }

    /// Whether no write was added.
    pub fn is_empty(&self) -> bool {
        self.writes == 0
    }
}

/// What a state store holds, for the operator reading a recovery warning.
const HOLDS: &str = "resume records and caches only (open transfers and their received-chunk bitmaps, \
                     committed-file records, cached manifests, push records), never file data";

/// An open sled database.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
}

/// Why sled did not open.
enum OpenFailure {
    /// Unreadable content (the reason): recover by moving it aside.
    Unreadable(String),
    /// Anything else.
    Other(StoreError),
}

impl Store {
    /// Opens (or creates) the store in `dir`. A store that exists but cannot be read (sled reports corruption,
    /// as it may after an abrupt kill, or panics on it) is moved aside to `<dir>.corrupt-<unix seconds>` (the lock
    /// file stays, so a run holding it keeps it) and a fresh one is started; a warning names both directories.
    /// Nothing is lost that matters: the store holds resume records and caches, never file data, and every
    /// resumed chunk is verified again.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        match open_db(dir) {
            Ok(db) => Ok(Store { db }),
            Err(OpenFailure::Other(e)) => Err(e),
            Err(OpenFailure::Unreadable(reason)) => {
                let unrecoverable = |source| StoreError::Unrecoverable {
                    dir: dir.display().to_string(),
                    reason: reason.clone(),
                    source,
                };
                let aside = move_aside(dir).map_err(unrecoverable)?;
                tracing::warn!(
                    "state store {} was unreadable ({reason}); it holds {HOLDS}. Moved it to {} and started a fresh \
                     one: committed files stay where they are, interrupted transfers start over (every chunk is \
                     verified again) and caches are rebuilt. Delete {} once you no longer want to inspect it.",
                    dir.display(),
                    aside.display(),
                    aside.display()
                );
                match open_db(dir) {
                    Ok(db) => Ok(Store { db }),
                    Err(OpenFailure::Other(e)) => Err(e),
                    Err(OpenFailure::Unreadable(again)) => Err(unrecoverable(std::io::Error::other(format!(
                        "a fresh store is unreadable too: {again}"
                    )))),
                }
            }
        }
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

/// Opens sled in `dir`, telling unreadable content from a held lock and other failures.
fn open_db(dir: &Path) -> Result<sled::Db, OpenFailure> {
    std::fs::create_dir_all(dir).map_err(|e| OpenFailure::Other(sled::Error::from(e).into()))?;
    let config = sled::Config::new()
        .path(dir)
        .cache_capacity(16 * 1024 * 1024)
        // No background flushes: what must be durable is flushed explicitly, in the order proto-spec.md gives.
        .flush_every_ms(None);
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open()));
    match opened {
        Ok(Ok(db)) => Ok(db),
        // sled reports a held lock as an I/O error whose text names it.
        Ok(Err(sled::Error::Io(ref io))) if io.to_string().contains("could not acquire lock") => {
            Err(OpenFailure::Other(StoreError::Locked(dir.display().to_string())))
        }
        Ok(Err(e)) if is_unreadable(&e) => Err(OpenFailure::Unreadable(e.to_string())),
        Ok(Err(e)) => Err(OpenFailure::Other(e.into())),
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("a panic");
            Err(OpenFailure::Unreadable(format!(
                "the database panicked while opening: {what}"
            )))
        }
    }
}

/// Whether sled's error means the files are damaged (as opposed to, say, a permission problem).
fn is_unreadable(e: &sled::Error) -> bool {
    match e {
        sled::Error::Corruption { .. } | sled::Error::ReportableBug(_) => true,
        sled::Error::Io(io) => matches!(
            io.kind(),
            std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
        ),
        _ => false,
    }
}

/// Moves everything in `dir` but the lock file into a new sibling `<dir>.corrupt-<unix seconds>[-N]`; returns it.
fn move_aside(dir: &Path) -> std::io::Result<std::path::PathBuf> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "state".into());
    let stamp = now_secs();
    let mut aside = dir.with_file_name(format!("{name}.corrupt-{stamp}"));
    let mut n = 1;
    loop {
        match std::fs::create_dir(&aside) {
            Ok(()) => break,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 100 => {
                aside = dir.with_file_name(format!("{name}.corrupt-{stamp}-{n}"));
                n += 1;
            }
            Err(e) => return Err(e),
        }
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name() == LOCK_FILE {
            continue;
        }
        std::fs::rename(entry.path(), aside.join(entry.file_name()))?;
    }
    Ok(aside)
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
    crate::record::decode_record(bytes).map_err(|e| StoreError::Corrupt {
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

    /// A store sled refuses to open (its `conf` overwritten, which sled 0.34 reports as `Corruption`) is moved
    /// aside, lock file excepted, and a fresh one opens in its place.
    #[test]
    fn an_unreadable_store_is_moved_aside_and_replaced() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("state");
        {
            let store = Store::open(&dir).unwrap();
            store.tree("t").unwrap().insert(b"k", b"v".to_vec()).unwrap();
            store.flush().unwrap();
        }
        std::fs::write(dir.join(LOCK_FILE), b"pid 1: ferry").unwrap();
        std::fs::write(dir.join("conf"), b"garbage, not a sled config").unwrap();
        assert!(
            matches!(open_db(&dir), Err(OpenFailure::Unreadable(_))),
            "the damage makes sled refuse the store"
        );
        let store = Store::open(&dir).unwrap();
        assert_eq!(store.tree("t").unwrap().get(b"k").unwrap(), None, "a fresh store");
        let aside: Vec<_> = std::fs::read_dir(parent.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("state.corrupt-"))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        let aside = parent.path().join(&aside[0]);
        assert_eq!(
            std::fs::read(aside.join("conf")).unwrap(),
            b"garbage, not a sled config"
        );
        assert!(
            !aside.join(LOCK_FILE).exists(),
            "the lock file stays with the live store"
        );
        assert!(dir.join(LOCK_FILE).exists());
    }

    #[test]
    fn a_store_in_use_is_reported_as_locked() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        let second = Store::open(dir.path());
        assert!(matches!(second, Err(StoreError::Locked(_))), "{:?}", second.err());
    }
}
