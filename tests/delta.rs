//! Delta: after an edit, only the chunks around it cross the wire; everything else is reused from what the server
//! already holds (the previous version of the path, or any committed file), verified like received chunks.

use crate::util::*;

/// The budget: a 256 MiB file edited in one place sends at most 8 MiB.
const BUDGET: u64 = 8 * MIB as u64;
const SIZE: usize = 256 * MIB;

type Edit = Box<dyn FnOnce(&mut Vec<u8>)>;

fn rewrite(path: &std::path::Path, edit: impl FnOnce(&mut Vec<u8>)) {
    let mut data = std::fs::read(path).unwrap();
    edit(&mut data);
    std::fs::write(path, &data).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_send_only_the_chunks_around_them() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let state = dir.path().join("state");
    let src = dir.path().join("db.dump");
    write_random(&src, SIZE, 11);
    let url = server.url("nightly/db.dump");
    let dest = server.root.join("nightly/db.dump");
    let first = push(&src, &url, &state, &[]).await;
    first.assert_ok();
    assert_eq!(first.u64("bytes_sent"), SIZE as u64);
    assert_eq!(first.u64("bytes_reused"), 0);

    let mid = SIZE / 2;
    let edits: [(&str, Edit); 4] = [
        (
            "1 MiB changed mid-file",
            Box::new(move |d| d[mid..mid + MIB].fill(0x5a)),
        ),
        (
            "100 bytes inserted near the start",
            Box::new(|d| drop(d.splice(1000..1000, [7u8; 100]))),
        ),
        (
            "1 MiB deleted mid-file",
            Box::new(move |d| drop(d.drain(mid..mid + MIB))),
        ),
        ("1 MiB appended", Box::new(|d| d.extend_from_slice(&[3u8; MIB]))),
    ];
    for (what, edit) in edits {
        rewrite(&src, edit);
        let size = std::fs::metadata(&src).unwrap().len();
        let out = push(&src, &url, &state, &[]).await;
        out.assert_ok();
        assert_eq!(b3(&dest), b3(&src), "{what}");
        let (sent, reused) = (out.u64("bytes_sent"), out.u64("bytes_reused"));
        eprintln!("{what}: sent {sent} bytes, reused {reused} bytes");
        assert!(sent <= BUDGET, "{what}: sent {sent} bytes");
        assert_eq!(sent + reused, size, "{what}: every byte is either sent or reused");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_of_any_committed_file_are_reused_and_verified() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let state = dir.path().join("state");
    let src = dir.path().join("image.raw");
    write_random(&src, 8 * MIB, 12);
    push(&src, &server.url("a/image.raw"), &state, &[]).await.assert_ok();

    // The same content under another name: nothing crosses the wire.
    let copy = push(&src, &server.url("b/image-copy.raw"), &state, &[]).await;
    copy.assert_ok();
    assert_eq!(copy.u64("bytes_sent"), 0);
    assert_eq!(copy.u64("bytes_reused"), 8 * MIB as u64);
    assert_eq!(b3(&server.root.join("b/image-copy.raw")), b3(&src));

    // The indexed file is damaged behind the server's back: its chunks fail verification and are sent instead.
    let first_copy = server.root.join("a/image.raw");
    rewrite(&first_copy, |d| d.iter_mut().step_by(4096).for_each(|b| *b ^= 0xff));
    std::fs::remove_file(server.root.join("b/image-copy.raw")).unwrap();
    let third = push(&src, &server.url("c/image.raw"), &state, &[]).await;
    third.assert_ok();
    assert_eq!(b3(&server.root.join("c/image.raw")), b3(&src));
    assert_eq!(third.u64("bytes_sent"), 8 * MIB as u64, "no damaged byte is reused");
    assert_eq!(
        third.u64("bytes_reused"),
        0,
        "damaged bytes are not counted as reused either"
    );
}

/// Issue 13, §4 Reuse: a fresh offer whose manifest repeats a chunk asks for it once and fills the copies from it,
/// in a push and in a pull: sixteen copies of one 1 MiB block cost one block on the wire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_blocks_of_one_offer_cross_the_wire_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let block = dir.path().join("block");
    let one = write_random(&block, MIB, 31);
    let src = dir.path().join("image.raw");
    std::fs::write(&src, one.repeat(16)).unwrap();
    let fixed = ["--chunking", "fixed", "--chunk-size", "1MiB"];
    let pushed = push(&src, &server.url("image.raw"), &dir.path().join("state"), &fixed).await;
    pushed.assert_ok();
    assert_eq!(pushed.u64("bytes_sent"), MIB as u64, "one copy sent");
    assert_eq!(pushed.u64("bytes_reused"), 15 * MIB as u64, "fifteen filled locally");
    assert_eq!(b3(&server.root.join("image.raw")), b3(&src));

    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let pulled = pull(&server.url("image.raw"), &out, &dir.path().join("pull-state"), &fixed).await;
    pulled.assert_ok();
    assert_eq!(pulled.u64("bytes_received"), MIB as u64, "one copy received");
    assert_eq!(pulled.u64("bytes_reused"), 15 * MIB as u64);
    assert_eq!(b3(&out.join("image.raw")), b3(&src));
}

/// `write_bytes` and `wchar` of `/proc/PID/io`: bytes the process sent to the storage layer, and bytes it passed
/// to write(2)-family calls (files, sockets and logs alike). `None` where the file cannot be read.
fn proc_io(pid: u32) -> Option<(u64, u64)> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    let field = |name: &str| {
        io.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Some((field("write_bytes:")?, field("wchar:")?))
}

/// `rchar` of `/proc/PID/io`: bytes the process read through read calls (files and sockets), if readable.
fn proc_read(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("rchar:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Checks that the server (`pid`) read fewer than `limit` bytes since `before` ([`proc_read`]) for `what`, where
/// `/proc/PID/io` is readable.
fn assert_read_under(pid: u32, before: Option<u64>, limit: u64, what: &str) {
    match (before, proc_read(pid)) {
        (Some(before), Some(after)) => {
            let read = after - before;
            eprintln!("the server read {read} bytes for {what}");
            assert!(read < limit, "the server read {read} bytes for {what}");
        }
        _ => eprintln!("/proc/{pid}/io is not readable here: the bytes read are not checked"),
    }
}

/// Flips one byte of the committed file at `path`, keeping its mtime (so its committed manifest still stands).
fn flip_byte_keeping_mtime(path: &std::path::Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let mtime = std::fs::metadata(path).unwrap().modified().unwrap();
    let file = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[byte[0] ^ 0x01], at).unwrap();
    file.set_modified(mtime).unwrap();
}

/// An in-place delta keeps the chunks its committed manifest places at their own offsets without reading them:
/// the server reads the file once (the whole-file digest at commit), not also once per reused chunk to verify it
/// and once more to compare it with what it would write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_place_delta_reads_the_unchanged_file_once() {
    const SIZE: usize = 64 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let state = dir.path().join("state");
    let src = dir.path().join("disk.img");
    write_random(&src, SIZE, 24);
    let url = server.url("disk.img");
    push(&src, &url, &state, &[]).await.assert_ok();
    rewrite(&src, |d| d[SIZE / 2..SIZE / 2 + MIB].fill(0x5a));
    let pid = server.child.id();
    let before = proc_read(pid);
    let out = push(&src, &url, &state, &[]).await;
    out.assert_ok();
    assert_eq!(b3(&server.root.join("disk.img")), b3(&src));
    assert!(
        out.u64("bytes_reused") > (SIZE / 2) as u64,
        "written in place from the old file"
    );
    assert_read_under(
        pid,
        before,
        SIZE as u64 * 3 / 2,
        &format!("a {SIZE}-byte in-place delta"),
    );
}

/// While a re-push over a committed file is gathered, the server hashes the committed file as far as the pieces
/// keep its chunks in place, and the in-place write's digest follower starts from there instead of reading that
/// prefix back: the server reads the file about once in all, and the new version lands verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_place_delta_hashes_the_kept_prefix_while_the_offer_is_gathered() {
    const SIZE: usize = 64 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let state = dir.path().join("state");
    let src = dir.path().join("disk.img");
    write_random(&src, SIZE, 26);
    let url = server.url("disk.img");
    push(&src, &url, &state, &[]).await.assert_ok();
    let change = SIZE * 3 / 4;
    rewrite(&src, |d| d[change..change + MIB].fill(0x5a));
    let pid = server.child.id();
    let before = proc_read(pid);
    let out = push(&src, &url, &state, &[]).await;
    out.assert_ok();
    assert_eq!(b3(&server.root.join("disk.img")), b3(&src));
    assert!(out.u64("bytes_reused") > (SIZE / 2) as u64, "written in place");
    let needle = "the kept prefix was hashed while the offer was gathered";
    server.wait_for_log(needle, std::time::Duration::from_secs(10)).await;
    let log = std::fs::read_to_string(server.root.with_extension("server.log")).unwrap();
    let (line, bytes) = logged_bytes(&log, needle);
    assert!(
        bytes > 0 && bytes <= change as u64,
        "{bytes} bytes hashed ahead: {line}"
    );
    assert_read_under(pid, before, SIZE as u64 * 5 / 4, "an in-place delta hashed ahead");
}

/// A chunk kept in place unread that was damaged on the server's disk behind its back (its size, inode and mtime
/// unchanged, so the committed manifest still stands) is caught by the whole-file digest at commit, asked for
/// again, and the file lands verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_chunk_kept_in_place_is_caught_at_commit_and_sent_again() {
    const SIZE: usize = 32 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let state = dir.path().join("state");
    let src = dir.path().join("disk.img");
    write_random(&src, SIZE, 25);
    let url = server.url("disk.img");
    push(&src, &url, &state, &[]).await.assert_ok();
    let dest = server.root.join("disk.img");
    flip_byte_keeping_mtime(&dest, 1234);

    rewrite(&src, |d| d[SIZE / 2..SIZE / 2 + MIB].fill(0x5a));
    let out = push(&src, &url, &state, &[]).await;
    out.assert_ok();
    assert_eq!(b3(&dest), b3(&src), "the damaged byte was replaced");
    server
        .wait_for_log("asking for those chunks again", std::time::Duration::from_secs(10))
        .await;
}

/// An insertion near the start shifts every later chunk, so the server builds a new copy: it asks for the chunk
/// only the client has first, then copies the old version's chunks behind it, hashing them for the whole-file
/// digest as it writes them. It reads the old file once, not once more to read the copy back at commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insertion_reads_the_old_version_once() {
    const SIZE: usize = 64 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let state = dir.path().join("state");
    let src = dir.path().join("dump.sql");
    write_random(&src, SIZE, 26);
    let url = server.url("dump.sql");
    push(&src, &url, &state, &[]).await.assert_ok();
    rewrite(&src, |d| {
        d.splice(4096..4096, [0x5a; 100]);
    });
    let pid = server.child.id();
    let before = proc_read(pid);
    let out = push(&src, &url, &state, &[]).await;
    out.assert_ok();
    assert_eq!(b3(&server.root.join("dump.sql")), b3(&src));
    assert!(out.u64("bytes_reused") > (SIZE / 2) as u64, "copied from the old file");
    assert_read_under(pid, before, SIZE as u64 * 3 / 2, &format!("a {SIZE}-byte insertion"));
}

/// A chunk of the old version damaged behind the server's back (size, inode and mtime kept, so its committed
/// manifest still stands) is found when the server copies it (while the manifest streams, the insertion being near
/// the start): it is asked for in a later `Need`, and the file lands verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_chunk_found_while_copying_after_the_first_round_is_asked_for_next() {
    const SIZE: usize = 32 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let state = dir.path().join("state");
    let src = dir.path().join("dump.sql");
    write_random(&src, SIZE, 27);
    let url = server.url("dump.sql");
    push(&src, &url, &state, &[]).await.assert_ok();
    let dest = server.root.join("dump.sql");
    flip_byte_keeping_mtime(&dest, (SIZE * 3 / 4) as u64);

    rewrite(&src, |d| {
        d.splice(4096..4096, [0x5a; 100]);
    });
    let out = push(&src, &url, &state, &[]).await;
    out.assert_ok();
    assert_eq!(b3(&dest), b3(&src), "the damaged chunk was sent");
    assert!(out.u64("bytes_reused") > (SIZE / 2) as u64, "the rest was copied");
    server
        .wait_for_log("no local place held these chunks", std::time::Duration::from_secs(10))
        .await;
}

/// A re-push cut with another chunk size still finds every chunk of the unchanged file on the server: the old
/// version's committed manifest (cut the old way) cannot match the offer, so the server cuts the file the new way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_chunk_size_reuses_the_previous_version() {
    const SIZE: usize = 32 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let state = dir.path().join("state");
    let src = dir.path().join("vm.img");
    write_random(&src, SIZE, 28);
    let url = server.url("vm.img");
    push(&src, &url, &state, &["--chunk-size", "1MiB"]).await.assert_ok();
    let out = push(&src, &url, &state, &["--chunk-size", "256KiB"]).await;
    out.assert_ok();
    assert_eq!(b3(&server.root.join("vm.img")), b3(&src));
    let sent = out.u64("bytes_sent");
    assert!(sent < MIB as u64, "{sent} bytes sent for an unchanged file cut anew");
}

/// The in-place journals left in the server's partial directory.
fn journals(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let Ok(listing) = std::fs::read_dir(root.join(".ferry/partial")) else {
        return Vec::new();
    };
    let paths = listing.flatten().map(|e| e.path());
    paths
        .filter(|p| p.extension().is_some_and(|e| e == "journal"))
        .collect()
}

/// Issue 14 item 2: a re-push with 1 MiB changed in a 96 MiB file is written into the committed file in place (it
/// keeps its inode), and the server writes a few MiB (the journal and its apply), not a new copy of the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_change_is_written_in_place() {
    use std::os::unix::fs::MetadataExt;
    const SIZE: usize = 96 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let state = dir.path().join("state");
    let src = dir.path().join("disk.img");
    write_random(&src, SIZE, 21);
    let url = server.url("vm/disk.img");
    let dest = server.root.join("vm/disk.img");
    push(&src, &url, &state, &[]).await.assert_ok();
    let inode = std::fs::metadata(&dest).unwrap().ino();

    let mid = SIZE / 2;
    rewrite(&src, |d| d[mid..mid + MIB].fill(0x5a));
    let pid = server.child.id();
    let before = proc_io(pid);
    let out = push(&src, &url, &state, &[]).await;
    out.assert_ok();
    let after = proc_io(pid);
    assert_eq!(b3(&dest), b3(&src), "the new version landed, verified");
    assert!(out.u64("bytes_sent") <= 4 * MIB as u64);
    assert_eq!(
        std::fs::metadata(&dest).unwrap().ino(),
        inode,
        "written in place, not renamed over"
    );
    assert!(journals(&server.root).is_empty(), "the journal is removed once applied");
    match (before, after) {
        (Some((disk_before, calls_before)), Some((disk_after, calls_after))) => {
            let (disk, calls) = (disk_after - disk_before, calls_after - calls_before);
            eprintln!("the server wrote {calls} bytes through write calls, {disk} bytes to the storage layer");
            assert!(
                calls < 16 * MIB as u64,
                "the server wrote {calls} bytes for a 1 MiB change"
            );
            assert!(
                disk < 16 * MIB as u64,
                "the server wrote {disk} bytes to disk for a 1 MiB change"
            );
        }
        _ => eprintln!("/proc/{pid}/io is not readable here: the bytes written are not checked"),
    }
}

/// `in_place = "never"`: the re-push writes a new partial and renames it over the file, as before (a new inode).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_place_never_replaces_the_file() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ferry.toml");
    std::fs::write(&config, "in_place = \"never\"\n").unwrap();
    let config_arg = config.to_str().unwrap();
    let server = TestServer::start_with(&dir.path().join("root"), &["--config", config_arg]);
    let state = dir.path().join("state");
    let src = dir.path().join("disk.img");
    write_random(&src, 8 * MIB, 22);
    let url = server.url("disk.img");
    let dest = server.root.join("disk.img");
    push(&src, &url, &state, &[]).await.assert_ok();
    let inode = std::fs::metadata(&dest).unwrap().ino();
    rewrite(&src, |d| d[MIB..2 * MIB].fill(1));
    push(&src, &url, &state, &[]).await.assert_ok();
    assert_eq!(b3(&dest), b3(&src));
    assert_ne!(
        std::fs::metadata(&dest).unwrap().ino(),
        inode,
        "a new file renamed over the old one"
    );
}

/// Issue 14 item 2: the server is SIGKILLed in the middle of an in-place apply (slowed down by the test hook
/// `FERRY_TEST_APPLY_PAUSE_MS`). Until it runs again, a reader may see a mix of the two versions, but every byte
/// is one of the old or the new file's; the sealed journal stays in `.ferry/partial/`. The next push of the file
/// replays the journal, records the file committed (nothing is sent again), and the file is the new version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_in_the_middle_of_an_apply_is_replayed() {
    const SIZE: usize = 64 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let mut server = TestServer::start_env(&root, &[("FERRY_TEST_APPLY_PAUSE_MS", "1000")]);
    let state = dir.path().join("state");
    let src = dir.path().join("db.img");
    let old = write_random(&src, SIZE, 23);
    let url = server.url("db.img");
    let dest = root.join("db.img");
    push(&src, &url, &state, &[]).await.assert_ok();
    // One byte changed every 4 MiB: sixteen extents in the journal, a second's pause after each.
    rewrite(&src, |d| (0..16).for_each(|i| d[i * 4 * MIB + 12345] ^= 0xff));
    let new = std::fs::read(&src).unwrap();
    let pushing = KillOnDrop::new(push_command(&src, &url, &state, &[]).spawn().unwrap());
    server
        .wait_for_log("applying the in-place journal", std::time::Duration::from_secs(120))
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    server.kill9();
    drop(pushing);

    assert_eq!(journals(&root).len(), 1, "the sealed journal survives the kill");
    let seen = std::fs::read(&dest).unwrap();
    assert_eq!(seen.len(), SIZE);
    let mixed = (0..SIZE).any(|i| seen[i] != old[i]) && seen != new;
    eprintln!(
        "after the kill, before the replay, the file is {}",
        if mixed { "a mix" } else { "one version" }
    );
    assert!(
        (0..SIZE).all(|i| seen[i] == old[i] || seen[i] == new[i]),
        "every byte a reader sees is the old or the new version's"
    );

    let server = TestServer::start(&root);
    let out = push(&src, &server.url("db.img"), &state, &[]).await;
    out.assert_ok();
    assert_eq!(
        std::fs::read(&dest).unwrap(),
        new,
        "the replayed file is the new version"
    );
    assert_eq!(out.u64("bytes_sent"), 0, "the replay completed the interrupted push");
    assert!(journals(&root).is_empty());
}

/// The server is SIGKILLed while it copies an insertion's moved chunks from the old version as the manifest
/// streams: the destination still holds the old version whole (the copy goes to a partial file), and the next
/// push, to a restarted server, keeps what was durable and lands the new version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_while_copying_a_streamed_insertion_keeps_the_old_version() {
    const SIZE: usize = 128 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let mut server = TestServer::start(&root);
    let state = dir.path().join("state");
    let src = dir.path().join("vm.img");
    let old = write_random(&src, SIZE, 28);
    let url = server.url("vm.img");
    let dest = root.join("vm.img");
    push(&src, &url, &state, &[]).await.assert_ok();
    rewrite(&src, |d| {
        d.splice(4096..4096, [0x5a; 100]);
    });
    let new = std::fs::read(&src).unwrap();
    let pushing = KillOnDrop::new(push_command(&src, &url, &state, &[]).spawn().unwrap());
    server
        .wait_for_log("copying=true", std::time::Duration::from_secs(60))
        .await;
    // Killed once a quarter is copied (or once the new version, 100 bytes longer, is in place).
    let held = root.join(".ferry/partial");
    let partial_bytes = || -> u64 {
        let files = std::fs::read_dir(&held).into_iter().flatten().flatten();
        files.filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum()
    };
    for _ in 0..2000 {
        let placed = std::fs::metadata(&dest).is_ok_and(|m| m.len() == new.len() as u64);
        if partial_bytes() >= (SIZE / 4) as u64 || placed {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    server.kill9();
    drop(pushing);
    let seen = std::fs::read(&dest).unwrap();
    let partial = partial_bytes();
    eprintln!(
        "after the kill: the destination is the {} version; partials hold {partial} bytes",
        if seen == old { "old" } else { "new" }
    );
    assert!(seen == old || seen == new, "the destination is one whole version");

    let server = TestServer::start(&root);
    let out = push(&src, &server.url("vm.img"), &state, &[]).await;
    out.assert_ok();
    assert_eq!(std::fs::read(&dest).unwrap(), new);
    assert!(
        out.u64("bytes_sent") < (SIZE / 8) as u64,
        "the moved chunks were not sent: {}",
        out.u64("bytes_sent")
    );
}
