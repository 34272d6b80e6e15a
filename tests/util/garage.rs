//! The Garage fixture of the object-store tests (issue 15; docs/testing.md, "The Garage cluster"): one 3-node
//! cluster per test binary, started on first use by `tests/garage/cluster.sh start` into a temporary directory,
//! and a prefix of its bucket per test ([`Cluster::store_url`], [`Cluster::prefix`]).
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
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

/// A running Garage cluster: its directory and the environment `cluster.sh` wrote for it.
pub struct Cluster {
    dir: PathBuf,
    /// `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, …, `GARAGE_BUCKET`, as `cluster.sh start` printed them.
    vars: Vec<(String, String)>,
}

/// Held while a node is down: tests that kill a node take turns, so the cluster never loses two at once (two of
/// three keep the quorum that every other test relies on).
static NODE_DOWN: Mutex<()> = Mutex::new(());

/// This binary's cluster, or why it could not start.
static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();

/// `tests/garage/` in the source tree.
pub fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/garage")
}

/// The binary's cluster, started on first use; `None` only when `FERRY_SKIP_GARAGE=1` outside CI and no Garage
/// binary (after one loud line; the caller returns). Panics, saying what to do, when Garage is missing or the
/// cluster cannot start. The cluster's AWS_* variables are set in this process, so every `ferry serve` a test
/// starts inherits them.
pub fn cluster() -> Option<&'static Cluster> {
    let test = std::thread::current().name().unwrap_or("a Garage test").to_string();
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

/// Starts the cluster in a fresh directory and its guard, and sets its AWS_* variables in this process.
fn start() -> Result<Cluster, String> {
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
    let vars = parse_env(&String::from_utf8_lossy(&output.stdout));
    if !vars.iter().any(|(k, _)| k == "AWS_ENDPOINT_URL") || !vars.iter().any(|(k, _)| k == "GARAGE_BUCKET") {
        return Err(format!("cluster.sh start printed no environment: {output:?}"));
    }
    for (key, value) in vars.iter().filter(|(k, _)| k.starts_with("AWS_")) {
        // The same values for every test, set once (under the OnceLock) before any server of the cluster starts.
        std::env::set_var(key, value);
    }
    Ok(Cluster { dir, vars })
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

impl Cluster {
    /// The AWS_* variables (endpoint, keys, region, allow-http) for a client of the cluster.
    pub fn env(&self) -> Vec<(String, String)> {
        self.vars
            .iter()
            .filter(|(k, _)| k.starts_with("AWS_"))
            .cloned()
            .collect()
    }

    /// The bucket the cluster created.
    pub fn bucket(&self) -> &str {
        self.var("GARAGE_BUCKET")
    }

    /// The cluster's directory (node configs, data, logs, `env`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// One variable of the cluster's environment.
    pub fn var(&self, name: &str) -> &str {
        self.vars
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("{name} missing from the cluster's env"))
    }

    /// A prefix of the bucket no other test uses: `NAME-RANDOM`.
    pub fn prefix(&self, name: &str) -> String {
        let mut random = [0u8; 6];
        getrandom::fill(&mut random).expect("random bytes");
        let tag: String = random.iter().map(|b| format!("{b:02x}")).collect();
        format!("{name}-{tag}")
    }

    /// A fresh `s3://BUCKET/NAME-RANDOM`, the `--store` of one test's servers.
    pub fn store_url(&self, name: &str) -> String {
        format!("s3://{}/{}", self.bucket(), self.prefix(name))
    }

    /// A command with the cluster's environment (AWS variables) set.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.envs(self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str())));
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

/// A node of the cluster killed by [`Cluster::kill_node`]; started again by [`NodeDown::restart`], or when dropped
/// (a test that failed half-way leaves the cluster whole for the others).
pub struct NodeDown<'a> {
    cluster: &'a Cluster,
    node: u32,
    restarted: bool,
    _one_at_a_time: MutexGuard<'static, ()>,
}

impl Cluster {
    /// SIGKILLs node `node` (`cluster.sh kill DIR N`, as a crash would), once no other test has one down.
    pub fn kill_node(&self, node: u32) -> NodeDown<'_> {
        let turn = NODE_DOWN.lock().unwrap_or_else(PoisonError::into_inner);
        self.cluster_sh("kill", &[&node.to_string()]);
        NodeDown {
            cluster: self,
            node,
            restarted: false,
            _one_at_a_time: turn,
        }
    }
}

impl NodeDown<'_> {
    /// Starts the node again on its old ports and data (`cluster.sh start-node DIR N`).
    pub fn restart(mut self) {
        self.restarted = true;
        self.cluster.cluster_sh("start-node", &[&self.node.to_string()]);
    }
}

impl Drop for NodeDown<'_> {
    fn drop(&mut self) {
        if !self.restarted {
            // No assertion: this may run during a panic.
            let _ = self
                .cluster
                .command("bash")
                .arg(scripts().join("cluster.sh"))
                .arg("start-node")
                .arg(&self.cluster.dir)
                .arg(self.node.to_string())
                .stdin(Stdio::null())
                .output();
        }
    }
}
