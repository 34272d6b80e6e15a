//! The receiver's disk pipeline for the small files of a tree, on a blocking thread, one batch at a time:
//! verify → write each to its own temporary file → one `syncfs` → rename each into place → sync the directories
//! → record the batch in sled (one flush) → TreeAck.
//!
//! Batching the sync and the store flush is what lets 10,000 small files cost a few hundred syncs instead of
//! 30,000. The crash-safety order is that of a single file (proto-spec.md, "Crash safety"): a final name only ever
//! holds verified, synced bytes; the record follows the rename; the Ack follows the record. Temporary names are
//! unique, so two sessions writing the same path never share a temporary file: the last rename wins, whole.

use std::collections::BTreeSet;
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
use crate::path::{rename_into, RemotePath, Replace};
use crate::server::ReceiverStats;
use crate::store::{now_secs, CommittedFile, ReceiverStore};

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
    /// that stopped it.
    pub(crate) fn run(
        self,
        mut files: mpsc::Receiver<SmallFile>,
        events: mpsc::UnboundedSender<Result<BatchOutcome, TransferError>>,
    ) {
        while let Some(first) = files.blocking_recv() {
            let mut batch = vec![first];
            let mut bytes = batch[0].data.len() as u64;
            while batch.len() < BATCH_FILES && bytes < BATCH_BYTES {
                match files.try_recv() {
                    Ok(file) => {
                        bytes += file.data.len() as u64;
                        batch.push(file);
                    }
                    Err(_) => break,
                }
            }
            let outcome = self.commit_batch(batch);
            let failed = outcome.is_err();
            if events.send(outcome).is_err() || failed {
                return;
            }
        }
    }

    /// Verifies, writes, syncs, renames and records `batch`.
    pub(crate) fn commit_batch(&self, batch: Vec<SmallFile>) -> Result<BatchOutcome, TransferError> {
        let mut outcome = BatchOutcome::default();
        let mut written = Vec::with_capacity(batch.len());
        let mut temps = Temps(Vec::with_capacity(batch.len()));
        for file in batch {
            if *blake3::hash(&file.data).as_bytes() != file.digest {
                outcome.rejected.push(file.index);
                continue;
            }
            let temp = self.write_temp(&file, &mut temps).map_err(TransferError::Storage)?;
            written.push((file, temp));
        }
        if written.is_empty() {
            return Ok(outcome);
        }
        sync_filesystem(&self.partial_dir, written.iter().map(|(_, temp)| temp.as_path()))?;
        let mut dirs = BTreeSet::new();
        let mut placed = Vec::with_capacity(written.len());
        for (file, temp) in written {
            let placement = self.place(&file, &temp);
            temps.forget(&temp);
            match placement {
                Ok(target) => {
                    if let Some(parent) = target.parent() {
                        dirs.insert(parent.to_path_buf());
                    }
                    placed.push((file, target));
                }
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
        for dir in dirs {
            File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(TransferError::Storage)?;
        }
        let mut records = sled::Batch::default();
        for (file, target) in &placed {
            let meta = std::fs::symlink_metadata(target).map_err(TransferError::Storage)?;
            let manifest = whole_file_manifest(file);
            let record = CommittedFile {
                manifest_id: manifest.id(),
                size: manifest.size,
                digest: file.digest,
                mtime: mtime_of(&meta),
                inode: meta.ino(),
                committed_at: now_secs(),
            };
            self.store
                .commit_into(&mut records, file.key.as_str(), &record, &manifest)?;
        }
        self.store.apply(records)?;
        for (file, _) in placed {
            self.stats.files_committed.fetch_add(1, Ordering::Relaxed);
            self.stats
                .bytes_received
                .fetch_add(file.data.len() as u64, Ordering::Relaxed);
            self.stats.meter.moved(file.data.len() as u64);
            self.stats.meter.durable(file.data.len() as u64);
            outcome.committed.push(file.index);
        }
        Ok(outcome)
    }

    /// Writes the bytes to a fresh, uniquely named temporary file with the file's mode and mtime.
    fn write_temp(&self, file: &SmallFile, temps: &mut Temps) -> std::io::Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let temp = self
            .partial_dir
            .join(format!(".ferry-{:016x}.small", rand::random::<u64>()));
        let mut out = std::fs::OpenOptions::new().write(true).create_new(true).open(&temp)?;
        temps.0.push(temp.clone());
        out.write_all(&file.data)?;
        out.set_permissions(std::fs::Permissions::from_mode(file.mode & 0o777))?;
        out.set_modified(super::commit::system_time(file.mtime))?;
        Ok(temp)
    }

    /// Renames `temp` over the file's destination, through directory descriptors (no symlink is followed, even one
    /// swapped in meanwhile).
    fn place(&self, file: &SmallFile, temp: &Path) -> Result<PathBuf, Placement> {
        let (target, _dir) = rename_into(&self.root, &file.key, temp, Replace::File).map_err(|e| match e {
            crate::path::PathError::Io { source, .. } => Placement::Failed(source),
            refused => Placement::Refused(refused.to_string()),
        })?;
        Ok(target)
    }
}

/// Temporary files of a batch not yet renamed; removed if the batch stops early (a full disk, say).
struct Temps(Vec<PathBuf>);

impl Temps {
    fn forget(&mut self, temp: &Path) {
        self.0.retain(|t| t != temp);
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
pub(crate) fn whole_file_manifest(file: &SmallFile) -> Manifest {
    let size = file.data.len() as u64;
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

/// Makes the temporary files durable: one `syncfs` of their filesystem, or an `fdatasync` each where that fails.
fn sync_filesystem<'a>(dir: &Path, temps: impl Iterator<Item = &'a Path>) -> Result<(), TransferError> {
    use std::os::fd::AsRawFd;
    let handle = File::open(dir).map_err(TransferError::Storage)?;
    // SAFETY: syncfs only reads the descriptor, which `handle` keeps open for the duration of the call.
    if unsafe { libc::syncfs(handle.as_raw_fd()) } == 0 {
        return Ok(());
    }
    for temp in temps {
        File::open(temp)
            .and_then(|f| f.sync_data())
            .map_err(TransferError::Storage)?;
    }
    Ok(())
}
