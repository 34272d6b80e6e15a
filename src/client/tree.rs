//! Trees: `ferry push DIR` (the client sends a walked directory) and the tree half of `ferry pull`. One session
//! carries the whole tree; a cut link or a killed run resumes by offering the tree again, and the receiver skips
//! every file it already committed.

use std::path::Path;
use std::time::{Duration, Instant};

use super::{blocking, classify, ClientError, ClientEvent, PushOptions, Retrier};
use crate::exit;
use crate::path::RemotePath;
use crate::store::{PushState, SenderStore, Store};
use crate::transfer::sender::{SendEvent, SendStats};
use crate::transfer::tree_sender::{send_tree, TreeSent, TreeSource};
use crate::transfer::{tell_peer, TransferError};
use crate::tree::{scan, LocalTree};
use crate::url::FerryUrl;
use crate::wire::{EntryKind, TreeCommitted};

/// The outcome of a tree push or pull that ran to the end (some files may still have failed).
#[derive(Clone, Debug, Default)]
pub struct TreeReport {
    /// Where the tree came from.
    pub source: String,
    /// Where it went.
    pub destination: String,
    /// File entries offered.
    pub files: u64,
    /// Directory entries offered.
    pub dirs: u64,
    /// Symlink entries offered.
    pub symlinks: u64,
    /// Bytes of all files offered.
    pub bytes_total: u64,
    /// Files the receiver needed.
    pub files_needed: u64,
    /// File bytes and chunk bytes that crossed the wire (sent for a push, received for a pull).
    pub bytes_transferred: u64,
    /// The receiver's summary.
    pub committed: TreeCommitted,
    /// Entries left out on purpose, with the reason.
    pub skipped: Vec<(String, String)>,
    /// Files that could not be read or sent, with the reason.
    pub failed: Vec<(String, String)>,
    /// Entries the receiver did not place (listed in its `missing`), with the reason when this side knows it.
    pub refused: Vec<(String, String)>,
    /// Of those, files that no longer match the digest they were committed with (a pull from a damaged server).
    pub damaged: u64,
    /// Connection attempts.
    pub attempts: u32,
    /// Wall time.
    pub duration: Duration,
    /// True for a pull (bytes were received), false for a push.
    pub pulled: bool,
}

impl TreeReport {
    /// Whether every file made it (nothing failed, nothing missing on the receiver).
    pub fn complete(&self) -> bool {
        self.failed.is_empty() && self.committed.missing.is_empty()
    }

    /// The process exit code: 0 when complete; else integrity if a file was damaged at rest, local trouble if a
    /// push could not read files, and a rejection otherwise (files the receiver could not place, or that the
    /// server could not send).
    pub fn exit_code(&self) -> u8 {
        if self.complete() {
            exit::OK
        } else if self.damaged > 0 {
            exit::INTEGRITY
        } else if !self.failed.is_empty() && !self.pulled {
            exit::LOCAL
        } else {
            exit::REJECTED
        }
    }

    /// Fills the entry counts from the offered entries.
    pub fn count_entries<'a>(&mut self, entries: impl Iterator<Item = &'a EntryKind>) {
        for kind in entries {
            match kind {
                EntryKind::File { size, .. } => {
                    self.files += 1;
                    self.bytes_total = self.bytes_total.saturating_add(*size);
                }
                EntryKind::Dir { .. } => self.dirs += 1,
                EntryKind::Symlink { .. } => self.symlinks += 1,
            }
        }
    }
}

/// Pushes the directory `opts.source` into the remote directory named by `opts.destination`.
pub async fn push_tree(
    opts: PushOptions,
    on_event: &mut (dyn FnMut(ClientEvent) + Send),
) -> Result<TreeReport, ClientError> {
    let started = Instant::now();
    let remote_dir = opts.destination.path.trim_end_matches('/').to_string();
    RemotePath::parse(&remote_dir).map_err(crate::url::UrlError::from)?;
    let destination = FerryUrl {
        path: remote_dir.clone(),
        ..opts.destination.clone()
    };
    let dir = std::fs::canonicalize(&opts.source)
        .map_err(|e| ClientError::Source(format!("{}: {e}", opts.source.display())))?;
    let mut retrier = Retrier::new(opts.retries, opts.backoff.clone(), opts.deadline);
    let (store, tree) = retrier.bounded(scan_local(&opts, &dir), Duration::ZERO).await??;
    on_event(ClientEvent::Scanned {
        files: tree.file_count() as u64,
        bytes: tree.total_bytes(),
        skipped: tree.skipped.len() as u64,
    });
    let mut report = TreeReport {
        source: dir.display().to_string(),
        destination: destination.to_string(),
        skipped: tree.skipped.clone(),
        failed: tree.failed.clone(),
        ..TreeReport::default()
    };
    report.count_entries(tree.entries.iter().map(|e| &e.kind));
    let source = TreeSource {
        tree: &tree,
        store: &store,
        spec: opts.chunking,
        committed: None,
    };
    let mut record = super::push::start_record(&store, &dir, &destination, tree.total_bytes()).await?;
    let _published = super::push::publish_push(&opts, &store, &record);
    let mut stats = SendStats::default();
    let outcome = loop {
        let number = retrier.start();
        let before = stats.chunks_acked + stats.files_acked;
        let sending = attempt(&opts, number, &remote_dir, &source, &mut stats, on_event);
        let error = match retrier.bounded(sending, Duration::ZERO).await {
            Err(out_of_time) => break Err(out_of_time),
            Ok(Ok(sent)) => break Ok(sent),
            Ok(Err(e)) if !e.is_retryable() => break Err(classify(e)),
            Ok(Err(e)) => e,
        };
        let progressed = stats.chunks_acked + stats.files_acked > before;
        if let Err(gave_up) = retrier.wait_to_retry(error, progressed, on_event).await {
            break Err(gave_up);
        }
    };
    // For `ferry status`: a tree is one push record, its bytes the tree's file bytes.
    record.bytes_sent += stats.bytes_sent;
    record.state = match &outcome {
        Ok(sent) if sent.failed.is_empty() && sent.committed.missing.is_empty() => PushState::Done,
        _ => PushState::Failed,
    };
    record.last_error = match &outcome {
        Ok(sent) if record.state == PushState::Failed => Some(format!(
            "{} files not sent, {} not placed",
            sent.failed.len(),
            crate::ranges::ranges_len(&sent.committed.missing)
        )),
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    };
    super::push::save_push(&store, record, opts.send.meter.snapshot().done).await?;
    let sent = outcome?;
    report.damaged = sent.failed.iter().filter(|f| f.damaged).count() as u64;
    let missing = missing_entries(&sent.committed.missing, tree.entries.len());
    for failure in sent.failed {
        // A file the receiver refused (a TreeAck's `refused`) is not a local failure: it goes with the refused.
        if missing.contains(&failure.entry) {
            report.refused.push((failure.path, failure.reason));
        } else {
            report.failed.push((failure.path, failure.reason));
        }
    }
    let named: std::collections::HashSet<&str> = report.refused.iter().map(|(p, _)| p.as_str()).collect();
    let unnamed: Vec<(String, String)> = missing
        .iter()
        .map(|&i| &tree.entries[i as usize].path)
        .filter(|path| !named.contains(path.as_str()))
        .map(|path| (path.clone(), REFUSED_BY_RECEIVER.to_string()))
        .collect();
    report.refused.extend(unnamed);
    report.files_needed = sent.files_needed;
    report.committed = sent.committed;
    report.bytes_transferred = stats.bytes_sent;
    report.attempts = retrier.attempts;
    report.duration = started.elapsed();
    Ok(report)
}

/// Why a file the receiver left out (TreeCommitted's `missing`) did not land, when the wire carries no reason
/// (proto-spec.md §12: `missing` and `TreeAck.refused` are indices only; the server logs each refusal with its
/// reason).
pub const REFUSED_BY_RECEIVER: &str =
    "not placed by the receiver (refused: something in the way, over the size limit or quota, or symlinks not recorded; the server's log names the reason)";

/// The entry indices of `missing` (the receiver's runs) that name entries of the offer, ascending; indices past
/// the offer (a confused receiver) are ignored, so the walk is bounded by the tree, not by the peer's counts.
fn missing_entries(missing: &[crate::ranges::IndexRange], entries: usize) -> std::collections::BTreeSet<u32> {
    let limit = u32::try_from(entries).unwrap_or(u32::MAX);
    missing
        .iter()
        .flat_map(|run| run.start.min(limit)..run.start.saturating_add(run.count).min(limit))
        .collect()
}

async fn scan_local(opts: &PushOptions, dir: &Path) -> Result<(SenderStore, LocalTree), ClientError> {
    let (state_dir, dir, links, spec) = (opts.state_dir.clone(), dir.to_path_buf(), opts.links, opts.chunking);
    blocking(move || {
        let store = SenderStore::open(&Store::open(&state_dir)?)?;
        let tree = scan(&dir, links, &store, spec)?;
        Ok((store, tree))
    })
    .await
}

async fn attempt(
    opts: &PushOptions,
    number: u32,
    remote_dir: &str,
    source: &TreeSource<'_>,
    stats: &mut SendStats,
    on_event: &mut (dyn FnMut(ClientEvent) + Send),
) -> Result<TreeSent, TransferError> {
    let mut conn = opts.connect().await?;
    opts.send.meter.attempt();
    on_event(ClientEvent::Connected { attempt: number });
    let mut forward = |e: SendEvent| on_event(ClientEvent::Send(e));
    let result = send_tree(&mut conn, remote_dir, source, &opts.send, stats, &mut forward).await;
    match &result {
        Ok(_) => {
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.shutdown()).await;
        }
        Err(e) => tell_peer(&mut conn, e).await,
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_sizes_in_an_offer_do_not_overflow_the_report() {
        let mut report = TreeReport::default();
        let huge = EntryKind::File {
            size: u64::MAX,
            digest: [0; 32],
            mtime: crate::manifest::FileTime::default(),
            mode: 0,
        };
        report.count_entries([&huge, &huge].into_iter());
        assert_eq!(report.bytes_total, u64::MAX);
        assert_eq!(report.files, 2);
    }

    #[test]
    fn missing_runs_are_walked_within_the_offer_only() {
        let run = |start, count| crate::ranges::IndexRange { start, count };
        let got = missing_entries(&[run(1, 2), run(5, u32::MAX)], 7);
        assert_eq!(got.into_iter().collect::<Vec<_>>(), [1, 2, 5, 6]);
        assert!(missing_entries(&[run(u32::MAX, u32::MAX)], 3).is_empty());
    }
}
