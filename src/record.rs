//! How ferry's state records are encoded at rest (sled values and keys, object-store records): bincode with
//! fixed-width little-endian integers, the same layout as frame bodies (proto-spec.md §2), so one description
//! serves both. This module owns only the encoding; the wire codec (`wire::codec`) frames messages with it and
//! the stores keep records with it, and neither reaches into the other.

use bincode::Options;
use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

/// A stored record could not be decoded: damaged, truncated, or written by another layout.
#[derive(Debug, Error)]
#[error("malformed record: {0}")]
pub struct RecordError(String);

/// The one bincode layout of frame bodies and records: fixed-width little-endian integers. Decoders add their
/// own input limit and refuse trailing bytes.
pub(crate) fn layout() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
}

/// Encodes a record.
pub fn encode_record<T: Serialize>(record: &T) -> Vec<u8> {
    layout().serialize(record).expect("in-memory records always serialize")
}

/// The length [`encode_record`] would produce, computed without encoding (a limit is checked before a large record
/// is copied).
pub fn encoded_record_len<T: Serialize>(record: &T) -> u64 {
    layout()
        .serialized_size(record)
        .expect("in-memory records always serialize")
}

/// Decodes a record; trailing bytes are refused, and nothing is allocated beyond what `bytes` can hold.
pub fn decode_record<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, RecordError> {
    layout()
        .reject_trailing_bytes()
        .with_limit(bytes.len() as u64)
        .deserialize(bytes)
        .map_err(|e| RecordError(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_trailing_or_missing_bytes_are_refused() {
        let record = (7u32, String::from("a/b"), vec![1u64, 2, 3]);
        let bytes = encode_record(&record);
        assert_eq!(bytes.len() as u64, encoded_record_len(&record));
        assert_eq!(decode_record::<(u32, String, Vec<u64>)>(&bytes).unwrap(), record);
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode_record::<(u32, String, Vec<u64>)>(&longer).is_err());
        assert!(decode_record::<(u32, String, Vec<u64>)>(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn a_length_beyond_the_record_is_refused_without_allocating_it() {
        // A Vec<u64> claiming u64::MAX / 2 elements in 8 bytes of length and nothing else.
        let bytes = (u64::MAX / 2).to_le_bytes();
        assert!(decode_record::<Vec<u64>>(&bytes).is_err());
    }
}
