//! `ferry gc --store` against a real 3-node Garage cluster (tests/util/garage.rs) while another server uploads:
//! mark and sweep never takes a chunk a committed file names, and removes the old orphans.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ferry::storage::object::layout::{self, Layout};
use ferry::storage::object::StoreSettings;

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

/// Trees are not kept in the bucket yet: a tree pushed to a `--store` server (with or without `--delete`) is refused
/// with a message naming the object store, and nothing of it lands under the server's local root or in the bucket.
#[tokio::test]
async fn s3_tree_push_refused_never_local() {
    let Some(cluster) = garage::cluster() else {
        return;
    };
    let url = cluster.store_url("tree-refused");
    let dir = tempfile::tempdir().unwrap();
    let a = s3_server(dir.path(), "a", &url);
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("sub/empty")).unwrap();
    std::fs::write(src.join("small.txt"), b"inline bytes").unwrap();
    write_random(&src.join("sub/mid.bin"), 200 << 10, 30);

    for extra in [&[][..], &["--delete"][..]] {
        let out = push(&src, &a.url("t"), &dir.path().join("c"), extra).await;
        assert_ne!(
            out.code, 0,
            "a tree push {extra:?} to an object store is refused: {}",
            out.json
        );
        assert!(
            out.stderr.contains("object store") || out.json.to_string().contains("object store"),
            "the refusal says why: {}\n{}",
            out.json,
            out.stderr
        );
    }
    assert_eq!(
        files_beneath(&a.root),
        Vec::<std::path::PathBuf>::new(),
        "nothing under the local root"
    );
    let settings = StoreSettings::from_url(&url).unwrap();
    let (store, layout): (_, Layout) = (settings.build().unwrap(), settings.layout(""));
    let entries = layout::list(&*store, &layout.files()).await.unwrap();
    assert!(entries.is_empty(), "nothing in the bucket: {entries:?}");
}
