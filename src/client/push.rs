//! `ferry push`: the client takes the sender role for one file. A source that changes while it is sent is
//! re-manifested (bounded); everything else retries through [`super::Retrier`].

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::running::{AckRecord, Publisher};
use super::{blocking, classify, Backoff, ClientError, ClientEvent, Deadline, Retrier};
use crate::chunk::ChunkSpec;
use crate::manifest::{Hash, Manifest};
use crate::path::RemotePath;
use crate::source::{cache_streamed_manifest, cached_manifest_for, hash_resumable, manifest_for, MAX_SOURCE_CHANGES};
use crate::store::{now_secs, PushRecord, PushState, SenderStore, Store};
use crate::throttle::Bandwidth;
use crate::transfer::handshake::{Greeting, PendingWelcome};
use crate::transfer::sender::{send_behind, send_streams, Rehash, SendEvent, SendOptions, SendStats, Source};
use crate::transfer::stream_send::{send_streamed, HashWith, Hashed, Hashing, StreamSource};
use crate::transfer::{tell_peer, TransferError};
use crate::url::FerryUrl;
use crate::wire::{Committed, ErrorCode};

/// What to push where, and how.
#[derive(Clone, Debug)]
pub struct PushOptions {
    /// Local file.
    pub source: PathBuf,
    /// Destination URL.
    pub destination: FerryUrl,
    /// Client state directory (sled store).
    pub state_dir: PathBuf,
    /// How to cut the file.
    pub chunking: ChunkSpec,
    /// Consecutive failed attempts without progress before giving up.
    pub retries: u32,
    /// Sender tuning.
    pub send: SendOptions,
    /// Time allowed for the TCP connect.
    pub connect_timeout: Duration,
    /// Token and TLS settings.
    pub access: super::Access,
    /// TCP connections sharing the transfer of one file (1: just the one that offers it).
    pub streams: u32,
    /// Delays between attempts.
    pub backoff: Backoff,
    /// For a directory: whether symlinks are recreated or left out.
    pub links: crate::tree::LinkPolicy,
    /// Bandwidth cap shared by all of the run's connections (`--bwlimit`).
    pub bandwidth: Option<Bandwidth>,
    /// When the whole run must stop (`--max-duration`).
    pub deadline: Option<Deadline>,
    /// For a directory: remove what the remote tree holds beyond the source (`--delete`, protocol version 6).
    pub delete: bool,
}

impl PushOptions {
    /// A greeted connection to the destination's server.
    pub(super) async fn connect(&self) -> Result<super::ClientConnection, TransferError> {
        Ok(self.connect_welcomed().await?.0)
    }

    /// A connection to the destination's server whose Welcome may still be on its way (the first request can go
    /// behind Hello, proto-spec.md §3, "Pipelining").
    pub(super) async fn connect_greeted(
        &self,
    ) -> Result<(super::ClientConnection, crate::transfer::handshake::Greeting), TransferError> {
        super::connect_greeted(
            &self.destination,
            self.connect_timeout,
            self.send.io_timeout,
            &self.access,
            self.bandwidth.as_ref(),
        )
        .await
    }

    /// Like [`PushOptions::connect`], also returning the server's Welcome.
    pub(super) async fn connect_welcomed(
        &self,
    ) -> Result<(super::ClientConnection, crate::wire::Welcome), TransferError> {
        let (conn, greeting) = self.connect_greeted().await?;
        super::welcome_of(&self.destination, conn, greeting, self.send.io_timeout).await
    }
}

/// The outcome of a successful push.
#[derive(Clone, Debug)]
pub struct PushReport {
    /// Canonical source path.
    pub source: String,
    /// Destination URL with the resolved remote path.
    pub destination: String,
    /// File size.
    pub size: u64,
    /// Whole-file BLAKE3, verified by the server.
    pub digest: Hash,
    /// Chunks in the manifest.
    pub chunks: u32,
    /// Sender counters over all attempts.
    pub sent: SendStats,
    /// Connection attempts made.
    pub attempts: u32,
    /// The manifest came from the cache.
    pub manifest_cached: bool,
    /// Times the source changed during the run.
    pub source_changes: u32,
    /// The server's final report.
    pub committed: Committed,
    /// Wall time of the run.
    pub duration: Duration,
}

/// Pushes one file, resuming whatever the server already has.
pub async fn push(
    opts: PushOptions,
    on_event: &mut (dyn FnMut(ClientEvent) + Send),
) -> Result<PushReport, ClientError> {
    let started = Instant::now();
    let remote_path = opts.destination.remote_path_for(&opts.source)?;
    let destination = FerryUrl {
        path: remote_path.to_string(),
        ..opts.destination.clone()
    };
    let source_err = |e: std::io::Error| ClientError::Source(format!("{}: {e}", opts.source.display()));
    let canonical = std::fs::canonicalize(&opts.source).map_err(source_err)?;
    let file = Arc::new(File::open(&canonical).map_err(source_err)?);
    if !file.metadata().map_err(source_err)?.is_file() {
        return Err(ClientError::Source(format!(
            "{} is not a regular file",
            opts.source.display()
        )));
    }
    let store = {
        let dir = opts.state_dir.clone();
        blocking(move || Ok(SenderStore::open(&Store::open(&dir)?)?)).await?
    };
    let mut retrier = Retrier::new(opts.retries, opts.backoff.clone(), opts.deadline).failing_over(&opts.destination);
    let mut run = Run::default();
    // A connection to a server that speaks version 5 or older, greeted by the streamed attempt: the first whole
    // offer goes on it.
    let mut greeted = None;
    if opts.streams <= 1 {
        let first = Streamed {
            opts: &opts,
            store: &store,
            file: &file,
            canonical: &canonical,
            remote_path: &remote_path,
            destination: &destination,
        };
        match first.push(&mut retrier, &mut run, started, on_event).await? {
            First::Done(report) => return Ok(report),
            First::Whole(conn) => greeted = conn,
        }
    }
    let (manifest, manifest_cached) = retrier
        .bounded(
            load_manifest(&store, &file, &canonical, opts.chunking, false),
            Duration::ZERO,
        )
        .await??;
    opts.send.meter.expect(manifest.size);
    on_event(ClientEvent::Manifest {
        chunks: manifest.chunk_count(),
        size: manifest.size,
        cached: manifest_cached,
    });
    let mut record = start_record(&store, &canonical, &destination, manifest.size).await?;
    let _published = publish_push(&opts, &store, &record);
    let mut source = Source {
        file,
        manifest: Arc::new(manifest),
        // The receiver verifies every chunk before it writes it: a first send is not hashed again (§4).
        rehash: Rehash::AfterRejection,
    };
    let outcome = loop {
        let number = retrier.start();
        let acked_before = run.stats.chunks_acked;
        let sending = attempt(
            &opts,
            greeted.take(),
            number,
            &remote_path,
            &source,
            &mut run.stats,
            on_event,
        );
        let meter = opts.send.meter.clone();
        let only_commit_left = move || {
            let snap = meter.snapshot();
            snap.total > 0 && snap.done >= snap.total
        };
        let error = match retrier.bounded_or_finishing(sending, only_commit_left).await {
            Ok(Ok(committed)) => break Ok(committed),
            Ok(Err(e)) => e,
            Err(timed_out) => break Err(timed_out),
        };
        if let TransferError::SourceChanged(reason) = &error {
            run.source_changes += 1;
            on_event(ClientEvent::SourceChanged { reason: reason.clone() });
            if run.source_changes > MAX_SOURCE_CHANGES {
                break Err(ClientError::SourceUnstable(canonical.display().to_string()));
            }
            let rebuilding = load_manifest(&store, &source.file, &canonical, opts.chunking, true);
            match retrier.bounded(rebuilding, Duration::ZERO).await {
                Ok(Ok((manifest, _))) => source.manifest = Arc::new(manifest),
                Ok(Err(e)) | Err(e) => break Err(e),
            }
            continue;
        }
        if !error.is_retryable() {
            break Err(classify(error));
        }
        if let Err(gave_up) = retrier
            .wait_to_retry(error, run.stats.chunks_acked > acked_before, on_event)
            .await
        {
            break Err(gave_up);
        }
    };
    record.bytes_sent += run.stats.bytes_sent;
    record.state = if outcome.is_ok() {
        PushState::Done
    } else {
        PushState::Failed
    };
    record.last_error = outcome.as_ref().err().map(|e| e.to_string());
    save_push(&store, record, opts.send.meter.snapshot().done).await?;
    let committed = outcome?;
    Ok(PushReport {
        source: canonical.display().to_string(),
        destination: destination.to_string(),
        size: source.manifest.size,
        digest: source.manifest.digest,
        chunks: source.manifest.chunk_count(),
        sent: run.stats,
        attempts: retrier.attempts,
        manifest_cached,
        source_changes: run.source_changes,
        committed,
        duration: started.elapsed(),
    })
}

/// Counters of one `push` run.
#[derive(Default)]
struct Run {
    source_changes: u32,
    stats: SendStats,
}

/// One connection: connect, handshake, send.
async fn attempt(
    opts: &PushOptions,
    greeted: Option<super::ClientConnection>,
    number: u32,
    remote_path: &RemotePath,
    source: &Source,
    stats: &mut SendStats,
    on_event: &mut (dyn FnMut(ClientEvent) + Send),
) -> Result<Committed, TransferError> {
    // A single connection's Offer goes right behind Hello; extra streams wait for the Welcome (their Joins need
    // the Offer's answer anyway).
    let (mut conn, welcome) = match greeted {
        Some(conn) => (conn, None),
        None if opts.streams > 1 => (opts.connect().await?, None),
        None => {
            let (conn, greeting) = opts.connect_greeted().await?;
            (conn, greeting.into_pending())
        }
    };
    opts.send.meter.attempt();
    on_event(ClientEvent::Connected { attempt: number });
    let mut forward = |e: SendEvent| on_event(ClientEvent::Send(e));
    let path = remote_path.as_str();
    let result = if opts.streams > 1 && source.manifest.chunk_count() > 1 {
        let mut extra = Vec::new();
        for _ in 1..opts.streams.min(source.manifest.chunk_count()) {
            extra.push(opts.connect().await?);
        }
        send_streams(&mut conn, extra, path, source, &opts.send, stats, &mut forward).await
    } else {
        send_behind(&mut conn, welcome, path, source, &opts.send, stats, &mut forward).await
    };
    super::note_welcomed(&opts.destination, &conn);
    match &result {
        Ok(_) => {
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.shutdown()).await;
        }
        Err(e) => tell_peer(&mut conn, e).await,
    }
    result
}

/// The source's manifest from the cache (unless `rebuild`), or built by reading the file and then cached.
async fn load_manifest(
    store: &SenderStore,
    file: &Arc<File>,
    canonical: &Path,
    chunking: ChunkSpec,
    rebuild: bool,
) -> Result<(Manifest, bool), ClientError> {
    let (store, file, canonical) = (store.clone(), file.clone(), canonical.to_path_buf());
    blocking(move || Ok(manifest_for(&store, &file, &canonical, chunking, rebuild)?)).await
}

/// Publishes a push's progress for `ferry status` (and records what the receiver acknowledged) until dropped.
pub(super) fn publish_push(opts: &PushOptions, store: &SenderStore, record: &PushRecord) -> Publisher {
    let ack = AckRecord {
        store: store.clone(),
        source: record.source.clone(),
        destination: record.destination.clone(),
    };
    Publisher::start(
        &opts.state_dir,
        "push",
        record.source.clone(),
        record.destination.clone(),
        opts.send.meter.clone(),
        Some(ack),
    )
}

/// Saves a push's final record, and what the receiver held durably at the end (`done`, if it said anything).
pub(super) async fn save_push(store: &SenderStore, record: PushRecord, done: u64) -> Result<(), ClientError> {
    let store = store.clone();
    blocking(move || {
        if done > 0 {
            store.save_acked(&record.source, &record.destination, done)?;
        }
        Ok(store.save_push(&record)?)
    })
    .await
}

/// Records a push as in progress (keeping the bytes and start time of earlier runs of the same push).
pub(super) async fn start_record(
    store: &SenderStore,
    canonical: &Path,
    destination: &FerryUrl,
    size: u64,
) -> Result<PushRecord, ClientError> {
    let (store, source, destination) = (store.clone(), canonical.display().to_string(), destination.to_string());
    blocking(move || {
        let previous = store.push_record(&source, &destination)?;
        let record = PushRecord {
            source: source.clone(),
            destination: destination.clone(),
            state: PushState::InProgress,
            size,
            bytes_sent: previous.as_ref().map_or(0, |p| p.bytes_sent),
            last_error: None,
            started: previous.map_or_else(now_secs, |p| p.started),
            updated: now_secs(),
        };
        store.save_push(&record)?;
        Ok(record)
    })
    .await
}

/// The first attempt of a push whose manifest is not cached, offered streamed (proto-spec.md §4, "Streamed
/// offer") to a server that speaks protocol version 6: the file is read once, and its chunks travel while the rest
/// is still being hashed. Any failure leaves what the server made durable in its record; the run then goes on with
/// whole offers (the manifest built, or taken from the cache this attempt filled), which resume from it.
struct Streamed<'a> {
    opts: &'a PushOptions,
    store: &'a SenderStore,
    file: &'a Arc<File>,
    canonical: &'a Path,
    remote_path: &'a RemotePath,
    destination: &'a FerryUrl,
}

/// What the streamed first attempt left to do.
enum First {
    /// The file is committed.
    Done(PushReport),
    /// Go on with whole offers; on this connection first, if the server speaks version 5 or older.
    Whole(Option<super::ClientConnection>),
}

impl Streamed<'_> {
    /// The report if the streamed attempt committed the file, else what the whole offers start from.
    async fn push(
        &self,
        retrier: &mut Retrier,
        run: &mut Run,
        started: Instant,
        on_event: &mut (dyn FnMut(ClientEvent) + Send),
    ) -> Result<First, ClientError> {
        let opts = self.opts;
        let cached = {
            let (store, file, canonical) = (self.store.clone(), self.file.clone(), self.canonical.to_path_buf());
            let spec = opts.chunking;
            blocking(move || Ok(cached_manifest_for(&store, &file, &canonical, spec)?)).await?
        };
        if cached.is_some() {
            return Ok(First::Whole(None));
        }
        let source = StreamSource::of(self.file.clone(), opts.chunking)
            .map_err(|e| ClientError::Source(format!("{}: {e}", opts.source.display())))?;
        // Hashing, and the push's record, start while the connection is made: the first piece is hashed by the
        // time the handshake's round trip ends (a version-5 server or a failed connection drops the hashing).
        let (hashed, resumed) = self.start_hashing(&source);
        let (connected, record) = tokio::join!(
            retrier.bounded(opts.connect_greeted(), Duration::ZERO),
            start_record(self.store, self.canonical, self.destination, source.size),
        );
        let mut record = record?;
        // Without a token, `OfferStart` and the first pieces go right behind Hello; the Welcome is read after them.
        let conn = match connected {
            Ok(Ok((conn, Greeting::Welcomed(welcome)))) if welcome.version < crate::STREAMED_OFFER_VERSION => {
                return Ok(First::Whole(Some(conn)))
            }
            Ok(Ok((conn, greeting))) => Ok((conn, greeting.into_pending())),
            Ok(Err(e)) => Err(e),
            Err(expired) => {
                record.state = PushState::Failed;
                record.last_error = Some(expired.to_string());
                save_push(self.store, record, opts.send.meter.snapshot().done).await?;
                return Err(expired);
            }
        };
        let _published = publish_push(opts, self.store, &record);
        let number = retrier.start();
        let attempt = async {
            let (mut conn, welcome) = conn?;
            self.attempt(&mut conn, &source, hashed, welcome, &resumed, number, run, on_event)
                .await
        };
        let meter = opts.send.meter.clone();
        let only_commit_left = move || {
            let snap = meter.snapshot();
            snap.total > 0 && snap.done >= snap.total
        };
        let outcome = match retrier.bounded_or_finishing(attempt, only_commit_left).await {
            Ok(Ok(done)) => Ok(done),
            Ok(Err(e)) => match self.after_failure(e, retrier, run, on_event).await {
                Ok(()) => return Ok(First::Whole(None)),
                Err(e) => Err(e),
            },
            Err(timed_out) => Err(timed_out),
        };
        record.bytes_sent += run.stats.bytes_sent;
        record.state = if outcome.is_ok() {
            PushState::Done
        } else {
            PushState::Failed
        };
        record.last_error = outcome.as_ref().err().map(|e| e.to_string());
        save_push(self.store, record, opts.send.meter.snapshot().done).await?;
        let (committed, manifest) = outcome?;
        Ok(First::Done(PushReport {
            source: self.canonical.display().to_string(),
            destination: self.destination.to_string(),
            size: manifest.size,
            digest: manifest.digest,
            chunks: manifest.chunk_count(),
            sent: std::mem::take(&mut run.stats),
            attempts: retrier.attempts,
            manifest_cached: false,
            source_changes: run.source_changes,
            committed,
            duration: started.elapsed(),
        }))
    }

    /// Starts hashing `source` on its own thread: the manifest is cached as soon as it is hashed (a later attempt,
    /// or run, offers it whole and resumes), and hashing goes on from the progress a killed run recorded, and
    /// records its own. Returns the hashing and where it went on from (set once it ended).
    fn start_hashing(&self, source: &StreamSource) -> (Hashed, Arc<AtomicU64>) {
        let (store, file, canonical, spec) = (
            self.store.clone(),
            self.file.clone(),
            self.canonical.to_path_buf(),
            self.opts.chunking,
        );
        let on_hashed = {
            let (store, file, canonical) = (store.clone(), file.clone(), canonical.clone());
            Box::new(move |manifest: &Manifest| {
                if let Err(e) = cache_streamed_manifest(&store, &file, &canonical, spec, manifest) {
                    tracing::warn!(error = %e, "could not cache the manifest");
                }
            })
        };
        // Goes on from the hashing progress a killed run recorded, and records its own.
        let size = source.size;
        let resumed = Arc::new(AtomicU64::new(0));
        let hash_with: HashWith = {
            let resumed = resumed.clone();
            Box::new(move |sink| {
                let (digest, from) = hash_resumable(&store, &file, &canonical, spec, size, sink)?;
                resumed.store(from, Ordering::Relaxed);
                Ok(digest)
            })
        };
        let hashing = Hashing {
            with: Some(hash_with),
            on_hashed,
        };
        (hashing.start(source), resumed)
    }

    /// One streamed attempt on `conn`, greeted by a server that speaks version 6 or with its `welcome` still on
    /// the way, of `source` being `hashed`.
    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        conn: &mut super::ClientConnection,
        source: &StreamSource,
        hashed: Hashed,
        welcome: Option<PendingWelcome>,
        resumed: &AtomicU64,
        number: u32,
        run: &mut Run,
        on_event: &mut (dyn FnMut(ClientEvent) + Send),
    ) -> Result<(Committed, Manifest), TransferError> {
        let opts = self.opts;
        opts.send.meter.expect(source.size);
        opts.send.meter.attempt();
        on_event(ClientEvent::Connected { attempt: number });
        let path = self.remote_path.as_str();
        let mut forward = |e: SendEvent| on_event(ClientEvent::Send(e));
        let sent = send_streamed(
            conn,
            path,
            source,
            &opts.send,
            &mut run.stats,
            &mut forward,
            hashed,
            welcome,
        )
        .await;
        super::note_welcomed(&opts.destination, conn);
        match sent {
            Ok((committed, manifest)) => {
                let _ = tokio::time::timeout(Duration::from_secs(2), conn.shutdown()).await;
                on_event(ClientEvent::Manifest {
                    chunks: manifest.chunk_count(),
                    size: manifest.size,
                    cached: false,
                });
                Ok((committed, manifest))
            }
            Err(e) => {
                tell_peer(conn, &e).await;
                Err(self.blame_record(e, resumed.load(Ordering::Relaxed)).await)
            }
        }
    }

    /// A receiver that found the whole-file digest wrong when hashing went on from a record (`resumed` > 0): the
    /// record was wrong, not the receiver. It is dropped with the path's manifests and the failure counts as a
    /// changed source, so the whole offer that follows hashes the file from the start (once: its own failure is
    /// final).
    async fn blame_record(&self, error: TransferError, resumed: u64) -> TransferError {
        let digest_wrong = matches!(&error, TransferError::Remote(frame) if frame.code == ErrorCode::IntegrityFailed);
        if resumed == 0 || !digest_wrong {
            return error;
        }
        let (store, path) = (self.store.clone(), self.canonical.display().to_string());
        if let Err(e) = blocking(move || Ok(store.forget_manifests(&path)?)).await {
            tracing::warn!(error = %e, "could not drop the hashing record");
        }
        TransferError::SourceChanged(format!(
            "the digest hashed on from recorded progress (at byte {resumed}) was wrong ({error}); hashing from the start"
        ))
    }

    /// A failed streamed attempt: a changed source is counted (the whole offer that follows reads it again), a
    /// retryable failure waits its turn like any attempt; anything else ends the run.
    async fn after_failure(
        &self,
        error: TransferError,
        retrier: &mut Retrier,
        run: &mut Run,
        on_event: &mut (dyn FnMut(ClientEvent) + Send),
    ) -> Result<(), ClientError> {
        if let TransferError::OlderPeer { .. } = &error {
            // An older server: the whole offer follows on a new connection, at once (this is not a failure).
            tracing::info!(error = %error, "offering the file whole");
            return Ok(());
        }
        if let TransferError::SourceChanged(reason) = &error {
            run.source_changes += 1;
            on_event(ClientEvent::SourceChanged { reason: reason.clone() });
            return Ok(());
        }
        if !error.is_retryable() {
            return Err(classify(error));
        }
        let progressed = run.stats.chunks_acked > 0;
        retrier.wait_to_retry(error, progressed, on_event).await
    }
}
