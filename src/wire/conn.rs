//! A connection: one byte stream plus its read buffer, speaking whole messages.
//!
//! [`Connection::read_message`] is cancel-safe (bytes already read stay in the buffer), so sessions can race it
//! against timers and shutdown in `select!`. A clean end of stream between frames is `Ok(None)`; one inside a frame
//! is [`WireError::Truncated`].
//!
//! A server also sets [`ReadLimits`]: big frame bodies are counted against a shared [`FrameBudget`] before they
//! are buffered, and every frame must keep a minimum average rate once it has started (proto-spec.md §1, §10), so
//! neither stalled partial frames nor byte-trickling can pin memory or a connection for long.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::budget::{FrameBudget, FrameGrant, SMALL_FRAME};
use super::codec::{self, CodecError, CHUNK_HEADER, LEN_PREFIX};
use super::message::{Chunk, Message};

/// Reading or writing a frame failed.
#[derive(Debug, Error)]
pub enum WireError {
    /// The socket failed.
    #[error("network I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A frame could not be encoded or decoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The peer closed the stream in the middle of a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// No byte moved for this long.
    #[error("no progress for {0:?}")]
    Idle(Duration),
    /// A frame arrived more slowly than the minimum rate allows ([`ReadLimits::min_rate`]).
    #[error("a frame of {len} bytes arrived slower than {min_rate} bytes/s after {grace:?} (only {received} bytes in {elapsed:?})")]
    TooSlow {
        /// The frame's body length, or 0 while its prefix was incomplete.
        len: usize,
        /// Bytes of it received.
        received: usize,
        /// Time since it started.
        elapsed: Duration,
        /// The rate required.
        min_rate: u64,
        /// The time every frame gets regardless of rate.
        grace: Duration,
    },
    /// The frame memory budget stayed spent, or this connection's partial frame was evicted for a newcomer.
    #[error("the server's frame memory budget is exhausted ({0})")]
    Overloaded(&'static str),
    /// The peer's first bytes are a TLS record: it speaks TLS where plain ferry frames were expected.
    #[error("the peer speaks TLS")]
    TlsRecord,
    /// The file a chunk's payload was being sent from ([`Connection::write_chunk_from_file`]) ended before the
    /// payload did: it shrank since its manifest was built. The frame is broken, and so is the connection.
    #[error("the source file ended at byte {0}, inside a chunk being sent")]
    SourceEnded(u64),
    /// An earlier write stopped inside a frame: the peer cannot find the next frame's start, so nothing more may be
    /// written on this connection.
    #[error("the connection was left inside a frame by an earlier failed write")]
    Broken,
}

/// How a connection reaches the plain TCP socket under its stream, if it may write to it directly (zero-copy
/// payloads, [`Connection::write_chunk_from_file`]): `None` for TLS, a rate limit, or any other wrapper that must
/// see every byte. A plain function, so the generic `Connection<S>` needs no extra bound on `S`.
pub type PlainSocket<S> = fn(&S) -> Option<&tokio::net::TcpStream>;

/// What a server allows a peer while it reads frames.
#[derive(Clone, Debug)]
pub struct ReadLimits {
    /// Bodies larger than [`SMALL_FRAME`] are counted here before they are buffered.
    pub budget: Arc<FrameBudget>,
    /// How long a frame may wait for room in the budget before the connection fails with
    /// [`WireError::Overloaded`].
    pub budget_wait: Duration,
    /// Once a frame has started, its bytes must arrive at this average rate (bytes per second) after `grace`:
    /// by `grace + received / min_rate` after its first byte the next byte must be there. 0: no minimum.
    pub min_rate: u64,
    /// Time every frame gets regardless of its rate.
    pub grace: Duration,
}

impl ReadLimits {
    /// When the frame that started at `started`, with `received` bytes so far, must have its next byte.
    fn frame_deadline(&self, started: Instant, received: usize) -> Option<Instant> {
        (self.min_rate > 0).then(|| {
            let earned = Duration::from_secs_f64(received as f64 / self.min_rate as f64);
            started + self.grace + earned
        })
    }
}

/// Bytes handed to the socket per write call, so a write deadline measures progress, not frame size.
const WRITE_SLICE: usize = 256 * 1024;

/// A framed message stream over any async byte stream (TCP in production, in-memory pipes in tests).
pub struct Connection<S> {
    stream: S,
    read_buf: BytesMut,
    write_buf: Vec<u8>,
    max_frame: u32,
    limits: Option<ReadLimits>,
    /// When the frame being read started (its first byte, or its budget grant for a big one).
    frame_started: Option<Instant>,
    /// The budget the frame being read holds.
    grant: Option<FrameGrant>,
    /// The budget of the last big frame decoded: its message (an `Offer` of a large manifest, say) lives on in the
    /// caller's hands, so its bytes stay counted until the caller comes back for the next frame.
    decoded: Option<FrameGrant>,
    /// The round trip measured when the connection opened (the client's Hello to the server's first answer).
    round_trip: Option<Duration>,
    /// The protocol version the handshake settled on, once the Welcome was sent or read.
    version: Option<u16>,
    /// The payload of the big `Chunk` frame being read, read straight into its own buffer (its header stays in
    /// `read_buf`), so that it is handed over as it is: not copied out of the read buffer, nor moved to its front.
    payload: Option<Payload>,
    /// Set by [`Connection::allow_zero_copy`]: the plain socket under the stream, for payloads sent from a file.
    plain: Option<PlainSocket<S>>,
    /// A write stopped inside a frame: every later write fails with [`WireError::Broken`].
    broken: bool,
}

/// A big chunk's payload while it arrives.
struct Payload {
    index: u32,
    len: usize,
    data: Vec<u8>,
}

/// Capacity of a fresh read buffer: a whole small frame fits.
const READ_BUF: usize = SMALL_FRAME + LEN_PREFIX;

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Wraps `stream`; frames larger than `max_frame` body bytes are refused in both directions.
    pub fn new(stream: S, max_frame: u32) -> Self {
        Connection {
            stream,
            read_buf: BytesMut::with_capacity(READ_BUF),
            write_buf: Vec::new(),
            max_frame,
            limits: None,
            frame_started: None,
            grant: None,
            decoded: None,
            round_trip: None,
            version: None,
            payload: None,
            plain: None,
            broken: false,
        }
    }

    /// Lets [`Connection::write_chunk_from_file`] send payloads straight from a file into the socket `plain` finds
    /// under the stream (when it finds one).
    pub fn allow_zero_copy(&mut self, plain: PlainSocket<S>) {
        self.plain = Some(plain);
    }

    /// Whether chunk payloads can go from a file to the socket without passing through this process
    /// ([`Connection::write_chunk_from_file`]).
    pub fn zero_copy(&self) -> bool {
        self.plain.is_some_and(|plain| plain(&self.stream).is_some())
    }

    /// Records the protocol version the handshake settled on (the Welcome's).
    pub fn set_version(&mut self, version: u16) {
        self.version = Some(version);
    }

    /// The protocol version the handshake settled on; `None` until the Welcome was sent or read.
    pub fn version(&self) -> Option<u16> {
        self.version
    }

    /// Records the round trip measured on this connection (by the handshake, before any data moved).
    pub fn set_round_trip(&mut self, round_trip: Duration) {
        self.round_trip = Some(round_trip);
    }

    /// The round trip measured when the connection opened, if it was.
    pub fn round_trip(&self) -> Option<Duration> {
        self.round_trip
    }

    /// Bounds what the peer can make this side buffer, and how slowly it may send a frame.
    pub fn set_read_limits(&mut self, limits: ReadLimits) {
        self.limits = Some(limits);
    }

    /// The underlying stream; bytes already read into the buffer (none between a peer's frames that were all
    /// read) are dropped.
    pub fn into_inner(self) -> S {
        self.stream
    }

    /// Changes the frame limit (e.g. raised after the handshake).
    pub fn set_max_frame(&mut self, max_frame: u32) {
        self.max_frame = max_frame;
    }

    /// Reads the next message; `Ok(None)` on a clean end of stream. Cancel-safe.
    pub async fn read_message(&mut self) -> Result<Option<Message>, WireError> {
        self.read_message_idle(None).await
    }

    /// Like [`Connection::read_message`], failing with [`WireError::Idle`] when no byte arrives for `idle`. The
    /// deadline restarts with every byte, so a slow link moving a large frame is not cut off (unless
    /// [`ReadLimits`] set a minimum rate). Cancel-safe.
    pub async fn read_message_idle(&mut self, idle: Option<Duration>) -> Result<Option<Message>, WireError> {
        // The caller is done with the message it read last: what it held goes back to the budget.
        self.decoded = None;
        loop {
            if let Some(chunk) = self.take_chunk_frame()?.or_else(|| self.take_payload()) {
                self.frame_done();
                return Ok(Some(chunk));
            }
            let mut rest = None;
            if self.payload.is_none() {
                if let Some((msg, used)) =
                    codec::decode_frame(&self.read_buf, self.max_frame).map_err(|e| self.explain(e))?
                {
                    self.read_buf.advance(used);
                    self.frame_done();
                    return Ok(Some(msg));
                }
                if let Some(len) = codec::frame_len(&self.read_buf, self.max_frame).map_err(|e| self.explain(e))? {
                    // The length passed the limit check, so reserving it is bounded.
                    let total = LEN_PREFIX + len;
                    if len > SMALL_FRAME {
                        self.admit(total, idle).await?;
                    }
                    if !self.start_payload(len)? {
                        self.read_buf.reserve(total - self.read_buf.len());
                        rest = Some(total - self.read_buf.len());
                    }
                }
            }
            // A partial frame left in the buffer starts its clock when the caller reads again, not while the caller
            // was busy elsewhere (a commit, a full write queue).
            if self.frame_started.is_none() && !self.read_buf.is_empty() {
                self.frame_started = Some(Instant::now());
            }
            let limit = self.read_limit(idle)?;
            let n = match (&mut self.payload, rest, &self.grant) {
                // A chunk's payload is read to its end and no further, into its own buffer.
                (Some(payload), _, _) => {
                    let stream = (&mut self.stream).take((payload.len - payload.data.len()) as u64);
                    read_within(limit, stream, &mut payload.data).await?
                }
                // A budgeted frame is read to its end and no further, so its buffer can go once it is decoded.
                (None, Some(rest), Some(_)) => {
                    let stream = (&mut self.stream).take(rest as u64);
                    read_within(limit, stream, &mut self.read_buf).await?
                }
                _ => read_within(limit, &mut self.stream, &mut self.read_buf).await?,
            };
            if n == 0 {
                return if self.read_buf.is_empty() {
                    Ok(None)
                } else {
                    Err(WireError::Truncated)
                };
            }
            self.frame_started.get_or_insert_with(Instant::now);
        }
    }

    /// A whole big `Chunk` frame that is all the buffer holds (a budgeted frame is read to its end and no further;
    /// one whose payload was not started in a buffer of its own, [`Connection::start_payload`]) becomes the chunk, its payload kept in the buffer's own allocation (moved to its front) instead of being
    /// copied into a fresh one whose every page would fault in; the connection reads on into a new buffer.
    fn take_chunk_frame(&mut self) -> Result<Option<Message>, WireError> {
        let Some((index, len)) = codec::chunk_frame(&self.read_buf, self.max_frame).map_err(|e| self.explain(e))?
        else {
            return Ok(None);
        };
        if len <= SMALL_FRAME || self.read_buf.len() != CHUNK_HEADER + len {
            return Ok(None);
        }
        let mut frame = std::mem::replace(&mut self.read_buf, BytesMut::with_capacity(READ_BUF));
        frame.advance(CHUNK_HEADER);
        Ok(Some(Message::Chunk(Chunk {
            index,
            data: Vec::from(frame),
        })))
    }

    /// Once the header of a big `Chunk` frame of `len` body bytes is in the buffer (and the frame is not whole
    /// yet), moves the payload bytes read so far into a buffer of the payload's size, which the rest is read into;
    /// true if it did.
    fn start_payload(&mut self, len: usize) -> Result<bool, WireError> {
        if len <= SMALL_FRAME || self.read_buf.len() >= LEN_PREFIX + len {
            return Ok(false);
        }
        let Some((index, payload_len)) =
            codec::chunk_header(&self.read_buf, self.max_frame).map_err(|e| self.explain(e))?
        else {
            return Ok(false);
        };
        // Bounded: the frame's length passed the limit check (and its budget was granted).
        let mut data = Vec::with_capacity(payload_len);
        data.extend_from_slice(&self.read_buf[CHUNK_HEADER..]);
        self.read_buf.truncate(CHUNK_HEADER);
        self.payload = Some(Payload {
            index,
            len: payload_len,
            data,
        });
        Ok(true)
    }

    /// The chunk whose payload is all read, its header dropped from the buffer.
    fn take_payload(&mut self) -> Option<Message> {
        if self.payload.as_ref()?.data.len() < self.payload.as_ref()?.len {
            return None;
        }
        let Payload { index, data, .. } = self.payload.take()?;
        self.read_buf.clear();
        Some(Message::Chunk(Chunk { index, data }))
    }

    /// Bytes of the frame being read that have arrived.
    fn frame_received(&self) -> usize {
        self.read_buf.len() + self.payload.as_ref().map_or(0, |p| p.data.len())
    }

    /// Takes budget for a frame of `total` bytes (once per frame); its rate clock starts when it is granted.
    async fn admit(&mut self, total: usize, idle: Option<Duration>) -> Result<(), WireError> {
        let Some(limits) = &self.limits else {
            return Ok(());
        };
        if self.grant.is_some() {
            return Ok(());
        }
        let wait = idle.map_or(limits.budget_wait, |idle| idle.min(limits.budget_wait));
        let grant = limits
            .budget
            .acquire(total as u64, wait)
            .await
            .ok_or(WireError::Overloaded("no room for this frame"))?;
        self.grant = Some(grant);
        self.frame_started = Some(Instant::now());
        Ok(())
    }

    /// How long the next read may take: the idle limit, or less if the frame's minimum rate says so.
    fn read_limit(&self, idle: Option<Duration>) -> Result<ReadLimit, WireError> {
        let frame = self
            .limits
            .as_ref()
            .zip(self.frame_started)
            .and_then(|(limits, started)| {
                let deadline = limits.frame_deadline(started, self.frame_received())?;
                Some((limits, started, deadline))
            });
        let Some((limits, started, deadline)) = frame else {
            return Ok(ReadLimit::idle(idle, self.evicted()));
        };
        let now = Instant::now();
        let slow = WireError::TooSlow {
            len: codec::frame_len(&self.read_buf, u32::MAX).ok().flatten().unwrap_or(0),
            received: self.frame_received(),
            elapsed: now - started,
            min_rate: limits.min_rate,
            grace: limits.grace,
        };
        let left = deadline.saturating_duration_since(now);
        if left.is_zero() {
            return Err(slow);
        }
        Ok(match idle {
            Some(idle) if idle <= left => ReadLimit::idle(Some(idle), self.evicted()),
            _ => ReadLimit {
                limit: Some(left),
                slow: Some(slow),
                evicted: self.evicted(),
            },
        })
    }

    fn evicted(&self) -> Option<tokio_util::sync::CancellationToken> {
        self.grant.as_ref().map(|g| g.evicted().clone())
    }

    /// A frame was decoded: the buffer that held a big one is freed, and its budget moves to the decoded message
    /// until the caller reads again (a decoded manifest costs about what its frame did, so offers waiting for their
    /// turn cannot pile up decoded manifests beyond the budget either).
    fn frame_done(&mut self) {
        self.frame_started = None;
        if let Some(grant) = self.grant.take() {
            self.decoded = Some(grant);
            let mut fresh = BytesMut::with_capacity(READ_BUF.max(self.read_buf.len()));
            fresh.extend_from_slice(&self.read_buf);
            self.read_buf = fresh;
        } else {
            self.shrink_read_buf();
        }
    }

    /// A codec error, recognising a TLS record where a frame prefix was expected.
    fn explain(&self, error: CodecError) -> WireError {
        if matches!(error, CodecError::FrameTooLarge { .. }) && codec::looks_like_tls(&self.read_buf) {
            return WireError::TlsRecord;
        }
        WireError::Codec(error)
    }

    /// Writes one message and flushes it.
    pub async fn write_message(&mut self, msg: &Message) -> Result<(), WireError> {
        self.write_message_idle(msg, None).await
    }

    /// Like [`Connection::write_message`], failing with [`WireError::Idle`] when the peer takes no byte for
    /// `idle`. Not cancel-safe: a cancelled write leaves a partial frame, so the connection must be dropped.
    pub async fn write_message_idle(&mut self, msg: &Message, idle: Option<Duration>) -> Result<(), WireError> {
        self.check_whole()?;
        self.write_buf.clear();
        codec::encode_frame(msg, self.max_frame, &mut self.write_buf)?;
        write_sliced(&mut self.stream, &self.write_buf, idle).await?;
        self.stream.flush().await?;
        if self.write_buf.capacity() > 4 * 1024 * 1024 && !matches!(msg, Message::Chunk(_)) {
            self.write_buf = Vec::new();
        }
        Ok(())
    }

    /// Writes a `Chunk` frame straight from `data`: the same bytes as `write_message(&Message::Chunk(..))`, without
    /// first copying the payload into the write buffer. Not cancel-safe, like [`Connection::write_message_idle`].
    pub async fn write_chunk(&mut self, index: u32, data: &[u8], idle: Option<Duration>) -> Result<(), WireError> {
        self.check_whole()?;
        self.write_buf.clear();
        codec::encode_chunk_header(index, data.len(), self.max_frame, &mut self.write_buf)?;
        write_sliced(&mut self.stream, &self.write_buf, idle).await?;
        write_sliced(&mut self.stream, data, idle).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Writes a `Chunk` frame whose payload is the `len` bytes of `file` at `offset`: the header from the write
    /// buffer through the stream, then the payload with `sendfile(2)` from the file into the socket, so it is
    /// neither read into this process nor copied out of it. The bytes on the wire are those of
    /// [`Connection::write_chunk`]. Each `sendfile` call must make progress within `idle`.
    ///
    /// Only where [`Connection::zero_copy`] says so (else [`WireError::Io`] `Unsupported`, nothing written). A file
    /// that ends before the payload does is [`WireError::SourceEnded`]; after it, or any failure once the header is
    /// out, the frame is broken and every later write fails with [`WireError::Broken`]: drop the connection. Not
    /// cancel-safe, like [`Connection::write_chunk`].
    ///
    /// A page-cache miss makes `sendfile` wait for the disk on the calling thread; callers prefetch the range
    /// (`POSIX_FADV_WILLNEED`) on a blocking thread first.
    pub async fn write_chunk_from_file(
        &mut self,
        index: u32,
        file: &std::fs::File,
        offset: u64,
        len: usize,
        idle: Option<Duration>,
    ) -> Result<(), WireError> {
        self.check_whole()?;
        if !self.zero_copy() {
            return Err(WireError::Io(std::io::ErrorKind::Unsupported.into()));
        }
        self.write_buf.clear();
        codec::encode_chunk_header(index, len, self.max_frame, &mut self.write_buf)?;
        self.broken = true;
        write_sliced(&mut self.stream, &self.write_buf, idle).await?;
        // Nothing of the header may wait in the stream while the payload goes around it.
        self.stream.flush().await?;
        let plain = self.plain.expect("checked by zero_copy");
        let socket = plain(&self.stream).expect("checked by zero_copy");
        send_file(socket, file, offset, len, idle).await?;
        self.broken = false;
        Ok(())
    }

    fn check_whole(&self) -> Result<(), WireError> {
        match self.broken {
            true => Err(WireError::Broken),
            false => Ok(()),
        }
    }

    /// Reads and drops whatever the peer still sends, until it closes, 1 MiB has passed, or `until`; so that closing
    /// after an Error frame does not reset the connection before the peer has read the frame.
    pub async fn drain(&mut self, until: Instant) {
        self.drain_at_most(until, 1024 * 1024).await;
    }

    /// [`Connection::drain`] with a bound of `max` bytes instead of 1 MiB: after a session's Error frame, the
    /// peer may still have a whole window of chunks in flight, and closing with them unread would reset the
    /// connection and lose the Error frame before the peer read it.
    pub async fn drain_at_most(&mut self, until: Instant, max: usize) {
        self.payload = None;
        let mut left = max;
        let mut sink = [0u8; 8192];
        while left > 0 {
            match tokio::time::timeout_at(until, self.stream.read(&mut sink)).await {
                Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
                _ => return,
            }
        }
    }

    /// Shuts down the write side, telling the peer no more frames follow.
    pub async fn shutdown(&mut self) -> Result<(), WireError> {
        self.stream.shutdown().await?;
        Ok(())
    }

    /// Frees a large read buffer once it is empty, so one big manifest does not pin memory for a session's life.
    fn shrink_read_buf(&mut self) {
        if self.read_buf.is_empty() && self.read_buf.capacity() > 4 * 1024 * 1024 {
            self.read_buf = BytesMut::with_capacity(64 * 1024);
        }
    }
}

/// Writes all of `bytes` in calls of at most [`WRITE_SLICE`], each of which must make progress within `idle` (a
/// slow link, or a `--bwlimit`, that keeps taking bytes is never cut off).
async fn write_sliced<S: AsyncWrite + Unpin>(
    stream: &mut S,
    bytes: &[u8],
    idle: Option<Duration>,
) -> Result<(), WireError> {
    let mut written = 0;
    while written < bytes.len() {
        let end = (written + WRITE_SLICE).min(bytes.len());
        let n = within(idle, stream.write(&bytes[written..end])).await?;
        if n == 0 {
            return Err(WireError::Io(std::io::ErrorKind::WriteZero.into()));
        }
        written += n;
    }
    Ok(())
}

/// Sends the `len` bytes of `file` at `offset` into the nonblocking `socket` with `sendfile(2)`, waiting for
/// room with the runtime's readiness; each call (of at most [`WRITE_SLICE`] bytes) must make progress within
/// `idle`. A call that moves nothing before `len` is [`WireError::SourceEnded`].
async fn send_file(
    socket: &tokio::net::TcpStream,
    file: &std::fs::File,
    mut offset: u64,
    len: usize,
    idle: Option<Duration>,
) -> Result<(), WireError> {
    let end = offset + len as u64;
    while offset < end {
        let want = ((end - offset) as usize).min(WRITE_SLICE);
        let sent = within(idle, async {
            loop {
                socket.writable().await?;
                let sent = socket.try_io(tokio::io::Interest::WRITABLE, || {
                    Ok(rustix::fs::sendfile(socket, file, Some(&mut offset), want)?)
                });
                match sent {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    other => return other,
                }
            }
        })
        .await?;
        if sent == 0 {
            return Err(WireError::SourceEnded(offset));
        }
    }
    Ok(())
}

/// The bounds of one read: a time limit (an idle limit, or the frame's rate deadline with the error it gives) and
/// the eviction of the frame's budget.
struct ReadLimit {
    limit: Option<Duration>,
    slow: Option<WireError>,
    evicted: Option<tokio_util::sync::CancellationToken>,
}

impl ReadLimit {
    fn idle(idle: Option<Duration>, evicted: Option<tokio_util::sync::CancellationToken>) -> ReadLimit {
        ReadLimit {
            limit: idle,
            slow: None,
            evicted,
        }
    }
}

/// One read into `buf` within `bounds`.
async fn read_within<R: AsyncRead + Unpin, B: BufMut>(
    bounds: ReadLimit,
    mut reader: R,
    buf: &mut B,
) -> Result<usize, WireError> {
    let ReadLimit { limit, slow, evicted } = bounds;
    let evicted = async {
        match &evicted {
            Some(token) => token.cancelled().await,
            None => std::future::pending().await,
        }
    };
    let read = async {
        match limit {
            Some(limit) => tokio::time::timeout(limit, reader.read_buf(buf))
                .await
                .map_err(|_| slow.unwrap_or(WireError::Idle(limit)))?
                .map_err(WireError::Io),
            None => reader.read_buf(buf).await.map_err(WireError::Io),
        }
    };
    tokio::select! {
        read = read => read,
        () = evicted => Err(WireError::Overloaded("this connection's partial frame was evicted for another")),
    }
}

/// Runs one socket call, failing with [`WireError::Idle`] if it makes no progress within `idle`.
async fn within<T>(
    idle: Option<Duration>,
    io: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, WireError> {
    match idle {
        Some(limit) => Ok(tokio::time::timeout(limit, io)
            .await
            .map_err(|_| WireError::Idle(limit))??),
        None => Ok(io.await?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Chunk;

    /// A big `Chunk` frame's payload is handed over in the buffer it was read into: reading it allocates about one
    /// payload, not two (copying it into a fresh `Vec` cost a receiver the copy and a page fault per 4 KiB).
    #[test]
    fn a_big_chunk_is_read_without_copying_its_payload() {
        use tokio::io::AsyncWriteExt;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        let chunk = Message::Chunk(Chunk {
            index: 9,
            data: data.clone(),
        });
        let mut frame = Vec::new();
        codec::encode_frame(&chunk, crate::MAX_FRAME, &mut frame).unwrap();
        let (mut tx, rx) = tokio::io::duplex(frame.len() + 1);
        runtime.block_on(tx.write_all(&frame)).unwrap();
        let mut conn = Connection::new(rx, crate::MAX_FRAME);
        let (read, allocated) =
            super::super::frame_fuzz::allocated_bytes(|| runtime.block_on(conn.read_message()).unwrap());
        assert_eq!(read, Some(chunk));
        assert!(
            allocated < data.len() * 3 / 2,
            "{allocated} bytes allocated to read a chunk of {} bytes",
            data.len()
        );
    }

    /// A big chunk arriving in pieces (as from a socket) is read straight into a buffer of the payload's size: the
    /// `Vec` handed over is exactly the payload's allocation, so no byte of it was moved to the front of the read
    /// buffer (the memmove of every payload that cost a receiver about 4 % of its CPU). Of two chunks back to back,
    /// the first comes out whole, and the second, cut, is still an error.
    #[test]
    fn a_big_chunk_arriving_in_pieces_is_read_into_a_buffer_of_its_own() {
        use tokio::io::AsyncWriteExt;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let chunk = |index: u32| {
            Message::Chunk(Chunk {
                index,
                data: (0..(1u32 << 20) + 7).map(|i| (i % 251) as u8 ^ index as u8).collect(),
            })
        };
        let mut frames = Vec::new();
        for index in [3, 4] {
            codec::encode_frame(&chunk(index), crate::MAX_FRAME, &mut frames).unwrap();
        }
        let cut = frames.len() - 100;
        let (mut tx, rx) = tokio::io::duplex(64 * 1024);
        let mut conn = Connection::new(rx, crate::MAX_FRAME);
        runtime.block_on(async {
            let writer = async {
                tx.write_all(&frames[..cut]).await.unwrap();
                drop(tx);
            };
            let reader = async {
                match conn.read_message().await {
                    Ok(Some(Message::Chunk(got))) => {
                        assert_eq!(Message::Chunk(got.clone()), chunk(3));
                        assert_eq!(got.data.capacity(), got.data.len(), "read into a buffer of its own");
                    }
                    other => panic!("the first chunk: {other:?}"),
                }
                assert!(matches!(conn.read_message().await, Err(WireError::Truncated)));
            };
            tokio::join!(writer, reader);
        });
    }

    /// A frame that only looks like a chunk at first (its payload length does not fill the body) is left to the
    /// decoder, which refuses it, as before.
    #[test]
    fn a_chunk_frame_whose_length_disagrees_is_refused() {
        let mut frame = Vec::new();
        codec::encode_frame(
            &Message::Chunk(Chunk {
                index: 1,
                data: vec![1; 128 * 1024],
            }),
            crate::MAX_FRAME,
            &mut frame,
        )
        .unwrap();
        frame[CHUNK_HEADER - 8..CHUNK_HEADER].copy_from_slice(&(128u64 * 1024 - 1).to_le_bytes());
        assert_eq!(codec::chunk_frame(&frame, crate::MAX_FRAME).unwrap(), None);
        assert!(codec::decode_frame(&frame, crate::MAX_FRAME).is_err());
    }

    /// A connection over a plain TCP socket on loopback that allows zero copy, and the peer's end. Its send buffer
    /// is small, so a payload of a few MiB fills it many times over and the sender must wait for room (EAGAIN).
    async fn zero_copy_pair() -> (Connection<tokio::net::TcpStream>, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_send_buffer_size(16 * 1024).unwrap();
        let (client, accepted) = tokio::join!(socket.connect(addr), listener.accept());
        let mut conn = Connection::new(client.unwrap(), crate::MAX_FRAME);
        conn.allow_zero_copy(itself);
        (conn, accepted.unwrap().0)
    }

    /// A payload sent from a file with `sendfile` is the same bytes on the wire as one written from memory, with
    /// the frames before and after it intact; 3 MiB is far more than the socket takes at once, so the sender
    /// waits for room (EAGAIN, then readiness) and sends in many calls.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_chunk_sent_from_a_file_is_the_same_bytes_as_one_sent_from_memory() {
        let data: Vec<u8> = (0..3 * 1024 * 1024 + 7).map(|i| (i * 31 % 251) as u8).collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("source");
        std::fs::write(&path, [&b"prefix"[..], &data].concat()).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let (mut conn, mut peer) = zero_copy_pair().await;
        assert!(conn.zero_copy());
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            peer.read_to_end(&mut all).await.unwrap();
            all
        });
        let idle = Some(Duration::from_secs(60));
        conn.write_message(&Message::Ping(4)).await.unwrap();
        conn.write_chunk_from_file(9, &file, 6, data.len(), idle).await.unwrap();
        conn.write_message(&Message::Ping(5)).await.unwrap();
        conn.shutdown().await.unwrap();
        let mut expected = Vec::new();
        for msg in [
            Message::Ping(4),
            Message::Chunk(Chunk { index: 9, data }),
            Message::Ping(5),
        ] {
            codec::encode_frame(&msg, crate::MAX_FRAME, &mut expected).unwrap();
        }
        assert!(reader.await.unwrap() == expected, "the bytes on the wire differ");
    }

    /// A file that ends inside the payload being sent (it shrank): `SourceEnded`, and the connection, left inside a
    /// frame, refuses every later write instead of sending a frame the peer would misread.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_ending_inside_a_payload_breaks_the_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("source");
        std::fs::write(&path, [7u8; 100]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let (mut conn, _peer) = zero_copy_pair().await;
        let idle = Some(Duration::from_secs(60));
        let sent = conn.write_chunk_from_file(0, &file, 50, 100, idle).await;
        assert!(matches!(sent, Err(WireError::SourceEnded(100))), "{sent:?}");
        let after = conn.write_message(&Message::Commit).await;
        assert!(matches!(after, Err(WireError::Broken)), "{after:?}");
        let after = conn.write_chunk(1, b"bytes", idle).await;
        assert!(matches!(after, Err(WireError::Broken)), "{after:?}");
    }

    /// Without a plain socket to write to (a test pipe here; TLS or a rate limit in the client), a payload is never
    /// sent from a file: nothing is written and the connection stays usable.
    #[tokio::test]
    async fn a_stream_without_a_plain_socket_has_no_zero_copy() {
        let file = tempfile::tempfile().unwrap();
        let (a, b) = tokio::io::duplex(1024);
        let mut conn = Connection::new(a, crate::MAX_FRAME);
        conn.allow_zero_copy(|_| None);
        assert!(!conn.zero_copy());
        let sent = conn.write_chunk_from_file(0, &file, 0, 1, None).await;
        assert!(
            matches!(&sent, Err(WireError::Io(e)) if e.kind() == std::io::ErrorKind::Unsupported),
            "{sent:?}"
        );
        conn.write_message(&Message::Commit).await.unwrap();
        let mut peer = Connection::new(b, crate::MAX_FRAME);
        assert_eq!(peer.read_message().await.unwrap(), Some(Message::Commit));
    }

    fn itself(socket: &tokio::net::TcpStream) -> Option<&tokio::net::TcpStream> {
        Some(socket)
    }

    fn big_chunk() -> Message {
        Message::Chunk(Chunk {
            index: 0,
            data: vec![7; 256 * 1024],
        })
    }

    /// A slow peer that keeps taking bytes never trips the idle deadline, however long the frame takes.
    #[tokio::test(start_paused = true)]
    async fn idle_deadlines_measure_progress_not_frame_time() {
        let (a, mut b) = tokio::io::duplex(16 * 1024);
        let slow_reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            let mut total = 0;
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                match b.read(&mut buf).await.unwrap() {
                    0 => return total,
                    n => total += n,
                }
            }
        });
        let mut conn = Connection::new(a, crate::MAX_FRAME);
        let started = tokio::time::Instant::now();
        conn.write_message_idle(&big_chunk(), Some(Duration::from_millis(500)))
            .await
            .unwrap();
        assert!(
            started.elapsed() > Duration::from_secs(1),
            "the frame took longer than the idle limit"
        );
        drop(conn);
        assert!(slow_reader.await.unwrap() > 256 * 1024);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_trips_the_idle_deadline() {
        let (a, _b) = tokio::io::duplex(16 * 1024);
        let mut conn = Connection::new(a, crate::MAX_FRAME);
        let write = conn
            .write_message_idle(&big_chunk(), Some(Duration::from_millis(500)))
            .await;
        assert!(matches!(write, Err(WireError::Idle(_))));
        let read = conn.read_message_idle(Some(Duration::from_millis(500))).await;
        assert!(matches!(read, Err(WireError::Idle(_))));
    }

    fn limits(budget: &Arc<FrameBudget>, min_rate: u64, grace: Duration) -> ReadLimits {
        ReadLimits {
            budget: budget.clone(),
            budget_wait: Duration::from_secs(5),
            min_rate,
            grace,
        }
    }

    /// A frame trickled a byte at a time is cut once it falls behind the minimum rate, although every byte would
    /// reset an idle deadline.
    #[tokio::test(start_paused = true)]
    async fn a_trickled_frame_is_cut_at_its_rate_deadline() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut conn = Connection::new(a, crate::MAX_FRAME);
        let budget = FrameBudget::new(crate::MAX_FRAME as u64 * 2);
        conn.set_read_limits(limits(&budget, 100, Duration::from_secs(2)));
        let trickle = tokio::spawn(async move {
            b.write_all(&1000u32.to_be_bytes()).await.unwrap();
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_millis(250)).await;
                if b.write_all(&[0]).await.is_err() {
                    return;
                }
            }
        });
        let started = Instant::now();
        let read = conn.read_message_idle(Some(Duration::from_secs(1))).await;
        let cut = started.elapsed();
        assert!(matches!(read, Err(WireError::TooSlow { .. })), "{read:?}");
        // 2 s of grace plus 1/100 s per byte received (4 + ~8 bytes).
        assert!(cut >= Duration::from_secs(2) && cut < Duration::from_secs(3), "{cut:?}");
        trickle.abort();
    }

    /// Big frames take their bytes from the shared budget before they are buffered and give them back once
    /// decoded; a frame that finds the budget spent waits without buffering.
    #[tokio::test(start_paused = true)]
    async fn big_frames_are_buffered_within_the_budget() {
        let frame = |fill: u8| {
            let mut bytes = Vec::new();
            let chunk = Message::Chunk(Chunk {
                index: 0,
                data: vec![fill; 200 * 1024],
            });
            codec::encode_frame(&chunk, crate::MAX_FRAME, &mut bytes).unwrap();
            bytes
        };
        let whole = frame(1).len() as u64;
        let budget = FrameBudget::new(whole);
        let (a1, mut b1) = tokio::io::duplex(1 << 20);
        let (a2, mut b2) = tokio::io::duplex(1 << 20);
        let mut first = Connection::new(a1, crate::MAX_FRAME);
        let mut second = Connection::new(a2, crate::MAX_FRAME);
        first.set_read_limits(limits(&budget, 0, Duration::from_secs(1)));
        second.set_read_limits(limits(&budget, 0, Duration::from_secs(1)));
        let (f1, f2) = (frame(1), frame(2));
        b1.write_all(&f1[..f1.len() - 1]).await.unwrap();
        b2.write_all(&f2).await.unwrap();
        let stalled = tokio::time::timeout(Duration::from_millis(100), first.read_message()).await;
        assert!(stalled.is_err(), "the first frame is still partial");
        assert_eq!(budget.in_use(), whole, "its bytes are counted");
        let waiting = tokio::time::timeout(Duration::from_millis(100), second.read_message()).await;
        assert!(waiting.is_err(), "no room: the second frame waits");
        assert!(
            second.read_buf.len() <= LEN_PREFIX + SMALL_FRAME,
            "and is not buffered meanwhile"
        );
        b1.write_all(&f1[f1.len() - 1..]).await.unwrap();
        assert!(matches!(first.read_message().await, Ok(Some(Message::Chunk(_)))));
        assert_eq!(
            budget.in_use(),
            whole,
            "the decoded message counts until its reader comes back for the next frame"
        );
        let nothing_more = tokio::time::timeout(Duration::from_millis(10), first.read_message()).await;
        assert!(nothing_more.is_err());
        assert_eq!(
            budget.in_use(),
            0,
            "coming back (even a read that is cancelled) gives it back"
        );
        assert!(
            first.read_buf.capacity() <= READ_BUF,
            "the big buffer went with its budget"
        );
        assert!(matches!(second.read_message().await, Ok(Some(Message::Chunk(c))) if c.data[0] == 2));
        assert_eq!(budget.in_use(), whole, "now the second reader's message is held");
        drop(second);
        assert_eq!(budget.in_use(), 0, "and a connection that ends gives everything back");
    }

    #[tokio::test]
    async fn a_tls_record_is_recognised_where_a_frame_was_due() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut conn = Connection::new(a, crate::HANDSHAKE_MAX_FRAME);
        b.write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x32]).await.unwrap();
        assert!(matches!(conn.read_message().await, Err(WireError::TlsRecord)));
        let (a, mut b) = tokio::io::duplex(1024);
        let mut conn = Connection::new(a, crate::HANDSHAKE_MAX_FRAME);
        b.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(matches!(
            conn.read_message().await,
            Err(WireError::Codec(CodecError::FrameTooLarge { .. }))
        ));
    }

    /// The rate clock of a partial frame left in the buffer runs only while the caller reads: a session busy for
    /// longer than the grace (a long commit) does not find its next frame late.
    #[tokio::test(start_paused = true)]
    async fn a_leftover_partial_frame_is_timed_from_the_next_read() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut conn = Connection::new(a, crate::MAX_FRAME);
        conn.set_read_limits(limits(
            &FrameBudget::new(crate::MAX_FRAME as u64 * 2),
            1000,
            Duration::from_secs(1),
        ));
        let mut bytes = Vec::new();
        codec::encode_frame(&Message::Ping(1), crate::MAX_FRAME, &mut bytes).unwrap();
        codec::encode_frame(&Message::Ping(2), crate::MAX_FRAME, &mut bytes).unwrap();
        b.write_all(&bytes[..bytes.len() - 1]).await.unwrap();
        assert!(matches!(conn.read_message().await, Ok(Some(Message::Ping(1)))));
        tokio::time::sleep(Duration::from_secs(30)).await;
        let rest = bytes[bytes.len() - 1..].to_vec();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            b.write_all(&rest).await.unwrap();
            b
        });
        assert!(matches!(conn.read_message().await, Ok(Some(Message::Ping(2)))));
    }
}
