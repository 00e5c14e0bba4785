//! Server settings: command-line flags (gearmand's where they make sense), `GEARBOX_*`
//! environment variables, and a TOML file, in that order of precedence, then defaults.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::broker::BrokerConfig;
use crate::http::HttpSpec;
use crate::security::{HttpAuthOptions, SecurityOptions, TlsFiles, VerifyClient};
use crate::server::ServeOptions;
use crate::store::QueueSpec;

/// Every setting is optional here so that the sources can be layered.
#[derive(clap::Args, Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Settings {
    /// TOML file with any of these settings (kebab-case keys, e.g. `job-retries = 3`).
    #[arg(short = 'c', long, env = "GEARBOX_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Address to listen on; repeat for several [default: 0.0.0.0]
    #[arg(short = 'L', long, env = "GEARBOX_LISTEN", value_delimiter = ',')]
    pub listen: Option<Vec<String>>,

    /// Port to listen on [default: 4730]
    #[arg(short = 'p', long, env = "GEARBOX_PORT")]
    pub port: Option<u16>,

    /// Connections the kernel completes and queues while the server is busy accepting (the
    /// kernel caps it at net.core.somaxconn) [default: 1024]
    #[arg(short = 'b', long, env = "GEARBOX_BACKLOG")]
    pub backlog: Option<u32>,

    /// I/O threads; 0 or 1 runs everything on one thread [default: 1]
    #[arg(short = 't', long, env = "GEARBOX_THREADS")]
    pub threads: Option<usize>,

    /// Attempts before a job whose workers keep disappearing is failed; 0 = no limit [default: 0]
    #[arg(short = 'j', long, env = "GEARBOX_JOB_RETRIES")]
    pub job_retries: Option<u32>,

    /// Largest packet body accepted, in bytes [default: 67108864]
    #[arg(long, env = "GEARBOX_MAX_PACKET_SIZE")]
    pub max_packet_size: Option<u32>,

    /// Log level: ERROR, WARNING, INFO, DEBUG or TRACE (gearmand's names are accepted) [default: INFO]
    #[arg(long, env = "GEARBOX_VERBOSE", num_args = 0..=1, default_missing_value = "INFO")]
    pub verbose: Option<String>,

    /// Write the process id to this file
    #[arg(short = 'P', long, env = "GEARBOX_PID_FILE")]
    pub pid_file: Option<PathBuf>,

    /// Log to this file instead of standard error ("none" to disable)
    #[arg(short = 'l', long, env = "GEARBOX_LOG_FILE")]
    pub log_file: Option<PathBuf>,

    /// Let the admin `shutdown` command stop the server
    #[arg(long, env = "GEARBOX_ALLOW_SHUTDOWN", num_args = 0..=1, default_missing_value = "true")]
    pub allow_shutdown: Option<bool>,

    /// Where queued jobs are kept: embedded (durable, in --data-dir), memory (lost on restart),
    /// mysql://USER[:PASS]@HOST:PORT/DB or postgres://USER@HOST:PORT/DB [default: embedded]
    #[arg(long, env = "GEARBOX_QUEUE")]
    pub queue: Option<String>,

    /// How long to wait at start for a database queue table's lock when another session holds
    /// it (a killed predecessor's, until the database ends its session), e.g. 30s or 2m; 0
    /// fails at once [default: 30s]
    #[arg(long, env = "GEARBOX_QUEUE_LOCK_WAIT")]
    pub queue_lock_wait: Option<String>,

    /// Run as one node of a cluster: several servers with the same --queue database table act
    /// as one job server (see README, "Running a cluster")
    #[arg(long, env = "GEARBOX_CLUSTER", num_args = 0..=1, default_missing_value = "true")]
    pub cluster: Option<bool>,

    /// How long a cluster node that stops renewing keeps its jobs before other nodes take
    /// them over, e.g. 10s [default: 10s]
    #[arg(long, env = "GEARBOX_NODE_LEASE")]
    pub node_lease: Option<String>,

    /// Directory of the embedded queue [default: ~/.local/share/gearbox]
    #[arg(long, env = "GEARBOX_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Open files (connections, roughly) to allow; above the hard limit it takes root
    /// (CAP_SYS_RESOURCE); the server does not start if it cannot have them [default: the hard
    /// limit]
    #[arg(short = 'f', long, env = "GEARBOX_FILE_DESCRIPTORS")]
    pub file_descriptors: Option<u64>,

    /// Host name used in job handles [default: the machine's host name]
    #[arg(long, env = "GEARBOX_HOSTNAME")]
    pub hostname: Option<String>,

    /// Where every job attempt's outcome is recorded: embedded (in --data-dir),
    /// mongodb://HOST:PORT/DB, or none [default: embedded]
    #[arg(long, env = "GEARBOX_JOB_LOG")]
    pub job_log: Option<String>,

    /// How long job-log records are kept, e.g. 7d or 12h; 0 keeps them [default: 7d]
    #[arg(long, env = "GEARBOX_JOB_LOG_RETENTION")]
    pub job_log_retention: Option<String>,

    /// Most disk the embedded job log may take, e.g. 512MB, 10GB or 1GiB; its oldest records are
    /// deleted to stay under it; none for no limit [default: 1GiB]
    #[arg(long, env = "GEARBOX_JOB_LOG_MAX_SIZE")]
    pub job_log_max_size: Option<String>,

    /// Keep payloads and results in the job log, cut to this many bytes [default: not kept]
    #[arg(long, env = "GEARBOX_JOB_LOG_BODIES")]
    pub job_log_bodies: Option<usize>,

    /// Address of the dashboard, /metrics and the JSON API, or off [default: 127.0.0.1:4731,
    /// skipped with a warning if busy]
    #[arg(long, env = "GEARBOX_HTTP")]
    pub http: Option<String>,

    /// Make every Gearman listener TLS-only, as gearmand's --ssl does (needs
    /// --ssl-certificate and --ssl-key); implies --http-ssl
    #[arg(long, env = "GEARBOX_SSL", num_args = 0..=1, default_missing_value = "true")]
    pub ssl: Option<bool>,

    /// Also listen for TLS on this port, beside the plaintext one, so clients can move over
    /// one by one
    #[arg(long, env = "GEARBOX_SSL_PORT")]
    pub ssl_port: Option<u16>,

    /// PEM file with the server's certificate (and any intermediates)
    #[arg(long, env = "GEARBOX_SSL_CERTIFICATE")]
    pub ssl_certificate: Option<PathBuf>,

    /// PEM file with the server's private key
    #[arg(long, env = "GEARBOX_SSL_KEY")]
    pub ssl_key: Option<PathBuf>,

    /// PEM file with the CA(s) that sign client certificates; the certificate's subject CN is
    /// the connection's identity
    #[arg(long, env = "GEARBOX_SSL_CA_FILE")]
    pub ssl_ca_file: Option<PathBuf>,

    /// Client certificates with --ssl-ca-file: required, optional, or none (not asked for, as
    /// gearmand) [default: required]
    #[arg(long, env = "GEARBOX_SSL_VERIFY_CLIENT")]
    pub ssl_verify_client: Option<String>,

    /// TOML file of identities and what each may submit, work on and administer (see README,
    /// "Securing gearbox"); reloaded on SIGHUP [default: everyone may do everything]
    #[arg(long, env = "GEARBOX_ACL")]
    pub acl: Option<PathBuf>,

    /// Token the HTTP side asks for (Authorization: Bearer, or the dashboard's login); may
    /// do everything
    #[arg(long, env = "GEARBOX_HTTP_TOKEN", hide_env_values = true)]
    pub http_token: Option<String>,

    /// File holding the HTTP admin token (its first line)
    #[arg(long, env = "GEARBOX_HTTP_TOKEN_FILE")]
    pub http_token_file: Option<PathBuf>,

    /// Token that may only read over HTTP (dashboard, GET /api/…, /metrics)
    #[arg(long, env = "GEARBOX_HTTP_READ_TOKEN", hide_env_values = true)]
    pub http_read_token: Option<String>,

    /// File holding the HTTP read-only token (its first line)
    #[arg(long, env = "GEARBOX_HTTP_READ_TOKEN_FILE")]
    pub http_read_token_file: Option<PathBuf>,

    /// Serve HTTP on a non-loopback address without a token
    #[arg(long, env = "GEARBOX_HTTP_INSECURE", num_args = 0..=1, default_missing_value = "true")]
    pub http_insecure: Option<bool>,

    /// Serve the HTTP side over TLS with --ssl-certificate and --ssl-key
    #[arg(long, env = "GEARBOX_HTTP_SSL", num_args = 0..=1, default_missing_value = "true")]
    pub http_ssl: Option<bool>,

    /// Let /metrics be read without a token (for Prometheus scrapers)
    #[arg(long, env = "GEARBOX_HTTP_OPEN_METRICS", num_args = 0..=1, default_missing_value = "true")]
    pub http_open_metrics: Option<bool>,

    /// Retry failed background jobs of FUNCTION (`*`: every function) up to RETRIES more
    /// times, waiting BASE × 2^n (±10%) between attempts, e.g. `resize=5/2s`; repeatable
    /// [default: no retries; BASE 15s]. In the config file: `[retry.FUNCTION]` tables
    /// (retries, backoff = "exponential"|"fixed", base, max-delay)
    #[arg(long = "retry", value_name = "FUNCTION=RETRIES[/BASE]")]
    #[serde(skip)]
    pub retry_flags: Vec<String>,
    #[arg(skip)]
    #[serde(rename = "retry")]
    pub retry_tables: Option<std::collections::BTreeMap<String, crate::lifecycle::config::RetryTable>>,

    /// At most N jobs of FUNCTION run at once on this server, e.g. `report=2`; repeatable.
    /// In the config file: a `[limit]` table of FUNCTION = N
    #[arg(long = "limit", value_name = "FUNCTION=N")]
    #[serde(skip)]
    pub limit_flags: Vec<String>,
    #[arg(skip)]
    #[serde(rename = "limit")]
    pub limit_table: Option<std::collections::BTreeMap<String, u32>>,

    /// Keep background jobs that fail their last attempt in the dead set (keep), or drop them
    /// as gearmand does (none) [default: keep]
    #[arg(long, env = "GEARBOX_DEAD")]
    pub dead: Option<String>,
    /// How long dead jobs are kept, e.g. 30d; 0 for no limit [default: 180d]
    #[arg(long, env = "GEARBOX_DEAD_MAX_AGE")]
    pub dead_max_age: Option<String>,
    /// Most dead jobs kept (the oldest go first); 0 for no limit [default: 10000]
    #[arg(long, env = "GEARBOX_DEAD_MAX_JOBS")]
    pub dead_max_jobs: Option<u64>,

    /// Periodic jobs: `[[schedule]]` tables in the config file (name, function, cron, payload,
    /// priority, timezone)
    #[arg(skip)]
    pub schedule: Option<Vec<crate::lifecycle::Schedule>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("bad config file {path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("unknown log level {0:?} (use ERROR, WARNING, INFO, DEBUG or TRACE)")]
    Verbose(String),
    #[error("{0}")]
    Queue(String),
    #[error("{0}")]
    JobLog(String),
    #[error("{0}")]
    Lifecycle(String),
    #[error("{0}")]
    Security(String),
}

/// Settings with every source applied.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Vec<String>,
    pub port: u16,
    /// The listen backlog of the Gearman port.
    pub backlog: u32,
    pub threads: usize,
    /// The open-files limit to ask for; `None` raises the soft limit to the hard limit.
    pub file_descriptors: Option<u64>,
    pub log_level: tracing::Level,
    pub pid_file: Option<PathBuf>,
    pub log_file: Option<PathBuf>,
    pub http: HttpSpec,
    /// `--ssl`: every Gearman listener speaks TLS only.
    pub tls_only: bool,
    /// `--ssl-port`: a TLS listener on each address beside the plaintext one.
    pub ssl_port: Option<u16>,
    pub serve: ServeOptions,
}

impl Settings {
    /// Fills every setting missing here from `other`.
    fn or(self, other: Settings) -> Settings {
        Settings {
            config: self.config.or(other.config),
            listen: self.listen.or(other.listen),
            port: self.port.or(other.port),
            backlog: self.backlog.or(other.backlog),
            threads: self.threads.or(other.threads),
            job_retries: self.job_retries.or(other.job_retries),
            max_packet_size: self.max_packet_size.or(other.max_packet_size),
            verbose: self.verbose.or(other.verbose),
            pid_file: self.pid_file.or(other.pid_file),
            log_file: self.log_file.or(other.log_file),
            allow_shutdown: self.allow_shutdown.or(other.allow_shutdown),
            hostname: self.hostname.or(other.hostname),
            queue: self.queue.or(other.queue),
            queue_lock_wait: self.queue_lock_wait.or(other.queue_lock_wait),
            cluster: self.cluster.or(other.cluster),
            node_lease: self.node_lease.or(other.node_lease),
            file_descriptors: self.file_descriptors.or(other.file_descriptors),
            data_dir: self.data_dir.or(other.data_dir),
            job_log: self.job_log.or(other.job_log),
            job_log_retention: self.job_log_retention.or(other.job_log_retention),
            job_log_max_size: self.job_log_max_size.or(other.job_log_max_size),
            job_log_bodies: self.job_log_bodies.or(other.job_log_bodies),
            http: self.http.or(other.http),
            retry_flags: if self.retry_flags.is_empty() { other.retry_flags } else { self.retry_flags },
            retry_tables: self.retry_tables.or(other.retry_tables),
            limit_flags: if self.limit_flags.is_empty() { other.limit_flags } else { self.limit_flags },
            limit_table: self.limit_table.or(other.limit_table),
            dead: self.dead.or(other.dead),
            dead_max_age: self.dead_max_age.or(other.dead_max_age),
            dead_max_jobs: self.dead_max_jobs.or(other.dead_max_jobs),
            schedule: self.schedule.or(other.schedule),
            ssl: self.ssl.or(other.ssl),
            ssl_port: self.ssl_port.or(other.ssl_port),
            ssl_certificate: self.ssl_certificate.or(other.ssl_certificate),
            ssl_key: self.ssl_key.or(other.ssl_key),
            ssl_ca_file: self.ssl_ca_file.or(other.ssl_ca_file),
            ssl_verify_client: self.ssl_verify_client.or(other.ssl_verify_client),
            acl: self.acl.or(other.acl),
            http_token: self.http_token.or(other.http_token),
            http_token_file: self.http_token_file.or(other.http_token_file),
            http_read_token: self.http_read_token.or(other.http_read_token),
            http_read_token_file: self.http_read_token_file.or(other.http_read_token_file),
            http_insecure: self.http_insecure.or(other.http_insecure),
            http_ssl: self.http_ssl.or(other.http_ssl),
            http_open_metrics: self.http_open_metrics.or(other.http_open_metrics),
        }
    }

    /// Layers the config file (if any) under these settings and applies defaults.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => Settings::default(),
        };
        let s = self.or(file);
        let tls_only = s.ssl.unwrap_or(false);
        let security = security(&s, tls_only)?;
        let verbose = s.verbose.unwrap_or_else(|| "INFO".into());
        let log_level = parse_level(&verbose).ok_or_else(|| ConfigError::Verbose(verbose.clone()))?;
        let cluster = s.cluster.unwrap_or(false);
        // A cluster's handles read the same on every node, whichever answered.
        let host = s.hostname.unwrap_or_else(|| if cluster { "gearbox".into() } else { host_name() });
        let data_dir = s.data_dir.unwrap_or_else(default_data_dir);
        let mut queue =
            QueueSpec::parse(s.queue.as_deref().unwrap_or("embedded"), &data_dir).map_err(ConfigError::Queue)?;
        if cluster {
            let lease = match s.node_lease.as_deref() {
                Some(lease) => humantime::parse_duration(lease)
                    .ok()
                    .filter(|l| *l >= std::time::Duration::from_secs(2))
                    .ok_or_else(|| ConfigError::Queue(format!("bad node lease {lease:?}: use 2s or more, e.g. 10s")))?,
                None => crate::cluster::DEFAULT_LEASE,
            };
            queue = match queue {
                QueueSpec::Sql(url) => QueueSpec::Cluster { url, lease },
                _ => {
                    return Err(ConfigError::Queue(
                        "--cluster needs a database queue: --queue postgres://… or mysql://…".into(),
                    ))
                }
            };
        }
        let queue_lock_wait = match s.queue_lock_wait.as_deref() {
            Some(wait) => humantime::parse_duration(wait).map_err(|e| {
                ConfigError::Queue(format!("bad queue lock wait {wait:?}: {e} (use e.g. 30s, 2m or 0)"))
            })?,
            None => gearbox_store::DEFAULT_LOCK_WAIT,
        };
        let spec: gearbox_joblog::Spec =
            s.job_log.as_deref().unwrap_or("embedded").parse().map_err(ConfigError::JobLog)?;
        let retention = gearbox_joblog::parse_retention(s.job_log_retention.as_deref().unwrap_or("7d"))
            .map_err(ConfigError::JobLog)?;
        let max_bytes = match s.job_log_max_size.as_deref() {
            Some(size) => gearbox_joblog::parse_size(size).map_err(ConfigError::JobLog)?,
            None => Some(gearbox_joblog::DEFAULT_MAX_BYTES),
        };
        let job_log = (spec != gearbox_joblog::Spec::None).then(|| gearbox_joblog::Options {
            spec,
            data_dir: data_dir.clone(),
            retention,
            max_bytes,
            bodies: s.job_log_bodies,
        });
        use crate::lifecycle::config as lc;
        let retry =
            lc::retry_policies(&s.retry_flags, &s.retry_tables.unwrap_or_default()).map_err(ConfigError::Lifecycle)?;
        let limits = lc::limits(&s.limit_flags, &s.limit_table.unwrap_or_default()).map_err(ConfigError::Lifecycle)?;
        let (keep_dead, dead_max_age, dead_max_jobs) =
            lc::dead_retention(s.dead.as_deref(), s.dead_max_age.as_deref(), s.dead_max_jobs)
                .map_err(ConfigError::Lifecycle)?;
        let schedules = s.schedule.unwrap_or_default();
        crate::lifecycle::validate_schedules(&schedules).map_err(ConfigError::Lifecycle)?;
        let lifecycle =
            crate::lifecycle::LifecycleOptions { limits, keep_dead, dead_max_age, dead_max_jobs, schedules };
        Ok(Config {
            tls_only,
            ssl_port: s.ssl_port,
            listen: s.listen.unwrap_or_else(|| vec!["0.0.0.0".into()]),
            port: s.port.unwrap_or(4730),
            backlog: s.backlog.unwrap_or(1024),
            threads: s.threads.unwrap_or(1),
            file_descriptors: s.file_descriptors,
            log_level,
            pid_file: s.pid_file,
            log_file: s.log_file,
            http: HttpSpec::parse(s.http.as_deref()),
            serve: ServeOptions {
                broker: BrokerConfig {
                    job_retries: s.job_retries.unwrap_or(0),
                    host,
                    retry,
                    ..BrokerConfig::default()
                },
                max_packet: s.max_packet_size.unwrap_or(gearbox_proto::DEFAULT_MAX_PACKET),
                allow_shutdown: s.allow_shutdown.unwrap_or(false),
                verbose: verbose.to_ascii_uppercase(),
                queue,
                queue_lock_wait,
                job_log,
                lifecycle,
                security,
                reload: Default::default(),
            },
        })
    }
}

/// The TLS files, the ACL and the HTTP tokens, checked for what can be checked before start.
fn security(s: &Settings, tls_only: bool) -> Result<SecurityOptions, ConfigError> {
    let err = |m: &str| ConfigError::Security(m.into());
    let wants_tls = tls_only || s.ssl_port.is_some() || s.http_ssl == Some(true);
    if s.ssl_certificate.is_none() && (s.ssl_ca_file.is_some() || s.ssl_verify_client.is_some()) {
        return Err(err(
            "--ssl-ca-file and --ssl-verify-client need --ssl-certificate and --ssl-key (and --ssl or --ssl-port)",
        ));
    }
    let tls = match (&s.ssl_certificate, &s.ssl_key) {
        (Some(certificate), Some(key)) => {
            let verify_client = match s.ssl_verify_client.as_deref() {
                Some(v) => v.parse().map_err(|e: String| err(&e))?,
                None if s.ssl_ca_file.is_some() => VerifyClient::Required,
                None => VerifyClient::None,
            };
            if verify_client != VerifyClient::None && s.ssl_ca_file.is_none() {
                return Err(err("--ssl-verify-client required or optional needs --ssl-ca-file"));
            }
            Some(TlsFiles {
                certificate: certificate.clone(),
                key: key.clone(),
                ca: s.ssl_ca_file.clone(),
                verify_client,
            })
        }
        (None, None) if !wants_tls => None,
        _ => return Err(err("TLS (--ssl, --ssl-port, --http-ssl) needs both --ssl-certificate and --ssl-key")),
    };
    if tls.is_some() && !wants_tls {
        return Err(err("--ssl-certificate and --ssl-key are set but nothing uses them: add --ssl (TLS only) or --ssl-port PORT (TLS beside plaintext)"));
    }
    let token = |value: &Option<String>, file: &Option<PathBuf>, flag: &str| -> Result<Vec<String>, ConfigError> {
        let mut tokens = Vec::new();
        if let Some(t) = value {
            tokens.push(t.trim().to_string());
        }
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| err(&format!("cannot read {flag} {}: {e}", path.display())))?;
            tokens.push(text.lines().next().unwrap_or("").trim().to_string());
        }
        if tokens.iter().any(|t| t.len() < 16) {
            return Err(err(&format!("{flag}: use a token of 16 characters or more (`gearbox token` makes one)")));
        }
        Ok(tokens)
    };
    Ok(SecurityOptions {
        tls,
        acl: s.acl.clone(),
        http: HttpAuthOptions {
            admin_tokens: token(&s.http_token, &s.http_token_file, "--http-token")?,
            read_tokens: token(&s.http_read_token, &s.http_read_token_file, "--http-read-token")?,
            tls: tls_only || s.http_ssl.unwrap_or(false),
            open_metrics: s.http_open_metrics.unwrap_or(false),
            insecure: s.http_insecure.unwrap_or(false),
        },
    })
}

fn read_file(path: &Path) -> Result<Settings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.into(), source })
}

fn parse_level(s: &str) -> Option<tracing::Level> {
    use tracing::Level;
    Some(match s.to_ascii_uppercase().as_str() {
        "FATAL" | "ALERT" | "CRITICAL" | "ERROR" => Level::ERROR,
        "WARN" | "WARNING" => Level::WARN,
        "NOTICE" | "INFO" => Level::INFO,
        "DEBUG" => Level::DEBUG,
        "TRACE" => Level::TRACE,
        _ => return None,
    })
}

/// `$XDG_DATA_HOME/gearbox`, else `~/.local/share/gearbox`.
pub fn default_data_dir() -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local").join("share")));
    base.unwrap_or_else(|| PathBuf::from(".")).join("gearbox")
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "gearbox".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        settings: Settings,
    }

    #[test]
    fn flag_beats_file_and_file_beats_default() {
        let dir = std::env::temp_dir().join(format!("gearbox-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("gearbox.toml");
        std::fs::write(&path, "port = 5000\njob-retries = 3\nqueue-lock-wait = \"2m\"\nfile-descriptors = 4096\n")
            .unwrap();
        let cli = Cli::parse_from(["x", "-c", path.to_str().unwrap(), "--port", "6000", "-f", "8192"]);
        let config = cli.settings.resolve().unwrap();
        assert_eq!(config.port, 6000);
        assert_eq!(config.serve.broker.job_retries, 3);
        assert_eq!(config.serve.queue_lock_wait, std::time::Duration::from_secs(120));
        assert_eq!(config.file_descriptors, Some(8192));
        assert_eq!(config.threads, 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unknown_file_keys_are_rejected() {
        let dir = std::env::temp_dir().join(format!("gearbox-config-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("gearbox.toml");
        std::fs::write(&path, "prot = 5000\n").unwrap();
        let err = Settings { config: Some(path), ..Default::default() }.resolve().unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn queue_lock_wait_defaults_and_parses() {
        let wait = |s: Option<&str>| {
            Settings { queue_lock_wait: s.map(String::from), ..Default::default() }
                .resolve()
                .map(|c| c.serve.queue_lock_wait)
        };
        assert_eq!(wait(None).unwrap(), std::time::Duration::from_secs(30));
        assert_eq!(wait(Some("0")).unwrap(), std::time::Duration::ZERO);
        assert_eq!(wait(Some("1500ms")).unwrap(), std::time::Duration::from_millis(1500));
        assert!(matches!(wait(Some("soon")), Err(ConfigError::Queue(_))));
    }

    #[test]
    fn job_log_max_size_defaults_to_a_gib_and_parses() {
        let dir = std::env::temp_dir().join(format!("gearbox-config-size-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("gearbox.toml");
        let max = |flag: Option<&str>, file: &str| {
            std::fs::write(&path, file).unwrap();
            let s =
                Settings { config: Some(path.clone()), job_log_max_size: flag.map(String::from), ..Default::default() };
            s.resolve().map(|c| c.serve.job_log.unwrap().max_bytes)
        };
        assert_eq!(max(None, "").unwrap(), Some(1 << 30));
        assert_eq!(max(None, "job-log-max-size = \"10GB\"\n").unwrap(), Some(10_000_000_000));
        assert_eq!(max(Some("512MiB"), "job-log-max-size = \"10GB\"\n").unwrap(), Some(512 << 20));
        assert_eq!(max(Some("none"), "").unwrap(), None);
        let err = max(Some("lots"), "").unwrap_err();
        assert!(matches!(err, ConfigError::JobLog(_)) && err.to_string().contains("\"lots\""), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn gearmand_log_levels_are_understood() {
        let config = Settings { verbose: Some("notice".into()), ..Default::default() }.resolve().unwrap();
        assert_eq!(config.log_level, tracing::Level::INFO);
        assert!(Settings { verbose: Some("loud".into()), ..Default::default() }.resolve().is_err());
    }
}
