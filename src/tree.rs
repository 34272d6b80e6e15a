//! Trees on the sender's disk: walk a directory into the sorted entries of a TreeOffer, never following a
//! symlink, with every file's digest from the sender's manifest cache when the file is unchanged.
//!
//! What is left out is listed with the reason instead of failing the whole tree: [`LocalTree::skipped`] for
//! special files, names that are not UTF-8 or that the receiver would refuse, and symlinks (unless recorded, and
//! then only those that stay inside the tree); [`LocalTree::failed`] for files that vanished, could not be read or
//! kept changing while they were read. Blocking.

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::chunk::{build_manifest, build_manifest_from, mtime_of, ChunkSpec};
use crate::path::{
    entry_at, hide_root, is_temp_name, kind_at, link_stays_inside, list_dir_typed, open_dir_beneath, open_file_beneath,
    open_file_in_with_metadata, Entry, Kind, RemotePath,
};
use crate::source::{build_while_stable, manifest_for_with, manifest_key, SourceError};
use crate::store::{ManifestKey, SenderStore, SMALL_FILE_MAX};
use crate::wire::{EntryKind, TreeEntry};
use crate::MAX_TREE_ENTRIES;

/// What to do with symlinks found in a tree (`--links`); a field of the Pull frame, so the wire defines it.
pub use crate::wire::LinkPolicy;

/// A walked directory, ready to offer.
#[derive(Debug, Clone)]
pub struct LocalTree {
    /// The directory walked.
    pub dir: PathBuf,
    /// Where every open starts: the directory walked, or the root it lies in (a server's namespace).
    pub base: PathBuf,
    /// Components from [`LocalTree::base`] down to the directory walked (none when they are the same).
    pub within: Vec<String>,
    /// Entries sorted by path (byte order).
    pub entries: Vec<TreeEntry>,
    /// For each entry, the local file to read (files only).
    pub files: Vec<Option<PathBuf>>,
    /// For each entry, whether it is described by the manifest recorded when the receiver role committed it (a
    /// server serving a pull): its bytes were verified then, so a mismatch now means damage, not a change.
    pub committed: Vec<bool>,
    /// Entries left out on purpose (symlinks by policy, special files, names the receiver would refuse).
    pub skipped: Vec<(String, String)>,
    /// Entries that could not be read (vanished, unreadable, kept changing), with the error.
    pub failed: Vec<(String, String)>,
}

impl LocalTree {
    /// Opens the file of entry `index` for reading, walking from [`LocalTree::base`] with `openat` and
    /// `O_NOFOLLOW` per component: a directory swapped for a symlink since the scan is refused, never followed
    /// out of the tree. Errors name the entry relative to the base. Blocking.
    pub fn open_file(&self, index: u32) -> Result<std::fs::File, crate::path::PathError> {
        self.file_at(index).open()
    }

    /// Where file entry `index` lies below the base, to open it later (on another thread) like
    /// [`LocalTree::open_file`] does.
    pub fn file_at(&self, index: u32) -> FileBeneath {
        let entry = &self.entries[index as usize];
        let mut components = self.within.clone();
        components.extend(entry.path.split('/').map(str::to_string));
        FileBeneath {
            base: self.base.clone(),
            components,
        }
    }

    /// Number of file entries.
    pub fn file_count(&self) -> usize {
        self.files.iter().filter(|f| f.is_some()).count()
    }

    /// Total bytes of the file entries.
    pub fn total_bytes(&self) -> u64 {
        self.entries
            .iter()
            .map(|e| match e.kind {
                EntryKind::File { size, .. } => size,
                _ => 0,
            })
            .sum()
    }
}

/// A file of a tree as a base directory and the components below it, opened without following symlinks.
#[derive(Debug, Clone)]
pub struct FileBeneath {
    /// Where the walk starts.
    pub base: PathBuf,
    /// The components walked, the last one the file.
    pub components: Vec<String>,
}

impl FileBeneath {
    /// Opens the file for reading: `openat` with `O_NOFOLLOW` per component from the base. Blocking.
    pub fn open(&self) -> Result<std::fs::File, crate::path::PathError> {
        let components: Vec<&str> = self.components.iter().map(String::as_str).collect();
        open_file_beneath(&self.base, &components)
    }
}

/// Opens a tree's files one after another (one thread's share of a scan, or of a send), walking to a directory
/// once for a run of files in it: the last directory walked to is kept open and the next file of the same
/// directory is opened through it, with `openat` and `O_NOFOLLOW` like [`LocalTree::open_file`]. A directory
/// swapped for a symlink after its walk is not followed: the descriptor still names the directory walked to.
/// Saves the walk's opens and closes from the base (a path lookup of the base, an `openat` per directory, their
/// `close`s) for every file but the first of each run. Blocking.
pub struct FileOpener<'a> {
    tree: &'a LocalTree,
    /// The directory last walked to (relative to the tree's directory) and its descriptor.
    dir: Option<(String, std::fs::File)>,
    walks: usize,
}

impl<'a> FileOpener<'a> {
    /// An opener of `tree`'s files, with no directory open yet.
    pub fn new(tree: &'a LocalTree) -> FileOpener<'a> {
        FileOpener {
            tree,
            dir: None,
            walks: 0,
        }
    }

    /// Opens the file of entry `index`, as [`LocalTree::open_file`] does.
    pub fn open_file(&mut self, index: u32) -> Result<std::fs::File, crate::path::PathError> {
        self.open_rel(&self.tree.entries[index as usize].path)
    }

    /// Opens the file `rel` (relative to the tree's directory).
    pub fn open_rel(&mut self, rel: &str) -> Result<std::fs::File, crate::path::PathError> {
        self.open_rel_with_metadata(rel).map(|(file, _)| file)
    }

    /// Opens the file of entry `index` with its metadata, as [`FileOpener::open_rel_with_metadata`] does.
    pub fn open_file_with_metadata(
        &mut self,
        index: u32,
    ) -> Result<(std::fs::File, std::fs::Metadata), crate::path::PathError> {
        self.open_rel_with_metadata(&self.tree.entries[index as usize].path)
    }

    /// Opens the file `rel` (relative to the tree's directory), with the metadata the open's own identity check
    /// took (no second `fstat`).
    pub fn open_rel_with_metadata(
        &mut self,
        rel: &str,
    ) -> Result<(std::fs::File, std::fs::Metadata), crate::path::PathError> {
        let parent = rel.rsplit_once('/').map_or("", |(parent, _)| parent);
        let dir = match self.dir.take() {
            Some((walked, dir)) if walked == parent => dir,
            _ => {
                self.walks += 1;
                self.tree.open_dir(parent)?
            }
        };
        let mut components: Vec<&str> = self.tree.within.iter().map(String::as_str).collect();
        components.extend(rel.split('/'));
        let opened = open_file_in_with_metadata(&self.tree.base, &dir, &components);
        self.dir = Some((parent.to_string(), dir));
        opened
    }

    /// The tree whose files this opens.
    pub fn tree(&self) -> &'a LocalTree {
        self.tree
    }

    /// How many directory walks the opens so far took.
    pub fn walks(&self) -> usize {
        self.walks
    }
}

/// Finds the manifest a file was committed with, given its path in the tree and its current metadata; `None` if
/// it was not committed or changed since (size, inode, mtime).
pub type CommittedLookup<'a> = &'a (dyn Fn(&str, &std::fs::Metadata) -> Option<crate::manifest::Manifest> + Sync);

/// Walks `dir` (which must be a directory), describing every entry; file digests come from `store`'s cache or
/// are computed (and cached, flushed once at the end).
pub fn scan(dir: &Path, links: LinkPolicy, store: &SenderStore, spec: ChunkSpec) -> Result<LocalTree, SourceError> {
    scan_with(dir, links, store, spec, None)
}

/// [`scan`], describing files that `committed` knows by the manifest they were committed with (not rehashed).
pub fn scan_with(
    dir: &Path,
    links: LinkPolicy,
    store: &SenderStore,
    spec: ChunkSpec,
    committed: Option<CommittedLookup<'_>>,
) -> Result<LocalTree, SourceError> {
    scan_beneath(dir, None, links, store, spec, committed)
}

/// [`scan_with`] of the directory `within` below `base` (the directory `base` itself if `None`). Every directory,
/// file and link is reached from `base` by `openat` with `O_NOFOLLOW` per component, so a directory swapped for a
/// symlink during the scan (or later, when files are opened to be sent: [`LocalTree::open_file`]) is refused
/// rather than followed out. Messages name paths relative to `base` when `within` is given (a server never shows
/// a client where its root is), else relative to `base` prefixed by it.
pub fn scan_beneath(
    base: &Path,
    within: Option<&RemotePath>,
    links: LinkPolicy,
    store: &SenderStore,
    spec: ChunkSpec,
    committed: Option<CommittedLookup<'_>>,
) -> Result<LocalTree, SourceError> {
    let within: Vec<String> = within.map_or_else(Vec::new, |w| w.components().map(str::to_string).collect());
    let label = if within.is_empty() {
        base.display().to_string()
    } else {
        within.join("/")
    };
    let dir = within.iter().fold(base.to_path_buf(), |dir, c| dir.join(c));
    let mut tree = LocalTree {
        dir,
        base: base.to_path_buf(),
        within,
        entries: Vec::new(),
        files: Vec::new(),
        committed: Vec::new(),
        skipped: Vec::new(),
        failed: Vec::new(),
    };
    let mut found: Vec<(TreeEntry, Option<PathBuf>, bool)> = Vec::new();
    // Regular files are only listed during the walk, and described (read and hashed, or found in the manifest
    // cache) afterwards by several threads: that is where a fresh scan spends its time.
    let mut regular: Vec<String> = Vec::new();
    let mut pending = vec![String::new()];
    while let Some(rel) = pending.pop() {
        let shown = |rel: &str| {
            if rel.is_empty() {
                label.clone()
            } else {
                format!("{label}/{rel}")
            }
        };
        let io = |e: &dyn std::fmt::Display| SourceError::Io(format!("{}: {e}", shown(&rel)));
        let listed = tree.open_dir(&rel).map_err(|e| e.to_string()).and_then(|dir| {
            list_dir_typed(&dir)
                .map(|names| (dir, names))
                .map_err(|e| e.to_string())
        });
        let (dir, names) = match listed {
            Ok(listed) => listed,
            Err(e) if rel.is_empty() => return Err(io(&e)),
            // A subdirectory that vanished or was swapped for a symlink since it was seen: that part fails.
            Err(e) => {
                tree.failed.push((rel.clone(), e));
                continue;
            }
        };
        for (name, listed_kind) in names {
            let Some(name) = name.to_str().map(str::to_string) else {
                let lossy = name.to_string_lossy();
                let path = if rel.is_empty() {
                    lossy.to_string()
                } else {
                    format!("{rel}/{lossy}")
                };
                tree.skipped.push((path, "name is not UTF-8".into()));
                continue;
            };
            if is_temp_name(&name) {
                // A receiver's temporary (a transfer in progress, or left by a crash), never content.
                continue;
            }
            let path = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            if let Err(e) = RemotePath::parse(&path) {
                tree.skipped.push((path, e.to_string()));
                continue;
            }
            // A regular file is only looked at here (the listing's `d_type`, else a `stat`); it is opened (through
            // the walk, which checks what it opens) when it is described.
            let kind = listed_kind.map_or_else(|| kind_at(&dir, OsStr::new(&name)).ok(), Some);
            if kind == Some(Kind::File) {
                regular.push(path);
                if found.len() + regular.len() > MAX_TREE_ENTRIES {
                    return Err(too_many(&label));
                }
                continue;
            }
            match entry_at(&dir, OsStr::new(&name)) {
                Ok(Entry::File(_)) => regular.push(path),
                Ok(Entry::Dir(child)) => match child.metadata() {
                    Ok(meta) => {
                        let kind = EntryKind::Dir {
                            mode: meta.mode() & 0o7777,
                            mtime: mtime_of(&meta),
                        };
                        found.push((
                            TreeEntry {
                                path: path.clone(),
                                kind,
                            },
                            None,
                            false,
                        ));
                        pending.push(path);
                    }
                    Err(e) => tree.failed.push((path, e.to_string())),
                },
                Ok(Entry::Symlink(target)) => match link_entry(&path, target, links) {
                    Ok(entry) => found.push((entry, None, false)),
                    Err(reason) => tree.skipped.push((path, reason)),
                },
                Ok(Entry::Other) => tree
                    .skipped
                    .push((path, "not a regular file, directory or symlink".into())),
                Err(e) => tree.failed.push((path, e.to_string())),
            }
            if found.len() + regular.len() > MAX_TREE_ENTRIES {
                return Err(too_many(&label));
            }
        }
    }
    for (path, described) in regular
        .iter()
        .zip(describe_all(&tree, &regular, store, spec, committed))
    {
        match described {
            Ok((entry, verified)) => found.push((entry, Some(tree.dir.join(path)), verified)),
            Err(SourceError::Store(e)) => return Err(SourceError::Store(e)),
            Err(e) => tree.failed.push((path.clone(), e.to_string())),
        }
    }
    store.flush()?;
    found.sort_by(|a, b| a.0.path.as_bytes().cmp(b.0.path.as_bytes()));
    for (entry, file, committed) in found {
        tree.entries.push(entry);
        tree.files.push(file);
        tree.committed.push(committed);
    }
    Ok(tree)
}

impl LocalTree {
    /// Opens the directory `rel` (relative to the tree's directory) through the no-follow walk from the base.
    fn open_dir(&self, rel: &str) -> Result<std::fs::File, crate::path::PathError> {
        let mut components: Vec<&str> = self.within.iter().map(String::as_str).collect();
        components.extend(rel.split('/').filter(|c| !c.is_empty()));
        open_dir_beneath(&self.base, &components, false)
    }
}

/// The error for a tree with too many entries; `label` names the tree as the reader may see it.
fn too_many(label: &str) -> SourceError {
    SourceError::Io(format!(
        "{label} has more than {MAX_TREE_ENTRIES} entries; push its subdirectories separately"
    ))
}

/// The entry for a symlink at `path`, or why it is left out.
fn link_entry(path: &str, target: PathBuf, links: LinkPolicy) -> Result<TreeEntry, String> {
    if links == LinkPolicy::Skip {
        return Err("symlink (use --links record to recreate it)".into());
    }
    let Some(target) = target.to_str().map(str::to_string) else {
        return Err("symlink target is not UTF-8".into());
    };
    if !link_stays_inside(path, &target) {
        return Err(format!("symlink to {target:?} leaves the tree"));
    }
    Ok(TreeEntry {
        path: path.to_string(),
        kind: EntryKind::Symlink { target },
    })
}

/// A file's entry, and whether it is described by its committed manifest; or why it could not be.
type Described = Result<(TreeEntry, bool), SourceError>;

/// [`describe`]s every file of `files`, on up to four threads; results in the order of `files`.
fn describe_all(
    tree: &LocalTree,
    files: &[String],
    store: &SenderStore,
    spec: ChunkSpec,
    committed: Option<CommittedLookup<'_>>,
) -> Vec<Described> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 4);
    let next = AtomicUsize::new(0);
    let work = || {
        let mut done = Vec::new();
        let mut opener = FileOpener::new(tree);
        loop {
            let index = next.fetch_add(1, Ordering::Relaxed);
            let Some(path) = files.get(index) else {
                return done;
            };
            done.push((index, describe(tree, &mut opener, path, store, spec, committed)));
        }
    };
    let mut results: Vec<(usize, Described)> = std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..workers).map(|_| scope.spawn(work)).collect();
        let mut all = work();
        for helper in helpers {
            all.extend(helper.join().expect("tree scan thread panicked"));
        }
        all
    });
    results.sort_unstable_by_key(|(index, _)| *index);
    results.into_iter().map(|(_, result)| result).collect()
}

/// The entry of the regular file `path` (relative to the tree's directory), opened through the no-follow walk;
/// and whether it is described by its committed manifest.
fn describe(
    tree: &LocalTree,
    opener: &mut FileOpener<'_>,
    path: &str,
    store: &SenderStore,
    spec: ChunkSpec,
    committed: Option<CommittedLookup<'_>>,
) -> Described {
    let (file, meta) = opener
        .open_rel_with_metadata(path)
        .map_err(|e| SourceError::Io(e.to_string()))?;
    let recorded = committed.and_then(|lookup| lookup(path, &meta));
    let verified = recorded.is_some();
    let canonical = tree.dir.join(path);
    let manifest = match recorded {
        Some(manifest) => Ok(manifest),
        None if meta.len() < SMALL_FILE_MAX => small_manifest(store, &file, &meta, &canonical, spec),
        None => manifest_for_with(store, &file, &canonical, spec, false, false).map(|(manifest, _)| manifest),
    }
    // The cache is keyed by the full local path; its errors name it, so they are retold relative to the base.
    .map_err(|e| match e {
        SourceError::Io(why) => SourceError::Io(hide_root(&tree.base, &why)),
        SourceError::Unstable(why) => SourceError::Unstable(hide_root(&tree.base, &why)),
        other => other,
    })?;
    let entry = TreeEntry {
        path: path.to_string(),
        kind: EntryKind::File {
            size: manifest.size,
            digest: manifest.digest,
            mtime: manifest.mtime,
            mode: manifest.mode,
        },
    };
    Ok((entry, verified))
}

/// The manifest of a small file of a tree (`meta`: its metadata, just taken): from its compact cache record, else
/// from the general cache (written by an earlier version, or by a send that found the file changed), else hashed
/// (tried again, bounded, if it changes meanwhile) and cached as a compact record. One `get` for a file seen
/// before, two `get`s and an `insert` for a new one (the general cache's [`manifest_for_with`] does two `get`s,
/// three prefix scans and two `insert`s per new file), and no `fstat` beyond the hashing's own.
fn small_manifest(
    store: &SenderStore,
    file: &std::fs::File,
    meta: &std::fs::Metadata,
    canonical: &Path,
    spec: ChunkSpec,
) -> Result<crate::manifest::Manifest, SourceError> {
    let key = manifest_key(canonical, meta, spec);
    let usable = |manifest: &crate::manifest::Manifest| manifest.size == key.size && manifest.validate().is_ok();
    if let Some(manifest) = store.cached_small(&key)?.filter(usable) {
        return Ok(manifest);
    }
    if let Some(manifest) = store.cached_manifest(&key)?.filter(usable) {
        return Ok(manifest);
    }
    // The first try's "before" is `meta`, taken as the file was opened; a try after a change takes its own.
    let mut first = Some(meta.clone());
    let manifest = build_while_stable(|| match first.take() {
        Some(before) => build_manifest_from(file, canonical, spec, before),
        None => build_manifest(file, canonical, spec),
    })?;
    let key = ManifestKey {
        size: manifest.size,
        mtime: manifest.mtime,
        ..key
    };
    store.cache_small(&key, &manifest)?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    /// A scan below a base (a server's namespace) offers what is inside, leaves out what it must, and never names
    /// the base in what it reports (issue 12 item 14).
    #[test]
    fn a_scan_beneath_a_base_reports_paths_relative_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("root/alice");
        let tree_dir = base.join("pub");
        std::fs::create_dir_all(tree_dir.join("sub")).unwrap();
        std::fs::write(tree_dir.join("a.txt"), b"a").unwrap();
        std::fs::write(tree_dir.join("sub/b.txt"), b"bb").unwrap();
        std::os::unix::fs::symlink("/etc", tree_dir.join("link")).unwrap();
        std::fs::write(tree_dir.join(std::ffi::OsStr::from_bytes(b"bad\xff")), b"x").unwrap();
        let store = SenderStore::open(&crate::store::Store::open(&dir.path().join("state")).unwrap()).unwrap();
        let within = RemotePath::parse("pub").unwrap();
        let tree = scan_beneath(
            &base,
            Some(&within),
            LinkPolicy::Record,
            &store,
            ChunkSpec::default(),
            None,
        )
        .unwrap();
        let paths: Vec<&str> = tree.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["a.txt", "sub", "sub/b.txt"]);
        let mut skipped: Vec<&str> = tree.skipped.iter().map(|(p, _)| p.as_str()).collect();
        skipped.sort_unstable();
        assert_eq!(skipped, ["bad\u{fffd}", "link"]);
        let base_text = dir.path().display().to_string();
        for (path, why) in tree.skipped.iter().chain(&tree.failed) {
            assert!(!path.contains(&base_text) && !why.contains(&base_text), "{path}: {why}");
        }
        let index = paths.iter().position(|p| *p == "sub/b.txt").unwrap() as u32;
        assert_eq!(std::io::read_to_string(tree.open_file(index).unwrap()).unwrap(), "bb");
        // Swapped for a symlink after the scan: opening the file again refuses it, naming the namespace path.
        std::fs::rename(tree_dir.join("sub"), dir.path().join("moved")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("moved"), tree_dir.join("sub")).unwrap();
        let refused = tree.open_file(index).unwrap_err().to_string();
        assert!(refused.starts_with("\"pub/sub\" is a symlink"), "{refused}");
    }

    /// A scan caches each small file as one compact record (not in the general cache), and the next scan takes the
    /// digest from it without reading the file (shown by bytes changed behind the same size, mtime and inode); once
    /// the path's manifests are forgotten (what a send that found the file changed does), it is hashed again.
    #[test]
    fn a_scan_caches_small_files_as_compact_records_and_reuses_them() {
        let dir = tempfile::tempdir().unwrap();
        let tree_dir = dir.path().join("tree");
        std::fs::create_dir_all(tree_dir.join("sub")).unwrap();
        std::fs::write(tree_dir.join("a"), b"first").unwrap();
        std::fs::write(tree_dir.join("sub/b"), b"second").unwrap();
        let store = SenderStore::open(&crate::store::Store::open(&dir.path().join("state")).unwrap()).unwrap();
        let spec = ChunkSpec::default();
        let digest_of = |tree: &LocalTree, path: &str| {
            let entry = tree.entries.iter().find(|e| e.path == path).unwrap();
            match entry.kind {
                EntryKind::File { digest, .. } => digest,
                _ => panic!("{path} is not a file"),
            }
        };
        let first = scan(&tree_dir, LinkPolicy::Skip, &store, spec).unwrap();
        for path in ["a", "sub/b"] {
            let canonical = tree_dir.join(path);
            let file = std::fs::File::open(&canonical).unwrap();
            let key = manifest_key(&canonical, &file.metadata().unwrap(), spec);
            let cached = store.cached_small(&key).unwrap().expect("a compact record");
            assert_eq!(cached.digest, digest_of(&first, path));
            assert_eq!(store.cached_manifest(&key).unwrap(), None, "not in the general cache");
        }

        // Same size, same mtime, same inode, other bytes: the cache cannot tell, so the digest is the cached one.
        let a = tree_dir.join("a");
        let mtime = std::fs::metadata(&a).unwrap().modified().unwrap();
        std::fs::write(&a, b"FIRST").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&a)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        let second = scan(&tree_dir, LinkPolicy::Skip, &store, spec).unwrap();
        assert_eq!(digest_of(&second, "a"), digest_of(&first, "a"), "from the cache");
        store.forget_manifests(&a.display().to_string()).unwrap();
        let third = scan(&tree_dir, LinkPolicy::Skip, &store, spec).unwrap();
        assert_eq!(
            digest_of(&third, "a"),
            *blake3::hash(b"FIRST").as_bytes(),
            "hashed again"
        );
        assert_eq!(digest_of(&third, "sub/b"), digest_of(&first, "sub/b"));
    }

    /// Opening a tree's files in offer order walks to each directory once, and a file opened through the kept
    /// directory is still refused, with the walk's own error, when it is a symlink or no longer a file.
    #[test]
    fn a_file_opener_walks_to_each_directory_once() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("root");
        let tree_dir = base.join("pub");
        for sub in ["a", "b"] {
            std::fs::create_dir_all(tree_dir.join(sub)).unwrap();
            for name in ["x", "y", "z"] {
                std::fs::write(tree_dir.join(sub).join(name), name).unwrap();
            }
        }
        std::fs::write(tree_dir.join("top"), b"top").unwrap();
        let store = SenderStore::open(&crate::store::Store::open(&dir.path().join("state")).unwrap()).unwrap();
        let within = RemotePath::parse("pub").unwrap();
        let tree = scan_beneath(
            &base,
            Some(&within),
            LinkPolicy::Skip,
            &store,
            ChunkSpec::default(),
            None,
        )
        .unwrap();
        let files: Vec<u32> = (0..tree.entries.len() as u32)
            .filter(|&i| tree.files[i as usize].is_some())
            .collect();
        assert_eq!(files.len(), 7);
        let mut opener = FileOpener::new(&tree);
        for &index in &files {
            let name = tree.entries[index as usize]
                .path
                .rsplit('/')
                .next()
                .unwrap()
                .to_string();
            assert_eq!(std::io::read_to_string(opener.open_file(index).unwrap()).unwrap(), name);
        }
        assert_eq!(opener.walks(), 3, "one walk each for a, b and the tree's directory");

        // Through the directory kept open: a symlink and a directory in place of a file are refused, named as the
        // walk from the base names them.
        let mut opener = FileOpener::new(&tree);
        opener.open_rel("a/x").unwrap();
        std::fs::remove_file(tree_dir.join("a/y")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", tree_dir.join("a/y")).unwrap();
        std::fs::remove_file(tree_dir.join("a/z")).unwrap();
        std::fs::create_dir(tree_dir.join("a/z")).unwrap();
        let symlink = opener.open_rel("a/y").unwrap_err().to_string();
        assert_eq!(symlink, tree.open_file(files[1]).unwrap_err().to_string());
        assert!(symlink.starts_with("\"pub/a/y\" is a symlink"), "{symlink}");
        let in_the_way = opener.open_rel("a/z").unwrap_err().to_string();
        assert_eq!(in_the_way, tree.open_file(files[2]).unwrap_err().to_string());
        let gone = opener.open_rel("a/gone").unwrap_err().to_string();
        assert!(
            gone.contains("pub/a/gone") && !gone.contains(&dir.path().display().to_string()),
            "{gone}"
        );
        assert_eq!(opener.walks(), 1);
    }
}
