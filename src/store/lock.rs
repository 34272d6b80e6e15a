//! One run per client state directory: an advisory `flock` on `STATE/lock`, taken before the store is opened.
//!
//! Two cron runs of the same push must never clash. sled locks its own files too, but its refusal says nothing
//! about who holds them; this lock file also records the holder's pid and command line, so a refused run can name
//! it. The kernel drops a `flock` when its holder exits in any way (`kill -9` included), so a stale lock file never
//! blocks a later run: the file stays, the lock does not.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;
use tokio::time::Instant;

/// The lock file's name inside the state directory.
pub const LOCK_FILE: &str = "lock";

/// First and largest pause between attempts while waiting for the lock.
const POLL_FIRST: Duration = Duration::from_millis(50);
const POLL_MAX: Duration = Duration::from_secs(1);

/// The state directory's lock could not be taken.
#[derive(Debug, Error)]
pub enum LockError {
    /// Another run holds it (and the caller did not ask to wait).
    #[error("another ferry run ({holder}) holds {dir}; use --wait to wait for it")]
    Held {
        /// The state directory.
        dir: String,
        /// Who holds it, as its lock file says (`pid N: COMMAND`).
        holder: String,
    },
    /// Another run held it for the whole time the caller could wait.
    #[error("another ferry run ({holder}) still holds {dir} after waiting {waited:.1?}")]
    StillHeld {
        /// The state directory.
        dir: String,
        /// Who holds it.
        holder: String,
        /// How long the caller waited.
        waited: Duration,
    },
    /// The lock file could not be created, locked or written.
    #[error("state lock {path}: {source}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Exclusive use of a client state directory, until dropped (or the process ends).
#[derive(Debug)]
pub struct StateLock {
    /// Holds the `flock`; closing it releases the lock.
    _file: File,
}

impl StateLock {
    /// Takes the lock on `dir` (created if missing) at once, or fails with [`LockError::Held`].
    pub fn try_acquire(dir: &Path) -> Result<StateLock, LockError> {
        let path = dir.join(LOCK_FILE);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(LockError::Held {
                    dir: dir.display().to_string(),
                    holder: holder(&mut file),
                })
            }
            Err(e) => return Err(io(e.into())),
        }
        let note = format!("{}\n{}\n", std::process::id(), command_line());
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(note.as_bytes()))
            .map_err(io)?;
        Ok(StateLock { _file: file })
    }

    /// Takes the lock on `dir`; while another run holds it, polls with a growing pause (50 ms up to 1 s) until
    /// `deadline` if there is one, then fails with [`LockError::StillHeld`].
    pub async fn wait(dir: &Path, deadline: Option<Instant>) -> Result<StateLock, LockError> {
        let started = Instant::now();
        let mut pause = POLL_FIRST;
        loop {
            match StateLock::try_acquire(dir) {
                Err(LockError::Held { dir, holder }) => {
                    let now = Instant::now();
                    if deadline.is_some_and(|end| now >= end) {
                        return Err(LockError::StillHeld {
                            dir,
                            holder,
                            waited: now - started,
                        });
                    }
                    tracing::debug!(%holder, "waiting for the state lock");
                    let wake = deadline.map_or(now + pause, |end| end.min(now + pause));
                    tokio::time::sleep_until(wake).await;
                    pause = (pause * 2).min(POLL_MAX);
                }
                other => return other,
            }
        }
    }
}

/// `pid N: COMMAND` from a held lock file (best effort: the holder may be writing it right now).
fn holder(file: &mut File) -> String {
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    let mut lines = text.lines();
    match (lines.next(), lines.next()) {
        (Some(pid), Some(command)) if !pid.is_empty() => format!("pid {pid}: {command}"),
        (Some(pid), None) if !pid.is_empty() => format!("pid {pid}"),
        _ => "pid unknown".to_string(),
    }
}

/// This process's command line, with the program shown by its file name.
fn command_line() -> String {
    let mut args = std::env::args_os();
    let program = args
        .next()
        .map(|p| Path::new(&p).file_name().unwrap_or(&p).to_string_lossy().into_owned())
        .unwrap_or_else(|| "ferry".to_string());
    std::iter::once(program)
        .chain(args.map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_taker_is_refused_and_told_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let first = StateLock::try_acquire(dir.path()).unwrap();
        let second = StateLock::try_acquire(dir.path()).unwrap_err();
        let LockError::Held { holder, .. } = &second else {
            panic!("{second:?}");
        };
        assert!(holder.starts_with(&format!("pid {}: ", std::process::id())), "{holder}");
        assert!(second.to_string().contains("use --wait"), "{second}");
        drop(first);
        StateLock::try_acquire(dir.path()).expect("free once the holder is gone");
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_ends_at_the_deadline_or_when_the_holder_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = StateLock::try_acquire(dir.path()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(3);
        let timed_out = StateLock::wait(dir.path(), Some(deadline)).await.unwrap_err();
        assert!(
            matches!(timed_out, LockError::StillHeld { waited, .. } if waited == Duration::from_secs(3)),
            "{timed_out:?}"
        );
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(first);
        });
        let started = Instant::now();
        StateLock::wait(dir.path(), None).await.expect("taken once released");
        assert!(started.elapsed() >= Duration::from_secs(5));
        release.await.unwrap();
    }
}
