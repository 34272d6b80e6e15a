//! What a namespace may keep open on a server (proto-spec.md §5, §10, README "Security"): a cap on open transfers
//! and on the bytes their manifests take, a minimum chunk length so a manifest costs about 1 % of its file, and
//! quota reservations counted one offer after another. Offers come over the raw protocol, as an attacker sends
//! them: an Offer, then nothing.

use std::time::Duration;

use ferry::manifest::{ChunkEntry, Chunking, FileTime, Manifest};
use ferry::wire::{Connection, ErrorCode, ErrorFrame, Hello, Message, Offer, MAGIC};
use tokio::net::TcpStream;

use crate::util::*;

/// A connection past the handshake.
async fn connect(server: &TestServer) -> Connection<TcpStream> {
    let stream = TcpStream::connect(server.addr).await.unwrap();
    let mut conn = Connection::new(stream, ferry::MAX_FRAME);
    conn.write_message(&Message::Hello(Hello {
        magic: MAGIC,
        min_version: ferry::MIN_PROTOCOL_VERSION,
        max_version: ferry::PROTOCOL_VERSION,
        agent: "limits-test".into(),
        client: String::new(),
    }))
    .await
    .unwrap();
    assert!(matches!(conn.read_message().await.unwrap(), Some(Message::Welcome(_))));
    conn
}

/// Offers `manifest` at `path` on a fresh connection and returns the answer (a Need, or an Error); the
/// connection is then dropped without a byte of data, as a flood would.
async fn offer(server: &TestServer, path: &str, manifest: Manifest) -> Message {
    let mut conn = connect(server).await;
    conn.write_message(&Message::Offer(Offer {
        path: path.into(),
        manifest,
    }))
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(60), conn.read_message())
        .await
        .expect("the server answers an offer")
        .unwrap()
        .expect("an answer, not a close")
}

/// A manifest of `count` chunks of `len` bytes (dummy hashes: no data is ever sent).
fn manifest(count: u32, len: u32, seed: u8) -> Manifest {
    let chunks = (0..count)
        .map(|i| ChunkEntry {
            offset: u64::from(i) * u64::from(len),
            len,
            hash: [seed; 32],
        })
        .collect();
    Manifest {
        size: u64::from(count) * u64::from(len),
        digest: [seed; 32],
        chunking: Chunking::Fixed { size: 4096.max(len) },
        mtime: FileTime::default(),
        mode: 0o644,
        chunks,
    }
}

fn refusal(answer: Message) -> ErrorFrame {
    match answer {
        Message::Error(frame) => frame,
        other => panic!("expected a refusal, got {}", other.name()),
    }
}

fn is_need(answer: &Message) -> bool {
    matches!(answer, Message::Need(_))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offers_beyond_the_open_transfer_cap_are_refused_with_their_own_code() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(&dir.path().join("root"), &["--max-open-transfers", "3"]);
    for i in 0..3 {
        let answer = offer(&server, &format!("flood/p{i}"), manifest(8, 4096, i)).await;
        assert!(is_need(&answer), "offer {i} is admitted: {}", answer.name());
    }
    let refused = refusal(offer(&server, "flood/p3", manifest(8, 4096, 3)).await);
    assert_eq!(refused.code, ErrorCode::TooManyTransfers);
    assert_eq!(u16::from(refused.code), 23, "code 23 on the wire (proto-spec.md §9)");
    assert!(!refused.retryable, "{refused:?}");
    assert!(refused.message.contains("3 open transfers"), "{}", refused.message);
    // Another manifest for a path already open replaces that transfer: not one more.
    assert!(is_need(&offer(&server, "flood/p0", manifest(9, 4096, 7)).await));

    // What a client sees: ferry push of a new file is rejected (exit 4) with the reason; one to an open path
    // (a resume) still goes through.
    let state = dir.path().join("state");
    let file = dir.path().join("f.bin");
    write_random(&file, 100 * KIB, 3);
    let out = push(&file, &server.url("flood/new.bin"), &state, &[]).await;
    assert_eq!(out.code, 4, "{}", out.json);
    assert!(
        out.json["error"].as_str().unwrap().contains("open transfers"),
        "{}",
        out.json
    );
    push(&file, &server.url("flood/p1"), &state, &[]).await.assert_ok();
    assert_eq!(b3(&server.root.join("flood/p1")), b3(&file));
    // Committing freed a place.
    push(&file, &server.url("flood/new.bin"), &state, &[]).await.assert_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_beyond_the_stored_manifest_budget_or_in_tiny_chunks_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(
        &dir.path().join("root"),
        &["--max-manifest-bytes", "1MiB", "--max-file-size", "100MiB"],
    );
    // 20,000 chunks: about 880 KB of manifest for an 80 MiB file.
    assert!(is_need(&offer(&server, "a", manifest(20_000, 4096, 1)).await));
    let refused = refusal(offer(&server, "b", manifest(20_000, 4096, 2)).await);
    assert_eq!(refused.code, ErrorCode::TooManyTransfers);
    assert!(refused.message.contains("manifests"), "{}", refused.message);
    // A small one still fits beside it.
    assert!(is_need(&offer(&server, "c", manifest(10, 4096, 3)).await));

    // A large file cut into 1-byte chunks (100,000 chunks, 4.4 MB of manifest for 100 KB) is refused outright,
    // and so is one short chunk in the middle; only the last chunk may be short.
    let tiny = refusal(offer(&server, "tiny", manifest(100_000, 1, 4)).await);
    assert_eq!(tiny.code, ErrorCode::BadManifest);
    assert!(tiny.message.contains("at least 4096 bytes"), "{}", tiny.message);
    let mut middle = manifest(3, 4096, 5);
    middle.chunks[1].len = 4095;
    middle.chunks[2].offset -= 1;
    middle.size -= 1;
    assert_eq!(
        refusal(offer(&server, "middle", middle).await).code,
        ErrorCode::BadManifest
    );
    let mut last = manifest(3, 4096, 6);
    last.chunks[2].len = 1;
    last.size -= 4095;
    assert!(
        is_need(&offer(&server, "last", last).await),
        "a short last chunk is fine"
    );

    // The chunking bounds of proto-spec.md §5, as the server applies them.
    let chunked = |min, avg, max| Manifest {
        chunking: Chunking::FastCdc { min, avg, max },
        ..manifest(1, 4096, 7)
    };
    assert!(is_need(&offer(&server, "cdc-ok", chunked(4096, 4096, 4096)).await));
    for (min, avg, max) in [(4095, 8192, 32768), (2048, 8192, 32768), (64, 256, 1024)] {
        let refused = refusal(offer(&server, "cdc-bad", chunked(min, avg, max)).await);
        assert_eq!(refused.code, ErrorCode::BadManifest, "{min}/{avg}/{max}");
    }
    // A file over --max-file-size: BadManifest, the one error for it (§5), before any other limit is looked at.
    let too_big = refusal(offer(&server, "big", manifest(30_000, 4096, 8)).await);
    assert_eq!(too_big.code, ErrorCode::BadManifest);
    assert!(!too_big.retryable);
    assert!(
        too_big.message.contains("larger than this receiver accepts"),
        "{}",
        too_big.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_offers_cannot_all_take_the_same_free_quota() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ferry.toml");
    let secret = "07".repeat(32);
    std::fs::write(
        &config,
        format!(
            "[[client]]\nid = \"alice\"\nsecret = \"{secret}\"\nnamespace = \"alice\"\npermissions = [\"push\"]\n\
             quota = \"10MiB\"\n"
        ),
    )
    .unwrap();
    // All 40 connections come from 127.0.0.1: let them all be in their handshake at once (proto-spec.md §3).
    let server = TestServer::start_with(
        &dir.path().join("root"),
        &["--config", config.to_str().unwrap(), "--max-preauth-per-address", "64"],
    );
    let token = ferry::auth::Token::from_parts("alice", &secret).unwrap();
    // 40 offers of 5 MiB at once: the namespace has room for one (5 MiB plus its manifest, twice, is over 10 MiB).
    let offers = (0..40u8).map(|i| {
        let (addr, token) = (server.addr, token.clone());
        tokio::spawn(async move {
            let stream = TcpStream::connect(addr).await.unwrap();
            let mut conn = Connection::new(stream, ferry::MAX_FRAME);
            ferry::transfer::handshake::client_hello(&mut conn, Duration::from_secs(30), Some(&token), None)
                .await
                .unwrap();
            let manifest = manifest(5 * 256, 4096, i);
            conn.write_message(&Message::Offer(Offer {
                path: format!("p{i}"),
                manifest,
            }))
            .await
            .unwrap();
            let answer = tokio::time::timeout(Duration::from_secs(60), conn.read_message()).await;
            let answer = answer.expect("answered").unwrap().expect("an answer");
            // Hold the connection until every offer was answered, as a real flood would.
            (answer, conn)
        })
    });
    let mut answers = Vec::new();
    for handle in offers.collect::<Vec<_>>() {
        answers.push(handle.await.unwrap());
    }
    let admitted = answers.iter().filter(|(a, _)| is_need(a)).count();
    let over_quota = answers
        .iter()
        .filter(|(a, _)| matches!(a, Message::Error(f) if f.code == ErrorCode::QuotaExceeded))
        .count();
    assert_eq!((admitted, over_quota), (1, 39), "one admitted, the others over quota");
}

/// Every entry of the root (files, directories, symlinks), the private `.ferry/` left out.
fn count_entries(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name() != ".ferry")
        .map(|e| {
            let is_dir = e.file_type().unwrap().is_dir();
            1 + if is_dir { count_entries(&e.path()) } else { 0 }
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trees_cannot_create_more_entries_than_the_namespace_and_tree_budgets() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(
        &dir.path().join("root"),
        &["--max-namespace-entries", "50", "--max-tree-entries", "100"],
    );
    let state = dir.path().join("state");
    // 40 directories with an empty file each: 80 entries and no bytes, which a byte quota never saw.
    let tree = dir.path().join("t");
    for i in 0..40 {
        std::fs::create_dir_all(tree.join(format!("d{i:02}"))).unwrap();
        std::fs::write(tree.join(format!("d{i:02}/f")), b"").unwrap();
    }
    let out = push(&tree, &server.url("t"), &state, &[]).await;
    assert_eq!(out.code, 4, "{}", out.json);
    assert!(out.u64("files_missing") > 0, "{}", out.json);
    let created = count_entries(&server.root);
    assert!(created <= 50, "{created} entries created, the budget is 50");
    assert!(created >= 45, "the budget was used, not refused wholesale: {created}");
    // Pushing it again creates nothing more: what exists costs nothing, the rest is still over budget.
    let again = push(&tree, &server.url("t"), &state, &[]).await;
    assert_eq!(again.code, 4, "{}", again.json);
    assert_eq!(count_entries(&server.root), created);
    // A tree of more entries than one tree may have is refused whole.
    let wide = dir.path().join("wide");
    std::fs::create_dir(&wide).unwrap();
    for i in 0..101 {
        std::fs::write(wide.join(format!("f{i}")), b"").unwrap();
    }
    let out = push(&wide, &server.url("wide"), &state, &[]).await;
    assert_eq!(out.code, 4, "{}", out.json);
    assert!(
        out.json["error"].as_str().unwrap().contains("the limit is 100"),
        "{}",
        out.json
    );
    assert!(!server.root.join("wide").exists());
}

/// The `.part` files in the server's partial directory.
fn partials(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(root.join(".ferry/partial"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "part"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_file_committed_over_an_open_transfer_leaves_no_partial_behind() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    // Upload most of a file to x/p and never commit it.
    let data: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 251) as u8).collect();
    let chunks: Vec<ChunkEntry> = data
        .chunks(4096)
        .enumerate()
        .map(|(i, bytes)| ChunkEntry {
            offset: i as u64 * 4096,
            len: 4096,
            hash: *blake3::hash(bytes).as_bytes(),
        })
        .collect();
    let manifest = Manifest {
        size: data.len() as u64,
        digest: *blake3::hash(&data).as_bytes(),
        chunking: Chunking::Fixed { size: 4096 },
        mtime: FileTime::default(),
        mode: 0o644,
        chunks,
    };
    let mut conn = connect(&server).await;
    conn.write_message(&Message::Offer(Offer {
        path: "x/p".into(),
        manifest,
    }))
    .await
    .unwrap();
    assert!(is_need(&conn.read_message().await.unwrap().unwrap()));
    for (index, bytes) in data.chunks(4096).enumerate().take(2) {
        let chunk = ferry::wire::Chunk {
            index: index as u32,
            data: bytes.to_vec(),
        };
        conn.write_message(&Message::Chunk(chunk)).await.unwrap();
    }
    let mut acked = 0;
    while acked < 2 {
        match tokio::time::timeout(Duration::from_secs(20), conn.read_message()).await {
            Ok(Ok(Some(Message::Ack(ack)))) => acked += ack.ranges.iter().map(|r| r.count).sum::<u32>(),
            other => panic!("expected Acks, got {other:?}"),
        }
    }
    drop(conn);
    assert_eq!(partials(&server.root).len(), 1, "the open transfer's partial");
    // Now a tree commits a small file at that very path.
    let tree = dir.path().join("x");
    std::fs::create_dir(&tree).unwrap();
    std::fs::write(tree.join("p"), b"1").unwrap();
    push(&tree, &server.url("x"), &dir.path().join("state"), &[])
        .await
        .assert_ok();
    assert_eq!(std::fs::read(server.root.join("x/p")).unwrap(), b"1");
    assert!(
        partials(&server.root).is_empty(),
        "the replaced transfer's partial is removed, not left uncounted"
    );
    // Nor is it still listed as open.
    let mut conn = connect(&server).await;
    conn.write_message(&Message::ListPartials).await.unwrap();
    match conn.read_message().await.unwrap() {
        Some(Message::Partials(listed)) => assert_eq!(listed.total, 0, "{listed:?}"),
        other => panic!("expected Partials, got {other:?}"),
    }
}
