//! The server: listener, connection limits, TLS, per-connection sessions, and a draining shutdown.
//!
//! The server only picks a role: after the handshake (which proves the client's token when clients are configured,
//! see [`access`]), an Offer makes it the receiver, a Pull the sender ([`pull`]), and a ListPartials lists the open
//! transfers ([`partials`]), all confined to the client's namespace and permissions. Every session races its reads
//! against the shutdown token; on shutdown the listener stops, sessions end with `ShuttingDown` after making their
//! received chunks durable, and [`Server::run`] returns once all of them are gone and the store is flushed.

mod access;
mod partials;
mod preauth;
mod pull;
mod store_gc;

pub use access::ClientEntry;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
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
use crate::transfer::handshake::Accepted;
use crate::transfer::join::serve_join;
use crate::transfer::prune::serve_prune;
use crate::transfer::receiver::{receive, ReceiverContext};
use crate::transfer::tree_receiver::receive_tree;
/// The receiver's counters, defined with the receiver role (`transfer::stats`); named here too, where servers report them.
pub use crate::transfer::ReceiverStats;
use crate::transfer::{answer_ping, handshake, next_message, tell_peer, TransferError};
use crate::tree::LinkPolicy;
use crate::wire::codec::LEN_PREFIX;
use crate::wire::{Connection, ErrorCode, ErrorFrame, FrameBudget, Message, PullExpecting, PullKind, ReadLimits};
use crate::{HANDSHAKE_MAX_FRAME, MAX_FRAME, MAX_MANIFEST_CHUNKS};
use access::Gate;
use preauth::PreAuthPool;

/// Smallest `max_frame` a server may set: a maximal chunk at the default chunk size (4 MiB) and its header fit.
pub const MIN_MAX_FRAME: u32 = 5 * 1024 * 1024;

/// Server settings.
#[derive(Clone)]
pub struct ServerConfig {
    /// Files are committed under this directory.
    pub root: PathBuf,
    /// Where the sled store lives (default `ROOT/.ferry/state`).
    pub state_dir: Option<PathBuf>,
    /// Maximum concurrent connections past the handshake; more are refused with `TooManyConnections`.
    pub max_connections: usize,
    /// Maximum connections still in their handshake (TLS included), in a pool apart from `max_connections`; a
    /// newcomer beyond it evicts the oldest of the source address that has the most.
    pub max_preauth_connections: usize,
    /// Maximum connections in their handshake from one source address; more are closed at once.
    pub max_preauth_per_address: usize,
    /// Bytes of frame bodies (above 64 KiB each) all connections may buffer at once (at least `max_frame`).
    pub frame_budget: u64,
    /// Once a frame has started, its bytes must arrive at this average rate (bytes per second) after a grace
    /// of `min(idle_timeout, 10 s)`; 0: no minimum.
    pub min_frame_rate: u64,
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
    /// A re-push that mostly matches the committed file may be written into it in place under a redo journal
    /// (config `in_place = "auto"`, the default); false (`"never"`): always a new partial renamed over the file.
    pub in_place: bool,
    /// Large partials are written, and large files read, around the page cache where the filesystem allows
    /// (config `direct_io = "auto"`, the default); false (`"never"`): always through it.
    pub direct_io: bool,
    /// Keep received files in an object store (`--store s3://…`) instead of under `root`.
    pub object_store: Option<crate::storage::object::StoreSettings>,
}

impl ServerConfig {
    /// Defaults for a server rooted at `root`.
    pub fn new(root: PathBuf) -> Self {
        ServerConfig {
            root,
            state_dir: None,
            max_connections: 256,
            max_preauth_connections: 64,
            max_preauth_per_address: 8,
            frame_budget: 32 * 1024 * 1024,
            min_frame_rate: 16 * 1024,
            max_connections_per_client: 64,
            max_frame: MAX_FRAME,
            max_manifest_chunks: MAX_MANIFEST_CHUNKS,
            clients: Vec::new(),
            tls: None,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            sync_batch: 16 * 1024 * 1024,
            queue_budget: 256 * 1024 * 1024,
            max_file_size: u64::MAX,
            namespace_limits: Default::default(),
            partial_ttl: Duration::from_secs(7 * 24 * 3600),
            gc_interval: Duration::from_secs(3600),
            in_place: true,
            direct_io: true,
            object_store: None,
        }
    }
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

/// Most grace a frame gets before its minimum rate applies.
const MAX_FRAME_GRACE: Duration = Duration::from_secs(10);

/// What every session of a server shares.
#[derive(Clone)]
struct Shared {
    /// Frame bodies being buffered, server-wide.
    frames: Arc<FrameBudget>,
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
    /// The object store's periodic gc, when `[store] gc = true`.
    store_gc: Option<store_gc::StoreGc>,
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
        if config.frame_budget < u64::from(config.max_frame) + LEN_PREFIX as u64 {
            return Err(ServerError::Config(format!(
                "frame_budget must hold at least one frame of max_frame ({} bytes)",
                config.max_frame
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
        crate::storage::set_direct_io(config.direct_io);
        let store = Store::open(&state_dir)?;
        let partial_dir = partial_dir.canonicalize().unwrap_or(partial_dir);
        let (volume, store_gc) = match &config.object_store {
            Some(settings) => object_volume(settings, &config)?,
            None => (
                crate::storage::LocalVolume::shared(root.clone(), partial_dir.clone()),
                None,
            ),
        };
        let trees = (volume.tree_volume())
            .unwrap_or_else(|| crate::storage::LocalVolume::shared_tree(root.clone(), partial_dir.clone()));
        let receiver = ReceiverContext {
            volume,
            trees,
            root,
            partial_dir,
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
            policy: crate::transfer::receiver::ReceiverPolicy {
                in_place: config.in_place,
                ..crate::transfer::receiver::ReceiverPolicy::SERVER
            },
        };
        let gate = Gate::open(&receiver, &store, &config.clients, config.max_connections_per_client)?;
        let shared = Shared {
            frames: FrameBudget::new(config.frame_budget),
            gate,
            sender: SenderStore::open(&store)?,
            stats: receiver.stats,
            config: Arc::new(config),
        };
        Ok(Server {
            shared,
            store,
            store_gc,
        })
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
        conn.set_read_limits(self.shared.read_limits());
        let deadline = tokio::time::Instant::now() + self.shared.config.handshake_timeout;
        let result = match handshake_by(&mut conn, &self.shared, stop, None, deadline).await {
            Ok(accepted) => serve_session(&mut conn, &self.shared, stop, peer, accepted).await,
            Err(e) => Err(e),
        };
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
    pub async fn run(mut self, listener: TcpListener, shutdown: CancellationToken) -> Result<(), ServerError> {
        let tracker = TaskTracker::new();
        tracker.spawn(sweep_periodically(self.shared.clone(), shutdown.clone()));
        if let Some(gc) = self.store_gc.take() {
            tracker.spawn(store_gc::run_periodically(gc, shutdown.clone()));
        }
        let slots = Arc::new(Semaphore::new(self.shared.config.max_connections));
        let config = &self.shared.config;
        let preauth = PreAuthPool::new(config.max_preauth_connections, config.max_preauth_per_address);
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
            let Some(ticket) = preauth.admit(peer.ip()) else {
                refuse_at_once(&stream, self.shared.config.tls.is_some());
                continue;
            };
            let deadline = tokio::time::Instant::now() + self.shared.config.handshake_timeout;
            let accepted = NewConnection {
                stream,
                peer,
                ticket,
                deadline,
            };
            let session = serve_accepted(accepted, self.shared.clone(), shutdown.child_token(), slots.clone());
            tracker.spawn(session);
        };
        tracker.close();
        tracker.wait().await;
        self.store.flush()?;
        result
    }
}

/// A connection just accepted, with its place in the pre-auth pool and its handshake deadline.
struct NewConnection {
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    ticket: preauth::PreAuthTicket,
    deadline: tokio::time::Instant,
}

/// One accepted connection's life: the handshake in the pre-auth pool (by its deadline, unless evicted), then one
/// of the server's `slots` and the session.
async fn serve_accepted(accepted: NewConnection, shared: Shared, stop: CancellationToken, slots: Arc<Semaphore>) {
    let NewConnection {
        stream,
        peer,
        ticket,
        deadline,
    } = accepted;
    let _ = stream.set_nodelay(true);
    let opened = tokio::select! {
        opened = open_session(stream, &shared, &stop, peer, deadline) => opened,
        () = ticket.evicted().cancelled() => {
            tracing::debug!(%peer, "evicted before completing the handshake");
            None
        }
    };
    drop(ticket);
    let Some((mut conn, accepted)) = opened else {
        return;
    };
    // Only a connection that completed the handshake takes one of the server's slots.
    let Ok(permit) = slots.try_acquire_owned() else {
        let busy = TransferError::refused(ErrorCode::TooManyConnections, "server is at its connection limit");
        // What it pipelined behind its Hello is small (proto-spec.md §3): at most 1 MiB.
        refuse_session(&mut conn, &busy, PIPELINED_DRAIN_BYTES).await;
        return;
    };
    if let Err(e) = serve_session(&mut conn, &shared, &stop, peer, accepted).await {
        tracing::info!(%peer, error = %printable(&e.to_string()), "session ended with an error");
        // The peer may have a window of chunks in flight.
        refuse_session(&mut conn, &e, SESSION_DRAIN_BYTES).await;
    }
    drop(permit);
}

/// Tells the peer why its session ends, then reads and drops what it still sends (at most `max` bytes, within
/// [`LINGER`]) until it closes: closing with those bytes unread would reset the connection and discard the Error
/// frame before the peer read it (it would then retry a final error).
async fn refuse_session<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    error: &TransferError,
    max: usize,
) {
    tell_peer(conn, error).await;
    let _ = conn.shutdown().await;
    conn.drain_at_most(tokio::time::Instant::now() + LINGER, max).await;
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

impl Shared {
    /// What a client may make the server buffer, and how slowly it may send a frame.
    fn read_limits(&self) -> ReadLimits {
        ReadLimits {
            budget: self.frames.clone(),
            budget_wait: self.config.idle_timeout,
            min_rate: self.config.min_frame_rate,
            grace: self.config.idle_timeout.min(MAX_FRAME_GRACE),
        }
    }
}

/// Closes a connection whose address already has its share of handshakes in progress, without a task: a plain
/// client is told `TooManyConnections` if the socket takes the frame at once (a TLS client could not read it).
fn refuse_at_once(tcp: &tokio::net::TcpStream, tls: bool) {
    if tls {
        return;
    }
    let busy = ErrorFrame::new(
        ErrorCode::TooManyConnections,
        "too many connections from this address are in their handshake",
    );
    let mut frame = Vec::new();
    if crate::wire::codec::encode_frame(&Message::Error(busy), HANDSHAKE_MAX_FRAME, &mut frame).is_ok() {
        let _ = tcp.try_write(&frame);
    }
}

/// The TLS handshake (if configured) and the ferry handshake, all by `deadline`. `None` when either failed (the
/// peer was told why where it can read it).
async fn open_session(
    tcp: tokio::net::TcpStream,
    shared: &Shared,
    stop: &CancellationToken,
    peer: SocketAddr,
    deadline: tokio::time::Instant,
) -> Option<(Connection<Stream>, Accepted)> {
    let stream = secure(tcp, &shared.config, peer, deadline).await?;
    let binding = stream.channel_binding();
    let mut conn = Connection::new(stream, HANDSHAKE_MAX_FRAME);
    conn.set_read_limits(shared.read_limits());
    match handshake_by(&mut conn, shared, stop, binding, deadline).await {
        Ok(accepted) => Some((conn, accepted)),
        Err(e) => {
            tracing::info!(%peer, error = %printable(&e.to_string()), "handshake failed");
            tell_peer(&mut conn, &e).await;
            conn.drain(deadline.min(tokio::time::Instant::now() + LINGER)).await;
            None
        }
    }
}

/// How long a refused peer's remaining bytes are read and dropped after the Error frame, so that closing does not
/// reset the connection before the peer has read why.
const LINGER: Duration = Duration::from_secs(1);

/// What a failed session reads and drops at most after its Error frame: more than a default window in flight.
const SESSION_DRAIN_BYTES: usize = 256 * 1024 * 1024;

/// What a connection refused for want of a slot reads and drops at most: the request a client may pipeline behind
/// its Hello ([`crate::transfer::PIPELINED_FRAME_MAX`], what [`Connection::drain`] reads too).
const PIPELINED_DRAIN_BYTES: usize = crate::transfer::PIPELINED_FRAME_MAX as usize;

/// The ferry handshake (and authentication), to be completed by `deadline`.
async fn handshake_by<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    shared: &Shared,
    stop: &CancellationToken,
    binding: Option<[u8; 32]>,
    deadline: tokio::time::Instant,
) -> Result<Accepted, TransferError> {
    let config = &shared.config;
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    let accept = handshake::server_accept(conn, left, &shared.gate.tokens, binding.as_ref(), config.max_frame);
    tokio::select! {
        accepted = accept => accepted,
        _ = stop.cancelled() => Err(TransferError::ShuttingDown),
    }
}

/// The TLS handshake when the server has a certificate (by `deadline`, the ferry handshake's too), else the
/// plain stream. A peer whose first byte does not open a TLS handshake record is told in a plain ferry Error
/// frame (`TlsRequired`) that this server speaks only TLS. `None` when the handshake failed.
async fn secure(
    tcp: tokio::net::TcpStream,
    config: &ServerConfig,
    peer: SocketAddr,
    deadline: tokio::time::Instant,
) -> Option<Stream> {
    let Some(tls) = &config.tls else {
        return Some(Stream::Plain(tcp));
    };
    let mut first = [0u8; 1];
    match tokio::time::timeout_at(deadline, tcp.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] != TLS_HANDSHAKE_RECORD => {
            tracing::info!(%peer, "a plain client reached this TLS server");
            let mut conn = Connection::new(Stream::Plain(tcp), HANDSHAKE_MAX_FRAME);
            let refusal = TransferError::refused(
                ErrorCode::TlsRequired,
                "this server speaks only TLS; connect with --tls-fingerprint or --tls-ca",
            );
            tell_peer(&mut conn, &refusal).await;
            conn.drain(deadline.min(tokio::time::Instant::now() + LINGER)).await;
            return None;
        }
        Ok(Ok(1)) => {}
        _ => return None,
    }
    match tokio::time::timeout_at(deadline, tls.accept(tcp)).await {
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

/// The first byte of a TLS ClientHello: the record type "handshake".
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Serves Offers, Pulls and ListPartials inside the client's namespace until the client closes the connection.
async fn serve_session<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    shared: &Shared,
    stop: &CancellationToken,
    peer: SocketAddr,
    accepted: Accepted,
) -> Result<(), TransferError> {
    let config = &shared.config;
    let (client, version) = (accepted.client, accepted.version);
    let who = match &client {
        Some(id) => format!("client {id}"),
        None => format!("address {}", peer.ip()),
    };
    let _slot = shared.gate.admit(who)?;
    let (grant, ctx) = shared.gate.grant(client);
    // A client that may not read the namespace must not learn its content from what a Need leaves out
    // (proto-spec.md §4, "Reuse"): no chunk index, and the file at the destination only in place.
    let unread;
    let ctx = if grant.permissions.pull {
        ctx
    } else {
        unread = ReceiverContext {
            policy: ctx.policy.without_read(),
            ..ctx.clone()
        };
        &unread
    };
    let forbidden = |what: &str| {
        let who = grant.client.as_deref().unwrap_or("anonymous");
        TransferError::refused(
            ErrorCode::Forbidden,
            format!("client {who} may not {what} on this server"),
        )
    };
    // The tree this connection committed last, for a TreePrune right after it (protocol version 6).
    let mut last_tree = None;
    loop {
        let msg = tokio::select! {
            msg = next_message(conn, config.idle_timeout, "waiting for an Offer") => msg,
            _ = stop.cancelled() => return Err(TransferError::ShuttingDown),
        };
        match msg {
            Ok(Message::Offer(_) | Message::OfferStart(_) | Message::TreeOffer(_) | Message::Join(_))
                if !grant.permissions.push =>
            {
                return Err(forbidden("push"))
            }
            Ok(Message::Pull(_) | Message::PullExpecting(_)) if !grant.permissions.pull => {
                return Err(forbidden("pull"))
            }
            Ok(Message::PullExpecting(_)) if version < crate::PULL_KIND_VERSION => {
                return Err(TransferError::Unexpected {
                    got: "PullExpecting",
                    state: "speaking protocol version 3 or 4",
                })
            }
            Ok(Message::OfferStart(_)) if version < crate::STREAMED_OFFER_VERSION => {
                return Err(TransferError::Unexpected {
                    got: "OfferStart",
                    state: "speaking protocol version 5 or older",
                })
            }
            Ok(Message::ListPartials) if version < crate::PARTIALS_VERSION => {
                return Err(TransferError::Unexpected {
                    got: "ListPartials",
                    state: "speaking protocol version 3",
                })
            }
            Ok(Message::ListPartials) if !grant.permissions.push => return Err(forbidden("list partial uploads")),
            // proto-spec.md §13: the connection stays in its state; another request may follow. A listing costs one
            // bounded store scan, no more than the reconnect a client would otherwise make.
            Ok(Message::ListPartials) => partials::list_partials(conn, ctx).await?,
            Ok(Message::Offer(offer)) => {
                let path = RemotePath::parse(&offer.path).map_err(|e| TransferError::refused(ErrorCode::BadPath, e))?;
                receive(conn, ctx, path, offer.manifest, stop).await?;
            }
            Ok(Message::OfferStart(start)) => {
                let path = RemotePath::parse(&start.path).map_err(|e| TransferError::refused(ErrorCode::BadPath, e))?;
                crate::transfer::stream_offer::receive_streamed(conn, ctx, path, start, stop).await?;
            }
            Ok(Message::TreeOffer(offer)) => {
                let base = RemotePath::parse(&offer.path).map_err(|e| TransferError::refused(ErrorCode::BadPath, e))?;
                // The pushing client chose whether to record symlinks; recorded ones are checked to stay inside.
                let received = receive_tree(conn, ctx, offer, Some(base.clone()), LinkPolicy::Record, stop).await?;
                if version >= crate::PRUNE_VERSION {
                    last_tree = Some((base, received.entries));
                }
                continue;
            }
            Ok(Message::TreePrune(_)) if version < crate::PRUNE_VERSION => {
                return Err(TransferError::Unexpected {
                    got: "TreePrune",
                    state: "speaking protocol version 5 or older",
                })
            }
            Ok(Message::TreePrune(request)) => serve_prune(conn, ctx, last_tree.take(), request).await?,
            Ok(Message::Pull(pull)) => pull::serve_pull(conn, shared, ctx, pull, PullKind::Any, stop).await?,
            Ok(Message::PullExpecting(PullExpecting { pull, expect })) => {
                pull::serve_pull(conn, shared, ctx, pull, expect, stop).await?
            }
            Ok(Message::Join(join)) => return serve_join(conn, ctx, join, stop).await,
            Ok(Message::Ping(nonce)) => {
                answer_ping(conn, nonce, config.idle_timeout).await?;
                continue;
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
        // Any other request in between: a TreePrune no longer follows its tree.
        last_tree = None;
    }
}

/// `text` safe for a log line: control characters (newlines, terminal escapes) become '?'.
fn printable(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
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

/// The volume of the unnamed namespace in the object store of `settings`, after the store answered (the format
/// marker is written if absent). Blocking: call from a blocking thread inside the runtime.
/// The object volume of `settings`, and the periodic gc `[store] gc = true` asks for (over the same client, every
/// `gc_interval`, expiring after `partial_ttl`).
fn object_volume(
    settings: &crate::storage::object::StoreSettings,
    config: &ServerConfig,
) -> Result<(Arc<dyn crate::storage::Volume>, Option<store_gc::StoreGc>), ServerError> {
    use crate::storage::object::{s3, ObjectVolume};
    let store_error = |e: s3::StoreError| ServerError::Config(e.to_string());
    let options = settings.options().map_err(store_error)?;
    let store = settings.build().map_err(store_error)?;
    let handle = tokio::runtime::Handle::current();
    handle.block_on(s3::ensure_marker(&*store)).map_err(store_error)?;
    tracing::info!(bucket = %settings.bucket, prefix = %settings.prefix, "files are kept in the object store");
    let gc = settings.gc.then(|| store_gc::StoreGc {
        store: store.clone(),
        prefix: settings.prefix.clone(),
        settings: crate::storage::object_gc::GcSettings {
            grace: options.grace,
            transfer_ttl: config.partial_ttl,
            ..Default::default()
        },
        interval: config.gc_interval,
    });
    let volume = ObjectVolume::new(handle, store, &settings.prefix, "", options);
    Ok((Arc::new(volume), gc))
}
