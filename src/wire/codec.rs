//! Pure encoding and decoding over byte buffers; the only module that calls bincode.
//!
//! A frame is a `u32` big-endian body length followed by the bincode body (fixint, little-endian, trailing bytes
//! rejected; proto-spec.md, "Framing"). The length is checked against the limit before a single body byte is
//! buffered, and bincode gets the same limit, so no peer-chosen length ever sizes an allocation.

use bincode::Options;
use thiserror::Error;

use super::message::Message;

/// Bytes in the length prefix.
pub const LEN_PREFIX: usize = 4;

/// Encoding or decoding failed.
#[derive(Debug, Error)]
pub enum CodecError {
    /// The length prefix (or an outgoing body) exceeds the frame limit.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge {
        /// The claimed or actual body length.
        len: u64,
        /// The limit in force.
        max: u64,
    },
    /// The body is not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

fn options(limit: u64) -> impl Options {
    crate::record::layout().reject_trailing_bytes().with_limit(limit)
}

/// Whether `msg`'s frame body is at most `max_frame` bytes, measured without encoding it.
pub fn fits(msg: &Message, max_frame: u32) -> bool {
    options(u64::from(max_frame)).serialized_size(msg).is_ok()
}

/// Appends one frame (prefix + body) for `msg` to `out`.
pub fn encode_frame(msg: &Message, max_frame: u32, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let start = out.len();
    out.extend_from_slice(&[0; LEN_PREFIX]);
    let too_large = |len: u64| CodecError::FrameTooLarge {
        len,
        max: u64::from(max_frame),
    };
    options(u64::from(max_frame))
        .serialize_into(&mut *out, msg)
        .map_err(|_| too_large(0))?;
    let body = out.len() - start - LEN_PREFIX;
    let body = u32::try_from(body).map_err(|_| too_large(body as u64))?;
    out[start..start + LEN_PREFIX].copy_from_slice(&body.to_be_bytes());
    Ok(())
}

/// The `Message::Chunk` variant's index (bincode writes it as a `u32` tag).
const CHUNK_TAG: u32 = 4;

/// Bytes of a `Chunk` frame before its payload: the length prefix, the tag, the index and the payload's `u64`
/// length.
pub const CHUNK_HEADER: usize = LEN_PREFIX + 4 + 4 + 8;

/// Appends the frame prefix and the body up to the payload of a `Chunk{index, data}` whose payload is `len` bytes
/// (tag 4, index, u64 length): followed by the payload, the frame equals [`encode_frame`]'s.
pub fn encode_chunk_header(index: u32, len: usize, max_frame: u32, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let body = 4 + 4 + 8 + len as u64;
    if body > u64::from(max_frame) {
        return Err(CodecError::FrameTooLarge {
            len: body,
            max: u64::from(max_frame),
        });
    }
    out.extend_from_slice(&(body as u32).to_be_bytes());
    out.extend_from_slice(&CHUNK_TAG.to_le_bytes());
    out.extend_from_slice(&index.to_le_bytes());
    out.extend_from_slice(&(len as u64).to_le_bytes());
    Ok(())
}

/// The body length a buffer's prefix announces, once at least [`LEN_PREFIX`] bytes are there; errs if it exceeds
/// `max_frame`.
pub fn frame_len(buf: &[u8], max_frame: u32) -> Result<Option<usize>, CodecError> {
    let Some(prefix) = buf.get(..LEN_PREFIX) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(prefix.try_into().expect("4 bytes"));
    if len > max_frame {
        return Err(CodecError::FrameTooLarge {
            len: u64::from(len),
            max: u64::from(max_frame),
        });
    }
    Ok(Some(len as usize))
}

/// Whether `buf` starts like a TLS record (content type 20..=23, major version 3), which no ferry frame prefix
/// within any frame limit does: a TLS client meeting a plain server, or a plain client meeting a TLS server.
pub fn looks_like_tls(buf: &[u8]) -> bool {
    matches!(buf, [20..=23, 3, ..])
}

/// Decodes the first frame in `buf`. `Ok(None)` means "not enough bytes yet"; on success also returns how many
/// bytes the frame used.
pub fn decode_frame(buf: &[u8], max_frame: u32) -> Result<Option<(Message, usize)>, CodecError> {
    let Some(len) = frame_len(buf, max_frame)? else {
        return Ok(None);
    };
    let Some(body) = buf.get(LEN_PREFIX..LEN_PREFIX + len) else {
        return Ok(None);
    };
    let msg = options(len as u64)
        .deserialize(body)
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    Ok(Some((msg, LEN_PREFIX + len)))
}

/// If `buf` starts with a whole, well-formed `Chunk` frame, its index and payload length: the payload is then
/// `buf[CHUNK_HEADER..CHUNK_HEADER + len]`, exactly what [`decode_frame`] would decode (its length fills the body,
/// so no trailing byte). `None` for anything else, which [`decode_frame`] then decodes or refuses. Lets the
/// connection hand a big payload over in the buffer it was read into instead of copying it out.
pub fn chunk_frame(buf: &[u8], max_frame: u32) -> Result<Option<(u32, usize)>, CodecError> {
    let Some((index, payload)) = chunk_header(buf, max_frame)? else {
        return Ok(None);
    };
    Ok((buf.len() >= CHUNK_HEADER + payload).then_some((index, payload)))
}

/// If `buf` starts with the header of a well-formed `Chunk` frame (its first [`CHUNK_HEADER`] bytes, the payload
/// not needed yet), its index and payload length: the payload is the rest of the body, exactly what
/// [`decode_frame`] would decode once the frame is whole (its length fills the body). `None` for anything else. Lets
/// the connection read a big payload straight into a buffer of its own.
pub fn chunk_header(buf: &[u8], max_frame: u32) -> Result<Option<(u32, usize)>, CodecError> {
    let Some(len) = frame_len(buf, max_frame)? else {
        return Ok(None);
    };
    let Some(header) = buf.get(LEN_PREFIX..CHUNK_HEADER) else {
        return Ok(None);
    };
    let field = |at: usize| -> [u8; 4] { header[at..at + 4].try_into().expect("4 bytes") };
    if len < CHUNK_HEADER - LEN_PREFIX || u32::from_le_bytes(field(0)) != CHUNK_TAG {
        return Ok(None);
    }
    let index = u32::from_le_bytes(field(4));
    let payload = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let fills_body = payload == (len - (CHUNK_HEADER - LEN_PREFIX)) as u64;
    Ok(fills_body.then_some((index, len - (CHUNK_HEADER - LEN_PREFIX))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::manifest_of;
    use crate::ranges::IndexRange;
    use crate::wire::message::*;
    use proptest::prelude::*;

    const MAX: u32 = crate::MAX_FRAME;

    fn round_trip(msg: &Message) {
        let mut buf = Vec::new();
        encode_frame(msg, MAX, &mut buf).unwrap();
        let (back, used) = decode_frame(&buf, MAX).unwrap().unwrap();
        assert_eq!(&back, msg);
        assert_eq!(used, buf.len());
        for cut in 0..buf.len() {
            assert!(
                decode_frame(&buf[..cut], MAX).unwrap().is_none(),
                "prefix {cut} decoded"
            );
        }
    }

    /// `fits` agrees with what `encode_frame` accepts, at the body's exact size and one byte below it.
    #[test]
    fn fits_agrees_with_the_encoding_at_the_limit() {
        let offer = Message::Offer(Offer {
            path: "a/b.img".into(),
            manifest: manifest_of(&[10, 20, 30]),
        });
        let mut buf = Vec::new();
        encode_frame(&offer, MAX, &mut buf).unwrap();
        let body = (buf.len() - LEN_PREFIX) as u32;
        assert!(fits(&offer, body));
        assert!(encode_frame(&offer, body, &mut Vec::new()).is_ok());
        assert!(!fits(&offer, body - 1));
        assert!(encode_frame(&offer, body - 1, &mut Vec::new()).is_err());
    }

    fn hexdump(msg: &Message) -> String {
        let mut buf = Vec::new();
        encode_frame(msg, MAX, &mut buf).unwrap();
        buf.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn every_message_round_trips() {
        let manifest = manifest_of(&[4096, 4096, 5]);
        for msg in [
            Message::Hello(Hello {
                magic: MAGIC,
                min_version: 1,
                max_version: 1,
                agent: "ferry/test".into(),
                client: "alice".into(),
            }),
            Message::Challenge(Challenge { nonce: [7; 32] }),
            Message::Auth(Auth { answer: [9; 32] }),
            Message::Join(Join {
                path: "a/b.iso".into(),
                manifest_id: [5; 32],
            }),
            Message::ListPartials,
            Message::Partials(Partials {
                entries: vec![PartialEntry {
                    path: "in/big.iso".into(),
                    size: 9,
                    received: 4,
                    created: 1,
                    updated: 2,
                }],
                total: 3,
                truncated: true,
            }),
            Message::Welcome(Welcome {
                version: 1,
                agent: "ferry/test".into(),
                max_frame: MAX,
            }),
            Message::Offer(Offer {
                path: "a/b.iso".into(),
                manifest,
            }),
            Message::Need(Need {
                ranges: vec![IndexRange { start: 2, count: 7 }],
            }),
            Message::Chunk(Chunk {
                index: 3,
                data: vec![1, 2, 3],
            }),
            Message::Ack(Ack { ranges: vec![] }),
            Message::Commit,
            Message::Committed(Committed {
                size: 9,
                digest: [7; 32],
                received_bytes: 9,
                rejected_chunks: 1,
                reused_bytes: 4,
                already_present: false,
            }),
            Message::Error(ErrorFrame::new(ErrorCode::Busy, "later")),
            Message::Ping(5),
            Message::Pong(5),
            Message::Pull(Pull {
                path: "backups/host".into(),
                chunking: crate::chunk::ChunkSpec::default(),
                window: 1 << 20,
                links: crate::wire::LinkPolicy::Record,
            }),
            Message::TreeOffer(TreeOffer {
                path: "backups/host".into(),
                entries: vec![
                    TreeEntry {
                        path: "a".into(),
                        kind: EntryKind::Dir {
                            mode: 0o755,
                            mtime: crate::manifest::FileTime { secs: -1, nanos: 5 },
                        },
                    },
                    TreeEntry {
                        path: "a/f".into(),
                        kind: EntryKind::File {
                            size: 3,
                            digest: [1; 32],
                            mtime: crate::manifest::FileTime::default(),
                            mode: 0o600,
                        },
                    },
                    TreeEntry {
                        path: "l".into(),
                        kind: EntryKind::Symlink { target: "a/f".into() },
                    },
                ],
            }),
            Message::TreeAck(TreeAck {
                entries: vec![IndexRange { start: 1, count: 1 }],
                refused: vec![],
            }),
            Message::TreeCommitted(TreeCommitted {
                files_committed: 1,
                files_unchanged: 2,
                missing: vec![IndexRange { start: 0, count: 1 }],
                received_bytes: 3,
                reused_bytes: 4,
            }),
        ] {
            round_trip(&msg);
        }
    }

    /// Golden bytes: these pin the wire format of proto-spec.md. A change here is a protocol version bump.
    #[test]
    fn wire_format_is_pinned() {
        let cases = [
            (Message::Commit, "00000004 06000000"),
            (Message::Ping(1), "0000000c 09000000 0100000000000000"),
            (
                Message::Chunk(Chunk {
                    index: 2,
                    data: vec![0xaa, 0xbb],
                }),
                "00000012 04000000 02000000 0200000000000000 aabb",
            ),
            (
                Message::Need(Need {
                    ranges: vec![IndexRange { start: 1, count: 2 }],
                }),
                "00000014 03000000 0100000000000000 01000000 02000000",
            ),
            (
                Message::Error(ErrorFrame::new(ErrorCode::BadPath, "x")),
                "00000010 08000000 0600 00 0100000000000000 78",
            ),
            (
                Message::TreeCommit(TreeCommit::default()),
                "0000000c 10000000 0000000000000000",
            ),
            (
                Message::TreeNeed(TreeNeed {
                    entries: vec![IndexRange { start: 0, count: 1 }],
                }),
                "00000014 0d000000 0100000000000000 00000000 01000000",
            ),
            (
                Message::FileData(FileData {
                    entry: 1,
                    data: vec![0xcc],
                }),
                "00000011 0e000000 01000000 0100000000000000 cc",
            ),
            (
                Message::Challenge(Challenge { nonce: [0x11; 32] }),
                "00000024 13000000 1111111111111111111111111111111111111111111111111111111111111111",
            ),
            (
                Message::Auth(Auth { answer: [0x22; 32] }),
                "00000024 14000000 2222222222222222222222222222222222222222222222222222222222222222",
            ),
            (Message::ListPartials, "00000004 16000000"),
            (
                Message::Partials(Partials {
                    entries: vec![PartialEntry {
                        path: "a".into(),
                        size: 2,
                        received: 1,
                        created: 3,
                        updated: 4,
                    }],
                    total: 1,
                    truncated: false,
                }),
                "0000003e 17000000 0100000000000000 0100000000000000 61 0200000000000000 0100000000000000 \
                 0300000000000000 0400000000000000 0100000000000000 00",
            ),
            (
                Message::PullExpecting(PullExpecting {
                    pull: Pull {
                        path: "a".into(),
                        chunking: crate::chunk::ChunkSpec {
                            mode: crate::chunk::ChunkingMode::Fixed,
                            size: 4096,
                        },
                        window: 65536,
                        links: crate::wire::LinkPolicy::Skip,
                    },
                    expect: PullKind::Tree,
                }),
                "00000025 18000000 0100000000000000 61 01000000 00100000 0000010000000000 00000000 02000000",
            ),
            (
                Message::Error(ErrorFrame::new(ErrorCode::WrongKind, "x")),
                "00000010 08000000 1c00 00 0100000000000000 78",
            ),
            (
                Message::OfferStart(OfferStart {
                    path: "a".into(),
                    size: 5,
                    chunking: crate::manifest::Chunking::Fixed { size: 4096 },
                    mtime: crate::manifest::FileTime { secs: 1, nanos: 2 },
                    mode: 0o644,
                }),
                "0000002d 19000000 0100000000000000 61 0500000000000000 00000000 00100000 0100000000000000 \
                 02000000 a4010000",
            ),
            (
                Message::ManifestPiece(ManifestPiece {
                    first_index: 1,
                    chunks: vec![crate::manifest::ChunkEntry {
                        offset: 4096,
                        len: 5,
                        hash: [0x33; 32],
                    }],
                }),
                "0000003c 1a000000 01000000 0100000000000000 0010000000000000 05000000 \
                 3333333333333333333333333333333333333333333333333333333333333333",
            ),
            (
                Message::ManifestEnd(ManifestEnd { digest: [0x44; 32] }),
                "00000024 1b000000 4444444444444444444444444444444444444444444444444444444444444444",
            ),
            (
                Message::TreePrune(crate::wire::TreePrune { path: "a".into() }),
                "0000000d 1c000000 0100000000000000 61",
            ),
            (
                Message::TreePruned(crate::wire::TreePruned {
                    removed: vec!["a".into()],
                    total: 1,
                    failed: vec![crate::wire::PruneFailure {
                        path: "b".into(),
                        reason: "c".into(),
                    }],
                }),
                "00000037 1d000000 0100000000000000 0100000000000000 61 0100000000000000 0100000000000000 \
                 0100000000000000 62 0100000000000000 63",
            ),
        ];
        for (msg, golden) in cases {
            assert_eq!(hexdump(&msg), golden.replace(' ', ""), "{msg:?}");
        }
    }

    proptest! {
        #[test]
        fn a_chunk_header_plus_payload_is_the_encoded_chunk_frame(index in any::<u32>(), data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut direct = Vec::new();
            encode_chunk_header(index, data.len(), MAX, &mut direct).unwrap();
            direct.extend_from_slice(&data);
            let mut framed = Vec::new();
            encode_frame(&Message::Chunk(Chunk { index, data }), MAX, &mut framed).unwrap();
            prop_assert_eq!(direct, framed);
        }
    }

    #[test]
    fn oversized_length_is_refused_before_buffering() {
        let buf = (MAX + 1).to_be_bytes();
        assert!(matches!(decode_frame(&buf, MAX), Err(CodecError::FrameTooLarge { .. })));
    }

    #[test]
    fn unknown_error_codes_survive() {
        let frame = ErrorFrame {
            code: ErrorCode::Unknown(999),
            retryable: false,
            message: String::new(),
        };
        round_trip(&Message::Error(frame));
        assert_eq!(u16::from(ErrorCode::Superseded), 15);
        assert_eq!(ErrorCode::from(8), ErrorCode::Busy);
    }

    proptest! {
        #[test]
        fn chunks_and_ranges_round_trip(index in any::<u32>(), data in proptest::collection::vec(any::<u8>(), 0..2048),
                                        start in any::<u32>(), count in any::<u32>()) {
            round_trip(&Message::Chunk(Chunk { index, data }));
            round_trip(&Message::Ack(Ack { ranges: vec![IndexRange { start, count }] }));
        }

        #[test]
        fn agents_round_trip(agent in ".{0,64}", client in ".{0,64}", min in any::<u16>(), max in any::<u16>()) {
            round_trip(&Message::Hello(Hello { magic: MAGIC, min_version: min, max_version: max, agent, client }));
        }
    }
}
