//! Sources: the manifest of a file about to be sent, without rehashing it when that can be avoided.
//!
//! Used by whichever side is the sender (the client for a push, the server for a pull). A manifest comes from the
//! sender's cache when the file's identity (path, size, mtime, inode, device, chunking) is unchanged, else the file
//! is read and cut, retrying a bounded number of times if it changes while it is read. Blocking: call from
//! blocking threads.
//!
//! Hashing a large file records its progress in the sender's store as it goes ([`hash_resumable`]): a sender killed
//! before the manifest was cached goes on, next time, from the last record instead of hashing the file again.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use thiserror::Error;

use crate::chunk::{
    build_manifest, manifest_if_unchanged, mtime_of, stream_chunks, stream_chunks_from, ChunkError, ChunkSpec,
    HashStart, Hashed,
};
use crate::manifest::{ChunkEntry, Chunking, Hash, Manifest};
use crate::path::{hide_root, open_beneath, Entry, PathError, RemotePath};
use crate::store::{HashingRecord, ManifestKey, ReceiverStore, SenderStore, StoreError};
use crate::transfer::sender::{Rehash, Source};
use crate::transfer::TransferError;
use crate::verify::StackedPrefix;
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
    let manifest = build_stable_manifest(store, file, canonical, spec)?;
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
    if crate::chunk::has_identity(&meta, manifest.size, manifest.mtime) {
        store.cache_manifest(&manifest_key(canonical, &meta, spec), manifest, true)?;
    }
    Ok(())
}

/// The manifest cache's key for the open file described by `meta`, at `canonical`, cut as `spec` asks.
pub(crate) fn manifest_key(canonical: &Path, meta: &std::fs::Metadata, spec: ChunkSpec) -> ManifestKey {
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
fn build_stable_manifest(
    store: &SenderStore,
    file: &File,
    canonical: &Path,
    spec: ChunkSpec,
) -> Result<Manifest, SourceError> {
    build_while_stable(|| build_resumable_manifest(store, file, canonical, spec))
}

/// Runs `build` until it returns without the file changing under it, at most [`MAX_SOURCE_CHANGES`] times more,
/// then gives up with [`SourceError::Unstable`].
pub(crate) fn build_while_stable(
    mut build: impl FnMut() -> Result<Manifest, ChunkError>,
) -> Result<Manifest, SourceError> {
    let mut tries = 0;
    loop {
        match build() {
            Ok(manifest) => return Ok(manifest),
            Err(ChunkError::SourceChanged(path)) if tries >= MAX_SOURCE_CHANGES => {
                return Err(SourceError::Unstable(path))
            }
            Err(ChunkError::SourceChanged(_)) => tries += 1,
            Err(other) => return Err(SourceError::Io(other.to_string())),
        }
    }
}

/// [`build_manifest`] through [`hash_resumable`] for a file large enough to record progress for.
fn build_resumable_manifest(
    store: &SenderStore,
    file: &File,
    canonical: &Path,
    spec: ChunkSpec,
) -> Result<Manifest, ChunkError> {
    let io = |source| ChunkError::Io {
        path: canonical.display().to_string(),
        source,
    };
    let before = file.metadata().map_err(io)?;
    if before.len() < RECORD_EVERY {
        return build_manifest(file, canonical, spec);
    }
    let chunking = spec.for_size(before.len());
    let mut chunks = Vec::new();
    let (digest, _) = hash_resumable(store, file, canonical, spec, before.len(), &mut |entry| {
        chunks.push(entry);
        true
    })
    .map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ChunkError::SourceChanged(canonical.display().to_string()),
        _ => io(e),
    })?;
    manifest_if_unchanged(file, canonical, &before, chunking, digest, chunks)
}

/// Hashing progress is recorded once this many bytes were hashed since the last record (or
/// [`RECORD_EVERY_CHUNKS`] chunks, whichever comes first), at the end of a read buffer (8 MiB).
pub const RECORD_EVERY: u64 = 64 * 1024 * 1024;
/// Chunks hashed between two records of hashing progress at most (besides [`RECORD_EVERY`]): bounds a segment.
pub const RECORD_EVERY_CHUNKS: usize = 1024;

/// Hashes the open `file` (`size` bytes, at `canonical`) cut as `spec` asks, hands every chunk to `sink` in file
/// order and returns the whole-file digest and where hashing resumed (0: from the start), like [`stream_chunks`];
/// but first goes on from the progress an earlier
/// run recorded under the file's cache key, if any (its chunks go to `sink` at once, and only the bytes after them
/// are read, plus at most 1 KiB before them for the digest), and records its own progress as it goes (every
/// [`RECORD_EVERY`] bytes or [`RECORD_EVERY_CHUNKS`] chunks). A changed file has another key, so its record is
/// never used; a record is only a claim either way (the sender re-hashes each chunk it reads for sending, and the
/// receiver checks the digest). Failing to record is logged, never an error. Blocking.
pub fn hash_resumable(
    store: &SenderStore,
    file: &File,
    canonical: &Path,
    spec: ChunkSpec,
    size: u64,
    sink: &mut (dyn FnMut(ChunkEntry) -> bool + Send),
) -> std::io::Result<(Hash, u64)> {
    let meta = file.metadata()?;
    let key = manifest_key(canonical, &meta, spec);
    let chunking = spec.for_size(size);
    if key.size != size || key.chunking != chunking {
        // Changed since it was described: the hashing reports it; nothing worth recording.
        return Ok((stream_chunks(file, size, chunking, sink)?, 0));
    }
    let (mut record, start) = match recorded_start(store, &key, chunking) {
        Some((record, start)) => {
            for index in 0..record.segments {
                let segment = store.hashed_segment(&key, index).ok().flatten().unwrap_or_default();
                for entry in segment {
                    if !sink(entry) {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::Interrupted,
                            "the chunk consumer stopped",
                        ));
                    }
                }
            }
            tracing::debug!(path = %canonical.display(), from = start.offset, "hashing resumed from its record");
            (record, start)
        }
        None => (HashingRecord::default(), HashStart::default()),
    };
    let resumed = start.offset;
    let mut segment = Vec::new();
    let mut end = start.offset;
    let mut recording = true;
    stream_chunks_from(file, size, chunking, start, &mut |hashed| match hashed {
        Hashed::Chunk(entry) => {
            end = entry.offset + u64::from(entry.len);
            segment.push(entry);
            sink(entry)
        }
        Hashed::Checkpoint(digest) => {
            let due = end - record.end >= RECORD_EVERY || segment.len() >= RECORD_EVERY_CHUNKS;
            if recording && due && end < size {
                record = HashingRecord {
                    end,
                    chunks: record.chunks + segment.len() as u64,
                    segments: record.segments + 1,
                    digest_len: digest.len,
                    digest_stack: digest.stack,
                };
                if let Err(e) = store.record_hashing(&key, &segment, &record) {
                    tracing::warn!(error = %e, "could not record the hashing progress");
                    recording = false;
                }
                segment.clear();
            }
            true
        }
    })
    .map(|digest| (digest, resumed))
}

/// The progress recorded for `key`, if it describes chunks that tile the file from offset 0, each of a length the
/// chunking can cut (so the receiver accepts the pieces), and a digest state it can go on from (the segments are read once here, to check them, and once more to hand them over: memory
/// holds one segment at a time, not the list).
fn recorded_start(store: &SenderStore, key: &ManifestKey, chunking: Chunking) -> Option<(HashingRecord, HashStart)> {
    let record = store.hashing(key).ok().flatten()?;
    let start = HashStart {
        offset: record.end,
        digest: StackedPrefix {
            len: record.digest_len,
            stack: record.digest_stack.clone(),
        },
    };
    // Short of the end: a record is made only while hashing goes on.
    if record.end >= key.size || start.resumable(key.size, chunking).is_none() {
        return None;
    }
    let (mut next, mut count) = (0u64, 0u64);
    for index in 0..record.segments {
        for entry in store.hashed_segment(key, index).ok().flatten()? {
            // Every recorded chunk ends before the file does: none is a short last chunk.
            let len_fits = match chunking {
                Chunking::Fixed { size } => entry.len == size,
                Chunking::FastCdc { min, max, .. } => (min..=max).contains(&entry.len),
            };
            if entry.offset != next || !len_fits {
                return None;
            }
            next += u64::from(entry.len);
            count += 1;
        }
    }
    (next == record.end && count == record.chunks).then_some((record, start))
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
            // Served for a pull: damage at rest must be found before a chunk leaves (proto-spec.md §11).
            rehash: Rehash::Always,
        },
        committed,
    })
}
