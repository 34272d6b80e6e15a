//! Directory pushes and pulls as rsync users expect them (README, "Directories"): `SRC` into `DEST/` lands as
//! `DEST/SRC`, `SRC/` puts its content into `DEST`; pushes only add unless `--delete`, which removes what the
//! destination tree holds beyond the source (never anything outside it) and says what it removed; a pull without
//! `--links record` names the symlinks it leaves out.

use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::util::*;

fn tree(dir: &Path, files: &[(&str, &str)]) {
    for (path, content) in files {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
}

/// `ferry push SRC URL --json EXTRA...` where SRC is given exactly as `source` (a trailing slash matters).
pub(crate) async fn push_as_given(source: &str, url: &str, state: &Path, extra: &[&str]) -> PushOutcome {
    let mut cmd = Command::new(ferry_bin());
    cmd.args(["push", source, url, "--state"])
        .arg(state)
        .args(["--json", "--retry-delay", "20ms", "--timeout", "10s"])
        .args(extra)
        .stdin(Stdio::null());
    run(cmd).await
}

fn deleted_paths(outcome: &PushOutcome) -> Vec<String> {
    outcome.json["deleted"]["paths"]
        .as_array()
        .unwrap_or_else(|| panic!("no deleted paths in {}", outcome.json))
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_lands_under_its_own_name_and_its_content_with_a_trailing_slash() {
    let dir = tempfile::tempdir().unwrap();
    let (state, local) = (dir.path().join("state"), dir.path().join("local"));
    tree(
        &local,
        &[("photos/a.jpg", "a"), ("photos/trip/b.jpg", "b"), ("docs/c.txt", "c")],
    );
    let server = TestServer::start(&dir.path().join("root"));
    let root = &server.root;
    let at = |name: &str| local.join(name).display().to_string();

    // Two directories pushed into one remote directory no longer mix: each keeps its name.
    push_as_given(&at("photos"), &server.url("bk/"), &state, &[])
        .await
        .assert_ok();
    push_as_given(&at("docs"), &server.url("bk/"), &state, &[])
        .await
        .assert_ok();
    assert_eq!(std::fs::read_to_string(root.join("bk/photos/trip/b.jpg")).unwrap(), "b");
    assert_eq!(std::fs::read_to_string(root.join("bk/docs/c.txt")).unwrap(), "c");
    assert!(!root.join("bk/a.jpg").exists() && !root.join("bk/c.txt").exists());

    // `SRC/`: the content goes into the destination itself.
    let pushed = push_as_given(&format!("{}/", at("photos")), &server.url("flat/"), &state, &[]).await;
    pushed.assert_ok();
    assert!(
        pushed.json["destination"].as_str().unwrap().ends_with("/flat"),
        "{}",
        pushed.json
    );
    assert_eq!(std::fs::read_to_string(root.join("flat/a.jpg")).unwrap(), "a");
    assert!(!root.join("flat/photos").exists());

    // No trailing slash on the remote path: it names the tree's directory (as before).
    push_as_given(&at("photos"), &server.url("named"), &state, &[])
        .await
        .assert_ok();
    assert_eq!(std::fs::read_to_string(root.join("named/trip/b.jpg")).unwrap(), "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_removes_what_the_source_no_longer_holds_and_nothing_outside_the_tree() {
    let dir = tempfile::tempdir().unwrap();
    let (state, local) = (dir.path().join("state"), dir.path().join("local"));
    tree(
        &local,
        &[
            ("site/keep.txt", "k"),
            ("site/old.txt", "o"),
            ("site/gone/x.txt", "x"),
            ("site/sub/y.txt", "y"),
        ],
    );
    let server = TestServer::start(&dir.path().join("root"));
    let root = &server.root;
    let site = local.join("site").display().to_string();
    push_as_given(&site, &server.url("bk/"), &state, &[]).await.assert_ok();

    // Things beside the tree, and a symlink in it that points outside: none of their targets may go.
    tree(root, &[("bk/sibling.txt", "s"), ("outside/precious", "p")]);
    std::os::unix::fs::symlink(root.join("outside"), root.join("bk/site/sub/link")).unwrap();
    std::fs::remove_file(local.join("site/old.txt")).unwrap();
    std::fs::remove_dir_all(local.join("site/gone")).unwrap();

    // Without --delete a push only adds.
    push_as_given(&site, &server.url("bk/"), &state, &[]).await.assert_ok();
    assert!(root.join("bk/site/old.txt").exists());

    let pushed = push_as_given(&site, &server.url("bk/"), &state, &["--delete"]).await;
    pushed.assert_ok();
    let mut deleted = deleted_paths(&pushed);
    deleted.sort();
    assert_eq!(
        deleted,
        ["gone", "gone/x.txt", "old.txt", "sub/link"],
        "{}",
        pushed.json
    );
    assert_eq!(pushed.json["deleted"]["total"], 4);
    assert!(!root.join("bk/site/old.txt").exists() && !root.join("bk/site/gone").exists());
    assert!(std::fs::symlink_metadata(root.join("bk/site/sub/link")).is_err());
    for kept in [
        "bk/site/keep.txt",
        "bk/site/sub/y.txt",
        "bk/sibling.txt",
        "outside/precious",
    ] {
        assert!(root.join(kept).exists(), "{kept} must stay");
    }
    server
        .wait_for_log(
            "removed (not in the pushed tree, --delete)",
            std::time::Duration::from_secs(10),
        )
        .await;

    // Text mode names every deleted entry on stderr; a second run has nothing left to delete.
    std::fs::write(root.join("bk/site/stray.txt"), "z").unwrap();
    let mut cmd = Command::new(ferry_bin());
    cmd.args(["push", &site, &server.url("bk/"), "--delete", "--state"])
        .arg(&state);
    let output = cmd.stdin(Stdio::null()).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("ferry: deleted stray.txt"), "{stderr}");
    let again = push_as_given(&site, &server.url("bk/"), &state, &["--delete"]).await;
    again.assert_ok();
    assert_eq!(again.json["deleted"]["total"], 0, "{}", again.json);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_is_refused_for_a_file_and_against_a_server_older_than_version_6() {
    use ferry::wire::{Connection, Message, Welcome};
    use tokio::net::TcpListener;

    let dir = tempfile::tempdir().unwrap();
    let (state, local) = (dir.path().join("state"), dir.path().join("local"));
    tree(&local, &[("t/a.txt", "a"), ("f.txt", "f")]);
    let file = local.join("f.txt").display().to_string();
    let refused = push_as_given(&file, "ferry://127.0.0.1:1/x", &state, &["--delete"]).await;
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    assert!(
        refused.json["error"]
            .as_str()
            .unwrap()
            .contains("directory pushes only"),
        "{}",
        refused.json
    );

    // A version-5 server: the client stops after the handshake, before any TreeOffer.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let old_server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut conn = Connection::new(stream, ferry::MAX_FRAME);
        let _hello = conn.read_message().await.unwrap();
        let welcome = Welcome {
            version: 5,
            agent: "ferry/0.5".into(),
            max_frame: ferry::MAX_FRAME,
        };
        conn.write_message(&Message::Welcome(welcome)).await.unwrap();
        conn.read_message().await.ok().flatten()
    });
    let tree_dir = local.join("t").display().to_string();
    let refused = push_as_given(&tree_dir, &format!("ferry://{addr}/bk/"), &state, &["--delete"]).await;
    assert_eq!(refused.code, i32::from(ferry::exit::REJECTED), "{}", refused.stderr);
    let error = refused.json["error"].as_str().unwrap();
    assert!(
        error.contains("--delete") && error.contains("protocol version 5"),
        "{error}"
    );
    assert_eq!(old_server.await.unwrap(), None, "nothing was sent after the handshake");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_names_the_symlinks_it_leaves_out_and_delete_removes_local_extras() {
    let dir = tempfile::tempdir().unwrap();
    let (state, local) = (dir.path().join("state"), dir.path().join("local"));
    tree(&local, &[("t/a.txt", "a"), ("t/d/b.txt", "b")]);
    std::os::unix::fs::symlink("a.txt", local.join("t/link")).unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let source = local.join("t").display().to_string();
    push_as_given(&source, &server.url("bk/"), &state, &["--links", "record"])
        .await
        .assert_ok();
    assert!(std::fs::symlink_metadata(server.root.join("bk/t/link"))
        .unwrap()
        .is_symlink());

    let restore = dir.path().join("restore");
    let pulled = pull(&server.url("bk/t/"), &restore, &state, &[]).await;
    pulled.assert_ok();
    let skipped = pulled.json["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 1, "{}", pulled.json);
    assert_eq!(skipped[0]["path"], "link");
    assert!(skipped[0]["reason"].as_str().unwrap().contains("--links record"));
    assert!(std::fs::symlink_metadata(restore.join("link")).is_err());
    assert_eq!(pulled.json["deleted"], Value::Null, "no --delete, no deletion");

    // Local extras: kept by a plain pull, removed by --delete; the client's own .ferry stays.
    tree(&restore, &[("extra.txt", "e"), ("d/more/c.txt", "c")]);
    pull(&server.url("bk/t/"), &restore, &state, &[]).await.assert_ok();
    assert!(restore.join("extra.txt").exists());
    let pulled = pull(&server.url("bk/t/"), &restore, &state, &["--delete"]).await;
    pulled.assert_ok();
    let mut deleted = deleted_paths(&pulled);
    deleted.sort();
    assert_eq!(deleted, ["d/more", "d/more/c.txt", "extra.txt"], "{}", pulled.json);
    assert!(restore.join("a.txt").exists() && restore.join("d/b.txt").exists());
    assert!(!restore.join("extra.txt").exists() && !restore.join("d/more").exists());

    // A file pull has nothing to delete, and says so.
    let mut cmd = Command::new(ferry_bin());
    cmd.args(["pull", &server.url("bk/t/a.txt")])
        .arg(dir.path().join("a.txt"))
        .arg("--delete")
        .arg("--state")
        .arg(&state);
    let output = cmd.stdin(Stdio::null()).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("--delete applies to trees"), "{stderr}");
}

/// The server takes TreePrune only on a version-6 connection and only right after the tree it names: after the
/// same (empty) tree, a version-5 connection gets `UnexpectedMessage` and nothing is removed; a version-6 one gets
/// the removal; a TreePrune with no tree before it is refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tree_prune_needs_version_6_and_a_tree_just_committed() {
    use ferry::wire::{Connection, ErrorCode, Hello, Message, TreeCommit, TreeOffer, TreePrune, MAGIC};
    use tokio::net::TcpStream;

    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    tree(&server.root, &[("bk/keep.txt", "k")]);
    let prune = || Message::TreePrune(TreePrune { path: "bk".into() });
    let connect = |version: u16| async move {
        let mut conn = Connection::new(TcpStream::connect(server.addr).await.unwrap(), ferry::MAX_FRAME);
        let hello = Hello {
            magic: MAGIC,
            min_version: 3,
            max_version: version,
            agent: "test".into(),
            client: String::new(),
        };
        conn.write_message(&Message::Hello(hello)).await.unwrap();
        match conn.read_message().await.unwrap() {
            Some(Message::Welcome(welcome)) => assert_eq!(welcome.version, version),
            other => panic!("expected Welcome, got {other:?}"),
        }
        conn
    };
    let expect_unexpected = |reply: Option<Message>| match reply {
        Some(Message::Error(frame)) => assert_eq!(frame.code, ErrorCode::UnexpectedMessage, "{frame:?}"),
        other => panic!("expected an Error, got {other:?}"),
    };
    // No tree before it.
    let mut conn = connect(6).await;
    conn.write_message(&prune()).await.unwrap();
    expect_unexpected(conn.read_message().await.unwrap());

    for version in [5, 6] {
        let mut conn = connect(version).await;
        let offer = TreeOffer {
            path: "bk".into(),
            entries: Vec::new(),
        };
        conn.write_message(&Message::TreeOffer(offer)).await.unwrap();
        assert!(matches!(conn.read_message().await.unwrap(), Some(Message::TreeNeed(_))));
        let commit = TreeCommit { failed: Vec::new() };
        conn.write_message(&Message::TreeCommit(commit)).await.unwrap();
        assert!(matches!(
            conn.read_message().await.unwrap(),
            Some(Message::TreeCommitted(_))
        ));
        conn.write_message(&prune()).await.unwrap();
        let reply = conn.read_message().await.unwrap();
        if version == 5 {
            expect_unexpected(reply);
            assert!(
                server.root.join("bk/keep.txt").exists(),
                "a refused TreePrune removes nothing"
            );
        } else {
            match reply {
                Some(Message::TreePruned(pruned)) => {
                    assert_eq!((pruned.removed, pruned.total), (vec!["keep.txt".to_string()], 1));
                }
                other => panic!("expected TreePruned, got {other:?}"),
            }
            assert!(!server.root.join("bk/keep.txt").exists());
        }
    }
}

/// A tree that did not land completely deletes nothing: a file the receiver refused (a directory in its way) must
/// not make `--delete` take anything else, and the summary says why nothing went.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_after_an_incomplete_tree_removes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (state, local) = (dir.path().join("state"), dir.path().join("local"));
    tree(&local, &[("t/a.txt", "a"), ("t/blocked", "b")]);
    let server = TestServer::start(&dir.path().join("root"));
    tree(&server.root, &[("bk/t/blocked/inside", "i"), ("bk/t/extra.txt", "e")]);
    let source = local.join("t").display().to_string();
    let pushed = push_as_given(&source, &server.url("bk/"), &state, &["--delete"]).await;
    assert_eq!(pushed.code, i32::from(ferry::exit::REJECTED), "{}", pushed.json);
    let skipped = pushed.json["deleted"]["skipped"]
        .as_str()
        .unwrap_or_else(|| panic!("{}", pushed.json));
    assert!(skipped.contains("nothing deleted"), "{skipped}");
    assert_eq!(pushed.json["deleted"]["total"], 0);
    assert!(server.root.join("bk/t/extra.txt").exists() && server.root.join("bk/t/blocked/inside").exists());
    assert!(
        server.root.join("bk/t/a.txt").exists(),
        "the rest of the tree still landed"
    );
}

/// What `--delete` removes stops counting against the namespace's quota: its committed records go with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_files_free_their_quota() {
    let alice = ferry::auth::Token::generate("alice").unwrap();
    let site = crate::access::Site::start(&[(&alice, "alice", "[\"push\"]", "quota = \"300KiB\"")], "");
    let token = site.token_file(&alice);
    let state = site.state("alice");
    let local = site.dir.join("local");
    std::fs::create_dir_all(local.join("t")).unwrap();
    write_random(&local.join("t/a.bin"), 200 * KIB, 1);
    let source = local.join("t").display().to_string();
    let url = site.server.url("bk/");
    let flags = ["--token-file", token.as_str()];
    push_as_given(&source, &url, &state, &flags).await.assert_ok();

    std::fs::remove_file(local.join("t/a.bin")).unwrap();
    let pruned = push_as_given(&source, &url, &state, &[&flags[..], &["--delete"]].concat()).await;
    pruned.assert_ok();
    assert_eq!(deleted_paths(&pruned), ["a.bin"]);

    // 200 KiB more fits in 300 KiB only if the deleted 200 KiB no longer count.
    write_random(&local.join("t/b.bin"), 200 * KIB, 2);
    let refilled = push_as_given(&source, &url, &state, &flags).await;
    refilled.assert_ok();
    assert_eq!(refilled.json["files_committed"], 1, "{}", refilled.json);
}
