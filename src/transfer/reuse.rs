//! Local chunk reuse: before asking the sender for anything, the receiver fills the partial with needed chunks it
//! already holds, so an unchanged chunk never crosses the wire twice.
//!
//! Places are tried in this order: a chunk of the same offer already in the partial (a repeated block), the file
//! currently at the destination (the previous version: its committed manifest if the file is unchanged since the
//! commit, else it is cut with the offer's chunking), then the chunk index over every committed file of the scope.
//! Every reused chunk goes through the same verify-then-write door as a received one, so a stale index entry or an
//! edited file can cost a lookup, never a wrong byte; a stale index entry is dropped.
//!
//! What is reused shapes the Need, which the sender sees; so a sender that may not read what the receiver holds
//! gets [`Reuse::InPlace`] (proto-spec.md §4, "Reuse"): the previous version lends only the chunk at the same
//! offset with the same length, only to the first offer for the path (no open transfer yet), and the chunk index
//! is not consulted. Such a sender learns at most one yes/no per offered chunk, once per version of the file.

use std::collections::HashMap;
use std::sync::Arc;

use super::receiver::Reuse;
use super::writer::{ChunkWriter, Wanted};
use super::TransferError;
use crate::manifest::{index_of_same, ChunkEntry, Chunking, Hash, Manifest};
use crate::path::RemotePath;
use crate::storage::{FinalFile, Identity, Partial, ReadAt, Volume};
use crate::store::ReceiverStore;
use crate::verify::{self, HeldBytes};

/// Reused bytes between syncs: larger than the network batch, since nothing waits for these Acks and a crash
/// only means copying them again.
const REUSE_BATCH: u64 = 64 * 1024 * 1024;
/// An older file at the destination is cut for reuse only if it is at most this many times the offered size...
const SCAN_LIMIT_FACTOR: u64 = 2;
/// ...plus this much.
const SCAN_LIMIT_SLACK: u64 = 64 * 1024 * 1024;
/// Index entries tried per chunk hash.
const LOCATIONS_PER_HASH: usize = 2;

/// Where a reusable copy of a chunk may be.
#[derive(Clone, Copy)]
enum Place {
    /// In the partial itself, at this offset.
    Partial(u64),
    /// In file number `file` of the opened sources, at this offset.
    File { file: usize, offset: u64 },
}

/// What one reuse pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reused {
    /// Chunks filled from local copies.
    pub(crate) chunks: u64,
    /// Their bytes.
    pub(crate) bytes: u64,
}

/// Where local copies of an offer's missing chunks are, found before any is read: what the receiver may leave out
/// of its first `Need` and copy after that round (proto-spec.md §4, "Reuse").
pub(crate) struct LocalCopies {
    finder: Finder,
}

/// Finds the local copies `rule` allows for the chunks `writer` misses (`fresh`: no transfer to `path` was open
/// before this offer); `None` if nothing is missing. Reads nothing but a previous version that has to be cut.
/// Blocking.
pub(crate) fn find_local(
    writer: &ChunkWriter,
    volume: &dyn Volume,
    path: &RemotePath,
    rule: Reuse,
    fresh: bool,
) -> Option<LocalCopies> {
    let wanted = Wanted::missing_from(writer);
    if wanted.is_empty() {
        return None;
    }
    let mut finder = Finder {
        places: HashMap::new(),
        files: Vec::new(),
        paths: Vec::new(),
        known_previous: None,
    };
    for (index, chunk) in writer.manifest.chunks.iter().enumerate() {
        if writer.received.contains(index as u32) && wanted.contains(&chunk.hash) {
            finder
                .places
                .entry(chunk.hash)
                .or_default()
                .push(Place::Partial(chunk.offset));
        }
    }
    match rule {
        Reuse::Full => finder.add_previous_version(&writer.store, path, volume, writer, &wanted),
        Reuse::InPlace if fresh => finder.add_in_place(volume, path, writer, &wanted),
        Reuse::InPlace => {}
    }
    if rule == Reuse::Full {
        for group in wanted.groups_in_file_order() {
            let hash = wanted.hash(&group);
            if finder.places.contains_key(&hash) {
                continue;
            }
            let len = writer.manifest.chunks[wanted.indices(&group).next().expect("a non-empty group") as usize].len;
            let places = finder.indexed(&writer.store, volume, path, &hash, len);
            if !places.is_empty() {
                finder.places.insert(hash, places);
            }
        }
    }
    Some(LocalCopies { finder })
}

impl LocalCopies {
    /// Whether some local place may hold the chunk `hash` (it is verified only when copied).
    pub(crate) fn has_copy(&self, hash: &Hash) -> bool {
        self.finder.places.contains_key(hash)
    }

    /// Bytes of the chunks `writer` misses that a local place may hold.
    pub(crate) fn copyable_bytes(&self, writer: &ChunkWriter) -> u64 {
        writer
            .received
            .missing()
            .map(|index| &writer.manifest.chunks[index as usize])
            .filter(|chunk| self.has_copy(&chunk.hash))
            .map(|chunk| u64::from(chunk.len))
            .sum()
    }

    /// Copies every chunk `writer` still misses that a place holds (each verified on the way, a place holding
    /// other bytes skipped) and makes them durable. Chunks that arrived since [`find_local`] are not copied again.
    /// Blocking.
    pub(crate) fn copy_into(mut self, writer: &mut ChunkWriter, path: &RemotePath) -> Result<Reused, TransferError> {
        let wanted = Wanted::missing_from(writer);
        let mut copier = Copier {
            reused: Reused::default(),
        };
        let mut jobs = Vec::new();
        for group in wanted.groups_in_file_order() {
            let indices: Vec<u32> = wanted.indices(&group).collect();
            let places = self.finder.places.remove(&wanted.hash(&group)).unwrap_or_default();
            let indices = copier.keep_in_place(writer, &self.finder, &indices, &places);
            if !indices.is_empty() && !places.is_empty() {
                jobs.push(Job { indices, places });
            }
        }
        let unfound = run_jobs(&self.finder, writer, &jobs, &mut copier)?;
        writer.persist_batch()?;
        if copier.reused.chunks > 0 {
            tracing::info!(path = %path, chunks = copier.reused.chunks, bytes = copier.reused.bytes, "reused local chunks");
        }
        warn_unfound(path, &unfound);
        Ok(copier.reused)
    }
}

/// Runs `jobs` in order: a reader thread reads and verifies each job's bytes (up to [`READ_AHEAD`] ahead) while
/// this thread writes them. Returns the jobs no place held the bytes of (by position in `jobs`).
fn run_jobs(
    finder: &Finder,
    writer: &mut ChunkWriter,
    jobs: &[Job],
    copier: &mut Copier,
) -> Result<Vec<usize>, TransferError> {
    let reader = Reader {
        finder,
        manifest: writer.manifest.clone(),
        partial: writer.file.clone(),
        store: writer.store.clone(),
    };
    let mut unfound = Vec::new();
    std::thread::scope(|scope| -> Result<(), TransferError> {
        let (ahead, read) = std::sync::mpsc::sync_channel(READ_AHEAD);
        scope.spawn(move || {
            for job in jobs {
                if ahead.send(reader.read_verified(job)).is_err() {
                    break; // the writing side stopped
                }
            }
        });
        for (number, job) in jobs.iter().enumerate() {
            match read.recv() {
                Ok(Some(bytes)) => copier.write_copies(writer, &job.indices, bytes)?,
                Ok(None) => unfound.push(number),
                Err(_) => break,
            }
        }
        Ok(())
    })?;
    Ok(unfound)
}

/// Logs the jobs (one hash each) whose places all held other bytes.
fn warn_unfound(path: &RemotePath, unfound: &[usize]) {
    if !unfound.is_empty() {
        tracing::warn!(path = %path, hashes = unfound.len(), "no local place held these chunks after all; asking for them");
    }
}

/// The file now at `path`, opened with its identity, if it is a non-empty regular file (the previous version a
/// re-push may copy from).
fn open_previous(volume: &dyn Volume, path: &RemotePath) -> Option<(Box<dyn FinalFile>, Identity)> {
    let file = volume.open_final(path)?;
    let meta = file.identity().ok()?;
    (meta.is_file && meta.len > 0).then_some((file, meta))
}

/// The destination's previous version, for a streamed offer that copies its chunks piece by piece as the
/// pieces arrive instead of gathering the whole manifest first (proto-spec.md §4, "Reuse"): its committed
/// manifest says where each chunk is, so nothing is read but the chunks copied.
pub(crate) struct PreviousVersion {
    finder: Finder,
    /// Its chunks, by offset.
    chunks: Vec<ChunkEntry>,
}

impl PreviousVersion {
    /// The file committed at `path`, if it is there unchanged since that commit and was cut with `chunking`.
    /// Blocking.
    pub(crate) fn open(
        store: &ReceiverStore,
        volume: &dyn Volume,
        path: &RemotePath,
        chunking: Chunking,
    ) -> Option<PreviousVersion> {
        let (file, meta) = open_previous(volume, path)?;
        let chunks = committed_chunks(store, path, &meta, chunking)?;
        let mut places: HashMap<Hash, Vec<Place>> = HashMap::new();
        for chunk in &chunks {
            let place = Place::File {
                file: 0,
                offset: chunk.offset,
            };
            places.entry(chunk.hash).or_default().push(place);
        }
        let finder = Finder {
            places,
            files: vec![file],
            paths: vec![String::new()],
            known_previous: Some(0),
        };
        Some(PreviousVersion { finder, chunks })
    }

    /// Whether it holds a chunk with this hash (verified only when copied).
    pub(crate) fn holds(&self, hash: &Hash) -> bool {
        self.finder.places.contains_key(hash)
    }

    /// Of `chunks`, the bytes it holds at the same offset with the same length and hash (what an in-place write
    /// would keep), and the bytes it holds elsewhere (moved).
    pub(crate) fn placement(&self, chunks: &[ChunkEntry]) -> (u64, u64) {
        let (mut kept, mut moved) = (0, 0);
        for chunk in chunks {
            if index_of_same(&self.chunks, chunk).is_some() {
                kept += u64::from(chunk.len);
            } else if self.holds(&chunk.hash) {
                moved += u64::from(chunk.len);
            }
        }
        (kept, moved)
    }

    /// Copies chunks `indices` (ascending) of `writer`'s manifest from it, each verified on the way, and makes
    /// them durable (never acknowledged: the sender did not send them). Returns the indices whose bytes it no
    /// longer held (changed since its commit), for the caller to ask for. Blocking.
    pub(crate) fn copy(
        &self,
        writer: &mut ChunkWriter,
        indices: &[u32],
        path: &RemotePath,
    ) -> Result<Vec<u32>, TransferError> {
        let mut jobs: Vec<Job> = Vec::new();
        let mut job_of: HashMap<Hash, usize> = HashMap::new();
        let mut missing = Vec::new();
        for &index in indices {
            let hash = writer.manifest.chunks[index as usize].hash;
            let Some(places) = self.finder.places.get(&hash) else {
                missing.push(index);
                continue;
            };
            match job_of.get(&hash) {
                Some(&job) => jobs[job].indices.push(index),
                None => {
                    job_of.insert(hash, jobs.len());
                    jobs.push(Job {
                        indices: vec![index],
                        places: places.clone(),
                    });
                }
            }
        }
        let mut copier = Copier {
            reused: Reused::default(),
        };
        let unfound = run_jobs(&self.finder, writer, &jobs, &mut copier)?;
        writer.persist_batch()?;
        tracing::debug!(path = %path, chunks = copier.reused.chunks, bytes = copier.reused.bytes, "copied from the previous version");
        warn_unfound(path, &unfound);
        missing.extend(unfound.into_iter().flat_map(|job| jobs[job].indices.iter().copied()));
        missing.sort_unstable();
        Ok(missing)
    }
}

/// Chunks read and verified ahead of the writes, at most (each up to the largest chunk): the next chunks' reads
/// and hashing run while the partial takes the current one.
const READ_AHEAD: usize = 2;

/// One hash to copy: the chunks that take its bytes (ascending) and the places that may hold them.
struct Job {
    indices: Vec<u32>,
    places: Vec<Place>,
}

/// The reading side of a copy, on its own thread: reads each job's bytes from the first place that holds them,
/// verified against the manifest.
struct Reader<'a> {
    finder: &'a Finder,
    manifest: Arc<Manifest>,
    partial: Partial,
    store: ReceiverStore,
}

impl Reader<'_> {
    /// The bytes of `job`'s chunks from the first of its places that holds them; a place that holds other bytes
    /// is skipped (and forgotten, if it came from the index). `None` if none does.
    fn read_verified(&self, job: &Job) -> Option<Arc<Vec<u8>>> {
        let entry = self.manifest.chunks[job.indices[0] as usize];
        for place in &job.places {
            let mut buf = vec![0; entry.len as usize];
            let read = match *place {
                Place::Partial(offset) => self.partial.read_exact_at(&mut buf, offset),
                Place::File { file, offset } => self.finder.files[file].read_exact_at(&mut buf, offset),
            };
            if read.is_ok() && verify::check_chunk(&entry, &buf).is_ok() {
                return Some(Arc::new(buf));
            }
            if let Place::File { file, .. } = *place {
                if !self.finder.paths[file].is_empty() {
                    let _ = self.store.forget_chunk(&entry.hash, &self.finder.paths[file]);
                }
            }
        }
        None
    }
}

/// Opened source files and the places of wanted chunks in them.
struct Finder {
    places: HashMap<Hash, Vec<Place>>,
    files: Vec<Box<dyn FinalFile>>,
    /// Relative path of each opened file (empty for the destination's previous version).
    paths: Vec<String>,
    /// The previous version's file number, if its places come from its chunks' known hashes (its committed
    /// manifest, or a cut of it), not from offsets alone.
    known_previous: Option<usize>,
}

/// The chunks of the file at `path` (`meta`) from its committed manifest, if the file is unchanged since that
/// commit (same size, inode and mtime) and was cut as `chunking` cuts (else its chunks could not match the
/// offer's, and it is cut again).
fn committed_chunks(
    store: &ReceiverStore,
    path: &RemotePath,
    meta: &Identity,
    chunking: Chunking,
) -> Option<Vec<ChunkEntry>> {
    let committed = store.committed(path.as_str()).ok().flatten()?;
    let unchanged = committed.size == meta.len && committed.inode == meta.ino && committed.mtime == meta.mtime;
    if !unchanged {
        return None;
    }
    let manifest = store.committed_manifest(path.as_str()).ok().flatten()?;
    (manifest.chunking == chunking).then_some(manifest.chunks)
}

impl Finder {
    /// Whether `place` is `offset` in the previous version, whose chunk hashes are known.
    fn is_previous_at(&self, place: &Place, offset: u64) -> bool {
        match *place {
            Place::File { file, offset: at } => at == offset && self.known_previous == Some(file),
            Place::Partial(_) => false,
        }
    }

    /// Adds the chunks of the file now at the destination: from its committed manifest if it is unchanged since
    /// that commit, else by cutting it the way the offer was cut.
    fn add_previous_version(
        &mut self,
        store: &ReceiverStore,
        path: &RemotePath,
        volume: &dyn Volume,
        writer: &ChunkWriter,
        wanted: &Wanted,
    ) {
        let Some((file, meta)) = open_previous(volume, path) else {
            return;
        };
        let chunks: Vec<ChunkEntry> = match committed_chunks(store, path, &meta, writer.manifest.chunking) {
            Some(chunks) => chunks,
            // Cutting an old file costs a full read of it: not for one far larger than what is offered.
            None if meta.len > SCAN_LIMIT_FACTOR * writer.manifest.size + SCAN_LIMIT_SLACK => return,
            None => match file.cut(meta.len, writer.manifest.chunking, &|h| wanted.contains(h)) {
                Ok(chunks) => chunks,
                Err(e) => {
                    tracing::warn!(path = %path, error = %e, "could not read the previous version for reuse");
                    return;
                }
            },
        };
        let number = self.files.len();
        self.files.push(file);
        self.paths.push(String::new());
        self.known_previous = Some(number);
        for chunk in chunks {
            if wanted.contains(&chunk.hash) {
                let place = Place::File {
                    file: number,
                    offset: chunk.offset,
                };
                self.places.entry(chunk.hash).or_default().push(place);
            }
        }
    }

    /// Adds the file now at the destination as a place for each wanted chunk at that chunk's own offset (its
    /// length is checked by the verification), never elsewhere in the file.
    fn add_in_place(&mut self, volume: &dyn Volume, path: &RemotePath, writer: &ChunkWriter, wanted: &Wanted) {
        let Some((file, meta)) = open_previous(volume, path) else {
            return;
        };
        let number = self.files.len();
        self.files.push(file);
        self.paths.push(String::new());
        for &(hash, index) in &wanted.by_hash {
            let chunk = &writer.manifest.chunks[index as usize];
            if chunk.offset.saturating_add(u64::from(chunk.len)) <= meta.len {
                let place = Place::File {
                    file: number,
                    offset: chunk.offset,
                };
                self.places.entry(hash).or_default().push(place);
            }
        }
    }

    /// Places the chunk index knows for `hash` in other committed files, opening them as needed.
    fn indexed(
        &mut self,
        store: &ReceiverStore,
        volume: &dyn Volume,
        own: &RemotePath,
        hash: &Hash,
        len: u32,
    ) -> Vec<Place> {
        let Ok(locations) = store.chunk_locations(hash, LOCATIONS_PER_HASH + 1) else {
            return Vec::new();
        };
        let mut places = Vec::new();
        for location in locations.into_iter().filter(|l| l.path != own.as_str() && l.len == len) {
            let number = match self.paths.iter().position(|p| *p == location.path) {
                Some(number) => number,
                None => {
                    let opened = RemotePath::parse(&location.path)
                        .ok()
                        .and_then(|p| volume.open_final(&p));
                    let Some(file) = opened else {
                        let _ = store.forget_chunk(hash, &location.path);
                        continue;
                    };
                    self.files.push(file);
                    self.paths.push(location.path.clone());
                    self.files.len() - 1
                }
            };
            places.push(Place::File {
                file: number,
                offset: location.offset,
            });
            if places.len() == LOCATIONS_PER_HASH {
                break;
            }
        }
        places
    }
}

/// Writes verified chunks into the partial.
struct Copier {
    reused: Reused,
}

/// A copied chunk's bytes, shared by its writes and the digest follower (which hashes them from memory).
struct SharedBytes(Arc<Vec<u8>>);

impl AsRef<[u8]> for SharedBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Copier {
    /// Writes `bytes`, verified as the first of `indices`, as every chunk in `indices` (one hash, one length),
    /// handing them to the digest follower with the first.
    fn write_copies(
        &mut self,
        writer: &mut ChunkWriter,
        indices: &[u32],
        bytes: Arc<Vec<u8>>,
    ) -> Result<(), TransferError> {
        let len = bytes.len() as u32;
        let mut follow: Option<HeldBytes> = Some(Box::new(SharedBytes(bytes.clone())));
        for &index in indices {
            if writer.write_local(index, &bytes, false, follow.take())? {
                self.count(len);
            }
            if writer.batch_bytes() >= REUSE_BATCH {
                writer.persist_batch()?;
            }
        }
        Ok(())
    }

    /// Keeps, unread, each of `indices` that the destination's previous version holds at its own offset (its
    /// committed manifest or a cut of it says so: `places`, [`Finder::known_previous`]) where the partial is that
    /// very file, untouched (an in-place transfer). Returns the indices left to copy.
    fn keep_in_place(
        &mut self,
        writer: &mut ChunkWriter,
        finder: &Finder,
        indices: &[u32],
        places: &[Place],
    ) -> Vec<u32> {
        let previous_at = |offset: u64| places.iter().any(|place| finder.is_previous_at(place, offset));
        let mut left = Vec::new();
        for &index in indices {
            let entry = writer.manifest.chunk(index).copied();
            match entry {
                Some(entry) if previous_at(entry.offset) && writer.keep_in_place(index) => self.count(entry.len),
                _ => left.push(index),
            }
        }
        left
    }

    fn count(&mut self, len: u32) {
        self.reused.chunks += 1;
        self.reused.bytes += u64::from(len);
    }
}
