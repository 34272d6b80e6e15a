//! Quotas, limits and the `[store]` settings of a group of `ferry serve --store` servers on one Garage bucket
//! (docs/object-store.md "Quotas, namespaces and limits", "Configuration"): a namespace's usage is what the bucket
//! holds, whichever server stored it and whatever a server's `--state` remembers; credentials come from key files;
//! `[store] gc = true` collects the bucket from the server.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::auth::Token;
use ferry::storage::object::layout::{self, Layout};
use ferry::storage::object::StoreSettings;
use object_store::ObjectStore;

use crate::directories::push_as_given;
use crate::s3::count;
use crate::util::garage;
use crate::util::*;

/// A group's shared configuration: one client, `alice`, in namespace `alice`, with `extra` in its entry.
struct Group {
    dir: PathBuf,
    config: PathBuf,
    token_file: String,
    url: String,
}

impl Group {
    fn new(dir: &Path, url: &str, extra: &str) -> Group {
        let alice = Token::generate("alice").unwrap();
        let config = dir.join("server.toml");
        std::fs::write(
            &config,
            format!(
                "[[client]]\nid = \"alice\"\nsecret = \"{}\"\nnamespace = \"alice\"\npermissions = [\"push\", \
                 \"pull\"]\n{extra}\n",
                alice.secret_hex()
            ),
        )
        .unwrap();
        let token_file = dir.join("alice.token");
        std::fs::write(&token_file, format!("{alice}\n")).unwrap();
        Group {
            dir: dir.to_path_buf(),
            config,
            token_file: token_file.display().to_string(),
            url: url.to_string(),
        }
    }

    /// A server of the group with its own `--state` (named `state`), and `extra` flags.
    fn server(&self, name: &str, state: &str, extra: &[&str]) -> TestServer {
        let state = self.dir.join(state);
        let mut args = vec![
            "--store",
            &self.url,
            "--config",
            self.config.to_str().unwrap(),
            "--state",
            state.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        TestServer::start_with(&self.dir.join(name), &args)
    }

    /// Pushes a random file of `size` bytes (seed `seed`) to `path` on `server`, without retries.
    async fn push(&self, server: &TestServer, path: &str, size: usize, seed: u64) -> PushOutcome {
        let src = self.dir.join(format!("src-{seed}.bin"));
        write_random(&src, size, seed);
        let args = ["--token-file", self.token_file.as_str(), "--retries", "0"];
        push(&src, &server.url(path), &self.dir.join(format!("client-{seed}")), &args).await
    }

    /// The bucket, and the layout of namespace `alice`.
    fn bucket(&self) -> (Arc<dyn ObjectStore>, Layout) {
        let settings = StoreSettings::from_url(&self.url).unwrap();
        (settings.build().unwrap(), settings.layout("alice"))
    }
}

fn assert_refused(outcome: &PushOutcome, code: &str) {
    assert_ne!(outcome.code, 0, "must be refused with {code}: {}", outcome.json);
    assert!(outcome.stderr.contains(code), "refused with {code}? {}", outcome.stderr);
}

/// The quota counts what the bucket holds: a file committed through A counts on B, and on B again after B lost its
/// state; a refused offer leaves no record that would count against the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_quota_counts_the_files_of_every_server() {
    let Some(cluster) = garage::cluster() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let group = Group::new(dir.path(), &cluster.store_url("quota"), "quota = \"5MiB\"");
    let a = group.server("a", "a-state", &[]);
    let mut b = group.server("b", "b-state", &[]);
    group.push(&a, "first.bin", 3 << 20, 1).await.assert_ok();

    // 3 MiB through A and 3 MiB through B would be 6 MiB in a namespace of 5.
    let over = group.push(&b, "second.bin", 3 << 20, 2).await;
    assert_refused(&over, "QuotaExceeded");
    let (store, layout) = group.bucket();
    assert_eq!(
        count(&store, &layout.open()).await,
        0,
        "the refused offer left a record"
    );

    // The same with B's state gone: the bucket, not the state, holds the usage.
    b.kill9();
    std::fs::remove_dir_all(dir.path().join("b-state")).unwrap();
    let b = group.server("b", "b-state", &[]);
    let over = group.push(&b, "second.bin", 3 << 20, 2).await;
    assert_refused(&over, "QuotaExceeded");

    // What fits still lands (no refused record counts against it), and then counts too.
    group.push(&b, "third.bin", 1 << 20, 3).await.assert_ok();
    let over = group.push(&b, "fourth.bin", 3 << 19, 4).await;
    assert_refused(&over, "QuotaExceeded");
    assert_eq!(count(&store, &layout.files()).await, 2);
}

/// A tree's small files count against the quota as the bucket holds them: a tree committed through A counts when
/// B plans the next tree, and a tree that B committed counts on B's next tree before any rescan of the bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_tree_quota_counts_the_trees_of_every_server() {
    let Some(cluster) = garage::cluster() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let group = Group::new(dir.path(), &cluster.store_url("tree-quota"), "quota = \"1000KiB\"");
    let a = group.server("a", "a-state", &[]);
    let b = group.server("b", "b-state", &[]);
    let tree = |name: &str, seed: u64| {
        let root = dir.path().join(name);
        std::fs::create_dir_all(&root).unwrap();
        for i in 0..6 {
            write_random(&root.join(format!("f{i}.bin")), 100 * 1024, seed * 10 + i);
        }
        format!("{}/", root.display())
    };
    let flags = ["--token-file", group.token_file.as_str(), "--retries", "0"];
    let state = dir.path().join("client");
    let (store, layout) = group.bucket();
    push_as_given(&tree("one", 1), &a.url("one"), &state, &flags)
        .await
        .assert_ok();
    let held = count(&store, &layout.files()).await;

    // 600 KiB through A and 600 KiB through B would be 1200 KiB in a namespace of 1000 KiB: 4 files fit.
    let second = push_as_given(&tree("two", 2), &b.url("two"), &state, &flags).await;
    assert_ne!(second.code, 0, "B must refuse part of the second tree: {}", second.json);
    assert!(
        second.json.to_string().contains("quota"),
        "refused for the quota? {}",
        second.json
    );
    let added = count(&store, &layout.files()).await - held;
    assert!(
        added <= 4 + 1,
        "B added {added} entries: more files than the quota left (4, and a directory)"
    );

    // What B committed counts on B's next tree at once (no rescan of the bucket in between): nothing fits.
    let held = count(&store, &layout.files()).await;
    let third = push_as_given(&tree("three", 3), &b.url("three"), &state, &flags).await;
    assert_ne!(third.code, 0, "the namespace is full: {}", third.json);
    let added = count(&store, &layout.files()).await - held;
    assert!(
        added <= 1,
        "B added {added} entries to a full namespace: it forgot what it had just committed"
    );
}

/// Open transfers and their records' bytes are counted from `open/`: a transfer open through A counts on B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_open_transfers_count_across_servers() {
    let Some(cluster) = garage::cluster() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let group = Group::new(dir.path(), &cluster.store_url("open-limits"), "");
    let a = group.server("a", "a-state", &[]);
    // A slow push through A keeps one transfer open.
    let src = dir.path().join("slow.bin");
    write_random(&src, 32 << 20, 10);
    let args = [
        "--token-file",
        group.token_file.as_str(),
        "--chunking",
        "fixed",
        "--chunk-size",
        "1MiB",
        "--bwlimit",
        "1MiB",
        "--window",
        "1MiB",
    ];
    let slow = push_command(&src, &a.url("slow.bin"), &dir.path().join("slow-client"), &args)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _slow = KillOnDrop::new(slow);
    let (store, layout) = group.bucket();
    let deadline = Instant::now() + Duration::from_secs(60);
    let record = loop {
        if let Some(meta) = layout::list(&*store, &layout.open()).await.unwrap().into_iter().next() {
            break meta;
        }
        assert!(Instant::now() < deadline, "the slow push never opened its record");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let b = group.server("b", "b-state", &["--max-open-transfers", "1"]);
    let refused = group.push(&b, "other.bin", 1 << 20, 11).await;
    assert_refused(&refused, "TooManyTransfers");
    assert!(refused.stderr.contains("1 open transfers"), "{}", refused.stderr);

    // Room for two transfers, but not for a second record beside this one.
    let limit = (record.size + 32).to_string();
    let c = group.server("c", "c-state", &["--max-manifest-bytes", &limit]);
    let refused = group.push(&c, "other.bin", 1 << 20, 11).await;
    assert_refused(&refused, "TooManyTransfers");
    assert!(refused.stderr.contains("manifests"), "{}", refused.stderr);
    assert_eq!(count(&store, &layout.open()).await, 1, "only the slow push's record");
}

/// `[store] access_key_file` and `secret_key_file` give the credentials (over the environment's), and a wrong
/// one fails the start without showing what the files hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_key_files_give_the_credentials() {
    let Some(cluster) = garage::cluster() else {
        return;
    };
    let url = cluster.store_url("key-files");
    let dir = tempfile::tempdir().unwrap();
    let (id_file, secret_file) = (dir.path().join("key-id"), dir.path().join("secret"));
    std::fs::write(&id_file, format!("{}\n", cluster.var("AWS_ACCESS_KEY_ID"))).unwrap();
    std::fs::write(&secret_file, format!("{}\n", cluster.var("AWS_SECRET_ACCESS_KEY"))).unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!("[store]\nurl = \"{url}\"\naccess_key_file = \"key-id\"\nsecret_key_file = \"secret\"\n"),
    )
    .unwrap();
    // Wrong credentials in the environment: only the files can make this server start and store.
    let wrong = [
        ("AWS_ACCESS_KEY_ID", "GK000000000000000000000000"),
        (
            "AWS_SECRET_ACCESS_KEY",
            "0000000000000000000000000000000000000000000000000000000000000000",
        ),
    ];
    let state = dir.path().join("state");
    let args = ["--config", config.to_str().unwrap(), "--state", state.to_str().unwrap()];
    let server = TestServer::start_with_env(&dir.path().join("root"), &args, &wrong);
    let src = dir.path().join("src.bin");
    let data = write_random(&src, 1 << 20, 21);
    push(&src, &server.url("f.bin"), &dir.path().join("c1"), &[])
        .await
        .assert_ok();
    let out = dir.path().join("out.bin");
    pull(&server.url("f.bin"), &out, &dir.path().join("c2"), &[])
        .await
        .assert_ok();
    assert!(std::fs::read(&out).unwrap() == data, "pulled bytes differ");
    drop(server);

    // A wrong secret in the file: the start fails, naming the store, not the secret.
    let secret = "not-the-secret-fedcba9876543210fedcba9876543210";
    std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
    let mut cmd = std::process::Command::new(ferry_bin());
    cmd.args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let output = tokio::task::spawn_blocking(move || {
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "a server the bucket refuses must not start: {stderr}"
    );
    assert!(stderr.contains("object store"), "{stderr}");
    assert!(!stderr.contains(secret), "the secret leaked: {stderr}");
}

/// `[store] gc = true`: the server collects the bucket by itself: the chunks of a replaced file go, the new
/// file's stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_server_runs_the_gc_when_configured() {
    let Some(cluster) = garage::cluster() else {
        return;
    };
    let url = cluster.store_url("server-gc");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(&config, format!("[store]\nurl = \"{url}\"\ngc = true\n")).unwrap();
    let state = dir.path().join("state");
    // Test knobs: a grace period of 2 s (rule R assumes the same), rule C's wait to match, a run every second.
    let server = TestServer::start_with(
        &dir.path().join("root"),
        &[
            "--config",
            config.to_str().unwrap(),
            "--state",
            state.to_str().unwrap(),
            "--gc-grace",
            "2s",
            "--gc-confirm-wait",
            "2s",
            "--gc-interval",
            "1s",
        ],
    );
    let src = dir.path().join("src.bin");
    write_random(&src, 2 << 20, 31);
    push(&src, &server.url("f.bin"), &dir.path().join("c1"), &[])
        .await
        .assert_ok();
    let data = write_random(&src, 2 << 20, 32);
    let second = push(&src, &server.url("f.bin"), &dir.path().join("c1"), &[]).await;
    second.assert_ok();

    let settings = StoreSettings::from_url(&url).unwrap();
    let (store, layout) = (settings.build().unwrap(), settings.layout(""));
    let deadline = Instant::now() + Duration::from_secs(90);
    while count(&store, &layout.chunks()).await as u64 > second.u64("chunks") {
        assert!(
            Instant::now() < deadline,
            "the replaced file's chunks are still there: the server never ran the gc"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = dir.path().join("out.bin");
    pull(&server.url("f.bin"), &out, &dir.path().join("c2"), &[])
        .await
        .assert_ok();
    assert!(std::fs::read(&out).unwrap() == data, "the committed file lost a chunk");
    assert!(
        layout::list(&*store, &layout.chunks()).await.unwrap().len() as u64 == second.u64("chunks"),
        "every chunk of the committed file stays"
    );
}
