//! [`TreeVolume`]: where the tree receiver puts what is not a big file: small files committed whole, directories
//! and recorded symlinks (proto-spec.md, "Trees").
//!
//! A separate seam from [`super::Volume`] because its unit is a batch, not a transfer: the small-file writer
//! stages each verified file ([`TreeVolume::stage`]), then settles a whole group of them at once
//! ([`TreeVolume::settle`]: make them durable, give each its final name atomically, make the names durable), and
//! only then records the group and acknowledges it. The names may instead be made durable by the next group's
//! settle ([`TreeVolume::settle_deferring_names`]): the group is then recorded and acknowledged one settle later. That order is the crash-safety contract of a single file
//! (a final name only ever holds verified, durable bytes; the record follows the name; the Ack follows the
//! record), paid once per batch instead of once per file.
//!
//! Implementations: [`super::LocalVolume`] (temporaries in the partial directory, one `syncfs` per batch, renames
//! through directory descriptors: `local_tree.rs`), and `object::ObjectTrees` (bytes held in memory until the batch's
//! PUTs: `object/tree.rs`), which also records what it commits ([`TreeVolume::keeps_records`]) and prunes itself
//! ([`TreeVolume::prune_beyond`]).

use std::fmt::Debug;
use std::io;

use super::Identity;
use crate::manifest::{FileTime, Hash, Manifest};
use crate::path::RemotePath;

/// A small file written where it is not yet visible under its name, as [`TreeVolume::stage`] returns it.
#[derive(Debug, Clone)]
pub struct Staged {
    /// Where the staged bytes are, in the words of the volume (a temporary file's path).
    pub location: String,
    /// What was written: the file the final name must hold after [`TreeVolume::settle`].
    pub identity: Identity,
}

/// A file committed in a volume that records its files itself ([`TreeVolume::stored_file`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredFile {
    /// Length in bytes.
    pub size: u64,
    /// Whole-file BLAKE3 digest.
    pub digest: Hash,
    /// Modification time.
    pub mtime: FileTime,
}

/// What [`TreeVolume::prune_beyond`] removed, and what it could not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Removed entries, relative to the tree's directory, each after what it contained.
    pub removed: Vec<String>,
    /// Entries that could not be removed, with the reason.
    pub failed: Vec<(String, String)>,
}

/// A committed tree copied out of a volume whose files are not local files (a pull from an object store): the
/// copy lives in `dir` at the tree's own path below it, and `manifests` holds each file's committed manifest by its
/// path in the tree (so nothing is rehashed). Removed when dropped.
#[derive(Debug)]
pub struct TreeCopy {
    /// The temporary directory holding the copy under the tree's path.
    pub dir: tempfile::TempDir,
    /// The committed manifest of each file, by its path relative to the tree.
    pub manifests: std::collections::HashMap<String, Manifest>,
}

/// Names a [`TreeVolume::settle_deferring_names`] placed that are not durable yet (on a local disk: the
/// directories renamed into, open). Hand them to the next `settle_deferring_names` or to
/// [`TreeVolume::sync_names`] before relying on them; dropped, they stay as durable as the disk makes them.
#[derive(Debug, Default)]
pub struct PendingNames {
    /// The directories to sync.
    pub(crate) dirs: Vec<std::fs::File>,
}

impl PendingNames {
    /// Whether there is nothing to make durable.
    pub fn is_empty(&self) -> bool {
        self.dirs.is_empty()
    }
}

/// What [`TreeVolume::settle`] did with one staged file: placed (its identity, as the store records it), or
/// refused with the reason (a directory or a symlink in the way, the staged file replaced meanwhile).
pub type Settled = Result<Identity, String>;

/// One read for [`TreeVolume::read_committed_many`]: `len` bytes at `offset` of the committed file at `path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedRead {
    /// The committed file's path, as the store's chunk locations name it.
    pub path: String,
    /// Where the bytes start in the file.
    pub offset: u64,
    /// How many bytes.
    pub len: usize,
}

/// The tree receiver's storage for small files, directories and symlinks. Every method is blocking: call from
/// blocking threads.
pub trait TreeVolume: Send + Sync + Debug {
    /// Creates the directory `key` and its parents if missing, never through a symlink; the error is the reason
    /// reported for the entry.
    fn make_dir(&self, key: &RemotePath) -> Result<(), String>;
    /// [`TreeVolume::make_dir`] of every key of `keys`, one result each, in order; all are durable when it
    /// returns. The default makes them one at a time; a local disk syncs each parent directory once for all.
    fn make_all_dirs(&self, keys: &[RemotePath]) -> Vec<Result<(), String>> {
        keys.iter().map(|key| self.make_dir(key)).collect()
    }
    /// Makes `key` a symlink to `target` (already checked to stay inside the tree rooted at `base`, `link` being
    /// its path in the tree), replacing a file or a symlink there atomically; the error is the refusal reason.
    fn place_symlink(
        &self,
        base: Option<&RemotePath>,
        link: &str,
        key: &RemotePath,
        target: &str,
    ) -> Result<(), String>;
    /// Applies mode and mtime to the directories `dirs` that exist, in the order given; best effort (a failure is
    /// logged).
    fn set_dir_metadata(&self, dirs: &[(RemotePath, u32, FileTime)]);
    /// Why a file could not be placed at `key`, when that is already known (a symlink or a directory at its name,
    /// a non-directory among its parents).
    fn blocked(&self, key: &RemotePath) -> Option<String>;
    /// Whether the file at `key` is still the one committed with this length, inode and mtime.
    fn unchanged(&self, key: &RemotePath, len: u64, inode: u64, mtime: FileTime) -> bool;
    /// `len` bytes at `offset` of the committed file at `path` (not verified: the caller checks them).
    fn read_committed(&self, path: &str, offset: u64, len: usize) -> Option<Vec<u8>>;
    /// [`TreeVolume::read_committed`] of every `(path, offset, len)` of `reads`, in order. The default reads one
    /// at a time; a store with slow round trips overrides it to read several at once. The caller bounds the total
    /// of `len`s (a batch's byte budget) and verifies every result.
    fn read_committed_many(&self, reads: &[CommittedRead]) -> Vec<Option<Vec<u8>>> {
        reads
            .iter()
            .map(|r| self.read_committed(&r.path, r.offset, r.len))
            .collect()
    }
    /// Writes a verified file's bytes, mode and mtime where no reader sees them yet.
    fn stage(&self, key: &RemotePath, data: &[u8], mode: u32, mtime: FileTime) -> io::Result<Staged>;
    /// Removes a staged file that will not be settled (best effort).
    fn discard(&self, staged: &Staged);
    /// Makes the staged files durable, places each under its key atomically (checking it is the file staged), and
    /// makes the names durable; one result per file, in order. An I/O failure fails the whole group; whatever was
    /// not placed is discarded on every path.
    fn settle(&self, files: Vec<(RemotePath, Staged)>) -> io::Result<Vec<Settled>>;
    /// [`TreeVolume::settle`], except that the names placed may not be durable yet: they are once a later
    /// `settle_deferring_names` (given them as `earlier`) or [`TreeVolume::sync_names`] returns `Ok`. This call
    /// makes `earlier` durable before it returns `Ok` (on a local disk the `syncfs` that makes this group's bytes
    /// durable does it: one flush per group instead of two). The default settles with durable names at once.
    fn settle_deferring_names(
        &self,
        files: Vec<(RemotePath, Staged)>,
        earlier: PendingNames,
    ) -> io::Result<(Vec<Settled>, PendingNames)> {
        drop(earlier);
        Ok((self.settle(files)?, PendingNames::default()))
    }
    /// Makes the names `pending` durable (placed by [`TreeVolume::settle_deferring_names`]). The default has
    /// nothing to do: its names are durable when placed.
    fn sync_names(&self, pending: PendingNames) -> io::Result<()> {
        drop(pending);
        Ok(())
    }
    /// Removes the partial of a transfer that a whole file replaced (`location` as the store recorded it); best
    /// effort, a leftover is expired later.
    fn remove_partial(&self, location: &str);

    /// Whether this volume itself records the files it holds ([`TreeVolume::stored_file`] is the truth, a shared
    /// store's), rather than the receiver's store records (a local disk). False by default.
    fn keeps_records(&self) -> bool {
        false
    }

    /// The file committed at `key`, as this volume records it (only when [`TreeVolume::keeps_records`]).
    fn stored_file(&self, key: &RemotePath) -> Option<StoredFile> {
        let _ = key;
        None
    }

    /// [`TreeVolume::stored_file`] of every key of `keys`, in order (a store with slow round trips asks at once).
    fn stored_files(&self, keys: &[RemotePath]) -> Vec<Option<StoredFile>> {
        keys.iter().map(|key| self.stored_file(key)).collect()
    }

    /// `--delete` done by the volume itself: removes every entry under the tree directory `base` that `held` does
    /// not know (`held(path)` is `Some(true)` for a directory of the tree, `Some(false)` for another entry, whose
    /// insides are left alone), never anything outside `base`. `None` (the default): the caller walks the
    /// directory itself.
    fn prune_beyond(&self, base: &RemotePath, held: &dyn Fn(&str) -> Option<bool>) -> Option<io::Result<Pruned>> {
        let _ = (base, held);
        None
    }
}
