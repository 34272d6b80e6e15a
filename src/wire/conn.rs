//! A connection: one byte stream plus its read buffer, speaking whole messages.
//!
//! [`Connection::read_message`] is cancel-safe (bytes already read stay in the buffer), so sessions can race it
//! against timers and shutdown in `select!`. A clean end of stream between frames is `Ok(None)`; one inside a frame
//! is [`WireError::Truncated`].

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
}

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

    /// Reads the next message; `Ok(None)` on a clean end of stream. Cancel-safe.
    pub async fn read_message(&mut self) -> Result<Option<Message>, WireError> {
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
            if self.stream.read_buf(&mut self.read_buf).await? == 0 {
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
        self.write_buf.clear();
        codec::encode_frame(msg, self.max_frame, &mut self.write_buf)?;
        self.stream.write_all(&self.write_buf).await?;
        self.stream.flush().await?;
        if self.write_buf.capacity() > 4 * 1024 * 1024 && msg.name() != "Chunk" {
            self.write_buf = Vec::new();
        }
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
