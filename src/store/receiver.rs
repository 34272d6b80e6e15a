//! Receiver state: one record per open transfer, its received-chunk bitmap, committed files with their manifests,
//! and the chunk index (hash → file, offset, length) through which any stored chunk can be reused.
//!
//! Keys are `kind NUL scope NUL path`: a server uses the empty scope (a namespace comes with authentication), a
//! pulling client the canonical local root, so pulls into different directories never share records. Crash-safety order
//! (proto-spec.md, "Crash safety"): chunk bytes are synced by the caller, then [`ReceiverStore::save_progress`]
//! records them and flushes, and only then may an Ack go out.

use serde::{Deserialize, Serialize};

use super::{get, now_secs, prefixed, RecordBatch, Store, StoreError};
use crate::manifest::{FileTime, Hash, Manifest};
use crate::ranges::ChunkSet;
use crate::wire::codec::encode_record;

const TRANSFER: &str = "transfer";
const PROGRESS: &str = "progress";
const FILE: &str = "file";
const FILE_MANIFEST: &str = "fmanifest";
const CHUNK: &str = "chunk";
const TREE_SOURCE: &str = "treesrc";

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
    /// Bytes of chunks received over the wire and made durable, over all connections, each chunk once per time it
    /// was marked (duplicates and rejected chunks excluded).
    pub received_bytes: u64,
    /// Chunks that failed verification over all connections.
    pub rejected_chunks: u32,
    /// Chunk bytes copied from files the receiver already held instead of being sent.
    pub reused_bytes: u64,
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

/// An open transfer, as listed for expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenTransfer {
    /// Destination path.
    pub path: String,
    /// Its partial file.
    pub partial: String,
    /// When it was created or last made progress (Unix seconds).
    pub last_activity: u64,
}

/// An open transfer with what of it is durable, as listed by `ferry status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartialTransfer {
    /// Destination path, relative to the scope's root.
    pub path: String,
    /// Size of the file being received.
    pub size: u64,
    /// Bytes of the chunks marked durable in the partial (received or reused).
    pub durable_bytes: u64,
    /// When the transfer was first offered (Unix seconds).
    pub created: u64,
    /// When it last made progress (Unix seconds; at least `created`).
    pub updated: u64,
}

/// Where a committed chunk lives: the chunk index's answer for a hash.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ChunkLocation {
    /// The committed file (a path relative to the root).
    pub path: String,
    /// Byte offset in that file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
}

/// Typed access to the receiver's records of one scope.
#[derive(Clone)]
pub struct ReceiverStore {
    store: Store,
    tree: sled::Tree,
    scope: Vec<u8>,
}

impl ReceiverStore {
    /// Opens the receiver's records of the empty scope (a server's root).
    pub fn open(store: &Store) -> Result<ReceiverStore, StoreError> {
        Self::open_scoped(store, "")
    }

    /// Opens the receiver's records of `scope` (no NUL inside).
    pub fn open_scoped(store: &Store, scope: &str) -> Result<ReceiverStore, StoreError> {
        Ok(ReceiverStore {
            store: store.clone(),
            tree: store.tree("receiver")?,
            scope: scope.as_bytes().to_vec(),
        })
    }

    fn key(&self, kind: &str, path: &[u8]) -> Vec<u8> {
        let mut scoped = self.scope.clone();
        scoped.push(0);
        scoped.extend_from_slice(path);
        prefixed(kind, &scoped)
    }

    fn chunk_key(&self, hash: &Hash, path: &str) -> Vec<u8> {
        let mut key = self.key(CHUNK, hash);
        key.extend_from_slice(path.as_bytes());
        key
    }

    /// Up to `limit` committed places holding a chunk with this hash.
    pub fn chunk_locations(&self, hash: &Hash, limit: usize) -> Result<Vec<ChunkLocation>, StoreError> {
        let prefix = self.key(CHUNK, hash);
        let mut found = Vec::new();
        for entry in self.tree.scan_prefix(&prefix).take(limit) {
            let (key, value) = entry?;
            let (offset, len): (u64, u32) = super::decode(&key, &value)?;
            let path = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            found.push(ChunkLocation { path, offset, len });
        }
        Ok(found)
    }

    /// Forgets that `path` holds a chunk with this hash (it turned out to hold other bytes).
    pub fn forget_chunk(&self, hash: &Hash, path: &str) -> Result<(), StoreError> {
        self.tree.remove(self.chunk_key(hash, path))?;
        Ok(())
    }

    /// Every open transfer of this scope with the time it last made progress (Unix seconds).
    pub fn open_transfers(&self) -> Result<Vec<OpenTransfer>, StoreError> {
        let prefix = self.key(TRANSFER, b"");
        let mut open = Vec::new();
        for entry in self.tree.scan_prefix(&prefix) {
            let (key, value) = entry?;
            let record: TransferRecord = super::decode(&key, &value)?;
            let path = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            let updated = self.progress(&path)?.map_or(0, |p| p.updated);
            open.push(OpenTransfer {
                last_activity: updated.max(record.created),
                partial: record.partial,
                path,
            });
        }
        Ok(open)
    }

    /// The first `limit` open transfers of this scope in path order, with the number of all of them.
    pub fn partials(&self, limit: usize) -> Result<(Vec<PartialTransfer>, u64), StoreError> {
        let prefix = self.key(TRANSFER, b"");
        let (mut listed, mut total) = (Vec::new(), 0u64);
        for entry in self.tree.scan_prefix(&prefix) {
            let (key, value) = entry?;
            total += 1;
            if listed.len() >= limit {
                continue;
            }
            let record: TransferRecord = super::decode(&key, &value)?;
            let path = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            let progress = self.progress(&path)?.unwrap_or_default();
            listed.push(PartialTransfer {
                durable_bytes: durable_bytes(&record.manifest, &progress.received),
                size: record.manifest.size,
                created: record.created,
                updated: progress.updated.max(record.created),
                path,
            });
        }
        Ok((listed, total))
    }

    /// Bytes this scope holds: the sizes of its committed files plus those of the files it is receiving. What a
    /// namespace quota limits.
    pub fn held_bytes(&self) -> Result<u64, StoreError> {
        let mut held = 0u64;
        let committed = self.key(FILE, b"");
        for entry in self.tree.scan_prefix(&committed) {
            let (key, value) = entry?;
            let file: CommittedFile = super::decode(&key, &value)?;
            held = held.saturating_add(file.size);
        }
        let open = self.key(TRANSFER, b"");
        for entry in self.tree.scan_prefix(&open) {
            let (key, value) = entry?;
            let record: TransferRecord = super::decode(&key, &value)?;
            held = held.saturating_add(record.manifest.size);
        }
        Ok(held)
    }

    /// Every scope with an open transfer (for a gc of a stopped server, which does not know its namespaces).
    pub fn scopes_with_transfers(store: &Store) -> Result<Vec<String>, StoreError> {
        let tree = store.tree("receiver")?;
        let prefix = prefixed(TRANSFER, b"");
        let mut scopes = Vec::new();
        for entry in tree.scan_prefix(&prefix) {
            let (key, _) = entry?;
            let rest = &key[prefix.len()..];
            let scope = rest.split(|&b| b == 0).next().unwrap_or_default();
            let scope = String::from_utf8_lossy(scope).into_owned();
            if scopes.last() != Some(&scope) {
                scopes.push(scope);
            }
        }
        Ok(scopes)
    }

    /// Forgets an open transfer (the caller removes its partial file), then flushes.
    pub fn forget_transfer(&self, path: &str) -> Result<(), StoreError> {
        let mut batch = RecordBatch::default();
        batch.remove(self.key(TRANSFER, path.as_bytes()));
        batch.remove(self.key(PROGRESS, path.as_bytes()));
        self.apply(batch)
    }

    /// The source of the tree a pulling client placed in this scope's root (proto-spec.md §11), if any.
    pub fn tree_source(&self) -> Result<Option<String>, StoreError> {
        get(&self.tree, &self.key(TREE_SOURCE, b""))
    }

    /// Records that this scope's root holds the tree pulled from `source`, then flushes.
    pub fn set_tree_source(&self, source: &str) -> Result<(), StoreError> {
        self.tree
            .insert(self.key(TREE_SOURCE, b""), encode_record(&source.to_string()))?;
        self.store.flush()
    }

    /// The manifest of the committed file at `path`, if any.
    pub fn committed_manifest(&self, path: &str) -> Result<Option<Manifest>, StoreError> {
        get(&self.tree, &self.key(FILE_MANIFEST, path.as_bytes()))
    }

    /// The open transfer to `path`, if any.
    pub fn transfer(&self, path: &str) -> Result<Option<TransferRecord>, StoreError> {
        get(&self.tree, &self.key(TRANSFER, path.as_bytes()))
    }

    /// The progress of the open transfer to `path`, if any.
    pub fn progress(&self, path: &str) -> Result<Option<Progress>, StoreError> {
        get(&self.tree, &self.key(PROGRESS, path.as_bytes()))
    }

    /// The committed file at `path`, if any.
    pub fn committed(&self, path: &str) -> Result<Option<CommittedFile>, StoreError> {
        get(&self.tree, &self.key(FILE, path.as_bytes()))
    }

    /// Records a (re)started transfer and its initial progress atomically, then flushes.
    pub fn begin(&self, path: &str, record: &TransferRecord, progress: &Progress) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        batch.insert(self.key(TRANSFER, path.as_bytes()), encode_record(record));
        batch.insert(self.key(PROGRESS, path.as_bytes()), encode_record(progress));
        self.tree.apply_batch(batch)?;
        self.store.flush()
    }

    /// Records progress and flushes; the caller synced the chunk bytes before.
    pub fn save_progress(&self, path: &str, progress: &Progress) -> Result<(), StoreError> {
        let mut progress = progress.clone();
        progress.updated = now_secs();
        self.tree
            .insert(self.key(PROGRESS, path.as_bytes()), encode_record(&progress))?;
        self.store.flush()
    }

    /// Replaces the open transfer with its committed-file record and manifest, and moves the chunk index from the
    /// previous version of `path` to this one, atomically; then flushes.
    pub fn commit(&self, path: &str, file: &CommittedFile, manifest: &Manifest) -> Result<(), StoreError> {
        let mut batch = RecordBatch::default();
        self.commit_into(&mut batch, path, file, manifest)?;
        self.apply(batch)
    }

    /// Adds the writes of [`ReceiverStore::commit`] to `batch` (several small files share one batch and flush).
    pub fn commit_into(
        &self,
        batch: &mut RecordBatch,
        path: &str,
        file: &CommittedFile,
        manifest: &Manifest,
    ) -> Result<(), StoreError> {
        if let Some(old) = self.committed_manifest(path)? {
            for chunk in &old.chunks {
                batch.remove(self.chunk_key(&chunk.hash, path));
            }
        }
        batch.remove(self.key(TRANSFER, path.as_bytes()));
        batch.remove(self.key(PROGRESS, path.as_bytes()));
        batch.insert(self.key(FILE, path.as_bytes()), encode_record(file));
        batch.insert(self.key(FILE_MANIFEST, path.as_bytes()), encode_record(manifest));
        for chunk in &manifest.chunks {
            batch.insert(
                self.chunk_key(&chunk.hash, path),
                encode_record(&(chunk.offset, chunk.len)),
            );
        }
        Ok(())
    }

    /// Applies a batch built with [`ReceiverStore::commit_into`] and flushes.
    pub fn apply(&self, batch: RecordBatch) -> Result<(), StoreError> {
        self.tree.apply_batch(batch.0)?;
        self.store.flush()
    }
}

/// The bytes of `manifest`'s chunks that the bitmap `received` marks (0 for a bitmap that does not fit it).
fn durable_bytes(manifest: &Manifest, received: &[u8]) -> u64 {
    let Some(set) = ChunkSet::from_bytes(manifest.chunk_count(), received) else {
        return 0;
    };
    (0..manifest.chunk_count())
        .filter(|&i| set.contains(i))
        .filter_map(|i| manifest.chunks.get(i as usize))
        .map(|chunk| u64::from(chunk.len))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::manifest_of;

    #[test]
    fn partials_count_durable_chunk_bytes_and_stop_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mine = ReceiverStore::open_scoped(&store, "mine").unwrap();
        let other = ReceiverStore::open_scoped(&store, "other").unwrap();
        let manifest = manifest_of(&[4096, 4096, 5]);
        let mut set = ChunkSet::new(3);
        set.insert(1);
        set.insert(2);
        for (store, path) in [(&mine, "a/one"), (&mine, "b/two"), (&other, "c")] {
            let record = TransferRecord {
                manifest: manifest.clone(),
                partial: format!("{path}.part"),
                created: 100,
            };
            let progress = Progress {
                received: set.to_bytes(),
                ..Progress::default()
            };
            store.begin(path, &record, &progress).unwrap();
        }
        let (listed, total) = mine.partials(10).unwrap();
        assert_eq!(total, 2, "only this scope's transfers");
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].path, "a/one");
        assert_eq!(listed[0].size, 8197);
        assert_eq!(listed[0].durable_bytes, 4096 + 5);
        assert_eq!(listed[0].created, 100);
        let (first, total) = mine.partials(1).unwrap();
        assert_eq!((first.len(), total), (1, 2));
        assert_eq!(
            durable_bytes(&manifest, &[1, 2, 3]),
            0,
            "a bitmap that does not fit counts nothing"
        );
    }
}
