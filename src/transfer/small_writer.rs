//! The receiver's pipeline for the small files of a tree, on two blocking threads, batch by batch: verify → stage
//! each through the [`TreeVolume`] (one thread) → settle the group (on a local disk: one `syncfs`, rename each into
//! place, sync the directories) → record the batch in sled (one flush) → TreeAck (the other thread, one batch
//! behind).
//!
//! Batching the sync and the store flush is what lets 10,000 small files cost a few hundred syncs instead of
//! 30,000. The crash-safety order is that of a single file (proto-spec.md, "Crash safety"): a final name only ever
//! holds verified, synced bytes; the record follows the rename; the Ack follows the record. Temporary names are
//! unique, so two sessions writing the same path never share a temporary file: the last rename wins, whole.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::TransferError;
use crate::manifest::{ChunkEntry, Chunking, FileTime, Hash, Manifest};
use crate::path::RemotePath;
use crate::server::ReceiverStats;
use crate::storage::{Staged, TreeVolume};
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

/// Commits small files through a tree volume.
#[derive(Clone)]
pub(crate) struct SmallWriter {
    pub(crate) volume: Arc<dyn TreeVolume>,
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

    /// Verifies each file and stages it; the bytes (and their share of the queue budget) are let go.
    fn write_batch(&self, batch: Vec<SmallFile>) -> Result<Written, TransferError> {
        let mut written = Written {
            outcome: BatchOutcome::default(),
            files: Vec::with_capacity(batch.len()),
            temps: Temps {
                volume: self.volume.clone(),
                staged: Vec::with_capacity(batch.len()),
            },
        };
        for mut file in batch {
            if *blake3::hash(&file.data).as_bytes() != file.digest {
                written.outcome.rejected.push(file.index);
                continue;
            }
            let staged = self
                .volume
                .stage(&file.key, &file.data, file.mode, file.mtime)
                .map_err(TransferError::Storage)?;
            written.temps.staged.push(staged.clone());
            let len = file.data.len() as u64;
            file.data = Vec::new();
            file._budget = None;
            written.files.push((file, len, staged));
        }
        Ok(written)
    }

    /// Settles a written batch through the volume (durable, placed, names durable) and records it.
    fn settle_batch(&self, written: Written) -> Result<BatchOutcome, TransferError> {
        let Written {
            mut outcome,
            files,
            mut temps,
        } = written;
        if files.is_empty() {
            return Ok(outcome);
        }
        // From here the volume owns the staged files: it removes whatever it does not place.
        temps.staged.clear();
        let keys = files
            .iter()
            .map(|(file, _, staged)| (file.key.clone(), staged.clone()))
            .collect();
        let settled = self.volume.settle(keys).map_err(TransferError::Storage)?;
        let mut placed = Vec::with_capacity(files.len());
        for ((file, len, _), result) in files.into_iter().zip(settled) {
            match result {
                Ok(identity) => placed.push((file, len, identity)),
                Err(why) => outcome.refused.push((file.index, why)),
            }
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
        for (file, len, identity) in &placed {
            let manifest = whole_file_manifest(file, *len);
            let record = CommittedFile {
                manifest_id: manifest.id(),
                size: manifest.size,
                digest: file.digest,
                mtime: identity.mtime,
                inode: identity.ino,
                committed_at: now_secs(),
            };
            self.store
                .commit_into(&mut records, file.key.as_str(), &record, &manifest)?;
        }
        self.store.apply(records)?;
        for partial in replaced {
            self.volume.remove_partial(&partial);
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
}

/// A batch verified and staged, waiting to be settled: each file (its bytes let go), its length, and where it is
/// staged.
struct Written {
    outcome: BatchOutcome,
    files: Vec<(SmallFile, u64, Staged)>,
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

/// Staged files of a batch not yet handed to the volume's settle; discarded if the batch stops early (a full
/// disk, say).
struct Temps {
    volume: Arc<dyn TreeVolume>,
    staged: Vec<Staged>,
}

impl Temps {
    fn absorb(&mut self, mut other: Temps) {
        self.staged.append(&mut other.staged);
    }
}

impl Drop for Temps {
    fn drop(&mut self) {
        for staged in &self.staged {
            self.volume.discard(staged);
        }
    }
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
