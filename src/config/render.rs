//! `ferry serve --print-config`: the server's effective configuration (defaults, then the file, then the flags),
//! written back in the schema of the configuration file.
//!
//! Guarantee: no client secret is ever printed; each `[[client]]` shows its id, namespace, permissions and quota,
//! and [`HIDDEN_SECRET`] in place of its secret (which does not parse as a secret, so a printed file cannot be
//! mistaken for a working one).

use std::path::Path;

use serde::Serialize;

use crate::server::ServerConfig;
use crate::units::{format_duration, format_size};

/// What is printed instead of a client's secret.
pub const HIDDEN_SECRET: &str = "(hidden)";

/// The settings `ferry serve` would run with.
#[derive(Clone, Copy)]
pub struct EffectiveServer<'a> {
    /// The merged settings.
    pub config: &'a ServerConfig,
    /// The listen address.
    pub listen: &'a str,
    /// Whether a non-loopback listen without clients is allowed.
    pub insecure_no_auth: bool,
    /// The TLS certificate and key files, if the server speaks TLS.
    pub tls: Option<(&'a Path, &'a Path)>,
}

#[derive(Serialize)]
struct File {
    listen: String,
    root: String,
    state: String,
    insecure_no_auth: bool,
    in_place: &'static str,
    limits: Limits,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<Tls>,
    #[serde(rename = "client")]
    clients: Vec<Client>,
}

#[derive(Serialize)]
struct Limits {
    max_connections: usize,
    max_connections_per_client: usize,
    max_preauth_connections: usize,
    max_preauth_per_address: usize,
    frame_budget: String,
    min_frame_rate: String,
    max_frame: String,
    max_manifest_chunks: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_file_size: Option<String>,
    max_open_transfers: u64,
    max_manifest_bytes: String,
    max_namespace_entries: u64,
    max_tree_entries: usize,
    idle_timeout: String,
    handshake_timeout: String,
    partial_ttl: String,
    gc_interval: String,
}

#[derive(Serialize)]
struct Tls {
    cert: String,
    key: String,
}

#[derive(Serialize)]
struct Client {
    id: String,
    secret: &'static str,
    namespace: String,
    permissions: Vec<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    quota: Option<String>,
}

impl EffectiveServer<'_> {
    /// The configuration as a TOML document, with a comment header. Secrets are replaced by [`HIDDEN_SECRET`].
    pub fn to_toml(&self) -> String {
        let config = self.config;
        let path = |p: &Path| p.display().to_string();
        let state = config
            .state_dir
            .clone()
            .unwrap_or_else(|| config.root.join(crate::path::RESERVED_DIR).join("state"));
        let file = File {
            listen: self.listen.to_string(),
            root: path(&config.root),
            state: path(&state),
            insecure_no_auth: self.insecure_no_auth,
            in_place: if config.in_place { "auto" } else { "never" },
            limits: Limits {
                max_connections: config.max_connections,
                max_connections_per_client: config.max_connections_per_client,
                max_preauth_connections: config.max_preauth_connections,
                max_preauth_per_address: config.max_preauth_per_address,
                frame_budget: format_size(config.frame_budget),
                min_frame_rate: format_size(config.min_frame_rate),
                max_frame: format_size(u64::from(config.max_frame)),
                max_manifest_chunks: config.max_manifest_chunks,
                max_file_size: (config.max_file_size != u64::MAX).then(|| format_size(config.max_file_size)),
                max_open_transfers: config.namespace_limits.max_open_transfers,
                max_manifest_bytes: format_size(config.namespace_limits.max_manifest_bytes),
                max_namespace_entries: config.namespace_limits.max_entries,
                max_tree_entries: config.namespace_limits.max_tree_entries,
                idle_timeout: format_duration(config.idle_timeout),
                handshake_timeout: format_duration(config.handshake_timeout),
                partial_ttl: format_duration(config.partial_ttl),
                gc_interval: format_duration(config.gc_interval),
            },
            tls: self.tls.map(|(cert, key)| Tls {
                cert: path(cert),
                key: path(key),
            }),
            clients: config
                .clients
                .iter()
                .map(|c| Client {
                    id: c.token.id.clone(),
                    secret: HIDDEN_SECRET,
                    // The file spells the whole root "/"; the server keeps it as "".
                    namespace: if c.namespace.is_empty() {
                        "/".to_string()
                    } else {
                        c.namespace.clone()
                    },
                    permissions: [("push", c.permissions.push), ("pull", c.permissions.pull)]
                        .into_iter()
                        .filter_map(|(name, allowed)| allowed.then_some(name))
                        .collect(),
                    quota: c.quota.map(format_size),
                })
                .collect(),
        };
        let body = toml::to_string(&file).unwrap_or_else(|e| format!("# cannot render the configuration: {e}\n"));
        let mut out = String::from(
            "# ferry serve: effective configuration (built-in defaults < --config file < command-line flags)\n",
        );
        if self.config.max_file_size == u64::MAX {
            out.push_str("# limits.max_file_size: unlimited\n");
        }
        out.push_str(&format!("# client secrets are shown as {HIDDEN_SECRET:?}\n\n"));
        out.push_str(&body);
        out
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;
    use crate::config::ServerFile;

    const SECRET: &str = "0101010101010101010101010101010101010101010101010101010101010101";

    #[test]
    fn the_printed_file_reads_back_without_secrets() {
        let text = format!(
            "root = \"/srv\"\n[limits]\nmax_connections = 7\npartial_ttl = \"2d\"\nmax_file_size = \"1GiB\"\n\
             [[client]]\nid = \"laptop\"\nsecret = \"{SECRET}\"\nnamespace = \"/\"\npermissions = [\"pull\"]\n\
             quota = \"5GiB\"\n"
        );
        let file = ServerFile::parse(&text, Path::new("/")).unwrap();
        let mut config = ServerConfig::new(PathBuf::from("/srv"));
        file.apply(&mut config).unwrap();
        let printed = EffectiveServer {
            config: &config,
            listen: "127.0.0.1:7878",
            insecure_no_auth: false,
            tls: Some((Path::new("/c.pem"), Path::new("/k.pem"))),
        }
        .to_toml();
        assert!(!printed.contains(SECRET), "{printed}");
        assert!(printed.contains("id = \"laptop\""), "{printed}");
        // Without its secret, the printed file is the configuration it came from.
        let without_secret = printed.replace(
            &format!("secret = {HIDDEN_SECRET:?}"),
            &format!("secret = \"{SECRET}\""),
        );
        let again = ServerFile::parse(&without_secret, Path::new("/")).unwrap();
        let mut reread = ServerConfig::new(PathBuf::from("/srv"));
        again.apply(&mut reread).unwrap();
        assert_eq!(reread.max_connections, 7);
        assert_eq!(reread.partial_ttl, Duration::from_secs(2 * 86_400));
        assert_eq!(reread.max_file_size, 1 << 30);
        assert_eq!(reread.max_frame, config.max_frame);
        assert_eq!(reread.idle_timeout, config.idle_timeout);
        assert_eq!(
            (
                reread.frame_budget,
                reread.min_frame_rate,
                reread.max_preauth_per_address
            ),
            (
                config.frame_budget,
                config.min_frame_rate,
                config.max_preauth_per_address
            )
        );
        assert_eq!(again.root, Some(PathBuf::from("/srv")));
        assert_eq!(again.state, Some(PathBuf::from("/srv/.ferry/state")));
        assert_eq!(reread.clients[0].namespace, "");
        assert_eq!(reread.clients[0].quota, Some(5 << 30));
        assert!(
            ServerFile::parse(&printed, Path::new("/")).is_err(),
            "a hidden secret must not parse"
        );
    }
}
