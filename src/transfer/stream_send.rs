//! The sender's streamed offer (proto-spec.md §4, "Streamed offer", protocol version 6): the file is read once,
//! and its chunks are announced in `ManifestPiece`s as they are hashed, so the receiver's `Need` for a piece, and
//! the chunks it names, travel while the rest of the file is still being hashed. A transfer then takes about
//! max(hash, network, disk) instead of their sum, and the first chunk leaves as soon as it is hashed.
//!
//! Every guarantee of the whole-manifest sender holds: a chunk the receiver rejected is re-hashed when it is read
//! again for sending (a first send is checked against size and mtime, and verified by the receiver, [`Rehash`]),
//! and the hashing thread checks that size and mtime did not move while it read; either mismatch is
//! [`TransferError::SourceChanged`], the chunks sent so far stay durable on the receiver and nothing is committed.

use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::handshake::PendingWelcome;
use super::sender::{commit, Pipeline, Rehash, SendEvent, SendOptions, SendStats, Source, Until};
use super::{answer_ping, next_message, refusal_behind, send_within, TransferError};
use crate::chunk::{mtime_of, stream_chunks};
use crate::manifest::{ChunkEntry, Chunking, FileTime, Hash, Manifest};
use crate::manifest_stream::{piece_target, MAX_PIECE_CHUNKS};
use crate::wire::{Committed, Connection, ManifestEnd, ManifestPiece, Message, OfferStart};

/// While the socket has nothing to send, hashed chunks wait at most this long for more before they go out as a
/// piece (so a slow disk does not make one piece per chunk).
const PIECE_WAIT: Duration = Duration::from_millis(10);

/// Chunk reads running ahead of the socket while the file is also being hashed.
const STREAM_READ_AHEAD: usize = 2;

/// A file to offer streamed: what `OfferStart` says about it.
#[derive(Clone)]
pub struct StreamSource {
    /// The open file.
    pub file: Arc<File>,
    /// Its size, mtime and mode when it was opened.
    pub size: u64,
    /// Modification time.
    pub mtime: FileTime,
    /// `st_mode & 0o7777`.
    pub mode: u32,
    /// How to cut it.
    pub chunking: Chunking,
}

impl StreamSource {
    /// Describes the open `file`, to be cut with `chunking`.
    pub fn of(file: Arc<File>, chunking: crate::chunk::ChunkSpec) -> std::io::Result<StreamSource> {
        use std::os::unix::fs::MetadataExt;
        let meta = file.metadata()?;
        Ok(StreamSource {
            size: meta.len(),
            mtime: mtime_of(&meta),
            mode: meta.mode() & 0o7777,
            chunking: chunking.for_size(meta.len()),
            file,
        })
    }
}

/// Where the sender stands in the exchange of a streamed offer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stage {
    /// Hashing; pieces go out as chunks are hashed.
    Hashing,
    /// Every chunk announced and `ManifestEnd` sent; waiting for its echo.
    Ended,
    /// The echo arrived; the receiver's Need after it is due.
    Echoed,
    /// That Need arrived: once everything needed is acknowledged, Commit.
    Settled,
}

/// Called on the hashing thread with the whole manifest once the file is hashed (and unchanged): the sender caches
/// it there, so a later attempt offers it whole even if this one is cut before Committed.
pub type OnHashed = Box<dyn FnOnce(&Manifest) + Send>;

/// Hashes the source on the hashing thread in place of [`stream_chunks`] from offset 0 (the client goes on from the
/// hashing progress it recorded): hands every chunk to the sink in file order, returns the whole-file digest.
pub type HashWith = Box<dyn FnOnce(&mut (dyn FnMut(ChunkEntry) -> bool + Send)) -> std::io::Result<Hash> + Send>;

/// How the hashing thread hashes the source, and what it does with the whole manifest.
pub struct Hashing {
    /// Hashes in place of [`stream_chunks`] from offset 0, if set.
    pub with: Option<HashWith>,
    /// Called with the whole manifest once hashed.
    pub on_hashed: OnHashed,
}

/// The source being hashed on its own thread ([`Hashing::start`]): its chunks, as they are hashed, and the digest at
/// the end. Dropping it stops the hashing at its next chunk.
pub struct Hashed {
    entries: mpsc::UnboundedReceiver<ChunkEntry>,
    task: tokio::task::JoinHandle<Result<Hash, TransferError>>,
}

impl Hashing {
    /// Starts hashing `source` on a blocking thread, so that a caller can hash while it connects (the first piece
    /// is then ready when the handshake ends, not a hashing buffer later).
    pub fn start(self, source: &StreamSource) -> Hashed {
        let (entries, task) = start_hashing(source, self);
        Hashed { entries, task }
    }
}

/// Offers `source` for `path` streamed and sends whatever the receiver needs until it reports Committed. Returns
/// the report and the whole manifest (for later attempts, which offer it whole). `hashing` is the source's hashing,
/// started by the caller ([`Hashing::start`]), as early as it likes. With `welcome` the handshake is not complete:
/// `OfferStart` and the first pieces go out behind Hello (proto-spec.md §3, "Pipelining"), and the Welcome is read
/// when it arrives; a server that chose a version without the streamed offer is [`TransferError::OlderPeer`].
#[allow(clippy::too_many_arguments)]
pub async fn send_streamed<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    path: &str,
    source: &StreamSource,
    opts: &SendOptions,
    stats: &mut SendStats,
    on_event: &mut (dyn FnMut(SendEvent) + Send),
    hashing: Hashed,
    welcome: Option<PendingWelcome>,
) -> Result<(Committed, Manifest), TransferError> {
    let pipelined = welcome.is_some();
    match offer_streamed(conn, path, source, opts, stats, on_event, hashing, welcome).await {
        // A write that failed before the Welcome was read: the server may have refused the handshake.
        Err(failed) if pipelined && conn.version().is_none() && !matches!(failed, TransferError::Remote(_)) => {
            Err(refusal_behind(conn, failed).await)
        }
        sent => sent,
    }
}

/// [`send_streamed`], but for what a failed write before the Welcome means.
#[allow(clippy::too_many_arguments)]
async fn offer_streamed<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    path: &str,
    source: &StreamSource,
    opts: &SendOptions,
    stats: &mut SendStats,
    on_event: &mut (dyn FnMut(SendEvent) + Send),
    hashing: Hashed,
    mut welcome: Option<PendingWelcome>,
) -> Result<(Committed, Manifest), TransferError> {
    let start = Message::OfferStart(OfferStart {
        path: path.to_string(),
        size: source.size,
        chunking: source.chunking,
        mtime: source.mtime,
        mode: source.mode,
    });
    // Two reads ahead, not four: the hashing thread's two buffers are live at the same time (memory, §6).
    let streaming = SendOptions {
        read_ahead: opts.read_ahead.min(STREAM_READ_AHEAD),
        ..opts.clone()
    };
    let opts = &streaming;
    send_within(conn, &start, opts.io_timeout, "sending OfferStart").await?;
    opts.meter.file(path, source.size, 0);
    let Hashed {
        entries,
        task: mut hashing,
    } = hashing;
    let mut manifest = Manifest {
        size: source.size,
        digest: [0; 32],
        chunking: source.chunking,
        mtime: source.mtime,
        mode: source.mode,
        chunks: Vec::new(),
    };
    let mut flow = Flow {
        entries,
        gathered: Vec::new(),
        hashed_all: false,
        digest: None,
        last_piece: Instant::now(),
    };
    let whole = Source {
        file: source.file.clone(),
        manifest: Arc::new(manifest.clone()),
        rehash: Rehash::AfterRejection,
    };
    let mut pipeline = Pipeline::new(&whole, opts, conn);
    let mut stage = Stage::Hashing;
    let mut needed = (0u64, 0u64);
    loop {
        pipeline.start_reads();
        if flow.piece_due(manifest.chunk_count(), pipeline.is_starved()) {
            let piece = ManifestPiece {
                first_index: manifest.chunk_count(),
                chunks: std::mem::take(&mut flow.gathered),
            };
            manifest.chunks.extend_from_slice(&piece.chunks);
            pipeline.extend(Arc::new(manifest.clone()));
            send_within(
                conn,
                &Message::ManifestPiece(piece),
                opts.io_timeout,
                "sending ManifestPiece",
            )
            .await?;
            flow.last_piece = Instant::now();
        }
        if let (Stage::Hashing, Some(digest), true) = (stage, flow.digest, flow.gathered.is_empty()) {
            manifest.digest = digest;
            let end = Message::ManifestEnd(ManifestEnd { digest });
            send_within(conn, &end, opts.io_timeout, "sending ManifestEnd").await?;
            stage = Stage::Ended;
        }
        // Every needed chunk is known and on its way: Commit may follow them (the commit drive waits for their
        // Acks first if the receiver rejected any, [`Until`]).
        if stage == Stage::Settled && pipeline.is_starved() {
            break;
        }
        let starved = pipeline.is_starved() && !flow.gathered.is_empty();
        tokio::select! {
            biased;
            msg = next_message(conn, opts.io_timeout, "waiting for Need or Ack") => {
                if let Some(pending) = welcome.take() {
                    let version = pending.welcomed(conn, msg)?.version;
                    if version < crate::STREAMED_OFFER_VERSION {
                        return Err(TransferError::OlderPeer { version, request: "OfferStart" });
                    }
                    pipeline.handshake_round_trip(conn.round_trip());
                    continue;
                }
                let msg = msg?;
                if let Message::Need(need) = &msg {
                    needed.0 += crate::ranges::ranges_len(&need.ranges);
                    needed.1 += pipeline.ranges_bytes(&need.ranges);
                }
                let before = stage;
                stage = take_message(conn, opts, &mut pipeline, stage, msg, stats, on_event).await?;
                if before == Stage::Echoed && stage == Stage::Settled {
                    // One progress line for the whole offer, as for the Need answering an Offer.
                    on_event(SendEvent::Need { chunks: needed.0, bytes: needed.1 });
                }
            }
            entry = flow.entries.recv(), if !flow.hashed_all => flow.gather(entry),
            done = &mut hashing, if flow.hashed_all && flow.digest.is_none() => {
                let digest = done.map_err(|e| TransferError::SourceIo(std::io::Error::other(e)))??;
                flow.digest = Some(digest);
            }
            read = pipeline.next_read(), if pipeline.has_reads() => pipeline.send_read(conn, read?, stats).await?,
            _ = tokio::time::sleep_until(flow.last_piece + PIECE_WAIT), if starved => {}
        }
    }
    let whole = Source {
        file: source.file.clone(),
        manifest: Arc::new(manifest),
        rehash: Rehash::AfterRejection,
    };
    let committed = commit(conn, &whole, opts, &mut pipeline, Until::Sent, stats, on_event).await?;
    let manifest = Arc::try_unwrap(whole.manifest).unwrap_or_else(|shared| (*shared).clone());
    Ok((committed, manifest))
}

/// Hashed chunks on their way into pieces.
struct Flow {
    entries: mpsc::UnboundedReceiver<ChunkEntry>,
    /// Hashed, not yet announced.
    gathered: Vec<ChunkEntry>,
    /// The hashing thread sent its last chunk.
    hashed_all: bool,
    /// The whole-file digest, once hashing ended well.
    digest: Option<Hash>,
    /// When the last piece went out.
    last_piece: Instant,
}

impl Flow {
    /// Takes a hashed chunk, and every other one already waiting (up to a piece).
    fn gather(&mut self, entry: Option<ChunkEntry>) {
        let Some(entry) = entry else {
            self.hashed_all = true;
            return;
        };
        self.gathered.push(entry);
        while self.gathered.len() < MAX_PIECE_CHUNKS {
            match self.entries.try_recv() {
                Ok(entry) => self.gathered.push(entry),
                Err(_) => break,
            }
        }
    }

    /// Whether the gathered chunks go out now: enough of them, hashing over, or the socket idle and
    /// [`PIECE_WAIT`] passed.
    fn piece_due(&self, announced: u32, starved: bool) -> bool {
        !self.gathered.is_empty()
            && (self.gathered.len() >= piece_target(announced)
                || self.hashed_all
                || (starved && self.last_piece.elapsed() >= PIECE_WAIT))
    }
}

/// Handles one message from the receiver; returns the new stage.
async fn take_message<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    opts: &SendOptions,
    pipeline: &mut Pipeline<'_>,
    stage: Stage,
    msg: Message,
    stats: &mut SendStats,
    on_event: &mut (dyn FnMut(SendEvent) + Send),
) -> Result<Stage, TransferError> {
    match msg {
        Message::Need(need) => {
            // One Need per piece: not worth a progress line each (the meter shows the bytes).
            let mut quiet = |event: SendEvent| {
                if !matches!(event, SendEvent::Need { .. }) {
                    on_event(event)
                }
            };
            pipeline.need(&need.ranges, false, stats, &mut quiet)?;
            Ok(if stage == Stage::Echoed { Stage::Settled } else { stage })
        }
        Message::Ack(ack) => {
            pipeline.ack(&ack.ranges, stats)?;
            Ok(stage)
        }
        Message::ManifestEnd(_) if stage == Stage::Ended => Ok(Stage::Echoed),
        Message::Ping(nonce) => {
            answer_ping(conn, nonce, opts.io_timeout).await?;
            Ok(stage)
        }
        other => Err(TransferError::Unexpected {
            got: other.name(),
            state: "sending a streamed offer",
        }),
    }
}

/// Starts the one read of the source on a blocking thread: its chunks arrive on the channel as they are hashed,
/// and the task ends with the whole-file digest, or `SourceChanged` if size or mtime moved meanwhile.
fn start_hashing(
    source: &StreamSource,
    Hashing { with, on_hashed }: Hashing,
) -> (
    mpsc::UnboundedReceiver<ChunkEntry>,
    tokio::task::JoinHandle<Result<Hash, TransferError>>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let source = source.clone();
    let task = tokio::task::spawn_blocking(move || {
        let mut chunks = Vec::new();
        let mut sink = |entry| {
            chunks.push(entry);
            tx.send(entry).is_ok()
        };
        let digest = match with {
            Some(hash) => hash(&mut sink),
            None => stream_chunks(&source.file, source.size, source.chunking, &mut sink),
        };
        let digest = digest.map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                TransferError::SourceChanged("the file shrank while it was read".into())
            }
            _ => TransferError::SourceIo(e),
        })?;
        let after = source.file.metadata().map_err(TransferError::SourceIo)?;
        if !crate::chunk::has_identity(&after, source.size, source.mtime) {
            return Err(TransferError::SourceChanged(
                "the file changed while it was being hashed".into(),
            ));
        }
        on_hashed(&Manifest {
            size: source.size,
            digest,
            chunking: source.chunking,
            mtime: source.mtime,
            mode: source.mode,
            chunks,
        });
        Ok(digest)
    });
    (rx, task)
}
