//! The sender role of a server: answering a Pull for a file or a tree inside the client's namespace.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::path::{hide_root, RemotePath};
use crate::source::{committed_if_unchanged, open_for_pull, PullSource};
use crate::storage::Volume;
use crate::transfer::receiver::ReceiverContext;
use crate::transfer::sender::{send, SendOptions, SendStats, Source};
use crate::transfer::tree_sender::{send_tree, TreeSource};
use crate::transfer::{with_keepalive, TransferError};
use crate::tree::scan_beneath;
use crate::wire::{Connection, ErrorCode, Pull, PullKind};

/// The file committed at `path` in a volume that is not a directory (an object store): a verified local copy,
/// offered with the manifest it was committed with (proto-spec.md §11: never rehashed).
fn committed_in_store(volume: &dyn Volume, path: &RemotePath, expect: PullKind) -> Result<PullSource, TransferError> {
    if !expect.accepts(false) {
        let why = format!("{path} is a file; trees are not pulled from an object store yet");
        return Err(TransferError::refused(ErrorCode::WrongKind, why));
    }
    match volume.committed_copy(path)? {
        Some((file, manifest)) => Ok(PullSource::File {
            source: Source {
                file: Arc::new(file),
                manifest: Arc::new(manifest),
            },
            committed: true,
        }),
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
            open_for_pull(&root, &path, &receiver, &sender, pull.chunking, expect)
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
    let mut stats = SendStats::default();
    let mut ignore = |_| {};
    let (source, committed) = match found {
        PullSource::File { source, committed } => (source, committed),
        PullSource::Dir => {
            let (sender, links, spec) = (shared.sender.clone(), pull.links, pull.chunking);
            let (receiver, prefix, root, within) =
                (ctx.store.clone(), path.to_string(), ctx.root.clone(), path.clone());
            let tree = with_keepalive(conn, idle, move || {
                // Files this server committed are described by their verified manifests, never rehashed.
                let lookup = |rel: &str, meta: &std::fs::Metadata| {
                    committed_if_unchanged(&receiver, &format!("{prefix}/{rel}"), meta)
                };
                // Walked from the namespace root without following symlinks; messages name namespace paths only.
                scan_beneath(&root, Some(&within), links, &sender, spec, Some(&lookup))
                    .map_err(|e| TransferError::refused(ErrorCode::Internal, hide_root(&root, &e.to_string())))
            })
            .await?;
            let receiver = &ctx.store;
            let recorded = |rel: &str| {
                let key = format!("{path}/{rel}");
                receiver.committed_manifest(&key).ok().flatten()
            };
            let source = TreeSource {
                tree: &tree,
                store: &shared.sender,
                spec,
                committed: Some(&recorded),
            };
            return tokio::select! {
                sent = send_tree(conn, path.as_str(), &source, &opts, &mut stats, &mut ignore) => sent.map(|_| ()),
                _ = stop.cancelled() => Err(TransferError::ShuttingDown),
            };
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
