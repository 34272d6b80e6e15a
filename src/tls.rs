//! TLS (rustls, ring provider) for links that need privacy, and the byte stream sessions run over.
//!
//! A server with `--tls-cert/--tls-key` speaks only TLS. A client trusts a server either by a pinned certificate
//! fingerprint (`sha256:HEX` of the DER certificate, as `ferry keygen` prints it; no name or date checks, like an
//! SSH host key) or by a CA file (full WebPKI validation, the URL's host must be in the certificate). The ferry
//! protocol is unchanged inside TLS (proto-spec.md, "Transport security").

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A TLS setting that cannot be used.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A certificate, key or CA file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The file holds no usable PEM item of the needed kind.
    #[error("{0}")]
    Pem(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// A fingerprint that is not `sha256:` and 64 hex digits.
    #[error("a certificate fingerprint is sha256: followed by 64 hex digits (as `ferry keygen` prints it)")]
    Fingerprint,
    /// Generating a certificate failed.
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The byte stream under a [`crate::wire::Connection`]: plain TCP or TLS over TCP.
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP (either side).
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

impl Stream {
    /// 32 bytes both ends of this TLS session derive alike and no other session shares (RFC 5705 exporter,
    /// label `EXPORTER-ferry-auth`); `None` for plain TCP. Binding the token answer to it means an answer relayed
    /// through another TLS session is worthless (proto-spec.md §3a).
    pub fn channel_binding(&self) -> Option<[u8; 32]> {
        let Stream::Tls(tls) = self else {
            return None;
        };
        let exported = match tls.as_ref() {
            tokio_rustls::TlsStream::Client(s) => s.get_ref().1.export_keying_material([0u8; 32], EXPORTER_LABEL, None),
            tokio_rustls::TlsStream::Server(s) => s.get_ref().1.export_keying_material([0u8; 32], EXPORTER_LABEL, None),
        };
        exported.ok()
    }
}

/// RFC 5705 exporter label for the token answer's channel binding.
const EXPORTER_LABEL: &[u8] = b"EXPORTER-ferry-auth";

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server's TLS identity.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: tokio_rustls::TlsAcceptor,
    /// `sha256:HEX` of the certificate, for the log and for clients to pin.
    pub fingerprint: String,
}

impl ServerTls {
    /// Loads a PEM certificate chain and private key. Blocking.
    pub fn load(cert: &Path, key: &Path) -> Result<ServerTls, TlsError> {
        let chain = read_certs(cert)?;
        let key_path = key;
        let key = read_key(key_path)?;
        crate::auth::warn_if_exposed(key_path, "TLS private key");
        let fingerprint = fingerprint(&chain[0]);
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        Ok(ServerTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            fingerprint,
        })
    }

    /// Runs the server side of the TLS handshake (the caller bounds it in time).
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<Stream> {
        let tls = self.acceptor.accept(tcp).await?;
        Ok(Stream::Tls(Box::new(tls.into())))
    }
}

/// How a client decides to trust a server's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Exactly this certificate (SHA-256 of its DER).
    Pinned([u8; 32]),
    /// Any certificate for the URL's host that chains to a CA in this PEM file.
    CaFile(PathBuf),
}

impl Trust {
    /// Parses `sha256:HEX` (colons between hex pairs are allowed, as openssl prints them).
    pub fn pinned(raw: &str) -> Result<Trust, TlsError> {
        let hex = raw
            .trim()
            .strip_prefix("sha256:")
            .ok_or(TlsError::Fingerprint)?
            .replace(':', "");
        if hex.len() != 64 || !hex.is_ascii() {
            return Err(TlsError::Fingerprint);
        }
        let mut digest = [0u8; 32];
        for (byte, pair) in digest.iter_mut().zip(hex.as_bytes().chunks(2)) {
            let pair = std::str::from_utf8(pair).map_err(|_| TlsError::Fingerprint)?;
            *byte = u8::from_str_radix(pair, 16).map_err(|_| TlsError::Fingerprint)?;
        }
        Ok(Trust::Pinned(digest))
    }
}

/// A client's TLS settings.
#[derive(Clone)]
pub struct ClientTls {
    connector: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls")
    }
}

impl ClientTls {
    /// A client that trusts servers as `trust` says. Blocking (reads a CA file).
    pub fn new(trust: &Trust) -> Result<ClientTls, TlsError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
        let config = match trust {
            Trust::Pinned(digest) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedCert {
                    digest: *digest,
                    provider: provider(),
                }))
                .with_no_client_auth(),
            Trust::CaFile(path) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in read_certs(path)? {
                    roots.add(cert)?;
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
        };
        Ok(ClientTls {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }

    /// Runs the client side of the TLS handshake with `host` (the caller bounds it in time). A certificate that
    /// fails the trust check is `InvalidData`.
    pub async fn connect(&self, host: &str, tcp: TcpStream) -> io::Result<Stream> {
        let name = ServerName::try_from(host.to_string()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{host:?} is not a TLS server name"),
            )
        })?;
        let tls = self.connector.connect(name, tcp).await?;
        Ok(Stream::Tls(Box::new(tls.into())))
    }
}

/// Trusts exactly one certificate, by its SHA-256; signatures are still verified, so the peer must hold its key.
#[derive(Debug)]
struct PinnedCert {
    digest: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen = ring::digest::digest(&ring::digest::SHA256, end_entity.as_ref());
        if seen.as_ref() == self.digest {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the server's certificate is {}, not the pinned one",
                fingerprint(end_entity)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// `sha256:HEX` of a DER certificate.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// A new self-signed certificate for `names` (DNS names or IP addresses): (certificate PEM, key PEM, fingerprint).
pub fn keygen(names: &[String]) -> Result<(String, String, String), TlsError> {
    let made = rcgen::generate_simple_self_signed(names.to_vec())?;
    let print = fingerprint(made.cert.der());
    Ok((made.cert.pem(), made.key_pair.serialize_pem(), print))
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError::Pem(format!("{} holds no PEM certificate", path.display())));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::Pem(format!("{} holds no PEM private key", path.display())),
        e => TlsError::Pem(format!("{}: {e}", path.display())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_with_or_without_colons() {
        let hex = "ab".repeat(32);
        assert_eq!(
            Trust::pinned(&format!("sha256:{hex}")).unwrap(),
            Trust::Pinned([0xab; 32])
        );
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(
            Trust::pinned(&format!("sha256:{colons}")).unwrap(),
            Trust::Pinned([0xab; 32])
        );
        assert!(Trust::pinned(&hex).is_err());
        assert!(Trust::pinned("sha256:abcd").is_err());
        assert!(Trust::pinned(&format!("sha256:{}", "zz".repeat(32))).is_err());
    }

    #[test]
    fn keygen_output_loads_and_prints_its_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, print) = keygen(&["localhost".into(), "127.0.0.1".into()]).unwrap();
        std::fs::write(dir.path().join("c.pem"), cert).unwrap();
        std::fs::write(dir.path().join("k.pem"), key).unwrap();
        let server = ServerTls::load(&dir.path().join("c.pem"), &dir.path().join("k.pem")).unwrap();
        assert_eq!(server.fingerprint, print);
        assert!(matches!(Trust::pinned(&print), Ok(Trust::Pinned(_))));
    }

    #[test]
    fn pem_files_with_the_wrong_or_broken_sections_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, _) = keygen(&["localhost".into()]).unwrap();
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        // Swapped files: a certificate where the key belongs and the other way round.
        std::fs::write(&c, &key).unwrap();
        std::fs::write(&k, &cert).unwrap();
        let swapped = ServerTls::load(&c, &k).err().unwrap().to_string();
        assert!(swapped.contains("holds no PEM certificate"), "{swapped}");
        std::fs::write(&c, &cert).unwrap();
        let no_key = ServerTls::load(&c, &k).err().unwrap().to_string();
        assert!(no_key.contains("holds no PEM private key"), "{no_key}");
        // Both sections in one file serve as either, as with rustls-pemfile.
        std::fs::write(&c, format!("{key}{cert}")).unwrap();
        assert!(ServerTls::load(&c, &c).is_ok());
        // A section without its END line is a parse error naming the file.
        std::fs::write(&k, key.lines().take(3).collect::<Vec<_>>().join("\n")).unwrap();
        let broken = ServerTls::load(&c, &k).err().unwrap().to_string();
        assert!(broken.contains("k.pem") && !broken.contains("holds no"), "{broken}");
    }
}
