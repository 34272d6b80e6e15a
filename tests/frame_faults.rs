//! Flips beyond chunk payload: the fault proxy damages one frame's length prefix, its tag, a Chunk's index, a
//! Need's ranges or an Ack's ranges mid-transfer, in either direction. The push notices (a decode error, a range
//! outside the manifest, a chunk that fails verification, a chunk never asked for), reconnects where the session
//! cannot go on, resumes, and lands verified, re-sending at most what one cut may cost: a window plus a chunk.

use std::sync::atomic::Ordering;

use ferry::fault::{FaultProxy, Faults, FramePart};

use crate::util::*;

const CHUNK: u64 = 64 * KIB as u64;
const WINDOW: u64 = MIB as u64;
const SMALL: [&str; 6] = ["--chunking", "fixed", "--chunk-size", "64KiB", "--window", "1MiB"];
/// 65 chunks: the first Need is one range whose count is 65 (0x41), so flipping its low bit asks for 64.
const CHUNKS: u64 = 65;
const SIZE: u64 = CHUNKS * CHUNK;

/// Message tags (proto-spec.md §2).
const NEED: u32 = 3;
const CHUNK_TAG: u32 = 4;
const ACK: u32 = 5;

/// Pushes a `SIZE`-byte file through a proxy whose first connection carries `fault`, as a whole offer (its manifest
/// cached by an earlier push of the same file to another server, so the first Need answers the whole manifest: a
/// streamed offer's Needs answer pieces, proto-spec.md §4); checks that the push landed
/// verified, that the fault was applied once, and that what was re-sent stays within one cut's cost (window +
/// chunk, derived as the cut tests derive it), with every chunk counted once as received. Returns the summary.
async fn push_through(fault: Faults, seed: u64) -> PushOutcome {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let src = dir.path().join("data.bin");
    write_random(&src, SIZE as usize, seed);
    let state = dir.path().join("state");
    let elsewhere = TestServer::start(&dir.path().join("elsewhere"));
    push(&src, &format!("ferry://{}/data.bin", elsewhere.addr), &state, &SMALL)
        .await
        .assert_ok();
    let proxy = FaultProxy::start("127.0.0.1:0", server.addr, vec![fault])
        .await
        .unwrap();
    let url = format!("ferry://{}/data.bin", proxy.addr());
    let out = push(&src, &url, &state, &SMALL).await;
    out.assert_ok();
    assert!(out.json["manifest_cached"] == true, "a whole offer: {}", out.json);
    eprintln!("{fault:?}: {}", out.json);
    assert_eq!(
        proxy.stats().flips.load(Ordering::Relaxed),
        1,
        "the frame was found and flipped"
    );
    assert_eq!(b3(&server.root.join("data.bin")), b3(&src));
    let sent = out.u64("bytes_sent");
    assert!(
        (SIZE..=SIZE + WINDOW + CHUNK).contains(&sent),
        "sent {sent} bytes for {SIZE}: more than one window and a chunk again"
    );
    assert_eq!(
        out.u64("server_received_bytes") + out.u64("bytes_reused"),
        SIZE,
        "{}",
        out.json
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_length_prefix_is_a_decode_error_and_the_push_resumes_on_a_new_connection() {
    let out = push_through(Faults::flip_frame(CHUNK_TAG, 9, FramePart::LengthPrefix, 0x01), 61).await;
    assert_eq!(
        out.u64("attempts"),
        2,
        "the damaged frame ended the connection: {}",
        out.json
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_tag_is_a_decode_error_and_the_push_resumes_on_a_new_connection() {
    // Chunk (4) becomes Ack (5): its index and length are read as a range count far beyond the frame.
    let out = push_through(Faults::flip_frame(CHUNK_TAG, 9, FramePart::Tag, 0x01), 62).await;
    assert_eq!(out.u64("attempts"), 2, "{}", out.json);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_under_a_flipped_index_is_never_written_and_the_real_one_arrives() {
    // Chunk 9's bytes arrive as chunk 8's, which the receiver already holds: a duplicate, acknowledged again and
    // never written. Chunk 9 never arrives and its Ack never comes, but the sender does not wait for it: Commit
    // follows its last chunk (proto-spec §4 "When Commit goes"), the receiver answers it with a Need for chunk 9,
    // and the second commit round completes on the same connection (no timeout, chunk 9 sent twice).
    let out = push_through(Faults::flip_frame(CHUNK_TAG, 9, FramePart::Field(0), 0x01), 63).await;
    assert_eq!(out.u64("attempts"), 1, "{}", out.json);
    assert_eq!(out.u64("chunks_sent"), out.u64("chunks") + 1, "{}", out.json);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_need_asking_for_one_chunk_fewer_is_completed_by_the_next_commit_round() {
    // The receiver's Need [0, 65) arrives as [0, 64): the sender sends 64 chunks and commits, the receiver answers
    // the Commit with a Need for the last chunk, and nothing is sent twice.
    let out = push_through(Faults::flip_frame(NEED, 0, FramePart::Field(12), 0x01).downstream(), 64).await;
    assert_eq!(out.u64("attempts"), 1, "{}", out.json);
    assert_eq!(out.u64("bytes_sent"), SIZE, "{}", out.json);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_need_reaching_beyond_the_manifest_ends_the_connection_and_the_push_resumes() {
    // [0, 65) arrives as [1, 66): beyond the manifest's 65 chunks, which the sender refuses.
    let out = push_through(Faults::flip_frame(NEED, 0, FramePart::Field(8), 0x01).downstream(), 65).await;
    assert_eq!(out.u64("attempts"), 2, "{}", out.json);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_naming_other_chunks_does_not_hold_up_the_commit() {
    // The third Ack's first range starts one chunk off. The sender does not check an Ack against the chunks in
    // flight, and one chunk's Ack never comes; it does not wait for it either: Commit follows its last chunk
    // (proto-spec §4 "When Commit goes") and the receiver, which holds every chunk, commits. One connection, each
    // chunk sent once.
    let out = push_through(Faults::flip_frame(ACK, 2, FramePart::Field(8), 0x01).downstream(), 66).await;
    assert_eq!(out.u64("attempts"), 1, "{}", out.json);
    assert_eq!(out.u64("bytes_sent"), SIZE, "{}", out.json);
}
