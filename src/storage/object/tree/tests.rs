use super::*;
use object_store::memory::InMemory;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The trees of server `server` over `store`, with the gc grace period `grace`.
fn trees(rt: &tokio::runtime::Runtime, store: &Arc<InMemory>, grace: Duration) -> ObjectTrees {
    let store: Arc<dyn ObjectStore> = store.clone();
    let options = ObjectOptions {
        grace,
        ..ObjectOptions::default()
    };
    ObjectTrees::new(
        rt.handle().clone(),
        store,
        Layout::new("", ""),
        ServerId::random(),
        options,
    )
}

fn path(text: &str) -> RemotePath {
    RemotePath::parse(text).unwrap()
}

const WHEN: FileTime = FileTime {
    secs: 1_500_000_000,
    nanos: 7,
};

fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
}

/// Stages and settles `files` as one batch; the results in order.
fn commit(trees: &ObjectTrees, files: &[(&str, &[u8])]) -> Vec<Settled> {
    let staged = files
        .iter()
        .map(|(p, data)| (path(p), trees.stage(&path(p), data, 0o640, WHEN).unwrap()))
        .collect();
    trees.settle(staged).unwrap()
}

fn stored(rt: &tokio::runtime::Runtime, store: &InMemory, p: &str) -> Option<layout::StoredEntry> {
    let key = Layout::new("", "").file(&path(p)).unwrap();
    rt.block_on(layout::get_entry(store, &key)).unwrap()
}

fn keys(rt: &tokio::runtime::Runtime, store: &InMemory, under: &str) -> Vec<String> {
    let prefix = Layout::new("", "").namespace().clone().join(under);
    let listed = rt.block_on(layout::list(store, &prefix)).unwrap();
    listed.into_iter().map(|m| m.location.to_string()).collect()
}

#[test]
fn a_batch_stores_small_files_inline_and_larger_ones_as_a_chunk_and_another_server_finds_them_unchanged() {
    let rt = runtime();
    let store = Arc::new(InMemory::new());
    let a = trees(&rt, &store, Duration::from_secs(3600));
    let (small, mid) = (bytes(100, 1), bytes(200 * 1024, 2));
    let settled = commit(&a, &[("t/small.txt", &small), ("t/mid.bin", &mid), ("t/empty", &[])]);
    assert!(settled.iter().all(Result::is_ok), "{settled:?}");

    let inline = stored(&rt, &store, "t/small.txt").unwrap();
    let EntryKind::File { manifest, inline } = inline.entry.kind else {
        panic!("a file")
    };
    assert_eq!(
        inline.as_ref().map(|b| &b[..]),
        Some(&small[..]),
        "≤ 64 KiB: inline in the manifest object"
    );
    assert_eq!((manifest.mode, manifest.mtime), (0o640, WHEN));
    let chunked = stored(&rt, &store, "t/mid.bin").unwrap();
    assert!(matches!(chunked.entry.kind, EntryKind::File { inline: None, .. }));
    let chunks = keys(&rt, &store, "chunks");
    assert_eq!(chunks.len(), 1, "one chunk object, for the 200 KiB file: {chunks:?}");
    assert!(keys(&rt, &store, "open").is_empty(), "the batch record is gone");

    // Another server, with no state of its own, reads the bucket.
    let b = trees(&rt, &store, Duration::from_secs(3600));
    let found = b.stored_file(&path("t/mid.bin")).unwrap();
    assert_eq!(
        (found.size, found.digest, found.mtime),
        (mid.len() as u64, *blake3::hash(&mid).as_bytes(), WHEN)
    );
    let ino = settled[1].as_ref().unwrap().ino;
    assert!(b.unchanged(&path("t/mid.bin"), mid.len() as u64, ino, WHEN));
    assert!(!b.unchanged(&path("t/mid.bin"), mid.len() as u64, ino ^ 1, WHEN));
    assert_eq!(b.read_committed("t/small.txt", 0, 100), Some(small));
    assert_eq!(b.read_committed("t/mid.bin", 0, mid.len()), Some(mid));
}

/// Rule R for a tree's chunk: a chunk object younger than G/2 is relied on (no PUT), an older one is PUT again
/// (which renews it for gc).
#[test]
fn an_existing_chunk_is_put_again_only_when_it_may_not_be_relied_on() {
    let rt = runtime();
    let store = Arc::new(InMemory::new());
    let mid = bytes(100 * 1024, 3);
    let chunk = Layout::new("", "").chunk(blake3::hash(&mid).as_bytes());
    rt.block_on(layout::put(&*store, &chunk, Bytes::from(mid.clone())))
        .unwrap();
    let etag = || rt.block_on(layout::head(&*store, &chunk)).unwrap().unwrap().e_tag;
    let before = etag();

    let young = trees(&rt, &store, Duration::from_secs(3600));
    assert!(commit(&young, &[("a.bin", &mid)])[0].is_ok());
    assert_eq!(etag(), before, "listed younger than G/2: relied on, not PUT");

    let old = trees(&rt, &store, Duration::ZERO);
    assert!(commit(&old, &[("b.bin", &mid)])[0].is_ok());
    assert_ne!(etag(), before, "older than G/2: PUT again");
}

#[test]
fn a_path_is_never_both_a_file_and_a_directory() {
    let rt = runtime();
    let store = Arc::new(InMemory::new());
    let t = trees(&rt, &store, Duration::from_secs(3600));
    t.make_dir(&path("d/sub")).unwrap();
    assert!(
        matches!(stored(&rt, &store, "d").unwrap().entry.kind, EntryKind::Dir { .. }),
        "parents too"
    );
    assert!(commit(&t, &[("f", b"file")])[0].is_ok());

    let settled = commit(&t, &[("d/sub", b"x"), ("f/inside", b"y"), ("d/ok", b"z")]);
    assert!(
        settled[0].as_ref().unwrap_err().contains("is a directory"),
        "{settled:?}"
    );
    assert!(
        settled[1].as_ref().unwrap_err().contains("not a directory"),
        "{settled:?}"
    );
    assert!(settled[2].is_ok());
    assert!(t.make_dir(&path("f/x")).is_err(), "no directory under a file");
    assert!(t.make_dir(&path("f")).is_err(), "no directory over a file");
    assert!(t.blocked(&path("d")).is_some());
    assert!(
        t.place_symlink(None, "d", &path("d"), "f").is_err(),
        "no symlink over a directory"
    );
    t.place_symlink(None, "l", &path("l"), "f").unwrap();
    assert!(commit(&t, &[("l", b"over a link")])[0].is_err());
    let settled = t.place_symlink(None, "m", &path("m"), "l/x");
    assert!(
        settled.unwrap_err().contains("existing symlink"),
        "never through a link"
    );
    // A directory that only the files below it make (no `Dir` object, as single-file pushes leave it) is one too.
    assert!(commit(&t, &[("g/h", b"below")])[0].is_ok());
    assert!(stored(&rt, &store, "g").is_none(), "no Dir object for g");
    let settled = commit(&t, &[("g", b"over files"), ("gh", b"a neighbour")]);
    assert!(
        settled[0].as_ref().unwrap_err().contains("is a directory"),
        "{settled:?}"
    );
    assert!(settled[1].is_ok(), "{settled:?}");
}

#[test]
fn directories_keep_mode_and_mtime_and_are_rewritten_only_when_they_differ() {
    let rt = runtime();
    let store = Arc::new(InMemory::new());
    let t = trees(&rt, &store, Duration::from_secs(3600));
    t.make_dir(&path("d")).unwrap();
    t.set_dir_metadata(&[(path("d"), 0o40750, WHEN)]);
    let first = stored(&rt, &store, "d").unwrap();
    assert_eq!(
        first.entry.kind,
        EntryKind::Dir {
            mode: 0o750,
            mtime: WHEN
        }
    );
    t.make_dir(&path("d")).unwrap();
    t.set_dir_metadata(&[(path("d"), 0o750, WHEN)]);
    assert_eq!(
        stored(&rt, &store, "d").unwrap().e_tag,
        first.e_tag,
        "unchanged: not PUT again"
    );
}

#[test]
fn prune_removes_only_what_the_tree_does_not_hold_and_only_inside_its_directory() {
    let rt = runtime();
    let store = Arc::new(InMemory::new());
    let t = trees(&rt, &store, Duration::from_secs(3600));
    t.make_dir(&path("t/gone")).unwrap();
    let files = [
        ("t/keep", &b"k"[..]),
        ("t/old", b"o"),
        ("t/gone/x", b"x"),
        ("t/f", b"f"),
        ("tx", b"s"),
    ];
    assert!(commit(&t, &files).iter().all(Result::is_ok));
    assert!(commit(&t, &[("other/y", b"y")])[0].is_ok());

    let held = |p: &str| match p {
        "keep" | "f" => Some(false),
        _ => None,
    };
    let pruned = t.prune_beyond(&path("t"), &held).unwrap().unwrap();
    assert_eq!(pruned.removed, ["gone/x", "old", "gone"], "content first");
    assert!(pruned.failed.is_empty());
    for kept in ["t", "t/keep", "t/f", "tx", "other/y"] {
        assert!(stored(&rt, &store, kept).is_some(), "{kept} stays");
    }
    assert!(stored(&rt, &store, "t/old").is_none());
}

#[test]
fn a_tree_copied_out_of_the_bucket_has_every_entry_with_its_metadata() {
    use std::os::unix::fs::PermissionsExt;
    let rt = runtime();
    let store = Arc::new(InMemory::new());
    let t = trees(&rt, &store, Duration::from_secs(3600));
    let mid = bytes(150 * 1024, 5);
    t.make_dir(&path("t/empty")).unwrap();
    t.make_dir(&path("t/sub")).unwrap();
    assert!(commit(&t, &[("t/sub/a.txt", b"inline"), ("t/mid.bin", &mid)])
        .iter()
        .all(Result::is_ok));
    t.place_symlink(Some(&path("t")), "link", &path("t/link"), "sub/a.txt")
        .unwrap();
    t.set_dir_metadata(&[(path("t/sub"), 0o700, WHEN), (path("t/empty"), 0o755, WHEN)]);

    assert!(
        t.tree_copy(&path("t/mid.bin")).unwrap().is_none(),
        "a file is not a tree"
    );
    assert!(t.tree_copy(&path("nothing")).unwrap().is_none());
    let copy = t.tree_copy(&path("t")).unwrap().unwrap();
    let top = copy.dir.path().join("t");
    assert_eq!(std::fs::read(top.join("sub/a.txt")).unwrap(), b"inline");
    assert_eq!(std::fs::read(top.join("mid.bin")).unwrap(), mid);
    assert_eq!(
        std::fs::read_link(top.join("link")).unwrap(),
        std::path::Path::new("sub/a.txt")
    );
    let meta = std::fs::metadata(top.join("sub")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);
    assert_eq!(meta.modified().unwrap(), crate::storage::local::system_time(WHEN));
    assert!(top.join("empty").is_dir());
    let file = std::fs::metadata(top.join("mid.bin")).unwrap();
    assert_eq!(
        (file.permissions().mode() & 0o777, file.modified().unwrap()),
        (0o640, crate::storage::local::system_time(WHEN))
    );
    let mut names: Vec<&String> = copy.manifests.keys().collect();
    names.sort();
    assert_eq!(names, ["mid.bin", "sub/a.txt"]);
}

/// Rule R's basis for a tree's chunks: from before the first chunk is relied on or PUT until the manifest objects
/// are, a batch record under `open/` names them, so a gc that marks meanwhile keeps them.
#[test]
fn a_batch_record_names_the_chunks_before_their_manifests_are_put() {
    use crate::storage::object_gc::{ManifestReferences, References};
    let rt = runtime();
    let store = Arc::new(InMemory::new());
    let t = trees(&rt, &store, Duration::from_secs(3600));
    let mid = bytes(100 * 1024, 9);
    let staged = t.stage(&path("a.bin"), &mid, 0o644, WHEN).unwrap();
    let pending = t.pending.lock().unwrap().remove(&staged_id(&staged).unwrap()).unwrap();
    let batch = [(0usize, path("a.bin"), pending)];
    let chunked: Vec<_> = batch.iter().collect();
    rt.block_on(t.store_chunks(&chunked)).unwrap();

    assert_eq!(keys(&rt, &store, "chunks").len(), 1);
    assert!(keys(&rt, &store, "files").is_empty(), "nothing committed yet");
    let open = keys(&rt, &store, "open");
    assert_eq!(open.len(), 1, "{open:?}");
    let key = Path::from(open[0].as_str());
    let record = rt
        .block_on(layout::get(&*store, &key, layout::MAX_MANIFEST_OBJECT))
        .unwrap()
        .unwrap();
    let named = ManifestReferences.chunks(&key, &record.bytes).unwrap();
    assert_eq!(named, [*blake3::hash(&mid).as_bytes()], "gc's mark keeps the chunk");
}

/// An [`InMemory`] store whose GETs wait until `hold_until` of them run at once (then every GET passes), or until
/// a patience ran out (so a sequential reader fails its test instead of hanging it); it counts the most at once.
#[derive(Debug)]
struct GetGate {
    inner: Arc<InMemory>,
    hold_until: usize,
    running: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
    open: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Display for GetGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GetGate({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for GetGate {
    async fn put_opts(
        &self,
        location: &Path,
        payload: object_store::PutPayload,
        opts: object_store::PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: object_store::GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.running.fetch_add(1, SeqCst) + 1;
        self.most.fetch_max(now, SeqCst);
        if now >= self.hold_until {
            self.open.send_replace(true);
        }
        let mut open = self.open.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(2), open.wait_for(|open| *open)).await;
        let result = self.inner.get_opts(location, options).await;
        self.running.fetch_sub(1, SeqCst);
        result
    }

    fn delete_stream(
        &self,
        locations: futures_util::stream::BoxStream<'static, object_store::Result<Path>>,
    ) -> futures_util::stream::BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(
        &self,
        prefix: Option<&Path>,
    ) -> futures_util::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<object_store::ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: object_store::CopyOptions) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

/// Held content of a batch is read with several GETs in flight at once (the default reads one at a time), and
/// every read comes back in order, inline or from its chunk object.
#[test]
fn a_batch_of_committed_reads_keeps_several_gets_in_flight() {
    let rt = runtime();
    let store = Arc::new(InMemory::new());
    let a = trees(&rt, &store, Duration::from_secs(3600));
    let files: Vec<(String, Vec<u8>)> = (0..4u8)
        .map(|i| {
            (
                format!("t/f{i}"),
                bytes(if i == 3 { 200 * 1024 } else { 100 + usize::from(i) }, i),
            )
        })
        .collect();
    let batch: Vec<(&str, &[u8])> = files.iter().map(|(p, d)| (p.as_str(), d.as_slice())).collect();
    assert!(commit(&a, &batch).iter().all(Result::is_ok));

    let gate = Arc::new(GetGate {
        inner: store.clone(),
        hold_until: 4,
        running: Default::default(),
        most: Default::default(),
        open: tokio::sync::watch::Sender::new(false),
    });
    let gated: Arc<dyn ObjectStore> = gate.clone();
    let options = ObjectOptions {
        parallel: 4,
        ..ObjectOptions::default()
    };
    let b = ObjectTrees::new(
        rt.handle().clone(),
        gated,
        Layout::new("", ""),
        ServerId::random(),
        options,
    );
    let reads: Vec<CommittedRead> = files
        .iter()
        .map(|(p, d)| CommittedRead {
            path: p.clone(),
            offset: 0,
            len: d.len(),
        })
        .collect();
    let got = b.read_committed_many(&reads);
    let want: Vec<Option<Vec<u8>>> = files.into_iter().map(|(_, d)| Some(d)).collect();
    assert_eq!(got, want);
    assert_eq!(
        gate.most.load(std::sync::atomic::Ordering::SeqCst),
        4,
        "4 GETs in flight at once"
    );
}
