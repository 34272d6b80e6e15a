//! Opening a connection: Hello → Welcome, or an Error frame and close (proto-spec.md, "Handshake").

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use super::{recv, TransferError};
use crate::wire::{Connection, ErrorCode, Hello, Message, Welcome, MAGIC};
use crate::{HANDSHAKE_MAX_FRAME, MAX_FRAME, PROTOCOL_VERSION};

/// Longest agent string a server accepts in Hello.
pub const MAX_AGENT_LEN: usize = 256;

/// The agent string this build sends.
pub fn agent() -> String {
    format!("ferry/{}", env!("CARGO_PKG_VERSION"))
}

/// Client side: sends Hello and waits for Welcome.
pub async fn client_hello<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    timeout: Duration,
) -> Result<Welcome, TransferError> {
    let hello = Message::Hello(Hello {
        magic: MAGIC,
        min_version: PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        agent: agent(),
    });
    super::send_within(conn, &hello, timeout, "sending Hello").await?;
    match recv(conn, timeout, "waiting for Welcome").await? {
        Message::Welcome(welcome) if welcome.version == PROTOCOL_VERSION => {
            conn.set_max_frame(welcome.max_frame.min(MAX_FRAME));
            Ok(welcome)
        }
        Message::Welcome(welcome) => Err(TransferError::refused(
            ErrorCode::VersionMismatch,
            format!("server chose protocol version {}", welcome.version),
        )),
        other => Err(TransferError::Unexpected {
            got: other.name(),
            state: "waiting for Welcome",
        }),
    }
}

/// Server side: waits for Hello, checks magic and version, answers Welcome, all within `timeout`. Until then
/// frames are limited to [`HANDSHAKE_MAX_FRAME`], so an unknown peer cannot make the server buffer a large frame.
/// On a bad Hello the caller sends the returned error's code to the peer.
pub async fn server_accept<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    timeout: Duration,
) -> Result<Hello, TransferError> {
    conn.set_max_frame(HANDSHAKE_MAX_FRAME);
    let hello = tokio::time::timeout(timeout, accept_hello(conn, timeout))
        .await
        .map_err(|_| TransferError::Timeout(timeout, "waiting for Hello"))??;
    conn.set_max_frame(MAX_FRAME);
    Ok(hello)
}

async fn accept_hello<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    timeout: Duration,
) -> Result<Hello, TransferError> {
    let hello = match super::next_message(conn, timeout, "waiting for Hello").await? {
        Message::Hello(hello) => hello,
        other => {
            return Err(TransferError::Unexpected {
                got: other.name(),
                state: "waiting for Hello",
            })
        }
    };
    if hello.magic != MAGIC {
        return Err(TransferError::refused(ErrorCode::BadMagic, "not a ferry client"));
    }
    if hello.agent.len() > MAX_AGENT_LEN {
        return Err(TransferError::refused(
            ErrorCode::Malformed,
            "agent string longer than 256 bytes",
        ));
    }
    if !(hello.min_version..=hello.max_version).contains(&PROTOCOL_VERSION) {
        return Err(TransferError::refused(
            ErrorCode::VersionMismatch,
            format!(
                "client speaks protocol versions {}..={}, this server speaks {PROTOCOL_VERSION}",
                hello.min_version, hello.max_version
            ),
        ));
    }
    let welcome = Message::Welcome(Welcome {
        version: PROTOCOL_VERSION,
        agent: agent(),
        max_frame: MAX_FRAME,
    });
    super::send_within(conn, &welcome, timeout, "sending Welcome").await?;
    Ok(hello)
}
