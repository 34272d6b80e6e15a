//! The receiver's pipeline for the small files of a tree, on two blocking threads, batch by batch: verify → stage
//! each through the [`TreeVolume`] (one thread) → settle the group (on a local disk: one `syncfs`, rename each into
//! place) → make the names durable (the next group's `syncfs` when one is already written, else a sync of the
//! directories renamed into) → record the group in sled (one flush) → TreeAck (the other thread, one batch or
//! two behind).
//!
//! Batching the sync and the store flush is what lets 10,000 small files cost a few hundred syncs instead of
//! 30,000. The crash-safety order is that of a single file (proto-spec.md, "Crash safety"): a final name only ever
//! holds verified, synced bytes; the record follows the rename; the Ack follows the record. Temporary names are
//! unique, so two sessions writing the same path never share a temporary file: the last rename wins, whole.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::ReceiverStats;
use super::TransferError;
use crate::manifest::{ChunkEntry, Chunking, FileTime, Hash, Manifest};
use crate::path::RemotePath;
use crate::storage::{Identity, PendingNames, Staged, TreeVolume};
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
            let settler = scope.spawn(move || this.settle_all(&written_rx, events));
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

    /// The settling thread: groups of written batches, each settled with its names left to the next group's data
    /// sync while another group is already written (one flush per group), recorded and reported once its names are
    /// durable; when nothing is waiting, the names are synced at once so the sender's window never waits on a
    /// group that is not coming.
    fn settle_all(
        &self,
        written: &std::sync::mpsc::Receiver<Result<Written, TransferError>>,
        events: &mpsc::UnboundedSender<Result<BatchOutcome, TransferError>>,
    ) {
        use std::sync::mpsc::TryRecvError;
        // A group placed, its names not yet durable: recorded and reported after the next sync.
        let mut placed: Option<(Placed, PendingNames)> = None;
        loop {
            let next = match (&placed, written.try_recv()) {
                (_, Ok(next)) => Some(next),
                (Some(_), Err(_)) => None,
                (None, Err(TryRecvError::Empty)) => match written.recv() {
                    Ok(next) => Some(next),
                    Err(_) => return,
                },
                (None, Err(TryRecvError::Disconnected)) => return,
            };
            let (outcome, failure) = match next {
                // Nothing written meanwhile: make the placed group's names durable now, then record it.
                None => {
                    let (group, names) = placed.take().expect("a placed group");
                    let outcome = self
                        .volume
                        .sync_names(names)
                        .map_err(TransferError::Storage)
                        .and_then(|()| self.record(group));
                    (outcome, None)
                }
                Some(first) => {
                    let (group, failure) = group_commit(first, written);
                    let earlier = placed.take();
                    let (earlier_group, earlier_names) = match earlier {
                        Some((group, names)) => (Some(group), names),
                        None => (None, PendingNames::default()),
                    };
                    match group.and_then(|group| self.place(group, earlier_names)) {
                        // This group's sync made the earlier group's names durable: that one is reported now.
                        Ok((group, names)) => {
                            placed = Some((group, names));
                            match earlier_group {
                                Some(earlier) => (self.record(earlier), failure),
                                None => match failure {
                                    Some(e) => (Err(e), None),
                                    None => continue,
                                },
                            }
                        }
                        Err(e) => (Err(e), failure),
                    }
                }
            };
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
        let (placed, names) = self.place(written, PendingNames::default())?;
        self.volume.sync_names(names).map_err(TransferError::Storage)?;
        self.record(placed)
    }

    /// Makes a written batch's files durable and places them (and makes `earlier`'s names durable); their own
    /// names are returned pending.
    fn place(&self, written: Written, earlier: PendingNames) -> Result<(Placed, PendingNames), TransferError> {
        let Written {
            outcome,
            files,
            mut temps,
        } = written;
        if files.is_empty() {
            self.volume.sync_names(earlier).map_err(TransferError::Storage)?;
            return Ok((
                Placed {
                    outcome,
                    placed: Vec::new(),
                },
                PendingNames::default(),
            ));
        }
        // From here the volume owns the staged files: it removes whatever it does not place.
        temps.staged.clear();
        let keys = files
            .iter()
            .map(|(file, _, staged)| (file.key.clone(), staged.clone()))
            .collect();
        let (settled, names) = self
            .volume
            .settle_deferring_names(keys, earlier)
            .map_err(TransferError::Storage)?;
        let mut placed = Placed {
            outcome,
            placed: Vec::with_capacity(files.len()),
        };
        for ((file, len, _), result) in files.into_iter().zip(settled) {
            match result {
                Ok(identity) => placed.placed.push((file, len, identity)),
                Err(why) => placed.outcome.refused.push((file.index, why)),
            }
        }
        Ok((placed, names))
    }

    /// Records a placed batch whose names are durable, and says what it did.
    fn record(&self, placed: Placed) -> Result<BatchOutcome, TransferError> {
        let Placed { mut outcome, placed } = placed;
        if placed.is_empty() {
            return Ok(outcome);
        }
        // A file committed whole over an open transfer replaces it: its records go in the batch, its partial
        // after the batch (it no longer counts against the quota, so it must not stay on disk).
        // Only those have transfer records for the batch to remove.
        let mut replaced = Vec::new();
        let mut open = Vec::with_capacity(placed.len());
        for (file, _, _) in &placed {
            let summary = self.store.summary(file.key.as_str())?;
            open.push(summary.is_some());
            if let Some(summary) = summary {
                replaced.push(summary.partial);
            }
        }
        let mut records = crate::store::RecordBatch::default();
        for ((file, len, identity), open) in placed.iter().zip(open) {
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
                .commit_into(&mut records, file.key.as_str(), &record, &manifest, open)?;
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

/// A batch placed under its final names (the refused ones already in its outcome), not yet recorded.
struct Placed {
    outcome: BatchOutcome,
    placed: Vec<(SmallFile, u64, Identity)>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{Settled, TreeVolume};
    use std::sync::Mutex;

    type WrittenSender = std::sync::mpsc::SyncSender<Result<Written, TransferError>>;

    /// A local volume that logs each settle and names sync, and hands the settler its second batch during the
    /// first settle (so that one is written while the first group is placed, as on a busy server).
    struct Logged {
        inner: Arc<dyn TreeVolume>,
        store: ReceiverStore,
        log: Mutex<Vec<String>>,
        next: Mutex<Option<(WrittenSender, Written)>>,
    }

    impl std::fmt::Debug for Logged {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Logged")
        }
    }

    impl Logged {
        /// Sends the second batch to the settler (once), and closes its channel.
        fn hand_over_the_next_batch(&self) {
            if let Some((tx, written)) = self.next.lock().unwrap().take() {
                tx.send(Ok(written)).unwrap();
            }
        }
    }

    impl TreeVolume for Logged {
        fn make_dir(&self, key: &RemotePath) -> Result<(), String> {
            self.inner.make_dir(key)
        }
        fn place_symlink(
            &self,
            base: Option<&RemotePath>,
            link: &str,
            key: &RemotePath,
            target: &str,
        ) -> Result<(), String> {
            self.inner.place_symlink(base, link, key, target)
        }
        fn set_dir_metadata(&self, dirs: &[(RemotePath, u32, FileTime)]) {
            self.inner.set_dir_metadata(dirs)
        }
        fn blocked(&self, key: &RemotePath) -> Option<String> {
            self.inner.blocked(key)
        }
        fn unchanged(&self, key: &RemotePath, len: u64, inode: u64, mtime: FileTime) -> bool {
            self.inner.unchanged(key, len, inode, mtime)
        }
        fn read_committed(&self, path: &str, offset: u64, len: usize) -> Option<Vec<u8>> {
            self.inner.read_committed(path, offset, len)
        }
        fn stage(&self, key: &RemotePath, data: &[u8], mode: u32, mtime: FileTime) -> std::io::Result<Staged> {
            self.inner.stage(key, data, mode, mtime)
        }
        fn discard(&self, staged: &Staged) {
            self.inner.discard(staged)
        }
        fn settle(&self, files: Vec<(RemotePath, Staged)>) -> std::io::Result<Vec<Settled>> {
            self.log.lock().unwrap().push(format!("settle {}", files.len()));
            self.hand_over_the_next_batch();
            self.inner.settle(files)
        }
        fn settle_deferring_names(
            &self,
            files: Vec<(RemotePath, Staged)>,
            earlier: PendingNames,
        ) -> std::io::Result<(Vec<Settled>, PendingNames)> {
            let recorded = self.store.committed("d/a").unwrap().is_some();
            let line = format!(
                "deferring {} (earlier {}, a recorded {recorded})",
                files.len(),
                !earlier.is_empty()
            );
            self.log.lock().unwrap().push(line);
            self.hand_over_the_next_batch();
            self.inner.settle_deferring_names(files, earlier)
        }
        fn sync_names(&self, pending: PendingNames) -> std::io::Result<()> {
            self.log
                .lock()
                .unwrap()
                .push(format!("sync names {}", pending.dirs.len()));
            self.inner.sync_names(pending)
        }
        fn remove_partial(&self, location: &str) {
            self.inner.remove_partial(location)
        }
    }

    fn small(index: u32, key: &str, data: &[u8]) -> SmallFile {
        SmallFile {
            index,
            key: RemotePath::parse(key).unwrap(),
            digest: *blake3::hash(data).as_bytes(),
            data: data.to_vec(),
            mtime: FileTime::default(),
            mode: 0o644,
            _budget: None,
        }
    }

    /// Two groups in a row: the second group's settle makes the first one's names durable (one flush per group,
    /// no directory sync between), the first is recorded only after it, and the last group's names are synced
    /// when nothing else is written.
    #[test]
    fn a_group_is_recorded_after_the_next_groups_sync_and_the_last_after_its_names_sync() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let partial_dir = root.join(".ferry/partial");
        std::fs::create_dir_all(&partial_dir).unwrap();
        std::fs::create_dir_all(root.join("d")).unwrap();
        let store = ReceiverStore::open(&crate::store::Store::open(&dir.path().join("state")).unwrap()).unwrap();
        let logged = Arc::new(Logged {
            inner: crate::storage::LocalVolume::shared_tree(root.clone(), partial_dir),
            store: store.clone(),
            log: Mutex::default(),
            next: Mutex::default(),
        });
        let writer = SmallWriter {
            volume: logged.clone(),
            store: store.clone(),
            stats: Arc::default(),
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(WRITTEN_AHEAD);
        tx.send(writer.write_batch(vec![small(0, "d/a", b"first")])).unwrap();
        let second = writer.write_batch(vec![small(1, "d/b", b"second")]).unwrap();
        *logged.next.lock().unwrap() = Some((tx, second));
        let (events_tx, mut events) = mpsc::unbounded_channel();
        writer.settle_all(&rx, &events_tx);
        let log = logged.log.lock().unwrap().clone();
        assert_eq!(
            log,
            [
                "deferring 1 (earlier false, a recorded false)",
                "deferring 1 (earlier true, a recorded false)",
                "sync names 1",
            ]
        );
        let first = events.try_recv().unwrap().unwrap();
        let second = events.try_recv().unwrap().unwrap();
        assert_eq!((first.committed, second.committed), (vec![0], vec![1]));
        assert!(events.try_recv().is_err());
        assert_eq!(std::fs::read(root.join("d/a")).unwrap(), b"first");
        assert_eq!(std::fs::read(root.join("d/b")).unwrap(), b"second");
        assert!(store.committed("d/b").unwrap().is_some());
    }
}
