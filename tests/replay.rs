//! "Arbitrary input never panics" for the whole server session, in CI: proptest feeds a real server (temp root,
//! in memory, no socket) a valid Hello followed by arbitrary bytes, or by a sequence of well-formed messages in
//! arbitrary order, and checks that it answers and ends. cargo-fuzz runs the same entry point unbounded
//! (fuzz/, docs/testing.md "Fuzzing").

use std::time::Duration;

use ferry::manifest::{ChunkEntry, Chunking, FileTime, Manifest};
use ferry::ranges::IndexRange;
use ferry::server::{Server, ServerConfig};
use ferry::wire::codec::encode_frame;
use ferry::wire::{Ack, Chunk, FileData, Hello, Join, Message, Need, Offer, Pull, TreeCommit, TreeNeed, MAGIC};
use proptest::prelude::*;

fn frame(msg: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(msg, ferry::MAX_FRAME, &mut out).unwrap();
    out
}

fn hello() -> Vec<u8> {
    frame(&Message::Hello(Hello {
        magic: MAGIC,
        min_version: ferry::PROTOCOL_VERSION,
        max_version: ferry::PROTOCOL_VERSION,
        agent: "proptest".into(),
        client: String::new(),
    }))
}

fn manifest(chunks: u32) -> Manifest {
    let len = 4096u32;
    Manifest {
        size: u64::from(chunks) * u64::from(len),
        chunking: Chunking::Fixed { size: len },
        chunks: (0..chunks)
            .map(|i| ChunkEntry {
                offset: u64::from(i) * u64::from(len),
                len,
                hash: *blake3::hash(&vec![i as u8; len as usize]).as_bytes(),
            })
            .collect(),
        digest: [0; 32],
        mtime: FileTime::default(),
        mode: 0o644,
    }
}

fn arb_message() -> impl Strategy<Value = Message> {
    let path = prop_oneof![Just("f".to_string()), Just("d/f".to_string()), "[a-z./]{0,12}"];
    prop_oneof![
        (path.clone(), 0u32..4).prop_map(|(path, n)| Message::Offer(Offer {
            path,
            manifest: manifest(n)
        })),
        (0u32..6, any::<u8>()).prop_map(|(index, byte)| Message::Chunk(Chunk {
            index,
            data: vec![byte; 4096]
        })),
        (0u32..6, proptest::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(index, data)| Message::Chunk(Chunk { index, data })),
        Just(Message::Commit),
        any::<u64>().prop_map(Message::Ping),
        (any::<u32>(), any::<u32>()).prop_map(|(start, count)| Message::Ack(Ack {
            ranges: vec![IndexRange { start, count }]
        })),
        (any::<u32>(), any::<u32>()).prop_map(|(start, count)| Message::Need(Need {
            ranges: vec![IndexRange { start, count }]
        })),
        (0u32..4, proptest::collection::vec(any::<u8>(), 0..32))
            .prop_map(|(entry, data)| Message::FileData(FileData { entry, data })),
        (any::<u32>(), any::<u32>()).prop_map(|(start, count)| Message::TreeNeed(TreeNeed {
            entries: vec![IndexRange { start, count }]
        })),
        Just(Message::TreeCommit(TreeCommit::default())),
        Just(Message::ListPartials),
        ".{0,20}".prop_map(Message::Abandon),
        (path.clone(), any::<u8>()).prop_map(|(path, b)| Message::Join(Join {
            path,
            manifest_id: [b; 32]
        })),
        path.prop_map(|path| Message::Pull(Pull {
            path,
            chunking: Default::default(),
            window: 1 << 20,
            links: Default::default()
        })),
    ]
}

fn server(root: &std::path::Path) -> Server {
    let config = ServerConfig {
        idle_timeout: Duration::from_secs(2),
        handshake_timeout: Duration::from_secs(2),
        ..ServerConfig::new(root.to_path_buf())
    };
    Server::open(config).unwrap()
}

fn replays(input: Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("root")).unwrap();
    std::fs::write(dir.path().join("root/f"), vec![0u8; 4096]).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let server = server(&dir.path().join("root"));
    let answer = runtime.block_on(server.replay(&input, Duration::from_secs(30)));
    assert!(answer.is_some(), "the session ended");
    let escaped: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(escaped.len(), 1, "nothing written beside the root: {escaped:?}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_after_hello_never_panic_the_server(tail in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let mut input = hello();
        input.extend(tail);
        replays(input);
    }

    #[test]
    fn well_formed_messages_in_any_order_never_panic_the_server(msgs in proptest::collection::vec(arb_message(), 0..12)) {
        let mut input = hello();
        for msg in &msgs {
            input.extend(frame(msg));
        }
        replays(input);
    }
}
