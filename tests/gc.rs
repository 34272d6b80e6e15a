//! Expiry of abandoned work: `ferry gc` on a stopped server, and the server's own periodic sweep, which never
//! takes a transfer away from a live session.

use std::time::Duration;

use ferry::fault::{FaultProxy, Faults};

use crate::util::*;

const SMALL: [&str; 6] = ["--chunking", "fixed", "--chunk-size", "64KiB", "--window", "1MiB"];

/// Pushes `src` through a link cut after `cut` bytes, without retrying: leaves an open transfer on the server.
async fn abandoned_push(server: &TestServer, src: &std::path::Path, state: &std::path::Path, cut: u64) {
    let proxy = FaultProxy::start("127.0.0.1:0", server.addr, vec![Faults::cut(cut)])
        .await
        .unwrap();
    let mut args = SMALL.to_vec();
    args.extend(["--retries", "0"]);
    let out = push(src, &format!("ferry://{}/big.img", proxy.addr()), state, &args).await;
    assert_eq!(out.code, 3, "the cut push fails: {}", out.stderr);
    server
        .wait_for_log("session ended with an error", Duration::from_secs(30))
        .await;
}

fn partials(root: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(root.join(".ferry/partial"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn gc(root: &std::path::Path, extra: &[&str]) -> PushOutcome {
    let output = std::process::Command::new(ferry_bin())
        .args(["gc", "--json", "--root"])
        .arg(root)
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    PushOutcome {
        code: output.status.code().unwrap_or(-1),
        json: serde_json::from_str(stdout.trim()).unwrap_or_default(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_on_a_stopped_server_expires_abandoned_transfers_and_leftovers() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let mut server = TestServer::start(&root);
    let src = dir.path().join("big.img");
    let size = 4 * MIB as u64;
    write_random(&src, size as usize, 31);
    let state = dir.path().join("state");
    abandoned_push(&server, &src, &state, 2 * MIB as u64).await;
    assert_eq!(partials(&root).len(), 1, "the cut push left a partial");
    let leftover = root.join(".ferry/partial/.ferry-0123456789abcdef.small");
    std::fs::write(&leftover, b"a temporary from a crashed batch").unwrap();

    let busy = gc(&root, &["--older-than", "0s"]);
    assert_eq!(busy.code, 6, "the running server's store is in use: {}", busy.stderr);
    assert!(busy.stderr.contains("in use"), "{}", busy.stderr);

    server.terminate(Duration::from_secs(10));
    let out = gc(&root, &["--older-than", "1h"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.json["report"]["transfers_expired"], 0, "nothing is an hour old yet");
    let out = gc(&root, &["--older-than", "0s"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.json["report"]["transfers_expired"], 1, "{}", out.json);
    assert_eq!(out.json["report"]["leftovers_removed"], 1, "{}", out.json);
    assert!(partials(&root).is_empty(), "{:?}", partials(&root));

    let server = TestServer::start(&root);
    let again = push(&src, &server.url("big.img"), &state, &SMALL).await;
    again.assert_ok();
    assert_eq!(again.u64("bytes_sent"), size, "the expired transfer starts over");
    assert_eq!(b3(&root.join("big.img")), b3(&src));

    let not_a_root = gc(dir.path(), &[]);
    assert_eq!(not_a_root.code, 2, "{}", not_a_root.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_sweeps_abandoned_transfers_but_not_live_ones() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let server = TestServer::start_with(&root, &["--partial-ttl", "1s", "--gc-interval", "200ms"]);
    let src = dir.path().join("big.img");
    write_random(&src, 4 * MIB, 32);

    // A session that holds its destination (its link hangs) is not abandoned, however long it is quiet.
    let proxy = FaultProxy::start("127.0.0.1:0", server.addr, vec![Faults::stall(2 * MIB as u64)])
        .await
        .unwrap();
    let mut client = push_command(
        &src,
        &format!("ferry://{}/big.img", proxy.addr()),
        &dir.path().join("s1"),
        &SMALL,
    )
    .spawn()
    .unwrap();
    tokio::time::timeout(Duration::from_secs(60), proxy.stalled(1))
        .await
        .expect("the push reached the stall");
    // A sweep that found the transfer idle past its TTL but held by the session says so; then it is still there.
    server
        .wait_for_log("kept an idle transfer a session holds", Duration::from_secs(30))
        .await;
    assert_eq!(partials(&root).len(), 1, "a live session's partial survives the sweeps");
    client.kill().unwrap();
    client.wait().unwrap();
    drop(proxy); // the server's session now sees its link close and lets go of the destination

    server
        .wait_for_log("expired an abandoned transfer", Duration::from_secs(30))
        .await;
    assert!(partials(&root).is_empty(), "{:?}", partials(&root));
}
