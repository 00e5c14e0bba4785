//! The gearbox job server.
//!
//! - [`config`]: flags, environment and config file, layered into a [`Config`].
//! - [`broker`]: all job-queue state and the rules that change it (pure, synchronous).
//! - [`outbox`]: per-connection output buffers the broker writes into.
//! - `shared`: the state connection tasks, the store thread and HTTP share (the broker
//!   behind its mutex, server facts).
//! - `session`: one task per connection (read, decode, apply, write).
//! - [`store`]: the durable queue: choosing a store, loading it, the store thread.
//! - [`server`]: listeners, the timer task, and shutdown; [`serve`] runs a server on
//!   listeners a caller has bound (tests bind `127.0.0.1:0`).
//! - [`http`]: the dashboard, Prometheus metrics and the JSON API.
//! - [`fd_limit`]: the open-files limit, raised at start so connections are not capped at 1,024.

mod accept;
pub mod broker;
mod cluster;
pub mod config;
pub mod fd_limit;
pub mod http;
pub mod lifecycle;
pub mod outbox;
pub mod security;
pub mod server;
mod session;
mod shared;
pub mod store;

pub use config::{Config, ConfigError, Settings};
pub use gearbox_store::StoreError;
pub use server::{serve, serve_on, Listeners, ServeError, ServeOptions};
pub use store::QueueSpec;

use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;

/// Runs a server as configured until SIGTERM, SIGINT or an allowed admin `shutdown`. Sets
/// the process's open-files limit first (see [`fd_limit::set`]).
pub async fn run(config: Config) -> std::io::Result<()> {
    // Installed before anything else: a signal that arrives early must not kill the process.
    use tokio::signal::unix::{signal, SignalKind};
    let signals = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
    let mut hangup = signal(SignalKind::hangup())?;
    match fd_limit::set(config.file_descriptors) {
        Ok((before, now)) if before < now => tracing::info!("open files limit: {now} (raised from {before})"),
        Ok((before, now)) if before > now => tracing::info!("open files limit: {now} (lowered from {before})"),
        Ok((_, now)) => tracing::info!("open files limit: {now}"),
        // Only a limit the user asked for is worth refusing to start over.
        Err(e) if config.file_descriptors.is_none() => {
            tracing::warn!("{e}; open files limit: {}", fd_limit::current())
        }
        Err(e) => return Err(e),
    }
    let mut listeners = Listeners::default();
    for addr in &config.listen {
        let listener = listen(addr, config.port, config.backlog).await?;
        if config.tls_only { &mut listeners.tls } else { &mut listeners.gearman }.push(listener);
        if let Some(port) = config.ssl_port {
            listeners.tls.push(listen(addr, port, config.backlog).await?);
        }
    }
    let security = &config.serve.security;
    let guarded = security.http.has_tokens() || security.http.insecure || security.acl.is_none();
    if config.http == http::HttpSpec::Default && !guarded {
        // Not asked for by name: left off, rather than refusing to start (see check_exposure).
        tracing::warn!(
            "HTTP (dashboard, metrics, API) is off: with --acl it needs a token (--http-token); \
             --http-insecure serves it without one"
        );
    } else {
        listeners.http = config.http.bind().await?;
    }
    if let Some(listener) = &listeners.http {
        http::check_exposure(listener.local_addr()?, &security.http, security.acl.is_some())?;
    }
    if let Some(path) = &config.pid_file {
        std::fs::write(path, format!("{}\n", std::process::id()))?;
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(signals, shutdown.clone()));
    let reload = config.serve.reload.clone();
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            reload.notify_one();
        }
    });
    serve_on(listeners, config.serve, shutdown).await.map_err(std::io::Error::other)?;
    if let Some(path) = &config.pid_file {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("server stopped");
    Ok(())
}

/// Binds `addr` (an IP address, v6 with or without brackets, or a host name) on `port`, with
/// a listen backlog of `backlog` connections. The default of std and tokio, 128, is soon full
/// when thousands of workers reconnect after a restart; the client's kernel then retries each
/// connection after a second.
async fn listen(addr: &str, port: u16, backlog: u32) -> std::io::Result<TcpListener> {
    let bind = match addr.trim_matches(|c| c == '[' || c == ']').parse::<std::net::IpAddr>() {
        Ok(ip) => std::net::SocketAddr::new(ip, port).to_string(),
        Err(_) => format!("{addr}:{port}"),
    };
    let failed = |e: std::io::Error| std::io::Error::new(e.kind(), format!("cannot listen on {bind}: {e}"));
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "the name has no address");
    for at in tokio::net::lookup_host(&bind).await.map_err(failed)? {
        let socket = if at.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(failed)?;
        // As std and tokio do: a restarted server can bind while old connections linger.
        socket.set_reuseaddr(true).map_err(failed)?;
        match socket.bind(at).and_then(|()| socket.listen(backlog)) {
            Ok(listener) => return Ok(listener),
            Err(e) => last = e,
        }
    }
    Err(failed(last))
}

async fn stop_on_signal(
    signals: (tokio::signal::unix::Signal, tokio::signal::unix::Signal),
    shutdown: CancellationToken,
) {
    let (mut term, mut int) = signals;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        _ = shutdown.cancelled() => return,
    }
    shutdown.cancel();
}
