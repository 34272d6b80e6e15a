//! `ferry serve --store s3://…` against a real 3-node Garage cluster (tests/util/garage.rs): servers sharing one
//! bucket behave as one receiver, and the bucket, not a server's `--state`, is the truth.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::storage::object::layout::{self, journal_union, Layout};
use ferry::storage::object::StoreSettings;
use object_store::ObjectStore;

use crate::util::garage;
use crate::util::*;

/// A server of the bucket prefix `url`, with its own root and state under `dir`.
pub(crate) fn s3_server(dir: &Path, name: &str, url: &str) -> TestServer {
    let state = dir.join(format!("{name}-state"));
    let state = state.to_str().unwrap();
    TestServer::start_with(&dir.join(name), &["--store", url, "--state", state])
}

/// A client of the bucket itself, to look at what the servers stored, and the layout of the unnamed namespace.
pub(crate) fn bucket(url: &str) -> (Arc<dyn ObjectStore>, Layout) {
    let settings = StoreSettings::from_url(url).unwrap();
    (settings.build().unwrap(), settings.layout(""))
}

pub(crate) async fn count(store: &Arc<dyn ObjectStore>, prefix: &object_store::path::Path) -> usize {
    layout::list(&**store, prefix).await.unwrap().len()
}

/// Asserts that the bucket holds no open-transfer record; a failure names the records left and shows the logs
/// of the servers `names` (rooted in `dir`), to tell which server left which record and why.
pub(crate) async fn assert_no_open_record(url: &str, dir: &Path, names: &[&str]) {
    let (store, layout) = bucket(url);
    let left = layout::list(&*store, &layout.open()).await.unwrap();
    if left.is_empty() {
        return;
    }
    let keys: Vec<String> = left.iter().map(|meta| meta.location.to_string()).collect();
    let logs: Vec<String> = names
        .iter()
        .map(|name| {
            let log = std::fs::read_to_string(dir.join(format!("{name}.server.log"))).unwrap_or_default();
            format!("---- server {name}'s log:\n{log}")
        })
        .collect();
    panic!("committed, yet records are left: {keys:?}\n{}", logs.join("\n"));
}

/// Bytes the bucket's journals say are durable for the (single) open transfer, and its size.
async fn durable_bytes(store: &Arc<dyn ObjectStore>, layout: &Layout) -> Option<(u64, u64)> {
    let records = layout::list(&**store, &layout.open()).await.unwrap();
    let meta = records.first()?;
    let record = layout::get_record(&**store, &meta.location).await.unwrap()?;
    let entries = layout::read_journal(&**store, layout, record.transfer).await.unwrap();
    let durable = journal_union(&record.manifest, &entries);
    let bytes = (0..durable.chunks.len())
        .filter(|&i| durable.chunks.contains(i))
        .map(|i| u64::from(record.manifest.chunks[i as usize].len))
        .sum();
    Some((bytes, record.manifest.size))
}

/// Starts a slow push of `file` to `url` and SIGKILLs the client once the bucket says half the file is durable
/// (bounded: 90 s). Returns the durable bytes at the kill.
async fn push_killed_at_half(file: &Path, url: &str, client_state: &Path, store_url: &str) -> u64 {
    let (store, layout) = bucket(store_url);
    let mut cmd = push_command(file, url, client_state, &["--bwlimit", "3MiB", "--window", "2MiB"]);
    let mut child = KillOnDrop::new(cmd.stdout(std::process::Stdio::null()).spawn().unwrap());
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some((durable, size)) = durable_bytes(&store, &layout).await {
            if durable * 2 >= size {
                break;
            }
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the push ended before half of it was durable"
        );
        assert!(Instant::now() < deadline, "half of the file never became durable");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    durable_bytes(&store, &layout).await.expect("the transfer stays open").0
}

/// `ferry status --server URL --json`.
async fn status_server(url: &str, state: &Path) -> serde_json::Value {
    let mut cmd = std::process::Command::new(ferry_bin());
    cmd.args(["status", "--json", "--server", url.trim_end_matches('/'), "--state"])
        .arg(state)
        .stdin(std::process::Stdio::null());
    let output = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

/// What a resume may send again beyond the chunks not yet durable: the window plus one largest chunk (cdc:
/// 4 MiB) that was in flight.
const RESEND_SLACK: u64 = (2 + 4) << 20;

#[tokio::test]
async fn s3_push_then_pull_through_another_server() {
    let Some(cluster) = garage::cluster() else {
        return;
    };
    let url = cluster.store_url("push-pull");
    let dir = tempfile::tempdir().unwrap();
    let a = s3_server(dir.path(), "a", &url);
    let b = s3_server(dir.path(), "b", &url);
    let src = dir.path().join("src.bin");
    let data = write_random(&src, 6 << 20, 1);
    let pushed = push(&src, &a.url("dir/f.bin"), &dir.path().join("c1"), &[]).await;
    pushed.assert_ok();
    assert_eq!(pushed.u64("bytes_sent"), data.len() as u64);

    let out = dir.path().join("out.bin");
    pull(&b.url("dir/f.bin"), &out, &dir.path().join("c2"), &[])
        .await
        .assert_ok();
    assert!(std::fs::read(&out).unwrap() == data, "pulled bytes differ");

    // One object per distinct chunk (random data: every chunk distinct), one manifest object, nothing open.
    let (store, layout) = bucket(&url);
    assert_eq!(count(&store, &layout.chunks()).await as u64, pushed.u64("chunks"));
    assert_eq!(count(&store, &layout.files()).await, 1);
    assert_no_open_record(&url, dir.path(), &["a", "b"]).await;
    // The journal is deleted after `Committed` was answered, in the background.
    let journal = layout.namespace().clone().join("journal");
    let mut left = count(&store, &journal).await;
    for _ in 0..100 {
        if left == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        left = count(&store, &journal).await;
    }
    assert_eq!(left, 0, "the journal outlived the commit");
}

#[tokio::test]
async fn s3_resume_with_empty_state() {
    let Some(cluster) = garage::cluster() else {
        return;
    };
    let url = cluster.store_url("empty-state");
    let dir = tempfile::tempdir().unwrap();
    let mut a = s3_server(dir.path(), "a", &url);
    let src = dir.path().join("src.bin");
    let data = write_random(&src, 24 << 20, 2);
    let client = dir.path().join("client");
    let durable = push_killed_at_half(&src, &a.url("f.bin"), &client, &url).await;

    // The server loses its state entirely; the bucket keeps the transfer.
    a.kill9();
    std::fs::remove_dir_all(dir.path().join("a-state")).unwrap();
    let a = s3_server(dir.path(), "a", &url);
    let resumed = push(&src, &a.url("f.bin"), &client, &[]).await;
    resumed.assert_ok();
    let sent = resumed.u64("bytes_sent");
    let size = data.len() as u64;
    assert!(
        sent <= size - durable + RESEND_SLACK,
        "resume sent {sent} bytes of {size}, {durable} were durable in the bucket"
    );
    let out = dir.path().join("out.bin");
    pull(&a.url("f.bin"), &out, &dir.path().join("c2"), &[])
        .await
        .assert_ok();
    assert!(std::fs::read(&out).unwrap() == data);

    // Committed, and the state lost again: the bucket alone says the file is already there.
    let mut a = a;
    a.kill9();
    std::fs::remove_dir_all(dir.path().join("a-state")).unwrap();
    let a = s3_server(dir.path(), "a", &url);
    let again = push(&src, &a.url("f.bin"), &dir.path().join("c3"), &[]).await;
    again.assert_ok();
    assert_eq!(again.json["already_present"], true, "{}", again.json);
    assert_eq!(again.u64("bytes_sent"), 0);
}

#[tokio::test]
async fn s3_push_cut_on_one_server_resumes_on_another() {
    let Some(cluster) = garage::cluster() else {
        return;
    };
    let url = cluster.store_url("adopt");
    let dir = tempfile::tempdir().unwrap();
    let a = s3_server(dir.path(), "a", &url);
    let b = s3_server(dir.path(), "b", &url);
    let src = dir.path().join("src.bin");
    let data = write_random(&src, 24 << 20, 3);
    let client = dir.path().join("client");
    let durable = push_killed_at_half(&src, &a.url("f.bin"), &client, &url).await;

    // B lists the transfer A opened, from the bucket.
    let listed = status_server(&b.url(""), &dir.path().join("status")).await;
    let entries = listed["partials"].as_array().expect("partials listed");
    assert_eq!((entries.len(), listed["total"].as_u64()), (1, Some(1)), "{listed}");
    assert_eq!(entries[0]["path"], "f.bin");
    let received = entries[0]["received"].as_u64().unwrap();
    assert!(received >= durable && received < data.len() as u64, "{listed}");

    // Resumed through B, which never saw the transfer: A's acknowledged chunks are not sent again.
    let resumed = push(&src, &b.url("f.bin"), &client, &[]).await;
    resumed.assert_ok();
    let sent = resumed.u64("bytes_sent");
    let size = data.len() as u64;
    assert!(
        sent <= size - durable + RESEND_SLACK,
        "B asked for {sent} bytes of {size}; A had made {durable} durable"
    );
    assert_no_open_record(&url, dir.path(), &["a", "b"]).await;
    let out = dir.path().join("out.bin");
    pull(&a.url("f.bin"), &out, &dir.path().join("c2"), &[])
        .await
        .assert_ok();
    assert!(std::fs::read(&out).unwrap() == data);
}

#[tokio::test]
async fn s3_copy_to_another_path_sends_nothing_and_stores_no_chunk() {
    let Some(cluster) = garage::cluster() else {
        return;
    };
    let url = cluster.store_url("dedup");
    let dir = tempfile::tempdir().unwrap();
    let a = s3_server(dir.path(), "a", &url);
    let src = dir.path().join("src.bin");
    write_random(&src, 5 << 20, 4);
    push(&src, &a.url("one.bin"), &dir.path().join("c1"), &[])
        .await
        .assert_ok();
    let (store, layout) = bucket(&url);
    let chunks = count(&store, &layout.chunks()).await;

    // Another client, another path: the bucket holds every chunk (Full client: rule R (c)).
    let copy = push(&src, &a.url("two.bin"), &dir.path().join("c2"), &[]).await;
    copy.assert_ok();
    assert_eq!(copy.u64("bytes_sent"), 0);
    assert_eq!(count(&store, &layout.chunks()).await, chunks);
    assert_eq!(count(&store, &layout.files()).await, 2);
}

#[tokio::test]
async fn s3_min_chunk_size_refused() {
    let Some(cluster) = garage::cluster() else {
        return;
    };
    let url = cluster.store_url("min-chunk");
    let dir = tempfile::tempdir().unwrap();
    let a = s3_server(dir.path(), "a", &url);
    let src = dir.path().join("src.bin");
    write_random(&src, 1 << 20, 5);
    let refused = push(
        &src,
        &a.url("small.bin"),
        &dir.path().join("c1"),
        &["--chunking", "fixed", "--chunk-size", "4K"],
    )
    .await;
    assert_ne!(refused.code, 0);
    let said = format!("{}{}", refused.json, refused.stderr);
    assert!(said.contains("262144"), "the refusal names the minimum: {said}");
    let (store, layout) = bucket(&url);
    assert_eq!(count(&store, &layout.chunks()).await, 0);
    assert_eq!(count(&store, &layout.files()).await, 0);
}

#[tokio::test]
async fn s3_wrong_credentials_fail_the_start_without_showing_the_secret() {
    let Some(cluster) = garage::cluster() else {
        return;
    };
    let url = cluster.store_url("credentials");
    let dir = tempfile::tempdir().unwrap();
    let secret = "not-the-secret-0123456789abcdef0123456789abcdef";
    let mut cmd = std::process::Command::new(ferry_bin());
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--store", &url, "--state"])
        .arg(dir.path().join("state"))
        .env("AWS_SECRET_ACCESS_KEY", secret)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // Bounded: a server that started anyway is killed after 60 s and the test fails.
    let output = tokio::task::spawn_blocking(move || {
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "a server the bucket refuses must not start: {stderr}"
    );
    assert!(stderr.contains("object store"), "{stderr}");
    assert!(!stderr.contains(secret), "the secret leaked: {stderr}");
    let key_id = cluster
        .env()
        .into_iter()
        .find(|(k, _)| k == "AWS_ACCESS_KEY_ID")
        .unwrap()
        .1;
    assert!(!stderr.contains(&key_id), "the key id leaked: {stderr}");
}
