//! A tree pull from the bucket: the committed tree at a path copied into a temporary directory, verified, so that
//! the tree sender walks and sends it as it sends a local tree (the files' committed manifests beside it, never
//! rehashed). A file's bytes come from its manifest object (inline) or from its chunk objects, each checked against
//! its hash before it is written; directories get their mode and mtime, recorded symlinks are recreated last, so
//! no write of the copy ever goes through one.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path as FsPath;

use futures_util::StreamExt;

use super::{ObjectTrees, TreeCopy};
use crate::manifest::{FileTime, Manifest};
use crate::path::RemotePath;
use crate::storage::object::layout::{self, EntryKind, ObjectError};

/// The copy's local I/O failed: named, never with the temporary path.
fn local(error: io::Error) -> ObjectError {
    tracing::warn!("copying a tree out of the bucket: {error}");
    ObjectError::Store {
        op: "copy out",
        key: "a tree (local I/O)".into(),
        kind: "local I/O failed",
    }
}

impl ObjectTrees {
    /// The tree at `path` copied out of the bucket, or `None` when `path` is not a directory there (a file, a
    /// symlink, or nothing: no `Dir` object and no entry below it). Blocking.
    pub fn tree_copy(&self, path: &RemotePath) -> io::Result<Option<TreeCopy>> {
        self.block_on(self.copy_out(path))
    }

    async fn copy_out(&self, path: &RemotePath) -> Result<Option<TreeCopy>, ObjectError> {
        let is_dir = match self.entry(path).await? {
            Some(EntryKind::Dir { .. }) => true,
            Some(_) => return Ok(None),
            None => false,
        };
        let listed = self.list_under(path).await?;
        if !is_dir && listed.is_empty() {
            return Ok(None);
        }
        let dir = tempfile::tempdir().map_err(local)?;
        let top = path.components().fold(dir.path().to_path_buf(), |d, c| d.join(c));
        std::fs::create_dir_all(&top).map_err(local)?;
        let mut copy = TreeCopy {
            dir,
            manifests: HashMap::new(),
        };
        let (mut dirs, mut links) = (Vec::new(), Vec::new());
        let store = &*self.store;
        let mut entries = futures_util::stream::iter(listed)
            .map(|(key, rel)| async move { Ok::<_, ObjectError>((rel, layout::get_entry(store, &key).await?)) })
            .buffered(self.options.parallel.max(1));
        while let Some(entry) = entries.next().await {
            let (rel, Some(stored)) = entry? else { continue };
            // A relative path parsed from a key: no `..`, no empty component.
            let Ok(checked) = RemotePath::parse(&rel) else { continue };
            let at = checked.components().fold(top.clone(), |d, c| d.join(c));
            match stored.entry.kind {
                EntryKind::Dir { mode, mtime } => match std::fs::create_dir_all(&at) {
                    Ok(()) => dirs.push((at, mode, mtime)),
                    Err(e) => tracing::warn!(path = %path, entry = rel, error = %e, "left out of the pulled tree"),
                },
                EntryKind::Symlink { target } => links.push((at, target)),
                EntryKind::File { manifest, inline } => {
                    if let Err(e) = self.write_file(&at, &manifest, inline.as_ref().map(|b| &b[..])).await {
                        tracing::warn!(path = %path, entry = rel, error = %e, "left out of the pulled tree");
                        continue;
                    }
                    copy.manifests.insert(rel, manifest);
                }
            }
        }
        for (at, target) in links {
            if let Err(e) = std::os::unix::fs::symlink(&target, &at) {
                tracing::warn!(error = %e, "a symlink left out of the pulled tree");
            }
        }
        // Deepest first: a child's creation does not move its parent's mtime afterwards.
        dirs.sort_by_key(|(at, _, _)| std::cmp::Reverse(at.components().count()));
        for (at, mode, mtime) in dirs {
            set_metadata(&at, mode, mtime).map_err(local)?;
        }
        Ok(Some(copy))
    }

    /// Writes the file of `manifest` at `at` (inline bytes, else its chunks GET and verified), with mode and mtime.
    async fn write_file(&self, at: &FsPath, manifest: &Manifest, inline: Option<&[u8]>) -> Result<(), ObjectError> {
        if let Some(parent) = at.parent() {
            std::fs::create_dir_all(parent).map_err(local)?;
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(at)
            .map_err(local)?;
        match inline {
            Some(bytes) => file.write_all_at(bytes, 0).map_err(local)?,
            None => self.fetch_into(manifest, &file).await?,
        }
        file.set_len(manifest.size).map_err(local)?;
        drop(file);
        set_metadata(at, manifest.mode, manifest.mtime).map_err(local)
    }

    /// GETs every chunk of `manifest` (up to `parallel` at once), checks each against its hash, and writes it at
    /// its offset. A missing or damaged chunk object is damage at rest: an error naming its key.
    async fn fetch_into(&self, manifest: &Manifest, file: &std::fs::File) -> Result<(), ObjectError> {
        let (store, layout) = (&*self.store, &self.layout);
        let mut gets = futures_util::stream::iter(manifest.chunks.iter().copied())
            .map(|entry| async move {
                let key = layout.chunk(&entry.hash);
                match layout::get(store, &key, u64::from(entry.len)).await? {
                    Some(f) if crate::verify::check_chunk(&entry, &f.bytes).is_ok() => Ok((entry, f.bytes)),
                    _ => Err(ObjectError::Store {
                        op: "verify",
                        key: key.to_string(),
                        kind: "missing or damaged chunk object",
                    }),
                }
            })
            .buffer_unordered(self.options.parallel.max(1));
        while let Some(chunk) = gets.next().await {
            let (entry, bytes) = chunk?;
            file.write_all_at(&bytes, entry.offset).map_err(local)?;
        }
        Ok(())
    }
}

/// Applies permission bits and mtime to the file or directory at `at` (never a symlink: the copy has none yet).
fn set_metadata(at: &FsPath, mode: u32, mtime: FileTime) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let file = std::fs::File::open(at)?;
    file.set_permissions(std::fs::Permissions::from_mode(mode & 0o777))?;
    file.set_modified(crate::storage::local::system_time(mtime))
}
