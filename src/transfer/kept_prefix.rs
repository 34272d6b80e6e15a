//! The in-place check's head start. A streamed offer over a committed file is gathered whole before it is
//! answered (proto-spec.md §4, the deferred answer), so that an in-place write stays possible; the sender hashes
//! its whole file meanwhile, and then the digest follower read the whole new file back (the committed file's bytes
//! overlaid with the changes), after the sender was done. While the pieces arrive, [`KeptPrefixHasher`] hashes the
//! committed file from offset 0 on a thread of its own, as far as the pieces so far keep its chunks in place (the
//! same offset, length and hash as its committed manifest). If the offer is then written in place over that very
//! file, the follower starts from that digest ([`KeptPrefix`]) instead of reading the prefix back: those bytes
//! are the new file's, unchanged. Anything else (a new partial, a file that changed meanwhile) drops it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::Arc;

use super::in_place::unchanged_since_commit;
use super::receiver::{transfer_open, ReceiverContext};
use crate::manifest::{index_of_same, ChunkEntry, Manifest};
use crate::path::RemotePath;
use crate::storage::{ChangeStamp, FinalFile, Identity};
use crate::verify::PrefixDigest;

/// Bytes hashed per read of the committed file.
const SLICE: usize = 1 << 20;

/// The whole-file digest of a committed file's first bytes, kept in place by the offer that was gathered.
pub(crate) struct KeptPrefix {
    /// The committed file hashed, still open: a partial written in place over it, and only such a one, may start
    /// from the digest.
    file: Box<dyn FinalFile>,
    /// Its identity before the first byte was hashed.
    base: Identity,
    /// Its change stamp then: a write that set the mtime back still moves the change time.
    stamp: ChangeStamp,
    pub(crate) digest: PrefixDigest,
}

impl KeptPrefix {
    /// Whether `now` (the committed file at the path when the in-place partial was opened) is the file hashed, and
    /// that file has not been written, nor its metadata changed, since before it was hashed.
    pub(crate) fn describes(&self, now: &Identity) -> bool {
        let b = &self.base;
        let same_file = now.is_file && (now.dev, now.ino, now.len, now.mtime) == (b.dev, b.ino, b.len, b.mtime);
        same_file && self.file.change_stamp().is_ok_and(|stamp| stamp == self.stamp)
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
    pub(crate) fn start(ctx: &ReceiverContext, path: &RemotePath) -> Option<Self> {
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
            .spawn(move || hash_kept(file, (base, stamp), &old, &queue, &theirs))
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

/// How far the pieces so far keep the committed file's chunks in place, from offset 0.
struct KeptSoFar<'a> {
    old: &'a Manifest,
    /// Bytes `[0, end)` of the new file are chunks the old one holds at the same place.
    end: u64,
    /// A chunk that is not: nothing after it counts.
    broken: bool,
}

impl<'a> KeptSoFar<'a> {
    /// Nothing kept yet, against `old`, the committed manifest.
    fn new(old: &'a Manifest) -> Self {
        KeptSoFar {
            old,
            end: 0,
            broken: false,
        }
    }

    fn add(&mut self, chunks: &[ChunkEntry]) {
        for chunk in chunks {
            if self.broken {
                return;
            }
            let same = chunk.offset == self.end && index_of_same(&self.old.chunks, chunk).is_some();
            match same {
                true => self.end += u64::from(chunk.len),
                false => self.broken = true,
            }
        }
    }
}

/// The thread: hashes `file` from 0 up to what the pieces keep, until stopped or the pieces end; then the digest
/// if the file is still what `base` (its identity and change stamp before the hashing) says.
fn hash_kept(
    file: Box<dyn FinalFile>,
    base: (Identity, ChangeStamp),
    old: &Manifest,
    pieces: &Receiver<Vec<ChunkEntry>>,
    stop: &AtomicBool,
) -> Option<KeptPrefix> {
    let mut kept = KeptSoFar::new(old);
    let mut digest = PrefixDigest::default();
    let mut buf = vec![0u8; SLICE];
    while !stop.load(Ordering::Relaxed) {
        let at = digest.len();
        if at < kept.end {
            let len = (kept.end - at).min(SLICE as u64) as usize;
            file.read_exact_at(&mut buf[..len], at).ok()?;
            digest.extend(at, &buf[..len]);
            // Every piece that came meanwhile, so that none waits here longer than one slice.
            loop {
                match pieces.try_recv() {
                    Ok(chunks) => kept.add(&chunks),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return finished(file, base, digest),
                }
            }
            continue;
        }
        if kept.broken {
            break;
        }
        match pieces.recv() {
            Ok(chunks) => kept.add(&chunks),
            Err(_) => break,
        }
    }
    finished(file, base, digest)
}

/// `digest` of `file`'s first bytes, if it hashed any and the file is still what `base` says.
fn finished(file: Box<dyn FinalFile>, base: (Identity, ChangeStamp), digest: PrefixDigest) -> Option<KeptPrefix> {
    let still = file.identity().ok()?;
    let (base, stamp) = base;
    let prefix = KeptPrefix {
        file,
        base,
        stamp,
        digest,
    };
    (prefix.describes(&still) && !prefix.digest.is_empty()).then_some(prefix)
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
        let mut kept = KeptSoFar::new(&old);
        kept.add(&new.chunks[..1]);
        assert_eq!(kept.end, 10);
        kept.add(&new.chunks[1..]);
        assert_eq!(
            (kept.end, kept.broken),
            (20, true),
            "chunk 3 is unchanged but after a changed one"
        );
        let shifted = manifest_of(&[5, 10, 10, 10, 5]);
        let mut kept = KeptSoFar::new(&old);
        kept.add(&shifted.chunks);
        assert_eq!((kept.end, kept.broken), (0, true));
    }

    /// A local writer that changes hashed bytes and sets the mtime back leaves size, inode and mtime as they were,
    /// but not the change time: the digest no longer describes the file, so the commit reads the bytes again.
    #[test]
    fn a_write_that_sets_the_mtime_back_drops_the_kept_prefix() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("committed");
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
        let prefix = hash_kept(Box::new(file), base, &old, &queue, &AtomicBool::new(false)).expect("hashed");
        assert_eq!(prefix.digest.len(), 40);
        let identity_now = || FinalFile::identity(&std::fs::File::open(&path).unwrap()).unwrap();
        assert!(prefix.describes(&identity_now()), "an untouched file is described");

        // Coarse change-time clocks tick every few milliseconds: the write must land on a later tick.
        std::thread::sleep(std::time::Duration::from_millis(30));
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        let writer = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        writer.write_all_at(&[8], 3).unwrap();
        writer.set_modified(mtime).unwrap();
        let now = identity_now();
        assert_eq!(now, prefix.base, "size, inode and mtime are as hashed");
        assert!(!prefix.describes(&now), "the change time gives the write away");
    }
}
