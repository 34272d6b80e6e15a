//! Opens beneath a root that a concurrent symlink swap cannot redirect (proto-spec.md §7, "Paths"): every
//! component is opened with `openat` relative to the previous directory's descriptor, with `O_NOFOLLOW`, so a
//! directory swapped for a symlink between a check and a use is refused instead of followed out of the root.
//!
//! The sender reads every file it sends through these descriptors (a Pull, a tree's files), and the receiver
//! applies directory modes and times through the descriptor it walked to (`fchmod`, `futimens`), never by path.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};
use rustix::io::Errno;

use super::at::{classify, Refusal};
use super::{shown, PathError};

/// An entry opened inside a directory without following a symlink.
#[derive(Debug)]
pub enum Entry {
    /// A regular file, open for reading.
    File(File),
    /// A directory, open for reading (to list it, or to change its mode and times through the descriptor).
    Dir(File),
    /// A symlink, never followed, with its target text.
    Symlink(PathBuf),
    /// Anything else (a device, FIFO or socket): never opened.
    Other,
}

/// Opens the directory `components` below `root` (the root itself if empty), one `openat` with `O_NOFOLLOW` per
/// component; missing directories are created (and synced into their parent) if `create`. A symlink or a
/// non-directory on the way is refused. Blocking.
pub fn open_dir_beneath(root: &Path, components: &[&str], create: bool) -> Result<File, PathError> {
    // The one descriptor walk (path/at.rs) serves the receiver's resolution and these opens alike; here a missing
    // component is `NotFound` (a Pull of a path that is not there) rather than an I/O error.
    super::at::walk(root, components, create).map_err(|e| match e {
        PathError::Io { path, source } if source.kind() == io::ErrorKind::NotFound => PathError::NotFound(path),
        PathError::Io { path, source } if source.raw_os_error() == Some(Errno::LOOP.raw_os_error()) => {
            PathError::Symlink(path)
        }
        other => other,
    })
}

/// Opens the existing entry `components` (at least one) below `root` without following a symlink anywhere on the
/// way or at the end. Blocking.
pub fn open_beneath(root: &Path, components: &[&str]) -> Result<Entry, PathError> {
    let Some((name, parents)) = components.split_last() else {
        return open_dir_beneath(root, &[], false).map(Entry::Dir);
    };
    let dir = open_dir_beneath(root, parents, false)?;
    entry_at(&dir, OsStr::new(name)).map_err(|e| refusal(root, &root.join(components.join("/")), Refusal::Io(e)))
}

/// Opens the regular file `components` below `root` for reading, refusing a symlink anywhere on the way or at the
/// end, and anything that is not a regular file. Blocking.
pub fn open_file_beneath(root: &Path, components: &[&str]) -> Result<File, PathError> {
    let Some((_, parents)) = components.split_last() else {
        return Err(PathError::InTheWay(shown(root, root)));
    };
    open_file_in(root, &open_dir_beneath(root, parents, false)?, components)
}

/// Opens the regular file `components` (at least one) below `root` through `dir`, the directory of its last
/// component already opened by the no-follow walk ([`open_dir_beneath`]): one no-follow open, so that the files
/// of one directory cost one walk. Refuses what [`open_file_beneath`] refuses, with the same errors. Blocking.
pub fn open_file_in(root: &Path, dir: &File, components: &[&str]) -> Result<File, PathError> {
    open_file_in_with_metadata(root, dir, components).map(|(file, _)| file)
}

/// [`open_file_in`], also returning the opened file's metadata (the `fstat` that checked it is the inode looked
/// at): a caller that needs the size, mtime or mode takes no `fstat` of its own. Blocking.
pub fn open_file_in_with_metadata(
    root: &Path,
    dir: &File,
    components: &[&str],
) -> Result<(File, std::fs::Metadata), PathError> {
    let at = || root.join(components.join("/"));
    let name = components.last().copied().unwrap_or_default();
    match open_entry_at(dir, OsStr::new(name)).map_err(|e| refusal(root, &at(), Refusal::Io(e)))? {
        (Entry::File(file), Some(meta)) => Ok((file, meta)),
        (Entry::Symlink(_), _) => Err(PathError::Symlink(shown(root, &at()))),
        _ => Err(PathError::InTheWay(shown(root, &at()))),
    }
}

fn refusal(root: &Path, at: &Path, refusal: Refusal) -> PathError {
    match refusal {
        Refusal::Io(e) if e.kind() == io::ErrorKind::NotFound => PathError::NotFound(shown(root, at)),
        Refusal::Io(e) if e.raw_os_error() == Some(Errno::LOOP.raw_os_error()) => PathError::Symlink(shown(root, at)),
        other => classify(root, at, other),
    }
}

/// What an entry of a directory is, looked at without following or opening it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symlink.
    Symlink,
    /// A device, FIFO or socket.
    Other,
}

/// What `name` inside `dir` is (`fstatat` with `AT_SYMLINK_NOFOLLOW`), without opening it. Blocking.
pub fn kind_at(dir: &File, name: &OsStr) -> io::Result<Kind> {
    Ok(match FileType::from_raw_mode(stat_at(dir, name)?.st_mode) {
        FileType::RegularFile => Kind::File,
        FileType::Directory => Kind::Dir,
        FileType::Symlink => Kind::Symlink,
        _ => Kind::Other,
    })
}

/// `fstatat` without following a symlink; a name holding a NUL is `InvalidInput`.
fn stat_at(dir: &File, name: &OsStr) -> io::Result<Stat> {
    Ok(rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?)
}

/// Opens `name` inside `dir` without following it: a regular file or a directory is opened (and checked to be the
/// very inode that was looked at), a symlink is read, anything else is left unopened. Blocking.
pub fn entry_at(dir: &File, name: &OsStr) -> io::Result<Entry> {
    open_entry_at(dir, name).map(|(entry, _)| entry)
}

/// [`entry_at`], with the metadata of the file or directory opened (`None` for a symlink or anything else).
fn open_entry_at(dir: &File, name: &OsStr) -> io::Result<(Entry, Option<std::fs::Metadata>)> {
    let stat = stat_at(dir, name)?;
    let base = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let (flags, is_dir) = match FileType::from_raw_mode(stat.st_mode) {
        // O_NONBLOCK: were a FIFO swapped in after the look, opening it must not hang.
        FileType::RegularFile => (base | OFlags::NONBLOCK, false),
        FileType::Directory => (base | OFlags::DIRECTORY, true),
        FileType::Symlink => return read_link_at(dir, name).map(|target| (Entry::Symlink(target), None)),
        _ => return Ok((Entry::Other, None)),
    };
    let file = File::from(rustix::fs::openat(dir, name, flags, Mode::empty())?);
    let meta = file.metadata()?;
    if meta.ino() != stat.st_ino || meta.dev() != stat.st_dev {
        return Err(io::Error::other("it was replaced while it was being opened"));
    }
    let entry = if is_dir { Entry::Dir(file) } else { Entry::File(file) };
    Ok((entry, Some(meta)))
}

/// The target of the symlink `name` inside `dir`.
fn read_link_at(dir: &File, name: &OsStr) -> io::Result<PathBuf> {
    let target = rustix::fs::readlinkat(dir, name, Vec::new())?;
    Ok(PathBuf::from(OsString::from_vec(target.into_bytes())))
}

/// The names in the directory `dir` (without `.` and `..`), in no particular order. Blocking.
pub fn list_dir(dir: &File) -> io::Result<Vec<OsString>> {
    Ok(list_dir_typed(dir)?.into_iter().map(|(name, _)| name).collect())
}

/// [`list_dir`] with what each entry is as the listing tells it (`d_type`), without a `stat` per entry; `None`
/// where the filesystem does not say (`DT_UNKNOWN`: ask [`kind_at`]). Only a hint, as of the listing: whatever
/// opens an entry afterwards still checks what it opened. Blocking.
pub fn list_dir_typed(dir: &File) -> io::Result<Vec<(OsString, Option<Kind>)>> {
    // `read_from` opens the same directory afresh (`openat(dir, ".")`): the listing gets its own position.
    let mut stream = rustix::fs::Dir::read_from(dir)?;
    let mut names = Vec::new();
    while let Some(entry) = stream.read() {
        let entry = entry?;
        let name = entry.file_name().to_bytes().to_vec();
        if name == b"." || name == b".." {
            continue;
        }
        let kind = match entry.file_type() {
            FileType::RegularFile => Some(Kind::File),
            FileType::Directory => Some(Kind::Dir),
            FileType::Symlink => Some(Kind::Symlink),
            FileType::Unknown => None,
            _ => Some(Kind::Other),
        };
        names.push((OsString::from_vec(name), kind));
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_swapped_for_a_symlink_is_not_walked_through() {
        let dir = tempfile::tempdir().unwrap();
        let (root, outside) = (dir.path().join("root"), dir.path().join("outside"));
        std::fs::create_dir_all(root.join("pub/d")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(root.join("pub/d/f"), b"inside").unwrap();
        std::fs::write(outside.join("f"), b"secret").unwrap();
        let file = open_file_beneath(&root, &["pub", "d", "f"]).unwrap();
        assert_eq!(std::io::read_to_string(file).unwrap(), "inside");
        std::fs::rename(root.join("pub/d"), dir.path().join("moved")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("pub/d")).unwrap();
        assert!(matches!(
            open_file_beneath(&root, &["pub", "d", "f"]),
            Err(PathError::Symlink(p)) if p == "pub/d"
        ));
        assert!(matches!(open_beneath(&root, &["pub", "d"]), Ok(Entry::Symlink(_))));
        assert!(matches!(
            open_file_beneath(&root, &["pub", "nope"]),
            Err(PathError::NotFound(p)) if p == "pub/nope"
        ));
        let mut names = list_dir(&open_dir_beneath(&root, &["pub"], false).unwrap()).unwrap();
        names.sort();
        assert_eq!(names, vec![OsString::from("d")]);
    }
}
