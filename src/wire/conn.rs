//! A connection: one byte stream plus its read buffer, speaking whole messages.
//!
//! [`Connection::read_message`] is cancel-safe (bytes already read stay in the buffer), so sessions can race it
//! against timers and shutdown in `select!`. A clean end of stream between frames is `Ok(None)`; one inside a frame
//! is [`WireError::Truncated`].

use std::time::Duration;

use bytes::{Buf, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::codec::{self, CodecError, LEN_PREFIX};
use super::message::Message;

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
}

/// Bytes handed to the socket per write call, so a write deadline measures progress, not frame size.
const WRITE_SLICE: usize = 256 * 1024;

/// A framed message stream over any async byte stream (TCP in production, in-memory pipes in tests).
pub struct Connection<S> {
    stream: S,
    read_buf: BytesMut,
    write_buf: Vec<u8>,
    max_frame: u32,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Wraps `stream`; frames larger than `max_frame` body bytes are refused in both directions.
    pub fn new(stream: S, max_frame: u32) -> Self {
        Connection {
            stream,
            read_buf: BytesMut::with_capacity(64 * 1024),
            write_buf: Vec::new(),
            max_frame,
        }
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
    /// deadline restarts with every byte, so a slow link moving a large frame is not cut off. Cancel-safe.
    pub async fn read_message_idle(&mut self, idle: Option<Duration>) -> Result<Option<Message>, WireError> {
        loop {
            if let Some((msg, used)) = codec::decode_frame(&self.read_buf, self.max_frame)? {
                self.read_buf.advance(used);
                self.shrink_read_buf();
                return Ok(Some(msg));
            }
            if let Some(len) = codec::frame_len(&self.read_buf, self.max_frame)? {
                // The length passed the limit check, so reserving it is bounded.
                self.read_buf.reserve(LEN_PREFIX + len - self.read_buf.len());
            }
            let n = within(idle, self.stream.read_buf(&mut self.read_buf)).await?;
            if n == 0 {
                return if self.read_buf.is_empty() {
                    Ok(None)
                } else {
                    Err(WireError::Truncated)
                };
            }
        }
    }

    /// Writes one message and flushes it.
    pub async fn write_message(&mut self, msg: &Message) -> Result<(), WireError> {
        self.write_message_idle(msg, None).await
    }

    /// Like [`Connection::write_message`], failing with [`WireError::Idle`] when the peer takes no byte for
    /// `idle`. Not cancel-safe: a cancelled write leaves a partial frame, so the connection must be dropped.
    pub async fn write_message_idle(&mut self, msg: &Message, idle: Option<Duration>) -> Result<(), WireError> {
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
        self.write_buf.clear();
        codec::encode_chunk_header(index, data.len(), self.max_frame, &mut self.write_buf)?;
        write_sliced(&mut self.stream, &self.write_buf, idle).await?;
        write_sliced(&mut self.stream, data, idle).await?;
        self.stream.flush().await?;
        Ok(())
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
}
