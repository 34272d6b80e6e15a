//! Renames into the root that a concurrent symlink swap cannot redirect: directories are walked with `openat`
//! (`O_NOFOLLOW`), one descriptor per step, and the final `renameat` names a single component relative to the last
//! directory's descriptor. Checking paths first and renaming by path later (what [`super::resolve_in_root`] alone
//! allows) leaves a window in which a local user could swap a checked directory for a symlink leading out.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use super::{shown, PathError, RemotePath};

/// What a rename may replace at the final name (a directory never).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replace {
    /// Nothing or a regular file; a symlink there is refused (a file never takes a link's place silently).
    File,
    /// Also a symlink (placing a recorded link over an older one; `rename` replaces the link, never its target).
    FileOrLink,
}

/// Renames `from` to `path` under `root`, creating missing parent directories (each synced into its parent), and
/// refusing a symlink or a non-directory on the way and a directory (or, unless `replace` allows it, a symlink) at
/// the final name. Returns the target's path and its opened parent directory (to fsync after the rename). Blocking.
pub fn rename_into(
    root: &Path,
    path: &RemotePath,
    from: &Path,
    replace: Replace,
) -> Result<(PathBuf, File), PathError> {
    let from_c = CString::new(from.as_os_str().as_bytes()).map_err(|_| PathError::Io {
        path: shown(root, from),
        source: io::ErrorKind::InvalidInput.into(),
    })?;
    let renamed = rename_at(root, path, rustix::fs::CWD, &from_c, replace)?;
    Ok((renamed.target, renamed.parent))
}

/// A finished rename into the root.
#[derive(Debug)]
pub struct Renamed {
    /// The target's path (for messages).
    pub target: PathBuf,
    /// The target's parent directory, opened (to fsync after the rename).
    pub parent: File,
    /// The regular file the rename replaced, held by an `O_PATH` descriptor taken just before the rename, so the
    /// rename only unlinks its name: its blocks are freed when the last descriptor closes (which for a large file
    /// takes ext4 about 0.2 s per GiB), not inside the rename. `None` where no regular file was replaced.
    pub replaced: Option<File>,
}

/// [`rename_into`] for the entry `from_name` of the directory `from_dir`: the source is named relative to a
/// descriptor too, so neither side of the rename can be redirected by a swapped path; the file it replaces comes
/// back still open ([`Renamed::replaced`]). Blocking.
pub fn rename_into_from(
    root: &Path,
    path: &RemotePath,
    from_dir: &File,
    from_name: &str,
    replace: Replace,
) -> Result<Renamed, PathError> {
    let from_c = CString::new(from_name).map_err(|_| PathError::Io {
        path: from_name.to_string(),
        source: io::ErrorKind::InvalidInput.into(),
    })?;
    rename_at(root, path, from_dir.as_fd(), &from_c, replace)
}

/// The parent directory of `path` under `root`, opened by the same no-follow descriptor walk as
/// [`rename_into_from`] (missing directories created, each synced into its parent): a batch of files bound for one
/// directory walks to it once and renames each with [`rename_into_opened`]. Blocking.
pub fn open_parent_dir(root: &Path, path: &RemotePath) -> Result<File, PathError> {
    let components: Vec<&str> = path.components().collect();
    let (_, parents) = components.split_last().expect("a RemotePath has a component");
    walk(root, parents, true)
}

/// [`rename_into_from`] into `dir`, the parent of `path` as [`open_parent_dir`] opened it: renames the entry
/// `from_name` of `from_dir` to `path`'s last component there, refusing a directory (or, unless `replace` allows
/// it, a symlink) at that name. Both sides are named relative to descriptors. Blocking.
pub fn rename_into_opened(
    root: &Path,
    path: &RemotePath,
    dir: &File,
    from_dir: &File,
    from_name: &str,
    replace: Replace,
) -> Result<(), PathError> {
    let shown_path = root.join(path.as_str());
    let name = path.components().last().expect("a RemotePath has a component");
    let (from_c, name_c) = match CString::new(from_name) {
        Ok(from_c) => (from_c, cstring(name)),
        Err(_) => {
            return Err(PathError::Io {
                path: from_name.to_string(),
                source: io::ErrorKind::InvalidInput.into(),
            })
        }
    };
    // Nothing at the name (a fresh push): one `renameat2(RENAME_NOREPLACE)`, with nothing to look at first. Where
    // something is there (or the filesystem has no such flag), it is looked at and replaced as before.
    match rustix::fs::renameat_with(from_dir, &from_c, dir, &name_c, rustix::fs::RenameFlags::NOREPLACE) {
        Ok(()) => return Ok(()),
        Err(Errno::EXIST | Errno::INVAL | Errno::NOSYS | Errno::NOTSUP) => {}
        Err(e) => return Err(classify(root, &shown_path, Refusal::Io(e.into()))),
    }
    check_final(dir, &name_c, replace).map_err(|e| classify(root, &shown_path, e))?;
    rustix::fs::renameat(from_dir, &from_c, dir, &name_c)
        .map_err(|e| classify(root, &shown_path, Refusal::Io(e.into())))
}

fn rename_at(
    root: &Path,
    path: &RemotePath,
    from_dir: BorrowedFd<'_>,
    from: &CStr,
    replace: Replace,
) -> Result<Renamed, PathError> {
    let components: Vec<&str> = path.components().collect();
    let (name, parents) = components.split_last().expect("a RemotePath has a component");
    let mut shown_path = root.to_path_buf();
    let io_error = |at: &Path, source| PathError::Io {
        path: shown(root, at),
        source,
    };
    let dir = walk(root, parents, true)?;
    shown_path.extend(parents);
    shown_path.push(name);
    let name_c = cstring(name);
    check_final(&dir, &name_c, replace).map_err(|e| classify(root, &shown_path, e))?;
    let replaced = open_replaced(&dir, &name_c);
    rustix::fs::renameat(from_dir, from, &dir, &name_c).map_err(|e| io_error(&shown_path, e.into()))?;
    Ok(Renamed {
        target: root.join(path.as_str()),
        parent: dir,
        replaced,
    })
}

/// The regular file at `name` in `dir`, held by an `O_PATH` descriptor (which opens nothing: no device or FIFO
/// is touched, no access right is needed); `None` if there is none.
fn open_replaced(dir: &File, name: &CStr) -> Option<File> {
    let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let file = File::from(rustix::fs::openat(dir, name, flags, Mode::empty()).ok()?);
    file.metadata().ok()?.is_file().then_some(file)
}

/// Walks `components` below `root` as directories through descriptors (`openat` with `O_NOFOLLOW`, creating missing
/// ones when `create`, each synced into its parent) and returns the last one's descriptor. No system call gets more
/// than one component, so a path of `MAX_PATH_LEN` bytes resolves however deep `root` lies (proto-spec.md §7).
pub(super) fn walk(root: &Path, components: &[&str], create: bool) -> Result<File, PathError> {
    let mut shown_path = root.to_path_buf();
    let mut dir = open_dir(root).map_err(|source| PathError::Io {
        path: String::new(),
        source,
    })?;
    for component in components {
        shown_path.push(component);
        dir = step(&dir, component, create).map_err(|e| classify(root, &shown_path, e))?;
    }
    Ok(dir)
}

/// [`walk`] creating missing directories without syncing each into its parent: every directory in which this walk
/// created one is pushed (a second descriptor of it) onto `unsynced`, for the caller to sync once however many
/// directories it got. Blocking.
pub(super) fn walk_deferring(root: &Path, components: &[&str], unsynced: &mut Vec<File>) -> Result<File, PathError> {
    let mut shown_path = root.to_path_buf();
    let io_error = |source| PathError::Io {
        path: String::new(),
        source,
    };
    let mut dir = open_dir(root).map_err(io_error)?;
    for component in components {
        shown_path.push(component);
        let (next, created) = step_noting(&dir, component, true, false).map_err(|e| classify(root, &shown_path, e))?;
        if created {
            unsynced.push(dir.try_clone().map_err(io_error)?);
        }
        dir = next;
    }
    Ok(dir)
}

/// Makes the entries of `dir` durable (`fsync` of the directory).
pub(super) fn sync_dir(dir: &File) -> io::Result<()> {
    #[cfg(test)]
    DIR_SYNCS.with(|syncs| syncs.set(syncs.get() + 1));
    dir.sync_all()
}

#[cfg(test)]
thread_local! {
    /// Directory syncs made by [`sync_dir`] on this thread (tests count them).
    pub(super) static DIR_SYNCS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The metadata of what is at `path` under `root` (a symlink's own, never its target's), found through directory
/// descriptors (`openat`), so the root's depth does not count against the OS path limit. Blocking.
pub fn metadata_in_root(root: &Path, path: &RemotePath) -> Result<std::fs::Metadata, PathError> {
    let components: Vec<&str> = path.components().collect();
    let (name, parents) = components.split_last().expect("a RemotePath has a component");
    let dir = walk(root, parents, false)?;
    let name_c = cstring(name);
    let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let shown_path = root.join(path.as_str());
    let file = rustix::fs::openat(&dir, &name_c, flags, Mode::empty())
        .map(File::from)
        .map_err(|e| classify(root, &shown_path, Refusal::Io(e.into())))?;
    file.metadata().map_err(|e| classify(root, &shown_path, Refusal::Io(e)))
}

/// Whether the directory `parents` under `root` may be written (see [`super::check_writable`]). Blocking.
pub(super) fn check_writable(root: &Path, parents: &[&str]) -> Result<(), PathError> {
    let dir = walk(root, parents, false)?;
    let access = rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK;
    rustix::fs::accessat(&dir, c".", access, AtFlags::empty()).map_err(|e| {
        let mut shown_path = root.to_path_buf();
        shown_path.extend(parents);
        classify(root, &shown_path, Refusal::Io(e.into()))
    })
}

/// Refuses a symlink or a directory at `name` inside `dir` (`shown` names it in the error).
pub(super) fn check_file_name(root: &Path, shown: &Path, dir: &File, name: &str) -> Result<(), PathError> {
    check_final(dir, &cstring(name), Replace::File).map_err(|e| classify(root, shown, e))
}

/// Why a step failed: a symlink, something in the way, or an I/O error.
pub(super) enum Refusal {
    Symlink,
    InTheWay,
    Io(io::Error),
}

pub(super) fn classify(root: &Path, at: &Path, refusal: Refusal) -> PathError {
    match refusal {
        Refusal::Symlink => PathError::Symlink(shown(root, at)),
        Refusal::InTheWay => PathError::InTheWay(shown(root, at)),
        Refusal::Io(source) => PathError::Io {
            path: shown(root, at),
            source,
        },
    }
}

fn open_dir(path: &Path) -> io::Result<File> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    Ok(rustix::fs::open(path, flags, Mode::empty())?.into())
}

pub(super) fn cstring(component: &str) -> CString {
    CString::new(component).expect("RemotePath components hold no NUL")
}

/// Opens the directory `component` inside `dir` without following a symlink, creating it (and syncing `dir`) if
/// it is missing and `create` is set.
fn step(dir: &File, component: &str, create: bool) -> Result<File, Refusal> {
    step_noting(dir, component, create, true).map(|(next, _)| next)
}

/// [`step`], also saying whether it created the directory (or found one made meanwhile); `sync` makes a created
/// directory durable in `dir` at once, else the caller syncs `dir` later.
fn step_noting(dir: &File, component: &str, create: bool, sync: bool) -> Result<(File, bool), Refusal> {
    let name = cstring(component);
    let mut created = false;
    for _ in 0..2 {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        match rustix::fs::openat(dir, &name, flags, Mode::empty()) {
            Ok(fd) => return Ok((fd.into(), created)),
            Err(Errno::NOENT) if create => {
                match rustix::fs::mkdirat(dir, &name, Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(Refusal::Io(e.into())),
                }
                created = true;
                if sync {
                    sync_dir(dir).map_err(Refusal::Io)?;
                }
            }
            Err(Errno::LOOP | Errno::NOTDIR) => return Err(kind_of(dir, &name).unwrap_or(Refusal::InTheWay)),
            Err(e) => return Err(Refusal::Io(e.into())),
        }
    }
    Err(Refusal::InTheWay)
}

/// Refuses a directory at the final name, and a symlink unless `replace` allows it.
fn check_final(dir: &File, name: &CString, replace: Replace) -> Result<(), Refusal> {
    match kind_of(dir, name) {
        Some(refusal @ Refusal::Symlink) if replace == Replace::File => Err(refusal),
        Some(Refusal::InTheWay) => Err(Refusal::InTheWay),
        _ => Ok(()),
    }
}

/// What `name` in `dir` is, as a refusal: a symlink, a directory (in the way of a file), or `None` (absent or
/// a regular file).
pub(super) fn kind_of(dir: &File, name: &CString) -> Option<Refusal> {
    let stat = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).ok()?;
    match FileType::from_raw_mode(stat.st_mode) {
        FileType::Symlink => Some(Refusal::Symlink),
        FileType::Directory => Some(Refusal::InTheWay),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        (dir, root, outside)
    }

    #[test]
    fn renames_into_new_directories() {
        let (dir, root, _) = setup();
        let temp = dir.path().join("temp");
        std::fs::write(&temp, b"x").unwrap();
        let (target, _) = rename_into(&root, &RemotePath::parse("a/b/c.txt").unwrap(), &temp, Replace::File).unwrap();
        assert_eq!(target, root.join("a/b/c.txt"));
        assert_eq!(std::fs::read(&target).unwrap(), b"x");
    }

    /// A rename over a regular file hands back that file still open (its name gone, its bytes not yet freed);
    /// over nothing, or over a symlink it may replace, nothing.
    #[test]
    fn a_rename_hands_back_the_file_it_replaced() {
        use std::os::unix::fs::MetadataExt;
        let (dir, root, _) = setup();
        let from = File::open(dir.path()).unwrap();
        let path = RemotePath::parse("d/f.bin").unwrap();
        let rename = |bytes: &[u8], replace| {
            std::fs::write(dir.path().join("temp"), bytes).unwrap();
            rename_into_from(&root, &path, &from, "temp", replace).unwrap()
        };
        assert!(rename(b"first", Replace::File).replaced.is_none(), "nothing was there");
        let old_inode = std::fs::metadata(root.join("d/f.bin")).unwrap().ino();
        let renamed = rename(b"second, longer", Replace::File);
        let replaced = renamed
            .replaced
            .expect("the first version, still open")
            .metadata()
            .unwrap();
        assert_eq!((replaced.ino(), replaced.len(), replaced.nlink()), (old_inode, 5, 0));
        assert_eq!(std::fs::read(root.join("d/f.bin")).unwrap(), b"second, longer");
        std::fs::remove_file(root.join("d/f.bin")).unwrap();
        std::os::unix::fs::symlink("elsewhere", root.join("d/f.bin")).unwrap();
        assert!(
            rename(b"third", Replace::FileOrLink).replaced.is_none(),
            "a symlink is not held"
        );
    }

    /// Into an opened directory: a free name takes the no-replace rename; a file there is replaced; a directory
    /// or (for a file) a symlink there is refused and left as it was.
    #[test]
    fn a_rename_into_an_opened_directory_replaces_only_a_file() {
        let (dir, root, outside) = setup();
        let from = File::open(dir.path()).unwrap();
        let into = |name: &str, bytes: &[u8], replace| {
            std::fs::write(dir.path().join("temp"), bytes).unwrap();
            let path = RemotePath::parse(&format!("d/{name}")).unwrap();
            rename_into_opened(
                &root,
                &path,
                &open_parent_dir(&root, &path).unwrap(),
                &from,
                "temp",
                replace,
            )
        };
        into("new", b"1", Replace::File).unwrap();
        assert_eq!(std::fs::read(root.join("d/new")).unwrap(), b"1");
        into("new", b"2", Replace::File).unwrap();
        assert_eq!(std::fs::read(root.join("d/new")).unwrap(), b"2");
        std::fs::create_dir(root.join("d/sub")).unwrap();
        assert!(matches!(into("sub", b"3", Replace::File), Err(PathError::InTheWay(_))));
        assert!(root.join("d/sub").is_dir());
        std::os::unix::fs::symlink(outside.join("t"), root.join("d/link")).unwrap();
        assert!(matches!(into("link", b"4", Replace::File), Err(PathError::Symlink(_))));
        assert!(std::fs::symlink_metadata(root.join("d/link"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(!outside.join("t").exists(), "nothing written through the link");
        into("link", b"5", Replace::FileOrLink).unwrap();
        assert_eq!(std::fs::read(root.join("d/link")).unwrap(), b"5");
    }

    #[test]
    fn a_directory_swapped_for_a_symlink_after_the_check_does_not_redirect_the_rename() {
        let (dir, root, outside) = setup();
        let path = RemotePath::parse("a/f").unwrap();
        super::super::resolve_in_root(&root, &path, true).unwrap();
        // The race: after the path was checked, a local user swaps the checked directory for a symlink out.
        std::fs::remove_dir(root.join("a")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("a")).unwrap();
        let temp = dir.path().join("temp");
        std::fs::write(&temp, b"x").unwrap();
        assert!(matches!(
            rename_into(&root, &path, &temp, Replace::File),
            Err(PathError::Symlink(_))
        ));
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            0,
            "nothing landed outside the root"
        );
        // A symlink at the final name is refused too, and a directory there is in the way.
        std::os::unix::fs::symlink(outside.join("g"), root.join("g")).unwrap();
        let final_link = RemotePath::parse("g").unwrap();
        assert!(matches!(
            rename_into(&root, &final_link, &temp, Replace::File),
            Err(PathError::Symlink(_))
        ));
        std::fs::create_dir(root.join("d")).unwrap();
        let final_dir = RemotePath::parse("d").unwrap();
        assert!(matches!(
            rename_into(&root, &final_dir, &temp, Replace::File),
            Err(PathError::InTheWay(_))
        ));
        std::fs::write(root.join("file"), b"").unwrap();
        let through_file = RemotePath::parse("file/x").unwrap();
        assert!(matches!(
            rename_into(&root, &through_file, &temp, Replace::File),
            Err(PathError::InTheWay(_))
        ));
    }
}
