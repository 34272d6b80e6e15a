//! Structured fuzzing of the frame decoder (tests only): valid frames of every message, with a valid length prefix
//! and tag, whose bodies are then damaged (bits flipped, cut short, extended, inner lengths and counts overwritten,
//! the tag swapped for another valid one). Random bytes almost never get past the length prefix; these reach the
//! body decoder every time. The decoder must give a clean error or a message that re-encodes to the very same
//! frame, never panic, and never size an allocation from a length it has not checked (a counting allocator
//! measures the largest allocation made while decoding).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use proptest::prelude::*;

use super::codec::{decode_frame, encode_frame, CodecError, LEN_PREFIX};
use super::message::*;
use crate::chunk::{ChunkSpec, ChunkingMode};
use crate::manifest::{ChunkEntry, Chunking, FileTime, Manifest};
use crate::ranges::IndexRange;
use crate::wire::LinkPolicy;

const MAX: u32 = crate::MAX_FRAME;

/// The system allocator, recording the largest single allocation of a thread while that thread asks it to.
struct Counting;

thread_local! {
    /// `Some(largest so far)` while the current thread measures, `None` otherwise.
    static LARGEST: Cell<Option<usize>> = const { Cell::new(None) };
    /// `Some(bytes so far)` while the current thread measures, `None` otherwise.
    static TOTAL: Cell<Option<usize>> = const { Cell::new(None) };
}

fn record(size: usize) {
    // Const-initialised Cells without a destructor: reading them never allocates, so this cannot recurse.
    let _ = LARGEST.try_with(|largest| {
        if let Some(max) = largest.get() {
            largest.set(Some(max.max(size)));
        }
    });
    let _ = TOTAL.try_with(|total| {
        if let Some(sum) = total.get() {
            total.set(Some(sum + size));
        }
    });
}

/// Runs `f` and returns its result with the bytes it allocated on this thread (each allocation and each
/// reallocation's new size counted).
pub(super) fn allocated_bytes<T>(f: impl FnOnce() -> T) -> (T, usize) {
    TOTAL.with(|t| t.set(Some(0)));
    let out = f();
    let total = TOTAL.with(|t| t.replace(None)).unwrap_or(0);
    (out, total)
}

// SAFETY: every call is forwarded unchanged to `System`; `record` only reads and writes a thread-local Cell.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: the caller's contract is System's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result with the largest single allocation it made on this thread.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(Some(0)));
    let out = f();
    let largest = LARGEST.with(|l| l.replace(None)).unwrap_or(0);
    (out, largest)
}

/// Largest allocation decoding a frame of `len` bytes may make: serde pre-allocates at most 1 MiB for a sequence
/// whatever its claimed length, and a decoded value may take a few times its encoded size (a 20-byte symlink
/// entry is an 80-byte `TreeEntry`, and a growing Vec doubles).
fn allocation_bound(len: usize) -> usize {
    (1 << 20) + 16 * len + 4096
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![".{0,12}", "[a-z/.]{0,8}"]
}

fn hash() -> impl Strategy<Value = [u8; 32]> {
    any::<[u8; 32]>()
}

fn ranges() -> impl Strategy<Value = Vec<IndexRange>> {
    proptest::collection::vec(
        (any::<u32>(), any::<u32>()).prop_map(|(start, count)| IndexRange { start, count }),
        0..4,
    )
}

fn time() -> impl Strategy<Value = FileTime> {
    (any::<i64>(), any::<u32>()).prop_map(|(secs, nanos)| FileTime { secs, nanos })
}

fn chunk_entry() -> impl Strategy<Value = ChunkEntry> {
    (any::<u64>(), any::<u32>(), hash()).prop_map(|(offset, len, hash)| ChunkEntry { offset, len, hash })
}

fn chunking() -> impl Strategy<Value = Chunking> {
    prop_oneof![
        any::<u32>().prop_map(|size| Chunking::Fixed { size }),
        (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(min, avg, max)| Chunking::FastCdc { min, avg, max }),
    ]
}

fn manifest() -> impl Strategy<Value = Manifest> {
    let entry = chunk_entry();
    (
        any::<u64>(),
        hash(),
        chunking(),
        time(),
        any::<u32>(),
        proptest::collection::vec(entry, 0..4),
    )
        .prop_map(|(size, digest, chunking, mtime, mode, chunks)| Manifest {
            size,
            digest,
            chunking,
            mtime,
            mode,
            chunks,
        })
}

fn pull() -> impl Strategy<Value = Pull> {
    let mode = prop_oneof![Just(ChunkingMode::Cdc), Just(ChunkingMode::Fixed)];
    let links = prop_oneof![Just(LinkPolicy::Skip), Just(LinkPolicy::Record)];
    (text(), mode, any::<u32>(), any::<u64>(), links).prop_map(|(path, mode, size, window, links)| Pull {
        path,
        chunking: ChunkSpec { mode, size },
        window,
        links,
    })
}

fn tree_entry() -> impl Strategy<Value = TreeEntry> {
    let kind = prop_oneof![
        (any::<u64>(), hash(), time(), any::<u32>()).prop_map(|(size, digest, mtime, mode)| EntryKind::File {
            size,
            digest,
            mtime,
            mode
        }),
        (any::<u32>(), time()).prop_map(|(mode, mtime)| EntryKind::Dir { mode, mtime }),
        text().prop_map(|target| EntryKind::Symlink { target }),
    ];
    (text(), kind).prop_map(|(path, kind)| TreeEntry { path, kind })
}

/// Any message of the protocol, every variant, with arbitrary field values and short collections.
pub(crate) fn arb_message() -> impl Strategy<Value = Message> {
    let bytes = || proptest::collection::vec(any::<u8>(), 0..64);
    prop_oneof![
        (any::<[u8; 8]>(), any::<u16>(), any::<u16>(), text(), text()).prop_map(
            |(magic, min_version, max_version, agent, client)| Message::Hello(Hello {
                magic,
                min_version,
                max_version,
                agent,
                client
            })
        ),
        (any::<u16>(), text(), any::<u32>()).prop_map(|(version, agent, max_frame)| Message::Welcome(Welcome {
            version,
            agent,
            max_frame
        })),
        (text(), manifest()).prop_map(|(path, manifest)| Message::Offer(Offer { path, manifest })),
        ranges().prop_map(|ranges| Message::Need(Need { ranges })),
        (any::<u32>(), bytes()).prop_map(|(index, data)| Message::Chunk(Chunk { index, data })),
        ranges().prop_map(|ranges| Message::Ack(Ack { ranges })),
        Just(Message::Commit),
        (
            any::<u64>(),
            hash(),
            any::<u64>(),
            any::<u32>(),
            any::<u64>(),
            any::<bool>()
        )
            .prop_map(
                |(size, digest, received_bytes, rejected_chunks, reused_bytes, already_present)| {
                    Message::Committed(Committed {
                        size,
                        digest,
                        received_bytes,
                        rejected_chunks,
                        reused_bytes,
                        already_present,
                    })
                }
            ),
        (any::<u16>(), any::<bool>(), text()).prop_map(|(code, retryable, message)| Message::Error(ErrorFrame {
            code: ErrorCode::from(code),
            retryable,
            message
        })),
        any::<u64>().prop_map(Message::Ping),
        any::<u64>().prop_map(Message::Pong),
        pull().prop_map(Message::Pull),
        (text(), proptest::collection::vec(tree_entry(), 0..4))
            .prop_map(|(path, entries)| Message::TreeOffer(TreeOffer { path, entries })),
        ranges().prop_map(|entries| Message::TreeNeed(TreeNeed { entries })),
        (any::<u32>(), bytes()).prop_map(|(entry, data)| Message::FileData(FileData { entry, data })),
        (ranges(), ranges()).prop_map(|(entries, refused)| Message::TreeAck(TreeAck { entries, refused })),
        proptest::collection::vec(
            (any::<u32>(), any::<bool>(), text()).prop_map(|(entry, damaged, reason)| TreeFailure {
                entry,
                damaged,
                reason
            }),
            0..3
        )
        .prop_map(|failed| Message::TreeCommit(TreeCommit { failed })),
        (any::<u64>(), any::<u64>(), ranges(), any::<u64>(), any::<u64>()).prop_map(
            |(files_committed, files_unchanged, missing, received_bytes, reused_bytes)| {
                Message::TreeCommitted(TreeCommitted {
                    files_committed,
                    files_unchanged,
                    missing,
                    received_bytes,
                    reused_bytes,
                })
            }
        ),
        text().prop_map(Message::Abandon),
        hash().prop_map(|nonce| Message::Challenge(Challenge { nonce })),
        hash().prop_map(|answer| Message::Auth(Auth { answer })),
        (text(), hash()).prop_map(|(path, manifest_id)| Message::Join(Join { path, manifest_id })),
        Just(Message::ListPartials),
        (
            proptest::collection::vec(
                (text(), any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
                    |(path, size, received, created, updated)| PartialEntry {
                        path,
                        size,
                        received,
                        created,
                        updated
                    }
                ),
                0..3
            ),
            any::<u64>(),
            any::<bool>()
        )
            .prop_map(|(entries, total, truncated)| Message::Partials(Partials {
                entries,
                total,
                truncated
            })),
        (
            pull(),
            prop_oneof![Just(PullKind::Any), Just(PullKind::File), Just(PullKind::Tree)]
        )
            .prop_map(|(pull, expect)| Message::PullExpecting(PullExpecting { pull, expect })),
        (text(), any::<u64>(), chunking(), time(), any::<u32>()).prop_map(|(path, size, chunking, mtime, mode)| {
            Message::OfferStart(OfferStart {
                path,
                size,
                chunking,
                mtime,
                mode,
            })
        }),
        (any::<u32>(), proptest::collection::vec(chunk_entry(), 0..4))
            .prop_map(|(first_index, chunks)| Message::ManifestPiece(ManifestPiece { first_index, chunks })),
        hash().prop_map(|digest| Message::ManifestEnd(ManifestEnd { digest })),
        text().prop_map(|path| Message::TreePrune(TreePrune { path })),
        (
            proptest::collection::vec(text(), 0..3),
            any::<u64>(),
            proptest::collection::vec(
                (text(), text()).prop_map(|(path, reason)| PruneFailure { path, reason }),
                0..3
            )
        )
            .prop_map(|(removed, total, failed)| Message::TreePruned(TreePruned { removed, total, failed })),
    ]
}

/// Highest valid tag (the last variant of [`Message`]).
const LAST_TAG: u32 = 29;

/// One change to a frame's body (after the prefix); positions are taken modulo the body's length.
#[derive(Clone, Debug)]
pub(crate) enum BodyMutation {
    /// XOR one bit of a body byte after the tag.
    FlipBit(prop::sample::Index, u8),
    /// Drop the body's last bytes (keeping the tag).
    Truncate(prop::sample::Index),
    /// Append bytes.
    Extend(Vec<u8>),
    /// Overwrite 8 bytes after the tag with a length or count a hostile peer would pick (a Vec, String or byte
    /// length lands on such a field, as do offsets and sizes).
    Length8(prop::sample::Index, u64),
    /// Overwrite 4 bytes after the tag (indices, counts, enum variants).
    Length4(prop::sample::Index, u32),
    /// Replace the tag by another valid one, keeping the body.
    Retag(u32),
}

pub(crate) fn arb_mutation() -> impl Strategy<Value = BodyMutation> {
    let index = any::<prop::sample::Index>();
    let long = prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(u64::from(u32::MAX)),
        Just(1 << 40),
        Just(u64::from(MAX)),
        Just(u64::from(MAX) + 1),
        0u64..300,
    ];
    let short = prop_oneof![Just(0u32), Just(u32::MAX), Just(MAX), 0u32..300];
    prop_oneof![
        4 => (index.clone(), 0u8..8).prop_map(|(i, bit)| BodyMutation::FlipBit(i, bit)),
        1 => index.clone().prop_map(BodyMutation::Truncate),
        1 => proptest::collection::vec(any::<u8>(), 1..16).prop_map(BodyMutation::Extend),
        3 => (index.clone(), long).prop_map(|(i, v)| BodyMutation::Length8(i, v)),
        2 => (index, short).prop_map(|(i, v)| BodyMutation::Length4(i, v)),
        1 => (0..=LAST_TAG).prop_map(BodyMutation::Retag),
    ]
}

/// Applies `mutation` to `body` (tag included) and keeps the tag a valid one.
pub(crate) fn mutate(body: &mut Vec<u8>, mutation: &BodyMutation) {
    const TAG: usize = 4;
    let after_tag = body.len() - TAG;
    let write = |body: &mut Vec<u8>, at: &prop::sample::Index, bytes: &[u8]| {
        if after_tag >= bytes.len() {
            let at = TAG + at.index(after_tag - bytes.len() + 1);
            body[at..at + bytes.len()].copy_from_slice(bytes);
        }
    };
    match mutation {
        BodyMutation::FlipBit(at, bit) if after_tag > 0 => body[TAG + at.index(after_tag)] ^= 1 << bit,
        BodyMutation::FlipBit(..) => {}
        BodyMutation::Truncate(at) => body.truncate(TAG + at.index(after_tag + 1)),
        BodyMutation::Extend(more) => body.extend_from_slice(more),
        BodyMutation::Length8(at, value) => write(body, at, &value.to_le_bytes()),
        BodyMutation::Length4(at, value) => write(body, at, &value.to_le_bytes()),
        BodyMutation::Retag(tag) => body[..TAG].copy_from_slice(&tag.to_le_bytes()),
    }
}

/// `msg`'s frame with `mutations` applied to its body, the length prefix set to the new body length.
pub(crate) fn damaged_frame(msg: &Message, mutations: &[BodyMutation]) -> Vec<u8> {
    let mut frame = Vec::new();
    encode_frame(msg, MAX, &mut frame).unwrap();
    let mut body = frame.split_off(LEN_PREFIX);
    for mutation in mutations {
        mutate(&mut body, mutation);
    }
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

/// Decodes `frame` followed by one more frame, and checks the outcome: a clean `Malformed`, or a message that used
/// exactly `frame` and re-encodes to it byte for byte, with every allocation bounded by the frame's size.
pub(crate) fn check_decoder(frame: &[u8]) -> Result<(), TestCaseError> {
    let mut input = frame.to_vec();
    encode_frame(&Message::Commit, MAX, &mut input).unwrap();
    let (result, largest) = largest_allocation(|| decode_frame(&input, MAX));
    prop_assert!(
        largest <= allocation_bound(frame.len()),
        "decoding a {}-byte frame allocated {} bytes at once",
        frame.len(),
        largest
    );
    match result {
        Ok(Some((msg, used))) => {
            prop_assert_eq!(used, frame.len(), "the frame's own length was used");
            let mut again = Vec::new();
            encode_frame(&msg, MAX, &mut again).unwrap();
            prop_assert_eq!(&again[..], frame, "{:?} re-encodes differently", msg);
        }
        Ok(None) => prop_assert!(false, "a whole frame was taken for an incomplete one"),
        Err(CodecError::Malformed(_)) => {}
        Err(e @ CodecError::FrameTooLarge { .. }) => prop_assert!(false, "a valid prefix was refused: {}", e),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    /// Every message, undamaged, decodes to itself through the same checks.
    #[test]
    fn every_generated_message_decodes_to_itself(msg in arb_message()) {
        let frame = damaged_frame(&msg, &[]);
        let (back, used) = decode_frame(&frame, MAX).unwrap().unwrap();
        prop_assert_eq!(used, frame.len());
        prop_assert_eq!(back, msg);
    }

    /// Valid frames with damaged bodies: a clean error or a consistent message, bounded allocations, no panic.
    #[test]
    fn damaged_bodies_of_valid_frames_decode_cleanly(
        msg in arb_message(),
        mutations in proptest::collection::vec(arb_mutation(), 1..4),
    ) {
        check_decoder(&damaged_frame(&msg, &mutations))?;
    }

    /// Arbitrary bytes (mostly an oversized or incomplete frame): whatever decodes re-encodes to the same bytes.
    #[test]
    fn arbitrary_bytes_decode_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        match decode_frame(&bytes, MAX) {
            Ok(Some((msg, used))) => {
                let mut again = Vec::new();
                encode_frame(&msg, MAX, &mut again).unwrap();
                prop_assert_eq!(&again[..], &bytes[..used]);
            }
            Ok(None) => prop_assert!(bytes.len() < LEN_PREFIX
                || u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize > bytes.len() - LEN_PREFIX),
            Err(_) => {}
        }
    }
}

/// The damaged-body property for a time budget (`.ci/run`, docs/testing.md "Fuzzing").
#[test]
#[ignore = "a time-boxed soak; .ci/run runs it"]
fn soak_frame_decoder() {
    let strategy = (arb_message(), proptest::collection::vec(arb_mutation(), 1..4));
    let cases = crate::soak::soak("frame decoder", strategy, |(msg, mutations)| {
        check_decoder(&damaged_frame(&msg, &mutations))
    });
    assert!(cases > 0);
}

/// A Vec or byte length claimed far beyond the frame is refused without an allocation of that size, for each
/// message with a length-prefixed field right after its tag.
#[test]
fn claimed_lengths_beyond_the_frame_are_never_allocated() {
    let samples = [
        Message::Need(Need { ranges: vec![] }),
        Message::Ack(Ack { ranges: vec![] }),
        Message::Abandon(String::new()),
        Message::TreeNeed(TreeNeed { entries: vec![] }),
        Message::TreeOffer(TreeOffer {
            path: String::new(),
            entries: vec![],
        }),
        Message::Partials(Partials::default()),
    ];
    for msg in samples {
        for claim in [u64::from(u32::MAX), 1 << 40, u64::MAX, u64::from(MAX)] {
            let mut frame = damaged_frame(&msg, &[]);
            frame[LEN_PREFIX + 4..LEN_PREFIX + 12].copy_from_slice(&claim.to_le_bytes());
            check_decoder(&frame).unwrap_or_else(|e| panic!("{msg:?} claiming {claim}: {e}"));
        }
    }
    let mut chunk = damaged_frame(&Message::Chunk(Chunk { index: 0, data: vec![] }), &[]);
    chunk[LEN_PREFIX + 8..LEN_PREFIX + 16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    check_decoder(&chunk).unwrap();
}

/// The damaged frames reach the body decoder both ways: over a fixed-seed run, many decode to a message and many
/// are refused as malformed (random bytes, by contrast, almost all stop at the length prefix).
#[test]
fn damaged_frames_reach_both_outcomes_of_the_body_decoder() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = (arb_message(), proptest::collection::vec(arb_mutation(), 1..4));
    let (mut decoded, mut malformed) = (0, 0);
    for _ in 0..2000 {
        let (msg, mutations) = strategy.new_tree(&mut runner).unwrap().current();
        let frame = damaged_frame(&msg, &mutations);
        check_decoder(&frame).unwrap();
        match decode_frame(&frame, MAX) {
            Ok(Some(_)) => decoded += 1,
            Err(CodecError::Malformed(_)) => malformed += 1,
            other => panic!("{other:?}"),
        }
    }
    assert!(
        decoded > 200 && malformed > 200,
        "decoded {decoded}, malformed {malformed}"
    );
}
