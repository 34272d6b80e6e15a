//! Opening a connection: Hello → [Challenge → Auth →] Welcome, or an Error frame and close (proto-spec.md,
//! "Handshake" and "Authentication").

use std::collections::HashMap;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use super::{recv, TransferError};
use crate::auth::{self, Token};
use crate::wire::{Auth, Challenge, Connection, ErrorCode, Hello, Message, Welcome, WireError, MAGIC};
use crate::{HANDSHAKE_MAX_FRAME, MAX_FRAME, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// Longest agent string a server accepts in Hello.
pub const MAX_AGENT_LEN: usize = 256;

/// The agent string this build sends.
pub fn agent() -> String {
    format!("ferry/{}", env!("CARGO_PKG_VERSION"))
}

/// Client side: sends Hello (naming `token`'s client, if any), answers a Challenge with the token, and waits for
/// Welcome, whose `version` (one of [`MIN_PROTOCOL_VERSION`]`..=`[`PROTOCOL_VERSION`]) says which messages the
/// server understands. A server that challenges a client without a token is refused locally with `AuthFailed`.
pub async fn client_hello<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    timeout: Duration,
    token: Option<&Token>,
    binding: Option<&[u8; 32]>,
) -> Result<Welcome, TransferError> {
    match client_greet(conn, timeout, token, binding).await? {
        Greeting::Welcomed(welcome) => Ok(welcome),
        Greeting::Pending(pending) => pending.read(conn, timeout).await,
    }
}

/// Where a client's handshake stands once its side of it went out ([`client_greet`]).
#[derive(Debug)]
pub enum Greeting {
    /// The server's Welcome arrived: the handshake is complete.
    Welcomed(Welcome),
    /// The client's last handshake frame went out and the server's Welcome is on its way: a client may send its
    /// first request now, behind it (proto-spec.md §3, "Pipelining"), and read the Welcome when it arrives.
    Pending(PendingWelcome),
}

/// A Welcome on its way: what [`PendingWelcome::welcomed`] needs to check it when it arrives.
#[derive(Debug)]
pub struct PendingWelcome {
    /// When the frame it answers (Hello or Auth) went out.
    since: std::time::Instant,
    /// Whether a Challenge arrived (the round trip is measured already, and a second one is a protocol error).
    challenged: bool,
}

/// Client side, without waiting for the Welcome: sends Hello, and, if the client holds a token, reads the server's
/// first answer and answers its Challenge with `Auth`. A client without a token reads nothing: it may pipeline its
/// first request behind Hello (a server that requires a token answers `Error{AuthFailed}` and drains the rest).
/// A client with a token whose server does not challenge it is [`Greeting::Welcomed`] at once.
pub async fn client_greet<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    timeout: Duration,
    token: Option<&Token>,
    binding: Option<&[u8; 32]>,
) -> Result<Greeting, TransferError> {
    let hello = Message::Hello(Hello {
        magic: MAGIC,
        min_version: MIN_PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        agent: agent(),
        client: token.map(|t| t.id.clone()).unwrap_or_default(),
    });
    let sent = std::time::Instant::now();
    super::send_within(conn, &hello, timeout, "sending Hello").await?;
    let hello_sent = PendingWelcome {
        since: sent,
        challenged: false,
    };
    let Some(token) = token else {
        return Ok(Greeting::Pending(hello_sent));
    };
    let reply = recv(conn, timeout, "waiting for Welcome").await.map_err(tls_server)?;
    // Hello to the first answer (Welcome or Challenge): the server does little in between, so this is the
    // link's round trip, where the sender's window starts (proto-spec.md §6).
    conn.set_round_trip(sent.elapsed());
    let Message::Challenge(Challenge { nonce }) = reply else {
        return hello_sent.welcomed(conn, Ok(reply)).map(Greeting::Welcomed);
    };
    let auth = Message::Auth(Auth {
        answer: token.respond(&nonce, binding),
    });
    super::send_within(conn, &auth, timeout, "sending Auth").await?;
    Ok(Greeting::Pending(PendingWelcome {
        since: std::time::Instant::now(),
        challenged: true,
    }))
}

impl Greeting {
    /// The Welcome still to be read, if any.
    pub fn into_pending(self) -> Option<PendingWelcome> {
        match self {
            Greeting::Welcomed(_) => None,
            Greeting::Pending(pending) => Some(pending),
        }
    }
}

impl PendingWelcome {
    /// Reads the server's answer (within `timeout`) and checks it ([`PendingWelcome::welcomed`]).
    pub async fn read<S: AsyncRead + AsyncWrite + Unpin>(
        self,
        conn: &mut Connection<S>,
        timeout: Duration,
    ) -> Result<Welcome, TransferError> {
        let reply = recv(conn, timeout, "waiting for Welcome").await;
        self.welcomed(conn, reply)
    }

    /// Checks the server's answer to the client's last handshake frame (`reply`, as read): a Welcome with a
    /// version this build speaks completes the handshake (its `max_frame` then bounds the frames the client sends);
    /// a Challenge to a client without a token is `AuthFailed`; anything else is an error.
    pub fn welcomed<S: AsyncRead + AsyncWrite + Unpin>(
        self,
        conn: &mut Connection<S>,
        reply: Result<Message, TransferError>,
    ) -> Result<Welcome, TransferError> {
        let reply = reply.map_err(tls_server)?;
        if !self.challenged {
            conn.set_round_trip(self.since.elapsed());
        }
        match reply {
            Message::Welcome(welcome) if (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&welcome.version) => {
                conn.set_max_frame(welcome.max_frame.min(MAX_FRAME));
                conn.set_version(welcome.version);
                Ok(welcome)
            }
            Message::Welcome(welcome) => Err(TransferError::refused(
                ErrorCode::VersionMismatch,
                format!("server chose protocol version {}", welcome.version),
            )),
            Message::Challenge(_) if !self.challenged => Err(TransferError::refused(
                ErrorCode::AuthFailed,
                "the server requires a token (--token-file FILE or FERRY_TOKEN_FILE)",
            )),
            other => Err(TransferError::Unexpected {
                got: other.name(),
                state: "waiting for Welcome",
            }),
        }
    }
}

/// A TLS record where the server's first frame was due: the server speaks TLS and this client does not. Final,
/// like a failed TLS trust check (the client exits 7).
fn tls_server(error: TransferError) -> TransferError {
    match error {
        TransferError::Wire(WireError::TlsRecord) => TransferError::refused(
            ErrorCode::TlsRequired,
            "the server speaks TLS; use --tls-fingerprint or --tls-ca",
        ),
        other => other,
    }
}

/// The tokens a server accepts, by client id; `None` accepts every client unauthenticated.
pub type Tokens = Option<HashMap<String, Token>>;

/// A client the server's handshake accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The proven client id (`None` on a server without tokens).
    pub client: Option<String>,
    /// The protocol version both sides speak on this connection.
    pub version: u16,
}

/// The highest version in both `MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION` and the client's `min..=max`.
fn common_version(min: u16, max: u16) -> Option<u16> {
    let version = max.min(PROTOCOL_VERSION);
    (version >= min.max(MIN_PROTOCOL_VERSION)).then_some(version)
}

/// Server side: waits for Hello, checks magic and version, challenges the client when `tokens` are configured
/// (the answer bound to the TLS session's `binding`, if any), and answers Welcome, all within `timeout`. Until then frames are limited to [`HANDSHAKE_MAX_FRAME`] (and
/// `max_frame` after), so an unknown peer cannot make the server buffer a large frame. Returns the proven client
/// id and the version chosen. On failure the caller sends the returned error's code to the peer.
pub async fn server_accept<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    timeout: Duration,
    tokens: &Tokens,
    binding: Option<&[u8; 32]>,
    max_frame: u32,
) -> Result<Accepted, TransferError> {
    conn.set_max_frame(HANDSHAKE_MAX_FRAME);
    let accepted = tokio::time::timeout(timeout, accept_hello(conn, timeout, tokens, binding, max_frame))
        .await
        .map_err(|_| TransferError::Timeout(timeout, "completing the handshake"))??;
    conn.set_max_frame(max_frame);
    Ok(accepted)
}

async fn accept_hello<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    timeout: Duration,
    tokens: &Tokens,
    binding: Option<&[u8; 32]>,
    max_frame: u32,
) -> Result<Accepted, TransferError> {
    let hello = first_hello(conn, timeout).await?;
    if hello.magic != MAGIC {
        return Err(TransferError::refused(ErrorCode::BadMagic, "not a ferry client"));
    }
    if hello.agent.len() > MAX_AGENT_LEN || hello.client.len() > MAX_AGENT_LEN {
        return Err(TransferError::refused(
            ErrorCode::Malformed,
            "agent string or client id longer than 256 bytes",
        ));
    }
    let Some(version) = common_version(hello.min_version, hello.max_version) else {
        return Err(TransferError::refused(
            ErrorCode::VersionMismatch,
            format!(
                "client speaks protocol versions {}..={}, this server speaks {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}",
                hello.min_version, hello.max_version
            ),
        ));
    };
    let client = match tokens {
        Some(tokens) => Some(authenticate(conn, timeout, tokens, binding, hello.client).await?),
        None => None,
    };
    let welcome = Message::Welcome(Welcome {
        version,
        agent: agent(),
        max_frame,
    });
    super::send_within(conn, &welcome, timeout, "sending Welcome").await?;
    conn.set_version(version);
    Ok(Accepted { client, version })
}

/// The client's first frame, which must be a decodable `Hello` (proto-spec.md §3): anything else (another message,
/// an undecodable or oversized frame, an HTTP request, a TLS ClientHello) is `BadMagic`.
async fn first_hello<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    timeout: Duration,
) -> Result<Hello, TransferError> {
    let not_ferry = |why: String| TransferError::refused(ErrorCode::BadMagic, why);
    match super::next_message(conn, timeout, "waiting for Hello").await {
        Ok(Message::Hello(hello)) => Ok(hello),
        Ok(other) => Err(not_ferry(format!(
            "the first frame must be Hello, not {}",
            other.name()
        ))),
        Err(TransferError::Wire(WireError::TlsRecord)) => Err(not_ferry(
            "this server does not speak TLS; connect without --tls-fingerprint/--tls-ca".into(),
        )),
        Err(TransferError::Wire(WireError::Codec(e))) => {
            Err(not_ferry(format!("the first frame is not a ferry Hello: {e}")))
        }
        Err(e) => Err(e),
    }
}

/// Challenges `client` to prove its token. Every failure (no id, unknown id, wrong answer) reads the same to the
/// peer, so the server does not reveal which client ids exist.
async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    timeout: Duration,
    tokens: &HashMap<String, Token>,
    binding: Option<&[u8; 32]>,
    client: String,
) -> Result<String, TransferError> {
    let denied = || TransferError::refused(ErrorCode::AuthFailed, "authentication failed");
    if client.is_empty() {
        return Err(TransferError::refused(
            ErrorCode::AuthFailed,
            "this server requires a token (--token-file FILE or FERRY_TOKEN_FILE)",
        ));
    }
    if auth::check_id(&client).is_err() {
        // Not the shape of any configured id (§3a): refused like an unknown one, and never logged raw.
        tracing::warn!(client = ?truncated(&client), "authentication failed: malformed client id");
        return Err(denied());
    }
    let nonce = auth::nonce();
    let challenge = Message::Challenge(Challenge { nonce });
    super::send_within(conn, &challenge, timeout, "sending Challenge").await?;
    let answer = match super::next_message(conn, timeout, "waiting for Auth").await? {
        Message::Auth(Auth { answer }) => answer,
        other => {
            return Err(TransferError::Unexpected {
                got: other.name(),
                state: "waiting for Auth",
            })
        }
    };
    match tokens.get(&client) {
        Some(token) if token.verify(&nonce, binding, &answer) => Ok(client),
        _ => {
            tracing::warn!(client = %client, "authentication failed");
            Err(denied())
        }
    }
}

/// A peer-chosen id, cut for logging.
fn truncated(id: &str) -> &str {
    let mut cut = id.len().min(auth::MAX_CLIENT_ID);
    while !id.is_char_boundary(cut) {
        cut -= 1;
    }
    &id[..cut]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_highest_common_version_is_chosen() {
        assert_eq!(
            common_version(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION),
            Some(PROTOCOL_VERSION)
        );
        assert_eq!(common_version(3, 3), Some(3), "a version-3 client is still served");
        assert_eq!(common_version(3, 4), Some(4), "a version-4 client is served version 4");
        assert_eq!(common_version(1, 99), Some(PROTOCOL_VERSION));
        assert_eq!(common_version(1, 2), None);
        assert_eq!(common_version(PROTOCOL_VERSION + 1, 99), None);
        assert_eq!(common_version(4, 3), None, "an empty range has nothing in common");
    }
}
