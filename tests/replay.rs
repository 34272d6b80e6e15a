//! "Arbitrary input never panics, never hangs and never writes outside the namespace", for the whole server
//! session, in CI: a real server (temp root, in memory, no socket) with tokens, namespaces, a quota and small
//! namespace limits takes a client that authenticates as `alice` and then sends a script: coherent file pushes and
//! tree pushes (manifests and digests right, so files really commit and renames and symlinks really happen),
//! damaged ones (a chunk missing, repeated or corrupt), hostile paths and link targets, pulls, and arbitrary
//! well-formed messages, in any order; or a valid Hello followed by arbitrary bytes. After each case the whole temp
//! tree is walked: nothing outside the namespace and the server's private `.ferry/` changed, and every symlink in
//! the namespace stays inside it. cargo-fuzz runs the session entry point unbounded (fuzz/, docs/testing.md "Fuzzing").

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ferry::auth::{Permissions, Token};
use ferry::manifest::{ChunkEntry, Chunking, FileTime, Manifest};
use ferry::ranges::IndexRange;
use ferry::server::{ClientEntry, Server, ServerConfig};
use ferry::transfer::handshake::client_hello;
use ferry::transfer::quota::NamespaceLimits;
use ferry::wire::codec::encode_frame;
use ferry::wire::{
    Ack, Chunk, Connection, EntryKind, FileData, Hello, Join, Message, Need, Offer, Pull, PullExpecting, PullKind,
    TreeCommit, TreeEntry, TreeNeed, TreeOffer, MAGIC,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const CHUNK: u32 = 4096;
/// alice's quota: a few of the generated files fit, not all.
const QUOTA: u64 = 48 * 1024;

fn frame(msg: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(msg, ferry::MAX_FRAME, &mut out).unwrap();
    out
}

/// Deterministic content for a seed.
fn content(seed: u8, size: usize) -> Vec<u8> {
    let mut data = vec![0u8; size];
    blake3::Hasher::new().update(&[seed]).finalize_xof().fill(&mut data);
    data
}

/// The manifest of `data` in 4 KiB chunks, every hash and the digest right.
fn manifest_of(data: &[u8]) -> Manifest {
    let chunks = data
        .chunks(CHUNK as usize)
        .enumerate()
        .map(|(i, bytes)| ChunkEntry {
            offset: i as u64 * u64::from(CHUNK),
            len: bytes.len() as u32,
            hash: *blake3::hash(bytes).as_bytes(),
        })
        .collect();
    Manifest {
        size: data.len() as u64,
        digest: *blake3::hash(data).as_bytes(),
        chunking: Chunking::Fixed { size: CHUNK },
        mtime: FileTime::default(),
        mode: 0o644,
        chunks,
    }
}

/// Destination paths: valid ones (some of them existing, some through the planted symlinks) and hostile ones.
fn arb_path() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(vec!["f", "d/f", "n1", "n2", "d/e/g", "t", "t/g"]).prop_map(str::to_string),
        2 => prop::sample::select(vec![
            "planted/x", "lf", "planted", "bob/g", "../x", "../bob/g", "/etc/x", ".ferry/state/x", "d/../../x",
            "t/planted/x", "",
        ])
        .prop_map(str::to_string),
        1 => "[a-z./]{0,12}",
    ]
}

/// How an episode's chunks are sent.
#[derive(Clone, Copy, Debug)]
enum Delivery {
    /// All, in order.
    Whole,
    /// One left out.
    Missing(usize),
    /// One sent twice.
    Repeated(usize),
    /// One with a flipped byte.
    Corrupt(usize),
}

fn arb_delivery() -> impl Strategy<Value = Delivery> {
    let i = 0usize..8;
    prop_oneof![
        6 => Just(Delivery::Whole),
        1 => i.clone().prop_map(Delivery::Missing),
        1 => i.clone().prop_map(Delivery::Repeated),
        1 => i.prop_map(Delivery::Corrupt),
    ]
}

/// `pieces` as they are sent under `delivery` (an index past the end picks the last piece).
fn delivered<T: Clone>(pieces: Vec<T>, delivery: Delivery, corrupt: impl Fn(&mut T)) -> Vec<T> {
    let mut pieces = pieces;
    let last = pieces.len().saturating_sub(1);
    match delivery {
        _ if pieces.is_empty() => {}
        Delivery::Whole => {}
        Delivery::Missing(i) => {
            pieces.remove(i.min(last));
        }
        Delivery::Repeated(i) => pieces.insert(i.min(last), pieces[i.min(last)].clone()),
        Delivery::Corrupt(i) => corrupt(&mut pieces[i.min(last)]),
    }
    pieces
}

/// A file push, whole or damaged: Offer, its chunks, Commit.
fn arb_file_push() -> impl Strategy<Value = Vec<Message>> {
    let size = prop::sample::select(vec![0usize, 1, 4095, 4096, 5000, 12295, 20480]);
    (arb_path(), any::<u8>(), size, arb_delivery()).prop_map(|(path, seed, size, delivery)| {
        let data = content(seed, size);
        let manifest = manifest_of(&data);
        let chunks: Vec<Message> = data
            .chunks(CHUNK as usize)
            .enumerate()
            .map(|(index, bytes)| {
                Message::Chunk(Chunk {
                    index: index as u32,
                    data: bytes.to_vec(),
                })
            })
            .collect();
        let mut script = vec![Message::Offer(Offer { path, manifest })];
        script.extend(delivered(chunks, delivery, |m| {
            if let Message::Chunk(c) = m {
                c.data[0] ^= 1;
            }
        }));
        script.push(Message::Commit);
        script
    })
}

/// Tree entries by name: directories, small files (by content seed and size) and symlinks, valid or hostile.
fn arb_tree_entry() -> impl Strategy<Value = (String, EntryKind)> {
    let dir = prop::sample::select(vec!["d", "d/e", "s", "planted"]).prop_map(|p| {
        let kind = EntryKind::Dir {
            mode: 0o755,
            mtime: FileTime::default(),
        };
        (p.to_string(), kind)
    });
    let file = (
        prop::sample::select(vec!["g", "d/f", "d/e/h", "s/k", "planted/x", "lf"]),
        any::<u8>(),
        prop::sample::select(vec![0usize, 1, 100, 4096, 9000]),
    )
        .prop_map(|(p, seed, size)| {
            let data = content(seed, size);
            let kind = EntryKind::File {
                size: size as u64,
                digest: *blake3::hash(&data).as_bytes(),
                mtime: FileTime::default(),
                mode: 0o640,
            };
            (format!("{p}#{seed}"), kind)
        });
    let link = (
        prop::sample::select(vec!["l", "d/l", "d/e/l", "m", "s/l"]),
        prop_oneof![
            3 => prop::sample::select(vec!["g", "d/f", "d", "../g", "e/h", "../d/f", "s", "k"]),
            1 => prop::sample::select(vec![
                "../../g", "..", "../..", "../../../outside", "/etc/passwd", "d/../g", "l", "m", "planted/x", "lf",
                "d/e/../../../x", "",
            ]),
        ],
    )
        .prop_map(|(p, target)| {
            let kind = EntryKind::Symlink {
                target: target.to_string(),
            };
            (p.to_string(), kind)
        });
    prop_oneof![2 => dir, 3 => file, 3 => link]
}

/// A tree push: TreeOffer (entries sorted and unique, as a sender sends them, or not), FileData with each file's
/// right bytes (damaged by `delivery`), TreeCommit.
fn arb_tree_push() -> impl Strategy<Value = Vec<Message>> {
    let tree_path = prop::sample::select(vec!["t", "u", "d", "planted", "t/v", "../t", "lf"]);
    (
        tree_path,
        proptest::collection::vec(arb_tree_entry(), 0..7),
        arb_delivery(),
        prop::bool::weighted(0.9),
    )
        .prop_map(|(path, entries, delivery, sorted)| {
            let mut by_path: BTreeMap<String, (EntryKind, Option<Vec<u8>>)> = BTreeMap::new();
            for (name, kind) in entries {
                // A file's name carries its content seed after '#', so that its bytes can be made again here.
                let (name, data) = match name.split_once('#') {
                    Some((name, seed)) => {
                        let size = match kind {
                            EntryKind::File { size, .. } => size as usize,
                            _ => 0,
                        };
                        (name.to_string(), Some(content(seed.parse().unwrap(), size)))
                    }
                    None => (name, None),
                };
                by_path.insert(name, (kind, data));
            }
            let mut entries: Vec<TreeEntry> = Vec::new();
            let mut files = Vec::new();
            for (index, (name, (kind, data))) in by_path.into_iter().enumerate() {
                if let Some(data) = data {
                    files.push(FileData {
                        entry: index as u32,
                        data,
                    });
                }
                entries.push(TreeEntry { path: name, kind });
            }
            if !sorted {
                entries.reverse();
            }
            let mut script = vec![Message::TreeOffer(TreeOffer {
                path: path.to_string(),
                entries,
            })];
            let files = delivered(files, delivery, |f| {
                if let Some(b) = f.data.first_mut() {
                    *b ^= 1;
                }
            });
            script.extend(files.into_iter().map(Message::FileData));
            script.push(Message::TreeCommit(TreeCommit::default()));
            script
        })
}

/// One well-formed message of any kind, with arbitrary values where they do not need to be right.
fn arb_noise() -> impl Strategy<Value = Message> {
    let range = || (0u32..8, 0u32..8).prop_map(|(start, count)| vec![IndexRange { start, count }]);
    prop_oneof![
        (0u32..6, proptest::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(index, data)| Message::Chunk(Chunk { index, data })),
        Just(Message::Commit),
        any::<u64>().prop_map(Message::Ping),
        range().prop_map(|ranges| Message::Ack(Ack { ranges })),
        range().prop_map(|ranges| Message::Need(Need { ranges })),
        (0u32..8, proptest::collection::vec(any::<u8>(), 0..32))
            .prop_map(|(entry, data)| Message::FileData(FileData { entry, data })),
        range().prop_map(|entries| Message::TreeNeed(TreeNeed { entries })),
        Just(Message::TreeCommit(TreeCommit::default())),
        Just(Message::ListPartials),
        ".{0,20}".prop_map(Message::Abandon),
        (arb_path(), any::<u8>()).prop_map(|(path, b)| Message::Join(Join {
            path,
            manifest_id: [b; 32]
        })),
    ]
}

/// A pull of a path (the server becomes the sender), plain or expecting a kind.
fn arb_pull() -> impl Strategy<Value = Message> {
    (arb_path(), 0u8..4).prop_map(|(path, expect)| {
        let pull = Pull {
            path,
            chunking: Default::default(),
            window: 1 << 20,
            links: ferry::tree::LinkPolicy::Record,
        };
        match expect {
            0 => Message::Pull(pull),
            1 => Message::PullExpecting(PullExpecting {
                pull,
                expect: PullKind::Any,
            }),
            2 => Message::PullExpecting(PullExpecting {
                pull,
                expect: PullKind::File,
            }),
            _ => Message::PullExpecting(PullExpecting {
                pull,
                expect: PullKind::Tree,
            }),
        }
    })
}

/// A session's script: episodes of coherent and damaged pushes, pulls and noise.
fn arb_script() -> impl Strategy<Value = Vec<Message>> {
    let episode = prop_oneof![
        4 => arb_file_push(),
        4 => arb_tree_push(),
        1 => arb_pull().prop_map(|m| vec![m]),
        2 => arb_noise().prop_map(|m| vec![m]),
    ];
    proptest::collection::vec(episode, 1..5).prop_map(|e| e.into_iter().flatten().collect())
}

/// Who the session is.
#[derive(Clone, Copy, Debug)]
enum Access {
    /// A server without tokens: anyone, the whole root.
    Anonymous,
    /// `alice`, confined to `root/alice` with a quota, beside `bob`'s namespace.
    Alice,
}

/// A temp directory with the server's root, a directory outside it, and symlinks planted in the namespace that lead
/// out; a server with tokens, namespaces, a quota and small namespace limits (or none, for `Anonymous`).
struct Site {
    dir: tempfile::TempDir,
    namespace: PathBuf,
    server: Server,
    alice: Token,
    access: Access,
}

impl Site {
    fn new(access: Access) -> Site {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"outside the root").unwrap();
        let namespace = match access {
            Access::Anonymous => root.clone(),
            Access::Alice => root.join("alice"),
        };
        std::fs::create_dir_all(namespace.join("d")).unwrap();
        std::fs::create_dir_all(root.join("bob")).unwrap();
        std::fs::write(root.join("bob/g"), b"bob's").unwrap();
        std::fs::write(namespace.join("f"), content(1, 5000)).unwrap();
        let up = "../".repeat(namespace.strip_prefix(dir.path()).unwrap().components().count());
        std::os::unix::fs::symlink(format!("{up}outside"), namespace.join("planted")).unwrap();
        std::os::unix::fs::symlink(format!("{up}outside/secret"), namespace.join("lf")).unwrap();
        let alice = Token::generate("alice").unwrap();
        let clients = match access {
            Access::Anonymous => vec![],
            Access::Alice => vec![
                ClientEntry {
                    token: alice.clone(),
                    namespace: "alice".into(),
                    permissions: Permissions { push: true, pull: true },
                    quota: Some(QUOTA),
                },
                ClientEntry {
                    token: Token::generate("bob").unwrap(),
                    namespace: "bob".into(),
                    permissions: Permissions { push: true, pull: true },
                    quota: None,
                },
            ],
        };
        let config = ServerConfig {
            idle_timeout: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(2),
            clients,
            namespace_limits: NamespaceLimits {
                max_open_transfers: 3,
                max_manifest_bytes: 64 * 1024,
                max_entries: 40,
                max_tree_entries: 6,
            },
            ..ServerConfig::new(root)
        };
        let server = Server::open(config).unwrap();
        Site {
            dir,
            namespace,
            server,
            alice,
            access,
        }
    }

    fn token(&self) -> Option<&Token> {
        matches!(self.access, Access::Alice).then_some(&self.alice)
    }
}

/// What one path holds: a directory, a file's size and hash, or a symlink's target.
#[derive(Debug, PartialEq, Eq)]
enum Node {
    Dir,
    File(u64, [u8; 32], u32),
    Link(PathBuf),
}

/// Every path under `dir`, recursively, without following symlinks.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Node> {
    let mut out = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(at) = pending.pop() {
        for entry in std::fs::read_dir(&at).unwrap().flatten() {
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let node = if meta.file_type().is_symlink() {
                Node::Link(std::fs::read_link(&path).unwrap())
            } else if meta.is_dir() {
                pending.push(path.clone());
                Node::Dir
            } else {
                let data = std::fs::read(&path).unwrap_or_default();
                Node::File(meta.len(), *blake3::hash(&data).as_bytes(), meta.mode())
            };
            out.insert(path, node);
        }
    }
    out
}

/// `link`'s target resolved lexically against the link's directory (`..` pops a component).
fn lexical_target(link: &Path, target: &Path) -> Option<PathBuf> {
    if target.is_absolute() {
        return None;
    }
    let mut out = link.parent()?.to_path_buf();
    for component in target.components() {
        match component {
            Component::Normal(name) => out.push(name),
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(out)
}

/// What a case created, summed over a run, to show that commits, renames and symlinks really happened.
#[derive(Default)]
struct Created {
    files: AtomicU64,
    links: AtomicU64,
    dirs: AtomicU64,
}

/// Checks that nothing outside the namespace and `root/.ferry` changed, that the planted links are untouched and
/// every other symlink under the namespace stays inside it (lexically, and where it resolves, for real), and
/// counts what the case created.
fn check_confined(site: &Site, before: &BTreeMap<PathBuf, Node>, created: &Created) -> Result<(), TestCaseError> {
    let after = snapshot(site.dir.path());
    let private = site.dir.path().join("root/.ferry");
    let ns = &site.namespace;
    let inside = |p: &Path| p.starts_with(&private) || p.starts_with(ns);
    for (path, node) in before {
        if !inside(path) || path == &ns.join("planted") || path == &ns.join("lf") {
            prop_assert_eq!(after.get(path), Some(node), "{} changed", path.display());
        }
    }
    let canonical_ns = std::fs::canonicalize(ns).unwrap();
    for (path, node) in &after {
        if before.get(path) == Some(node) {
            continue;
        }
        prop_assert!(
            inside(path),
            "{} appeared or changed outside the namespace",
            path.display()
        );
        if path.starts_with(&private) {
            continue;
        }
        match node {
            Node::Link(target) => {
                let lexical = lexical_target(path, target);
                prop_assert!(
                    lexical.as_ref().is_some_and(|t| t.starts_with(ns)),
                    "{} -> {} leaves the namespace",
                    path.display(),
                    target.display()
                );
                if let Ok(real) = std::fs::canonicalize(path) {
                    prop_assert!(
                        real.starts_with(&canonical_ns),
                        "{} resolves to {}",
                        path.display(),
                        real.display()
                    );
                }
                created.links.fetch_add(1, Ordering::Relaxed);
            }
            Node::File(..) => {
                created.files.fetch_add(1, Ordering::Relaxed);
            }
            Node::Dir => {
                created.dirs.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    Ok(())
}

/// Runs one session in memory: the handshake (as alice when the site has tokens), then `input` written whole while
/// the answers are drained, then the client's close. Returns whether the session ended within the limit.
async fn session(site: &Site, input: &[u8]) -> bool {
    let (client, server_side) = tokio::io::duplex(256 * 1024);
    let stop = CancellationToken::new();
    let peer = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let serve = site.server.serve_stream(server_side, peer, &stop);
    let client = async {
        let mut conn = Connection::new(client, ferry::MAX_FRAME);
        client_hello(&mut conn, Duration::from_secs(10), site.token(), None)
            .await
            .expect("the handshake succeeds");
        let (mut from_server, mut to_server) = tokio::io::split(conn.into_inner());
        let feed = async {
            let _ = to_server.write_all(input).await;
            let _ = to_server.shutdown().await;
        };
        let mut answer = Vec::new();
        let drain = from_server.read_to_end(&mut answer);
        let ((), _read) = tokio::join!(feed, drain);
    };
    tokio::time::timeout(Duration::from_secs(30), async { tokio::join!(serve, client) })
        .await
        .is_ok()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A fixed-seed runner (CI runs the same cases every time; a failure prints its minimal script).
fn runner(cases: u32) -> TestRunner {
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha))
}

/// Scripts of coherent, damaged and hostile pushes, tree pushes and pulls, as alice (tokens, namespaces, quota,
/// limits) and anonymously: every session ends, nothing is written outside the namespace, no symlink leads out,
/// and over the run files, directories and symlinks really were committed.
#[test]
fn scripted_sessions_end_and_never_write_outside_the_namespace() {
    let created = Created::default();
    let rt = runtime();
    let strategy = (arb_script(), any::<bool>());
    runner(400)
        .run(&strategy, |(script, anonymous)| {
            let site = Site::new(if anonymous { Access::Anonymous } else { Access::Alice });
            let before = snapshot(site.dir.path());
            let input: Vec<u8> = script.iter().flat_map(frame).collect();
            prop_assert!(rt.block_on(session(&site, &input)), "the session hung");
            check_confined(&site, &before, &created)
        })
        .unwrap();
    let (files, links, dirs) = (
        created.files.load(Ordering::Relaxed),
        created.links.load(Ordering::Relaxed),
        created.dirs.load(Ordering::Relaxed),
    );
    eprintln!("created over the run: {files} files, {links} symlinks, {dirs} directories");
    assert!(
        files >= 50 && links >= 20 && dirs >= 20,
        "too little was committed to guard anything"
    );
}

/// The same scripts with random bytes of the frame bodies flipped (length prefixes kept): the session still ends
/// and stays inside the namespace.
#[test]
fn damaged_scripts_end_and_never_write_outside_the_namespace() {
    let created = Created::default();
    let rt = runtime();
    let strategy = (
        arb_script(),
        proptest::collection::vec((any::<prop::sample::Index>(), 0u8..8), 1..4),
    );
    runner(200)
        .run(&strategy, |(script, flips)| {
            let site = Site::new(Access::Alice);
            let before = snapshot(site.dir.path());
            let mut frames: Vec<Vec<u8>> = script.iter().map(frame).collect();
            for (at, bit) in flips {
                let f = at.get_mut(&mut frames);
                if f.len() > 4 {
                    let i = 4 + at.index(f.len() - 4);
                    f[i] ^= 1 << bit;
                }
            }
            let input: Vec<u8> = frames.concat();
            prop_assert!(rt.block_on(session(&site, &input)), "the session hung");
            check_confined(&site, &before, &created)
        })
        .unwrap();
}

/// A valid Hello, then arbitrary bytes (an anonymous server, through `Server::replay`, as the fuzz target does).
#[test]
fn arbitrary_bytes_after_hello_never_panic_the_server() {
    let created = Created::default();
    let rt = runtime();
    let hello = frame(&Message::Hello(Hello {
        magic: MAGIC,
        min_version: ferry::PROTOCOL_VERSION,
        max_version: ferry::PROTOCOL_VERSION,
        agent: "proptest".into(),
        client: String::new(),
    }));
    runner(200)
        .run(&proptest::collection::vec(any::<u8>(), 0..2048), |tail| {
            let site = Site::new(Access::Anonymous);
            let before = snapshot(site.dir.path());
            let mut input = hello.clone();
            input.extend(tail);
            let answer = rt.block_on(site.server.replay(&input, Duration::from_secs(30)));
            prop_assert!(answer.is_some(), "the session hung");
            check_confined(&site, &before, &created)
        })
        .unwrap();
}

/// The scripted sessions for a time budget from a fresh seed, printed first (`.ci/run`, docs/testing.md "Fuzzing"):
/// `FERRY_SOAK_SECS` (default 10) and `FERRY_SOAK_SEED` (64 hex digits, to replay) as for the library's soaks.
#[test]
#[ignore = "a time-boxed soak; .ci/run runs it"]
fn soak_server_sessions() {
    let secs: u64 = std::env::var("FERRY_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let seed: [u8; 32] = match std::env::var("FERRY_SOAK_SEED") {
        Ok(hex) => (0..32)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("FERRY_SOAK_SEED is 64 hex digits"))
            .collect::<Vec<u8>>()
            .try_into()
            .unwrap(),
        Err(_) => {
            let mut seed = [0u8; 32];
            ferry::random::fill(&mut seed);
            seed
        }
    };
    let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
    eprintln!("soak server sessions: {secs} s from seed {hex} (replay: FERRY_SOAK_SEED={hex})");
    let config = Config {
        cases: 32,
        failure_persistence: None,
        ..Config::default()
    };
    let created = Created::default();
    let rt = runtime();
    let strategy = (arb_script(), any::<bool>());
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    let mut cases = 0u64;
    while std::time::Instant::now() < deadline {
        // A runner per batch (one runs its cases once), seeded from the soak's seed and the batch number.
        let batch_seed = blake3::Hasher::new()
            .update(&seed)
            .update(&cases.to_le_bytes())
            .finalize();
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, batch_seed.as_bytes());
        TestRunner::new_with_rng(config.clone(), rng)
            .run(&strategy, |(script, anonymous)| {
                let site = Site::new(if anonymous { Access::Anonymous } else { Access::Alice });
                let before = snapshot(site.dir.path());
                let input: Vec<u8> = script.iter().flat_map(frame).collect();
                prop_assert!(rt.block_on(session(&site, &input)), "the session hung");
                check_confined(&site, &before, &created)
            })
            .unwrap_or_else(|failure| panic!("soak failed (seed {hex}): {failure}"));
        cases += 32;
    }
    eprintln!(
        "soak server sessions: {cases} sessions, {} files, {} symlinks committed, no failure",
        created.files.load(Ordering::Relaxed),
        created.links.load(Ordering::Relaxed)
    );
}
