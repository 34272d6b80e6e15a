//! Cron-friendly limits through the real binary: `--bwlimit`, `--max-duration`, and the state directory's lock
//! (`--wait`). Time is only ever bounded from below: a loaded machine may be slower, never faster.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

const SMALL: [&str; 6] = ["--chunking", "fixed", "--chunk-size", "64KiB", "--window", "1MiB"];

/// A listener that accepts connections and never answers (a hung server); it lives as long as the test.
pub fn stalled_listener() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let held = listener.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut sockets = Vec::new();
        for socket in held.incoming() {
            match socket {
                Ok(socket) => sockets.push(socket),
                Err(_) => return,
            }
        }
    });
    (listener, addr)
}

/// Starts `ferry push` in the background with `extra` flags.
fn spawn_push(src: &Path, url: &str, state: &Path, extra: &[&str]) -> Child {
    push_command(src, url, state, extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferry push")
}

/// Waits (bounded) until `child` holds the state lock: its pid is the first line of `STATE/lock`.
async fn wait_until_locked(child: &Child, state: &Path) {
    let pid = child.id().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(state.join("lock")).unwrap_or_default();
        if text.lines().next() == Some(pid.as_str()) {
            return;
        }
        assert!(Instant::now() < deadline, "pid {pid} never took the lock ({text:?})");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for a background ferry run on a blocking thread; returns its outcome.
async fn finish(child: Child) -> PushOutcome {
    let output = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    PushOutcome {
        code: output.status.code().unwrap_or(-1),
        json: stdout
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or_default(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bwlimit_holds_a_push_to_the_rate_and_the_summary_is_normal() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let src = dir.path().join("limited.bin");
    write_random(&src, 3 * MIB, 1);
    let started = Instant::now();
    let out = push(
        &src,
        &server.url("limited.bin"),
        &dir.path().join("state"),
        &["--bwlimit", "2MiB/s"],
    )
    .await;
    let elapsed = started.elapsed();
    out.assert_ok();
    // 3 MiB at 2 MiB/s, less a burst of a tenth of a second: at least ~1.4 s. Only a lower bound.
    assert!(elapsed >= Duration::from_secs(1), "took {elapsed:?}");
    assert_eq!(out.json["status"], "ok");
    assert_eq!(out.u64("bytes_sent"), 3 * MIB as u64);
    assert!(out.u64("duration_ms") >= 1000, "{}", out.json);
    assert!(out.u64("rate_bytes_per_sec") <= 5 * MIB as u64 / 2, "{}", out.json);
    assert_eq!(b3(&server.root.join("limited.bin")), b3(&src));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_duration_stops_a_push_to_a_hung_server_with_exit_9() {
    let dir = tempfile::tempdir().unwrap();
    let (_listener, addr) = stalled_listener();
    let src = dir.path().join("stalled.bin");
    write_random(&src, 100 * KIB, 2);
    let started = Instant::now();
    let url = format!("ferry://{addr}/stalled.bin");
    let out = push(
        &src,
        &url,
        &dir.path().join("state"),
        &["--max-duration", "1s", "--timeout", "60s"],
    )
    .await;
    assert_eq!(out.code, 9, "{}\n{}", out.json, out.stderr);
    assert_eq!(out.json["status"], "error");
    assert_eq!(out.json["exit_code"], 9);
    // Exit 9 comes only from the deadline: the hung server alone would hold each attempt for --timeout (60 s).
    assert!(out.stderr.contains("--max-duration 1s ran out"), "{}", out.stderr);
    assert!(started.elapsed() >= Duration::from_secs(1), "{:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_stopped_by_max_duration_is_resumed_by_the_next_run() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let state = dir.path().join("state");
    let src = dir.path().join("big.bin");
    write_random(&src, 6 * MIB, 3);
    let url = server.url("big.bin");
    let mut slow = SMALL.to_vec();
    slow.extend(["--bwlimit", "2MiB", "--max-duration", "2s"]);
    let stopped = push(&src, &url, &state, &slow).await;
    assert_eq!(stopped.code, 9, "{}\n{}", stopped.json, stopped.stderr);
    assert_eq!(stopped.json["exit_code"], 9);
    assert!(!server.root.join("big.bin").exists(), "nothing is committed yet");
    let resumed = push(&src, &url, &state, &SMALL).await;
    resumed.assert_ok();
    assert!(
        resumed.u64("bytes_sent") < 6 * MIB as u64,
        "the second run resumes: {}",
        resumed.json
    );
    assert_eq!(b3(&server.root.join("big.bin")), b3(&src));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_on_the_same_state_exits_8_or_waits_with_wait() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let state = dir.path().join("state");
    let (first_src, second_src) = (dir.path().join("first.bin"), dir.path().join("second.bin"));
    write_random(&first_src, 3 * MIB, 4);
    write_random(&second_src, 64 * KIB, 5);
    let mut slow = SMALL.to_vec();
    slow.extend(["--bwlimit", "1MiB"]);
    let first = spawn_push(&first_src, &server.url("first.bin"), &state, &slow);
    wait_until_locked(&first, &state).await;

    let refused = push(&second_src, &server.url("second.bin"), &state, &SMALL).await;
    assert_eq!(refused.code, 8, "{}\n{}", refused.json, refused.stderr);
    assert_eq!(refused.json["status"], "error");
    assert_eq!(refused.json["exit_code"], 8);
    let holder = format!("another ferry run (pid {}: ferry push ", first.id());
    assert!(refused.stderr.contains(&holder), "{}", refused.stderr);
    assert!(refused.stderr.contains("use --wait"), "{}", refused.stderr);

    let mut waiting = SMALL.to_vec();
    waiting.push("--wait");
    let second = spawn_push(&second_src, &server.url("second.bin"), &state, &waiting);
    let first = finish(first).await;
    first.assert_ok();
    let second = finish(second).await;
    second.assert_ok();
    assert_eq!(b3(&server.root.join("first.bin")), b3(&first_src));
    assert_eq!(b3(&server.root.join("second.bin")), b3(&second_src));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_the_lock_is_bounded_by_max_duration() {
    let dir = tempfile::tempdir().unwrap();
    let (_listener, addr) = stalled_listener();
    let state = dir.path().join("state");
    let src = dir.path().join("file.bin");
    write_random(&src, 64 * KIB, 6);
    let url = format!("ferry://{addr}/file.bin");
    let mut holder = spawn_push(&src, &url, &state, &["--timeout", "60s"]);
    wait_until_locked(&holder, &state).await;
    let out = push(&src, &url, &state, &["--wait", "--max-duration", "1s"]).await;
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(out.code, 9, "{}\n{}", out.json, out.stderr);
    assert!(out.stderr.contains("still holds"), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_holder_leaves_no_stale_lock() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let state = dir.path().join("state");
    let src = dir.path().join("file.bin");
    write_random(&src, 3 * MIB, 7);
    let mut slow = SMALL.to_vec();
    slow.extend(["--bwlimit", "512K"]);
    let mut holder = spawn_push(&src, &server.url("file.bin"), &state, &slow);
    wait_until_locked(&holder, &state).await;
    holder.kill().unwrap(); // SIGKILL: no chance to unlock or clean up
    holder.wait().unwrap();
    assert!(
        state.join("lock").exists(),
        "the lock file stays, with the dead pid in it"
    );
    let out = push(&src, &server.url("file.bin"), &state, &SMALL).await;
    out.assert_ok();
    assert_eq!(b3(&server.root.join("file.bin")), b3(&src));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_stopped_by_max_duration_is_resumed_by_the_next_run() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    write_random(&server.root.join("big.bin"), 6 * MIB, 8);
    let (state, dest) = (dir.path().join("state"), dir.path().join("big.bin"));
    let mut slow = SMALL.to_vec();
    slow.extend(["--bwlimit", "2MiB", "--max-duration", "2s"]);
    let started = Instant::now();
    let stopped = pull(&server.url("big.bin"), &dest, &state, &slow).await;
    assert_eq!(stopped.code, 9, "{}\n{}", stopped.json, stopped.stderr);
    assert_eq!(stopped.json["exit_code"], 9);
    assert!(started.elapsed() >= Duration::from_secs(2), "{:?}", started.elapsed());
    assert!(!dest.exists(), "nothing is renamed into place yet");
    let resumed = pull(&server.url("big.bin"), &dest, &state, &SMALL).await;
    resumed.assert_ok();
    assert!(
        resumed.u64("bytes_received") < 6 * MIB as u64,
        "the second run resumes: {}",
        resumed.json
    );
    assert_eq!(b3(&dest), b3(&server.root.join("big.bin")));
}

/// The crontab line of the README's "Job 2" recipe (the one line of its ```cron block that is not a comment).
fn readme_cron_line() -> String {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let block = &readme[readme.find("```cron\n").expect("README has a ```cron block") + 8..];
    let block = &block[..block.find("```").unwrap()];
    let lines: Vec<&str> = block
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(lines.len(), 1, "one crontab line: {block}");
    lines[0].to_string()
}

/// The README's recipe as `sh -c` runs it for cron, with its placeholders pointed at this test: the `ferry`
/// binary, the token file, the fingerprint, the source, the server's address and the log. Every other word (the
/// flags, `>>`, `2>&1`) stays as the README has it.
fn cron_command(line: &str, server: &str, token: &Path, print: &str, source: &Path, log: &Path) -> String {
    let fields: Vec<&str> = line.split_whitespace().collect();
    // Five schedule fields, then the command; cron hands the rest of the line to sh, where `%` would be special.
    let words = &fields[5..];
    assert!(!line.contains('%'), "cron turns % into a newline: {line}");
    assert_eq!(words[0], "ferry", "{line}");
    let quote = |p: &Path| format!("'{}'", p.display());
    let url_at = words
        .iter()
        .position(|w| w.starts_with("ferry://"))
        .expect("a ferry:// URL");
    let mut out = Vec::new();
    for (i, word) in words.iter().enumerate() {
        let previous = if i > 0 { words[i - 1] } else { "" };
        out.push(match (i, previous) {
            (0, _) => quote(Path::new(ferry_bin())),
            (_, "--token-file") => quote(token),
            (_, "--tls-fingerprint") => print.to_string(),
            (_, ">>") => quote(log),
            _ if i + 1 == url_at => quote(source),
            _ if i == url_at => {
                let path = word
                    .trim_start_matches("ferry://")
                    .split_once('/')
                    .map_or("", |(_, p)| p);
                format!("ferry://{server}/{path}")
            }
            _ => word.to_string(),
        });
    }
    out.join(" ")
}

/// issue 16, "Done when": the README's cron line, run literally through `sh -c` as cron would (no terminal, no
/// input, a fresh HOME), once against a missing source (exit 6) and twice against a real tree over TLS with a
/// token (exit 0, then an unchanged re-run): the log holds exactly one line per run, every line a JSON summary with
/// its time, source and destination. The recipe is read from README.md, so the two cannot drift apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_cron_recipe_logs_one_json_line_per_run() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, print) = keygen(dir.path());
    let token = ferry::auth::Token::generate("laptop").unwrap();
    let config = dir.path().join("server.toml");
    let client = format!(
        "[[client]]\nid = \"laptop\"\nsecret = \"{}\"\nnamespace = \"laptop\"\npermissions = [\"push\"]\n",
        token.secret_hex()
    );
    std::fs::write(&config, format!("[tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n{client}")).unwrap();
    let token_file = dir.path().join("laptop.token");
    std::fs::write(&token_file, token.to_string()).unwrap();
    let server = TestServer::start_with(&dir.path().join("root"), &["--config", config.to_str().unwrap()]);
    let source = dir.path().join("backup");
    std::fs::create_dir_all(source.join("db")).unwrap();
    let data = write_random(&source.join("db/nightly.dump"), 300 * KIB, 9);
    let log = dir.path().join("ferry-backup.jsonl");
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let line = readme_cron_line();
    let missing = dir.path().join("not-there");
    let runs = [(&missing, 6), (&source, 0), (&source, 0)];
    for (src, code) in runs {
        let command = cron_command(&line, &server.addr.to_string(), &token_file, &print, src, &log);
        let mut sh = std::process::Command::new("/bin/sh");
        sh.arg("-c")
            .arg(&command)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", &home)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let status = tokio::task::spawn_blocking(move || sh.status().unwrap()).await.unwrap();
        assert_eq!(status.code(), Some(code), "{command}");
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), runs.len(), "one line per run:\n{text}");
    for (line, (src, code)) in lines.iter().zip(runs) {
        let summary: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert_eq!(summary["event"], "summary", "{line}");
        assert_eq!(summary["exit_code"], code, "{line}");
        assert!(summary["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{line}");
        assert!(
            summary["destination"].as_str().is_some_and(|d| d.contains("laptop")),
            "{line}"
        );
        let shown = src.file_name().unwrap().to_str().unwrap();
        assert!(summary["source"].as_str().is_some_and(|s| s.contains(shown)), "{line}");
    }
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(lines[2]).unwrap()["bytes_sent"],
        0,
        "{}",
        lines[2]
    );
    // Wherever the tree lands under the client's namespace, the file arrived whole.
    let landed = find_file(&server.root.join("laptop"), "nightly.dump").expect("the dump landed");
    assert_eq!(std::fs::read(landed).unwrap(), data);
}

/// The first file called `name` under `dir` (depth first; `.ferry` skipped).
fn find_file(dir: &Path, name: &str) -> Option<std::path::PathBuf> {
    for entry in std::fs::read_dir(dir).ok()? {
        let path = entry.ok()?.path();
        if path.file_name().is_some_and(|n| n == ".ferry") {
            continue;
        }
        if path.is_dir() {
            if let Some(found) = find_file(&path, name) {
                return Some(found);
            }
        } else if path.file_name().is_some_and(|n| n == name) {
            return Some(path);
        }
    }
    None
}
