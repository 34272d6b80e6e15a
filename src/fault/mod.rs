//! A fault-injecting TCP proxy, shared by `ferry demo` and the tests.
//!
//! Connection number `i` (in accept order) gets `plan[i]`; connections past the end of the plan pass through
//! untouched. Faults apply to one direction (client → server unless [`Faults::downstream`] says server → client,
//! as a pull's data flows), counted in bytes from the start of that connection: cut the connection after N bytes,
//! flip one byte at an offset, or stall (stop forwarding both ways, keeping the sockets open) after N bytes. A
//! [`FrameFlip`] follows the framing instead (proto-spec.md §1) and flips a byte of the Nth frame of one message
//! kind: its length prefix, its tag, or a field of its body (a Chunk's index, a Need's or an Ack's ranges).
//! Everything listens and connects on the addresses it is given; tests use loopback.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

mod frames;

use frames::FrameFlipper;

/// Faults for one connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// Close both sides after forwarding this many client → server bytes.
    pub cut_after: Option<u64>,
    /// XOR the client → server byte at this offset with `0x01`.
    pub flip_at: Option<u64>,
    /// Stop forwarding (both ways) after this many client → server bytes, keeping the connection open.
    pub stall_after: Option<u64>,
    /// Count and apply the faults on the server → client direction instead.
    pub downstream: bool,
    /// Hold every byte this long in each direction (a link with latency); replaces the other faults.
    pub delay: Option<std::time::Duration>,
    /// Flip a byte of one frame, found by its message tag (plain TCP only; not combined with a cut or a stall).
    pub frame_flip: Option<FrameFlip>,
}

/// Where in a frame a [`FrameFlip`] lands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FramePart {
    /// The low byte of the big-endian length prefix: the body seems a little longer or shorter.
    LengthPrefix,
    /// The low byte of the message tag.
    Tag,
    /// The body byte this many bytes after the tag (a Chunk's index is at 0; a Need's or an Ack's first range
    /// starts at 8, after the u64 count: its `start` at 8, its `count` at 12).
    Field(u32),
}

/// Flip bits of one frame: the `nth` (0-based) frame whose tag is `tag`, in the faulted direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameFlip {
    /// The message tag (proto-spec.md §2: 3 Need, 4 Chunk, 5 Ack, ...).
    pub tag: u32,
    /// Which frame of that tag, counted from the connection's start.
    pub nth: u32,
    /// Where in it.
    pub part: FramePart,
    /// The bits flipped (XOR mask).
    pub xor: u8,
}

impl Faults {
    /// No faults.
    pub const NONE: Faults = Faults {
        cut_after: None,
        flip_at: None,
        stall_after: None,
        downstream: false,
        delay: None,
        frame_flip: None,
    };

    /// Cut after `bytes`.
    pub fn cut(bytes: u64) -> Faults {
        Faults {
            cut_after: Some(bytes),
            ..Faults::NONE
        }
    }

    /// Flip the byte at `offset`.
    pub fn flip(offset: u64) -> Faults {
        Faults {
            flip_at: Some(offset),
            ..Faults::NONE
        }
    }

    /// Stall after `bytes`.
    pub fn stall(bytes: u64) -> Faults {
        Faults {
            stall_after: Some(bytes),
            ..Faults::NONE
        }
    }

    /// Flip `xor` into `part` of the `nth` frame tagged `tag`.
    pub fn flip_frame(tag: u32, nth: u32, part: FramePart, xor: u8) -> Faults {
        Faults {
            frame_flip: Some(FrameFlip { tag, nth, part, xor }),
            ..Faults::NONE
        }
    }

    /// A clean link that delays every byte by `one_way` in each direction (round trip `2 × one_way`).
    pub fn latency(one_way: std::time::Duration) -> Faults {
        Faults {
            delay: Some(one_way),
            ..Faults::NONE
        }
    }

    /// The same faults on the server → client direction.
    pub fn downstream(self) -> Faults {
        Faults {
            downstream: true,
            ..self
        }
    }
}

/// What the proxy did so far.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Bytes forwarded in the faulted direction (client → server unless downstream).
    pub bytes_up: AtomicU64,
    /// Connections cut.
    pub cuts: AtomicU64,
    /// Bytes flipped.
    pub flips: AtomicU64,
}

/// A running proxy; stops when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    stats: Arc<ProxyStats>,
    stalls: watch::Receiver<u64>,
    stop: CancellationToken,
}

impl FaultProxy {
    /// Listens on `listen` (e.g. `127.0.0.1:0`) and forwards to `upstream` with `plan`.
    pub async fn start(listen: &str, upstream: SocketAddr, plan: Vec<Faults>) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(ProxyStats::default());
        let (stall_tx, stalls) = watch::channel(0u64);
        let stop = CancellationToken::new();
        let stall_tx = Arc::new(stall_tx);
        let (task_stats, task_stop) = (stats.clone(), stop.clone());
        tokio::spawn(async move {
            for number in 0.. {
                let accepted = tokio::select! {
                    _ = task_stop.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((inbound, _)) = accepted else { continue };
                task_stats.connections.fetch_add(1, Ordering::Relaxed);
                let faults = plan.get(number).copied().unwrap_or_default();
                let link = Link {
                    stats: task_stats.clone(),
                    stalls: stall_tx.clone(),
                    stop: task_stop.child_token(),
                    faults,
                };
                tokio::spawn(link.run(inbound, upstream));
            }
        });
        Ok(FaultProxy {
            addr,
            stats,
            stalls,
            stop,
        })
    }

    /// The address clients should connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Counters.
    pub fn stats(&self) -> &ProxyStats {
        &self.stats
    }

    /// Resolves once `count` connections in total have reached their stall point.
    pub async fn stalled(&self, count: u64) {
        let mut stalls = self.stalls.clone();
        let _ = stalls.wait_for(|n| *n >= count).await;
    }

    /// Stops accepting and closes every connection.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Link {
    stats: Arc<ProxyStats>,
    stalls: Arc<watch::Sender<u64>>,
    stop: CancellationToken,
    faults: Faults,
}

impl Link {
    async fn run(self, inbound: TcpStream, upstream: SocketAddr) {
        let Ok(outbound) = TcpStream::connect(upstream).await else {
            return;
        };
        let _ = (inbound.set_nodelay(true), outbound.set_nodelay(true));
        let (client_read, client_write) = inbound.into_split();
        let (server_read, server_write) = outbound.into_split();
        if let Some(delay) = self.faults.delay {
            let down = tokio::spawn(pump_delayed(server_read, client_write, delay, self.stop.clone()));
            pump_delayed(client_read, server_write, delay, self.stop.clone()).await;
            self.stop.cancel();
            let _ = down.await;
            return;
        }
        let (mut faulted_from, mut faulted_to, clean_from, clean_to) = if self.faults.downstream {
            (server_read, client_write, client_read, server_write)
        } else {
            (client_read, server_write, server_read, client_write)
        };
        let stalled = CancellationToken::new();
        let down = tokio::spawn(pump_down(clean_from, clean_to, self.stop.clone(), stalled.clone()));
        self.pump_up(&mut faulted_from, &mut faulted_to, &stalled).await;
        if stalled.is_cancelled() {
            self.stop.cancelled().await; // hold both sockets open, silent, until the proxy stops
        }
        self.stop.cancel();
        let _ = down.await;
    }

    /// The faulted direction, applying the faults. Returns when the sender closes, a cut happens, or at a stall.
    async fn pump_up(
        &self,
        from: &mut tokio::net::tcp::OwnedReadHalf,
        to: &mut tokio::net::tcp::OwnedWriteHalf,
        stalled: &CancellationToken,
    ) {
        let limit = [self.faults.cut_after, self.faults.stall_after]
            .into_iter()
            .flatten()
            .min();
        let mut buf = vec![0u8; 64 * 1024];
        let mut forwarded = 0u64;
        let mut frames = self.faults.frame_flip.map(FrameFlipper::new);
        loop {
            if limit == Some(forwarded) {
                if self.faults.stall_after == Some(forwarded) {
                    stalled.cancel();
                    self.stalls.send_modify(|n| *n += 1);
                } else {
                    self.stats.cuts.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
            let want = limit.map_or(buf.len() as u64, |l| (l - forwarded).min(buf.len() as u64)) as usize;
            let n = tokio::select! {
                _ = self.stop.cancelled() => return,
                n = from.read(&mut buf[..want]) => match n { Ok(0) | Err(_) => return, Ok(n) => n },
            };
            if let Some(at) = self.faults.flip_at {
                if (forwarded..forwarded + n as u64).contains(&at) {
                    buf[(at - forwarded) as usize] ^= 0x01;
                    self.stats.flips.fetch_add(1, Ordering::Relaxed);
                }
            }
            let out = match &mut frames {
                Some(flipper) => {
                    let out = flipper.pass(&buf[..n]);
                    if flipper.take_flipped() {
                        self.stats.flips.fetch_add(1, Ordering::Relaxed);
                    }
                    out
                }
                None => buf[..n].to_vec(),
            };
            if to.write_all(&out).await.is_err() {
                return;
            }
            forwarded += out.len() as u64;
            self.stats.bytes_up.fetch_add(out.len() as u64, Ordering::Relaxed);
        }
    }
}

/// The other direction, untouched, until the link stops or stalls.
async fn pump_down(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    stop: CancellationToken,
    stalled: CancellationToken,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            _ = stop.cancelled() => return,
            _ = stalled.cancelled() => {
                stop.cancelled().await; // keep `from` and `to` open while stalled
                return;
            }
            n = from.read(&mut buf) => match n { Ok(0) | Err(_) => return, Ok(n) => n },
        };
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Reads a delaying link holds at once in each direction, each of up to 64 KiB (so up to 64 MiB): the link's
/// buffer. With 256 (16 MiB at most, less with the shorter reads loopback gives) it capped a 20 ms one-way link
/// near 600 MB/s (1 GiB through it with socat: 593-608 MB/s, against 673-748 MB/s with 4,096), about what ferry
/// and rsync reach over it: the delay was also a bandwidth cap.
const DELAYED_READS: usize = 1024;

/// Bytes a delaying link reads at once.
const DELAYED_READ: usize = 64 * 1024;

/// Forwards bytes, each held for `delay` after it arrived (reading goes on meanwhile, up to [`DELAYED_READS`]
/// reads held, so the delay is latency, not a bandwidth cap), until either side closes or the link stops.
///
/// The link stands for a network, which costs the hosts at each end nothing, but here it shares their cores: so
/// it keeps its cost per byte low. Read buffers go back to the reader once written (a fresh one per read had
/// every page fault in), and the reads that are due are written together.
async fn pump_delayed(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: std::time::Duration,
    stop: CancellationToken,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(tokio::time::Instant, Vec<u8>, usize)>(DELAYED_READS);
    let (spare_tx, mut spare_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let reader_stop = stop.clone();
    let reader = tokio::spawn(async move {
        loop {
            let mut buf = spare_rx.try_recv().unwrap_or_else(|_| vec![0; DELAYED_READ]);
            let n = tokio::select! {
                _ = reader_stop.cancelled() => return,
                n = from.read(&mut buf) => match n { Ok(0) | Err(_) => return, Ok(n) => n },
            };
            if tx.send((tokio::time::Instant::now() + delay, buf, n)).await.is_err() {
                return;
            }
        }
    });
    let mut due_now = Vec::new();
    let mut next = None;
    loop {
        let head = match next.take() {
            Some(head) => Some(head),
            None => tokio::select! {
                _ = stop.cancelled() => break,
                head = rx.recv() => head,
            },
        };
        let Some((due, bytes, len)) = head else { break };
        tokio::time::sleep_until(due).await;
        due_now.push((bytes, len));
        let now = tokio::time::Instant::now();
        while due_now.len() < 64 {
            match rx.try_recv() {
                Ok((due, bytes, len)) if due <= now => due_now.push((bytes, len)),
                Ok(later) => {
                    next = Some(later);
                    break;
                }
                Err(_) => break,
            }
        }
        if write_all_vectored(&mut to, &due_now).await.is_err() {
            break;
        }
        for (buf, _) in due_now.drain(..) {
            let _ = spare_tx.send(buf);
        }
    }
    reader.abort();
}

/// Writes the first `len` bytes of every buffer of `bufs`, in order, in as few calls as the socket takes.
async fn write_all_vectored(
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    bufs: &[(Vec<u8>, usize)],
) -> std::io::Result<()> {
    let (mut buf, mut at) = (0, 0);
    while buf < bufs.len() {
        let slices: Vec<std::io::IoSlice> = std::iter::once(&bufs[buf].0[at..bufs[buf].1])
            .chain(bufs[buf + 1..].iter().map(|(b, len)| &b[..*len]))
            .map(std::io::IoSlice::new)
            .collect();
        let mut written = to.write_vectored(&slices).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while buf < bufs.len() && written >= bufs[buf].1 - at {
            written -= bufs[buf].1 - at;
            (buf, at) = (buf + 1, 0);
        }
        at += written;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// An upstream that records everything it receives; returns its address and the bytes so far.
    async fn recording_upstream() -> (SocketAddr, Arc<std::sync::Mutex<Vec<u8>>>) {
        recording_upstream_after(Duration::ZERO).await
    }

    /// Like [`recording_upstream`], reading nothing for `pause` after it accepts (its socket's buffers fill up).
    async fn recording_upstream_after(pause: Duration) -> (SocketAddr, Arc<std::sync::Mutex<Vec<u8>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = seen.clone();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::time::sleep(pause).await;
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stream.read(&mut buf).await {
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        (addr, seen)
    }

    async fn wait_for_len(seen: &std::sync::Mutex<Vec<u8>>, len: usize) {
        for _ in 0..500 {
            if seen.lock().unwrap().len() >= len {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_stall_forwards_exactly_n_bytes_and_keeps_the_client_connected() {
        let (upstream, seen) = recording_upstream().await;
        let proxy = FaultProxy::start("127.0.0.1:0", upstream, vec![Faults::stall(1000)])
            .await
            .unwrap();
        let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
        client.write_all(&[1u8; 5000]).await.unwrap();
        proxy.stalled(1).await;
        wait_for_len(&seen, 1000).await;
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_millis(300), client.read(&mut buf)).await;
        assert!(read.is_err(), "a stalled link is silent, not closed: {read:?}");
        assert_eq!(seen.lock().unwrap().len(), 1000);
        assert_eq!(proxy.stats().cuts.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_cut_forwards_exactly_n_bytes_and_closes_the_client() {
        let (upstream, seen) = recording_upstream().await;
        let proxy = FaultProxy::start("127.0.0.1:0", upstream, vec![Faults::cut(1000)])
            .await
            .unwrap();
        let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
        let _ = client.write_all(&[1u8; 5000]).await;
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .unwrap();
        assert!(matches!(read, Ok(0) | Err(_)), "the client sees the connection end");
        wait_for_len(&seen, 1000).await;
        assert_eq!(seen.lock().unwrap().len(), 1000);
        assert_eq!(proxy.stats().cuts.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn latency_holds_every_byte_in_each_direction() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = echo.accept().await.unwrap();
            let mut buf = [0u8; 16];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        });
        let one_way = Duration::from_millis(150);
        let proxy = FaultProxy::start("127.0.0.1:0", upstream, vec![Faults::latency(one_way)])
            .await
            .unwrap();
        let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
        let started = std::time::Instant::now();
        client.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"ping");
        assert!(
            started.elapsed() >= 2 * one_way,
            "a round trip took {:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_delaying_link_delivers_a_long_stream_whole_and_in_order() {
        // Many reads held at once, written several to a call (partly, while the upstream reads nothing), their
        // buffers used again: no byte lost or moved.
        let (upstream, seen) = recording_upstream_after(Duration::from_millis(300)).await;
        let proxy = FaultProxy::start("127.0.0.1:0", upstream, vec![Faults::latency(Duration::from_millis(5))])
            .await
            .unwrap();
        let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
        let sent: Vec<u8> = (0..32_000_000u32).map(|i| (i % 251) as u8).collect();
        for piece in sent.chunks(7_919) {
            client.write_all(piece).await.unwrap();
        }
        wait_for_len(&seen, sent.len()).await;
        assert!(
            *seen.lock().unwrap() == sent,
            "the bytes that arrived differ from those sent"
        );
    }

    #[tokio::test]
    async fn a_flip_changes_exactly_one_byte() {
        let (upstream, seen) = recording_upstream().await;
        let proxy = FaultProxy::start("127.0.0.1:0", upstream, vec![Faults::flip(70_000)])
            .await
            .unwrap();
        let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
        client.write_all(&vec![0u8; 100_000]).await.unwrap();
        wait_for_len(&seen, 100_000).await;
        let seen = seen.lock().unwrap();
        let changed: Vec<usize> = seen
            .iter()
            .enumerate()
            .filter(|(_, &b)| b != 0)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(changed, vec![70_000]);
        assert_eq!(seen[70_000], 0x01);
    }
}
