//! The in-place delta's redo journal (issue 14 item 2), shared by every volume that can write a committed file in
//! place ([`super::LocalVolume`], the simulated disk).
//!
//! A re-push that changes few chunks of a committed file does not copy the file into a new partial: the engine
//! writes to a [`Journaled`] partial, which keeps the committed file (the *base*) untouched and appends to a
//! journal file only what differs from the base at the same offset. Reads see the base overlaid with the journal,
//! so the engine's digest follower and the commit's whole-file digest check the new file before a byte of the base
//! is written. At commit the volume [`seal`]s the journal (a checksummed record, synced), [`apply`]s it to the base
//! (writes, length, mode and mtime, `fsync`), and only then removes it; after a crash a sealed journal is applied
//! again (rewriting the same bytes: idempotent), an unsealed one is still a resumable partial and the base was
//! never touched.
//!
//! Layout: a 64-byte header (magic, the base's device, inode, length and mtime, a checksum), then records of a
//! 48-byte head (tag, three numbers, a 16-byte BLAKE3 checksum over the head and the payload) and a payload.
//! `Data` (offset, length, bytes), `Meta` (mode and mtime), `Seal` (target length, how much of the base is kept).
//! A torn or damaged record ends the journal: it and everything after it are dropped (none of it was synced, so
//! the store recorded none of it as received).

use std::collections::BTreeMap;
use std::io;
use std::sync::Mutex;

use super::{ChangeStamp, FinalFile, Identity, Partial, PartialFile, ReadAt};
use crate::manifest::FileTime;

const MAGIC: &[u8; 8] = b"FERRYJ01";
const HEADER: u64 = 64;
const HEAD: usize = 48;
const TAG_DATA: u8 = 1;
const TAG_META: u8 = 2;
const TAG_SEAL: u8 = 3;
/// Largest data record: a chunk is at most this large (proto-spec.md §3 caps chunks far lower).
const MAX_RECORD: u64 = 64 * 1024 * 1024;

/// What a journal file says, as far as its records are whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Parsed {
    /// The base file the journal was written against.
    pub(crate) base: Identity,
    /// Overlay: start → (end, position of `start`'s byte in the journal).
    extents: BTreeMap<u64, (u64, u64)>,
    /// The last mode and mtime recorded.
    meta: Option<(u32, FileTime)>,
    /// Target length and kept base length, once sealed.
    pub(crate) seal: Option<(u64, u64)>,
    /// Where the whole records end.
    end: u64,
}

fn checksum(head: &[u8], payload: &[u8]) -> [u8; 16] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(head);
    hasher.update(payload);
    let mut out = [0; 16];
    out.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
    out
}

fn header(base: &Identity) -> [u8; HEADER as usize] {
    let mut h = [0u8; HEADER as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&base.dev.to_le_bytes());
    h[16..24].copy_from_slice(&base.ino.to_le_bytes());
    h[24..32].copy_from_slice(&base.len.to_le_bytes());
    h[32..40].copy_from_slice(&base.mtime.secs.to_le_bytes());
    h[40..44].copy_from_slice(&base.mtime.nanos.to_le_bytes());
    let sum = checksum(&h[..48], &[]);
    h[48..].copy_from_slice(&sum);
    h
}

fn num(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

fn record_head(tag: u8, a: u64, b: u64, c: u64, payload: &[u8]) -> [u8; HEAD] {
    let mut head = [0u8; HEAD];
    head[0] = tag;
    head[8..16].copy_from_slice(&a.to_le_bytes());
    head[16..24].copy_from_slice(&b.to_le_bytes());
    head[24..32].copy_from_slice(&c.to_le_bytes());
    let sum = checksum(&head[..32], payload);
    head[32..].copy_from_slice(&sum);
    head
}

impl Parsed {
    /// Reads a journal: its header (`None` if it is not one) and its whole records.
    pub(crate) fn read(file: &dyn ReadAt) -> io::Result<Option<Parsed>> {
        let size = file.size()?;
        let mut h = [0u8; HEADER as usize];
        if size < HEADER || file.read_exact_at(&mut h, 0).is_err() {
            return Ok(None);
        }
        if &h[..8] != MAGIC || checksum(&h[..48], &[]) != h[48..] {
            return Ok(None);
        }
        let base = Identity {
            dev: num(&h, 8),
            ino: num(&h, 16),
            len: num(&h, 24),
            mtime: FileTime {
                secs: num(&h, 32) as i64,
                nanos: u32::from_le_bytes(h[40..44].try_into().expect("4 bytes")),
            },
            is_file: true,
        };
        let mut parsed = Parsed {
            base,
            extents: BTreeMap::new(),
            meta: None,
            seal: None,
            end: HEADER,
        };
        let mut payload = Vec::new();
        let mut head = [0u8; HEAD];
        let mut at = HEADER;
        while at + HEAD as u64 <= size && parsed.seal.is_none() {
            file.read_exact_at(&mut head, at)?;
            let (a, b, c) = (num(&head, 8), num(&head, 16), num(&head, 24));
            let len = if head[0] == TAG_DATA { b } else { 0 };
            // Checked before it is allocated: a damaged length ends the journal.
            if len > MAX_RECORD || at + HEAD as u64 + len > size {
                break;
            }
            payload.resize(len as usize, 0);
            file.read_exact_at(&mut payload, at + HEAD as u64)?;
            if checksum(&head[..32], &payload) != head[32..] {
                break;
            }
            match head[0] {
                TAG_DATA => parsed.overlay(a, a + b, at + HEAD as u64),
                TAG_META => {
                    let mtime = FileTime {
                        secs: b as i64,
                        nanos: c as u32,
                    };
                    parsed.meta = Some((a as u32, mtime));
                }
                TAG_SEAL => parsed.seal = Some((a, b)),
                _ => break,
            }
            at += HEAD as u64 + len;
            parsed.end = at;
        }
        Ok(Some(parsed))
    }

    /// Records that `[start, end)` now reads from the journal at `pos`, over whatever covered it before.
    fn overlay(&mut self, start: u64, end: u64, pos: u64) {
        if start >= end {
            return;
        }
        let hit: Vec<(u64, (u64, u64))> = self
            .extents
            .range(..end)
            .rev()
            .take_while(|(_, &(e, _))| e > start)
            .map(|(&s, &v)| (s, v))
            .collect();
        for (s, (e, p)) in hit {
            self.extents.remove(&s);
            if s < start {
                self.extents.insert(s, (start, p));
            }
            if e > end {
                self.extents.insert(end, (e, p + (end - s)));
            }
        }
        self.extents.insert(start, (end, pos));
    }

    /// Whether any byte of `[start, end)` reads from the journal.
    fn covers_any(&self, start: u64, end: u64) -> bool {
        self.extents
            .range(..end)
            .next_back()
            .is_some_and(|(_, &(e, _))| e > start)
    }

    /// Reads the overlaid file (`base` below `kept`, zeros above it) into `buf` at `offset`, up to `len`.
    fn read_view(
        &self,
        journal: &dyn ReadAt,
        base: &dyn ReadAt,
        kept: u64,
        len: u64,
        buf: &mut [u8],
        offset: u64,
    ) -> io::Result<usize> {
        if offset >= len {
            return Ok(0);
        }
        let n = buf.len().min((len - offset) as usize);
        let mut at = offset;
        let stop = offset + n as u64;
        while at < stop {
            let out = &mut buf[(at - offset) as usize..n];
            // The extent holding `at`, or the next one after it.
            let holding = self.extents.range(..=at).next_back().filter(|(_, &(e, _))| e > at);
            if let Some((&s, &(e, p))) = holding {
                let take = (e.min(stop) - at) as usize;
                journal.read_exact_at(&mut out[..take], p + (at - s))?;
                at += take as u64;
                continue;
            }
            let next = self.extents.range(at..).next().map_or(stop, |(&s, _)| s.min(stop));
            let take = (next - at) as usize;
            let from_base = if at < kept { (kept.min(next) - at) as usize } else { 0 };
            base.read_exact_at(&mut out[..from_base], at)?;
            out[from_base..take].fill(0);
            at = next;
        }
        Ok(n)
    }
}

/// A partial that is the committed file overlaid with a journal of what changed (see the module docs).
pub(crate) struct Journaled {
    journal: Partial,
    base: Box<dyn FinalFile>,
    state: Mutex<State>,
}

struct State {
    parsed: Parsed,
    /// The file's length as the engine sees it.
    len: u64,
    /// Bytes of the base still visible (below every length the file was cut to).
    kept: u64,
}

impl Journaled {
    /// Starts a journal in the empty file `journal` over `base` (whose identity is `base_id`), for a file of
    /// `size` bytes.
    pub(crate) fn create(journal: Partial, base: Box<dyn FinalFile>, base_id: Identity, size: u64) -> io::Result<Self> {
        journal.set_len(0)?;
        journal.write_at(&header(&base_id), 0)?;
        let parsed = Parsed {
            base: base_id,
            extents: BTreeMap::new(),
            meta: None,
            seal: None,
            end: HEADER,
        };
        Ok(Self::with(journal, base, parsed, size))
    }

    /// Opens the journal `journal` over `base` for a file of `size` bytes, dropping a torn tail; `None` if it is
    /// not an unsealed journal of `base` as it is now.
    pub(crate) fn open(journal: Partial, base: Box<dyn FinalFile>, size: u64) -> io::Result<Option<Self>> {
        let Some(parsed) = Parsed::read(&*journal)? else {
            return Ok(None);
        };
        if parsed.seal.is_some() || !same_file(&parsed.base, &base.identity()?) {
            return Ok(None);
        }
        if journal.size()? > parsed.end {
            journal.set_len(parsed.end)?;
        }
        Ok(Some(Self::with(journal, base, parsed, size)))
    }

    fn with(journal: Partial, base: Box<dyn FinalFile>, parsed: Parsed, size: u64) -> Self {
        let kept = parsed.base.len.min(size);
        Journaled {
            journal,
            base,
            state: Mutex::new(State {
                parsed,
                len: size,
                kept,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn append(&self, state: &mut State, head: &[u8], payload: &[u8]) -> io::Result<u64> {
        let at = state.parsed.end;
        let mut record = Vec::with_capacity(head.len() + payload.len());
        record.extend_from_slice(head);
        record.extend_from_slice(payload);
        self.journal.write_at(&record, at)?;
        state.parsed.end = at + record.len() as u64;
        Ok(at + head.len() as u64)
    }
}

/// Same device, inode, length and mtime: the base has not changed since the journal was started.
pub(crate) fn same_file(a: &Identity, b: &Identity) -> bool {
    a.dev == b.dev && a.ino == b.ino && a.len == b.len && a.mtime == b.mtime && b.is_file
}

impl ReadAt for Journaled {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let state = self.state();
        state
            .parsed
            .read_view(&*self.journal, &*self.base, state.kept, state.len, buf, offset)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.state().len)
    }
}

impl PartialFile for Journaled {
    /// Appends `data` to the journal unless the base already holds exactly these bytes at `offset` (nothing in the
    /// journal covering them): an unchanged chunk costs a read, not a write.
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let mut state = self.state();
        let end = offset + data.len() as u64;
        if end <= state.kept && !state.parsed.covers_any(offset, end) {
            let mut held = vec![0; data.len()];
            if self.base.read_exact_at(&mut held, offset).is_ok() && held == data {
                return Ok(());
            }
        }
        let head = record_head(TAG_DATA, offset, data.len() as u64, 0, data);
        let pos = self.append(&mut state, &head, data)?;
        state.parsed.overlay(offset, end, pos);
        state.len = state.len.max(end);
        Ok(())
    }

    /// Below the kept base length and under no journaled extent: the base's own bytes.
    fn holds_unchanged(&self, offset: u64, len: u64) -> bool {
        let state = self.state();
        let end = offset.saturating_add(len);
        end <= state.kept && !state.parsed.covers_any(offset, end)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut state = self.state();
        state.len = len;
        state.kept = state.kept.min(len);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.journal.sync_data()
    }

    fn sync_all(&self) -> io::Result<()> {
        self.journal.sync_data()
    }

    fn set_metadata(&self, mode: u32, mtime: FileTime) -> io::Result<()> {
        let mut state = self.state();
        let head = record_head(
            TAG_META,
            u64::from(mode),
            mtime.secs as u64,
            u64::from(mtime.nanos),
            &[],
        );
        self.append(&mut state, &head, &[])?;
        state.parsed.meta = Some((mode, mtime));
        Ok(())
    }

    /// The identity the base will have once the journal is applied: its device and inode, the new length and the
    /// mtime set last.
    fn identity(&self) -> io::Result<Identity> {
        let state = self.state();
        Ok(Identity {
            len: state.len,
            mtime: state.parsed.meta.map_or(state.parsed.base.mtime, |(_, mtime)| mtime),
            ..state.parsed.base
        })
    }

    /// Not stamped: the view changes with the base and the journal together, so no digest state is recorded for
    /// it and a resume reads the view again.
    fn change_stamp(&self) -> io::Result<ChangeStamp> {
        Err(io::Error::other("an in-place partial has no change stamp"))
    }
}

/// Seals the journal read from `journal` (unless it already is) for a file of `target` bytes and makes it durable;
/// returns it. After this the journal is applied, whatever happens.
pub(crate) fn seal(journal: &dyn PartialFile, target: u64) -> io::Result<Parsed> {
    let mut parsed = Parsed::read(journal)?.ok_or_else(|| io::Error::other("not a journal"))?;
    if parsed.seal.is_none() {
        let kept = parsed.base.len.min(target);
        let head = record_head(TAG_SEAL, target, kept, 0, &[]);
        if journal.size()? > parsed.end {
            journal.set_len(parsed.end)?;
        }
        journal.write_at(&head, parsed.end)?;
        parsed.seal = Some((target, kept));
        parsed.end += HEAD as u64;
    }
    journal.sync_data()?;
    Ok(parsed)
}

/// Writes a sealed journal into `target` (the base, opened for writing): the kept length, every extent, the
/// length, mode and mtime, then `fsync`. Idempotent: after a crash in the middle it is simply run again.
/// `pause` runs between extents (a test hook: the e2e test kills the server in the middle of an apply).
pub(crate) fn apply(
    parsed: &Parsed,
    journal: &dyn ReadAt,
    target: &dyn PartialFile,
    pause: &dyn Fn(),
) -> io::Result<()> {
    let Some((len, kept)) = parsed.seal else {
        return Err(io::Error::other("the journal is not sealed"));
    };
    if target.size()? > kept {
        target.set_len(kept)?;
    }
    let mut buf = Vec::new();
    for (&start, &(end, pos)) in parsed.extents.range(..len) {
        let end = end.min(len);
        buf.resize((end - start) as usize, 0);
        journal.read_exact_at(&mut buf, pos)?;
        target.write_at(&buf, start)?;
        pause();
    }
    target.set_len(len)?;
    if let Some((mode, mtime)) = parsed.meta {
        target.set_metadata(mode, mtime)?;
    }
    target.sync_all()
}

/// Bytes the journal holds for the file (what the apply writes).
pub(crate) fn journaled_bytes(parsed: &Parsed) -> u64 {
    parsed.extents.iter().map(|(s, (e, _))| e - s).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn file_with(bytes: &[u8]) -> std::fs::File {
        use std::io::Write;
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    fn id_of(f: &std::fs::File) -> Identity {
        PartialFile::identity(f).unwrap()
    }

    /// The view is the base overlaid with the writes (unchanged bytes not journaled); the apply makes the base
    /// that view; a torn tail is dropped at reopen.
    #[test]
    fn the_view_is_what_the_apply_writes() {
        let old: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut new = old.clone();
        new[3000..3100].fill(7);
        new.truncate(9000);
        new.extend_from_slice(&[9; 500]);
        let base = file_with(&old);
        let base_id = id_of(&base);
        let journal: Partial = Arc::new(tempfile::tempfile().unwrap());
        let view = Journaled::create(
            journal.clone(),
            Box::new(base.try_clone().unwrap()),
            base_id,
            new.len() as u64,
        )
        .unwrap();
        for at in (0..new.len()).step_by(1000) {
            view.write_at(&new[at..(at + 1000).min(new.len())], at as u64).unwrap();
        }
        view.set_metadata(0o640, FileTime { secs: 5, nanos: 6 }).unwrap();
        let mut seen = vec![0; new.len()];
        view.read_exact_at(&mut seen, 0).unwrap();
        assert_eq!(seen, new);
        let parsed = Parsed::read(&*journal).unwrap().unwrap();
        assert_eq!(
            journaled_bytes(&parsed),
            1000 + 500,
            "only the changed kilobyte and the new tail"
        );
        // A torn record at the end is dropped.
        let whole = journal.size().unwrap();
        journal.write_at(&[1, 2, 3], whole).unwrap();
        let reopened = Journaled::open(journal.clone(), Box::new(base.try_clone().unwrap()), new.len() as u64)
            .unwrap()
            .unwrap();
        assert_eq!(journal.size().unwrap(), whole);
        reopened.read_exact_at(&mut seen, 0).unwrap();
        assert_eq!(seen, new);
        let sealed = seal(&*journal, new.len() as u64).unwrap();
        assert!(
            Journaled::open(journal.clone(), Box::new(base.try_clone().unwrap()), 1)
                .unwrap()
                .is_none(),
            "sealed"
        );
        for _ in 0..2 {
            apply(&sealed, &*journal, &base, &|| {}).unwrap();
            let mut out = vec![0; new.len()];
            base.read_exact_at(&mut out, 0).unwrap();
            assert_eq!(out, new);
            assert_eq!(base.metadata().unwrap().len(), new.len() as u64);
        }
    }

    /// Overlapping writes: the later one wins, the earlier one is split around it.
    #[test]
    fn later_writes_win() {
        let mut parsed = Parsed {
            base: Identity {
                dev: 0,
                ino: 0,
                len: 0,
                mtime: FileTime::default(),
                is_file: true,
            },
            extents: BTreeMap::new(),
            meta: None,
            seal: None,
            end: HEADER,
        };
        parsed.overlay(0, 100, 1000);
        parsed.overlay(40, 60, 5000);
        let got: Vec<_> = parsed.extents.iter().map(|(&s, &(e, p))| (s, e, p)).collect();
        assert_eq!(got, vec![(0, 40, 1000), (40, 60, 5000), (60, 100, 1060)]);
        parsed.overlay(30, 70, 9000);
        let got: Vec<_> = parsed.extents.iter().map(|(&s, &(e, p))| (s, e, p)).collect();
        assert_eq!(got, vec![(0, 30, 1000), (30, 70, 9000), (70, 100, 1070)]);
    }
}
