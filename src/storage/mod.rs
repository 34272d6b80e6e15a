//! The receiver's storage seam: every byte and every name the big-file receiver touches goes through here.
//!
//! The engine (`transfer::receiver`, `writer`, `reuse`, `commit`) speaks in transfers and destinations: it asks a
//! [`Volume`] to prepare a destination, to open (or resume) the partial of a key, for the file committed at a path,
//! and to put a verified partial in place; it writes, reads and syncs the partial through its [`PartialFile`]
//! handle. The order in which it calls them is the crash-safety contract (proto-spec.md §8, docs/storage.md):
//!
//! 1. [`PartialFile::write_at`] verified chunks, then [`PartialFile::sync_data`] (or [`PartialFile::start_sync`]
//!    and its end), and only then the store records them received (and the sender hears an Ack);
//! 2. at commit: [`PartialFile::set_metadata`], [`PartialFile::sync_all`], [`Volume::place`] (the atomic rename),
//!    [`Directory::sync`] (the rename made durable), and only then the store records the file committed.
//!
//! A re-push that mostly matches the committed file may instead get an in-place partial
//! ([`Volume::open_in_place`], `journal`): the same calls, but writes go to a redo journal over the committed file,
//! and [`Volume::place`] seals and applies the journal instead of renaming; [`Volume::recover`] finishes a sealed
//! journal after a crash. Both methods have defaults (no in-place), so a volume need not support it.
//!
//! Two implementations: [`LocalVolume`] (plain files under the root, partials in `.ferry/partial/`), and, for tests,
//! `sim::SimVolume`, a simulated disk that loses or tears every write not yet synced when it "loses power", so a
//! test can prove the order above, not only that the page cache survives a SIGKILL. The tree receiver's small
//! files, directories and symlinks go through their own seam, [`TreeVolume`] (`tree.rs`).

mod direct;
mod direct_reads;
pub(crate) mod journal;
pub mod local;
mod local_tree;
pub mod object;
pub mod object_gc;
mod pending;
#[cfg(test)]
pub(crate) mod sim;
mod syncer;
pub mod tree;

use std::io;
use std::sync::Arc;

use thiserror::Error;

use crate::manifest::{ChunkEntry, Chunking, FileTime, Hash, Manifest};
use crate::path::{PathError, RemotePath};
use crate::ranges::ChunkSet;

pub use direct::set_direct_io;
pub use local::LocalVolume;
#[cfg(test)]
pub(crate) use local_tree::set_dir_metadata_with;
pub use pending::PendingSync;
pub use tree::{CommittedRead, PendingNames, Pruned, Settled, Staged, StoredFile, TreeCopy, TreeVolume};

/// Positional reads, for the digest follower, the commit's verification and reuse.
pub trait ReadAt: Send + Sync {
    /// Reads up to `buf.len()` bytes at `offset`; 0 at the end of the file.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;

    /// Fills `buf` from `offset`, failing with `UnexpectedEof` at the end of the file.
    fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, offset) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The file's current length in bytes.
    fn size(&self) -> io::Result<u64>;
}

impl ReadAt for std::fs::File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(self, buf, offset)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}

impl<T: ReadAt + ?Sized> ReadAt for Arc<T> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        (**self).read_at(buf, offset)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }

    fn size(&self) -> io::Result<u64> {
        (**self).size()
    }
}

/// Which file a name holds, and what the store records of it at commit: a file renamed into place must be the one
/// whose digest was verified (same device and inode), and a committed file is "unchanged" while its inode, size and
/// mtime are those recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// Device number.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// Length in bytes.
    pub len: u64,
    /// Modification time.
    pub mtime: FileTime,
    /// A regular file (not a directory, symlink or device).
    pub is_file: bool,
}

/// The partial file of one transfer, open for the engine. Writes are not durable until [`PartialFile::sync_data`]
/// (bytes and length) or [`PartialFile::sync_all`] (also mode and mtime) returns.
pub trait PartialFile: ReadAt {
    /// Writes all of `data` at `offset`, extending the file if needed.
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// Cuts or extends the file to `len`.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes the bytes and the length written so far durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
    /// Starts making the bytes written so far durable and returns at once; they are durable when the returned
    /// sync finished `Ok`. Syncs finish in the order they were started. The writer keeps writing the next batch
    /// meanwhile, so a volume whose sync is a round trip (an object store) keeps its requests in flight across
    /// batches. By default the sync happens here ([`PartialFile::sync_data`]) and is returned finished.
    fn start_sync(&self) -> io::Result<PendingSync> {
        Ok(PendingSync::finished(self.sync_data()))
    }
    /// Asks the disk to start writing `len` bytes at `offset` back now, without waiting and without making
    /// anything durable (only [`PartialFile::sync_data`] does): the next sync then finds them mostly written
    /// instead of starting a whole batch's writeback itself. A hint; the default does nothing.
    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// Whether bytes `[offset, offset + len)` of this partial are the destination's current bytes at the same
    /// place, untouched by this transfer (an in-place partial over its base): writing the same bytes there would
    /// write nothing, so a chunk the committed manifest places there need not be read to be kept. The whole-file
    /// digest at commit still reads and checks them. By default none.
    fn holds_unchanged(&self, offset: u64, len: u64) -> bool {
        let _ = (offset, len);
        false
    }
    /// Makes bytes, length, mode and mtime durable (`fsync`).
    fn sync_all(&self) -> io::Result<()>;
    /// Sets the permission bits (`mode & 0o777`) and the mtime the manifest asks for.
    fn set_metadata(&self, mode: u32, mtime: FileTime) -> io::Result<()>;
    /// Device, inode, length and mtime as they are now.
    fn identity(&self) -> io::Result<Identity>;
    /// What identifies the file's contents without reading them, as it is now; the change time moves with every
    /// change to the file and cannot be set by anyone.
    fn change_stamp(&self) -> io::Result<ChangeStamp>;
}

/// A partial's identity and change times ([`PartialFile::change_stamp`]): a recorded digest state is trusted only
/// while the partial's stamp is the one recorded with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangeStamp {
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i128,
    /// Change time, nanoseconds since the epoch (a change counter on the simulated disk).
    pub ctime_ns: i128,
}

/// An open partial, shared by the writer and its digest follower.
pub type Partial = Arc<dyn PartialFile>;

/// A committed file opened for reading (reuse of its chunks).
pub trait FinalFile: ReadAt {
    /// Device, inode, length and mtime.
    fn identity(&self) -> io::Result<Identity>;
    /// [`Identity`] and the change time, which moves with every write and metadata change: unlike the mtime, no
    /// writer can set it back, so bytes read while it stays put are still the file's.
    fn change_stamp(&self) -> io::Result<ChangeStamp>;
    /// The chunks of the first `size` bytes, cut with exactly `chunking`, whose hash `keep` accepts.
    fn cut(&self, size: u64, chunking: Chunking, keep: &dyn Fn(&Hash) -> bool) -> io::Result<Vec<ChunkEntry>>;
}

/// The directory a rename landed in: syncing it makes the rename durable.
pub trait Directory: Send {
    /// Makes the entries of this directory durable (`fsync` of the directory).
    fn sync(&self) -> io::Result<()>;
}

/// Where the engine's files live. Keys are destination paths (`RemotePath::as_str`); each key has at most one
/// partial. Every method is blocking: call from blocking threads.
pub trait Volume: Send + Sync + std::fmt::Debug {
    /// Checks `path` as a destination before anything is received: its parent directories exist (created if
    /// missing, never through a symlink) and may be written.
    fn prepare_destination(&self, path: &RemotePath) -> Result<(), StorageError>;
    /// Where the partial of `key` lives, in the words of this volume, as recorded in the transfer's record.
    fn partial_location(&self, key: &str) -> String;
    /// The length of the partial of `key`, if one this process created is there; anything else at its name is
    /// removed, so the partial is then created afresh and exclusively.
    fn partial_len(&self, key: &str) -> Result<Option<u64>, StorageError>;
    /// Opens the partial of `key`; `exists` false creates it exclusively (a file that appeared meanwhile is
    /// refused, not adopted). A longer partial is cut to `size`.
    fn open_partial(&self, key: &str, size: u64, exists: bool) -> Result<Partial, StorageError>;
    /// Renames the partial of `key` to `path` atomically, replacing a file there (never a directory or symlink),
    /// after checking that the partial's name still holds the `verified` file, and after the rename that the final
    /// name does. Returns the destination's directory, which the caller syncs to make the rename durable. A
    /// partial opened by [`Volume::open_in_place`] is not renamed: its journal is sealed (made durable), applied
    /// to the committed file (which is synced), and removed; `verified` is then the identity the file has after.
    fn place(&self, key: &str, path: &RemotePath, verified: &Identity) -> Result<Box<dyn Directory>, StorageError>;
    /// What is at `path` now (not following a symlink), if anything.
    fn stat_final(&self, path: &RemotePath) -> Option<Identity>;
    /// The regular file at `path` (never through a symlink), opened for reading.
    fn open_final(&self, path: &RemotePath) -> Option<Box<dyn FinalFile>>;

    /// Opens a partial of `key` that writes in place into the committed file at `path` under a redo journal
    /// (docs/storage.md, "The in-place journal"): the file is untouched until [`Volume::place`] seals and applies
    /// the journal. `None`: this volume does not write in place, or not this file (another hard link to it,
    /// another owner, not writable); the caller opens an ordinary partial.
    fn open_in_place(&self, key: &str, path: &RemotePath, size: u64) -> Result<Option<Partial>, StorageError> {
        let _ = (key, path, size);
        Ok(None)
    }

    /// Whether [`Volume::open_in_place`] could open an in-place partial over the file committed at `path` as it
    /// is now (a receiver hashes a committed file ahead of an in-place write only then). False by default.
    fn writes_in_place(&self, path: &RemotePath) -> bool {
        let _ = path;
        false
    }

    /// After a crash: applies a journal of `key` that was sealed (the new file verified) but perhaps not fully
    /// applied to `path`, and returns the file's identity after it. An unsealed journal is left to be resumed.
    fn recover(&self, key: &str, path: &RemotePath) -> Result<Option<Identity>, StorageError> {
        let _ = (key, path);
        Ok(None)
    }

    /// Opens the partial of `key` for the transfer of `manifest` (a volume that stores by chunk needs it);
    /// `full_reuse` is the client's reuse rule, recorded with the transfer. By default [`Volume::open_partial`].
    fn open_partial_for(
        &self,
        key: &str,
        manifest: &Arc<Manifest>,
        full_reuse: bool,
        exists: bool,
    ) -> Result<Partial, StorageError> {
        let _ = full_reuse;
        self.open_partial(key, manifest.size, exists)
    }

    /// Chunks of `manifest` durable for the transfer to `path` beyond what this process's store recorded: on a
    /// shared store, what other servers (or this one before it lost its state) journaled, and what may be relied
    /// on without bytes. Nothing, by default (the local store's records are the whole truth).
    fn durable_elsewhere(
        &self,
        path: &RemotePath,
        manifest: &Arc<Manifest>,
        full_reuse: bool,
    ) -> Result<ChunkSet, StorageError> {
        let _ = (path, full_reuse);
        Ok(ChunkSet::new(manifest.chunk_count()))
    }

    /// Whether [`Volume::durable_elsewhere`] is the whole truth of what is durable, so that the engine's own
    /// records (sled progress) are only a cache and never add to it: true on a shared store, where a chunk can be
    /// retracted by another session or server (docs/object-store.md "Rule C"). False by default: the local
    /// store's records are the truth.
    fn durable_is_authoritative(&self) -> bool {
        false
    }

    /// Records that chunks `chunks` of the open transfer `key` are no longer durable (found gone or damaged at the
    /// commit), so that no later offer, on any server, leaves them out of its Need. Nothing to do by default: the
    /// engine's own progress record is the truth of a local volume.
    fn forget_chunks(&self, key: &str, chunks: &[u32]) -> Result<(), StorageError> {
        let _ = (key, chunks);
        Ok(())
    }

    /// The manifest id of the file committed at `path`, when the volume itself records it (a shared store);
    /// `None` by default: the local store's committed record decides.
    fn committed_manifest_id(&self, path: &RemotePath) -> Result<Option<Hash>, StorageError> {
        let _ = path;
        Ok(None)
    }

    /// The shortest chunk (but the last) an offer may have. The protocol's minimum by default.
    fn min_chunk_size(&self) -> u32 {
        crate::MIN_CHUNK_SIZE
    }

    /// Whether a partial can only be opened with the whole manifest known ([`Volume::open_partial_for`]): a
    /// streamed offer is then gathered and served as a whole one. False by default.
    fn needs_whole_manifest(&self) -> bool {
        false
    }

    /// The tree receiver's storage beside this volume, when it lives in the same store (an object store's
    /// [`object::ObjectTrees`]); `None` by default, and the server builds a local one over the root.
    fn tree_volume(&self) -> Option<Arc<dyn TreeVolume>> {
        None
    }

    /// The tree committed at `path` as a local, verified copy, for a volume whose files are not local files (a
    /// pull from an object store); `None` when no directory is there. `None` by default: a local volume's trees
    /// are walked where they are.
    fn committed_tree(&self, path: &RemotePath) -> Result<Option<TreeCopy>, StorageError> {
        let _ = path;
        Ok(None)
    }

    /// The volume of namespace `name` when it lives in the same store as this one (an object store: one prefix
    /// per namespace); `None` by default, and the server builds a local volume over the namespace's directory.
    fn for_namespace(&self, name: &str) -> Option<Arc<dyn Volume>> {
        let _ = name;
        None
    }

    /// The file committed at `path` as a local, verified copy with its committed manifest, for a volume whose
    /// files are not local files (a pull from an object store); `None` when nothing is committed there. The
    /// default is `None`: a local volume's files are opened where they are.
    fn committed_copy(&self, path: &RemotePath) -> Result<Option<(std::fs::File, Manifest)>, StorageError> {
        let _ = path;
        Ok(None)
    }

    /// The open transfers of this volume's namespace as the volume itself records them (a shared store: those
    /// of every server), at most `max` in path order, and how many there are; `None` by default: the local
    /// store's records are the list.
    fn open_transfers(&self, max: usize) -> Result<Option<(Vec<OpenTransfer>, u64)>, StorageError> {
        let _ = max;
        Ok(None)
    }

    /// The namespace's usage as the volume itself records it (a shared store: every server's committed files and
    /// open transfers), for admitting the transfer of the manifest `manifest_id` to `path`; `with_committed`
    /// false leaves the committed counts at zero where counting them costs requests. `None` by default: the
    /// engine's own records are the whole usage.
    fn shared_usage(
        &self,
        path: &RemotePath,
        manifest_id: &Hash,
        with_committed: bool,
    ) -> Result<Option<SharedUsage>, StorageError> {
        let _ = (path, manifest_id, with_committed);
        Ok(None)
    }

    /// The engine refused the transfer of `key` after opening it (admission: a quota or a limit): a volume that
    /// wrote a record of it that holds nothing received drops that record, so it counts against nothing. Nothing
    /// to do by default.
    fn refused(&self, key: &str) {
        let _ = key;
    }

    /// The bytes received over the wire for the open transfer of `key` by every server that served it, as the
    /// volume records them (a shared store's journal: what proto-spec.md §14 "Counts span the group" promises in
    /// `Committed.received_bytes`); `None` by default: the engine's own progress record counts them.
    fn received_by_group(&self, key: &str) -> Option<u64> {
        let _ = key;
        None
    }
}

/// A namespace's usage as a shared store records it ([`Volume::shared_usage`]), with what of it the offered
/// transfer itself already holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SharedUsage {
    /// Sizes of the committed files.
    pub committed_bytes: u64,
    /// Committed entries (files, directories, symlinks).
    pub committed_files: u64,
    /// Open transfers (records in the store, of every server).
    pub open_transfers: u64,
    /// Sizes of their files.
    pub open_bytes: u64,
    /// Stored bytes of their records (their manifests, mostly).
    pub manifest_bytes: u64,
    /// The size of the file committed at the offered path, if one is.
    pub committed_here: Option<u64>,
    /// The records of the offered transfer itself (same path, same manifest: written or adopted for it), counted
    /// in the totals above and replaced by its admission.
    pub this_transfer: OpenAtPath,
}

/// Open records at one path ([`SharedUsage::this_transfer`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenAtPath {
    /// How many.
    pub records: u64,
    /// Their files' sizes.
    pub bytes: u64,
    /// Their records' bytes.
    pub manifest_bytes: u64,
}

/// One open transfer as a volume lists it ([`Volume::open_transfers`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenTransfer {
    /// Destination path, relative to the namespace.
    pub path: String,
    /// Size of the file.
    pub size: u64,
    /// Bytes of the chunks durable for the transfer.
    pub durable_bytes: u64,
    /// When it was first offered (Unix seconds).
    pub created: u64,
    /// When it last made progress (Unix seconds).
    pub updated: u64,
}

/// EACCES, EPERM (an immutable file or directory) and EROFS: the receiver may not write there, and waiting will
/// not change that.
pub fn is_permission_error(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EACCES | libc::EPERM | libc::EROFS))
}

/// The storage seam failed.
#[derive(Debug, Error)]
pub enum StorageError {
    /// Reading, writing or syncing failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The destination (or what of it is named) cannot be written.
    #[error("the receiver cannot write {path}: {source}")]
    At {
        /// The remote path, or the part of it that failed.
        path: String,
        /// The underlying error.
        source: io::Error,
    },
    /// The destination path cannot be used (a symlink or a file on the way, a directory at the name).
    #[error(transparent)]
    BadPath(PathError),
    /// The partial was replaced by another file after it was verified.
    #[error("the partial file of {0} was replaced after it was verified")]
    Replaced(String),
    /// The destination's key does not fit the object store.
    #[error(transparent)]
    Layout(#[from] object::layout::LayoutError),
    /// Nothing was committed: chunks this transfer relied on are gone from the store (deleted by a gc between the
    /// session's check and its commit, docs/object-store.md "Rule C"). They are no longer durable for the
    /// transfer and must be received again.
    #[error("{} chunk(s) of {key} are gone from the store; asking for them again", chunks.len())]
    ChunksGone {
        /// The transfer's key.
        key: String,
        /// The chunks' indices in its manifest.
        chunks: Vec<u32>,
    },
}
