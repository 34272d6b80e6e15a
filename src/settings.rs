//! The settings of one push or pull, resolved in one place: a command-line flag, else the remote's section of the
//! client configuration, else its `[defaults]`, else the built-in default (the `DEFAULT_*` constants here).
//!
//! It also resolves where the transfer goes: a `ferry://` URL as given, or `NAME:PATH`, which means `PATH` under
//! the base URL of `[remote.NAME]` and brings that remote's settings along.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use thiserror::Error;

use crate::auth::Token;
use crate::chunk::{ChunkSpec, ChunkingMode};
use crate::client::{Access, Backoff};
use crate::config::{valid_remote_name, ClientFile, ConfigError, Profile, Remote, TlsChoice};
use crate::tls::{ClientTls, Trust};
use crate::tree::LinkPolicy;
use crate::url::{FerryUrl, UrlError};

/// Built-in `--chunking`.
pub const DEFAULT_CHUNKING: ChunkingMode = ChunkingMode::Cdc;
/// Built-in `--chunk-size`.
pub const DEFAULT_CHUNK_SIZE: u32 = crate::DEFAULT_CHUNK_SIZE;
/// Built-in `--window`.
pub const DEFAULT_WINDOW: u64 = crate::DEFAULT_WINDOW;
/// Built-in `--retries`.
pub const DEFAULT_RETRIES: u32 = 10;
/// Built-in `--timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Built-in `--retry-delay`.
pub const DEFAULT_RETRY_DELAY: Duration = Duration::from_millis(250);
/// Built-in `--links`.
pub const DEFAULT_LINKS: LinkPolicy = LinkPolicy::Skip;
/// Built-in `--streams`.
pub const DEFAULT_STREAMS: u32 = 1;
/// Longest connect timeout, whatever `--timeout` says.
pub const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings that cannot be used.
#[derive(Debug, Error)]
pub enum SettingsError {
    /// The client configuration file is unusable, or names no such remote.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The location is neither a URL nor `NAME:PATH`, or the remote path is refused.
    #[error(transparent)]
    Url(#[from] UrlError),
    /// A location that is neither `ferry://…` nor `NAME:PATH`.
    #[error("{0:?} is neither a ferry URL (ferry://HOST[:PORT]/PATH) nor REMOTE:PATH (a [remote.NAME] of the client configuration)")]
    Location(String),
    /// `NAME:` on a remote whose URL has no base path names nothing.
    #[error("{0}: names no remote path (the remote's url has no base path); give {0}PATH")]
    NoPath(String),
    /// The token file is unreadable or malformed.
    #[error("token file {path}: {message}")]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The TLS settings are unusable.
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// No state directory was given and none can be derived from the environment (XDG rules).
    #[error(transparent)]
    StateDir(#[from] crate::config::NoBaseDir),
}

/// Where a push goes or a pull comes from, as written on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// `ferry://HOST[:PORT]/PATH`.
    Url(FerryUrl),
    /// `NAME:PATH`: `PATH` (possibly empty) under the base URL of `[remote.NAME]`.
    Remote {
        /// The remote's name.
        name: String,
        /// The path under its base.
        path: String,
    },
}

impl FromStr for Location {
    type Err = SettingsError;

    fn from_str(raw: &str) -> Result<Self, SettingsError> {
        if raw.starts_with("ferry://") {
            return Ok(Location::Url(raw.parse()?));
        }
        match raw.split_once(':') {
            // `http://…` is a URL of another scheme, not a remote called "http".
            Some((name, path)) if valid_remote_name(name) && !path.starts_with("//") => Ok(Location::Remote {
                name: name.to_string(),
                path: path.to_string(),
            }),
            _ => Err(SettingsError::Location(raw.to_string())),
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Url(url) => url.fmt(f),
            Location::Remote { name, path } => write!(f, "{name}:{path}"),
        }
    }
}

impl Location {
    /// Parses where `ferry status --server` looks: `ferry://HOST[:PORT][/PATH]` (the path may be missing) or
    /// `NAME:[PATH]` under a configured remote.
    pub fn parse_server(raw: &str) -> Result<Location, SettingsError> {
        if raw.starts_with("ferry://") {
            return Ok(Location::Url(FerryUrl::server(raw)?));
        }
        raw.parse()
    }

    /// The URL this location means, and the remote it names (if any).
    pub fn resolve<'a>(&self, file: &'a ClientFile) -> Result<(FerryUrl, Option<&'a Remote>), SettingsError> {
        self.resolve_in(file, false)
    }

    /// Like [`Location::resolve`], but the URL may name no path: a server (and the caller's whole namespace) for
    /// `ferry status --server`, so `NAME:` works for a remote whose url has no base path.
    pub fn resolve_server<'a>(&self, file: &'a ClientFile) -> Result<(FerryUrl, Option<&'a Remote>), SettingsError> {
        self.resolve_in(file, true)
    }

    fn resolve_in<'a>(
        &self,
        file: &'a ClientFile,
        bare: bool,
    ) -> Result<(FerryUrl, Option<&'a Remote>), SettingsError> {
        match self {
            Location::Url(url) => Ok((url.clone(), None)),
            Location::Remote { name, path } => {
                let remote = file.remote(name)?;
                let base = remote.url.path.trim_end_matches('/');
                let joined = match (base.is_empty(), path.is_empty()) {
                    (_, true) => remote.url.path.clone(),
                    (true, false) => path.clone(),
                    (false, false) => format!("{base}/{}", path.trim_start_matches('/')),
                };
                if joined.is_empty() && !bare {
                    return Err(SettingsError::NoPath(format!("{name}:")));
                }
                let url = FerryUrl {
                    path: joined,
                    ..remote.url.clone()
                };
                Ok((url, Some(remote)))
            }
        }
    }
}

/// The concrete settings of one push or pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Client state directory.
    pub state_dir: PathBuf,
    /// Content-defined or fixed-size chunks.
    pub chunking: ChunkingMode,
    /// Chunk size, or the cdc average.
    pub chunk_size: u32,
    /// Unacknowledged bytes in flight (where the window starts, unless `window_set`).
    pub window: u64,
    /// A layer set the window: it stays as set instead of growing to the measured bandwidth-delay product.
    pub window_set: bool,
    /// Consecutive failed attempts without progress before giving up.
    pub retries: u32,
    /// Give up on a connection when no byte moves for this long.
    pub timeout: Duration,
    /// First retry delay.
    pub retry_delay: Duration,
    /// Symlinks in trees.
    pub links: LinkPolicy,
    /// Connections sharing one pushed file (push only).
    pub streams: u32,
    /// The client's token file.
    pub token_file: Option<PathBuf>,
    /// TLS trust; `None`: plain TCP.
    pub tls: Option<TlsChoice>,
    /// Bandwidth cap in bytes per second (`--bwlimit`).
    pub bwlimit: Option<u64>,
    /// Bound on a whole run, retries included (`--max-duration`).
    pub max_duration: Option<Duration>,
}

/// What a client command (push, pull, `status`, `gc --client`) brings to [`resolve_command`].
#[derive(Debug, Default)]
pub struct Request<'a> {
    /// `--client-config` (or `$FERRY_CONFIG`, which clap folds into it): this file must exist.
    pub config: Option<&'a Path>,
    /// Where the command goes, if anywhere.
    pub location: Option<&'a Location>,
    /// The location may name a server without a path (`ferry status --server`).
    pub bare: bool,
    /// The command line's values.
    pub flags: Profile,
}

/// The one settings resolver of every client command: reads the client configuration (`request.config`, else the
/// XDG default, which may be missing), resolves the location (a `NAME:` brings its remote's section), and merges
/// the flags over `$FERRY_STATE` over the remote's section over `[defaults]` over the built-in defaults. Returns
/// the URL (if a location was given) and the settings. Blocking (reads the file).
pub fn resolve_command(request: Request<'_>) -> Result<(Option<FerryUrl>, Settings), SettingsError> {
    let file = ClientFile::locate(request.config)?;
    let (url, remote) = match request.location {
        Some(location) if request.bare => {
            let (url, remote) = location.resolve_server(&file)?;
            (Some(url), remote)
        }
        Some(location) => {
            let (url, remote) = location.resolve(&file)?;
            (Some(url), remote)
        }
        None => (None, None),
    };
    let mut flags = request.flags;
    if flags.state.is_none() {
        flags.state = std::env::var_os("FERRY_STATE")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from);
    }
    let mut no_state_dir = None;
    let settings = resolve(&file, remote, flags, || {
        crate::config::ferry_dir(crate::config::BaseDir::State).unwrap_or_else(|e| {
            no_state_dir = Some(e);
            PathBuf::new()
        })
    });
    match no_state_dir {
        Some(e) => Err(SettingsError::StateDir(e)),
        None => Ok((url, settings)),
    }
}

/// Resolves the settings: `flags` over the remote's section over `[defaults]` over the built-in defaults.
/// `default_state` gives the state directory when no layer does.
pub fn resolve(
    file: &ClientFile,
    remote: Option<&Remote>,
    flags: Profile,
    default_state: impl FnOnce() -> PathBuf,
) -> Settings {
    let below = match remote {
        Some(remote) => remote.profile.clone().over(&file.defaults),
        None => file.defaults.clone(),
    };
    let p = flags.over(&below);
    Settings {
        state_dir: p.state.unwrap_or_else(default_state),
        chunking: p.chunking.unwrap_or(DEFAULT_CHUNKING),
        chunk_size: p.chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE),
        window: p.window.unwrap_or(DEFAULT_WINDOW),
        window_set: p.window.is_some(),
        retries: p.retries.unwrap_or(DEFAULT_RETRIES),
        timeout: p.timeout.unwrap_or(DEFAULT_TIMEOUT),
        retry_delay: p.retry_delay.unwrap_or(DEFAULT_RETRY_DELAY),
        links: p.links.unwrap_or(DEFAULT_LINKS),
        streams: p.streams.unwrap_or(DEFAULT_STREAMS),
        token_file: p.token_file,
        tls: p.tls,
        bwlimit: p.bwlimit,
        max_duration: p.max_duration,
    }
}

impl Settings {
    /// The chunking scheme and size.
    pub fn chunk_spec(&self) -> ChunkSpec {
        ChunkSpec {
            mode: self.chunking,
            size: self.chunk_size,
        }
    }

    /// The retry backoff.
    pub fn backoff(&self) -> Backoff {
        Backoff {
            initial: self.retry_delay,
            ..Backoff::default()
        }
    }

    /// The connect timeout: the I/O timeout, at most [`MAX_CONNECT_TIMEOUT`].
    pub fn connect_timeout(&self) -> Duration {
        self.timeout.min(MAX_CONNECT_TIMEOUT)
    }

    /// The token and TLS settings. Blocking (reads files).
    pub fn access(&self) -> Result<Access, SettingsError> {
        access_for(self.token_file.as_deref(), self.tls.as_ref())
    }
}

/// The token (read from `token_file`) and TLS trust that a connection presents. Blocking (reads files).
pub fn access_for(token_file: Option<&std::path::Path>, tls: Option<&TlsChoice>) -> Result<Access, SettingsError> {
    let token = match token_file {
        Some(path) => {
            let failed = |message: String| SettingsError::TokenFile {
                path: path.to_path_buf(),
                message,
            };
            let text = std::fs::read_to_string(path).map_err(|e| failed(e.to_string()))?;
            crate::auth::warn_if_exposed(path, "token file");
            Some(text.parse::<Token>().map_err(|e| failed(e.to_string()))?)
        }
        None => None,
    };
    let trust = match tls {
        Some(TlsChoice::Fingerprint(print)) => Some(Trust::pinned(print)?),
        Some(TlsChoice::Ca(ca)) => Some(Trust::CaFile(ca.clone())),
        None => None,
    };
    let tls = trust.map(|trust| ClientTls::new(&trust)).transpose()?;
    Ok(Access { token, tls })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
        [defaults]
        state = "/defaults/state"
        retries = 20
        window = "32MiB"
        timeout = "60s"
        chunking = "fixed"
        tls_ca = "/defaults/ca.pem"
        bwlimit = "1MiB"

        [remote.backup]
        url = "ferry://backup.example:9000/nightly/"
        retries = 3
        token_file = "/backup.token"
        tls_fingerprint = "sha256:0000000000000000000000000000000000000000000000000000000000000000"
        max_duration = "1h"

        [remote.root]
        url = "ferry://10.0.0.1"
    "#;

    fn file() -> ClientFile {
        ClientFile::parse(FILE, Path::new("/"), None).unwrap()
    }

    fn settings(location: &str, flags: Profile) -> Settings {
        let file = file();
        let (_, remote) = location.parse::<Location>().unwrap().resolve(&file).unwrap();
        resolve(&file, remote, flags, || PathBuf::from("/builtin/state"))
    }

    #[test]
    fn without_a_file_the_builtin_defaults_apply() {
        let settings = resolve(&ClientFile::default(), None, Profile::default(), || "/s".into());
        assert_eq!(settings.state_dir, PathBuf::from("/s"));
        assert_eq!(
            (settings.chunking, settings.chunk_size),
            (DEFAULT_CHUNKING, DEFAULT_CHUNK_SIZE)
        );
        assert_eq!((settings.window, settings.retries), (DEFAULT_WINDOW, DEFAULT_RETRIES));
        assert_eq!(
            (settings.timeout, settings.retry_delay),
            (DEFAULT_TIMEOUT, DEFAULT_RETRY_DELAY)
        );
        assert_eq!((settings.links, settings.streams), (DEFAULT_LINKS, DEFAULT_STREAMS));
        assert_eq!((settings.token_file, settings.tls), (None, None));
        assert_eq!((settings.bwlimit, settings.max_duration), (None, None));
    }

    #[test]
    fn defaults_apply_to_plain_urls() {
        let s = settings("ferry://h/x", Profile::default());
        assert_eq!(s.state_dir, PathBuf::from("/defaults/state"));
        assert_eq!((s.retries, s.window), (20, 32 << 20));
        assert_eq!(s.tls, Some(TlsChoice::Ca("/defaults/ca.pem".into())));
        assert_eq!((s.bwlimit, s.max_duration), (Some(1 << 20), None));
        // Unset everywhere: built in.
        assert_eq!(s.retry_delay, DEFAULT_RETRY_DELAY);
    }

    #[test]
    fn the_remote_overrides_the_defaults() {
        let s = settings("backup:x", Profile::default());
        assert_eq!(s.retries, 3);
        assert_eq!(s.token_file, Some(PathBuf::from("/backup.token")));
        assert!(
            matches!(s.tls, Some(TlsChoice::Fingerprint(_))),
            "the remote's trust replaces the CA"
        );
        assert_eq!(s.max_duration, Some(Duration::from_secs(3600)));
        // Not in the remote's section: from [defaults].
        assert_eq!((s.window, s.chunking), (32 << 20, ChunkingMode::Fixed));
        assert_eq!(s.bwlimit, Some(1 << 20));
    }

    #[test]
    fn flags_override_everything() {
        let flags = Profile {
            state: Some("/flag/state".into()),
            retries: Some(1),
            tls: Some(TlsChoice::Ca("/flag/ca.pem".into())),
            chunking: Some(ChunkingMode::Cdc),
            ..Profile::default()
        };
        let s = settings("backup:x", flags);
        assert_eq!(s.state_dir, PathBuf::from("/flag/state"));
        assert_eq!((s.retries, s.chunking), (1, ChunkingMode::Cdc));
        assert_eq!(s.tls, Some(TlsChoice::Ca("/flag/ca.pem".into())));
        assert_eq!(s.timeout, Duration::from_secs(60));
    }

    #[test]
    fn remote_locations_resolve_under_the_base() {
        let file = file();
        let url = |raw: &str| {
            raw.parse::<Location>()
                .unwrap()
                .resolve(&file)
                .map(|(url, _)| url.to_string())
        };
        assert_eq!(
            url("backup:images/").unwrap(),
            "ferry://backup.example:9000/nightly/images/"
        );
        assert_eq!(url("backup:/a/b").unwrap(), "ferry://backup.example:9000/nightly/a/b");
        assert_eq!(url("backup:").unwrap(), "ferry://backup.example:9000/nightly/");
        assert_eq!(url("root:x").unwrap(), "ferry://10.0.0.1:7878/x");
        assert!(matches!(url("root:"), Err(SettingsError::NoPath(_))));
        assert!(matches!(
            url("nope:x"),
            Err(SettingsError::Config(ConfigError::UnknownRemote { .. }))
        ));
        assert_eq!(url("ferry://h:1/p").unwrap(), "ferry://h:1/p");
        for bad in ["", "plain", "a b:x", "/tmp/x:y", "http://h/x"] {
            assert!(bad.parse::<Location>().is_err(), "{bad}");
        }
    }
}
