//! The usage a volume reads from the bucket, with two servers (two volumes) on one in-memory store.

use std::sync::Arc;

use object_store::memory::InMemory;
use object_store::ObjectStore;

use crate::manifest::{ChunkEntry, Chunking, FileTime, Manifest};
use crate::path::RemotePath;
use crate::storage::object::layout::{self, PathId, ReuseRule};
use crate::storage::object::{ObjectOptions, ObjectVolume};
use crate::storage::{Partial, Volume};

const CHUNK: usize = 256 * 1024;

/// A file of `chunks` distinct chunks (different for each `seed`), and its manifest.
fn file(chunks: usize, seed: u8) -> (Vec<u8>, Arc<Manifest>) {
    let bytes: Vec<u8> = (0..chunks * CHUNK)
        .map(|i| (i / CHUNK) as u8 ^ seed ^ (i % 251) as u8)
        .collect();
    let chunks = bytes
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
        mtime: FileTime { secs: 1, nanos: 0 },
        mode: 0o644,
        chunks,
    };
    (bytes, Arc::new(manifest))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A server of `store` (namespace `""`).
fn server(rt: &tokio::runtime::Runtime, store: &Arc<InMemory>) -> ObjectVolume {
    let store: Arc<dyn ObjectStore> = store.clone();
    ObjectVolume::new(rt.handle().clone(), store, "", "", ObjectOptions::default())
}

fn path(text: &str) -> RemotePath {
    RemotePath::parse(text).unwrap()
}

fn write_all(partial: &Partial, bytes: &[u8], manifest: &Manifest, indices: &[usize]) {
    for &i in indices {
        let c = manifest.chunks[i];
        let end = (c.offset + u64::from(c.len)) as usize;
        partial.write_at(&bytes[c.offset as usize..end], c.offset).unwrap();
    }
    partial.sync_data().unwrap();
}

/// Opens, receives all of and commits `manifest` at `dest` through `volume`.
fn commit(volume: &ObjectVolume, dest: &RemotePath, bytes: &[u8], manifest: &Arc<Manifest>) {
    volume.durable(dest, manifest, ReuseRule::InPlace).unwrap();
    let partial = volume.open_for(dest, manifest, ReuseRule::InPlace).unwrap();
    write_all(
        &partial,
        bytes,
        manifest,
        &(0..manifest.chunks.len()).collect::<Vec<_>>(),
    );
    partial.sync_all().unwrap();
    let verified = partial.identity().unwrap();
    volume.place(dest.as_str(), dest, &verified).unwrap();
}

#[test]
fn a_transfer_open_on_one_server_counts_on_another() {
    let rt = runtime();
    let store = Arc::new(InMemory::new());
    let (a, b) = (server(&rt, &store), server(&rt, &store));
    let (_, big) = file(4, 1);
    let (_, small) = file(1, 2);
    let dest = path("open/big.bin");
    a.durable(&dest, &big, ReuseRule::Full).unwrap();

    let seen = b.shared_usage(&path("other"), &small.id(), false).unwrap().unwrap();
    assert_eq!((seen.open_transfers, seen.open_bytes), (1, big.size));
    assert!(seen.manifest_bytes > 0, "the record's stored bytes count");
    assert_eq!(seen.this_transfer.records, 0, "another path's transfer is not this one");
    assert_eq!((seen.committed_files, seen.committed_here), (0, None));

    // The offer of the same manifest to the same path (say, after a failover) is that transfer itself.
    let again = b.shared_usage(&dest, &big.id(), false).unwrap().unwrap();
    assert_eq!(again.this_transfer.records, 1);
    assert_eq!(again.this_transfer.bytes, big.size);
    assert_eq!(again.this_transfer.manifest_bytes, seen.manifest_bytes);
    let other_manifest = b.shared_usage(&dest, &small.id(), false).unwrap().unwrap();
    assert_eq!(
        other_manifest.this_transfer.records, 0,
        "another manifest's record stays counted"
    );
}

#[test]
fn committed_files_count_from_a_scan_and_own_commits_at_once() {
    let rt = runtime();
    let store = Arc::new(InMemory::new());
    let (a, b) = (server(&rt, &store), server(&rt, &store));
    let (bytes, manifest) = file(2, 3);
    let dest = path("dir/f.bin");
    let probe = (path("probe"), file(1, 4).1.id());

    // A scans the empty namespace, then commits: its own commit counts at once, before the next scan.
    assert_eq!(
        a.shared_usage(&probe.0, &probe.1, true)
            .unwrap()
            .unwrap()
            .committed_files,
        0
    );
    commit(&a, &dest, &bytes, &manifest);
    let seen = a.shared_usage(&dest, &probe.1, true).unwrap().unwrap();
    assert_eq!((seen.committed_files, seen.committed_bytes), (1, manifest.size));
    assert_eq!(seen.committed_here, Some(manifest.size));
    assert_eq!(seen.open_transfers, 0, "committed: no record left");

    // B, which never saw it, finds it in its first scan (an empty --state or a fresh start alike).
    let seen = b.shared_usage(&probe.0, &probe.1, true).unwrap().unwrap();
    assert_eq!((seen.committed_files, seen.committed_bytes), (1, manifest.size));
    assert_eq!(seen.committed_here, None);
    let skipped = b.shared_usage(&probe.0, &probe.1, false).unwrap().unwrap();
    assert_eq!(skipped.committed_files, 0, "not asked for: not counted");
}

#[test]
fn a_refused_offer_drops_its_fresh_record_but_never_an_adopted_or_received_one() {
    let rt = runtime();
    let store = Arc::new(InMemory::new());
    let (a, b) = (server(&rt, &store), server(&rt, &store));
    let (bytes, manifest) = file(2, 5);
    let records = |dest: &RemotePath| {
        rt.block_on(layout::list_records(&*store, a.layout(), PathId::of(dest)))
            .unwrap()
            .len()
    };

    let fresh = path("fresh");
    a.durable(&fresh, &manifest, ReuseRule::Full).unwrap();
    assert_eq!(records(&fresh), 1);
    a.refused(fresh.as_str());
    assert_eq!(records(&fresh), 0, "a record this server just wrote goes");

    let adopted = path("adopted");
    a.durable(&adopted, &manifest, ReuseRule::Full).unwrap();
    b.durable(&adopted, &manifest, ReuseRule::Full).unwrap();
    b.refused(adopted.as_str());
    assert_eq!(records(&adopted), 1, "another server's record stays");

    let received = path("received");
    a.durable(&received, &manifest, ReuseRule::Full).unwrap();
    let partial = a.open_for(&received, &manifest, ReuseRule::Full).unwrap();
    write_all(&partial, &bytes, &manifest, &[0]);
    a.refused(received.as_str());
    assert_eq!(records(&received), 1, "a record with received bytes stays");
}

#[test]
fn the_group_received_what_every_server_journaled() {
    let rt = runtime();
    let store = Arc::new(InMemory::new());
    let (a, b) = (server(&rt, &store), server(&rt, &store));
    let (bytes, manifest) = file(4, 6);
    let dest = path("f.bin");
    a.durable(&dest, &manifest, ReuseRule::InPlace).unwrap();
    let partial = a.open_for(&dest, &manifest, ReuseRule::InPlace).unwrap();
    write_all(&partial, &bytes, &manifest, &[0, 1]);
    assert_eq!(a.received_by_group(dest.as_str()), Some(2 * CHUNK as u64));

    b.durable(&dest, &manifest, ReuseRule::InPlace).unwrap();
    let partial = b.open_for(&dest, &manifest, ReuseRule::InPlace).unwrap();
    write_all(&partial, &bytes, &manifest, &[2, 3]);
    assert_eq!(b.received_by_group(dest.as_str()), Some(4 * CHUNK as u64));
    assert_eq!(b.received_by_group("never-offered"), None);
}
