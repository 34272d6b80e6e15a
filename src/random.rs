//! Randomness from the operating system (getrandom): token secrets and challenge nonces, the jitter of retry
//! backoff, and unique names for temporaries. There is no user-space generator to seed or to get wrong.

/// Fills `buf` with bytes from the operating system's generator.
///
/// Panics only if the kernel offers no random source at all (Linux before 3.17 without `/dev/urandom`), where no
/// secret or nonce could be made safely; rand's `OsRng`, which this replaces, did the same.
pub fn fill(buf: &mut [u8]) {
    if let Err(e) = getrandom::fill(buf) {
        panic!("the operating system's random source failed: {e}");
    }
}

/// A random `u64` (unique temporary names).
pub fn u64() -> u64 {
    let mut bytes = [0u8; 8];
    fill(&mut bytes);
    u64::from_le_bytes(bytes)
}

/// A random factor in `[low, high]` with 53 bits of resolution (backoff jitter).
pub fn unit_between(low: f64, high: f64) -> f64 {
    let fraction = (u64() >> 11) as f64 / ((1u64 << 53) - 1) as f64;
    low + (high - low) * fraction
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factors_stay_in_their_interval_and_vary() {
        let draws: Vec<f64> = (0..1000).map(|_| unit_between(0.5, 1.0)).collect();
        assert!(draws.iter().all(|d| (0.5..=1.0).contains(d)), "{draws:?}");
        // 1000 draws from 2^53 values: all alike would mean a constant, not a generator.
        assert!(draws.iter().any(|d| *d != draws[0]));
        assert!(draws.iter().any(|d| *d < 0.75) && draws.iter().any(|d| *d > 0.75));
    }

    #[test]
    fn fills_whole_buffers() {
        let (mut a, mut b) = ([0u8; 32], [0u8; 32]);
        fill(&mut a);
        fill(&mut b);
        assert_ne!(a, b);
        assert_ne!(a, [0u8; 32]);
    }
}
