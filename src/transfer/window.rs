//! The sender's byte window (proto-spec.md §6, "Flow control"): how many chunk bytes may be sent and not yet
//! acknowledged. A window the user set stays as set. The default one starts at [`crate::DEFAULT_WINDOW`], or at
//! what the handshake's round trip asks for if that is more ([`START_RATE`] × round trip, within the cap), and grows
//! to twice the measured bandwidth-delay product, up to [`AUTO_WINDOW_CAP`], so that one stream on a long round
//! trip is not window-bound (16 MiB per 40 ms round trip is 400 MiB/s at best, and an Ack also waits for the
//! receiver's sync).
//!
//! The product is measured, not assumed: the delay is the shortest time seen from a chunk being written to the
//! socket to its Ack (a round trip plus the receiver's write and sync, without queueing), the bandwidth the best
//! rate at which Acks arrived over one such delay. While the window is the limit, each round's rate is about
//! window ÷ delay, so the target (2 × rate × shortest delay) doubles the window per round until the link or the
//! receiver is the limit; then queueing stretches the delay the rate is measured over, the rate stops growing, and
//! so does the window. A round in which the window was the limit grows it even without a new best rate, as long as
//! its delay shows no queueing (under [`QUEUEING`] × the shortest). It never shrinks within a transfer: a larger
//! window than needed costs nothing on this side (no data is kept for chunks in flight) and the receiver bounds its
//! own memory by reading the socket only as its budget allows.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The most the window grows to by itself: in flight, these bytes sit in socket buffers and the receiver's queue
/// (both bounded by their owners), and are what a dropped connection may cost in re-sends.
pub const AUTO_WINDOW_CAP: u64 = 256 * 1024 * 1024;

/// The rate a window started from the handshake's round trip covers: about a 10 Gb/s link. A 40 ms round trip
/// starts at 40 MiB instead of growing there over several rounds of Acks; loopback (well under 16 ms) keeps
/// [`crate::DEFAULT_WINDOW`].
pub const START_RATE: u64 = 1024 * 1024 * 1024;

/// Where a window that may size itself starts: `bytes`, or [`START_RATE`] × `round_trip` (the handshake's, if
/// measured) within [`AUTO_WINDOW_CAP`] if that is more. A pulling client asks for this much (proto-spec.md §11).
pub fn starting_bytes(bytes: u64, round_trip: Option<Duration>) -> u64 {
    let from_round_trip = round_trip.map_or(0, |rtt| {
        (START_RATE as f64 * rtt.as_secs_f64()).min(AUTO_WINDOW_CAP as f64) as u64
    });
    bytes.max(from_round_trip)
}

/// A round's delay above this many times the shortest one means the bytes queue somewhere (the link or the
/// receiver is the limit): the window then grows only with a new best rate.
const QUEUEING: f64 = 1.5;

/// Chunks whose send time is remembered at most (the shortest-delay sample needs only some of them).
const TRACKED: usize = 1 << 16;

/// The window of one sender, fixed or sized from what it measures.
#[derive(Debug)]
pub(crate) struct Window {
    /// The window now.
    bytes: u64,
    /// Measuring and growing (the user did not set a window).
    auto: bool,
    /// When each chunk in flight went out, by index.
    sent_at: HashMap<u32, Instant>,
    /// The shortest send-to-Ack delay seen.
    min_delay: Option<Duration>,
    /// The current rate sample: when it started and the bytes acknowledged since.
    sample: Option<(Instant, u64)>,
    /// The best rate seen, in bytes per second.
    best_rate: f64,
    /// The window stopped a send since the current rate sample started.
    limited: bool,
    /// The latest send-to-Ack delay.
    last_delay: Option<Duration>,
}

impl Window {
    /// A window of `bytes` that stays as it is.
    pub(crate) fn fixed(bytes: u64) -> Self {
        Window {
            bytes,
            auto: false,
            sent_at: HashMap::new(),
            min_delay: None,
            sample: None,
            best_rate: 0.0,
            limited: false,
            last_delay: None,
        }
    }

    /// A window starting at `bytes`, or at [`START_RATE`] × `round_trip` (the handshake's, if measured) within
    /// [`AUTO_WINDOW_CAP`] if that is more, that grows to twice the measured bandwidth-delay product, up to
    /// [`AUTO_WINDOW_CAP`] (or `bytes`, if that is larger).
    pub(crate) fn sized(bytes: u64, round_trip: Option<Duration>) -> Self {
        Window {
            auto: true,
            ..Window::fixed(starting_bytes(bytes, round_trip))
        }
    }

    /// The handshake's round trip, measured after the window was made (a Welcome read behind a pipelined request,
    /// proto-spec.md §3): a window that sizes itself starts from it as [`Window::sized`] would have.
    pub(crate) fn handshake_round_trip(&mut self, round_trip: Duration) {
        if self.auto {
            self.bytes = starting_bytes(self.bytes, Some(round_trip));
        }
    }

    /// The window just kept a chunk from going out: it is the limit.
    pub(crate) fn blocked(&mut self) {
        self.limited = true;
    }

    /// The bytes that may be in flight now.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Chunk `index` went out at `now`.
    pub(crate) fn sent(&mut self, index: u32, now: Instant) {
        if self.auto && self.sent_at.len() < TRACKED {
            self.sent_at.insert(index, now);
        }
    }

    /// Chunk `index` left the window without an Ack (rejected, to be sent again): no delay sample.
    pub(crate) fn forget(&mut self, index: u32) {
        self.sent_at.remove(&index);
    }

    /// Chunk `index` of `len` bytes was acknowledged at `now`.
    pub(crate) fn acked(&mut self, index: u32, len: u64, now: Instant) {
        if !self.auto {
            return;
        }
        if let Some(sent) = self.sent_at.remove(&index) {
            let delay = now.saturating_duration_since(sent);
            self.last_delay = Some(delay);
            if self.min_delay.is_none_or(|d| delay < d) {
                self.min_delay = Some(delay);
            }
        }
        let Some(min_delay) = self.min_delay else {
            return;
        };
        let (start, bytes) = self.sample.get_or_insert((now, 0));
        *bytes += len;
        let elapsed = now.saturating_duration_since(*start);
        // A rate over less than one delay would count a burst of Acks as bandwidth.
        if elapsed < min_delay || elapsed.is_zero() {
            return;
        }
        let rate = *bytes as f64 / elapsed.as_secs_f64();
        self.sample = Some((now, 0));
        let limited = std::mem::take(&mut self.limited);
        let unqueued = self
            .last_delay
            .is_some_and(|d| d.as_secs_f64() < QUEUEING * min_delay.as_secs_f64());
        if limited && unqueued {
            // The window held the sender back and nothing queued: this round's rate is what the window allowed,
            // not what the path can carry, so the product it gives is no bound. Double, as TCP's slow start does.
            self.best_rate = self.best_rate.max(rate);
            self.grow(2.0 * self.bytes as f64, "twice itself: the window was the limit");
        } else if rate > self.best_rate {
            self.best_rate = rate;
            self.grow(
                2.0 * rate * min_delay.as_secs_f64(),
                "twice the bandwidth-delay product",
            );
        }
    }

    /// Sets the window to `target` bytes if that is larger, within the cap.
    fn grow(&mut self, target: f64, why: &'static str) {
        let target = target.min(AUTO_WINDOW_CAP as f64) as u64;
        if target > self.bytes {
            tracing::debug!(
                window = target,
                rate = self.best_rate as u64,
                delay_us = self.min_delay.map_or(0, |d| d.as_micros() as u64),
                "window grows to {why}"
            );
            self.bytes = target;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    /// A sender on a simulated link of `rate` bytes/s and `delay` from send to Ack, sending `chunk`-byte chunks as
    /// the window allows for `duration`; returns the window at the end and the bytes acknowledged.
    fn simulate(mut window: Window, rate: f64, delay: Duration, chunk: u64, duration: Duration) -> (u64, u64) {
        let start = Instant::now();
        let per_chunk = Duration::from_secs_f64(chunk as f64 / rate);
        let mut in_flight: std::collections::VecDeque<(u32, Instant)> = Default::default();
        let (mut now, mut next, mut link_free, mut acked) = (start, 0u32, start, 0u64);
        while now < start + duration {
            // Send while the window allows: each chunk leaves the link one serialisation time after the last.
            while (in_flight.len() as u64 + 1) * chunk <= window.bytes() {
                window.sent(next, now);
                link_free = link_free.max(now) + per_chunk;
                in_flight.push_back((next, link_free + delay));
                next += 1;
            }
            // The simulated sender always has more to send: the window is what stopped it.
            window.blocked();
            // Then wait for the oldest Ack.
            let (index, at) = in_flight.pop_front().expect("a window holds at least one chunk");
            now = now.max(at);
            window.acked(index, chunk, now);
            acked += chunk;
        }
        (window.bytes(), acked)
    }

    #[test]
    fn a_fixed_window_never_moves() {
        let (bytes, _) = simulate(
            Window::fixed(16 * MIB),
            500.0 * MIB as f64,
            Duration::from_millis(60),
            MIB,
            Duration::from_secs(2),
        );
        assert_eq!(bytes, 16 * MIB);
    }

    /// 500 MiB/s with 60 ms from send to Ack: the product is 30 MiB, more than the default window. The window grows
    /// past the product (so the link, not the window, is the limit) and no further than twice it (plus one round's
    /// measuring slack), and the throughput of the last second is near the link's.
    #[test]
    fn a_long_round_trip_grows_the_window_to_cover_the_bandwidth_delay_product() {
        let (rate, delay) = (500.0 * MIB as f64, Duration::from_millis(60));
        let product = (rate * delay.as_secs_f64()) as u64;
        let (bytes, sized) = simulate(Window::sized(16 * MIB, None), rate, delay, MIB, Duration::from_secs(2));
        assert!(bytes >= product + MIB, "window {bytes} below the product {product}");
        assert!(
            bytes <= 2 * product + 4 * MIB,
            "window {bytes} above twice the product {product}"
        );
        let fixed = simulate(Window::fixed(16 * MIB), rate, delay, MIB, Duration::from_secs(2)).1;
        assert!(sized as f64 > 1.5 * fixed as f64, "sized moved {sized}, fixed {fixed}");
    }

    /// A short round trip needs no more than the default window: it stays where it started.
    #[test]
    fn a_round_trip_learned_late_sizes_only_a_window_that_sizes_itself() {
        let mut auto = Window::sized(16 << 20, None);
        auto.handshake_round_trip(Duration::from_millis(40));
        assert_eq!(auto.bytes(), starting_bytes(16 << 20, Some(Duration::from_millis(40))));
        assert!(auto.bytes() > 40 << 20, "{}", auto.bytes());
        let mut fixed = Window::fixed(16 << 20);
        fixed.handshake_round_trip(Duration::from_millis(40));
        assert_eq!(fixed.bytes(), 16 << 20);
    }

    #[test]
    fn a_short_round_trip_keeps_the_default_window() {
        let (bytes, _) = simulate(
            Window::sized(16 * MIB, None),
            500.0 * MIB as f64,
            Duration::from_millis(2),
            MIB,
            Duration::from_secs(1),
        );
        assert_eq!(bytes, 16 * MIB);
    }

    /// A huge product (10 GiB/s over 1 s) stops at the cap.
    #[test]
    fn the_window_never_grows_past_the_cap() {
        let (bytes, _) = simulate(
            Window::sized(16 * MIB, None),
            10240.0 * MIB as f64,
            Duration::from_secs(1),
            4 * MIB,
            Duration::from_secs(20),
        );
        assert_eq!(bytes, AUTO_WINDOW_CAP);
    }

    /// A rejected chunk's send time is forgotten: its later Ack (after a resend) gives no delay sample of its own.
    #[test]
    fn a_rejected_chunk_gives_no_delay_sample() {
        let mut window = Window::sized(MIB, None);
        let start = Instant::now();
        window.sent(0, start);
        window.forget(0);
        window.acked(0, MIB, start + Duration::from_secs(5));
        assert_eq!(window.min_delay, None);
        window.sent(1, start);
        window.acked(1, MIB, start + Duration::from_millis(10));
        assert_eq!(window.min_delay, Some(Duration::from_millis(10)));
    }

    /// The handshake's round trip sets where the window starts: 40 ms asks for [`START_RATE`] × 40 ms (more than the
    /// default), loopback's fraction of a millisecond keeps the default, a huge one stops at the cap, and a window
    /// the user set ignores it.
    #[test]
    fn the_window_starts_from_the_handshakes_round_trip() {
        let rtt = Duration::from_millis(40);
        let expected = (START_RATE as f64 * rtt.as_secs_f64()) as u64;
        assert!(expected > 16 * MIB);
        assert_eq!(Window::sized(16 * MIB, Some(rtt)).bytes(), expected);
        assert_eq!(
            Window::sized(16 * MIB, Some(Duration::from_micros(80))).bytes(),
            16 * MIB
        );
        assert_eq!(Window::sized(16 * MIB, None).bytes(), 16 * MIB);
        assert_eq!(
            Window::sized(16 * MIB, Some(Duration::from_secs(5))).bytes(),
            AUTO_WINDOW_CAP
        );
        assert_eq!(Window::fixed(16 * MIB).bytes(), 16 * MIB);
    }

    /// A window-bound round without queueing doubles the window even when the rate is no new best (the rate of a
    /// window-bound round says what the window allowed, not what the path can carry); a round the window did not
    /// limit, or one whose delay shows queueing, does not.
    #[test]
    fn a_window_bound_round_without_queueing_doubles_the_window() {
        let start = Instant::now();
        let ms = Duration::from_millis;
        let mut window = Window::sized(16 * MIB, None);
        // A first round: 16 MiB acknowledged 100 ms after it went out sets the best rate (160 MiB/s): the product
        // (16 MiB) is the window itself, so only the limit doubles it.
        for i in 0..16 {
            window.sent(i, start);
        }
        window.blocked();
        for i in 0..16 {
            window.acked(i, MIB, start + ms(100) + ms(u64::from(i)));
        }
        window.acked(16, MIB, start + ms(210)); // ends the sample (no send time: no delay sample)
        assert_eq!(window.bytes(), 32 * MIB);
        // The next round is slower (no new best rate), limited and unqueued: the window doubles again.
        for i in 100..101 {
            window.sent(i, start + ms(300));
        }
        window.blocked();
        window.acked(100, MIB, start + ms(400));
        window.acked(17, MIB, start + ms(520));
        assert_eq!(window.bytes(), 64 * MIB);
        // Not limited: no growth.
        window.sent(200, start + ms(600));
        window.acked(200, MIB, start + ms(700));
        window.acked(18, MIB, start + ms(820));
        assert_eq!(window.bytes(), 64 * MIB);
        // Limited, but the delay (300 ms against a shortest of 100 ms) shows queueing: no growth.
        window.sent(300, start + ms(900));
        window.blocked();
        window.acked(300, MIB, start + ms(1200));
        window.acked(19, MIB, start + ms(1320));
        assert_eq!(window.bytes(), 64 * MIB);
    }

    /// 40 ms from send to Ack at 1 GiB/s (a 40 MiB product) from the default window: a window started from the
    /// round trip and doubled while it is the limit covers the product within a quarter of a second, where growth
    /// by new best rates alone took more rounds.
    #[test]
    fn a_long_round_trip_is_covered_within_a_few_rounds() {
        let (rate, delay) = (1024.0 * MIB as f64, Duration::from_millis(40));
        let product = (rate * delay.as_secs_f64()) as u64;
        let (bytes, _) = simulate(
            Window::sized(16 * MIB, None),
            rate,
            delay,
            MIB,
            Duration::from_millis(250),
        );
        assert!(
            bytes >= product,
            "window {bytes} below the product {product} after 250 ms"
        );
    }
}
