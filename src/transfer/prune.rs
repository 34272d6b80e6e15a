//! `--delete`: removing from a tree's directory whatever the tree just placed there does not hold.
//!
//! The receiver of a tree (the server for a push, the client for a pull) calls [`prune`] once the tree is in
//! place. Every entry under the tree's directory that is not one of the tree's entries goes: files, symlinks (never
//! followed), and directories with everything in them. An entry the tree holds as a directory is walked; one it
//! holds as something else is left alone (the tree's own placement decided about it).
//!
//! Guarantees: nothing outside the tree's directory is touched. The directory is opened beneath the root without
//! following symlinks, every level below it through `openat` with `O_NOFOLLOW` on the descriptor of the level
//! above, and every removal is an `unlinkat` relative to that descriptor, so a directory swapped for a symlink
//! mid-walk is refused, not followed. ferry's own bookkeeping (`.ferry`) and temporary files of writers in
//! flight are never removed. A failure to remove one entry is reported and the walk goes on.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use tokio::io::{AsyncRead, AsyncWrite};

use super::receiver::ReceiverContext;
use super::{send_within, with_keepalive, TransferError};
use crate::path::{
    entry_at, is_temp_name, kind_at, list_dir, open_dir_beneath, Entry, Kind, PathError, RemotePath, RESERVED_DIR,
};
use crate::storage::TreeVolume;
use crate::store::ReceiverStore;
use crate::wire::{Connection, EntryKind, ErrorCode, Message, PruneFailure, TreeEntry, TreePrune, TreePruned};

/// Most bytes of removed paths a report names; the rest are only counted (a reply must fit in a frame).
pub const MAX_LISTED_BYTES: usize = 1024 * 1024;
/// Most failures a report names.
pub const MAX_LISTED_FAILURES: usize = 1000;

/// What [`prune`] removed, and what it could not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Removed entries, relative to the tree's directory, in the order removed (a directory after its content);
    /// at most [`MAX_LISTED_BYTES`] of names.
    pub removed: Vec<String>,
    /// How many entries were removed in all (more than `removed` lists when the names did not fit).
    pub total: u64,
    /// Entries that could not be removed, with the reason; at most [`MAX_LISTED_FAILURES`].
    pub failed: Vec<(String, String)>,
    listed_bytes: usize,
}

impl PruneReport {
    fn removed(&mut self, path: String) {
        self.total += 1;
        if self.listed_bytes + path.len() <= MAX_LISTED_BYTES {
            self.listed_bytes += path.len();
            self.removed.push(path);
        }
    }

    fn failed(&mut self, path: String, error: impl std::fmt::Display) {
        if self.failed.len() < MAX_LISTED_FAILURES {
            self.failed.push((path, error.to_string()));
        }
    }
}

/// What the tree holds at a path: a directory (walked) or anything else (kept as it is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    Dir,
    Other,
}

/// Removes everything under the directory `base` (components below `root`; empty: `root` itself) that is not one
/// of `entries` (paths relative to `base`); `removed_file` hears of every regular file removed (its path relative
/// to `base`), so the caller can forget its records. Blocking.
pub fn prune(
    root: &Path,
    base: &[&str],
    entries: &[TreeEntry],
    removed_file: &mut dyn FnMut(&str),
) -> Result<PruneReport, PathError> {
    let held: HashMap<&str, Held> = entries
        .iter()
        .map(|e| {
            let kind = match e.kind {
                EntryKind::Dir { .. } => Held::Dir,
                _ => Held::Other,
            };
            (e.path.as_str(), kind)
        })
        .collect();
    let dir = open_dir_beneath(root, base, false)?;
    let mut walker = Walker {
        held,
        report: PruneReport::default(),
        removed_file,
    };
    walker.walk(&dir, "");
    Ok(walker.report)
}

/// [`prune`] done by a volume that prunes itself ([`TreeVolume::prune_beyond`]: an object store), or `None`.
fn prune_in_volume(
    trees: &dyn TreeVolume,
    base: &RemotePath,
    entries: &[TreeEntry],
    removed_file: &mut dyn FnMut(&str),
) -> Option<io::Result<PruneReport>> {
    let held: HashMap<&str, bool> = entries
        .iter()
        .map(|e| (e.path.as_str(), matches!(e.kind, EntryKind::Dir { .. })))
        .collect();
    let pruned = trees.prune_beyond(base, &|path| held.get(path).copied())?;
    Some(pruned.map(|pruned| {
        let mut report = PruneReport::default();
        for path in pruned.removed {
            removed_file(&path);
            report.removed(path);
        }
        for (path, why) in pruned.failed {
            report.failed(path, why);
        }
        report
    }))
}

/// Serves a TreePrune (proto-spec.md §12, "Deleting"): `tree` is the tree this connection committed last, its
/// directory and entries; the request must name that directory. Answers TreePruned. Logs every removal.
pub async fn serve_prune<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    ctx: &ReceiverContext,
    tree: Option<(RemotePath, Vec<TreeEntry>)>,
    request: TreePrune,
) -> Result<(), TransferError> {
    let Some((base, entries)) = tree.filter(|(base, _)| base.as_str() == request.path.trim_end_matches('/')) else {
        return Err(TransferError::Unexpected {
            got: "TreePrune",
            state: "not right after the TreeCommitted of the tree it names",
        });
    };
    let (root, store, trees) = (ctx.root.clone(), ctx.store.clone(), ctx.trees.clone());
    let shown = base.to_string();
    let report = with_keepalive(conn, ctx.idle_timeout, move || {
        let components: Vec<&str> = base.as_str().split('/').collect();
        let mut forget = Forget::new(&store, format!("{base}/"));
        let in_volume = prune_in_volume(&*trees, &base, &entries, &mut |path| forget.file(path));
        let report = match in_volume {
            Some(report) => report.map_err(TransferError::Storage),
            None => prune(&root, &components, &entries, &mut |path| forget.file(path))
                .map_err(|e| TransferError::refused(ErrorCode::BadPath, e)),
        };
        forget.flush();
        report
    })
    .await?;
    for path in &report.removed {
        tracing::info!(tree = %shown, path, "removed (not in the pushed tree, --delete)");
    }
    for (path, reason) in &report.failed {
        tracing::warn!(tree = %shown, path, reason, "could not remove (--delete)");
    }
    let reply = TreePruned {
        removed: report.removed,
        total: report.total,
        failed: report
            .failed
            .into_iter()
            .map(|(path, reason)| PruneFailure {
                path,
                reason: crate::path::hide_root(&ctx.root, &clip_reason(reason)),
            })
            .collect(),
    };
    send_within(
        conn,
        &Message::TreePruned(reply),
        ctx.idle_timeout,
        "sending TreePruned",
    )
    .await
}

/// Forgets the store records of removed files in batches, so quota and entry budgets stop counting them. A store
/// failure is logged: the files are gone either way, and records of missing files are never served or reused
/// unchecked.
pub struct Forget<'a> {
    store: &'a ReceiverStore,
    prefix: String,
    pending: Vec<String>,
}

impl<'a> Forget<'a> {
    /// Batches for `store`; `prefix` turns a path relative to the tree into the store's path ("" or ending in '/').
    pub fn new(store: &'a ReceiverStore, prefix: String) -> Forget<'a> {
        Forget {
            store,
            prefix,
            pending: Vec::new(),
        }
    }

    /// The file at `path` (relative to the tree) was removed.
    pub fn file(&mut self, path: &str) {
        self.pending.push(format!("{}{path}", self.prefix));
        if self.pending.len() >= FORGET_BATCH {
            self.flush();
        }
    }

    /// Forgets what is pending.
    pub fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        if let Err(e) = self.store.forget_committed(&self.pending) {
            tracing::warn!(error = %e, "forgetting the records of removed files failed");
        }
        self.pending.clear();
    }
}

/// Removed files forgotten per store batch.
const FORGET_BATCH: usize = 1024;

/// A reason cut to 1 KiB (on a character boundary).
fn clip_reason(mut reason: String) -> String {
    if reason.len() > 1024 {
        let mut end = 1024;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    reason
}

/// One pruning walk: what the tree holds, what was done, and who hears of removed files.
struct Walker<'a> {
    held: HashMap<&'a str, Held>,
    report: PruneReport,
    removed_file: &'a mut dyn FnMut(&str),
}

impl Walker<'_> {
    /// Prunes one directory level: `prefix` is its path relative to the tree ("" or ending in '/').
    fn walk(&mut self, dir: &File, prefix: &str) {
        let mut names = match list_dir(dir) {
            Ok(names) => names,
            Err(e) => return self.report.failed(display(prefix, OsStr::new("")), e),
        };
        names.sort();
        for name in names {
            let path = display(prefix, &name);
            if name.as_bytes() == RESERVED_DIR.as_bytes() || name.to_str().is_some_and(is_temp_name) {
                continue;
            }
            let held = name
                .to_str()
                .and_then(|n| self.held.get(format!("{prefix}{n}").as_str()).copied());
            match held {
                Some(Held::Dir) => match entry_at(dir, &name) {
                    Ok(Entry::Dir(inner)) => self.walk(&inner, &format!("{path}/")),
                    // Not a directory here: the tree's placement refused or kept it; not ours to remove.
                    Ok(_) => {}
                    Err(e) => self.report.failed(path, e),
                },
                Some(Held::Other) => {}
                None => self.remove(dir, &name, path),
            }
        }
    }

    /// Removes `name` from `dir`: a directory with all its content, anything else with one `unlinkat`.
    fn remove(&mut self, dir: &File, name: &OsStr, path: String) {
        let kind = match kind_at(dir, name) {
            Ok(kind) => kind,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) => return self.report.failed(path, e),
        };
        if kind == Kind::Dir {
            match entry_at(dir, name) {
                Ok(Entry::Dir(inner)) => self.empty(&inner, &path),
                Ok(_) => return self.report.failed(path, "it was replaced while it was being removed"),
                Err(e) => return self.report.failed(path, e),
            }
        }
        match unlink_at(dir, name, kind == Kind::Dir) {
            Ok(()) => {
                if kind == Kind::File {
                    (self.removed_file)(&path);
                }
                self.report.removed(path)
            }
            Err(e) => self.report.failed(path, e),
        }
    }

    /// Removes everything inside the directory `dir` (at `path`).
    fn empty(&mut self, dir: &File, path: &str) {
        let mut names = match list_dir(dir) {
            Ok(names) => names,
            Err(e) => return self.report.failed(path.to_string(), e),
        };
        names.sort();
        for name in names {
            let inner = display(&format!("{path}/"), &name);
            self.remove(dir, &name, inner);
        }
    }
}

/// `unlinkat(dir, name)`, with `AT_REMOVEDIR` for a directory. Never follows a symlink (unlinkat removes the
/// link itself).
fn unlink_at(dir: &File, name: &OsStr, is_dir: bool) -> io::Result<()> {
    let flags = if is_dir {
        rustix::fs::AtFlags::REMOVEDIR
    } else {
        rustix::fs::AtFlags::empty()
    };
    Ok(rustix::fs::unlinkat(dir, name, flags)?)
}

/// `prefix` + `name` as text (a name that is not UTF-8 shown with replacement characters).
fn display(prefix: &str, name: &OsStr) -> String {
    format!("{prefix}{}", name.to_string_lossy())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::FileTime;

    fn entry(path: &str, dir: bool) -> TreeEntry {
        let kind = if dir {
            EntryKind::Dir {
                mode: 0o755,
                mtime: FileTime::default(),
            }
        } else {
            EntryKind::File {
                size: 0,
                digest: [0; 32],
                mtime: FileTime::default(),
                mode: 0o644,
            }
        };
        TreeEntry {
            path: path.into(),
            kind,
        }
    }

    #[test]
    fn extras_go_and_the_tree_and_everything_outside_stay() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        for dir in ["bk/keep/sub", "bk/gone/deep", "outside"] {
            std::fs::create_dir_all(r.join(dir)).unwrap();
        }
        for file in [
            "bk/a.txt",
            "bk/extra.txt",
            "bk/keep/b.txt",
            "bk/keep/sub/old.txt",
            "bk/gone/deep/x",
            "outside/precious",
            "bk/.ferry",
        ] {
            std::fs::write(r.join(file), b"x").unwrap();
        }
        // A symlink to something outside: the link goes, its target stays.
        std::os::unix::fs::symlink(r.join("outside"), r.join("bk/keep/link")).unwrap();
        let entries = [
            entry("a.txt", false),
            entry("keep", true),
            entry("keep/b.txt", false),
            entry("keep/sub", true),
        ];
        let mut files = Vec::new();
        let report = prune(r, &["bk"], &entries, &mut |p| files.push(p.to_string())).unwrap();
        assert_eq!(
            report.removed,
            [
                "extra.txt",
                "gone/deep/x",
                "gone/deep",
                "gone",
                "keep/link",
                "keep/sub/old.txt"
            ]
        );
        assert_eq!(report.total, 6);
        assert_eq!(
            files,
            ["extra.txt", "gone/deep/x", "keep/sub/old.txt"],
            "regular files only"
        );
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        for kept in [
            "bk/a.txt",
            "bk/keep/b.txt",
            "bk/keep/sub",
            "outside/precious",
            "bk/.ferry",
        ] {
            assert!(r.join(kept).exists(), "{kept}");
        }
        assert!(!r.join("bk/gone").exists());
    }

    #[test]
    fn a_tree_directory_that_is_a_symlink_is_not_walked() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("bk")).unwrap();
        std::fs::create_dir_all(r.join("outside")).unwrap();
        std::fs::write(r.join("outside/precious"), b"x").unwrap();
        std::os::unix::fs::symlink(r.join("outside"), r.join("bk/keep")).unwrap();
        let report = prune(r, &["bk"], &[entry("keep", true)], &mut |_| {}).unwrap();
        assert!(report.removed.is_empty(), "{report:?}");
        assert!(r.join("outside/precious").exists());
        // The base itself a symlink: refused.
        std::os::unix::fs::symlink(r.join("outside"), r.join("via")).unwrap();
        assert!(prune(r, &["via"], &[], &mut |_| {}).is_err());
        assert!(r.join("outside/precious").exists());
    }
}
