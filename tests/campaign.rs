//! Kill campaigns: one transfer survives many SIGKILLs of the server (restarted on the same port each time) or of
//! the client (re-run each time), finishing with the right digest and resending at most a window plus a chunk
//! per kill. Every kill lands on progress: only once some megabytes of chunks have crossed to the server since the
//! last kill (counted by a pass-through proxy), so each one interrupts a transfer, not the hashing or the handshake.

use std::sync::atomic::Ordering;
use std::time::Duration;

use ferry::fault::FaultProxy;

use crate::util::*;

const CHUNK: u64 = 64 * KIB as u64;
const WINDOW: u64 = MIB as u64;
const SMALL: [&str; 6] = ["--chunking", "fixed", "--chunk-size", "64KiB", "--window", "1MiB"];
const KILLS: u32 = 10;

fn free_loopback_port() -> String {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap().to_string()
}

/// Bytes that must reach the server between two kills, drawn per kill from this range. At least two windows: a
/// killed client's last window (window + chunk at most) may still drain through the proxy into the next run's
/// count, and the manifest (128–192 MiB in 64 KiB chunks is under 150 KiB) comes first; what remains is chunk bytes
/// of the run the kill lands on.
const PROGRESS: std::ops::Range<u64> = 2 * WINDOW..6 * WINDOW;

/// Waits (bounded) until the proxy has forwarded `bytes` more to the server than `from`, or `done()` says the run
/// is over. Returns whether the progress was reached.
async fn progress(proxy: &FaultProxy, from: u64, bytes: u64, mut done: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        if proxy.stats().bytes_up.load(Ordering::Relaxed) >= from + bytes {
            return true;
        }
        if done() {
            return false;
        }
        assert!(tokio::time::Instant::now() < deadline, "no progress in 120 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_survives_the_server_being_sigkilled_again_and_again() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let src = dir.path().join("vm.img");
    let size = 192 * MIB as u64;
    write_random(&src, size as usize, 41);
    let addr = free_loopback_port();
    let mut server = TestServer::start_at(&root, &addr, &[]);
    // The client talks to a proxy that stays up; each restarted server listens on the same port behind it.
    let proxy = FaultProxy::start("127.0.0.1:0", server.addr, vec![]).await.unwrap();
    let mut args = SMALL.to_vec();
    args.extend(["--retries", "100", "--timeout", "5s"]);
    let url = format!("ferry://{}/vm.img", proxy.addr());
    let mut client = KillOnDrop::new(
        push_command(&src, &url, &dir.path().join("state"), &args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut rng = Seeded::new(7);
    let mut kills: u32 = 0;
    while kills < KILLS {
        let from = proxy.stats().bytes_up.load(Ordering::Relaxed);
        let bytes = rng.in_range(PROGRESS);
        let over = || {
            server.assert_alive(); // a crash fails the campaign at once, not after the progress bound
            client.try_wait().unwrap().is_some()
        };
        if !progress(&proxy, from, bytes, over).await {
            break;
        }
        assert!(
            !root.join("vm.img").exists(),
            "killed mid-transfer, not after the commit"
        );
        server.kill9(); // panics if the server had crashed by itself
        kills += 1;
        server = TestServer::start_at(&root, &addr, &[]);
    }
    // Bounded, and failing at once if the last server crashes: the client would retry against it for many minutes.
    let output = client.wait_with_output(&mut server, Duration::from_secs(300)).await;
    let json: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&output.stdout).lines().last().unwrap_or("null")).unwrap();
    assert_eq!(output.status.code(), Some(0), "{json}");
    assert_eq!(b3(&root.join("vm.img")), b3(&src));
    assert_eq!(kills, KILLS, "every kill landed on a transfer in progress");
    assert!(
        json["attempts"].as_u64().unwrap() > u64::from(kills),
        "each kill cost the client a connection: {json}"
    );
    let sent = json["bytes_sent"].as_u64().unwrap();
    let bound = size + u64::from(kills) * (WINDOW + CHUNK);
    eprintln!("{kills} server kills: sent {sent} bytes for a {size}-byte file (bound {bound})");
    assert!(sent <= bound, "sent {sent} bytes, bound {bound}");
    server.kill9(); // still up: it never crashed by itself after the last restart
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_survives_the_client_being_sigkilled_again_and_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(&dir.path().join("root"));
    let proxy = FaultProxy::start("127.0.0.1:0", server.addr, vec![]).await.unwrap();
    let url = format!("ferry://{}/home.tar", proxy.addr());
    let src = dir.path().join("home.tar");
    let size = 128 * MIB as u64;
    write_random(&src, size as usize, 42);
    let state = dir.path().join("state");
    let mut rng = Seeded::new(8);
    let mut kills: u32 = 0;
    let mut finished = None;
    while kills < KILLS {
        let mut client = KillOnDrop::new(
            push_command(&src, &url, &state, &SMALL)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let from = proxy.stats().bytes_up.load(Ordering::Relaxed);
        let bytes = rng.in_range(PROGRESS);
        let over = || {
            server.assert_alive();
            client.try_wait().unwrap().is_some()
        };
        if !progress(&proxy, from, bytes, over).await {
            // it committed before this kill
            finished = Some(client.wait_with_output(&mut server, Duration::from_secs(60)).await);
            break;
        }
        client.kill().unwrap();
        let status = client.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "the client was killed, not done: {status}"
        );
        assert!(
            !server.root.join("home.tar").exists(),
            "killed mid-transfer, not after the commit"
        );
        kills += 1;
    }
    if let Some(output) = finished {
        assert_eq!(output.status.code(), Some(0));
    } else {
        push(&src, &url, &state, &SMALL).await.assert_ok();
    }
    assert_eq!(b3(&server.root.join("home.tar")), b3(&src));
    assert_eq!(kills, KILLS, "every kill landed on a transfer in progress");
    // The server's own count over all runs, from its commit log line (a killed client may miss the reply): the chunk
    // bytes it took in over the wire (`received_bytes` counts each durable chunk once, so it is the size).
    server.wait_for_log("committed", Duration::from_secs(30)).await;
    let log = std::fs::read_to_string(server.root.with_extension("server.log")).unwrap();
    let received: u64 = log
        .lines()
        .map(strip_ansi)
        .find(|l| l.contains("committed") && l.contains("home.tar"))
        .and_then(|l| l.split("wire_bytes_since_start=").nth(1).map(str::to_string))
        .map(|rest| {
            rest.chars()
                .skip_while(|c| !c.is_ascii_digit())
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        })
        .and_then(|n| n.parse().ok())
        .expect("the commit log line names wire_bytes_since_start");
    let bound = size + u64::from(kills) * (WINDOW + CHUNK);
    eprintln!("{kills} client kills: the server took in {received} bytes for a {size}-byte file (bound {bound})");
    assert!(
        received >= size && received <= bound,
        "the server took in {received} bytes, bound {bound}"
    );
    server.kill9(); // it never crashed by itself
}
