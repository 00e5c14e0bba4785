//! TLS: the certificate, key and CA files of gearmand's flags, loaded into rustls server
//! configurations (one for the Gearman port, one for HTTP), reloadable on SIGHUP.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// Whether a client must present a certificate signed by `--ssl-ca-file`
/// (`--ssl-verify-client`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerifyClient {
    /// A client without a valid certificate is refused during the handshake (the default
    /// with a CA file).
    Required,
    /// A client may connect without a certificate (it is then anonymous), but one it
    /// presents must verify.
    Optional,
    /// Certificates are not asked for: gearmand's behaviour.
    None,
}

impl std::str::FromStr for VerifyClient {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "required" => Ok(VerifyClient::Required),
            "optional" => Ok(VerifyClient::Optional),
            "none" => Ok(VerifyClient::None),
            _ => Err(format!("bad --ssl-verify-client {s:?}: use required, optional or none")),
        }
    }
}

/// The files named by `--ssl-certificate`, `--ssl-key` and `--ssl-ca-file`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM: the server's certificate, then any intermediates.
    pub certificate: PathBuf,
    /// PEM: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM: the CAs client certificates must be signed by.
    pub ca: Option<PathBuf>,
    pub verify_client: VerifyClient,
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{path} holds no {what} in PEM form")]
    Empty { what: &'static str, path: PathBuf },
    #[error("{0}")]
    Config(String),
}

/// The server's TLS configurations; [`Tls::reload`] swaps them for connections accepted
/// afterwards, while open connections keep the one they started with.
pub struct Tls {
    files: TlsFiles,
    gearman: RwLock<Arc<ServerConfig>>,
    http: RwLock<Arc<ServerConfig>>,
}

impl Tls {
    /// Reads the files and builds both configurations.
    pub fn load(files: TlsFiles) -> Result<Tls, TlsError> {
        let (gearman, http) = build(&files)?;
        Ok(Tls { files, gearman: RwLock::new(gearman), http: RwLock::new(http) })
    }

    /// Reads the files again; on failure the configurations in use stay.
    pub fn reload(&self) -> Result<(), TlsError> {
        let (gearman, http) = build(&self.files)?;
        *self.gearman.write().unwrap() = gearman;
        *self.http.write().unwrap() = http;
        Ok(())
    }

    /// For a new Gearman connection: asks for client certificates as configured.
    pub fn gearman(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.gearman.read().unwrap().clone())
    }

    /// For a new HTTP connection: the same certificate, no client certificates (browsers),
    /// HTTP/1.1 by ALPN.
    pub fn http(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.http.read().unwrap().clone())
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn build(files: &TlsFiles) -> Result<(Arc<ServerConfig>, Arc<ServerConfig>), TlsError> {
    let chain = certificates(&files.certificate, "certificate")?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| pem_error(e, "private key", &files.key))?;
    let config_error = |e: rustls::Error| TlsError::Config(format!("{}: {e}", files.certificate.display()));
    let builder = || {
        ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))
    };
    let verifier = match (&files.ca, files.verify_client) {
        (Some(ca), verify) if verify != VerifyClient::None => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(ca, "CA certificate")? {
                roots.add(cert).map_err(|e| TlsError::Config(format!("{}: {e}", ca.display())))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            let verifier = if verify == VerifyClient::Optional { verifier.allow_unauthenticated() } else { verifier };
            Some(verifier.build().map_err(|e| TlsError::Config(format!("{}: {e}", ca.display())))?)
        }
        _ => None,
    };
    let gearman = match verifier {
        Some(verifier) => builder()?.with_client_cert_verifier(verifier),
        None => builder()?.with_no_client_auth(),
    }
    .with_single_cert(chain.clone(), key.clone_key())
    .map_err(config_error)?;
    let mut http = builder()?.with_no_client_auth().with_single_cert(chain, key).map_err(config_error)?;
    http.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((Arc::new(gearman), Arc::new(http)))
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
        rustls::pki_types::pem::Error::Io(source) => TlsError::Read { what, path: path.into(), source },
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::Empty { what, path: path.into() },
        e => TlsError::Config(format!("{}: bad {what}: {e}", path.display())),
    }
}

/// The subject CN of a verified client certificate: the connection's identity.
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}
