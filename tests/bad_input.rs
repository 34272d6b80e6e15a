//! Hostile and broken peers: garbage, oversized frames, wrong versions, bad manifests, path traversal and
//! planted symlinks. Each gets a clear error code; the server keeps serving others.

use std::time::Duration;

use ferry::manifest::{ChunkEntry, Chunking, FileTime, Manifest};
use ferry::wire::{
    Connection, EntryKind, ErrorCode, FileData, Hello, Message, Offer, Pull, TreeEntry, TreeOffer, MAGIC,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::util::*;

/// Sends raw bytes and returns the error code of the frame the server answers with.
async fn error_code_for_raw(server: &TestServer, bytes: &[u8]) -> ErrorCode {
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut conn = Connection::new(stream, ferry::MAX_FRAME);
    match tokio::time::timeout(Duration::from_secs(20), conn.read_message()).await {
        Ok(Ok(Some(Message::Error(frame)))) => frame.code,
        other => panic!("expected an Error frame, got {other:?}"),
    }
}

const V: u16 = ferry::PROTOCOL_VERSION;

fn hello(min_version: u16, max_version: u16, magic: [u8; 8]) -> Message {
    Message::Hello(Hello {
        magic,
        min_version,
        max_version,
        agent: "test".into(),
        client: String::new(),
    })
}

/// Greets the server properly, then sends `msg` and returns the answer's error code.
async fn error_code_after_hello(server: &TestServer, msg: Message) -> ErrorCode {
    error_after_hello(server, msg).await.code
}

/// The Error frame the server answers `msg` with on a fresh, greeted connection.
async fn error_after_hello(server: &TestServer, msg: Message) -> ferry::wire::ErrorFrame {
    let mut conn = greeted(server.addr).await;
    conn.write_message(&msg).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(20), conn.read_message()).await {
        Ok(Ok(Some(Message::Error(frame)))) => frame,
        other => panic!("expected an Error frame, got {other:?}"),
    }
}

fn offer(path: &str, manifest: Manifest) -> Message {
    Message::Offer(Offer {
        path: path.into(),
        manifest,
    })
}

fn manifest(chunks: Vec<ChunkEntry>, size: u64) -> Manifest {
    Manifest {
        size,
        digest: [0; 32],
        chunking: Chunking::Fixed { size: 4096 },
        mtime: FileTime::default(),
        mode: 0o644,
        chunks,
    }
}

fn one_chunk(len: u32) -> ChunkEntry {
    ChunkEntry {
        offset: 0,
        len,
        hash: [1; 32],
    }
}

/// One round of hostile connections, each answered with the right error code.
async fn attack_round(server: &TestServer) {
    // A first frame that is not a ferry Hello, whatever it is, is BadMagic (proto-spec.md §3).
    assert_eq!(
        error_code_for_raw(server, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await,
        ErrorCode::BadMagic
    );
    assert_eq!(
        error_code_for_raw(server, &[0xff, 0xff, 0xff, 0xff, 1, 2, 3]).await,
        ErrorCode::BadMagic
    );
    let undecodable = [0, 0, 0, 8, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0];
    assert_eq!(error_code_for_raw(server, &undecodable).await, ErrorCode::BadMagic);
    let mut bad_magic = Vec::new();
    ferry::wire::codec::encode_frame(&hello(V, V, *b"NOTFERRY"), ferry::MAX_FRAME, &mut bad_magic).unwrap();
    assert_eq!(error_code_for_raw(server, &bad_magic).await, ErrorCode::BadMagic);
    let mut future = Vec::new();
    ferry::wire::codec::encode_frame(&hello(7, 9, MAGIC), ferry::MAX_FRAME, &mut future).unwrap();
    assert_eq!(error_code_for_raw(server, &future).await, ErrorCode::VersionMismatch);
    assert_eq!(
        error_code_after_hello(server, Message::Commit).await,
        ErrorCode::UnexpectedMessage
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_frames_are_refused_while_a_push_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let src = dir.path().join("during.bin");
    let size = 32 * MIB as u64;
    write_random(&src, size as usize, 9);
    let state = dir.path().join("state");
    // The push goes through a pass-through proxy that counts its bytes; the attacks go to the server directly.
    let proxy = ferry::fault::FaultProxy::start("127.0.0.1:0", server.addr, vec![])
        .await
        .unwrap();
    let pushed = || proxy.stats().bytes_up.load(std::sync::atomic::Ordering::Relaxed);
    let url = format!("ferry://{}/during.bin", proxy.addr());
    let done = std::sync::atomic::AtomicBool::new(false);
    // 32 MiB at 8 MiB/s keeps the transfer open for at least 4 s, long enough for many attack rounds.
    let args = [
        "--chunking",
        "fixed",
        "--chunk-size",
        "64KiB",
        "--window",
        "1MiB",
        "--bwlimit",
        "8MiB",
    ];
    let pushing = async {
        let out = push(&src, &url, &state, &args).await;
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        out
    };
    let partials = server.root.join(".ferry/partial");
    let in_progress = || {
        std::fs::read_dir(&partials).is_ok_and(|mut d| d.next().is_some()) && !server.root.join("during.bin").exists()
    };
    let attacks = async {
        // Rounds answered while the push was under way: they began and ended while the server held the partial, and
        // the push's bytes kept flowing meanwhile (a server that served one connection at a time would answer
        // them only after the push, or hold the push up while it answered them).
        let mut rounds_during_transfer = 0;
        while !done.load(std::sync::atomic::Ordering::SeqCst) {
            let (began, bytes_before) = (in_progress(), pushed());
            attack_round(&server).await;
            if began && in_progress() && pushed() > bytes_before {
                rounds_during_transfer += 1;
            }
            if !began {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
        rounds_during_transfer
    };
    let (out, rounds) = tokio::join!(pushing, attacks);
    out.assert_ok();
    assert!(
        rounds >= 3,
        "only {rounds} attack rounds were answered while the push went on"
    );
    assert_eq!(b3(&server.root.join("during.bin")), b3(&src));
    // The attacks cost the push nothing: one connection, every byte sent once.
    assert_eq!(out.u64("attempts"), 1, "{}", out.json);
    assert_eq!(out.u64("bytes_sent"), size, "{}", out.json);
    // Still serving after all that.
    attack_round(&server).await;
    push(&src, &server.url("after.bin"), &state, &[]).await.assert_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_that_do_not_tile_the_file_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let gap = ChunkEntry {
        offset: 5000,
        ..one_chunk(4096)
    };
    let cases = [
        manifest(vec![one_chunk(4096)], 5000),
        manifest(vec![one_chunk(4096), gap], 9096),
        manifest(vec![one_chunk(0)], 0),
        manifest(
            vec![one_chunk(ferry::MAX_CHUNK_SIZE + 1)],
            u64::from(ferry::MAX_CHUNK_SIZE) + 1,
        ),
        manifest(vec![], 10),
    ];
    let chunked = |chunking: Chunking| Manifest {
        chunking,
        ..manifest(vec![one_chunk(4096)], 4096)
    };
    let bad_chunking = [
        chunked(Chunking::FastCdc { min: 0, avg: 0, max: 0 }),
        chunked(Chunking::FastCdc {
            min: 64,
            avg: 256,
            max: 1024,
        }), // within fastcdc's bounds, but chunks under 4 KiB
        chunked(Chunking::FastCdc {
            min: 1 << 20,
            avg: 1 << 16,
            max: 1 << 22,
        }), // min > avg
        chunked(Chunking::Fixed { size: 1 }),
    ];
    for bad in cases.into_iter().chain(bad_chunking) {
        assert_eq!(
            error_code_after_hello(&server, offer("x.bin", bad)).await,
            ErrorCode::BadManifest
        );
    }
    assert!(!server.root.join("x.bin").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traversal_absolute_and_reserved_paths_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    for path in [
        "../escape",
        "a/../../escape",
        "/etc/passwd",
        ".ferry/state/db",
        "a//b",
        "",
        "dir/",
    ] {
        let code = error_code_after_hello(&server, offer(path, manifest(vec![], 0))).await;
        assert_eq!(code, ErrorCode::BadPath, "{path:?}");
    }
    assert!(!dir.path().join("escape").exists());

    let src = dir.path().join("f");
    write_random(&src, 10, 1);
    let state = dir.path().join("state");
    let out = push(&src, &format!("ferry://{}/../escape", server.addr), &state, &[]).await;
    assert_eq!(out.code, 2, "the client refuses '..' itself, as a usage error");
}

/// Reads the file at `components` below `root` through `openat`, one component per call.
fn read_at(root: &std::path::Path, components: &[String]) -> Vec<u8> {
    use std::io::Read;
    use std::os::fd::FromRawFd;
    let mut dir = std::fs::File::open(root).unwrap();
    for (n, component) in components.iter().enumerate() {
        let name = std::ffi::CString::new(component.as_str()).unwrap();
        let flags = if n + 1 < components.len() { libc::O_DIRECTORY } else { 0 };
        // SAFETY: `name` is NUL-terminated; the descriptor is owned by the File below.
        let fd = unsafe {
            libc::openat(
                std::os::fd::AsRawFd::as_raw_fd(&dir),
                name.as_ptr(),
                libc::O_RDONLY | flags,
            )
        };
        assert!(fd >= 0, "openat {component}: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor nothing else owns.
        dir = unsafe { std::fs::File::from_raw_fd(fd) };
    }
    let mut data = Vec::new();
    dir.read_to_end(&mut data).unwrap();
    data
}

/// proto-spec.md §7/§10: the path limit is the protocol's (4096 bytes), not the server's root plus the path. A path
/// of exactly 4096 bytes lands under a root that is itself ~1.6 KiB deep (root + path > PATH_MAX), and one byte
/// more is refused with a message that keeps its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_of_the_protocol_maximum_lands_under_a_deep_root_and_one_byte_more_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let mut root = dir.path().to_path_buf();
    for n in 0..8 {
        root.push(format!("{n}{}", "d".repeat(199)));
    }
    let server = TestServer::start(&root);
    let components: Vec<String> = (0..17).map(|n| format!("{:x}{}", n % 16, "p".repeat(239))).collect();
    let longest = components.join("/");
    assert_eq!(longest.len(), ferry::path::MAX_PATH_LEN);
    assert!(
        root.as_os_str().len() + 1 + longest.len() > 4096,
        "beyond the OS limit as one path"
    );

    let src = dir.path().join("f");
    let data = write_random(&src, 5000, 9);
    let state = dir.path().join("state");
    let out = push(&src, &server.url(&longest), &state, &[]).await;
    out.assert_ok();
    // Read it back one directory at a time: the whole path is too long for a single system call.
    assert_eq!(
        read_at(&root, &components),
        data,
        "the file landed intact at the full path"
    );
    let again = push(&src, &server.url(&longest), &state, &[]).await;
    again.assert_ok();
    assert_eq!(
        again.json["already_present"], true,
        "found committed at the long path: {}",
        again.json
    );
    // Serving a Pull opens the file through the same descriptor walk (proto-spec.md §7), so it works at this depth
    // too, past the operating system's PATH_MAX for the whole path.
    let back = dir.path().join("back");
    let pulled = pull(&server.url(&longest), &back, &state, &[]).await;
    pulled.assert_ok();
    assert_eq!(std::fs::read(&back).unwrap(), data, "pulled back intact");

    let too_long = format!("{longest}x");
    let frame = error_after_hello(&server, offer(&too_long, manifest(vec![], 0))).await;
    assert_eq!(frame.code, ErrorCode::BadPath);
    assert!(
        frame
            .message
            .contains("4097 bytes, over the protocol limit of 4096 bytes"),
        "{}",
        frame.message
    );
    assert!(frame.message.len() < 1024, "not cut: {}", frame.message);
    // A component over 255 bytes deep inside a long path is named by its position.
    let long_component = format!("{}/{}/f", components[..3].join("/"), "c".repeat(256));
    let frame = error_after_hello(&server, offer(&long_component, manifest(vec![], 0))).await;
    assert_eq!(frame.code, ErrorCode::BadPath);
    assert!(
        frame
            .message
            .contains("component 4 is 256 bytes, over the limit of 255 bytes"),
        "{}",
        frame.message
    );
}

/// The next message that is not an Ack (Acks of a batch may come in any number).
async fn next_reply(conn: &mut Connection<TcpStream>) -> Message {
    tokio::time::timeout(Duration::from_secs(20), conn.read_message())
        .await
        .expect("an answer in time")
        .unwrap()
        .expect("no close")
}

/// proto-spec.md §4/§8, once "left undefined": a chunk already durable (so not in the current Need) is
/// acknowledged again and neither written nor counted; `received_bytes` counts each durable chunk once; a receiver
/// takes exactly 8 commit rounds (the first Need opens round 1) and answers the 8th Commit that still leaves chunks
/// missing with `Error{UnexpectedMessage}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_acknowledged_again_and_commit_rounds_stop_after_eight() {
    use ferry::wire::Chunk;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    // Two files of two 5000-byte chunks each, with no content in common (nothing to reuse between them).
    let files = [[vec![1u8; 5000], vec![2u8; 5000]], [vec![3u8; 5000], vec![4u8; 5000]]];
    let two_chunks = |parts: &[Vec<u8>; 2]| Manifest {
        size: 10_000,
        digest: *blake3::hash(&parts.concat()).as_bytes(),
        chunking: Chunking::Fixed { size: 5000 },
        mtime: FileTime::default(),
        mode: 0o644,
        chunks: (0..2)
            .map(|i| ChunkEntry {
                offset: 5000 * i as u64,
                len: 5000,
                hash: *blake3::hash(&parts[i]).as_bytes(),
            })
            .collect(),
    };
    let chunk = |parts: &[Vec<u8>; 2], i: usize| {
        Message::Chunk(Chunk {
            index: i as u32,
            data: parts[i].clone(),
        })
    };
    let ack0 = |m: &Message| matches!(m, Message::Ack(a) if a.ranges.len() == 1 && a.ranges[0].start == 0);

    // Round 1 (the Need after the Offer) to round 8 (the Need after the 7th Commit); the 8th Commit completes.
    let mut conn = greeted(server.addr).await;
    let parts = &files[0];
    conn.write_message(&offer("rounds.bin", two_chunks(parts)))
        .await
        .unwrap();
    assert!(matches!(next_reply(&mut conn).await, Message::Need(n) if n.ranges.len() == 1 && n.ranges[0].count == 2));
    conn.write_message(&chunk(parts, 0)).await.unwrap();
    assert!(ack0(&next_reply(&mut conn).await));
    conn.write_message(&chunk(parts, 0)).await.unwrap();
    assert!(ack0(&next_reply(&mut conn).await), "a duplicate is acknowledged again");
    for round in 2..=8 {
        conn.write_message(&Message::Commit).await.unwrap();
        let need = next_reply(&mut conn).await;
        assert!(
            matches!(&need, Message::Need(n) if n.ranges.len() == 1 && n.ranges[0].start == 1),
            "round {round}: {need:?}"
        );
    }
    conn.write_message(&chunk(parts, 1)).await.unwrap();
    assert!(matches!(next_reply(&mut conn).await, Message::Ack(_)));
    conn.write_message(&Message::Commit).await.unwrap();
    match next_reply(&mut conn).await {
        Message::Committed(c) => {
            assert_eq!(
                (c.received_bytes, c.reused_bytes, c.rejected_chunks),
                (10_000, 0, 0),
                "{c:?}"
            );
        }
        other => panic!("the 8th Commit completes: {other:?}"),
    }
    assert_eq!(std::fs::read(server.root.join("rounds.bin")).unwrap(), parts.concat());

    // The same with chunk 1 never sent: the 8th Commit is refused.
    let mut conn = greeted(server.addr).await;
    let parts = &files[1];
    conn.write_message(&offer("never.bin", two_chunks(parts)))
        .await
        .unwrap();
    assert!(matches!(next_reply(&mut conn).await, Message::Need(_)));
    conn.write_message(&chunk(parts, 0)).await.unwrap();
    assert!(ack0(&next_reply(&mut conn).await));
    for round in 2..=8 {
        conn.write_message(&Message::Commit).await.unwrap();
        assert!(matches!(next_reply(&mut conn).await, Message::Need(_)), "round {round}");
    }
    conn.write_message(&Message::Commit).await.unwrap();
    match next_reply(&mut conn).await {
        Message::Error(frame) => {
            assert_eq!(
                (frame.code, frame.retryable),
                (ErrorCode::UnexpectedMessage, false),
                "{}",
                frame.message
            );
            assert!(frame.message.contains("8 commit rounds"), "{}", frame.message);
        }
        other => panic!("expected UnexpectedMessage after the 8th Commit, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinks_planted_inside_the_root_are_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, server.root.join("link")).unwrap();
    std::os::unix::fs::symlink(outside.join("target"), server.root.join("file-link")).unwrap();
    let src = dir.path().join("f");
    write_random(&src, 1000, 1);
    let state = dir.path().join("state");
    for dest in ["link/x", "file-link"] {
        let out = push(&src, &server.url(dest), &state, &[]).await;
        assert_eq!(out.code, 4, "rejected by server: {}", out.json);
        assert!(out.json["error"].as_str().unwrap().contains("symlink"), "{}", out.json);
    }
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "nothing was written outside the root"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_dropped_after_the_handshake_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(&dir.path().join("root"), &["--handshake-timeout", "1s"]);
    let started = std::time::Instant::now(); // before the server's clock starts at accept
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(&[0, 0, 1, 0]).await.unwrap(); // promises 256 bytes, sends none
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "server closed the stalled connection");
    // A server that closes at once fails here; only the handshake timeout (1 s) may close it.
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed after {:?}, before the handshake timeout",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_silent_after_the_handshake_is_dropped_at_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(&dir.path().join("root"), &["--idle-timeout", "1s"]);
    let stream = TcpStream::connect(server.addr).await.unwrap();
    let mut conn = Connection::new(stream, ferry::MAX_FRAME);
    conn.write_message(&hello(V, V, MAGIC)).await.unwrap();
    assert!(matches!(conn.read_message().await.unwrap(), Some(Message::Welcome(_))));
    let started = std::time::Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(30), conn.read_message()).await;
    match answer {
        Ok(Ok(Some(Message::Error(frame)))) => assert_eq!(frame.code, ErrorCode::Timeout),
        other => panic!("expected a Timeout error frame, got {other:?}"),
    }
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "not before the idle timeout"
    );
    assert!(
        matches!(conn.read_message().await, Ok(None) | Err(_)),
        "then the server closes"
    );
}

fn file_entry(path: &str, data: &[u8]) -> TreeEntry {
    TreeEntry {
        path: path.into(),
        kind: EntryKind::File {
            size: data.len() as u64,
            digest: *blake3::hash(data).as_bytes(),
            mtime: FileTime::default(),
            mode: 0o644,
        },
    }
}

fn tree_offer(path: &str, entries: Vec<TreeEntry>) -> Message {
    Message::TreeOffer(TreeOffer {
        path: path.into(),
        entries,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tree_offers_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let link = |path: &str, target: &str| TreeEntry {
        path: path.into(),
        kind: EntryKind::Symlink { target: target.into() },
    };
    let cases = [
        (
            "traversal in an entry",
            tree_offer("t", vec![file_entry("../escape", b"x")]),
        ),
        ("absolute entry", tree_offer("t", vec![file_entry("/etc/passwd", b"x")])),
        (
            "traversal in the tree path",
            tree_offer("../t", vec![file_entry("a", b"x")]),
        ),
        ("reserved tree path", tree_offer(".ferry", vec![file_entry("a", b"x")])),
        (
            "entries out of order",
            tree_offer("t", vec![file_entry("b", b"x"), file_entry("a", b"x")]),
        ),
        (
            "duplicate entries",
            tree_offer("t", vec![file_entry("a", b"x"), file_entry("a", b"y")]),
        ),
        ("absolute symlink", tree_offer("t", vec![link("l", "/etc/passwd")])),
        ("symlink climbing out", tree_offer("t", vec![link("d/l", "../../x")])),
    ];
    for (what, offer) in cases {
        assert_eq!(
            error_code_after_hello(&server, offer).await,
            ErrorCode::BadPath,
            "{what}"
        );
    }
    let too_many = (0..=ferry::MAX_TREE_ENTRIES)
        .map(|i| file_entry(&format!("{i:08}"), b""))
        .collect();
    assert_eq!(
        error_code_after_hello(&server, tree_offer("t", too_many)).await,
        ErrorCode::BadManifest
    );
    assert!(!server.root.join("t").exists(), "nothing was created");
    assert!(!dir.path().join("escape").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_data_that_does_not_match_its_entry_ends_the_session_unwritten() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    for (entry, data) in [(0u32, b"too long!".to_vec()), (5, b"hello".to_vec())] {
        let stream = TcpStream::connect(server.addr).await.unwrap();
        let mut conn = Connection::new(stream, ferry::MAX_FRAME);
        conn.write_message(&hello(V, V, MAGIC)).await.unwrap();
        assert!(matches!(conn.read_message().await.unwrap(), Some(Message::Welcome(_))));
        conn.write_message(&tree_offer("t", vec![file_entry("a.txt", b"hello")]))
            .await
            .unwrap();
        assert!(matches!(conn.read_message().await.unwrap(), Some(Message::TreeNeed(_))));
        conn.write_message(&Message::FileData(FileData { entry, data }))
            .await
            .unwrap();
        match tokio::time::timeout(Duration::from_secs(20), conn.read_message()).await {
            Ok(Ok(Some(Message::Error(frame)))) => assert_eq!(frame.code, ErrorCode::UnexpectedMessage),
            other => panic!("expected an Error frame, got {other:?}"),
        }
    }
    assert!(!server.root.join("t/a.txt").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_cannot_reach_outside_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let secret = dir.path().join("secret.txt");
    std::fs::write(&secret, b"outside the root").unwrap();
    std::os::unix::fs::symlink(&secret, server.root.join("planted")).unwrap();
    std::os::unix::fs::symlink(dir.path(), server.root.join("planted-dir")).unwrap();
    let pull_msg = |path: &str| {
        Message::Pull(Pull {
            path: path.into(),
            chunking: Default::default(),
            window: 1 << 20,
            links: Default::default(),
        })
    };
    for path in [
        "../secret.txt",
        "/etc/passwd",
        "planted",
        "planted-dir/secret.txt",
        ".ferry/state/db",
    ] {
        let code = error_code_after_hello(&server, pull_msg(path)).await;
        assert_eq!(code, ErrorCode::BadPath, "{path:?}");
    }
    assert_eq!(
        error_code_after_hello(&server, pull_msg("nope")).await,
        ErrorCode::NotFound
    );

    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = pull(&server.url("planted"), &out_dir, &dir.path().join("state"), &[]).await;
    assert_eq!(out.code, 4, "rejected: {}", out.json);
    assert_eq!(std::fs::read_dir(&out_dir).unwrap().count(), 0, "nothing was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_of_many_copies_of_a_held_file_is_settled_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let seed = dir.path().join("seed.bin");
    let data = write_random(&seed, MIB, 42);
    push(&seed, &server.url("seed.bin"), &dir.path().join("state"), &[])
        .await
        .assert_ok();

    // 300 entries whose content the server already holds: settled locally, without any byte sent.
    let entries = (0..300).map(|i| file_entry(&format!("copy{i:03}"), &data)).collect();
    let stream = TcpStream::connect(server.addr).await.unwrap();
    let mut conn = Connection::new(stream, ferry::MAX_FRAME);
    conn.write_message(&hello(V, V, MAGIC)).await.unwrap();
    assert!(matches!(conn.read_message().await.unwrap(), Some(Message::Welcome(_))));
    conn.write_message(&tree_offer("copies", entries)).await.unwrap();
    let need = loop {
        match conn.read_message().await.unwrap() {
            Some(Message::Ping(nonce)) => conn.write_message(&Message::Pong(nonce)).await.unwrap(),
            other => break other,
        }
    };
    let Some(Message::TreeNeed(need)) = need else {
        panic!("expected TreeNeed, got {need:?}")
    };
    assert!(need.entries.is_empty(), "every copy came from the held file");
    assert_eq!(b3(&server.root.join("copies/copy299")), b3(&seed));
    let peak = peak_rss_mib(server.child.id());
    assert!(peak < 128, "server peaked at {peak} MiB settling 300 MiB of copies");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_over_the_size_limit_are_refused_alone_or_in_a_tree() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(&dir.path().join("root"), &["--max-file-size", "1MiB"]);
    let state = dir.path().join("state");
    let big = dir.path().join("big.bin");
    write_random(&big, 2 * MIB, 71);
    let out = push(&big, &server.url("big.bin"), &state, &[]).await;
    assert_eq!(out.code, 4, "{}", out.json);
    assert!(
        out.json["error"].as_str().unwrap().contains("larger than"),
        "{}",
        out.json
    );
    assert!(!server.root.join("big.bin").exists());

    let tree = dir.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    std::fs::copy(&big, tree.join("big.bin")).unwrap();
    write_random(&tree.join("small.txt"), 1000, 72);
    let out = push(&tree, &server.url("t"), &state, &[]).await;
    assert_eq!(out.code, 4, "{}", out.json);
    assert_eq!(out.u64("files_missing"), 1, "{}", out.json);
    assert!(!server.root.join("t/big.bin").exists());
    assert_eq!(
        b3(&server.root.join("t/small.txt")),
        b3(&tree.join("small.txt")),
        "the rest arrived"
    );
}
