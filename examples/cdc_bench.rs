//! Content-defined chunking alone, fastcdc's chunker against ferry's (`ferry::chunk::gear`), for the figures in
//! docs/benchmarks.md ("Content-defined chunking"). Chunks `SIZE_MIB` of random bytes (a 64 MiB buffer, cut again
//! and again) and prints the chunk count, a digest of the cuts (equal for both chunkers) and the CPU time.
//!
//! Usage: `cargo run --release --example cdc_bench -- fastcdc|gear|both|none [SIZE_MIB=1024] [AVG=1048576]`
//! (`none` only makes the data: the baseline to subtract from instruction counts). Min and max are avg/4 and
//! avg*4, as ferry cuts. Time is measured by the caller (`perf stat -e task-clock`, `valgrind --tool=callgrind`).

use ferry::chunk::gear::GearChunker;

/// Bytes cut per pass.
const BUFFER: usize = 64 << 20;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: cdc_bench fastcdc|gear|both|none [SIZE_MIB] [AVG]";
    let which = args.next().ok_or(usage)?;
    let size_mib: usize = args.next().map_or(Ok(1024), |s| s.parse())?;
    let avg: u32 = args.next().map_or(Ok(1 << 20), |s| s.parse())?;
    let params = (avg / 4, avg, avg * 4);
    let mut data = vec![0u8; BUFFER];
    blake3::Hasher::new()
        .update(b"cdc_bench")
        .finalize_xof()
        .fill(&mut data);
    let passes = (size_mib << 20).div_ceil(BUFFER);
    let run = |name: &str, cut: &dyn Fn(&[u8]) -> (usize, u64)| {
        let (mut count, mut digest) = (0, 0u64);
        for _ in 0..passes {
            let (n, d) = cut(&data);
            count += n;
            digest = digest.rotate_left(7) ^ d;
        }
        println!("{name}: {count} chunks, cuts digest {digest:016x}");
    };
    if which == "fastcdc" || which == "both" {
        run("fastcdc", &|source| with_fastcdc(source, params));
    }
    if which == "gear" || which == "both" {
        let chunker = GearChunker::new(params.0, params.1, params.2).ok_or("parameters out of bounds")?;
        run("gear", &|source| with_gear(&chunker, source));
    }
    Ok(())
}

/// Chunk count and a digest of the cut offsets, by fastcdc.
#[inline(never)]
fn with_fastcdc(source: &[u8], (min, avg, max): (u32, u32, u32)) -> (usize, u64) {
    summary(fastcdc::v2020::FastCDC::new(source, min, avg, max).map(|c| (c.offset, c.length)))
}

/// Chunk count and a digest of the cut offsets, by ferry's chunker.
#[inline(never)]
fn with_gear(chunker: &GearChunker, source: &[u8]) -> (usize, u64) {
    summary(chunker.chunks(source))
}

fn summary(cuts: impl Iterator<Item = (usize, usize)>) -> (usize, u64) {
    cuts.fold((0, 0), |(n, d), (offset, len)| {
        (n + 1, d.wrapping_mul(31).wrapping_add((offset ^ len) as u64))
    })
}
