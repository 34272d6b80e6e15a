//! `--bwlimit`: a bandwidth cap shared by every connection of one run.
//!
//! [`Bandwidth`] is a pair of token buckets (one per direction) kept as GCRA "theoretical arrival times": sending
//! `n` bytes pushes the bucket's time forward by `n / rate`, and a caller may go ahead while that time is less
//! than one burst ahead of now. [`Throttled`] wraps a byte stream: a write is cut to what the bucket allows (and
//! waits with a tokio timer when it allows nothing); a read waits while the bucket is in debt and is charged for
//! what it got. There are no busy loops and no per-byte work, and the average rate over any stretch longer than a
//! burst stays at or under the cap. Clones of a [`Bandwidth`] share its buckets, so `--streams N` connections
//! together stay under the cap.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Smallest burst, so a low rate still moves useful writes.
const MIN_BURST: u64 = 4 * 1024;
/// Largest burst: the cap holds over short stretches too.
const MAX_BURST: u64 = 256 * 1024;

/// One direction's token bucket, as a GCRA arrival time.
#[derive(Debug)]
struct Bucket {
    /// Bytes per second.
    rate: u64,
    /// How far ahead of now the arrival time may run before callers must wait (the burst, in time).
    burst: Duration,
    /// When the bytes granted so far would have finished at exactly `rate`.
    tat: Instant,
    /// The smallest grant worth a write (a quarter of the burst): a writer waits for this much rather than
    /// trickling out the few bytes that each microsecond earns. Without it a sender on a fast socket never waits
    /// on a timer, and so never yields to one (a `--max-duration` deadline went unnoticed for the whole upload).
    min_grant: u64,
}

impl Bucket {
    fn new(rate: u64, now: Instant) -> Bucket {
        let burst_bytes = (rate / 10).clamp(MIN_BURST, MAX_BURST);
        Bucket {
            rate,
            burst: Duration::from_secs_f64(burst_bytes as f64 / rate as f64),
            tat: now,
            min_grant: burst_bytes / 4,
        }
    }

    /// Bytes that may go now for a caller that wants `want` of them: at least `want` or a quarter of the burst
    /// (whichever is smaller), or how long to wait until that much may.
    fn allowance(&self, now: Instant, want: u64) -> Result<u64, Duration> {
        let tat = self.tat.max(now);
        let horizon = now + self.burst;
        if tat >= horizon {
            // Wake when one burst's worth is back (not one byte), so writes stay large.
            return Err(tat - horizon + self.burst / 2);
        }
        let bytes = ((horizon - tat).as_secs_f64() * self.rate as f64) as u64;
        let floor = want.min(self.min_grant).max(1);
        if bytes < floor {
            Err(self.cost(floor - bytes).max(Duration::from_micros(100)))
        } else {
            Ok(bytes)
        }
    }

    /// Records `bytes` as sent at `now`.
    fn charge(&mut self, bytes: u64, now: Instant) {
        self.tat = self.tat.max(now) + self.cost(bytes);
    }

    fn cost(&self, bytes: u64) -> Duration {
        Duration::from_secs_f64(bytes as f64 / self.rate as f64)
    }
}

/// A bandwidth cap in bytes per second, applied to each direction separately and shared by all clones.
#[derive(Clone, Debug)]
pub struct Bandwidth {
    rate: u64,
    up: Arc<Mutex<Bucket>>,
    down: Arc<Mutex<Bucket>>,
}

impl Bandwidth {
    /// A cap of `rate` bytes per second each way (a zero rate is taken as one byte per second).
    pub fn new(rate: u64) -> Bandwidth {
        let rate = rate.max(1);
        let now = Instant::now();
        Bandwidth {
            rate,
            up: Arc::new(Mutex::new(Bucket::new(rate, now))),
            down: Arc::new(Mutex::new(Bucket::new(rate, now))),
        }
    }

    /// The cap, in bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }
}

/// Which bucket an operation draws from.
#[derive(Clone, Copy)]
enum Direction {
    Up,
    Down,
}

/// A byte stream whose reads and writes are held to a [`Bandwidth`] (or passed straight through without one).
pub struct Throttled<S> {
    inner: S,
    limit: Option<Bandwidth>,
    read_wait: Option<Pin<Box<Sleep>>>,
    write_wait: Option<Pin<Box<Sleep>>>,
}

impl<S> Throttled<S> {
    /// Wraps `inner`; `None` means unlimited.
    pub fn new(inner: S, limit: Option<Bandwidth>) -> Throttled<S> {
        Throttled {
            inner,
            limit,
            read_wait: None,
            write_wait: None,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Whether a rate limit holds the stream (every byte must then pass through it).
    pub fn limited(&self) -> bool {
        self.limit.is_some()
    }
}

/// Waits (registering the waker) until the bucket allows a useful share of `want` bytes (see
/// [`Bucket::allowance`]); returns how many may go, or `None` when unlimited.
fn poll_allowance(
    limit: &Option<Bandwidth>,
    direction: Direction,
    want: usize,
    wait: &mut Option<Pin<Box<Sleep>>>,
    cx: &mut Context<'_>,
) -> Poll<Option<u64>> {
    let Some(limit) = limit else {
        return Poll::Ready(None);
    };
    let bucket = match direction {
        Direction::Up => &limit.up,
        Direction::Down => &limit.down,
    };
    loop {
        if let Some(sleep) = wait {
            ready!(sleep.as_mut().poll(cx));
            *wait = None;
        }
        let now = Instant::now();
        match bucket.lock().expect("bucket lock").allowance(now, want as u64) {
            Ok(bytes) => return Poll::Ready(Some(bytes)),
            Err(delay) => *wait = Some(Box::pin(tokio::time::sleep_until(now + delay))),
        }
    }
}

fn charge(limit: &Option<Bandwidth>, direction: Direction, bytes: usize) {
    if let Some(limit) = limit {
        let bucket = match direction {
            Direction::Up => &limit.up,
            Direction::Down => &limit.down,
        };
        bucket.lock().expect("bucket lock").charge(bytes as u64, Instant::now());
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Throttled<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // A read waits only while the bucket is in debt (what arrives is not the reader's to size).
        ready!(poll_allowance(&this.limit, Direction::Down, 1, &mut this.read_wait, cx));
        // A read takes what the socket has and is charged afterwards: the bucket goes into debt and the next read
        // waits it off, so the average holds without splitting the caller's buffer.
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        charge(&this.limit, Direction::Down, buf.filled().len() - before);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Throttled<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let allowed = ready!(poll_allowance(
            &this.limit,
            Direction::Up,
            buf.len(),
            &mut this.write_wait,
            cx
        ));
        let len = allowed.map_or(buf.len(), |bytes| buf.len().min(bytes as usize));
        let written = ready!(Pin::new(&mut this.inner).poll_write(cx, &buf[..len]))?;
        charge(&this.limit, Direction::Up, written);
        Poll::Ready(Ok(written))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const MIB: u64 = 1024 * 1024;

    /// Drains `reader` on its own task; returns the byte count at the end.
    fn drain(mut reader: tokio::io::DuplexStream) -> tokio::task::JoinHandle<u64> {
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0;
            loop {
                match reader.read(&mut buf).await.unwrap() {
                    0 => return total,
                    n => total += n as u64,
                }
            }
        })
    }

    #[tokio::test(start_paused = true)]
    async fn writes_are_held_to_the_rate() {
        let (a, b) = tokio::io::duplex(1024 * 1024);
        let reader = drain(b);
        let mut throttled = Throttled::new(a, Some(Bandwidth::new(MIB)));
        let started = Instant::now();
        throttled.write_all(&vec![1u8; 3 * MIB as usize]).await.unwrap();
        let elapsed = started.elapsed();
        // 3 MiB at 1 MiB/s, less the initial burst (a tenth of the rate).
        assert!(elapsed >= Duration::from_millis(2850), "{elapsed:?}");
        assert!(elapsed <= Duration::from_millis(3000), "{elapsed:?}");
        throttled.shutdown().await.unwrap();
        drop(throttled);
        assert_eq!(reader.await.unwrap(), 3 * MIB);
    }

    #[tokio::test(start_paused = true)]
    async fn reads_are_held_to_the_rate() {
        let (mut a, b) = tokio::io::duplex(256 * 1024);
        let writer = tokio::spawn(async move {
            a.write_all(&vec![2u8; 2 * MIB as usize]).await.unwrap();
        });
        let mut throttled = Throttled::new(b, Some(Bandwidth::new(512 * 1024)));
        let started = Instant::now();
        let mut got = Vec::new();
        throttled.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got.len() as u64, 2 * MIB);
        // 2 MiB at 512 KiB/s is 4 s; a read may overdraw by one buffer, which the next read waits off.
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(3400), "{elapsed:?}");
        assert!(elapsed <= Duration::from_millis(4100), "{elapsed:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn clones_share_one_cap() {
        let limit = Bandwidth::new(MIB);
        let started = Instant::now();
        let mut writers = Vec::new();
        let mut readers = Vec::new();
        for _ in 0..4 {
            let (a, b) = tokio::io::duplex(1024 * 1024);
            readers.push(drain(b));
            let mut throttled = Throttled::new(a, Some(limit.clone()));
            writers.push(tokio::spawn(async move {
                throttled.write_all(&vec![3u8; MIB as usize]).await.unwrap();
            }));
        }
        for writer in writers {
            writer.await.unwrap();
        }
        // Four streams of 1 MiB under one 1 MiB/s cap: about 4 s, not 1 s.
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(3800), "{elapsed:?}");
        assert!(elapsed <= Duration::from_millis(4100), "{elapsed:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_limit_nothing_waits() {
        let (a, b) = tokio::io::duplex(1024 * 1024);
        let reader = drain(b);
        let mut throttled = Throttled::new(a, None);
        let started = Instant::now();
        throttled.write_all(&vec![4u8; 4 * MIB as usize]).await.unwrap();
        assert_eq!(started.elapsed(), Duration::ZERO);
        drop(throttled);
        assert_eq!(reader.await.unwrap(), 4 * MIB);
    }

    #[test]
    fn the_burst_is_a_tenth_of_a_second_within_bounds() {
        let now = Instant::now();
        let burst = |rate: u64| Bucket::new(rate, now).allowance(now, u64::MAX).unwrap();
        // Float rounding may lose the last byte.
        assert!(burst(2 * MIB).abs_diff(2 * MIB / 10) <= 1);
        assert!(burst(1024).abs_diff(MIN_BURST) <= 1);
        assert!(burst(1024 * MIB).abs_diff(MAX_BURST) <= 1);
    }

    /// A writer that spent the burst is not handed the handful of bytes each microsecond earns: it waits for a
    /// quarter of the burst (or all it wants, if less), so it waits on a timer and lets other futures (the run's
    /// deadline) be polled. The old bucket granted 5-byte writes in a busy loop.
    #[test]
    fn a_spent_bucket_grants_no_trickle() {
        let now = Instant::now();
        let mut bucket = Bucket::new(5 * MIB, now);
        let burst = bucket.allowance(now, u64::MAX).unwrap();
        bucket.charge(burst, now);
        let soon = now + Duration::from_micros(10);
        let wait = bucket.allowance(soon, u64::MAX).unwrap_err();
        assert!(wait >= Duration::from_millis(5), "{wait:?}");
        // A small write (a frame header) needs only its own bytes.
        assert!(bucket.allowance(soon, 5).is_ok());
        // After the wait, a quarter of the burst may go at once.
        let granted = bucket
            .allowance(soon + wait + Duration::from_millis(1), u64::MAX)
            .unwrap();
        assert!(granted >= burst / 4 - 1, "{granted} of {burst}");
    }
}
