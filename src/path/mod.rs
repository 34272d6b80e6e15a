//! Destination paths: parse what a peer sends, and resolve it inside a root without leaving it.
//!
//! A [`RemotePath`] is relative, `/`-separated and normalised: no empty, `.` or `..` components, no NUL, not
//! absolute, nothing under the reserved `.ferry/` directory, and within length limits (proto-spec.md, "Paths").
//! [`resolve_in_root`] walks the components with directory descriptors, so a symlink anywhere on the way (planted
//! inside the root or not) is refused rather than followed.

use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

mod at;
mod beneath;

pub use at::{rename_into, rename_into_from, Replace};
pub use beneath::{entry_at, kind_at, list_dir, open_beneath, open_dir_beneath, open_file_beneath, Entry, Kind};

/// Longest accepted path, in bytes.
pub const MAX_PATH_LEN: usize = 4096;
/// Longest accepted component, in bytes.
pub const MAX_COMPONENT_LEN: usize = 255;
/// The receiver's private directory under its root (partials, state).
pub const RESERVED_DIR: &str = ".ferry";

/// Why a path was refused.
#[derive(Debug, Error)]
pub enum PathError {
    /// Empty path, or one naming a directory (trailing `/`).
    #[error("path {0:?} does not name a file")]
    NotAFile(String),
    /// Leading `/`.
    #[error("path {0:?} is absolute; destination paths are relative to the server root")]
    Absolute(String),
    /// A `.`, `..` or empty component.
    #[error("path {0:?} has a '.', '..' or empty component")]
    NotNormal(String),
    /// NUL or another control character.
    #[error("path {0:?} contains a control character")]
    ControlCharacter(String),
    /// Too long as a whole or in one component.
    #[error("path is longer than {MAX_PATH_LEN} bytes or has a component over {MAX_COMPONENT_LEN} bytes")]
    TooLong,
    /// A component that names a device on some systems (`CON`, `NUL`, `COM1`, `LPT1`... with any extension).
    #[error("path {0:?} has a component that is a device name (CON, PRN, AUX, NUL, COM1-9, LPT1-9)")]
    DeviceName(String),
    /// Under the receiver's private `.ferry/` directory.
    #[error("path {0:?} is inside the reserved {RESERVED_DIR}/ directory")]
    Reserved(String),
    /// A component on the way is a symlink.
    #[error("{0} is a symlink; ferry does not follow symlinks inside its root")]
    Symlink(String),
    /// A component on the way exists and is not a directory, or the target is a directory.
    #[error("{0} is in the way (not a directory, or a directory where the file should go)")]
    InTheWay(String),
    /// Nothing exists at the path.
    #[error("{0} does not exist")]
    NotFound(String),
    /// The filesystem failed while resolving.
    #[error("resolving {path}: {source}")]
    Io {
        /// Where it failed.
        path: String,
        /// The underlying error.
        source: io::Error,
    },
}

/// A validated destination path relative to a root.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RemotePath(String);

impl RemotePath {
    /// Validates `raw` as a destination path.
    pub fn parse(raw: &str) -> Result<RemotePath, PathError> {
        if raw.len() > MAX_PATH_LEN {
            return Err(PathError::TooLong);
        }
        if raw.chars().any(char::is_control) {
            return Err(PathError::ControlCharacter(raw.to_string()));
        }
        if raw.starts_with('/') {
            return Err(PathError::Absolute(raw.to_string()));
        }
        if raw.is_empty() || raw.ends_with('/') {
            return Err(PathError::NotAFile(raw.to_string()));
        }
        for component in raw.split('/') {
            if component.is_empty() || component == "." || component == ".." {
                return Err(PathError::NotNormal(raw.to_string()));
            }
            if component.len() > MAX_COMPONENT_LEN {
                return Err(PathError::TooLong);
            }
            if is_device_name(component) {
                return Err(PathError::DeviceName(raw.to_string()));
            }
        }
        // Case-insensitive: on a case-folding filesystem `.FERRY` is the same directory.
        if raw
            .split('/')
            .next()
            .is_some_and(|first| first.eq_ignore_ascii_case(RESERVED_DIR))
        {
            return Err(PathError::Reserved(raw.to_string()));
        }
        Ok(RemotePath(raw.to_string()))
    }

    /// The normalised path, `/`-separated.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The path's components, in order.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }
}

/// Whether `component` is a DOS device name (case-insensitive, with or without an extension, trailing spaces or
/// dots): such a file cannot be created, or is a device, when the tree is copied to Windows or served over SMB.
fn is_device_name(component: &str) -> bool {
    let stem = component.split('.').next().unwrap_or_default().trim_end_matches(' ');
    let upper = stem.to_ascii_uppercase();
    match upper.as_bytes() {
        b"CON" | b"PRN" | b"AUX" | b"NUL" | b"CONIN$" | b"CONOUT$" => true,
        [b'C', b'O', b'M', digit] | [b'L', b'P', b'T', digit] => digit.is_ascii_digit() && *digit != b'0',
        _ => false,
    }
}

impl std::fmt::Display for RemotePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Resolves `path` under `root`, creating missing parent directories when `create_parents` is set. The parents are
/// walked with descriptors (no symlink followed, nothing created outside the root); symlinks and non-directories on
/// the way are refused, and so is a final component that is a symlink or a directory. The returned path is a
/// check, not a capability: writes through it must walk again ([`rename_into`], [`open_dir_beneath`]). Blocking.
pub fn resolve_in_root(root: &Path, path: &RemotePath, create_parents: bool) -> Result<PathBuf, PathError> {
    let components: Vec<&str> = path.components().collect();
    let (file_name, parents) = components.split_last().expect("a RemotePath has a component");
    let mut current = walk_dirs(root, parents, create_parents)?;
    current.push(file_name);
    match std::fs::symlink_metadata(&current) {
        Ok(meta) if meta.file_type().is_symlink() => Err(PathError::Symlink(shown(root, &current))),
        Ok(meta) if meta.is_dir() => Err(PathError::InTheWay(shown(root, &current))),
        Ok(_) => Ok(current),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(current),
        Err(e) => Err(PathError::Io {
            path: shown(root, &current),
            source: e,
        }),
    }
}

/// Resolves the directory `path` under `root`, creating it and its parents as needed, refusing symlinks and
/// non-directories on the way. Blocking.
pub fn ensure_dir(root: &Path, path: &RemotePath) -> Result<PathBuf, PathError> {
    let components: Vec<&str> = path.components().collect();
    walk_dirs(root, &components, true)
}

/// Walks `components` below `root` as directories (creating missing ones if `create`); returns the last one.
/// The walk is made with descriptors (`openat`, `O_NOFOLLOW`, `mkdirat`; see [`open_dir_beneath`]), so a directory
/// swapped for a symlink during it is refused and nothing is created outside the root.
fn walk_dirs(root: &Path, components: &[&str], create: bool) -> Result<PathBuf, PathError> {
    open_dir_beneath(root, components, create)?;
    Ok(components.iter().fold(root.to_path_buf(), |dir, c| dir.join(c)))
}

/// Whether `name` is a receiver's temporary file, `.ferry-<16 hex>.small` or `.link` (a link is made beside its
/// destination and renamed into place; a crash may leave one behind).
pub fn is_temp_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(".ferry-") else {
        return false;
    };
    let Some((hex, kind)) = rest.split_once('.') else {
        return false;
    };
    hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()) && matches!(kind, "small" | "link")
}

/// Longest namespace name, in bytes (its partials directory is named by its hex).
pub const MAX_NAMESPACE_LEN: usize = 120;
/// Prefix of a namespace's partials directory inside the server's partials directory.
const NAMESPACE_DIR_PREFIX: &str = "ns-";

/// The partials directory of namespace `name` inside the server's partials directory `partial_dir`: the directory
/// itself for the whole root (`""`), else `ns-HEX(name)`, so two namespaces never share a partial file name and a
/// gc of a stopped server can tell each directory's namespace ([`namespace_of_partial_dir`]).
pub fn namespace_partial_dir(partial_dir: &Path, name: &str) -> PathBuf {
    if name.is_empty() {
        return partial_dir.to_path_buf();
    }
    let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
    partial_dir.join(format!("{NAMESPACE_DIR_PREFIX}{hex}"))
}

/// The namespace whose partials directory has this file name, if it is one.
pub fn namespace_of_partial_dir(file_name: &str) -> Option<String> {
    let hex = file_name.strip_prefix(NAMESPACE_DIR_PREFIX)?;
    if hex.is_empty() || hex.len() % 2 != 0 || hex.len() > 2 * MAX_NAMESPACE_LEN {
        return None;
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

/// Whether a symlink at `link` (a path relative to a tree's directory) with this `target` text resolves inside the
/// tree lexically: relative, and never climbing above the tree's directory. See [`link_walk`] for the full check.
pub fn link_stays_inside(link: &str, target: &str) -> bool {
    link_walk(link, target).is_some()
}

/// The paths (relative to the tree's directory) that following `target` from a symlink at `link` steps into, in
/// order; `None` if the target is absolute, empty, too long, climbs above the tree's directory, or has a `..` after
/// a named component (`a/../b`).
///
/// The last rule makes the lexical walk what the kernel does however the tree changes later: a leading `..` climbs
/// from the link's own directory, which is a real directory, while a `..` after a name climbs from wherever that
/// name resolves, and a link placed there later (`a -> x/y`) would send it elsewhere: `l -> d/x/../../s` plus a later
/// `d/x -> ../..` reaches outside the tree. A receiver also refuses a link whose walk passes a symlink (another entry
/// of the offer, or one on disk).
pub fn link_walk(link: &str, target: &str) -> Option<Vec<String>> {
    if target.is_empty() || target.len() > MAX_PATH_LEN || target.starts_with('/') || target.contains('\0') {
        return None;
    }
    let mut current: Vec<&str> = link.split('/').collect();
    current.pop(); // the link's own name: the walk starts in its directory
    let mut visited = Vec::new();
    for component in target.split('/') {
        match component {
            "" | "." => {}
            ".." if !visited.is_empty() => return None,
            ".." => {
                current.pop()?;
            }
            name => {
                current.push(name);
                visited.push(current.join("/"));
            }
        }
    }
    Some(visited)
}

/// Creates (if needed, mode 0700) and returns `ROOT/.ferry/partial`, refusing a symlink or non-directory at either
/// level, and a directory that is not owned by this process's user or that others may write to: in a shared
/// destination directory another user could otherwise pre-create it and swap a verified partial for their own
/// file before it is renamed into place. The private place for partial and temporary files, which no transferred
/// path can name.
pub fn private_partial_dir(root: &Path) -> io::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let mut dir = root.to_path_buf();
    for component in [RESERVED_DIR, "partial"] {
        dir.push(component);
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let meta = std::fs::symlink_metadata(&dir)?;
        if !meta.is_dir() {
            return Err(io::Error::other(format!("{} is not a directory", dir.display())));
        }
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me {
            return Err(io::Error::other(format!(
                "{} belongs to uid {}, not to this user (uid {me}); refusing to keep partial files there",
                dir.display(),
                meta.uid()
            )));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(io::Error::other(format!(
                "{} can be written by other users (mode {:o}); refusing to keep partial files there",
                dir.display(),
                meta.mode() & 0o7777
            )));
        }
    }
    Ok(dir)
}

/// Opens `path` for reading, refusing a symlink in its last component (`O_NOFOLLOW`).
pub fn open_no_follow(path: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// `text` with every mention of `root` taken out (paths under it shown relative to it, the root itself as `.`):
/// what a server tells a client names paths inside the client's namespace, never where the server keeps them.
pub fn hide_root(root: &Path, text: &str) -> String {
    let root = root.display().to_string();
    let root = root.trim_end_matches('/');
    if root.is_empty() {
        return text.to_string();
    }
    text.replace(&format!("{root}/"), "").replace(root, ".")
}

/// A path as the peer should see it: relative to the root, never revealing the server's layout.
fn shown(root: &Path, path: &Path) -> String {
    path.strip_prefix(root).unwrap_or(path).display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_paths_parse() {
        for ok in [
            "naïve.txt",
            "a€",
            "docs/café-ü.md",
            "日本語/ファイル",
            "COMé",
            "a",
            "a/b.iso",
            "backups/host/db.dump",
            "..a",
            "a..",
            ".hidden/x",
            "console",
            "com10",
            "lpt",
            "nully",
        ] {
            assert_eq!(RemotePath::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn temporaries_are_recognised_by_their_exact_shape() {
        assert!(is_temp_name(".ferry-0123456789abcdef.small"));
        assert!(is_temp_name(".ferry-0123456789abcdef.link"));
        for not in [
            ".ferry-0123.small",
            ".ferry-0123456789abcdef.part",
            "ferry-0123456789abcdef.small",
            ".ferry-0123456789abcdeg.small",
            "notes.small",
        ] {
            assert!(!is_temp_name(not), "{not}");
        }
    }

    #[test]
    fn hostile_paths_are_refused() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a/./b",
            "a//b",
            "a/",
            ".",
            "..",
            "a\0b",
            "a\nb",
            ".ferry/state",
            ".ferry",
        ] {
            assert!(RemotePath::parse(bad).is_err(), "{bad:?} was accepted");
        }
        for device in [
            "CON",
            "a/nul",
            "aux.txt",
            "docs/Com1.log",
            "LPT9",
            "prn.tar.gz",
            "NUL ",
            "conin$",
        ] {
            assert!(
                matches!(RemotePath::parse(device), Err(PathError::DeviceName(_))),
                "{device:?} was accepted"
            );
        }
        assert!(matches!(RemotePath::parse(&"a/".repeat(3000)), Err(PathError::TooLong)));
        assert!(matches!(RemotePath::parse(&"x".repeat(256)), Err(PathError::TooLong)));
    }

    /// Issue 12 item 14: what a server tells a client never shows where its root is.
    #[test]
    fn the_root_is_hidden_from_texts_told_to_a_peer() {
        let root = Path::new("/srv/ferry/root/alice");
        assert_eq!(
            hide_root(root, "/srv/ferry/root/alice/pub/x: Permission denied"),
            "pub/x: Permission denied"
        );
        assert_eq!(
            hide_root(root, "/srv/ferry/root/alice has more than 3 entries"),
            ". has more than 3 entries"
        );
        assert_eq!(hide_root(Path::new("/srv/r/"), "in /srv/r/a and /srv/r"), "in a and .");
    }

    /// Issue 12 item 9: a partial directory pre-created by another user, or one others may write to, is refused.
    #[test]
    fn a_foreign_or_shared_partial_directory_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let made = private_partial_dir(root.path()).unwrap();
        let mode = std::fs::metadata(&made).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "created private: {mode:o}");
        std::fs::set_permissions(&made, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = private_partial_dir(root.path()).unwrap_err();
        assert!(err.to_string().contains("can be written by other users"), "{err}");
        std::fs::set_permissions(&made, std::fs::Permissions::from_mode(0o700)).unwrap();
        private_partial_dir(root.path()).unwrap();
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(root.path().join(RESERVED_DIR), Some(65534), Some(65534)).unwrap();
            let err = private_partial_dir(root.path()).unwrap_err();
            assert!(err.to_string().contains("belongs to uid 65534"), "{err}");
        }
    }

    #[test]
    fn symlinks_inside_the_root_are_not_followed() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("link")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("f"), root.path().join("filelink")).unwrap();
        let via_dir = RemotePath::parse("link/x").unwrap();
        assert!(matches!(
            resolve_in_root(root.path(), &via_dir, true),
            Err(PathError::Symlink(_))
        ));
        let as_file = RemotePath::parse("filelink").unwrap();
        assert!(matches!(
            resolve_in_root(root.path(), &as_file, true),
            Err(PathError::Symlink(_))
        ));
        let fine = RemotePath::parse("new/dir/file").unwrap();
        let resolved = resolve_in_root(root.path(), &fine, true).unwrap();
        assert_eq!(resolved, root.path().join("new/dir/file"));
        assert!(root.path().join("new/dir").is_dir());
    }
}
