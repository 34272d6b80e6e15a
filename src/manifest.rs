//! The manifest: what a sender promises to send.
//!
//! A [`Manifest`] is an explicit list of `(offset, length, BLAKE3)` chunks plus the whole-file BLAKE3 digest (the one
//! `b3sum` prints). The receiver never assumes a chunking scheme: [`Manifest::validate`] checks that the chunks tile
//! the file exactly and stay within the protocol limits (proto-spec.md, "Offer" and "Limits").

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{MAX_CHUNK_SIZE, MAX_MANIFEST_CHUNKS, MIN_CHUNK_SIZE};

/// A BLAKE3 hash.
pub type Hash = [u8; 32];

/// One chunk of a file: where it is and what its bytes hash to.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkEntry {
    /// Byte offset of the chunk in the file.
    pub offset: u64,
    /// Length in bytes (1 ..= [`MAX_CHUNK_SIZE`]).
    pub len: u32,
    /// BLAKE3 of the chunk's bytes.
    pub hash: Hash,
}

/// How the sender cut the file. Informational for the receiver, which only checks tiling; it also chunks an older
/// local copy the same way to find reusable chunks.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Chunking {
    /// Fixed-size chunks of `size` bytes; the last may be shorter.
    Fixed {
        /// Chunk size in bytes.
        size: u32,
    },
    /// Content-defined chunks (FastCDC 2020, normalisation level 1, gear seed 0): boundaries follow the content,
    /// so an insertion shifts only the chunks around it.
    FastCdc {
        /// Smallest chunk (the last may be shorter).
        min: u32,
        /// Target average.
        avg: u32,
        /// Largest chunk.
        max: u32,
    },
}

/// A file modification time as seconds and nanoseconds since the Unix epoch.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FileTime {
    /// Whole seconds since the epoch (negative before 1970).
    pub secs: i64,
    /// Nanoseconds within the second.
    pub nanos: u32,
}

/// Everything a receiver needs to know to accept a file.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// File size in bytes.
    pub size: u64,
    /// BLAKE3 of the whole file (b3sum-compatible).
    pub digest: Hash,
    /// How the chunks were cut.
    pub chunking: Chunking,
    /// Source modification time, applied to the committed file.
    pub mtime: FileTime,
    /// Source permission bits (`st_mode & 0o7777`); the receiver applies `mode & 0o777`.
    pub mode: u32,
    /// The chunks, in file order.
    pub chunks: Vec<ChunkEntry>,
}

/// Why a manifest was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ManifestError {
    /// More chunks than [`MAX_MANIFEST_CHUNKS`].
    #[error("manifest has {count} chunks, the limit is {max}")]
    TooManyChunks {
        /// Chunks offered.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A chunk does not start where the previous one ended.
    #[error("chunk {index} starts at {offset}, expected {expected}: chunks must tile the file")]
    Gap {
        /// Index of the offending chunk.
        index: usize,
        /// Its offset.
        offset: u64,
        /// Where it should start.
        expected: u64,
    },
    /// A chunk is empty or larger than [`MAX_CHUNK_SIZE`].
    #[error("chunk {index} has length {len}, allowed 1..={max}")]
    BadLength {
        /// Index of the offending chunk.
        index: usize,
        /// Its length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// A chunk other than the last is shorter than [`MIN_CHUNK_SIZE`]: tiny chunks would make the manifest (44
    /// bytes a chunk) cost more than about 1 % of the file, and a sync each.
    #[error("chunk {index} has length {len}; every chunk but the last must have at least {min} bytes")]
    ChunkTooSmall {
        /// Index of the offending chunk.
        index: usize,
        /// Its length.
        len: u32,
        /// The minimum.
        min: u32,
    },
    /// The chunking parameters are out of bounds.
    #[error("chunking parameters {0:?} are out of bounds")]
    BadChunking(Chunking),
    /// The chunks cover a different number of bytes than the file size.
    #[error("chunks cover {covered} bytes but the file has {size}")]
    SizeMismatch {
        /// Bytes covered by the chunks.
        covered: u64,
        /// Declared file size.
        size: u64,
    },
}

impl Chunking {
    /// Whether the parameters are within the protocol bounds (proto-spec.md §5; a peer's claim is checked before
    /// anything chunks a file with it): `Fixed.size` in 4 KiB ..= 16 MiB; `FastCdc` with
    /// `4 KiB ≤ min ≤ avg ≤ max`, `min ≤ 1 MiB`, `avg ≤ 4 MiB`, `max ≤ 16 MiB` (within fastcdc's own bounds).
    pub fn is_valid(&self) -> bool {
        use fastcdc::v2020::{AVERAGE_MAX, MAXIMUM_MAX, MINIMUM_MAX};
        const _: () = assert!(
            MIN_CHUNK_SIZE >= fastcdc::v2020::MAXIMUM_MIN,
            "fastcdc's lower bounds are implied"
        );
        match *self {
            Chunking::Fixed { size } => (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&size),
            Chunking::FastCdc { min, avg, max } => {
                MIN_CHUNK_SIZE <= min
                    && min <= avg
                    && avg <= max
                    && min <= MINIMUM_MAX
                    && avg <= AVERAGE_MAX
                    && max <= MAXIMUM_MAX.min(MAX_CHUNK_SIZE)
            }
        }
    }
}

/// Where `chunks` (in offset order, as a manifest lists them) holds `chunk` itself: a chunk at the same offset
/// with the same length and hash. `None` if none starts there, or another one does.
pub fn index_of_same(chunks: &[ChunkEntry], chunk: &ChunkEntry) -> Option<usize> {
    let at = chunks.binary_search_by_key(&chunk.offset, |c| c.offset).ok()?;
    (chunks[at] == *chunk).then_some(at)
}

impl Manifest {
    /// Number of chunks (fits `u32` once [`Manifest::validate`] passed).
    pub fn chunk_count(&self) -> u32 {
        u32::try_from(self.chunks.len()).unwrap_or(u32::MAX)
    }

    /// The chunk at `index`, if any.
    pub fn chunk(&self, index: u32) -> Option<&ChunkEntry> {
        self.chunks.get(index as usize)
    }

    /// Total length of the chunks `ranges` name, walking slices (not indices); parts outside the manifest count
    /// nothing, so a peer's ranges cost at most the chunks that exist.
    pub fn ranges_bytes(&self, ranges: &[crate::ranges::IndexRange]) -> u64 {
        ranges
            .iter()
            .map(|range| {
                let start = (range.start as usize).min(self.chunks.len());
                let end = (range.indices().end as usize).clamp(start, self.chunks.len());
                self.chunks[start..end].iter().map(|c| u64::from(c.len)).sum::<u64>()
            })
            .sum()
    }

    /// Checks the chunks tile `0..size` exactly and respect the protocol limits (proto-spec.md §5), every chunk but
    /// the last of at least [`MIN_CHUNK_SIZE`] bytes.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if !self.chunking.is_valid() {
            return Err(ManifestError::BadChunking(self.chunking));
        }
        if self.chunks.len() > MAX_MANIFEST_CHUNKS {
            return Err(ManifestError::TooManyChunks {
                count: self.chunks.len(),
                max: MAX_MANIFEST_CHUNKS,
            });
        }
        let mut expected = 0u64;
        for (index, chunk) in self.chunks.iter().enumerate() {
            if chunk.len == 0 || chunk.len > MAX_CHUNK_SIZE {
                return Err(ManifestError::BadLength {
                    index,
                    len: chunk.len,
                    max: MAX_CHUNK_SIZE,
                });
            }
            if chunk.offset != expected {
                return Err(ManifestError::Gap {
                    index,
                    offset: chunk.offset,
                    expected,
                });
            }
            expected += u64::from(chunk.len);
        }
        if expected != self.size {
            return Err(ManifestError::SizeMismatch {
                covered: expected,
                size: self.size,
            });
        }
        // Only the last chunk may be short: the manifest then costs at most 44 bytes per 4 KiB of file (about
        // 1 %), and a receiver syncs at most once per 4 KiB.
        let all_but_last = &self.chunks[..self.chunks.len().saturating_sub(1)];
        if let Some(index) = all_but_last.iter().position(|c| c.len < MIN_CHUNK_SIZE) {
            return Err(ManifestError::ChunkTooSmall {
                index,
                len: self.chunks[index].len,
                min: MIN_CHUNK_SIZE,
            });
        }
        Ok(())
    }

    /// Identity of the content this manifest describes: BLAKE3 over size, digest and every chunk. Two manifests
    /// with equal ids describe the same bytes cut the same way (mtime and mode are not part of it).
    pub fn id(&self) -> Hash {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"ferry manifest v1");
        hasher.update(&self.size.to_le_bytes());
        hasher.update(&self.digest);
        for chunk in &self.chunks {
            hasher.update(&chunk.offset.to_le_bytes());
            hasher.update(&chunk.len.to_le_bytes());
            hasher.update(&chunk.hash);
        }
        *hasher.finalize().as_bytes()
    }
}

/// Lower-case hex of a hash, as `b3sum` prints it.
pub fn hex(hash: &Hash) -> String {
    blake3::Hash::from(*hash).to_hex().to_string()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A manifest of `lens` chunks with dummy hashes.
    pub(crate) fn manifest_of(lens: &[u32]) -> Manifest {
        let mut offset = 0;
        let chunks = lens
            .iter()
            .map(|&len| {
                let entry = ChunkEntry {
                    offset,
                    len,
                    hash: [len as u8; 32],
                };
                offset += u64::from(len);
                entry
            })
            .collect();
        Manifest {
            size: offset,
            digest: [0; 32],
            chunking: Chunking::Fixed { size: 4096 },
            mtime: FileTime::default(),
            mode: 0o644,
            chunks,
        }
    }

    #[test]
    fn tiling_manifests_validate() {
        assert_eq!(manifest_of(&[]).validate(), Ok(()));
        assert_eq!(manifest_of(&[1]).validate(), Ok(()));
        assert_eq!(manifest_of(&[4096, 4096, 7]).validate(), Ok(()));
    }

    #[test]
    fn gaps_overlaps_and_bad_sizes_are_refused() {
        let mut gap = manifest_of(&[10, 10]);
        gap.chunks[1].offset = 11;
        assert!(matches!(gap.validate(), Err(ManifestError::Gap { index: 1, .. })));

        let mut overlap = manifest_of(&[10, 10]);
        overlap.chunks[1].offset = 9;
        assert!(matches!(overlap.validate(), Err(ManifestError::Gap { .. })));

        let mut short = manifest_of(&[10, 10]);
        short.size = 21;
        assert!(matches!(short.validate(), Err(ManifestError::SizeMismatch { .. })));

        let mut empty_chunk = manifest_of(&[10, 10]);
        empty_chunk.chunks[1].len = 0;
        assert!(matches!(empty_chunk.validate(), Err(ManifestError::BadLength { .. })));

        let mut huge_chunk = manifest_of(&[10]);
        huge_chunk.chunks[0].len = MAX_CHUNK_SIZE + 1;
        huge_chunk.size = u64::from(MAX_CHUNK_SIZE) + 1;
        assert!(matches!(huge_chunk.validate(), Err(ManifestError::BadLength { .. })));
    }

    /// A manifest that tiles its file: every chunk but the last of 4 KiB ..= 16 MiB (mostly near the minimum,
    /// sometimes the maximum), the last of 1 byte ..= 16 MiB, offsets laid end to end, size their sum.
    fn arb_valid_manifest() -> impl Strategy<Value = Manifest> {
        let full = prop_oneof![8 => MIN_CHUNK_SIZE..MIN_CHUNK_SIZE + 2000, 1 => Just(MAX_CHUNK_SIZE)];
        let last = prop_oneof![8 => 1u32..MIN_CHUNK_SIZE + 2000, 1 => Just(MAX_CHUNK_SIZE)];
        let chunking = prop_oneof![
            (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).prop_map(|size| Chunking::Fixed { size }),
            Just(Chunking::FastCdc {
                min: 4096,
                avg: 16384,
                max: 65536
            }),
        ];
        (
            proptest::collection::vec(full, 0..12),
            proptest::option::of(last),
            chunking,
        )
            .prop_map(|(mut lens, last, chunking)| {
                lens.extend(last);
                Manifest {
                    chunking,
                    ..manifest_of(&lens)
                }
            })
    }

    /// One change that breaks exactly one rule of [`Manifest::validate`], with a position or amount.
    #[derive(Clone, Debug)]
    enum Mutation {
        /// Chunk `i` (not the first) starts `d` bytes after the end of the previous one.
        Gap(usize, u64),
        /// Chunk `i` (not the first) starts `d` bytes before the end of the previous one.
        Overlap(usize, u64),
        /// The declared size is off by `d` (up or down).
        WrongSize(i64),
        /// Chunk `i`, not the last, is shortened below 4 KiB (the rest re-tiled).
        SmallChunk(usize, u32),
        /// Chunk `i` grows beyond 16 MiB (the rest re-tiled).
        Oversize(usize, u32),
        /// Chunk `i` is empty (the rest re-tiled).
        Empty(usize),
        /// Chunk `i` is dropped, the size kept: one chunk fewer than the file needs.
        Dropped(usize),
        /// Chunk `i` is repeated after itself, the size kept: one chunk more.
        Repeated(usize),
        /// Out-of-bounds chunking parameters.
        BadChunking(Chunking),
    }

    fn arb_mutation() -> impl Strategy<Value = Mutation> {
        let i = any::<prop::sample::Index>();
        prop_oneof![
            (i.clone(), 1u64..=1 << 20).prop_map(|(i, d)| Mutation::Gap(i.index(usize::MAX), d)),
            (i.clone(), 1u64..=8192).prop_map(|(i, d)| Mutation::Overlap(i.index(usize::MAX), d)),
            prop_oneof![i64::MIN..0, 1..=i64::MAX, -5i64..0, 1i64..5].prop_map(Mutation::WrongSize),
            (i.clone(), 1u32..MIN_CHUNK_SIZE).prop_map(|(i, len)| Mutation::SmallChunk(i.index(usize::MAX), len)),
            (i.clone(), MAX_CHUNK_SIZE + 1..=u32::MAX)
                .prop_map(|(i, len)| Mutation::Oversize(i.index(usize::MAX), len)),
            i.clone().prop_map(|i| Mutation::Empty(i.index(usize::MAX))),
            i.clone().prop_map(|i| Mutation::Dropped(i.index(usize::MAX))),
            i.prop_map(|i| Mutation::Repeated(i.index(usize::MAX))),
            prop_oneof![
                (0..MIN_CHUNK_SIZE).prop_map(|size| Chunking::Fixed { size }),
                (MAX_CHUNK_SIZE + 1..=u32::MAX).prop_map(|size| Chunking::Fixed { size }),
                (0..MIN_CHUNK_SIZE).prop_map(|min| Chunking::FastCdc {
                    min,
                    avg: 16384,
                    max: 65536
                }),
                (65537..=u32::MAX).prop_map(|avg| Chunking::FastCdc {
                    min: 4096,
                    avg,
                    max: 65536
                }),
            ]
            .prop_map(Mutation::BadChunking),
        ]
    }

    /// Lays chunk offsets end to end again from chunk `from` on and sets the size to their sum, so that only the
    /// rule a mutation meant to break is broken.
    fn retile(m: &mut Manifest) {
        let mut offset = 0;
        for chunk in &mut m.chunks {
            chunk.offset = offset;
            offset += u64::from(chunk.len);
        }
        m.size = offset;
    }

    /// Applies `mutation` to `m` (indices taken modulo what the mutation needs) and returns the error it must
    /// cause, or `None` if the manifest has too few chunks for it.
    fn mutate(m: &mut Manifest, mutation: &Mutation) -> Option<fn(&ManifestError) -> bool> {
        let n = m.chunks.len();
        match *mutation {
            Mutation::Gap(i, d) => {
                let i = 1 + i.checked_rem(n.checked_sub(1)?)?;
                m.chunks[i].offset += d;
                Some(|e| matches!(e, ManifestError::Gap { .. }))
            }
            Mutation::Overlap(i, d) => {
                let i = 1 + i.checked_rem(n.checked_sub(1)?)?;
                m.chunks[i].offset -= d.min(m.chunks[i].offset);
                Some(|e| matches!(e, ManifestError::Gap { .. }))
            }
            Mutation::WrongSize(d) => {
                m.size = m.size.checked_add_signed(d).unwrap_or(if d < 0 { u64::MAX } else { 0 });
                Some(|e| matches!(e, ManifestError::SizeMismatch { .. }))
            }
            Mutation::SmallChunk(i, len) => {
                let i = i.checked_rem(n.checked_sub(1)?)?;
                m.chunks[i].len = len;
                retile(m);
                Some(|e| matches!(e, ManifestError::ChunkTooSmall { .. }))
            }
            Mutation::Oversize(i, len) => {
                m.chunks[i.checked_rem(n)?].len = len;
                retile(m);
                Some(|e| matches!(e, ManifestError::BadLength { .. }))
            }
            Mutation::Empty(i) => {
                m.chunks[i.checked_rem(n)?].len = 0;
                retile(m);
                Some(|e| matches!(e, ManifestError::BadLength { .. }))
            }
            Mutation::Dropped(i) => {
                m.chunks.remove(i.checked_rem(n)?);
                Some(|e| matches!(e, ManifestError::Gap { .. } | ManifestError::SizeMismatch { .. }))
            }
            Mutation::Repeated(i) => {
                let i = i.checked_rem(n)?;
                m.chunks.insert(i + 1, m.chunks[i]);
                Some(|e| matches!(e, ManifestError::Gap { .. } | ManifestError::SizeMismatch { .. }))
            }
            Mutation::BadChunking(chunking) => {
                m.chunking = chunking;
                Some(|e| matches!(e, ManifestError::BadChunking(_)))
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

        /// Every manifest that tiles its file within the limits is accepted, and each single mutation of one
        /// (gap, overlap, wrong size, a short chunk not last, an oversize or empty chunk, a chunk too few or too
        /// many, bad chunking) is refused with the error that names it.
        #[test]
        fn tiling_manifests_are_accepted_and_every_single_mutation_is_refused(
            m in arb_valid_manifest(),
            mutation in arb_mutation(),
        ) {
            check_mutation(m, mutation)?;
        }
    }

    /// `m` validates, and `mutation` of it is refused with the error that names it.
    fn check_mutation(m: Manifest, mutation: Mutation) -> Result<(), TestCaseError> {
        prop_assert_eq!(m.validate(), Ok(()));
        let mut bad = m.clone();
        if let Some(expected) = mutate(&mut bad, &mutation) {
            let result = bad.validate();
            prop_assert!(result.as_ref().is_err_and(expected), "{:?} gave {:?}", mutation, result);
        }
        Ok(())
    }

    /// The same property for a time budget (`.ci/run`, docs/testing.md "Fuzzing").
    #[test]
    #[ignore = "a time-boxed soak; .ci/run runs it"]
    fn soak_manifest_validate() {
        let strategy = (arb_valid_manifest(), arb_mutation());
        assert!(
            crate::soak::soak("Manifest::validate", strategy, |(m, mutation)| check_mutation(
                m, mutation
            )) > 0
        );
    }

    #[test]
    fn one_chunk_more_than_the_limit_is_refused() {
        let at_limit = manifest_of(&vec![MIN_CHUNK_SIZE; MAX_MANIFEST_CHUNKS]);
        assert_eq!(at_limit.validate(), Ok(()));
        let over = manifest_of(&vec![MIN_CHUNK_SIZE; MAX_MANIFEST_CHUNKS + 1]);
        assert!(
            matches!(over.validate(), Err(ManifestError::TooManyChunks { count, .. }) if count == MAX_MANIFEST_CHUNKS + 1)
        );
    }

    /// proto-spec.md §4 "Manifest id" and its golden example in §9: the bytes hashed, spelled out, and the id.
    #[test]
    fn manifest_id_is_pinned() {
        let chunk = |offset: u64, bytes: &[u8]| ChunkEntry {
            offset,
            len: bytes.len() as u32,
            hash: *blake3::hash(bytes).as_bytes(),
        };
        let manifest = Manifest {
            size: 11,
            digest: *blake3::hash(b"hello world").as_bytes(),
            chunking: Chunking::Fixed { size: 4096 },
            mtime: FileTime { secs: 1, nanos: 2 },
            mode: 0o644,
            chunks: vec![chunk(0, b"hello "), chunk(6, b"world")],
        };
        let mut spelled = b"ferry manifest v1".to_vec();
        spelled.extend_from_slice(&11u64.to_le_bytes());
        spelled.extend_from_slice(blake3::hash(b"hello world").as_bytes());
        for (offset, bytes) in [(0u64, &b"hello "[..]), (6, &b"world"[..])] {
            spelled.extend_from_slice(&offset.to_le_bytes());
            spelled.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            spelled.extend_from_slice(blake3::hash(bytes).as_bytes());
        }
        assert_eq!(
            spelled.len(),
            17 + 8 + 32 + 2 * 44,
            "prefix, size, digest, 44 bytes per chunk"
        );
        assert_eq!(manifest.id(), *blake3::hash(&spelled).as_bytes());
        assert_eq!(
            hex(&manifest.id()),
            "c6e1783a576ef95a697db955b3a8af34756c3fdde821ff476140353627ca69fb"
        );
        let empty = Manifest {
            size: 0,
            digest: *blake3::hash(b"").as_bytes(),
            chunks: vec![],
            ..manifest
        };
        assert_eq!(
            hex(&empty.id()),
            "37b40b25b52671856c5edce329b9936b003ff459df437abeac131e58f0f8bdfc"
        );
    }

    #[test]
    fn only_the_last_chunk_may_be_shorter_than_the_minimum() {
        assert_eq!(manifest_of(&[4096, 4096, 1]).validate(), Ok(()));
        assert_eq!(manifest_of(&[5000, 4096]).validate(), Ok(()));
        assert_eq!(
            manifest_of(&[4096, 4095, 4096]).validate(),
            Err(ManifestError::ChunkTooSmall {
                index: 1,
                len: 4095,
                min: 4096
            })
        );
        // The flood of proto-spec.md §10's example: a large file in 1-byte chunks.
        let tiny = manifest_of(&vec![1; 100_000]);
        assert!(matches!(
            tiny.validate(),
            Err(ManifestError::ChunkTooSmall { index: 0, .. })
        ));
    }

    /// The bounds of proto-spec.md §5, value by value: the edges are accepted, one step beyond is refused.
    #[test]
    fn chunking_bounds_match_the_spec() {
        let cdc = |min, avg, max| Chunking::FastCdc { min, avg, max };
        let fixed = |size| Chunking::Fixed { size };
        const K: u32 = 1024;
        const M: u32 = 1024 * 1024;
        for ok in [
            fixed(4 * K),
            fixed(16 * M),
            cdc(4 * K, 4 * K, 4 * K),
            cdc(4 * K, 16 * K, 64 * K),
            cdc(256 * K, M, 4 * M),
            cdc(M, 4 * M, 16 * M),
        ] {
            assert!(ok.is_valid(), "{ok:?} should be accepted");
        }
        for bad in [
            fixed(4 * K - 1),
            fixed(16 * M + 1),
            cdc(64, 256, 1024),
            cdc(2048, 8192, 32768),
            cdc(4095, 8192, 32768),
            cdc(M + 1, 2 * M, 4 * M),
            cdc(4 * K, 4 * M + 1, 8 * M),
            cdc(4 * K, 16 * K, 16 * M + 1),
            cdc(8 * K, 4 * K, 16 * K),
            cdc(4 * K, 16 * K, 8 * K),
        ] {
            assert!(!bad.is_valid(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn id_changes_with_content_not_metadata() {
        let a = manifest_of(&[10, 10]);
        let mut b = a.clone();
        b.mtime.secs = 99;
        b.mode = 0o600;
        assert_eq!(a.id(), b.id());
        b.chunks[1].hash[0] ^= 1;
        assert_ne!(a.id(), b.id());
    }

    #[test]
    fn ranges_bytes_sums_the_named_chunks_and_nothing_outside_the_manifest() {
        use crate::ranges::IndexRange;
        let m = manifest_of(&[10, 20, 30, 40]);
        let r = |start, count| IndexRange { start, count };
        assert_eq!(m.ranges_bytes(&[r(0, 1), r(2, 2)]), 80);
        assert_eq!(m.ranges_bytes(&[]), 0);
        assert_eq!(m.ranges_bytes(&[r(3, u32::MAX), r(9, 5)]), 40, "clamped, and cheap");
    }
}
