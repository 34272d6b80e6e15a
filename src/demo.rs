//! `ferry demo`: a resumed, verified push through a flaky link, all in one process.
//!
//! Starts a server in a temporary directory, generates a pseudo-random file, and pushes it through the
//! [`fault`](crate::fault) proxy, which cuts the connection three times and flips one byte once. Prints what
//! happened and checks the destination independently (its BLAKE3 read back from disk).

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::client::{push, Backoff, ClientError, ClientEvent, PushOptions};
use crate::fault::{FaultProxy, Faults};
use crate::manifest::hex;
use crate::server::{Server, ServerConfig, ServerError};
use crate::transfer::sender::{SendEvent, SendOptions};
use crate::url::FerryUrl;

/// Demo settings.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Size of the generated file.
    pub size: u64,
    /// Target average chunk size.
    pub chunk_size: u32,
}

/// The demo failed.
#[derive(Debug, Error)]
pub enum DemoError {
    /// Local I/O (temp dir, file generation, output).
    #[error("demo I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The server did not start.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The push failed.
    #[error(transparent)]
    Push(#[from] ClientError),
    /// Source and destination differ.
    #[error("destination digest {dest} differs from source digest {expected}")]
    Mismatch {
        /// Source digest.
        expected: String,
        /// Destination digest.
        dest: String,
    },
}

/// Runs the demo, narrating to `out`.
pub async fn run(opts: DemoOptions, out: &mut (dyn Write + Send)) -> Result<(), DemoError> {
    let dir = tempfile::tempdir()?;
    let source = dir.path().join("vm-image.raw");
    writeln!(out, "ferry demo: generating {} of pseudo-random data", human(opts.size))?;
    let source_digest = generate(&source, opts.size)?;

    let root = dir.path().join("server-root");
    let server = Server::open(ServerConfig::new(root.clone()))?;
    let stats = server.stats();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let server_addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let server_task = tokio::spawn(server.run(listener, shutdown.clone()));

    let size = opts.size.max(1);
    let plan = vec![
        Faults::cut(size / 5),
        Faults {
            flip_at: Some(size / 10),
            cut_after: Some(size * 2 / 5),
            ..Faults::NONE
        },
        Faults::cut(size / 4),
    ];
    let proxy = FaultProxy::start("127.0.0.1:0", server_addr, plan).await?;
    writeln!(
        out,
        "server on {server_addr}, flaky link on {} (3 cuts, 1 flipped byte)",
        proxy.addr()
    )?;

    let push_opts = PushOptions {
        source: source.clone(),
        destination: FerryUrl::single("127.0.0.1", proxy.addr().port(), "images/vm-image.raw"),
        state_dir: dir.path().join("client-state"),
        chunking: crate::chunk::ChunkSpec {
            size: opts.chunk_size,
            ..Default::default()
        },
        retries: 10,
        send: SendOptions::default(),
        connect_timeout: Duration::from_secs(5),
        access: Default::default(),
        streams: 1,
        backoff: Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(1),
        },
        links: Default::default(),
        bandwidth: None,
        deadline: None,
        delete: false,
    };
    let mut narrate = |event: ClientEvent| {
        let line = match event {
            ClientEvent::Manifest { chunks, size, .. } => {
                format!("manifest: {chunks} chunks, {}", human(size))
            }
            ClientEvent::Connected { attempt } => format!("connection {attempt}: handshake ok"),
            ClientEvent::Send(SendEvent::Need { chunks, bytes }) => {
                format!("  server needs {chunks} chunks ({})", human(bytes))
            }
            ClientEvent::Send(SendEvent::Rejected { index }) => {
                format!("  server caught a corrupt chunk #{index}; re-sending it")
            }
            ClientEvent::Retrying { delay, error, .. } => {
                format!("  link dropped ({error}); retrying in {delay:.2?}")
            }
            ClientEvent::Moved { from, to, error, .. } => format!("  {from} failed ({error}); moving to {to}"),
            ClientEvent::SourceChanged { reason } => format!("  source changed: {reason}"),
            ClientEvent::Send(SendEvent::TreeNeed { .. } | SendEvent::FileFailed { .. })
            | ClientEvent::Scanned { .. } => {
                return; // the demo pushes one file
            }
        };
        let _ = writeln!(out, "{line}");
    };
    let report = push(push_opts, &mut narrate).await?;
    shutdown.cancel();
    let _ = server_task.await;

    let dest_digest = hex(&crate::verify::digest_file(&mut std::fs::File::open(
        root.join("images/vm-image.raw"),
    )?)?);
    let source_hex = hex(&source_digest);
    let rejected = stats.chunks_rejected.load(std::sync::atomic::Ordering::Relaxed);
    writeln!(out, "\nresult")?;
    writeln!(out, "  resumes (reconnects):        {}", report.attempts - 1)?;
    writeln!(
        out,
        "  corrupt chunks caught/resent: {rejected}/{}",
        report.sent.chunks_rejected
    )?;
    writeln!(
        out,
        "  bytes sent / file size:      {} / {} ({:.2}x)",
        report.sent.bytes_sent,
        report.size,
        report.sent.bytes_sent as f64 / report.size.max(1) as f64
    )?;
    writeln!(out, "  source digest      (BLAKE3): {source_hex}")?;
    writeln!(out, "  destination digest (BLAKE3): {dest_digest}")?;
    writeln!(out, "  time: {:.2?}", report.duration)?;
    if dest_digest != source_hex {
        return Err(DemoError::Mismatch {
            expected: source_hex,
            dest: dest_digest,
        });
    }
    writeln!(out, "verified: destination is byte-identical to the source")?;
    Ok(())
}

/// Writes `size` pseudo-random bytes (BLAKE3 in XOF mode) to `path`; returns their BLAKE3.
fn generate(path: &Path, size: u64) -> std::io::Result<[u8; 32]> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut xof = blake3::Hasher::new().update(b"ferry demo").finalize_xof();
    let mut digest = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        xof.fill(&mut buf[..n]);
        digest.update(&buf[..n]);
        file.write_all(&buf[..n])?;
        left -= n as u64;
    }
    file.flush()?;
    Ok(*digest.finalize().as_bytes())
}

/// Bytes as KiB/MiB/GiB with one decimal.
pub fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", units[unit])
    }
}
