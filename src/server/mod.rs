//! The server: listener, connection limits, TLS, per-connection sessions, and a draining shutdown.
//!
//! The server only picks a role: after the handshake (which proves the client's token when clients are configured,
//! see [`access`]), an Offer makes it the receiver, a Pull the sender ([`pull`]), and a ListPartials lists the open
//! transfers ([`partials`]), all confined to the client's namespace and permissions. Every session races its reads
//! against the shutdown token; on shutdown the listener stops, sessions end with `ShuttingDown` after making their
//! received chunks durable, and [`Server::run`] returns once all of them are gone and the store is flushed.

mod access;
mod partials;
mod pull;

pub use access::ClientEntry;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::gc::{sweep, Expiry, GcReport};
use crate::path::{RemotePath, RESERVED_DIR};
use crate::store::{ReceiverStore, SenderStore, Store, StoreError};
use crate::tls::{ServerTls, Stream};
use crate::transfer::claims::Claims;
use crate::transfer::join::serve_join;
use crate::transfer::receiver::{receive, ReceiverContext};
use crate::transfer::tree_receiver::receive_tree;
use crate::transfer::{answer_ping, handshake, next_message, tell_peer, TransferError};
use crate::tree::LinkPolicy;
use crate::wire::{Connection, ErrorCode, ErrorFrame, Message};
use crate::{HANDSHAKE_MAX_FRAME, MAX_FRAME, MAX_MANIFEST_CHUNKS};
use access::Gate;

/// Smallest `max_frame` a server may set: a maximal chunk at the default chunk size (4 MiB) and its header fit.
pub const MIN_MAX_FRAME: u32 = 5 * 1024 * 1024;

/// Server settings.
#[derive(Clone)]
pub struct ServerConfig {
    /// Files are committed under this directory.
    pub root: PathBuf,
    /// Where the sled store lives (default `ROOT/.ferry/state`).
    pub state_dir: Option<PathBuf>,
    /// Maximum concurrent connections; more are refused with `TooManyConnections`.
    pub max_connections: usize,
    /// Maximum concurrent connections of one client (by client id, or by address when anonymous).
    pub max_connections_per_client: usize,
    /// Largest frame body accepted after the handshake (at least [`MIN_MAX_FRAME`], at most [`MAX_FRAME`]).
    pub max_frame: u32,
    /// Most chunks in an accepted manifest (at most [`MAX_MANIFEST_CHUNKS`]).
    pub max_manifest_chunks: usize,
    /// The clients that may connect; empty: anyone, anonymously, with full access to the root.
    pub clients: Vec<ClientEntry>,
    /// TLS identity; `None`: plain TCP.
    pub tls: Option<ServerTls>,
    /// Time a client has to complete the handshake.
    pub handshake_timeout: Duration,
    /// Maximum silence from a client in the middle of a conversation.
    pub idle_timeout: Duration,
    /// Bytes written between syncs (and Acks) of a transfer.
    pub sync_batch: u64,
    /// Chunk bytes all connections together may have queued for their writers.
    pub queue_budget: u64,
    /// Largest file accepted (offers of larger files are refused with `BadManifest`).
    pub max_file_size: u64,
    /// Open transfers and stored manifest bytes each namespace may keep.
    pub namespace_limits: crate::transfer::quota::NamespaceLimits,
    /// Open transfers without progress for this long are expired, their partial files removed.
    pub partial_ttl: Duration,
    /// How often the server sweeps for expired transfers and leftovers.
    pub gc_interval: Duration,
}

impl ServerConfig {
    /// Defaults for a server rooted at `root`.
    pub fn new(root: PathBuf) -> Self {
        ServerConfig {
            root,
            state_dir: None,
            max_connections: 256,
            max_connections_per_client: 64,
            max_frame: MAX_FRAME,
            max_manifest_chunks: MAX_MANIFEST_CHUNKS,
            clients: Vec::new(),
            tls: None,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            sync_batch: 4 * 1024 * 1024,
            queue_budget: 256 * 1024 * 1024,
            max_file_size: u64::MAX,
            namespace_limits: Default::default(),
            partial_ttl: Duration::from_secs(7 * 24 * 3600),
            gc_interval: Duration::from_secs(3600),
        }
    }
}

/// Server-wide counters, readable while the server runs.
#[derive(Debug, Default)]
pub struct ReceiverStats {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Chunk payload bytes received.
    pub bytes_received: AtomicU64,
    /// Chunks made durable and acknowledged.
    pub chunks_durable: AtomicU64,
    /// Chunks that failed verification.
    pub chunks_rejected: AtomicU64,
    /// Files committed.
    pub files_committed: AtomicU64,
    /// Live progress in bytes (what a pulling client displays; a server keeps it as a running total).
    pub meter: Arc<crate::meter::Meter>,
}

/// Starting the server failed.
#[derive(Debug, Error)]
pub enum ServerError {
    /// The root or state directory is unusable.
    #[error("preparing {path}: {source}")]
    Dir {
        /// The directory.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Accepting connections failed.
    #[error("accepting connections: {0}")]
    Accept(std::io::Error),
    /// The configuration is inconsistent.
    #[error("server configuration: {0}")]
    Config(String),
}

/// What every session of a server shares.
#[derive(Clone)]
struct Shared {
    /// Clients, namespaces (one receiver context each) and connection counts.
    gate: Gate,
    /// Manifest cache for Pulls.
    sender: SenderStore,
    /// Server-wide counters.
    stats: Arc<ReceiverStats>,
    config: Arc<ServerConfig>,
}

/// A ready-to-run server.
pub struct Server {
    shared: Shared,
    store: Store,
}

impl Server {
    /// Creates the root's private directories and namespaces and opens the store. Blocking.
    pub fn open(config: ServerConfig) -> Result<Server, ServerError> {
        if !(MIN_MAX_FRAME..=MAX_FRAME).contains(&config.max_frame) {
            return Err(ServerError::Config(format!(
                "max_frame must be between {MIN_MAX_FRAME} and {MAX_FRAME} bytes"
            )));
        }
        let tree_entries = config.namespace_limits.max_tree_entries;
        if tree_entries == 0 || tree_entries > crate::MAX_TREE_ENTRIES {
            return Err(ServerError::Config(format!(
                "max_tree_entries must be between 1 and {}",
                crate::MAX_TREE_ENTRIES
            )));
        }
        if config.max_manifest_chunks == 0 || config.max_manifest_chunks > MAX_MANIFEST_CHUNKS {
            return Err(ServerError::Config(format!(
                "max_manifest_chunks must be between 1 and {MAX_MANIFEST_CHUNKS}"
            )));
        }
        let private = config.root.join(RESERVED_DIR);
        let partial_dir = private.join("partial");
        let state_dir = config.state_dir.clone().unwrap_or_else(|| private.join("state"));
        for dir in [&config.root, &partial_dir] {
            std::fs::create_dir_all(dir).map_err(|source| ServerError::Dir {
                path: dir.display().to_string(),
                source,
            })?;
        }
        let root = config.root.canonicalize().map_err(|source| ServerError::Dir {
            path: config.root.display().to_string(),
            source,
        })?;
        let store = Store::open(&state_dir)?;
        let receiver = ReceiverContext {
            root,
            partial_dir: partial_dir.canonicalize().unwrap_or(partial_dir),
            store: ReceiverStore::open(&store)?,
            claims: Claims::default(),
            stats: Arc::default(),
            idle_timeout: config.idle_timeout,
            sync_batch: config.sync_batch,
            queue_budget: Arc::new(Semaphore::new(budget_permits(config.queue_budget))),
            max_file_size: config.max_file_size,
            max_manifest_chunks: config.max_manifest_chunks,
            quota: None,
            limits: config.namespace_limits,
            admission: Default::default(),
            joins: Default::default(),
        };
        let gate = Gate::open(&receiver, &store, &config.clients, config.max_connections_per_client)?;
        let shared = Shared {
            gate,
            sender: SenderStore::open(&store)?,
            stats: receiver.stats,
            config: Arc::new(config),
        };
        Ok(Server { shared, store })
    }

    /// The server's counters.
    pub fn stats(&self) -> Arc<ReceiverStats> {
        self.shared.stats.clone()
    }

    /// Serves one accepted connection over any byte stream (plain; a TLS session's token answers could not be
    /// bound to it): the handshake, then Offers and Pulls
    /// until the peer closes or `stop` fires; a failure is told to the peer before it is returned. This is what each
    /// of [`Server::run`]'s sessions does, without the connection limit; the fuzz targets drive it in memory.
    pub async fn serve_stream<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: S,
        peer: SocketAddr,
        stop: &CancellationToken,
    ) -> Result<(), TransferError> {
        let mut conn = Connection::new(stream, HANDSHAKE_MAX_FRAME);
        let result = serve_connection(&mut conn, &self.shared, stop, peer, None).await;
        if let Err(e) = &result {
            tell_peer(&mut conn, e).await;
        }
        result
    }

    /// Replays `input` (the bytes a client would send, ending with its close) to a session in memory and returns
    /// what the server answered, or `None` if the session did not end within `limit`. For fuzzing and for
    /// replaying captured sessions; blocking nothing but the caller's task.
    pub async fn replay(&self, input: &[u8], limit: Duration) -> Option<Vec<u8>> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, server) = tokio::io::duplex(256 * 1024);
        let (mut from_server, mut to_server) = tokio::io::split(client);
        let peer = SocketAddr::from(([127, 0, 0, 1], 0));
        let stop = CancellationToken::new();
        let session = self.serve_stream(server, peer, &stop);
        let feed = async {
            // The server may stop reading early (an error); then the rest of the input is moot.
            let _ = to_server.write_all(input).await;
            let _ = to_server.shutdown().await;
        };
        let mut answer = Vec::new();
        let drain = from_server.read_to_end(&mut answer);
        let all = async { tokio::join!(session, feed, drain) };
        let (_ended, (), _read) = tokio::time::timeout(limit, all).await.ok()?;
        Some(answer)
    }

    /// Serves `listener` until `shutdown` fires, then drains sessions and flushes the store.
    pub async fn run(self, listener: TcpListener, shutdown: CancellationToken) -> Result<(), ServerError> {
        let tracker = TaskTracker::new();
        tracker.spawn(sweep_periodically(self.shared.clone(), shutdown.clone()));
        let slots = Arc::new(Semaphore::new(self.shared.config.max_connections));
        let result = loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(conn) => conn,
                Err(e) if is_transient_accept_error(&e) => {
                    tracing::warn!(error = %e, "accept failed; continuing");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(e) => break Err(ServerError::Accept(e)),
            };
            self.shared.stats.connections.fetch_add(1, Ordering::Relaxed);
            let permit = slots.clone().try_acquire_owned().ok();
            let (shared, stop) = (self.shared.clone(), shutdown.child_token());
            tracker.spawn(async move {
                let _ = stream.set_nodelay(true);
                let Some(stream) = secure(stream, &shared.config, peer).await else {
                    return;
                };
                let binding = stream.channel_binding();
                let mut conn = Connection::new(stream, HANDSHAKE_MAX_FRAME);
                if permit.is_none() {
                    let busy = ErrorFrame::new(ErrorCode::TooManyConnections, "server is at its connection limit");
                    let _ =
                        tokio::time::timeout(Duration::from_secs(2), conn.write_message(&Message::Error(busy))).await;
                    return;
                }
                if let Err(e) = serve_connection(&mut conn, &shared, &stop, peer, binding).await {
                    tracing::info!(%peer, error = %e, "session ended with an error");
                    tell_peer(&mut conn, &e).await;
                }
                drop(permit);
            });
        };
        tracker.close();
        tracker.wait().await;
        self.store.flush()?;
        result
    }
}

/// Expires abandoned transfers and leftovers at start-up and then every `gc_interval`, until shutdown. Leftover
/// files get at least 10 minutes, far more than a batch of small files takes to write.
async fn sweep_periodically(shared: Shared, shutdown: CancellationToken) {
    let expiry = Expiry {
        transfers: shared.config.partial_ttl,
        leftovers: shared.config.partial_ttl.max(Duration::from_secs(600)),
    };
    loop {
        for ctx in shared.gate.contexts().cloned() {
            let swept =
                tokio::task::spawn_blocking(move || sweep(&ctx.store, &ctx.partial_dir, expiry, Some(&ctx.claims)));
            match swept.await {
                Ok(Ok(report)) if report != GcReport::default() => tracing::info!(?report, "expired abandoned work"),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "expiry sweep failed"),
                Err(e) => tracing::warn!(error = %e, "expiry sweep panicked"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(shared.config.gc_interval) => {}
        }
    }
}

/// The TLS handshake when the server has a certificate (bounded by the handshake timeout), else the plain stream.
/// `None` when the handshake failed; there is nobody to tell.
async fn secure(tcp: tokio::net::TcpStream, config: &ServerConfig, peer: SocketAddr) -> Option<Stream> {
    let Some(tls) = &config.tls else {
        return Some(Stream::Plain(tcp));
    };
    match tokio::time::timeout(config.handshake_timeout, tls.accept(tcp)).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::info!(%peer, "TLS handshake timed out");
            None
        }
    }
}

/// Handshake (and authentication), then serve Offers, Pulls and ListPartials inside the client's namespace until
/// the client closes the connection.
async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    shared: &Shared,
    stop: &CancellationToken,
    peer: SocketAddr,
    binding: Option<[u8; 32]>,
) -> Result<(), TransferError> {
    let config = &shared.config;
    let (tokens, binding) = (&shared.gate.tokens, binding.as_ref());
    let accepted = tokio::select! {
        accepted = handshake::server_accept(conn, config.handshake_timeout, tokens, binding, config.max_frame) => accepted?,
        _ = stop.cancelled() => return Err(TransferError::ShuttingDown),
    };
    let (client, version) = (accepted.client, accepted.version);
    let who = match &client {
        Some(id) => format!("client {id}"),
        None => format!("address {}", peer.ip()),
    };
    let _slot = shared.gate.admit(who)?;
    let (grant, ctx) = shared.gate.grant(client);
    let forbidden = |what: &str| {
        let who = grant.client.as_deref().unwrap_or("anonymous");
        TransferError::refused(
            ErrorCode::Forbidden,
            format!("client {who} may not {what} on this server"),
        )
    };
    loop {
        let msg = tokio::select! {
            msg = next_message(conn, config.idle_timeout, "waiting for an Offer") => msg,
            _ = stop.cancelled() => return Err(TransferError::ShuttingDown),
        };
        match msg {
            Ok(Message::Offer(_) | Message::TreeOffer(_) | Message::Join(_)) if !grant.permissions.push => {
                return Err(forbidden("push"))
            }
            Ok(Message::Pull(_)) if !grant.permissions.pull => return Err(forbidden("pull")),
            Ok(Message::ListPartials) if version < crate::PARTIALS_VERSION => {
                return Err(TransferError::Unexpected {
                    got: "ListPartials",
                    state: "speaking protocol version 3",
                })
            }
            Ok(Message::ListPartials) if !grant.permissions.push => return Err(forbidden("list partial uploads")),
            // One listing per connection: the scan is not free, and a client wanting another reconnects.
            Ok(Message::ListPartials) => return partials::list_partials(conn, ctx).await,
            Ok(Message::Offer(offer)) => {
                let path = RemotePath::parse(&offer.path).map_err(|e| TransferError::refused(ErrorCode::BadPath, e))?;
                receive(conn, ctx, path, offer.manifest, stop).await?;
            }
            Ok(Message::TreeOffer(offer)) => {
                let base = RemotePath::parse(&offer.path).map_err(|e| TransferError::refused(ErrorCode::BadPath, e))?;
                // The pushing client chose whether to record symlinks; recorded ones are checked to stay inside.
                receive_tree(conn, ctx, offer, Some(base), LinkPolicy::Record, stop).await?;
            }
            Ok(Message::Pull(pull)) => pull::serve_pull(conn, shared, ctx, pull, stop).await?,
            Ok(Message::Join(join)) => return serve_join(conn, ctx, join, stop).await,
            Ok(Message::Ping(nonce)) => {
                answer_ping(conn, nonce, config.idle_timeout).await?;
            }
            Ok(other) => {
                return Err(TransferError::Unexpected {
                    got: other.name(),
                    state: "waiting for an Offer",
                })
            }
            Err(TransferError::Closed(_)) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// The queue budget in KiB permits; never less than one maximal chunk, so every chunk can be queued.
fn budget_permits(bytes: u64) -> usize {
    let kib = bytes.div_ceil(1024).max(u64::from(crate::MAX_CHUNK_SIZE / 1024));
    usize::try_from(kib)
        .unwrap_or(Semaphore::MAX_PERMITS)
        .min(Semaphore::MAX_PERMITS)
}

/// Errors from `accept` that concern one connection or a passing resource shortage, not the listener.
fn is_transient_accept_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted | WouldBlock)
        || matches!(e.raw_os_error(), Some(23 | 24)) // ENFILE, EMFILE
}
