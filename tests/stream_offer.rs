//! The streamed offer (proto-spec.md §4, "Streamed offer", protocol version 6): chunks travel while the sender is
//! still hashing, a cut streamed push resumes, version-5 peers keep the whole offer both ways, and a hostile stream
//! of pieces is refused with the right code before anything is written.

use std::path::Path;
use std::time::Duration;

use ferry::manifest::{ChunkEntry, Chunking, FileTime};
use ferry::wire::{Chunk, ErrorCode, ManifestEnd, ManifestPiece, Message, OfferStart};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::util::{
    b3, frames_before_welcome, greeted, logged_bytes, logged_number, push, push_command, random_bytes, rchar,
    run_counting_reads, send_chunk_zero_and_commit, single_chunk_manifest, wait_until_store_closed, write_random,
    TestServer,
};

const MIB: u64 = 1024 * 1024;

/// Bytes held by the partial files under `root`'s `.ferry/partial`.
fn partial_bytes(root: &Path) -> u64 {
    let Ok(dir) = std::fs::read_dir(root.join(".ferry/partial")) else {
        return 0;
    };
    dir.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum()
}

/// Polls `done` every 20 ms for at most `limit`.
fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// The first chunks land on the server while the client has not yet read its source through even once: the
/// manifest is streamed, not built before the first byte goes out. A sparse 64 GiB source takes the client tens of
/// seconds to read (it is all zeros, so its content-defined chunks are the largest), and the server must hold bytes
/// of it long before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_land_before_the_source_is_read_through() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let source = dir.path().join("sparse.img");
    let size = 64 * 1024 * MIB;
    std::fs::File::create(&source).unwrap().set_len(size).unwrap();
    let mut client = push_command(&source, &server.url("sparse.img"), &dir.path().join("state"), &[])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let root = server.root.clone();
    let landed = tokio::task::spawn_blocking(move || wait_until(Duration::from_secs(60), || partial_bytes(&root) > 0))
        .await
        .unwrap();
    let read = rchar(client.id());
    client.kill().unwrap();
    let _ = client.wait();
    assert!(landed, "no chunk reached the server");
    assert!(
        read < size,
        "the client had read {read} bytes of {size} when the first chunk landed"
    );
}

/// A streamed push cut at half (the client SIGKILLed) resumes: a run from another client state (no cached
/// manifest, so streamed again) keeps, piece by piece, every durable chunk it offers again and sends about the
/// other half.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_push_cut_at_half_resends_only_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let source = dir.path().join("half.bin");
    let size = 48 * MIB;
    write_random(&source, size as usize, 5);
    let state = dir.path().join("state");
    let url = server.url("half.bin");
    let mut client = push_command(&source, &url, &state, &["--bwlimit", "8M"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let root = server.root.clone();
    let half =
        tokio::task::spawn_blocking(move || wait_until(Duration::from_secs(120), || partial_bytes(&root) >= size / 2))
            .await
            .unwrap();
    client.kill().unwrap();
    let _ = client.wait();
    assert!(half, "the first run never got half way");
    let out = push(&source, &url, &dir.path().join("state2"), &[]).await;
    out.assert_ok();
    assert_eq!(out.json["manifest_cached"], false, "streamed again");
    assert_eq!(b3(&source), b3(&server.root.join("half.bin")));
    let sent = out.u64("bytes_sent");
    // At most the half not yet written, the last batch not yet synced (4 MiB) and a window in flight (16 MiB).
    assert!(sent <= size / 2 + 20 * MIB, "the resume sent {sent} of {size} bytes");
}

/// Writes `size` seeded random bytes over the start of `path` in place, then cuts the file to them, and returns
/// them. The size changes once, with the new bytes already there, so a reader that sees the new size reads the new
/// bytes. (`write_random` truncates first: a client that re-reads the file in that instant, within one tick of
/// the filesystem's mtime clock, finds a consistent empty file and rightly pushes it.)
fn overwrite_then_cut(path: &Path, size: usize, seed: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let data = random_bytes(size, seed);
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(&data, 0).unwrap();
    file.set_len(size as u64).unwrap();
    data
}

/// A source that changes while it is hashed for a streamed offer: the attempt fails with SourceChanged, nothing
/// of it is committed, and the run goes on to push the file as it is now, verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_changed_while_streamed_is_pushed_again_as_it_is_now() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let source = dir.path().join("moving.img");
    std::fs::File::create(&source)
        .unwrap()
        .set_len(64 * 1024 * MIB)
        .unwrap();
    let url = server.url("moving.img");
    let child = push_command(&source, &url, &dir.path().join("state"), &["--timeout", "60s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let root = server.root.clone();
    let landed = tokio::task::spawn_blocking(move || wait_until(Duration::from_secs(60), || partial_bytes(&root) > 0))
        .await
        .unwrap();
    assert!(landed, "no chunk reached the server");
    // Still being hashed (see chunks_land_before_the_source_is_read_through): cut it to 3 MiB of new bytes.
    let now = overwrite_then_cut(&source, 3 * MIB as usize, 9);
    let output = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("source_changed"), "{stdout}");
    assert_eq!(std::fs::read(server.root.join("moving.img")).unwrap(), now);
}

/// A version-6 client pushing through a relay that makes the server pick version 5 (as an older server would)
/// offers the file whole: a streamed offer on that connection would be refused and the push would fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_five_server_gets_a_whole_offer() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let relay_addr = relay_as_version_five(server.addr).await;
    let source = dir.path().join("old.bin");
    write_random(&source, 3 * MIB as usize + 17, 6);
    let url = format!("ferry://{relay_addr}/old.bin");
    push(&source, &url, &dir.path().join("state"), &["--retries", "0"])
        .await
        .assert_ok();
    assert_eq!(b3(&source), b3(&server.root.join("old.bin")));
}

/// The same with a token: the streamed offer goes behind `Auth`, the version-5 server refuses it, and the file is
/// offered whole on a new connection (authenticated again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_five_server_gets_a_whole_offer_behind_auth() {
    let alice = ferry::auth::Token::generate("alice").unwrap();
    let site = crate::access::Site::start(&[(&alice, "alice", "[\"push\", \"pull\"]", "")], "");
    let relay_addr = relay_as_version_five(site.server.addr).await;
    let source = site.dir.join("old.bin");
    write_random(&source, 3 * MIB as usize + 17, 7);
    let url = format!("ferry://{relay_addr}/old.bin");
    let token = site.token_file(&alice);
    push(
        &source,
        &url,
        &site.state("alice"),
        &["--retries", "0", "--token-file", &token],
    )
    .await
    .assert_ok();
    assert_eq!(b3(&source), b3(&site.server.root.join("alice/old.bin")));
}

/// A relay on 127.0.0.1 to `upstream` that lowers every Hello's `max_version` to 5, so that the server picks version
/// 5, as an older server would. Returns its address.
async fn relay_as_version_five(upstream: std::net::SocketAddr) -> std::net::SocketAddr {
    let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = relay.accept().await {
            tokio::spawn(async move {
                let mut len = [0u8; 4];
                client.read_exact(&mut len).await.unwrap();
                let mut hello = vec![0u8; u32::from_be_bytes(len) as usize];
                client.read_exact(&mut hello).await.unwrap();
                // Hello: tag (4 bytes), magic (8), min_version (2), then max_version (2).
                hello[14..16].copy_from_slice(&5u16.to_le_bytes());
                let mut server = TcpStream::connect(upstream).await.unwrap();
                server.write_all(&len).await.unwrap();
                server.write_all(&hello).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
    relay_addr
}

/// The client hashes its source while it connects, not after the handshake: a server that holds its Welcome back
/// sees the client read the whole (16 MiB) source meanwhile. A client that hashed only once greeted would read
/// none of it and leave the first piece a hashing buffer (8 MiB cut and hashed) behind the handshake's round trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_is_hashed_while_the_handshake_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("early.bin");
    let size = 16 * MIB;
    write_random(&source, size as usize, 8);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ferry://{}/early.bin", listener.local_addr().unwrap());
    // The handshake waits longer than the test: a client that gave up on it would go on to hash for a whole offer.
    let extra = ["--retries", "0", "--timeout", "120s"];
    let mut client = push_command(&source, &url, &dir.path().join("state"), &extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (stream, _) = listener.accept().await.unwrap();
    let mut conn = ferry::wire::Connection::new(stream, ferry::MAX_FRAME);
    let hello = conn.read_message().await.unwrap();
    assert!(matches!(hello, Some(Message::Hello(_))), "{hello:?}");
    let pid = client.id();
    let hashed = tokio::task::spawn_blocking(move || wait_until(Duration::from_secs(30), || rchar(pid) >= size))
        .await
        .unwrap();
    let read = rchar(pid);
    let _ = client.kill();
    let _ = client.wait();
    assert!(
        hashed,
        "the client read {read} bytes of its {size}-byte source before the Welcome"
    );
}

/// A client without a token sends its streamed offer right behind Hello (proto-spec.md §3, "Pipelining"): a
/// server that holds its Welcome back reads `OfferStart` and the first piece. A client that waited for the Welcome
/// would send nothing more, and the first chunk would leave a round trip later on every link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_streamed_offer_goes_out_behind_hello() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("eager.bin");
    write_random(&source, 3 * MIB as usize, 9);
    let before_welcome = frames_before_welcome(&source, "eager.bin", &dir.path().join("state"), 3).await;
    assert!(matches!(before_welcome[0], Message::Hello(_)), "{before_welcome:?}");
    assert!(
        matches!(&before_welcome[1], Message::OfferStart(start) if start.path == "eager.bin" && start.size == 3 * MIB),
        "{before_welcome:?}"
    );
    assert!(
        matches!(&before_welcome[2], Message::ManifestPiece(piece) if piece.first_index == 0 && !piece.chunks.is_empty()),
        "{before_welcome:?}"
    );
}

/// A version-5 client cannot send OfferStart (the server refuses it as unexpected), and its whole Offer is served
/// as before.
#[tokio::test]
async fn a_version_five_client_keeps_the_whole_offer() {
    use ferry::wire::{Connection, Hello, Offer, MAGIC};
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let hello = Message::Hello(Hello {
        magic: MAGIC,
        min_version: 3,
        max_version: 5,
        agent: "ferry/v5".into(),
        client: String::new(),
    });
    let data = b"offered whole by a version-5 client".to_vec();
    let start = start_of("v5/streamed", data.len() as u64);
    for streamed in [true, false] {
        let mut conn = Connection::new(TcpStream::connect(server.addr).await.unwrap(), ferry::MAX_FRAME);
        conn.write_message(&hello).await.unwrap();
        assert!(matches!(conn.read_message().await.unwrap(), Some(Message::Welcome(w)) if w.version == 5));
        if streamed {
            conn.write_message(&Message::OfferStart(start.clone())).await.unwrap();
            assert_eq!(error_code(&mut conn).await, ErrorCode::UnexpectedMessage);
            continue;
        }
        let manifest = single_chunk_manifest(&data);
        let offer = Offer {
            path: "v5/whole".into(),
            manifest,
        };
        conn.write_message(&Message::Offer(offer)).await.unwrap();
        assert!(matches!(conn.read_message().await.unwrap(), Some(Message::Need(_))));
        send_chunk_zero_and_commit(&mut conn, &data).await;
    }
    assert_eq!(std::fs::read(server.root.join("v5/whole")).unwrap(), data);
    assert!(!server.root.join("v5/streamed").exists());
}

fn start_of(path: &str, size: u64) -> OfferStart {
    OfferStart {
        path: path.into(),
        size,
        chunking: Chunking::Fixed { size: 4096 },
        mtime: FileTime::default(),
        mode: 0o644,
    }
}

/// Reads until an Error frame (skipping Needs, Acks and echoes) and returns its code.
async fn error_code(conn: &mut ferry::wire::Connection<TcpStream>) -> ErrorCode {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), conn.read_message()).await {
            Ok(Ok(Some(Message::Error(frame)))) => return frame.code,
            Ok(Ok(Some(_))) => {}
            other => panic!("expected an Error, got {other:?}"),
        }
    }
}

/// A hostile streamed offer: each malformed stream is refused with its code, and nothing lands at its path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_streams_are_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let block = |i: u8| vec![i; 4096];
    let entry = |i: u8, offset: u64, len: u32| ChunkEntry {
        offset,
        len,
        hash: *blake3::hash(&block(i)[..len as usize]).as_bytes(),
    };
    let piece = |first_index, chunks| Message::ManifestPiece(ManifestPiece { first_index, chunks });
    let chunk = |index: u32| {
        Message::Chunk(Chunk {
            index,
            data: block(index as u8),
        })
    };
    let size = 3 * 4096;
    let cases: Vec<(&str, Vec<Message>, ErrorCode)> = vec![
        (
            "overlap",
            vec![piece(0, vec![entry(0, 0, 4096)]), piece(1, vec![entry(1, 4000, 4096)])],
            ErrorCode::BadManifest,
        ),
        (
            "gap",
            vec![piece(0, vec![entry(0, 0, 4096), entry(1, 8192, 4096)])],
            ErrorCode::BadManifest,
        ),
        (
            "index-overlap",
            vec![piece(0, vec![entry(0, 0, 4096)]), piece(0, vec![entry(1, 4096, 4096)])],
            ErrorCode::BadManifest,
        ),
        (
            "past-size",
            vec![piece(
                0,
                vec![
                    entry(0, 0, 4096),
                    entry(1, 4096, 4096),
                    entry(2, 8192, 4096),
                    entry(3, 12288, 4096),
                ],
            )],
            ErrorCode::BadManifest,
        ),
        (
            "too-many",
            vec![piece(
                0,
                vec![entry(0, 0, 4096); ferry::manifest_stream::MAX_PIECE_CHUNKS + 1],
            )],
            ErrorCode::BadManifest,
        ),
        (
            "short-end",
            vec![
                piece(0, vec![entry(0, 0, 4096)]),
                Message::ManifestEnd(ManifestEnd { digest: [0; 32] }),
            ],
            ErrorCode::BadManifest,
        ),
        (
            "unannounced-chunk",
            vec![piece(0, vec![entry(0, 0, 4096)]), chunk(1)],
            ErrorCode::UnexpectedMessage,
        ),
        (
            "no-end",
            vec![
                piece(0, vec![entry(0, 0, 4096), entry(1, 4096, 4096), entry(2, 8192, 4096)]),
                chunk(0),
                chunk(1),
                chunk(2),
                Message::Commit,
            ],
            ErrorCode::UnexpectedMessage,
        ),
        (
            "wrong-digest",
            vec![
                piece(0, vec![entry(0, 0, 4096), entry(1, 4096, 4096), entry(2, 8192, 4096)]),
                Message::ManifestEnd(ManifestEnd { digest: [7; 32] }),
                chunk(0),
                chunk(1),
                chunk(2),
                Message::Commit,
            ],
            ErrorCode::IntegrityFailed,
        ),
    ];
    for (name, messages, code) in cases {
        let path = format!("bad/{name}");
        let mut conn = greeted(server.addr).await;
        conn.write_message(&Message::OfferStart(start_of(&path, size)))
            .await
            .unwrap();
        for msg in &messages {
            if conn.write_message(msg).await.is_err() {
                break; // refused already
            }
        }
        assert_eq!(error_code(&mut conn).await, code, "{name}");
        assert!(!server.root.join(&path).exists(), "{name}: something landed");
    }
    // The same stream, well formed, lands.
    let mut conn = greeted(server.addr).await;
    let whole: Vec<u8> = (0..3).flat_map(block).collect();
    conn.write_message(&Message::OfferStart(start_of("bad/none", size)))
        .await
        .unwrap();
    conn.write_message(&piece(0, vec![entry(0, 0, 4096)])).await.unwrap();
    conn.write_message(&piece(1, vec![entry(1, 4096, 4096), entry(2, 8192, 4096)]))
        .await
        .unwrap();
    let digest = *blake3::hash(&whole).as_bytes();
    conn.write_message(&Message::ManifestEnd(ManifestEnd { digest }))
        .await
        .unwrap();
    for index in 0..3 {
        conn.write_message(&chunk(index)).await.unwrap();
    }
    conn.write_message(&Message::Commit).await.unwrap();
    loop {
        match conn.read_message().await.unwrap() {
            Some(Message::Committed(done)) => {
                assert_eq!(done.digest, digest);
                break;
            }
            Some(Message::Need(_) | Message::Ack(_) | Message::ManifestEnd(_)) => {}
            other => panic!("expected Committed, got {other:?}"),
        }
    }
    assert_eq!(std::fs::read(server.root.join("bad/none")).unwrap(), whole);
}

/// The fixed 4 KiB chunking the hashing-progress tests push with: a record every 1024 chunks, so one at the end of
/// each 8 MiB read buffer.
const PROGRESS_CHUNKING: &[&str] = &["--chunking", "fixed", "--chunk-size", "4096"];

/// The sender-store key `ferry push` records `source`'s hashing progress under (with [`PROGRESS_CHUNKING`]).
fn progress_key(source: &Path) -> ferry::store::ManifestKey {
    use std::os::unix::fs::MetadataExt;
    let canonical = std::fs::canonicalize(source).unwrap();
    let meta = std::fs::metadata(&canonical).unwrap();
    ferry::store::ManifestKey {
        path: canonical.display().to_string(),
        size: meta.len(),
        mtime: ferry::chunk::mtime_of(&meta),
        inode: meta.ino(),
        device: meta.dev(),
        chunking: Chunking::Fixed { size: 4096 },
    }
}

/// Leaves in `state` what a client SIGKILLed while hashing `source` leaves: hashing, as a push runs it
/// ([`ferry::source::hash_resumable`], which records its progress as it goes, flushed), stopped for good after
/// `chunks` chunks, with no manifest cached. Returns the bytes the last record covers.
fn hash_then_stop(source: &Path, state: &Path, chunks: usize) -> u64 {
    let end = hash_and_stop_in(source, state, chunks);
    wait_until_store_closed(state);
    end
}

/// [`hash_then_stop`]'s work, with the store open only inside.
fn hash_and_stop_in(source: &Path, state: &Path, chunks: usize) -> u64 {
    let store = ferry::store::Store::open(state).unwrap();
    let sender = ferry::store::SenderStore::open(&store).unwrap();
    let canonical = std::fs::canonicalize(source).unwrap();
    let file = std::fs::File::open(&canonical).unwrap();
    let size = file.metadata().unwrap().len();
    let spec = ferry::chunk::ChunkSpec {
        mode: ferry::chunk::ChunkingMode::Fixed,
        size: 4096,
    };
    let mut seen = 0;
    let stopped = ferry::source::hash_resumable(&sender, &file, &canonical, spec, size, &mut |_| {
        seen += 1;
        seen < chunks
    });
    assert!(stopped.is_err(), "stopped before the end");
    let record = sender
        .hashing(&progress_key(source))
        .unwrap()
        .expect("progress recorded");
    assert!(sender.cached_manifest(&progress_key(source)).unwrap().is_none());
    record.end
}

/// A client killed while it hashed a file not yet cached goes on, next run, from the hashing progress it recorded:
/// the rerun (streamed again) reads the file's bytes for hashing only after the record, plus what it sends.
/// Without the record it reads the whole file to hash it again, plus what it sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_clients_rerun_does_not_hash_the_recorded_prefix_again() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let source = dir.path().join("image.bin");
    let size = 24 * MIB;
    write_random(&source, size as usize, 21);
    let state = dir.path().join("state");
    let recorded = hash_then_stop(&source, &state, 5000);
    assert_eq!(recorded, 16 * MIB, "a record at the end of each 8 MiB buffer");
    let url = server.url("image.bin");
    let (out, read) = run_counting_reads(push_command(&source, &url, &state, PROGRESS_CHUNKING)).await;
    out.assert_ok();
    assert_eq!(out.json["manifest_cached"], false, "streamed again");
    assert_eq!(b3(&source), b3(&server.root.join("image.bin")));
    let sent = out.u64("bytes_sent");
    // Hashing reads size - recorded (+ < 1 KiB); sending reads `sent`; the state store a little. Hashing from the
    // start would read `size` on top of `sent`.
    assert!(
        read < size - recorded / 2 + sent,
        "the rerun read {read} bytes: {sent} sent, {size} in the file, {recorded} hashed before"
    );
    // Hashed through: the record is gone, the manifest cached.
    let store = ferry::store::Store::open(&state).unwrap();
    let sender = ferry::store::SenderStore::open(&store).unwrap();
    assert!(sender.hashing(&progress_key(&source)).unwrap().is_none());
    assert!(sender.cached_manifest(&progress_key(&source)).unwrap().is_some());
}

/// A source rewritten between the runs (same size and inode, new content and mtime) has another key: the record
/// of the old content is ignored, and the file as it is now lands at the first try, hashed from the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_changed_since_the_record_is_hashed_from_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let source = dir.path().join("image.bin");
    let size = 24 * MIB;
    write_random(&source, size as usize, 22);
    let state = dir.path().join("state");
    hash_then_stop(&source, &state, 5000);
    let old_key = progress_key(&source);
    // Rewritten in place, with an mtime that surely differs.
    let now = write_random(&source, size as usize, 23);
    let later = std::time::SystemTime::now() + Duration::from_secs(5);
    std::fs::File::options()
        .write(true)
        .open(&source)
        .unwrap()
        .set_modified(later)
        .unwrap();
    assert_ne!(progress_key(&source), old_key);
    let url = server.url("image.bin");
    let (out, read) = run_counting_reads(push_command(&source, &url, &state, PROGRESS_CHUNKING)).await;
    out.assert_ok();
    assert_eq!(out.json["source_changes"], 0, "{}", out.json);
    assert_eq!(std::fs::read(server.root.join("image.bin")).unwrap(), now);
    assert!(read >= size + out.u64("bytes_sent"), "hashed whole: read {read}");
}

/// A record whose digest state is wrong (a stale or damaged record the chunks do not show) makes the streamed
/// offer's whole-file digest wrong: the server refuses it at commit, and the client drops the record and hashes
/// the file from the start once, instead of failing or offering the same wrong digest again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_recorded_digest_is_dropped_and_the_file_hashed_again() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let source = dir.path().join("image.bin");
    write_random(&source, 24 * MIB as usize, 24);
    let state = dir.path().join("state");
    hash_then_stop(&source, &state, 5000);
    {
        let store = ferry::store::Store::open(&state).unwrap();
        let sender = ferry::store::SenderStore::open(&store).unwrap();
        let key = progress_key(&source);
        let mut record = sender.hashing(&key).unwrap().unwrap();
        let segment = sender.hashed_segment(&key, record.segments - 1).unwrap().unwrap();
        record.digest_stack[0][0] ^= 1;
        sender.record_hashing(&key, &segment, &record).unwrap();
    }
    wait_until_store_closed(&state);
    let url = server.url("image.bin");
    let out = push(&source, &url, &state, PROGRESS_CHUNKING).await;
    out.assert_ok();
    assert_eq!(out.json["source_changes"], 1, "{}", out.json);
    assert_eq!(b3(&source), b3(&server.root.join("image.bin")));
}

/// Blocks of 1 MiB of random bytes, one per seed, for offers cut with fixed 1 MiB chunks.
fn blocks(seeds: &[u64]) -> Vec<Vec<u8>> {
    seeds.iter().map(|&seed| random_bytes(MIB as usize, seed)).collect()
}

/// Seeds of `n` blocks, from `first` on.
fn seeds(first: u64, n: u64) -> Vec<u64> {
    (first..first + n).collect()
}

/// The manifest entries of `blocks` laid end to end.
fn entries_of(blocks: &[Vec<u8>]) -> Vec<ChunkEntry> {
    let mut offset = 0;
    blocks
        .iter()
        .map(|block| {
            let entry = ChunkEntry {
                offset,
                len: block.len() as u32,
                hash: *blake3::hash(block).as_bytes(),
            };
            offset += block.len() as u64;
            entry
        })
        .collect()
}

/// Plays the sender after the streamed manifest's last piece: sends `needed` chunks of `blocks`, ends the
/// manifest, then answers each `Need` with its chunks and a Commit (and each Ping with a Pong) until Committed.
async fn send_rest_and_commit(
    conn: &mut ferry::wire::Connection<TcpStream>,
    blocks: &[Vec<u8>],
    needed: &[u32],
) -> ferry::wire::Committed {
    use ferry::wire::{Chunk, Need};
    let send = |index: u32| {
        Message::Chunk(Chunk {
            index,
            data: blocks[index as usize].clone(),
        })
    };
    for &index in needed {
        conn.write_message(&send(index)).await.unwrap();
    }
    let whole: Vec<u8> = blocks.concat();
    let end = ManifestEnd {
        digest: *blake3::hash(&whole).as_bytes(),
    };
    conn.write_message(&Message::ManifestEnd(end)).await.unwrap();
    for _ in 0..100 {
        let msg = tokio::time::timeout(Duration::from_secs(30), conn.read_message()).await;
        match msg.expect("the receiver answers").unwrap() {
            Some(Message::Need(Need { ranges })) => {
                for range in ranges {
                    for index in range.start..range.start + range.count {
                        conn.write_message(&send(index)).await.unwrap();
                    }
                }
                conn.write_message(&Message::Commit).await.unwrap();
            }
            Some(Message::Ping(nonce)) => conn.write_message(&Message::Pong(nonce)).await.unwrap(),
            Some(Message::Committed(committed)) => return committed,
            Some(Message::Error(frame)) => panic!("refused: {frame:?}"),
            Some(_) => {} // Acks and the ManifestEnd echo
            None => panic!("the receiver closed the connection"),
        }
    }
    panic!("no Committed after 100 messages")
}

/// Pushes `blocks` to `path` as one streamed piece and returns what the receiver answered the piece with, before
/// the manifest ended: its `Need`, or nothing within 5 s (a receiver that gathers the whole manifest first).
async fn offer_one_piece(
    conn: &mut ferry::wire::Connection<TcpStream>,
    path: &str,
    blocks: &[Vec<u8>],
) -> Option<Vec<u32>> {
    let mut start = start_of(path, blocks.iter().map(|b| b.len() as u64).sum());
    start.chunking = Chunking::Fixed { size: MIB as u32 };
    conn.write_message(&Message::OfferStart(start)).await.unwrap();
    let piece = ManifestPiece {
        first_index: 0,
        chunks: entries_of(blocks),
    };
    conn.write_message(&Message::ManifestPiece(piece)).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), conn.read_message()).await {
            Ok(Ok(Some(Message::Need(need)))) => {
                return Some(need.ranges.iter().flat_map(|r| r.start..r.start + r.count).collect())
            }
            Ok(Ok(Some(Message::Ack(_)))) => {}
            Ok(other) => panic!("expected a Need, got {other:?}"),
            Err(_) => return None,
        }
    }
}

/// Changes 16 bytes of block 10 of the committed file at `target` behind the server's back: its size and mtime put
/// back, so its committed manifest still seems to describe it.
fn damage_block_ten(target: &Path) {
    use std::os::unix::fs::FileExt;
    let mtime = std::fs::metadata(target).unwrap().modified().unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(target).unwrap();
    file.write_all_at(&[0xEE; 16], 10 * MIB + 100).unwrap();
    file.set_modified(mtime).unwrap();
}

/// A server (root under `dir`) holding, committed at `path`, the 20 blocks of seeds 1 to 20, pushed as one streamed
/// piece (a path that holds no file: the piece is answered at once, asking for every block). Its log has the
/// commit's debug line (what the digest read back, took from memory, took as known subtrees).
async fn server_holding(dir: &Path, path: &str) -> TestServer {
    let log = [("RUST_LOG", "info,ferry::transfer::commit=debug")];
    let server = TestServer::start_with_env(&dir.join("root"), &[], &log);
    let old = blocks(&seeds(1, 20));
    let all: Vec<u32> = (0..20).collect();
    let mut conn = greeted(server.addr).await;
    let asked = offer_one_piece(&mut conn, path, &old).await;
    assert_eq!(asked.as_deref(), Some(&all[..]), "a fresh path streams");
    send_rest_and_commit(&mut conn, &old, &all).await;
    server
}

/// A file whose chunks all moved (here one block inserted before 20 old ones) over an older version at the
/// destination is served piece by piece: once the announced chunks show enough moved bytes (16 MiB), the receiver
/// answers, asking only for the new block, and copies the moved blocks from the old version instead of asking for
/// them. A receiver that gathered the whole manifest first would answer nothing before the manifest's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_whose_chunks_moved_is_copied_while_its_manifest_streams() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_holding(dir.path(), "moved.bin").await;

    let new = blocks(&[99].into_iter().chain(seeds(1, 20)).collect::<Vec<_>>());
    let mut conn = greeted(server.addr).await;
    let asked = offer_one_piece(&mut conn, "moved.bin", &new).await;
    assert_eq!(
        asked.as_deref(),
        Some(&[0][..]),
        "only the new block is asked for, before the manifest's end"
    );
    let committed = send_rest_and_commit(&mut conn, &new, &[0]).await;
    assert_eq!(std::fs::read(server.root.join("moved.bin")).unwrap(), new.concat());
    assert_eq!(committed.received_bytes, MIB);
    assert_eq!(committed.reused_bytes, 20 * MIB);
}

/// An edit that keeps the first pieces' chunks in place (a changed first block) is not streamed: the receiver
/// gathers the whole manifest (an in-place write stays possible) and answers only after its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_in_place_gathers_the_whole_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_holding(dir.path(), "edited.bin").await;

    let new = blocks(&[99].into_iter().chain(seeds(2, 19)).collect::<Vec<_>>());
    let mut conn = greeted(server.addr).await;
    assert_eq!(
        offer_one_piece(&mut conn, "edited.bin", &new).await,
        None,
        "no answer before the end"
    );
    let committed = send_rest_and_commit(&mut conn, &new, &[]).await;
    assert_eq!(std::fs::read(server.root.join("edited.bin")).unwrap(), new.concat());
    assert_eq!(committed.received_bytes, MIB, "only the changed block came");
}

/// An edit of the first block gathers the manifest for an in-place write. While it is gathered, the receiver hashes
/// the blocks kept in place after the edit (BLAKE3 subtrees of the old version's bytes), and the whole-file digest
/// at commit takes those instead of reading the blocks back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_kept_after_an_edit_are_hashed_while_the_manifest_is_gathered() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_holding(dir.path(), "head.bin").await;

    let new = blocks(&[99].into_iter().chain(seeds(2, 19)).collect::<Vec<_>>());
    let mut conn = greeted(server.addr).await;
    assert_eq!(offer_one_piece(&mut conn, "head.bin", &new).await, None, "gathered");
    let committed = send_rest_and_commit(&mut conn, &new, &[]).await;
    assert_eq!(std::fs::read(server.root.join("head.bin")).unwrap(), new.concat());
    assert_eq!(committed.received_bytes, MIB, "only the changed block came");
    let log = std::fs::read_to_string(server.root.with_extension("server.log")).unwrap();
    let (line, bytes) = logged_bytes(&log, "chunks kept after the change were hashed");
    // Blocks 1 to 19, but the file's last 1 KiB chunk (hashed at commit: it is the tree's right edge).
    assert_eq!(bytes, 19 * MIB - 1024, "{line}");
    // And the digest at commit took them instead of reading them back (the last commit's line is this push's).
    let verified = log.lines().rev().find(|l| l.contains("verifying the whole file"));
    let verified = verified.expect("the commit logs what it hashed");
    assert_eq!(logged_number(verified, "known"), 19 * MIB - 1024, "{verified}");
    assert!(logged_number(verified, "read_back") < MIB, "{verified}");
}

/// A byte of the old version changed behind the receiver's back (size and mtime put back) inside the blocks hashed
/// ahead after an edit: the digest at commit does not match, the damaged block is found and asked for, and the
/// file lands verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_block_hashed_ahead_after_an_edit_is_caught_at_commit() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_holding(dir.path(), "rot.bin").await;
    let target = server.root.join("rot.bin");
    damage_block_ten(&target);

    let new = blocks(&[99].into_iter().chain(seeds(2, 19)).collect::<Vec<_>>());
    let mut conn = greeted(server.addr).await;
    assert_eq!(offer_one_piece(&mut conn, "rot.bin", &new).await, None, "gathered");
    let committed = send_rest_and_commit(&mut conn, &new, &[]).await;
    assert_eq!(std::fs::read(&target).unwrap(), new.concat());
    assert_eq!(
        committed.received_bytes,
        2 * MIB,
        "the edited block and the damaged one came"
    );
}

/// A block of the old version that no longer holds its committed bytes (changed in place, its size and mtime
/// put back) is not copied: the receiver finds it wrong on the way and asks the sender for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_block_of_the_old_version_is_asked_for_instead_of_copied() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_holding(dir.path(), "rotted.bin").await;
    let target = server.root.join("rotted.bin");
    damage_block_ten(&target);

    let new = blocks(&[99].into_iter().chain(seeds(1, 20)).collect::<Vec<_>>());
    let mut conn = greeted(server.addr).await;
    let asked = offer_one_piece(&mut conn, "rotted.bin", &new).await;
    assert_eq!(asked.as_deref(), Some(&[0][..]));
    let committed = send_rest_and_commit(&mut conn, &new, &[0]).await;
    assert_eq!(std::fs::read(&target).unwrap(), new.concat());
    assert_eq!(
        committed.received_bytes,
        2 * MIB,
        "the new block and the changed one came over the wire"
    );
}
