//! `ferry gc --store` against a real 3-node Garage cluster (tests/util/garage.rs) while another server uploads:
//! mark and sweep never takes a chunk a committed file names, and removes the old orphans.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ferry::storage::object::layout::{self, Layout};
use ferry::storage::object::StoreSettings;

use ferry::fault::{FaultProxy, Faults};

use crate::util::garage;
use crate::util::*;

/// The grace period the servers and gc agree on (hidden test knobs), and δ.
const GRACE: &str = "2s";
const DELTA: &str = "100ms";
/// Longer than the grace period: what was stored before it is old.
const PAST_GRACE: Duration = Duration::from_millis(2500);

fn s3_server(dir: &Path, name: &str, url: &str) -> TestServer {
    let state = dir.join(format!("{name}-state"));
    let state = state.to_str().unwrap();
    TestServer::start_with(
        &dir.join(name),
        // Rule C's wait matched to the local cluster (δ + a DELETE's time, well under the grace).
        &[
            "--store",
            url,
            "--state",
            state,
            "--gc-grace",
            GRACE,
            "--gc-confirm-wait",
            GRACE,
        ],
    )
}

/// `ferry gc --store URL` with the test knobs; returns its JSON report.
fn gc(url: &str) -> serde_json::Value {
    let output = Command::new(ferry_bin())
        .args(["gc", "--store", url, "--json", "--gc-grace", GRACE, "--gc-delta", DELTA])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "gc failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

/// The chunk objects in the bucket, and the chunks the committed entries name.
async fn stored_and_named(url: &str) -> (HashSet<[u8; 32]>, HashSet<[u8; 32]>) {
    let settings = StoreSettings::from_url(url).unwrap();
    let (store, layout): (_, Layout) = (settings.build().unwrap(), settings.layout(""));
    let stored = layout::list(&*store, &layout.chunks()).await.unwrap();
    let stored = stored.iter().filter_map(|m| layout.parse_chunk(&m.location)).collect();
    let mut named = HashSet::new();
    for meta in layout::list(&*store, &layout.files()).await.unwrap() {
        let entry = layout::get_entry(&*store, &meta.location).await.unwrap().unwrap();
        if let Some(manifest) = entry.entry.manifest() {
            named.extend(manifest.chunks.iter().map(|c| c.hash));
        }
    }
    (stored, named)
}

#[tokio::test]
async fn s3_gc_under_concurrent_uploads() {
    let Some(cluster) = garage::cluster() else {
        return;
    };
    let url = cluster.store_url("gc");
    let dir = tempfile::tempdir().unwrap();
    let a = s3_server(dir.path(), "a", &url);
    let b = s3_server(dir.path(), "b", &url);

    // Orphans: v1 of a file replaced by v2 (random data: no chunk shared).
    let (v1, v2) = (dir.path().join("v1"), dir.path().join("v2"));
    let v1_data = write_random(&v1, 3 << 20, 10);
    let v2_data = write_random(&v2, 3 << 20, 11);
    push(&v1, &a.url("f.bin"), &dir.path().join("c0"), &[])
        .await
        .assert_ok();
    push(&v2, &a.url("f.bin"), &dir.path().join("c0"), &[])
        .await
        .assert_ok();
    let (stored, named) = stored_and_named(&url).await;
    let v1_chunks: HashSet<_> = stored.difference(&named).copied().collect();
    assert!(!v1_chunks.is_empty(), "replacing v1 left its chunks unreferenced");
    // And orphans nobody names again.
    let (w1, w2) = (dir.path().join("w1"), dir.path().join("w2"));
    write_random(&w1, 2 << 20, 12);
    let w2_data = write_random(&w2, 1 << 20, 13);
    push(&w1, &a.url("g.bin"), &dir.path().join("c0"), &[])
        .await
        .assert_ok();
    push(&w2, &a.url("g.bin"), &dir.path().join("c0"), &[])
        .await
        .assert_ok();
    std::thread::sleep(PAST_GRACE);

    // Uploads through B while gc runs again and again: fresh files, and v1 again under another path (its chunks are
    // old orphans in the bucket: rule R has B ask for them again instead of relying on them).
    let mut files = vec![(v1.clone(), v1_data, "again.bin".to_string())];
    for i in 0..4u64 {
        let src = dir.path().join(format!("up{i}"));
        let data = write_random(&src, 2 << 20, 20 + i);
        files.push((src, data, format!("up/{i}.bin")));
    }
    let uploads: Vec<(std::path::PathBuf, String, std::path::PathBuf)> = files
        .iter()
        .enumerate()
        .map(|(i, (src, _, path))| (src.clone(), b.url(path), dir.path().join(format!("cu{i}"))))
        .collect();
    let uploader = std::thread::spawn(move || {
        uploads
            .into_iter()
            .map(|(src, url, state)| push_command(&src, &url, &state, &[]).output().unwrap().status.success())
            .collect::<Vec<bool>>()
    });
    let mut runs = 0;
    while !uploader.is_finished() && runs < 40 {
        gc(&url);
        runs += 1;
    }
    assert!(uploader.join().unwrap().iter().all(|ok| *ok), "every upload committed");
    assert!(runs > 0, "gc ran while the uploads did");

    // Every committed file pulls, verified, from the other server.
    files.push((v2, v2_data, "f.bin".to_string()));
    files.push((w2, w2_data, "g.bin".to_string()));
    for (i, (_, data, path)) in files.iter().enumerate() {
        let out = dir.path().join(format!("out{i}"));
        pull(&a.url(path), &out, &dir.path().join(format!("cp{i}")), &[])
            .await
            .assert_ok();
        assert!(std::fs::read(&out).unwrap() == *data, "{path} differs");
    }

    // Once the uploads are older than the grace period, one more run leaves exactly the named chunks.
    std::thread::sleep(PAST_GRACE);
    let report = gc(&url);
    assert_eq!(report["status"], "ok");
    let (stored, named) = stored_and_named(&url).await;
    assert!(named.is_subset(&stored), "a committed file lost a chunk");
    assert_eq!(
        stored, named,
        "unreferenced chunks older than the grace period are gone"
    );
    let kept = v1_chunks.intersection(&named).count();
    assert_eq!(
        kept,
        v1_chunks.len(),
        "v1's chunks are named again, by again.bin, and kept"
    );
}

/// Regular files under `dir`, outside ferry's private `.ferry` directory, as paths relative to it.
fn files_beneath(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(at) = pending.pop() {
        for entry in std::fs::read_dir(&at).unwrap() {
            let entry = entry.unwrap();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() && entry.file_name() != ".ferry" {
                pending.push(entry.path());
            } else if !kind.is_dir() {
                found.push(entry.path().strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    found
}

/// The sizes of the committed files of the bucket (`files/` entries that are files), by path.
async fn committed_files(url: &str) -> std::collections::BTreeMap<String, u64> {
    let settings = StoreSettings::from_url(url).unwrap();
    let (store, layout): (_, Layout) = (settings.build().unwrap(), settings.layout(""));
    let mut found = std::collections::BTreeMap::new();
    for meta in layout::list(&*store, &layout.files()).await.unwrap() {
        let Some(entry) = layout::get_entry(&*store, &meta.location).await.unwrap() else {
            continue;
        };
        if let (Some(path), Some(manifest)) = (layout.parse_file(&meta.location), entry.entry.manifest()) {
            found.insert(path.to_string(), manifest.size);
        }
    }
    found
}

/// The chunks the committed entries name as chunk objects (an inline file's bytes are in its manifest object).
async fn chunked_named(url: &str) -> HashSet<[u8; 32]> {
    let settings = StoreSettings::from_url(url).unwrap();
    let (store, layout): (_, Layout) = (settings.build().unwrap(), settings.layout(""));
    let mut named = HashSet::new();
    for meta in layout::list(&*store, &layout.files()).await.unwrap() {
        let entry = layout::get_entry(&*store, &meta.location).await.unwrap().unwrap();
        if let layout::EntryKind::File { manifest, inline: None } = entry.entry.kind {
            named.extend(manifest.chunks.iter().map(|c| c.hash));
        }
    }
    named
}

/// Keys of the bucket under `what` (`open`, `journal`, `chunks`, `files`) of the root namespace.
async fn keys_under(url: &str, what: &str) -> Vec<String> {
    let settings = StoreSettings::from_url(url).unwrap();
    let (store, layout): (_, Layout) = (settings.build().unwrap(), settings.layout(""));
    let listed = layout::list(&*store, &layout.namespace().clone().join(what))
        .await
        .unwrap();
    listed.into_iter().map(|m| m.location.to_string()).collect()
}

/// A tree with everything the bucket stores differently: small files inline (and an empty one), a 200 KiB file
/// (a chunk object + its manifest object), a 3 MiB file of several chunks (the big-file path), empty directories,
/// directories with their own mode and mtime, and a symlink recorded inside the tree. Returns the file bytes.
fn s3_tree(src: &Path) -> u64 {
    let total = crate::tree::make_tree(src, 24, 1, 41);
    write_random(&src.join("d1/mid.bin"), 200 << 10, 42);
    set_mtime(
        &src.join("d1/mid.bin"),
        std::time::UNIX_EPOCH + Duration::from_secs(1_600_000_000),
    );
    total + (200 << 10)
}

/// Issue 15: a tree pushed through server A lands in the bucket (nothing under A's local root), survives a gc,
/// pulls through server B equal byte for byte with modes, mtimes, empty directories and the symlink; a re-push through B with a
/// fresh client state sends nothing and skips every file (unchanged, from the bucket); no open record is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_tree_round_trip_two_servers() {
    let Some(cluster) = garage::cluster() else {
        return;
    };
    let url = cluster.store_url("tree-round-trip");
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (s3_server(dir.path(), "a", &url), s3_server(dir.path(), "b", &url));
    let src = dir.path().join("src");
    let total = s3_tree(&src);

    let pushed = push(
        &src,
        &a.url("backups/home"),
        &dir.path().join("c1"),
        &crate::tree::LINKS,
    )
    .await;
    pushed.assert_ok();
    assert_eq!(pushed.json["kind"], "tree");
    assert_eq!(pushed.u64("bytes_sent"), total, "{}", pushed.json);
    assert_eq!(
        files_beneath(&a.root),
        Vec::<std::path::PathBuf>::new(),
        "nothing under A's local root"
    );
    assert!(keys_under(&url, "open").await.is_empty(), "no open record left");
    let stored = committed_files(&url).await;
    assert_eq!(stored.get("backups/home/d1/mid.bin"), Some(&(200 << 10)), "{stored:?}");

    // gc once the tree's chunks are older than the grace period: its manifest objects (inline, chunked, Dir,
    // Symlink) keep every chunk the tree names.
    std::thread::sleep(PAST_GRACE);
    assert_eq!(gc(&url)["status"], "ok");
    let (stored, named) = (stored_and_named(&url).await.0, chunked_named(&url).await);
    assert!(
        !named.is_empty() && named.is_subset(&stored),
        "gc kept every chunk the tree names"
    );
    let restore = dir.path().join("restore");
    let pulled = pull(
        &b.url("backups/home"),
        &restore,
        &dir.path().join("c2"),
        &crate::tree::LINKS,
    )
    .await;
    pulled.assert_ok();
    crate::tree::assert_same_tree(&src, &restore);

    let again = push(
        &src,
        &b.url("backups/home"),
        &dir.path().join("c3"),
        &crate::tree::LINKS,
    )
    .await;
    again.assert_ok();
    assert_eq!(again.u64("bytes_sent"), 0, "{}", again.json);
    assert_eq!(again.u64("files_needed"), 0, "{}", again.json);
    assert_eq!(again.u64("files_unchanged"), again.u64("files"), "{}", again.json);
}

/// A tree push cut mid-way through server A resumes through server B (fresh client state): what A committed is
/// skipped as unchanged, never sent again, and the tree ends whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_tree_push_cut_on_one_server_resumes_on_another() {
    let Some(cluster) = garage::cluster() else {
        return;
    };
    let url = cluster.store_url("tree-resume");
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (s3_server(dir.path(), "a", &url), s3_server(dir.path(), "b", &url));
    let src = dir.path().join("src");
    let total = crate::tree::make_tree(&src, 300, 1, 43);
    let proxy = FaultProxy::start("127.0.0.1:0", a.addr, vec![Faults::cut(total * 3 / 5)])
        .await
        .unwrap();
    let cut = push(
        &src,
        &format!("ferry://{}/nightly", proxy.addr()),
        &dir.path().join("c1"),
        &["--retries", "0", "--links", "record"],
    )
    .await;
    assert_eq!(cut.code, 3, "the cut run fails as a network failure: {}", cut.stderr);
    a.wait_for_log("session ended with an error", Duration::from_secs(60))
        .await;
    let arrived = committed_files(&url).await;
    let arrived_bytes: u64 = arrived.values().sum();
    assert!(!arrived.is_empty(), "A committed files before the cut");

    let out = push(&src, &b.url("nightly"), &dir.path().join("c2"), &crate::tree::LINKS).await;
    out.assert_ok();
    assert!(out.u64("files_unchanged") >= arrived.len() as u64, "{}", out.json);
    assert!(
        out.u64("bytes_sent") <= total - arrived_bytes,
        "{arrived_bytes} bytes were committed by A: {}",
        out.json
    );
    let restore = dir.path().join("restore");
    pull(&a.url("nightly"), &restore, &dir.path().join("c3"), &crate::tree::LINKS)
        .await
        .assert_ok();
    crate::tree::assert_same_tree(&src, &restore);
}

/// `--delete` on the object store: entries the pushed tree no longer holds are deleted from the bucket (a
/// directory with its content), through another server than the one that stored them; nothing outside the tree's
/// directory goes, and a pull returns exactly the tree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_tree_delete_removes_only_inside_the_tree() {
    let Some(cluster) = garage::cluster() else {
        return;
    };
    let url = cluster.store_url("tree-delete");
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (s3_server(dir.path(), "a", &url), s3_server(dir.path(), "b", &url));
    let src = dir.path().join("site");
    for (p, text) in [
        ("keep.txt", "k"),
        ("old.txt", "o"),
        ("gone/x.txt", "x"),
        ("sub/y.txt", "y"),
    ] {
        std::fs::create_dir_all(src.join(p).parent().unwrap()).unwrap();
        std::fs::write(src.join(p), text).unwrap();
    }
    let state = dir.path().join("c");
    push(&src, &a.url("bk/site"), &state, &[]).await.assert_ok();
    let beside = dir.path().join("beside.txt");
    std::fs::write(&beside, "s").unwrap();
    push(&beside, &a.url("bk/sibling.txt"), &state, &[]).await.assert_ok();
    push(&beside, &a.url("bk/sitex"), &state, &[]).await.assert_ok();
    std::fs::remove_file(src.join("old.txt")).unwrap();
    std::fs::remove_dir_all(src.join("gone")).unwrap();

    let kept = push(&src, &b.url("bk/site"), &state, &[]).await;
    kept.assert_ok();
    assert!(
        committed_files(&url).await.contains_key("bk/site/old.txt"),
        "without --delete a push only adds"
    );

    let pushed = push(&src, &b.url("bk/site"), &state, &["--delete"]).await;
    pushed.assert_ok();
    let mut deleted: Vec<String> = pushed.json["deleted"]["paths"]
        .as_array()
        .unwrap_or_else(|| panic!("{}", pushed.json))
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    deleted.sort();
    assert_eq!(deleted, ["gone", "gone/x.txt", "old.txt"], "{}", pushed.json);
    let files: Vec<String> = committed_files(&url).await.into_keys().collect();
    assert_eq!(
        files,
        ["bk/sibling.txt", "bk/site/keep.txt", "bk/site/sub/y.txt", "bk/sitex"]
    );
    let restore = dir.path().join("restore");
    pull(&a.url("bk/site"), &restore, &dir.path().join("c2"), &[])
        .await
        .assert_ok();
    crate::tree::assert_same_tree(&src, &restore);
    let again = push(&src, &a.url("bk/site"), &state, &["--delete"]).await;
    again.assert_ok();
    assert_eq!(again.json["deleted"]["total"], 0, "{}", again.json);
}
