//! `ferry pull`: the client as the receiver, with the same guarantees in the other direction: verified chunks,
//! a verified digest before an atomic rename, resume after a cut link or a killed client, reuse of an older copy.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime};

use ferry::fault::{FaultProxy, Faults};

use crate::util::*;

const CHUNK: u64 = 64 * KIB as u64;
const WINDOW: u64 = MIB as u64;
const SMALL: [&str; 6] = ["--chunking", "fixed", "--chunk-size", "64KiB", "--window", "1MiB"];

/// Partial files of a pull into `dir`: they live in `dir/.ferry/partial`, which the pull removes when done.
fn partials_in(dir: &std::path::Path) -> usize {
    let private = dir.join(".ferry/partial");
    let hidden = std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with(".ferry-"))
        .count();
    hidden + std::fs::read_dir(private).map_or(0, |d| d.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pulled_file_matches_keeps_its_metadata_and_a_repeat_is_a_no_op() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let state = dir.path().join("state");
    let src = dir.path().join("report.pdf");
    write_random(&src, 3 * MIB + 5, 21);
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o640)).unwrap();
    let mtime = SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    set_mtime(&src, mtime);
    push(&src, &server.url("docs/"), &state, &[]).await.assert_ok();

    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let first = pull(&server.url("docs/report.pdf"), &out_dir, &state, &[]).await;
    first.assert_ok();
    let pulled = out_dir.join("report.pdf");
    assert_eq!(b3(&pulled), b3(&src), "an existing directory receives the remote name");
    assert_eq!(first.json["digest"], b3(&src));
    assert_eq!(first.u64("bytes_received"), 3 * MIB as u64 + 5);
    let meta = std::fs::metadata(&pulled).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o640);
    assert_eq!(meta.modified().unwrap(), mtime);
    assert_eq!(partials_in(&out_dir), 0, "no partial left behind");
    assert!(
        !out_dir.join(".ferry").exists(),
        "the private directory is removed once empty"
    );

    let again = pull(&server.url("docs/report.pdf"), &pulled, &state, &[]).await;
    again.assert_ok();
    assert_eq!(again.json["already_present"], true);
    assert_eq!(again.u64("bytes_received"), 0);

    let missing = pull(&server.url("docs/nope.pdf"), &out_dir, &state, &[]).await;
    assert_eq!(missing.code, 4, "a missing source is a rejection: {}", missing.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_links_resume_within_one_pull_receiving_at_most_a_window_again() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let size = 8 * MIB as u64;
    let src = server.root.join("big.img"); // placed on the server by hand: it is hashed on the first pull
    write_random(&src, size as usize, 22);
    let plan = vec![
        Faults::cut(3 * MIB as u64).downstream(),
        Faults::cut(2 * MIB as u64).downstream(),
    ];
    let proxy = FaultProxy::start("127.0.0.1:0", server.addr, plan).await.unwrap();
    let dest = dir.path().join("big.img");
    let url = format!("ferry://{}/big.img", proxy.addr());

    let out = pull(&url, &dest, &dir.path().join("state"), &SMALL).await;
    out.assert_ok();
    assert_eq!(b3(&dest), b3(&src));
    assert_eq!(out.u64("attempts"), 3, "two cuts, three connections");
    let extra = out.u64("bytes_received") - size;
    assert!(extra <= 2 * (WINDOW + CHUNK), "received {extra} bytes twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_pull_reruns_and_fetches_only_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let size = 16 * MIB as u64;
    let stall_at = 8 * MIB as u64;
    let src = server.root.join("vm.qcow2");
    write_random(&src, size as usize, 23);
    let state = dir.path().join("state");
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let proxy = FaultProxy::start("127.0.0.1:0", server.addr, vec![Faults::stall(stall_at).downstream()])
        .await
        .unwrap();
    let mut args = SMALL.to_vec();
    args.extend(["--json-progress", "20ms"]);
    let mut client = pull_command(&format!("ferry://{}/vm.qcow2", proxy.addr()), &out_dir, &state, &args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(60), proxy.stalled(1))
        .await
        .expect("the pull reached the stall");
    // Let the client make what it holds durable: it holds every chunk that crossed before the stall, so its own
    // progress (bytes_done counts bytes synced and recorded) reaches at least stall_at - (window + chunk), the
    // most a cut may cost.
    let durable = stall_at - (WINDOW + CHUNK);
    let stdout = client.stdout.take().unwrap();
    let reached = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|line| {
                let event: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                event["event"] == "progress" && event["bytes_done"].as_u64().unwrap_or(0) >= durable
            })
    });
    let reached = tokio::time::timeout(Duration::from_secs(60), reached).await;
    assert!(
        matches!(reached, Ok(Ok(true))),
        "the client never reported {durable} bytes durable"
    );
    client.kill().unwrap();
    client.wait().unwrap();
    assert!(
        !out_dir.join("vm.qcow2").exists(),
        "no partial file under the final name"
    );
    assert_eq!(
        partials_in(&out_dir),
        1,
        "the partial survived, in the destination's private .ferry/partial"
    );

    let out = pull(&server.url("vm.qcow2"), &out_dir, &state, &SMALL).await;
    out.assert_ok();
    assert_eq!(b3(&out_dir.join("vm.qcow2")), b3(&src));
    let received = out.u64("bytes_received");
    assert!(
        received <= size - stall_at + WINDOW + CHUNK,
        "the re-run received {received} of {size} bytes"
    );
    assert_eq!(partials_in(&out_dir), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_flipped_in_transit_is_rejected_by_the_puller_and_fetched_again() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let size = 4 * MIB as u64;
    let src = server.root.join("data.bin");
    write_random(&src, size as usize, 24);
    let flip = Faults::flip(MIB as u64 + 40 * KIB as u64).downstream();
    let proxy = FaultProxy::start("127.0.0.1:0", server.addr, vec![flip]).await.unwrap();
    let dest = dir.path().join("data.bin");

    let out = pull(
        &format!("ferry://{}/data.bin", proxy.addr()),
        &dest,
        &dir.path().join("state"),
        &SMALL,
    )
    .await;
    out.assert_ok();
    assert_eq!(proxy.stats().flips.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(b3(&dest), b3(&src), "the corrupt byte never landed");
    assert_eq!(out.u64("chunks_rejected"), 1);
    assert_eq!(out.u64("bytes_received"), size + CHUNK, "exactly one chunk came twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_damaged_on_the_server_is_reported_and_never_written() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let state = dir.path().join("state");
    let src = dir.path().join("ledger.db");
    write_random(&src, 2 * MIB, 25);
    push(&src, &server.url("ledger.db"), &state, &[]).await.assert_ok();
    // Bit rot: one byte changes in place, and the mtime is put back, so nothing but the content tells.
    let stored = server.root.join("ledger.db");
    let mtime = std::fs::metadata(&stored).unwrap().modified().unwrap();
    let mut bytes = std::fs::read(&stored).unwrap();
    bytes[MIB] ^= 0x10;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&stored)
        .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, &bytes, 0))
        .unwrap();
    set_mtime(&stored, mtime);

    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = pull(&server.url("ledger.db"), &out_dir, &state, &[]).await;
    assert_eq!(out.code, 5, "integrity failure: {}", out.stderr);
    assert_eq!(out.json["status"], "error");
    assert!(
        !out_dir.join("ledger.db").exists(),
        "nothing written under the final name"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_local_copy_lends_its_chunks_to_a_pull() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let size = 32 * MIB;
    let local = dir.path().join("disk.raw");
    let mut data = write_random(&local, size, 26); // yesterday's copy, not fetched by ferry
    data[size / 2..size / 2 + MIB].fill(0x33);
    let remote = server.root.join("disk.raw");
    std::fs::write(&remote, &data).unwrap();

    let out = pull(&server.url("disk.raw"), &local, &dir.path().join("state"), &[]).await;
    out.assert_ok();
    assert_eq!(b3(&local), b3(&remote));
    let (received, reused) = (out.u64("bytes_received"), out.u64("bytes_reused"));
    assert!(received <= 8 * MIB as u64, "received {received} bytes");
    assert_eq!(received + reused, size as u64);
}

/// A hand-written server: accepts one connection, answers Hello with Welcome, and reads the Pull.
async fn greet_a_pull(
    listener: &tokio::net::TcpListener,
    agent: &str,
) -> ferry::wire::Connection<tokio::net::TcpStream> {
    use ferry::wire::{Connection, Message, Welcome};
    let (stream, _) = listener.accept().await.unwrap();
    let mut conn = Connection::new(stream, ferry::MAX_FRAME);
    let _hello = conn.read_message().await.unwrap();
    let welcome = Welcome {
        version: ferry::PROTOCOL_VERSION,
        agent: agent.into(),
        max_frame: ferry::MAX_FRAME,
    };
    conn.write_message(&Message::Welcome(welcome)).await.unwrap();
    assert!(matches!(
        conn.read_message().await.unwrap(),
        Some(Message::Pull(_) | Message::PullExpecting(_))
    ));
    conn
}

/// A hostile server answers a tree pull with symlink entries that look inside the tree but chain out of it
/// (`x/up -> ..`, then a link through `x/up/x/up/../..`), one of them named like a pull's partial file.
async fn pull_from_a_server_planting_links(links: &[&str]) -> (PushOutcome, tempfile::TempDir) {
    use ferry::chunk::{build_manifest, ChunkSpec};
    use ferry::manifest::FileTime;
    use ferry::transfer::sender::{send, Rehash, SendOptions, SendStats, Source};
    use ferry::wire::{EntryKind, Message, TreeEntry, TreeOffer};
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("victim.txt"), b"original").unwrap();
    let payload = dir.path().join("payload");
    std::fs::write(&payload, b"written by the server\n").unwrap();
    let file = std::fs::File::open(&payload).unwrap();
    let manifest = build_manifest(&file, &payload, ChunkSpec::default()).unwrap();
    let src = Source {
        file: std::sync::Arc::new(file),
        manifest: std::sync::Arc::new(manifest),
        rehash: Rehash::Always,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let mut conn = greet_a_pull(&listener, "hostile").await;
        let t = FileTime {
            secs: 1_700_000_000,
            nanos: 0,
        };
        let part = format!(
            ".ferry-{}.part",
            &ferry::manifest::hex(blake3::hash(b"big").as_bytes())[..32]
        );
        let link = |p: &str, to: &str| TreeEntry {
            path: p.into(),
            kind: EntryKind::Symlink { target: to.into() },
        };
        let entries = vec![
            link(&part, "x/up/x/up/../../victim.txt"),
            TreeEntry {
                path: "big".into(),
                kind: EntryKind::File {
                    size: src.manifest.size,
                    digest: src.manifest.digest,
                    mtime: t,
                    mode: 0o644,
                },
            },
            TreeEntry {
                path: "x".into(),
                kind: EntryKind::Dir { mode: 0o755, mtime: t },
            },
            link("x/up", ".."),
        ];
        let offer = Message::TreeOffer(TreeOffer {
            path: "t".into(),
            entries,
        });
        conn.write_message(&offer).await.unwrap();
        if let Ok(Some(Message::TreeNeed(_))) = conn.read_message().await {
            let _ = send(
                &mut conn,
                "t/big",
                &src,
                &SendOptions::default(),
                &mut SendStats::default(),
                &mut |_| {},
            )
            .await;
            let _ = conn.write_message(&Message::TreeCommit(Default::default())).await;
            let _ = conn.read_message().await;
        }
    });
    let mut args = vec!["--retries", "0"];
    args.extend(links);
    let dest = dir.path().join("home/dest"); // dest/../../victim.txt is the victim
    let out = pull(&format!("ferry://{addr}/t"), &dest, &dir.path().join("state"), &args).await;
    let _ = server.await;
    (out, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_server_cannot_make_a_pull_write_outside_its_destination() {
    for links in [&[][..], &["--links", "record"][..]] {
        let (out, dir) = pull_from_a_server_planting_links(links).await;
        assert_ne!(out.code, 0, "the hostile offer is refused ({links:?}): {}", out.stderr);
        assert_eq!(
            std::fs::read(dir.path().join("victim.txt")).unwrap(),
            b"original",
            "nothing outside the destination was written ({links:?})"
        );
        let big = dir.path().join("home/dest/big");
        assert!(
            !big.symlink_metadata().is_ok_and(|m| m.file_type().is_symlink()),
            "no symlink under a final file name"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_for_another_path_than_the_one_pulled_is_refused() {
    use ferry::chunk::{build_manifest, ChunkSpec};
    use ferry::wire::{Message, Offer};
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other.txt");
    std::fs::write(&other, b"not what was asked for").unwrap();
    let file = std::fs::File::open(&other).unwrap();
    let manifest = build_manifest(&file, &other, ChunkSpec::default()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let mut conn = greet_a_pull(&listener, "confused").await;
        let offer = Offer {
            path: "other.txt".into(),
            manifest,
        };
        conn.write_message(&Message::Offer(offer)).await.unwrap();
        let _ = conn.read_message().await;
    });
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = pull(
        &format!("ferry://{addr}/wanted.txt"),
        &out_dir,
        &dir.path().join("state"),
        &["--retries", "0"],
    )
    .await;
    let _ = server.await;
    assert_ne!(out.code, 0, "{}", out.json);
    assert!(!out_dir.join("wanted.txt").exists());
    assert!(!out_dir.join("other.txt").exists());
}

/// Issue 12 item 9: in a shared destination directory another user pre-creates `.ferry/partial` (mode 777, or
/// owned by them) to swap their own file over the verified partial. The pull refuses that directory, writes
/// nothing under the final name, and a private partial directory works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_refuses_a_partial_directory_others_can_write_to() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let data = write_random(&server.root.join("report.pdf"), 3 * MIB, 91);
    let shared = dir.path().join("shared");
    let planted = shared.join(".ferry/partial");
    std::fs::create_dir_all(&planted).unwrap();
    std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o777)).unwrap();
    let state = dir.path().join("state");

    let out = pull(&server.url("report.pdf"), &shared, &state, &[]).await;
    assert_ne!(out.code, 0, "refused: {}", out.json);
    assert!(out.stderr.contains("can be written by other users"), "{}", out.stderr);
    assert!(!shared.join("report.pdf").exists(), "nothing under the final name");
    assert_eq!(
        std::fs::read_dir(&planted).unwrap().count(),
        0,
        "no partial in the planted directory"
    );

    std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o700)).unwrap();
    pull(&server.url("report.pdf"), &shared, &state, &[]).await.assert_ok();
    assert_eq!(std::fs::read(shared.join("report.pdf")).unwrap(), data);
}

/// Over a long round trip a pull asks for a window that covers it (1 GiB/s × the handshake's round trip, as a push
/// starts), not the 16 MiB default; a window set with `--window` is asked for as set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_over_a_long_round_trip_asks_for_a_window_that_covers_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let state = dir.path().join("state");
    let src = dir.path().join("far.bin");
    write_random(&src, MIB + 3, 24);
    push(&src, &server.url("far.bin"), &state, &[]).await.assert_ok();
    let proxy = FaultProxy::start(
        "127.0.0.1:0",
        server.addr,
        vec![Faults::latency(Duration::from_millis(20))],
    )
    .await
    .unwrap();
    let url = format!("ferry://{}/far.bin", proxy.addr());

    pull(&url, &dir.path().join("sized.bin"), &state, &[]).await.assert_ok();
    pull(&url, &dir.path().join("set.bin"), &state, &["--window", "2MiB"])
        .await
        .assert_ok();
    assert_eq!(b3(&dir.path().join("sized.bin")), b3(&src));
    let log = std::fs::read_to_string(server.root.with_extension("server.log")).unwrap();
    let windows: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("serving a pull"))
        .filter_map(|l| l.split("window=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect();
    // 40 ms or more at 1 GiB/s is at least 40 MiB.
    assert!(
        matches!(windows[..], [sized, 2097152] if sized >= 40 * MIB as u64),
        "{windows:?}\n{log}"
    );
}
