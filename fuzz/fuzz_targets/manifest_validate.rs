//! `Manifest::validate` on arbitrary manifests (decoded from the fuzzer's bytes as a store record, the same bincode
//! layout as an Offer's): never panics, and whatever it accepts really tiles its file within the limits (checked
//! here independently).
#![no_main]

use ferry::manifest::Manifest;
use ferry::record::decode_record;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(manifest) = decode_record::<Manifest>(data) else {
        return;
    };
    if manifest.validate().is_err() {
        return;
    }
    assert!(manifest.chunking.is_valid());
    assert!(manifest.chunks.len() <= ferry::MAX_MANIFEST_CHUNKS);
    let mut end = 0u64;
    let last = manifest.chunks.len().saturating_sub(1);
    for (i, chunk) in manifest.chunks.iter().enumerate() {
        assert_eq!(chunk.offset, end, "chunk {i} does not follow the previous one");
        assert!(chunk.len >= 1 && chunk.len <= ferry::MAX_CHUNK_SIZE);
        assert!(i == last || chunk.len >= ferry::MIN_CHUNK_SIZE, "a short chunk before the last");
        end += u64::from(chunk.len);
    }
    assert_eq!(end, manifest.size, "the chunks cover the file");
});
