//! The one door to disk for received bytes: nothing that does not match its manifest hash is ever written.
//!
//! [`write_verified`] checks a chunk's length and BLAKE3 against its [`ChunkEntry`] and only then writes it at the
//! chunk's offset. [`digest_file`] re-reads an assembled file to check the whole-file digest, and a
//! [`DigestFollower`] does the same behind the writer while chunks still arrive: each byte is hashed once, soon
//! after it became final, not all again at the commit. A chunk that arrives in file order is hashed from the bytes
//! the writer just verified and wrote (handed over with [`DigestFollower::advance_with`]); everything else (chunks
//! out of order, repeats and reused chunks, a resumed partial's prefix, a piece the follower had no room to hold)
//! is read back from the file. So the commit proves the file's bytes as they were written or read back then; later
//! damage to a byte the follower already hashed is not seen by this commit (the next push of the same file, or a
//! pull, checks again). Blocking functions: call them from blocking threads.

use std::fs::File;
use std::sync::{Arc, Condvar, Mutex};

use thiserror::Error;

use crate::manifest::{ChunkEntry, Hash};
use crate::storage::{PartialFile, ReadAt};

/// A chunk failed verification or could not be written.
#[derive(Debug, Error)]
pub enum VerifyError {
    /// The bytes are not the manifest's bytes.
    #[error("chunk at offset {offset}: {reason}")]
    Mismatch {
        /// The chunk's offset.
        offset: u64,
        /// Length or hash mismatch.
        reason: &'static str,
    },
    /// Writing failed.
    #[error("writing chunk at offset {offset}: {source}")]
    Io {
        /// The chunk's offset.
        offset: u64,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Checks `data` against `entry`; a mismatch is a [`VerifyError::Mismatch`].
pub fn check_chunk(entry: &ChunkEntry, data: &[u8]) -> Result<(), VerifyError> {
    let reason = if data.len() != entry.len as usize {
        "length differs from the manifest"
    } else if *blake3::hash(data).as_bytes() != entry.hash {
        "BLAKE3 differs from the manifest"
    } else {
        return Ok(());
    };
    Err(VerifyError::Mismatch {
        offset: entry.offset,
        reason,
    })
}

/// Verifies `data` against `entry` and, only if it matches, writes it at `entry.offset` in `file`.
pub fn write_verified<F: PartialFile + ?Sized>(file: &F, entry: &ChunkEntry, data: &[u8]) -> Result<(), VerifyError> {
    check_chunk(entry, data)?;
    file.write_at(data, entry.offset).map_err(|source| VerifyError::Io {
        offset: entry.offset,
        source,
    })
}

/// BLAKE3 of a whole file, read sequentially from the start (reading and hashing overlap on two threads).
pub fn digest_file(file: &mut File) -> std::io::Result<Hash> {
    digest_rest(file, PrefixDigest::default())
}

/// The whole-file BLAKE3 of the bytes `[0, len)` of a file, hashed as they were written in order, so that the
/// commit re-reads only what follows. Writes that are not at the prefix's end leave it where it is.
///
/// It is kept as BLAKE3's own tree state (blake3's `hazmat` module): the chaining values of the complete subtrees
/// of 1 KiB chunks that tile the prefix, and the last, possibly partial, chunk. The chaining values alone
/// ([`PrefixDigest::stacked`]) are what a receiver records beside its progress, so that a resumed transfer goes on
/// hashing where the last one stopped instead of reading the durable prefix again.
#[derive(Default, Clone)]
pub struct PrefixDigest {
    /// Chaining values of complete subtrees covering `[0, stacked)`, lazily merged as `blake3::Hasher` keeps them.
    stack: Vec<ChainingValue>,
    /// Bytes the stack covers: a multiple of [`blake3::CHUNK_LEN`].
    stacked: u64,
    /// The bytes after `stacked`: at most one chunk, and never empty once anything was hashed (the last chunk must
    /// stay unhashed until the end is known, since it may be the root).
    last: Vec<u8>,
}

/// The chaining value of a chunk or subtree of BLAKE3's tree.
pub type ChainingValue = [u8; 32];

/// A prefix digest cut down to its complete subtrees: what may be recorded and later resumed with
/// [`PrefixDigest::resume`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StackedPrefix {
    /// Bytes covered, from offset 0 (a multiple of 1 KiB).
    pub len: u64,
    /// The chaining values, bottom of the stack first.
    pub stack: Vec<ChainingValue>,
}

/// Most chaining values a prefix of up to 2^64 bytes stacks (one per level, plus the one not merged yet).
const MAX_STACK: usize = 56;

impl PrefixDigest {
    /// Feeds `data` written at `offset` if it continues the prefix; false (and nothing hashed) otherwise.
    pub fn extend(&mut self, offset: u64, mut data: &[u8]) -> bool {
        if offset != self.len() || data.is_empty() {
            return false;
        }
        const CHUNK: usize = blake3::CHUNK_LEN;
        // Complete the held chunk first; it is hashed only once more bytes follow it.
        if self.last.len() < CHUNK {
            let take = (CHUNK - self.last.len()).min(data.len());
            self.last.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        if data.is_empty() {
            return true;
        }
        let held = std::mem::take(&mut self.last);
        self.push_subtree(&held);
        // Whole subtrees, as large as alignment allows, keeping at least one byte back as the new last chunk.
        while data.len() > CHUNK {
            let chunks = ((data.len() - 1) / CHUNK) as u64;
            let mut len = (1u64 << (63 - chunks.leading_zeros())) * CHUNK as u64;
            if let Some(max) = blake3::hazmat::max_subtree_len(self.stacked) {
                len = len.min(max);
            }
            let (subtree, rest) = data.split_at(len as usize);
            self.push_subtree(subtree);
            data = rest;
        }
        self.last.extend_from_slice(data);
        true
    }

    /// Takes the chaining value `cv` of the complete subtree of `len` bytes at `offset`, hashed apart
    /// ([`subtree_cv`]), in place of its bytes, if it continues the prefix: `offset` is where the prefix ends, a
    /// whole number of chunks, and `len` a subtree BLAKE3's tree has there ([`aligned_subtrees`]). The caller
    /// keeps the file's last chunk out of every such subtree (it is hashed as the root if it is the only one). False,
    /// and nothing changed, otherwise.
    pub fn extend_subtree(&mut self, offset: u64, len: u64, cv: ChainingValue) -> bool {
        if offset != self.len() || !is_subtree(offset, len) {
            return false;
        }
        if !self.last.is_empty() {
            // A whole chunk (the offset is a multiple of one): its bytes are no longer the last.
            let held = std::mem::take(&mut self.last);
            self.push_subtree(&held);
        }
        self.push_cv(cv, len);
        true
    }

    /// Hashes one complete, aligned subtree at `stacked` and pushes its chaining value (merging first what the
    /// chunks before it complete, as `blake3::Hasher` does).
    fn push_subtree(&mut self, subtree: &[u8]) {
        use blake3::hazmat::HasherExt;
        let cv = blake3::Hasher::new()
            .set_input_offset(self.stacked)
            .update(subtree)
            .finalize_non_root();
        self.push_cv(cv, subtree.len() as u64);
    }

    /// Pushes the chaining value of the complete, aligned subtree of `len` bytes at `stacked`, merging first what
    /// the chunks before it complete.
    fn push_cv(&mut self, cv: ChainingValue, len: u64) {
        self.merge_to(self.stacked);
        self.stack.push(cv);
        self.stacked += len;
    }

    /// Merges the top of the stack until it holds one value per set bit of the chunk count of `len` bytes.
    fn merge_to(&mut self, len: u64) {
        let keep = (len / blake3::CHUNK_LEN as u64).count_ones() as usize;
        while self.stack.len() > keep {
            let right = self.stack.pop().expect("longer than keep");
            let left = self.stack.pop().expect("longer than keep");
            self.stack.push(blake3::hazmat::merge_subtrees_non_root(
                &left,
                &right,
                blake3::hazmat::Mode::Hash,
            ));
        }
    }

    /// Bytes hashed so far, all from offset 0.
    pub fn len(&self) -> u64 {
        self.stacked + self.last.len() as u64
    }

    /// True when nothing is hashed yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The complete subtrees hashed so far (all but the last chunk).
    pub fn stacked(&self) -> StackedPrefix {
        StackedPrefix {
            len: self.stacked,
            stack: self.stack.clone(),
        }
    }

    /// Goes on from a recorded [`StackedPrefix`]; `None` if it cannot be one (not a whole number of chunks, an
    /// impossible number of chaining values).
    pub fn resume(prefix: StackedPrefix) -> Option<PrefixDigest> {
        let chunks = prefix.len / blake3::CHUNK_LEN as u64;
        let fits = prefix.len.is_multiple_of(blake3::CHUNK_LEN as u64)
            && prefix.stack.len() >= chunks.count_ones() as usize
            && prefix.stack.len() <= MAX_STACK
            && (prefix.len == 0) == prefix.stack.is_empty();
        fits.then(|| PrefixDigest {
            stack: prefix.stack,
            stacked: prefix.len,
            last: Vec::new(),
        })
    }

    /// The BLAKE3 of everything fed: the last chunk is the root if it is the only one, else it is merged with the
    /// stack from the top, the bottom merge being the root.
    pub fn finalize(mut self) -> Hash {
        use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, HasherExt, Mode};
        if self.stack.is_empty() {
            return *blake3::hash(&self.last).as_bytes();
        }
        let mut right = if self.last.is_empty() {
            // Only a resumed prefix that ended the file exactly: its top value is the right-most subtree.
            match self.stack.pop() {
                Some(top) if !self.stack.is_empty() => top,
                // A single subtree hashed as non-root cannot be the root; never recorded so (see `resume` callers).
                _ => return [0; 32],
            }
        } else {
            self.merge_to(self.stacked);
            blake3::Hasher::new()
                .set_input_offset(self.stacked)
                .update(&self.last)
                .finalize_non_root()
        };
        while self.stack.len() > 1 {
            let left = self.stack.pop().expect("more than one");
            right = merge_subtrees_non_root(&left, &right, Mode::Hash);
        }
        let bottom = self.stack.pop().expect("not empty");
        *merge_subtrees_root(&bottom, &right, Mode::Hash).as_bytes()
    }
}

/// Whether BLAKE3's tree has a complete subtree of `len` bytes at `offset`: a power of two of whole chunks, at an
/// offset that is a multiple of it.
fn is_subtree(offset: u64, len: u64) -> bool {
    let chunk = blake3::CHUNK_LEN as u64;
    len >= chunk && len.is_power_of_two() && offset.is_multiple_of(len)
}

/// The complete subtrees of BLAKE3's tree that tile `[start, end)` (both rounded inwards to whole chunks), as
/// `(offset, len)`, as large as alignment and `max_len` allow: the pieces whose chaining values
/// [`PrefixDigest::extend_subtree`] takes.
pub fn aligned_subtrees(start: u64, end: u64, max_len: u64) -> Vec<(u64, u64)> {
    let chunk = blake3::CHUNK_LEN as u64;
    let (mut at, end) = (start.div_ceil(chunk) * chunk, end / chunk * chunk);
    let max_len = 1u64 << (63 - max_len.max(chunk).leading_zeros());
    let mut subtrees = Vec::new();
    while at < end {
        let room = 1u64 << (63 - (end - at).leading_zeros());
        let aligned = if at == 0 { room } else { 1u64 << at.trailing_zeros() };
        let len = room.min(aligned).min(max_len);
        subtrees.push((at, len));
        at += len;
    }
    subtrees
}

/// The chaining value of the complete subtree of BLAKE3's tree at `offset` (see [`aligned_subtrees`]) whose bytes
/// `fill` feeds, a slice at a time, into the hasher it is given.
pub fn subtree_cv(
    offset: u64,
    fill: impl FnOnce(&mut blake3::Hasher) -> std::io::Result<()>,
) -> std::io::Result<ChainingValue> {
    use blake3::hazmat::HasherExt;
    let mut hasher = blake3::Hasher::new();
    hasher.set_input_offset(offset);
    fill(&mut hasher)?;
    Ok(hasher.finalize_non_root())
}

/// A complete subtree of a file's BLAKE3 tree hashed apart (from bytes known to be the final ones there), which a
/// follower takes in place of reading those bytes back ([`DigestFollower::know`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownSubtree {
    /// Where it starts in the file.
    pub offset: u64,
    /// Its length: a power of two of whole chunks ([`aligned_subtrees`]).
    pub len: u64,
    /// Its chaining value ([`subtree_cv`]).
    pub cv: ChainingValue,
}

/// A thread that hashes a file from offset 0 as its bytes become complete, behind the writer, so that the
/// whole-file digest is mostly done when the last chunk lands: at once for a partial that already holds a long
/// prefix (a resume), and lagging a little behind in-order writes. Bytes the writer hands over with
/// [`DigestFollower::advance_with`] (a chunk just written in file order) are hashed from memory; the rest is read
/// back from the file (the page cache), the same bytes a re-read at commit would see.
pub struct DigestFollower {
    shared: Arc<(Mutex<Follow>, Condvar)>,
    thread: Option<std::thread::JoinHandle<std::io::Result<PrefixDigest>>>,
    /// How long a writer waits for room at most ([`ROOM_PATIENCE`]; tests may set another).
    patience: std::time::Duration,
}

/// Bytes the writer wrote into the file and hands to the follower, so that it need not read them back; whatever
/// else the box holds (a queue budget's permit) is released when the follower is done with them.
pub type HeldBytes = Box<dyn AsRef<[u8]> + Send>;

/// Bytes of handed-over pieces a follower holds at most (or one piece, however large, when it holds nothing else:
/// up to [`crate::MAX_CHUNK_SIZE`], 16 MiB; its bytes still count in the receiver's queue budget).
/// A piece that would go past it waits for room if the follower is at most [`CATCH_UP`] behind it: the follower
/// frees room on its own, hashing what it holds and reading back what it was not handed. Otherwise (a follower
/// still reading back a long prefix) the piece is dropped and its bytes are read back later, so such a follower
/// never holds the writer up.
pub const FOLLOWER_HOLD: u64 = 4 << 20;

/// How far behind a piece a follower may be for the writer to wait for room rather than drop the piece. A writer
/// that ran ahead by dropping pieces would leave the follower to read them back, from the disk once the page cache
/// no longer holds them (direct writes), which slows the writes it ran ahead of: an 8 GiB push read 2.7-4.7 GiB
/// back that way, and with a 4 MiB hold, 6-8 GiB.
pub const CATCH_UP: u64 = 64 << 20;

/// The longest a writer waits for room in a follower near it before dropping its piece (a follower starved of CPU,
/// or stuck in a slow read, that long is not worth stalling the writes for). Once a wait ran out, the writer does
/// not wait again until the follower has hashed something more, so a follower stuck in one read costs the writes
/// this much once, not once per piece, and one that moves again gets its room again.
const ROOM_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

/// Where a follower's hashed bytes came from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HashSources {
    /// Bytes hashed from pieces the writer handed over.
    pub from_memory: u64,
    /// Bytes read back from the file.
    pub read_back: u64,
    /// Bytes taken as subtrees hashed apart ([`DigestFollower::know`]).
    pub known: u64,
}

/// Bytes at `offset` the writer wrote, to be hashed from memory.
struct Piece {
    offset: u64,
    bytes: HeldBytes,
}

/// What the writer tells the follower.
#[derive(Default)]
struct Follow {
    /// Bytes `[0, ready)` of the file hold their final contents.
    ready: u64,
    /// Final bytes handed over, in file order, each within `[0, ready)`.
    pieces: std::collections::VecDeque<Piece>,
    /// Bytes held in `pieces`.
    held: u64,
    /// Hash up to `ready` and return.
    finish: bool,
    /// Return at once; the digest is not wanted.
    cancel: bool,
    /// The follower thread has returned (done, cancelled or failed): it takes no more pieces.
    gone: bool,
    /// The end of the bytes the follower has taken to hash (from a piece, or read back).
    taken_to: u64,
    /// A wait for room ran out of patience; no writer waits again until the follower has hashed something more.
    impatient: bool,
    /// What the follower has hashed, published after each slice.
    hashed: Option<StackedPrefix>,
    /// Bytes hashed from handed-over pieces, and bytes read back from the file.
    from_memory: u64,
    read_back: u64,
    /// Subtrees hashed apart, by offset: taken instead of their bytes once the prefix reaches them and they are
    /// final.
    known: std::collections::BTreeMap<u64, KnownSubtree>,
    /// Bytes taken as known subtrees.
    from_known: u64,
}

impl DigestFollower {
    /// Starts following `file`, whose bytes `[0, ready)` are final already.
    pub fn start<R: ReadAt + 'static>(file: R, ready: u64) -> std::io::Result<Self> {
        Self::start_from(file, ready, PrefixDigest::default())
    }

    /// Starts following `file` from `seed`, a digest of its first `seed.len()` bytes (recorded by an earlier
    /// session), so those bytes are not read again; bytes `[0, ready)` are final already.
    pub fn start_from<R: ReadAt + 'static>(file: R, ready: u64, seed: PrefixDigest) -> std::io::Result<Self> {
        let shared = Arc::new((
            Mutex::new(Follow {
                ready,
                taken_to: seed.len(),
                ..Follow::default()
            }),
            Condvar::new(),
        ));
        let theirs = shared.clone();
        let thread = std::thread::Builder::new().name("ferry-digest".into()).spawn(move || {
            // However the loop ends (a return, an error, a panic), a writer waiting for room hears of it.
            let _gone = Gone(theirs.clone());
            follow(&file, &theirs, seed)
        })?;
        Ok(DigestFollower {
            shared,
            thread: Some(thread),
            patience: ROOM_PATIENCE,
        })
    }

    /// The same follower with another bound on a writer's wait for room (tests).
    #[cfg(test)]
    fn with_patience(mut self, patience: std::time::Duration) -> Self {
        self.patience = patience;
        self
    }

    /// The complete subtrees hashed so far: they cover only bytes read back after they were written, so once the
    /// file is synced, they describe durable bytes and may be recorded.
    pub fn hashed(&self) -> Option<StackedPrefix> {
        lock(&self.shared.0).hashed.clone()
    }

    /// Bytes `[0, ready)` are final now (never moves backwards).
    pub fn advance(&self, ready: u64) {
        self.advance_with(ready, None);
    }

    /// Bytes `[0, ready)` are final now, and `piece` holds the bytes just written at its offset, to be hashed from
    /// memory instead of read back. The caller hands over exactly the bytes it wrote there; a piece that is not
    /// within `[0, ready)` or comes before an earlier piece's end is dropped (its bytes are read back).
    ///
    /// A piece past [`FOLLOWER_HOLD`] waits for room (at most [`ROOM_PATIENCE`]) if the follower is at most
    /// [`CATCH_UP`] behind it, else is dropped. Blocks, so the caller is a blocking thread.
    pub fn advance_with(&self, ready: u64, piece: Option<(u64, HeldBytes)>) {
        let mut follow = lock(&self.shared.0);
        let mut moved = false;
        if let Some((offset, bytes)) = piece {
            let len = (*bytes).as_ref().len() as u64;
            let after_last = follow.pieces.back().is_none_or(|last| piece_end(last) <= offset);
            if len > 0 && offset + len <= ready.max(follow.ready) && after_last {
                let near = offset >= follow.taken_to && offset - follow.taken_to <= CATCH_UP;
                if !follow.has_room_for(len) && near && !follow.impatient {
                    // Only the bytes before the piece are final meanwhile: told its bytes are final, a follower
                    // that ran out of pieces would read them back instead of waiting for them.
                    moved |= follow.raise_ready(ready.min(offset));
                    self.shared.1.notify_all();
                    follow = self.wait_for_room(follow, len);
                }
                if follow.has_room_for(len) && !follow.gone {
                    follow.held += len;
                    follow.pieces.push_back(Piece { offset, bytes });
                    moved = true;
                }
            }
        }
        moved |= follow.raise_ready(ready);
        if moved {
            self.shared.1.notify_all();
        }
    }

    /// Subtrees of the file hashed apart, from bytes that are the final ones there: each is taken instead of its
    /// bytes once the prefix reaches its offset and it is within the final bytes. One the prefix has passed, or
    /// one it cannot take there, is dropped (its bytes are read back).
    pub fn know(&self, subtrees: impl IntoIterator<Item = KnownSubtree>) {
        let mut follow = lock(&self.shared.0);
        follow
            .known
            .extend(subtrees.into_iter().map(|subtree| (subtree.offset, subtree)));
        self.shared.1.notify_all();
    }

    /// Waits until the follower holds room for `len` more bytes, stops, or [`ROOM_PATIENCE`] passes.
    fn wait_for_room<'a>(
        &'a self,
        mut follow: std::sync::MutexGuard<'a, Follow>,
        len: u64,
    ) -> std::sync::MutexGuard<'a, Follow> {
        let deadline = std::time::Instant::now() + self.patience;
        while !follow.has_room_for(len) && !follow.gone && !follow.cancel {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                follow.impatient = true;
                break;
            }
            follow = self
                .shared
                .1
                .wait_timeout(follow, left)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        follow
    }

    /// Waits until everything final is hashed and returns the digest of that prefix.
    pub fn finish(self) -> std::io::Result<PrefixDigest> {
        self.finish_counted().map(|(prefix, _)| prefix)
    }

    /// [`DigestFollower::finish`], also saying where the hashed bytes came from.
    pub fn finish_counted(mut self) -> std::io::Result<(PrefixDigest, HashSources)> {
        lock(&self.shared.0).finish = true;
        self.shared.1.notify_all();
        let thread = self.thread.take().expect("a follower finishes once");
        let prefix = thread.join().unwrap_or_else(|_| Ok(PrefixDigest::default()))?;
        let follow = lock(&self.shared.0);
        let sources = HashSources {
            from_memory: follow.from_memory,
            read_back: follow.read_back,
            known: follow.from_known,
        };
        Ok((prefix, sources))
    }
}

impl Drop for DigestFollower {
    fn drop(&mut self) {
        if self.thread.is_some() {
            lock(&self.shared.0).cancel = true;
            self.shared.1.notify_all();
        }
    }
}

/// Marks the follower gone when its thread ends, however it ends, and wakes a writer waiting for room.
struct Gone(Arc<(Mutex<Follow>, Condvar)>);

impl Drop for Gone {
    fn drop(&mut self) {
        lock(&self.0 .0).gone = true;
        self.0 .1.notify_all();
    }
}

impl Follow {
    /// A piece of `len` bytes fits: within [`FOLLOWER_HOLD`], or alone.
    fn has_room_for(&self, len: u64) -> bool {
        self.held + len <= FOLLOWER_HOLD || self.held == 0
    }

    /// Bytes `[0, ready)` are final (never moves backwards); whether that moved.
    fn raise_ready(&mut self, ready: u64) -> bool {
        let moved = ready > self.ready;
        self.ready = self.ready.max(ready);
        moved
    }
}

/// Where `piece`'s bytes end in the file.
fn piece_end(piece: &Piece) -> u64 {
    piece.offset + (*piece.bytes).as_ref().len() as u64
}

fn lock(follow: &Mutex<Follow>) -> std::sync::MutexGuard<'_, Follow> {
    follow.lock().unwrap_or_else(|e| e.into_inner())
}

/// The follower's loop: hash the handed-over pieces from memory and read back the final bytes between them, up
/// to `ready`, in slices; sleep until there is more; stop on finish or cancel.
fn follow(file: &dyn ReadAt, shared: &(Mutex<Follow>, Condvar), seed: PrefixDigest) -> std::io::Result<PrefixDigest> {
    const SLICE: u64 = 1 << 20;
    let mut prefix = seed;
    let mut buf = Vec::new();
    // What the last turn hashed, counted under the next lock.
    let (mut from_memory, mut read_back, mut from_known) = (0, 0, 0);
    loop {
        let turn = {
            let mut follow = lock(&shared.0);
            if from_memory + read_back + from_known > 0 {
                follow.impatient = false; // it moves again: a writer may wait for room again
            }
            follow.from_memory += std::mem::take(&mut from_memory);
            follow.read_back += std::mem::take(&mut read_back);
            follow.from_known += std::mem::take(&mut from_known);
            follow.hashed = Some(prefix.stacked());
            while !follow.cancel && !follow.finish && follow.ready <= prefix.len() && follow.pieces.is_empty() {
                follow = shared.1.wait(follow).unwrap_or_else(|e| e.into_inner());
            }
            if follow.cancel {
                return Ok(prefix);
            }
            let at = prefix.len();
            while follow.known.first_key_value().is_some_and(|(&offset, _)| offset < at) {
                follow.known.pop_first();
            }
            let next_known = follow.known.first_key_value().map(|(_, subtree)| *subtree);
            if let Some(subtree) = next_known.filter(|s| s.offset == at && s.offset + s.len <= follow.ready) {
                follow.known.pop_first();
                follow.taken_to = follow.taken_to.max(subtree.offset + subtree.len);
                drop(follow);
                if prefix.extend_subtree(subtree.offset, subtree.len, subtree.cv) {
                    from_known += subtree.len;
                }
                continue;
            }
            // A subtree here whose bytes are not all final yet is waited for, not read back: the writer's next
            // advance wakes the follower. Unless a handed-over piece starts here, or the follower is finishing
            // (then the bytes are read back).
            let known_here = next_known.is_some_and(|s| s.offset == at);
            let piece_here = follow.pieces.front().is_some_and(|piece| piece.offset <= at);
            if known_here && !piece_here && !follow.finish {
                drop(shared.1.wait(follow).unwrap_or_else(|e| e.into_inner()));
                continue;
            }
            // A read back stops where the next known subtree starts.
            let known_at = next_known
                .map(|subtree| subtree.offset)
                .filter(|&offset| offset > at)
                .unwrap_or(u64::MAX);
            let turn = match follow.pieces.front() {
                Some(piece) if piece.offset <= prefix.len() => {
                    let piece = follow.pieces.pop_front().expect("matched above");
                    follow.held -= (*piece.bytes).as_ref().len() as u64;
                    follow.taken_to = follow.taken_to.max(piece_end(&piece));
                    shared.1.notify_all(); // room for a writer waiting on it
                    Turn::Hash(piece)
                }
                // Final bytes before the next piece were not handed over: read them back first.
                Some(piece) => Turn::ReadTo(piece.offset.min(prefix.len() + SLICE).min(known_at)),
                None if follow.ready > prefix.len() => {
                    Turn::ReadTo(follow.ready.min(prefix.len() + SLICE).min(known_at))
                }
                None => return Ok(prefix), // finishing, and everything final is hashed
            };
            if let Turn::ReadTo(to) = turn {
                follow.taken_to = follow.taken_to.max(to);
            }
            turn
        };
        match turn {
            Turn::Hash(piece) => {
                let bytes = (*piece.bytes).as_ref();
                // Bytes of it already hashed are skipped (none, as the writer hands over only what follows them).
                let skip = (prefix.len() - piece.offset) as usize;
                if let Some(rest) = bytes.get(skip..).filter(|rest| !rest.is_empty()) {
                    prefix.extend(prefix.len(), rest);
                    from_memory += rest.len() as u64;
                }
            }
            Turn::ReadTo(to) => {
                let at = prefix.len();
                buf.resize((to - at) as usize, 0);
                file.read_exact_at(&mut buf, at)?;
                prefix.extend(at, &buf);
                read_back += to - at;
            }
        }
    }
}

/// The follower's next step.
enum Turn {
    /// Hash a handed-over piece that starts at or before the prefix's end.
    Hash(Piece),
    /// Read back and hash the final bytes from the prefix's end to this offset (a slice at most).
    ReadTo(u64),
}

/// Finishes `prefix` with the file's bytes after it, read sequentially (reading and hashing overlap on two
/// threads), and returns the BLAKE3 of the whole file.
pub fn digest_rest<R: ReadAt + ?Sized>(file: &R, mut prefix: PrefixDigest) -> std::io::Result<Hash> {
    const BUF: usize = 4 << 20;
    let start = prefix.len();
    let size = file.size()?;
    if size.saturating_sub(start) <= BUF as u64 {
        let mut buf = vec![0u8; size.saturating_sub(start) as usize];
        file.read_exact_at(&mut buf, start)?;
        prefix.extend(start, &buf);
        return Ok(prefix.finalize());
    }
    // Two threads: one reads (the copy out of the page cache), this one hashes; two buffers go back and forth.
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<(Vec<u8>, usize)>(1);
    let (free_tx, free_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::scope(|scope| {
        let reader = scope.spawn(move || -> std::io::Result<()> {
            let mut offset = start;
            let mut spare = vec![vec![0u8; BUF], vec![0u8; BUF]];
            loop {
                let mut buf = spare
                    .pop()
                    .or_else(|| free_rx.recv().ok())
                    .unwrap_or_else(|| vec![0u8; BUF]);
                let n = file.read_at(&mut buf, offset)?;
                if n == 0 || full_tx.send((buf, n)).is_err() {
                    return Ok(());
                }
                offset += n as u64;
            }
        });
        for (buf, n) in full_rx {
            prefix.extend(prefix.len(), &buf[..n]);
            let _ = free_tx.send(buf);
        }
        reader.join().expect("digest reader thread panicked")?;
        Ok(prefix.finalize())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A follower told of subtrees hashed apart takes them instead of reading their bytes back, once they are final
    /// and the prefix reaches them, and still gives the digest of the whole.
    #[test]
    fn a_follower_takes_known_subtrees_instead_of_reading_them_back() {
        use std::io::Write;
        let data: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&data).unwrap();
        let subtrees: Vec<KnownSubtree> = aligned_subtrees(1_000_000, 2_500_000, 256 << 10)
            .into_iter()
            .map(|(offset, len)| KnownSubtree {
                offset,
                len,
                cv: subtree_cv(offset, |h| {
                    h.update(&data[offset as usize..(offset + len) as usize]);
                    Ok(())
                })
                .unwrap(),
            })
            .collect();
        let known: u64 = subtrees.iter().map(|s| s.len).sum();
        let follower = DigestFollower::start(file.try_clone().unwrap(), 0).unwrap();
        follower.know(subtrees);
        follower.advance(data.len() as u64);
        let (prefix, sources) = follower.finish_counted().unwrap();
        assert!(known > 1_400_000, "{known}");
        assert_eq!(sources.known, known);
        assert_eq!(sources.read_back, data.len() as u64 - known);
        assert_eq!(prefix.finalize(), *blake3::hash(&data).as_bytes());
    }

    /// A known subtree the prefix reaches before all its bytes are final is waited for, not read back, while the
    /// bytes become final a slice at a time (as a local copy makes them).
    #[test]
    fn a_follower_waits_for_a_known_subtree_to_become_final() {
        use std::io::Write;
        let data: Vec<u8> = (0..(5u32 << 20))
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 9) as u8)
            .collect();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&data).unwrap();
        let (offset, len) = (2u64 << 20, 2u64 << 20);
        let cv = subtree_cv(offset, |h| {
            h.update(&data[offset as usize..(offset + len) as usize]);
            Ok(())
        })
        .unwrap();
        let follower = DigestFollower::start(file.try_clone().unwrap(), 0).unwrap();
        follower.know([KnownSubtree { offset, len, cv }]);
        for ready in (1..=data.len() as u64 / (256 << 10)).map(|k| k * (256 << 10)) {
            follower.advance(ready);
            // Give the follower the time to read the new slice back, if it would.
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let (prefix, sources) = follower.finish_counted().unwrap();
        assert_eq!(sources.known, len);
        assert_eq!(sources.read_back, data.len() as u64 - len);
        assert_eq!(prefix.finalize(), *blake3::hash(&data).as_bytes());
    }

    /// Subtrees hashed apart and taken in place of their bytes give the digest of the whole, wherever the prefix
    /// stood when they came (mid-chunk is refused) and however the bytes around them were fed.
    #[test]
    fn subtrees_hashed_apart_give_the_digest_of_the_whole() {
        let data: Vec<u8> = (0..300_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let want = *blake3::hash(&data).as_bytes();
        for (start, end) in [
            (0, 290_000),
            (1024, 299_000),
            (5_000, 200_000),
            (70_000, 70_500),
            (3_000, 140_000),
        ] {
            let max_len = if start == 5_000 { 16_384 } else { u64::MAX };
            let subtrees = aligned_subtrees(start, end, max_len);
            let mut covered = subtrees.first().map_or(0, |s| s.0);
            for &(at, len) in &subtrees {
                assert!(is_subtree(at, len) && at == covered, "{start}..{end}: {subtrees:?}");
                covered += len;
            }
            let mut prefix = PrefixDigest::default();
            let mut at = 0u64;
            for &(offset, len) in &subtrees {
                prefix.extend(at, &data[at as usize..offset as usize]);
                if offset > 0 && offset % 1024 == 0 {
                    assert!(
                        !prefix.extend_subtree(offset + 1, len, [0; 32]),
                        "not where the prefix ends"
                    );
                }
                let bytes = &data[offset as usize..(offset + len) as usize];
                let cv = subtree_cv(offset, |h| {
                    for slice in bytes.chunks(7_000) {
                        h.update(slice);
                    }
                    Ok(())
                })
                .unwrap();
                assert!(
                    prefix.extend_subtree(offset, len, cv),
                    "{start}..{end}: ({offset}, {len})"
                );
                at = offset + len;
            }
            prefix.extend(at, &data[at as usize..]);
            assert_eq!(prefix.finalize(), want, "{start}..{end}");
        }
        let mut mid_chunk = PrefixDigest::default();
        mid_chunk.extend(0, &data[..1500]);
        assert!(!mid_chunk.extend_subtree(1500, 1024, [0; 32]));
        assert!(!mid_chunk.extend_subtree(1024, 1024, [0; 32]));
    }

    #[test]
    fn a_flipped_bit_is_never_written() {
        let tmp = tempfile::tempfile().unwrap();
        let data = vec![7u8; 4096];
        let entry = ChunkEntry {
            offset: 0,
            len: 4096,
            hash: *blake3::hash(&data).as_bytes(),
        };
        for bit in [0usize, 9, 4095 * 8 + 7] {
            let mut bad = data.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(matches!(
                write_verified(&tmp, &entry, &bad),
                Err(VerifyError::Mismatch { .. })
            ));
        }
        assert!(write_verified(&tmp, &entry, &data[..100]).is_err());
        assert_eq!(tmp.metadata().unwrap().len(), 0, "nothing reached the file");
        write_verified(&tmp, &entry, &data).unwrap();
        assert_eq!(tmp.metadata().unwrap().len(), 4096);
    }

    #[test]
    fn a_prefix_hashed_in_order_plus_the_rest_read_back_is_the_whole_file_digest() {
        use std::io::Write;
        let data: Vec<u8> = (0..9_000_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&data).unwrap();
        let whole = *blake3::hash(&data).as_bytes();
        assert_eq!(digest_file(&mut file).unwrap(), whole);
        for cut in [0usize, 1, 4096, 4 << 20, 5_000_001, data.len() - 1, data.len()] {
            let mut prefix = PrefixDigest::default();
            assert!(
                !prefix.extend(1, &data[1..cut.max(2)]),
                "a write past the prefix's end is not hashed"
            );
            let (first, second) = data[..cut].split_at(cut / 3);
            prefix.extend(0, first);
            prefix.extend(first.len() as u64, second);
            assert_eq!(prefix.len(), cut as u64);
            assert_eq!(digest_rest(&file, prefix).unwrap(), whole, "cut at {cut}");
        }
    }

    /// Sizes around BLAKE3's chunk (1 KiB) and subtree boundaries, and odd ones.
    const SIZES: [usize; 16] = [
        0,
        1,
        1023,
        1024,
        1025,
        2048,
        3072,
        3073,
        4095,
        4096,
        4097,
        65_536,
        65_537,
        100_000,
        1 << 20,
        1_234_567,
    ];

    fn data(len: usize) -> Vec<u8> {
        (0..len as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect()
    }

    /// Fed in pieces of any size (1 byte, odd, chunk-sized, large), the tree state gives `blake3::hash`.
    #[test]
    fn a_prefix_fed_in_any_pieces_is_the_whole_file_digest() {
        for size in SIZES {
            let data = data(size);
            for piece in [1usize, 7, 1000, 1024, 1025, 4096, 65_536, 1 << 20] {
                if piece == 1 && size > 70_000 {
                    continue;
                }
                let mut prefix = PrefixDigest::default();
                for (n, part) in data.chunks(piece).enumerate() {
                    assert!(prefix.extend((n * piece) as u64, part));
                }
                assert_eq!(prefix.len(), size as u64);
                assert_eq!(
                    prefix.finalize(),
                    *blake3::hash(&data).as_bytes(),
                    "size {size}, pieces of {piece}"
                );
            }
        }
    }

    /// What a receiver records (the complete subtrees) and resumes from, plus the rest, gives `blake3::hash`, for
    /// every cut; the recorded part never reaches the end of the data (the last chunk is held back).
    #[test]
    fn a_recorded_prefix_resumed_with_the_rest_is_the_whole_file_digest() {
        for size in SIZES {
            let data = data(size);
            for cut in [
                0usize,
                1,
                1024,
                1025,
                2049,
                4096,
                5000,
                65_536,
                size / 2,
                size.saturating_sub(1),
                size,
            ] {
                let cut = cut.min(size);
                let mut first = PrefixDigest::default();
                first.extend(0, &data[..cut]);
                let recorded = first.stacked();
                assert!(recorded.len < size as u64 || size == 0, "size {size} cut {cut}");
                assert_eq!(recorded.len % 1024, 0);
                let mut resumed = PrefixDigest::resume(recorded.clone()).expect("a recorded prefix resumes");
                resumed.extend(recorded.len, &data[recorded.len as usize..]);
                assert_eq!(
                    resumed.finalize(),
                    *blake3::hash(&data).as_bytes(),
                    "size {size}, cut {cut}"
                );
                // And through digest_rest, reading the rest from a file.
                let mut file = tempfile::tempfile().unwrap();
                std::io::Write::write_all(&mut file, &data).unwrap();
                let resumed = PrefixDigest::resume(recorded).unwrap();
                assert_eq!(digest_rest(&file, resumed).unwrap(), *blake3::hash(&data).as_bytes());
            }
        }
    }

    /// A recorded state that cannot be one is refused, not trusted: a length off the chunk grid, or too few
    /// chaining values for its length.
    #[test]
    fn an_impossible_recorded_prefix_is_refused() {
        let cv = [7u8; 32];
        let bad = |len, stack: Vec<ChainingValue>| PrefixDigest::resume(StackedPrefix { len, stack }).is_none();
        assert!(bad(1000, vec![cv]));
        assert!(bad(3 * 1024, vec![cv]), "three chunks need two subtrees");
        assert!(bad(1024, vec![]));
        assert!(bad(0, vec![cv]));
        assert!(bad(1024, vec![cv; MAX_STACK + 1]));
        assert!(!bad(3 * 1024, vec![cv; 2]));
    }

    /// Pieces handed over in file order are hashed from memory: nothing is read back, and the digest is the
    /// file's. A piece written before the prefix reached it (chunk 0 arriving last) is hashed from memory too, and
    /// the final bytes after it are read back.
    #[test]
    fn the_follower_hashes_handed_over_pieces_without_reading_them_back() {
        use std::io::Write;
        const PIECE: usize = 64 * 1024;
        let data = data(40 * PIECE + 1000);
        let whole = *blake3::hash(&data).as_bytes();
        let piece = |n: usize| -> (u64, HeldBytes) {
            let bytes = data[n * PIECE..((n + 1) * PIECE).min(data.len())].to_vec();
            ((n * PIECE) as u64, Box::new(bytes))
        };
        let pieces = data.len().div_ceil(PIECE);
        let end = |n: usize| ((n + 1) * PIECE).min(data.len()) as u64;

        // In order: every piece written, then handed over as the prefix reaches its end.
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&data).unwrap();
        let follower = DigestFollower::start(file.try_clone().unwrap(), 0).unwrap();
        for n in 0..pieces {
            follower.advance_with(end(n), Some(piece(n)));
        }
        let (prefix, sources) = follower.finish_counted().unwrap();
        assert_eq!(
            sources,
            HashSources {
                from_memory: data.len() as u64,
                read_back: 0,
                known: 0
            }
        );
        assert_eq!(digest_rest(&file, prefix).unwrap(), whole);

        // Piece 0 last: the others became final only with it, and are read back.
        let follower = DigestFollower::start(file.try_clone().unwrap(), 0).unwrap();
        for n in 1..pieces {
            follower.advance_with(0, Some(piece(n))); // not final yet: dropped
        }
        follower.advance_with(data.len() as u64, Some(piece(0)));
        let (prefix, sources) = follower.finish_counted().unwrap();
        assert_eq!(
            sources,
            HashSources {
                from_memory: PIECE as u64,
                read_back: (data.len() - PIECE) as u64,
                known: 0
            }
        );
        assert_eq!(digest_rest(&file, prefix).unwrap(), whole);
    }

    /// A file whose reads wait until the test opens the gate.
    struct Gated {
        file: File,
        open: Arc<(Mutex<bool>, Condvar)>,
    }

    impl ReadAt for Gated {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
            let (lock, opened) = &*self.open;
            let mut open = lock.lock().unwrap();
            while !*open {
                open = opened.wait(open).unwrap();
            }
            std::os::unix::fs::FileExt::read_at(&self.file, buf, offset)
        }

        fn size(&self) -> std::io::Result<u64> {
            Ok(self.file.metadata()?.len())
        }
    }

    /// `data` in a temp file, that file again behind a closed gate, and the gate.
    #[allow(clippy::type_complexity)]
    fn gated_file(data: &[u8]) -> (File, Gated, Arc<(Mutex<bool>, Condvar)>) {
        use std::io::Write;
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(data).unwrap();
        let open = Arc::new((Mutex::new(false), Condvar::new()));
        let gated = Gated {
            file: file.try_clone().unwrap(),
            open: open.clone(),
        };
        (file, gated, open)
    }

    /// Lets the gated reads through.
    fn open_gate(open: &(Mutex<bool>, Condvar)) {
        *open.0.lock().unwrap() = true;
        open.1.notify_all();
    }

    /// A follower stuck reading back a prefix longer than [`CATCH_UP`] never holds more than [`FOLLOWER_HOLD`] of
    /// handed-over bytes and never holds the writer up: past the bound, pieces are dropped at once and their bytes
    /// read back later; the digest is the same.
    #[test]
    fn a_follower_far_behind_holds_at_most_its_bound_and_never_waits() {
        const PIECE: usize = 1 << 20;
        let prefix = CATCH_UP as usize + PIECE;
        let count = (FOLLOWER_HOLD as usize / PIECE) + 4;
        let data = data(prefix + count * PIECE);
        let (file, gated, open) = gated_file(&data);
        // The prefix is final but not handed over: the follower waits at the gate to read it back.
        // Any wait at all would last 600 s.
        let follower = DigestFollower::start(gated, prefix as u64)
            .unwrap()
            .with_patience(std::time::Duration::from_secs(600));
        let started = std::time::Instant::now();
        for n in 0..count {
            let at = prefix + n * PIECE;
            let bytes: HeldBytes = Box::new(data[at..at + PIECE].to_vec());
            follower.advance_with((at + PIECE) as u64, Some((at as u64, bytes)));
            assert!(lock(&follower.shared.0).held <= FOLLOWER_HOLD, "piece {n}");
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "the writer waited for a follower far behind"
        );
        open_gate(&open);
        let (prefix, sources) = follower.finish_counted().unwrap();
        assert_eq!(
            sources.from_memory, FOLLOWER_HOLD,
            "the pieces held were hashed from memory"
        );
        assert_eq!(sources.read_back, (data.len() as u64) - FOLLOWER_HOLD);
        assert_eq!(digest_rest(&file, prefix).unwrap(), *blake3::hash(&data).as_bytes());
    }

    /// A follower near the writer but stuck (here, in a read that waits at a gate) costs the writer one wait (its
    /// patience, [`ROOM_PATIENCE`] unless set), not one per piece: after the first wait runs out, the next pieces are dropped at once,
    /// and the digest is still the file's.
    #[test]
    fn a_stuck_follower_costs_the_writer_one_wait() {
        const PIECE: usize = 1 << 20;
        let count = (FOLLOWER_HOLD as usize / PIECE) + 6;
        let data = data((count + 1) * PIECE);
        let (file, gated, open) = gated_file(&data);
        // The first MiB is final but not handed over: the follower, near, waits at the gate to read it back.
        let patience = std::time::Duration::from_secs(1);
        let follower = DigestFollower::start(gated, PIECE as u64)
            .unwrap()
            .with_patience(patience);
        let started = std::time::Instant::now();
        for n in 1..=count {
            let bytes: HeldBytes = Box::new(data[n * PIECE..(n + 1) * PIECE].to_vec());
            follower.advance_with(((n + 1) * PIECE) as u64, Some(((n * PIECE) as u64, bytes)));
        }
        let waited = started.elapsed();
        // One wait; a wait per piece over the hold would be 6 s.
        assert!(
            waited >= patience && waited < 5 * patience,
            "the writer waited {waited:?}"
        );
        open_gate(&open);
        let (prefix, sources) = follower.finish_counted().unwrap();
        assert_eq!(sources.from_memory, FOLLOWER_HOLD);
        assert_eq!(digest_rest(&file, prefix).unwrap(), *blake3::hash(&data).as_bytes());
    }

    /// A piece larger than [`FOLLOWER_HOLD`] (a 16 MiB chunk) is held when it is alone, not dropped and read back.
    #[test]
    fn a_piece_over_the_bound_is_held_alone() {
        use std::io::Write;
        let data = data(2 * FOLLOWER_HOLD as usize + 5);
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&data).unwrap();
        let follower = DigestFollower::start(file.try_clone().unwrap(), 0).unwrap();
        follower.advance_with(data.len() as u64, Some((0, Box::new(data.clone()))));
        let (prefix, sources) = follower.finish_counted().unwrap();
        assert_eq!(sources.read_back, 0);
        assert_eq!(digest_rest(&file, prefix).unwrap(), *blake3::hash(&data).as_bytes());
    }

    /// A writer that hands over pieces in file order faster than the follower hashes them (here, all at once)
    /// waits for room instead of dropping pieces: everything is hashed from memory, none read back, and the
    /// follower never holds more than its bound. Before, pieces past the bound were dropped and read back.
    #[test]
    fn a_writer_ahead_of_a_follower_near_it_waits_instead_of_dropping() {
        use std::io::Write;
        const PIECE: usize = 1 << 20;
        let count = 3 * FOLLOWER_HOLD as usize / PIECE;
        let data = data(count * PIECE);
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&data).unwrap();
        let pieces: Vec<HeldBytes> = (0..count)
            .map(|n| Box::new(data[n * PIECE..(n + 1) * PIECE].to_vec()) as HeldBytes)
            .collect();
        // Patience far beyond the test's run: a follower starved of CPU on a loaded machine must not drop pieces.
        let follower = DigestFollower::start(file.try_clone().unwrap(), 0)
            .unwrap()
            .with_patience(std::time::Duration::from_secs(600));
        for (n, bytes) in pieces.into_iter().enumerate() {
            follower.advance_with(((n + 1) * PIECE) as u64, Some(((n * PIECE) as u64, bytes)));
            assert!(lock(&follower.shared.0).held <= FOLLOWER_HOLD, "piece {n}");
        }
        let (prefix, sources) = follower.finish_counted().unwrap();
        assert_eq!(
            sources,
            HashSources {
                from_memory: data.len() as u64,
                read_back: 0,
                known: 0
            }
        );
        assert_eq!(digest_rest(&file, prefix).unwrap(), *blake3::hash(&data).as_bytes());
    }

    #[test]
    fn the_follower_hashes_what_becomes_final_and_the_commit_reads_only_the_rest() {
        use std::io::Write;
        let data: Vec<u8> = (0..11_000_000u32)
            .map(|i| (i.wrapping_mul(40_503) >> 7) as u8)
            .collect();
        let whole = *blake3::hash(&data).as_bytes();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&data[..3_000_000]).unwrap();
        let follower = DigestFollower::start(file.try_clone().unwrap(), 3_000_000).unwrap();
        file.write_all(&data[3_000_000..]).unwrap();
        for ready in [2_000_000, 6_000_000, 9_999_999] {
            follower.advance(ready);
        }
        let prefix = follower.finish().unwrap();
        assert_eq!(prefix.len(), 9_999_999, "hashed exactly what was declared final");
        assert_eq!(digest_rest(&file, prefix).unwrap(), whole);
        // A follower nobody finishes stops when dropped instead of waiting for bytes forever.
        drop(DigestFollower::start(file.try_clone().unwrap(), 0).unwrap());
    }
}
