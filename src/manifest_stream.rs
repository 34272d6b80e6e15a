//! A manifest that arrives in pieces (proto-spec.md §4, "Streamed offer"; §5): the receiver's incremental
//! validation, and the sender's choice of how many chunks go into each piece.
//!
//! [`StreamedManifest`] checks every piece the moment it arrives, against the same rules a whole manifest meets
//! (§5): pieces continue the chunk indices without gap or overlap, chunks tile the file from offset 0 without gap
//! or overlap, never past the announced size, every chunk but the file's last has at least `MIN_CHUNK_SIZE`
//! bytes, no more chunks than the receiver accepts. So a chunk is never written for a manifest that could still
//! turn out invalid in its announced part; [`StreamedManifest::finish`] adds the one check only the end allows (the
//! chunks cover exactly `size`) and yields a [`Manifest`] equal to the one a whole `Offer` would have carried,
//! with the same [`Manifest::id`].

use thiserror::Error;

use crate::manifest::{ChunkEntry, Chunking, FileTime, Hash, Manifest, ManifestError};
use crate::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};

/// Most chunks in one `ManifestPiece` (16,384 × 44 bytes ≈ 704 KiB, far below the smallest `max_frame`).
pub const MAX_PIECE_CHUNKS: usize = 16_384;
/// A sender's smallest piece once the first chunk went out: at most this many pieces per doubling of the
/// announced chunks keep the receiver's per-piece work (one record write each) proportional to the manifest.
pub const PIECE_DIVISOR: usize = 8;

/// Why a piece or the end of a streamed manifest was refused (`Error{BadManifest}` on the wire).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PieceError {
    /// A rule every manifest follows (§5).
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The piece does not start at the next chunk index.
    #[error("piece starts at chunk {first_index}, expected {expected}: pieces must continue the chunk list")]
    OutOfOrder {
        /// The piece's first index.
        first_index: u32,
        /// The number of chunks announced before it.
        expected: u32,
    },
    /// An empty piece, or one of more than [`MAX_PIECE_CHUNKS`] chunks.
    #[error("a piece of {count} chunks; allowed 1..={max}")]
    BadPieceLength {
        /// Chunks in the piece.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A chunk ends past the announced file size.
    #[error("chunk {index} ends at {end}, past the file size {size}")]
    PastSize {
        /// The chunk's index.
        index: usize,
        /// Where it ends.
        end: u64,
        /// The announced size.
        size: u64,
    },
}

/// A streamed manifest as far as it arrived: every announced chunk checked (§5), the digest not yet known.
#[derive(Debug, Clone)]
pub struct StreamedManifest {
    manifest: Manifest,
    max_chunks: usize,
    /// Where the next chunk must start.
    covered: u64,
}

impl StreamedManifest {
    /// The start of a streamed manifest (`OfferStart`): refused if `chunking` is out of bounds.
    pub fn start(
        size: u64,
        chunking: Chunking,
        mtime: FileTime,
        mode: u32,
        max_chunks: usize,
    ) -> Result<Self, PieceError> {
        if !chunking.is_valid() {
            return Err(ManifestError::BadChunking(chunking).into());
        }
        Ok(StreamedManifest {
            manifest: Manifest {
                size,
                digest: [0; 32],
                chunking,
                mtime,
                mode,
                chunks: Vec::new(),
            },
            max_chunks,
            covered: 0,
        })
    }

    /// The manifest so far: the announced chunks, the digest still zero.
    pub fn so_far(&self) -> &Manifest {
        &self.manifest
    }

    /// Chunks announced so far.
    pub fn announced(&self) -> u32 {
        self.manifest.chunk_count()
    }

    /// Whether the announced chunks reach the file size (an empty file: from the start).
    pub fn is_covered(&self) -> bool {
        self.covered == self.manifest.size
    }

    /// Checks and appends a piece; returns the indices it added. On error nothing is appended.
    pub fn add(&mut self, first_index: u32, chunks: &[ChunkEntry]) -> Result<std::ops::Range<u32>, PieceError> {
        let expected = self.announced();
        if first_index != expected {
            return Err(PieceError::OutOfOrder { first_index, expected });
        }
        if chunks.is_empty() || chunks.len() > MAX_PIECE_CHUNKS {
            return Err(PieceError::BadPieceLength {
                count: chunks.len(),
                max: MAX_PIECE_CHUNKS,
            });
        }
        let total = self.manifest.chunks.len() + chunks.len();
        if total > self.max_chunks {
            return Err(ManifestError::TooManyChunks {
                count: total,
                max: self.max_chunks,
            }
            .into());
        }
        let mut covered = self.covered;
        let mut previous = self.manifest.chunks.last().map(|c| c.len);
        for (k, chunk) in chunks.iter().enumerate() {
            let index = expected as usize + k;
            check_chunk(index, chunk, covered, previous, self.manifest.size)?;
            covered += u64::from(chunk.len);
            previous = Some(chunk.len);
        }
        self.manifest.chunks.extend_from_slice(chunks);
        self.covered = covered;
        Ok(expected..expected + chunks.len() as u32)
    }

    /// The end (`ManifestEnd`): the chunks must cover exactly the size; the whole manifest, with `digest`.
    pub fn finish(&self, digest: Hash) -> Result<Manifest, PieceError> {
        if !self.is_covered() {
            return Err(ManifestError::SizeMismatch {
                covered: self.covered,
                size: self.manifest.size,
            }
            .into());
        }
        let mut manifest = self.manifest.clone();
        manifest.digest = digest;
        Ok(manifest)
    }
}

/// Checks chunk `index` where the tiling stands at `covered` and the chunk before it (if any) has length
/// `previous`: that one is not the file's last, so it must have had at least `MIN_CHUNK_SIZE` bytes.
fn check_chunk(
    index: usize,
    chunk: &ChunkEntry,
    covered: u64,
    previous: Option<u32>,
    size: u64,
) -> Result<(), PieceError> {
    if chunk.len == 0 || chunk.len > MAX_CHUNK_SIZE {
        return Err(ManifestError::BadLength {
            index,
            len: chunk.len,
            max: MAX_CHUNK_SIZE,
        }
        .into());
    }
    if chunk.offset != covered {
        return Err(ManifestError::Gap {
            index,
            offset: chunk.offset,
            expected: covered,
        }
        .into());
    }
    let end = covered + u64::from(chunk.len);
    if end > size {
        return Err(PieceError::PastSize { index, end, size });
    }
    if let Some(len) = previous.filter(|&len| len < MIN_CHUNK_SIZE) {
        return Err(ManifestError::ChunkTooSmall {
            index: index - 1,
            len,
            min: MIN_CHUNK_SIZE,
        }
        .into());
    }
    Ok(())
}

/// How many hashed chunks a sender gathers before it sends them as a piece, once `announced` chunks went out:
/// the first chunk alone (so it is on the wire at once), then an eighth of what was announced (at least 8, at
/// most [`MAX_PIECE_CHUNKS`]).
pub fn piece_target(announced: u32) -> usize {
    if announced == 0 {
        1
    } else {
        (announced as usize / PIECE_DIVISOR).clamp(8, MAX_PIECE_CHUNKS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::manifest_of;

    const K4: u32 = MIN_CHUNK_SIZE;

    fn started(size: u64) -> StreamedManifest {
        StreamedManifest::start(size, Chunking::Fixed { size: K4 }, FileTime::default(), 0o644, 100).unwrap()
    }

    /// A manifest sent in pieces of any split is accepted and ends equal to the whole one, with the same id.
    #[test]
    fn pieces_of_any_split_rebuild_the_whole_manifest() {
        let whole = manifest_of(&[K4, K4, K4, K4, 10]);
        for split in [vec![5], vec![1, 4], vec![2, 2, 1], vec![1, 1, 1, 1, 1]] {
            let mut streamed = started(whole.size);
            streamed.mtime_mode_from(&whole);
            let mut at = 0usize;
            for n in split {
                let added = streamed.add(at as u32, &whole.chunks[at..at + n]).unwrap();
                assert_eq!(added, at as u32..(at + n) as u32);
                at += n;
            }
            let done = streamed.finish(whole.digest).unwrap();
            assert_eq!(done, whole);
            assert_eq!(done.id(), whole.id());
        }
        let empty = started(0);
        assert!(empty.finish([7; 32]).unwrap().chunks.is_empty());
    }

    /// Every malformed stream is refused at the piece that breaks it, and a refused piece adds nothing.
    #[test]
    fn malformed_pieces_are_refused_and_add_nothing() {
        let whole = manifest_of(&[K4, K4, K4, 10]);
        let c = &whole.chunks;
        let mut s = started(whole.size);
        s.add(0, &c[..1]).unwrap();
        // A piece that does not continue the indices: overlapping, or leaving a gap.
        assert_eq!(
            s.add(0, &c[1..2]),
            Err(PieceError::OutOfOrder {
                first_index: 0,
                expected: 1
            })
        );
        assert!(matches!(s.add(2, &c[2..3]), Err(PieceError::OutOfOrder { .. })));
        // Overlapping bytes, and a gap in the bytes.
        let mut overlap = c[1];
        overlap.offset -= 1;
        assert!(matches!(
            s.add(1, &[overlap]),
            Err(PieceError::Manifest(ManifestError::Gap { .. }))
        ));
        let mut gap = c[1];
        gap.offset += 1;
        assert!(matches!(
            s.add(1, &[gap]),
            Err(PieceError::Manifest(ManifestError::Gap { .. }))
        ));
        // Past the announced size.
        let mut long = c[3];
        long.len = 11;
        assert!(matches!(
            s.add(1, &[c[1], c[2], long]),
            Err(PieceError::PastSize { .. })
        ));
        assert_eq!(s.announced(), 1, "a refused piece adds nothing");
        // Empty and oversized pieces.
        assert!(matches!(s.add(1, &[]), Err(PieceError::BadPieceLength { .. })));
        let many = vec![c[1]; MAX_PIECE_CHUNKS + 1];
        assert!(matches!(s.add(1, &many), Err(PieceError::BadPieceLength { .. })));
        // A short chunk that turns out not to be the last.
        let mut short = started(K4 as u64 + 20);
        let tiny = ChunkEntry {
            offset: 0,
            len: 10,
            hash: [0; 32],
        };
        short.add(0, &[tiny]).unwrap();
        let next = ChunkEntry {
            offset: 10,
            len: K4 + 10,
            hash: [0; 32],
        };
        assert!(matches!(
            short.add(1, &[next]),
            Err(PieceError::Manifest(ManifestError::ChunkTooSmall { index: 0, .. }))
        ));
        // The end before the chunks cover the size.
        s.add(1, &c[1..3]).unwrap();
        assert!(matches!(
            s.finish([0; 32]),
            Err(PieceError::Manifest(ManifestError::SizeMismatch { .. }))
        ));
        s.add(3, &c[3..]).unwrap();
        // Nothing may follow the last byte.
        let after = ChunkEntry {
            offset: whole.size,
            len: 1,
            hash: [0; 32],
        };
        assert!(matches!(s.add(4, &[after]), Err(PieceError::PastSize { .. })));
        assert!(s.finish(whole.digest).is_ok());
    }

    /// More chunks than the receiver accepts, counted over all pieces.
    #[test]
    fn the_chunk_limit_counts_every_piece() {
        let whole = manifest_of(&[K4, K4, K4]);
        let mut s =
            StreamedManifest::start(whole.size, Chunking::Fixed { size: K4 }, FileTime::default(), 0, 2).unwrap();
        s.add(0, &whole.chunks[..2]).unwrap();
        assert!(matches!(
            s.add(2, &whole.chunks[2..]),
            Err(PieceError::Manifest(ManifestError::TooManyChunks { count: 3, max: 2 }))
        ));
        let bad = Chunking::Fixed { size: 64 };
        assert!(StreamedManifest::start(1, bad, FileTime::default(), 0, 2).is_err());
    }

    #[test]
    fn pieces_grow_with_what_was_announced() {
        assert_eq!(piece_target(0), 1);
        assert_eq!(piece_target(1), 8);
        assert_eq!(piece_target(800), 100);
        assert_eq!(piece_target(u32::MAX), MAX_PIECE_CHUNKS);
    }

    impl StreamedManifest {
        fn mtime_mode_from(&mut self, whole: &Manifest) {
            self.manifest.mtime = whole.mtime;
            self.manifest.mode = whole.mode;
            self.manifest.chunking = whole.chunking;
        }
    }
}
