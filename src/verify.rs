//! The one door to disk for received bytes: nothing that does not match its manifest hash is ever written.
//!
//! [`write_verified`] checks a chunk's length and BLAKE3 against its [`ChunkEntry`] and only then writes it at the
//! chunk's offset. [`digest_file`] re-reads an assembled file to check the whole-file digest, and a
//! [`DigestFollower`] does the same behind the writer while chunks still arrive: each byte is read back from the
//! file once, soon after it became final (for a resumed partial, when the session opens), not all again at the
//! commit. So the commit proves the file's bytes as they were read back then; later damage to a byte the
//! follower already read is not seen by this commit (the next push of the same file, or a pull, checks again).
//! Blocking functions: call them from blocking threads.

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
#[derive(Default)]
pub struct PrefixDigest {
    hasher: blake3::Hasher,
    len: u64,
}

impl PrefixDigest {
    /// Feeds `data` written at `offset` if it continues the prefix; false (and nothing hashed) otherwise.
    pub fn extend(&mut self, offset: u64, data: &[u8]) -> bool {
        if offset != self.len || data.is_empty() {
            return false;
        }
        self.hasher.update(data);
        self.len += data.len() as u64;
        true
    }

    /// Bytes hashed so far, all from offset 0.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when nothing is hashed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A thread that hashes a file from offset 0 as its bytes become complete, behind the writer, so that the
/// whole-file digest is mostly done when the last chunk lands: at once for a partial that already holds a long
/// prefix (a resume), and lagging a little behind in-order writes. It reads what the writer wrote back from the
/// page cache, the same bytes a re-read at commit would see.
pub struct DigestFollower {
    shared: Arc<(Mutex<Follow>, Condvar)>,
    thread: Option<std::thread::JoinHandle<std::io::Result<PrefixDigest>>>,
}

/// What the writer tells the follower.
#[derive(Default)]
struct Follow {
    /// Bytes `[0, ready)` of the file hold their final contents.
    ready: u64,
    /// Hash up to `ready` and return.
    finish: bool,
    /// Return at once; the digest is not wanted.
    cancel: bool,
}

impl DigestFollower {
    /// Starts following `file`, whose bytes `[0, ready)` are final already.
    pub fn start<R: ReadAt + 'static>(file: R, ready: u64) -> std::io::Result<Self> {
        let shared = Arc::new((
            Mutex::new(Follow {
                ready,
                ..Follow::default()
            }),
            Condvar::new(),
        ));
        let theirs = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ferry-digest".into())
            .spawn(move || follow(&file, &theirs))?;
        Ok(DigestFollower {
            shared,
            thread: Some(thread),
        })
    }

    /// Bytes `[0, ready)` are final now (never moves backwards).
    pub fn advance(&self, ready: u64) {
        let mut follow = lock(&self.shared.0);
        if ready > follow.ready {
            follow.ready = ready;
            self.shared.1.notify_one();
        }
    }

    /// Waits until everything final is hashed and returns the digest of that prefix.
    pub fn finish(mut self) -> std::io::Result<PrefixDigest> {
        lock(&self.shared.0).finish = true;
        self.shared.1.notify_one();
        let thread = self.thread.take().expect("a follower finishes once");
        thread.join().unwrap_or_else(|_| Ok(PrefixDigest::default()))
    }
}

impl Drop for DigestFollower {
    fn drop(&mut self) {
        if self.thread.is_some() {
            lock(&self.shared.0).cancel = true;
            self.shared.1.notify_one();
        }
    }
}

fn lock(follow: &Mutex<Follow>) -> std::sync::MutexGuard<'_, Follow> {
    follow.lock().unwrap_or_else(|e| e.into_inner())
}

/// The follower's loop: hash up to `ready` in slices, sleep until it moves, stop on finish or cancel.
fn follow(file: &dyn ReadAt, shared: &(Mutex<Follow>, Condvar)) -> std::io::Result<PrefixDigest> {
    const SLICE: u64 = 1 << 20;
    let mut prefix = PrefixDigest::default();
    let mut buf = Vec::new();
    loop {
        let target = {
            let mut follow = lock(&shared.0);
            while !follow.cancel && !follow.finish && follow.ready <= prefix.len() {
                follow = shared.1.wait(follow).unwrap_or_else(|e| e.into_inner());
            }
            if follow.cancel || (follow.finish && follow.ready <= prefix.len()) {
                return Ok(prefix);
            }
            follow.ready
        };
        let len = (target - prefix.len()).min(SLICE) as usize;
        buf.resize(len, 0);
        file.read_exact_at(&mut buf, prefix.len())?;
        prefix.extend(prefix.len(), &buf);
    }
}

/// Finishes `prefix` with the file's bytes after it, read sequentially (reading and hashing overlap on two
/// threads), and returns the BLAKE3 of the whole file.
pub fn digest_rest<R: ReadAt + ?Sized>(file: &R, prefix: PrefixDigest) -> std::io::Result<Hash> {
    const BUF: usize = 4 << 20;
    let PrefixDigest { mut hasher, len: start } = prefix;
    let size = file.size()?;
    if size.saturating_sub(start) <= BUF as u64 {
        let mut buf = vec![0u8; size.saturating_sub(start) as usize];
        file.read_exact_at(&mut buf, start)?;
        hasher.update(&buf);
        return Ok(*hasher.finalize().as_bytes());
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
            hasher.update(&buf[..n]);
            let _ = free_tx.send(buf);
        }
        reader.join().expect("digest reader thread panicked")?;
        Ok(*hasher.finalize().as_bytes())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
