//! A whole server session (handshake, receiver and sender roles) on arbitrary client bytes, in memory: a valid
//! Hello, then the fuzzer's bytes. The session must end (no hang) and never panic.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use ferry::server::{Server, ServerConfig};
use ferry::wire::codec::encode_frame;
use ferry::wire::{Hello, Message, MAGIC};
use libfuzzer_sys::fuzz_target;

struct Fixture {
    _dir: tempfile::TempDir,
    server: Server,
    runtime: tokio::runtime::Runtime,
    hello: Vec<u8>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), vec![7u8; 10_000]).unwrap();
        let config = ServerConfig {
            idle_timeout: Duration::from_millis(200),
            handshake_timeout: Duration::from_millis(200),
            ..ServerConfig::new(dir.path().to_path_buf())
        };
        let server = Server::open(config).unwrap();
        let mut hello = Vec::new();
        let msg = Message::Hello(Hello {
            magic: MAGIC,
            min_version: ferry::PROTOCOL_VERSION,
            max_version: ferry::PROTOCOL_VERSION,
            agent: "fuzz".into(),
            client: String::new(),
        });
        encode_frame(&msg, ferry::MAX_FRAME, &mut hello).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        Fixture { _dir: dir, server, runtime, hello }
    })
}

fuzz_target!(|data: &[u8]| {
    let fx = fixture();
    let mut input = fx.hello.clone();
    input.extend_from_slice(data);
    let answer = fx.runtime.block_on(fx.server.replay(&input, Duration::from_secs(10)));
    assert!(answer.is_some(), "the session hung");
});
