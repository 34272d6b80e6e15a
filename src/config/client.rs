//! The client's TOML configuration file: `[defaults]` for every push and pull, and `[remote.NAME]` sections that
//! name a server (`ferry push FILE NAME:PATH`) and override the defaults for it.
//!
//! Where it is: `--client-config FILE` or `$FERRY_CONFIG` (must exist), else `$XDG_CONFIG_HOME/ferry/config.toml`,
//! else `~/.config/ferry/config.toml` (may be missing). Unknown keys are errors, like in the server's file; every
//! value is checked while the file is read, so a typo is reported before anything connects. Paths may start with
//! `~/`; relative paths are relative to the file's directory. [`crate::settings`] merges the layers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::ValueEnum;
use serde::Deserialize;

use super::{ConfigError, Size};
use crate::chunk::ChunkingMode;
use crate::tls::Trust;
use crate::tree::LinkPolicy;
use crate::units::{parse_chunk_size, parse_duration};
use crate::url::FerryUrl;

/// The most connections `--streams` / `streams` may ask for.
pub const MAX_STREAMS: u32 = 16;

/// One section as written: `[defaults]` or `[remote.NAME]` (only a remote has a `url`).
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct Section {
    url: Option<String>,
    state: Option<PathBuf>,
    window: Option<Size>,
    retries: Option<u32>,
    timeout: Option<String>,
    retry_delay: Option<String>,
    chunking: Option<String>,
    chunk_size: Option<Size>,
    links: Option<String>,
    streams: Option<u32>,
    token_file: Option<PathBuf>,
    tls_fingerprint: Option<String>,
    tls_ca: Option<PathBuf>,
    bwlimit: Option<Size>,
    max_duration: Option<String>,
}

/// The file as written.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    defaults: Section,
    #[serde(default)]
    remote: BTreeMap<String, Section>,
}

/// How the client checks a TLS server: one choice, so a layer that names one replaces the other below it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsChoice {
    /// Pin the certificate with this fingerprint (`sha256:HEX`).
    Fingerprint(String),
    /// Trust certificates issued by a CA in this PEM file.
    Ca(PathBuf),
}

/// One layer of client settings (a section of the file, or the command line): every value optional, each already
/// checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Profile {
    /// Client state directory.
    pub state: Option<PathBuf>,
    /// Unacknowledged bytes in flight.
    pub window: Option<u64>,
    /// Consecutive failed attempts without progress before giving up.
    pub retries: Option<u32>,
    /// Give up on a connection when no byte moves for this long.
    pub timeout: Option<Duration>,
    /// First retry delay.
    pub retry_delay: Option<Duration>,
    /// Content-defined or fixed-size chunks.
    pub chunking: Option<ChunkingMode>,
    /// Chunk size, or the cdc average.
    pub chunk_size: Option<u32>,
    /// Symlinks in trees.
    pub links: Option<LinkPolicy>,
    /// Connections sharing one pushed file.
    pub streams: Option<u32>,
    /// The client's token file.
    pub token_file: Option<PathBuf>,
    /// TLS trust.
    pub tls: Option<TlsChoice>,
    /// Bandwidth cap in bytes per second.
    pub bwlimit: Option<u64>,
    /// Bound on a whole run.
    pub max_duration: Option<Duration>,
}

impl Profile {
    /// This layer over `lower`: each value from `self` if set, else from `lower`.
    pub fn over(self, lower: &Profile) -> Profile {
        let lower = lower.clone();
        Profile {
            state: self.state.or(lower.state),
            window: self.window.or(lower.window),
            retries: self.retries.or(lower.retries),
            timeout: self.timeout.or(lower.timeout),
            retry_delay: self.retry_delay.or(lower.retry_delay),
            chunking: self.chunking.or(lower.chunking),
            chunk_size: self.chunk_size.or(lower.chunk_size),
            links: self.links.or(lower.links),
            streams: self.streams.or(lower.streams),
            token_file: self.token_file.or(lower.token_file),
            tls: self.tls.or(lower.tls),
            bwlimit: self.bwlimit.or(lower.bwlimit),
            max_duration: self.max_duration.or(lower.max_duration),
        }
    }
}

/// A named server: `NAME:PATH` on the command line means `PATH` under [`Remote::url`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    /// The server and the base path under which `NAME:PATH` paths go (may be empty).
    pub url: FerryUrl,
    /// Settings for this server, over `[defaults]`.
    pub profile: Profile,
}

/// A parsed client configuration file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientFile {
    /// Where it was read from (`None`: no file, built-in defaults only).
    pub path: Option<PathBuf>,
    /// `[defaults]`.
    pub defaults: Profile,
    /// `[remote.NAME]` sections by name.
    pub remotes: BTreeMap<String, Remote>,
}

impl ClientFile {
    /// Finds and reads the file: `explicit` (from `--client-config` or `$FERRY_CONFIG`) must exist; the default
    /// location may be missing, which gives an empty file. Blocking.
    pub fn locate(explicit: Option<&Path>) -> Result<ClientFile, ConfigError> {
        if let Some(path) = explicit {
            return ClientFile::load(path);
        }
        let Some(path) = default_path() else {
            return Ok(ClientFile::default());
        };
        match std::fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ClientFile::default()),
            _ => ClientFile::load(&path),
        }
    }

    /// Reads and checks `path`. Blocking.
    pub fn load(path: &Path) -> Result<ClientFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut file = ClientFile::parse(&text, base, home().as_deref()).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        file.path = Some(path.to_path_buf());
        Ok(file)
    }

    /// Parses the text of a file whose relative paths are relative to `base` and whose `~/` means `home`.
    pub fn parse(text: &str, base: &Path, home: Option<&Path>) -> Result<ClientFile, String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        let paths = Paths { base, home };
        if file.defaults.url.is_some() {
            return Err("defaults.url: a url belongs in a [remote.NAME] section".into());
        }
        let defaults = profile(&file.defaults, &paths).map_err(|e| format!("defaults.{e}"))?;
        let mut remotes = BTreeMap::new();
        for (name, section) in &file.remote {
            let context = |e: String| format!("remote.{name}.{e}");
            if !valid_remote_name(name) {
                return Err(format!(
                    "remote {name:?}: a remote name uses only A-Z, a-z, 0-9, '.', '_' and '-'"
                ));
            }
            let raw_url = section.url.as_deref().ok_or_else(|| context("url: missing".into()))?;
            let url = FerryUrl::parse_base(raw_url).map_err(|e| context(format!("url: {e}")))?;
            let profile = profile(section, &paths).map_err(context)?;
            remotes.insert(name.clone(), Remote { url, profile });
        }
        Ok(ClientFile {
            path: None,
            defaults,
            remotes,
        })
    }

    /// The remote called `name`.
    pub fn remote(&self, name: &str) -> Result<&Remote, ConfigError> {
        self.remotes.get(name).ok_or_else(|| ConfigError::UnknownRemote {
            name: name.to_string(),
            file: self.path.clone(),
        })
    }
}

/// Whether `name` may name a remote (and so be told apart from a URL scheme or a path).
pub fn valid_remote_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// `$XDG_CONFIG_HOME/ferry/config.toml`, else `~/.config/ferry/config.toml` (`None` without a usable one: the file
/// is optional). An empty or relative `$XDG_CONFIG_HOME` is ignored, as the XDG base directory specification says
/// (`config::xdg`).
pub fn default_path() -> Option<PathBuf> {
    super::xdg::ferry_dir(super::xdg::BaseDir::Config)
        .ok()
        .map(|dir| dir.join("config.toml"))
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME").filter(|h| !h.is_empty()).map(PathBuf::from)
}

/// How paths in the file are made absolute.
struct Paths<'a> {
    base: &'a Path,
    home: Option<&'a Path>,
}

impl Paths<'_> {
    fn resolve(&self, path: &Path, key: &str) -> Result<PathBuf, String> {
        match path.strip_prefix("~") {
            Ok(rest) => {
                let home = self.home.ok_or_else(|| format!("{key}: ~ used but $HOME is not set"))?;
                Ok(home.join(rest))
            }
            Err(_) => Ok(self.base.join(path)),
        }
    }
}

/// Checks one section's values; an error names the key.
fn profile(section: &Section, paths: &Paths) -> Result<Profile, String> {
    let duration = |raw: &Option<String>, key: &str| {
        raw.as_deref()
            .map(|r| parse_duration(r).map_err(|e| format!("{key}: {e}")))
            .transpose()
    };
    let size = |raw: &Option<Size>, key: &str| {
        raw.as_ref()
            .map(|s| s.bytes().map_err(|e| format!("{key}: {e}")))
            .transpose()
    };
    let path = |raw: &Option<PathBuf>, key: &str| raw.as_deref().map(|p| paths.resolve(p, key)).transpose();
    let chunk_size = section
        .chunk_size
        .as_ref()
        .map(|size| {
            let text = match size {
                Size::Bytes(n) => n.to_string(),
                Size::Text(text) => text.clone(),
            };
            parse_chunk_size(&text).map_err(|e| format!("chunk_size: {e}"))
        })
        .transpose()?;
    if let Some(streams) = section.streams {
        if !(1..=MAX_STREAMS).contains(&streams) {
            return Err(format!("streams: must be between 1 and {MAX_STREAMS}, got {streams}"));
        }
    }
    let tls = match (&section.tls_fingerprint, &section.tls_ca) {
        (Some(_), Some(_)) => return Err("tls_fingerprint: give tls_fingerprint or tls_ca, not both".into()),
        (Some(print), None) => {
            Trust::pinned(print).map_err(|e| format!("tls_fingerprint: {e}"))?;
            Some(TlsChoice::Fingerprint(print.clone()))
        }
        (None, Some(ca)) => Some(TlsChoice::Ca(paths.resolve(ca, "tls_ca")?)),
        (None, None) => None,
    };
    Ok(Profile {
        state: path(&section.state, "state")?,
        window: size(&section.window, "window")?,
        retries: section.retries,
        timeout: duration(&section.timeout, "timeout")?,
        retry_delay: duration(&section.retry_delay, "retry_delay")?,
        chunking: choice::<ChunkingMode>(&section.chunking, "chunking")?,
        chunk_size,
        links: choice::<LinkPolicy>(&section.links, "links")?,
        streams: section.streams,
        token_file: path(&section.token_file, "token_file")?,
        tls,
        bwlimit: size(&section.bwlimit, "bwlimit")?,
        max_duration: duration(&section.max_duration, "max_duration")?,
    })
}

/// A value spelled as on the command line (`cdc`, `record`).
fn choice<T: ValueEnum>(raw: &Option<String>, key: &str) -> Result<Option<T>, String> {
    raw.as_deref()
        .map(|r| {
            T::from_str(r, false).map_err(|_| {
                let names: Vec<String> = T::value_variants()
                    .iter()
                    .filter_map(|v| v.to_possible_value().map(|p| p.get_name().to_string()))
                    .collect();
                format!("{key}: {r:?} is not one of {}", names.join(", "))
            })
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FINGERPRINT: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn a_full_file_parses() {
        let text = format!(
            r#"
            [defaults]
            state = "~/.local/state/ferry"
            window = "32MiB"
            retries = 20
            timeout = "60s"
            retry_delay = "1s"
            chunking = "fixed"
            chunk_size = "256KiB"
            links = "record"
            streams = 4
            token_file = "default.token"
            tls_ca = "/etc/ca.pem"
            bwlimit = "10MiB"
            max_duration = "2h"

            [remote.backup]
            url = "ferry://backup.example.net:7878/nightly"
            token_file = "~/.config/ferry/backup.token"
            tls_fingerprint = "{FINGERPRINT}"
            retries = 3

            [remote.bare]
            url = "ferry://10.0.0.1"
            "#
        );
        let file = ClientFile::parse(&text, Path::new("/cfg"), Some(Path::new("/home/me"))).unwrap();
        let d = &file.defaults;
        assert_eq!(d.state, Some(PathBuf::from("/home/me/.local/state/ferry")));
        assert_eq!((d.window, d.retries, d.streams), (Some(32 << 20), Some(20), Some(4)));
        assert_eq!(d.timeout, Some(Duration::from_secs(60)));
        assert_eq!(d.retry_delay, Some(Duration::from_secs(1)));
        assert_eq!((d.chunking, d.chunk_size), (Some(ChunkingMode::Fixed), Some(256 << 10)));
        assert_eq!(d.links, Some(LinkPolicy::Record));
        assert_eq!(d.token_file, Some(PathBuf::from("/cfg/default.token")));
        assert_eq!(d.tls, Some(TlsChoice::Ca(PathBuf::from("/etc/ca.pem"))));
        assert_eq!(
            (d.bwlimit, d.max_duration),
            (Some(10 << 20), Some(Duration::from_secs(7200)))
        );
        let backup = file.remote("backup").unwrap();
        assert_eq!(backup.url.authority(), "backup.example.net:7878");
        assert_eq!(backup.url.path, "nightly");
        assert_eq!(
            backup.profile.token_file,
            Some(PathBuf::from("/home/me/.config/ferry/backup.token"))
        );
        assert_eq!(backup.profile.tls, Some(TlsChoice::Fingerprint(FINGERPRINT.into())));
        assert_eq!((backup.profile.retries, backup.profile.window), (Some(3), None));
        assert_eq!(file.remote("bare").unwrap().url.path, "");
        assert!(matches!(file.remote("nope"), Err(ConfigError::UnknownRemote { .. })));
    }

    #[test]
    fn mistakes_are_reported_with_their_key() {
        for (text, needle) in [
            ("[defaults]\nretires = 3", "unknown field `retires`"),
            ("[default]\nretries = 3", "unknown field `default`"),
            ("[defaults]\nurl = \"ferry://h/x\"", "defaults.url"),
            ("[defaults]\nwindow = \"8XB\"", "defaults.window"),
            ("[defaults]\ntimeout = \"soon\"", "defaults.timeout"),
            ("[defaults]\nchunking = \"rolling\"", "cdc, fixed"),
            ("[defaults]\nchunk_size = \"1K\"", "defaults.chunk_size"),
            ("[defaults]\nstreams = 17", "defaults.streams"),
            ("[defaults]\ntls_fingerprint = \"md5:00\"", "defaults.tls_fingerprint"),
            (
                &format!("[defaults]\ntls_fingerprint = \"{FINGERPRINT}\"\ntls_ca = \"ca.pem\""),
                "not both",
            ),
            ("[remote.x]\nretries = 1", "remote.x.url: missing"),
            ("[remote.x]\nurl = \"http://h/\"", "remote.x.url"),
            ("[remote.x]\nurl = \"ferry://h/\"\nlinks = \"follow\"", "remote.x.links"),
            ("[remote.x]\nurl = \"ferry://h/\"\nbogus = 1", "unknown field `bogus`"),
            ("[remote.\"a b\"]\nurl = \"ferry://h/\"", "remote name"),
        ] {
            let error = ClientFile::parse(text, Path::new("."), None).unwrap_err();
            assert!(error.contains(needle), "{text}: {error}");
        }
        let error = ClientFile::parse("[defaults]\nstate = \"~/s\"", Path::new("."), None).unwrap_err();
        assert!(error.contains("HOME"), "{error}");
    }

    #[test]
    fn remote_names_are_simple() {
        for ok in ["backup", "nas-2", "b.example_1"] {
            assert!(valid_remote_name(ok), "{ok}");
        }
        for bad in ["", "a b", "ferry/x", "ä"] {
            assert!(!valid_remote_name(bad), "{bad}");
        }
    }
}
