//! Pushes without injected faults: interesting sizes, no-op re-push, trailing '/', changed sources.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime};

use crate::util::*;

const CHUNK: usize = 4 * KIB;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_pushes_of_interesting_sizes_arrive_intact() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let state = dir.path().join("state");
    for (i, size) in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 17]
        .into_iter()
        .enumerate()
    {
        let src = dir.path().join(format!("src-{size}"));
        write_random(&src, size, i as u64);
        let out = push(
            &src,
            &server.url(&format!("sizes/{size}.bin")),
            &state,
            &["--chunking", "fixed", "--chunk-size", "4KiB"],
        )
        .await;
        out.assert_ok();
        let dest = server.root.join(format!("sizes/{size}.bin"));
        assert_eq!(b3(&dest), b3(&src), "size {size}");
        assert_eq!(out.json["digest"], b3(&src));
        assert_eq!(out.u64("bytes_sent"), size as u64, "fresh push sends each byte once");
        assert_eq!(out.u64("chunks"), size.div_ceil(CHUNK) as u64);
    }
    let leftovers: Vec<_> = std::fs::read_dir(server.root.join(".ferry/partial")).unwrap().collect();
    assert!(leftovers.is_empty(), "no partial files stay behind after commits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_repush_sends_nothing_and_does_not_rehash() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let state = dir.path().join("state");
    let src = dir.path().join("backup.tar");
    let size = 8 * MIB as u64;
    write_random(&src, size as usize, 7);
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o640)).unwrap();
    let mtime = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    set_mtime(&src, mtime);

    let first = push(&src, &server.url("nightly/"), &state, &["--chunk-size", "64KiB"]).await;
    first.assert_ok();
    assert_eq!(first.json["manifest_cached"], false);
    let dest = server.root.join("nightly/backup.tar");
    assert_eq!(b3(&dest), b3(&src), "trailing '/' keeps the local file name");
    let meta = std::fs::metadata(&dest).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o640, "mode is kept");
    assert_eq!(meta.modified().unwrap(), mtime, "mtime is kept");

    let (second, read) = run_counting_reads(push_command(
        &src,
        &server.url("nightly/"),
        &state,
        &["--chunk-size", "64KiB"],
    ))
    .await;
    second.assert_ok();
    assert_eq!(second.json["manifest_cached"], true, "unchanged source is not rehashed");
    // Measured, not taken from the client's word: hashing reads the whole source (`size` bytes); the re-run reads
    // less than that in all (its state store and configuration included).
    eprintln!("the unchanged re-push read {read} bytes for an {size}-byte source");
    assert!(
        read < size,
        "the re-run read {read} bytes: it rehashed the {size}-byte source"
    );
    assert_eq!(second.json["already_present"], true);
    assert_eq!(second.u64("bytes_sent"), 0);
}

/// A fresh push whose chunks arrive in file order: the server's whole-file digest hashes each chunk from the bytes
/// it just verified and wrote, not read back from the partial, so the server reads a small part of the file in all
/// (the digest thread holds at most 4 MiB of chunks, and a writer ahead of it waits for room, for 2 s at most).
/// The file is still verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_in_order_push_is_not_read_back_by_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let src = dir.path().join("fresh.bin");
    let size = 48 * MIB as u64;
    write_random(&src, size as usize, 21);
    let before = rchar(server.child.id());
    let out = push(&src, &server.url("fresh.bin"), &dir.path().join("state"), &[]).await;
    out.assert_ok();
    let read = rchar(server.child.id()) - before;
    assert_eq!(b3(&server.root.join("fresh.bin")), b3(&src));
    eprintln!("the server read {read} bytes for a fresh {size}-byte push");
    // A whole read-back is `size`; a digest thread starved for more than 2 s (the writer's patience) reads some
    // back, which a loaded machine may cause now and then, so half, not a quarter.
    assert!(
        read < size / 2,
        "the server read {read} bytes back for a fresh {size}-byte push"
    );
}

/// A large file's chunks are written around the page cache by default (where the filesystem allows direct I/O),
/// and through it with `direct_io = "never"` in the server's configuration; the file lands the same either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_io_never_keeps_every_write_in_the_page_cache() {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = tempfile::tempdir().unwrap();
    let probe = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .custom_flags(libc::O_DIRECT)
        .open(dir.path().join("probe"));
    let src = dir.path().join("big.bin");
    write_random(&src, 20 * MIB, 31);
    let debug = [("RUST_LOG", "ferry=debug")];
    let by_default = TestServer::start_env(&dir.path().join("auto"), &debug);
    let config = dir.path().join("ferry.toml");
    std::fs::write(&config, "direct_io = \"never\"\n").unwrap();
    let never = TestServer::start_with_env(
        &dir.path().join("never"),
        &["--config", config.to_str().unwrap()],
        &debug,
    );
    for (server, direct) in [(&by_default, probe.is_ok()), (&never, false)] {
        let out = push(&src, &server.url("big.bin"), &dir.path().join("state"), &[]).await;
        out.assert_ok();
        assert_eq!(b3(&server.root.join("big.bin")), b3(&src));
        let log = std::fs::read_to_string(server.root.with_extension("server.log")).unwrap();
        let opened: Vec<&str> = log.lines().filter(|l| l.contains("partial opened")).collect();
        assert!(
            opened.iter().any(|l| l.contains(&format!("direct={direct}"))),
            "expected direct={direct} in {opened:?}"
        );
    }
    if probe.is_err() {
        eprintln!("no direct I/O on this filesystem: only the buffered path was checked");
    }
}

/// A push whose manifest is cached (the nightly re-push) sends its whole Offer right behind Hello (proto-spec.md
/// §3, "Pipelining"): a server that holds its Welcome back reads the Offer. A client that waited for the Welcome
/// would spend one more round trip on every run, most of a no-op push over a long link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_manifest_is_offered_right_behind_hello() {
    use ferry::wire::Message;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let state = dir.path().join("state");
    let src = dir.path().join("nightly.db");
    write_random(&src, 300 * KIB, 41);
    push(&src, &server.url("nightly.db"), &state, &[]).await.assert_ok();
    let before_welcome = frames_before_welcome(&src, "nightly.db", &state, 2).await;
    assert!(matches!(before_welcome[0], Message::Hello(_)), "{before_welcome:?}");
    assert!(
        matches!(&before_welcome[1], Message::Offer(offer) if offer.path == "nightly.db" && offer.manifest.size == 300 * KIB as u64),
        "{before_welcome:?}"
    );
}
