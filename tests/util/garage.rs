//! A 3-node Garage cluster for the object-store tests, started once per test binary through
//! `tests/garage/cluster.sh start` into a temp dir and stopped at exit (and so shared by every test, each under its
//! own prefix: [`Cluster::store_url`]).
//!
//! Needs `GARAGE` (the garage binary). Without it: the tests fail when `CI` is set; elsewhere they fail too, unless
//! `FERRY_SKIP_GARAGE=1` says to skip them (with one loud line).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// A running cluster.
pub struct Cluster {
    dir: PathBuf,
    env: Vec<(String, String)>,
    bucket: String,
}

static CLUSTER: OnceLock<Option<Cluster>> = OnceLock::new();
static DIR: OnceLock<PathBuf> = OnceLock::new();

impl Cluster {
    /// The AWS_* variables (endpoint, keys, region, allow-http) for a client of the cluster.
    pub fn env(&self) -> Vec<(String, String)> {
        self.env.clone()
    }

    /// The bucket the cluster created.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// A fresh `s3://BUCKET/<name>-<random>` for one test.
    pub fn store_url(&self, name: &str) -> String {
        let mut random = [0u8; 4];
        getrandom::fill(&mut random).unwrap();
        let tag: String = random.iter().map(|b| format!("{b:02x}")).collect();
        format!("s3://{}/{name}-{tag}", self.bucket)
    }

    /// The cluster's directory (logs, `env`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The cluster, started on first use; `None` only when `FERRY_SKIP_GARAGE=1` allows skipping (then the caller
/// returns). The AWS_* variables are set in this process, so every `ferry serve` it starts inherits them.
pub fn cluster() -> Option<&'static Cluster> {
    CLUSTER.get_or_init(start).as_ref()
}

fn start() -> Option<Cluster> {
    if std::env::var_os("GARAGE").is_none() {
        let ci = std::env::var_os("CI").is_some();
        let skip = std::env::var("FERRY_SKIP_GARAGE").is_ok_and(|v| v == "1");
        assert!(
            !ci && skip,
            "GARAGE is not set: the object-store tests need a garage binary (.ci/garage.sh prints its path); \
             outside CI, FERRY_SKIP_GARAGE=1 skips them"
        );
        eprintln!("!!!!! SKIPPING the object-store tests: GARAGE is unset and FERRY_SKIP_GARAGE=1 !!!!!");
        return None;
    }
    let dir = std::env::temp_dir().join(format!("ferry-garage-{}", std::process::id()));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/garage/cluster.sh");
    let status = Command::new("bash")
        .arg(&script)
        .arg("start")
        .arg(&dir)
        .status()
        .unwrap();
    assert!(status.success(), "cluster.sh start failed: see {}", dir.display());
    DIR.set(dir.clone()).unwrap();
    // SAFETY: atexit takes a plain function; it runs once, after main returns.
    unsafe {
        libc::atexit(stop_at_exit);
    }
    let text = std::fs::read_to_string(dir.join("env")).unwrap();
    let vars: Vec<(String, String)> = text
        .lines()
        .filter_map(|line| {
            let (key, value) = line.strip_prefix("export ")?.split_once('=')?;
            Some((key.to_string(), value.trim_matches('\'').to_string()))
        })
        .collect();
    let bucket = vars
        .iter()
        .find(|(k, _)| k == "GARAGE_BUCKET")
        .map(|(_, v)| v.clone())
        .expect("GARAGE_BUCKET in the cluster's env");
    let env: Vec<(String, String)> = vars.into_iter().filter(|(k, _)| k.starts_with("AWS_")).collect();
    for (key, value) in &env {
        // Every value is the same for every test, set once before any server starts.
        std::env::set_var(key, value);
    }
    Some(Cluster { dir, env, bucket })
}

extern "C" fn stop_at_exit() {
    if let Some(dir) = DIR.get() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/garage/cluster.sh");
        let _ = Command::new("bash").arg(script).arg("stop").arg(dir).status();
        let _ = std::fs::remove_dir_all(dir);
    }
}
