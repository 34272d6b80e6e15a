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
