//! The receiver's disk pipeline, on a blocking thread: verify → write → (batch) sync → mark in sled → Ack.
//!
//! This ordering is the crash-safety contract of proto-spec.md ("Crash safety"): a chunk is marked received only
//! after `fdatasync` made its bytes durable, and acknowledged only after the mark is flushed. When the connection
//! dies, the session drops the channel and the writer still syncs and marks what it has, so nothing verified is
//! lost.
//!
//! A batch's sync is started ([`crate::storage::PartialFile::start_sync`]) and the writer goes on with the next
//! batch while it runs; batches are marked and acknowledged in order, each once its own sync finished. On the
//! local disk the `fdatasync` runs on the partial's sync thread (`storage::syncer`) while the writer writes and
//! starts the writeback of the next batch, so the disk is not left at queue depth one during every sync; on an
//! object store the next batch's chunk PUTs run while the last batch's PUTs and journal entry end, instead of the
//! requests in flight draining to none at every batch.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::kept_prefix::HeadStart;
use super::ReceiverStats;
use super::TransferError;
use crate::manifest::{Hash, Manifest};
use crate::ranges::{encode_runs, ChunkSet, IndexRange};
use crate::storage::{Partial, PendingSync};
use crate::store::{FileStamp, PrefixRecord, Progress, ReceiverStore};
use crate::verify::{self, DigestFollower, HeldBytes, KnownSubtree, PrefixDigest, StackedPrefix, VerifyError};
use crate::wire::Chunk;

/// While the first this-many batch limits' worth of bytes arrive (16 MiB at the default 16 MiB: the sender's
/// default window), a batch ends at a [`EARLY_BATCH_DIVISOR`]th of the limit: the first Acks come sooner, so the
/// sender's first delay samples hold less of the receiver's batching and its window sizes itself from them sooner.
const EARLY_BATCHES: u64 = 1;
/// The early batch is the limit divided by this (1 MiB at the default 16 MiB).
const EARLY_BATCH_DIVISOR: u64 = 16;
/// When the queue runs dry, a batch at least this large is synced at once...
const SYNC_NOW_BYTES: u64 = 256 * 1024;
/// ...and a smaller one once the last sync is this old (meanwhile more chunks may join it): chunks trickling in
/// one by one cost at most one sync per interval, not one each (proto-spec.md §8).
pub(crate) const SYNC_INTERVAL: Duration = Duration::from_millis(25);
/// Batches whose sync runs while the writer goes on, at most; the volume bounds the bytes in flight itself.
const SYNCS_IN_FLIGHT: usize = 16;

/// A chunk waiting for the writer, holding its share of the server's queue budget until it is written (and, for a
/// chunk written in file order, until the digest follower hashed it: at most [`crate::verify::FOLLOWER_HOLD`]).
pub(crate) struct QueuedChunk {
    pub(crate) chunk: Chunk,
    /// The connection it came on: 0 for the one that offered the file, others for joined streams.
    pub(crate) stream: u32,
    pub(crate) _budget: tokio::sync::OwnedSemaphorePermit,
}

/// A chunk's bytes, just written in file order, handed to the digest follower with their share of the queue budget.
struct WrittenChunk {
    data: Vec<u8>,
    _budget: tokio::sync::OwnedSemaphorePermit,
}

impl AsRef<[u8]> for WrittenChunk {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

/// What the writer tells the session; `stream` says on which connection to answer.
#[derive(Debug)]
pub(crate) enum WriterEvent {
    /// These chunks are durable: send an Ack.
    Durable {
        /// The connection they came on.
        stream: u32,
        /// The chunks.
        ranges: Vec<IndexRange>,
    },
    /// This chunk failed verification: ask for it again.
    Rejected {
        /// The connection it came on.
        stream: u32,
        /// The chunk.
        index: u32,
    },
    /// Storage failed; the writer stopped.
    Failed(TransferError),
}

/// Owns the partial file and the received-chunk set of one transfer while chunks arrive.
pub(crate) struct ChunkWriter {
    pub(crate) key: String,
    pub(crate) file: Partial,
    pub(crate) manifest: Arc<Manifest>,
    pub(crate) received: ChunkSet,
    pub(crate) progress: Progress,
    pub(crate) store: ReceiverStore,
    pub(crate) stats: Arc<ReceiverStats>,
    pub(crate) batch_limit: u64,
    /// Chunks written since the last sync, with the stream each came on.
    batch: Vec<(u32, u32)>,
    batch_bytes: u64,
    /// Bytes of the batch that came over the wire (not reused), for the meter once durable.
    batch_received: u64,
    /// Of `batch_received`, the bytes of repeats written from a first copy (counted as reused, not received).
    batch_repeated: u64,
    /// Bytes of the batch that need no bytes from the wire (repeats, local reuse), counted once durable.
    batch_reused: u64,
    /// Batches whose sync was started and has not been seen to finish, oldest first.
    syncing: VecDeque<Sealed>,
    /// Hashes the whole file from offset 0 as far as its chunks are written, so the commit has little left to
    /// read; taken by the commit, and started again after a damaged one.
    pub(crate) follower: Option<DigestFollower>,
    /// Chunks whose bytes are in the partial (received, or written and awaiting their sync).
    written: ChunkSet,
    /// The first chunk not in `written`: bytes before it are final.
    contiguous: u32,
    /// For this round, later copies of a needed chunk (by the index of its first copy): they are not asked for,
    /// but written from the first copy's verified bytes in the same batch (proto-spec.md §4, "Reuse").
    repeats: HashMap<u32, Vec<u32>>,
    /// Repeats written in this batch: made durable with it, never acknowledged.
    silent: Vec<u32>,
    /// Bytes of the chunks in `received`, kept in the transfer's summary record.
    durable_bytes: u64,
    /// When the partial was last synced.
    last_sync: Option<Instant>,
    /// The manifest's id, once computed (it binds the recorded digest state).
    manifest_id: Option<Hash>,
    /// Syncs of the partial so far.
    pub(crate) syncs: u64,
    /// Digest states settled for a resume so far ([`ChunkWriter::settle_after_session`]): one per session that
    /// ended with chunks missing, none for the rounds of a session that goes on.
    pub(crate) settles: u64,
    /// Bytes this writer wrote into the partial (the early batches are smaller, [`EARLY_BATCHES`]).
    session_bytes: u64,
    /// A recorded digest state that described the partial when it was opened but covers more than the chunks
    /// known so far: a streamed offer's resume, whose pieces carry the durable chunks over one by one. The
    /// follower is held at offset 0 until the carried chunks cover it (then it starts from it) or a chunk below its
    /// end is written or the manifest ends without covering it (then it is dropped and the follower reads).
    deferred_prefix: Option<PrefixDigest>,
    /// Subtrees of the file hashed apart from bytes the partial holds unchanged (an in-place partial's base,
    /// [`super::kept_prefix`]): every follower started takes them instead of reading those bytes back.
    known_subtrees: Vec<KnownSubtree>,
    /// The last [`ChunkWriter::run`] ended because its queue closed, and storage did not fail: every chunk it wrote
    /// is durable, or (paused) is being made durable by syncs still running. If the session ends here,
    /// [`ChunkWriter::settle_after_session`] records the digest state for the resume.
    drained: bool,
    /// Set by the session when it closes the queue only to take a streamed piece ([`ChunkWriter::pause_on`]): the
    /// run then returns at once, its batch and running syncs carried over into the next run, instead of draining.
    pause: Option<Arc<AtomicBool>>,
}

/// What the recorded digest state says about the partial just opened.
enum RecordedPrefix {
    /// Nothing to trust: none recorded, or the file changed since.
    None,
    /// It covers only chunks already known durable: start from it.
    Now(PrefixDigest),
    /// It describes the file but covers chunks not known yet (a streamed offer's later pieces).
    Later(PrefixDigest),
}

impl ChunkWriter {
    /// A writer for `key` starting from `received`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        key: String,
        file: Partial,
        manifest: Arc<Manifest>,
        received: ChunkSet,
        progress: Progress,
        store: ReceiverStore,
        stats: Arc<ReceiverStats>,
        batch_limit: u64,
    ) -> Self {
        ChunkWriter {
            key,
            file,
            manifest,
            received,
            progress,
            store,
            stats,
            batch_limit,
            batch: Vec::new(),
            batch_bytes: 0,
            batch_received: 0,
            batch_repeated: 0,
            batch_reused: 0,
            syncing: VecDeque::new(),
            follower: None,
            written: ChunkSet::new(0),
            contiguous: 0,
            repeats: HashMap::new(),
            silent: Vec::new(),
            durable_bytes: 0,
            last_sync: None,
            manifest_id: None,
            syncs: 0,
            session_bytes: 0,
            deferred_prefix: None,
            known_subtrees: Vec::new(),
            drained: false,
            pause: None,
            settles: 0,
        }
        .recounted()
        .following()
    }

    /// Counts the bytes of the received chunks again (after chunks were taken out of `received`).
    pub(crate) fn recounted(mut self) -> Self {
        self.durable_bytes = (0..self.received.len())
            .filter(|&i| self.received.contains(i))
            .filter_map(|i| self.manifest.chunk(i))
            .map(|c| u64::from(c.len))
            .sum();
        self
    }

    /// Records the progress (bitmap and counters) in the store and flushes; any digest state recorded for the
    /// partial is dropped.
    pub(crate) fn save_progress(&mut self) -> Result<(), TransferError> {
        self.save_progress_with(None)
    }

    /// Records the progress with `hashed`, the follower's digest state taken before the sync that made the bytes
    /// it covers durable, bound to the manifest and to the partial file as it is now (`None`: dropped).
    fn save_progress_with(&mut self, hashed: Option<StackedPrefix>) -> Result<(), TransferError> {
        self.progress.received = self.received.to_bytes();
        let record = match (hashed, self.file.change_stamp()) {
            (Some(hashed), Ok(meta)) if hashed.len > 0 => Some(PrefixRecord {
                manifest_id: self.manifest_id(),
                partial: FileStamp::of(&meta),
                len: hashed.len,
                stack: hashed.stack,
            }),
            _ => None,
        };
        self.store
            .save_progress_with(&self.key, &self.progress, self.durable_bytes, record.as_ref())?;
        Ok(())
    }

    /// The manifest's id (computed once).
    fn manifest_id(&mut self) -> Hash {
        *self.manifest_id.get_or_insert_with(|| self.manifest.id())
    }

    /// The digest state recorded for this partial, if it still describes it: the file unchanged since (same inode,
    /// size, times), and no further than the chunks known durable from offset 0 ([`RecordedPrefix::Now`]), or
    /// further, to be trusted once the chunks it covers are carried over ([`RecordedPrefix::Later`]). The state
    /// hashes the partial's bytes as they were read back, so it holds for whatever manifest is offered now (a
    /// streamed offer's pieces, the whole manifest of the resume): a chunk of `[0, len)` that the new offer does not
    /// carry over is not received, which the length check catches, and the whole-file digest is still checked at
    /// commit.
    fn recorded_prefix(&mut self) -> RecordedPrefix {
        let Some(record) = self.store.digest_prefix(&self.key).ok().flatten() else {
            return RecordedPrefix::None;
        };
        let Ok(stamp) = self.file.change_stamp() else {
            return RecordedPrefix::None;
        };
        let now = FileStamp::of(&stamp);
        if !record.partial.unchanged_at(&now) {
            tracing::info!(
                path = %self.key,
                recorded = ?record.partial,
                now = ?now,
                "the recorded digest state no longer describes the partial; reading it again"
            );
            return RecordedPrefix::None;
        }
        let Some(seed) = PrefixDigest::resume(StackedPrefix {
            len: record.len,
            stack: record.stack,
        }) else {
            return RecordedPrefix::None;
        };
        if seed.len() > self.final_bytes() {
            return RecordedPrefix::Later(seed);
        }
        tracing::info!(path = %self.key, bytes = seed.len(), "the durable prefix is not read again");
        RecordedPrefix::Now(seed)
    }

    /// Starts a new digest follower over the chunks received so far (dropping any earlier one), from the digest
    /// state recorded for the durable prefix if it still holds.
    pub(crate) fn following(mut self) -> Self {
        self.written = self.received.clone();
        self.contiguous = 0;
        self.advance_contiguous();
        self.follower = None;
        self.deferred_prefix = None;
        // After a damaged commit the new follower reads everything not final in memory. Subtrees over chunks asked
        // for again would be dropped anyway (`share_known_subtrees`: the partial no longer holds them unchanged);
        // clearing them all also drops any hashed ahead that the damage made wrong without a chunk failing.
        self.known_subtrees.clear();
        let seed = match self.recorded_prefix() {
            RecordedPrefix::Now(seed) => seed,
            RecordedPrefix::Later(seed) => {
                self.deferred_prefix = Some(seed);
                PrefixDigest::default()
            }
            RecordedPrefix::None => PrefixDigest::default(),
        };
        let ready = if self.deferred_prefix.is_some() {
            0
        } else {
            self.final_bytes()
        };
        self.start_follower(ready, seed);
        self
    }

    /// Whether the follower may start from `seed`, a digest of the file's first `seed.len()` bytes hashed
    /// elsewhere (an in-place partial's base, [`super::kept_prefix`]): those bytes are final, the partial holds them
    /// as its base does (nothing written over them), no recorded state waits to be taken up, and the follower has
    /// not hashed as much already.
    pub(crate) fn can_seed_follower(&self, seed: &PrefixDigest) -> bool {
        let len = seed.len();
        let hashed = self
            .follower
            .as_ref()
            .and_then(DigestFollower::hashed)
            .map_or(0, |h| h.len);
        self.deferred_prefix.is_none() && len > hashed && len <= self.final_bytes() && self.file.holds_unchanged(0, len)
    }

    /// Takes what was hashed of an in-place partial's base while the offer was gathered: its subtrees at once (the
    /// follower takes each once the prefix reaches it; one over bytes the partial no longer holds unchanged is
    /// dropped), its prefix if it can seed the follower now ([`ChunkWriter::can_seed_follower`]). Returns it, the
    /// subtrees taken, if the prefix could not seed the follower yet. A head start whose file was written since it
    /// was hashed ([`HeadStart::still_unchanged`]) is dropped whole: the follower reads those bytes back.
    pub(crate) fn take_head_start(&mut self, mut head: HeadStart) -> Option<HeadStart> {
        if !head.still_unchanged() {
            tracing::warn!(path = %self.key, "the committed file changed since it was hashed ahead; reading it back");
            return None;
        }
        if !head.subtrees.is_empty() {
            self.known_subtrees.append(&mut head.subtrees);
            self.share_known_subtrees();
            let bytes: u64 = self.known_subtrees.iter().map(|s| s.len).sum();
            let subtrees = self.known_subtrees.len();
            tracing::info!(path = %self.key, bytes, subtrees, "chunks kept after the change were hashed while the offer was gathered");
        }
        if !self.can_seed_follower(&head.prefix) {
            return Some(head);
        }
        self.seed_follower(head.prefix);
        None
    }

    /// Starts the follower again from `seed` (see [`ChunkWriter::can_seed_follower`]); the one it replaces stops.
    pub(crate) fn seed_follower(&mut self, seed: PrefixDigest) {
        tracing::info!(path = %self.key, bytes = seed.len(), "the kept prefix was hashed while the offer was gathered");
        self.start_follower(self.final_bytes(), seed);
    }

    /// Starts the follower from `seed`, told that `[0, ready)` is final.
    fn start_follower(&mut self, ready: u64, seed: PrefixDigest) {
        let follower = DigestFollower::start_from(self.file.clone(), ready, seed);
        // Without a follower the commit reads the whole file; slower, never wrong.
        self.follower = follower
            .inspect_err(
                |e| tracing::warn!(path = %self.key, error = %e, "no digest thread; the commit reads the whole file"),
            )
            .ok();
        self.share_known_subtrees();
    }

    /// Drops the known subtrees over bytes the partial no longer holds unchanged (the journal wrote there), and
    /// tells the follower of the rest.
    fn share_known_subtrees(&mut self) {
        let file = self.file.clone();
        self.known_subtrees.retain(|s| file.holds_unchanged(s.offset, s.len));
        if let Some(follower) = &self.follower {
            follower.know(self.known_subtrees.iter().copied());
        }
    }

    /// Tells the follower how far the file is final; first settles a deferred digest state (see
    /// [`ChunkWriter::deferred_prefix`]): the follower starts from it once the final bytes cover it.
    fn advance_follower(&mut self) {
        self.advance_follower_with(None);
    }

    /// [`ChunkWriter::advance_follower`], handing over `piece`, the bytes just written at its offset (a chunk written
    /// in file order), for the follower to hash from memory instead of reading them back.
    fn advance_follower_with(&mut self, piece: Option<(u64, HeldBytes)>) {
        let ready = self.final_bytes();
        match &self.deferred_prefix {
            Some(seed) if seed.len() <= ready => {
                let seed = self.deferred_prefix.take().expect("matched above");
                tracing::info!(path = %self.key, bytes = seed.len(), "the durable prefix is not read again");
                self.start_follower(ready, seed);
            }
            Some(_) => {}
            None => {
                if let Some(follower) = &self.follower {
                    follower.advance_with(ready, piece);
                }
            }
        }
    }

    /// Gives up a deferred digest state (the prefix it covers is being rewritten, or will not be carried over):
    /// the follower reads from offset 0.
    fn drop_deferred_prefix(&mut self) {
        if self.deferred_prefix.take().is_some() {
            tracing::info!(path = %self.key, "the recorded digest state is not carried over; reading the prefix again");
            self.advance_follower();
        }
    }

    /// Records that chunk `index` is written, and tells the follower how far the file is final.
    fn mark_written(&mut self, index: u32) {
        self.mark_written_with(index, None);
    }

    /// [`ChunkWriter::mark_written`] for a chunk whose written bytes are `bytes`: if it extends the final prefix,
    /// the follower hashes them from memory (else they are dropped, and read back when their turn comes).
    fn mark_written_with(&mut self, index: u32, bytes: Option<HeldBytes>) {
        self.written.insert(index);
        let below_deferred = match (&self.deferred_prefix, self.manifest.chunk(index)) {
            (Some(seed), Some(entry)) => entry.offset < seed.len(),
            _ => false,
        };
        if below_deferred {
            self.drop_deferred_prefix();
        }
        if index == self.contiguous {
            self.advance_contiguous();
            let piece = bytes
                .zip(self.manifest.chunk(index))
                .map(|(bytes, entry)| (entry.offset, bytes));
            self.advance_follower_with(piece);
        }
    }

    fn advance_contiguous(&mut self) {
        while self.contiguous < self.written.len() && self.written.contains(self.contiguous) {
            self.contiguous += 1;
        }
    }

    /// Bytes from offset 0 whose chunks are all written. For a streamed manifest still arriving, that is at most
    /// the end of its last announced chunk; for a whole manifest the end of the last chunk is its size.
    fn final_bytes(&self) -> u64 {
        let announced_end = self.manifest.chunks.last().map_or(0, |c| c.offset + u64::from(c.len));
        self.manifest
            .chunk(self.contiguous)
            .map_or(announced_end, |entry| entry.offset)
    }

    /// Takes the next pieces of a streamed manifest (proto-spec.md §4, "Streamed offer"): `manifest` holds every
    /// chunk announced so far (the earlier ones unchanged), and `carried` those of the new chunks already durable
    /// in the partial (resume). Call between rounds, never while [`ChunkWriter::run`] has the writer.
    pub(crate) fn extend(&mut self, manifest: Arc<Manifest>, carried: &[u32]) {
        let count = manifest.chunk_count();
        self.manifest = manifest;
        self.manifest_id = None;
        self.received.grow(count);
        self.written.grow(count);
        for &index in carried {
            if self.received.insert(index) {
                self.durable_bytes += self.manifest.chunk(index).map_or(0, |c| u64::from(c.len));
            }
            self.written.insert(index);
        }
        self.advance_contiguous();
        self.advance_follower();
    }

    /// Chunk `index` was written (durable, or in a batch or sync still running).
    pub(crate) fn is_written(&self, index: u32) -> bool {
        self.written.contains(index) || self.received.contains(index)
    }

    /// Makes chunk `copy` a later copy of chunk `first`, which is still to arrive: when `first` verifies, its bytes
    /// are written as `copy` in the same batch (proto-spec.md §4, "Repeats within an offer"). For streamed pieces.
    pub(crate) fn expect_repeat(&mut self, first: u32, copy: u32) {
        self.repeats.entry(first).or_default().push(copy);
    }

    /// Replaces the manifest by the same chunks with their digest, once a streamed manifest ended.
    pub(crate) fn finish_manifest(&mut self, manifest: Arc<Manifest>) {
        debug_assert_eq!(manifest.chunks, self.manifest.chunks);
        self.manifest = manifest;
        self.manifest_id = None;
        self.drop_deferred_prefix();
    }

    /// Consumes chunks until the channel closes or storage fails, then makes the last batch durable and returns
    /// itself for the commit step, no sync left running. A batch's sync is started when it reaches the batch
    /// limit (a [`EARLY_BATCH_DIVISOR`]th of it while the first [`EARLY_BATCHES`] limits' worth arrive), or when the channel runs dry
    /// and the batch is large or the last sync [`SYNC_INTERVAL`] old.
    pub(crate) fn run(
        mut self,
        mut chunks: mpsc::Receiver<QueuedChunk>,
        events: mpsc::UnboundedSender<WriterEvent>,
    ) -> Self {
        self.drained = false;
        loop {
            let queued = match chunks.try_recv() {
                Ok(queued) => queued,
                Err(mpsc::error::TryRecvError::Empty) => match self.next_when_dry(&mut chunks, &events) {
                    Some(queued) => queued,
                    None => return self,
                },
                Err(mpsc::error::TryRecvError::Disconnected) => break,
            };
            if !self.accept(queued, &events)
                || (self.batch_bytes >= self.batch_target() && !self.start_durable(&events))
            {
                self.finish_syncs(&events);
                return self;
            }
        }
        self.close(&events);
        self
    }

    /// The bytes at which the current batch ends: the batch limit, or a [`EARLY_BATCH_DIVISOR`]th of it for a batch
    /// that started within the first [`EARLY_BATCHES`] limits' worth of bytes.
    fn batch_target(&self) -> u64 {
        let before_batch = self.session_bytes.saturating_sub(self.batch_bytes);
        if before_batch < EARLY_BATCHES.saturating_mul(self.batch_limit) {
            (self.batch_limit / EARLY_BATCH_DIVISOR).max(1)
        } else {
            self.batch_limit
        }
    }

    /// Chunk bytes were written at `offset`: starts their writeback now, so that the batch's sync finds them
    /// (mostly) on the disk instead of writing the whole batch at queue depth one. A hint: a failure here is the
    /// sync's to report.
    fn written_at(&mut self, offset: u64, len: u64) {
        self.session_bytes += len;
        if let Err(e) = self.file.start_writeback(offset, len) {
            tracing::debug!(path = %self.key, error = %e, "could not start writeback; the sync will write");
        }
    }

    /// Makes the next [`ChunkWriter::run`] pause instead of draining when its queue closes while `flag` is set: the
    /// session sets it to take a streamed piece between two runs, so the batch being made and the syncs running
    /// go on into the next run (and are acknowledged there) instead of being waited for at every piece.
    pub(crate) fn pause_on(&mut self, flag: Arc<AtomicBool>) {
        self.pause = Some(flag);
    }

    /// The queue closed: pauses (nothing waited for) if the session asked for it, else makes everything written
    /// durable and reports it.
    fn close(&mut self, events: &mpsc::UnboundedSender<WriterEvent>) {
        let pause = self.pause.take().is_some_and(|flag| flag.load(Ordering::Acquire));
        self.drained = pause || self.make_durable(events);
    }

    /// The session ended (a failure, a cut, a shutdown): makes durable and records what a paused run left (not
    /// acknowledged: the connection is gone), then settles the digest state for the resume
    /// ([`ChunkWriter::settle_prefix`]) if everything written is durable. Not called between the rounds of a session
    /// that goes on (a streamed offer ends a round at every piece): the wait would stall each. Blocking.
    pub(crate) fn settle_after_session(&mut self) {
        if !std::mem::take(&mut self.drained) {
            return;
        }
        let (events, _gone) = mpsc::unbounded_channel();
        if self.make_durable(&events) {
            self.settles += 1;
            self.settle_prefix();
        }
    }

    /// The session ended with chunks still missing (a resume will follow): lets the follower catch up with the
    /// durable prefix (bounded) and records its state once more, stamped after the clock moved past the file's
    /// last change (see `FileStamp::settled`), so that the resume can trust it and reads none of that prefix.
    /// One short wait per interrupted session.
    fn settle_prefix(&mut self) {
        const PATIENCE: Duration = Duration::from_secs(2);
        if self.received.is_complete() {
            return;
        }
        if let Some(prefix) = self.deferred_prefix.as_ref().map(PrefixDigest::stacked) {
            // Nothing below its end was written (that would have dropped it): it still holds, for the file as now.
            if let Err(e) = self.save_progress_with(Some(prefix)) {
                tracing::warn!(path = %self.key, error = %e, "could not record the digest state again");
            }
            return;
        }
        let Some(follower) = &self.follower else {
            return;
        };
        let durable = self.final_bytes();
        let started = Instant::now();
        let mut hashed = follower.hashed();
        while hashed.as_ref().map_or(0, |h| h.len) + blake3::CHUNK_LEN as u64 * 2 < durable
            && started.elapsed() < PATIENCE
        {
            std::thread::sleep(Duration::from_millis(2));
            hashed = follower.hashed();
        }
        std::thread::sleep(Duration::from_millis(10));
        if let Err(e) = self.save_progress_with(hashed) {
            tracing::warn!(path = %self.key, error = %e, "could not record the digest state again");
        }
    }

    /// The queue ran dry: syncs the batch now if that is due, else waits for more chunks until it is; then waits
    /// for the next chunk. `None` once the channel closed (the batch made durable) or storage failed.
    fn next_when_dry(
        &mut self,
        chunks: &mut mpsc::Receiver<QueuedChunk>,
        events: &mpsc::UnboundedSender<WriterEvent>,
    ) -> Option<QueuedChunk> {
        let due = self.batch_bytes >= SYNC_NOW_BYTES || self.last_sync.is_none_or(|t| t.elapsed() >= SYNC_INTERVAL);
        if let (false, false, Some(last)) = (self.batch.is_empty(), due, self.last_sync) {
            let deadline = last + SYNC_INTERVAL;
            // A short poll: the wait is bounded by the interval and this thread has nothing else to do.
            while Instant::now() < deadline {
                match chunks.try_recv() {
                    Ok(queued) => return Some(queued),
                    Err(mpsc::error::TryRecvError::Empty) => std::thread::sleep(Duration::from_millis(1)),
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        self.close(events);
                        return None;
                    }
                }
            }
        }
        if !self.start_durable(events) {
            self.finish_syncs(events);
            return None;
        }
        loop {
            match self.next_or_synced(chunks) {
                Next::Chunk(Some(queued)) => return Some(queued),
                Next::Chunk(None) => {
                    self.close(events);
                    return None;
                }
                Next::Synced(result) => {
                    if !self.finish_oldest(result, events) {
                        self.finish_syncs(events);
                        return None;
                    }
                }
            }
        }
    }

    /// The next chunk, or the end of the oldest running sync, whichever comes first (without a runtime to wait
    /// on both, the sync's end).
    fn next_or_synced(&mut self, chunks: &mut mpsc::Receiver<QueuedChunk>) -> Next {
        let Some(oldest) = self.syncing.front_mut() else {
            return Next::Chunk(chunks.blocking_recv());
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Next::Synced(oldest.sync.wait_here());
        };
        runtime.block_on(async {
            tokio::select! {
                biased;
                result = oldest.sync.result() => Next::Synced(result),
                queued = chunks.recv() => Next::Chunk(queued),
            }
        })
    }

    /// Verifies and writes one chunk; false if storage failed.
    fn accept(&mut self, queued: QueuedChunk, events: &mpsc::UnboundedSender<WriterEvent>) -> bool {
        let QueuedChunk { chunk, stream, _budget } = queued;
        let len = chunk.data.len() as u64;
        self.stats.bytes_received.fetch_add(len, Ordering::Relaxed);
        self.stats.meter.moved(len);
        let Some(entry) = self.manifest.chunk(chunk.index).copied() else {
            return true; // the session checks indices; unreachable in practice
        };
        if self.received.contains(chunk.index) || self.written.contains(chunk.index) {
            // A duplicate (already durable, or written and awaiting this batch's sync): acknowledge it with the
            // batch, write and count nothing.
            self.batch.push((chunk.index, stream));
            return true;
        }
        match verify::write_verified(&*self.file, &entry, &chunk.data) {
            Ok(()) => {
                self.written_at(entry.offset, len);
                self.batch.push((chunk.index, stream));
                self.batch_bytes += len;
                self.batch_received += len;
                // Repeats first: they are later chunks, written from these bytes before they go to the follower.
                let filled = self.fill_repeats(chunk.index, &chunk.data, events);
                let held: HeldBytes = Box::new(WrittenChunk {
                    data: chunk.data,
                    _budget,
                });
                self.mark_written_with(chunk.index, Some(held));
                filled
            }
            Err(VerifyError::Mismatch { .. }) => {
                self.progress.rejected_chunks += 1;
                self.stats.meter.resent();
                self.stats.chunks_rejected.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(path = %self.key, index = chunk.index, "chunk failed verification; asking again");
                let _ = events.send(WriterEvent::Rejected {
                    stream,
                    index: chunk.index,
                });
                true
            }
            Err(VerifyError::Io { source, .. }) => {
                let _ = events.send(WriterEvent::Failed(TransferError::Storage(source)));
                false
            }
        }
    }

    /// The chunks to ask for this round: every missing chunk except later copies of a missing chunk's hash, which
    /// [`ChunkWriter::accept`] fills from the first copy's verified bytes. Remembers those copies for the round.
    pub(crate) fn needed_ranges(&mut self) -> Vec<IndexRange> {
        self.needed_ranges_but(|_| false)
    }

    /// [`ChunkWriter::needed_ranges`] without the chunks whose hash `copied_later` names (local reuse copies them
    /// after the round: proto-spec.md §4, "Reuse").
    pub(crate) fn needed_ranges_but(&mut self, copied_later: impl Fn(&Hash) -> bool) -> Vec<IndexRange> {
        let wanted = Wanted::missing_from(self);
        let mut needed = Vec::new();
        self.repeats.clear();
        // Groups come in order of their first (lowest) index, so `needed` ascends.
        for group in wanted.groups_in_file_order() {
            if copied_later(&wanted.hash(&group)) {
                continue;
            }
            let mut indices = wanted.indices(&group);
            let first = indices.next().expect("a group holds at least one chunk");
            needed.push(first);
            let copies: Vec<u32> = indices.collect();
            if !copies.is_empty() {
                self.repeats.insert(first, copies);
            }
        }
        encode_runs(needed)
    }

    /// Writes the verified bytes of chunk `index` as each of its later copies, into the same batch: they become
    /// durable (and count as reused) with it, and are not acknowledged, since the sender never sends them.
    fn fill_repeats(&mut self, index: u32, data: &[u8], events: &mpsc::UnboundedSender<WriterEvent>) -> bool {
        let Some(copies) = self.repeats.remove(&index) else {
            return true;
        };
        for copy in copies {
            let Some(entry) = self.manifest.chunk(copy).copied() else {
                continue;
            };
            if self.received.contains(copy) || self.written.contains(copy) {
                continue;
            }
            if let Err(source) = self.file.write_at(data, entry.offset) {
                let _ = events.send(WriterEvent::Failed(TransferError::Storage(source)));
                return false;
            }
            self.written_at(entry.offset, data.len() as u64);
            self.mark_written(copy);
            self.silent.push(copy);
            self.batch_bytes += data.len() as u64;
            self.batch_received += data.len() as u64;
            self.batch_repeated += data.len() as u64;
            self.batch_reused += data.len() as u64;
        }
        true
    }

    /// Syncs the batch and waits for every sync still running, records each in the store and reports it durable,
    /// to each stream its own chunks; false if storage failed.
    fn make_durable(&mut self, events: &mpsc::UnboundedSender<WriterEvent>) -> bool {
        if let Err(e) = self.seal() {
            let _ = events.send(WriterEvent::Failed(e));
            self.finish_syncs(events);
            return false;
        }
        self.finish_syncs(events)
    }

    /// Starts the batch's sync, then records and reports every batch whose sync has finished (waiting for the
    /// oldest while more than [`SYNCS_IN_FLIGHT`] run); false if storage failed.
    fn start_durable(&mut self, events: &mpsc::UnboundedSender<WriterEvent>) -> bool {
        if let Err(e) = self.seal() {
            let _ = events.send(WriterEvent::Failed(e));
            return false;
        }
        loop {
            let crowded = self.syncing.len() > SYNCS_IN_FLIGHT;
            let Some(oldest) = self.syncing.front_mut() else {
                return true;
            };
            let result = match oldest.sync.try_result() {
                Some(result) => result,
                None if crowded => oldest.sync.wait_here(),
                None => return true,
            };
            if !self.finish_oldest(result, events) {
                self.abandon_syncs();
                return false;
            }
        }
    }

    /// Waits for every running sync in order, recording and reporting each; after a failed one the rest are
    /// waited for and dropped unrecorded (their chunks are asked for again). False if one failed.
    fn finish_syncs(&mut self, events: &mpsc::UnboundedSender<WriterEvent>) -> bool {
        while let Some(oldest) = self.syncing.front_mut() {
            let result = oldest.sync.wait_here();
            if !self.finish_oldest(result, events) {
                self.abandon_syncs();
                return false;
            }
        }
        true
    }

    /// After a failed sync: waits for the syncs still running and records none of them, so that what is recorded
    /// never runs past a batch that did not become durable (their chunks are asked for again).
    fn abandon_syncs(&mut self) {
        for mut dropped in std::mem::take(&mut self.syncing) {
            let _ = dropped.sync.wait_here();
        }
    }

    /// Records the oldest started batch, whose sync ended with `result`, and reports it durable; false (and
    /// `Failed` sent) if the sync or the record failed.
    fn finish_oldest(&mut self, result: std::io::Result<()>, events: &mpsc::UnboundedSender<WriterEvent>) -> bool {
        let Some(sealed) = self.syncing.pop_front() else {
            return true;
        };
        match result
            .map_err(TransferError::Storage)
            .and_then(|()| self.record(sealed))
        {
            Ok(durable) => {
                for (stream, ranges) in durable {
                    // The first and last of these split a push's time (docs/benchmarks.md, bench/s3.sh).
                    tracing::debug!(path = %self.key, durable_bytes = self.durable_bytes, "acknowledging a batch");
                    let _ = events.send(WriterEvent::Durable { stream, ranges });
                }
                true
            }
            Err(e) => {
                let _ = events.send(WriterEvent::Failed(e));
                false
            }
        }
    }

    /// Starts the sync of the batch (if any) and sets it aside until the sync finished.
    fn seal(&mut self) -> Result<(), TransferError> {
        if self.batch.is_empty() && self.silent.is_empty() {
            return Ok(());
        }
        // Taken before the sync: it covers only bytes written before it, so durable after it.
        let hashed = self.follower.as_ref().and_then(DigestFollower::hashed);
        let sync = self.file.start_sync().map_err(TransferError::Storage)?;
        self.last_sync = Some(Instant::now());
        self.syncs += 1;
        self.syncing.push_back(Sealed {
            sync,
            batch: std::mem::take(&mut self.batch),
            silent: std::mem::take(&mut self.silent),
            received: std::mem::take(&mut self.batch_received),
            repeated: std::mem::take(&mut self.batch_repeated),
            reused: std::mem::take(&mut self.batch_reused),
            hashed,
        });
        self.batch_bytes = 0;
        Ok(())
    }

    /// Marks a batch whose sync finished received in the store; returns its chunks by stream.
    fn record(&mut self, sealed: Sealed) -> Result<Vec<(u32, Vec<IndexRange>)>, TransferError> {
        let Sealed {
            mut batch,
            silent,
            received,
            repeated,
            reused,
            hashed,
            ..
        } = sealed;
        // The batch's chunks and the repeats written from them become durable together; each counts once.
        for index in batch.iter().map(|&(index, _)| index).chain(silent) {
            if self.received.insert(index) {
                self.durable_bytes += self.manifest.chunk(index).map_or(0, |c| u64::from(c.len));
            }
        }
        // proto-spec.md §2 `Committed.received_bytes`: chunks that came over the wire, once each, when made durable
        // (duplicates, rejected chunks and repeats filled from a first copy are not counted), so received + reused
        // is the file size for a fresh transfer.
        self.progress.received_bytes += received - repeated;
        self.progress.reused_bytes += reused;
        self.save_progress_with(hashed)?;
        self.stats
            .chunks_durable
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.stats.meter.file_durable(received);
        batch.sort_unstable_by_key(|&(index, stream)| (stream, index));
        // A chunk that came twice into one batch (a duplicate of one written there) is acknowledged once: an Ack
        // names each chunk at most once (proto-spec.md §5), and a sender refuses one that repeats a chunk.
        batch.dedup();
        Ok(batch
            .chunk_by(|a, b| a.1 == b.1)
            .map(|chunk| (chunk[0].1, encode_runs(chunk.iter().map(|&(index, _)| index))))
            .collect())
    }

    /// Syncs the partial and waits for every sync still running, then marks the batches received in the store;
    /// returns the chunks made durable, by stream.
    pub(crate) fn persist_batch(&mut self) -> Result<Vec<(u32, Vec<IndexRange>)>, TransferError> {
        self.seal()?;
        let mut durable = Vec::new();
        while let Some(mut oldest) = self.syncing.pop_front() {
            let recorded = (oldest.sync.wait_here())
                .map_err(TransferError::Storage)
                .and_then(|()| self.record(oldest));
            match recorded {
                Ok(batch) => durable.extend(batch),
                Err(e) => {
                    self.abandon_syncs();
                    return Err(e);
                }
            }
        }
        Ok(durable)
    }

    /// Writes chunk `index` from bytes found on the receiver's own disk, if they verify; true if it was taken.
    /// Counted as reused, not received; durable after the next [`ChunkWriter::persist_batch`]. The caller passes
    /// each missing index at most once per batch (reuse does: every index belongs to exactly one hash). `verify`
    /// may be false only for bytes already verified as this chunk, or as another with the same hash and length.
    /// `follow`, if given, holds the same bytes for the digest follower to hash from memory (if the chunk extends
    /// the final prefix) instead of reading them back.
    pub(crate) fn write_local(
        &mut self,
        index: u32,
        data: &[u8],
        verify: bool,
        follow: Option<HeldBytes>,
    ) -> Result<bool, TransferError> {
        let Some(entry) = self.manifest.chunk(index).copied() else {
            return Ok(false);
        };
        if self.received.contains(index) {
            // Already there; the answer still says whether `data` is this chunk, as the caller relies on it.
            return Ok(!verify || verify::check_chunk(&entry, data).is_ok());
        }
        let written = if verify {
            verify::write_verified(&*self.file, &entry, data)
        } else if entry.len as usize != data.len() {
            return Ok(false);
        } else {
            self.file
                .write_at(data, entry.offset)
                .map_err(|source| VerifyError::Io {
                    offset: entry.offset,
                    source,
                })
        };
        match written {
            Ok(()) => {
                self.written_at(entry.offset, data.len() as u64);
                self.mark_written_with(index, follow);
                self.batch.push((index, 0));
                self.batch_bytes += data.len() as u64;
                self.batch_reused += data.len() as u64;
                Ok(true)
            }
            Err(VerifyError::Mismatch { .. }) => Ok(false),
            Err(VerifyError::Io { source, .. }) => Err(TransferError::Storage(source)),
        }
    }

    /// Keeps chunk `index` where it already is, unread, if the partial holds the destination's unchanged bytes
    /// over its range ([`crate::storage::PartialFile::holds_unchanged`]) and the caller knows from the committed
    /// manifest that they are this chunk: counted as reused, durable with the next batch (nothing to sync for
    /// it). The whole-file digest at commit reads and checks these bytes; a mismatch there finds the damaged
    /// chunks and asks for them (proto-spec.md §8). True if it was kept.
    pub(crate) fn keep_in_place(&mut self, index: u32) -> bool {
        let Some(entry) = self.manifest.chunk(index).copied() else {
            return false;
        };
        if self.received.contains(index) || self.written.contains(index) {
            return false;
        }
        if !self.file.holds_unchanged(entry.offset, u64::from(entry.len)) {
            return false;
        }
        self.mark_written(index);
        self.batch.push((index, 0));
        self.batch_reused += u64::from(entry.len);
        true
    }

    /// Bytes written since the last sync.
    pub(crate) fn batch_bytes(&self) -> u64 {
        self.batch_bytes
    }
}

/// A batch whose sync was started: what is recorded and acknowledged once the sync finished.
struct Sealed {
    sync: PendingSync,
    /// Its chunks, with the stream each came on.
    batch: Vec<(u32, u32)>,
    /// Repeats written from its chunks, never acknowledged.
    silent: Vec<u32>,
    /// Bytes that came over the wire, of them repeats, and bytes reused.
    received: u64,
    repeated: u64,
    reused: u64,
    /// The follower's digest state taken before the sync.
    hashed: Option<StackedPrefix>,
}

/// What the writer waited for when the queue ran dry.
enum Next {
    /// The next chunk, `None` once the channel closed.
    Chunk(Option<QueuedChunk>),
    /// The oldest running sync ended.
    Synced(std::io::Result<()>),
}

/// The missing chunks of an offer grouped by hash: one list of `(hash, index)` sorted by hash, then index, instead
/// of a map of vectors, so an offer of 500,000 chunks costs about 36 bytes a chunk here (a map of vectors cost
/// over a hundred, on a path any authenticated client can reach with an offer it never sends data for). Local
/// reuse and the round's Need (repeats asked for once) both group by it.
pub(crate) struct Wanted {
    pub(crate) by_hash: Vec<(Hash, u32)>,
}

impl Wanted {
    /// The chunks `writer` still misses.
    pub(crate) fn missing_from(writer: &ChunkWriter) -> Wanted {
        let mut by_hash: Vec<(Hash, u32)> = writer
            .received
            .missing()
            .map(|index| (writer.manifest.chunks[index as usize].hash, index))
            .collect();
        by_hash.sort_unstable();
        Wanted { by_hash }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// Whether some missing chunk has `hash`.
    pub(crate) fn contains(&self, hash: &Hash) -> bool {
        let at = self.by_hash.partition_point(|(h, _)| h < hash);
        self.by_hash.get(at).is_some_and(|(h, _)| h == hash)
    }

    /// The runs of equal hashes, ordered by their first (lowest) index: the partial is written front to back, and
    /// an older version mostly read that way too.
    pub(crate) fn groups_in_file_order(&self) -> Vec<std::ops::Range<usize>> {
        let mut groups: Vec<std::ops::Range<usize>> = self
            .by_hash
            .chunk_by(|a, b| a.0 == b.0)
            .scan(0, |start, run| {
                let range = *start..*start + run.len();
                *start = range.end;
                Some(range)
            })
            .collect();
        groups.sort_unstable_by_key(|group| self.by_hash[group.start].1);
        groups
    }

    /// The hash of a group.
    pub(crate) fn hash(&self, group: &std::ops::Range<usize>) -> Hash {
        self.by_hash[group.start].0
    }

    /// The indices of a group, ascending.
    pub(crate) fn indices(&self, group: &std::ops::Range<usize>) -> impl Iterator<Item = u32> + '_ {
        self.by_hash[group.clone()].iter().map(|&(_, index)| index)
    }
}

/// `n` chunks, chunk `i` holding `block(i)`, queued for a writer as one stream would queue them, the queue then
/// closed: the input of the writer's tests.
#[cfg(test)]
pub(crate) fn queued_chunks(n: u32, block: impl Fn(u32) -> Vec<u8>) -> mpsc::Receiver<QueuedChunk> {
    let (queue, incoming) = mpsc::channel(n as usize);
    let budget = Arc::new(tokio::sync::Semaphore::new(1 << 20));
    for index in 0..n {
        let chunk = Chunk {
            index,
            data: block(index),
        };
        let _budget = budget.clone().try_acquire_owned().unwrap();
        queue
            .try_send(QueuedChunk {
                chunk,
                stream: 0,
                _budget,
            })
            .unwrap();
    }
    incoming
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{ChunkEntry, Chunking, FileTime};
    use crate::storage::sim::{SimRng, SimVolume};
    use crate::storage::Volume;
    use crate::store::Store;
    use crate::MIN_CHUNK_SIZE;

    /// The bytes of chunk `i` in these tests.
    fn block(i: u32) -> Vec<u8> {
        vec![i as u8; MIN_CHUNK_SIZE as usize]
    }

    /// A manifest of `n` chunks of [`MIN_CHUNK_SIZE`] bytes, chunk `i` holding [`block`]`(i)`.
    fn manifest_of(n: u32) -> Manifest {
        Manifest {
            size: u64::from(n) * u64::from(MIN_CHUNK_SIZE),
            digest: [0; 32],
            chunking: Chunking::Fixed { size: MIN_CHUNK_SIZE },
            mtime: FileTime::default(),
            mode: 0o644,
            chunks: (0..n)
                .map(|i| ChunkEntry {
                    offset: u64::from(i) * u64::from(MIN_CHUNK_SIZE),
                    len: MIN_CHUNK_SIZE,
                    hash: *blake3::hash(&block(i)).as_bytes(),
                })
                .collect(),
        }
    }

    /// Runs a writer over `file` for `n` chunks, all queued before it starts (so the queue never runs dry: every
    /// batch but the last ends at its size); returns the writer and the chunks of each Durable event, in order.
    fn write_all_queued(
        file: Partial,
        n: u32,
        batch_limit: u64,
        state: &std::path::Path,
    ) -> (ChunkWriter, Vec<Vec<u32>>) {
        let writer = writer_over(file, state, n, batch_limit);
        let incoming = queued_chunks(n, block);
        let (events, mut answers) = mpsc::unbounded_channel();
        let writer = writer.run(incoming, events);
        let mut acked = Vec::new();
        while let Ok(event) = answers.try_recv() {
            if let WriterEvent::Durable { ranges, .. } = event {
                acked.push(ranges.iter().flat_map(IndexRange::indices).collect());
            }
        }
        (writer, acked)
    }

    /// The first [`EARLY_BATCHES`] limits' worth of bytes go out in batches of a [`EARLY_BATCH_DIVISOR`]th of the
    /// limit (the sender's first Acks come sooner), the rest in whole batches; every chunk is acknowledged once.
    #[test]
    fn the_first_batches_are_a_fraction_of_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let chunk = u64::from(MIN_CHUNK_SIZE);
        let limit = 16 * chunk;
        let early = EARLY_BATCHES * limit / chunk; // chunks written in early batches
        let n = early as u32 + 32;
        let (writer, acked) = write_all_queued(new_partial(dir.path()), n, limit, &dir.path().join("state"));
        assert!(writer.received.is_complete());
        let sizes: Vec<usize> = acked.iter().map(Vec::len).collect();
        let per_early = (16 / EARLY_BATCH_DIVISOR) as usize;
        let mut expected = vec![per_early; early as usize / per_early];
        expected.extend([16, 16]);
        assert_eq!(sizes, expected);
        let all: Vec<u32> = acked.into_iter().flatten().collect();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
    }

    /// An empty partial file `dir/partial`.
    fn new_partial(dir: &std::path::Path) -> Partial {
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("partial"))
            .unwrap();
        Arc::new(file)
    }

    /// A writer for `n` chunks of [`manifest_of`] into `file`, its state store at `state`.
    fn writer_over(file: Partial, state: &std::path::Path, n: u32, batch_limit: u64) -> ChunkWriter {
        let store = ReceiverStore::open(&Store::open(state).unwrap()).unwrap();
        ChunkWriter::new(
            "k".into(),
            file,
            Arc::new(manifest_of(n)),
            ChunkSet::new(n),
            Progress::default(),
            store,
            Arc::default(),
            batch_limit,
        )
    }

    /// A writer for `n` chunks of [`manifest_of`] into a new partial and state store under `dir`.
    fn fresh_writer(dir: &std::path::Path, n: u32, batch_limit: u64) -> ChunkWriter {
        writer_over(new_partial(dir), &dir.join("state"), n, batch_limit)
    }

    /// A round that ends because its queue closed (a streamed offer ends one at every piece) leaves the writer
    /// drained but does not settle the digest state, whose wait (the follower catching up, then 10 ms for the
    /// clock) would stall every piece; the session's end settles it once, and only once.
    #[test]
    fn a_round_ending_does_not_settle_the_digest_state_and_the_session_end_does_once() {
        let dir = tempfile::tempdir().unwrap();
        let writer = fresh_writer(dir.path(), 8, 1 << 20);
        let (events, _answers) = mpsc::unbounded_channel();
        let writer = writer.run(queued_in(&[0, 1, 2]), events.clone());
        let mut writer = writer.run(queued_in(&[3, 4]), events);
        assert_eq!(writer.settles, 0, "a round's end settled the digest state");
        assert!(!writer.received.is_complete());
        writer.settle_after_session();
        writer.settle_after_session();
        assert_eq!(writer.settles, 1);
    }

    /// A run whose queue closes while the session asked it to pause (a streamed offer taking a piece) returns at
    /// once: its batch is not synced, nothing is acknowledged, and the next run carries the batch on and
    /// acknowledges every chunk exactly once when it drains.
    #[test]
    fn a_paused_run_carries_its_batch_into_the_next_run() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = fresh_writer(dir.path(), 8, 1 << 30);
        let acked = |answers: &mut mpsc::UnboundedReceiver<WriterEvent>| {
            let mut all = Vec::new();
            while let Ok(event) = answers.try_recv() {
                if let WriterEvent::Durable { ranges, .. } = event {
                    all.extend(ranges.iter().flat_map(IndexRange::indices));
                }
            }
            all
        };
        writer.pause_on(Arc::new(AtomicBool::new(true)));
        let (events, mut answers) = mpsc::unbounded_channel();
        let writer = writer.run(queued_in(&[0, 1, 2]), events);
        assert_eq!(writer.received.present(), 0, "a paused run drained its batch");
        assert!(writer.is_written(2));
        assert!(acked(&mut answers).is_empty());
        let (events, mut answers) = mpsc::unbounded_channel();
        let writer = writer.run(queued_in(&[3]), events);
        assert_eq!(acked(&mut answers), vec![0, 1, 2, 3]);
        assert_eq!(writer.received.present(), 4);
    }

    /// Chunks `order` (each [`block`]), queued for a writer as one stream would queue them, the queue then closed.
    fn queued_in(order: &[u32]) -> mpsc::Receiver<QueuedChunk> {
        let (queue, incoming) = mpsc::channel(order.len().max(1));
        let budget = Arc::new(tokio::sync::Semaphore::new(1 << 20));
        for &index in order {
            let queued = QueuedChunk {
                chunk: Chunk {
                    index,
                    data: block(index),
                },
                stream: 0,
                _budget: budget.clone().try_acquire_owned().unwrap(),
            };
            queue.try_send(queued).unwrap();
        }
        incoming
    }

    /// The whole-file digest follows the writes: chunks written in file order are hashed from the bytes the writer
    /// just verified and wrote, none read back; with chunk 0 arriving last, it alone is (the rest became final with
    /// it and is read back). Either way the digest is the file's.
    #[test]
    fn chunks_in_file_order_are_hashed_without_reading_them_back() {
        use crate::verify::{digest_rest, HashSources};
        let n = 24u32;
        let chunk = u64::from(MIN_CHUNK_SIZE);
        let whole: Vec<u8> = (0..n).flat_map(block).collect();
        let mut last_first: Vec<u32> = (1..n).collect();
        last_first.push(0);
        let in_order: Vec<u32> = (0..n).collect();
        for (order, expected) in [
            (
                in_order,
                HashSources {
                    from_memory: whole.len() as u64,
                    read_back: 0,
                    known: 0,
                },
            ),
            (
                last_first,
                HashSources {
                    from_memory: chunk,
                    read_back: whole.len() as u64 - chunk,
                    known: 0,
                },
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let writer = fresh_writer(dir.path(), n, 16 * chunk);
            let (events, _answers) = mpsc::unbounded_channel();
            let mut writer = writer.run(queued_in(&order), events);
            assert!(writer.received.is_complete());
            let follower = writer.follower.take().expect("a digest follower");
            let (prefix, sources) = follower.finish_counted().unwrap();
            assert_eq!(sources, expected, "chunk 0 at {:?}", order.iter().position(|&i| i == 0));
            assert_eq!(
                digest_rest(&*writer.file, prefix).unwrap(),
                *blake3::hash(&whole).as_bytes()
            );
        }
    }

    /// Every chunk written starts its writeback at once, so the batch's `fdatasync` finds its bytes (mostly)
    /// written instead of writing the whole batch itself.
    #[test]
    fn every_written_chunk_starts_its_writeback() {
        let dir = tempfile::tempdir().unwrap();
        let volume = SimVolume::default();
        let n = 24;
        let file = volume
            .open_partial("k", u64::from(n) * u64::from(MIN_CHUNK_SIZE), false)
            .unwrap();
        let (writer, _) = write_all_queued(file, n, 16 * u64::from(MIN_CHUNK_SIZE), dir.path());
        assert!(writer.received.is_complete());
        assert_eq!(volume.writeback_hints(), u64::from(n));
    }

    /// proto-spec.md §8 under the simulated disk, whatever the batch size: the power fails at every operation of
    /// the writer in turn (unsynced writes then dropped, kept or torn at random), and every chunk reported durable
    /// (acknowledged) before the failure has its exact bytes on the disk afterwards.
    #[test]
    fn no_chunk_is_acknowledged_before_the_sync_that_covers_it() {
        let n = 24u32;
        let size = u64::from(n) * u64::from(MIN_CHUNK_SIZE);
        let limit = 16 * u64::from(MIN_CHUNK_SIZE);
        let total = {
            let dir = tempfile::tempdir().unwrap();
            let volume = SimVolume::default();
            let file = volume.open_partial("k", size, false).unwrap();
            write_all_queued(file, n, limit, dir.path());
            volume.ops()
        };
        let mut rng = SimRng::seed_from_u64(14);
        let mut acked_somewhere = false;
        for crash_at in 1..=total {
            let dir = tempfile::tempdir().unwrap();
            let volume = SimVolume::default();
            volume.crash_at(crash_at);
            let Ok(file) = volume.open_partial("k", size, false) else {
                continue; // the power failed creating the partial: nothing written, nothing acknowledged
            };
            let (_, acked) = write_all_queued(file, n, limit, dir.path());
            volume.crash(&mut rng);
            volume.reboot();
            let on_disk = volume.partial("k", size).unwrap_or_default();
            for index in acked.into_iter().flatten() {
                acked_somewhere = true;
                let at = index as usize * MIN_CHUNK_SIZE as usize;
                assert_eq!(
                    on_disk.get(at..at + MIN_CHUNK_SIZE as usize),
                    Some(&block(index)[..]),
                    "chunk {index} was acknowledged but lost when the power failed at operation {crash_at}"
                );
            }
        }
        assert!(acked_somewhere, "no crash point came after an Ack");
    }

    /// With syncs that run on a thread of their own and are slow (the local volume's sync thread on a slow disk),
    /// the writer goes on writing while they run, yet every Ack comes only after the sync that covers its chunk
    /// ended: when the session hears of a chunk, its bytes are already durable.
    #[test]
    fn with_overlapping_slow_syncs_no_ack_precedes_its_sync() {
        let dir = tempfile::tempdir().unwrap();
        let volume = SimVolume::default();
        volume.slow_syncs(Duration::from_millis(30));
        let n = 48u32;
        let size = u64::from(n) * u64::from(MIN_CHUNK_SIZE);
        let file = volume.open_partial("k", size, false).unwrap();
        let writer = writer_over(file, &dir.path().join("state"), n, 4 * u64::from(MIN_CHUNK_SIZE));
        let (events, mut answers) = mpsc::unbounded_channel();
        let watched = volume.clone();
        let checker = std::thread::spawn(move || {
            let mut acked = Vec::new();
            while let Some(event) = answers.blocking_recv() {
                let WriterEvent::Durable { ranges, .. } = event else {
                    panic!("unexpected {event:?}");
                };
                let durable = watched.durable_partial("k").unwrap_or_default();
                for index in ranges.iter().flat_map(IndexRange::indices) {
                    let at = index as usize * MIN_CHUNK_SIZE as usize;
                    assert_eq!(
                        durable.get(at..at + MIN_CHUNK_SIZE as usize),
                        Some(&block(index)[..]),
                        "chunk {index} was acknowledged before its sync ended"
                    );
                    acked.push(index);
                }
            }
            acked
        });
        let writer = writer.run(queued_chunks(n, block), events);
        assert_eq!(checker.join().unwrap(), (0..n).collect::<Vec<_>>());
        assert!(writer.received.is_complete());
        // 12 batches, each synced for 30 ms: a writer that waited for each sync before writing the next batch
        // would make no write while one ran (counted by the simulated disk, not timed).
        assert!(
            volume.writes_while_syncing() > 0,
            "the syncs did not overlap the writing ({} syncs)",
            writer.syncs
        );
    }

    /// Chunks trickling in one at a time (the queue runs dry after each) share syncs: at most one per
    /// [`SYNC_INTERVAL`], where every chunk used to cost its own `fdatasync`. Each is still acknowledged.
    #[test]
    fn paced_small_chunks_do_not_cost_a_sync_each() {
        let dir = tempfile::tempdir().unwrap();
        let n = 40u32;
        let writer = fresh_writer(dir.path(), n, 4 * 1024 * 1024);
        let (queue, incoming) = mpsc::channel(4);
        let (events, mut answers) = mpsc::unbounded_channel();
        let budget = Arc::new(tokio::sync::Semaphore::new(1 << 20));
        let started = Instant::now();
        let feeder = std::thread::spawn(move || {
            for index in 0..n {
                std::thread::sleep(Duration::from_millis(5));
                let queued = QueuedChunk {
                    chunk: Chunk {
                        index,
                        data: block(index),
                    },
                    stream: 0,
                    _budget: budget.clone().try_acquire_owned().unwrap(),
                };
                queue.blocking_send(queued).unwrap();
            }
        });
        let writer = writer.run(incoming, events);
        feeder.join().unwrap();
        let elapsed = started.elapsed();
        assert!(writer.received.is_complete());
        let mut acknowledged = 0;
        while let Ok(event) = answers.try_recv() {
            match event {
                WriterEvent::Durable { ranges, .. } => acknowledged += ranges.iter().map(|r| r.count).sum::<u32>(),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(acknowledged, n, "every chunk acknowledged once durable");
        // One sync per interval at most (plus the first and the last), whatever the pacing did.
        let bound = (elapsed.as_millis() / SYNC_INTERVAL.as_millis()) as u64 + 2;
        assert!(
            writer.syncs <= bound,
            "{} syncs for {n} chunks over {elapsed:?} (bound {bound})",
            writer.syncs
        );
    }
}
