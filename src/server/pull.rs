//! The sender role of a server: answering a Pull for a file or a tree inside the client's namespace.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::path::{hide_root, RemotePath};
use crate::source::{committed_if_unchanged, open_for_pull, PullSource};
use crate::storage::{TreeCopy, Volume};
use crate::transfer::receiver::ReceiverContext;
use crate::transfer::sender::{send, Rehash, SendOptions, SendStats, Source};
use crate::transfer::tree_sender::{send_tree, TreeSource};
use crate::transfer::{with_keepalive, TransferError};
use crate::tree::scan_beneath;
use crate::wire::{Connection, ErrorCode, Pull, PullKind};

/// What a Pull names: a source as a local volume finds it, or a tree copied out of a store that is not a directory.
enum Found {
    Local(PullSource),
    Stored(TreeCopy),
}

/// The file or tree committed at `path` in a volume that is not a directory (an object store): a verified local
/// copy, offered with the manifests it was committed with (proto-spec.md §11: never rehashed).
fn committed_in_store(volume: &dyn Volume, path: &RemotePath, expect: PullKind) -> Result<Found, TransferError> {
    let wrong_kind = |what: &str| TransferError::refused(ErrorCode::WrongKind, format!("{path} is {what}"));
    if let Some(copy) = volume.committed_tree(path)? {
        return match expect.accepts(true) {
            true => Ok(Found::Stored(copy)),
            false => Err(wrong_kind("a directory")),
        };
    }
    match volume.committed_copy(path)? {
        Some(_) if !expect.accepts(false) => Err(wrong_kind("a file")),
        Some((file, manifest)) => Ok(Found::Local(PullSource::File {
            source: Source {
                file: Arc::new(file),
                manifest: Arc::new(manifest),
                rehash: Rehash::Always,
            },
            committed: true,
        })),
        None => Err(TransferError::refused(
            ErrorCode::NotFound,
            format!("no file is committed at {path}"),
        )),
    }
}

/// Largest window a pulling client may ask for.
const MAX_PULL_WINDOW: u64 = 64 * 1024 * 1024;

/// Takes the sender role for a Pull (refusing a source of the kind the client does not `expect` with
/// `WrongKind`): describes the source (hashing it while pinging the client if needed), then
/// sends what the client needs. A file whose chunks no longer match the manifest it was committed with is damaged
/// at rest, which the client hears as `IntegrityFailed`; any other changed source as retryable `SourceChanged`.
pub(super) async fn serve_pull<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    shared: &Shared,
    ctx: &ReceiverContext,
    pull: Pull,
    expect: PullKind,
    stop: &CancellationToken,
) -> Result<(), TransferError> {
    let path = RemotePath::parse(&pull.path).map_err(|e| TransferError::refused(ErrorCode::BadPath, e))?;
    let idle = shared.config.idle_timeout;
    let found = {
        let (root, receiver, sender) = (ctx.root.clone(), ctx.store.clone(), shared.sender.clone());
        let (path, volume) = (path.clone(), ctx.volume.clone());
        with_keepalive(conn, idle, move || {
            if volume.needs_whole_manifest() {
                return committed_in_store(&*volume, &path, expect);
            }
            open_for_pull(&root, &path, &receiver, &sender, pull.chunking, expect).map(Found::Local)
        })
        .await?
    };
    // Windows below the minimum are raised to it, above the maximum cut to it (proto-spec.md §11).
    let opts = SendOptions {
        io_timeout: idle,
        window: pull.window.clamp(crate::MIN_CHUNK_SIZE.into(), MAX_PULL_WINDOW),
        // The window a pulling client asked for is the window (proto-spec.md §11).
        size_window: false,
        ..SendOptions::default()
    };
    tracing::info!(path = %path, window = opts.window, "serving a pull");
    let mut stats = SendStats::default();
    let mut ignore = |_| {};
    let (source, committed) = match found {
        Found::Local(PullSource::File { source, committed }) => (source, committed),
        Found::Local(PullSource::Dir) => {
            let (receiver, prefix) = (ctx.store.clone(), path.to_string());
            // Files this server committed are described by their verified manifests, never rehashed.
            let lookup = move |rel: &str, meta: &std::fs::Metadata| {
                committed_if_unchanged(&receiver, &format!("{prefix}/{rel}"), meta)
            };
            let receiver = ctx.store.clone();
            let recorded = |rel: &str| receiver.committed_manifest(&format!("{path}/{rel}")).ok().flatten();
            let walk = Walk {
                base: ctx.root.clone(),
                lookup: Arc::new(lookup),
            };
            return send_dir(conn, shared, &pull, &path, walk, &recorded, &opts, stop).await;
        }
        Found::Stored(TreeCopy { dir, manifests }) => {
            let manifests = Arc::new(manifests);
            let known = manifests.clone();
            let lookup =
                move |rel: &str, meta: &std::fs::Metadata| known.get(rel).filter(|m| m.size == meta.len()).cloned();
            let recorded = |rel: &str| manifests.get(rel).cloned();
            let walk = Walk {
                base: dir.path().to_path_buf(),
                lookup: Arc::new(lookup),
            };
            let sent = send_dir(conn, shared, &pull, &path, walk, &recorded, &opts, stop).await;
            drop(dir);
            return sent;
        }
    };
    let sent = tokio::select! {
        sent = send(conn, path.as_str(), &source, &opts, &mut stats, &mut ignore) => sent,
        _ = stop.cancelled() => Err(TransferError::ShuttingDown),
    };
    match sent {
        Ok(_) => Ok(()),
        Err(TransferError::SourceChanged(why)) if committed => Err(TransferError::Integrity(format!(
            "{path} is damaged on the server: {why} (it was verified when committed)"
        ))),
        Err(e) => Err(e),
    }
}

/// Where a tree to send is walked from, and the committed manifests its files were stored with.
struct Walk {
    /// The directory the tree's path is below (the namespace root, or a copy's temporary directory).
    base: std::path::PathBuf,
    /// The committed manifest of a file, by its path in the tree and its metadata now.
    lookup: Arc<Lookup>,
}

/// The committed manifest of a file by its path in the tree and its metadata now.
type Lookup = dyn Fn(&str, &std::fs::Metadata) -> Option<crate::manifest::Manifest> + Send + Sync;

/// Walks the tree at `path` below `walk.base` (never following a symlink) and sends what the client needs.
#[allow(clippy::too_many_arguments)]
async fn send_dir<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    shared: &Shared,
    pull: &Pull,
    path: &RemotePath,
    walk: Walk,
    recorded: &(dyn Fn(&str) -> Option<crate::manifest::Manifest> + Sync),
    opts: &SendOptions,
    stop: &CancellationToken,
) -> Result<(), TransferError> {
    let (sender, links, spec) = (shared.sender.clone(), pull.links, pull.chunking);
    let within = path.clone();
    let tree = with_keepalive(conn, opts.io_timeout, move || {
        let lookup = &*walk.lookup;
        // Walked from the base without following symlinks; messages name namespace paths only.
        scan_beneath(&walk.base, Some(&within), links, &sender, spec, Some(&lookup))
            .map_err(|e| TransferError::refused(ErrorCode::Internal, hide_root(&walk.base, &e.to_string())))
    })
    .await?;
    let source = TreeSource {
        tree: &tree,
        store: &shared.sender,
        spec,
        committed: Some(recorded),
    };
    let (mut stats, mut ignore) = (SendStats::default(), |_| {});
    tokio::select! {
        sent = send_tree(conn, path.as_str(), &source, opts, &mut stats, &mut ignore) => sent.map(|_| ()),
        _ = stop.cancelled() => Err(TransferError::ShuttingDown),
    }
}
