//! `ferry://HOST[:PORT][,HOST[:PORT]]…/REMOTE/PATH` destinations.
//!
//! A URL may name several servers of one group (proto-spec.md §14, "Groups of servers"); [`Servers`] keeps them in
//! order together with the one a run uses now, so every clone of the URL within a run follows the same server
//! when the client fails over (README, "Several servers").

use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use thiserror::Error;

use crate::path::RemotePath;
use crate::DEFAULT_PORT;

/// A destination that cannot be used.
#[derive(Debug, Error)]
pub enum UrlError {
    /// Not of the form `ferry://HOST[:PORT][,HOST[:PORT]]…/PATH`.
    #[error("{0:?} is not a ferry URL (ferry://HOST[:PORT][,HOST[:PORT]]…/REMOTE/PATH)")]
    Syntax(String),
    /// A destination URL that names a server but no remote path.
    #[error("{0:?} has no remote path (ferry://HOST[:PORT]/REMOTE/PATH)")]
    NoPath(String),
    /// The port is not a number from 1 to 65535.
    #[error("{url:?}: port {port} is out of range (a port is a number from 1 to 65535)")]
    BadPort {
        /// The URL as given.
        url: String,
        /// The port as written.
        port: String,
    },
    /// The remote path is refused.
    #[error("remote path: {0}")]
    Path(#[from] crate::path::PathError),
    /// A trailing `/` asks for the local file name, but there is none.
    #[error("{0} has no file name to append to the remote directory")]
    NoFileName(String),
    /// More servers than [`MAX_SERVERS`] in one URL.
    #[error("{url:?} names {count} servers; at most {MAX_SERVERS} are allowed")]
    TooManyServers {
        /// The URL as given.
        url: String,
        /// How many it names.
        count: usize,
    },
    /// The same server twice in one URL.
    #[error("{url:?} names the server {server} twice")]
    DuplicateServer {
        /// The URL as given.
        url: String,
        /// The repeated `host:port`.
        server: String,
    },
}

/// The most servers one URL may name.
pub const MAX_SERVERS: usize = 16;

/// One server a URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl Server {
    /// `host:port`, with brackets around an IPv6 address.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// The servers a URL names, in order, and which of them a run uses now. Clones share the current server, the
/// count of moves and the list of servers used, so the connections of one run (retries, streams, the files of a
/// tree) all go to the same server and move together. Two lists are equal when they name the same servers in the
/// same order, wherever their runs stand.
#[derive(Debug, Clone)]
pub struct Servers {
    list: Arc<[Server]>,
    state: Arc<Cursor>,
}

/// Where a run stands in its list of servers.
#[derive(Debug, Default)]
struct Cursor {
    current: AtomicUsize,
    moves: AtomicU32,
    used: Mutex<Vec<usize>>,
}

impl PartialEq for Servers {
    fn eq(&self, other: &Servers) -> bool {
        self.list == other.list
    }
}

impl Eq for Servers {}

impl Servers {
    /// A list of one server.
    pub fn one(host: impl Into<String>, port: u16) -> Servers {
        Servers::of(vec![Server {
            host: host.into(),
            port,
        }])
    }

    fn of(list: Vec<Server>) -> Servers {
        Servers {
            list: list.into(),
            state: Arc::default(),
        }
    }

    /// Every server, in the URL's order.
    pub fn list(&self) -> &[Server] {
        &self.list
    }

    /// How many servers the URL names.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Always false: a URL names at least one server.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The server the run uses now.
    pub fn current(&self) -> &Server {
        &self.list[self.state.current.load(Ordering::Relaxed) % self.list.len()]
    }

    /// Makes the next server (wrapping around) current; returns the authorities moved from and to.
    pub fn advance(&self) -> (String, String) {
        let from = self.state.current.load(Ordering::Relaxed) % self.list.len();
        let to = (from + 1) % self.list.len();
        self.state.current.store(to, Ordering::Relaxed);
        self.state.moves.fetch_add(1, Ordering::Relaxed);
        (self.list[from].authority(), self.list[to].authority())
    }

    /// Times the run moved to the next server.
    pub fn moves(&self) -> u32 {
        self.state.moves.load(Ordering::Relaxed)
    }

    /// Records that the run is connected to the current server.
    pub fn connected(&self) {
        let current = self.state.current.load(Ordering::Relaxed) % self.list.len();
        let mut used = self
            .state
            .used
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !used.contains(&current) {
            used.push(current);
        }
    }

    /// The authorities of the servers the run connected to, in the order it first reached them.
    pub fn used(&self) -> Vec<String> {
        let used = self
            .state
            .used
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        used.iter().map(|&i| self.list[i].authority()).collect()
    }
}

/// A parsed `ferry://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FerryUrl {
    /// Host name or address of the first server (IPv6 without brackets).
    pub host: String,
    /// TCP port of the first server.
    pub port: u16,
    /// Remote path as written (may end with `/`).
    pub path: String,
    /// Every server the URL names (the first is `host`/`port`), and the one a run uses now.
    pub servers: Servers,
}

impl FromStr for FerryUrl {
    type Err = UrlError;

    fn from_str(raw: &str) -> Result<Self, UrlError> {
        FerryUrl::parse(raw, false)
    }
}

impl FerryUrl {
    /// Parses the base URL of a configured remote, `ferry://HOST[:PORT][/BASE]`: unlike a destination it may
    /// name no path (the client's whole namespace).
    pub fn parse_base(raw: &str) -> Result<FerryUrl, UrlError> {
        FerryUrl::parse(raw, true)
    }

    /// Parses `ferry://HOST[:PORT][/PATH]`, a server whose path may be missing or empty (for `ferry status`).
    pub fn server(raw: &str) -> Result<FerryUrl, UrlError> {
        FerryUrl::parse(raw, true)
    }

    /// A URL naming one server.
    pub fn single(host: impl Into<String>, port: u16, path: impl Into<String>) -> FerryUrl {
        let host = host.into();
        FerryUrl {
            servers: Servers::one(host.clone(), port),
            host,
            port,
            path: path.into(),
        }
    }

    fn parse(raw: &str, base: bool) -> Result<FerryUrl, UrlError> {
        let rest = raw
            .strip_prefix("ferry://")
            .ok_or_else(|| UrlError::Syntax(raw.to_string()))?;
        let (authority, path) = match rest.split_once('/') {
            Some(split) => split,
            None if base => (rest, ""),
            None => return Err(UrlError::NoPath(raw.to_string())),
        };
        let count = authority.split(',').count();
        if count > MAX_SERVERS {
            return Err(UrlError::TooManyServers {
                url: raw.to_string(),
                count,
            });
        }
        let mut list: Vec<Server> = Vec::with_capacity(count);
        for one in authority.split(',') {
            let server = parse_server(raw, one)?;
            let same = |s: &Server| s.port == server.port && s.host.eq_ignore_ascii_case(&server.host);
            if list.iter().any(same) {
                return Err(UrlError::DuplicateServer {
                    url: raw.to_string(),
                    server: server.authority(),
                });
            }
            list.push(server);
        }
        if path.is_empty() && !base {
            return Err(UrlError::NoPath(raw.to_string()));
        }
        let first = list[0].clone();
        Ok(FerryUrl {
            host: first.host,
            port: first.port,
            path: path.to_string(),
            servers: Servers::of(list),
        })
    }

    /// `host:port` of every server, comma-separated, with brackets around an IPv6 address.
    pub fn authority(&self) -> String {
        let all: Vec<String> = self.servers.list().iter().map(Server::authority).collect();
        all.join(",")
    }

    /// The destination path for `local`: the URL's path, plus `local`'s file name if the path ends with `/`.
    pub fn remote_path_for(&self, local: &Path) -> Result<RemotePath, UrlError> {
        if self.path.ends_with('/') {
            let name = local
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| UrlError::NoFileName(local.display().to_string()))?;
            Ok(RemotePath::parse(&format!("{}{name}", self.path))?)
        } else {
            Ok(RemotePath::parse(&self.path)?)
        }
    }
}

/// One `HOST[:PORT]` of the URL `raw` (IPv6 in brackets).
fn parse_server(raw: &str, one: &str) -> Result<Server, UrlError> {
    let syntax = || UrlError::Syntax(raw.to_string());
    let (host, port) = if let Some(v6) = one.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(syntax)?;
        let port = match after.strip_prefix(':') {
            Some(port) => Some(port),
            None if after.is_empty() => None,
            None => return Err(syntax()),
        };
        (host, port)
    } else {
        match one.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (one, None),
        }
    };
    let port = match port {
        None => DEFAULT_PORT,
        Some("") => return Err(syntax()),
        Some(p) => parse_port(p).ok_or_else(|| UrlError::BadPort {
            url: raw.to_string(),
            port: p.to_string(),
        })?,
    };
    if host.is_empty() || host.contains(['[', ']']) {
        return Err(syntax());
    }
    Ok(Server {
        host: host.to_string(),
        port,
    })
}

/// A port written as digits from 1 to 65535; `None` for anything else.
fn parse_port(p: &str) -> Option<u16> {
    match p.parse::<u16>() {
        Ok(0) | Err(_) => None,
        Ok(port) => Some(port),
    }
}

impl std::fmt::Display for FerryUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ferry://{}/{}", self.authority(), self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let url: FerryUrl = "ferry://127.0.0.1:9000/images/big.iso".parse().unwrap();
        assert_eq!(
            (url.host.as_str(), url.port, url.path.as_str()),
            ("127.0.0.1", 9000, "images/big.iso")
        );
        let url: FerryUrl = "ferry://[::1]/in/".parse().unwrap();
        assert_eq!((url.host.as_str(), url.port), ("::1", DEFAULT_PORT));
        assert_eq!(url.authority(), format!("[::1]:{DEFAULT_PORT}"));
        assert_eq!(
            url.remote_path_for(Path::new("/tmp/x.bin")).unwrap().as_str(),
            "in/x.bin"
        );
        for bad in [
            "http://h/x",
            "ferry://h",
            "ferry:///x",
            "ferry://h:99999/x",
            "ferry://h/",
        ] {
            let parsed = bad.parse::<FerryUrl>();
            assert!(
                parsed.is_err() || parsed.unwrap().remote_path_for(Path::new("")).is_err(),
                "{bad}"
            );
        }
        let base = FerryUrl::parse_base("ferry://backup.example").unwrap();
        assert_eq!((base.port, base.path.as_str()), (DEFAULT_PORT, ""));
        assert!(FerryUrl::parse_base("ferry://:1/x").is_err());
        let traversal: FerryUrl = "ferry://h/../etc/passwd".parse().unwrap();
        assert!(traversal.remote_path_for(Path::new("f")).is_err());
    }

    #[test]
    fn a_server_url_may_leave_out_the_path() {
        let bare = FerryUrl::server("ferry://backup.example:7000").unwrap();
        assert_eq!(
            (bare.host.as_str(), bare.port, bare.path.as_str()),
            ("backup.example", 7000, "")
        );
        assert_eq!(FerryUrl::server("ferry://h/").unwrap().path, "");
        assert_eq!(FerryUrl::server("ferry://[::1]/in").unwrap().path, "in");
        for bad in ["ferry://", "ferry://:7/", "h:7", "ferry://h:x"] {
            assert!(FerryUrl::server(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn errors_name_the_real_problem() {
        for no_path in ["ferry://h:44547/", "ferry://h:44547", "ferry://h/"] {
            let err = no_path.parse::<FerryUrl>().unwrap_err();
            assert!(matches!(err, UrlError::NoPath(_)), "{no_path}: {err:?}");
            assert!(err.to_string().contains("has no remote path"), "{err}");
        }
        for (bad_port, port) in [
            ("ferry://h:99999/x", "99999"),
            ("ferry://h:0/x", "0"),
            ("ferry://h:x/y", "x"),
            ("ferry://[::1]:70000/y", "70000"),
        ] {
            let err = bad_port.parse::<FerryUrl>().unwrap_err();
            assert!(
                matches!(&err, UrlError::BadPort { port: p, .. } if p == port),
                "{bad_port}: {err:?}"
            );
            assert!(
                err.to_string().contains(&format!("port {port} is out of range")),
                "{err}"
            );
        }
        let err = FerryUrl::server("ferry://h:99999").unwrap_err();
        assert!(matches!(err, UrlError::BadPort { .. }), "{err:?}");
        let err = "http://h/x".parse::<FerryUrl>().unwrap_err();
        assert!(matches!(err, UrlError::Syntax(_)), "{err:?}");
    }

    #[test]
    fn a_url_may_name_several_servers_in_order() {
        let url: FerryUrl = "ferry://a:7001,[::1],b.example:7003/in/x.iso".parse().unwrap();
        let list: Vec<String> = url.servers.list().iter().map(Server::authority).collect();
        assert_eq!(list, ["a:7001", &format!("[::1]:{DEFAULT_PORT}"), "b.example:7003"]);
        assert_eq!(
            (url.host.as_str(), url.port, url.path.as_str()),
            ("a", 7001, "in/x.iso")
        );
        assert_eq!(
            url.to_string(),
            format!("ferry://a:7001,[::1]:{DEFAULT_PORT},b.example:7003/in/x.iso")
        );
        let base = FerryUrl::parse_base("ferry://a,b").unwrap();
        assert_eq!(base.servers.len(), 2);
        assert_eq!(FerryUrl::server("ferry://a:1,b:2").unwrap().servers.len(), 2);
        let max = (1..=MAX_SERVERS).map(|i| format!("h{i}")).collect::<Vec<_>>().join(",");
        assert_eq!(
            format!("ferry://{max}/x").parse::<FerryUrl>().unwrap().servers.len(),
            MAX_SERVERS
        );
    }

    #[test]
    fn a_bad_server_list_is_refused_with_its_reason() {
        let seventeen = (1..=MAX_SERVERS + 1)
            .map(|i| format!("h{i}"))
            .collect::<Vec<_>>()
            .join(",");
        let err = format!("ferry://{seventeen}/x").parse::<FerryUrl>().unwrap_err();
        assert!(matches!(err, UrlError::TooManyServers { count: 17, .. }), "{err:?}");
        assert!(err.to_string().contains("at most 16"), "{err}");
        for (twice, server) in [
            ("ferry://a:1,b:2,a:1/x", "a:1"),
            (&format!("ferry://a,A:{DEFAULT_PORT}/x"), &format!("A:{DEFAULT_PORT}")),
            ("ferry://[::1]:5,[::1]:5/x", "[::1]:5"),
        ] {
            let err = twice.parse::<FerryUrl>().unwrap_err();
            assert!(
                matches!(&err, UrlError::DuplicateServer { server: s, .. } if s == server),
                "{twice}: {err:?}"
            );
            assert!(err.to_string().contains("twice"), "{err}");
        }
        for bad in [
            "ferry://a,/x",
            "ferry://,a/x",
            "ferry://a,,b/x",
            "ferry://a,[::1/x",
            "ferry://a,b]:1/x",
        ] {
            let err = bad.parse::<FerryUrl>().unwrap_err();
            assert!(matches!(err, UrlError::Syntax(_)), "{bad}: {err:?}");
        }
        let err = "ferry://a,b:0/x".parse::<FerryUrl>().unwrap_err();
        assert!(matches!(&err, UrlError::BadPort { port, .. } if port == "0"), "{err:?}");
    }

    #[test]
    fn clones_of_a_url_follow_one_current_server() {
        let url: FerryUrl = "ferry://a:1,b:2,c:3/x".parse().unwrap();
        let clone = FerryUrl {
            path: "y".into(),
            ..url.clone()
        };
        assert_eq!(url.servers.current().authority(), "a:1");
        clone.servers.connected();
        assert_eq!(clone.servers.advance(), ("a:1".to_string(), "b:2".to_string()));
        assert_eq!(
            url.servers.current().authority(),
            "b:2",
            "a clone's move is the run's move"
        );
        url.servers.connected();
        url.servers.advance();
        assert_eq!(
            url.servers.advance(),
            ("c:3".to_string(), "a:1".to_string()),
            "the list wraps"
        );
        assert_eq!(url.servers.moves(), 3);
        assert_eq!(url.servers.used(), ["a:1", "b:2"]);
        assert_eq!(
            url,
            "ferry://a:1,b:2,c:3/x".parse().unwrap(),
            "equality ignores where a run stands"
        );
    }
}
