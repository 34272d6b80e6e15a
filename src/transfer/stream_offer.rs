//! The receiver's side of a streamed offer (proto-spec.md §4, "Streamed offer", protocol version 6): admit the
//! file on `OfferStart`, check each `ManifestPiece` as it arrives ([`StreamedManifest`]), answer it with a `Need`
//! for its missing chunks, take those chunks while later pieces are still on their way, and commit as for a whole
//! offer once `ManifestEnd` gave the digest.
//!
//! Guarantees, beside those of [`super::receiver`]: a chunk is taken only for an announced index (any other is
//! `UnexpectedMessage`), and a piece is refused (`BadManifest`) before any of its chunks could be asked for, so
//! nothing is written for a part of a manifest that breaks §5. The transfer record holds the pieces received so
//! far, written before their `Need` (and so before any of their chunks is marked): after a crash or a cut, the
//! next offer of the path keeps every durable chunk whose offset, length and hash it offers again. Where the
//! destination already holds a file, whose chunks local reuse could fill, the receiver instead gathers the whole
//! manifest and serves it as a whole `Offer` (the deferred answer of §4).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::kept_prefix::KeptPrefixHasher;
use super::quota::{admit, NewTransfer};
use super::receiver::{
    answer_writer, blocking, commit_rounds, queue_chunk, receive_gathered, settled_if_ended, too_large, transfer_open,
    ReceiverContext, Reuse, WRITE_QUEUE,
};
use super::reuse::PreviousVersion;
use super::writer::ChunkWriter;
use super::{answer_ping, next_message, send_within, with_keepalive, TransferError};
use crate::manifest::{index_of_same, ChunkEntry, Chunking, Hash, Manifest};
use crate::manifest_stream::{PieceError, StreamedManifest};
use crate::path::RemotePath;
use crate::ranges::{encode_runs, ChunkSet, IndexRange};
use crate::store::{now_secs, TransferRecordRef};
use crate::wire::{Ack, Committed, Connection, ErrorCode, ManifestEnd, ManifestPiece, Message, Need, OfferStart};

/// A refused piece or end.
fn bad(e: PieceError) -> TransferError {
    TransferError::refused(ErrorCode::BadManifest, e)
}

/// Serves a streamed offer for `path` to completion (Committed sent).
pub async fn receive_streamed<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    ctx: &ReceiverContext,
    path: RemotePath,
    start: OfferStart,
    stop: &CancellationToken,
) -> Result<Committed, TransferError> {
    if start.size > ctx.max_file_size {
        return Err(too_large(start.size, ctx.max_file_size));
    }
    let mode = start.mode & ctx.policy.mode_mask;
    let streamed =
        StreamedManifest::start(start.size, start.chunking, start.mtime, mode, ctx.max_manifest_chunks).map_err(bad)?;
    let occupied = {
        let (volume, path) = (ctx.volume.clone(), path.clone());
        blocking(move || Ok(volume.needs_whole_manifest() || volume.stat_final(&path).is_some())).await?
    };
    if !occupied {
        return stream(conn, ctx, path, streamed, None, stop).await;
    }
    let previous = {
        let (ctx, path) = (ctx.clone(), path.clone());
        blocking(move || copy_source(&ctx, &path, start.chunking)).await?
    };
    deferred(conn, ctx, path, streamed, previous, stop).await
}

/// Serves a streamed offer piece by piece: opens the transfer, then runs its rounds, taking first the pieces
/// already read (`first`, with the previous version to copy from) if given.
async fn stream<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    ctx: &ReceiverContext,
    path: RemotePath,
    streamed: StreamedManifest,
    first: Option<(Vec<ManifestPiece>, PreviousVersion)>,
    stop: &CancellationToken,
) -> Result<Committed, TransferError> {
    let (size, mtime) = (streamed.so_far().size, streamed.so_far().mtime);
    let identity = super::claims::file_identity(size, mtime);
    let claim = ctx
        .claims
        .claim_as(path.as_str(), (identity, identity), Duration::from_secs(10))
        .await?;
    let (first, previous) = first.unzip();
    let first = first.unwrap_or_default();
    let session = {
        let (ctx, path) = (ctx.clone(), path.clone());
        blocking(move || open_streamed(&ctx, &path, streamed, previous)).await?
    };
    ctx.stats.meter.file(path.as_str(), size, 0);
    tracing::info!(path = %path, size, copying = session.previous.is_some(), "offer accepted (streamed)");
    let committed = stream_rounds(conn, ctx, session, first, &path, &claim.superseded, stop).await?;
    let reply = Message::Committed(committed.clone());
    send_within(conn, &reply, ctx.idle_timeout, "sending Committed").await?;
    Ok(committed)
}

/// The previous version at an occupied destination that a streamed offer may copy chunks from as its pieces
/// arrive: only on a local volume, for a sender allowed full reuse, with no transfer to the path open (a resume
/// gathers the manifest, as before), and only if the file is there unchanged since its commit with the offer's
/// chunking. Runs an interrupted in-place apply's recovery first, as any offer for the path does. Blocking.
fn copy_source(
    ctx: &ReceiverContext,
    path: &RemotePath,
    chunking: Chunking,
) -> Result<Option<PreviousVersion>, TransferError> {
    let volume = &*ctx.volume;
    if volume.needs_whole_manifest() || ctx.policy.reuse != Reuse::Full {
        return Ok(None);
    }
    super::in_place::recover(ctx, path)?;
    if transfer_open(ctx, path.as_str())? {
        return Ok(None);
    }
    Ok(PreviousVersion::open(&ctx.store, volume, path, chunking))
}

/// Announced bytes that decide, at the latest, whether an offer over an older version streams.
const DECIDE_WITHIN: u64 = 64 * 1024 * 1024;
/// Bytes moved (or kept in place) that decide it earlier.
const DECIDING_BYTES: u64 = 16 * 1024 * 1024;

/// What the first pieces of an offer over an older version show, to choose between gathering the whole manifest
/// (an in-place write stays possible) and streaming while copying from the previous version.
#[derive(Default)]
struct Evidence {
    /// Bytes the previous version holds at the same offset with the same length and hash.
    kept: u64,
    /// Bytes it holds, elsewhere.
    moved: u64,
    /// Bytes announced.
    announced: u64,
    /// Chunks announced.
    chunks: usize,
}

/// What [`Evidence`] says so far.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Serve it piece by piece, copying from the previous version.
    Stream,
    /// Gather the whole manifest (the deferred answer).
    Gather,
    /// Read another piece first.
    Undecided,
}

impl Evidence {
    fn add(&mut self, previous: &PreviousVersion, chunks: &[ChunkEntry]) {
        let (kept, moved) = previous.placement(chunks);
        self.kept += kept;
        self.moved += moved;
        self.announced += chunks.iter().map(|chunk| u64::from(chunk.len)).sum::<u64>();
        self.chunks += chunks.len();
    }

    /// Streams once [`DECIDING_BYTES`] of moved chunks came with less than half as much kept in place (an
    /// insertion near the start moves everything after it); gathers once as much is kept in place (an edit an
    /// in-place write may serve, decided on the whole manifest), or after [`DECIDE_WITHIN`] announced bytes (or a
    /// piece's worth of chunks) without either. With in-place writes off, any chunk the previous version holds
    /// decides for streaming.
    fn verdict(&self, in_place: bool) -> Verdict {
        let lent_anything = self.kept + self.moved > 0;
        let mostly_moved = self.moved >= DECIDING_BYTES && self.kept.saturating_mul(2) < self.moved;
        if (!in_place && lent_anything) || mostly_moved {
            Verdict::Stream
        } else if self.kept >= DECIDING_BYTES
            || self.announced >= DECIDE_WITHIN
            || self.chunks >= crate::manifest_stream::MAX_PIECE_CHUNKS
        {
            Verdict::Gather
        } else {
            Verdict::Undecided
        }
    }
}

/// The deferred answer: gathers every piece, then echoes `ManifestEnd` and serves the whole manifest like an
/// `Offer` (whose first `Need` follows the echo); unless the first pieces show the file's chunks moved (an
/// insertion near its start) and `previous` can lend them: then the offer is served piece by piece after all,
/// copying as it goes ([`Evidence`]).
async fn deferred<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    ctx: &ReceiverContext,
    path: RemotePath,
    mut streamed: StreamedManifest,
    mut previous: Option<PreviousVersion>,
    stop: &CancellationToken,
) -> Result<Committed, TransferError> {
    let mut evidence = Evidence::default();
    // Pieces read while undecided, not yet checked (a piece's checks run when it is added or taken).
    let mut undecided: Vec<ManifestPiece> = Vec::new();
    // Hashes the committed file as far as the pieces keep it, for an in-place write's follower.
    let mut kept = {
        let (ctx, path, size) = (ctx.clone(), path.clone(), streamed.so_far().size);
        blocking(move || Ok(KeptPrefixHasher::start(&ctx, &path, size))).await?
    };
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => return Err(TransferError::ShuttingDown),
            msg = next_message(conn, ctx.idle_timeout, "receiving a streamed manifest") => msg?,
        };
        match msg {
            Message::ManifestPiece(piece) => {
                if let Some(kept) = &kept {
                    kept.add(&piece.chunks);
                }
                let Some(lender) = &previous else {
                    streamed.add(piece.first_index, &piece.chunks).map_err(bad)?;
                    continue;
                };
                evidence.add(lender, &piece.chunks);
                undecided.push(piece);
                match evidence.verdict(ctx.policy.in_place) {
                    Verdict::Stream => {
                        // A new copy, not an in-place write: nothing to hash ahead.
                        drop(kept.take());
                        let lender = previous.take().expect("checked above");
                        return stream(conn, ctx, path, streamed, Some((undecided, lender)), stop).await;
                    }
                    Verdict::Gather => {
                        previous = None;
                        for piece in undecided.drain(..) {
                            streamed.add(piece.first_index, &piece.chunks).map_err(bad)?;
                        }
                    }
                    Verdict::Undecided => {}
                }
            }
            Message::ManifestEnd(end) => {
                for piece in undecided.drain(..) {
                    streamed.add(piece.first_index, &piece.chunks).map_err(bad)?;
                }
                let manifest = streamed.finish(end.digest).map_err(bad)?;
                let echo = Message::ManifestEnd(end);
                send_within(conn, &echo, ctx.idle_timeout, "echoing ManifestEnd").await?;
                let kept = match kept {
                    Some(hasher) => blocking(move || Ok(hasher.finish())).await?,
                    None => None,
                };
                return receive_gathered(conn, ctx, path, manifest, kept, stop).await;
            }
            Message::Ping(nonce) => answer_ping(conn, nonce, ctx.idle_timeout).await?,
            Message::Chunk(chunk) => {
                let why = format!("chunk {} is not in the manifest announced so far", chunk.index);
                return Err(TransferError::refused(ErrorCode::UnexpectedMessage, why));
            }
            other => {
                return Err(TransferError::Unexpected {
                    got: other.name(),
                    state: "receiving a streamed manifest",
                })
            }
        }
    }
}

/// An open streamed transfer between rounds.
struct Streaming {
    writer: ChunkWriter,
    streamed: StreamedManifest,
    /// The manifest and durable chunks of the transfer this offer replaced, for carrying chunks over piece by piece.
    old: Option<(Manifest, ChunkSet)>,
    created: u64,
    /// The first announced chunk of each hash: later copies are filled from it, never asked for.
    first_of: HashMap<Hash, u32>,
    /// The destination's previous version, which lends every chunk whose hash it holds (never asked for).
    previous: Option<PreviousVersion>,
    /// Chunks announced so far to copy from `previous` (ascending), not yet copied.
    to_copy: Vec<u32>,
    /// Chunks asked for (ascending), until seen written: a copy waits behind the first of them still missing, so
    /// that the digest follower hashes the copied bytes from memory, in file order.
    asked: Vec<u32>,
}

/// Opens the transfer of a streamed offer: checks and creates the destination's directories, admits the file
/// against the namespace's quota, opens the partial and records the (empty) manifest. Blocking.
fn open_streamed(
    ctx: &ReceiverContext,
    path: &RemotePath,
    streamed: StreamedManifest,
    previous: Option<PreviousVersion>,
) -> Result<Streaming, TransferError> {
    let key = path.as_str();
    let volume = &*ctx.volume;
    // Before a byte is sent: a destination this receiver may not write would fail only at the commit, after the
    // whole upload (proto-spec.md §9, StorageIo).
    volume.prepare_destination(path)?;
    let store = &ctx.store;
    let record = store.transfer(key)?;
    let partial_len = volume.partial_len(key)?;
    let mut progress = store.progress(key)?.unwrap_or_default();
    let old = match (record.as_ref(), partial_len) {
        (Some(old), Some(_)) => {
            ChunkSet::from_bytes(old.manifest.chunk_count(), &progress.received).map(|set| (old.manifest.clone(), set))
        }
        _ => None,
    };
    let created = record.as_ref().map_or_else(now_secs, |r| r.created);
    progress.received = ChunkSet::new(0).to_bytes();
    let manifest = Arc::new(streamed.so_far().clone());
    let file = volume.open_partial(key, manifest.size, partial_len.is_some())?;
    let writer = ChunkWriter::new(
        key.to_string(),
        file,
        manifest,
        ChunkSet::new(0),
        progress,
        store.clone(),
        ctx.stats.clone(),
        ctx.sync_batch,
    );
    let mut session = Streaming {
        writer,
        streamed,
        old,
        created,
        first_of: HashMap::new(),
        previous,
        to_copy: Vec::new(),
        asked: Vec::new(),
    };
    record_so_far(ctx, &mut session)?;
    if let Some((_, set)) = &session.old {
        tracing::info!(path = key, durable = set.present(), "resuming a streamed transfer");
    }
    Ok(session)
}

/// Writes the transfer record with every piece so far and the received bitmap, admitted against the namespace's
/// quota and limits (the record grows with each piece). Blocking.
fn record_so_far(ctx: &ReceiverContext, session: &mut Streaming) -> Result<(), TransferError> {
    let writer = &mut session.writer;
    writer.progress.received = writer.received.to_bytes();
    let partial_name = ctx.volume.partial_location(&writer.key);
    let record = TransferRecordRef {
        manifest: &writer.manifest,
        partial: &partial_name,
        created: session.created,
    };
    let encoded = crate::record::encode_record(&record);
    let mut turn = ctx.admission.lock();
    let new = NewTransfer {
        path: &writer.key,
        size: writer.manifest.size,
        record_bytes: encoded.len() as u64,
    };
    admit(&ctx.store, ctx.quota, &ctx.limits, &new, &mut turn)?;
    ctx.store
        .begin_encoded(&writer.key, record, &encoded, &writer.progress)?;
    Ok(())
}

/// What taking a piece answers: the chunks to ask for, and the chunks of earlier rounds it made durable on the way
/// (to acknowledge before the `Need`).
struct PieceTaken {
    needed: Vec<IndexRange>,
    durable: Vec<IndexRange>,
}

/// Takes one piece: checks it, carries over the chunks of the replaced transfer it offers again, records it, and
/// returns the chunks to ask for. Blocking; the writer is paused between rounds, its batch and syncs running on,
/// and is drained here only if the piece repeats a chunk already written (the copy is filled from it).
fn take_piece(
    ctx: &ReceiverContext,
    session: &mut Streaming,
    piece: &ManifestPiece,
    path: &RemotePath,
) -> Result<PieceTaken, TransferError> {
    let mut durable = Vec::new();
    let repeats_written = piece.chunks.iter().any(|chunk| {
        session
            .first_of
            .get(&chunk.hash)
            .is_some_and(|&first| session.writer.is_written(first))
    });
    if repeats_written {
        // The first copies must be durable before copies are filled from them; what this makes durable came over
        // the wire in earlier rounds and is acknowledged (the copies filled below never are).
        persist_received(&mut session.writer, &mut durable)?;
    }
    let added = session.streamed.add(piece.first_index, &piece.chunks).map_err(bad)?;
    let manifest = Arc::new(session.streamed.so_far().clone());
    let carried: Vec<u32> = match &session.old {
        Some((old, set)) => added
            .clone()
            .filter(|&index| {
                let chunk = &manifest.chunks[index as usize];
                index_of_same(&old.chunks, chunk).is_some_and(|at| set.contains(at as u32))
            })
            .collect(),
        None => Vec::new(),
    };
    session.writer.extend(manifest, &carried);
    record_so_far(ctx, session)?;
    let mut needed = Vec::new();
    for index in added {
        let hash = session.writer.manifest.chunks[index as usize].hash;
        let first = *session.first_of.entry(hash).or_insert(index);
        let lent = session.previous.as_ref().is_some_and(|previous| previous.holds(&hash));
        if lent && !session.writer.received.contains(index) {
            session.to_copy.push(index);
            continue;
        }
        if session.writer.received.contains(index) || first == index {
            if !session.writer.received.contains(index) {
                needed.push(index);
            }
            continue;
        }
        fill_repeat(&mut session.writer, first, index)?;
    }
    if repeats_written {
        // Copies filled from durable chunks: synced and marked now, never acknowledged (the sender never sent them).
        session.writer.persist_batch()?;
    }
    session.asked.extend(&needed);
    let unlent = copy_ready(session, path, &mut durable)?;
    session.asked.extend(&unlent);
    session.asked.sort_unstable();
    needed.extend(unlent);
    needed.sort_unstable();
    Ok(PieceTaken {
        needed: encode_runs(needed),
        durable,
    })
}

/// Bytes copied between two rounds at most (the connection is not read meanwhile; what is left waits for the next
/// piece, or for Commit, where the sender is pinged while it waits).
const COPY_STEP: u64 = 256 * 1024 * 1024;

/// Copies the chunks to copy that lie before every chunk still awaited from the sender (up to [`COPY_STEP`]
/// bytes), after making the batch durable (its received chunks' ranges go into `durable`, to acknowledge).
/// Returns the chunks the previous version no longer held, to ask for. Blocking.
fn copy_ready(
    session: &mut Streaming,
    path: &RemotePath,
    durable: &mut Vec<IndexRange>,
) -> Result<Vec<u32>, TransferError> {
    let Some(previous) = &session.previous else {
        return Ok(Vec::new());
    };
    let writer = &mut session.writer;
    session.asked.retain(|&index| !writer.is_written(index));
    let before = session.asked.first().copied().unwrap_or(u32::MAX);
    let mut budget = COPY_STEP;
    let ready = session
        .to_copy
        .iter()
        .take_while(|&&index| {
            let fits = index < before && budget > 0;
            budget = budget.saturating_sub(writer.manifest.chunks[index as usize].len.into());
            fits
        })
        .count();
    if ready == 0 {
        return Ok(Vec::new());
    }
    // The copies are made durable apart from received chunks, which alone are acknowledged.
    persist_received(writer, durable)?;
    let copying: Vec<u32> = session.to_copy.drain(..ready).collect();
    previous.copy(writer, &copying, path)
}

/// Makes the writer's batch durable and adds the ranges of this connection's received chunks in it (stream 0) to
/// `durable`, to acknowledge; done before local copies are written, which are made durable apart and never
/// acknowledged. Blocking.
fn persist_received(writer: &mut ChunkWriter, durable: &mut Vec<IndexRange>) -> Result<(), TransferError> {
    for (stream, ranges) in writer.persist_batch()? {
        if stream == 0 {
            durable.extend(ranges);
        }
    }
    Ok(())
}

/// Chunk `copy` repeats chunk `first` (same hash, announced earlier): written from the partial now if `first` is
/// durable, else when `first` arrives (proto-spec.md §4, "Repeats within an offer"). Blocking.
fn fill_repeat(writer: &mut ChunkWriter, first: u32, copy: u32) -> Result<(), TransferError> {
    if !writer.received.contains(first) {
        writer.expect_repeat(first, copy);
        return Ok(());
    }
    let entry = writer.manifest.chunks[first as usize];
    let mut data = vec![0; entry.len as usize];
    writer
        .file
        .read_exact_at(&mut data, entry.offset)
        .map_err(TransferError::Storage)?;
    if !writer.write_local(copy, &data, true, None)? {
        // The durable first copy no longer verifies (damaged at rest): the commit's check finds it; ask later.
        writer.expect_repeat(first, copy);
    }
    Ok(())
}

/// How a round of a streamed offer ended.
enum RoundEnd {
    /// The next piece arrived.
    Piece(ManifestPiece),
    /// The manifest ended.
    End(ManifestEnd),
    /// The sender committed.
    Commit,
}

/// Runs the pieces of a streamed offer, one round each, then the commit rounds of §4.
async fn stream_rounds<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    ctx: &ReceiverContext,
    mut session: Streaming,
    first: Vec<ManifestPiece>,
    path: &RemotePath,
    superseded: &CancellationToken,
    stop: &CancellationToken,
) -> Result<Committed, TransferError> {
    let mut need = None;
    let mut ended = false;
    let mut first = std::collections::VecDeque::from(first);
    loop {
        let end = match first.pop_front() {
            Some(piece) => {
                // Each piece read before the transfer opened gets its own Need, in order.
                if let Some(ranges) = need.take() {
                    let answer = Message::Need(Need { ranges });
                    if let Err(e) = send_within(conn, &answer, ctx.idle_timeout, "sending Need").await {
                        let failed = Err(e);
                        settled_if_ended(session.writer, &failed).await;
                        return failed;
                    }
                }
                Ok(RoundEnd::Piece(piece))
            }
            None => {
                let (writer, end) = round(conn, ctx, session.writer, need.take(), superseded, stop).await;
                session.writer = writer;
                end
            }
        };
        // A round that failed has already settled its writer.
        let next = match end? {
            RoundEnd::Piece(piece) if !ended => {
                let (ctx2, path2, mut moved) = (ctx.clone(), path.clone(), session);
                let (back, taken) = blocking(move || {
                    let taken = take_piece(&ctx2, &mut moved, &piece, &path2);
                    Ok((moved, taken))
                })
                .await?;
                session = back;
                match taken {
                    Ok(taken) => acknowledge_then_need(conn, ctx, taken).await.map(Some),
                    Err(e) => Err(e),
                }
            }
            other => manifest_or_commit(conn, ctx, &mut session, other, &mut ended).await,
        };
        match next {
            Ok(Some(ranges)) => need = Some(ranges),
            Ok(None) => break,
            Err(e) => {
                // The writer may have paused with syncs running: what it wrote is made durable for the resume.
                let failed = Err(e);
                settled_if_ended(session.writer, &failed).await;
                return failed;
            }
        }
    }
    let writer = copy_the_rest(conn, ctx, session, path).await?;
    commit_rounds(conn, ctx, writer, path, superseded, stop).await
}

/// At Commit: copies whatever is left to copy from the previous version (every chunk the sender was to send has
/// come, or is asked for again by the commit rounds), pinging the sender meanwhile; what the previous version no
/// longer held stays missing, for the commit rounds to ask for.
async fn copy_the_rest<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    ctx: &ReceiverContext,
    session: Streaming,
    path: &RemotePath,
) -> Result<ChunkWriter, TransferError> {
    let Streaming {
        mut writer,
        previous,
        to_copy,
        ..
    } = session;
    let Some(previous) = previous.filter(|_| !to_copy.is_empty()) else {
        return Ok(writer);
    };
    let path = path.clone();
    with_keepalive(conn, ctx.idle_timeout, move || {
        previous.copy(&mut writer, &to_copy, &path)?;
        Ok(writer)
    })
    .await
}

/// Acknowledges what taking a piece made durable, then returns the piece's `Need`.
async fn acknowledge_then_need<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    ctx: &ReceiverContext,
    taken: PieceTaken,
) -> Result<Vec<IndexRange>, TransferError> {
    if !taken.durable.is_empty() {
        let ack = Message::Ack(Ack { ranges: taken.durable });
        send_within(conn, &ack, ctx.idle_timeout, "acknowledging chunks").await?;
    }
    Ok(taken.needed)
}

/// A round ended at anything but a piece to take: the manifest's end (echoed; the next round's `Need` is empty),
/// or Commit (`None`: the commit rounds follow); anything out of order is refused.
async fn manifest_or_commit<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    ctx: &ReceiverContext,
    session: &mut Streaming,
    end: RoundEnd,
    ended: &mut bool,
) -> Result<Option<Vec<IndexRange>>, TransferError> {
    match end {
        RoundEnd::Piece(_) => Err(TransferError::Unexpected {
            got: "ManifestPiece",
            state: "the manifest ended",
        }),
        RoundEnd::End(end) if !*ended => {
            let manifest = session.streamed.finish(end.digest).map_err(bad)?;
            session.writer.finish_manifest(Arc::new(manifest));
            let echo = Message::ManifestEnd(end);
            send_within(conn, &echo, ctx.idle_timeout, "echoing ManifestEnd").await?;
            *ended = true;
            // Every announced chunk was asked for with its piece: the Need after the echo asks for nothing.
            Ok(Some(Vec::new()))
        }
        RoundEnd::End(_) => Err(TransferError::Unexpected {
            got: "ManifestEnd",
            state: "the manifest ended",
        }),
        RoundEnd::Commit if *ended => Ok(None),
        RoundEnd::Commit => {
            let why = "Commit before ManifestEnd: the streamed manifest is not complete";
            Err(TransferError::refused(ErrorCode::UnexpectedMessage, why))
        }
    }
}

/// One round of a streamed offer: sends `need` (if any), then takes chunks of the announced part until the next
/// piece, the end of the manifest, or Commit arrives. At a piece or the manifest's end the writer pauses (its batch
/// and running syncs go on into the next round); at Commit, or if the round failed, it is drained first, so what
/// was verified is durable before this returns (after a failure, with the digest state settled for the resume).
async fn round<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    ctx: &ReceiverContext,
    mut writer: ChunkWriter,
    need: Option<Vec<IndexRange>>,
    superseded: &CancellationToken,
    shutdown: &CancellationToken,
) -> (ChunkWriter, Result<RoundEnd, TransferError>) {
    let manifest = writer.manifest.clone();
    let (chunk_tx, chunk_rx) = mpsc::channel(WRITE_QUEUE);
    let (event_tx, mut events) = mpsc::unbounded_channel();
    // Set when the round ends at a piece or the manifest's end: the writer pauses (its batch and syncs go on into
    // the next round) instead of draining, so a piece does not wait for every running sync.
    let pause = Arc::new(AtomicBool::new(false));
    writer.pause_on(pause.clone());
    let task = tokio::task::spawn_blocking(move || writer.run(chunk_rx, event_tx));
    let mut queue = Some(chunk_tx);
    let mut result: Result<Option<RoundEnd>, TransferError> = Ok(None);
    if let Some(ranges) = need {
        if let Err(e) = send_within(conn, &Message::Need(Need { ranges }), ctx.idle_timeout, "sending Need").await {
            result = Err(e);
            queue = None;
        }
    }
    loop {
        let taking = queue.is_some();
        let step = tokio::select! {
            // Biased: a durable batch's Ack goes out before the next chunk is read (the sender's delay
            // sample, and its window, hold no time this loop spent reading).
            biased;
            _ = superseded.cancelled(), if taking => Err(TransferError::Superseded),
            _ = shutdown.cancelled(), if taking => Err(TransferError::ShuttingDown),
            event = events.recv() => match event {
                None => break, // the writer has finished
                Some(event) if result.is_ok() => answer_writer(conn, ctx, event).await.map(|_| None),
                Some(_) => Ok(None), // already failing: only drain
            },
            msg = next_message(conn, ctx.idle_timeout, "receiving chunks"), if taking => match msg {
                Ok(msg) => take_message(conn, ctx, &manifest, queue.as_ref().expect("guarded"), msg).await,
                Err(e) => Err(e),
            },
        };
        match step {
            Ok(None) => {}
            Ok(Some(Step::WriterStopped)) => queue = None,
            Ok(Some(Step::End(end))) => {
                pause.store(!matches!(end, RoundEnd::Commit), Ordering::Release);
                result = result.map(|_| Some(end));
                queue = None;
            }
            Err(e) => {
                result = result.and(Err(e));
                queue = None;
            }
        }
    }
    let writer = task.await.expect("chunk writer panicked");
    let result = result.and_then(|end| end.ok_or(TransferError::Closed("receiving chunks")));
    let writer = settled_if_ended(writer, &result).await;
    (writer, result)
}

/// What one message did to a round.
enum Step {
    /// The round ends.
    End(RoundEnd),
    /// The writer stopped (its Failed event follows).
    WriterStopped,
}

/// Handles one message from the sender while chunks of a streamed offer arrive.
async fn take_message<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    ctx: &ReceiverContext,
    manifest: &Manifest,
    queue: &mpsc::Sender<super::writer::QueuedChunk>,
    msg: Message,
) -> Result<Option<Step>, TransferError> {
    match msg {
        Message::Chunk(chunk) => {
            Ok((!queue_chunk(ctx, manifest, queue, chunk, 0).await?).then_some(Step::WriterStopped))
        }
        Message::ManifestPiece(piece) => Ok(Some(Step::End(RoundEnd::Piece(piece)))),
        Message::ManifestEnd(end) => Ok(Some(Step::End(RoundEnd::End(end)))),
        Message::Commit => Ok(Some(Step::End(RoundEnd::Commit))),
        Message::Abandon(reason) => Err(TransferError::Abandoned(reason)),
        Message::Ping(nonce) => {
            answer_ping(conn, nonce, ctx.idle_timeout).await?;
            Ok(None)
        }
        other => Err(TransferError::Unexpected {
            got: other.name(),
            state: "receiving a streamed offer",
        }),
    }
}
