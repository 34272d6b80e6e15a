//! Operator experience (issue 16) through the real binary: `--max-duration` under `--bwlimit`, the cron JSON log,
//! named refusals in a tree, and a server that cannot write its destination.

use std::time::{Duration, Instant};

use crate::util::*;

/// `--max-duration 1s --bwlimit 256KiB` on a 6 MiB one-stream push (the README's cron line, scaled down) stops on
/// time with exit 9. The old throttle handed out the few bytes each microsecond earned in a busy loop that never
/// waited on a timer, so the deadline went unnoticed: the run took the full ~24 s and then exited 9 anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_duration_stops_a_bandwidth_limited_push_on_time() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let src = dir.path().join("big.bin");
    write_random(&src, 6 * MIB, 16);
    for (name, streams) in [("one.bin", "1"), ("two.bin", "2")] {
        let started = Instant::now();
        let out = push(
            &src,
            &server.url(name),
            &dir.path().join(format!("state-{streams}")),
            &["--max-duration", "1s", "--bwlimit", "256KiB", "--streams", streams],
        )
        .await;
        let elapsed = started.elapsed();
        assert_eq!(out.code, 9, "--streams {streams}: {}\n{}", out.json, out.stderr);
        // 1 s of budget plus process start, hashing and a loaded machine; the whole file needs 24 s at the cap.
        assert!(
            elapsed < Duration::from_secs(12),
            "--streams {streams} took {elapsed:?}"
        );
        assert!(!dir.path().join("root").join(name).exists());
    }
}

/// The README's cron recipe, run literally (`ferry push --json -q … >> LOG 2>&1`) for a success, a failure, a bad
/// destination and an unknown flag: the log holds exactly one line per run and every line is a JSON summary with
/// the time, source and destination. The old binary wrote `ferry: push failed: …` after a failure's summary and no
/// JSON at all for a command line clap refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cron_log_gets_one_json_line_per_run_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let src = dir.path().join("nightly.bin");
    write_random(&src, 100_000, 7);
    let state = dir.path().join("state");
    let log_path = dir.path().join("ferry.log");
    let missing = dir.path().join("missing.bin");
    let url = server.url("backup/nightly.bin");
    let runs: [(Vec<&std::ffi::OsStr>, i32, &str); 4] = [
        (vec![src.as_os_str(), url.as_ref()], 0, "ok"),
        (vec![missing.as_os_str(), url.as_ref()], 6, "error"),
        (vec![src.as_os_str(), "http://x/".as_ref()], 2, "error"),
        (
            vec!["--no-such-flag".as_ref(), src.as_os_str(), url.as_ref()],
            2,
            "error",
        ),
    ];
    for (args, code, _) in &runs {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let mut cmd = std::process::Command::new(ferry_bin());
        cmd.args(["push", "--json", "-q", "--retry-delay", "20ms", "--state"])
            .arg(&state)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stderr(log.try_clone().unwrap())
            .stdout(log);
        let status = tokio::task::spawn_blocking(move || cmd.status().unwrap())
            .await
            .unwrap();
        assert_eq!(status.code(), Some(*code), "{args:?}");
    }
    let text = std::fs::read_to_string(&log_path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), runs.len(), "one line per run:\n{text}");
    for (line, (args, code, status)) in lines.iter().zip(&runs) {
        let summary: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert_eq!(summary["event"], "summary", "{line}");
        assert_eq!(summary["status"], *status, "{args:?}: {line}");
        assert_eq!(summary["exit_code"], *code, "{line}");
        assert_eq!(summary["command"], "push", "{line}");
        let time = summary["time"].as_str().unwrap_or_else(|| panic!("no time: {line}"));
        assert!(
            time.len() == 20 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
            "{time}"
        );
        assert!(
            summary.get("source").is_some() && summary.get("destination").is_some(),
            "{line}"
        );
    }
    assert!(
        lines[1].contains("missing.bin"),
        "a failed run names its source: {}",
        lines[1]
    );
    assert!(
        lines[1].contains("backup/nightly.bin"),
        "and its destination: {}",
        lines[1]
    );
    assert!(lines[2].contains("http://x/"), "{}", lines[2]);
}

/// Every entry of a tree the receiver does not place is named, with a reason, in the JSON summary (`refused`) and
/// in the text summary (`REFUSED path: reason`); exit 4. A large file with a directory in its way is refused at
/// plan time instead of ending the whole session. The old client printed only `1 files could not be placed on the
/// receiver` with `"failed":[]`, and a blocked large file failed the whole tree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_tree_entries_are_named_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("ok.txt"), b"fine").unwrap();
    std::fs::write(src.join("small.txt"), b"blocked").unwrap();
    write_random(&src.join("large.bin"), 2 * MIB, 3);
    std::os::unix::fs::symlink("ok.txt", src.join("link")).unwrap();
    for blocked in ["small.txt", "large.bin", "link"] {
        std::fs::create_dir_all(server.root.join("t").join(blocked).join("occupied")).unwrap();
    }
    let state = dir.path().join("state");
    let out = push(&src, &server.url("t"), &state, &["--links", "record"]).await;
    assert_eq!(out.code, 4, "{}\n{}", out.json, out.stderr);
    assert_eq!(out.json["failed"], serde_json::json!([]), "{}", out.json);
    let mut refused: Vec<(String, String)> = out.json["refused"]
        .as_array()
        .unwrap_or_else(|| panic!("no refused list: {}", out.json))
        .iter()
        .map(|r| {
            (
                r["path"].as_str().unwrap().to_string(),
                r["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    refused.sort();
    let paths: Vec<&str> = refused.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(paths, ["large.bin", "link", "small.txt"], "{}", out.json);
    assert!(refused.iter().all(|(_, why)| why.contains("receiver")), "{refused:?}");
    assert_eq!(
        std::fs::read(server.root.join("t/ok.txt")).unwrap(),
        b"fine",
        "the rest arrived"
    );

    // The text summary names them too.
    let mut cmd = std::process::Command::new(ferry_bin());
    cmd.args(["push", "--links", "record", "--retry-delay", "20ms", "--state"])
        .arg(&state)
        .arg(&src)
        .arg(server.url("t"));
    let output = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(4), "{stderr}");
    for path in ["large.bin", "link", "small.txt"] {
        assert!(
            stderr.contains(&format!("REFUSED {path}: ")),
            "{path} not named:\n{stderr}"
        );
    }
}

/// Makes a directory unwritable even for root (tests may run as root, who ignores mode bits): `chattr +i` where
/// root may set it, else mode 0555. Undone on drop so the temporary directory can be removed.
struct ReadOnlyDir(std::path::PathBuf, bool);

impl ReadOnlyDir {
    fn new(path: &std::path::Path) -> Option<ReadOnlyDir> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(path).unwrap();
        let immutable = std::process::Command::new("chattr")
            .arg("+i")
            .arg(path)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !immutable {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o555)).unwrap();
        }
        // Whether this process really cannot write there now (root without chattr can).
        let probe = path.join(".probe");
        if std::fs::write(&probe, b"").is_ok() {
            let _ = std::fs::remove_file(&probe);
            let _ = ReadOnlyDir(path.to_path_buf(), immutable);
            return None;
        }
        Some(ReadOnlyDir(path.to_path_buf(), immutable))
    }
}

impl Drop for ReadOnlyDir {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        if self.1 {
            let _ = std::process::Command::new("chattr").arg("-i").arg(&self.0).status();
        }
        let _ = std::fs::set_permissions(&self.0, std::fs::Permissions::from_mode(0o755));
    }
}

/// A server whose destination directory it may not write refuses the Offer at once, non-retryably, naming the
/// remote path, and logs it: exit 4 after one attempt, nothing uploaded. The old server took the whole file, then
/// failed the commit with a retryable `StorageIo: Permission denied` and the client retried until it gave up (exit 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_destination_is_refused_before_the_upload_and_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let Some(_locked) = ReadOnlyDir::new(&server.root.join("ro")) else {
        eprintln!("skipped: this process can write a read-only directory (root without chattr)");
        return;
    };
    let src = dir.path().join("data.bin");
    write_random(&src, 3 * MIB, 4);
    let state = dir.path().join("state");
    for remote in ["ro/data.bin", "ro/sub/data.bin"] {
        let started = Instant::now();
        let out = push(&src, &server.url(remote), &state, &["--retries", "5"]).await;
        assert_eq!(out.code, 4, "{remote}: {}\n{}", out.json, out.stderr);
        let error = out.json["error"].as_str().unwrap_or_default();
        assert!(error.contains(remote) && error.contains("StorageIo"), "{error}");
        assert!(error.contains("not retryable"), "{error}");
        assert!(!out.stderr.contains("retrying"), "{}", out.stderr);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{remote}: {:?}",
            started.elapsed()
        );
        // The server's log says so too (its fields may carry colour codes, so the pieces are matched apart).
        server
            .wait_for_log("cannot write the destination", Duration::from_secs(10))
            .await;
        server
            .wait_for_log(&format!("\"{remote}\""), Duration::from_secs(10))
            .await;
    }
    // Nothing was uploaded: no partial holds the file's bytes.
    let partials: u64 = walk_sizes(&server.root.join(".ferry"));
    assert!(partials < MIB as u64, "{partials} bytes under .ferry");
}

/// Total size of the regular files under `dir`.
fn walk_sizes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => walk_sizes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

/// A server that is not there is named: every retry line and the final error say `cannot reach 127.0.0.1:PORT`
/// and what a refused connection means, the first failure shows at once (before any retry), and the run stays a
/// network failure (exit 3) after its retries. The old client printed only `network I/O: Connection refused`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_named_in_every_retry_and_the_final_error() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("f.bin");
    write_random(&src, 1000, 9);
    let refusing = RefusingPort::new();
    let port = refusing.port;
    let addr = format!("127.0.0.1:{port}");
    let mut cmd = std::process::Command::new(ferry_bin());
    cmd.args(["push", "--retries", "2", "--retry-delay", "20ms", "--state"])
        .arg(dir.path().join("state"))
        .arg(&src)
        .arg(format!("ferry://{addr}/f.bin"))
        .stdin(std::process::Stdio::null());
    let output = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    let retries: Vec<&str> = stderr.lines().filter(|l| l.contains("retrying in")).collect();
    assert_eq!(retries.len(), 2, "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    for line in retries.iter().chain([&last]) {
        assert!(line.contains(&format!("cannot reach {addr}")), "{line}");
        assert!(line.contains("nothing listens"), "{line}");
    }
    assert!(last.contains("push failed: gave up after 3 attempts"), "{last}");
}
