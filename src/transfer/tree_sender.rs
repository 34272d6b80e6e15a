//! The sender role for a tree: offer every entry at once, stream the small files the receiver needs as
//! FileData within the byte window (no round trip per file), then send each large (or changed) file through its
//! own Offer with the per-file [`sender`](super::sender), and finish with TreeCommit.
//!
//! A small file of a push is read once more to be sent, and checked against the size and mtime offered (not
//! hashed again: the receiver verifies every file against the offered digest before it places it, proto-spec.md
//! §12). If it no longer matches, it is sent later through its own Offer with a fresh manifest; if the receiver
//! rejects it (its bytes changed but not its size or mtime), it is read again and hashed, and sent again only if
//! it matches the digest offered (damaged in transit), else through its own Offer. A file the receiver role
//! committed (a server serving a pull) is hashed on its first read, since a mismatch there is damage to report.
//! A file that vanished, cannot be read or keeps changing is reported as failed; the rest of the tree still goes
//! through.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use super::handshake::PendingWelcome;
use super::sender::{send, Rehash, SendEvent, SendOptions, SendStats, Source};
use super::window::Window;
use super::{answer_ping, next_message, recv, send_first, send_within, with_keepalive, TransferError};
use crate::chunk::ChunkSpec;
use crate::manifest::Manifest;
use crate::path::hide_root;
use crate::ranges::{ranges_within, IndexRange};
use crate::source::{manifest_for, SourceError, MAX_SOURCE_CHANGES};
use crate::store::SenderStore;
use crate::tree::{FileBeneath, FileOpener, LocalTree};
use crate::wire::message::truncate_message;
use crate::wire::{Connection, EntryKind, FileData, Message, TreeCommit, TreeCommitted, TreeFailure, TreeOffer};
use crate::MAX_INLINE_FILE;

/// Small files the receiver may ask for again (failed verification) in one session.
const MAX_RESENDS: u32 = 64;
/// Small files read ahead of the socket.
const READ_AHEAD: usize = 16;
/// Where the window of small files starts unless the user set one: the receiver acknowledges them a batch at a
/// time, after the batch's sync, so a window of about one batch would keep its disk idle while this side waits
/// for the Ack; a few batches keep the next ones coming meanwhile.
const TREE_WINDOW: u64 = 64 * 1024 * 1024;

/// How a tree send ended.
#[derive(Debug, Clone, Default)]
pub struct TreeSent {
    /// The receiver's summary.
    pub committed: TreeCommitted,
    /// Files this side could not send (also told to the receiver in TreeCommit).
    pub failed: Vec<FileFailure>,
    /// Files the receiver asked for.
    pub files_needed: u64,
}

/// A file of a tree that could not be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileFailure {
    /// Its entry index.
    pub entry: u32,
    /// Its path in the tree.
    pub path: String,
    /// Why.
    pub reason: String,
    /// It no longer matches the digest it was committed with: damaged at rest.
    pub damaged: bool,
}

/// What the sender of a tree needs besides the connection.
pub struct TreeSource<'a> {
    /// The walked tree.
    pub tree: &'a LocalTree,
    /// Where manifests are cached.
    pub store: &'a SenderStore,
    /// How large files are cut.
    pub spec: ChunkSpec,
    /// The committed manifest of an entry marked [`LocalTree::committed`], by its path in the tree.
    pub committed: Option<RecordedManifest<'a>>,
}

/// Looks up the manifest a file was committed with, by its path in the tree.
pub type RecordedManifest<'a> = &'a (dyn Fn(&str) -> Option<Manifest> + Sync);

/// Offers `source.tree` for the directory `remote_dir` and sends what the receiver needs until TreeCommitted.
pub async fn send_tree<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    remote_dir: &str,
    source: &TreeSource<'_>,
    opts: &SendOptions,
    stats: &mut SendStats,
    on_event: &mut (dyn FnMut(SendEvent) + Send),
) -> Result<TreeSent, TransferError> {
    send_tree_behind(conn, None, remote_dir, source, opts, stats, on_event).await
}

/// Like [`send_tree`], on a connection whose Welcome may still be on its way (`welcome`): the TreeOffer goes right
/// behind the handshake if its frame is at most [`super::PIPELINED_FRAME_MAX`] (proto-spec.md §3, "Pipelining";
/// every version since 2 knows trees).
pub async fn send_tree_behind<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    welcome: Option<PendingWelcome>,
    remote_dir: &str,
    source: &TreeSource<'_>,
    opts: &SendOptions,
    stats: &mut SendStats,
    on_event: &mut (dyn FnMut(SendEvent) + Send),
) -> Result<TreeSent, TransferError> {
    let tree = source.tree;
    let offer = Message::TreeOffer(TreeOffer {
        path: remote_dir.to_string(),
        entries: tree.entries.clone(),
    });
    send_first(conn, welcome, &offer, opts.io_timeout, "sending TreeOffer").await?;
    let needed = match recv(conn, opts.io_timeout, "waiting for TreeNeed").await? {
        Message::TreeNeed(need) => needed_files(tree, &need.entries)?,
        other => {
            return Err(TransferError::Unexpected {
                got: other.name(),
                state: "waiting for TreeNeed",
            })
        }
    };
    let bytes = needed.iter().map(|&i| file_size(tree, i)).sum();
    let total: u64 = (0..tree.entries.len() as u32).map(|i| file_size(tree, i)).sum();
    opts.meter.tree(total, total.saturating_sub(bytes));
    on_event(SendEvent::TreeNeed {
        files: needed.len() as u64,
        bytes,
    });
    let (small, mut large): (Vec<u32>, Vec<u32>) = needed.iter().partition(|&&i| file_size(tree, i) <= MAX_INLINE_FILE);
    let mut failed = Vec::new();
    let outcome = SmallFiles::new(tree, opts).run(conn, small, stats).await?;
    for failure in outcome.failed {
        report_failure(tree, failure, &mut failed, on_event);
    }
    large.extend(outcome.changed);
    large.sort_unstable();
    for index in large {
        if let Err(failure) = send_one(conn, remote_dir, source, index, opts, stats, on_event).await? {
            report_failure(tree, failure, &mut failed, on_event);
        }
    }
    let commit = TreeCommit {
        failed: failed
            .iter()
            .map(|f: &FileFailure| TreeFailure {
                entry: f.entry,
                damaged: f.damaged,
                reason: truncate_message(f.reason.clone()),
            })
            .collect(),
    };
    send_within(
        conn,
        &Message::TreeCommit(commit),
        opts.io_timeout,
        "sending TreeCommit",
    )
    .await?;
    match recv(conn, opts.io_timeout, "waiting for TreeCommitted").await? {
        Message::TreeCommitted(committed) => Ok(TreeSent {
            committed,
            failed,
            files_needed: needed.len() as u64,
        }),
        other => Err(TransferError::Unexpected {
            got: other.name(),
            state: "waiting for TreeCommitted",
        }),
    }
}

/// A file that could not be sent: entry index, reason, damaged at rest.
type Failure = (u32, String, bool);

fn report_failure(
    tree: &LocalTree,
    (entry, reason, damaged): Failure,
    failed: &mut Vec<FileFailure>,
    on_event: &mut (dyn FnMut(SendEvent) + Send),
) {
    let path = tree.entries[entry as usize].path.clone();
    // Told to the receiver: paths relative to where the tree's walk starts, never the sender's own layout.
    let reason = hide_root(&tree.base, &reason);
    tracing::warn!(path, reason, damaged, "file not sent");
    on_event(SendEvent::FileFailed {
        path: path.clone(),
        reason: reason.clone(),
    });
    failed.push(FileFailure {
        entry,
        path,
        reason,
        damaged,
    });
}

/// The file indices a TreeNeed names; anything but ascending runs of file entries is a protocol error.
fn needed_files(tree: &LocalTree, ranges: &[IndexRange]) -> Result<Vec<u32>, TransferError> {
    let count = u32::try_from(tree.entries.len()).unwrap_or(u32::MAX);
    let bad = || TransferError::Unexpected {
        got: "TreeNeed",
        state: "it names entries that are not files of the offer",
    };
    if !ranges_within(ranges, count) {
        return Err(bad());
    }
    let indices: Vec<u32> = ranges.iter().flat_map(IndexRange::indices).collect();
    if indices.iter().any(|&i| tree.files[i as usize].is_none()) {
        return Err(bad());
    }
    Ok(indices)
}

fn file_size(tree: &LocalTree, index: u32) -> u64 {
    match tree.entries[index as usize].kind {
        EntryKind::File { size, .. } => size,
        _ => 0,
    }
}

/// Sends one file through its own Offer, re-manifesting it (bounded) if it changes. `Ok(Err(failure))` means this
/// file failed but the connection is fine. A file described by its committed manifest is never re-manifested: a
/// chunk that no longer matches means it is damaged.
async fn send_one<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    remote_dir: &str,
    source: &TreeSource<'_>,
    index: u32,
    opts: &SendOptions,
    stats: &mut SendStats,
    on_event: &mut (dyn FnMut(SendEvent) + Send),
) -> Result<Result<(), Failure>, TransferError> {
    let tree = source.tree;
    let local = tree.files[index as usize].clone().expect("needed entries are files");
    let entry_path = &tree.entries[index as usize].path;
    let remote = format!("{remote_dir}/{entry_path}");
    let recorded = match source.committed {
        Some(lookup) if tree.committed[index as usize] => lookup(entry_path),
        _ => None,
    };
    if let Some(manifest) = recorded {
        let file = match tree.open_file(index) {
            Ok(file) => file,
            Err(e) => return Ok(Err((index, e.to_string(), false))),
        };
        let committed_source = Source {
            file: Arc::new(file),
            manifest: Arc::new(manifest),
            rehash: Rehash::Always,
        };
        let failure = match send(conn, &remote, &committed_source, opts, stats, on_event).await {
            Ok(_) => return Ok(Ok(())),
            Err(TransferError::SourceChanged(why)) => {
                (index, format!("damaged: {why} (it was verified when committed)"), true)
            }
            Err(TransferError::SourceIo(e)) => (index, e.to_string(), false),
            Err(e) => return Err(e),
        };
        abandon(conn, &failure.1, opts).await?;
        return Ok(Err(failure));
    }
    for attempt in 0..=MAX_SOURCE_CHANGES {
        let (store, spec, at, path) = (source.store.clone(), source.spec, tree.file_at(index), local.clone());
        let rebuild = attempt > 0;
        // A tree served for a pull is hashed on every read, as its committed files are; a pushed one's first sends
        // are verified by the receiver (proto-spec.md §4, "Sender").
        let rehash = match source.committed {
            Some(_) => Rehash::Always,
            None => Rehash::AfterRejection,
        };
        let opened = with_keepalive(conn, opts.io_timeout, move || {
            Ok(open_source(&store, &at, &path, spec, rebuild, rehash))
        })
        .await?;
        let file_source = match opened {
            Ok(file_source) => file_source,
            Err(e) => return Ok(Err((index, e.to_string(), false))),
        };
        match send(conn, &remote, &file_source, opts, stats, on_event).await {
            Ok(_) => return Ok(Ok(())),
            Err(TransferError::SourceChanged(why)) => abandon(conn, &why, opts).await?,
            Err(TransferError::SourceIo(e)) => {
                abandon(conn, &e.to_string(), opts).await?;
                return Ok(Err((index, e.to_string(), false)));
            }
            Err(e) => return Err(e),
        }
    }
    let why = format!("kept changing while it was sent; gave up after {MAX_SOURCE_CHANGES} tries");
    Ok(Err((index, why, false)))
}

/// Gives up on the file being sent without ending the session: sends Abandon, then ignores the Acks and Needs
/// still under way for that file until the receiver echoes Abandon.
async fn abandon<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    reason: &str,
    opts: &SendOptions,
) -> Result<(), TransferError> {
    let msg = Message::Abandon(truncate_message(reason.to_string()));
    send_within(conn, &msg, opts.io_timeout, "abandoning a file").await?;
    loop {
        match next_message(conn, opts.io_timeout, "waiting for Abandon").await? {
            Message::Abandon(_) => return Ok(()),
            Message::Ack(_) | Message::Need(_) | Message::Pong(_) => {}
            Message::Ping(nonce) => answer_ping(conn, nonce, opts.io_timeout).await?,
            other => {
                return Err(TransferError::Unexpected {
                    got: other.name(),
                    state: "waiting for Abandon",
                })
            }
        }
    }
}

/// Opens a file of the tree through the no-follow walk from its base and describes it (`path`: its full local
/// path, the manifest cache's key).
fn open_source(
    store: &SenderStore,
    at: &FileBeneath,
    path: &Path,
    spec: ChunkSpec,
    rebuild: bool,
    rehash: Rehash,
) -> Result<Source, SourceError> {
    let file = at.open().map_err(|e| SourceError::Io(e.to_string()))?;
    let (manifest, _) = manifest_for(store, &file, path, spec, rebuild)?;
    Ok(Source {
        file: Arc::new(file),
        manifest: Arc::new(manifest),
        rehash,
    })
}

/// One small file, read and checked against the digest offered.
enum Read {
    /// Its bytes, matching the offer.
    Data(u32, Vec<u8>),
    /// It changed since the offer: send it through its own Offer.
    Changed(u32),
    /// It cannot be read, or (committed, `true`) it no longer matches the digest it was committed with.
    Failed(u32, String, bool),
}

/// What the small-file phase left for later.
struct SmallOutcome {
    changed: Vec<u32>,
    failed: Vec<Failure>,
}

/// The small-file phase: FileData within the window, TreeAcks free it, a TreeNeed in between asks again for
/// files that failed verification.
struct SmallFiles<'a> {
    tree: &'a LocalTree,
    opts: &'a SendOptions,
    in_flight: HashMap<u32, u64>,
    in_flight_bytes: u64,
    /// How many bytes may be in flight.
    window: Window,
    resend: VecDeque<u32>,
    resends: u32,
    changed: Vec<u32>,
    failed: Vec<Failure>,
}

impl<'a> SmallFiles<'a> {
    fn new(tree: &'a LocalTree, opts: &'a SendOptions) -> Self {
        SmallFiles {
            tree,
            opts,
            in_flight: HashMap::new(),
            in_flight_bytes: 0,
            window: if opts.size_window {
                Window::sized(opts.window.max(TREE_WINDOW), None)
            } else {
                Window::fixed(opts.window)
            },
            resend: VecDeque::new(),
            resends: 0,
            changed: Vec::new(),
            failed: Vec::new(),
        }
    }

    async fn run<S: AsyncRead + AsyncWrite + Unpin>(
        mut self,
        conn: &mut Connection<S>,
        files: Vec<u32>,
        stats: &mut SendStats,
    ) -> Result<SmallOutcome, TransferError> {
        let mut reads = spawn_reader(self.tree, files);
        let mut reader_done = false;
        loop {
            if reader_done && self.in_flight.is_empty() && self.resend.is_empty() {
                break;
            }
            let room = self.in_flight.is_empty() || self.in_flight_bytes < self.window.bytes();
            if room {
                if let Some(index) = self.resend.pop_front() {
                    // Rejected by the receiver: hashed this time, so a file that changed goes through its own
                    // Offer, and only bytes that match the offer are sent again.
                    let read = read_small(&mut FileOpener::new(self.tree), index, Check::Digest);
                    if matches!(read, Read::Data(..)) {
                        self.resends += 1;
                        if self.resends > MAX_RESENDS {
                            return Err(TransferError::Integrity(format!(
                                "the receiver rejected {} small files that match their digest here; giving up on \
                                 this connection",
                                self.resends
                            )));
                        }
                    }
                    self.take(conn, read, stats).await?;
                    continue;
                }
            }
            tokio::select! {
                biased;
                msg = next_message(conn, self.opts.io_timeout, "sending small files") => self.answer(conn, msg?, stats).await?,
                read = reads.recv(), if room && !reader_done => match read {
                    Some(read) => self.take(conn, read, stats).await?,
                    None => reader_done = true,
                },
            }
        }
        Ok(SmallOutcome {
            changed: self.changed,
            failed: self.failed,
        })
    }

    async fn take<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Connection<S>,
        read: Read,
        stats: &mut SendStats,
    ) -> Result<(), TransferError> {
        match read {
            Read::Data(index, data) => {
                let len = data.len() as u64;
                let msg = Message::FileData(FileData { entry: index, data });
                send_within(conn, &msg, self.opts.io_timeout, "sending small files").await?;
                self.opts.meter.moved(len);
                stats.bytes_sent += len;
                self.in_flight.insert(index, len);
                self.in_flight_bytes += len;
                self.window.sent(index, std::time::Instant::now());
            }
            Read::Changed(index) => self.changed.push(index),
            Read::Failed(index, why, damaged) => self.failed.push((index, why, damaged)),
        }
        Ok(())
    }

    /// Ranges from the receiver must name entries of the offer, ascending, each once (so walking them is bounded
    /// by the offer's size).
    fn check_ranges(&self, ranges: &[IndexRange], what: &'static str) -> Result<(), TransferError> {
        let count = u32::try_from(self.tree.entries.len()).unwrap_or(u32::MAX);
        if ranges_within(ranges, count) {
            Ok(())
        } else {
            Err(TransferError::Unexpected {
                got: what,
                state: "its ranges lie outside the tree offer",
            })
        }
    }

    async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Connection<S>,
        msg: Message,
        stats: &mut SendStats,
    ) -> Result<(), TransferError> {
        match msg {
            Message::TreeAck(ack) => {
                self.check_ranges(&ack.entries, "TreeAck")?;
                self.check_ranges(&ack.refused, "TreeAck")?;
                let now = std::time::Instant::now();
                for index in ack.entries.iter().flat_map(IndexRange::indices) {
                    if let Some(len) = self.in_flight.remove(&index) {
                        self.in_flight_bytes -= len;
                        self.window.acked(index, len, now);
                        self.opts.meter.durable(len);
                        stats.files_acked += 1;
                    }
                }
                for index in ack.refused.iter().flat_map(IndexRange::indices) {
                    if let Some(len) = self.in_flight.remove(&index) {
                        self.in_flight_bytes -= len;
                        self.window.forget(index);
                        self.failed
                            .push((index, "refused by the receiver (something is in the way)".into(), false));
                    }
                }
                Ok(())
            }
            Message::TreeNeed(need) => {
                self.check_ranges(&need.entries, "TreeNeed")?;
                // Files that failed verification on the receiver: send them again, a bounded number of times.
                for index in need.entries.iter().flat_map(IndexRange::indices) {
                    if let Some(len) = self.in_flight.remove(&index) {
                        self.in_flight_bytes -= len;
                        self.window.forget(index);
                        self.resend.push_back(index);
                    }
                }
                Ok(())
            }
            Message::Ping(nonce) => answer_ping(conn, nonce, self.opts.io_timeout).await,
            other => Err(TransferError::Unexpected {
                got: other.name(),
                state: "sending small files",
            }),
        }
    }
}

/// Reads the small files on a blocking thread, a few ahead of the socket.
fn spawn_reader(tree: &LocalTree, files: Vec<u32>) -> mpsc::Receiver<Read> {
    let (tx, rx) = mpsc::channel(READ_AHEAD);
    let tree = tree.clone();
    tokio::task::spawn_blocking(move || {
        // The files go in offer order, directory by directory: each directory is walked to once.
        let mut opener = FileOpener::new(&tree);
        for index in files {
            if tx
                .blocking_send(read_small(&mut opener, index, Check::first(&tree, index)))
                .is_err()
            {
                return;
            }
        }
    });
    rx
}

/// How a small file read to be sent is checked against its entry in the offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Check {
    /// Size and mtime (`fstat`, and the length read): the first read of a pushed file. The receiver verifies the
    /// digest before placing it, so bytes that changed behind an unchanged size and mtime are rejected there and
    /// read again with [`Check::Digest`].
    Metadata,
    /// Size and digest (the file is hashed): a file the receiver rejected, and every read of a committed file.
    Digest,
}

impl Check {
    /// The check of a file's first read: a committed file (a server serving a pull) is hashed, since a mismatch
    /// there is damage to report rather than an edit.
    fn first(tree: &LocalTree, index: u32) -> Check {
        if tree.committed[index as usize] {
            Check::Digest
        } else {
            Check::Metadata
        }
    }
}

/// Reads one small file whole (opened through `opener`) and checks it against the offered size, and mtime or
/// digest (`check`).
fn read_small(opener: &mut FileOpener<'_>, index: u32, check: Check) -> Read {
    let tree = opener.tree();
    let EntryKind::File {
        size, digest, mtime, ..
    } = tree.entries[index as usize].kind
    else {
        return Read::Failed(index, "not a file".into(), false);
    };
    // The metadata is the open's own (its identity check): no second `fstat`.
    let (file, meta) = match opener.open_file_with_metadata(index) {
        Ok(opened) => opened,
        Err(e) => return Read::Failed(index, e.to_string(), false),
    };
    if check == Check::Metadata && !crate::chunk::has_identity(&meta, size, mtime) {
        return Read::Changed(index);
    }
    let read = read_up_to(&file, size.min(MAX_INLINE_FILE) as usize + 1);
    let matches = |data: &[u8]| match check {
        Check::Metadata => true,
        Check::Digest => *blake3::hash(data).as_bytes() == digest,
    };
    match read {
        Err(e) => Read::Failed(index, e.to_string(), false),
        Ok(data) if data.len() as u64 == size && matches(&data) => Read::Data(index, data),
        // A committed file was verified when it was committed: a mismatch is damage, not an edit.
        Ok(_) if tree.committed[index as usize] => Read::Failed(
            index,
            "damaged: no longer matches the digest it was committed with".into(),
            true,
        ),
        Ok(_) => Read::Changed(index),
    }
}

/// Reads `file` from its start until `limit` bytes or its end, whichever comes first. A file of the length
/// offered takes two `read`s, the second finding its end (`read_to_end` takes three or four: it probes with
/// small reads before and after the bulk one); `limit` one past the offered length tells a file that grew.
fn read_up_to(mut file: &std::fs::File, limit: usize) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut data = vec![0u8; limit];
    let mut filled = 0;
    while filled < limit {
        match file.read(&mut data[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    data.truncate(filled);
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first read of a pushed small file checks its size and mtime, not its digest (the receiver verifies
    /// that); a read after the receiver rejected it hashes it; a committed file is always hashed.
    #[test]
    fn a_pushed_small_file_is_hashed_only_when_the_receiver_rejected_it() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        for name in ["edited", "touched"] {
            std::fs::write(src.join(name), b"before").unwrap();
        }
        let store = SenderStore::open(&crate::store::Store::open(&dir.path().join("state")).unwrap()).unwrap();
        let mut tree = crate::tree::scan(&src, crate::tree::LinkPolicy::Skip, &store, ChunkSpec::default()).unwrap();
        let index = |name: &str| tree_index(&tree, name);
        // Edited behind an unchanged size and mtime: only the digest tells.
        let edited = src.join("edited");
        let mtime = std::fs::metadata(&edited).unwrap().modified().unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&edited).unwrap();
        std::io::Write::write_all(&mut &file, b"BEFORE").unwrap();
        file.set_modified(mtime).unwrap();
        drop(file);
        // Same bytes, new mtime: the metadata tells, without reading.
        let touched = std::fs::File::options().write(true).open(src.join("touched")).unwrap();
        touched.set_modified(mtime + std::time::Duration::from_secs(7)).unwrap();
        drop(touched);

        let first = read_small(
            &mut FileOpener::new(&tree),
            index("edited"),
            Check::first(&tree, index("edited")),
        );
        assert!(
            matches!(first, Read::Data(_, ref data) if data == b"BEFORE"),
            "sent unhashed"
        );
        assert!(matches!(
            read_small(&mut FileOpener::new(&tree), index("edited"), Check::Digest),
            Read::Changed(_)
        ));
        assert!(matches!(
            read_small(&mut FileOpener::new(&tree), index("touched"), Check::Metadata),
            Read::Changed(_)
        ));
        // A committed file (a server serving a pull) is hashed on its first read: a mismatch is damage.
        let at = index("edited") as usize;
        tree.committed[at] = true;
        let committed = read_small(&mut FileOpener::new(&tree), at as u32, Check::first(&tree, at as u32));
        assert!(matches!(committed, Read::Failed(_, _, true)), "damaged");
    }

    /// A small file of the offered length is read in two `read`s (the bytes, then its end); one that grew or
    /// shrank since the offer is told apart without reading more than one byte past the offered length.
    #[test]
    fn a_small_file_is_read_in_two_reads_and_a_changed_length_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        for name in ["kept", "grown", "shrunk"] {
            std::fs::write(src.join(name), vec![7u8; 20_000]).unwrap();
        }
        let store = SenderStore::open(&crate::store::Store::open(&dir.path().join("state")).unwrap()).unwrap();
        let tree = crate::tree::scan(&src, crate::tree::LinkPolicy::Skip, &store, ChunkSpec::default()).unwrap();
        // Read system calls of this thread (the read runs on it).
        let reads = || {
            let io = std::fs::read_to_string("/proc/thread-self/io").unwrap();
            let line = io.lines().find(|l| l.starts_with("syscr:")).unwrap();
            line["syscr:".len()..].trim().parse::<u64>().unwrap()
        };
        // Reading the counter itself takes a few reads: counted once with nothing between.
        let (first, second) = (reads(), reads());
        let own = second - first;
        let mut opener = FileOpener::new(&tree);
        let before = reads();
        let kept = read_small(&mut opener, tree_index(&tree, "kept"), Check::Digest);
        assert_eq!(reads() - before - own, 2, "the bytes, then the end");
        assert!(matches!(kept, Read::Data(_, ref data) if data.len() == 20_000));
        // Grown or shrunk behind the offered size (the digest check, which reads whatever is there).
        for (name, len) in [("grown", 20_001), ("shrunk", 19_999)] {
            std::fs::write(src.join(name), vec![7u8; len]).unwrap();
            let read = read_small(&mut opener, tree_index(&tree, name), Check::Digest);
            assert!(matches!(read, Read::Changed(_)), "{name}");
        }
    }

    fn tree_index(tree: &LocalTree, name: &str) -> u32 {
        tree.entries.iter().position(|e| e.path == name).unwrap() as u32
    }
}
