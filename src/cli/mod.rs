//! The command line: argument types, value parsers, and what each command prints.
//!
//! `main.rs` parses into [`Cli`] and calls [`serve`], [`push`] or [`demo`]; this module turns library results
//! into output: a human summary on stderr, or with `--json` exactly one JSON object on stdout.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

mod serve;
mod status;

pub use serve::{keygen, serve, token, KeygenArgs, ServeArgs, TokenArgs};
pub use status::{status, StatusArgs};

use crate::auth::Token;
use crate::chunk::{ChunkSpec, ChunkingMode};
use crate::client::{
    Access, Backoff, ClientError, ClientEvent, PullOptions, PullReport, Pulled, PushOptions, PushReport, TreeReport,
};
use crate::demo::{human, DemoError, DemoOptions};
use crate::manifest::hex;
use crate::tls::{ClientTls, Trust};
use crate::transfer::sender::{SendEvent, SendOptions};
use crate::tree::LinkPolicy;
use crate::units::{parse_duration, parse_size};
use crate::url::FerryUrl;
use crate::{DEFAULT_CHUNK_SIZE, DEFAULT_WINDOW};

/// ferry: resumable, verified file transfer.
#[derive(Parser, Debug)]
#[command(name = "ferry", version, about, long_about = None)]
pub struct Cli {
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// No output except errors (and the --json summary).
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// ferry's commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Receive pushed files and trees into a root directory, and serve them to pulls.
    Serve(ServeArgs),
    /// Push a file or a directory tree to a server, sending only what it does not already hold.
    Push(PushArgs),
    /// Pull a file or a directory tree from a server, resuming an earlier run and reusing an older local copy.
    Pull(PullArgs),
    /// Show a resumed, verified push through a flaky link (in-process server, temp dir).
    Demo(DemoArgs),
    /// Expire abandoned transfers and leftover files of a server root (while its server is stopped).
    Gc(GcArgs),
    /// Make a self-signed TLS certificate and key for `ferry serve`, and print its fingerprint.
    Keygen(KeygenArgs),
    /// Make a client token and print it with the [[client]] entry for the server's configuration.
    Token(TokenArgs),
    /// List this client's transfers (done, failed, interrupted), or with --server its partial uploads there.
    Status(StatusArgs),
}

/// `ferry gc`.
#[derive(Args, Debug)]
pub struct GcArgs {
    /// The server's root directory.
    #[arg(long)]
    pub root: PathBuf,
    /// The server's state directory (default ROOT/.ferry/state).
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Expire open transfers without progress, and leftover files untouched, for this long (e.g. 7d, 0s).
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    pub older_than: Duration,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Runs `ferry gc`; returns the exit code.
pub fn gc(args: GcArgs, quiet: bool) -> u8 {
    if !args.root.join(crate::path::RESERVED_DIR).is_dir() {
        eprintln!(
            "ferry: gc: {} is not a ferry server root (no .ferry directory)",
            args.root.display()
        );
        return crate::exit::USAGE;
    }
    match crate::gc::collect_offline(&args.root, args.state.as_deref(), args.older_than) {
        Ok(report) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({ "status": "ok", "exit_code": 0, "report": report })
                );
            } else if !quiet {
                eprintln!(
                    "ferry: gc: {} abandoned transfers expired, {} leftover files removed, {} freed",
                    report.transfers_expired,
                    report.leftovers_removed,
                    human(report.bytes_freed)
                );
            }
            crate::exit::OK
        }
        Err(e) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({ "status": "error", "exit_code": crate::exit::LOCAL, "error": e.to_string() })
                );
            }
            eprintln!("ferry: gc failed: {e}");
            crate::exit::LOCAL
        }
    }
}

/// `ferry push`.
#[derive(Args, Debug)]
pub struct PushArgs {
    /// The file or directory to send.
    pub file: PathBuf,
    /// ferry://HOST[:PORT]/REMOTE/PATH (a trailing '/' keeps the local file name).
    pub destination: FerryUrl,
    /// TCP connections sharing one file's chunks (1-16): more than one helps on links with high latency, where
    /// one connection is bound by its window or its TCP buffers. Trees use one connection.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub streams: u32,
    /// Options shared with pull.
    #[command(flatten)]
    pub common: TransferArgs,
}

/// `ferry pull`.
#[derive(Args, Debug)]
pub struct PullArgs {
    /// ferry://HOST[:PORT]/REMOTE/PATH of the file or directory to fetch.
    pub source: FerryUrl,
    /// Local file to write, or an existing directory to write a file into under its remote name; a tree is
    /// written into this directory (created if missing).
    pub destination: PathBuf,
    /// Options shared with push.
    #[command(flatten)]
    pub common: TransferArgs,
}

/// Options of both push and pull.
#[derive(Args, Debug)]
pub struct TransferArgs {
    /// Client state directory (default $FERRY_STATE, else $XDG_STATE_HOME/ferry or ~/.local/state/ferry).
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// How to cut files: content-defined chunks (cdc: only the chunks around an edit change) or fixed-size.
    #[arg(long, value_enum, default_value_t = ChunkingMode::Cdc)]
    pub chunking: ChunkingMode,
    /// Chunk size (fixed) or target average (cdc; chunks range from a quarter to four times it), e.g. 1MiB, 256K.
    /// Bounded to 4KiB..16MiB (cdc: 16KiB..4MiB).
    #[arg(long, default_value = "1MiB", value_parser = parse_size_u32)]
    pub chunk_size: u32,
    /// Unacknowledged bytes in flight.
    #[arg(long, default_value = "16MiB", value_parser = parse_size)]
    pub window: u64,
    /// Consecutive failed attempts without progress before giving up.
    #[arg(long, default_value_t = 10)]
    pub retries: u32,
    /// Give up on a connection when no byte moves for this long.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// First retry delay (doubles per failure, with jitter, up to 15s).
    #[arg(long, default_value = "250ms", value_parser = parse_duration)]
    pub retry_delay: Duration,
    /// For trees: recreate symlinks whose target stays inside the tree (record), or leave them out (skip).
    #[arg(long, value_enum, default_value_t = LinkPolicy::Skip)]
    pub links: LinkPolicy,
    /// Print one JSON summary object on stdout.
    #[arg(long)]
    pub json: bool,
    /// File holding this client's token (ID:SECRET, made by `ferry token`), for servers that require one.
    #[arg(long, env = "FERRY_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Speak TLS and trust exactly the server certificate with this fingerprint (sha256:HEX, from `ferry keygen`).
    #[arg(long, conflicts_with = "tls_ca")]
    pub tls_fingerprint: Option<String>,
    /// Speak TLS and trust server certificates for the URL's host issued by a CA in this PEM file.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
}

impl TransferArgs {
    fn chunking(&self) -> ChunkSpec {
        ChunkSpec {
            mode: self.chunking,
            size: self.chunk_size,
        }
    }

    fn backoff(&self) -> Backoff {
        Backoff {
            initial: self.retry_delay,
            ..Backoff::default()
        }
    }

    fn connect_timeout(&self) -> Duration {
        self.timeout.min(Duration::from_secs(10))
    }

    fn state_dir(&self) -> PathBuf {
        self.state.clone().unwrap_or_else(default_state_dir)
    }

    /// The token and TLS settings these flags ask for. Blocking (reads files).
    fn access(&self) -> Result<Access, String> {
        access_from(
            self.token_file.as_deref(),
            self.tls_fingerprint.as_deref(),
            self.tls_ca.as_deref(),
        )
    }
}

/// The token and TLS settings of `--token-file`, `--tls-fingerprint` and `--tls-ca`. Blocking (reads files).
fn access_from(
    token_file: Option<&std::path::Path>,
    tls_fingerprint: Option<&str>,
    tls_ca: Option<&std::path::Path>,
) -> Result<Access, String> {
    let token = match token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            Some(text.parse::<Token>().map_err(|e| format!("{}: {e}", path.display()))?)
        }
        None => None,
    };
    let trust = match (tls_fingerprint, tls_ca) {
        (Some(print), _) => Some(Trust::pinned(print).map_err(|e| e.to_string())?),
        (None, Some(ca)) => Some(Trust::CaFile(ca.to_path_buf())),
        (None, None) => None,
    };
    let tls = trust
        .map(|trust| ClientTls::new(&trust).map_err(|e| e.to_string()))
        .transpose()?;
    Ok(Access { token, tls })
}

/// `ferry demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Size of the generated file.
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    pub size: u64,
    /// Chunk size.
    #[arg(long, default_value = "1MiB", value_parser = parse_size_u32)]
    pub chunk_size: u32,
}

/// Runs `ferry push`, printing progress and the summary; returns the exit code.
pub async fn push(args: PushArgs, quiet: bool) -> u8 {
    let common = &args.common;
    let access = match common.access() {
        Ok(access) => access,
        Err(e) => return finish::<PushReport>("push", Err(ClientError::Setup(e)), common.json, quiet),
    };
    let opts = PushOptions {
        source: args.file.clone(),
        destination: args.destination.clone(),
        state_dir: common.state_dir(),
        chunking: common.chunking(),
        retries: common.retries,
        send: SendOptions {
            window: common.window,
            io_timeout: common.timeout,
            ..SendOptions::default()
        },
        connect_timeout: common.connect_timeout(),
        access,
        streams: args.streams,
        backoff: common.backoff(),
        links: common.links,
    };
    let show = !quiet && !common.json;
    let mut progress = |event: ClientEvent| {
        if show {
            print_event(&event);
        }
    };
    if args.file.is_dir() {
        let result = crate::client::push_tree(opts, &mut progress).await;
        finish("push", result, common.json, quiet)
    } else {
        let result = crate::client::push(opts, &mut progress).await;
        finish("push", result, common.json, quiet)
    }
}

/// Runs `ferry pull`, printing progress and the summary; returns the exit code.
pub async fn pull(args: PullArgs, quiet: bool) -> u8 {
    let common = &args.common;
    let access = match common.access() {
        Ok(access) => access,
        Err(e) => return finish::<Pulled>("pull", Err(ClientError::Setup(e)), common.json, quiet),
    };
    let opts = PullOptions {
        source: args.source.clone(),
        destination: args.destination.clone(),
        state_dir: common.state_dir(),
        chunking: common.chunking(),
        window: common.window,
        retries: common.retries,
        io_timeout: common.timeout,
        connect_timeout: common.connect_timeout(),
        access,
        backoff: common.backoff(),
        links: common.links,
    };
    let show = !quiet && !common.json;
    let mut progress = |event: ClientEvent| {
        if show {
            print_event(&event);
        }
    };
    let result = crate::client::pull(opts, &mut progress).await;
    finish("pull", result, common.json, quiet)
}

/// A command's final report: the JSON summary, the human summary, and the exit code.
trait Summary {
    fn json(&self) -> serde_json::Value;
    fn print(&self);
    fn exit_code(&self) -> u8 {
        crate::exit::OK
    }
}

impl Summary for PushReport {
    fn json(&self) -> serde_json::Value {
        report_json(self)
    }
    fn print(&self) {
        print_report(self)
    }
}

impl Summary for Pulled {
    fn json(&self) -> serde_json::Value {
        match self {
            Pulled::File(report) => pull_json(report),
            Pulled::Tree(report) => tree_json(report),
        }
    }
    fn print(&self) {
        match self {
            Pulled::File(report) => print_pull(report),
            Pulled::Tree(report) => print_tree(report),
        }
    }
    fn exit_code(&self) -> u8 {
        match self {
            Pulled::File(_) => crate::exit::OK,
            Pulled::Tree(report) => report.exit_code(),
        }
    }
}

impl Summary for TreeReport {
    fn json(&self) -> serde_json::Value {
        tree_json(self)
    }
    fn print(&self) {
        print_tree(self)
    }
    fn exit_code(&self) -> u8 {
        TreeReport::exit_code(self)
    }
}

/// Prints the outcome (the JSON summary, or a human line unless quiet) and returns the exit code.
fn finish<R: Summary>(what: &str, result: Result<R, ClientError>, json: bool, quiet: bool) -> u8 {
    match result {
        Ok(report) => {
            if json {
                println!("{}", report.json());
            } else if !quiet {
                report.print();
            }
            report.exit_code()
        }
        Err(e) => {
            let code = e.exit_code();
            if json {
                println!("{}", error_json(&e, code));
            }
            eprintln!("ferry: {what} failed: {e}");
            code
        }
    }
}

/// Runs `ferry demo`.
pub async fn demo(args: DemoArgs) -> Result<(), DemoError> {
    let opts = DemoOptions {
        size: args.size,
        chunk_size: args.chunk_size,
    };
    let mut out = std::io::stdout();
    crate::demo::run(opts, &mut out).await
}

fn print_event(event: &ClientEvent) {
    match event {
        ClientEvent::Manifest { chunks, size, cached } => {
            let how = if *cached { "cached" } else { "hashed" };
            eprintln!("ferry: manifest {how}: {chunks} chunks, {}", human(*size));
        }
        ClientEvent::Connected { attempt } if *attempt > 1 => {
            eprintln!("ferry: reconnected (attempt {attempt})")
        }
        ClientEvent::Connected { .. } => {}
        ClientEvent::Send(SendEvent::Need { chunks, bytes }) => {
            eprintln!("ferry: server needs {chunks} chunks ({})", human(*bytes));
        }
        ClientEvent::Send(SendEvent::Rejected { index }) => {
            eprintln!("ferry: chunk {index} was corrupted in transit; re-sending")
        }
        ClientEvent::Scanned { files, bytes, skipped } => {
            eprintln!(
                "ferry: tree: {files} files ({}), {skipped} entries skipped",
                human(*bytes)
            );
        }
        ClientEvent::Send(SendEvent::TreeNeed { files, bytes }) => {
            eprintln!("ferry: server needs {files} files ({})", human(*bytes));
        }
        ClientEvent::Send(SendEvent::FileFailed { path, reason }) => {
            eprintln!("ferry: not sent: {path}: {reason}")
        }
        ClientEvent::Retrying { delay, error, .. } => {
            eprintln!("ferry: {error}; retrying in {delay:.1?}")
        }
        ClientEvent::SourceChanged { reason } => {
            eprintln!("ferry: source changed ({reason}); re-reading it")
        }
    }
}

fn print_report(report: &PushReport) {
    let what = if report.committed.already_present {
        "already present"
    } else {
        "pushed"
    };
    eprintln!(
        "ferry: {what}: {} -> {} ({}, sent {}, reused {}, {} attempt(s), {:.2?})\nblake3 {}",
        report.source,
        report.destination,
        human(report.size),
        human(report.sent.bytes_sent),
        human(report.committed.reused_bytes),
        report.attempts,
        report.duration,
        hex(&report.digest)
    );
}

/// The one-line JSON summary of a successful push.
pub fn report_json(report: &PushReport) -> serde_json::Value {
    let secs = report.duration.as_secs_f64();
    serde_json::json!({
        "status": "ok",
        "exit_code": crate::exit::OK,
        "source": report.source,
        "destination": report.destination,
        "size": report.size,
        "digest": hex(&report.digest),
        "chunks": report.chunks,
        "bytes_sent": report.sent.bytes_sent,
        "bytes_reused": report.committed.reused_bytes,
        "chunks_sent": report.sent.chunks_sent,
        "chunks_rejected": report.sent.chunks_rejected,
        "attempts": report.attempts,
        "manifest_cached": report.manifest_cached,
        "source_changes": report.source_changes,
        "already_present": report.committed.already_present,
        "server_received_bytes": report.committed.received_bytes,
        "server_rejected_chunks": report.committed.rejected_chunks,
        "duration_ms": report.duration.as_millis() as u64,
        "rate_bytes_per_sec": if secs > 0.0 { (report.sent.bytes_sent as f64 / secs) as u64 } else { 0 },
    })
}

fn print_pull(report: &PullReport) {
    let what = if report.committed.already_present {
        "already present"
    } else {
        "pulled"
    };
    eprintln!(
        "ferry: {what}: {} -> {} ({}, received {}, reused {}, {} attempt(s), {:.2?})\nblake3 {}",
        report.source,
        report.destination,
        human(report.size),
        human(report.bytes_received),
        human(report.committed.reused_bytes),
        report.attempts,
        report.duration,
        hex(&report.digest)
    );
}

/// The one-line JSON summary of a successful pull.
pub fn pull_json(report: &PullReport) -> serde_json::Value {
    let secs = report.duration.as_secs_f64();
    serde_json::json!({
        "status": "ok",
        "exit_code": crate::exit::OK,
        "source": report.source,
        "destination": report.destination,
        "size": report.size,
        "digest": hex(&report.digest),
        "bytes_received": report.bytes_received,
        "bytes_reused": report.committed.reused_bytes,
        "chunks_rejected": report.chunks_rejected,
        "attempts": report.attempts,
        "already_present": report.committed.already_present,
        "duration_ms": report.duration.as_millis() as u64,
        "rate_bytes_per_sec": if secs > 0.0 { (report.bytes_received as f64 / secs) as u64 } else { 0 },
    })
}

fn print_tree(report: &TreeReport) {
    let verb = if report.pulled { "received" } else { "sent" };
    eprintln!(
        "ferry: tree {} -> {}: {} files ({}), {} needed, {} committed, {} unchanged; {verb} {}, reused {}; {} attempt(s), {:.2?}",
        report.source,
        report.destination,
        report.files,
        human(report.bytes_total),
        report.files_needed,
        report.committed.files_committed,
        report.committed.files_unchanged,
        human(report.bytes_transferred),
        human(report.committed.reused_bytes),
        report.attempts,
        report.duration,
    );
    for (path, reason) in &report.skipped {
        eprintln!("ferry: skipped {path}: {reason}");
    }
    for (path, reason) in &report.failed {
        eprintln!("ferry: FAILED {path}: {reason}");
    }
    if !report.committed.missing.is_empty() {
        eprintln!(
            "ferry: {} files could not be placed on the receiver",
            crate::ranges::ranges_len(&report.committed.missing)
        );
    }
}

/// The one-line JSON summary of a tree push or pull.
pub fn tree_json(report: &TreeReport) -> serde_json::Value {
    let secs = report.duration.as_secs_f64();
    let code = report.exit_code();
    let pairs = |list: &[(String, String)]| -> Vec<serde_json::Value> {
        list.iter()
            .map(|(path, reason)| serde_json::json!({ "path": path, "reason": reason }))
            .collect()
    };
    let mut summary = serde_json::json!({
        "status": if report.complete() { "ok" } else { "partial" },
        "exit_code": code,
        "kind": "tree",
        "source": report.source,
        "destination": report.destination,
        "files": report.files,
        "dirs": report.dirs,
        "symlinks": report.symlinks,
        "bytes_total": report.bytes_total,
        "files_needed": report.files_needed,
        "files_committed": report.committed.files_committed,
        "files_unchanged": report.committed.files_unchanged,
        "files_missing": crate::ranges::ranges_len(&report.committed.missing),
        "bytes_reused": report.committed.reused_bytes,
        "skipped": pairs(&report.skipped),
        "failed": pairs(&report.failed),
        "attempts": report.attempts,
        "duration_ms": report.duration.as_millis() as u64,
        "rate_bytes_per_sec": if secs > 0.0 { (report.bytes_transferred as f64 / secs) as u64 } else { 0 },
    });
    let key = if report.pulled { "bytes_received" } else { "bytes_sent" };
    summary[key] = report.bytes_transferred.into();
    summary
}

fn error_json(error: &ClientError, code: u8) -> serde_json::Value {
    serde_json::json!({ "status": "error", "exit_code": code, "error": error.to_string() })
}

/// `$FERRY_STATE`, else `$XDG_STATE_HOME/ferry`, else `~/.local/state/ferry`.
pub fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FERRY_STATE") {
        return dir.into();
    }
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME") {
        return PathBuf::from(dir).join("ferry");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".local/state/ferry")
}

fn parse_size_u32(raw: &str) -> Result<u32, String> {
    let size = parse_size(raw)?;
    let size = u32::try_from(size).map_err(|_| format!("{raw:?} is too large"))?;
    if !(crate::MIN_CHUNK_SIZE..=crate::MAX_CHUNK_SIZE).contains(&size) {
        return Err(format!("chunk size must be between 4KiB and 16MiB, got {raw}"));
    }
    Ok(size)
}

const _: () = assert!(DEFAULT_CHUNK_SIZE == 1 << 20 && DEFAULT_WINDOW == 16 << 20);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes_are_bounded() {
        assert!(parse_size_u32("1K").is_err());
        assert_eq!(parse_size_u32("1MiB"), Ok(1 << 20));
    }
}
