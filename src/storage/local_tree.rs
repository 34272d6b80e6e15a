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
        use std::os::unix::fs::PermissionsExt;
        let temp = self
            .partial_dir
            .join(format!(".ferry-{:016x}.small", crate::random::u64()));
        let mut out = std::fs::OpenOptions::new().write(true).create_new(true).open(&temp)?;
        let staged = |meta: &std::fs::Metadata| Staged {
            location: temp.display().to_string(),
            identity: Identity {
                dev: meta.dev(),
                ino: meta.ino(),
                len: meta.len(),
                mtime: mtime_of(meta),
                is_file: true,
            },
        };
        let written = out
            .write_all(data)
            .and_then(|()| out.set_permissions(std::fs::Permissions::from_mode(mode & 0o777)))
            .and_then(|()| out.set_modified(super::local::system_time(mtime)))
            .and_then(|()| out.metadata());
        match written {
            Ok(meta) => Ok(staged(&meta)),
            Err(e) => {
                let _ = std::fs::remove_file(&temp);
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
        if !sync_filesystem(&self.partial_dir, &unplaced.0)? {
            // No `syncfs`: the earlier names are synced directory by directory.
            self.sync_names(earlier)?;
        }
        let partial_dir = File::open(&self.partial_dir)?;
        // Each destination directory walked once per group (no-follow descriptor walk), renamed into through that
        // descriptor; they are synced through it later (the next group's `syncfs`, or `sync_names`).
        let mut dirs: BTreeMap<String, File> = BTreeMap::new();
        let mut settled = Vec::with_capacity(files.len());
        for (key, staged) in &files {
            // On an early return, the temporaries not placed yet are removed (those renamed are gone from their
            // unique names, so removing those names does nothing).
            match self.place_staged(key, staged, &partial_dir, &mut dirs) {
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
fn sync_filesystem(dir: &Path, temps: &[String]) -> io::Result<bool> {
    let handle = File::open(dir)?;
    if rustix::fs::syncfs(&handle).is_ok() {
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
