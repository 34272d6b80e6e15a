//! The TOML configuration files. This module owns the server's (`ferry serve --config FILE`): listen address,
//! root, limits, TLS, and the clients with their tokens, namespaces, permissions and quotas; command-line flags
//! override it, and [`EffectiveServer`] prints the merged result back in the same schema
//! (`ferry serve --print-config`). [`ClientFile`] is the client's file of defaults and named remotes.
//!
//! Unknown keys are errors (a typo must not silently drop a limit). Sizes are `"1MiB"`-style strings or plain
//! integers, durations `"30s"`-style strings. Relative paths are relative to the file's directory. README,
//! "Server configuration", shows a complete file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::auth::{Permissions, Token};
use crate::server::{ClientEntry, ServerConfig};
use crate::units::{parse_duration, parse_size};

mod client;
mod render;
mod xdg;

pub use client::{default_path, valid_remote_name, ClientFile, Profile, Remote, TlsChoice, MAX_STREAMS};
pub use render::EffectiveServer;
pub use xdg::{ferry_dir, BaseDir, NoBaseDir};

/// A configuration file that cannot be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Not valid TOML, or not the expected shape.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with its location.
        message: String,
    },
    /// `NAME:PATH` names a remote the client's configuration does not define.
    #[error("unknown remote {name:?}: {}", remote_hint(.name, .file.as_deref()))]
    UnknownRemote {
        /// The name as given.
        name: String,
        /// The file searched, if there was one.
        file: Option<PathBuf>,
    },
}

/// Where an unknown remote was looked for.
fn remote_hint(name: &str, file: Option<&Path>) -> String {
    match file {
        Some(path) => format!("no [remote.{name}] section in {}", path.display()),
        None => "no client configuration file (README, \"Client configuration\")".to_string(),
    }
}

/// A size: `"100GiB"` or a plain number of bytes.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
enum Size {
    Bytes(u64),
    Text(String),
}

impl Size {
    fn bytes(&self) -> Result<u64, String> {
        match self {
            Size::Bytes(n) => Ok(*n),
            Size::Text(text) => parse_size(text),
        }
    }
}

/// The file as written.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct File {
    listen: Option<String>,
    root: Option<PathBuf>,
    state: Option<PathBuf>,
    #[serde(default)]
    insecure_no_auth: bool,
    in_place: Option<AutoOrNever>,
    direct_io: Option<AutoOrNever>,
    #[serde(default)]
    limits: Limits,
    tls: Option<Tls>,
    #[serde(default, rename = "client")]
    clients: Vec<Client>,
    store: Option<StoreSection>,
}

/// `[store]`: keep received files in an object store (docs/object-store.md "Configuration").
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct StoreSection {
    url: String,
    endpoint: Option<String>,
    region: Option<String>,
    allow_http: Option<bool>,
    #[serde(default)]
    virtual_hosted: bool,
    parallel: Option<usize>,
    min_chunk_size: Option<Size>,
    access_key_file: Option<PathBuf>,
    secret_key_file: Option<PathBuf>,
    #[serde(default)]
    gc: bool,
}

impl StoreSection {
    /// The store's settings; the key files' relative paths are relative to `base` (the file's directory).
    fn settings(&self, base: &Path) -> Result<crate::storage::object::StoreSettings, String> {
        let mut settings = crate::storage::object::StoreSettings::from_url(&self.url).map_err(|e| e.to_string())?;
        settings.endpoint = self.endpoint.clone();
        settings.region = self.region.clone();
        settings.allow_http = self.allow_http;
        settings.virtual_hosted = self.virtual_hosted;
        settings.parallel = self.parallel.unwrap_or(settings.parallel);
        if let Some(size) = &self.min_chunk_size {
            settings.min_chunk_size = u32::try_from(size.bytes()?).map_err(|_| "store.min_chunk_size is too large")?;
        }
        settings.access_key_file = self.access_key_file.as_ref().map(|p| base.join(p));
        settings.secret_key_file = self.secret_key_file.as_ref().map(|p| base.join(p));
        if settings.access_key_file.is_some() != settings.secret_key_file.is_some() {
            return Err("store.access_key_file and store.secret_key_file go together: give both or neither".into());
        }
        settings.gc = self.gc;
        settings.options().map_err(|e| e.to_string())?;
        Ok(settings)
    }
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct Limits {
    max_connections: Option<usize>,
    max_connections_per_client: Option<usize>,
    max_preauth_connections: Option<usize>,
    max_preauth_per_address: Option<usize>,
    frame_budget: Option<Size>,
    min_frame_rate: Option<Size>,
    max_frame: Option<Size>,
    max_manifest_chunks: Option<usize>,
    max_file_size: Option<Size>,
    max_open_transfers: Option<u64>,
    max_manifest_bytes: Option<Size>,
    max_namespace_entries: Option<u64>,
    max_tree_entries: Option<usize>,
    idle_timeout: Option<String>,
    handshake_timeout: Option<String>,
    partial_ttl: Option<String>,
    gc_interval: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Tls {
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Client {
    id: String,
    secret: String,
    namespace: String,
    permissions: Vec<Permission>,
    quota: Option<Size>,
}

/// A setting that is on where it pays or off: `in_place` (a re-push that mostly matches the committed file may be
/// written into it in place; never: every push writes a new partial and renames it over the file) and `direct_io`
/// (large files written and read around the page cache; never: always through it).
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum AutoOrNever {
    /// When it pays (the default).
    Auto,
    /// Never.
    Never,
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Permission {
    Push,
    Pull,
}

/// A parsed server configuration file: everything optional, to be merged under the command line.
#[derive(Debug, Default)]
pub struct ServerFile {
    /// `listen`.
    pub listen: Option<String>,
    /// `root`.
    pub root: Option<PathBuf>,
    /// `state`.
    pub state: Option<PathBuf>,
    /// `insecure_no_auth`: listen on a non-loopback address without clients.
    pub insecure_no_auth: bool,
    /// `[tls]` cert and key.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// `[[client]]` entries.
    pub clients: Vec<ClientEntry>,
    /// `in_place = "auto" | "never"` (`None`: not set, auto).
    pub in_place: Option<bool>,
    /// `direct_io = "auto" | "never"` (`None`: not set, auto): large partials written (and large files read)
    /// around the page cache where the filesystem allows.
    pub direct_io: Option<bool>,
    /// `[store]`: the object store, if files are kept in one.
    pub store: Option<crate::storage::object::StoreSettings>,
    limits: Limits,
}

impl ServerFile {
    /// Reads and checks `path`. Blocking.
    pub fn load(path: &Path) -> Result<ServerFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        warn_if_readable_by_others(path);
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses the text of a configuration file whose relative paths are relative to `base`.
    pub fn parse(text: &str, base: &Path) -> Result<ServerFile, String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        let clients = file.clients.iter().map(client_entry).collect::<Result<Vec<_>, _>>()?;
        let limits = file.limits;
        // Check every limit now, so a bad value is reported before anything starts.
        apply_limits(&limits, &mut ServerConfig::new(PathBuf::new()))?;
        Ok(ServerFile {
            listen: file.listen,
            root: file.root.map(|p| base.join(p)),
            state: file.state.map(|p| base.join(p)),
            insecure_no_auth: file.insecure_no_auth,
            tls: file.tls.map(|t| (base.join(t.cert), base.join(t.key))),
            clients,
            in_place: file.in_place.map(|mode| mode == AutoOrNever::Auto),
            direct_io: file.direct_io.map(|mode| mode == AutoOrNever::Auto),
            store: file.store.as_ref().map(|s| s.settings(base)).transpose()?,
            limits,
        })
    }

    /// Writes the file's limits and clients into `config`.
    pub fn apply(&self, config: &mut ServerConfig) -> Result<(), String> {
        apply_limits(&self.limits, config)?;
        config.clients = self.clients.clone();
        if let Some(in_place) = self.in_place {
            config.in_place = in_place;
        }
        if let Some(direct_io) = self.direct_io {
            config.direct_io = direct_io;
        }
        if self.store.is_some() {
            config.object_store = self.store.clone();
        }
        if self.state.is_some() {
            config.state_dir = self.state.clone();
        }
        Ok(())
    }
}

fn apply_limits(limits: &Limits, config: &mut ServerConfig) -> Result<(), String> {
    let duration = |raw: &Option<String>, name: &str| -> Result<Option<Duration>, String> {
        raw.as_deref()
            .map(|r| parse_duration(r).map_err(|e| format!("limits.{name}: {e}")))
            .transpose()
    };
    let size = |raw: &Option<Size>, name: &str| -> Result<Option<u64>, String> {
        raw.as_ref()
            .map(|s| s.bytes().map_err(|e| format!("limits.{name}: {e}")))
            .transpose()
    };
    if let Some(n) = limits.max_connections {
        config.max_connections = n;
    }
    if let Some(n) = limits.max_connections_per_client {
        config.max_connections_per_client = n;
    }
    if let Some(n) = limits.max_preauth_connections {
        config.max_preauth_connections = n;
    }
    if let Some(n) = limits.max_preauth_per_address {
        config.max_preauth_per_address = n;
    }
    if let Some(n) = size(&limits.frame_budget, "frame_budget")? {
        config.frame_budget = n;
    }
    if let Some(n) = size(&limits.min_frame_rate, "min_frame_rate")? {
        config.min_frame_rate = n;
    }
    if let Some(n) = size(&limits.max_frame, "max_frame")? {
        config.max_frame = u32::try_from(n).map_err(|_| "limits.max_frame: too large".to_string())?;
    }
    if let Some(n) = limits.max_manifest_chunks {
        config.max_manifest_chunks = n;
    }
    if let Some(n) = size(&limits.max_file_size, "max_file_size")? {
        config.max_file_size = n;
    }
    if let Some(n) = limits.max_open_transfers {
        config.namespace_limits.max_open_transfers = n;
    }
    if let Some(n) = size(&limits.max_manifest_bytes, "max_manifest_bytes")? {
        config.namespace_limits.max_manifest_bytes = n;
    }
    if let Some(n) = limits.max_namespace_entries {
        config.namespace_limits.max_entries = n;
    }
    if let Some(n) = limits.max_tree_entries {
        config.namespace_limits.max_tree_entries = n;
    }
    if let Some(d) = duration(&limits.idle_timeout, "idle_timeout")? {
        config.idle_timeout = d;
    }
    if let Some(d) = duration(&limits.handshake_timeout, "handshake_timeout")? {
        config.handshake_timeout = d;
    }
    if let Some(d) = duration(&limits.partial_ttl, "partial_ttl")? {
        config.partial_ttl = d;
    }
    if let Some(d) = duration(&limits.gc_interval, "gc_interval")? {
        config.gc_interval = d;
    }
    Ok(())
}

fn client_entry(client: &Client) -> Result<ClientEntry, String> {
    let context = |e: &dyn std::fmt::Display| format!("client {:?}: {e}", client.id);
    let token = Token::from_parts(&client.id, &client.secret).map_err(|e| context(&e))?;
    if client.namespace.is_empty() {
        // The whole root is allowed, but only when asked for explicitly as "/".
        return Err(context(&"namespace must not be empty (use \"/\" for the whole root)"));
    }
    let namespace = client.namespace.trim_matches('/').to_string();
    let permissions = Permissions {
        push: client.permissions.contains(&Permission::Push),
        pull: client.permissions.contains(&Permission::Pull),
    };
    let quota = client
        .quota
        .as_ref()
        .map(|q| q.bytes().map_err(|e| context(&e)))
        .transpose()?;
    Ok(ClientEntry {
        token,
        namespace,
        permissions,
        quota,
    })
}

/// Tokens in a file others can read are as good as published: say so (the server still starts).
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                file = %path.display(),
                "the server configuration holds client secrets and is readable by group or others; chmod 600 it"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0101010101010101010101010101010101010101010101010101010101010101";

    #[test]
    fn a_full_file_parses_and_applies() {
        let text = format!(
            r#"
            listen = "0.0.0.0:7878"
            root = "inbox"
            in_place = "never"
            direct_io = "never"
            [limits]
            max_connections = 10
            max_connections_per_client = 2
            max_preauth_connections = 20
            max_preauth_per_address = 3
            frame_budget = "32MiB"
            min_frame_rate = "4KiB"
            max_frame = "8MiB"
            max_manifest_chunks = 1000
            max_file_size = 1048576
            max_open_transfers = 12
            max_manifest_bytes = "3MiB"
            max_namespace_entries = 5000
            max_tree_entries = 700
            idle_timeout = "30s"
            handshake_timeout = "5s"
            partial_ttl = "2d"
            gc_interval = "10m"
            [tls]
            cert = "c.pem"
            key = "/etc/k.pem"
            [[client]]
            id = "laptop"
            secret = "{SECRET}"
            namespace = "laptop/"
            permissions = ["push", "pull"]
            quota = "1GiB"
            [[client]]
            id = "reader"
            secret = "{SECRET}"
            namespace = "/"
            permissions = ["pull"]
            "#
        );
        let file = ServerFile::parse(&text, Path::new("/cfg")).unwrap();
        assert_eq!(file.root, Some(PathBuf::from("/cfg/inbox")));
        assert_eq!(
            file.tls,
            Some((PathBuf::from("/cfg/c.pem"), PathBuf::from("/etc/k.pem")))
        );
        let mut config = ServerConfig::new(PathBuf::from("/r"));
        file.apply(&mut config).unwrap();
        assert_eq!(config.max_connections_per_client, 2);
        assert_eq!(
            (config.max_preauth_connections, config.max_preauth_per_address),
            (20, 3)
        );
        assert_eq!((config.frame_budget, config.min_frame_rate), (32 << 20, 4096));
        assert_eq!(config.namespace_limits.max_open_transfers, 12);
        assert_eq!(config.namespace_limits.max_manifest_bytes, 3 << 20);
        assert_eq!(config.namespace_limits.max_entries, 5000);
        assert_eq!(config.namespace_limits.max_tree_entries, 700);
        assert_eq!(config.max_frame, 8 << 20);
        assert_eq!(config.max_file_size, 1 << 20);
        assert_eq!(config.partial_ttl, Duration::from_secs(2 * 86_400));
        assert!(!config.in_place, "in_place = \"never\" turns the in-place delta off");
        assert!(!config.direct_io, "direct_io = \"never\" turns direct I/O off");
        assert_eq!(config.clients.len(), 2);
        let laptop = &config.clients[0];
        assert_eq!((laptop.namespace.as_str(), laptop.quota), ("laptop", Some(1 << 30)));
        assert_eq!(laptop.permissions, Permissions::ALL);
        let reader = &config.clients[1];
        assert_eq!(reader.namespace, "");
        assert_eq!(
            reader.permissions,
            Permissions {
                push: false,
                pull: true
            }
        );
    }

    #[test]
    fn a_store_section_sets_up_the_object_store() {
        let text = "[store]\nurl = \"s3://backups/ferry/\"\nendpoint = \"http://127.0.0.1:3900\"\n\
                    region = \"garage\"\nallow_http = true\nparallel = 8\nmin_chunk_size = \"1MiB\"";
        let file = ServerFile::parse(text, Path::new(".")).unwrap();
        let mut config = ServerConfig::new(PathBuf::from("/srv"));
        file.apply(&mut config).unwrap();
        let store = config.object_store.expect("[store] applied");
        assert_eq!((store.bucket.as_str(), store.prefix.as_str()), ("backups", "ferry"));
        assert_eq!(store.endpoint.as_deref(), Some("http://127.0.0.1:3900"));
        assert_eq!(store.region.as_deref(), Some("garage"));
        assert_eq!((store.allow_http, store.virtual_hosted), (Some(true), false));
        assert_eq!((store.parallel, store.min_chunk_size), (8, 1 << 20));
        assert_eq!(
            (store.access_key_file, store.secret_key_file, store.gc),
            (None, None, false)
        );
        assert!(ServerFile::parse("", Path::new(".")).unwrap().store.is_none());

        // Key files relative to the configuration's directory, and the periodic gc.
        let text = "[store]\nurl = \"s3://backups\"\naccess_key_file = \"keys/id\"\n\
                    secret_key_file = \"/etc/ferry/secret\"\ngc = true";
        let store = ServerFile::parse(text, Path::new("/etc/ferry")).unwrap().store.unwrap();
        assert_eq!(store.access_key_file.as_deref(), Some(Path::new("/etc/ferry/keys/id")));
        assert_eq!(store.secret_key_file.as_deref(), Some(Path::new("/etc/ferry/secret")));
        assert!(store.gc);
    }

    #[test]
    fn mistakes_are_reported() {
        for (text, needle) in [
            ("limtis = 1", "unknown field"),
            ("in_place = \"always\"", "unknown variant"),
            ("[limits]\nmax_frame = \"8XB\"", "max_frame"),
            ("[limits]\nidle_timeout = \"soon\"", "idle_timeout"),
            (
                "[[client]]\nid = \"a b\"\nsecret = \"00\"\nnamespace = \"a\"\npermissions = []",
                "client",
            ),
            (
                &format!("[[client]]\nid = \"a\"\nsecret = \"{SECRET}\"\nnamespace = \"a\"\npermissions = [\"write\"]"),
                "unknown variant",
            ),
            ("[store]\nurl = \"http://bucket\"", "s3://BUCKET"),
            (
                "[store]\nurl = \"s3://bucket\"\nmin_chunk_size = \"1K\"",
                "min_chunk_size",
            ),
            ("[store]\nurl = \"s3://bucket\"\nparallel = 0", "parallel"),
            ("[store]\nurl = \"s3://bucket\"\nkey = \"secret\"", "unknown field"),
            (
                "[store]\nurl = \"s3://bucket\"\nsecret_key = \"inline\"",
                "unknown field",
            ),
            ("[store]\nurl = \"s3://bucket\"\nsecret_key_file = \"s\"", "go together"),
        ] {
            let error = ServerFile::parse(text, Path::new(".")).unwrap_err();
            assert!(error.contains(needle), "{text}: {error}");
        }
    }
}
