//! `ferry pull`: the client takes the receiver role. Its progress lives in its own sled store (scoped by the
//! local directory), partials sit hidden next to the destination (same filesystem, so the final rename is
//! atomic), and an older local copy lends its chunks through the same reuse as on a server.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::{blocking, classify, connect, Backoff, ClientError, ClientEvent, Retrier};
use crate::chunk::ChunkSpec;
use crate::manifest::Hash;
use crate::path::RemotePath;
use crate::server::ReceiverStats;
use crate::store::{ReceiverStore, Store};
use crate::transfer::claims::Claims;
use crate::transfer::receiver::{receive, ReceiverContext};
use crate::transfer::{recv, send_within, tell_peer, TransferError};
use crate::url::FerryUrl;
use crate::wire::{Committed, Connection, Message, Pull};

/// Bytes the pulling client writes between syncs (and Acks).
const SYNC_BATCH: u64 = 4 * 1024 * 1024;
/// Chunk bytes the pulling client may have queued for its writer.
const QUEUE_BUDGET: usize = 64 * 1024;

/// What to pull where, and how.
#[derive(Clone, Debug)]
pub struct PullOptions {
    /// Source URL.
    pub source: FerryUrl,
    /// Local file, or an existing directory (or a path ending in `/`) to pull into under the remote name.
    pub destination: PathBuf,
    /// Client state directory (sled store).
    pub state_dir: PathBuf,
    /// How the server should cut files it has no manifest for.
    pub chunking: ChunkSpec,
    /// Unacknowledged bytes the server may have in flight.
    pub window: u64,
    /// Consecutive failed attempts without progress before giving up.
    pub retries: u32,
    /// Give up on a connection when no byte moves for this long.
    pub io_timeout: Duration,
    /// Time allowed for the TCP connect.
    pub connect_timeout: Duration,
    /// Delays between attempts.
    pub backoff: Backoff,
}

/// The outcome of a successful pull.
#[derive(Clone, Debug)]
pub struct PullReport {
    /// Source URL.
    pub source: String,
    /// The local file written.
    pub destination: String,
    /// File size.
    pub size: u64,
    /// Whole-file BLAKE3, verified here before the rename.
    pub digest: Hash,
    /// This side's final report (received and reused bytes over all runs).
    pub committed: Committed,
    /// Chunk payload bytes received in this run.
    pub bytes_received: u64,
    /// Chunks that failed verification in this run.
    pub chunks_rejected: u64,
    /// Connection attempts made.
    pub attempts: u32,
    /// Wall time of the run.
    pub duration: Duration,
}

/// Pulls one file, resuming whatever a killed earlier run left, reusing an older local copy's chunks.
pub async fn pull(
    opts: PullOptions,
    on_event: &mut (dyn FnMut(ClientEvent) + Send),
) -> Result<PullReport, ClientError> {
    let started = Instant::now();
    let remote = RemotePath::parse(&opts.source.path).map_err(crate::url::UrlError::from)?;
    let (root, name) = local_target(&opts.destination, &remote)?;
    let ctx = {
        let (state_dir, root) = (opts.state_dir.clone(), root.clone());
        blocking(move || {
            let store = Store::open(&state_dir)?;
            let scope = root.display().to_string();
            Ok(ReceiverContext {
                store: ReceiverStore::open_scoped(&store, &scope)?,
                partial_dir: root.clone(),
                root,
                claims: Claims::default(),
                stats: Arc::new(ReceiverStats::default()),
                idle_timeout: opts.io_timeout,
                sync_batch: SYNC_BATCH,
                queue_budget: Arc::new(tokio::sync::Semaphore::new(QUEUE_BUDGET)),
            })
        })
        .await?
    };
    let mut retrier = Retrier::new(opts.retries, opts.backoff.clone());
    let never = CancellationToken::new();
    let committed = loop {
        let number = retrier.start();
        let durable_before = ctx.stats.chunks_durable.load(Ordering::Relaxed);
        let result = attempt(&opts, number, &remote, &ctx, &name, &never, on_event).await;
        let error = match result {
            Ok(committed) => break committed,
            Err(e) if !e.is_retryable() => return Err(classify(e)),
            Err(e) => e,
        };
        let progressed = ctx.stats.chunks_durable.load(Ordering::Relaxed) > durable_before;
        let Some(delay) = retrier.after_failure(progressed) else {
            return Err(ClientError::Network {
                attempts: number,
                last: error,
            });
        };
        tracing::info!(attempt = number, ?delay, error = %error, "retrying");
        on_event(ClientEvent::Retrying {
            attempt: number,
            delay,
            error: error.to_string(),
        });
        tokio::time::sleep(delay).await;
    };
    Ok(PullReport {
        source: opts.source.to_string(),
        destination: root.join(name.as_str()).display().to_string(),
        size: committed.size,
        digest: committed.digest,
        bytes_received: ctx.stats.bytes_received.load(Ordering::Relaxed),
        chunks_rejected: ctx.stats.chunks_rejected.load(Ordering::Relaxed),
        committed,
        attempts: retrier.attempts,
        duration: started.elapsed(),
    })
}

/// The canonical local directory and the file name in it: `destination` itself, or the remote file's name
/// inside `destination` when that is a directory (or ends with `/`).
fn local_target(destination: &Path, remote: &RemotePath) -> Result<(PathBuf, RemotePath), ClientError> {
    let local = |what: String| ClientError::Source(format!("{}: {what}", destination.display()));
    let into_dir = destination.as_os_str().to_string_lossy().ends_with('/') || destination.is_dir();
    let (dir, name) = if into_dir {
        let name = remote.components().last().expect("a RemotePath has a component");
        (destination.to_path_buf(), name.to_string())
    } else {
        let name = destination
            .file_name()
            .ok_or_else(|| local("no file name".into()))?
            .to_string_lossy()
            .into_owned();
        let parent = destination.parent().filter(|p| !p.as_os_str().is_empty());
        (parent.unwrap_or(Path::new(".")).to_path_buf(), name)
    };
    let dir = std::fs::canonicalize(&dir).map_err(|e| local(e.to_string()))?;
    let name = RemotePath::parse(&name).map_err(|e| local(e.to_string()))?;
    Ok((dir, name))
}

/// One connection: connect, handshake, Pull, then receive the Offer.
async fn attempt(
    opts: &PullOptions,
    number: u32,
    remote: &RemotePath,
    ctx: &ReceiverContext,
    name: &RemotePath,
    stop: &CancellationToken,
    on_event: &mut (dyn FnMut(ClientEvent) + Send),
) -> Result<Committed, TransferError> {
    let mut conn = connect(&opts.source, opts.connect_timeout, opts.io_timeout).await?;
    on_event(ClientEvent::Connected { attempt: number });
    let result = receive_pulled(&mut conn, opts, remote, ctx, name, stop).await;
    match &result {
        Ok(_) => {
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.shutdown()).await;
        }
        Err(e) => tell_peer(&mut conn, e).await,
    }
    result
}

async fn receive_pulled(
    conn: &mut Connection<TcpStream>,
    opts: &PullOptions,
    remote: &RemotePath,
    ctx: &ReceiverContext,
    name: &RemotePath,
    stop: &CancellationToken,
) -> Result<Committed, TransferError> {
    let request = Message::Pull(Pull {
        path: remote.to_string(),
        chunking: opts.chunking,
        window: opts.window,
    });
    send_within(conn, &request, opts.io_timeout, "sending Pull").await?;
    match recv(conn, opts.io_timeout, "waiting for the Offer").await? {
        Message::Offer(offer) if offer.path == remote.as_str() => {
            receive(conn, ctx, name.clone(), offer.manifest, stop).await
        }
        Message::Offer(offer) => Err(TransferError::refused(
            crate::wire::ErrorCode::UnexpectedMessage,
            format!("asked for {remote}, the server offered {}", offer.path),
        )),
        other => Err(TransferError::Unexpected {
            got: other.name(),
            state: "waiting for the Offer",
        }),
    }
}
