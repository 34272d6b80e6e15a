//! Power loss at the storage seam (issue 17): the real receiver engine, driven by the real sender over an in-memory
//! pipe, writes to a simulated disk ([`SimVolume`]) that loses power at a seeded random operation. Unsynced writes
//! are dropped or torn, unsynced renames lost; the sled store (real, in a temporary directory) keeps everything it
//! was given. Then the store is reopened, the disk rebooted, and the push resumed to completion.
//!
//! Asserted for every case:
//! - the state store opens;
//! - right after the crash, every chunk the store records as received has its exact bytes in the surviving
//!   partial (or, if the partial was already renamed into place, in the file at the final name);
//! - right after the crash, the final name holds a verified version (bytes, mode and mtime) or nothing: the new
//!   file, the previously committed one (which must not be lost), or nothing if there was none; and if the store
//!   records the new file committed, it is the new file;
//! - the resumed sender is never asked for a chunk the store recorded as received;
//! - the resumed push completes and the final name holds the new file exactly.
//!
//! `FERRY_SIM_SEED=N` replays case N (the data, the variant and the crash point; thread interleavings may differ),
//! `FERRY_SIM_CASES=N` runs cases `0..N` (default [`DEFAULT_CASES`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::DuplexStream;
use tokio_util::sync::CancellationToken;

use super::claims::Claims;
use super::receiver::{receive, ReceiverContext, ReceiverPolicy};
use super::sender::{send, Rehash, SendOptions, SendStats, Source};
use super::{recv, TransferError};
use crate::chunk::{build_manifest, ChunkSpec, ChunkingMode};
use crate::manifest::{FileTime, Manifest};
use crate::path::RemotePath;
use crate::ranges::{ChunkSet, IndexRange};
use crate::storage::sim::{Meta, SimRng, SimVolume};
use crate::store::{ReceiverStore, Store};
use crate::wire::{Chunk, Committed, Connection, Message, Offer};
use crate::MAX_FRAME;

/// Cases in the default run (seeds `0..DEFAULT_CASES`): the CI check.
const DEFAULT_CASES: u64 = 2000;
/// Cases run at once.
const PARALLEL: usize = 4;
/// Where the pushed file lands.
const KEY: &str = "dir/file.bin";
/// Longest any one push may take before the case counts as hung.
const PUSH_LIMIT: Duration = Duration::from_secs(120);

/// How the case reaches the push that loses power.
#[derive(Clone, Copy, Debug)]
enum Variant {
    /// The first push of the file.
    Fresh,
    /// A push cut after some chunks, then the same file again.
    Resume,
    /// A push of an older version cut after some chunks, then the changed file (chunks carried over).
    Changed,
    /// An older version committed, then the changed file over it (its chunks reused; in place when at least
    /// half of it is unchanged).
    RePush,
    /// An older version committed, then a version with a few chunks changed (and perhaps a longer or shorter
    /// tail): written in place under the redo journal, the power lost while the journal is written, sealed or
    /// applied; the journal is replayed before anything is checked.
    InPlace,
}

/// A version of the file: its bytes and its manifest (mode and mtime included).
struct Version {
    bytes: Vec<u8>,
    source: Source,
}

impl Version {
    fn manifest(&self) -> &Manifest {
        &self.source.manifest
    }

    /// Whether `found` (bytes and metadata at a name) is exactly this version.
    fn is(&self, found: &(Vec<u8>, Option<Meta>)) -> bool {
        let meta = Meta {
            mode: self.manifest().mode & 0o777,
            mtime: self.manifest().mtime,
        };
        found.0 == self.bytes && found.1 == Some(meta)
    }
}

/// One seeded case.
struct Case {
    seed: u64,
    variant: Variant,
    old: Option<Version>,
    new: Version,
    /// Chunks the interrupted first push delivers (Resume, Changed).
    delivered: usize,
    sync_batch: u64,
    /// The operation, counted from the start of the push that loses power, at which it does.
    crash_after: u64,
    crash_seed: u64,
    /// Keeps the source files.
    _dir: tempfile::TempDir,
}

/// A case's source bytes: `n` chunks of `chunk` bytes (the last possibly shorter), some repeating others.
fn random_bytes(rng: &mut SimRng, chunk: usize, n: usize) -> Vec<u8> {
    let size = (n - 1) * chunk + rng.gen_range(1..=chunk);
    let mut bytes = vec![0u8; size];
    rng.fill(&mut bytes[..]);
    for i in 1..n - 1 {
        if rng.gen_ratio(1, 10) {
            let from = rng.gen_range(0..i);
            bytes.copy_within(from * chunk..(from + 1) * chunk, i * chunk);
        }
    }
    bytes
}

/// A changed version of `old`: some chunks edited, and the length often changed.
fn changed(rng: &mut SimRng, old: &[u8], chunk: usize) -> Vec<u8> {
    let mut new = old.to_vec();
    let chunks = new.len().div_ceil(chunk);
    let mut edited = false;
    for i in 0..chunks {
        if rng.gen_ratio(1, 4) || (i == chunks - 1 && !edited) {
            let at = i * chunk + rng.gen_range(0..chunk.min(new.len() - i * chunk));
            new[at] ^= 0x5a;
            edited = true;
        }
    }
    match rng.gen_range(0..3) {
        0 => new.truncate(rng.gen_range(chunk..=new.len())),
        1 => {
            let mut more = vec![0u8; rng.gen_range(1..4 * chunk)];
            rng.fill(&mut more[..]);
            new.extend(more);
        }
        _ => {}
    }
    new
}

/// A version of `old` with one to three chunks edited in place and perhaps its tail cut or grown: most of it
/// stays where it is, so the re-push goes in place.
fn slightly_changed(rng: &mut SimRng, old: &[u8], chunk: usize) -> Vec<u8> {
    let mut new = old.to_vec();
    for _ in 0..rng.gen_range(1..=3) {
        let at = rng.gen_range(0..new.len());
        new[at] ^= 0xa5;
    }
    match rng.gen_range(0..4) {
        0 => new.truncate(new.len() - rng.gen_range(1..=chunk.min(new.len() - 1))),
        1 => {
            let mut more = vec![0u8; rng.gen_range(1..2 * chunk)];
            rng.fill(&mut more[..]);
            new.extend(more);
        }
        _ => {}
    }
    new
}

fn version(dir: &std::path::Path, name: &str, bytes: Vec<u8>, chunk: u32, mode: u32, secs: i64) -> Version {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, &bytes).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    let file = std::fs::File::options().write(true).open(&path).unwrap();
    let mtime = FileTime { secs, nanos: 0 };
    file.set_modified(crate::storage::local::system_time(mtime)).unwrap();
    drop(file);
    let file = std::fs::File::open(&path).unwrap();
    let spec = ChunkSpec {
        mode: ChunkingMode::Fixed,
        size: chunk,
    };
    let manifest = build_manifest(&file, &path, spec).unwrap();
    Version {
        bytes,
        source: Source {
            file: Arc::new(file),
            manifest: Arc::new(manifest),
            rehash: Rehash::AfterRejection,
        },
    }
}

impl Case {
    fn generate(seed: u64) -> Case {
        let mut rng = SimRng::seed_from_u64(seed);
        let chunk = [4096usize, 8192, 16384][rng.gen_range(0..3)];
        let n = rng.gen_range(32..=128);
        let variants = [
            Variant::Fresh,
            Variant::Resume,
            Variant::Changed,
            Variant::RePush,
            Variant::InPlace,
        ];
        let variant = variants[rng.gen_range(0..variants.len())];
        let dir = tempfile::tempdir().unwrap();
        let first = random_bytes(&mut rng, chunk, n);
        let modes = [0o600, 0o640, 0o644];
        let (old, new) = match variant {
            Variant::Fresh | Variant::Resume => (None, first),
            Variant::Changed | Variant::RePush => {
                let new = changed(&mut rng, &first, chunk);
                (Some(first), new)
            }
            Variant::InPlace => {
                let new = slightly_changed(&mut rng, &first, chunk);
                (Some(first), new)
            }
        };
        let old = old.map(|bytes| version(dir.path(), "old", bytes, chunk as u32, 0o640, 1_600_000_000));
        let mode = modes[rng.gen_range(0..3)];
        let new = version(dir.path(), "new", new, chunk as u32, mode, 1_700_000_000 + seed as i64);
        let batch_chunks = [1u64, 2, 4, 8][rng.gen_range(0..4)];
        let chunks = new.manifest().chunk_count() as u64;
        // Roughly the operations of the push: a write per chunk, a sync per batch, the commit's five; past its
        // end the power goes after the push completed.
        let estimate = match variant {
            // The journal's few writes and syncs, its seal, the apply's writes, length, metadata and fsync, the
            // journal's removal and the directory syncs.
            Variant::InPlace => 24,
            _ => chunks + chunks / batch_chunks + 12,
        };
        Case {
            seed,
            variant,
            delivered: rng.gen_range(0..=n),
            sync_batch: batch_chunks * chunk as u64,
            crash_after: rng.gen_range(1..=estimate),
            crash_seed: rng.next_u64(),
            old,
            new,
            _dir: dir,
        }
    }
}

/// The store's directory, on a memory filesystem where there is one (sled flushes on every mark).
fn state_dir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::tempdir_in(shm) {
            return dir;
        }
    }
    tempfile::tempdir().unwrap()
}

fn context(store: &Store, volume: &SimVolume, sync_batch: u64, dir: &std::path::Path) -> ReceiverContext {
    ReceiverContext {
        // Unused by the big-file path, which goes through the volume only.
        root: dir.join("unused-root"),
        partial_dir: dir.join("unused-partials"),
        volume: Arc::new(volume.clone()),
        trees: crate::storage::LocalVolume::shared_tree(dir.join("unused-root"), dir.join("unused-partials")),
        store: ReceiverStore::open(store).unwrap(),
        claims: Claims::default(),
        stats: Arc::default(),
        idle_timeout: Duration::from_secs(30),
        sync_batch,
        queue_budget: Arc::new(tokio::sync::Semaphore::new(32 * 1024)),
        max_file_size: u64::MAX,
        max_manifest_chunks: crate::MAX_MANIFEST_CHUNKS,
        quota: None,
        limits: Default::default(),
        admission: Default::default(),
        joins: Default::default(),
        policy: ReceiverPolicy::SERVER,
    }
}

/// The receiver role on one end of a pipe.
fn spawn_receiver(
    ctx: &ReceiverContext,
    stream: DuplexStream,
) -> tokio::task::JoinHandle<Result<Committed, TransferError>> {
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let mut conn = Connection::new(stream, MAX_FRAME);
        let Message::Offer(offer) = recv(&mut conn, Duration::from_secs(30), "test").await? else {
            return Err(TransferError::Closed("expected an Offer"));
        };
        let path = RemotePath::parse(&offer.path).expect("test paths are valid");
        receive(&mut conn, &ctx, path, offer.manifest, &CancellationToken::new()).await
    })
}

/// Copies messages both ways between the sender and the receiver, noting every chunk a Need asks for.
async fn relay(sender: DuplexStream, receiver: DuplexStream, asked: Arc<Mutex<Vec<u32>>>) {
    let mut sender = Connection::new(sender, MAX_FRAME);
    let mut receiver = Connection::new(receiver, MAX_FRAME);
    loop {
        tokio::select! {
            msg = sender.read_message() => match msg {
                Ok(Some(msg)) if receiver.write_message(&msg).await.is_ok() => {}
                _ => return,
            },
            msg = receiver.read_message() => match msg {
                Ok(Some(msg)) => {
                    if let Message::Need(need) = &msg {
                        let indices = need.ranges.iter().flat_map(IndexRange::indices);
                        asked.lock().unwrap().extend(indices);
                    }
                    if sender.write_message(&msg).await.is_err() {
                        return;
                    }
                }
                _ => return,
            },
        }
    }
}

/// A whole push of `version` through the relay: the sender's result and the chunks the receiver asked for.
async fn push(
    ctx: &ReceiverContext,
    version: &Version,
) -> Result<(Result<Committed, TransferError>, Vec<u32>), String> {
    let (a, b) = tokio::io::duplex(256 * 1024);
    let (c, d) = tokio::io::duplex(256 * 1024);
    let receiver = spawn_receiver(ctx, d);
    let asked = Arc::new(Mutex::new(Vec::new()));
    let relaying = tokio::spawn(relay(b, c, asked.clone()));
    let source = version.source.clone();
    let sending = async move {
        let mut conn = Connection::new(a, MAX_FRAME);
        let (opts, mut stats) = (SendOptions::default(), SendStats::default());
        send(&mut conn, KEY, &source, &opts, &mut stats, &mut |_| {}).await
    };
    let sent = tokio::time::timeout(PUSH_LIMIT, sending)
        .await
        .map_err(|_| "the push hung")?;
    let received = tokio::time::timeout(PUSH_LIMIT, receiver).await;
    received
        .map_err(|_| "the receiver hung")?
        .expect("the receiver panicked")
        .ok();
    relaying.abort();
    let asked = std::mem::take(&mut *asked.lock().unwrap());
    Ok((sent, asked))
}

/// A push of `version` cut after `delivered` of the chunks asked for.
async fn interrupted_push(ctx: &ReceiverContext, version: &Version, delivered: usize) -> Result<(), String> {
    let (a, b) = tokio::io::duplex(4 * 1024 * 1024);
    let receiver = spawn_receiver(ctx, b);
    let mut conn = Connection::new(a, MAX_FRAME);
    let offer = Offer {
        path: KEY.into(),
        manifest: (*version.manifest()).clone(),
    };
    conn.write_message(&Message::Offer(offer))
        .await
        .map_err(|e| e.to_string())?;
    let need = match recv(&mut conn, Duration::from_secs(30), "test").await {
        Ok(Message::Need(need)) => need,
        other => return Err(format!("the interrupted push got {other:?}, not a Need")),
    };
    for index in need.ranges.iter().flat_map(IndexRange::indices).take(delivered) {
        let entry = &version.manifest().chunks[index as usize];
        let data = version.bytes[entry.offset as usize..][..entry.len as usize].to_vec();
        let chunk = Message::Chunk(Chunk { index, data });
        conn.write_message(&chunk).await.map_err(|e| e.to_string())?;
    }
    drop(conn);
    let ended = tokio::time::timeout(PUSH_LIMIT, receiver).await;
    ended
        .map_err(|_| "the interrupted receiver hung")?
        .expect("the receiver panicked")
        .ok();
    Ok(())
}

/// What the store says right after the crash.
struct Recorded {
    manifest: Manifest,
    received: ChunkSet,
}

impl Case {
    fn fail(&self, at: &str, volume: &SimVolume, what: impl std::fmt::Display) -> String {
        format!(
            "seed {} ({:?}, power lost at operation {} of the push{}), {at}: {what}\n  replay: FERRY_SIM_SEED={} \
             cargo test -j2 --lib power_loss",
            self.seed,
            self.variant,
            self.crash_after,
            volume
                .crashed_in()
                .map_or(" (after it ended)".to_string(), |op| format!(", in {op}")),
            self.seed
        )
    }

    /// Runs the case; on success says where the power went (the operation, or `None` after the push ended).
    async fn run(&self) -> Result<Option<&'static str>, String> {
        let state = state_dir();
        let volume = SimVolume::default();
        let store = Store::open(state.path()).map_err(|e| format!("seed {}: store: {e}", self.seed))?;
        let ctx = context(&store, &volume, self.sync_batch, state.path());
        let first = |e| format!("seed {} ({:?}), before the power loss: {e}", self.seed, self.variant);
        match (self.variant, &self.old) {
            (Variant::Resume, _) => interrupted_push(&ctx, &self.new, self.delivered).await.map_err(first)?,
            (Variant::Changed, Some(old)) => interrupted_push(&ctx, old, self.delivered).await.map_err(first)?,
            (Variant::RePush | Variant::InPlace, Some(old)) => {
                let (done, _) = push(&ctx, old).await.map_err(first)?;
                done.map_err(|e| format!("seed {}: the first push failed: {e}", self.seed))?;
            }
            _ => {}
        }
        volume.crash_at(volume.ops() + self.crash_after);
        // It may fail (the power went) or complete (the power goes after it ended): either way, what follows holds.
        let (_outcome, _) = push(&ctx, &self.new)
            .await
            .map_err(|e| self.fail("the push", &volume, e))?;
        let crashed_in = volume.crashed_in();
        volume.crash(&mut SimRng::seed_from_u64(self.crash_seed));
        store.flush().map_err(|e| e.to_string())?;
        drop((ctx, store));
        let store = reopen(state.path())
            .await
            .map_err(|e| self.fail("reopening the store", &volume, e))?;
        volume.reboot();
        let ctx = context(&store, &volume, self.sync_batch, state.path());
        // What the server does before anything else touches the path: a sealed journal is applied again.
        let path = RemotePath::parse(KEY).expect("a valid path");
        super::in_place::recover(&ctx, &path).map_err(|e| self.fail("replaying the journal", &volume, e))?;
        let recorded = self.check_after_crash(&ctx, &volume)?;
        let (resumed, asked) = push(&ctx, &self.new)
            .await
            .map_err(|e| self.fail("resuming", &volume, e))?;
        resumed.map_err(|e| self.fail("resuming", &volume, e))?;
        self.check_not_asked_again(recorded.as_ref(), &asked, &volume)?;
        let at_name = volume.final_file(KEY);
        if !at_name.as_ref().is_some_and(|found| self.new.is(found)) {
            return Err(self.fail(
                "after the resumed push",
                &volume,
                "the final name does not hold the new file",
            ));
        }
        if volume.has_journal(KEY) {
            return Err(self.fail("after the resumed push", &volume, "an in-place journal was left behind"));
        }
        Ok(crashed_in)
    }

    /// What is wrong with `found` at the final name.
    fn describe(&self, found: &(Vec<u8>, Option<Meta>)) -> String {
        let versions = [Some(&self.new), self.old.as_ref()];
        match versions.into_iter().flatten().find(|v| v.bytes == found.0) {
            Some(version) => format!(
                "the final name holds the right bytes with mode and mtime {:?}, not the committed {:o} and {:?}",
                found.1,
                version.manifest().mode & 0o777,
                version.manifest().mtime
            ),
            None => format!(
                "the final name holds {} bytes that are no verified version",
                found.0.len()
            ),
        }
    }

    /// The store opens and what it says holds on the disk; returns what it recorded as received.
    fn check_after_crash(&self, ctx: &ReceiverContext, volume: &SimVolume) -> Result<Option<Recorded>, String> {
        let at = "right after the crash";
        let at_name = volume.final_file(KEY);
        let is_old = |found: &(Vec<u8>, Option<Meta>)| self.old.as_ref().is_some_and(|old| old.is(found));
        let committed_before = matches!(self.variant, Variant::RePush | Variant::InPlace);
        match &at_name {
            None if committed_before => return Err(self.fail(at, volume, "the committed old version was lost")),
            None => {}
            Some(found) if self.new.is(found) || (committed_before && is_old(found)) => {}
            Some(found) => return Err(self.fail(at, volume, self.describe(found))),
        }
        let committed = ctx.store.committed(KEY).map_err(|e| e.to_string())?;
        let new_id = self.new.manifest().id();
        if committed.is_some_and(|c| c.manifest_id == new_id) && !at_name.as_ref().is_some_and(|f| self.new.is(f)) {
            return Err(self.fail(
                at,
                volume,
                "the store says the new file is committed; the final name disagrees",
            ));
        }
        let Some(record) = ctx.store.transfer(KEY).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let progress = ctx.store.progress(KEY).map_err(|e| e.to_string())?.unwrap_or_default();
        let count = record.manifest.chunk_count();
        let received = ChunkSet::from_bytes(count, &progress.received).unwrap_or_else(|| ChunkSet::new(count));
        let partial = volume.partial(KEY, record.manifest.size);
        // Renamed into place but not yet recorded committed: the chunks are in the final file.
        let holder = partial.as_ref().or(at_name.as_ref().map(|f| &f.0));
        for index in (0..count).filter(|&i| received.contains(i)) {
            let entry = &record.manifest.chunks[index as usize];
            let bytes =
                holder.and_then(|h| h.get(entry.offset as usize..(entry.offset + u64::from(entry.len)) as usize));
            if bytes.is_none_or(|b| *blake3::hash(b).as_bytes() != entry.hash) {
                let what = format!("chunk {index} is recorded received but its bytes are not on the disk");
                return Err(self.fail(at, volume, what));
            }
        }
        Ok(Some(Recorded {
            manifest: record.manifest,
            received,
        }))
    }

    /// No chunk the store recorded received (the same chunk, in the same place, in the new manifest) is asked for
    /// again.
    fn check_not_asked_again(
        &self,
        recorded: Option<&Recorded>,
        asked: &[u32],
        volume: &SimVolume,
    ) -> Result<(), String> {
        let Some(recorded) = recorded else { return Ok(()) };
        let new = self.new.manifest();
        for &index in asked {
            let Some(entry) = new.chunks.get(index as usize) else {
                continue;
            };
            let found = recorded
                .manifest
                .chunks
                .binary_search_by_key(&entry.offset, |c| c.offset);
            if let Ok(old) = found {
                if recorded.manifest.chunks[old] == *entry && recorded.received.contains(old as u32) {
                    let what = format!("chunk {index} was recorded received, yet the resumed push asked for it");
                    return Err(self.fail("resuming", volume, what));
                }
            }
        }
        Ok(())
    }
}

/// Opens the store again. sled lets go of its lock file from its own threads a moment after the last handle is
/// dropped, so a lock still held is waited for (bounded); anything else is a failure.
async fn reopen(dir: &std::path::Path) -> Result<Store, crate::store::StoreError> {
    let mut tries = 0;
    loop {
        match Store::open(dir) {
            Err(crate::store::StoreError::Locked(_)) if tries < 3000 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            opened => return opened,
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, not {value:?}")),
    )
}

/// Thousands of seeded crash points (see the module docs); every failure is listed with its seed.
#[test]
fn no_power_loss_loses_an_acknowledged_chunk_or_a_committed_file() {
    let seeds: Vec<u64> = match env_u64("FERRY_SIM_SEED") {
        Some(seed) => vec![seed],
        None => (0..env_u64("FERRY_SIM_CASES").unwrap_or(DEFAULT_CASES)).collect(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (mut failures, crash_points) = runtime.block_on(async {
        let turns = Arc::new(tokio::sync::Semaphore::new(PARALLEL));
        let mut cases = tokio::task::JoinSet::new();
        for seed in seeds.iter().copied() {
            let turn = turns.clone().acquire_owned().await.unwrap();
            cases.spawn(async move {
                let result = Case::generate(seed).run().await;
                drop(turn);
                result
            });
        }
        let mut failures = Vec::new();
        let mut crash_points = std::collections::BTreeMap::new();
        while let Some(done) = cases.join_next().await {
            match done.expect("a case panicked") {
                Ok(point) => *crash_points.entry(point.unwrap_or("after the push ended")).or_insert(0) += 1,
                Err(e) => failures.push(e),
            }
        }
        (failures, crash_points)
    });
    failures.sort_unstable_by_key(|e| e.split(' ').nth(1).and_then(|n| n.parse::<u64>().ok()));
    eprintln!("where the power went: {crash_points:?}");
    assert!(
        failures.is_empty(),
        "{} of {} cases failed; the first:\n{}",
        failures.len(),
        seeds.len(),
        failures.iter().take(5).cloned().collect::<Vec<_>>().join("\n")
    );
    if seeds.len() as u64 >= DEFAULT_CASES {
        // A campaign that never lands in the commit would prove nothing about its order.
        for point in [
            "create the partial",
            "write",
            "fdatasync",
            "set mode and mtime",
            "fsync",
            "rename the partial into place",
            "fsync the directory",
            "create the journal",
            "remove the journal",
            "after the push ended",
        ] {
            assert!(
                crash_points.contains_key(point),
                "no crash {point:?} in {crash_points:?}"
            );
        }
    }
}
