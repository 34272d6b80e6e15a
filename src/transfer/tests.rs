//! Both roles driven over an in-memory pipe: no sockets, no processes.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::claims::Claims;
use super::receiver::{receive, ReceiverContext};
use super::recv;
use super::sender::{send, Rehash, SendOptions, SendStats, Source};
use crate::chunk::{build_manifest, ChunkSpec, ChunkingMode};

fn fixed(size: u32) -> ChunkSpec {
    ChunkSpec {
        mode: ChunkingMode::Fixed,
        size,
    }
}
use crate::ranges::IndexRange;
use crate::store::{ReceiverStore, Store};
use crate::wire::{Chunk, Connection, Message, Need, Offer};
use crate::{MAX_FRAME, MIN_CHUNK_SIZE};

struct Fixture {
    dir: tempfile::TempDir,
    ctx: ReceiverContext,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let partial_dir = root.join(".ferry/partial");
    std::fs::create_dir_all(&partial_dir).unwrap();
    let store = Store::open(&dir.path().join("state")).unwrap();
    let ctx = ReceiverContext {
        volume: crate::storage::LocalVolume::shared(root.clone(), partial_dir.clone()),
        trees: crate::storage::LocalVolume::shared_tree(root.clone(), partial_dir.clone()),
        root,
        partial_dir,
        store: ReceiverStore::open(&store).unwrap(),
        claims: Claims::default(),
        stats: Arc::default(),
        idle_timeout: Duration::from_secs(10),
        sync_batch: 16 * 1024,
        queue_budget: Arc::new(tokio::sync::Semaphore::new(32 * 1024)),
        max_file_size: u64::MAX,
        max_manifest_chunks: crate::MAX_MANIFEST_CHUNKS,
        quota: None,
        limits: Default::default(),
        admission: Default::default(),
        joins: Default::default(),
        policy: crate::transfer::receiver::ReceiverPolicy::SERVER,
    };
    Fixture { dir, ctx }
}

fn source(dir: &std::path::Path, data: &[u8]) -> Source {
    let path = dir.join("source.bin");
    std::fs::write(&path, data).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let manifest = build_manifest(&file, &path, fixed(MIN_CHUNK_SIZE)).unwrap();
    Source {
        file: Arc::new(file),
        manifest: Arc::new(manifest),
        rehash: Rehash::AfterRejection,
    }
}

/// The receiver role on one end of a pipe: waits for an Offer and serves it.
fn spawn_receiver<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static>(
    fx: &Fixture,
    stream: S,
) -> tokio::task::JoinHandle<Result<crate::wire::Committed, super::TransferError>> {
    let ctx = fx.ctx.clone();
    tokio::spawn(async move {
        let mut conn = Connection::new(stream, MAX_FRAME);
        let Message::Offer(offer) = recv(&mut conn, Duration::from_secs(5), "test").await? else {
            panic!("expected an Offer")
        };
        let path = crate::path::RemotePath::parse(&offer.path).expect("test paths are valid");
        receive(&mut conn, &ctx, path, offer.manifest, &CancellationToken::new()).await
    })
}

/// Runs one offer through both roles; returns the receiver's Committed and the sender's counters.
async fn transfer(fx: &Fixture, src: &Source, path: &str) -> (crate::wire::Committed, SendStats) {
    let (a, b) = tokio::io::duplex(256 * 1024);
    let receiver = spawn_receiver(fx, b);
    let mut conn = Connection::new(a, MAX_FRAME);
    let mut stats = SendStats::default();
    let committed = send(&mut conn, path, src, &SendOptions::default(), &mut stats, &mut |_| {})
        .await
        .unwrap();
    assert_eq!(receiver.await.unwrap().unwrap(), committed);
    (committed, stats)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_roles_complete_a_transfer_then_recognise_the_same_file() {
    let fx = fixture();
    let chunk = MIN_CHUNK_SIZE as usize;
    for (i, size) in [0, 1, chunk - 1, chunk, chunk + 1, 9 * chunk + 100]
        .into_iter()
        .enumerate()
    {
        let data: Vec<u8> = (0..size).map(|b| ((b * 7 + i) % 251) as u8).collect(); // no two chunks alike
        let src = source(fx.dir.path(), &data);
        let path = format!("dir/file-{size}");
        let (committed, stats) = transfer(&fx, &src, &path).await;
        assert_eq!(committed.digest, *blake3::hash(&data).as_bytes());
        assert_eq!(stats.bytes_sent, size as u64);
        assert_eq!(std::fs::read(fx.ctx.root.join(&path)).unwrap(), data);

        let (again, stats) = transfer(&fx, &src, &path).await;
        assert!(again.already_present, "an unchanged file is recognised");
        assert_eq!(stats.bytes_sent, 0);
    }
}

/// proto-spec.md §4 "Sender": a pushing client sends a chunk unhashed the first time (the receiver verifies it);
/// bytes that changed behind an unchanged size and mtime are rejected, and the resend, read again and hashed, finds
/// the change: `SourceChanged` after one rejected chunk, and nothing unverified written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_chunk_is_hashed_only_when_the_receiver_rejected_it() {
    let (a, b) = tokio::io::duplex(256 * 1024);
    a_changed_chunk_is_rejected_once(Connection::new(a, MAX_FRAME), b).await;
}

/// The same over plain TCP with zero copy: the first sends go from the file to the socket with `sendfile`, and the
/// changed chunk's resend is read and hashed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_sent_from_the_file_is_hashed_when_the_receiver_rejected_it() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (client, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
    let mut conn = Connection::new(client.unwrap(), MAX_FRAME);
    conn.allow_zero_copy(|socket| Some(socket));
    assert!(conn.zero_copy());
    a_changed_chunk_is_rejected_once(conn, accepted.unwrap().0).await;
}

/// Pushes a source of four chunks over `conn` to a receiver on `peer`, one chunk changed behind the manifest's size
/// and mtime: `SourceChanged`, one rejection, nothing of the changed chunk written.
async fn a_changed_chunk_is_rejected_once<S, P>(mut conn: Connection<S>, peer: P)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    P: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use std::os::unix::fs::FileExt;
    let fx = fixture();
    let chunk = MIN_CHUNK_SIZE as usize;
    let data: Vec<u8> = (0..4 * chunk).map(|i| (i % 251) as u8).collect();
    let src = source(fx.dir.path(), &data);
    let path = fx.dir.path().join("source.bin");
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    let file = std::fs::File::options().write(true).open(&path).unwrap();
    file.write_all_at(&[!data[2 * chunk + 5]], (2 * chunk + 5) as u64)
        .unwrap();
    file.set_modified(mtime).unwrap();
    drop(file);

    let receiver = spawn_receiver(&fx, peer);
    let mut stats = SendStats::default();
    let opts = SendOptions::default();
    // Bounded so that a resend sent unhashed (rejected again and again) fails the test instead of hanging it.
    let sent = tokio::time::timeout(
        Duration::from_secs(120),
        send(&mut conn, "moved", &src, &opts, &mut stats, &mut |_| {}),
    )
    .await
    .expect("the sender stops by itself");
    assert!(matches!(sent, Err(super::TransferError::SourceChanged(_))), "{sent:?}");
    assert_eq!(
        stats.chunks_rejected, 1,
        "the changed chunk went out once, unhashed: {stats:?}"
    );
    drop(conn);
    assert!(receiver.await.unwrap().is_err(), "nothing was committed");
    assert!(!fx.ctx.root.join("moved").exists());
    let on_disk = the_partial(&fx);
    let changed = on_disk.get(2 * chunk..3 * chunk).unwrap_or_default();
    assert!(
        changed.iter().all(|&b| b == 0),
        "nothing of the changed chunk was written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_chunk_is_asked_for_again_and_never_written() {
    let fx = fixture();
    let data: Vec<u8> = (0..3 * MIN_CHUNK_SIZE as usize).map(|i| (i % 251) as u8).collect();
    let src = source(fx.dir.path(), &data);
    let (a, b) = tokio::io::duplex(256 * 1024);
    let receiver = spawn_receiver(&fx, b);
    let mut conn = Connection::new(a, MAX_FRAME);
    let offer = Offer {
        path: "x".into(),
        manifest: (*src.manifest).clone(),
    };
    conn.write_message(&Message::Offer(offer)).await.unwrap();
    let all = IndexRange { start: 0, count: 3 };
    assert_eq!(
        recv(&mut conn, Duration::from_secs(5), "t").await.unwrap(),
        Message::Need(Need { ranges: vec![all] })
    );
    let mut bad = data[..MIN_CHUNK_SIZE as usize].to_vec();
    bad[17] ^= 1;
    conn.write_message(&Message::Chunk(Chunk { index: 1, data: bad }))
        .await
        .unwrap();
    let again = IndexRange { start: 1, count: 1 };
    assert_eq!(
        recv(&mut conn, Duration::from_secs(5), "t").await.unwrap(),
        Message::Need(Need { ranges: vec![again] })
    );
    drop(conn);
    assert!(receiver.await.unwrap().is_err(), "the receiver saw the connection end");
    let on_disk = the_partial(&fx);
    assert!(
        on_disk.iter().all(|&b| b == 0),
        "nothing of the corrupt chunk reached the partial file"
    );
}

/// proto-spec.md §4 "Reuse": of the missing chunks with one hash only the first is asked for; its copies are
/// written from its verified bytes (not before: a corrupt first copy fills nothing), never acknowledged, and counted
/// as reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_chunks_are_asked_for_once_and_filled_from_the_first_copy() {
    let fx = fixture();
    let chunk = MIN_CHUNK_SIZE as usize;
    let block: Vec<u8> = (0..chunk).map(|i| (i % 253) as u8).collect();
    let mut data = block.repeat(3);
    data.extend(std::iter::repeat_n(9u8, chunk));
    let src = source(fx.dir.path(), &data);
    let (a, b) = tokio::io::duplex(256 * 1024);
    let receiver = spawn_receiver(&fx, b);
    let mut conn = Connection::new(a, MAX_FRAME);
    let offer = Offer {
        path: "rep".into(),
        manifest: (*src.manifest).clone(),
    };
    conn.write_message(&Message::Offer(offer)).await.unwrap();
    let first_and_last = vec![IndexRange { start: 0, count: 1 }, IndexRange { start: 3, count: 1 }];
    assert_eq!(
        recv(&mut conn, Duration::from_secs(5), "t").await.unwrap(),
        Message::Need(Need { ranges: first_and_last })
    );
    let mut bad = block.clone();
    bad[3] ^= 1;
    conn.write_message(&Message::Chunk(Chunk { index: 0, data: bad }))
        .await
        .unwrap();
    let again = vec![IndexRange { start: 0, count: 1 }];
    assert_eq!(
        recv(&mut conn, Duration::from_secs(5), "t").await.unwrap(),
        Message::Need(Need { ranges: again })
    );
    for (index, bytes) in [(0, block.clone()), (3, data[3 * chunk..].to_vec())] {
        conn.write_message(&Message::Chunk(Chunk { index, data: bytes }))
            .await
            .unwrap();
    }
    let mut acked = Vec::new();
    while acked.len() < 2 {
        match recv(&mut conn, Duration::from_secs(5), "t").await.unwrap() {
            Message::Ack(ack) => acked.extend(ack.ranges.iter().flat_map(|r| r.start..r.start + r.count)),
            other => panic!("expected an Ack, got {other:?}"),
        }
    }
    assert_eq!(acked, [0, 3], "only chunks that came over the wire are acknowledged");
    conn.write_message(&Message::Commit).await.unwrap();
    let committed = receiver.await.unwrap().unwrap();
    assert_eq!(committed.reused_bytes, 2 * chunk as u64);
    assert_eq!(committed.rejected_chunks, 1);
    assert_eq!(std::fs::read(fx.ctx.root.join("rep")).unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_of_the_wrong_length_ends_the_session() {
    let fx = fixture();
    let src = source(fx.dir.path(), &vec![1u8; 2 * MIN_CHUNK_SIZE as usize]);
    let (a, b) = tokio::io::duplex(256 * 1024);
    let receiver = spawn_receiver(&fx, b);
    let mut conn = Connection::new(a, MAX_FRAME);
    let offer = Offer {
        path: "y".into(),
        manifest: (*src.manifest).clone(),
    };
    conn.write_message(&Message::Offer(offer)).await.unwrap();
    assert!(matches!(
        recv(&mut conn, Duration::from_secs(5), "t").await.unwrap(),
        Message::Need(_)
    ));
    let oversized = Chunk {
        index: 0,
        data: vec![1u8; MIN_CHUNK_SIZE as usize * 2],
    };
    conn.write_message(&Message::Chunk(oversized)).await.unwrap();
    let err = receiver.await.unwrap().unwrap_err();
    assert_eq!(err.code(), crate::wire::ErrorCode::UnexpectedMessage, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_never_commits_cannot_keep_the_sender_looping() {
    let fx = fixture();
    let src = source(fx.dir.path(), b"twelve bytes");
    let (a, b) = tokio::io::duplex(256 * 1024);
    let broken_receiver = tokio::spawn(async move {
        let mut conn = Connection::new(b, MAX_FRAME);
        let mut commits = 0;
        while let Ok(Some(msg)) = conn.read_message().await {
            if matches!(msg, Message::Commit) {
                commits += 1;
            }
            if matches!(msg, Message::Offer(_) | Message::Commit) {
                let _ = conn.write_message(&Message::Need(Need { ranges: vec![] })).await;
            }
        }
        commits
    });
    let mut conn = Connection::new(a, MAX_FRAME);
    let result = send(
        &mut conn,
        "z",
        &src,
        &SendOptions::default(),
        &mut SendStats::default(),
        &mut |_| {},
    )
    .await;
    assert!(matches!(result, Err(super::TransferError::Integrity(_))), "{result:?}");
    drop(conn);
    assert_eq!(
        broken_receiver.await.unwrap(),
        8,
        "bounded by the spec's 8 commit rounds"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_need_naming_four_billion_chunks_is_refused_before_anything_walks_it() {
    let fx = fixture();
    let src = source(fx.dir.path(), b"twelve bytes");
    let (a, b) = tokio::io::duplex(256 * 1024);
    let hostile_receiver = tokio::spawn(async move {
        let mut conn = Connection::new(b, MAX_FRAME);
        if let Ok(Some(Message::Offer(_))) = conn.read_message().await {
            let huge = IndexRange {
                start: 0,
                count: u32::MAX,
            };
            let _ = conn
                .write_message(&Message::Need(Need {
                    ranges: vec![huge; 1000],
                }))
                .await;
        }
        conn
    });
    // On its own task, so that if the sender did walk the ranges (a synchronous loop of hours), the timeout below
    // still fires on the other worker and fails the test.
    let sending = tokio::spawn(async move {
        let mut conn = Connection::new(a, MAX_FRAME);
        let (opts, mut stats) = (SendOptions::default(), SendStats::default());
        send(&mut conn, "z", &src, &opts, &mut stats, &mut |_| {}).await
    });
    let result = tokio::time::timeout(Duration::from_secs(20), sending)
        .await
        .expect("refused at once")
        .unwrap();
    assert!(
        matches!(result, Err(super::TransferError::Unexpected { got: "Need", .. })),
        "{result:?}"
    );
    drop(hostile_receiver.await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sender_stops_at_the_window_until_acks_arrive() {
    let fx = fixture();
    let chunk = MIN_CHUNK_SIZE as usize;
    let src = source(fx.dir.path(), &vec![3u8; 20 * chunk]);
    let (a, b) = tokio::io::duplex(4 * 1024 * 1024);
    let silent_receiver = tokio::spawn(async move {
        let mut conn = Connection::new(b, MAX_FRAME);
        let mut chunks = 0;
        while let Ok(Some(msg)) = conn.read_message().await {
            match msg {
                Message::Offer(_) => {
                    let all = IndexRange { start: 0, count: 20 };
                    conn.write_message(&Message::Need(Need { ranges: vec![all] }))
                        .await
                        .unwrap();
                }
                Message::Chunk(_) => chunks += 1,
                _ => {}
            }
        }
        chunks
    });
    let opts = SendOptions {
        window: 4 * chunk as u64,
        read_ahead: 4,
        io_timeout: Duration::from_millis(300),
        ..SendOptions::default()
    };
    let mut conn = Connection::new(a, MAX_FRAME);
    let result = send(&mut conn, "w", &src, &opts, &mut SendStats::default(), &mut |_| {}).await;
    assert!(matches!(result, Err(super::TransferError::Timeout(..))), "{result:?}");
    drop(conn);
    assert_eq!(
        silent_receiver.await.unwrap(),
        4,
        "exactly one window of chunks went out unacknowledged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_only_ever_names_chunks_already_recorded_in_the_store() {
    let fx = fixture();
    let chunk = MIN_CHUNK_SIZE as usize;
    let data: Vec<u8> = (0..12 * chunk).map(|i| (i % 253) as u8).collect();
    let src = source(fx.dir.path(), &data);
    let (a, b) = tokio::io::duplex(4 * 1024 * 1024);
    let receiver = spawn_receiver(&fx, b);
    let mut conn = Connection::new(a, MAX_FRAME);
    let offer = Offer {
        path: "acked".into(),
        manifest: (*src.manifest).clone(),
    };
    conn.write_message(&Message::Offer(offer)).await.unwrap();
    assert!(matches!(
        recv(&mut conn, Duration::from_secs(5), "t").await.unwrap(),
        Message::Need(_)
    ));
    for (index, entry) in src.manifest.chunks.iter().enumerate() {
        let data = data[entry.offset as usize..][..entry.len as usize].to_vec();
        conn.write_message(&Message::Chunk(Chunk {
            index: index as u32,
            data,
        }))
        .await
        .unwrap();
    }
    let mut acked = 0;
    while acked < 12 {
        let Message::Ack(ack) = recv(&mut conn, Duration::from_secs(5), "t").await.unwrap() else {
            panic!("expected an Ack")
        };
        let progress = fx
            .ctx
            .store
            .progress("acked")
            .unwrap()
            .expect("progress recorded before the Ack");
        let recorded = crate::ranges::ChunkSet::from_bytes(12, &progress.received).unwrap();
        for index in ack.ranges.iter().flat_map(IndexRange::indices) {
            assert!(
                recorded.contains(index),
                "chunk {index} was acknowledged before it was recorded"
            );
            acked += 1;
        }
    }
    drop(conn);
    let _ = receiver.await;
}

/// Walks `src` as a tree sender would, with a sender store of its own.
fn walk(fx: &Fixture, src: &std::path::Path) -> (crate::store::SenderStore, crate::tree::LocalTree) {
    let store = crate::store::SenderStore::open(&Store::open(&fx.dir.path().join("sender")).unwrap()).unwrap();
    let tree = crate::tree::scan(src, crate::tree::LinkPolicy::Skip, &store, ChunkSpec::default()).unwrap();
    (store, tree)
}

/// Offers `tree` for the directory `t` and sends it over `conn`.
async fn send_tree_over<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    tree: &crate::tree::LocalTree,
    store: &crate::store::SenderStore,
) -> Result<super::tree_sender::TreeSent, super::TransferError> {
    let source = super::tree_sender::TreeSource {
        tree,
        store,
        spec: ChunkSpec::default(),
        committed: None,
    };
    let mut stats = SendStats::default();
    super::tree_sender::send_tree(conn, "t", &source, &SendOptions::default(), &mut stats, &mut |_| {}).await
}

/// Runs a walked tree through both tree roles over a pipe.
async fn transfer_tree(
    fx: &Fixture,
    tree: &crate::tree::LocalTree,
    sender_store: &crate::store::SenderStore,
) -> super::tree_sender::TreeSent {
    let (a, b) = tokio::io::duplex(256 * 1024);
    let ctx = fx.ctx.clone();
    let receiver = tokio::spawn(async move {
        let mut conn = Connection::new(b, MAX_FRAME);
        let Message::TreeOffer(offer) = recv(&mut conn, Duration::from_secs(5), "test").await? else {
            panic!("expected a TreeOffer")
        };
        let base = crate::path::RemotePath::parse(&offer.path).expect("test paths are valid");
        super::tree_receiver::receive_tree(
            &mut conn,
            &ctx,
            offer,
            Some(base),
            crate::tree::LinkPolicy::Record,
            &CancellationToken::new(),
        )
        .await
    });
    let mut conn = Connection::new(a, MAX_FRAME);
    let sent = send_tree_over(&mut conn, tree, sender_store).await.unwrap();
    assert_eq!(receiver.await.unwrap().unwrap().committed, sent.committed);
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_that_change_after_the_scan_are_sent_as_they_are_now_and_vanished_ones_are_reported() {
    let fx = fixture();
    let src = fx.dir.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("small.txt"), b"before").unwrap();
    std::fs::write(src.join("same-size.txt"), b"before").unwrap();
    std::fs::write(src.join("same-mtime.txt"), b"before").unwrap();
    std::fs::write(src.join("sub/large.bin"), vec![1u8; 3 << 20]).unwrap();
    std::fs::write(src.join("gone.txt"), b"here at scan time").unwrap();
    let scanned_mtime = std::fs::metadata(src.join("same-mtime.txt"))
        .unwrap()
        .modified()
        .unwrap();
    let (store, tree) = walk(&fx, &src);
    // Between the scan (the TreeOffer) and the reads: one file grows, two change, one vanishes.
    std::fs::write(src.join("small.txt"), b"after, and longer").unwrap();
    std::fs::write(src.join("same-size.txt"), b"BEFORE").unwrap(); // the size stays, the mtime tells
                                                                   // Size and mtime stay: the sender sends it unhashed, the receiver rejects it, and the sender, reading it again
                                                                   // and hashing it this time, finds the change and sends it through its own Offer.
    let same_mtime = std::fs::OpenOptions::new()
        .write(true)
        .open(src.join("same-mtime.txt"))
        .unwrap();
    std::io::Write::write_all(&mut &same_mtime, b"BEFORE").unwrap();
    same_mtime.set_modified(scanned_mtime).unwrap();
    drop(same_mtime);
    std::fs::write(src.join("sub/large.bin"), vec![2u8; 3 << 20]).unwrap();
    std::fs::remove_file(src.join("gone.txt")).unwrap();

    let sent = transfer_tree(&fx, &tree, &store).await;
    let root = fx.ctx.root.join("t");
    assert_eq!(std::fs::read(root.join("small.txt")).unwrap(), b"after, and longer");
    assert_eq!(std::fs::read(root.join("same-size.txt")).unwrap(), b"BEFORE");
    assert_eq!(std::fs::read(root.join("same-mtime.txt")).unwrap(), b"BEFORE");
    assert_eq!(std::fs::read(root.join("sub/large.bin")).unwrap(), vec![2u8; 3 << 20]);
    assert!(!root.join("gone.txt").exists());
    assert_eq!(sent.failed.len(), 1, "{:?}", sent.failed);
    assert_eq!(sent.failed[0].path, "gone.txt");
    assert!(!sent.failed[0].damaged, "vanished, not damaged");
    assert_eq!(
        crate::ranges::ranges_len(&sent.committed.missing),
        1,
        "the receiver knows one file never came"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_receiver_naming_entries_outside_the_offer_is_a_protocol_error_not_a_panic() {
    use crate::wire::{TreeAck, TreeNeed};
    let fx = fixture();
    let src = fx.dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a.txt"), b"hello").unwrap();
    let (store, tree) = walk(&fx, &src);
    let bogus_acks = [
        TreeAck {
            entries: vec![],
            refused: vec![IndexRange { start: 1000, count: 5 }],
        },
        TreeAck {
            entries: vec![IndexRange {
                start: 0,
                count: u32::MAX,
            }],
            refused: vec![],
        },
    ];
    for ack in bogus_acks {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let liar = tokio::spawn(async move {
            let mut conn = Connection::new(b, MAX_FRAME);
            let _offer = recv(&mut conn, Duration::from_secs(5), "test").await.unwrap();
            let need = TreeNeed {
                entries: vec![IndexRange { start: 0, count: 1 }],
            };
            conn.write_message(&Message::TreeNeed(need)).await.unwrap();
            let _data = recv(&mut conn, Duration::from_secs(5), "test").await.unwrap();
            conn.write_message(&Message::TreeAck(ack)).await.unwrap();
            let _ = conn.read_message().await;
        });
        let mut conn = Connection::new(a, MAX_FRAME);
        let sent = tokio::time::timeout(Duration::from_secs(10), send_tree_over(&mut conn, &tree, &store))
            .await
            .expect("bounded");
        assert!(matches!(sent, Err(super::TransferError::Unexpected { .. })), "{sent:?}");
        drop(conn);
        liar.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reusing_many_identical_tiny_chunks_takes_linear_time() {
    use crate::manifest::{ChunkEntry, Chunking, Manifest};
    let fx = fixture();
    std::fs::create_dir_all(&fx.ctx.root).unwrap();
    // Chunks of the smallest length a manifest may use (§5), all the same: an older copy holds the one chunk.
    let len = MIN_CHUNK_SIZE;
    let block = vec![b'a'; len as usize];
    std::fs::write(fx.ctx.root.join("dst"), &block).unwrap();
    let n: u32 = 40_000;
    let hash = *blake3::hash(&block).as_bytes();
    let mut whole = blake3::Hasher::new();
    for _ in 0..n {
        whole.update(&block);
    }
    let manifest = Manifest {
        size: u64::from(n) * u64::from(len),
        digest: *whole.finalize().as_bytes(),
        chunking: Chunking::Fixed { size: len },
        mtime: crate::manifest::FileTime::default(),
        mode: 0o644,
        chunks: (0..n)
            .map(|i| ChunkEntry {
                offset: u64::from(i) * u64::from(len),
                len,
                hash,
            })
            .collect(),
    };
    let (a, b) = tokio::io::duplex(256 * 1024);
    let receiver = spawn_receiver(&fx, b);
    let mut conn = Connection::new(a, MAX_FRAME);
    conn.write_message(&Message::Offer(Offer {
        path: "dst".into(),
        manifest,
    }))
    .await
    .unwrap();
    // Quadratic bookkeeping took minutes here; linear takes a second or two even in a debug build.
    let need = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match conn.read_message().await.unwrap().unwrap() {
                Message::Ping(nonce) => conn.write_message(&Message::Pong(nonce)).await.unwrap(),
                other => return other,
            }
        }
    })
    .await
    .expect("reuse of 40,000 chunks finishes");
    assert_eq!(need, Message::Need(Need { ranges: vec![] }), "every chunk was reused");
    drop(conn);
    let _ = receiver.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_rejecting_small_files_forever_cannot_keep_the_sender_busy() {
    use crate::wire::TreeNeed;
    let fx = fixture();
    let src = fx.dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a.txt"), b"hello").unwrap();
    let (store, tree) = walk(&fx, &src);
    let (a, b) = tokio::io::duplex(64 * 1024);
    let liar = tokio::spawn(async move {
        let mut conn = Connection::new(b, MAX_FRAME);
        let _offer = recv(&mut conn, Duration::from_secs(5), "test").await.unwrap();
        let again = Message::TreeNeed(TreeNeed {
            entries: vec![IndexRange { start: 0, count: 1 }],
        });
        conn.write_message(&again).await.unwrap();
        while let Ok(Some(Message::FileData(_))) = conn.read_message().await {
            if conn.write_message(&again).await.is_err() {
                break;
            }
        }
    });
    let mut conn = Connection::new(a, MAX_FRAME);
    let sent = tokio::time::timeout(Duration::from_secs(30), send_tree_over(&mut conn, &tree, &store))
        .await
        .expect("the sender gives up by itself");
    assert!(matches!(sent, Err(super::TransferError::Integrity(_))), "{sent:?}");
    drop(conn);
    liar.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_file_found_changed_mid_send_is_abandoned_and_sent_again_in_the_same_session() {
    let fx = fixture();
    let src = fx.dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let large = src.join("large.bin");
    std::fs::write(&large, vec![1u8; 3 << 20]).unwrap();
    std::fs::write(src.join("small.txt"), b"unchanged").unwrap();
    let (store, tree) = walk(&fx, &src);
    // Same size, mtime put back: the cached manifest still looks valid, so the change shows only when chunks are
    // read and re-hashed mid-send.
    let mtime = std::fs::metadata(&large).unwrap().modified().unwrap();
    let mut edited = vec![1u8; 3 << 20];
    edited[(3 << 20) - 10] = 9;
    std::fs::write(&large, &edited).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&large)
        .unwrap()
        .set_modified(mtime)
        .unwrap();

    let sent = transfer_tree(&fx, &tree, &store).await;
    assert!(sent.failed.is_empty(), "{:?}", sent.failed);
    assert!(sent.committed.missing.is_empty());
    assert_eq!(std::fs::read(fx.ctx.root.join("t/large.bin")).unwrap(), edited);
    assert_eq!(std::fs::read(fx.ctx.root.join("t/small.txt")).unwrap(), b"unchanged");
}

/// Offer A passed the quota check and has not yet recorded its transfer when offer B arrives: B waits for A's
/// record and is counted after it (proto-spec.md §3a), so two 5 MiB files cannot both fit 10 MiB of free quota.
#[test]
fn offers_in_one_namespace_are_admitted_one_after_another() {
    use super::quota::{admit, NewTransfer};
    use crate::manifest::tests::manifest_of;
    use crate::path::RemotePath;
    use crate::store::{Progress, TransferRecord};
    let mut fx = fixture();
    std::fs::create_dir_all(&fx.ctx.root).unwrap();
    fx.ctx.quota = Some(10 << 20);
    let five_mib = manifest_of(&[1 << 20; 5]);
    let record = TransferRecord {
        manifest: five_mib.clone(),
        partial: "a.part".into(),
        created: 1,
    };
    let record_bytes = crate::record::encode_record(&record).len() as u64;
    let mut turn = fx.ctx.admission.lock();
    let a = NewTransfer {
        path: "a",
        size: five_mib.size,
        record_bytes,
    };
    admit(&fx.ctx.store, fx.ctx.quota, &fx.ctx.limits, &a, &mut turn).unwrap();
    let ctx = fx.ctx.clone();
    let b = std::thread::spawn(move || {
        let path = RemotePath::parse("b").unwrap();
        super::receiver::prepare_with(&ctx, &path, Arc::new(five_mib), None).map(|_| ())
    });
    // Without the lock, B would be admitted now against a namespace that does not show A yet.
    std::thread::sleep(Duration::from_millis(200));
    assert!(!b.is_finished(), "B waits for A's turn");
    fx.ctx.store.begin("a", &record, &Progress::default()).unwrap();
    drop(turn);
    match b.join().unwrap() {
        Err(super::TransferError::Refused { code, .. }) => assert_eq!(code, crate::wire::ErrorCode::QuotaExceeded),
        other => panic!("B must be over quota, got {:?}", other.err()),
    }
    assert!(fx.ctx.store.summary("b").unwrap().is_none());
    assert!(
        !fx.ctx.partial_dir.read_dir().unwrap().any(|e| e.is_ok()),
        "no partial for B"
    );
}

/// A small file of a tree committed at a path with an open transfer replaces that transfer: its records and its
/// partial file go, so the partial no longer sits on disk uncounted by the quota.
#[test]
fn a_small_file_committed_over_an_open_transfer_removes_its_partial() {
    use super::small_writer::{SmallFile, SmallWriter};
    use crate::manifest::tests::manifest_of;
    use crate::path::RemotePath;
    use crate::store::{Progress, TransferRecord};
    let fx = fixture();
    std::fs::create_dir_all(fx.ctx.root.join("x")).unwrap();
    let partial = fx.ctx.partial_dir.join(".ferry-open.part");
    std::fs::write(&partial, vec![7u8; 9 * 4096]).unwrap();
    let record = TransferRecord {
        manifest: manifest_of(&[4096; 9]),
        partial: partial.display().to_string(),
        created: 1,
    };
    fx.ctx.store.begin("x/p", &record, &Progress::default()).unwrap();
    let writer = SmallWriter {
        volume: fx.ctx.trees.clone(),
        store: fx.ctx.store.clone(),
        stats: fx.ctx.stats.clone(),
    };
    let data = b"1".to_vec();
    let outcome = writer
        .commit_batch(vec![SmallFile {
            index: 0,
            key: RemotePath::parse("x/p").unwrap(),
            digest: *blake3::hash(&data).as_bytes(),
            data,
            mtime: crate::manifest::FileTime::default(),
            mode: 0o644,
            _budget: None,
        }])
        .unwrap();
    assert_eq!(outcome.committed, vec![0]);
    assert!(!partial.exists(), "the replaced transfer's partial is gone");
    assert!(fx.ctx.store.transfer("x/p").unwrap().is_none());
    assert_eq!(fx.ctx.store.held_bytes().unwrap(), 1, "only the committed byte is held");
}

/// A tree's small files have no record until they are committed: the tree reserves them, so an offer arriving
/// meanwhile counts them; and the tree counts what was admitted after it was planned (proto-spec.md §3a).
#[test]
fn a_trees_small_files_and_concurrent_offers_count_each_other() {
    use super::quota::{admit, Budget, NewTransfer};
    let mut fx = fixture();
    std::fs::create_dir_all(&fx.ctx.root).unwrap();
    let quota = 10 << 20;
    fx.ctx.quota = Some(quota);
    let (store, limits) = (&fx.ctx.store, fx.ctx.limits);
    let offer = |path, size| NewTransfer {
        path,
        size,
        record_bytes: 100,
    };
    let code = |result: Result<(), super::TransferError>| match result {
        Err(super::TransferError::Refused { code, .. }) => Some(code),
        _ => None,
    };
    let mut tree = Budget::open(store, quota, &fx.ctx.admission, None).unwrap();
    for i in 0..6 {
        tree.take(store, &format!("t/f{i}"), 1 << 20, true, None).unwrap();
    }
    let big = admit(
        store,
        Some(quota),
        &limits,
        &offer("big", 5 << 20),
        &mut fx.ctx.admission.lock(),
    );
    assert_eq!(
        code(big),
        Some(crate::wire::ErrorCode::QuotaExceeded),
        "6 MiB reserved + 5 MiB"
    );
    admit(
        store,
        Some(quota),
        &limits,
        &offer("mid", 3 << 20),
        &mut fx.ctx.admission.lock(),
    )
    .unwrap();
    let more = tree.take(store, "t/g", 2 << 20, true, None);
    assert_eq!(
        code(more),
        Some(crate::wire::ErrorCode::QuotaExceeded),
        "the tree sees the 3 MiB admitted since"
    );
    tree.release(1 << 20); // one small file committed: its record counts now, not the reservation
    drop(tree); // the session ended: the rest of its reservations go
    admit(
        store,
        Some(quota),
        &limits,
        &offer("big", 5 << 20),
        &mut fx.ctx.admission.lock(),
    )
    .expect("nothing reserved any more (and no record was written in this test)");
}

/// The bytes of the one partial file in the fixture's partial directory.
fn the_partial(fx: &Fixture) -> Vec<u8> {
    let partial = std::fs::read_dir(&fx.ctx.partial_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::read(partial).unwrap()
}

/// A scripted receiver for the order of a sender's last messages: asks for every chunk (of an `Offer`, or of each
/// piece of a streamed offer, echoing its end), reads them all, then pings. Returns what the sender wrote next:
/// `Commit` if it committed right behind its last chunk, `Pong` if it was still waiting for Acks. Then acknowledges
/// everything and reports the file committed, so the sender finishes either way, and reads on until it hangs up.
async fn first_message_after_the_last_chunk<S>(stream: S) -> Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut conn = Connection::new(stream, MAX_FRAME);
    let (mut announced, mut ended, mut chunks) = (0u32, false, 0u32);
    let (mut size, mut digest) = (0, None);
    while !(ended && chunks == announced) {
        let need = match conn.read_message().await.unwrap().expect("the sender hung up") {
            Message::Offer(offer) => {
                announced = offer.manifest.chunk_count();
                ended = true;
                (size, digest) = (offer.manifest.size, Some(offer.manifest.digest));
                (0, announced)
            }
            Message::OfferStart(start) => {
                size = start.size;
                continue;
            }
            Message::ManifestPiece(piece) => {
                announced += piece.chunks.len() as u32;
                (piece.first_index, piece.chunks.len() as u32)
            }
            Message::ManifestEnd(end) => {
                conn.write_message(&Message::ManifestEnd(end.clone())).await.unwrap();
                ended = true;
                digest = Some(end.digest);
                (0, 0)
            }
            Message::Chunk(_) => {
                chunks += 1;
                continue;
            }
            other => panic!("unexpected {other:?}"),
        };
        let ranges = match need {
            (_, 0) => vec![],
            (start, count) => vec![IndexRange { start, count }],
        };
        conn.write_message(&Message::Need(Need { ranges })).await.unwrap();
    }
    conn.write_message(&Message::Ping(7)).await.unwrap();
    let next = conn.read_message().await.unwrap().expect("the sender hung up");
    let all = IndexRange {
        start: 0,
        count: announced,
    };
    conn.write_message(&Message::Ack(crate::wire::Ack { ranges: vec![all] }))
        .await
        .unwrap();
    let mut msg = next.clone();
    while !matches!(msg, Message::Commit) {
        msg = conn.read_message().await.unwrap().expect("the sender hung up");
    }
    let committed = crate::wire::Committed {
        size,
        digest: digest.expect("the offer ended"),
        received_bytes: size,
        rejected_chunks: 0,
        reused_bytes: 0,
        already_present: false,
    };
    conn.write_message(&Message::Committed(committed)).await.unwrap();
    while let Ok(Some(_)) = conn.read_message().await {}
    next
}

/// proto-spec.md §4 "Sender": on a single connection Commit follows the last needed chunk at once; the receiver
/// drains its batch before it checks the file, so waiting for the last Acks would add a round trip to every push.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_connection_commits_right_behind_its_last_chunk() {
    let fx = fixture();
    let chunk = MIN_CHUNK_SIZE as usize;
    let data: Vec<u8> = (0..6 * chunk).map(|b| (b % 251) as u8).collect();
    let src = source(fx.dir.path(), &data);
    let (a, b) = tokio::io::duplex(4 * 1024 * 1024);
    let receiver = tokio::spawn(first_message_after_the_last_chunk(b));
    let mut conn = Connection::new(a, MAX_FRAME);
    let mut stats = SendStats::default();
    send(&mut conn, "c", &src, &SendOptions::default(), &mut stats, &mut |_| {})
        .await
        .unwrap();
    drop(conn);
    assert_eq!(receiver.await.unwrap(), Message::Commit, "Commit waited for the Acks");
    assert_eq!(stats.chunks_acked, 6, "the Acks after Commit still count");
}

/// The same for a streamed offer (§4, "Streamed offer"): once the echo and its Need arrived and the last needed
/// chunk is written, Commit follows without waiting for Acks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_offer_commits_right_behind_its_last_chunk() {
    let fx = fixture();
    let chunk = MIN_CHUNK_SIZE as usize;
    let data: Vec<u8> = (0..6 * chunk).map(|b| (b % 251) as u8).collect();
    let path = fx.dir.path().join("streamed.bin");
    std::fs::write(&path, &data).unwrap();
    let file = Arc::new(std::fs::File::open(&path).unwrap());
    let source = super::stream_send::StreamSource::of(file, fixed(MIN_CHUNK_SIZE)).unwrap();
    let (a, b) = tokio::io::duplex(4 * 1024 * 1024);
    let receiver = tokio::spawn(first_message_after_the_last_chunk(b));
    let mut conn = Connection::new(a, MAX_FRAME);
    let mut stats = SendStats::default();
    let hashing = super::stream_send::Hashing {
        with: None,
        on_hashed: Box::new(|_| {}),
    }
    .start(&source);
    let opts = SendOptions::default();
    let sent =
        super::stream_send::send_streamed(&mut conn, "s", &source, &opts, &mut stats, &mut |_| {}, hashing, None).await;
    sent.unwrap();
    drop(conn);
    assert_eq!(receiver.await.unwrap(), Message::Commit, "Commit waited for the Acks");
    assert_eq!(
        (stats.chunks_sent, stats.chunks_acked),
        (6, 6),
        "the Acks after Commit still count"
    );
}

/// After a rejection the sender waits for every Ack before Commit again (proto-spec.md §4, "When Commit goes"): a
/// resent chunk and the receiver's next commit round must not cross another Commit. One chunk in flight at a time;
/// the scripted receiver rejects chunk 0 once, acknowledges the rest as they come, and pings after the last one
/// without acknowledging it: the sender answers the ping (it is waiting for that Ack), no Commit yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_rejection_commit_waits_for_the_acks() {
    let fx = fixture();
    let chunk = MIN_CHUNK_SIZE as usize;
    let data: Vec<u8> = (0..4 * chunk).map(|b| (b % 251) as u8).collect();
    let src = source(fx.dir.path(), &data);
    let (size, digest) = (src.manifest.size, src.manifest.digest);
    let (a, b) = tokio::io::duplex(4 * 1024 * 1024);
    let receiver = tokio::spawn(async move {
        let mut conn = Connection::new(b, MAX_FRAME);
        let one = |start| vec![IndexRange { start, count: 1 }];
        let Some(Message::Offer(_)) = conn.read_message().await.unwrap() else {
            panic!("expected an Offer")
        };
        let all = IndexRange { start: 0, count: 4 };
        conn.write_message(&Message::Need(Need { ranges: vec![all] }))
            .await
            .unwrap();
        let mut rejected = false;
        loop {
            let Some(Message::Chunk(c)) = conn.read_message().await.unwrap() else {
                panic!("expected a chunk")
            };
            if !rejected {
                rejected = true;
                conn.write_message(&Message::Need(Need { ranges: one(c.index) }))
                    .await
                    .unwrap();
            } else if c.index < 3 {
                conn.write_message(&Message::Ack(crate::wire::Ack { ranges: one(c.index) }))
                    .await
                    .unwrap();
            } else {
                break;
            }
        }
        conn.write_message(&Message::Ping(9)).await.unwrap();
        let next = conn.read_message().await.unwrap().expect("the sender hung up");
        conn.write_message(&Message::Ack(crate::wire::Ack { ranges: one(3) }))
            .await
            .unwrap();
        let mut msg = next.clone();
        while !matches!(msg, Message::Commit) {
            msg = conn.read_message().await.unwrap().expect("the sender hung up");
        }
        let committed = crate::wire::Committed {
            size,
            digest,
            received_bytes: size,
            rejected_chunks: 1,
            reused_bytes: 0,
            already_present: false,
        };
        conn.write_message(&Message::Committed(committed)).await.unwrap();
        while let Ok(Some(_)) = conn.read_message().await {}
        next
    });
    let opts = SendOptions {
        window: chunk as u64,
        size_window: false,
        ..SendOptions::default()
    };
    let mut conn = Connection::new(a, MAX_FRAME);
    let mut stats = SendStats::default();
    send(&mut conn, "r", &src, &opts, &mut stats, &mut |_| {})
        .await
        .unwrap();
    drop(conn);
    assert_eq!(
        receiver.await.unwrap(),
        Message::Pong(9),
        "Commit went before the last Ack"
    );
    assert_eq!((stats.chunks_sent, stats.chunks_rejected), (5, 1));
}
