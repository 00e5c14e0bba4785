//! TLS to the servers: which CAs a server's certificate must chain to, the client certificate
//! to present, and the name to check the server's certificate against.
//!
//! ```no_run
//! # fn demo() -> Result<(), gearbox_client::TlsError> {
//! use gearbox_client::{Client, Tls};
//! let tls = Tls::builder()
//!     .ca_file("tls/ca.pem")
//!     .client_certificate("tls/web.pem", "tls/web.key")
//!     .build()?;
//! let client = Client::new(["jobs.example.com:4740"]).with_tls(tls);
//! # Ok(()) }
//! ```
//!
//! Files are PEM: certificates (the client's first, then any intermediates), and a PKCS#8,
//! PKCS#1 or SEC1 private key. TLS 1.2 and 1.3 (rustls with ring).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::Error;

/// Why TLS settings could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("cannot read {what} {}: {error}", path.display())]
    Read { what: &'static str, path: PathBuf, error: std::io::Error },
    #[error("{} holds no {what} in PEM form", path.display())]
    Empty { what: &'static str, path: PathBuf },
    #[error("{}: bad {what}: {reason}", path.display())]
    Bad { what: &'static str, path: PathBuf, reason: String },
    #[error("bad TLS server name {0:?}: give a DNS name or an IP address")]
    ServerName(String),
}

/// What a [`Tls`] is made of; [`TlsBuilder::build`] reads the files.
#[derive(Clone, Debug, Default)]
pub struct TlsBuilder {
    ca_file: Option<PathBuf>,
    client_certificate: Option<(PathBuf, PathBuf)>,
    server_name: Option<String>,
}

impl TlsBuilder {
    /// Servers' certificates must chain to a CA in this PEM file. Without one, to a public
    /// CA (Mozilla's list, as browsers trust).
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> TlsBuilder {
        self.ca_file = Some(path.into());
        self
    }

    /// Presents this certificate (PEM, then any intermediates) with its private key, for
    /// servers that ask for one; gearbox takes its subject CN as the connection's identity.
    pub fn client_certificate(mut self, certificate: impl Into<PathBuf>, key: impl Into<PathBuf>) -> TlsBuilder {
        self.client_certificate = Some((certificate.into(), key.into()));
        self
    }

    /// Checks every server's certificate against this name instead of the host part of its
    /// address (an IP address is checked against the certificate's IP names).
    pub fn server_name(mut self, name: impl Into<String>) -> TlsBuilder {
        self.server_name = Some(name.into());
        self
    }

    /// Reads the files into a TLS configuration.
    pub fn build(self) -> Result<Tls, TlsError> {
        let mut roots = RootCertStore::empty();
        match &self.ca_file {
            Some(path) => {
                for cert in certificates(path, "CA certificate")? {
                    roots.add(cert).map_err(|e| TlsError::Bad {
                        what: "CA certificate",
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("ring supports TLS 1.2 and 1.3")
            .with_root_certificates(roots);
        let config = match &self.client_certificate {
            Some((cert, key)) => {
                let chain = certificates(cert, "certificate")?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_error(e, "private key", key))?;
                builder.with_client_auth_cert(chain, key).map_err(|e| TlsError::Bad {
                    what: "certificate and key",
                    path: cert.clone(),
                    reason: e.to_string(),
                })?
            }
            None => builder.with_no_client_auth(),
        };
        let server_name = match &self.server_name {
            Some(name) => Some(ServerName::try_from(name.clone()).map_err(|_| TlsError::ServerName(name.clone()))?),
            None => None,
        };
        Ok(Tls {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
            ca_file: self.ca_file,
            client_certificate: self.client_certificate.map(|(cert, _)| cert),
        })
    }
}

/// TLS settings loaded once and shared by every connection: give it to
/// [`Client::with_tls`](crate::Client::with_tls),
/// [`Worker::with_tls`](crate::worker::Worker::with_tls) or
/// [`Connector::with_tls`](crate::Connector::with_tls).
#[derive(Clone)]
pub struct Tls {
    connector: TlsConnector,
    server_name: Option<ServerName<'static>>,
    /// For error messages: what the server's certificate was checked against.
    ca_file: Option<PathBuf>,
    client_certificate: Option<PathBuf>,
}

impl Tls {
    pub fn builder() -> TlsBuilder {
        TlsBuilder::default()
    }

    /// The TLS handshake on a connected socket to `addr` (`HOST:PORT`).
    pub(crate) async fn handshake(&self, tcp: TcpStream, addr: &str) -> Result<TlsStream<TcpStream>, Error> {
        let name = match &self.server_name {
            Some(name) => name.clone(),
            None => ServerName::try_from(host(addr).to_string()).map_err(|_| Error::Tls {
                server: addr.to_string(),
                reason: format!("{:?} is no DNS name or IP address to check the certificate against", host(addr)),
            })?,
        };
        self.connector.connect(name, tcp).await.map_err(|e| self.error(addr, &e))
    }

    /// A TLS failure on the connection to `addr`, said with what the user can change.
    pub(crate) fn error(&self, addr: &str, e: &std::io::Error) -> Error {
        let trusted = match &self.ca_file {
            Some(path) => format!("a CA in {}", path.display()),
            None => "a public CA (no CA file was given)".to_string(),
        };
        let rustls_error = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>());
        let reason = match rustls_error {
            Some(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer | CertificateError::BadSignature,
            )) => {
                format!("the server's certificate is not signed by {trusted} ({e})")
            }
            Some(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => format!("{e}: the certificate is not for the name dialled; set the TLS server name to one it holds"),
            Some(rustls::Error::AlertReceived(alert)) => match (alert, &self.client_certificate) {
                (AlertDescription::CertificateRequired | AlertDescription::HandshakeFailure, None) => {
                    format!("the server wants a client certificate, and none was given ({e})")
                }
                (_, Some(cert)) if refuses_certificate(*alert) => {
                    format!("the server refused the client certificate {} ({e})", cert.display())
                }
                _ => format!("the server ended the handshake: {e}"),
            },
            Some(rustls::Error::InvalidMessage(_)) => {
                format!("the server does not speak TLS on this port: is it a plaintext port? ({e})")
            }
            Some(_) => e.to_string(),
            None if matches!(e.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset) => {
                "the server closed the connection during the TLS handshake: is it a plaintext port?".to_string()
            }
            None => e.to_string(),
        };
        Error::Tls { server: addr.to_string(), reason }
    }
}

/// Alerts a server sends when it does not accept the client's certificate.
fn refuses_certificate(alert: AlertDescription) -> bool {
    matches!(
        alert,
        AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateRevoked
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::AccessDenied
            | AlertDescription::DecryptError
    )
}

/// The host part of `HOST:PORT` (`[::1]:4730` gives `::1`).
fn host(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    addr.rsplit_once(':').map_or(addr, |(host, _)| host)
}

fn certificates(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(e, what, path))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(e, what, path))?;
    if certs.is_empty() {
        return Err(TlsError::Empty { what, path: path.into() });
    }
    Ok(certs)
}

fn pem_error(e: rustls::pki_types::pem::Error, what: &'static str, path: &Path) -> TlsError {
    match e {
        rustls::pki_types::pem::Error::Io(error) => TlsError::Read { what, path: path.into(), error },
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::Empty { what, path: path.into() },
        e => TlsError::Bad { what, path: path.into(), reason: e.to_string() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_of_an_address_is_checked_against_the_certificate() {
        assert_eq!(host("jobs.example.com:4740"), "jobs.example.com");
        assert_eq!(host("127.0.0.1:4730"), "127.0.0.1");
        assert_eq!(host("[::1]:4730"), "::1");
        assert_eq!(host("localhost"), "localhost");
    }

    #[test]
    fn missing_and_empty_files_are_named() {
        let e = Tls::builder().ca_file("/nonexistent/ca.pem").build().err().unwrap();
        assert!(e.to_string().starts_with("cannot read CA certificate /nonexistent/ca.pem"), "{e}");
        let empty = std::env::temp_dir().join(format!("gearbox-client-empty-{}.pem", std::process::id()));
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = Tls::builder().ca_file(&empty).build().err().unwrap();
        assert_eq!(e.to_string(), format!("{} holds no CA certificate in PEM form", empty.display()));
        std::fs::remove_file(&empty).unwrap();
        let e = Tls::builder().server_name("not a name").build().err().unwrap();
        assert!(matches!(e, TlsError::ServerName(_)), "{e}");
    }
}
