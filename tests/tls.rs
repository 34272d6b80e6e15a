//! TLS: a server with a `ferry keygen` certificate, clients that pin its fingerprint or trust a CA, and every way
//! the trust check can fail. Resumption works through TLS like through plain TCP.

use std::path::Path;

use ferry::fault::{FaultProxy, Faults};

use crate::util::*;

const MIB: usize = 1 << 20;

#[tokio::test]
async fn a_pinned_certificate_carries_a_resumed_push_and_a_pull() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, fingerprint) = keygen(dir.path());
    let server = TestServer::start_with(&dir.path().join("root"), &["--tls-cert", &cert, "--tls-key", &key]);
    let src = dir.path().join("big.img");
    write_random(&src, 6 * MIB, 1);
    // Two cuts through a proxy: every reconnect is a new TLS session, and the push still resumes.
    let (first_cut, second_cut) = (3 * MIB as u64, 2 * MIB as u64);
    let plan = vec![Faults::cut(first_cut), Faults::cut(second_cut)];
    let proxy = FaultProxy::start("127.0.0.1:0", server.addr, plan).await.unwrap();
    let url = format!("ferry://{}/big.img", proxy.addr());
    let (chunk, window) = (256 * KIB as u64, MIB as u64);
    let tls = [
        "--tls-fingerprint",
        fingerprint.as_str(),
        "--chunking",
        "fixed",
        "--chunk-size",
        "256KiB",
        "--window",
        "1MiB",
    ];
    let out = push(&src, &url, &dir.path().join("state"), &tls).await;
    out.assert_ok();
    assert_eq!(b3(&server.root.join("big.img")), b3(&src));
    assert_eq!(out.u64("attempts"), 3, "two cuts, three connections");
    // Resumed, not restarted: each cut costs at most what was in flight, window + chunk (8.5 MiB in all). A
    // restart would send what crossed before each cut again: 6 + 3 + 2 = 11 MiB.
    let size = 6 * MIB as u64;
    let bound = size + 2 * (window + chunk);
    assert!(bound < size + first_cut + second_cut, "the bound tells a restart apart");
    assert!(
        out.u64("bytes_sent") <= bound,
        "resumed, not restarted: {} > {bound}: {}",
        out.u64("bytes_sent"),
        out.json
    );

    let back = dir.path().join("back.img");
    pull(&server.url("big.img"), &back, &dir.path().join("state2"), &tls)
        .await
        .assert_ok();
    assert_eq!(b3(&back), b3(&src));
}

#[tokio::test]
async fn an_untrusted_or_missing_tls_peer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = keygen(dir.path());
    let tls_server = TestServer::start_with(&dir.path().join("root"), &["--tls-cert", &cert, "--tls-key", &key]);
    let plain_server = TestServer::start(&dir.path().join("plain"));
    let src = dir.path().join("f");
    write_random(&src, 100_000, 2);
    let state = dir.path().join("state");
    let other = format!("sha256:{}", "ab".repeat(32));

    let wrong = push(&src, &tls_server.url("f"), &state, &["--tls-fingerprint", &other]).await;
    assert_eq!(
        wrong.code, 7,
        "a certificate that is not the pinned one: {}",
        wrong.stderr
    );
    assert!(wrong.stderr.contains("not the pinned one"), "{}", wrong.stderr);

    let plain_to_tls = push(&src, &tls_server.url("f"), &state, &["--retries", "0"]).await;
    assert_ne!(plain_to_tls.code, 0, "a plain client gets nothing from a TLS server");
    assert!(!tls_server.root.join("f").exists());

    let tls_to_plain = push(
        &src,
        &plain_server.url("f"),
        &state,
        &["--tls-fingerprint", &other, "--retries", "0"],
    )
    .await;
    // The plain server answers the ClientHello with an Error frame and closes: the client either reads that as
    // a corrupt TLS record (exit 7) or, if the close reset the connection first, as a network failure (exit 3).
    assert!(
        [3, 7].contains(&tls_to_plain.code),
        "a TLS client gets nothing from a plain server: {}",
        tls_to_plain.stderr
    );
    assert!(!plain_server.root.join("f").exists());
}

/// A CA and a server certificate it signed for 127.0.0.1; returns (ca.pem, cert.pem, key.pem).
fn issue(dir: &Path, name: &str) -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} test CA"));
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let paths = [
        format!("{name}-ca.pem"),
        format!("{name}-cert.pem"),
        format!("{name}-key.pem"),
    ]
    .map(|file| dir.join(file).display().to_string());
    std::fs::write(&paths[0], ca.pem()).unwrap();
    std::fs::write(&paths[1], leaf.pem()).unwrap();
    std::fs::write(&paths[2], key.serialize_pem()).unwrap();
    let [ca, cert, key] = paths;
    (ca, cert, key)
}

#[tokio::test]
async fn a_ca_file_trusts_what_that_ca_signed_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = issue(dir.path(), "good");
    let (stranger_ca, _, _) = issue(dir.path(), "other");
    let server = TestServer::start_with(&dir.path().join("root"), &["--tls-cert", &cert, "--tls-key", &key]);
    let src = dir.path().join("f");
    write_random(&src, 300_000, 3);
    let state = dir.path().join("state");

    push(&src, &server.url("f"), &state, &["--tls-ca", &ca])
        .await
        .assert_ok();
    assert_eq!(b3(&server.root.join("f")), b3(&src));

    let refused = push(&src, &server.url("g"), &state, &["--tls-ca", &stranger_ca]).await;
    assert_eq!(refused.code, 7, "{}", refused.stderr);
    assert!(!server.root.join("g").exists());

    // The certificate is for 127.0.0.1, not for "localhost": the name is checked in CA mode.
    let by_name = format!("ferry://localhost:{}/h", server.addr.port());
    let wrong_name = push(&src, &by_name, &state, &["--tls-ca", &ca]).await;
    assert_eq!(wrong_name.code, 7, "{}", wrong_name.stderr);
}

#[tokio::test]
async fn a_client_that_never_finishes_the_tls_handshake_is_dropped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = keygen(dir.path());
    let args = [
        "--tls-cert",
        cert.as_str(),
        "--tls-key",
        key.as_str(),
        "--handshake-timeout",
        "1s",
    ];
    let server = TestServer::start_with(&dir.path().join("root"), &args);
    let started = std::time::Instant::now(); // before the server's clock starts at accept
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(&[0x16, 0x03, 0x01]).await.unwrap(); // the start of a ClientHello, then silence
    let mut buf = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(30), stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the server closed the stalled TLS handshake");
    // A server that closes at once fails here; only the handshake timeout (1 s) may close it.
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(900),
        "closed after {:?}, before the handshake timeout",
        started.elapsed()
    );
}

/// Silence after a complete TLS and ferry handshake: the idle timeout ends the session with `Error{Timeout}`, not
/// before it is due, and then the server closes.
#[tokio::test]
async fn a_client_silent_after_the_ferry_handshake_under_tls_is_dropped_at_the_idle_timeout() {
    use ferry::wire::{Connection, ErrorCode, Hello, Message, MAGIC};
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, fingerprint) = keygen(dir.path());
    let args = [
        "--tls-cert",
        cert.as_str(),
        "--tls-key",
        key.as_str(),
        "--idle-timeout",
        "1s",
    ];
    let server = TestServer::start_with(&dir.path().join("root"), &args);
    let tls = ferry::tls::ClientTls::new(&ferry::tls::Trust::pinned(&fingerprint).unwrap()).unwrap();
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let stream = tls.connect("127.0.0.1", tcp).await.unwrap();
    let mut conn = Connection::new(stream, ferry::MAX_FRAME);
    let hello = Message::Hello(Hello {
        magic: MAGIC,
        min_version: ferry::PROTOCOL_VERSION,
        max_version: ferry::PROTOCOL_VERSION,
        agent: "silent".into(),
        client: String::new(),
    });
    conn.write_message(&hello).await.unwrap();
    assert!(matches!(conn.read_message().await.unwrap(), Some(Message::Welcome(_))));
    let started = std::time::Instant::now();
    let answer = tokio::time::timeout(std::time::Duration::from_secs(30), conn.read_message()).await;
    match answer {
        Ok(Ok(Some(Message::Error(frame)))) => assert_eq!(frame.code, ErrorCode::Timeout, "{}", frame.message),
        other => panic!("expected a Timeout error frame, got {other:?}"),
    }
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(900),
        "dropped after {:?}, before the idle timeout",
        started.elapsed()
    );
    assert!(
        matches!(conn.read_message().await, Ok(None) | Err(_)),
        "then the server closes"
    );
}

/// A token over TLS: the answer is bound to the TLS session (proto-spec.md §3a), and both ends agree on it.
#[tokio::test]
async fn a_token_over_tls_is_accepted_and_lands_in_its_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, fingerprint) = keygen(dir.path());
    let token = ferry::auth::Token::generate("laptop").unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n[[client]]\nid = \"laptop\"\nsecret = \"{}\"\nnamespace = \"laptop\"\npermissions = [\"push\"]\n",
            token.secret_hex()
        ),
    )
    .unwrap();
    let token_file = dir.path().join("laptop.token");
    std::fs::write(&token_file, token.to_string()).unwrap();
    let server = TestServer::start_with(&dir.path().join("root"), &["--config", config.to_str().unwrap()]);
    let src = dir.path().join("f");
    write_random(&src, 2 * MIB, 4);
    let args = [
        "--tls-fingerprint",
        fingerprint.as_str(),
        "--token-file",
        token_file.to_str().unwrap(),
    ];
    push(&src, &server.url("f"), &dir.path().join("state"), &args)
        .await
        .assert_ok();
    assert_eq!(b3(&server.root.join("laptop/f")), b3(&src));
}
