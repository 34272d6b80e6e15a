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

pub use at::{metadata_in_root, open_parent_dir, rename_into, rename_into_from, rename_into_opened, Renamed, Replace};
pub use beneath::{
    entry_at, kind_at, list_dir, list_dir_typed, open_beneath, open_dir_beneath, open_file_beneath, open_file_in,
    open_file_in_with_metadata, Entry, Kind,
};

/// Longest accepted path, in bytes.
pub const MAX_PATH_LEN: usize = 4096;
/// Longest accepted component, in bytes.
pub const MAX_COMPONENT_LEN: usize = 255;
/// The receiver's private directory under its root (partials, state).
pub const RESERVED_DIR: &str = ".ferry";

/// Why a path was refused. Every message names the component that failed and why; a path quoted in it is
/// shortened in the middle ([`clip`]) so the reason survives the 1 KiB limit of an Error frame (proto-spec.md §7).
#[derive(Debug, Error)]
pub enum PathError {
    /// Empty path, or one naming a directory (trailing `/`).
    #[error("path {} does not name a file (empty, or ends in '/')", clip(.0))]
    NotAFile(String),
    /// Leading `/`.
    #[error("path {} is absolute; destination paths are relative to the server root", clip(.0))]
    Absolute(String),
    /// A `.`, `..` or empty component.
    #[error("component {index} of path {} is {what}", clip(.path))]
    NotNormal {
        /// The path.
        path: String,
        /// 1-based position of the component.
        index: usize,
        /// `"empty"`, `"'.'"` or `"'..'"`.
        what: &'static str,
    },
    /// NUL or another control character.
    #[error("path {} contains a control character", clip(.0))]
    ControlCharacter(String),
    /// The whole path is longer than [`MAX_PATH_LEN`] bytes.
    #[error("path is {len} bytes, over the protocol limit of {MAX_PATH_LEN} bytes (starts {})", clip(.start))]
    TooLong {
        /// Its length in bytes.
        len: usize,
        /// Its first bytes.
        start: String,
    },
    /// One component is longer than [`MAX_COMPONENT_LEN`] bytes.
    #[error("component {index} is {len} bytes, over the limit of {MAX_COMPONENT_LEN} bytes (starts {})", clip(.start))]
    ComponentTooLong {
        /// 1-based position of the component.
        index: usize,
        /// Its length in bytes.
        len: usize,
        /// Its first bytes.
        start: String,
    },
    /// A component that names a device on some systems (`CON`, `NUL`, `COM1`, `LPT1`... with any extension).
    #[error("component {} is a device name (CON, PRN, AUX, NUL, COM1-9, LPT1-9)", clip(.0))]
    DeviceName(String),
    /// Under the receiver's private `.ferry/` directory.
    #[error("path {} is inside the reserved {RESERVED_DIR}/ directory", clip(.0))]
    Reserved(String),
    /// A component on the way is a symlink.
    #[error("{} is a symlink; ferry does not follow symlinks inside its root", clip(.0))]
    Symlink(String),
    /// A component on the way exists and is not a directory, or the target is a directory.
    #[error("{} is in the way (not a directory, or a directory where the file should go)", clip(.0))]
    InTheWay(String),
    /// Nothing exists at the path.
    #[error("{} does not exist", clip(.0))]
    NotFound(String),
    /// The filesystem failed while resolving.
    #[error("resolving {}: {}", shown_or_root(.path), os_reason(.source))]
    Io {
        /// Where it failed (relative to the root; empty: the root itself).
        path: String,
        /// The underlying error.
        source: io::Error,
    },
}

/// Longest quoted path in a [`PathError`] message, in bytes; longer ones keep their start and end.
const SHOWN_PATH: usize = 200;

/// `path` quoted, with its middle replaced by `…` when it is longer than `SHOWN_PATH` (200) bytes (cut at character
/// boundaries), so that an error message stays short and its reason is never cut off.
pub fn clip(path: &str) -> String {
    if path.len() <= SHOWN_PATH {
        return format!("{path:?}");
    }
    let mut head = SHOWN_PATH / 2;
    while !path.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = path.len() - SHOWN_PATH / 2;
    while !path.is_char_boundary(tail) {
        tail += 1;
    }
    format!("{:?}…{:?} ({} bytes)", &path[..head], &path[tail..], path.len())
}

/// A clipped path, or "the root" for the empty one.
fn shown_or_root(path: &str) -> String {
    if path.is_empty() {
        "the root".to_string()
    } else {
        clip(path)
    }
}

/// An OS error, saying so when it is the operating system's own path-length limit (not the protocol's).
fn os_reason(error: &io::Error) -> String {
    match error.raw_os_error() {
        Some(libc::ENAMETOOLONG) => format!("{error}: this server's operating-system path limit is exceeded"),
        _ => error.to_string(),
    }
}

/// A validated destination path relative to a root.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RemotePath(String);

impl RemotePath {
    /// Validates `raw` as a destination path.
    pub fn parse(raw: &str) -> Result<RemotePath, PathError> {
        if raw.len() > MAX_PATH_LEN {
            let mut cut = 64;
            while !raw.is_char_boundary(cut) {
                cut -= 1;
            }
            return Err(PathError::TooLong {
                len: raw.len(),
                start: raw[..cut].to_string(),
            });
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
        for (n, component) in raw.split('/').enumerate() {
            let what = match component {
                "" => Some("empty"),
                "." => Some("'.'"),
                ".." => Some("'..'"),
                _ => None,
            };
            if let Some(what) = what {
                return Err(PathError::NotNormal {
                    path: raw.to_string(),
                    index: n + 1,
                    what,
                });
            }
            if component.len() > MAX_COMPONENT_LEN {
                let mut cut = 64;
                while !component.is_char_boundary(cut) {
                    cut -= 1;
                }
                return Err(PathError::ComponentTooLong {
                    index: n + 1,
                    len: component.len(),
                    start: component[..cut].to_string(),
                });
            }
            if is_device_name(component) {
                return Err(PathError::DeviceName(component.to_string()));
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

/// Resolves `path` under `root`, creating missing parent directories when `create_parents` is set. The walk goes
/// through directory descriptors (`openat`, `O_NOFOLLOW`): symlinks and non-directories on the way are refused, and
/// so is a final component that is a symlink or a directory; no system call sees more than one component, so the
/// root's depth does not count against [`MAX_PATH_LEN`]. Blocking.
pub fn resolve_in_root(root: &Path, path: &RemotePath, create_parents: bool) -> Result<PathBuf, PathError> {
    let components: Vec<&str> = path.components().collect();
    let (file_name, parents) = components.split_last().expect("a RemotePath has a component");
    let dir = at::walk(root, parents, create_parents)?;
    let target = root.join(path.as_str());
    at::check_file_name(root, &target, &dir, file_name)?;
    Ok(target)
}

/// Checks that this process may create `path`'s file in its (existing) parent directory under `root`: the parent
/// must be writable, so an upload is not refused only at its commit. `faccessat` answers for permissions, an
/// immutable directory (EPERM) and a read-only filesystem (EROFS) alike. Blocking.
pub fn check_writable(root: &Path, path: &RemotePath) -> Result<(), PathError> {
    let components: Vec<&str> = path.components().collect();
    let (_, parents) = components.split_last().expect("a RemotePath has a component");
    at::check_writable(root, parents)
}

/// Resolves the directory `path` under `root`, creating it and its parents as needed, refusing symlinks and
/// non-directories on the way. Blocking.
pub fn ensure_dir(root: &Path, path: &RemotePath) -> Result<PathBuf, PathError> {
    let components: Vec<&str> = path.components().collect();
    at::walk(root, &components, true)?;
    Ok(root.join(path.as_str()))
}

/// [`ensure_dir`] of every path of `paths`, one result each, in order; the directories created are made durable
/// with one `fsync` per parent directory that gained any (not one per directory created), before this returns. A
/// failed sync fails every path that created a directory. Blocking.
pub fn ensure_dirs(root: &Path, paths: &[RemotePath]) -> Vec<Result<(), PathError>> {
    use std::os::unix::fs::MetadataExt;
    let mut unsynced = Vec::new();
    let mut results: Vec<(Result<(), PathError>, bool)> = paths
        .iter()
        .map(|path| {
            let components: Vec<&str> = path.components().collect();
            let before = unsynced.len();
            let walked = at::walk_deferring(root, &components, &mut unsynced).map(|_| ());
            (walked, unsynced.len() > before)
        })
        .collect();
    let mut synced = std::collections::HashSet::new();
    let mut failed = None;
    for dir in &unsynced {
        let id = dir.metadata().map(|m| (m.dev(), m.ino()));
        if id.as_ref().is_ok_and(|id| !synced.insert(*id)) {
            continue;
        }
        if let Err(e) = id.and_then(|_| at::sync_dir(dir)) {
            failed = Some(e);
            break;
        }
    }
    if let Some(e) = failed {
        for ((result, created), path) in results.iter_mut().zip(paths) {
            if *created && result.is_ok() {
                *result = Err(PathError::Io {
                    path: path.to_string(),
                    source: io::Error::new(e.kind(), e.to_string()),
                });
            }
        }
    }
    results.into_iter().map(|(result, _)| result).collect()
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
        let me = rustix::process::geteuid().as_raw();
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

    /// A tree's directories made together are synced into their parents once per parent, not once per directory
    /// (21 `fsync`s became 2 for the 20 directories of bench/compare.sh's tree); what is in the way is refused for
    /// its own path only.
    #[test]
    fn directories_made_together_sync_each_parent_once() {
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<RemotePath> = ["t/a", "t/b", "t/c"]
            .iter()
            .map(|p| RemotePath::parse(p).unwrap())
            .collect();
        at::DIR_SYNCS.with(|syncs| syncs.set(0));
        assert!(ensure_dirs(dir.path(), &paths).iter().all(Result::is_ok));
        assert!(paths.iter().all(|p| dir.path().join(p.as_str()).is_dir()));
        // The root (which gained t) and t (which gained a, b and c).
        assert_eq!(at::DIR_SYNCS.with(|syncs| syncs.get()), 2);

        at::DIR_SYNCS.with(|syncs| syncs.set(0));
        assert!(ensure_dirs(dir.path(), &paths).iter().all(Result::is_ok));
        assert_eq!(
            at::DIR_SYNCS.with(|syncs| syncs.get()),
            0,
            "nothing created, nothing synced"
        );

        std::fs::write(dir.path().join("t/file"), b"x").unwrap();
        let more: Vec<RemotePath> = ["t/file/d", "t/e"]
            .iter()
            .map(|p| RemotePath::parse(p).unwrap())
            .collect();
        let made = ensure_dirs(dir.path(), &more);
        assert!(matches!(made[0], Err(PathError::InTheWay(_))), "{:?}", made[0]);
        assert!(made[1].is_ok());
        assert!(dir.path().join("t/e").is_dir());
    }
    use proptest::prelude::*;

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
        assert!(matches!(
            RemotePath::parse(&"a/".repeat(3000)),
            Err(PathError::TooLong { len: 6000, .. })
        ));
        assert!(matches!(
            RemotePath::parse(&format!("a/{}", "x".repeat(256))),
            Err(PathError::ComponentTooLong { index: 2, len: 256, .. })
        ));
    }

    /// The reference for [`RemotePath::parse`], written from proto-spec.md's "Paths" rules rather than from the
    /// parser: at most 4096 bytes, no control character, not absolute, and `/`-separated components that are each
    /// non-empty, not `.` or `..`, at most 255 bytes, not a DOS device name (the part before the first `.`, trailing
    /// spaces dropped), and not, first, the reserved `.ferry` in any case.
    fn reference_accepts(raw: &str) -> bool {
        const DEVICES: [&str; 24] = [
            "CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$", "COM1", "COM2", "COM3", "COM4", "COM5", "COM6", "COM7",
            "COM8", "COM9", "LPT1", "LPT2", "LPT3", "LPT4", "LPT5", "LPT6", "LPT7", "LPT8", "LPT9",
        ];
        let device = |c: &str| {
            let stem = c.split('.').next().unwrap_or("").trim_end_matches(' ');
            DEVICES.iter().any(|d| d.eq_ignore_ascii_case(stem))
        };
        let components: Vec<&str> = raw.split('/').collect();
        raw.len() <= 4096
            && !raw.chars().any(|c| c.is_control())
            && components
                .iter()
                .all(|c| !c.is_empty() && *c != "." && *c != ".." && c.len() <= 255 && !device(c))
            && !components[0].eq_ignore_ascii_case(".ferry")
    }

    /// Components a hostile or careless peer might send, valid and not.
    fn arb_component() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => "[a-zA-Z0-9_.-]{1,12}",
            2 => Just("..".to_string()),
            1 => Just(".".to_string()),
            1 => Just(String::new()),
            1 => prop::sample::select(vec![".ferry", ".FeRrY", "con", "Nul.txt", "com1 ", "COM0", "lpt9.a.b", "conout$"])
                .prop_map(str::to_string),
            1 => prop::sample::select(vec!["a\0b", "\n", "\u{7f}", "\u{85}", "é", "日本", "a\\b", " "])
                .prop_map(str::to_string),
            1 => (250usize..260).prop_map(|n| "x".repeat(n)),
            1 => any::<String>(),
        ]
    }

    /// Paths built from those components, sometimes with a leading or trailing `/`, sometimes long enough to pass
    /// the 4096-byte limit.
    fn arb_path() -> impl Strategy<Value = String> {
        let joined = (
            any::<bool>(),
            proptest::collection::vec(arb_component(), 1..8),
            any::<bool>(),
        )
            .prop_map(|(lead, parts, trail)| {
                format!(
                    "{}{}{}",
                    if lead { "/" } else { "" },
                    parts.join("/"),
                    if trail { "/" } else { "" }
                )
            });
        let long = (1usize..4, 4000usize..4200).prop_map(|(width, total)| {
            let part = "d".repeat(width);
            let mut path = part.clone();
            while path.len() + 1 + width <= total {
                path.push('/');
                path.push_str(&part);
            }
            path
        });
        prop_oneof![8 => joined, 1 => long, 1 => any::<String>()]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

        /// `parse` accepts exactly what the reference accepts; what it accepts is returned unchanged, parses again
        /// to the same value, and is a relative path of normal components only (so joined to a root it stays
        /// under it, lexically), none of them `..`.
        #[test]
        fn parse_accepts_exactly_the_reference_paths_and_they_stay_relative(raw in arb_path()) {
            check_parse(&raw)?;
        }
    }

    /// `parse` against the reference, and what an accepted path must be.
    fn check_parse(raw: &str) -> Result<(), TestCaseError> {
        let parsed = RemotePath::parse(raw);
        prop_assert_eq!(parsed.is_ok(), reference_accepts(raw), "{:?}: {:?}", raw, parsed);
        if let Ok(path) = parsed {
            prop_assert_eq!(path.as_str(), raw);
            prop_assert_eq!(RemotePath::parse(path.as_str()).unwrap(), path.clone());
            let std_path = Path::new(path.as_str());
            prop_assert!(std_path.is_relative());
            prop_assert!(
                std_path
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_))),
                "{:?}",
                raw
            );
            prop_assert_eq!(std_path.components().count(), path.components().count());
            prop_assert!(Path::new("/srv/root").join(std_path).starts_with("/srv/root"));
            prop_assert!(path.as_str().len() <= MAX_PATH_LEN && !path.as_str().contains('\0'));
        }
        Ok(())
    }

    /// The same property for a time budget (`.ci/run`, docs/testing.md "Fuzzing").
    #[test]
    #[ignore = "a time-boxed soak; .ci/run runs it"]
    fn soak_remote_path_parse() {
        assert!(crate::soak::soak("RemotePath::parse", arb_path(), |raw| check_parse(&raw)) > 0);
    }

    /// proto-spec.md §7: a long path in a message is shortened in the middle, at character boundaries, and the
    /// reason after it survives the 1 KiB cut of an Error frame.
    #[test]
    fn messages_clip_long_paths_and_keep_the_reason() {
        let long = format!("{}/{}", "é".repeat(1500), "z".repeat(200));
        let text = PathError::Symlink(long.clone()).to_string();
        assert!(text.len() < 400, "{} bytes", text.len());
        assert!(
            text.ends_with("is a symlink; ferry does not follow symlinks inside its root"),
            "{text}"
        );
        assert!(text.contains(&format!("({} bytes)", long.len())), "{text}");
        assert!(
            text.starts_with("\"éé") && text.contains("zz\""),
            "start and end kept: {text}"
        );
        assert_eq!(clip("short/path"), "\"short/path\"");
        let io = PathError::Io {
            path: long,
            source: io::Error::from_raw_os_error(libc::ENAMETOOLONG),
        };
        assert!(io.to_string().contains("operating-system path limit"), "{io}");
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
        if rustix::process::geteuid().is_root() {
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
