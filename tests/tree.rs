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
fn make_tree(dir: &Path, small: usize, large: usize, seed: u64) -> u64 {
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
fn assert_same_tree(original: &Path, copy: &Path) {
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

const LINKS: [&str; 2] = ["--links", "record"];

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_arrives_whole_and_only_what_changed_is_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let state = dir.path().join("state");
    let src = dir.path().join("home");
    let total = make_tree(&src, 300, 2, 1);
    std::os::unix::fs::symlink("/etc/passwd", src.join("escape")).unwrap();
    let url = server.url("backups/laptop/");
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
    write_random(&src.join("d1/s1/f1.dat"), 5000, 99);
    let mut large = std::fs::read(src.join("large-0.img")).unwrap();
    large[MIB + 5..MIB + 105].fill(0xee);
    std::fs::write(src.join("large-0.img"), &large).unwrap();
    let third = push(&src, &url, &state, &LINKS).await;
    third.assert_ok();
    assert_eq!(third.u64("files_needed"), 2);
    let (sent, reused) = (third.u64("bytes_sent"), third.u64("bytes_reused"));
    assert!(sent <= 5000 + 4 * MIB as u64, "{}", third.json);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_small_files_are_pipelined_not_a_round_trip_each() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let src = dir.path().join("mail");
    for i in 0..1000 {
        let sub = src.join(format!("cur{}", i % 10));
        std::fs::create_dir_all(&sub).unwrap();
        write_random(&sub.join(format!("msg{i}")), 1024, i);
    }
    // 100 ms round trips: one per file would take at least 100 s.
    let proxy = FaultProxy::start(
        "127.0.0.1:0",
        server.addr,
        vec![Faults::latency(Duration::from_millis(50))],
    )
    .await
    .unwrap();
    let out = push(
        &src,
        &format!("ferry://{}/mail", proxy.addr()),
        &dir.path().join("state"),
        &[],
    )
    .await;
    out.assert_ok();
    assert_eq!(out.u64("files_committed"), 1000);
    let took = out.u64("duration_ms");
    eprintln!("1000 files over a 100 ms round trip: {took} ms");
    assert!(took < 30_000, "1000 files over a 100 ms RTT took {took} ms");
    assert_same_tree(&src, &server.root.join("mail"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_pull_restores_everything_and_resumes_after_a_cut() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let state = dir.path().join("state");
    let src = dir.path().join("home");
    let total = make_tree(&src, 200, 1, 3);
    push(&src, &server.url("backups/home"), &state, &LINKS)
        .await
        .assert_ok();

    let cut = Faults::cut(total / 2).downstream();
    let proxy = FaultProxy::start("127.0.0.1:0", server.addr, vec![cut]).await.unwrap();
    let restore = dir.path().join("restore");
    let out = pull(
        &format!("ferry://{}/backups/home", proxy.addr()),
        &restore,
        &state,
        &LINKS,
    )
    .await;
    out.assert_ok();
    assert_eq!(out.u64("attempts"), 2, "one cut, one reconnect: {}", out.json);
    assert!(out.u64("bytes_received") < total + total / 2, "{}", out.json);
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
