//! The Garage fixture of the object-store tests (issue 15; docs/testing.md, "The Garage cluster"): one 3-node
//! cluster per test binary, started on first use by `tests/garage/cluster.sh start` into a temporary directory,
//! and a prefix of its bucket per test.
//!
//! Stopping: a `static` is never dropped, and a test binary may end by a panic, a signal or SIGKILL, so the
//! cluster is not stopped from inside the process. Right after the start, `cluster.sh watch DIR PID` runs in its
//! own process group, polls this process once a second (pid and start time, so a reused pid does not fool it),
//! and once it is gone stops every node by its pid and removes the directory. No exit path of the test binary
//! can skip it, and it ends with the cluster, so no orphan outlives the run by more than its stop (≤ 11 s).
//!
//! Availability: `GARAGE` must name the Garage binary (`.ci/garage.sh` prints it). Without it the tests FAIL —
//! in CI (`CI` set) always; elsewhere too, unless `FERRY_SKIP_GARAGE=1` asks to skip them, which prints one loud
//! line per test.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// A running Garage cluster: its directory and the environment `cluster.sh` wrote for it.
pub struct Garage {
    /// The cluster's directory (node configs, data, logs, `env`).
    pub dir: PathBuf,
    /// `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, … as `cluster.sh start` printed them.
    pub env: Vec<(String, String)>,
}

/// This binary's cluster, or why it could not start.
static CLUSTER: OnceLock<Result<Garage, String>> = OnceLock::new();

/// `tests/garage/` in the source tree.
pub fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/garage")
}

/// The binary's cluster, started on first use; `None` only when `FERRY_SKIP_GARAGE=1` outside CI and no Garage
/// binary (after one loud line). Panics, saying what to do, when Garage is missing or the cluster cannot start.
pub fn cluster(test: &str) -> Option<&'static Garage> {
    if let Err(missing) = garage_binary() {
        let in_ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
        if !in_ci && std::env::var("FERRY_SKIP_GARAGE").as_deref() == Ok("1") {
            // Straight to fd 2: the test harness captures eprintln! of a passing test, and this line must show.
            let _ = writeln!(
                std::io::stderr(),
                "!!!!! SKIPPED {test}: {missing}; FERRY_SKIP_GARAGE=1 skips the Garage tests (never in CI) !!!!!"
            );
            return None;
        }
        panic!(
            "{test}: {missing}. Run `export GARAGE=\"$(bash .ci/garage.sh)\"` (installs Garage 2.5.0 if missing), \
             or outside CI set FERRY_SKIP_GARAGE=1 to skip the Garage tests"
        );
    }
    match CLUSTER.get_or_init(start) {
        Ok(garage) => Some(garage),
        Err(why) => panic!("{test}: the Garage cluster did not start: {why}"),
    }
}

/// The Garage binary `GARAGE` names, or why there is none.
fn garage_binary() -> Result<PathBuf, String> {
    let path = std::env::var_os("GARAGE")
        .filter(|p| !p.is_empty())
        .ok_or("GARAGE is not set")?;
    let path = PathBuf::from(path);
    match std::fs::metadata(&path) {
        Ok(meta) if meta.is_file() => Ok(path),
        _ => Err(format!("GARAGE={} is not a file", path.display())),
    }
}

/// Starts the cluster in a fresh directory and its guard.
fn start() -> Result<Garage, String> {
    let dir = tempfile::Builder::new()
        .prefix("ferry-garage-")
        .tempdir()
        .map_err(|e| e.to_string())?
        .keep();
    let script = scripts().join("cluster.sh");
    // The guard first: it outlives this process whenever it ends, even in the middle of the start.
    watch(&script, &dir)?;
    let output = Command::new("bash")
        .arg(&script)
        .arg("start")
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    if !output.status.success() {
        return Err(format!(
            "cluster.sh start {} failed ({}):\n{}",
            dir.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let env = parse_env(&String::from_utf8_lossy(&output.stdout));
    if !env.iter().any(|(k, _)| k == "AWS_ENDPOINT_URL") {
        return Err(format!("cluster.sh start printed no environment: {output:?}"));
    }
    Ok(Garage { dir, env })
}

/// Runs `cluster.sh watch DIR PID` for this process, detached into its own process group (a Ctrl-C to the test
/// run does not reach it before it has cleaned up).
fn watch(script: &Path, dir: &Path) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    Command::new("bash")
        .arg(script)
        .arg("watch")
        .arg(dir)
        .arg(std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map(drop)
        .map_err(|e| format!("starting the cluster's guard: {e}"))
}

/// `export NAME='VALUE'` lines (as `cluster.sh` prints them) as pairs.
fn parse_env(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| line.strip_prefix("export "))
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('\'').to_string()))
        .collect()
}

impl Garage {
    /// The bucket.
    pub fn bucket(&self) -> &str {
        self.var("GARAGE_BUCKET")
    }

    /// One variable of the cluster's environment.
    pub fn var(&self, name: &str) -> &str {
        self.env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("{name} missing from the cluster's env"))
    }

    /// A prefix of the bucket no other test uses: `TEST-RANDOM`.
    pub fn prefix(&self, test: &str) -> String {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let seed = format!(
            "{}-{}-{:?}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now()
        );
        let random = blake3::hash(seed.as_bytes()).to_hex();
        format!("{test}-{}", &random[..12])
    }

    /// `s3://BUCKET/PREFIX/`, the `--store` of a server on `prefix`.
    pub fn store_url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}/", self.bucket())
    }

    /// A command with the cluster's environment (AWS variables) set.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd
    }

    /// `tests/garage/s3.py ARGS…` against the cluster; its stdout, or a panic with its stderr.
    pub fn s3(&self, args: &[&str]) -> Vec<u8> {
        let output = self
            .command("python3")
            .arg(scripts().join("s3.py"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run s3.py");
        assert!(
            output.status.success(),
            "s3.py {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output.stdout
    }

    /// The keys under `prefix` in the bucket.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let listed = self.s3(&["list", self.bucket(), prefix]);
        String::from_utf8_lossy(&listed).lines().map(str::to_string).collect()
    }

    /// `cluster.sh VERB DIR ARGS…` (`kill N`, `start-node N`); panics if it fails.
    pub fn cluster_sh(&self, verb: &str, args: &[&str]) {
        let output = self
            .command("bash")
            .arg(scripts().join("cluster.sh"))
            .arg(verb)
            .arg(&self.dir)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run cluster.sh");
        assert!(
            output.status.success(),
            "cluster.sh {verb} {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
