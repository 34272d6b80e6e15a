//! The client: connect, retry with backoff, resume; for a push it takes the sender role.
//!
//! Within one run, network failures (and retryable server errors) lead to a reconnect after an exponential,
//! jittered backoff; `retries` bounds consecutive attempts that made no progress, so a long transfer over a link
//! that drops every few minutes still finishes. Across runs, the server's records tell what is missing and the
//! client's manifest cache avoids rehashing an unchanged source. A source that changes is re-manifested (bounded).

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use thiserror::Error;
use tokio::net::TcpStream;

use crate::chunk::{build_manifest, mtime_of, ChunkError, ChunkSpec};
use crate::manifest::{Hash, Manifest};
use crate::path::RemotePath;
use crate::store::{now_secs, ManifestKey, PushRecord, PushState, SenderStore, Store, StoreError};
use crate::transfer::sender::{send, SendEvent, SendOptions, SendStats, Source};
use crate::transfer::{handshake, tell_peer, TransferError};
use crate::url::FerryUrl;
use crate::wire::{Committed, Connection, ErrorCode};
use crate::{exit, MAX_FRAME};

/// Times a changing source is re-manifested before the push gives up.
const MAX_SOURCE_CHANGES: u32 = 3;

/// Exponential backoff with jitter between reconnects.
#[derive(Clone, Debug)]
pub struct Backoff {
    /// Delay before the first retry.
    pub initial: Duration,
    /// Upper bound of any delay.
    pub max: Duration,
}

impl Backoff {
    /// The delay before retry number `failures` (1-based): `initial * 2^(failures-1)`, capped, then scaled by a
    /// random factor in `[0.5, 1.0]` so that many clients cut at once do not reconnect in lockstep.
    pub fn delay(&self, failures: u32) -> Duration {
        let exp = self.initial.saturating_mul(1 << failures.saturating_sub(1).min(16));
        exp.min(self.max).mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(250),
            max: Duration::from_secs(15),
        }
    }
}

/// What to push where, and how.
#[derive(Clone, Debug)]
pub struct PushOptions {
    /// Local file.
    pub source: PathBuf,
    /// Destination URL.
    pub destination: FerryUrl,
    /// Client state directory (sled store).
    pub state_dir: PathBuf,
    /// How to cut the file.
    pub chunking: ChunkSpec,
    /// Consecutive failed attempts without progress before giving up.
    pub retries: u32,
    /// Sender tuning.
    pub send: SendOptions,
    /// Time allowed for the TCP connect.
    pub connect_timeout: Duration,
    /// Delays between attempts.
    pub backoff: Backoff,
}

/// Progress of a push, for display.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PushEvent {
    /// The manifest is ready.
    Manifest {
        /// Chunks in it.
        chunks: u32,
        /// File size.
        size: u64,
        /// Taken from the cache, without reading the file.
        cached: bool,
    },
    /// Connected and greeted (attempt number, 1-based).
    Connected {
        /// Attempt number.
        attempt: u32,
    },
    /// What the sender saw.
    Send(SendEvent),
    /// An attempt failed and another follows after `delay`.
    Retrying {
        /// The attempt that failed.
        attempt: u32,
        /// Wait before the next one.
        delay: Duration,
        /// Why it failed.
        error: String,
    },
    /// The source changed; a new manifest is being built.
    SourceChanged {
        /// What was noticed.
        reason: String,
    },
}

/// The outcome of a successful push.
#[derive(Clone, Debug)]
pub struct PushReport {
    /// Canonical source path.
    pub source: String,
    /// Destination URL with the resolved remote path.
    pub destination: String,
    /// File size.
    pub size: u64,
    /// Whole-file BLAKE3, verified by the server.
    pub digest: Hash,
    /// Chunks in the manifest.
    pub chunks: u32,
    /// Sender counters over all attempts.
    pub sent: SendStats,
    /// Connection attempts made.
    pub attempts: u32,
    /// The manifest came from the cache.
    pub manifest_cached: bool,
    /// Times the source changed during the run.
    pub source_changes: u32,
    /// The server's final report.
    pub committed: Committed,
    /// Wall time of the run.
    pub duration: Duration,
}

/// A push that did not complete.
#[derive(Debug, Error)]
pub enum PushError {
    /// The destination URL or path is unusable.
    #[error(transparent)]
    Usage(#[from] crate::url::UrlError),
    /// The source could not be read.
    #[error("{0}")]
    Source(String),
    /// The source kept changing while it was being sent.
    #[error("{0} kept changing while it was being sent; gave up after {MAX_SOURCE_CHANGES} new manifests")]
    SourceUnstable(String),
    /// The client's state store is unusable.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The network (or a busy server) did not let the push finish.
    #[error("gave up after {attempts} attempts: {last}")]
    Network {
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: TransferError,
    },
    /// The server refused the push for good.
    #[error("rejected by the server: {0}")]
    Rejected(TransferError),
    /// Bytes did not verify end to end.
    #[error("{0}")]
    Integrity(TransferError),
}

impl PushError {
    /// The process exit code for this failure (README, "Exit codes").
    pub fn exit_code(&self) -> u8 {
        match self {
            PushError::Usage(_) => exit::USAGE,
            PushError::Network { .. } => exit::NETWORK,
            PushError::Rejected(_) => exit::REJECTED,
            PushError::Integrity(_) => exit::INTEGRITY,
            PushError::Source(_) | PushError::SourceUnstable(_) | PushError::Store(_) => exit::LOCAL,
        }
    }
}

/// Pushes one file, resuming whatever the server already has.
pub async fn push(opts: PushOptions, on_event: &mut (dyn FnMut(PushEvent) + Send)) -> Result<PushReport, PushError> {
    let started = Instant::now();
    let remote_path = opts.destination.remote_path_for(&opts.source)?;
    let destination = FerryUrl {
        path: remote_path.to_string(),
        ..opts.destination.clone()
    };
    let source_err = |e: std::io::Error| PushError::Source(format!("{}: {e}", opts.source.display()));
    let canonical = std::fs::canonicalize(&opts.source).map_err(source_err)?;
    let file = Arc::new(File::open(&canonical).map_err(source_err)?);
    if !file.metadata().map_err(source_err)?.is_file() {
        return Err(PushError::Source(format!(
            "{} is not a regular file",
            opts.source.display()
        )));
    }
    let store = {
        let dir = opts.state_dir.clone();
        blocking(move || Ok(SenderStore::open(&Store::open(&dir)?)?)).await?
    };
    let (manifest, manifest_cached) = load_manifest(&store, &file, &canonical, opts.chunking, false).await?;
    on_event(PushEvent::Manifest {
        chunks: manifest.chunk_count(),
        size: manifest.size,
        cached: manifest_cached,
    });
    let mut record = start_record(&store, &canonical, &destination, manifest.size).await?;
    let mut source = Source {
        file,
        manifest: Arc::new(manifest),
    };
    let mut run = Run::default();
    let outcome = loop {
        run.attempts += 1;
        let acked_before = run.stats.chunks_acked;
        let result = attempt(&opts, run.attempts, &remote_path, &source, &mut run.stats, on_event).await;
        let error = match result {
            Ok(committed) => break Ok(committed),
            Err(e) => e,
        };
        if let TransferError::SourceChanged(reason) = &error {
            run.source_changes += 1;
            on_event(PushEvent::SourceChanged { reason: reason.clone() });
            if run.source_changes > MAX_SOURCE_CHANGES {
                break Err(PushError::SourceUnstable(canonical.display().to_string()));
            }
            let rebuilt = load_manifest(&store, &source.file, &canonical, opts.chunking, true).await;
            match rebuilt {
                Ok((manifest, _)) => source.manifest = Arc::new(manifest),
                Err(e) => break Err(e),
            }
            continue;
        }
        if !error.is_retryable() {
            break Err(classify(error));
        }
        if run.stats.chunks_acked > acked_before {
            run.failures = 0;
        }
        run.failures += 1;
        if run.failures > opts.retries {
            break Err(PushError::Network {
                attempts: run.attempts,
                last: error,
            });
        }
        let delay = opts.backoff.delay(run.failures);
        tracing::info!(attempt = run.attempts, ?delay, error = %error, "retrying");
        on_event(PushEvent::Retrying {
            attempt: run.attempts,
            delay,
            error: error.to_string(),
        });
        tokio::time::sleep(delay).await;
    };
    record.bytes_sent += run.stats.bytes_sent;
    record.state = if outcome.is_ok() {
        PushState::Done
    } else {
        PushState::Failed
    };
    record.last_error = outcome.as_ref().err().map(|e| e.to_string());
    let save = store.clone();
    blocking(move || Ok(save.save_push(&record)?)).await?;
    let committed = outcome?;
    Ok(PushReport {
        source: canonical.display().to_string(),
        destination: destination.to_string(),
        size: source.manifest.size,
        digest: source.manifest.digest,
        chunks: source.manifest.chunk_count(),
        sent: run.stats,
        attempts: run.attempts,
        manifest_cached,
        source_changes: run.source_changes,
        committed,
        duration: started.elapsed(),
    })
}

/// Counters of one `push` run.
#[derive(Default)]
struct Run {
    attempts: u32,
    failures: u32,
    source_changes: u32,
    stats: SendStats,
}

/// One connection: connect, handshake, send.
async fn attempt(
    opts: &PushOptions,
    number: u32,
    remote_path: &RemotePath,
    source: &Source,
    stats: &mut SendStats,
    on_event: &mut (dyn FnMut(PushEvent) + Send),
) -> Result<Committed, TransferError> {
    let authority = opts.destination.authority();
    let stream = tokio::time::timeout(opts.connect_timeout, TcpStream::connect(&authority))
        .await
        .map_err(|_| TransferError::Timeout(opts.connect_timeout, "connecting"))?
        .map_err(|e| TransferError::Wire(e.into()))?;
    let _ = stream.set_nodelay(true);
    let mut conn = Connection::new(stream, MAX_FRAME);
    handshake::client_hello(&mut conn, opts.send.io_timeout).await?;
    on_event(PushEvent::Connected { attempt: number });
    let mut forward = |e: SendEvent| on_event(PushEvent::Send(e));
    let result = send(&mut conn, remote_path.as_str(), source, &opts.send, stats, &mut forward).await;
    match &result {
        Ok(_) => {
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.shutdown()).await;
        }
        Err(e) => tell_peer(&mut conn, e).await,
    }
    result
}

/// Maps a non-retryable transfer error to the push failure it means.
fn classify(error: TransferError) -> PushError {
    match &error {
        TransferError::Integrity(_) => PushError::Integrity(error),
        TransferError::Remote(frame) if frame.code == ErrorCode::IntegrityFailed => PushError::Integrity(error),
        TransferError::Remote(_) | TransferError::Refused { .. } => PushError::Rejected(error),
        TransferError::Store(_) | TransferError::SourceIo(_) | TransferError::SourceChanged(_) => {
            PushError::Source(error.to_string())
        }
        _ => PushError::Rejected(error),
    }
}

/// The source's manifest from the cache (unless `rebuild`), or built by reading the file and then cached.
async fn load_manifest(
    store: &SenderStore,
    file: &Arc<File>,
    canonical: &Path,
    chunking: ChunkSpec,
    rebuild: bool,
) -> Result<(Manifest, bool), PushError> {
    let (store, file, canonical) = (store.clone(), file.clone(), canonical.to_path_buf());
    blocking(move || {
        let meta = file
            .metadata()
            .map_err(|e| PushError::Source(format!("{}: {e}", canonical.display())))?;
        let key = ManifestKey {
            path: canonical.display().to_string(),
            size: meta.len(),
            mtime: mtime_of(&meta),
            inode: meta.ino(),
            device: meta.dev(),
            chunking,
        };
        if rebuild {
            store.forget_manifests(&key.path)?;
        } else if let Some(manifest) = store.cached_manifest(&key)? {
            if manifest.size == meta.len() && manifest.validate().is_ok() {
                return Ok((manifest, true));
            }
        }
        let manifest = build_stable_manifest(&file, &canonical, chunking)?;
        let key = ManifestKey {
            size: manifest.size,
            mtime: manifest.mtime,
            ..key
        };
        store.cache_manifest(&key, &manifest)?;
        Ok((manifest, false))
    })
    .await
}

/// Builds a manifest, trying again (bounded) if the file changes while it is read.
fn build_stable_manifest(file: &File, canonical: &Path, chunking: ChunkSpec) -> Result<Manifest, PushError> {
    let mut tries = 0;
    loop {
        match build_manifest(file, canonical, chunking) {
            Ok(manifest) => return Ok(manifest),
            Err(ChunkError::SourceChanged(path)) if tries >= MAX_SOURCE_CHANGES => {
                return Err(PushError::SourceUnstable(path))
            }
            Err(ChunkError::SourceChanged(_)) => tries += 1,
            Err(other) => return Err(PushError::Source(other.to_string())),
        }
    }
}

async fn start_record(
    store: &SenderStore,
    canonical: &Path,
    destination: &FerryUrl,
    size: u64,
) -> Result<PushRecord, PushError> {
    let (store, source, destination) = (store.clone(), canonical.display().to_string(), destination.to_string());
    blocking(move || {
        let previous = store.push_record(&source, &destination)?;
        let record = PushRecord {
            source: source.clone(),
            destination: destination.clone(),
            state: PushState::InProgress,
            size,
            bytes_sent: previous.as_ref().map_or(0, |p| p.bytes_sent),
            last_error: None,
            started: previous.map_or_else(now_secs, |p| p.started),
            updated: now_secs(),
        };
        store.save_push(&record)?;
        Ok(record)
    })
    .await
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, PushError> + Send + 'static,
) -> Result<T, PushError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| PushError::Source(format!("internal: {e}")))?
}
