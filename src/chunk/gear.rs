//! Content-defined cut points: exactly those of fastcdc 3.2.1's `v2020::FastCDC::new(buf, min, avg, max)`
//! (normalisation level 1, its GEAR table and masks), the scheme proto-spec.md §5 names, found with several
//! independent hash chains at once.
//!
//! Owns the cut rule and guarantees that it equals the crate's for every input and every parameter set the crate
//! accepts with `avg <= max` (receivers re-cut their old copy with an incoming manifest's parameters, and caches
//! hold manifests cut by older clients: a different cut silently loses delta reuse). The `fastcdc` crate stays
//! the reference: the tables come from it, and the tests compare every cut with it.
//!
//! The rule, for a chunk starting at offset 0 of `n` remaining bytes (fastcdc's `cut_gear`): if `n <= min` the
//! chunk is all of it. Otherwise the gear hash `h = (h << 1) + GEAR[byte]` starts at 0 at `start = min / 2 * 2`
//! and, position by position, is checked against `mask_s` for positions before `avg / 2 * 2` (or `n / 2 * 2` if
//! `n < avg`) and against `mask_l` after, up to `min(n, max) / 2 * 2`; the chunk ends *before* the first position
//! `j` whose hash (which includes byte `j`) has no mask bit set, i.e. its length is `j`. If none does, its length
//! is `min(n, max)`. (fastcdc's two-bytes-per-step form with `GEAR_LS = GEAR << 1` computes the same hash.)
//!
//! Why it can go faster: bit `b` of the hash at position `j` depends only on bytes `j - b ..= j` (older bytes are
//! shifted out, and carries only go up), and every mask's highest bit `top` is below 48. So the bits that matter
//! of the hash at a position are known after `top` bytes of warm-up, and a range can be scanned in blocks of
//! [`LANES`] contiguous lanes, each warmed up over the `top` bytes before it, whose hash chains are independent
//! (the serial shift-and-add chain is what limits fastcdc's loop to about 1.5 cycles a byte). Within `top` bytes
//! of `start` the warm-up begins at `start` instead, which gives the hash fastcdc computes there (truncated: it
//! began at `start`); a block's first lane goes on from the previous block's last hash. The cut is the first
//! match of the first lane that has one; lanes of `avg / 64` bytes (256 ..= 8192) keep the warm-ups and the
//! speculative scan past a cut small. Safe Rust: the hot loop ([`in_step`]) is a function of its own so that its
//! state stays in registers.

use std::ops::ControlFlow;

use fastcdc::v2020::{get_gear_with_seed, logarithm2, MASKS};
use fastcdc::v2020::{AVERAGE_MAX, AVERAGE_MIN, MAXIMUM_MAX, MAXIMUM_MIN, MINIMUM_MAX, MINIMUM_MIN};

/// Number of independent hash chains a block is scanned with.
pub const LANES: usize = 4;

/// Below this many positions per lane, a range is scanned serially (the warm-ups would cost more than they save).
const MIN_LANE: usize = 32;

/// Finds the cut points of fastcdc's `v2020` chunker for one set of parameters.
#[derive(Clone, Debug)]
pub struct GearChunker {
    /// Smallest chunk (except the last), as given.
    min: usize,
    /// Target average: where the stricter mask gives way to the looser one.
    avg: usize,
    /// Largest chunk.
    max: usize,
    /// The mask before `avg` (more bits: cuts are rarer).
    mask_s: u64,
    /// The mask from `avg` on (fewer bits).
    mask_l: u64,
    /// Positions per lane in a full block.
    lane: usize,
    /// fastcdc's GEAR table (seed 0).
    gear: Box<[u64; 256]>,
}

impl GearChunker {
    /// The chunker for `FastCDC::new(_, min, avg, max)`, or `None` for parameters fastcdc refuses (it panics) or
    /// with `avg > max` (where fastcdc reads past `max`).
    pub fn new(min: u32, avg: u32, max: u32) -> Option<Self> {
        let within = (MINIMUM_MIN..=MINIMUM_MAX).contains(&min)
            && (AVERAGE_MIN..=AVERAGE_MAX).contains(&avg)
            && (MAXIMUM_MIN..=MAXIMUM_MAX).contains(&max)
            && avg <= max;
        if !within {
            return None;
        }
        // Level 1 normalisation, as FastCDC::new.
        let bits = logarithm2(avg) as usize;
        let avg = avg as usize;
        Some(GearChunker {
            min: min as usize,
            avg,
            max: max as usize,
            mask_s: MASKS[bits + 1],
            mask_l: MASKS[bits - 1],
            lane: lane_len(avg),
            gear: get_gear_with_seed(0).0,
        })
    }

    /// The same chunker with `lane` positions per lane (at least 1): lets tests put lane starts everywhere.
    #[cfg(test)]
    fn with_lane(mut self, lane: usize) -> Self {
        self.lane = lane.max(1);
        self
    }

    /// Length of the first chunk of `source` (0 only if `source` is empty): fastcdc's `cut_gear`.
    pub fn first_chunk(&self, source: &[u8]) -> usize {
        let n = source.len();
        if n <= self.min {
            return n;
        }
        let limit = n.min(self.max);
        let start = self.min / 2 * 2;
        let loose_from = n.min(self.avg) / 2 * 2;
        let end = limit / 2 * 2;
        if start < loose_from {
            if let Some(cut) = self.first_match(source, start, start, loose_from, self.mask_s) {
                return cut;
            }
        }
        let from = start.max(loose_from);
        if from < end {
            if let Some(cut) = self.first_match(source, start, from, end, self.mask_l) {
                return cut;
            }
        }
        limit
    }

    /// The chunks of `source` as `(offset, length)`, in order: fastcdc's iterator.
    pub fn chunks<'a>(&'a self, source: &'a [u8]) -> impl Iterator<Item = (usize, usize)> + 'a {
        let mut offset = 0;
        std::iter::from_fn(move || {
            let len = self.first_chunk(&source[offset..]);
            let chunk = (offset, len);
            offset += len;
            (len > 0).then_some(chunk)
        })
    }

    /// The first position in `from..to` whose hash, started at `start <= from`, has no bit of `mask` set.
    fn first_match(&self, source: &[u8], start: usize, from: usize, to: usize, mask: u64) -> Option<usize> {
        let scan = Scan {
            source,
            gear: &self.gear,
            start,
            mask,
            top: 63 - mask.leading_zeros() as usize,
        };
        let mut at = from;
        // The hash just before `at`, once a block computed it (the end of its last lane).
        let mut before = None;
        while to - at >= LANES * MIN_LANE.min(self.lane) {
            let lane = self.lane.min((to - at) / LANES);
            let hash = before.unwrap_or_else(|| scan.warm_up(at));
            match scan.block(at, lane, hash) {
                ControlFlow::Break(cut) => return Some(cut),
                ControlFlow::Continue(last) => before = Some(last),
            }
            at += LANES * lane;
        }
        let hash = before.unwrap_or_else(|| scan.warm_up(at));
        scan.serial(at, to, hash).break_value()
    }
}

/// One range's scan: the bytes, where the hash starts, the mask and its highest bit.
struct Scan<'a> {
    /// The bytes from the chunk's start.
    source: &'a [u8],
    /// fastcdc's GEAR table.
    gear: &'a [u64; 256],
    /// Where the hash starts (at 0).
    start: usize,
    /// A position matches if its hash has none of these bits.
    mask: u64,
    /// The highest bit of `mask`: bits up to it of a position's hash depend on the `top` bytes before it and itself.
    top: usize,
}

impl Scan<'_> {
    /// The hash after `byte`, given the hash before it.
    fn step(&self, hash: u64, byte: u8) -> u64 {
        (hash << 1).wrapping_add(self.gear[usize::from(byte)])
    }

    /// The hash just before position `at`, as far as bits `0..=top` of the hashes from `at` on depend on it:
    /// over the `top` bytes before `at`, or from `start` (where fastcdc's hash begins at 0) if that is later.
    fn warm_up(&self, at: usize) -> u64 {
        let from = at.saturating_sub(self.top).max(self.start);
        self.source[from..at]
            .iter()
            .fold(0, |hash, &byte| self.step(hash, byte))
    }

    /// The first match in `at..to`, `hash` being the hash before `at`; else the hash at `to - 1`.
    fn serial(&self, at: usize, to: usize, mut hash: u64) -> ControlFlow<usize, u64> {
        for (j, &byte) in self.source[at..to].iter().enumerate() {
            hash = self.step(hash, byte);
            if hash & self.mask == 0 {
                return ControlFlow::Break(at + j);
            }
        }
        ControlFlow::Continue(hash)
    }

    /// The first match in the block of [`LANES`] lanes of `lane` positions from `at`, `before` being the hash
    /// before `at`; else the hash at the block's last position.
    fn block(&self, at: usize, lane: usize, before: u64) -> ControlFlow<usize, u64> {
        let lanes: [&[u8]; LANES] = std::array::from_fn(|k| &self.source[at + k * lane..at + (k + 1) * lane]);
        let mut hashes = self.warm_up_lanes(at, lane, before);
        let stop = in_step(self.gear, self.mask, lanes, &mut hashes);
        if stop == lane {
            return ControlFlow::Continue(hashes[LANES - 1]);
        }
        // Some lane matched at `stop` and none before it: the cut is the first match of the first lane that has
        // one at `stop` or later, so each lane in turn goes on alone until it matches or ends.
        for (k, hash) in hashes.into_iter().enumerate() {
            let lane_at = at + k * lane;
            if hash & self.mask == 0 {
                return ControlFlow::Break(lane_at + stop);
            }
            self.serial(lane_at + stop + 1, lane_at + lane, hash)?;
        }
        // Not reached: the lane that matched at `stop` returned above.
        ControlFlow::Continue(hashes[LANES - 1])
    }

    /// The hashes before each lane of the block at `at`: the first is `before`, the others warm up over the
    /// `top` bytes before them, in step when none of them reaches back to `start`.
    fn warm_up_lanes(&self, at: usize, lane: usize, before: u64) -> [u64; LANES] {
        if at + lane < self.start + self.top {
            return std::array::from_fn(|k| if k == 0 { before } else { self.warm_up(at + k * lane) });
        }
        let warm = |k: usize| &self.source[at + k * lane - self.top..at + k * lane];
        let (mut hb, mut hc, mut hd) = (0, 0, 0);
        for ((&xb, &xc), &xd) in warm(1).iter().zip(warm(2)).zip(warm(3)) {
            hb = self.step(hb, xb);
            hc = self.step(hc, xc);
            hd = self.step(hd, xd);
        }
        [before, hb, hc, hd]
    }
}

/// Steps the hashes of `lanes` (of equal length) together until one matches `mask`: the position it matched at
/// (the hashes are those there), or the lanes' length (the hashes are those at their end). A function of its own
/// so that everything it keeps fits in registers; its branches are almost never taken.
#[inline(never)]
fn in_step(gear: &[u64; 256], mask: u64, lanes: [&[u8]; LANES], hashes: &mut [u64; LANES]) -> usize {
    let [a, b, c, d] = lanes;
    let [mut ha, mut hb, mut hc, mut hd] = *hashes;
    let step = |hash: u64, byte: u8| (hash << 1).wrapping_add(gear[usize::from(byte)]);
    let len = a.len();
    let (b, c, d) = (&b[..len], &c[..len], &d[..len]);
    let mut stop = len;
    for i in 0..len {
        ha = step(ha, a[i]);
        hb = step(hb, b[i]);
        hc = step(hc, c[i]);
        hd = step(hd, d[i]);
        if ha & mask == 0 || hb & mask == 0 || hc & mask == 0 || hd & mask == 0 {
            stop = i;
            break;
        }
    }
    *hashes = [ha, hb, hc, hd];
    stop
}

/// Positions per lane for a target average of `avg`: longer lanes spend less on warm-ups (up to 3 * 47 bytes a
/// block; the first lane goes on from the last block's end), shorter ones less past the cut (half a block on
/// average). Measured with examples/cdc_bench (docs/benchmarks.md): `avg / 64` between 256 and 8192 beat
/// `4 * sqrt(avg)` at 16 KiB (337 against 400 ms a GiB) and matched it at 64 KiB and 1 MiB; 128 was slower at
/// 16 KiB.
fn lane_len(avg: usize) -> usize {
    (avg / 64).clamp(256, 8192)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{MAX_CDC_AVG, MIN_CDC_AVG};

    /// `len` bytes from a seeded generator (BLAKE3's output stream).
    fn random(len: usize, seed: u64) -> Vec<u8> {
        let mut data = vec![0u8; len];
        blake3::Hasher::new()
            .update(&seed.to_le_bytes())
            .finalize_xof()
            .fill(&mut data);
        data
    }

    /// The oracle: fastcdc's own cuts.
    fn fastcdc_cuts(source: &[u8], (min, avg, max): (u32, u32, u32)) -> Vec<(usize, usize)> {
        fastcdc::v2020::FastCDC::new(source, min, avg, max)
            .map(|c| (c.offset, c.length))
            .collect()
    }

    fn assert_same_cuts(chunker: &GearChunker, source: &[u8], params: (u32, u32, u32), what: &str) {
        let ours: Vec<_> = chunker.chunks(source).collect();
        let theirs = fastcdc_cuts(source, params);
        if ours != theirs {
            let at = ours
                .iter()
                .zip(&theirs)
                .position(|(a, b)| a != b)
                .unwrap_or(ours.len().min(theirs.len()));
            panic!(
                "{what}, {params:?}, {} bytes, lane {}: chunk {at} is {:?}, fastcdc's {:?}",
                source.len(),
                chunker.lane,
                ours.get(at),
                theirs.get(at)
            );
        }
    }

    /// Protocol bounds (proto-spec.md §5: `4 KiB <= min <= avg <= max`, avg in MIN_CDC_AVG..=MAX_CDC_AVG),
    /// the default, odd sizes, `min = avg = max`, and fastcdc's own small bounds (where cuts come every few hundred
    /// bytes, so every edge of the rule is hit often).
    fn parameter_sets() -> Vec<(u32, u32, u32)> {
        let mut sets = vec![
            (MIN_CDC_AVG / 4, MIN_CDC_AVG, MIN_CDC_AVG * 4),
            (MAX_CDC_AVG / 4, MAX_CDC_AVG, MAX_CDC_AVG * 4),
            (4096, MIN_CDC_AVG, 4 * 1024 * 1024),
            (4097, 16_385, 65_537),
            (5001, 23_456, 100_001),
            (8192, 8192, 8192),
            (64, 256, 1024),
            (65, 257, 1025),
            (64, 1000, 1024),
            (101, 333, 4097),
            (1024, 1024, 1024),
            (3000, 1000, 8000), // min > avg: fastcdc accepts it
            (200_000, 200_000, 200_001),
        ];
        // Every mask pair a protocol average can select (avg 16 KiB ..= 4 MiB), with the default ratios.
        sets.extend((14..=22).map(|bits| (1u32 << bits >> 2, 1 << bits, 1 << bits << 2)));
        // Averages between powers of two round to the nearer mask.
        sets.extend([
            (6000, 24_575, 90_000),
            (6000, 24_576, 90_000),
            (12_000, 46_341, 200_000),
        ]);
        sets
    }

    #[test]
    fn cuts_equal_fastcdc_on_random_buffers_of_interesting_sizes() {
        for (i, params) in parameter_sets().into_iter().enumerate() {
            let (min, avg, max) = (params.0 as usize, params.1 as usize, params.2 as usize);
            let chunker = GearChunker::new(params.0, params.1, params.2).unwrap();
            let many = (8 * max).clamp(1 << 20, 6 << 20);
            for len in [
                0,
                1,
                63,
                min - 1,
                min,
                min + 1,
                min + 2,
                avg - 1,
                avg,
                avg + 1,
                max - 1,
                max,
                max + 1,
                2 * max + 17,
                many,
            ] {
                let source = random(len, (i * 1000 + len) as u64);
                assert_same_cuts(&chunker, &source, params, "random");
            }
        }
    }

    /// A byte for each position.
    type Pattern = fn(usize) -> u8;

    #[test]
    fn cuts_equal_fastcdc_on_zeros_and_repeating_patterns() {
        for params in parameter_sets() {
            let chunker = GearChunker::new(params.0, params.1, params.2).unwrap();
            let len = (3 * params.2 as usize + 1234).min(3 << 20);
            let patterns: [(&str, Pattern); 5] = [
                ("zeros", |_| 0),
                ("0xff", |_| 0xff),
                ("counter", |i| i as u8),
                ("period 7", |i| [3, 1, 4, 1, 5, 9, 2][i % 7]),
                ("period 1000", |i| ((i % 1000) * 31 % 251) as u8),
            ];
            for (what, pattern) in patterns {
                let source: Vec<u8> = (0..len).map(pattern).collect();
                assert_same_cuts(&chunker, &source, params, what);
            }
        }
    }

    /// Lanes of a few bytes put lane starts (and their warm-ups) at nearly every position, and chunk starts within
    /// a mask's reach of many of them.
    #[test]
    fn cuts_equal_fastcdc_for_any_lane_length() {
        let data = random(4 << 20, 99);
        for (i, params) in parameter_sets().into_iter().enumerate() {
            let len = (12 * params.2 as usize).clamp(256 << 10, 3 << 20);
            for lane in [1, 2, 3, 5, 47, 48, 49, 64, 1000] {
                let chunker = GearChunker::new(params.0, params.1, params.2).unwrap().with_lane(lane);
                let from = (i * 7919) % (1 << 20);
                assert_same_cuts(&chunker, &data[from..from + len], params, "random, short lanes");
            }
        }
    }

    #[test]
    fn parameters_fastcdc_refuses_are_refused() {
        assert!(GearChunker::new(63, 256, 1024).is_none());
        assert!(GearChunker::new(64, 255, 1024).is_none());
        assert!(GearChunker::new(64, 256, 1023).is_none());
        assert!(GearChunker::new(4096, 65_536, 16_384).is_none(), "avg > max");
        assert!(GearChunker::new(MINIMUM_MAX + 1, AVERAGE_MAX, MAXIMUM_MAX).is_none());
        assert!(GearChunker::new(MINIMUM_MAX, AVERAGE_MAX + 1, MAXIMUM_MAX).is_none());
        assert!(GearChunker::new(MINIMUM_MAX, AVERAGE_MAX, MAXIMUM_MAX + 1).is_none());
        assert!(GearChunker::new(MINIMUM_MAX, AVERAGE_MAX, MAXIMUM_MAX).is_some());
    }

    /// The scan needs a mask with a highest bit (`top`); the module docs' cost figures assume it is below 48 (a
    /// lane warms up over at most 47 bytes), for every average fastcdc accepts.
    #[test]
    fn masks_are_non_empty_and_below_bit_48() {
        for bits in logarithm2(AVERAGE_MIN)..=logarithm2(AVERAGE_MAX) {
            for mask in [MASKS[bits as usize - 1], MASKS[bits as usize + 1]] {
                assert!(mask != 0 && mask < 1 << 48, "{bits}: {mask:#x}");
            }
        }
    }
}
