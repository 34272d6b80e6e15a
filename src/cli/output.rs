//! What a push or pull shows while it runs, in one of four modes chosen once at start:
//!
//! - **bars** (stderr is a terminal): an indicatif bar redrawn from the run's [`Meter`] ten times a second, with
//!   the file moving now, bytes, rate, ETA, reused bytes, re-sent chunks and reconnects; notable events (retries,
//!   rejected chunks, failed files) print above it;
//! - **lines** (stderr is not a terminal: a log, a pipe): the same events as plain lines, nothing animated;
//! - **json** (`--json`): newline-delimited JSON events on stdout, a `progress` event every `--json-progress`
//!   (default [`JSON_PROGRESS_EVERY`]; 0 for none), and the summary object last (README, "JSON output");
//! - **json summary** (`--json -q`): the summary object alone, one line per run (cron logs);
//! - **quiet** (`-q`): nothing but errors.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};

use crate::client::ClientEvent;
use crate::demo::human;
use crate::meter::{Meter, Snapshot};
use crate::transfer::sender::SendEvent;

/// How often `--json` reports progress unless `--json-progress` says otherwise.
pub const JSON_PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// How often a terminal bar is redrawn.
const BAR_EVERY: Duration = Duration::from_millis(100);
/// The rate is averaged over about this long.
const RATE_WINDOW: Duration = Duration::from_secs(3);

/// The display mode of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Progress bar on stderr.
    Bars,
    /// Event lines on stderr.
    Lines,
    /// JSON events on stdout.
    Json,
    /// Only the JSON summary (`--json -q`, for cron logs).
    JsonSummary,
    /// Errors only.
    Quiet,
}

impl Mode {
    /// The mode for these flags and this process's stderr.
    pub fn pick(json: bool, quiet: bool) -> Mode {
        match (json, quiet) {
            (true, false) => Mode::Json,
            (true, true) => Mode::JsonSummary,
            (false, true) => Mode::Quiet,
            _ if std::io::stderr().is_terminal() => Mode::Bars,
            _ => Mode::Lines,
        }
    }
}

/// The live display of one push or pull.
pub struct Output {
    mode: Mode,
    json_every: Duration,
    meter: Arc<Meter>,
    bars: Option<Bars>,
    started: Instant,
    rate: Mutex<Rate>,
}

impl Output {
    /// Starts the display (a `start` event in JSON mode) for `command` moving `source` to `destination`.
    pub fn start(mode: Mode, meter: Arc<Meter>, command: &str, source: &str, destination: &str) -> Arc<Output> {
        Output::start_with(mode, meter, command, source, destination, JSON_PROGRESS_EVERY)
    }

    /// [`Output::start`] with JSON progress events every `json_every` (zero: none).
    pub fn start_with(
        mode: Mode,
        meter: Arc<Meter>,
        command: &str,
        source: &str,
        destination: &str,
        json_every: Duration,
    ) -> Arc<Output> {
        let bars = (mode == Mode::Bars).then(|| Bars::new(source));
        if mode == Mode::Json {
            emit(json!({
                "event": "start",
                "command": command,
                "source": source,
                "destination": destination,
                "version": env!("CARGO_PKG_VERSION"),
            }));
        }
        Arc::new(Output {
            mode,
            json_every,
            meter,
            bars,
            started: Instant::now(),
            rate: Mutex::new(Rate::default()),
        })
    }

    /// Redraws the bar or reports JSON progress on its own clock until the returned handle is dropped or aborted.
    pub fn spawn_ticker(self: &Arc<Self>) -> Option<Ticker> {
        let every = match self.mode {
            Mode::Bars => BAR_EVERY,
            Mode::Json if !self.json_every.is_zero() => self.json_every,
            Mode::Json | Mode::JsonSummary | Mode::Lines | Mode::Quiet => return None,
        };
        let output = self.clone();
        Some(Ticker(Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            tick.tick().await;
            loop {
                tick.tick().await;
                output.tick();
            }
        }))))
    }

    /// One redraw or progress event.
    fn tick(&self) {
        let snap = self.meter.snapshot();
        let (rate, eta) = self.rate(&snap);
        match (&self.bars, self.mode) {
            (Some(bars), _) => bars.draw(&snap, rate, eta),
            (None, Mode::Json) => emit(progress_json(&snap, rate, eta, self.started.elapsed())),
            _ => {}
        }
    }

    /// Bytes per second over the last few seconds, and the time left at that rate.
    fn rate(&self, snap: &Snapshot) -> (u64, Option<Duration>) {
        let mut rate = self.rate.lock().unwrap_or_else(|e| e.into_inner());
        let per_sec = rate.update(Instant::now(), snap.moved);
        let left = snap.total.saturating_sub(snap.done);
        let eta = (per_sec > 0).then(|| Duration::from_secs(left / per_sec));
        (per_sec, eta)
    }

    /// Shows one event of the run.
    pub fn event(&self, event: &ClientEvent) {
        match self.mode {
            Mode::Quiet | Mode::JsonSummary => {}
            Mode::Json => emit(event_json(event)),
            Mode::Lines => print_event(event),
            Mode::Bars => {
                if let Some(line) = event_line(event).filter(|_| notable(event)) {
                    if let Some(bars) = &self.bars {
                        bars.multi.suspend(|| errln!("{line}"));
                    }
                }
            }
        }
    }

    /// Removes the bar, so the summary prints on a clean line.
    pub fn finish(&self) {
        if let Some(bars) = &self.bars {
            bars.finish(&self.meter.snapshot());
        }
    }
}

/// The terminal display: one bar for a single file; for a tree, a bar per file that goes through its own Offer
/// (finished bars stay, a log of the large files) above a bar for the whole tree.
struct Bars {
    multi: MultiProgress,
    /// The single file, or the tree's total.
    main: ProgressBar,
    /// The file bar of a tree, and the file count it belongs to.
    file: Mutex<Option<(u64, ProgressBar)>>,
}

impl Bars {
    fn new(source: &str) -> Bars {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10));
        let main = multi.add(ProgressBar::new(1).with_style(bar_style()));
        main.set_prefix(short_name(source));
        Bars {
            multi,
            main,
            file: Mutex::new(None),
        }
    }

    fn draw(&self, snap: &Snapshot, rate: u64, eta: Option<Duration>) {
        if snap.total == 0 && snap.attempts == 0 {
            self.main.set_message("reading the source and hashing its chunks");
            return;
        }
        if snap.tree {
            self.main.set_prefix("total");
            self.draw_file(snap);
        } else if !snap.file.name.is_empty() {
            self.main.set_prefix(short_name(&snap.file.name));
        }
        self.main.set_length(snap.total.max(snap.done).max(1));
        self.main.set_position(snap.done);
        self.main.set_message(bar_message(snap, rate, eta));
    }

    /// A tree's current large file: a new bar when a new file starts, the last one finished where it stopped.
    fn draw_file(&self, snap: &Snapshot) {
        if snap.file.seq == 0 {
            return;
        }
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if file.as_ref().is_none_or(|(seq, _)| *seq != snap.file.seq) {
            if let Some((seq, done)) = file.take() {
                // The file just before this one ended with `previous_done`; an older one, where it was last seen.
                let held = if seq + 1 == snap.file.seq {
                    snap.previous_done
                } else {
                    done.position()
                };
                leave(&done, held);
            }
            let bar = self
                .multi
                .insert_before(&self.main, ProgressBar::new(snap.file.size.max(1)));
            bar.set_style(bar_style());
            bar.set_prefix(short_name(&snap.file.name));
            *file = Some((snap.file.seq, bar));
        }
        if let Some((_, bar)) = file.as_ref() {
            bar.set_position(snap.file_done.min(snap.file.size));
            bar.set_message(format!("{} / {}", human(snap.file_done), human(snap.file.size)));
        }
    }

    /// Leaves each file bar at its last count and clears the main bar for the summary.
    fn finish(&self, snap: &Snapshot) {
        if let Some((seq, bar)) = self.file.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let held = if seq == snap.file.seq {
                snap.file_done
            } else {
                bar.position()
            };
            leave(&bar, held);
        }
        self.main.finish_and_clear();
    }
}

/// Leaves a file bar on screen at its final count, `held` bytes of its length.
fn leave(bar: &ProgressBar, held: u64) {
    let size = bar.length().unwrap_or(held);
    bar.set_position(held.min(size));
    bar.abandon_with_message(format!("{} / {}", human(held), human(size)));
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix:>24.bold} [{bar:30}] {percent:>3}% {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// The task that redraws; stops when dropped, or (waiting until it has) with [`Ticker::stop`].
pub struct Ticker(Option<tokio::task::JoinHandle<()>>);

impl Ticker {
    /// Stops the task and waits until it has: a tick already printing finishes first, so nothing follows the
    /// summary.
    pub async fn stop(mut self) {
        if let Some(handle) = self.0.take() {
            handle.abort();
            let _ = handle.await;
        }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        if let Some(handle) = &self.0 {
            handle.abort();
        }
    }
}

/// A rate over a sliding window of samples.
#[derive(Default)]
struct Rate {
    samples: std::collections::VecDeque<(Instant, u64)>,
}

impl Rate {
    fn update(&mut self, now: Instant, moved: u64) -> u64 {
        self.samples.push_back((now, moved));
        while self.samples.len() > 2 && now.duration_since(self.samples[0].0) > RATE_WINDOW {
            self.samples.pop_front();
        }
        let (then, before) = self.samples[0];
        let secs = now.duration_since(then).as_secs_f64();
        if secs < 0.05 {
            return 0;
        }
        (moved.saturating_sub(before) as f64 / secs) as u64
    }
}

/// One JSON event line on stdout; a closed stdout (the reader went away) must not kill the transfer.
fn emit(value: Value) {
    outln!("{value}");
}

/// The last path component, for the bar's prefix.
fn short_name(path: &str) -> String {
    let trimmed = path.trim_end_matches('/');
    let name = trimmed.rsplit('/').next().unwrap_or(trimmed);
    let mut name: String = name.chars().take(24).collect();
    if name.is_empty() {
        name.push('/');
    }
    name
}

fn bar_message(snap: &Snapshot, rate: u64, eta: Option<Duration>) -> String {
    let mut msg = format!("{} / {}", human(snap.done), human(snap.total));
    if rate > 0 {
        msg.push_str(&format!("  {}/s", human(rate)));
    }
    if let Some(eta) = eta.filter(|_| snap.done < snap.total) {
        msg.push_str(&format!("  ETA {}", clock(eta)));
    }
    if snap.held > 0 {
        msg.push_str(&format!("  already there {}", human(snap.held)));
    }
    if snap.resent > 0 {
        msg.push_str(&format!("  re-sent {}", snap.resent));
    }
    if snap.attempts > 1 {
        msg.push_str(&format!("  reconnects {}", snap.attempts - 1));
    }
    msg
}

/// `1:02:03` or `2:03`.
fn clock(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

fn progress_json(snap: &Snapshot, rate: u64, eta: Option<Duration>, elapsed: Duration) -> Value {
    json!({
        "event": "progress",
        "bytes_total": snap.total,
        "bytes_done": snap.done,
        "bytes_moved": snap.moved,
        "bytes_held": snap.held,
        "chunks_resent": snap.resent,
        "reconnects": snap.attempts.saturating_sub(1),
        "rate_bytes_per_sec": rate,
        "eta_secs": eta.map(|d| d.as_secs()),
        "elapsed_ms": elapsed.as_millis() as u64,
        "file": snap.file.name,
        "file_size": snap.file.size,
        "file_done": snap.file_done,
    })
}

/// Events worth a line above the bar (the bar shows the rest).
fn notable(event: &ClientEvent) -> bool {
    matches!(
        event,
        ClientEvent::Retrying { .. }
            | ClientEvent::Moved { .. }
            | ClientEvent::SourceChanged { .. }
            | ClientEvent::Send(SendEvent::Rejected { .. } | SendEvent::FileFailed { .. })
            | ClientEvent::Scanned { .. }
    )
}

/// One event as JSON.
pub fn event_json(event: &ClientEvent) -> Value {
    match event {
        ClientEvent::Manifest { chunks, size, cached } => {
            json!({ "event": "manifest", "chunks": chunks, "size": size, "cached": cached })
        }
        ClientEvent::Connected { attempt } => json!({ "event": "connected", "attempt": attempt }),
        ClientEvent::Send(SendEvent::Need { chunks, bytes }) => {
            json!({ "event": "need", "chunks": chunks, "bytes": bytes })
        }
        ClientEvent::Send(SendEvent::Rejected { index }) => json!({ "event": "chunk_rejected", "index": index }),
        ClientEvent::Send(SendEvent::TreeNeed { files, bytes }) => {
            json!({ "event": "tree_need", "files": files, "bytes": bytes })
        }
        ClientEvent::Send(SendEvent::FileFailed { path, reason }) => {
            json!({ "event": "file_failed", "path": path, "reason": reason })
        }
        ClientEvent::Retrying { attempt, delay, error } => json!({
            "event": "retry", "attempt": attempt, "delay_ms": delay.as_millis() as u64, "error": error,
        }),
        ClientEvent::Moved {
            attempt,
            from,
            to,
            error,
        } => json!({
            "event": "moved", "attempt": attempt, "from": from, "to": to, "error": error,
        }),
        ClientEvent::Scanned { files, bytes, skipped } => {
            json!({ "event": "scanned", "files": files, "bytes": bytes, "skipped": skipped })
        }
        ClientEvent::SourceChanged { reason } => json!({ "event": "source_changed", "reason": reason }),
    }
}

/// One event as a human line, if it has one (peer text made safe for a terminal).
fn event_line(event: &ClientEvent) -> Option<String> {
    event_text(event).map(|line| super::printable(&line))
}

fn event_text(event: &ClientEvent) -> Option<String> {
    Some(match event {
        ClientEvent::Manifest { chunks, size, cached } => {
            let how = if *cached { "cached" } else { "hashed" };
            format!("ferry: manifest {how}: {chunks} chunks, {}", human(*size))
        }
        ClientEvent::Connected { attempt } if *attempt > 1 => format!("ferry: reconnected (attempt {attempt})"),
        ClientEvent::Connected { .. } => return None,
        ClientEvent::Send(SendEvent::Need { chunks, bytes }) => {
            format!("ferry: server needs {chunks} chunks ({})", human(*bytes))
        }
        ClientEvent::Send(SendEvent::Rejected { index }) => {
            format!("ferry: the server rejected chunk {index}; reading it again (damaged in transit, or the source changed)")
        }
        ClientEvent::Scanned { files, bytes, skipped } => {
            format!(
                "ferry: tree: {files} files ({}), {skipped} entries skipped",
                human(*bytes)
            )
        }
        ClientEvent::Send(SendEvent::TreeNeed { files, bytes }) => {
            format!("ferry: server needs {files} files ({})", human(*bytes))
        }
        ClientEvent::Send(SendEvent::FileFailed { path, reason }) => format!("ferry: not sent: {path}: {reason}"),
        ClientEvent::Retrying { delay, error, .. } => format!("ferry: {error}; retrying in {delay:.1?}"),
        ClientEvent::Moved { from, to, error, .. } => format!("ferry: {from}: {error}; moving to {to}"),
        ClientEvent::SourceChanged { reason } => format!("ferry: source changed ({reason}); re-reading it"),
    })
}

fn print_event(event: &ClientEvent) {
    if let Some(line) = event_line(event) {
        errln!("{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_is_bytes_over_the_window_and_forgets_old_samples() {
        let mut rate = Rate::default();
        let t0 = Instant::now();
        assert_eq!(rate.update(t0, 0), 0);
        assert_eq!(rate.update(t0 + Duration::from_secs(1), 1000), 1000);
        assert_eq!(rate.update(t0 + Duration::from_secs(2), 3000), 1500);
        // Ten seconds later, only the recent samples count.
        rate.update(t0 + Duration::from_secs(10), 3000);
        assert_eq!(rate.update(t0 + Duration::from_secs(11), 5000), 2000);
    }

    #[test]
    fn clocks_and_names_are_short() {
        assert_eq!(clock(Duration::from_secs(62)), "1:02");
        assert_eq!(clock(Duration::from_secs(3723)), "1:02:03");
        assert_eq!(short_name("backups/2026/vm.qcow2"), "vm.qcow2");
        assert_eq!(short_name("dir/"), "dir");
    }

    #[test]
    fn every_event_has_a_json_name() {
        let events = [
            ClientEvent::Connected { attempt: 2 },
            ClientEvent::Send(SendEvent::Rejected { index: 3 }),
            ClientEvent::Retrying {
                attempt: 1,
                delay: Duration::from_millis(250),
                error: "reset".into(),
            },
            ClientEvent::Moved {
                attempt: 1,
                from: "a:1".into(),
                to: "b:1".into(),
                error: "reset".into(),
            },
        ];
        let names: Vec<_> = events.iter().map(|e| event_json(e)["event"].clone()).collect();
        assert_eq!(names, ["connected", "chunk_rejected", "retry", "moved"]);
    }
}
