//! `SimVolume`: a simulated disk for power-loss tests (compiled for tests only).
//!
//! The crash model (docs/storage.md, "SimVolume's crash model"), the conservative reading of Linux on ext4:
//! - A file has durable bytes, length and metadata (mode, mtime), and the writes made since its last sync, in
//!   order. [`PartialFile::sync_data`] makes its bytes and length durable, [`PartialFile::sync_all`] also its mode
//!   and mtime. Nothing else does: no background writeback is assumed.
//! - Names (create, rename, and the replacement of the file a rename lands on) are journaled metadata: they become
//!   durable in the order they were made, all up to and including the last one touching a directory when that
//!   directory is synced ([`Directory::sync`]), and all up to and including a file's own create when that file is
//!   synced (ext4 commits the journal transaction holding the new name with the file's `fsync`). Data is not
//!   ordered with names: a rename can survive while the renamed file's unsynced bytes do not.
//! - At the crash: every unsynced write is dropped, kept, or torn (a random multiple of 512 bytes of it kept), each
//!   independently; an unsynced length change or metadata change is dropped or kept; a random prefix of the
//!   unsynced name operations survives (the journal). Files no surviving name refers to are gone.
//! - From the crash point on, every operation fails with an I/O error until [`SimVolume::reboot`]; handles opened
//!   before it fail for good, as after a real reboot.
//! - Parent directories are taken to exist and be durable; partials live in `partial/`, files under `root/`.
//!
//! Every mutating operation (create, write, length change, metadata change, sync, rename, directory sync) counts;
//! [`SimVolume::crash_at`] makes operation number N fail and crash the volume, so a test can stop the engine at
//! any point. Reads do not count: the engine's digest thread reads concurrently, and the count of what the engine
//! does must not depend on it.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use super::journal::{self, Journaled, Parsed};
use super::local::{journal_beside, partial_file_name};
use super::syncer::{LazySyncer, Syncer};
use super::{
    ChangeStamp, Directory, FinalFile, Identity, Partial, PartialFile, PendingSync, ReadAt, StorageError, Volume,
};
use crate::manifest::{ChunkEntry, Chunking, FileTime, Hash};
use crate::path::RemotePath;

/// A simulated disk shared by the engine and the test (clones share it).
#[derive(Clone, Default)]
pub(crate) struct SimVolume {
    disk: Arc<Mutex<Disk>>,
}

impl std::fmt::Debug for SimVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let disk = self.lock();
        write!(f, "SimVolume {{ ops: {}, crashed: {} }}", disk.ops, disk.crashed)
    }
}

/// A file's mode and mtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Meta {
    /// Permission bits.
    pub(crate) mode: u32,
    /// Modification time.
    pub(crate) mtime: FileTime,
}

/// An unsynced change to a file's bytes or length.
#[derive(Clone, Debug)]
enum Pending {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Default)]
struct SimFile {
    /// What a crash keeps for sure.
    durable: Vec<u8>,
    durable_meta: Option<Meta>,
    /// What reads see now: `durable` with `pending` applied.
    data: Vec<u8>,
    meta: Option<Meta>,
    pending: Vec<Pending>,
    /// Changes made to the file so far: its change time.
    changes: u64,
}

/// An unsynced change to the names.
#[derive(Clone, Debug)]
enum NameOp {
    Create { name: String, ino: u64 },
    Rename { from: String, to: String, ino: u64 },
    Remove { name: String },
}

impl NameOp {
    fn touches(&self, dir: &str) -> bool {
        match self {
            NameOp::Create { name, .. } => parent(name) == dir,
            NameOp::Rename { from, to, .. } => parent(from) == dir || parent(to) == dir,
            NameOp::Remove { name } => parent(name) == dir,
        }
    }

    fn apply(&self, names: &mut BTreeMap<String, u64>) {
        match self {
            NameOp::Create { name, ino } => {
                names.insert(name.clone(), *ino);
            }
            NameOp::Rename { from, to, ino } => {
                names.remove(from);
                names.insert(to.clone(), *ino);
            }
            NameOp::Remove { name } => {
                names.remove(name);
            }
        }
    }
}

fn parent(name: &str) -> &str {
    name.rfind('/').map_or("", |at| &name[..at])
}

#[derive(Default)]
struct Disk {
    /// Writebacks started ([`PartialFile::start_writeback`]): hints, not operations.
    writeback_hints: u64,
    files: HashMap<u64, SimFile>,
    next_ino: u64,
    durable_names: BTreeMap<String, u64>,
    names: BTreeMap<String, u64>,
    pending_names: Vec<NameOp>,
    /// Mutating operations so far, and the one that crashes the volume.
    ops: u64,
    crash_at: Option<u64>,
    crashed: bool,
    /// Incremented by each reboot; handles from an earlier boot fail.
    boot: u64,
    /// What the crashing operation was.
    crashed_in: Option<&'static str>,
    /// Set by [`SimVolume::slow_syncs`]: how long a started sync takes on its thread.
    slow_sync: Option<std::time::Duration>,
    /// Slow syncs asked for ([`PartialFile::start_sync`]), and how many of those the syncs that ended covered at
    /// most (what was asked before each began): while fewer are covered than asked, a sync is outstanding.
    sync_requests: u64,
    sync_requests_covered: u64,
    /// Writes made while a slow sync was outstanding.
    writes_while_syncing: u64,
}

fn eio(what: &str) -> io::Error {
    io::Error::other(format!("simulated power loss ({what})"))
}

impl Disk {
    /// Fails unless the volume runs and `boot` is the current boot.
    fn alive(&self, boot: u64) -> io::Result<()> {
        if self.crashed || boot != self.boot {
            return Err(eio("the volume is down"));
        }
        Ok(())
    }

    /// Counts one mutating operation; the armed one crashes the volume instead of happening.
    fn tick(&mut self, boot: u64, what: &'static str) -> io::Result<()> {
        self.alive(boot)?;
        self.ops += 1;
        if self.crash_at.is_some_and(|at| self.ops >= at) {
            self.crashed = true;
            self.crashed_in = Some(what);
            return Err(eio(what));
        }
        Ok(())
    }

    fn file(&mut self, ino: u64) -> &mut SimFile {
        self.files.entry(ino).or_default()
    }

    /// Makes the name operations `..=last` durable.
    fn commit_names(&mut self, through: usize) {
        for op in self.pending_names.drain(..=through) {
            op.apply(&mut self.durable_names);
        }
    }

    /// Makes every name operation up to the last one touching `dir` durable.
    fn sync_dir(&mut self, dir: &str) {
        if let Some(last) = self.pending_names.iter().rposition(|op| op.touches(dir)) {
            self.commit_names(last);
        }
    }

    /// Syncs file `ino`: its bytes and length, its metadata if `all`, and its name if it is still being created.
    fn sync_file(&mut self, ino: u64, all: bool) {
        let create = self
            .pending_names
            .iter()
            .position(|op| matches!(op, NameOp::Create { ino: i, .. } if *i == ino));
        if let Some(at) = create {
            self.commit_names(at);
        }
        let file = self.file(ino);
        for change in std::mem::take(&mut file.pending) {
            apply(&mut file.durable, &change, usize::MAX);
        }
        if all {
            file.durable_meta = file.meta;
        }
    }

    fn lose_power(&mut self, rng: &mut SimRng) {
        self.crashed = true;
        let kept = rng.gen_range(0..=self.pending_names.len());
        if kept > 0 {
            self.commit_names(kept - 1);
        }
        self.pending_names.clear();
        self.names = self.durable_names.clone();
        let live: std::collections::HashSet<u64> = self.names.values().copied().collect();
        self.files.retain(|ino, _| live.contains(ino));
        for file in self.files.values_mut() {
            for change in std::mem::take(&mut file.pending) {
                let keep = match (&change, rng.gen_range(0..3)) {
                    (_, 0) => 0,
                    (Pending::Write { data, .. }, 2) => rng.gen_range(0..=data.len() / 512) * 512,
                    _ => usize::MAX,
                };
                if keep > 0 {
                    apply(&mut file.durable, &change, keep);
                }
            }
            if rng.gen_bool(0.5) {
                file.durable_meta = file.meta;
            }
            file.data = file.durable.clone();
            file.meta = file.durable_meta;
        }
    }
}

/// Applies `change` to `bytes`, of a write only its first `keep` bytes.
fn apply(bytes: &mut Vec<u8>, change: &Pending, keep: usize) {
    match change {
        Pending::Write { offset, data } => {
            let data = &data[..keep.min(data.len())];
            let end = *offset as usize + data.len();
            if bytes.len() < end {
                bytes.resize(end, 0);
            }
            bytes[*offset as usize..end].copy_from_slice(data);
        }
        Pending::SetLen(len) => bytes.resize(*len as usize, 0),
    }
}

const PARTIAL_DIR: &str = "partial";
const ROOT: &str = "root";

impl SimVolume {
    fn lock(&self) -> MutexGuard<'_, Disk> {
        self.disk.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes mutating operation number `op` (counted from the start) fail and crash the volume.
    pub(crate) fn crash_at(&self, op: u64) {
        self.lock().crash_at = Some(op);
    }

    /// Mutating operations so far.
    pub(crate) fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// Makes [`PartialFile::start_sync`] return at once and sync on a thread `delay` later (as the local volume's
    /// sync thread does, only slower): the bytes are durable only then.
    pub(crate) fn slow_syncs(&self, delay: std::time::Duration) {
        self.lock().slow_sync = Some(delay);
    }

    /// Writes (and length changes) made between a slow sync's request ([`SimVolume::slow_syncs`]) and the end of
    /// the sync that covers it. Never more than were really made then: a request that came just as a sync began
    /// may be counted as covered by it.
    pub(crate) fn writes_while_syncing(&self) -> u64 {
        self.lock().writes_while_syncing
    }

    /// The durable bytes of the partial of `key` now: what a crash would keep for sure.
    pub(crate) fn durable_partial(&self, key: &str) -> Option<Vec<u8>> {
        let disk = self.lock();
        let ino = disk.names.get(&partial_name(key))?;
        Some(disk.files.get(ino)?.durable.clone())
    }

    /// Writebacks started so far ([`PartialFile::start_writeback`]).
    pub(crate) fn writeback_hints(&self) -> u64 {
        self.lock().writeback_hints
    }

    /// What the crashing operation was, if the armed crash happened.
    pub(crate) fn crashed_in(&self) -> Option<&'static str> {
        self.lock().crashed_in
    }

    /// Loses power now (if the armed crash did not already stop the volume): every unsynced change is dropped,
    /// kept or torn as the module docs say.
    pub(crate) fn crash(&self, rng: &mut SimRng) {
        self.lock().lose_power(rng);
    }

    /// Starts the volume again with what survived; handles from before fail.
    pub(crate) fn reboot(&self) {
        let mut disk = self.lock();
        disk.crashed = false;
        disk.crash_at = None;
        disk.boot += 1;
    }

    /// The bytes and metadata at the final name `path` now.
    pub(crate) fn final_file(&self, path: &str) -> Option<(Vec<u8>, Option<Meta>)> {
        let disk = self.lock();
        let ino = disk.names.get(&format!("{ROOT}/{path}"))?;
        let file = disk.files.get(ino)?;
        Some((file.data.clone(), file.meta))
    }

    /// The bytes of the partial of `key` now: of an in-place partial, the first `size` bytes of the committed
    /// file overlaid with its journal (if the journal still matches the file).
    pub(crate) fn partial(&self, key: &str, size: u64) -> Option<Vec<u8>> {
        let disk = self.lock();
        if let Some(ino) = disk.names.get(&partial_name(key)) {
            return Some(disk.files.get(ino)?.data.clone());
        }
        let ino = *disk.names.get(&journal_name(key))?;
        drop(disk);
        let journal: Partial = Arc::new(self.handle(ino).ok()?);
        let base = self.final_handle(&RemotePath::parse(key).ok()?)?;
        let view = Journaled::open(journal, Box::new(base), size).ok()??;
        let mut bytes = vec![0; size as usize];
        view.read_exact_at(&mut bytes, 0).ok()?;
        Some(bytes)
    }

    /// Whether an in-place journal of `key` exists.
    pub(crate) fn has_journal(&self, key: &str) -> bool {
        self.lock().names.contains_key(&journal_name(key))
    }

    fn handle(&self, ino: u64) -> io::Result<SimHandle> {
        let disk = self.lock();
        disk.alive(disk.boot)?;
        Ok(SimHandle {
            disk: self.disk.clone(),
            ino,
            boot: disk.boot,
            syncer: LazySyncer::default(),
        })
    }

    /// Creates the empty file `name` (counted as `what`).
    fn create(&self, name: String, what: &'static str) -> io::Result<SimHandle> {
        let mut disk = self.lock();
        let boot = disk.boot;
        disk.tick(boot, what)?;
        disk.next_ino += 1;
        let ino = disk.next_ino;
        let meta = Some(Meta {
            mode: 0o600,
            mtime: FileTime {
                secs: 1_000_000 + ino as i64,
                nanos: 0,
            },
        });
        let file = SimFile {
            meta,
            durable_meta: meta,
            ..SimFile::default()
        };
        disk.files.insert(ino, file);
        disk.names.insert(name.clone(), ino);
        disk.pending_names.push(NameOp::Create { name, ino });
        drop(disk);
        self.handle(ino)
    }

    /// Removes the name `name` if it is there (counted as `what`).
    fn remove(&self, name: String, what: &'static str) -> io::Result<()> {
        let mut disk = self.lock();
        let boot = disk.boot;
        if disk.names.contains_key(&name) {
            disk.tick(boot, what)?;
            disk.names.remove(&name);
            disk.pending_names.push(NameOp::Remove { name });
        }
        Ok(())
    }

    /// The journal of `key` and its parsed records, if there is one.
    fn journal(&self, key: &str) -> io::Result<Option<(SimHandle, Option<Parsed>)>> {
        let Some(ino) = self.lock().names.get(&journal_name(key)).copied() else {
            return Ok(None);
        };
        let handle = self.handle(ino)?;
        let parsed = Parsed::read(&handle)?;
        Ok(Some((handle, parsed)))
    }

    /// The simulated counterpart of `LocalVolume::apply_journal`.
    fn apply_journal(
        &self,
        key: &str,
        path: &RemotePath,
        verified: Option<&Identity>,
    ) -> Result<Option<Identity>, StorageError> {
        let Some((journal, parsed)) = self.journal(key)? else {
            return Ok(None);
        };
        let replaced = || StorageError::Replaced(path.to_string());
        let Some(parsed) = parsed else {
            // Not even its header survived: nothing was applied from it.
            self.remove(journal_name(key), "remove the journal")?;
            return match verified {
                Some(_) => Err(replaced()),
                None => Ok(None),
            };
        };
        let target = self.final_handle(path).ok_or_else(replaced)?;
        let now = PartialFile::identity(&target)?;
        let same_inode = now.ino == parsed.base.ino;
        let parsed = match verified {
            Some(verified) => {
                let unchanged = parsed.seal.is_some() || journal::same_file(&parsed.base, &now);
                if !same_inode || !unchanged || verified.ino != now.ino {
                    return Err(replaced());
                }
                journal::seal(&journal, verified.len)?
            }
            None if parsed.seal.is_none() => return Ok(None),
            None if !same_inode => {
                self.remove(journal_name(key), "remove the journal")?;
                return Ok(None);
            }
            None => parsed,
        };
        journal::apply(&parsed, &journal, &target, &|| {})?;
        let applied = PartialFile::identity(&target)?;
        self.remove(journal_name(key), "remove the journal")?;
        let dir = SimDir {
            disk: self.disk.clone(),
            dir: PARTIAL_DIR.to_string(),
            boot: journal.boot,
        };
        dir.sync()?;
        Ok(Some(applied))
    }
}

fn partial_name(key: &str) -> String {
    format!("{PARTIAL_DIR}/{}", partial_file_name(key))
}

fn journal_name(key: &str) -> String {
    let name = journal_beside(std::path::Path::new(&partial_file_name(key)));
    format!("{PARTIAL_DIR}/{}", name.display())
}

fn final_name(path: &RemotePath) -> String {
    format!("{ROOT}/{}", path.as_str())
}

impl Volume for SimVolume {
    fn prepare_destination(&self, _path: &RemotePath) -> Result<(), StorageError> {
        let disk = self.lock();
        Ok(disk.alive(disk.boot)?)
    }

    fn partial_location(&self, key: &str) -> String {
        format!("sim:{}", partial_name(key))
    }

    fn partial_len(&self, key: &str) -> Result<Option<u64>, StorageError> {
        let disk = self.lock();
        disk.alive(disk.boot)?;
        let len = disk
            .names
            .get(&partial_name(key))
            .map(|ino| disk.files[ino].data.len() as u64);
        drop(disk);
        if len.is_some() {
            return Ok(len);
        }
        let Some((journal, parsed)) = self.journal(key)? else {
            return Ok(None);
        };
        let base = RemotePath::parse(key).ok().and_then(|p| self.stat_final(&p));
        let current = parsed
            .zip(base)
            .is_some_and(|(parsed, base)| parsed.seal.is_none() && journal::same_file(&parsed.base, &base));
        if current {
            return Ok(Some(journal.size()?));
        }
        self.remove(journal_name(key), "remove the journal")?;
        Ok(None)
    }

    fn writes_in_place(&self, _path: &RemotePath) -> bool {
        true
    }

    fn open_in_place(&self, key: &str, path: &RemotePath, size: u64) -> Result<Option<Partial>, StorageError> {
        let Some(base) = self.final_handle(path).filter(|_| path.as_str() == key) else {
            return Ok(None);
        };
        let base_id = PartialFile::identity(&base)?;
        self.remove(journal_name(key), "remove the journal")?;
        let journal = self.create(journal_name(key), "create the journal")?;
        let journaled = Journaled::create(Arc::new(journal), Box::new(base), base_id, size)?;
        Ok(Some(Arc::new(journaled)))
    }

    fn recover(&self, key: &str, path: &RemotePath) -> Result<Option<Identity>, StorageError> {
        if self.lock().names.contains_key(&partial_name(key)) {
            return Ok(None);
        }
        self.apply_journal(key, path, None)
    }

    fn open_partial(&self, key: &str, size: u64, exists: bool) -> Result<Partial, StorageError> {
        let in_place = exists && !self.lock().names.contains_key(&partial_name(key));
        if in_place {
            let journal = self.journal(key)?.map(|(handle, _)| handle);
            let base = RemotePath::parse(key).ok().and_then(|p| self.final_handle(&p));
            let opened = match (journal, base) {
                (Some(journal), Some(base)) => Journaled::open(Arc::new(journal), Box::new(base), size)?,
                _ => None,
            };
            let gone = || StorageError::At {
                path: key.to_string(),
                source: io::ErrorKind::NotFound.into(),
            };
            return Ok(Arc::new(opened.ok_or_else(gone)?));
        }
        if !exists {
            self.remove(journal_name(key), "remove the journal")?;
        }
        let mut disk = self.lock();
        let boot = disk.boot;
        let name = partial_name(key);
        let ino = match (disk.names.get(&name).copied(), exists) {
            (Some(ino), true) => {
                disk.alive(boot)?;
                ino
            }
            (found, _) => {
                disk.tick(boot, "create the partial")?;
                if found.is_some() || exists {
                    let kind = if exists {
                        io::ErrorKind::NotFound
                    } else {
                        io::ErrorKind::AlreadyExists
                    };
                    return Err(StorageError::At {
                        path: key.to_string(),
                        source: kind.into(),
                    });
                }
                disk.next_ino += 1;
                let ino = disk.next_ino;
                let meta = Some(Meta {
                    mode: 0o600,
                    mtime: FileTime {
                        secs: 1_000_000 + ino as i64,
                        nanos: 0,
                    },
                });
                disk.files.insert(
                    ino,
                    SimFile {
                        meta,
                        durable_meta: meta,
                        ..SimFile::default()
                    },
                );
                disk.names.insert(name.clone(), ino);
                disk.pending_names.push(NameOp::Create { name, ino });
                ino
            }
        };
        drop(disk);
        let partial = SimHandle {
            disk: self.disk.clone(),
            ino,
            boot,
            syncer: LazySyncer::default(),
        };
        if partial.size()? > size {
            PartialFile::set_len(&partial, size)?;
        }
        Ok(Arc::new(partial))
    }

    fn place(&self, key: &str, path: &RemotePath, verified: &Identity) -> Result<Box<dyn Directory>, StorageError> {
        if !self.lock().names.contains_key(&partial_name(key))
            && self.apply_journal(key, path, Some(verified))?.is_some()
        {
            return Ok(Box::new(SimDir {
                disk: self.disk.clone(),
                dir: parent(&final_name(path)).to_string(),
                boot: self.lock().boot,
            }));
        }
        let mut disk = self.lock();
        let boot = disk.boot;
        disk.tick(boot, "rename the partial into place")?;
        let from = partial_name(key);
        if disk.names.get(&from) != Some(&verified.ino) {
            return Err(StorageError::Replaced(path.to_string()));
        }
        let to = final_name(path);
        let op = NameOp::Rename {
            from,
            to: to.clone(),
            ino: verified.ino,
        };
        op.apply(&mut disk.names);
        disk.pending_names.push(op);
        Ok(Box::new(SimDir {
            disk: self.disk.clone(),
            dir: parent(&to).to_string(),
            boot,
        }))
    }

    fn stat_final(&self, path: &RemotePath) -> Option<Identity> {
        let handle = self.final_handle(path)?;
        PartialFile::identity(&handle).ok()
    }

    fn open_final(&self, path: &RemotePath) -> Option<Box<dyn FinalFile>> {
        Some(Box::new(self.final_handle(path)?))
    }
}

impl SimVolume {
    fn final_handle(&self, path: &RemotePath) -> Option<SimHandle> {
        let disk = self.lock();
        disk.alive(disk.boot).ok()?;
        let ino = *disk.names.get(&final_name(path))?;
        Some(SimHandle {
            disk: self.disk.clone(),
            ino,
            boot: disk.boot,
            syncer: LazySyncer::default(),
        })
    }
}

/// An open file of the simulated disk.
struct SimHandle {
    disk: Arc<Mutex<Disk>>,
    ino: u64,
    boot: u64,
    /// The sync thread of [`SimVolume::slow_syncs`], started with the first sync.
    syncer: LazySyncer,
}

impl SimHandle {
    fn lock(&self) -> MutexGuard<'_, Disk> {
        self.disk.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records an unsynced change after counting it.
    fn change(&self, what: &'static str, change: Pending) -> io::Result<()> {
        let mut disk = self.lock();
        disk.tick(self.boot, what)?;
        if disk.sync_requests > disk.sync_requests_covered {
            disk.writes_while_syncing += 1;
        }
        let file = disk.file(self.ino);
        apply(&mut file.data, &change, usize::MAX);
        file.pending.push(change);
        file.changes += 1;
        Ok(())
    }
}

impl ReadAt for SimHandle {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut disk = self.lock();
        disk.alive(self.boot)?;
        let data = &disk.file(self.ino).data;
        let start = (offset as usize).min(data.len());
        let n = buf.len().min(data.len() - start);
        buf[..n].copy_from_slice(&data[start..start + n]);
        Ok(n)
    }

    fn size(&self) -> io::Result<u64> {
        let mut disk = self.lock();
        disk.alive(self.boot)?;
        Ok(disk.file(self.ino).data.len() as u64)
    }
}

impl PartialFile for SimHandle {
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let change = Pending::Write {
            offset,
            data: data.to_vec(),
        };
        self.change("write", change)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.change("set the length", Pending::SetLen(len))
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut disk = self.lock();
        disk.tick(self.boot, "fdatasync")?;
        disk.sync_file(self.ino, false);
        Ok(())
    }

    /// With [`SimVolume::slow_syncs`]: on the handle's sync thread, after the delay; else here.
    fn start_sync(&self) -> io::Result<PendingSync> {
        let Some(delay) = self.lock().slow_sync else {
            return Ok(PendingSync::finished(self.sync_data()));
        };
        let spawn = || {
            let (disk, ino, boot) = (self.disk.clone(), self.ino, self.boot);
            let sync = move || {
                let asked = disk.lock().unwrap_or_else(|e| e.into_inner()).sync_requests;
                std::thread::sleep(delay);
                let mut disk = disk.lock().unwrap_or_else(|e| e.into_inner());
                disk.sync_requests_covered = disk.sync_requests_covered.max(asked);
                disk.tick(boot, "fdatasync")?;
                disk.sync_file(ino, false);
                Ok(())
            };
            Syncer::spawn(sync).ok()
        };
        self.lock().sync_requests += 1;
        let here = || {
            let synced = self.sync_data();
            let mut disk = self.lock();
            disk.sync_requests_covered = disk.sync_requests;
            synced
        };
        Ok(self.syncer.start(spawn, here))
    }

    /// Counted, not a mutating operation, and no change to what a crash keeps: unsynced writes are already
    /// dropped, kept or torn at random, whatever writeback started.
    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut disk = self.lock();
        disk.alive(self.boot)?;
        let _ = (offset, len);
        disk.writeback_hints += 1;
        Ok(())
    }

    fn sync_all(&self) -> io::Result<()> {
        let mut disk = self.lock();
        disk.tick(self.boot, "fsync")?;
        disk.sync_file(self.ino, true);
        Ok(())
    }

    fn set_metadata(&self, mode: u32, mtime: FileTime) -> io::Result<()> {
        let mut disk = self.lock();
        disk.tick(self.boot, "set mode and mtime")?;
        let file = disk.file(self.ino);
        file.meta = Some(Meta {
            mode: mode & 0o777,
            mtime,
        });
        file.changes += 1;
        Ok(())
    }

    fn change_stamp(&self) -> io::Result<ChangeStamp> {
        let mut disk = self.lock();
        disk.alive(self.boot)?;
        let file = disk.file(self.ino);
        let mtime = file.meta.map(|m| m.mtime).unwrap_or_default();
        Ok(ChangeStamp {
            dev: 1,
            ino: self.ino,
            size: file.data.len() as u64,
            mtime_ns: i128::from(mtime.secs) * 1_000_000_000 + i128::from(mtime.nanos),
            ctime_ns: i128::from(file.changes),
        })
    }

    fn identity(&self) -> io::Result<Identity> {
        let mut disk = self.lock();
        disk.alive(self.boot)?;
        let file = disk.file(self.ino);
        Ok(Identity {
            dev: 1,
            ino: self.ino,
            len: file.data.len() as u64,
            mtime: file.meta.map(|m| m.mtime).unwrap_or_default(),
            is_file: true,
        })
    }
}

impl FinalFile for SimHandle {
    fn identity(&self) -> io::Result<Identity> {
        PartialFile::identity(self)
    }

    fn change_stamp(&self) -> io::Result<ChangeStamp> {
        PartialFile::change_stamp(self)
    }

    /// Cuts a copy of the bytes in a real temporary file, with the same chunker the local volume uses.
    fn cut(&self, size: u64, chunking: Chunking, keep: &dyn Fn(&Hash) -> bool) -> io::Result<Vec<ChunkEntry>> {
        use std::io::Write;
        let mut bytes = vec![0; self.size()? as usize];
        self.read_exact_at(&mut bytes, 0)?;
        let mut copy = tempfile::tempfile()?;
        copy.write_all(&bytes)?;
        crate::chunk::chunk_with(&copy, size, chunking, keep)
    }
}

/// A directory of the simulated disk, to sync after a rename.
struct SimDir {
    disk: Arc<Mutex<Disk>>,
    dir: String,
    boot: u64,
}

impl Directory for SimDir {
    fn sync(&self) -> io::Result<()> {
        let mut disk = self.disk.lock().unwrap_or_else(|e| e.into_inner());
        disk.tick(self.boot, "fsync the directory")?;
        disk.sync_dir(&self.dir);
        Ok(())
    }
}

/// A small seeded generator (SplitMix64) for the simulation: the same seed gives the same crash, on every machine.
pub(crate) struct SimRng(u64);

impl SimRng {
    /// A generator whose whole sequence follows from `seed`.
    pub(crate) fn seed_from_u64(seed: u64) -> SimRng {
        SimRng(seed)
    }

    /// The next 64 random bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `bound` (which is at least 1), without modulo bias worth speaking of for test sizes.
    fn below(&mut self, bound: u64) -> u64 {
        ((self.next_u64() as u128 * bound as u128) >> 64) as u64
    }

    /// A value in `range` (`a..b` or `a..=b`, not empty).
    pub(crate) fn gen_range<T, R: SimRange<T>>(&mut self, range: R) -> T {
        range.pick(self)
    }

    /// True with probability `p`.
    pub(crate) fn gen_bool(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    /// True with probability `numerator / denominator`.
    pub(crate) fn gen_ratio(&mut self, numerator: u32, denominator: u32) -> bool {
        self.below(u64::from(denominator)) < u64::from(numerator)
    }

    /// Fills `buf` with random bytes.
    pub(crate) fn fill(&mut self, buf: &mut [u8]) {
        for piece in buf.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            piece.copy_from_slice(&bytes[..piece.len()]);
        }
    }
}

/// A range [`SimRng::gen_range`] can pick from.
pub(crate) trait SimRange<T> {
    /// One value of the range.
    fn pick(self, rng: &mut SimRng) -> T;
}

/// An integer type [`SimRng::gen_range`] can pick.
pub(crate) trait SimInt: Copy + PartialOrd {
    /// The value as 64 bits (two's complement for negative ones, so differences wrap right).
    fn bits(self) -> u64;
    /// The value back from 64 bits.
    fn from_bits(bits: u64) -> Self;
}

macro_rules! sim_ints {
    ($($t:ty),*) => {$(
        impl SimInt for $t {
            fn bits(self) -> u64 {
                self as u64
            }
            fn from_bits(bits: u64) -> Self {
                bits as $t
            }
        }
    )*};
}
sim_ints!(usize, u64, u32, i32);

impl<T: SimInt> SimRange<T> for std::ops::Range<T> {
    fn pick(self, rng: &mut SimRng) -> T {
        assert!(self.start < self.end, "empty range");
        let span = self.end.bits().wrapping_sub(self.start.bits());
        T::from_bits(self.start.bits().wrapping_add(rng.below(span)))
    }
}

impl<T: SimInt> SimRange<T> for std::ops::RangeInclusive<T> {
    fn pick(self, rng: &mut SimRng) -> T {
        let (start, end) = self.into_inner();
        assert!(start <= end, "empty range");
        let span = end.bits().wrapping_sub(start.bits());
        let offset = if span == u64::MAX {
            rng.next_u64()
        } else {
            rng.below(span + 1)
        };
        T::from_bits(start.bits().wrapping_add(offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(p: &str) -> RemotePath {
        RemotePath::parse(p).unwrap()
    }

    /// The model's rules, one by one: synced bytes survive every crash, unsynced ones may not; a created file's
    /// name survives with its sync; a rename survives only with its directory's sync; a crashed volume refuses
    /// everything until rebooted, and old handles stay dead.
    #[test]
    fn only_what_was_synced_is_sure_to_survive() {
        let mut lost_unsynced = false;
        for seed in 0..64 {
            let mut rng = SimRng::seed_from_u64(seed);
            let volume = SimVolume::default();
            let partial = volume.open_partial("a", 0, false).unwrap();
            partial.write_at(&[1; 1024], 0).unwrap();
            partial.sync_data().unwrap();
            partial.write_at(&[2; 1024], 1024).unwrap();
            volume.crash(&mut rng);
            assert!(partial.write_at(&[3], 0).is_err(), "a crashed volume refuses writes");
            volume.reboot();
            assert!(partial.size().is_err(), "a handle from before the crash is dead");
            let survived = volume.partial("a", 0).expect("the sync made the new name durable");
            assert_eq!(&survived[..1024], &[1; 1024][..], "seed {seed}");
            lost_unsynced |= survived.len() < 2048 || survived[1024..] != [2; 1024];
        }
        assert!(lost_unsynced, "some crash lost or tore the unsynced write");

        let mut rename_lost = false;
        let mut rename_kept_after_sync = true;
        for seed in 0..64 {
            let mut rng = SimRng::seed_from_u64(seed);
            let volume = SimVolume::default();
            let partial = volume.open_partial("b", 0, false).unwrap();
            partial.write_at(b"data", 0).unwrap();
            partial.sync_all().unwrap();
            let verified = partial.identity().unwrap();
            let dir = volume.place("b", &path("x/b"), &verified).unwrap();
            let synced = seed % 2 == 0;
            if synced {
                dir.sync().unwrap();
            }
            volume.crash(&mut rng);
            volume.reboot();
            let placed = volume.final_file("x/b").is_some();
            rename_lost |= !placed;
            if synced {
                rename_kept_after_sync &= placed && volume.partial("b", 0).is_none();
            }
        }
        assert!(rename_lost && rename_kept_after_sync);
    }

    #[test]
    fn the_armed_operation_crashes_the_volume() {
        let volume = SimVolume::default();
        volume.crash_at(3);
        let partial = volume.open_partial("c", 0, false).unwrap(); // op 1
        partial.write_at(b"x", 0).unwrap(); // op 2
        assert!(partial.sync_data().is_err(), "op 3 crashes");
        assert_eq!(volume.crashed_in(), Some("fdatasync"));
        assert!(partial.read_at(&mut [0], 0).is_err());
        assert!(volume.open_partial("d", 0, false).is_err());
    }
}
