//! What a push or pull shows: the `--json` event stream (schema in README, "JSON output") and plain, unanimated
//! output when stderr is not a terminal.

use serde_json::Value;

use crate::util::*;

/// Every stdout line of a `--json` run, parsed.
fn events(stdout: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect()
}

fn names(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e["event"].as_str().expect("every line names its event"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_is_a_stream_of_events_from_start_to_the_summary_with_progress_between() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let src = dir.path().join("disk.img");
    write_random(&src, 24 * MIB, 5);
    // A small window and a progress event every 5 ms: several progress events even on a fast machine.
    let cmd = push_command(
        &src,
        &server.url("disk.img"),
        &dir.path().join("state"),
        &[
            "--json-progress",
            "5ms",
            "--window",
            "256KiB",
            "--chunk-size",
            "64KiB",
            "--chunking",
            "fixed",
        ],
    );
    let output = tokio::task::spawn_blocking(move || { cmd }.output().unwrap())
        .await
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let events = events(&output.stdout);
    let names = names(&events);
    assert_eq!(names.first(), Some(&"start"), "{names:?}");
    assert_eq!(names.last(), Some(&"summary"), "{names:?}");
    for expected in ["manifest", "connected", "need", "progress"] {
        assert!(names.contains(&expected), "no {expected} event in {names:?}");
    }
    assert_eq!(names.iter().filter(|n| **n == "summary").count(), 1);

    let start = &events[0];
    assert_eq!(start["command"], "push");
    assert_eq!(start["destination"], server.url("disk.img"));
    let summary = events.last().unwrap();
    assert_eq!(summary["status"], "ok");
    assert_eq!(summary["exit_code"], 0);
    assert_eq!(summary["digest"], b3(&src));
    assert_eq!(summary["bytes_sent"], 24 * MIB as u64);

    // Progress never runs backwards within an attempt and never passes the total.
    let mut last_done = 0;
    for progress in events.iter().filter(|e| e["event"] == "progress") {
        let done = progress["bytes_done"].as_u64().unwrap();
        let total = progress["bytes_total"].as_u64().unwrap();
        assert!(done >= last_done, "progress ran backwards: {progress}");
        // Before the manifest is known the total is 0 and nothing is done; after, done never passes it.
        let within = if total == 0 { done == 0 } else { done <= total };
        assert!(within, "done passes the total: {progress}");
        assert!(total == 0 || total == 24 * MIB as u64, "{progress}");
        if progress["file"] == "disk.img" {
            assert_eq!(progress["file_size"], 24 * MIB as u64, "{progress}");
        }
        for key in [
            "bytes_moved",
            "bytes_held",
            "chunks_resent",
            "reconnects",
            "rate_bytes_per_sec",
            "elapsed_ms",
        ] {
            assert!(progress[key].is_u64(), "{key} missing in {progress}");
        }
        last_done = done;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_run_still_ends_its_json_stream_with_a_summary_naming_the_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("a.bin");
    write_random(&src, 64 * KIB, 1);
    // Nothing listens on this port.
    let refusing = RefusingPort::new();
    let port = refusing.port;
    let cmd = push_command(
        &src,
        &format!("ferry://127.0.0.1:{port}/a.bin"),
        &dir.path().join("state"),
        &["--retries", "1"],
    );
    let output = tokio::task::spawn_blocking(move || { cmd }.output().unwrap())
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(3));
    let events = events(&output.stdout);
    let names = names(&events);
    assert_eq!(names.first(), Some(&"start"), "{names:?}");
    assert!(names.contains(&"retry"), "the retry is reported: {names:?}");
    let summary = events.last().unwrap();
    assert_eq!(summary["event"], "summary");
    assert_eq!(summary["status"], "error");
    assert_eq!(summary["exit_code"], 3);
    assert!(summary["error"].as_str().is_some_and(|e| !e.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_terminal_the_human_output_is_plain_lines_with_no_animation() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let src = dir.path().join("b.bin");
    write_random(&src, 3 * MIB, 2);
    let output = std::process::Command::new(ferry_bin())
        .arg("push")
        .arg(&src)
        .arg(server.url("b.bin"))
        .arg("--state")
        .arg(dir.path().join("state"))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("ferry: pushed:"), "{stderr}");
    assert!(
        !stderr.contains('\r') && !stderr.contains('\x1b'),
        "no redraws or colours in a log: {stderr:?}"
    );
    // Without --json, stdout carries only the result: the digest of what was committed.
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!("blake3 {}\n", b3(&src)),
        "stdout is the digest line"
    );
    for line in stderr.lines() {
        assert!(line.starts_with("ferry: "), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_terminal_a_tree_gets_a_bar_per_large_file_and_a_total() {
    if std::process::Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: util-linux `script` (to give ferry a terminal) is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    write_random(&tree.join("small.txt"), 10 * KIB, 1);
    write_random(&tree.join("big-one.img"), 2 * MIB, 2);
    write_random(&tree.join("big-two.img"), 2 * MIB, 3);
    // --bwlimit keeps the run above a second, so the 10 Hz display draws several frames.
    let command = format!(
        "{} push {} {} --state {} --bwlimit 2MiB",
        ferry_bin(),
        tree.display(),
        server.url("t"),
        dir.path().join("state").display()
    );
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("script")
            .args(["-qec", &command, "/dev/null"])
            .env("TERM", "xterm")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let screen = strip_ansi(&String::from_utf8_lossy(&output.stdout));
    assert_eq!(output.status.code(), Some(0), "{screen}");
    for needle in ["big-one.img [", "big-two.img [", "total [", "ferry: tree "] {
        assert!(screen.contains(needle), "no {needle:?} on the terminal: {screen}");
    }
    assert_eq!(b3(&server.root.join("t/big-two.img")), b3(&tree.join("big-two.img")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_with_quiet_prints_the_summary_alone_for_cron_logs() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let src = dir.path().join("c.bin");
    write_random(&src, 2 * MIB, 4);
    let cmd = push_command(
        &src,
        &server.url("c.bin"),
        &dir.path().join("state"),
        &["-q", "--json-progress", "5ms"],
    );
    let output = tokio::task::spawn_blocking(move || { cmd }.output().unwrap())
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    let events = events(&output.stdout);
    assert_eq!(names(&events), ["summary"], "one line per run");
    assert_eq!(events[0]["digest"], b3(&src));
    assert!(output.stderr.is_empty(), "{}", String::from_utf8_lossy(&output.stderr));
}

/// A reader that goes away (`ferry push --json | head -1`, a cron pipe closed early) does not turn a finished push
/// into a panic: with stdout and stderr both closed before the first line, the push still lands and exits 0. The
/// old binary panicked printing the summary ("failed printing to stdout: Broken pipe") and exited 101.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_stdout_and_stderr_do_not_fail_a_push() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let src = dir.path().join("f.bin");
    write_random(&src, 3 * MIB, 27);
    // The JSON event stream on stdout, then the human lines on stderr (a pipe, so plain lines).
    for json in [true, false] {
        let state = dir.path().join(format!("state-{json}"));
        let mut command = std::process::Command::new(ferry_bin());
        command.arg("push").arg(&src).arg(server.url(&format!("{json}.bin")));
        command.arg("--state").arg(&state).args(["--timeout", "10s"]);
        if json {
            command.arg("--json");
        }
        let mut child = command
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        drop(child.stderr.take());
        let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
            .await
            .unwrap();
        assert_eq!(status.code(), Some(0), "--json: {json}");
        assert_eq!(b3(&server.root.join(format!("{json}.bin"))), b3(&src));
    }
}
