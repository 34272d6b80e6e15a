//! The command line: argument types, value parsers, and what each command prints.
//!
//! `main.rs` parses into [`Cli`] and calls [`serve`], [`push`] or [`demo`]; this module turns library results
//! into output: progress and a human summary on stderr ([`output`]), or with `--json` JSON events on stdout, the
//! summary object last (with `-q`, the summary alone).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// `println!` to stdout that ignores a failed write: a reader that went away (`ferry push --json | head -1`, a
/// closed cron pipe) must not turn a finished transfer into a panic. The exit code still says how the run went.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// `print!` to stdout that ignores a failed write, as [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// `eprintln!` that ignores a failed write, as [`outln!`]: stderr may be a pipe whose reader went away too.
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

mod generate;
mod output;
mod serve;
mod status;

pub use generate::{completions, man, CompletionsArgs, ManArgs};
pub use output::{event_json, Mode, Output};
pub use serve::{keygen, serve, token, KeygenArgs, ServeArgs, TokenArgs};
pub use status::{status, StatusArgs};

use crate::chunk::ChunkingMode;
use crate::client::{
    ClientError, ClientEvent, Deadline, PullOptions, PullReport, Pulled, PushOptions, PushReport, TreeReport,
};
use crate::config::{Profile, TlsChoice};
use crate::demo::{human, DemoError, DemoOptions};
use crate::manifest::hex;
use crate::settings::{Location, Request, Settings, SettingsError};
use crate::store::{LockError, StateLock};
use crate::throttle::Bandwidth;
use crate::transfer::sender::SendOptions;
use crate::tree::LinkPolicy;
use crate::units::{parse_chunk_size, parse_duration, parse_size};
use crate::url::FerryUrl;

/// ferry: resumable, verified file transfer.
#[derive(Parser, Debug)]
#[command(name = "ferry", version, about, long_about = None)]
pub struct Cli {
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// No output except errors.
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
    /// Expire abandoned transfers and leftover files of a server root (while its server is stopped), or with
    /// --client prune this client's state.
    Gc(GcArgs),
    /// Make a self-signed TLS certificate and key for `ferry serve`, and print its fingerprint.
    Keygen(KeygenArgs),
    /// Make a client token and print it with the [[client]] entry for the server's configuration.
    Token(TokenArgs),
    /// Print a shell completion script for ferry on stdout.
    Completions(CompletionsArgs),
    /// Print ferry's man page (roff) on stdout, or write one page per command into a directory.
    Man(ManArgs),
    /// List this client's transfers (done, failed, interrupted), or with --server its partial uploads there.
    Status(StatusArgs),
}

/// `ferry gc`.
#[derive(Args, Debug)]
pub struct GcArgs {
    /// The server's root directory.
    #[arg(long, required_unless_present_any = ["client", "store"], conflicts_with_all = ["client", "store"])]
    pub root: Option<PathBuf>,
    /// Collect an object store instead (`s3://BUCKET[/PREFIX]`, credentials and endpoint from the AWS variables):
    /// abandoned transfers older than --older-than and chunks no file, version or open transfer names, older than
    /// a day; safe while servers upload. Run it from one place at a time.
    #[arg(long, value_name = "URL", conflicts_with = "client")]
    pub store: Option<String>,
    /// Test knob: the grace period of --store (default 1 day).
    #[arg(long, hide = true, value_parser = parse_duration)]
    pub gc_grace: Option<Duration>,
    /// Test knob: the longest wait between a chunk's HEAD and its DELETE with --store (default 5s).
    #[arg(long, hide = true, value_parser = parse_duration)]
    pub gc_delta: Option<Duration>,
    /// Prune this client's state instead: records of pushes that ended (done or failed) longer ago than
    /// --older-than, and cached manifests of files that are gone or changed. Interrupted pushes are kept.
    #[arg(long)]
    pub client: bool,
    /// The server's state directory (default ROOT/.ferry/state); with --client, the client's (default as for push:
    /// $FERRY_STATE, else the client configuration's `state`, else $XDG_STATE_HOME/ferry or ~/.local/state/ferry).
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// With --client: the client configuration file whose `state` applies (default as for push); ignored with --root.
    #[arg(long, env = "FERRY_CONFIG", value_name = "FILE")]
    pub client_config: Option<PathBuf>,
    /// Expire open transfers without progress, and leftover files untouched, for this long (e.g. 7d, 0s); with
    /// --client, the age of finished push records to drop.
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    pub older_than: Duration,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Runs `ferry gc`; returns the exit code.
pub fn gc(args: GcArgs, quiet: bool) -> u8 {
    if let Some(url) = args.store.as_deref() {
        return store_gc(url, &args, quiet);
    }
    let Some(root) = args.root.as_deref() else {
        return client_gc(&args, quiet);
    };
    if !root.join(crate::path::RESERVED_DIR).is_dir() {
        errln!(
            "ferry: gc: {} is not a ferry server root (no .ferry directory)",
            root.display()
        );
        return crate::exit::USAGE;
    }
    match crate::gc::collect_offline(root, args.state.as_deref(), args.older_than) {
        Ok(report) => {
            if args.json {
                outln!(
                    "{}",
                    serde_json::json!({ "status": "ok", "exit_code": 0, "report": report })
                );
            } else if !quiet {
                errln!(
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
                outln!(
                    "{}",
                    serde_json::json!({ "status": "error", "exit_code": crate::exit::LOCAL, "error": e.to_string() })
                );
            }
            errln!("ferry: gc failed: {e}");
            crate::exit::LOCAL
        }
    }
}

/// `ferry gc --store URL`: mark and sweep on the object store (docs/object-store.md, "gc").
fn store_gc(url: &str, args: &GcArgs, quiet: bool) -> u8 {
    use crate::storage::object_gc::{collect_all, GcSettings, SystemClock};
    let defaults = GcSettings::default();
    let settings = GcSettings {
        grace: args.gc_grace.unwrap_or(defaults.grace),
        delta: args.gc_delta.unwrap_or(defaults.delta),
        transfer_ttl: args.older_than,
        request_timeout: defaults.request_timeout,
    };
    let ran = crate::storage::object::StoreSettings::from_url(url)
        .and_then(|store| Ok((store.build()?, store.prefix)))
        .map_err(|e| e.to_string())
        .and_then(|(store, prefix)| {
            // A thread of its own: `ferry` may already be inside a runtime here.
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                runtime
                    .block_on(collect_all(&store, &prefix, &settings, &SystemClock))
                    .map_err(|e| e.to_string())
            })
            .join()
            .unwrap_or_else(|_| Err("gc stopped unexpectedly".into()))
        });
    match ran {
        Ok(report) => {
            if args.json {
                outln!(
                    "{}",
                    serde_json::json!({ "status": "ok", "exit_code": 0, "report": report })
                );
            } else if !quiet {
                errln!(
                    "ferry: gc: {} abandoned transfers expired, {} unreferenced chunks deleted ({} freed), {} kept by the grace period",
                    report.transfers_expired,
                    report.chunks_deleted,
                    human(report.bytes_freed),
                    report.chunks_young
                );
            }
            crate::exit::OK
        }
        Err(e) => {
            if args.json {
                outln!(
                    "{}",
                    serde_json::json!({ "status": "error", "exit_code": crate::exit::LOCAL, "error": e })
                );
            }
            errln!("ferry: gc failed: {}", printable(&e));
            crate::exit::LOCAL
        }
    }
}

/// `ferry gc --client`: prunes the client's state under its lock (a running push or pull makes it exit 8).
fn client_gc(args: &GcArgs, quiet: bool) -> u8 {
    let dir = match client_state_dir(args.client_config.as_deref(), args.state.clone()) {
        Ok(dir) => dir,
        Err(e) => {
            if args.json {
                outln!(
                    "{}",
                    serde_json::json!({ "status": "error", "exit_code": crate::exit::USAGE, "error": e.to_string() })
                );
            }
            errln!("ferry: gc: {}", printable(&e.to_string()));
            return crate::exit::USAGE;
        }
    };
    let pruned = StateLock::try_acquire(&dir)
        .map_err(ClientError::from)
        .and_then(|_lock| {
            let store = crate::store::SenderStore::open(&crate::store::Store::open(&dir)?)?;
            let now = crate::store::now_secs();
            Ok(store.prune(args.older_than.as_secs(), now)?)
        });
    match pruned {
        Ok(pruned) => {
            if args.json {
                outln!(
                    "{}",
                    serde_json::json!({ "status": "ok", "exit_code": 0, "state": dir.display().to_string(), "report": pruned })
                );
            } else if !quiet {
                errln!(
                    "ferry: gc: {} finished push records and {} stale cached manifests removed from {}",
                    pruned.records_removed,
                    pruned.manifests_removed,
                    dir.display()
                );
            }
            crate::exit::OK
        }
        Err(e) => {
            let code = e.exit_code();
            // gc has no --wait (it is quick and safe to rerun), so the lock's usual advice does not apply.
            let message = match &e {
                ClientError::Lock(LockError::Held { dir, holder }) => {
                    format!("another ferry run ({holder}) holds {dir}; run gc --client again once it has finished")
                }
                other => other.to_string(),
            };
            if args.json {
                outln!(
                    "{}",
                    serde_json::json!({ "status": "error", "exit_code": code, "error": message })
                );
            }
            errln!("ferry: gc failed: {}", printable(&message));
            code
        }
    }
}

/// The client state directory of a command that goes nowhere (`status`, `gc --client`), resolved like a push's:
/// `--state`, else `$FERRY_STATE`, else the client configuration's `[defaults] state`, else the XDG default.
/// Blocking (reads the configuration file).
pub(crate) fn client_state_dir(
    config: Option<&std::path::Path>,
    state: Option<PathBuf>,
) -> Result<PathBuf, SettingsError> {
    let flags = Profile {
        state,
        ..Profile::default()
    };
    let (_, settings) = crate::settings::resolve_command(Request {
        config,
        flags,
        ..Request::default()
    })?;
    Ok(settings.state_dir)
}

/// `ferry push`.
#[derive(Args, Debug)]
pub struct PushArgs {
    /// The file or directory to send.
    pub file: PathBuf,
    /// ferry://HOST[:PORT]/REMOTE/PATH, or NAME:PATH under a remote of the client configuration (a trailing '/'
    /// keeps the local file name). Several servers of one group: ferry://A[:PORT],B[:PORT]/PATH (tried in order,
    /// the next one when the current fails).
    pub destination: Location,
    /// TCP connections sharing one file's chunks (1-16; default 1): more than one helps on links with high
    /// latency, where one connection is bound by its window or its TCP buffers. Trees use one connection.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(crate::config::MAX_STREAMS)))]
    pub streams: Option<u32>,
    /// Options shared with pull.
    #[command(flatten)]
    pub common: TransferArgs,
}

/// `ferry pull`.
#[derive(Args, Debug)]
pub struct PullArgs {
    /// ferry://HOST[:PORT]/REMOTE/PATH, or NAME:PATH under a remote of the client configuration, of the file or
    /// directory to fetch. Several servers of one group: ferry://A[:PORT],B[:PORT]/PATH.
    pub source: Location,
    /// Local file to write, or an existing directory to write a file into under its remote name; a tree is
    /// written into this directory (created if missing).
    pub destination: PathBuf,
    /// Options shared with push.
    #[command(flatten)]
    pub common: TransferArgs,
}

/// How a client proves who it is and whom it trusts: push, pull and `status --server`.
#[derive(Args, Debug)]
pub struct AccessArgs {
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

impl AccessArgs {
    /// The TLS choice these flags make, if any.
    pub(crate) fn tls(&self) -> Option<TlsChoice> {
        match (&self.tls_fingerprint, &self.tls_ca) {
            (Some(print), _) => Some(TlsChoice::Fingerprint(print.clone())),
            (None, Some(ca)) => Some(TlsChoice::Ca(ca.clone())),
            (None, None) => None,
        }
    }
}

/// Options of both push and pull. Those left out come from the client configuration (the remote's section, then
/// `[defaults]`), else from the built-in defaults in [`crate::settings`].
#[derive(Args, Debug)]
pub struct TransferArgs {
    /// Client configuration file: [defaults] and [remote.NAME] sections (default
    /// $XDG_CONFIG_HOME/ferry/config.toml or ~/.config/ferry/config.toml, which may be missing).
    #[arg(long, env = "FERRY_CONFIG", value_name = "FILE")]
    pub client_config: Option<PathBuf>,
    /// Client state directory (default: the client configuration's `state`, else $XDG_STATE_HOME/ferry or
    /// ~/.local/state/ferry). $FERRY_STATE counts as this flag.
    #[arg(long, env = "FERRY_STATE")]
    pub state: Option<PathBuf>,
    /// How to cut files: content-defined chunks (cdc, the default: only the chunks around an edit change) or
    /// fixed-size.
    #[arg(long, value_enum)]
    pub chunking: Option<ChunkingMode>,
    /// Chunk size (fixed) or target average (cdc; chunks range from a quarter to four times it), e.g. 1MiB, 256K.
    /// Bounded to 4KiB..16MiB (cdc: 16KiB..4MiB). Default 1MiB.
    #[arg(long, value_parser = parse_chunk_size)]
    pub chunk_size: Option<u32>,
    /// Unacknowledged bytes in flight. Default for push: 16MiB, growing to twice the measured bandwidth-delay
    /// product (at most 256MiB); a window set here (or in the configuration) stays as set. Pull: 16MiB, or
    /// 1GiB/s × the handshake's round trip if that is more (at most 64MiB).
    #[arg(long, value_parser = parse_size)]
    pub window: Option<u64>,
    /// Consecutive failed attempts without progress before giving up (default 10).
    #[arg(long)]
    pub retries: Option<u32>,
    /// Give up on a connection when no byte moves for this long (default 30s).
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// First retry delay (doubles per failure, with jitter, up to 15s; default 250ms).
    #[arg(long, value_parser = parse_duration)]
    pub retry_delay: Option<Duration>,
    /// For trees: recreate symlinks whose target stays inside the tree (record), or leave them out (skip, the
    /// default).
    #[arg(long, value_enum)]
    pub links: Option<LinkPolicy>,
    /// Print newline-delimited JSON events on stdout, the summary object last (README, "JSON output"); with -q,
    /// the summary line alone.
    #[arg(long)]
    pub json: bool,
    /// How often --json reports progress (0 for never).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub json_progress: Duration,
    /// Token and TLS.
    #[command(flatten)]
    pub access: AccessArgs,
    /// Cap the run's bandwidth, each way, over all its connections, in bytes per second (e.g. 10MiB, 500K/s).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub bwlimit: Option<u64>,
    /// Stop the whole run after this long, retries and --wait included, with exit code 9 (e.g. 90m, 2h); the next
    /// run resumes.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub max_duration: Option<Duration>,
    /// When another run holds the state directory, wait for it (up to --max-duration) instead of exiting with 8.
    #[arg(long)]
    pub wait: bool,
    /// For trees only: once the tree has landed completely, delete what the destination directory holds beyond
    /// it (files, symlinks and directories under it, never outside it), and list what was deleted. A push needs a
    /// server speaking protocol version 6. Without it, trees are only added to.
    #[arg(long)]
    pub delete: bool,
}

impl TransferArgs {
    /// The command line as the top layer of settings (push adds `streams`).
    fn flags(&self, streams: Option<u32>) -> Profile {
        let tls = self.access.tls();
        Profile {
            state: self.state.clone(),
            window: self.window,
            retries: self.retries,
            timeout: self.timeout,
            retry_delay: self.retry_delay,
            chunking: self.chunking,
            chunk_size: self.chunk_size,
            links: self.links,
            streams,
            token_file: self.access.token_file.clone(),
            tls,
            bwlimit: self.bwlimit,
            max_duration: self.max_duration,
        }
    }

    /// Reads the client configuration and resolves `location` and the settings through the one resolver of
    /// every client command ([`crate::settings::resolve_command`]). Blocking (reads the file).
    fn resolve(&self, location: &Location, streams: Option<u32>) -> Result<(FerryUrl, Settings), SettingsError> {
        let (url, settings) = crate::settings::resolve_command(Request {
            config: self.client_config.as_deref(),
            location: Some(location),
            bare: false,
            flags: self.flags(streams),
        })?;
        let url = url.expect("a location was given, so it resolves to a URL");
        Ok((url, settings))
    }
}

/// `ferry demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Size of the generated file.
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    pub size: u64,
    /// Chunk size.
    #[arg(long, default_value = "1MiB", value_parser = parse_chunk_size)]
    pub chunk_size: u32,
}

/// Runs `ferry push`, printing progress and the summary; returns the exit code.
pub async fn push(args: PushArgs, quiet: bool) -> u8 {
    let common = &args.common;
    let mut job = Job {
        what: "push",
        source: args.file.display().to_string(),
        destination: args.destination.to_string(),
        json: common.json,
        quiet,
        servers: None,
    };
    let (destination, settings, access) = match setup(common, &args.destination, args.streams) {
        Ok(setup) => setup,
        Err(e) => return finish::<PushReport>(&job, Err(e)),
    };
    job.servers = Some(destination.servers.clone());
    if common.delete && !args.file.is_dir() {
        let refused = ClientError::Setup(format!(
            "--delete applies to directory pushes only; {} is not a directory",
            args.file.display()
        ));
        return finish::<PushReport>(&job, Err(refused));
    }
    let deadline = settings.max_duration.map(Deadline::after);
    let _lock = match lock_state(&settings, common.wait, deadline).await {
        Ok(lock) => lock,
        Err(e) => return finish::<PushReport>(&job, Err(e.into())),
    };
    let opts = PushOptions {
        source: args.file.clone(),
        destination,
        state_dir: settings.state_dir.clone(),
        chunking: settings.chunk_spec(),
        retries: settings.retries,
        send: SendOptions {
            window: settings.window,
            size_window: !settings.window_set,
            io_timeout: settings.timeout,
            ..SendOptions::default()
        },
        connect_timeout: settings.connect_timeout(),
        access,
        streams: settings.streams,
        backoff: settings.backoff(),
        links: settings.links,
        bandwidth: settings.bwlimit.map(Bandwidth::new),
        deadline,
        delete: common.delete,
    };
    let output = Output::start_with(
        Mode::pick(common.json, quiet),
        opts.send.meter.clone(),
        "push",
        &args.file.display().to_string(),
        &opts.destination.to_string(),
        common.json_progress,
    );
    let ticker = output.spawn_ticker();
    let mut progress = |event: ClientEvent| output.event(&event);
    if args.file.is_dir() {
        let result = interruptible(crate::client::push_tree(opts, &mut progress)).await;
        stop(ticker).await;
        output.finish();
        finish(&job, result)
    } else {
        let result = interruptible(crate::client::push(opts, &mut progress)).await;
        stop(ticker).await;
        output.finish();
        finish(&job, result)
    }
}

/// Runs `ferry pull`, printing progress and the summary; returns the exit code.
pub async fn pull(args: PullArgs, quiet: bool) -> u8 {
    let common = &args.common;
    let mut job = Job {
        what: "pull",
        source: args.source.to_string(),
        destination: args.destination.display().to_string(),
        json: common.json,
        quiet,
        servers: None,
    };
    let (source, settings, access) = match setup(common, &args.source, None) {
        Ok(setup) => setup,
        Err(e) => return finish::<Pulled>(&job, Err(e)),
    };
    job.servers = Some(source.servers.clone());
    let deadline = settings.max_duration.map(Deadline::after);
    let _lock = match lock_state(&settings, common.wait, deadline).await {
        Ok(lock) => lock,
        Err(e) => return finish::<Pulled>(&job, Err(e.into())),
    };
    let opts = PullOptions {
        source,
        destination: args.destination.clone(),
        state_dir: settings.state_dir.clone(),
        chunking: settings.chunk_spec(),
        window: settings.window,
        size_window: !settings.window_set,
        retries: settings.retries,
        io_timeout: settings.timeout,
        connect_timeout: settings.connect_timeout(),
        access,
        backoff: settings.backoff(),
        links: settings.links,
        meter: Arc::default(),
        bandwidth: settings.bwlimit.map(Bandwidth::new),
        deadline,
        delete: common.delete,
    };
    let output = Output::start_with(
        Mode::pick(common.json, quiet),
        opts.meter.clone(),
        "pull",
        &opts.source.to_string(),
        &args.destination.display().to_string(),
        common.json_progress,
    );
    let ticker = output.spawn_ticker();
    let mut progress = |event: ClientEvent| output.event(&event);
    let result = interruptible(crate::client::pull(opts, &mut progress)).await;
    stop(ticker).await;
    output.finish();
    if common.delete && !quiet && matches!(result, Ok(Pulled::File(_))) {
        errln!("ferry: --delete applies to trees; the pull fetched a file and deleted nothing");
    }
    finish(&job, result)
}

/// The URL, settings and credentials of a push or pull; a bad configuration, location, token or TLS setting is a
/// usage error (exit 2). Blocking (reads small files).
fn setup(
    common: &TransferArgs,
    location: &Location,
    streams: Option<u32>,
) -> Result<(FerryUrl, Settings, crate::client::Access), ClientError> {
    let setup = || {
        let (url, settings) = common.resolve(location, streams)?;
        let access = settings.access()?;
        Ok::<_, SettingsError>((url, settings, access))
    };
    setup().map_err(|e| ClientError::Setup(e.to_string()))
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
fn finish<R: Summary>(job: &Job, result: Result<R, ClientError>) -> u8 {
    match result {
        Ok(report) => {
            if job.json {
                outln!("{}", job.stamp(report.json()));
            } else if !job.quiet {
                report.print();
            }
            report.exit_code()
        }
        Err(e) => {
            let code = e.exit_code();
            if job.json {
                outln!("{}", job.stamp(error_json(&e, code)));
            }
            // The cron recipe (`--json -q … >> log 2>&1`) wants one JSON line per run and nothing else.
            if matches!(e, ClientError::Interrupted) {
                if !job.quiet {
                    errln!("ferry: {} {e}", job.what);
                }
            } else if !(job.json && job.quiet) {
                errln!("ferry: {} failed: {}", job.what, printable(&e.to_string()));
            }
            code
        }
    }
}

/// What a push or pull was asked to do, as given on the command line: the frame of its summary.
struct Job {
    what: &'static str,
    source: String,
    destination: String,
    json: bool,
    quiet: bool,
    /// The servers of the run's URL, once it is resolved: the summary names those used and the moves between them.
    servers: Option<crate::url::Servers>,
}

impl Job {
    /// `summary` marked as the run's summary, with the time it ended and (unless the report already names them
    /// resolved) the source and destination as given, so a log of nightly runs can be matched to dates and jobs.
    fn stamp(&self, mut summary: serde_json::Value) -> serde_json::Value {
        summary["event"] = "summary".into();
        summary["command"] = self.what.into();
        summary["time"] = utc_timestamp(std::time::SystemTime::now()).into();
        if summary.get("source").is_none_or(serde_json::Value::is_null) {
            summary["source"] = self.source.clone().into();
        }
        if summary.get("destination").is_none_or(serde_json::Value::is_null) {
            summary["destination"] = self.destination.clone().into();
        }
        if let Some(servers) = &self.servers {
            let used = servers.used();
            summary["server"] = used.last().map(|_| servers.current().authority()).into();
            summary["servers"] = used.into();
            summary["moves"] = servers.moves().into();
        }
        summary
    }
}

/// `time` as RFC 3339 in UTC with whole seconds (`2026-12-01T23:59:07Z`).
pub fn utc_timestamp(time: std::time::SystemTime) -> String {
    let secs = time.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's days-to-civil, for days since 1970-01-01 (never negative here).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// A command line clap refused (or `--help`/`--version`, which it prints and exits 0). A refused push or pull
/// with `--json` still prints its one JSON summary on stdout (exit 2), so a cron log gets a line for every run;
/// with `-q` too, clap's message is not repeated on stderr. Returns the exit code.
pub fn argument_error(error: clap::Error, args: &[std::ffi::OsString]) -> u8 {
    use clap::error::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = error.print();
        return crate::exit::OK;
    }
    let words: Vec<&str> = args.iter().skip(1).filter_map(|a| a.to_str()).collect();
    let verb = words.iter().find(|w| !w.starts_with('-')).copied();
    let what = match verb {
        Some("push") => "push",
        Some("pull") => "pull",
        _ => "",
    };
    let json = !what.is_empty() && words.contains(&"--json");
    let quiet = words
        .iter()
        .any(|w| *w == "--quiet" || (w.starts_with('-') && !w.starts_with("--") && w.contains('q')));
    if json {
        let kind = error.kind();
        let text = error.render().to_string();
        let first = text.lines().next().unwrap_or_default();
        let message = first.strip_prefix("error: ").unwrap_or(first);
        let job = Job {
            what,
            source: String::new(),
            destination: String::new(),
            json,
            quiet,
            servers: None,
        };
        let mut summary = job.stamp(serde_json::json!({
            "status": "error",
            "exit_code": crate::exit::USAGE,
            "error": message,
            "error_kind": kind.as_str().unwrap_or("usage"),
        }));
        // The arguments were not understood, so there is no source or destination to name.
        summary["source"] = serde_json::Value::Null;
        summary["destination"] = serde_json::Value::Null;
        outln!("{summary}");
    }
    if !(json && quiet) {
        let _ = error.print();
    }
    crate::exit::USAGE
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

fn print_report(report: &PushReport) {
    let what = if report.committed.already_present {
        "already present"
    } else {
        "pushed"
    };
    errln!(
        "ferry: {what}: {} -> {} ({}, sent {}, reused {}, {} attempt(s), {:.2?})",
        printable(&report.source),
        printable(&report.destination),
        human(report.size),
        human(report.sent.bytes_sent),
        human(report.committed.reused_bytes),
        report.attempts,
        report.duration,
    );
    // The digest is the run's result, not a message: stdout (`digest=$(ferry push …)`), like the --json summary.
    outln!("blake3 {}", hex(&report.digest));
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
    errln!(
        "ferry: {what}: {} -> {} ({}, received {}, reused {}, {} attempt(s), {:.2?})",
        printable(&report.source),
        printable(&report.destination),
        human(report.size),
        human(report.bytes_received),
        human(report.committed.reused_bytes),
        report.attempts,
        report.duration,
    );
    // The digest is the run's result, not a message: stdout (`digest=$(ferry push …)`), like the --json summary.
    outln!("blake3 {}", hex(&report.digest));
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
    errln!(
        "ferry: tree {} -> {}: {} files ({}), {} needed, {} committed, {} unchanged; {verb} {}, reused {}; {} attempt(s), {:.2?}",
        printable(&report.source),
        printable(&report.destination),
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
    // Paths and reasons may come from the peer (a pulled tree's entries, a server's TreeFailure reasons).
    for (path, reason) in &report.skipped {
        errln!("ferry: skipped {}: {}", printable(path), printable(reason));
    }
    for (path, reason) in &report.failed {
        errln!("ferry: FAILED {}: {}", printable(path), printable(reason));
    }
    for (path, reason) in &report.refused {
        errln!("ferry: REFUSED {}: {}", printable(path), printable(reason));
    }
    let missing = crate::ranges::ranges_len(&report.committed.missing);
    if missing > 0 {
        errln!("ferry: {missing} entries could not be placed on the receiver");
    }
    if let Some(deletion) = &report.deletion {
        print_deletion(deletion);
    }
}

/// What `--delete` did, one line per deleted entry (paths may come from the peer).
fn print_deletion(deletion: &crate::client::Deletion) {
    if let Some(reason) = &deletion.skipped {
        errln!("ferry: --delete: {}", printable(reason));
    }
    for path in &deletion.removed {
        errln!("ferry: deleted {}", printable(path));
    }
    let unlisted = deletion.total.saturating_sub(deletion.removed.len() as u64);
    if unlisted > 0 {
        errln!("ferry: deleted {unlisted} more entries (too many to list)");
    }
    for (path, reason) in &deletion.failed {
        errln!("ferry: could not delete {}: {}", printable(path), printable(reason));
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
        "refused": pairs(&report.refused),
        "attempts": report.attempts,
        "duration_ms": report.duration.as_millis() as u64,
        "rate_bytes_per_sec": if secs > 0.0 { (report.bytes_transferred as f64 / secs) as u64 } else { 0 },
    });
    let key = if report.pulled { "bytes_received" } else { "bytes_sent" };
    summary[key] = report.bytes_transferred.into();
    summary["deleted"] = match &report.deletion {
        None => serde_json::Value::Null,
        Some(d) => serde_json::json!({
            "paths": d.removed,
            "total": d.total,
            "failed": pairs(&d.failed),
            "skipped": d.skipped,
        }),
    };
    summary
}

fn error_json(error: &ClientError, code: u8) -> serde_json::Value {
    serde_json::json!({ "event": "summary", "status": "error", "exit_code": code, "error": error.to_string() })
}

/// Runs a push or pull until it ends or SIGINT (Ctrl-C) arrives; then it is dropped (what the receiver made
/// durable stays, as after a kill) and the run ends with [`ClientError::Interrupted`] (exit 130) and its summary.
async fn interruptible<R>(work: impl std::future::Future<Output = Result<R, ClientError>>) -> Result<R, ClientError> {
    use tokio::signal::unix::{signal, SignalKind};
    // Registered before the work starts, so a SIGINT from the first moment on is caught.
    let Ok(mut sigint) = signal(SignalKind::interrupt()) else {
        return work.await;
    };
    tokio::select! {
        result = work => result,
        _ = sigint.recv() => Err(ClientError::Interrupted),
    }
}

/// Stops a display's ticker, if it has one, before the summary prints.
async fn stop(ticker: Option<output::Ticker>) {
    if let Some(ticker) = ticker {
        ticker.stop().await;
    }
}

/// `text` safe to print on a terminal: control characters and bidirectional overrides (which a peer could send
/// to move the cursor or disguise a name) become '?'.
pub(crate) fn printable(text: &str) -> String {
    let hostile = |c: char| {
        c.is_control() || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    text.chars().map(|c| if hostile(c) { '?' } else { c }).collect()
}

// The help texts above spell out the built-in defaults.
const _: () = assert!(
    crate::settings::DEFAULT_CHUNK_SIZE == 1 << 20
        && crate::settings::DEFAULT_WINDOW == 16 << 20
        && crate::settings::DEFAULT_RETRIES == 10
        && crate::settings::DEFAULT_TIMEOUT.as_secs() == 30
        && crate::settings::DEFAULT_RETRY_DELAY.as_millis() == 250
        && crate::settings::DEFAULT_STREAMS == 1
);

/// The state directory's lock: at once, or with `--wait` as soon as it is free (until the deadline).
async fn lock_state(settings: &Settings, wait: bool, deadline: Option<Deadline>) -> Result<StateLock, LockError> {
    if wait {
        StateLock::wait(&settings.state_dir, deadline.map(|d| d.at)).await
    } else {
        StateLock::try_acquire(&settings.state_dir)
    }
}

/// A bandwidth: a size per second, with or without a `/s` suffix (`10MiB`, `500K/s`); zero is refused.
fn parse_rate(raw: &str) -> Result<u64, String> {
    let trimmed = raw.trim();
    let size = trimmed.strip_suffix("/s").unwrap_or(trimmed);
    match parse_size(size)? {
        0 => Err("a bandwidth limit must be above zero".to_string()),
        rate => Ok(rate),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_take_an_optional_per_second_suffix() {
        assert_eq!(parse_rate("10MiB"), Ok(10 << 20));
        assert_eq!(parse_rate("500K/s"), Ok(500 << 10));
        assert_eq!(parse_rate("4096"), Ok(4096));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("fast").is_err());
    }

    #[test]
    fn text_from_a_peer_cannot_drive_the_terminal() {
        assert_eq!(printable("ok\u{1b}[2Jdone\r\n"), "ok?[2Jdone??");
        assert_eq!(printable("evil\u{202e}txt.exe"), "evil?txt.exe");
        assert_eq!(printable("naïve ünïcode"), "naïve ünïcode");
    }
}
