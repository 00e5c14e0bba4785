//! Where the client commands connect, and how: plaintext or TLS, with or without a token;
//! and the admin-line exchange they share.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use gearbox_client::{Client, Connector, Tls};
use tokio::io::AsyncReadExt;

/// The servers, and the TLS and token flags of every command that connects.
///
/// Any `--ssl-*` flag on the command line turns TLS on. The libgearman variables
/// (`GEARMAN_CA_CERTIFICATE`, `GEARMAN_CLIENT_PEM`, `GEARMAN_CLIENT_KEY`) stand in for the
/// flags not given, but only once TLS is on (`--ssl`, `GEARBOX_SSL=1`, or a flag): they are
/// often set for every program of a machine, plaintext ones too.
#[derive(clap::Args, Clone)]
#[command(next_help_heading = "Connection")]
pub struct Servers {
    /// Job server HOST:PORT; repeat (or comma-separate) for several
    #[arg(
        long = "server",
        short = 's',
        env = "GEARBOX_SERVERS",
        value_delimiter = ',',
        default_value = "127.0.0.1:4730",
        global = true
    )]
    pub servers: Vec<String>,
    /// Connect with TLS; any --ssl-* flag implies it, the GEARMAN_* variables do not
    #[arg(long, env = "GEARBOX_SSL", value_parser = clap::builder::BoolishValueParser::new(), global = true)]
    ssl: bool,
    /// PEM file of the CAs the servers' certificates must chain to [env: GEARMAN_CA_CERTIFICATE]
    /// [default: the public CAs]
    #[arg(long, value_name = "FILE", global = true)]
    ssl_ca_file: Option<PathBuf>,
    /// PEM file of the client certificate, for servers that ask for one (its CN is the
    /// identity gearbox's access list knows) [env: GEARMAN_CLIENT_PEM]
    #[arg(long, value_name = "FILE", global = true)]
    ssl_certificate: Option<PathBuf>,
    /// PEM file of the client certificate's private key [env: GEARMAN_CLIENT_KEY]
    #[arg(long, value_name = "FILE", global = true)]
    ssl_key: Option<PathBuf>,
    /// Name the servers' certificates must hold [default: the host of each --server]
    #[arg(long, value_name = "NAME", global = true)]
    ssl_server_name: Option<String>,
    /// Token sent first on every connection (an identity of gearbox's access list); the
    /// variable keeps it out of the process list
    #[arg(long, env = "GEARBOX_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
}

impl Servers {
    /// A client of these servers, connecting as the flags say.
    pub fn client(&self) -> anyhow::Result<Client> {
        let mut client = Client::new(&self.servers);
        if let Some(tls) = self.tls()? {
            client = client.with_tls(tls);
        }
        if let Some(token) = &self.token {
            client = client.with_token(token.clone());
        }
        Ok(client)
    }

    /// Opens connections as the flags say.
    pub fn connector(&self) -> anyhow::Result<Connector> {
        let mut connector = Connector::new();
        if let Some(tls) = self.tls()? {
            connector = connector.with_tls(tls);
        }
        if let Some(token) = &self.token {
            connector = connector.with_token(token.clone());
        }
        Ok(connector)
    }

    fn tls(&self) -> anyhow::Result<Option<Tls>> {
        let flagged = self.ssl_ca_file.is_some()
            || self.ssl_certificate.is_some()
            || self.ssl_key.is_some()
            || self.ssl_server_name.is_some();
        if !(self.ssl || flagged) {
            return Ok(None);
        }
        let env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        let ca = self.ssl_ca_file.clone().or_else(|| env("GEARMAN_CA_CERTIFICATE"));
        let certificate = self.ssl_certificate.clone().or_else(|| env("GEARMAN_CLIENT_PEM"));
        let key = self.ssl_key.clone().or_else(|| env("GEARMAN_CLIENT_KEY"));
        let mut tls = Tls::builder();
        if let Some(ca) = ca {
            tls = tls.ca_file(ca);
        }
        match (certificate, key) {
            (Some(certificate), Some(key)) => tls = tls.client_certificate(certificate, key),
            (None, None) => {}
            (Some(certificate), None) => {
                bail!(
                    "the client certificate {} needs its key: --ssl-key (or GEARMAN_CLIENT_KEY)",
                    certificate.display()
                )
            }
            (None, Some(key)) => {
                bail!("the key {} needs its certificate: --ssl-certificate (or GEARMAN_CLIENT_PEM)", key.display())
            }
        }
        if let Some(name) = &self.ssl_server_name {
            tls = tls.server_name(name.clone());
        }
        Ok(Some(tls.build()?))
    }
}

/// A client error, with what to do about it when the fix is a flag.
pub fn explain(e: gearbox_client::Error) -> anyhow::Error {
    match &e {
        gearbox_client::Error::Server { code, .. } if code == "TLS_REQUIRED" => {
            anyhow::Error::new(e).context("add --ssl")
        }
        _ => e.into(),
    }
}

/// Sends one admin line and reads the reply (a single line, or a listing ending in "."). The
/// connection is opened as `connector` says: TLS and the token (a binary OPTION_REQ, which the
/// server takes before admin lines on the same connection).
pub async fn admin_line(connector: &Connector, server: &str, line: &str) -> anyhow::Result<String> {
    let mut stream = connector.connect(server).await.map_err(explain)?;
    stream.send(format!("{line}\n").as_bytes()).await?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf)).await??;
        if n == 0 {
            bail!("{server} closed the connection");
        }
        reply.extend_from_slice(&buf[..n]);
        if reply.starts_with(b"ERR TLS_REQUIRED") {
            bail!("{server} speaks TLS on this port: add --ssl");
        }
        let single = reply.starts_with(b"OK") || reply.starts_with(b"ERR");
        if (single && reply.ends_with(b"\n")) || reply == b".\n" || reply.ends_with(b"\n.\n") {
            return Ok(String::from_utf8_lossy(&reply).into_owned());
        }
    }
}
