//! Chunk index sets and their run-length encoding.
//!
//! Owns [`IndexRange`] (the wire form of "chunks `start..start+count`") and [`ChunkSet`], the receiver's bitmap
//! of chunks that are durably on disk. A `Need` or `Ack` for 100,000 chunks is a handful of ranges, not 100,000
//! indices (proto-spec.md, "Need" and "Ack").

use serde::{Deserialize, Serialize};

/// A run of consecutive chunk indices: `start .. start + count`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexRange {
    /// First chunk index of the run.
    pub start: u32,
    /// Number of chunks in the run (never 0 on the wire).
    pub count: u32,
}

impl IndexRange {
    /// One past the last index, or `None` if the range overflows `u32`.
    pub fn end(&self) -> Option<u32> {
        self.start.checked_add(self.count)
    }

    /// The indices in this range.
    pub fn indices(&self) -> std::ops::Range<u32> {
        self.start..self.start.saturating_add(self.count)
    }
}

/// Checks that the ranges are non-empty, ascending, non-overlapping, and within `0..chunk_count`, so that walking
/// them visits each chunk at most once.
pub fn ranges_within(ranges: &[IndexRange], chunk_count: u32) -> bool {
    let mut next_free = 0u32;
    ranges.iter().all(|r| {
        let fits = r.count > 0 && r.start >= next_free && r.end().is_some_and(|end| end <= chunk_count);
        next_free = r.end().unwrap_or(u32::MAX);
        fits
    })
}

/// Number of indices covered by `ranges` (ranges are assumed valid).
pub fn ranges_len(ranges: &[IndexRange]) -> u64 {
    ranges.iter().map(|r| u64::from(r.count)).sum()
}

/// Run-length encodes ascending indices into ranges. Unsorted or repeated input still yields correct
/// (if longer) output.
pub fn encode_runs(indices: impl IntoIterator<Item = u32>) -> Vec<IndexRange> {
    let mut runs: Vec<IndexRange> = Vec::new();
    for index in indices {
        match runs.last_mut() {
            Some(run) if run.end() == Some(index) => run.count += 1,
            _ => runs.push(IndexRange { start: index, count: 1 }),
        }
    }
    runs
}

/// A fixed-size set of chunk indices, stored as a bitmap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkSet {
    words: Vec<u64>,
    len: u32,
    present: u32,
}

impl ChunkSet {
    /// An empty set for `len` chunks.
    pub fn new(len: u32) -> Self {
        ChunkSet {
            words: vec![0; (len as usize).div_ceil(64)],
            len,
            present: 0,
        }
    }

    /// Rebuilds a set from [`ChunkSet::to_bytes`]; `None` if the bytes do not fit `len` chunks.
    pub fn from_bytes(len: u32, bytes: &[u8]) -> Option<Self> {
        let words = (len as usize).div_ceil(64);
        if bytes.len() != words * 8 {
            return None;
        }
        let mut set = ChunkSet::new(len);
        for (word, raw) in set.words.iter_mut().zip(bytes.chunks_exact(8)) {
            *word = u64::from_le_bytes(raw.try_into().ok()?);
        }
        if let Some(last) = set.words.last_mut() {
            let used = len % 64;
            if used != 0 {
                *last &= (1u64 << used) - 1;
            }
        }
        set.present = set.words.iter().map(|w| w.count_ones()).sum();
        Some(set)
    }

    /// Makes room for chunks up to `len` (a streamed manifest grew, proto-spec.md §4); the new chunks are absent.
    /// A smaller `len` changes nothing.
    pub fn grow(&mut self, len: u32) {
        if len > self.len {
            self.words.resize((len as usize).div_ceil(64), 0);
            self.len = len;
        }
    }

    /// The bitmap as little-endian 64-bit words.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// Number of chunks the set covers.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// True if the set covers no chunks at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of chunks present.
    pub fn present(&self) -> u32 {
        self.present
    }

    /// True when every chunk is present.
    pub fn is_complete(&self) -> bool {
        self.present == self.len
    }

    /// Whether `index` is present (out-of-range indices are not).
    pub fn contains(&self, index: u32) -> bool {
        index < self.len && self.words[(index / 64) as usize] & (1 << (index % 64)) != 0
    }

    /// Marks `index` present; returns false if it was already present or is out of range.
    pub fn insert(&mut self, index: u32) -> bool {
        if index >= self.len || self.contains(index) {
            return false;
        }
        self.words[(index / 64) as usize] |= 1 << (index % 64);
        self.present += 1;
        true
    }

    /// Marks `index` missing again; returns false if it was not present.
    pub fn remove(&mut self, index: u32) -> bool {
        if !self.contains(index) {
            return false;
        }
        self.words[(index / 64) as usize] &= !(1 << (index % 64));
        self.present -= 1;
        true
    }

    /// The missing chunks, ascending.
    pub fn missing(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.len).filter(|&i| !self.contains(i))
    }

    /// The missing chunks as ascending runs.
    pub fn missing_ranges(&self) -> Vec<IndexRange> {
        encode_runs(self.missing())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn runs_encode_consecutive_indices() {
        assert_eq!(encode_runs([]), vec![]);
        assert_eq!(
            encode_runs([0, 1, 2, 5, 7, 8]),
            vec![
                IndexRange { start: 0, count: 3 },
                IndexRange { start: 5, count: 1 },
                IndexRange { start: 7, count: 2 },
            ]
        );
    }

    #[test]
    fn hundred_thousand_missing_chunks_are_one_range() {
        let set = ChunkSet::new(100_000);
        assert_eq!(
            set.missing_ranges(),
            vec![IndexRange {
                start: 0,
                count: 100_000
            }]
        );
    }

    #[test]
    fn set_round_trips_through_bytes() {
        for len in [0u32, 1, 63, 64, 65, 1000] {
            let mut set = ChunkSet::new(len);
            for i in (0..len).step_by(3) {
                assert!(set.insert(i));
                assert!(!set.insert(i));
            }
            let back = ChunkSet::from_bytes(len, &set.to_bytes()).unwrap();
            assert_eq!(back, set);
            assert_eq!(back.present(), len.div_ceil(3));
            if len > 0 {
                assert!(set.remove(0) && !set.remove(0) && !set.contains(0));
                assert_eq!(set.present(), len.div_ceil(3) - 1);
            }
        }
        assert!(ChunkSet::from_bytes(65, &[0u8; 8]).is_none());
    }

    /// The reference for [`ranges_within`], written another way: walk every index of every range over a bitmap of
    /// the manifest's chunks; refuse an empty range, an index outside the manifest, an index visited before, and an
    /// index not above every index visited so far (ascending). Only for small `chunk_count`s (it walks indices).
    fn naive_within(ranges: &[IndexRange], chunk_count: u32) -> bool {
        let mut visited = vec![false; chunk_count as usize];
        let mut highest: Option<u64> = None;
        for r in ranges {
            if r.count == 0 {
                return false;
            }
            for index in u64::from(r.start)..u64::from(r.start) + u64::from(r.count) {
                if index >= u64::from(chunk_count) || visited[index as usize] || highest.is_some_and(|h| index <= h) {
                    return false;
                }
                visited[index as usize] = true;
                highest = Some(index);
            }
        }
        true
    }

    /// A range with small or huge (near `u32::MAX`) start and count, so that overflow is exercised too.
    fn arb_range() -> impl Strategy<Value = IndexRange> {
        let value = prop_oneof![8 => 0u32..80, 1 => (u32::MAX - 3)..=u32::MAX];
        (value.clone(), value).prop_map(|(start, count)| IndexRange { start, count })
    }

    /// Ranges that are nearly valid: each starts a little before, at or after the previous one's end and is short
    /// (sometimes empty), with a chunk count near where they end, so that one broken rule decides the answer.
    fn arb_near_valid() -> impl Strategy<Value = (Vec<IndexRange>, u32)> {
        let steps = proptest::collection::vec((-2i64..4, prop_oneof![1 => Just(0u32), 6 => 1u32..6]), 0..6);
        (steps, -2i64..3).prop_map(|(steps, slack)| {
            let mut end = 0i64;
            let ranges: Vec<IndexRange> = steps
                .into_iter()
                .map(|(gap, count)| {
                    let start = (end + gap).max(0);
                    end = start + i64::from(count);
                    IndexRange {
                        start: start as u32,
                        count,
                    }
                })
                .collect();
            (ranges, (end + slack).max(0) as u32)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

        /// `ranges_within` agrees with the bitmap walk on every input the walk can afford (a huge range is refused
        /// by both before the walk reaches it: it leaves any manifest of under 80 chunks).
        #[test]
        fn ranges_within_agrees_with_a_bitmap_walk(ranges in proptest::collection::vec(arb_range(), 0..6),
                                                   chunk_count in 0u32..80) {
            prop_assert_eq!(ranges_within(&ranges, chunk_count), naive_within(&ranges, chunk_count), "{:?} in {}", ranges, chunk_count);
        }

        /// The same on nearly valid ranges, where a single empty, overlapping, descending or overhanging range is
        /// what decides.
        #[test]
        fn ranges_within_agrees_with_a_bitmap_walk_on_nearly_valid_ranges((ranges, chunk_count) in arb_near_valid()) {
            prop_assert_eq!(ranges_within(&ranges, chunk_count), naive_within(&ranges, chunk_count), "{:?} in {}", ranges, chunk_count);
        }

        /// Runs encoded from any bitmap are accepted, cover exactly its missing chunks once each, and count them.
        #[test]
        fn missing_runs_of_any_bitmap_are_within_and_cover_it(present in proptest::collection::vec(any::<bool>(), 0..300)) {
            let len = present.len() as u32;
            let mut set = ChunkSet::new(len);
            for (i, _) in present.iter().enumerate().filter(|(_, p)| **p) {
                set.insert(i as u32);
            }
            let runs = set.missing_ranges();
            prop_assert!(ranges_within(&runs, len));
            prop_assert!(naive_within(&runs, len));
            let mut covered = vec![false; present.len()];
            for index in runs.iter().flat_map(IndexRange::indices) {
                prop_assert!(!covered[index as usize], "index {} twice", index);
                covered[index as usize] = true;
            }
            let missing: Vec<bool> = present.iter().map(|p| !p).collect();
            prop_assert_eq!(covered, missing);
            prop_assert_eq!(ranges_len(&runs), u64::from(len - set.present()));
            prop_assert!(runs.windows(2).all(|w| w[0].end() < Some(w[1].start)), "runs are maximal: {:?}", runs);
        }
    }

    #[test]
    fn ranges_outside_the_manifest_are_refused() {
        assert!(ranges_within(&[IndexRange { start: 0, count: 4 }], 4));
        let two = |a, b| [IndexRange { start: a, count: 2 }, IndexRange { start: b, count: 2 }];
        assert!(ranges_within(&two(0, 2), 4), "adjacent runs are fine");
        assert!(!ranges_within(&two(0, 1), 4), "overlapping runs are refused");
        assert!(!ranges_within(&two(2, 0), 4), "descending runs are refused");
        assert!(!ranges_within(&two(0, 0), 4), "repeated runs are refused");
        assert!(!ranges_within(&[IndexRange { start: 1, count: 4 }], 4));
        assert!(!ranges_within(&[IndexRange { start: 0, count: 0 }], 4));
        assert!(!ranges_within(
            &[IndexRange {
                start: u32::MAX,
                count: 2
            }],
            u32::MAX
        ));
    }
}
