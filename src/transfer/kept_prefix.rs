//! The in-place check's head start. A streamed offer over a committed file is gathered whole before it is
//! answered (proto-spec.md §4, the deferred answer), so that an in-place write stays possible; the sender hashes
//! its whole file meanwhile, and then the digest follower read the whole new file back (the committed file's bytes
//! overlaid with the changes), after the sender was done. While the pieces arrive, [`KeptPrefixHasher`] hashes the
//! committed file from offset 0 on a thread of its own, as far as the pieces so far keep its chunks in place (the
//! same offset, length and hash as its committed manifest). If the offer is then written in place over that very
//! file, the follower starts from that digest ([`KeptPrefix`]) instead of reading the prefix back: those bytes
//! are the new file's, unchanged. After the first changed chunk it goes on over the chunks the pieces keep in
//! place further on, as complete BLAKE3 subtrees ([`crate::verify::aligned_subtrees`], at most [`SUBTREE_MAX`]
//! each, never the file's last 1 KiB chunk), which the follower takes in place of their bytes
//! ([`crate::verify::DigestFollower::know`]). Anything else (a new partial, a file that changed meanwhile, its
//! change time included) drops it all.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::Arc;

use super::in_place::unchanged_since_commit;
use super::receiver::{transfer_open, ReceiverContext};
use crate::manifest::{index_of_same, ChunkEntry, Manifest};
use crate::path::RemotePath;
use crate::storage::{ChangeStamp, FinalFile, Identity};
use crate::verify::{aligned_subtrees, subtree_cv, ChainingValue, KnownSubtree, PrefixDigest};

/// Bytes hashed per read of the committed file.
const SLICE: usize = 1 << 20;

/// The largest subtree hashed after the first changed chunk: one cut short when the pieces end is lost whole.
const SUBTREE_MAX: u64 = 16 << 20;

/// The whole-file digest of a committed file's first bytes, kept in place by the offer that was gathered.
pub(crate) struct KeptPrefix {
    /// The committed file hashed, still open: a partial written in place over it, and only such a one, may start
    /// from the digest.
    hashed: HashedFile,
    /// Its identity before the first byte was hashed.
    base: Identity,
    /// The whole-file digest's state over the prefix.
    digest: PrefixDigest,
    /// Subtrees of the file's BLAKE3 tree inside the chunks kept in place after the first changed one, hashed
    /// from it while the pieces arrived.
    subtrees: Vec<KnownSubtree>,
}

/// What was hashed of a committed file ahead of an in-place write over it, for that write's digest follower.
pub(crate) struct HeadStart {
    /// The digest of its first bytes.
    pub(crate) prefix: PrefixDigest,
    /// Subtrees inside later chunks kept in place.
    pub(crate) subtrees: Vec<KnownSubtree>,
    /// The committed file hashed: the follower takes the hashes only while it is unchanged
    /// ([`HeadStart::still_unchanged`]).
    hashed: HashedFile,
}

impl HeadStart {
    /// Whether the file hashed has still not been written, nor its metadata changed, since before it was hashed:
    /// a local write between the offer's check and the follower's taking the hashes (the first round's local
    /// copies can take long) would otherwise be trusted as the new file's bytes.
    pub(crate) fn still_unchanged(&self) -> bool {
        self.hashed.unchanged()
    }
}

/// A committed file hashed ahead, still open, and its change stamp from before the first byte was hashed.
struct HashedFile {
    file: Box<dyn FinalFile>,
    /// A write that set the mtime back still moves the change time.
    stamp: ChangeStamp,
}

impl HashedFile {
    /// Whether the file has not been written, nor its metadata changed, since the stamp was taken.
    fn unchanged(&self) -> bool {
        self.file.change_stamp().is_ok_and(|stamp| stamp == self.stamp)
    }
}

impl KeptPrefix {
    /// What the in-place write's follower takes of it (once [`KeptPrefix::describes`] said it may).
    pub(crate) fn into_head_start(self) -> HeadStart {
        HeadStart {
            prefix: self.digest,
            subtrees: self.subtrees,
            hashed: self.hashed,
        }
    }

    /// Whether `now` (the committed file at the path when the in-place partial was opened) is the file hashed, and
    /// that file has not been written, nor its metadata changed, since before it was hashed.
    pub(crate) fn describes(&self, now: &Identity) -> bool {
        let b = &self.base;
        let same_file = now.is_file && (now.dev, now.ino, now.len, now.mtime) == (b.dev, b.ino, b.len, b.mtime);
        same_file && self.hashed.unchanged()
    }
}

/// The thread hashing the committed file as far as the pieces so far keep it.
pub(crate) struct KeptPrefixHasher {
    pieces: Option<Sender<Vec<ChunkEntry>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Option<KeptPrefix>>>,
}

impl KeptPrefixHasher {
    /// Starts hashing the file committed at `path`, if the receiver may write in place over it (its policy, its
    /// volume, no transfer to the path open) and the file is there unchanged since its commit; `None` otherwise.
    /// Blocking.
    pub(crate) fn start(ctx: &ReceiverContext, path: &RemotePath, size: u64) -> Option<Self> {
        let key = path.as_str();
        // As `prepare_with` and `open_in_place` decide: no in-place write over an open transfer (a resume), nor
        // where the volume would not write this file in place.
        if !ctx.policy.in_place || transfer_open(ctx, key).ok()? || !ctx.volume.writes_in_place(path) {
            return None;
        }
        let done = ctx.store.committed(key).ok()??;
        let file = ctx.volume.open_final(path)?;
        let stamp = file.change_stamp().ok()?;
        let base = file.identity().ok()?;
        if !unchanged_since_commit(&base, &done) {
            return None;
        }
        let old = ctx.store.committed_manifest(key).ok()??;
        let (pieces, queue) = channel();
        let stop = Arc::new(AtomicBool::new(false));
        let theirs = stop.clone();
        let thread = std::thread::Builder::new()
            .name("ferry-kept".into())
            .spawn(move || hash_kept(file, (base, stamp), KeptSoFar::new(&old, size), &queue, &theirs))
            .ok()?;
        Some(KeptPrefixHasher {
            pieces: Some(pieces),
            stop,
            thread: Some(thread),
        })
    }

    /// The next piece's chunks, in manifest order.
    pub(crate) fn add(&self, chunks: &[ChunkEntry]) {
        if let Some(pieces) = &self.pieces {
            let _ = pieces.send(chunks.to_vec());
        }
    }

    /// Stops the thread where it is and returns what it hashed (`None` if nothing, or the file changed).
    /// Blocking (waits for at most one slice's read).
    pub(crate) fn finish(mut self) -> Option<KeptPrefix> {
        self.stop.store(true, Ordering::Relaxed);
        self.pieces = None;
        self.thread.take()?.join().ok().flatten()
    }
}

impl Drop for KeptPrefixHasher {
    /// An offer abandoned while gathered stops the thread too (without waiting for it).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// How far the pieces so far keep the committed file's chunks in place, from offset 0, and which later chunks
/// they keep in place.
struct KeptSoFar<'a> {
    old: &'a Manifest,
    /// Bytes `[0, end)` of the new file are chunks the old one holds at the same place.
    end: u64,
    /// A chunk that is not: the prefix ends there.
    broken: bool,
    /// After that chunk, the runs of chunks kept in place, `[start, end)` in file order, that subtrees have not
    /// covered yet.
    later: VecDeque<(u64, u64)>,
    /// Subtrees are planned up to here.
    planned_to: u64,
    /// Where the new file's last BLAKE3 chunk starts: no subtree reaches it (it may be the root).
    last_chunk: u64,
}

impl<'a> KeptSoFar<'a> {
    /// Nothing kept yet, against `old`, the committed manifest, for a new file of `size` bytes.
    fn new(old: &'a Manifest, size: u64) -> Self {
        let chunk = blake3::CHUNK_LEN as u64;
        KeptSoFar {
            old,
            end: 0,
            broken: false,
            later: VecDeque::new(),
            planned_to: 0,
            last_chunk: size.saturating_sub(1) / chunk * chunk,
        }
    }

    fn add(&mut self, chunks: &[ChunkEntry]) {
        for chunk in chunks {
            let same = index_of_same(&self.old.chunks, chunk).is_some();
            if !self.broken && same && chunk.offset == self.end {
                self.end += u64::from(chunk.len);
                continue;
            }
            self.broken = true;
            // A piece is hashed ahead before it is checked: its offsets are the peer's, unchecked (a wrong one
            // fails the offer later, and a changed chunk's end is never used).
            let end = chunk.offset.saturating_add(u64::from(chunk.len));
            match self.later.back_mut() {
                Some(run) if same && run.1 == chunk.offset => run.1 = end,
                _ if same => self.later.push_back((chunk.offset, end)),
                _ => {}
            }
        }
    }

    /// The next subtree to hash inside a later run (at most [`SUBTREE_MAX`]), if a run has a whole one left; runs
    /// done with are dropped, the last one stays (the next piece may extend it).
    fn next_subtree(&mut self) -> Option<(u64, u64)> {
        while let Some(&(start, end)) = self.later.front() {
            let from = start.max(self.planned_to);
            if let Some(&(offset, len)) = aligned_subtrees(from, end.min(self.last_chunk), SUBTREE_MAX).first() {
                self.planned_to = offset + len;
                return Some((offset, len));
            }
            if self.later.len() == 1 {
                return None;
            }
            self.later.pop_front();
        }
        None
    }
}

/// The thread: hashes `file` from 0 up to what the pieces keep, and the subtrees inside the chunks they keep in
/// place after the first changed one, until stopped or the pieces end; then what it hashed, if the file is still
/// what `base` (its identity and change stamp before the hashing) says.
fn hash_kept(
    file: Box<dyn FinalFile>,
    base: (Identity, ChangeStamp),
    mut kept: KeptSoFar<'_>,
    pieces: &Receiver<Vec<ChunkEntry>>,
    stop: &AtomicBool,
) -> Option<KeptPrefix> {
    let mut digest = PrefixDigest::default();
    let mut subtrees = Vec::new();
    let mut buf = vec![0u8; SLICE];
    while !stop.load(Ordering::Relaxed) {
        let at = digest.len();
        if at < kept.end {
            let len = (kept.end - at).min(SLICE as u64) as usize;
            file.read_exact_at(&mut buf[..len], at).ok()?;
            digest.extend(at, &buf[..len]);
        } else if let Some((offset, len)) = kept.next_subtree() {
            match hash_subtree(&*file, offset, len, &mut buf, stop) {
                Some(cv) => subtrees.push(KnownSubtree { offset, len, cv }),
                None => break,
            }
        } else {
            match pieces.recv() {
                Ok(chunks) => kept.add(&chunks),
                Err(_) => break,
            }
            continue;
        }
        // Every piece that came meanwhile, so that none waits here longer than one slice or subtree.
        loop {
            match pieces.try_recv() {
                Ok(chunks) => kept.add(&chunks),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return finished(file, base, digest, subtrees),
            }
        }
    }
    finished(file, base, digest, subtrees)
}

/// The chaining value of the subtree of `len` bytes at `offset` of `file`, read a slice at a time into `buf`;
/// `None` if stopped meanwhile or the read failed.
fn hash_subtree(
    file: &dyn FinalFile,
    offset: u64,
    len: u64,
    buf: &mut [u8],
    stop: &AtomicBool,
) -> Option<ChainingValue> {
    let fill = |hasher: &mut blake3::Hasher| {
        let mut at = offset;
        while at < offset + len {
            if stop.load(Ordering::Relaxed) {
                return Err(std::io::Error::other("stopped"));
            }
            let n = (offset + len - at).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], at)?;
            hasher.update(&buf[..n]);
            at += n as u64;
        }
        Ok(())
    };
    subtree_cv(offset, fill).ok()
}

/// What was hashed of `file`, if anything, and the file is still what `base` says.
fn finished(
    file: Box<dyn FinalFile>,
    base: (Identity, ChangeStamp),
    digest: PrefixDigest,
    subtrees: Vec<KnownSubtree>,
) -> Option<KeptPrefix> {
    let still = file.identity().ok()?;
    let (base, stamp) = base;
    let prefix = KeptPrefix {
        hashed: HashedFile { file, stamp },
        base,
        digest,
        subtrees,
    };
    let hashed = !prefix.digest.is_empty() || !prefix.subtrees.is_empty();
    (prefix.describes(&still) && hashed).then_some(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::manifest_of;

    /// Only chunks at the old places, from offset 0 and with no change before them, count.
    #[test]
    fn the_kept_prefix_ends_at_the_first_changed_chunk() {
        let old = manifest_of(&[10, 10, 10, 10]);
        let mut new = old.clone();
        new.chunks[2].hash[0] ^= 1;
        let mut kept = KeptSoFar::new(&old, old.size);
        kept.add(&new.chunks[..1]);
        assert_eq!(kept.end, 10);
        kept.add(&new.chunks[1..]);
        assert_eq!(
            (kept.end, kept.broken),
            (20, true),
            "chunk 3 is unchanged but after a changed one"
        );
        let shifted = manifest_of(&[5, 10, 10, 10, 5]);
        let mut kept = KeptSoFar::new(&old, old.size);
        kept.add(&shifted.chunks);
        assert_eq!((kept.end, kept.broken), (0, true));
    }

    /// After the first changed chunk, the runs of chunks kept in place are tiled with subtrees, in order, across
    /// pieces (a run the next piece extends goes on where it stopped), never into the file's last 1 KiB chunk.
    #[test]
    fn subtrees_tile_the_chunks_kept_after_a_change_but_the_last_chunk() {
        const K: u32 = 1024;
        let old = manifest_of(&[8 * K, 8 * K, 8 * K, 8 * K, 8 * K]);
        let mut new = old.clone();
        new.chunks[0].hash[0] ^= 1;
        new.chunks[2].hash[0] ^= 1;
        let mut kept = KeptSoFar::new(&old, new.size);
        let planned = |kept: &mut KeptSoFar| std::iter::from_fn(|| kept.next_subtree()).collect::<Vec<_>>();
        kept.add(&new.chunks[..4]);
        assert_eq!((kept.end, kept.broken), (0, true));
        let k = u64::from(K);
        assert_eq!(planned(&mut kept), [(8 * k, 8 * k), (24 * k, 8 * k)]);
        kept.add(&new.chunks[4..]);
        // Chunk 4 extends the last run: 32 KiB to 40 KiB, but the last 1 KiB.
        assert_eq!(planned(&mut kept), [(32 * k, 4 * k), (36 * k, 2 * k), (38 * k, k)]);
    }

    /// A piece is planned from before it is checked: a changed chunk at an offset near `u64::MAX` (a peer's
    /// nonsense, refused when the piece is checked) is passed over without overflowing.
    #[test]
    fn an_unchecked_piece_near_the_end_of_the_offsets_does_not_overflow() {
        let old = manifest_of(&[8 * 1024, 8 * 1024]);
        let mut bogus = old.chunks[1];
        bogus.hash[0] ^= 1;
        bogus.offset = u64::MAX - 10;
        let mut kept = KeptSoFar::new(&old, old.size);
        kept.add(&[bogus]);
        assert!(kept.broken);
        assert_eq!(kept.next_subtree(), None);
    }

    /// A committed file of 40 bytes in `dir`, hashed whole as four kept 10-byte chunks.
    fn hashed_committed(dir: &std::path::Path) -> (std::path::PathBuf, KeptPrefix) {
        let path = dir.join("committed");
        std::fs::write(&path, [7u8; 40]).unwrap();
        let old = manifest_of(&[10, 10, 10, 10]);
        let file = std::fs::File::open(&path).unwrap();
        let base = (
            FinalFile::identity(&file).unwrap(),
            FinalFile::change_stamp(&file).unwrap(),
        );
        let (pieces, queue) = channel();
        pieces.send(old.chunks.clone()).unwrap();
        drop(pieces);
        let stop = AtomicBool::new(false);
        let prefix = hash_kept(Box::new(file), base, KeptSoFar::new(&old, 40), &queue, &stop).expect("hashed");
        assert_eq!(prefix.digest.len(), 40);
        (path, prefix)
    }

    /// Writes byte `at` of the file at `path` and sets its mtime back, on a later tick of the change-time clock
    /// (coarse clocks tick every few milliseconds).
    fn write_behind_the_mtime(path: &std::path::Path, at: u64) {
        use std::os::unix::fs::FileExt;
        std::thread::sleep(std::time::Duration::from_millis(30));
        let mtime = std::fs::metadata(path).unwrap().modified().unwrap();
        let writer = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        writer.write_all_at(&[8], at).unwrap();
        writer.set_modified(mtime).unwrap();
    }

    /// A local writer that changes hashed bytes and sets the mtime back leaves size, inode and mtime as they were,
    /// but not the change time: the digest no longer describes the file, so the commit reads the bytes again.
    #[test]
    fn a_write_that_sets_the_mtime_back_drops_the_kept_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let (path, prefix) = hashed_committed(dir.path());
        let identity_now = || FinalFile::identity(&std::fs::File::open(&path).unwrap()).unwrap();
        assert!(prefix.describes(&identity_now()), "an untouched file is described");

        write_behind_the_mtime(&path, 3);
        let now = identity_now();
        assert_eq!(now, prefix.base, "size, inode and mtime are as hashed");
        assert!(!prefix.describes(&now), "the change time gives the write away");
    }

    /// The head start handed to the writer checks the change time again when it is taken: a write after the
    /// offer's check (during a long first round of local copies) that sets the mtime back drops it.
    #[test]
    fn a_head_start_written_over_after_the_check_is_not_taken() {
        let dir = tempfile::tempdir().unwrap();
        let (path, prefix) = hashed_committed(dir.path());
        let head = prefix.into_head_start();
        assert!(head.still_unchanged(), "an untouched file's head start holds");

        write_behind_the_mtime(&path, 25);
        assert!(!head.still_unchanged(), "the change time gives the write away");
    }
}
