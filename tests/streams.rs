//! `--streams N`: several connections share one file's chunks; each chunk crosses once, a stream that breaks
//! makes the attempt retry and resume, and a Join for nothing in progress is refused.

use std::sync::atomic::Ordering;
use std::time::Duration;

use ferry::fault::{FaultProxy, Faults};
use ferry::wire::{Connection, ErrorCode, Join, Message};
use tokio::net::TcpStream;

use crate::util::*;

const MIB: usize = 1 << 20;
const SMALL_CHUNKS: [&str; 4] = ["--chunk-size", "256KiB", "--window", "2MiB"];
/// [`SMALL_CHUNKS`] with fixed chunks, so that no chunk is larger than [`CHUNK`].
const FIXED_SMALL_CHUNKS: [&str; 6] = ["--chunking", "fixed", "--chunk-size", "256KiB", "--window", "2MiB"];
/// The chunk size and window of [`FIXED_SMALL_CHUNKS`].
const CHUNK: u64 = 256 * 1024;
const WINDOW: u64 = 2 * 1024 * 1024;

#[tokio::test]
async fn four_streams_send_every_chunk_once_and_land_intact() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let src = dir.path().join("big.img");
    write_random(&src, 12 * MIB + 123, 1);
    let mut args = SMALL_CHUNKS.to_vec();
    args.extend(["--streams", "4"]);
    let out = push(&src, &server.url("big.img"), &dir.path().join("state"), &args).await;
    out.assert_ok();
    assert_eq!(b3(&server.root.join("big.img")), b3(&src));
    let size = (12 * MIB + 123) as u64;
    assert_eq!(out.u64("bytes_sent"), size, "each chunk crossed once: {}", out.json);
    assert_eq!(out.u64("server_received_bytes"), size, "{}", out.json);
    assert!(out.u64("chunks") > 16, "enough chunks to spread: {}", out.json);

    // Again, unchanged: nothing is needed, so no stream joins, and the push is a no-op.
    let again = push(&src, &server.url("big.img"), &dir.path().join("state"), &args).await;
    again.assert_ok();
    assert_eq!(again.u64("bytes_sent"), 0, "{}", again.json);

    // A copy under another name: every chunk is reused on the server, nothing crosses.
    let copy = push(&src, &server.url("copy.img"), &dir.path().join("state"), &args).await;
    copy.assert_ok();
    assert_eq!(copy.u64("bytes_sent"), 0, "{}", copy.json);
    assert_eq!(b3(&server.root.join("copy.img")), b3(&src));
}

#[tokio::test]
async fn a_broken_stream_fails_the_attempt_and_the_next_one_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let src = dir.path().join("big.img");
    let size = 40 * MIB as u64;
    write_random(&src, size as usize, 2);
    // Connection 1 offers; connection 2, the first extra stream, is cut after 7 MiB (of the ~13 MiB a third of
    // the file is); the rest are clean.
    let cut_at = 7 * MIB as u64;
    let plan = vec![Faults::NONE, Faults::cut(cut_at)];
    let proxy = FaultProxy::start("127.0.0.1:0", server.addr, plan).await.unwrap();
    let url = format!("ferry://{}/big.img", proxy.addr());
    let streams = 3;
    let mut args = FIXED_SMALL_CHUNKS.to_vec();
    args.extend(["--streams", "3"]);
    let out = push(&src, &url, &dir.path().join("state"), &args).await;
    out.assert_ok();
    assert_eq!(b3(&server.root.join("big.img")), b3(&src));
    assert_eq!(
        out.u64("attempts"),
        2,
        "the cut stream failed the first attempt: {}",
        out.json
    );
    assert_eq!(proxy.stats().cuts.load(Ordering::Relaxed), 1);
    // Resumed, not restarted: at most what was in flight on the three streams, window + chunk each (6.75 MiB), is
    // sent again. A restart sends again at least what crossed the cut stream, 7 MiB, and fails this.
    let bound = size + streams * (WINDOW + CHUNK);
    assert!(bound < size + cut_at, "the bound tells a restart apart");
    assert!(
        out.u64("bytes_sent") <= bound,
        "{} > {bound}: {}",
        out.u64("bytes_sent"),
        out.json
    );
}

/// Sends `Join{path, id}` on a fresh connection and returns the answer.
async fn join(server: &TestServer, path: &str, manifest_id: [u8; 32]) -> (Connection<TcpStream>, Message) {
    let mut conn = greeted(server.addr).await;
    let join = Message::Join(Join {
        path: path.into(),
        manifest_id,
    });
    conn.write_message(&join).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(20), conn.read_message()).await {
        Ok(Ok(Some(answer))) => (conn, answer),
        other => panic!("no answer to Join: {other:?}"),
    }
}

fn error_of(answer: &Message) -> (ErrorCode, bool) {
    match answer {
        Message::Error(frame) => (frame.code, frame.retryable),
        other => panic!("expected an Error frame, got {other:?}"),
    }
}

/// proto-spec.md §4 "Streams": a Join for a path with no open transfer, or with another manifest id than the open
/// transfer's, is `UnknownTransfer` (22, not retryable); the right id joins while the round is open (16 times; the
/// 17th is `TooManyConnections`) and is `Busy` (retryable) once the transfer is between rounds.
#[tokio::test]
async fn a_join_with_an_unknown_manifest_id_is_told_so_and_a_known_one_between_rounds_is_busy() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let (_, answer) = join(&server, "nothing.img", [3; 32]).await;
    assert_eq!(
        error_of(&answer),
        (ErrorCode::UnknownTransfer, false),
        "nothing open at the path"
    );

    let data = vec![7u8; 10_000];
    let manifest = ferry::manifest::Manifest {
        size: data.len() as u64,
        digest: *blake3::hash(&data).as_bytes(),
        chunking: ferry::manifest::Chunking::Fixed { size: 16384 },
        mtime: ferry::manifest::FileTime::default(),
        mode: 0o644,
        chunks: vec![ferry::manifest::ChunkEntry {
            offset: 0,
            len: data.len() as u32,
            hash: *blake3::hash(&data).as_bytes(),
        }],
    };
    let id = manifest.id();
    let mut offering = greeted(server.addr).await;
    let offer = Message::Offer(ferry::wire::Offer {
        path: "open.img".into(),
        manifest,
    });
    offering.write_message(&offer).await.unwrap();
    assert!(matches!(offering.read_message().await.unwrap(), Some(Message::Need(_))));

    let mut wrong = id;
    wrong[0] ^= 1;
    let (_, answer) = join(&server, "open.img", wrong).await;
    assert_eq!(
        error_of(&answer),
        (ErrorCode::UnknownTransfer, false),
        "another manifest id"
    );
    let mut joined = Vec::new();
    for n in 1..=16 {
        let (conn, answer) = join(&server, "open.img", id).await;
        assert!(
            matches!(&answer, Message::Need(n) if n.ranges.is_empty()),
            "Join {n}: {answer:?}"
        );
        joined.push(conn);
    }
    let (_, answer) = join(&server, "open.img", id).await;
    assert_eq!(
        error_of(&answer),
        (ErrorCode::TooManyConnections, true),
        "the 17th Join"
    );

    // The offering connection goes away: the transfer stays open (its record) but takes no chunks until it is
    // offered again. Until the server has seen the joined connections close, a Join may still be refused as the
    // 17th (`TooManyConnections`) or join the round (`Need`): both mean "not yet".
    drop(offering);
    drop(joined);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (_, answer) = join(&server, "open.img", id).await;
        if let Message::Error(frame) = &answer {
            if frame.code == ErrorCode::TooManyConnections {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the joined connections were never let go"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            assert_eq!(
                (frame.code, frame.retryable),
                (ErrorCode::Busy, true),
                "{}",
                frame.message
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the round never closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
