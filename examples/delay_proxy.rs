//! A loopback TCP proxy that holds every byte for a fixed time in each direction (a link with latency), for
//! `bench/compare.sh`'s latency runs. It is ferry's own fault proxy (`ferry::fault`) with only the delay.
//!
//! Usage: `cargo run --release --example delay_proxy -- UPSTREAM ONE_WAY_MS` (e.g. `127.0.0.1:7878 20` for a
//! 40 ms round trip). Prints `listening on ADDR` once ready and runs until killed.

use std::net::SocketAddr;
use std::time::Duration;

use ferry::fault::{FaultProxy, Faults};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: delay_proxy UPSTREAM ONE_WAY_MS";
    let upstream: SocketAddr = args.next().ok_or(usage)?.parse()?;
    let one_way = Duration::from_millis(args.next().ok_or(usage)?.parse()?);
    // Every connection (up to many thousands) gets the same delay.
    let plan = vec![Faults::latency(one_way); 100_000];
    let proxy = FaultProxy::start("127.0.0.1:0", upstream, plan).await?;
    println!("listening on {}", proxy.addr());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
