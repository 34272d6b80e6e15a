//! `ferry status` through the real binary: the client's own records (done, failed, interrupted; human and JSON),
//! a store held by a running ferry, and `--server`, which lists only the caller's own partial uploads.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use ferry::auth::Token;
use ferry::fault::{FaultProxy, Faults};
use serde_json::Value;

use crate::access::Site;
use crate::util::*;

const SMALL: [&str; 6] = ["--chunking", "fixed", "--chunk-size", "64KiB", "--window", "1MiB"];

/// `ferry status --state STATE EXTRA...`: exit code, stdout, stderr.
async fn status(state: &Path, extra: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(ferry_bin());
    cmd.arg("status")
        .arg("--state")
        .arg(state)
        .args(extra)
        .env_remove("FERRY_TOKEN_FILE")
        .stdin(Stdio::null());
    let output = tokio::task::spawn_blocking(move || cmd.output().expect("run ferry status"))
        .await
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `ferry status ... --json`, which must succeed and print one JSON object.
async fn status_json(state: &Path, extra: &[&str]) -> Value {
    let mut args = extra.to_vec();
    args.push("--json");
    let (code, stdout, stderr) = status(state, &args).await;
    assert_eq!(code, 0, "status failed: {stdout}\n{stderr}");
    assert_eq!(stdout.lines().count(), 1, "one JSON object: {stdout}");
    serde_json::from_str(&stdout).unwrap()
}

fn by_destination<'a>(transfers: &'a Value, suffix: &str) -> &'a Value {
    transfers
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["destination"].as_str().unwrap().ends_with(suffix))
        .unwrap_or_else(|| panic!("no transfer to {suffix} in {transfers}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_done_and_a_failed_push_are_listed_with_state_bytes_and_error() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (code, stdout, _) = status(&state, &[]).await;
    assert_eq!(code, 0);
    assert!(stdout.starts_with("no transfers recorded in"), "{stdout}");
    assert!(!state.exists(), "status does not create a state directory");

    let server = TestServer::start(&dir.path().join("root"));
    let good = dir.path().join("good.bin");
    write_random(&good, 300 * KIB, 1);
    push(&good, &server.url("good.bin"), &state, &SMALL).await.assert_ok();
    let mut gone = TestServer::start(&dir.path().join("gone"));
    let gone_url = gone.url("lost.bin");
    gone.kill9();
    let lost = dir.path().join("lost.bin");
    write_random(&lost, 100 * KIB, 2);
    let failed = push(&lost, &gone_url, &state, &["--retries", "0"]).await;
    assert_eq!(failed.code, 3, "{}", failed.stderr);

    let listed = status_json(&state, &[]).await;
    assert_eq!(listed["status"], "ok");
    let transfers = &listed["transfers"];
    assert_eq!(transfers.as_array().unwrap().len(), 2, "{listed}");
    let done = by_destination(transfers, "/good.bin");
    assert_eq!(done["kind"], "push");
    assert_eq!(done["state"], "done");
    assert_eq!(done["size"], 300 * KIB as u64);
    assert_eq!(done["bytes"], 300 * KIB as u64, "a fresh push sends every byte");
    assert_eq!(done["last_error"], Value::Null);
    assert!(done["source"].as_str().unwrap().ends_with("/good.bin"));
    let lost_entry = by_destination(transfers, "/lost.bin");
    assert_eq!(lost_entry["state"], "failed");
    assert_eq!(lost_entry["size"], 100 * KIB as u64);
    assert_eq!(lost_entry["bytes"], 0);
    let error = lost_entry["last_error"].as_str().unwrap();
    assert!(error.contains("gave up after 1 attempts"), "{error}");
    assert!(lost_entry["updated"].as_u64().unwrap() >= lost_entry["started"].as_u64().unwrap());

    let (code, table, _) = status(&state, &[]).await;
    assert_eq!(code, 0);
    assert!(table.starts_with("STATE"), "{table}");
    let line = |name: &str| {
        table
            .lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("{table}"))
    };
    assert!(line("/good.bin").starts_with("done"), "{table}");
    assert!(line("/good.bin").contains("300.0 KiB / 300.0 KiB"), "{table}");
    assert!(line("/lost.bin").starts_with("failed"), "{table}");
    assert!(line("/lost.bin").contains("gave up after 1 attempts"), "{table}");

    let only_failed = status_json(&state, &["--failed"]).await;
    let only_failed = only_failed["transfers"].as_array().unwrap();
    assert_eq!(only_failed.len(), 1);
    assert_eq!(only_failed[0]["state"], "failed");
    let active = status_json(&state, &["--active"]).await;
    assert!(active["transfers"].as_array().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_held_by_a_running_ferry_is_reported_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let held = ferry::store::Store::open(dir.path()).unwrap();
    // A progress file left by a killed run (its pid cannot exist: above the kernel's pid_max limit) is not taken
    // for the holder's.
    std::fs::write(
        dir.path().join(ferry::client::PROGRESS_FILE),
        r#"{"pid":8388608,"kind":"push","source":"/a","destination":"ferry://h:1/a","size":9,"done":1,"moved":1,"attempts":1,"started":1,"updated":1}"#,
    )
    .unwrap();
    let (code, stdout, stderr) = status(dir.path(), &["--json"]).await;
    assert_eq!(code, i32::from(ferry::exit::ALREADY_RUNNING), "{stderr}");
    assert!(
        stderr.contains("a ferry run holds the state directory") && stderr.contains("published no progress"),
        "{stderr}"
    );
    let json: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["status"], "error");
    drop(held);
    wait_until_store_closed(dir.path());
    assert_eq!(status(dir.path(), &[]).await.0, 0, "readable once the other run ends");
}

/// The caller's partials on the site's server, as `ferry status --server --json` lists them.
async fn partials(site: &Site, token: &Token, state: &Path) -> Value {
    let token_file = site.token_file(token);
    let url = format!("ferry://{}", site.server.addr);
    status_json(state, &["--server", &url, "--token-file", &token_file]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_client_sees_only_its_own_interrupted_pushes_on_the_server() {
    let alice = Token::generate("alice").unwrap();
    let bob = Token::generate("bob").unwrap();
    let reader = Token::generate("reader").unwrap();
    let site = Site::start(
        &[
            (&alice, "alice", "[\"push\", \"pull\"]", ""),
            (&bob, "bob", "[\"push\"]", ""),
            (&reader, "alice", "[\"pull\"]", ""),
        ],
        "",
    );
    let size = 3 * MIB as u64;

    // Alice's push is killed while its link stalls after 1 MiB.
    let a = site.dir.join("a.bin");
    write_random(&a, size as usize, 1);
    let stall = FaultProxy::start(
        "127.0.0.1:0",
        site.server.addr,
        vec![Faults::stall(MIB as u64 + 4 * KIB as u64)],
    )
    .await
    .unwrap();
    let alice_token = site.token_file(&alice);
    let mut args = SMALL.to_vec();
    args.extend(["--token-file", &alice_token]);
    let url = format!("ferry://{}/a.bin", stall.addr());
    let mut client = push_command(&a, &url, &site.state("alice"), &args).spawn().unwrap();
    tokio::time::timeout(Duration::from_secs(60), stall.stalled(1))
        .await
        .expect("the push reached the stall");
    client.kill().unwrap();
    client.wait().unwrap();

    // Bob's push is cut after 2 MiB and gives up.
    let b = site.dir.join("b.bin");
    write_random(&b, size as usize, 2);
    let cut = FaultProxy::start("127.0.0.1:0", site.server.addr, vec![Faults::cut(2 * MIB as u64)])
        .await
        .unwrap();
    let bob_token = site.token_file(&bob);
    let mut args = SMALL.to_vec();
    args.extend(["--token-file", &bob_token, "--retries", "0"]);
    let out = push(&b, &format!("ferry://{}/b.bin", cut.addr()), &site.state("bob"), &args).await;
    assert_eq!(out.code, 3, "{}", out.stderr);

    // The server lists each client's own partial, with what of it is durable (Acks may trail the writes).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let (mine, theirs) = loop {
        let mine = partials(&site, &alice, &site.state("alice-status")).await;
        let theirs = partials(&site, &bob, &site.state("bob-status")).await;
        let received = |v: &Value| v["partials"][0]["received"].as_u64().unwrap_or(0);
        if (received(&mine) > 0 && received(&theirs) > 0) || tokio::time::Instant::now() > deadline {
            break (mine, theirs);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for (listed, path) in [(&mine, "a.bin"), (&theirs, "b.bin")] {
        let entries = listed["partials"].as_array().unwrap();
        assert_eq!(entries.len(), 1, "only the caller's own partials: {listed}");
        assert_eq!(
            (listed["total"].as_u64(), &listed["truncated"]),
            (Some(1), &Value::Bool(false))
        );
        assert_eq!(entries[0]["path"], path);
        assert_eq!(entries[0]["size"], size);
        let received = entries[0]["received"].as_u64().unwrap();
        assert!(received > 0 && received < size, "{path}: {received} of {size} durable");
        assert_eq!(received % (64 * KIB as u64), 0, "whole chunks only");
        assert!(entries[0]["updated"].as_u64() >= entries[0]["created"].as_u64());
    }
    assert!(mine["partials"][0]["received"].as_u64() <= Some(MIB as u64 + 4 * KIB as u64));

    // Locally, the killed push is interrupted and the cut one failed.
    let alice_local = status_json(&site.state("alice"), &[]).await;
    assert_eq!(alice_local["transfers"][0]["state"], "interrupted", "{alice_local}");
    let bob_local = status_json(&site.state("bob"), &["--failed"]).await;
    assert!(bob_local["transfers"][0]["destination"]
        .as_str()
        .unwrap()
        .ends_with("/b.bin"));

    // Human output names the partial; a client without push may not list.
    let url = format!("ferry://{}", site.server.addr);
    let (code, table, _) = status(&site.state("x"), &["--server", &url, "--token-file", &bob_token]).await;
    assert_eq!(code, 0);
    assert!(table.lines().nth(1).is_some_and(|l| l.starts_with("b.bin")), "{table}");
    let reader_token = site.token_file(&reader);
    let (code, _, stderr) = status(&site.state("x"), &["--server", &url, "--token-file", &reader_token]).await;
    assert_eq!(code, i32::from(ferry::exit::REJECTED), "{stderr}");
    assert!(stderr.contains("may not list partial uploads"), "{stderr}");
    drop(stall);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_three_and_four_meet_and_listing_needs_four() {
    use ferry::wire::{Connection, ErrorCode, Hello, Message, Welcome, MAGIC};
    use tokio::net::{TcpListener, TcpStream};

    // A version-3 client is served as before, and cannot list (version 3 has no ListPartials).
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let mut conn = Connection::new(TcpStream::connect(server.addr).await.unwrap(), ferry::MAX_FRAME);
    let hello = |version| {
        Message::Hello(Hello {
            magic: MAGIC,
            min_version: 3,
            max_version: version,
            agent: "test".into(),
            client: String::new(),
        })
    };
    conn.write_message(&hello(3)).await.unwrap();
    match conn.read_message().await.unwrap() {
        Some(Message::Welcome(welcome)) => assert_eq!(welcome.version, 3),
        other => panic!("expected Welcome, got {other:?}"),
    }
    conn.write_message(&Message::ListPartials).await.unwrap();
    match conn.read_message().await.unwrap() {
        Some(Message::Error(frame)) => assert_eq!(frame.code, ErrorCode::UnexpectedMessage),
        other => panic!("expected an Error, got {other:?}"),
    }
    // A client offering 3..=4 gets 4, and its list.
    let mut conn = Connection::new(TcpStream::connect(server.addr).await.unwrap(), ferry::MAX_FRAME);
    conn.write_message(&hello(4)).await.unwrap();
    assert!(matches!(conn.read_message().await.unwrap(), Some(Message::Welcome(w)) if w.version == 4));
    conn.write_message(&Message::ListPartials).await.unwrap();
    assert!(matches!(conn.read_message().await.unwrap(), Some(Message::Partials(p)) if p.entries.is_empty()));

    // Against a server that speaks only version 3, `status --server` stops before sending anything it
    // cannot decode, and says why.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let old_server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut conn = Connection::new(stream, ferry::MAX_FRAME);
        let _hello = conn.read_message().await.unwrap();
        let welcome = Welcome {
            version: 3,
            agent: "ferry/0.old".into(),
            max_frame: ferry::MAX_FRAME,
        };
        conn.write_message(&Message::Welcome(welcome)).await.unwrap();
        conn.read_message().await.ok().flatten()
    });
    let (code, _, stderr) = status(&dir.path().join("state"), &["--server", &format!("ferry://{addr}")]).await;
    assert_eq!(code, i32::from(ferry::exit::REJECTED), "{stderr}");
    assert!(stderr.contains("speaks protocol version 3"), "{stderr}");
    assert_eq!(
        old_server.await.unwrap(),
        None,
        "the client closed without sending ListPartials"
    );
}

/// proto-spec.md §13: after `Partials` the connection stays in its state, so a second `ListPartials` and then an
/// `Offer` on the same connection are served.
#[tokio::test]
async fn list_partials_twice_then_an_offer_on_one_connection() {
    use ferry::wire::{Connection, Hello, Message, Offer, MAGIC};
    use tokio::net::TcpStream;

    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let mut conn = Connection::new(TcpStream::connect(server.addr).await.unwrap(), ferry::MAX_FRAME);
    let hello = Message::Hello(Hello {
        magic: MAGIC,
        min_version: 3,
        max_version: 4,
        agent: "test".into(),
        client: String::new(),
    });
    conn.write_message(&hello).await.unwrap();
    assert!(matches!(conn.read_message().await.unwrap(), Some(Message::Welcome(w)) if w.version == 4));
    let data = b"listed, then pushed";
    let manifest = single_chunk_manifest(data);
    for round in 0..2 {
        conn.write_message(&Message::ListPartials).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(20), conn.read_message()).await;
        assert!(
            matches!(&answer, Ok(Ok(Some(Message::Partials(p)))) if p.entries.is_empty() && p.total == 0),
            "listing {round}: {answer:?}"
        );
    }
    let offer = Message::Offer(Offer {
        path: "after-listing.txt".into(),
        manifest,
    });
    conn.write_message(&offer).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(20), conn.read_message()).await;
    assert!(
        matches!(&answer, Ok(Ok(Some(Message::Need(n)))) if n.ranges.len() == 1),
        "the Offer after two listings: {answer:?}"
    );
    send_chunk_zero_and_commit(&mut conn, data).await;
    assert_eq!(std::fs::read(server.root.join("after-listing.txt")).unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_pull_is_listed_with_its_durable_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let size = 3 * MIB as u64;
    write_random(&server.root.join("big.bin"), size as usize, 5);
    let proxy = FaultProxy::start(
        "127.0.0.1:0",
        server.addr,
        vec![Faults::cut(2 * MIB as u64).downstream()],
    )
    .await
    .unwrap();
    let (state, dest) = (dir.path().join("state"), dir.path().join("big.bin"));
    let mut args = SMALL.to_vec();
    args.extend(["--retries", "0"]);
    let out = pull(&format!("ferry://{}/big.bin", proxy.addr()), &dest, &state, &args).await;
    assert_eq!(out.code, 3, "{}", out.stderr);

    let listed = status_json(&state, &["--active"]).await;
    let transfers = listed["transfers"].as_array().unwrap();
    assert_eq!(transfers.len(), 1, "{listed}");
    let pulled = &transfers[0];
    assert_eq!(
        (&pulled["kind"], &pulled["state"]),
        (&Value::from("pull"), &Value::from("interrupted"))
    );
    assert_eq!(pulled["source"], Value::Null);
    assert_eq!(pulled["size"], size);
    let expected = dir.path().canonicalize().unwrap().join("big.bin");
    assert_eq!(pulled["destination"], expected.display().to_string());
    let bytes = pulled["bytes"].as_u64().unwrap();
    assert!(bytes > 0 && bytes < size, "{bytes} of {size} durable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_push_is_listed_as_one_push_of_the_tree_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let state = dir.path().join("state");
    let tree = dir.path().join("photos");
    std::fs::create_dir_all(tree.join("2026")).unwrap();
    write_random(&tree.join("2026/a.jpg"), 40 * KIB, 1);
    write_random(&tree.join("b.raw"), 2 * MIB, 2);
    push(&tree, &server.url("backups/photos"), &state, &[])
        .await
        .assert_ok();
    let listed = status_json(&state, &[]).await;
    let record = by_destination(&listed["transfers"], "/backups/photos");
    assert_eq!(record["kind"], "push");
    assert_eq!(record["state"], "done");
    assert_eq!(record["size"], (2 * MIB + 40 * KIB) as u64);
    assert_eq!(record["bytes"], (2 * MIB + 40 * KIB) as u64, "{record}");
    assert!(record["last_error"].is_null(), "{record}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_client_prunes_finished_records_and_manifests_of_gone_files() {
    // Large enough that one pass over it outweighs what a run reads besides (its sled state store: ~1 MiB here).
    const KEPT_SIZE: usize = 4 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let state = dir.path().join("state");
    let (kept, gone) = (dir.path().join("kept.bin"), dir.path().join("gone.bin"));
    write_random(&kept, KEPT_SIZE, 1);
    write_random(&gone, 200 * KIB, 2);
    push(&kept, &server.url("kept.bin"), &state, &[]).await.assert_ok();
    push(&gone, &server.url("gone.bin"), &state, &[]).await.assert_ok();
    std::fs::remove_file(&gone).unwrap();
    let gc = |extra: &'static [&'static str]| {
        let state = state.clone();
        async move {
            let output = tokio::task::spawn_blocking(move || {
                std::process::Command::new(ferry_bin())
                    .args(["gc", "--client", "--json", "--state"])
                    .arg(&state)
                    .args(extra)
                    .output()
                    .unwrap()
            })
            .await
            .unwrap();
            let json: Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
            (output.status.code(), json)
        }
    };
    // Recent records stay; only the manifest of the deleted file goes.
    let (code, json) = gc(&[]).await;
    assert_eq!(code, Some(0), "{json}");
    assert_eq!(json["report"]["records_removed"], 0, "{json}");
    assert_eq!(json["report"]["manifests_removed"], 1, "{json}");
    let (code, json) = gc(&["--older-than", "0s"]).await;
    assert_eq!(code, Some(0), "{json}");
    assert_eq!(json["report"]["records_removed"], 2, "{json}");
    assert_eq!(status_json(&state, &[]).await["transfers"], serde_json::json!([]));
    // The kept file's manifest survived: its next push does not read the file again. Measured, not taken from the
    // client's word: hashing reads the whole file (`size` bytes); a run that takes its manifest from the cache and
    // finds the file already on the server reads less than that in all (state store and configuration included).
    let (again, read) = run_counting_reads(push_command(&kept, &server.url("kept.bin"), &state, &[])).await;
    again.assert_ok();
    assert_eq!(again.json["manifest_cached"], true, "{}", again.json);
    let size = KEPT_SIZE as u64;
    eprintln!("the re-push after gc read {read} bytes for a {size}-byte source");
    assert!(
        read < size,
        "the re-push read {read} bytes: it rehashed the {size}-byte source"
    );
    // A running push (its lock held) makes gc wait its turn: exit 8.
    let _held = ferry::store::StateLock::try_acquire(&state).unwrap();
    assert_eq!(gc(&[]).await.0, Some(i32::from(ferry::exit::ALREADY_RUNNING)));
}

/// `ferry status` while a push runs (the store is held by sled) reads the run's progress file: exit 0, the
/// transfer `running` with what the receiver acknowledged. After the push is SIGKILLed, the store is readable
/// again and the interrupted push shows the bytes the receiver acknowledged: more than zero, and no more than the
/// server really holds durably (its own partial listing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_a_running_push_and_what_an_interrupted_one_left_acknowledged() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let server = TestServer::start(&dir.path().join("root"));
    let file = dir.path().join("slow.bin");
    let size = 16 * MIB;
    write_random(&file, size, 7);
    let mut extra = SMALL.to_vec();
    extra.extend(["--bwlimit", "1MiB", "--json-progress", "100ms"]);
    let mut client = push_command(&file, &server.url("slow.bin"), &state, &extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // 16 s at 1 MiB/s: the push is still running while status looks, however loaded the machine (it is killed
    // long before the end). Wait for the client's own report that the receiver acknowledged something.
    let stdout = client.stdout.take().unwrap();
    let acked = tokio::task::spawn_blocking(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let event: Value = serde_json::from_str(&line.unwrap()).unwrap();
            if event["event"] == "progress" && event["bytes_done"].as_u64().unwrap_or(0) > 0 {
                return event["bytes_done"].as_u64().unwrap();
            }
        }
        panic!("the push ended without reporting progress");
    })
    .await
    .unwrap();
    assert!(acked < size as u64, "the push is still running");

    // The progress file follows within a publishing interval: poll (bounded) for it to show progress.
    let mut running = Value::Null;
    for _ in 0..100 {
        let listed = status_json(&state, &[]).await;
        let transfers = listed["transfers"].as_array().unwrap().clone();
        assert_eq!(transfers.len(), 1, "{listed}");
        if transfers[0]["acked"].as_u64().unwrap_or(0) > 0 {
            running = transfers[0].clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(running["state"], "running", "{running}");
    assert_eq!(running["kind"], "push");
    assert_eq!(running["size"], size as u64);
    assert!(
        running["destination"].as_str().unwrap().ends_with("/slow.bin"),
        "{running}"
    );
    assert!(running["acked"].as_u64().unwrap() < size as u64, "{running}");
    let (code, table, _) = status(&state, &["--active"]).await;
    assert_eq!(code, 0);
    assert!(
        table.lines().nth(1).is_some_and(|l| l.starts_with("running  push")),
        "{table}"
    );

    client.kill().unwrap();
    client.wait().unwrap();
    let listed = status_json(&state, &[]).await;
    let interrupted = &listed["transfers"][0];
    assert_eq!(interrupted["state"], "interrupted", "{listed}");
    let acked = interrupted["acked"].as_u64().unwrap();
    let url = format!("ferry://{}", server.addr);
    let on_server = status_json(&state, &["--server", &url]).await;
    let received = on_server["partials"][0]["received"].as_u64().unwrap();
    assert!(
        acked > 0 && acked <= received,
        "acknowledged {acked} of the {received} bytes the server holds: {listed}"
    );
    let (_, table, _) = status(&state, &[]).await;
    assert!(!table.contains("0 B / 16.0 MiB"), "{table}");
}
