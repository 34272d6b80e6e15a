//! A bounded attack on a ferry server, for stress runs (issue 12, "Done when"): idle pre-auth connections, trickled
//! partial frames and floods of offers that never send data, together, for a fixed time. Plain TCP only.
//!
//! Usage: `cargo run --release --example attack -- 127.0.0.1:7878 --slots 300 --trickle 64 --flood 60
//! --seconds 60 [--token-file attacker.token]`. Point it only at a server you run, on loopback: the idle
//! connections come from 127.0.0.2, 127.0.0.3, … (`--per-address` of them each), which Linux routes on `lo`.
//! Prints one line of counts when the time is up; every task stops by then.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use ferry::auth::Token;
use ferry::manifest::{ChunkEntry, Chunking, FileTime, Manifest};
use ferry::transfer::handshake::client_hello;
use ferry::wire::{Connection, Message, Offer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

/// Longest run allowed.
const MAX_SECONDS: u64 = 600;

#[derive(Parser, Debug)]
struct Args {
    /// The server's address (plain TCP).
    server: SocketAddr,
    /// Idle connections that never send a byte, re-opened when the server closes them.
    #[arg(long, default_value_t = 0)]
    slots: usize,
    /// Idle connections per source address (127.0.0.2, 127.0.0.3, ...).
    #[arg(long, default_value_t = 8)]
    per_address: usize,
    /// Connections that announce a big frame, send half of it at once, then one byte a second.
    #[arg(long, default_value_t = 0)]
    trickle: usize,
    /// Body size of the trickled frames (at most the server's max_frame).
    #[arg(long, default_value_t = 20 * 1024 * 1024)]
    trickle_frame: u32,
    /// Connections that offer big manifests on ever-new paths and never send a chunk.
    #[arg(long, default_value_t = 0)]
    flood: usize,
    /// Chunks (4 KiB each) in every flooded manifest.
    #[arg(long, default_value_t = 100_000)]
    flood_chunks: u32,
    /// Total duration (at most 600).
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Token (ID:SECRET) for trickle and flood connections; none: anonymous.
    #[arg(long)]
    token_file: Option<PathBuf>,
}

/// What the attack did.
#[derive(Default, Debug)]
struct Counts {
    slots_opened: AtomicU64,
    slots_closed_by_server: AtomicU64,
    connect_failures: AtomicU64,
    trickle_started: AtomicU64,
    trickle_cut: AtomicU64,
    flood_offers: AtomicU64,
    flood_needs: AtomicU64,
    flood_refused: AtomicU64,
    handshake_failures: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let seconds = args.seconds.min(MAX_SECONDS);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let token = match &args.token_file {
        Some(path) => Some(std::fs::read_to_string(path)?.trim().parse::<Token>()?),
        None => None,
    };
    let counts = Arc::new(Counts::default());
    let mut tasks = Vec::new();
    for i in 0..args.slots {
        let source = 2 + i / args.per_address.max(1);
        let Ok(octet) = u8::try_from(source).map(|o| o.min(254)) else {
            break;
        };
        let from = IpAddr::V4(Ipv4Addr::new(127, 0, 0, octet));
        tasks.push(tokio::spawn(hold_slot(args.server, from, deadline, counts.clone())));
    }
    for _ in 0..args.trickle {
        let job = trickle(args.server, args.trickle_frame, token.clone(), deadline, counts.clone());
        tasks.push(tokio::spawn(job));
    }
    let manifest = Arc::new(flood_manifest(args.flood_chunks));
    for task in 0..args.flood {
        let job = flood(
            args.server,
            task,
            manifest.clone(),
            token.clone(),
            deadline,
            counts.clone(),
        );
        tasks.push(tokio::spawn(job));
    }
    let all = async {
        for task in tasks {
            let _ = task.await;
        }
    };
    // Every task checks the deadline; this bounds the rest (a connect or a write the server never answers).
    let _ = tokio::time::timeout_at(deadline + Duration::from_secs(5), all).await;
    println!("{counts:?}");
    Ok(())
}

/// A TCP connection from `from` (any loopback address on Linux).
async fn connect_from(from: IpAddr, server: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(server).await
}

/// Keeps one idle connection open from `from`, re-opening it whenever the server closes it.
async fn hold_slot(server: SocketAddr, from: IpAddr, deadline: Instant, counts: Arc<Counts>) {
    while Instant::now() < deadline {
        let Ok(Ok(mut stream)) = tokio::time::timeout_at(deadline, connect_from(from, server)).await else {
            bump(&counts.connect_failures);
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        bump(&counts.slots_opened);
        let mut sink = [0u8; 1024];
        loop {
            match tokio::time::timeout_at(deadline, stream.read(&mut sink)).await {
                Err(_) => return,
                Ok(Ok(n)) if n > 0 => continue,
                Ok(_) => break,
            }
        }
        bump(&counts.slots_closed_by_server);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Connects and completes the handshake (with `token` if given).
async fn greeted(server: SocketAddr, token: Option<&Token>, counts: &Counts) -> Option<Connection<TcpStream>> {
    let stream = TcpStream::connect(server).await.ok()?;
    let mut conn = Connection::new(stream, ferry::MAX_FRAME);
    match client_hello(&mut conn, Duration::from_secs(10), token, None).await {
        Ok(_) => Some(conn),
        Err(_) => {
            bump(&counts.handshake_failures);
            None
        }
    }
}

/// Announces a frame of `size` bytes, sends half of it, then one byte a second until the server cuts it.
async fn trickle(server: SocketAddr, size: u32, token: Option<Token>, deadline: Instant, counts: Arc<Counts>) {
    let half = vec![0u8; size as usize / 2];
    while Instant::now() < deadline {
        let Ok(Some(conn)) = tokio::time::timeout_at(deadline, greeted(server, token.as_ref(), &counts)).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut stream = conn.into_inner();
        bump(&counts.trickle_started);
        let started = async {
            stream.write_all(&size.to_be_bytes()).await?;
            stream.write_all(&half).await
        };
        let mut alive = matches!(tokio::time::timeout_at(deadline, started).await, Ok(Ok(())));
        while alive && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_secs(1)).await;
            alive = stream.write_all(&[0]).await.is_ok();
        }
        if !alive {
            bump(&counts.trickle_cut);
        }
    }
}

/// A valid manifest of `chunks` 4 KiB chunks whose bytes nobody holds.
fn flood_manifest(chunks: u32) -> Manifest {
    const CHUNK: u32 = 4096;
    let chunks: Vec<ChunkEntry> = (0..chunks)
        .map(|i| ChunkEntry {
            offset: u64::from(i) * u64::from(CHUNK),
            len: CHUNK,
            hash: *blake3::hash(&i.to_le_bytes()).as_bytes(),
        })
        .collect();
    Manifest {
        size: chunks.len() as u64 * u64::from(CHUNK),
        digest: [0xa5; 32],
        chunking: Chunking::Fixed { size: CHUNK },
        mtime: FileTime::default(),
        mode: 0o644,
        chunks,
    }
}

/// Offers `manifest` on a new path per connection, reads the answer, and goes away without sending a chunk.
async fn flood(
    server: SocketAddr,
    task: usize,
    manifest: Arc<Manifest>,
    token: Option<Token>,
    deadline: Instant,
    counts: Arc<Counts>,
) {
    let mut round = 0u64;
    while Instant::now() < deadline {
        round += 1;
        let Ok(Some(mut conn)) = tokio::time::timeout_at(deadline, greeted(server, token.as_ref(), &counts)).await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let offer = Message::Offer(Offer {
            path: format!("attack/flood-{task}-{round}.bin"),
            manifest: (*manifest).clone(),
        });
        let exchange = async {
            conn.write_message(&offer).await.ok()?;
            bump(&counts.flood_offers);
            conn.read_message().await.ok()?
        };
        match tokio::time::timeout_at(deadline, exchange).await {
            Ok(Some(Message::Need(_))) => bump(&counts.flood_needs),
            Ok(Some(Message::Error(_))) => bump(&counts.flood_refused),
            _ => {}
        }
    }
}
