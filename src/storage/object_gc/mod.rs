//! gc on the object store (docs/object-store.md, "gc: mark and sweep, safe while other servers upload"): per
//! namespace, a lease, the expiry of abandoned open transfers, a mark of every chunk named by a committed entry
//! (`files/`), a kept version (`versions/`) or an open record (`open/`), and a sweep of the chunk objects
//! (`chunks/`) nobody names that are older than the grace period, each confirmed by a HEAD at most δ before its
//! DELETE. Beside it, the two rules a receiving session follows so that the sweep never deletes a chunk it
//! commits: [`listed_young`] (rule R (c), what a LIST lets a session rely on) and [`confirm_before_commit`]
//! (rule C).
//!
//! Guarantees, under the assumptions the design states (one gc per bucket at a time, clocks within G/4, a DELETE
//! applied within its request timeout or never): a chunk named at the mark is never deleted; a chunk PUT (or
//! relied on by rule R) after the mark is either not deleted, or its deletion is seen by rule C before the
//! session's commit, so the session asks for it again. A run that fails leaves its lease in place; a run that
//! finishes leaves a run record (`gc/runs/<M>`): rule C reads both, because a session whose record was written
//! during a run may commit after the run ended.
//!
//! Everything here speaks through [`Bucket`], so the unit tests can interleave a session's calls with gc's at
//! every step (`tests.rs`) against `object_store::memory::InMemory` and a fake clock.

mod bucket;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use object_store::path::Path;
use object_store::ObjectMeta;
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use bucket::Bucket;

use crate::manifest::Hash;
use crate::storage::object::layout::{EntryKind, EntryObject, Layout, OpenRecord};

/// Largest object gc reads whole (a maximal manifest object is ~22 MB, docs/object-store.md): checked against the
/// LIST size before the GET, so a stray huge object cannot make gc allocate it.
pub const MAX_MARKED_OBJECT: u64 = 64 * 1024 * 1024;

/// The timing of a gc run.
#[derive(Debug, Clone, Copy)]
pub struct GcSettings {
    /// G: an unreferenced chunk is deleted only when older than the mark minus this (default 24 h, at least 1 h
    /// outside tests).
    pub grace: Duration,
    /// δ: the longest time between the HEAD that confirms a chunk is old and its DELETE (default 5 s).
    pub delta: Duration,
    /// Open transfers without activity for this long are expired (default 7 days, as the local partials).
    pub transfer_ttl: Duration,
    /// The longest a request may take (a DELETE lands within it or never).
    pub request_timeout: Duration,
}

impl Default for GcSettings {
    fn default() -> Self {
        GcSettings {
            grace: Duration::from_secs(24 * 3600),
            delta: Duration::from_secs(5),
            transfer_ttl: Duration::from_secs(7 * 24 * 3600),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// Where "now" comes from, and how to wait: the system clock, or a test's fake one.
pub trait Clock: Send + Sync {
    /// The current time.
    fn now(&self) -> SystemTime;
    /// Returns once `now()` has reached `at`.
    fn sleep_until(&self, at: SystemTime) -> impl Future<Output = ()> + Send;
}

/// The system clock, sleeping on tokio's timer.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    async fn sleep_until(&self, at: SystemTime) {
        if let Ok(wait) = at.duration_since(SystemTime::now()) {
            tokio::time::sleep(wait).await;
        }
    }
}

/// What names chunks: decodes a manifest object (`files/`, `versions/`) or an open record (`open/`) into the
/// chunk hashes it names. An inline file names none.
pub trait References: Send + Sync {
    /// The chunks the object at `key` names; an error stops the run (gc cannot know what it protects).
    fn chunks(&self, key: &Path, bytes: &[u8]) -> Result<Vec<Hash>, String>;
}

/// The chunks named by ferry's own objects: a file's manifest (`files/`, `versions/`; an inline file names none,
/// its bytes are not in `chunks/`) and an open transfer's manifest (`open/`). Directories and symlinks name none.
#[derive(Debug, Clone, Copy, Default)]
pub struct ManifestReferences;

impl References for ManifestReferences {
    fn chunks(&self, key: &Path, bytes: &[u8]) -> Result<Vec<Hash>, String> {
        let under_open = key.as_ref().split('/').any(|part| part == "open");
        let manifest = if under_open {
            OpenRecord::decode(bytes).map_err(|e| e.to_string())?.manifest
        } else {
            match EntryObject::decode(bytes).map_err(|e| e.to_string())?.kind {
                EntryKind::File { manifest, inline: None } => manifest,
                _ => return Ok(Vec::new()),
            }
        };
        Ok(manifest.chunks.iter().map(|c| c.hash).collect())
    }
}

/// The prefixes of one namespace gc walks, beside the [`Layout`]'s own keys.
fn sub(layout: &Layout, name: &str) -> Path {
    layout.namespace().clone().join(name)
}

fn lease_key(layout: &Layout) -> Path {
    sub(layout, "gc").join("lease")
}

fn run_key(layout: &Layout, mark: SystemTime) -> Path {
    sub(layout, "gc").join("runs").join(format!("{:020}", nanos(mark)))
}

/// A gc run's claim on a namespace, and after it its record: what rule C reads.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Lease {
    /// Random id of the run.
    id: String,
    /// M, Unix nanoseconds.
    mark: u64,
    /// D = M + G/2, Unix nanoseconds: no DELETE is issued after it.
    deadline: u64,
}

/// What one run did.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct ObjectGcReport {
    /// Open transfers expired (their journal and record deleted).
    pub transfers_expired: u64,
    /// Distinct chunks named at the mark.
    pub chunks_live: u64,
    /// Unreferenced chunks kept because they are younger than the mark minus the grace period.
    pub chunks_young: u64,
    /// Unreferenced chunks deleted.
    pub chunks_deleted: u64,
    /// Bytes those held.
    pub bytes_freed: u64,
    /// The deletion deadline passed before the sweep finished (the rest waits for the next run).
    pub stopped_at_deadline: bool,
}

/// gc on the object store failed.
#[derive(Debug, Error)]
pub enum ObjectGcError {
    /// A request failed (a DELETE without an answer ends the run: it is not retried).
    #[error("the object store refused a gc request: {0}")]
    Store(#[from] object_store::Error),
    /// Another gc holds the namespace.
    #[error("another gc ({id}) holds the lease of this namespace")]
    LeaseHeld {
        /// The other run's id.
        id: String,
    },
    /// An object that names chunks could not be read: nothing is swept, since what it protects is unknown.
    #[error("gc cannot read {key}: {why}")]
    Unreadable {
        /// Its key.
        key: String,
        /// Why.
        why: String,
    },
}

/// One gc run over a namespace: lease, expire, mark, sweep, record the run (docs/object-store.md steps 1–4).
pub async fn collect<B: Bucket, C: Clock>(
    bucket: &B,
    ns: &Layout,
    refs: &dyn References,
    settings: &GcSettings,
    clock: &C,
) -> Result<ObjectGcReport, ObjectGcError> {
    let lease = take_lease(bucket, ns, settings, clock).await?;
    let mut report = ObjectGcReport {
        transfers_expired: expire(bucket, ns, settings, clock).await?,
        ..ObjectGcReport::default()
    };
    let live = mark(bucket, ns, refs).await?;
    report.chunks_live = live.len() as u64;
    sweep(bucket, ns, &live, &lease, settings, clock, &mut report).await?;
    // The run's record outlives the lease: a session whose record was written during the run checks it at its
    // commit, however late (rule C). Then the lease goes, and records too old to matter.
    bucket.put(&run_key(ns, at(lease.mark)), encode(&lease)).await?;
    bucket.delete(&lease_key(ns)).await?;
    prune_runs(bucket, ns, settings, clock).await?;
    Ok(report)
}

fn encode(lease: &Lease) -> Bytes {
    Bytes::from(serde_json::to_vec(lease).expect("a lease serialises"))
}

/// One run over every namespace of the store (`ns/*`, found by one delimited LIST), under the bucket prefix
/// `store_prefix` (for the key limit only: `store` already adds it). The reports are summed; the first failure
/// ends the run.
pub async fn collect_all<C: Clock>(
    store: &std::sync::Arc<dyn object_store::ObjectStore>,
    store_prefix: &str,
    settings: &GcSettings,
    clock: &C,
) -> Result<ObjectGcReport, ObjectGcError> {
    let listed = store.list_with_delimiter(Some(&Path::from("ns"))).await?;
    let mut total = ObjectGcReport::default();
    for dir in listed.common_prefixes {
        let Some(name) = dir.filename().and_then(namespace_name) else {
            continue; // not a namespace of ferry's
        };
        let layout = Layout::new(store_prefix, &name);
        let report = collect(store, &layout, &ManifestReferences, settings, clock).await?;
        tracing::info!(namespace = name, ?report, "object-store gc");
        total.transfers_expired += report.transfers_expired;
        total.chunks_live += report.chunks_live;
        total.chunks_young += report.chunks_young;
        total.chunks_deleted += report.chunks_deleted;
        total.bytes_freed += report.bytes_freed;
        total.stopped_at_deadline |= report.stopped_at_deadline;
    }
    Ok(total)
}

/// The namespace a `ns/<segment>` directory holds: `root` the unnamed one, else the hex of its name.
fn namespace_name(segment: &str) -> Option<String> {
    if segment == "root" {
        return Some(String::new());
    }
    if !segment.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..segment.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(segment.get(i..i + 2)?, 16).ok())
        .collect();
    let name = String::from_utf8(bytes?).ok()?;
    (Layout::new("", &name).namespace().filename() == Some(segment)).then_some(name)
}

/// Step 1: refuses while another run's lease is live; else writes ours, with M = now, before the mark.
async fn take_lease<B: Bucket, C: Clock>(
    bucket: &B,
    ns: &Layout,
    settings: &GcSettings,
    clock: &C,
) -> Result<Lease, ObjectGcError> {
    if let Some(held) = read_lease(bucket, &lease_key(ns)).await? {
        if at(held.deadline) > clock.now() {
            return Err(ObjectGcError::LeaseHeld { id: held.id });
        }
    }
    let mark = clock.now();
    let lease = Lease {
        id: format!("{:016x}", crate::random::u64()),
        mark: nanos(mark),
        deadline: nanos(mark + settings.grace / 2),
    };
    bucket.put(&lease_key(ns), encode(&lease)).await?;
    Ok(lease)
}

/// A lease or run record; `None` if absent or not one (an unreadable one is not a claim anyone can honour).
async fn read_lease<B: Bucket>(bucket: &B, key: &Path) -> Result<Option<Lease>, ObjectGcError> {
    match bucket.get(key).await {
        Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Step 2: deletes the journal, then the record, of every open transfer idle longer than the TTL (its last
/// activity: the newest `last_modified` among its record and journal objects), and journals whose record is gone
/// and which are as old. Returns the transfers expired.
async fn expire<B: Bucket, C: Clock>(
    bucket: &B,
    ns: &Layout,
    settings: &GcSettings,
    clock: &C,
) -> Result<u64, ObjectGcError> {
    // tid → (record keys, journal keys, newest activity)
    let mut transfers: BTreeMap<String, (Vec<Path>, Vec<Path>, SystemTime)> = BTreeMap::new();
    let mut note = |tid: &str, key: Path, modified: SystemTime, record: bool| {
        let entry = transfers
            .entry(tid.to_string())
            .or_insert((Vec::new(), Vec::new(), UNIX_EPOCH));
        if record { &mut entry.0 } else { &mut entry.1 }.push(key);
        entry.2 = entry.2.max(modified);
    };
    for meta in bucket.list(&sub(ns, "open")).await? {
        // open/<pid>/<tid>
        if let Some(tid) = meta.location.filename().map(str::to_string) {
            let when = modified(&meta);
            note(&tid, meta.location, when, true);
        }
    }
    let journal = sub(ns, "journal");
    for meta in bucket.list(&journal).await? {
        // journal/<tid>/<entry>
        let tid = meta.location.prefix_match(&journal).and_then(|mut parts| parts.next());
        if let Some(tid) = tid.map(|p| p.as_ref().to_string()) {
            note(&tid, meta.location.clone(), modified(&meta), false);
        }
    }
    let now = clock.now();
    let mut expired = 0;
    for (records, journal, newest) in transfers.into_values() {
        if now.duration_since(newest).unwrap_or_default() < settings.transfer_ttl {
            continue;
        }
        for key in journal.iter().chain(&records) {
            bucket.delete(key).await?;
        }
        expired += u64::from(!records.is_empty());
    }
    Ok(expired)
}

/// Step 3: every chunk named by `open/`, `versions/` and `files/`, listed in that order. A commit PUTs its
/// manifest object before it deletes its record, so a transfer whose record is gone (or goes before its GET) when
/// `open/` is listed is committed before `files/` is listed, and that later LIST names its chunks. Listing `files/`
/// first would let a commit fall between the two LISTs and its chunks be named by neither.
async fn mark<B: Bucket>(bucket: &B, ns: &Layout, refs: &dyn References) -> Result<HashSet<Hash>, ObjectGcError> {
    let mut live = HashSet::new();
    for prefix in ["open", "versions", "files"] {
        for meta in bucket.list(&sub(ns, prefix)).await? {
            let unreadable = |why: String| ObjectGcError::Unreadable {
                key: meta.location.to_string(),
                why,
            };
            if meta.size > MAX_MARKED_OBJECT {
                return Err(unreadable(format!(
                    "{} bytes, more than any manifest object",
                    meta.size
                )));
            }
            let bytes = match bucket.get(&meta.location).await {
                Ok(bytes) => bytes,
                // Deleted since the LIST (a commit removing its record): what it named is committed or expired.
                Err(object_store::Error::NotFound { .. }) => continue,
                Err(e) => return Err(e.into()),
            };
            live.extend(refs.chunks(&meta.location, &bytes).map_err(unreadable)?);
        }
    }
    Ok(live)
}

/// Step 4: deletes each unnamed chunk older than M − G, after a HEAD issued at most δ before its DELETE still
/// shows it that old; no DELETE after the deadline D.
async fn sweep<B: Bucket, C: Clock>(
    bucket: &B,
    ns: &Layout,
    live: &HashSet<Hash>,
    lease: &Lease,
    settings: &GcSettings,
    clock: &C,
    report: &mut ObjectGcReport,
) -> Result<(), ObjectGcError> {
    let old_before = at(lease.mark).checked_sub(settings.grace).unwrap_or(UNIX_EPOCH);
    for meta in bucket.list(&sub(ns, "chunks")).await? {
        let Some(hash) = ns.parse_chunk(&meta.location) else {
            continue; // not a chunk object: not gc's to delete
        };
        if live.contains(&hash) {
            continue;
        }
        if modified(&meta) >= old_before {
            report.chunks_young += 1;
            continue;
        }
        let headed = clock.now();
        if headed >= at(lease.deadline) {
            report.stopped_at_deadline = true;
            return Ok(());
        }
        let now = match bucket.head(&meta.location).await {
            Ok(now) => now,
            Err(object_store::Error::NotFound { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        if modified(&now) >= old_before {
            report.chunks_young += 1;
            continue;
        }
        let deleting = clock.now();
        if deleting >= at(lease.deadline) {
            report.stopped_at_deadline = true;
            return Ok(());
        }
        if deleting.duration_since(headed).unwrap_or_default() > settings.delta {
            continue; // the HEAD is stale: left for the next run
        }
        bucket.delete(&meta.location).await?;
        report.chunks_deleted += 1;
        report.bytes_freed += now.size;
    }
    Ok(())
}

/// Deletes run records whose deadline is older than any open transfer can be (TTL + G).
async fn prune_runs<B: Bucket, C: Clock>(
    bucket: &B,
    ns: &Layout,
    settings: &GcSettings,
    clock: &C,
) -> Result<(), ObjectGcError> {
    let keep_after = clock
        .now()
        .checked_sub(settings.transfer_ttl + settings.grace)
        .unwrap_or(UNIX_EPOCH);
    for meta in bucket.list(&sub(ns, "gc").join("runs")).await? {
        if let Some(run) = read_lease(bucket, &meta.location).await? {
            if at(run.deadline) < keep_after {
                bucket.delete(&meta.location).await?;
            }
        }
    }
    Ok(())
}

/// Rule R (c): a session may rely on a chunk it saw in a LIST (after writing its record) only if that listing
/// showed it younger than G/2; any other existing chunk is an orphan, asked for like a missing one.
pub fn listed_young(last_modified: SystemTime, now: SystemTime, grace: Duration) -> bool {
    now.duration_since(last_modified).unwrap_or_default() < grace / 2
}

/// Rule C, before a session's commit PUT: if a gc run (its lease, or the record of a finished run) marked before
/// the session's record was written (`record_created`) and could still delete when it was, wait until δ + the
/// request timeout past the newest of the chunks the session relied on or PUT (`relied`: hash and when it
/// was PUT or listed), then LIST their shards. Returns the chunks that are gone, to be asked for again; nearly
/// always empty without a request beyond one LIST of `gc/`.
pub async fn confirm_before_commit<B: Bucket, C: Clock>(
    bucket: &B,
    ns: &Layout,
    record_created: SystemTime,
    relied: &[(Hash, SystemTime)],
    settings: &GcSettings,
    clock: &C,
) -> Result<Vec<Hash>, ObjectGcError> {
    let mut overlapping = false;
    for meta in bucket.list(&sub(ns, "gc")).await? {
        if let Some(run) = read_lease(bucket, &meta.location).await? {
            overlapping |= at(run.mark) < record_created && at(run.deadline) > record_created;
        }
    }
    if !overlapping || relied.is_empty() {
        return Ok(Vec::new());
    }
    let newest = relied.iter().map(|(_, t)| *t).max().unwrap_or(UNIX_EPOCH);
    clock
        .sleep_until(newest + settings.delta + settings.request_timeout)
        .await;
    let mut present = HashSet::new();
    let shards: BTreeSet<Path> = relied.iter().map(|(hash, _)| ns.chunk_shard(hash[0])).collect();
    for shard in shards {
        let listed = bucket.list(&shard).await?;
        present.extend(listed.iter().filter_map(|m| ns.parse_chunk(&m.location)));
    }
    let mut missing: Vec<Hash> = relied
        .iter()
        .map(|(h, _)| *h)
        .filter(|h| !present.contains(h))
        .collect();
    missing.sort_unstable();
    missing.dedup();
    Ok(missing)
}

fn modified(meta: &ObjectMeta) -> SystemTime {
    SystemTime::from(meta.last_modified)
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn at(nanos: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(nanos)
}
