//! [`ObjectVolume`]: the storage seam over an object store, for the big-file push path (docs/object-store.md
//! "How it plugs into the storage seam" and "One push, step by step").
//!
//! A partial is not a file: it is the open transfer's record (`open/<pid>/<tid>`, written once, or adopted from
//! another server when the manifest is the same), the chunk objects PUT as chunks are written, and the journal
//! entries PUT at each sync. `write_at` starts the chunk's PUT and returns (at most `parallel` PUTs of a partial
//! run at once, across batches); `start_sync` hands the batch's PUTs to a task that waits for them, then PUTs the
//! batch's journal entry, and only then answers (so a chunk is durable for the whole group before the engine
//! records and acknowledges it), while the writer goes on with the next batch; `sync_data` waits for that and for
//! every earlier sync; `read_at` serves the digest follower from a bounded cache of the chunks this handle stored,
//! else GETs the chunk object; `place` PUTs the manifest object (the commit), deletes the transfer's record, and
//! leaves its journal to a background delete so that `Committed` does not wait for it.
//!
//! The seam is blocking: every method runs on a blocking thread (the engine's `spawn_blocking`, the writer and
//! digest threads) and drives the store through [`tokio::runtime::Handle::block_on`], which panics on an async
//! worker thread; [`ObjectVolume`] checks for that and fails with an error instead.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use object_store::ObjectStore;
use tokio::runtime::Handle;
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinHandle;

use super::layout::{
    self, journal_union, EntryKind, EntryObject, JournalEntry, Layout, ObjectError, OpenRecord, PathId, ReuseRule,
    ServerId, TransferId,
};
use crate::manifest::{index_of_same, FileTime, Hash, Manifest};
use crate::path::RemotePath;
use crate::ranges::{encode_runs, ChunkSet};
use crate::storage::object_gc::{confirm_before_commit, GcSettings, ObjectGcError, SystemClock};
use crate::storage::{
    ChangeStamp, Directory, FinalFile, Identity, OpenTransfer, Partial, PartialFile, PendingSync, ReadAt, SharedUsage,
    StorageError, Volume,
};

/// Chunk bytes a partial keeps for its digest follower and commit (the window's worth and more).
const CACHE_BYTES: usize = 64 * 1024 * 1024;
/// Chunks of a manifest checked by HEAD each; more are checked by listing the shards they fall in.
const HEAD_BELOW: usize = 16;
/// Journals of committed transfers deleted at once, in the background, per volume.
const JOURNAL_DELETES: usize = 4;

/// How the object volume is set up.
#[derive(Debug, Clone, Copy)]
pub struct ObjectOptions {
    /// Chunk PUTs in flight per partial.
    pub parallel: usize,
    /// The gc grace period G: a chunk object listed younger than G/2 may be relied on (rule R (c)).
    pub grace: Duration,
    /// Offers whose chunks (but the last) are shorter are refused: a bucket's request bill cannot be multiplied
    /// by a client's `--chunk-size 4K`.
    pub min_chunk_size: u32,
    /// Rule C's wait, δ + the request timeout (default 5 s + 30 s): when a gc run overlaps a transfer, its commit
    /// confirms the chunks it relied on or PUT only this long after the newest of them, when any DELETE a gc
    /// issued on an older copy has landed.
    pub confirm_wait: Duration,
}

impl Default for ObjectOptions {
    fn default() -> Self {
        ObjectOptions {
            parallel: 32,
            grace: Duration::from_secs(24 * 3600),
            min_chunk_size: 256 * 1024,
            confirm_wait: Duration::from_secs(35),
        }
    }
}

/// The receiver's files in one namespace of an object store.
pub struct ObjectVolume {
    shared: Arc<Shared>,
    /// Open transfers of this process, by key.
    open: Mutex<HashMap<String, Arc<Transfer>>>,
    /// The namespace's files and open transfers as the bucket records them (quotas and limits).
    usage: Arc<super::usage::UsageCache>,
}

impl std::fmt::Debug for ObjectVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectVolume")
            .field("namespace", self.shared.layout.namespace())
            .field("server", &self.shared.server)
            .finish()
    }
}

struct Shared {
    handle: Handle,
    store: Arc<dyn ObjectStore>,
    /// The bucket prefix, for the layouts of other namespaces.
    prefix: String,
    layout: Layout,
    server: ServerId,
    options: ObjectOptions,
    seq: AtomicU64,
    /// Bounds the background deletes of committed transfers' journals ([`ObjectVolume::finish`]).
    journal_deletes: Arc<Semaphore>,
}

impl Shared {
    /// Runs `future` to completion on the runtime. Call only from a blocking thread (`spawn_blocking`, the writer
    /// and digest threads): on an async worker thread `Handle::block_on` panics.
    fn block_on<T>(&self, future: impl std::future::Future<Output = Result<T, ObjectError>>) -> io::Result<T> {
        self.handle.block_on(future).map_err(to_io)
    }
}

fn to_io(error: ObjectError) -> io::Error {
    tracing::warn!("{error}");
    io::Error::other(error.to_string())
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// One open transfer of this process: its ids, manifest and the metadata the commit applies, and what rule C
/// confirms before the commit.
struct Transfer {
    path: PathId,
    id: TransferId,
    manifest: Arc<Manifest>,
    meta: Mutex<(u32, FileTime)>,
    /// When its record was in the bucket: after our PUT returned, or the adopted record's `last_modified`.
    record_created: SystemTime,
    /// The chunks this process relied on by rule R (b) (journaled) or (c) (listed young), or PUT, with when it saw
    /// or stored them: what rule C confirms.
    relied: Mutex<Vec<(Hash, SystemTime)>>,
    /// This process PUT the record (it was not adopted from the bucket).
    recorded_here: bool,
    /// Bytes received over the wire by every server, as the journal said when this process last read it.
    received_before: AtomicU64,
    /// Bytes this process journaled as received since then.
    received_since: AtomicU64,
    /// Set once this process journaled received bytes.
    received_any: AtomicBool,
    /// Synced batches waiting for their journal entry ([`journal_batch`]).
    journal: Mutex<JournalQueue>,
}

/// The batches of one transfer whose chunk PUTs returned, waiting for the journal entry that makes them durable.
#[derive(Default)]
struct JournalQueue {
    /// Waiting for the next entry.
    waiting: Vec<Journaled>,
    /// A task is PUTting entries for the transfer: it takes `waiting` next.
    putting: bool,
}

/// One batch waiting for its journal entry.
struct Journaled {
    /// Its chunks, sorted.
    batch: Vec<u32>,
    /// Bytes of it received over the wire.
    bytes: u64,
    /// Told once the entry naming it returned (the error as text: several batches share it).
    answer: oneshot::Sender<Result<(), String>>,
}

impl Transfer {
    fn rely(&self, hashes: impl IntoIterator<Item = Hash>) {
        let now = SystemTime::now();
        self.relied
            .lock()
            .expect("relied")
            .extend(hashes.into_iter().map(|h| (h, now)));
    }
}

impl ObjectVolume {
    /// A volume for namespace `namespace` over `store` (whose keys are under the bucket prefix `prefix`),
    /// driving requests on `handle`'s runtime.
    pub fn new(
        handle: Handle,
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        namespace: &str,
        options: ObjectOptions,
    ) -> ObjectVolume {
        Self::with_server(handle, store, prefix, namespace, options, ServerId::random())
    }

    fn with_server(
        handle: Handle,
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        namespace: &str,
        options: ObjectOptions,
        server: ServerId,
    ) -> ObjectVolume {
        ObjectVolume {
            shared: Arc::new(Shared {
                handle,
                store,
                prefix: prefix.to_string(),
                layout: Layout::new(prefix, namespace),
                server,
                options,
                seq: AtomicU64::new(0),
                journal_deletes: Arc::new(Semaphore::new(JOURNAL_DELETES)),
            }),
            open: Mutex::new(HashMap::new()),
            usage: Default::default(),
        }
    }

    /// This server instance's id.
    pub fn server(&self) -> ServerId {
        self.shared.server
    }

    /// The namespace's layout.
    pub fn layout(&self) -> &Layout {
        &self.shared.layout
    }

    /// The transfer of `manifest` to `path`: this process's, else one adopted from the bucket (a record of the
    /// same manifest), else a new record PUT before anything is decided (rule R). Records of other manifests are
    /// left alone.
    fn transfer(&self, path: &RemotePath, manifest: &Arc<Manifest>, rule: ReuseRule) -> io::Result<Arc<Transfer>> {
        let id = manifest.id();
        if let Some(open) = self.open.lock().expect("open map").get(path.as_str()) {
            if open.manifest.id() == id {
                return Ok(open.clone());
            }
        }
        let pid = PathId::of(path);
        let shared = &self.shared;
        let (store, layout) = (&*shared.store, &shared.layout);
        let adopted = shared.block_on(async {
            let mut others = Vec::new();
            for (tid, meta) in layout::list_records(store, layout, pid).await? {
                if let Some(record) = layout::get_record(store, &meta.location).await? {
                    if record.path != path.as_str() {
                        continue;
                    }
                    if record.manifest.id() == id {
                        return Ok(Some((tid, SystemTime::from(meta.last_modified))));
                    }
                    others.push((tid, record.manifest.id()));
                }
            }
            if let Err(e) = delete_finished(shared, path, pid, &others).await {
                tracing::warn!(path = %path, error = %e, "a finished transfer's record stays until the next offer or gc");
            }
            Ok(None)
        })?;
        let recorded_here = adopted.is_none();
        let (tid, record_created) = match adopted {
            Some((tid, created)) => {
                tracing::info!(path = %path, transfer = %tid, "adopting an open transfer from the bucket");
                (tid, created)
            }
            None => {
                let tid = TransferId::random();
                let record = OpenRecord {
                    path: path.as_str().to_string(),
                    manifest: (**manifest).clone(),
                    reuse: rule,
                    created: now_ns() / 1_000_000_000,
                    server: shared.server,
                    transfer: tid,
                };
                let key = layout.open_record(pid, tid);
                shared.block_on(layout::put(store, &key, record.encode().into()))?;
                // After the PUT returned: a gc that marked before this did not see the record (rule C's test).
                (tid, SystemTime::now())
            }
        };
        let transfer = Arc::new(Transfer {
            path: pid,
            id: tid,
            manifest: manifest.clone(),
            meta: Mutex::new((manifest.mode, manifest.mtime)),
            record_created,
            relied: Mutex::new(Vec::new()),
            recorded_here,
            received_before: AtomicU64::new(0),
            received_since: AtomicU64::new(0),
            received_any: AtomicBool::new(false),
            journal: Mutex::default(),
        });
        self.open
            .lock()
            .expect("open map")
            .insert(path.as_str().to_string(), transfer.clone());
        Ok(transfer)
    }

    /// What the bucket says is durable for this transfer (its journal, by any server), plus what rule R lets it
    /// rely on without bytes: chunks of the live manifest at `path` (at the same place for in-place clients, any
    /// for full ones) and, for full clients, chunk objects of the namespace listed younger than G/2. Chunks
    /// relied on are journaled before this returns, so they are durable for the transfer on every server.
    pub fn durable(&self, path: &RemotePath, manifest: &Arc<Manifest>, rule: ReuseRule) -> io::Result<DurableSet> {
        let transfer = self.transfer(path, manifest, rule)?;
        let shared = &self.shared;
        let (store, layout) = (&*shared.store, &shared.layout);
        let entries = shared.block_on(layout::read_journal(store, layout, transfer.id))?;
        let union = journal_union(manifest, &entries);
        transfer.received_before.store(union.received_bytes, Ordering::Relaxed);
        transfer.received_since.store(0, Ordering::Relaxed);
        let mut chunks = union.chunks;
        let journaled = chunks.present();
        // Rule R (b): relied on because journaled; rule C confirms them at the commit.
        transfer.rely(hashes_of(manifest, &chunks));
        let live = shared.block_on(async {
            Ok(match layout.file(path) {
                Ok(key) => layout::get_entry(store, &key).await?,
                Err(_) => None,
            })
        })?;
        let mut relied = Vec::new();
        if let Some(EntryKind::File {
            manifest: old,
            inline: None,
        }) = live.as_ref().map(|l| &l.entry.kind)
        {
            relied.extend(rely_on_live(manifest, old, &chunks, rule));
        }
        for &index in &relied {
            chunks.insert(index);
        }
        if rule == ReuseRule::Full {
            let found = shared.block_on(young_chunks(shared, manifest, &chunks))?;
            // Rule R (c): listed young; rule C confirms them at the commit.
            transfer.rely(found.iter().filter_map(|&i| manifest.chunk(i)).map(|c| c.hash));
            for index in found {
                if chunks.insert(index) {
                    relied.push(index);
                }
            }
        }
        let reused_bytes: u64 = relied
            .iter()
            .filter_map(|&i| manifest.chunk(i))
            .map(|c| u64::from(c.len))
            .sum();
        if !relied.is_empty() {
            relied.sort_unstable();
            let entry = JournalEntry {
                manifest_id: manifest.id(),
                ranges: encode_runs(relied.iter().copied()),
                received_bytes: 0,
                reused_bytes,
                rejected_chunks: 0,
                updated: now_ns() / 1_000_000_000,
                server: shared.server,
                retract: false,
            };
            put_journal(shared, transfer.id, &entry)?;
        }
        tracing::info!(path = %path, journaled, reused = relied.len(), "durable in the bucket");
        Ok(DurableSet {
            chunks,
            received_bytes: union.received_bytes,
            reused_bytes: union.reused_bytes + reused_bytes,
        })
    }

    /// The manifest id of the file committed at `path` in the bucket, if a file is there.
    pub fn committed_id(&self, path: &RemotePath) -> io::Result<Option<Hash>> {
        let Ok(key) = self.shared.layout.file(path) else {
            return Ok(None);
        };
        let stored = self.shared.block_on(layout::get_entry(&*self.shared.store, &key))?;
        Ok(stored.and_then(|s| s.entry.manifest().map(|_| s.entry.manifest_id)))
    }

    /// Rule C (docs/object-store.md) before the commit PUT of `transfer`: if a gc run overlapped its record, waits
    /// out the DELETEs in flight and LISTs the chunks it relied on or PUT. Those found gone are retracted from its
    /// journal (they are no longer durable, on any server) and returned as [`StorageError::ChunksGone`]: nothing
    /// is committed.
    fn confirm(&self, key: &str, transfer: &Transfer) -> Result<(), StorageError> {
        let shared = &self.shared;
        let relied = transfer.relied.lock().expect("relied").clone();
        let settings = GcSettings {
            grace: shared.options.grace,
            delta: shared.options.confirm_wait,
            request_timeout: Duration::ZERO,
            ..GcSettings::default()
        };
        let missing = shared.block_on(async {
            confirm_before_commit(
                &shared.store,
                &shared.layout,
                transfer.record_created,
                &relied,
                &settings,
                &SystemClock,
            )
            .await
            .map_err(|e| rule_c_failed(&shared.layout, e))
        })?;
        if missing.is_empty() {
            return Ok(());
        }
        let gone: std::collections::HashSet<Hash> = missing.into_iter().collect();
        let chunks: Vec<u32> = (transfer.manifest.chunks.iter().enumerate())
            .filter(|(_, c)| gone.contains(&c.hash))
            .map(|(i, _)| i as u32)
            .collect();
        retract(shared, transfer, &chunks)?;
        transfer
            .relied
            .lock()
            .expect("relied")
            .retain(|(h, _)| !gone.contains(h));
        tracing::warn!(
            key,
            chunks = chunks.len(),
            "rule C: chunks relied on are gone; not committing"
        );
        Err(StorageError::ChunksGone {
            key: key.to_string(),
            chunks,
        })
    }

    /// Ends a committed transfer: DELETEs its record now (one request; from then on no offer adopts it and no
    /// status or quota counts it open), and its journal (a LIST and a bulk DELETE) in the background on the
    /// runtime, at most [`JOURNAL_DELETES`] at once, so `Committed` does not wait for it. A journal left by a
    /// failed or interrupted delete has no record: nothing reads it (durable sets are read through a record), and
    /// gc expires it once as old as the partial TTL.
    fn finish(&self, transfer: &Transfer, path: &RemotePath) {
        let shared = &self.shared;
        let record = shared.layout.open_record(transfer.path, transfer.id);
        if let Err(e) = shared.block_on(layout::delete_all(&*shared.store, vec![record])) {
            tracing::warn!(path = %path, error = %e, "committed, but the transfer's record stays until the next offer of the path or gc");
            return;
        }
        let (store, layout, tid) = (shared.store.clone(), shared.layout.clone(), transfer.id);
        let permits = shared.journal_deletes.clone();
        shared.handle.spawn(async move {
            let Ok(_permit) = permits.acquire_owned().await else {
                return;
            };
            if let Err(e) = layout::delete_journal(&*store, &layout, tid).await {
                tracing::warn!(transfer = %tid, error = %e, "committed, but the journal stays until gc expires it");
            }
        });
    }

    /// The tree receiver's storage in the same namespace and bucket (`tree.rs`).
    pub fn trees(&self) -> super::tree::ObjectTrees {
        let s = &self.shared;
        super::tree::ObjectTrees::new(s.handle.clone(), s.store.clone(), s.layout.clone(), s.server, s.options)
            .with_usage(self.usage.clone())
    }

    /// Opens the partial of the transfer of `manifest` to `path` (adopting or writing its record).
    pub fn open_for(&self, path: &RemotePath, manifest: &Arc<Manifest>, rule: ReuseRule) -> io::Result<Partial> {
        let transfer = self.transfer(path, manifest, rule)?;
        Ok(Arc::new(ObjectPartial {
            puts: Arc::new(Semaphore::new(self.shared.options.parallel.max(1))),
            shared: self.shared.clone(),
            transfer,
            state: Mutex::new(PartialState::default()),
            failed: Arc::new(AtomicBool::new(false)),
        }))
    }
}

/// What is durable for a transfer before any byte of this session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurableSet {
    /// Durable chunks.
    pub chunks: ChunkSet,
    /// Bytes received for the transfer by every server, from its journal.
    pub received_bytes: u64,
    /// Bytes reused, from its journal and this call.
    pub reused_bytes: u64,
}

/// Chunks of `manifest` not in `durable` that the live manifest `old` at the same path holds as chunk objects
/// (rule R (a)): at the same offset, length and hash for in-place clients; any chunk with the same hash for full
/// ones.
/// Deletes the records (journal first) among `others` (tid, manifest id) of `path` whose manifest is the one
/// committed there: transfers whose commit PUT landed but whose record outlived it (a crash or a failed DELETE
/// right after the commit). Without this they would count as open transfers until gc expires them.
async fn delete_finished(
    shared: &Shared,
    path: &RemotePath,
    pid: PathId,
    others: &[(TransferId, Hash)],
) -> Result<(), ObjectError> {
    if others.is_empty() {
        return Ok(());
    }
    let Ok(key) = shared.layout.file(path) else {
        return Ok(());
    };
    let stored = layout::get_entry(&*shared.store, &key).await?;
    let Some(committed) = stored.and_then(|s| s.entry.manifest().map(|_| s.entry.manifest_id)) else {
        return Ok(());
    };
    for &(tid, _) in others.iter().filter(|(_, manifest)| *manifest == committed) {
        tracing::info!(path = %path, transfer = %tid, "deleting the record of a transfer already committed");
        layout::delete_transfer(&*shared.store, &shared.layout, pid, tid).await?;
    }
    Ok(())
}

fn rely_on_live(manifest: &Manifest, old: &Manifest, durable: &ChunkSet, rule: ReuseRule) -> Vec<u32> {
    let hashes: std::collections::HashSet<Hash> = old.chunks.iter().map(|c| c.hash).collect();
    manifest
        .chunks
        .iter()
        .enumerate()
        .filter(|(i, _)| !durable.contains(*i as u32))
        .filter(|(_, chunk)| match rule {
            ReuseRule::Full => hashes.contains(&chunk.hash),
            ReuseRule::InPlace => index_of_same(&old.chunks, chunk).is_some(),
        })
        .map(|(i, _)| i as u32)
        .collect()
}

/// Chunks of `manifest` not in `durable` whose objects exist and were written less than G/2 ago (rule R (c)): a
/// HEAD each for a few, else a LIST of each shard they fall in.
async fn young_chunks(shared: &Shared, manifest: &Manifest, durable: &ChunkSet) -> Result<Vec<u32>, ObjectError> {
    let (store, layout) = (&*shared.store, &shared.layout);
    let fresh_after = i64::try_from((now_ns() / 1_000_000_000).saturating_sub((shared.options.grace / 2).as_secs()))
        .unwrap_or(i64::MAX);
    let wanted: Vec<(u32, Hash)> = manifest
        .chunks
        .iter()
        .enumerate()
        .filter(|(i, _)| !durable.contains(*i as u32))
        .map(|(i, c)| (i as u32, c.hash))
        .collect();
    let mut young: HashMap<Hash, ()> = HashMap::new();
    if wanted.len() < HEAD_BELOW {
        for (_, hash) in &wanted {
            if let Some(meta) = layout::head(store, &layout.chunk(hash)).await? {
                if meta.last_modified.timestamp() > fresh_after {
                    young.insert(*hash, ());
                }
            }
        }
    } else {
        use futures_util::StreamExt;
        let mut shards: Vec<u8> = wanted.iter().map(|(_, h)| h[0]).collect();
        shards.sort_unstable();
        shards.dedup();
        // Up to `parallel` shard LISTs at once: a fresh file of 256 chunks touches about 160 shards, and one LIST
        // after the other cost seconds before the first Need.
        let mut lists = futures_util::stream::iter(shards)
            .map(|shard| async move { layout::list(store, &layout.chunk_shard(shard)).await })
            .buffer_unordered(shared.options.parallel.max(1));
        while let Some(listed) = lists.next().await {
            for meta in listed? {
                if let Some(hash) = layout.parse_chunk(&meta.location) {
                    if meta.last_modified.timestamp() > fresh_after {
                        young.insert(hash, ());
                    }
                }
            }
        }
    }
    Ok(wanted
        .into_iter()
        .filter(|(_, hash)| young.contains_key(hash))
        .map(|(i, _)| i)
        .collect())
}

/// Every open transfer of the namespace from the bucket, in path order: its record (path, size, created), its
/// journal's union (durable bytes) and the newest `last_modified` of record and journal (last progress).
async fn open_transfers(shared: &Shared) -> Result<Vec<OpenTransfer>, ObjectError> {
    let (store, layout) = (&*shared.store, &shared.layout);
    let mut listed = Vec::new();
    for meta in layout::list(store, &layout.open()).await? {
        let Some(record) = layout::get_record(store, &meta.location).await? else {
            continue;
        };
        let journal = layout::list(store, &layout.journal(record.transfer)).await?;
        let updated = journal
            .iter()
            .map(|m| m.last_modified.timestamp())
            .chain([meta.last_modified.timestamp()])
            .max()
            .map_or(0, |t| u64::try_from(t).unwrap_or(0));
        let entries = layout::read_journal(store, layout, record.transfer).await?;
        let durable = journal_union(&record.manifest, &entries);
        let durable_bytes = (0..durable.chunks.len())
            .filter(|&i| durable.chunks.contains(i))
            .filter_map(|i| record.manifest.chunk(i))
            .map(|c| u64::from(c.len))
            .sum();
        listed.push(OpenTransfer {
            path: record.path,
            size: record.manifest.size,
            durable_bytes,
            created: record.created,
            updated: updated.max(record.created),
        });
    }
    listed.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(listed)
}

/// GETs every chunk of `manifest` (up to `parallel` at once), checks each against its hash, and writes it into
/// `file` at its offset. A missing or damaged chunk object is damage at rest: an error naming its key.
async fn fetch_verified(shared: &Shared, manifest: &Manifest, file: &std::fs::File) -> Result<(), ObjectError> {
    use futures_util::StreamExt;
    let (store, layout) = (&*shared.store, &shared.layout);
    let mut gets = futures_util::stream::iter(manifest.chunks.iter().copied())
        .map(|entry| async move {
            let key = layout.chunk(&entry.hash);
            let fetched = layout::get(store, &key, u64::from(entry.len)).await?;
            match fetched {
                Some(f) if crate::verify::check_chunk(&entry, &f.bytes).is_ok() => Ok((entry, f.bytes)),
                _ => Err(ObjectError::Store {
                    op: "verify",
                    key: key.to_string(),
                    kind: "missing or damaged chunk object",
                }),
            }
        })
        .buffer_unordered(shared.options.parallel);
    while let Some(chunk) = gets.next().await {
        let (entry, bytes) = chunk?;
        std::os::unix::fs::FileExt::write_all_at(file, &bytes, entry.offset).map_err(|e| ObjectError::Store {
            op: "write",
            key: format!("a local copy ({e})"),
            kind: "local I/O failed",
        })?;
    }
    Ok(())
}

/// Rule C's request failed: named by kind and prefix, never by the store's own message.
fn rule_c_failed(layout: &Layout, error: ObjectGcError) -> ObjectError {
    let kind = match &error {
        ObjectGcError::Store(e) => layout::error_kind(e),
        _ => "unreadable gc record",
    };
    tracing::debug!("rule C failed: {error}");
    ObjectError::Store {
        op: "confirm chunks (rule C) under",
        key: layout.namespace().to_string(),
        kind,
    }
}

/// The hashes of the chunks of `manifest` in `set`.
fn hashes_of(manifest: &Manifest, set: &ChunkSet) -> Vec<Hash> {
    (0..set.len())
        .filter(|&i| set.contains(i))
        .filter_map(|i| manifest.chunk(i))
        .map(|c| c.hash)
        .collect()
}

/// PUTs a retraction of `chunks` into the transfer's journal: from it on, they are not durable for the transfer.
fn retract(shared: &Shared, transfer: &Transfer, chunks: &[u32]) -> io::Result<()> {
    if chunks.is_empty() {
        return Ok(());
    }
    let mut chunks = chunks.to_vec();
    chunks.sort_unstable();
    chunks.dedup();
    let entry = JournalEntry {
        manifest_id: transfer.manifest.id(),
        ranges: encode_runs(chunks),
        received_bytes: 0,
        reused_bytes: 0,
        rejected_chunks: 0,
        updated: now_ns() / 1_000_000_000,
        server: shared.server,
        retract: true,
    };
    put_journal(shared, transfer.id, &entry)
}

fn put_journal(shared: &Shared, transfer: TransferId, entry: &JournalEntry) -> io::Result<()> {
    shared.block_on(put_journal_entry(shared, transfer, entry))
}

async fn put_journal_entry(shared: &Shared, transfer: TransferId, entry: &JournalEntry) -> Result<(), ObjectError> {
    let seq = shared.seq.fetch_add(1, Ordering::Relaxed);
    let key = shared.layout.journal_entry(transfer, now_ns(), shared.server, seq);
    layout::put(&*shared.store, &key, entry.encode().into())
        .await
        .map(|_| ())
}

/// Makes one batch durable for the group: waits for its chunk PUTs, then has a journal entry naming `batch`
/// (sorted, `bytes` received) PUT, and answers once it returned. Entries are PUT one at a time per transfer (group
/// commit): the batches whose chunk PUTs returned while an entry was in flight go together into the next one, so
/// a fresh push makes fewer journal PUTs than batches when the store is the limit, and none waits for more than the
/// entry in flight and its own.
async fn journal_batch(
    shared: Arc<Shared>,
    transfer: Arc<Transfer>,
    puts: Vec<JoinHandle<Result<(), ObjectError>>>,
    batch: Vec<u32>,
    bytes: u64,
) -> io::Result<()> {
    for put in puts {
        put.await
            .map_err(|e| ObjectError::Store {
                op: "put",
                key: format!("a chunk ({e})"),
                kind: "task failed",
            })
            .and_then(|put| put)
            .map_err(to_io)?;
    }
    // PUT by this session (their PUTs have returned): rule C confirms them at the commit.
    let manifest = &transfer.manifest;
    transfer.rely(batch.iter().filter_map(|&i| manifest.chunk(i)).map(|c| c.hash));
    let (answer, answered) = oneshot::channel();
    let lead = {
        let mut queue = transfer.journal.lock().expect("journal queue");
        queue.waiting.push(Journaled { batch, bytes, answer });
        !std::mem::replace(&mut queue.putting, true)
    };
    if lead {
        // Its own task: this batch's answer must not wait for the batches queued after it.
        shared.handle.clone().spawn(put_queued_journal(shared, transfer));
    }
    answered
        .await
        .unwrap_or_else(|_| Err("the journal task ended without an answer".to_string()))
        .map_err(io::Error::other)
}

/// PUTs the queued batches of `transfer`, all waiting at once in one journal entry, until none is left.
async fn put_queued_journal(shared: Arc<Shared>, transfer: Arc<Transfer>) {
    loop {
        let waiting = {
            let mut queue = transfer.journal.lock().expect("journal queue");
            if queue.waiting.is_empty() {
                queue.putting = false;
                return;
            }
            std::mem::take(&mut queue.waiting)
        };
        let mut chunks: Vec<u32> = waiting.iter().flat_map(|w| w.batch.iter().copied()).collect();
        chunks.sort_unstable();
        chunks.dedup();
        let bytes: u64 = waiting.iter().map(|w| w.bytes).sum();
        let entry = JournalEntry {
            manifest_id: transfer.manifest.id(),
            ranges: encode_runs(chunks),
            received_bytes: bytes,
            reused_bytes: 0,
            rejected_chunks: 0,
            updated: now_ns() / 1_000_000_000,
            server: shared.server,
            retract: false,
        };
        let result = put_journal_entry(&shared, transfer.id, &entry).await;
        if result.is_ok() {
            transfer.received_since.fetch_add(bytes, Ordering::Relaxed);
            transfer.received_any.store(true, Ordering::Relaxed);
        }
        let result = result.map_err(|e| to_io(e).to_string());
        for journaled in waiting {
            let _ = journaled.answer.send(result.clone());
        }
    }
}

/// The identity the object volume gives a file of `manifest`: no device, the manifest id's first 8 bytes as the
/// inode, so a verified partial and the committed entry compare equal exactly when their manifests are the same.
fn identity_of(manifest: &Manifest, mtime: FileTime) -> Identity {
    let id = manifest.id();
    let mut ino = [0u8; 8];
    ino.copy_from_slice(&id[..8]);
    Identity {
        dev: 0,
        ino: u64::from_le_bytes(ino),
        len: manifest.size,
        mtime,
        is_file: true,
    }
}

impl Volume for ObjectVolume {
    fn prepare_destination(&self, path: &RemotePath) -> Result<(), StorageError> {
        self.shared.layout.file(path).map_err(StorageError::Layout)?;
        // A path cannot be both a file and a directory: no committed file or symlink on the way.
        let shared = &self.shared;
        let components: Vec<&str> = path.components().collect();
        for depth in 1..components.len() {
            let Ok(parent) = RemotePath::parse(&components[..depth].join("/")) else {
                continue;
            };
            let key = shared.layout.file(&parent).map_err(StorageError::Layout)?;
            let entry = shared.block_on(layout::get_entry(&*shared.store, &key))?;
            if entry.is_some_and(|e| !matches!(e.entry.kind, EntryKind::Dir { .. })) {
                return Err(in_the_way(&parent));
            }
        }
        // Nor a directory or a symlink at the name, and no entry below it: files pushed under `path/` make it a
        // directory without a `Dir` object of its own. Two servers racing a file at `a` and one at `a/b` may
        // both pass this check; the bucket then holds both, and `a` reads as the file (docs/object-store.md).
        let key = shared.layout.file(path).map_err(StorageError::Layout)?;
        let entry = shared.block_on(layout::get_entry(&*shared.store, &key))?;
        if entry.is_some_and(|e| !matches!(e.entry.kind, EntryKind::File { .. }))
            || shared.block_on(layout::any_below(&*shared.store, &key))?
        {
            return Err(in_the_way(path));
        }
        Ok(())
    }

    fn partial_location(&self, key: &str) -> String {
        match RemotePath::parse(key) {
            Ok(path) => format!(
                "object store: {}/{}",
                self.shared.layout.open().as_ref(),
                PathId::of(&path)
            ),
            Err(_) => "object store".to_string(),
        }
    }

    fn partial_len(&self, key: &str) -> Result<Option<u64>, StorageError> {
        // The bucket holds the partial's chunks for as long as any record of the path does.
        let Ok(path) = RemotePath::parse(key) else {
            return Ok(None);
        };
        let shared = &self.shared;
        let records = shared.block_on(layout::list_records(&*shared.store, &shared.layout, PathId::of(&path)))?;
        Ok((!records.is_empty()).then_some(0))
    }

    fn open_partial(&self, key: &str, _size: u64, _exists: bool) -> Result<Partial, StorageError> {
        Err(StorageError::Io(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("the object store opens the partial of {key} with its manifest (open_partial_for)"),
        )))
    }

    fn open_partial_for(
        &self,
        key: &str,
        manifest: &Arc<Manifest>,
        full_reuse: bool,
        _exists: bool,
    ) -> Result<Partial, StorageError> {
        let path = RemotePath::parse(key).map_err(StorageError::BadPath)?;
        Ok(self.open_for(&path, manifest, rule_of(full_reuse))?)
    }

    fn durable_elsewhere(
        &self,
        path: &RemotePath,
        manifest: &Arc<Manifest>,
        full_reuse: bool,
    ) -> Result<ChunkSet, StorageError> {
        Ok(self.durable(path, manifest, rule_of(full_reuse))?.chunks)
    }

    fn committed_manifest_id(&self, path: &RemotePath) -> Result<Option<Hash>, StorageError> {
        Ok(self.committed_id(path)?)
    }

    fn min_chunk_size(&self) -> u32 {
        self.shared.options.min_chunk_size
    }

    fn needs_whole_manifest(&self) -> bool {
        true
    }

    fn tree_volume(&self) -> Option<Arc<dyn crate::storage::TreeVolume>> {
        Some(Arc::new(self.trees()))
    }

    fn committed_tree(&self, path: &RemotePath) -> Result<Option<crate::storage::TreeCopy>, StorageError> {
        Ok(self.trees().tree_copy(path)?)
    }

    fn committed_copy(&self, path: &RemotePath) -> Result<Option<(std::fs::File, Manifest)>, StorageError> {
        let Ok(key) = self.shared.layout.file(path) else {
            return Ok(None);
        };
        let shared = &self.shared;
        let Some(stored) = shared.block_on(layout::get_entry(&*shared.store, &key))? else {
            return Ok(None);
        };
        let EntryKind::File { manifest, inline } = stored.entry.kind else {
            return Ok(None);
        };
        let file = tempfile::tempfile()?;
        match inline {
            Some(bytes) => std::os::unix::fs::FileExt::write_all_at(&file, &bytes, 0)?,
            None => shared.block_on(fetch_verified(shared, &manifest, &file))?,
        }
        Ok(Some((file, manifest)))
    }

    fn open_transfers(&self, max: usize) -> Result<Option<(Vec<OpenTransfer>, u64)>, StorageError> {
        let shared = &self.shared;
        let listed = shared.block_on(open_transfers(shared))?;
        let total = listed.len() as u64;
        Ok(Some((listed.into_iter().take(max).collect(), total)))
    }

    fn shared_usage(
        &self,
        path: &RemotePath,
        manifest_id: &Hash,
        with_committed: bool,
    ) -> Result<Option<SharedUsage>, StorageError> {
        let shared = &self.shared;
        let usage = self
            .usage
            .usage(&*shared.store, &shared.layout, path, manifest_id, with_committed);
        Ok(Some(shared.block_on(usage)?))
    }

    /// Drops the record this process PUT for `key` moments ago (with the journal entry of what it relied on),
    /// unless bytes were received for it: a refused offer leaves nothing that counts against later ones.
    fn refused(&self, key: &str) {
        let Some(transfer) = self.open.lock().expect("open map").remove(key) else {
            return;
        };
        let received =
            transfer.received_before.load(Ordering::Relaxed) > 0 || transfer.received_any.load(Ordering::Relaxed);
        if !transfer.recorded_here || received {
            return;
        }
        let (store, layout) = (&*self.shared.store, &self.shared.layout);
        if let Err(e) = self
            .shared
            .block_on(layout::delete_transfer(store, layout, transfer.path, transfer.id))
        {
            tracing::warn!(key, error = %e, "the refused transfer's record stays until gc expires it");
        }
    }

    fn received_by_group(&self, key: &str) -> Option<u64> {
        let transfer = self.open.lock().expect("open map").get(key).cloned()?;
        let before = transfer.received_before.load(Ordering::Relaxed);
        Some(before.saturating_add(transfer.received_since.load(Ordering::Relaxed)))
    }

    fn for_namespace(&self, name: &str) -> Option<Arc<dyn Volume>> {
        let s = &self.shared;
        let volume = Self::with_server(s.handle.clone(), s.store.clone(), &s.prefix, name, s.options, s.server);
        Some(Arc::new(volume))
    }

    fn place(&self, key: &str, path: &RemotePath, verified: &Identity) -> Result<Box<dyn Directory>, StorageError> {
        let transfer = self
            .open
            .lock()
            .expect("open map")
            .get(key)
            .cloned()
            .ok_or_else(|| StorageError::Replaced(key.to_string()))?;
        let (mode, mtime) = *transfer.meta.lock().expect("metadata");
        if identity_of(&transfer.manifest, mtime) != *verified {
            return Err(StorageError::Replaced(key.to_string()));
        }
        let shared = &self.shared;
        let (store, layout) = (&*shared.store, &shared.layout);
        let mut manifest = (*transfer.manifest).clone();
        manifest.mode = mode;
        manifest.mtime = mtime;
        let entry = EntryObject {
            manifest_id: manifest.id(),
            kind: EntryKind::File { manifest, inline: None },
            committed_at: now_ns(),
            received_bytes: 0,
            reused_bytes: 0,
            rejected_chunks: 0,
            transfer: transfer.id,
            server: shared.server,
        };
        let file = layout.file(path).map_err(StorageError::Layout)?;
        self.confirm(key, &transfer)?;
        tracing::debug!(path = %path, "rule C passed; putting the manifest object");
        // The commit: one PUT; readers see the old entry or this one. Then the transfer is finished.
        let put = shared.block_on(layout::put(store, &file, entry.encode().into()))?;
        tracing::debug!(path = %path, "manifest object put; deleting the record");
        self.usage.note_commit(file, transfer.manifest.size, put.e_tag);
        self.open.lock().expect("open map").remove(key);
        self.finish(&transfer, path);
        Ok(Box::new(Committed))
    }

    fn durable_is_authoritative(&self) -> bool {
        true
    }

    fn forget_chunks(&self, key: &str, chunks: &[u32]) -> Result<(), StorageError> {
        let transfer = self.open.lock().expect("open map").get(key).cloned();
        match transfer {
            Some(transfer) => Ok(retract(&self.shared, &transfer, chunks)?),
            None => Ok(()),
        }
    }

    fn stat_final(&self, path: &RemotePath) -> Option<Identity> {
        let shared = &self.shared;
        let key = shared.layout.file(path).ok()?;
        let stored = shared.block_on(layout::get_entry(&*shared.store, &key)).ok()??;
        match &stored.entry.kind {
            EntryKind::File { manifest, .. } => Some(identity_of(manifest, manifest.mtime)),
            EntryKind::Dir { mtime, .. } => Some(Identity {
                dev: 0,
                ino: 0,
                len: 0,
                mtime: *mtime,
                is_file: false,
            }),
            EntryKind::Symlink { .. } => Some(Identity {
                dev: 0,
                ino: 0,
                len: 0,
                mtime: FileTime::default(),
                is_file: false,
            }),
        }
    }

    fn open_final(&self, _path: &RemotePath) -> Option<Box<dyn FinalFile>> {
        // Reuse on an object store marks chunks durable by hash (`durable_elsewhere`); nothing is copied.
        None
    }
}

/// The refusal of a path whose place a directory, a symlink, or a file on the way holds.
fn in_the_way(path: &RemotePath) -> StorageError {
    StorageError::BadPath(crate::path::PathError::InTheWay(path.as_str().to_string()))
}

fn rule_of(full_reuse: bool) -> ReuseRule {
    if full_reuse {
        ReuseRule::Full
    } else {
        ReuseRule::InPlace
    }
}

/// The commit PUT is durable when it returns: nothing more to sync.
struct Committed;

impl Directory for Committed {
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Default)]
struct PartialState {
    /// The chunk PUTs of the batch since the last sync.
    pending: Vec<JoinHandle<Result<(), ObjectError>>>,
    /// Chunks written since the last journal entry.
    batch: Vec<u32>,
    /// Their bytes.
    batch_bytes: u64,
    /// Recently stored chunks' bytes, newest last.
    cache: VecDeque<(u32, Bytes)>,
    cache_bytes: usize,
    /// Syncs started and perhaps still running (for `sync_data`, which waits for all of them).
    syncs: Vec<JoinHandle<()>>,
}

/// The open partial of one transfer on the object store.
struct ObjectPartial {
    shared: Arc<Shared>,
    transfer: Arc<Transfer>,
    state: Mutex<PartialState>,
    /// Chunk PUTs in flight: `parallel` permits, each held by a PUT until it returned, across syncs.
    puts: Arc<Semaphore>,
    /// Some sync failed: no later `sync_data` may report the partial durable.
    failed: Arc<AtomicBool>,
}

impl ObjectPartial {
    fn manifest(&self) -> &Manifest {
        &self.transfer.manifest
    }

    /// The index of the chunk starting at `offset`.
    fn chunk_at(&self, offset: u64) -> Option<u32> {
        self.manifest()
            .chunks
            .binary_search_by_key(&offset, |c| c.offset)
            .ok()
            .map(|i| i as u32)
    }

    /// The index of the chunk holding byte `offset`.
    fn chunk_holding(&self, offset: u64) -> Option<u32> {
        let chunks = &self.manifest().chunks;
        let after = chunks.partition_point(|c| c.offset <= offset);
        let index = after.checked_sub(1)?;
        let chunk = &chunks[index];
        (offset < chunk.offset + u64::from(chunk.len)).then_some(index as u32)
    }

    fn cached(&self, index: u32) -> Option<Bytes> {
        Self::cached_in(&self.state.lock().expect("partial state"), index)
    }

    fn cached_in(state: &PartialState, index: u32) -> Option<Bytes> {
        state
            .cache
            .iter()
            .rev()
            .find(|(i, _)| *i == index)
            .map(|(_, b)| b.clone())
    }

    /// The chunk's bytes as stored: from the cache, else a GET of its object, together with GETs of the chunks
    /// after it that are not cached either (up to `parallel` requests, half the cache), so that the digest
    /// follower, which reads in order, pays one round of requests per read-ahead instead of one per chunk (and
    /// never one per read of a chunk it reads in pieces: every fetched chunk is remembered; one ahead only if it is
    /// stored, and never over bytes this handle wrote while the GETs ran). A missing object
    /// reads as zeros and a damaged one as it is: the commit's check then finds the chunk damaged and asks for it
    /// again.
    fn chunk_bytes(&self, index: u32) -> io::Result<Bytes> {
        if let Some(bytes) = self.cached(index) {
            return Ok(bytes);
        }
        let ahead = self.read_ahead(index);
        let store = &*self.shared.store;
        let fetched = self.shared.block_on(async {
            let gets = ahead.iter().map(|&(_, len, ref key)| async move {
                match layout::get(store, key, u64::from(len)).await {
                    // Larger than the chunk: damaged, read like a missing one.
                    Err(ObjectError::TooLarge { .. }) => Ok(None),
                    other => other,
                }
            });
            futures_util::future::try_join_all(gets).await
        })?;
        let mut wanted = None;
        let mut state = self.state.lock().expect("partial state");
        for ((i, len, key), got) in ahead.into_iter().zip(fetched) {
            // Written by this handle while the GETs ran (its PUT perhaps not returned, so the GET found nothing):
            // the cached bytes are the ones stored, never to be replaced by what the GET saw.
            if let Some(bytes) = Self::cached_in(&state, i) {
                if i == index {
                    wanted = Some(bytes);
                }
                continue;
            }
            let bytes = match got {
                Some(f) if f.bytes.len() == len as usize => f.bytes,
                // A chunk ahead that is not stored yet: nothing to remember (the writer may store it next).
                _ if i != index => continue,
                _ => {
                    tracing::warn!(key = %key, "a chunk object is missing or damaged");
                    Bytes::from(vec![0u8; len as usize])
                }
            };
            if i == index {
                wanted = Some(bytes.clone());
            }
            Self::remember(&mut state, i, bytes);
        }
        wanted.ok_or_else(|| io::Error::other("no such chunk"))
    }

    /// `index` and the chunks after it to fetch with it: not cached, at most `parallel` of them and at most half
    /// the cache's bytes (so that fetching them never evicts `index`).
    fn read_ahead(&self, index: u32) -> Vec<(u32, u32, object_store::path::Path)> {
        let manifest = self.manifest();
        let state = self.state.lock().expect("partial state");
        let mut ahead = Vec::new();
        let mut bytes = 0usize;
        for i in index..manifest.chunk_count() {
            let Some(entry) = manifest.chunk(i) else { break };
            let cached = state.cache.iter().any(|(c, _)| *c == i);
            if i > index && (cached || ahead.len() >= self.shared.options.parallel.max(1)) {
                break;
            }
            if i > index && bytes + entry.len as usize > CACHE_BYTES / 2 {
                break;
            }
            bytes += entry.len as usize;
            ahead.push((i, entry.len, self.shared.layout.chunk(&entry.hash)));
        }
        ahead
    }

    fn remember(state: &mut PartialState, index: u32, bytes: Bytes) {
        state.cache_bytes += bytes.len();
        state.cache.push_back((index, bytes));
        while state.cache_bytes > CACHE_BYTES {
            let Some((_, old)) = state.cache.pop_front() else {
                break;
            };
            state.cache_bytes -= old.len();
        }
    }

    /// Waits for a free PUT slot: at most `parallel` chunk PUTs of this partial are in flight.
    fn put_slot(&self) -> io::Result<tokio::sync::OwnedSemaphorePermit> {
        let puts = self.puts.clone();
        self.shared.block_on(async {
            puts.acquire_owned().await.map_err(|_| ObjectError::Store {
                op: "put",
                key: "a chunk".to_string(),
                kind: "no PUT slot",
            })
        })
    }
}

impl ReadAt for ObjectPartial {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let Some(index) = self.chunk_holding(offset) else {
            return Ok(0);
        };
        let entry = *self.manifest().chunk(index).expect("found above");
        let bytes = self.chunk_bytes(index)?;
        let start = (offset - entry.offset) as usize;
        let n = buf.len().min(bytes.len() - start);
        buf[..n].copy_from_slice(&bytes[start..start + n]);
        Ok(n)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.manifest().size)
    }
}

impl PartialFile for ObjectPartial {
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let index = self
            .chunk_at(offset)
            .filter(|&i| self.manifest().chunk(i).is_some_and(|c| c.len as usize == data.len()))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "the object store takes whole chunks; {} bytes at {offset} is none",
                        data.len()
                    ),
                )
            })?;
        let hash = self.manifest().chunks[index as usize].hash;
        let slot = self.put_slot()?;
        let bytes = Bytes::copy_from_slice(data);
        let (store, key) = (self.shared.store.clone(), self.shared.layout.chunk(&hash));
        let put = {
            let bytes = bytes.clone();
            self.shared.handle.spawn(async move {
                let _slot = slot;
                layout::put(&*store, &key, bytes).await.map(|_| ())
            })
        };
        let mut state = self.state.lock().expect("partial state");
        state.pending.push(put);
        state.batch.push(index);
        state.batch_bytes += data.len() as u64;
        Self::remember(&mut state, index, bytes);
        Ok(())
    }

    fn set_len(&self, _len: u64) -> io::Result<()> {
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.start_sync()?.wait()?;
        let running = std::mem::take(&mut self.state.lock().expect("partial state").syncs);
        self.shared.block_on(async {
            for sync in running {
                let _ = sync.await;
            }
            Ok(())
        })?;
        if self.failed.load(Ordering::Acquire) {
            return Err(io::Error::other("an earlier sync of this partial failed"));
        }
        Ok(())
    }

    fn start_sync(&self) -> io::Result<PendingSync> {
        let (puts, mut batch, bytes) = {
            let mut state = self.state.lock().expect("partial state");
            let taken = (
                std::mem::take(&mut state.pending),
                std::mem::take(&mut state.batch),
                std::mem::take(&mut state.batch_bytes),
            );
            state.syncs.retain(|sync| !sync.is_finished());
            taken
        };
        if batch.is_empty() {
            return Ok(PendingSync::finished(Ok(())));
        }
        batch.sort_unstable();
        batch.dedup();
        let (answer, pending) = oneshot::channel();
        let (shared, transfer, failed) = (self.shared.clone(), self.transfer.clone(), self.failed.clone());
        let sync = self.shared.handle.spawn(async move {
            let result = journal_batch(shared, transfer, puts, batch, bytes).await;
            if result.is_err() {
                failed.store(true, Ordering::Release);
            }
            let _ = answer.send(result);
        });
        self.state.lock().expect("partial state").syncs.push(sync);
        Ok(PendingSync::running(pending))
    }

    fn sync_all(&self) -> io::Result<()> {
        self.sync_data()
    }

    fn set_metadata(&self, mode: u32, mtime: FileTime) -> io::Result<()> {
        *self.transfer.meta.lock().expect("metadata") = (mode & 0o777, mtime);
        Ok(())
    }

    fn identity(&self) -> io::Result<Identity> {
        let (_, mtime) = *self.transfer.meta.lock().expect("metadata");
        Ok(identity_of(self.manifest(), mtime))
    }

    fn change_stamp(&self) -> io::Result<ChangeStamp> {
        // No stamp: a recorded digest state is never trusted, the resume hashes the chunks again (GETs).
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "objects have no change stamp",
        ))
    }
}

#[cfg(test)]
mod tests;
