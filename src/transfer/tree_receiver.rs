//! The receiver role for a tree: check a TreeOffer, settle what needs no bytes (directories, symlinks, unchanged
//! files, empty files, small files whose content is already held), answer TreeNeed, then take FileData through the
//! [`small_writer`](super::small_writer) and per-file Offers through the file [`receiver`](super::receiver) until
//! TreeCommit, when directory metadata is applied and TreeCommitted sums up.
//!
//! Guarantees (proto-spec.md, "Trees"): every entry path is validated and resolved inside the root without
//! following symlinks; a recorded symlink's target must stay inside the tree; every file, small or large, is
//! verified before it gets its final name, and each is renamed into place atomically on its own.

use std::collections::{HashMap, HashSet};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::quota::{Budget, EntryBudget};
use super::receiver::{receive, ReceiverContext, Reuse};
use super::small_writer::{BatchOutcome, SmallFile, SmallWriter, BATCH_BYTES, BATCH_FILES};
use super::{answer_ping, next_message, send_within, with_keepalive, TransferError};
use crate::path::{link_walk, RemotePath};
use crate::ranges::encode_runs;
use crate::storage::{CommittedRead, StoredFile, TreeVolume};
use crate::tree::LinkPolicy;
use crate::wire::{
    Connection, EntryKind, ErrorCode, FileData, Message, TreeAck, TreeCommitted, TreeEntry, TreeFailure, TreeNeed,
    TreeOffer,
};
use crate::{MAX_INLINE_FILE, MAX_TREE_ENTRIES};

/// Small files queued between the socket and the disk writer.
const SMALL_QUEUE: usize = 256;
/// Small files that may fail verification in one session before the sender is considered broken.
const MAX_REJECTED_FILES: u32 = 64;

/// The running small-file writer: its queue and its batch reports.
type WriterHandle = (
    mpsc::Sender<SmallFile>,
    mpsc::UnboundedReceiver<Result<BatchOutcome, TransferError>>,
);

/// A validated TreeOffer: entries and the destination key of each.
struct Tree {
    offer: TreeOffer,
    keys: Vec<RemotePath>,
}

/// Serves one TreeOffer to completion. `base` is the directory (under the context's root) that receives the
/// tree's entries; `None` puts them directly in the root (a pull into a local directory). Symlink entries are
/// placed only if `links` records them; otherwise they count as refused.
pub async fn receive_tree<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    ctx: &ReceiverContext,
    offer: TreeOffer,
    base: Option<RemotePath>,
    links: LinkPolicy,
    stop: &CancellationToken,
) -> Result<TreeReceived, TransferError> {
    let mut tree = validate(offer, base.as_ref(), ctx.limits.max_tree_entries.min(MAX_TREE_ENTRIES))?;
    for entry in &mut tree.offer.entries {
        if let EntryKind::File { mode, .. } | EntryKind::Dir { mode, .. } = &mut entry.kind {
            *mode &= ctx.policy.mode_mask;
        }
    }
    let (tree, plan) = {
        let ctx = ctx.clone();
        with_keepalive(conn, ctx.idle_timeout, move || {
            let plan = plan(&ctx, &tree, links, base.as_ref())?;
            Ok((tree, plan))
        })
        .await?
    };
    tracing::info!(
        path = %tree.offer.path,
        entries = tree.offer.entries.len(),
        needed = plan.needed.len(),
        "tree offer accepted"
    );
    let size_of = |i: &u32| match tree.offer.entries.get(*i as usize).map(|e| &e.kind) {
        Some(EntryKind::File { size, .. }) => *size,
        _ => 0,
    };
    // Sizes come from the peer: added without overflow.
    let total = (0..tree.offer.entries.len() as u32).fold(0u64, |sum, i| sum.saturating_add(size_of(&i)));
    let needed = plan.needed.iter().fold(0u64, |sum, i| sum.saturating_add(size_of(i)));
    ctx.stats.meter.tree(total, total.saturating_sub(needed));
    let need = Message::TreeNeed(TreeNeed {
        entries: encode_runs(plan.needed.iter().copied()),
    });
    send_within(conn, &need, ctx.idle_timeout, "sending TreeNeed").await?;
    let mut session = Session::new(ctx, &tree, plan);
    let result = session.run(conn, stop).await;
    session.close_writer(conn, false).await?;
    let count = tree.offer.entries.len();
    let sender_failed: Vec<TreeFailure> = result?.into_iter().filter(|f| (f.entry as usize) < count).collect();
    for failure in &sender_failed {
        let path = &tree.offer.entries[failure.entry as usize].path;
        tracing::warn!(
            path,
            damaged = failure.damaged,
            reason = failure.reason,
            "the sender could not send a file"
        );
    }
    let finished = session.summary();
    let dirs = {
        let (trees, tree) = (ctx.trees.clone(), tree);
        with_keepalive(conn, ctx.idle_timeout, move || {
            apply_dir_metadata(&*trees, &tree);
            Ok(tree)
        })
    };
    let tree = dirs.await?;
    send_within(
        conn,
        &Message::TreeCommitted(finished.clone()),
        ctx.idle_timeout,
        "sending TreeCommitted",
    )
    .await?;
    Ok(TreeReceived {
        committed: finished,
        sender_failed,
        entries: tree.offer.entries,
    })
}

/// What a finished tree reception reports to the caller.
#[derive(Debug, Clone)]
pub struct TreeReceived {
    /// The summary sent to the sender.
    pub committed: TreeCommitted,
    /// Files the sender said it could not send (entry indices checked).
    pub sender_failed: Vec<TreeFailure>,
    /// The offer's entries, to name them.
    pub entries: Vec<TreeEntry>,
}

/// Checks the offer: entry count (at most `max_entries`), strictly ascending paths, valid destination paths, and
/// symlinks that stay inside the tree.
fn validate(offer: TreeOffer, base: Option<&RemotePath>, max_entries: usize) -> Result<Tree, TransferError> {
    let refuse = |why: String| TransferError::refused(ErrorCode::BadPath, why);
    if offer.entries.len() > max_entries {
        return Err(TransferError::refused(
            ErrorCode::BadManifest,
            format!("tree has {} entries, the limit is {max_entries}", offer.entries.len()),
        ));
    }
    let mut keys = Vec::with_capacity(offer.entries.len());
    let mut previous: Option<&str> = None;
    for entry in &offer.entries {
        if previous.is_some_and(|p| p.as_bytes() >= entry.path.as_bytes()) {
            return Err(refuse(format!(
                "tree entries are not strictly ascending (sorted by path bytes, no duplicates) at {}",
                crate::path::clip(&entry.path)
            )));
        }
        previous = Some(&entry.path);
        RemotePath::parse(&entry.path).map_err(|e| refuse(format!("tree entry: {e}")))?;
        let key = match base {
            Some(base) => format!("{base}/{}", entry.path),
            None => entry.path.clone(),
        };
        keys.push(RemotePath::parse(&key).map_err(|e| refuse(format!("tree entry: {e}")))?);
    }
    let links: HashSet<&str> = offer
        .entries
        .iter()
        .filter(|e| matches!(e.kind, EntryKind::Symlink { .. }))
        .map(|e| e.path.as_str())
        .collect();
    for entry in &offer.entries {
        if let EntryKind::Symlink { target } = &entry.kind {
            let walk = link_walk(&entry.path, target)
                .ok_or_else(|| refuse(format!("symlink {:?} -> {target:?} leaves the tree", entry.path)))?;
            if let Some(through) = walk.iter().find(|step| links.contains(step.as_str())) {
                return Err(refuse(format!(
                    "symlink {:?} -> {target:?} passes through the symlink {through:?}",
                    entry.path
                )));
            }
        }
    }
    Ok(Tree { offer, keys })
}

/// What the plan settled and what it needs.
struct Plan {
    needed: Vec<u32>,
    unchanged: u64,
    settled: BatchOutcome,
    reused_bytes: u64,
    /// The quota budget, holding the reservations of the small files still to come.
    budget: Option<Budget>,
}

/// Creates directories and symlinks (only if `links` records them), finds unchanged files, and commits empty files
/// and small files whose content the receiver already holds, in bounded batches; returns the files still needed.
/// Blocking.
fn plan(
    ctx: &ReceiverContext,
    tree: &Tree,
    links: LinkPolicy,
    base: Option<&RemotePath>,
) -> Result<Plan, TransferError> {
    let mut plan = Plan {
        needed: Vec::new(),
        unchanged: 0,
        settled: BatchOutcome::default(),
        reused_bytes: 0,
        budget: None,
    };
    let mut held = Vec::new();
    let mut held_bytes = 0u64;
    let limited = ctx.limits.max_entries != u64::MAX;
    let shared = match tree.keys.first() {
        Some(key) if ctx.quota.is_some() || limited => ctx.volume.shared_usage(key, &[0; 32], true)?,
        _ => None,
    };
    plan.budget = ctx
        .quota
        .map(|quota| Budget::open(&ctx.store, quota, &ctx.admission, shared.as_ref()))
        .transpose()?;
    let mut entries = limited
        .then(|| EntryBudget::open(&ctx.store, ctx.limits.max_entries, shared.as_ref()))
        .transpose()?;
    let stored = stored_files(ctx, tree);
    let mut dirs = Vec::new();
    for (index, (entry, key)) in tree.offer.entries.iter().zip(&tree.keys).enumerate() {
        let index = index as u32;
        // What placing the entry creates counts against the namespace's entry budget (unchanged files create
        // nothing, and cost nothing).
        let is_unchanged = match entry.kind {
            EntryKind::File { size, .. } if size <= ctx.max_file_size => unchanged(ctx, key, entry, stored.as_ref())?,
            _ => false,
        };
        let creates = match &entry.kind {
            EntryKind::Dir { .. } => true,
            EntryKind::Symlink { .. } => links == LinkPolicy::Record,
            EntryKind::File { size, .. } => *size <= ctx.max_file_size && !is_unchanged,
        };
        if let (true, Some(entries)) = (creates, entries.as_mut()) {
            let dir_or_link = !matches!(entry.kind, EntryKind::File { .. });
            if let Err(why) = entries.take(&ctx.root, key, dir_or_link) {
                plan.settled.refused.push((index, why));
                continue;
            }
        }
        match &entry.kind {
            // Created together after the walk, so each parent directory is synced once, not once per directory.
            EntryKind::Dir { .. } => dirs.push((index, key.clone())),
            EntryKind::Symlink { .. } if links == LinkPolicy::Skip => {
                plan.settled
                    .refused
                    .push((index, "symlinks are not recorded here".into()));
            }
            EntryKind::Symlink { target } => {
                if let Err(why) = ctx.trees.place_symlink(base, &entry.path, key, target) {
                    plan.settled.refused.push((index, why));
                }
            }
            EntryKind::File { size, .. } if *size > ctx.max_file_size => {
                let why = super::receiver::too_large(*size, ctx.max_file_size).to_string();
                plan.settled.refused.push((index, why));
            }
            EntryKind::File { .. } if is_unchanged => plan.unchanged += 1,
            EntryKind::File { size, .. } if over_quota(&mut plan.budget, ctx, key, *size, stored.as_ref())? => {
                let why = format!("{key} ({size} bytes) would take this namespace over its quota");
                plan.settled.refused.push((index, why));
            }
            &EntryKind::File {
                size,
                digest,
                mtime,
                mode,
            } => match (size == 0 || ctx.policy.reuse == Reuse::Full)
                .then(|| held_reads(ctx, size, &digest))
                .flatten()
            {
                Some(reads) => {
                    held_bytes += size;
                    let file = SmallFile {
                        index,
                        key: key.clone(),
                        data: Vec::new(),
                        digest,
                        mtime,
                        mode,
                        _budget: None,
                    };
                    held.push(Held { file, reads });
                }
                // A large file goes through its own Offer, whose refusal would end the whole tree's session: refuse
                // it here when something is in the way, so the rest of the tree still lands (small files meet
                // the same check in the writer).
                None if size > crate::MAX_INLINE_FILE => match ctx.trees.blocked(key) {
                    Some(why) => {
                        tracing::warn!(path = %key, reason = %why, "tree file refused");
                        plan.settled.refused.push((index, why));
                    }
                    None => plan.needed.push(index),
                },
                None => plan.needed.push(index),
            },
        }
        if held.len() >= BATCH_FILES || held_bytes >= BATCH_BYTES {
            settle_held(ctx, std::mem::take(&mut held), &mut plan)?;
            held_bytes = 0;
        }
    }
    let keys: Vec<RemotePath> = dirs.iter().map(|(_, key)| key.clone()).collect();
    for ((index, _), made) in dirs.iter().zip(ctx.trees.make_all_dirs(&keys)) {
        if let Err(why) = made {
            plan.settled.refused.push((*index, why));
        }
    }
    settle_held(ctx, held, &mut plan)?;
    if let Some(entries) = entries {
        entries.finish(&ctx.store, &ctx.admission)?;
    }
    plan.needed.sort_unstable();
    Ok(plan)
}

/// Whether a changed file of `size` bytes at `key` would take the namespace over its quota (if it has one); if
/// not, its bytes are counted against the quota for the rest of the tree.
fn over_quota(
    budget: &mut Option<Budget>,
    ctx: &ReceiverContext,
    key: &RemotePath,
    size: u64,
    stored: Option<&HashMap<String, StoredFile>>,
) -> Result<bool, TransferError> {
    let Some(budget) = budget else {
        return Ok(false);
    };
    let replaced = stored.map(|files| files.get(key.as_str()).map_or(0, |f| f.size));
    match budget.take(&ctx.store, key.as_str(), size, size <= MAX_INLINE_FILE, replaced) {
        Ok(()) => Ok(false),
        Err(TransferError::Refused { .. }) => Ok(true),
        Err(e) => Err(e),
    }
}

/// Commits a batch of small files found locally; those whose bytes turned out different are needed after all.
fn settle(ctx: &ReceiverContext, local: Vec<SmallFile>, plan: &mut Plan) -> Result<(), TransferError> {
    if local.is_empty() {
        return Ok(());
    }
    let sizes: HashMap<u32, u64> = local.iter().map(|f| (f.index, f.data.len() as u64)).collect();
    let settled = writer(ctx).commit_batch(local)?;
    if let Some(budget) = plan.budget.as_mut() {
        let done = settled.committed.iter().chain(settled.refused.iter().map(|(i, _)| i));
        done.filter_map(|i| sizes.get(i)).for_each(|&size| budget.release(size));
    }
    plan.settled.committed.extend(settled.committed);
    plan.settled.refused.extend(settled.refused);
    plan.needed.extend(settled.rejected);
    Ok(())
}

fn writer(ctx: &ReceiverContext) -> SmallWriter {
    SmallWriter {
        volume: ctx.trees.clone(),
        store: ctx.store.clone(),
        stats: ctx.stats.clone(),
    }
}

/// The files of the tree as a volume that records its files itself holds them (a shared store: the bucket, not
/// this server's records, says what is there), read at once; `None` for a volume that does not.
fn stored_files(ctx: &ReceiverContext, tree: &Tree) -> Option<HashMap<String, StoredFile>> {
    if !ctx.trees.keeps_records() {
        return None;
    }
    let files: Vec<RemotePath> = (tree.offer.entries.iter().zip(&tree.keys))
        .filter(|(entry, _)| matches!(entry.kind, EntryKind::File { .. }))
        .map(|(_, key)| key.clone())
        .collect();
    let found = ctx.trees.stored_files(&files);
    let held = files
        .into_iter()
        .zip(found)
        .filter_map(|(key, f)| Some((key.as_str().to_string(), f?)));
    Some(held.collect())
}

/// Whether the committed file at `key` is this entry (same size, digest and mtime) and untouched since; from
/// `stored` when the volume records its files itself.
fn unchanged(
    ctx: &ReceiverContext,
    key: &RemotePath,
    entry: &TreeEntry,
    stored: Option<&HashMap<String, StoredFile>>,
) -> Result<bool, TransferError> {
    let EntryKind::File {
        size, digest, mtime, ..
    } = entry.kind
    else {
        return Ok(false);
    };
    if let Some(stored) = stored {
        let found = stored.get(key.as_str());
        return Ok(found.is_some_and(|f| f.size == size && f.digest == digest && f.mtime == mtime));
    }
    let Some(done) = ctx.store.committed(key.as_str())? else {
        return Ok(false);
    };
    if done.size != size || done.digest != digest || done.mtime != mtime {
        return Ok(false);
    }
    Ok(ctx.trees.unchanged(key, size, done.inode, done.mtime))
}

/// A small file whose content the receiver may already hold, at the committed places `reads` (none for an empty
/// file).
struct Held {
    file: SmallFile,
    reads: Vec<CommittedRead>,
}

/// Where the receiver may already hold a small file's content: an empty file (no read), or up to two committed
/// chunks of exactly this length; `None` when nowhere.
fn held_reads(ctx: &ReceiverContext, size: u64, digest: &crate::manifest::Hash) -> Option<Vec<CommittedRead>> {
    if size == 0 {
        return (*blake3::hash(&[]).as_bytes() == *digest).then(Vec::new);
    }
    if size > MAX_INLINE_FILE {
        return None;
    }
    let locations = ctx.store.chunk_locations(digest, 2).ok()?;
    let reads: Vec<CommittedRead> = (locations.into_iter())
        .filter(|l| u64::from(l.len) == size)
        .map(|l| CommittedRead {
            path: l.path,
            offset: l.offset,
            len: size as usize,
        })
        .collect();
    (!reads.is_empty()).then_some(reads)
}

/// Reads the content of a batch of held files, all at once per round (the volume bounds the requests in flight;
/// the batch's byte budget bounds the memory), trying each file's next place in the next round; every byte is
/// verified against the file's digest. Returns the files found and the indices of those not found.
fn read_held(ctx: &ReceiverContext, held: Vec<Held>) -> (Vec<SmallFile>, Vec<u32>) {
    let mut found: Vec<Option<Vec<u8>>> = held.iter().map(|h| h.reads.is_empty().then(Vec::new)).collect();
    let rounds = held.iter().map(|h| h.reads.len()).max().unwrap_or(0);
    for round in 0..rounds {
        let ask: Vec<usize> = (0..held.len())
            .filter(|&i| found[i].is_none() && held[i].reads.len() > round)
            .collect();
        let reads: Vec<CommittedRead> = ask.iter().map(|&i| held[i].reads[round].clone()).collect();
        let got = ctx.trees.read_committed_many(&reads);
        for (i, data) in ask.into_iter().zip(got) {
            found[i] = data.filter(|d| blake3::hash(d).as_bytes() == &held[i].file.digest);
        }
    }
    let mut files = Vec::new();
    let mut missing = Vec::new();
    for (h, data) in held.into_iter().zip(found) {
        match data {
            Some(data) => files.push(SmallFile { data, ..h.file }),
            None => missing.push(h.file.index),
        }
    }
    (files, missing)
}

/// Reads and commits a batch of held files; those not found (or not matching) are needed after all.
fn settle_held(ctx: &ReceiverContext, held: Vec<Held>, plan: &mut Plan) -> Result<(), TransferError> {
    let (files, missing) = read_held(ctx, held);
    plan.reused_bytes += files.iter().map(|f| f.data.len() as u64).sum::<u64>();
    plan.needed.extend(missing);
    settle(ctx, files, plan)
}

/// Applies the mode and mtime of every directory entry, deepest first (so a child's changes do not bump its
/// parent's mtime afterwards). Only directories that exist are touched: one refused at planning (over the entry
/// budget, say) is not created here. Best effort: a failure is logged, not fatal. Blocking.
fn apply_dir_metadata(trees: &dyn TreeVolume, tree: &Tree) {
    trees.set_dir_metadata(&dir_metadata(tree));
}

/// The directories of a tree with their mode and mtime, deepest (last) first.
fn dir_metadata(tree: &Tree) -> Vec<(RemotePath, u32, crate::manifest::FileTime)> {
    let entries = tree.offer.entries.iter().zip(&tree.keys).rev();
    entries
        .filter_map(|(entry, key)| match entry.kind {
            EntryKind::Dir { mode, mtime } => Some((key.clone(), mode, mtime)),
            _ => None,
        })
        .collect()
}

/// The reception of one tree's files.
struct Session<'a> {
    ctx: &'a ReceiverContext,
    tree: &'a Tree,
    /// Needed files not yet committed or refused.
    pending: HashSet<u32>,
    /// Needed file entries by the path an Offer for them carries.
    by_offer_path: HashMap<String, u32>,
    writer: Option<WriterHandle>,
    summary: TreeCommitted,
    refused: Vec<u32>,
    rejected: u32,
    /// Files handed to the writer and not yet answered for: a second FileData for one is refused.
    queued: HashSet<u32>,
    /// The quota budget: the reservations of needed small files, released as each is settled.
    budget: Option<Budget>,
    /// Files whose reservation was released (once each).
    released: HashSet<u32>,
}

impl<'a> Session<'a> {
    fn new(ctx: &'a ReceiverContext, tree: &'a Tree, plan: Plan) -> Self {
        let by_offer_path = plan
            .needed
            .iter()
            .map(|&i| {
                (
                    format!("{}/{}", tree.offer.path, tree.offer.entries[i as usize].path),
                    i,
                )
            })
            .collect();
        let summary = TreeCommitted {
            files_committed: plan.settled.committed.len() as u64,
            files_unchanged: plan.unchanged,
            reused_bytes: plan.reused_bytes,
            ..TreeCommitted::default()
        };
        Session {
            ctx,
            tree,
            pending: plan.needed.iter().copied().collect(),
            by_offer_path,
            writer: None,
            summary,
            refused: plan.settled.refused.iter().map(|(i, _)| *i).collect(),
            rejected: 0,
            queued: HashSet::new(),
            budget: plan.budget,
            released: HashSet::new(),
        }
    }

    /// Takes messages until TreeCommit; returns the files the sender says it could not send.
    async fn run<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Connection<S>,
        stop: &CancellationToken,
    ) -> Result<Vec<TreeFailure>, TransferError> {
        loop {
            let idle = self.ctx.idle_timeout;
            let step = tokio::select! {
                _ = stop.cancelled() => return Err(TransferError::ShuttingDown),
                batch = next_batch(&mut self.writer) => Step::Batch(batch),
                msg = next_message(conn, idle, "receiving a tree") => Step::Message(msg?),
            };
            match step {
                Step::Batch(Some(batch)) => self.answer_batch(conn, batch?).await?,
                Step::Batch(None) => self.writer = None,
                Step::Message(Message::FileData(data)) => self.take_file(data).await?,
                Step::Message(Message::Offer(offer)) => {
                    let index = self.offered_entry(&offer.path)?;
                    // Its own Offer is admitted like any other: its reservation (if any) is not counted twice.
                    self.release(index);
                    self.close_writer(conn, true).await?;
                    let key = self.tree.keys[index as usize].clone();
                    match receive(conn, self.ctx, key, offer.manifest, stop).await {
                        Ok(committed) => {
                            self.pending.remove(&index);
                            self.summary.files_committed += 1;
                            self.summary.received_bytes += committed.received_bytes;
                            self.summary.reused_bytes += committed.reused_bytes;
                        }
                        Err(TransferError::Abandoned(reason)) => {
                            // The sender gave up on this file; what arrived stays durable for a later resume.
                            tracing::warn!(path = %self.tree.keys[index as usize], reason, "file abandoned by the sender");
                            send_within(conn, &Message::Abandon(String::new()), idle, "confirming Abandon").await?;
                        }
                        Err(e) => return Err(e),
                    }
                }
                Step::Message(Message::TreeCommit(commit)) => return Ok(commit.failed),
                Step::Message(Message::Ping(nonce)) => answer_ping(conn, nonce, idle).await?,
                Step::Message(other) => {
                    return Err(TransferError::Unexpected {
                        got: other.name(),
                        state: "receiving a tree",
                    })
                }
            }
        }
    }

    /// Queues a small file for the writer after checking it is a needed entry of the right size.
    async fn take_file(&mut self, file: FileData) -> Result<(), TransferError> {
        let refuse = |why: String| TransferError::refused(ErrorCode::UnexpectedMessage, why);
        if !self.pending.contains(&file.entry) || !self.queued.insert(file.entry) {
            return Err(refuse(format!(
                "FileData for entry {}, which is not needed or already sent",
                file.entry
            )));
        }
        let entry = &self.tree.offer.entries[file.entry as usize];
        let EntryKind::File {
            size,
            digest,
            mtime,
            mode,
        } = entry.kind
        else {
            return Err(refuse(format!("FileData for {}, which is not a file", entry.path)));
        };
        if size > MAX_INLINE_FILE || file.data.len() as u64 != size {
            return Err(refuse(format!(
                "FileData for {} has {} bytes, the offer says {size}",
                entry.path,
                file.data.len()
            )));
        }
        self.summary.received_bytes += size;
        let budget = self
            .ctx
            .queue_budget
            .clone()
            .acquire_many_owned((size.div_ceil(1024) as u32).max(1))
            .await
            .map_err(|_| TransferError::ShuttingDown)?;
        let small = SmallFile {
            index: file.entry,
            key: self.tree.keys[file.entry as usize].clone(),
            data: file.data,
            digest,
            mtime,
            mode,
            _budget: Some(budget),
        };
        let (queue, _) = self.writer.get_or_insert_with(|| spawn_writer(writer(self.ctx)));
        queue
            .send(small)
            .await
            .map_err(|_| TransferError::Storage(std::io::Error::other("small-file writer stopped")))
    }

    /// Lets go of the quota reservation of file `index` (committed, refused, or sent through its own Offer).
    fn release(&mut self, index: u32) {
        if self.budget.is_none() || !self.released.insert(index) {
            return;
        }
        if let (Some(budget), Some(EntryKind::File { size, .. })) = (
            self.budget.as_mut(),
            self.tree.offer.entries.get(index as usize).map(|e| &e.kind),
        ) {
            if *size <= MAX_INLINE_FILE {
                budget.release(*size);
            }
        }
    }

    /// The needed entry an Offer inside the tree is for.
    fn offered_entry(&self, path: &str) -> Result<u32, TransferError> {
        self.by_offer_path
            .get(path)
            .copied()
            .filter(|i| self.pending.contains(i))
            .ok_or_else(|| {
                TransferError::refused(ErrorCode::BadPath, format!("{path} is not a needed file of this tree"))
            })
    }

    /// Tells the sender what a batch did: TreeAck for committed and refused files, TreeNeed for rejected ones.
    async fn answer_batch<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Connection<S>,
        batch: BatchOutcome,
    ) -> Result<(), TransferError> {
        let idle = self.ctx.idle_timeout;
        for index in batch.committed.iter().chain(batch.refused.iter().map(|(i, _)| i)) {
            self.pending.remove(index);
        }
        for index in batch.committed.iter().chain(&batch.rejected) {
            self.queued.remove(index); // a rejected file may come again
        }
        for (index, why) in &batch.refused {
            tracing::warn!(path = %self.tree.keys[*index as usize], reason = why, "tree file refused");
            self.refused.push(*index);
        }
        self.summary.files_committed += batch.committed.len() as u64;
        for index in batch.committed.iter().chain(batch.refused.iter().map(|(i, _)| i)) {
            self.release(*index);
        }
        if !batch.committed.is_empty() || !batch.refused.is_empty() {
            let ack = Message::TreeAck(TreeAck {
                entries: encode_runs(batch.committed),
                refused: encode_runs(sorted(batch.refused.into_iter().map(|(i, _)| i))),
            });
            send_within(conn, &ack, idle, "acknowledging files").await?;
        }
        if !batch.rejected.is_empty() {
            self.rejected += batch.rejected.len() as u32;
            if self.rejected > MAX_REJECTED_FILES {
                return Err(TransferError::Integrity(format!(
                    "{} files failed verification in one session",
                    self.rejected
                )));
            }
            let again = Message::TreeNeed(TreeNeed {
                entries: encode_runs(sorted(batch.rejected)),
            });
            send_within(conn, &again, idle, "asking for files again").await?;
        }
        Ok(())
    }

    /// Stops the small-file writer after it has written what it holds; answers its last batches if `answer`.
    async fn close_writer<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Connection<S>,
        answer: bool,
    ) -> Result<(), TransferError> {
        let Some((queue, mut events)) = self.writer.take() else {
            return Ok(());
        };
        drop(queue);
        while let Some(batch) = events.recv().await {
            let batch = batch?;
            if answer {
                self.answer_batch(conn, batch).await?;
            } else {
                self.summary.files_committed += batch.committed.len() as u64;
                for index in batch.committed.iter().chain(batch.refused.iter().map(|(i, _)| i)) {
                    self.pending.remove(index);
                }
                self.refused.extend(batch.refused.iter().map(|(i, _)| *i));
            }
        }
        Ok(())
    }

    fn summary(&self) -> TreeCommitted {
        let missing = sorted(self.pending.iter().copied().chain(self.refused.iter().copied()));
        TreeCommitted {
            missing: encode_runs(missing),
            ..self.summary.clone()
        }
    }
}

enum Step {
    Batch(Option<Result<BatchOutcome, TransferError>>),
    Message(Message),
}

/// The writer's next batch outcome; pending forever when there is no writer.
async fn next_batch(writer: &mut Option<WriterHandle>) -> Option<Result<BatchOutcome, TransferError>> {
    match writer {
        Some((_, events)) => events.recv().await,
        None => std::future::pending().await,
    }
}

fn spawn_writer(writer: SmallWriter) -> WriterHandle {
    let (queue, files) = mpsc::channel(SMALL_QUEUE);
    let (events_tx, events) = mpsc::unbounded_channel();
    tokio::task::spawn_blocking(move || writer.run(files, events_tx));
    (queue, events)
}

fn sorted(indices: impl IntoIterator<Item = u32>) -> Vec<u32> {
    let mut v: Vec<u32> = indices.into_iter().collect();
    v.sort_unstable();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::mtime_of;
    use crate::manifest::FileTime;
    use crate::storage::LocalVolume;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    /// Issue 12 item 7: `pub/d` is swapped for a symlink to an outside file between the walk that opened it and
    /// the mode change; the outside file keeps its mode, and the directory that was opened gets it.
    #[test]
    fn a_directory_swapped_for_a_symlink_after_it_was_opened_keeps_its_mode_change() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("pub/d")).unwrap();
        let outside = dir.path().join("outside.txt");
        std::fs::write(&outside, b"private").unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o600)).unwrap();
        let offer = TreeOffer {
            path: "pub".into(),
            entries: vec![TreeEntry {
                path: "d".into(),
                kind: EntryKind::Dir {
                    mode: 0o777,
                    mtime: FileTime {
                        secs: 1_000_000,
                        nanos: 0,
                    },
                },
            }],
        };
        let tree = validate(offer, Some(&RemotePath::parse("pub").unwrap()), MAX_TREE_ENTRIES).unwrap();
        let moved = dir.path().join("moved");
        crate::storage::set_dir_metadata_with(&root, &dir_metadata(&tree), &mut |key| {
            assert_eq!(key.as_str(), "pub/d");
            std::fs::rename(root.join("pub/d"), &moved).unwrap();
            std::os::unix::fs::symlink(&outside, root.join("pub/d")).unwrap();
        });
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&outside), 0o600, "the outside file's mode is unchanged");
        assert_eq!(mode(&moved), 0o777, "the directory that was walked to got the mode");
        assert_eq!(mtime_of(&std::fs::metadata(&moved).unwrap()).secs, 1_000_000);
        // Swapped before the walk: the walk refuses the symlink and nothing is changed.
        apply_dir_metadata(&LocalVolume::new(root.clone(), dir.path().join("partials")), &tree);
        assert_eq!(mode(&outside), 0o600);
    }
}
