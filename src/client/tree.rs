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
use crate::transfer::tree_sender::{send_tree_behind, TreeSent, TreeSource};
use crate::transfer::{recv, send_within, tell_peer, TransferError};
use crate::tree::{scan, LocalTree};
use crate::url::FerryUrl;
use crate::wire::{EntryKind, Message, TreeCommitted, TreePrune};

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
    /// What `--delete` did, if it was asked for.
    pub deletion: Option<Deletion>,
}

/// What `--delete` did: the receiver's extras removed, or why nothing was.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Deletion {
    /// Removed entries, relative to the tree's directory (a directory after its content; the receiver may list
    /// fewer than it removed).
    pub removed: Vec<String>,
    /// How many entries were removed in all.
    pub total: u64,
    /// Entries that could not be removed, with the reason.
    pub failed: Vec<(String, String)>,
    /// Why nothing was removed (the tree did not land completely), if so.
    pub skipped: Option<String>,
}

impl Deletion {
    /// Nothing removed, for `reason`.
    pub fn skipped(reason: impl Into<String>) -> Deletion {
        Deletion {
            skipped: Some(reason.into()),
            ..Deletion::default()
        }
    }

    /// From the receiver's report.
    pub fn from_report(report: crate::transfer::prune::PruneReport) -> Deletion {
        Deletion {
            removed: report.removed,
            total: report.total,
            failed: report.failed,
            skipped: None,
        }
    }
}

/// Why `--delete` removes nothing after a tree that did not land completely: a file that could not be read or
/// placed would otherwise look absent from the source, and its good copy on the receiver would go.
pub const NOT_DELETING: &str =
    "nothing deleted: the tree did not land completely (deleting only follows a complete run)";

impl TreeReport {
    /// Whether every file made it (nothing failed, nothing missing on the receiver) and `--delete`, if given,
    /// removed every extra.
    pub fn complete(&self) -> bool {
        self.failed.is_empty() && self.committed.missing.is_empty() && self.deletion_failed().is_empty()
    }

    /// Entries `--delete` could not remove.
    pub fn deletion_failed(&self) -> &[(String, String)] {
        self.deletion.as_ref().map_or(&[], |d| d.failed.as_slice())
    }

    /// The process exit code: 0 when complete; else integrity if a file was damaged at rest, local trouble if a
    /// push could not read files, and a rejection otherwise (files the receiver could not place, or that the
    /// server could not send).
    pub fn exit_code(&self) -> u8 {
        if self.complete() {
            exit::OK
        } else if self.damaged > 0 {
            exit::INTEGRITY
        } else if (!self.failed.is_empty() && !self.pulled) || (self.pulled && !self.deletion_failed().is_empty()) {
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
    let remote_dir = tree_destination(&opts.source, &opts.destination.path)?;
    let destination = FerryUrl {
        path: remote_dir.clone(),
        ..opts.destination.clone()
    };
    let dir = std::fs::canonicalize(&opts.source)
        .map_err(|e| ClientError::Source(format!("{}: {e}", opts.source.display())))?;
    let mut retrier = Retrier::new(opts.retries, opts.backoff.clone(), opts.deadline).failing_over(&opts.destination);
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
    // Files that could not be read are not in the tree: deleting would take their copies on the receiver too.
    let delete = match (opts.delete, tree.failed.is_empty()) {
        (false, _) => Delete::No,
        (true, true) => Delete::Yes,
        (true, false) => Delete::Refrain,
    };
    let outcome = loop {
        let number = retrier.start();
        let before = stats.chunks_acked + stats.files_acked;
        let sending = attempt(&opts, number, &remote_dir, &source, delete, &mut stats, on_event);
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
        Ok((sent, _)) if sent.failed.is_empty() && sent.committed.missing.is_empty() => PushState::Done,
        _ => PushState::Failed,
    };
    record.last_error = match &outcome {
        Ok((sent, _)) if record.state == PushState::Failed => Some(format!(
            "{} files not sent, {} not placed",
            sent.failed.len(),
            crate::ranges::ranges_len(&sent.committed.missing)
        )),
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    };
    super::push::save_push(&store, record, opts.send.meter.snapshot().done).await?;
    let (sent, deletion) = outcome?;
    report.deletion = deletion;
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
pub(super) fn missing_entries(
    missing: &[crate::ranges::IndexRange],
    entries: usize,
) -> std::collections::BTreeSet<u32> {
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

/// Whether a tree push ends with `--delete`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Delete {
    /// Not asked for.
    No,
    /// Asked for, and the source was read completely: delete if the tree lands completely.
    Yes,
    /// Asked for, but some source files could not be read: report that nothing is deleted.
    Refrain,
}

/// The remote directory a pushed tree goes into, rsync's way: `SRC/` (a trailing slash on the local directory, or
/// `.` as its last component) puts its content into the destination; `SRC` into `DEST/` (a trailing slash on the remote path) puts the
/// directory itself there, as `DEST/<name of SRC>`; `SRC` into `DEST` makes `DEST` the tree's directory.
pub fn tree_destination(source: &Path, destination: &str) -> Result<String, ClientError> {
    use std::os::unix::ffi::OsStrExt;
    // `DIR/`, and `.` or `DIR/.` (the directory's own entry), mean its content, as with rsync and cp.
    let raw = source.as_os_str().as_bytes();
    let contents = raw.ends_with(b"/") || raw == b"." || raw.ends_with(b"/.");
    let dir = if !contents && destination.ends_with('/') {
        let canonical =
            std::fs::canonicalize(source).map_err(|e| ClientError::Source(format!("{}: {e}", source.display())))?;
        let name = canonical.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
            ClientError::Source(format!(
                "{} has no name to give its copy under {destination} (push its content with a trailing '/')",
                source.display()
            ))
        })?;
        format!("{destination}{name}")
    } else {
        destination.trim_end_matches('/').to_string()
    };
    RemotePath::parse(&dir).map_err(crate::url::UrlError::from)?;
    Ok(dir)
}

async fn attempt(
    opts: &PushOptions,
    number: u32,
    remote_dir: &str,
    source: &TreeSource<'_>,
    delete: Delete,
    stats: &mut SendStats,
    on_event: &mut (dyn FnMut(ClientEvent) + Send),
) -> Result<(TreeSent, Option<Deletion>), TransferError> {
    // Without --delete the TreeOffer goes right behind Hello (every version knows it); --delete needs the
    // server's version before anything is sent.
    let (mut conn, pending) = match delete {
        Delete::No => {
            let (conn, greeting) = opts.connect_greeted().await?;
            (conn, greeting.into_pending())
        }
        _ => {
            let (mut conn, welcome) = opts.connect_welcomed().await?;
            refuse_delete_below_prune(&mut conn, &welcome).await?;
            (conn, None)
        }
    };
    opts.send.meter.attempt();
    on_event(ClientEvent::Connected { attempt: number });
    let mut forward = |e: SendEvent| on_event(ClientEvent::Send(e));
    let result = send_tree_behind(&mut conn, pending, remote_dir, source, &opts.send, stats, &mut forward).await;
    super::note_welcomed(&opts.destination, &conn);
    let result = match result {
        Ok(sent) => delete_extras(&mut conn, remote_dir, sent, delete, opts.send.io_timeout).await,
        Err(e) => Err(e),
    };
    match &result {
        Ok(_) => {
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.shutdown()).await;
        }
        Err(e) => tell_peer(&mut conn, e).await,
    }
    result
}

/// `--delete` against a server whose version cannot delete: refused before anything is sent.
async fn refuse_delete_below_prune(
    conn: &mut super::ClientConnection,
    welcome: &crate::wire::Welcome,
) -> Result<(), TransferError> {
    if welcome.version < crate::PRUNE_VERSION {
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.shutdown()).await;
        return Err(TransferError::refused(
            crate::wire::ErrorCode::VersionMismatch,
            format!(
                "--delete: the server ({}) speaks protocol version {}, which cannot delete; it needs version {}. \
                 Nothing was sent; push without --delete, or upgrade the server",
                welcome.agent,
                welcome.version,
                crate::PRUNE_VERSION
            ),
        ));
    }
    Ok(())
}

/// After a tree landed: asks the server to delete what the tree does not hold (TreePrune), if `--delete` was
/// given and the tree landed completely.
async fn delete_extras(
    conn: &mut super::ClientConnection,
    remote_dir: &str,
    sent: TreeSent,
    delete: Delete,
    idle: Duration,
) -> Result<(TreeSent, Option<Deletion>), TransferError> {
    let complete = sent.failed.is_empty() && sent.committed.missing.is_empty();
    let deletion = match delete {
        Delete::No => None,
        Delete::Refrain => Some(Deletion::skipped(NOT_DELETING)),
        Delete::Yes if !complete => Some(Deletion::skipped(NOT_DELETING)),
        Delete::Yes => {
            let request = Message::TreePrune(TreePrune {
                path: remote_dir.to_string(),
            });
            send_within(conn, &request, idle, "sending TreePrune").await?;
            match recv(conn, idle, "waiting for TreePruned").await? {
                Message::TreePruned(pruned) => Some(Deletion {
                    removed: pruned.removed,
                    total: pruned.total,
                    failed: pruned.failed.into_iter().map(|f| (f.path, f.reason)).collect(),
                    skipped: None,
                }),
                other => {
                    return Err(TransferError::Unexpected {
                        got: other.name(),
                        state: "waiting for TreePruned",
                    })
                }
            }
        }
    };
    Ok((sent, deletion))
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
    fn a_trailing_slash_or_dot_pushes_the_content_and_a_remote_slash_keeps_the_name() {
        let dir = tempfile::tempdir().unwrap();
        let photos = dir.path().join("photos");
        std::fs::create_dir(&photos).unwrap();
        let given = |suffix: &str| std::path::PathBuf::from(format!("{}{suffix}", photos.display()));
        let dest = |source: &Path, remote: &str| tree_destination(source, remote).unwrap();
        assert_eq!(dest(&given(""), "bk/"), "bk/photos");
        assert_eq!(dest(&given("/"), "bk/"), "bk");
        assert_eq!(dest(&given("/."), "bk/"), "bk");
        assert_eq!(dest(&given(""), "bk/pics"), "bk/pics");
        assert_eq!(dest(&given("/"), "bk/pics/"), "bk/pics");
        assert_eq!(dest(Path::new("."), "bk/"), "bk");
    }

    #[test]
    fn missing_runs_are_walked_within_the_offer_only() {
        let run = |start, count| crate::ranges::IndexRange { start, count };
        let got = missing_entries(&[run(1, 2), run(5, u32::MAX)], 7);
        assert_eq!(got.into_iter().collect::<Vec<_>>(), [1, 2, 5, 6]);
        assert!(missing_entries(&[run(u32::MAX, u32::MAX)], 3).is_empty());
    }
}
