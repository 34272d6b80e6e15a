//! Namespace limits: the bytes a receiver root may hold (its quota: committed files, open transfers and their
//! manifests together), how many transfers it may keep open, how many bytes their manifests may take in the
//! store, and how many entries (inodes: files, directories, symlinks) it and one tree may create (proto-spec.md
//! §3a and §10).
//!
//! Checked when a file is offered, against the small records of the store (sizes, never manifests): a file that
//! replaces a committed one (or an open transfer) at the same path is counted once. The check and the write of the
//! transfer's record happen under the namespace's [`Admission`] lock, so offers arriving together are counted one
//! after another and cannot all fit the same free space. A tree's small files have no record until they are
//! committed, so its [`Budget`] reserves their bytes in the lock's memory until then: offers count them, and the
//! tree counts what was admitted since it was planned (its large files are admitted one by one like any offer).
//!
//! On a volume shared by a group of servers (an object store), the records of the store are not the namespace's
//! usage: [`admit_shared`] checks the same limits against what the volume reads from the shared store instead
//! (`Volume::shared_usage`: every server's files and open transfers; docs/object-store.md "Quotas, namespaces and
//! limits"); the lock stays per server.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::TransferError;
use crate::path::RemotePath;
use crate::storage::{OpenAtPath, SharedUsage};
use crate::store::{ReceiverStore, Usage};
use crate::wire::ErrorCode;

/// Default for [`NamespaceLimits::max_open_transfers`].
pub const DEFAULT_MAX_OPEN_TRANSFERS: u64 = 1024;
/// Default for [`NamespaceLimits::max_manifest_bytes`]: one maximal manifest (500,000 chunks, 22 MB) and room
/// beside it. The store keeps what it holds in memory too, so this bounds a namespace's share of the server's
/// memory as well as of its disk.
pub const DEFAULT_MAX_MANIFEST_BYTES: u64 = 32 * 1024 * 1024;
/// Default for [`NamespaceLimits::max_entries`].
pub const DEFAULT_MAX_ENTRIES: u64 = 1_000_000;

/// What one namespace may keep open on a receiver, besides its byte quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NamespaceLimits {
    /// Most open (uncommitted) transfers; an Offer for another path beyond it gets `TooManyTransfers`.
    pub max_open_transfers: u64,
    /// Most bytes the records of open transfers (their manifests, mostly) may take in the store together.
    pub max_manifest_bytes: u64,
    /// Most entries (inodes) the namespace may hold: committed files, open transfers, and the directories and
    /// symlinks trees created. What would go beyond is refused with `QuotaExceeded`.
    pub max_entries: u64,
    /// Most entries in one TreeOffer (at most [`crate::MAX_TREE_ENTRIES`]); a larger one is `BadManifest`.
    pub max_tree_entries: usize,
}

impl NamespaceLimits {
    /// A server's defaults.
    pub const DEFAULT: NamespaceLimits = NamespaceLimits {
        max_open_transfers: DEFAULT_MAX_OPEN_TRANSFERS,
        max_manifest_bytes: DEFAULT_MAX_MANIFEST_BYTES,
        max_entries: DEFAULT_MAX_ENTRIES,
        max_tree_entries: crate::MAX_TREE_ENTRIES,
    };
    /// No limits (a pulling client receiving into its own directory).
    pub const UNLIMITED: NamespaceLimits = NamespaceLimits {
        max_open_transfers: u64::MAX,
        max_manifest_bytes: u64::MAX,
        max_entries: u64::MAX,
        max_tree_entries: crate::MAX_TREE_ENTRIES,
    };
}

impl Default for NamespaceLimits {
    fn default() -> Self {
        NamespaceLimits::DEFAULT
    }
}

/// How long a count of a namespace's committed files serves the entry budget before it is counted again (a
/// quota, which needs exact bytes, always counts afresh).
const COMMITTED_COUNT_TTL: Duration = Duration::from_secs(30);

/// Serialises the admission of transfers in one namespace: whoever holds it checks the records and writes its own
/// before letting go. One per namespace (cloning shares it).
#[derive(Clone, Default)]
pub struct Admission(Arc<Mutex<Counted>>);

/// What the admission lock remembers between offers.
#[derive(Default)]
pub(crate) struct Counted {
    /// The number of committed files, and when it was counted.
    committed_files: Option<(Instant, u64)>,
    /// Bytes trees reserved for small files not committed yet (no record shows them).
    reserved: u64,
    /// Bytes admitted or reserved so far, ever growing: a tree's budget adds what grew since it last looked.
    admitted: u64,
}

impl Admission {
    /// Waits for the namespace's turn. Blocking.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Counted> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A transfer to be opened (or re-opened with another manifest) at `path`.
pub(crate) struct NewTransfer<'a> {
    /// Destination key.
    pub path: &'a str,
    /// File size.
    pub size: u64,
    /// Encoded bytes of its record (the manifest, mostly).
    pub record_bytes: u64,
}

/// Checks that opening `new` keeps the namespace within `quota` and `limits`; what is open at the same path is
/// replaced, a committed file there counted once. Call with the namespace's [`Admission`] lock held (`counted`)
/// and write the record before letting it go. Reads the open transfers' summaries; the committed files only for a
/// quota (every time) or for the entry budget (at most every [`COMMITTED_COUNT_TTL`]). Blocking.
pub(crate) fn admit(
    store: &ReceiverStore,
    quota: Option<u64>,
    limits: &NamespaceLimits,
    new: &NewTransfer<'_>,
    counted: &mut Counted,
) -> Result<(), TransferError> {
    if quota.is_none() && *limits == NamespaceLimits::UNLIMITED {
        return Ok(());
    }
    let mut usage = store.open_usage()?;
    usage.open_bytes = usage.open_bytes.saturating_add(counted.reserved);
    if quota.is_some() {
        let (bytes, files) = store.committed_usage()?;
        (usage.committed_bytes, usage.committed_files) = (bytes, files);
        counted.committed_files = Some((Instant::now(), files));
    } else if limits.max_entries != u64::MAX {
        usage.committed_files = match counted.committed_files {
            Some((at, files)) if at.elapsed() < COMMITTED_COUNT_TTL => files,
            _ => {
                let (_, files) = store.committed_usage()?;
                counted.committed_files = Some((Instant::now(), files));
                files
            }
        };
    }
    let open = store.summary(new.path)?;
    let counts = Counts {
        usage,
        open_here: open.as_ref().map_or(OpenAtPath::default(), |s| OpenAtPath {
            records: 1,
            bytes: s.size,
            manifest_bytes: s.manifest_bytes,
        }),
        committed_here: store.committed(new.path)?.map(|f| f.size),
    };
    check(&counts, quota, limits, new)?;
    counted.admitted = counted
        .admitted
        .saturating_add(new.size.saturating_add(new.record_bytes));
    Ok(())
}

/// [`admit`] on a volume that records the namespace's usage itself (a shared store, docs/object-store.md
/// "Quotas, namespaces and limits"): `shared` is what the store holds now, every server's files and open
/// transfers, `new`'s own record (written or adopted before this check) replaced by it. The trees' reservations
/// and directories of this server's records are added. Call with the namespace's [`Admission`] lock held.
/// Blocking.
pub(crate) fn admit_shared(
    store: &ReceiverStore,
    shared: &SharedUsage,
    quota: Option<u64>,
    limits: &NamespaceLimits,
    new: &NewTransfer<'_>,
    counted: &mut Counted,
) -> Result<(), TransferError> {
    let counts = Counts {
        usage: Usage {
            committed_bytes: shared.committed_bytes,
            committed_files: shared.committed_files,
            open_bytes: shared.open_bytes.saturating_add(counted.reserved),
            open_transfers: shared.open_transfers,
            manifest_bytes: shared.manifest_bytes,
            tree_inodes: store.open_usage()?.tree_inodes,
        },
        open_here: shared.this_transfer,
        committed_here: shared.committed_here,
    };
    check(&counts, quota, limits, new)?;
    counted.admitted = counted
        .admitted
        .saturating_add(new.size.saturating_add(new.record_bytes));
    Ok(())
}

/// What admission reads of a namespace and of the offered path.
struct Counts {
    /// The namespace's usage, the offered path's open transfer included.
    usage: Usage,
    /// The open transfer at the offered path, which the new one replaces.
    open_here: OpenAtPath,
    /// The size of the file committed at the offered path, which the new one replaces.
    committed_here: Option<u64>,
}

/// The limits and the quota against `counts`, with `new` replacing what is open or committed at its path.
fn check(
    counts: &Counts,
    quota: Option<u64>,
    limits: &NamespaceLimits,
    new: &NewTransfer<'_>,
) -> Result<(), TransferError> {
    let (usage, open) = (&counts.usage, &counts.open_here);
    let transfers = usage.open_transfers.saturating_sub(open.records) + 1;
    if transfers > limits.max_open_transfers {
        return Err(TransferError::refused(
            ErrorCode::TooManyTransfers,
            format!(
                "this namespace already has {} open transfers, the limit is {}: finish them (ferry status \
                 --server lists them) or let them expire",
                usage.open_transfers.saturating_sub(open.records),
                limits.max_open_transfers
            ),
        ));
    }
    let manifests = usage
        .manifest_bytes
        .saturating_sub(open.manifest_bytes)
        .saturating_add(new.record_bytes);
    if manifests > limits.max_manifest_bytes {
        return Err(TransferError::refused(
            ErrorCode::TooManyTransfers,
            format!(
                "the manifests of this namespace's open transfers would take {manifests} bytes, the limit is {}: \
                 finish them or let them expire",
                limits.max_manifest_bytes
            ),
        ));
    }
    if counts.committed_here.is_none() && open.records == 0 && usage.entries() >= limits.max_entries {
        return Err(over_entries(new.path, limits.max_entries));
    }
    if let Some(quota) = quota {
        let replaced = counts.committed_here.unwrap_or(0);
        let open_bytes = open.bytes.saturating_add(open.manifest_bytes);
        let after = usage
            .held_bytes()
            .saturating_sub(replaced.saturating_add(open_bytes))
            .saturating_add(new.size.saturating_add(new.record_bytes));
        if after > quota {
            return Err(over_quota(new.path, new.size, after, quota));
        }
    }
    Ok(())
}

fn over_entries(path: &str, limit: u64) -> TransferError {
    TransferError::refused(
        ErrorCode::QuotaExceeded,
        format!("{path} would take this namespace over its budget of {limit} entries (files, directories, links)"),
    )
}

fn over_quota(path: &str, size: u64, after: u64, quota: u64) -> TransferError {
    TransferError::refused(
        ErrorCode::QuotaExceeded,
        format!("{path} ({size} bytes) would bring this namespace to {after} bytes, over its quota of {quota} bytes"),
    )
}

/// What a namespace may still take, tracked across the files of one offer (a tree). Small files (sent whole, with
/// no record until committed) stay reserved in the namespace's [`Admission`] until [`Budget::release`]d or the
/// budget is dropped.
pub(crate) struct Budget {
    quota: u64,
    held: u64,
    admission: Admission,
    /// `Counted::admitted` when this budget last looked.
    seen: u64,
    /// Bytes this budget reserved and has not released.
    reserved: u64,
}

impl Budget {
    /// Reads what the namespace holds now, reservations of other trees included: from `shared` when the volume
    /// counts the namespace itself (a shared store: every server's files and open transfers), else from this
    /// server's records. Blocking.
    pub fn open(
        store: &ReceiverStore,
        quota: u64,
        admission: &Admission,
        shared: Option<&SharedUsage>,
    ) -> Result<Budget, TransferError> {
        let held = match shared {
            Some(s) => s
                .committed_bytes
                .saturating_add(s.open_bytes)
                .saturating_add(s.manifest_bytes),
            None => store.held_bytes()?,
        };
        let counted = admission.lock();
        Ok(Budget {
            quota,
            held: held.saturating_add(counted.reserved),
            seen: counted.admitted,
            admission: admission.clone(),
            reserved: 0,
        })
    }

    /// Takes `size` bytes for the file at `path`, or refuses with `QuotaExceeded` (nothing taken); the bytes of a
    /// `small` file stay reserved until released. `stored` is the size of the file the volume holds at `path`
    /// when the volume records its files itself (`Some(0)`: none), `None` to read this server's records. Blocking.
    pub fn take(
        &mut self,
        store: &ReceiverStore,
        path: &str,
        size: u64,
        small: bool,
        stored: Option<u64>,
    ) -> Result<(), TransferError> {
        let replaced = match stored {
            Some(size) => size,
            None => store.committed(path)?.map_or(0, |f| f.size),
        };
        let resumed = store
            .summary(path)?
            .map_or(0, |t| t.size.saturating_add(t.manifest_bytes));
        let mut counted = self.admission.lock();
        // What others admitted or reserved since this budget last looked.
        self.held = self.held.saturating_add(counted.admitted.saturating_sub(self.seen));
        let after = self
            .held
            .saturating_sub(replaced.saturating_add(resumed))
            .saturating_add(size);
        if after > self.quota {
            self.seen = counted.admitted;
            return Err(over_quota(path, size, after, self.quota));
        }
        self.held = after;
        if small {
            counted.reserved = counted.reserved.saturating_add(size);
            counted.admitted = counted.admitted.saturating_add(size);
            self.reserved = self.reserved.saturating_add(size);
        }
        self.seen = counted.admitted;
        Ok(())
    }

    /// Lets go of `size` reserved bytes: the file was committed (its record counts now) or will not come.
    pub fn release(&mut self, size: u64) {
        let size = size.min(self.reserved);
        self.reserved -= size;
        let mut counted = self.admission.lock();
        counted.reserved = counted.reserved.saturating_sub(size);
    }
}

impl Drop for Budget {
    fn drop(&mut self) {
        let rest = self.reserved;
        self.release(rest);
    }
}

/// The entries (inodes) a namespace may still create, tracked across the entries of one tree: what placing an
/// entry creates is counted (its missing parent directories, once each, and the entry itself if nothing is at its
/// path yet); what already exists costs nothing.
pub(crate) struct EntryBudget {
    left: u64,
    limit: u64,
    /// Directories this tree counted (BLAKE3 of their path, truncated: no collisions to craft).
    counted: HashSet<[u8; 16]>,
    /// Directories and symlinks counted: recorded for the namespace when the tree is planned.
    dirs_and_links: u64,
}

impl EntryBudget {
    /// Reads what the namespace holds now: from `shared` when the volume counts the namespace itself (every
    /// server's entries and open transfers), else from this server's records. Blocking.
    pub fn open(store: &ReceiverStore, limit: u64, shared: Option<&SharedUsage>) -> Result<EntryBudget, TransferError> {
        let entries = match shared {
            Some(s) => s.committed_files.saturating_add(s.open_transfers),
            None => store.usage()?.entries(),
        };
        Ok(EntryBudget {
            left: limit.saturating_sub(entries),
            limit,
            counted: HashSet::new(),
            dirs_and_links: 0,
        })
    }

    /// Takes what placing `key` (a file unless `dir_or_link`) under `root` creates, or refuses it with the reason
    /// (nothing taken). Blocking: a `stat` per missing component.
    pub fn take(&mut self, root: &Path, key: &RemotePath, dir_or_link: bool) -> Result<(), String> {
        let components: Vec<&str> = key.components().collect();
        let mut missing = Vec::new();
        // Whether the parent was missing when looked at (by this call, or as counted before): then so is the entry,
        // and it needs no `stat` of its own (a fresh tree's files cost none).
        let mut parent_missing = false;
        // The parents, deepest first, up to one that exists or was counted already.
        for depth in (1..components.len()).rev() {
            let parent = components[..depth].join("/");
            let id = path_id(&parent);
            if self.counted.contains(&id) {
                parent_missing |= depth + 1 == components.len();
                break;
            }
            if std::fs::symlink_metadata(root.join(&parent)).is_ok() {
                break;
            }
            parent_missing |= depth + 1 == components.len();
            missing.push(id);
        }
        let id = path_id(key.as_str());
        let itself = !self.counted.contains(&id)
            && (parent_missing || std::fs::symlink_metadata(root.join(key.as_str())).is_err());
        let cost = missing.len() as u64 + u64::from(itself);
        if cost > self.left {
            return Err(format!(
                "{key} would take this namespace over its budget of {} entries (files, directories, links)",
                self.limit
            ));
        }
        self.left -= cost;
        self.dirs_and_links += missing.len() as u64 + u64::from(itself && dir_or_link);
        self.counted.extend(missing);
        if itself && dir_or_link {
            self.counted.insert(id);
        }
        Ok(())
    }

    /// Records the directories and symlinks this tree counted against the namespace. Blocking.
    pub fn finish(self, store: &ReceiverStore, admission: &Admission) -> Result<(), TransferError> {
        let _turn = admission.lock();
        store.add_tree_inodes(self.dirs_and_links)?;
        Ok(())
    }
}

fn path_id(path: &str) -> [u8; 16] {
    let hash = blake3::hash(path.as_bytes());
    let mut id = [0; 16];
    id.copy_from_slice(&hash.as_bytes()[..16]);
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(limit: u64) -> EntryBudget {
        EntryBudget {
            left: limit,
            limit,
            counted: HashSet::new(),
            dirs_and_links: 0,
        }
    }

    fn key(path: &str) -> RemotePath {
        RemotePath::parse(path).unwrap()
    }

    /// A file under a directory found missing is counted without a look of its own, once; a file already on
    /// disk, or under a directory that exists, is counted only if it is not there.
    #[test]
    fn entries_under_missing_and_existing_directories_are_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("old")).unwrap();
        std::fs::write(dir.path().join("old/kept"), b"x").unwrap();
        let mut entries = budget(10);
        entries.take(dir.path(), &key("new/sub/a"), false).unwrap();
        assert_eq!(entries.left, 7, "new, new/sub and a");
        entries.take(dir.path(), &key("new/sub/b"), false).unwrap();
        entries.take(dir.path(), &key("new/c"), false).unwrap();
        assert_eq!(entries.left, 5, "b and c: their directories were counted");
        entries.take(dir.path(), &key("old/kept"), false).unwrap();
        assert_eq!(entries.left, 5, "a file on disk adds no entry");
        entries.take(dir.path(), &key("old/added"), false).unwrap();
        assert_eq!(entries.left, 4);
        entries.take(dir.path(), &key("new/d"), true).unwrap();
        entries.take(dir.path(), &key("new/d/e"), false).unwrap();
        assert_eq!((entries.left, entries.dirs_and_links), (2, 3));
        let mut small = budget(2);
        assert!(small.take(dir.path(), &key("x/y/z"), false).is_err());
        assert_eq!(small.left, 2, "nothing taken on a refusal");
    }
}
