use super::*;
use crate::manifest::{ChunkEntry, Chunking};
use object_store::memory::InMemory;

const CHUNK: usize = 256 * 1024;

/// A file of `chunks` distinct chunks of [`CHUNK`] bytes (different for each `seed`), and its manifest.
fn file(chunks: usize, seed: u8) -> (Vec<u8>, Arc<Manifest>) {
    let bytes: Vec<u8> = (0..chunks * CHUNK)
        .map(|i| (i / CHUNK) as u8 ^ seed ^ (i % 251) as u8)
        .collect();
    let entries = bytes
        .chunks(CHUNK)
        .enumerate()
        .map(|(i, data)| ChunkEntry {
            offset: (i * CHUNK) as u64,
            len: data.len() as u32,
            hash: *blake3::hash(data).as_bytes(),
        })
        .collect();
    let manifest = Manifest {
        size: bytes.len() as u64,
        digest: *blake3::hash(&bytes).as_bytes(),
        chunking: Chunking::Fixed { size: CHUNK as u32 },
        mtime: FileTime { secs: 100, nanos: 5 },
        mode: 0o640,
        chunks: entries,
    };
    (bytes, Arc::new(manifest))
}

fn volume(rt: &tokio::runtime::Runtime, store: &Arc<InMemory>) -> ObjectVolume {
    let store: Arc<dyn ObjectStore> = store.clone();
    ObjectVolume::new(rt.handle().clone(), store, "", "", ObjectOptions::default())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn path(text: &str) -> RemotePath {
    RemotePath::parse(text).unwrap()
}

fn write_chunks(partial: &Partial, bytes: &[u8], manifest: &Manifest, indices: &[u32]) {
    for &i in indices {
        let c = manifest.chunks[i as usize];
        partial
            .write_at(
                &bytes[c.offset as usize..(c.offset + u64::from(c.len)) as usize],
                c.offset,
            )
            .unwrap();
    }
}

/// Pushes a one-chunk file to `dest` through `volume` and commits it.
fn commit_one_chunk(volume: &ObjectVolume, dest: &RemotePath) {
    let (bytes, manifest) = file(1, 0);
    let partial = volume.open_for(dest, &manifest, ReuseRule::InPlace).unwrap();
    write_chunks(&partial, &bytes, &manifest, &[0]);
    partial.sync_all().unwrap();
    volume.place(dest.as_str(), dest, &partial.identity().unwrap()).unwrap();
}

/// A volume over a [`GatedStore`](crate::storage::object::gated::GatedStore) for `manifest` (chunk PUTs held until
/// `hold_until` of them run at once, 5 s of patience), the store as the volume sees it, and the volume.
fn gated_volume(
    rt: &tokio::runtime::Runtime,
    manifest: &Arc<Manifest>,
    hold_until: usize,
) -> (
    Arc<crate::storage::object::gated::GatedStore>,
    Arc<dyn ObjectStore>,
    ObjectVolume,
) {
    let gated = Arc::new(crate::storage::object::gated::GatedStore::new(
        Layout::new("", ""),
        manifest.clone(),
        hold_until,
        Duration::from_secs(5),
    ));
    let store: Arc<dyn ObjectStore> = gated.clone();
    let volume = ObjectVolume::new(rt.handle().clone(), store.clone(), "", "", ObjectOptions::default());
    (gated, store, volume)
}

fn present(set: &ChunkSet) -> Vec<u32> {
    (0..set.len()).filter(|&i| set.contains(i)).collect()
}

fn keys_under(rt: &tokio::runtime::Runtime, store: &InMemory, prefix: &object_store::path::Path) -> usize {
    rt.block_on(layout::list(store, prefix)).unwrap().len()
}

/// Keys under `prefix` once none are left, or after a bounded number of looks (deletes run in the background).
fn eventually_none(rt: &tokio::runtime::Runtime, store: &dyn ObjectStore, prefix: &object_store::path::Path) -> usize {
    let mut left = usize::MAX;
    for _ in 0..500 {
        left = rt.block_on(layout::list(store, prefix)).unwrap().len();
        if left == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    left
}

#[test]
fn a_transfer_journaled_by_one_server_is_adopted_and_committed_by_another() {
    let rt = runtime();
    let store = Arc::new(InMemory::new());
    let (bytes, manifest) = file(4, 1);
    let dest = path("dir/f.bin");
    let a = volume(&rt, &store);
    let b = volume(&rt, &store);
    assert_ne!(a.server(), b.server());

    let durable = a.durable(&dest, &manifest, ReuseRule::InPlace).unwrap();
    assert_eq!(durable.chunks.present(), 0);
    let partial = a.open_for(&dest, &manifest, ReuseRule::InPlace).unwrap();
    write_chunks(&partial, &bytes, &manifest, &[0, 1]);
    partial.sync_data().unwrap();
    // Written but never synced: its object may exist, but no journal names it, so it is not durable.
    write_chunks(&partial, &bytes, &manifest, &[2]);
    drop(partial);

    // Server B, which never saw the transfer: the bucket's journal is the durable set (one record, adopted).
    let durable = b.durable(&dest, &manifest, ReuseRule::InPlace).unwrap();
    assert_eq!(present(&durable.chunks), vec![0, 1]);
    assert_eq!(durable.received_bytes, 2 * CHUNK as u64);
    let records = rt
        .block_on(layout::list_records(&*store, b.layout(), PathId::of(&dest)))
        .unwrap();
    assert_eq!(records.len(), 1, "adopted, not a second record");

    let partial = b.open_for(&dest, &manifest, ReuseRule::InPlace).unwrap();
    write_chunks(&partial, &bytes, &manifest, &[2, 3]);
    partial.sync_data().unwrap();
    // The whole file reads back: chunks 0 and 1 by GET (A stored them), 2 and 3 from B's cache.
    let mut back = vec![0u8; bytes.len()];
    partial.read_exact_at(&mut back, 0).unwrap();
    assert_eq!(back, bytes);
    partial.set_metadata(0o600, FileTime { secs: 9, nanos: 0 }).unwrap();
    partial.sync_all().unwrap();
    let verified = partial.identity().unwrap();
    b.place(dest.as_str(), &dest, &verified).unwrap().sync().unwrap();

    // Committed: the manifest object is there, with the applied metadata; record and journal are gone.
    assert_eq!(a.committed_id(&dest).unwrap(), Some(manifest.id()));
    let seen = a.stat_final(&dest).unwrap();
    assert!(seen.is_file);
    assert_eq!((seen.len, seen.mtime), (manifest.size, FileTime { secs: 9, nanos: 0 }));
    assert_eq!(keys_under(&rt, &store, &a.layout().open()), 0);
    let journal = a.layout().namespace().clone().join("journal");
    assert_eq!(
        eventually_none(&rt, &*store, &journal),
        0,
        "the journal deleted after the commit"
    );
    assert_eq!(
        keys_under(&rt, &store, &a.layout().chunks()),
        4,
        "one object per distinct chunk"
    );
}

#[test]
fn an_offer_of_another_manifest_opens_its_own_record_and_sees_no_foreign_journal() {
    let rt = runtime();
    let store = Arc::new(InMemory::new());
    let (bytes, manifest) = file(3, 1);
    let (_, other) = file(3, 2);
    let dest = path("f");
    let a = volume(&rt, &store);
    let partial = a.open_for(&dest, &manifest, ReuseRule::InPlace).unwrap();
    write_chunks(&partial, &bytes, &manifest, &[0, 1, 2]);
    partial.sync_data().unwrap();

    let b = volume(&rt, &store);
    let durable = b.durable(&dest, &other, ReuseRule::InPlace).unwrap();
    assert_eq!(durable.chunks.present(), 0);
    let records = rt
        .block_on(layout::list_records(&*store, b.layout(), PathId::of(&dest)))
        .unwrap();
    assert_eq!(
        records.len(),
        2,
        "each manifest its own record; the other is left alone"
    );
}

#[test]
fn full_clients_rely_on_young_chunks_in_place_clients_only_on_the_live_file_at_the_same_place() {
    let rt = runtime();
    let store = Arc::new(InMemory::new());
    let (bytes, manifest) = file(3, 7);
    let a = volume(&rt, &store);
    let first = path("first");
    let partial = a.open_for(&first, &manifest, ReuseRule::Full).unwrap();
    write_chunks(&partial, &bytes, &manifest, &[0, 1, 2]);
    partial.sync_all().unwrap();
    a.place(first.as_str(), &first, &partial.identity().unwrap()).unwrap();
    let chunk_objects = keys_under(&rt, &store, &a.layout().chunks());

    // A copy to another path by a full client: every chunk may be relied on, and that is journaled.
    let b = volume(&rt, &store);
    let copy = path("copy");
    let durable = b.durable(&copy, &manifest, ReuseRule::Full).unwrap();
    assert!(durable.chunks.is_complete());
    assert_eq!(durable.reused_bytes, manifest.size);
    let c = volume(&rt, &store);
    assert!(
        c.durable(&copy, &manifest, ReuseRule::Full)
            .unwrap()
            .chunks
            .is_complete(),
        "journaled for the transfer: another server sees it durable"
    );
    assert_eq!(keys_under(&rt, &store, &a.layout().chunks()), chunk_objects);

    // An in-place client learns nothing of other paths...
    let third = path("third");
    assert_eq!(
        b.durable(&third, &manifest, ReuseRule::InPlace)
            .unwrap()
            .chunks
            .present(),
        0
    );
    // ...but may rely on the live file at its own path, at the same place only.
    let mut shifted = (*manifest).clone();
    shifted.chunks[1].hash = [0xaa; 32];
    let shifted = Arc::new(shifted);
    let durable = b.durable(&first, &shifted, ReuseRule::InPlace).unwrap();
    assert_eq!(present(&durable.chunks), vec![0, 2]);
}

#[test]
fn a_missing_chunk_object_reads_as_damage_not_as_an_error() {
    let rt = runtime();
    let store = Arc::new(InMemory::new());
    let (bytes, manifest) = file(2, 3);
    let a = volume(&rt, &store);
    let dest = path("f");
    let partial = a.open_for(&dest, &manifest, ReuseRule::InPlace).unwrap();
    write_chunks(&partial, &bytes, &manifest, &[0, 1]);
    partial.sync_data().unwrap();
    rt.block_on(layout::delete_all(
        &*store,
        vec![a.layout().chunk(&manifest.chunks[0].hash)],
    ))
    .unwrap();
    // A fresh handle (no cache): chunk 0 reads as zeros, so its hash check fails and it is asked for again.
    let b = volume(&rt, &store);
    let partial = b.open_for(&dest, &manifest, ReuseRule::InPlace).unwrap();
    let mut back = vec![1u8; CHUNK];
    partial.read_exact_at(&mut back, 0).unwrap();
    assert!(back.iter().all(|&b| b == 0));
    partial.read_exact_at(&mut back, CHUNK as u64).unwrap();
    assert_eq!(back, bytes[CHUNK..]);
}

#[test]
fn keys_too_long_for_the_store_are_refused_before_anything_is_written() {
    let rt = runtime();
    let store = Arc::new(InMemory::new());
    let a = volume(&rt, &store);
    let long = path(
        &[
            "d".repeat(250),
            "e".repeat(250),
            "f".repeat(250),
            "g".repeat(250),
            "h".repeat(10),
        ]
        .join("/"),
    );
    assert!(matches!(a.prepare_destination(&long), Err(StorageError::Layout(_))));
    // A committed file on the way is not a directory.
    commit_one_chunk(&a, &path("p"));
    assert!(matches!(
        a.prepare_destination(&path("p/child")),
        Err(StorageError::BadPath(_))
    ));
    assert!(a.prepare_destination(&path("q/child")).is_ok());
}

/// A path with committed files below it is a directory, though no `Dir` object says so (single-file pushes make
/// none): a file is refused there, before a byte is sent, as on a local root.
#[test]
fn a_file_is_refused_where_committed_files_make_a_directory() {
    let rt = runtime();
    let store = Arc::new(InMemory::new());
    let a = volume(&rt, &store);
    let below = path("d/x");
    commit_one_chunk(&a, &below);
    assert!(matches!(
        a.prepare_destination(&path("d")),
        Err(StorageError::BadPath(crate::path::PathError::InTheWay(_)))
    ));
    // A name that only starts like the directory's is free, and so is the committed file's own path.
    assert!(a.prepare_destination(&path("dx")).is_ok());
    assert!(a.prepare_destination(&below).is_ok());
}

/// The engine calls the seam from `spawn_blocking` threads of the server's runtime, where `Handle::block_on` is
/// allowed (on an async worker thread it panics): the whole push path, driven from such a thread.
#[test]
fn the_volume_works_from_the_runtimes_blocking_threads() {
    let rt = runtime();
    let store = Arc::new(InMemory::new());
    let (bytes, manifest) = file(3, 9);
    let volume = Arc::new(volume(&rt, &store));
    let committed = rt.block_on(async move {
        tokio::task::spawn_blocking(move || {
            let dest = path("from/blocking");
            volume.prepare_destination(&dest).unwrap();
            let durable = volume.durable_elsewhere(&dest, &manifest, true).unwrap();
            assert_eq!(durable.present(), 0);
            let partial = volume.open_partial_for(dest.as_str(), &manifest, true, false).unwrap();
            write_chunks(&partial, &bytes, &manifest, &[0, 1, 2]);
            partial.sync_all().unwrap();
            let mut back = vec![0u8; bytes.len()];
            partial.read_exact_at(&mut back, 0).unwrap();
            assert_eq!(back, bytes);
            volume
                .place(dest.as_str(), &dest, &partial.identity().unwrap())
                .unwrap();
            volume.committed_manifest_id(&dest).unwrap()
        })
        .await
        .unwrap()
    });
    assert!(committed.is_some());
}

/// A started sync answers only once its chunk PUTs and then its journal entry returned, and the next batch's PUTs
/// run meanwhile: two batches of two chunks reach four chunk PUTs in flight (the store holds each one until four
/// run), where a sync that waited for its own batch before returning never let more than two run.
#[test]
fn a_started_sync_lets_the_next_batch_put_while_it_runs() {
    let rt = runtime();
    let (bytes, manifest) = file(4, 7);
    let (gated, _store, volume) = gated_volume(&rt, &manifest, 4);
    let dest = path("pipelined.bin");
    let partial = volume.open_for(&dest, &manifest, ReuseRule::InPlace).unwrap();

    write_chunks(&partial, &bytes, &manifest, &[0, 1]);
    let mut first = partial.start_sync().unwrap();
    assert!(first.try_result().is_none(), "answered while its chunk PUTs were held");
    assert!(gated.journaled().is_empty(), "journaled before its chunks were stored");
    write_chunks(&partial, &bytes, &manifest, &[2, 3]);
    first.wait().unwrap();
    partial.sync_data().unwrap();

    assert_eq!(
        gated.most_in_flight(),
        4,
        "the second batch's PUTs ran beside the first's"
    );
    assert_eq!(
        gated.journaled(),
        vec![true, true],
        "each entry after the chunks it names"
    );
    let durable = volume.durable(&dest, &manifest, ReuseRule::InPlace).unwrap();
    assert_eq!(present(&durable.chunks), vec![0, 1, 2, 3]);
}

/// Batches whose chunk PUTs return while a journal entry is in flight share the next entry: with the first batch's
/// entry held by the store, the next two batches wait in the transfer's queue (not at the store), and once the
/// store lets entries pass the three batches are durable through two journal objects. A volume that PUT one entry
/// per batch sends three entries to the store (the test's wait for the queue then runs out of patience).
#[test]
fn batches_synced_while_a_journal_entry_is_in_flight_share_the_next_entry() {
    let rt = runtime();
    let (bytes, manifest) = file(3, 13);
    let (gated, store, volume) = gated_volume(&rt, &manifest, 1);
    let dest = path("grouped.bin");
    let partial = volume.open_for(&dest, &manifest, ReuseRule::InPlace).unwrap();
    let queued = || {
        let open = volume.open.lock().unwrap();
        let queue = open[dest.as_str()].journal.lock().unwrap();
        queue.waiting.len()
    };
    // Polls (yielding, never timing the code under test) until `done`, for at most the store's patience.
    let wait_for = |what: &str, done: &dyn Fn() -> bool| {
        let start = std::time::Instant::now();
        while !done() {
            assert!(start.elapsed() < Duration::from_secs(5), "never {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    };

    gated.hold_journals();
    write_chunks(&partial, &bytes, &manifest, &[0]);
    let mut first = partial.start_sync().unwrap();
    wait_for("the first entry reached the store", &|| gated.journals_held() == 1);
    write_chunks(&partial, &bytes, &manifest, &[1]);
    let mut second = partial.start_sync().unwrap();
    write_chunks(&partial, &bytes, &manifest, &[2]);
    let mut third = partial.start_sync().unwrap();
    wait_for("the next two batches queued behind it", &|| queued() == 2);
    assert!(
        first.try_result().is_none(),
        "answered before its journal entry returned"
    );
    assert!(second.try_result().is_none() && third.try_result().is_none());

    gated.release_journals();
    first.wait().unwrap();
    second.wait().unwrap();
    third.wait().unwrap();
    let journal = volume.layout().namespace().clone().join("journal");
    assert_eq!(
        rt.block_on(layout::list(&*store, &journal)).unwrap().len(),
        2,
        "one entry for the first batch, one for the two queued behind it"
    );
    assert_eq!(
        gated.journaled(),
        vec![true, true],
        "each entry after the chunks it names"
    );
    let durable = volume.durable(&dest, &manifest, ReuseRule::InPlace).unwrap();
    assert_eq!(present(&durable.chunks), vec![0, 1, 2]);
}

/// The commit answers once its manifest object and record are settled, without waiting for the transfer's journal
/// to be deleted: the store holds journal DELETEs, `place` returns with the journal still there and the record
/// gone, and the journal goes once the DELETEs pass. A `place` that deleted the journal before answering waits
/// out the store's patience and answers with the journal gone.
#[test]
fn the_commit_answers_before_the_journal_is_deleted() {
    let rt = runtime();
    let (bytes, manifest) = file(4, 9);
    let (gated, store, volume) = gated_volume(&rt, &manifest, 1);
    let dest = path("committed.bin");
    let partial = volume.open_for(&dest, &manifest, ReuseRule::InPlace).unwrap();
    write_chunks(&partial, &bytes, &manifest, &[0, 1, 2, 3]);
    partial.sync_all().unwrap();
    let verified = partial.identity().unwrap();
    let journal = volume.layout().namespace().clone().join("journal");
    assert!(!rt.block_on(layout::list(&*store, &journal)).unwrap().is_empty());

    gated.hold_deletes();
    volume.place(dest.as_str(), &dest, &verified).unwrap();
    assert_eq!(volume.committed_id(&dest).unwrap(), Some(manifest.id()));
    assert_eq!(
        rt.block_on(layout::list(&*store, &volume.layout().open()))
            .unwrap()
            .len(),
        0,
        "the record is deleted before the commit answers"
    );
    assert!(
        !rt.block_on(layout::list(&*store, &journal)).unwrap().is_empty(),
        "the commit waited for the journal's DELETEs"
    );
    gated.release_deletes();
    assert_eq!(
        eventually_none(&rt, &*store, &journal),
        0,
        "the journal deleted in the background"
    );
}

/// A record whose manifest is the one committed at its path (its commit PUT landed, its DELETE did not) is
/// deleted, journal first, by the next offer of another manifest there: it no longer counts as an open transfer.
#[test]
fn the_next_offer_deletes_the_record_of_a_transfer_already_committed() {
    let rt = runtime();
    let store = Arc::new(InMemory::new());
    let (bytes, manifest) = file(4, 11);
    let a = volume(&rt, &store);
    let dest = path("left.bin");
    let partial = a.open_for(&dest, &manifest, ReuseRule::InPlace).unwrap();
    write_chunks(&partial, &bytes, &manifest, &[0, 1, 2, 3]);
    partial.sync_all().unwrap();
    // The commit PUT of a server that crashed right after it: the manifest object, the record still there.
    let entry = EntryObject {
        manifest_id: manifest.id(),
        kind: EntryKind::File {
            manifest: (*manifest).clone(),
            inline: None,
        },
        committed_at: 1,
        received_bytes: 0,
        reused_bytes: 0,
        rejected_chunks: 0,
        transfer: TransferId::random(),
        server: a.server(),
    };
    let file_key = a.layout().file(&dest).unwrap();
    rt.block_on(layout::put(&*store, &file_key, entry.encode().into()))
        .unwrap();
    assert_eq!(keys_under(&rt, &store, &a.layout().open()), 1);

    let (_, other) = file(4, 12);
    let b = volume(&rt, &store);
    b.open_for(&dest, &other, ReuseRule::InPlace).unwrap();
    let records = rt
        .block_on(layout::list_records(&*store, b.layout(), PathId::of(&dest)))
        .unwrap();
    assert_eq!(records.len(), 1, "only the new offer's record is left");
    let journal = a.layout().namespace().clone().join("journal");
    assert_eq!(
        keys_under(&rt, &store, &journal),
        0,
        "the finished transfer's journal is deleted"
    );
}
