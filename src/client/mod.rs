//! The client: connect, retry with backoff, resume. A push takes the sender role ([`push`]), a pull the receiver
//! role ([`pull`]); both share the engine in [`crate::transfer`].
//!
//! Within one run, network failures (and retryable server errors) lead to a reconnect after an exponential,
//! jittered backoff; `retries` bounds consecutive attempts that made no progress, so a long transfer over a link
//! that drops every few minutes still finishes. A [`Deadline`] (`--max-duration`) bounds the whole run, retries
//! included: when it passes, the attempt in flight is dropped (a pull's receiver is first asked to stop, so it
//! drains what it already verified), and the run ends with [`ClientError::TimedOut`]; what the receiver made durable
//! stays, so the next run resumes. A URL naming several servers fails over ([`concerns_server`]): a failure of the
//! current server makes the next one current, and the retry goes there at once; the backoff applies only after a
//! whole round of the list made no progress (proto-spec.md §14, "Groups of servers"). Across runs, the receiver's records tell what is missing and the
//! sender's manifest cache avoids rehashing an unchanged source.

mod pull;
mod push;
mod running;
mod status;
mod tree;

use std::future::Future;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpStream;
use tokio::time::Instant;

pub use pull::{pull, PullOptions, PullReport, Pulled};
pub use push::{push, PushOptions, PushReport};
pub use running::{read_running, Running, PROGRESS_FILE, PUBLISH_EVERY};
pub use status::{local_transfers, server_partials, Direction, StatusOptions, TransferState, TransferStatus};
pub use tree::{push_tree, tree_destination, Deletion, TreeReport};

use crate::auth::Token;
use crate::exit;
use crate::source::{SourceError, MAX_SOURCE_CHANGES};
use crate::store::{LockError, StoreError};
use crate::throttle::{Bandwidth, Throttled};
use crate::tls::{ClientTls, Stream};
use crate::transfer::handshake::{self, Greeting};
use crate::transfer::sender::SendEvent;
use crate::transfer::TransferError;
use crate::url::{FerryUrl, Servers};
use crate::wire::{Connection, ErrorCode};
use crate::MAX_FRAME;

/// Exponential backoff with jitter between reconnects.
#[derive(Clone, Debug)]
pub struct Backoff {
    /// Delay before the first retry.
    pub initial: Duration,
    /// Upper bound of any delay.
    pub max: Duration,
}

impl Backoff {
    /// The delay before retry number `failures` (1-based): `initial * 2^(failures-1)`, capped, then scaled by a
    /// random factor in `[0.5, 1.0]` so that many clients cut at once do not reconnect in lockstep.
    pub fn delay(&self, failures: u32) -> Duration {
        let exp = self.initial.saturating_mul(1 << failures.saturating_sub(1).min(16));
        exp.min(self.max).mul_f64(crate::random::unit_between(0.5, 1.0))
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(250),
            max: Duration::from_secs(15),
        }
    }
}

/// When a run bounded by `--max-duration` must end.
#[derive(Clone, Copy, Debug)]
pub struct Deadline {
    /// The moment the run must stop.
    pub at: Instant,
    /// The bound it was given (for messages).
    pub limit: Duration,
}

impl Deadline {
    /// A deadline `limit` from now.
    pub fn after(limit: Duration) -> Deadline {
        Deadline {
            at: Instant::now() + limit,
            limit,
        }
    }

    /// How long past the deadline a run whose bytes are all durable may take to commit: a tenth of the bound,
    /// at least 1 s and at most 60 s.
    pub fn commit_grace(&self) -> Duration {
        (self.limit / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }

    /// The error for a run stopped by this deadline.
    pub fn expired(&self, last: Option<String>) -> ClientError {
        ClientError::TimedOut {
            limit: self.limit,
            last: last.map_or_else(String::new, |e| format!("; last error: {e}")),
        }
    }
}

/// Whether `error` says something about the server the client is connected to, so that another server of its
/// group may do better: the connection could not be made or was lost (refused, connect timeout, EOF, reset, I/O
/// timeout, a TLS handshake broken off), or the server answered a retryable code that describes itself
/// (`ShuttingDown`, `Overloaded`, `TooManyConnections`, `Timeout`, `Internal`, `StorageIo`). `Busy` and
/// `Superseded` (claims are per server, and `Busy` clears) and `SourceChanged` (a local matter) stay; a
/// non-retryable code ends the run, since every server of the group would answer it alike.
pub fn concerns_server(error: &TransferError) -> bool {
    let moving_code = |code: ErrorCode| {
        matches!(
            code,
            ErrorCode::ShuttingDown
                | ErrorCode::Overloaded
                | ErrorCode::TooManyConnections
                | ErrorCode::Timeout
                | ErrorCode::Internal
                | ErrorCode::StorageIo
        )
    };
    match error {
        TransferError::Wire(_)
        | TransferError::Closed(_)
        | TransferError::Timeout(..)
        | TransferError::Unreachable { .. }
        | TransferError::ShuttingDown => true,
        TransferError::Remote(frame) => frame.retryable && moving_code(frame.code),
        TransferError::Refused { code, .. } => moving_code(*code),
        _ => false,
    }
}

/// Counts attempts and decides, after a failure, whether, where and when to try again.
#[derive(Debug)]
struct Retrier {
    retries: u32,
    backoff: Backoff,
    deadline: Option<Deadline>,
    attempts: u32,
    failures: u32,
    /// The servers of the destination, when the run may move between them.
    servers: Option<Servers>,
    /// Moves since the last attempt that made progress.
    moves_without_progress: u32,
}

impl Retrier {
    fn new(retries: u32, backoff: Backoff, deadline: Option<Deadline>) -> Self {
        Retrier {
            retries,
            backoff,
            deadline,
            attempts: 0,
            failures: 0,
            servers: None,
            moves_without_progress: 0,
        }
    }

    /// Lets the run move between the servers `url` names (nothing changes for a URL naming one).
    fn failing_over(mut self, url: &FerryUrl) -> Self {
        self.servers = Some(url.servers.clone()).filter(|s| s.len() > 1);
        self
    }

    /// Runs `work`, or gives it up `grace` after the deadline with [`ClientError::TimedOut`].
    async fn bounded<T>(&self, work: impl Future<Output = T>, grace: Duration) -> Result<T, ClientError> {
        let Some(deadline) = self.deadline else {
            return Ok(work.await);
        };
        tokio::select! {
            biased;
            done = work => Ok(done),
            () = tokio::time::sleep_until(deadline.at + grace) => Err(deadline.expired(None)),
        }
    }

    /// Like [`Retrier::bounded`] with no grace, except that when the deadline passes while `finishing()` says the
    /// attempt only has its commit left (every byte durable on the receiver), it gets [`Deadline::commit_grace`]
    /// more to finish: a night's upload is not thrown away for the last second of a commit.
    async fn bounded_or_finishing<T>(
        &self,
        work: impl Future<Output = T>,
        finishing: impl Fn() -> bool,
    ) -> Result<T, ClientError> {
        let Some(deadline) = self.deadline else {
            return Ok(work.await);
        };
        tokio::pin!(work);
        tokio::select! {
            biased;
            done = &mut work => return Ok(done),
            () = tokio::time::sleep_until(deadline.at) => {}
        }
        if !finishing() {
            return Err(deadline.expired(None));
        }
        let grace = deadline.commit_grace();
        tracing::info!(
            ?grace,
            "--max-duration ran out with only the commit left; letting it finish"
        );
        tokio::select! {
            biased;
            done = &mut work => Ok(done),
            () = tokio::time::sleep(grace) => Err(deadline.expired(None)),
        }
    }

    /// Starts an attempt; returns its 1-based number.
    fn start(&mut self) -> u32 {
        self.attempts += 1;
        self.attempts
    }

    /// After a retryable failure of the current attempt: announces and sleeps the backoff delay, or returns the
    /// network failure once `retries` consecutive attempts made no progress.
    async fn wait_to_retry(
        &mut self,
        error: TransferError,
        progressed: bool,
        on_event: &mut (dyn FnMut(ClientEvent) + Send),
    ) -> Result<(), ClientError> {
        if progressed {
            self.failures = 0;
            self.moves_without_progress = 0;
        }
        self.failures += 1;
        if self.failures > self.retries {
            return Err(ClientError::Network {
                attempts: self.attempts,
                last: error,
            });
        }
        if let Some(servers) = self.servers.as_ref().filter(|_| concerns_server(&error)) {
            let (from, to) = servers.advance();
            self.moves_without_progress += 1;
            tracing::info!(attempt = self.attempts, %from, %to, error = ?error.to_string(), "moving to the next server");
            on_event(ClientEvent::Moved {
                attempt: self.attempts,
                from,
                to,
                error: error.to_string(),
            });
            // A dead server costs its connect timeout, not a backoff, until the whole list failed in a row.
            if !self.moves_without_progress.is_multiple_of(servers.len() as u32) {
                return Ok(());
            }
        }
        let delay = self.backoff.delay(self.failures);
        if let Some(deadline) = self.deadline.filter(|d| Instant::now() + delay >= d.at) {
            return Err(deadline.expired(Some(error.to_string())));
        }
        // Debug-formatted: the error may carry a server's text, which must reach the log escaped.
        tracing::info!(attempt = self.attempts, ?delay, error = ?error.to_string(), "retrying");
        on_event(ClientEvent::Retrying {
            attempt: self.attempts,
            delay,
            error: error.to_string(),
        });
        tokio::time::sleep(delay).await;
        Ok(())
    }
}

/// How a client proves who it is and protects the link.
#[derive(Clone, Debug, Default)]
pub struct Access {
    /// The token to answer the server's challenge with (none: connect anonymously).
    pub token: Option<Token>,
    /// TLS settings (none: plain TCP).
    pub tls: Option<ClientTls>,
}

/// A client's connection to a server, held to the run's `--bwlimit` if there is one.
pub type ClientConnection = Connection<Throttled<Stream>>;

/// Connects to `url`'s current server (TCP, then TLS if configured) and completes the handshake, proving the token if the
/// server asks; returns the connection and the server's Welcome (its protocol version says which messages it
/// knows). A TLS peer that fails the trust check is refused with `AuthFailed`, never retried.
async fn connect_welcomed(
    url: &FerryUrl,
    connect_timeout: Duration,
    io_timeout: Duration,
    access: &Access,
    bandwidth: Option<&Bandwidth>,
) -> Result<(ClientConnection, crate::wire::Welcome), TransferError> {
    let (conn, greeting) = connect_greeted(url, connect_timeout, io_timeout, access, bandwidth).await?;
    welcome_of(url, conn, greeting, io_timeout).await
}

/// Completes a handshake [`connect_greeted`] left with its Welcome on the way: reads and checks it.
async fn welcome_of(
    url: &FerryUrl,
    mut conn: ClientConnection,
    greeting: Greeting,
    io_timeout: Duration,
) -> Result<(ClientConnection, crate::wire::Welcome), TransferError> {
    let welcome = match greeting {
        Greeting::Welcomed(welcome) => welcome,
        Greeting::Pending(pending) => pending.read(&mut conn, io_timeout).await?,
    };
    note_welcomed(url, &conn);
    Ok((conn, welcome))
}

/// Like [`connect_welcomed`], without waiting for the Welcome where the client need not read before it: the caller
/// may pipeline its first request behind Hello (proto-spec.md §3, "Pipelining") and reads the Welcome after it.
async fn connect_greeted(
    url: &FerryUrl,
    connect_timeout: Duration,
    io_timeout: Duration,
    access: &Access,
    bandwidth: Option<&Bandwidth>,
) -> Result<(ClientConnection, Greeting), TransferError> {
    let server = url.servers.current().clone();
    let tcp = dial(&server, connect_timeout).await?;
    let _ = tcp.set_nodelay(true);
    let stream = match &access.tls {
        None => Stream::Plain(tcp),
        Some(tls) => tokio::time::timeout(io_timeout, tls.connect(&server.host, tcp))
            .await
            .map_err(|_| TransferError::Timeout(io_timeout, "in the TLS handshake"))?
            .map_err(tls_failure)?,
    };
    let binding = stream.channel_binding();
    let mut conn = Connection::new(Throttled::new(stream, bandwidth.cloned()), MAX_FRAME);
    conn.allow_zero_copy(plain_tcp);
    let greeting = handshake::client_greet(&mut conn, io_timeout, access.token.as_ref(), binding.as_ref()).await?;
    note_welcomed(url, &conn);
    Ok((conn, greeting))
}

/// Records `url`'s current server as one the run connected to if `conn`'s handshake completed (its Welcome was
/// read): at once, or after the first request for a connection that pipelined it ([`connect_greeted`]).
fn note_welcomed(url: &FerryUrl, conn: &ClientConnection) {
    if conn.version().is_some() {
        url.servers.connected();
    }
}

/// The plain TCP socket under a client's stream, when nothing in between must see the bytes (no TLS, no rate
/// limit): chunk payloads then go from the source file to it with `sendfile` ([`Connection::write_chunk_from_file`]).
fn plain_tcp(stream: &Throttled<Stream>) -> Option<&tokio::net::TcpStream> {
    match stream.get_ref() {
        Stream::Plain(tcp) if !stream.limited() => Some(tcp),
        _ => None,
    }
}

/// Resolves `server`'s host and opens a TCP connection to it within `connect_timeout`. A failure names `HOST:PORT`
/// and says what it means (no such host, nothing listening, no answer); it stays retryable (README,
/// "Troubleshooting": a link or a server that is down at the start of a cron run may be back a few seconds later;
/// `--retries 0` fails at once).
async fn dial(server: &crate::url::Server, connect_timeout: Duration) -> Result<TcpStream, TransferError> {
    let addr = server.authority();
    let unreachable = |reason: String| TransferError::Unreachable {
        addr: addr.clone(),
        reason,
    };
    let connecting = async {
        let resolved: Vec<std::net::SocketAddr> = tokio::net::lookup_host(addr.as_str())
            .await
            .map_err(|e| unreachable(format!("no such host ({e}); check the name in the URL")))?
            .collect();
        if resolved.is_empty() {
            return Err(unreachable(
                "the name has no addresses; check the name in the URL".into(),
            ));
        }
        TcpStream::connect(&resolved[..]).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::ConnectionRefused => unreachable(
                "connection refused: nothing listens on that port (is `ferry serve` running on that host and port?)"
                    .into(),
            ),
            _ => unreachable(e.to_string()),
        })
    };
    match tokio::time::timeout(connect_timeout, connecting).await {
        Ok(done) => done,
        Err(_) => Err(unreachable(format!(
            "no answer within {connect_timeout:?} (the host is down, or a firewall drops the connection)"
        ))),
    }
}

/// A failed TLS handshake: a certificate the client does not trust (or a peer that does not speak TLS) is
/// final; a broken connection is retried like any other.
fn tls_failure(e: std::io::Error) -> TransferError {
    if answered_without_tls(&e) {
        return TransferError::refused(
            ErrorCode::AuthFailed,
            "the server does not speak TLS (it answered with plain bytes); connect without --tls-fingerprint/--tls-ca, \
             or check the port",
        );
    }
    match e.kind() {
        std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput => {
            TransferError::refused(ErrorCode::AuthFailed, format!("TLS: {e}"))
        }
        _ => TransferError::Wire(e.into()),
    }
}

/// Whether rustls gave up because the peer's reply is not a TLS record at all (a ferry Error frame starts with a
/// zero byte, which is no TLS content type).
fn answered_without_tls(e: &std::io::Error) -> bool {
    use rustls::{Error, InvalidMessage};
    matches!(
        e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()),
        Some(Error::InvalidMessage(
            InvalidMessage::InvalidContentType | InvalidMessage::UnknownProtocolVersion
        ))
    )
}

/// Progress of a push or pull, for display.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientEvent {
    /// The manifest is ready.
    Manifest {
        /// Chunks in it.
        chunks: u32,
        /// File size.
        size: u64,
        /// Taken from the cache, without reading the file.
        cached: bool,
    },
    /// Connected and greeted (attempt number, 1-based).
    Connected {
        /// Attempt number.
        attempt: u32,
    },
    /// What the sender saw.
    Send(SendEvent),
    /// An attempt failed on one server of the URL and the next attempt goes to the next one.
    Moved {
        /// The attempt that failed.
        attempt: u32,
        /// The server it failed on (`host:port`).
        from: String,
        /// The server the next attempt goes to.
        to: String,
        /// Why it failed.
        error: String,
    },
    /// An attempt failed and another follows after `delay`.
    Retrying {
        /// The attempt that failed.
        attempt: u32,
        /// Wait before the next one.
        delay: Duration,
        /// Why it failed.
        error: String,
    },
    /// A tree was walked.
    Scanned {
        /// Files found.
        files: u64,
        /// Their total size.
        bytes: u64,
        /// Entries left out.
        skipped: u64,
    },
    /// The source changed; a new manifest is being built.
    SourceChanged {
        /// What was noticed.
        reason: String,
    },
}

/// A push or pull that did not complete.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The destination URL or path is unusable.
    #[error(transparent)]
    Usage(#[from] crate::url::UrlError),
    /// A token or TLS setting is unusable.
    #[error("{0}")]
    Setup(String),
    /// The source could not be read.
    #[error("{0}")]
    Source(String),
    /// The source kept changing while it was being sent.
    #[error("{0} kept changing while it was being sent; gave up after {MAX_SOURCE_CHANGES} new manifests")]
    SourceUnstable(String),
    /// The client's state store is unusable.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The network (or a busy server) did not let the push finish.
    #[error("gave up after {attempts} attempts: {last}")]
    Network {
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: TransferError,
    },
    /// The server refused the push for good.
    #[error("rejected by the server: {0}")]
    Rejected(TransferError),
    /// Bytes did not verify end to end.
    #[error("{0}")]
    Integrity(TransferError),
    /// The server did not accept the token, or the server's TLS certificate is not trusted.
    #[error("authentication: {0}")]
    Auth(TransferError),
    /// The client state directory is held by another run, or its lock file is unusable.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// `--max-duration` ran out before the transfer finished.
    #[error("stopped: --max-duration {limit:?} ran out (what the receiver holds is kept; the next run resumes){last}")]
    TimedOut {
        /// The bound.
        limit: Duration,
        /// `; last error: ...` when an attempt had failed, else empty.
        last: String,
    },
    /// SIGINT (Ctrl-C) stopped the run.
    #[error("interrupted (what the receiver holds is kept; the next run resumes)")]
    Interrupted,
}

impl From<SourceError> for ClientError {
    fn from(e: SourceError) -> Self {
        match e {
            SourceError::Io(what) => ClientError::Source(what),
            SourceError::Unstable(path) => ClientError::SourceUnstable(path),
            SourceError::Store(e) => ClientError::Store(e),
        }
    }
}

impl ClientError {
    /// The process exit code for this failure (README, "Exit codes").
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Usage(_) | ClientError::Setup(_) => exit::USAGE,
            ClientError::Network { .. } => exit::NETWORK,
            ClientError::Rejected(_) => exit::REJECTED,
            ClientError::Integrity(_) => exit::INTEGRITY,
            ClientError::Auth(_) => exit::AUTH,
            ClientError::Source(_) | ClientError::SourceUnstable(_) | ClientError::Store(_) => exit::LOCAL,
            ClientError::Lock(LockError::Held { .. }) => exit::ALREADY_RUNNING,
            ClientError::Lock(LockError::StillHeld { .. }) | ClientError::TimedOut { .. } => exit::TIMED_OUT,
            ClientError::Lock(LockError::Io { .. }) => exit::LOCAL,
            ClientError::Interrupted => exit::INTERRUPTED,
        }
    }
}

/// Maps a non-retryable transfer error to the push failure it means.
fn classify(error: TransferError) -> ClientError {
    match &error {
        TransferError::Integrity(_) => ClientError::Integrity(error),
        TransferError::Remote(frame) if frame.code == ErrorCode::IntegrityFailed => ClientError::Integrity(error),
        // A plain client at a TLS server is as final as a refused token or a TLS peer that fails its check.
        TransferError::Remote(frame) if matches!(frame.code, ErrorCode::AuthFailed | ErrorCode::TlsRequired) => {
            ClientError::Auth(error)
        }
        TransferError::Refused {
            code: ErrorCode::AuthFailed | ErrorCode::TlsRequired,
            ..
        } => ClientError::Auth(error),
        TransferError::Remote(_) | TransferError::Refused { .. } => ClientError::Rejected(error),
        TransferError::Store(_)
        | TransferError::SourceIo(_)
        | TransferError::SourceChanged(_)
        | TransferError::Storage(_) => ClientError::Source(error.to_string()),
        _ => ClientError::Rejected(error),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ClientError> + Send + 'static,
) -> Result<T, ClientError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ClientError::Source(format!("internal: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_deadline_cuts_an_attempt_short_and_refuses_a_retry_past_it() {
        let deadline = Deadline::after(Duration::from_secs(5));
        let retrier = Retrier::new(10, Backoff::default(), Some(deadline));
        let started = Instant::now();
        let quick = retrier.bounded(async { 7 }, Duration::ZERO).await;
        assert!(matches!(quick, Ok(7)));
        let slow = retrier.bounded(tokio::time::sleep(Duration::from_secs(60)), Duration::ZERO);
        let cut = slow.await.unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert_eq!(cut.exit_code(), exit::TIMED_OUT);

        let late = Backoff {
            initial: Duration::from_secs(10),
            max: Duration::from_secs(10),
        };
        let mut retrier = Retrier::new(10, late, Some(Deadline::after(Duration::from_secs(3))));
        retrier.start();
        let error = TransferError::Timeout(Duration::from_secs(1), "connecting");
        let gave_up = retrier.wait_to_retry(error, false, &mut |_| {}).await.unwrap_err();
        assert_eq!(gave_up.exit_code(), exit::TIMED_OUT);
        assert!(gave_up.to_string().contains("last error"), "{gave_up}");
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(5),
            "no sleep towards a retry that cannot happen"
        );
    }

    /// A deadline that passes while only the commit is left grants the commit a grace (a tenth of the bound, at
    /// least 1 s); one that passes mid-upload stops at once.
    #[tokio::test(start_paused = true)]
    async fn a_deadline_lets_a_commit_in_progress_finish_within_its_grace() {
        let retrier = Retrier::new(10, Backoff::default(), Some(Deadline::after(Duration::from_secs(5))));
        let started = Instant::now();
        let commit = async {
            tokio::time::sleep(Duration::from_millis(5500)).await;
            "committed"
        };
        assert!(matches!(
            retrier.bounded_or_finishing(commit, || true).await,
            Ok("committed")
        ));
        assert_eq!(started.elapsed(), Duration::from_millis(5500));

        let retrier = Retrier::new(10, Backoff::default(), Some(Deadline::after(Duration::from_secs(5))));
        let started = Instant::now();
        let uploading = tokio::time::sleep(Duration::from_secs(60));
        let cut = retrier.bounded_or_finishing(uploading, || false).await.unwrap_err();
        assert_eq!(cut.exit_code(), exit::TIMED_OUT);
        assert_eq!(started.elapsed(), Duration::from_secs(5));

        let retrier = Retrier::new(10, Backoff::default(), Some(Deadline::after(Duration::from_secs(5))));
        let started = Instant::now();
        let stuck = tokio::time::sleep(Duration::from_secs(60));
        let cut = retrier.bounded_or_finishing(stuck, || true).await.unwrap_err();
        assert_eq!(cut.exit_code(), exit::TIMED_OUT);
        assert_eq!(started.elapsed(), Duration::from_secs(6), "the grace is bounded");
    }

    #[test]
    fn lock_failures_have_their_exit_codes() {
        let held = ClientError::Lock(LockError::Held {
            dir: "state".into(),
            holder: "pid 1: ferry push".into(),
        });
        assert_eq!(held.exit_code(), exit::ALREADY_RUNNING);
        let waited = ClientError::Lock(LockError::StillHeld {
            dir: "state".into(),
            holder: "pid 1: ferry push".into(),
            waited: Duration::from_secs(1),
        });
        assert_eq!(waited.exit_code(), exit::TIMED_OUT);
    }

    /// A failure of the server moves to the next one at once; only a whole round of the list without progress
    /// waits the backoff; `Busy` stays and waits; each move counts against `--retries`.
    #[tokio::test(start_paused = true)]
    async fn a_failing_server_hands_the_retry_to_the_next_without_waiting_until_a_round_failed() {
        let url: FerryUrl = "ferry://a:1,b:2,c:3/x".parse().unwrap();
        let backoff = Backoff {
            initial: Duration::from_secs(8),
            max: Duration::from_secs(8),
        };
        let mut retrier = Retrier::new(10, backoff, None).failing_over(&url);
        let lost = || TransferError::Closed("waiting for Ack");
        let started = Instant::now();
        let mut moved = 0;
        let mut record = |e: ClientEvent| moved += u32::from(matches!(e, ClientEvent::Moved { .. }));
        for expected in ["b:2", "c:3"] {
            retrier.start();
            retrier.wait_to_retry(lost(), false, &mut record).await.unwrap();
            assert_eq!(url.servers.current().authority(), expected);
        }
        assert_eq!(started.elapsed(), Duration::ZERO, "no backoff within the round");
        retrier.start();
        retrier.wait_to_retry(lost(), false, &mut record).await.unwrap();
        assert_eq!(url.servers.current().authority(), "a:1", "wrapped around");
        assert!(
            started.elapsed() >= Duration::from_secs(4),
            "a whole round failed: backoff"
        );

        let busy = TransferError::refused(ErrorCode::Busy, "claimed");
        retrier.start();
        retrier.wait_to_retry(busy, true, &mut record).await.unwrap();
        assert_eq!(url.servers.current().authority(), "a:1", "Busy stays on its server");
        assert_eq!(url.servers.moves(), 3);
        assert_eq!(moved, 3, "each move is announced");

        let mut strict = Retrier::new(1, Backoff::default(), None).failing_over(&url);
        strict.start();
        strict.wait_to_retry(lost(), false, &mut |_| {}).await.unwrap();
        strict.start();
        let gave_up = strict.wait_to_retry(lost(), false, &mut |_| {}).await.unwrap_err();
        assert!(
            matches!(gave_up, ClientError::Network { attempts: 2, .. }),
            "{gave_up:?}"
        );
    }

    #[test]
    fn only_failures_of_the_server_move_to_the_next() {
        let frame = |code: ErrorCode, retryable: bool| {
            TransferError::Remote(crate::wire::ErrorFrame {
                code,
                retryable,
                message: String::new(),
            })
        };
        for moving in [
            ErrorCode::ShuttingDown,
            ErrorCode::Overloaded,
            ErrorCode::TooManyConnections,
            ErrorCode::Timeout,
            ErrorCode::Internal,
            ErrorCode::StorageIo,
        ] {
            assert!(concerns_server(&frame(moving, true)), "{moving:?}");
            assert!(concerns_server(&TransferError::refused(moving, "x")), "{moving:?}");
        }
        for staying in [
            ErrorCode::Busy,
            ErrorCode::Superseded,
            ErrorCode::SourceChanged,
            ErrorCode::AuthFailed,
        ] {
            assert!(!concerns_server(&frame(staying, true)), "{staying:?}");
        }
        assert!(
            !concerns_server(&frame(ErrorCode::StorageIo, false)),
            "a final StorageIo ends the run"
        );
        assert!(concerns_server(&TransferError::Closed("x")));
        assert!(concerns_server(&TransferError::Unreachable {
            addr: "a:1".into(),
            reason: "refused".into()
        }));
        assert!(!concerns_server(&TransferError::SourceChanged("x".into())));
    }
}
