//! `ferry pull`: the client takes the receiver role, for a file or a tree. Its progress lives in its own sled store (scoped by the
//! local directory), partials sit hidden next to the destination (same filesystem, so the final rename is
//! atomic), and an older local copy lends its chunks through the same reuse as on a server.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::tree::TreeReport;
use super::{blocking, classify, connect_welcomed, Backoff, ClientError, ClientEvent, Deadline, Retrier};
use crate::chunk::ChunkSpec;
use crate::manifest::Hash;
use crate::meter::Meter;
use crate::path::{private_partial_dir, RemotePath};
use crate::store::{ReceiverStore, Store};
use crate::throttle::Bandwidth;
use crate::transfer::claims::Claims;
use crate::transfer::receiver::{receive, ReceiverContext, ReceiverPolicy};
use crate::transfer::tree_receiver::{receive_tree, TreeReceived};
use crate::transfer::ReceiverStats;
use crate::transfer::{recv, send_within, tell_peer, TransferError};
use crate::url::FerryUrl;
use crate::wire::{Committed, ErrorCode, Message, Pull, PullExpecting, PullKind};

/// Bytes the pulling client writes between syncs (and Acks).
const SYNC_BATCH: u64 = 16 * 1024 * 1024;
/// Chunk bytes the pulling client may have queued for its writer.
const QUEUE_BUDGET: usize = 64 * 1024;
/// After the deadline, how long the receiver may take to drain what it already verified before it is dropped.
const STOP_GRACE: Duration = Duration::from_secs(2);

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
    /// Whether `window` is only where the window starts: the client then asks for more if the handshake measured a
    /// long round trip ([`crate::transfer::window::starting_bytes`]); false when the user set the window.
    pub size_window: bool,
    /// For a tree: whether symlinks are recreated or left out.
    pub links: crate::tree::LinkPolicy,
    /// Consecutive failed attempts without progress before giving up.
    pub retries: u32,
    /// Give up on a connection when no byte moves for this long.
    pub io_timeout: Duration,
    /// Time allowed for the TCP connect.
    pub connect_timeout: Duration,
    /// Token and TLS settings.
    pub access: super::Access,
    /// Delays between attempts.
    pub backoff: Backoff,
    /// Live progress of the run.
    pub meter: Arc<Meter>,
    /// Bandwidth cap (`--bwlimit`).
    pub bandwidth: Option<Bandwidth>,
    /// When the whole run must stop (`--max-duration`).
    pub deadline: Option<Deadline>,
    /// For a tree: once it landed completely, remove local entries it does not hold (`--delete`).
    pub delete: bool,
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

/// What a pull produced: a file or a tree.
#[derive(Clone, Debug)]
pub enum Pulled {
    /// A single file.
    File(PullReport),
    /// A directory tree.
    Tree(TreeReport),
}

/// Pulls one file or tree, resuming whatever a killed earlier run left, reusing an older local copy's chunks.
pub async fn pull(opts: PullOptions, on_event: &mut (dyn FnMut(ClientEvent) + Send)) -> Result<Pulled, ClientError> {
    let started = Instant::now();
    let remote = RemotePath::parse(opts.source.path.trim_end_matches('/')).map_err(crate::url::UrlError::from)?;
    let store = {
        let state_dir = opts.state_dir.clone();
        blocking(move || Ok(Store::open(&state_dir)?)).await?
    };
    let mut local = Local {
        store,
        destination: opts.destination.clone(),
        expect: expected_kind(&opts.destination, &opts.source.path),
        source: remote.to_string(),
        policy: ReceiverPolicy::pulling_client(process_umask()),
        file: None,
        tree: None,
        meter: opts.meter.clone(),
    };
    let _published = super::running::Publisher::start(
        &opts.state_dir,
        "pull",
        opts.source.to_string(),
        opts.destination.display().to_string(),
        opts.meter.clone(),
        None,
    );
    let mut retrier = Retrier::new(opts.retries, opts.backoff.clone(), opts.deadline).failing_over(&opts.source);
    // At the deadline the receiver is asked to stop (it drains what it verified), then given STOP_GRACE.
    let stop = CancellationToken::new();
    let _stopper = opts.deadline.map(|deadline| {
        let stop = stop.clone();
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            tokio::time::sleep_until(deadline.at).await;
            stop.cancel();
        }))
    });
    let outcome = loop {
        let number = retrier.start();
        let before = local.progress();
        let receiving = attempt(&opts, number, &remote, &mut local, &stop, on_event);
        let result = retrier.bounded(receiving, STOP_GRACE).await?;
        let error = match result {
            Ok(outcome) => break outcome,
            Err(_) if stop.is_cancelled() => {
                return Err(opts.deadline.expect("only a deadline stops a pull").expired(None))
            }
            Err(AttemptError::Local(e)) => return Err(e),
            Err(AttemptError::Transfer(e)) if !e.is_retryable() => return Err(classify(e)),
            Err(AttemptError::Transfer(e)) => e,
        };
        retrier
            .wait_to_retry(error, local.progress() > before, on_event)
            .await?;
    };
    local.tidy();
    Ok(match outcome {
        Outcome::File(committed) => {
            let (ctx, name) = local.file.as_ref().expect("a file was received");
            Pulled::File(PullReport {
                source: opts.source.to_string(),
                destination: ctx.root.join(name.as_str()).display().to_string(),
                size: committed.size,
                digest: committed.digest,
                bytes_received: ctx.stats.bytes_received.load(Ordering::Relaxed),
                chunks_rejected: ctx.stats.chunks_rejected.load(Ordering::Relaxed),
                committed,
                attempts: retrier.attempts,
                duration: started.elapsed(),
            })
        }
        Outcome::Tree(received) => {
            let ctx = local.tree.as_ref().expect("a tree was received");
            let mut report = TreeReport {
                source: opts.source.to_string(),
                destination: ctx.root.display().to_string(),
                bytes_transferred: ctx.stats.bytes_received.load(Ordering::Relaxed),
                attempts: retrier.attempts,
                duration: started.elapsed(),
                pulled: true,
                ..TreeReport::default()
            };
            report.count_entries(received.entries.iter().map(|e| &e.kind));
            report.files_needed = report.files.saturating_sub(received.committed.files_unchanged);
            report.damaged = received.sender_failed.iter().filter(|f| f.damaged).count() as u64;
            report.failed = received
                .sender_failed
                .iter()
                .map(|f| (received.entries[f.entry as usize].path.clone(), f.reason.clone()))
                .collect();
            report.committed = received.committed;
            if opts.links == crate::tree::LinkPolicy::Skip {
                skip_symlinks(&mut report, &received.entries);
            }
            if opts.delete {
                report.deletion = Some(delete_local(&report, ctx, received.entries).await?);
            }
            Pulled::Tree(report)
        }
    })
}

/// Why a pulled symlink is not recreated without `--links record`.
pub const SYMLINK_SKIPPED: &str =
    "symlink not recreated (pull with --links record to recreate symlinks that stay inside the tree)";

/// Symlinks of a pulled tree left out by `--links skip` (the default): named as skipped, not as entries the
/// receiver failed to place.
fn skip_symlinks(report: &mut TreeReport, entries: &[crate::wire::TreeEntry]) {
    let missing = super::tree::missing_entries(&report.committed.missing, entries.len());
    let (links, others): (Vec<u32>, Vec<u32>) = missing
        .into_iter()
        .partition(|&i| matches!(entries[i as usize].kind, crate::wire::EntryKind::Symlink { .. }));
    for i in links {
        report
            .skipped
            .push((entries[i as usize].path.clone(), SYMLINK_SKIPPED.to_string()));
    }
    report.committed.missing = crate::ranges::encode_runs(others);
}

/// `--delete` after a tree pull: removes what the local directory holds beyond the tree, if the tree landed
/// completely.
async fn delete_local(
    report: &TreeReport,
    ctx: &ReceiverContext,
    entries: Vec<crate::wire::TreeEntry>,
) -> Result<super::Deletion, ClientError> {
    if !(report.failed.is_empty() && report.committed.missing.is_empty()) {
        return Ok(super::Deletion::skipped(super::tree::NOT_DELETING));
    }
    let (root, store) = (ctx.root.clone(), ctx.store.clone());
    blocking(move || {
        use crate::transfer::prune::{prune, Forget};
        let mut forget = Forget::new(&store, String::new());
        let pruned = prune(&root, &[], &entries, &mut |path| forget.file(path));
        forget.flush();
        pruned
            .map(super::Deletion::from_report)
            .map_err(|e| ClientError::Source(format!("--delete: {e}")))
    })
    .await
}

/// The receiving side of a pull, set up once the server has said whether it sends a file or a tree.
struct Local {
    store: Store,
    destination: PathBuf,
    /// What the client is prepared to receive (said in the Pull from version 5, checked here always).
    expect: PullKind,
    /// The remote path, recorded with a pulled tree's root so that a later pull of it (from any server, as the
    /// same tree may be reached under several names) may update it.
    source: String,
    /// The receiver policy of a pulling client: in-place reuse only, modes masked by the umask.
    policy: ReceiverPolicy,
    /// For a file: the context (rooted at the destination's directory) and the file name.
    file: Option<(ReceiverContext, RemotePath)>,
    /// For a tree: the context rooted at the destination directory.
    tree: Option<ReceiverContext>,
    /// Shared by both contexts' stats: the run's live progress.
    meter: Arc<Meter>,
}

impl Local {
    /// After a successful pull: removes the private partial directories if they are empty (best effort).
    fn tidy(&self) {
        let contexts = self.file.iter().map(|(ctx, _)| ctx).chain(self.tree.iter());
        for ctx in contexts {
            let _ = std::fs::remove_dir(&ctx.partial_dir);
            let _ = std::fs::remove_dir(ctx.root.join(crate::path::RESERVED_DIR));
        }
    }

    /// Durable progress so far (chunks and small files), to tell a failed attempt that moved forward.
    fn progress(&self) -> u64 {
        let stats = |ctx: &ReceiverContext| {
            ctx.stats.chunks_durable.load(Ordering::Relaxed) + ctx.stats.files_committed.load(Ordering::Relaxed)
        };
        self.file.as_ref().map_or(0, |(ctx, _)| stats(ctx)) + self.tree.as_ref().map_or(0, stats)
    }

    fn file_context(
        &mut self,
        remote: &RemotePath,
        io_timeout: Duration,
    ) -> Result<&(ReceiverContext, RemotePath), ClientError> {
        if self.file.is_none() {
            let (root, name) = local_target(&self.destination, remote)?;
            let ctx = context(&self.store, root, io_timeout, self.meter.clone(), self.policy)?;
            self.file = Some((ctx, name));
        }
        Ok(self.file.as_ref().expect("just set"))
    }

    fn tree_context(&mut self, remote: &RemotePath, io_timeout: Duration) -> Result<&ReceiverContext, ClientError> {
        if self.tree.is_none() {
            let root = tree_root(&self.store, &self.destination, remote, &self.source)?;
            self.tree = Some(context(&self.store, root, io_timeout, self.meter.clone(), self.policy)?);
        }
        Ok(self.tree.as_ref().expect("just set"))
    }
}

/// A receiver context rooted at `root`, its records scoped by that directory; partials live in `root/.ferry/partial`,
/// which no path the server sends can name.
fn context(
    store: &Store,
    root: PathBuf,
    io_timeout: Duration,
    meter: Arc<Meter>,
    policy: ReceiverPolicy,
) -> Result<ReceiverContext, ClientError> {
    let scope = root.display().to_string();
    let partial_dir = private_partial_dir(&root)
        .map_err(|e| ClientError::Source(format!("{}: {e}", root.join(crate::path::RESERVED_DIR).display())))?;
    Ok(ReceiverContext {
        store: ReceiverStore::open_scoped(store, &scope)?,
        volume: crate::storage::LocalVolume::shared(root.clone(), partial_dir.clone()),
        trees: crate::storage::LocalVolume::shared_tree(root.clone(), partial_dir.clone()),
        partial_dir,
        root,
        claims: Claims::default(),
        stats: Arc::new(ReceiverStats {
            meter,
            ..ReceiverStats::default()
        }),
        idle_timeout: io_timeout,
        sync_batch: SYNC_BATCH,
        queue_budget: Arc::new(tokio::sync::Semaphore::new(QUEUE_BUDGET)),
        max_file_size: u64::MAX,
        max_manifest_chunks: crate::MAX_MANIFEST_CHUNKS,
        quota: None,
        limits: crate::transfer::quota::NamespaceLimits::UNLIMITED,
        admission: Default::default(),
        joins: Default::default(),
        policy,
    })
}

/// What the client expects from the command line alone: a tree if the remote path ends in `/`, a file if the
/// destination is an existing non-directory (a tree could not go there), else either.
fn expected_kind(destination: &Path, remote: &str) -> PullKind {
    if remote.ends_with('/') {
        PullKind::Tree
    } else if std::fs::metadata(destination).is_ok_and(|m| !m.is_dir()) {
        PullKind::File
    } else {
        PullKind::Any
    }
}

/// The process's umask, read without changing it (`umask(2)` can only set it, which would race other threads).
fn process_umask() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("Umask:"))
        .and_then(|value| u32::from_str_radix(value.trim(), 8).ok())
        .unwrap_or(0o022)
}

/// The local directory a pulled tree goes into (proto-spec.md §11): the destination itself if it is missing (then
/// created), empty, or the root of an earlier pull of the same `source`; otherwise, if it is a directory, the
/// remote's own name inside it under the same conditions. Anything else is refused before a byte is written: a
/// server answering a pull with a tree cannot unpack it over a directory that holds other things.
fn tree_root(store: &Store, destination: &Path, remote: &RemotePath, source: &str) -> Result<PathBuf, ClientError> {
    if let Some(root) = tree_root_at(store, destination, source)? {
        return Ok(root);
    }
    let name = remote.components().last().expect("a RemotePath has a component");
    let inner = destination.join(name);
    tree_root_at(store, &inner, source)?.ok_or_else(|| {
        ClientError::Source(format!(
            "{}: refusing to pull the tree {remote} here: the directory holds other files and no earlier pull of \
             this tree; pull it into a new or empty directory",
            inner.display()
        ))
    })
}

/// `dir` as the root of the tree from `source`, recorded as such: if it is missing (created), an empty directory
/// (a leftover `.ferry` aside), or already the root of that tree. `None` for a directory holding other things.
fn tree_root_at(store: &Store, dir: &Path, source: &str) -> Result<Option<PathBuf>, ClientError> {
    let local = |e: std::io::Error| ClientError::Source(format!("{}: {e}", dir.display()));
    let fresh = match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(local)?;
            true
        }
        Err(e) => return Err(local(e)),
        Ok(meta) if !meta.is_dir() => {
            return Err(ClientError::Source(format!(
                "{}: not a directory; a tree cannot be pulled there",
                dir.display()
            )))
        }
        Ok(_) => std::fs::read_dir(dir)
            .map_err(local)?
            .all(|entry| entry.is_ok_and(|e| e.file_name() == crate::path::RESERVED_DIR)),
    };
    let root = std::fs::canonicalize(dir).map_err(local)?;
    let records = ReceiverStore::open_scoped(store, &root.display().to_string())?;
    if fresh {
        records.set_tree_source(source)?;
    } else if records.tree_source()?.as_deref() != Some(source) {
        return Ok(None);
    }
    // A directory already recorded for this source keeps its record: no write and flush on every pull.
    Ok(Some(root))
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

/// What one attempt received.
enum Outcome {
    File(Committed),
    Tree(TreeReceived),
}

/// Why an attempt failed: the transfer (maybe retryable), or the local destination (never).
enum AttemptError {
    Transfer(TransferError),
    Local(ClientError),
}

impl From<TransferError> for AttemptError {
    fn from(e: TransferError) -> Self {
        AttemptError::Transfer(e)
    }
}

/// One connection: connect, handshake, Pull, then receive the Offer or TreeOffer.
async fn attempt(
    opts: &PullOptions,
    number: u32,
    remote: &RemotePath,
    local: &mut Local,
    stop: &CancellationToken,
    on_event: &mut (dyn FnMut(ClientEvent) + Send),
) -> Result<Outcome, AttemptError> {
    let (mut conn, welcome) = connect_welcomed(
        &opts.source,
        opts.connect_timeout,
        opts.io_timeout,
        &opts.access,
        opts.bandwidth.as_ref(),
    )
    .await?;
    opts.meter.attempt();
    on_event(ClientEvent::Connected { attempt: number });
    let result = receive_pulled(&mut conn, welcome.version, opts, remote, local, stop).await;
    match &result {
        Ok(_) => {
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.shutdown()).await;
        }
        Err(AttemptError::Transfer(e)) => tell_peer(&mut conn, e).await,
        Err(AttemptError::Local(e)) => {
            let refusal = TransferError::refused(crate::wire::ErrorCode::Internal, e);
            tell_peer(&mut conn, &refusal).await;
        }
    }
    result
}

/// The window to ask the server for: as set by the user, else the default raised to cover the handshake's round
/// trip at [`crate::transfer::window::START_RATE`] (the server keeps at most its own maximum, proto-spec.md §11).
fn pull_window(opts: &PullOptions, round_trip: Option<Duration>) -> u64 {
    match opts.size_window {
        true => crate::transfer::window::starting_bytes(opts.window, round_trip),
        false => opts.window,
    }
}

/// Sends the Pull (saying what kind of source is expected, from version 5 on) and receives what comes. A source
/// of the kind the client does not expect is refused with `WrongKind` before anything is written, whatever the
/// server's version.
async fn receive_pulled(
    conn: &mut super::ClientConnection,
    version: u16,
    opts: &PullOptions,
    remote: &RemotePath,
    local: &mut Local,
    stop: &CancellationToken,
) -> Result<Outcome, AttemptError> {
    let pull = Pull {
        path: remote.to_string(),
        chunking: opts.chunking,
        window: pull_window(opts, conn.round_trip()),
        // Symlinks are always asked for, so that those left out locally (`--links skip`) can be named; the
        // receiver below places them only if `opts.links` records them.
        links: crate::tree::LinkPolicy::Record,
    };
    let request = if version >= crate::PULL_KIND_VERSION {
        Message::PullExpecting(PullExpecting {
            pull,
            expect: local.expect,
        })
    } else {
        Message::Pull(pull)
    };
    send_within(conn, &request, opts.io_timeout, "sending Pull").await?;
    let offered = recv(conn, opts.io_timeout, "waiting for the Offer").await?;
    let tree = matches!(offered, Message::TreeOffer(_));
    if matches!(offered, Message::Offer(_) | Message::TreeOffer(_)) && !local.expect.accepts(tree) {
        let (got, wanted) = if tree {
            ("a tree", "a file")
        } else {
            ("a file", "a tree")
        };
        return Err(TransferError::refused(
            ErrorCode::WrongKind,
            format!("asked for {wanted} at {remote}, the server offered {got}; nothing was written"),
        )
        .into());
    }
    match offered {
        Message::Offer(offer) if offer.path == remote.as_str() => {
            let (ctx, name) = local
                .file_context(remote, opts.io_timeout)
                .map_err(AttemptError::Local)?;
            Ok(Outcome::File(
                receive(conn, ctx, name.clone(), offer.manifest, stop).await?,
            ))
        }
        Message::TreeOffer(offer) if offer.path == remote.as_str() => {
            let ctx = local
                .tree_context(remote, opts.io_timeout)
                .map_err(AttemptError::Local)?;
            Ok(Outcome::Tree(
                receive_tree(conn, ctx, offer, None, opts.links, stop).await?,
            ))
        }
        Message::Offer(_) | Message::TreeOffer(_) => Err(TransferError::refused(
            ErrorCode::UnexpectedMessage,
            format!("asked for {remote}, the server offered another path"),
        )
        .into()),
        other => Err(TransferError::Unexpected {
            got: other.name(),
            state: "waiting for the Offer",
        }
        .into()),
    }
}
