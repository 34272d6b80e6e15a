//! Messages that name the real problem (issue 16, item 10), through the real binary: bad URLs, a listen address
//! without a port or already in use, `gc --client` under a held lock, and plain (uncoloured) server logs when
//! stderr is not a terminal.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

/// Runs `cmd` to completion, killing it if it has not exited within `limit` (so a regression that makes it
/// serve or hang fails instead of blocking the suite).
async fn run_bounded(mut cmd: Command, limit: Duration) -> Output {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    tokio::task::spawn_blocking(move || {
        let mut child = cmd.spawn().expect("spawn ferry");
        let deadline = Instant::now() + limit;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!(
                    "ferry still running after {limit:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

fn serve_command(root: &Path, listen: &str) -> Command {
    let mut cmd = Command::new(ferry_bin());
    cmd.args(["serve", "--listen", listen, "--root"]).arg(root);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_without_a_path_or_with_a_bad_port_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.bin");
    write_random(&src, KIB, 1);
    let state = dir.path().join("state");
    for (url, expected) in [
        ("ferry://127.0.0.1:44547/", "has no remote path"),
        ("ferry://127.0.0.1:99999/x", "port 99999 is out of range"),
    ] {
        let out = push(&src, url, &state, &["--retries", "0"]).await;
        assert_eq!(out.code, 2, "{url}: {}\n{}", out.json, out.stderr);
        let error = out.json["error"].as_str().unwrap_or_default();
        assert!(error.contains(expected), "{url}: {}", out.json);
        assert!(!error.contains("not a ferry URL"), "{url}: {}", out.json);
        assert!(out.stderr.contains(expected), "{url}: {}", out.stderr);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_without_a_port_is_told_the_port_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_bounded(
        serve_command(&dir.path().join("root"), "127.0.0.1"),
        Duration::from_secs(30),
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("127.0.0.1 has no port"), "{stderr}");
    assert!(!stderr.contains("client tokens"), "not the loopback refusal: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_an_address_in_use_exits_2_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run_bounded(serve_command(&dir.path().join("root"), &addr), Duration::from_secs(30)).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "usage/config, not internal: {stderr}");
    assert!(stderr.contains(&format!("cannot listen on {addr}")), "{stderr}");
    assert!(stderr.contains("another server is listening there"), "{stderr}");
    drop(taken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_client_under_a_held_lock_does_not_suggest_wait() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let _held = ferry::store::StateLock::try_acquire(&state).unwrap();
    for json in [false, true] {
        let mut cmd = Command::new(ferry_bin());
        cmd.args(["gc", "--client", "--state"]).arg(&state);
        if json {
            cmd.arg("--json");
        }
        let out = run_bounded(cmd, Duration::from_secs(30)).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(8), "{stdout}\n{stderr}");
        assert!(!stderr.contains("--wait"), "gc has no --wait: {stderr}");
        assert!(stderr.contains("run gc --client again"), "{stderr}");
        if json {
            let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
            let error = summary["error"].as_str().unwrap();
            assert!(!error.contains("--wait") && error.contains("again"), "{summary}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_logs_to_a_pipe_carry_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    // TestServer runs `ferry -v serve` with stderr going to ROOT.server.log, not a terminal.
    let mut server = TestServer::start(&root);
    server.wait_for_log("serving", Duration::from_secs(20)).await;
    assert_eq!(server.terminate(Duration::from_secs(20)), Some(0));
    let log = std::fs::read_to_string(root.with_extension("server.log")).unwrap();
    assert!(log.contains("INFO"), "{log}");
    assert!(!log.contains('\u{1b}'), "ANSI escape in a piped log: {log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_ends_a_push_with_130_a_message_and_the_summary() {
    for quiet in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let server = TestServer::start(&dir.path().join("root"));
        let state = dir.path().join("state");
        let src = dir.path().join("big.bin");
        write_random(&src, 4 * MIB, 7);
        // --bwlimit keeps the push running for seconds: it cannot finish before the signal lands.
        let mut extra = vec!["--chunking", "fixed", "--chunk-size", "64KiB", "--bwlimit", "1MiB"];
        if quiet {
            extra.push("-q");
        }
        let child = push_command(&src, &server.url("big.bin"), &state, &extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferry push");
        // The server accepted the offer: the client is inside its transfer.
        server.wait_for_log("offer accepted", Duration::from_secs(30)).await;
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
        let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(130), "quiet={quiet}: {stdout}\n{stderr}");
        let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        assert_eq!(summary["event"], "summary", "{summary}");
        assert_eq!(summary["exit_code"], 130, "{summary}");
        assert!(summary["error"].as_str().unwrap().contains("interrupted"), "{summary}");
        if quiet {
            assert!(stderr.is_empty(), "-q: nothing on stderr: {stderr}");
        } else {
            assert!(stderr.contains("ferry: push interrupted"), "{stderr}");
        }
        // The next run resumes and finishes.
        push(&src, &server.url("big.bin"), &state, &[]).await.assert_ok();
        assert_eq!(b3(&server.root.join("big.bin")), b3(&src));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_ends_a_pull_with_130_and_the_summary() {
    use std::io::{BufRead, BufReader, Read};
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    write_random(&server.root.join("big.bin"), 4 * MIB, 8);
    let dest = dir.path().join("big.bin");
    let state = dir.path().join("state");
    let extra = ["--chunking", "fixed", "--chunk-size", "64KiB", "--bwlimit", "1MiB"];
    let mut child = pull_command(&server.url("big.bin"), &dest, &state, &extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferry pull");
    let pid = child.id() as i32;
    let stdout = child.stdout.take().unwrap();
    let lines = tokio::task::spawn_blocking(move || {
        let mut reader = BufReader::new(stdout);
        let mut seen = String::new();
        // The "connected" event comes from inside the transfer, after the SIGINT handler is in place.
        while !seen.contains("\"event\":\"connected\"") {
            let mut line = String::new();
            assert!(reader.read_line(&mut line).unwrap() > 0, "pull ended early: {seen}");
            seen.push_str(&line);
        }
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
        reader.read_to_string(&mut seen).unwrap();
        seen
    })
    .await
    .unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{lines}\n{stderr}");
    let summary: serde_json::Value = serde_json::from_str(lines.lines().last().unwrap()).unwrap();
    assert_eq!(
        (&summary["event"], &summary["exit_code"]),
        (&"summary".into(), &130.into()),
        "{summary}"
    );
    assert!(stderr.contains("ferry: pull interrupted"), "{stderr}");
    pull(&server.url("big.bin"), &dest, &state, &[]).await.assert_ok();
    assert_eq!(b3(&dest), b3(&server.root.join("big.bin")));
}

/// A SIGTERM sent the moment the server printed that it listens is a clean shutdown (exit 0), not death by the
/// signal's default action: the handlers are registered before the banner. Several starts, since the old race
/// (handlers registered by a spawned task that had not run yet) lost only some of the time, under load (a CI run's
/// `server_logs_to_a_pipe_carry_no_colour_codes` saw the server die of its SIGTERM); on a quiet machine the old
/// code passes this too.
#[test]
fn a_sigterm_right_after_the_banner_shuts_the_server_down_cleanly() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    for round in 0..8 {
        let mut child = serve_command(&dir.path().join(format!("root{round}")), "127.0.0.1:0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut banner = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut banner)
            .unwrap();
        assert!(banner.starts_with("ferry: listening on"), "{banner:?}");
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("round {round}: the server did not stop within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(status.code(), Some(0), "round {round}: {status}");
    }
}
