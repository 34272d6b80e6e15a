//! Deterministic schedules of gc against sessions: a bucket wrapper stamps every object with a fake clock and
//! runs a test's session steps right before a chosen gc call, so each interleaving of "The race"
//! (docs/object-store.md) is one fixed sequence of requests against `object_store::memory::InMemory`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use object_store::memory::InMemory;
use object_store::ObjectStore;

use super::*;
use crate::manifest::hex;

/// The fake clock: moves only when told, or by a millisecond per request.
#[derive(Debug)]
struct FakeClock(Mutex<SystemTime>);

impl FakeClock {
    fn advance(&self, by: Duration) {
        *self.0.lock().unwrap() += by;
    }
}

impl Clock for Arc<FakeClock> {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap()
    }

    async fn sleep_until(&self, at: SystemTime) {
        let mut now = self.0.lock().unwrap();
        *now = (*now).max(at);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Head,
    Delete,
    Other,
}

type Hook = Box<dyn FnMut(Op, &Path) -> Option<BoxFuture<'static, ()>> + Send>;

/// The store, its stamps, and the hook that runs before gc's calls.
struct Shared {
    inner: Arc<dyn ObjectStore>,
    clock: Arc<FakeClock>,
    stamps: Mutex<HashMap<Path, SystemTime>>,
    hook: Mutex<Option<Hook>>,
}

/// A view of the bucket: gc's (`hooked`) or a session's.
#[derive(Clone)]
struct View {
    shared: Arc<Shared>,
    hooked: bool,
}

impl View {
    async fn before(&self, op: Op, key: &Path) {
        if self.hooked {
            let step = self.shared.hook.lock().unwrap().as_mut().and_then(|hook| hook(op, key));
            if let Some(step) = step {
                step.await;
            }
        }
        self.shared.clock.advance(Duration::from_millis(1));
    }

    fn stamp(&self, mut meta: ObjectMeta) -> ObjectMeta {
        if let Some(t) = self.shared.stamps.lock().unwrap().get(&meta.location) {
            meta.last_modified = (*t).into();
        }
        meta
    }

    fn exists(&self, key: &Path) -> bool {
        self.shared.stamps.lock().unwrap().contains_key(key)
    }
}

impl Bucket for View {
    async fn list(&self, prefix: &Path) -> object_store::Result<Vec<ObjectMeta>> {
        self.before(Op::Other, prefix).await;
        let listed = Bucket::list(&self.shared.inner, prefix).await?;
        Ok(listed.into_iter().map(|m| self.stamp(m)).collect())
    }

    async fn head(&self, key: &Path) -> object_store::Result<ObjectMeta> {
        self.before(Op::Head, key).await;
        Ok(self.stamp(Bucket::head(&self.shared.inner, key).await?))
    }

    async fn get(&self, key: &Path) -> object_store::Result<Bytes> {
        self.before(Op::Other, key).await;
        Bucket::get(&self.shared.inner, key).await
    }

    async fn put(&self, key: &Path, bytes: Bytes) -> object_store::Result<()> {
        self.before(Op::Other, key).await;
        Bucket::put(&self.shared.inner, key, bytes).await?;
        let now = self.shared.clock.now();
        self.shared.stamps.lock().unwrap().insert(key.clone(), now);
        Ok(())
    }

    async fn delete(&self, key: &Path) -> object_store::Result<()> {
        self.before(Op::Delete, key).await;
        Bucket::delete(&self.shared.inner, key).await?;
        self.shared.stamps.lock().unwrap().remove(key);
        Ok(())
    }
}

/// The test's object encoding: the hex of each chunk named, one a line.
struct Lines;

impl References for Lines {
    fn chunks(&self, _key: &Path, bytes: &[u8]) -> Result<Vec<Hash>, String> {
        let text = std::str::from_utf8(bytes).map_err(|e| e.to_string())?;
        text.lines()
            .map(|l| parse_hex_hash(l).ok_or_else(|| format!("not a hash: {l}")))
            .collect()
    }
}

fn naming(chunks: &[Hash]) -> Bytes {
    Bytes::from(chunks.iter().map(|h| format!("{}\n", hex(h))).collect::<String>())
}

fn chunk(n: u8) -> Hash {
    *blake3::hash(&[n]).as_bytes()
}

const GRACE: Duration = Duration::from_secs(3600);

fn settings() -> GcSettings {
    GcSettings {
        grace: GRACE,
        delta: Duration::from_secs(5),
        transfer_ttl: Duration::from_secs(7 * 24 * 3600),
        request_timeout: Duration::from_secs(30),
    }
}

struct World {
    gc: View,
    session: View,
    clock: Arc<FakeClock>,
    ns: Layout,
}

fn world() -> World {
    let clock = Arc::new(FakeClock(Mutex::new(UNIX_EPOCH + Duration::from_secs(1_700_000_000))));
    let shared = Arc::new(Shared {
        inner: Arc::new(InMemory::new()),
        clock: clock.clone(),
        stamps: Mutex::default(),
        hook: Mutex::default(),
    });
    World {
        gc: View {
            shared: shared.clone(),
            hooked: true,
        },
        session: View { shared, hooked: false },
        clock,
        ns: Layout::new("ferry", ""),
    }
}

impl World {
    async fn put(&self, key: &Path, body: Bytes) {
        self.session.put(key, body).await.unwrap();
    }

    /// An orphan chunk: stored, then twice the grace period passes.
    async fn old_orphan(&self, hash: &Hash) {
        self.put(&self.ns.chunk(hash), Bytes::from_static(b"bytes")).await;
        self.clock.advance(2 * GRACE);
    }

    async fn gc(&self) -> ObjectGcReport {
        collect(&self.gc, &self.ns, &Lines, &settings(), &self.clock)
            .await
            .unwrap()
    }

    /// Runs `step` (once) right before gc's first `op` on chunk `hash`.
    fn before_gc(&self, op: Op, hash: &Hash, step: BoxFuture<'static, ()>) {
        let key = self.ns.chunk(hash);
        let mut step = Some(step);
        *self.gc.shared.hook.lock().unwrap() = Some(Box::new(
            move |at, on| {
                if at == op && *on == key {
                    step.take()
                } else {
                    None
                }
            },
        ));
    }

    /// Every chunk a committed entry names is in the bucket.
    async fn committed_chunks_exist(&self) -> bool {
        let files = self.session.list(&sub(&self.ns, "files")).await.unwrap();
        let mut all = true;
        for meta in files {
            let bytes = self.session.get(&meta.location).await.unwrap();
            for hash in Lines.chunks(&meta.location, &bytes).unwrap() {
                all &= self.session.exists(&self.ns.chunk(&hash));
            }
        }
        all
    }
}

/// What a session may rely on among existing chunks: rule R, or its mutation "whatever exists".
#[derive(Clone, Copy, PartialEq, Eq)]
enum Rely {
    RuleR,
    Exists,
}

/// A receiving session, reduced to its requests: record, LIST (rule R), chunk PUTs, rule C, commit PUT.
struct Session {
    bucket: View,
    clock: Arc<FakeClock>,
    ns: Layout,
    chunks: Vec<Hash>,
    rely: Rely,
    record: Path,
    created: SystemTime,
    relied: Vec<(Hash, SystemTime)>,
}

impl Session {
    fn new(world: &World, chunks: Vec<Hash>, rely: Rely) -> Self {
        Session {
            bucket: world.session.clone(),
            clock: world.clock.clone(),
            ns: world.ns.clone(),
            chunks,
            rely,
            record: sub(&world.ns, "open")
                .join("pid")
                .join(format!("{:016x}", crate::random::u64())),
            created: UNIX_EPOCH,
            relied: Vec::new(),
        }
    }

    /// Writes the record, then decides each chunk: returns those asked for.
    async fn open_and_plan(&mut self) -> Vec<Hash> {
        self.bucket.put(&self.record, naming(&self.chunks)).await.unwrap();
        self.created = self.clock.now();
        let mut asked = Vec::new();
        for hash in self.chunks.clone() {
            let key = self.ns.chunk(&hash);
            let listed = self.bucket.list(&self.ns.chunk_shard(hash[0])).await.unwrap();
            let seen = listed.into_iter().find(|m| m.location == key);
            match seen {
                Some(meta)
                    if self.rely == Rely::Exists
                        || listed_young(modified(&meta), self.clock.now(), settings().grace) =>
                {
                    self.relied.push((hash, modified(&meta)));
                }
                _ => asked.push(hash),
            }
        }
        asked
    }

    async fn store(&mut self, chunks: &[Hash]) {
        for hash in chunks {
            self.bucket
                .put(&self.ns.chunk(hash), Bytes::from_static(b"bytes"))
                .await
                .unwrap();
            self.relied.push((*hash, self.clock.now()));
        }
    }

    /// Rule C (unless `confirm` is false: the mutation), re-storing what it finds gone, then the commit PUT.
    async fn commit(&mut self, confirm: bool) {
        for _ in 0..3 {
            if !confirm {
                break;
            }
            let missing = confirm_before_commit(
                &self.bucket,
                &self.ns,
                self.created,
                &self.relied,
                &settings(),
                &self.clock,
            )
            .await
            .unwrap();
            if missing.is_empty() {
                break;
            }
            self.store(&missing).await;
        }
        let file = sub(&self.ns, "files").join("f");
        self.bucket.put(&file, naming(&self.chunks)).await.unwrap();
        self.bucket.delete(&self.record).await.unwrap();
    }

    async fn run_whole(mut self) {
        let asked = self.open_and_plan().await;
        self.store(&asked).await;
        self.commit(true).await;
    }
}

#[tokio::test]
async fn gc_keeps_every_referenced_chunk_and_deletes_only_old_orphans() {
    let w = world();
    let [a, b, c, old, young] = [1, 2, 3, 4, 5].map(chunk);
    for hash in [a, b, c, old] {
        w.put(&w.ns.chunk(&hash), Bytes::from_static(b"bytes")).await;
    }
    w.clock.advance(2 * GRACE);
    w.put(&w.ns.chunk(&young), Bytes::from_static(b"bytes")).await;
    w.put(&sub(&w.ns, "files").join("a"), naming(&[a])).await;
    w.put(&sub(&w.ns, "versions").join("a").join("1-x"), naming(&[b])).await;
    w.put(&sub(&w.ns, "open").join("pid").join("tid"), naming(&[c])).await;
    let report = w.gc().await;
    for (hash, kept) in [(a, true), (b, true), (c, true), (old, false), (young, true)] {
        assert_eq!(w.session.exists(&w.ns.chunk(&hash)), kept, "chunk {}", hex(&hash));
    }
    assert_eq!(
        (report.chunks_live, report.chunks_deleted, report.chunks_young),
        (3, 1, 1)
    );
    assert!(!w.session.exists(&lease_key(&w.ns)), "the lease is released");
    // The run's record stays for rule C.
    assert_eq!(w.session.list(&sub(&w.ns, "gc").join("runs")).await.unwrap().len(), 1);
}

#[tokio::test]
async fn gc_expires_abandoned_transfers_then_sweeps_their_chunks() {
    let w = world();
    let [stale, fresh] = [1, 2].map(chunk);
    w.put(&w.ns.chunk(&stale), Bytes::from_static(b"bytes")).await;
    w.put(&sub(&w.ns, "open").join("p1").join("t1"), naming(&[stale])).await;
    w.put(
        &sub(&w.ns, "journal").join("t1").join("1-s-0"),
        Bytes::from_static(b"j"),
    )
    .await;
    w.clock.advance(settings().transfer_ttl + Duration::from_secs(1));
    w.put(&w.ns.chunk(&fresh), Bytes::from_static(b"bytes")).await;
    w.put(&sub(&w.ns, "open").join("p2").join("t2"), naming(&[fresh])).await;
    w.clock.advance(2 * GRACE);
    // t2 was active 2 G ago: not abandoned; t1 a TTL and more.
    let report = w.gc().await;
    assert_eq!(report.transfers_expired, 1);
    assert!(w.session.list(&sub(&w.ns, "journal")).await.unwrap().is_empty());
    assert!(!w.session.exists(&sub(&w.ns, "open").join("p1").join("t1")));
    assert!(w.session.exists(&sub(&w.ns, "open").join("p2").join("t2")));
    assert!(
        !w.session.exists(&w.ns.chunk(&stale)),
        "an expired transfer's chunk is swept"
    );
    assert!(
        w.session.exists(&w.ns.chunk(&fresh)),
        "an open transfer's chunk is kept"
    );
}

/// The race, first interleaving: gc marked before the session's record; the session finds the orphan X and
/// commits before gc's HEAD of X. Rule R makes it re-PUT X (young: the HEAD keeps it); "exists" relies on the
/// old copy and gc deletes a committed chunk.
#[tokio::test]
async fn race_an_orphan_found_after_the_mark_is_stored_again_not_relied_on() {
    for (rely, survives) in [(Rely::RuleR, true), (Rely::Exists, false)] {
        let w = world();
        let x = chunk(9);
        w.old_orphan(&x).await;
        w.before_gc(Op::Head, &x, Box::pin(Session::new(&w, vec![x], rely).run_whole()));
        w.gc().await;
        assert_eq!(
            w.committed_chunks_exist().await,
            survives,
            "rely on {}",
            rely == Rely::Exists
        );
    }
}

/// Second interleaving: the session re-PUTs X just after gc's HEAD saw the old copy; gc's DELETE removes the
/// fresh one. Rule C at the commit (after the run ended: the run's record) finds X gone and stores it again;
/// without rule C the commit names a deleted chunk.
#[tokio::test]
async fn race_a_chunk_deleted_after_its_re_put_is_caught_by_rule_c() {
    for confirm in [true, false] {
        let w = world();
        let x = chunk(9);
        w.old_orphan(&x).await;
        let session = Arc::new(tokio::sync::Mutex::new(Session::new(&w, vec![x], Rely::RuleR)));
        let s = session.clone();
        w.before_gc(
            Op::Delete,
            &x,
            Box::pin(async move {
                let mut s = s.lock().await;
                let asked = s.open_and_plan().await;
                assert_eq!(asked, vec![x], "an old orphan is asked for");
                s.store(&asked).await;
            }),
        );
        let report = w.gc().await;
        assert_eq!(report.chunks_deleted, 1, "the schedule deletes the fresh copy");
        session.lock().await.commit(confirm).await;
        assert_eq!(w.committed_chunks_exist().await, confirm, "rule C on: {confirm}");
    }
}

/// Third interleaving: another transfer stores X after the mark, and the session relies on that young copy
/// (rule R (c)). Before gc's HEAD: the HEAD sees it young and keeps it. Before gc's DELETE (the HEAD saw the old
/// copy): rule C finds it gone and the session stores it.
#[tokio::test]
async fn race_relying_on_a_chunk_another_transfer_just_stored() {
    for op in [Op::Head, Op::Delete] {
        let w = world();
        let x = chunk(9);
        w.old_orphan(&x).await;
        let session = Arc::new(tokio::sync::Mutex::new(Session::new(&w, vec![x], Rely::RuleR)));
        let (s, other) = (session.clone(), w.session.clone());
        let key = w.ns.chunk(&x);
        w.before_gc(
            op,
            &x,
            Box::pin(async move {
                other.put(&key, Bytes::from_static(b"bytes")).await.unwrap();
                let asked = s.lock().await.open_and_plan().await;
                assert!(asked.is_empty(), "a young chunk is relied on");
            }),
        );
        w.gc().await;
        session.lock().await.commit(true).await;
        assert!(w.committed_chunks_exist().await, "gc before {op:?}");
    }
}

#[tokio::test]
async fn a_live_lease_refuses_a_second_gc_and_an_expired_one_does_not() {
    let w = world();
    let held = Lease {
        id: "other".into(),
        mark: nanos(w.clock.now()),
        deadline: nanos(w.clock.now() + GRACE / 2),
    };
    w.put(&lease_key(&w.ns), encode(&held)).await;
    let refused = collect(&w.gc, &w.ns, &Lines, &settings(), &w.clock).await;
    assert!(matches!(refused, Err(ObjectGcError::LeaseHeld { id }) if id == "other"));
    w.clock.advance(GRACE);
    assert!(collect(&w.gc, &w.ns, &Lines, &settings(), &w.clock).await.is_ok());
}

#[tokio::test]
async fn rule_c_costs_one_list_and_no_wait_without_an_overlapping_gc() {
    let w = world();
    let x = chunk(1);
    w.put(&w.ns.chunk(&x), Bytes::from_static(b"bytes")).await;
    let before = w.clock.now();
    let missing = confirm_before_commit(&w.session, &w.ns, before, &[(x, before)], &settings(), &w.clock)
        .await
        .unwrap();
    assert!(missing.is_empty());
    assert!(w.clock.now() < before + Duration::from_secs(1), "no wait");
}

fn parse_hex_hash(text: &str) -> Option<Hash> {
    let layout = Layout::new("", "");
    layout.parse_chunk(
        &layout
            .chunk_shard(u8::from_str_radix(text.get(..2)?, 16).ok()?)
            .join(text),
    )
}

/// The real codec: a committed file's chunks, an open record's chunks; an inline file, a directory and a symlink
/// name none; a damaged object stops the run.
#[test]
fn manifest_references_name_chunk_objects_only() {
    use crate::storage::object::layout::{ReuseRule, ServerId, TransferId};
    let data = vec![7u8; 100];
    let manifest = crate::manifest::Manifest {
        size: 100,
        digest: *blake3::hash(&data).as_bytes(),
        chunking: crate::manifest::Chunking::Fixed { size: 1 << 20 },
        mtime: crate::manifest::FileTime::default(),
        mode: 0o644,
        chunks: vec![crate::manifest::ChunkEntry {
            offset: 0,
            len: 100,
            hash: *blake3::hash(&data).as_bytes(),
        }],
    };
    let entry = |kind| EntryObject {
        manifest_id: match &kind {
            EntryKind::File { manifest, .. } => manifest.id(),
            _ => [0; 32],
        },
        kind,
        committed_at: 1,
        received_bytes: 0,
        reused_bytes: 0,
        rejected_chunks: 0,
        transfer: TransferId::random(),
        server: ServerId::random(),
    };
    let files = Path::from("ns/root/files/a");
    let hashes: Vec<Hash> = manifest.chunks.iter().map(|c| c.hash).collect();
    let chunked = entry(EntryKind::File {
        manifest: manifest.clone(),
        inline: None,
    });
    assert_eq!(ManifestReferences.chunks(&files, &chunked.encode()).unwrap(), hashes);
    let inline = entry(EntryKind::File {
        manifest: manifest.clone(),
        inline: Some(serde_bytes::ByteBuf::from(data.clone())),
    });
    assert!(ManifestReferences.chunks(&files, &inline.encode()).unwrap().is_empty());
    let link = entry(EntryKind::Symlink { target: "b".into() });
    assert!(ManifestReferences.chunks(&files, &link.encode()).unwrap().is_empty());
    let record = OpenRecord {
        path: "a".into(),
        manifest,
        reuse: ReuseRule::Full,
        created: 1,
        server: ServerId::random(),
        transfer: TransferId::random(),
    };
    let open = Path::from("ns/root/open/p/t");
    assert_eq!(ManifestReferences.chunks(&open, &record.encode()).unwrap(), hashes);
    assert!(ManifestReferences.chunks(&files, b"ferry-entry v1\ngarbage").is_err());
    assert!(
        ManifestReferences.chunks(&open, &chunked.encode()).is_err(),
        "an entry is not a record"
    );
}

#[test]
fn namespace_directories_map_back_to_their_names() {
    assert_eq!(namespace_name("root").as_deref(), Some(""));
    let named = Layout::new("", "team-a");
    assert_eq!(
        namespace_name(named.namespace().filename().unwrap()).as_deref(),
        Some("team-a")
    );
    assert_eq!(namespace_name("ROOT"), None);
    assert_eq!(namespace_name("7465616D2D61"), None, "only the canonical lowercase hex");
    assert_eq!(namespace_name("7"), None);
}

/// The object volume's commit path against a gc run: the session relies on a chunk (rule R (c), listed young)
/// whose old copy gc's HEAD saw, and gc deletes it. The commit's rule C finds it gone: nothing is committed, the
/// journal retracts it (the durable set asks for it again), and once it is stored again the commit names only
/// chunks that exist. Without the rule-C call in `place`, the manifest would name the deleted chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_volume_commit_asks_again_for_a_chunk_gc_deleted_after_the_session_relied_on_it() {
    use crate::manifest::{ChunkEntry, Chunking, FileTime, Manifest};
    use crate::path::RemotePath;
    use crate::storage::object::layout::ReuseRule;
    use crate::storage::object::volume::{ObjectOptions, ObjectVolume};
    use crate::storage::{StorageError, Volume};

    const LEN: usize = 256 * 1024;
    let bytes: Vec<u8> = (0..3 * LEN).map(|i| (i / LEN) as u8 ^ (i % 251) as u8).collect();
    let chunks: Vec<ChunkEntry> = bytes
        .chunks(LEN)
        .enumerate()
        .map(|(i, data)| ChunkEntry {
            offset: (i * LEN) as u64,
            len: LEN as u32,
            hash: *blake3::hash(data).as_bytes(),
        })
        .collect();
    let manifest = Arc::new(Manifest {
        size: bytes.len() as u64,
        digest: *blake3::hash(&bytes).as_bytes(),
        chunking: Chunking::Fixed { size: LEN as u32 },
        mtime: FileTime { secs: 1, nanos: 0 },
        mode: 0o600,
        chunks: chunks.clone(),
    });
    let x = chunks[1].hash;
    let w = world();
    // X: stored long ago as gc sees it (an old orphan), yet listed young by the session (another transfer's fresh
    // PUT that gc's HEAD did not see).
    w.put(&w.ns.chunk(&x), Bytes::copy_from_slice(&bytes[LEN..2 * LEN]))
        .await;
    w.clock.advance(2 * GRACE);
    // The mark a second before the session's record: the fake clock advances a millisecond per request of gc,
    // so starting at the real "now" could put the mark after the record.
    let real = SystemTime::now() - Duration::from_secs(1);
    let fake = w.clock.now();
    if let Ok(ahead) = real.duration_since(fake) {
        w.clock.advance(ahead);
    }
    let options = ObjectOptions {
        confirm_wait: Duration::ZERO,
        ..ObjectOptions::default()
    };
    let handle = tokio::runtime::Handle::current();
    let volume = Arc::new(ObjectVolume::new(
        handle,
        w.gc.shared.inner.clone(),
        "ferry",
        "",
        options,
    ));
    let dest = RemotePath::parse("f.bin").unwrap();
    let write = {
        let (bytes, manifest) = (bytes.clone(), manifest.clone());
        move |partial: &crate::storage::Partial, index: usize| {
            let c = manifest.chunks[index];
            let at = c.offset as usize..c.offset as usize + c.len as usize;
            partial.write_at(&bytes[at], c.offset).unwrap();
        }
    };
    let (v, d, m, wr) = (volume.clone(), dest.clone(), manifest.clone(), write.clone());
    let session = Box::pin(async move {
        tokio::task::spawn_blocking(move || {
            let durable = v.durable(&d, &m, ReuseRule::Full).unwrap();
            assert_eq!(present(&durable.chunks), vec![1], "X relied on by rule R (c)");
            let partial = v.open_for(&d, &m, ReuseRule::Full).unwrap();
            wr(&partial, 0);
            wr(&partial, 2);
            partial.sync_data().unwrap();
        })
        .await
        .unwrap();
    });
    w.before_gc(Op::Delete, &x, session);
    let report = w.gc().await;
    assert_eq!(
        report.chunks_deleted, 1,
        "the schedule deletes X after the session relied on it"
    );

    let (v, d, m) = (volume.clone(), dest.clone(), manifest.clone());
    tokio::task::spawn_blocking(move || {
        let partial = v.open_for(&d, &m, ReuseRule::Full).unwrap();
        partial.sync_all().unwrap();
        let verified = partial.identity().unwrap();
        match v.place(d.as_str(), &d, &verified) {
            Err(StorageError::ChunksGone { chunks, .. }) => assert_eq!(chunks, vec![1]),
            Err(e) => panic!("unexpected: {e}"),
            Ok(_) => panic!("committed a manifest naming a deleted chunk"),
        }
        assert_eq!(v.committed_id(&d).unwrap(), None, "nothing committed");
        // The bucket's journal forgot X: any server's next round asks for it.
        let durable = v.durable(&d, &m, ReuseRule::Full).unwrap();
        assert_eq!(present(&durable.chunks), vec![0, 2]);
        write(&partial, 1);
        partial.sync_all().unwrap();
        let verified = partial.identity().unwrap();
        v.place(d.as_str(), &d, &verified).unwrap();
        assert_eq!(v.committed_id(&d).unwrap(), Some(m.id()));
    })
    .await
    .unwrap();
    for c in &chunks {
        let key = w.ns.chunk(&c.hash);
        assert!(
            Bucket::head(&w.gc.shared.inner, &key).await.is_ok(),
            "a committed chunk is missing"
        );
    }
}

fn present(set: &crate::ranges::ChunkSet) -> Vec<u32> {
    (0..set.len()).filter(|&i| set.contains(i)).collect()
}
