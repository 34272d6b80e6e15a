//! The receiver's disk pipeline for the small files of a tree, on two blocking threads, batch by batch:
//! verify → write each to its own temporary file (one thread) → one `syncfs` → rename each into place → sync the
//! directories → record the batch in sled (one flush) → TreeAck (the other thread, one batch behind).
//!
//! Batching the sync and the store flush is what lets 10,000 small files cost a few hundred syncs instead of
//! 30,000. The crash-safety order is that of a single file (proto-spec.md, "Crash safety"): a final name only ever
//! holds verified, synced bytes; the record follows the rename; the Ack follows the record. Temporary names are
//! unique, so two sessions writing the same path never share a temporary file: the last rename wins, whole.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::TransferError;
use crate::chunk::mtime_of;
use crate::manifest::{ChunkEntry, Chunking, FileTime, Hash, Manifest};
use crate::path::{open_parent_dir, rename_into_opened, RemotePath, Replace};
use crate::server::ReceiverStats;
use crate::store::{now_secs, CommittedFile, ReceiverStore};
use crate::wire::ErrorCode;

/// Files per batch.
pub(crate) const BATCH_FILES: usize = 256;
/// Bytes per batch.
pub(crate) const BATCH_BYTES: u64 = 16 * 1024 * 1024;

/// One small file to commit whole.
pub(crate) struct SmallFile {
    /// Its tree entry.
    pub(crate) index: u32,
    /// Destination under the root.
    pub(crate) key: RemotePath,
    /// Its bytes (not yet verified).
    pub(crate) data: Vec<u8>,
    /// The digest offered.
    pub(crate) digest: Hash,
    /// Metadata to apply.
    pub(crate) mtime: FileTime,
    /// Permission bits to apply (`& 0o777`).
    pub(crate) mode: u32,
    /// Its share of the server's queue budget, held until written (dropped with the file).
    pub(crate) _budget: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// What one batch did.
#[derive(Debug, Default)]
pub(crate) struct BatchOutcome {
    /// Entries now committed.
    pub(crate) committed: Vec<u32>,
    /// Entries whose destination is blocked (a directory or a symlink in the way), with the reason.
    pub(crate) refused: Vec<(u32, String)>,
    /// Entries whose bytes did not match the digest: ask again.
    pub(crate) rejected: Vec<u32>,
}

/// Commits small files under a root.
#[derive(Clone)]
pub(crate) struct SmallWriter {
    pub(crate) root: PathBuf,
    pub(crate) partial_dir: PathBuf,
    pub(crate) store: ReceiverStore,
    pub(crate) stats: Arc<ReceiverStats>,
}

impl SmallWriter {
    /// Takes files from `files` in batches until the channel closes; reports each batch, or the storage failure
    /// that stopped it, in order. Two threads overlap the work: this one verifies and writes batch N+1 into
    /// temporaries while another syncs, renames and records batch N.
    pub(crate) fn run(
        self,
        mut files: mpsc::Receiver<SmallFile>,
        events: mpsc::UnboundedSender<Result<BatchOutcome, TransferError>>,
    ) {
        let (written_tx, written_rx) = std::sync::mpsc::sync_channel::<Result<Written, TransferError>>(WRITTEN_AHEAD);
        std::thread::scope(|scope| {
            let (this, events) = (&self, &events);
            let settler = scope.spawn(move || {
                while let Ok(written) = written_rx.recv() {
                    let (group, failure) = group_commit(written, &written_rx);
                    let outcome = group.and_then(|written| this.settle_batch(written));
                    let failed = outcome.is_err() || failure.is_some();
                    if events.send(outcome).is_err() {
                        return;
                    }
                    if let Some(e) = failure {
                        let _ = events.send(Err(e));
                    }
                    if failed {
                        return;
                    }
                }
            });
            while let Some(first) = files.blocking_recv() {
                let batch = next_batch(first, &mut files);
                let written = self.write_batch(batch);
                let failed = written.is_err();
                if written_tx.send(written).is_err() || failed {
                    break;
                }
            }
            drop(written_tx);
            let _ = settler.join();
        });
    }

    /// Verifies, writes, syncs, renames and records `batch`.
    pub(crate) fn commit_batch(&self, batch: Vec<SmallFile>) -> Result<BatchOutcome, TransferError> {
        let written = self.write_batch(batch)?;
        self.settle_batch(written)
    }

    /// Verifies each file and writes it to a temporary; the bytes (and their share of the queue budget) are let go.
    fn write_batch(&self, batch: Vec<SmallFile>) -> Result<Written, TransferError> {
        let mut written = Written {
            outcome: BatchOutcome::default(),
            files: Vec::with_capacity(batch.len()),
            temps: Temps(Vec::with_capacity(batch.len())),
        };
        for mut file in batch {
            if *blake3::hash(&file.data).as_bytes() != file.digest {
                written.outcome.rejected.push(file.index);
                continue;
            }
            let (temp, meta) = self
                .write_temp(&file, &mut written.temps)
                .map_err(TransferError::Storage)?;
            let len = file.data.len() as u64;
            file.data = Vec::new();
            file._budget = None;
            written.files.push((file, len, temp, meta));
        }
        Ok(written)
    }

    /// Syncs a written batch, renames each file into place, syncs the directories and records the batch.
    fn settle_batch(&self, written: Written) -> Result<BatchOutcome, TransferError> {
        let Written {
            mut outcome,
            files,
            mut temps,
        } = written;
        if files.is_empty() {
            return Ok(outcome);
        }
        sync_filesystem(&self.partial_dir, files.iter().map(|(_, _, temp, _)| temp.as_path()))?;
        let partial_dir = File::open(&self.partial_dir).map_err(TransferError::Storage)?;
        // Each destination directory walked once per batch (no-follow descriptor walk), renamed into through that
        // descriptor and synced through it after the renames.
        let mut dirs: BTreeMap<String, File> = BTreeMap::new();
        let mut placed = Vec::with_capacity(files.len());
        for (file, len, temp, meta) in files {
            // On an early return, the temporaries not placed yet are removed (those renamed are gone from their
            // unique names, so removing those names does nothing).
            match self.place(&file, &temp, &meta, &partial_dir, &mut dirs) {
                Ok(()) => placed.push((file, len, meta)),
                Err(Placement::Refused(why)) => {
                    let _ = std::fs::remove_file(&temp);
                    outcome.refused.push((file.index, why));
                }
                Err(Placement::Failed(e)) => {
                    let _ = std::fs::remove_file(&temp);
                    return Err(TransferError::Storage(e));
                }
            }
        }
        temps.0.clear();
        for dir in dirs.values() {
            dir.sync_all().map_err(TransferError::Storage)?;
        }
        // A file committed whole over an open transfer replaces it: its records go in the batch, its partial
        // after the batch (it no longer counts against the quota, so it must not stay on disk).
        let mut replaced = Vec::new();
        for (file, _, _) in &placed {
            if let Some(open) = self.store.summary(file.key.as_str())? {
                replaced.push(open.partial);
            }
        }
        let mut records = crate::store::RecordBatch::default();
        for (file, len, meta) in &placed {
            let manifest = whole_file_manifest(file, *len);
            let record = CommittedFile {
                manifest_id: manifest.id(),
                size: manifest.size,
                digest: file.digest,
                mtime: mtime_of(meta),
                inode: meta.ino(),
                committed_at: now_secs(),
            };
            self.store
                .commit_into(&mut records, file.key.as_str(), &record, &manifest)?;
        }
        self.store.apply(records)?;
        for partial in replaced {
            remove_partial(Path::new(&partial));
        }
        for (file, len, _) in placed {
            self.stats.files_committed.fetch_add(1, Ordering::Relaxed);
            self.stats.bytes_received.fetch_add(len, Ordering::Relaxed);
            self.stats.meter.moved(len);
            self.stats.meter.durable(len);
            outcome.committed.push(file.index);
        }
        Ok(outcome)
    }

    /// Writes the bytes to a fresh, uniquely named temporary file with the file's mode and mtime; returns it and
    /// its metadata (the inode the rename must move, and the mtime recorded).
    fn write_temp(&self, file: &SmallFile, temps: &mut Temps) -> std::io::Result<(PathBuf, std::fs::Metadata)> {
        use std::os::unix::fs::PermissionsExt;
        let temp = self
            .partial_dir
            .join(format!(".ferry-{:016x}.small", crate::random::u64()));
        let mut out = std::fs::OpenOptions::new().write(true).create_new(true).open(&temp)?;
        temps.0.push(temp.clone());
        out.write_all(&file.data)?;
        out.set_permissions(std::fs::Permissions::from_mode(file.mode & 0o777))?;
        out.set_modified(super::commit::system_time(file.mtime))?;
        let meta = out.metadata()?;
        Ok((temp, meta))
    }

    /// Renames `temp` (in `partial_dir`) over the file's destination, through directory descriptors on both sides
    /// (no symlink is followed, even one swapped in meanwhile), checking before and after the rename that the name
    /// holds the temporary written (`meta`), as a single file's commit does (`storage::local::rename_verified`). The
    /// destination's directory is walked once per batch and kept in `dirs`.
    fn place(
        &self,
        file: &SmallFile,
        temp: &Path,
        meta: &std::fs::Metadata,
        partial_dir: &File,
        dirs: &mut BTreeMap<String, File>,
    ) -> Result<(), Placement> {
        use std::os::unix::fs::MetadataExt;
        let refused = |e: crate::path::PathError| match e {
            // An I/O error on the walk or the rename (a full disk, EIO) fails the batch.
            crate::path::PathError::Io { source, .. } => Placement::Failed(source),
            refused => Placement::Refused(TransferError::refused(ErrorCode::BadPath, refused).to_string()),
        };
        let swapped = || {
            Placement::Refused(format!(
                "the temporary file of {} was replaced after it was verified",
                file.key
            ))
        };
        let verified = Some((meta.dev(), meta.ino()));
        let name = temp.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if !crate::storage::local::inode_at(partial_dir, name).is_ok_and(|found| found == verified) {
            return Err(swapped());
        }
        let key = file.key.as_str();
        let parent = key.rsplit_once('/').map_or("", |(parent, _)| parent);
        let dir = match dirs.entry(parent.to_string()) {
            std::collections::btree_map::Entry::Occupied(dir) => dir.into_mut(),
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(open_parent_dir(&self.root, &file.key).map_err(refused)?)
            }
        };
        rename_into_opened(&self.root, &file.key, dir, partial_dir, name, Replace::File).map_err(refused)?;
        let final_name = file.key.components().last().expect("a RemotePath has a component");
        if !crate::storage::local::inode_at(dir, final_name).is_ok_and(|found| found == verified) {
            // Swapped in the instant between the check and the rename: take the stranger's file away again.
            let _ = rustix::fs::unlinkat(dir, final_name, rustix::fs::AtFlags::empty());
            return Err(swapped());
        }
        Ok(())
    }
}

/// A batch verified and written to temporaries, waiting for its sync: each file (its bytes let go), its length,
/// and its temporary.
struct Written {
    outcome: BatchOutcome,
    files: Vec<(SmallFile, u64, PathBuf, std::fs::Metadata)>,
    temps: Temps,
}

impl Written {
    /// Adds a later batch to this one, to be synced, renamed and recorded together.
    fn absorb(&mut self, other: Written) {
        let Written { outcome, files, temps } = other;
        self.outcome.committed.extend(outcome.committed);
        self.outcome.refused.extend(outcome.refused);
        self.outcome.rejected.extend(outcome.rejected);
        self.files.extend(files);
        self.temps.absorb(temps);
    }
}

/// Batches written while the settling thread was busy, at most: they share its next sync.
const WRITTEN_AHEAD: usize = 8;

/// Group commit: `first` and every batch already written behind it, merged, so that one `syncfs`, one store flush
/// and one walk per directory serve them all (the slower the disk, the larger the group). A write failure that
/// came after the merged batches is returned beside them, to report once they are settled.
fn group_commit(
    first: Result<Written, TransferError>,
    written: &std::sync::mpsc::Receiver<Result<Written, TransferError>>,
) -> (Result<Written, TransferError>, Option<TransferError>) {
    let Ok(mut group) = first else {
        return (first, None);
    };
    while let Ok(next) = written.try_recv() {
        match next {
            Ok(more) => group.absorb(more),
            Err(e) => return (Ok(group), Some(e)),
        }
    }
    (Ok(group), None)
}

/// Up to [`BATCH_FILES`] files or [`BATCH_BYTES`] bytes: `first` and whatever else is already queued.
fn next_batch(first: SmallFile, files: &mut mpsc::Receiver<SmallFile>) -> Vec<SmallFile> {
    let mut bytes = first.data.len() as u64;
    let mut batch = vec![first];
    while batch.len() < BATCH_FILES && bytes < BATCH_BYTES {
        match files.try_recv() {
            Ok(file) => {
                bytes += file.data.len() as u64;
                batch.push(file);
            }
            Err(_) => break,
        }
    }
    batch
}

/// Temporary files of a batch not yet renamed; removed if the batch stops early (a full disk, say).
struct Temps(Vec<PathBuf>);

impl Temps {
    fn absorb(&mut self, mut other: Temps) {
        self.0.append(&mut other.0);
    }
}

impl Drop for Temps {
    fn drop(&mut self) {
        for temp in &self.0 {
            let _ = std::fs::remove_file(temp);
        }
    }
}

enum Placement {
    Refused(String),
    Failed(std::io::Error),
}

/// The manifest recorded for a file committed whole: one chunk (none if empty), so its content joins the chunk
/// index like any other.
pub(crate) fn whole_file_manifest(file: &SmallFile, size: u64) -> Manifest {
    let chunks = if size == 0 {
        Vec::new()
    } else {
        vec![ChunkEntry {
            offset: 0,
            len: size as u32,
            hash: file.digest,
        }]
    };
    Manifest {
        size,
        digest: file.digest,
        chunking: Chunking::Fixed {
            size: crate::MAX_CHUNK_SIZE,
        },
        mtime: file.mtime,
        mode: file.mode,
        chunks,
    }
}

/// Removes the partial file of a replaced transfer, never following a symlink (best effort: a leftover is
/// collected by the expiry sweep).
fn remove_partial(partial: &Path) {
    if std::fs::symlink_metadata(partial).is_ok_and(|m| m.is_file()) {
        if let Err(e) = std::fs::remove_file(partial) {
            tracing::warn!(partial = %partial.display(), error = %e, "could not remove a replaced partial");
        }
    }
}

/// Makes the temporary files durable: one `syncfs` of their filesystem, or an `fdatasync` each where that fails.
fn sync_filesystem<'a>(dir: &Path, temps: impl Iterator<Item = &'a Path>) -> Result<(), TransferError> {
    let handle = File::open(dir).map_err(TransferError::Storage)?;
    if rustix::fs::syncfs(&handle).is_ok() {
        return Ok(());
    }
    for temp in temps {
        File::open(temp)
            .and_then(|f| f.sync_data())
            .map_err(TransferError::Storage)?;
    }
    Ok(())
}
