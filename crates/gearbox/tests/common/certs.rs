//! Test certificates made with rcgen: a CA, a server certificate for 127.0.0.1 and
//! localhost, client certificates by CN, and a second CA nobody trusts.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

struct Authority {
    cert: Certificate,
    key: KeyPair,
}

impl Authority {
    fn new(name: &str) -> Authority {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        Authority { cert, key }
    }

    fn issue(&self, cn: &str, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Certificate files in a directory of their own (removed on drop).
pub struct Certs {
    pub dir: PathBuf,
    /// The CA that signs the server's and the clients' certificates.
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    authority: Authority,
    stranger: Authority,
}

impl Certs {
    pub fn new() -> Certs {
        let dir = super::temp_data_dir().with_extension("certs");
        std::fs::create_dir_all(&dir).unwrap();
        let authority = Authority::new("gearbox test CA");
        let stranger = Authority::new("some other CA");
        let ca = write(&dir, "ca.pem", &authority.cert.pem());
        let (cert, key) = authority.issue("gearbox", &["localhost", "127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
        let server_cert = write(&dir, "server.pem", &cert);
        let server_key = write(&dir, "server.key", &key);
        Certs { dir, ca, server_cert, server_key, authority, stranger }
    }

    /// A client certificate with subject CN `cn`, signed by the CA: (certificate, key).
    pub fn client(&self, cn: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = self.authority.issue(cn, &[], ExtendedKeyUsagePurpose::ClientAuth);
        (write(&self.dir, &format!("{cn}.pem"), &cert), write(&self.dir, &format!("{cn}.key"), &key))
    }

    /// A client certificate signed by a CA the server does not trust.
    pub fn foreign_client(&self, cn: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = self.stranger.issue(cn, &[], ExtendedKeyUsagePurpose::ClientAuth);
        (write(&self.dir, &format!("foreign-{cn}.pem"), &cert), write(&self.dir, &format!("foreign-{cn}.key"), &key))
    }

    /// The PEM file of the CA nobody trusts: a client that trusts only it refuses the
    /// server's certificate.
    pub fn foreign_ca(&self) -> PathBuf {
        write(&self.dir, "foreign-ca.pem", &self.stranger.cert.pem())
    }

    /// A new server certificate (same CA) in place of the old files, for reload tests: the
    /// returned PEM lets a test tell which one the server presents.
    pub fn replace_server_cert(&self, cn: &str) -> String {
        let (cert, key) = self.authority.issue(cn, &["localhost", "127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
        write(&self.dir, "server.pem", &cert);
        write(&self.dir, "server.key", &key);
        cert
    }

    /// The `--ssl-*` flags for a server with these files.
    pub fn server_flags(&self) -> Vec<String> {
        let path = |p: &Path| p.to_str().unwrap().to_string();
        vec![
            "--ssl-certificate".into(),
            path(&self.server_cert),
            "--ssl-key".into(),
            path(&self.server_key),
            "--ssl-ca-file".into(),
            path(&self.ca),
        ]
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}
