//! The frame decoder on arbitrary bytes: never panics, never allocates from an unchecked length, and whatever it
//! accepts encodes back to the same frame.
#![no_main]

use ferry::wire::codec::{decode_frame, encode_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((msg, used))) = decode_frame(data, ferry::MAX_FRAME) {
        let mut again = Vec::new();
        encode_frame(&msg, ferry::MAX_FRAME, &mut again).expect("a decoded message encodes");
        assert_eq!(again, data[..used], "decode then encode is the identity");
    }
});
