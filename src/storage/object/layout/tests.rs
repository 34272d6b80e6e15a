use super::*;
use crate::manifest::tests::manifest_of;
use crate::manifest::{ChunkEntry, Chunking};
use object_store::memory::InMemory;
use object_store::ObjectStoreExt;

fn path(text: &str) -> RemotePath {
    RemotePath::parse(text).unwrap()
}

fn file_manifest(bytes: &[u8]) -> Manifest {
    Manifest {
        size: bytes.len() as u64,
        digest: *blake3::hash(bytes).as_bytes(),
        chunking: Chunking::Fixed { size: 1 << 20 },
        mtime: FileTime { secs: 7, nanos: 8 },
        mode: 0o644,
        chunks: vec![ChunkEntry {
            offset: 0,
            len: bytes.len() as u32,
            hash: *blake3::hash(bytes).as_bytes(),
        }],
    }
}

fn entry(manifest: Manifest, inline: Option<&[u8]>) -> EntryObject {
    EntryObject {
        manifest_id: manifest.id(),
        kind: EntryKind::File {
            manifest,
            inline: inline.map(|b| serde_bytes::ByteBuf::from(b.to_vec())),
        },
        committed_at: 1_700_000_000_000_000_000,
        received_bytes: 10,
        reused_bytes: 20,
        rejected_chunks: 1,
        transfer: TransferId([3; 16]),
        server: ServerId([4; 8]),
    }
}

#[test]
fn keys_follow_the_documented_layout() {
    let root = Layout::new("", "");
    let hash = [0xab; 32];
    assert_eq!(
        root.chunk(&hash).as_ref(),
        format!("ns/root/chunks/ab/{}", "ab".repeat(32))
    );
    assert_eq!(root.chunk_shard(0x0f).as_ref(), "ns/root/chunks/0f");
    assert_eq!(root.parse_chunk(&root.chunk(&hash)), Some(hash));
    // A chunk key in the wrong shard, or of another namespace, is not a chunk of this one.
    let misplaced = Path::from(format!("ns/root/chunks/00/{}", "ab".repeat(32)));
    assert_eq!(root.parse_chunk(&misplaced), None);
    let named = Layout::new("backups/ferry", "team");
    assert_eq!(named.namespace().as_ref(), "ns/7465616d");
    assert_eq!(named.parse_chunk(&root.chunk(&hash)), None);

    let pid = PathId::of(&path("a/b.iso"));
    let tid = TransferId([0x11; 16]);
    assert_eq!(
        root.open_record(pid, tid).as_ref(),
        format!("ns/root/open/{}/{}", pid.hex(), "11".repeat(16))
    );
    assert_eq!(root.parse_open_record(&root.open_record(pid, tid)), Some((pid, tid)));
    assert_eq!(
        root.journal_entry(tid, 42, ServerId([0xee; 8]), 7).as_ref(),
        format!(
            "ns/root/journal/{}/{:020}-{}-{:020}",
            "11".repeat(16),
            42,
            "ee".repeat(8),
            7
        )
    );
    assert_eq!(Layout::marker().as_ref(), "ferry-store");
}

#[test]
fn file_keys_encode_components_and_decode_back() {
    let layout = Layout::new("p", "");
    for text in [
        "plain.txt",
        "dir/sub/file",
        "we ird/%41#?*[x]~",
        "ünï/cødé",
        "a\\b/c{d}",
    ] {
        let remote = path(text);
        let key = layout.file(&remote).unwrap();
        assert!(key.as_ref().starts_with("ns/root/files/"), "{key}");
        assert_eq!(
            key.parts().count(),
            3 + remote.components().count(),
            "one key part per component: {key}"
        );
        assert_eq!(layout.parse_file(&key), Some(remote), "{key}");
    }
    // `%` is encoded, so a literal "%41" cannot alias "A".
    assert_ne!(layout.file(&path("%41")).unwrap(), layout.file(&path("A")).unwrap());
    // A non-canonical encoding is not a file key.
    assert_eq!(layout.parse_file(&Path::parse("ns/root/files/%41").unwrap()), None);
    assert_eq!(layout.parse_file(&layout.files()), None);
}

#[test]
fn the_key_limit_counts_the_bucket_prefix() {
    // "ns/root/files/" is 14 bytes; with prefix "pp" (+1 for the separator) 1,007 bytes of path fit exactly
    // (components are at most 255 bytes: 250 + 250 + 250 + 254 and three separators).
    let layout = Layout::new("pp", "");
    let long = |last: usize| ["a".repeat(250), "b".repeat(250), "c".repeat(250), "d".repeat(last)].join("/");
    assert_eq!(layout.key_len(&layout.file(&path(&long(254))).unwrap()), MAX_KEY_LEN);
    assert_eq!(
        layout.file(&path(&long(255))),
        Err(LayoutError::KeyTooLong {
            len: MAX_KEY_LEN + 1,
            max: MAX_KEY_LEN
        })
    );
    // Without the prefix the same path fits.
    assert!(Layout::new("", "").file(&path(&long(255))).is_ok());
    // Encoding counts: a '#' becomes three bytes.
    let hashes = |n: usize| vec!["#".repeat(85); 3].join("/") + "/" + &"#".repeat(n);
    // 14 + 3 * 255 + 3 + 3n: n = 80 is 1,022 bytes, n = 81 is 1,025.
    assert!(Layout::new("", "").file(&path(&hashes(80))).is_ok());
    assert!(Layout::new("", "").file(&path(&hashes(81))).is_err());
}

#[test]
fn ids_round_trip_through_hex_and_refuse_anything_else() {
    let tid = TransferId::random();
    assert_eq!(TransferId::parse_hex(&tid.hex()), Some(tid));
    assert_ne!(TransferId::random(), tid);
    assert_eq!(
        TransferId::parse_hex(&tid.hex().to_uppercase()).filter(|_| tid.0 != [0; 16]),
        None
    );
    assert_eq!(TransferId::parse_hex(&tid.hex()[1..]), None);
    assert_eq!(ServerId::parse_hex("zz00000000000000"), None);
    assert_eq!(PathId::of(&path("a")), PathId::of(&path("a")));
    assert_ne!(PathId::of(&path("a")), PathId::of(&path("b")));
}

#[test]
fn entry_objects_round_trip() {
    let manifest = manifest_of(&[1 << 20, 1 << 20, 5]);
    let stored = entry(manifest, None);
    assert_eq!(EntryObject::decode(&stored.encode()), Ok(stored.clone()));
    assert!(stored.encode().starts_with(ENTRY_MAGIC));

    let bytes = b"small file bytes";
    let inline = entry(file_manifest(bytes), Some(bytes));
    assert_eq!(EntryObject::decode(&inline.encode()), Ok(inline));

    for kind in [
        EntryKind::Dir {
            mode: 0o755,
            mtime: FileTime { secs: 1, nanos: 2 },
        },
        EntryKind::Symlink { target: "../x".into() },
    ] {
        let other = EntryObject {
            kind,
            manifest_id: [0; 32],
            ..stored.clone()
        };
        assert_eq!(EntryObject::decode(&other.encode()), Ok(other));
    }
}

#[test]
fn damaged_entry_objects_are_refused_never_panic() {
    let stored = entry(manifest_of(&[1 << 20, 1 << 20, 5]), None);
    let good = stored.encode();

    assert!(matches!(EntryObject::decode(b""), Err(DecodeError::BadMagic(_))));
    assert!(matches!(EntryObject::decode(&good[1..]), Err(DecodeError::BadMagic(_))));
    assert!(matches!(
        EntryObject::decode(&RECORD_MAGIC[..]),
        Err(DecodeError::BadMagic(_))
    ));
    // Every truncation and every single-byte flip either fails or decodes to a self-consistent entry.
    for cut in ENTRY_MAGIC.len()..good.len() {
        assert!(EntryObject::decode(&good[..cut]).is_err(), "cut at {cut}");
    }
    for at in 0..good.len() {
        let mut bad = good.clone();
        bad[at] ^= 0x5a;
        if let Ok(decoded) = EntryObject::decode(&bad) {
            let manifest = decoded.manifest().unwrap();
            assert_eq!(manifest.id(), decoded.manifest_id, "flip at {at}");
            assert!(manifest.validate().is_ok());
        }
    }

    // A huge declared chunk count does not allocate: it fails on the input's length.
    let mut huge = good.clone();
    // The chunk vector's length is the last field of the manifest, before its 3 chunks of 44 bytes each.
    let manifest = stored.manifest().unwrap();
    let manifest_len = crate::record::encoded_record_len(manifest) as usize;
    let count_at = ENTRY_MAGIC.len() + 4 + manifest_len - 8 - 3 * 44;
    assert_eq!(good[count_at..count_at + 8], 3u64.to_le_bytes());
    huge[count_at..count_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(EntryObject::decode(&huge).is_err());

    // The manifest id must be the manifest's.
    let wrong_id = EntryObject {
        manifest_id: [9; 32],
        ..stored.clone()
    };
    assert!(matches!(
        EntryObject::decode(&wrong_id.encode()),
        Err(DecodeError::Invalid(_))
    ));
    // A manifest that does not tile.
    let mut gap = manifest_of(&[1 << 20, 5]);
    gap.chunks[1].offset += 1;
    gap.size += 1;
    assert!(matches!(
        EntryObject::decode(&entry(gap, None).encode()),
        Err(DecodeError::Invalid(_))
    ));
    // Inline bytes that are not the file's.
    let bytes = b"small file bytes";
    assert!(matches!(
        EntryObject::decode(&entry(file_manifest(bytes), Some(b"SMALL FILE BYTES")).encode()),
        Err(DecodeError::Invalid(_))
    ));
    // Larger than a maximal manifest.
    let mut oversized = good;
    oversized.resize(MAX_MANIFEST_OBJECT as usize + 1, 0);
    assert!(matches!(
        EntryObject::decode(&oversized),
        Err(DecodeError::TooLarge { .. })
    ));
    let bad_link = EntryObject {
        kind: EntryKind::Symlink { target: "a\0b".into() },
        ..stored
    };
    assert!(EntryObject::decode(&bad_link.encode()).is_err());
}

#[test]
fn records_and_journal_entries_round_trip() {
    let record = OpenRecord {
        path: "dir/file".into(),
        manifest: manifest_of(&[1 << 20, 3]),
        reuse: ReuseRule::InPlace,
        created: 99,
        server: ServerId([1; 8]),
        transfer: TransferId([2; 16]),
    };
    assert_eq!(OpenRecord::decode(&record.encode()), Ok(record.clone()));
    let escaping = OpenRecord {
        path: "../x".into(),
        ..record.clone()
    };
    assert!(matches!(
        OpenRecord::decode(&escaping.encode()),
        Err(DecodeError::Invalid(_))
    ));
    assert!(matches!(
        JournalEntry::decode(&record.encode()),
        Err(DecodeError::BadMagic(_))
    ));

    let journal = JournalEntry {
        manifest_id: record.manifest.id(),
        ranges: vec![IndexRange { start: 0, count: 2 }],
        received_bytes: 5,
        reused_bytes: 6,
        rejected_chunks: 0,
        updated: 3,
        server: ServerId([1; 8]),
        retract: false,
    };
    assert_eq!(JournalEntry::decode(&journal.encode()), Ok(journal.clone()));
    let retraction = JournalEntry {
        retract: true,
        ..journal
    };
    assert_eq!(JournalEntry::decode(&retraction.encode()), Ok(retraction));
}

fn journal(manifest: &Manifest, ranges: &[(u32, u32)], received: u64) -> JournalEntry {
    JournalEntry {
        manifest_id: manifest.id(),
        ranges: ranges
            .iter()
            .map(|&(start, count)| IndexRange { start, count })
            .collect(),
        received_bytes: received,
        reused_bytes: 1,
        rejected_chunks: 0,
        updated: 0,
        server: ServerId([0; 8]),
        retract: false,
    }
}

#[test]
fn the_journal_union_spans_servers_and_ignores_foreign_entries() {
    let manifest = manifest_of(&[1 << 20; 10]);
    let other = manifest_of(&[1 << 20; 11]);
    let entries = [
        journal(&manifest, &[(0, 2)], 100),
        journal(&manifest, &[(5, 1), (7, 2)], 200),
        journal(&manifest, &[(1, 2)], 50), // overlaps: a chunk counted once in the set
        journal(&other, &[(3, 1)], 1000),  // another manifest
        journal(&manifest, &[(9, 2)], 1000), // past the end
    ];
    let durable = journal_union(&manifest, &entries);
    let present: Vec<u32> = (0..10).filter(|&i| durable.chunks.contains(i)).collect();
    assert_eq!(present, vec![0, 1, 2, 5, 7, 8]);
    assert_eq!(durable.received_bytes, 350);
    assert_eq!(durable.reused_bytes, 3);
    assert_eq!(durable.ignored, 2);
}

#[test]
fn a_retraction_withdraws_chunks_until_a_later_entry_makes_them_durable_again() {
    let manifest = manifest_of(&[1 << 20; 4]);
    let retract = |ranges| JournalEntry {
        retract: true,
        ..journal(&manifest, ranges, 0)
    };
    let entries = [
        journal(&manifest, &[(0, 4)], 100),
        retract(&[(1, 2)]),
        journal(&manifest, &[(2, 1)], 10), // chunk 2 stored again after it was found gone
    ];
    let durable = journal_union(&manifest, &entries);
    let present: Vec<u32> = (0..4).filter(|&i| durable.chunks.contains(i)).collect();
    assert_eq!(present, vec![0, 2, 3], "chunk 1 stays withdrawn");
}

#[tokio::test]
async fn helpers_put_get_list_and_delete_a_transfer() {
    let store = InMemory::new();
    let layout = Layout::new("", "team");
    let manifest = manifest_of(&[1 << 20, 3]);
    let pid = PathId::of(&path("dir/file"));
    let tid = TransferId::random();
    let record = OpenRecord {
        path: "dir/file".into(),
        manifest: manifest.clone(),
        reuse: ReuseRule::Full,
        created: 1,
        server: ServerId([1; 8]),
        transfer: tid,
    };
    put(&store, &layout.open_record(pid, tid), record.encode().into())
        .await
        .unwrap();
    for (seq, ranges) in [(0, [(0, 1)]), (1, [(1, 1)])] {
        let key = layout.journal_entry(tid, 10 + seq, ServerId([seq as u8; 8]), seq);
        put(&store, &key, journal(&manifest, &ranges, 7).encode().into())
            .await
            .unwrap();
    }
    // A damaged journal entry is skipped, not fatal.
    put(
        &store,
        &layout.journal_entry(tid, 5, ServerId([9; 8]), 0),
        Bytes::from_static(b"junk"),
    )
    .await
    .unwrap();
    // A record of another path and one of another namespace are not listed.
    let other_pid = PathId::of(&path("elsewhere"));
    put(
        &store,
        &layout.open_record(other_pid, TransferId::random()),
        record.encode().into(),
    )
    .await
    .unwrap();
    let other_ns = Layout::new("", "");
    put(
        &store,
        &other_ns.open_record(pid, TransferId::random()),
        record.encode().into(),
    )
    .await
    .unwrap();

    let records = list_records(&store, &layout, pid).await.unwrap();
    assert_eq!(records.iter().map(|(t, _)| *t).collect::<Vec<_>>(), vec![tid]);
    assert_eq!(get_record(&store, &records[0].1.location).await.unwrap(), Some(record));
    let entries = read_journal(&store, &layout, tid).await.unwrap();
    assert_eq!(entries.len(), 2);
    assert!(journal_union(&manifest, &entries).chunks.is_complete());

    delete_transfer(&store, &layout, pid, tid).await.unwrap();
    assert!(list(&store, &layout.journal(tid)).await.unwrap().is_empty());
    assert!(list_records(&store, &layout, pid).await.unwrap().is_empty());
    assert_eq!(list_records(&store, &layout, other_pid).await.unwrap().len(), 1);
    // Deleting what is gone is not an error.
    delete_transfer(&store, &layout, pid, tid).await.unwrap();
}

#[tokio::test]
async fn get_refuses_oversized_objects_and_reports_absent_ones() {
    let store = InMemory::new();
    let key = Path::from("big");
    assert!(get(&store, &key, 10).await.unwrap().is_none());
    assert!(head(&store, &key).await.unwrap().is_none());
    store.put(&key, vec![0u8; 11].into()).await.unwrap();
    assert!(matches!(
        get(&store, &key, 10).await,
        Err(ObjectError::TooLarge { len: 11, max: 10, .. })
    ));
    assert_eq!(get(&store, &key, 11).await.unwrap().unwrap().bytes.len(), 11);
    assert_eq!(head(&store, &key).await.unwrap().unwrap().size, 11);

    // A damaged manifest object reads as absent; a good one with its ETag.
    let layout = Layout::new("", "");
    let file = layout.file(&path("f")).unwrap();
    put(&store, &file, Bytes::from_static(b"ferry-entry v1\n\x01"))
        .await
        .unwrap();
    assert!(get_entry(&store, &file).await.unwrap().is_none());
    let stored = entry(manifest_of(&[1 << 20, 3]), None);
    put(&store, &file, stored.encode().into()).await.unwrap();
    let read = get_entry(&store, &file).await.unwrap().unwrap();
    assert_eq!(read.entry, stored);
    assert!(read.e_tag.is_some());
}
