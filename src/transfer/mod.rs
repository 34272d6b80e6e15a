//! The transfer engine: the sender and receiver roles, written once for both directions.
//!
//! `push` makes the client the [`sender`] and the server the [`receiver`]; a later `pull` swaps them. Both roles
//! see only messages (never bytes), so they can be driven over an in-memory pipe in tests. The message order each
//! role follows is the state machine in proto-spec.md, "Message order".

pub mod claims;
mod commit;
pub mod handshake;
mod in_place;
pub mod join;
mod kept_prefix;
pub mod prune;
pub mod quota;
pub mod receiver;
mod reuse;
pub mod sender;
mod small_writer;
pub mod stats;
pub mod stream_offer;
pub mod stream_send;
pub mod tree_receiver;
pub mod tree_sender;
pub mod window;
mod writer;

#[cfg(test)]
mod pipeline_tests;
#[cfg(test)]
mod power_loss;
#[cfg(test)]
mod tests;

use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::storage::StorageError;
use crate::store::StoreError;
use crate::wire::{Connection, ErrorCode, ErrorFrame, Message, WireError};

/// A transfer failed. [`TransferError::code`] is what the peer is told; [`TransferError::is_retryable`] is what a
/// client's retry loop acts on.
#[derive(Debug, Error)]
pub enum TransferError {
    /// The connection failed or carried an undecodable frame.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The peer closed the connection where a message was due.
    #[error("connection closed by the peer while {0}")]
    Closed(&'static str),
    /// The peer was silent for too long.
    #[error("peer silent for {0:?} while {1}")]
    Timeout(Duration, &'static str),
    /// The peer sent a message that the protocol does not allow here.
    #[error("peer sent {got} while {state}")]
    Unexpected {
        /// The message received.
        got: &'static str,
        /// What we were doing.
        state: &'static str,
    },
    /// The peer sent an Error frame.
    #[error("{}: {} ({})", .0.code, .0.message, if .0.retryable { "retryable" } else { "not retryable" })]
    Remote(ErrorFrame),
    /// This side refuses the request (bad path, bad manifest, busy...).
    #[error("{message}")]
    Refused {
        /// The code to send.
        code: ErrorCode,
        /// The reason.
        message: String,
    },
    /// The source no longer matches its manifest.
    #[error("source changed: {0}")]
    SourceChanged(String),
    /// The source could not be read.
    #[error("reading the source: {0}")]
    SourceIo(std::io::Error),
    /// The receiver's storage failed.
    #[error("storage: {0}")]
    Storage(std::io::Error),
    /// The server could not be reached at all (no connection was made): where, and why in words.
    #[error("cannot reach {addr}: {reason}")]
    Unreachable {
        /// `HOST:PORT` as dialled.
        addr: String,
        /// What happened and what it means.
        reason: String,
    },
    /// The receiver's storage failed at a destination it names (relative to the root).
    #[error("the receiver cannot write {path}: {source}")]
    StorageAt {
        /// The remote path (or what of it failed).
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An assembled file or a Committed reply does not match the manifest.
    #[error("integrity check failed: {0}")]
    Integrity(String),
    /// This side is shutting down.
    #[error("shutting down")]
    ShuttingDown,
    /// A newer connection took over this transfer.
    #[error("a newer connection took over this transfer")]
    Superseded,
    /// Inside a tree, the sender gave up on the current file.
    #[error("the sender gave up on this file: {0}")]
    Abandoned(String),
    /// A request pipelined behind Hello (proto-spec.md §3, "Pipelining") that the version the server then chose
    /// does not have: the server refuses it, and the client asks again on a new connection in a way it knows.
    #[error("the server chose protocol version {version}, which has no {request}")]
    OlderPeer {
        /// The version in the server's Welcome.
        version: u16,
        /// The message the client had sent.
        request: &'static str,
    },
}

impl TransferError {
    /// The error code the peer is told.
    pub fn code(&self) -> ErrorCode {
        match self {
            TransferError::Wire(WireError::Codec(crate::wire::CodecError::FrameTooLarge { .. })) => {
                ErrorCode::FrameTooLarge
            }
            TransferError::Wire(WireError::TooSlow { .. }) => ErrorCode::Timeout,
            TransferError::Wire(WireError::Overloaded(_)) => ErrorCode::Overloaded,
            TransferError::Wire(WireError::TlsRecord) => ErrorCode::BadMagic,
            TransferError::Wire(_) => ErrorCode::Malformed,
            TransferError::Closed(_)
            | TransferError::Unexpected { .. }
            | TransferError::Abandoned(_)
            | TransferError::OlderPeer { .. } => ErrorCode::UnexpectedMessage,
            TransferError::Timeout(..) => ErrorCode::Timeout,
            // Never sent: there is no connection to send it on.
            TransferError::Unreachable { .. } => ErrorCode::Timeout,
            TransferError::Remote(frame) => frame.code,
            TransferError::Refused { code, .. } => *code,
            // ENOSPC, EFBIG (a file-size limit), EDQUOT: the receiver cannot store more, retrying will not help.
            TransferError::Storage(e) | TransferError::StorageAt { source: e, .. }
                if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EFBIG | libc::EDQUOT)) =>
            {
                ErrorCode::NoSpace
            }
            TransferError::Storage(_) | TransferError::StorageAt { .. } => ErrorCode::StorageIo,
            TransferError::Integrity(_) => ErrorCode::IntegrityFailed,
            TransferError::ShuttingDown => ErrorCode::ShuttingDown,
            TransferError::Superseded => ErrorCode::Superseded,
            TransferError::SourceChanged(_) => ErrorCode::SourceChanged,
            TransferError::SourceIo(_) | TransferError::Store(_) => ErrorCode::Internal,
        }
    }

    /// Whether a client should reconnect and try again.
    pub fn is_retryable(&self) -> bool {
        match self {
            TransferError::Wire(_)
            | TransferError::Closed(_)
            | TransferError::Timeout(..)
            | TransferError::Unreachable { .. }
            | TransferError::Unexpected { .. }
            | TransferError::OlderPeer { .. } => true,
            TransferError::Remote(frame) => frame.retryable,
            TransferError::Refused { code, .. } => code.retryable(),
            TransferError::ShuttingDown | TransferError::Superseded => true,
            TransferError::SourceChanged(_)
            | TransferError::SourceIo(_)
            | TransferError::Storage(_)
            | TransferError::StorageAt { .. }
            | TransferError::Store(_)
            | TransferError::Integrity(_)
            | TransferError::Abandoned(_) => false,
        }
    }

    /// Whether the peer is told it may retry (the Error frame's `retryable`): the code's rule (proto-spec.md §9),
    /// except that a storage error no retry can fix (permission denied, a read-only filesystem) is final.
    pub fn peer_may_retry(&self) -> bool {
        let permanent = match self {
            TransferError::Storage(e) | TransferError::StorageAt { source: e, .. } => is_permission_error(e),
            _ => false,
        };
        self.code().retryable() && !permanent
    }

    /// Whether the peer should be told about this error (it did not come from the peer or from a dead link).
    pub fn worth_telling_peer(&self) -> bool {
        !matches!(
            self,
            TransferError::Remote(_)
                | TransferError::Unreachable { .. }
                | TransferError::Closed(_)
                | TransferError::OlderPeer { .. }
                | TransferError::Wire(WireError::Io(_) | WireError::Truncated | WireError::Broken)
        )
    }

    /// A refusal with `code`.
    pub fn refused(code: ErrorCode, message: impl std::fmt::Display) -> Self {
        TransferError::Refused {
            code,
            message: message.to_string(),
        }
    }
}

pub use crate::storage::is_permission_error;
pub use stats::ReceiverStats;

impl From<StorageError> for TransferError {
    fn from(error: StorageError) -> Self {
        match error {
            StorageError::Io(e) => TransferError::Storage(e),
            StorageError::At { path, source } => unwritable(&path, source),
            StorageError::BadPath(refused) => TransferError::refused(ErrorCode::BadPath, refused),
            StorageError::Replaced(_) => TransferError::Integrity(error.to_string()),
            StorageError::Layout(too_long) => TransferError::refused(ErrorCode::BadPath, too_long),
            // Handled by the commit (asked for again); anywhere else, a retryable storage failure.
            StorageError::ChunksGone { .. } => TransferError::Storage(std::io::Error::other(error.to_string())),
        }
    }
}

/// A storage failure at `path`, logged on this side (the operator of a server that cannot write its destination
/// learns it from its log, not from the client's report).
pub fn unwritable(path: &str, source: std::io::Error) -> TransferError {
    tracing::warn!(path, error = %source, "cannot write the destination");
    TransferError::StorageAt {
        path: path.to_string(),
        source,
    }
}

/// Reads the next message. A peer's Error frame becomes [`TransferError::Remote`], end of stream
/// [`TransferError::Closed`], no byte for `idle` [`TransferError::Timeout`]; a Pong is skipped. Never
/// writes, so it is cancel-safe and fit for `select!`: a Ping is returned, and the caller answers it.
pub async fn next_message<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    idle: Duration,
    state: &'static str,
) -> Result<Message, TransferError> {
    loop {
        let read = conn
            .read_message_idle(Some(idle))
            .await
            .map_err(|e| timeout_as(e, state))?;
        match read {
            None => return Err(TransferError::Closed(state)),
            Some(Message::Error(frame)) => return Err(TransferError::Remote(frame)),
            Some(Message::Pong(_)) => {}
            Some(msg) => return Ok(msg),
        }
    }
}

/// A wire error, with "no progress" turned into [`TransferError::Timeout`] naming what we were doing.
fn timeout_as(error: WireError, state: &'static str) -> TransferError {
    match error {
        WireError::Idle(limit) => TransferError::Timeout(limit, state),
        other => TransferError::Wire(other),
    }
}

/// Largest first request a client sends before the Welcome arrived (proto-spec.md §3, "Pipelining"): what every
/// server reads and drops after refusing a handshake (1 MiB), so that the refusal's Error frame is not lost to a
/// reset of the connection.
pub const PIPELINED_FRAME_MAX: u32 = 1024 * 1024;

/// Sends `request`, the first of a connection whose Welcome may still be on its way (`welcome`, proto-spec.md §3,
/// "Pipelining"): right behind the handshake if its frame fits [`PIPELINED_FRAME_MAX`], else once the Welcome
/// arrived. Returns with the request sent and the Welcome read and checked. A write that fails before the Welcome
/// was read reports the server's Error frame instead, if one came (a refused handshake).
pub async fn send_first<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    mut welcome: Option<handshake::PendingWelcome>,
    request: &Message,
    timeout: Duration,
    state: &'static str,
) -> Result<(), TransferError> {
    if welcome.is_some() && !crate::wire::codec::fits(request, PIPELINED_FRAME_MAX) {
        welcomed(conn, welcome.take(), timeout).await?;
    }
    if let Err(failed) = send_within(conn, request, timeout, state).await {
        return Err(match welcome {
            Some(_) => refusal_behind(conn, failed).await,
            None => failed,
        });
    }
    welcomed(conn, welcome, timeout).await
}

/// A write that failed while the Welcome was on its way: the server may have refused the handshake and closed,
/// its Error frame already here. That frame (read within a second) says more than the failed write.
pub async fn refusal_behind<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    failed: TransferError,
) -> TransferError {
    match tokio::time::timeout(Duration::from_secs(1), next_message(conn, Duration::from_secs(1), "")).await {
        Ok(Err(refused @ TransferError::Remote(_))) => refused,
        _ => failed,
    }
}

/// Reads and checks the Welcome, if one is on its way.
async fn welcomed<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    welcome: Option<handshake::PendingWelcome>,
    timeout: Duration,
) -> Result<(), TransferError> {
    if let Some(pending) = welcome {
        pending.read(conn, timeout).await?;
    }
    Ok(())
}

/// Like [`next_message`], answering Pings on the way. Not cancel-safe (it may be writing a Pong): use it where
/// the read is not raced against anything.
pub async fn recv<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    timeout: Duration,
    state: &'static str,
) -> Result<Message, TransferError> {
    loop {
        match next_message(conn, timeout, state).await? {
            Message::Ping(nonce) => answer_ping(conn, nonce, timeout).await?,
            msg => return Ok(msg),
        }
    }
}

/// Answers a keep-alive Ping with its Pong.
pub async fn answer_ping<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    nonce: u64,
    idle: Duration,
) -> Result<(), TransferError> {
    send_within(conn, &Message::Pong(nonce), idle, "answering Ping").await
}

/// Tells the peer about `err` if that makes sense, best effort and bounded in time.
pub async fn tell_peer<S: AsyncRead + AsyncWrite + Unpin>(conn: &mut Connection<S>, err: &TransferError) {
    if !err.worth_telling_peer() {
        return;
    }
    let mut frame = ErrorFrame::new(err.code(), err.to_string());
    frame.retryable = err.peer_may_retry();
    let frame = Message::Error(frame);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        conn.write_message(&frame).await?;
        conn.shutdown().await
    })
    .await;
}

/// Writes `msg`, failing with [`TransferError::Timeout`] if the peer takes no byte of it for `idle`.
pub async fn send_within<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    msg: &Message,
    idle: Duration,
    state: &'static str,
) -> Result<(), TransferError> {
    conn.write_message_idle(msg, Some(idle))
        .await
        .map_err(|e| timeout_as(e, state))
}

/// How often a side busy with long local work (hashing, reuse, commit) pings its peer.
pub const KEEPALIVE: Duration = Duration::from_secs(5);

/// Runs disk work (hashing, reuse, commit) on a blocking thread while pinging the peer every [`KEEPALIVE`], so a
/// long local step does not look like a dead peer. A dead link does not abandon the work: it may own a partial and
/// a claim and must leave both consistent.
pub async fn with_keepalive<S: AsyncRead + AsyncWrite + Unpin, T: Send + 'static>(
    conn: &mut Connection<S>,
    idle: Duration,
    work: impl FnOnce() -> Result<T, TransferError> + Send + 'static,
) -> Result<T, TransferError> {
    let mut task = tokio::task::spawn_blocking(work);
    let mut nonce = 0;
    let mut pinging = true;
    loop {
        tokio::select! {
            done = &mut task => return done.map_err(|e| TransferError::Storage(std::io::Error::other(e)))?,
            _ = tokio::time::sleep(KEEPALIVE), if pinging => {
                nonce += 1;
                pinging = send_within(conn, &Message::Ping(nonce), idle, "working locally").await.is_ok();
            }
        }
    }
}

#[cfg(test)]
mod storage_error_tests {
    use super::*;

    /// A receiver that may not write (EACCES, EPERM, EROFS) tells the peer not to retry; other storage trouble
    /// (EIO) stays retryable, a full disk is NoSpace; the remote path is in the message.
    #[test]
    fn permission_errors_are_final_and_name_the_path() {
        let err = |code| std::io::Error::from_raw_os_error(code);
        for code in [libc::EACCES, libc::EPERM, libc::EROFS] {
            let e = unwritable("photos/a.jpg", err(code));
            assert_eq!(e.code(), ErrorCode::StorageIo);
            assert!(!e.peer_may_retry(), "{e}");
            assert!(e.to_string().contains("photos/a.jpg"), "{e}");
        }
        assert!(TransferError::Storage(err(libc::EIO)).peer_may_retry());
        assert!(!TransferError::Storage(err(libc::EACCES)).peer_may_retry());
        assert_eq!(unwritable("x", err(libc::ENOSPC)).code(), ErrorCode::NoSpace);
    }
}
