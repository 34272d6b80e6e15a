//! The sender role: offer a manifest, then pipeline exactly the chunks the receiver needs.
//!
//! Reads happen on blocking threads, several ahead of the socket. How a chunk read for sending is checked depends
//! on the source ([`Rehash`], proto-spec.md §4 "Sender"): a file served for a pull is re-hashed on every read (a
//! mismatch is damage at rest, which must never leave this side); a pushing client's first send is checked against
//! the manifest's size and mtime only, since the receiver verifies every chunk before it writes it. Once the
//! receiver rejects a chunk, every later read of the pipeline is re-hashed: a chunk that no longer matches the
//! manifest means the source changed, and the sender stops with [`TransferError::SourceChanged`] instead of sending
//! bytes the receiver would reject forever (a changed source costs the chunks already in flight, never a loop).
//! Chunks in flight are bounded by a byte window; a chunk leaves the window only when its Ack (the receiver has it
//! durably) or a Need for it (rejected, send again) arrives. No data is kept for in-flight chunks: a resend
//! re-reads the file.

use std::collections::{HashSet, VecDeque};
use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinHandle;

use super::handshake::PendingWelcome;
use super::window::Window;
use super::{answer_ping, next_message, recv, send_first, send_within, timeout_as, TransferError};
use crate::manifest::{hex, Manifest};
use crate::meter::Meter;
use crate::ranges::{encode_runs, ranges_len, ranges_within, ChunkSet, IndexRange};
use crate::wire::{Chunk, Committed, Connection, Join, Message, Offer, WireError};

/// Commit rounds (Commit answered by Need) tolerated before the receiver is considered broken.
const MAX_COMMIT_ROUNDS: u32 = 8;

/// An open source file and its manifest.
#[derive(Clone)]
pub struct Source {
    /// The open file; chunks are read with positional reads.
    pub file: Arc<File>,
    /// Its manifest.
    pub manifest: Arc<Manifest>,
    /// Which reads for sending are re-hashed against the manifest.
    pub rehash: Rehash,
}

/// Which chunk reads for sending are re-hashed before the chunk goes out (proto-spec.md §4, "Sender").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rehash {
    /// Every read: a file served for a pull, whose damage at rest must be found here and reported, never sent.
    Always,
    /// Reads after the receiver rejected a chunk (a resend, and everything read after it): a pushing client. A first
    /// send is checked against the manifest's size and mtime (`fstat`) only; the receiver verifies every chunk before
    /// it writes it, so bytes that changed behind an unchanged size and mtime are rejected there, never written.
    AfterRejection,
}

/// Tuning of the sender.
#[derive(Clone, Debug)]
pub struct SendOptions {
    /// Maximum chunk bytes sent but not yet acknowledged; with `size_window`, where the window starts.
    pub window: u64,
    /// Grow the window to twice the measured bandwidth-delay product (up to
    /// [`AUTO_WINDOW_CAP`](super::window::AUTO_WINDOW_CAP)); false keeps `window` as set (the user chose it).
    pub size_window: bool,
    /// Maximum chunk reads running ahead of the socket.
    pub read_ahead: usize,
    /// Maximum silence from the receiver (and time for one write) before giving up on the connection.
    pub io_timeout: Duration,
    /// Live progress, shared by every stream of the run.
    pub meter: Arc<Meter>,
}

impl Default for SendOptions {
    fn default() -> Self {
        SendOptions {
            window: crate::DEFAULT_WINDOW,
            size_window: true,
            read_ahead: 4,
            io_timeout: Duration::from_secs(30),
            meter: Arc::default(),
        }
    }
}

/// Counters of one sender, accumulated over connections.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SendStats {
    /// Chunk payload bytes written to the socket.
    pub bytes_sent: u64,
    /// Chunks written to the socket.
    pub chunks_sent: u64,
    /// Chunks acknowledged as durable.
    pub chunks_acked: u64,
    /// Chunks the receiver rejected (failed verification) and asked for again.
    pub chunks_rejected: u64,
    /// Small files of a tree acknowledged as committed.
    pub files_acked: u64,
}

impl SendStats {
    /// Adds another stream's counters.
    pub fn merge(&mut self, other: &SendStats) {
        self.bytes_sent += other.bytes_sent;
        self.chunks_sent += other.chunks_sent;
        self.chunks_acked += other.chunks_acked;
        self.chunks_rejected += other.chunks_rejected;
        self.files_acked += other.files_acked;
    }
}

/// What the sender saw, for progress display.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendEvent {
    /// The receiver asked for these chunks.
    Need {
        /// Number of chunks needed.
        chunks: u64,
        /// Their total size.
        bytes: u64,
    },
    /// The receiver rejected a chunk and asked for it again.
    Rejected {
        /// The chunk index.
        index: u32,
    },
    /// The receiver of a tree asked for these files.
    TreeNeed {
        /// Files needed.
        files: u64,
        /// Their total size.
        bytes: u64,
    },
    /// A file of a tree could not be sent (vanished, unreadable, kept changing, refused).
    FileFailed {
        /// Its path in the tree.
        path: String,
        /// Why.
        reason: String,
    },
}

#[derive(Clone, Copy)]
enum Phase {
    /// Sending needed chunks.
    Sending {
        /// Commit messages sent so far.
        commits: u32,
    },
    /// Commit sent; waiting for Committed (or a Need for chunks still missing).
    Committing {
        /// Commit messages sent so far, this one included.
        commits: u32,
    },
}

/// Offers `source` for `path` and sends whatever the receiver needs until it reports Committed.
pub async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    path: &str,
    source: &Source,
    opts: &SendOptions,
    stats: &mut SendStats,
    on_event: &mut (dyn FnMut(SendEvent) + Send),
) -> Result<Committed, TransferError> {
    send_behind(conn, None, path, source, opts, stats, on_event).await
}

/// Like [`send`], on a connection whose handshake may not be complete: with `welcome`, the Offer goes right behind
/// the client's last handshake frame if its frame is at most [`super::PIPELINED_FRAME_MAX`] (proto-spec.md §3,
/// "Pipelining"; every version since 3 knows `Offer`), and the Welcome is read after it. A larger Offer waits for
/// the Welcome.
#[allow(clippy::too_many_arguments)]
pub async fn send_behind<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    welcome: Option<PendingWelcome>,
    path: &str,
    source: &Source,
    opts: &SendOptions,
    stats: &mut SendStats,
    on_event: &mut (dyn FnMut(SendEvent) + Send),
) -> Result<Committed, TransferError> {
    let needed = offer(conn, welcome, path, source, opts).await?;
    let mut pipeline = Pipeline::new(source, opts, conn);
    pipeline.need(&needed, false, stats, on_event)?;
    commit(conn, source, opts, &mut pipeline, Until::Sent, stats, on_event).await
}

/// When a sender sends Commit (proto-spec.md §4, "Sender").
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Until {
    /// Once every needed chunk is acknowledged: chunks of other connections (extra streams) may still be on their
    /// way, and Commit must not overtake them.
    Acked,
    /// Once every needed chunk is written to this, the only, connection: the receiver reads Commit after them and
    /// drains its batch before it checks the file, so waiting for their Acks would only add a round trip. After a
    /// rejection (a Need for a chunk in flight, or chunks missing at Commit) it waits for the Acks again, so a
    /// resent chunk and the receiver's next round cannot cross another Commit.
    Sent,
}

/// Sends what `pipeline` still holds and Commit (when `until` allows), then whatever the receiver still needs,
/// until it reports Committed.
pub(super) async fn commit<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    source: &Source,
    opts: &SendOptions,
    pipeline: &mut Pipeline<'_>,
    until: Until,
    stats: &mut SendStats,
    on_event: &mut (dyn FnMut(SendEvent) + Send),
) -> Result<Committed, TransferError> {
    pipeline.commit_when = Some(until);
    drive(conn, source, opts, pipeline, stats, on_event)
        .await
        .map(|committed| committed.expect("a committing drive ends with Committed"))
}

/// Like [`send`], with the needed chunks spread over `extra` connections as well (already greeted, the same
/// server): each joins the transfer with `Join` and sends its share in stripes of [`STRIPE`] chunks, and the
/// offering connection commits once every stream's chunks are acknowledged. A failure on any stream fails the
/// whole attempt; what was acknowledged is durable and the next attempt resumes from it.
pub async fn send_streams<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    conn: &mut Connection<S>,
    extra: Vec<Connection<S>>,
    path: &str,
    source: &Source,
    opts: &SendOptions,
    stats: &mut SendStats,
    on_event: &mut (dyn FnMut(SendEvent) + Send),
) -> Result<Committed, TransferError> {
    let needed = offer(conn, None, path, source, opts).await?;
    let shares = stripes(&needed, extra.len() + 1);
    let mut streams = tokio::task::JoinSet::new();
    // A stream with nothing to send stays out: when nothing is needed at all, the receiver is not even taking
    // chunks (the file is already there) and would refuse the Join.
    let busy = extra
        .into_iter()
        .zip(shares[1..].iter().cloned())
        .filter(|(_, share)| !share.is_empty());
    for (mut stream, share) in busy {
        let (source, opts, path) = (source.clone(), opts.clone(), path.to_string());
        streams.spawn(async move {
            let mut stats = SendStats::default();
            let result = join_and_send(&mut stream, &path, &source, &opts, &share, &mut stats).await;
            (stats, result)
        });
    }
    let mut pipeline = Pipeline::new(source, opts, conn);
    pipeline.need(&shares[0], false, stats, on_event)?;
    let own = drive(conn, source, opts, &mut pipeline, stats, on_event).await;
    let mut failure = own.err();
    while let Some(joined) = streams.join_next().await {
        let (their, result) = joined.map_err(|e| TransferError::SourceIo(std::io::Error::other(e)))?;
        stats.merge(&their);
        failure = failure.or(result.err());
    }
    if let Some(e) = failure {
        return Err(e);
    }
    commit(conn, source, opts, &mut pipeline, Until::Acked, stats, on_event).await
}

/// Chunks per stripe when the needed chunks are spread over several streams: neighbours travel together, so each
/// stream's writes stay mostly sequential.
pub const STRIPE: u32 = 4;

/// Spreads `needed` over `streams` shares, stripe by stripe in turn.
fn stripes(needed: &[IndexRange], streams: usize) -> Vec<Vec<IndexRange>> {
    let mut shares = vec![Vec::new(); streams];
    let all: Vec<u32> = needed.iter().flat_map(IndexRange::indices).collect();
    for (n, stripe) in all.chunks(STRIPE as usize).enumerate() {
        shares[n % streams].extend(encode_runs(stripe.iter().copied()));
    }
    shares
}

/// An extra stream: joins the transfer of `source` at `path` and sends `share` until all of it is acknowledged.
async fn join_and_send<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    path: &str,
    source: &Source,
    opts: &SendOptions,
    share: &[IndexRange],
    stats: &mut SendStats,
) -> Result<(), TransferError> {
    let join = Message::Join(Join {
        path: path.to_string(),
        manifest_id: source.manifest.id(),
    });
    send_within(conn, &join, opts.io_timeout, "sending Join").await?;
    match recv(conn, opts.io_timeout, "waiting for the Join to be accepted").await? {
        Message::Need(need) if need.ranges.is_empty() => {}
        other => {
            return Err(TransferError::Unexpected {
                got: other.name(),
                state: "waiting for the Join to be accepted",
            })
        }
    }
    let mut ignore = |_| {};
    let mut pipeline = Pipeline::new(source, opts, conn);
    pipeline.need(share, false, stats, &mut ignore)?;
    drive(conn, source, opts, &mut pipeline, stats, &mut ignore).await?;
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.shutdown()).await;
    Ok(())
}

/// Sends the Offer and returns the chunks the receiver needs.
async fn offer<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    welcome: Option<PendingWelcome>,
    path: &str,
    source: &Source,
    opts: &SendOptions,
) -> Result<Vec<IndexRange>, TransferError> {
    let offer = Message::Offer(Offer {
        path: path.to_string(),
        manifest: (*source.manifest).clone(),
    });
    send_first(conn, welcome, &offer, opts.io_timeout, "sending Offer").await?;
    match recv(conn, opts.io_timeout, "waiting for Need").await? {
        Message::Need(need) => {
            let manifest = &source.manifest;
            // Checked before anything walks them: a hostile receiver's ranges could name 2^32 chunks each.
            if !ranges_within(&need.ranges, manifest.chunk_count()) {
                return Err(TransferError::Unexpected {
                    got: "Need",
                    state: "its ranges lie outside the manifest",
                });
            }
            let needed = manifest.ranges_bytes(&need.ranges);
            opts.meter
                .file(path, manifest.size, manifest.size.saturating_sub(needed));
            Ok(need.ranges)
        }
        other => Err(TransferError::Unexpected {
            got: other.name(),
            state: "waiting for Need",
        }),
    }
}

/// Sends what `pipeline` holds until every chunk is acknowledged; then, if it is to commit
/// ([`Pipeline::commit_when`]), sends Commit (as soon as [`Until`] allows) and whatever the receiver still needs
/// until it reports Committed (returned).
async fn drive<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    source: &Source,
    opts: &SendOptions,
    pipeline: &mut Pipeline<'_>,
    stats: &mut SendStats,
    on_event: &mut (dyn FnMut(SendEvent) + Send),
) -> Result<Option<Committed>, TransferError> {
    let mut phase = Phase::Sending { commits: 0 };
    loop {
        pipeline.start_reads();
        if let Phase::Sending { commits } = phase {
            if pipeline.commit_due() {
                if commits >= MAX_COMMIT_ROUNDS {
                    return Err(TransferError::Integrity(format!(
                        "receiver still missing chunks after {commits} commits"
                    )));
                }
                send_within(conn, &Message::Commit, opts.io_timeout, "sending Commit").await?;
                phase = Phase::Committing { commits: commits + 1 };
            } else if pipeline.is_idle() && pipeline.commit_when.is_none() {
                return Ok(None);
            }
        }
        let event = tokio::select! {
            biased;
            msg = next_message(conn, opts.io_timeout, "waiting for Ack") => Step::Message(msg?),
            read = pipeline.next_read(), if pipeline.has_reads() => Step::Read(read?),
        };
        match event {
            Step::Read(chunk) => pipeline.send_read(conn, chunk, stats).await?,
            Step::Message(Message::Ack(ack)) => pipeline.ack(&ack.ranges, stats)?,
            Step::Message(Message::Ping(nonce)) => {
                answer_ping(conn, nonce, opts.io_timeout).await?;
            }
            Step::Message(Message::Need(need)) => {
                pipeline.need(&need.ranges, true, stats, on_event)?;
                if let Phase::Committing { commits } = phase {
                    phase = Phase::Sending { commits };
                }
            }
            Step::Message(Message::Committed(committed)) if matches!(phase, Phase::Committing { .. }) => {
                return check_committed(&source.manifest, committed).map(Some);
            }
            Step::Message(other) => {
                return Err(TransferError::Unexpected {
                    got: other.name(),
                    state: "sending chunks",
                })
            }
        }
    }
}

enum Step {
    Message(Message),
    Read(Ready),
}

pub(super) fn check_committed(manifest: &Manifest, committed: Committed) -> Result<Committed, TransferError> {
    if committed.digest != manifest.digest || committed.size != manifest.size {
        return Err(TransferError::Integrity(format!(
            "receiver committed {} ({} bytes), expected {} ({} bytes)",
            hex(&committed.digest),
            committed.size,
            hex(&manifest.digest),
            manifest.size
        )));
    }
    Ok(committed)
}

/// Chunks to send, reads in progress, and chunks in flight.
pub(super) struct Pipeline<'a> {
    /// The source, with the manifest as far as it is known (a streamed offer's grows, [`Pipeline::extend`]).
    source: Source,
    opts: &'a SendOptions,
    pending: VecDeque<IndexRange>,
    /// The chunks in `pending`, so a repeated Need cannot queue a chunk twice.
    queued: ChunkSet,
    reads: VecDeque<JoinHandle<Result<Ready, TransferError>>>,
    reading_bytes: u64,
    in_flight: HashSet<u32>,
    in_flight_bytes: u64,
    /// How many bytes may be in flight (fixed, or sized from the measured bandwidth-delay product).
    window: Window,
    /// Buffers of sent chunks, reused for the next reads.
    spare: Vec<Vec<u8>>,
    /// Whether reads are re-hashed: always for [`Rehash::Always`], from the first rejection on otherwise.
    hash_reads: bool,
    /// Whether a chunk that is not hashed goes from the file to the socket with `sendfile` ([`Ready::InFile`]).
    zero_copy: bool,
    /// When this pipeline's connection sends Commit; `None`: it never does (an extra stream, or the offering
    /// connection of several before the others are done).
    commit_when: Option<Until>,
    /// The receiver asked for a chunk again (rejected, or missing at Commit): Commit waits for every Ack from then on.
    asked_again: bool,
}

/// A chunk ready to go out.
pub(super) enum Ready {
    /// Read (and checked): its bytes.
    Read(Chunk),
    /// Checked against the file's size and mtime and prefetched, not read: its payload goes from the file to the
    /// socket ([`Connection::write_chunk_from_file`]).
    InFile {
        /// The chunk's index.
        index: u32,
        /// Its offset in the file.
        offset: u64,
        /// Its length.
        len: u32,
    },
}

impl Ready {
    fn index(&self) -> u32 {
        match self {
            Ready::Read(chunk) => chunk.index,
            Ready::InFile { index, .. } => *index,
        }
    }

    fn len(&self) -> u64 {
        match self {
            Ready::Read(chunk) => chunk.data.len() as u64,
            Ready::InFile { len, .. } => u64::from(*len),
        }
    }
}

impl<'a> Pipeline<'a> {
    /// A pipeline for `source` on `conn`: its handshake's round trip is where a default window starts
    /// ([`Window::sized`]), and unhashed chunks go from the file to its socket if it allows ([`Connection::zero_copy`]).
    pub(super) fn new<S: AsyncRead + AsyncWrite + Unpin>(
        source: &Source,
        opts: &'a SendOptions,
        conn: &Connection<S>,
    ) -> Self {
        let round_trip = conn.round_trip();
        Pipeline {
            source: source.clone(),
            opts,
            pending: VecDeque::new(),
            queued: ChunkSet::new(source.manifest.chunk_count()),
            reads: VecDeque::new(),
            reading_bytes: 0,
            in_flight: HashSet::new(),
            in_flight_bytes: 0,
            window: if opts.size_window {
                Window::sized(opts.window, round_trip)
            } else {
                Window::fixed(opts.window)
            },
            spare: Vec::new(),
            hash_reads: source.rehash == Rehash::Always,
            zero_copy: conn.zero_copy(),
            commit_when: None,
            asked_again: false,
        }
    }

    /// Whether Commit goes out now: nothing left to send and, as [`Pipeline::commit_when`] says, nothing in flight
    /// either or nothing the receiver could still ask again for (proto-spec.md §4, "Sender").
    fn commit_due(&self) -> bool {
        match self.commit_when {
            None => false,
            Some(Until::Sent) if !self.asked_again => self.is_starved(),
            Some(_) => self.is_idle(),
        }
    }

    /// The handshake's round trip, learned from a Welcome read after this pipeline was made (a request pipelined
    /// behind Hello): the window starts from it as if it had been known from the start.
    pub(super) fn handshake_round_trip(&mut self, round_trip: Option<Duration>) {
        if let Some(round_trip) = round_trip {
            self.window.handshake_round_trip(round_trip);
        }
    }

    /// Takes a grown manifest of a streamed offer: the same chunks as before, and more.
    pub(super) fn extend(&mut self, manifest: Arc<Manifest>) {
        self.queued.grow(manifest.chunk_count());
        self.source.manifest = manifest;
    }

    /// Sends `ready` (from [`Pipeline::next_read`]), counts it, and takes its buffer back.
    pub(super) async fn send_read<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Connection<S>,
        ready: Ready,
        stats: &mut SendStats,
    ) -> Result<(), TransferError> {
        let (index, len) = (ready.index(), ready.len());
        let idle = Some(self.opts.io_timeout);
        match ready {
            Ready::Read(chunk) => {
                conn.write_chunk(index, &chunk.data, idle)
                    .await
                    .map_err(|e| timeout_as(e, "sending chunks"))?;
                self.recycle(chunk.data);
            }
            Ready::InFile { offset, len, .. } => conn
                .write_chunk_from_file(index, &self.source.file, offset, len as usize, idle)
                .await
                .map_err(|e| match e {
                    // The frame is broken: the connection fails every later write, and is dropped.
                    WireError::SourceEnded(at) => {
                        TransferError::SourceChanged(format!("the file ended at byte {at}, inside chunk {index}"))
                    }
                    other => timeout_as(other, "sending chunks"),
                })?,
        }
        // Stamped once on the socket, so the send-to-Ack delay holds no local queueing (proto-spec.md §6).
        self.window.sent(index, std::time::Instant::now());
        self.opts.meter.moved(len);
        stats.bytes_sent += len;
        stats.chunks_sent += 1;
        Ok(())
    }

    /// Takes back the buffer of a chunk that went out.
    pub(super) fn recycle(&mut self, data: Vec<u8>) {
        if self.spare.len() < self.opts.read_ahead {
            self.spare.push(data);
        }
    }

    /// Bytes of the chunks `ranges` name, within the manifest known so far.
    pub(super) fn ranges_bytes(&self, ranges: &[IndexRange]) -> u64 {
        self.source.manifest.ranges_bytes(ranges)
    }

    fn chunk_len(&self, index: u32) -> u64 {
        self.source.manifest.chunk(index).map_or(0, |c| u64::from(c.len))
    }

    /// Queues the chunks in `ranges`. A Need for chunks in flight (`resend`) means they were rejected: they leave
    /// the window and go to the front of the queue.
    pub(super) fn need(
        &mut self,
        ranges: &[IndexRange],
        resend: bool,
        stats: &mut SendStats,
        on_event: &mut (dyn FnMut(SendEvent) + Send),
    ) -> Result<(), TransferError> {
        self.check_ranges(ranges, "Need")?;
        if !resend {
            let bytes = self.source.manifest.ranges_bytes(ranges);
            on_event(SendEvent::Need {
                chunks: ranges_len(ranges),
                bytes,
            });
        }
        // A resend (a rejection, or a chunk missing at commit) is read again and hashed, and so is everything after
        // it: a source that changed is found at the first rejection (proto-spec.md §4, "Sender").
        self.hash_reads |= resend;
        self.asked_again |= resend;
        for index in ranges.iter().flat_map(IndexRange::indices) {
            if self.in_flight.remove(&index) {
                self.hash_reads = true;
                self.asked_again = true;
                self.in_flight_bytes -= self.chunk_len(index);
                self.window.forget(index);
                self.opts.meter.resent();
                stats.chunks_rejected += 1;
                on_event(SendEvent::Rejected { index });
            }
        }
        let fresh = encode_runs(
            ranges
                .iter()
                .flat_map(IndexRange::indices)
                .filter(|&i| self.queued.insert(i)),
        );
        if resend {
            for range in fresh.into_iter().rev() {
                self.pending.push_front(range);
            }
        } else {
            self.pending.extend(fresh);
        }
        Ok(())
    }

    pub(super) fn ack(&mut self, ranges: &[IndexRange], stats: &mut SendStats) -> Result<(), TransferError> {
        self.check_ranges(ranges, "Ack")?;
        let now = std::time::Instant::now();
        for index in ranges.iter().flat_map(IndexRange::indices) {
            if self.in_flight.remove(&index) {
                let len = self.chunk_len(index);
                self.in_flight_bytes -= len;
                self.window.acked(index, len, now);
                self.opts.meter.file_durable(len);
                stats.chunks_acked += 1;
            }
        }
        Ok(())
    }

    fn check_ranges(&self, ranges: &[IndexRange], what: &'static str) -> Result<(), TransferError> {
        if ranges_within(ranges, self.source.manifest.chunk_count()) {
            Ok(())
        } else {
            Err(TransferError::Unexpected {
                got: what,
                state: "its ranges lie outside the manifest",
            })
        }
    }

    /// Starts reads while the window and the read-ahead allow (always at least one, so a window smaller than a
    /// chunk still makes progress).
    pub(super) fn start_reads(&mut self) {
        while self.reads.len() < self.opts.read_ahead {
            let Some(index) = self.pending.front().map(|r| r.start) else {
                return;
            };
            let len = self.chunk_len(index);
            let committed = self.in_flight_bytes + self.reading_bytes;
            if committed > 0 && committed + len > self.window.bytes() {
                self.window.blocked();
                return;
            }
            self.pop_pending();
            self.reading_bytes += len;
            let file = self.source.file.clone();
            let entry = self.source.manifest.chunks[index as usize];
            let check = match self.hash_reads {
                true => Check::Hash,
                false => Check::Identity {
                    size: self.source.manifest.size,
                    mtime: self.source.manifest.mtime,
                },
            };
            if self.zero_copy && check != Check::Hash {
                self.reads.push_back(tokio::task::spawn_blocking(move || {
                    check_in_file(&file, index, &entry, check)
                }));
                continue;
            }
            let buf = self.spare.pop().unwrap_or_default();
            self.reads.push_back(tokio::task::spawn_blocking(move || {
                read_chunk(&file, index, &entry, check, buf).map(Ready::Read)
            }));
        }
    }

    fn pop_pending(&mut self) {
        if let Some(front) = self.pending.front_mut() {
            self.queued.remove(front.start);
            front.start += 1;
            front.count -= 1;
            if front.count == 0 {
                self.pending.pop_front();
            }
        }
    }

    pub(super) fn has_reads(&self) -> bool {
        !self.reads.is_empty()
    }

    /// The oldest read, once finished. Cancel-safe: the read stays queued if the caller stops waiting.
    pub(super) async fn next_read(&mut self) -> Result<Ready, TransferError> {
        let handle = self.reads.front_mut().expect("guarded by has_reads");
        let result = handle.await;
        self.reads.pop_front();
        let ready = result.map_err(|e| TransferError::SourceIo(std::io::Error::other(e)))??;
        let len = ready.len();
        self.reading_bytes -= len;
        if self.in_flight.insert(ready.index()) {
            self.in_flight_bytes += len;
        }
        Ok(ready)
    }

    pub(super) fn is_idle(&self) -> bool {
        self.pending.is_empty() && self.reads.is_empty() && self.in_flight.is_empty()
    }

    /// Whether nothing is queued or being read: the socket would wait for more chunks to be announced.
    pub(super) fn is_starved(&self) -> bool {
        self.pending.is_empty() && self.reads.is_empty()
    }
}

/// How a chunk read for sending is checked before it goes out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Check {
    /// Against its BLAKE3 hash in the manifest.
    Hash,
    /// Only that the file still has the manifest's size and mtime (a pushing client's first send, [`Rehash`]).
    Identity {
        /// The manifest's file size.
        size: u64,
        /// The manifest's mtime.
        mtime: crate::manifest::FileTime,
    },
}

/// Reads one chunk into `data` (a recycled buffer) and checks it (`check`) before it may go out (proto-spec.md §4,
/// "Sender"): a chunk that no longer matches means the source changed, or, for a file the server committed, that
/// it is damaged at rest; either way its bytes never leave this side (the caller turns the error into
/// `SourceChanged`, `IntegrityFailed` or a tree's Abandon).
fn read_chunk(
    file: &File,
    index: u32,
    entry: &crate::manifest::ChunkEntry,
    check: Check,
    mut data: Vec<u8>,
) -> Result<Chunk, TransferError> {
    check_identity(file, check)?;
    read_exact_at(file, &mut data, entry.len as usize, entry.offset).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => TransferError::SourceChanged(format!(
            "file shrank below offset {}",
            entry.offset + u64::from(entry.len)
        )),
        _ => TransferError::SourceIo(e),
    })?;
    if check == Check::Hash && crate::verify::check_chunk(entry, &data).is_err() {
        return Err(TransferError::SourceChanged(format!(
            "chunk {index} at offset {} no longer matches the manifest",
            entry.offset
        )));
    }
    Ok(Chunk { index, data })
}

/// The file still has the size and mtime of its manifest, if `check` asks.
fn check_identity(file: &File, check: Check) -> Result<(), TransferError> {
    if let Check::Identity { size, mtime } = check {
        let meta = file.metadata().map_err(TransferError::SourceIo)?;
        if !crate::chunk::has_identity(&meta, size, mtime) {
            return Err(TransferError::SourceChanged(
                "its size or mtime changed since the manifest was built".into(),
            ));
        }
    }
    Ok(())
}

/// A chunk whose payload will go from the file to the socket: checked against the manifest's size and mtime
/// (`check`), and its range prefetched into the page cache here on a blocking thread, so that `sendfile` on the
/// runtime's thread seldom waits for the disk (a streamed offer's hashing read has usually just cached it).
fn check_in_file(
    file: &File,
    index: u32,
    entry: &crate::manifest::ChunkEntry,
    check: Check,
) -> Result<Ready, TransferError> {
    check_identity(file, check)?;
    let len = std::num::NonZeroU64::new(u64::from(entry.len));
    // Advice only: a failure costs nothing but the prefetch.
    let _ = rustix::fs::fadvise(file, entry.offset, len, rustix::fs::Advice::WillNeed);
    Ok(Ready::InFile {
        index,
        offset: entry.offset,
        len: entry.len,
    })
}

/// Fills `data` with the `len` bytes at `offset` of `file`, reading into its spare capacity: a recycled buffer is
/// not zeroed first only for the read to overwrite it.
fn read_exact_at(file: &File, data: &mut Vec<u8>, len: usize, offset: u64) -> std::io::Result<()> {
    data.clear();
    data.reserve(len);
    while data.len() < len {
        let at = offset + data.len() as u64;
        let want = len - data.len();
        let spare = &mut data.spare_capacity_mut()[..want];
        let (read, _) = rustix::io::pread(file, spare, at)?;
        if read.is_empty() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let n = read.len();
        // SAFETY: pread initialised the first `n` bytes of the spare capacity.
        unsafe { data.set_len(data.len() + n) };
    }
    Ok(())
}
