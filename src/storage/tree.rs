//! [`TreeVolume`]: where the tree receiver puts what is not a big file: small files committed whole, directories
//! and recorded symlinks (proto-spec.md, "Trees").
//!
//! A separate seam from [`super::Volume`] because its unit is a batch, not a transfer: the small-file writer
//! stages each verified file ([`TreeVolume::stage`]), then settles a whole group of them at once
//! ([`TreeVolume::settle`]: make them durable, give each its final name atomically, make the names durable), and
//! only then records the group and acknowledges it. That order is the crash-safety contract of a single file
//! (a final name only ever holds verified, durable bytes; the record follows the name; the Ack follows the
//! record), paid once per batch instead of once per file.
//!
//! Implementations: [`super::LocalVolume`] (temporaries in the partial directory, one `syncfs` per batch, renames
//! through directory descriptors: `local_tree.rs`).

use std::fmt::Debug;
use std::io;

use super::Identity;
use crate::manifest::FileTime;
use crate::path::RemotePath;

/// A small file written where it is not yet visible under its name, as [`TreeVolume::stage`] returns it.
#[derive(Debug, Clone)]
pub struct Staged {
    /// Where the staged bytes are, in the words of the volume (a temporary file's path).
    pub location: String,
    /// What was written: the file the final name must hold after [`TreeVolume::settle`].
    pub identity: Identity,
}

/// What [`TreeVolume::settle`] did with one staged file: placed (its identity, as the store records it), or
/// refused with the reason (a directory or a symlink in the way, the staged file replaced meanwhile).
pub type Settled = Result<Identity, String>;

/// The tree receiver's storage for small files, directories and symlinks. Every method is blocking: call from
/// blocking threads.
pub trait TreeVolume: Send + Sync + Debug {
    /// Creates the directory `key` and its parents if missing, never through a symlink; the error is the reason
    /// reported for the entry.
    fn make_dir(&self, key: &RemotePath) -> Result<(), String>;
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
    /// Writes a verified file's bytes, mode and mtime where no reader sees them yet.
    fn stage(&self, key: &RemotePath, data: &[u8], mode: u32, mtime: FileTime) -> io::Result<Staged>;
    /// Removes a staged file that will not be settled (best effort).
    fn discard(&self, staged: &Staged);
    /// Makes the staged files durable, places each under its key atomically (checking it is the file staged), and
    /// makes the names durable; one result per file, in order. An I/O failure fails the whole group; whatever was
    /// not placed is discarded on every path.
    fn settle(&self, files: Vec<(RemotePath, Staged)>) -> io::Result<Vec<Settled>>;
    /// Removes the partial of a transfer that a whole file replaced (`location` as the store recorded it); best
    /// effort, a leftover is expired later.
    fn remove_partial(&self, location: &str);
}
