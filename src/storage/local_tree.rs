//! [`TreeVolume`] for [`LocalVolume`]: the small files, directories and symlinks of a tree on a local disk.
//!
//! A small file is staged as `.ferry-<16 hex>.small` in the partial directory with its mode and mtime; a batch is
//! made durable by one `syncfs` (an `fdatasync` each where that fails), renamed into place through directory
//! descriptors (each destination directory walked once per batch, no symlink followed even one swapped in
//! meanwhile, the inode checked before and after the rename), and the directories are synced after the renames —
//! or, settled with [`TreeVolume::settle_deferring_names`], by the next group's `syncfs` (which commits every
//! rename before it), so a stream of groups pays one flush per group.
//! A tree's directories are created together, with one `fsync` per parent directory.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use super::local::{inode_at, open_committed, LocalVolume};
use super::tree::{PendingNames, Settled, Staged, TreeVolume};
use super::Identity;
use crate::chunk::mtime_of;
use crate::manifest::FileTime;
use crate::path::{
    ensure_dir, ensure_dirs, entry_at, link_walk, open_dir_beneath, open_parent_dir, rename_into_from,
    rename_into_opened, resolve_in_root, Entry, PathError, RemotePath, Replace,
};

impl TreeVolume for LocalVolume {
    fn make_dir(&self, key: &RemotePath) -> Result<(), String> {
        ensure_dir(&self.root, key).map(|_| ()).map_err(|e| e.to_string())
    }

    fn make_all_dirs(&self, keys: &[RemotePath]) -> Vec<Result<(), String>> {
        ensure_dirs(&self.root, keys)
            .into_iter()
            .map(|made| made.map_err(|e| e.to_string()))
            .collect()
    }

    fn place_symlink(
        &self,
        base: Option<&RemotePath>,
        link: &str,
        key: &RemotePath,
        target: &str,
    ) -> Result<(), String> {
        place_symlink(&self.root, base, link, key, target)
    }

    fn set_dir_metadata(&self, dirs: &[(RemotePath, u32, FileTime)]) {
        set_dir_metadata_with(&self.root, dirs, &mut |_| {});
    }

    fn blocked(&self, key: &RemotePath) -> Option<String> {
        match resolve_in_root(&self.root, key, false) {
            Err(e @ (PathError::InTheWay(_) | PathError::Symlink(_))) => Some(e.to_string()),
            _ => None,
        }
    }

    fn unchanged(&self, key: &RemotePath, len: u64, inode: u64, mtime: FileTime) -> bool {
        let Ok(meta) = std::fs::symlink_metadata(self.root.join(key.as_str())) else {
            return false;
        };
        meta.is_file() && meta.len() == len && meta.ino() == inode && mtime_of(&meta) == mtime
    }

    fn read_committed(&self, path: &str, offset: u64, len: usize) -> Option<Vec<u8>> {
        let file = open_committed(&self.root, path)?;
        let mut data = vec![0u8; len];
        file.read_exact_at(&mut data, offset).ok()?;
        Some(data)
    }

    fn stage(&self, _key: &RemotePath, data: &[u8], mode: u32, mtime: FileTime) -> io::Result<Staged> {
        let partial_dir = self.partial_dir_fd()?;
        let (name, mut out) = create_temp(partial_dir, mode & 0o777)?;
        let temp = self.partial_dir.join(&name);
        let written = out
            .write_all(data)
            .and_then(|()| out.set_modified(super::local::system_time(mtime)))
            .and_then(|()| out.metadata())
            .and_then(|meta| fix_mode(&out, meta, mode & 0o777));
        match written {
            Ok(meta) => Ok(Staged {
                location: temp.display().to_string(),
                identity: Identity {
                    dev: meta.dev(),
                    ino: meta.ino(),
                    len: meta.len(),
                    mtime: mtime_of(&meta),
                    is_file: true,
                },
            }),
            Err(e) => {
                let _ = rustix::fs::unlinkat(partial_dir, name.as_str(), rustix::fs::AtFlags::empty());
                Err(e)
            }
        }
    }

    fn discard(&self, staged: &Staged) {
        let _ = std::fs::remove_file(&staged.location);
    }

    fn settle(&self, files: Vec<(RemotePath, Staged)>) -> io::Result<Vec<Settled>> {
        let (settled, pending) = self.settle_deferring_names(files, PendingNames::default())?;
        self.sync_names(pending)?;
        Ok(settled)
    }

    fn settle_deferring_names(
        &self,
        files: Vec<(RemotePath, Staged)>,
        earlier: PendingNames,
    ) -> io::Result<(Vec<Settled>, PendingNames)> {
        let mut unplaced = Unplaced(files.iter().map(|(_, s)| s.location.clone()).collect());
        if !sync_filesystem(self.partial_dir_fd()?, &unplaced.0)? {
            // No `syncfs`: the earlier names are synced directory by directory.
            self.sync_names(earlier)?;
        }
        let partial_dir = self.partial_dir_fd()?;
        // Each destination directory walked once per group (no-follow descriptor walk), renamed into through that
        // descriptor; they are synced through it later (the next group's `syncfs`, or `sync_names`).
        let mut dirs: BTreeMap<String, File> = BTreeMap::new();
        let mut settled = Vec::with_capacity(files.len());
        for (key, staged) in &files {
            // On an early return, the temporaries not placed yet are removed (those renamed are gone from their
            // unique names, so removing those names does nothing).
            match self.place_staged(key, staged, partial_dir, &mut dirs) {
                Ok(()) => settled.push(Ok(staged.identity)),
                Err(Placement::Refused(why)) => {
                    self.discard(staged);
                    settled.push(Err(why));
                }
                Err(Placement::Failed(e)) => return Err(e),
            }
        }
        unplaced.0.clear();
        Ok((
            settled,
            PendingNames {
                dirs: dirs.into_values().collect(),
            },
        ))
    }

    fn sync_names(&self, pending: PendingNames) -> io::Result<()> {
        for dir in &pending.dirs {
            dir.sync_all()?;
        }
        Ok(())
    }

    fn remove_partial(&self, location: &str) {
        let partial = Path::new(location);
        if std::fs::symlink_metadata(partial).is_ok_and(|m| m.is_file()) {
            if let Err(e) = std::fs::remove_file(partial) {
                tracing::warn!(partial = %partial.display(), error = %e, "could not remove a replaced partial");
            }
        }
    }
}

impl LocalVolume {
    /// The partial directory's descriptor, opened on first use and kept (see [`LocalVolume::partial_fd`]).
    fn partial_dir_fd(&self) -> io::Result<&File> {
        if let Some(dir) = self.partial_fd.get() {
            return Ok(dir);
        }
        let opened = crate::path::open_no_follow(&self.partial_dir)?;
        if !opened.metadata()?.is_dir() {
            return Err(io::Error::other(format!(
                "{} is not a directory",
                self.partial_dir.display()
            )));
        }
        // Two threads may both open it; one descriptor is kept, the other closed.
        Ok(self.partial_fd.get_or_init(|| opened))
    }

    /// Renames the staged temporary (in `partial_dir`) over `key`, through directory descriptors on both sides (no
    /// symlink is followed, even one swapped in meanwhile), checking before and after the rename that the name
    /// holds the temporary written, as a single file's commit does. The destination's directory is walked once per
    /// group and kept in `dirs`.
    fn place_staged(
        &self,
        key: &RemotePath,
        staged: &Staged,
        partial_dir: &File,
        dirs: &mut BTreeMap<String, File>,
    ) -> Result<(), Placement> {
        let refused = |e: PathError| match e {
            // An I/O error on the walk or the rename (a full disk, EIO) fails the batch.
            PathError::Io { source, .. } => Placement::Failed(source),
            refused => Placement::Refused(refused.to_string()),
        };
        let swapped = || {
            Placement::Refused(format!(
                "the temporary file of {key} was replaced after it was verified"
            ))
        };
        let verified = Some((staged.identity.dev, staged.identity.ino));
        let name = Path::new(&staged.location)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if !inode_at(partial_dir, name).is_ok_and(|found| found == verified) {
            return Err(swapped());
        }
        let parent = key.as_str().rsplit_once('/').map_or("", |(parent, _)| parent);
        let dir = match dirs.entry(parent.to_string()) {
            std::collections::btree_map::Entry::Occupied(dir) => dir.into_mut(),
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(open_parent_dir(&self.root, key).map_err(refused)?)
            }
        };
        rename_into_opened(&self.root, key, dir, partial_dir, name, Replace::File).map_err(refused)?;
        let final_name = key.components().last().expect("a RemotePath has a component");
        if !inode_at(dir, final_name).is_ok_and(|found| found == verified) {
            // Swapped in the instant between the check and the rename: take the stranger's file away again.
            let _ = rustix::fs::unlinkat(dir, final_name, rustix::fs::AtFlags::empty());
            return Err(swapped());
        }
        Ok(())
    }
}

enum Placement {
    Refused(String),
    Failed(io::Error),
}

/// A process-wide source of unique temporary names: a random start drawn once (two processes sharing a partial
/// directory do not walk the same names), then one more per name. A name already taken (another process's, or a
/// crash's leftover) is skipped by the exclusive create.
static TEMP_NAMES: std::sync::LazyLock<std::sync::atomic::AtomicU64> =
    std::sync::LazyLock::new(|| std::sync::atomic::AtomicU64::new(crate::random::u64()));

/// How many taken names [`create_temp`] skips before it gives up.
const TEMP_NAME_TRIES: usize = 64;

/// Creates a new temporary `.ferry-<16 hex>.small` in `dir` (exclusively, never through a symlink), with `mode`
/// as its creation mode (the process's umask may clear bits of it: [`fix_mode`]). One `openat`, no `getrandom`.
fn create_temp(dir: &File, mode: u32) -> io::Result<(String, File)> {
    use rustix::fs::{Mode, OFlags};
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut last = None;
    for _ in 0..TEMP_NAME_TRIES {
        let n = TEMP_NAMES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!(".ferry-{n:016x}.small");
        match rustix::fs::openat(dir, name.as_str(), flags, Mode::from_raw_mode(mode)) {
            Ok(fd) => return Ok((name, File::from(fd))),
            Err(rustix::io::Errno::EXIST) => last = Some(rustix::io::Errno::EXIST),
            Err(e) => return Err(e.into()),
        }
    }
    Err(last.map_or_else(|| io::Error::other("no temporary name"), io::Error::from))
}

/// Gives `file` (whose metadata is `meta`) the permission bits `mode` if its creation left others (a umask), and
/// returns its metadata: the `fchmod` only when it changes something. A mode change leaves the mtime alone.
fn fix_mode(file: &File, meta: std::fs::Metadata, mode: u32) -> io::Result<std::fs::Metadata> {
    use std::os::unix::fs::PermissionsExt;
    if meta.mode() & 0o7777 == mode {
        return Ok(meta);
    }
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    file.metadata()
}

/// Temporaries of a group not placed yet; removed when settling stops early.
struct Unplaced(Vec<String>);

impl Drop for Unplaced {
    fn drop(&mut self) {
        for temp in &self.0 {
            let _ = std::fs::remove_file(temp);
        }
    }
}

/// Makes the temporary files durable: one `syncfs` of their filesystem (which also makes every earlier rename on
/// it durable: `true`), or an `fdatasync` each where that fails (`false`).
fn sync_filesystem(dir: &File, temps: &[String]) -> io::Result<bool> {
    if rustix::fs::syncfs(dir).is_ok() {
        return Ok(true);
    }
    for temp in temps {
        File::open(temp).and_then(|f| f.sync_data())?;
    }
    Ok(false)
}

/// Makes `key` a symlink to `target` (already checked to stay inside the tree and not to pass through another link
/// of the offer), replacing a file or another symlink there, atomically. Refused: a directory in the way, or a
/// symlink already on disk anywhere along the target's walk (it could lead out of the tree).
fn place_symlink(
    root: &Path,
    base: Option<&RemotePath>,
    link: &str,
    key: &RemotePath,
    target: &str,
) -> Result<(), String> {
    let tree_dir = match base {
        Some(base) => root.join(base.as_str()),
        None => root.to_path_buf(),
    };
    for step in link_walk(link, target).ok_or_else(|| format!("{key} -> {target:?} leaves the tree"))? {
        if std::fs::symlink_metadata(tree_dir.join(&step)).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(format!(
                "{key} -> {target:?} passes through the existing symlink {step}"
            ));
        }
    }
    let components: Vec<&str> = key.components().collect();
    let (name, parents) = components.split_last().expect("a RemotePath has a component");
    // The link is made and renamed relative to the directory the no-follow walk opened, never by path.
    let dir = open_dir_beneath(root, parents, true).map_err(|e| e.to_string())?;
    match entry_at(&dir, std::ffi::OsStr::new(name)) {
        Ok(Entry::Dir(_)) => return Err(format!("{key} is a directory")),
        Ok(Entry::Symlink(existing)) if existing.as_os_str() == target => return Ok(()),
        _ => {}
    }
    let temp = format!(".ferry-{:016x}.link", crate::random::u64());
    if target.contains('\0') {
        return Err(format!("{key} -> {target:?} holds a NUL"));
    }
    rustix::fs::symlinkat(target, &dir, temp.as_str()).map_err(|e| std::io::Error::from(e).to_string())?;
    match rename_into_from(root, key, &dir, &temp, Replace::FileOrLink) {
        Ok(_) => Ok(()),
        Err(e) => {
            // Best effort: the temporary link is only clutter, and gc removes `.ferry-*` leftovers too.
            let _ = rustix::fs::unlinkat(&dir, temp.as_str(), rustix::fs::AtFlags::empty());
            Err(e.to_string())
        }
    }
}

/// Applies mode and mtime to each directory of `dirs` that exists, calling `opened` between opening each and
/// changing it (a test swaps the path for a symlink there). Mode and times go through the descriptor the no-follow
/// walk opened (`fchmod`, `futimens`), never by path: a directory swapped for a symlink afterwards cannot redirect
/// them out of the root.
pub(crate) fn set_dir_metadata_with(
    root: &Path,
    dirs: &[(RemotePath, u32, FileTime)],
    opened: &mut dyn FnMut(&RemotePath),
) {
    use std::os::unix::fs::PermissionsExt;
    for (key, mode, mtime) in dirs {
        let components: Vec<&str> = key.components().collect();
        let applied = open_dir_beneath(root, &components, false)
            .map_err(std::io::Error::other)
            .and_then(|dir| {
                opened(key);
                dir.set_permissions(std::fs::Permissions::from_mode(mode & 0o777))?;
                dir.set_modified(super::local::system_time(*mtime))
            });
        if let Err(e) = applied {
            tracing::warn!(path = %key, error = %e, "could not apply directory metadata");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn volume() -> (tempfile::TempDir, LocalVolume) {
        let dir = tempfile::tempdir().unwrap();
        let (root, partials) = (dir.path().join("root"), dir.path().join("partials"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&partials).unwrap();
        (dir, LocalVolume::new(root, partials))
    }

    /// A staged file has exactly the mode asked for, whatever the umask clears at its create (0o666 under the
    /// usual 0o022 needs the `fchmod`; 0o600 does not), and the mtime asked for.
    #[test]
    fn a_staged_file_has_the_mode_and_mtime_asked_for() {
        let (_dir, volume) = volume();
        let key = RemotePath::parse("f").unwrap();
        let mtime = FileTime {
            secs: 1_000_000,
            nanos: 5,
        };
        for mode in [0o666, 0o600, 0o755, 0o777] {
            let staged = volume.stage(&key, b"bytes", mode, mtime).unwrap();
            let meta = std::fs::symlink_metadata(&staged.location).unwrap();
            assert_eq!(meta.permissions().mode() & 0o7777, mode, "{staged:?}");
            assert_eq!((mtime_of(&meta), staged.identity.mtime), (mtime, mtime));
            assert_eq!((meta.ino(), meta.len()), (staged.identity.ino, 5));
        }
    }

    /// The temporary names come from a counter, not a random draw per file: a name already taken in the partial
    /// directory (another process's, a crash's leftover) is skipped, never opened or truncated.
    #[test]
    fn a_taken_temporary_name_is_skipped_and_left_alone() {
        let (dir, volume) = volume();
        let next = TEMP_NAMES.load(std::sync::atomic::Ordering::Relaxed);
        let planted: Vec<_> = (0..4)
            .map(|i| {
                dir.path()
                    .join(format!("partials/.ferry-{:016x}.small", next.wrapping_add(i)))
            })
            .collect();
        for path in &planted {
            std::fs::write(path, b"someone else's").unwrap();
        }
        let staged = volume
            .stage(&RemotePath::parse("f").unwrap(), b"mine", 0o644, FileTime::default())
            .unwrap();
        assert!(!planted.iter().any(|p| p.display().to_string() == staged.location));
        assert_eq!(std::fs::read(&staged.location).unwrap(), b"mine");
        for path in &planted {
            assert_eq!(std::fs::read(path).unwrap(), b"someone else's");
        }
        let again = volume
            .stage(&RemotePath::parse("f").unwrap(), b"mine", 0o644, FileTime::default())
            .unwrap();
        assert_ne!(again.location, staged.location);
    }
}
