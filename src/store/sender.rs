//! Sender state: the manifest cache, the hashing progress of files not cached yet, and one record per push.
//!
//! The cache is keyed by everything that identifies unchanged content without reading it (canonical path, size,
//! mtime, inode, device, effective chunking), so re-running a push does not rehash an unchanged file. A cached manifest is
//! still only a claim: the sender re-hashes every chunk it reads for sending and drops the cache entry on a mismatch.
//!
//! A file whose hashing was cut (the sender killed before its manifest was cached) leaves its progress under the
//! same key: the chunks hashed so far, appended in segments (so recording is not quadratic in the file's size), and
//! the whole-file BLAKE3 state at their end ([`HashingRecord`]). It is dropped when the manifest is cached, and
//! with the manifests when the source turned out to differ.
//!
//! A tree's small files (below [`SMALL_FILE_MAX`]) are cached apart, one compact record per path holding its key and
//! manifest ([`SenderStore::cached_small`], [`SenderStore::cache_small`]): one `get` to find, one `insert` to
//! replace, where the general cache above reads and rewrites a per-path order and scans for entries to drop on
//! every insert (a tree scan caches thousands). Such a file never has hashing progress (only files of
//! [`crate::source::RECORD_EVERY`] bytes or more record it), and what a small record replaces is the record itself.

use serde::{Deserialize, Serialize};

use super::{get, now_secs, prefixed, Store, StoreError};
use crate::manifest::{ChunkEntry, FileTime, Manifest};
use crate::record::encode_record;

const MANIFEST: &str = "manifest";
const PUSH: &str = "push";
/// Per push (same key as its record): the bytes the receiver last acknowledged as durable. Kept apart from
/// [`PushRecord`] so records written by earlier versions still decode.
const ACKED: &str = "acked";
/// Per source path: the cache keys of its manifests, oldest first.
const CACHE_ORDER: &str = "morder";
/// Per cache key: how far hashing the file got ([`HashingRecord`]).
const HASHING: &str = "hashing";
/// Per cache key and segment number (big-endian u32): a segment of the chunks hashed so far.
const HASHED_SEGMENT: &str = "hashseg";
/// Per source path: the one compact record of a small file of a tree (its [`ManifestKey`] and manifest).
const SMALL: &str = "small";
/// Files of a tree below this size are cached as one compact record per path ([`SenderStore::cache_small`]).
pub const SMALL_FILE_MAX: u64 = 1024 * 1024;
/// Most manifests cached per source file (one per chunking): a server asked for ever new chunk sizes keeps the
/// last few, so its cache stays bounded per file while clients that alternate between a few sizes still hit it.
pub const MAX_CACHED_CHUNKINGS: usize = 4;

/// Identifies a source file's content without reading it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ManifestKey {
    /// Canonical path of the source.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Modification time.
    pub mtime: FileTime,
    /// Inode number.
    pub inode: u64,
    /// Device number.
    pub device: u64,
    /// The chunking the request comes to for this file (two requests that clamp to the same parameters share an
    /// entry).
    pub chunking: crate::manifest::Chunking,
}

/// How far hashing a file got, recorded as it goes: the chunks `[0, end)` are in `segments` segments, and `digest`
/// is the whole-file BLAKE3 state of the bytes `[0, digest_len)` (`digest_len <= end`).
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct HashingRecord {
    /// End of the last recorded chunk.
    pub end: u64,
    /// Chunks recorded, over all segments.
    pub chunks: u64,
    /// Segments recorded (numbered from 0).
    pub segments: u32,
    /// Bytes the digest state covers (a multiple of 1 KiB).
    pub digest_len: u64,
    /// The digest state: chaining values of complete BLAKE3 subtrees, bottom of the stack first.
    pub digest_stack: Vec<[u8; 32]>,
}

/// Where a push stands.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushState {
    /// Started, not finished.
    InProgress,
    /// Gave up with an error.
    Failed,
    /// Committed on the server.
    Done,
}

/// One push, for `ferry status` and for cron jobs to inspect.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct PushRecord {
    /// Canonical source path.
    pub source: String,
    /// `ferry://host:port/path`.
    pub destination: String,
    /// Current state.
    pub state: PushState,
    /// File size.
    pub size: u64,
    /// Chunk bytes sent over all runs.
    pub bytes_sent: u64,
    /// The last error, if the push failed.
    pub last_error: Option<String>,
    /// When the push was first started (Unix seconds).
    pub started: u64,
    /// Last update (Unix seconds).
    pub updated: u64,
}

/// Typed access to the sender's records.
#[derive(Clone)]
pub struct SenderStore {
    store: Store,
    tree: sled::Tree,
}

impl SenderStore {
    /// Opens the sender's tree in `store`.
    pub fn open(store: &Store) -> Result<SenderStore, StoreError> {
        Ok(SenderStore {
            store: store.clone(),
            tree: store.tree("sender")?,
        })
    }

    /// The cached manifest for `key`, if any.
    pub fn cached_manifest(&self, key: &ManifestKey) -> Result<Option<Manifest>, StoreError> {
        get(&self.tree, &prefixed(MANIFEST, &encode_record(key)))
    }

    /// Caches `manifest` under `key`. Entries of the same path for other content (the file changed) are dropped;
    /// of those for the same content with other chunkings the newest [`MAX_CACHED_CHUNKINGS`] stay. Flushes if
    /// `flush` (a tree scan flushes once at the end instead: the cache is only an optimisation).
    pub fn cache_manifest(&self, key: &ManifestKey, manifest: &Manifest, flush: bool) -> Result<(), StoreError> {
        let path = encode_record(&key.path);
        let order_key = prefixed(CACHE_ORDER, &path);
        // The order is only an optimisation too: an unreadable one starts afresh.
        let mut order: Vec<Vec<u8>> = get(&self.tree, &order_key).ok().flatten().unwrap_or_default();
        let new = encode_record(key);
        order.retain(|old| {
            *old != new && crate::record::decode_record::<ManifestKey>(old).is_ok_and(|old| same_content(&old, key))
        });
        order.push(new.clone());
        let evict = order.len().saturating_sub(MAX_CACHED_CHUNKINGS);
        order.drain(..evict);
        for entry in self.tree.scan_prefix(prefixed(MANIFEST, &path)) {
            let (cached, _) = entry?;
            if !order.iter().any(|kept| *kept == cached[MANIFEST.len() + 1..]) {
                self.tree.remove(cached)?;
            }
        }
        self.tree.insert(prefixed(MANIFEST, &new), encode_record(manifest))?;
        self.tree.insert(order_key, encode_record(&order))?;
        // Hashed through: the progress of its hashing is of no more use.
        self.forget_hashing(&key.path)?;
        if flush {
            self.store.flush()?;
        }
        Ok(())
    }

    /// The manifest of the small file `key` describes, from its compact record ([`SenderStore::cache_small`]), if
    /// that record has the same key. An unreadable record is a miss (the cache is only an optimisation).
    pub fn cached_small(&self, key: &ManifestKey) -> Result<Option<Manifest>, StoreError> {
        let Some(bytes) = self.tree.get(prefixed(SMALL, &encode_record(&key.path)))? else {
            return Ok(None);
        };
        Ok(crate::record::decode_record::<(ManifestKey, Manifest)>(&bytes)
            .ok()
            .filter(|(cached, _)| cached == key)
            .map(|(_, manifest)| manifest))
    }

    /// Caches the manifest of a small file of a tree as its path's one compact record, replacing what the path had
    /// there (one `insert`; does not flush: a tree scan flushes once at the end). Entries of the path in the
    /// general cache are left for [`SenderStore::forget_manifests`] and [`SenderStore::prune`].
    pub fn cache_small(&self, key: &ManifestKey, manifest: &Manifest) -> Result<(), StoreError> {
        self.tree.insert(
            prefixed(SMALL, &encode_record(&key.path)),
            encode_record(&(key, manifest)),
        )?;
        Ok(())
    }

    /// The hashing progress recorded for `key`, if any.
    pub fn hashing(&self, key: &ManifestKey) -> Result<Option<HashingRecord>, StoreError> {
        get(&self.tree, &prefixed(HASHING, &encode_record(key)))
    }

    /// Segment `index` of the chunks recorded for `key`, if there is one.
    pub fn hashed_segment(&self, key: &ManifestKey, index: u32) -> Result<Option<Vec<ChunkEntry>>, StoreError> {
        get(&self.tree, &segment_key(key, index))
    }

    /// Records hashing progress for `key`: `segment` (the chunks after those already recorded) as segment
    /// `record.segments - 1`, then `record`, and flushes. A first segment drops any other progress of the path.
    pub fn record_hashing(
        &self,
        key: &ManifestKey,
        segment: &[ChunkEntry],
        record: &HashingRecord,
    ) -> Result<(), StoreError> {
        let index = record.segments.saturating_sub(1);
        if index == 0 {
            self.forget_hashing(&key.path)?;
        }
        self.tree.insert(segment_key(key, index), encode_record(&segment))?;
        self.tree
            .insert(prefixed(HASHING, &encode_record(key)), encode_record(record))?;
        self.store.flush()
    }

    /// Drops every hashing progress record of `path` (does not flush).
    pub fn forget_hashing(&self, path: &str) -> Result<(), StoreError> {
        let path = encode_record(&path.to_string());
        for prefix in [HASHING, HASHED_SEGMENT] {
            for entry in self.tree.scan_prefix(prefixed(prefix, &path)) {
                let (key, _) = entry?;
                self.tree.remove(key)?;
            }
        }
        Ok(())
    }

    /// Flushes everything written so far.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.store.flush()
    }

    /// Drops every cached manifest and hashing progress record of `path` (the source turned out to differ from its
    /// cache entry, or the digest hashed from a record was wrong): the next manifest is hashed from scratch.
    pub fn forget_manifests(&self, path: &str) -> Result<(), StoreError> {
        self.forget_hashing(path)?;
        // The key starts with the encoded path (u64 length + bytes), so a prefix scan finds every entry of it.
        let path = encode_record(&path.to_string());
        for entry in self.tree.scan_prefix(prefixed(MANIFEST, &path)) {
            let (key, _) = entry?;
            self.tree.remove(key)?;
        }
        self.tree.remove(prefixed(CACHE_ORDER, &path))?;
        self.tree.remove(prefixed(SMALL, &path))?;
        Ok(())
    }

    /// The record of the push of `source` to `destination`, if any.
    pub fn push_record(&self, source: &str, destination: &str) -> Result<Option<PushRecord>, StoreError> {
        get(&self.tree, &push_key(source, destination))
    }

    /// Every push record, ordered by destination and then source (for `ferry status`).
    pub fn push_records(&self) -> Result<Vec<PushRecord>, StoreError> {
        let prefix = prefixed(PUSH, b"");
        let mut records = Vec::new();
        for entry in self.tree.scan_prefix(&prefix) {
            let (key, value) = entry?;
            records.push(super::decode(&key, &value)?);
        }
        Ok(records)
    }

    /// What the receiver last acknowledged as durable for the push of `source` to `destination` (its own bytes
    /// plus what it held before), as recorded while the push ran; `None` if never recorded.
    pub fn acked(&self, source: &str, destination: &str) -> Result<Option<u64>, StoreError> {
        get(&self.tree, &acked_key(source, destination))
    }

    /// Records that the receiver holds `bytes` of the push of `source` to `destination` durably, and flushes: a
    /// push killed right after still shows what the receiver acknowledged.
    pub fn save_acked(&self, source: &str, destination: &str, bytes: u64) -> Result<(), StoreError> {
        self.tree
            .insert(acked_key(source, destination), encode_record(&bytes))?;
        self.store.flush()
    }

    /// Stores a push record (stamping its update time) and flushes.
    pub fn save_push(&self, record: &PushRecord) -> Result<(), StoreError> {
        let mut record = record.clone();
        record.updated = now_secs();
        self.tree
            .insert(push_key(&record.source, &record.destination), encode_record(&record))?;
        self.store.flush()
    }
}

/// What [`SenderStore::prune`] removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Pruned {
    /// Finished (done or failed) push records not updated for the given age.
    pub records_removed: u64,
    /// Cached manifests of source files that are gone or no longer match (size, mtime, inode or device).
    pub manifests_removed: u64,
}

impl SenderStore {
    /// Removes push records that ended (done or failed) more than `older_than` seconds before `now`, and cached
    /// manifests that can never be used again because their source file is gone or changed; flushes. Interrupted
    /// pushes are kept (the next run resumes them). Blocking (one `stat` per cached manifest).
    pub fn prune(&self, older_than: u64, now: u64) -> Result<Pruned, StoreError> {
        let mut pruned = Pruned::default();
        for record in self.push_records()? {
            let ended = record.state != PushState::InProgress;
            if ended && record.updated.saturating_add(older_than) <= now {
                self.tree.remove(push_key(&record.source, &record.destination))?;
                self.tree.remove(acked_key(&record.source, &record.destination))?;
                pruned.records_removed += 1;
            }
        }
        for entry in self.tree.scan_prefix(prefixed(MANIFEST, b"")) {
            let (key, _) = entry?;
            let encoded = &key[MANIFEST.len() + 1..];
            let stale = match crate::record::decode_record::<ManifestKey>(encoded) {
                Ok(manifest_key) => !still_matches(&manifest_key),
                Err(_) => true, // unreadable: it can never be found again either
            };
            if stale {
                self.tree.remove(key)?;
                pruned.manifests_removed += 1;
            }
        }
        for entry in self.tree.scan_prefix(prefixed(SMALL, b"")) {
            let (key, value) = entry?;
            let stale = match crate::record::decode_record::<(ManifestKey, Manifest)>(&value) {
                Ok((small_key, _)) => !still_matches(&small_key),
                Err(_) => true,
            };
            if stale {
                self.tree.remove(key)?;
                pruned.manifests_removed += 1;
            }
        }
        // Hashing progress of files that are gone or changed: of no use either (counted with the manifests).
        let mut stale_hashing = Vec::new();
        for entry in self.tree.scan_prefix(prefixed(HASHING, b"")) {
            let (key, _) = entry?;
            match crate::record::decode_record::<ManifestKey>(&key[HASHING.len() + 1..]) {
                Ok(hashing_key) if still_matches(&hashing_key) => {}
                Ok(hashing_key) => stale_hashing.push(hashing_key.path),
                Err(_) => {
                    self.tree.remove(key)?;
                }
            }
        }
        for path in stale_hashing {
            self.forget_hashing(&path)?;
            pruned.manifests_removed += 1;
        }
        self.store.flush()?;
        Ok(pruned)
    }
}

/// Whether two cache keys describe the same content of the same file (their chunkings may differ).
fn same_content(a: &ManifestKey, b: &ManifestKey) -> bool {
    (a.path.as_str(), a.size, a.mtime, a.inode, a.device) == (b.path.as_str(), b.size, b.mtime, b.inode, b.device)
}

/// Whether the file a cache entry describes is still there, unchanged as far as the cache can tell.
fn still_matches(key: &ManifestKey) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(&key.path).is_ok_and(|meta| {
        meta.len() == key.size
            && crate::chunk::mtime_of(&meta) == key.mtime
            && meta.ino() == key.inode
            && meta.dev() == key.device
    })
}

fn segment_key(key: &ManifestKey, index: u32) -> Vec<u8> {
    let mut encoded = encode_record(key);
    encoded.extend_from_slice(&index.to_be_bytes());
    prefixed(HASHED_SEGMENT, &encoded)
}

fn push_key(source: &str, destination: &str) -> Vec<u8> {
    prefixed(PUSH, format!("{destination}\0{source}").as_bytes())
}

fn acked_key(source: &str, destination: &str) -> Vec<u8> {
    prefixed(ACKED, format!("{destination}\0{source}").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(source: &str, destination: &str, state: PushState) -> PushRecord {
        PushRecord {
            source: source.into(),
            destination: destination.into(),
            state,
            size: 10,
            bytes_sent: 4,
            last_error: (state == PushState::Failed).then(|| "gave up".into()),
            started: 1,
            updated: 1,
        }
    }

    #[test]
    fn push_records_list_every_push_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = SenderStore::open(&Store::open(dir.path()).unwrap()).unwrap();
        assert!(store.push_records().unwrap().is_empty());
        store
            .save_push(&record("/a", "ferry://h:1/a", PushState::Done))
            .unwrap();
        store
            .save_push(&record("/b", "ferry://h:1/b", PushState::InProgress))
            .unwrap();
        store
            .save_push(&record("/b", "ferry://h:1/b", PushState::Failed))
            .unwrap();
        let listed = store.push_records().unwrap();
        let states: Vec<_> = listed.iter().map(|r| (r.source.as_str(), r.state)).collect();
        assert_eq!(states, [("/a", PushState::Done), ("/b", PushState::Failed)]);
        assert!(listed[1].updated >= listed[1].started, "saving stamps the update time");
    }

    #[test]
    fn prune_drops_old_finished_records_and_manifests_of_gone_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = SenderStore::open(&Store::open(&dir.path().join("state")).unwrap()).unwrap();
        for (source, state, updated) in [
            ("/a", PushState::Done, 100),
            ("/b", PushState::Failed, 100),
            ("/c", PushState::InProgress, 100),
            ("/d", PushState::Done, 950),
        ] {
            let mut rec = record(source, "ferry://h/x", state);
            rec.updated = updated;
            store
                .tree
                .insert(push_key(&rec.source, &rec.destination), encode_record(&rec))
                .unwrap();
        }
        let kept = dir.path().join("kept.bin");
        std::fs::write(&kept, b"still here").unwrap();
        let meta = std::fs::metadata(&kept).unwrap();
        let manifest = crate::chunk::build_manifest(
            &std::fs::File::open(&kept).unwrap(),
            &kept,
            crate::chunk::ChunkSpec {
                mode: crate::chunk::ChunkingMode::Fixed,
                size: 4096,
            },
        )
        .unwrap();
        let key = |path: &std::path::Path| ManifestKey {
            path: path.display().to_string(),
            size: meta.len(),
            mtime: crate::chunk::mtime_of(&meta),
            inode: std::os::unix::fs::MetadataExt::ino(&meta),
            device: std::os::unix::fs::MetadataExt::dev(&meta),
            chunking: manifest.chunking,
        };
        store.cache_manifest(&key(&kept), &manifest, false).unwrap();
        store
            .cache_manifest(&key(&dir.path().join("gone.bin")), &manifest, false)
            .unwrap();

        let pruned = store.prune(500, 1000).unwrap();
        assert_eq!(
            pruned,
            Pruned {
                records_removed: 2,
                manifests_removed: 1
            }
        );
        let left: Vec<_> = store.push_records().unwrap().into_iter().map(|r| r.source).collect();
        assert_eq!(left, ["/c", "/d"], "interrupted and recent records stay");
        assert!(
            store.cached_manifest(&key(&kept)).unwrap().is_some(),
            "a live file keeps its manifest"
        );
    }

    /// A server asked for one chunking after another keeps the newest few manifests of the file, not one per
    /// chunking ever asked for; a changed file drops them all.
    #[test]
    fn the_manifest_cache_keeps_the_last_chunkings_of_a_file() {
        use crate::manifest::tests::manifest_of;
        use crate::manifest::Chunking;
        let dir = tempfile::tempdir().unwrap();
        let store = SenderStore::open(&Store::open(&dir.path().join("state")).unwrap()).unwrap();
        let key = |size: u32, mtime: i64| ManifestKey {
            path: "/data/big".into(),
            size: 10,
            mtime: FileTime { secs: mtime, nanos: 0 },
            inode: 1,
            device: 2,
            chunking: Chunking::Fixed { size },
        };
        let other_file = ManifestKey {
            path: "/data/big2".into(),
            ..key(4096, 1)
        };
        store.cache_manifest(&other_file, &manifest_of(&[10]), true).unwrap();
        let sizes: Vec<u32> = (0..20).map(|i| 4096 + i).collect();
        for &size in &sizes {
            store.cache_manifest(&key(size, 1), &manifest_of(&[10]), true).unwrap();
        }
        let cached: Vec<u32> = sizes
            .iter()
            .copied()
            .filter(|&size| store.cached_manifest(&key(size, 1)).unwrap().is_some())
            .collect();
        assert_eq!(
            cached,
            sizes[sizes.len() - MAX_CACHED_CHUNKINGS..].to_vec(),
            "the newest ones"
        );
        let entries = store.tree.scan_prefix(prefixed(MANIFEST, b"")).count();
        assert_eq!(
            entries,
            MAX_CACHED_CHUNKINGS + 1,
            "bounded per file; the other file keeps its own"
        );
        // Asking again for a cached chunking does not grow the cache.
        store
            .cache_manifest(&key(4096 + 19, 1), &manifest_of(&[10]), true)
            .unwrap();
        assert_eq!(
            store.tree.scan_prefix(prefixed(MANIFEST, b"")).count(),
            MAX_CACHED_CHUNKINGS + 1
        );
        // The file changed: its older manifests go.
        store.cache_manifest(&key(4096, 2), &manifest_of(&[10]), true).unwrap();
        assert!(store.cached_manifest(&key(4096 + 19, 1)).unwrap().is_none());
        assert_eq!(store.tree.scan_prefix(prefixed(MANIFEST, b"")).count(), 2);
        assert!(store.cached_manifest(&other_file).unwrap().is_some());
    }

    /// A small file's compact record is found only under its exact key, replaced by the next one of its path, and
    /// dropped with the path's manifests and by prune once its file is gone; an unreadable one is a miss.
    #[test]
    fn a_small_files_record_is_one_per_path_and_dropped_like_a_manifest() {
        use crate::manifest::tests::manifest_of;
        use crate::manifest::Chunking;
        let dir = tempfile::tempdir().unwrap();
        let store = SenderStore::open(&Store::open(&dir.path().join("state")).unwrap()).unwrap();
        let key = |path: &str, mtime: i64| ManifestKey {
            path: path.into(),
            size: 10,
            mtime: FileTime { secs: mtime, nanos: 0 },
            inode: 1,
            device: 2,
            chunking: Chunking::Fixed { size: 4096 },
        };
        store.cache_small(&key("/t/a", 1), &manifest_of(&[10])).unwrap();
        assert_eq!(store.cached_small(&key("/t/a", 1)).unwrap(), Some(manifest_of(&[10])));
        assert_eq!(store.cached_small(&key("/t/a", 2)).unwrap(), None, "another mtime");
        assert_eq!(store.cached_small(&key("/t/b", 1)).unwrap(), None, "another path");
        assert_eq!(
            store.cached_manifest(&key("/t/a", 1)).unwrap(),
            None,
            "not in the general cache"
        );
        store.cache_small(&key("/t/a", 2), &manifest_of(&[10])).unwrap();
        assert_eq!(store.cached_small(&key("/t/a", 1)).unwrap(), None, "replaced");
        assert_eq!(store.tree.scan_prefix(prefixed(SMALL, b"")).count(), 1);
        store.forget_manifests("/t/a").unwrap();
        assert_eq!(store.cached_small(&key("/t/a", 2)).unwrap(), None, "forgotten");

        let path = encode_record(&"/t/c".to_string());
        store.tree.insert(prefixed(SMALL, &path), b"junk".to_vec()).unwrap();
        assert_eq!(store.cached_small(&key("/t/c", 1)).unwrap(), None, "unreadable: a miss");
        store.cache_small(&key("/gone/d", 1), &manifest_of(&[10])).unwrap();
        assert_eq!(
            store.prune(0, 0).unwrap().manifests_removed,
            2,
            "the junk and the gone file's"
        );
        assert_eq!(store.tree.scan_prefix(prefixed(SMALL, b"")).count(), 0);
    }

    /// Hashing progress is appended segment by segment, read back as recorded, replaced when the same path starts
    /// again from the first segment, and dropped when the manifest is cached, with the manifests, and by prune
    /// once its file is gone.
    #[test]
    fn hashing_progress_is_appended_and_dropped_when_no_longer_of_use() {
        use crate::manifest::tests::manifest_of;
        use crate::manifest::Chunking;
        let dir = tempfile::tempdir().unwrap();
        let store = SenderStore::open(&Store::open(&dir.path().join("state")).unwrap()).unwrap();
        let key = |path: &str| ManifestKey {
            path: path.into(),
            size: 1 << 20,
            mtime: FileTime { secs: 1, nanos: 0 },
            inode: 1,
            device: 2,
            chunking: Chunking::Fixed { size: 4096 },
        };
        let chunk = |i: u64| ChunkEntry {
            offset: i * 4096,
            len: 4096,
            hash: [i as u8; 32],
        };
        let record = |segments: u32, chunks: u64| HashingRecord {
            end: chunks * 4096,
            chunks,
            segments,
            digest_len: chunks * 4096 - 1024,
            digest_stack: vec![[7; 32]],
        };
        let big = key("/gone/big");
        store
            .record_hashing(&big, &[chunk(0), chunk(1)], &record(1, 2))
            .unwrap();
        store.record_hashing(&big, &[chunk(2)], &record(2, 3)).unwrap();
        assert_eq!(store.hashing(&big).unwrap(), Some(record(2, 3)));
        assert_eq!(store.hashed_segment(&big, 0).unwrap(), Some(vec![chunk(0), chunk(1)]));
        assert_eq!(store.hashed_segment(&big, 1).unwrap(), Some(vec![chunk(2)]));
        // Starting again (another content of the path) drops the old segments.
        let changed = ManifestKey {
            mtime: FileTime { secs: 2, nanos: 0 },
            ..big.clone()
        };
        store.record_hashing(&changed, &[chunk(0)], &record(1, 1)).unwrap();
        assert_eq!(store.hashing(&big).unwrap(), None);
        assert_eq!(store.hashed_segment(&big, 1).unwrap(), None);
        // Cached: of no more use.
        store.cache_manifest(&changed, &manifest_of(&[10]), true).unwrap();
        assert_eq!(store.hashing(&changed).unwrap(), None);
        assert_eq!(store.hashed_segment(&changed, 0).unwrap(), None);
        // Dropped with the manifests, and by prune once the file is gone.
        store.record_hashing(&big, &[chunk(0)], &record(1, 1)).unwrap();
        store.forget_manifests(&big.path).unwrap();
        assert_eq!(store.hashing(&big).unwrap(), None);
        store.record_hashing(&big, &[chunk(0)], &record(1, 1)).unwrap();
        assert_eq!(
            store.prune(0, 0).unwrap().manifests_removed,
            1,
            "the record (its manifest went with forget_manifests)"
        );
        assert_eq!(store.hashing(&big).unwrap(), None);
        assert_eq!(store.tree.scan_prefix(prefixed(HASHED_SEGMENT, b"")).count(), 0);
    }
}
