//! Who may do what: tokens proven by challenge-response, namespaces a client cannot leave, push/pull permissions,
//! quotas, the per-client connection limit, and the refusal to expose a server without tokens.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use ferry::auth::Token;
use ferry::manifest::{ChunkEntry, Chunking, FileTime, Manifest};
use ferry::transfer::handshake::client_hello;
use ferry::wire::{Auth, Connection, EntryKind, ErrorCode, Hello, Message, Offer, Pull, TreeEntry, TreeOffer, MAGIC};
use tokio::net::TcpStream;

use crate::util::*;

/// A server whose configuration has `clients` (TOML `[[client]]` bodies) and `limits`.
pub(crate) struct Site {
    _dir: tempfile::TempDir,
    pub(crate) dir: PathBuf,
    pub(crate) server: TestServer,
}

impl Site {
    pub(crate) fn start(clients: &[(&Token, &str, &str, &str)], limits: &str) -> Site {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let mut config = format!("[limits]\n{limits}\n");
        for (token, namespace, permissions, extra) in clients {
            config.push_str(&format!(
                "[[client]]\nid = \"{}\"\nsecret = \"{}\"\nnamespace = \"{namespace}\"\npermissions = {permissions}\n{extra}\n",
                token.id,
                token.secret_hex()
            ));
        }
        std::fs::write(path.join("server.toml"), config).unwrap();
        let config = path.join("server.toml");
        let server = TestServer::start_with(&path.join("root"), &["--config", config.to_str().unwrap()]);
        Site {
            _dir: dir,
            dir: path,
            server,
        }
    }

    /// Writes `token` to a file and returns the client flag for it.
    pub(crate) fn token_file(&self, token: &Token) -> String {
        let path = self.dir.join(format!("{}.token", token.id));
        std::fs::write(&path, format!("{token}\n")).unwrap();
        path.display().to_string()
    }

    pub(crate) fn state(&self, name: &str) -> PathBuf {
        self.dir.join(format!("state-{name}"))
    }
}

/// Connects and completes the handshake as `token`.
async fn connect_as(addr: std::net::SocketAddr, token: &Token) -> Connection<TcpStream> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut conn = Connection::new(stream, ferry::MAX_FRAME);
    client_hello(&mut conn, Duration::from_secs(10), Some(token), None)
        .await
        .unwrap();
    conn
}

/// The next message, which must be an Error frame; its code.
async fn error_code(conn: &mut Connection<TcpStream>) -> ErrorCode {
    match tokio::time::timeout(Duration::from_secs(20), conn.read_message()).await {
        Ok(Ok(Some(Message::Error(frame)))) => frame.code,
        other => panic!("expected an Error frame, got {other:?}"),
    }
}

fn one_chunk_manifest(size: u64) -> Manifest {
    Manifest {
        size,
        chunking: Chunking::Fixed { size: 1 << 20 },
        mode: 0o644,
        chunks: vec![ChunkEntry {
            offset: 0,
            len: size as u32,
            hash: [1; 32],
        }],
        digest: [2; 32],
        mtime: FileTime::default(),
    }
}

/// A client without a token pipelines its first request behind Hello (proto-spec.md §3, "Pipelining"): a
/// TreeOffer of 4,000 files (a few hundred KiB, more than a new connection's first send buffer) to a server that
/// requires a token still ends with the server's reason and exit code 7, not a reset connection retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_handshake_is_reported_behind_a_large_pipelined_offer() {
    let alice = Token::generate("alice").unwrap();
    let site = Site::start(&[(&alice, "alice", "[\"push\", \"pull\"]", "")], "");
    let tree = site.dir.join("many");
    std::fs::create_dir_all(&tree).unwrap();
    for i in 0..4000 {
        std::fs::write(tree.join(format!("file-with-a-longish-name-{i:05}.txt")), i.to_string()).unwrap();
    }
    let out = push(&tree, &site.server.url("many"), &site.state("anon"), &[]).await;
    assert_eq!(out.code, 7, "no token must be an auth failure: {}", out.stderr);
    assert!(out.stderr.contains("requires a token"), "{}", out.stderr);
}

#[tokio::test]
async fn tokens_are_required_proven_and_never_replayable() {
    let alice = Token::generate("alice").unwrap();
    let site = Site::start(&[(&alice, "alice", "[\"push\", \"pull\"]", "")], "");
    let file = site.dir.join("a.bin");
    write_random(&file, 300_000, 1);
    let url = site.server.url("a.bin");

    let anonymous = push(&file, &url, &site.state("anon"), &[]).await;
    assert_eq!(
        anonymous.code, 7,
        "no token must be an auth failure: {}",
        anonymous.stderr
    );
    assert!(anonymous.stderr.contains("requires a token"), "{}", anonymous.stderr);

    let forged = Token::generate("alice").unwrap();
    let forged_file = site.dir.join("forged.token");
    std::fs::write(&forged_file, forged.to_string()).unwrap();
    let wrong = push(
        &file,
        &url,
        &site.state("forged"),
        &["--token-file", forged_file.to_str().unwrap()],
    )
    .await;
    assert_eq!(
        wrong.code, 7,
        "a wrong secret must be an auth failure: {}",
        wrong.stderr
    );
    assert!(!site.server.root.join("alice/a.bin").exists());

    let good = push(
        &file,
        &url,
        &site.state("alice"),
        &["--token-file", &site.token_file(&alice)],
    )
    .await;
    good.assert_ok();
    assert_eq!(
        b3(&site.server.root.join("alice/a.bin")),
        b3(&file),
        "alice's files land in her namespace"
    );

    // A recorded answer is useless on the next connection: the nonce is new.
    let mut first = Connection::new(TcpStream::connect(site.server.addr).await.unwrap(), ferry::MAX_FRAME);
    let nonce = challenge(&mut first, "alice").await;
    let answer = alice.respond(&nonce, None);
    first.write_message(&Message::Auth(Auth { answer })).await.unwrap();
    assert!(matches!(first.read_message().await.unwrap(), Some(Message::Welcome(_))));
    let mut replay = Connection::new(TcpStream::connect(site.server.addr).await.unwrap(), ferry::MAX_FRAME);
    let second_nonce = challenge(&mut replay, "alice").await;
    assert_ne!(nonce, second_nonce);
    replay.write_message(&Message::Auth(Auth { answer })).await.unwrap();
    assert_eq!(error_code(&mut replay).await, ErrorCode::AuthFailed);

    // An unknown client reads exactly like a wrong answer.
    let mut stranger = Connection::new(TcpStream::connect(site.server.addr).await.unwrap(), ferry::MAX_FRAME);
    let nonce = challenge(&mut stranger, "mallory").await;
    let answer = Token::generate("mallory").unwrap().respond(&nonce, None);
    stranger.write_message(&Message::Auth(Auth { answer })).await.unwrap();
    assert_eq!(error_code(&mut stranger).await, ErrorCode::AuthFailed);
}

/// Sends a Hello naming `client` and returns the server's Challenge nonce.
async fn challenge(conn: &mut Connection<TcpStream>, client: &str) -> [u8; 32] {
    let hello = Message::Hello(Hello {
        magic: MAGIC,
        min_version: ferry::PROTOCOL_VERSION,
        max_version: ferry::PROTOCOL_VERSION,
        agent: "test".into(),
        client: client.into(),
    });
    conn.write_message(&hello).await.unwrap();
    match conn.read_message().await.unwrap() {
        Some(Message::Challenge(c)) => c.nonce,
        other => panic!("expected a Challenge, got {other:?}"),
    }
}

#[tokio::test]
async fn clients_stay_inside_their_namespace_and_permissions() {
    let alice = Token::generate("alice").unwrap();
    let bob = Token::generate("bob").unwrap();
    let site = Site::start(
        &[
            (&alice, "alice", "[\"push\", \"pull\"]", ""),
            (&bob, "teams/bob", "[\"pull\"]", ""),
        ],
        "",
    );
    let root = site.server.root.clone();
    std::fs::write(root.join("teams/bob/report.txt"), b"bob's report").unwrap();
    let file = site.dir.join("a.bin");
    write_random(&file, 100_000, 2);
    let (alice_token, bob_token) = (site.token_file(&alice), site.token_file(&bob));

    // Read-only bob may pull his own file but not push, and cannot see alice's.
    let pulled = site.dir.join("pulled.txt");
    let url = site.server.url("report.txt");
    pull(&url, &pulled, &site.state("bob"), &["--token-file", &bob_token])
        .await
        .assert_ok();
    assert_eq!(std::fs::read(&pulled).unwrap(), b"bob's report");
    let pushed = push(
        &file,
        &site.server.url("x.bin"),
        &site.state("bob"),
        &["--token-file", &bob_token],
    )
    .await;
    assert_eq!(pushed.code, 4, "{}", pushed.stderr);
    assert!(pushed.stderr.contains("Forbidden"), "{}", pushed.stderr);
    push(
        &file,
        &site.server.url("mine.bin"),
        &site.state("alice"),
        &["--token-file", &alice_token],
    )
    .await
    .assert_ok();
    let peek = pull(
        &site.server.url("mine.bin"),
        &site.dir.join("peek"),
        &site.state("bob"),
        &["--token-file", &bob_token],
    )
    .await;
    assert_eq!(peek.code, 4, "bob must not find alice's file: {}", peek.stderr);

    // A symlink planted inside alice's namespace that leads into bob's is refused, for pushes and pulls.
    std::os::unix::fs::symlink("../teams/bob", root.join("alice/escape")).unwrap();
    let through = push(
        &file,
        &site.server.url("escape/stolen.bin"),
        &site.state("alice"),
        &["--token-file", &alice_token],
    )
    .await;
    assert_eq!(through.code, 4, "{}", through.stderr);
    assert!(!root.join("teams/bob/stolen.bin").exists());
    let read = pull(
        &site.server.url("escape/report.txt"),
        &site.dir.join("r"),
        &site.state("alice"),
        &["--token-file", &alice_token],
    )
    .await;
    assert_eq!(read.code, 4, "{}", read.stderr);

    // Raw frames a client cannot produce: every hostile path gets BadPath, for offers and pulls.
    let long = "x/".repeat(2100) + "y";
    let long_component = "y".repeat(300);
    for path in [
        "../teams/bob/x",
        "/etc/passwd",
        ".ferry/state/x",
        "a/../../x",
        "CON",
        "a/nul.txt",
        &long,
        &long_component,
    ] {
        let mut conn = connect_as(site.server.addr, &alice).await;
        let offer = Message::Offer(Offer {
            path: path.to_string(),
            manifest: one_chunk_manifest(10),
        });
        conn.write_message(&offer).await.unwrap();
        assert_eq!(error_code(&mut conn).await, ErrorCode::BadPath, "offer of {path:?}");
        let mut conn = connect_as(site.server.addr, &alice).await;
        let pull = Message::Pull(Pull {
            path: path.to_string(),
            chunking: Default::default(),
            window: 1 << 20,
            links: Default::default(),
        });
        conn.write_message(&pull).await.unwrap();
        assert_eq!(error_code(&mut conn).await, ErrorCode::BadPath, "pull of {path:?}");
    }
    let entries: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        entries.len(),
        3,
        "nothing appeared at the root outside the namespaces: {entries:?}"
    );
}

#[tokio::test]
async fn a_quota_refuses_what_does_not_fit_and_keeps_the_rest() {
    let alice = Token::generate("alice").unwrap();
    let site = Site::start(&[(&alice, "alice", "[\"push\", \"pull\"]", "quota = \"3MiB\"")], "");
    let token = site.token_file(&alice);
    let args = ["--token-file", token.as_str(), "--retries", "1"];
    let first = site.dir.join("first.bin");
    write_random(&first, 2 << 20, 3);
    push(&first, &site.server.url("first.bin"), &site.state("a"), &args)
        .await
        .assert_ok();

    let second = site.dir.join("second.bin");
    write_random(&second, 2 << 20, 4);
    let over = push(&second, &site.server.url("second.bin"), &site.state("a"), &args).await;
    assert_eq!(over.code, 4, "over quota is rejected for good: {}", over.stderr);
    assert!(
        over.stderr.contains("QuotaExceeded") && over.stderr.contains("quota"),
        "{}",
        over.stderr
    );
    assert_eq!(
        b3(&site.server.root.join("alice/first.bin")),
        b3(&first),
        "what was there is intact"
    );
    assert!(!site.server.root.join("alice/second.bin").exists());

    // Replacing a file counts its new size only once.
    write_random(&first, (5 << 20) / 2, 5);
    push(&first, &site.server.url("first.bin"), &site.state("a"), &args)
        .await
        .assert_ok();

    // A tree takes what fits; the rest is reported missing (exit 4), never half-written.
    let tree = site.dir.join("tree");
    std::fs::create_dir(&tree).unwrap();
    for (i, size) in [200_000usize, 200_000, 600_000].iter().enumerate() {
        write_random(&tree.join(format!("f{i}")), *size, 10 + i as u64);
    }
    let partly = push(&tree, &site.server.url("tree"), &site.state("a"), &args).await;
    assert_eq!(partly.code, 4, "{}", partly.stderr);
    let landed: Vec<_> = (0..3)
        .filter(|i| site.server.root.join(format!("alice/tree/f{i}")).exists())
        .collect();
    assert_eq!(landed, vec![0, 1], "the two files that fit landed, the third did not");
    for i in landed {
        let name = format!("f{i}");
        assert_eq!(
            b3(&site.server.root.join("alice/tree").join(&name)),
            b3(&tree.join(&name))
        );
    }
}

#[tokio::test]
async fn one_client_cannot_hold_more_than_its_connections() {
    let alice = Token::generate("alice").unwrap();
    let site = Site::start(
        &[(&alice, "alice", "[\"push\", \"pull\"]", "")],
        "max_connections_per_client = 1",
    );
    let file = site.dir.join("a.bin");
    write_random(&file, 100_000, 6);
    let token = site.token_file(&alice);
    let held = connect_as(site.server.addr, &alice).await;
    let refused = push(
        &file,
        &site.server.url("a.bin"),
        &site.state("a"),
        &["--token-file", &token, "--retries", "1"],
    )
    .await;
    assert_eq!(
        refused.code, 3,
        "the limit is retryable, and the retries ran out: {}",
        refused.stderr
    );
    assert!(refused.stderr.contains("connections open"), "{}", refused.stderr);
    drop(held);
    let mut landed = None;
    for _ in 0..50 {
        let outcome = push(
            &file,
            &site.server.url("a.bin"),
            &site.state("a"),
            &["--token-file", &token],
        )
        .await;
        if outcome.code == 0 {
            landed = Some(outcome);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        landed.is_some(),
        "once the held connection closed, the push went through"
    );
}

#[test]
fn a_server_without_tokens_refuses_to_listen_beyond_loopback() {
    let dir = tempfile::tempdir().unwrap();
    for listen in ["0.0.0.0:0", "[::]:0"] {
        let output = Command::new(ferry_bin())
            .args(["serve", "--listen", listen, "--root"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{listen}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("--insecure-no-auth"), "{stderr}");
    }
    let bad_config = dir.path().join("bad.toml");
    std::fs::write(&bad_config, "[limits]\nmax_conections = 3\n").unwrap();
    let output = Command::new(ferry_bin())
        .args(["serve", "--config"])
        .arg(&bad_config)
        .args(["--root"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("max_conections"));
}

/// `ferry token` prints a token and a config entry that a server accepts as they are.
#[tokio::test]
async fn ferry_token_output_works_as_printed() {
    let dir = tempfile::tempdir().unwrap();
    let token_path = dir.path().join("laptop.token");
    let output = Command::new(ferry_bin())
        .args(["token", "laptop", "--out"])
        .arg(&token_path)
        .output()
        .unwrap();
    assert!(output.status.success());
    let entry = String::from_utf8_lossy(&output.stdout).into_owned();
    let config = dir.path().join("server.toml");
    std::fs::write(&config, &entry).unwrap();
    let server = TestServer::start_with(&dir.path().join("root"), &["--config", config.to_str().unwrap()]);
    let file = dir.path().join("f");
    write_random(&file, 10_000, 7);
    let state = dir.path().join("state");
    push(
        &file,
        &server.url("f"),
        &state,
        &["--token-file", token_path.to_str().unwrap()],
    )
    .await
    .assert_ok();
    assert_eq!(b3(&server.root.join("laptop/f")), b3(&file));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&token_path).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

fn link_entry(path: &str, target: &str) -> TreeEntry {
    TreeEntry {
        path: path.into(),
        kind: EntryKind::Symlink { target: target.into() },
    }
}

fn dir_entry(path: &str) -> TreeEntry {
    TreeEntry {
        path: path.into(),
        kind: EntryKind::Dir {
            mode: 0o755,
            mtime: FileTime::default(),
        },
    }
}

/// Found by review: two tree offers could chain links out of the namespace. `l -> d/e/x/../../bob/secret` looks
/// inside the tree on paper; a later `d/e/x -> ../..` made the `..` after it climb from the tree's directory. A
/// target with `..` after a name is now refused, so no later link can redirect an earlier one.
#[tokio::test]
async fn links_from_two_tree_offers_cannot_chain_out_of_the_namespace() {
    let alice = Token::generate("alice").unwrap();
    let bob = Token::generate("bob").unwrap();
    let all = "[\"push\", \"pull\"]";
    let site = Site::start(&[(&alice, "alice", all, ""), (&bob, "bob", all, "")], "");
    let root = site.server.root.clone();
    std::fs::write(root.join("bob/secret"), b"bob's secret").unwrap();

    let mut conn = connect_as(site.server.addr, &alice).await;
    let first = vec![link_entry("l", "d/e/x/../../bob/secret")];
    let offer = Message::TreeOffer(TreeOffer {
        path: "t".into(),
        entries: first,
    });
    conn.write_message(&offer).await.unwrap();
    assert_eq!(error_code(&mut conn).await, ErrorCode::BadPath);

    let mut conn = connect_as(site.server.addr, &alice).await;
    let second = vec![dir_entry("d"), dir_entry("d/e"), link_entry("d/e/x", "../..")];
    let offer = Message::TreeOffer(TreeOffer {
        path: "t".into(),
        entries: second,
    });
    conn.write_message(&offer).await.unwrap();
    assert!(matches!(conn.read_message().await.unwrap(), Some(Message::TreeNeed(_))));
    conn.write_message(&Message::TreeCommit(Default::default()))
        .await
        .unwrap();
    assert!(matches!(
        conn.read_message().await.unwrap(),
        Some(Message::TreeCommitted(_))
    ));
    assert!(
        std::fs::symlink_metadata(root.join("alice/t/l")).is_err(),
        "the first link was never placed"
    );
}

/// Found by review: a non-ASCII name made the device-name check panic, killing the session. Such names now travel
/// like any other, both ways.
#[tokio::test]
async fn non_ascii_names_travel_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("café")).unwrap();
    for name in ["naïve.txt", "a€", "café/ü.md", "日本語.txt", "COMé"] {
        write_random(&tree.join(name), 5000, name.len() as u64);
    }
    push(&tree, &server.url("t"), &dir.path().join("state"), &[])
        .await
        .assert_ok();
    let back = dir.path().join("back");
    pull(&server.url("t"), &back, &dir.path().join("state2"), &[])
        .await
        .assert_ok();
    for name in ["naïve.txt", "a€", "café/ü.md", "日本語.txt", "COMé"] {
        assert_eq!(b3(&back.join(name)), b3(&tree.join(name)), "{name}");
    }
}
