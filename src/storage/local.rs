//! [`LocalVolume`]: the receiver's files in a local directory, the default. Committed files live under the root;
//! each transfer's partial is `.ferry-<id>.part` in the partial directory (proto-spec.md §8), on the same
//! filesystem, so the commit is one `rename`.
//!
//! Promises: a partial is never opened through a symlink and a new one is created exclusively (`O_EXCL`); a rename
//! into place walks directory descriptors on both sides (no symlink on the way can redirect it, even one swapped in
//! during the rename), and the file renamed is checked before and after to be the very inode that was verified.
//! Durability is the kernel's: `fdatasync`, `fsync`, and the destination directory's `fsync` after the rename.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::direct::{DirectWrites, DIRECT_MIN_SIZE};
use super::direct_reads::LongReads;

use super::journal::{self, Journaled, Parsed};
use super::syncer::{LazySyncer, Syncer};
use super::{
    is_permission_error, ChangeStamp, Directory, FinalFile, Identity, Partial, PartialFile, PendingSync, ReadAt,
    StorageError, Volume,
};
use crate::chunk::{chunk_with, mtime_of};
use crate::manifest::{hex, ChunkEntry, Chunking, FileTime, Hash};
use crate::path::{
    check_writable, metadata_in_root, open_no_follow, rename_into_from, resolve_in_root, PathError, RemotePath,
    Renamed, Replace,
};

/// Files under `root`, partials in `partial_dir` (same filesystem).
#[derive(Debug, Clone)]
pub struct LocalVolume {
    pub(super) root: PathBuf,
    pub(super) partial_dir: PathBuf,
    /// `partial_dir`, opened once on first use by a tree's small files: they are created, checked and renamed
    /// relative to it (no path lookup per file), and it is what `syncfs` is called on.
    pub(super) partial_fd: Arc<std::sync::OnceLock<File>>,
}

impl LocalVolume {
    /// A volume committing under `root`, with partials in `partial_dir`.
    pub fn new(root: PathBuf, partial_dir: PathBuf) -> Self {
        LocalVolume {
            root,
            partial_dir,
            partial_fd: Arc::default(),
        }
    }

    /// The same, shared, as a receiver context holds it.
    pub fn shared(root: PathBuf, partial_dir: PathBuf) -> Arc<dyn Volume> {
        Arc::new(Self::new(root, partial_dir))
    }

    /// The same, as the tree receiver's [`super::TreeVolume`].
    pub fn shared_tree(root: PathBuf, partial_dir: PathBuf) -> Arc<dyn super::TreeVolume> {
        Arc::new(Self::new(root, partial_dir))
    }

    fn partial_path(&self, key: &str) -> PathBuf {
        self.partial_dir.join(partial_file_name(key))
    }

    fn journal_path(&self, key: &str) -> PathBuf {
        journal_beside(&self.partial_path(key))
    }

    /// The committed file at `key`, opened for reading and writing, never through a symlink.
    fn open_target(&self, key: &str) -> Option<(PathBuf, File)> {
        let path = RemotePath::parse(key).ok()?;
        let resolved = resolve_in_root(&self.root, &path, false).ok()?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&resolved)
            .ok()?;
        file.metadata().ok()?.is_file().then_some((resolved, file))
    }

    /// The length of the in-place journal of `key`, if it is ours and still describes the committed file as it
    /// is now; a stale or foreign one is removed.
    fn journal_len(&self, key: &str) -> Result<Option<u64>, StorageError> {
        let path = self.journal_path(key);
        let Some(len) = existing_partial(&path)? else {
            return Ok(None);
        };
        let current = open_no_follow(&path)
            .ok()
            .and_then(|journal| Parsed::read(&journal).ok().flatten())
            .zip(self.open_target(key))
            .is_some_and(|(parsed, (_, base))| {
                parsed.seal.is_none()
                    && base
                        .metadata()
                        .is_ok_and(|m| journal::same_file(&parsed.base, &identity(&m)))
            });
        if current {
            return Ok(Some(len));
        }
        tracing::info!(
            path = key,
            "dropping an in-place journal the committed file no longer matches"
        );
        remove_if_there(&path)?;
        Ok(None)
    }

    /// Applies the journal of `key` to the file at `path`: at commit (`verified`: the identity the engine checked,
    /// sealed here) or in recovery (`None`: only a journal sealed before a crash). Removes the journal once the
    /// file is synced. `None` if there was nothing to apply.
    fn apply_journal(
        &self,
        key: &str,
        path: &RemotePath,
        verified: Option<&Identity>,
    ) -> Result<Option<(Identity, File)>, StorageError> {
        let journal_path = self.journal_path(key);
        let Ok(journal) = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&journal_path)
        else {
            return Ok(None);
        };
        let replaced = || StorageError::Replaced(path.to_string());
        let parsed = Parsed::read(&journal)?;
        let Some(parsed) = parsed else {
            // Not even its header survived: nothing was applied from it.
            remove_if_there(&journal_path)?;
            return match verified {
                Some(_) => Err(replaced()),
                None => Ok(None),
            };
        };
        let Some((resolved, target)) = self.open_target(key) else {
            remove_if_there(&journal_path)?;
            return Err(replaced());
        };
        let now = identity(&target.metadata()?);
        let same_inode = now.dev == parsed.base.dev && now.ino == parsed.base.ino;
        let parsed = match verified {
            Some(verified) => {
                let unchanged = parsed.seal.is_some() || journal::same_file(&parsed.base, &now);
                if !same_inode || !unchanged || verified.ino != now.ino {
                    return Err(replaced());
                }
                journal::seal(&journal, verified.len)?
            }
            None if parsed.seal.is_none() => return Ok(None),
            None if !same_inode => {
                remove_if_there(&journal_path)?;
                return Ok(None);
            }
            None => parsed,
        };
        tracing::info!(
            path = key,
            bytes = journal::journaled_bytes(&parsed),
            "applying the in-place journal"
        );
        let pause = test_apply_pause();
        journal::apply(&parsed, &journal, &target, &|| {
            if let Some(pause) = pause {
                std::thread::sleep(pause);
            }
        })?;
        let applied = identity(&target.metadata()?);
        std::fs::remove_file(&journal_path)?;
        File::open(&self.partial_dir)?.sync_all()?;
        let parent = File::open(resolved.parent().unwrap_or(&self.root))?;
        Ok(Some((applied, parent)))
    }
}

/// `FERRY_TEST_APPLY_PAUSE_MS` (tests only, docs/testing.md): a sleep between the extents of an in-place apply,
/// so that a test can kill the server in the middle of one.
fn test_apply_pause() -> Option<std::time::Duration> {
    let ms: u64 = std::env::var("FERRY_TEST_APPLY_PAUSE_MS").ok()?.parse().ok()?;
    Some(std::time::Duration::from_millis(ms))
}

fn remove_if_there(path: &Path) -> Result<(), StorageError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(StorageError::Io(e)),
        _ => Ok(()),
    }
}

/// The in-place journal that goes with the partial file `partial` (`.ferry-<id>.journal` beside
/// `.ferry-<id>.part`).
pub fn journal_beside(partial: &Path) -> PathBuf {
    partial.with_extension("journal")
}

/// Whether `path` is an in-place journal sealed for its apply: it must never be expired, since the committed file
/// may be half-way through its apply (it is replayed at the next offer of its path).
pub fn is_sealed_journal(path: &Path) -> bool {
    open_no_follow(path)
        .ok()
        .and_then(|journal| Parsed::read(&journal).ok().flatten())
        .is_some_and(|parsed| parsed.seal.is_some())
}

/// The partial file's name for the destination `key` (proto-spec.md §8): `.ferry-` + the first 32 hex digits (16
/// bytes) of BLAKE3 over the key's UTF-8 bytes + `.part`.
pub fn partial_file_name(key: &str) -> String {
    format!(".ferry-{}.part", &hex(blake3::hash(key.as_bytes()).as_bytes())[..32])
}

impl Volume for LocalVolume {
    fn prepare_destination(&self, path: &RemotePath) -> Result<(), StorageError> {
        let at = |source| StorageError::At {
            path: path.as_str().to_string(),
            source,
        };
        resolve_in_root(&self.root, path, true).map_err(|e| match e {
            // A parent that cannot be created: as final as a directory that cannot be written (below).
            PathError::Io { source, .. } if is_permission_error(&source) => at(source),
            refused => StorageError::BadPath(refused),
        })?;
        // Before a byte is sent: a destination directory this server may not write would fail only at the commit,
        // after the whole upload (proto-spec.md §9, StorageIo).
        check_writable(&self.root, path).map_err(|e| match e {
            PathError::Io { source, .. } => at(source),
            refused => StorageError::BadPath(refused),
        })
    }

    fn partial_location(&self, key: &str) -> String {
        self.partial_path(key).display().to_string()
    }

    fn partial_len(&self, key: &str) -> Result<Option<u64>, StorageError> {
        match existing_partial(&self.partial_path(key))? {
            Some(len) => Ok(Some(len)),
            None => self.journal_len(key),
        }
    }

    fn open_partial(&self, key: &str, size: u64, exists: bool) -> Result<Partial, StorageError> {
        let partial = self.partial_path(key);
        if exists && std::fs::symlink_metadata(&partial).is_err() {
            let journal = open_partial(key, &self.journal_path(key), u64::MAX, true)?;
            let base = self.open_target(key).map(|(_, file)| file);
            let opened = match base {
                Some(base) => Journaled::open(Arc::new(journal), LocalFinal::boxed(base), size)?,
                None => None,
            };
            let gone = || StorageError::At {
                path: format!("{key} (its in-place journal in .ferry/)"),
                source: io::ErrorKind::NotFound.into(),
            };
            return Ok(Arc::new(opened.ok_or_else(gone)?));
        }
        if !exists {
            remove_if_there(&self.journal_path(key))?;
        }
        Ok(Arc::new(LocalPartial::new(
            open_partial(key, &partial, size, exists)?,
            size,
        )))
    }

    fn writes_in_place(&self, path: &RemotePath) -> bool {
        self.open_target(path.as_str())
            .and_then(|(_, base)| base.metadata().ok())
            .is_some_and(|meta| may_write_in_place(&meta))
    }

    fn open_in_place(&self, key: &str, path: &RemotePath, size: u64) -> Result<Option<Partial>, StorageError> {
        if path.as_str() != key {
            return Ok(None);
        }
        let Some((_, base)) = self.open_target(key) else {
            return Ok(None);
        };
        let meta = base.metadata()?;
        if !may_write_in_place(&meta) {
            return Ok(None);
        }
        let journal_path = self.journal_path(key);
        remove_if_there(&journal_path)?;
        let journal = open_partial(key, &journal_path, 0, false)?;
        let journaled = Journaled::create(Arc::new(journal), LocalFinal::boxed(base), identity(&meta), size)?;
        Ok(Some(Arc::new(journaled)))
    }

    fn recover(&self, key: &str, path: &RemotePath) -> Result<Option<Identity>, StorageError> {
        if std::fs::symlink_metadata(self.partial_path(key)).is_ok() {
            return Ok(None);
        }
        Ok(self.apply_journal(key, path, None)?.map(|(applied, _)| applied))
    }

    fn place(&self, key: &str, path: &RemotePath, verified: &Identity) -> Result<Box<dyn Directory>, StorageError> {
        if std::fs::symlink_metadata(self.partial_path(key)).is_err() {
            if let Some((_, parent)) = self.apply_journal(key, path, Some(verified))? {
                return Ok(Box::new(parent));
            }
        }
        let (_, parent) = rename_verified(&self.root, path, &self.partial_path(key), (verified.dev, verified.ino))?;
        Ok(Box::new(parent))
    }

    fn stat_final(&self, path: &RemotePath) -> Option<Identity> {
        metadata_in_root(&self.root, path).ok().map(|meta| identity(&meta))
    }

    fn open_final(&self, path: &RemotePath) -> Option<Box<dyn FinalFile>> {
        open_committed(&self.root, path.as_str()).map(LocalFinal::boxed)
    }
}

/// Whether a committed file (`meta`) may be written in place: another name of the same inode would change too,
/// and a file of another user keeps its owner only if it is replaced, not written.
fn may_write_in_place(meta: &std::fs::Metadata) -> bool {
    meta.nlink() == 1 && meta.uid() == rustix::process::geteuid().as_raw()
}

fn identity(meta: &std::fs::Metadata) -> Identity {
    Identity {
        dev: meta.dev(),
        ino: meta.ino(),
        len: meta.len(),
        mtime: mtime_of(meta),
        is_file: meta.is_file(),
    }
}

impl PartialFile for File {
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.write_all_at(data, offset)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }

    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }

    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        start_writeback(self, offset, len)
    }

    fn sync_all(&self) -> io::Result<()> {
        File::sync_all(self)
    }

    fn set_metadata(&self, mode: u32, mtime: FileTime) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        self.set_permissions(std::fs::Permissions::from_mode(mode & 0o777))?;
        self.set_modified(system_time(mtime))
    }

    fn identity(&self) -> io::Result<Identity> {
        Ok(identity(&self.metadata()?))
    }

    fn change_stamp(&self) -> io::Result<ChangeStamp> {
        use std::os::unix::fs::MetadataExt;
        let meta = self.metadata()?;
        let ns = |secs: i64, nanos: i64| i128::from(secs) * 1_000_000_000 + i128::from(nanos);
        Ok(ChangeStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        })
    }
}

/// The local volume's partial: a file whose syncs run on a thread of their own ([`Syncer`], started with the first
/// [`PartialFile::start_sync`]), so the writer goes on writing (and starting writeback of) the next batch while the
/// disk makes the last one durable, instead of the disk working at queue depth one during every `fdatasync`. A
/// large one is written around the page cache where the filesystem allows ([`DirectWrites`]); every call but
/// `write_at` first writes the bytes that gathers, so the file looks to them as if each write went straight in.
struct LocalPartial {
    file: File,
    syncer: LazySyncer,
    direct: Option<Mutex<DirectWrites>>,
    /// Long reads around the page cache, for a partial written around it.
    reads: LongReads,
}

impl LocalPartial {
    /// The partial `file` of a `size`-byte destination.
    fn new(file: File, size: u64) -> Self {
        let direct = (size >= DIRECT_MIN_SIZE)
            .then(|| DirectWrites::open(&file))
            .flatten()
            .map(Mutex::new);
        let reads = match direct {
            Some(_) => LongReads::of_partial(&file),
            None => LongReads::default(),
        };
        tracing::debug!(size, direct = direct.is_some(), "partial opened");
        LocalPartial {
            file,
            syncer: LazySyncer::default(),
            direct,
            reads,
        }
    }

    /// Starts the sync thread over a second descriptor of the file; `None` if it could not be.
    fn spawn_syncer(&self) -> Option<Syncer> {
        let file = self.file.try_clone().ok()?;
        Syncer::spawn(move || file.sync_data())
            .inspect_err(|e| tracing::debug!(error = %e, "no sync thread; syncing on the writer's"))
            .ok()
    }

    /// The direct writes' state, if there are any.
    fn direct(&self) -> Option<std::sync::MutexGuard<'_, DirectWrites>> {
        let direct = self.direct.as_ref()?;
        Some(direct.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Writes every byte gathered for a direct write into the file.
    fn flush(&self) -> io::Result<()> {
        match self.direct() {
            Some(mut direct) => direct.flush(&self.file),
            None => Ok(()),
        }
    }

    /// Writes the bytes gathered for a direct write into the file if any of them is in `[offset, offset + len)`.
    fn flush_over(&self, offset: u64, len: usize) -> io::Result<()> {
        match self.direct() {
            Some(mut direct) => direct.flush_if_over(&self.file, offset, len as u64),
            None => Ok(()),
        }
    }
}

impl Drop for LocalPartial {
    /// Leaves the file holding every byte written to it (durable or not, as after any unsynced write).
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::debug!(error = %e, "could not write the partial's last gathered bytes");
        }
        if let Some(direct) = self.direct() {
            tracing::debug!(
                bytes = direct.written_direct(),
                "partial closed; bytes written around the page cache"
            );
        }
    }
}

impl ReadAt for LocalPartial {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.flush_over(offset, buf.len())?;
        self.reads.read_at(&self.file, buf, offset)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.flush_over(offset, buf.len())?;
        self.reads.read_exact_at(&self.file, buf, offset)
    }

    fn size(&self) -> io::Result<u64> {
        self.flush()?;
        ReadAt::size(&self.file)
    }
}

impl PartialFile for LocalPartial {
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        match self.direct() {
            Some(mut direct) => direct.write(&self.file, data, offset),
            None => PartialFile::write_at(&self.file, data, offset),
        }
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.flush()?;
        PartialFile::set_len(&self.file, len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.flush()?;
        self.file.sync_data()
    }

    /// Hands the `fdatasync` to the file's sync thread and returns: it starts after this call, so it covers every
    /// write made before it (proto-spec.md §8).
    fn start_sync(&self) -> io::Result<PendingSync> {
        self.flush()?;
        Ok(self.syncer.start(|| self.spawn_syncer(), || self.file.sync_data()))
    }

    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        start_writeback(&self.file, offset, len)
    }

    fn sync_all(&self) -> io::Result<()> {
        self.flush()?;
        self.file.sync_all()
    }

    fn set_metadata(&self, mode: u32, mtime: FileTime) -> io::Result<()> {
        self.flush()?;
        PartialFile::set_metadata(&self.file, mode, mtime)
    }

    fn identity(&self) -> io::Result<Identity> {
        self.flush()?;
        PartialFile::identity(&self.file)
    }

    fn change_stamp(&self) -> io::Result<ChangeStamp> {
        self.flush()?;
        PartialFile::change_stamp(&self.file)
    }
}

/// A committed file opened for reading (reuse, the base of an in-place partial): long reads of a large one go
/// around the page cache, read ahead for a reader in order ([`LongReads::of_committed`]), since a file this volume
/// wrote directly is not in it, and one read once is better not made to push everything else out of it.
struct LocalFinal {
    file: File,
    reads: LongReads,
}

impl LocalFinal {
    fn new(file: File) -> Self {
        let large = file.metadata().is_ok_and(|m| m.len() >= DIRECT_MIN_SIZE);
        let reads = if large {
            LongReads::of_committed(&file)
        } else {
            LongReads::default()
        };
        LocalFinal { file, reads }
    }

    fn boxed(file: File) -> Box<dyn FinalFile> {
        Box::new(Self::new(file))
    }
}

impl ReadAt for LocalFinal {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.reads.read_at(&self.file, buf, offset)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.reads.read_exact_at(&self.file, buf, offset)
    }

    fn size(&self) -> io::Result<u64> {
        ReadAt::size(&self.file)
    }
}

impl FinalFile for LocalFinal {
    fn identity(&self) -> io::Result<Identity> {
        FinalFile::identity(&self.file)
    }

    fn change_stamp(&self) -> io::Result<ChangeStamp> {
        PartialFile::change_stamp(&self.file)
    }

    fn cut(&self, size: u64, chunking: Chunking, keep: &dyn Fn(&Hash) -> bool) -> io::Result<Vec<ChunkEntry>> {
        self.file.cut(size, chunking, keep)
    }
}

impl FinalFile for File {
    fn identity(&self) -> io::Result<Identity> {
        Ok(identity(&self.metadata()?))
    }

    fn change_stamp(&self) -> io::Result<ChangeStamp> {
        PartialFile::change_stamp(self)
    }

    fn cut(&self, size: u64, chunking: Chunking, keep: &dyn Fn(&Hash) -> bool) -> io::Result<Vec<ChunkEntry>> {
        chunk_with(self, size, chunking, keep)
    }
}

impl Directory for File {
    fn sync(&self) -> io::Result<()> {
        self.sync_all()
    }
}

/// A manifest's mtime as a `SystemTime`.
pub fn system_time(t: FileTime) -> std::time::SystemTime {
    use std::time::Duration;
    let nanos = Duration::from_nanos(u64::from(t.nanos.min(999_999_999)));
    if t.secs >= 0 {
        std::time::UNIX_EPOCH + Duration::from_secs(t.secs as u64) + nanos
    } else {
        std::time::UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs()) + nanos
    }
}

/// The length of the partial file already at `partial`, if it is a regular file of this process's user; anything
/// else there (a symlink, a stranger's file) is removed, so the partial is then created afresh and exclusively.
fn existing_partial(partial: &Path) -> Result<Option<u64>, StorageError> {
    let Ok(meta) = std::fs::symlink_metadata(partial) else {
        return Ok(None);
    };
    let mine = meta.uid() == rustix::process::geteuid().as_raw();
    if meta.is_file() && mine {
        return Ok(Some(meta.len()));
    }
    tracing::warn!(partial = %partial.display(), "removing a partial file this process did not create");
    match std::fs::remove_file(partial) {
        Ok(()) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StorageError::Io(e)),
    }
}

/// Opens (or creates) the partial file, never through a symlink; a new partial (`exists` false) is created
/// exclusively (`O_EXCL`), so a file someone else placed at that name in the meantime is refused, not adopted. No
/// preallocation: chunks extend the file as they land, so a size limit or a full disk shows up as a write error
/// after the chunks that fit are durable (kept for a resume), not up front. A longer partial from an older offer
/// is cut to `size`. An error opening it names `key`, the destination.
fn open_partial(key: &str, partial: &Path, size: u64, exists: bool) -> Result<File, StorageError> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).custom_flags(libc::O_NOFOLLOW);
    if exists {
        options.create(false);
    } else {
        options.create_new(true);
    }
    let file = options.open(partial).map_err(|source| StorageError::At {
        path: format!("{key} (its partial file in .ferry/)"),
        source,
    })?;
    if file.metadata()?.len() > size {
        file.set_len(size)?;
    }
    Ok(file)
}

/// Renames the partial (by name, relative to its directory's descriptor) to `path` under `root`, checking before
/// and after that the name holds the very inode whose digest was verified (`verified`: device and inode): a
/// partial swapped by someone else who can write in the partial directory is refused, and never left under the
/// final name. Returns the destination and its opened parent directory (to sync). A file it replaced is released
/// by [`release_replaced`].
pub fn rename_verified(
    root: &Path,
    path: &RemotePath,
    partial: &Path,
    verified: (u64, u64),
) -> Result<(PathBuf, File), StorageError> {
    let (Some(dir), Some(name)) = (partial.parent(), partial.file_name().and_then(|n| n.to_str())) else {
        return Err(StorageError::Io(io::Error::other("partial file has no name")));
    };
    let swapped = || StorageError::Replaced(path.to_string());
    let same = |entry: io::Result<Option<(u64, u64)>>| entry.is_ok_and(|found| found == Some(verified));
    let partial_dir = File::open(dir)?;
    if !same(inode_at(&partial_dir, name)) {
        return Err(swapped());
    }
    let renamed = rename_into_from(root, path, &partial_dir, name, Replace::File).map_err(|e| match e {
        PathError::Io { source, .. } => StorageError::At {
            path: path.as_str().to_string(),
            source,
        },
        refused => StorageError::BadPath(refused),
    })?;
    let Renamed {
        target,
        parent,
        replaced,
    } = renamed;
    if let Some(replaced) = replaced {
        release_replaced(replaced);
    }
    let final_name = path.components().last().expect("a RemotePath has a component");
    if !same(inode_at(&parent, final_name)) {
        // Swapped in the instant between the check and the rename: take the stranger's file away again.
        let _ = rustix::fs::unlinkat(&parent, final_name, rustix::fs::AtFlags::empty());
        return Err(swapped());
    }
    Ok((target, parent))
}

/// A replaced file at least this large is let go on a thread of its own.
const RELEASE_APART_FROM: u64 = 64 * 1024 * 1024;

/// Lets go of a file a commit replaced (its name already unlinked): closing the last descriptor frees its blocks,
/// which for a large file is the slowest step of the commit (0.39 s for 2 GiB on ext4, a long chain of journal
/// updates), so a large one is closed on a short-lived thread while the commit goes on; a small one here. If the
/// process ends first, the kernel closes it; after a crash, the filesystem's orphan list frees it at mount.
pub(crate) fn release_replaced(replaced: File) {
    let large = replaced.metadata().is_ok_and(|meta| meta.len() >= RELEASE_APART_FROM);
    if large {
        // A thread that cannot be started drops the file (and so closes it) here.
        let _ = std::thread::Builder::new()
            .name("ferry-release".into())
            .spawn(move || drop(replaced));
    }
}

/// The (device, inode) of the entry `name` in `dir`, not following a symlink; `None` if absent.
pub(crate) fn inode_at(dir: &File, name: &str) -> io::Result<Option<(u64, u64)>> {
    match rustix::fs::statat(dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => Ok(Some((stat.st_dev, stat.st_ino))),
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(error) => Err(error.into()),
    }
}

/// Opens a committed file named by the index, inside `root` and without following symlinks.
pub fn open_committed(root: &Path, path: &str) -> Option<File> {
    let path = RemotePath::parse(path).ok()?;
    let resolved: PathBuf = resolve_in_root(root, &path, false).ok()?;
    let file = open_no_follow(&resolved).ok()?;
    file.metadata().ok()?.is_file().then_some(file)
}

/// `sync_file_range(SYNC_FILE_RANGE_WRITE)`: starts writeback of the dirty pages in the range and returns (it may
/// block only while the device's request queue is full, which paces the writer to the disk). Durability is still
/// the later `fdatasync`'s alone: this flushes neither the disk cache nor metadata. Linux only; elsewhere nothing.
fn start_writeback(file: &File, offset: u64, len: u64) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Ok(());
        };
        // SAFETY: the descriptor is open for the borrow of `file`; the call takes integers only and touches no
        // memory of this process.
        let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// proto-spec.md §8: the `<id>` of `.ferry-<id>.part`.
    #[test]
    fn the_partial_name_is_pinned() {
        assert_eq!(
            partial_file_name("a/b.iso"),
            ".ferry-d3572167d018d49f0a4b8574ebcc5538.part"
        );
        assert_eq!(
            partial_file_name("a/b.iso"),
            format!(".ferry-{}.part", &blake3::hash(b"a/b.iso").to_hex()[..32])
        );
    }

    /// A large partial gathers in-order chunks for direct writes; whatever looks at the file in between (a read
    /// over the gathered bytes, its size, a sync) finds every byte written before it, and a sync leaves nothing
    /// only in memory: read through another descriptor after it, the file is exactly what was written.
    #[test]
    fn a_large_partial_shows_every_written_byte_to_reads_sizes_and_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".ferry-big.part");
        let size = DIRECT_MIN_SIZE + 4_321;
        let partial = LocalPartial::new(open_partial("big", &path, size, false).unwrap(), size);
        if partial.direct.is_none() {
            eprintln!("no direct I/O on this filesystem; the partial is buffered and nothing else to check");
            return;
        }
        let bytes: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let chunk = 65_537;
        let half = (size / 2) as usize;
        let mut at = 0;
        while at < half {
            let end = (at + chunk).min(half);
            partial.write_at(&bytes[at..end], at as u64).unwrap();
            at = end;
        }
        // The last chunk's bytes are still gathered, yet a read of them sees them.
        let mut tail = vec![0u8; 100];
        partial.read_exact_at(&mut tail, half as u64 - 100).unwrap();
        assert_eq!(tail, bytes[half - 100..half]);
        while at < size as usize {
            let end = (at + chunk).min(size as usize);
            partial.write_at(&bytes[at..end], at as u64).unwrap();
            at = end;
        }
        assert_eq!(partial.size().unwrap(), size, "the size counts the gathered bytes");
        partial.start_sync().unwrap().wait_here().unwrap();
        assert!(
            std::fs::read(&path).unwrap() == bytes,
            "after the sync the file holds every byte"
        );
        assert!(
            partial.direct().unwrap().written_direct() > size / 2,
            "most bytes went direct"
        );
    }

    /// Issue 12 item 9: the partial whose digest was verified is swapped for another file before the rename; the
    /// rename is refused and nothing lands under the final name.
    #[test]
    fn a_partial_swapped_after_it_was_verified_is_not_renamed_into_place() {
        let dir = tempfile::tempdir().unwrap();
        let (root, partials) = (dir.path().join("root"), dir.path().join("root/.ferry/partial"));
        std::fs::create_dir_all(&partials).unwrap();
        let partial = partials.join(".ferry-0123.part");
        std::fs::write(&partial, b"verified bytes").unwrap();
        let hashed = File::open(&partial).unwrap(); // the receiver's descriptor: its inode stays allocated
        let verified = hashed.metadata().unwrap();
        // Someone else's file takes the partial's name.
        std::fs::remove_file(&partial).unwrap();
        std::fs::write(&partial, b"attacker bytes").unwrap();
        let path = RemotePath::parse("dest.bin").unwrap();
        assert!(matches!(
            rename_verified(&root, &path, &partial, (verified.dev(), verified.ino())),
            Err(StorageError::Replaced(_))
        ));
        assert!(!root.join("dest.bin").exists(), "nothing under the final name");
        // The genuine file renames.
        let genuine = File::open(&partial).unwrap().metadata().unwrap();
        let (target, _) = rename_verified(&root, &path, &partial, (genuine.dev(), genuine.ino())).unwrap();
        assert_eq!(std::fs::read(target).unwrap(), b"attacker bytes");
    }
}
