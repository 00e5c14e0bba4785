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

pub mod broker;
pub mod config;
pub mod fd_limit;
pub mod http;
pub mod outbox;
pub mod server;
mod session;
mod shared;
pub mod store;

pub use config::{Config, ConfigError, Settings};
pub use gearbox_store::StoreError;
pub use server::{serve, ServeError, ServeOptions};
pub use store::QueueSpec;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Runs a server as configured until SIGTERM, SIGINT or an allowed admin `shutdown`. Sets
/// the process's open-files limit first (see [`fd_limit::set`]).
pub async fn run(config: Config) -> std::io::Result<()> {
    // Installed before anything else: a signal that arrives early must not kill the process.
    use tokio::signal::unix::{signal, SignalKind};
    let signals = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
    match fd_limit::set(config.file_descriptors)? {
        (before, now) if before < now => tracing::info!("open files limit: {now} (raised from {before})"),
        (before, now) if before > now => tracing::info!("open files limit: {now} (lowered from {before})"),
        (_, now) => tracing::info!("open files limit: {now}"),
    }
    let mut listeners = Vec::new();
    for addr in &config.listen {
        // An IP address (v6 with or without brackets) or a host name.
        let bind = match addr.trim_matches(|c| c == '[' || c == ']').parse::<std::net::IpAddr>() {
            Ok(ip) => std::net::SocketAddr::new(ip, config.port).to_string(),
            Err(_) => format!("{addr}:{}", config.port),
        };
        let listener = TcpListener::bind(&bind)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {bind}: {e}")))?;
        listeners.push(listener);
    }
    let http = config.http.bind().await?;
    if let Some(path) = &config.pid_file {
        std::fs::write(path, format!("{}\n", std::process::id()))?;
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(signals, shutdown.clone()));
    serve(listeners, http, config.serve, shutdown).await.map_err(std::io::Error::other)?;
    if let Some(path) = &config.pid_file {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("server stopped");
    Ok(())
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
