//! The HTTP side (`--http`, default 127.0.0.1:4731): the dashboard at `/`, Prometheus metrics
//! at `/metrics`, and a JSON API under `/api` (described by `/api/openapi.json`). Everything
//! here reads copies of the broker's state taken under its lock, or talks to the broker as a
//! Gearman client would ([`local::LocalConn`]), so the job path never waits on HTTP.

use std::sync::Arc;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::server::Shared;

mod api;
mod local;
mod metrics;

const DASHBOARD: &str = include_str!("dashboard.html");
const OPENAPI: &str = include_str!("openapi.json");

/// The default HTTP address: loopback only, next to the Gearman port.
pub const DEFAULT_ADDR: &str = "127.0.0.1:4731";

/// What `--http` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpSpec {
    Off,
    /// The default address: if it is busy, the server warns and runs without HTTP.
    Default,
    /// An address the user gave: failing to bind it is fatal.
    At(String),
}

impl HttpSpec {
    pub fn parse(s: Option<&str>) -> HttpSpec {
        match s {
            None => HttpSpec::Default,
            Some("off" | "none") => HttpSpec::Off,
            Some(addr) => HttpSpec::At(addr.to_owned()),
        }
    }

    /// Binds the listener; `Ok(None)` when HTTP is off or the default address is taken.
    pub async fn bind(&self) -> std::io::Result<Option<TcpListener>> {
        match self {
            HttpSpec::Off => Ok(None),
            HttpSpec::Default => match TcpListener::bind(DEFAULT_ADDR).await {
                Ok(l) => Ok(Some(l)),
                Err(e) => {
                    tracing::warn!("HTTP (dashboard, metrics, API) is off: cannot listen on {DEFAULT_ADDR}: {e}; choose another address with --http ADDR:PORT");
                    Ok(None)
                }
            },
            HttpSpec::At(addr) => TcpListener::bind(addr)
                .await
                .map(Some)
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen for HTTP on {addr}: {e}"))),
        }
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(|| async { ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], DASHBOARD) }))
        .route("/metrics", get(metrics::render))
        .route("/api/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }))
        .nest("/api", api::routes())
        .fallback(|| async { api::ApiError::not_found("no such page").into_response() })
        .with_state(shared)
}

/// Serves HTTP on `listener` until `shutdown`.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!("dashboard, metrics and API on http://{addr}/");
    }
    let app = router(shared);
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await {
        tracing::error!("HTTP server failed: {e}");
    }
}
