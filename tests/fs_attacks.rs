//! A local user who can write inside the server root, and files damaged on the server's disk, against a pulling
//! client written by hand (so the test controls the timing exactly): the server never reads outside the root,
//! never tells a client where its root is, and never sends bytes that do not match their hash.

use std::path::Path;
use std::time::Duration;

use ferry::manifest::Manifest;
use ferry::ranges::IndexRange;
use ferry::wire::{Connection, EntryKind, ErrorCode, Message, Need, Pull, TreeFailure, TreeNeed};
use tokio::net::TcpStream;

use crate::util::*;

/// How long the hand-written client waits for any one frame.
const FRAME_WAIT: Duration = Duration::from_secs(20);

/// Connects, says Hello, and sends a Pull for `path`.
async fn pull_raw(server: &TestServer, path: &str) -> Connection<TcpStream> {
    let mut conn = greeted(server.addr).await;
    let pull = Message::Pull(Pull {
        path: path.into(),
        chunking: Default::default(),
        window: 64 << 20,
        links: Default::default(),
    });
    conn.write_message(&pull).await.unwrap();
    conn
}

/// The next frame (answering keep-alive Pings on the way); `None` at a clean end of stream.
async fn next(conn: &mut Connection<TcpStream>) -> Option<Message> {
    loop {
        let read = tokio::time::timeout(FRAME_WAIT, conn.read_message()).await;
        match read.expect("a frame within the wait").ok()? {
            Some(Message::Ping(nonce)) => conn.write_message(&Message::Pong(nonce)).await.unwrap(),
            other => return other,
        }
    }
}

fn all_chunks(manifest: &Manifest) -> Vec<IndexRange> {
    vec![IndexRange {
        start: 0,
        count: manifest.chunks.len() as u32,
    }]
}

/// Issue 12 items 8 and 14: after the TreeOffer for `pub`, a local user swaps `pub/d` for a symlink to an
/// outside directory holding files of the same names, and removes a large file; the client then asks for every
/// file. Nothing from outside is sent (no FileData, no Offer), each file is reported failed, and no reason names
/// the server's root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_swapped_for_a_symlink_after_the_tree_offer_sends_nothing_from_outside() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let tree = server.root.join("pub");
    std::fs::create_dir_all(tree.join("d")).unwrap();
    std::fs::write(tree.join("d/small.txt"), b"public small file").unwrap();
    write_random(&tree.join("d/big.bin"), 2 * MIB, 81);
    write_random(&tree.join("gone.bin"), 2 * MIB, 82);
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let secret = b"OUTSIDE-THE-ROOT-SECRET ".repeat(4);
    std::fs::write(outside.join("small.txt"), &secret).unwrap();
    std::fs::write(outside.join("big.bin"), secret.repeat(40_000)).unwrap();

    let mut conn = pull_raw(&server, "pub").await;
    let Some(Message::TreeOffer(offer)) = next(&mut conn).await else {
        panic!("expected a TreeOffer");
    };
    let files: Vec<u32> = (0..offer.entries.len() as u32)
        .filter(|&i| matches!(offer.entries[i as usize].kind, EntryKind::File { .. }))
        .collect();
    assert_eq!(files.len(), 3, "{:?}", offer.entries);
    // The swap, with all the time in the world: the client decides when to send TreeNeed.
    std::fs::rename(tree.join("d"), dir.path().join("d-moved")).unwrap();
    std::os::unix::fs::symlink(&outside, tree.join("d")).unwrap();
    std::fs::remove_file(tree.join("gone.bin")).unwrap();
    let need = Message::TreeNeed(TreeNeed {
        entries: files.iter().map(|&start| IndexRange { start, count: 1 }).collect(),
    });
    conn.write_message(&need).await.unwrap();

    let failed: Vec<TreeFailure> = match next(&mut conn).await {
        Some(Message::TreeCommit(commit)) => commit.failed,
        Some(Message::FileData(data)) => panic!(
            "the server sent {} bytes of entry {} (outside the root: {})",
            data.data.len(),
            data.entry,
            data.data.windows(8).any(|w| w == b"OUTSIDE-")
        ),
        Some(Message::Offer(offer)) => panic!("the server offered {} through the swapped directory", offer.path),
        other => panic!("unexpected {other:?}"),
    };
    let mut entries: Vec<u32> = failed.iter().map(|f| f.entry).collect();
    entries.sort_unstable();
    assert_eq!(entries, files, "every file is reported failed: {failed:?}");
    let root = dir.path().display().to_string();
    for failure in &failed {
        assert!(!failure.damaged, "{failure:?}");
        assert!(
            !failure.reason.contains(&root),
            "a reason names the server's root: {failure:?}"
        );
    }
    let symlink_refused = failed
        .iter()
        .filter(|f| f.reason.contains("\"pub/d\" is a symlink"))
        .count();
    assert_eq!(symlink_refused, 2, "{failed:?}");
}

/// Issue 13 item 5, a single file: a committed file rots on the server's disk. The server re-hashes each chunk
/// before it sends it, so every chunk that arrives matches the manifest, and the pull ends with IntegrityFailed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_damaged_on_the_server_is_never_sent() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let src = dir.path().join("ledger.db");
    write_random(&src, 3 * MIB, 83);
    let chunked = ["--chunking", "fixed", "--chunk-size", "256KiB"];
    push(&src, &server.url("ledger.db"), &dir.path().join("state"), &chunked)
        .await
        .assert_ok();
    rot(&server.root.join("ledger.db"), MIB as u64 + 5);

    let mut conn = pull_raw(&server, "ledger.db").await;
    let Some(Message::Offer(offer)) = next(&mut conn).await else {
        panic!("expected an Offer");
    };
    assert!(offer.manifest.chunks.len() > 4);
    let need = Message::Need(Need {
        ranges: all_chunks(&offer.manifest),
    });
    conn.write_message(&need).await.unwrap();
    let mut good = 0;
    let code = loop {
        match next(&mut conn).await {
            Some(Message::Chunk(chunk)) => {
                let entry = &offer.manifest.chunks[chunk.index as usize];
                assert_eq!(
                    blake3::hash(&chunk.data).as_bytes(),
                    &entry.hash,
                    "chunk {} left the server damaged",
                    chunk.index
                );
                good += 1;
            }
            Some(Message::Error(frame)) => break frame.code,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(code, ErrorCode::IntegrityFailed);
    assert!(
        good < offer.manifest.chunks.len(),
        "the damaged chunk was not among those sent"
    );
}

/// Issue 13 item 5, a large file in a tree pull: its damaged chunk is never sent; the file is abandoned and
/// reported `damaged` in TreeCommit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_large_file_of_a_tree_is_abandoned_before_its_bad_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let src = dir.path().join("t");
    std::fs::create_dir(&src).unwrap();
    write_random(&src.join("big.bin"), 3 * MIB, 84);
    let chunked = ["--chunking", "fixed", "--chunk-size", "256KiB"];
    push(&src, &server.url("t"), &dir.path().join("state"), &chunked)
        .await
        .assert_ok();
    rot(&server.root.join("t/big.bin"), 2 * MIB as u64 + 9);

    let mut conn = pull_raw(&server, "t").await;
    let Some(Message::TreeOffer(tree)) = next(&mut conn).await else {
        panic!("expected a TreeOffer");
    };
    let index = tree.entries.iter().position(|e| e.path == "big.bin").unwrap() as u32;
    let need = Message::TreeNeed(TreeNeed {
        entries: vec![IndexRange { start: index, count: 1 }],
    });
    conn.write_message(&need).await.unwrap();
    let Some(Message::Offer(offer)) = next(&mut conn).await else {
        panic!("expected the file's Offer");
    };
    let need = Message::Need(Need {
        ranges: all_chunks(&offer.manifest),
    });
    conn.write_message(&need).await.unwrap();
    loop {
        match next(&mut conn).await {
            Some(Message::Chunk(chunk)) => assert_eq!(
                blake3::hash(&chunk.data).as_bytes(),
                &offer.manifest.chunks[chunk.index as usize].hash,
                "chunk {} left the server damaged",
                chunk.index
            ),
            Some(Message::Abandon(_)) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    conn.write_message(&Message::Abandon(String::new())).await.unwrap();
    let Some(Message::TreeCommit(commit)) = next(&mut conn).await else {
        panic!("expected TreeCommit");
    };
    assert_eq!(commit.failed.len(), 1, "{:?}", commit.failed);
    assert_eq!(commit.failed[0].entry, index);
    assert!(commit.failed[0].damaged, "{:?}", commit.failed);
    assert!(!commit.failed[0].reason.contains(&dir.path().display().to_string()));
}

/// Flips one bit at `offset` and puts the mtime back, so only the content tells.
fn rot(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let mtime = std::fs::metadata(path).unwrap().modified().unwrap();
    let file = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).unwrap();
    file.write_all_at(&[byte[0] ^ 0x10], offset).unwrap();
    drop(file);
    set_mtime(path, mtime);
}
