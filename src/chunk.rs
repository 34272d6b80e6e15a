//! File → chunks: cut a file into fixed-size chunks and hash each with BLAKE3, plus the whole-file digest.
//!
//! Runs on blocking threads only (callers use `spawn_blocking`). Reading and hashing overlap: one thread reads and
//! feeds the whole-file hasher, a second hashes the chunks, so two cores hash at once. A file that changes while it
//! is being read (size or mtime differ before and after) is reported as [`ChunkError::SourceChanged`].

use std::fs::{File, Metadata};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::mpsc;

use thiserror::Error;

use crate::manifest::{ChunkEntry, Chunking, FileTime, Manifest};
use crate::{MAX_CHUNK_SIZE, MAX_MANIFEST_CHUNKS, MIN_CHUNK_SIZE};

/// Building a manifest failed.
#[derive(Debug, Error)]
pub enum ChunkError {
    /// Reading the source failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The source file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The source changed while it was being read.
    #[error("{0} changed while it was being read")]
    SourceChanged(String),
}

/// The chunk size to use for a file of `size` bytes: `requested`, clamped to the protocol bounds and doubled
/// until the manifest fits in [`MAX_MANIFEST_CHUNKS`] chunks.
pub fn effective_chunk_size(size: u64, requested: u32) -> u32 {
    let mut chunk = requested.clamp(MIN_CHUNK_SIZE, MAX_CHUNK_SIZE);
    while chunk < MAX_CHUNK_SIZE && size.div_ceil(u64::from(chunk)) > MAX_MANIFEST_CHUNKS as u64 {
        chunk = chunk.saturating_mul(2).min(MAX_CHUNK_SIZE);
    }
    chunk
}

/// The modification time recorded in manifests and cache keys.
pub fn mtime_of(meta: &Metadata) -> FileTime {
    FileTime {
        secs: meta.mtime(),
        nanos: u32::try_from(meta.mtime_nsec()).unwrap_or(0),
    }
}

/// Reads the open `file` once (positional reads) and builds its manifest with fixed-size chunks of (about)
/// `chunk_size` bytes. `path` only names the file in errors.
pub fn build_manifest(file: &File, path: &Path, chunk_size: u32) -> Result<Manifest, ChunkError> {
    let io = |source| ChunkError::Io {
        path: path.display().to_string(),
        source,
    };
    let before = file.metadata().map_err(io)?;
    let chunk_size = effective_chunk_size(before.len(), chunk_size);
    let (digest, chunks) = hash_chunks(file, before.len(), chunk_size).map_err(io)?;
    let after = file.metadata().map_err(io)?;
    if after.len() != before.len() || mtime_of(&after) != mtime_of(&before) {
        return Err(ChunkError::SourceChanged(path.display().to_string()));
    }
    Ok(Manifest {
        size: before.len(),
        digest,
        chunking: Chunking::Fixed { size: chunk_size },
        mtime: mtime_of(&before),
        mode: before.mode() & 0o7777,
        chunks,
    })
}

/// Reads `size` bytes in `chunk_size` pieces; returns the whole-file digest and the chunk list.
fn hash_chunks(file: &File, size: u64, chunk_size: u32) -> std::io::Result<([u8; 32], Vec<ChunkEntry>)> {
    let count = size.div_ceil(u64::from(chunk_size)) as usize;
    let (full_tx, full_rx) = mpsc::sync_channel::<(u64, Vec<u8>)>(2);
    let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
    std::thread::scope(|scope| {
        let hasher = scope.spawn(move || {
            let mut chunks = Vec::with_capacity(count);
            for (offset, buf) in full_rx {
                chunks.push(ChunkEntry {
                    offset,
                    len: buf.len() as u32,
                    hash: *blake3::hash(&buf).as_bytes(),
                });
                let _ = free_tx.send(buf);
            }
            chunks
        });
        let mut whole = blake3::Hasher::new();
        let mut offset = 0u64;
        let mut spare = (0..3).map(|_| Vec::new()).collect::<Vec<_>>();
        let read_result = (|| {
            while offset < size {
                let len = (size - offset).min(u64::from(chunk_size)) as usize;
                let mut buf = spare.pop().or_else(|| free_rx.recv().ok()).unwrap_or_default();
                buf.resize(len, 0);
                file.read_exact_at(&mut buf, offset)?;
                whole.update(&buf);
                if full_tx.send((offset, buf)).is_err() {
                    break;
                }
                offset += len as u64;
            }
            Ok::<_, std::io::Error>(())
        })();
        drop(full_tx);
        let chunks = hasher.join().expect("chunk hasher thread panicked");
        read_result.map(|()| (*whole.finalize().as_bytes(), chunks))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn manifests_tile_and_match_b3sum_for_interesting_sizes() {
        let chunk = MIN_CHUNK_SIZE;
        let c = chunk as usize;
        for size in [0, 1, c - 1, c, c + 1, 5 * c + 17] {
            let mut tmp = tempfile::NamedTempFile::new().unwrap();
            let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            tmp.write_all(&data).unwrap();
            let manifest = build_manifest(tmp.as_file(), tmp.path(), chunk).unwrap();
            manifest.validate().unwrap();
            assert_eq!(manifest.size, size as u64);
            assert_eq!(manifest.digest, *blake3::hash(&data).as_bytes());
            assert_eq!(manifest.chunks.len(), size.div_ceil(c));
            for entry in &manifest.chunks {
                let bytes = &data[entry.offset as usize..][..entry.len as usize];
                assert_eq!(entry.hash, *blake3::hash(bytes).as_bytes());
            }
        }
    }

    #[test]
    fn chunk_size_grows_to_fit_the_manifest_limit() {
        assert_eq!(effective_chunk_size(10, 1), MIN_CHUNK_SIZE);
        assert_eq!(effective_chunk_size(1 << 30, 1 << 20), 1 << 20);
        let huge = (MAX_MANIFEST_CHUNKS as u64) * (1 << 20) * 3;
        let chunk = effective_chunk_size(huge, 1 << 20);
        assert!(huge.div_ceil(u64::from(chunk)) <= MAX_MANIFEST_CHUNKS as u64);
    }
}
