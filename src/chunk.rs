//! File → chunks: cut a file into content-defined (FastCDC) or fixed-size chunks and hash each with BLAKE3, plus
//! the whole-file digest.
//!
//! Runs on blocking threads only (callers use `spawn_blocking`). Reading and hashing overlap: one thread reads and
//! finds the cut points, a second hashes the chunks and the whole file, so two cores work at once. A
//! file that changes while it is being read (size or mtime differ before and after) is reported as
//! [`ChunkError::SourceChanged`].

use std::fs::{File, Metadata};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::mpsc;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::manifest::{ChunkEntry, Chunking, FileTime, Hash, Manifest};
use crate::verify::{PrefixDigest, StackedPrefix};
use crate::{MAX_CHUNK_SIZE, MAX_MANIFEST_CHUNKS, MIN_CHUNK_SIZE};

pub mod gear;

/// Smallest average size of content-defined chunks.
pub const MIN_CDC_AVG: u32 = 16 * 1024;
/// Largest average size of content-defined chunks (fastcdc's bound).
pub const MAX_CDC_AVG: u32 = 4 * 1024 * 1024;
/// How much of the file one read takes (at least twice the largest content-defined chunk, 4 MiB by default).
const CDC_BUFFER: usize = 8 * 1024 * 1024;
/// Files up to this size are hashed on the calling thread.
const SMALL_FILE: u64 = 1024 * 1024;

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

/// The chunking scheme a user asks for (`--chunking`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default, clap::ValueEnum)]
pub enum ChunkingMode {
    /// Content-defined chunks (FastCDC): an insertion or deletion changes only the chunks around it.
    #[default]
    Cdc,
    /// Fixed-size chunks: cheapest to compute, but an insertion shifts every later chunk.
    Fixed,
}

/// What a user asked for: a scheme and a (target average) chunk size. [`ChunkSpec::for_size`] turns it into the
/// exact parameters for one file.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkSpec {
    /// The scheme.
    pub mode: ChunkingMode,
    /// Chunk size (fixed) or target average (content-defined).
    pub size: u32,
}

impl Default for ChunkSpec {
    fn default() -> Self {
        ChunkSpec {
            mode: ChunkingMode::Cdc,
            size: crate::DEFAULT_CHUNK_SIZE,
        }
    }
}

impl ChunkSpec {
    /// The parameters for a file of `size` bytes, within the protocol bounds and grown until the manifest fits in
    /// [`MAX_MANIFEST_CHUNKS`] chunks. Content-defined chunks use `min = avg/4`, `max = avg*4`.
    pub fn for_size(&self, size: u64) -> Chunking {
        match self.mode {
            ChunkingMode::Fixed => Chunking::Fixed {
                size: effective_chunk_size(size, self.size),
            },
            ChunkingMode::Cdc => {
                let mut avg = self.size.clamp(MIN_CDC_AVG, MAX_CDC_AVG);
                // Content-defined chunks vary in size: leave room for twice the expected count.
                while avg < MAX_CDC_AVG && size.div_ceil(u64::from(avg)) > (MAX_MANIFEST_CHUNKS / 2) as u64 {
                    avg = avg.saturating_mul(2).min(MAX_CDC_AVG);
                }
                Chunking::FastCdc {
                    min: avg / 4,
                    avg,
                    max: avg * 4,
                }
            }
        }
    }
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

/// Whether `meta` still shows the `size` and `mtime` a manifest recorded: the identity a sender checks before it
/// trusts bytes it hashed earlier (a change behind both is caught by the hashes, proto-spec.md §4).
pub fn has_identity(meta: &Metadata, size: u64, mtime: FileTime) -> bool {
    meta.len() == size && mtime_of(meta) == mtime
}

/// Reads the open `file` once (positional reads) and builds its manifest, cut as `spec` asks. `path` only names
/// the file in errors.
pub fn build_manifest(file: &File, path: &Path, spec: ChunkSpec) -> Result<Manifest, ChunkError> {
    let io = |source| ChunkError::Io {
        path: path.display().to_string(),
        source,
    };
    let before = file.metadata().map_err(io)?;
    build_manifest_from(file, path, spec, before)
}

/// [`build_manifest`] of a file whose metadata `before` was taken before any of its bytes were read (by its
/// open, say): one `fstat` fewer.
pub fn build_manifest_from(
    file: &File,
    path: &Path,
    spec: ChunkSpec,
    before: Metadata,
) -> Result<Manifest, ChunkError> {
    let chunking = spec.for_size(before.len());
    let (digest, chunks) = hash_chunks(file, before.len(), chunking).map_err(|source| ChunkError::Io {
        path: path.display().to_string(),
        source,
    })?;
    manifest_if_unchanged(file, path, &before, chunking, digest, chunks)
}

/// The manifest of `file` (at `path`, for errors) as hashed (`digest`, `chunks`, cut with `chunking`) since it was
/// described by `before`, if its size and mtime did not move meanwhile; else [`ChunkError::SourceChanged`].
pub fn manifest_if_unchanged(
    file: &File,
    path: &Path,
    before: &Metadata,
    chunking: Chunking,
    digest: Hash,
    chunks: Vec<ChunkEntry>,
) -> Result<Manifest, ChunkError> {
    let after = file.metadata().map_err(|source| ChunkError::Io {
        path: path.display().to_string(),
        source,
    })?;
    if !has_identity(&after, before.len(), mtime_of(before)) {
        return Err(ChunkError::SourceChanged(path.display().to_string()));
    }
    Ok(Manifest {
        size: before.len(),
        digest,
        chunking,
        mtime: mtime_of(before),
        mode: before.mode() & 0o7777,
        chunks,
    })
}

/// Cuts the first `size` bytes of `file` with exactly these (already validated) parameters and returns the chunks
/// whose hash `keep` accepts; used by a receiver to find reusable chunks in an older copy, so memory follows what
/// is wanted, not the size of the old file. Does not check for concurrent changes: every reused chunk is verified.
pub fn chunk_with(
    file: &File,
    size: u64,
    chunking: Chunking,
    keep: &dyn Fn(&Hash) -> bool,
) -> std::io::Result<Vec<ChunkEntry>> {
    let mut kept = Vec::new();
    let mut emit = |offset: u64, bytes: &[u8]| {
        let hash = *blake3::hash(bytes).as_bytes();
        if keep(&hash) {
            kept.push(ChunkEntry {
                offset,
                len: bytes.len() as u32,
                hash,
            });
        }
        true
    };
    cut(file, size, chunking, &mut emit)?;
    Ok(kept)
}

/// Reads `size` bytes, cut as `chunking` says; returns the whole-file digest and the chunk list.
fn hash_chunks(file: &File, size: u64, chunking: Chunking) -> std::io::Result<(Hash, Vec<ChunkEntry>)> {
    if size <= SMALL_FILE {
        return hash_small(file, size, chunking);
    }
    let mut chunks = Vec::new();
    let digest = stream_chunks(file, size, chunking, &mut |entry| {
        chunks.push(entry);
        true
    })?;
    Ok((digest, chunks))
}

/// Reads `size` bytes once, cut as `chunking` says, hands every chunk to `sink` as soon as it is hashed (in file
/// order), and returns the whole-file digest: the one read a streamed offer (proto-spec.md §4) and a whole
/// manifest both come from. Stops reading early, with an `Interrupted` error, if `sink` returns false.
pub fn stream_chunks(
    file: &File,
    size: u64,
    chunking: Chunking,
    sink: &mut (dyn FnMut(ChunkEntry) -> bool + Send),
) -> std::io::Result<Hash> {
    stream_chunks_from(file, size, chunking, HashStart::default(), &mut |hashed| match hashed {
        Hashed::Chunk(entry) => sink(entry),
        Hashed::Checkpoint(_) => true,
    })
}

/// Where hashing starts: the end of the chunks already hashed (by an earlier run) and the whole-file digest of the
/// file's first bytes, up to at most [`MAX_DIGEST_GAP`] bytes before that end. The default starts at offset 0.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HashStart {
    /// End of the last chunk already hashed: cutting goes on from here (a chunk boundary of a full run).
    pub offset: u64,
    /// The whole-file digest state of the bytes `[0, digest.len)`, `digest.len <= offset`.
    pub digest: StackedPrefix,
}

impl HashStart {
    /// The whole-file digest state to go on from, if hashing a file of `size` bytes cut with `chunking` can go on
    /// from here: the offset within the file (and, for fixed chunks, a chunk boundary or the end), the digest at most
    /// [`MAX_DIGEST_GAP`] bytes before it, and a state that BLAKE3 can go on from.
    pub fn resumable(&self, size: u64, chunking: Chunking) -> Option<PrefixDigest> {
        let aligned = match chunking {
            Chunking::Fixed { size: chunk } => {
                self.offset.is_multiple_of(u64::from(chunk.max(1))) || self.offset == size
            }
            Chunking::FastCdc { .. } => true,
        };
        let fits = self.offset <= size
            && self.digest.len <= self.offset
            && self.offset - self.digest.len <= MAX_DIGEST_GAP
            && aligned;
        fits.then(|| PrefixDigest::resume(self.digest.clone())).flatten()
    }
}

/// Most bytes between a [`HashStart`]'s digest and its offset: what a resumed run reads again. A checkpoint's
/// digest stops short of its chunks' end by at most one BLAKE3 chunk (the last one is held back until its end is
/// known).
pub const MAX_DIGEST_GAP: u64 = blake3::CHUNK_LEN as u64;

/// What [`stream_chunks_from`] hands its sink, in file order.
#[derive(Debug, Clone)]
pub enum Hashed {
    /// The next chunk.
    Chunk(ChunkEntry),
    /// Every chunk so far was handed over, and this is the whole-file digest state of all but the last
    /// [`MAX_DIGEST_GAP`] bytes or fewer of them: a [`HashStart`] to go on from later. Comes after each buffer (at
    /// most 8 MiB).
    Checkpoint(StackedPrefix),
}

/// [`stream_chunks`] from `start` (an earlier run's [`Hashed::Checkpoint`] and the end of its chunks): re-reads the
/// few bytes between the recorded digest and the chunks' end, then cuts from there. Chunk boundaries depend only on
/// the bytes from a chunk's start, so the chunks, and the digest, are those of a run from offset 0. A `start` that
/// cannot be one (past the end, digest too far back, not a whole number of fixed chunks) is `InvalidInput`.
///
/// Two threads: this one reads and finds the cut points (the content-defined chunker is the costliest step), a
/// second hashes every chunk and the whole file. Filled buffers travel to the hasher and come back empty, so no
/// chunk is copied; at most two buffers exist at once.
pub fn stream_chunks_from(
    file: &File,
    size: u64,
    chunking: Chunking,
    start: HashStart,
    sink: &mut (dyn FnMut(Hashed) -> bool + Send),
) -> std::io::Result<Hash> {
    let Some(mut whole) = start.resumable(size, chunking) else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the recorded hashing progress does not fit the file",
        ));
    };
    let mut gap = vec![0u8; (start.offset - start.digest.len) as usize];
    file.read_exact_at(&mut gap, start.digest.len)?;
    whole.extend(start.digest.len, &gap);
    // A rendezvous: the reader fills one buffer while the hasher hashes the other, never a third (a streamed
    // offer hashes while it sends, so these buffers add to the sender's read-ahead).
    let (full_tx, full_rx) = mpsc::sync_channel::<Batch>(0);
    let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
    std::thread::scope(|scope| {
        let hasher = scope.spawn(move || {
            for batch in full_rx {
                let mut end = 0;
                for &(at, len) in &batch.cuts {
                    let bytes = &batch.buf[at..at + len];
                    end = at + len;
                    let entry = ChunkEntry {
                        offset: batch.base + at as u64,
                        len: len as u32,
                        hash: *blake3::hash(bytes).as_bytes(),
                    };
                    if !sink(Hashed::Chunk(entry)) {
                        return None;
                    }
                }
                // The cuts tile the buffer from its start: one update for all of them keeps BLAKE3's subtrees large.
                whole.extend(batch.base, &batch.buf[..end]);
                if end > 0 && !sink(Hashed::Checkpoint(whole.stacked())) {
                    return None;
                }
                let _ = free_tx.send(batch.buf);
            }
            Some(whole.finalize())
        });
        let recycled = || free_rx.try_recv().unwrap_or_default();
        let read_result = batches(file, start.offset, size, chunking, recycled, |batch| {
            full_tx.send(batch).is_ok()
        });
        drop(full_tx);
        let digest = hasher.join().expect("chunk hasher thread panicked");
        read_result?;
        digest.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::Interrupted, "the chunk consumer stopped"))
    })
}

/// Hashes a small file on the calling thread: for the many small files of a tree, a second thread and a large
/// buffer would cost more than the hashing.
fn hash_small(file: &File, size: u64, chunking: Chunking) -> std::io::Result<(Hash, Vec<ChunkEntry>)> {
    let mut whole = blake3::Hasher::new();
    let mut chunks = Vec::new();
    let mut emit = |offset: u64, bytes: &[u8]| {
        whole.update(bytes);
        chunks.push(ChunkEntry {
            offset,
            len: bytes.len() as u32,
            hash: *blake3::hash(bytes).as_bytes(),
        });
        true
    };
    cut(file, size, chunking, &mut emit)?;
    Ok((*whole.finalize().as_bytes(), chunks))
}

/// A buffer of the file and the chunks cut in it.
struct Batch {
    /// Bytes read from the file, starting at `base`.
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    base: u64,
    /// The chunks found in `buf`: (offset in `buf`, length), in order.
    cuts: Vec<(usize, usize)>,
}

/// Emits the chunks of the first `size` bytes of `file`, cut as `chunking` says, one at a time through one reused
/// buffer; stops early if `emit` returns false.
fn cut(file: &File, size: u64, chunking: Chunking, emit: &mut dyn FnMut(u64, &[u8]) -> bool) -> std::io::Result<()> {
    let spare = std::cell::Cell::new(Vec::new());
    batches(
        file,
        0,
        size,
        chunking,
        || spare.take(),
        |batch| {
            let more = batch
                .cuts
                .iter()
                .all(|&(at, len)| emit(batch.base + at as u64, &batch.buf[at..at + len]));
            spare.set(batch.buf);
            more
        },
    )
}

/// Reads bytes `[start, size)` of `file` (`start` a chunk boundary) into buffers (from `buffer`, which may hand back a used one or an empty
/// `Vec`), finds the cut points in each, and hands each filled buffer with its cuts to `take`; stops early if
/// `take` returns false.
fn batches(
    file: &File,
    start: u64,
    size: u64,
    chunking: Chunking,
    buffer: impl FnMut() -> Vec<u8>,
    take: impl FnMut(Batch) -> bool,
) -> std::io::Result<()> {
    match chunking {
        Chunking::Fixed { size: chunk } => fixed_batches(file, start, size, chunk, buffer, take),
        Chunking::FastCdc { min, avg, max } => {
            cdc_batches(file, start, size, (min, avg, max), CDC_BUFFER, buffer, take)
        }
    }
}

/// A buffer of `len` bytes, reusing `buf`'s allocation.
fn sized(mut buf: Vec<u8>, len: usize) -> Vec<u8> {
    buf.resize(len, 0);
    buf
}

/// Fixed-size chunks, as many whole chunks per buffer as [`CDC_BUFFER`] holds (at least one).
fn fixed_batches(
    file: &File,
    start: u64,
    size: u64,
    chunk: u32,
    mut buffer: impl FnMut() -> Vec<u8>,
    mut take: impl FnMut(Batch) -> bool,
) -> std::io::Result<()> {
    let chunk = u64::from(chunk.max(1));
    let per_batch = (CDC_BUFFER as u64 / chunk).max(1) * chunk;
    let mut base = start;
    while base < size {
        let len = (size - base).min(per_batch) as usize;
        let mut buf = sized(buffer(), len);
        file.read_exact_at(&mut buf, base)?;
        let cuts = (0..len)
            .step_by(chunk as usize)
            .map(|at| (at, (len - at).min(chunk as usize)))
            .collect();
        if !take(Batch { buf, base, cuts }) {
            break;
        }
        base += len as u64;
    }
    Ok(())
}

/// Content-defined chunks. The chunker runs over a buffer of the file; a chunk is final once the chunker cut it
/// before the buffer's end, or at `max` bytes, or the file ended, so the cuts equal those of one pass over the whole
/// file. The bytes after the last final cut (part of one chunk) start the next buffer.
fn cdc_batches(
    file: &File,
    start: u64,
    size: u64,
    (min, avg, max): (u32, u32, u32),
    buffer_len: usize,
    mut buffer: impl FnMut() -> Vec<u8>,
    mut take: impl FnMut(Batch) -> bool,
) -> std::io::Result<()> {
    let chunker = gear::GearChunker::new(min, avg, max).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("content-defined chunking parameters out of bounds: {min}/{avg}/{max}"),
        )
    })?;
    let max = max as usize;
    // The whole file if it fits: a buffer of at least 2 * max means a chunk is never cut short by its end.
    let capacity = (buffer_len.max(2 * max) as u64).min(size.saturating_sub(start)) as usize;
    let mut buf = sized(buffer(), capacity);
    let mut base = start; // file offset of buf[0]
    let mut filled = 0usize;
    while base < size {
        let want = ((size - base) as usize).min(capacity);
        file.read_exact_at(&mut buf[filled..want], base + filled as u64)?;
        filled = want;
        let at_end = base + filled as u64 == size;
        let mut cuts = Vec::new();
        let mut consumed = 0usize;
        // A chunk is final if the chunker cut it before the buffer's end (a cut at a position depends only on the
        // bytes before it, so more bytes would not move it), at `max`, or at the file's end. Only one that ran into
        // the buffer's end is left for the next buffer, uncut: the bytes carried over are part of one chunk, not the
        // up to `max` bytes of several that waiting for `max` bytes after every chunk's start carried (and copied).
        while consumed < filled {
            let len = chunker.first_chunk(&buf[consumed..filled]);
            if !(at_end || consumed + len < filled || len == max) {
                break;
            }
            cuts.push((consumed, len));
            consumed += len;
        }
        let tail = filled - consumed;
        let mut next = if base + (consumed as u64) < size {
            sized(buffer(), capacity)
        } else {
            Vec::new()
        };
        next[..tail].copy_from_slice(&buf[consumed..filled]);
        if !take(Batch { buf, base, cuts }) {
            return Ok(());
        }
        buf = next;
        filled = tail;
        base += consumed as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// proto-spec.md §11: a Pull's chunk size is clamped, never refused; 0 means the smallest.
    #[test]
    fn requested_chunk_sizes_are_clamped_to_the_protocol_bounds() {
        let spec = |mode, size| ChunkSpec { mode, size };
        assert_eq!(
            spec(ChunkingMode::Fixed, 0).for_size(1 << 20),
            Chunking::Fixed { size: MIN_CHUNK_SIZE }
        );
        assert_eq!(
            spec(ChunkingMode::Fixed, u32::MAX).for_size(1 << 20),
            Chunking::Fixed { size: MAX_CHUNK_SIZE }
        );
        let smallest = MIN_CDC_AVG;
        assert_eq!(
            spec(ChunkingMode::Cdc, 0).for_size(1 << 20),
            Chunking::FastCdc {
                min: smallest / 4,
                avg: smallest,
                max: smallest * 4
            }
        );
        assert!(matches!(
            spec(ChunkingMode::Cdc, u32::MAX).for_size(1 << 20),
            Chunking::FastCdc { avg: MAX_CDC_AVG, .. }
        ));
    }

    #[test]
    fn manifests_tile_and_match_b3sum_for_interesting_sizes() {
        let chunk = MIN_CHUNK_SIZE;
        let c = chunk as usize;
        for size in [0, 1, c - 1, c, c + 1, 5 * c + 17] {
            let mut tmp = tempfile::NamedTempFile::new().unwrap();
            let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            tmp.write_all(&data).unwrap();
            let spec = ChunkSpec {
                mode: ChunkingMode::Fixed,
                size: chunk,
            };
            let manifest = build_manifest(tmp.as_file(), tmp.path(), spec).unwrap();
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

    fn random_file(len: usize, seed: u64) -> (tempfile::NamedTempFile, Vec<u8>) {
        let mut data = vec![0u8; len];
        blake3::Hasher::new()
            .update(&seed.to_le_bytes())
            .finalize_xof()
            .fill(&mut data);
        let mut tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.write_all(&data).unwrap();
        (tmp, data)
    }

    /// Whatever a user asks for, the sender cuts manifests a receiver accepts (proto-spec.md §5): every chunk but
    /// the last at least 4 KiB, and chunking parameters within bounds.
    #[test]
    fn every_requested_chunking_passes_the_receivers_checks() {
        let (tmp, _) = random_file(2 * 1024 * 1024 + 77, 11);
        for mode in [ChunkingMode::Cdc, ChunkingMode::Fixed] {
            for size in [1, 100, 4095, MIN_CHUNK_SIZE, 16 * 1024, 1 << 20, u32::MAX] {
                let manifest = build_manifest(tmp.as_file(), tmp.path(), ChunkSpec { mode, size }).unwrap();
                manifest.validate().unwrap_or_else(|e| panic!("{mode:?} {size}: {e}"));
            }
        }
        // Growing to fit the chunk limit keeps the parameters valid, for any file size.
        for size in [0, 1, 1 << 30, 1 << 40, u64::MAX / 2] {
            for mode in [ChunkingMode::Cdc, ChunkingMode::Fixed] {
                let chunking = ChunkSpec { mode, size: 1 }.for_size(size);
                assert!(chunking.is_valid(), "{chunking:?} for {size}");
            }
        }
    }

    #[test]
    fn buffered_cdc_cuts_equal_one_pass_over_the_whole_file() {
        let (tmp, data) = random_file(3 * 1024 * 1024 + 123, 7);
        let (min, avg, max) = (4096, 16384, 65536);
        let expected: Vec<(u64, usize)> = fastcdc::v2020::FastCDC::new(&data, min, avg, max)
            .map(|c| (c.offset as u64, c.length))
            .collect();
        for buffer in [0, 200_000, 1 << 20] {
            let mut got = Vec::new();
            let take = |batch: Batch| {
                for (at, len) in batch.cuts {
                    assert!(at + len <= batch.buf.len());
                    got.push((batch.base + at as u64, len));
                }
                true
            };
            cdc_batches(
                tmp.as_file(),
                0,
                data.len() as u64,
                (min, avg, max),
                buffer,
                Vec::new,
                take,
            )
            .unwrap();
            assert_eq!(got, expected, "buffer {buffer}");
        }
    }

    /// `cdc_batches` as it runs (8 MiB buffers, the bytes after the last final cut carried into the next buffer)
    /// cuts what fastcdc cuts in one pass over the whole file, at the protocol's smallest, default and largest
    /// averages and at odd sizes.
    #[test]
    fn cdc_batches_of_8_mib_cut_as_fastcdc_does_in_one_pass() {
        let (tmp, data) = random_file(21 * 1024 * 1024 + 4097, 17);
        let mib = 1024 * 1024;
        for (min, avg, max) in [
            (MIN_CDC_AVG / 4, MIN_CDC_AVG, MIN_CDC_AVG * 4),
            (mib / 4, mib, 4 * mib),
            (MAX_CDC_AVG / 4, MAX_CDC_AVG, MAX_CDC_AVG * 4),
            (4097, 16_385, 3 * mib + 1),
        ] {
            let expected: Vec<(u64, usize)> = fastcdc::v2020::FastCDC::new(&data, min, avg, max)
                .map(|c| (c.offset as u64, c.length))
                .collect();
            let mut got = Vec::new();
            let take = |batch: Batch| {
                got.extend(batch.cuts.iter().map(|&(at, len)| (batch.base + at as u64, len)));
                true
            };
            let size = data.len() as u64;
            cdc_batches(tmp.as_file(), 0, size, (min, avg, max), CDC_BUFFER, Vec::new, take).unwrap();
            assert!(
                got == expected,
                "{min}/{avg}/{max}: {} chunks, fastcdc {}",
                got.len(),
                expected.len()
            );
        }
    }

    /// A buffer carries into the next only the start of one chunk (the one its end cut into), not every byte after
    /// the last chunk that had `max` bytes of buffer after its start: at the default 1 MiB average (4 MiB `max`) in
    /// 8 MiB buffers that was about 3.5 MiB copied per buffer, 6.7 % of a sender's CPU.
    #[test]
    fn a_buffer_carries_over_only_the_chunk_its_end_cut_into() {
        let (tmp, data) = random_file(41 * 1024 * 1024 + 17, 23);
        let mib = 1024 * 1024;
        let (min, avg, max) = (mib / 4, mib, 4 * mib);
        let expected: Vec<(u64, usize)> = fastcdc::v2020::FastCDC::new(&data, min, avg, max)
            .map(|c| (c.offset as u64, c.length))
            .collect();
        let mut carried = Vec::new();
        let take = |batch: Batch| {
            let consumed = batch.cuts.last().map_or(0, |&(at, len)| at + len);
            carried.push((batch.base + consumed as u64, batch.buf.len() - consumed));
            true
        };
        let size = data.len() as u64;
        cdc_batches(tmp.as_file(), 0, size, (min, avg, max), CDC_BUFFER, Vec::new, take).unwrap();
        carried.pop(); // the last buffer carries nothing on
        assert!(carried.len() >= 4);
        for (at, tail) in carried {
            let next = expected
                .iter()
                .find(|c| c.0 == at)
                .expect("a buffer ends its cuts at a chunk's start");
            assert!(
                tail <= next.1,
                "{tail} bytes carried at {at}, the chunk there has {}",
                next.1
            );
        }
    }

    /// A run resumed from any checkpoint of a full run (the end of its chunks so far and its digest state) cuts
    /// the same chunks after it and ends with the same whole-file digest, for content-defined and fixed chunks.
    #[test]
    fn hashing_resumed_from_a_checkpoint_equals_a_full_run() {
        let (tmp, data) = random_file(20 * 1024 * 1024 + 4321, 13);
        let size = data.len() as u64;
        for chunking in [
            Chunking::FastCdc {
                min: 4096,
                avg: 16384,
                max: 65536,
            },
            Chunking::Fixed { size: 4096 },
        ] {
            let mut chunks = Vec::new();
            let mut checkpoints = Vec::new();
            let digest = stream_chunks_from(tmp.as_file(), size, chunking, HashStart::default(), &mut |hashed| {
                match hashed {
                    Hashed::Chunk(entry) => chunks.push(entry),
                    Hashed::Checkpoint(prefix) => checkpoints.push((chunks.len(), prefix)),
                }
                true
            })
            .unwrap();
            assert_eq!(digest, *blake3::hash(&data).as_bytes(), "{chunking:?}");
            assert!(checkpoints.len() >= 2, "{chunking:?}: a checkpoint per buffer");
            for (done, prefix) in checkpoints {
                let last = chunks[done - 1];
                let offset = last.offset + u64::from(last.len);
                assert!(offset - prefix.len <= MAX_DIGEST_GAP && prefix.len <= offset);
                let mut resumed = chunks[..done].to_vec();
                let start = HashStart { offset, digest: prefix };
                let again = stream_chunks_from(tmp.as_file(), size, chunking, start, &mut |hashed| {
                    if let Hashed::Chunk(entry) = hashed {
                        resumed.push(entry);
                    }
                    true
                })
                .unwrap();
                assert_eq!(again, digest, "{chunking:?} from {offset}");
                assert!(resumed == chunks, "{chunking:?} from {offset}: other chunks");
            }
        }
        // A start that cannot be one is refused, not hashed into a wrong digest.
        let bad = HashStart {
            offset: 4096 * 3,
            digest: StackedPrefix::default(),
        };
        let refused = stream_chunks_from(tmp.as_file(), size, Chunking::Fixed { size: 4096 }, bad, &mut |_| true);
        assert_eq!(refused.unwrap_err().kind(), std::io::ErrorKind::InvalidInput);
    }

    #[test]
    fn an_insertion_changes_only_nearby_cdc_chunks() {
        let (_, data) = random_file(8 * 1024 * 1024, 9);
        let mut edited = data[..1000].to_vec();
        edited.extend_from_slice(&[0xAB; 100]);
        edited.extend_from_slice(&data[1000..]);
        let spec = ChunkSpec {
            mode: ChunkingMode::Cdc,
            size: 64 * 1024,
        };
        let manifest_of = |bytes: &[u8]| {
            let mut tmp = tempfile::NamedTempFile::new().unwrap();
            tmp.write_all(bytes).unwrap();
            build_manifest(tmp.as_file(), tmp.path(), spec).unwrap()
        };
        let (before, after) = (manifest_of(&data), manifest_of(&edited));
        after.validate().unwrap();
        assert_eq!(after.digest, *blake3::hash(&edited).as_bytes());
        let old: std::collections::HashSet<_> = before.chunks.iter().map(|c| c.hash).collect();
        let new_bytes: u64 = after
            .chunks
            .iter()
            .filter(|c| !old.contains(&c.hash))
            .map(|c| u64::from(c.len))
            .sum();
        assert!(
            new_bytes <= 4 * 256 * 1024,
            "{new_bytes} new bytes after a 100-byte insertion"
        );
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
