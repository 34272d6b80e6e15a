//! A namespace's usage as the bucket records it, for quotas and limits (docs/object-store.md "Quotas, namespaces
//! and limits"): every server's committed files and open transfers, not only this server's.
//!
//! - **Open transfers** (`max_open_transfers`, `max_manifest_bytes`, their bytes for the quota): one LIST of
//!   `open/` per admission, exact across servers up to offers admitted at the same moment. A record's file size
//!   comes from the record itself, read once per key and ETag (records are written once, never changed); its
//!   stored bytes from the LIST.
//! - **Committed files** (bytes and entries): a LIST of `files/` at the first admission and again once the last
//!   scan is [`RESCAN`] old, each manifest object read once per ETag; between scans, the commits of this process
//!   are applied as they happen ([`UsageCache::note_commit`]). A group of servers can therefore overshoot a quota
//!   by what the other servers committed within one rescan interval; a single server is exact.
//!
//! Nothing here is believed without the bucket's word: a lost cache costs requests, never a wrong count beyond the
//! rescan interval.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use object_store::path::Path;
use object_store::ObjectStore;

use super::layout::{self, EntryKind, Layout, ObjectError, PathId};
use crate::manifest::Hash;
use crate::storage::{OpenAtPath, SharedUsage};

/// How old a scan of `files/` may grow before the next admission scans again.
pub const RESCAN: Duration = Duration::from_secs(600);
/// Manifest objects a scan reads at once.
const PARALLEL_GETS: usize = 32;

/// What the bucket said of one object, with the ETag it said it for.
#[derive(Debug, Clone)]
struct Seen<T> {
    e_tag: Option<String>,
    value: T,
}

/// What admission reads of an open record.
#[derive(Debug, Clone, Copy)]
struct RecordFacts {
    manifest_id: Hash,
    size: u64,
}

/// The committed files as last scanned, plus this process's commits since.
#[derive(Debug, Default)]
struct Committed {
    /// When `files/` was last listed.
    scanned: Option<Instant>,
    /// File size by manifest-object key (0 for a directory or a symlink).
    files: HashMap<Path, Seen<u64>>,
}

/// One namespace's usage cache (one per [`super::ObjectVolume`]).
#[derive(Debug, Default)]
pub struct UsageCache {
    committed: Mutex<Committed>,
    /// What the records of open transfers say, by key.
    records: Mutex<HashMap<Path, Seen<RecordFacts>>>,
}

impl UsageCache {
    /// The namespace's usage for the transfer of `manifest_id` to `path`: open transfers from a LIST of `open/`
    /// now; committed files (when `with_committed`) from the last scan, rescanned when older than [`RESCAN`].
    pub async fn usage(
        &self,
        store: &dyn ObjectStore,
        layout: &Layout,
        path: &crate::path::RemotePath,
        manifest_id: &Hash,
        with_committed: bool,
    ) -> Result<SharedUsage, ObjectError> {
        let mut usage = self.open_usage(store, layout, PathId::of(path), manifest_id).await?;
        if with_committed {
            self.rescan_if_old(store, layout).await?;
            let committed = self.committed.lock().expect("usage cache");
            usage.committed_files = committed.files.len() as u64;
            usage.committed_bytes = committed
                .files
                .values()
                .fold(0u64, |sum, s| sum.saturating_add(s.value));
            usage.committed_here = layout
                .file(path)
                .ok()
                .and_then(|key| committed.files.get(&key).map(|s| s.value));
        }
        Ok(usage)
    }

    /// Records this process's commit of a file of `size` bytes at the manifest object `key` (ETag `e_tag`), so
    /// that admissions before the next scan count it.
    pub fn note_commit(&self, key: Path, size: u64, e_tag: Option<String>) {
        let mut committed = self.committed.lock().expect("usage cache");
        committed.files.insert(key, Seen { e_tag, value: size });
    }

    /// Records this process's removal of the manifest object `key` (`--delete`), so that admissions before the
    /// next scan no longer count it.
    pub fn note_removed(&self, key: &Path) {
        self.committed.lock().expect("usage cache").files.remove(key);
    }

    /// Open transfers from one LIST of `open/`; the records at `path` of `manifest_id` are the offered transfer's.
    async fn open_usage(
        &self,
        store: &dyn ObjectStore,
        layout: &Layout,
        path: PathId,
        manifest_id: &Hash,
    ) -> Result<SharedUsage, ObjectError> {
        let listed = layout::list(store, &layout.open()).await?;
        let known = self.records.lock().expect("usage cache").clone();
        let mut fresh = HashMap::with_capacity(listed.len());
        let mut usage = SharedUsage::default();
        for meta in listed {
            let Some((pid, _)) = layout.parse_open_record(&meta.location) else {
                continue; // not a record of ferry's
            };
            let facts = match known.get(&meta.location) {
                Some(seen) if seen.e_tag.is_some() && seen.e_tag == meta.e_tag => seen.value,
                _ => match layout::get_record(store, &meta.location).await? {
                    Some(record) => RecordFacts {
                        manifest_id: record.manifest.id(),
                        size: record.manifest.size,
                    },
                    // Gone since the LIST (committed or expired), or damaged: it holds nothing to count.
                    None => continue,
                },
            };
            usage.open_transfers += 1;
            usage.open_bytes = usage.open_bytes.saturating_add(facts.size);
            usage.manifest_bytes = usage.manifest_bytes.saturating_add(meta.size);
            if pid == path && facts.manifest_id == *manifest_id {
                usage.this_transfer = OpenAtPath {
                    records: usage.this_transfer.records + 1,
                    bytes: usage.this_transfer.bytes.saturating_add(facts.size),
                    manifest_bytes: usage.this_transfer.manifest_bytes.saturating_add(meta.size),
                };
            }
            fresh.insert(
                meta.location,
                Seen {
                    e_tag: meta.e_tag,
                    value: facts,
                },
            );
        }
        *self.records.lock().expect("usage cache") = fresh;
        Ok(usage)
    }

    /// Lists `files/` again if the last scan is older than [`RESCAN`] (or there was none), reading only the
    /// manifest objects whose ETag changed.
    async fn rescan_if_old(&self, store: &dyn ObjectStore, layout: &Layout) -> Result<(), ObjectError> {
        let known = {
            let committed = self.committed.lock().expect("usage cache");
            if committed.scanned.is_some_and(|at| at.elapsed() < RESCAN) {
                return Ok(());
            }
            committed.files.clone()
        };
        let started = Instant::now();
        let listed = layout::list(store, &layout.files()).await?;
        let mut files = HashMap::with_capacity(listed.len());
        let mut unknown = Vec::new();
        for meta in listed {
            match known.get(&meta.location) {
                Some(seen) if seen.e_tag.is_some() && seen.e_tag == meta.e_tag => {
                    files.insert(meta.location, seen.clone());
                }
                _ => unknown.push(meta),
            }
        }
        // The manifest objects not seen before (all of them at the first scan), [`PARALLEL_GETS`] at a time.
        let mut gets = futures_util::stream::iter(unknown)
            .map(|meta| async move {
                let stored = layout::get_entry(store, &meta.location).await?;
                Ok::<_, ObjectError>((meta, stored))
            })
            .buffer_unordered(PARALLEL_GETS);
        while let Some(got) = gets.next().await {
            let (meta, Some(stored)) = got? else {
                continue; // gone since the LIST, or damaged
            };
            let size = match stored.entry.kind {
                EntryKind::File { manifest, .. } => manifest.size,
                EntryKind::Dir { .. } | EntryKind::Symlink { .. } => 0,
            };
            files.insert(
                meta.location,
                Seen {
                    e_tag: meta.e_tag,
                    value: size,
                },
            );
        }
        tracing::debug!(namespace = %layout.namespace(), files = files.len(), "scanned the committed files");
        let mut committed = self.committed.lock().expect("usage cache");
        // A commit of this process noted during the scan is newer than what the scan listed.
        for (key, seen) in committed.files.drain() {
            if !known.contains_key(&key) || known.get(&key).map(|k| &k.e_tag) != Some(&seen.e_tag) {
                files.insert(key, seen);
            }
        }
        committed.files = files;
        committed.scanned = Some(started);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
