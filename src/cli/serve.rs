//! `ferry serve` (flags merged over the configuration file; `--print-config` shows the result), and the two
//! commands that make credentials: `ferry keygen` (a self-signed TLS certificate) and `ferry token` (a client token
//! and its config entry).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::Token;
use crate::config::{EffectiveServer, ServerFile};
use crate::exit;
use crate::server::{Server, ServerConfig, ServerError};
use crate::storage::object::StoreSettings;
use crate::tls::{keygen as make_certificate, ServerTls};
use crate::units::{parse_duration, parse_size};

/// Default listen address.
const DEFAULT_LISTEN: &str = "127.0.0.1:7878";

/// `ferry serve`. Every flag overrides the configuration file.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// TOML configuration: listen, root, limits, TLS and clients (README, "Server configuration").
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address to listen on (default 127.0.0.1:7878; port 0 picks a free port, printed on stdout).
    #[arg(long)]
    pub listen: Option<String>,
    /// Directory that receives the files.
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// State directory (default ROOT/.ferry/state).
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Keep received files in an S3 bucket (AWS S3, Garage, MinIO): s3://BUCKET[/PREFIX]. Credentials, endpoint
    /// and region from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_REGION, AWS_ALLOW_HTTP (or
    /// `[store]` in the configuration file). Needs --state (a cache; the bucket is the truth).
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
    /// Test knob: the gc grace period rule R assumes with --store (default 1 day), to match `ferry gc --gc-grace`.
    #[arg(long, hide = true, value_parser = crate::units::parse_duration)]
    pub gc_grace: Option<std::time::Duration>,
    /// Test knob: rule C's wait with --store, δ + gc's request timeout (default 35 s), to match `ferry gc
    /// --gc-delta` against a local store.
    #[arg(long, hide = true, value_parser = crate::units::parse_duration)]
    pub gc_confirm_wait: Option<std::time::Duration>,
    /// Listen on a non-loopback address although no client tokens are configured (anyone may push and pull).
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// TLS certificate chain (PEM); with --tls-key the server speaks only TLS.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Maximum concurrent connections (default 256).
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Maximum concurrent connections of one client (by token, or by address when anonymous; default 64).
    #[arg(long)]
    pub max_connections_per_client: Option<usize>,
    /// Maximum connections still in their handshake, apart from --max-connections (default 64; a newcomer beyond
    /// it evicts the oldest of the address that has the most).
    #[arg(long)]
    pub max_preauth_connections: Option<usize>,
    /// Maximum connections in their handshake from one source address (default 8; more are closed at once).
    #[arg(long)]
    pub max_preauth_per_address: Option<usize>,
    /// Bytes of large frames all connections together may be receiving at once (default 32MiB).
    #[arg(long, value_parser = parse_size)]
    pub frame_budget: Option<u64>,
    /// Minimum average rate of a frame once it started, in bytes per second, after a grace of the idle timeout
    /// (at most 10s); 0 disables it (default 16KiB).
    #[arg(long, value_parser = parse_size)]
    pub min_frame_rate: Option<u64>,
    /// Drop a client silent for this long (default 120s).
    #[arg(long, value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// Time a client has for the TLS handshake and the ferry handshake together (default 10s).
    #[arg(long, value_parser = parse_duration)]
    pub handshake_timeout: Option<Duration>,
    /// Refuse files larger than this (e.g. 100GiB); unlimited by default.
    #[arg(long, value_parser = parse_size)]
    pub max_file_size: Option<u64>,
    /// Most open (uncommitted) transfers per namespace; an offer for another path gets TooManyTransfers (default
    /// 1024).
    #[arg(long)]
    pub max_open_transfers: Option<u64>,
    /// Most bytes the manifests of a namespace's open transfers may take in the state store (default 32MiB).
    #[arg(long, value_parser = parse_size)]
    pub max_manifest_bytes: Option<u64>,
    /// Most entries (files, directories, symlinks) per namespace; what goes beyond is refused with QuotaExceeded
    /// (default 1000000).
    #[arg(long)]
    pub max_namespace_entries: Option<u64>,
    /// Most entries in one pushed tree; a larger tree is refused with BadManifest (default and maximum 200000).
    #[arg(long)]
    pub max_tree_entries: Option<usize>,
    /// Expire open transfers (and their partial files) that made no progress for this long (default 7d).
    #[arg(long, value_parser = parse_duration)]
    pub partial_ttl: Option<Duration>,
    /// How often to sweep for expired transfers and leftover files (default 1h).
    #[arg(long, value_parser = parse_duration)]
    pub gc_interval: Option<Duration>,
    /// Print the effective configuration (defaults, then --config, then flags) as TOML on stdout and exit without
    /// listening. Client secrets are hidden.
    #[arg(long)]
    pub print_config: bool,
}

/// Why `ferry serve` did not run.
enum ServeFailure {
    /// The configuration or command line is unusable.
    Usage(String),
    /// The server failed.
    Server(ServerError),
}

impl From<ServerError> for ServeFailure {
    fn from(e: ServerError) -> Self {
        match e {
            ServerError::Config(message) => ServeFailure::Usage(message),
            other => ServeFailure::Server(other),
        }
    }
}

/// Runs `ferry serve` until SIGINT or SIGTERM; returns the exit code.
pub async fn serve(args: ServeArgs) -> u8 {
    match run(args).await {
        Ok(()) => exit::OK,
        Err(ServeFailure::Usage(message)) => {
            errln!("ferry: serve: {message}");
            exit::USAGE
        }
        Err(ServeFailure::Server(e)) => {
            errln!("ferry: serve: {e}");
            exit::INTERNAL
        }
    }
}

async fn run(args: ServeArgs) -> Result<(), ServeFailure> {
    // A write past a file-size limit (RLIMIT_FSIZE) must fail with EFBIG, reported to the client as NoSpace, not
    // kill the server with SIGXFSZ.
    // SAFETY: installs the "ignore" disposition for one signal; no handler code runs.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let insecure_flag = args.insecure_no_auth;
    let file = match &args.config {
        Some(path) => ServerFile::load(path).map_err(|e| ServeFailure::Usage(e.to_string()))?,
        None => ServerFile::default(),
    };
    let print = args.print_config;
    let (config, listen, tls_files) = settings(args, &file)?;
    if print {
        let effective = EffectiveServer {
            config: &config,
            listen: &listen,
            insecure_no_auth: file.insecure_no_auth || insecure_flag,
            tls: tls_files.as_ref().map(|(cert, key)| (cert.as_path(), key.as_path())),
        };
        let mut stdout = std::io::stdout().lock();
        return stdout
            .write_all(effective.to_toml().as_bytes())
            .and_then(|()| stdout.flush())
            .map_err(|e| ServeFailure::Server(ServerError::Accept(e)));
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(&listen)
        .await
        .map_err(|e| ServeFailure::Usage(format!("--listen {listen}: {e}")))?
        .collect();
    // A listen address that cannot be bound (in use, not on this host, a privileged port) is a settings problem,
    // not an internal error: exit 2 with the address named.
    let listener = TcpListener::bind(addrs.as_slice())
        .await
        .map_err(|e| ServeFailure::Usage(bind_failure(&listen, &e)))?;
    let addr = listener.local_addr().map_err(ServerError::Accept)?;
    let tls = config.tls.as_ref().map(|t| t.fingerprint.clone());
    let clients = config.clients.len();
    let server = tokio::task::spawn_blocking(move || Server::open(config))
        .await
        .map_err(|e| ServerError::Accept(std::io::Error::other(e)))??;
    // Before the banner: a SIGTERM sent as soon as the server says it is listening must shut it down, not kill it.
    let signals = ShutdownSignals::install();
    // One write, errors ignored: whoever started the server may stop reading stdout after the first line, and a
    // closed pipe must not take the server down.
    let mut banner = format!("ferry: listening on {addr}\n");
    if let Some(fingerprint) = tls {
        banner.push_str(&format!("ferry: TLS certificate {fingerprint}\n"));
    }
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(banner.as_bytes()).and_then(|()| stdout.flush());
    drop(stdout);
    tracing::info!(%addr, clients, "serving");
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        signals.wait().await;
        tracing::info!("shutting down");
        signal.cancel();
    });
    Ok(server.run(listener, shutdown).await?)
}

/// The certificate and key files of a TLS server.
type TlsFiles = Option<(PathBuf, PathBuf)>;

/// The effective server settings, listen address and TLS files: defaults, then the file, then the flags. Refuses
/// to expose a server without clients beyond loopback unless told to.
fn settings(args: ServeArgs, file: &ServerFile) -> Result<(ServerConfig, String, TlsFiles), ServeFailure> {
    let mut store = store_settings(args.store.as_deref(), file)?;
    if let (Some(store), Some(grace)) = (store.as_mut(), args.gc_grace) {
        store.gc_grace = grace;
    }
    if let (Some(store), Some(wait)) = (store.as_mut(), args.gc_confirm_wait) {
        store.gc_confirm_wait = wait;
    }
    let state = args.state.clone().or(file.state.clone());
    let root = match (args.root.clone().or(file.root.clone()), &store, &state) {
        (Some(root), _, _) => root,
        // On an object store the root only holds what is not stored in the bucket yet (tree receptions).
        (None, Some(_), Some(state)) => state.join("root"),
        (None, Some(_), None) => {
            return Err(ServeFailure::Usage(
                "--store needs a state directory: give --state DIR (a cache; the bucket is the truth)".into(),
            ))
        }
        (None, None, _) => {
            return Err(ServeFailure::Usage(
                "no root directory: give --root DIR or `root` in the configuration file".into(),
            ))
        }
    };
    let mut config = ServerConfig::new(root);
    file.apply(&mut config).map_err(ServeFailure::Usage)?;
    config.object_store = store;
    config.state_dir = args.state.or(config.state_dir);
    config.max_connections = args.max_connections.unwrap_or(config.max_connections);
    config.max_connections_per_client = args
        .max_connections_per_client
        .unwrap_or(config.max_connections_per_client);
    config.max_preauth_connections = args.max_preauth_connections.unwrap_or(config.max_preauth_connections);
    config.max_preauth_per_address = args.max_preauth_per_address.unwrap_or(config.max_preauth_per_address);
    config.frame_budget = args.frame_budget.unwrap_or(config.frame_budget);
    config.min_frame_rate = args.min_frame_rate.unwrap_or(config.min_frame_rate);
    config.idle_timeout = args.idle_timeout.unwrap_or(config.idle_timeout);
    config.handshake_timeout = args.handshake_timeout.unwrap_or(config.handshake_timeout);
    config.max_file_size = args.max_file_size.unwrap_or(config.max_file_size);
    let limits = &mut config.namespace_limits;
    limits.max_open_transfers = args.max_open_transfers.unwrap_or(limits.max_open_transfers);
    limits.max_manifest_bytes = args.max_manifest_bytes.unwrap_or(limits.max_manifest_bytes);
    limits.max_entries = args.max_namespace_entries.unwrap_or(limits.max_entries);
    limits.max_tree_entries = args.max_tree_entries.unwrap_or(limits.max_tree_entries);
    config.partial_ttl = args.partial_ttl.unwrap_or(config.partial_ttl);
    config.gc_interval = args.gc_interval.unwrap_or(config.gc_interval);
    let tls_files = match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        _ => file.tls.clone(),
    };
    if let Some((cert, key)) = &tls_files {
        config.tls = Some(ServerTls::load(cert, key).map_err(|e| ServeFailure::Usage(e.to_string()))?);
    }
    let listen = args
        .listen
        .or(file.listen.clone())
        .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
    check_listen_port(&listen).map_err(ServeFailure::Usage)?;
    let insecure = args.insecure_no_auth || file.insecure_no_auth;
    if config.clients.is_empty() && !insecure && !is_loopback(&listen) {
        return Err(ServeFailure::Usage(format!(
            "refusing to listen on {listen} without client tokens: anyone could push and pull. Configure \
             [[client]] entries (see `ferry token`), listen on loopback, or pass --insecure-no-auth"
        )));
    }
    Ok((config, listen, tls_files))
}

/// The object store of `--store URL` (over the `[store]` section's other settings) or of `[store]`, if any.
fn store_settings(flag: Option<&str>, file: &ServerFile) -> Result<Option<StoreSettings>, ServeFailure> {
    let Some(url) = flag else {
        return Ok(file.store.clone());
    };
    let mut settings = StoreSettings::from_url(url).map_err(|e| ServeFailure::Usage(format!("--store: {e}")))?;
    if let Some(from_file) = &file.store {
        settings = StoreSettings {
            bucket: settings.bucket,
            prefix: settings.prefix,
            ..from_file.clone()
        };
    }
    Ok(Some(settings))
}

/// Why `listen` could not be bound, in words a user can act on.
fn bind_failure(listen: &str, e: &std::io::Error) -> String {
    let hint = match e.kind() {
        std::io::ErrorKind::AddrInUse => " (another server is listening there; stop it or choose another port)",
        std::io::ErrorKind::AddrNotAvailable => " (no interface of this host has that address)",
        std::io::ErrorKind::PermissionDenied => " (ports below 1024 need privileges)",
        _ => "",
    };
    format!("cannot listen on {listen}: {e}{hint}")
}

/// Refuses a listen address without a usable port (`127.0.0.1`, `[::1]`, `host:99999`), naming that problem
/// rather than letting a later check misread it.
fn check_listen_port(listen: &str) -> Result<(), String> {
    if listen.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let bare = listen.trim_start_matches('[').trim_end_matches(']');
    let port = if bare.parse::<std::net::IpAddr>().is_ok() {
        None
    } else {
        listen.rsplit_once(':').map(|(_, port)| port)
    };
    match port {
        None => Err(format!(
            "listen address {listen} has no port: write HOST:PORT (e.g. {DEFAULT_LISTEN}, [::1]:7878)"
        )),
        Some(port) => match port.parse::<u16>() {
            Ok(_) => Ok(()),
            Err(_) => Err(format!(
                "listen address {listen}: port {port} is out of range (a port is a number from 0 to 65535)"
            )),
        },
    }
}

/// Whether `listen` names only loopback addresses (`127.0.0.0/8`, `::1`, `localhost`).
fn is_loopback(listen: &str) -> bool {
    if let Ok(addr) = listen.parse::<SocketAddr>() {
        return addr.ip().is_loopback();
    }
    let host = listen.rsplit_once(':').map_or(listen, |(host, _)| host);
    host.eq_ignore_ascii_case("localhost")
}

/// SIGTERM and SIGINT, registered when created: a signal that arrives before anything waits for it is kept, not
/// left to its default action (which would end the process without a shutdown).
struct ShutdownSignals {
    term: Option<tokio::signal::unix::Signal>,
    interrupt: Option<tokio::signal::unix::Signal>,
}

impl ShutdownSignals {
    /// Registers both signals now (a registration that fails leaves that signal to its default action).
    fn install() -> ShutdownSignals {
        use tokio::signal::unix::{signal, SignalKind};
        ShutdownSignals {
            term: signal(SignalKind::terminate()).ok(),
            interrupt: signal(SignalKind::interrupt()).ok(),
        }
    }

    /// Waits for the first of them.
    async fn wait(mut self) {
        async fn received(signal: Option<&mut tokio::signal::unix::Signal>) {
            match signal {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        }
        tokio::select! {
            () = received(self.term.as_mut()) => {}
            () = received(self.interrupt.as_mut()) => {}
        }
    }
}

/// `ferry keygen`.
#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// Where to write the certificate (PEM).
    #[arg(long)]
    pub cert: PathBuf,
    /// Where to write the private key (PEM, mode 0600).
    #[arg(long)]
    pub key: PathBuf,
    /// DNS names or IP addresses the certificate is for (repeatable).
    #[arg(long = "name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()])]
    pub names: Vec<String>,
}

/// Makes a self-signed certificate and prints its fingerprint for clients to pin; returns the exit code.
pub fn keygen(args: KeygenArgs) -> u8 {
    let made = make_certificate(&args.names)
        .map_err(|e| e.to_string())
        .and_then(|(cert, key, print)| {
            write_new(&args.key, key.as_bytes(), 0o600)?;
            write_new(&args.cert, cert.as_bytes(), 0o644)?;
            Ok(print)
        });
    match made {
        Ok(fingerprint) => {
            outln!("{fingerprint}");
            errln!(
                "ferry: wrote {} and {}; clients connect with --tls-fingerprint {fingerprint}",
                args.cert.display(),
                args.key.display()
            );
            exit::OK
        }
        Err(e) => {
            errln!("ferry: keygen: {e}");
            exit::LOCAL
        }
    }
}

/// `ferry token`.
#[derive(Args, Debug)]
pub struct TokenArgs {
    /// The client id (A-Z, a-z, 0-9, '.', '_', '-'; at most 64).
    pub id: String,
    /// The namespace directory to put in the printed [[client]] entry (default: the id).
    #[arg(long)]
    pub namespace: Option<String>,
    /// Write the token (ID:SECRET) to this file (mode 0600) instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Makes a client token: prints the server's `[[client]]` entry and the client's token line.
pub fn token(args: TokenArgs) -> u8 {
    let token = match Token::generate(&args.id) {
        Ok(token) => token,
        Err(e) => {
            errln!("ferry: token: {e}");
            return exit::USAGE;
        }
    };
    let namespace = args.namespace.unwrap_or_else(|| args.id.clone());
    let entry = format!(
        "[[client]]\nid = \"{}\"\nsecret = \"{}\"\nnamespace = \"{namespace}\"\npermissions = [\"push\", \"pull\"]\n",
        token.id,
        token.secret_hex()
    );
    match &args.out {
        Some(path) => {
            if let Err(e) = write_new(path, format!("{token}\n").as_bytes(), 0o600) {
                errln!("ferry: token: {e}");
                return exit::LOCAL;
            }
            errln!("ferry: wrote the client's token to {}", path.display());
        }
        None => outln!("# the client's token file (ferry push --token-file FILE):\n{token}\n"),
    }
    outln!("# add to the server's configuration:\n{entry}");
    exit::OK
}

/// Writes a new file with `mode`, refusing to overwrite one.
fn write_new(path: &std::path::Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    file.write_all(bytes).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listen_address_without_a_port_is_named_as_such() {
        for ok in ["127.0.0.1:7878", "[::1]:0", "localhost:7000", "0.0.0.0:1"] {
            assert_eq!(check_listen_port(ok), Ok(()), "{ok}");
        }
        for no_port in ["127.0.0.1", "::1", "[::1]", "localhost", "0.0.0.0"] {
            let err = check_listen_port(no_port).unwrap_err();
            assert!(err.contains("has no port"), "{no_port}: {err}");
        }
        let err = check_listen_port("127.0.0.1:99999").unwrap_err();
        assert!(err.contains("port 99999 is out of range"), "{err}");
    }

    #[test]
    fn loopback_addresses_are_recognised() {
        for yes in ["127.0.0.1:7878", "127.1.2.3:0", "[::1]:7878", "localhost:7878"] {
            assert!(is_loopback(yes), "{yes}");
        }
        for no in ["0.0.0.0:7878", "[::]:7878", "10.0.0.1:7878", "example.com:7878"] {
            assert!(!is_loopback(no), "{no}");
        }
    }
}
