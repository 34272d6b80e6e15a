//! The offer flood of issue 12 item 1, for measuring a server's memory under it: `COUNT` Offers of
//! `CHUNKS`-chunk manifests of `LEN`-byte chunks on distinct paths, over the raw protocol, one connection each,
//! never a byte of data. Admitted offers keep their connection open until the end (so their sessions hold what
//! they hold); refused ones are counted by error code. Then one `ListPartials` is timed.
//!
//! Usage: `cargo run --example offer_flood -- ADDR COUNT CHUNKS LEN` (e.g. `127.0.0.1:7878 60 500000 1`, the
//! issue's flood in 1-byte chunks, or `... 60 500000 4096` for manifests the chunk minimum accepts). Read the
//! server's memory from `/proc/PID/status` (`VmRSS`, `VmHWM`) before and after.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ferry::manifest::{ChunkEntry, Chunking, FileTime, Manifest};
use ferry::wire::{Connection, Hello, Message, Offer, MAGIC};
use tokio::net::TcpStream;

async fn connect(addr: SocketAddr) -> Result<Connection<TcpStream>, Box<dyn std::error::Error>> {
    let mut conn = Connection::new(TcpStream::connect(addr).await?, ferry::MAX_FRAME);
    conn.write_message(&Message::Hello(Hello {
        magic: MAGIC,
        min_version: ferry::MIN_PROTOCOL_VERSION,
        max_version: ferry::PROTOCOL_VERSION,
        agent: "offer-flood".into(),
        client: String::new(),
    }))
    .await?;
    match conn.read_message().await? {
        Some(Message::Welcome(_)) => Ok(conn),
        other => Err(format!("no Welcome: {other:?}").into()),
    }
}

fn manifest(chunks: u32, len: u32, seed: u32) -> Manifest {
    let entries = (0..chunks)
        .map(|i| ChunkEntry {
            offset: u64::from(i) * u64::from(len),
            len,
            hash: {
                let mut hash = [seed as u8; 32];
                hash[..4].copy_from_slice(&i.to_le_bytes());
                hash
            },
        })
        .collect();
    Manifest {
        size: u64::from(chunks) * u64::from(len),
        digest: [seed as u8; 32],
        chunking: Chunking::Fixed { size: 4096 },
        mtime: FileTime::default(),
        mode: 0o644,
        chunks: entries,
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: offer_flood ADDR COUNT CHUNKS LEN";
    let addr: SocketAddr = args.next().ok_or(usage)?.parse()?;
    let count: u32 = args.next().ok_or(usage)?.parse()?;
    let chunks: u32 = args.next().ok_or(usage)?.parse()?;
    let len: u32 = args.next().ok_or(usage)?.parse()?;
    let started = Instant::now();
    let mut held = Vec::new();
    let mut answers: BTreeMap<String, u32> = BTreeMap::new();
    for i in 0..count {
        let mut conn = connect(addr).await?;
        let offer = Message::Offer(Offer {
            path: format!("flood/p{i}"),
            manifest: manifest(chunks, len, i),
        });
        conn.write_message(&offer).await?;
        // A receiver reusing chunks pings while it works; answer until the Need (or an Error) comes.
        let answer = loop {
            match tokio::time::timeout(Duration::from_secs(120), conn.read_message()).await?? {
                Some(Message::Ping(nonce)) => conn.write_message(&Message::Pong(nonce)).await?,
                other => break other,
            }
        };
        let name = match answer {
            Some(Message::Need(_)) => {
                held.push(conn);
                "admitted".to_string()
            }
            Some(Message::Error(frame)) => format!("{:?}", frame.code),
            other => format!("{other:?}"),
        };
        *answers.entry(name).or_default() += 1;
    }
    println!("{count} offers in {:.1?}: {answers:?}", started.elapsed());
    let mut conn = connect(addr).await?;
    let listed = Instant::now();
    conn.write_message(&Message::ListPartials).await?;
    match conn.read_message().await? {
        Some(Message::Partials(p)) => println!("ListPartials: {} open, in {:.1?}", p.total, listed.elapsed()),
        other => println!("ListPartials answered {other:?}"),
    }
    println!("holding {} admitted connections for 5 s", held.len());
    tokio::time::sleep(Duration::from_secs(5)).await;
    Ok(())
}
