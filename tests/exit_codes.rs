//! Each failure class gives its documented exit code (README, "Exit codes") through the real binary, and the
//! `--json` summary says the same. Covered elsewhere: 4 for refused paths and quotas (bad_input.rs, access.rs),
//! 5 for integrity (faults.rs, pull.rs, tree.rs), 7 for tokens and TLS (access.rs, tls.rs), and the lock and
//! `--max-duration` behaviour in depth (cron.rs).

use std::io::Write;
use std::os::fd::AsRawFd;

use crate::cron::stalled_listener;
use crate::util::*;

fn assert_code(out: &PushOutcome, code: i32, what: &str) {
    assert_eq!(out.code, code, "{what}: {}\n{}", out.json, out.stderr);
    if code > 2 {
        assert_eq!(out.json["status"], "error", "{what}");
        assert_eq!(out.json["exit_code"], code, "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_failure_class_has_its_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let state = dir.path().join("state");
    let src = dir.path().join("src.bin");
    write_random(&src, 10 * KIB, 1);

    let bad_url = push(&src, "http://127.0.0.1/x", &state, &[]).await;
    assert_code(&bad_url, 2, "a URL that is not ferry://");

    let closed = RefusingPort::new();
    let nowhere = format!("ferry://127.0.0.1:{}/x", closed.port);
    let refused = push(&src, &nowhere, &state, &["--retries", "0"]).await;
    assert_code(&refused, 3, "nothing listening, no retries");

    let missing_remote = pull(&server.url("no/such/file"), &dir.path().join("out"), &state, &[]).await;
    assert_code(&missing_remote, 4, "pulling a path the server does not have");

    let missing_source = push(&dir.path().join("no-such-file"), &server.url("x"), &state, &[]).await;
    assert_code(&missing_source, 6, "a source file that does not exist");
    assert!(
        missing_source.stderr.contains("no-such-file"),
        "{}",
        missing_source.stderr
    );

    let (_hung, addr) = stalled_listener();
    let hung = pull(
        &format!("ferry://{addr}/x"),
        &dir.path().join("out"),
        &state,
        &["--max-duration", "1s"],
    )
    .await;
    assert_code(
        &hung,
        9,
        "a pull from a server that never answers, bounded by --max-duration",
    );

    push(&src, &server.url("x"), &state, &[]).await.assert_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_state_lock_is_exit_8_naming_its_holder() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("root"));
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let mut lock = std::fs::File::create(state.join("lock")).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(
        unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    lock.write_all(b"4242\nferry push /srv/backup.tar ferry://host/backups/\n")
        .unwrap();
    let src = dir.path().join("src.bin");
    write_random(&src, 10 * KIB, 2);

    let out = push(&src, &server.url("x"), &state, &[]).await;
    assert_code(&out, 8, "the state directory is in use");
    assert!(
        out.stderr
            .contains("another ferry run (pid 4242: ferry push /srv/backup.tar ferry://host/backups/) holds"),
        "{}",
        out.stderr
    );
    let pulled = pull(&server.url("x"), &dir.path().join("out"), &state, &[]).await;
    assert_code(&pulled, 8, "a pull takes the same lock");

    drop(lock);
    push(&src, &server.url("x"), &state, &[]).await.assert_ok();
}
