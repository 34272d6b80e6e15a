//! Receiver state: one record per open transfer, its received-chunk bitmap, committed files with their manifests,
//! and the chunk index (hash → file, offset, length) through which any stored chunk can be reused.
//!
//! Keys are `kind NUL scope NUL path`: a server uses the empty scope (a namespace comes with authentication), a
//! pulling client the canonical local root, so pulls into different directories never share records. Crash-safety order
//! (proto-spec.md, "Crash safety"): chunk bytes are synced by the caller, then [`ReceiverStore::save_progress`]
//! records them and flushes, and only then may an Ack go out.

use serde::{Deserialize, Serialize};

use super::{get, now_secs, prefixed, RecordBatch, Store, StoreError};
use crate::manifest::{ChunkEntry, FileTime, Hash, Manifest};
use crate::ranges::ChunkSet;
use crate::record::encode_record;

const TRANSFER: &str = "transfer";
const PROGRESS: &str = "progress";
const FILE: &str = "file";
const FILE_MANIFEST: &str = "fmanifest";
const CHUNK: &str = "chunk";
const TREE_SOURCE: &str = "treesrc";
/// The small record of an open transfer ([`TransferSummary`]): what listing and quotas read, never the manifest.
const SUMMARY: &str = "tsummary";
/// Marks a scope whose open transfers all have a summary (stores written before summaries existed are migrated
/// once, when the scope is opened).
const MIGRATED: &str = "migrated";
/// The whole-file digest state of an open transfer's durable prefix ([`PrefixRecord`]).
const DIGEST_PREFIX: &str = "dprefix";
/// Directories and symlinks trees created in a scope (a count: files are counted by their own records).
const TREE_INODES: &str = "tinodes";

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

/// A [`TransferRecord`] borrowed from its parts: encodes to the same bytes, without copying a large manifest.
#[derive(Serialize, Debug, Clone, Copy)]
pub struct TransferRecordRef<'a> {
    /// The manifest being received.
    pub manifest: &'a Manifest,
    /// File name of the partial under the partials directory.
    pub partial: &'a str,
    /// When the transfer was first offered (Unix seconds).
    pub created: u64,
}

impl TransferRecord {
    /// This record, borrowed.
    pub fn as_ref(&self) -> TransferRecordRef<'_> {
        TransferRecordRef {
            manifest: &self.manifest,
            partial: &self.partial,
            created: self.created,
        }
    }
}

/// The small record kept beside every open transfer, so that listing partials, expiring them and checking quotas
/// never decode a manifest (which may hold 500,000 chunks).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TransferSummary {
    /// Size of the file being received.
    pub size: u64,
    /// Encoded bytes of the transfer's record (its manifest, mostly): what it costs the store.
    pub manifest_bytes: u64,
    /// Path of the partial file.
    pub partial: String,
    /// When the transfer was first offered (Unix seconds).
    pub created: u64,
    /// Bytes of the chunks marked durable (received or reused).
    pub durable_bytes: u64,
    /// When it last made progress (Unix seconds).
    pub updated: u64,
}

/// What a scope holds, summed from small records only (committed files and open-transfer summaries).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Sizes of the committed files.
    pub committed_bytes: u64,
    /// Number of committed files.
    pub committed_files: u64,
    /// Sizes of the files being received.
    pub open_bytes: u64,
    /// Number of open transfers.
    pub open_transfers: u64,
    /// Stored bytes of the open transfers' manifests.
    pub manifest_bytes: u64,
    /// Directories and symlinks created by trees.
    pub tree_inodes: u64,
}

impl Usage {
    /// Bytes counted against a quota: committed files, files being received and their manifests.
    pub fn held_bytes(&self) -> u64 {
        self.committed_bytes
            .saturating_add(self.open_bytes)
            .saturating_add(self.manifest_bytes)
    }

    /// Entries (inodes) counted against a namespace's entry budget: committed files, open transfers, and the
    /// directories and symlinks trees created.
    pub fn entries(&self) -> u64 {
        self.committed_files
            .saturating_add(self.open_transfers)
            .saturating_add(self.tree_inodes)
    }
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

/// The state of the whole-file BLAKE3 over the first `len` bytes of an open transfer's partial file (the chaining
/// values of its complete subtrees, `verify::StackedPrefix`), recorded with the progress once those bytes were
/// durable, so that a resumed transfer does not read them again to verify the file. It is bound to the manifest
/// and to the partial file as it was when recorded ([`FileStamp`]): any change to the file since (a write, even a
/// byte flipped by someone else through the filesystem) makes it void, and the prefix is read again.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PrefixRecord {
    /// `Manifest::id` of the transfer's manifest.
    pub manifest_id: Hash,
    /// The partial file when the record was made.
    pub partial: FileStamp,
    /// Bytes covered, from offset 0.
    pub len: u64,
    /// The chaining values, bottom of BLAKE3's subtree stack first.
    pub stack: Vec<Hash>,
}

/// What identifies a file's contents without reading them: device, inode, size, modification and change times
/// (nanoseconds), and the time the stamp was taken (coarse clock). The change time cannot be set by anyone: a
/// write after the stamp gives a different one, provided the clock moved past it before the stamp was taken
/// ([`FileStamp::settled`]; Linux ≥ 6.13 also guarantees it by fine-grained timestamps once the time is read).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i128,
    /// Change time, nanoseconds since the epoch.
    pub ctime_ns: i128,
    /// When the stamp was taken (`CLOCK_REALTIME_COARSE`, the clock file times come from), nanoseconds.
    pub taken_ns: i128,
}

impl FileStamp {
    /// The stamp of the file whose identity and change times are `stamp` (just read), taken now.
    pub fn of(stamp: &crate::storage::ChangeStamp) -> FileStamp {
        let ns = |secs: i64, nanos: i64| i128::from(secs) * 1_000_000_000 + i128::from(nanos);
        let now = rustix::time::clock_gettime(rustix::time::ClockId::RealtimeCoarse);
        FileStamp {
            dev: stamp.dev,
            ino: stamp.ino,
            size: stamp.size,
            mtime_ns: stamp.mtime_ns,
            ctime_ns: stamp.ctime_ns,
            taken_ns: ns(now.tv_sec, now.tv_nsec),
        }
    }

    /// Whether the clock had moved past the change time when the stamp was taken: only then does any later change
    /// to the file show as a different change time on every kernel.
    pub fn settled(&self) -> bool {
        self.taken_ns > self.ctime_ns
    }

    /// Whether `now` (a stamp of the same file taken later) shows the file unchanged since this stamp.
    pub fn unchanged_at(&self, now: &FileStamp) -> bool {
        self.settled()
            && (self.dev, self.ino, self.size, self.mtime_ns, self.ctime_ns)
                == (now.dev, now.ino, now.size, now.mtime_ns, now.ctime_ns)
    }
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
        let opened = ReceiverStore {
            store: store.clone(),
            tree: store.tree("receiver")?,
            scope: scope.as_bytes().to_vec(),
        };
        opened.migrate_summaries()?;
        Ok(opened)
    }

    /// Gives every open transfer written before summaries existed its [`TransferSummary`], once per scope (one
    /// record decoded at a time).
    fn migrate_summaries(&self) -> Result<(), StoreError> {
        let marker = self.key(MIGRATED, b"summaries");
        if self.tree.contains_key(&marker)? {
            return Ok(());
        }
        let prefix = self.key(TRANSFER, b"");
        let mut migrated = 0u64;
        for entry in self.tree.scan_prefix(&prefix) {
            let (key, value) = entry?;
            let path = &key[prefix.len()..];
            if self.tree.contains_key(self.key(SUMMARY, path))? {
                continue;
            }
            let record: TransferRecord = super::decode(&key, &value)?;
            let progress: Progress = get(&self.tree, &self.key(PROGRESS, path))?.unwrap_or_default();
            let summary = summarize(record.as_ref(), value.len(), &progress);
            self.tree.insert(self.key(SUMMARY, path), encode_record(&summary))?;
            migrated += 1;
        }
        self.tree.insert(marker, &[][..])?;
        if migrated > 0 {
            tracing::info!(transfers = migrated, "recorded the sizes of open transfers");
        }
        self.store.flush()
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
        let mut open = Vec::new();
        for entry in self.summaries() {
            let (path, summary) = entry?;
            open.push(OpenTransfer {
                last_activity: summary.updated.max(summary.created),
                partial: summary.partial,
                path,
            });
        }
        Ok(open)
    }

    /// The first `limit` open transfers of this scope in path order, with the number of all of them.
    pub fn partials(&self, limit: usize) -> Result<(Vec<PartialTransfer>, u64), StoreError> {
        let (mut listed, mut total) = (Vec::new(), 0u64);
        for entry in self.summaries() {
            let (path, summary) = entry?;
            total += 1;
            if listed.len() >= limit {
                continue;
            }
            listed.push(PartialTransfer {
                durable_bytes: summary.durable_bytes.min(summary.size),
                size: summary.size,
                created: summary.created,
                updated: summary.updated.max(summary.created),
                path,
            });
        }
        Ok((listed, total))
    }

    /// What this scope holds: its committed files, and its open transfers with their manifests' stored bytes.
    /// What namespace quotas and limits check; reads only small records.
    pub fn usage(&self) -> Result<Usage, StoreError> {
        let (committed_bytes, committed_files) = self.committed_usage()?;
        Ok(Usage {
            committed_bytes,
            committed_files,
            ..self.open_usage()?
        })
    }

    /// The sizes and number of the committed files: a scan of every committed record of the scope.
    pub fn committed_usage(&self) -> Result<(u64, u64), StoreError> {
        let (mut bytes, mut files) = (0u64, 0u64);
        let committed = self.key(FILE, b"");
        for entry in self.tree.scan_prefix(&committed) {
            let (key, value) = entry?;
            let file: CommittedFile = super::decode(&key, &value)?;
            bytes = bytes.saturating_add(file.size);
            files += 1;
        }
        Ok((bytes, files))
    }

    /// [`ReceiverStore::usage`] without the committed files (left at zero): open transfers and tree entries only,
    /// a scan bounded by the number of open transfers.
    pub fn open_usage(&self) -> Result<Usage, StoreError> {
        let mut usage = Usage::default();
        for entry in self.summaries() {
            let (_, summary) = entry?;
            usage.open_bytes = usage.open_bytes.saturating_add(summary.size);
            usage.manifest_bytes = usage.manifest_bytes.saturating_add(summary.manifest_bytes);
            usage.open_transfers += 1;
        }
        usage.tree_inodes = self.tree_inodes()?;
        Ok(usage)
    }

    /// Directories and symlinks trees created in this scope.
    fn tree_inodes(&self) -> Result<u64, StoreError> {
        Ok(get(&self.tree, &self.key(TREE_INODES, b""))?.unwrap_or(0u64))
    }

    /// Counts `created` more directories and symlinks made by a tree, and flushes. The caller serialises these
    /// (the namespace's admission lock): it reads, adds and writes.
    pub fn add_tree_inodes(&self, created: u64) -> Result<(), StoreError> {
        if created == 0 {
            return Ok(());
        }
        let total = self.tree_inodes()?.saturating_add(created);
        self.tree.insert(self.key(TREE_INODES, b""), encode_record(&total))?;
        self.store.flush()
    }

    /// Bytes this scope holds as a quota counts them ([`Usage::held_bytes`]).
    pub fn held_bytes(&self) -> Result<u64, StoreError> {
        Ok(self.usage()?.held_bytes())
    }

    /// The summary of every open transfer of this scope, in path order.
    fn summaries(&self) -> impl Iterator<Item = Result<(String, TransferSummary), StoreError>> + '_ {
        let prefix = self.key(SUMMARY, b"");
        self.tree.scan_prefix(&prefix).map(move |entry| {
            let (key, value) = entry?;
            let summary: TransferSummary = super::decode(&key, &value)?;
            Ok((String::from_utf8_lossy(&key[prefix.len()..]).into_owned(), summary))
        })
    }

    /// The summary of the open transfer to `path`, if any.
    pub fn summary(&self, path: &str) -> Result<Option<TransferSummary>, StoreError> {
        get(&self.tree, &self.key(SUMMARY, path.as_bytes()))
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
        batch.remove(self.key(SUMMARY, path.as_bytes()));
        batch.remove(self.key(DIGEST_PREFIX, path.as_bytes()));
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

    /// The digest state recorded for the open transfer to `path`, if any (check its binding before use).
    pub fn digest_prefix(&self, path: &str) -> Result<Option<PrefixRecord>, StoreError> {
        get(&self.tree, &self.key(DIGEST_PREFIX, path.as_bytes()))
    }

    /// The committed file at `path`, if any.
    pub fn committed(&self, path: &str) -> Result<Option<CommittedFile>, StoreError> {
        get(&self.tree, &self.key(FILE, path.as_bytes()))
    }

    /// Records a (re)started transfer, its summary and its initial progress atomically, then flushes.
    pub fn begin(&self, path: &str, record: &TransferRecord, progress: &Progress) -> Result<(), StoreError> {
        self.begin_encoded(path, record.as_ref(), &encode_record(record), progress)
    }

    /// [`ReceiverStore::begin`] with the record already encoded (by `record::encode_record`), so a caller that
    /// checked its length against a limit does not encode it twice.
    pub fn begin_encoded(
        &self,
        path: &str,
        record: TransferRecordRef<'_>,
        encoded: &[u8],
        progress: &Progress,
    ) -> Result<(), StoreError> {
        let summary = summarize(record, encoded.len(), progress);
        let mut batch = sled::Batch::default();
        batch.insert(self.key(TRANSFER, path.as_bytes()), encoded);
        batch.insert(self.key(PROGRESS, path.as_bytes()), encode_record(progress));
        batch.insert(self.key(SUMMARY, path.as_bytes()), encode_record(&summary));
        self.tree.apply_batch(batch)?;
        self.store.flush()
    }

    /// Records progress (with `durable_bytes`, the bytes of the chunks it marks) and flushes; the caller synced
    /// the chunk bytes before. A digest state recorded for the transfer is dropped.
    pub fn save_progress(&self, path: &str, progress: &Progress, durable_bytes: u64) -> Result<(), StoreError> {
        self.save_progress_with(path, progress, durable_bytes, None)
    }

    /// [`ReceiverStore::save_progress`], recording `prefix` (or dropping the one recorded, if `None`) in the same
    /// atomic write; the caller made the bytes it covers durable before.
    pub fn save_progress_with(
        &self,
        path: &str,
        progress: &Progress,
        durable_bytes: u64,
        prefix: Option<&PrefixRecord>,
    ) -> Result<(), StoreError> {
        let mut progress = progress.clone();
        progress.updated = now_secs();
        let mut batch = sled::Batch::default();
        batch.insert(self.key(PROGRESS, path.as_bytes()), encode_record(&progress));
        match prefix {
            Some(prefix) => batch.insert(self.key(DIGEST_PREFIX, path.as_bytes()), encode_record(prefix)),
            None => batch.remove(self.key(DIGEST_PREFIX, path.as_bytes())),
        }
        if let Some(mut summary) = self.summary(path)? {
            summary.durable_bytes = durable_bytes;
            summary.updated = progress.updated;
            batch.insert(self.key(SUMMARY, path.as_bytes()), encode_record(&summary));
        }
        self.tree.apply_batch(batch)?;
        self.store.flush()
    }

    /// Replaces the open transfer with its committed-file record and manifest atomically, then moves the chunk
    /// index from the previous version of `path` to this one in batches of [`INDEX_BATCH`]; then flushes.
    pub fn commit(&self, path: &str, file: &CommittedFile, manifest: &Manifest) -> Result<(), StoreError> {
        let old = self.committed_manifest(path)?;
        let mut batch = RecordBatch::default();
        self.record_into(&mut batch, path, file, manifest, true);
        self.tree.apply_batch(batch.batch)?;
        // The chunk index holds hints (each place is verified when used, and a stale one dropped), so it need not
        // change in the same batch: a batch of one entry per chunk cost sled memory in proportion to the file (an
        // 8 GiB file's commit raised the server's heap in use from 15 to 31 MB).
        let removals = old.iter().flat_map(|old| old.chunks.chunks(INDEX_BATCH));
        for chunks in removals {
            let mut batch = RecordBatch::default();
            self.unindex_into(&mut batch, path, chunks);
            self.tree.apply_batch(batch.batch)?;
        }
        for chunks in manifest.chunks.chunks(INDEX_BATCH) {
            let mut batch = RecordBatch::default();
            self.index_into(&mut batch, path, chunks);
            self.tree.apply_batch(batch.batch)?;
        }
        self.store.flush()
    }

    /// Adds the writes of [`ReceiverStore::commit`] to `batch` (several small files share one batch and flush).
    /// `open_transfer`: whether `path` may have an open transfer (its [`ReceiverStore::summary`] is there), whose
    /// records the batch then removes; a small file of a tree committed where none is open skips those four removes
    /// (each a lookup when applied). An open transfer always has its summary: `begin` writes both in one batch,
    /// and records older than summaries get theirs when the store is opened.
    pub fn commit_into(
        &self,
        batch: &mut RecordBatch,
        path: &str,
        file: &CommittedFile,
        manifest: &Manifest,
        open_transfer: bool,
    ) -> Result<(), StoreError> {
        if let Some(old) = self.committed_manifest(path)? {
            self.unindex_into(batch, path, &old.chunks);
        }
        self.record_into(batch, path, file, manifest, open_transfer);
        self.index_into(batch, path, &manifest.chunks);
        Ok(())
    }

    /// The committed file's own records: its record and manifest, and the removal of the transfer's if one may be
    /// open.
    fn record_into(&self, batch: &mut RecordBatch, path: &str, file: &CommittedFile, manifest: &Manifest, open: bool) {
        if open {
            batch.remove(self.key(TRANSFER, path.as_bytes()));
            batch.remove(self.key(PROGRESS, path.as_bytes()));
            batch.remove(self.key(SUMMARY, path.as_bytes()));
            batch.remove(self.key(DIGEST_PREFIX, path.as_bytes()));
        }
        batch.insert(self.key(FILE, path.as_bytes()), encode_record(file));
        batch.insert(self.key(FILE_MANIFEST, path.as_bytes()), encode_record(manifest));
    }

    /// Removes the chunk-index entries of `chunks` of the file at `path`.
    fn unindex_into(&self, batch: &mut RecordBatch, path: &str, chunks: &[ChunkEntry]) {
        for chunk in chunks {
            batch.remove(self.chunk_key(&chunk.hash, path));
        }
    }

    /// The chunk-index entries of `chunks` of the file at `path`.
    fn index_into(&self, batch: &mut RecordBatch, path: &str, chunks: &[ChunkEntry]) {
        for chunk in chunks {
            batch.insert(
                self.chunk_key(&chunk.hash, path),
                encode_record(&(chunk.offset, chunk.len)),
            );
        }
    }

    /// Forgets the committed files at `paths` (removed from disk by `--delete`): their records, manifests and
    /// chunk-index entries, in one batch, then flushes; quota and entry budgets stop counting them. Paths without a
    /// record are skipped.
    pub fn forget_committed(&self, paths: &[String]) -> Result<(), StoreError> {
        let mut batch = RecordBatch::default();
        for path in paths {
            if let Some(old) = self.committed_manifest(path)? {
                self.unindex_into(&mut batch, path, &old.chunks);
            }
            batch.remove(self.key(FILE, path.as_bytes()));
            batch.remove(self.key(FILE_MANIFEST, path.as_bytes()));
        }
        self.apply(batch)
    }

    /// Applies a batch built with [`ReceiverStore::commit_into`] and flushes.
    pub fn apply(&self, batch: RecordBatch) -> Result<(), StoreError> {
        self.tree.apply_batch(batch.batch)?;
        self.store.flush()
    }
}

/// The summary of a transfer whose record takes `record_len` bytes.
fn summarize(record: TransferRecordRef<'_>, record_len: usize, progress: &Progress) -> TransferSummary {
    TransferSummary {
        size: record.manifest.size,
        manifest_bytes: record_len as u64,
        partial: record.partial.to_string(),
        created: record.created,
        durable_bytes: durable_bytes(record.manifest, &progress.received),
        updated: progress.updated,
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

/// Chunk-index writes per sled batch when a file is committed on its own.
const INDEX_BATCH: usize = 1024;

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

    /// A file committed on its own has its chunk index written in several batches: every chunk of a manifest
    /// longer than one batch is indexed, and a new commit of the path replaces the old version's entries.
    #[test]
    fn a_large_commit_indexes_every_chunk_and_replaces_the_old_entries() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let ns = ReceiverStore::open_scoped(&store, "ns").unwrap();
        let numbered = |count: u32, salt: u8| {
            let mut manifest = manifest_of(&vec![4096; count as usize]);
            for (i, chunk) in manifest.chunks.iter_mut().enumerate() {
                chunk.hash[..4].copy_from_slice(&(i as u32).to_le_bytes());
                chunk.hash[4] = salt;
            }
            manifest
        };
        let count = (INDEX_BATCH * 2 + 100) as u32;
        let commit = |manifest: &Manifest| {
            let file = CommittedFile {
                manifest_id: manifest.id(),
                size: manifest.size,
                digest: manifest.digest,
                mtime: manifest.mtime,
                inode: 1,
                committed_at: 1,
            };
            ns.commit("big", &file, manifest).unwrap();
        };
        let old = numbered(count, 1);
        commit(&old);
        for chunk in [
            &old.chunks[0],
            &old.chunks[INDEX_BATCH],
            &old.chunks[count as usize - 1],
        ] {
            let found = ns.chunk_locations(&chunk.hash, 2).unwrap();
            assert_eq!(found.len(), 1);
            assert_eq!((found[0].offset, found[0].len), (chunk.offset, chunk.len));
        }
        let new = numbered(count, 2);
        commit(&new);
        assert!(old
            .chunks
            .iter()
            .all(|c| ns.chunk_locations(&c.hash, 2).unwrap().is_empty()));
        assert!(new
            .chunks
            .iter()
            .all(|c| ns.chunk_locations(&c.hash, 2).unwrap().len() == 1));
        assert_eq!(ns.committed_manifest("big").unwrap().unwrap(), new);
    }

    /// Committing a file where no transfer is open adds only its own records to the batch (the record, the manifest
    /// and the chunk index); over an open transfer it also removes the transfer's four, and the result holds no
    /// trace of the transfer either way.
    #[test]
    fn a_commit_removes_transfer_records_only_where_one_may_be_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let ns = ReceiverStore::open_scoped(&store, "ns").unwrap();
        let manifest = manifest_of(&[5]);
        let file = CommittedFile {
            manifest_id: manifest.id(),
            size: 5,
            digest: manifest.digest,
            mtime: manifest.mtime,
            inode: 1,
            committed_at: 1,
        };
        let mut batch = RecordBatch::default();
        ns.commit_into(&mut batch, "new", &file, &manifest, false).unwrap();
        assert_eq!(batch.len(), 3, "record, manifest, one chunk");
        ns.apply(batch).unwrap();
        assert!(ns.committed("new").unwrap().is_some());

        let record = TransferRecord {
            manifest: manifest_of(&[4096, 4096]),
            partial: "open.part".into(),
            created: 1,
        };
        ns.begin("open", &record, &Progress::default()).unwrap();
        let mut batch = RecordBatch::default();
        ns.commit_into(
            &mut batch,
            "open",
            &file,
            &manifest,
            ns.summary("open").unwrap().is_some(),
        )
        .unwrap();
        assert_eq!(batch.len(), 7);
        ns.apply(batch).unwrap();
        assert!(ns.transfer("open").unwrap().is_none() && ns.progress("open").unwrap().is_none());
        assert!(ns.summary("open").unwrap().is_none());
        assert!(ns.committed("open").unwrap().is_some());
    }

    /// Listing, expiry and quotas read the small summary, never the transfer's record: they work even when the
    /// record (the manifest) could not be decoded at all.
    #[test]
    fn listing_and_usage_never_decode_manifests() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let ns = ReceiverStore::open_scoped(&store, "ns").unwrap();
        let record = TransferRecord {
            manifest: manifest_of(&[4096, 4096, 5]),
            partial: "/p/.ferry-x.part".into(),
            created: 50,
        };
        let mut set = ChunkSet::new(3);
        set.insert(0);
        let progress = Progress {
            received: set.to_bytes(),
            ..Progress::default()
        };
        ns.begin("big", &record, &progress).unwrap();
        let manifest_bytes = encode_record(&record).len() as u64;
        assert_eq!(
            encode_record(&record.as_ref()),
            encode_record(&record),
            "the borrowed form encodes the same"
        );
        // Damage the record: anything that decoded it would now fail.
        ns.tree.insert(ns.key(TRANSFER, b"big"), &b"not a record"[..]).unwrap();
        let usage = ns.usage().unwrap();
        assert_eq!(
            usage,
            Usage {
                open_bytes: 8197,
                open_transfers: 1,
                manifest_bytes,
                ..Usage::default()
            }
        );
        assert_eq!(ns.held_bytes().unwrap(), 8197 + manifest_bytes);
        let (listed, total) = ns.partials(10).unwrap();
        assert_eq!((listed[0].size, listed[0].durable_bytes, total), (8197, 4096, 1));
        ns.save_progress("big", &Progress::default(), 8192).unwrap();
        assert_eq!(ns.partials(10).unwrap().0[0].durable_bytes, 8192);
        let open = ns.open_transfers().unwrap();
        assert_eq!(
            (open[0].partial.as_str(), open[0].path.as_str()),
            ("/p/.ferry-x.part", "big")
        );
        ns.forget_transfer("big").unwrap();
        assert_eq!(ns.usage().unwrap(), Usage::default());
    }

    /// A store written before summaries existed gets them once, when the scope is opened.
    #[test]
    fn open_transfers_of_an_older_store_get_their_summary() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let ns = ReceiverStore::open_scoped(&store, "old").unwrap();
        let record = TransferRecord {
            manifest: manifest_of(&[4096, 10]),
            partial: "p".into(),
            created: 9,
        };
        // As an older version wrote it: record and progress, no summary, no marker.
        ns.tree.insert(ns.key(TRANSFER, b"f"), encode_record(&record)).unwrap();
        ns.tree
            .insert(ns.key(PROGRESS, b"f"), encode_record(&Progress::default()))
            .unwrap();
        ns.tree.remove(ns.key(MIGRATED, b"summaries")).unwrap();
        assert_eq!(ns.usage().unwrap().open_transfers, 0, "not summarised yet");
        let reopened = ReceiverStore::open_scoped(&store, "old").unwrap();
        let summary = reopened.summary("f").unwrap().expect("summarised");
        assert_eq!((summary.size, summary.created, summary.durable_bytes), (4106, 9, 0));
        assert_eq!(reopened.usage().unwrap().open_transfers, 1);
    }
}
