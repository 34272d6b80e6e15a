//! Failover within a group of `ferry serve --store` servers on one Garage bucket (proto-spec.md §14): a push to
//! `ferry://A,B/p` whose server A is SIGKILLed finishes on B in the same run without sending again what A had
//! acknowledged, and a push survives the loss of one Garage node of three.

use std::time::Duration;

use crate::failover::wait_for_acknowledged;
use crate::s3::{assert_no_open_record, s3_server};
use crate::util::garage;
use crate::util::*;

const CHUNK: u64 = MIB as u64;
const WINDOW: u64 = 2 * MIB as u64;
const ARGS: [&str; 8] = [
    "--chunking",
    "fixed",
    "--chunk-size",
    "1MiB",
    "--window",
    "2MiB",
    "--bwlimit",
    "3MiB",
];

/// Runs `cmd` (a `ferry push --json`) to the end, bounded, and returns its summary; panics if it failed.
async fn finish(client: KillOnDrop, server: &mut TestServer) -> serde_json::Value {
    let output = client.wait_with_output(server, Duration::from_secs(180)).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let summary: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or(serde_json::Value::Null);
    assert!(
        output.status.success(),
        "{summary}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    summary
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_failover_kill_server_mid_push() {
    let Some(cluster) = garage::cluster() else {
        return;
    };
    let url = cluster.store_url("failover");
    let dir = tempfile::tempdir().unwrap();
    let mut a = s3_server(dir.path(), "a", &url);
    let mut b = s3_server(dir.path(), "b", &url);
    let src = dir.path().join("src.bin");
    let size = 24 * MIB as u64;
    let data = write_random(&src, size as usize, 11);
    let state = dir.path().join("client");
    let group = format!("ferry://{},{}/f.bin", a.addr, b.addr);
    let spawned = push_command(&src, &group, &state, &ARGS)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let client = KillOnDrop::new(spawned);
    wait_for_acknowledged(&state, size / 4).await;
    a.kill9();
    let summary = finish(client, &mut b).await;

    assert_eq!(summary["moves"], 1, "{summary}");
    assert_eq!(
        summary["servers"],
        serde_json::json!([a.addr.to_string(), b.addr.to_string()])
    );
    assert_eq!(summary["server"], b.addr.to_string());
    // What A acknowledged is durable in the bucket and B leaves it out of its Need: over the whole run the client
    // sends the file once, plus at most what was in flight at the kill (a window, and the chunk being cut).
    let sent = summary["bytes_sent"].as_u64().unwrap();
    assert!(
        sent <= size + WINDOW + CHUNK,
        "sent {sent} bytes for a {size}-byte file: B asked again for chunks A had acknowledged"
    );
    // proto-spec.md §14 "Counts span the group": B's Committed counts the bytes A received too, not only its own
    // (A acknowledged at least a quarter). Chunks A stored but had not journaled at the kill are relied on by B
    // without bytes (rule R (c)): at most what was in flight.
    let received = summary["server_received_bytes"].as_u64().unwrap();
    assert!(
        received <= size && received + WINDOW + CHUNK >= size,
        "the group received {received} bytes of a {size}-byte file: B counted only its own? {summary}"
    );
    assert_no_open_record(&url, dir.path(), &["a", "b"]).await;
    let out = dir.path().join("out.bin");
    pull(&b.url("f.bin"), &out, &dir.path().join("puller"), &[])
        .await
        .assert_ok();
    assert!(std::fs::read(&out).unwrap() == data, "the file pulled from B differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_garage_node_killed_mid_push() {
    let Some(cluster) = garage::cluster() else {
        return;
    };
    let url = cluster.store_url("node-loss");
    let dir = tempfile::tempdir().unwrap();
    let mut a = s3_server(dir.path(), "a", &url);
    let src = dir.path().join("src.bin");
    let size = 16 * MIB as u64;
    let data = write_random(&src, size as usize, 12);
    let state = dir.path().join("client");
    let spawned = push_command(&src, &a.url("f.bin"), &state, &ARGS)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let client = KillOnDrop::new(spawned);
    wait_for_acknowledged(&state, size / 4).await;
    let down = cluster.kill_node(3);
    let summary = finish(client, &mut a).await;
    assert_eq!(summary["status"], "ok", "{summary}");
    let out = dir.path().join("out.bin");
    pull(&a.url("f.bin"), &out, &dir.path().join("puller"), &[])
        .await
        .assert_ok();
    assert!(std::fs::read(&out).unwrap() == data, "the pulled file differs");
    down.restart();
}
