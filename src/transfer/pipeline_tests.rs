//! The writer over an object store (`ObjectVolume` on a [`GatedStore`]): a batch's sync runs while the next
//! batch's chunk PUTs start, and every Ack still follows its chunks' PUTs and journal entry, in order.

use std::sync::Arc;
use std::time::Duration;

use object_store::ObjectStore;
use tokio::sync::mpsc;

use super::writer::{queued_chunks, ChunkWriter, WriterEvent};
use crate::manifest::{ChunkEntry, Chunking, FileTime, Manifest};
use crate::path::RemotePath;
use crate::ranges::ChunkSet;
use crate::storage::object::gated::GatedStore;
use crate::storage::object::layout::{Layout, ReuseRule};
use crate::storage::object::{ObjectOptions, ObjectVolume};
use crate::store::{Progress, ReceiverStore, Store};

const CHUNK: usize = 256 * 1024;

fn block(i: u32) -> Vec<u8> {
    (0..CHUNK).map(|b| (b % 251) as u8 ^ i as u8).collect()
}

fn manifest(n: u32) -> Manifest {
    let chunks = (0..n)
        .map(|i| ChunkEntry {
            offset: u64::from(i) * CHUNK as u64,
            len: CHUNK as u32,
            hash: *blake3::hash(&block(i)).as_bytes(),
        })
        .collect();
    Manifest {
        size: u64::from(n) * CHUNK as u64,
        digest: [0; 32],
        chunking: Chunking::Fixed { size: CHUNK as u32 },
        mtime: FileTime::default(),
        mode: 0o644,
        chunks,
    }
}

/// Batches of two chunks on a store that holds every chunk PUT until four run at once: the writer gets there
/// only if it goes on writing while a batch's sync runs (a writer that waits for each sync keeps two in flight,
/// and the store lets them through only after its patience). Every chunk is acknowledged once, in order, and no
/// journal entry was PUT before the chunks it names.
#[test]
fn the_writer_keeps_chunk_puts_in_flight_across_its_syncs() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let records = ReceiverStore::open(&Store::open(&dir.path().join("state")).unwrap()).unwrap();
    let n = 8;
    let manifest = Arc::new(manifest(n));
    let gated = Arc::new(GatedStore::new(
        Layout::new("", ""),
        manifest.clone(),
        4,
        Duration::from_secs(5),
    ));
    let store: Arc<dyn ObjectStore> = gated.clone();
    let volume = ObjectVolume::new(rt.handle().clone(), store, "", "", ObjectOptions::default());
    let dest = RemotePath::parse("pipelined.bin").unwrap();
    let partial = volume.open_for(&dest, &manifest, ReuseRule::InPlace).unwrap();
    let writer = ChunkWriter::new(
        dest.as_str().to_string(),
        partial,
        manifest,
        ChunkSet::new(n),
        Progress::default(),
        records,
        Arc::default(),
        2 * CHUNK as u64,
    );
    let incoming = queued_chunks(n, block);
    let (events, mut answers) = mpsc::unbounded_channel();
    let writer = rt.block_on(async {
        tokio::task::spawn_blocking(move || writer.run(incoming, events))
            .await
            .unwrap()
    });

    assert!(writer.received.is_complete());
    let mut acknowledged = Vec::new();
    while let Ok(event) = answers.try_recv() {
        match event {
            WriterEvent::Durable { ranges, .. } => acknowledged.extend(ranges.iter().flat_map(|r| r.indices())),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        acknowledged,
        (0..n).collect::<Vec<_>>(),
        "each chunk acknowledged once, in order"
    );
    assert!(
        gated.most_in_flight() >= 4,
        "at most {} chunk PUTs in flight: each sync drained the pipeline",
        gated.most_in_flight()
    );
    let journaled = gated.journaled();
    assert!(!journaled.is_empty() && journaled.iter().all(|&ok| ok), "{journaled:?}");
}
