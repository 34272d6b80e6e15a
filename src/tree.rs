//! Trees on the sender's disk: walk a directory into the sorted entries of a TreeOffer, never following a
//! symlink, with every file's digest from the sender's manifest cache when the file is unchanged.
//!
//! What is left out is listed with the reason instead of failing the whole tree: [`LocalTree::skipped`] for
//! special files, names that are not UTF-8 or that the receiver would refuse, and symlinks (unless recorded, and
//! then only those that stay inside the tree); [`LocalTree::failed`] for files that vanished, could not be read or
//! kept changing while they were read. Blocking.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::chunk::{mtime_of, ChunkSpec};
use crate::path::{is_temp_name, link_stays_inside, open_no_follow, RemotePath};
use crate::source::{manifest_for_with, SourceError};
use crate::store::SenderStore;
use crate::wire::{EntryKind, TreeEntry};
use crate::MAX_TREE_ENTRIES;

/// What to do with symlinks found in a tree (`--links`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LinkPolicy {
    /// Leave symlinks out (listed as skipped).
    #[default]
    Skip,
    /// Recreate symlinks whose relative target stays inside the tree; others are skipped.
    Record,
}

/// A walked directory, ready to offer.
#[derive(Debug, Clone)]
pub struct LocalTree {
    /// The directory walked.
    pub dir: PathBuf,
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
    let mut found: Vec<(TreeEntry, Option<PathBuf>, bool)> = Vec::new();
    let mut skipped = Vec::new();
    let mut failed = Vec::new();
    // Regular files are only listed during the walk, and described (read and hashed, or found in the manifest
    // cache) afterwards by several threads: that is where a fresh scan spends its time.
    let mut regular: Vec<(PathBuf, String)> = Vec::new();
    let mut pending = vec![(dir.to_path_buf(), String::new())];
    while let Some((local, rel)) = pending.pop() {
        let listing = std::fs::read_dir(&local).map_err(|e| SourceError::Io(format!("{}: {e}", local.display())))?;
        for item in listing {
            let item = item.map_err(|e| SourceError::Io(format!("{}: {e}", local.display())))?;
            let Some(name) = item.file_name().to_str().map(str::to_string) else {
                skipped.push((item.path().display().to_string(), "name is not UTF-8".into()));
                continue;
            };
            if is_temp_name(&name) {
                // A receiver's temporary (a transfer in progress, or left by a crash), never content.
                continue;
            }
            let path = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            if let Err(e) = RemotePath::parse(&path) {
                skipped.push((path, e.to_string()));
                continue;
            }
            let local_path = item.path();
            if item.file_type().is_ok_and(|t| t.is_file()) {
                regular.push((local_path, path));
                if found.len() + regular.len() > MAX_TREE_ENTRIES {
                    return Err(too_many(dir));
                }
                continue;
            }
            match describe(&local_path, &path, links, store, spec, committed) {
                Ok(Described::Entry(entry, file, verified)) => {
                    if matches!(entry.kind, EntryKind::Dir { .. }) {
                        pending.push((local_path, path.clone()));
                    }
                    found.push((entry, file, verified));
                }
                Ok(Described::Skip(reason)) => skipped.push((path, reason)),
                Err(SourceError::Store(e)) => return Err(SourceError::Store(e)),
                Err(e) => failed.push((path, e.to_string())),
            }
            if found.len() + regular.len() > MAX_TREE_ENTRIES {
                return Err(too_many(dir));
            }
        }
    }
    for ((_, path), described) in regular
        .iter()
        .zip(describe_all(&regular, links, store, spec, committed))
    {
        match described {
            Ok(Described::Entry(entry, file, verified)) => found.push((entry, file, verified)),
            Ok(Described::Skip(reason)) => skipped.push((path.clone(), reason)),
            Err(SourceError::Store(e)) => return Err(SourceError::Store(e)),
            Err(e) => failed.push((path.clone(), e.to_string())),
        }
    }
    store.flush()?;
    found.sort_by(|a, b| a.0.path.as_bytes().cmp(b.0.path.as_bytes()));
    let mut entries = Vec::with_capacity(found.len());
    let mut files = Vec::with_capacity(found.len());
    let mut verified = Vec::with_capacity(found.len());
    for (entry, file, committed) in found {
        entries.push(entry);
        files.push(file);
        verified.push(committed);
    }
    Ok(LocalTree {
        dir: dir.to_path_buf(),
        entries,
        files,
        committed: verified,
        skipped,
        failed,
    })
}

fn too_many(dir: &Path) -> SourceError {
    SourceError::Io(format!(
        "{} has more than {MAX_TREE_ENTRIES} entries; push its subdirectories separately",
        dir.display()
    ))
}

/// [`describe`]s every file of `files`, on up to four threads; results in the order of `files`.
fn describe_all(
    files: &[(PathBuf, String)],
    links: LinkPolicy,
    store: &SenderStore,
    spec: ChunkSpec,
    committed: Option<CommittedLookup<'_>>,
) -> Vec<Result<Described, SourceError>> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 4);
    let next = AtomicUsize::new(0);
    let work = || {
        let mut done = Vec::new();
        loop {
            let index = next.fetch_add(1, Ordering::Relaxed);
            let Some((local, path)) = files.get(index) else {
                return done;
            };
            done.push((index, describe(local, path, links, store, spec, committed)));
        }
    };
    let mut results: Vec<(usize, Result<Described, SourceError>)> = std::thread::scope(|scope| {
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

enum Described {
    /// The entry, its local file (files only), and whether it is described by its committed manifest.
    Entry(TreeEntry, Option<PathBuf>, bool),
    Skip(String),
}

fn describe(
    local: &Path,
    path: &str,
    links: LinkPolicy,
    store: &SenderStore,
    spec: ChunkSpec,
    committed: Option<CommittedLookup<'_>>,
) -> Result<Described, SourceError> {
    let io = |e: std::io::Error| SourceError::Io(format!("{}: {e}", local.display()));
    let meta = std::fs::symlink_metadata(local).map_err(io)?;
    let kind = meta.file_type();
    let entry = |kind| TreeEntry {
        path: path.to_string(),
        kind,
    };
    if kind.is_dir() {
        return Ok(Described::Entry(
            entry(EntryKind::Dir {
                mode: meta.mode() & 0o7777,
                mtime: mtime_of(&meta),
            }),
            None,
            false,
        ));
    }
    if kind.is_symlink() {
        if links == LinkPolicy::Skip {
            return Ok(Described::Skip("symlink (use --links record to recreate it)".into()));
        }
        let target = std::fs::read_link(local).map_err(io)?;
        let Some(target) = target.to_str().map(str::to_string) else {
            return Ok(Described::Skip("symlink target is not UTF-8".into()));
        };
        if !link_stays_inside(path, &target) {
            return Ok(Described::Skip(format!("symlink to {target:?} leaves the tree")));
        }
        return Ok(Described::Entry(entry(EntryKind::Symlink { target }), None, false));
    }
    if !kind.is_file() {
        return Ok(Described::Skip("not a regular file, directory or symlink".into()));
    }
    let recorded = committed.and_then(|lookup| lookup(path, &meta));
    let verified = recorded.is_some();
    let manifest = match recorded {
        Some(manifest) => manifest,
        None => {
            let file = open_no_follow(local).map_err(io)?;
            manifest_for_with(store, &file, local, spec, false, false)?.0
        }
    };
    Ok(Described::Entry(
        entry(EntryKind::File {
            size: manifest.size,
            digest: manifest.digest,
            mtime: manifest.mtime,
            mode: manifest.mode,
        }),
        Some(local.to_path_buf()),
        verified,
    ))
}
