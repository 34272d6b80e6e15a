//! Extra streams of one push (`--streams N`): a connection that sends `Join` feeds its chunks to the writer of the
//! transfer another connection offered, and hears the Acks (and rejections) of its own chunks. The offering
//! connection stays in charge: it answers the Need, owns the claim, and commits (proto-spec.md §4, "Streams").
//!
//! A round of reception opens a join point for its destination; the writer tags every batch with the stream each
//! chunk came on, and the offering session forwards other streams' events to them. When the round ends (Commit,
//! failure, takeover), the join point closes and joined streams end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::receiver::{queue_chunk, ReceiverContext};
use super::writer::{QueuedChunk, WriterEvent};
use super::{answer_ping, next_message, send_within, TransferError};
use crate::manifest::{hex, Hash, Manifest};
use crate::path::RemotePath;
use crate::ranges::IndexRange;
use crate::wire::{Ack, Connection, ErrorCode, Join, Message, Need};

/// Most streams joined to one transfer.
pub const MAX_JOINED: u32 = 16;

type Routes = Arc<Mutex<HashMap<u32, mpsc::UnboundedSender<WriterEvent>>>>;

/// The join points of one receiver root, by destination.
#[derive(Clone, Default)]
pub struct Joins {
    points: Arc<Mutex<HashMap<String, JoinPoint>>>,
}

struct JoinPoint {
    /// Tells this round's point from a later one at the same destination.
    round: u64,
    manifest_id: Hash,
    manifest: Arc<Manifest>,
    chunks: mpsc::Sender<QueuedChunk>,
    routes: Routes,
    next: u32,
    round_over: CancellationToken,
}

/// An open join point; closed (and its joined streams told) when dropped.
pub(crate) struct Opening {
    joins: Joins,
    key: String,
    round: u64,
    round_over: CancellationToken,
    /// Where events of joined streams go; kept by the offering session until its writer has finished.
    pub(crate) routes: Routes,
}

impl Drop for Opening {
    fn drop(&mut self) {
        let mut points = self.joins.lock();
        if points.get(&self.key).is_some_and(|p| p.round == self.round) {
            points.remove(&self.key);
        }
        self.round_over.cancel();
    }
}

/// A stream's share of an open transfer.
struct Joined {
    stream: u32,
    manifest: Arc<Manifest>,
    chunks: mpsc::Sender<QueuedChunk>,
    events: mpsc::UnboundedReceiver<WriterEvent>,
    round_over: CancellationToken,
}

impl Joins {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, JoinPoint>> {
        self.points.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens the join point of `key` for one round of reception into `chunks`.
    pub(crate) fn open(&self, key: &str, manifest: Arc<Manifest>, chunks: mpsc::Sender<QueuedChunk>) -> Opening {
        static ROUNDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let round = ROUNDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let routes = Routes::default();
        let round_over = CancellationToken::new();
        let point = JoinPoint {
            round,
            manifest_id: manifest.id(),
            manifest,
            chunks,
            routes: routes.clone(),
            next: 1,
            round_over: round_over.clone(),
        };
        self.lock().insert(key.to_string(), point);
        Opening {
            joins: self.clone(),
            key: key.to_string(),
            round,
            round_over,
            routes,
        }
    }

    /// Joins the round open at `key` if it receives the manifest `manifest_id`. `Ok(None)`: no round is open at
    /// `key` right now.
    fn join(&self, key: &str, manifest_id: &Hash) -> Result<Option<Joined>, TransferError> {
        let mut points = self.lock();
        let Some(point) = points.get_mut(key) else {
            return Ok(None);
        };
        if point.manifest_id != *manifest_id {
            return Err(unknown_transfer(key, manifest_id));
        }
        if point.next > MAX_JOINED {
            return Err(TransferError::refused(
                ErrorCode::TooManyConnections,
                format!("{key} already has {MAX_JOINED} joined streams"),
            ));
        }
        let stream = point.next;
        point.next += 1;
        let (events_tx, events) = mpsc::unbounded_channel();
        point
            .routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(stream, events_tx);
        Ok(Some(Joined {
            stream,
            manifest: point.manifest.clone(),
            chunks: point.chunks.clone(),
            events,
            round_over: point.round_over.clone(),
        }))
    }
}

/// `UnknownTransfer` (not retryable): no transfer open at `key` receives the manifest `manifest_id`.
fn unknown_transfer(key: &str, manifest_id: &Hash) -> TransferError {
    TransferError::refused(
        ErrorCode::UnknownTransfer,
        format!(
            "no transfer open at {key} has manifest id {} (proto-spec.md §4, \"Manifest id\")",
            hex(manifest_id)
        ),
    )
}

/// Joins the round open at `key`; when none is open right now, tells a transfer that exists but is between rounds
/// (`Busy`, retryable: the retry joins the next round) from one that does not exist (`UnknownTransfer`), by the
/// open-transfer record. The record is written before the offering connection's first Need, so a client that
/// joins after that Need (as §4 requires) never meets `UnknownTransfer` for its own transfer.
async fn join_open(ctx: &ReceiverContext, key: &str, manifest_id: &Hash) -> Result<Joined, TransferError> {
    if let Some(joined) = ctx.joins.join(key, manifest_id)? {
        return Ok(joined);
    }
    let (store, path) = (ctx.store.clone(), key.to_string());
    let record = tokio::task::spawn_blocking(move || store.transfer(&path))
        .await
        .map_err(|e| TransferError::Storage(std::io::Error::other(e)))??;
    if record.is_some_and(|r| r.manifest.id() == *manifest_id) {
        // The offering connection may be between rounds, or about to be taken over.
        return Err(TransferError::refused(
            ErrorCode::Busy,
            format!("the transfer at {key} is not taking chunks right now"),
        ));
    }
    Err(unknown_transfer(key, manifest_id))
}

/// Hands a writer event to the joined stream it belongs to; returns it if it is the offering stream's own.
pub(crate) fn route(routes: &Routes, event: WriterEvent) -> Option<WriterEvent> {
    let stream = match &event {
        WriterEvent::Durable { stream, .. } | WriterEvent::Rejected { stream, .. } => *stream,
        WriterEvent::Failed(_) => 0,
    };
    if stream == 0 {
        return Some(event);
    }
    if let Some(to) = routes.lock().unwrap_or_else(|e| e.into_inner()).get(&stream) {
        let _ = to.send(event);
    }
    None
}

/// Serves a joined stream: takes its chunks into the open transfer and acknowledges them on this connection, until
/// the client closes it or the transfer's round ends.
pub async fn serve_join<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    ctx: &ReceiverContext,
    join: Join,
    stop: &CancellationToken,
) -> Result<(), TransferError> {
    let path = RemotePath::parse(&join.path).map_err(|e| TransferError::refused(ErrorCode::BadPath, e))?;
    let Joined {
        stream,
        manifest,
        chunks,
        mut events,
        round_over,
    } = join_open(ctx, path.as_str(), &join.manifest_id).await?;
    let joined_ack = Message::Need(Need { ranges: vec![] });
    send_within(conn, &joined_ack, ctx.idle_timeout, "answering Join").await?;
    tracing::debug!(path = %path, stream, "stream joined");
    // The only handle this session keeps on the writer's queue: dropped when the round ends, so the writer can
    // finish.
    let mut chunks = Some(chunks);
    loop {
        tokio::select! {
            // Biased: a durable batch's Ack goes out before the next chunk is read (the sender's delay
            // sample, and its window, hold no time this loop spent reading).
            biased;
            _ = stop.cancelled() => return Err(TransferError::ShuttingDown),
            _ = round_over.cancelled(), if chunks.is_some() => chunks = None,
            event = events.recv() => match event {
                Some(event) => answer(conn, ctx, event).await?,
                None => return Ok(()),
            },
            msg = next_message(conn, ctx.idle_timeout, "receiving chunks") => match msg {
                Ok(Message::Chunk(chunk)) => {
                    let Some(queue) = &chunks else {
                        return Err(TransferError::refused(ErrorCode::Busy, "the transfer this stream joined has ended"));
                    };
                    if !queue_chunk(ctx, &manifest, queue, chunk, stream).await? {
                        chunks = None;
                    }
                }
                Ok(Message::Ping(nonce)) => answer_ping(conn, nonce, ctx.idle_timeout).await?,
                Ok(other) => {
                    return Err(TransferError::Unexpected {
                        got: other.name(),
                        state: "receiving chunks on a joined stream",
                    })
                }
                Err(TransferError::Closed(_)) => return Ok(()),
                Err(e) => return Err(e),
            },
        }
    }
}

/// Ack for durable chunks, Need for rejected ones.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    ctx: &ReceiverContext,
    event: WriterEvent,
) -> Result<(), TransferError> {
    let reply = match event {
        WriterEvent::Durable { ranges, .. } => Message::Ack(Ack { ranges }),
        WriterEvent::Rejected { index, .. } => Message::Need(Need {
            ranges: vec![IndexRange { start: index, count: 1 }],
        }),
        WriterEvent::Failed(e) => return Err(e),
    };
    send_within(conn, &reply, ctx.idle_timeout, "acknowledging chunks").await
}
