//! Trees: `ferry push DIR` and tree pulls through the real binaries — whole-tree fidelity (content, mode, mtime,
//! empty dirs, recorded symlinks), unchanged files skipped, interrupted runs resumed, and many small files
//! pipelined instead of paying a round trip each.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use ferry::fault::{FaultProxy, Faults};

use crate::util::*;

/// Builds a tree of `small` files (1 B..64 KiB, nested three deep) plus `large` files of 3 MiB, an empty
/// directory, an empty file, and a symlink inside the tree. Returns the total file bytes.
pub(crate) fn make_tree(dir: &Path, small: usize, large: usize, seed: u64) -> u64 {
    let mut total = 0;
    for i in 0..small {
        let sub = dir.join(format!("d{}/s{}", i % 7, i % 3));
        std::fs::create_dir_all(&sub).unwrap();
        let size = (i * 7919 + seed as usize * 31) % (64 * KIB) + 1;
        let path = sub.join(format!("f{i}.dat"));
        write_random(&path, size, seed * 100_000 + i as u64);
        if i % 5 == 0 {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        set_mtime(
            &path,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_500_000_000 + i as u64),
        );
        total += size as u64;
    }
    for i in 0..large {
        write_random(&dir.join(format!("large-{i}.img")), 3 * MIB, seed * 7 + i as u64);
        total += 3 * MIB as u64;
    }
    std::fs::create_dir_all(dir.join("empty/dir")).unwrap();
    std::fs::create_dir_all(dir.join("private/deep")).unwrap();
    std::fs::write(dir.join("private/deep/note.txt"), b"keys").unwrap();
    for (path, mode, secs) in [
        ("private/deep", 0o750, 1_400_000_000),
        ("private", 0o700, 1_400_000_100),
    ] {
        std::fs::set_permissions(dir.join(path), std::fs::Permissions::from_mode(mode)).unwrap();
        let when = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
        std::fs::File::open(dir.join(path)).unwrap().set_modified(when).unwrap();
    }
    std::fs::write(dir.join("zero.txt"), b"").unwrap();
    std::os::unix::fs::symlink("d0/s0/f0.dat", dir.join("latest")).unwrap();
    total + 4
}

/// Asserts that `copy` holds exactly the tree at `original`: same entries, kinds, content, permission bits, file
/// mtimes and symlink targets.
pub(crate) fn assert_same_tree(original: &Path, copy: &Path) {
    let list = |root: &Path| {
        let mut out = Vec::new();
        let mut pending = vec![root.to_path_buf()];
        while let Some(dir) = pending.pop() {
            for item in std::fs::read_dir(&dir).unwrap() {
                let path = item.unwrap().path();
                let rel = path.strip_prefix(root).unwrap().to_path_buf();
                if rel.to_string_lossy().starts_with(".ferry") {
                    continue;
                }
                let meta = std::fs::symlink_metadata(&path).unwrap();
                if meta.is_dir() {
                    pending.push(path.clone());
                }
                out.push(rel);
            }
        }
        out.sort();
        out
    };
    let (a, b) = (list(original), list(copy));
    assert_eq!(a, b, "same entries");
    for rel in a {
        let (x, y) = (original.join(&rel), copy.join(&rel));
        let (mx, my) = (
            std::fs::symlink_metadata(&x).unwrap(),
            std::fs::symlink_metadata(&y).unwrap(),
        );
        assert_eq!(mx.file_type(), my.file_type(), "{}", rel.display());
        if mx.file_type().is_symlink() {
            assert_eq!(std::fs::read_link(&x).unwrap(), std::fs::read_link(&y).unwrap());
        } else {
            if mx.is_file() {
                assert_eq!(b3(&x), b3(&y), "{}", rel.display());
            }
            assert_eq!(
                mx.modified().unwrap(),
                my.modified().unwrap(),
                "mtime of {}",
                rel.display()
            );
        }
        if !mx.file_type().is_symlink() {
            assert_eq!(
                mx.permissions().mode() & 0o777,
                my.permissions().mode() & 0o777,
                "mode of {}",
                rel.display()
            );
        }
    }
}

pub(crate) const LINKS: [&str; 2] = ["--links", "record"];

/// Regular files under `original` that `copy` holds with the same content: their count and bytes.
fn files_matching(original: &Path, copy: &Path) -> (u64, u64) {
    let (mut count, mut bytes) = (0, 0);
    let mut pending = vec![std::path::PathBuf::new()];
    while let Some(rel) = pending.pop() {
        for item in std::fs::read_dir(original.join(&rel)).unwrap() {
            let rel = rel.join(item.unwrap().file_name());
            let meta = std::fs::symlink_metadata(original.join(&rel)).unwrap();
            if meta.is_dir() {
                pending.push(rel);
            } else if meta.is_file() && copy.join(&rel).is_file() && b3(&original.join(&rel)) == b3(&copy.join(&rel)) {
                count += 1;
                bytes += meta.len();
            }
        }
    }
    (count, bytes)
}

/// The manifest the client builds for `path` with its default chunking (the one a tree push uses).
fn manifest_of(path: &Path) -> ferry::manifest::Manifest {
    let file = std::fs::File::open(path).unwrap();
    let spec = ferry::chunk::ChunkSpec {
        mode: ferry::settings::DEFAULT_CHUNKING,
        size: ferry::DEFAULT_CHUNK_SIZE,
    };
    ferry::chunk::build_manifest(&file, path, spec).unwrap()
}

/// Bytes of the chunks of `path`'s manifest whose hash is not among `before`'s chunks: what a receiver holding the
/// old file must be sent, by the same chunker the client runs.
fn changed_chunk_bytes(before: &ferry::manifest::Manifest, path: &Path) -> u64 {
    let held: std::collections::HashSet<_> = before.chunks.iter().map(|c| c.hash).collect();
    let mut seen = std::collections::HashSet::new();
    manifest_of(path)
        .chunks
        .iter()
        .filter(|c| !held.contains(&c.hash) && seen.insert(c.hash))
        .map(|c| u64::from(c.len))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_arrives_whole_and_only_what_changed_is_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let state = dir.path().join("state");
    let src = dir.path().join("home");
    let total = make_tree(&src, 300, 2, 1);
    std::os::unix::fs::symlink("/etc/passwd", src.join("escape")).unwrap();
    let url = server.url("backups/laptop");
    let dest = server.root.join("backups/laptop");

    let first = push(&src, &url, &state, &LINKS).await;
    first.assert_ok();
    assert_eq!(first.json["kind"], "tree");
    assert_eq!(first.u64("bytes_sent"), total, "every byte once: {}", first.json);
    assert_eq!(
        first.json["skipped"][0]["path"], "escape",
        "a symlink leaving the tree is never recreated"
    );
    std::fs::remove_file(src.join("escape")).unwrap();
    assert_same_tree(&src, &dest);

    let again = push(&src, &url, &state, &LINKS).await;
    again.assert_ok();
    assert_eq!(again.u64("files_needed"), 0);
    assert_eq!(again.u64("bytes_sent"), 0);
    assert_eq!(again.u64("files_unchanged"), again.u64("files"));

    // One small file rewritten, 100 bytes changed in the middle of a large one.
    let before = manifest_of(&src.join("large-0.img"));
    write_random(&src.join("d1/s1/f1.dat"), 5000, 99);
    let mut large = std::fs::read(src.join("large-0.img")).unwrap();
    large[MIB + 5..MIB + 105].fill(0xee);
    std::fs::write(src.join("large-0.img"), &large).unwrap();
    let changed = changed_chunk_bytes(&before, &src.join("large-0.img"));
    assert!(
        changed < 3 * MIB as u64 / 2,
        "a 100-byte edit touches only part of the large file's chunks ({changed} bytes)"
    );
    let third = push(&src, &url, &state, &LINKS).await;
    third.assert_ok();
    assert_eq!(third.u64("files_needed"), 2);
    let (sent, reused) = (third.u64("bytes_sent"), third.u64("bytes_reused"));
    // Exactly what changed crosses: the rewritten small file whole (inline) and, of the large file, only the chunks
    // whose hash the server does not already hold. Resending the whole large file fails here.
    assert_eq!(sent, 5000 + changed, "only the changed chunks: {}", third.json);
    assert_eq!(
        sent + reused,
        5000 + 3 * MIB as u64,
        "every byte of the two files sent or reused"
    );
    assert_same_tree(&src, &dest);

    // Someone edits a file on the server: the record no longer matches the disk, so it is sent again.
    write_random(&dest.join("d2/s2/f2.dat"), 100, 7);
    let fourth = push(&src, &url, &state, &LINKS).await;
    fourth.assert_ok();
    assert_eq!(fourth.u64("files_needed"), 1, "{}", fourth.json);
    assert_same_tree(&src, &dest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_small_file_is_asked_for_again_within_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let src = dir.path().join("docs");
    std::fs::create_dir_all(&src).unwrap();
    let size = MIB as u64; // the largest file sent whole in FileData
    write_random(&src.join("thesis.pdf"), size as usize, 8);
    let proxy = FaultProxy::start("127.0.0.1:0", server.addr, vec![Faults::flip(512 * KIB as u64)])
        .await
        .unwrap();
    let out = push(
        &src,
        &format!("ferry://{}/docs", proxy.addr()),
        &dir.path().join("state"),
        &[],
    )
    .await;
    out.assert_ok();
    assert_eq!(proxy.stats().flips.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(
        out.u64("attempts"),
        1,
        "no reconnect: the receiver asked again with TreeNeed"
    );
    assert_eq!(
        out.u64("bytes_sent"),
        2 * size,
        "the file was sent exactly twice: {}",
        out.json
    );
    assert_eq!(b3(&server.root.join("docs/thesis.pdf")), b3(&src.join("thesis.pdf")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_the_receiver_cannot_place_are_reported_missing() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a.txt"), b"a").unwrap();
    std::os::unix::fs::symlink("a.txt", src.join("link")).unwrap();
    std::fs::create_dir_all(server.root.join("t/link/occupied")).unwrap(); // a directory where the link goes
    let out = push(&src, &server.url("t"), &dir.path().join("state"), &LINKS).await;
    assert_eq!(out.code, 4, "refused by the receiver: {}", out.json);
    assert_eq!(out.json["status"], "partial");
    assert_eq!(out.u64("files_missing"), 1, "{}", out.json);
    assert_eq!(
        std::fs::read(server.root.join("t/a.txt")).unwrap(),
        b"a",
        "the rest arrived"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_tree_push_resumes_and_skips_what_already_arrived() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let state = dir.path().join("state");
    let src = dir.path().join("srv");
    let total = make_tree(&src, 400, 2, 2);
    let proxy = FaultProxy::start("127.0.0.1:0", server.addr, vec![Faults::cut(total * 3 / 5)])
        .await
        .unwrap();
    let url = format!("ferry://{}/nightly", proxy.addr());
    let cut = push(&src, &url, &state, &["--retries", "0", "--links", "record"]).await;
    assert_eq!(cut.code, 3, "the cut run fails as a network failure: {}", cut.stderr);

    // The server still commits what it read before the cut (what the reset discarded is lost, as on a real
    // link); let it finish, then count what arrived whole.
    server
        .wait_for_log("session ended with an error", Duration::from_secs(30))
        .await;
    let dest = server.root.join("nightly");
    let (arrived, arrived_bytes) = files_matching(&src, &dest);
    assert!(arrived > 0, "some files were committed before the cut");

    let out = push(&src, &server.url("nightly"), &state, &LINKS).await;
    out.assert_ok();
    assert!(
        out.u64("files_unchanged") >= arrived,
        "committed files are skipped: {}",
        out.json
    );
    assert!(
        out.u64("bytes_sent") <= total - arrived_bytes,
        "{arrived_bytes} bytes had arrived: {}",
        out.json
    );
    assert_same_tree(&src, &dest);
}

/// A server killed (SIGKILL) while a tree's small files are being batched leaves only whole, verified files under
/// final names (each batch is written to temporaries, synced, then renamed); after a restart a second push
/// completes the tree, and no temporary shows anywhere in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_tree_leaves_only_whole_files_and_a_re_push_completes_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let mut server = TestServer::start(&root);
    let state = dir.path().join("state");
    let src = dir.path().join("photos");
    make_tree(&src, 1500, 0, 9);
    let url = server.url("photos");
    let pushing = {
        let (src, state) = (src.clone(), state.clone());
        tokio::spawn(async move { push(&src, &url, &state, &["--retries", "0", "--links", "record"]).await })
    };
    // Killed as soon as the first batch is in place, while later ones are on their way.
    let dest = root.join("photos");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while files_matching(&src, &dest).0 == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no file was ever committed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill9();
    let _ = pushing.await;
    let mut pending = vec![dest.clone()];
    while let Some(at) = pending.pop() {
        for item in std::fs::read_dir(&at).unwrap() {
            let path = item.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                pending.push(path);
            } else if meta.is_file() {
                let original = src.join(path.strip_prefix(&dest).unwrap());
                assert_eq!(
                    std::fs::read(&path).unwrap(),
                    std::fs::read(&original).unwrap_or_default(),
                    "{} under its final name is not the whole file",
                    path.display()
                );
            }
        }
    }

    let server = TestServer::start(&root);
    let out = push(&src, &server.url("photos"), &state, &LINKS).await;
    out.assert_ok();
    assert_same_tree(&src, &dest);
}

/// A one-connection proxy that forwards the server's frames up to and including the first `TreeNeed`, then holds
/// back everything else the server says until `release` is notified. Counts the bytes the client sends in `up`.
async fn gate_after_tree_need(
    upstream: std::net::SocketAddr,
    up: std::sync::Arc<std::sync::atomic::AtomicU64>,
    release: std::sync::Arc<tokio::sync::Notify>,
) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let server = tokio::net::TcpStream::connect(upstream).await.unwrap();
        let (mut client_rx, mut client_tx) = client.into_split();
        let (mut server_rx, mut server_tx) = server.into_split();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * KIB];
            while let Ok(n @ 1..) = client_rx.read(&mut buf).await {
                if server_tx.write_all(&buf[..n]).await.is_err() {
                    return;
                }
                up.fetch_add(n as u64, std::sync::atomic::Ordering::SeqCst);
            }
        });
        let mut pending = Vec::new();
        let mut buf = vec![0u8; 64 * KIB];
        'frames: loop {
            while let Some((message, used)) = ferry::wire::codec::decode_frame(&pending, ferry::MAX_FRAME).unwrap() {
                client_tx.write_all(&pending[..used]).await.unwrap();
                pending.drain(..used);
                if matches!(message, ferry::wire::Message::TreeNeed(_)) {
                    break 'frames;
                }
            }
            match server_rx.read(&mut buf).await {
                Ok(n @ 1..) => pending.extend_from_slice(&buf[..n]),
                _ => return,
            }
        }
        release.notified().await;
        client_tx.write_all(&pending).await.unwrap();
        let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_small_files_are_pipelined_not_a_round_trip_each() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let src = dir.path().join("mail");
    let (files, size) = (1000u64, 1024u64);
    for i in 0..files {
        let sub = src.join(format!("cur{}", i % 10));
        std::fs::create_dir_all(&sub).unwrap();
        write_random(&sub.join(format!("msg{i}")), size as usize, i);
    }
    // The server's answers after its TreeNeed are held back. A sender that waits for an answer per file sends
    // one file and stops; a pipelined one sends every file (1000 KiB, well inside the 16 MiB window) unanswered.
    let up = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let proxy = gate_after_tree_need(server.addr, up.clone(), release.clone()).await;
    let (url, state) = (format!("ferry://{proxy}/mail"), dir.path().join("state"));
    let pushing = push(&src, &url, &state, &["--timeout", "120s"]);
    let unanswered = async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while up.load(std::sync::atomic::Ordering::SeqCst) < files * size {
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {} bytes sent without an answer: files wait for a round trip each",
                up.load(std::sync::atomic::Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        release.notify_one();
    };
    let (out, ()) = tokio::join!(pushing, unanswered);
    out.assert_ok();
    assert_eq!(out.u64("files_committed"), files);
    assert_same_tree(&src, &server.root.join("mail"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_pull_restores_everything_and_resumes_after_a_cut() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let state = dir.path().join("state");
    let src = dir.path().join("home");
    let total = make_tree(&src, 200, 1, 3);
    // Fixed 256 KiB chunks for the large file and a 1 MiB pull window, so one cut may cost at most
    // window + chunk (a small file is at most 64 KiB, below one chunk), far less than the half a restart costs.
    let (chunk, window) = (256 * KIB as u64, MIB as u64);
    let push_args = ["--links", "record", "--chunking", "fixed", "--chunk-size", "256KiB"];
    push(&src, &server.url("backups/home"), &state, &push_args)
        .await
        .assert_ok();

    let cut = Faults::cut(total / 2).downstream();
    let proxy = FaultProxy::start("127.0.0.1:0", server.addr, vec![cut]).await.unwrap();
    let restore = dir.path().join("restore");
    let out = pull(
        &format!("ferry://{}/backups/home", proxy.addr()),
        &restore,
        &state,
        &["--links", "record", "--window", "1MiB"],
    )
    .await;
    out.assert_ok();
    assert_eq!(out.u64("attempts"), 2, "one cut, one reconnect: {}", out.json);
    // Resumed, not restarted: every byte once, plus at most what was in flight at the cut. A restart would take
    // total + total/2.
    let bound = total + window + chunk;
    assert!(
        out.u64("bytes_received") <= bound,
        "received {} bytes, bound {bound}: {}",
        out.u64("bytes_received"),
        out.json
    );
    assert_same_tree(&src, &restore);
    let leftovers: Vec<_> = std::fs::read_dir(&restore)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|name| name.to_string_lossy().starts_with(".ferry"))
        .collect();
    assert!(leftovers.is_empty(), "no partial or temporary file left: {leftovers:?}");

    let again = pull(&server.url("backups/home"), &restore, &state, &LINKS).await;
    again.assert_ok();
    assert_eq!(again.u64("bytes_received"), 0, "{}", again.json);
}

/// Flips one byte in place and puts the mtime back, as bit rot would: nothing but the content tells.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_pull_reports_files_damaged_on_the_server_and_never_writes_them() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let state = dir.path().join("state");
    let src = dir.path().join("photos");
    make_tree(&src, 20, 1, 4);
    push(&src, &server.url("backups/photos"), &state, &LINKS)
        .await
        .assert_ok();
    let stored = server.root.join("backups/photos");
    rot(&stored.join("d1/s1/f1.dat"), 3);
    rot(&stored.join("large-0.img"), 2 * MIB as u64 + 7);

    let restore = dir.path().join("restore");
    let out = pull(&server.url("backups/photos"), &restore, &state, &LINKS).await;
    assert_eq!(out.code, 5, "integrity exit code: {}\n{}", out.json, out.stderr);
    assert_eq!(out.json["status"], "partial");
    let failed: Vec<&str> = out.json["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(failed, ["d1/s1/f1.dat", "large-0.img"], "{}", out.json);
    assert!(
        !restore.join("d1/s1/f1.dat").exists(),
        "a damaged small file is never written"
    );
    assert!(
        !restore.join("large-0.img").exists(),
        "a damaged large file is never written"
    );
    assert_eq!(
        b3(&restore.join("d0/s0/f0.dat")),
        b3(&src.join("d0/s0/f0.dat")),
        "the rest arrives"
    );
}

/// A tree push sends its TreeOffer right behind Hello (proto-spec.md §3, "Pipelining"): a server that holds its
/// Welcome back reads it. A client that waited for the Welcome would spend one more round trip on every run, most
/// of a nightly no-op tree push over a long link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_offer_goes_right_behind_hello() {
    use ferry::wire::Message;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("photos");
    std::fs::create_dir_all(src.join("2026")).unwrap();
    write_random(&src.join("2026/a.jpg"), 5000, 1);
    write_random(&src.join("b.jpg"), 7000, 2);
    let before_welcome = frames_before_welcome(&src, "backup/", &dir.path().join("state"), 2).await;
    assert!(matches!(before_welcome[0], Message::Hello(_)), "{before_welcome:?}");
    assert!(
        matches!(&before_welcome[1], Message::TreeOffer(offer) if offer.path == "backup/photos" && offer.entries.len() >= 3),
        "{before_welcome:?}"
    );
}
