//! `ferry://HOST[:PORT]/REMOTE/PATH` destinations.

use std::path::Path;
use std::str::FromStr;

use thiserror::Error;

use crate::path::RemotePath;
use crate::DEFAULT_PORT;

/// A destination that cannot be used.
#[derive(Debug, Error)]
pub enum UrlError {
    /// Not of the form `ferry://HOST[:PORT]/PATH`.
    #[error("{0:?} is not a ferry URL (ferry://HOST[:PORT]/REMOTE/PATH)")]
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
}

/// A parsed `ferry://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FerryUrl {
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Remote path as written (may end with `/`).
    pub path: String,
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

    fn parse(raw: &str, base: bool) -> Result<FerryUrl, UrlError> {
        let syntax = || UrlError::Syntax(raw.to_string());
        let rest = raw.strip_prefix("ferry://").ok_or_else(syntax)?;
        let (authority, path) = match rest.split_once('/') {
            Some(split) => split,
            None if base => (rest, ""),
            None => return Err(UrlError::NoPath(raw.to_string())),
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(syntax)?;
            let port = match after.strip_prefix(':') {
                Some(port) => Some(port),
                None if after.is_empty() => None,
                None => return Err(syntax()),
            };
            (host, port)
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
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
        if host.is_empty() {
            return Err(syntax());
        }
        if path.is_empty() && !base {
            return Err(UrlError::NoPath(raw.to_string()));
        }
        Ok(FerryUrl {
            host: host.to_string(),
            port,
            path: path.to_string(),
        })
    }

    /// `host:port`, with brackets around an IPv6 address.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
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
}
