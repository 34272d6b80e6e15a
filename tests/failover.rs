//! Several servers in one URL (README, "Several servers"; proto-spec.md §14): the client tries them in order and
//! moves to the next on a failure of the server, in the same run; a refusal every server would repeat ends the run.
//! Here the servers are separate local-root servers, so a server moved to receives the file from scratch.

use std::path::Path;
use std::time::Duration;

use ferry::auth::Token;

use crate::util::*;

const SMALL: [&str; 6] = ["--chunking", "fixed", "--chunk-size", "64KiB", "--window", "1MiB"];

/// The summary's list of servers used.
fn servers_used(out: &PushOutcome) -> Vec<String> {
    let list = out.json["servers"]
        .as_array()
        .unwrap_or_else(|| panic!("no servers in {}", out.json));
    list.iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_first_server_hands_the_push_to_the_second() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestServer::start(&dir.path().join("b"));
    let src = dir.path().join("f.bin");
    write_random(&src, 3 * MIB + 17, 1);
    let dead_port = RefusingPort::new();
    let dead = format!("127.0.0.1:{}", dead_port.port);
    let url = format!("ferry://{dead},{}/in/f.bin", b.addr);
    let out = push(&src, &url, &dir.path().join("state"), &SMALL).await;
    out.assert_ok();
    assert_eq!(
        b3(&b.root.join("in/f.bin")),
        b3(&src),
        "the file is verified on the second server"
    );
    assert_eq!(out.json["destination"], url, "the printed URL keeps the list");
    assert_eq!(out.u64("moves"), 1, "{}", out.json);
    assert_eq!(servers_used(&out), [b.addr.to_string()]);
    assert_eq!(out.json["server"], b.addr.to_string());

    // Pull and `status --server` go through the same list.
    let back = dir.path().join("back.bin");
    let pulled = pull(
        &format!("ferry://{dead},{}/in/f.bin", b.addr),
        &back,
        &dir.path().join("pull-state"),
        &[],
    )
    .await;
    pulled.assert_ok();
    assert_eq!(b3(&back), b3(&src));
    assert_eq!(pulled.u64("moves"), 1);
    let status = std::process::Command::new(ferry_bin())
        .args(["status", "--server", &format!("ferry://{dead},{}", b.addr), "--json"])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "status --server asks the second server: {}",
        String::from_utf8_lossy(&status.stderr)
    );
}

/// Server A is SIGKILLed once a quarter of the file is acknowledged: the same run finishes on B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_push_is_replaced_by_the_next_in_the_same_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = TestServer::start(&dir.path().join("a"));
    let b = TestServer::start(&dir.path().join("b"));
    let src = dir.path().join("vm.img");
    let size = 12 * MIB as u64;
    write_random(&src, size as usize, 2);
    let state = dir.path().join("state");
    let url = format!("ferry://{},{}/vm.img", a.addr, b.addr);
    // The rate cap keeps the push running long enough to be cut at a known point (no timing is asserted).
    let mut args = SMALL.to_vec();
    args.extend(["--bwlimit", "3MiB"]);
    let client = KillOnDrop::new(
        push_command(&src, &url, &state, &args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_for_acknowledged(&state, size / 4).await;
    a.kill9();
    let mut b = b;
    let output = client.wait_with_output(&mut b, Duration::from_secs(120)).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
    assert!(
        output.status.success(),
        "{summary}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(b3(&b.root.join("vm.img")), b3(&src), "verified on B");
    assert!(!a.root.join("vm.img").exists(), "A never committed it");
    assert_eq!(summary["moves"], 1, "{summary}");
    assert_eq!(
        summary["servers"],
        serde_json::json!([a.addr.to_string(), b.addr.to_string()])
    );
    assert_eq!(summary["server"], b.addr.to_string());
    assert!(
        summary["bytes_sent"].as_u64().unwrap() >= size + size / 4,
        "B, a separate local server, received the file from scratch: {summary}"
    );
}

/// Waits (bounded in count and time) until the push running on `state` has `bytes` acknowledged.
pub(crate) async fn wait_for_acknowledged(state: &Path, bytes: u64) {
    for _ in 0..3000 {
        if ferry::client::read_running(state).is_some_and(|r| r.done >= bytes) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the push never had {bytes} bytes acknowledged");
}

/// A refused token is a refusal every server of a group would repeat: the run ends on A and B never hears of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_ends_the_run_without_moving() {
    let dir = tempfile::tempdir().unwrap();
    let alice = Token::generate("alice").unwrap();
    let mallory = Token::generate("alice").unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[[client]]\nid = \"alice\"\nsecret = \"{}\"\nnamespace = \"alice\"\npermissions = [\"push\", \"pull\"]\n",
            alice.secret_hex()
        ),
    )
    .unwrap();
    let a = TestServer::start_with(&dir.path().join("a"), &["--config", config.to_str().unwrap()]);
    let b = TestServer::start(&dir.path().join("b"));
    let token_file = dir.path().join("wrong.token");
    std::fs::write(&token_file, format!("{mallory}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let src = dir.path().join("f.bin");
    write_random(&src, 200 * KIB, 3);
    let url = format!("ferry://{},{}/f.bin", a.addr, b.addr);
    let mut args = SMALL.to_vec();
    args.extend(["--token-file", token_file.to_str().unwrap()]);
    let out = push(&src, &url, &dir.path().join("state"), &args).await;
    assert_eq!(out.code, i32::from(ferry::exit::AUTH), "{}\n{}", out.json, out.stderr);
    assert_eq!(out.u64("moves"), 0, "{}", out.json);
    assert!(!b.root.join("f.bin").exists(), "B received nothing");
    let partials = std::fs::read_dir(b.root.join(".ferry/partial")).map_or(0, |d| d.count());
    assert_eq!(partials, 0, "B received nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_remote_may_list_several_servers() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestServer::start(&dir.path().join("b"));
    let dead_port = RefusingPort::new();
    let config = dir.path().join("client.toml");
    std::fs::write(
        &config,
        format!(
            "[defaults]\nretry_delay = \"20ms\"\n\n[remote.group]\nurl = \"ferry://127.0.0.1:{},{}/base\"\n",
            dead_port.port, b.addr
        ),
    )
    .unwrap();
    let src = dir.path().join("f.bin");
    write_random(&src, MIB, 4);
    let mut cmd = std::process::Command::new(ferry_bin());
    cmd.arg("push")
        .arg(&src)
        .args(["group:dir/", "--json", "--client-config"])
        .arg(&config)
        .arg("--state")
        .arg(dir.path().join("state"))
        .env_remove("FERRY_CONFIG")
        .stdin(std::process::Stdio::null());
    let out = run(cmd).await;
    out.assert_ok();
    assert_eq!(b3(&b.root.join("base/dir/f.bin")), b3(&src));
    assert_eq!(out.u64("moves"), 1);
}

#[tokio::test]
async fn a_bad_server_list_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("f.bin");
    write_random(&src, KIB, 5);
    let seventeen: Vec<String> = (1..=17).map(|p| format!("127.0.0.1:{p}")).collect();
    for (url, says) in [
        ("ferry://127.0.0.1:1,127.0.0.1:1/x".to_string(), "twice"),
        (format!("ferry://{}/x", seventeen.join(",")), "at most 16"),
        ("ferry://127.0.0.1:1,/x".to_string(), "is not a ferry URL"),
    ] {
        let out = push(&src, &url, &dir.path().join("state"), &[]).await;
        assert_eq!(out.code, i32::from(ferry::exit::USAGE), "{url}: {}", out.stderr);
        assert!(out.stderr.contains(says), "{url}: {}", out.stderr);
    }
    let config = dir.path().join("client.toml");
    std::fs::write(&config, "[remote.g]\nurl = \"ferry://a:1,b:2,a:1/x\"\n").unwrap();
    let out = run({
        let mut cmd = std::process::Command::new(ferry_bin());
        cmd.arg("push")
            .arg(&src)
            .args(["g:f", "--json", "--client-config"])
            .arg(&config)
            .env_remove("FERRY_CONFIG");
        cmd
    })
    .await;
    assert_eq!(out.code, i32::from(ferry::exit::USAGE), "{}", out.stderr);
    assert!(out.stderr.contains("twice"), "{}", out.stderr);
}
