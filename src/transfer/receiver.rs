//! The receiver role: check an Offer, answer with the chunks still missing, take chunks in through the
//! [`writer`](super::writer), and commit.
//!
//! Guarantees (proto-spec.md, "Receiver"): a destination path is validated and resolved inside the root before
//! anything is created; a manifest that does not tile its file is refused; every chunk is verified before it is
//! written; the final name only ever holds a file whose whole-file digest was verified, renamed atomically from a
//! partial under `.ferry/partial/` on the same filesystem.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::claims::Claims;
use super::commit::{commit, CommitOutcome};
use super::join;
use super::kept_prefix::{HeadStart, KeptPrefix};
use super::quota::{admit, admit_shared, NewTransfer};
use super::reuse::{find_local, LocalCopies};
use super::writer::{ChunkWriter, QueuedChunk, WriterEvent};
use super::ReceiverStats;
use super::{answer_ping, next_message, send_within, with_keepalive, TransferError};
#[cfg(test)]
use crate::manifest::ChunkEntry;
use crate::manifest::{index_of_same, Manifest};
use crate::path::RemotePath;
use crate::ranges::{ChunkSet, IndexRange};
use crate::storage::Volume;
use crate::store::{now_secs, Progress, ReceiverStore, TransferRecord, TransferRecordRef};
use crate::wire::{Ack, Chunk, Committed, Connection, ErrorCode, Message, Need};

/// Commit rounds (chunks still missing at Commit) before the sender is considered broken.
pub(super) const MAX_COMMIT_ROUNDS: u32 = 8;
/// Chunks queued between the socket and the disk writer.
pub(super) const WRITE_QUEUE: usize = 4;

/// Everything a receiver needs, shared by all sessions of a server.
#[derive(Clone)]
pub struct ReceiverContext {
    /// Files are committed under this directory.
    pub root: PathBuf,
    /// Partial files live here (same filesystem as `root`).
    pub partial_dir: PathBuf,
    /// Where the big-file receiver keeps its partials and commits files: a [`crate::storage::LocalVolume`] over
    /// `root` and `partial_dir`.
    pub volume: Arc<dyn Volume>,
    /// Where the tree receiver puts small files, directories and symlinks: the same volume, as a
    /// [`crate::storage::TreeVolume`].
    pub trees: Arc<dyn crate::storage::TreeVolume>,
    /// Durable records.
    pub store: ReceiverStore,
    /// One session per destination.
    pub claims: Claims,
    /// Server-wide counters.
    pub stats: Arc<ReceiverStats>,
    /// Maximum silence from the sender.
    pub idle_timeout: Duration,
    /// Bytes written between syncs (and Acks).
    pub sync_batch: u64,
    /// Server-wide budget of queued chunk bytes, in KiB permits.
    pub queue_budget: Arc<tokio::sync::Semaphore>,
    /// Largest file accepted; larger offers are refused with `BadManifest`.
    pub max_file_size: u64,
    /// Most chunks in an accepted manifest; more are refused with `BadManifest`.
    pub max_manifest_chunks: usize,
    /// Bytes this root (a namespace) may hold, committed and open together; `None`: unlimited.
    pub quota: Option<u64>,
    /// Open transfers and stored manifest bytes this root (a namespace) may keep.
    pub limits: super::quota::NamespaceLimits,
    /// Serialises the admission of transfers in this namespace (one per namespace).
    pub admission: super::quota::Admission,
    /// Open transfers that extra streams may join.
    pub joins: super::join::Joins,
    /// What this receiver may take from local copies and apply from the offer (proto-spec.md §4 "Reuse", §11).
    pub policy: ReceiverPolicy,
}

/// How far a receiver trusts its sender with what it already holds, and with its metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReceiverPolicy {
    /// Which local bytes may fill chunks (and so shape the Need the sender sees).
    pub reuse: Reuse,
    /// Permission bits kept from an offered mode (files and directories): `0o777` on a server, `0o777 & !umask`
    /// on a pulling client.
    pub mode_mask: u32,
    /// A re-push that mostly matches the committed file may be written into it in place under a redo journal
    /// (readers may see a mix during the apply; proto-spec.md §8); false: always a new partial and a rename.
    pub in_place: bool,
}

impl ReceiverPolicy {
    /// A server receiving from a client that may also read (pull) the namespace.
    pub const SERVER: ReceiverPolicy = ReceiverPolicy {
        reuse: Reuse::Full,
        mode_mask: 0o777,
        in_place: true,
    };

    /// A server receiving from a client without the pull permission: it must not learn content it cannot read.
    pub fn without_read(self) -> ReceiverPolicy {
        ReceiverPolicy {
            reuse: Reuse::InPlace,
            ..self
        }
    }

    /// A pulling client whose process umask is `umask`: the server must not learn what the client holds, and
    /// cannot loosen the client's permissions.
    pub fn pulling_client(umask: u32) -> ReceiverPolicy {
        ReceiverPolicy {
            reuse: Reuse::InPlace,
            mode_mask: 0o777 & !umask,
            in_place: false,
        }
    }
}

impl Default for ReceiverPolicy {
    fn default() -> Self {
        ReceiverPolicy::SERVER
    }
}

/// Which local bytes a receiver may copy instead of asking for them (proto-spec.md §4, "Reuse"). A reused chunk
/// is left out of the Need, so what is reusable is what a sender can learn from a Need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reuse {
    /// Repeats within the offer, any chunk of the file now at the destination, and the chunk index over every
    /// committed file of the scope (a sender that may read all of them anyway).
    Full,
    /// Repeats within the offer, and a chunk of the file now at the destination only at the same offset with the
    /// same length, only when no transfer to that path is open (once per version of the file); no chunk index.
    InPlace,
}

/// Where a prepared transfer stands.
pub(super) enum Plan {
    /// The exact file is already committed at the destination.
    AlreadyPresent(Committed),
    /// Chunks to receive (possibly none) into the partial.
    Receive(Box<Prepared>),
}

pub(super) struct Prepared {
    writer: ChunkWriter,
    /// No transfer to this path was open before this offer.
    fresh: bool,
    /// What was hashed of the committed file while the offer was gathered, for the follower of an in-place
    /// partial over that very file ([`super::kept_prefix`]).
    kept: Option<HeadStart>,
}

/// Serves one offered `manifest` for `path` (under the context's root) to completion: Need, chunks, Commit,
/// Committed. Ends early with `Superseded` or `ShuttingDown` when `stop` fires (the caller tells which).
pub async fn receive<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    ctx: &ReceiverContext,
    path: RemotePath,
    manifest: Manifest,
    stop: &CancellationToken,
) -> Result<Committed, TransferError> {
    receive_gathered(conn, ctx, path, manifest, None, stop).await
}

/// [`receive`] for a manifest gathered from a streamed offer, with the digest of the committed file's prefix that
/// its pieces kept in place, if one was hashed meanwhile.
pub(super) async fn receive_gathered<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    ctx: &ReceiverContext,
    path: RemotePath,
    manifest: Manifest,
    kept: Option<KeptPrefix>,
    stop: &CancellationToken,
) -> Result<Committed, TransferError> {
    manifest
        .validate()
        .map_err(|e| TransferError::refused(ErrorCode::BadManifest, e))?;
    refuse_short_chunks(&manifest, ctx.volume.min_chunk_size())?;
    let mut manifest = manifest;
    manifest.mode &= ctx.policy.mode_mask;
    if manifest.size > ctx.max_file_size {
        return Err(too_large(manifest.size, ctx.max_file_size));
    }
    if manifest.chunk_count() as usize > ctx.max_manifest_chunks {
        return Err(TransferError::refused(
            ErrorCode::BadManifest,
            format!(
                "a manifest of {} chunks is more than this receiver accepts ({}); use larger chunks",
                manifest.chunk_count(),
                ctx.max_manifest_chunks
            ),
        ));
    }
    let claim = ctx
        .claims
        .claim_as(
            path.as_str(),
            (
                manifest.id(),
                super::claims::file_identity(manifest.size, manifest.mtime),
            ),
            Duration::from_secs(10),
        )
        .await?;
    let manifest = Arc::new(manifest);
    let plan = {
        let (ctx, path, manifest) = (ctx.clone(), path.clone(), manifest.clone());
        blocking(move || prepare_with(&ctx, &path, manifest, kept)).await?
    };
    let committed = match plan {
        Plan::AlreadyPresent(committed) => {
            let nothing = Message::Need(Need { ranges: vec![] });
            send_within(conn, &nothing, ctx.idle_timeout, "sending Need").await?;
            expect_commit(conn, ctx, &claim.superseded, stop).await?;
            committed
        }
        Plan::Receive(prepared) => {
            receive_until_committed(conn, ctx, *prepared, &path, &claim.superseded, stop).await?
        }
    };
    let reply = Message::Committed(committed.clone());
    send_within(conn, &reply, ctx.idle_timeout, "sending Committed").await?;
    Ok(committed)
}

/// Refuses a manifest whose chunks (but the last) are shorter than the volume stores (an object store's
/// `min_chunk_size`: a PUT per chunk).
fn refuse_short_chunks(manifest: &Manifest, min: u32) -> Result<(), TransferError> {
    let all_but_last = &manifest.chunks[..manifest.chunks.len().saturating_sub(1)];
    match all_but_last.iter().position(|c| c.len < min) {
        None => Ok(()),
        Some(index) => Err(TransferError::refused(
            ErrorCode::BadManifest,
            format!(
                "chunk {index} has {} bytes; this server stores chunks of at least {min} bytes (min_chunk_size): \
                 use larger chunks",
                manifest.chunks[index].len
            ),
        )),
    }
}

/// The refusal of a file larger than this receiver accepts.
pub(crate) fn too_large(size: u64, limit: u64) -> TransferError {
    TransferError::refused(
        ErrorCode::BadManifest,
        format!("a file of {size} bytes is larger than this receiver accepts ({limit} bytes)"),
    )
}

/// Asks for the missing chunks, takes them in, and commits; asks again for whatever is still missing or turned
/// out damaged at commit, for at most [`MAX_COMMIT_ROUNDS`] rounds. Chunks with a local copy are copied before the
/// first `Need`, or, where some chunks have no local copy (an edited file), after the first round: the chunks only
/// the sender has then arrive first, so the copy runs in file order behind them and the digest follower hashes
/// the copied bytes from memory instead of reading them back at commit (proto-spec.md §4, "Reuse").
async fn receive_until_committed<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    ctx: &ReceiverContext,
    prepared: Prepared,
    path: &RemotePath,
    superseded: &CancellationToken,
    stop: &CancellationToken,
) -> Result<Committed, TransferError> {
    let writer = prepared.writer;
    let mut kept = prepared.kept;
    let (rule, fresh) = (ctx.policy.reuse, prepared.fresh);
    let (mut writer, mut copies) = {
        let (volume, path) = (ctx.volume.clone(), path.clone());
        with_keepalive(conn, ctx.idle_timeout, move || {
            let copies = find_local(&writer, &*volume, &path, rule, fresh);
            Ok((writer, copies))
        })
        .await?
    };
    // Some chunks only the sender has, and enough to copy: ask for those first, copy after the round.
    let wire_first = copies.as_ref().and_then(|local| {
        let copyable = local.copyable_bytes(&writer);
        if rule != Reuse::Full || copyable < COPY_AFTER_THE_WIRE {
            return None;
        }
        let need = writer.needed_ranges_but(|hash| local.has_copy(hash));
        (!need.is_empty()).then_some((need, copyable))
    });
    let (need, copy_after) = match wire_first {
        Some((need, copyable)) => (Some(need), copyable),
        None => {
            if let Some(local) = copies.take() {
                writer = copy_local(conn, ctx, writer, local, path, &mut kept).await?;
            }
            (None, 0)
        }
    };
    meter_offer(ctx, &writer, path, copy_after);
    let (mut writer, result) = receive_chunks(conn, ctx, writer, path, need, superseded, stop).await;
    result?;
    if let Some(local) = copies {
        writer = copy_local(conn, ctx, writer, local, path, &mut kept).await?;
    }
    commit_rounds(conn, ctx, writer, path, superseded, stop).await
}

/// Local copies of at least this many bytes go after the first round when some chunks have none: below it, the
/// follower's read-back is cheaper than the extra round trip.
const COPY_AFTER_THE_WIRE: u64 = 16 * 1024 * 1024;

/// Copies the chunks `copies` holds into `writer`, pinging the sender meanwhile. `kept` goes to the writer
/// ([`ChunkWriter::take_head_start`]) before the copy, so that the follower takes its subtrees instead of reading
/// back the chunks the copy makes final, and again after it: its prefix is taken if the copy made those bytes
/// final, as keeping an in-place partial's chunks does, else it is left in `kept` for a later try.
async fn copy_local<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    ctx: &ReceiverContext,
    mut writer: ChunkWriter,
    copies: LocalCopies,
    path: &RemotePath,
    kept: &mut Option<HeadStart>,
) -> Result<ChunkWriter, TransferError> {
    let path = path.clone();
    let seed = kept.take();
    let (writer, unused) = with_keepalive(conn, ctx.idle_timeout, move || {
        let seed = seed.and_then(|seed| writer.take_head_start(seed));
        copies.copy_into(&mut writer, &path)?;
        let unused = seed.and_then(|seed| writer.take_head_start(seed));
        Ok((writer, unused))
    })
    .await?;
    *kept = unused;
    Ok(writer)
}

/// Reports the accepted offer to the meter and the log: `to_copy` bytes of the missing ones will be copied
/// locally.
fn meter_offer(ctx: &ReceiverContext, writer: &ChunkWriter, path: &RemotePath, to_copy: u64) {
    let chunks = writer.manifest.chunk_count();
    let missing = chunks - writer.received.present();
    let missing_bytes = writer.manifest.ranges_bytes(&writer.received.missing_ranges());
    let size = writer.manifest.size;
    let present = size - missing_bytes.saturating_sub(to_copy).min(size);
    ctx.stats.meter.file(path.as_str(), size, present);
    tracing::info!(path = %path, chunks, missing, to_copy, "offer accepted");
}

/// After a round of chunks (the first of at most [`MAX_COMMIT_ROUNDS`]): commits once every chunk is in, and asks
/// again for whatever is still missing or turned out damaged at commit, round after round. Whole and streamed
/// offers end here.
pub(super) async fn commit_rounds<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    ctx: &ReceiverContext,
    mut writer: ChunkWriter,
    path: &RemotePath,
    superseded: &CancellationToken,
    stop: &CancellationToken,
) -> Result<Committed, TransferError> {
    for round in 1..=MAX_COMMIT_ROUNDS {
        if writer.received.is_complete() {
            match commit_with_keepalive(conn, ctx, writer, path.clone()).await? {
                CommitOutcome::Done(committed) => return Ok(committed),
                CommitOutcome::Damaged(back) => writer = *back,
            }
        }
        if round == MAX_COMMIT_ROUNDS {
            break;
        }
        let (back, result) = receive_chunks(conn, ctx, writer, path, None, superseded, stop).await;
        writer = back;
        result?;
    }
    let why = format!("chunks still missing or damaged after {MAX_COMMIT_ROUNDS} commit rounds");
    Err(TransferError::refused(ErrorCode::UnexpectedMessage, why))
}

/// Runs one round of chunk reception: opens the transfer to joining streams, sends the Need (`need`, else every
/// missing chunk), and takes chunks until Commit (Ok) or a failure. Always drains the writer first, so what was
/// verified is durable before this returns, whatever the outcome.
pub(super) async fn receive_chunks<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    ctx: &ReceiverContext,
    mut writer: ChunkWriter,
    path: &RemotePath,
    need: Option<Vec<IndexRange>>,
    superseded: &CancellationToken,
    shutdown: &CancellationToken,
) -> (ChunkWriter, Result<(), TransferError>) {
    let manifest = writer.manifest.clone();
    let missing_ranges = need.unwrap_or_else(|| writer.needed_ranges());
    let (chunk_tx, chunk_rx) = mpsc::channel(WRITE_QUEUE);
    let (event_tx, mut events) = mpsc::unbounded_channel();
    let task = tokio::task::spawn_blocking(move || writer.run(chunk_rx, event_tx));
    // Extra streams may join this round until it ends; their events are forwarded to them. The round is open
    // while this session takes chunks: its queue handle and the join point close together.
    let opening = ctx.joins.open(path.as_str(), manifest.clone(), chunk_tx.clone());
    let routes = opening.routes.clone();
    let mut round = Some((chunk_tx, opening));
    // Only now: a client that hears the Need may join at once.
    let need = Message::Need(Need { ranges: missing_ranges });
    let mut result = send_within(conn, &need, ctx.idle_timeout, "sending Need").await;
    if result.is_err() {
        round = None;
    }
    loop {
        let chunk_tx = round.as_ref().map(|(tx, _)| tx);
        let step = tokio::select! {
            // Biased: a durable batch's Ack goes out before the next chunk is read (the sender's delay
            // sample, and its window, hold no time this loop spent reading).
            biased;
            _ = superseded.cancelled(), if chunk_tx.is_some() => Err(TransferError::Superseded),
            _ = shutdown.cancelled(), if chunk_tx.is_some() => Err(TransferError::ShuttingDown),
            event = events.recv() => match event.map(|e| join::route(&routes, e)) {
                None => break, // the writer has finished
                Some(None) => Ok(Flow::Continue), // forwarded to a joined stream
                Some(Some(event)) if result.is_ok() => answer_writer(conn, ctx, event).await,
                Some(Some(_)) => Ok(Flow::Continue), // already failing: only drain
            },
            msg = next_message(conn, ctx.idle_timeout, "receiving chunks"), if chunk_tx.is_some() => match msg {
                Ok(msg) => take_message(conn, ctx, &manifest, chunk_tx.expect("guarded"), msg).await,
                Err(e) => Err(e),
            },
        };
        match step {
            Ok(Flow::Continue) => {}
            Ok(Flow::EndOfRound) => round = None,
            Err(e) => {
                result = result.and(Err(e));
                round = None;
            }
        }
    }
    let writer = task.await.expect("chunk writer panicked");
    let writer = settled_if_ended(writer, &result).await;
    (writer, result)
}

/// After a round that ended the session (`result` failed), lets the writer record its digest state for the resume
/// ([`ChunkWriter::settle_after_session`]); a round that goes on leaves it as it is.
pub(super) async fn settled_if_ended<T>(mut writer: ChunkWriter, result: &Result<T, TransferError>) -> ChunkWriter {
    if result.is_ok() {
        return writer;
    }
    tokio::task::spawn_blocking(move || {
        writer.settle_after_session();
        writer
    })
    .await
    .expect("settling the chunk writer panicked")
}

/// What the reception loop does after one step.
pub(super) enum Flow {
    /// Keep receiving.
    Continue,
    /// Stop taking chunks (Commit arrived, or the writer stopped); drain the writer.
    EndOfRound,
}

/// Tells the sender what the writer did: Ack for durable chunks, Need for rejected ones.
pub(super) async fn answer_writer<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    ctx: &ReceiverContext,
    event: WriterEvent,
) -> Result<Flow, TransferError> {
    let reply = match event {
        WriterEvent::Durable { ranges, .. } => Message::Ack(Ack { ranges }),
        WriterEvent::Rejected { index, .. } => Message::Need(Need {
            ranges: vec![IndexRange { start: index, count: 1 }],
        }),
        WriterEvent::Failed(e) => return Err(e),
    };
    send_within(conn, &reply, ctx.idle_timeout, "acknowledging chunks").await?;
    Ok(Flow::Continue)
}

/// Handles one message from the sender while chunks arrive. A chunk is queued for the writer once it holds its
/// share of the server-wide queue budget, so many connections cannot pile up unbounded chunk memory.
async fn take_message<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    ctx: &ReceiverContext,
    manifest: &Manifest,
    queue: &mpsc::Sender<QueuedChunk>,
    msg: Message,
) -> Result<Flow, TransferError> {
    match msg {
        Message::Chunk(chunk) => Ok(if queue_chunk(ctx, manifest, queue, chunk, 0).await? {
            Flow::Continue
        } else {
            Flow::EndOfRound // the writer stopped; its Failed event follows
        }),
        Message::Commit => Ok(Flow::EndOfRound),
        Message::Abandon(reason) => Err(TransferError::Abandoned(reason)),
        Message::Ping(nonce) => {
            answer_ping(conn, nonce, ctx.idle_timeout).await?;
            Ok(Flow::Continue)
        }
        other => Err(TransferError::Unexpected {
            got: other.name(),
            state: "receiving chunks",
        }),
    }
}

/// Checks a chunk against the manifest and queues it for the writer once it holds its share of the server-wide
/// queue budget, so many connections cannot pile up unbounded chunk memory. False if the writer has stopped.
pub(crate) async fn queue_chunk(
    ctx: &ReceiverContext,
    manifest: &Manifest,
    queue: &mpsc::Sender<QueuedChunk>,
    chunk: Chunk,
    stream: u32,
) -> Result<bool, TransferError> {
    let entry = manifest.chunk(chunk.index).ok_or_else(|| {
        TransferError::refused(
            ErrorCode::UnexpectedMessage,
            format!("chunk {} is not in the manifest", chunk.index),
        )
    })?;
    if chunk.data.len() != entry.len as usize {
        let why = format!(
            "chunk {} has {} bytes, the manifest says {}",
            chunk.index,
            chunk.data.len(),
            entry.len
        );
        return Err(TransferError::refused(ErrorCode::UnexpectedMessage, why));
    }
    let budget = ctx
        .queue_budget
        .clone()
        .acquire_many_owned(entry.len.div_ceil(1024))
        .await;
    let budget = budget.map_err(|_| TransferError::ShuttingDown)?;
    let queued = QueuedChunk {
        chunk,
        stream,
        _budget: budget,
    };
    Ok(queue.send(queued).await.is_ok())
}

/// Waits for the Commit of an offer that needs nothing, giving way to a takeover or a shutdown.
async fn expect_commit<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    ctx: &ReceiverContext,
    superseded: &CancellationToken,
    shutdown: &CancellationToken,
) -> Result<(), TransferError> {
    loop {
        let msg = tokio::select! {
            _ = superseded.cancelled() => return Err(TransferError::Superseded),
            _ = shutdown.cancelled() => return Err(TransferError::ShuttingDown),
            msg = next_message(conn, ctx.idle_timeout, "waiting for Commit") => msg?,
        };
        match msg {
            Message::Commit => return Ok(()),
            Message::Abandon(reason) => return Err(TransferError::Abandoned(reason)),
            Message::Ping(nonce) => answer_ping(conn, nonce, ctx.idle_timeout).await?,
            other => {
                return Err(TransferError::Unexpected {
                    got: other.name(),
                    state: "waiting for Commit",
                })
            }
        }
    }
}

/// Commits on a blocking thread while pinging the sender, since verifying a large file can take a while.
pub(super) async fn commit_with_keepalive<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    ctx: &ReceiverContext,
    writer: ChunkWriter,
    path: RemotePath,
) -> Result<CommitOutcome, TransferError> {
    let volume = ctx.volume.clone();
    with_keepalive(conn, ctx.idle_timeout, move || commit(writer, &*volume, &path)).await
}

pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TransferError> + Send + 'static,
) -> Result<T, TransferError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| TransferError::Storage(std::io::Error::other(e)))?
}

/// Whether a transfer to `key` is open (recorded in the store, or a partial on the volume): its next offer is a
/// resume. Blocking.
pub(super) fn transfer_open(ctx: &ReceiverContext, key: &str) -> Result<bool, TransferError> {
    Ok(ctx.store.transfer(key)?.is_some() || ctx.volume.partial_len(key)?.is_some())
}

/// Decides what to do with an Offer: already present, resume, carry chunks over from an older offer, or start;
/// keeps `kept` for the follower if the offer is written in place over the file it describes.
pub(super) fn prepare_with(
    ctx: &ReceiverContext,
    path: &RemotePath,
    manifest: Arc<Manifest>,
    kept: Option<KeptPrefix>,
) -> Result<Plan, TransferError> {
    let key = path.as_str();
    let volume = &*ctx.volume;
    // Before a byte is sent: a destination this receiver may not write would fail only at the commit, after the
    // whole upload (proto-spec.md §9, StorageIo).
    volume.prepare_destination(path)?;
    // A journal sealed before a crash is applied (and its file recorded) before anything else looks at the path.
    super::in_place::recover(ctx, path)?;
    let store = &ctx.store;
    let full_reuse = ctx.policy.reuse == Reuse::Full;
    // A shared store says itself what is committed (another server, or this one before it lost its state).
    if volume.committed_manifest_id(path)? == Some(manifest.id()) {
        return Ok(Plan::AlreadyPresent(present(&manifest)));
    }
    let record = store.transfer(key)?;
    if record.is_none() {
        if let Some(done) = already_present(store, key, volume, path, &manifest)? {
            return Ok(Plan::AlreadyPresent(done));
        }
    }
    let partial_len = volume.partial_len(key)?;
    let mut progress = store.progress(key)?.unwrap_or_default();
    // On a shared store the volume's durable set is the truth (sled is a cache that may still name a chunk a gc
    // deleted and a commit retracted); else the union with what the volume holds durable beyond this store's
    // records (another server's journal).
    let authoritative = volume.durable_is_authoritative();
    let mut received = match (&record, partial_len) {
        (Some(old), Some(_)) if !authoritative => carried_over(old, &progress, &manifest),
        _ => ChunkSet::new(manifest.chunk_count()),
    };
    let elsewhere = volume.durable_elsewhere(path, &manifest, full_reuse)?;
    for index in (0..elsewhere.len()).filter(|&i| elsewhere.contains(i)) {
        received.insert(index);
    }
    if record.is_some() && received.present() > 0 {
        tracing::info!(path = key, kept = received.present(), "resuming transfer");
    }
    let bitmap = received.to_bytes();
    let same_offer = record.as_ref().is_some_and(|r| r.manifest.id() == manifest.id()) && progress.received == bitmap;
    // A plain resume leaves the records as they are: rewriting a large manifest on every reconnect would cost
    // work proportional to the file, not to what is missing. Anything else is a new record, admitted against the
    // namespace's quota and limits under its lock, so that offers arriving together are counted one by one.
    let mut seed = None;
    let open = || -> Result<_, TransferError> {
        let in_place = match partial_len {
            None => super::in_place::open_in_place(ctx, path, &manifest)?,
            Some(_) => None,
        };
        match in_place {
            Some(file) => {
                // The committed file now is the one hashed: the partial's base, opened just now.
                let base = volume.stat_final(path);
                seed = kept
                    .filter(|kept| base.is_some_and(|now| kept.describes(&now)))
                    .map(KeptPrefix::into_head_start);
                Ok(file)
            }
            None => Ok(volume.open_partial_for(key, &manifest, full_reuse, partial_len.is_some())?),
        }
    };
    let file = if same_offer {
        open()?
    } else {
        progress.received = bitmap;
        let created = record.as_ref().map_or_else(now_secs, |r| r.created);
        let partial_name = volume.partial_location(key);
        // Borrowed: a manifest of 500,000 chunks is not copied just to be encoded.
        let new_record = TransferRecordRef {
            manifest: &manifest,
            partial: &partial_name,
            created,
        };
        let mut turn = ctx.admission.lock();
        let new = NewTransfer {
            path: key,
            size: manifest.size,
            record_bytes: crate::record::encoded_record_len(&new_record),
        };
        if let Err(refused) = admit_offer(ctx, path, &manifest, &new, &mut turn) {
            volume.refused(key);
            return Err(refused);
        }
        let file = open()?;
        store.begin_encoded(key, new_record, &crate::record::encode_record(&new_record), &progress)?;
        file
    };
    let writer = ChunkWriter::new(
        key.to_string(),
        file,
        manifest,
        received,
        progress,
        store.clone(),
        ctx.stats.clone(),
        ctx.sync_batch,
    );
    Ok(Plan::Receive(Box::new(Prepared {
        writer,
        fresh: record.is_none(),
        kept: seed,
    })))
}

/// Admits the transfer `new` of `manifest` to `path` against the namespace's usage: as the volume records it
/// when it does (a shared store: every server's files and open transfers), else as this receiver's store does.
/// Call with the namespace's admission lock held (`turn`). Blocking.
fn admit_offer(
    ctx: &ReceiverContext,
    path: &RemotePath,
    manifest: &Manifest,
    new: &NewTransfer<'_>,
    turn: &mut super::quota::Counted,
) -> Result<(), TransferError> {
    if ctx.quota.is_none() && ctx.limits == super::quota::NamespaceLimits::UNLIMITED {
        return Ok(());
    }
    let with_committed = ctx.quota.is_some() || ctx.limits.max_entries != u64::MAX;
    match ctx.volume.shared_usage(path, &manifest.id(), with_committed)? {
        Some(shared) => admit_shared(&ctx.store, &shared, ctx.quota, &ctx.limits, new, turn),
        None => admit(&ctx.store, ctx.quota, &ctx.limits, new, turn),
    }
}

/// The chunks of `manifest` already in the partial: all received ones if the offer is unchanged, else those whose
/// offset, length and hash equal a received chunk of the old offer (they sit at the same place in the partial).
fn carried_over(old: &TransferRecord, progress: &Progress, manifest: &Manifest) -> ChunkSet {
    let mut set = ChunkSet::new(manifest.chunk_count());
    let Some(old_set) = ChunkSet::from_bytes(old.manifest.chunk_count(), &progress.received) else {
        return set;
    };
    for (index, chunk) in manifest.chunks.iter().enumerate() {
        if index_of_same(&old.manifest.chunks, chunk).is_some_and(|at| old_set.contains(at as u32)) {
            set.insert(index as u32);
        }
    }
    set
}

/// The Committed reply if `path` on `volume` still holds exactly the file `manifest` describes, as committed
/// earlier.
fn already_present(
    store: &ReceiverStore,
    key: &str,
    volume: &dyn Volume,
    path: &RemotePath,
    manifest: &Manifest,
) -> Result<Option<Committed>, TransferError> {
    let Some(done) = store.committed(key)? else {
        return Ok(None);
    };
    let Some(now) = volume.stat_final(path) else {
        return Ok(None);
    };
    let unchanged = done.manifest_id == manifest.id()
        && now.is_file
        && now.len == done.size
        && now.ino == done.inode
        && now.mtime == done.mtime;
    Ok(unchanged.then(|| present(manifest)))
}

/// The answer to an offer of the file already committed.
fn present(manifest: &Manifest) -> Committed {
    Committed {
        size: manifest.size,
        digest: manifest.digest,
        received_bytes: 0,
        rejected_chunks: 0,
        reused_bytes: 0,
        already_present: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::manifest_of;

    #[test]
    fn only_chunks_equal_in_place_and_received_are_carried_over() {
        let old_manifest = manifest_of(&[10, 10, 10, 10]);
        let mut received = ChunkSet::new(4);
        for index in [0, 1, 3] {
            received.insert(index);
        }
        let old = TransferRecord {
            manifest: old_manifest.clone(),
            partial: String::new(),
            created: 0,
        };
        let progress = Progress {
            received: received.to_bytes(),
            ..Progress::default()
        };
        let mut changed = old_manifest.clone();
        changed.chunks[1].hash[0] ^= 1; // received, but its content changed
        changed.chunks.push(ChunkEntry {
            offset: 40,
            len: 5,
            hash: [9; 32],
        });
        changed.size = 45;
        let kept = carried_over(&old, &progress, &changed);
        let kept: Vec<u32> = (0..kept.len()).filter(|&i| kept.contains(i)).collect();
        assert_eq!(
            kept,
            vec![0, 3],
            "chunk 1 changed, chunk 2 was never received, chunk 4 is new"
        );

        let mut shifted = manifest_of(&[5, 10, 10, 10, 5]);
        shifted.chunks[1].hash = old_manifest.chunks[0].hash; // same bytes at another offset: not in place
        assert_eq!(carried_over(&old, &progress, &shifted).present(), 0);
    }
}
