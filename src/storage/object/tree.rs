//! [`ObjectTrees`]: the tree receiver's [`TreeVolume`] on an object store (docs/object-store.md, "Chunk objects, not
//! packs" and "Manifest objects"), the copy a tree pull sends from, and `--delete` in the bucket.
//!
//! Owns the `files/` objects a tree writes: a small file of at most 64 KiB is committed inline in its manifest
//! object `files/<path>` (one PUT); a larger one as a chunk object plus its manifest object; a directory as a `Dir`
//! object (mode, mtime: empty directories survive), a recorded symlink as a `Symlink` object. `stage` keeps a
//! verified file's bytes in memory; `settle` commits a batch and returns only when every PUT returned 2xx, so the
//! engine's order stays durable, named, recorded, acknowledged. Settling a batch:
//!
//! 1. checks every path: no file or symlink among its parents, no directory or symlink at its name (a path is
//!    never both a file and a directory);
//! 2. when the batch has chunked files, PUTs a batch record `open/<pid>/<tid>` whose manifest names their chunks
//!    (what a gc marking from then on keeps: rule R's basis), then HEADs each chunk: one younger than G/2 is relied
//!    on (rule R (c)), any other is PUT (renewing an orphan);
//! 3. rule C: when a gc overlapped the record, confirms the chunks relied on or PUT still exist; if one is gone
//!    nothing is committed and the batch fails (retryable: the client sends the files again);
//! 4. PUTs the manifest objects (at most `parallel` requests in flight), then deletes the batch record.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::path::Path;
use object_store::ObjectStore;
use tokio::runtime::Handle;

use super::layout::{
    self, EntryKind, EntryObject, Layout, ObjectError, OpenRecord, PathId, ReuseRule, ServerId, TransferId,
    MAX_INLINE_BYTES,
};
use super::usage::UsageCache;
use super::volume::ObjectOptions;
use crate::manifest::{ChunkEntry, Chunking, FileTime, Hash, Manifest};
use crate::path::{link_walk, RemotePath};
use crate::storage::object_gc::{confirm_before_commit, GcSettings, SystemClock};
use crate::storage::tree::{CommittedRead, Pruned, Settled, Staged, StoredFile, TreeCopy, TreeVolume};
use crate::storage::Identity;

mod copy;

/// A verified small file held until its batch is settled.
struct Pending {
    manifest: Manifest,
    data: Bytes,
}

/// The small files, directories and symlinks of trees in one namespace of an object store.
pub struct ObjectTrees {
    handle: Handle,
    store: Arc<dyn ObjectStore>,
    layout: Layout,
    server: ServerId,
    options: ObjectOptions,
    /// Staged files by the id in their [`Staged::location`].
    pending: Mutex<HashMap<u64, Pending>>,
    /// The namespace's usage cache that admission reads (the volume's): told of every entry this process commits
    /// or deletes, so quotas count a tree before the next scan of the bucket.
    usage: Option<Arc<UsageCache>>,
}

impl std::fmt::Debug for ObjectTrees {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectTrees")
            .field("namespace", self.layout.namespace())
            .finish()
    }
}

/// Why a path cannot take an entry (a refusal reported for that entry), or the store failed (the batch fails).
enum Blocked {
    Refused(String),
    Store(ObjectError),
}

impl From<ObjectError> for Blocked {
    fn from(e: ObjectError) -> Self {
        Blocked::Store(e)
    }
}

impl ObjectTrees {
    /// The trees of the namespace `layout` over `store`, driving requests on `handle`'s runtime as server `server`.
    pub fn new(
        handle: Handle,
        store: Arc<dyn ObjectStore>,
        layout: Layout,
        server: ServerId,
        options: ObjectOptions,
    ) -> ObjectTrees {
        ObjectTrees {
            handle,
            store,
            layout,
            server,
            options,
            pending: Mutex::new(HashMap::new()),
            usage: None,
        }
    }

    /// The same, telling `usage` (the volume's admission cache) of every entry it commits or deletes.
    pub fn with_usage(mut self, usage: Arc<UsageCache>) -> ObjectTrees {
        self.usage = Some(usage);
        self
    }

    /// Runs `future` on the runtime; call only from a blocking thread.
    fn block_on<T>(&self, future: impl std::future::Future<Output = Result<T, ObjectError>>) -> io::Result<T> {
        self.handle.block_on(future).map_err(|e| {
            tracing::warn!("{e}");
            io::Error::other(e.to_string())
        })
    }

    /// The committed entry at `path`, if any (a damaged object counts as none).
    async fn entry(&self, path: &RemotePath) -> Result<Option<EntryKind>, ObjectError> {
        let key = self.layout.file(path)?;
        Ok(layout::get_entry(&*self.store, &key).await?.map(|s| s.entry.kind))
    }

    /// PUTs the entry `kind` at `path` (the commit of that entry).
    async fn put_entry(&self, path: &RemotePath, kind: EntryKind, transfer: TransferId) -> Result<(), ObjectError> {
        let key = self.layout.file(path)?;
        let size = match &kind {
            EntryKind::File { manifest, .. } => manifest.size,
            _ => 0,
        };
        layout::put(&*self.store, &key, self.entry_object(kind, transfer).encode().into()).await?;
        if let Some(usage) = &self.usage {
            usage.note_commit(key, size, None);
        }
        Ok(())
    }

    fn entry_object(&self, kind: EntryKind, transfer: TransferId) -> EntryObject {
        let (manifest_id, received_bytes) = match &kind {
            EntryKind::File { manifest, .. } => (manifest.id(), manifest.size),
            _ => ([0; 32], 0),
        };
        EntryObject {
            kind,
            manifest_id,
            committed_at: now_ns(),
            received_bytes,
            reused_bytes: 0,
            rejected_chunks: 0,
            transfer,
            server: self.server,
        }
    }

    /// Refuses `path` when a parent is a file or symlink (`seen` caches parents within a batch), or when a
    /// directory (or, unless `file_or_link`, anything) is at its name: its entry there, if any, is returned.
    async fn check_parents(&self, path: &RemotePath, seen: &mut HashMap<String, bool>) -> Result<(), Blocked> {
        let components: Vec<&str> = path.components().collect();
        for depth in 1..components.len() {
            let parent = components[..depth].join("/");
            let is_dir_or_absent = match seen.get(&parent) {
                Some(&ok) => ok,
                None => {
                    let at = RemotePath::parse(&parent).map_err(|e| Blocked::Refused(e.to_string()))?;
                    let ok = matches!(self.entry(&at).await?, None | Some(EntryKind::Dir { .. }));
                    seen.insert(parent.clone(), ok);
                    ok
                }
            };
            if !is_dir_or_absent {
                return Err(Blocked::Refused(format!("{parent} is not a directory")));
            }
        }
        Ok(())
    }

    /// Why a file cannot be committed at `path`, if it cannot: a non-directory among its parents, a directory or a
    /// symlink at its name.
    async fn file_blocked(&self, path: &RemotePath, seen: &mut HashMap<String, bool>) -> Result<(), Blocked> {
        self.check_parents(path, seen).await?;
        self.name_free(path).await
    }

    /// Refuses a file at `path` when a directory or a symlink is there, or, for a new name, entries below it (a
    /// directory that single-file pushes made, with no `Dir` object of its own).
    async fn name_free(&self, path: &RemotePath) -> Result<(), Blocked> {
        match self.entry(path).await? {
            Some(EntryKind::Dir { .. }) => Err(Blocked::Refused(format!("{path} is a directory"))),
            Some(EntryKind::Symlink { .. }) => Err(Blocked::Refused(format!("{path} is a symlink"))),
            Some(EntryKind::File { .. }) => Ok(()),
            None => {
                let key = self.layout.file(path).map_err(ObjectError::from)?;
                match layout::any_below(&*self.store, &key).await? {
                    true => Err(Blocked::Refused(format!("{path} is a directory"))),
                    false => Ok(()),
                }
            }
        }
    }

    /// Creates the `Dir` objects of `path` and its parents where none is; refused where a file or symlink is.
    async fn make_dirs(&self, path: &RemotePath) -> Result<(), Blocked> {
        let components: Vec<&str> = path.components().collect();
        for depth in 1..=components.len() {
            let at = RemotePath::parse(&components[..depth].join("/")).map_err(|e| Blocked::Refused(e.to_string()))?;
            match self.entry(&at).await? {
                Some(EntryKind::Dir { .. }) => {}
                Some(_) => return Err(Blocked::Refused(format!("{at} is not a directory"))),
                None => {
                    let kind = EntryKind::Dir {
                        mode: 0o755,
                        mtime: file_time(SystemTime::now()),
                    };
                    self.put_entry(&at, kind, TransferId::random()).await?;
                }
            }
        }
        Ok(())
    }

    /// Places a symlink object (see [`TreeVolume::place_symlink`]).
    async fn symlink(&self, tree_dir: &str, link: &str, key: &RemotePath, target: &str) -> Result<(), Blocked> {
        let refuse = |why: String| Err(Blocked::Refused(why));
        if target.is_empty() || target.len() > layout::MAX_LINK_TARGET || target.contains('\0') {
            return refuse(format!("{key} -> {target:?}: not a valid symlink target"));
        }
        let Some(walk) = link_walk(link, target) else {
            return refuse(format!("{key} -> {target:?} leaves the tree"));
        };
        for step in walk {
            let stepped = if tree_dir.is_empty() {
                step.clone()
            } else {
                format!("{tree_dir}/{step}")
            };
            let Ok(at) = RemotePath::parse(&stepped) else { continue };
            if let Some(EntryKind::Symlink { .. }) = self.entry(&at).await? {
                return refuse(format!(
                    "{key} -> {target:?} passes through the existing symlink {step}"
                ));
            }
        }
        self.check_parents(key, &mut HashMap::new()).await?;
        match self.entry(key).await? {
            Some(EntryKind::Dir { .. }) => refuse(format!("{key} is a directory")),
            Some(EntryKind::Symlink { target: existing }) if existing == target => Ok(()),
            _ => {
                let kind = EntryKind::Symlink {
                    target: target.to_string(),
                };
                Ok(self.put_entry(key, kind, TransferId::random()).await?)
            }
        }
    }

    /// Settles a batch (module docs, steps 1–4): one result per file, in order.
    async fn settle_batch(&self, files: Vec<(RemotePath, Option<Pending>)>) -> Result<Vec<Settled>, ObjectError> {
        // Parents once each per batch, in order (few: a batch shares directories); then every name at once.
        let mut seen = HashMap::new();
        let mut parents = Vec::with_capacity(files.len());
        for (key, pending) in &files {
            parents.push(match pending {
                Some(_) => self.check_parents(key, &mut seen).await,
                None => Err(Blocked::Refused(format!("the staged bytes of {key} are gone"))),
            });
        }
        let checks = files.iter().zip(parents).map(|((key, _), parents)| async move {
            parents?;
            self.name_free(key).await
        });
        let checked: Vec<Result<(), Blocked>> = futures_util::stream::iter(checks)
            .buffered(self.options.parallel.max(1))
            .collect()
            .await;
        let mut results: Vec<Settled> = Vec::with_capacity(files.len());
        let mut placing: Vec<(usize, RemotePath, Pending)> = Vec::new();
        for (i, ((key, pending), check)) in files.into_iter().zip(checked).enumerate() {
            match (check, pending) {
                (Ok(()), Some(pending)) => {
                    results.push(Ok(identity_of(&pending.manifest)));
                    placing.push((i, key, pending));
                }
                (Err(Blocked::Store(e)), _) => return Err(e),
                (Err(Blocked::Refused(why)), _) => results.push(Err(why)),
                (Ok(()), None) => results.push(Err(format!("the staged bytes of {key} are gone"))),
            }
        }
        let chunked: Vec<&(usize, RemotePath, Pending)> = placing
            .iter()
            .filter(|(_, _, p)| p.data.len() as u64 > MAX_INLINE_BYTES)
            .collect();
        let record = match chunked.is_empty() {
            true => None,
            false => Some(self.store_chunks(&chunked).await?),
        };
        let transfer = record.as_ref().map_or_else(TransferId::random, |(_, tid)| *tid);
        let puts = placing.into_iter().map(|(_, key, pending)| {
            let inline = (pending.data.len() as u64 <= MAX_INLINE_BYTES)
                .then(|| serde_bytes::ByteBuf::from(pending.data.to_vec()));
            let kind = EntryKind::File {
                manifest: pending.manifest,
                inline,
            };
            async move { self.put_entry(&key, kind, transfer).await }
        });
        let mut puts = futures_util::stream::iter(puts).buffer_unordered(self.options.parallel.max(1));
        while let Some(put) = puts.next().await {
            put?;
        }
        if let Some((pid, tid)) = record {
            if let Err(e) = layout::delete_transfer(&*self.store, &self.layout, pid, tid).await {
                tracing::warn!(error = %e, "a tree batch's record stays until gc expires it");
            }
        }
        Ok(results)
    }

    /// Steps 2 and 3 for the chunked files of a batch: the batch record, a HEAD (and if needed a PUT) per distinct
    /// chunk, rule C. Returns the record's path id and transfer id, to delete it after the commits.
    async fn store_chunks(
        &self,
        chunked: &[&(usize, RemotePath, Pending)],
    ) -> Result<(PathId, TransferId), ObjectError> {
        let (first, tid) = (&chunked[0].1, TransferId::random());
        let pid = PathId::of(first);
        let record = OpenRecord {
            path: first.as_str().to_string(),
            manifest: batch_manifest(chunked.iter().map(|(_, _, p)| &p.manifest)),
            reuse: ReuseRule::Full,
            created: now_ns() / 1_000_000_000,
            server: self.server,
            transfer: tid,
        };
        layout::put(&*self.store, &self.layout.open_record(pid, tid), record.encode().into()).await?;
        let record_created = SystemTime::now();
        let mut distinct = HashSet::new();
        let chunks = chunked
            .iter()
            .filter(|(_, _, p)| distinct.insert(p.manifest.digest))
            .map(|(_, _, p)| self.store_chunk(p.manifest.digest, p.data.clone()));
        let mut relied = Vec::new();
        let mut stored = futures_util::stream::iter(chunks).buffer_unordered(self.options.parallel.max(1));
        while let Some(chunk) = stored.next().await {
            relied.push(chunk?);
        }
        let settings = GcSettings {
            grace: self.options.grace,
            delta: self.options.confirm_wait,
            request_timeout: Duration::ZERO,
            ..GcSettings::default()
        };
        let gone = confirm_before_commit(
            &self.store,
            &self.layout,
            record_created,
            &relied,
            &settings,
            &SystemClock,
        )
        .await
        .map_err(|e| {
            tracing::debug!("rule C failed: {e}");
            ObjectError::Store {
                op: "confirm chunks (rule C) under",
                key: self.layout.namespace().to_string(),
                kind: "gc records unreadable",
            }
        })?;
        if !gone.is_empty() {
            let _ = layout::delete_transfer(&*self.store, &self.layout, pid, tid).await;
            return Err(ObjectError::Store {
                op: "commit a tree batch under",
                key: self.layout.namespace().to_string(),
                kind: "chunks deleted by a concurrent gc; sending them again",
            });
        }
        Ok((pid, tid))
    }

    /// Rule R for one whole-file chunk: relied on when its object exists younger than G/2, else PUT. Returns the
    /// hash and when it was seen or stored, for rule C.
    async fn store_chunk(&self, hash: Hash, data: Bytes) -> Result<(Hash, SystemTime), ObjectError> {
        let key = self.layout.chunk(&hash);
        let young_after = SystemTime::now() - self.options.grace / 2;
        if let Some(meta) = layout::head(&*self.store, &key).await? {
            if SystemTime::from(meta.last_modified) > young_after {
                return Ok((hash, SystemTime::now()));
            }
        }
        layout::put(&*self.store, &key, data).await?;
        Ok((hash, SystemTime::now()))
    }

    /// `len` bytes at `offset` of the committed file at `path`: from its manifest object when inline, else the
    /// chunk of exactly that range (not verified: the caller checks them). Any failure reads as `None`.
    async fn read_one(&self, path: &str, offset: u64, len: usize) -> Option<Vec<u8>> {
        let Ok(Some(EntryKind::File { manifest, inline })) = self.entry(&RemotePath::parse(path).ok()?).await else {
            return None;
        };
        if let Some(bytes) = inline {
            let start = usize::try_from(offset).ok()?;
            return bytes.get(start..start.checked_add(len)?).map(<[u8]>::to_vec);
        }
        let chunk = manifest
            .chunks
            .iter()
            .find(|c| c.offset == offset && c.len as usize == len)?;
        let key = self.layout.chunk(&chunk.hash);
        match layout::get(&*self.store, &key, u64::from(chunk.len)).await {
            Ok(fetched) => Some(fetched?.bytes.to_vec()),
            Err(e) => {
                tracing::warn!("{e}");
                None
            }
        }
    }

    /// The committed file at `path`, if one is there.
    fn stored_manifest(&self, path: &RemotePath) -> Option<(Manifest, Option<serde_bytes::ByteBuf>)> {
        match self.block_on(self.entry(path)).ok()?? {
            EntryKind::File { manifest, inline } => Some((manifest, inline)),
            _ => None,
        }
    }

    /// Every committed entry under the directory `base` (not `base` itself), as (key, path relative to `base`).
    async fn list_under(&self, base: &RemotePath) -> Result<Vec<(Path, String)>, ObjectError> {
        let prefix = self.layout.file(base)?;
        let mut found = Vec::new();
        for meta in layout::list(&*self.store, &prefix).await? {
            let Some(path) = self.layout.parse_file(&meta.location) else {
                continue;
            };
            if let Some(rel) = path
                .as_str()
                .strip_prefix(base.as_str())
                .and_then(|r| r.strip_prefix('/'))
            {
                found.push((meta.location, rel.to_string()));
            }
        }
        found.sort_by(|a, b| a.1.cmp(&b.1));
        Ok(found)
    }

    /// `--delete` in the bucket (see [`TreeVolume::prune_beyond`]).
    async fn prune(&self, base: &RemotePath, held: &dyn Fn(&str) -> Option<bool>) -> Result<Pruned, ObjectError> {
        let mut doomed: Vec<(Path, String)> = self
            .list_under(base)
            .await?
            .into_iter()
            .filter(|(_, rel)| held(rel).is_none() && !inside_non_dir(rel, held))
            .collect();
        // A directory after what it contains.
        doomed.sort_by(|a, b| {
            b.1.matches('/')
                .count()
                .cmp(&a.1.matches('/').count())
                .then(b.1.cmp(&a.1))
        });
        let mut pruned = Pruned::default();
        for (key, rel) in doomed {
            match layout::delete_all(&*self.store, vec![key.clone()]).await {
                Ok(()) => {
                    if let Some(usage) = &self.usage {
                        usage.note_removed(&key);
                    }
                    pruned.removed.push(rel)
                }
                Err(e) => pruned.failed.push((rel, e.to_string())),
            }
        }
        Ok(pruned)
    }
}

/// Whether an ancestor of `rel` is held by the tree as something other than a directory (its insides stay).
fn inside_non_dir(rel: &str, held: &dyn Fn(&str) -> Option<bool>) -> bool {
    rel.match_indices('/').any(|(at, _)| held(&rel[..at]) == Some(false))
}

impl TreeVolume for ObjectTrees {
    fn make_dir(&self, key: &RemotePath) -> Result<(), String> {
        match self.handle.block_on(self.make_dirs(key)) {
            Ok(()) => Ok(()),
            Err(Blocked::Refused(why)) => Err(why),
            Err(Blocked::Store(e)) => Err(e.to_string()),
        }
    }

    fn place_symlink(
        &self,
        base: Option<&RemotePath>,
        link: &str,
        key: &RemotePath,
        target: &str,
    ) -> Result<(), String> {
        let tree_dir = base.map_or("", |b| b.as_str());
        match self.handle.block_on(self.symlink(tree_dir, link, key, target)) {
            Ok(()) => Ok(()),
            Err(Blocked::Refused(why)) => Err(why),
            Err(Blocked::Store(e)) => Err(e.to_string()),
        }
    }

    fn set_dir_metadata(&self, dirs: &[(RemotePath, u32, FileTime)]) {
        for (key, mode, mtime) in dirs {
            let mode = mode & 0o777;
            let applied = self.block_on(async {
                match self.entry(key).await? {
                    Some(EntryKind::Dir { mode: m, mtime: t }) if m == mode && t == *mtime => Ok(()),
                    Some(EntryKind::Dir { .. }) => {
                        let kind = EntryKind::Dir { mode, mtime: *mtime };
                        self.put_entry(key, kind, TransferId::random()).await
                    }
                    _ => Ok(()),
                }
            });
            if let Err(e) = applied {
                tracing::warn!(path = %key, error = %e, "could not apply directory metadata");
            }
        }
    }

    fn blocked(&self, key: &RemotePath) -> Option<String> {
        match self.handle.block_on(self.file_blocked(key, &mut HashMap::new())) {
            Ok(()) => None,
            Err(Blocked::Refused(why)) => Some(why),
            // Not known to be blocked: the file's own Offer meets the store again.
            Err(Blocked::Store(_)) => None,
        }
    }

    fn unchanged(&self, key: &RemotePath, len: u64, inode: u64, mtime: FileTime) -> bool {
        self.stored_manifest(key).is_some_and(|(manifest, _)| {
            let identity = identity_of(&manifest);
            identity.ino == inode && identity.len == len && identity.mtime == mtime
        })
    }

    fn read_committed(&self, path: &str, offset: u64, len: usize) -> Option<Vec<u8>> {
        self.handle.block_on(self.read_one(path, offset, len))
    }

    fn read_committed_many(&self, reads: &[CommittedRead]) -> Vec<Option<Vec<u8>>> {
        let reads = reads.iter().map(|r| self.read_one(&r.path, r.offset, r.len));
        let stream = futures_util::stream::iter(reads).buffered(self.options.parallel.max(1));
        self.handle.block_on(stream.collect())
    }

    fn stage(&self, _key: &RemotePath, data: &[u8], mode: u32, mtime: FileTime) -> io::Result<Staged> {
        let manifest = whole_file_manifest(data, mode & 0o777, mtime);
        let identity = identity_of(&manifest);
        let id = crate::random::u64();
        let pending = Pending {
            manifest,
            data: Bytes::copy_from_slice(data),
        };
        self.pending.lock().expect("pending").insert(id, pending);
        Ok(Staged {
            location: format!("memory:{id:016x}"),
            identity,
        })
    }

    fn discard(&self, staged: &Staged) {
        if let Some(id) = staged_id(staged) {
            self.pending.lock().expect("pending").remove(&id);
        }
    }

    fn settle(&self, files: Vec<(RemotePath, Staged)>) -> io::Result<Vec<Settled>> {
        let taken: Vec<(RemotePath, Option<Pending>)> = {
            let mut pending = self.pending.lock().expect("pending");
            let mut take = |s: &Staged| staged_id(s).and_then(|id| pending.remove(&id));
            files.into_iter().map(|(key, staged)| (key, take(&staged))).collect()
        };
        self.block_on(self.settle_batch(taken))
    }

    fn remove_partial(&self, _location: &str) {
        // An open transfer's record replaced by a whole file is expired by gc (docs/object-store.md, "gc").
    }

    fn keeps_records(&self) -> bool {
        true
    }

    fn stored_file(&self, key: &RemotePath) -> Option<StoredFile> {
        self.stored_manifest(key).map(|(m, _)| StoredFile {
            size: m.size,
            digest: m.digest,
            mtime: m.mtime,
        })
    }

    fn stored_files(&self, keys: &[RemotePath]) -> Vec<Option<StoredFile>> {
        let reads = keys.iter().map(|key| async move {
            match self.entry(key).await {
                Ok(Some(EntryKind::File { manifest, .. })) => Some(StoredFile {
                    size: manifest.size,
                    digest: manifest.digest,
                    mtime: manifest.mtime,
                }),
                // Unreadable counts as not there: the file is sent again, never skipped.
                _ => None,
            }
        });
        let stream = futures_util::stream::iter(reads).buffered(self.options.parallel.max(1));
        self.handle.block_on(stream.collect())
    }

    fn prune_beyond(&self, base: &RemotePath, held: &dyn Fn(&str) -> Option<bool>) -> Option<io::Result<Pruned>> {
        Some(self.block_on(self.prune(base, held)))
    }
}

fn staged_id(staged: &Staged) -> Option<u64> {
    u64::from_str_radix(staged.location.strip_prefix("memory:")?, 16).ok()
}

/// The manifest of a file committed whole: one chunk (none if empty), as the small-file writer records it.
fn whole_file_manifest(data: &[u8], mode: u32, mtime: FileTime) -> Manifest {
    let digest = *blake3::hash(data).as_bytes();
    let size = data.len() as u64;
    let chunks = match size {
        0 => Vec::new(),
        _ => vec![ChunkEntry {
            offset: 0,
            len: size as u32,
            hash: digest,
        }],
    };
    Manifest {
        size,
        digest,
        chunking: Chunking::Fixed {
            size: crate::MAX_CHUNK_SIZE,
        },
        mtime,
        mode,
        chunks,
    }
}

/// The manifest a batch record names: the chunks of `files` one after the other (what gc's mark keeps).
fn batch_manifest<'a>(files: impl Iterator<Item = &'a Manifest>) -> Manifest {
    let mut chunks = Vec::new();
    let mut offset = 0u64;
    for chunk in files.flat_map(|m| m.chunks.iter()) {
        chunks.push(ChunkEntry { offset, ..*chunk });
        offset += u64::from(chunk.len);
    }
    Manifest {
        size: offset,
        digest: [0; 32],
        chunking: Chunking::Fixed {
            size: crate::MAX_CHUNK_SIZE,
        },
        mtime: FileTime::default(),
        mode: 0,
        chunks,
    }
}

/// A file's identity in the bucket, as `ObjectVolume` gives it: the manifest id's first 8 bytes as the inode.
fn identity_of(manifest: &Manifest) -> Identity {
    let id = manifest.id();
    let mut ino = [0u8; 8];
    ino.copy_from_slice(&id[..8]);
    Identity {
        dev: 0,
        ino: u64::from_le_bytes(ino),
        len: manifest.size,
        mtime: manifest.mtime,
        is_file: true,
    }
}

fn file_time(t: SystemTime) -> FileTime {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    FileTime {
        secs: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        nanos: since.subsec_nanos(),
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests;
