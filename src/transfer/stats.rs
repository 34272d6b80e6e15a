//! What a receiver counts while it runs: the counters every receiving session (server or pulling client) adds to.
//! It lives with the receiver role, not with the server that reports it, so the engine never reaches up into
//! `server/` for it.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

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
