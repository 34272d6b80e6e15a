//! Shared helpers: a real `ferry serve` process on 127.0.0.1 with an ephemeral port and a temp root, the real
//! `ferry push` binary, file generators, and digests.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

pub mod garage;

/// Path of the binary under test.
pub fn ferry_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferry")
}

/// A `ferry serve` child process; SIGKILLed on drop.
pub struct TestServer {
    pub child: Child,
    pub addr: SocketAddr,
    pub root: PathBuf,
}

impl TestServer {
    /// Starts a server on 127.0.0.1:0 with `root`, and waits for its "listening on" line.
    pub fn start(root: &Path) -> TestServer {
        TestServer::start_with(root, &[])
    }

    /// Like [`TestServer::start`] with extra arguments.
    pub fn start_with(root: &Path, extra: &[&str]) -> TestServer {
        TestServer::start_at(root, "127.0.0.1:0", extra)
    }

    /// A server listening on `listen` (to restart one on the same port after killing it).
    pub fn start_at(root: &Path, listen: &str, extra: &[&str]) -> TestServer {
        TestServer::spawn(root, listen, extra, None)
    }

    /// A server whose process may not write files larger than `max_file` bytes (RLIMIT_FSIZE), as on a disk
    /// that fills up.
    pub fn start_limited(root: &Path, max_file: u64) -> TestServer {
        TestServer::spawn(root, "127.0.0.1:0", &[], Some(max_file))
    }

    /// A server with extra environment variables (the hidden test hooks of docs/testing.md).
    pub fn start_env(root: &Path, env: &[(&str, &str)]) -> TestServer {
        TestServer::spawn_env(root, "127.0.0.1:0", &[], None, env)
    }

    /// A server with extra arguments and extra environment variables (which override the test process's own).
    pub fn start_with_env(root: &Path, extra: &[&str], env: &[(&str, &str)]) -> TestServer {
        TestServer::spawn_env(root, "127.0.0.1:0", extra, None, env)
    }

    fn spawn(root: &Path, listen: &str, extra: &[&str], max_file: Option<u64>) -> TestServer {
        TestServer::spawn_env(root, listen, extra, max_file, &[])
    }

    fn spawn_env(root: &Path, listen: &str, extra: &[&str], max_file: Option<u64>, env: &[(&str, &str)]) -> TestServer {
        std::fs::create_dir_all(root).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(root.with_extension("server.log"))
            .unwrap();
        let mut command = Command::new(ferry_bin());
        command
            .args(["-v", "serve", "--listen", listen, "--root"])
            .arg(root)
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(log);
        if let Some(limit) = max_file {
            use std::os::unix::process::CommandExt;
            // SAFETY: between fork and exec this only calls setrlimit, which is async-signal-safe.
            unsafe {
                command.pre_exec(move || {
                    let rlim = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_FSIZE, &rlim) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let mut child = command.spawn().expect("spawn ferry serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("ferry: listening on ")
            .unwrap_or_else(|| panic!("unexpected server banner {line:?}"))
            .parse()
            .unwrap();
        TestServer {
            child,
            addr,
            root: root.to_path_buf(),
        }
    }

    /// Waits (bounded) until the server's log contains `needle`.
    pub async fn wait_for_log(&self, needle: &str, limit: Duration) {
        let log = self.root.with_extension("server.log");
        let deadline = tokio::time::Instant::now() + limit;
        while !std::fs::read_to_string(&log).unwrap_or_default().contains(needle) {
            assert!(tokio::time::Instant::now() < deadline, "server never logged {needle:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `ferry://127.0.0.1:PORT/path`.
    pub fn url(&self, path: &str) -> String {
        format!("ferry://{}/{path}", self.addr)
    }

    /// SIGTERM, then waits up to `limit` for a clean exit; returns the exit code.
    pub fn terminate(&mut self, limit: Duration) -> Option<i32> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Panics, saying why, if the server crashed by itself: its process exited, or a task of it panicked (tokio
    /// keeps the process up, so only the log shows it; each reconnect may meet the same panic, and a test waiting
    /// for progress would wait out its whole bound instead of failing).
    pub fn assert_alive(&mut self) {
        if let Some(status) = self.child.try_wait().expect("wait for ferry serve") {
            panic!("the server exited by itself: {status}");
        }
        let log = std::fs::read_to_string(self.root.with_extension("server.log")).unwrap_or_default();
        if let Some(line) = log.lines().find(|l| l.contains("panicked")) {
            panic!("the server panicked: {line}");
        }
    }

    /// SIGKILL, no chance to flush anything. Panics if the server had already crashed by itself (exited, or a task
    /// panicked: a crash the test would otherwise take for its own kill) or if it did not die of this SIGKILL.
    pub fn kill9(&mut self) {
        self.assert_alive();
        self.child.kill().expect("SIGKILL ferry serve");
        let status = self.child.wait().expect("reap ferry serve");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "the server did not die of the SIGKILL but {status}"
        );
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // No assertion here: a drop during a panic must not panic again.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child process (a `ferry push` a test runs in the background) SIGKILLed and reaped when dropped, so a test that
/// fails leaves no client behind retrying for minutes and holding the test's output open.
pub struct KillOnDrop(Option<Child>);

impl KillOnDrop {
    /// Takes charge of `child`.
    pub fn new(child: Child) -> KillOnDrop {
        KillOnDrop(Some(child))
    }

    /// Waits for the child to exit, checking `server` every 50 ms: panics at once if the server crashed by itself
    /// (the client would otherwise retry against it for as long as its retries last), and after `limit`.
    pub async fn wait_with_output(mut self, server: &mut TestServer, limit: Duration) -> std::process::Output {
        let deadline = tokio::time::Instant::now() + limit;
        while self.try_wait().expect("wait for the client").is_none() {
            server.assert_alive();
            assert!(
                tokio::time::Instant::now() < deadline,
                "the client did not finish within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let child = self.0.take().expect("a child");
        child.wait_with_output().expect("reap the client")
    }
}

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        self.0.as_ref().expect("a child")
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        self.0.as_mut().expect("a child")
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The outcome of one `ferry push --json` (or pull).
#[derive(Debug)]
pub struct PushOutcome {
    pub code: i32,
    pub json: Value,
    pub stderr: String,
}

impl PushOutcome {
    pub fn u64(&self, key: &str) -> u64 {
        self.json[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key} missing in {}", self.json))
    }

    pub fn assert_ok(&self) -> &Self {
        assert_eq!(self.code, 0, "push failed: {}\n{}", self.json, self.stderr);
        self
    }
}

/// `ferry push FILE URL` with test-friendly defaults (JSON summary, short retry delay).
pub fn push_command(file: &Path, url: &str, state: &Path, extra: &[&str]) -> Command {
    client_command("push", file.as_os_str(), url.as_ref(), state, extra)
}

/// `ferry pull URL DEST` with test-friendly defaults (JSON summary, short retry delay).
pub fn pull_command(url: &str, dest: &Path, state: &Path, extra: &[&str]) -> Command {
    client_command("pull", url.as_ref(), dest.as_os_str(), state, extra)
}

fn client_command(verb: &str, from: &OsStr, to: &OsStr, state: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(ferry_bin());
    cmd.arg(verb)
        .arg(from)
        .arg(to)
        .arg("--state")
        .arg(state)
        .args(["--json", "--retry-delay", "20ms"])
        .args(extra)
        .stdin(Stdio::null());
    if !extra.contains(&"--timeout") {
        cmd.args(["--timeout", "10s"]);
    }
    cmd
}

/// Runs `ferry pull` to completion (on a blocking thread).
pub async fn pull(url: &str, dest: &Path, state: &Path, extra: &[&str]) -> PushOutcome {
    run(pull_command(url, dest, state, extra)).await
}

/// Runs `ferry push` to completion (on a blocking thread).
pub async fn push(file: &Path, url: &str, state: &Path, extra: &[&str]) -> PushOutcome {
    run(push_command(file, url, state, extra)).await
}

/// Runs a ferry command with `--json` to completion and parses its last stdout line.
pub async fn run(mut cmd: Command) -> PushOutcome {
    let output = tokio::task::spawn_blocking(move || cmd.output().expect("run ferry"))
        .await
        .unwrap();
    outcome(&output)
}

/// A finished run's exit code, stderr, and its last stdout line parsed as the JSON summary.
fn outcome(output: &std::process::Output) -> PushOutcome {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let json = stdout
        .lines()
        .last()
        .map_or(Value::Null, |l| serde_json::from_str(l).unwrap_or(Value::Null));
    PushOutcome {
        code: output.status.code().unwrap_or(-1),
        json,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A port on 127.0.0.1 that refuses connections for as long as this lives: bound but never listening, so no other
/// test's server can take it meanwhile (a port bound, then closed, is free for anyone to take before it is used).
pub struct RefusingPort {
    _socket: tokio::net::TcpSocket,
    /// The port number.
    pub port: u16,
}

impl RefusingPort {
    /// Binds a fresh port without listening on it.
    pub fn new() -> Self {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = socket.local_addr().unwrap().port();
        RefusingPort { _socket: socket, port }
    }
}

/// Waits (bounded: 10 s) until no handle holds the sled store in `state`, after the test dropped its own. sled lets
/// go of its file lock when its last handle drops, which may be on one of its own I/O threads a moment after the
/// test's: a `ferry` started, or a store opened, in that moment would find the state directory in use. Tries the
/// same lock as sled (an exclusive `flock` on `state/db`) and lets go of it at once.
pub fn wait_until_store_closed(state: &Path) {
    let db = std::fs::File::open(state.join("db")).unwrap();
    for _ in 0..1000 {
        if rustix::fs::flock(&db, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_ok() {
            return; // closing `db` releases the lock
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("the store in {} stayed locked", state.display());
}

/// `size` pseudo-random bytes from `seed` (BLAKE3's output stream): the same seed gives the same bytes.
pub fn random_bytes(size: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; size];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut data);
    data
}

/// Writes `size` deterministic pseudo-random bytes derived from `seed`.
pub fn write_random(path: &Path, size: usize, seed: u64) -> Vec<u8> {
    let data = random_bytes(size, seed);
    let mut file = std::fs::File::create(path).unwrap();
    file.write_all(&data).unwrap();
    data
}

/// A deterministic sequence of numbers from a seed (BLAKE3's output stream), for tests that vary where things
/// happen but must replay the same way.
pub struct Seeded(blake3::OutputReader);

impl Seeded {
    /// The sequence for `seed`.
    pub fn new(seed: u64) -> Seeded {
        Seeded(blake3::Hasher::new().update(&seed.to_le_bytes()).finalize_xof())
    }

    /// The next number in `range` (which must not be empty).
    pub fn in_range(&mut self, range: std::ops::Range<u64>) -> u64 {
        let mut bytes = [0u8; 8];
        self.0.fill(&mut bytes);
        range.start + u64::from_le_bytes(bytes) % (range.end - range.start)
    }
}

/// Sets a file's modification time.
pub fn set_mtime(path: &Path, mtime: std::time::SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
}

/// BLAKE3 hex of a file's content.
pub fn b3(path: &Path) -> String {
    blake3::hash(&std::fs::read(path).unwrap()).to_hex().to_string()
}

pub const KIB: usize = 1024;
pub const MIB: usize = 1024 * 1024;

/// `rchar` of a running process: every byte it read so far through read(2)-family calls (not socket receives).
pub fn rchar(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("rchar:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

/// Peak resident memory of a process, from /proc.
pub fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib / 1024
}

/// The first line of `log` that contains `needle`, and the number it gives after `bytes=`; panics (showing the
/// log) if there is no such line or number.
pub fn logged_bytes<'a>(log: &'a str, needle: &str) -> (&'a str, u64) {
    let line = log
        .lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("the server never logged {needle:?}:\n{log}"));
    (line, logged_number(line, "bytes"))
}

/// The number `field=N` in `line`; panics if it has none.
pub fn logged_number(line: &str, field: &str) -> u64 {
    line.split(&format!(" {field}="))
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the line says no {field}: {line}"))
}

/// Terminal output without its escape sequences (colours, cursor moves, line clears).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
        } else if chars.next() == Some('[') {
            // Parameters, then one final byte in '@'..='~'.
            chars.by_ref().find(|c| ('@'..='~').contains(c));
        }
    }
    out
}

/// Runs a ferry command with `--json` to completion like [`run`], and also returns how many bytes the process read
/// through read(2)-family calls (`rchar` of `/proc/PID/io`, threads included), read while it is a zombie, after it
/// exited and before it is reaped. Measures what a run read from disk, whatever it reports about itself.
pub async fn run_counting_reads(mut cmd: Command) -> (PushOutcome, u64) {
    let (output, rchar) = tokio::task::spawn_blocking(move || {
        let child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run ferry");
        // SAFETY: a zeroed siginfo_t is a valid out-parameter; WNOWAIT leaves the child a zombie, still ours.
        let waited = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(libc::P_PID, child.id(), &mut info, libc::WEXITED | libc::WNOWAIT)
        };
        assert_eq!(waited, 0, "waitid: {}", std::io::Error::last_os_error());
        let io = std::fs::read_to_string(format!("/proc/{}/io", child.id())).unwrap();
        let rchar = io
            .lines()
            .find_map(|l| l.strip_prefix("rchar:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("rchar in /proc/PID/io");
        (child.wait_with_output().expect("reap ferry"), rchar)
    })
    .await
    .unwrap();
    (outcome(&output), rchar)
}

/// Runs `ferry keygen` into `dir`; returns (cert, key, fingerprint).
pub fn keygen(dir: &std::path::Path) -> (String, String, String) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let output = std::process::Command::new(ferry_bin())
        .args(["keygen", "--cert"])
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let fingerprint = String::from_utf8_lossy(&output.stdout).trim().to_string();
    assert!(fingerprint.starts_with("sha256:"), "{fingerprint}");
    (cert.display().to_string(), key.display().to_string(), fingerprint)
}

/// A raw connection to `server` that has completed the handshake through the library's own client side (no token,
/// the highest common version), for tests that then speak frames by hand.
pub async fn greeted(server: SocketAddr) -> ferry::wire::Connection<tokio::net::TcpStream> {
    let stream = tokio::net::TcpStream::connect(server).await.unwrap();
    let mut conn = ferry::wire::Connection::new(stream, ferry::MAX_FRAME);
    ferry::transfer::handshake::client_hello(&mut conn, Duration::from_secs(10), None, None)
        .await
        .unwrap();
    conn
}

/// The manifest of `data` as one chunk (fixed 4 KiB chunking, mode 0644, mtime zero), with the right hash and
/// digest, for tests that offer a small file by hand.
pub fn single_chunk_manifest(data: &[u8]) -> ferry::manifest::Manifest {
    let hash = *blake3::hash(data).as_bytes();
    ferry::manifest::Manifest {
        size: data.len() as u64,
        digest: hash,
        chunking: ferry::manifest::Chunking::Fixed { size: 4096 },
        mtime: ferry::manifest::FileTime::default(),
        mode: 0o644,
        chunks: vec![ferry::manifest::ChunkEntry {
            offset: 0,
            len: data.len() as u32,
            hash,
        }],
    }
}

/// Sends `data` as chunk 0 of the offer the server just answered with a Need, then Commit; expects the chunk's
/// Ack and Committed.
pub async fn send_chunk_zero_and_commit<S>(conn: &mut ferry::wire::Connection<S>, data: &[u8])
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use ferry::wire::{Chunk, Message};
    conn.write_message(&Message::Chunk(Chunk {
        index: 0,
        data: data.to_vec(),
    }))
    .await
    .unwrap();
    assert!(matches!(conn.read_message().await.unwrap(), Some(Message::Ack(_))));
    conn.write_message(&Message::Commit).await.unwrap();
    assert!(matches!(
        conn.read_message().await.unwrap(),
        Some(Message::Committed(_))
    ));
}

/// Pushes `source` to a listener on 127.0.0.1 that never answers, and returns the first `count` frames the client
/// sends on its connection with no Welcome coming back (proto-spec.md §3, "Pipelining"); panics if they do not
/// come within 30 s. The client is killed afterwards, also when this panics.
pub async fn frames_before_welcome(
    source: &Path,
    remote_path: &str,
    state: &Path,
    count: usize,
) -> Vec<ferry::wire::Message> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ferry://{}/{remote_path}", listener.local_addr().unwrap());
    let _client = KillOnDrop::new(
        push_command(source, &url, state, &["--retries", "0", "--timeout", "120s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (stream, _) = listener.accept().await.unwrap();
    let mut conn = ferry::wire::Connection::new(stream, ferry::MAX_FRAME);
    let mut frames = Vec::new();
    while frames.len() < count {
        match tokio::time::timeout(Duration::from_secs(30), conn.read_message()).await {
            Ok(Ok(Some(msg))) => frames.push(msg),
            other => panic!("after {frames:?} the client sent {other:?} before a Welcome"),
        }
    }
    frames
}
