//! `ferry status`: the transfers this client's store knows about, and the caller's open transfers on a server.
//!
//! Locally, push records say what became of every push (done, failed, or interrupted), and the receiver records
//! of pulls say which pulled files are still partial and how much of them is durable. Pulls keep no record once
//! committed or failed, so only unfinished pulls are listed. sled lets one process open a store: while a push or
//! pull runs, [`local_transfers`] fails with [`StoreError::Locked`] and the run's progress file
//! ([`super::read_running`]) says what it is doing; conversely, whenever it succeeds, no ferry is running with that
//! store, so a push still marked in progress was interrupted (killed, or the machine stopped). A push records what
//! the receiver acknowledged while it runs, so an interrupted one shows how much the receiver holds.

use std::path::Path;
use std::time::Duration;

use super::{classify, connect_welcomed, Access, ClientError};
use crate::store::{PushRecord, PushState, ReceiverStore, SenderStore, Store, StoreError};
use crate::transfer::{recv, send_within, TransferError};
use crate::url::FerryUrl;
use crate::wire::{ErrorCode, Message, Partials};

/// Which way a transfer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// This client sends.
    Push,
    /// This client receives.
    Pull,
}

/// Where a transfer stands, as far as the client's store knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferState {
    /// Committed on the receiver.
    Done,
    /// Gave up with an error.
    Failed,
    /// Started and not finished, and no ferry is working on it now: re-running the same command resumes it.
    Interrupted,
    /// Moving now, in the ferry run that holds the state directory (as its progress file says).
    Running,
}

/// One transfer known to the client's store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferStatus {
    /// Push or pull.
    pub direction: Direction,
    /// Where it stands.
    pub state: TransferState,
    /// The canonical source path of a push; `None` for a pull (its records do not keep the URL).
    pub source: Option<String>,
    /// The `ferry://` URL of a push, the local file of a pull.
    pub destination: String,
    /// File size.
    pub size: u64,
    /// A push: chunk bytes sent over all finished runs. A pull: bytes durably in the local partial. A running
    /// transfer: payload bytes moved in this run.
    pub bytes: u64,
    /// Bytes the receiver holds durably, as it last acknowledged (a push's record, a running transfer's progress,
    /// a pull's local partial); `None` for a push recorded before ferry kept this figure.
    pub acked: Option<u64>,
    /// Why a failed push failed.
    pub last_error: Option<String>,
    /// When it started (Unix seconds).
    pub started: u64,
    /// When it was last updated (Unix seconds).
    pub updated: u64,
}

impl From<PushRecord> for TransferStatus {
    fn from(record: PushRecord) -> Self {
        TransferStatus {
            direction: Direction::Push,
            state: match record.state {
                PushState::Done => TransferState::Done,
                PushState::Failed => TransferState::Failed,
                PushState::InProgress => TransferState::Interrupted,
            },
            source: Some(record.source),
            destination: record.destination,
            size: record.size,
            bytes: record.bytes_sent,
            acked: None,
            last_error: record.last_error,
            started: record.started,
            updated: record.updated,
        }
    }
}

/// Every push and every unfinished pull recorded in the store at `state_dir`, most recently updated first. A
/// directory that does not exist holds no transfers (it is not created). Blocking; holds the store only while it
/// reads, so a push started meanwhile is kept waiting for no longer than that.
pub fn local_transfers(state_dir: &Path) -> Result<Vec<TransferStatus>, StoreError> {
    if !state_dir.is_dir() {
        return Ok(Vec::new());
    }
    let store = Store::open(state_dir)?;
    let sender = SenderStore::open(&store)?;
    let mut listed = Vec::new();
    for record in sender.push_records()? {
        let acked = match record.state {
            PushState::Done => Some(record.size),
            _ => sender.acked(&record.source, &record.destination)?,
        };
        let mut status = TransferStatus::from(record);
        // A source that shrank since: the receiver cannot hold more of it than its size.
        status.acked = acked.map(|a| a.min(status.size));
        listed.push(status);
    }
    for scope in ReceiverStore::scopes_with_transfers(&store)? {
        let (partials, _) = ReceiverStore::open_scoped(&store, &scope)?.partials(usize::MAX)?;
        listed.extend(partials.into_iter().map(|partial| TransferStatus {
            direction: Direction::Pull,
            state: TransferState::Interrupted,
            source: None,
            destination: Path::new(&scope).join(&partial.path).display().to_string(),
            size: partial.size,
            bytes: partial.durable_bytes,
            acked: Some(partial.durable_bytes),
            last_error: None,
            started: partial.created,
            updated: partial.updated,
        }));
    }
    listed.sort_by(|a, b| {
        b.updated
            .cmp(&a.updated)
            .then_with(|| a.destination.cmp(&b.destination))
    });
    Ok(listed)
}

impl From<super::Running> for TransferStatus {
    fn from(running: super::Running) -> Self {
        TransferStatus {
            direction: if running.kind == "pull" {
                Direction::Pull
            } else {
                Direction::Push
            },
            state: TransferState::Running,
            source: Some(running.source),
            destination: running.destination,
            size: running.size,
            bytes: running.moved,
            acked: Some(running.done.min(running.size)),
            last_error: None,
            started: running.started,
            updated: running.updated,
        }
    }
}

/// How to reach a server for [`server_partials`].
#[derive(Debug, Clone)]
pub struct StatusOptions {
    /// The server (`ferry://HOST[:PORT]`; a path, if any, keeps only the partials at or under it).
    pub server: FerryUrl,
    /// Token and TLS.
    pub access: Access,
    /// Limit for the TCP connect.
    pub connect_timeout: Duration,
    /// Limit for each step after it.
    pub io_timeout: Duration,
}

/// The caller's open transfers on the server (one connection, no retries; a URL naming several servers asks each in
/// turn, from the current one, while the failure concerns the server: [`super::concerns_server`]). A server that
/// speaks only protocol version 3 cannot list them: that is a rejection with a message saying so.
pub async fn server_partials(opts: &StatusOptions) -> Result<Partials, ClientError> {
    let servers = &opts.server.servers;
    let mut attempts = 1;
    loop {
        match partials_from_current(opts).await {
            Err(ClientError::Network { last, .. })
                if attempts < servers.len() as u32 && super::concerns_server(&last) =>
            {
                let (from, to) = servers.advance();
                tracing::info!(%from, %to, error = ?last.to_string(), "asking the next server");
                attempts += 1;
            }
            Err(ClientError::Network { last, .. }) => return Err(ClientError::Network { attempts, last }),
            done => return done,
        }
    }
}

/// [`server_partials`] from the URL's current server.
async fn partials_from_current(opts: &StatusOptions) -> Result<Partials, ClientError> {
    let failed = |e: TransferError| {
        if e.is_retryable() {
            ClientError::Network { attempts: 1, last: e }
        } else {
            classify(e)
        }
    };
    let (mut conn, welcome) = connect_welcomed(&opts.server, opts.connect_timeout, opts.io_timeout, &opts.access, None)
        .await
        .map_err(failed)?;
    if welcome.version < crate::PARTIALS_VERSION {
        return Err(ClientError::Rejected(TransferError::refused(
            ErrorCode::VersionMismatch,
            format!(
                "the server ({}) speaks protocol version {}, which cannot list partial transfers; it needs version {}",
                welcome.agent,
                welcome.version,
                crate::PARTIALS_VERSION
            ),
        )));
    }
    let idle = opts.io_timeout;
    send_within(&mut conn, &Message::ListPartials, idle, "sending ListPartials")
        .await
        .map_err(failed)?;
    // recv answers Pings while it waits; the whole wait is bounded too, so a peer that only pings cannot hold it.
    let reply = tokio::time::timeout(idle, recv(&mut conn, idle, "waiting for Partials"))
        .await
        .map_err(|_| failed(TransferError::Timeout(idle, "waiting for Partials")))?
        .map_err(failed)?;
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.shutdown()).await;
    let mut partials = match reply {
        Message::Partials(partials) => partials,
        other => {
            return Err(ClientError::Rejected(TransferError::Unexpected {
                got: other.name(),
                state: "waiting for Partials",
            }))
        }
    };
    let prefix = opts.server.path.trim_matches('/');
    if !prefix.is_empty() {
        partials
            .entries
            .retain(|e| e.path == prefix || e.path.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('/')));
    }
    Ok(partials)
}
