//! Who may connect and what they may do: TLS on the Gearman port (and HTTP), the identity of
//! a connection, the access list, and the audit of what was refused.
//!
//! - `tls`: certificates and the rustls configurations, reloaded on SIGHUP;
//! - `acl`: the `--acl` file: grants by identity, tokens stored hashed;
//! - `audit`: refusals counted and logged, rate-limited.

pub mod acl;
pub mod audit;
pub mod tls;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

pub use acl::{Acl, AdminRight, Grant};
pub use audit::{Audit, Refused};
pub use tls::{Tls, TlsError, TlsFiles, VerifyClient};

/// The security settings of a server.
#[derive(Clone, Debug, Default)]
pub struct SecurityOptions {
    /// Certificate files, when TLS is on (`--ssl` or `--ssl-port`).
    pub tls: Option<TlsFiles>,
    /// `--acl FILE`; without it everyone may do everything, as with gearmand.
    pub acl: Option<PathBuf>,
    pub http: HttpAuthOptions,
}

/// How the HTTP side is protected.
#[derive(Clone, Debug, Default)]
pub struct HttpAuthOptions {
    /// Tokens that may do everything (`--http-token`, its file, `GEARBOX_HTTP_TOKEN`).
    pub admin_tokens: Vec<String>,
    /// Tokens that may only read (`--http-read-token`).
    pub read_tokens: Vec<String>,
    /// Serve HTTPS with the TLS certificate (`--http-ssl`, implied by `--ssl`).
    pub tls: bool,
    /// `/metrics` without a token, for scrapers (`--http-open-metrics`).
    pub open_metrics: bool,
    /// `--http-insecure`: no token on a network address, answering any host name.
    pub insecure: bool,
}

impl HttpAuthOptions {
    pub fn has_tokens(&self) -> bool {
        !self.admin_tokens.is_empty() || !self.read_tokens.is_empty()
    }
}

/// Why the security settings could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Acl(String),
}

/// The security state of a running server, shared by every connection.
pub struct Security {
    pub tls: Option<Tls>,
    acl_path: Option<PathBuf>,
    acl: RwLock<Option<Arc<Acl>>>,
    /// Bumped by every reload, so that connections look their grant up again.
    generation: AtomicU64,
    pub audit: Audit,
    pub http: HttpAuthOptions,
}

impl Security {
    pub fn open(options: &SecurityOptions) -> Result<Security, SecurityError> {
        let tls = options.tls.clone().map(Tls::load).transpose()?;
        let acl = options.acl.as_deref().map(Acl::load).transpose().map_err(SecurityError::Acl)?;
        Ok(Security {
            tls,
            acl_path: options.acl.clone(),
            acl: RwLock::new(acl.map(Arc::new)),
            generation: AtomicU64::new(0),
            audit: Audit::default(),
            http: options.http.clone(),
        })
    }

    /// No TLS and no access list: every connection may do everything.
    pub fn open_to_all() -> Security {
        Security::open(&SecurityOptions::default()).expect("nothing to load")
    }

    /// SIGHUP: reads the certificate, key, CA and access list again. What fails to load is
    /// logged and the old one stays in force; open connections keep their TLS session and
    /// get the new grants from their next packet on.
    pub fn reload(&self) {
        if let Some(tls) = &self.tls {
            match tls.reload() {
                Ok(()) => tracing::info!("reloaded the TLS certificate and key"),
                Err(e) => tracing::error!("TLS reload failed, the old certificate stays: {e}"),
            }
        }
        if let Some(path) = &self.acl_path {
            match Acl::load(path) {
                Ok(acl) => {
                    *self.acl.write().unwrap() = Some(Arc::new(acl));
                    self.generation.fetch_add(1, Ordering::Release);
                    tracing::info!("reloaded the ACL {}", path.display());
                }
                Err(e) => tracing::error!("ACL reload failed, the old one stays: {e}"),
            }
        }
    }

    pub fn has_acl(&self) -> bool {
        self.acl_path.is_some()
    }

    /// The grant of an identity (`None`: anonymous), or `None` when there is no access list.
    pub fn grant(&self, identity: Option<&str>) -> Option<Arc<Grant>> {
        self.acl.read().unwrap().as_ref().map(|acl| acl.grant(identity))
    }

    /// The identity whose token has this hash ([`acl::token_hash`]); `None` if the access
    /// list does not know it (or there is none).
    pub fn token_identity(&self, hash: &str) -> Option<String> {
        self.acl.read().unwrap().as_ref()?.token_identity(hash).map(str::to_owned)
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// Why OPTION_REQ auth=TOKEN was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthError {
    /// The server has no access list: tokens would mean nothing.
    NoAcl,
    /// The access list has no such token.
    Unknown,
}

/// One connection's identity and grant, looked up again after a reload.
pub struct Access {
    /// From the client certificate.
    certificate: Option<String>,
    /// From OPTION_REQ auth=TOKEN, wins over the certificate: the token's hash (to look it
    /// up again after a reload, which may have revoked it) and its identity.
    token: Option<(String, String)>,
    generation: u64,
    /// `None`: no access list, everything is allowed.
    grant: Option<Arc<Grant>>,
}

impl Access {
    pub fn new(security: &Security, certificate: Option<String>) -> Access {
        // The generation first: a reload in between is then picked up at the next refresh.
        let generation = security.generation();
        let grant = security.grant(certificate.as_deref());
        Access { certificate, token: None, generation, grant }
    }

    /// Picks up a reloaded access list; true if it was reloaded (the grant may have changed).
    /// A token the new list no longer has falls back to the certificate's identity.
    pub fn refresh(&mut self, security: &Security) -> bool {
        let generation = security.generation();
        if generation == self.generation {
            return false;
        }
        self.generation = generation;
        if let Some((hash, name)) = &mut self.token {
            match security.token_identity(hash) {
                Some(now) => *name = now,
                None => {
                    tracing::info!(identity = %name, "a connection's token is no longer in the ACL");
                    self.token = None;
                }
            }
        }
        self.grant = security.grant(self.identity_name());
        true
    }

    fn identity_name(&self) -> Option<&str> {
        self.token.as_ref().map(|(_, name)| name.as_str()).or(self.certificate.as_deref())
    }

    /// The name refusals are logged under.
    pub fn identity(&self) -> &str {
        self.identity_name().unwrap_or(acl::ANONYMOUS)
    }

    /// `None` when there is no access list.
    pub fn grant(&self) -> Option<&Grant> {
        self.grant.as_deref()
    }

    /// OPTION_REQ auth=TOKEN: the connection becomes the token's identity. On error nothing
    /// changes.
    pub fn authenticate(&mut self, security: &Security, token: &[u8]) -> Result<(), AuthError> {
        if !security.has_acl() {
            return Err(AuthError::NoAcl);
        }
        let hash = acl::token_hash(token);
        let name = security.token_identity(&hash).ok_or(AuthError::Unknown)?;
        self.grant = security.grant(Some(&name));
        self.token = Some((hash, name));
        Ok(())
    }
}
