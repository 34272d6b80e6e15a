//! Time-boxed random soaks (tests only): a property run for a wall-clock budget instead of a case count, from a
//! seed printed first so that a failure can be replayed. CI runs them (`.ci/run`, docs/testing.md "Fuzzing") in place of a
//! coverage-guided fuzzer, which needs a nightly toolchain.
//!
//! `FERRY_SOAK_SECS` sets the budget per property (default 10 s); `FERRY_SOAK_SEED` (64 hex digits) replays a
//! printed seed.

use std::time::{Duration, Instant};

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

/// Cases per batch; the budget is checked between batches.
const BATCH: u32 = 512;

/// Runs `test` on values of `strategy` for the budget, panicking with the seed, the batch and the minimal failing
/// value on the first failure. Returns the number of cases run.
pub(crate) fn soak<S: Strategy>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>) -> u64 {
    let secs: u64 = std::env::var("FERRY_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let seed: [u8; 32] = match std::env::var("FERRY_SOAK_SEED") {
        Ok(hex) => parse_seed(&hex).expect("FERRY_SOAK_SEED is 64 hex digits"),
        Err(_) => {
            let mut seed = [0u8; 32];
            crate::random::fill(&mut seed);
            seed
        }
    };
    let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
    eprintln!("soak {name}: {secs} s from seed {hex} (replay: FERRY_SOAK_SEED={hex})");
    let config = Config {
        cases: BATCH,
        failure_persistence: None,
        ..Config::default()
    };
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut cases = 0u64;
    let mut batch = 0u64;
    while Instant::now() < deadline {
        // A runner per batch (one runs its cases once), seeded from the soak's seed and the batch number.
        let batch_seed = blake3::Hasher::new()
            .update(&seed)
            .update(&batch.to_le_bytes())
            .finalize();
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, batch_seed.as_bytes());
        let mut runner = TestRunner::new_with_rng(config.clone(), rng);
        if let Err(failure) = runner.run(&strategy, &test) {
            panic!("soak {name} failed in batch {batch} (seed {hex}): {failure}");
        }
        cases += u64::from(BATCH);
        batch += 1;
    }
    eprintln!("soak {name}: {cases} cases, no failure");
    cases
}

fn parse_seed(hex: &str) -> Option<[u8; 32]> {
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<_>>()?;
    bytes.try_into().ok()
}

#[test]
fn a_printed_seed_parses_back() {
    let seed: [u8; 32] = std::array::from_fn(|i| i as u8 * 7);
    let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(parse_seed(&hex), Some(seed));
    assert_eq!(parse_seed("abc"), None);
}
