//! A running push or pull, published for `ferry status`.
//!
//! sled lets one process open a store, so while a run holds the state directory `ferry status` cannot read its
//! records. The run therefore publishes its progress in a small JSON file, [`PROGRESS_FILE`] in the state
//! directory: written first when the transfer starts, then at most once per [`PUBLISH_EVERY`] while it moves,
//! always atomically (a temporary file renamed over it, so a reader sees a whole version or none), and removed
//! when the run ends. A killed run leaves it behind; [`read_running`] ignores a file whose process is gone.
//!
//! A push also records in its sender store what the receiver last acknowledged as durable, before the file shows
//! it, so `ferry status` of an interrupted push shows the acknowledged bytes (never more than the receiver holds).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::task::AbortOnDropHandle;

use crate::meter::Meter;
use crate::store::{now_secs, SenderStore};

/// The progress file's name inside the state directory.
pub const PROGRESS_FILE: &str = "running.json";
/// The longest interval between two versions of the progress file while bytes move.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(500);

/// What a running transfer publishes (the progress file's JSON).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Running {
    /// The running process.
    pub pid: u32,
    /// `push` or `pull`.
    pub kind: String,
    /// What is sent: the local path of a push, the URL of a pull.
    pub source: String,
    /// Where it goes: the URL of a push, the local path of a pull.
    pub destination: String,
    /// Bytes to transfer (0 until known).
    pub size: u64,
    /// Bytes the receiver holds durably (acknowledged, plus what it held before).
    pub done: u64,
    /// Payload bytes that crossed the wire in this run.
    pub moved: u64,
    /// Connection attempts so far.
    pub attempts: u64,
    /// When the run started (Unix seconds).
    pub started: u64,
    /// When this version was written (Unix seconds).
    pub updated: u64,
}

/// Where a push records its acknowledged bytes: the sender store and the push's record key.
pub(super) struct AckRecord {
    /// The store holding the push record.
    pub store: SenderStore,
    /// The record's canonical source.
    pub source: String,
    /// The record's destination URL.
    pub destination: String,
}

/// Publishes a run's progress until dropped, then removes the progress file.
pub(super) struct Publisher {
    path: PathBuf,
    _task: AbortOnDropHandle<()>,
}

impl Publisher {
    /// Starts publishing `meter` for a `kind` transfer from `source` to `destination` into `state_dir`, and (for
    /// a push) recording the acknowledged bytes through `ack`.
    pub fn start(
        state_dir: &Path,
        kind: &str,
        source: String,
        destination: String,
        meter: Arc<Meter>,
        ack: Option<AckRecord>,
    ) -> Publisher {
        let path = state_dir.join(PROGRESS_FILE);
        let running = Running {
            pid: std::process::id(),
            kind: kind.to_string(),
            source,
            destination,
            size: 0,
            done: 0,
            moved: 0,
            attempts: 0,
            started: now_secs(),
            updated: now_secs(),
        };
        let task = tokio::spawn(publish(path.clone(), running, meter, ack));
        Publisher {
            path,
            _task: AbortOnDropHandle::new(task),
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The publishing loop: a version now, then one per [`PUBLISH_EVERY`] whenever the meter moved.
async fn publish(path: PathBuf, mut running: Running, meter: Arc<Meter>, ack: Option<AckRecord>) {
    let ack = ack.map(Arc::new);
    let mut recorded = 0u64;
    let mut first = true;
    loop {
        let snap = meter.snapshot();
        let changed = (snap.total, snap.done, snap.moved, snap.attempts)
            != (running.size, running.done, running.moved, running.attempts);
        if first || changed {
            first = false;
            running.size = snap.total;
            running.done = snap.done;
            running.moved = snap.moved;
            running.attempts = snap.attempts;
            running.updated = now_secs();
            // The store first: whenever the file shows some acknowledged bytes, the store has them too. Zero is
            // what the meter says before the receiver answers; it must not wipe an earlier run's figure.
            if let Some(ack) = ack.as_ref().filter(|_| snap.done > 0 && snap.done != recorded) {
                let (ack, done) = (ack.clone(), snap.done);
                let saved =
                    tokio::task::spawn_blocking(move || ack.store.save_acked(&ack.source, &ack.destination, done))
                        .await;
                match saved {
                    Ok(Ok(())) => recorded = done,
                    Ok(Err(e)) => tracing::debug!(error = %e, "recording the acknowledged bytes failed"),
                    Err(_) => return,
                }
            }
            let (path, running) = (path.clone(), running.clone());
            let written = tokio::task::spawn_blocking(move || write_atomically(&path, &running)).await;
            if let Ok(Err(e)) = written {
                tracing::debug!(error = %e, "publishing progress for ferry status failed");
            }
        }
        tokio::time::sleep(PUBLISH_EVERY).await;
    }
}

/// Writes `running` to a temporary file beside `path` and renames it over `path`.
fn write_atomically(path: &Path, running: &Running) -> std::io::Result<()> {
    let text = serde_json::to_vec(running).map_err(std::io::Error::other)?;
    let temporary = path.with_extension(format!("json.{}.tmp", std::process::id()));
    std::fs::write(&temporary, text)?;
    std::fs::rename(&temporary, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&temporary);
    })
}

/// The run published in `state_dir`, if its process is still alive (a killed run's file is ignored). Files over
/// 64 KiB or that do not parse are ignored too.
pub fn read_running(state_dir: &Path) -> Option<Running> {
    let path = state_dir.join(PROGRESS_FILE);
    let meta = std::fs::symlink_metadata(&path).ok()?;
    if !meta.is_file() || meta.len() > 64 * 1024 {
        return None;
    }
    let running: Running = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
    alive(running.pid).then_some(running)
}

/// Whether a process with this pid exists (signal 0 checks without sending anything).
fn alive(pid: u32) -> bool {
    let Some(pid) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) else {
        return false;
    };
    matches!(
        rustix::process::test_kill_process(pid),
        Ok(()) | Err(rustix::io::Errno::PERM)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_published_run_is_read_back_only_while_its_process_lives() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_running(dir.path()), None);
        let mut running = Running {
            pid: std::process::id(),
            kind: "push".into(),
            source: "/a".into(),
            destination: "ferry://h:1/a".into(),
            size: 100,
            done: 40,
            moved: 40,
            attempts: 1,
            started: 1,
            updated: 2,
        };
        write_atomically(&dir.path().join(PROGRESS_FILE), &running).unwrap();
        assert_eq!(read_running(dir.path()), Some(running.clone()));
        // A pid that cannot exist (above the kernel's pid_max limit of 2^22): a killed run's leftover.
        running.pid = 1 << 23;
        write_atomically(&dir.path().join(PROGRESS_FILE), &running).unwrap();
        assert_eq!(read_running(dir.path()), None);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left behind");
    }

    #[tokio::test]
    async fn the_file_follows_the_meter_and_goes_when_the_run_ends() {
        let dir = tempfile::tempdir().unwrap();
        let meter = Arc::new(Meter::default());
        let publisher = Publisher::start(
            dir.path(),
            "pull",
            "ferry://h:1/x".into(),
            "/x".into(),
            meter.clone(),
            None,
        );
        meter.attempt();
        meter.file("x", 1000, 0);
        meter.durable(300);
        let mut seen = None;
        for _ in 0..100 {
            seen = read_running(dir.path()).filter(|r| r.done == 300);
            if seen.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let seen = seen.expect("the meter's progress was published");
        assert_eq!((seen.kind.as_str(), seen.size, seen.attempts), ("pull", 1000, 1));
        drop(publisher);
        assert!(!dir.path().join(PROGRESS_FILE).exists());
    }
}
