//! Sources: the manifest of a file about to be sent, without rehashing it when that can be avoided.
//!
//! Used by whichever side is the sender (the client for a push, the server for a pull). A manifest comes from the
//! sender's cache when the file's identity (path, size, mtime, inode, device, chunking) is unchanged, else the file
//! is read and cut, retrying a bounded number of times if it changes while it is read. Blocking: call from
//! blocking threads.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use thiserror::Error;

use crate::chunk::{build_manifest, mtime_of, ChunkError, ChunkSpec};
use crate::manifest::Manifest;
use crate::path::{hide_root, open_beneath, Entry, PathError, RemotePath};
use crate::store::{ManifestKey, ReceiverStore, SenderStore, StoreError};
use crate::transfer::sender::Source;
use crate::transfer::TransferError;
use crate::wire::{ErrorCode, PullKind};

/// Times a changing source is re-read before the sender gives up on it.
pub const MAX_SOURCE_CHANGES: u32 = 3;

/// A source could not be described.
#[derive(Debug, Error)]
pub enum SourceError {
    /// Reading the source failed.
    #[error("{0}")]
    Io(String),
    /// The source kept changing while it was being read.
    #[error("{0} kept changing while it was being read; gave up after {MAX_SOURCE_CHANGES} tries")]
    Unstable(String),
    /// The sender's store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The manifest of the open `file` (at `canonical`) cut as `spec` asks: from the cache unless `rebuild`, else
/// built and cached. The flag says whether it came from the cache.
pub fn manifest_for(
    store: &SenderStore,
    file: &File,
    canonical: &Path,
    spec: ChunkSpec,
    rebuild: bool,
) -> Result<(Manifest, bool), SourceError> {
    manifest_for_with(store, file, canonical, spec, rebuild, true)
}

/// [`manifest_for`], flushing a new cache entry only if `flush`.
pub fn manifest_for_with(
    store: &SenderStore,
    file: &File,
    canonical: &Path,
    spec: ChunkSpec,
    rebuild: bool,
    flush: bool,
) -> Result<(Manifest, bool), SourceError> {
    let meta = file
        .metadata()
        .map_err(|e| SourceError::Io(format!("{}: {e}", canonical.display())))?;
    let key = manifest_key(canonical, &meta, spec);
    if rebuild {
        store.forget_manifests(&key.path)?;
    } else if let Some(manifest) = store.cached_manifest(&key)? {
        if manifest.size == meta.len() && manifest.validate().is_ok() {
            return Ok((manifest, true));
        }
    }
    let manifest = build_stable_manifest(file, canonical, spec)?;
    let key = ManifestKey {
        size: manifest.size,
        mtime: manifest.mtime,
        ..key
    };
    store.cache_manifest(&key, &manifest, flush)?;
    Ok((manifest, false))
}

/// The cached manifest of the open `file` (at `canonical`) cut as `spec` asks, if its identity is unchanged; never
/// reads the file. A push without one offers the file streamed (proto-spec.md §4).
pub fn cached_manifest_for(
    store: &SenderStore,
    file: &File,
    canonical: &Path,
    spec: ChunkSpec,
) -> Result<Option<Manifest>, SourceError> {
    let meta = file
        .metadata()
        .map_err(|e| SourceError::Io(format!("{}: {e}", canonical.display())))?;
    let key = manifest_key(canonical, &meta, spec);
    Ok(store
        .cached_manifest(&key)?
        .filter(|m| m.size == meta.len() && m.validate().is_ok()))
}

/// Caches `manifest`, built by a streamed offer from the open `file`, if the file is still as it was hashed.
pub fn cache_streamed_manifest(
    store: &SenderStore,
    file: &File,
    canonical: &Path,
    spec: ChunkSpec,
    manifest: &Manifest,
) -> Result<(), SourceError> {
    let meta = file
        .metadata()
        .map_err(|e| SourceError::Io(format!("{}: {e}", canonical.display())))?;
    if meta.len() == manifest.size && mtime_of(&meta) == manifest.mtime {
        store.cache_manifest(&manifest_key(canonical, &meta, spec), manifest, true)?;
    }
    Ok(())
}

fn manifest_key(canonical: &Path, meta: &std::fs::Metadata, spec: ChunkSpec) -> ManifestKey {
    ManifestKey {
        path: canonical.display().to_string(),
        size: meta.len(),
        mtime: mtime_of(meta),
        inode: meta.ino(),
        device: meta.dev(),
        chunking: spec.for_size(meta.len()),
    }
}

/// Builds a manifest, trying again (bounded) if the file changes while it is read.
fn build_stable_manifest(file: &File, canonical: &Path, spec: ChunkSpec) -> Result<Manifest, SourceError> {
    let mut tries = 0;
    loop {
        match build_manifest(file, canonical, spec) {
            Ok(manifest) => return Ok(manifest),
            Err(ChunkError::SourceChanged(path)) if tries >= MAX_SOURCE_CHANGES => {
                return Err(SourceError::Unstable(path))
            }
            Err(ChunkError::SourceChanged(_)) => tries += 1,
            Err(other) => return Err(SourceError::Io(other.to_string())),
        }
    }
}

/// The manifest the receiver role committed `key` with, if the file is still the one committed (same size, inode
/// and mtime): the verified description of its bytes. Store errors count as "not known".
pub fn committed_if_unchanged(receiver: &ReceiverStore, key: &str, meta: &std::fs::Metadata) -> Option<Manifest> {
    let done = receiver.committed(key).ok().flatten()?;
    let unchanged = done.size == meta.len() && done.inode == meta.ino() && done.mtime == mtime_of(meta);
    if unchanged {
        receiver.committed_manifest(key).ok().flatten()
    } else {
        None
    }
}

/// What a Pull names: a file with its manifest, or a directory (a tree).
pub enum PullSource {
    /// A regular file.
    File {
        /// The open file and its manifest.
        source: Source,
        /// The manifest is the one recorded when the file was committed (verified then), so a chunk that no
        /// longer matches it means the stored file is damaged, not that it changed.
        committed: bool,
    },
    /// A directory.
    Dir,
}

/// `Error{WrongKind}` unless a source that is a tree (`is_tree`) or a file is what the client expects.
fn check_kind(path: &RemotePath, is_tree: bool, expect: PullKind) -> Result<(), TransferError> {
    if expect.accepts(is_tree) {
        return Ok(());
    }
    let (is, asked) = if is_tree {
        ("a directory", "a file")
    } else {
        ("a file", "a tree")
    };
    Err(TransferError::refused(
        ErrorCode::WrongKind,
        format!("{path} is {is}; the client asked for {asked}"),
    ))
}

/// Resolves a Pull's `path` under `root` (no symlinks) and describes it. A file committed by a push and unchanged
/// since keeps the manifest recorded at commit; any other file is read (or found in the sender's cache). A source of
/// the kind `expect` rules out is `WrongKind` before anything is read.
pub fn open_for_pull(
    root: &Path,
    path: &RemotePath,
    receiver: &ReceiverStore,
    sender: &SenderStore,
    spec: ChunkSpec,
    expect: PullKind,
) -> Result<PullSource, TransferError> {
    let refused = |e: PathError| match e {
        PathError::NotFound(_) => TransferError::refused(ErrorCode::NotFound, e),
        other => TransferError::refused(ErrorCode::BadPath, other),
    };
    let resolved = root.join(path.as_str());
    // Opened through the no-follow walk from the root: what is described is what is sent, and no directory
    // swapped for a symlink on the way can lead the read out of the root.
    let components: Vec<&str> = path.components().collect();
    let entry = open_beneath(root, &components).map_err(refused)?;
    // The kind is checked before a file is hashed, so a wrong guess is answered at once (proto-spec.md §11).
    check_kind(path, matches!(entry, Entry::Dir(_)), expect)?;
    let file = match entry {
        Entry::Dir(_) => return Ok(PullSource::Dir),
        Entry::File(file) => file,
        Entry::Symlink(_) => return Err(refused(PathError::Symlink(path.to_string()))),
        Entry::Other => {
            return Err(TransferError::refused(
                ErrorCode::NotFound,
                format!("{path} is not a regular file"),
            ))
        }
    };
    let meta = file.metadata().map_err(TransferError::SourceIo)?;
    let (manifest, committed) = match committed_if_unchanged(receiver, path.as_str(), &meta) {
        Some(manifest) => (manifest, true),
        None => {
            let (manifest, _) = manifest_for(sender, &file, &resolved, spec, false).map_err(|e| match e {
                SourceError::Store(e) => TransferError::Store(e),
                // Its text names the file by its full path: told to the client relative to the namespace.
                other => TransferError::refused(ErrorCode::Internal, hide_root(root, &other.to_string())),
            })?;
            (manifest, false)
        }
    };
    Ok(PullSource::File {
        source: Source {
            file: Arc::new(file),
            manifest: Arc::new(manifest),
        },
        committed,
    })
}
