//! Receiver state: one record per open transfer, its received-chunk bitmap, and committed files.
//!
//! Keys are the destination path (a namespace prefix comes with authentication). Crash-safety order
//! (proto-spec.md, "Crash safety"): chunk bytes are synced by the caller, then [`ReceiverStore::save_progress`]
//! records them and flushes, and only then may an Ack go out.

use serde::{Deserialize, Serialize};

use super::{get, now_secs, prefixed, Store, StoreError};
use crate::manifest::{FileTime, Hash, Manifest};
use crate::wire::codec::encode_record;

const TRANSFER: &str = "transfer";
const PROGRESS: &str = "progress";
const FILE: &str = "file";

/// An open (uncommitted) transfer.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct TransferRecord {
    /// The manifest being received.
    pub manifest: Manifest,
    /// File name of the partial under the partials directory.
    pub partial: String,
    /// When the transfer was first offered (Unix seconds).
    pub created: u64,
}

/// What of a transfer is durably on disk.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct Progress {
    /// The received-chunk bitmap (`ChunkSet::to_bytes`).
    pub received: Vec<u8>,
    /// Chunk payload bytes taken in over all connections, duplicates included.
    pub received_bytes: u64,
    /// Chunks that failed verification over all connections.
    pub rejected_chunks: u32,
    /// Last update (Unix seconds).
    pub updated: u64,
}

/// A file that was verified and renamed into place.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct CommittedFile {
    /// `Manifest::id` of its content.
    pub manifest_id: Hash,
    /// Size in bytes.
    pub size: u64,
    /// Whole-file BLAKE3.
    pub digest: Hash,
    /// The final file's mtime after commit, to notice later outside changes.
    pub mtime: FileTime,
    /// The final file's inode after commit.
    pub inode: u64,
    /// When it was committed (Unix seconds).
    pub committed_at: u64,
}

/// Typed access to the receiver's records.
#[derive(Clone)]
pub struct ReceiverStore {
    store: Store,
    tree: sled::Tree,
}

impl ReceiverStore {
    /// Opens the receiver's tree in `store`.
    pub fn open(store: &Store) -> Result<ReceiverStore, StoreError> {
        Ok(ReceiverStore {
            store: store.clone(),
            tree: store.tree("receiver")?,
        })
    }

    /// The open transfer to `path`, if any.
    pub fn transfer(&self, path: &str) -> Result<Option<TransferRecord>, StoreError> {
        get(&self.tree, &prefixed(TRANSFER, path.as_bytes()))
    }

    /// The progress of the open transfer to `path`, if any.
    pub fn progress(&self, path: &str) -> Result<Option<Progress>, StoreError> {
        get(&self.tree, &prefixed(PROGRESS, path.as_bytes()))
    }

    /// The committed file at `path`, if any.
    pub fn committed(&self, path: &str) -> Result<Option<CommittedFile>, StoreError> {
        get(&self.tree, &prefixed(FILE, path.as_bytes()))
    }

    /// Records a (re)started transfer and its initial progress atomically, then flushes.
    pub fn begin(&self, path: &str, record: &TransferRecord, progress: &Progress) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        batch.insert(prefixed(TRANSFER, path.as_bytes()), encode_record(record));
        batch.insert(prefixed(PROGRESS, path.as_bytes()), encode_record(progress));
        self.tree.apply_batch(batch)?;
        self.store.flush()
    }

    /// Records progress and flushes; the caller synced the chunk bytes before.
    pub fn save_progress(&self, path: &str, progress: &Progress) -> Result<(), StoreError> {
        let mut progress = progress.clone();
        progress.updated = now_secs();
        self.tree
            .insert(prefixed(PROGRESS, path.as_bytes()), encode_record(&progress))?;
        self.store.flush()
    }

    /// Replaces the open transfer with its committed-file record atomically, then flushes.
    pub fn commit(&self, path: &str, file: &CommittedFile) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        batch.remove(prefixed(TRANSFER, path.as_bytes()));
        batch.remove(prefixed(PROGRESS, path.as_bytes()));
        batch.insert(prefixed(FILE, path.as_bytes()), encode_record(file));
        self.tree.apply_batch(batch)?;
        self.store.flush()
    }
}
